#!/usr/bin/env python
"""GEMM-bound models and kernels: graphopt's CPU artifact vs ONNX Runtime, as a ratio, in one run.

Each case is lowered with ``graphopt.lower(..., "cpu")`` (default schedules,
no tuning), then the artifact and ONNX Runtime (CPUExecutionProvider, same
thread count) run the same inputs interleaved (ORT, TVM, ORT, TVM, ...) after a
warm-up; the script prints both medians and TVM / ORT. With ``--profile`` it also
times every fused kernel alone (this TVM's VM has no profiler) and prints the
share of the kernel time spent in the matmul kernels (names containing ``matmul``).

Usage::

    python benchmarks/bench_kernels_gemm.py                       # every case, 2 threads
    python benchmarks/bench_kernels_gemm.py --cases mm512,gemv --rounds 30
    python benchmarks/bench_kernels_gemm.py --cases encoder4 --profile
    python benchmarks/bench_kernels_gemm.py --ort-no-spin           # ORT workers do not spin-wait

Cases: mm512 (512^3 MatMul), gemv (1x768 @ 768x3072), digits (examples/digits_mlp.onnx),
mlp, transformer (graphopt.testing.torch_models), swiglu (SwiGLU MLP d=256, hidden 1024, 64 tokens),
encoder4 (4-layer nn.TransformerEncoder d=256, 4 heads, seq 128, batch 1); tails and symbolic rows:
cls8210 ([32,1024] x [1024,8210] + bias, ddddocr's classifier), cls18710 ([40,120] x [120,18710] + bias,
PP-OCRv6-rec's), encoder4dyn (encoder4 captured with a dynamic batch, M = batch*128, run at batch 1).
Timings on a shared machine are noisy: compare ratios, repeat before believing one.
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
CASES = ("mm512", "gemv", "digits", "mlp", "transformer", "swiglu", "encoder4", "cls8210", "cls18710", "encoder4dyn")


def _onnx_matmul(m: int, k: int, n: int, bias: bool = False):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.graph import Graph

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h" if bias else "y"])]
    inits = [numpy_helper.from_array(w, "w")]
    if bias:  # a classifier's bias: the epilogue fused into the GEMM
        nodes.append(helper.make_node("Add", ["h", "b"], ["y"]))
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"))
    g = helper.make_graph(
        nodes, "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return Graph(model), {"x": rng.standard_normal((m, k), dtype=np.float32)}


def _torch_case(module, example, dynamic_batch: bool = False):
    import graphopt

    module.eval()
    graph = graphopt.capture(module, example, dynamic_batch=dynamic_batch)
    return graph, {s.name: t.detach().numpy() for s, t in zip(graph.inputs, example)}


def build_case(name: str):
    """``(graph, feed)`` for one case."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mm512":
        return _onnx_matmul(512, 512, 512)
    if name == "gemv":
        return _onnx_matmul(1, 768, 3072)
    if name == "digits":
        from graphopt.graph import Graph

        graph = Graph.load(REPO / "examples" / "digits_mlp.onnx")
        x = np.load(REPO / "examples" / "digits_inputs.npz")
        return graph, {s.name: x[x.files[0]].astype(np.float32) for s in graph.inputs[:1]}
    if name in ("mlp", "transformer"):
        from graphopt.testing import torch_models

        return _torch_case(*torch_models()[name])
    if name == "swiglu":
        class SwiGLU(nn.Module):
            def __init__(self, d=256, h=1024):
                super().__init__()
                self.gate, self.up, self.down = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

            def forward(self, x):
                return self.down(nn.functional.silu(self.gate(x)) * self.up(x))

        return _torch_case(SwiGLU(), (torch.randn(1, 64, 256),))
    if name == "cls8210":
        return _onnx_matmul(32, 1024, 8210, bias=True)
    if name == "cls18710":
        return _onnx_matmul(40, 120, 18710, bias=True)
    if name in ("encoder4", "encoder4dyn"):
        layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, dropout=0.0, batch_first=True)
        enc = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        return _torch_case(enc, (torch.randn(1, 128, 256),), dynamic_batch=name == "encoder4dyn")
    raise SystemExit(f"unknown case {name!r}; known: {', '.join(CASES)}")


