"""The round loop, written once: rounds of WORKER_NUMBER trainers, each round closed by one aggregation.

    rounds.py local --work DIR --workers N --epoch E --batch B --rounds R [--first-round F]
                    [--min-workers K] [--deadline SECONDS] [--threads T] [--python PY] [--score-data TEST.npz]
                    [--trainer-arg=ARG ...] [--aggregator-arg=ARG ...] [--attack K:KIND] -- TF_PROGRAM...

The rules (`decide`) are the same for every runner:
  - a round closes when no trainer is still running, with the failed ones recorded as missing;
  - a failed trainer is lost; the round goes on while at least MIN_WORKERS can still finish;
    one more and the round fails, and the trainers still running are stopped;
  - once the round deadline has passed, the round closes with the ones done if they are at least
    MIN_WORKERS (those still running are late: stopped and recorded as missing), else it fails;
  - a resumed run starts at the round after the ledger's last complete one (--first-round).
A runner supplies only how to start a stage and how to see it end (`Runner`): `LocalRunner` runs the
trainers as processes for scripts/local-quickstart.sh; tests/test_rounds.py drives the same loop with an
in-memory runner. On Kubernetes (scripts/quickstart.sh) the aggregator Job closes the round by these rules
(aggregator.py's --min-workers and --deadline) and the quickstart applies the lost-worker rule while it
waits (docs/kubernetes.md, "K of N").
"""

import argparse
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import live

ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL_LINES = 15  # a failed trainer's last lines shown on the terminal


class RoundFailed(Exception):
    """A stage of a round failed: `stage` names it, the message says why."""

    def __init__(self, stage, message):
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True)
class Rules:
    workers: int  # N: trainers per round
    min_workers: int  # K: fewest models a round may average (1 <= K <= N)
    deadline: float | None = None  # seconds a round's trainers get; None: no deadline

    def __post_init__(self):
        if not 1 <= self.min_workers <= self.workers:
            raise ValueError(f"min_workers must be 1..{self.workers}, got {self.min_workers}")


@dataclass(frozen=True)
class Decision:
    action: str  # "wait", "close" or "fail"
    missing: tuple = ()  # workers left out of the aggregation (failed and late), sorted
    late: tuple = ()  # workers still running when the round closed or failed: to be stopped
    reason: str = ""  # for "fail"


def decide(rules, done, failed, running, deadline_passed):
    """What a round does next, from which trainers are done, failed and still running."""
    done, failed, running = set(done), set(failed), set(running)
    if len(failed) > rules.workers - rules.min_workers:
        return Decision("fail", late=tuple(sorted(running)),
                        reason=f"{len(failed)} of {rules.workers} workers failed, fewer than "
                               f"MIN_WORKERS={rules.min_workers} can finish")
    if not running:
        return Decision("close", missing=tuple(sorted(failed)))
    if deadline_passed:
        if len(done) >= rules.min_workers:
            return Decision("close", missing=tuple(sorted(failed | running)), late=tuple(sorted(running)))
        return Decision("fail", late=tuple(sorted(running)),
                        reason=f"only {len(done)} of {rules.workers} workers finished by the round deadline, "
                               f"fewer than MIN_WORKERS={rules.min_workers}")
    return Decision("wait")


class Runner:
    """How a runner starts a stage and sees it end. next_exit returns (worker, exit code), or None once
    `timeout` seconds (None: no limit) have passed with no trainer ending."""

    def start_trainers(self, round_, workers):
        raise NotImplementedError

    def next_exit(self, timeout):
        raise NotImplementedError

    def stop(self, workers):
        raise NotImplementedError

    def failure(self, round_, worker, code):
        """One line on why a trainer failed (the runner may show more, e.g. its log's last lines)."""
        return f"worker {worker} exited with code {code}"

    def aggregate(self, round_, rules, missing):
        """Average the round's models; raise RoundFailed("aggregate ...") when that fails."""
        raise NotImplementedError

    score_data = None  # a test set: each round is scored as it lands (score), else not by the round loop

    def score(self, round_):
        """Score the round's aggregate (its ledger entry's test accuracy); raise RoundFailed when that fails."""


