"""harness/checkpoint.py: what a checkpoint must match, atomic writes, torn and foreign files."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from harness import checkpoint  # noqa: E402
from harness.protocol import Marginal, Method, TrainData  # noqa: E402


class _Capped(Method):
    name = "capped"
    budget_keys = ("max_minutes",)

    def fit(self, data):  # pragma: no cover - never called
        pass

    def predict(self, start, times, *, seed):  # pragma: no cover
        pass


def _data(shift=0.0):
    x = np.arange(6.0).reshape(3, 2)
    return TrainData((Marginal(0.0, x), Marginal(0.5, x + 1.0 + shift)), "toy", "a")


def test_fingerprint_is_settings_seed_and_data_not_budget():
    fp = checkpoint.fingerprint(_Capped({"lr": 1e-3, "max_minutes": None}, seed=1), _data())
    assert fp == checkpoint.fingerprint(_Capped({"lr": 1e-3, "max_minutes": 5.0}, seed=1), _data())
    for other in (_Capped({"lr": 2e-3, "max_minutes": None}, seed=1), _Capped({"lr": 1e-3, "max_minutes": None}, seed=2)):
        assert checkpoint.fingerprint(other, _data()) != fp
    assert checkpoint.fingerprint(_Capped({"lr": 1e-3, "max_minutes": None}, seed=1), _data(1e-12)) != fp


def test_save_load_roundtrip_and_refusals(tmp_path):
    path = tmp_path / "sub" / "job.ckpt"
    assert checkpoint.load(path, "fp", "X") is None and checkpoint.load(None, "fp", "X") is None
    rng = np.random.default_rng(0)
    checkpoint.save(path, {"fingerprint": "fp", "rng": rng.bit_generator.state, "w": [np.ones(3)]})
    assert [p.name for p in path.parent.iterdir()] == ["job.ckpt"]  # no temporary file left
    state = checkpoint.load(path, "fp", "X")
    assert state["rng"] == rng.bit_generator.state
    np.testing.assert_array_equal(state["w"][0], np.ones(3))
    with pytest.warns(UserWarning, match="X checkpoint .* another fit"):
        assert checkpoint.load(path, "other", "X") is None
    path.write_bytes(path.read_bytes()[:20])  # torn
    with pytest.warns(UserWarning, match="unreadable X checkpoint"):
        assert checkpoint.load(path, "fp", "X") is None


def test_code_trail_names_each_stretch(tmp_path):
    trail = checkpoint.CodeTrail("a.py 1", unit="epoch")
    assert str(trail) == "a.py 1"
    trail.resume([(0, "a.py 1")], 4, "X", tmp_path)  # same code: one stretch, no warning
    assert str(trail) == "a.py 1"
    later = checkpoint.CodeTrail("a.py 2", unit="epoch")
    with pytest.warns(UserWarning, match="trained by other code"):
        later.resume(trail.state(), 7, "X", tmp_path)
    assert str(later) == "from epoch 0: a.py 1; from epoch 7: a.py 2"
    legacy = checkpoint.CodeTrail("a.py 2")
    with pytest.warns(UserWarning):
        legacy.resume(None, 3, "X", tmp_path)
    assert str(legacy) == "from iteration 0: unrecorded; from iteration 3: a.py 2"
