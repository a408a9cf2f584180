"""Snapshot-file tasks: a population observed at a few times, read from one file, and a split.

:class:`SnapshotTask` is the family template for real data. A subclass sets ``family``, ``file``
(one file, or one per variant) and ``splits`` (variant name -> :class:`Interpolation` or
:class:`Forecast`); the variants are the splits' names. The shipped ``vortex`` family
(``tasks.vortex``) is two such variants.

The file: an ``.npz`` with ``positions`` of shape (T, N, d) and, optionally, ``velocities`` of the
same shape, or an ``.npy`` of positions alone. Snapshot k is at time ``k * dt`` (``dt`` = 1: the
snapshot index); rows need not be the same particle across times. ``file`` is a name in the data
registry (``harness.data.register``: the file is then found under ``--data-dir`` /
``$POPBENCH_DATA_DIR`` / the cache, downloaded when missing, and always checked against its
checksum) or the path of a local file (used as it is).

Velocities, when the file has them (and ``velocities`` is True), go with every training marginal
and every query's start. The seed does not change the data; there is no simulator (``static``
and ``velocity_extrapolation`` are the reference rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from harness import data as data_files
from harness.protocol import Marginal, PopbenchError, Query, TableColumn, Target, Task, TrainData


@dataclass(frozen=True)
class Interpolation:
    """Train on the snapshots ``train``; every other snapshot h between the first and the last of
    them is held out and predicted from the training snapshot just before it (query ``holdout-h``,
    kind ``interpolate``, column ``w1_holdout_<h>``; ``w1_mean_holdouts`` is their mean when every
    holdout has a number)."""

    train: tuple[int, ...]

    def describe(self) -> str:
        return "held-out time h from the training time before it, mean = over h"


@dataclass(frozen=True)
class Forecast:
    """Train on snapshots 0..train-1 and forecast the rest: one rollout from 0 over every later
    snapshot (``train_w1`` = its mean over the training ones, ``w1_t<last>_from_t0`` at the last,
    and ``forecast_w1`` over the forecast ones when there are several), and one from the last
    training snapshot (``w1_t<last>_from_t<train-1>``)."""

    train: int

    def describe(self) -> str:
        k = self.train - 1
        return (f"(trained on t0..t{k}) one rollout from t0 (Train W1 = its mean over t1..t{k}, Forecast W1 = over "
                f"the later times when there are several, 'tL from t0' = at the last time L) and one from t{k}")


def load_snapshots(path: str | Path, velocities: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """``(positions, velocities or None)`` from a snapshot file, checked for shape and finiteness."""
    path = Path(path)
    if path.suffix == ".npy":
        x, v = np.load(path, allow_pickle=False), None
    else:
        with np.load(path, allow_pickle=False) as z:
            if "positions" not in z.files:
                raise PopbenchError(f"{path} has no 'positions' array (it has {', '.join(z.files) or 'none'})")
            x = z["positions"]
            v = z["velocities"] if velocities and "velocities" in z.files else None
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] < 2:
        raise PopbenchError(f"{path}: positions must have shape (T, N, d) with T >= 2, got {x.shape}")
    if v is not None:
        v = np.asarray(v, dtype=np.float64)
        if v.shape != x.shape:
            raise PopbenchError(f"{path}: velocities have shape {v.shape}, positions {x.shape}")
    if not (np.all(np.isfinite(x)) and (v is None or np.all(np.isfinite(v)))):
        raise PopbenchError(f"{path} contains non-finite values")
    return x, v


class SnapshotTask(Task):
    """A real-data family read from snapshot files (see the module docstring). Methods without
    settings of their own for the new family use their settings for ``vortex/interpolation`` or
    ``vortex/forecast``, after the kind of each variant's split (``resembles``)."""

    file: ClassVar[str | Mapping[str, str]] = ""
    """A data registry name or a local path; or a mapping variant -> file."""
    splits: ClassVar[Mapping[str, Interpolation | Forecast]] = {}
    dt: ClassVar[float] = 1.0
    velocities: ClassVar[bool] = True
    """Use the file's velocities when it has them."""
    shapes: ClassVar[Mapping[str, tuple[int, ...]]] = {}
    """Optional: the positions' expected shape per file; another shape stops with a sentence."""
    has_simulator = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "variants" not in cls.__dict__:
            cls.variants = tuple(cls.splits)
        if "resembles" not in cls.__dict__:  # the vortex variant with the same kind of split
            cls.resembles = {v: "vortex/interpolation" if isinstance(s, Interpolation) else "vortex/forecast"
                             for v, s in cls.splits.items()}
        files = [cls.variant_file(v) for v in cls.variants]
        if "data_files" not in cls.__dict__:
            cls.data_files = tuple(dict.fromkeys(f for f in files if f in data_files.REGISTRY))
        if not cls.__dict__.get("table_protocol"):
            cls.table_protocol = "; ".join(f"{v}: {cls.splits[v].describe()}" for v in cls.variants)
        if not cls.__dict__.get("description"):
            cls.description = f"snapshots from {', '.join(dict.fromkeys(files))}: " + ", ".join(cls.variants)

    @classmethod
    def variant_file(cls, variant: str) -> str:
        return cls.file[variant] if isinstance(cls.file, Mapping) else cls.file

    @classmethod
    def variant_data_files(cls, variant: str) -> tuple[str, ...]:
        if variant not in cls.variants:
            return cls.data_files
        f = cls.variant_file(variant)
        return (f,) if f in data_files.REGISTRY else ()

    def __init__(self, variant: str, *, seed: int = 0, data_dir: str | None = None):
        super().__init__(variant, seed=seed, data_dir=data_dir)
        self.split = self.splits[variant]
        self._path()  # a missing file stops now, with the sentence that says where to get it

    def _path(self) -> Path:
        f = self.variant_file(self.variant)
        if f in data_files.REGISTRY:
            return data_files.resolve(f, data_dir=self.data_dir)
        if Path(f).expanduser().is_file():
            return Path(f).expanduser()
        raise PopbenchError(f"{self.name}: data file {f!r} is neither registered (harness.data.register) nor a file")

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        if getattr(self, "_xv", None) is None:
            x, v = load_snapshots(self._path(), self.velocities)
            f = self.variant_file(self.variant)
            if f in self.shapes and x.shape != tuple(self.shapes[f]):
                raise PopbenchError(f"{f} has shape {x.shape}, expected {tuple(self.shapes[f])}")
            train = self._train_indices()
            room = x.shape[0] - 1 if isinstance(self.split, Forecast) else x.shape[0]  # a forecast needs a later one
            if len(train) < 2 or train[0] < 0 or train[-1] >= room:
                raise PopbenchError(f"{self.name}: the split {self.split} does not fit the {x.shape[0]} snapshots of {f}")
            self._xv = (x, v)
        return self._xv

    def _marginal(self, k: int) -> Marginal:
        x, v = self._arrays()
        return Marginal(k * self.dt, x[k], None if v is None else v[k], index=k)

    def _target(self, k: int, group: str) -> Target:
        return Target(k * self.dt, self._arrays()[0][k], group, index=k)

    def _train_indices(self) -> tuple[int, ...]:
        s = self.split
        return tuple(sorted(s.train)) if isinstance(s, Interpolation) else tuple(range(s.train))

    def _held_out(self) -> list[int]:
        train = self._train_indices()
        return [h for h in range(train[0], train[-1]) if h not in train]

    def train_data(self) -> TrainData:
        ms = tuple(self._marginal(k) for k in self._train_indices())
        return TrainData(ms, family=self.family, variant=self.variant)

    def queries(self) -> list[Query]:
        train = self._train_indices()
        if isinstance(self.split, Interpolation):
            return [Query(f"holdout-{h}", "interpolate", self._marginal(max(k for k in train if k < h)),
                          (self._target(h, "test"),)) for h in self._held_out()]
        n_times, last = self._arrays()[0].shape[0], train[-1]
        rollout = [self._target(k, "train" if k <= last else "test") for k in range(1, n_times)]
        after = [self._target(k, "test") for k in range(last + 1, n_times)]
        return [Query("rollout", "rollout", self._marginal(0), tuple(rollout)),
                Query("next-step", "next_step", self._marginal(last), tuple(after))]

    def summarize(self, query: Query, w1: Sequence[float]) -> dict[TableColumn, float]:
        w, g = np.asarray(w1, dtype=float), self.variant
        if query.kind == "interpolate":
            return {TableColumn(g, f"w1_holdout_{query.name.split('-')[1]}", paper_variant=g): float(w.mean())}
        last = query.targets[-1].index
        out = {TableColumn(g, f"w1_t{last}_from_t{query.start.index}", paper_variant=g): float(w[-1])}
        if query.kind == "rollout":
            groups = np.array([tg.group for tg in query.targets])
            for group, key in (("train", "train_w1"), ("test", "forecast_w1")):
                sel = w[groups == group]
                if sel.size and np.all(np.isfinite(sel)) and (group == "train" or sel.size > 1):
                    out[TableColumn(g, key, paper_variant=g)] = float(sel.mean())
        return out

    def extra_columns(self, cells: Mapping[TableColumn, float]) -> dict[TableColumn, float]:
        if not isinstance(self.split, Interpolation):
            return {}
        vals = [v for c, v in cells.items() if c.key.startswith("w1_holdout_")]
        if not vals or len(vals) != len(self._held_out()) or not np.all(np.isfinite(vals)):
            return {}  # the mean is reported only when every holdout has a number
        return {TableColumn(self.variant, "w1_mean_holdouts", paper_variant=self.variant): float(np.mean(vals))}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_xv", None)
        return state
