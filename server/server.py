"""Command line and launcher of the prediction server: nginx in front, the app under gunicorn behind it.

    python server.py --model /mnt/aggregated-model.h5 [--host 0.0.0.0] [--port 5000] [--internal-port 9090]
                     [--workers N] [--threads T] [--header-timeout S] [--body-timeout S] [--keepalive-timeout S]
                     [--connection-deadline S]
                     [--gate-data TEST.npz [--gate-epsilon E] [--gate-state DIR]] [--progress-dir DIR]

nginx (Debian's `nginx-light`) listens on --host:--port and reads every request whole -- headers
within --header-timeout, then the body (at most 2 MB, in memory) -- before it hands it to gunicorn
over a unix socket in a private run directory, so slow or stalled clients hold only a cheap nginx
connection, never a gunicorn worker (docs/serving.md). It answers methods a route does not serve itself
(405, JSON, Allow), adds the security headers to every answer, and serves /metrics and the full
/api/model only on --host:--internal-port (for Prometheus; the public port never marks a request
internal). No connection lives longer than about --connection-deadline seconds: this process reloads
nginx gracefully when one of its connections is older than half of it, and the replaced worker closes
what it still holds after the other half. This process writes nginx's config
from nginx.conf beside it, starts nginx, runs the gunicorn master, and stops nginx when gunicorn
stops (and gunicorn when nginx dies). gunicorn's workers are `sync` workers, one request at a time, so a
busy worker takes no new connection and nginx's next one goes to an idle worker (--threads T > 1: `gthread`
workers with T threads). Never Flask's development server. Bad flags: a one-line
message on stderr and exit code 2; nginx missing: one line naming the package, exit 1. Each gunicorn
worker builds its own app with `app.create_app` (routes and metrics; the HTTP API is in
docs/CONTRACTS.md), which loads the model through `model.py` and reloads it when the file is
replaced (in a thread of its own, so no worker stops serving meanwhile); a missing model is picked up
when it appears (/readyz says 503 until then). TensorFlow is imported only in the workers, never here.
"""

import gc
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlkcommon import Parser  # noqa: E402  (the local copy, after the path)
from gate import DEFAULT_EPSILON, check_state_dir  # noqa: E402  (stdlib only at import)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WORKERS = 2
DEFAULT_THREADS = 1  # sync workers: p99 11-15 ms on 2 cores where 2 gthread workers x 2 threads gave 15-27
# (the busier worker kept accepting nginx's connections; docs/serving.md)
HEADER_TIMEOUT = 10  # s: the request line and all headers, from connecting
BODY_TIMEOUT = 10  # s: the longest pause between two reads of the body
KEEPALIVE_TIMEOUT = 15  # s: an idle keep-alive connection
CONNECTION_DEADLINE = 120  # s: the longest life of any connection, a slow upload's included (about: + 2 s)
INTERNAL_PORT = 9090  # /metrics and the full /api/model (Prometheus scrapes it; the Service does not expose it)
UPSTREAM_KEEPALIVE = 20  # s: nginx closes its idle connections to gunicorn first ...
GUNICORN_KEEPALIVE = 30  # s: ... so gunicorn never closes one nginx is about to reuse
NGINX_PACKAGE = "nginx-light"
DRAIN_SECONDS = 10  # s: on SIGTERM, what nginx may take to answer the requests it holds (7-server.yaml's
# grace period covers its preStop pause, this and gunicorn's graceful_timeout)
GRACEFUL_TIMEOUT = 10  # s: then gunicorn's workers finish what they hold


