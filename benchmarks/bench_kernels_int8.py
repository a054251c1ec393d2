#!/usr/bin/env python
"""Integer GEMM kernels: graphopt's int8 artifact vs ONNX Runtime fp32 and int8, as ratios, in one run; exactness.

For each GEMM shape (M x K x N: the 4-layer encoder's FFN, ResNet-18's first and
last 3x3 convolutions as im2col GEMMs, a 768 x 3072 layer), a QDQ model
``x -> QuantizeLinear(uint8) -> DequantizeLinear -> MatMul(DequantizeLinear(int8 W, per channel))``
is lowered with ``graphopt.lower(..., "cpu")`` (the integer kernel the host's
features select: ``avx512vnni`` or ``avx2``; ``--mcpu x86-64-v3`` forces the AVX2
one on an AVX-512 machine), and timed with :func:`graphopt.bench.measure`
(separate worker processes, interleaved, same thread count) next to ONNX Runtime
on the same QDQ model (its integer kernels) and on the float model (W
dequantized: fp32 GEMM). Ratios below 1 mean graphopt is faster.

Accuracy: each QDQ runtime's output is compared with the QDQ model's exact
result (float64); ONNX Runtime's fp32 model skips the activation quantization.

Exactness: ONNX Runtime's MatMulInteger and graphopt's artifact of the same
integer product run on full-range codes (uint8 0..255 x int8 -128..127) and are
compared with numpy's int64 product. On AVX2 CPUs without VNNI, ONNX Runtime's
u8 x s8 kernel uses ``vpmaddubsw``, whose int16 pair sums saturate: it is not
exact there; graphopt's AVX2 kernel widens to int16 and uses ``vpmaddwd`` (exact).

Usage::

    python benchmarks/bench_kernels_int8.py                    # every shape, all cores
    python benchmarks/bench_kernels_int8.py --shapes 64x768x3072 --seconds 3
    python benchmarks/bench_kernels_int8.py --mcpu x86-64-v3   # the AVX2 kernel on an AVX-512 machine
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = ("128x256x1024", "128x1024x256", "3136x576x64", "49x4608x512", "64x768x3072")


def qdq_models(m: int, k: int, n: int, seed: int = 0):
    """(QDQ graph, float graph, feed, the QDQ graph's exact float64 output) for one GEMM shape: the float graph
    multiplies by the dequantized weight (no activation quantization)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.graph import Graph

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
    sw = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    wq = np.clip(np.round(w / sw), -127, 127).astype(np.int8)
    x = rng.standard_normal((m, k)).astype(np.float32)
    sx, zx = np.float32((x.max() - x.min()) / 255), np.uint8(round(-x.min() / ((x.max() - x.min()) / 255)))

    def model(nodes, inits):
        g = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
        mp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        mp.ir_version = 8
        onnx.checker.check_model(mp)
        return Graph(mp)

    # What the QDQ model computes, in float64: quantize x as QuantizeLinear does (round half to even), multiply.
    xq = np.clip(np.rint(x / sx) + int(zx), 0, 255)
    exact = ((xq - int(zx)) * np.float64(sx)) @ (wq.astype(np.float64) * sw.astype(np.float64))

    qdq = model([helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], axis=1),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"])],
                [numpy_helper.from_array(a, nm) for a, nm in ((np.array(sx), "sx"), (np.array(zx), "zx"),
                                                              (wq, "wq"), (sw, "sw"))])
    flt = model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                [numpy_helper.from_array((wq.astype(np.float32) * sw).astype(np.float32), "w")])
    return qdq, flt, {"x": x}, exact


