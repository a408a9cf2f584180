"""nn-APPEX (methods/nn_appex.py): conformance, the E-step's plans, the M-step's closed forms."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from harness.conformance import check_method  # noqa: E402
from harness.metrics import w1  # noqa: E402
from methods import nn_appex  # noqa: E402
from methods.nn_appex import (  # noqa: E402
    NNAPPEX,
    chain_plans,
    drift,
    euler_maruyama,
    fit_potential,
    sigma2_update,
)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_module_imports_without_torch():
    code = "import sys, methods.nn_appex; assert 'torch' not in sys.modules and 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_conformance_smoke():
    check_method(NNAPPEX)


def test_profiles_cover_every_family():
    for profile in ("smoke", "quick", "paper"):
        for task in (
            "gf_sde/quadratic-unpaired",
            "boids/default",
            "vortex/forecast",
            "eb/holdout-1",
            "eb300/holdout-2",
            "ou/paired",
        ):
            hp = NNAPPEX.default_hparams(task, profile)
            assert hp["sigma2_init"] == 1.0 and hp["init_drift"] == "zero"  # data-independent start
    paper = NNAPPEX.default_hparams("gf_sde/quadratic-unpaired", "paper")
    assert (paper["n_outer"], paper["n_paths"], paper["ipf_max_sweeps"]) == (30, 2000, 200)
    mstep = (paper["epochs"], paper["batch_size"], paper["lr"], paper["width"], paper["depth"])
    assert mstep == (500, 512, 3e-3, 128, 2)
    assert (paper["ipf_damping"], paper["ipf_tol"], paper["epsilon"]) == (0.5, 1e-5, 1.0)


# ------------------------------------------------------------------------------------------------
# E-step
# ------------------------------------------------------------------------------------------------


def _ou_marginals(sizes, times, theta=1.0, sigma2=0.5, seed=0, dim=1):
    """Independent draws from the marginals of dX = −θ X dt + σ dW, X_0 ~ N(1, 0.1)."""
    rng = np.random.default_rng(seed)
    out = []
    for n, t in zip(sizes, times):
        mean = math.exp(-theta * t)
        var = 0.1 * math.exp(-2 * theta * t) + sigma2 / (2 * theta) * (1 - math.exp(-2 * theta * t))
        out.append(mean + math.sqrt(var) * rng.standard_normal((n, dim)))
    return out


@pytest.mark.parametrize("scheme", ["damped", "alternating"])
def test_estep_plans_match_marginals_and_pot(scheme):
    """Closed-form case: a 1-D OU chain with unequal sizes and non-uniform steps. Every plan has
    the uniform marginals to tolerance, and equals POT's two-marginal log-domain Sinkhorn plan for
    the Euler-Maruyama cost C_ij = (y_j − x_i − Δt b(x_i))² / (2 σ² Δt) at ε = 1."""
    ot = pytest.importorskip("ot")
    times = [0.0, 0.1, 0.35, 0.45]
    xs = _ou_marginals([40, 55, 30, 30], times)
    dts = np.diff(times)
    theta, sigma2, tol = 1.0, 0.5, 1e-9
    plans, sweeps, err = chain_plans(
        xs, dts, sigma2, lambda x: -theta * x, max_sweeps=1000, tol=tol, scheme=scheme, max_elements=10_000
    )
    assert err < tol and sweeps < 1000
    assert [p.shape for p in plans] == [(40, 55), (55, 30), (30, 30)]
    for k, P in enumerate(plans):
        n, m = P.shape
        assert np.all(P >= 0)
        assert np.max(np.abs(P.sum(1) - 1 / n)) < tol
        assert np.max(np.abs(P.sum(0) - 1 / m)) < tol
        C = (xs[k + 1][None, :, 0] - xs[k][:, None, 0] * (1 - theta * dts[k])) ** 2 / (2 * sigma2 * dts[k])
        a, b = np.full(n, 1 / n), np.full(m, 1 / m)
        Q = ot.sinkhorn(a, b, C, reg=1.0, method="sinkhorn_log", stopThr=1e-12, numItermax=10_000)
        assert np.abs(P - Q).sum() < 1e-7


def test_estep_equals_multimarginal_chain_ipf():
    """The pairwise (batched) solve gives the same coupling as IPF on the full joint tensor of the
    multi-marginal chain problem P(i0,i1,i2) ∝ Π h_k(i_k) Π K_k(i_k, i_{k+1}) (tiny sizes)."""
    times = [0.0, 0.2, 0.5]
    xs = _ou_marginals([5, 6, 4], times, seed=3, dim=2)
    dts = np.diff(times)
    sigma2 = 0.3
    plans, _, err = chain_plans(xs, dts, sigma2, None, max_sweeps=20_000, tol=1e-12, scheme="alternating")
    Ks = [
        np.exp(-((xs[k + 1][None, :, :] - xs[k][:, None, :]) ** 2).sum(-1) / (2 * sigma2 * dts[k])) for k in range(2)
    ]
    J = Ks[0][:, :, None] * Ks[1][None, :, :]
    targets = [np.full(len(x), 1 / len(x)) for x in xs]
    for _ in range(5000):
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            marg = J.sum(axis=other)
            shape = [1, 1, 1]
            shape[axis] = -1
            J = J * (targets[axis] / marg).reshape(shape)
    np.testing.assert_allclose(plans[0], J.sum(2), atol=1e-9)
    np.testing.assert_allclose(plans[1], J.sum(0), atol=1e-9)
    # and the joint is the Markov chain through the row-normalised plans
    markov = plans[0][:, :, None] * (plans[1] / plans[1].sum(1, keepdims=True))[None, :, :]
    np.testing.assert_allclose(markov, J, atol=1e-9)


@pytest.mark.parametrize("scheme", ["damped", "alternating"])
def test_estep_tiny_diffusivity_stays_finite(scheme):
    """A kernel far narrower than the particle spacing (log K down to −3e5, i.e. K underflows to 0
    almost everywhere): the plans stay finite and non-negative (stabilised, log-domain
    absorption) even where IPF cannot converge in the sweeps allowed."""
    xs = _ou_marginals([50, 50, 50], [0.0, 1.0, 2.0], seed=1)
    plans, sweeps, err = chain_plans(xs, [1.0, 1.0], 1e-5, max_sweeps=100, tol=1e-5, scheme=scheme)
    assert math.isfinite(err) and sweeps == 100
    for P in plans:
        assert np.all(np.isfinite(P)) and np.all(P >= 0) and P.sum() > 0.1
        if scheme == "alternating":  # the columns are exact after every sweep
            np.testing.assert_allclose(P.sum(0), 1 / 50, atol=1e-12)


def test_estep_chunking_matches_single_batch():
    times = [0.0, 0.1, 0.2, 0.3, 0.4]
    xs = _ou_marginals([30] * 5, times, seed=2)
    one, _, _ = chain_plans(xs, np.diff(times), 0.5, max_sweeps=3000, tol=1e-10)
    many, _, _ = chain_plans(xs, np.diff(times), 0.5, max_sweeps=3000, tol=1e-10, max_elements=1000)
    for a, b in zip(one, many):
        np.testing.assert_allclose(a, b, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# M-step
# ------------------------------------------------------------------------------------------------


def test_manual_gradient_matches_autograd():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((64, 3)), dtype=torch.float32)
    y = torch.tensor(rng.standard_normal((64, 3)), dtype=torch.float32)
    wt = torch.tensor(rng.random(64), dtype=torch.float32)
    for depth, w in itertools.product((1, 2, 3), (None, wt)):
        init = nn_appex._init_potential(3, 16, depth, seed=depth)
        views = [torch.tensor(p, dtype=torch.float32) for p in init]
        gviews = [torch.zeros_like(v) for v in views]
        loss = nn_appex._loss_and_grad(views, gviews, x, y, w)
        ps = [v.clone().requires_grad_(True) for v in views]
        resid = (drift(ps, x, torch) - y) ** 2
        ref = resid.mean() if w is None else (resid.mean(1) * w).mean()
        grads = torch.autograd.grad(ref, ps[:-1])
        assert abs(float(loss) - float(ref.detach())) < 1e-6
        for gm, ga in zip(gviews[:-1], grads):
            assert torch.allclose(gm, ga, atol=1e-6, rtol=1e-4)


def _linear_sde_paths(A, sigma2, dts, n_paths, seed):
    """Exact Euler-Maruyama paths of dX = −A X dt + σ dW (gradient drift: φ = ½ xᵀAx)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_paths, A.shape[0]))
    paths = [x]
    for dt in dts:
        x = x - dt * x @ A.T + math.sqrt(sigma2 * dt) * rng.standard_normal(x.shape)
        paths.append(x)
    return np.stack(paths, axis=1)


