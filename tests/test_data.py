"""harness.data (registry, resolution order, verification, atomic download), tasks._cache, harness.plots."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from harness import data
from harness.protocol import PopbenchError
from tasks import _cache

PNG = b"\x89PNG\r\n\x1a\n"
REAL_DATA_DIR = os.environ.get("POPBENCH_DATA_DIR")  # read before the fixtures clear it


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.delenv("POPBENCH_DATA_DIR", raising=False)
    monkeypatch.delenv("POPBENCH_OFFLINE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("POPBENCH_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A registered file ``toy/blob.bin`` whose source is a local file:// URL."""
    payload = os.urandom(3000)
    src = tmp_path / "upstream" / "blob.bin"
    src.parent.mkdir()
    src.write_bytes(payload)
    entry = data.DataFile(
        name="toy/blob.bin", url=src.as_uri(), size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        git_blob=hashlib.sha1(b"blob %d\0" % len(payload) + payload).hexdigest(), licence="test",
    )
    monkeypatch.setitem(data.REGISTRY, entry.name, entry)
    return entry, payload


def put(root, entry, payload):
    p = root / entry.name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(payload)
    return p


def test_registry_entries_are_complete():
    assert set(data.REGISTRY) >= {
        "ocean/oceans_with_v0.npz", "ocean/big_oceans_forecast.npz",
        "eb/eb_velocity_v5.npz", "eb/sbirr_eb_data_300per_marginal.npy",
    }
    for f in data.REGISTRY.values():
        assert f.url.startswith("https://") and f.licence
        assert f.sha256 or f.git_blob
    assert data.REGISTRY["eb/eb_velocity_v5.npz"].git_blob == "06b92296690840bb4c146085b6cd18ad89667c74"
    assert data.entry("oceans_with_v0.npz").name == "ocean/oceans_with_v0.npz"
    with pytest.raises(PopbenchError, match="unknown data file"):
        data.entry("nope.npz")


def test_real_files_match_their_checksums():
    import pathlib

    shared = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
    roots = [p for p in (REAL_DATA_DIR, shared) if p and pathlib.Path(p).is_dir()]
    found = 0
    for f in data.REGISTRY.values():
        for root in roots:
            p = pathlib.Path(root) / f.name
            if p.is_file():
                sha, blob = data.file_digests(p)
                assert (f.sha256 in (None, sha)) and (f.git_blob in (None, blob)), f.name
                found += 1
                break
    if not found:
        pytest.skip("no real data file found (set POPBENCH_DATA_DIR)")


def test_resolution_order(toy, tmp_path, monkeypatch):
    entry, payload = toy
    explicit, env, cache = tmp_path / "explicit", tmp_path / "env", tmp_path / "cache"
    for root in (explicit, env, cache):
        put(root, entry, payload)
    monkeypatch.setenv("POPBENCH_DATA_DIR", str(env))
    assert data.resolve(entry.name, data_dir=explicit, download=False) == explicit / entry.name
    assert data.resolve(entry.name, download=False) == env / entry.name
    monkeypatch.delenv("POPBENCH_DATA_DIR")
    assert data.resolve(entry.name, download=False) == cache / entry.name
    # a directory without the file is skipped, the next one is used
    (env / entry.name).unlink()
    monkeypatch.setenv("POPBENCH_DATA_DIR", str(env))
    assert data.resolve(entry.name, download=False) == cache / entry.name


def test_corrupted_file_is_refused(toy, tmp_path):
    entry, payload = toy
    bad = bytearray(payload)
    bad[10] ^= 1
    p = put(tmp_path / "d", entry, bytes(bad))
    with pytest.raises(PopbenchError) as err:
        data.resolve(entry.name, data_dir=tmp_path / "d")
    msg = str(err.value)
    assert "toy/blob.bin" in msg and entry.sha256 in msg and entry.url in msg and str(p.parent) in msg
    p.write_bytes(payload[:-1])  # wrong size
    with pytest.raises(PopbenchError, match="bytes"):
        data.resolve(entry.name, data_dir=tmp_path / "d")


def test_download_verifies_and_writes_atomically(toy, tmp_path):
    entry, payload = toy
    dest_root = tmp_path / "d"
    path = data.resolve(entry.name, data_dir=dest_root)  # downloads are on by default
    assert path == dest_root / entry.name and path.read_bytes() == payload
    assert sorted(p.name for p in path.parent.iterdir()) == ["blob.bin"]  # no temp file left


