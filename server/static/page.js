// The page's script (server/templates/index.html): a file of its own, as the Content-Security-Policy
// (script-src 'self', server/nginx.conf) allows no inline scripts. The drawing pad, its predictions, and
// the widths of the upload result's bars (data-width: no inline styles either).
(function () {
  "use strict";
  // the upload result's bars, drawn by the server: their widths are data, set here (no style attributes)
  Array.prototype.forEach.call(document.querySelectorAll(".bar span[data-width]"), function (el) {
    el.style.width = el.getAttribute("data-width") + "%";
  });
  var pad = document.getElementById("pad");
  var ctx = pad.getContext("2d");
  var drawing = false, inked = false, timer = null;
  ctx.lineCap = "round"; ctx.lineJoin = "round"; ctx.lineWidth = 22; ctx.strokeStyle = "#000";

  function point(e) {
    var r = pad.getBoundingClientRect();
    return { x: (e.clientX - r.left) * pad.width / r.width, y: (e.clientY - r.top) * pad.height / r.height };
  }
  pad.addEventListener("pointerdown", function (e) {
    e.preventDefault(); drawing = true; inked = true;
    pad.setPointerCapture(e.pointerId);
    var p = point(e); ctx.beginPath(); ctx.moveTo(p.x, p.y); ctx.lineTo(p.x + 0.1, p.y + 0.1); ctx.stroke();
  });
  pad.addEventListener("pointermove", function (e) {
    if (!drawing) return;
    e.preventDefault();
    var p = point(e); ctx.lineTo(p.x, p.y); ctx.stroke();
  });
  function stop() {
    if (!drawing) return;
    drawing = false;
    clearTimeout(timer); timer = setTimeout(predict, 250);  // predict shortly after each stroke
  }
  pad.addEventListener("pointerup", stop);
  pad.addEventListener("pointercancel", stop);

  document.getElementById("clear").addEventListener("click", function () {
    ctx.clearRect(0, 0, pad.width, pad.height); inked = false;
    document.getElementById("draw-result").hidden = true;
    document.getElementById("draw-error").hidden = true;
  });
  document.getElementById("predict").addEventListener("click", predict);

  function showError(message) {
    var el = document.getElementById("draw-error");
    el.textContent = message; el.hidden = false;
  }
  function show(result) {
    document.getElementById("draw-error").hidden = true;
    document.getElementById("draw-digit").textContent = result.digit;
    var bars = document.getElementById("draw-bars");
    bars.textContent = "";
    result.probabilities.forEach(function (p, d) {
      var label = document.createElement("span"); label.textContent = d;
      var bar = document.createElement("div"); bar.className = "bar" + (d === result.digit ? " top" : "");
      var fill = document.createElement("span"); fill.style.width = (p * 100).toFixed(1) + "%"; bar.appendChild(fill);
      var pct = document.createElement("span"); pct.textContent = (p * 100).toFixed(1) + "%";
      bars.appendChild(label); bars.appendChild(bar); bars.appendChild(pct);
    });
    document.getElementById("draw-result").hidden = false;
  }
  function predict() {
    if (!inked) { showError("Draw a digit first."); return; }
    pad.toBlob(function (blob) {  // black strokes on a transparent background; the server handles both
      var form = new FormData(); form.append("file", blob, "canvas.png");
      fetch("/api/predict", { method: "POST", body: form })
        .then(function (r) { return r.json().then(function (j) { return { ok: r.ok, body: j }; }); })
        .then(function (r) { if (r.ok) show(r.body); else showError(r.body.error || "prediction failed"); })
        .catch(function (e) { showError("request failed: " + e); });
    }, "image/png");
  }
})();
