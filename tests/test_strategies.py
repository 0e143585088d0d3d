"""aggregator/strategies.py: every rule and server optimiser against values computed by hand (in the comments) on a
few small arrays, float32 in and out, deterministic; FedAvg as the aggregator always computed it, bit for bit."""

import numpy as np
import pytest

import strategies  # aggregator/ is on sys.path (tests/conftest.py)

F32 = np.float32


def model(*arrays):
    return [np.array(a, dtype=F32) for a in arrays]


def assert_model(got, want, exact=True):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape == np.shape(w)
        if exact:
            np.testing.assert_array_equal(g, np.array(w, dtype=F32))
        else:
            np.testing.assert_allclose(g, np.array(w, dtype=F32), rtol=2e-6, atol=1e-7)


# Three workers, each a model of two arrays (2 and 3 numbers).
W = [model([1, 2], [0.5, 0, -1]),
     model([3, -2], [1.5, 1, -1]),
     model([8, 0], [1.0, 4, 2])]


def test_fedavg_by_hand():
    # samples 1, 1, 2: weights 1/4, 1/4, 1/2
    # [1/4*1 + 1/4*3 + 1/2*8, 1/4*2 + 1/4*-2 + 1/2*0] = [5, 0]
    # [1/4*0.5 + 1/4*1.5 + 1/2*1, 0 + 1/4*1 + 1/2*4, 1/4*-1 + 1/4*-1 + 1/2*2] = [1, 2.25, 0.5]
    assert_model(strategies.fedavg(W, [1, 1, 2]), [[5, 0], [1, 2.25, 0.5]])
    with pytest.raises(ValueError):
        strategies.fedavg(W, [1, 1])
    with pytest.raises(ValueError):
        strategies.fedavg(W, [1, 0, 2])


def test_median_by_hand():
    # per coordinate: median(1, 3, 8) = 3, median(2, -2, 0) = 0; median(0.5, 1.5, 1) = 1, median(0, 1, 4) = 1,
    # median(-1, -1, 2) = -1
    assert_model(strategies.median(W), [[3, 0], [1, 1, -1]])
    # a fourth worker: the mean of the two middle values. (1, 3, 5, 8) -> 4; (-2, 0, 2, 6) -> 1;
    # (0, 0.5, 1, 1.5) -> 0.75; (0, 0, 1, 4) -> 0.5; (-1, -1, 0, 2) -> -0.5
    assert_model(strategies.median(W + [model([5, 6], [0, 0, 0])]), [[4, 1], [0.75, 0.5, -0.5]])


def test_trimmed_mean_by_hand():
    # k = floor(beta * n) values dropped at each end
    assert [strategies.trim_count(n, b) for n, b in ((3, 0.2), (3, 0.34), (5, 0.2), (5, 0.19), (5, 0.4), (4, 0.49))] \
        == [0, 1, 1, 0, 2, 1]
    # 3 workers, beta 0.2: k = 0, the plain mean: [(1+3+8)/3, 0] = [4, 0]; [(0.5+1.5+1)/3, 5/3, 0] = [1, 5/3, 0]
    assert_model(strategies.trimmed_mean(W, 0.2), [[4, 0], [1, 5 / 3, 0]])
    # 3 workers, beta 0.34: k = 1, the median
    assert_model(strategies.trimmed_mean(W, 0.34), strategies.median(W))
    # five workers, one far off: (1, 3, 8, 5, -100) and (2, -2, 0, 6, 100)
    five = W + [model([5, 6], [0, 0, 0]), model([-100, 100], [9, 9, 9])]
    # beta 0.2, k = 1: sorted (-100, 1, 3, 5, 8) -> mean(1, 3, 5) = 3; (-2, 0, 2, 6, 100) -> mean(0, 2, 6) = 8/3;
    # (0, 0.5, 1, 1.5, 9) -> mean(0.5, 1, 1.5) = 1; (0, 0, 1, 4, 9) -> 5/3; (-1, -1, 0, 2, 9) -> 1/3
    assert_model(strategies.trimmed_mean(five, 0.2), [[3, 8 / 3], [1, 5 / 3, 1 / 3]])
    # beta 0.19, k = 0: the plain mean, (1+3+8+5-100)/5 = -16.6 and (2-2+0+6+100)/5 = 21.2
    assert_model(strategies.trimmed_mean(five, 0.19)[:1], [[-16.6, 21.2]])
    # beta 0.4, k = 2: the median
    assert_model(strategies.trimmed_mean(five, 0.4), strategies.median(five))
    for bad in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError):
            strategies.trimmed_mean(W, bad)


# Five workers, each (x) and (y): points A(0,0) B(1,0) C(0,1) D(2,1) E(10,10).
K = [model([x], [y]) for x, y in ((0, 0), (1, 0), (0, 1), (2, 1), (10, 10))]


