"""Command line: ``python run_all.py`` (or the ``popbench`` console script).

    python run_all.py --tasks vortex --methods wlm,jkonet_star          # run a sweep, print tables
    python run_all.py --list                                            # what can run, what it needs
    python run_all.py report results/runs/quick --compare paper          # re-render a stored run
    python run_all.py fetch-data                                        # download + verify data files
    python run_all.py plot --tasks boids                                # PNG of a task's marginals
    python run_all.py publish --suite table2                            # tables + figures -> results/quick/table2
    python run_all.py restore --suite table2                            # ... and back into its run, to continue it

Bad input (unknown name, empty selection, a method asked for what it cannot do, a missing data
file, a malformed option) exits with code 2 and one sentence; a sweep in which any job did not
finish ok exits with code 1; a run directory that cannot be written (a full disk) exits with 3
(what was stored before is kept: rerun the same command to resume); an interrupt exits with 130.
This module imports neither torch, JAX nor Ray: they load only inside the jobs that need them.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness.protocol import PROFILES, PopbenchError

DEFAULT_TASKS = "vortex/interpolation"
DEFAULT_METHODS = "static,velocity_extrapolation,wlm"
DEFAULT_PROFILE = "quick"
COMMANDS = ("report", "fetch-data", "plot", "publish", "restore", "list")
EXIT_STORE = 3  # the run directory could not be written (a full disk, permissions)


class _Help(argparse.HelpFormatter):
    """Shows ``(default: X)`` after an option's help only where there is a default to show and the
    help does not state it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """A malformed command line is bad input like any other: one sentence, exit 2 (no usage block)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise PopbenchError(f"{message} (see `{self.prog} --help`)")


def _sweep_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="run_all.py",
        description="popbench: run methods on population-dynamics tasks and print exact-W1 tables. "
        f"Other commands: {', '.join(COMMANDS)} (e.g. `run_all.py report --help`).",
    )
    p.add_argument("--tasks", default=None,
                   help="task families, family/variant names or globs, comma-separated (e.g. gf_sde/*-unpaired); "
                   f"default {DEFAULT_TASKS}, or the suite's; with --suite, a subset of the suite's")
    p.add_argument("--methods", default=None,
                   help="method names, globs or package.module:Class references, comma-separated; "
                   f"default {DEFAULT_METHODS}, or the suite's; with --suite, a subset of the suite's")
    p.add_argument("--suite", default=None,
                   help="a named suite (table1..table4): its tasks, methods, seeds and run name")
    p.add_argument("--profile", default=DEFAULT_PROFILE, choices=PROFILES, help="hyperparameter budget")
    p.add_argument("--seeds", default=None, help="seeds: 0,1,2 or 0-2 (default 0; a suite's own, 0,1,2, with --suite)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                   help="override a hyperparameter (JSON value), for one method or all")
    p.add_argument("--executor", default=None, choices=("serial", "ray", "inline"),
                   help="serial (default for one worker: each method in a process of its own), ray (default for "
                   "more), or inline (everything in this process, for a debugger: no --timeout, no isolation)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel jobs (Ray; default 1, or every CPU of the cluster given by --address)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (implies --executor ray)")
    p.add_argument("--timeout", type=float, default=None, help="per-job limit in seconds on the method's fit and predictions: its process is killed, a timeout row "
                   "is stored")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per job (serial executor; a Ray job always gets its one CPU)")
    p.add_argument("--out", default=None, help="run directory (default results/runs/<name>)")
    p.add_argument("--name", default=None, help="run name (default: the profile)")
    p.add_argument("--data-dir", default=None, help="where data files live (else $POPBENCH_DATA_DIR, then the cache)")
    p.add_argument("--force", action="store_true",
                   help="rerun every selected job from scratch: ok ones too, and a partial or killed fit does not "
                   "continue (its checkpoint is deleted)")
    p.add_argument("--compare", choices=("paper",), default=None, help="show the paper's numbers beside ours")
    p.add_argument("--list", action="store_true", help="list tasks and methods with capabilities and extras")
    p.add_argument("--dry-run", action="store_true", help="print the job matrix and what is done, run nothing")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress lines (one per finished job, and one for each long fit now and then)")
    return p


def _report_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="run_all.py report", description="Re-render tables from a stored run.")
    p.add_argument("run_dir", help="a run directory (with rows.jsonl)")
    p.add_argument("--tasks", default=None, help="only these task families/variants")
    p.add_argument("--methods", default=None, help="only these methods")
    p.add_argument("--profile", default=None, choices=PROFILES)
    p.add_argument("--compare", choices=("paper",), default=None)
    p.add_argument("--out", default=None, help="where to write tables (default <run_dir>/tables)")
    p.add_argument("--include-partial", action="store_true",
                   help="also tabulate partial jobs (fits stopped early by a budget such as wlm.max_minutes), "
                   "as '<method> (partial)' rows with the iterations they reached")
    return p


def _as_partial_rows(rows: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """Partial jobs' rows relabelled '<method> (partial)' (scored, never mixed with complete
    seeds), and per family a note saying how far each one trained."""
    from harness.store import partial_label

    partial = {r["job_id"] for r in rows if r.get("row_type") == "job" and r.get("status") == "partial"}
    out, reached = [], {}
    for r in rows:
        if r.get("job_id") in partial:
            if r.get("row_type") == "job":
                lr = r.get("learned") or {}
                n, of = lr.get("iterations"), lr.get("iterations_target")
                at = f"{n:,} of {of:,} iterations" if isinstance(n, int) and isinstance(of, int) else "an early stop"
                text = f"{r['method']} on {r['variant']} seed {r['seed']} at {at}"
                reached.setdefault(r["task"], []).append((r["method"], r["variant"], r["seed"], text))  # sorted below
                r = {**r, "status": "ok"}
            r = {**r, "method": partial_label(r["method"])}
        out.append(r)
    notes = {f: "(partial) = training stopped early, not the configured run: "
             + "; ".join(text for *_, text in sorted(v)) + ". "
             "In a (partial) row, — may also be a variant that has not run yet."
             for f, v in reached.items()}
    return out, notes


def _by_settings(rows: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """A method stored with several settings (or profiles) on one task variant gets one row label
    per setting, '<method> [<hash>]' (with the profile where those differ too), so that tables never
    average different configurations together; and per family a note saying so. (Settings may
    differ between variants: that is one configuration per variant, nothing to split.)"""
    combos: dict[tuple[str, str, str], set[tuple[str, str]]] = {}
    for r in rows:  # a setting whose jobs all failed (an aborted experiment) has nothing to tell apart
        if r.get("row_type") == "job" and r.get("status") in ("ok", "partial"):
            combos.setdefault((r["task"], r["variant"], r["method"]), set()).add(
                (r["profile"], r.get("hparams_hash") or ""))
    split = {k: c for k, c in combos.items() if len(c) > 1}
    if not split:
        return rows, {}
    out = []
    for r in rows:
        c = split.get((r["task"], r["variant"], r["method"]))
        if c:
            tag = r.get("hparams_hash") or "?"
            if len({p for p, _ in c}) > 1:
                tag = f"{r['profile']} {tag}"
            r = {**r, "method": f"{r['method']} [{tag}]"}
        out.append(r)
    notes: dict[str, str] = {}
    for (family, variant, method), c in split.items():
        notes[family] = (notes.get(family, "") + f"{method} [...]: the run holds {method} on {variant} with {len(c)} "
                         "different settings (hparams hash; each job's settings are in rows.jsonl), never averaged "
                         "together. ")
    return out, {f: n.strip() for f, n in notes.items()}


def _merge_notes(*notes: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for n in notes:
        for f, text in n.items():
            out[f] = " ".join(t for t in (out.get(f, ""), text) if t)
    return out


def _fetch_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="run_all.py fetch-data", description="Download and verify data files.")
    p.add_argument("names", nargs="*", help="file names from the data registry (default: all)")
    p.add_argument("--data-dir", default=None)
    return p


def _plot_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="run_all.py plot",
                                description="Plot a task's marginals over time (and, with --run, methods' rollouts).")
    p.add_argument("--tasks", required=True, help="task families or family/variant names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="results/figures", help="output directory for PNG files")
    p.add_argument("--run", default=None, help="a run directory: also plot the stored rollouts of --methods")
    p.add_argument("--methods", default=None, help="methods whose stored rollouts to draw (with --run)")
    p.add_argument("--curve", default=None, metavar="METHOD.KEY",
                   help="with --run: plot a stored learned curve, e.g. wlm.gamma_curve")
    return p


def _publish_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="run_all.py publish",
        description="Write a suite's published outputs from its stored run: tables with the paper's numbers "
        "beside ours (Markdown, LaTeX, CSV, jobs.csv) and figures (rollouts against the truth, learned curves).")
    p.add_argument("--suite", required=True, help="table1..table4")
    p.add_argument("--profile", default=DEFAULT_PROFILE, choices=PROFILES)
    p.add_argument("--run", default=None, help="the suite's run directory (default results/runs/<profile>-<suite>)")
    p.add_argument("--out", default=None, help="output directory (default results/<profile>/<suite>)")
    p.add_argument("--seeds", default=None, help="only these seeds (e.g. 0 or 0-2; default: every seed in the run)")
    p.add_argument("--seed", type=int, default=None,
                   help="the seed whose rollouts the figures show (default: 0, or the first of --seeds)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--include-partial", action="store_true",
                   help="also tabulate and draw partial jobs as '<method> (partial)', with a footnote giving the "
                   "iterations each reached")
    p.add_argument("--drop-superseded", action="store_true",
                   help="leave out jobs run with settings other than the method's current ones for their task and "
                   "profile (e.g. made by an older version of the method), naming each; without it they get rows "
                   "of their own, '<method> [<hash>]'")
    return p


def _superseded(rows: list[dict]) -> dict[str, str]:
    """job id -> its current settings hash, for every job row whose settings differ from what its
    method would run with now on its task and profile (no ``--set``). A method or task that no
    longer loads is kept: there is nothing to compare it with."""
    from harness import registry
    from harness.runner import hparams_hash
    from harness.sweep import _settings

    out: dict[str, str] = {}
    current: dict[tuple[str, str, str, str], str | None] = {}
    for r in rows:
        if r.get("row_type") != "job":
            continue
        key = (r["method"], r["task"], r["variant"], r["profile"])
        if key not in current:
            try:
                mcls = registry.methods.load(r["method"])
                hp = _settings(r["method"], mcls, f"{r['task']}/{r['variant']}", r["profile"], {})
                current[key] = hparams_hash(hp, getattr(mcls, "budget_keys", ()))
            except (PopbenchError, ValueError, KeyError):
                current[key] = None
        if current[key] is not None and r.get("hparams_hash") != current[key]:
            out[r["job_id"]] = current[key]
    return out


def _restore_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="run_all.py restore",
        description="Put a published suite's rows back into its run directory (e.g. on a fresh clone or another "
        "machine), so that the suite's command skips the jobs already published and `publish` tabulates them with "
        "the new ones. Reads the bundle `publish` writes (rows.jsonl.gz); attempts the run already holds are left "
        "alone. Predicted samples are not carried: a rollout figure whose predictions are missing is left as "
        "published.")
    p.add_argument("--suite", required=True, help="table1..table4")
    p.add_argument("--profile", default=DEFAULT_PROFILE, choices=PROFILES)
    p.add_argument("--from", dest="source", default=None,
                   help="the published directory (default results/<profile>/<suite>)")
    p.add_argument("--run", default=None, help="the run directory to fill (default results/runs/<profile>-<suite>)")
    return p


# --------------------------------------------------------------------------------------------


def cmd_list(out=sys.stdout, width: int = 100) -> int:
    """Methods as a table, tasks as wrapped blocks: all of it within ``width`` columns."""
    import textwrap

    from harness import registry

    rows, sources = [], []
    for name in registry.methods.names():
        e = registry.methods.entry(name)
        if e.source != "builtin":
            sources.append(f"{name}: {e.source}")
        try:
            cls = registry.methods.load(name)
        except PopbenchError as exc:
            rows.append([name, "?", "?", "?", "?", "?"])
            sources.append(f"{name}: broken: {exc}")
            continue
        c = cls.capabilities
        rows.append([name, "yes" if c.interpolate else "no", "yes" if c.forecast else "no",
                     "yes" if c.uses_velocities else "no", c.framework, f"popbench[{c.extra}]" if c.extra else "-"])
    print("Methods", file=out)
    table = [["name", "interpolate", "forecast", "velocities", "framework", "needs"], *rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(table[0]))]
    for i, r in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)
    for line in sources:  # plugins: where each comes from
        print(textwrap.fill(line, width, subsequent_indent="    "), file=out)
    print("\nTasks (an oracle re-simulates the true process)", file=out)
    for fam in registry.tasks.names():
        try:
            cls = registry.tasks.load(fam)
        except PopbenchError as exc:
            print(textwrap.fill(f"{fam}: broken: {exc}", width, subsequent_indent="    "), file=out)
            continue
        print(textwrap.fill(f"{fam}: {cls.description}", width, subsequent_indent="    "), file=out)
        for label, text in (("variants", ", ".join(cls.variants)),
                            ("oracle", "yes" if cls.has_simulator else "no (real data)"),
                            ("data files", ", ".join(cls.data_files) or "none (generated)")):
            print(textwrap.fill(f"{label}: {text}", width, initial_indent="    ", subsequent_indent="      ",
                                break_on_hyphens=False), file=out)
    return 0


def _task_attr(families, attr: str, empty):
    """A task class attribute per family (``empty`` for a family no longer registered)."""
    from harness import registry

    out = {}
    for f in families:
        try:
            out[f] = getattr(registry.tasks.load(f), attr)
        except PopbenchError:
            out[f] = empty
    return out


def _paper_tables(families) -> dict:
    return {f: dict(v) for f, v in _task_attr(families, "paper_table", {}).items()}


def _method_order(methods_selected: Sequence[str]) -> list[str]:
    from harness import registry

    return [*methods_selected, *[m for m in registry.BUILTIN_METHODS if m not in methods_selected]]


def render(job_rows, target_rows, out_dir, *, compare, method_order, profile, stream=None,
           extra_notes: dict[str, str] | None = None, said: bool = True) -> None:
    """Write the tables of these rows to ``out_dir`` and print them (Markdown) to ``stream``
    (stdout by default); ``said``: end with a line saying where they were written."""
    from harness.reports import write_report

    families = list(dict.fromkeys(r["task"] for r in job_rows))
    notes = _merge_notes(_task_attr(families, "table_note", ""), extra_notes or {})
    tables = write_report(job_rows, target_rows, out_dir, compare=compare, method_order=method_order,
                          profile=profile, paper_tables=_paper_tables(families),
                          column_averages=_task_attr(families, "column_averages", {}),
                          protocols=_task_attr(families, "table_protocol", ""), notes=notes)
    stream = stream or sys.stdout
    for t in tables:
        print("\n" + t.markdown(), file=stream)
    if said:
        print(f"Tables (Markdown, LaTeX, CSV) written to {out_dir}", file=stream)


def _note_published(plan, store, suite: str, profile: str) -> None:
    """Say so when a suite's sweep is about to rerun jobs its publication already holds (a fresh
    clone's run is empty): a reproduction, or hours spent by mistake, which ``restore`` avoids."""
    from harness.store import BUNDLE, bundle_job_ids
    from harness.suites import published_dir

    bundle = published_dir(suite, profile) / BUNDLE
    if not bundle.exists():
        return
    published = bundle_job_ids(bundle, ok_only=True)
    done = store.done_job_ids()
    again = [j for j in plan.jobs if j.job_id in published and j.job_id not in done]
    if again:
        print(f"note: {bundle.parent} already publishes {len(again)} of these {len(plan.jobs)} jobs, and this run "
              f"does not hold them: they run again (a reproduction); `python run_all.py restore --suite {suite} "
              f"--profile {profile}` first would skip them", file=sys.stderr)


