"""Training-step throughput of the JAX methods (JKOnet*, JKOnet*-t, iJKOnet), and proof that the
jitted training function compiles once per job, not once per step.

    python benchmarks/jax_steps.py                    # gf_sde-sized problem (10 marginals x 1000, 2-D)
    python benchmarks/jax_steps.py --marginals 50     # boids-sized
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c 0 \
        python benchmarks/jax_steps.py                # one CPU thread

For each method it builds the same training function that ``fit`` uses, times the first call
(trace + compile + one epoch), then ``--epochs`` further epochs (steps per second after warm-up),
and reports how many XLA compilations of the epoch function happened (1 = compiled once),
and how long a second job of the same shapes waits before its first epoch (cache hit).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np


_COMPILES: dict[str, int] = {}


def _count_compiles() -> None:
    """Count XLA compilations per function name from JAX's compile log."""
    import logging

    import jax

    jax.config.update("jax_log_compiles", True)

    class _Counter(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("Finished XLA compilation of jit("):
                fn = msg[len("Finished XLA compilation of jit(") :].split(")", 1)[0]
                _COMPILES[fn] = _COMPILES.get(fn, 0) + 1

    logger = logging.getLogger("jax")
    logger.addHandler(_Counter())
    logger.propagate = False  # keep the log lines themselves off the terminal


def _bench(name, first_call, call, steps_per_epoch, epochs, jitted):
    before = _COMPILES.get(jitted.__name__, 0)
    t = time.perf_counter()
    first_call()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(epochs):
        call()
    run_s = time.perf_counter() - t
    t = time.perf_counter()
    call()  # a "second job": same shapes, the cached executable
    second_s = time.perf_counter() - t
    steps = steps_per_epoch * epochs
    print(
        f"{name:16s} first call (compile + 1 epoch) {compile_s:6.2f} s | {steps / run_s:8.1f} steps/s "
        f"after warm-up ({steps} steps, {steps_per_epoch} per epoch, {run_s:.2f} s) | "
        f"XLA compilations: {_COMPILES.get(jitted.__name__, 0) - before} | next job's first epoch {second_s:.3f} s"
    )


def bench_jkonet_star(n_marg: int, n: int, dim: int, epochs: int, time_dep: bool) -> None:
    import jax

    from methods.jkonet_star import HPARAMS, init_mlp, train_fns

    hp = HPARAMS["paper"]["default"]
    rng = np.random.default_rng(0)
    rows = (n_marg - 1) * n
    bs = hp["batch_size"]
    nb = math.ceil(rows / bs)
    P = nb * bs
    arrays = {
        "x": rng.standard_normal((P, dim)).astype(np.float32),
        "y": rng.standard_normal((P, dim)).astype(np.float32),
        "score": rng.standard_normal((P, dim)).astype(np.float32),
        "tau": np.ones(P, np.float32),
        "tf": rng.uniform(size=(P, 1)).astype(np.float32),
        "w": np.ones(P, np.float32),
        "mask": (np.arange(P) < rows).astype(np.float32),
    }
    params = {"V": init_mlp(rng, [dim + int(time_dep), *hp["hidden"], 1]), "raw_theta3": np.float32(-4.0)}
    init_opt, run_epoch = train_fns(time_dep, not time_dep, hp["lr"], hp["clip_norm"])
    dev = jax.devices()[0]
    params = jax.device_put(params, dev)  # committed arguments, as in fit: one signature
    state = {"p": params, "s": jax.device_put(init_opt(params), dev)}
    arrays = jax.device_put(arrays, dev)

    def call():
        idx = jax.device_put(rng.permutation(P).reshape(nb, bs).astype(np.int32), dev)
        state["p"], state["s"], loss = run_epoch(state["p"], state["s"], idx, arrays)
        loss.block_until_ready()

    _bench("jkonet_star_t" if time_dep else "jkonet_star", call, call, nb, epochs, run_epoch)


def bench_ijkonet(n_marg: int, n: int, dim: int, epochs: int) -> None:
    import jax

    from methods.ijkonet import HPARAMS, train_fns
    from methods.jkonet_star import init_mlp

    hp = HPARAMS["paper"]["default"]
    rng = np.random.default_rng(0)
    d = {
        "X": rng.standard_normal((n_marg, n, dim)).astype(np.float32),
        "n": np.full(n_marg, n, np.int32),
        "tau": np.ones(n_marg - 1, np.float32),
        "tf": np.linspace(0, 1, n_marg - 1).astype(np.float32),
    }
    pV = {"V": init_mlp(rng, [dim, *hp["hidden"], 1])}
    pT = init_mlp(rng, [dim + 1, *hp["map_hidden"], dim])
    bs, inner = hp["batch_size"], hp["inner_steps"]
    init_opts, run_epoch = train_fns(False, hp["lr_energy"], hp["lr_map"], hp["clip_norm"], inner, bs)
    dev = jax.devices()[0]
    pV, pT, d = jax.device_put((pV, pT, d), dev)
    sV, sT = jax.device_put(init_opts(pV, pT), dev)
    n_outer = math.ceil(n / bs)
    keys = iter(jax.device_put(jax.random.split(jax.random.PRNGKey(0), 10_000), dev))
    state = {"a": (pV, pT, sV, sT)}

    def call():
        *a, vals = run_epoch(*state["a"], jax.device_put(next(keys), dev), d, n_outer)
        vals.block_until_ready()
        state["a"] = tuple(a)

    # one "step" = one network update (inner map steps + the energy step)
    _bench("ijkonet", call, call, n_outer * (inner + 1), epochs, run_epoch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--marginals", type=int, default=10)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--methods", default="jkonet_star,jkonet_star_t,ijkonet")
    args = ap.parse_args()
    import jax

    _count_compiles()
    print(f"JAX {jax.__version__} on {jax.devices()[0]}; {args.marginals} marginals x {args.n} points, d = {args.dim}")
    for m in args.methods.split(","):
        if m == "ijkonet":
            bench_ijkonet(args.marginals, args.n, args.dim, args.epochs)
        else:
            bench_jkonet_star(args.marginals, args.n, args.dim, args.epochs, m == "jkonet_star_t")


if __name__ == "__main__":
    main()