def test_krum_by_hand():
    # squared distances: AB 1, AC 1, AD 5, AE 200, BC 2, BD 2, BE 181, CD 4, CE 181, DE 145.
    # f = 1: each score sums the n - f - 2 = 2 smallest distances to the others:
    # A: 1+1 = 2, B: 1+2 = 3, C: 1+2 = 3, D: 2+4 = 6, E: 145+181 = 326
    np.testing.assert_array_equal(strategies.krum_scores(K, 1), [2, 3, 3, 6, 326])
    assert strategies.krum_select(K, 1) == [0]
    assert_model(strategies.krum(K, 1), [[0], [0]])  # Krum: A itself
    # multi-Krum m = 2: A, then B (B and C tie at 3: the lower index) -> mean (0.5, 0)
    assert strategies.krum_select(K, 1, 2) == [0, 1]
    assert_model(strategies.krum(K, 1, 2), [[0.5], [0]])
    # m = 4 = n - f: A, B, C, D -> mean (3/4, 1/2); E, the far one, never
    assert_model(strategies.krum(K, 1, 4), [[0.75], [0.5]])
    # f = 0 with 3 workers (n > 2): n - f - 2 = 1 nearest. Squared distances among W (both arrays joined):
    # W0-W1: 4+16+1+1+0 = 22, W0-W2: 49+4+0.25+16+9 = 78.25, W1-W2: 25+4+0.25+9+9 = 47.25
    # scores: W0 22, W1 22, W2 47.25 -> W0 (tie with W1: the lower index)
    np.testing.assert_array_equal(strategies.krum_scores(W, 0), [22, 22, 47.25])
    assert_model(strategies.krum(W, 0), W[0])


def test_krum_refuses_too_few_models_or_a_bad_m():
    with pytest.raises(ValueError, match="more than 2f\\+2 = 4"):
        strategies.krum(K[:4], 1)  # n = 4 is not > 2*1 + 2
    with pytest.raises(ValueError, match="between 1 and n - f = 4"):
        strategies.krum(K, 1, 5)
    with pytest.raises(ValueError):
        strategies.krum(K, 1, 0)
    with pytest.raises(ValueError):
        strategies.krum(K, -1)


def test_fedavgm_by_hand():
    opt = strategies.FedAvgM(server_lr=2.0, momentum=0.5)
    start = model([1, 2])
    # round 1: delta = (1.5, 1) - (1, 2) = (0.5, -1); v = delta; new = (1, 2) + 2 * (0.5, -1) = (2, 0)
    new, state = opt.step(start, model([1.5, 1]), None)
    assert_model(new, [[2, 0]])
    assert_model(state["v"], [[0.5, -1]])
    # round 2 from (2, 0): delta = (2.25, 0.5) - (2, 0) = (0.25, 0.5); v = 0.5 * (0.5, -1) + (0.25, 0.5) = (0.5, 0);
    # new = (2, 0) + 2 * (0.5, 0) = (3, 0)
    new, state = opt.step(new, model([2.25, 0.5]), state)
    assert_model(new, [[3, 0]])
    assert_model(state["v"], [[0.5, 0]])
    assert opt.params() == {"server_lr": 2.0, "momentum": 0.5}


def test_fedadam_by_hand():
    opt = strategies.FedAdam(server_lr=0.1)  # beta1 0.9, beta2 0.99, tau 1e-3
    start = model([0, 1, -1])
    # round 1: delta = (0.5, 0, -0.25); m = 0.1 * delta = (0.05, 0, -0.025); v = 0.01 * delta^2 = (0.0025, 0, 0.000625)
    # sqrt(v) = (0.05, 0, 0.025); m / (sqrt(v) + 0.001) = (0.05/0.051, 0, -0.025/0.026) = (0.980392, 0, -0.961538)
    # new = start + 0.1 * that = (0.0980392, 1, -1.0961538)
    new, state = opt.step(start, model([0.5, 1, -1.25]), None)
    assert_model(new, [[0.0980392157, 1, -1.0961538462]], exact=False)
    assert_model(state["m"], [[0.05, 0, -0.025]], exact=False)
    assert_model(state["v"], [[0.0025, 0, 0.000625]], exact=False)
    # round 2: delta = (0.5, 0.1, 0) -> m = 0.9 m + 0.1 delta = (0.095, 0.01, -0.0225);
    # v = 0.99 v + 0.01 delta^2 = (0.004975, 0.0001, 0.00061875); sqrt(v) = (0.0705337, 0.01, 0.0248747)
    # m / (sqrt(v) + 0.001) = (0.095/0.0715337, 0.01/0.011, -0.0225/0.0258747) = (1.328046, 0.909091, -0.869576)
    # new = round 1's + 0.1 * that = (0.0980392 + 0.1328046, 1.0909091, -1.0961538 - 0.0869576)
    start2 = new
    new, state = opt.step(start2, [start2[0] + np.array([0.5, 0.1, 0], dtype=F32)], state)
    assert_model(new, [[0.2308438, 1.0909091, -1.1831114]], exact=False)
    assert_model(state["m"], [[0.095, 0.01, -0.0225]], exact=False)
    assert_model(state["v"], [[0.004975, 0.0001, 0.00061875]], exact=False)
    assert opt.params() == {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.001}


