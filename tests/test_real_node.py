"""A real node (scripts/real-node.sh: the kubelet and containerd 2.x on this machine) in a local control
plane of its own (LOCAL_CLUSTER_NAME=mlk-real scripts/local-cluster.sh), probed in the order in which
each step needs the one before: the node registers and is Ready; a pod of our own image runs; pod
networking (host to pod, pod to pod); volumes (a ReadWriteMany claim of local-rwx shared by two pods,
fsGroup 10001, emptyDir, read-only root filesystem); kubectl logs, exec and port-forward through the
apiserver to the kubelet; then the quickstart's whole run (rwx backend) on the node.

The cluster and the node are started once for the session and stopped at its end, unless they were
already running. REAL_NODE_KUBECONFIG=<file> uses that cluster instead of starting mlk-real. A cluster
whose kwok-controller manages every node, or whose apiserver reaches kubelets by host name, cannot
carry a real node (docs/real-node.md): real-node.sh refuses it, naming the setting, and the tests fail."""

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from helpers import KUBECTL, clean_env, get_json, kubectl

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
CLUSTER = "mlk-real"
NODE = os.environ.get("REAL_NODE_NAME", "real-node")
CLASS = "local-rwx"
SPLITTER = "localhost/mlk/splitter:0.1.0"
SERVER = "localhost/mlk/server:0.1.0"
# The control plane's pinned version (scripts/versions.env, which local-cluster.sh and real-node.sh source)
KUBE_VERSION = re.search(r'^KUBE_VERSION="(.+)"$', (SCRIPTS / "versions.env").read_text(), re.M).group(1)


MISSING_IMAGES = set()  # stages real-node.sh up found no image of in podman (scripts/build-images.sh)


def need_image(stage):
    if stage in MISSING_IMAGES:
        pytest.fail(f"no image of {stage} in podman to import (scripts/test.sh builds them with the container "
                    f"run first; or scripts/build-images.sh {stage})")


def run(cmd, timeout=600, **env):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **env), stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def kubeconfig():
    """The cluster with the real node up (built once into the cache: the first run takes minutes)."""
    started_cluster = False
    given = os.environ.get("REAL_NODE_KUBECONFIG")
    if given:
        config = given
    else:
        proc = run([SCRIPTS / "local-cluster.sh", "up"], timeout=3600, LOCAL_CLUSTER_NAME=CLUSTER)
        assert proc.returncode == 0, proc.stderr[-3000:]
        started_cluster = "already running" not in proc.stderr
        config = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]

    def cluster_down():
        if started_cluster:
            run([SCRIPTS / "local-cluster.sh", "down"], timeout=300, LOCAL_CLUSTER_NAME=CLUSTER)

    start = time.monotonic()
    proc = run([SCRIPTS / "real-node.sh", "up", "--exclusive", config], timeout=3600)
    if proc.returncode != 0:
        cluster_down()
    assert proc.returncode == 0, proc.stderr[-3000:]
    node_was_running = "kubelet already running" in proc.stderr
    missing = re.search(r"not in podman: ([a-z ]+);", proc.stdout)
    MISSING_IMAGES.update(missing.group(1).split() if missing else ())
    print(f"\nreal-node.sh up: {time.monotonic() - start:.0f} s\n{proc.stderr}{proc.stdout}")
    yield config
    if not node_was_running:
        down = run([SCRIPTS / "real-node.sh", "down"], timeout=600)
        assert down.returncode == 0, down.stderr
        # Nothing of the node outlives down: no FUSE (NFS) mount, no mount daemon, no kube-proxy table;
        # the class that was the default is the default again.
        assert [m for m in Path("/proc/mounts").read_text().splitlines() if " fuse.nfs4 " in m] == []
        assert subprocess.run(["pgrep", "-f", "mount_nfs.py .* --daemon"], capture_output=True).returncode == 1
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        assert "kube-proxy" not in tables, tables
        if "is the default again" not in down.stderr:
            cluster_down()
            pytest.fail(f"real-node.sh down did not give the default StorageClass back: {down.stderr}")
    cluster_down()


@pytest.fixture
def ns(kubeconfig):
    """A fresh namespace enforcing the restricted Pod Security level, deleted afterwards."""
    name = f"rn-{uuid.uuid4().hex[:8]}"
    kubectl(kubeconfig, "create", "namespace", name)
    kubectl(kubeconfig, "label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    yield name
    kubectl(kubeconfig, "delete", "namespace", name, "--timeout=120s", check=False)


def pod(name, image, command=None, *, args=None, volumes=(), mounts=(), ports=(), probe=None, restart="Never"):
    """A pod of the restricted level, as our manifests run them: uid/gid 10001, fsGroup 10001, no
    capabilities, read-only root filesystem."""
    container = {
        "name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": list(mounts), "ports": list(ports),
    }
    if command:
        container["command"] = command
    if args:
        container["args"] = args
    if probe:
        container["startupProbe"] = probe
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"test": name}},
        "spec": {
            "restartPolicy": restart, "automountServiceAccountToken": False,
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container], "volumes": list(volumes),
        },
    })


