"""Snap-MMD (methods/snap_mmd.py): the drift against hand computations, the MMD and bandwidth,
recovery of a known Lamb-Oseen vortex from simulated snapshots, conformance, refusal of other
families."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from harness.conformance import check_method  # noqa: E402
from harness.protocol import Marginal, PopbenchError, TrainData  # noqa: E402
from methods import snap_mmd  # noqa: E402
from methods.snap_mmd import PARAMS, SnapMMD  # noqa: E402

TRUE = np.array([0.4, -0.3, -1.5, -4.0, 0.0, 0.0, -1.5, 0.0, math.log(0.1)])


def test_drift_by_hand():
    """Vortex part: Γ (1 − e^{−r²})/r² (−v, u) in the scaled coordinates u, v (scale exp(−exp(ℓ)));
    divergence part: D ((x − x₀ᵈ) exp(−exp(ℓᵈ)), y − y₀ᵈ); at the centre the vortex is still."""
    theta = np.array([0.5, -0.2, -1.0, 2.0, 0.1, 0.3, -0.5, 0.7, 0.0])
    x = np.array([[1.5, 0.6], [0.5, -0.2]])
    c = math.exp(-math.exp(-1.0))
    u, v = (1.5 - 0.5) * c, (0.6 + 0.2) * c
    r2 = u * u + v * v
    f = (1 - math.exp(-r2)) / r2
    cd = math.exp(-math.exp(-0.5))
    expect = np.array([
        [-2.0 * f * v + 0.7 * (1.5 - 0.1) * cd, 2.0 * f * u + 0.7 * (0.6 - 0.3)],
        [0.7 * (0.5 - 0.1) * cd, 0.7 * (-0.2 - 0.3)],
    ])
    with jax.enable_x64(True):
        got = np.asarray(snap_mmd.drift(jax.numpy.asarray(theta), jax.numpy.asarray(x)))
    np.testing.assert_allclose(got, expect, rtol=1e-12, atol=1e-12)


def test_mmd_and_bandwidth_by_hand():
    a = np.array([[0.0, 0.0], [1.0, 0.0]])
    b = np.array([[0.0, 1.0]])
    bw = 2.0
    k = lambda p, q: np.mean([[math.exp(-np.sum((s - t) ** 2) / bw) for t in q] for s in p])  # noqa: E731
    with jax.enable_x64(True):
        got = float(snap_mmd.mmd2(jax.numpy.asarray(a), jax.numpy.asarray(b), bw))
    assert got == pytest.approx(k(a, a) - 2 * k(a, b) + k(b, b), rel=1e-12)
    # pooled squared distances of the 3 points: 0 (x3), 1, 1, 2 (each twice): lower median of 9 = 1
    assert snap_mmd.median_bandwidth([a, b]) == 1.0


def _lamb_oseen_snapshots(n=100, seed=0):
    """Ten snapshots at index times 0..9 (model time 0..0.9) of the model with parameters TRUE
    (a clockwise vortex centred at (0.4, −0.3), no divergence, σ = 0.1): each an independent
    release of a small blob at (1.2, −0.3), simulated with a fine step. The blob turns ~140°."""
    rng = np.random.default_rng(seed)
    xs = []
    with jax.enable_x64(True):
        jnp = jax.numpy
        for t in range(10):
            x0 = np.array([1.2, -0.3]) + 0.05 * rng.standard_normal((n, 2))
            if t == 0:
                xs.append(x0)
                continue
            h, ends = snap_mmd.euler_grid([t / 10], 1e-3)
            out = snap_mmd.simulate(jnp.asarray(TRUE), jnp.asarray(x0), jnp.asarray(rng.standard_normal((len(h), n, 2))),
                                    jnp.asarray(h), ends)
            xs.append(np.asarray(out[0]))
    return TrainData(tuple(Marginal(float(t), x) for t, x in enumerate(xs)), family="vortex", variant="toy")


def test_recovers_a_known_lamb_oseen_vortex():
    """From the authors' initial guess (centre (0, 0), Γ = −1.5, σ ≈ 1), 300 epochs recover the
    centre within 0.08, the circulation within 15% and σ within 30% (a coarser Euler step than the
    data's, 0.02, keeps the test to seconds). The core scale trades off against Γ and is not
    checked; the divergence stays small."""
    data = _lamb_oseen_snapshots()
    hp = dict(SnapMMD.default_hparams("vortex/forecast", "paper"), euler_dt=0.02)
    m = SnapMMD(hp, seed=0)
    m.fit(data)
    p = m.params()
    assert math.hypot(p["x0"] - TRUE[0], p["y0"] - TRUE[1]) < 0.08, p
    assert abs(p["circulation"] / TRUE[3] - 1) < 0.15, p
    assert abs(math.exp(p["log_sigma"]) / 0.1 - 1) < 0.3, p
    assert m.learned()["final_loss"] < 0.01 * m.learned()["loss"][0]
    # the fitted model forecasts the last snapshot from the first far better than standing still
    from harness.metrics import w1

    pred = m.predict(data.marginals[0], [9.0], seed=1).samples[0]
    assert w1(pred, data.marginals[-1].x) < 0.2 * w1(data.marginals[0].x, data.marginals[-1].x)


def test_settings_and_refusals():
    for profile in ("smoke", "quick", "paper"):
        hp = SnapMMD.default_hparams("vortex/interpolation", profile)
        SnapMMD.check_hparams(hp)
        assert len(hp["init"]) == len(PARAMS) == 9
    paper = SnapMMD.default_hparams("vortex/forecast", "paper")
    assert (paper["lr"], paper["epochs"], paper["euler_dt"]) == (0.05, 300, 1e-3)
    assert paper["init"] == [0.0, 0.0, -1.5, -1.5, 0.0, 0.0, -1.5, 0.0, 0.01]
    assert SnapMMD.default_hparams("vortex/forecast", "quick") == paper
    from harness import registry

    assert SnapMMD.capabilities.families == ("vortex",)
    for task in ("eb300/holdout-1", "gf_sde/quadratic-paired", "boids/default"):
        family, variant = task.split("/")
        assert not SnapMMD.capabilities.accepts(registry.tasks.load(family), variant)
        with pytest.raises(PopbenchError, match="no 'quick' hyperparameters"):
            SnapMMD.default_hparams(task, "quick")
    with pytest.raises(ValueError, match="9 numbers"):
        SnapMMD.check_hparams(dict(paper, init=[0.0] * 8))


def test_conformance_on_the_big_vortex():
    from harness import data as data_files
    from tasks.vortex import Vortex

    try:
        data_files.resolve("ocean/big_oceans_forecast.npz")
    except PopbenchError as exc:
        pytest.skip(str(exc))
    check_method(SnapMMD, task=Vortex("forecast"))
