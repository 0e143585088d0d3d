"""The Kubernetes manifests: rendered they validate against the newest Kubernetes schema that
kubernetes-validate knows (strict); the original README's sed commands leave no placeholder; the
hardening the issue asks for is there; and the contract: every stage container's command and args,
as Kubernetes would run them (env and $(VAR) expanded), are accepted by the program the image runs,
and the whole chain splitter -> trainers -> aggregator -> accuracy test (and the server's probes)
works with those exact args on a tiny synthetic dataset, /mnt mapped to a temp dir."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

import kubernetes_validate

from helpers import SCRIPT_SETTINGS, clean_env, free_port, placeholder_samples

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
RENDER = REPO / "scripts" / "render.sh"
FILES = sorted(MANIFESTS.glob("*.yaml")) + sorted((MANIFESTS / "variants").glob("*.yaml"))
PLACEHOLDERS = placeholder_samples()  # scripts/images.env: the one list of {{NAME}}s, with sample values
VALUES = {**PLACEHOLDERS, "INCREMENTAL_NUMBER": "1"}  # the tests below look at trainer 1
STAGE_IMAGE = re.compile(r"^localhost/mlk/(splitter|trainer|aggregator|server):0\.1\.0$")
NFS_IMAGE = "localhost/mlk/nfs-server:0.1.0"  # nfs-server/: the project's NFS-Ganesha image
NFS_FILES = (MANIFESTS / "1-nfs-deployment.yaml", MANIFESTS / "variants" / "1-nfs-deployment-pvc.yaml")
# What the NFS server adds after dropping ALL (manifests/1-nfs-deployment.yaml says why, one comment each).
NFS_CAPABILITIES = ["DAC_READ_SEARCH", "SETUID", "SETGID", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID"]
# checkov checks the NFS server skips (annotations on its Deployment): root, and the added capabilities.
NFS_CHECKOV_SKIPS = {"CKV_K8S_23", "CKV_K8S_40", "CKV_K8S_6", "CKV_K8S_37", "CKV_K8S_25"}

# The original README's commands, per file (kubectl apply -f FILE for the rest), the documented one
# for the new Indexed alternative, and the same kind of sed for the files with placeholders the original
# did not have (the GCE disk's project and zone; the nodes' range, with | since it holds a /).
ORIGINAL_SED = {
    "1-nfs-deployment.yaml": "s/{{GCE_PROJECT}}/my-project/g; s/{{GCE_DISK_ZONE}}/us-central1-a/g; s/{{NAMESPACE}}/default/g",
    "2-nfs-networkpolicy.yaml": "s|{{NODE_CIDR}}|10.128.0.0/20|g",
    "3-nfs-pv-pvc.yaml": "s/{{NFS_CLUSTER_IP}}/10.96.0.42/g; s/{{NAMESPACE}}/default/g",
    "4-splitter.yaml": "s/{{WORKER_NUMBER}}/3/g",
    "5-trainer.yaml": "s/{{EPOCH}}/2/g; s/{{BATCH}}/100/g; s/{{INCREMENTAL_NUMBER}}/0/g;",
    "5-trainer-indexed.yaml": "s/{{WORKER_NUMBER}}/3/g; s/{{EPOCH}}/2/g; s/{{BATCH}}/100/g;",
}


def render(*files, **env_overrides):
    env = clean_env()
    env.update(VALUES)
    env.update(env_overrides)
    return subprocess.run(["bash", str(RENDER), *map(str, files)], env=env, capture_output=True, text=True)


def docs_of(path, **env):
    proc = render(path, **env)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def pod_spec(doc):
    if doc["kind"] == "Pod":
        return doc["spec"]
    return doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "Job") else None


def all_docs():
    return [(f, d) for f in FILES for d in docs_of(f)]


def workloads():
    return [(f, d) for f, d in all_docs() if pod_spec(d)]


# --- schema and rendering -------------------------------------------------------------------------

def test_the_manifests_are_the_originals_and_more():
    names = {f.name for f in MANIFESTS.glob("*.yaml")}
    assert names == {"1-nfs-deployment.yaml", "2-nfs-service.yaml", "2-nfs-networkpolicy.yaml", "3-nfs-pv-pvc.yaml",
                     "4-splitter.yaml", "5-trainer.yaml", "5-trainer-indexed.yaml", "6-aggregator.yaml", "7-server.yaml",
                     "8-server-pdb.yaml", "9999-busybox.yaml", "9999-accuracy-test.yaml", "9999-dataset-upload.yaml",
                     "9999-ledger-restore.yaml"}
    assert sorted(f.name for f in (MANIFESTS / "variants").glob("*.yaml")) == ["1-nfs-deployment-pvc.yaml",
                                                                                "3-rwx-pvc.yaml"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_rendered_manifest_validates_strict_on_newest_kubernetes(path):
    version = kv_utils.latest_version()
    assert tuple(map(int, version.split("."))) >= (1, 33)
    docs = docs_of(path)
    assert docs
    for doc in docs:
        # raises ValidationError (unknown fields in strict mode, wrong types, missing required)
        assert kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_would_catch_a_mistake():
    doc = docs_of(MANIFESTS / "5-trainer.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["arg"] = ["--typo"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kv_utils.latest_version(), strict=True)


@pytest.mark.parametrize("path", sorted(MANIFESTS.glob("*.yaml")), ids=lambda p: p.name)
def test_original_sed_commands_leave_no_placeholder(path):
    expr = ORIGINAL_SED.get(path.name)
    text = subprocess.run(["sed", expr, str(path)], capture_output=True, text=True, check=True).stdout if expr \
        else path.read_text()
    assert "{{" not in text and "}}" not in text
    docs = [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:  # as applied verbatim, with the default image names
        kubernetes_validate.validate(doc, kv_utils.latest_version(), strict=True)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_manifest_is_valid_yaml_before_rendering(path):
    """No unquoted {{...}} (a YAML flow mapping kubectl cannot read) where a value starts with one."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs and all(isinstance(d, dict) and d.get("kind") for d in docs)


def test_the_render_first_note_is_the_one_file_kubectl_reads_that_no_tool_does():
    """manifests/0-render-first.yml: what `kubectl apply -f manifests/` reads first (its error names what to
    do); .yml, so the project's tools (render.sh, the quickstart, these tests, checkov) read only *.yaml."""
    note = MANIFESTS / "0-render-first.yml"
    doc = yaml.safe_load(note.read_text())
    assert doc["kind"] == "RenderFirst" and doc["apiVersion"].split("/")[0].endswith(".invalid")  # never a real API
    assert sorted(p.name for p in MANIFESTS.iterdir() if p.suffix in (".yml", ".json")) == ["0-render-first.yml"]
    assert sorted(MANIFESTS.glob("*.y*ml"))[0] == note  # kubectl reads a folder in name order
    assert "scripts/render.sh --out" in note.read_text()


def test_the_indexed_trainers_count_is_a_number_after_the_plain_sed():
    text = subprocess.run(["sed", ORIGINAL_SED["5-trainer-indexed.yaml"], str(MANIFESTS / "5-trainer-indexed.yaml")],
                          capture_output=True, text=True, check=True).stdout
    spec = yaml.safe_load(text)["spec"]
    assert spec["completions"] == spec["parallelism"] == 3  # "+3": an int, as the Job API needs


