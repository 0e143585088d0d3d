"""Issue 32 on the real node (tests/test_real_node.py's cluster and node): the quickstart keeps the ConfigMap
mlk-progress up to date while the rounds run, and `kubectl get cm mlk-progress` read mid-run shows the round,
the workers' lines and, after the accuracy test, the accuracy; the quickstart's own output has the workers' lines.

    .venv/bin/python -m pytest -q tests/test_live_real_node.py   (markers cluster, slow; minutes)
"""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from helpers import KUBECTL, clean_env, get_json, kubectl
from test_real_node import CLASS, SCRIPTS, in_round_two, kubeconfig, need_image, ns  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def progress_configmap(config, namespace):
    """The data of the ConfigMap mlk-progress, or None while there is none."""
    proc = kubectl(config, "get", "cm", "mlk-progress", "-o", "json", namespace=namespace, check=False)
    return json.loads(proc.stdout)["data"] if proc.returncode == 0 else None


def test_the_progress_configmap_is_read_mid_run(kubeconfig, ns, mnist_npz):  # noqa: F811
    """2 workers x 2 epochs x 2 rounds (rwx backend, SERVE=0). Once round 2's trainer 0 has trained a few
    seconds, `kubectl get cm mlk-progress` gives round 2 with both workers' lines; at the end the accuracy the
    accuracy test printed. Teardown removes the ConfigMap with the rest."""
    for stage in ("splitter", "trainer", "aggregator"):
        need_image(stage)
    env = clean_env()
    env.update(KUBECTL=f"{KUBECTL} --kubeconfig {kubeconfig} -n {ns}", POLL="2", NFS_BACKEND="rwx",
               STORAGE_CLASS=CLASS, WORKER_NUMBER="2", EPOCH="2", ROUNDS="2", SERVE="0", MNIST_NPZ=str(mnist_npz))
    out_path = Path(f"/tmp/{ns}-live-quickstart.out")
    try:
        with open(out_path, "w") as out:
            run_ = subprocess.Popen(["bash", str(SCRIPTS / "quickstart.sh")], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 1800

        def read_until_round_two(pod_name):  # the watch applies it every POLL seconds while trainers run
            seen = []
            while time.monotonic() < deadline and run_.poll() is None:
                data = progress_configmap(kubeconfig, ns)
                seen.append(data)
                if data and data["round"] == "2" and "training" in data["workers"]:
                    return data
                time.sleep(2)
            pytest.fail(f"mlk-progress never showed round 2 training: {seen[-3:]}")

        mid = in_round_two(kubeconfig, ns, run_, out_path, "job-name=mnist-trainer-0", 5, deadline,
                           read_until_round_two)
        run_.wait(timeout=max(60, deadline - time.monotonic()))
        output = out_path.read_text()
        assert run_.returncode == 0, output[-6000:]
        assert mid is not None, "round 2 was not seen running"
        assert re.fullmatch(r"[0-2]/2", mid["workers_done"]), mid
        assert mid["phase"] in ("training", "serving"), mid
        assert re.search(r"^0-model\.h5 +round 2 +epoch [12]/2 +step +\d+/\d+ \[[#-]{20}\]", mid["workers"], re.M), mid
        assert "  0-model.h5   round 2" in output and "  1-model.h5   round 2" in output  # the terminal lines
        result = json.loads(re.search(r"accuracy test: (\{.*\})", output).group(1))
        final = progress_configmap(kubeconfig, ns)
        assert final["last_accuracy"] == f"{result['accuracy']:.4f}" and final["phase"] == "tested", final
        assert final["round"] == "2" and final["workers_done"] == "2/2", final
    finally:
        if "run_" in locals() and run_.poll() is None:
            run_.kill()
        down = subprocess.run(["bash", str(SCRIPTS / "teardown.sh")], env=dict(env, DELETE_DISK="1"),
                              capture_output=True, text=True, timeout=600)
    assert down.returncode == 0, down.stderr
    assert get_json(kubeconfig, "configmaps", "-l", "app.kubernetes.io/name=mlk-mnist", namespace=ns)["items"] == []
