"""``ou``: a tiny 2-D Ornstein-Uhlenbeck task with closed-form marginals (tests and demos).

    dX = -θ (X - m) dt + σ dW,   X_0 ~ N(μ0, s0² I)

Every marginal is Gaussian: mean ``m + (μ0 - m) e^{-θt}``, per-coordinate variance
``s0² e^{-2θt} + σ²/(2θ) (1 - e^{-2θt})``. Samples are drawn with the exact transition (no time
discretisation), so the ``oracle`` row is the finite-sample floor (in ``paired``, slightly below
it: the oracle shares its start particles with the targets).

Grid: 12 marginals at t_k = 0.25 k, N = 300; train k = 0..7, forecast k = 8..11 (one rollout
query from t0). ``paired``: the same particles at every time; ``unpaired``: an independent draw per
time, rows shuffled. t0 exposes the probability-flow velocity
``v(x) = -θ (x - m) + (σ²/2) (x - μ0) / s0²``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from harness.protocol import Marginal, Query, TableColumn, Target, Task, TrainData

THETA = 1.0
SIGMA = 0.5
MU0 = np.array([2.0, 0.0])
S0 = 0.3
M = np.array([0.0, 1.0])
N = 300
N_TIMES = 12
N_TRAIN = 8
DT = 0.25


def mean_at(t: float) -> np.ndarray:
    return M + (MU0 - M) * np.exp(-THETA * t)


def var_at(t: float) -> float:
    e = np.exp(-2 * THETA * t)
    return S0**2 * e + SIGMA**2 / (2 * THETA) * (1 - e)


def transition(x: np.ndarray, dt: float, rng: np.random.Generator) -> np.ndarray:
    """Exact OU transition over ``dt``."""
    e = np.exp(-THETA * dt)
    sd = np.sqrt(SIGMA**2 / (2 * THETA) * (1 - e**2))
    return M + (x - M) * e + sd * rng.standard_normal(x.shape)


def flow_velocity(x: np.ndarray) -> np.ndarray:
    return -THETA * (x - M) + 0.5 * SIGMA**2 * (x - MU0) / S0**2


@dataclass(frozen=True)
class OUSimulator:
    """The true process, picklable (for the oracle)."""

    def __call__(self, start: Marginal, times: Sequence[float], seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        x, t, out = start.x.copy(), start.t, []
        for tt in times:
            x = transition(x, tt - t, rng)
            t = tt
            out.append(x.copy())
        return out


class OU(Task):
    family = "ou"
    variants = ("paired", "unpaired")
    table_protocol = "one rollout from t0 per job; Train W1 = mean over t1..t7, Forecast W1 = over t8..t11"
    has_simulator = True
    description = "2-D Ornstein-Uhlenbeck, closed-form marginals (toy task for tests and demos)"

    def _generate(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, 0 if self.variant == "paired" else 1])
        times = DT * np.arange(N_TIMES)
        if self.variant == "paired":
            x = MU0 + S0 * rng.standard_normal((N, 2))
            xs = [x]
            for _ in range(1, N_TIMES):
                x = transition(x, DT, rng)
                xs.append(x)
            return xs
        return [mean_at(t) + np.sqrt(var_at(t)) * rng.standard_normal((N, 2)) for t in times]

    def _all(self) -> list[np.ndarray]:
        if not hasattr(self, "_cache"):
            self._cache = self._generate()
        return self._cache

    def train_data(self) -> TrainData:
        xs = self._all()
        ms = [
            Marginal(DT * k, xs[k], flow_velocity(xs[k]) if k == 0 else None, index=k) for k in range(N_TRAIN)
        ]
        return TrainData(tuple(ms), family=self.family, variant=self.variant, paired=self.variant == "paired")

    def queries(self) -> list[Query]:
        xs = self._all()
        start = Marginal(0.0, xs[0], flow_velocity(xs[0]), index=0)
        targets = [
            Target(DT * k, xs[k], "train" if k < N_TRAIN else "test", index=k) for k in range(1, N_TIMES)
        ]
        return [Query("rollout", "rollout", start, tuple(targets))]

    def summarize(self, query: Query, w1) -> dict:
        """Train / Forecast W1 of the rollout, in a column group per variant (paired, unpaired)."""
        cells = super().summarize(query, w1)
        return {TableColumn(self.variant, c.key): v for c, v in cells.items()}

    def simulator(self) -> OUSimulator:
        return OUSimulator()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_cache", None)  # regenerated on demand: keeps Ray payloads small
        return state