@dataclass
class Reporter:
    """say/warn lines as scripts/lib.sh writes them, and each stage's time for the summary."""
    me: str
    out: object = sys.stdout
    err: object = sys.stderr
    clock: object = time.monotonic
    timings: list = field(default_factory=list)

    def _line(self, stream, text):
        stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
        stream.write(f"{stamp} {self.me}: {text}\n")
        stream.flush()

    def say(self, text):
        self._line(self.out, text)

    def warn(self, text):
        self._line(self.err, f"warning: {text}")

    def begin(self, stage):
        self.say(f"== {stage}")
        return self.clock()

    def finish(self, stage, started):
        took = self.clock() - started
        self.timings.append((stage, took))
        self.say(f"== {stage} done in {took:.1f}s")


def train_round(runner, rules, round_, rounds, report, clock=time.monotonic):
    """Run one round's trainers to a decision; return it ("close"), or raise RoundFailed."""
    stage = f"train (round {round_}/{rounds})"
    workers = range(rules.workers)
    runner.start_trainers(round_, workers)
    give_up = None if rules.deadline is None else clock() + rules.deadline
    done, failed, passed, last_failure = set(), set(), False, None
    while True:
        running = set(workers) - done - failed
        decision = decide(rules, done, failed, running, passed)
        if decision.action != "wait":
            break
        timeout = None if give_up is None else max(0.0, give_up - clock())
        event = runner.next_exit(timeout)
        if event is None:
            passed = True
            report.warn(f"round {round_}: the round deadline ({rules.deadline:g}s) passed with {len(running)} "
                        f"worker(s) still training: stopping them")
            continue
        worker, code = event
        if worker not in running:
            continue
        if code == 0:
            done.add(worker)
            report.say(f"worker {worker} finished round {round_}")
            continue
        failed.add(worker)
        last_failure = runner.failure(round_, worker, code)
        left = rules.workers - len(failed)
        if left >= rules.min_workers:
            report.warn(f"round {round_}: worker {worker} is lost; the round goes on ({left} left, "
                        f"MIN_WORKERS={rules.min_workers})")
    if decision.late:
        runner.stop(decision.late)
    if decision.action == "fail":
        if passed or last_failure is None:
            raise RoundFailed(stage, decision.reason)
        # the failure that broke the round first; the count when some could be lost
        raise RoundFailed(stage, last_failure if rules.min_workers == rules.workers
                          else f"{last_failure}; {decision.reason}")
    return decision


def run_rounds(runner, rules, rounds, first_round=1, report=None, clock=time.monotonic):
    """Rounds first_round..rounds, each trained then aggregated. Returns {round: missing workers}."""
    report = report or Reporter("rounds", clock=clock)
    missing = {}
    for round_ in range(first_round, rounds + 1):
        stage = f"train (round {round_}/{rounds})"
        started = report.begin(stage)
        decision = train_round(runner, rules, round_, rounds, report, clock)
        report.finish(stage, started)
        stage = f"aggregate (round {round_}/{rounds})"
        started = report.begin(stage)
        runner.aggregate(round_, rules, decision.missing)
        report.finish(stage, started)
        if runner.score_data:
            stage = f"score (round {round_}/{rounds})"
            started = report.begin(stage)
            runner.score(round_)
            report.finish(stage, started)
        missing[round_] = decision.missing
    return missing


# ------------------------------------------------------------------------------------- local runner