OUT_ENV = {"WORKER_NUMBER": "3", "EPOCH": "2", "BATCH": "100", "NAMESPACE": "team-a", "NFS_CLUSTER_IP": "10.96.0.50",
           "NODE_CIDR": "10.128.0.0/20", "STORAGE_CLASS": "standard-rwx", "GCE_PROJECT": "p", "GCE_DISK_ZONE": "z"}


def render_out(out, *flags, **env):
    clean = clean_env()
    return subprocess.run(["bash", str(RENDER), "--out", str(out), *flags], env={**clean, **env},
                          capture_output=True, text=True)


@pytest.mark.parametrize("backend, files", [
    ("pvc", {"1-nfs-deployment.yaml": "variants/1-nfs-deployment-pvc.yaml", "2-nfs-service.yaml": "2-nfs-service.yaml",
             "2-nfs-networkpolicy.yaml": "2-nfs-networkpolicy.yaml", "3-nfs-pv-pvc.yaml": "3-nfs-pv-pvc.yaml"}),
    ("gce", {"1-nfs-deployment.yaml": "1-nfs-deployment.yaml", "2-nfs-service.yaml": "2-nfs-service.yaml",
             "2-nfs-networkpolicy.yaml": "2-nfs-networkpolicy.yaml", "3-nfs-pv-pvc.yaml": "3-nfs-pv-pvc.yaml"}),
    ("rwx", {"3-rwx-pvc.yaml": "variants/3-rwx-pvc.yaml"}),
])
def test_render_out_writes_one_backends_files_filled_in_apply_order(backend, files, tmp_path):
    files = {**files, "4-splitter.yaml": "4-splitter.yaml", "5-trainer.yaml": "5-trainer-indexed.yaml",
             "6-aggregator.yaml": "6-aggregator.yaml", "7-server.yaml": "7-server.yaml",
             "8-server-pdb.yaml": "8-server-pdb.yaml"}
    out = tmp_path / "out"
    proc = render_out(out, "--backend", backend, **OUT_ENV)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert f"next: kubectl apply -f {out}" in proc.stderr
    version = kv_utils.latest_version()
    for name, source in files.items():
        text = (out / name).read_text()
        assert "{{" not in text, name
        docs = [d for d in yaml.safe_load_all(text) if d]
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
        alone = docs_of(MANIFESTS / source, **OUT_ENV)
        if name == "2-nfs-service.yaml":  # the address the PV names, so that one apply creates both
            assert docs[0]["spec"].pop("clusterIP") == "10.96.0.50"
        assert docs == alone, name
    trainer = yaml.safe_load((out / "5-trainer.yaml").read_text())
    assert trainer["spec"]["completions"] == 3 and trainer["spec"]["completionMode"] == "Indexed"


def test_render_out_leaves_out_the_network_policy_without_node_cidr(tmp_path):
    env = {k: v for k, v in OUT_ENV.items() if k != "NODE_CIDR"}
    proc = render_out(tmp_path / "out", **env)  # pvc: the default backend
    assert proc.returncode == 0, proc.stderr
    assert "leaving out 2-nfs-networkpolicy.yaml (set NODE_CIDR" in proc.stderr
    assert not (tmp_path / "out" / "2-nfs-networkpolicy.yaml").exists()
    assert (tmp_path / "out" / "1-nfs-deployment.yaml").exists()


@pytest.mark.parametrize("case, flags, env, message", [
    ("no address", [], {"NFS_CLUSTER_IP": ""}, "--backend pvc needs NFS_CLUSTER_IP"),
    ("backend", ["--backend", "nfs"], {}, "--backend must be pvc, gce or rwx"),
    ("missing value", [], {"WORKER_NUMBER": ""}, "needs WORKER_NUMBER"),
    ("files too", ["manifests/4-splitter.yaml"], {}, "give no FILE with it"),
    ("not empty", [], {}, "is not empty"),
])
def test_render_out_refuses_and_writes_nothing(case, flags, env, message, tmp_path):
    out = tmp_path / "out"
    if case == "not empty":
        out.mkdir()
        (out / "old.yaml").write_text("kind: ConfigMap\n")
    proc = render_out(out, *flags, **{**OUT_ENV, **env})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "\n" not in proc.stderr.strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if case == "not empty" else [])
    if case == "not empty":
        assert [p.name for p in out.iterdir()] == ["old.yaml"]


def test_render_fills_values_rewrites_images_and_adds_init_model():
    out = render(MANIFESTS / "5-trainer.yaml", MANIFESTS / "3-nfs-pv-pvc.yaml", IMAGE_REGISTRY="reg.example.com:5000/me",
                 IMAGE_TAG="2.0", INIT_MODEL="/mnt/aggregated-model.h5")
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert [d["kind"] for d in docs] == ["Job", "PersistentVolume", "PersistentVolumeClaim"]
    c = docs[0]["spec"]["template"]["spec"]["containers"][0]
    assert docs[0]["metadata"]["name"] == "mnist-trainer-1"
    assert c["image"] == "reg.example.com:5000/me/trainer:2.0"
    assert c["args"] == ["--data", "/mnt/data/1.npz", "--epoch", "2", "--batch", "100", "--threads", "$(CPU_LIMIT)",
                         "--wait-data", "1800", "--savemodel", "/mnt/model/1-model.h5", "--init-model", "/mnt/aggregated-model.h5"]
    assert docs[1]["spec"]["nfs"]["server"] == "10.96.0.42"
    assert "{{" not in out.stdout


def test_round_one_trainers_record_the_start_weights_and_later_rounds_start_from_the_aggregate():
    """Round 1 (no INIT_MODEL): --save-init /mnt/rounds/r0.h5, the round ledger's start weights; with
    INIT_MODEL render.sh puts --init-model in its place (a later round has its start in rounds/r{n-1}.h5)."""
    for path in (MANIFESTS / "5-trainer.yaml", MANIFESTS / "5-trainer-indexed.yaml"):
        [job] = docs_of(path)
        args = pod_spec(job)["containers"][0]["args"]
        assert args[-4:-2] == ["--savemodel", args[args.index("--savemodel") + 1]] and args[-2:] == [
            "--save-init", "/mnt/rounds/r0.h5"], path.name
        [job] = docs_of(path, INIT_MODEL="/mnt/aggregated-model.h5")
        args = pod_spec(job)["containers"][0]["args"]
        assert "--save-init" not in args and args[-2:] == ["--init-model", "/mnt/aggregated-model.h5"], path.name


