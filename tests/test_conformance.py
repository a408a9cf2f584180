"""One shared conformance check for every registered method and task, and the checker itself."""

import re
from dataclasses import replace

import numpy as np
import pytest

from harness import registry
from harness.conformance import ConformanceError, check_method, check_task
from harness.protocol import Capabilities, PopbenchError, Prediction
from methods.reference import Static
from tasks.ou import OU


@pytest.mark.parametrize("name", list(registry.BUILTIN_METHODS))
def test_every_builtin_method_conforms(name):
    cls = registry.methods.load(name)
    check_method(cls)  # toy OU task, smoke profile: pickles, shapes, finiteness, same seed -> same output


@pytest.mark.parametrize("name", list(registry.BUILTIN_METHODS))
def test_every_builtin_methods_settings_pass_its_own_check_everywhere(name):
    cls = registry.methods.load(name)
    for family, variant in registry.expand_tasks("*"):
        if not cls.capabilities.accepts(registry.tasks.load(family), variant):
            continue  # not offered that family (Capabilities.families)
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


# ---------------------------------------------------------------------------------------------
# check_task: the table side of a task (summarize, columns, paper attributes, resembles, files)


class TwoRollouts(OU):  # two rollout queries both fill Train/Forecast W1: one overwrites the other
    def queries(self):
        (q,) = super().queries()
        return [q, replace(q, name="again")]


class StringColumns(OU):
    def summarize(self, query, w1):
        return {"train_w1": 0.1}


class AveragesAStranger(OU):
    column_averages = {("paired", "train_w1"): ("paired", "sideways")}


class AveragesWhatItNeverFills(OU):
    column_averages = {("paired", "w1_mean_holdouts"): ("paired", "unpaired")}


class WrongPaperTable(OU):
    paper_table = {"paired": (1, "mean-of-7/paired")}


class ResemblesATypo(OU):
    resembles = "gf_sd"


class UnregisteredFile(OU):
    data_files = ("lab/not-registered.npz",)


@pytest.mark.parametrize("cls, msg", [
    (TwoRollouts, "fill the same column 'train_w1'"), (StringColumns, "is not a TableColumn"),
    (AveragesAStranger, "names ['sideways'], not variants"), (AveragesWhatItNeverFills, "does not fill it"),
    (WrongPaperTable, "is not a (table, variant) of the published numbers"), (ResemblesATypo, "'gf_sd'"),
    (UnregisteredFile, "not registered"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_the_checker_catches_broken_tasks(cls, msg):
    with pytest.raises(ConformanceError, match=re.escape(msg)):
        check_task(cls, "paired")


class LikeGF(OU):
    resembles = "gf_sde"


def test_the_checker_accepts_a_published_family_and_a_resemblance():
    check_task(LikeGF, "paired")
    from tasks.gf_sde import GFSDE

    check_task(GFSDE, "quadratic-paired")  # its paper table and paper variants are published ones
