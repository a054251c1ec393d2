#!/usr/bin/env python
"""Quantization benchmark: what each quantize pipeline costs in accuracy and buys in size and speed.

1. Trains a small CNN and an MLP on scikit-learn's digits here (``graphopt.testing.digits_models``,
   seeded), calibrates on 256 training images and evaluates on the 450 held-out ones.
2. Per model and pipeline (float, ``quantize(mode=static)``, ``quantize(mode=dynamic)``, weight-only 8/4/3/2
   bits): ``graphopt.lower`` with ``--data``/``--eval``/``--verify`` (the artifact is checked against the
   graph it compiled), then the weight bytes ratio (the pass's record), the held-out accuracy and its
   change, top-1 agreement with the float model, the artifact's size, and its batch-1 latency next to
   ONNX Runtime fp32 (the float model) and ONNX Runtime int8 (its own quantizer: ``quantize_static``,
   QDQ, per-channel, U8S8, same calibration images), all timed in one interleaved run
   (``graphopt.bench.measure``, worker processes, same threads).
3. Latency rows for the ResNet-18-style CNN and the 4-layer encoder of ``bench_cpu.py``
   (``quantize(mode=static)`` calibrated on 8 seeded inputs, batch 1) against the same two baselines.
4. Weight-only low-bit rows (size and batch-1 latency; accuracy is the digits rows' job): an MLP
   1024-4096-1024 with seeded random weights and the encoder, each float, ``quantize(mode=weight-only,
   bits=4|2,rounding=nearest)`` with the fused low-bit kernels (``targets/lowbit.py``), and bits=4 with
   ``--target-opt lowbit_kernels=false`` (the decode folded back into float weights), against ONNX Runtime
   fp32 on the float model.
5. Top-1 agreement of ``quantize(mode=static)`` with the float model on a real corpus model fed real
   inputs: magika on the bytes of files of this Python installation (calibrated on 64 files, tested on
   256 others).

Usage::

    python benchmarks/bench_quant.py                    # everything
    python benchmarks/bench_quant.py --models cnn --seconds 1 --no-large --no-magika
    python benchmarks/bench_quant.py --models '' --no-large --no-magika   # the low-bit rows only
    python benchmarks/bench_quant.py --json out.json

Absolute times depend on the machine and its load; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PIPELINES = {
    "float": "",
    "static": "quantize(mode=static)",
    "dynamic": "quantize(mode=dynamic)",
    "w8": "quantize(mode=weight-only,bits=8)",
    "w4": "quantize(mode=weight-only,bits=4)",
    "w3": "quantize(mode=weight-only,bits=3)",
    "w2": "quantize(mode=weight-only,bits=2)",
    "w2-nearest": "quantize(mode=weight-only,bits=2,rounding=nearest)",
}


def ort_int8(src: Path, dst: Path, calib: list[dict]) -> Path:
    """ONNX Runtime's own static int8 (QDQ, per-channel weights, U8S8), calibrated on ``calib``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst


def latency(runners: dict, feed: dict, names, args) -> dict:
    """Median ms per runner, timed together (no output agreement check: the runners differ on purpose)."""
    from graphopt.bench import measure

    m = measure(runners, feed, names, threads=args.threads, seconds=args.seconds, warmup=3)
    return {k: v.get("median_ms") for k, v in m["runtimes"].items()} | {"threads": m["threads"]}


