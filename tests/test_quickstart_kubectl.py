"""scripts/quickstart.sh and scripts/teardown.sh against a recording kubectl stand-in on PATH: what they
render and apply (placeholders, per-shard args, --init-model from round 2, image names, backends), their
refusals of bad settings, and teardown's order and its GCE disk handling. The real control plane runs
the same scripts in tests/test_cluster.py; this file pins down the exact objects and commands."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kv_utils

import kubernetes_validate

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "scripts" / "quickstart.sh"
TEARDOWN = REPO / "scripts" / "teardown.sh"

# The stand-in records every call (one JSON argv per line) and the stdin of `apply -f -`, and answers
# the status questions the scripts ask as a healthy cluster would (FAKE_* variables change that).
FAKE_KUBECTL = r'''#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
log = os.environ["FAKE_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(args) + "\n")
while args[:1] in (["--context"], ["-n"]):  # KUBECTL="kubectl --context NAME -n NS"
    args = args[2:]
env = os.environ.get
out = lambda s: print(s, end="")
if args[:3] == ["apply", "-f", "-"]:
    n = sum(1 for _ in open(log))
    with open(os.path.join(env("FAKE_DIR"), f"apply-{n:04d}.yaml"), "w") as f:
        f.write(sys.stdin.read())
    if env("FAKE_APPLY_RC"):
        print("Error from server (Forbidden): admission webhook denied the request", file=sys.stderr)
    sys.exit(int(env("FAKE_APPLY_RC", "0")))
what = " ".join(a for a in args if not a.startswith(("-o", "jsonpath=", "go-template=")))
template = next((a for a in args if a.startswith(("jsonpath=", "go-template="))), "")
failing = [j for j in env("FAKE_FAIL_JOB", "").split(",") if j]  # Jobs that fail (FAKE_FAIL_REASON); with
# FAKE_FAIL_WAITS=K, only once K `kubectl wait` calls were made (running until then)
waits = sum(line.startswith('["wait"') for line in open(log))
if env("FAKE_FAIL_WAITS") and waits <= int(env("FAKE_FAIL_WAITS")):
    failing, late = [], failing
else:
    late = []
# Jobs that never finish; with FAKE_RUNNING_WAITS=K, only until K `kubectl wait` calls were made
running = [j for j in env("FAKE_RUNNING_JOB", "").split(",") if j] + late
if env("FAKE_RUNNING_WAITS") and waits > int(env("FAKE_RUNNING_WAITS")):
    running = late
if args[:2] == ["get", "job"] and args[2] == env("FAKE_GONE_JOB"):  # deleted by someone else
    print(f'Error from server (NotFound): jobs.batch "{args[2]}" not found', file=sys.stderr)
    sys.exit(1)
elif args[:2] == ["get", "job"]:
    if args[2] in failing:
        reason = env("FAKE_FAIL_REASON", "BackoffLimitExceeded:Job has reached the specified backoff limit")
        out(f"Failed:{reason}\n")
    elif args[2] not in running:
        out("SuccessCriteriaMet:CompletionsReached:\nComplete:CompletionsReached:\n")
elif args[:2] == ["get", "jobs,pods"] and "component in (trainer,aggregator)" in " ".join(args):  # a round's Jobs
    for job in [f"mnist-trainer-{i}" for i in range(int(env("WORKER_NUMBER")))] + ["mnist-aggregator"]:
        if job == env("FAKE_GONE_JOB"):
            continue
        out(f"{job} exists\n")
        if job in failing:
            out(f"{job} Failed:{env('FAKE_FAIL_REASON', 'BackoffLimitExceeded:').split(':')[0]}\n")
        elif job not in running:
            out(f"{job} SuccessCriteriaMet:CompletionsReached\n{job} Complete:CompletionsReached\n")
        if job in env("FAKE_EXITED_JOB", "").split(","):  # its pod's container exited 0, the Job not marked yet
            out(f"{job} Complete:Completed\n")
elif args[:2] == ["get", "pods"] and "Complete:Completed" in template:  # job_state: a Job's pod exited 0
    job = args[args.index("-l") + 1].split("=", 1)[1]
    if job in env("FAKE_EXITED_JOB", "").split(","):
        out(f"{job} Complete:Completed\n")
elif args[:2] == ["get", "jobs,replicasets,pods,persistentvolumeclaims"]:
    for job in failing:
        if job in args[3]:
            code = 2 if "PodFailurePolicy" in env("FAKE_FAIL_REASON", "") else 1
            out(f"obj\tPod\t{job}-x1\tuid-1\tFailed\nterm\t{job}-x1\tmnist-trainer-job\t{code}\tError\t\n")
    if env("FAKE_WAITING") and "component=nfs-server" in args[3]:
        out(f"obj\tPod\tnfs-server-abc\tuid-2\tPending\nwait\tnfs-server-abc\tnfs-server\t{env('FAKE_WAITING')}\tpull access denied\n")
elif args[:3] == ["get", "deployment", "nfs-server"] or args[:3] == ["get", "deployment", "mnist-server"]:
    out("" if env("FAKE_WAITING") else "ready")
elif args[:2] == ["get", "nodes"] and "allocatable" in template:  # room for the trainers: one roomy node
    if env("FAKE_NODES") == "forbidden":
        print('Error from server (Forbidden): nodes is forbidden: cannot list resource "nodes"', file=sys.stderr)
        sys.exit(1)
    out(env("FAKE_NODES", "node node-1 8 32Gi - \n"))
elif args[:2] == ["get", "pods"] and "--all-namespaces" in args:  # what the pods there request
    out(env("FAKE_NODE_PODS", "pod node-1 100m 128Mi\n"))
elif args[:2] == ["get", "nodes"]:  # the nodes' InternalIPs, for the NFS server's NetworkPolicy
    out(env("FAKE_NODE_IPS", "10.128.0.5 10.128.0.9 10.128.0.12"))
elif args[:2] == ["get", "pvc"]:
    out("Bound" if "phase" in template else "")
elif args[:3] == ["get", "storageclass", env("FAKE_CLASS", "-none-")]:
    out("Immediate" if "jsonpath" in template else "")
elif args[:2] == ["get", "storageclass"]:
    sys.exit(1)
elif args[:3] == ["get", "service", "nfs-server"]:
    out("" if env("FAKE_NO_IP") else "10.96.0.42")
elif args[:3] == ["get", "service", "mnist-server-svc"]:
    out("203.0.113.7" if "loadBalancer" in template else "uid-svc")
elif args[:2] == ["exec", "-i"]:  # the dataset upload: what arrived on stdin, counted
    if env("FAKE_EXEC_FAIL"):
        sys.exit(1)
    print(len(sys.stdin.buffer.read()))
elif args[:3] == ["get", "pod", "mnist-dataset-upload"]:
    out("True")
elif args[:2] == ["get", "pods"] and "exitCode" in template:  # the accuracy test's pod that exited 0
    out(env("FAKE_ACCURACY_POD", ""))
elif args[:2] == ["logs", "pod/mnist-accuracy-test-ok"]:
    print('{"loss": 0.0399, "accuracy": 0.9877}')
elif args[:2] == ["logs", "job/mnist-accuracy-test"]:
    print('{"loss": 0.0412, "accuracy": 0.9861}')
elif args[:2] == ["logs", "job/mnist-ledger-restore"]:
    print(env("FAKE_LEDGER", '{"last_round": 0, "sha256": null}'))
elif args[:2] == ["logs", "-l"]:
    print(f"[pod/{args[2]}] Traceback: fake trainer crash")
elif args[:2] == ["get", "pods"] and "creationTimestamp" in template:  # the breakdown: a pod per stage
    component = args[args.index("-l") + 1].rsplit("=", 1)[1]
    out(f"{component}-p1 2026-01-02T03:04:01Z 2026-01-02T03:04:02Z 2026-01-02T03:04:05Z 2026-01-02T03:04:20Z\n")
elif args[:1] == ["logs"] and "--timestamps" in args:  # its first log line
    print("2026-01-02T03:04:07.500000000Z data: /mnt/data/0.npz: 20000 samples")
elif args[:1] == ["wait"] or args[:2] == ["rollout", "status"]:  # watching a Job or Deployment not done
    selected = next((a[len("job-name in ("):-1].split(",") for a in args if a.startswith("job-name in (")), [])
    if any(f"job/{j}" in args or f"job-name={j}" in args or j in selected for j in running) or (
            env("FAKE_WAITING") and "deployment/nfs-server" in args):
        import time
        time.sleep(float(next(a for a in args if a.startswith("--timeout="))[10:-1]))
        sys.exit(1)
elif args[:3] == ["auth", "can-i", "create"]:
    print(env("FAKE_CAN_I", "yes"))
elif args[:2] == ["config", "current-context"]:
    out("fake-context")
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
                            "STORAGE_CLASS", "SERVICE_TYPE", "DELETE_DISK", "GCE_DISK_ZONE", "MNIST_NPZ", "DATASET",
                            "MIN_WORKERS", "ROUND_DEADLINE", "RESUME", "GCE_PROJECT", "NODE_CIDR", "SPLIT",
                            "AGGREGATION", "SERVER_OPTIMIZER", "SERVER_LR", "SERVER_MOMENTUM", "PROX_MU",
                            "LOCAL_STEPS", "ATTACK", "PRESET", "RUN_ID", "DATASET_WAIT", "LAST_ROUND")}
        env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(log), FAKE_DIR=str(applied), POLL="0")
        env.update(env_overrides)
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
        proc.calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        proc.applied = [list(yaml.safe_load_all(p.read_text())) for p in sorted(applied.glob("apply-*.yaml"))]
        return proc

    return run


def kinds_names(applied):
    return [[(d["kind"], d["metadata"]["name"]) for d in docs] for docs in applied]


def container_args(doc):
    return doc["spec"]["template"]["spec"]["containers"][0]["args"]


def without_run_id(args):
    """args without their "--run-id ID" pair (the splitter's and round 1's trainers': a new id every run)."""
    if "--run-id" not in args:
        return args
    i = args.index("--run-id")
    return args[:i] + args[i + 2:]


def nfs_steps(proc):
    """The kubectl calls of the nfs stage in order, each apply as the (kind, name)s it applied, up to
    the apply of the NFS PersistentVolume."""
    applied = iter(kinds_names(proc.applied))
    steps = []
    for c in proc.calls:
        c = c[4:] if c[:1] == ["--context"] else c
        if c[:3] == ["apply", "-f", "-"]:
            steps.append(("apply", next(applied)))
            if ("PersistentVolume", "mlk-nfs-default") in steps[-1][1]:
                return steps
        elif c[:2] == ["get", "nodes"] and "allocatable" not in " ".join(c):  # not the trainers' room
            steps.append(("get", "nodes"))
        elif c[:2] in (["get", "pvc"], ["get", "deployment"], ["get", "service"]):
            steps.append(tuple(c[:3]))
    return steps


def nfs_policy(proc):
    [policy] = [d for docs in proc.applied for d in docs if d["kind"] == "NetworkPolicy"]
    return policy


def test_quickstart_three_workers_two_rounds_applies_the_pipeline_in_order(fake):
    proc = fake(QUICKSTART, WORKER_NUMBER="3", EPOCH="2", BATCH="64", ROUNDS="2",
                IMAGE_REGISTRY="registry.example.com/me", IMAGE_TAG="1.2")
    assert proc.returncode == 0, proc.stderr

    trainers = [("Job", f"mnist-trainer-{i}") for i in range(3)]
    assert kinds_names(proc.applied) == (
        [[("PersistentVolumeClaim", "nfs-server-disk"), ("Deployment", "nfs-server")], [("Service", "nfs-server")],
         [("NetworkPolicy", "nfs-server")], [("PersistentVolume", "mlk-nfs-default"), ("PersistentVolumeClaim", "nfs")],
         [("ConfigMap", "mnist-config"), ("Job", "mnist-splitter")]]
        + [trainers] + [[("Job", "mnist-aggregator")]]  # the trainers in one apply (issue 30)
        # the trainers live through both rounds: round 2 applies its aggregator only; the accuracy test starts
        # beside the last round, waiting for its aggregate; the server's replicas start once the round is in,
        # while the accuracy test ends (issue 30)
        + [[("Job", "mnist-aggregator")], [("Job", "mnist-accuracy-test")]]
        + [[("Deployment", "mnist-server"), ("Service", "mnist-server-svc")], [("PodDisruptionBudget", "mnist-server")]])

    # The nfs stage: the server's claim bound before the rest, the nodes' range (10.128.0.5-12) in its
    # NetworkPolicy, the server ready before its ClusterIP goes into the PV.
    assert nfs_steps(proc) == [
        ("apply", [("PersistentVolumeClaim", "nfs-server-disk"), ("Deployment", "nfs-server")]),
        ("get", "pvc", "nfs-server-disk"), ("get", "pvc", "nfs-server-disk"),  # its class, then its phase
        ("apply", [("Service", "nfs-server")]),
        ("get", "nodes"), ("apply", [("NetworkPolicy", "nfs-server")]),
        ("get", "deployment", "nfs-server"), ("get", "service", "nfs-server"),
        ("apply", [("PersistentVolume", "mlk-nfs-default"), ("PersistentVolumeClaim", "nfs")])]
    assert nfs_policy(proc)["spec"]["ingress"][0]["from"][0] == {"ipBlock": {"cidr": "10.128.0.0/28"}}
    assert "warning" not in proc.stderr
    # What was filled in: the NFS IP read from the service, the worker count, the per-shard args,
    # --init-model only from round 2 on, and the image names rewritten for the user's registry.
    assert proc.applied[3][0]["spec"]["nfs"]["server"] == "10.96.0.42"
    assert proc.applied[4][0]["data"] == {"WORKER_NUMBER": "3"}
    # The splitter names its split, and round 1's trainers, applied with it, wait for that split (issue 30)
    splitter_args = container_args(proc.applied[4][1])
    assert splitter_args[:5] == ["--n_container", "3", "--savedir", "/mnt/data", "--run-id"]
    run_id = splitter_args[5]
    assert len(splitter_args) == 6 and re.fullmatch(r"run-\d{14}-\d+", run_id)
    for i in range(3):
        # one process a worker trains both rounds, each from the round before's aggregate as the ledger records
        # it (trainer.py --last-round; issue 30); round 1 records the common start weights for the ledger
        assert container_args(proc.applied[5][i]) == [
            "--data", f"/mnt/data/{i}.npz", "--epoch", "2", "--batch", "64", "--threads", "$(CPU_LIMIT)",
            "--wait-data", "1800", "--run-id", run_id, "--last-round", "2", "--ledger", "/mnt/rounds/ledger.json",
            "--savemodel", f"/mnt/model/{i}-model.h5", "--save-init", "/mnt/rounds/r0.h5"]
    for r, applied in ((1, 6), (2, 7)):
        # every worker's model needed (MIN_WORKERS defaults to WORKER_NUMBER), today's wait; the aggregator
        # closes its round only (--round), not the round before's models still there
        assert container_args(proc.applied[applied][0]) == [
            "--dir", "/mnt/model", "--savefile", "/mnt/aggregated-model.h5", "--expect", "$(WORKER_NUMBER)",
            "--min-workers", "3", "--round", str(r), "--deadline", "3600"]
    accuracy = proc.applied[8][0]
    assert container_args(accuracy)[-6:] == ["--ledger", "/mnt/rounds/ledger.json", "--wait-round", "2",
                                             "--wait", "4200"]
    assert accuracy["spec"]["activeDeadlineSeconds"] == 4200 + 900  # the aggregator's deadline, then its own
    images = {c["image"] for docs in proc.applied for d in docs if "template" in d.get("spec", {})
              for c in d["spec"]["template"]["spec"]["containers"] + d["spec"]["template"]["spec"].get("initContainers", [])}
    assert images == {"registry.example.com/me/nfs-server:1.2", "registry.example.com/me/splitter:1.2",
                      "registry.example.com/me/trainer:1.2", "registry.example.com/me/aggregator:1.2",
                      "registry.example.com/me/server:1.2"}
    for docs in proc.applied:  # everything applied is valid for the newest Kubernetes known
        for d in docs:
            kubernetes_validate.validate(d, kv_utils.latest_version(), strict=True)
    # Each round's aggregator Job is replaced; the server is not restarted (it reloads the model itself).
    # Round 1's trainers are applied right after the splitter, before it is waited for; an earlier run's
    # trainer Jobs went first, by label.
    applies = [i for i, c in enumerate(proc.calls) if c[:3] == ["apply", "-f", "-"]]
    looks = [i for i, c in enumerate(proc.calls) if c[:1] in (["get"], ["wait"]) and "mnist-splitter" in " ".join(c)]
    assert looks and applies[4] < applies[5] < looks[0]
    old_trainers = proc.calls.index(["delete", "jobs", "-l", "app.kubernetes.io/name=mlk-mnist,app.kubernetes.io/component=trainer",
                                     "--ignore-not-found=true", "--cascade=foreground", "--wait=true"])
    assert old_trainers < applies[4]
    deletes = [c for c in proc.calls if c[:2] == ["delete", "job"]]
    assert [d[2:-3] for d in deletes] == [["mnist-splitter"], ["mnist-aggregator"], ["mnist-aggregator"],
                                          ["mnist-accuracy-test"]]
    assert not [c for c in proc.calls if c[:2] == ["rollout", "restart"]]

    out = proc.stdout
    assert '{"loss": 0.0412, "accuracy": 0.9861}' in out
    assert "/mnt/rounds/ledger.json" in out and "/mnt/rounds/history.png" in out
    assert "server: http://203.0.113.7/" in out
    assert all(line[:2].isdigit() and line[2] == ":" for line in out.splitlines()), out  # timestamped


def test_quickstart_gce_backend_uses_the_original_disk(fake):
    """The disk ml-kube-disk of GCE_PROJECT in GCE_DISK_ZONE, as a PD CSI PersistentVolume pinned to its
    zone, behind the same NFS server Deployment as the pvc backend's."""
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="1", NFS_BACKEND="gce", SERVE="0",
                GCE_PROJECT="proj-42", GCE_DISK_ZONE="europe-west1-b")
    assert proc.returncode == 0, proc.stderr
    first = proc.applied[0]
    assert kinds_names([first]) == [[("PersistentVolume", "mlk-disk-default"), ("PersistentVolumeClaim", "nfs-server-disk"),
                                     ("Deployment", "nfs-server")]]
    pv, claim, deployment = first
    assert pv["spec"]["csi"]["driver"] == "pd.csi.storage.gke.io"
    assert pv["spec"]["csi"]["volumeHandle"] == "projects/proj-42/zones/europe-west1-b/disks/ml-kube-disk"
    assert pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"] == [{"matchExpressions": [
        {"key": "topology.gke.io/zone", "operator": "In", "values": ["europe-west1-b"]}]}]
    assert claim["spec"]["volumeName"] == "mlk-disk-default"
    assert deployment["spec"]["template"]["spec"]["volumes"][0] == {
        "name": "export", "persistentVolumeClaim": {"claimName": "nfs-server-disk"}}
    # the claim binds (to the static PV) before the server is waited for, as with the pvc backend
    steps = nfs_steps(proc)
    assert steps.index(("get", "pvc", "nfs-server-disk")) < steps.index(("apply", [("Service", "nfs-server")]))
    pvc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="1", SERVE="0")
    assert pvc.returncode == 0, pvc.stderr
    assert [d for d in pvc.applied[0] if d["kind"] == "Deployment"] == [deployment]
    assert "SERVE=0" in proc.stdout