def wait_pod(kubeconfig, namespace, name, phase=("Succeeded",), timeout=180):
    """Wait for a pod phase (or Ready when phase is 'Ready'); on a timeout or failure, fail with its
    status and events."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = get_json(kubeconfig, "pod", name, namespace=namespace)
        status = obj["status"]
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
        if status.get("phase") in phase or ("Ready" in phase and ready):
            return obj
        if status.get("phase") == "Failed" and "Failed" not in phase:
            break
        time.sleep(1)
    events = kubectl(kubeconfig, "get", "events", "--field-selector", f"involvedObject.name={name}",
                     namespace=namespace, check=False).stdout
    logs = kubectl(kubeconfig, "logs", name, namespace=namespace, check=False)
    pytest.fail(f"pod {name}: {json.dumps(obj['status'])[:2000]}\nevents:\n{events}\nlogs:\n{logs.stdout}{logs.stderr}")


# --- 0. the pause image's OCI layout (no cluster, no node) ------------------------------------------

def run_oci_layout(tmp_path, layer_bytes, *extra):
    layer = tmp_path / "layer.tar"
    layer.write_bytes(layer_bytes)
    out = tmp_path / "oci"
    proc = subprocess.run([sys.executable, SCRIPTS / "real-node" / "oci_layout.py", "--layer", layer,
                           "--arch", "amd64", "--name", "localhost/mlk/pause:3.10.2", "--ref", "3.10.2", *extra, out],
                          capture_output=True, text=True, timeout=60)
    return proc, layer, out


def test_oci_layout_blobs_are_named_and_sized_by_their_content(tmp_path):
    """scripts/real-node/oci_layout.py (real-node.sh build's pause image): every descriptor's digest and
    size are those of the blob it names, the config's diff_id is the (uncompressed) layer's digest, the
    index names the image for containerd; the JSON is compact, so one layer gives one set of digests.
    Needs no cluster (the module's cluster marker notwithstanding): it runs the tool on a tar made here."""
    body = b"#!/bin/sh\nexec sleep infinity\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("pause")
        info.size, info.mode = len(body), 0o755
        tar.addfile(info, io.BytesIO(body))
    layer_bytes = buf.getvalue()
    proc, layer, out = run_oci_layout(tmp_path, layer_bytes)
    assert proc.returncode == 0, proc.stderr
    assert not layer.exists()  # moved into the layout, not copied

    blobs = out / "blobs" / "sha256"
    for blob in blobs.iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name

    def resolve(descriptor):
        algorithm, digest = descriptor["digest"].split(":")
        data = (blobs / digest).read_bytes()
        assert algorithm == "sha256" and descriptor["size"] == len(data), descriptor
        return data

    assert json.loads((out / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((out / "index.json").read_text())
    assert index["schemaVersion"] == 2 and index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    [entry] = index["manifests"]
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert entry["annotations"] == {"io.containerd.image.name": "localhost/mlk/pause:3.10.2",
                                    "org.opencontainers.image.ref.name": "3.10.2"}
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    assert proc.stdout.strip() == entry["digest"]
    manifest_bytes = resolve(entry)
    manifest = json.loads(manifest_bytes)
    assert manifest_bytes == json.dumps(manifest, separators=(",", ":")).encode()
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == entry["mediaType"]
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    config = json.loads(resolve(manifest["config"]))
    [layer_descriptor] = manifest["layers"]
    assert layer_descriptor["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    assert resolve(layer_descriptor) == layer_bytes
    assert layer_descriptor["digest"] == f"sha256:{hashlib.sha256(layer_bytes).hexdigest()}"
    assert config == {"architecture": "amd64", "os": "linux",
                      "config": {"User": "65535:65535", "Entrypoint": ["/pause"]},
                      "rootfs": {"type": "layers", "diff_ids": [layer_descriptor["digest"]]}}
    assert sorted(p.name for p in blobs.iterdir()) == sorted(
        d["digest"].split(":")[1] for d in (entry, manifest["config"], layer_descriptor))

    (tmp_path / "again").mkdir()
    again, _, _ = run_oci_layout(tmp_path / "again", layer_bytes)
    assert again.returncode == 0 and again.stdout == proc.stdout  # the same layer, the same digests


def test_oci_layout_without_its_layer_says_so(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPTS / "real-node" / "oci_layout.py", "--layer", tmp_path / "none.tar",
                           "--arch", "amd64", "--name", "x/pause:1", "--ref", "1", tmp_path / "oci"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"oci_layout.py: no layer file {tmp_path / 'none.tar'}"]
    assert not (tmp_path / "oci").exists()


# --- 1. the node ------------------------------------------------------------------------------------

def test_node_registers_and_is_ready(kubeconfig):
    """The kubelet registered the node itself (its version, containerd 2.x, the labels the kubelet
    sets) and keeps it Ready; the simulated kwok nodes are tainted so that workloads come here."""
    node = get_json(kubeconfig, "node", NODE)
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == KUBE_VERSION
    assert re.match(r"containerd://2\.", info["containerRuntimeVersion"]), info
    labels = node["metadata"]["labels"]
    assert labels["kubernetes.io/os"] == "linux" and labels["kubernetes.io/arch"] == "amd64"
    assert labels["kubernetes.io/hostname"] == NODE
    assert "kwok.x-k8s.io/node" not in node["metadata"].get("annotations", {})
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True" and ready[0]["reason"] == "KubeletReady", ready
    assert not node["spec"].get("taints"), node["spec"]
    for other in get_json(kubeconfig, "nodes")["items"]:
        if other["metadata"].get("annotations", {}).get("kwok.x-k8s.io/node") == "fake":
            assert any(t["key"] == "mlk.local/simulated" for t in other["spec"].get("taints", [])), other["metadata"]["name"]


# --- 2. a pod of our image runs ---------------------------------------------------------------------

def test_pod_of_our_image_runs_and_logs(kubeconfig, ns):
    """A pod of the splitter image really runs Python on this machine (uid 10001, read-only root), and
    kubectl logs reaches its output through the apiserver and the kubelet."""
    need_image("splitter")
    code = "import os, sys; print('uid', os.getuid(), 'gid', os.getgid(), 'python', sys.version.split()[0])"
    kubectl(kubeconfig, "apply", "-f", "-", namespace=ns, input=pod("hello", SPLITTER, ["python", "-c", code]))
    obj = wait_pod(kubeconfig, ns, "hello")
    assert obj["spec"]["nodeName"] == NODE
    state = obj["status"]["containerStatuses"][0]["state"]["terminated"]
    assert state["exitCode"] == 0 and state["containerID"].startswith("containerd://")
    logs = kubectl(kubeconfig, "logs", "hello", namespace=ns).stdout
    assert re.search(r"uid 10001 gid 10001 python 3\.\d+", logs), logs


# --- 3. pod networking ------------------------------------------------------------------------------

def test_pod_network_host_to_pod_and_pod_to_pod(kubeconfig, ns):
    """A pod's IP (the node's bridge, REAL_NODE_POD_CIDR) answers from this machine and from another
    pod; kubectl exec runs in a pod."""
    need_image("splitter")
    serve = ["python", "-m", "http.server", "8080", "--directory", "/etc"]
    kubectl(kubeconfig, "apply", "-f", "-", namespace=ns,
            input=pod("web", SPLITTER, serve, ports=[{"containerPort": 8080}], restart="Always"))
    web = wait_pod(kubeconfig, ns, "web", phase=("Running",), timeout=120)
    ip = web["status"]["podIP"]
    assert ip.startswith("10.85.") or os.environ.get("REAL_NODE_POD_CIDR"), ip
    body = None
    for _ in range(30):  # the server may take a moment to listen
        try:
            body = urllib.request.urlopen(f"http://{ip}:8080/hostname", timeout=5).read()
            break
        except OSError:
            time.sleep(1)
    assert body == b"web\n"
    fetch = f"import urllib.request; print(urllib.request.urlopen('http://{ip}:8080/hostname', timeout=10).read())"
    kubectl(kubeconfig, "apply", "-f", "-", namespace=ns, input=pod("client", SPLITTER, ["python", "-c", fetch]))
    obj = wait_pod(kubeconfig, ns, "client")
    assert obj["status"]["podIP"] != ip
    assert "b'web\\n'" in kubectl(kubeconfig, "logs", "client", namespace=ns).stdout
    out = kubectl(kubeconfig, "exec", "web", "--", "python", "-c", "import socket; print(socket.gethostname())",
                  namespace=ns).stdout
    assert out.strip() == "web"


def test_service_cluster_ip_routes_from_the_node(kubeconfig, ns):
    """kube-proxy on the node: a Service's ClusterIP answers from this machine itself (the path the
    kubelet's NFS mount takes to the NFS server), and again after its only pod is replaced by one at
    another address; an address in the Service range that no Service has fails here at once (the range
    is routed to the node's bridge, not to the default route)."""
    need_image("splitter")
    serve = ["python", "-m", "http.server", "8080", "--directory", "/etc"]
    kubectl(kubeconfig, "apply", "-f", "-", namespace=ns,
            input=pod("web", SPLITTER, serve, ports=[{"containerPort": 8080}], restart="Always"))
    kubectl(kubeconfig, "apply", "-f", "-", namespace=ns, input=json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"test": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}))
    ip = get_json(kubeconfig, "service", "web", namespace=ns)["spec"]["clusterIP"]

    def fetch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the pod listening, and kube-proxy's rule for its endpoint
            try:
                return urllib.request.urlopen(f"http://{ip}/hostname", timeout=3).read()
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"ClusterIP {ip}:80 did not answer from the node within 60 s")

    first = wait_pod(kubeconfig, ns, "web", phase=("Running",), timeout=120)["status"]["podIP"]
    assert fetch() == b"web\n"
    kubectl(kubeconfig, "delete", "pod", "web", "--grace-period=1", namespace=ns)
    kubectl(kubeconfig, "apply", "-f", "-", namespace=ns,
            input=pod("web", SPLITTER, serve, ports=[{"containerPort": 8080}], restart="Always"))
    second = wait_pod(kubeconfig, ns, "web", phase=("Running",), timeout=120)["status"]["podIP"]
    assert fetch() == b"web\n"
    print(f"\nClusterIP {ip} -> pod {first}, then -> pod {second}")
    unused = ip.rsplit(".", 1)[0] + ".254"
    route = subprocess.run(["ip", "route", "get", unused], capture_output=True, text=True).stdout
    assert " dev mlkcni0 " in route, route  # the bridge, never the default route


# --- 4. volumes -------------------------------------------------------------------------------------

def claim(name):
    return json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": CLASS,
                 "resources": {"requests": {"storage": "10Gi"}}},
    })


