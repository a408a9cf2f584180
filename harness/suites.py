"""Named suites: one word per paper table (``--suite table2``).

Each suite fixes the task selection, the methods (the paper's rows plus the reference rows) and
default seeds per profile; ``--seeds``/``--name`` given on the command line win. Results go to the
run ``<profile>-<suite>`` unless ``--name``/``--out`` say otherwise.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from harness.protocol import PopbenchError


@dataclass(frozen=True)
class Suite:
    tasks: str
    methods: str
    seeds: dict  # profile -> seeds spec
    description: str


REFERENCE = "static,velocity_extrapolation"
# WLM with the full gradient (through the positions), beside `wlm` (the authors' detached gradient)
WLM_FULL = "wlm_full_gradient"
# the flow-matching rows of Tables 2 and 3 (interpolation only; curly_fm needs observed velocities)
FLOW_MATCHING = "i_cfm,ot_cfm,sb_cfm,sf2m_exact,sf2m_sink,i_mfm,ot_mfm,curly_fm"

SUITES: dict[str, Suite] = {
    "table1": Suite(
        tasks="gf_sde",
        methods=f"jkonet_star,jkonet_star_v,ijkonet,nn_appex,wlm,wlm_zero_friction,{WLM_FULL},wlm_zero_friction_full_gradient,{REFERENCE},oracle",
        seeds={"smoke": "0", "quick": "0,1,2", "paper": "0,1,2"},
        description="Table 1 / Table 6: gradient-flow SDEs, 5 potentials x paired/unpaired",
    ),
    "table2": Suite(
        tasks="vortex",
        methods=f"wlm,{WLM_FULL},sbirr,vanilla_sb,snap_mmd,am,uam,sam,dice,{FLOW_MATCHING},{REFERENCE}",
        seeds={"smoke": "0", "quick": "0,1,2", "paper": "0,1,2"},
        description="Table 2: ocean vortex interpolation (small) and forecast (big)",
    ),
    "table3": Suite(
        tasks="eb",
        methods=f"wlm,{WLM_FULL},sbirr,vanilla_sb,am,uam,sam,dice,{FLOW_MATCHING},{REFERENCE}",
        seeds={"smoke": "0", "quick": "0,1,2", "paper": "0,1,10,11,100"},
        description="Table 3: EB leave-one-out (the eb300 stand-in when the full file is absent)",
    ),
    "table4": Suite(
        tasks="boids",
        methods=f"jkonet_star,jkonet_star_t,jkonet_star_v,nn_appex,wlm,{WLM_FULL},{REFERENCE},oracle",
        seeds={"smoke": "0", "quick": "0,1,2", "paper": "0,1,2"},
        description="Table 4: Boids, plus boids/unseen-init (Figure 9 as numbers)",
    ),
}


def _eb_available(data_dir: str | None) -> bool:
    from harness import data

    name = "eb/eb_velocity_v5.npz"
    if not any((d / name).exists() for d in data.search_dirs(data_dir)):
        return False
    data.resolve(name, data_dir=data_dir, download=False)  # present: a bad copy is an error, never a fallback
    return True


def get_suite(name: str) -> Suite:
    suite = SUITES.get(name)
    if suite is None:
        raise PopbenchError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    return suite


def run_name(suite: str, profile: str) -> str:
    """The run a suite writes to (``results/runs/<profile>-<suite>``) and ``publish`` reads from."""
    return f"{profile}-{suite}"


def published_dir(suite: str, profile: str) -> Path:
    """Where ``publish`` writes a suite's tables and bundle, ``restore`` reads them back, and a
    suite's sweep looks for jobs already published: ``results/<profile>/<suite>``."""
    return Path("results") / profile / suite


def _restrict(given: str | None, full: str, expand, what: str, suite: str) -> str:
    """The suite's ``full`` selection, or the part of it that ``given`` names (an error if
    ``given`` names something outside the suite: a silently different table is worse)."""
    if not given:
        return full
    allowed = expand(full)
    picked = expand(given)
    names = ["/".join(p) if isinstance(p, tuple) else p for p in picked]  # (family, variant) -> name
    outside = [n for n, p in zip(names, picked) if p not in allowed]
    if outside:
        raise PopbenchError(f"--{what} {given!r}: {', '.join(outside)} not in suite {suite} ({full}); "
                            f"drop --suite to run arbitrary {what}")
    return ",".join(names)


def apply_suite(args: argparse.Namespace) -> None:
    """Fill ``--tasks``, ``--methods``, ``--seeds``, ``--name`` from ``--suite``. Tasks or methods
    given on the command line select a subset of the suite's (e.g. its cheap rows only); the run
    name stays the suite's, so the subset's rows land where ``publish`` looks for them."""
    from harness import registry

    suite = get_suite(args.suite)
    tasks = suite.tasks
    if args.suite == "table3" and not _eb_available(args.data_dir or os.environ.get("POPBENCH_DATA_DIR")):
        import sys

        print("note: the full EB file eb_velocity_v5.npz is not available: table3 runs on the eb300 stand-in "
              "(real EB cells, 300 per day, no velocities; not comparable with published numbers); "
              "`python run_all.py fetch-data eb/eb_velocity_v5.npz` gets the full file", file=sys.stderr)
        if args.tasks and any(t.split("/")[0] == "eb" for t in args.tasks.split(",")):
            raise PopbenchError("--tasks eb: the full EB file eb/eb_velocity_v5.npz is missing; get it with "
                                "`python run_all.py fetch-data eb/eb_velocity_v5.npz`, or drop --tasks to run eb300")
        tasks = "eb300"
    args.tasks = _restrict(args.tasks, tasks, registry.expand_tasks, "tasks", args.suite)
    args.methods = _restrict(args.methods, suite.methods, registry.methods.expand, "methods",
                             args.suite)
    if args.seeds is None:  # not given: the suite's own
        args.seeds = suite.seeds[args.profile]
    if not args.name and not args.out:
        args.name = run_name(args.suite, args.profile)
