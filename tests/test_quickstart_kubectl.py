"""scripts/quickstart.sh and scripts/teardown.sh against a recording kubectl stand-in on PATH: the
commands they issue, in order, for WORKER_NUMBER=3, what they apply, and the failure paths (a failing
Job -> its pods' logs printed, non-zero exit, the stage named). No cluster: the container end-to-end
run exercises the real images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kv_utils

import kubernetes_validate

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "scripts" / "quickstart.sh"
TEARDOWN = REPO / "scripts" / "teardown.sh"

# The stand-in records every call (one JSON argv per line) and the stdin of `apply -f -`.
FAKE_KUBECTL = r'''#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
log = os.environ["FAKE_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(args) + "\n")
if args[:1] == ["--context"]:  # KUBECTL="kubectl --context NAME"
    args = args[2:]
if args[:3] == ["apply", "-f", "-"]:
    n = sum(1 for _ in open(log))
    with open(os.path.join(os.environ["FAKE_DIR"], f"apply-{n:03d}.yaml"), "w") as f:
        f.write(sys.stdin.read())
    sys.exit(int(os.environ.get("FAKE_APPLY_RC", "0")))
fail_job = os.environ.get("FAKE_FAIL_JOB", "")
if args[:2] == ["get", "job"]:
    print("Failed" if args[2] == fail_job else "SuccessCriteriaMet Complete", end="")
elif args[:3] == ["get", "service", "nfs-server"]:
    print("" if os.environ.get("FAKE_NO_IP") else "10.96.0.42", end="")
elif args[:3] == ["get", "service", "mnist-server-svc"]:
    print("203.0.113.7", end="")
elif args[:3] == ["get", "deployment", "mnist-server"]:
    print(os.environ.get("FAKE_SERVER_EXISTS", ""), end="")
elif args[:2] == ["logs", "job/mnist-accuracy-test"]:
    print('{"loss": 0.0412, "accuracy": 0.9861}')
elif args[:2] == ["logs", "-l"]:
    print(f"[pod/{args[2]}] Traceback: fake trainer crash")
elif args[:2] == ["rollout", "status"] and args[2].endswith(os.environ.get("FAKE_FAIL_ROLLOUT", "-none-")):
    sys.exit(1)
elif args[:2] == ["config", "current-context"]:
    print("fake-context")
'''


@pytest.fixture
def fake(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    kubectl = bindir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace("/usr/bin/env python3", sys.executable, 1))
    kubectl.chmod(0o755)
    applied = tmp_path / "applied"
    applied.mkdir()
    log = tmp_path / "kubectl.log"

    def run(script, **env_overrides):
        env = {k: v for k, v in os.environ.items()
               if k not in ("WORKER_NUMBER", "EPOCH", "BATCH", "ROUNDS", "INCREMENTAL_NUMBER", "NFS_CLUSTER_IP",
                            "INIT_MODEL", "IMAGE_REGISTRY", "IMAGE_TAG", "KUBECTL", "SERVE", "NFS_BACKEND",
                            "DELETE_DISK", "GCE_DISK_ZONE")}
        env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(log), FAKE_DIR=str(applied),
                   POLL="0", **env_overrides)
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
        proc.calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        proc.applied = [list(yaml.safe_load_all(p.read_text())) for p in sorted(applied.glob("apply-*.yaml"))]
        return proc

    return run


def short(calls):
    """Each call as one string, with the long jsonpath/flags that every call of a kind shares trimmed."""
    out = []
    for c in calls:
        c = [a for a in c if not a.startswith("jsonpath=") and a != "-o"]
        out.append(" ".join(c))
    return out


def expected_calls(workers, rounds, serve=True, server_existed=False):
    calls = ["config current-context", "apply -f -", "apply -f -",
             "rollout status deployment/nfs-server --timeout=300s", "get service nfs-server", "apply -f -"]
    job = "delete job {} --ignore-not-found=true --cascade=foreground --wait=true"
    calls += [job.format("mnist-splitter"), "apply -f -", "get job mnist-splitter"]
    for _ in range(rounds):
        for i in range(workers):
            calls += [job.format(f"mnist-trainer-{i}"), "apply -f -"]
        calls += [f"get job mnist-trainer-{i}" for i in range(workers)]
        calls += [job.format("mnist-aggregator"), "apply -f -", "get job mnist-aggregator"]
    calls += [job.format("mnist-accuracy-test"), "apply -f -", "get job mnist-accuracy-test",
              "logs job/mnist-accuracy-test --tail=1"]
    if serve:
        calls += ["get deployment mnist-server --ignore-not-found=true name", "apply -f -"]
        if server_existed:
            calls += ["rollout restart deployment/mnist-server"]
        calls += ["rollout status deployment/mnist-server --timeout=600s", "get service mnist-server-svc"]
    return calls


def kinds_names(applied):
    return [[(d["kind"], d["metadata"]["name"]) for d in docs] for docs in applied]


def container_args(doc):
    return doc["spec"]["template"]["spec"]["containers"][0]["args"]


def test_quickstart_three_workers_two_rounds_issues_the_pipeline_in_order(fake):
    proc = fake(QUICKSTART, WORKER_NUMBER="3", EPOCH="2", BATCH="64", ROUNDS="2",
                IMAGE_REGISTRY="registry.example.com/me", IMAGE_TAG="1.2")
    assert proc.returncode == 0, proc.stderr
    assert short(proc.calls) == expected_calls(3, 2)

    trainers = [("Job", f"mnist-trainer-{i}") for i in range(3)]
    assert kinds_names(proc.applied) == (
        [[("Deployment", "nfs-server")], [("Service", "nfs-server")],
         [("PersistentVolume", "nfs"), ("PersistentVolumeClaim", "nfs")],
         [("ConfigMap", "mnist-config"), ("Job", "mnist-splitter")]]
        + [[t] for t in trainers] + [[("Job", "mnist-aggregator")]]
        + [[t] for t in trainers] + [[("Job", "mnist-aggregator")]]
        + [[("Job", "mnist-accuracy-test")], [("Deployment", "mnist-server"), ("Service", "mnist-server-svc")]])

    # What was filled in: the NFS IP read from the service, the worker count, the per-shard args,
    # --init-model only from round 2 on, and the image names rewritten for the user's registry.
    assert proc.applied[2][0]["spec"]["nfs"]["server"] == "10.96.0.42"
    assert proc.applied[3][0]["data"] == {"WORKER_NUMBER": "3"}
    assert container_args(proc.applied[3][1]) == ["--n_container", "3", "--savedir", "/mnt/data"]
    for r, first in ((1, 4), (2, 8)):
        for i in range(3):
            args = container_args(proc.applied[first + i][0])
            expect = ["--data", f"/mnt/data/{i}.npz", "--epoch", "2", "--batch", "64",
                      "--savemodel", f"/mnt/model/{i}-model.h5"]
            if r == 2:
                expect += ["--init-model", "/mnt/aggregated-model.h5"]
            assert args == expect
    images = {c["image"] for docs in proc.applied for d in docs if "template" in d.get("spec", {})
              for c in d["spec"]["template"]["spec"]["containers"] + d["spec"]["template"]["spec"].get("initContainers", [])}
    assert images == {"registry.k8s.io/volume-nfs:0.8", "registry.example.com/me/splitter:1.2",
                      "registry.example.com/me/trainer:1.2", "registry.example.com/me/aggregator:1.2",
                      "registry.example.com/me/server:1.2", "docker.io/library/busybox:1.37.0"}
    for docs in proc.applied:  # everything applied is valid for the newest Kubernetes known
        for d in docs:
            kubernetes_validate.validate(d, kv_utils.latest_version(), strict=True)

    out = proc.stdout
    assert '{"loss": 0.0412, "accuracy": 0.9861}' in out
    assert out.rstrip().endswith("server: http://203.0.113.7/")
    assert all(line[:2].isdigit() and line[2] == ":" for line in out.splitlines()), out  # timestamped


def test_quickstart_pvc_variant_and_no_server(fake):
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="1", NFS_BACKEND="pvc", SERVE="0")
    assert proc.returncode == 0, proc.stderr
    assert short(proc.calls) == expected_calls(2, 1, serve=False)
    assert kinds_names(proc.applied)[0] == [("PersistentVolumeClaim", "nfs-server-disk"), ("Deployment", "nfs-server")]
    assert "SERVE=0" in proc.stdout


def test_quickstart_rerun_restarts_an_existing_server(fake):
    proc = fake(QUICKSTART, WORKER_NUMBER="3", ROUNDS="1", FAKE_SERVER_EXISTS="deployment.apps/mnist-server")
    assert proc.returncode == 0, proc.stderr
    assert short(proc.calls) == expected_calls(3, 1, server_existed=True)


def test_quickstart_failed_trainer_prints_its_logs_and_names_the_stage(fake):
    proc = fake(QUICKSTART, WORKER_NUMBER="3", ROUNDS="2", FAKE_FAIL_JOB="mnist-trainer-1")
    assert proc.returncode == 1
    calls = short(proc.calls)
    # Stops at the failing trainer of round 1: trainer 0 waited for, 1 failed, logs fetched, nothing after.
    assert calls[-4:] == ["get job mnist-trainer-0", "get job mnist-trainer-1",
                          "get pods -l job-name=mnist-trainer-1 wide",
                          "logs -l job-name=mnist-trainer-1 --all-containers=true --prefix=true --tail=200"]
    assert "[pod/job-name=mnist-trainer-1] Traceback: fake trainer crash" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].endswith(
        "quickstart: stage trainer 1 (round 1) failed: job mnist-trainer-1 failed (logs above)")


def test_quickstart_nfs_timeout_names_the_stage(fake):
    proc = fake(QUICKSTART, FAKE_FAIL_ROLLOUT="nfs-server", NFS_TIMEOUT="7")
    assert proc.returncode == 1
    assert short(proc.calls)[-3:] == ["rollout status deployment/nfs-server --timeout=7s",
                                      "get pods -l role=nfs-server wide",
                                      "logs -l role=nfs-server --all-containers=true --prefix=true --tail=200"]
    assert "stage nfs failed: the NFS server did not become ready within 7s" in proc.stderr


def test_quickstart_refused_apply_names_the_stage(fake):
    proc = fake(QUICKSTART, FAKE_APPLY_RC="1")
    assert proc.returncode == 1
    assert short(proc.calls) == ["config current-context", "apply -f -"]
    assert "stage nfs failed: kubectl apply of" in proc.stderr


@pytest.mark.parametrize("env, message", [
    ({"WORKER_NUMBER": "0"}, "WORKER_NUMBER must be a positive integer"),
    ({"ROUNDS": "two"}, "ROUNDS must be a positive integer"),
    ({"NFS_BACKEND": "nfs"}, "NFS_BACKEND must be gce or pvc"),
    ({"KUBECTL": "no-such-kubectl-here"}, "'no-such-kubectl-here' not found"),
    ({"IMAGE_REGISTRY": "bad registry"}, "IMAGE_REGISTRY='bad registry' has characters"),
])
def test_quickstart_refuses_bad_configuration(fake, env, message):
    proc = fake(QUICKSTART, **env)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert [c for c in proc.calls if c[0] == "apply"] == []


def test_quickstart_kubectl_with_words(fake):
    proc = fake(QUICKSTART, KUBECTL="kubectl --context kind-mlk", WORKER_NUMBER="1", ROUNDS="1", SERVE="0")
    assert proc.returncode == 0, proc.stderr
    assert all(c[:2] == ["--context", "kind-mlk"] for c in proc.calls)


def test_quickstart_service_without_cluster_ip_names_the_stage(fake):
    proc = fake(QUICKSTART, FAKE_NO_IP="1")
    assert proc.returncode == 1
    assert "stage nfs failed: service nfs-server has no ClusterIP" in proc.stderr


def test_teardown_keeps_the_disk_unless_asked(fake):
    proc = fake(TEARDOWN)
    assert proc.returncode == 0, proc.stderr
    calls = short(proc.calls)
    deleted = [c for c in calls if c.startswith("delete")]
    assert deleted and len(deleted) == len(calls)
    joined = "\n".join(deleted)
    for obj in ("service mnist-server-svc", "deployment mnist-server", "deployment busybox", "configmap mnist-config",
                "persistentvolumeclaim nfs ", "persistentvolume nfs ", "service nfs-server", "deployment nfs-server"):
        assert obj in joined + " ", obj
    assert "jobs -l app.kubernetes.io/name=mlk-mnist" in joined
    # Users of the volume go before the volume, the volume before its server.
    order = [next(i for i, c in enumerate(deleted) if s in c + " ")
             for s in ("deployment mnist-server", "persistentvolumeclaim nfs ", "deployment nfs-server")]
    assert order == sorted(order)
    assert "nfs-server-disk" not in joined
    assert "kept" in proc.stdout


def test_teardown_delete_disk(fake, tmp_path):
    gcloud_log = tmp_path / "gcloud.log"
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {gcloud_log}\n")
    gcloud.chmod(0o755)
    proc = fake(TEARDOWN, DELETE_DISK="1", GCE_DISK_ZONE="us-central1-a", GCLOUD=str(gcloud))
    assert proc.returncode == 0, proc.stderr
    assert "delete persistentvolumeclaim nfs-server-disk" in "\n".join(short(proc.calls))
    assert gcloud_log.read_text().split() == ["compute", "disks", "delete", "ml-kube-disk", "--zone",
                                              "us-central1-a", "--quiet"]
