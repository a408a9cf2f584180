"""DICE: conformance, the loss in closed form, and checkpoint selection on training data only."""

from __future__ import annotations

import numpy as np
import pytest

from harness.conformance import check_method
from methods.dice import DICE, dice_loss, trapezoid_weights

from .conftest import fixed_potential

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_conformance():
    check_method(DICE)


def test_declares_interpolation_only_and_paper_settings():
    caps = DICE.capabilities
    assert caps.interpolate and not caps.forecast and not caps.stochastic
    hp = DICE.default_hparams("vortex/interpolation", "paper")
    assert (hp["lr"], hp["batch_size"], hp["iterations"], hp["grad_clip"]) == (1e-4, 256, 5000, 1.0)
    assert hp["eval_every"] > 0


def test_trapezoid_weights_nonuniform():
    np.testing.assert_allclose(trapezoid_weights(np.array([0.0, 2.0, 3.0, 4.0])), [1.0, 1.5, 1.0, 0.5])
    assert trapezoid_weights(np.array([0.0, 2.0, 4.0, 6.0, 8.0])).sum() == pytest.approx(8.0)


def test_dice_loss_closed_form():
    """s = t (b·x) on a non-uniform grid: L = Σ_k ½ (t_k + t_{k+1}) b·(m_k - m_{k+1}) + ½ Σ_k ω_k t_k² ‖b‖²
    (full batches, so the expectations are exact means)."""
    rng = np.random.default_rng(0)
    times = np.array([0.0, 2.0, 3.0, 4.0])
    xs = [rng.normal(size=(40, 3)) + k for k in range(4)]
    b = torch.tensor([0.3, -0.8, 1.1], dtype=torch.float64)
    model = fixed_potential(lambda x, t: t * (x @ b))
    val = float(dice_loss(model, xs, times, np.random.default_rng(1), {"batch_size": 40}).detach())
    m = [x.mean(0) for x in xs]
    bn = b.numpy()
    om = trapezoid_weights(times)
    expect = sum(0.5 * (times[k] + times[k + 1]) * bn @ (m[k] - m[k + 1]) for k in range(3))
    expect += 0.5 * sum(om[k] * times[k] ** 2 * (bn**2).sum() for k in range(4))
    assert val == pytest.approx(float(expect), rel=1e-10)
    # a linear, time-independent s = a·x is minimised at the mean velocity (m_K - m_0)/(t_K - t_0)
    a = torch.tensor((m[-1] - m[0]) / 4.0, requires_grad=True)
    lin = fixed_potential(lambda x, t: x @ a)
    (g,) = torch.autograd.grad(dice_loss(lin, xs, times, np.random.default_rng(1), {"batch_size": 40}), a)
    assert float(g.abs().max()) < 1e-10


def test_checkpoint_selection_uses_training_marginals_only(monkeypatch):
    """The validation signal is computed from TrainData alone: every W1 call compares against a
    (subsample of a) training marginal; the selected iteration and both curves are recorded."""
    import harness.metrics
    from tasks.ou import OU

    task = OU("unpaired", seed=0)
    data = task.train_data()
    train_rows = {tuple(np.round(r, 12)) for m in data.marginals for r in m.x}
    held_out = [tg.x for q in task.queries() for tg in q.targets if tg.group == "test"]
    calls = []
    real_w1 = harness.metrics.w1

    def spy(x, y, a=None, b=None):
        calls.append(np.array(y))
        return real_w1(x, y, a, b)

    monkeypatch.setattr(harness.metrics, "w1", spy)
    hp = dict(DICE.default_hparams("ou/unpaired", "smoke"), iterations=60, eval_every=20)
    m = DICE(hp, seed=1)
    m.fit(data)
    K = len(data.marginals) - 1
    assert len(calls) == 3 * K
    for y in calls:
        assert all(tuple(np.round(r, 12)) in train_rows for r in y)
        assert not any(np.array_equal(y, h) for h in held_out)
    learned = m.learned()
    its = [it for it, _ in learned["val_curve"]]
    vals = [v for _, v in learned["val_curve"]]
    assert its == [20, 40, 60]
    assert learned["selected_iteration"] == its[int(np.argmin(vals))]
    assert learned["selected_val_w1"] == pytest.approx(min(vals))
    assert "TRAINING" in learned["selection_signal"]
    assert len(learned["loss_curve"]) <= 200
    # the weights kept are the selected checkpoint's: re-evaluating the signal reproduces its value
    from methods.action_matching import one_step_w1

    again = one_step_w1(m._model, data, m.hparams, "cpu", int(m.hparams["val_max_points"]), m.seed)
    assert again == pytest.approx(learned["selected_val_w1"], rel=1e-6)


def test_without_a_finite_validation_w1_the_final_weights_are_reported_as_selected(monkeypatch):
    """A flow that diverged before every check selects nothing: the row must not claim iteration 0."""
    import methods.action_matching as am
    from tasks.ou import OU

    monkeypatch.setattr(am, "one_step_w1", lambda *a, **k: float("inf"))
    hp = dict(DICE.default_hparams("ou/unpaired", "smoke"), iterations=40, eval_every=20)
    m = DICE(hp, seed=1)
    m.fit(OU("unpaired", seed=0).train_data())
    learned = m.learned()
    assert learned["selected_iteration"] == 40 and np.isnan(learned["selected_val_w1"])


def test_the_published_validation_curve_is_the_one_that_selected_the_checkpoint(tmp_path):
    """``publish`` writes DICE's (iteration, W1) validation pairs to ``<family>_dice_curves.csv``;
    its minimum is the job's selected iteration and value, so a reader can check the choice."""
    import csv

    from harness.figures import curve_figure, curves_csv, stored_curves
    from harness.store import RunStore
    from harness.sweep import plan_jobs, run_plan

    plan = plan_jobs("ou/unpaired", "dice", "smoke", [0], overrides={"dice": {"iterations": 60, "eval_every": 20}})
    run_plan(plan, RunStore(tmp_path), executor="serial", progress=False)
    (job,) = [r for r in RunStore(tmp_path).latest_jobs().values()]
    path = curves_csv(stored_curves(tmp_path, "dice", ["val_curve"]), tmp_path / "ou_dice_curves.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["iteration"]) for r in rows] == [20, 40, 60]
    best = min(rows, key=lambda r: float(r["value"]))
    assert int(best["iteration"]) == job["learned"]["selected_iteration"]
    assert float(best["value"]) == pytest.approx(job["learned"]["selected_val_w1"], rel=1e-5)
    assert curve_figure(tmp_path, "dice", "val_curve", tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
