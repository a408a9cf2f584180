"""Time one WLM training iteration (rollout with graph, k Sinkhorn losses, backward, AdamW step).

    python benchmarks/wlm_step.py                 # CPU, 1 thread, all three sizes; CUDA too if present
    python benchmarks/wlm_step.py --sizes 1000 --k 3 --repeats 3 --threads 1

Three configurations of the `paper` profile (methods/wlm.py):

- N = 111:  vortex/interpolation (hidden 256, 1 head, 4 blocks, ff 64, 16 time features;
            2 integrator steps per training interval because of the held-out gaps)
- N = 400:  vortex/forecast      (hidden 256, 1 head, 4 blocks, ff 64)
- N = 1000: gf_sde               (hidden 64, 4 heads, 4 blocks, ff 512)

For a fixed horizon k it prints seconds per *rollout step* (one integrator step = one force
evaluation with graph, plus its share of Sinkhorn and backward), as CPU time of this process
(`time.process_time`, what "CPU-s" means) and wall time, for three code paths measured in the same
run on the same weights and data:

- plain: what a straightforward implementation does: `nn.MultiheadAttention`'s default path
  (`need_weights=True`), geomloss's `SamplesLoss` as is, one more force evaluation after the
  last position (it only updates a velocity nobody reads), and the full gradient.
- full:  the path `WLM.fit` uses with ``force_gradient = "full"`` (row ``wlm_full_gradient``):
  packed projections; for head dimensions <= 32 an attention core with a hand-written (itself
  differentiable) backward whose second derivative makes fewer passes over the N x N matrices
  (the fused SDPA kernel has no double backward); geomloss's own Sinkhorn algorithm with its
  no-grad soft-min evaluated in one reused buffer and in base 2; no wasted force evaluation;
  gradients requested for the parameters only.
- detached: the same path with ``force_gradient = "detached"`` (the default, row ``wlm``): every
  force sees detached positions, so the backward pass never runs through the positions.

The ratios printed are plain / full (what the fast path saves) and full / detached (what the
full gradient costs over the reference code's truncated one).

Like every harness job (``harness.runner.keep_freed_memory``), both paths run with glibc keeping
freed memory for reuse; ``--no-keep-freed-memory`` measures them with glibc's defaults, under which
fresh N x N buffers page-fault (the "sys" column: kernel CPU-s per step, included in CPU-s).

plain and full compute the same loss and gradients up to float rounding (tests/test_wlm.py checks
it in float64); all three compute the same loss (the gradients differ between full and
detached); the script prints the loss of each so a reader can see they agree. Timings are
the minimum over the repeats (the least disturbed by other processes on a shared machine).

Data: the real vortex files when ``POPBENCH_DATA_DIR`` has them, else
Gaussian clouds of similar scale; the N = 1000 case uses exact OU marginals relaxing like the
GF-SDE data (N(0, 0.2 I) under V = 5|x|^2, sigma^2 = 1).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.runner import keep_freed_memory  # noqa: E402
from methods.wlm import HPARAMS, _build_potential, estimate_blur, sinkhorn_loss, train_iteration  # noqa: E402

CONFIGS = {
    111: ("vortex/interpolation", "oceans_with_v0.npz", [0, 2, 4, 6, 8]),
    400: ("vortex/forecast", "big_oceans_forecast.npz", list(range(10))),
    1000: ("gf_sde", None, list(range(10))),
}


def _data_dir() -> Path | None:
    for cand in (os.environ.get("POPBENCH_DATA_DIR"), str(ROOT.parent / "shared" / "data")):
        if cand and (Path(cand) / "ocean").is_dir():
            return Path(cand)
    return None


def load_marginals(n: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, list[int], str]:
    """Training marginals (positions), start velocities, grid steps per interval, and a label."""
    task, fname, idx = CONFIGS[n]
    rng = np.random.default_rng(seed)
    ddir = _data_dir()
    if fname and ddir and (ddir / "ocean" / fname).exists():
        z = np.load(ddir / "ocean" / fname)
        xs = [z["positions"][i] for i in idx]
        v0 = z["velocities"][idx[0]]
        return xs, v0, list(np.diff(idx)), f"{task} (real data)"
    if fname:  # vortex-like stand-in: a small cloud translating by ~1 per index step
        base = 0.03 * rng.standard_normal((n, 2))
        xs = [base + np.array([i * 1.0, 0.2 * i]) + 0.003 * rng.standard_normal((n, 2)) for i in idx]
        return xs, np.tile([1.0, 0.2], (n, 1)), list(np.diff(idx)), f"{task} (synthetic stand-in)"
    # GF-SDE-like: N(0, 0.2 I) relaxing under V = 5|x|^2 with sigma^2 = 1 (exact OU marginals)
    t = 0.01 * np.arange(10)
    var = 0.2 * np.exp(-20 * t) + (1 - np.exp(-20 * t)) / 20
    xs = [np.sqrt(v) * rng.standard_normal((n, 2)) for v in var]
    return xs, np.zeros((n, 2)), [1] * 9, f"{task} (synthetic OU marginals)"


def bench(n: int, k: int, repeats: int, device: str, seed: int = 0) -> dict:
    import torch

    task, _, _ = CONFIGS[n]
    hp = dict(HPARAMS["paper"][task] if task in HPARAMS["paper"] else HPARAMS["paper"]["gf_sde"])
    xs_np, v0_np, counts, label = load_marginals(n, seed)
    k = min(k, len(xs_np) - 1)
    dev = torch.device(device)
    xs = [torch.tensor(x, dtype=torch.float32, device=dev) for x in xs_np]
    v0 = torch.tensor(v0_np, dtype=torch.float32, device=dev)
    blur = estimate_blur(xs_np, seed)
    # (dt, steps) per training interval: index time unit (dt = 1) for the vortex, 0.01 for GF-SDE
    sched = [(1.0 if task != "gf_sde" else 0.01, c) for c in counts][:k]
    steps = sum(c for _, c in sched)
    torch.manual_seed(seed)
    base = _build_potential(2, hp).to(dev)
    gamma0 = float(hp["friction"])

    out = {"n": n, "task": task, "data": label, "k": k, "steps": steps, "blur": blur}
    for path in ("plain", "full", "detached"):
        pot = copy.deepcopy(base)
        pot.set_attention("plain" if path == "plain" else "fast")
        pot.train()
        theta = torch.tensor(np.log(gamma0), device=dev, requires_grad=True)
        opt = torch.optim.AdamW([{"params": list(pot.parameters()), "lr": hp["lr"]},
                                 {"params": [theta], "lr": hp["friction_lr"], "weight_decay": 0.0}])
        loss_fn = sinkhorn_loss(hp["sinkhorn_p"], blur, fast=(path != "plain"))
        kw = dict(final_force=(path == "plain"), params_only=(path != "plain"),
                  gradient="detached" if path == "detached" else "full")

        def one():
            return train_iteration(pot, opt, loss_fn, xs[0], v0, xs[1:k + 1], 0.0, sched,
                                   torch.exp(theta), **kw)

        first_loss = one()  # warm-up (allocator, first-call overheads); same weights for both
        cpus, walls, syss = [], [], []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            cpu0, wall0, sys0 = time.process_time(), time.perf_counter(), os.times().system
            one()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            cpus.append(time.process_time() - cpu0)
            walls.append(time.perf_counter() - wall0)
            syss.append(os.times().system - sys0)
        # the minimum over repeats: the least disturbed by other processes on a shared machine
        cpu, wall = min(cpus), min(walls)
        out[path] = {"cpu_s_per_step": cpu / steps, "wall_s_per_step": wall / steps,
                     "sys_s_per_step": float(np.median(syss)) / steps, "cpu_s_per_iter": cpu,
                     "first_loss": first_loss}
    out["speedup_cpu"] = out["plain"]["cpu_s_per_step"] / out["full"]["cpu_s_per_step"]
    out["full_over_detached"] = out["full"]["cpu_s_per_step"] / out["detached"]["cpu_s_per_step"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="111,400,1000")
    ap.add_argument("--k", type=int, default=3, help="training marginals per rollout (fixed)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--no-keep-freed-memory", action="store_true",
                    help="glibc's default allocator settings instead of the harness's (see module doc)")
    args = ap.parse_args(argv)
    kept = False if args.no_keep_freed_memory else keep_freed_memory()
    import torch

    torch.set_num_threads(args.threads)
    devices = ["cpu"] if args.device in ("auto", "cpu") else []
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append("cuda")
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), k = {args.k}, "
          f"{args.repeats} timed iterations after 1 warm-up (minimum reported), "
          f"freed memory {'kept' if kept else 'returned (glibc defaults)'}")
    print("CPU-s per rollout step (wall-s in brackets); sys = kernel CPU-s per step")
    header = (f"{'device':6} {'N':>5} {'config':22} {'steps':>5} {'plain':>15} {'full':>15} "
              f"{'detached':>15} {'plain/full':>10} {'full/detached':>13} "
              f"{'sys p/f/d':>17} {'loss plain / full / detached':>32}")
    print(header)
    for dev in devices:
        for n in [int(s) for s in args.sizes.split(",")]:
            r = bench(n, args.k, args.repeats, dev)
            cells = [f"{r[p]['cpu_s_per_step']:.3f} ({r[p]['wall_s_per_step']:.3f})"
                     for p in ("plain", "full", "detached")]
            sys_ = "/".join(f"{r[p]['sys_s_per_step']:.3f}" for p in ("plain", "full", "detached"))
            losses = " / ".join(f"{r[p]['first_loss']:.6f}" for p in ("plain", "full", "detached"))
            print(f"{dev:6} {n:5d} {r['task']:22} {r['steps']:5d} {cells[0]:>15} {cells[1]:>15} "
                  f"{cells[2]:>15} {r['speedup_cpu']:9.2f}x {r['full_over_detached']:12.2f}x "
                  f"{sys_:>17} {losses:>32}   [{r['data']}]", flush=True)


if __name__ == "__main__":
    main()
