"""One command for a machine with a GPU: the CUDA tests, GPU-against-CPU timings and a Ray sweep
with GPU placement, in under 8 minutes, ending in one summary table.

    python benchmarks/gpu_check.py                   # on a machine with CUDA: the three parts
    python benchmarks/gpu_check.py --log-dir DIR     # also keep each part's whole output in DIR
    python benchmarks/gpu_check.py --parts timing    # some parts only: tests, timing, sweep
    python benchmarks/gpu_check.py --device cpu      # PLUMBING CHECK ONLY (see the end)

On a machine without CUDA it says so in one line and exits 0.

Each part runs in its own process group with a hard time limit (``BUDGET_S``); a part that fails,
crashes or overruns is reported in the table (with the last line of its output, not a
traceback), and the others still run. Exit status 0 only if every part passed.

1. tests: the CUDA-parametrised tests, ``pytest -k cuda`` over the test files that mention CUDA
   (WLM's fused attention and Sinkhorn path against the plain one, the training force against the
   inference force, WLM and nn-APPEX checkpoints resumed bit for bit on the GPU). A CUDA test
   that skips fails the part.
2. timing: one WLM training iteration (the ``paper`` GF-SDE network, a rollout over k = 3
   marginals, the default detached gradient) and one nn-APPEX outer iteration (the ``paper``
   settings with the drift fit cut to ``APPEX_EPOCHS`` epochs and the E-step to at most
   ``APPEX_MAX_SWEEPS`` IPF sweeps, so that the CPU finishes), at N = 1000 and N = 4000 particles
   (OU marginals like the GF-SDE data), on the GPU and on one CPU thread in the same run (the
   two processes run side by side), with the ratio CPU / GPU. The same work on both devices;
   minimum over up to ``REPEATS`` timed repeats after a warm-up while the budget allows. A
   measurement still running at the time limit is reported as "> T s" and its ratio as a lower
   bound. ``benchmarks/wlm_step.py`` and ``benchmarks/appex_iteration.py`` break the two down.
3. sweep: a Ray sweep (``smoke`` profile, ou/paired, seed 0) into a temporary run directory: two
   GPU jobs (wlm, nn_appex) and two CPU jobs beside them (static, harness.testing:EnvProbe).
   Every job must end ``ok``; each GPU job's row must say device ``cuda``, name the GPU
   (``hardware``) and show GPU memory used; each CPU job's row device ``cpu``, and the probe must
   have seen CUDA hidden (``CUDA_VISIBLE_DEVICES=""``).

``--device cpu`` runs the same code paths without a GPU, to check this script before a GPU
machine is available: the "GPU" side of the timings runs on the CPU (at tiny sizes), the CUDA
tests are selected but skip, and the sweep declares two fake GPUs to Ray, so its GPU jobs are
placed as GPU jobs and then run on the CPU (their rows say device cuda and hardware "GPU").
Nothing it prints is a GPU measurement; every line says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
BUDGET_S = {"tests": 120, "timing": 200, "sweep": 110}  # hard limits; with start-up < 8 minutes
PLUMBING_BUDGET_FACTOR = 3  # --device cpu may run on a small shared CPU
SIZES = (1000, 4000)
PLUMBING_SIZES = (48, 96)  # --device cpu: the code paths, not the costs
PLUMBING_APPEX = {"epochs": 2, "ipf_max_sweeps": 3, "n_paths": 100}
WLM_K = 3  # training marginals per rollout (the fit draws k from 1..K; benchmarks/wlm_step.py's k)
APPEX_EPOCHS = 50  # of the paper's 500 (the drift fit's cost is linear in epochs)
APPEX_MAX_SWEEPS = 20  # of the paper's at most 200
REPEATS = 3  # timed repeats after one warm-up, while a measurement has used < REPEAT_UNTIL_S
REPEAT_UNTIL_S = 20.0
SWEEP_TASK = "ou/paired"
SWEEP_GPU_METHODS = ("wlm", "nn_appex")
SWEEP_CPU_METHODS = ("static", "harness.testing:EnvProbe")
PARTS = ("tests", "timing", "sweep")
TAG = "@gpu_check "  # a child's result lines on its stdout start with this


# ---------------------------------------------------------------------------------------------
# Is there a GPU?
# ---------------------------------------------------------------------------------------------
def cuda_device() -> tuple[str | None, str]:
    """(the GPU's name, "") when torch sees a CUDA device, else (None, why not)."""
    import importlib.util
    import warnings

    if importlib.util.find_spec("torch") is None:
        return None, "torch is not installed"
    with warnings.catch_warnings():  # a CUDA build without a driver warns on the question
        warnings.simplefilter("ignore")
        import torch

        if not torch.cuda.is_available():
            if torch.version.cuda is None:
                return None, f"torch {torch.__version__} is a CPU-only build"
            return None, f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, sees no device"
        return torch.cuda.get_device_name(0), ""


# ---------------------------------------------------------------------------------------------
# Running a part: a child process group with a deadline
# ---------------------------------------------------------------------------------------------
class Child:
    """A command in its own process group, its output in ``log_dir/name.out`` / ``.err``."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def wait(self, deadline: float) -> int | None:
        """The exit status, or None when the deadline came first. Either way nothing it started
        is left running."""
        try:
            rc = self.proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            rc = None
        self.kill()
        return rc

    def kill(self) -> None:
        """SIGKILL its process group and every process it started (Ray's workers lead their own)."""
        for _ in range(50):
            pids = _descendants(self.proc.pid)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if not pids:
                break
            time.sleep(0.1)
        self.proc.wait()

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def results(self) -> list[dict]:
        return [json.loads(line[len(TAG):]) for line in self.stdout().splitlines() if line.startswith(TAG)]

    def last_words(self) -> str:
        """The last non-empty line of its stderr (a traceback's last line), else of its stdout."""
        for text in (self.err_path.read_text(errors="replace"), self.stdout()):
            lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(TAG)]
            if lines:
                return lines[-1][:300]
        return "no output"


def _descendants(root: int) -> set[int]:
    """The live processes started by ``root`` (and it), from Linux's /proc; empty elsewhere."""
    parent = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            continue
        if fields[0] != "Z":
            parent[int(entry)] = int(fields[1])
    found = {root} if root in parent else set()
    grown = True
    while grown:
        more = {pid for pid, ppid in parent.items() if ppid in found} - found
        found |= more
        grown = bool(more)
    return found


def _emit(**result) -> None:
    print(TAG + json.dumps(result), flush=True)


def _self_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


# ---------------------------------------------------------------------------------------------
# Part 1: the CUDA-parametrised tests
# ---------------------------------------------------------------------------------------------
def cuda_test_files() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py")) if "cuda" in p.read_text()]


def part_tests(plumbing: bool, log_dir: Path) -> dict:
    files = cuda_test_files()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda", *files]
    child = Child("tests", cmd, log_dir)
    rc = child.wait(time.time() + BUDGET_S["tests"])
    lines = child.stdout().splitlines()
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "deselected")}
    for num, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1] if lines else ""):
        counts["error" if what.startswith("error") else what] += int(num)
    failed = [ln.split(" ", 1)[1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    cuda_skips = [ln for ln in lines if ln.startswith("SKIPPED") and "CUDA" in ln]
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v and k != "deselected") or "no test selected"
    if rc is None:
        return {"ok": False, "detail": f"stopped at its {BUDGET_S['tests']} s limit ({summary} so far)"}
    if plumbing:  # on the CPU the CUDA tests skip: the plumbing is that they were found and ran
        ok = rc == 0 and counts["passed"] + counts["skipped"] > 0
        detail = f"plumbing: {summary} in {', '.join(files)}"
        return {"ok": ok, "detail": detail if ok else f"{detail}; {child.last_words()}"}
    ok = rc == 0 and counts["passed"] > 0 and not cuda_skips
    detail = f"{summary} ({', '.join(files)})"
    if failed:
        detail += "; failed: " + "; ".join(failed[:4])
    elif cuda_skips:
        detail += "; CUDA tests skipped: " + cuda_skips[0][:150]
    elif not ok:
        detail += f"; pytest exit {rc}: {child.last_words()}"
    return {"ok": ok, "detail": detail}


# ---------------------------------------------------------------------------------------------
# Part 2: timings, one child per device
# ---------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _repeat(fn, device: str) -> dict:
    """Seconds of ``fn()``: the minimum over up to REPEATS timed calls after one warm-up, while
    the measurement has used less than REPEAT_UNTIL_S; a single call when the first was that long."""
    times: list[float] = []
    t_begin = time.perf_counter()
    while len(times) < 1 + REPEATS:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_begin + times[-1] > REPEAT_UNTIL_S:
            break
    if len(times) == 1:
        return {"seconds": times[0], "note": "1 call, no warm-up"}
    return {"seconds": min(times[1:]), "note": f"min of {len(times) - 1} after a warm-up"}


def time_wlm_iteration(n: int, device: str, plumbing: bool = False) -> dict:
    """One WLM training iteration (rollout with graph over WLM_K marginals, Sinkhorn losses,
    backward, AdamW step): the path ``WLM.fit`` takes with the paper's GF-SDE settings."""
    import numpy as np
    import torch
    from appex_iteration import simulated_data  # benchmarks/ (this script's folder)

    from methods.wlm import HPARAMS, _build_potential, estimate_blur, sinkhorn_loss, train_iteration

    hp = dict(HPARAMS["paper"]["gf_sde"])
    xs_np = [m.x for m in simulated_data(n=n, n_marginals=WLM_K + 1, seed=0).marginals]
    dev = torch.device(device)
    xs = [torch.tensor(x, dtype=torch.float32, device=dev) for x in xs_np]
    v0 = torch.zeros_like(xs[0])  # v0 = "zero" on GF-SDE
    torch.manual_seed(0)
    pot = _build_potential(2, hp).to(dev)
    pot.set_attention(hp["attention"])
    pot.train()
    theta = torch.tensor(float(np.log(hp["friction"])), device=dev, requires_grad=True)
    opt = torch.optim.AdamW([{"params": list(pot.parameters()), "lr": hp["lr"], "weight_decay": hp["weight_decay"]},
                             {"params": [theta], "lr": hp["friction_lr"], "weight_decay": 0.0}])
    loss_fn = sinkhorn_loss(hp["sinkhorn_p"], estimate_blur(xs_np, 0), fast=hp["attention"] == "fast")
    schedule = [(0.01, 1)] * WLM_K  # the GF-SDE grid: dt = 0.01, one step per interval

    def one():
        return train_iteration(pot, opt, loss_fn, xs[0], v0, xs[1:], 0.0, schedule, torch.exp(theta),
                               gradient=hp["force_gradient"])

    out = _repeat(one, device)
    out["note"] += f", {WLM_K} rollout steps"
    return out


def time_appex_outer_iteration(n: int, device: str, plumbing: bool = False) -> dict:
    """One nn-APPEX outer iteration (E-step IPF, path sampling, drift fit, sigma^2 update) with the
    paper's settings, its drift fit cut to APPEX_EPOCHS epochs and its IPF to APPEX_MAX_SWEEPS sweeps."""
    from appex_iteration import simulated_data

    from methods.nn_appex import NNAPPEX

    data = simulated_data(n=n, n_marginals=10, seed=0)
    hp = NNAPPEX.default_hparams("gf_sde/quadratic-unpaired", "paper")
    hp.update(n_outer=1, epochs=APPEX_EPOCHS, ipf_max_sweeps=APPEX_MAX_SWEEPS)
    if plumbing:
        hp.update(PLUMBING_APPEX)
    if device == "cuda":  # warm-up: kernels, cuBLAS and the allocator, on the same shapes
        NNAPPEX(dict(hp, epochs=1, ipf_max_sweeps=1), seed=0, device=device).fit(data)
    _sync(device)
    m = NNAPPEX(hp, seed=0, device=device)
    m.fit(data)
    _sync(device)
    learned = m.learned()
    per = {k: v[0] for k, v in learned["seconds_per_iter"].items()}
    return {"seconds": sum(per.values()),
            "note": (f"E-step {per['estep_ipf']:.2f} s ({learned['ipf_sweeps_per_iter'][0]} sweeps), "
                     f"drift fit {per['drift_fit']:.2f} s ({hp['epochs']} epochs)")}


MEASUREMENTS = {"wlm iteration": time_wlm_iteration, "nn_appex outer iteration": time_appex_outer_iteration}


def child_timing(device: str, sizes: list[int], plumbing: bool) -> int:
    """Child process: every measurement on one device, in order of cost; one result line each."""
    import torch

    from harness.runner import keep_freed_memory

    keep_freed_memory()  # as every harness job
    torch.set_num_threads(1)  # one CPU thread, as every harness job (GPU jobs too)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the GPU side sees no CUDA device")
    for n in sizes:
        for what, fn in MEASUREMENTS.items():
            _emit(kind="start", key=f"{what} N={n}", t=time.time())
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            result = fn(n, device, plumbing)
            if device == "cuda" and torch.cuda.max_memory_allocated() == 0:
                raise SystemExit(f"{what} N={n} allocated nothing on the GPU: it ran on the CPU")
            _emit(kind="done", key=f"{what} N={n}", **result)
    return 0


def part_timing(plumbing: bool, log_dir: Path) -> tuple[dict, list[list[str]]]:
    sizes = ",".join(map(str, PLUMBING_SIZES if plumbing else SIZES))
    gpu_side = "cpu" if plumbing else "cuda"
    deadline = time.time() + BUDGET_S["timing"]
    extra = ["--device", "cpu"] if plumbing else []
    gpu = Child("timing_gpu", _self_cmd("--child", "timing", "--on", gpu_side, "--sizes", sizes, *extra), log_dir)
    cpu = Child("timing_cpu", _self_cmd("--child", "timing", "--on", "cpu", "--sizes", sizes, *extra), log_dir,
                env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                     "CUDA_VISIBLE_DEVICES": ""})
    rc = {side: child.wait(deadline) for side, child in (("gpu", gpu), ("cpu", cpu))}
    stopped = time.time()
    got = {}
    for side, child in (("gpu", gpu), ("cpu", cpu)):
        for r in child.results():
            if r["kind"] == "start":  # still running at the limit: a lower bound
                got[side, r["key"]] = {"seconds": stopped - r["t"], "lower_bound": True, "note": "at the time limit"}
            else:
                got[side, r["key"]] = r
    keys = [f"{what} N={n}" for n in sizes.split(",") for what in MEASUREMENTS]
    table = []
    for key in keys:
        g, c = got.get(("gpu", key)), got.get(("cpu", key))

        def cell(r):
            if r is None:
                return "not reached"
            return (">" if r.get("lower_bound") else "") + f"{r['seconds']:.3f} s"

        ratio = "-"
        if g and c and not g.get("lower_bound"):
            ratio = (">" if c.get("lower_bound") else "") + f"{c['seconds'] / g['seconds']:.1f}x"
        table.append([key, cell(g), cell(c), ratio, (g or {}).get("note", "")])
    gpu_done = sum(1 for k in keys if ("gpu", k) in got and not got["gpu", k].get("lower_bound"))
    problems = []
    for side, child in (("gpu", gpu), ("cpu", cpu)):
        if rc[side] not in (0, None):
            problems.append(f"the {side} side failed: {child.last_words()}")
    ok = gpu_done == len(keys) and not problems
    detail = f"{gpu_done} of {len(keys)} measured on the {'GPU' if not plumbing else 'plumbing GPU side (the CPU)'}"
    if rc["cpu"] is None:
        detail += "; the CPU side reached its time limit (ratios marked > are lower bounds)"
    if problems:
        detail += "; " + "; ".join(problems)
    if plumbing:
        detail = "plumbing: " + detail
    return {"ok": ok, "detail": detail}, table


