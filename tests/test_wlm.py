"""WLM (methods/wlm.py): integrator properties, the potential's symmetry, fast path == plain
path, learning on a tiny problem, and the harness conformance check."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("geomloss")

from harness.conformance import check_method  # noqa: E402
from harness.metrics import w1  # noqa: E402
from harness.protocol import Marginal, TrainData  # noqa: E402
from methods import wlm  # noqa: E402
from methods.wlm import WLM, WLMFullGradient, WLMZeroFriction  # noqa: E402
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_hp(**changes):
    hp = dict(wlm.HPARAMS["smoke"]["default"])
    hp.update(hidden=16, heads=2, blocks=1, ff=32, dropout=0.0, time_features=0)
    hp.update(changes)
    return hp


# ---------------------------------------------------------------------------------------------
# Integrator
# ---------------------------------------------------------------------------------------------
def _harmonic(omega2: float):
    def accel(x, t):
        return -omega2 * x

    return accel


def _max_energy_error(dt: float, T: float = 2.0) -> float:
    omega2 = 4.0
    x = torch.tensor([[1.0, 0.0], [0.3, -0.5]], dtype=torch.float64)
    v = torch.tensor([[0.0, 1.0], [0.2, 0.1]], dtype=torch.float64)
    e0 = 0.5 * (v**2).sum() + 0.5 * omega2 * (x**2).sum()
    n = int(round(T / dt))
    xs, vs = wlm.leapfrog(_harmonic(omega2), x, v, 0.0, [(dt, 1)] * n, 0.0, return_velocities=True)
    errs = [abs(float(0.5 * (vv**2).sum() + 0.5 * omega2 * (xx**2).sum() - e0)) for xx, vv in zip(xs, vs)]
    return max(errs)


def test_zero_friction_conserves_energy_to_second_order():
    e1, e2, e3 = (_max_energy_error(dt) for dt in (0.04, 0.02, 0.01))
    assert e1 < 1e-2
    # velocity Verlet: the energy error is O(dt^2): halving dt divides it by ~4
    assert 3.5 < e1 / e2 < 4.5 and 3.5 < e2 / e3 < 4.5


def test_large_friction_is_explicit_gradient_flow():
    torch.manual_seed(0)
    pot = wlm._build_potential(2, _tiny_hp()).double().eval()
    x0 = torch.randn(20, 2, dtype=torch.float64)
    v0 = torch.randn(20, 2, dtype=torch.float64)  # forgotten at once in the overdamped limit
    dt, n = 0.05, 6

    def accel(x, t):
        return wlm.force(pot, x, t, create_graph=False)

    gamma = torch.tensor(1e5, dtype=torch.float64)  # m = exp(-γ dt / 2) underflows: c = 1
    (xs,) = [wlm.leapfrog(accel, x0, v0, 0.0, [(dt, n)], gamma)]
    x = x0.clone()
    for _ in range(n):
        x = x + dt * accel(x, 0.0)  # explicit Euler of dx/dt = -∇Ψ
    torch.testing.assert_close(xs[-1], x, rtol=1e-10, atol=1e-10)


def test_leapfrog_coefficients_limits():
    m, c = wlm.leapfrog_coefficients(0.0, 0.1)
    assert m == 1.0 and math.isclose(c, 0.05)
    m, c = wlm.leapfrog_coefficients(1e-3, 1e-3)  # c ≈ (1 + γ) dt / 2 for small dt
    assert math.isclose(c, (1 + 1e-3) * 1e-3 / 2, rel_tol=1e-3)


# ---------------------------------------------------------------------------------------------
# Potential
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,hidden,time_features", [(2, 16, 0), (1, 64, 16)])
def test_forces_are_permutation_equivariant(heads, hidden, time_features):
    torch.manual_seed(1)
    pot = wlm._build_potential(2, _tiny_hp(heads=heads, hidden=hidden, time_features=time_features))
    pot = pot.double().eval()
    x = torch.randn(30, 2, dtype=torch.float64)
    perm = torch.randperm(30)
    for create_graph in (False, True):
        a = wlm.force(pot, x, 0.7, create_graph=create_graph)
        a_perm = wlm.force(pot, x[perm], 0.7, create_graph=create_graph)
        torch.testing.assert_close(a_perm, a[perm], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pot(x[perm], 0.7), pot(x, 0.7), rtol=1e-12, atol=1e-12)


def test_attention_core_second_derivatives():
    core = wlm._torch_classes()["AttentionCore"]
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return core.apply(q, k, v, 0.4)

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


# CUDA where this machine has one (CI has none; run there on a GPU machine): the fast path's
# hand-written attention backward and in-place soft-min must agree on both backends.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


def _rollout_grads(pot, mode: str, dtype=torch.float64, device="cpu", gradient="full"):
    pot.set_attention(mode)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(40, 2, generator=g, dtype=dtype).to(device)
    v0 = 0.3 * torch.randn(40, 2, generator=g, dtype=dtype).to(device)
    ys = [(0.8 * torch.randn(50, 2, generator=g, dtype=dtype) + 0.2 * j).to(device) for j in (1, 2)]
    gamma = torch.tensor(0.7, dtype=dtype, device=device, requires_grad=True)
    loss_fn = wlm.sinkhorn_loss(2, 0.1, fast=(mode == "fast"))
    loss = wlm.rollout_loss(pot, loss_fn, x0, v0, ys, 0.0, [(0.1, 2), (0.1, 1)], gamma,
                            final_force=(mode == "plain"), gradient=gradient)
    params = list(pot.parameters()) + [gamma]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(loss.detach()), [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gradient", wlm.GRADIENTS)
@pytest.mark.parametrize("heads,hidden,time_features", [(2, 16, 0), (1, 64, 16)])
def test_fast_path_equals_plain_path(heads, hidden, time_features, gradient, device):
    """Same loss and gradients: fused/hand-written attention + in-place Sinkhorn soft-min vs
    nn.MultiheadAttention's need_weights=True path + geomloss's SamplesLoss (float64)."""
    torch.manual_seed(2)
    pot = wlm._build_potential(2, _tiny_hp(heads=heads, hidden=hidden, blocks=2,
                                            time_features=time_features)).double().eval().to(device)
    l_plain, g_plain = _rollout_grads(pot, "plain", device=device, gradient=gradient)
    l_fast, g_fast = _rollout_grads(pot, "fast", device=device, gradient=gradient)
    assert math.isclose(l_plain, l_fast, rel_tol=1e-9)
    for a, b in zip(g_plain, g_fast):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Which gradient: "detached" (the reference code's, default) against "full"
# ---------------------------------------------------------------------------------------------
class _Quadratic(torch.nn.Module):
    """Ψθ(x) = θ/2 Σ|x|², so the force is a = -θ x."""

    def __init__(self, theta: float):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, x, t=0.0):
        return 0.5 * self.theta * (x**2).sum()


@pytest.mark.parametrize("theta", [0.0, 1.5])
def test_both_gradients_against_their_closed_forms(theta):
    """Two conservative leapfrog steps (γ = 0, m = 1, c = dt/2) under a = -θ x, loss = Σ w·x₂:
    x₂ = x₀ + 2dt v₀ + 2dt c (a₀ + a₁) with a₀ = -θ x₀ and a₁ = -θ x₁. Detached, a₁ is -θ times the
    *value* x₁, so dL/dθ = -2dt c Σ w·(x₀ + x₁); the full gradient adds a₁'s dependence on x₁(θ):
    + 2dt c θ dt c Σ w·x₀."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, generator=g, dtype=torch.float64)
    v0 = torch.randn(5, 2, generator=g, dtype=torch.float64)
    w = torch.randn(5, 2, generator=g, dtype=torch.float64)
    dt = 0.3
    c = dt / 2
    x1 = x0 + dt * (v0 + c * (-theta * x0))
    closed = {"detached": float(-2 * dt * c * (w * (x0 + x1)).sum()),
              "full": float(-2 * dt * c * (w * (x0 + x1)).sum() + 2 * dt * c * theta * dt * c * (w * x0).sum())}
    for gradient in wlm.GRADIENTS:
        pot = _Quadratic(theta)
        loss = wlm.rollout_loss(pot, lambda p, y: (p * y).sum(), x0, v0, [w], 0.0, [(dt, 2)], 0.0,
                                gradient=gradient)
        (grad,) = torch.autograd.grad(loss, [pot.theta])
        assert float(grad) == pytest.approx(closed[gradient], rel=1e-12, abs=1e-14), gradient
    if theta:  # the two differ as soon as a later force sees a position that θ moved
        assert abs(closed["full"] - closed["detached"]) > 1e-3


