"""``vortex``: the Gulf of Mexico ocean vortex (WLM paper section 4.2, Appendix C.2, Table 2).

Real data: HYCOM reanalysis particles, preprocessed by the paper's authors (files, checksums and
origin: ``harness.data`` and ``../shared/data/ocean/PROVENANCE.md``). Both files hold
``positions`` and ``velocities`` of shape (T, N, 2), float64; rows are **not** the same particle
across times (independent snapshots); no normalisation is applied.

Time unit: the marginal index (Δt = 1 between consecutive marginals). The physical step of the
small vortex is 0.9 (the big vortex's spacing is undocumented for this 400-particle file; the
200-particle upstream version is 0.8 apart). Velocities are in physical units and are **not**
rescaled to the index clock, as in the reference code, so ``x + Δt·v`` with Δt = 1 overshoots the
small vortex's displacements by roughly 1/0.9.

- ``interpolation`` (small vortex ``ocean/oceans_with_v0.npz``, (9, 111, 2), times 0..8): train on
  0, 2, 4, 6, 8 (positions and velocities). Queries ``holdout-1``, ``holdout-3``, ``holdout-5``,
  ``holdout-7`` (kind ``interpolate``): start from marginal h−1 (positions and velocities), predict
  time h (group ``test``). Columns: ``w1_holdout_<h>`` and their mean ``w1_mean_holdouts``. The
  paper counts from 1: its t2, t4, t6, t8 are h = 1, 3, 5, 7.
- ``forecast`` (big vortex ``ocean/big_oceans_forecast.npz``, (11, 400, 2), times 0..10): train on
  0..9 (positions and velocities). Queries: ``rollout`` from 0 (targets 1..9 ``train``, 10
  ``test``: the paper's "t11 from t0") and ``next-step`` from 9 to 10 (the paper's "t11 from t10").
  Columns: ``train_w1`` (mean over 1..9 of the rollout), ``w1_t10_from_t0``, ``w1_t10_from_t9``.

No simulator (real data): the ``static`` and ``velocity_extrapolation`` rows are the reference
points. The seed does not change the data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from harness import data as data_files
from harness.protocol import Marginal, PopbenchError, Query, TableColumn, Target, Task, TrainData

SMALL = "ocean/oceans_with_v0.npz"
BIG = "ocean/big_oceans_forecast.npz"
FILES = {"interpolation": SMALL, "forecast": BIG}
SHAPES = {SMALL: (9, 111, 2), BIG: (11, 400, 2)}
HOLDOUTS = (1, 3, 5, 7)
INTERP_TRAIN = (0, 2, 4, 6, 8)
FORECAST_TRAIN = tuple(range(10))
FORECAST_TEST = 10


def load_vortex(path) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, velocities)`` from one of the two vortex files, checked for shape and NaNs."""
    with np.load(path, allow_pickle=False) as z:
        missing = {"positions", "velocities"} - set(z.files)
        if missing:
            raise PopbenchError(f"{path} lacks the key(s) {', '.join(sorted(missing))}")
        x = np.asarray(z["positions"], dtype=np.float64)
        v = np.asarray(z["velocities"], dtype=np.float64)
    if x.ndim != 3 or x.shape[2] != 2 or v.shape != x.shape:
        raise PopbenchError(f"{path}: positions {x.shape} and velocities {v.shape} are not two (T, N, 2) arrays")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(v))):
        raise PopbenchError(f"{path} contains non-finite values")
    return x, v


class Vortex(Task):
    family = "vortex"
    variants = ("interpolation", "forecast")
    has_simulator = False
    data_files = (SMALL, BIG)
    description = (
        "Gulf of Mexico ocean vortex (HYCOM, real): interpolation of held-out times 1,3,5,7 of the "
        "small vortex (index time, physical step 0.9); forecast of time 10 of the big vortex"
    )
    paper_table = {"interpolation": (2, "interpolation"), "forecast": (2, "forecast")}
    table_protocol = ("interpolation: held-out time h from h-1 (positions and velocities), mean = over h; "
                      "forecast (trained on t0..t9): t10 by one rollout from t0 (Train W1 = its mean over "
                      "t1..t9) and by one step from t9")

    @classmethod
    def variant_data_files(cls, variant: str) -> tuple[str, ...]:
        return (FILES[variant],) if variant in FILES else cls.data_files

    def __init__(self, variant: str, *, seed: int = 0, data_dir: str | None = None):
        super().__init__(variant, seed=seed, data_dir=data_dir)
        data_files.resolve(FILES[self.variant], data_dir=self.data_dir)  # fails now, with the fix, if missing

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if getattr(self, "_xv", None) is None:
            name = FILES[self.variant]
            x, v = load_vortex(data_files.resolve(name, data_dir=self.data_dir))
            if x.shape != SHAPES[name]:
                raise PopbenchError(f"{name} has shape {x.shape}, expected {SHAPES[name]}")
            self._xv = (x, v)
        return self._xv

    def _marginal(self, k: int) -> Marginal:
        x, v = self._arrays()
        return Marginal(float(k), x[k], v[k], index=k)

    def train_data(self) -> TrainData:
        idx = INTERP_TRAIN if self.variant == "interpolation" else FORECAST_TRAIN
        return TrainData(tuple(self._marginal(k) for k in idx), family=self.family, variant=self.variant)

    def queries(self) -> list[Query]:
        x, _ = self._arrays()
        if self.variant == "interpolation":
            return [
                Query(f"holdout-{h}", "interpolate", self._marginal(h - 1), (Target(float(h), x[h], "test", index=h),))
                for h in HOLDOUTS
            ]
        rollout = [
            Target(float(k), x[k], "train" if k < FORECAST_TEST else "test", index=k)
            for k in range(1, FORECAST_TEST + 1)
        ]
        last = FORECAST_TRAIN[-1]
        nxt = Target(float(FORECAST_TEST), x[FORECAST_TEST], "test", index=FORECAST_TEST)
        return [
            Query("rollout", "rollout", self._marginal(0), tuple(rollout)),
            Query("next-step", "next_step", self._marginal(last), (nxt,)),
        ]

    def summarize(self, query: Query, w1: Sequence[float]) -> dict[TableColumn, float]:
        w = np.asarray(w1, dtype=float)
        g = self.variant
        if query.kind == "interpolate":
            h = query.name.split("-")[1]
            return {TableColumn(g, f"w1_holdout_{h}", paper_variant=g): float(w.mean())}
        if query.kind == "next_step":
            return {TableColumn(g, "w1_t10_from_t9", paper_variant=g): float(w[-1])}
        groups = np.array([tg.group for tg in query.targets])
        out = {TableColumn(g, "w1_t10_from_t0", paper_variant=g): float(w[-1])}
        train = w[groups == "train"]
        if train.size and np.all(np.isfinite(train)):
            out[TableColumn(g, "train_w1", paper_variant=g)] = float(train.mean())
        return out

    def extra_columns(self, cells: Mapping[TableColumn, float]) -> dict[TableColumn, float]:
        if self.variant != "interpolation":
            return {}
        vals = [v for c, v in cells.items() if c.key.startswith("w1_holdout_")]
        if len(vals) != len(HOLDOUTS) or not np.all(np.isfinite(vals)):
            return {}  # the mean is reported only when every holdout has a number
        return {TableColumn(self.variant, "w1_mean_holdouts", paper_variant=self.variant): float(np.mean(vals))}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_xv", None)
        return state
