"""Every script handles its arguments before doing anything: `--help` prints its usage (the header comment)
to stdout and exits 0, an unknown argument exits 2 with one line on stderr — and neither touches the
machine. Checked with stand-in tools first on PATH that record any call (so a script that would install,
build or talk to a cluster is caught instead of doing it), and with VENV/WORK_DIR/CHECKOV_VENV pointing
into a temp dir that must stay empty."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What users run (scripts/), the test harnesses (tests/policy-check.sh, tests/e2e/) and the benchmarks.
LIBRARY = REPO / "scripts" / "lib.sh"  # sourced by the scripts (their --help and unknown arguments), not run
SHELL_SCRIPTS = sorted(p for p in (REPO / "scripts").glob("*.sh") if p != LIBRARY) + sorted(REPO.glob("tests/**/*.sh"))
PY_SCRIPTS = sorted(p for folder in ("scripts", "benchmarks", "tests/e2e") for p in (REPO / folder).glob("*.py")
                    if "argparse" in p.read_text() or "from mlkcommon import Parser" in p.read_text())
FAKES = ("kubectl", "podman", "docker", "gcloud", "apt-get", "kind", "minikube", "go", "debootstrap", "helm",
         "python3")
ids = lambda p: p.relative_to(REPO).as_posix()  # noqa: E731


@pytest.fixture
def sandbox(tmp_path):
    """(env, calls file, dir that must stay empty): fakes first on PATH, the scripts' state pointed at tmp."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for name in FAKES:
        fake = bin_dir / name
        fake.write_text(f'#!/usr/bin/env bash\nprintf \'%s %s\\n\' {name} "$*" >>"{calls}"\nexit 0\n')
        fake.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", VENV=str(state / "venv"),
               WORK_DIR=str(state / "work"), CHECKOV_VENV=str(state / "checkov"), PYTHON=str(bin_dir / "python3"),
               CI="", SKIP_E2E="1")
    return env, calls, state


def run(cmd, env, timeout=60):
    """Run in its own process group, killed whole on a timeout (a script that ignored --help may have
    started children)."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} still running after {timeout} s (it ignored its argument?)\n{out[-2000:]}\n{err[-2000:]}")
    return proc.returncode, out, err


def header(script):
    """The header comment (after the #! line, up to the first non-comment line), '# ' removed."""
    lines = []
    for line in script.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return lines


def untouched(calls, state):
    called = calls.read_text() if calls.exists() else ""
    assert called == "", f"called: {called}"
    assert list(state.iterdir()) == []


def test_every_script_is_covered():
    shell = {ids(p) for p in SHELL_SCRIPTS}
    assert {"scripts/bootstrap.sh", "scripts/test.sh", "scripts/render.sh", "scripts/quickstart.sh",
            "tests/policy-check.sh", "tests/e2e/e2e-containers.sh", "tests/e2e/make-base-image.sh"} <= shell
    assert {"benchmarks/benchmark-pipeline.py", "benchmarks/benchmark-server.py", "benchmarks/original_method.py",
            "tests/e2e/e2e_pod.py", "scripts/make-samples.py"} <= {ids(p) for p in PY_SCRIPTS}


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=ids)
def test_help_prints_the_header_and_does_nothing(script, flag, sandbox):
    env, calls, state = sandbox
    rc, out, err = run([str(script), flag], env)
    assert rc == 0, err
    first = next(line for line in header(script) if line.strip())
    assert first.strip() in out, f"usage (the header comment) not on stdout:\n{out}"
    assert err == ""
    untouched(calls, state)


# test.sh hands every argument but -h/--help to pytest (scripts/test.sh -k splitter), so it has no unknown ones.
@pytest.mark.parametrize("script", [s for s in SHELL_SCRIPTS if s.name != "test.sh"], ids=ids)
def test_unknown_argument_exits_2_with_one_line(script, sandbox):
    env, calls, state = sandbox
    rc, out, err = run([str(script), "--bogus"], env)
    assert rc == 2, f"exit {rc}\n{out}\n{err}"
    assert len(err.splitlines()) == 1 and err.strip(), f"stderr should be one line:\n{err}"
    assert out == ""
    untouched(calls, state)