def digits_rows(args, work: Path) -> list[dict]:
    import graphopt
    from graphopt.accuracy import EvalSet, top1_accuracy, top1_agreement
    from graphopt.data import DataSource
    from graphopt.testing import digits_models

    from bench_cpu import dir_bytes

    t0 = time.perf_counter()
    m = digits_models()
    print(f"trained the digits CNN and MLP in {time.perf_counter() - t0:.1f} s", flush=True)
    d = m["data"]
    calib, ev = d["calib"], EvalSet([d["eval"]], d["labels"], source="digits held-out (450)")
    rows = []
    for name in args.models:
        g = m[name]
        original = work / f"{name}.onnx"
        g.save(original)
        ort_q = ort_int8(original, work / f"{name}.ort-int8.onnx", [{"image": calib["image"][i:i + 1]}
                                                                     for i in range(len(calib["image"]))])
        float_pred = ev.predictions(g)
        ort_pred = ev.predictions(graphopt.Graph.load(ort_q))
        ort_acc = top1_accuracy(ort_pred, d["labels"])
        float_acc = top1_accuracy(float_pred, d["labels"])
        feed1 = {"image": d["eval"]["image"][:1]}
        for label in args.pipelines:
            text = PIPELINES[label]
            out = work / f"{name}-{label}"
            t0 = time.perf_counter()
            res = graphopt.lower(g, "cpu", out, pipeline=("cleanup," + text + ",cleanup") if text else "cleanup",
                                 data=DataSource(feeds=[calib]), eval=ev, verify=True, threads=args.threads)
            lower_s = time.perf_counter() - t0
            q_pred = ev.predictions(res.graph)
            rec = next((r for r in res.records if r.name == "quantize"), None)
            wb = rec.details.get("weight_bytes", {}) if rec else {}
            lat = latency({"graphopt": ("graphopt", str(out)), "ort-fp32": ("ort", str(original)),
                           "ort-int8": ("ort", str(ort_q))}, feed1, ["logits"], args)
            row = {"model": f"digits-{name}", "pipeline": text or "(float)", "label": label,
                   "weight_ratio": wb.get("ratio", 1.0), "accuracy": top1_accuracy(q_pred, d["labels"]),
                   "float_accuracy": float_acc, "agreement": top1_agreement([float_pred], [q_pred]),
                   "artifact_bytes": dir_bytes(out), "lower_s": lower_s, "latency_ms": lat,
                   "ort_int8_accuracy": ort_acc, "ort_int8_agreement": top1_agreement([float_pred], [ort_pred])}
            rows.append(row)
            print(f"[digits-{name} {label}] acc {row['accuracy']:.2f} ({row['accuracy'] - float_acc:+.2f}) "
                  f"agree {row['agreement']:.2f}% weights {row['weight_ratio']:.2f}x smaller; "
                  f"graphopt {lat['graphopt']:.4f} ms, ORT fp32 {lat['ort-fp32']:.4f} ms, ORT int8 "
                  f"{lat['ort-int8']:.4f} ms", flush=True)
    return rows


def large_rows(args, work: Path) -> list[dict]:
    import graphopt
    from graphopt.data import DataSource

    import models as bench_models

    rows = []
    cat = bench_models.catalog()
    for name in ("resnet18", "encoder"):
        model = cat[name]
        graph, _, _ = bench_models.build(model)
        original = work / f"{name}.onnx"
        graph.save(original)
        # 8 calibration inputs: the benchmark's seeded feed with seeded noise added.
        base, rng = bench_models.feed(model, 1), np.random.default_rng(0)
        calib = [{k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in base.items()} for _ in range(8)]
        ort_q = ort_int8(original, work / f"{name}.ort-int8.onnx", calib)
        rows_here = {}
        for label in ("float", "static"):
            out = work / f"{name}-{label}"
            t0 = time.perf_counter()
            text = PIPELINES[label]
            graphopt.lower(graph, "cpu", out, pipeline=("cleanup," + text + ",cleanup") if text else None,
                           data=DataSource(feeds=calib), threads=args.threads, verify_passes=False)
            rows_here[label] = (out, time.perf_counter() - t0)
        feed = bench_models.feed(model, 1)
        names = [o.name for o in graph.outputs]
        lat = latency({"graphopt-int8": ("graphopt", str(rows_here["static"][0])),
                       "graphopt-fp32": ("graphopt", str(rows_here["float"][0])),
                       "ort-fp32": ("ort", str(original)), "ort-int8": ("ort", str(ort_q))}, feed, names, args)
        rows.append({"model": name, "latency_ms": lat, "lower_s": {k: v[1] for k, v in rows_here.items()}})
        print(f"[{name} b1] " + ", ".join(f"{k} {v:.3f} ms" for k, v in lat.items() if k != "threads"), flush=True)
    return rows


LOWBIT_PIPELINES = {
    "float": ("", {}),
    "w4": ("quantize(mode=weight-only,bits=4,rounding=nearest)", {}),
    "w2": ("quantize(mode=weight-only,bits=2,rounding=nearest)", {}),
    "w4, lowbit_kernels=false": ("quantize(mode=weight-only,bits=4,rounding=nearest)", {"lowbit_kernels": False}),
}


def big_mlp():
    """An MLP 1024-4096-1024 (MatMul + bias, ReLU, Gemm transB) at batch 1, seeded random weights: 33.6 MB
    of float32 weights, where a batch-1 run is bound by reading them."""
    from onnx import TensorProto, helper, numpy_helper

    import graphopt

    rng = np.random.default_rng(0)
    k, h = 1024, 4096
    inits = [numpy_helper.from_array((rng.standard_normal((k, h)) / 32).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(h).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((k, h)) / 64).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["ha"]),
             helper.make_node("Relu", ["ha"], ["r"]), helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "mlp-1024-4096-1024", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return graphopt.Graph(m), {"x": rng.standard_normal((1, k)).astype(np.float32)}