def test_render_adds_the_round_deadline_and_minimum_workers_to_the_aggregator():
    [job] = docs_of(MANIFESTS / "6-aggregator.yaml")
    plain = pod_spec(job)["containers"][0]["args"]
    assert plain == ["--dir", "/mnt/model", "--savefile", "/mnt/aggregated-model.h5", "--expect", "$(WORKER_NUMBER)"]
    [job] = docs_of(MANIFESTS / "6-aggregator.yaml", MIN_WORKERS="2", ROUND_DEADLINE="900")
    assert pod_spec(job)["containers"][0]["args"] == plain + ["--min-workers", "2", "--deadline", "900"]
    assert job["spec"]["activeDeadlineSeconds"] == 4200
    [job] = docs_of(MANIFESTS / "6-aggregator.yaml", MIN_WORKERS="0.67")
    assert pod_spec(job)["containers"][0]["args"] == plain + ["--min-workers", "0.67"]
    # A deadline past the aggregator's default wait (3600 s; it waits the longer of the two) lengthens the
    # Job's deadline.
    [job] = docs_of(MANIFESTS / "6-aggregator.yaml", ROUND_DEADLINE="7200")
    assert pod_spec(job)["containers"][0]["args"] == plain + ["--deadline", "7200"]
    assert job["spec"]["activeDeadlineSeconds"] == 7800
    _, program, args = argv_of(pod_spec(job)["containers"][0], {"mnist-config": {"WORKER_NUMBER": "3"}})
    parsed = load_parser(program).parse_args(args)
    assert job["spec"]["activeDeadlineSeconds"] >= max(parsed.timeout, parsed.deadline) + 300
    # ... of the aggregator only
    for path in (MANIFESTS / "5-trainer.yaml", MANIFESTS / "4-splitter.yaml", MANIFESTS / "9999-accuracy-test.yaml"):
        assert render(path, MIN_WORKERS="2", ROUND_DEADLINE="7200").stdout == render(path).stdout, path.name


@pytest.mark.parametrize("env, message", [
    ({"MIN_WORKERS": "0"}, "MIN_WORKERS must be a whole number >= 1 or a fraction between 0 and 1"),
    ({"MIN_WORKERS": "1.5"}, "MIN_WORKERS must be a whole number >= 1 or a fraction between 0 and 1"),
    ({"MIN_WORKERS": "two"}, "got 'two'"),
    ({"ROUND_DEADLINE": "0"}, "ROUND_DEADLINE must be a whole number of seconds >= 1, got '0'"),
    ({"ROUND_DEADLINE": "1h"}, "ROUND_DEADLINE must be a whole number of seconds >= 1, got '1h'"),
])
def test_render_refuses_a_bad_minimum_or_deadline(env, message):
    out = render(MANIFESTS / "6-aggregator.yaml", **env)
    assert out.returncode == 2 and out.stdout == ""
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_the_accuracy_test_fills_the_ledger_and_the_restore_job_reads_it():
    """The accuracy test scores every round of the ledger (its history and plot go to the volume); the
    RESUME restore Job runs ledger.py from the aggregator image on the volume's root."""
    [job] = docs_of(MANIFESTS / "9999-accuracy-test.yaml")
    args = pod_spec(job)["containers"][0]["args"]
    assert args[args.index("--ledger") + 1] == "/mnt/rounds/ledger.json"
    [job] = docs_of(MANIFESTS / "9999-ledger-restore.yaml")
    c = pod_spec(job)["containers"][0]
    assert c["image"] == "localhost/mlk/aggregator:0.1.0"
    assert c["command"] == ["python", "/app/ledger.py"] and c["args"] == ["restore", "--dir", "/mnt"]
    # the aggregator writes its --savefile's ROOT/rounds/: the restore's --dir is that ROOT
    by_name, configmaps = rendered_set(3)
    _, _, args = argv_of(pod_spec(by_name["mnist-aggregator"])["containers"][0], configmaps)
    assert str(Path(args[args.index("--savefile") + 1]).parent) == c["args"][2]
    assert re.search(r"^COPY\b.*\bledger\.py\b.*/app/$", (REPO / "aggregator" / "Dockerfile").read_text(), re.M), \
        "the aggregator image does not contain /app/ledger.py"


def test_an_own_registry_serves_every_image_busybox_and_nfs_server_included():
    """Private and air-gapped registries: with IMAGE_REGISTRY set, no manifest names another registry."""
    files = sorted(MANIFESTS.glob("*.yaml")) + sorted((MANIFESTS / "variants").glob("*.yaml"))
    out = render(*files, IMAGE_REGISTRY="reg.example.com:5000/me", IMAGE_TAG="2.0")
    assert out.returncode == 0, out.stderr
    images = {c["image"] for d in yaml.safe_load_all(out.stdout) if d
              for c in (pod_spec(d) or {}).get("containers", []) + (pod_spec(d) or {}).get("initContainers", [])}
    assert "reg.example.com:5000/me/nfs-server:2.0" in images and "reg.example.com:5000/me/busybox:1.37.0" in images
    assert all(i.startswith("reg.example.com:5000/me/") for i in images), images
    default = render(MANIFESTS / "9999-busybox.yaml")
    assert "image: docker.io/library/busybox:1.37.0" in default.stdout


def test_render_default_images_unchanged_and_files_separated():
    out = render(MANIFESTS / "6-aggregator.yaml", MANIFESTS / "7-server.yaml")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n---\n") >= 2
    assert "image: localhost/mlk/aggregator:0.1.0" in out.stdout and "image: localhost/mlk/server:0.1.0" in out.stdout


@pytest.mark.parametrize("env, message", [
    ({"EPOCH": ""}, "5-trainer.yaml needs EPOCH"),
    ({"BATCH": "1; rm"}, "BATCH='1; rm' has characters"),
    ({"IMAGE_TAG": "a b"}, "IMAGE_TAG='a b' has characters"),
])
def test_render_refuses_missing_or_unsafe_values(env, message):
    out = render(MANIFESTS / "5-trainer.yaml", **env)
    assert out.returncode == 2 and out.stdout == ""
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_the_placeholder_list_is_exactly_what_the_manifests_use():
    """scripts/images.env's PLACEHOLDERS names every {{NAME}} in manifests/ and nothing else (render.sh
    fills only the listed names, so one missing from the list would be left in the output)."""
    used = {name for f in FILES for name in re.findall(r"{{(\w+)}}", f.read_text())}
    assert used == set(PLACEHOLDERS), f"in the manifests, not listed: {used - set(PLACEHOLDERS)}; " \
        f"listed, not in the manifests: {set(PLACEHOLDERS) - used}"
    assert {"NODE_CIDR", "GCE_PROJECT", "GCE_DISK_ZONE"} <= used  # the NFS server's policy and GCE disk


def test_render_usage_and_help_name_every_placeholder():
    """render.sh's usage line (built from the list) and its header, which --help prints, name them all."""
    usage = render().stderr
    header = RENDER.read_text().split("\nset -euo pipefail")[0]
    for name in PLACEHOLDERS:
        assert "{{%s}}" % name in usage, name
        assert name in header, f"scripts/render.sh's header (its --help) does not name {name}"


def test_render_refuses_missing_file_and_no_arguments(tmp_path):
    out = render(tmp_path / "nope.yaml")
    assert out.returncode == 2 and "no such file" in out.stderr
    out = render()
    assert out.returncode == 2 and "usage" in out.stderr


# --- what the issue asks of the objects -------------------------------------------------------------

