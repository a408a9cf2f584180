"""Conformance checks any plugin author can call from their own tests.

    from harness.conformance import check_method, check_task
    check_task(MyTask, variant="default")
    check_method(MyMethod)            # on the built-in toy task (tasks.ou), smoke profile

Each check raises :class:`ConformanceError` naming the first broken rule. What they check:

- ``check_task``: variants are declared; training data and queries are well formed (shapes,
  finite values, float arrays, sorted times, groups); the same seed gives the same data; the task
  and its simulator (if any) pickle; targets are not training marginals in disguise when a query
  says ``test``; ``summarize`` and ``extra_columns`` give table cells (no two queries fill the same
  column, a target a method cannot answer does not break them); the table attributes hold what they
  promise (``column_averages`` names declared variants, and this variant fills the columns it is
  named for; ``paper_table`` and the cells' paper variants exist among the published numbers;
  ``resembles`` names a registered family); the data files are registered.
- ``check_method``: the class pickles before ``fit`` (it travels to Ray workers); ``fit`` gets a
  :class:`TrainData` only, as the runner gives it (without velocities unless the method declares
  ``uses_velocities``), and ``predict`` a start marginal the same way; ``predict`` returns one
  finite ``(n, d)`` array per asked time, weights of the right shape if any; the same seed gives
  the same output, and a method that declares ``stochastic=False`` gives it for another seed too;
  ``learned()`` is JSON-serialisable.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np

from harness.protocol import (
    Marginal,
    Method,
    Prediction,
    Query,
    TableColumn,
    Task,
    TrainData,
    target_within_training,
)


class ConformanceError(AssertionError):
    pass


def _fail(msg: str) -> None:
    raise ConformanceError(msg)


def check_task(task_cls: type[Task], variant: str | None = None, seed: int = 0, **kwargs: Any) -> Task:
    """Check a task family (one variant, default: the first) and return the built instance."""
    if not task_cls.family or "/" in task_cls.family:
        _fail(f"{task_cls.__name__}.family must be a non-empty name without '/'")
    if not task_cls.variants:
        _fail(f"{task_cls.__name__}.variants is empty")
    variant = variant or task_cls.variants[0]
    task = task_cls(variant, seed=seed, **kwargs)
    data = task.train_data()
    if not isinstance(data, TrainData):
        _fail("train_data() must return a TrainData")
    if data.family != task_cls.family:
        _fail(f"TrainData.family is {data.family!r}, expected {task_cls.family!r}")
    for m in data.marginals:
        if not np.all(np.isfinite(m.x)) or (m.v is not None and not np.all(np.isfinite(m.v))):
            _fail(f"training marginal at t={m.t} has non-finite values")
    queries = task.queries()
    if not queries or not all(isinstance(q, Query) for q in queries):
        _fail("queries() must return a non-empty list of Query")
    names = [q.name for q in queries]
    if len(set(names)) != len(names):
        _fail(f"query names must be unique, got {names}")
    train_idx = {m.index for m in data.marginals}
    for q in queries:
        if q.start.dim != data.dim:
            _fail(f"query {q.name!r} start has dimension {q.start.dim}, data has {data.dim}")
        for tg in q.targets:
            if tg.x.shape[1] != data.dim or not np.all(np.isfinite(tg.x)):
                _fail(f"query {q.name!r}: target at t={tg.t} is malformed")
            if tg.group == "test" and tg.index >= 0 and tg.index in train_idx and q.kind != "next_step":
                _fail(f"query {q.name!r}: test target index {tg.index} is a training marginal")
    again = task_cls(variant, seed=seed, **kwargs).train_data()
    for m1, m2 in zip(data.marginals, again.marginals):
        if not np.array_equal(m1.x, m2.x):
            _fail("the same seed must give the same training data")
    try:
        pickle.loads(pickle.dumps(task))
    except Exception as exc:
        _fail(f"task does not pickle: {exc}")
    sim = task.simulator()
    if task_cls.has_simulator:
        if sim is None:
            _fail("has_simulator is True but simulator() returned None")
        try:
            sim = pickle.loads(pickle.dumps(sim))
        except Exception as exc:
            _fail(f"simulator does not pickle: {exc}")
        q = queries[0]
        out = sim(q.start, q.times[:2], seed)
        if len(out) != min(2, len(q.times)) or np.asarray(out[0]).shape != q.start.x.shape:
            _fail("simulator(start, times, seed) must return one (n, d) array per time")
    _check_columns(task_cls, task, queries)
    _check_table_attributes(task_cls)
    return task


def _cells(where: str, cells: Any, allow_nan: bool) -> dict[TableColumn, float]:
    if not isinstance(cells, Mapping):
        _fail(f"{where} must return a dict of TableColumn -> float, got {type(cells).__name__}")
    for c, v in cells.items():
        if not (isinstance(c, TableColumn) and isinstance(c.group, str) and isinstance(c.key, str) and c.key):
            _fail(f"{where}: {c!r} is not a TableColumn with a string group and a non-empty key")
        if not isinstance(v, (int, float)) or not (math.isfinite(v) or allow_nan):
            _fail(f"{where}: column {c.key!r} holds {v!r}, not a finite number")
    return dict(cells)


def _check_columns(task_cls: type[Task], task: Task, queries: list[Query]) -> None:
    """summarize / extra_columns on made-up W1s: well typed, no column filled twice, NaN-proof."""
    cells: dict[TableColumn, float] = {}
    for q in queries:
        w = [1.0 + i for i in range(len(q.targets))]
        mine = _cells(f"summarize(query {q.name!r})", task.summarize(q, w), allow_nan=False)
        if not mine:
            _fail(f"summarize(query {q.name!r}) gives no table cell")
        twice = [c.key for c in mine if c in cells]
        if twice:
            _fail(f"queries fill the same column {twice[0]!r} (group {next(c for c in mine if c in cells).group!r}): "
                  "one overwrites the other's number")
        cells.update(mine)
        _cells(f"summarize(query {q.name!r}) for targets no method answered",
               task.summarize(q, [math.nan] * len(q.targets)), allow_nan=True)
    extra = _cells("extra_columns", task.extra_columns(dict(cells)), allow_nan=False)
    if set(extra) & set(cells):
        _fail(f"extra_columns gives column {next(iter(set(extra) & set(cells))).key!r}, which summarize already fills")
    cells.update(extra)
    for (group, key), variants in task_cls.column_averages.items():
        if task.variant in variants and TableColumn(group, key) not in {TableColumn(c.group, c.key) for c in cells}:
            _fail(f"column_averages says column ({group!r}, {key!r}) averages {task.variant!r}, "
                  "but that variant does not fill it")
    pvs = {c.paper_variant for c in cells if c.paper_variant}
    if task_cls.paper_table and pvs:
        published = _published(task_cls.family)
        missing = sorted(pv for pv in pvs if pv not in {v for _, v in published})
        if missing:
            _fail(f"cells name paper variant {missing[0]!r}, which the published numbers of "
                  f"{task_cls.family!r} do not hold")


def _published(family: str) -> set[tuple[int, str]]:
    """(table, variant) pairs of a family in the published numbers (harness/reference)."""
    with resources.files("harness").joinpath("reference/paper_results.csv").open() as fh:
        return {(int(r["table"]), r["variant"]) for r in csv.DictReader(fh) if r["task"] == family}


def _check_table_attributes(task_cls: type[Task]) -> None:
    name = task_cls.__name__
    for attr in ("description", "table_protocol", "table_note"):
        if not isinstance(getattr(task_cls, attr), str):
            _fail(f"{name}.{attr} must be a string")
    for (group, key), variants in task_cls.column_averages.items():
        unknown = [v for v in variants if v not in task_cls.variants]
        if not isinstance(group, str) or not isinstance(key, str) or unknown:
            _fail(f"{name}.column_averages[({group!r}, {key!r})] names {unknown or variants!r}, not variants of "
                  f"{task_cls.family!r}")
    if task_cls.paper_table:
        published = _published(task_cls.family)
        for group, entry in task_cls.paper_table.items():
            if not (isinstance(entry, tuple) and len(entry) == 2 and tuple(entry) in published):
                _fail(f"{name}.paper_table[{group!r}] = {entry!r} is not a (table, variant) of the published "
                      f"numbers of {task_cls.family!r}")
    from harness import data, registry

    likes = task_cls.resembles.values() if isinstance(task_cls.resembles, Mapping) else [task_cls.resembles]
    for like in filter(None, likes):
        if like.split("/")[0] not in registry.BUILTIN_TASKS:
            _fail(f"{name}.resembles names {like!r}; a shipped family is one of {', '.join(registry.BUILTIN_TASKS)}")
    for f in {f for v in task_cls.variants for f in task_cls.variant_data_files(v)} | set(task_cls.data_files):
        if f not in data.REGISTRY:
            _fail(f"{name} names data file {f!r}, which is not registered (harness.data.register)")


def check_prediction(pred: Any, start: Marginal, times: Sequence[float], where: str = "predict") -> None:
    if not isinstance(pred, Prediction):
        _fail(f"{where} must return a Prediction, got {type(pred).__name__}")
    if len(pred.samples) != len(times):
        _fail(f"{where} returned {len(pred.samples)} sample arrays for {len(times)} times")
    for t, s in zip(times, pred.samples):
        if s.shape != start.x.shape:
            _fail(f"{where} at t={t}: shape {s.shape}, expected {start.x.shape} (one row per start row)")
        if not np.all(np.isfinite(s)):
            _fail(f"{where} at t={t}: non-finite samples")
    if pred.weights is not None:
        if len(pred.weights) != len(times):
            _fail(f"{where} returned {len(pred.weights)} weight vectors for {len(times)} times")
        for w in pred.weights:
            if w.shape != (start.n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                _fail(f"{where}: weights must be finite, non-negative, shape ({start.n},), not all zero")


def _fit_predict(method_cls: type[Method], hparams: dict, data: TrainData, queries: list[Query], seed: int, task: Task):
    m = method_cls(hparams, seed=seed, device="cpu")
    try:
        m = pickle.loads(pickle.dumps(m))
    except Exception as exc:
        _fail(f"{method_cls.__name__} does not pickle before fit: {exc}")
    if method_cls.capabilities.requires_simulator:
        m.attach_simulator(task.simulator())
    m.fit(method_cls.capabilities.shown(data))  # as the runner does
    outs = []
    for i, q in enumerate(queries):
        start, times = q.request()
        start = method_cls.capabilities.shown(start)
        times = tuple(t for t in times if _askable(method_cls, data, t))
        if not times:
            continue
        pred = m.predict(start, times, seed=seed * 1000 + i)
        check_prediction(pred, start, times, f"{method_cls.__name__}.predict (query {q.name!r})")
        outs.append(pred)
        if not method_cls.capabilities.stochastic and i == 0:  # declared seed-free: another seed, same answer
            other = m.predict(start, times, seed=seed * 1000 + 7919)
            if any(not np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(pred.samples, other.samples)):
                _fail(f"{method_cls.__name__} declares stochastic=False but its predictions depend on the seed "
                      "passed to predict")
    learned = m.learned()
    try:
        json.dumps(learned)
    except TypeError as exc:
        _fail(f"learned() must be JSON-serialisable: {exc}")
    return outs


def _askable(method_cls: type[Method], data: TrainData, t: float) -> bool:
    caps = method_cls.capabilities
    return caps.interpolate if target_within_training(t, data) else caps.forecast


def check_method(
    method_cls: type[Method],
    task: Task | None = None,
    profile: str = "smoke",
    seed: int = 0,
    hparams: dict | None = None,
    check_determinism: bool = True,
) -> None:
    """Fit and predict ``method_cls`` on ``task`` (default: the toy OU task, paired; for a method
    that requires velocities, the vortex's interpolation; for one made for other families, the
    first variant of the first of them) twice with the same seed and check the
    protocol's rules. Uses the ``smoke`` profile unless told otherwise."""
    if not method_cls.name:
        _fail(f"{method_cls.__name__}.name is empty")
    caps = method_cls.capabilities
    if not (caps.interpolate or caps.forecast):
        _fail(f"{method_cls.__name__} can neither interpolate nor forecast")
    if task is None and caps.families and "ou" not in caps.families:  # made for other families
        from harness import registry

        task_cls = registry.tasks.load(caps.families[0])
        task = task_cls(task_cls.variants[0], seed=seed)
    if task is None and caps.requires_velocities:  # the toy task has velocities at t0 only
        from tasks.vortex import Vortex

        task = Vortex("interpolation", seed=seed)
    if task is None:
        from tasks.ou import OU

        task = OU("paired", seed=seed)
    if caps.requires_simulator and task.simulator() is None:
        _fail("the oracle needs a task with a simulator")
    data = task.train_data()
    hp = dict(method_cls.default_hparams(task.name, profile))
    hp.update(hparams or {})
    try:
        json.dumps(hp)
    except TypeError as exc:
        _fail(f"default_hparams must be JSON-serialisable: {exc}")
    try:
        method_cls.check_hparams(hp)
    except ValueError as exc:
        _fail(f"{method_cls.__name__}.check_hparams refuses its own settings for {task.name} ({profile}): {exc}")
    queries = task.queries()
    first = _fit_predict(method_cls, hp, data, queries, seed, task)
    if not first:
        _fail(f"{method_cls.__name__} answered no query of {task.name}")
    if check_determinism:
        second = _fit_predict(method_cls, hp, data, queries, seed, task)
        for p1, p2 in zip(first, second):
            for s1, s2 in zip(p1.samples, p2.samples):
                if not np.allclose(s1, s2, rtol=1e-5, atol=1e-6):
                    _fail(f"{method_cls.__name__}: the same seed gave different predictions")