@pytest.mark.parametrize("env", [{}, {"GCE_PROJECT": "proj-42"}, {"GCE_DISK_ZONE": "europe-west1-b"}],
                         ids=["neither", "no-zone", "no-project"])
def test_quickstart_gce_backend_without_the_disks_project_and_zone_fails_at_config(fake, env):
    proc = fake(QUICKSTART, NFS_BACKEND="gce", **env)
    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert "quickstart: stage config failed: NFS_BACKEND=gce needs GCE_PROJECT and GCE_DISK_ZONE" in line
    assert proc.calls == []  # before anything talks to the cluster


def test_quickstart_nfs_policy_takes_node_cidr_as_given(fake):
    proc = fake(QUICKSTART, WORKER_NUMBER="1", ROUNDS="1", SERVE="0", NODE_CIDR="172.16.0.0/12")
    assert proc.returncode == 0, proc.stderr
    assert nfs_policy(proc)["spec"]["ingress"][0]["from"][0] == {"ipBlock": {"cidr": "172.16.0.0/12"}}
    assert ("get", "nodes") not in nfs_steps(proc)


@pytest.mark.parametrize("ips, cidr", [
    ("10.0.3.7", "10.0.3.7/32"),                   # one node
    ("10.0.3.7 10.0.3.6", "10.0.3.6/31"),
    ("192.168.1.200 192.168.2.1", "192.168.0.0/22"),
    ("10.0.0.1 10.255.0.1", "10.0.0.0/8"),
    ("10.1.2.3 172.16.0.1", "0.0.0.0/0"),          # nothing narrower holds both
])
def test_quickstart_nfs_policy_range_is_the_smallest_that_holds_every_node(fake, ips, cidr):
    proc = fake(QUICKSTART, WORKER_NUMBER="1", ROUNDS="1", SERVE="0", FAKE_NODE_IPS=ips)
    assert proc.returncode == 0, proc.stderr
    assert nfs_policy(proc)["spec"]["ingress"][0]["from"][0] == {"ipBlock": {"cidr": cidr}}


