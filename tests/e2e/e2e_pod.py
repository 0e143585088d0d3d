"""Turn a rendered Kubernetes manifest's pod template into a `podman run` command line.

Used by tests/e2e/e2e-containers.sh so each stage runs exactly as its manifest describes it:
image, command (-> --entrypoint), args, env (values, ConfigMap keys, resourceFieldRef), the
security context's user, read-only root filesystem, dropped capabilities, no-new-privileges,
resource limits, emptyDir volumes (-> tmpfs) and the claim's mount (-> one shared podman volume).

  e2e_pod.py run-args FILE.yaml --volume VOL [--kind Job] [--init I] [--configmaps F.yaml ...]
                      [--add-volume SRC:DST[:ro]] [--add-env K=V] [--publish HOST_IP:HOST_PORT...] [--no-limits]
      prints the options, the image and the args, NUL-separated (read with mapfile -d ''):
      the first container, or with --init I the pod's I-th init container; env from a ConfigMap
      (configMapKeyRef) is looked up in the ConfigMaps of FILE and the --configmaps files, and
      $(VAR) in command/args is expanded as Kubernetes does
  e2e_pod.py inits FILE.yaml [--kind Job]
      prints how many init containers the pod template has
  e2e_pod.py probe FILE.yaml readinessProbe|livenessProbe [--kind Deployment]
      prints "PATH PORT" of the first container's httpGet probe
"""

import argparse
import json
import math
import os
import re
import sys

import yaml

POD_KINDS = ("Job", "Deployment", "StatefulSet", "DaemonSet", "Pod")


class Refusal(Exception):
    pass


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def config_maps(paths):
    out = {}
    for path in paths:
        for doc in load(path):
            if doc.get("kind") == "ConfigMap":
                out[doc["metadata"]["name"]] = doc.get("data") or {}
    return out