def build_parser():
    parser = Parser(prog="server.py", description="Serve MNIST predictions of an aggregated .h5 model over HTTP.")
    parser.add_argument("--model", required=True, help="the aggregated model .h5 (may appear later; reloaded when replaced)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--internal-port", type=int, default=INTERNAL_PORT,
                        help=f"port on --host for /metrics and the full /api/model (default {INTERNAL_PORT})")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"gunicorn worker processes, one model each (default {DEFAULT_WORKERS})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"request threads per worker (default {DEFAULT_THREADS}: gunicorn `sync` workers; more: `gthread`)")
    parser.add_argument("--header-timeout", type=int, default=HEADER_TIMEOUT,
                        help=f"seconds a client has to send the request line and headers (default {HEADER_TIMEOUT})")
    parser.add_argument("--body-timeout", type=int, default=BODY_TIMEOUT,
                        help=f"longest pause in seconds while a client sends the body (default {BODY_TIMEOUT})")
    parser.add_argument("--keepalive-timeout", type=int, default=KEEPALIVE_TIMEOUT,
                        help=f"seconds an idle keep-alive connection stays open (default {KEEPALIVE_TIMEOUT})")
    parser.add_argument("--connection-deadline", type=int, default=CONNECTION_DEADLINE,
                        help="seconds any connection may last, a slow upload's included; one that finishes its "
                        f"requests within half of it is never cut (default {CONNECTION_DEADLINE})")
    parser.add_argument("--gate-data", help="promotion gate: a replaced model is served only if its accuracy on this "
                        "shard .npz (e.g. /mnt/data/test.npz) is >= the current one's - epsilon (gate.py)")
    parser.add_argument("--gate-epsilon", type=float, default=DEFAULT_EPSILON,
                        help=f"the gate's tolerance, an accuracy 0-1 (default {DEFAULT_EPSILON})")
    parser.add_argument("--gate-state", help="with --gate-data: a directory on the volume every replica shares "
                        "(e.g. /mnt/gate), where the admitted model is kept, so a restarted worker, a new pod or "
                        "another replica serves it and never a file the gate rejected (gate.py)")
    parser.add_argument("--progress-dir", metavar="DIR",
                        help="the shared volume's root (e.g. /mnt; WORK_DIR locally) whose progress files the page "
                        "and /api/progress show live; while a run trains and no model file exists yet, /readyz "
                        "answers 200 \"training\" (docs/CONTRACTS.md \"Live progress\"); default: none")
    return parser


# ------------------------------------------------------------------------------------------- nginx


def find_nginx():
    """Path of the nginx binary ($MLK_NGINX, else PATH, else Debian's /usr/sbin) or None."""
    explicit = os.environ.get("MLK_NGINX")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which("nginx", path=search)


def listen_address(host, port):
    return f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"


