"""The manifests and scripts against a real Kubernetes control plane (scripts/local-cluster.sh: the
real kube-apiserver with admission and PodSecurity, etcd, kube-controller-manager with the Job, PV and
garbage-collection controllers, kube-scheduler; kwok nodes that give pods a status without running
containers). What each test proves is in its docstring; docs/kubernetes.md says what this cannot prove.

Each test works in a namespace of its own and tears down what it made."""

import json
import os
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from helpers import KUBECTL, clean_env, get_json, kubectl

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
MANIFESTS = REPO / "manifests"
FILES = sorted(MANIFESTS.glob("*.yaml")) + sorted((MANIFESTS / "variants").glob("*.yaml"))
APP = "app.kubernetes.io/name=mlk-mnist"
# Every kind the quickstart creates (teardown must leave none of them labelled as ours).
KINDS = "deployments,replicasets,pods,services,jobs,configmaps,persistentvolumeclaims,persistentvolumes"
FAIL_FAST_LIMIT = 180  # seconds: "within 3 minutes, not JOB_TIMEOUT"


@pytest.fixture(scope="session")
def kubeconfig():
    """Bring the local cluster up (built once into the cache; reused when already running, and then
    left running afterwards; a cluster this session started is stopped at its end)."""
    script = str(SCRIPTS / "local-cluster.sh")
    proc = subprocess.run([script, "up"], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    running = "already running" in proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("KUBECONFIG=/"), proc.stdout
    yield last.split("=", 1)[1]
    if not running:
        subprocess.run([script, "down"], capture_output=True, text=True, timeout=300)


@pytest.fixture
def ns(kubeconfig):
    """A fresh namespace; afterwards teardown runs in it and it is deleted."""
    name = f"mlk-{uuid.uuid4().hex[:8]}"
    kubectl(kubeconfig, "create", "namespace", name)
    yield name
    run_script(kubeconfig, "teardown.sh", name, DELETE_DISK="1")
    kubectl(kubeconfig, "delete", "namespace", name, "--wait=false")


def script_env(kubeconfig, namespace, **env):
    return clean_env(**{"KUBECTL": f"{KUBECTL} --kubeconfig {kubeconfig} -n {namespace}", "POLL": "1", **env})


def run_script(kubeconfig, script, namespace, timeout=900, **env):
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPTS / script)], env=script_env(kubeconfig, namespace, **env),
                          capture_output=True, text=True, timeout=timeout)
    proc.seconds = time.monotonic() - start
    return proc


def quickstart(kubeconfig, namespace, **env):
    settings = dict(WORKER_NUMBER="2", ROUNDS="1", SERVE="0", NFS_BACKEND="pvc")
    settings.update(env)
    return run_script(kubeconfig, "quickstart.sh", namespace, **settings)


def completes(kubeconfig, namespace, name, timeout=60):
    """The Job is marked Complete within `timeout` s. The quickstart goes on once a stage's pod has exited 0,
    about 2 s before the Job controller marks its Job: a Job can be unmarked when a run ends."""
    return kubectl(kubeconfig, "wait", "--for=condition=Complete", f"--timeout={timeout}s", f"job/{name}",
                   namespace=namespace, check=False, timeout=timeout + 30).returncode == 0


def job_conditions(kubeconfig, namespace, name):
    job = get_json(kubeconfig, "job", name, namespace=namespace)
    return {c["type"] for c in job["status"].get("conditions", []) if c["status"] == "True"}


def labelled_leftovers(kubeconfig, namespace):
    """Our labelled objects still in the namespace, plus our cluster-scoped PersistentVolumes."""
    items = get_json(kubeconfig, KINDS, "-l", APP, namespace=namespace)["items"]
    return sorted(f"{i['kind']}/{i['metadata']['name']}" for i in items
                  if i["metadata"].get("namespace") in (namespace, None))