def test_hardening_resources_and_images():
    seen = set()
    for path, doc in workloads():
        spec = pod_spec(doc)
        name = f"{path.name}:{doc['metadata']['name']}"
        nfs = doc["metadata"]["name"] == "nfs-server"
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        if not nfs:
            for key, value in {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}.items():
                assert spec["securityContext"][key] == value, (name, key)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            cname = f"{name}/{c['name']}"
            seen.add(c["image"])
            assert set(c["resources"]["requests"]) == {"cpu", "memory"}, cname
            assert set(c["resources"]["limits"]) == {"cpu", "memory"}, cname
            assert c["imagePullPolicy"] == "IfNotPresent", cname
            assert re.search(r":[0-9][\w.-]*$", c["image"]), f"{cname}: image tag must be pinned"
            sc = c["securityContext"]
            # every container, the NFS server's included: no escalation, nothing kept, read-only root
            assert "privileged" not in sc, cname
            assert sc["allowPrivilegeEscalation"] is False, cname
            assert sc["capabilities"]["drop"] == ["ALL"], cname
            assert sc["readOnlyRootFilesystem"] is True, cname
            if nfs:
                assert c["image"] == NFS_IMAGE, cname
                # what it writes besides the export is in emptyDirs (the root file system is read-only)
                scratch = [m for m in c["volumeMounts"] if m["mountPath"] != "/exports"]
                assert {"/var/lib/nfs/ganesha", "/run/ganesha"} <= {m["mountPath"] for m in scratch}, cname
                assert all("emptyDir" in volumes[m["name"]] for m in scratch), cname
            if STAGE_IMAGE.match(c["image"]) and c["name"] not in ("clear-models", "upload"):  # no Python libraries
                # TensorFlow/Keras and the MNIST cache need a writable HOME: /tmp, an emptyDir
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("HOME") == "/tmp", cname
                tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in volumes[tmp[0]["name"]], cname
    assert {i for i in seen if STAGE_IMAGE.match(i)} == {f"localhost/mlk/{s}:0.1.0" for s in
                                                         ("splitter", "trainer", "aggregator", "server")}
    # the project's images, and one public image: busybox for the optional shell on the volume
    assert seen - {i for i in seen if STAGE_IMAGE.match(i)} == {NFS_IMAGE, "docker.io/library/busybox:1.37.0"}


def runs_as_root(spec, c):
    """True when the container may run as uid 0: its own or the pod's runAsUser is 0, or neither sets a
    user and runAsNonRoot is not true (the image's USER decides)."""
    pod, own = spec.get("securityContext", {}), c.get("securityContext", {})
    user = own.get("runAsUser", pod.get("runAsUser"))
    non_root = own.get("runAsNonRoot", pod.get("runAsNonRoot"))
    return user == 0 or (user is None and non_root is not True)


def test_nfs_server_is_the_only_root_workload_and_is_not_privileged():
    """The NFS server (NFS-Ganesha, userspace) runs as root with ALL dropped and exactly seven capabilities
    added, each with the reason on its line; not privileged, no host namespaces. It is the only root
    workload; every other container drops ALL and adds nothing."""
    root = set()
    for path, doc in workloads():
        spec = pod_spec(doc)
        name = f"{path.name}:{doc['metadata']['name']}"
        assert not {k for k in spec if k.startswith("host")}, name  # hostNetwork, hostPID, hostIPC, hostUsers
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v], name
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc.get("privileged") is not True, name
            if runs_as_root(spec, c):
                root.add((path.name, doc["metadata"]["name"], c["name"]))
            if doc["metadata"]["name"] != "nfs-server":
                assert sc["capabilities"] == {"drop": ["ALL"]}, f"{name}/{c['name']} adds capabilities"
    assert root == {(p.name, "nfs-server", "nfs-server") for p in NFS_FILES}

    for path in NFS_FILES:
        deployment = [d for d in docs_of(path) if d["kind"] == "Deployment"]
        assert [d["metadata"]["name"] for d in deployment] == ["nfs-server"], path.name
        spec = pod_spec(deployment[0])
        assert "initContainers" not in spec, path.name  # the server itself hands the export to uid 10001
        [c] = spec["containers"]
        sc = c["securityContext"]
        assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (0, 0, False), path.name
        assert sc["capabilities"] == {"drop": ["ALL"], "add": NFS_CAPABILITIES}, path.name
        text = path.read_text()
        for cap in NFS_CAPABILITIES:  # each added capability says why, on its own line
            assert re.search(rf"^\s*- {cap}\s+# \S.{{10,}}$", text, re.M), f"{path.name}: {cap} has no reason"
        # checkov: the root and capability checks are skipped, each with a reason; privileged (CKV_K8S_16),
        # escalation (CKV_K8S_20) and a writable root (CKV_K8S_22) are no longer skipped: they pass.
        skips = {k: v for k, v in deployment[0]["metadata"]["annotations"].items() if k.startswith("checkov.io/skip")}
        checks = {v.split("=", 1)[0]: v.split("=", 1)[1] for v in skips.values()}
        assert set(checks) == NFS_CHECKOV_SKIPS and len(skips) == len(NFS_CHECKOV_SKIPS), (path.name, skips)
        assert all(len(reason) > 20 for reason in checks.values()), checks
        assert "privileged: true" not in text, path.name
    for path in FILES:
        if path not in NFS_FILES:
            assert "privileged" not in path.read_text(), path.name
            assert "checkov.io/skip" not in path.read_text(), path.name


