"""iJKOnet (JAX): conformance (potential-only and with the entropy option), the
Kozachenko-Leonenko entropy against the Gaussian closed form, and beating ``static`` on the toy OU
task from unpaired data. Smoke-sized networks, so the jitted epoch compiles once per configuration."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from harness.conformance import check_method  # noqa: E402
from harness.metrics import w1  # noqa: E402
from methods.ijkonet import IJKOnet, kl_entropy  # noqa: E402
from tasks.ou import OU  # noqa: E402


def test_conformance_ijkonet():
    check_method(IJKOnet)


def test_conformance_ijkonet_with_entropy():
    check_method(IJKOnet, hparams={"entropy": True, "epochs": 1}, check_determinism=False)


@pytest.mark.parametrize("d", [2, 5])
def test_kl_entropy_matches_gaussian(d):
    rng = np.random.default_rng(d)
    var = 0.3
    x = rng.normal(0.0, math.sqrt(var), size=(3000, d))
    true = 0.5 * d * math.log(2 * math.pi * math.e * var)
    assert kl_entropy(x, k=5) == pytest.approx(true, abs=0.05 * d)


def test_ijkonet_beats_static_on_unpaired_ou():
    task = OU("unpaired", seed=0)
    hp = dict(IJKOnet.default_hparams(task.name, "smoke"), epochs=40)  # smoke shapes: no recompile
    m = IJKOnet(hp, seed=0)
    m.fit(task.train_data())
    q = task.queries()[0]
    start, times = q.request()
    pred = m.predict(start.without_velocities(), times, seed=3)
    fc = np.mean([w1(p, tg.x) for p, tg in zip(pred.samples, q.targets) if tg.group == "test"])
    static = np.mean([w1(start.x, tg.x) for tg in q.targets if tg.group == "test"])
    assert fc < 0.5 * static, (fc, static)
    learned = m.learned()
    gap = np.asarray(learned["gap_curve"])
    assert np.all(np.isfinite(gap)) and learned["gap_bound"] > 0
    # the energy gap is <= 0 up to minibatch noise, and closes during training
    assert abs(gap[-10:].mean()) < abs(gap[:3].mean())
