#!/usr/bin/env python
"""Is tuning worth it on convolutions? graphopt's default conv schedule vs MetaSchedule, kernel by kernel.

For each of ResNet-18's 3x3 conv shapes (NHWC, batch 1, weights packed as
the CPU target packs them, bias + ReLU fused) the script builds the same TE
conv graphopt lowers, schedules it

- with graphopt's default rule (``targets.schedules.conv.WindowReduction``), and
- with MetaSchedule (``tune_tir``: evolutionary search, xgboost cost model,
  ``--trials`` measured candidates, the same runner settings as ``lower --tune``),

then times both kernels in this process, alternately, ``--rounds`` rounds of
20 calls each, and prints the minimum of each (the machine is shared: the
minimum is the least disturbed figure), GFLOP/s, the ratio tuned / default
and the tuning time. Warm caches: weights and inputs stay resident between
calls, as they do not in a whole network.

Usage::

    python benchmarks/bench_tune_conv.py                    # 3 shapes, 64 trials each
    python benchmarks/bench_tune_conv.py --shapes 56x64,7x512 --trials 128 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: ResNet-18's 3x3 stride-1 convs: spatial size x channels (in = out).
SHAPES = {"56x64": (56, 64), "28x128": (28, 128), "14x256": (14, 256), "7x512": (7, 512)}


def conv_func(hw: int, c: int, tile: int):
    """NHWC 3x3/1 conv, pad 1, packed weights ``[C/t, 3, 3, C, t]``, + bias, ReLU (what the CPU target lowers)."""
    from tvm import te, topi

    data = te.placeholder((1, hw, hw, c), name="data")
    wp = te.placeholder((c // tile, 3, 3, c, tile), name="wp")
    bias = te.placeholder((c,), name="bias")
    padded = topi.nn.pad(data, [0, 1, 1, 0], [0, 1, 1, 0], name="pad_temp")
    ry, rx, rc = te.reduce_axis((0, 3), "ry"), te.reduce_axis((0, 3), "rx"), te.reduce_axis((0, c), "rc")
    conv = te.compute((1, hw, hw, c), lambda b, y, x, f: te.sum(
        padded[b, y + ry, x + rx, rc] * wp[f // tile, ry, rx, rc, f % tile], axis=[ry, rx, rc]), name="conv")
    out = te.compute(conv.shape, lambda b, y, x, f: te.max(conv[b, y, x, f] + bias[f], 0.0), name="out")
    return te.create_prim_func([data, wp, bias, out]).with_attr("global_symbol", "main")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="56x64,14x256,7x512", help=f"comma-separated subset of {','.join(SHAPES)}")
    ap.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per kernel (default 64)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both (default: every core)")
    ap.add_argument("--rounds", type=int, default=15, help="timing rounds of 20 calls, alternating (default 15)")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(REPO))

    import tvm
    from tvm.s_tir import meta_schedule as ms

    from targets.cpu import host_cpu, llvm_target
    from targets.schedules.common import vector_lanes
    from targets.schedules.conv import WindowReduction, _pick_vector_tile

    target = llvm_target(host_cpu(), args.threads)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    print(f"CPU {host_cpu()}, {args.threads} thread(s), MetaSchedule {args.trials} trials per kernel")
    print("| conv | default ms | GFLOP/s | tuned ms | GFLOP/s | tuned / default | tuning s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        hw, c = SHAPES[name]
        tile = _pick_vector_tile(c, vector_lanes(target, 32))
        func = conv_func(hw, c, tile)
        mod = tvm.IRModule({"main": func})
        with target:
            default = WindowReduction().apply(func, target, False)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as wd:
            db = ms.tir_integration.tune_tir(mod, target, wd, max_trials_global=args.trials,
                                             num_trials_per_iter=min(32, args.trials))
            tuned = ms.tir_integration.compile_tir(db, mod, target)
        tune_s = time.perf_counter() - t0
        feed = [rng.standard_normal((1, hw, hw, c)).astype("float32"),
                rng.standard_normal((c // tile, 3, 3, c, tile)).astype("float32"),
                rng.standard_normal((c,)).astype("float32")]
        libs = {k: tvm.tirx.build(s.mod, target=target) for k, s in (("default", default), ("tuned", tuned))}
        outs, best = {}, {k: float("inf") for k in libs}
        tensors = [tvm.runtime.tensor(a, dev) for a in feed]
        for k in libs:
            outs[k] = tvm.runtime.tensor(np.zeros((1, hw, hw, c), "float32"), dev)
        for _ in range(args.rounds):
            for k, lib in libs.items():
                r = lib.time_evaluator("main", dev, number=20, repeat=1)(*tensors, outs[k])
                best[k] = min(best[k], r.results[0])
        np.testing.assert_allclose(outs["tuned"].numpy(), outs["default"].numpy(), rtol=1e-3, atol=1e-3)
        flop = 2.0 * hw * hw * c * c * 9
        d, t = best["default"] * 1e3, best["tuned"] * 1e3
        print(f"| {name} | {d:.3f} | {flop / d / 1e6:.0f} | {t:.3f} | {flop / t / 1e6:.0f} | {t / d:.2f}x | {tune_s:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