def lowbit_rows(args, work: Path) -> list[dict]:
    import graphopt

    import models as bench_models
    from bench_cpu import dir_bytes

    cat = bench_models.catalog()
    enc, _, _ = bench_models.build(cat["encoder"])
    rows = []
    for name, (graph, feed) in (("mlp-1024-4096-1024", big_mlp()),
                                ("encoder", (enc, bench_models.feed(cat["encoder"], 1)))):
        original = work / f"{name}.onnx"
        graph.save(original)
        runners, info = {"ort-fp32": ("ort", str(original))}, {}
        for label, (text, opts) in LOWBIT_PIPELINES.items():
            out = work / f"{name}-lowbit-{label.replace(', ', '-').replace('=', '-')}"
            t0 = time.perf_counter()
            res = graphopt.lower(graph, "cpu", out, pipeline=("cleanup," + text + ",cleanup") if text else None,
                                 target_options=opts, threads=args.threads, verify=True, verify_passes=False)
            info[label] = {"lower_s": time.perf_counter() - t0, "artifact_bytes": dir_bytes(out),
                           "lowbit_matmuls": res.manifest["target"].get("lowbit_matmuls", 0),
                           "lowbit_kernel": res.manifest["target"].get("lowbit_kernel"),
                           "verification": res.verification.summary()}
            runners[label] = ("graphopt", str(out))
        lat = latency(runners, feed, [o.name for o in graph.outputs], args)
        for label in LOWBIT_PIPELINES:
            rows.append({"model": name, "label": label, "pipeline": LOWBIT_PIPELINES[label][0] or "(float)",
                         "latency_ms": lat[label], "ort_fp32_ms": lat["ort-fp32"],
                         "float_ms": lat["float"], **info[label]})
            print(f"[{name} {label}] {lat[label]:.3f} ms (ORT fp32 {lat['ort-fp32']:.3f} ms), artifact "
                  f"{info[label]['artifact_bytes'] / 2**20:.1f} MiB, {info[label]['lowbit_matmuls']} low-bit matmuls",
                  flush=True)
    return rows


def magika_files(count: int, seed: int) -> list[bytes]:
    """Contents of ``count`` distinct files of this Python installation (sources, binaries, data), seeded."""
    roots = [Path(sys.prefix), Path(os.__file__).parent]
    files = sorted({p for r in roots for p in r.rglob("*") if p.is_file() and not p.is_symlink()
                    and 64 < p.stat().st_size})
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(files), size=min(count, len(files)), replace=False)
    return [files[i].read_bytes()[:1 << 20] for i in sorted(picked)]


def magika_features(content: bytes) -> np.ndarray:
    """magika standard_v3_3 input: the first and last 1024 bytes (whitespace stripped), padded with 256."""
    beg = np.frombuffer(content.lstrip()[:1024], np.uint8).astype(np.int32)
    end = np.frombuffer(content.rstrip()[-1024:], np.uint8).astype(np.int32)
    out = np.full((1, 2048), 256, np.int32)
    out[0, :beg.size] = beg
    out[0, 2048 - end.size:] = end
    return out


def magika_rows(args, work: Path) -> list[dict]:
    import graphopt
    from graphopt.accuracy import output_error
    from graphopt.data import DataSource
    from graphopt.reference import run_reference
    from graphopt.testing import fetch_real_model

    g = graphopt.Graph.load(fetch_real_model("magika")).with_input_shapes({"bytes": [1, 2048]})
    contents = magika_files(320, seed=0)
    feeds = [{"bytes": magika_features(c)} for c in contents]
    calib, test = feeds[:64], feeds[64:]
    ref = run_reference(g, test)
    rows = []
    for budget in (None, 0.5):
        res = graphopt.optimize(g, "quantize(mode=static)", data=DataSource(feeds=calib), budget=budget)
        err = output_error(ref, run_reference(res.graph, test), [o.name for o in g.outputs])
        d = res.records[0].details
        rows.append({"model": "magika", "files": len(test), "pipeline": "quantize(mode=static)", "budget": budget,
                     **err.to_json(), "weight_ratio": d["weight_bytes"]["ratio"],
                     "quantized": d["quantized"], "kept_float": list(d.get("kept_float", {}))})
        print(f"[magika] quantize(mode=static), budget {budget}, on {len(test)} real files: {err.summary()}; "
              f"{d['quantized']} layers quantized", flush=True)
    return rows