def test_detached_gradient_is_a_rollout_with_the_positions_fed_as_constants():
    """The transformer potential, friction learned, three steps over two intervals: the detached
    gradient equals a rollout written out here, where each force is -∇Ψθ at the *numeric* value of
    the position (a leaf without history), and the positions are summed from those forces."""
    torch.manual_seed(4)
    pot = wlm._build_potential(2, _tiny_hp(heads=2, hidden=16, blocks=2)).double().eval()
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(30, 2, generator=g, dtype=torch.float64)
    v0 = 0.3 * torch.randn(30, 2, generator=g, dtype=torch.float64)
    ys = [0.8 * torch.randn(35, 2, generator=g, dtype=torch.float64) + 0.2 * j for j in (1, 2)]
    schedule = [(0.5, 2), (1.0, 1)]  # the vortex grid: dt = 1 per data interval
    loss_fn = wlm.sinkhorn_loss(2, 0.1, fast=False)
    log_gamma = torch.tensor(math.log(0.7), dtype=torch.float64, requires_grad=True)
    params = list(pot.parameters()) + [log_gamma]

    loss = wlm.rollout_loss(pot, loss_fn, x0, v0, ys, 0.0, schedule, torch.exp(log_gamma),
                            gradient="detached")
    def grad(f):  # the output head's bias never reaches a force: zero, not None
        gs = torch.autograd.grad(f, params, allow_unused=True)
        return [torch.zeros_like(p) if g_ is None else g_ for p, g_ in zip(params, gs)]

    got = grad(loss)

    def force_at_value(x):  # -∇Ψθ at x's value: differentiable in θ only
        leaf = x.detach().clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(pot(leaf, 0.0), leaf, create_graph=True)
        return -gx

    gamma = torch.exp(log_gamma)
    x, v = x0, v0
    a = force_at_value(x)
    ends = []
    for dt, n in schedule:
        m = torch.exp(-gamma * dt / 2)
        c = m * dt / 2 + (1 - m)
        for _ in range(n):
            v_half = m * v + c * a
            x = x + dt * v_half
            a = force_at_value(x)
            v = m * v_half + c * a
        ends.append(x)
    by_hand = torch.stack([loss_fn(p, y) for p, y in zip(ends, ys)]).mean()
    want = grad(by_hand)
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-12)
    for a_, b_ in zip(got, want):
        torch.testing.assert_close(a_, b_, rtol=1e-9, atol=1e-12)

    full = grad(wlm.rollout_loss(pot, loss_fn, x0, v0, ys, 0.0, schedule, torch.exp(log_gamma),
                                 gradient="full"))
    flat = lambda gs: torch.cat([t.reshape(-1) for t in gs])  # noqa: E731
    rel = float((flat(full) - flat(got)).norm() / flat(full).norm())
    assert rel > 0.01, f"the full and detached gradients differ by only {rel:.2e} of the norm"