def nginx_config(args, run_dir, socket_path):
    """nginx.conf (the template beside this file) with this run's values filled in."""
    with open(os.path.join(HERE, "nginx.conf")) as f:
        text = f.read()
    user = ""
    if os.geteuid() == 0:  # nginx's workers would drop to `nobody` and lose the 0700 run directory
        user = f"user {pwd.getpwuid(0).pw_name};"
    values = {
        "USER": user,
        "RUN_DIR": run_dir,
        "SOCKET": socket_path,
        "LISTEN": listen_address(args.host, args.port),
        "INTERNAL_LISTEN": listen_address(args.host, args.internal_port),
        "DEADLINE_HALF": max(1, args.connection_deadline // 2),
        "HEADER_TIMEOUT": args.header_timeout,
        "BODY_TIMEOUT": args.body_timeout,
        "KEEPALIVE_TIMEOUT": args.keepalive_timeout,
        "UPSTREAM_KEEPALIVE": UPSTREAM_KEEPALIVE,
    }
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    left = re.findall(r"\{\{[A-Z_]+\}\}", text)
    if left:
        raise RuntimeError(f"nginx.conf has placeholders server.py does not fill: {left}")
    return text


def _die_with_parent():
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG; else nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Nginx:
    """nginx as a child process: started, watched, stopped. Its stderr is passed on line by line."""

    def __init__(self, binary, run_dir, config):
        self.run_dir = run_dir
        self.conf = os.path.join(run_dir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(config)
        self.binary = binary
        self.proc = None
        self.last_error = self.first_error = ""
        self.stopping = False

    def start(self, timeout=10.0):
        """Start nginx and wait until it listens (its pid file appears). Returns an error line or None."""
        pid_file = os.path.join(self.run_dir, "nginx.pid")
        # Its own session, so a terminal's Ctrl-C reaches only this process, which then stops nginx
        # gracefully; and on Linux nginx gets SIGTERM if this process dies without doing so.
        self.proc = subprocess.Popen([self.binary, "-p", self.run_dir, "-c", self.conf, "-e", "stderr"],
                                     stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     errors="replace", start_new_session=True, preexec_fn=_die_with_parent)
        threading.Thread(target=self._forward_stderr, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                time.sleep(0.1)  # let the forwarder catch nginx's last line
                return f"nginx exited with {self.proc.returncode}: {self.first_error or self.last_error or 'no message'}"
            if os.path.exists(pid_file):
                return None
            time.sleep(0.02)
        return f"nginx did not start within {timeout:.0f} s"

    def _forward_stderr(self):
        for line in self.proc.stderr:
            line = line.rstrip()
            if line:
                if ("[emerg]" in line or "[alert]" in line) and not self.first_error:  # the cause, not the retries
                    self.first_error = re.sub(r"^\d+#\d+: ", "", line.split("] ", 1)[-1])
                self.last_error = line
                print(f"nginx: {line}", file=sys.stderr, flush=True)

    def watch(self, on_death):
        """Call on_death() (once, from a thread) if nginx exits while we are not stopping it."""
        def wait():
            self.proc.wait()
            if not self.stopping:
                on_death(self.proc.returncode)
        threading.Thread(target=wait, daemon=True).start()

    def stop(self, grace=5.0):
        self.stopping = True
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: finish the requests in flight
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its workers too (its own session, its own group)
            except OSError:
                self.proc.kill()
            self.proc.wait()

    def enforce_deadline(self, half, port, period=1.0):
        """Bound the life of every client connection to `port` (the public one: Prometheus' kept-alive scrapes
        on the internal port cause no reloads), which nginx 1.22 cannot (its body timeout is a pause limit):
        every `period` s, note when each such TCP connection of nginx's workers was first seen; when one is older
        than `half` s, reload nginx gracefully (SIGHUP: a new worker takes new connections, the old one
        finishes what it holds and closes the rest after worker_shutdown_timeout, also `half`). At most one
        reload per `half` s, so a connection lasts at most about 2 x half + period. Connections that end
        within `half` s never cause a reload, so a server without slow clients is never reloaded."""
        def run():
            first_seen, last_reload, retired = {}, 0.0, set()
            while self.proc.poll() is None and not self.stopping:
                time.sleep(period)
                now = time.monotonic()
                workers, inodes = self._tcp_connections(retired, port)
                if inodes is None:
                    continue
                first_seen = {inode: first_seen.get(inode, now) for inode in inodes}
                oldest = now - min(first_seen.values(), default=now)
                if oldest >= half and now - last_reload >= half and not self.stopping:
                    print(f"nginx: a connection open for {oldest:.0f} s: reloading nginx, the old worker closes "
                          f"what it holds within {half} s (--connection-deadline)", file=sys.stderr, flush=True)
                    last_reload = now
                    retired |= workers  # they close what they hold by themselves: not counted again
                    try:
                        self.proc.send_signal(signal.SIGHUP)
                    except OSError:
                        return
        threading.Thread(target=run, daemon=True).start()

    def _tcp_connections(self, retired, port):
        """(nginx's workers but the retired ones, the inodes of the TCP sockets they hold on local `port`,
        listening ones excepted); (set(), None) when /proc is unreadable."""
        master = self.proc.pid
        try:
            workers = _children(master) - retired
            held = set()
            for pid in workers:
                try:
                    for fd in os.listdir(f"/proc/{pid}/fd"):
                        try:
                            link = os.readlink(f"/proc/{pid}/fd/{fd}")
                        except OSError:
                            continue
                        if link.startswith("socket:["):
                            held.add(link[8:-1])
                except OSError:  # a worker that just exited
                    continue
            tcp = set()
            for table in ("tcp", "tcp6"):
                try:
                    with open(f"/proc/{master}/net/{table}") as f:
                        next(f)
                        for line in f:
                            fields = line.split()  # local address "HEXIP:HEXPORT", ..., state, ..., inode
                            if fields[3] != "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                                tcp.add(fields[9])
                except FileNotFoundError:
                    continue
        except OSError:
            return set(), None
        return workers, held & tcp


def _children(pid):
    """The pids (strings) of pid's children: /proc/PID/task/PID/children, else every /proc/*/stat's parent."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return set(f.read().split())
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN
        found = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            found.add(entry)
                except (OSError, ValueError, IndexError):
                    continue
        return found


# ---------------------------------------------------------------------------------------- gunicorn


def warm_up():
    """Run the upload path's first-call work (Pillow's plugins, numpy, the preprocessing) on a sample
    image in this worker, before it takes requests. Never fatal: a failure only costs the first request."""
    try:
        from preprocess import preprocess

        with open(os.path.join(HERE, "static", "samples", "6.png"), "rb") as f:
            blob = f.read()
        for _ in range(3):
            preprocess(blob)
    except Exception as err:  # noqa: BLE001
        logging.getLogger("mlk.server").warning("warm-up skipped: %s: %s", type(err).__name__, err)


def serve(args, run_dir, socket_path, before_stop=None):
    """Run the gunicorn master until it stops; before_stop() runs first when SIGTERM asks it to stop."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    model_path = os.path.abspath(args.model)
    ready_dir = os.path.join(run_dir, "ready")
    all_ready = os.path.join(ready_dir, "all")
    os.makedirs(ready_dir, exist_ok=True)
    gate_data = os.path.abspath(args.gate_data) if args.gate_data else None
    gate_state = os.path.abspath(args.gate_state) if args.gate_state else None
    progress_dir = os.path.abspath(args.progress_dir) if args.progress_dir else None

    class Server(BaseApplication):
        def load_config(self):
            settings = {
                "bind": f"unix:{socket_path}",
                "workers": args.workers,
                "worker_class": "sync" if args.threads == 1 else "gthread",
                "threads": args.threads,
                "keepalive": GUNICORN_KEEPALIVE,
                "timeout": 120,  # first model load + TensorFlow start-up
                "graceful_timeout": GRACEFUL_TIMEOUT,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": "warning",
                "child_exit": child_exit,
                "post_worker_init": post_worker_init,
                "worker_tmp_dir": tempfile.gettempdir(),
            }
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self):
            # Runs in each worker after the fork: TensorFlow is never imported by the master.
            logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
            from app import create_app

            app = create_app(model_path, gate_data=gate_data, gate_epsilon=args.gate_epsilon, background_reload=True,
                             gate_state=gate_state, progress_dir=progress_dir)
            warm_up()  # create_app loaded the model and ran it (model.WARM_BATCHES); now the upload path
            # TensorFlow and Keras leave ~10^6 long-lived objects: keep them out of the cyclic
            # garbage collector's scans, which otherwise show up as latency spikes.
            gc.collect()
            gc.freeze()
            return app

    def post_worker_init(worker):
        # This worker accepts requests from now on. /readyz says ready (nginx checks the file
        # `ready/all`) only once every worker got here, so no request meets a worker still loading.
        open(os.path.join(ready_dir, str(os.getpid())), "w").close()
        if len(os.listdir(ready_dir)) >= args.workers + os.path.exists(all_ready):
            open(all_ready, "w").close()

    def child_exit(server, worker):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
        for path in (os.path.join(ready_dir, str(worker.pid)), all_ready):  # its replacement must load first
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    class DrainFirst(Arbiter):
        """SIGTERM (Kubernetes stopping the pod, after the manifest's preStop pause): nginx stops taking
        connections and answers the requests it holds (before_stop), and only then do gunicorn's workers
        stop, so a request in flight or on a kept-alive connection is answered, not cut (docs/serving.md)."""

        def handle_term(self):
            if before_stop is not None:
                before_stop()
            super().handle_term()

    try:
        DrainFirst(Server()).run()
    except RuntimeError as err:  # as gunicorn's BaseApplication.run
        print(f"\nError: {err}\n", file=sys.stderr, flush=True)
        sys.exit(1)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    problems = []
    if not 1 <= args.port <= 65535:
        problems.append(f"--port must be 1-65535, got {args.port}")
    if not 1 <= args.internal_port <= 65535:
        problems.append(f"--internal-port must be 1-65535, got {args.internal_port}")
    elif args.internal_port == args.port:
        problems.append(f"--internal-port must differ from --port, both are {args.port}")
    if args.workers < 1:
        problems.append(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    for flag in ("header_timeout", "body_timeout", "keepalive_timeout"):
        if not 1 <= getattr(args, flag) <= 3600:
            problems.append(f"--{flag.replace('_', '-')} must be 1-3600 seconds, got {getattr(args, flag)}")
    if not 4 <= args.connection_deadline <= 86400:
        problems.append(f"--connection-deadline must be 4-86400 seconds, got {args.connection_deadline}")
    if os.path.isdir(args.model):
        problems.append(f"--model {args.model} is a directory, expected the .h5 file")
    if not 0 <= args.gate_epsilon <= 1:
        problems.append(f"--gate-epsilon must be between 0 and 1, got {args.gate_epsilon}")
    if args.gate_data and os.path.isdir(args.gate_data):
        problems.append(f"--gate-data {args.gate_data} is a directory, expected the test set .npz")
    if args.progress_dir is not None and not os.path.isdir(args.progress_dir):
        problems.append(f"--progress-dir {args.progress_dir} is not a directory")
    if args.gate_state and not args.gate_data:
        problems.append("--gate-state needs --gate-data (it keeps the gate's decisions)")
    if args.gate_state and not problems:  # created here if missing: only once every flag is right
        problem = check_state_dir(args.gate_state)
        if problem:
            problems.append(f"--gate-state: {problem}")
    if problems:
        print(f"{parser.prog}: error: {problems[0]}", file=sys.stderr)
        return 2
    binary = find_nginx()
    if binary is None:
        print(f"{parser.prog}: error: nginx not found (the buffering proxy in front of gunicorn); install it "
              f"(Debian: apt-get install {NGINX_PACKAGE})", file=sys.stderr)
        return 1
    if not os.path.exists(args.model):
        print(f"{parser.prog}: {args.model} does not exist yet; serving /readyz 503 until it appears",
              file=sys.stderr, flush=True)
    # One private directory for everything written at run time: nginx's config, pid and temp dirs,
    # gunicorn's socket, the metrics of every worker (prometheus_client's multiprocess mode).
    run_dir = tempfile.mkdtemp(prefix="mlk-server-")
    own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if own_metrics_dir:
        os.makedirs(os.path.join(run_dir, "metrics"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(run_dir, "metrics")
    else:
        try:
            os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
        except OSError as err:
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"{parser.prog}: error: PROMETHEUS_MULTIPROC_DIR: {err}", file=sys.stderr)
            return 2
    socket_path = os.path.join(run_dir, "gunicorn.sock")
    nginx = None
    died, master = [], os.getpid()
    try:
        nginx = Nginx(binary, run_dir, nginx_config(args, run_dir, socket_path))
        problem = nginx.start()
        if problem:
            print(f"{parser.prog}: error: {problem}", file=sys.stderr)
            return 1

        def nginx_died(code):
            died.append(code)
            print(f"{parser.prog}: nginx exited with {code}; stopping", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)  # the gunicorn master stops gracefully

        nginx.watch(nginx_died)
        nginx.enforce_deadline(max(1, args.connection_deadline // 2), args.port)
        try:
            serve(args, run_dir, socket_path, before_stop=lambda: nginx.stop(grace=DRAIN_SECONDS))
        except SystemExit as exit_:  # gunicorn exits this way when a worker cannot boot
            if exit_.code not in (0, None):
                return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        # gunicorn's workers are forks of this process and leave through here too: only the
        # process that started nginx stops it and removes the run directory.
        if os.getpid() == master:
            if nginx is not None:
                nginx.stop()
            shutil.rmtree(run_dir, ignore_errors=True)
            if own_metrics_dir:  # main() may be called again in this process (tests): leave no stale path
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return 1 if died else 0


if __name__ == "__main__":
    sys.exit(main())