# ---------------------------------------------------------------------------------------------
# Part 3: a Ray sweep with GPU placement
# ---------------------------------------------------------------------------------------------
def child_sweep(out: str, gpus: int, gpu_name: str, plumbing: bool) -> int:
    """Child process: the sweep, then one result line with the rows' checks."""
    try:
        import ray  # noqa: F401
    except ImportError:
        _emit(ok=False, detail="Ray is not installed here (pip install ray, or bring it as a wheel)")
        return 0
    from harness.store import RunStore
    from harness.sweep import plan_jobs, run_plan

    plan = plan_jobs(SWEEP_TASK, ",".join(SWEEP_GPU_METHODS + SWEEP_CPU_METHODS), "smoke", [0])
    workers = len(plan.jobs)
    # a new local cluster (never one found on the machine), with the GPUs declared
    latest = run_plan(plan, RunStore(out), executor="ray", workers=workers, progress=False,
                      ray_init={"address": "local", "num_gpus": gpus})
    problems, shown = [], []
    for job in plan.jobs:
        row = latest.get(job.job_id)
        if row is None:
            problems.append(f"{job.method}: no row")
            continue
        where = f"{row.get('device')} / {row.get('hardware')}"
        if row.get("status") != "ok":
            problems.append(f"{job.method}: {row.get('status')} ({(row.get('error') or '')[:120]})")
        if job.method in SWEEP_GPU_METHODS:
            mem = row.get("peak_gpu_mem_mb")
            if row.get("device") != "cuda" or row.get("hardware") != gpu_name:
                problems.append(f"{job.method} ran on {where}, not cuda / {gpu_name}")
            if not plumbing and not (mem and mem > 0):
                problems.append(f"{job.method} used no GPU memory (peak_gpu_mem_mb = {mem})")
            shown.append(f"{job.method} on {where}" + (f" ({mem:.0f} MB peak)" if mem else ""))
        else:
            if row.get("device") != "cpu" or not str(row.get("hardware", "")).endswith("CPU"):
                problems.append(f"{job.method} ran on {where}, not on the CPU")
            hidden = (row.get("learned") or {}).get("CUDA_VISIBLE_DEVICES", "")
            if hidden != "":
                problems.append(f"{job.method} saw CUDA_VISIBLE_DEVICES={hidden!r} (CUDA not hidden)")
            shown.append(f"{job.method.rpartition(':')[2]} on {where}")
    detail = "; ".join(problems) if problems else f"{len(plan.jobs)} jobs ok: " + ", ".join(shown)
    _emit(ok=not problems, detail=("plumbing: " if plumbing else "") + detail)
    return 0


