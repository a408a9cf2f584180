"""JKOnet* and JKOnet*-t (JAX): conformance, Gaussian-mixture densities against closed forms,
couplings from whole marginals, drift recovery and beating ``static`` on the toy OU task.

Kept fast: the smoke networks (16-16) are reused everywhere, so the jitted epoch compiles once per
class for the whole file (the cache in ``methods.jkonet_star.train_fns``)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from harness.conformance import check_method  # noqa: E402
from harness.metrics import w1  # noqa: E402
from harness.protocol import Marginal, TrainData  # noqa: E402
from methods.jkonet_star import (  # noqa: E402
    JKOnetStar,
    JKOnetStarT,
    build_rows,
    fit_gmm,
    gmm_density,
    step_plan,
)
from tasks import ou  # noqa: E402
from tasks.ou import OU  # noqa: E402


def test_modules_import_without_jax():
    code = "import sys, methods.jkonet_star, methods.ijkonet; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_conformance_jkonet_star():
    check_method(JKOnetStar)


def test_conformance_jkonet_star_t():
    check_method(JKOnetStarT)


def _gauss(y, mean, cov):
    prec = np.linalg.inv(cov)
    diff = y - mean
    rho = np.exp(-0.5 * np.einsum("ni,ij,nj->n", diff, prec, diff)) / (2 * np.pi * np.sqrt(np.linalg.det(cov)))
    return rho, -rho[:, None] * diff @ prec


def test_gmm_matches_closed_form_gaussian():
    rng = np.random.default_rng(0)
    mean, cov = np.array([1.0, -2.0]), np.array([[0.5, 0.2], [0.2, 0.3]])
    x = rng.multivariate_normal(mean, cov, size=4000)
    gmm = fit_gmm(x, n_components=1, seed=0)
    # one component = the maximum-likelihood Gaussian (sample mean and covariance)
    assert np.allclose(gmm["means"][0], x.mean(0)) and np.allclose(gmm["covs"][0], np.cov(x.T, bias=True), atol=1e-5)
    assert np.allclose(gmm["means"][0], mean, atol=0.05) and np.allclose(gmm["covs"][0], cov, atol=0.05)
    # ρ and ∇ρ are the closed-form Gaussian density and gradient of the fitted parameters ...
    y = rng.multivariate_normal(mean, cov, size=200)
    rho, grad = gmm_density(gmm, y)
    fit_rho, fit_grad = _gauss(y, gmm["means"][0], gmm["covs"][0])
    assert np.allclose(rho, fit_rho, rtol=1e-10) and np.allclose(grad, fit_grad, rtol=1e-8, atol=1e-12)
    # ... and close to the true ones where the mass is
    true_rho, true_grad = _gauss(y, mean, cov)
    assert np.median(np.abs(rho / true_rho - 1)) < 0.05
    assert np.linalg.norm(grad - true_grad) / np.linalg.norm(true_grad) < 0.1
    # ∇ρ is the derivative of ρ (central differences on the fitted mixture)
    gmm3 = fit_gmm(x, n_components=3, seed=1)
    h = 1e-5
    for dim in range(2):
        e = np.zeros(2)
        e[dim] = h
        fd = (gmm_density(gmm3, y + e)[0] - gmm_density(gmm3, y - e)[0]) / (2 * h)
        assert np.allclose(gmm_density(gmm3, y)[1][:, dim], fd, rtol=1e-4, atol=1e-8)


def test_gmm_separates_two_clusters():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(-3, 0.3, (600, 2)), rng.normal(3, 0.3, (400, 2))])
    gmm = fit_gmm(x, n_components=2, seed=0)
    order = np.argsort(gmm["means"][:, 0])
    assert np.allclose(gmm["weights"][order], [0.6, 0.4], atol=0.01)
    assert np.allclose(gmm["means"][order], [[-3, -3], [3, 3]], atol=0.05)


def _shuffled(data: TrainData, seed: int) -> TrainData:
    rng = np.random.default_rng(seed)
    ms = tuple(Marginal(m.t, m.x[rng.permutation(m.n)], None, m.index) for m in data.marginals)
    return TrainData(ms, data.family, data.variant, paired=False)


def test_coupling_uses_whole_marginals_not_rows():
    data = OU("paired", seed=0).train_data()
    hp = dict(JKOnetStar.default_hparams("ou/paired", "smoke"), internal=False)
    a = build_rows(data, hp, 0)
    b = build_rows(_shuffled(data, 1), hp, 0)
    assert float(a["coupling_cost"]) == pytest.approx(float(b["coupling_cost"]), rel=1e-9)
    assert len(a["w"]) == len(b["w"])
    # the same set of coupled pairs (as point pairs), whatever the row order
    def pairs(r):
        p = np.concatenate([r["x"], r["y"]], 1)
        return p[np.lexsort(p.T[::-1])]

    assert np.array_equal(pairs(a), pairs(b))
    # the OT coupling of paired data is not the identity pairing: rows are not trusted
    m0, m1 = data.marginals[:2]
    sel = a["t_next"] == m1.t
    assert np.array_equal(a["x"][sel], m0.x)  # one row per source particle (a permutation plan)
    assert np.mean(np.all(a["y"][sel] == m1.x, axis=1)) < 0.9  # ... but not the row-index pairing


def test_rows_use_physical_steps_on_non_uniform_grids():
    full = OU("paired", seed=0).train_data()
    ms = tuple(m for m in full.marginals if m.index != 3)  # a held-out time -> steps 0.25 and 0.5
    data = TrainData(ms, "ou", "paired", paired=True)
    rows = build_rows(data, dict(JKOnetStar.default_hparams("ou/paired", "smoke"), internal=False), 0)
    assert set(np.round(rows["tau"], 9)) == {0.25, 0.5}
    assert np.allclose(rows["tau"][rows["t_next"] == ms[3].t], 0.5)
    # prediction steps: one per data interval; an off-grid gap is split into steps <= the median step
    assert [round(p[0], 9) for p in step_plan(0.0, [0.25, 0.5], 0.25)] == [0.25, 0.25]
    plan = step_plan(0.0, [0.6], 0.25)
    assert len(plan) == 3 and np.isclose(sum(p[0] for p in plan), 0.6) and plan[-1][2]


def _forecast_w1(method, task) -> tuple[float, float]:
    q = task.queries()[0]
    start, times = q.request()
    pred = method.predict(start.without_velocities(), times, seed=7)
    fc = [w1(p, tg.x) for p, tg in zip(pred.samples, q.targets) if tg.group == "test"]
    static = [w1(start.x, tg.x) for tg in q.targets if tg.group == "test"]
    return float(np.mean(fc)), float(np.mean(static))


def test_jkonet_star_recovers_ou_drift_and_beats_static():
    task = OU("paired", seed=0)
    data = task.train_data()
    hp = dict(JKOnetStar.default_hparams(task.name, "smoke"), epochs=150)  # same shapes: no recompile
    m = JKOnetStar(hp, seed=0)
    m.fit(data)
    x = np.concatenate([mm.x for mm in data.marginals])
    true = -ou.THETA * (x - ou.M)
    err = np.linalg.norm(m.drift(x) - true) / np.linalg.norm(true)
    assert err < 0.35, err
    learned = m.learned()
    assert 0.0 < learned["diffusivity"] < 1.0 and learned["loss_curve"][-1] < learned["loss_curve"][0]
    fc, static = _forecast_w1(m, task)
    assert fc < 0.5 * static, (fc, static)


def test_jkonet_star_t_beats_static():
    task = OU("unpaired", seed=0)
    m = JKOnetStarT(dict(JKOnetStarT.default_hparams(task.name, "smoke"), epochs=150), seed=0)
    m.fit(task.train_data())
    fc, static = _forecast_w1(m, task)
    assert fc < 0.5 * static, (fc, static)