def images_env(name):
    """An array of scripts/images.env, as bash sees it."""
    proc = subprocess.run(["bash", "-c", f'source scripts/images.env && printf "%s\\n" "${{{name}[@]}}"'], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return proc.stdout.split()


def test_images_are_the_four_stages_and_the_nfs_server():
    assert images_env("STAGES") == ["splitter", "trainer", "aggregator", "server"]
    assert images_env("IMAGES") == images_env("STAGES") + ["nfs-server"]


def test_build_images_refuses_an_unknown_image_before_building(sandbox):
    env, calls, state = sandbox
    rc, out, err = run([str(REPO / "scripts/build-images.sh"), "splitter", "nosuchstage"], env)
    assert rc == 2 and len(err.splitlines()) == 1
    assert "unknown image 'nosuchstage' (images: splitter trainer aggregator server nfs-server)" in err
    untouched(calls, state)


def test_build_images_builds_every_image_by_default_each_from_its_folder(sandbox, tmp_path):
    """No arguments: the four stages and the NFS server, each from <name>/Dockerfile in <name>/, named
    $IMAGE_REGISTRY/<name>:$IMAGE_TAG (a recording engine; nothing is built)."""
    env, calls, state = sandbox
    engine = tmp_path / "engine"
    engine.write_text(f'#!/usr/bin/env bash\nprintf \'%s\\n\' "$*" >>"{calls}"\n'
                      '[[ "$1" != image ]] || echo 123000000\n')
    engine.chmod(0o755)
    env = {k: v for k, v in env.items() if k not in ("BASE_IMAGE", "BUILD_ARGS", "PUSH")}
    rc, out, err = run([str(REPO / "scripts/build-images.sh")],
                       {**env, "CONTAINER_ENGINE": str(engine), "IMAGE_REGISTRY": "reg.example.com/me", "IMAGE_TAG": "7"})
    assert rc == 0, err
    builds = [line.split() for line in calls.read_text().splitlines() if line.startswith("build ")]
    names = ["splitter", "trainer", "aggregator", "server", "nfs-server"]
    assert builds == [["build", "-t", f"reg.example.com/me/{n}:7", "-f", str(REPO / n / "Dockerfile"), str(REPO / n)]
                      for n in names]
    assert "reg.example.com/me/nfs-server:7" in out and "123 MB" in out
    assert list(state.iterdir()) == []


def test_render_takes_files_and_refuses_options(sandbox, tmp_path):
    env, _, _ = sandbox
    manifest = tmp_path / "cm.yaml"
    manifest.write_text("kind: ConfigMap\n")
    rc, out, _ = run([str(REPO / "scripts/render.sh"), str(manifest)], env)
    assert rc == 0 and out == "kind: ConfigMap\n"
    rc, out, err = run([str(REPO / "scripts/render.sh"), str(manifest), "-x"], env)
    assert rc == 2 and out == "" and "unknown option '-x'" in err


@pytest.mark.parametrize("script", PY_SCRIPTS, ids=ids)
def test_python_scripts_help_and_unknown_argument(script, sandbox):
    env, calls, state = sandbox
    rc, out, err = run([sys.executable, str(script), "-h"], env)
    assert rc == 0 and out.startswith("usage:"), err
    rc, out, err = run([sys.executable, str(script), "--bogus"], env)
    assert rc == 2 and out == "" and "error:" in err.splitlines()[-1]
    untouched(calls, state)


# --- tests/e2e/e2e-containers.sh --print-containers-conf: the podman settings the machine gets ----------

E2E = REPO / "tests" / "e2e" / "e2e-containers.sh"


def settings(text):
    """{key: value} of a containers.conf's settings (comments, blank lines and [tables] left out)."""
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and line[0] not in "#[")
    return {k.strip(): v.strip() for k, v in pairs}


def cgroup_v2():
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    return any(m[1] == "/sys/fs/cgroup" and m[2] == "cgroup2" for m in mounts)


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
def test_e2e_containers_conf_modes(mode, sandbox):
    env, calls, state = sandbox
    env.pop("CONTAINERS_CONF", None)
    rc, out, err = run([str(E2E), "--print-containers-conf"], dict(env, E2E_CONTAINERS_CONF=mode))
    assert rc == 0 and err == "", err
    ci = (REPO / ".ci/containers.conf").read_text()
    if mode == "always":
        assert out == ci
    elif mode == "never":
        assert out == ""
    else:  # only settings .ci/containers.conf holds, and runc exactly where the cgroups are not v2
        got = settings(out)
        assert set(got) <= set(settings(ci))
        assert (got.get("runtime") == '"runc"') == (not cgroup_v2())
        assert (got.get("cgroup_manager") == '"cgroupfs"') == (not Path("/run/systemd/system").is_dir())
        if os.geteuid() != 0:
            assert "default_ulimits" not in got  # rootless containers keep the user's limits
    untouched(calls, state)


def test_e2e_explicit_containers_conf_is_used_as_it_is(sandbox, tmp_path):
    env, calls, state = sandbox
    conf = tmp_path / "mine.conf"
    conf.write_text('[engine]\nruntime = "crun"\n')
    rc, out, _ = run([str(E2E), "--print-containers-conf"], dict(env, CONTAINERS_CONF=str(conf)))
    assert rc == 0 and out == conf.read_text()
    untouched(calls, state)


def test_e2e_refuses_an_unknown_containers_conf_mode(sandbox):
    env, calls, state = sandbox
    rc, out, err = run([str(E2E), "--print-containers-conf"], dict(env, E2E_CONTAINERS_CONF="sometimes"))
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and "auto, always or never" in err
    untouched(calls, state)