def test_the_two_nfs_server_deployments_are_one():
    """manifests/1-nfs-deployment.yaml (GCE disk) and variants/1-nfs-deployment-pvc.yaml (default class)
    differ only in what is behind claim nfs-server-disk: their Deployments are identical."""
    gce, pvc = ([d for d in yaml.safe_load_all(p.read_text()) if d and d["kind"] == "Deployment"] for p in NFS_FILES)
    assert len(gce) == len(pvc) == 1
    assert gce[0] == pvc[0]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec(gce[0])["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["nfs-server-disk"]
    for path in NFS_FILES:
        [claim] = [d for d in docs_of(path) if d["kind"] == "PersistentVolumeClaim"]
        assert claim["metadata"]["name"] == "nfs-server-disk" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_gce_backend_is_a_static_pd_csi_volume_in_the_disks_zone():
    """The pre-created disk ml-kube-disk as a PersistentVolume of GKE's PD CSI driver (no in-tree
    gcePersistentDisk), its node affinity the disk's zone, bound to claim nfs-server-disk by name."""
    path = MANIFESTS / "1-nfs-deployment.yaml"
    docs = docs_of(path, GCE_PROJECT="proj-42", GCE_DISK_ZONE="europe-west1-b", NAMESPACE="default")
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("PersistentVolume", "mlk-disk-default"), ("PersistentVolumeClaim", "nfs-server-disk"), ("Deployment", "nfs-server")]
    pv, claim, deployment = docs
    assert pv["spec"]["csi"] == {"driver": "pd.csi.storage.gke.io", "fsType": "ext4",
                                 "volumeHandle": "projects/proj-42/zones/europe-west1-b/disks/ml-kube-disk"}
    assert pv["spec"]["nodeAffinity"] == {"required": {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "topology.gke.io/zone", "operator": "In", "values": ["europe-west1-b"]}]}]}}
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"  # the data outlives the objects
    assert pv["spec"]["storageClassName"] == claim["spec"]["storageClassName"] == ""  # static: no provisioner
    assert claim["spec"]["volumeName"] == "mlk-disk-default"  # named after the namespace, bound to its claim only
    assert pv["spec"]["claimRef"] == {"namespace": "default", "name": "nfs-server-disk"}
    assert pv["spec"]["accessModes"] == claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pv["spec"]["capacity"]["storage"] == claim["spec"]["resources"]["requests"]["storage"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # the disk attaches to one node at a time
    assert "nodeSelector" not in pod_spec(deployment)  # the image is not amd64-only any more
    assert "gcePersistentDisk" not in path.read_text()
    for name in ("GCE_PROJECT", "GCE_DISK_ZONE"):
        out = render(path, **{name: ""})
        assert out.returncode == 2 and f"needs {name}" in out.stderr, name


def test_nfs_service_and_server_speak_one_port():
    """NFSv4.1 needs port 2049 only: the Service, the container's port, its probes and Ganesha agree."""
    [svc] = docs_of(MANIFESTS / "2-nfs-service.yaml")
    assert svc["spec"]["ports"] == [{"name": "nfs", "port": 2049, "targetPort": "nfs"}]
    conf = (REPO / "nfs-server" / "ganesha.conf").read_text()
    assert re.search(r"^\s*NFS_Port = 2049;", conf, re.M) and re.search(r"^\s*Protocols = 4;", conf, re.M)
    for path in NFS_FILES:
        [deployment] = [d for d in docs_of(path) if d["kind"] == "Deployment"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), path.name
        [c] = pod_spec(deployment)["containers"]
        assert c["ports"] == [{"name": "nfs", "containerPort": 2049}], path.name
        assert c["readinessProbe"]["tcpSocket"] == c["livenessProbe"]["tcpSocket"] == {"port": "nfs"}, path.name


def test_nfs_network_policy_admits_only_the_nodes_and_the_projects_pods_on_2049():
    path = MANIFESTS / "2-nfs-networkpolicy.yaml"
    assert 'cidr: "{{NODE_CIDR}}"' in path.read_text()  # quoted: the unrendered file is valid YAML too
    [policy] = docs_of(path, NODE_CIDR="10.20.0.0/16")
    assert (policy["kind"], policy["metadata"]["name"]) == ("NetworkPolicy", "nfs-server")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{
        "from": [{"ipBlock": {"cidr": "10.20.0.0/16"}},
                 {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlk-mnist"}}}],
        "ports": [{"protocol": "TCP", "port": 2049}]}]
    # it selects the NFS server's pods (and only those) ...
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for p, doc in workloads():
        labels = doc["spec"]["template"]["metadata"]["labels"] if doc["kind"] != "Pod" else doc["metadata"]["labels"]
        selected = all(labels.get(k) == v for k, v in selector.items())
        assert selected == (doc["metadata"]["name"] == "nfs-server"), f"{p.name}:{doc['metadata']['name']}"
        # ... and every one of the project's pods carries the label it admits
        assert labels.get("app.kubernetes.io/name") == "mlk-mnist", f"{p.name}:{doc['metadata']['name']}"
    out = render(path, NODE_CIDR="")
    assert out.returncode == 2 and "needs NODE_CIDR" in out.stderr


def test_no_manifest_script_or_dockerfile_names_the_old_nfs_image():
    """registry.k8s.io/volume-nfs:0.8 (privileged, the kernel's nfsd, a schema 1 image containerd 2 refuses)
    and its busybox init container are gone: only prose may still say why they were replaced."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    checked = [f for f in files if f.startswith(("manifests/", "scripts/", "nfs-server/", ".ci/"))
               or Path(f).name == "Dockerfile" or f.endswith(".sh") or f == ".checkov.yaml"]
    assert {"manifests/1-nfs-deployment.yaml", "nfs-server/Dockerfile", "scripts/quickstart.sh"} <= set(checked)
    named = [f for f in checked if (REPO / f).is_file() and "volume-nfs" in (REPO / f).read_text(errors="replace")]
    assert named == [], named
    for path in NFS_FILES:
        assert "busybox" not in path.read_text(), path.name


def test_jobs_retry_and_trainers_spread_preferably():
    jobs = {d["metadata"]["name"]: d for _, d in workloads() if d["kind"] == "Job"}
    assert set(jobs) == {"mnist-splitter", "mnist-trainer-1", "mnist-trainer", "mnist-aggregator", "mnist-accuracy-test",
                         "mnist-ledger-restore"}
    for name, job in jobs.items():
        assert job["spec"].get("backoffLimit", 0) >= 1 or job["spec"].get("backoffLimitPerIndex", 0) >= 1, name
        assert pod_spec(job)["restartPolicy"] == "Never"
    for name in ("mnist-trainer-1", "mnist-trainer"):
        anti = pod_spec(jobs[name])["affinity"]["podAntiAffinity"]
        assert list(anti) == ["preferredDuringSchedulingIgnoredDuringExecution"], name
        term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchExpressions"][0]["values"] == ["trainer"]
        assert jobs[name]["spec"]["template"]["metadata"]["labels"]["job-type"] == "trainer"
    indexed = jobs["mnist-trainer"]["spec"]
    assert indexed["completionMode"] == "Indexed" and indexed["completions"] == indexed["parallelism"] == 3


def test_server_probes_and_load_balancer():
    dep, svc = docs_of(MANIFESTS / "7-server.yaml")
    c = pod_spec(dep)["containers"][0]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port == {"http": 5000, "metrics": 9090}
    # Prometheus scrapes the internal port (/metrics is served only there); the Service exposes only http
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9090"
    assert "--internal-port" not in c["args"]  # server.py's default, 9090
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # liveness is nginx's own answer (never queued behind uploads), and it exists there
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert "location = /livez {" in (REPO / "server" / "nginx.conf").read_text()
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http"}]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert all(dep["spec"]["template"]["metadata"]["labels"][k] == v for k, v in svc["spec"]["selector"].items())


def test_server_is_sized_as_measured_and_stops_without_losing_a_request():
    import importlib.util

    dep, _ = docs_of(MANIFESTS / "7-server.yaml")
    spec = pod_spec(dep)
    c = spec["containers"][0]
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    # 785 MiB at the peak in the container's cgroup on the real node (a model reloaded and gated beside the
    # served one): the request holds it, the limit leaves room for a larger model
    assert requests["memory"] == "1Gi" and limits["memory"] == "2Gi"
    server_py = importlib.util.spec_from_file_location("server_launcher", REPO / "server" / "server.py")
    launcher = importlib.util.module_from_spec(server_py)
    server_py.loader.exec_module(launcher)
    # one worker a replica, scaled by replicas: as many model processes as the local server's default workers
    workers = int(c["args"][c["args"].index("--workers") + 1])
    assert workers == 1 and int(dep["spec"]["replicas"]) * workers == launcher.DEFAULT_WORKERS
    assert float(limits["cpu"]) >= workers  # one TensorFlow thread per worker, nginx beside them
    # preStop pause, then nginx's drain and gunicorn's graceful stop, all within the grace period
    assert c["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert spec["terminationGracePeriodSeconds"] >= 5 + launcher.DRAIN_SECONDS + launcher.GRACEFUL_TIMEOUT


def test_every_stage_mounts_the_nfs_claim_at_mnt():
    for path, doc in workloads():
        if doc["metadata"]["name"] == "nfs-server":
            continue
        spec = pod_spec(doc)
        claims = {v["name"] for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "nfs"}
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert any(m["mountPath"] == "/mnt" and m["name"] in claims for m in c["volumeMounts"]), path.name


def jobs_by_name():
    return {d["metadata"]["name"]: d for _, d in workloads() if d["kind"] == "Job"}


def test_jobs_fail_at_once_on_bad_input_and_ignore_disruptions():
    """podFailurePolicy: a pod disrupted by the cluster (eviction, preemption, drain) is replaced without
    counting against the retry limit; exit code 2 of the stage's program (bad input) fails the Job at once,
    or for the Indexed trainer only that index. Any other failure is retried up to the backoff limit."""
    jobs = jobs_by_name()
    for name, job in jobs.items():
        spec = job["spec"]
        main = pod_spec(job)["containers"][0]["name"]
        indexed = spec.get("completionMode") == "Indexed"
        assert pod_spec(job)["restartPolicy"] == "Never", name  # podFailurePolicy requires it
        assert spec["podFailurePolicy"] == {"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            {"action": "FailIndex" if indexed else "FailJob",
             "onExitCodes": {"containerName": main, "operator": "In", "values": [2]}},
        ]}, name
        if indexed:  # FailIndex needs a per-index backoff limit
            assert spec["backoffLimitPerIndex"] >= 1


def test_jobs_have_deadlines_that_fit_their_work():
    jobs = jobs_by_name()
    deadlines = {name: job["spec"]["activeDeadlineSeconds"] for name, job in jobs.items()}
    assert deadlines == {"mnist-splitter": 1800, "mnist-trainer-1": 7200, "mnist-trainer": 7200,
                         "mnist-aggregator": 4200, "mnist-accuracy-test": 900, "mnist-ledger-restore": 600}
    # The aggregator waits up to --timeout for the models (--expect): its deadline must outlast the wait.
    by_name, configmaps = rendered_set(3)
    _, program, args = argv_of(pod_spec(by_name["mnist-aggregator"])["containers"][0], configmaps)
    parsed = load_parser(program).parse_args(args)
    assert parsed.expect == 3 and deadlines["mnist-aggregator"] >= parsed.timeout + 300


def test_every_container_that_opens_h5_files_disables_hdf5_file_locking():
    """The models are .h5 files on the shared NFS/RWX volume, where HDF5's file locks (flock) fail or
    linger after a killed pod; no two stages write one file (each writes a temp name, then renames)."""
    seen = set()
    for path, doc in workloads():
        spec = pod_spec(doc)
        for c in spec.get("initContainers", []) + spec["containers"]:
            stage = STAGE_IMAGE.match(c["image"])
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if stage and stage.group(1) in ("trainer", "aggregator", "server"):  # h5py/Keras read or write .h5
                assert env.get("HDF5_USE_FILE_LOCKING") == "FALSE", f"{path.name}:{c['name']}"
                seen.add(f"{doc['metadata']['name']}/{c['name']}")
    assert seen == {"mnist-trainer-1/mnist-trainer-job", "mnist-trainer/mnist-trainer-job",
                    "mnist-aggregator/mnist-aggregator", "mnist-accuracy-test/accuracy-test",
                    "mnist-server/mnist-server", "mnist-ledger-restore/ledger-restore"}


def test_trainers_threads_are_their_cpu_limit():
    jobs = jobs_by_name()
    for name in ("mnist-trainer-1", "mnist-trainer"):
        c = pod_spec(jobs[name])["containers"][0]
        args = c["args"]
        assert args[args.index("--threads") + 1] == "$(CPU_LIMIT)", name
        env = {e["name"]: e for e in c["env"]}
        assert env["CPU_LIMIT"]["valueFrom"] == {"resourceFieldRef": {
            "containerName": c["name"], "resource": "limits.cpu", "divisor": "1"}}, name
        assert container_env(c, {}, {})["CPU_LIMIT"] == "2"  # limits.cpu "2"
    # the kubelet rounds a fractional limit up to whole CPUs (divisor "1")
    c = {"name": "x", "resources": {"limits": {"cpu": "500m"}}}
    assert resource_field(c, {"resource": "limits.cpu", "divisor": "1"}) == "1"
    c["resources"]["limits"]["cpu"] = "2500m"
    assert resource_field(c, {"containerName": "x", "resource": "limits.cpu", "divisor": "1"}) == "3"


def test_nfs_pv_mounts_the_servers_v41_export_hard():
    """The PV mounts /exports, where Ganesha puts its one export in the NFSv4 namespace (Pseudo), with
    NFSv4.1 stated (the server offers nothing else) and hard (operations wait through a server restart)."""
    pv, pvc = docs_of(MANIFESTS / "3-nfs-pv-pvc.yaml")
    assert pv["kind"] == "PersistentVolume" and pv["spec"]["nfs"] == {"server": "10.96.0.42", "path": "/exports"}
    assert pv["spec"]["mountOptions"] == ["nfsvers=4.1", "hard"]
    conf = (REPO / "nfs-server" / "ganesha.conf").read_text()
    assert re.search(r"^\s*Pseudo = /exports;", conf, re.M) and re.search(r"^\s*Minor_Versions = 1;", conf, re.M)
    text = (MANIFESTS / "3-nfs-pv-pvc.yaml").read_text()
    assert "HDF5_USE_FILE_LOCKING" in text and "hard:" in text  # the reasons are next to the options


def test_nfs_pv_belongs_to_one_namespace_and_its_claim():
    """PersistentVolumes are cluster-wide: the NFS one is named after the run's namespace and bound to
    that namespace's claim nfs only, so a second namespace neither takes nor deletes it."""
    pv, pvc = docs_of(MANIFESTS / "3-nfs-pv-pvc.yaml", NAMESPACE="team-a")
    assert pv["metadata"]["name"] == "mlk-nfs-team-a" == pvc["spec"]["volumeName"]
    assert pv["spec"]["claimRef"] == {"namespace": "team-a", "name": "nfs"} and pvc["metadata"]["name"] == "nfs"


def test_rwx_backend_is_one_readwritemany_claim_named_nfs_of_the_chosen_class():
    path = MANIFESTS / "variants" / "3-rwx-pvc.yaml"
    assert '"{{STORAGE_CLASS}}"' in path.read_text()  # quoted: the unrendered file is valid YAML too
    [claim] = docs_of(path, STORAGE_CLASS="enterprise-rwx")
    _, nfs_claim = docs_of(MANIFESTS / "3-nfs-pv-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"] == nfs_claim["metadata"]  # name nfs, labels
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "enterprise-rwx",
                             "resources": {"requests": {"storage": "10Gi"}}}
    assert claim["spec"]["resources"] == nfs_claim["spec"]["resources"]
    text = path.read_text()
    assert "fsGroup" in text and "fsGroupPolicy" in text  # how uid 10001 gets write access is explained
    out = render(path, STORAGE_CLASS="")
    assert out.returncode == 2 and "needs STORAGE_CLASS" in out.stderr


def test_the_stages_prepare_an_unprepared_volume_themselves(tmp_path):
    """The rwx backend has no NFS server making /mnt/data and /mnt/model (nfs-server/start.sh does, for pvc
    and gce): the splitter's clear-models init container makes /mnt/model (the aggregator's --dir, which
    must exist), the splitter its --savedir, the trainer its --savemodel's folder (tests/test_trainer.py),
    and the aggregator writes into /mnt itself."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rng = np.random.default_rng(0)
    dataset = tmp_path / "mnist.npz"
    np.savez(dataset, x_train=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), y_train=np.arange(20, dtype=np.uint8) % 10,
             x_test=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), y_test=np.arange(5, dtype=np.uint8) % 10)
    by_name, configmaps = rendered_set(2)
    splitter = pod_spec(by_name["mnist-splitter"])
    env = {**os.environ, "MNIST_NPZ": str(dataset), "HOME": str(tmp_path / "home")}
    (mnt / "rounds/r1").mkdir(parents=True)  # a previous run's round ledger: a new run starts its own
    (mnt / "rounds/ledger.json").write_text("{}")
    _, _, inline = argv_of(splitter["initContainers"][0], configmaps)
    subprocess.run([sys.executable, "-c", inline[1].replace("/mnt/", f"{mnt}/")], env=env, check=True, timeout=60)
    assert not (mnt / "rounds").exists()
    _, program, args = argv_of(splitter["containers"][0], configmaps)
    subprocess.run([sys.executable, str(program), *[a.replace("/mnt", str(mnt)) for a in args]], env=env, check=True,
                   capture_output=True, timeout=120)
    assert sorted(p.name for p in mnt.iterdir()) == ["data", "model"]
    assert sorted(p.name for p in (mnt / "data").iterdir()) == ["0.npz", "1.npz", "test.npz"]
    aggregator = pod_spec(by_name["mnist-aggregator"])["containers"][0]
    _, _, args = argv_of(aggregator, configmaps)
    assert Path(args[args.index("--savefile") + 1]).parent == Path("/mnt")  # the mount point: always there


# --- contract: the programs accept, and work with, exactly what the manifests run ------------------

def entrypoint(stage):
    """The stage image's ENTRYPOINT as its Dockerfile declares it (exec form)."""
    text = (REPO / stage / "Dockerfile").read_text()
    found = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert found, f"{stage}/Dockerfile has no exec-form ENTRYPOINT"
    return json.loads(found[-1])


def expand(value, env):
    """Kubernetes' $(VAR) expansion in command/args; an unresolvable reference fails the test."""
    def sub(m):
        assert m.group(1) in env, f"$({m.group(1)}) is not defined in the container's env"
        return env[m.group(1)]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def cpu_millis(quantity):
    """A CPU quantity ("2", "500m", "1.5") in millicores."""
    q = str(quantity)
    return int(q[:-1]) if q.endswith("m") else round(float(q) * 1000)


def resource_field(c, ref):
    """The downward API's resourceFieldRef for a CPU limit, as the kubelet computes it: the limit divided
    by the divisor, rounded up (a fractional limit becomes the next whole CPU with divisor "1")."""
    assert ref.get("containerName", c["name"]) == c["name"], f"{c['name']}: refers to another container"
    assert ref["resource"] == "limits.cpu", ref  # the only one the manifests use
    limit = c["resources"]["limits"]["cpu"]  # no limit would mean the node's allocatable CPUs
    return str(math.ceil(cpu_millis(limit) / cpu_millis(ref.get("divisor", "1"))))


def container_env(c, configmaps, extra):
    env = dict(extra)
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "resourceFieldRef" in e["valueFrom"]:
            env[e["name"]] = resource_field(c, e["valueFrom"]["resourceFieldRef"])
        else:
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = configmaps[ref["name"]][ref["key"]]
    return env


def argv_of(c, configmaps, extra=()):
    """The process the container runs: (stage, repo program path, args), /app mapped to the stage folder."""
    stage = STAGE_IMAGE.match(c["image"]).group(1)
    env = container_env(c, configmaps, dict(extra))
    command = [expand(a, env) for a in (c.get("command") or entrypoint(stage))]
    args = [expand(a, env) for a in c.get("args", [])]
    assert command[0] == "python", command
    if command[1] == "-c":  # an inline program (the splitter's clear-models init container)
        return stage, None, command[1:] + args
    assert command[1].startswith("/app/"), command
    program = REPO / stage / command[1].removeprefix("/app/")
    assert program.is_file(), f"{program} (run by {c['image']}) does not exist"
    return stage, program, command[2:] + args


def load_parser(program):
    spec = importlib.util.spec_from_file_location(f"_contract_{program.parent.name}_{program.stem}", program)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(program.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(program.parent))
    return module.build_parser()


def rendered_set(workers, init_model=None, **more):
    """Every stage container of one run, rendered as the quickstart does, with the ConfigMaps."""
    env = {"WORKER_NUMBER": str(workers), "EPOCH": "1", "BATCH": "32", **more}
    if init_model:
        env["INIT_MODEL"] = init_model
    docs = docs_of(MANIFESTS / "4-splitter.yaml", **env)
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    by_name = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}
    for i in range(workers):
        by_name[f"mnist-trainer-{i}"] = docs_of(MANIFESTS / "5-trainer.yaml", INCREMENTAL_NUMBER=str(i), **env)[0]
    for f in ("6-aggregator.yaml", "9999-accuracy-test.yaml", "5-trainer-indexed.yaml", "7-server.yaml",
              "9999-ledger-restore.yaml"):
        for d in docs_of(MANIFESTS / f, **env):
            if pod_spec(d):
                by_name[d["metadata"]["name"]] = d
    return by_name, configmaps


def test_every_stage_container_args_parse_with_the_programs_own_parser():
    by_name, configmaps = rendered_set(3, init_model="/mnt/aggregated-model.h5", MIN_WORKERS="2", ROUND_DEADLINE="600")
    checked = set()
    for name, doc in by_name.items():
        spec = pod_spec(doc)
        for c in spec.get("initContainers", []) + spec["containers"]:
            extra = {"JOB_COMPLETION_INDEX": "2"} if doc["spec"].get("completionMode") == "Indexed" else {}
            stage, program, args = argv_of(c, configmaps, extra)
            if program is None:
                compile(args[1], "<inline>", "exec")
                continue
            try:
                parsed = load_parser(program).parse_args(args)
            except SystemExit as e:
                pytest.fail(f"{name}/{c['name']}: {program.name} rejects {args} (exit {e.code})")
            checked.add(program.relative_to(REPO).as_posix())
            if name == "mnist-trainer":
                assert parsed.data == "/mnt/data/2.npz" and parsed.savemodel == "/mnt/model/2-model.h5"
            if program.name == "trainer.py":  # limits.cpu "2" -> CPU_LIMIT "2" -> --threads 2
                assert parsed.threads == 2, name
            if name == "mnist-aggregator":
                assert parsed.expect == 3 and parsed.min_workers == 2 and parsed.deadline == 600
    assert checked == {"splitter/splitter.py", "trainer/trainer.py", "trainer/evaluate.py",
                       "aggregator/aggregator.py", "aggregator/ledger.py", "server/server.py"}