def test_mstep_recovers_linear_drift_and_sigma2():
    A = np.array([[3.0, 1.0], [1.0, 2.0]])  # symmetric: a gradient drift
    sigma2 = 0.25
    dts = np.array([0.05, 0.05, 0.1, 0.05])  # non-uniform steps
    P = _linear_sde_paths(A, sigma2, dts, n_paths=2500, seed=0)
    x0 = P[:, :-1].reshape(-1, 2)
    x1 = P[:, 1:].reshape(-1, 2)
    dt = np.broadcast_to(dts, (P.shape[0], len(dts))).reshape(-1)
    params, _ = fit_potential(
        x0, (x1 - x0) / dt[:, None], dt / dts.mean(), width=64, depth=2, lr=3e-3, epochs=25, batch_size=512, seed=0
    )
    b_hat = drift(params, x0)
    b_true = -x0 @ A.T
    rel = np.sqrt(((b_hat - b_true) ** 2).sum() / (b_true**2).sum())
    assert rel < 0.1, rel
    # σ² from the fitted drift and from the true drift
    assert abs(sigma2_update(x0, x1, dt, b_hat) / sigma2 - 1) < 0.05
    assert abs(sigma2_update(x0, x1, dt, b_true) / sigma2 - 1) < 0.03


def test_sigma2_update_exact_increments():
    rng = np.random.default_rng(1)
    n, sigma2 = 200_000, 1.7
    x0 = rng.standard_normal((n, 3))
    dt = rng.choice([0.01, 0.03], size=n)
    b = np.sin(x0)
    x1 = x0 + dt[:, None] * b + np.sqrt(sigma2 * dt)[:, None] * rng.standard_normal((n, 3))
    assert abs(sigma2_update(x0, x1, dt, b) / sigma2 - 1) < 0.01