class _HoldNotes(io.TextIOBase):
    """stderr while a command line is checked: ``note:`` lines wait for :meth:`release` (a bad
    command line gets just its one sentence), anything else (a download's progress) goes through."""

    def __init__(self, stream):
        self.stream, self.held, self.partial = stream, [], ""

    def write(self, text: str) -> int:
        self.partial += text
        while "\n" in self.partial:
            line, self.partial = self.partial.split("\n", 1)
            (self.held.append if line.startswith("note:") else self.stream.write)(line + "\n")
        if self.partial and not (self.partial.startswith("note:") or "note:".startswith(self.partial)):
            self.stream.write(self.partial)
            self.partial = ""
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def release(self) -> None:
        self.stream.write("".join(self.held) + self.partial)
        self.held, self.partial = [], ""


def _prepare_sweep(args: argparse.Namespace):
    """Check a sweep's command line and plan it: (plan, store, run directory, seeds, executor)."""
    from harness.store import RunStore
    from harness.sweep import default_run_dir, parse_overrides, parse_seeds, plan_jobs

    for flag, value in (("--tasks", args.tasks), ("--methods", args.methods), ("--seeds", args.seeds)):
        if value is not None and not value.strip():  # given, but empty: never the defaults
            raise PopbenchError(f"{flag} {value!r} selects nothing: name at least one, or leave {flag} out "
                                "for the default")
    if args.suite:
        from harness.suites import apply_suite

        apply_suite(args)
    args.tasks = args.tasks or DEFAULT_TASKS
    args.methods = args.methods or DEFAULT_METHODS
    if args.data_dir:  # absolute: jobs carry it to workers, whatever their working directory
        args.data_dir = str(Path(args.data_dir).resolve())
    for name, value, ok, what in (("--workers", args.workers, args.workers is None or args.workers >= 1, "at least 1"),
                                  ("--threads", args.threads, args.threads >= 1, "at least 1"),
                                  ("--timeout", args.timeout, args.timeout is None or args.timeout > 0, "above 0")):
        if not ok:
            raise PopbenchError(f"{name} must be {what}, got {value:g}")
    seeds = parse_seeds(args.seeds or "0")
    plan = plan_jobs(args.tasks, args.methods, args.profile, seeds, parse_overrides(args.overrides), args.data_dir)
    run_dir = Path(args.out) if args.out else default_run_dir(args.name, args.profile)
    store = RunStore(run_dir)
    for s in plan.skipped_pairs:
        print(f"note: not offered: {s}", file=sys.stderr)
    if args.suite:
        _note_published(plan, store, args.suite, args.profile)
    executor = args.executor or ("ray" if ((args.workers or 1) > 1 or args.address) else "serial")
    if executor != "ray" and (args.workers or 1) > 1:
        raise PopbenchError(f"--workers {args.workers} runs jobs in parallel, which the {executor} executor does not: "
                            f"drop --executor {executor}")
    if executor == "inline" and args.timeout is not None:
        raise PopbenchError("--timeout kills a method in its own process, which --executor inline does not give it: "
                            "drop one of them")
    if args.workers is None and not args.address:
        args.workers = 1  # with --address, None: as many jobs at once as the cluster has CPUs
    if executor == "ray" and not args.dry_run:
        import importlib.util

        from harness.runner import NEEDS_RAY

        if importlib.util.find_spec("ray") is None:
            raise PopbenchError(NEEDS_RAY)
    return plan, store, run_dir, seeds, executor