def render(*files, **env):
    base = clean_env(WORKER_NUMBER="3", EPOCH="2", BATCH="100", INCREMENTAL_NUMBER="1", NFS_CLUSTER_IP="10.96.0.42",
                     STORAGE_CLASS="kwok-volume", NODE_CIDR="10.128.0.0/20", GCE_PROJECT="my-project",
                     GCE_DISK_ZONE="us-central1-a", NAMESPACE="default")
    base.update(env)
    proc = subprocess.run(["bash", str(SCRIPTS / "render.sh"), *map(str, files)], env=base, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# --- 1. every manifest is accepted ------------------------------------------------------------------

ORIGINAL_SED = {  # the original README's commands (docs/kubernetes.md, "By hand")
    "3-nfs-pv-pvc.yaml": "s/{{NFS_CLUSTER_IP}}/10.96.0.42/g; s/{{NAMESPACE}}/default/g",
    "4-splitter.yaml": "s/{{WORKER_NUMBER}}/3/g",
    "5-trainer.yaml": "s/{{EPOCH}}/2/g; s/{{BATCH}}/100/g; s/{{INCREMENTAL_NUMBER}}/0/g;",
    "5-trainer-indexed.yaml": "s/{{WORKER_NUMBER}}/3/g; s/{{EPOCH}}/2/g; s/{{BATCH}}/100/g;",
    "3-rwx-pvc.yaml": "s/{{STORAGE_CLASS}}/kwok-volume/g",
    "1-nfs-deployment.yaml": "s/{{GCE_PROJECT}}/my-project/g; s/{{GCE_DISK_ZONE}}/us-central1-a/g; s/{{NAMESPACE}}/default/g",
    "2-nfs-networkpolicy.yaml": "s|{{NODE_CIDR}}|10.128.0.0/20|g",
}


def test_plain_kubectl_apply_of_the_templates_fails_at_once_and_runs_nothing(kubeconfig, ns):
    """What a user tries first: kubectl apply -f manifests/. It exits non-zero within seconds, its first
    error says to render first (manifests/0-render-first.yml), and nothing it created runs: every pod
    waits for claim nfs, which no template can bind. Teardown (the fixture) removes what it made."""
    started = time.monotonic()
    proc = kubectl(kubeconfig, "apply", "-f", str(MANIFESTS), namespace=ns, check=False)
    assert proc.returncode != 0 and time.monotonic() - started < 60
    hint = proc.stderr.find("these-are-templates-run-scripts-render.sh-out-dir-then-kubectl-apply-f-dir")
    assert 0 <= hint < proc.stderr.find("{{"), proc.stderr  # said first; then the unfilled placeholders
    pvs = get_json(kubeconfig, "persistentvolumes", "-l", APP, namespace=ns)["items"]
    assert not [pv["metadata"]["name"] for pv in pvs if ns in pv["metadata"]["name"] or "{" in pv["metadata"]["name"]]
    time.sleep(10)  # the scheduler and the Job controller have had their turn
    pods = get_json(kubeconfig, "pods", "-l", APP, namespace=ns)["items"]
    assert pods  # the objects kubectl could read were made ...
    assert all(p["status"].get("phase") == "Pending" and not p["spec"].get("nodeName") for p in pods), [
        (p["metadata"]["name"], p["status"].get("phase")) for p in pods]  # ... and none of them runs
    claim = get_json(kubeconfig, "persistentvolumeclaim", "nfs", namespace=ns)
    assert claim["status"]["phase"] == "Pending"


def test_render_out_dir_is_applied_by_one_kubectl_apply(kubeconfig, ns, tmp_path):
    """scripts/render.sh --out DIR, then kubectl apply -f DIR: the rwx backend's claim, splitter, Indexed
    trainer, aggregator and server are created in one command; the pvc and gce backends' files pass the
    apiserver's dry run (the NFS Service takes the PV's address from NFS_CLUSTER_IP)."""
    base = clean_env()
    # an address of this cluster's Service range, as docs/kubernetes.md says to pick one
    first = get_json(kubeconfig, "service", "kubernetes", namespace="default")["spec"]["clusterIP"]
    address = first.rsplit(".", 1)[0] + ".77"
    env = dict(base, WORKER_NUMBER="3", EPOCH="1", BATCH="100", NAMESPACE=ns, STORAGE_CLASS="kwok-volume",
               NFS_CLUSTER_IP=address, NODE_CIDR="10.128.0.0/20", GCE_PROJECT="p", GCE_DISK_ZONE="z")
    for backend in ("pvc", "gce", "rwx"):  # the dry runs first: the claim nfs is then rwx's
        out = tmp_path / backend
        proc = subprocess.run(["bash", str(SCRIPTS / "render.sh"), "--out", str(out), "--backend", backend], env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        dry = [] if backend == "rwx" else ["--dry-run=server"]
        proc = kubectl(kubeconfig, "apply", *dry, "-f", str(out), namespace=ns, check=False)
        assert proc.returncode == 0, f"{backend}: {proc.stderr}"
    trainer = get_json(kubeconfig, "job", "mnist-trainer", namespace=ns)
    assert trainer["spec"]["completions"] == 3 and trainer["spec"]["completionMode"] == "Indexed"
    made = {f"{i['kind']}/{i['metadata']['name']}" for i in get_json(kubeconfig, KINDS, "-l", APP, namespace=ns)["items"]}
    assert {"PersistentVolumeClaim/nfs", "Job/mnist-splitter", "Job/mnist-trainer", "Job/mnist-aggregator",
            "Deployment/mnist-server", "Service/mnist-server-svc", "ConfigMap/mnist-config"} <= made


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_manifest_passes_server_dry_run_without_warning(kubeconfig, ns, path):
    """The real apiserver's decoding, defaulting, validation and admission accept each manifest, as
    render.sh makes it (with --init-model, other images, every Service type) and as the original's sed
    recipe makes it, and print no warning (deprecated fields or APIs, PodSecurity warn level)."""
    variants = {"render.sh": render(path),
                "render.sh, round 2, own registry": render(path, INIT_MODEL="/mnt/aggregated-model.h5",
                                                           IMAGE_REGISTRY="registry.example.com/me", IMAGE_TAG="2.0"),
                "render.sh MIN_WORKERS ROUND_DEADLINE": render(path, MIN_WORKERS="0.5", ROUND_DEADLINE="7200")}
    for service_type in ("NodePort", "ClusterIP"):
        variants[f"render.sh SERVICE_TYPE={service_type}"] = render(path, SERVICE_TYPE=service_type)
    expr = ORIGINAL_SED.get(path.name)
    variants["original sed"] = (subprocess.run(["sed", expr, str(path)], capture_output=True, text=True,
                                               check=True).stdout if expr else path.read_text())
    for how, text in variants.items():
        proc = kubectl(kubeconfig, "apply", "--dry-run=server", "-f", "-", namespace=ns, input=text, check=False)
        assert proc.returncode == 0, f"{how}: {proc.stderr}"
        assert "Warning" not in proc.stderr, f"{how}: {proc.stderr}"
        assert "(server dry run)" in proc.stdout, f"{how}: {proc.stdout}"


def test_server_dry_run_would_catch_an_invalid_manifest(kubeconfig, ns):
    """The same check refuses what the schema allows but the API does not (an invalid value)."""
    text = render(MANIFESTS / "6-aggregator.yaml").replace("backoffLimit:", "backoffLimit: -1 #")
    proc = kubectl(kubeconfig, "apply", "--dry-run=server", "-f", "-", namespace=ns, input=text, check=False)
    assert proc.returncode != 0 and "backoffLimit" in proc.stderr


# --- 2 and 4. the whole quickstart, a re-run, teardown ------------------------------------------------

def test_quickstart_runs_reruns_and_tears_down_clean(kubeconfig, ns):
    """quickstart.sh NFS_BACKEND=pvc WORKER_NUMBER=4 ROUNDS=2 SERVE=1 exits 0 and the API shows each
    stage's result; no LoadBalancer IP comes, and it says how to reach the server instead of failing;
    a second run on the same cluster succeeds; teardown leaves nothing labelled; a second teardown
    is a no-op that exits 0."""
    proc = quickstart(kubeconfig, ns, NFS_BACKEND="pvc", WORKER_NUMBER="4", ROUNDS="2", SERVE="1",
                      LB_DETECT_TIMEOUT="5")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert completes(kubeconfig, ns, "mnist-splitter")
    for i in range(4):  # the last round's trainers
        assert completes(kubeconfig, ns, f"mnist-trainer-{i}")
    assert completes(kubeconfig, ns, "mnist-aggregator")
    assert completes(kubeconfig, ns, "mnist-accuracy-test")
    deployment = get_json(kubeconfig, "deployment", "mnist-server", namespace=ns)
    assert {c["type"] for c in deployment["status"]["conditions"] if c["status"] == "True"} >= {"Available"}
    assert deployment["status"]["availableReplicas"] == 2  # SERVER_REPLICAS' default (docs/kubernetes.md)
    cluster_ip = get_json(kubeconfig, "service", "nfs-server", namespace=ns)["spec"]["clusterIP"]
    pv = get_json(kubeconfig, "pv", f"mlk-nfs-{ns}")
    assert pv["status"]["phase"] == "Bound"
    assert pv["spec"]["nfs"]["server"] == cluster_ip
    assert pv["spec"]["claimRef"]["namespace"] == ns
    assert get_json(kubeconfig, "pvc", "nfs-server-disk", namespace=ns)["status"]["phase"] == "Bound"
    assert proc.stdout.count("round 2: aggregated model written") == 1
    assert "port-forward service/mnist-server-svc 8080:80" in proc.stdout
    assert "external IP" not in proc.stderr

    again = quickstart(kubeconfig, ns, NFS_BACKEND="pvc", WORKER_NUMBER="4", ROUNDS="1", SERVE="1",
                       LB_DETECT_TIMEOUT="5")
    assert again.returncode == 0, again.stdout + again.stderr

    down = run_script(kubeconfig, "teardown.sh", ns)
    assert down.returncode == 0, down.stderr
    assert labelled_leftovers(kubeconfig, ns) == ["PersistentVolumeClaim/nfs-server-disk"]  # data kept
    assert get_json(kubeconfig, "pv", "-l", APP)["items"] == []

    down = run_script(kubeconfig, "teardown.sh", ns, DELETE_DISK="1")
    assert down.returncode == 0, down.stderr
    assert labelled_leftovers(kubeconfig, ns) == []
    assert "NOT deleted: set GCE_DISK_ZONE" in down.stdout  # says the truth about a GCE disk

    noop = run_script(kubeconfig, "teardown.sh", ns, DELETE_DISK="1")
    assert noop.returncode == 0, noop.stderr
    assert "deleted the" not in noop.stdout


def test_two_namespaces_run_one_after_the_other_and_keep_their_own_volumes(kubeconfig, ns):
    """The pvc backend in two namespaces: each gets its own NFS PersistentVolume (named after it, bound to
    its claim only); tearing one down, its data included, leaves the other's volume bound and its objects
    whole."""
    other = f"mlk-{uuid.uuid4().hex[:8]}"
    kubectl(kubeconfig, "create", "namespace", other)
    try:
        for namespace in (ns, other):
            proc = quickstart(kubeconfig, namespace)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        for namespace in (ns, other):
            pv = get_json(kubeconfig, "pv", f"mlk-nfs-{namespace}")
            assert pv["status"]["phase"] == "Bound" and pv["spec"]["claimRef"]["namespace"] == namespace
            cluster_ip = get_json(kubeconfig, "service", "nfs-server", namespace=namespace)["spec"]["clusterIP"]
            assert pv["spec"]["nfs"]["server"] == cluster_ip
        kept = [o for o in labelled_leftovers(kubeconfig, other) if o != f"PersistentVolume/mlk-nfs-{ns}"]
        down = run_script(kubeconfig, "teardown.sh", ns, DELETE_DISK="1")
        assert down.returncode == 0, down.stderr
        assert kubectl(kubeconfig, "get", "pv", f"mlk-nfs-{ns}", "--ignore-not-found", "-o", "name").stdout == ""
        assert get_json(kubeconfig, "pv", f"mlk-nfs-{other}")["status"]["phase"] == "Bound"
        assert labelled_leftovers(kubeconfig, other) == kept
    finally:
        run_script(kubeconfig, "teardown.sh", other, DELETE_DISK="1")
        kubectl(kubeconfig, "delete", "namespace", other, "--wait=false")


@pytest.mark.parametrize("service_type", ["NodePort", "ClusterIP"])
def test_service_types_end_with_how_to_reach_the_server(kubeconfig, ns, service_type):
    """SERVICE_TYPE=NodePort or ClusterIP: the Service has that type and the run ends 0 with the way in."""
    proc = quickstart(kubeconfig, ns, SERVE="1", SERVICE_TYPE=service_type)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    service = get_json(kubeconfig, "service", "mnist-server-svc", namespace=ns)
    assert service["spec"]["type"] == service_type
    if service_type == "NodePort":
        assert f"NodePort {service['spec']['ports'][0]['nodePort']}" in proc.stdout
    assert "port-forward service/mnist-server-svc 8080:80" in proc.stdout


# --- 3. fail fast -----------------------------------------------------------------------------------

def test_unschedulable_pods_fail_fast(kubeconfig, ns):
    """Every node tainted: the first pod can never schedule; the run stops well before any timeout,
    names the stage and gives the scheduler's reason."""
    kubectl(kubeconfig, "taint", "nodes", "--all", "mlk-test=blocked:NoSchedule")
    try:
        proc = quickstart(kubeconfig, ns)
    finally:
        kubectl(kubeconfig, "taint", "nodes", "--all", "mlk-test=blocked:NoSchedule-")
    assert proc.returncode == 1
    assert proc.seconds < FAIL_FAST_LIMIT
    last = proc.stderr.strip().splitlines()[-1]
    assert "stage nfs failed" in last and "Unschedulable" in last and "untolerated taint" in last, proc.stderr
    assert "FailedScheduling" in proc.stderr  # the events are printed


def test_claim_that_cannot_bind_fails_fast(kubeconfig, ns):
    """A ReadWriteMany class whose provisioner does not exist: the claim stays Pending; the run stops
    after PVC_TIMEOUT (default) naming the claim and printing its events."""
    sc = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": f"nowhere-{ns}"},
          "provisioner": "example.com/nowhere", "volumeBindingMode": "Immediate"}
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(sc))
    try:
        proc = quickstart(kubeconfig, ns, NFS_BACKEND="rwx", STORAGE_CLASS=f"nowhere-{ns}")
    finally:
        kubectl(kubeconfig, "delete", "storageclass", f"nowhere-{ns}")
    assert proc.returncode == 1
    assert proc.seconds < FAIL_FAST_LIMIT
    last = proc.stderr.strip().splitlines()[-1]
    assert "stage volume failed: claim nfs is still Pending after PVC_TIMEOUT=120s" in last, proc.stderr
    assert "ExternalProvisioning" in proc.stderr or "example.com/nowhere" in proc.stderr