@pytest.mark.parametrize("ips", ["", "fd00::5", "10.0.0.1 not-an-ip"], ids=["none", "ipv6", "garbage"])
def test_quickstart_nfs_policy_without_readable_node_ips_admits_any_address_and_warns(fake, ips):
    proc = fake(QUICKSTART, WORKER_NUMBER="1", ROUNDS="1", SERVE="0", FAKE_NODE_IPS=ips)
    assert proc.returncode == 0, proc.stderr
    assert nfs_policy(proc)["spec"]["ingress"][0]["from"][0] == {"ipBlock": {"cidr": "0.0.0.0/0"}}
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "admits any address on 2049" in warnings[0] and "set NODE_CIDR" in warnings[0]


def test_quickstart_rwx_backend_needs_no_nfs_server(fake):
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="1", NFS_BACKEND="rwx", STORAGE_CLASS="standard-rwx",
                FAKE_CLASS="standard-rwx", SERVE="1", SERVICE_TYPE="ClusterIP")
    assert proc.returncode == 0, proc.stderr
    assert kinds_names(proc.applied)[0] == [("PersistentVolumeClaim", "nfs")]
    claim = proc.applied[0][0]
    assert claim["spec"]["storageClassName"] == "standard-rwx"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    applied_names = {n for docs in kinds_names(proc.applied) for _, n in docs}
    assert not applied_names & {"nfs-server", "nfs-server-disk"}
    server = [docs for docs in proc.applied if docs[0]["metadata"]["name"] == "mnist-server"][0]
    assert server[1]["spec"]["type"] == "ClusterIP"
    assert "port-forward service/mnist-server-svc 8080:80" in proc.stdout


