"""Gradient-flow SDE tasks: any potential, dimension, noise, population size, times and start.

    dX = -∇V(X) dt + σ dW,   X_0 ~ p0 = N(μ0, s² I)

:class:`GradientFlowSDE` is the family template: a subclass (or its constructor) names the
potentials and may change any setting below; each potential gives a ``<potential>-paired`` and a
``<potential>-unpaired`` variant. Its defaults are the WLM paper's protocol (section 4.1, Appendix
C.1), and :class:`GFSDE` (``gf_sde``, Tables 1 and 6) is the five potentials of the paper with
nothing else changed:

=================  =====================================================
``bohachevsky``    10 (x1² + 2 x2² − 0.3 cos(3π x1) − 0.4 cos(4π x2))
``oakley_ohagan``  5 Σ_i (sin x_i + cos x_i + x_i² + x_i)
``quadratic``      5 ‖x‖²   (an Ornstein-Uhlenbeck process: closed-form marginals, simulated
                   by the same Euler-Maruyama scheme as the others)
``styblinski_tang`` ½ Σ_i (x_i⁴ − 16 x_i² + 5 x_i)
``wavy_plateau``   Σ_i (cos(π x_i) + ½ x_i⁴ − 3 x_i² + 1)
=================  =====================================================

(The paper's equations 41-45, not the functions of the same names in the authors' code.)

Settings (class attributes, or keywords of the constructor):

- ``potentials``: name -> :class:`Potential` (V and ∇V, module-level functions so that the task
  pickles), or the name of a shipped potential above; a tuple of shipped names also works.
- ``dim`` = 2, ``sigma`` = 1 (σ, so the diffusivity σ² = 1), ``n`` = 1000 particles,
  ``times`` = 0, 0.01, ..., 0.19 (20 marginals), ``n_train`` = 10 (train on the first 10, forecast
  the rest), ``em_step`` = 0.001 (Euler-Maruyama; every time is a multiple of it from the first),
  ``p0_mean`` = 0 and ``p0_var`` = 0.2 (variance per coordinate).

Data: ``paired`` is one set of n trajectories (row i is the same particle at every time,
``TrainData.paired``); ``unpaired`` is an independent simulation per time (fresh p0 draws run to
t_k), rows shuffled, so nothing links rows across times. One ``rollout`` query from t0 scores the
other training times (``train``) and the later ones (``test``); columns ``train_w1`` and
``forecast_w1`` in a column group per mode.

Velocities: at t0 only, the exact probability-flow velocity of the SDE,
``v0(x) = −∇V(x) − (σ²/2) ∇log p0(x) = −∇V(x) + (σ²/2) (x − μ0) / s²``; it uses the true V, so it
is privileged information (in the paper only "WLM (0 friction)" uses it). The rollout's start is
the t0 marginal with these velocities.

The true simulator (picklable, for the ``oracle``) runs the same Euler-Maruyama scheme from the
start positions with fresh noise. Data of the shipped potentials are cached on disk
(``tasks._cache``), keyed by every setting and the seed; data of your own potential functions are
regenerated per process (about a second at the defaults), since the cache could not tell when
your function changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from harness.protocol import Marginal, PopbenchError, Query, TableColumn, Target, Task, TrainData
from tasks._cache import cached_arrays

MODES: tuple[str, ...] = ("paired", "unpaired")
GENERATOR_VERSION = 2


# --------------------------------------------------------------------------------------------
# Potentials


@dataclass(frozen=True)
class Potential:
    """A potential V and its gradient, both for points of shape (n, d): ``value(x)`` has shape (n,),
    ``grad(x)`` shape (n, d). Use module-level functions (a lambda does not pickle)."""

    value: Callable[[np.ndarray], np.ndarray]
    grad: Callable[[np.ndarray], np.ndarray]


def _bohachevsky(x):
    x1, x2 = x[:, 0], x[:, 1]
    return 10 * (x1**2 + 2 * x2**2 - 0.3 * np.cos(3 * np.pi * x1) - 0.4 * np.cos(4 * np.pi * x2))


def _bohachevsky_grad(x):
    g = np.empty_like(x)
    g[:, 0] = 10 * (2 * x[:, 0] + 0.9 * np.pi * np.sin(3 * np.pi * x[:, 0]))
    g[:, 1] = 10 * (4 * x[:, 1] + 1.6 * np.pi * np.sin(4 * np.pi * x[:, 1]))
    return g


def _oakley_ohagan(x):
    return 5 * (np.sin(x) + np.cos(x) + x**2 + x).sum(1)


def _oakley_ohagan_grad(x):
    return 5 * (np.cos(x) - np.sin(x) + 2 * x + 1)


def _quadratic(x):
    return 5 * (x**2).sum(1)


def _quadratic_grad(x):
    return 10 * x


def _styblinski_tang(x):
    return 0.5 * (x**4 - 16 * x**2 + 5 * x).sum(1)


def _styblinski_tang_grad(x):
    return 2 * x**3 - 16 * x + 2.5


def _wavy_plateau(x):
    return (np.cos(np.pi * x) + 0.5 * x**4 - 3 * x**2 + 1).sum(1)


def _wavy_plateau_grad(x):
    return -np.pi * np.sin(np.pi * x) + 2 * x**3 - 6 * x


SHIPPED: dict[str, Potential] = {
    "bohachevsky": Potential(_bohachevsky, _bohachevsky_grad),
    "oakley_ohagan": Potential(_oakley_ohagan, _oakley_ohagan_grad),
    "quadratic": Potential(_quadratic, _quadratic_grad),
    "styblinski_tang": Potential(_styblinski_tang, _styblinski_tang_grad),
    "wavy_plateau": Potential(_wavy_plateau, _wavy_plateau_grad),
}
"""The paper's potentials by name (2-D formulas; ``quadratic``, ``oakley_ohagan``,
``styblinski_tang`` and ``wavy_plateau`` are sums over coordinates, so they work in any dimension)."""
POTENTIALS: tuple[str, ...] = tuple(SHIPPED)


def as_potential(p: Potential | str | tuple) -> Potential:
    """A :class:`Potential` from itself, a shipped name, or a ``(value, grad)`` pair."""
    if isinstance(p, Potential):
        return p
    if isinstance(p, str):
        if p not in SHIPPED:
            raise PopbenchError(f"unknown potential {p!r}; the shipped ones are {', '.join(SHIPPED)}")
        return SHIPPED[p]
    if isinstance(p, tuple) and len(p) == 2 and all(callable(f) for f in p):
        return Potential(*p)
    raise PopbenchError(f"a potential is a Potential(value, grad), a (value, grad) pair or a shipped name, got {p!r}")


# --------------------------------------------------------------------------------------------
# The SDE (vectorised Euler-Maruyama); also the picklable true simulator


@dataclass(frozen=True)
class SDE:
    """``dX = -∇V dt + σ dW`` from ``p0 = N(p0_mean, p0_var I)``, stepped by Euler-Maruyama.

    Called as ``sde(start, times, seed)`` it is the task's true simulator (for the ``oracle``):
    the same scheme from the start positions with fresh noise from ``seed``.
    """

    potential: Potential
    dim: int = 2
    sigma: float = 1.0
    em_step: float = 0.001
    p0_mean: Any = 0.0
    p0_var: float = 0.2

    def _shifted(self, z: np.ndarray) -> np.ndarray:
        return z + np.asarray(self.p0_mean, dtype=np.float64) if np.any(self.p0_mean) else z

    def sample_p0(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """Draws from p0, of shape ``shape + (dim,)``."""
        return self._shifted(np.sqrt(self.p0_var) * rng.standard_normal((*shape, self.dim)))

    def flow_velocity(self, x: np.ndarray) -> np.ndarray:
        """The probability-flow velocity at t0: ``−∇V(x) + (σ²/2) (x − μ0) / s²`` (exact for p0)."""
        x = np.asarray(x, dtype=np.float64)
        centred = x - np.asarray(self.p0_mean, dtype=np.float64) if np.any(self.p0_mean) else x
        return -self.potential.grad(x) + 0.5 * self.sigma**2 * centred / self.p0_var

    def steps(self, x: np.ndarray, n_steps: int, rng: np.random.Generator) -> np.ndarray:
        """``n_steps`` Euler-Maruyama steps from ``x`` (any leading shape, last axis ``dim``)."""
        x = np.array(x, dtype=np.float64, copy=True)
        shape = x.shape
        sd = np.sqrt(self.sigma**2 * self.em_step)
        for _ in range(int(n_steps)):
            flat = x.reshape(-1, shape[-1])
            x = (flat - self.em_step * self.potential.grad(flat)).reshape(shape) + sd * rng.standard_normal(shape)
        return x

    def step_counts(self, times: Sequence[float]) -> list[int]:
        """EM steps from ``times[0]`` to each time; every time must be a whole number of steps."""
        out = []
        for t in times:
            k = int(round((t - times[0]) / self.em_step))
            if k < 0 or abs(k * self.em_step - (t - times[0])) > 1e-9:
                raise PopbenchError(f"time {t} is not a whole number of Euler-Maruyama steps "
                                    f"({self.em_step}) after {times[0]}")
            out.append(k)
        return out

    def paired(self, n: int, times: Sequence[float], rng: np.random.Generator) -> np.ndarray:
        """One set of ``n`` trajectories observed at ``times``: shape (len(times), n, dim)."""
        counts = self.step_counts(times)
        x = self.sample_p0((n,), rng)
        out = [x]
        for a, b in zip(counts, counts[1:]):
            x = self.steps(x, b - a, rng)
            out.append(x)
        return np.stack(out)

    def unpaired(self, n: int, times: Sequence[float], rng: np.random.Generator) -> np.ndarray:
        """An independent simulation per time (fresh p0 draws run to t_k), rows shuffled.

        All populations advance together: population k takes part in its first ``counts[k]`` steps.
        """
        counts = self.step_counts(times)
        xs = self.sample_p0((len(times), n), rng)
        sd = np.sqrt(self.sigma**2 * self.em_step)
        for s in range(1, counts[-1] + 1):
            k0 = next(k for k, c in enumerate(counts) if c >= s)  # populations k >= k0 still move
            active = xs[k0:].reshape(-1, self.dim)
            moved = active - self.em_step * self.potential.grad(active) + sd * rng.standard_normal(active.shape)
            xs[k0:] = moved.reshape(len(times) - k0, n, self.dim)
        for k in range(len(times)):
            xs[k] = xs[k][rng.permutation(n)]
        return xs

    def __call__(self, start: Marginal, times: Sequence[float], seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        counts = self.step_counts([start.t, *times])
        x, out = np.array(start.x, dtype=np.float64), []
        for a, b in zip(counts, counts[1:]):
            x = self.steps(x, b - a, rng)
            out.append(x.copy())
        return out


# --------------------------------------------------------------------------------------------
# The family template and the shipped family


_SETTINGS = ("potentials", "dim", "sigma", "n", "times", "n_train", "em_step", "p0_mean", "p0_var")


class GradientFlowSDE(Task):
    """A gradient-flow SDE family: set ``family`` and ``potentials``; everything else defaults to
    the paper's protocol (see the module docstring). Methods without settings of their own for the
    new family use their ``gf_sde`` settings (``resembles``)."""

    potentials: ClassVar[Mapping[str, Potential | str]] = {}
    modes: ClassVar[tuple[str, ...]] = MODES
    dim: ClassVar[int] = 2
    sigma: ClassVar[float] = 1.0
    n: ClassVar[int] = 1000
    times: ClassVar[tuple[float, ...]] = tuple(k / 100 for k in range(20))
    n_train: ClassVar[int] = 10
    em_step: ClassVar[float] = 0.001
    p0_mean: ClassVar[Any] = 0.0
    p0_var: ClassVar[float] = 0.2
    has_simulator = True
    resembles = "gf_sde"
    table_protocol = ("one rollout from t0 per job; Train W1 = mean over the other training times, Forecast W1 = "
                      "over the later times; paired/unpaired = the potentials' paired/unpaired variants")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if isinstance(cls.potentials, (tuple, list)):
            cls.potentials = {p: p for p in cls.potentials}
        if "variants" not in cls.__dict__:
            cls.variants = tuple(f"{p}-{m}" for p in cls.potentials for m in cls.modes)
        if not cls.__dict__.get("description"):
            cls.description = cls._describe()

    @classmethod
    def _describe(cls) -> str:
        t = cls.times
        return (f"{cls.dim}-D gradient-flow SDE ({', '.join(cls.potentials)} x {'/'.join(cls.modes)}), "
                f"{len(t)} marginals of {cls.n} particles at t = {t[0]:g}..{t[-1]:g}; train the first "
                f"{cls.n_train}, forecast the rest; exact probability-flow velocity at t0")

    def __init__(self, variant: str, *, seed: int = 0, data_dir: str | None = None, **settings: Any):
        unknown = set(settings) - set(_SETTINGS)
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(sorted(unknown))}; the settings are {', '.join(_SETTINGS)}")
        for key, value in settings.items():
            setattr(self, key, value)
        if "potentials" in settings:
            if isinstance(self.potentials, (tuple, list)):
                self.potentials = {p: p for p in self.potentials}
            self.variants = tuple(f"{p}-{m}" for p in self.potentials for m in self.modes)
        super().__init__(variant, seed=seed, data_dir=data_dir)
        if not 2 <= self.n_train <= len(self.times):
            raise PopbenchError(f"{self.family}: n_train must be 2..{len(self.times)}, got {self.n_train}")

    @property
    def potential(self) -> str:
        return self.variant.rsplit("-", 1)[0]

    @property
    def mode(self) -> str:
        return self.variant.rsplit("-", 1)[1]

    def sde(self) -> SDE:
        return SDE(as_potential(self.potentials[self.potential]), dim=self.dim, sigma=self.sigma,
                   em_step=self.em_step, p0_mean=self.p0_mean, p0_var=self.p0_var)

    def _generate(self) -> dict[str, np.ndarray]:
        sde = self.sde()
        probe = sde.sample_p0((2,), np.random.default_rng(0))
        if np.shape(sde.potential.grad(probe)) != probe.shape:
            raise PopbenchError(f"{self.family}: the gradient of potential {self.potential!r} must map (n, {self.dim}) "
                                f"points to (n, {self.dim}), got shape {np.shape(sde.potential.grad(probe))}")
        ss = np.random.SeedSequence([self.seed, list(self.potentials).index(self.potential), MODES.index(self.mode), 41])
        rng = np.random.default_rng(ss)
        simulate = sde.paired if self.mode == "paired" else sde.unpaired
        return {"x": simulate(self.n, self.times, rng)}

    def _params(self) -> dict:
        return {"family": self.family, "variant": self.variant, "seed": self.seed, "potential": self.potential,
                **{k: getattr(self, k) for k in _SETTINGS if k != "potentials"}, "version": GENERATOR_VERSION}

    def _all(self) -> np.ndarray:
        if getattr(self, "_xs", None) is None:
            if isinstance(self.potentials[self.potential], str):  # shipped code: cached on disk
                self._xs = cached_arrays(self.family, self._params(), self._generate)["x"]
            else:
                self._xs = self._generate()["x"]
        return self._xs

    def train_data(self) -> TrainData:
        xs, sde = self._all(), self.sde()
        ms = [Marginal(self.times[k], xs[k], sde.flow_velocity(xs[k]) if k == 0 else None, index=k)
              for k in range(self.n_train)]
        return TrainData(tuple(ms), family=self.family, variant=self.variant, paired=self.mode == "paired")

    def queries(self) -> list[Query]:
        xs = self._all()
        start = Marginal(self.times[0], xs[0], self.sde().flow_velocity(xs[0]), index=0)
        targets = [Target(self.times[k], xs[k], "train" if k < self.n_train else "test", index=k)
                   for k in range(1, len(self.times))]
        return [Query("rollout", "rollout", start, tuple(targets))]

    def simulator(self) -> SDE:
        return self.sde()

    def summarize(self, query: Query, w1: Sequence[float]) -> dict[TableColumn, float]:
        pv = f"{self.potential}/{self.mode}"
        return {
            TableColumn(self.mode, c.key, paper_variant=pv): v for c, v in super().summarize(query, w1).items()
        }

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_xs", None)  # regenerated (or read from the disk cache) on demand
        return state


class GFSDE(GradientFlowSDE):
    """``gf_sde``: the paper's five 2-D potentials (Tables 1 and 6)."""

    family = "gf_sde"
    potentials = POTENTIALS
    description = (
        "2-D gradient-flow SDEs (5 potentials x paired/unpaired), 20 marginals of 1000 particles at "
        "t = 0.01k; train 0..9, forecast 10..19; exact probability-flow velocity at t0"
    )
    paper_table = {"paired": (1, "mean-of-5/paired"), "unpaired": (1, "mean-of-5/unpaired")}
    table_protocol = ("one rollout from t0 per job; Train W1 = mean over t1..t9, Forecast W1 = over t10..t19; "
                      "paired/unpaired = the 5 SDEs' paired/unpaired variants")
    column_averages = {(m, key): tuple(f"{p}-{m}" for p in POTENTIALS) for m in MODES
                       for key in ("train_w1", "forecast_w1")}
