"""benchmarks/benchmark-hostile.py's matrix and verdicts from a run's figures (its --report path): the change
against the clean FedAvg run, the honest-only reference, the flag rates. The runs are made up here, so every
figure below is computed by hand."""

from helpers import benchmark_module

bench = benchmark_module("benchmark-hostile.py")


def runs_of(robust_loss, alone_loss, attacker_flagged=True, honest_flags=0):
    """One seed per split: clean FedAvg 0.9000; every robust rule robust_loss points below it under attack, FedAvg
    5 points below; the honest workers alone alone_loss below; the attacker flagged or not, honest_flags honest
    workers flagged in each attacked run."""
    runs = []
    for split in bench.SPLITS:
        runs.append({"split": split, "seed": 0, "attack": "honest-only", "rule": "fedavg", "attacker": 0,
                     "accuracy": 0.9 - alone_loss / 100})
        for attack in bench.ATTACKS:
            for rule in bench.RULES:
                loss = 0 if attack == "clean" else (5 if rule == "fedavg" else robust_loss)
                run = {"split": split, "seed": 0, "attack": attack, "rule": rule, "attacker": 0,
                       "accuracy": 0.9 - loss / 100,
                       "attacker_flagged": None if attack == "clean" else attacker_flagged,
                       "honest_flagged": 0 if attack == "clean" else honest_flags,
                       "honest": bench.WORKERS if attack == "clean" else bench.WORKERS - 1}
                if attack == "backdoor":
                    run["backdoor_success"] = 0.1
                runs.append(run)
    return runs


def printed(capsys, runs):
    bench.report(runs, 1, 50, 0.95, 10.0, "0.00")
    return capsys.readouterr().out


def test_a_robust_rule_is_judged_against_the_clean_run_and_the_honest_workers_alone(capsys):
    out = printed(capsys, runs_of(robust_loss=1.0, alone_loss=0.8))
    assert "| iid | scale10 | 0.8500 (-5.00) | 0.8900 (-1.00) |" in out
    assert "| 0.8920 (-0.80) | 100% | 0.0% |" in out  # the honest-only column, then the flag rates
    line = next(l for l in out.splitlines() if l.startswith("target robust rule median:"))
    assert "missed in iid/shuffled-labels (-1.00)" in line
    # -1.00 against the clean run is -0.20 against the honest workers alone (0.8920): within 0.5
    assert line.endswith("within it of the honest workers alone: always")
    out = printed(capsys, runs_of(robust_loss=0.4, alone_loss=0.0))
    assert "target robust rule krum: under every attack within 0.5 points of the clean FedAvg run (mean over the " \
           "seeds): met; within it of the honest workers alone: always" in out
    out = printed(capsys, runs_of(robust_loss=2.0, alone_loss=0.5))
    assert "within it of the honest workers alone: not in iid/shuffled-labels (-1.50)" in out


def test_detection_rates_count_attackers_and_honest_workers(capsys):
    out = printed(capsys, runs_of(0.0, 0.0))
    assert "target detection: attackers flagged 100.0% (>= 95%: met), honest workers flagged 0.0% (<= 2%: met)" in out
    # one honest worker of 4 flagged in each of the 8 attacked runs: 8 of 2 x (5 + 4 x 4) = 42 honest worker-runs
    out = printed(capsys, runs_of(0.0, 0.0, attacker_flagged=False, honest_flags=1))
    assert "target detection: attackers flagged 0.0% (>= 95%: missed), honest workers flagged 19.0% (<= 2%: " \
           "missed)" in out


def test_a_run_saved_before_the_honest_only_reference_still_reports(capsys):
    runs = [r for r in runs_of(1.0, 0.0) if r["attack"] != "honest-only" and r["rule"] != "fedavg+drop"]
    out = printed(capsys, runs)
    assert "fedavg+drop" not in out and "| — | 100% | 0.0% |" in out
    assert "within it of the honest workers alone" not in out
