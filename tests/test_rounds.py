"""scripts/rounds.py: the round loop and its rules (K of N, the round deadline, lost and late workers, resume),
driven by an in-memory runner on a simulated clock, so every case runs in milliseconds. The real runs
(tests/test_local_quickstart.py) use the same loop with trainer processes."""

import io

import pytest

import rounds  # scripts/ is on pytest.ini's pythonpath
from rounds import Decision, Rules, RoundFailed, decide, run_rounds


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class InMemoryRunner(rounds.Runner):
    """Trainer I of round R ends at plan[(R, I)] = (seconds after the round started, exit code); a worker
    missing from the plan never ends. Records what the loop asks of it."""

    def __init__(self, clock, plan, aggregate_fails=()):
        self.clock, self.plan, self.aggregate_fails = clock, plan, set(aggregate_fails)
        self.started, self.stopped, self.aggregated, self.pending = [], [], [], []

    def start_trainers(self, round_, workers):
        self.started.append((round_, list(workers)))
        t0 = self.clock.now
        self.pending = sorted((t0 + self.plan[(round_, w)][0], w, self.plan[(round_, w)][1])
                              for w in workers if (round_, w) in self.plan)

    def next_exit(self, timeout):
        limit = None if timeout is None else self.clock.now + timeout
        if not self.pending or (limit is not None and self.pending[0][0] > limit):
            assert limit is not None, "the loop waits forever on a trainer that never ends"
            self.clock.now = limit
            return None
        at, worker, code = self.pending.pop(0)
        self.clock.now = max(self.clock.now, at)
        return worker, code

    def stop(self, workers):
        self.stopped.append(sorted(workers))
        self.pending = [p for p in self.pending if p[1] not in workers]

    def aggregate(self, round_, rules, missing):
        if round_ in self.aggregate_fails:
            raise RoundFailed(f"aggregate (round {round_})", "exit code 1")
        self.aggregated.append((round_, missing))


def loop(plan, workers=3, min_workers=None, deadline=None, rounds_=2, first=1, aggregate_fails=()):
    clock = Clock()
    runner = InMemoryRunner(clock, plan, aggregate_fails)
    out, err = io.StringIO(), io.StringIO()
    report = rounds.Reporter("test", out=out, err=err, clock=clock)
    rules = Rules(workers, workers if min_workers is None else min_workers, deadline)
    try:
        result = run_rounds(runner, rules, rounds_, first, report, clock)
    except RoundFailed as failure:
        result = failure
    return result, runner, out.getvalue(), err.getvalue(), clock, report


def every(workers, rounds_, at=10.0, code=0):
    return {(r, w): (at + w, code) for r in range(1, rounds_ + 1) for w in range(workers)}


# --- decide: the rules as a table --------------------------------------------------------------------

@pytest.mark.parametrize("n, k, done, failed, running, passed, expected", [
    (3, 3, {0, 1, 2}, set(), set(), False, Decision("close")),
    (3, 3, {0, 1}, set(), {2}, False, Decision("wait")),
    (3, 3, {0}, {1}, {2}, False, "fail"),  # K = N: any loss fails the round
    (3, 2, {0}, {1}, {2}, False, Decision("wait")),  # one may be lost
    (3, 2, {0, 2}, {1}, set(), False, Decision("close", missing=(1,))),
    (3, 1, set(), {1, 2}, {0}, False, Decision("wait")),
    (3, 1, set(), {0, 1, 2}, set(), False, "fail"),
    (3, 1, {0}, {1}, {2}, True, Decision("close", missing=(1, 2), late=(2,))),  # late: stopped, missing
    (3, 2, {0}, set(), {1, 2}, True, "fail"),  # the deadline passed with fewer than K done
    (3, 2, {0, 1}, set(), {2}, True, Decision("close", missing=(2,), late=(2,))),
    (1, 1, set(), set(), {0}, False, Decision("wait")),
])
def test_decide(n, k, done, failed, running, passed, expected):
    decision = decide(Rules(n, k), done, failed, running, passed)
    if expected == "fail":
        assert decision.action == "fail" and decision.late == tuple(sorted(running))
        assert f"MIN_WORKERS={k}" in decision.reason
    else:
        assert decision == expected


@pytest.mark.parametrize("n, k", [(3, 0), (3, 4), (0, 0)])
def test_rules_refuse_a_min_workers_outside_1_to_n(n, k):
    with pytest.raises(ValueError, match="min_workers"):
        Rules(n, k)


# --- the loop --------------------------------------------------------------------------------------------

