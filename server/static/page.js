// The page's script (server/templates/index.html): a file of its own, as the Content-Security-Policy
// (script-src 'self', server/nginx.conf) allows no inline scripts. The drawing pad, its predictions, and
// the widths of the upload result's bars (data-width: no inline styles either), one-click samples, and the live
// training card (#live-card: polls /api/progress every second).
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
  function drawBars(bars, result) {
    bars.textContent = "";
    result.probabilities.forEach(function (p, d) {
      var label = document.createElement("span"); label.textContent = d;
      var bar = document.createElement("div"); bar.className = "bar" + (d === result.digit ? " top" : "");
      var fill = document.createElement("span"); fill.style.width = (p * 100).toFixed(1) + "%"; bar.appendChild(fill);
      var pct = document.createElement("span"); pct.textContent = (p * 100).toFixed(1) + "%";
      bars.appendChild(label); bars.appendChild(bar); bars.appendChild(pct);
    });
  }
  function show(result) {
    document.getElementById("draw-error").hidden = true;
    document.getElementById("draw-digit").textContent = result.digit;
    drawBars(document.getElementById("draw-bars"), result);
    document.getElementById("draw-result").hidden = false;
  }
  // A request that never got an answer (refused or reset: a replica that just crashed, before the Service
  // drops it) is sent again after 0.25, 0.5, 1 and 2 s: the same image gives the same answer. An answer,
  // even an error, is never retried. docs/kubernetes.md, "When a server replica dies".
  var RETRY_DELAYS_MS = [250, 500, 1000, 2000];
  function send(form, attempt) {  // -> Promise of the Response to POST /api/predict
    return fetch("/api/predict", { method: "POST", body: form }).catch(function (e) {
      if (attempt >= RETRY_DELAYS_MS.length) throw e;
      return new Promise(function (wait) { setTimeout(wait, RETRY_DELAYS_MS[attempt]); })
        .then(function () { return send(form, attempt + 1); });
    });
  }
  function postImage(blob, name) {  // -> Promise of {ok, body}: /api/predict's answer to one image
    var form = new FormData(); form.append("file", blob, name);
    return send(form, 0)
      .then(function (r) { return r.json().then(function (j) { return { ok: r.ok, body: j }; }); });
  }
  function predict() {
    if (!inked) { showError("Draw a digit first."); return; }
    pad.toBlob(function (blob) {  // black strokes on a transparent background; the server handles both
      postImage(blob, "canvas.png")
        .then(function (r) { if (r.ok) show(r.body); else showError(r.body.error || "prediction failed"); })
        .catch(function (e) { showError("request failed: " + e); });
    }, "image/png");
  }

  // one click on a sample predicts it (the link still downloads it with a modifier key or from its menu)
  Array.prototype.forEach.call(document.querySelectorAll("a[data-sample]"), function (link) {
    link.addEventListener("click", function (e) {
      if (e.ctrlKey || e.metaKey || e.shiftKey || e.altKey || e.button !== 0) return;
      e.preventDefault();
      var name = link.getAttribute("data-sample");
      var err = document.getElementById("sample-error");
      fetch(link.getAttribute("href"))
        .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.blob(); })
        .then(function (blob) { return postImage(blob, name); })
        .then(function (r) {
          if (!r.ok) throw new Error(r.body.error || "prediction failed");
          err.hidden = true;
          document.getElementById("sample-name").textContent = name;
          document.getElementById("sample-digit").textContent = r.body.digit;
          drawBars(document.getElementById("sample-bars"), r.body);
          document.getElementById("sample-result").hidden = false;
        })
        .catch(function (e) { err.textContent = String(e.message || e); err.hidden = false; });
    });
  });

  // the live card: the run as it happens, from /api/progress, every second while the page is open
  var card = document.getElementById("live-card");
  if (card) {
    var SVG = "http://www.w3.org/2000/svg";
    var el = function (id) { return document.getElementById(id); };
    var fmt = function (v, digits) { return typeof v === "number" ? v.toFixed(digits) : "?"; };
    var roundText = function (s) {
      if (!s) return "";
      var head = "round " + (s.round === null ? "?" : s.round) + ": ";
      if (s.state === "waiting") return head + "waiting for models, " + s.present + " of " + s.expected +
        " present (" + s.min_workers + " needed)";
      if (s.state === "averaging") return head + "averaging " + s.present + " models";
      if (s.state === "failed") return head + "failed: " + (s.error || "");
      var extra = s.missing.length ? ", missing " + s.missing.join(", ") : "";
      extra += s.flagged.length ? ", flagged " + s.flagged.join(", ") : "";
      return head + (s.state === "scored" ? "aggregated and scored" : "aggregated") + extra;
    };
    var drawWorkers = function (workers) {
      var box = el("live-workers");
      box.textContent = "";
      workers.forEach(function (w) {
        var row = document.createElement("div"); row.className = "live-worker state-" + w.state;
        row.setAttribute("data-worker", w.worker); row.setAttribute("data-state", w.state);
        var name = document.createElement("span"); name.className = "live-name"; name.textContent = w.worker;
        var bar = document.createElement("div"); bar.className = "bar";
        var fill = document.createElement("span");
        var share = w.steps ? Math.min(1, (w.step || 0) / w.steps) : 0;
        fill.style.width = (share * 100).toFixed(1) + "%"; bar.appendChild(fill);
        var info = document.createElement("span"); info.className = "live-info";
        info.textContent = "round " + w.round + " · epoch " + w.epoch + "/" + w.epochs + " · step " + w.step + "/" +
          w.steps + " · loss " + fmt(w.loss, 4) + " · " + w.state +
          (w.state === "training" && typeof w.eta_seconds === "number" ? " · " + Math.round(w.eta_seconds) + " s left" : "");
        row.appendChild(name); row.appendChild(bar); row.appendChild(info); box.appendChild(row);
      });
    };
    var drawCurve = function (curve) {
      var svg = el("live-curve"), points = curve.filter(function (c) { return typeof c.test_accuracy === "number"; });
      svg.textContent = "";
      svg.setAttribute("data-points", String(points.length));
      if (!points.length) { el("live-curve-note").textContent = "test accuracy per round: none scored yet"; return; }
      var lo = Math.min.apply(null, points.map(function (c) { return c.test_accuracy; }).concat([0.9]));
      var last = Math.max(2, curve.length);
      var xy = function (c) {
        return [10 + 280 * (c.round - 1) / (last - 1), 110 - 100 * (c.test_accuracy - lo) / Math.max(1e-9, 1 - lo)];
      };
      var line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", points.map(function (c) { return xy(c).join(","); }).join(" "));
      line.setAttribute("class", "live-line"); svg.appendChild(line);
      points.forEach(function (c) {
        var dot = document.createElementNS(SVG, "circle"), p = xy(c);
        dot.setAttribute("cx", p[0]); dot.setAttribute("cy", p[1]); dot.setAttribute("r", 3);
        dot.setAttribute("class", "live-dot"); svg.appendChild(dot);
      });
      el("live-curve-note").textContent = "test accuracy per round: " + points.map(function (c) {
        return c.round + ": " + c.test_accuracy.toFixed(4);
      }).join(", ");
    };
    var poll = function () {
      fetch(card.getAttribute("data-progress"), { cache: "no-store" })
        .then(function (r) { return r.json(); })
        .then(function (p) {
          var status = p.served ? "serving model " + p.served.model + (p.served.round ? " (round " + p.served.round + ")" : "")
            : (p.phase === "failed" ? "training failed" : p.phase === "waiting" ? "waiting for training to start" : "training");
          if (p.served && p.training) status += "; training round " + p.round;
          else if (!p.served && p.round) status += " round " + p.round;
          el("live-status").textContent = status;
          el("live-status").setAttribute("data-phase", p.phase);
          el("live-round").textContent = roundText(p.round_state);
          drawWorkers(p.workers);
          drawCurve(p.curve);
        })
        .catch(function () { /* the next poll tries again */ })
        .then(function () { setTimeout(poll, 1000); });
    };
    poll();
  }
})();