def test_quickstart_mnist_npz_goes_onto_the_volume_and_the_splitter_reads_it(fake, tmp_path):
    """The upload pod, the splitter and round 1's trainers are applied together (issue 30): the splitter waits
    for the file this run uploads, under a name of this run's, so it never splits an earlier run's upload."""
    dataset = tmp_path / "mnist.npz"
    dataset.write_bytes(b"x" * 12345)
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="1", SERVE="0", MNIST_NPZ=str(dataset))
    assert proc.returncode == 0, proc.stderr
    names = [n for docs in kinds_names(proc.applied) for _, n in docs]
    assert names[names.index("mnist-dataset-upload"):names.index("mnist-trainer-1") + 1] == [
        "mnist-dataset-upload", "mnist-config", "mnist-splitter", "mnist-trainer-0", "mnist-trainer-1"]
    upload = [docs[0] for docs in proc.applied if docs[0]["metadata"]["name"] == "mnist-dataset-upload"][0]
    assert upload["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "nfs"
    splitter = [docs for docs in proc.applied if docs[-1]["metadata"]["name"] == "mnist-splitter"][0][-1]
    args = container_args(splitter)
    run_id = args[args.index("--run-id") + 1]
    assert without_run_id(args) == ["--n_container", "2", "--savedir", "/mnt/data", "--wait-data", "900",
                                    "--dataset", f"/mnt/uploads/{run_id}.npz"]  # NFS_TIMEOUT + 600
    # copied after every apply, into the splitter's file
    exec_index, exec_call = [(i, c) for i, c in enumerate(proc.calls) if c[:2] == ["exec", "-i"]][0]
    applies = [i for i, c in enumerate(proc.calls) if c[:3] == ["apply", "-f", "-"]]
    assert exec_call[2] == "mnist-dataset-upload" and exec_call[-1] == f"/mnt/uploads/{run_id}.npz"
    last_trainer = next(k for k, docs in enumerate(proc.applied) if docs[-1]["metadata"]["name"] == "mnist-trainer-1")
    assert max(i for i in applies if i < exec_index) == applies[last_trainer]
    assert "dataset: 12345 bytes on the volume" in proc.stdout
    assert ["delete", "pod", "mnist-dataset-upload", "--wait=false"] in proc.calls
    # the trainers' rows and the upload's count from the same apply; the splitter's and the upload's rows are
    # inside round 1's (benchmarks/benchmark-kubernetes.py)
    assert "round 1 dataset" in proc.stdout and "round 1 splitter" in proc.stdout


def test_quickstart_failed_upload_takes_the_splitter_and_round_1s_trainers_with_it(fake, tmp_path):
    dataset = tmp_path / "mnist.npz"
    dataset.write_bytes(b"x" * 100)
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="1", SERVE="0", MNIST_NPZ=str(dataset), FAKE_EXEC_FAIL="1")
    assert proc.returncode == 1
    assert f"stage dataset failed: could not copy {dataset} into pod mnist-dataset-upload" in proc.stderr
    assert proc.calls[-1] == ["delete", "job", "mnist-splitter", "mnist-trainer-0", "mnist-trainer-1",
                              "--ignore-not-found=true", "--wait=false"]


def test_quickstart_failed_trainer_prints_its_logs_and_names_the_stage(fake):
    proc = fake(QUICKSTART, WORKER_NUMBER="3", ROUNDS="2", FAKE_FAIL_JOB="mnist-trainer-1")
    assert proc.returncode == 1
    assert "[pod/job-name=mnist-trainer-1] Traceback: fake trainer crash" in proc.stderr
    last = proc.stderr.rstrip().splitlines()[-1]
    assert "quickstart: stage trainers (round 1) failed: job mnist-trainer-1 failed: BackoffLimitExceeded" in last
    assert "container mnist-trainer-job exited 1 (Error)" in last
    assert not [c for c in proc.calls if "mnist-aggregator" in c and c[0] == "apply"]


def applied_names(proc):
    return [n for docs in kinds_names(proc.applied) for _, n in docs]


def test_quickstart_min_workers_goes_on_without_a_failed_trainer(fake):
    """MIN_WORKERS=2 of 3: each round's aggregator is applied with its trainers (it closes the round), a
    trainer Job that fails is reported, and the run goes on to the accuracy test and the server."""
    proc = fake(QUICKSTART, WORKER_NUMBER="3", ROUNDS="2", MIN_WORKERS="2", ROUND_DEADLINE="900",
                FAKE_FAIL_JOB="mnist-trainer-1")
    assert proc.returncode == 0, proc.stderr
    names = applied_names(proc)
    round_objects = ["mnist-trainer-0", "mnist-trainer-1", "mnist-trainer-2", "mnist-aggregator"]
    start = names.index("mnist-splitter") + 1
    # a round's aggregator (and the last round's accuracy test) before its new trainers: scheduled first on nodes
    # that cannot take every trainer at once (round 1's trainers were applied with the splitter)
    assert names[start:start + 9] == round_objects[:3] + ["mnist-aggregator"] * 2 + ["mnist-accuracy-test"] + \
        round_objects[:3]
    assert names[start + 9:] == ["mnist-server", "mnist-server-svc", "mnist-server"]
    aggregator = [docs[0] for docs in proc.applied if docs[0]["metadata"]["name"] == "mnist-aggregator"][0]
    assert container_args(aggregator)[-6:] == ["--min-workers", "2", "--round", "1", "--deadline", "900"]
    # round 2: the trainer Jobs and the aggregator are replaced together before being applied again (round 1's
    # trainers were applied with the splitter, after an earlier run's went)
    deletes = [c[2:-3] for c in proc.calls if c[:2] == ["delete", "job"] and "mnist-aggregator" in c]
    assert deletes == [["mnist-aggregator"], round_objects]
    for r in (1, 2):
        assert f"round {r}: job mnist-trainer-1 failed: BackoffLimitExceeded" in proc.stderr
        assert f"round {r}: going on without mnist-trainer-1 (2 trainers left, MIN_WORKERS=2)" in proc.stderr
        assert f"round {r}: aggregated model written without mnist-trainer-1 (the ledger records them missing)" \
            in proc.stdout
    assert proc.stderr.count("    [pod/job-name=mnist-trainer-1] Traceback: fake trainer crash") == 2  # its log
    assert '{"loss": 0.0412, "accuracy": 0.9861}' in proc.stdout
    assert "stage" not in proc.stderr  # reported, not failed


def test_quickstart_waits_for_the_rounds_last_trainers_by_their_pods(fake):
    """The aggregator done, two trainers not yet: the quickstart watches both trainers' pods in one `kubectl wait`
    (their containers' exit, seen before the Jobs' Complete condition), then closes the round."""
    proc = fake(QUICKSTART, WORKER_NUMBER="3", ROUNDS="1", SERVE="0", POLL="1",
                FAKE_RUNNING_JOB="mnist-trainer-1,mnist-trainer-2", FAKE_RUNNING_WAITS="1")
    assert proc.returncode == 0, proc.stderr
    waits = [c for c in proc.calls if c[:1] == ["wait"]]
    assert waits[0] == ["wait", "pod", "-l", "job-name in (mnist-trainer-1,mnist-trainer-2)",
                        "--for=jsonpath={.status.containerStatuses[0].state.terminated.reason}=Completed",
                        "--timeout=1s"]
    assert "round 1: aggregated model written" in proc.stdout


def test_quickstart_min_workers_stops_when_too_few_trainers_can_finish(fake):
    proc = fake(QUICKSTART, WORKER_NUMBER="3", ROUNDS="2", MIN_WORKERS="2",
                FAKE_FAIL_JOB="mnist-trainer-0,mnist-trainer-2")
    assert proc.returncode == 1
    last = proc.stderr.rstrip().splitlines()[-1]
    assert "stage trainers (round 1) failed: 2 of 3 trainer Jobs failed (mnist-trainer-0 mnist-trainer-2): " \
           "fewer than MIN_WORKERS=2 can finish" in last
    assert "mnist-accuracy-test" not in applied_names(proc)


def test_quickstart_min_workers_as_a_fraction_and_a_round_closed_without_a_slow_trainer(fake):
    """MIN_WORKERS=0.5 of 4 is 2 (rounded up, as the aggregator does). A trainer Job still running when the
    aggregator has closed the round is stopped, and the round says so."""
    proc = fake(QUICKSTART, WORKER_NUMBER="4", ROUNDS="1", MIN_WORKERS="0.5", SERVE="0",
                FAKE_RUNNING_JOB="mnist-trainer-3")
    assert proc.returncode == 0, proc.stderr
    aggregator = [docs[0] for docs in proc.applied if docs[0]["metadata"]["name"] == "mnist-aggregator"][0]
    assert container_args(aggregator)[-6:] == ["--min-workers", "2", "--round", "1", "--deadline", "3600"]
    assert "round 1: closed without mnist-trainer-3 (still running at the deadline): stopping them" in proc.stdout
    assert "round 1: aggregated model written without mnist-trainer-3" in proc.stdout
    accuracy = [i for i, c in enumerate(proc.calls) if c[:3] == ["delete", "job", "mnist-accuracy-test"]][0]
    stop = [i for i, c in enumerate(proc.calls) if c[:2] == ["delete", "job"] and "mnist-trainer-3" in c]
    # round 1's trainers go by label before they are applied with the splitter; the accuracy test is replaced
    # before it is applied with the last round; the slow trainer is stopped at the round's end
    assert len(stop) == 1 and accuracy < stop[0]
    assert proc.calls.index(["delete", "jobs", "-l", "app.kubernetes.io/name=mlk-mnist,app.kubernetes.io/component=trainer",
                             "--ignore-not-found=true", "--cascade=foreground", "--wait=true"]) < accuracy


