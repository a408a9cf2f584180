"""The big Gulf of Mexico vortex, split two new ways: a snapshot file plus a split is a task.

``interpolation`` trains on snapshots 0, 2, ..., 10 of the shipped big-vortex file (positions and
velocities) and predicts each odd one from the snapshot before it; ``forecast-5`` trains on 0..5 and
forecasts 6..10. Methods use their vortex settings.
Run: python run_all.py --tasks popbench_example.big_vortex:BigVortex

A file of your own works the same way: register it once (name, URL, checksum), then name it in
``file`` (an .npz with ``positions`` (T, N, d) and optionally ``velocities``, or an .npy)::

    from harness.data import DataFile, register
    register(DataFile("mylab/drifters.npz", "https://example.org/drifters.npz", sha256="..."))
"""

from tasks.snapshots import Forecast, Interpolation, SnapshotTask


class BigVortex(SnapshotTask):
    family = "big_vortex"
    file = "ocean/big_oceans_forecast.npz"
    splits = {"interpolation": Interpolation(train=(0, 2, 4, 6, 8, 10)), "forecast-5": Forecast(train=6)}