def test_sigma2_update_is_the_maximum_likelihood_on_a_non_uniform_grid():
    """Unit residuals over steps 2, 1, 1 (EB holdout-1's gaps): the MLE is (1/2 + 1 + 1) / 3, and
    the Gaussian log-likelihood is lower on either side of it (pooling gives 3/4)."""
    x0 = np.zeros((3, 1))
    dt = np.array([2.0, 1.0, 1.0])
    x1 = np.ones((3, 1))
    s2 = sigma2_update(x0, x1, dt, np.zeros((3, 1)))
    assert s2 == pytest.approx(2.5 / 3)

    def loglik(v):
        var = v * dt
        return float(-0.5 * (1.0 / var + np.log(2 * np.pi * var)).sum())

    assert loglik(s2) > max(loglik(s2 * 0.99), loglik(s2 * 1.01), loglik(0.75))


# ------------------------------------------------------------------------------------------------
# Prediction and a small end-to-end fit
# ------------------------------------------------------------------------------------------------


def test_euler_maruyama_subdivides_long_gaps():
    """σ² = 0 and a linear drift: the rollout is x (1 − θ h)^steps with h ≤ the training step."""
    theta = 0.8
    x = np.ones((3, 2))
    out = euler_maruyama(x, 0.0, (0.25, 1.0, 1.1), lambda z: -theta * z, 0.0, 0.25, np.random.default_rng(0))
    np.testing.assert_allclose(out[0], (1 - theta * 0.25) * x)
    np.testing.assert_allclose(out[1], (1 - theta * 0.25) ** 4 * x)  # 0.75 split into 3 steps
    np.testing.assert_allclose(out[2], (1 - theta * 0.25) ** 4 * (1 - theta * 0.1) * x)
    # noise: one step of variance σ² h per coordinate
    z = euler_maruyama(np.zeros((200_000, 1)), 0.0, (0.1,), lambda z: 0 * z, 2.0, 0.25, np.random.default_rng(1))[0]
    assert abs(z.var() / 0.2 - 1) < 0.02


def test_fit_ou_unpaired_beats_static():
    """A short fit on the toy OU task (unpaired) beats `static` on the rollout and learns σ² near
    the truth 0.25 from the data-independent start σ²₀ = 1."""
    from tasks.ou import OU, SIGMA

    task = OU("unpaired", seed=0)
    hp = NNAPPEX.default_hparams(task.name, "smoke")
    hp.update(n_outer=4, n_paths=600, epochs=15, width=64, ipf_max_sweeps=200, ipf_tol=1e-5)
    m = NNAPPEX(hp, seed=0)
    m.fit(task.train_data())
    q = task.queries()[0]
    start, times = q.request()
    pred = m.predict(start.without_velocities(), times, seed=1)
    ours = np.mean([w1(s, tg.x) for s, tg in zip(pred.samples, q.targets)])
    static = np.mean([w1(start.x, tg.x) for tg in q.targets])
    assert ours < 0.5 * static, (ours, static)
    learned = m.learned()
    assert len(learned["sigma2_per_iter"]) == 4
    assert abs(learned["sigma2"] / SIGMA**2 - 1) < 0.5, learned["sigma2_per_iter"]


# ---------------------------------------------------------------------------------------------
# Checkpoints: an interrupted fit continues exactly
# ---------------------------------------------------------------------------------------------
class _Interrupted(Exception):
    pass


def _stop_after(n):
    def hook(done):
        if done == n:
            raise _Interrupted

    return hook