def test_quickstart_min_workers_round_without_a_deleted_trainer_job(fake):
    """A trainer Job deleted while its round runs (by hand, or by something else): the aggregator closes the
    round without it, and the run says the Job is gone rather than stopping it."""
    proc = fake(QUICKSTART, WORKER_NUMBER="3", ROUNDS="1", MIN_WORKERS="2", SERVE="0", FAKE_GONE_JOB="mnist-trainer-0")
    assert proc.returncode == 0, proc.stderr
    assert "round 1: mnist-trainer-0: no such Job any more (deleted while the round ran)" in proc.stderr
    assert "round 1: aggregated model written without mnist-trainer-0" in proc.stdout
    assert "stopping them" not in proc.stdout


def test_quickstart_default_min_workers_still_fails_fast_on_a_failed_trainer(fake):
    proc = fake(QUICKSTART, WORKER_NUMBER="3", ROUNDS="1", MIN_WORKERS="3", FAKE_FAIL_JOB="mnist-trainer-2")
    assert proc.returncode == 1
    assert "stage trainers (round 1) failed: job mnist-trainer-2 failed" in proc.stderr.rstrip().splitlines()[-1]
    # the aggregator was applied beside the trainers (issue 30); the run stops before anything after the round
    names = applied_names(proc)
    assert names[names.index("mnist-splitter") + 1:] == [f"mnist-trainer-{i}" for i in range(3)] + [
        "mnist-aggregator", "mnist-accuracy-test"]  # the last round's accuracy test, waiting for it: deleted
    assert ["delete", "job", "mnist-accuracy-test", "--ignore-not-found=true", "--wait=false"] in proc.calls


def test_quickstart_failed_splitter_stops_round_1s_trainers_waiting_for_it(fake):
    """Round 1's trainers are applied with the splitter (issue 30) and wait for its split: a failed splitter
    stops the run naming it, and the trainers go with it rather than waiting for shards that never come."""
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="2", FAKE_FAIL_JOB="mnist-splitter")
    assert proc.returncode == 1
    assert "stage splitter failed: job mnist-splitter failed" in proc.stderr.rstrip().splitlines()[-1]
    names = applied_names(proc)
    assert names[names.index("mnist-splitter") + 1:] == ["mnist-trainer-0", "mnist-trainer-1"]
    assert proc.calls[-1] == ["delete", "job", "mnist-trainer-0", "mnist-trainer-1", "--ignore-not-found=true",
                              "--wait=false"]
    # a trainer that fails once the round runs is the round's to report: its Job is kept for its logs, and the
    # others, which would wait for a round that will not close, go
    before = len(proc.calls)
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="2", FAKE_FAIL_JOB="mnist-trainer-1")
    assert proc.returncode == 1 and "stage trainers (round 1) failed" in proc.stderr
    assert [c for c in proc.calls[before:] if c[:2] == ["delete", "job"] and "--wait=false" in c] == [
        ["delete", "job", "mnist-trainer-0", "--ignore-not-found=true", "--wait=false"]]


def test_quickstart_trainers_live_through_every_round_at_the_default_min_workers(fake):
    """At the default MIN_WORKERS each worker's trainer Job is applied once and trains every round
    (trainer.py --last-round, each round from the one before's aggregate; issue 30): a round before the last
    closes with its aggregator while the trainers still run, and the next round applies only its aggregator.
    The last round closes when the trainers are done too."""
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="3", SERVE="0", POLL="1",
                FAKE_RUNNING_JOB="mnist-trainer-0,mnist-trainer-1", FAKE_RUNNING_WAITS="1")
    assert proc.returncode == 0, proc.stderr
    names = applied_names(proc)
    trainers = ["mnist-trainer-0", "mnist-trainer-1"]
    assert names[names.index("mnist-splitter") + 1:] == trainers + ["mnist-aggregator"] * 3 + ["mnist-accuracy-test"]
    for doc in [d for docs in proc.applied for d in docs if d["metadata"]["name"] in trainers]:
        args = container_args(doc)
        assert args[args.index("--last-round"):args.index("--savemodel")] == [
            "--last-round", "3", "--ledger", "/mnt/rounds/ledger.json"]
    # rounds 1 and 2 did not wait for the running trainers: the only wait on them comes after round 3's apply
    waits = [i for i, c in enumerate(proc.calls) if c[:1] == ["wait"]]
    assert waits and {proc.calls[i][3] for i in waits} == {"job-name in (mnist-trainer-0,mnist-trainer-1)"}
    applies = [i for i, c in enumerate(proc.calls) if c[:3] == ["apply", "-f", "-"]]
    assert waits[0] > applies[-1]
    for r in (1, 2, 3):
        assert f"round {r}: aggregated model written" in proc.stdout
    # only the aggregator is replaced between rounds; the trainers' pods go into the breakdown once, for all rounds
    deletes = [c[2:c.index("--ignore-not-found=true")] for c in proc.calls if c[:2] == ["delete", "job"]]
    assert deletes == [["mnist-splitter"], ["mnist-aggregator"], ["mnist-aggregator"], ["mnist-aggregator"],
                       ["mnist-accuracy-test"]]
    assert proc.stdout.count("rounds 1-3 trainers ") == 1 and "round 1 trainers" not in proc.stdout


@pytest.mark.parametrize("nodes, pods, room", [
    ("node n1 2 8Gi - \n", "pod n1 100m 64Mi\n", "3 of 4"),  # 1.9 CPU - 0.2 (aggregator, accuracy test)
    ("node n1 8 32Gi - NoSchedule,\nnode n2 1500m 16Gi cordoned \n", "", "0 of 4"),  # tainted, cordoned
    ("node n1 8 3Gi - \n", "pod n1 0 512Mi\n", "1 of 4"),  # memory: 2.5Gi - 1.25Gi
])
def test_quickstart_trainers_that_do_not_all_fit_at_once_get_a_job_a_round(fake, nodes, pods, room):
    """Trainers that waited for their round to close would keep their CPU and memory from the trainers still to
    be scheduled (on the real node 3 of 8 ran round 1 and waited for 5 that never started): only when the
    schedulable nodes have room for every trainer at once, after what their pods request and a round's
    aggregator and accuracy test, do the trainers live through the rounds; else a Job a worker a round."""
    proc = fake(QUICKSTART, WORKER_NUMBER="4", ROUNDS="2", SERVE="0", FAKE_NODES=nodes, FAKE_NODE_PODS=pods)
    assert proc.returncode == 0, proc.stderr
    assert f"trainers: a Job a worker a round (the nodes have room for {room} at once" in proc.stdout
    trainers = [d for docs in proc.applied for d in docs if d["metadata"]["name"].startswith("mnist-trainer")]
    assert len(trainers) == 8 and not [d for d in trainers if "--last-round" in container_args(d)]
    # room for all four: one Job a worker
    before = len(proc.applied)
    proc = fake(QUICKSTART, WORKER_NUMBER="4", ROUNDS="2", SERVE="0", FAKE_NODES="node n1 3 8Gi - \nnode n2 3 8Gi - \n",
                FAKE_NODE_PODS=pods)
    assert "trainers: one Job a worker through all 2 rounds (the nodes have room for " in proc.stdout
    assert len([d for docs in proc.applied[before:] for d in docs if d["metadata"]["name"].startswith("mnist-trainer")]) == 4
    # the nodes or every namespace's pods cannot be read: a Job a round
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="2", SERVE="0", FAKE_NODES="forbidden")
    assert "trainers: a Job a worker a round (cannot read the nodes' free CPU and memory" in proc.stdout