def kwok_stage(name, selector_cel, status):
    """A kwok Stage that outweighs the default ones for the pods it selects."""
    return {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Stage", "metadata": {"name": name},
            "spec": {"resourceRef": {"apiGroup": "v1", "kind": "Pod"}, "weight": 1000,
                     "selector": {"matchExpressions": [{"cel": {"expression": e}} for e in selector_cel]},
                     "next": {"statusTemplate": status}}}


# --- transient states: Kubernetes retries them, and so does the run, within a grace -------------------

def pod_ready_template():
    """kwok's own status for a pod that becomes Running and Ready (its pod/fast stage set)."""
    text = (SCRIPTS / "versions.env").read_text()  # the local clusters' pins
    version = text.split('KWOK_VERSION="', 1)[1].split('"', 1)[0]
    cache = Path(os.environ.get("LOCAL_CLUSTER_CACHE", REPO / ".cache" / "local-cluster"))
    stage = cache / "gomod" / f"sigs.k8s.io/kwok@{version}" / "kustomize/stage/pod/fast/pod-ready.yaml"
    return yaml.safe_load(stage.read_text())["spec"]["next"]["statusTemplate"]


def nfs_server_held(ns, delay_ms):
    """A kwok stage that keeps this namespace's NFS server pod Pending for delay_ms, then makes it Ready:
    a node still mounting its volume, as far as the quickstart can see."""
    stage = kwok_stage(f"hold-nfs-{ns}", [f"self.metadata.namespace == '{ns}'",
                                          "self.metadata.labels['app.kubernetes.io/component'] == 'nfs-server'",
                                          "self.status.phase == 'Pending'", "!has(self.metadata.deletionTimestamp)"],
                       pod_ready_template())
    stage["spec"]["delay"] = {"durationMilliseconds": delay_ms}
    return stage


