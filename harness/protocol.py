"""The benchmark contract: what a task gives, what a method sees, what it must return.

Everything that crosses the boundary between the harness and a plugin is a NumPy array wrapped in
one of the frozen dataclasses below. A method may use torch or JAX internally; it receives and
returns NumPy. The harness, never the method, computes the metric (``harness.metrics``).

Vocabulary (``docs/protocol.md``):

- :class:`Marginal`: the population observed at one time ``t`` (positions, optional velocities).
- :class:`TrainData`: every marginal a method may learn from.
- :class:`Query`: one evaluation question: a start marginal, target times, and the hidden target
  marginals with their ``train`` / ``test`` group. A method only ever sees ``query.start`` and
  ``query.times`` (see :meth:`Query.request`).
- :class:`Task`: a dataset plus its split; yields the training data and the queries.
- :class:`Method`: ``fit(train_data)`` then ``predict(start, times, seed=...)``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np

Group = Literal["train", "test"]
QueryKind = Literal["rollout", "next_step", "interpolate"]
PROFILES: tuple[str, ...] = ("smoke", "quick", "paper")


class DivergedError(RuntimeError):
    """Training or prediction went non-finite. A method raises it from ``fit`` (e.g. a NaN loss);
    the harness raises it for non-finite predictions. The job's row gets the status ``diverged``."""


class PopbenchError(Exception):
    """An error whose message is one clear sentence for the user (the CLI exits 2 on it)."""


def _as_array(a: Any, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    arr = arr.copy()
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class Marginal:
    """A population snapshot at time ``t`` (in the task's own time units: simulation time for the
    SDE tasks and Boids, the snapshot index for the vortex and EB).

    ``x`` has shape ``(n, d)``; ``v`` (velocities), when the task exposes them for this time, has
    the same shape. ``index`` is the marginal's position on the task's full time grid (held-out
    times included), so ``index`` values of training marginals may skip numbers. Arrays are
    read-only float64 copies.
    """

    t: float
    x: np.ndarray
    v: np.ndarray | None = None
    index: int = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "t", float(self.t))
        object.__setattr__(self, "x", _as_array(self.x, "Marginal.x", 2))
        if self.v is not None:
            v = _as_array(self.v, "Marginal.v", 2)
            if v.shape != self.x.shape:
                raise ValueError(f"Marginal.v has shape {v.shape}, x has {self.x.shape}")
            object.__setattr__(self, "v", v)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def without_velocities(self) -> Marginal:
        return Marginal(self.t, self.x, None, self.index)


@dataclass(frozen=True)
class TrainData:
    """Everything a method may learn from: the training marginals, sorted by time.

    ``paired`` is True only when row i is the same particle at every time (the GF-SDE paired
    variants); a method must not rely on row order otherwise. ``family`` and ``variant`` let a
    method pick per-family hyperparameters; they carry no data.
    """

    marginals: tuple[Marginal, ...]
    family: str
    variant: str
    paired: bool = False

    def __post_init__(self) -> None:
        ms = tuple(self.marginals)
        if len(ms) < 2:
            raise ValueError("TrainData needs at least two marginals")
        ts = [m.t for m in ms]
        if any(b <= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"training marginals must have strictly increasing times, got {ts}")
        dims = {m.dim for m in ms}
        if len(dims) != 1:
            raise ValueError(f"training marginals have different dimensions {sorted(dims)}")
        object.__setattr__(self, "marginals", ms)

    @property
    def times(self) -> np.ndarray:
        return np.array([m.t for m in self.marginals])

    def without_velocities(self) -> TrainData:
        """The same data with every marginal's velocities dropped (what a method that does not
        declare ``uses_velocities`` is given: it cannot read privileged velocities unmarked)."""
        return dataclasses.replace(self, marginals=tuple(m.without_velocities() for m in self.marginals))

    @property
    def dim(self) -> int:
        return self.marginals[0].dim

    @property
    def t_min(self) -> float:
        return self.marginals[0].t

    @property
    def t_max(self) -> float:
        return self.marginals[-1].t


@dataclass(frozen=True)
class Target:
    """A hidden true marginal the harness scores a prediction against."""

    t: float
    x: np.ndarray
    group: Group
    index: int = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "t", float(self.t))
        object.__setattr__(self, "x", _as_array(self.x, "Target.x", 2))
        if self.group not in ("train", "test"):
            raise ValueError(f"Target.group must be 'train' or 'test', got {self.group!r}")