def cmd_sweep(args: argparse.Namespace) -> int:
    import contextlib

    from harness.sweep import run_plan, sweep_outcome

    held = _HoldNotes(sys.stderr)
    with contextlib.redirect_stderr(held):  # a bad command line gets its one sentence, not the notes before it
        plan, store, run_dir, seeds, executor = _prepare_sweep(args)
    held.release()
    if args.dry_run:
        return _dry_run(plan, store, run_dir)
    try:
        store.ensure()
    except OSError as exc:  # before any job: a run that cannot store its rows must not start
        raise PopbenchError(f"cannot write the run directory {run_dir} ({exc.strerror or exc}); "
                            "choose another with --out") from exc
    store.record_invocation({"argv": sys.argv[1:], "tasks": args.tasks, "methods": args.methods,
                             "profile": args.profile, "seeds": seeds, "executor": executor,
                             "workers": args.workers, "timeout": args.timeout})
    run_plan(plan, store, executor=executor, workers=args.workers, address=args.address, timeout=args.timeout,
             force=args.force, progress=not args.no_progress, threads=args.threads)
    latest, elsewhere, vanished = sweep_outcome(plan, store)
    job_rows = list(latest.values())
    stored = store.rows_of_latest_attempts()
    refs = _reference_rows(stored, plan, latest)
    ids = {(r["job_id"], r["attempt_id"]) for r in job_rows + refs}
    target_rows = [r for r in stored if r.get("row_type") == "target" and (r["job_id"], r["attempt_id"]) in ids]
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:  # this command's tables: printed, not kept
        render(job_rows + refs, target_rows, Path(scratch), compare=args.compare,
               method_order=_method_order([m for m in dict.fromkeys(j.method for j in plan.jobs)]),
               profile=args.profile, said=False)
    if refs:
        names = ", ".join(dict.fromkeys(r["method"] for r in refs))
        print(f"Beside this command's methods: the reference rows ({names}) this run holds for the same tasks, "
              "profile and seeds.")
    _render_run(stored, run_dir, compare=args.compare)
    bad = [r for r in job_rows if r.get("status") != "ok" and r["job_id"] not in elsewhere]
    for r in bad:
        print(f"{r['status']}: {r['method']} on {r['task']}/{r['variant']} seed {r['seed']}: {r.get('error')}",
              file=sys.stderr)
    if bad:
        print(f"{len(bad)} of {len(job_rows)} jobs did not finish ok (rows in {store.rows_path})", file=sys.stderr)
    if elsewhere:
        print(f"{len(elsewhere)} of {len(plan.jobs)} jobs are running in another process: this table shows their "
              "earlier attempt where there is one (see the notes above)", file=sys.stderr)
    if vanished:  # held by another process that stopped without storing a result
        print(f"{len(vanished)} of {len(plan.jobs)} jobs have no result: another process held them and stopped "
              "without one; rerun this command to run them", file=sys.stderr)
    return 1 if bad or elsewhere or vanished else 0