def test_force_gradient_is_part_of_the_job_identity():
    from harness.runner import hparams_hash

    for profile in ("smoke", "quick", "paper"):
        base = WLM.default_hparams("vortex/interpolation", profile)
        full = WLMFullGradient.default_hparams("vortex/interpolation", profile)
        assert base["force_gradient"] == "detached" and full["force_gradient"] == "full"
        assert {k: v for k, v in base.items() if k != "force_gradient"} == \
            {k: v for k, v in full.items() if k != "force_gradient"}
        assert hparams_hash(base) != hparams_hash(full)
    with pytest.raises(Exception, match="force_gradient"):
        WLM.check_hparams(dict(WLM.default_hparams("vortex", "smoke"), force_gradient="truncated"))


def test_fast_sinkhorn_is_geomloss_float32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g).requires_grad_(True)
    y = torch.randn(150, 2, generator=g) + 0.5
    for p in (1, 2):
        out = []
        for fast in (False, True):
            xx = x.detach().clone().requires_grad_(True)
            loss = wlm.sinkhorn_loss(p, 0.05, fast=fast)(xx, y)
            loss.backward()
            out.append((loss.detach(), xx.grad))
        # float32: the fast soft-min uses exp2/log2 (same value up to rounding)
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-7)
        scale = float(out[0][1].abs().max())
        torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_inference_force_equals_training_force(device):
    """SDPA (no graph) and the double-differentiable attention give the same force."""
    torch.manual_seed(4)
    pot = wlm._build_potential(2, _tiny_hp(heads=4, hidden=32)).eval().to(device)
    x = torch.randn(64, 2).to(device)
    torch.testing.assert_close(wlm.force(pot, x, 0.0, create_graph=False),
                               wlm.force(pot, x, 0.0, create_graph=True), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Data handling
# ---------------------------------------------------------------------------------------------
def _marginals(times, index=None, n=20, seed=0):
    rng = np.random.default_rng(seed)
    idx = index or [-1] * len(times)
    return tuple(Marginal(t, rng.normal(size=(n, 2)) + t, index=i) for t, i in zip(times, idx))


def test_grid_counts_held_out_gaps():
    data = TrainData(_marginals([0, 2, 3, 5], index=[0, 2, 3, 5]), "x", "y")
    assert wlm._grid(data) == (1.0, [2, 1, 2])
    data = TrainData(_marginals([0.0, 0.02, 0.03]), "x", "y")  # no indices: smallest interval
    spacing, counts = wlm._grid(data)
    assert math.isclose(spacing, 0.01) and counts == [2, 1]


def test_blur_uses_training_marginals_only_and_is_deterministic():
    ms = [m.x for m in _marginals([0, 1, 2], n=800)]
    b1, b2 = wlm.estimate_blur(ms, seed=5), wlm.estimate_blur(ms, seed=5)
    assert b1 == b2 and 0.5 < b1 < 1.0  # N(0, I) in 2-D: median distance ≈ 1.67
    assert wlm.estimate_blur([np.zeros((10, 2))], seed=0) == 1e-3  # clipped


def test_paper_profile_matches_the_spec():
    p = wlm.HPARAMS["paper"]
    assert WLM.default_hparams("gf_sde/quadratic-unpaired", "paper") == p["gf_sde"]
    gf = p["gf_sde"]
    assert (gf["iterations"], gf["lr"], gf["weight_decay"], gf["hidden"], gf["heads"], gf["blocks"],
            gf["ff"], gf["friction"], gf["friction_lr"], gf["v0"], gf["sinkhorn_p"], gf["ema_decay"]) == (
        100_000, 1e-4, 1e-4, 64, 4, 4, 512, 1.0, 1e-2, "zero", 2, 0.999)
    vi = WLM.default_hparams("vortex/interpolation", "paper")
    assert (vi["hidden"], vi["heads"], vi["ff"], vi["time_features"], vi["weight_decay"], vi["friction"],
            vi["ema_decay"], vi["v0"]) == (256, 1, 64, 16, 1e-2, 0.1, 0.9999, "data")
    vf = WLM.default_hparams("vortex/forecast", "paper")
    assert (vf["time_features"], vf["weight_decay"], vf["friction"], vf["iterations"]) == (0, 1e-3, 1.0, 50_000)
    eb = WLM.default_hparams("eb/holdout-2", "paper")
    assert (eb["dropout"], eb["blur"], eb["sinkhorn_p"], eb["particles_per_batch"], eb["ff"]) == (0.1, 1.25, 1, 1024, 256)
    assert WLM.default_hparams("eb300/holdout-2", "paper")["v0"] == "zero"
    bo = WLM.default_hparams("boids", "paper")
    assert (bo["iterations"], bo["sinkhorn_p"], bo["learn_friction"], bo["friction"], bo["v0"]) == (
        30_000, 1, False, 0.0, "data")
    zf = WLMZeroFriction.default_hparams("gf_sde/quadratic-paired", "paper")
    assert (zf["friction"], zf["learn_friction"], zf["v0"]) == (0.0, False, "data")
    for profile in ("smoke", "quick", "paper"):
        assert "default" in wlm.HPARAMS[profile]
    assert WLM({"v0": "data"}).used_velocities and not WLM({"v0": "zero"}).used_velocities


def test_module_imports_without_torch():
    code = "import sys, methods.wlm; assert 'torch' not in sys.modules and 'geomloss' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------
def _relaxing_cloud(n=64, k=5, seed=0):
    """A cloud contracting towards (1, 0): x_t = m + (x_0 - m) e^{-t}, t = 0..k-1 (index units)."""
    rng = np.random.default_rng(seed)
    x0 = 0.5 * rng.normal(size=(n, 2))
    m = np.array([1.0, 0.0])
    xs = [m + (x0 - m) * np.exp(-0.5 * t) for t in range(k)]
    return TrainData(tuple(Marginal(float(t), x, index=t) for t, x in enumerate(xs)), "toy", "relax"), xs


def test_training_lowers_the_loss_and_beats_static():
    data, xs = _relaxing_cloud(n=48)
    hp = _tiny_hp(iterations=120, lr=3e-3, ema_decay=0.95, friction=1.0, learn_friction=True,
                  friction_lr=3e-2, v0="zero", particles_per_batch=None, sinkhorn_p=2)
    m = WLM(hp, seed=0)
    m.fit(data)
    losses = m.learned()["loss_curve"]
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20])
    pred = m.predict(data.marginals[0], tuple(range(1, 5)), seed=0)
    w_model = np.mean([w1(p, x) for p, x in zip(pred.samples, xs[1:])])
    w_static = np.mean([w1(xs[0], x) for x in xs[1:]])
    assert w_model < 0.5 * w_static
    learned = m.learned()
    assert learned["iterations"] == 120 and len(learned["gamma_curve"]) <= 200
    assert learned["ema_init_weight"] == pytest.approx(0.95 ** 120)
    assert learned["gamma"] != 1.0  # friction is learned
    # pickles after fit, and predicts the same after a round trip
    again = pickle.loads(pickle.dumps(m)).predict(data.marginals[0], (1.0, 2.0), seed=0)
    np.testing.assert_allclose(again.samples[1], pred.samples[1], rtol=1e-6, atol=1e-6)


