"""``vortex``: the Gulf of Mexico ocean vortex (WLM paper section 4.2, Appendix C.2, Table 2).

Real data: HYCOM reanalysis particles, preprocessed by the paper's authors (files, checksums and
origin: ``harness.data``). Both files hold
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
points. The seed does not change the data. Both variants are instances of the snapshot-file
template (``tasks.snapshots``): another vortex file, or another split, is a subclass of it.
"""

from __future__ import annotations

from tasks.snapshots import Forecast, Interpolation, SnapshotTask

SMALL = "ocean/oceans_with_v0.npz"
BIG = "ocean/big_oceans_forecast.npz"


class Vortex(SnapshotTask):
    family = "vortex"
    file = {"interpolation": SMALL, "forecast": BIG}
    splits = {"interpolation": Interpolation(train=(0, 2, 4, 6, 8)), "forecast": Forecast(train=10)}
    shapes = {SMALL: (9, 111, 2), BIG: (11, 400, 2)}
    description = (
        "Gulf of Mexico ocean vortex (HYCOM, real): interpolation of held-out times 1,3,5,7 of the "
        "small vortex (index time, physical step 0.9); forecast of time 10 of the big vortex"
    )
    paper_table = {"interpolation": (2, "interpolation"), "forecast": (2, "forecast")}
    table_protocol = ("interpolation: held-out time h from h-1 (positions and velocities), mean = over h; "
                      "forecast (trained on t0..t9): t10 by one rollout from t0 (Train W1 = its mean over "
                      "t1..t9) and by one step from t9")
