"""``eb``: embryoid-body scRNA-seq, leave-one-out (WLM paper section 4.3, Appendix C.3, Table 3),
and ``eb300``, a clearly named stand-in built from a real 300-cells-per-day subsample.

``eb`` reads ``eb/eb_velocity_v5.npz`` (TrajectoryNet's preprocessing of Moon et al. 2019; git blob
id ``06b92296690840bb4c146085b6cd18ad89667c74``; Yale non-commercial licence, download it on your
own machine, never redistribute it). Keys used: ``pcs`` (16819, 100), ``pcs_delta`` (16819, 100;
RNA velocity in PC space) and ``sample_labels`` (16819,), values 0..4 = days 0-3, 6-9, 12-15,
18-21, 24-27 (2381, 4163, 3278, 3665, 3332 cells). Preprocessing (TrajectoryNet's, which every
published EB number uses):

- ``X = pcs[:, :5]`` whitened per column with the mean and standard deviation (ddof 0) over
  **all** cells of all five days (the protocol's one agreed exception to "no peeking", because it
  is how the published numbers were made);
- ``V = pcs_delta[:, :5] / std`` (scaled, not shifted);
- times = the day label (index time 0..4, Δt = 1).

Variants ``holdout-1``, ``holdout-2``, ``holdout-3``: train on the other four days (positions and
RNA velocities, original times kept: holdout-1 trains on 0, 2, 3, 4), and one query
``holdout-h`` (kind ``interpolate``) from day h−1 (positions and velocities) to day h, scored
against all cells of day h. Columns: ``w1_holdout_<h>`` and ``w1_mean_holdouts`` (within one
variant it equals that holdout; the report averages it over the three variants per seed: Table 3).

The file is not shipped: building an ``eb`` task when it is missing (and cannot be downloaded)
raises a one-sentence :class:`PopbenchError` naming the file, its URL, its blob id and the
directory to put it in.

``eb300`` (stand-in, not comparable with published numbers): ``eb/sbirr_eb_data_300per_marginal.npy``,
shape (5, 300, 5), real EB cells subsampled by the SBIRR authors, already whitened (not whitened
again), no velocities; the same three leave-one-out variants. It never fills a paper table.
The seed does not change the data of either family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from harness import data as data_files
from harness.protocol import Marginal, PopbenchError, Query, TableColumn, Target, Task, TrainData

EB_FILE = "eb/eb_velocity_v5.npz"
EB300_FILE = "eb/sbirr_eb_data_300per_marginal.npy"
N_DAYS = 5
N_PCS = 5
HOLDOUTS = (1, 2, 3)
LEAVE_ONE_OUT = ("leave-one-out: day h from day h-1 by a model trained without day h (one job per h); "
                 "mean = over h = 1, 2, 3")


def load_eb(path, n_pcs: int = N_PCS) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Whitened positions and scaled RNA velocities per day from ``eb_velocity_v5.npz``.

    Returns ``(xs, vs)``: lists of five ``(n_day, n_pcs)`` arrays, in file row order per day.
    """
    with np.load(path, allow_pickle=False) as z:
        missing = {"pcs", "pcs_delta", "sample_labels"} - set(z.files)
        if missing:
            raise PopbenchError(f"{path} lacks the key(s) {', '.join(sorted(missing))}")
        pcs = np.asarray(z["pcs"], dtype=np.float64)[:, :n_pcs]
        delta = np.asarray(z["pcs_delta"], dtype=np.float64)[:, :n_pcs]
        labels = np.asarray(z["sample_labels"]).reshape(-1)
    if pcs.shape[1] != n_pcs or delta.shape != pcs.shape or labels.shape[0] != pcs.shape[0]:
        raise PopbenchError(f"{path}: pcs {pcs.shape}, pcs_delta {delta.shape}, sample_labels {labels.shape} do not match")
    mean = pcs.mean(0)
    std = pcs.std(0)  # ddof 0, over all cells of all days (TrajectoryNet's StandardScaler)
    x = (pcs - mean) / std
    v = delta / std
    days = sorted(np.unique(labels).tolist())
    if days != list(range(N_DAYS)):
        raise PopbenchError(f"{path}: sample_labels are {days}, expected 0..{N_DAYS - 1}")
    return [x[labels == d] for d in days], [v[labels == d] for d in days]


