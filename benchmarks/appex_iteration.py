"""Time one nn-APPEX outer iteration per phase (E-step IPF, path sampling, drift fit, σ² update).

Data: N = 1000 particles at 10 training marginals, the ``gf_sde/quadratic-unpaired`` training
data when ``tasks/gf_sde.py`` is importable, otherwise the same process simulated here
(``V = 5‖x‖²``, σ² = 1, p0 = N(0, 0.2 I), t_k = 0.01 k, an independent draw per marginal; the
Ornstein-Uhlenbeck transition is exact, so no discretisation is involved).

By default it runs two outer iterations with the ``paper`` settings: the first starts cold
(σ² = 1, zero drift, zero dual potentials), the second shows the warm-started IPF. The last line
compares the drift fit with its floor measured in the same run: the time of its width × width
matrix products alone (six per hidden-to-hidden layer and step). Examples:

    python benchmarks/appex_iteration.py                       # paper settings, 1 thread
    python benchmarks/appex_iteration.py --profile quick
    python benchmarks/appex_iteration.py --set epochs=100 --set ipf_scheme=alternating
    python benchmarks/appex_iteration.py --device cuda --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.protocol import Marginal, TrainData  # noqa: E402


def simulated_data(n: int = 1000, n_marginals: int = 10, seed: int = 0) -> TrainData:
    """Unpaired OU marginals dX = −10 X dt + dW, X_0 ~ N(0, 0.2 I), t_k = 0.01 k (exact law)."""
    rng = np.random.default_rng(seed)
    ms = []
    for k in range(n_marginals):
        t = 0.01 * k
        var = 0.2 * np.exp(-20 * t) + (1 - np.exp(-20 * t)) / 20
        ms.append(Marginal(t, np.sqrt(var) * rng.standard_normal((n, 2)), index=k))
    return TrainData(tuple(ms), family="gf_sde", variant="quadratic-unpaired")


def load_data(seed: int) -> tuple[TrainData, str]:
    try:
        from tasks.gf_sde import GFSDE
    except ImportError:
        return simulated_data(seed=seed), "simulated OU (tasks/gf_sde.py not found)"
    return GFSDE("quadratic-unpaired", seed=seed).train_data(), "gf_sde/quadratic-unpaired"


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="paper", choices=("smoke", "quick", "paper"))
    ap.add_argument("--outer", type=int, default=2, help="outer iterations to time (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from methods.nn_appex import NNAPPEX

    data, source = load_data(args.seed)
    hp = NNAPPEX.default_hparams("gf_sde/quadratic-unpaired", args.profile)
    hp["n_outer"] = args.outer
    for item in args.set:
        key, _, val = item.partition("=")
        if key not in hp:
            ap.error(f"unknown setting {key!r}; settings: {', '.join(hp)}")
        hp[key] = parse_value(val)

    n_inc = hp["n_paths"] * (len(data.marginals) - 1)
    steps = hp["epochs"] * -(-n_inc // hp["batch_size"])
    print(f"data: {source}; N = {data.marginals[0].n}, {len(data.marginals)} marginals, d = {data.dim}")
    print(
        f"profile {args.profile}, device {args.device}, torch threads {args.threads}; "
        f"IPF {hp['ipf_scheme']} (damping {hp['ipf_damping']}, <= {hp['ipf_max_sweeps']} sweeps, tol {hp['ipf_tol']}), "
        f"{hp['n_paths']} paths, drift fit {hp['epochs']} epochs x {-(-n_inc // hp['batch_size'])} batches "
        f"= {steps} Adam steps"
    )
    m = NNAPPEX(hp, seed=args.seed, device=args.device)
    t0 = time.perf_counter()
    m.fit(data)
    wall = time.perf_counter() - t0
    L = m.learned()
    per = L["seconds_per_iter"]
    phases = ("estep_ipf", "path_sampling", "drift_fit", "sigma2_update")
    heads = ("iter", "E-step IPF", "sweeps", "max err", "paths", "drift fit", "sigma2", "total")
    widths = (4, 11, 6, 9, 7, 10, 7, 7)
    print(" ".join(f"{h:>{w}}" for h, w in zip(heads, widths)) + "  sigma2_hat")
    for i in range(args.outer):
        vals = [per[p][i] for p in phases]
        print(
            f"{i + 1:>4} {vals[0]:>10.2f}s {L['ipf_sweeps_per_iter'][i]:>6d} {L['ipf_err_per_iter'][i]:>9.1e} "
            f"{vals[1]:>6.2f}s {vals[2]:>9.2f}s {vals[3]:>6.3f}s {sum(vals):>6.2f}s  {L['sigma2_per_iter'][i]:.4f}"
        )
    print(f"fit wall time {wall:.1f} s for {args.outer} outer iterations")
    # the drift fit against its arithmetic floor, measured now on this machine: each hidden-to-hidden
    # layer costs six (batch x width) @ (width x width) products per step (forward, the ∇φ pass, and
    # four in their reverse); nothing else in the step is that large
    floor = gemm_floor_s(int(hp["batch_size"]), int(hp["width"]), int(hp["depth"]), args.device) * steps
    fit = sum(per["drift_fit"]) / args.outer
    print(f"drift fit {fit:.1f} s per outer iteration = {fit / floor:.2f} x the floor of its "
          f"{6 * (int(hp['depth']) - 1)} width x width matrix products per step ({floor:.1f} s for {steps} steps, "
          f"{1e3 * floor / steps:.2f} ms per step)")


def gemm_floor_s(batch: int, width: int, depth: int, device: str, reps: int = 300) -> float:
    """Seconds per drift-fit step spent in its (batch, width) @ (width, width) products alone
    (float32, best of three timings of ``reps`` products), the part no implementation can avoid."""
    import torch

    a = torch.randn(batch, width, device=device)
    w = torch.randn(width, width, device=device)
    out = torch.empty(batch, width, device=device)
    best = float("inf")
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, w, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 6 * (depth - 1) * best


if __name__ == "__main__":
    main()