def run_case(name: str, threads: int, rounds: int, profile: bool, workdir: Path, spin: bool = True) -> dict:
    import onnxruntime as ort

    import graphopt

    graph, feed = build_case(name)
    out = workdir / name
    t0 = time.perf_counter()
    graphopt.lower(graph, "cpu", out, threads=threads)
    compile_s = time.perf_counter() - t0
    art = graphopt.load(out)
    prog = art.programs["main"]
    args = [np.asarray(feed[s.name], order="C") for s in art.inputs]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not spin:
        # ORT's idle workers spin-wait after each run; interleaved with TVM on few cores they
        # take the cores TVM's own pool needs (measured here: both sides ran 2-3x slower).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(graph.to_bytes(), so, providers=["CPUExecutionProvider"])
    ref = sess.run(None, feed)
    got = prog(args)
    err = max(float(np.max(np.abs(r - g))) if r.size else 0.0 for r, g in zip(ref, got))
    fns = {"ort": lambda: sess.run(None, feed), "tvm": lambda: prog(args)}
    # Warm up, then size the inner repeat so one sample takes ~20 ms.
    reps = {}
    for k, f in fns.items():
        for _ in range(3):
            f()
        t0 = time.perf_counter()
        f()
        reps[k] = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[k]):
                f()
            times[k].append((time.perf_counter() - t0) / reps[k])
    med = {k: float(np.median(v)) for k, v in times.items()}
    rec = {"case": name, "ort_ms": med["ort"] * 1e3, "tvm_ms": med["tvm"] * 1e3,
           "ratio": med["tvm"] / med["ort"], "max_abs_err": err, "compile_s": compile_s}
    if profile:
        rec["matmul_share"] = _matmul_share(graph, threads)
    return rec


def _matmul_share(graph, threads: int) -> float:
    """Share of the kernel time spent in functions named ``*matmul*`` (the dense/batch-matmul kernels).

    This TVM build's VM has no profiler, so every fused TIR function is taken
    from the scheduled module (right after the schedule rules ran), compiled
    alone, timed on random inputs with ``time_evaluator``, and weighted by how
    often ``main`` calls it. Static shapes only.
    """
    import re

    import tvm
    from tvm.s_tir import dlight

    from graphopt.targets.cpu import host_cpu, llvm_target
    from graphopt.relax import build_pipeline, import_graph, select_params
    from graphopt.targets.schedules import default_rules

    target = llvm_target(host_cpu(), threads)
    seen = {}

    @tvm.transform.module_pass(opt_level=0, name="capture")
    def capture(mod, _ctx):
        seen["mod"] = mod
        return mod

    mod = import_graph(graph, select_params(graph))
    pipeline = build_pipeline(target, after_fusion=[dlight.ApplyDefaultSchedule(*default_rules()), capture])
    with tvm.transform.PassContext(opt_level=3):
        tvm.compile(mod, target=target, relax_pipeline=pipeline)
    sched = seen["mod"]
    main_text = sched["main"].script()
    dev = tvm.cpu()
    total = mm = 0.0
    rng = np.random.default_rng(0)
    for gv, f in sched.functions_items():
        if not isinstance(f, tvm.tirx.PrimFunc):
            continue
        calls = len(re.findall(rf"call_tir\w*\((?:cls\.)?{re.escape(gv.name_hint)},", main_text))
        if not calls or not all(isinstance(d, tvm.tirx.IntImm) for p in f.params for d in p.shape):
            continue  # not called from main, or symbolic (a shape function): not a timed kernel
        with target:
            lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)
        args = []
        for p in f.params:
            buf = p  # a buffer parameter (shape, dtype)
            shape = [int(d) for d in buf.shape]
            args.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(buf.dtype) if "float" in buf.dtype
                                           else np.zeros(shape, buf.dtype), dev))
        sec = lib.mod.time_evaluator("main", dev, number=20, repeat=3)(*args).median
        total += sec * calls
        if os.environ.get("BENCH_GEMM_VERBOSE"):
            print(f"    {gv.name_hint:<48} x{calls} {sec * 1e6:9.1f} us", file=sys.stderr)
        if "matmul" in gv.name_hint:
            mm += sec * calls
    return mm / total if total else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="also print the matmul kernels' share of the time")
    p.add_argument("--ort-no-spin", action="store_true",
                   help="ONNX Runtime session.intra_op.allow_spinning=0 (its spinning workers slow TVM down "
                        "when the two are interleaved on few cores)")
    a = p.parse_args(argv)
    print(f"threads={a.threads} load={os.getloadavg()[0]:.1f} ort_spinning={not a.ort_no_spin}")
    print(f"{'case':<12} {'ORT ms':>9} {'TVM ms':>9} {'TVM/ORT':>8} {'max err':>9} {'compile s':>9}"
          + ("  matmul share" if a.profile else ""))
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.cases.split(","):
            r = run_case(name, a.threads, a.rounds, a.profile, Path(tmp), spin=not a.ort_no_spin)
            ratios.append(r["ratio"])
            line = (f"{name:<12} {r['ort_ms']:>9.3f} {r['tvm_ms']:>9.3f} {r['ratio']:>7.2f}x "
                    f"{r['max_abs_err']:>9.1e} {r['compile_s']:>9.1f}")
            if a.profile:
                line += f"  {r['matmul_share']:.0%}"
            print(line, flush=True)
    print(f"geomean TVM/ORT {float(np.exp(np.mean(np.log(ratios)))):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
