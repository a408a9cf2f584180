"""vortex: the exact splits and queries of the spec, the table columns, a corrupted file refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from harness import data
from harness.conformance import check_task
from harness.protocol import PopbenchError, TableColumn
from tasks.vortex import Vortex


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("POPBENCH_OFFLINE", "1")


def real(name: str):
    try:
        return data.resolve(name, download=False)
    except PopbenchError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def small():
    return real("ocean/oceans_with_v0.npz")


@pytest.fixture
def big():
    return real("ocean/big_oceans_forecast.npz")


def test_interpolation_split_and_queries(small):
    task = check_task(Vortex, "interpolation")
    with np.load(small) as z:
        pos, vel = z["positions"], z["velocities"]
    d = task.train_data()
    assert [m.index for m in d.marginals] == [0, 2, 4, 6, 8]
    assert list(d.times) == [0.0, 2.0, 4.0, 6.0, 8.0]
    for m in d.marginals:
        assert np.array_equal(m.x, pos[m.index]) and np.array_equal(m.v, vel[m.index])
        assert m.x.shape == (111, 2)
    qs = task.queries()
    assert [q.name for q in qs] == ["holdout-1", "holdout-3", "holdout-5", "holdout-7"]
    for q, h in zip(qs, (1, 3, 5, 7)):
        assert q.kind == "interpolate"
        assert q.start.index == h - 1 and q.start.t == h - 1
        assert np.array_equal(q.start.x, pos[h - 1]) and np.array_equal(q.start.v, vel[h - 1])
        (tg,) = q.targets
        assert (tg.index, tg.t, tg.group) == (h, float(h), "test")
        assert np.array_equal(tg.x, pos[h])
    cells = {}
    for q, w in zip(qs, (0.1, 0.2, 0.3, 0.4)):
        cells.update(task.summarize(q, [w]))
    assert set(cells) == {TableColumn("interpolation", f"w1_holdout_{h}", "interpolation") for h in (1, 3, 5, 7)}
    extra = task.extra_columns(cells)
    assert extra == {TableColumn("interpolation", "w1_mean_holdouts", "interpolation"): pytest.approx(0.25)}
    cells.pop(TableColumn("interpolation", "w1_holdout_7", "interpolation"))
    assert task.extra_columns(cells) == {}  # no mean over an incomplete set


def test_forecast_split_and_queries(big):
    task = check_task(Vortex, "forecast")
    with np.load(big) as z:
        pos, vel = z["positions"], z["velocities"]
    d = task.train_data()
    assert [m.index for m in d.marginals] == list(range(10))
    assert all(m.v is not None and np.array_equal(m.v, vel[m.index]) for m in d.marginals)
    assert d.marginals[0].x.shape == (400, 2)
    roll, nxt = task.queries()
    assert (roll.name, roll.kind, roll.start.index) == ("rollout", "rollout", 0)
    assert np.array_equal(roll.start.v, vel[0])
    assert [tg.index for tg in roll.targets] == list(range(1, 11))
    assert [tg.group for tg in roll.targets] == ["train"] * 9 + ["test"]
    assert (nxt.name, nxt.kind, nxt.start.index, nxt.start.t) == ("next-step", "next_step", 9, 9.0)
    assert np.array_equal(nxt.start.x, pos[9]) and np.array_equal(nxt.start.v, vel[9])
    assert [(tg.index, tg.group) for tg in nxt.targets] == [(10, "test")]
    assert np.array_equal(nxt.targets[0].x, pos[10])
    w = list(np.arange(1.0, 11.0))
    cells = {**task.summarize(roll, w), **task.summarize(nxt, [0.5])}
    assert cells == {
        TableColumn("forecast", "train_w1", "forecast"): pytest.approx(5.0),
        TableColumn("forecast", "w1_t10_from_t0", "forecast"): 10.0,
        TableColumn("forecast", "w1_t10_from_t9", "forecast"): 0.5,
    }
    assert task.extra_columns(cells) == {}


def test_family_metadata():
    assert Vortex.variants == ("interpolation", "forecast")
    assert not Vortex.has_simulator
    assert Vortex.variant_data_files("interpolation") == ("ocean/oceans_with_v0.npz",)
    assert Vortex.variant_data_files("forecast") == ("ocean/big_oceans_forecast.npz",)
    assert Vortex.paper_table == {"interpolation": (2, "interpolation"), "forecast": (2, "forecast")}
    import tasks.vortex as mod

    assert "0.9" in mod.__doc__ and "Δt = 1" in mod.__doc__  # the physical step is documented


def test_corrupted_vortex_file_is_refused(small, tmp_path):
    dest = tmp_path / "ocean" / "oceans_with_v0.npz"
    dest.parent.mkdir()
    shutil.copyfile(small, dest)
    Vortex("interpolation", data_dir=str(tmp_path))  # an intact copy is accepted
    raw = bytearray(dest.read_bytes())
    raw[100] ^= 0xFF
    dest.write_bytes(bytes(raw))
    with pytest.raises(PopbenchError) as err:
        Vortex("interpolation", data_dir=str(tmp_path))
    msg = str(err.value)
    assert "oceans_with_v0.npz" in msg and "30168f54f8eb2ea59f" in msg and "https://" in msg
    assert str(dest.parent) in msg


def test_missing_file_sentence(tmp_path, monkeypatch):
    monkeypatch.delenv("POPBENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("POPBENCH_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(PopbenchError) as err:
        Vortex("forecast", data_dir=str(tmp_path / "data"))
    msg = str(err.value)
    assert "big_oceans_forecast.npz" in msg and "cd3b60a394b854c65f9c6f3b9739084798143987" in msg
    assert "raw.githubusercontent.com/guanton/WLM" in msg and str(tmp_path / "data" / "ocean") in msg


def test_data_dir_is_searched_first_and_the_environments_directory_still_after_it(tmp_path, monkeypatch):
    """--data-dir used to replace $POPBENCH_DATA_DIR: a file only in the environment's directory was
    then 'missing', against the documented order (explicit, environment, cache)."""
    from tests.conftest import run_cli

    path = real("ocean/oceans_with_v0.npz")
    env_dir = str(path.parent.parent)
    r = run_cli("--tasks", "vortex/interpolation", "--methods", "static", "--data-dir", str(tmp_path), "--dry-run",
                "--out", str(tmp_path / "run"), env={"POPBENCH_DATA_DIR": env_dir, "POPBENCH_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