def test_quickstart_failed_aggregator_takes_the_living_trainers_with_it(fake):
    """The trainers, living on into the next round, wait for the round's aggregate: when the aggregator fails
    the run stops naming it, and they go with it rather than waiting for a round that will not close."""
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="2", POLL="1", FAKE_FAIL_JOB="mnist-aggregator")
    assert proc.returncode == 1
    assert "stage aggregator (round 1) failed: job mnist-aggregator failed" in proc.stderr.rstrip().splitlines()[-1]
    names = applied_names(proc)
    assert names[names.index("mnist-splitter") + 1:] == ["mnist-trainer-0", "mnist-trainer-1", "mnist-aggregator"]
    assert ["delete", "job", "mnist-trainer-0", "mnist-trainer-1", "--ignore-not-found=true", "--wait=false"] in \
        proc.calls  # (the live progress may ask kubectl something after it)
    # MIN_WORKERS below WORKER_NUMBER: a round may close without a trainer, so each round has its own Jobs
    before = len(proc.applied)
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="2", SERVE="0", POLL="1", MIN_WORKERS="1")
    assert proc.returncode == 0, proc.stderr
    trainers = [d for docs in proc.applied[before:] for d in docs if d["metadata"]["name"].startswith("mnist-trainer")]
    assert len(trainers) == 4 and not [d for d in trainers if "--last-round" in container_args(d)]
    assert [container_args(d)[-2:] for d in trainers[2:]] == [["--init-model", "/mnt/aggregated-model.h5"]] * 2
    assert "round 1 trainers " in proc.stdout and "round 2 trainers " in proc.stdout


def test_quickstart_reads_the_accuracy_from_the_pod_that_succeeded(fake):
    """A retried accuracy test (its first pod failed while the NFS server restarted): `kubectl logs job/...` may
    answer the failed pod's last line; the quickstart reads the pod whose container exited 0."""
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="1", SERVE="0", FAKE_ACCURACY_POD="mnist-accuracy-test-ok ")
    assert proc.returncode == 0, proc.stderr
    assert 'accuracy test: {"loss": 0.0399, "accuracy": 0.9877}' in proc.stdout
    assert ["logs", "pod/mnist-accuracy-test-ok", "--tail=1"] in proc.calls


def test_quickstart_resume_continues_after_the_last_complete_round(fake):
    """RESUME=1: the restore Job checks the ledger and puts round 1's aggregate back; the run goes on with
    rounds 2 and 3 (both from the aggregate), without splitting again; the ConfigMap is applied alone."""
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="3", RESUME="1", SERVE="0",
                FAKE_LEDGER='{"last_round": 1, "sha256": "0123456789abcdef0123"}')
    assert proc.returncode == 0, proc.stderr
    names = applied_names(proc)
    assert names[names.index("mlk-nfs-default") + 2:] == (
        ["mnist-ledger-restore", "mnist-config", "mnist-aggregator", "mnist-trainer-0", "mnist-trainer-1",
         "mnist-aggregator", "mnist-accuracy-test"])  # the trainers train rounds 2 and 3; the aggregator goes first
    restore = [docs for docs in proc.applied if docs[0]["metadata"]["name"] == "mnist-ledger-restore"][0][0]
    assert restore["spec"]["template"]["spec"]["containers"][0]["args"] == ["restore", "--dir", "/mnt"]
    configmap = [docs for docs in proc.applied if docs[0]["metadata"]["name"] == "mnist-config"][0]
    assert [d["kind"] for d in configmap] == ["ConfigMap"] and configmap[0]["data"] == {"WORKER_NUMBER": "2"}
    for docs in proc.applied:
        if docs[0]["metadata"]["name"].startswith("mnist-trainer-"):
            args = container_args(docs[0])
            assert args[-2:] == ["--init-model", "/mnt/aggregated-model.h5"]
            assert args[args.index("--last-round"):args.index("--last-round") + 4] == [
                "--last-round", "3", "--ledger", "/mnt/rounds/ledger.json"]
    assert "resume: round 1 is the last complete one (rounds/r1.h5 0123456789ab..." in proc.stdout
    assert "round 1" not in proc.stdout.replace("resume: round 1", "")
    assert "== round 2/3" in proc.stdout and "round 3: aggregated model written" in proc.stdout


def test_quickstart_resume_with_every_round_done_only_tests_and_serves(fake):
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="2", RESUME="1",
                FAKE_LEDGER='{"last_round": 2, "sha256": "fedcba9876543210fedc"}')
    assert proc.returncode == 0, proc.stderr
    names = applied_names(proc)
    assert names[names.index("mnist-ledger-restore"):] == ["mnist-ledger-restore", "mnist-config",
                                                           "mnist-server", "mnist-server-svc", "mnist-server",
                                                           "mnist-accuracy-test"]
    assert "resume: all ROUNDS=2 rounds are done; on to the accuracy test" in proc.stdout


def test_quickstart_resume_of_an_empty_ledger_is_a_whole_run(fake, tmp_path):
    dataset = tmp_path / "mnist.npz"
    dataset.write_bytes(b"x" * 10)
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="1", RESUME="1", SERVE="0", MNIST_NPZ=str(dataset))
    assert proc.returncode == 0, proc.stderr
    names = applied_names(proc)
    assert names.index("mnist-ledger-restore") < names.index("mnist-dataset-upload") < names.index("mnist-splitter")
    trainer = [d for docs in proc.applied for d in docs if d["metadata"]["name"] == "mnist-trainer-0"][0]
    assert container_args(trainer)[-2:] == ["--save-init", "/mnt/rounds/r0.h5"]
    assert "resume: the ledger has no complete round; starting at round 1" in proc.stdout


def test_quickstart_resume_refuses_a_ledger_whose_files_changed(fake):
    """ledger.py exits 2 naming the file; the Job's podFailurePolicy fails it at once; the run stops with
    that line and what to do, before any trainer."""
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="3", RESUME="1", FAKE_FAIL_JOB="mnist-ledger-restore",
                FAKE_FAIL_REASON="PodFailurePolicy:Container ledger-restore for pod default/x failed with exit code 2",
                FAKE_LEDGER="ledger.py: error: rounds/r2.h5: sha256 0a1b... recorded, the file has 9f8e...")
    assert proc.returncode == 1
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.endswith("quickstart: stage resume failed: the round ledger on the volume does not match its files: "
                         "ledger.py: error: rounds/r2.h5: sha256 0a1b... recorded, the file has 9f8e.... RESUME=1 "
                         "continues only from an intact ledger: put that file back as it was, or run without "
                         "RESUME=1 to start a new run"), last
    names = applied_names(proc)
    assert names[-1] == "mnist-ledger-restore"


def test_quickstart_resume_needs_the_restore_result(fake):
    proc = fake(QUICKSTART, RESUME="1", FAKE_LEDGER="Traceback (most recent call last):")
    assert proc.returncode == 1
    assert "stage resume failed: cannot read the last complete round from job mnist-ledger-restore's log: its " \
           "last line is 'Traceback (most recent call last):'" in proc.stderr


def test_quickstart_image_pull_error_stops_after_its_grace(fake):
    # Kubernetes retries a pull: the run waits PULL_GRACE for it (a registry blip), then stops naming it.
    started = time.monotonic()
    proc = fake(QUICKSTART, FAKE_WAITING="ImagePullBackOff", NFS_TIMEOUT="9999", PULL_GRACE="3")
    assert proc.returncode == 1
    assert 2 <= time.monotonic() - started < 60  # SECONDS counts whole seconds
    last = proc.stderr.rstrip().splitlines()[-1]
    assert "stage nfs failed: pod nfs-server-abc: container nfs-server: ImagePullBackOff: pull access denied " \
           "(for 3s, PULL_GRACE)" in last


def test_quickstart_without_rights_on_persistent_volumes_points_to_rwx(fake, tmp_path):
    """A user who may not create PersistentVolumes (cluster-wide) gets one line naming the rwx backend,
    before anything is applied."""
    proc = fake(QUICKSTART, FAKE_CAN_I="no")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "stage config failed: NFS_BACKEND=pvc needs the right to create PersistentVolumes (cluster-wide), which "
        "'kubectl' lacks: use NFS_BACKEND=rwx STORAGE_CLASS=<a ReadWriteMany class>, or ask for that right")
    assert not any(c[:1] == ["apply"] for c in proc.calls)
    assert fake(QUICKSTART, FAKE_CAN_I="no", NFS_BACKEND="rwx", STORAGE_CLASS="x", FAKE_CLASS="x").returncode == 0


def test_quickstart_refuses_a_grace_that_is_not_a_number(fake):
    proc = fake(QUICKSTART, MOUNT_GRACE="2m")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "stage config failed: MOUNT_GRACE must be a whole number of seconds, got '2m'")


