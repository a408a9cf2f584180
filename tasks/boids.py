"""``boids``: interacting agents (WLM paper section 4.4, Appendix C.4, Tables 4 and 7, Figures 5 and 9).

N = 1000 boids in 2-D. Start: ``x ~ N(0, I)``; ``v = normalize(ε − mean(ε))`` with ``ε ~ N(0, I)``
per boid (unit-speed random directions, mean removed before normalising). One update per marginal
interval, ``dt = 0.5``, for every boid i at once (``dX_ij = X_j − X_i``; neighbourhoods include i):

- cohesion   ``c_i = mean{ dX_ij : ‖dX_ij‖ < 1.0 }``
- separation ``s_i = − Σ{ dX_ij : ‖dX_ij‖ < 0.3 }`` (a sum, not a mean)
- alignment  ``a_i = mean{ V_j − V_i : ‖dX_ij‖ < 1.0 }``
- boundary   ``b_i = − sign(X_i) ⊙ 1[|X_i| > 5]`` (per coordinate)
- ``dV = 0.005 c + 0.1 s + 0.3 a + 0.5 b``; ``V ← normalize(V + dt dV)``; ``X ← X + dt V``.

(As specified, the boundary push is undone by the renormalisation for a boid heading exactly
straight out along the push, e.g. v = (1, 0) at x = (6, 0); any other heading turns back. This is
a property of the rule, a measure-zero case, and is kept.)

Marginals: positions at t_k = 0.5 k, k = 0..99, rows shuffled independently per time (a
population, not tracks). Train on k = 0..49; t0 also exposes the true initial velocities.

Variants:

- ``default``: one ``rollout`` query from t0 (with its velocities): targets k = 1..49 (``train``)
  and k = 50..99 (``test``); columns ``train_w1`` and ``forecast_w1`` (the paper's Table 4).
- ``unseen-init``: the same training data; three rollout queries ``gmm2``, ``gmm3``, ``gmm4``
  start from new populations drawn from 2-, 3- and 4-component Gaussian mixtures (component means
  uniform in [−3, 3]², standard deviations uniform in [0.3, 1.5], equal weights; velocities drawn
  as above; all seeded) and are scored against the simulator (the paper's Figure 9, turned into
  numbers: columns ``w1_gmm2`` etc., the mean W1 over the rollout, all targets group ``test``).
  To keep scoring affordable (exact W1 + W2 + MMD cost ~0.5 s per 1000x1000 target) only every
  5th time is scored: t = 2.5, 5.0, ..., 47.5 (k = 5, 10, ..., 95; 19 targets per query).

Oracle: the simulator itself from the start state (deterministic). The simulator puts its input in
a canonical row order (sorted by position) before stepping, so a shuffled copy of a population
gives bitwise the same trajectories: the oracle's W1 from the t0 marginal is 0 up to the
rounding of POT's distance matrix (about 1e-8 on this scale). Neighbour
sums use a k-d tree and ``np.bincount`` (no BLAS), so results do not depend on thread counts.
Generated data are cached on disk (``tasks._cache``), keyed by variant and seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from harness.protocol import Marginal, Query, TableColumn, Target, Task, TrainData
from tasks._cache import cached_arrays

N = 1000
N_TIMES = 100
N_TRAIN = 50
DT = 0.5
R_OUTER = 1.0
R_INNER = 0.3
W_COHESION = 0.005
W_SEPARATION = 0.1
W_ALIGNMENT = 0.3
W_BOUNDARY = 0.5
BOUNDARY = 5.0
GMM_COMPONENTS = (2, 3, 4)
GMM_MEAN_RANGE = 3.0
GMM_STD_RANGE = (0.3, 1.5)
UNSEEN_SCORE_EVERY = 5
GENERATOR_VERSION = 1


def time_of(k: int) -> float:
    return k * DT


# --------------------------------------------------------------------------------------------
# The simulator


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def accelerations(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``dV`` of every boid (the four weighted rules), shape (n, 2)."""
    from scipy.spatial import cKDTree

    n = len(x)
    pairs = cKDTree(x).query_pairs(R_OUTER, output_type="ndarray")  # unordered i < j, ‖.‖ <= r
    i, j = pairs[:, 0], pairs[:, 1]
    xs, ys = x[:, 0].copy(), x[:, 1].copy()
    dx = xs[j] - xs[i]
    dy = ys[j] - ys[i]
    d2 = dx * dx + dy * dy
    keep = d2 < R_OUTER**2  # strict inequality, as specified
    if not keep.all():
        i, j, dx, dy, d2 = i[keep], j[keep], dx[keep], dy[keep], d2[keep]

    def pair_sum(w: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
        # Σ_j w_ij over ordered pairs, with w_ji = −w_ij (w is antisymmetric: differences)
        return np.bincount(ii, w, minlength=n) - np.bincount(jj, w, minlength=n)

    count = 1.0 + np.bincount(i, minlength=n) + np.bincount(j, minlength=n)  # i itself included
    cohesion = np.stack([pair_sum(dx, i, j), pair_sum(dy, i, j)], 1) / count[:, None]
    near = d2 < R_INNER**2
    separation = -np.stack([pair_sum(dx[near], i[near], j[near]), pair_sum(dy[near], i[near], j[near])], 1)
    vx, vy = v[:, 0].copy(), v[:, 1].copy()
    alignment = np.stack([pair_sum(vx[j] - vx[i], i, j), pair_sum(vy[j] - vy[i], i, j)], 1) / count[:, None]
    boundary = -np.sign(x) * (np.abs(x) > BOUNDARY)
    return W_COHESION * cohesion + W_SEPARATION * separation + W_ALIGNMENT * alignment + W_BOUNDARY * boundary


def step(x: np.ndarray, v: np.ndarray, dt: float = DT) -> tuple[np.ndarray, np.ndarray]:
    """One update: ``V ← normalize(V + dt dV)``, ``X ← X + dt V``."""
    v = _normalize(v + dt * accelerations(x, v))
    return x + dt * v, v


def simulate(x0: np.ndarray, v0: np.ndarray, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and velocities after 0..n_steps updates: two arrays of shape (n_steps + 1, n, 2).

    Rows keep the input order; internally the population is put in a canonical order first, so
    any permutation of the input gives bitwise the same (permuted) trajectories.
    """
    x0 = np.asarray(x0, dtype=np.float64)
    v0 = np.asarray(v0, dtype=np.float64)
    order = np.lexsort((v0[:, 1], v0[:, 0], x0[:, 1], x0[:, 0]))
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    x, v = x0[order], v0[order]
    xs, vs = [x], [v]
    for _ in range(int(n_steps)):
        x, v = step(x, v)
        xs.append(x)
        vs.append(v)
    return np.stack(xs)[:, inverse], np.stack(vs)[:, inverse]


def initial_velocities(n: int, rng: np.random.Generator) -> np.ndarray:
    eps = rng.standard_normal((n, 2))
    return _normalize(eps - eps.mean(0))


def gmm_positions(n: int, n_components: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points from a random equal-weight Gaussian mixture (the unseen-init starts)."""
    means = rng.uniform(-GMM_MEAN_RANGE, GMM_MEAN_RANGE, (n_components, 2))
    stds = rng.uniform(*GMM_STD_RANGE, n_components)
    counts = rng.multinomial(n, np.full(n_components, 1.0 / n_components))
    comp = np.repeat(np.arange(n_components), counts)
    x = means[comp] + stds[comp, None] * rng.standard_normal((n, 2))
    return x[rng.permutation(n)]


@dataclass(frozen=True)
class BoidsSimulator:
    """The true process (picklable, deterministic): ``seed`` is ignored; ``start.v`` is required."""

    def __call__(self, start: Marginal, times: Sequence[float], seed: int) -> list[np.ndarray]:
        if start.v is None:
            raise ValueError("the Boids simulator needs the start velocities")
        steps = []
        for tt in times:
            k = int(round((tt - start.t) / DT))
            if k < 0 or abs(k * DT - (tt - start.t)) > 1e-9:
                raise ValueError(f"time {tt} is not a multiple of dt={DT} after {start.t}")
            steps.append(k)
        xs, _ = simulate(start.x, start.v, max(steps) if steps else 0)
        return [xs[k].copy() for k in steps]


# --------------------------------------------------------------------------------------------
# The task


def _shuffled(xs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows shuffled independently per time; returns the arrays and the t0 permutation."""
    out = np.empty_like(xs)
    perm0 = None
    for k in range(len(xs)):
        p = rng.permutation(xs.shape[1])
        perm0 = p if k == 0 else perm0
        out[k] = xs[k][p]
    return out, perm0


class Boids(Task):
    family = "boids"
    variants = ("default", "unseen-init")
    table_protocol = ("one rollout from t0 (positions and velocities); Train W1 = mean over t1..t49, "
                      "Forecast W1 = over t50..t99; unseen-init: rollouts from new 2/3/4-component Gaussian "
                      "mixtures, mean over t5, t10, ..., t95")
    has_simulator = True
    description = (
        "2-D Boids (1000 agents, 100 marginals, dt 0.5): train 0..49, forecast 50..99; true t0 "
        "velocities; unseen-init scores rollouts from new 2/3/4-component Gaussian mixtures"
    )
    paper_table = {"": (4, "default")}

    @classmethod
    def training_key(cls, variant: str) -> str:
        return "t0-t49"  # both variants train on the same 50 marginals: one fit answers both

    def _params(self, what: str) -> dict:
        import scipy  # its KD-tree orders neighbour pairs, which orders the chaotic sums: part of the key

        return {
            "family": self.family, "what": what, "seed": self.seed, "n": N, "n_times": N_TIMES, "dt": DT,
            "radii": [R_OUTER, R_INNER], "weights": [W_COHESION, W_SEPARATION, W_ALIGNMENT, W_BOUNDARY],
            "boundary": BOUNDARY, "gmm": [GMM_MEAN_RANGE, *GMM_STD_RANGE], "version": GENERATOR_VERSION,
            "scipy": scipy.__version__,
        }

    def _generate_default(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 71]))
        x0 = rng.standard_normal((N, 2))
        v0 = initial_velocities(N, rng)
        xs, _ = simulate(x0, v0, N_TIMES - 1)
        xs, perm0 = _shuffled(xs, rng)
        return {"x": xs, "v0": v0[perm0]}

    def _generate_gmm(self, n_components: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 72, n_components]))
        x0 = gmm_positions(N, n_components, rng)
        v0 = initial_velocities(N, rng)
        xs, _ = simulate(x0, v0, N_TIMES - 1)
        xs, perm0 = _shuffled(xs, rng)
        return {"x": xs, "v0": v0[perm0]}

    def _default(self) -> dict[str, np.ndarray]:
        if getattr(self, "_data", None) is None:
            self._data = cached_arrays(self.family, self._params("default"), self._generate_default)
        return self._data

    def train_data(self) -> TrainData:
        d = self._default()
        ms = [
            Marginal(time_of(k), d["x"][k], d["v0"] if k == 0 else None, index=k) for k in range(N_TRAIN)
        ]
        return TrainData(tuple(ms), family=self.family, variant=self.variant, paired=False)

    def queries(self) -> list[Query]:
        if self.variant == "default":
            d = self._default()
            start = Marginal(0.0, d["x"][0], d["v0"], index=0)
            targets = [
                Target(time_of(k), d["x"][k], "train" if k < N_TRAIN else "test", index=k)
                for k in range(1, N_TIMES)
            ]
            return [Query("rollout", "rollout", start, tuple(targets))]
        out = []
        for c in GMM_COMPONENTS:
            g = cached_arrays(self.family, self._params(f"gmm{c}"), lambda c=c: self._generate_gmm(c))
            # index -1: these populations are not marginals of the task's own time grid
            start = Marginal(0.0, g["x"][0], g["v0"], index=-1)
            targets = [
                Target(time_of(k), g["x"][k], "test", index=-1)
                for k in range(UNSEEN_SCORE_EVERY, N_TIMES, UNSEEN_SCORE_EVERY)
            ]
            out.append(Query(f"gmm{c}", "rollout", start, tuple(targets)))
        return out

    def simulator(self) -> BoidsSimulator:
        return BoidsSimulator()

    def summarize(self, query: Query, w1: Sequence[float]) -> dict[TableColumn, float]:
        if self.variant == "default":
            return {
                TableColumn("", c.key, paper_variant="default"): v for c, v in super().summarize(query, w1).items()
            }
        w = np.asarray(w1, dtype=float)
        if w.size and np.all(np.isfinite(w)):
            return {TableColumn("unseen-init", f"w1_{query.name}"): float(w.mean())}
        return {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_data", None)  # read back from the disk cache on demand
        return state
