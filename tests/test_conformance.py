"""One shared conformance check for every registered method and task, and the checker itself."""

import numpy as np
import pytest

from harness import registry
from harness.conformance import ConformanceError, check_method, check_task
from harness.protocol import Capabilities, PopbenchError, Prediction
from methods.reference import Static


@pytest.mark.parametrize("name", list(registry.BUILTIN_METHODS))
def test_every_builtin_method_conforms(name):
    cls = registry.methods.load(name)
    check_method(cls)  # toy OU task, smoke profile: pickles, shapes, finiteness, same seed -> same output


@pytest.mark.parametrize("name", list(registry.BUILTIN_METHODS))
def test_every_builtin_methods_settings_pass_its_own_check_everywhere(name):
    cls = registry.methods.load(name)
    for family, variant in registry.expand_tasks("*"):
        for profile in ("smoke", "quick", "paper"):
            cls.check_hparams(cls.default_hparams(f"{family}/{variant}", profile))


@pytest.mark.parametrize("family", list(registry.BUILTIN_TASKS))
def test_every_builtin_task_conforms(family):
    cls = registry.tasks.load(family)
    for variant in cls.variants:
        try:
            check_task(cls, variant)
        except PopbenchError as exc:  # a data file that cannot be had here (the full EB file)
            if "not found" in str(exc) or "missing" in str(exc).lower():
                pytest.skip(str(exc))
            raise


class WrongShape(Static):
    name = "wrong_shape"

    def predict(self, start, times, *, seed):
        return Prediction(tuple(start.x[:-1] for _ in times))


class NotDeterministic(Static):
    name = "not_deterministic"
    capabilities = Capabilities(stochastic=True)

    def predict(self, start, times, *, seed):
        return Prediction(tuple(start.x + np.random.default_rng().normal(size=start.x.shape) for _ in times))


class SeedDependent(Static):  # uses predict's seed but declares stochastic=False (Static's)
    name = "seed_dependent"

    def predict(self, start, times, *, seed):
        return Prediction(tuple(start.x + np.random.default_rng(seed).normal(size=start.x.shape) for _ in times))


class Unpicklable(Static):
    name = "unpicklable"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.fn = lambda: None


@pytest.mark.parametrize("cls, msg", [(WrongShape, "one row per start row"), (NotDeterministic, "same seed"),
                                      (SeedDependent, "declares stochastic=False"), (Unpicklable, "does not pickle")])
def test_the_checker_catches_broken_methods(cls, msg):
    with pytest.raises(ConformanceError, match=msg):
        check_method(cls)



class SeesNoVelocities(Static):
    name = "sees_no_velocities"
    capabilities = Capabilities()  # does not declare uses_velocities

    def fit(self, data):
        if any(m.v is not None for m in data.marginals):
            raise AssertionError("fit was handed velocities it did not declare (the runner strips them)")


def test_the_checker_hands_fit_what_the_runner_does():
    check_method(SeesNoVelocities)  # ou's t0 has velocities: only a declaring method gets them