def test_quickstart_refused_apply_names_the_stage_and_the_reason(fake):
    proc = fake(QUICKSTART, FAKE_APPLY_RC="1")
    assert proc.returncode == 1
    assert [c[0] for c in proc.calls if c[0] == "apply"] == ["apply"]
    assert "stage nfs failed: kubectl apply of manifests/variants/1-nfs-deployment-pvc.yaml was refused: " \
           "Error from server (Forbidden): admission webhook denied the request" in proc.stderr


@pytest.mark.parametrize("env, message", [
    ({"WORKER_NUMBER": "0"}, "WORKER_NUMBER must be a positive integer"),
    ({"ROUNDS": "two"}, "ROUNDS must be a positive integer"),
    ({"NFS_BACKEND": "nfs"}, "NFS_BACKEND must be pvc, gce or rwx"),
    ({"NFS_BACKEND": "rwx"}, "NFS_BACKEND=rwx needs STORAGE_CLASS"),
    ({"NFS_BACKEND": "rwx", "STORAGE_CLASS": "nope"}, "StorageClass 'nope' not found"),
    ({"NFS_BACKEND": "gce", "GCE_PROJECT": "proj-42"}, "NFS_BACKEND=gce needs GCE_PROJECT and GCE_DISK_ZONE"),
    ({"NFS_BACKEND": "gce", "GCE_PROJECT": "p", "GCE_DISK_ZONE": "zone a"}, "GCE_DISK_ZONE='zone a' has characters"),
    ({"SERVICE_TYPE": "Ingress"}, "SERVICE_TYPE must be LoadBalancer, NodePort or ClusterIP"),
    ({"MNIST_NPZ": "/no/such/mnist.npz"}, "MNIST_NPZ=/no/such/mnist.npz is not a readable file"),
    ({"KUBECTL": "no-such-kubectl-here"}, "'no-such-kubectl-here' not found"),
    ({"MIN_WORKERS": "4"}, "MIN_WORKERS=4 is more than WORKER_NUMBER=3"),
    ({"MIN_WORKERS": "0"}, "MIN_WORKERS must be a whole number >= 1 or a fraction between 0 and 1"),
    ({"MIN_WORKERS": "most"}, "got 'most'"),
    ({"ROUND_DEADLINE": "-5"}, "ROUND_DEADLINE must be a positive integer"),
    ({"RESUME": "yes"}, "RESUME must be 0 or 1"),
    ({"IMAGE_REGISTRY": "bad registry"}, "IMAGE_REGISTRY='bad registry' has characters"),
    ({"SPLIT": "dirichlet"}, "SPLIT must be iid or label-skew"),
    ({"AGGREGATION": "mean"}, "AGGREGATION must be fedavg, median, trimmed-mean or krum"),
    ({"SERVER_OPTIMIZER": "fedyogi"}, "SERVER_OPTIMIZER must be none, fedavgm or fedadam"),
    ({"SERVER_LR": "0.1"}, "SERVER_LR and SERVER_MOMENTUM need SERVER_OPTIMIZER=fedavgm or fedadam"),
    ({"SERVER_OPTIMIZER": "fedadam", "SERVER_MOMENTUM": "0.9"}, "SERVER_MOMENTUM needs SERVER_OPTIMIZER=fedavgm"),
    ({"SERVER_OPTIMIZER": "fedavgm", "SERVER_LR": "fast"}, "SERVER_LR must be a number"),
    ({"PROX_MU": "-1"}, "PROX_MU must be a number >= 0"),
    ({"LOCAL_STEPS": "1.5"}, "LOCAL_STEPS must be a whole number >= 0"),
    ({"ATTACK": "3:sign-flip"}, "ATTACK must be K:KIND, K a worker 0..2"),
    ({"ATTACK": "1:nice"}, "ATTACK must be K:KIND"),
    ({"PRESET": "fastest"}, "PRESET must name a file of"),
])
def test_quickstart_refuses_bad_configuration(fake, env, message):
    proc = fake(QUICKSTART, **env)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert [c for c in proc.calls if c[0] == "apply"] == []


def test_quickstart_kubectl_with_words(fake):
    proc = fake(QUICKSTART, KUBECTL="kubectl --context kind-mlk -n mlk", WORKER_NUMBER="1", ROUNDS="1", SERVE="0")
    assert proc.returncode == 0, proc.stderr
    assert all(c[:4] == ["--context", "kind-mlk", "-n", "mlk"] for c in proc.calls)


def test_quickstart_service_without_cluster_ip_names_the_stage(fake):
    proc = fake(QUICKSTART, FAKE_NO_IP="1")
    assert proc.returncode == 1
    assert "stage nfs failed: service nfs-server has no ClusterIP" in proc.stderr


def test_teardown_keeps_the_disk_unless_asked(fake):
    proc = fake(TEARDOWN)
    assert proc.returncode == 0, proc.stderr
    deleted = [" ".join(c) for c in proc.calls if c[0] == "delete"]
    joined = "\n".join(deleted)
    for obj in ("deployment,service,poddisruptionbudget -l app.kubernetes.io/name=mlk-mnist,app.kubernetes.io/component=server",
                "jobs -l app.kubernetes.io/name=mlk-mnist", "configmap -l app.kubernetes.io/name=mlk-mnist",
                "pods -l app.kubernetes.io/name=mlk-mnist ", "persistentvolumeclaim nfs ", "persistentvolume mlk-nfs-default ",
                "service,deployment,networkpolicy -l app.kubernetes.io/name=mlk-mnist,"
                "app.kubernetes.io/component=nfs-server"):
        assert obj in joined, obj
    # Users of the volume (the Jobs' and the upload's pods too) go before the volume, the volume before
    # its server.
    order = [next(i for i, c in enumerate(deleted) if s in c)
             for s in ("component=server", "pods -l", "persistentvolumeclaim nfs ", "component=nfs-server")]
    assert order == sorted(order)
    assert "nfs-server-disk" not in joined and "mlk-disk-" not in joined
    assert "kept" in proc.stdout


def test_teardown_delete_disk_waits_until_the_disk_is_detached(fake, tmp_path):
    gcloud_log = tmp_path / "gcloud.log"
    gcloud = tmp_path / "gcloud"
    # describe: the disk exists; its users: one VM twice, then none
    gcloud.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {gcloud_log}
if [[ "$*" == *"value(users)"* ]]; then
  n=$(grep -c 'value(users)' {gcloud_log})
  ((n > 2)) || echo "projects/p/zones/z/instances/node-1"
