"""The shared volume's NFS path, probed step by step before any cluster: (1) the project's NFS server
image (nfs-server/: NFS-Ganesha, NFSv4.1 only) serves its export from a podman container run as its
Deployment runs it (seven capabilities, read-only root, no privilege escalation), checked with the
userspace client nfs-rs; (2) the real node's mount.nfs (scripts/real-node/: nfs-rs over FUSE) mounts it
on this machine, uid 10001 writes, renames and reads back an .h5 through the mount, and the mount
survives the server's restart. The image comes from scripts/build-images.sh (scripts/test.sh's container
run builds it first). The unit tests of mount_nfs.py's option and address parsing need none of that."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import h5py  # noqa: F401 - imported before forking to uid 10001, which cannot read this interpreter's files
import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
IMAGE = "localhost/mlk/nfs-server:0.1.0"
MOUNT = REPO / "scripts" / "real-node" / "bin" / "mount"
DEPLOYMENT = REPO / "manifests" / "variants" / "1-nfs-deployment-pvc.yaml"

spec = importlib.util.spec_from_file_location("mount_nfs", REPO / "scripts" / "real-node" / "mount_nfs.py")
mount_nfs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mount_nfs)


# --- mount_nfs.py's parsing (no server) -----------------------------------------------------------

def test_options_map_version_hard_soft_and_say_what_is_ignored():
    opts, ignored = mount_nfs.parse_options("nfsvers=4.1,hard,rsize=1048576,noatime,proto=tcp")
    assert (opts["version"], opts["hard"], opts["ro"]) == ("4.1", True, False)
    assert ignored == ["rsize=1048576", "noatime", "proto=tcp"]
    opts, _ = mount_nfs.parse_options("vers=4,soft,timeo=50,retrans=1,ro,port=12049")
    assert (opts["version"], opts["hard"], opts["timeo"], opts["retrans"], opts["ro"], opts["port"]) == \
        ("4.1", False, 50, 1, True, 12049)
    with pytest.raises(mount_nfs.MountError, match="NFS version '4.2' is not supported"):
        mount_nfs.parse_options("nfsvers=4.2")
    with pytest.raises(mount_nfs.MountError, match="timeo needs a positive number"):
        mount_nfs.parse_options("timeo=x")


def test_spec_connects_to_the_exports_parent():
    assert mount_nfs.split_spec("10.96.0.42:/exports") == ("10.96.0.42", "/", "exports")
    assert mount_nfs.split_spec("nfs.example:/a/b/") == ("nfs.example", "/a", "b")
    assert mount_nfs.split_spec("[fd00::1]:/exports") == ("fd00::1", "/", "exports")
    for bad, why in (("10.96.0.42:/", "root '/' is not supported"), ("/exports", "is not SERVER:/EXPORT"),
                     ("host:exports", "is not SERVER:/EXPORT")):
        with pytest.raises(mount_nfs.MountError, match=why):
            mount_nfs.split_spec(bad)


def test_helper_refuses_bad_arguments_with_mount_exit_code(tmp_path):
    proc = subprocess.run([str(MOUNT), "-t", "nfs", "-o", "nfsvers=3.5", "127.0.0.1:/exports", str(tmp_path)],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, MLK_NFS_PYTHON=sys.executable))
    assert proc.returncode == 32, proc
    assert proc.stderr.strip() == "mount.nfs: NFS version '3.5' is not supported (4.1, 4.0 or 3)"


# --- 1. the image serves NFSv4.1 in a container --------------------------------------------------

def podman(*args, check=True, timeout=120):
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, CONTAINERS_CONF=containers_conf()))
    if check and proc.returncode != 0:
        pytest.fail(f"podman {' '.join(args)}: {proc.stderr[-2000:]}")
    return proc


_CONF = {}


def containers_conf():
    """The podman settings this machine needs, as the container run uses them (e2e-containers.sh)."""
    if "path" not in _CONF:
        text = subprocess.run([str(REPO / "tests" / "e2e" / "e2e-containers.sh"), "--print-containers-conf"],
                              capture_output=True, text=True, check=True).stdout
        path = Path(f"/tmp/mlk-test-containers-{os.getpid()}.conf")
        path.write_text(text)
        _CONF["path"] = str(path)
    return _CONF["path"]


def deployment_container():
    docs = [d for d in yaml.safe_load_all(DEPLOYMENT.read_text()) if d and d["kind"] == "Deployment"]
    return docs[0]["spec"]["template"]["spec"]["containers"][0]


def deployment_capabilities():
    """The capabilities the NFS server's Deployment adds (the image is tested with exactly these)."""
    return deployment_container()["securityContext"]["capabilities"]["add"]


