"""Speed-up of the Ray executor with 2 workers over the serial executor on CPU-bound dummy jobs.

    python benchmarks/ray_scaling.py [--jobs 8] [--seconds 3]

Each job burns ``--seconds`` of CPU in pure Python (``harness.testing:Busy``). The serial run and
the Ray run execute the same jobs; cluster start-up is timed separately and excluded from the
ratio (a sweep pays it once). Expected on a 2-core machine: >= 1.7x.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from harness.store import RunStore
from harness.sweep import plan_jobs, run_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    plan = plan_jobs("ou/paired", "harness.testing:Busy", "smoke", list(range(args.jobs)),
                     overrides={"*": {"seconds": args.seconds}})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_plan(plan, RunStore(f"{tmp}/serial"), executor="serial", progress=False)
        serial = time.perf_counter() - t0

        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        startup = time.perf_counter() - t0
        warm = plan_jobs("ou/paired", "harness.testing:Busy", "smoke", [10_000 + i for i in range(args.workers)],
                         overrides={"*": {"seconds": 0.1}})
        run_plan(warm, RunStore(f"{tmp}/warm"), executor="ray", workers=args.workers, progress=False)
        t0 = time.perf_counter()
        latest = run_plan(plan, RunStore(f"{tmp}/ray"), executor="ray", workers=args.workers, progress=False)
        par = time.perf_counter() - t0
        assert all(r["status"] == "ok" for r in latest.values())
        ray.shutdown()
    print(f"{args.jobs} jobs x {args.seconds:g} CPU-s")
    print(f"serial:           {serial:7.2f} s")
    print(f"ray ({args.workers} workers):  {par:7.2f} s   (cluster start-up {startup:.1f} s, excluded)")
    print(f"speed-up:         {serial / par:7.2f}x")


if __name__ == "__main__":
    main()