fi
""")
    gcloud.chmod(0o755)
    proc = fake(TEARDOWN, DELETE_DISK="1", GCE_DISK_ZONE="us-central1-a", GCLOUD=str(gcloud))
    assert proc.returncode == 0, proc.stderr
    assert ["delete", "persistentvolumeclaim", "nfs-server-disk", "--ignore-not-found=true", "--wait=true"] in proc.calls
    # the gce backend's static PV goes too (Retain: deleting it leaves the disk to gcloud below)
    assert ["delete", "persistentvolume", "mlk-disk-default", "--ignore-not-found=true", "--wait=true"] in proc.calls
    calls = gcloud_log.read_text().splitlines()
    assert sum("value(users)" in c for c in calls) == 3
    assert calls[-1].split() == ["compute", "disks", "delete", "ml-kube-disk", "--zone", "us-central1-a", "--quiet"]
    assert "the data is deleted, GCE disk ml-kube-disk included" in proc.stdout


def test_teardown_delete_disk_without_zone_says_the_gce_disk_survives(fake):
    proc = fake(TEARDOWN, DELETE_DISK="1")
    assert proc.returncode == 0, proc.stderr
    assert "GCE disk ml-kube-disk, if you made one, is NOT deleted: set GCE_DISK_ZONE" in proc.stdout
    assert "data is deleted, GCE" not in proc.stdout


def test_quickstart_summary_breaks_each_stage_down_from_apply_to_noticed(fake):
    """The summary's breakdown (docs/kubernetes.md, "Where the time goes"): a line per stage's pod, taken
    before a later round deletes it, with the seconds from scheduled to started (3), to the program's
    first log line (2.5) and to done (12.5), read from the pod's status and its log's timestamps."""
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if "where the time went" in line)
    assert lines[head + 1].split()[2:] == ["stage", "pod", "create", "schedule", "start", "boot", "work", "notice"]
    rows = [line.split(": ", 1)[1].split() for line in lines[head + 2:] if "-p1 " in line]
    stages = [" ".join(r[:-7]) for r in rows]
    assert stages == ["nfs-server", "round 1 splitter", "round 1 aggregator", "rounds 1-2 trainers",
                      "round 2 aggregator", "round 2 accuracy-test", "server"]
    for row in rows:
        pod, create, schedule, start, boot, work, notice = row[-7:]
        assert pod.endswith("-p1")
        assert (schedule, start, boot, work) == ("1.0", "3.0", "2.5", "12.5")
        # the pods' clock is January's, the quickstart's today's: apply is after, noticing long after
        assert float(create) < 0 < float(notice)
    # each round's aggregator is noted before the next round deletes it (an earlier run's trainers went by label,
    # before the splitter and the trainers were applied together)
    calls = [" ".join(c) for c in proc.calls]
    noted = [i for i, c in enumerate(calls) if c.startswith("get pods -l app.kubernetes.io/component=aggregator")]
    deleted = [i for i, c in enumerate(calls) if c.startswith("delete job mnist-aggregator")]
    assert deleted[0] < noted[0] < deleted[1] < noted[1]
    assert "total: " in lines[head + 2 + len(rows)]


def test_quickstart_between_checks_watches_the_stage_instead_of_sleeping(fake):
    """Between two checks of a stage that is not done, the quickstart waits in `kubectl wait` on its Job's
    pod, until its container has exited 0 (the kubelet says so about 2 s before the Job controller marks the
    Job complete), and in `kubectl rollout status` on a Deployment, so that it sees the stage done at once."""
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="1", FAKE_RUNNING_JOB="mnist-splitter", JOB_TIMEOUT="5", POLL="1")
    assert proc.returncode == 1 and "stage splitter failed: not complete within JOB_TIMEOUT=5s" in proc.stderr
    waits = [c for c in proc.calls if c[:1] == ["wait"]]
    assert waits and all(c == ["wait", "pod", "-l", "job-name=mnist-splitter",
                               "--for=jsonpath={.status.containerStatuses[0].state.terminated.reason}=Completed",
                               "--timeout=1s"] for c in waits)
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="1", FAKE_WAITING="ErrImagePull", PULL_GRACE="1", POLL="1")
    assert proc.returncode == 1
    assert ["rollout", "status", "deployment/nfs-server", "--timeout=1s"] in proc.calls


def test_quickstart_federated_learning_knobs_reach_the_jobs_args(fake):
    """SPLIT, AGGREGATION, SERVER_*, PROX_MU, LOCAL_STEPS and ATTACK (docs/CONTRACTS.md "Runner knobs") become the
    splitter's, every trainer's (the attacker's only for ATTACK) and the aggregator's flags, in both rounds."""
    proc = fake(QUICKSTART, WORKER_NUMBER="3", ROUNDS="2", SERVE="0", SPLIT="label-skew", AGGREGATION="trimmed-mean",
                SERVER_OPTIMIZER="fedavgm", SERVER_LR="0.5", SERVER_MOMENTUM="0.8", PROX_MU="0.01", LOCAL_STEPS="50",
                ATTACK="1:backdoor")
    assert proc.returncode == 0, proc.stderr
    assert without_run_id(container_args(proc.applied[4][1])) == ["--n_container", "3", "--savedir", "/mnt/data",
                                                                  "--strategy", "label-skew"]
    for i in range(3):  # one trainer Job a worker for both rounds (issue 30)
        args = without_run_id(container_args(proc.applied[5][i]))
        extra = ["--prox-mu", "0.01", "--steps", "50", "--last-round", "2", "--ledger", "/mnt/rounds/ledger.json"]
        extra += ["--attack", "backdoor"] if i == 1 else []
        assert args[args.index("--wait-data") + 2:args.index("--savemodel")] == extra
    for r in (1, 2):
        assert container_args(proc.applied[5 + r][0])[6:] == [
            "--aggregation", "trimmed-mean", "--server-optimizer", "fedavgm", "--server-lr", "0.5",
            "--server-momentum", "0.8", "--min-workers", "3", "--round", str(r), "--deadline", "3600"]


def test_quickstart_preset_sets_the_knobs_the_environment_leaves_unset(fake):
    """PRESET=label-skew loads scripts/presets/label-skew.env; a knob given in the environment wins."""
    preset = dict(line.split("=", 1) for line in (REPO / "scripts/presets/label-skew.env").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert preset["SPLIT"] == "label-skew" and int(preset["LOCAL_STEPS"]) > 0
    proc = fake(QUICKSTART, WORKER_NUMBER="2", SERVE="0", PRESET="label-skew", LOCAL_STEPS="7")
    assert proc.returncode == 0, proc.stderr
    trainers = [d for docs in proc.applied for d in docs if d["metadata"]["name"].startswith("mnist-trainer-")]
    assert len(trainers) == 2  # one a worker, through the preset's ROUNDS
    assert all(container_args(t)[container_args(t).index("--last-round") + 1] == preset["ROUNDS"] for t in trainers)
    assert all(container_args(t)[container_args(t).index("--steps") + 1] == "7" for t in trainers)  # the env's
    splitter = next(docs[1] for docs in proc.applied if len(docs) > 1 and docs[1]["metadata"]["name"] == "mnist-splitter")
    assert without_run_id(container_args(splitter))[-2:] == ["--strategy", "label-skew"]
    aggregator = next(docs[0] for docs in proc.applied if docs[0]["metadata"]["name"] == "mnist-aggregator")
    assert container_args(aggregator)[container_args(aggregator).index("--server-optimizer") + 1] == \
        preset["SERVER_OPTIMIZER"]


def test_render_refuses_attack_with_the_indexed_trainer_job(tmp_path):
    env = {**os.environ, "WORKER_NUMBER": "3", "EPOCH": "1", "BATCH": "10", "ATTACK": "0:scale10"}
    proc = subprocess.run(["bash", str(REPO / "scripts/render.sh"), str(REPO / "manifests/5-trainer-indexed.yaml")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "needs one trainer Job per worker" in proc.stderr and proc.stdout == ""


def test_quickstart_default_round_closes_when_the_aggregator_and_every_trainer_are_done(fake):
    """At the default MIN_WORKERS the aggregator, applied beside the trainers, needs every model, and the round
    closes when it and every trainer are done (a trainer's pod that exited 0 counts before its Job is marked):
    none is stopped or counted missing (issue 30)."""
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="1", SERVE="0", FAKE_RUNNING_JOB="mnist-trainer-1",
                FAKE_EXITED_JOB="mnist-trainer-1")
    assert proc.returncode == 0, proc.stderr
    assert "round 1: aggregated model written\n" in proc.stdout
    assert "stopping them" not in proc.stdout and "without" not in proc.stdout
    # one call answers for every Job of the round, whatever WORKER_NUMBER
    assert not [c for c in proc.calls if c[:2] == ["get", "job"] and c[2].startswith(("mnist-trainer", "mnist-aggregator"))]


def test_quickstart_sees_a_stage_done_when_its_pod_exited_0_before_the_job_is_marked(fake):
    """The kubelet reports a container that exited 0 about 2 s before the Job controller marks its Job
    complete (issue 30): the quickstart goes on at the first (the splitter's and the aggregator's Jobs here
    never get their condition)."""
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="1", SERVE="0", JOB_TIMEOUT="30", POLL="1",
                FAKE_RUNNING_JOB="mnist-splitter,mnist-aggregator", FAKE_EXITED_JOB="mnist-splitter,mnist-aggregator")
    assert proc.returncode == 0, proc.stderr
    assert "splitter: done" in proc.stdout and "round 1: aggregated model written" in proc.stdout
    # without the pod's exit the same Jobs never finish
    proc = fake(QUICKSTART, WORKER_NUMBER="2", ROUNDS="1", SERVE="0", JOB_TIMEOUT="3", POLL="1",
                FAKE_RUNNING_JOB="mnist-splitter")
    assert proc.returncode == 1 and "not complete within JOB_TIMEOUT=3s" in proc.stderr