def load_eb300(path) -> list[np.ndarray]:
    """The stand-in's five already-whitened (300, 5) days."""
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 3 or arr.shape[0] != N_DAYS or not np.all(np.isfinite(arr)):
        raise PopbenchError(f"{path} has shape {arr.shape}, expected (5, n, d) finite values")
    return [np.asarray(a, dtype=np.float64) for a in arr]


class EB(Task):
    family = "eb"
    variants = tuple(f"holdout-{h}" for h in HOLDOUTS)
    table_protocol = LEAVE_ONE_OUT
    has_simulator = False
    data_files = (EB_FILE,)
    description = (
        "embryoid-body scRNA-seq (TrajectoryNet 5-D whitened PCs + RNA velocity), leave-one-out "
        "of day 1, 2 or 3 predicted from the day before"
    )
    paper_table = {"": (3, "leave-one-out")}
    column_averages = {("", "w1_mean_holdouts"): tuple(f"holdout-{h}" for h in HOLDOUTS)}  # Table 3's mean
    _file = EB_FILE
    _paper_variant: str | None = "leave-one-out"

    def __init__(self, variant: str, *, seed: int = 0, data_dir: str | None = None):
        super().__init__(variant, seed=seed, data_dir=data_dir)
        data_files.resolve(self._file, data_dir=self.data_dir)  # the missing-file sentence, now

    @property
    def holdout(self) -> int:
        return int(self.variant.split("-")[1])

    def _load(self) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        return load_eb(data_files.resolve(self._file, data_dir=self.data_dir))

    def _days(self) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        if getattr(self, "_xv", None) is None:
            self._xv = self._load()
        return self._xv

    def _marginal(self, d: int) -> Marginal:
        xs, vs = self._days()
        return Marginal(float(d), xs[d], None if vs is None else vs[d], index=d)

    def train_data(self) -> TrainData:
        ms = tuple(self._marginal(d) for d in range(N_DAYS) if d != self.holdout)
        return TrainData(ms, family=self.family, variant=self.variant)

    def queries(self) -> list[Query]:
        xs, _ = self._days()
        h = self.holdout
        target = Target(float(h), xs[h], "test", index=h)
        return [Query(f"holdout-{h}", "interpolate", self._marginal(h - 1), (target,))]

    def summarize(self, query: Query, w1: Sequence[float]) -> dict[TableColumn, float]:
        h = query.name.split("-")[1]
        return {TableColumn("", f"w1_holdout_{h}", paper_variant=self._paper_variant): float(np.mean(w1))}

    def extra_columns(self, cells: Mapping[TableColumn, float]) -> dict[TableColumn, float]:
        vals = [v for c, v in cells.items() if c.key.startswith("w1_holdout_")]
        if not vals or not np.all(np.isfinite(vals)):
            return {}
        return {TableColumn("", "w1_mean_holdouts", paper_variant=self._paper_variant): float(np.mean(vals))}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_xv", None)
        return state


class EB300(EB):
    family = "eb300"
    variants = tuple(f"holdout-{h}" for h in HOLDOUTS)
    table_protocol = LEAVE_ONE_OUT
    data_files = (EB300_FILE,)
    description = (
        "EB-300 (SBIRR subsample), stand-in, not comparable with published EB numbers: real EB "
        "cells, 300 per day, 5-D whitened, no velocities; leave-one-out of day 1, 2 or 3"
    )
    paper_table = {}
    table_note = ("eb300 is a stand-in (real EB cells, 300 per day, 5-D whitened, no velocities), "
                  "not the paper's EB data: its numbers are not comparable with the paper's Table 3.")
    _file = EB300_FILE
    _paper_variant = None

    def _load(self) -> tuple[list[np.ndarray], None]:
        return load_eb300(data_files.resolve(self._file, data_dir=self.data_dir)), None
