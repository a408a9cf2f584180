"""The example plugin is pip-installed, discovered through its entry point, and runs."""

import subprocess
import sys

from harness.conformance import check_method

from .conftest import ROOT, run_cli


def test_example_plugin_installs_is_discovered_and_runs(tmp_path):
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          str(ROOT / "examples" / "plugin")], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    listing = run_cli("--list")
    assert "mean_drift" in listing.stdout and "entry-point:popbench-example-plugin" in listing.stdout
    r = run_cli("--tasks", "ou", "--methods", "mean_drift,static", "--out", str(tmp_path / "r"), "--no-progress")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| mean_drift"))
    static = next(line for line in r.stdout.splitlines() if line.startswith("| static"))
    # the OU mean relaxes smoothly: following the mean beats standing still
    assert float(row.split("|")[2].split("±")[0].strip(" *")) < float(static.split("|")[2].split("±")[0])

    from popbench_example.mean_drift import MeanDrift

    check_method(MeanDrift)