@pytest.mark.slow
def test_the_pipeline_runs_with_the_manifests_args(tmp_path):
    """splitter (+ its clear-models init container) -> 2 trainers -> aggregator -> 1 trainer of round 2
    -> accuracy test (filling the round ledger) -> ledger restore -> the server's probe paths, each with its
    container's exact args, /mnt -> tmp."""
    mnt = tmp_path / "mnt"
    (mnt / "model").mkdir(parents=True)
    stale = mnt / "model" / "7-model.h5"
    stale.write_bytes(b"left by an earlier run with more workers")
    stale_progress = [mnt / "model" / "7-model.progress.json", mnt / "aggregated-model.progress.json"]
    for path in stale_progress:  # an earlier run's live progress (issue 32): cleared with its models
        path.write_text("{}")
    rng = np.random.default_rng(0)
    dataset = tmp_path / "mnist.npz"
    np.savez(dataset, x_train=rng.integers(0, 256, (240, 28, 28), dtype=np.uint8),
             y_train=np.arange(240, dtype=np.uint8) % 10,
             x_test=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), y_test=np.arange(50, dtype=np.uint8) % 10)
    env = {k: v for k, v in os.environ.items() if k not in ("MNIST_NPZ",)}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", MNIST_NPZ=str(dataset), HOME=str(tmp_path / "home"),
               CUDA_VISIBLE_DEVICES="")

    def to_tmp(args):
        return [a.replace("/mnt", str(mnt)) if a.startswith("/mnt") or "'/mnt/" in a else a for a in args]

    def run(container, configmaps, extra=(), timeout=300):
        stage, program, args = argv_of(container, configmaps, extra)
        argv = [sys.executable, *(["-c", args[1].replace("/mnt/", f"{mnt}/")] if program is None
                                  else [str(program), *to_tmp(args)])]
        own = {k: v for k, v in container_env(container, configmaps, dict(extra)).items() if k != "HOME"}
        proc = subprocess.run(argv, env={**env, **own}, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{container['name']}: {argv}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        return proc

    by_name, configmaps = rendered_set(2)
    splitter = pod_spec(by_name["mnist-splitter"])
    run(splitter["initContainers"][0], configmaps)
    assert not stale.exists() and not any(path.exists() for path in stale_progress)
    run(splitter["containers"][0], configmaps)
    assert sorted(p.name for p in (mnt / "data").iterdir()) == ["0.npz", "1.npz", "test.npz"]
    for i in range(2):
        run(pod_spec(by_name[f"mnist-trainer-{i}"])["containers"][0], configmaps)
    assert sorted(p.name for p in (mnt / "model").iterdir()) == [  # each beside its live progress (issue 32)
        "0-model.h5", "0-model.progress.json", "1-model.h5", "1-model.progress.json"]
    run(pod_spec(by_name["mnist-aggregator"])["containers"][0], configmaps)
    aggregated = mnt / "aggregated-model.h5"
    assert aggregated.is_file()

    round2, configmaps2 = rendered_set(2, init_model="/mnt/aggregated-model.h5")
    run(pod_spec(round2["mnist-trainer-0"])["containers"][0], configmaps2)
    import h5py
    with h5py.File(mnt / "model" / "0-model.h5", "r") as f:
        assert int(f.attrs["mlk_round"]) == 2

    result = run(pod_spec(by_name["mnist-accuracy-test"])["containers"][0], configmaps)
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(last) >= {"loss", "accuracy"} and 0.0 <= last["accuracy"] <= 1.0
    # The round ledger: round 1's start weights from --save-init, its entry scored by the accuracy test.
    ledger = json.loads((mnt / "rounds" / "ledger.json").read_text())
    [entry] = ledger["rounds"]
    assert entry["start"]["file"] == "rounds/r0.h5" and (mnt / "rounds" / "r0.h5").is_file()
    assert sorted(w["file"] for w in entry["workers"]) == ["0-model.h5", "1-model.h5"]
    assert entry["test_accuracy"] is not None and all(w["accuracy"] is not None for w in entry["workers"])
    assert (mnt / "rounds" / "history.png").read_bytes()[:4] == b"\x89PNG"
    # RESUME's restore Job: round 1 intact, put back as the model round 2 starts from.
    (mnt / "aggregated-model.h5").unlink()
    result = run(pod_spec(by_name["mnist-ledger-restore"])["containers"][0], configmaps)
    import hashlib
    digest = hashlib.sha256((mnt / "rounds" / "r1.h5").read_bytes()).hexdigest()
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"last_round": 1, "sha256": digest}
    assert hashlib.sha256(aggregated.read_bytes()).hexdigest() == digest

    # The server with its container's args (+ a local port): both probe paths answer 200.
    import requests
    server_c = pod_spec(by_name["mnist-server"])["containers"][0]
    _, program, args = argv_of(server_c, configmaps)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(program), *to_tmp(args), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        codes = {}
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                codes = {p: requests.get(f"http://127.0.0.1:{port}{p}", timeout=10).status_code
                         for p in ("/healthz", "/readyz")}
                if codes == {"/healthz": 200, "/readyz": 200}:
                    break
            except requests.RequestException:  # not listening yet, or busy loading TensorFlow
                pass
            time.sleep(0.5)
        assert codes == {"/healthz": 200, "/readyz": 200}, (codes, proc.poll())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- policy scan ----------------------------------------------------------------------------------

