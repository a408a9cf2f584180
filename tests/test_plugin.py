"""The example plugin (examples/plugin): a method found through its entry point, and two task
families (a new potential, a new split of a snapshot file) run by ``package.module:Class`` through
run_all.py, with the reference rows and one learner. Nothing is installed into the environment:
the example goes on PYTHONPATH, beside a temporary .dist-info that carries its entry points."""

from __future__ import annotations

import json
import os
import tomllib

import numpy as np
import pytest

from harness import data, metrics
from harness.protocol import PopbenchError

from .conftest import ROOT, run_cli

PLUGIN = ROOT / "examples" / "plugin"
THREE_WELL = "popbench_example.three_well:ThreeWell"
BIG_VORTEX = "popbench_example.big_vortex:BigVortex"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """PYTHONPATH holding the example's package and the metadata `pip install` would write for it
    (name, version, the entry points of its pyproject.toml), in a temporary directory."""
    site = tmp_path_factory.mktemp("site")
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {ref}\n" for name, ref in eps.items()) + "\n"
        for group, eps in project["entry-points"].items()))
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site), str(PLUGIN), os.environ.get("PYTHONPATH")) if p)}


def _table(stdout: str, title: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header cells, {row label: cells}) of the Markdown table printed under ``**title**``."""
    lines = stdout.split(f"**{title}**", 1)[1].strip().splitlines()
    table = lines[: next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    return cells[0], {row[0]: row[1:] for row in cells[2:]}


def _number(cell: str) -> float:
    return float(cell.strip("*_ †").split()[0].strip("*_"))


def test_the_example_method_is_found_through_its_entry_point(plugin_env, tmp_path):
    listing = run_cli("--list", env=plugin_env)
    assert listing.returncode == 0, listing.stderr
    assert "mean_drift" in listing.stdout and "entry-point:popbench-example-plugin" in listing.stdout
    assert "three_well" in listing.stdout and "big_vortex" in listing.stdout  # its task entry points
    r = run_cli("--tasks", "ou", "--methods", "mean_drift,static", "--out", str(tmp_path / "r"), "--no-progress",
                env=plugin_env)
    assert r.returncode == 0, r.stderr
    _, rows = _table(r.stdout, "ou")
    # the OU mean relaxes smoothly: following the mean beats standing still
    assert _number(rows["mean_drift"][0]) < _number(rows["static"][0])


def test_example_task_modules_are_short_and_shown_verbatim_in_the_docs():
    docs = (ROOT / "docs" / "tasks.md").read_text()
    for name in ("three_well.py", "big_vortex.py"):
        text = (PLUGIN / "popbench_example" / name).read_text()
        assert len(text.splitlines()) < 40, name
        assert text.strip() in docs, f"docs/tasks.md no longer shows examples/plugin/popbench_example/{name}"


@pytest.fixture(scope="module")
def example_run(plugin_env, tmp_path_factory):
    try:
        data.resolve("ocean/big_oceans_forecast.npz", download=False)
    except PopbenchError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("run")
    r = run_cli("--tasks", f"{THREE_WELL}/three_well-unpaired,{BIG_VORTEX}", "--profile", "smoke",
                "--methods", "static,velocity_extrapolation,oracle,wlm", "--out", str(out), "--no-progress",
                env=plugin_env)
    assert r.returncode == 0, r.stderr
    return r, out


def test_example_tasks_run_with_reference_rows_and_a_learner(example_run):
    r, out = example_run
    header, rows = _table(r.stdout, "three_well")  # headed by the family's name, not module:Class
    assert header == ["method", "unpaired Train W1", "unpaired Forecast W1"]
    assert set(rows) == {"wlm", "static", "velocity_extrapolation (v)", "oracle (v)"}  # wlm's gf_sde settings: v0 = 0
    for col in range(2):  # the true SDE from the true start beats standing still
        assert _number(rows["oracle (v)"][col]) < _number(rows["static"][col])
    assert "note: wlm has no settings" not in r.stderr  # it has gf_sde's and vortex's, which these resemble

    header, rows = _table(r.stdout, "big_vortex")
    assert header == ["method", *(f"interpolation h={h}" for h in (1, 3, 5, 7, 9)), "interpolation mean",
                      "forecast-5 t10 from t0", "forecast-5 Train W1", "forecast-5 Forecast W1",
                      "forecast-5 t10 from t5"]
    assert set(rows) == {"wlm (v)", "static", "velocity_extrapolation (v)"}  # real data: no oracle
    assert all(c != "—" for cells in rows.values() for c in cells)
    # a cell by hand: static predicts snapshot 1 by snapshot 0 of the file
    with np.load(data.resolve("ocean/big_oceans_forecast.npz", download=False)) as z:
        x = z["positions"]
    assert _number(rows["static"][0]) == pytest.approx(metrics.w1(x[0], x[1]), abs=5e-4)
    assert _number(rows["static"][6]) == pytest.approx(metrics.w1(x[0], x[10]), abs=5e-4)
    jobs = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    jobs = [j for j in jobs if j["row_type"] == "job"]
    assert {(j["task"], j["variant"]) for j in jobs} == {(THREE_WELL, "three_well-unpaired"),
                                                         (BIG_VORTEX, "interpolation"), (BIG_VORTEX, "forecast-5")}
    wlm = {j["variant"]: j["hparams"] for j in jobs if j["method"] == "wlm"}
    assert wlm["interpolation"]["time_features"] == 16 and wlm["forecast-5"]["time_features"] == 0  # vortex's


def test_example_tables_are_headed_by_the_family_name(example_run):
    r, out = example_run
    assert "**three_well**" in r.stdout and "**big_vortex**" in r.stdout
    assert (out / "tables" / "three_well.md").exists()