class LocalRunner(Runner):
    """Trainers as processes on this machine, each in its own process group (in this session: the fork server
    scripts/zygote.py puts its fork in that group); WORK laid out like the volume.

    Each trainer's lines go to logs/round-R-worker-I.log as they are, and to stdout prefixed "[worker I] "."""

    def __init__(self, work, tf_program, python, epoch, batch, threads, rounds, me="local-quickstart",
                 out=sys.stdout, err=sys.stderr, score_data=None, live=None, trainer_args=(), aggregator_args=(),
                 attack=None):
        self.work, self.tf_program, self.python, self.me = Path(work), list(tf_program), python, me
        self.score_data = score_data  # each round's aggregate scored on it as it lands (the live page's curve)
        self.live = live  # (progress.LiveProgress, live.Terminal): each worker's line while waiting, or None
        # the knobs' extra flags (docs/CONTRACTS.md "Runner knobs"); attack: (worker, kind) or None
        self.trainer_args, self.aggregator_args, self.attack = list(trainer_args), list(aggregator_args), attack
        self.epoch, self.batch, self.threads, self.rounds = epoch, batch, threads, rounds
        self.out, self.err = out, err
        self.procs, self.events, self.lock = {}, queue.Queue(), threading.Lock()

    def log(self, round_, worker):
        return self.work / "logs" / f"round-{round_}-worker-{worker}.log"

    def start_trainers(self, round_, workers):
        model_dir = self.work / "model"  # the aggregator averages every *.h5 there: this round's only
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        self.events = queue.Queue()
        for worker in workers:
            init = (["--save-init", str(self.work / "rounds/r0.h5")] if round_ == 1  # the common start
                    else ["--init-model", str(self.work / "aggregated-model.h5")])
            cmd = [*self.tf_program, "trainer.py", "--data", str(self.work / f"data/{worker}.npz"),
                   "--epoch", str(self.epoch), "--batch", str(self.batch),
                   "--savemodel", str(model_dir / f"{worker}-model.h5"), "--threads", str(self.threads), *init,
                   *self.trainer_args]
            if self.attack is not None and self.attack[0] == worker:
                cmd += ["--attack", self.attack[1]]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, process_group=0)
            self.procs[worker] = proc
            threading.Thread(target=self._follow, args=(round_, worker, proc), daemon=True).start()

    def _follow(self, round_, worker, proc):
        with open(self.log(round_, worker), "wb") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                with self.lock:
                    self.out.write(f"[worker {worker}] " + line.decode(errors="replace"))
                    self.out.flush()
        self.events.put((worker, proc.wait()))

    def next_exit(self, timeout):
        give_up = None if timeout is None else time.monotonic() + timeout
        while True:  # every second: the workers' progress lines (scripts/live.py)
            wait = 1.0 if give_up is None else min(1.0, max(0.0, give_up - time.monotonic()))
            try:
                return self.events.get(timeout=wait)
            except queue.Empty:
                self.show_progress()
                if give_up is not None and time.monotonic() >= give_up:
                    return None

    def show_progress(self):
        if self.live is not None:
            progress, terminal = self.live
            terminal.update(live.lines_of(progress.snapshot()))

    def stop(self, workers):
        for worker in workers:
            proc = self.procs.get(worker)
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def stop_all(self):
        self.stop(list(self.procs))

    def failure(self, round_, worker, code):
        log = self.log(round_, worker)
        try:
            tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            tail = []
        with self.lock:
            self.err.write(f"{self.me}: worker {worker} exited with code {code}; last lines of {log}:\n")
            self.err.writelines(f"    {line}\n" for line in tail)
            self.err.flush()
        return f"worker {worker} exited with code {code} (log: {log})"

    def aggregate(self, round_, rules, missing):
        self.show_progress()  # the workers' last lines (done, or stopped)
        stage = f"aggregate (round {round_}/{self.rounds})"
        log = self.work / "logs" / f"round-{round_}-aggregate.log"
        cmd = [self.python, str(ROOT / "aggregator/aggregator.py"), "--dir", str(self.work / "model"),
               "--savefile", str(self.work / "aggregated-model.h5"), "--expect", str(rules.workers),
               *self.aggregator_args]
        if rules.min_workers < rules.workers:  # every trainer has ended: no model is still to come
            cmd += ["--min-workers", str(rules.min_workers), "--deadline", "0", "--timeout", "0"]
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for line in proc.stdout:
                f.write(line)
                self.out.write(line.decode(errors="replace"))
                self.out.flush()
            code = proc.wait()
        if code != 0:
            raise RoundFailed(stage, f"exit code {code} (log: {log})")

    def score(self, round_):
        """Fill the ledger's test accuracies of this round (evaluate.py --ledger) now, not after the last round,
        so the page's accuracy curve grows as rounds land. The final accuracy stage then finds them filled."""
        log = self.work / "logs" / f"round-{round_}-score.log"
        cmd = [*self.tf_program, "evaluate.py", "--data", str(self.score_data),
               "--ledger", str(self.work / "rounds" / "ledger.json")]
        with open(log, "wb") as f:
            code = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise RoundFailed(f"score (round {round_}/{self.rounds})", f"exit code {code} (log: {log})")
        lines = log.read_text(errors="replace").splitlines()
        self.out.write(f"round {round_} scored: {lines[-1] if lines else '?'}\n")
        self.out.flush()
        self.show_progress()


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def attack_value(text):
    """--attack K:KIND -> (K, KIND)."""
    worker, _, kind = text.partition(":")
    if not worker.isdigit() or not kind:
        raise argparse.ArgumentTypeError(f"must be K:KIND (a worker index and an attack), got {text!r}")
    return int(worker), kind


def build_parser():
    p = argparse.ArgumentParser(prog="rounds.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    local = sub.add_parser("local", help="run the rounds with trainers as processes on this machine")
    local.add_argument("--work", required=True, help="WORK_DIR: data/ holds the shards; model/, logs/, rounds/")
    local.add_argument("--workers", type=positive, required=True, help="N: trainers per round")
    local.add_argument("--epoch", type=positive, required=True)
    local.add_argument("--batch", type=positive, required=True)
    local.add_argument("--rounds", type=positive, required=True)
    local.add_argument("--first-round", type=positive, default=1, help="resume: the first round to run")
    local.add_argument("--min-workers", type=positive, default=None, help="K (default: N)")
    local.add_argument("--deadline", type=positive, default=None, help="seconds a round's trainers get")
    local.add_argument("--threads", type=positive, default=1, help="TensorFlow threads per trainer")
    local.add_argument("--python", default=sys.executable, help="the Python that runs the aggregator")
    local.add_argument("--me", default="local-quickstart", help="the name in messages")
    local.add_argument("--score-data", help="score each round's aggregate on this test set as it lands "
                       "(evaluate.py --ledger; default: not until the quickstart's accuracy stage)")
    local.add_argument("--timings", help="write each stage's time here, one 'NAME<TAB>MILLISECONDS' line each")
    local.add_argument("--trainer-arg", action="append", default=[], metavar="ARG",
                       help="one more argument for every trainer (repeat; --trainer-arg=--steps --trainer-arg=100)")
    local.add_argument("--aggregator-arg", action="append", default=[], metavar="ARG",
                       help="one more argument for the aggregator (repeat)")
    local.add_argument("--attack", type=attack_value, default=None, metavar="K:KIND",
                       help="worker K trains with trainer.py --attack KIND (tests and benchmarks)")
    local.add_argument("tf_program", nargs="+", help="the command that runs trainer.py (after --)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    min_workers = args.workers if args.min_workers is None else args.min_workers
    try:
        rules = Rules(args.workers, min_workers, args.deadline)
    except ValueError as err:
        print(f"rounds.py: error: {err}", file=sys.stderr)
        return 2
    terminal = live.Terminal(sys.stdout)  # the workers' live lines below the others (refreshed on a terminal)
    out, err = live.Stream(terminal, sys.stdout), live.Stream(terminal, sys.stderr)
    report = Reporter(args.me, out=out, err=err)
    runner = LocalRunner(args.work, args.tf_program, args.python, args.epoch, args.batch, args.threads, args.rounds,
                         args.me, out=out, err=err, score_data=args.score_data,
                         live=(live.load_progress_module().LiveProgress(args.work), terminal),
                         trainer_args=args.trainer_arg, aggregator_args=args.aggregator_arg, attack=args.attack)

    def stopped(signum, frame):  # the quickstart was interrupted: no trainer outlives it
        runner.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    code = 0
    try:
        run_rounds(runner, rules, args.rounds, args.first_round, report)
    except RoundFailed as err:
        runner.stop_all()
        print(f"{args.me}: stage {err.stage} failed: {err}", file=sys.stderr)
        code = 1
    if args.timings:
        Path(args.timings).write_text("".join(f"{name}\t{round(seconds * 1000)}\n" for name, seconds in report.timings))
    return code


if __name__ == "__main__":
    sys.exit(main())