def exactness(m: int, k: int, n: int, out: Path, mcpu: str) -> dict:
    """Max |error| against numpy's int64 product on full-range codes: ORT MatMulInteger and graphopt's kernel."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import graphopt

    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    wq = rng.integers(-128, 128, (k, n)).astype(np.int8)
    exact = a.astype(np.int64) @ wq.astype(np.int64)
    g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "mmi",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
                          [numpy_helper.from_array(wq, "w")])
    mp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    mp.ir_version = 8
    ort_y = ort.InferenceSession(mp.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    # graphopt: the same product as a QDQ model with unit scales and zero points (dequantized codes are exact
    # in float32 and so is the float result, |sum| < 2^24), through the integer kernel.
    qdq = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["a", "one", "z8"], ["ad"]),
         helper.make_node("DequantizeLinear", ["w", "one", "zs"], ["wd"]),
         helper.make_node("MatMul", ["ad", "wd"], ["y"])], "qdq",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(wq, "w"), numpy_helper.from_array(np.array(1, np.float32), "one"),
         numpy_helper.from_array(np.array(0, np.uint8), "z8"), numpy_helper.from_array(np.array(0, np.int8), "zs")])
    qm = helper.make_model(qdq, opset_imports=[helper.make_opsetid("", 17)])
    qm.ir_version = 8
    art_dir = out / f"exact-{m}x{k}x{n}"
    graphopt.lower(graphopt.Graph(qm), "cpu", art_dir, target_options={"mcpu": mcpu})
    manifest = json.loads((art_dir / "manifest.json").read_text())
    got = graphopt.load(art_dir).programs["main"]([a])[0]
    return {"ort_max_err": int(np.abs(ort_y.astype(np.int64) - exact).max()),
            "graphopt_max_err": float(np.abs(got.astype(np.float64) - exact).max()),
            "kernel": manifest["target"].get("int8_kernel")}


def run_shape(shape: str, args, work: Path) -> dict:
    import graphopt
    from graphopt.bench import measure

    m, k, n = (int(v) for v in shape.split("x"))
    import onnxruntime as ort

    qdq, flt, feed, exact = qdq_models(m, k, n)
    art = work / f"art-{shape}"
    t0 = time.perf_counter()
    graphopt.lower(qdq, "cpu", art, threads=args.threads, target_options={"mcpu": args.mcpu})
    lower_s = time.perf_counter() - t0
    manifest = json.loads((art / "manifest.json").read_text())
    qdq.save(work / f"qdq-{shape}.onnx")
    flt.save(work / f"fp32-{shape}.onnx")
    # No cross-check inside measure: the three compute different things (fp32 skips the activation
    # quantization; ORT's int8 kernel may saturate). Each QDQ runtime is compared with the exact result instead.
    res = measure({"graphopt": ("graphopt", str(art)), "ort-int8": ("ort", str(work / f"qdq-{shape}.onnx")),
                   "ort-fp32": ("ort", str(work / f"fp32-{shape}.onnx"))}, feed, ["y"],
                  threads=args.threads, seconds=args.seconds)
    ort_y = ort.InferenceSession(str(work / f"qdq-{shape}.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = graphopt.load(art).programs["main"]([feed["x"]])[0]
    qdq_err = {"graphopt": float(np.abs(got - exact).max()), "ort-int8": float(np.abs(ort_y - exact).max()),
               "max|y|": float(np.abs(exact).max())}
    med = {label: s["median_ms"] for label, s in res["runtimes"].items() if "median_ms" in s}  # not: disagreed
    row = {"shape": shape, "kernel": manifest["target"].get("int8_kernel"), "ms": med, "lower_s": lower_s,
           "threads": res["threads"], "qdq_err": qdq_err,
           "gops": {label: 2 * m * k * n / (v * 1e-3) / 1e9 for label, v in med.items()}}
    row.update(exactness(m, k, n, work, args.mcpu))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="MxKxN GEMM shapes, comma-separated")
    p.add_argument("--seconds", type=float, default=1.5, help="timed seconds per runtime and shape")
    p.add_argument("--threads", type=int, default=None, help="threads on both sides (default: every core)")
    p.add_argument("--mcpu", default="host", help="the CPU target's mcpu (x86-64-v3: the AVX2 kernel)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_cpu import cpu_model_name, isa_summary

    rows = []
    with tempfile.TemporaryDirectory(prefix="graphopt-int8-bench-") as tmp:
        for shape in args.shapes.split(","):
            rows.append(run_shape(shape.strip(), args, Path(tmp)))
            print(f"[{shape}] " + json.dumps(rows[-1]["ms"]), flush=True)
    print(f"\ngraphopt integer GEMM kernels — {time.strftime('%Y-%m-%d')}, {cpu_model_name()} ({isa_summary()}), "
          f"{rows[0]['threads'] if rows else '?'} threads, mcpu={args.mcpu}\n")
    print("| M×K×N | kernel | graphopt ms | ORT int8 ms | ORT fp32 ms | vs ORT int8 | vs ORT fp32 "
          "| graphopt GOP/s | QDQ max err: graphopt / ORT int8 (max abs y) | integer max err: graphopt / ORT MatMulInteger |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ms = r["ms"]
        nan = float("nan")
        g = ms.get("graphopt", nan)
        print(f"| {r['shape']} | {r['kernel'] or 'float (no integer kernel)'} | {g:.3f} | {ms.get('ort-int8', nan):.3f} | "
              f"{ms.get('ort-fp32', nan):.3f} | {g / ms.get('ort-int8', nan):.2f}× | {g / ms.get('ort-fp32', nan):.2f}× | "
              f"{r['gops'].get('graphopt', nan):.0f} | {r['qdq_err']['graphopt']:.2g} / {r['qdq_err']['ort-int8']:.2g} "
              f"({r['qdq_err']['max|y|']:.3g}) | {r['graphopt_max_err']:g} / {r['ort_max_err']} |")
    print(f"\nplatform: {platform.platform()}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