def _reference_rows(stored: list[dict], plan, latest: dict[str, dict]) -> list[dict]:
    """The ``ok`` reference rows (static, velocity extrapolation, oracle) the run holds for the
    plan's task variants, profile and seeds, other than the plan's own jobs: a learner is read
    against them."""
    from harness.reports import REFERENCE_METHODS

    want = {(j.family, j.variant, j.profile, j.seed) for j in plan.jobs}
    return [r for r in stored if r.get("row_type") == "job" and r.get("method") in REFERENCE_METHODS
            and r.get("status") == "ok" and r["job_id"] not in latest
            and (r["task"], r["variant"], r["profile"], r["seed"]) in want]


def _render_run(stored: list[dict], run_dir: Path, *, compare: str | None) -> None:
    """Rewrite ``<run>/tables`` from every job the run holds (what ``report`` prints), so that it
    never shows just the latest command's selection."""
    rows, notes = _by_settings(stored)
    job_rows, target_rows = _split(rows)
    if not job_rows:
        return
    import io

    profiles = sorted({r["profile"] for r in job_rows})
    render(job_rows, target_rows, run_dir / "tables", compare=compare,
           method_order=_method_order(list(dict.fromkeys(r["method"] for r in job_rows))),
           profile="/".join(profiles), extra_notes=notes, stream=io.StringIO())
    n_methods = len({r["method"] for r in job_rows})
    n_tasks = len({(r["task"], r["variant"]) for r in job_rows})
    print(f"Tables of the whole run ({_n(len(job_rows), 'job')}: {_n(n_methods, 'method')} on "
          f"{_n(n_tasks, 'task variant')}; "
          f"Markdown, LaTeX, CSV) written to {run_dir / 'tables'}; `python run_all.py report {run_dir}` prints them")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _dry_run(plan, store, run_dir: Path) -> int:
    """The job matrix with each job's state; runs nothing."""
    from tabulate import tabulate

    from harness.sweep import held_by

    latest = store.latest_jobs()

    def state(job) -> str:
        r = latest.get(job.job_id) or {}
        if r.get("status") == "ok":
            return "done"
        if r.get("status") == "partial":  # rerunning continues it from its checkpoint
            lr = r.get("learned") or {}
            text = f"partial ({lr.get('iterations')}/{lr.get('iterations_target')} its)"
        elif r.get("status"):
            text = f"todo (last attempt {r['status']})"
        elif store.log_path(job.job_id).exists():  # started before, never stored: its process was stopped
            text = "todo (an attempt started and stored nothing: see its log)"
        else:
            text = "todo"
        holder = store.claimed_by(job.job_id)
        if holder is not None:
            text += f", running now ({held_by(holder)})"
        ckpt = store.checkpoint_path(job.job_id)
        if ckpt.exists() and r.get("status") != "partial":  # a killed attempt's, or a running one's
            age = max(time.time() - ckpt.stat().st_mtime, 0.0)
            text += f", checkpoint saved {age / 60:.0f} min ago" if age < 5400 else \
                f", checkpoint saved {age / 3600:.1f} h ago"
        return text

    rows = [[j.task, j.method, j.profile, j.seed, j.hparams_hash, state(j)] for j in plan.jobs]
    print(tabulate(rows, headers=["task", "method", "profile", "seed", "hparams", "state"], tablefmt="github"))
    n_todo = sum(r[-1] != "done" for r in rows)
    print(f"\n{len(rows)} jobs, {len(rows) - n_todo} done, {n_todo} to run; run directory {run_dir}")
    return 0