def test_every_round_trains_all_workers_then_aggregates_them_all():
    result, runner, out, err, clock, report = loop(every(3, 2))
    assert result == {1: (), 2: ()}
    assert runner.started == [(1, [0, 1, 2]), (2, [0, 1, 2])]
    assert runner.aggregated == [(1, ()), (2, ())] and runner.stopped == []
    assert clock.now == 24.0  # each round lasts until its slowest trainer (12 s)
    assert [name for name, _ in report.timings] == ["train (round 1/2)", "aggregate (round 1/2)",
                                                  "train (round 2/2)", "aggregate (round 2/2)"]
    assert report.timings[0][1] == 12.0
    assert "worker 2 finished round 2" in out and err == ""


def test_resume_starts_at_the_first_round_not_in_the_ledger():
    result, runner, *_ = loop(every(2, 3), workers=2, rounds_=3, first=3)
    assert runner.started == [(3, [0, 1])] and result == {3: ()}
    result, runner, *_ = loop(every(2, 3), workers=2, rounds_=3, first=4)  # all done: straight to the test
    assert runner.started == [] and result == {}


def test_with_all_workers_required_one_failure_fails_the_round_and_stops_the_others():
    plan = every(3, 2) | {(1, 1): (5.0, 3)}
    result, runner, out, err, clock, _ = loop(plan)
    assert isinstance(result, RoundFailed) and result.stage == "train (round 1/2)"
    assert str(result) == "worker 1 exited with code 3"
    assert runner.stopped == [[0, 2]] and runner.aggregated == [] and clock.now == 5.0


def test_a_lost_worker_is_left_out_while_min_workers_can_still_finish():
    plan = every(3, 2) | {(1, 1): (5.0, 3)}
    result, runner, out, err, *_ = loop(plan, min_workers=2)
    assert result == {1: (1,), 2: ()}
    assert runner.aggregated == [(1, (1,)), (2, ())] and runner.stopped == []
    assert "round 1: worker 1 is lost; the round goes on (2 left, MIN_WORKERS=2)" in err


def test_one_loss_too_many_fails_naming_the_worker_and_the_count():
    plan = every(3, 1) | {(1, 1): (5.0, 3), (1, 2): (6.0, 4)}
    result, runner, out, err, *_ = loop(plan, min_workers=2, rounds_=1)
    assert isinstance(result, RoundFailed)
    assert str(result) == "worker 2 exited with code 4; 2 of 3 workers failed, fewer than MIN_WORKERS=2 can finish"
    assert runner.stopped == [[0]] and "worker 1 is lost" in err and "worker 2 is lost" not in err


def test_a_late_worker_is_stopped_at_the_deadline_and_recorded_missing():
    plan = {(1, 0): (3.0, 0), (1, 1): (4.0, 7)}  # worker 2 never ends
    result, runner, out, err, clock, _ = loop(plan, min_workers=1, deadline=90, rounds_=1)
    assert result == {1: (1, 2)}
    assert runner.stopped == [[2]] and runner.aggregated == [(1, (1, 2))] and clock.now == 90.0
    assert "the round deadline (90s) passed with 1 worker(s) still training: stopping them" in err


def test_the_deadline_with_fewer_than_min_workers_done_fails_the_round():
    plan = {(1, 0): (3.0, 0)}
    result, runner, out, err, clock, _ = loop(plan, min_workers=2, deadline=30, rounds_=1)
    assert isinstance(result, RoundFailed)
    assert str(result) == "only 1 of 3 workers finished by the round deadline, fewer than MIN_WORKERS=2"
    assert runner.stopped == [[1, 2]] and runner.aggregated == [] and clock.now == 30.0


def test_no_deadline_waits_for_the_slowest_worker():
    plan = every(3, 1) | {(1, 2): (5000.0, 0)}
    result, runner, _, err, clock, _ = loop(plan, min_workers=1, rounds_=1)
    assert result == {1: ()} and clock.now == 5000.0 and err == ""


def test_a_failed_aggregation_stops_the_run_before_the_next_round():
    result, runner, *_ = loop(every(2, 2), workers=2, aggregate_fails={1})
    assert isinstance(result, RoundFailed) and result.stage == "aggregate (round 1)"
    assert runner.started == [(1, [0, 1])]


def test_the_command_line_refuses_min_workers_above_the_workers(tmp_path, capsys):
    code = rounds.main(["local", "--work", str(tmp_path), "--workers", "2", "--epoch", "1", "--batch", "1",
                        "--rounds", "1", "--min-workers", "3", "--", "python"])
    assert code == 2 and "min_workers must be 1..2" in capsys.readouterr().err