def test_download_goes_past_a_read_only_data_dir_to_the_first_writable_one(toy, tmp_path, monkeypatch):
    entry, payload = toy
    shared, cache = tmp_path / "shared", tmp_path / "cache"
    shared.mkdir()
    monkeypatch.setenv("POPBENCH_DATA_DIR", str(shared))
    monkeypatch.setenv("POPBENCH_CACHE_DIR", str(cache))
    real = os.access
    monkeypatch.setattr(data.os, "access", lambda p, mode: False if Path(p) == shared else real(p, mode))
    path = data.resolve(entry.name, download=True)
    assert path == cache / entry.name and path.read_bytes() == payload


def test_failed_verification_leaves_nothing(toy, tmp_path, monkeypatch):
    entry, payload = toy
    wrong = data.DataFile(**{**entry.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(data.REGISTRY, entry.name, wrong)
    with pytest.raises(PopbenchError) as err:
        data.resolve(entry.name, data_dir=tmp_path / "d", download=True)
    assert "verification" in str(err.value) and "0" * 64 in str(err.value)
    assert not (tmp_path / "d").exists()  # no temp file, and no folder the download made for it
    (tmp_path / "e" / "toy").mkdir(parents=True)  # a folder that was there before stays
    with pytest.raises(PopbenchError):
        data.resolve(entry.name, data_dir=tmp_path / "e", download=True)
    assert list((tmp_path / "e" / "toy").iterdir()) == []


@pytest.mark.parametrize("var,value", [("POPBENCH_OFFLINE", "1"), ("CI", "true")])
def test_offline_and_ci_disable_downloads(toy, tmp_path, monkeypatch, var, value):
    entry, _ = toy
    monkeypatch.setenv(var, value)
    assert not data.downloads_allowed()
    with pytest.raises(PopbenchError) as err:
        data.resolve(entry.name, data_dir=tmp_path / "d")
    msg = str(err.value)
    assert "downloads are off" in msg and entry.url in msg and entry.sha256 in msg
    assert str(tmp_path / "d" / "toy") in msg
    assert not (tmp_path / "d" / entry.name).exists()


def test_unreachable_url_gives_the_sentence(toy, tmp_path, monkeypatch):
    entry, _ = toy
    gone = data.DataFile(**{**entry.__dict__, "url": (tmp_path / "missing.bin").as_uri()})
    monkeypatch.setitem(data.REGISTRY, entry.name, gone)
    with pytest.raises(PopbenchError, match="download failed"):
        data.resolve(entry.name, data_dir=tmp_path / "d", download=True)
    assert not (tmp_path / "d").exists()


def test_a_plugin_registers_its_files_as_the_shipped_ones_are(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "REGISTRY", dict(data.REGISTRY))
    payload = b"snapshots" * 100
    src = tmp_path / "up.bin"
    src.write_bytes(payload)
    f = data.DataFile("lab/up.bin", src.as_uri(), sha256=hashlib.sha256(payload).hexdigest())
    assert data.register(f) is f and data.register(f) is f  # the same entry twice: fine
    assert data.fetch(["up.bin"], data_dir=tmp_path / "d") == [tmp_path / "d" / "lab" / "up.bin"]
    with pytest.raises(PopbenchError, match="already registered, from file://"):
        data.register(data.DataFile("lab/up.bin", "https://elsewhere.example/up.bin", sha256="0" * 64))
    with pytest.raises(PopbenchError, match="needs a checksum"):
        data.register(data.DataFile("lab/other.bin", "https://example.org/other.bin"))
    shipped = data.REGISTRY["ocean/oceans_with_v0.npz"]
    assert data.register(shipped) is shipped  # the shipped files are registered the same way


def test_fetch(toy, tmp_path):
    entry, payload = toy
    paths = data.fetch([entry.name], data_dir=tmp_path / "d")
    assert paths == [tmp_path / "d" / entry.name]
    assert data.fetch(["blob.bin"], data_dir=tmp_path / "d") == paths  # already there: verified only
    with pytest.raises(PopbenchError):
        data.fetch(["no-such-file"])


def test_checksum_is_memoised(toy, tmp_path, monkeypatch):
    entry, payload = toy
    p = put(tmp_path / "d", entry, payload)
    calls = []
    real = data.file_digests
    monkeypatch.setattr(data, "file_digests", lambda path: calls.append(path) or real(path))
    for _ in range(3):
        data.resolve(entry.name, data_dir=tmp_path / "d")
    assert len(calls) == 1
    os.utime(p, ns=(1, 1))  # a changed mtime is checked again
    data.resolve(entry.name, data_dir=tmp_path / "d")
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------
# tasks._cache


def test_generated_data_cache(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"x": np.arange(6.0).reshape(3, 2)}

    params = {"variant": "a", "seed": 3, "version": 1}
    a = _cache.cached_arrays("fam", params, build)
    b = _cache.cached_arrays("fam", params, build)
    assert len(calls) == 1 and np.array_equal(a["x"], b["x"])
    path = _cache.cache_path("fam", params)
    assert path.parent == tmp_path / "cache" / "generated" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    _cache.cached_arrays("fam", {**params, "seed": 4}, build)  # another seed: another entry
    assert len(calls) == 2
    path.write_bytes(b"garbage")  # a damaged file is regenerated, never trusted
    c = _cache.cached_arrays("fam", params, build)
    assert len(calls) == 3 and np.array_equal(c["x"], a["x"])


def test_cache_can_be_disabled(monkeypatch):
    monkeypatch.setenv("POPBENCH_NO_CACHE", "1")
    calls = []
    for _ in range(2):
        _cache.cached_arrays("fam", {"k": 1}, lambda: calls.append(1) or {"x": np.zeros(2)})
    assert len(calls) == 2 and not _cache.cache_path("fam", {"k": 1}).exists()


# ---------------------------------------------------------------------------------------------
# harness.plots


def test_plots_write_pngs(tmp_path):
    from harness.plots import plot_curves, plot_marginals, plot_rollouts
    from tasks.ou import OU

    task = OU("unpaired", seed=0)
    p = plot_marginals(task, tmp_path / "m.png", max_panels=6)
    assert p.read_bytes()[:8] == PNG
    (q,) = task.queries()
    times = list(q.times[:4])
    truth = [tg.x for tg in q.targets[:4]]
    p = plot_rollouts(times, truth, {"static": [q.start.x] * 4, "shift": [x + 1 for x in truth]}, tmp_path / "r.png")
    assert p.read_bytes()[:8] == PNG
    p = plot_curves({"a": {"seed 0": (None, [3.0, 2.0, 1.5]), "seed 1": ([2, 4, 6], [1.0, 1.1, 1.2])},
                     "b": {"seed 0": ([1, 2], [0.5, 0.4])}}, tmp_path / "c.png", ylabel="value")
    assert p.read_bytes()[:8] == PNG


def test_rollout_figure_keeps_times_only_some_methods_answer(tmp_path):
    """An interpolation-only method leaves the forecast columns empty ("—") for itself; it must not
    drop them for the methods that forecast (the figure used to show only shared times)."""
    from harness.figures import rollout_figure, rollout_panels
    from harness.protocol import target_within_training
    from harness.store import RunStore
    from harness.sweep import plan_jobs, run_plan
    from tasks.ou import OU

    plan = plan_jobs("ou/paired", "static,harness.testing:InterpolationOnly", "smoke", [0])
    run_plan(plan, RunStore(tmp_path), executor="serial", progress=False)
    times, truth, by = rollout_panels(tmp_path, "ou", "paired", ["static", "harness.testing:InterpolationOnly"])
    data = OU("paired", seed=0).train_data()
    inside = [target_within_training(t, data) for t in times]
    assert any(inside) and not all(inside)  # both interpolation and forecast columns
    assert times == sorted(times) and len(truth) == len(times)
    assert all(p is not None for p in by["static"])
    assert [p is not None for p in by["harness.testing:InterpolationOnly"]] == inside
    p = rollout_figure(tmp_path, "ou", "paired", ["static", "harness.testing:InterpolationOnly"], tmp_path / "r.png")
    assert p.read_bytes()[:8] == PNG


def test_registered_families_load():
    from harness import registry

    for name in ("gf_sde", "boids", "vortex", "eb", "eb300"):
        cls = registry.tasks.load(name)
        assert cls.family == name and cls.variants and cls.description
        for v in cls.variants:
            files = cls.variant_data_files(v)
            assert all(f in data.REGISTRY for f in files)


def test_fetch_accepts_task_names(monkeypatch):
    seen = []
    monkeypatch.setattr(data, "resolve", lambda n, data_dir=None, download=None: seen.append(n) or n)
    data.fetch(["vortex/forecast", "eb300", "oceans_with_v0.npz"])
    assert seen == ["ocean/big_oceans_forecast.npz", "eb/sbirr_eb_data_300per_marginal.npy", "ocean/oceans_with_v0.npz"]
    seen.clear()
    data.fetch(["vortex"])
    assert seen == ["ocean/oceans_with_v0.npz", "ocean/big_oceans_forecast.npz"]
    seen.clear()
    data.fetch(["gf_sde"])  # a synthetic family needs no file
    assert seen == []
    with pytest.raises(PopbenchError, match="vortex has no variant 'forcast'"):  # a typo fetches nothing silently
        data.fetch(["vortex/forcast"])