def part_sweep(plumbing: bool, log_dir: Path, gpus: int, gpu_name: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_check_run_") as out:
        args = ["--child", "sweep", "--out", out, "--gpus", str(gpus), "--gpu-name", gpu_name]
        child = Child("sweep", _self_cmd(*args, *(["--device", "cpu"] if plumbing else [])), log_dir)
        rc = child.wait(time.time() + BUDGET_S["sweep"])
        results = child.results()
    if rc is None:
        return {"ok": False, "detail": f"stopped at its {BUDGET_S['sweep']} s limit: {child.last_words()}"}
    if rc != 0 or not results:
        return {"ok": False, "detail": f"exit {rc}: {child.last_words()}"}
    return results[-1]


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def _table(rows: list[list[str]], header: list[str]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=header, tablefmt="github")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list of: " + ", ".join(PARTS))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu"),
                    help="cpu: a plumbing check of this script on the CPU (no GPU measurement)")
    ap.add_argument("--log-dir", help="keep each part's output here (default: a temporary folder, removed)")
    # internal: the parts' child processes
    ap.add_argument("--child", choices=("timing", "sweep"), help=argparse.SUPPRESS)
    ap.add_argument("--on", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--gpus", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--gpu-name", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    plumbing = args.device == "cpu"
    if args.child == "timing":
        return child_timing(args.on, [int(s) for s in args.sizes.split(",")], plumbing)
    if args.child == "sweep":
        return child_sweep(args.out, args.gpus, args.gpu_name, plumbing)

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.exit(2, f"gpu_check: unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}\n")
    if plumbing:
        gpu_name, gpus = "GPU", 2  # what a fake GPU's job row says
        for part in BUDGET_S:
            BUDGET_S[part] *= PLUMBING_BUDGET_FACTOR
        print("gpu_check --device cpu: PLUMBING CHECK ON THE CPU. No GPU is used and no number below "
              "is a GPU measurement.", flush=True)
    else:
        gpu_name, why = cuda_device()
        if gpu_name is None:
            print(f"gpu_check: no CUDA device visible ({why}); nothing to check.")
            return 0
        import torch

        gpus = torch.cuda.device_count()
        print(f"gpu_check: {gpus} x {gpu_name}, torch {torch.__version__} (CUDA {torch.version.cuda}); "
              f"parts {', '.join(parts)}, at most {sum(BUDGET_S[p] for p in parts)} s", flush=True)

    keep = args.log_dir is not None
    log_dir = Path(args.log_dir) if keep else Path(tempfile.mkdtemp(prefix="gpu_check_logs_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    summary = []
    for part in parts:
        t0 = time.time()
        try:
            if part == "tests":
                result = part_tests(plumbing, log_dir)
            elif part == "timing":
                result, table = part_timing(plumbing, log_dir)
                print("\n" + ("PLUMBING (the GPU column ran on the CPU)\n" if plumbing else "")
                      + _table(table, ["measurement", "GPU", "1 CPU thread", "CPU / GPU", "GPU note"]), flush=True)
            else:
                result = part_sweep(plumbing, log_dir, gpus, gpu_name)
        except Exception as exc:  # noqa: BLE001 - a part's failure is a row of the table
            result = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}
        summary.append([part, "PASS" if result["ok"] else "FAIL", f"{time.time() - t0:.0f}", result["detail"]])
        print(f"{part}: {summary[-1][1]} ({summary[-1][2]} s)", flush=True)
    print("\n" + _table(summary, ["part", "result", "seconds", "detail"]))
    if keep:
        print(f"each part's output: {log_dir}/")
    else:
        import shutil

        shutil.rmtree(log_dir, ignore_errors=True)
    ok = all(row[1] == "PASS" for row in summary)
    print(("plumbing check: " if plumbing else "gpu_check: ") + ("all parts passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