def post_event(kubeconfig, ns, obj, reason, message, when):
    """A Warning event about OBJ (a kubectl get -o json item), as a kubelet or controller posts one."""
    ts = when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {"apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": reason, "message": message,
             "metadata": {"name": f"mlk-test.{uuid.uuid4().hex[:10]}", "namespace": ns},
             "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "namespace": ns,
                                "name": obj["metadata"]["name"], "uid": obj["metadata"]["uid"]},
             "firstTimestamp": ts, "lastTimestamp": ts, "count": 1, "source": {"component": "mlk-test"}}
    kubectl(kubeconfig, "create", "-f", "-", namespace=ns, input=json.dumps(event))


def nfs_server_pod(kubeconfig, ns, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = get_json(kubeconfig, "pods", "-l", "app.kubernetes.io/component=nfs-server", namespace=ns)["items"]
        if items:
            return items[0]
        time.sleep(0.5)
    pytest.fail("no NFS server pod appeared")


def background_quickstart(kubeconfig, ns, **env):
    settings = dict(WORKER_NUMBER="2", ROUNDS="1", SERVE="0", NFS_BACKEND="pvc", POLL="1")
    settings.update(env)
    started = time.monotonic()
    proc = subprocess.Popen(["bash", str(SCRIPTS / "quickstart.sh")], env=script_env(kubeconfig, ns, **settings),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, started


def test_a_transient_failed_mount_is_waited_out(kubeconfig, ns):
    """The NFS server pod stays Pending for 25 s with a FailedMount event (a disk still detaching, a
    server starting): that is shorter than MOUNT_GRACE, so the run goes on and completes."""
    stage = nfs_server_held(ns, 25000)
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(stage))
    try:
        proc, _ = background_quickstart(kubeconfig, ns, MOUNT_GRACE="120")
        post_event(kubeconfig, ns, nfs_server_pod(kubeconfig, ns), "FailedMount",
                   "MountVolume.SetUp failed for volume \"export\": mount failed: exit status 32",
                   datetime.now(timezone.utc))
        out, err = proc.communicate(timeout=600)
    finally:
        kubectl(kubeconfig, "delete", "stage", stage["metadata"]["name"])
    assert proc.returncode == 0, out + err
    assert "== accuracy test" in out and "FailedMount" not in err, err


def test_a_persistent_failed_mount_stops_the_run_after_its_grace(kubeconfig, ns):
    """The same, but the pod never mounts: the run stops once FailedMount has lasted MOUNT_GRACE (20 s
    here), within 30 s more, naming the reason and the setting; NFS_TIMEOUT (3000 s) is not waited."""
    stage = nfs_server_held(ns, 3_600_000)
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(stage))
    try:
        proc, _ = background_quickstart(kubeconfig, ns, MOUNT_GRACE="20", NFS_TIMEOUT="3000")
        post_event(kubeconfig, ns, nfs_server_pod(kubeconfig, ns), "FailedMount",
                   "MountVolume.SetUp failed for volume \"export\": mount failed: exit status 32",
                   datetime.now(timezone.utc))
        posted = time.monotonic()
        out, err = proc.communicate(timeout=300)
        waited = time.monotonic() - posted
    finally:
        kubectl(kubeconfig, "delete", "stage", stage["metadata"]["name"])
    assert proc.returncode == 1, out + err
    assert 18 <= waited < 20 + 30, waited
    last = err.strip().splitlines()[-1]
    assert "stage nfs failed: FailedMount for 20s (MOUNT_GRACE): MountVolume.SetUp failed" in last, last


