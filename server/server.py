"""Command line and launcher of the prediction server: parses the flags, then runs the app under gunicorn.

    python server.py --model /mnt/aggregated-model.h5 [--host 0.0.0.0] [--port 5000] [--workers N] [--threads T]

Never Flask's development server. Bad flags: a one-line message on stderr and exit code 2. Each
gunicorn worker builds its own app with `app.create_app` (routes and metrics; the HTTP API is in
docs/CONTRACTS.md), which loads the model through `model.py` and reloads it when the file is replaced;
a missing model is picked up when it appears (/readyz says 503 until then). TensorFlow is imported
only in the workers, never here.
"""

import gc
import logging
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlkcommon import Parser  # noqa: E402  (the local copy, after the path)

DEFAULT_WORKERS = 2
DEFAULT_THREADS = 4


def build_parser():
    parser = Parser(prog="server.py", description="Serve MNIST predictions of an aggregated .h5 model over HTTP.")
    parser.add_argument("--model", required=True, help="the aggregated model .h5 (may appear later; reloaded when replaced)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"gunicorn worker processes, one model each (default {DEFAULT_WORKERS})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"request threads per worker (default {DEFAULT_THREADS})")
    return parser


# ---------------------------------------------------------------------------------------- gunicorn


def serve(args):
    from gunicorn.app.base import BaseApplication

    model_path = os.path.abspath(args.model)

    class Server(BaseApplication):
        def load_config(self):
            settings = {
                "bind": f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}",
                "workers": args.workers,
                "worker_class": "gthread",
                "threads": args.threads,
                "keepalive": 5,
                "timeout": 120,  # first model load + TensorFlow start-up
                "graceful_timeout": 10,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": "warning",
                "child_exit": child_exit,
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

            app = create_app(model_path)
            # TensorFlow and Keras leave ~10^6 long-lived objects: keep them out of the cyclic
            # garbage collector's scans, which otherwise show up as latency spikes.
            gc.collect()
            gc.freeze()
            return app

    def child_exit(server, worker):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)

    Server().run()


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    problems = []
    if not 1 <= args.port <= 65535:
        problems.append(f"--port must be 1-65535, got {args.port}")
    if args.workers < 1:
        problems.append(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    if os.path.isdir(args.model):
        problems.append(f"--model {args.model} is a directory, expected the .h5 file")
    if problems:
        print(f"{parser.prog}: error: {problems[0]}", file=sys.stderr)
        return 2
    # Metrics from every worker: prometheus_client's multiprocess mode, in a fresh private directory.
    metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="mlk-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if not os.path.exists(args.model):
        print(f"{parser.prog}: {args.model} does not exist yet; serving /readyz 503 until it appears",
              file=sys.stderr, flush=True)
    try:
        serve(args)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
