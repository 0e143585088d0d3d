"""benchmarks/benchmark-kubernetes.py's critical path over the quickstart's breakdown (docs/kubernetes.md,
"Where the time goes"): stages that overlap are counted once."""

import pytest

from helpers import benchmark_module

bench = benchmark_module("benchmark-kubernetes.py")

# create schedule start boot work notice, as the quickstart prints them
SUMMARY = """\
10:00:00 quickstart:   stage                    pod                                create schedule  start   boot    work  notice
10:00:00 quickstart:   splitter                 mnist-splitter-a                      0.5      0.0    1.0    0.5     1.0     1.0
10:00:00 quickstart:   round 1 trainers         mnist-trainer-0-a                     0.5      0.0    1.0    1.0    10.0     4.0
10:00:00 quickstart:   round 1 trainers         mnist-trainer-1-a                     0.5      0.0    1.0    1.0    12.0     2.0
10:00:00 quickstart:   round 1 aggregator       mnist-aggregator-a                    0.5      0.0    1.0    0.5    13.5     1.5
10:00:00 quickstart:   server                   mnist-server-a                        0.5      0.0    1.0    1.0     8.0     0.5
10:00:00 quickstart:   accuracy-test            mnist-accuracy-test-a                 0.5      0.0    1.0    0.5     4.0     3.0
10:00:00 quickstart: total: 60s from start to this summary
"""


def test_overlapping_stages_count_once_on_the_critical_path():
    rows, totals = bench.breakdown(SUMMARY)
    assert len(rows) == 6
    # splitter; the slowest trainer (14.5 s to done) then the aggregator's 1.0 s after it (15.5 - 14.5) and its
    # notice; the server (10.5 s to ready) rather than the accuracy test (6.0 s)
    assert totals == pytest.approx([0.5 + 0.5 + 0.5, 0.0, 1.0 + 1.0 + 1.0, 0.5 + 1.0 + 1.0,
                                    1.0 + 12.0 + 1.0 + 8.0, 1.0 + 0.0 + 1.5 + 0.5])


def test_an_accuracy_test_applied_with_the_last_round_counts_from_the_round_seen_done():
    """Applied with round 1's trainers, the accuracy test's work includes its wait for the round: only what is
    left of it once the quickstart saw the aggregator done counts, against the server started then."""
    summary = SUMMARY.replace("accuracy-test            mnist-accuracy-test-a                 0.5      0.0    1.0    0.5     4.0     3.0",
                              "round 1 accuracy-test    mnist-accuracy-test-a                 0.5      0.0    1.0    0.5    16.0     0.5")
    rows, totals = bench.breakdown(summary)
    assert len(rows) == 6 and rows[-1][0] == "round 1 accuracy-test"
    # the accuracy test is done at 18.0 s, the aggregator at 15.5 s and seen at 17.0 s: 1.0 s left, plus its
    # notice, is shorter than the server's 10.5 s to ready and its notice: the server counts
    assert totals == pytest.approx([0.5 + 0.5 + 0.5, 0.0, 1.0 + 1.0 + 1.0, 0.5 + 1.0 + 1.0,
                                    1.0 + 12.0 + 1.0 + 8.0, 1.0 + 0.0 + 1.5 + 0.5])
    slow = summary.replace("    16.0     0.5", "    30.0     0.5")
    # done at 32.0 s: 15.0 s left after the round was seen, plus 0.5 s: longer than the server's 11 s
    assert bench.breakdown(slow)[1] == pytest.approx([0.5 + 0.5, 0.0, 1.0 + 1.0, 0.5 + 1.0,
                                                      1.0 + 12.0 + 1.0 + 15.0, 1.0 + 0.0 + 1.5 + 0.5])


def test_a_splitter_applied_with_round_1s_trainers_counts_inside_their_wait():
    """Round 1's trainers applied with the splitter: their rows count from the same apply, and their work
    includes the wait for its split, so the splitter adds nothing to the path."""
    summary = SUMMARY.replace("  splitter                 mnist-splitter-a", "  round 1 splitter         mnist-splitter-a")
    rows, totals = bench.breakdown(summary)
    assert len(rows) == 6 and rows[0][0] == "round 1 splitter"
    assert totals == pytest.approx([0.5 + 0.5, 0.0, 1.0 + 1.0, 1.0 + 1.0, 12.0 + 1.0 + 8.0, 0.0 + 1.5 + 0.5])
    # the dataset upload applied with them too
    upload = "10:00:00 quickstart:   round 1 dataset          mnist-dataset-upload                  0.2      1.0    1.0      -       -     0.3\n"
    rows, with_upload = bench.breakdown(upload + summary)
    assert len(rows) == 7 and with_upload == pytest.approx(totals)
    # an upload before the splitter (an older quickstart's rows) counts
    rows, before = bench.breakdown(upload.replace("round 1 dataset", "dataset        ") + summary)
    assert before == pytest.approx([t + v for t, v in zip(totals, [0.2, 1.0, 1.0, 0.0, 0.0, 0.3])])


def test_trainers_that_lived_through_the_rounds_hold_the_rounds_before_the_last_in_their_work():
    """One trainer Job a worker for rounds 1-2 (issue 30): every row counts from their apply, round 1's
    aggregator ran inside their work (they waited for its aggregate), and round 2's adds its part after them."""
    rows1 = [line for line in SUMMARY.splitlines() if "round 1 trainers" in line]
    lived = "".join(line.replace("round 1 trainers  ", "rounds 1-2 trainers") + "\n" for line in rows1)
    round2 = SUMMARY.splitlines()[4].replace("round 1 aggregator", "round 2 aggregator") + "\n"
    summary = SUMMARY.replace("".join(line + "\n" for line in rows1), "").replace(
        "10:00:00 quickstart:   server", lived + round2 + "10:00:00 quickstart:   server")
    rows, totals = bench.breakdown(summary)
    assert [r[0] for r in rows].count("rounds 1-2 trainers") == 2 and len(rows) == 7
    # the same figures as one round's trainers and aggregator: round 1's aggregator adds nothing
    assert totals == pytest.approx(bench.breakdown(SUMMARY)[1])
    # a round 1 aggregator done after the trainers (it cannot be: they waited for it) still adds nothing; round
    # 2's, done later, adds its part
    late = summary.replace("round 1 aggregator       mnist-aggregator-a                    0.5      0.0    1.0    0.5    13.5",
                           "round 1 aggregator       mnist-aggregator-a                    0.5      0.0    1.0    0.5    33.5")
    assert late != summary and bench.breakdown(late)[1] == pytest.approx(totals)
    assert bench.trainers_of("round 2 aggregator", {"rounds 1-2 trainers": 0}) == "rounds 1-2 trainers"
    assert bench.trainers_of("round 3 aggregator", {"rounds 1-2 trainers": 0}) is None
