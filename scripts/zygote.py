"""A fork server for the local pipeline's TensorFlow programs: TensorFlow is imported once, not by every run.

    scripts/zygote.py serve --socket PATH                        # import Keras + TensorFlow, then fork per request
    scripts/zygote.py run --socket PATH -- PROGRAM.py [ARGS...]  # run PROGRAM.py (trainer.py, evaluate.py) in a fork

Importing Keras and TensorFlow costs about 4 CPU-seconds, and the local quickstart runs a trainer per worker
per round plus the accuracy test: ten imports on 2 cores. `serve` imports them once (no TensorFlow op runs,
so no thread pool exists yet) and, for each `run`, forks a child that takes over the client's stdin, stdout,
stderr (passed over the unix socket), working directory, environment and process group, and calls the
program's main(); the client exits with its exit code. The child is the program as if started afresh: it
sets its own threads and seeds (same weights as a direct run, tested). Killing the client's process group
stops the child too; a child whose client is gone stops itself. Without a server (no socket, refused, or it
ends before forking) `run` simply executes PROGRAM.py itself. Only the trainer image's programs are run, from
../trainer beside this script's folder. A development tool of scripts/local-quickstart.sh: in no image.
"""

import argparse
import json
import os
import signal
import socket
import sys
import threading

# The programs it runs are the trainer image's; the server process imports them (and their mlk.py and
# mlkcommon.py) from there, and this command line uses that mlkcommon's Parser (a usage error: one line, exit 2).
TRAINER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trainer")
sys.path.insert(0, TRAINER)
from mlkcommon import Parser, parse_args  # noqa: E402

PROGRAMS = ("trainer.py", "evaluate.py")
PROG = "zygote.py"


def _read_line(conn, buffer=b""):
    """One JSON line from conn (b"" before it means the other side is gone: None)."""
    while b"\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            return None, buffer
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    return json.loads(line), rest


def _child(conn, fds, request, modules):
    """In the fork: become the client's program and report its exit code. Never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            os.setpgid(0, request["pgid"])  # the client's group: killing it (the quickstart does) stops this too
        except OSError:
            pass
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        program = request["program"]
        sys.argv = [os.path.join(TRAINER, program), *request["argv"]]
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")

        def orphaned():  # the client sends nothing more: recv returns only when it is gone
            try:
                conn.recv(1)
            except OSError:
                pass
            os._exit(1)

        threading.Thread(target=orphaned, daemon=True).start()
        try:
            code = modules[program].main(request["argv"])
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
    except BaseException:  # noqa: BLE001 - shown on the client's stderr, then a failing exit code
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


def serve(path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is the caller's only
    try:
        server.bind(path)
    finally:
        os.umask(old_umask)
    server.listen(64)  # clients may connect now; they wait in the backlog while the imports run
    from mlk import import_keras

    import_keras()
    import tensorflow  # noqa: F401  (imported, never run: the children create TensorFlow's runtime)

    import evaluate
    import trainer

    modules = {"trainer.py": trainer, "evaluate.py": evaluate}
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print(f"{PROG}: serving {', '.join(PROGRAMS)} on {path} (pid {os.getpid()})", flush=True)
    while True:
        conn, _ = server.accept()
        fds = []
        try:
            message, fds, _, _ = socket.recv_fds(conn, 65536, 3)
            request, _ = _read_line(conn, message)
            if request is None or request.get("program") not in modules or len(fds) != 3:
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                server.close()
                _child(conn, fds, request, modules)
        except (OSError, ValueError) as err:
            print(f"{PROG}: a request failed: {err}", file=sys.stderr, flush=True)
        finally:
            conn.close()
            for fd in fds:
                os.close(fd)


def run(path, program, argv):
    """Run program (trainer.py or evaluate.py, of ../trainer) with argv in a fork of the server; exec it here
    without one."""
    name = os.path.basename(program)
    if name not in PROGRAMS:
        print(f"{PROG}: error: can only run {', '.join(PROGRAMS)}, not {program}", file=sys.stderr)
        return 2

    def by_itself():
        os.execv(sys.executable, [sys.executable, os.path.join(TRAINER, name), *argv])

    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
        request = {"program": name, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "pgid": os.getpgrp()}
        socket.send_fds(client, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        started, rest = _read_line(client)
    except (OSError, ValueError):
        started = None
    if started is None:  # no server, or it ended before forking: the program has not run
        client.close()
        by_itself()
    finished, _ = _read_line(client, rest)
    if finished is None:
        print(f"{PROG}: {name} (pid {started['pid']}) ended without an exit code (killed?)", file=sys.stderr)
        return 1
    return finished["exit"]


def build_parser():
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="\n".join(__doc__.splitlines()[1:]))
    sub = p.add_subparsers(dest="command", required=True, metavar="{serve,run}")
    serve_p = sub.add_parser("serve", help="import Keras + TensorFlow, then fork per request",
                             description="import Keras + TensorFlow, then fork a child per `run` request")
    serve_p.add_argument("--socket", required=True, metavar="PATH", help="the unix socket to listen on")
    run_p = sub.add_parser("run", usage=f"{PROG} run --socket PATH -- PROGRAM.py [ARGS...]",
                           help="run PROGRAM.py (trainer.py, evaluate.py) in a fork of the server",
                           description="run PROGRAM.py (trainer.py, evaluate.py) in a fork of the server, or on its "
                                       "own without one; exits with its exit code")
    run_p.add_argument("--socket", required=True, metavar="PATH", help="the server's unix socket")
    run_p.add_argument("program", metavar="PROGRAM.py", help="trainer.py or evaluate.py")
    run_p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the program's own arguments")
    return p


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):  # usage error (exit 2, one line) or --help (exit 0)
        return args
    if args.command == "serve":
        serve(args.socket)
        return 0
    return run(args.socket, args.program, args.args)


if __name__ == "__main__":
    sys.exit(main())
