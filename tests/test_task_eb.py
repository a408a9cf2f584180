"""eb: the real loader on a small file with the same keys (the full file is not shipped), whitening,
the leave-one-out splits, the missing-file sentence; eb300: the clearly named stand-in."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from harness import data
from harness.conformance import check_task
from harness.protocol import PopbenchError, TableColumn
from tasks.eb import EB, EB300, load_eb

SIZES = (23, 41, 32, 36, 33)  # small, unequal, like the real days (2381, 4163, 3278, 3665, 3332)


def git_blob_id(raw: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("POPBENCH_OFFLINE", "1")


@pytest.fixture
def fake_eb(tmp_path, monkeypatch):
    """A small eb_velocity_v5.npz (same keys, 8 PCs), registered under its own blob id."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), SIZES)
    perm = rng.permutation(labels.size)  # cells of different days interleaved, as in a real file
    labels = labels[perm]
    pcs = rng.normal(3.0, [5.0, 4.0, 3.0, 2.0, 1.5, 1.0, 1.0, 1.0], (labels.size, 8)) + labels[:, None]
    delta = rng.normal(0.5, 1.0, (labels.size, 8))
    path = tmp_path / "data" / "eb" / "eb_velocity_v5.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, pcs=pcs, pcs_delta=delta, sample_labels=labels, phate=pcs[:, :2])
    raw = path.read_bytes()
    entry = dataclasses.replace(data.REGISTRY["eb/eb_velocity_v5.npz"], git_blob=git_blob_id(raw), size=len(raw))
    monkeypatch.setitem(data.REGISTRY, "eb/eb_velocity_v5.npz", entry)
    return tmp_path / "data", pcs, delta, labels


def test_whitening_and_velocity_scaling(fake_eb):
    root, pcs, delta, labels = fake_eb
    xs, vs = load_eb(root / "eb" / "eb_velocity_v5.npz")
    assert [len(x) for x in xs] == list(SIZES)
    allx = np.concatenate(xs)
    assert allx.shape[1] == 5
    assert np.allclose(allx.mean(0), 0.0, atol=1e-12)
    assert np.allclose(allx.std(0), 1.0, atol=1e-12)  # ddof 0 over all cells of all days
    mu, sd = pcs[:, :5].mean(0), pcs[:, :5].std(0)
    for d in range(5):
        assert np.allclose(xs[d], (pcs[labels == d, :5] - mu) / sd)
        assert np.allclose(vs[d], delta[labels == d, :5] / sd)  # scaled, not shifted


@pytest.mark.parametrize("h", [1, 2, 3])
def test_leave_one_out_split(fake_eb, h):
    root, pcs, delta, labels = fake_eb
    task = check_task(EB, f"holdout-{h}", data_dir=str(root))
    xs, vs = load_eb(root / "eb" / "eb_velocity_v5.npz")
    d = task.train_data()
    days = [k for k in range(5) if k != h]
    assert [m.index for m in d.marginals] == days and list(d.times) == [float(k) for k in days]
    for m in d.marginals:
        assert np.array_equal(m.x, xs[m.index]) and np.array_equal(m.v, vs[m.index])
    (q,) = task.queries()
    assert (q.name, q.kind, q.start.index, q.start.t) == (f"holdout-{h}", "interpolate", h - 1, float(h - 1))
    assert np.array_equal(q.start.x, xs[h - 1]) and np.array_equal(q.start.v, vs[h - 1])
    (tg,) = q.targets
    assert (tg.index, tg.t, tg.group) == (h, float(h), "test")
    assert np.array_equal(tg.x, xs[h]) and tg.x.shape[0] == SIZES[h]  # all cells of day h
    cells = task.summarize(q, [0.7])
    assert cells == {TableColumn("", f"w1_holdout_{h}", "leave-one-out"): 0.7}
    assert task.extra_columns(cells) == {TableColumn("", "w1_mean_holdouts", "leave-one-out"): 0.7}


def test_missing_eb_file_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("POPBENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("POPBENCH_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(PopbenchError) as err:
        EB("holdout-2", data_dir=str(tmp_path / "d"))
    msg = str(err.value)
    assert "eb_velocity_v5.npz" in msg
    assert "06b92296690840bb4c146085b6cd18ad89667c74" in msg
    assert "KrishnaswamyLab/TrajectoryNet" in msg
    assert str(tmp_path / "d" / "eb") in msg


def test_wrong_eb_file_is_refused(fake_eb, monkeypatch):
    root = fake_eb[0]
    real_entry = dataclasses.replace(data.REGISTRY["eb/eb_velocity_v5.npz"],
                                     git_blob="06b92296690840bb4c146085b6cd18ad89667c74", size=None)
    monkeypatch.setitem(data.REGISTRY, "eb/eb_velocity_v5.npz", real_entry)
    with pytest.raises(PopbenchError, match="git blob id"):
        EB("holdout-1", data_dir=str(root))


def test_eb_metadata():
    assert EB.variants == ("holdout-1", "holdout-2", "holdout-3")
    assert EB.paper_table == {"": (3, "leave-one-out")}
    assert EB.data_files == ("eb/eb_velocity_v5.npz",)
    assert EB300.family == "eb300" and EB300.variants == EB.variants
    assert EB300.paper_table == {}
    assert "stand-in" in EB300.description and "not comparable" in EB300.description


def test_eb300_stand_in():
    try:
        path = data.resolve("eb/sbirr_eb_data_300per_marginal.npy", download=False)
    except PopbenchError as exc:
        pytest.skip(str(exc))
    raw = np.load(path)
    for h in (1, 2, 3):
        task = check_task(EB300, f"holdout-{h}")
        d = task.train_data()
        assert [m.index for m in d.marginals] == [k for k in range(5) if k != h]
        assert all(m.v is None and m.x.shape == (300, 5) for m in d.marginals)
        for m in d.marginals:
            assert np.array_equal(m.x, raw[m.index])  # already whitened: not whitened again
        (q,) = task.queries()
        assert q.start.index == h - 1 and q.start.v is None
        assert np.array_equal(q.targets[0].x, raw[h])
        cells = task.summarize(q, [0.3])
        assert cells == {TableColumn("", f"w1_holdout_{h}", None): 0.3}
        assert task.extra_columns(cells) == {TableColumn("", "w1_mean_holdouts", None): 0.3}