def expand(text, env):
    """Kubernetes' $(VAR) expansion in command/args: defined variables only, $$ escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def pod_spec(path, kind=None):
    for doc in load(path):
        if doc.get("kind") not in POD_KINDS or (kind and doc["kind"] != kind):
            continue
        if doc["kind"] == "Pod":
            return doc["spec"]
        return doc["spec"]["template"]["spec"]
    raise Refusal(f"{path}: no {kind or 'pod-bearing'} object")


def first_container(spec):
    containers = spec.get("containers") or []
    if not containers:
        raise Refusal("pod template has no containers")
    return containers[0]


def memory_bytes(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    q = str(q)
    for u, m in units.items():
        if q.endswith(u):
            return int(float(q[: -len(u)]) * m)
    return int(float(q))


def cpus(q):
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def resource_field(spec, c, ref):
    """The downward API's resourceFieldRef: the container's limit or request of cpu or memory divided by
    `divisor` (default 1) and rounded up, as the kubelet does; a limit the container does not set is
    the node's allocatable, here this machine's CPUs or memory."""
    if ref.get("containerName"):
        named = [x for x in (spec.get("containers") or []) + (spec.get("initContainers") or [])
                 if x.get("name") == ref["containerName"]]
        if not named:
            raise Refusal(f"resourceFieldRef names no container {ref['containerName']}")
        c = named[0]
    kind, _, resource = ref["resource"].partition(".")
    if kind not in ("limits", "requests") or resource not in ("cpu", "memory"):
        raise Refusal(f"resourceFieldRef {ref['resource']}: only limits/requests of cpu and memory are supported")
    value = ((c.get("resources") or {}).get(kind) or {}).get(resource)
    if resource == "cpu":
        milli = round(cpus(value) * 1000) if value is not None else (os.cpu_count() or 1) * 1000
        return str(math.ceil(milli / round(cpus(ref.get("divisor", "1")) * 1000)))
    if value is not None:
        size = memory_bytes(value)
    else:
        size = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return str(math.ceil(size / memory_bytes(ref.get("divisor", "1"))))


def run_args(opts):
    spec = pod_spec(opts.file, opts.kind)
    if opts.init is not None:
        inits = spec.get("initContainers") or []
        if opts.init >= len(inits):
            raise Refusal(f"no init container {opts.init}")
        c = inits[opts.init]
    else:
        c = first_container(spec)
    maps = config_maps([opts.file] + (opts.configmaps or []))
    pod_sc = spec.get("securityContext") or {}
    sc = c.get("securityContext") or {}
    out = []

    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    if uid is not None:  # otherwise the image's USER applies, as on a cluster
        out += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
    if pod_sc.get("fsGroup") is not None:  # the volume's group on a cluster; here a supplementary group
        out += ["--group-add", str(pod_sc["fsGroup"])]
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and uid == 0:
        raise Refusal("runAsNonRoot with runAsUser 0")
    if sc.get("readOnlyRootFilesystem"):
        out.append("--read-only")
    if sc.get("allowPrivilegeEscalation") is False:
        out += ["--security-opt", "no-new-privileges"]
    drop = (sc.get("capabilities") or {}).get("drop") or []
    if "ALL" in drop:
        out += ["--cap-drop", "ALL"]
    if c.get("workingDir"):
        out += ["--workdir", c["workingDir"]]

    env = {}
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env)
        elif "configMapKeyRef" in (e.get("valueFrom") or {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            if ref["key"] not in maps.get(ref["name"], {}):
                raise Refusal(f"env {e['name']}: ConfigMap {ref['name']} key {ref['key']} not found")
            env[e["name"]] = str(maps[ref["name"]][ref["key"]])
        elif "resourceFieldRef" in (e.get("valueFrom") or {}):
            env[e["name"]] = resource_field(spec, c, e["valueFrom"]["resourceFieldRef"])
        else:  # the downward API's fieldRef, secrets: no stand-in here
            raise Refusal(f"env {e['name']}: only value, configMapKeyRef and resourceFieldRef are supported "
                          "by this runner")
    for name, value in env.items():
        out += ["--env", f"{name}={value}"]

    limits = (c.get("resources") or {}).get("limits") or {}
    if not opts.no_limits:
        if "memory" in limits:
            out += ["--memory", str(memory_bytes(limits["memory"]))]
        if "cpu" in limits:
            out += ["--cpus", f"{cpus(limits['cpu']):g}"]

    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for m in c.get("volumeMounts") or []:
        v = volumes.get(m["name"])
        if v is None:
            raise Refusal(f"volumeMount {m['name']} names no volume")
        if "emptyDir" in v:
            out += ["--tmpfs", m["mountPath"]]
        elif "persistentVolumeClaim" in v or "nfs" in v:
            if m.get("subPath"):
                raise Refusal(f"volumeMount {m['name']}: subPath is not supported by this runner")
            suffix = ":ro" if m.get("readOnly") else ""
            out += ["--volume", f"{opts.volume}:{m['mountPath']}{suffix}"]
        else:
            raise Refusal(f"volume {m['name']}: kind {sorted(v)} is not supported by this runner")

    for extra in opts.add_volume or []:
        out += ["--volume", extra]
    for extra in opts.add_env or []:
        out += ["--env", extra]
    if opts.publish:
        ports = [p["containerPort"] for p in c.get("ports") or []]
        if len(ports) < len(opts.publish):
            raise Refusal(f"--publish given {len(opts.publish)} times but the container declares {len(ports)} port(s)")
        for host, port in zip(opts.publish, ports):
            out += ["--publish", f"{host}:{port}"]

    if c.get("command"):
        out += ["--entrypoint", json.dumps([expand(str(a), env) for a in c["command"]])]
    out.append(c["image"])
    out += [expand(str(a), env) for a in c.get("args") or []]
    return out


def probe(opts):
    c = first_container(pod_spec(opts.file, opts.kind))
    p = (c.get(opts.probe) or {}).get("httpGet")
    if not p:
        raise Refusal(f"{opts.probe} is not an httpGet probe")
    port = p["port"]
    if isinstance(port, str):  # a named port
        port = next(x["containerPort"] for x in c.get("ports") or [] if x.get("name") == port)
    return [p.get("path", "/"), str(port)]


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (program name first) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = Parser(prog="e2e_pod.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run-args")
    r.add_argument("file")
    r.add_argument("--volume", required=True, help="podman volume standing in for the claim")
    r.add_argument("--kind", choices=POD_KINDS)
    r.add_argument("--init", type=int, help="run the pod's I-th init container instead")
    r.add_argument("--configmaps", action="append", help="more rendered files holding ConfigMaps")
    r.add_argument("--add-volume", action="append")
    r.add_argument("--add-env", action="append")
    r.add_argument("--publish", action="append",
                   help="HOST_IP:HOST_PORT for the first containerPort; again for the second, and so on")
    r.add_argument("--no-limits", action="store_true", help="ignore resources.limits")
    p = sub.add_parser("probe")
    p.add_argument("file")
    p.add_argument("probe", choices=("readinessProbe", "livenessProbe"))
    p.add_argument("--kind", choices=POD_KINDS)
    i = sub.add_parser("inits")
    i.add_argument("file")
    i.add_argument("--kind", choices=POD_KINDS)
    return parser


def main(argv=None):
    opts = build_parser().parse_args(argv)
    try:
        if opts.cmd == "run-args":
            sys.stdout.write("\0".join(run_args(opts)) + "\0")
        elif opts.cmd == "inits":
            print(len(pod_spec(opts.file, opts.kind).get("initContainers") or []))
        else:
            print(" ".join(probe(opts)))
    except (Refusal, OSError, KeyError, yaml.YAMLError) as e:
        print(f"e2e_pod.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