def test_rwx_claim_fsgroup_emptydir_readonly_root(kubeconfig, ns):
    """A ReadWriteMany claim of local-rwx binds on first use to a volume on this machine, which the
    kubelet hands to fsGroup 10001 (group-owned, setgid); uid 10001 writes there and in an emptyDir but
    not on the read-only root; a second pod reads the first one's file from the same claim."""
    need_image("splitter")
    kubectl(kubeconfig, "apply", "-f", "-", namespace=ns, input=claim("shared"))
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}, {"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "data", "mountPath": "/mnt"}, {"name": "tmp", "mountPath": "/tmp"}]
    write = """
import os, stat
for d in ("/mnt", "/tmp"):
    st = os.stat(d)
    print(d, "gid", st.st_gid, "setgid", bool(st.st_mode & stat.S_ISGID))
os.makedirs("/mnt/model", exist_ok=True)
open("/mnt/model/written-by-writer", "w").write("hello")
open("/tmp/scratch", "w").write("x")
try:
    open("/in-root", "w")
    print("root writable")
except OSError as e:
    print("root read-only:", e.strerror)
"""
    kubectl(kubeconfig, "apply", "-f", "-", namespace=ns,
            input=pod("writer", SPLITTER, ["python", "-c", write], volumes=volumes, mounts=mounts))
    wait_pod(kubeconfig, ns, "writer")
    logs = kubectl(kubeconfig, "logs", "writer", namespace=ns).stdout
    assert "/mnt gid 10001 setgid True" in logs, logs
    assert "/tmp gid 10001 setgid True" in logs, logs
    assert "root read-only: Read-only file system" in logs, logs
    pvc = get_json(kubeconfig, "pvc", "shared", namespace=ns)
    assert pvc["status"]["phase"] == "Bound" and "ReadWriteMany" in pvc["status"]["accessModes"]
    pv = get_json(kubeconfig, "pv", pvc["spec"]["volumeName"])
    path = Path(pv["spec"]["local"]["path"])
    assert (path / "model" / "written-by-writer").read_text() == "hello"
    assert (path / "model").stat().st_uid == 10001
    read = "print(open('/mnt/model/written-by-writer').read())"
    kubectl(kubeconfig, "apply", "-f", "-", namespace=ns,
            input=pod("reader", SPLITTER, ["python", "-c", read], volumes=volumes[:1], mounts=mounts[:1]))
    wait_pod(kubeconfig, ns, "reader")
    assert kubectl(kubeconfig, "logs", "reader", namespace=ns).stdout.strip() == "hello"


def test_released_volume_is_emptied_by_the_next_up(kubeconfig, ns):
    """A volume whose claim is gone is Released; real-node.sh up empties it and makes it Available."""
    need_image("splitter")
    kubectl(kubeconfig, "apply", "-f", "-", namespace=ns, input=claim("once"))
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "once"}}]
    mounts = [{"name": "data", "mountPath": "/mnt"}]
    kubectl(kubeconfig, "apply", "-f", "-", namespace=ns,
            input=pod("once", SPLITTER, ["python", "-c", "open('/mnt/left-over', 'w').write('x')"], volumes=volumes,
                  mounts=mounts))
    wait_pod(kubeconfig, ns, "once")
    pv_name = get_json(kubeconfig, "pvc", "once", namespace=ns)["spec"]["volumeName"]
    kubectl(kubeconfig, "delete", "pod", "once", namespace=ns)
    kubectl(kubeconfig, "delete", "pvc", "once", namespace=ns)
    for _ in range(60):
        if get_json(kubeconfig, "pv", pv_name)["status"]["phase"] == "Released":
            break
        time.sleep(1)
    path = Path(get_json(kubeconfig, "pv", pv_name)["spec"]["local"]["path"])
    assert (path / "left-over").exists()
    proc = run([SCRIPTS / "real-node.sh", "up", "--exclusive", kubeconfig], timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"emptying released volume {pv_name}" in proc.stderr
    assert get_json(kubeconfig, "pv", pv_name)["status"]["phase"] == "Available"
    assert list(path.iterdir()) == []


# --- 5. port-forward ----------------------------------------------------------------------------------

def port_forward(kubeconfig, namespace, target, remote):
    """Start kubectl port-forward on a free local port; return (process, local port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    proc = subprocess.Popen([str(KUBECTL), "--kubeconfig", kubeconfig, "-n", namespace, "port-forward",
                             "--address", "127.0.0.1", target, f"{local}:{remote}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "Forwarding from" not in line:
        proc.kill()
        pytest.fail(f"port-forward did not start: {line}{proc.stderr.read()}")
    return proc, local


def get(url, timeout=10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_port_forward_reaches_the_server(kubeconfig, ns):
    """The server image starts (its startup probe on /healthz passes through the kubelet), and
    kubectl port-forward reaches it: /healthz answers ok, /readyz says no model yet (the public port's generic
    reason: the file's path stays in the server's log)."""
    need_image("server")
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 2, "failureThreshold": 150}
    spec = json.loads(pod("server", SERVER, args=["--model", "/tmp/model.h5"],
                          volumes=[{"name": "tmp", "emptyDir": {}}], mounts=[{"name": "tmp", "mountPath": "/tmp"}],
                          ports=[{"name": "http", "containerPort": 5000}], probe=probe, restart="Always"))
    spec["spec"]["containers"][0]["env"] = [{"name": "HOME", "value": "/tmp"}]
    kubectl(kubeconfig, "apply", "-f", "-", namespace=ns, input=json.dumps(spec))
    wait_pod(kubeconfig, ns, "server", phase=("Ready",), timeout=300)
    proc, local = port_forward(kubeconfig, ns, "pod/server", 5000)
    try:
        status, body = get(f"http://127.0.0.1:{local}/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok"}
        # /healthz answers once one gunicorn worker is up; /readyz waits for all of them (nginx says so
        # meanwhile), then gives the app's own reason.
        deadline = time.monotonic() + 120
        while True:
            status, body = get(f"http://127.0.0.1:{local}/readyz")
            error = json.loads(body)["error"]
            if "workers still starting" not in error or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert status == 503 and error.startswith("no model:") and "/tmp/model.h5" not in error, error
    finally:
        proc.kill()
        proc.wait()


# --- 6. the quickstart on the node ------------------------------------------------------------------

def running_pod(kubeconfig, namespace, selector):
    """The name of a pod of SELECTOR whose container runs and that is not being deleted, or None."""
    for pod in get_json(kubeconfig, "pods", "-l", selector, namespace=namespace)["items"]:
        running = (pod["status"].get("containerStatuses") or [{}])[0].get("state", {}).get("running")
        if running and pod["metadata"].get("deletionTimestamp") is None:
            return pod["metadata"]["name"]
    return None


def in_round_two(kubeconfig, namespace, run_, out_path, selector, settle, deadline, act):
    """Once the quickstart's output says round 2 has begun and a pod of SELECTOR runs, wait SETTLE seconds
    (into its training) and return act(pod name); None if the run ends or the deadline passes first."""
    while run_.poll() is None and time.monotonic() < deadline:
        if "== round 2/2" in out_path.read_text():
            pod_name = running_pod(kubeconfig, namespace, selector)
            if pod_name:
                time.sleep(settle)
                return act(pod_name)
        time.sleep(0.5)
    return None


def assert_page_reads_six(kubeconfig, namespace):
    """Through the port-forward the quickstart prints: the server is ready and reads samples/6.png as 6."""
    pf, local = port_forward(kubeconfig, namespace, "svc/mnist-server-svc", 80)
    try:
        status, body = get(f"http://127.0.0.1:{local}/readyz")
        assert status == 200, body
        answer = subprocess.run(["curl", "-sS", "-F", f"file=@{REPO / 'samples' / '6.png'}",
                                 f"http://127.0.0.1:{local}/api/predict"], capture_output=True, text=True, timeout=60)
        assert json.loads(answer.stdout)["digit"] == 6, answer.stdout + answer.stderr
    finally:
        pf.kill()
        pf.wait()


def post_six(url, timeout=30):
    """POST samples/6.png to URL on a new connection: (status, parsed JSON or the error text)."""
    boundary = "mlkrealnode"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"6.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + (REPO / "samples" / "6.png").read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()[:200]
    except OSError as e:
        return None, f"{type(e).__name__}: {e}"


def server_pods(kubeconfig, namespace):
    """{pod name: pod IP} of the server's pods that are Ready and not being deleted."""
    pods = {}
    for p in get_json(kubeconfig, "pods", "-l", "app=mnist-server", namespace=namespace)["items"]:
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        if ready and p["metadata"].get("deletionTimestamp") is None:
            pods[p["metadata"]["name"]] = p["status"]["podIP"]
    return pods


def served_model(ip):
    status, body = get(f"http://{ip}:5000/api/model")
    assert status == 200, body
    return json.loads(body)


def assert_rolling_restart_loses_no_request(kubeconfig, namespace):
    """A client posting digits to the Service (its ClusterIP, through kube-proxy) on a new connection each
    time while `kubectl rollout restart` replaces the server's pod: every answer is 200 and reads 6
    (the new pod is ready before the old one stops; the old one pauses in preStop, then drains)."""
    import threading

    ip = get_json(kubeconfig, "service", "mnist-server-svc", namespace=namespace)["spec"]["clusterIP"]
    before = set(server_pods(kubeconfig, namespace))
    answers, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            answers.append(post_six(f"http://{ip}/api/predict"))
            time.sleep(0.05)

    client = threading.Thread(target=load)
    client.start()
    try:
        time.sleep(3)
        kubectl(kubeconfig, "rollout", "restart", "deployment/mnist-server", namespace=namespace)
        kubectl(kubeconfig, "rollout", "status", "deployment/mnist-server", "--timeout=600s", namespace=namespace,
                timeout=660)
        deadline = time.monotonic() + 120  # until the old pod has stopped: its drain is part of the test
        while time.monotonic() < deadline and before & {p["metadata"]["name"] for p in get_json(
                kubeconfig, "pods", "-l", "app=mnist-server", namespace=namespace)["items"]}:
            time.sleep(1)
        time.sleep(3)
    finally:
        stop.set()
        client.join(timeout=60)
    after = set(server_pods(kubeconfig, namespace))
    assert after and not after & before, (before, after)  # the pod was replaced
    bad = [a for a in answers if a[0] != 200 or a[1].get("digit") != 6]
    print(f"\nrolling restart under load: {len(answers)} requests, {len(bad)} errors")
    assert len(answers) > 50 and not bad, bad[:5]


def server_memory(kubeconfig, namespace, pod_name):
    """The server container's memory now and at its peak, in MiB, from its cgroup (v1 or v2)."""
    script = ("d=/sys/fs/cgroup; if [ -f $d/memory.current ]; then cat $d/memory.current $d/memory.peak; "
              "else cat $d/memory/memory.usage_in_bytes $d/memory/memory.max_usage_in_bytes; fi")
    out = kubectl(kubeconfig, "exec", pod_name, "--", "sh", "-c", script, namespace=namespace).stdout.split()
    return [int(v) / 2**20 for v in out]


BAD_CANDIDATE = """
import os, sys, numpy as np, keras
model = keras.models.load_model("/mnt/aggregated-model.h5", compile=False)
last = model.layers[-1]
kernel, bias = last.get_weights()
order = np.roll(np.arange(10), 1)  # every digit answered as the next one: a worse model the gate must reject
last.set_weights([kernel[:, order], bias[order]])
model.save("/mnt/.candidate.h5")
os.replace("/mnt/.candidate.h5", "/mnt/aggregated-model.h5")
import hashlib
print(hashlib.sha256(open("/mnt/aggregated-model.h5", "rb").read()).hexdigest())
"""


def assert_one_admitted_model_for_every_pod(kubeconfig, namespace):
    """The gate's decision outlives the pod and holds for every replica: a worse candidate replaces
    /mnt/aggregated-model.h5 and is rejected; the pod is deleted, and its replacement serves the admitted
    model, not the file; with two replicas, both answer with that same model id."""
    (pod_name, ip), = server_pods(kubeconfig, namespace).items()
    admitted = served_model(ip)["sha256"]
    env = ["env", "HOME=/tmp", "HDF5_USE_FILE_LOCKING=FALSE", "TF_CPP_MIN_LOG_LEVEL=3"]
    candidate = kubectl(kubeconfig, "exec", pod_name, "--", *env, "/opt/venv/bin/python", "-c", BAD_CANDIDATE,
                        namespace=namespace, timeout=300).stdout.split()[-1]
    assert candidate != admitted
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        gate = served_model(ip)["gate"]
        if (gate.get("last_decision") or {}).get("candidate", {}).get("sha256") == candidate:
            break
        time.sleep(2)
    assert gate["last_decision"]["decision"] == "rejected", gate
    assert served_model(ip)["sha256"] == admitted
    kubectl(kubeconfig, "delete", "pod", pod_name, "--wait=false", namespace=namespace)
    kubectl(kubeconfig, "scale", "deployment/mnist-server", "--replicas=2", namespace=namespace)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(set(server_pods(kubeconfig, namespace)) - {pod_name}) < 2:
        time.sleep(2)
    pods = {n: i for n, i in server_pods(kubeconfig, namespace).items() if n != pod_name}
    assert len(pods) == 2, pods
    models = {n: served_model(i) for n, i in pods.items()}
    assert {m["sha256"] for m in models.values()} == {admitted}, models  # never the rejected file
    assert all(m["gate"]["restored"] for m in models.values()), models
    print(f"gate across pods: admitted {admitted[:12]} served by {sorted(pods)}; candidate {candidate[:12]} rejected")
    for name, ip in pods.items():  # the figure 7-server.yaml's memory request comes from (docs/kubernetes.md)
        assert all(post_six(f"http://{ip}:5000/api/predict")[0] == 200 for _ in range(50))
        now, peak = server_memory(kubeconfig, namespace, name)
        print(f"server pod {name} (restored, a candidate rejected, 50 predictions): {now:.0f} MiB now, "
              f"{peak:.0f} MiB at its peak")


@pytest.mark.slow
def test_quickstart_rwx_backend_trains_and_serves_on_the_real_node(kubeconfig, ns, mnist_npz):
    """The quickstart with NFS_BACKEND=rwx STORAGE_CLASS=local-rwx, 2 workers x 1 epoch x 2 rounds and
    the server, every pod really running here, MNIST put on the volume from a local file (MNIST_NPZ,
    through the upload pod and kubectl exec: no download). A trainer pod of the last round is deleted
    mid-training: its Job makes another and the run still completes. The accuracy test's log says
    above 0.9; samples/6.png posted through the port-forward the run prints is read as 6. Then the
    server: a rolling restart under load loses no request, and a candidate the gate rejected is served
    by no pod, neither after the pod is deleted nor by a second replica. Teardown leaves nothing of ours
    behind."""
    for stage in ("splitter", "trainer", "aggregator", "server"):
        need_image(stage)
    env = clean_env()
    env.update(KUBECTL=f"{KUBECTL} --kubeconfig {kubeconfig} -n {ns}", POLL="2", NFS_BACKEND="rwx",
               STORAGE_CLASS=CLASS, WORKER_NUMBER="2", EPOCH="1", ROUNDS="2", SERVE="1", SERVICE_TYPE="ClusterIP",
               MNIST_NPZ=str(mnist_npz), SERVER_REPLICAS="1")  # one pod: the gate check below scales to 2 itself
    out_path = Path(f"/tmp/{ns}-quickstart.out")
    try:
        start = time.monotonic()
        with open(out_path, "w") as out:
            run_ = subprocess.Popen(["bash", str(SCRIPTS / "quickstart.sh")], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, text=True)
        # Round 2's trainer 0, once it has been running a few seconds (TensorFlow loaded, training):
        def kill(trainer):  # SIGTERM, then SIGKILL after 1 s (python as PID 1 ignores SIGTERM): exit 137
            kubectl(kubeconfig, "delete", "pod", trainer, "--grace-period=1", "--wait=false", namespace=ns)
            return trainer

        deadline = time.monotonic() + 1800
        killed = in_round_two(kubeconfig, ns, run_, out_path, "job-name=mnist-trainer-0", 3, deadline, kill)
        run_.wait(timeout=max(60, deadline - time.monotonic()))
        output = out_path.read_text()
        print(f"\nquickstart on the real node: {time.monotonic() - start:.0f} s\n{output[-3000:]}")
        assert run_.returncode == 0, output[-6000:]
        assert killed, "no running trainer pod of round 2 was seen"

        job = get_json(kubeconfig, "job", "mnist-trainer-0", namespace=ns)
        assert job["status"].get("failed", 0) >= 1 and job["status"].get("succeeded") == 1, job["status"]
        assert any(c["type"] == "Complete" and c["status"] == "True" for c in job["status"]["conditions"])
        pods = get_json(kubeconfig, "pods", namespace=ns)["items"]
        assert pods and {p["spec"]["nodeName"] for p in pods} == {NODE}
        splitter = kubectl(kubeconfig, "logs", "-l", "app.kubernetes.io/component=splitter", "--tail=-1",
                           namespace=ns).stdout
        assert "download" not in splitter.lower(), splitter
        result = json.loads(re.search(r"accuracy test: (\{.*\})", output).group(1))
        assert result["accuracy"] > 0.9, result

        hint = re.search(r"port-forward service/mnist-server-svc 8080:80", output)
        assert hint, output[-2000:]
        assert_page_reads_six(kubeconfig, ns)

        # The server pod as measured and stopped, and one gate decision for every pod.
        (server_pod, _), = server_pods(kubeconfig, ns).items()
        now, peak = server_memory(kubeconfig, ns, server_pod)
        print(f"server pod memory after the run: {now:.0f} MiB now, {peak:.0f} MiB at its peak")
        assert_rolling_restart_loses_no_request(kubeconfig, ns)
        assert_one_admitted_model_for_every_pod(kubeconfig, ns)
    finally:
        if "run_" in locals() and run_.poll() is None:
            run_.kill()
        teardown = dict(env, DELETE_DISK="1")
        down = subprocess.run(["bash", str(SCRIPTS / "teardown.sh")], env=teardown, capture_output=True, text=True,
                              timeout=600)
    assert down.returncode == 0, down.stderr
    kinds = "deployments,replicasets,pods,services,jobs,configmaps,persistentvolumeclaims"
    assert get_json(kubeconfig, kinds, "-l", "app.kubernetes.io/name=mlk-mnist", namespace=ns)["items"] == []


# --- 7. the default backend: an NFS server on the node, over real NFS -------------------------------

CACHE = Path(os.environ.get("LOCAL_CLUSTER_CACHE", REPO / ".cache" / "local-cluster"))
NFS_IMAGE = "localhost/mlk/nfs-server:0.1.0"
AGGREGATOR = "localhost/mlk/aggregator:0.1.0"


@pytest.fixture
def ns_nfs(kubeconfig):
    """A fresh namespace without Pod Security enforcement: the NFS server adds DAC_READ_SEARCH, which the
    baseline and restricted levels do not admit (docs/kubernetes.md)."""
    name = f"rn-nfs-{uuid.uuid4().hex[:8]}"
    kubectl(kubeconfig, "create", "namespace", name)
    yield name
    kubectl(kubeconfig, "delete", "namespace", name, "--timeout=120s", check=False)
    kubectl(kubeconfig, "delete", "pv", f"mlk-nfs-{name}", "--ignore-not-found", check=False)


def host_nfs_mounts(server_ip):
    return [line for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[0] == f"{server_ip}:/exports"]


def pod_mnt(kubeconfig, namespace, pod_name):
    """The /mnt line of a running pod's own mount table: (source, type)."""
    code = "import json; print(json.dumps([l.split()[:3] for l in open('/proc/mounts') if l.split()[1] == '/mnt']))"
    out = kubectl(kubeconfig, "exec", pod_name, "--", "python", "-c", code, namespace=namespace).stdout
    entries = json.loads(out)
    assert len(entries) == 1, entries
    source, _target, fstype = entries[0]
    return source, fstype


@pytest.mark.slow
def test_quickstart_pvc_backend_runs_over_real_nfs_and_survives_the_servers_restart(kubeconfig, ns_nfs, mnist_npz):
    """The default backend (NFS_BACKEND=pvc) on the real node, 2 workers x 1 epoch x 2 rounds and the
    server: the NFS server pod runs the project's image on a claim of the node's default class; the PV is
    of type nfs at the Service's ClusterIP (routed by the node's kube-proxy); every stage pod's /mnt is that
    NFS mount, made by the kubelet through the project's mount.nfs; the NFS server pod is deleted in the
    middle of round 2, comes back, and the run still completes with the ledger intact; the accuracy test
    says above 0.9 and samples/6.png is read as 6; teardown leaves no object, no PV and no mount."""
    for stage in ("splitter", "trainer", "aggregator", "server", "nfs-server"):
        need_image(stage)
    ns = ns_nfs
    mount_log = CACHE / "real-node" / "logs" / "nfs-mounts.log"
    log_start = mount_log.stat().st_size if mount_log.exists() else 0
    env = clean_env()
    env.update(KUBECTL=f"{KUBECTL} --kubeconfig {kubeconfig} -n {ns}", POLL="2", NFS_BACKEND="pvc",
               WORKER_NUMBER="2", EPOCH="1", ROUNDS="2", SERVE="1", SERVICE_TYPE="ClusterIP",
               MNIST_NPZ=str(mnist_npz))
    out_path = Path(f"/tmp/{ns}-quickstart.out")
    server_ip = None
    try:
        start = time.monotonic()
        with open(out_path, "w") as out:
            run_ = subprocess.Popen(["bash", str(SCRIPTS / "quickstart.sh")], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, text=True)
        # Round 2: read a running trainer's mount table, then delete the NFS server's pod under it.
        def delete_the_nfs_server(trainer):
            mnt = pod_mnt(kubeconfig, ns, trainer)
            server = get_json(kubeconfig, "pods", "-l", "role=nfs-server", namespace=ns)["items"][0]["metadata"]["name"]
            kubectl(kubeconfig, "delete", "pod", server, "--wait=false", namespace=ns)
            return server, mnt

        deadline = time.monotonic() + 1800
        old_server, trainer_mnt = in_round_two(kubeconfig, ns, run_, out_path, "app.kubernetes.io/component=trainer",
                                               2, deadline, delete_the_nfs_server) or (None, None)
        run_.wait(timeout=max(60, deadline - time.monotonic()))
        output = out_path.read_text()
        print(f"\nquickstart (pvc) on the real node: {time.monotonic() - start:.0f} s\n{output[-3000:]}")
        assert run_.returncode == 0, output[-6000:]
        assert old_server, "no running trainer pod of round 2 was seen"

        # The server: the project's image, on a claim of the node's class, which is the default.
        server_pods = get_json(kubeconfig, "pods", "-l", "role=nfs-server", namespace=ns)["items"]
        assert [p["metadata"]["name"] for p in server_pods] != [old_server]
        assert server_pods[0]["spec"]["containers"][0]["image"] == NFS_IMAGE
        assert server_pods[0]["status"]["containerStatuses"][0]["ready"]
        disk = get_json(kubeconfig, "pvc", "nfs-server-disk", namespace=ns)
        assert disk["spec"]["storageClassName"] == CLASS and disk["status"]["phase"] == "Bound"
        default = get_json(kubeconfig, "storageclass", CLASS)["metadata"]["annotations"]
        assert default.get("storageclass.kubernetes.io/is-default-class") == "true"

        # The volume: type nfs at the Service's ClusterIP, and that is what the pods have at /mnt.
        server_ip = get_json(kubeconfig, "service", "nfs-server", namespace=ns)["spec"]["clusterIP"]
        pv = get_json(kubeconfig, "pv", f"mlk-nfs-{ns}")
        assert pv["spec"]["nfs"] == {"server": server_ip, "path": "/exports"}
        assert pv["spec"]["mountOptions"] == ["nfsvers=4.1", "hard"]
        assert trainer_mnt == (f"{server_ip}:/exports", "fuse.nfs4")
        web = get_json(kubeconfig, "pods", "-l", "app.kubernetes.io/component=server", namespace=ns)["items"][0]
        assert pod_mnt(kubeconfig, ns, web["metadata"]["name"]) == (f"{server_ip}:/exports", "fuse.nfs4")
        # ... and every stage pod's (the Jobs' are gone by now): the kubelet mounted each pod's volume
        # through mount.nfs, whose log names the pod's volume folder.
        mounts = mount_log.read_text()[log_start:]
        stage_pods = [p for p in get_json(kubeconfig, "pods", namespace=ns)["items"]
                      if p["metadata"]["labels"].get("app.kubernetes.io/component") != "nfs-server"]
        components = {p["metadata"]["labels"]["app.kubernetes.io/component"] for p in stage_pods}
        assert {"splitter", "trainer", "aggregator", "accuracy-test", "server"} <= components, components
        for p in stage_pods:
            assert f"{server_ip}:/exports on " in mounts and f"/pods/{p['metadata']['uid']}/volumes/kubernetes.io~nfs/mlk-nfs-{ns}: mounting (NFSv4.1, hard" in mounts, \
                (p["metadata"]["name"], mounts[-2000:])
        assert "retrying" in mounts  # the server's restart was waited out, not failed

        # Nothing lost: the ledger's every recorded sha256 matches its file.
        verify = json.loads(pod("verify", AGGREGATOR, ["python", "/app/ledger.py", "verify", "--dir", "/mnt"],
                                volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "nfs"}}],
                                mounts=[{"name": "data", "mountPath": "/mnt"}]))
        verify["metadata"]["labels"]["app.kubernetes.io/name"] = "mlk-mnist"
        kubectl(kubeconfig, "apply", "-f", "-", namespace=ns, input=json.dumps(verify))
        wait_pod(kubeconfig, ns, "verify")
        last = kubectl(kubeconfig, "logs", "verify", namespace=ns).stdout.strip().splitlines()[-1]
        assert json.loads(last)["last_round"] == 2, last

        result = json.loads(re.search(r"accuracy test: (\{.*\})", output).group(1))
        assert result["accuracy"] > 0.9, result
        assert_page_reads_six(kubeconfig, ns)
    finally:
        if "run_" in locals() and run_.poll() is None:
            run_.kill()
        down = subprocess.run(["bash", str(SCRIPTS / "teardown.sh")], env=dict(env, DELETE_DISK="1"),
                              capture_output=True, text=True, timeout=600)
    assert down.returncode == 0, down.stderr
    kinds = "deployments,replicasets,pods,services,jobs,configmaps,persistentvolumeclaims,networkpolicies"
    assert get_json(kubeconfig, kinds, "-l", "app.kubernetes.io/name=mlk-mnist", namespace=ns)["items"] == []
    assert kubectl(kubeconfig, "get", "pv", f"mlk-nfs-{ns}", "--ignore-not-found", "-o", "name").stdout.strip() == ""
    deadline = time.monotonic() + 60  # the kubelet unmounts as the pods go
    while server_ip and host_nfs_mounts(server_ip) and time.monotonic() < deadline:
        time.sleep(1)
    assert server_ip and host_nfs_mounts(server_ip) == []


def test_a_volume_the_node_cannot_use_is_named_as_the_cause(kubeconfig, ns_nfs, mnist_npz):
    """kwok's simulated class gives a hostPath volume that uid 10001 cannot write on the real node: the
    upload pod runs but never gets ready. The quickstart's message names the claim, its volume's type and
    class, not only the timeout. (With the node up, a claim without a class gets the node's own.)"""
    need_image("splitter")
    env = clean_env()
    env.update(KUBECTL=f"{KUBECTL} --kubeconfig {kubeconfig} -n {ns_nfs}", POLL="2", NFS_BACKEND="rwx",
               STORAGE_CLASS="kwok-volume", NFS_TIMEOUT="20", MNIST_NPZ=str(mnist_npz))
    proc = subprocess.run(["bash", str(SCRIPTS / "quickstart.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "stage dataset failed: pod mnist-dataset-upload not ready within 20s: pod mnist-dataset-upload mounts " \
           "claim nfs (volume pvc-" in last, last
    assert "of type hostPath, StorageClass kwok-volume, provisioner kwok.x-k8s.io/volume)" in last, last
    subprocess.run(["bash", str(SCRIPTS / "teardown.sh")], env=dict(env, DELETE_DISK="1"), capture_output=True,
                   timeout=300)