def test_a_claim_its_class_cannot_provision_is_named(kubeconfig, ns):
    """A WaitForFirstConsumer class whose provisioner keeps failing (kind's and k3s' local-path refuse
    ReadWriteMany so): the first pod waits on the claim; once ProvisioningFailed has lasted PVC_TIMEOUT
    (15 s here) the run stops naming the claim, its class and the provisioner's reason, instead of waiting
    out the splitter's deadline."""
    sc = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": f"rwo-only-{ns}"},
          "provisioner": "example.com/rwo-only", "volumeBindingMode": "WaitForFirstConsumer"}
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(sc))
    try:
        proc, _ = background_quickstart(kubeconfig, ns, NFS_BACKEND="rwx", STORAGE_CLASS=f"rwo-only-{ns}",
                                        PVC_TIMEOUT="15")
        deadline = time.monotonic() + 60
        while not get_json(kubeconfig, "pods", "-l", "app.kubernetes.io/component=splitter", namespace=ns)["items"]:
            assert time.monotonic() < deadline and proc.poll() is None, "no splitter pod"
            time.sleep(0.5)
        post_event(kubeconfig, ns, get_json(kubeconfig, "pvc", "nfs", namespace=ns), "ProvisioningFailed",
                   "failed to provision volume with StorageClass: NodePath only supports ReadWriteOnce and "
                   "ReadWriteOncePod (1.22+) access modes", datetime.now(timezone.utc))
        posted = time.monotonic()
        out, err = proc.communicate(timeout=300)
        waited = time.monotonic() - posted
    finally:
        kubectl(kubeconfig, "delete", "storageclass", f"rwo-only-{ns}")
    assert proc.returncode == 1, out + err
    assert waited < 15 + 30, waited
    last = err.strip().splitlines()[-1]
    assert f"stage splitter failed: claim nfs (StorageClass rwo-only-{ns}) cannot be provisioned: failed to " \
           "provision volume with StorageClass: NodePath only supports ReadWriteOnce" in last, last
    assert last.endswith("(for 15s, PVC_TIMEOUT)"), last


