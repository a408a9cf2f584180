"""vortex: the exact splits and queries of the spec, the table columns, a corrupted file refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from harness import data
from harness.conformance import check_task
from harness.protocol import PopbenchError, TableColumn
from tasks.snapshots import Forecast, Interpolation, SnapshotTask
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


# ---------------------------------------------------------------------------------------------
# The snapshot-file template the vortex variants are instances of


def test_vortex_is_the_snapshot_template_with_two_splits():
    assert issubclass(Vortex, SnapshotTask)
    assert Vortex.splits == {"interpolation": Interpolation(train=(0, 2, 4, 6, 8)), "forecast": Forecast(train=10)}
    assert Vortex.resembles == {"interpolation": "vortex/interpolation", "forecast": "vortex/forecast"}


class Drifters(SnapshotTask):
    family = "drifters"
    file = ""  # each test points it at its own file
    dt = 0.5
    splits = {"gaps": Interpolation(train=(0, 1, 3, 5)), "ahead": Forecast(train=4)}


@pytest.fixture
def drifters(monkeypatch):
    def point(path, **attrs):
        for k, v in {"file": str(path), **attrs}.items():
            monkeypatch.setattr(Drifters, k, v)
        return Drifters

    return point


def test_a_positions_only_file_by_path_with_both_splits(tmp_path, drifters):
    """An .npy of positions (T=6, N=40, d=3), no velocities, snapshots 0.5 apart: the holdouts start
    from the training snapshot before them; a forecast over two later snapshots adds Forecast W1."""
    xs = np.random.default_rng(0).normal(size=(6, 40, 3)) + np.arange(6)[:, None, None]
    path = tmp_path / "drifters.npy"
    np.save(path, xs)
    cls = drifters(path)
    assert cls.variants == ("gaps", "ahead") and cls.data_files == ()
    assert cls.resembles == {"gaps": "vortex/interpolation", "ahead": "vortex/forecast"}

    gaps = check_task(cls, "gaps")
    d = gaps.train_data()
    assert list(d.times) == [0.0, 0.5, 1.5, 2.5] and all(m.v is None for m in d.marginals)
    qs = gaps.queries()
    assert [(q.name, q.start.index, q.targets[0].index, q.targets[0].t) for q in qs] == [
        ("holdout-2", 1, 2, 1.0), ("holdout-4", 3, 4, 2.0)]
    assert np.array_equal(qs[1].targets[0].x, xs[4])
    cells = {**gaps.summarize(qs[0], [0.2]), **gaps.summarize(qs[1], [0.4])}
    assert gaps.extra_columns(cells) == {TableColumn("gaps", "w1_mean_holdouts", "gaps"): pytest.approx(0.3)}

    ahead = check_task(cls, "ahead")
    roll, nxt = ahead.queries()
    assert [tg.group for tg in roll.targets] == ["train"] * 3 + ["test"] * 2
    assert (nxt.start.index, [tg.index for tg in nxt.targets]) == (3, [4, 5])
    cells = {**ahead.summarize(roll, [1.0, 2.0, 3.0, 4.0, 6.0]), **ahead.summarize(nxt, [0.5, 0.7])}
    assert cells == {TableColumn("ahead", "w1_t5_from_t0", "ahead"): 6.0,
                     TableColumn("ahead", "train_w1", "ahead"): 2.0,
                     TableColumn("ahead", "forecast_w1", "ahead"): 5.0,
                     TableColumn("ahead", "w1_t5_from_t3", "ahead"): 0.7}


def test_snapshot_files_that_do_not_fit_are_one_sentence(tmp_path, drifters):
    np.save(tmp_path / "short.npy", np.zeros((4, 10, 2)))
    with pytest.raises(PopbenchError, match="does not fit the 4 snapshots"):
        drifters(tmp_path / "short.npy")("gaps").train_data()
    np.savez(tmp_path / "novel.npz", pos=np.zeros((6, 10, 2)))
    with pytest.raises(PopbenchError, match="no 'positions' array"):
        drifters(tmp_path / "novel.npz")("gaps").train_data()
    with pytest.raises(PopbenchError, match="neither registered"):
        drifters(tmp_path / "nowhere.npz")("gaps")
    np.save(tmp_path / "ok.npy", np.zeros((6, 10, 2)))
    with pytest.raises(PopbenchError, match=r"expected \(6, 11, 2\)"):
        drifters(tmp_path / "ok.npy", shapes={str(tmp_path / "ok.npy"): (6, 11, 2)})("gaps").train_data()
    with pytest.raises(PopbenchError, match="velocities have shape"):
        np.savez(tmp_path / "v.npz", positions=np.zeros((6, 10, 2)), velocities=np.zeros((6, 10, 3)))
        drifters(tmp_path / "v.npz")("gaps").train_data()


def test_a_plugins_registered_file_is_downloaded_verified_and_read(tmp_path, monkeypatch):
    """A plugin registers its file (name, URL, checksum) with harness.data.register, as the shipped
    ones are: the task finds it, fetches it (a file:// URL here) into the cache and checks it."""
    import hashlib

    monkeypatch.setattr(data, "REGISTRY", dict(data.REGISTRY))  # this test's registration stays here
    monkeypatch.setenv("POPBENCH_OFFLINE", "0")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("POPBENCH_CACHE_DIR", str(tmp_path / "cache"))
    xs, vs = np.random.default_rng(1).normal(size=(2, 5, 30, 2))
    upstream = tmp_path / "upstream.npz"
    np.savez(upstream, positions=xs, velocities=vs)
    raw = upstream.read_bytes()
    data.register(data.DataFile("lab/swirl.npz", upstream.as_uri(), size=len(raw),
                                sha256=hashlib.sha256(raw).hexdigest(), licence="CC0"))

    class Swirl(SnapshotTask):
        family = "swirl"
        file = "lab/swirl.npz"
        splits = {"forecast": Forecast(train=4)}

    assert Swirl.data_files == ("lab/swirl.npz",) and Swirl.variant_data_files("forecast") == ("lab/swirl.npz",)
    task = Swirl("forecast", data_dir=str(tmp_path / "data"))
    assert (tmp_path / "data" / "lab" / "swirl.npz").read_bytes() == raw  # the first writable directory
    d = task.train_data()
    assert np.array_equal(d.marginals[2].x, xs[2]) and np.array_equal(d.marginals[2].v, vs[2])
    (tmp_path / "data" / "lab" / "swirl.npz").write_bytes(raw[:-1])
    with pytest.raises(PopbenchError, match="corrupted or the wrong file"):
        Swirl("forecast", data_dir=str(tmp_path / "data"))
