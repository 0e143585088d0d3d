"""How a round's models become the next global model: aggregation rules and server-side optimisers (issue 31).

numpy only (the aggregator's image has no TensorFlow). Pure functions, deterministic (no randomness, a fixed
order everywhere, ties broken by the lower worker index). A model is a list of numpy arrays in Keras'
get_weights() order; `models` is a list of those, one per worker, all of the same shapes. Arithmetic is in
float64; every result has the first model's dtype per array (float32 for Keras weights; an integer array is
rounded to the nearest integer). The aggregator (aggregator.py) picks one rule and optionally one optimiser.

Aggregation rules, models -> one model:

- `fedavg(models, samples)`: the sample-weighted mean (McMahan et al. 2017), the default and the aggregator's
  behaviour before these rules existed, bit for bit.
- `median(models)`: the coordinate-wise median (the mean of the two middle values when n is even).
- `trimmed_mean(models, beta)`: per coordinate, drop the k = floor(beta * n) largest and the k smallest values
  and take the mean of the other n - 2k (Yin et al. 2018). floor, not ceil: beta is the fraction of workers
  the rule may treat as Byzantine, k never exceeds it, and 0 <= beta < 0.5 always leaves at least one value
  (n - 2k >= 1); with few workers k can be 0 (3 workers, beta 0.2: a plain mean), which `trim_count` tells.
- `krum(models, f, m)`: (multi-)Krum (Blanchard et al. 2017): each model's score is the sum of its squared
  Euclidean distances to its n - f - 2 nearest other models; the m lowest-scoring models are averaged (plain
  mean). Needs n > 2f + 2 and 1 <= m <= n - f. `krum_select` returns the chosen indexes.

The robust rules ignore the sample counts on purpose (a Byzantine worker could claim any count) and work on
the models themselves, not on updates (model - start): each is equivariant under a common shift, so
median(models) = start + median(updates), the same for the trimmed mean, and the distance between two models
is the distance between their updates; working on the models gives those values without a start model and
without the rounding of a subtraction and an addition. Only the server optimisers need the round's start.

Server optimisers, over the pseudo-gradient delta = aggregate - start (Reddi et al. 2021, "Adaptive
Federated Optimization"), each a class with `step(start, aggregate, state) -> (new, state)`; state is None at
the first round, else the dict of lists of float32 arrays the previous step returned (what the aggregator
saves as rounds/r{n}-opt.npz):

- `FedAvgM(server_lr, momentum)`: v = momentum * v + delta; new = start + server_lr * v (Hsu et al. 2019).
  server_lr 1 and momentum 0 give the aggregate itself, bit for bit.
- `FedAdam(server_lr, beta1=0.9, beta2=0.99, tau=1e-3)`: m = beta1 * m + (1 - beta1) * delta;
  v = beta2 * v + (1 - beta2) * delta**2; new = start + server_lr * m / (sqrt(v) + tau); m and v start at 0
  (as the formulas above and common implementations; the paper allows v to start at any value >= tau**2), and
  there is no bias correction (as in the paper). In the first rounds each coordinate moves by about
  server_lr (m / sqrt(v) is about +-1), so server_lr is an absolute step: 1e-2 to 1e-1 suit weights of this
  size, not 1.
"""

import math

import numpy as np

RULES = ("fedavg", "median", "trimmed-mean", "krum")
OPTIMIZERS = ("none", "fedavgm", "fedadam")


# --- helpers ---------------------------------------------------------------------------------------

def _check(models):
    """models: a non-empty list of equally long lists of arrays with equal shapes."""
    if not models:
        raise ValueError("no models to aggregate")
    shapes = [np.shape(a) for a in models[0]]
    for i, model in enumerate(models[1:], start=1):
        if [np.shape(a) for a in model] != shapes:
            raise ValueError(f"model {i} has other weight shapes than model 0")
    return shapes


def _cast(values, like):
    """float64 values as the dtype of `like`: rounded to the nearest integer for an integer array."""
    like = np.asarray(like)
    if np.issubdtype(like.dtype, np.integer):
        return np.rint(values).astype(like.dtype)
    return np.asarray(values).astype(like.dtype)


def _stack(models, k):
    """The k-th array of every model stacked along a new first axis, in float64: shape (n, *shape)."""
    return np.stack([np.asarray(model[k], dtype=np.float64) for model in models])


def _flat(model):
    """One model as a single float64 vector (its arrays flattened and joined in order)."""
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in model]) if model else np.zeros(0)


def mean(models):
    """The plain (unweighted) mean of the models, per array: what multi-Krum averages."""
    _check(models)
    return [_cast(np.mean(_stack(models, k), axis=0), models[0][k]) for k in range(len(models[0]))]


# --- aggregation rules -----------------------------------------------------------------------------

def fedavg(models, samples):
    """The sample-weighted mean: per array, sum_i w_i * samples_i / total, accumulated in float64 in worker order
    (the aggregator's FedAvg since round 1: the same operations in the same order, so the same bits)."""
    _check(models)
    if len(samples) != len(models):
        raise ValueError(f"{len(samples)} sample counts for {len(models)} models")
    if any(s <= 0 for s in samples):
        raise ValueError("every sample count must be > 0")
    total = sum(samples)
    out = []
    for k, ref in enumerate(models[0]):
        acc = np.zeros(np.shape(ref), dtype=np.float64)
        for model, s in zip(models, samples):
            acc += np.asarray(model[k]).astype(np.float64) * (s / total)
        out.append(_cast(acc, ref))
    return out