def test_trainer_jobs_of_an_earlier_larger_run_are_deleted(kubeconfig, ns):
    """A run of 4 workers left mnist-trainer-3 (and someone applied the Indexed trainer): a run of 2
    deletes them by label before its first round, so nothing but its own trainers writes /mnt/model."""
    for path, env in ((MANIFESTS / "5-trainer.yaml", {"INCREMENTAL_NUMBER": "3"}),
                      (MANIFESTS / "5-trainer-indexed.yaml", {})):
        kubectl(kubeconfig, "apply", "-f", "-", namespace=ns, input=render(path, **env))
    proc = quickstart(kubeconfig, ns)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = {j["metadata"]["name"] for j in get_json(kubeconfig, "jobs", "-l", "app.kubernetes.io/component=trainer",
                                                      namespace=ns)["items"]}
    assert jobs == {"mnist-trainer-0", "mnist-trainer-1"}, jobs


def test_an_hour_old_event_of_an_earlier_run_is_ignored(kubeconfig, ns):
    """A claim kept from an earlier run keeps its UID, and its events live an hour: an hour-old refusal
    on it (which would stop the run at once if it were new) says nothing about this run."""
    claim = [d for d in yaml.safe_load_all(render(MANIFESTS / "variants" / "1-nfs-deployment-pvc.yaml"))
             if d["kind"] == "PersistentVolumeClaim"][0]
    kubectl(kubeconfig, "apply", "-f", "-", namespace=ns, input=json.dumps(claim))
    post_event(kubeconfig, ns, get_json(kubeconfig, "pvc", "nfs-server-disk", namespace=ns), "FailedCreate",
               "pods \"x\" is forbidden: an earlier run's refusal", datetime.now(timezone.utc) - timedelta(hours=1))
    proc = quickstart(kubeconfig, ns)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# kwok stage statuses: every container in one state, the pod in one phase
STATUSES = """containerStatuses:
{{ range .spec.containers }}
- name: {{ .name | Quote }}
  image: {{ .image | Quote }}
  ready: false
  restartCount: 0
  state:
    STATE
{{ end }}
phase: PHASE"""


def statuses(state, phase):
    return ("{{ $now := Now }}\n" if "$now" in state else "") + STATUSES.replace("STATE", state).replace("PHASE", phase)


ENDED = "exitCode: 0, reason: Completed, startedAt: {{ $now | Quote }}, finishedAt: {{ $now | Quote }}"
SUCCEEDED = statuses("terminated: {" + ENDED + "}", "Succeeded")
# ... or ended with EXIT_CODE and MESSAGE
FAILED_WITH = statuses("terminated: {" + ENDED.replace("exitCode: 0, reason: Completed",
                                                       'exitCode: EXIT_CODE, reason: Error, message: "MESSAGE"') + "}",
                       "Failed")


@pytest.mark.parametrize("exit_code, reason, retried", [(1, "BackoffLimitExceeded", True),
                                                       (2, "PodFailurePolicy", False)])