POLICY = REPO / "tests" / "policy-check.sh"


@pytest.mark.slow
def test_policy_check_passes_and_catches_a_regression(tmp_path):
    """tests/policy-check.sh (checkov, own venv; the first run installs it: about 2 minutes here,
    later runs about 8 s each) passes on the manifests, and fails when a container may escalate privileges."""
    env = clean_env()
    proc = subprocess.run(["bash", str(POLICY)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Failed checks: 0" in proc.stdout
    assert re.search(r"Passed checks: [1-9]\d\d", proc.stdout)

    broken = tmp_path / "manifests"
    (broken / "variants").mkdir(parents=True)
    for f in FILES:
        (broken / f.relative_to(MANIFESTS)).write_text(f.read_text())
    trainer = broken / "5-trainer.yaml"
    trainer.write_text(trainer.read_text().replace("allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true"))
    proc = subprocess.run(["bash", str(POLICY)], env={**env, "MANIFESTS": str(broken)}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 1
    assert "CKV_K8S_20" in proc.stdout  # "Containers should not run with allowPrivilegeEscalation"
    assert "checkov found failing checks" in proc.stderr


def test_the_tests_clean_environment_leaves_out_every_placeholder():
    """helpers.clean_env (what every script-running test starts from) drops every {{NAME}} render.sh fills."""
    assert set(PLACEHOLDERS) <= set(SCRIPT_SETTINGS)


def test_server_replicas_and_its_disruption_budget():
    """Two server replicas by default and a PodDisruptionBudget that selects exactly the Deployment's pods
    (maxUnavailable 1: a drain takes one at a time, and still proceeds with one replica); SERVER_REPLICAS
    sets the count, and a value that is not a whole number >= 1 is refused by name."""
    deployment, service = docs_of(MANIFESTS / "7-server.yaml")
    assert deployment["kind"] == "Deployment" and deployment["spec"]["replicas"] == 2
    [pdb] = docs_of(MANIFESTS / "8-server-pdb.yaml")
    assert pdb["kind"] == "PodDisruptionBudget" and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
    assert docs_of(MANIFESTS / "7-server.yaml", SERVER_REPLICAS="1")[0]["spec"]["replicas"] == 1
    # only the server's Deployment: the NFS server's replicas stay 1
    assert docs_of(MANIFESTS / "variants" / "1-nfs-deployment-pvc.yaml", SERVER_REPLICAS="3")[1]["spec"]["replicas"] == 1
    for bad in ("0", "two", "-1"):
        proc = render(MANIFESTS / "7-server.yaml", SERVER_REPLICAS=bad)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.strip() == f"render.sh: SERVER_REPLICAS must be a whole number >= 1, got '{bad}'", proc.stderr