def test_optimizers_refuse_bad_parameters_and_foreign_state():
    for bad in (lambda: strategies.FedAvgM(0, 0.9), lambda: strategies.FedAvgM(1, 1.0),
                lambda: strategies.FedAdam(-1), lambda: strategies.FedAdam(0.1, tau=0),
                lambda: strategies.FedAdam(float("nan"))):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="state"):
        strategies.FedAvgM(1, 0.5).step(model([1, 2]), model([1, 3]), {"v": model([1, 2, 3])})
    with pytest.raises(ValueError, match="state"):
        strategies.FedAdam(0.1).step(model([1, 2]), model([1, 3]), {"v": model([1, 2])})  # no "m"


def random_models(n, seed):
    rng = np.random.default_rng(seed)
    shapes = [(3, 3, 1, 4), (4,), (36, 10), (10,)]
    return [[rng.standard_normal(s).astype(F32) * 0.1 for s in shapes] for _ in range(n)]


def test_fedavg_is_the_aggregators_old_arithmetic_bit_for_bit():
    models, samples = random_models(4, 0), [100, 250, 333, 17]
    total = sum(samples)
    for k, got in enumerate(strategies.fedavg(models, samples)):
        acc = np.zeros(models[0][k].shape, dtype=np.float64)  # aggregator.fedavg before strategies.py existed
        for m, s in zip(models, samples):
            acc += m[k].astype(np.float64) * (s / total)
        assert got.tobytes() == acc.astype(np.float32).tobytes()


def test_fedavgm_with_lr_1_and_momentum_0_is_fedavg_bit_for_bit():
    opt = strategies.FedAvgM(server_lr=1.0, momentum=0.0)
    start, state = random_models(1, 1)[0], None
    for rnd in range(3):
        aggregate = strategies.fedavg(random_models(3, 10 + rnd), [1, 2, 3])
        new, state = opt.step(start, aggregate, state)
        assert [a.tobytes() for a in new] == [a.tobytes() for a in aggregate]
        start = new


@pytest.mark.parametrize("rule", [
    lambda ms: strategies.fedavg(ms, [5, 1, 2, 7, 3]), strategies.median, lambda ms: strategies.trimmed_mean(ms, 0.2),
    lambda ms: strategies.krum(ms, 1, 2), strategies.mean,
    lambda ms: strategies.FedAvgM(0.5, 0.9).step(ms[0], ms[1], {"v": ms[2]})[0],
    lambda ms: strategies.FedAdam(0.01).step(ms[0], ms[1], {"m": ms[2], "v": [abs(a) for a in ms[3]]})[0],
], ids=["fedavg", "median", "trimmed-mean", "krum", "mean", "fedavgm", "fedadam"])
def test_float32_in_float32_out_and_deterministic(rule):
    models = random_models(5, 2)
    first = rule(models)
    again = rule([[a.copy() for a in m] for m in models])
    assert all(a.dtype == np.float32 for a in first)
    assert [a.shape for a in first] == [a.shape for a in models[0]]
    assert [a.tobytes() for a in first] == [a.tobytes() for a in again]
    assert [a.tobytes() for a in models[0]] == [a.tobytes() for a in random_models(5, 2)[0]]  # inputs untouched


def test_robust_rules_equal_the_start_plus_the_rule_over_updates():
    """median, trimmed mean and Krum's distances are shift-equivariant: on models or on updates (model - start),
    the same result up to the rounding of the subtraction (the docstring's reason to work on the models)."""
    models, start = random_models(5, 3), random_models(1, 4)[0]
    updates = [[(a.astype(np.float64) - s) for a, s in zip(m, start)] for m in models]
    for rule in (strategies.median, lambda ms: strategies.trimmed_mean(ms, 0.2)):
        for got, u, s in zip(rule(models), rule(updates), start):
            np.testing.assert_allclose(got, s + u, rtol=1e-6, atol=1e-7)
    assert strategies.krum_select(models, 1, 3) == strategies.krum_select(updates, 1, 3)


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="shapes"):
        strategies.median([model([1, 2]), model([1, 2, 3])])
    with pytest.raises(ValueError):
        strategies.median([])


def test_integer_arrays_are_rounded():
    ints = [[np.array([1, 2], dtype=np.int64)], [np.array([2, 2], dtype=np.int64)]]
    out = strategies.fedavg(ints, [1, 1])  # (1.5, 2) -> rint (2, 2)
    assert out[0].dtype == np.int64 and out[0].tolist() == [2, 2]


def test_robust_rules_resist_one_far_worker_where_fedavg_does_not():
    """Four honest workers near 0 and one at 1000 (claiming most samples): FedAvg follows it, the robust rules do not."""
    honest = [model([0.1 * i, -0.1 * i], [0.05 * i]) for i in range(4)]  # coordinates in [-0.3, 0.3]
    models = honest + [model([1000, 1000], [1000])]
    assert strategies.fedavg(models, [1, 1, 1, 1, 96])[0][0] > 900
    for out in (strategies.median(models), strategies.trimmed_mean(models, 0.2), strategies.krum(models, 1, 3)):
        assert all(np.all(np.abs(a) <= 0.3 + 1e-6) for a in out)
    assert 4 not in strategies.krum_select(models, 1, 4)