def test_failing_trainer_fails_fast_with_its_exit_code(kubeconfig, ns, exit_code, reason, retried):
    """Trainer pods of this namespace end with an exit code (a kwok stage). Exit 1: the Job retries the
    pod as its backoffLimit says, then fails. Exit 2 (bad input): the Job's podFailurePolicy fails it at
    once, no retry. Either way the run stops naming the trainers' stage, the Job's reason and the code."""
    stage = kwok_stage(f"fail-trainer-{exit_code}-{ns}", [
        f"self.metadata.namespace == '{ns}'",
        "self.metadata.labels['app.kubernetes.io/component'] == 'trainer'",
        "self.status.phase == 'Running'",
        "!has(self.metadata.deletionTimestamp)"],
        FAILED_WITH.replace("EXIT_CODE", str(exit_code)).replace("MESSAGE", "simulated crash"))
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(stage))
    try:
        proc = quickstart(kubeconfig, ns)
    finally:
        kubectl(kubeconfig, "delete", "stage", stage["metadata"]["name"])
    assert proc.returncode == 1
    assert proc.seconds < FAIL_FAST_LIMIT
    last = proc.stderr.strip().splitlines()[-1]
    assert "stage trainers (round 1) failed: job mnist-trainer-" in last, proc.stderr
    assert reason in last and f"exited {exit_code} (Error)" in last and "simulated crash" in last
    failed_job = last.split("job ")[1].split()[0].rstrip(":")
    pods = get_json(kubeconfig, "pods", "-l", f"job-name={failed_job}", namespace=ns)["items"]
    assert (len(pods) > 1) == retried, [p["metadata"]["name"] for p in pods]


def test_min_workers_run_goes_on_without_a_failed_trainer_job(kubeconfig, ns):
    """MIN_WORKERS=2 of 3: the pods of trainer Job mnist-trainer-1 end with exit code 2 (a kwok stage), so its
    podFailurePolicy fails that Job at once; the aggregator Job, applied with the trainers, completes 20 s
    later (another stage). The run reports the lost Job and completes: accuracy test done, exit 0."""
    running = ["self.status.phase == 'Running'", "!has(self.metadata.deletionTimestamp)",
               f"self.metadata.namespace == '{ns}'"]
    fail_one = kwok_stage(f"lose-trainer-{ns}", running + ["self.metadata.labels['job-name'] == 'mnist-trainer-1'"],
                          FAILED_WITH.replace("EXIT_CODE", "2").replace("MESSAGE", "simulated loss"))
    slow_aggregator = kwok_stage(f"slow-aggregator-{ns}",
                                 running + ["self.metadata.labels['app.kubernetes.io/component'] == 'aggregator'"],
                                 SUCCEEDED)
    slow_aggregator["spec"]["delay"] = {"durationMilliseconds": 20000}
    for stage in (fail_one, slow_aggregator):
        kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(stage))
    try:
        proc = quickstart(kubeconfig, ns, WORKER_NUMBER="3", MIN_WORKERS="2", ROUND_DEADLINE="600")
    finally:
        for stage in (fail_one, slow_aggregator):
            kubectl(kubeconfig, "delete", "stage", stage["metadata"]["name"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert job_conditions(kubeconfig, ns, "mnist-trainer-1") >= {"Failed"}
    assert "round 1: job mnist-trainer-1 failed: PodFailurePolicy" in proc.stderr and "exited 2" in proc.stderr
    assert "round 1: going on without mnist-trainer-1 (2 trainers left, MIN_WORKERS=2)" in proc.stderr
    assert "round 1: aggregated model written without mnist-trainer-1" in proc.stdout
    assert completes(kubeconfig, ns, "mnist-accuracy-test")
    aggregator = get_json(kubeconfig, "job", "mnist-aggregator", namespace=ns)
    args = aggregator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-6:] == ["--min-workers", "2", "--round", "1", "--deadline", "600"]


def test_resume_refuses_a_ledger_the_restore_job_rejects(kubeconfig, ns):
    """RESUME=1: the restore Job's pod exits 2 (a kwok stage, as ledger.py does for a changed file): the real
    Job controller fails it by its podFailurePolicy, and the run stops at once saying the ledger does not
    match its files, before any trainer Job exists."""
    stage = kwok_stage(f"bad-ledger-{ns}", [
        f"self.metadata.namespace == '{ns}'",
        "self.metadata.labels['app.kubernetes.io/component'] == 'ledger-restore'",
        "self.status.phase == 'Running'", "!has(self.metadata.deletionTimestamp)"],
        FAILED_WITH.replace("EXIT_CODE", "2").replace("MESSAGE", "sha256 differs"))
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(stage))
    try:
        proc = quickstart(kubeconfig, ns, RESUME="1")
    finally:
        kubectl(kubeconfig, "delete", "stage", stage["metadata"]["name"])
    assert proc.returncode == 1
    assert proc.seconds < FAIL_FAST_LIMIT
    last = proc.stderr.strip().splitlines()[-1]
    assert "stage resume failed: the round ledger on the volume does not match its files" in last, proc.stderr
    assert "run without RESUME=1 to start a new run" in last
    assert job_conditions(kubeconfig, ns, "mnist-ledger-restore") >= {"Failed"}
    assert get_json(kubeconfig, "jobs", "-l", "app.kubernetes.io/component=trainer", namespace=ns)["items"] == []


