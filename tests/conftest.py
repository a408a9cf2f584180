"""Shared fixtures: one Ray cluster per test session (ray.init costs ~9 s and ~0.5 GB here)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

if "POPBENCH_DATA_DIR" not in os.environ and SHARED_DATA.exists():
    os.environ["POPBENCH_DATA_DIR"] = str(SHARED_DATA)
os.environ.setdefault("POPBENCH_OFFLINE", "1")
# One thread per test process, as every job gets: small networks on 2 loaded cores ran up to 40x
# slower with torch's default thread count. Set before any framework is imported.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with 2 CPUs and 2 declared (fake) GPUs, shared by all tests."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        with warnings.catch_warnings():
            # JAX (imported by earlier tests) warns on every fork; Ray's are subprocess fork+exec
            # of its daemons (the child runs no JAX code), not a fork of this runtime
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     _system_config={"worker_niceness": 0})  # as the harness starts its own
    yield ray
    ray.shutdown()


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``python run_all.py ARGS`` in a fresh interpreter."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "run_all.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of small-tensor tests (as every job gets): small
    networks on 2 loaded cores ran up to 40x slower with more, whatever the environment set."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fixed_potential(fn):
    """A hand-written scalar network s(x, t) = fn(x, t) with the interface of the learned ones
    (action matching, DICE): a module with one (unused) parameter, t given per row."""
    import torch

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, x, t):
            return fn(x, t.reshape(-1).to(x.dtype)) + 0 * self.dummy

    return Fixed()