def median(models):
    """The coordinate-wise median of the models (for an even count the mean of the two middle values)."""
    _check(models)
    return [_cast(np.median(_stack(models, k), axis=0), models[0][k]) for k in range(len(models[0]))]


def trim_count(n, beta):
    """How many values trimmed_mean drops at EACH end of a coordinate's n values: floor(beta * n)."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"trim beta must be in [0, 0.5), got {beta}")
    if n < 1:
        raise ValueError("no models to aggregate")
    return math.floor(beta * n)


def trimmed_mean(models, beta):
    """Coordinate-wise trimmed mean: sort each coordinate's n values, drop k = trim_count(n, beta) from each end,
    average the remaining n - 2k."""
    _check(models)
    k = trim_count(len(models), beta)
    out = []
    for j in range(len(models[0])):
        values = np.sort(_stack(models, j), axis=0)
        out.append(_cast(np.mean(values[k:len(models) - k], axis=0), models[0][j]))
    return out


def check_krum(n, f, m=1):
    """The (multi-)Krum conditions: f >= 0, n > 2f + 2, 1 <= m <= n - f. ValueError saying which fails."""
    if f < 0:
        raise ValueError(f"krum f must be >= 0, got {f}")
    if n <= 2 * f + 2:
        raise ValueError(f"krum with f={f} needs more than 2f+2 = {2 * f + 2} models, got {n}")
    if not 1 <= m <= n - f:
        raise ValueError(f"krum m must be between 1 and n - f = {n - f}, got {m}")


def krum_scores(models, f):
    """Each model's Krum score: the sum of the squared Euclidean distances to its n - f - 2 nearest other models."""
    _check(models)
    n = len(models)
    check_krum(n, f)
    flat = [_flat(model) for model in models]
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            d = flat[i] - flat[j]
            dist[i, j] = dist[j, i] = float(np.sum(d * d))
    scores = []
    for i in range(n):
        others = np.sort(np.delete(dist[i], i))
        scores.append(float(np.sum(others[:n - f - 2])))
    return np.array(scores)


def krum_select(models, f, m=1):
    """The indexes of the m lowest Krum scores, lowest first (equal scores: the lower index first)."""
    check_krum(len(models), f, m)
    scores = krum_scores(models, f)
    return [int(i) for i in np.argsort(scores, kind="stable")[:m]]


def krum(models, f, m=1):
    """(Multi-)Krum: the plain mean of the m models krum_select picks (m = 1: that model itself)."""
    return mean([models[i] for i in krum_select(models, f, m)])


# --- server optimisers -------------------------------------------------------------------------------

def _deltas(start, aggregate):
    shapes = _check([start, aggregate])
    return shapes, [np.asarray(a, dtype=np.float64) - np.asarray(s, dtype=np.float64)
                    for s, a in zip(start, aggregate)]


def _state_arrays(state, key, shapes):
    """state[key] as float64 arrays checked against the model's shapes; zeros when state is None."""
    if state is None:
        return [np.zeros(shape) for shape in shapes]
    arrays = state.get(key) if isinstance(state, dict) else None
    if arrays is None or [np.shape(a) for a in arrays] != shapes:
        raise ValueError(f"optimizer state {key!r} does not match the model's weight shapes")
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _f32(arrays):
    return [a.astype(np.float32) for a in arrays]


class FedAvgM:
    """Server momentum: v = momentum * v + delta; new = start + server_lr * v. State {"v": [float32 arrays]}."""

    name = "fedavgm"
    slots = ("v",)

    def __init__(self, server_lr=1.0, momentum=0.9):
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server lr must be > 0, got {server_lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
        self.server_lr, self.momentum = float(server_lr), float(momentum)

    def params(self):
        return {"server_lr": self.server_lr, "momentum": self.momentum}

    def step(self, start, aggregate, state):
        shapes, delta = _deltas(start, aggregate)
        v = [self.momentum * v + d for v, d in zip(_state_arrays(state, "v", shapes), delta)]
        new = [_cast(np.asarray(s, dtype=np.float64) + self.server_lr * vk, a)
               for s, vk, a in zip(start, v, aggregate)]
        return new, {"v": _f32(v)}


class FedAdam:
    """Adam on the server (Reddi et al. 2021): m = b1 m + (1 - b1) delta; v = b2 v + (1 - b2) delta^2;
    new = start + server_lr * m / (sqrt(v) + tau). State {"m": [...], "v": [...]} (float32 arrays)."""

    name = "fedadam"
    slots = ("m", "v")

    def __init__(self, server_lr, beta1=0.9, beta2=0.99, tau=1e-3):
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server lr must be > 0, got {server_lr}")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.server_lr, self.beta1, self.beta2, self.tau = float(server_lr), float(beta1), float(beta2), float(tau)

    def params(self):
        return {"server_lr": self.server_lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def step(self, start, aggregate, state):
        shapes, delta = _deltas(start, aggregate)
        m = [self.beta1 * mk + (1 - self.beta1) * d for mk, d in zip(_state_arrays(state, "m", shapes), delta)]
        v = [self.beta2 * vk + (1 - self.beta2) * d * d for vk, d in zip(_state_arrays(state, "v", shapes), delta)]
        new = [_cast(np.asarray(s, dtype=np.float64) + self.server_lr * mk / (np.sqrt(vk) + self.tau), a)
               for s, mk, vk, a in zip(start, m, v, aggregate)]
        return new, {"m": _f32(m), "v": _f32(v)}