def test_local_cluster_says_in_one_line_what_the_machine_lacks(tmp_path):
    """A GO that is not there, no Go on PATH and a Go module proxy that cannot be reached (so the pinned Go
    cannot be fetched), or a module proxy that refuses: one line naming it, exit 1 (no traceback of logs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_CLUSTER_CACHE", "GO")}
    env["LOCAL_CLUSTER_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run([str(SCRIPTS / "local-cluster.sh"), "build"], env=dict(env, GO="no-such-go"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["local-cluster: GO='no-such-go' is not a command"]
    no_go = dict(env, PATH="/usr/bin:/bin", MLK_GO_PROXY="http://127.0.0.1:9")  # /usr/bin: at most Debian's 1.19
    proc = subprocess.run([str(SCRIPTS / "local-cluster.sh"), "build"], env=no_go, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith("fetch-go.py: error: cannot download http://127.0.0.1:9/golang.org/toolchain/"), lines
    assert lines[-1] == "local-cluster: no Go toolchain: install Go 1.26 or newer, or set GO"
    assert "fetching the pinned toolchain from the Go module proxy" in proc.stderr
    proc = subprocess.run([str(SCRIPTS / "local-cluster.sh"), "build"], env=dict(env, GOPROXY="off"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("local-cluster: building etcd modules failed: ") and "GOPROXY=off" in last, proc.stderr


def test_image_that_cannot_be_pulled_fails_fast(kubeconfig, ns):
    """Pods whose image tag does not exist get ErrImagePull (as a kubelet reports it, here from a kwok
    stage): the run stops once that has lasted PULL_GRACE (5 s here; a registry blip passes) with the
    reason, instead of waiting for NFS_TIMEOUT."""
    stage = kwok_stage(f"no-image-{ns}", [
        f"self.metadata.namespace == '{ns}'",
        "self.spec.containers.exists(c, c.image == 'localhost/mlk/nfs-server:0.1.0')",
        "self.status.phase == 'Pending'",
        "!has(self.metadata.deletionTimestamp)"],
        statuses('waiting: {reason: ErrImagePull, message: "failed to pull and unpack image: not found"}', "Pending"))
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(stage))
    try:
        proc = quickstart(kubeconfig, ns, NFS_TIMEOUT="3000", PULL_GRACE="5")
    finally:
        kubectl(kubeconfig, "delete", "stage", stage["metadata"]["name"])
    assert proc.returncode == 1
    assert proc.seconds < 60
    last = proc.stderr.strip().splitlines()[-1]
    assert "stage nfs failed" in last and "ErrImagePull" in last and "not found" in last, proc.stderr
    assert "(for 5s, PULL_GRACE)" in last, last


# --- 5. restricted Pod Security ---------------------------------------------------------------------

def restricted(kubeconfig, ns):
    kubectl(kubeconfig, "label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest")


def test_restricted_namespace_admits_every_stage_with_the_rwx_backend(kubeconfig, ns):
    """Under enforce=restricted every stage's pod is admitted (rwx: no NFS server), the whole run
    passes, and a dry run of every stage manifest draws no PodSecurity warning."""
    restricted(kubeconfig, ns)
    stage_files = [p for p in FILES if any(d and d["kind"] in ("Job", "Deployment", "Pod") for d in yaml.safe_load_all(
        render(p))) and "nfs" not in p.name]  # the NFS server: next test
    assert len(stage_files) == 9  # splitter, trainers (2 ways), aggregator, server, accuracy test, busybox, upload,
    # ledger restore
    for path in stage_files:
        proc = kubectl(kubeconfig, "apply", "--dry-run=server", "-f", "-", namespace=ns, input=render(path),
                       check=False)
        assert proc.returncode == 0 and "PodSecurity" not in proc.stderr, f"{path.name}: {proc.stderr}"
    proc = quickstart(kubeconfig, ns, NFS_BACKEND="rwx", STORAGE_CLASS="kwok-volume", SERVE="1",
                      SERVICE_TYPE="ClusterIP")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pods = get_json(kubeconfig, "pods", "-l", APP, namespace=ns)["items"]
    components = {p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods}
    assert components >= {"splitter", "trainer", "aggregator", "accuracy-test", "server"}


@pytest.mark.parametrize("level", ["restricted", "baseline"])
def test_pod_security_refuses_the_nfs_server_clearly(kubeconfig, ns, level):
    """The in-cluster NFS server is not privileged but runs as root and adds DAC_READ_SEARCH, which
    neither the baseline nor the restricted level admits: its pods are refused, and the quickstart stops
    at once saying so (stage nfs, PodSecurity, the capability)."""
    kubectl(kubeconfig, "label", "namespace", ns, f"pod-security.kubernetes.io/enforce={level}",
            "pod-security.kubernetes.io/enforce-version=latest")
    proc = quickstart(kubeconfig, ns, NFS_BACKEND="pvc")
    assert proc.returncode == 1
    assert proc.seconds < FAIL_FAST_LIMIT
    last = proc.stderr.strip().splitlines()[-1]
    assert "stage nfs failed" in last and "PodSecurity" in last and "DAC_READ_SEARCH" in last, proc.stderr