def deployment_scratch_dirs():
    """Where the Deployment mounts its emptyDirs (the root file system is read-only, and podman's own
    tmpfs on /tmp and /etc/mtab are turned off, so the container has what the pod has, no more)."""
    return [m["mountPath"] for m in deployment_container()["volumeMounts"] if m["mountPath"] != "/exports"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The image in a podman container with a volume at /exports, as its Deployment runs it."""

    def __init__(self, caps):
        self.name = f"mlk-nfs-test-{uuid.uuid4().hex[:8]}"
        self.volume = f"{self.name}-vol"
        self.port = free_port()
        self.caps = caps
        podman("volume", "create", self.volume)

    def start(self):
        if podman("image", "exists", IMAGE, check=False).returncode != 0:
            pytest.fail(f"no image {IMAGE} (scripts/build-images.sh nfs-server; scripts/test.sh's container run builds it)")
        podman("rm", "-f", self.name, check=False)
        started = time.monotonic()
        scratch = [arg for d in deployment_scratch_dirs() for arg in ("--tmpfs", d)]
        podman("run", "-d", "--name", self.name, "--read-only", "--read-only-tmpfs=false", *scratch,
               "--cap-drop", "ALL", "--cap-add", ",".join(self.caps),
               "--security-opt", "no-new-privileges", "-v", f"{self.volume}:/exports",
               "-p", f"127.0.0.1:{self.port}:2049", IMAGE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                # podman's port forwarder accepts before Ganesha does: ask NFS itself
                client = self.client(0, 0)
                client.close()
                return time.monotonic() - started
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        pytest.fail(f"the NFS server did not answer within 60 s:\n{podman('logs', self.name, check=False).stderr[-3000:]}")

    def client(self, uid, gid):
        import nfs_rs

        return nfs_rs.Client.connect(f"nfs://127.0.0.1/?version=4.1", uid=uid, gid=gid, nfs_port=self.port,
                                     noresvport=True, connect_timeout=2, operation_timeout=10)

    def remove(self):
        podman("rm", "-f", "-t", "0", self.name, check=False)
        podman("volume", "rm", "-f", self.volume, check=False)


@pytest.fixture
def server():
    s = Server(deployment_capabilities())
    yield s
    s.remove()


@pytest.mark.slow
def test_image_serves_nfs41_to_uid_10001_and_stops_on_sigterm(server):
    """The export's top folders belong to uid 10001 (the stages), a client as uid 10001 writes, renames
    and reads back 5 MB there, its files get its uid; the image has no volume-nfs and answers in
    seconds; SIGTERM ends it with exit 0 well within the Deployment's grace period."""
    took = server.start()
    print(f"\nNFS server answering {took:.2f} s after podman run")
    client = server.client(10001, 10001)
    try:
        top = {name: client.stat(f"exports/{name}") for name in ("data", "model")}
        assert {(i.uid, i.gid, i.mode & 0o777) for i in top.values()} == {(10001, 10001, 0o775)}
        payload = os.urandom(5_000_000)
        with client.open("exports/model/0-model.h5.tmp", "wb") as f:
            assert f.write(payload) == len(payload)
        client.rename("exports/model/0-model.h5.tmp", "exports/model/0-model.h5")
        with client.open("exports/model/0-model.h5", "rb") as f:
            assert f.read() == payload
        info = client.stat("exports/model/0-model.h5")
        assert (info.uid, info.gid) == (10001, 10001)
    finally:
        client.close()
    started = time.monotonic()
    podman("stop", "-t", "30", server.name)
    stopped = time.monotonic() - started
    state = json.loads(podman("inspect", server.name).stdout)[0]["State"]
    print(f"stopped {stopped:.2f} s after SIGTERM")
    assert state["ExitCode"] == 0 and stopped < 10, (state, stopped)
    log = podman("logs", server.name).stdout + podman("logs", server.name).stderr
    assert "NFS EXIT: regular exit" in log
    assert "Could not create export" not in log and "No export entries" not in log, log


@pytest.mark.slow
def test_image_brings_the_files_a_bare_runtime_does_not_add():
    """containerd gives a container no /etc/mtab (podman does): without it Ganesha cannot find the
    export's file system and serves no export at all."""
    root = Path(podman("image", "mount", IMAGE).stdout.strip())
    try:
        assert os.readlink(root / "etc" / "mtab") == "/proc/self/mounts"
    finally:
        podman("image", "unmount", IMAGE, check=False)


@pytest.mark.slow
def test_without_dac_read_search_every_operation_is_refused():
    """DAC_READ_SEARCH is one of the capabilities because it is needed: without it Ganesha starts, but
    reopening a file by its handle fails, so a client can do nothing."""
    s = Server([c for c in deployment_capabilities() if c != "DAC_READ_SEARCH"])
    try:
        s.start()
        client = s.client(10001, 10001)
        try:
            with pytest.raises(Exception, match="(?i)perm|access"):
                client.stat("exports/model")
        finally:
            client.close()
    finally:
        s.remove()


# --- 2. the real node's mount.nfs: FUSE on this machine --------------------------------------------

def as_uid_10001(fn):
    """Run fn() in a forked child as uid/gid 10001 (no exec: this interpreter may not be readable by
    that user); returns what it returned, or raises what it raised, as text."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(10001)
            os.setuid(10001)
            result = {"ok": fn()}
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            result = {"error": f"{type(e).__name__}: {e}"}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "error" not in result, result["error"]
    return result["ok"]


def write_h5_as_stage(mnt):
    os.makedirs(f"{mnt}/model", exist_ok=True)
    weights = np.arange(250_000, dtype="float32").reshape(500, 500)
    with h5py.File(f"{mnt}/model/1-model.h5.tmp", "w") as f:
        f.create_dataset("w", data=weights)
        f.attrs["mlk_kind"] = "worker"
    os.replace(f"{mnt}/model/1-model.h5.tmp", f"{mnt}/model/1-model.h5")
    with h5py.File(f"{mnt}/model/1-model.h5", "r") as f:
        same = bool((f["w"][:] == weights).all()) and f.attrs["mlk_kind"] == "worker"
    st = os.stat(f"{mnt}/model/1-model.h5")
    return {"same": same, "uid": st.st_uid, "files": sorted(os.listdir(f"{mnt}/model"))}


@pytest.fixture
def mounted(server):
    """The export mounted with the kubelet's command line on a folder uid 10001 can reach, unmounted
    afterwards."""
    server.start()
    top = Path(tempfile.mkdtemp(prefix="mlk-nfs-test-"))
    top.chmod(0o755)
    mnt = top / "mnt"
    mnt.mkdir()
    log = top / "mount.log"
    proc = subprocess.run([str(MOUNT), "-t", "nfs", "-o", f"nfsvers=4.1,hard,port={server.port}", "127.0.0.1:/exports",
                           str(mnt)], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, MLK_NFS_PYTHON=sys.executable, MLK_NFS_MOUNT_LOG=str(log)))
    assert proc.returncode == 0, proc.stderr + (log.read_text() if log.exists() else "")
    yield mnt, log
    subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)
    shutil.rmtree(top, ignore_errors=True)


def mount_entry(mnt):
    for line in Path("/proc/mounts").read_text().splitlines():
        source, target, fstype, *_ = line.split()
        if target == str(mnt):
            return source, fstype
    return None


@pytest.mark.slow
def test_mount_helper_mounts_and_uid_10001_writes_renames_reads_an_h5(server, mounted):
    """The kubelet's `mount -t nfs ...` through scripts/real-node/bin/mount: the export is a FUSE mount
    of type fuse.nfs4 named SERVER:/EXPORT; a stage's uid writes an .h5 under a temporary name, renames
    it and reads it back, and the server stores it as that uid; umount ends the daemon."""
    mnt, log = mounted
    assert mount_entry(mnt) == ("127.0.0.1:/exports", "fuse.nfs4")
    result = as_uid_10001(lambda: write_h5_as_stage(mnt))
    assert result == {"same": True, "uid": 10001, "files": ["1-model.h5"]}
    client = server.client(0, 0)
    try:
        assert client.stat("exports/model/1-model.h5").uid == 10001
    finally:
        client.close()
    subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    deadline = time.monotonic() + 20
    while "unmounted; exiting" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "unmounted; exiting" in log.read_text(), log.read_text()
    assert mount_entry(mnt) is None


@pytest.mark.slow
def test_mount_survives_the_servers_restart(server, mounted):
    """A hard mount waits through a restart of the server: a write issued while the server is down
    completes once it is back, and nothing written before or after is lost."""
    mnt, log = mounted
    first = as_uid_10001(lambda: write_h5_as_stage(mnt))
    assert first["same"]
    podman("stop", "-t", "10", server.name)

    def write_while_down():
        with open(f"{mnt}/model/during-restart.bin", "wb") as f:
            f.write(b"x" * 300_000)
        return os.path.getsize(f"{mnt}/model/during-restart.bin")

    results = {}
    writer = threading.Thread(target=lambda: results.update(size=as_uid_10001(write_while_down)))
    writer.start()
    time.sleep(3)
    assert writer.is_alive(), "the write did not wait for the server"
    podman("start", server.name)
    writer.join(timeout=120)
    assert not writer.is_alive(), log.read_text()
    assert results["size"] == 300_000
    again = as_uid_10001(lambda: write_h5_as_stage(mnt))
    assert again == {"same": True, "uid": 10001, "files": ["1-model.h5", "during-restart.bin"]}
    assert "retrying" in log.read_text()
