"""``benchmarks/gpu_check.py`` on a machine without a GPU, and the CUDA checks it runs on one.

The CUDA checks here are the methods' device-specific checkpoint code, resumed bit for bit on the
device that wrote it: WLM saves the CUDA generator's state beside the CPU one, nn-APPEX's path
generator lives on the device (a CUDA checkpoint is not resumed on the CPU). Each is parametrised
over devices: the CPU variant runs everywhere (so that the check itself is tested), the CUDA one
only where torch sees a GPU, which is where ``gpu_check`` selects it (``pytest -k cuda``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

torch = pytest.importorskip("torch")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


def test_without_cuda_the_check_says_so_in_one_line_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, also on a machine that has one
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                       text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = (r.stdout + r.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device visible ("), lines
    assert lines[0].endswith("; nothing to check.")


def test_an_unknown_part_is_refused_in_one_sentence():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--parts", "tests,bench"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip() == ("gpu_check: unknown part 'bench'; choose from tests, "
                                                      "timing, sweep")


def test_the_timing_part_runs_as_a_plumbing_check_on_the_cpu():
    """``--device cpu``: the timing code (WLM's training iteration, nn-APPEX's outer iteration,
    their child processes and the table) runs at tiny sizes, labelled as no GPU measurement."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                        "--parts", "timing"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("gpu_check --device cpu: PLUMBING CHECK ON THE CPU.")
    for key in ("wlm iteration N=48", "nn_appex outer iteration N=48", "wlm iteration N=96",
                "nn_appex outer iteration N=96"):
        (row,) = [line for line in r.stdout.splitlines() if line.startswith(f"| {key} ")]
        assert row.count(" s ") >= 2 and "not reached" not in row, row  # both sides measured
    assert "| timing | PASS " in r.stdout and r.stdout.rstrip().endswith("plumbing check: all parts passed")


class _Stop(Exception):
    pass


def _stop_after(n: int):
    def hook(done: int) -> None:
        if done == n:
            raise _Stop

    return hook


def _same_appex(a, b, what: str) -> None:
    for key in ("sigma2", "sigma2_per_iter", "drift_loss_per_iter"):
        assert a.learned()[key] == b.learned()[key], f"{what}: {key} differs"
    for p, q in zip(a._params, b._params):
        np.testing.assert_array_equal(p, q, err_msg=what)


@pytest.mark.parametrize("device", DEVICES)
def test_nn_appex_resumes_bit_for_bit_on_the_device_that_wrote_the_checkpoint(device, tmp_path):
    from methods.nn_appex import NNAPPEX
    from tasks.ou import OU

    data = OU("unpaired", seed=0).train_data().without_velocities()
    hp = NNAPPEX.default_hparams("ou/unpaired", "smoke")
    hp.update(n_outer=3, n_paths=150, epochs=2, width=16)
    whole = NNAPPEX(hp, seed=2, device=device)
    whole.fit(data)
    again = NNAPPEX(hp, seed=2, device=device)
    again.fit(data)
    _same_appex(whole, again, f"two uninterrupted fits on {device} (not deterministic)")

    ckpt = tmp_path / "job.ckpt"
    first = NNAPPEX(hp, seed=2, device=device)
    first.checkpoint_path = ckpt
    first.on_outer_iteration = _stop_after(1)
    with pytest.raises(_Stop):
        first.fit(data)
    assert torch.load(ckpt, weights_only=False)["device"] == device
    rest = NNAPPEX(hp, seed=2, device=device)
    rest.checkpoint_path = ckpt
    rest.fit(data)
    assert rest.learned()["resumed_at"] == "1"
    _same_appex(whole, rest, f"the fit resumed on {device}")

    if device == "cuda":  # a CUDA generator's state does not fit a CPU generator: start over
        on_cpu = NNAPPEX(hp, seed=2, device="cpu")
        on_cpu.checkpoint_path = ckpt
        with pytest.warns(UserWarning, match="written with device 'cuda', this fit has 'cpu'"):
            on_cpu.fit(data)
        assert on_cpu.learned()["resumed_at"] == ""


@pytest.mark.parametrize("device", DEVICES)
def test_wlm_resumes_bit_for_bit_on_the_device_that_wrote_the_checkpoint(device, tmp_path):
    from methods.wlm import WLM
    from tasks.ou import OU

    data = OU("paired", seed=0).train_data()
    # dropout and particle minibatches: torch's generator (on the device) and NumPy's must resume
    hp = WLM.default_hparams("ou/paired", "smoke")
    hp.update(iterations=5, dropout=0.1, particles_per_batch=24)

    def same(a, b, what: str) -> None:
        assert a.learned()["loss_curve"] == b.learned()["loss_curve"], f"{what}: the loss curves differ"
        for name, value in a._ema_state.items():
            np.testing.assert_array_equal(b._ema_state[name], value, err_msg=f"{what}: {name}")

    whole = WLM(hp, seed=3, device=device)
    whole.fit(data)
    again = WLM(hp, seed=3, device=device)
    again.fit(data)
    same(whole, again, f"two uninterrupted fits on {device} (not deterministic)")

    ckpt = tmp_path / "job.ckpt"
    for _ in range(2):  # capped: stops after each iteration, with a checkpoint
        capped = WLM(dict(hp, max_minutes=1e-9), seed=3, device=device)
        capped.checkpoint_path = ckpt
        capped.fit(data)
    rest = WLM(hp, seed=3, device=device)
    rest.checkpoint_path = ckpt
    rest.fit(data)
    assert rest.learned()["resumed_at"] == "1,2" and rest.learned()["iterations"] == 5
    same(whole, rest, f"the fit resumed on {device}")