def test_an_interrupted_fit_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    """Killed after outer iterations 1 and then 2 (the hook raises after the checkpoint is saved),
    the rerun job ends with the same potential, σ² and per-iteration trace as the uninterrupted
    fit: the generator that samples paths, the warm-started duals and the trace all resume."""
    from tasks.ou import OU

    data = OU("unpaired", seed=0).train_data().without_velocities()
    hp = NNAPPEX.default_hparams("ou/unpaired", "smoke")
    hp.update(n_outer=4, n_paths=150, epochs=2, width=16)
    whole = NNAPPEX(hp, seed=2)
    whole.fit(data)

    ckpt = tmp_path / "job.ckpt"
    for n in (1, 2):
        m = NNAPPEX(hp, seed=2)
        m.checkpoint_path = ckpt
        m.on_outer_iteration = _stop_after(n)
        with pytest.raises(_Interrupted):
            m.fit(data)
    last = NNAPPEX(hp, seed=2)
    last.checkpoint_path = ckpt
    monkeypatch.setattr(nn_appex, "PROGRESS_MINUTES", 0.0)  # a progress line per outer iteration
    last.fit(data)
    assert "[nn_appex seed 2] outer iteration 4 of 4 (100%)" in capsys.readouterr().err
    a, b = whole.learned(), last.learned()
    assert b["resumed_at"] == "1,2" and a["resumed_at"] == ""
    assert b["trained_by"] == a["trained_by"] == nn_appex._code_id()
    for key in ("sigma2", "sigma2_per_iter", "ipf_sweeps_per_iter", "ipf_err_per_iter", "drift_loss_per_iter"):
        assert b[key] == a[key], key
    for p, q in zip(last._params, whole._params):
        np.testing.assert_array_equal(p, q)

    # resumed under other code: the result names both codes and where the change happened
    ckpt2 = tmp_path / "job2.ckpt"
    first = NNAPPEX(hp, seed=2)
    first.checkpoint_path = ckpt2
    first.on_outer_iteration = _stop_after(3)
    with pytest.raises(_Interrupted):
        first.fit(data)
    code = nn_appex._code_id()
    monkeypatch.setattr(nn_appex, "_code_id", lambda: "nn_appex.py edited")
    resumed = NNAPPEX(hp, seed=2)
    resumed.checkpoint_path = ckpt2
    with pytest.warns(UserWarning, match="trained by other code"):
        resumed.fit(data)
    assert resumed.learned()["trained_by"] == f"from outer iteration 0: {code}; from outer iteration 3: nn_appex.py edited"
    assert resumed.learned()["sigma2"] == a["sigma2"]

    # a checkpoint of another fit (other settings) is ignored, with a warning
    other = NNAPPEX(dict(hp, lr=1e-3), seed=2)
    other.checkpoint_path = ckpt2
    with pytest.warns(UserWarning, match="another fit"):
        other.fit(data)
    assert other.learned()["resumed_at"] == ""


def test_a_checkpoint_resumes_only_on_its_device_and_a_finished_one_is_not_retrained(tmp_path):
    """The path generator's state is device-specific (a CUDA generator's does not fit a CPU one):
    a checkpoint written on the other device starts the fit over, with a warning. A checkpoint of
    a finished fit (a crash after fit) is not trained again."""
    from harness import checkpoint
    from tasks.ou import OU

    data = OU("unpaired", seed=0).train_data().without_velocities()
    hp = NNAPPEX.default_hparams("ou/unpaired", "smoke")
    hp.update(n_outer=2, n_paths=100, epochs=1, width=8)
    ckpt = tmp_path / "job.ckpt"
    done = NNAPPEX(hp, seed=1)
    done.checkpoint_path = ckpt
    done.fit(data)
    again = NNAPPEX(hp, seed=1)
    again.checkpoint_path = ckpt
    again.on_outer_iteration = lambda n: pytest.fail("a finished fit was trained again")
    again.fit(data)
    assert again.learned()["resumed_at"] == "2" and again.learned()["sigma2"] == done.learned()["sigma2"]
    state = torch.load(ckpt, weights_only=False)
    assert again.learned()["fit_seconds"] >= state["fit_seconds"] > 0  # the earlier call's time counts
    checkpoint.save(ckpt, dict(state, device="cuda", generator=torch.zeros(16, dtype=torch.uint8)))
    other = NNAPPEX(hp, seed=1)
    other.checkpoint_path = ckpt
    with pytest.warns(UserWarning, match="written with device 'cuda', this fit has 'cpu'"):
        other.fit(data)
    assert other.learned()["resumed_at"] == "" and other.learned()["sigma2"] == done.learned()["sigma2"]

    checkpoint.save(ckpt, {k: v for k, v in state.items() if k != "trace"})  # another layout (older code)
    older = NNAPPEX(hp, seed=1)
    older.checkpoint_path = ckpt
    with pytest.warns(UserWarning, match="unexpected contents"):
        older.fit(data)
    assert older.learned()["resumed_at"] == "" and older.learned()["sigma2"] == done.learned()["sigma2"]