@dataclass(frozen=True)
class Query:
    """One evaluation question (protocol.md section 2).

    ``name`` identifies the query inside its task variant (``"rollout"``, ``"next-step"``,
    ``"holdout-3"``, ...). The method receives only :meth:`request`: the start marginal and the
    target times, never the targets.
    """

    name: str
    kind: QueryKind
    start: Marginal
    targets: tuple[Target, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError(f"query {self.name!r} has no targets")
        ts = [tg.t for tg in self.targets]
        if any(b <= a for a, b in zip(ts, ts[1:])) or ts[0] <= self.start.t:
            raise ValueError(f"query {self.name!r}: target times must increase after the start time")

    @property
    def times(self) -> tuple[float, ...]:
        return tuple(tg.t for tg in self.targets)

    def request(self) -> tuple[Marginal, tuple[float, ...]]:
        """What a method is allowed to see: ``(start, times)``."""
        return self.start, self.times


@dataclass(frozen=True)
class Prediction:
    """A method's answer: one ``(n, d)`` sample array per target time (n = start rows), and
    optionally one non-negative weight vector per time (e.g. UAM); weights are normalised by the
    harness when it scores."""

    samples: tuple[np.ndarray, ...]
    weights: tuple[np.ndarray, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", tuple(np.asarray(s, dtype=np.float64) for s in self.samples))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(np.asarray(w, dtype=np.float64) for w in self.weights))


_D = TypeVar("_D", Marginal, TrainData)


@dataclass(frozen=True)
class Capabilities:
    """What a method declares it can do and needs. The harness never asks a method for what it
    declares it cannot do (the tables show "—" there).

    - ``interpolate``: targets inside the training time range.
    - ``forecast``: targets beyond the last training time.
    - ``uses_velocities``: may read ``Marginal.v`` (the report marks such rows).
    - ``requires_velocities``: cannot run without them (with ``uses_velocities``); the harness does
      not offer such a method a task whose training marginals have none.
    - ``framework``: ``"numpy"``, ``"torch"`` or ``"jax"``; decides the extra to install.
    - ``num_gpus``: GPUs to request from Ray when the cluster has them (0 = CPU only).
    - ``requires_simulator``: the method is the ``oracle`` and needs the task's true simulator.
    - ``stochastic``: predictions may depend on the ``seed`` passed to ``predict`` (False is a
      promise that conformance checks: another seed, the same predictions).
    - ``families``: the task families the method's model is made for (a vortex-shaped reference
      process, say); empty = any. The harness does not offer such a method another family's task,
      except a task that :attr:`Task.resembles` one of them; conformance checks it on the first.
    """

    interpolate: bool = True
    forecast: bool = True
    uses_velocities: bool = False
    requires_velocities: bool = False
    framework: str = "numpy"
    num_gpus: float = 0.0
    requires_simulator: bool = False
    stochastic: bool = False
    families: tuple[str, ...] = ()

    def accepts(self, task_cls: type, variant: str) -> bool:
        """Whether a task class's variant is of (or resembles) one of :attr:`families`."""
        if not self.families:
            return True
        like = task_cls.resembles
        like = like.get(variant, "") if isinstance(like, Mapping) else (like or "")
        return bool({task_cls.family, like.split("/")[0]} & set(self.families))

    @property
    def extra(self) -> str | None:
        return {"torch": "torch", "jax": "jax"}.get(self.framework)

    def shown(self, data: _D) -> _D:
        """``data`` (a :class:`TrainData` or a start :class:`Marginal`) as the harness hands it to
        such a method: without velocities unless it declares ``uses_velocities``, so it cannot read
        privileged velocities unmarked. The runner and the conformance check both go through here."""
        return data if self.uses_velocities else data.without_velocities()


Simulator = Callable[[Marginal, Sequence[float], int], list]
"""A task's true process: ``simulate(start, times, seed) -> [x_t for t in times]``."""


def resolve_hparams(table: Mapping[str, Mapping[str, Mapping[str, Any]]], task: str, profile: str) -> dict:
    """Look up a method's settings for a task (``"name/variant"``, as the harness passes it) and a profile.

    Tries, in ``table[profile]``: the task as given, ``"family/variant"`` and ``"family"`` (the task
    class's :attr:`Task.family`, so a family loaded as ``package.module:Class`` finds its settings
    too), then what the variant :attr:`Task.resembles` (``"like/variant"``, ``"like"``; for a
    resemblance ``"like/other"``: itself, then ``"like"``), then ``"default"``. Method modules keep one such
    table at the top (``HPARAMS``) so that every setting of every profile is readable in one place.

    When a method that has settings for other families falls back to ``"default"``, this says so on
    stderr, once per method and family (the method is the class whose ``default_hparams`` called).
    """
    if profile not in table:
        raise PopbenchError(f"unknown profile {profile!r}; choose one of {', '.join(table)}")
    per_task = table[profile]
    name, _, variant = task.partition("/")
    family, like = _task_family(name, variant)
    keys = [task, f"{family}/{variant}" if variant else "", family,
            f"{like}/{variant}" if like and variant and "/" not in like else "", like, like.split("/")[0], "default"]
    for key in dict.fromkeys(k for k in keys if k):
        if key in per_task:
            if key == "default" and family != "default" and len(per_task) > 1:
                _note_default(sys._getframe(1), family, like)
            return dict(per_task[key])
    raise PopbenchError(f"no {profile!r} hyperparameters for task {task!r}")


def _task_family(name: str, variant: str) -> tuple[str, str]:
    """``(Task.family, what the variant resembles)`` for a registered task name or ``module:Class``
    reference; ``(name, "")`` for anything else (a bare family name in a test, ``"default"``)."""
    from harness import registry  # here: registry imports this module

    try:
        cls = registry.tasks.load(name)
    except PopbenchError:
        return name, ""
    like = cls.resembles
    return cls.family or name, (like.get(variant, "") if isinstance(like, Mapping) else like)


_NOTED_DEFAULTS: set[tuple[str, str]] = set()


def _note_default(caller: Any, family: str, like: str) -> None:
    owner = caller.f_locals.get("cls")
    method = getattr(owner, "name", "") or caller.f_globals.get("__name__", "a method")
    if (method, family) in _NOTED_DEFAULTS:
        return
    _NOTED_DEFAULTS.add((method, family))
    nor = f" nor for {like!r}, which it resembles" if like else ""
    print(f"note: {method} has no settings for task family {family!r}{nor}; it runs with its default settings",
          file=sys.stderr)


def require(hp: Mapping[str, Any], key: str, ok: Callable[[Any], bool], what: str, *, optional: bool = False) -> None:
    """For :meth:`Method.check_hparams`: raise ``ValueError("KEY must be WHAT, got VALUE")`` unless
    ``ok(hp[key])`` (or the value is ``None`` and the setting is ``optional``)."""
    value = hp.get(key)
    if not ((value is None and optional) or (value is not None and ok(value))):
        raise ValueError(f"{key} must be {what}, got {value!r}")


def require_choice(hp: Mapping[str, Any], key: str, choices: Sequence[Any]) -> None:
    """For :meth:`Method.check_hparams`: ``hp[key]`` must be one of ``choices``."""
    require(hp, key, lambda v: v in choices, " or ".join(repr(c) for c in choices))


def require_at_least(hp: Mapping[str, Any], *keys: str, minimum: float = 1) -> None:
    """For :meth:`Method.check_hparams`: each of ``keys`` is at least ``minimum`` (counts: 1)."""
    for key in keys:
        require(hp, key, lambda v: v >= minimum, f"at least {minimum:g}")


def require_positive(hp: Mapping[str, Any], *keys: str) -> None:
    """For :meth:`Method.check_hparams`: each of ``keys`` is above 0 (rates, tolerances, scales)."""
    for key in keys:
        require(hp, key, lambda v: v > 0, "above 0")


def require_widths(hp: Mapping[str, Any], *keys: str) -> None:
    """For :meth:`Method.check_hparams`: each of ``keys`` is a non-empty list of layer widths."""
    for key in keys:
        require(hp, key, lambda v: len(v) > 0 and all(isinstance(w, int) and w >= 1 for w in v),
                "a non-empty list of layer widths")


class Method(abc.ABC):
    """Base class of every method.

    Subclasses set ``name`` and ``capabilities``, keep their per-profile settings in a module-level
    table returned by :meth:`default_hparams`, and implement :meth:`fit` and :meth:`predict`.
    Instances must be picklable before ``fit`` (they travel to Ray workers).

    ``device`` is chosen by the harness: ``"cpu"`` or ``"cuda"``. ``seed`` drives initialisation and
    minibatches; ``predict`` receives its own ``seed`` for query noise.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    budget_keys: ClassVar[tuple[str, ...]] = ()
    """Hyperparameters that only bound how long one call of ``fit`` may run (WLM's ``max_minutes``).
    They do not enter the job's identity: a capped job and the uncapped one are the same job, and a
    capped fit that stops early reports ``training_complete: False`` in :meth:`learned` (the job's
    row is then ``partial``, and rerunning the same command continues it)."""
    checkpoint_path: Path | None = None
    """Set by the harness before ``fit``: a file this job alone may write its training state to,
    and read it back from after an interruption (a killed worker, a timeout, a ``max_minutes``
    cap). A method that resumes from it must continue exactly as the uninterrupted fit would. The
    harness deletes it once the job's result is stored as ``ok``. ``None``: do not checkpoint."""

    def __init__(self, hparams: Mapping[str, Any] | None = None, *, seed: int = 0, device: str = "cpu"):
        self.hparams: dict[str, Any] = dict(hparams or {})
        self.seed = int(seed)
        self.device = device

    @classmethod
    def default_hparams(cls, task: str, profile: str) -> dict[str, Any]:
        """The resolved settings for a task (``"family/variant"``) and a profile
        (``smoke``/``quick``/``paper``); usually ``resolve_hparams(HPARAMS, task, profile)``.

        These keys are the method's settings: ``--set`` may change only them (a typo is an error,
        not a silently ignored key), a value must have its default's type (an int for an int, a
        number for a float, ...; ``null`` is always allowed), and ``--set KEY=VALUE`` without a
        method name changes every selected method that has KEY."""
        return {}

    @classmethod
    def check_hparams(cls, hp: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` (one sentence) for settings this method cannot run with: a value out
        of range, an unknown choice. Called on every job's settings when the job matrix is planned,
        so bad ``--set`` values stop the command before any job runs. The default accepts all."""

    @abc.abstractmethod
    def fit(self, data: TrainData) -> None:
        """Learn from the training marginals (nothing else)."""

    @abc.abstractmethod
    def predict(self, start: Marginal, times: Sequence[float], *, seed: int) -> Prediction:
        """Push ``start`` forward; return one sample array (one row per start row) per time."""

    def learned(self) -> dict[str, Any]:
        """Learned scalars and small curves worth a result row (γ, β, σ², loss curve, ...).
        Values must be JSON-serialisable (floats, lists of floats, strings). The key
        ``training_complete`` set to ``False`` marks a fit stopped early by a budget key: its
        row is scored but ``partial``, never mistaken for the configured run."""
        return {}

    def attach_simulator(self, simulator: Simulator) -> None:
        """Only called for methods with ``capabilities.requires_simulator`` (the oracle)."""
        raise NotImplementedError

    @property
    def used_velocities(self) -> bool:
        """Whether this configured instance reads velocities (defaults to the capability)."""
        return self.capabilities.uses_velocities


@dataclass(frozen=True)
class TableColumn:
    """How a task family's result table names one column: the column key (``train_w1``,
    ``w1_holdout_3``, ...), the group of variants it averages over (``paired``/``unpaired`` for the
    GF-SDEs, ``""`` otherwise), and the paper's variant name for ``--compare paper``."""

    group: str
    key: str
    paper_variant: str | None = None


class Task(abc.ABC):
    """Base class of a task family. An instance is one variant with one seed.

    Subclasses set ``family``, ``variants`` (a tuple of variant names, without the family prefix),
    ``has_simulator`` and ``data_files`` (names in ``harness.data``'s registry, where a plugin adds
    its own with ``harness.data.register``) as class attributes, so listing them imports nothing
    heavy. Two templates fill most of this in: ``tasks.gf_sde.GradientFlowSDE`` (a gradient-flow
    SDE) and ``tasks.snapshots.SnapshotTask`` (a snapshot file and a split).
    """

    family: ClassVar[str] = ""
    variants: ClassVar[tuple[str, ...]] = ()
    resembles: ClassVar[str | Mapping[str, str]] = ""
    """A shipped family (``"gf_sde"``) or variant (``"vortex/forecast"``) this one is like, or one
    per variant (a mapping): a method without settings for ``family`` uses its settings for that
    (:func:`resolve_hparams`). Empty: the method's ``default`` settings."""
    has_simulator: ClassVar[bool] = False
    data_files: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    paper_table: ClassVar[dict[str, tuple[int, str]]] = {}
    """Family-level comparison with the paper: column group -> (paper table number, paper variant
    name in ``paper_results.csv``), e.g. ``{"paired": (1, "mean-of-5/paired")}``. Empty when the
    family has no published counterpart (the ``eb300`` stand-in, the toy task)."""
    column_averages: ClassVar[dict[tuple[str, str], tuple[str, ...]]] = {}
    """Column (group, key) -> the variants a family-level cell of that column averages by
    definition, as the paper's number does where it publishes one (Table 1's five SDEs per group,
    EB's mean over the three holdouts, eb300's too). A cell over fewer is labelled ``(k of K
    variants)`` and not compared with the paper. A column not named here averages whatever
    variants the methods' cells have."""
    table_protocol: ClassVar[str] = ""
    """How the table's numbers are made, for its caption (which start, which targets each column
    averages), e.g. ``"one rollout from t0; Train W1 = mean over t1..t9, Forecast W1 = over
    t10..t19"``."""
    table_note: ClassVar[str] = ""
    """A sentence every table of this family carries under it (e.g. that the data are a stand-in)."""

    def __init__(self, variant: str, *, seed: int = 0, data_dir: str | None = None):
        if variant not in self.variants:
            raise PopbenchError(
                f"task family {self.family!r} has no variant {variant!r}; "
                f"its variants are {', '.join(self.variants)}"
            )
        self.variant = variant
        self.seed = int(seed)
        self.data_dir = data_dir

    @property
    def name(self) -> str:
        return f"{self.family}/{self.variant}"

    @classmethod
    def variant_data_files(cls, variant: str) -> tuple[str, ...]:
        """Data files this variant needs (defaults to the family's)."""
        return cls.data_files

    @classmethod
    def training_key(cls, variant: str) -> str | None:
        """A name for this variant's training data when other variants of the family train on the
        same data (for the same seed): a method then fits once for all of them. ``None`` (the
        default): the variant's training data are its own. The runner checks that the data are
        equal before it shares a fit."""
        return None

    @abc.abstractmethod
    def train_data(self) -> TrainData:
        """The training marginals (all a method may see)."""

    @abc.abstractmethod
    def queries(self) -> list[Query]:
        """The evaluation questions, with their hidden targets."""

    def simulator(self) -> Simulator | None:
        """The true process for the ``oracle`` row (picklable), or None for real data."""
        return None

    def summarize(self, query: Query, w1: Sequence[float]) -> dict[TableColumn, float]:
        """Table cells of one query from its per-target W1 (same order as ``query.targets``).

        Default: a rollout gives ``train_w1`` (mean over train-group targets) and ``forecast_w1``
        (mean over test-group targets); any other query gives ``w1_<query.name>``.
        """
        w = np.asarray(w1, dtype=float)
        if query.kind == "rollout":
            groups = np.array([tg.group for tg in query.targets])
            out: dict[TableColumn, float] = {}
            for g, key in (("train", "train_w1"), ("test", "forecast_w1")):
                sel = w[groups == g]
                if sel.size and np.all(np.isfinite(sel)):
                    out[TableColumn("", key)] = float(sel.mean())
            return out
        return {TableColumn("", f"w1_{query.name}"): float(w.mean())}

    def extra_columns(self, cells: Mapping[TableColumn, float]) -> dict[TableColumn, float]:
        """Columns derived from all of one job's cells (e.g. the mean over holdouts)."""
        return {}


def curve(values: Sequence[float], points: int = 200) -> list[float]:
    """A per-iteration curve (loss, friction, ...) cut to at most ``points`` numbers for
    :meth:`Method.learned`: block means over equal stretches, so a noisy curve keeps its trend
    and a constant one its value. Shorter curves come back unchanged."""
    v = np.asarray(values, dtype=float)
    if v.size <= points:
        return [float(x) for x in v]
    edges = np.linspace(0, v.size, points + 1).astype(int)
    return [float(v[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]


def curve_steps(total: int, length: int) -> list[int]:
    """Where the numbers of ``curve(values)`` sit, for ``total`` per-iteration values cut to
    ``length`` numbers: the last iteration (1-based) that each block mean covers."""
    if length >= total:
        return list(range(1, total + 1))
    return [int(e) for e in np.linspace(0, total, length + 1).astype(int)[1:]]


def is_finite_prediction(pred: Prediction) -> bool:
    return all(np.all(np.isfinite(s)) for s in pred.samples) and (
        pred.weights is None or all(np.all(np.isfinite(w)) for w in pred.weights)
    )


def target_within_training(t: float, data: TrainData, tol: float = 1e-9) -> bool:
    """True when ``t`` lies inside the training time range (an interpolation target)."""
    return data.t_min - tol <= t <= data.t_max + tol


def nan_safe_mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


__all__ = [
    "PROFILES",
    "Capabilities",
    "Group",
    "Marginal",
    "Method",
    "PopbenchError",
    "Prediction",
    "Query",
    "QueryKind",
    "Simulator",
    "TableColumn",
    "Target",
    "Task",
    "TrainData",
    "is_finite_prediction",
    "resolve_hparams",
    "target_within_training",
]
