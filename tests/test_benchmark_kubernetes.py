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