def render(digits: list[dict], large: list[dict], magika: list[dict], env: dict, lowbit: list[dict] = ()) -> str:
    lines = [f"graphopt quantization benchmark — {env['date']}, {env['cpu']}, {env['threads']} threads", ""]
    if digits:
        lines += ["| model | pipeline | weights smaller | accuracy (Δ pt) | top-1 agreement | graphopt ms | "
                  "vs ORT fp32 | vs ORT int8 | artifact |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in digits:
            lat = r["latency_ms"]
            lines.append(f"| {r['model']} | `{r['pipeline']}` | {r['weight_ratio']:.2f}× | {r['accuracy']:.2f} "
                         f"({r['accuracy'] - r['float_accuracy']:+.2f}) | {r['agreement']:.2f}% | "
                         f"{lat['graphopt']:.4f} | {lat['graphopt'] / lat['ort-fp32']:.2f}× | "
                         f"{lat['graphopt'] / lat['ort-int8']:.2f}× | {r['artifact_bytes'] / 1024:.0f} KiB |")
        seen = set()
        for r in digits:
            if r["model"] not in seen:
                seen.add(r["model"])
                lines.append(f"\nONNX Runtime int8 (its quantizer) on {r['model']}: accuracy "
                             f"{r['ort_int8_accuracy']:.2f} ({r['ort_int8_accuracy'] - r['float_accuracy']:+.2f}), "
                             f"top-1 agreement {r['ort_int8_agreement']:.2f}%")
    if large:
        lines += ["", "| model (batch 1) | graphopt int8 ms | graphopt fp32 ms | ORT fp32 ms | ORT int8 ms | "
                  "int8 vs ORT fp32 | int8 vs ORT int8 |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in large:
            t = r["latency_ms"]
            lines.append(f"| {r['model']} | {t['graphopt-int8']:.3f} | {t['graphopt-fp32']:.3f} | {t['ort-fp32']:.3f} | "
                         f"{t['ort-int8']:.3f} | {t['graphopt-int8'] / t['ort-fp32']:.2f}× | "
                         f"{t['graphopt-int8'] / t['ort-int8']:.2f}× |")
    if lowbit:
        lines += ["", "| model (batch 1) | pipeline | low-bit matmuls | artifact | graphopt ms | vs ORT fp32 | "
                  "vs graphopt float |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in lowbit:
            opts = "" if "lowbit_kernels" not in r["label"] else ", `lowbit_kernels=false`"
            lines.append(f"| {r['model']} | `{r['pipeline']}`{opts} | {r['lowbit_matmuls']} | "
                         f"{r['artifact_bytes'] / 2**20:.2f} MiB | {r['latency_ms']:.3f} | "
                         f"{r['latency_ms'] / r['ort_fp32_ms']:.2f}× | {r['latency_ms'] / r['float_ms']:.2f}× |")
    for m in magika:
        budget = f" with `--budget {m['budget']}` ({m['quantized']} layers quantized, kept in float: " \
                 f"{', '.join(k.rsplit('/', 2)[-2] for k in m['kept_float'])})" if m["budget"] is not None else \
                 f" ({m['quantized']} layers quantized)"
        lines += ["", f"magika, `{m['pipeline']}`{budget}, on {m['files']} real files of this Python "
                  f"installation: top-1 agreement {m['top1_agreement']:.2f}%, cosine {float(m['cosine']):.5f}, "
                  f"quantized weights {m['weight_ratio']:.2f}× smaller"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cnn,mlp", help="digits models (cnn, mlp)")
    p.add_argument("--pipelines", default=",".join(PIPELINES), help="labels of PIPELINES to run")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per latency measurement")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-large", action="store_true", help="skip the ResNet-18 and encoder latency rows")
    p.add_argument("--no-magika", action="store_true", help="skip the real-model agreement row")
    p.add_argument("--no-lowbit", action="store_true", help="skip the weight-only low-bit latency rows")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--keep", metavar="DIR", help="write the models and artifacts under DIR instead of a temporary folder")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.pipelines = [m for m in args.pipelines.split(",") if m]
    from bench_cpu import cpu_model_name, isa_summary, work_folder

    env = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "cpu": f"{cpu_model_name()} ({isa_summary()})",
           "threads": args.threads or os.cpu_count()}
    with contextlib.ExitStack() as stack:
        work = work_folder(stack, args.keep, "graphopt-bench-quant-")
        digits = digits_rows(args, work) if args.models else []
        large = [] if args.no_large else large_rows(args, work)
        lowbit = [] if args.no_lowbit else lowbit_rows(args, work)
        magika = [] if args.no_magika else magika_rows(args, work)
    print()
    print(render(digits, large, magika, env, lowbit))
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "digits": digits, "large": large, "magika": magika,
                                               "lowbit": lowbit},
                                              indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