def test_conformance_wlm():
    check_method(WLM)


def test_conformance_wlm_zero_friction():
    check_method(WLMZeroFriction)


def test_conformance_wlm_full_gradient():
    check_method(WLMFullGradient)


# ---------------------------------------------------------------------------------------------
# Checkpoints: a capped or interrupted fit continues exactly
# ---------------------------------------------------------------------------------------------
def test_capped_fits_resume_bit_for_bit(tmp_path, monkeypatch, capsys):
    data, _ = _relaxing_cloud(n=32)
    # dropout and particle minibatches: both random streams (torch's and NumPy's) must resume too
    hp = _tiny_hp(iterations=7, lr=3e-3, ema_decay=0.8, friction=1.0, learn_friction=True,
                  friction_lr=3e-2, v0="zero", particles_per_batch=24, dropout=0.1)
    whole = WLM(hp, seed=3)
    whole.fit(data)

    ckpt = tmp_path / "job.ckpt"
    capped = dict(hp, max_minutes=1e-9)  # stops after every single iteration
    done = []
    for _ in range(3):
        m = WLM(capped, seed=3)
        m.checkpoint_path = ckpt
        m.fit(data)
        learned = m.learned()
        assert learned["training_complete"] is False
        done.append(learned["iterations"])
    assert done == [1, 2, 3] and learned["resumed_at"] == "1,2"
    assert learned["trained_by"] == wlm._code_id()  # one code throughout: said once
    last = WLM(hp, seed=3)  # the uncapped rest, with a checkpoint and a progress line per iteration
    last.checkpoint_path = ckpt
    monkeypatch.setattr(wlm, "CHECKPOINT_MINUTES", 0.0)
    last.fit(data)
    assert "[wlm seed 3] iteration 6 of 7 (85.7%)" in capsys.readouterr().err
    a, b = whole.learned(), last.learned()
    assert b["training_complete"] is True and b["iterations"] == a["iterations"] == 7
    assert b["loss_curve"] == a["loss_curve"] and b["gamma"] == a["gamma"]
    for name, value in whole._ema_state.items():
        np.testing.assert_array_equal(last._ema_state[name], value)

    # resumed under other code: still resumed (a cosmetic edit must not cost days of training),
    # but the result names both codes and where the change happened
    ckpt2 = tmp_path / "job2.ckpt"
    first = WLM(capped, seed=3)
    first.checkpoint_path = ckpt2
    first.fit(data)
    code = wlm._code_id()
    monkeypatch.setattr(wlm, "_code_id", lambda: "wlm.py edited")
    resumed = WLM(capped, seed=3)
    resumed.checkpoint_path = ckpt2
    with pytest.warns(UserWarning, match="trained by other code"):
        resumed.fit(data)
    assert resumed.learned()["resumed_at"] == "1"
    assert resumed.learned()["trained_by"] == f"from iteration 0: {code}; from iteration 1: wlm.py edited"

    # a checkpoint of another fit (other seed) is ignored, with a warning
    other = WLM(hp, seed=4)
    other.checkpoint_path = ckpt
    with pytest.warns(UserWarning, match="another fit"):
        other.fit(data)
    assert other.learned()["resumed_at"] == ""


def test_a_non_finite_training_loss_makes_the_job_diverged_not_failed(monkeypatch):
    from harness.runner import Job, run_job

    monkeypatch.setattr(wlm, "train_iteration", lambda *a, **k: float("nan"))
    job = Job("ou", "paired", "wlm", "smoke", 0, WLM.default_hparams("ou/paired", "smoke"))
    row = run_job(job)["job"]
    assert row["status"] == "diverged" and "loss is nan at iteration 1" in row["error"]


def test_v0_data_without_training_velocities_predicts_from_zero_velocities_as_trained():
    from tasks.ou import OU

    task = OU("paired", seed=0)
    data = task.train_data()
    no_v = TrainData(tuple(m.without_velocities() for m in data.marginals), data.family, data.variant, data.paired)
    m = WLM(dict(WLM.default_hparams("ou/paired", "smoke"), v0="data", iterations=2), seed=0)
    m.fit(no_v)
    start, times = task.queries()[0].request()
    assert start.v is not None and not m.used_velocities
    with_v = m.predict(start, times, seed=0).samples
    without = m.predict(start.without_velocities(), times, seed=0).samples
    assert all(np.array_equal(a, b) for a, b in zip(with_v, without))
