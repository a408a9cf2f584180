"""``gf_sde``: gradient-flow SDEs in 2-D (WLM paper section 4.1, Appendix C.1, Tables 1 and 6).

    dX = -∇V(X) dt + σ dW,   σ² = 1,   X_0 ~ p0 = N(0, 0.2 I)

Five potentials (the paper's equations 41-45, x = (x1, x2)):

=================  =====================================================
``bohachevsky``    10 (x1² + 2 x2² − 0.3 cos(3π x1) − 0.4 cos(4π x2))
``oakley_ohagan``  5 Σ_i (sin x_i + cos x_i + x_i² + x_i)
``quadratic``      5 ‖x‖²   (an Ornstein-Uhlenbeck process: closed-form marginals, simulated
                   by the same Euler-Maruyama scheme as the others)
``styblinski_tang`` ½ Σ_i (x_i⁴ − 16 x_i² + 5 x_i)
``wavy_plateau``   Σ_i (cos(π x_i) + ½ x_i⁴ − 3 x_i² + 1)
=================  =====================================================

Data: 20 marginals at t_k = 0.01 k (k = 0..19), N = 1000 particles each, Euler-Maruyama with step
0.001 (10 steps per interval). Train on k = 0..9; one ``rollout`` query from t0 scores k = 1..9
(``train``) and k = 10..19 (``test``, the paper's "next 10").

- ``<potential>-paired``: one set of N trajectories; row i is the same particle at every time
  (``TrainData.paired`` is True).
- ``<potential>-unpaired``: every marginal is an independent simulation (fresh draws from p0 run
  to t_k), rows shuffled: nothing links rows across times.

Velocities: at t0 only, the exact probability-flow velocity of the SDE,
``v0(x) = −∇V(x) − (σ²/2) ∇log p0(x) = −∇V(x) + (σ²/2) x / 0.2``; it uses the true V, so it is
privileged information (in the paper only "WLM (0 friction)" uses it). The rollout's start is the
t0 marginal with these velocities.

The true simulator (picklable, for the ``oracle``) runs the same Euler-Maruyama scheme from the
start positions with fresh noise. Generated data are cached on disk (``tasks._cache``), keyed by
variant and seed. The paper's potentials are used, not the reference code's functions of the same
names (see ``../shared/spec/tasks.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from harness.protocol import Marginal, Query, TableColumn, Target, Task, TrainData
from tasks._cache import cached_arrays

POTENTIALS: tuple[str, ...] = ("bohachevsky", "oakley_ohagan", "quadratic", "styblinski_tang", "wavy_plateau")
MODES: tuple[str, ...] = ("paired", "unpaired")
SIGMA2 = 1.0  # diffusivity σ²
P0_VAR = 0.2  # variance of p0 per coordinate
DT_EM = 0.001  # Euler-Maruyama step
STEPS_PER_INTERVAL = 10  # marginal spacing 0.01 = 10 EM steps
N = 1000
N_TIMES = 20
N_TRAIN = 10
GENERATOR_VERSION = 1


def time_of(k: int) -> float:
    return k / 100.0  # t_k = 0.01 k, written so that t_k is the double nearest to k/100


# --------------------------------------------------------------------------------------------
# Potentials


def potential(name: str, x: np.ndarray) -> np.ndarray:
    """V(x) for points ``x`` of shape (n, 2)."""
    x = np.asarray(x, dtype=np.float64)
    x1, x2 = x[:, 0], x[:, 1]
    if name == "bohachevsky":
        return 10 * (x1**2 + 2 * x2**2 - 0.3 * np.cos(3 * np.pi * x1) - 0.4 * np.cos(4 * np.pi * x2))
    if name == "oakley_ohagan":
        return 5 * (np.sin(x) + np.cos(x) + x**2 + x).sum(1)
    if name == "quadratic":
        return 5 * (x**2).sum(1)
    if name == "styblinski_tang":
        return 0.5 * (x**4 - 16 * x**2 + 5 * x).sum(1)
    if name == "wavy_plateau":
        return (np.cos(np.pi * x) + 0.5 * x**4 - 3 * x**2 + 1).sum(1)
    raise ValueError(f"unknown potential {name!r}")


def grad_potential(name: str, x: np.ndarray) -> np.ndarray:
    """∇V(x), shape (n, 2)."""
    x = np.asarray(x, dtype=np.float64)
    if name == "bohachevsky":
        g = np.empty_like(x)
        g[:, 0] = 10 * (2 * x[:, 0] + 0.9 * np.pi * np.sin(3 * np.pi * x[:, 0]))
        g[:, 1] = 10 * (4 * x[:, 1] + 1.6 * np.pi * np.sin(4 * np.pi * x[:, 1]))
        return g
    if name == "oakley_ohagan":
        return 5 * (np.cos(x) - np.sin(x) + 2 * x + 1)
    if name == "quadratic":
        return 10 * x
    if name == "styblinski_tang":
        return 2 * x**3 - 16 * x + 2.5
    if name == "wavy_plateau":
        return -np.pi * np.sin(np.pi * x) + 2 * x**3 - 6 * x
    raise ValueError(f"unknown potential {name!r}")


def flow_velocity(name: str, x: np.ndarray) -> np.ndarray:
    """The probability-flow velocity at t0: ``−∇V(x) + (σ²/2) x / 0.2`` (exact for p0 = N(0, 0.2 I))."""
    x = np.asarray(x, dtype=np.float64)
    return -grad_potential(name, x) + 0.5 * SIGMA2 * x / P0_VAR


# --------------------------------------------------------------------------------------------
# Simulation (vectorised Euler-Maruyama)


def em_steps(name: str, x: np.ndarray, n_steps: int, rng: np.random.Generator, dt: float = DT_EM) -> np.ndarray:
    """``n_steps`` Euler-Maruyama steps of the SDE from ``x`` (any leading shape, last axis 2)."""
    x = np.array(x, dtype=np.float64, copy=True)
    shape = x.shape
    sd = np.sqrt(SIGMA2 * dt)
    for _ in range(int(n_steps)):
        flat = x.reshape(-1, 2)
        x = (flat - dt * grad_potential(name, flat)).reshape(shape) + sd * rng.standard_normal(shape)
    return x


def sample_p0(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sqrt(P0_VAR) * rng.standard_normal((n, 2))


def simulate_paired(name: str, n: int, n_times: int, rng: np.random.Generator) -> np.ndarray:
    """One set of ``n`` trajectories observed at t_0..t_{n_times-1}: shape (n_times, n, 2)."""
    x = sample_p0(n, rng)
    out = [x]
    for _ in range(1, n_times):
        x = em_steps(name, x, STEPS_PER_INTERVAL, rng)
        out.append(x)
    return np.stack(out)


def simulate_unpaired(name: str, n: int, n_times: int, rng: np.random.Generator) -> np.ndarray:
    """An independent simulation per time (fresh p0 draws run to t_k), rows shuffled.

    All populations advance together: population k takes part in the first 10 k steps only.
    """
    xs = np.sqrt(P0_VAR) * rng.standard_normal((n_times, n, 2))
    sd = np.sqrt(SIGMA2 * DT_EM)
    for s in range(1, STEPS_PER_INTERVAL * (n_times - 1) + 1):
        k0 = -(-s // STEPS_PER_INTERVAL)  # populations k >= ceil(s / 10) still move
        active = xs[k0:].reshape(-1, 2)
        moved = active - DT_EM * grad_potential(name, active) + sd * rng.standard_normal(active.shape)
        xs[k0:] = moved.reshape(n_times - k0, n, 2)
    for k in range(n_times):
        xs[k] = xs[k][rng.permutation(n)]
    return xs


@dataclass(frozen=True)
class GFSDESimulator:
    """The true SDE (picklable): Euler-Maruyama, step 0.001, fresh noise from ``seed``."""

    potential: str

    def __call__(self, start: Marginal, times: Sequence[float], seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        x, t, out = np.array(start.x, dtype=np.float64), start.t, []
        for tt in times:
            n_steps = int(round((tt - t) / DT_EM))
            if n_steps < 0 or abs(n_steps * DT_EM - (tt - t)) > 1e-9:
                raise ValueError(f"time {tt} is not a multiple of the EM step {DT_EM} after {t}")
            x = em_steps(self.potential, x, n_steps, rng)
            t = tt
            out.append(x.copy())
        return out


# --------------------------------------------------------------------------------------------
# The task


class GFSDE(Task):
    family = "gf_sde"
    variants = tuple(f"{p}-{m}" for p in POTENTIALS for m in MODES)
    has_simulator = True
    description = (
        "2-D gradient-flow SDEs (5 potentials x paired/unpaired), 20 marginals of 1000 particles at "
        "t = 0.01k; train 0..9, forecast 10..19; exact probability-flow velocity at t0"
    )
    paper_table = {"paired": (1, "mean-of-5/paired"), "unpaired": (1, "mean-of-5/unpaired")}
    table_protocol = ("one rollout from t0 per job; Train W1 = mean over t1..t9, Forecast W1 = over t10..t19; "
                      "paired/unpaired = the 5 SDEs' paired/unpaired variants")
    column_averages = {(m, key): tuple(f"{p}-{m}" for p in POTENTIALS) for m in MODES
                       for key in ("train_w1", "forecast_w1")}

    @property
    def potential(self) -> str:
        return self.variant.rsplit("-", 1)[0]

    @property
    def mode(self) -> str:
        return self.variant.rsplit("-", 1)[1]

    def _params(self) -> dict:
        return {
            "family": self.family, "variant": self.variant, "seed": self.seed, "n": N, "n_times": N_TIMES,
            "dt_em": DT_EM, "steps_per_interval": STEPS_PER_INTERVAL, "sigma2": SIGMA2, "p0_var": P0_VAR,
            "version": GENERATOR_VERSION,
        }

    def _generate(self) -> dict[str, np.ndarray]:
        ss = np.random.SeedSequence([self.seed, POTENTIALS.index(self.potential), MODES.index(self.mode), 41])
        rng = np.random.default_rng(ss)
        sim = simulate_paired if self.mode == "paired" else simulate_unpaired
        return {"x": sim(self.potential, N, N_TIMES, rng)}

    def _all(self) -> np.ndarray:
        if getattr(self, "_xs", None) is None:
            self._xs = cached_arrays(self.family, self._params(), self._generate)["x"]
        return self._xs

    def train_data(self) -> TrainData:
        xs = self._all()
        ms = [
            Marginal(time_of(k), xs[k], flow_velocity(self.potential, xs[k]) if k == 0 else None, index=k)
            for k in range(N_TRAIN)
        ]
        return TrainData(tuple(ms), family=self.family, variant=self.variant, paired=self.mode == "paired")

    def queries(self) -> list[Query]:
        xs = self._all()
        start = Marginal(0.0, xs[0], flow_velocity(self.potential, xs[0]), index=0)
        targets = [
            Target(time_of(k), xs[k], "train" if k < N_TRAIN else "test", index=k) for k in range(1, N_TIMES)
        ]
        return [Query("rollout", "rollout", start, tuple(targets))]

    def simulator(self) -> GFSDESimulator:
        return GFSDESimulator(self.potential)

    def summarize(self, query: Query, w1: Sequence[float]) -> dict[TableColumn, float]:
        pv = f"{self.potential}/{self.mode}"
        return {
            TableColumn(self.mode, c.key, paper_variant=pv): v for c, v in super().summarize(query, w1).items()
        }

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_xs", None)  # regenerated (or read from the disk cache) on demand
        return state