def _stored_rows(run_dir, missing: str) -> list[dict]:
    """Rows of the latest attempt of every job in a run directory; ``missing`` ends the error."""
    from harness.store import RunStore

    store = RunStore(run_dir)
    if not store.rows_path.exists():
        raise PopbenchError(f"{run_dir} has no rows.jsonl: {missing}")
    return store.rows_of_latest_attempts()


def _split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(job rows, target rows)."""
    return ([r for r in rows if r.get("row_type") == "job"], [r for r in rows if r.get("row_type") == "target"])


def cmd_report(argv: Sequence[str]) -> int:
    from harness import registry

    args = _report_parser().parse_args(argv)
    rows = _stored_rows(args.run_dir, "not a popbench run directory")
    if args.tasks:
        pairs = set(registry.expand_tasks(args.tasks))
        rows = [r for r in rows if (r["task"], r["variant"]) in pairs]
    if args.methods:
        names = set(registry.methods.expand(args.methods))
        rows = [r for r in rows if r["method"] in names]
    if args.profile:
        rows = [r for r in rows if r["profile"] == args.profile]
    rows, extra_notes = _by_settings(rows)
    if args.include_partial:
        rows, partial_notes = _as_partial_rows(rows)
        extra_notes = _merge_notes(extra_notes, partial_notes)
    job_rows, target_rows = _split(rows)
    if not job_rows:
        raise PopbenchError(f"no result rows in {args.run_dir} match the selection")
    profiles = sorted({r["profile"] for r in job_rows})
    render(job_rows, target_rows,
           Path(args.out) if args.out else Path(args.run_dir) / "tables", compare=args.compare,
           method_order=_method_order(list(dict.fromkeys(r["method"] for r in job_rows))),
           profile="/".join(profiles), extra_notes=extra_notes)
    return 0


def cmd_fetch(argv: Sequence[str]) -> int:
    from harness import data

    args = _fetch_parser().parse_args(argv)
    paths = data.fetch(args.names or None, data_dir=args.data_dir)
    for p in paths:
        print(f"ok  {p}")
    return 0


def cmd_plot(argv: Sequence[str]) -> int:
    from harness import plots, registry

    args = _plot_parser().parse_args(argv)
    if args.curve and not args.run:
        raise PopbenchError("--curve plots a stored curve: name the run directory with --run")
    if args.run and not (args.methods or args.curve):
        raise PopbenchError("--run draws stored results: name --methods (rollouts) or --curve METHOD.KEY")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for family, variant in registry.expand_tasks(args.tasks):
        task = registry.tasks.load(family)(variant, seed=args.seed, data_dir=args.data_dir)
        path = out / f"{family}_{variant}_marginals.png"
        plots.plot_marginals(task, path)
        print(f"wrote {path}")
        if args.run and args.methods:
            from harness.figures import rollout_figure

            path = out / f"{family}_{variant}_rollouts.png"
            rollout_figure(args.run, family, variant, registry.methods.expand(args.methods), path, seed=args.seed,
                           data_dir=args.data_dir)
            print(f"wrote {path}")
    if args.run and args.curve:
        from harness.figures import curve_figure

        method, _, key = args.curve.partition(".")
        families = list(dict.fromkeys(f for f, _ in registry.expand_tasks(args.tasks)))  # --tasks selects here too
        drawn = 0
        for family in families:
            path = out / f"{family}_{method}_{key}.png"
            try:
                curve_figure(args.run, method, key, path, family=family)
            except PopbenchError as exc:
                if len(families) == 1:
                    raise
                print(f"note: {exc}", file=sys.stderr)
                continue
            drawn += 1
            print(f"wrote {path}")
        if not drawn and len(families) > 1:
            raise PopbenchError(f"no stored {key!r} curve of {method} on {', '.join(families)} in {args.run}")
    return 0


def _keeps_published_jobs(bundle: Path, rows: list[dict], suite: str, profile: str,
                          dropped: set[str] = frozenset()) -> None:
    """Refuse to publish over a publication whose jobs the run lacks (e.g. a fresh clone's run
    that was never restored): its tables would silently lose them. Jobs ``--drop-superseded``
    leaves out on purpose (``dropped``) are not lost."""
    from harness.store import bundle_job_ids

    if not bundle.exists():
        return
    lost = sorted(bundle_job_ids(bundle) - {r.get("job_id") for r in rows} - set(dropped))
    if lost:
        raise PopbenchError(f"{bundle.parent} publishes {len(lost)} jobs the run does not hold (e.g. {lost[0]}): "
                            f"`python run_all.py restore --suite {suite} --profile {profile}` brings them into the "
                            f"run first (to drop them, delete {bundle})")


def cmd_publish(argv: Sequence[str]) -> int:
    from harness import registry
    from harness.figures import curves_csv, draw_curves, rollout_figure, stored_curves
    from harness.store import BUNDLE, partial_label, write_bundle
    from harness.suites import REFERENCE, get_suite, published_dir, run_name
    from harness.sweep import default_run_dir, parse_seeds

    args = _publish_parser().parse_args(argv)
    suite = get_suite(args.suite)
    run_dir = Path(args.run) if args.run else default_run_dir(run_name(args.suite, args.profile), args.profile)
    out = Path(args.out) if args.out else published_dir(args.suite, args.profile)
    rows = [r for r in _stored_rows(run_dir, f"run `python run_all.py --suite {args.suite} --profile "
                                              f"{args.profile}` first") if r["profile"] == args.profile]
    dropped = _superseded(rows) if args.drop_superseded else {}
    if dropped:
        for job_id in sorted(dropped):
            print(f"dropped (superseded settings; {job_id.split('|')[1]} now runs {dropped[job_id]}): {job_id}")
        rows = [r for r in rows if r["job_id"] not in dropped]
    _keeps_published_jobs(out / BUNDLE, rows, args.suite, args.profile, dropped=set(dropped))
    profile_rows = rows  # the bundle keeps every seed, whatever --seeds tabulates
    keep = set(parse_seeds(args.seeds)) if args.seeds else None
    if args.seed is None:
        args.seed = parse_seeds(args.seeds)[0] if args.seeds else 0
    elif keep is not None and args.seed not in keep:
        raise PopbenchError(f"--seed {args.seed} is not among --seeds {args.seeds}: the figures would show a seed "
                            "the tables leave out")
    if keep is not None:
        rows = [r for r in rows if r["seed"] in keep]
    rows, extra_notes = _by_settings(rows)
    # a method with several settings has a table row per setting; a figure would mix them: none
    several = {(r["task"], r["method"].partition(" [")[0]) for r in rows if " [" in r["method"]}
    if args.include_partial:
        rows, partial_notes = _as_partial_rows(rows)
        extra_notes = _merge_notes(extra_notes, partial_notes)
    job_rows, target_rows = _split(rows)
    if not job_rows:
        raise PopbenchError(f"no {args.profile} rows in {run_dir}")
    methods = registry.methods.expand(suite.methods)
    order = _method_order([name for m in methods for name in (m, partial_label(m))])
    # the rows themselves, for `restore`: first, so that no table is newer than the bundle
    path = write_bundle(run_dir, profile_rows, out / BUNDLE)
    print(f"wrote {path}")
    render(job_rows, target_rows, out, compare="paper", method_order=order, profile=args.profile,
           extra_notes=extra_notes)
    for name in ("environment.json", "invocations.jsonl"):  # provenance: versions, git revision, commands
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, out / name)
    learners = [m for m in methods if m not in {*REFERENCE.split(","), "oracle"}]
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    for family, m in sorted(several):
        print(f"note: no figures of {m} on {family}: the run holds it with several settings (see the table's note)",
              file=sys.stderr)
    for family, variant in dict.fromkeys((r["task"], r["variant"]) for r in job_rows):
        path = figs / f"{family}_{variant}_rollouts.png"
        try:
            rollout_figure(run_dir, family, variant, [m for m in learners if (family, m) not in several], path,
                           seed=args.seed, data_dir=args.data_dir, include_partial=args.include_partial,
                           profile=args.profile, skip_jobs=frozenset(dropped))
            print(f"wrote {path}")
        except PopbenchError as exc:
            print(f"note: no rollout figure for {family}/{variant}: {exc}", file=sys.stderr)
    # learned curves worth a figure: method -> [(curve key, axis label, the hparam that makes it
    # learned, or None)]; their numbers go to <family>_<method>_curves.csv beside the tables
    wlm_curves = [("loss_curve", "training loss (block means)", None),
                  ("gamma_curve", "learned friction γ", "learn_friction")]
    curves = {**{m: wlm_curves for m in learners if m.startswith("wlm")},  # every WLM row (full gradient too)
              "dice": [("val_curve", "one-step W1, training marginals", None)]}  # what selects its checkpoint
    for family in dict.fromkeys(r["task"] for r in job_rows):
        for m, specs in curves.items():
            mine = [r for r in job_rows if r["method"] in (m, partial_label(m)) and r["task"] == family]
            if m not in learners or not mine or (family, m) in several:
                continue
            # e.g. WLM on Boids: friction fixed at 0, nothing learned to draw
            specs = [(key, label) for key, label, flag in specs
                     if not flag or any(r.get("hparams", {}).get(flag) for r in mine)]
            found = stored_curves(run_dir, m, [key for key, _ in specs], family=family, seeds=keep,
                                  include_partial=args.include_partial, profile=args.profile)
            for key, label in specs:
                of_key = [c for c in found if c["curve"] == key]
                if not of_key:
                    print(f"note: no {key} figure for {family}: no stored {key!r} curve of {m} in {run_dir}",
                          file=sys.stderr)
                    continue
                path = draw_curves(of_key, figs / f"{family}_{m}_{key}.png", ylabel=label)
                print(f"wrote {path}")
            if found:
                path = curves_csv(found, out / f"{family}_{m}_curves.csv")
                print(f"wrote {path}")
    return 0


def cmd_restore(argv: Sequence[str]) -> int:
    from harness.store import BUNDLE, RunStore
    from harness.suites import get_suite, published_dir, run_name
    from harness.sweep import default_run_dir, held_by

    args = _restore_parser().parse_args(argv)
    get_suite(args.suite)
    source = Path(args.source) if args.source else published_dir(args.suite, args.profile)
    run_dir = Path(args.run) if args.run else default_run_dir(run_name(args.suite, args.profile), args.profile)
    store = RunStore(run_dir)
    busy = store.live_claims()
    if busy:  # a running sweep would take restored attempts of its queued jobs for its own
        raise PopbenchError(f"a sweep is running in {run_dir} ({held_by(busy[0])}): restore when it has finished")
    try:
        store.ensure()
    except OSError as exc:
        raise PopbenchError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}") from exc
    added, present = store.restore_bundle(source / BUNDLE, profile=args.profile)
    if added:  # the run's provenance stays whole: the commands that made the rows, then this one
        if (source / "invocations.jsonl").exists():
            store.merge_invocations(source / "invocations.jsonl")
        store.record_invocation({"argv": ["restore", *argv], "restored": str(source / BUNDLE), "attempts": added},
                                ran_jobs=False)
    print(f"restored {added} job attempts from {source / BUNDLE} into {run_dir}"
          + (f" ({present} already there)" if present else ""))
    if added:
        print(f"next: `python run_all.py --suite {args.suite} --profile {args.profile}` runs only the jobs not "
              f"restored; `python run_all.py publish --suite {args.suite} --profile {args.profile}` tabulates all")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            cmd, rest = argv[0], argv[1:]
            if cmd == "list":
                return cmd_list()
            return {"report": cmd_report, "fetch-data": cmd_fetch, "plot": cmd_plot, "publish": cmd_publish,
                    "restore": cmd_restore}[cmd](rest)
        args = _sweep_parser().parse_args(argv)
        if args.list:
            return cmd_list()
        return cmd_sweep(args)
    except PopbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 1
    except OSError as exc:  # a file the command must read or write (a full disk, permissions)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; what was stored before it is kept: make room (or fix the "
              "permissions) and rerun the same command to resume", file=sys.stderr)
        return EXIT_STORE
    except KeyboardInterrupt:
        print("interrupted: finished jobs are stored; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
