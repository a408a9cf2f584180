"""publish --drop-superseded: a job made with settings its method no longer runs (an older version
of the method) is left out of the publication by name, never averaged with the current jobs and
never silently lost."""

from __future__ import annotations

import pytest

from harness.store import BUNDLE, bundle_job_ids
from .conftest import run_cli

pytest.importorskip("jax")


def _rows(md: str) -> set[str]:
    return {line.split("|")[1].strip() for line in md.splitlines()[4:] if line.startswith("|")}


def test_publish_drops_superseded_settings_only_when_asked(tmp_path):
    run, out = tmp_path / "run", tmp_path / "published"
    base = ("--tasks", "ou/paired", "--profile", "smoke", "--out", str(run), "--no-progress")
    # the current settings, and an "older version" of the same method (another setting)
    assert run_cli(*base, "--methods", "static,jkonet_star").returncode == 0
    old = run_cli(*base, "--methods", "jkonet_star", "--set", "jkonet_star.epochs=2")
    assert old.returncode == 0, old.stderr

    r = run_cli("publish", "--suite", "table1", "--profile", "smoke", "--run", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = _rows((out / "ou.md").read_text())
    assert sum(name.startswith("jkonet_star [") for name in rows) == 2  # each setting its own row
    published = bundle_job_ids(out / BUNDLE)
    assert len(published) == 3

    r = run_cli("publish", "--suite", "table1", "--profile", "smoke", "--run", str(run), "--out", str(out),
                "--drop-superseded")
    assert r.returncode == 0, r.stderr
    dropped = [line for line in r.stdout.splitlines() if line.startswith("dropped")]
    assert len(dropped) == 1 and "jkonet_star" in dropped[0]
    assert {"jkonet_star", "static"} <= _rows((out / "ou.md").read_text())
    assert not any("[" in name for name in _rows((out / "ou.md").read_text()))
    kept = bundle_job_ids(out / BUNDLE)
    assert len(kept) == 2 and kept < published and dropped[0].split(": ", 1)[1] in published - kept
    # the rollout figure draws the kept jkonet_star (without the drop it refuses to mix two settings)
    assert "no rollout figure" not in r.stderr and (out / "figures" / "ou_paired_rollouts.png").exists()

    # a publication still refuses to lose a job the run does not hold and nobody dropped
    r = run_cli("publish", "--suite", "table1", "--profile", "smoke", "--run", str(tmp_path / "other"),
                "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr
