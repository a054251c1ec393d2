"""Constant-folding engines compared on the real-model corpus, a hostile model and a 100k-node graph.

Engines (each gets the same model: input dims fixed, and silero-vad's ``sr`` fixed to 16000):

* ``graphopt``   -- graphopt's ``cleanup`` pass (fold-constants + identity/dead/dedup), run alone;
* ``onnxscript`` -- ``onnxscript.optimizer.optimize`` (constant folding + unused-node removal);
* ``ort-basic``  -- ONNX Runtime's offline basic optimizer (``ORT_ENABLE_BASIC`` + ``optimized_model_filepath``).

Per model: nodes left (main graph + subgraphs), seconds, and the max abs error of the result against ONNX
Runtime on the original model, on the same feeds (inputs of the right kind per model). Then the peak
memory each engine adds on a 200-byte model whose ``ConstantOfShape`` makes 1 GiB that is sliced down to 4
floats (each engine in its own process), and ``cleanup`` on a 100,000-node graph.

    python benchmarks/bench_folding.py [--models magika,ppocr-cls,...] [--skip-hostile] [--skip-large]

Models come from ``.cache/models`` (see shared/MODELS.md). Prints one table per part; numbers are measured
on the machine that runs it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "models"

# name: (input shapes, input values fixed for every engine, feed maker)
CORPUS = {
    "magika": ({"bytes": [1, 2048]}, {}, lambda r: {"bytes": r.integers(0, 257, (1, 2048)).astype(np.int32)}),
    "ppocr-cls": ({"x": [1, 3, 48, 192]}, {}, None),
    "ppocrv4-det": ({"x": [1, 3, 640, 640]}, {}, None),
    "ppocrv6-rec": ({"x": [1, 3, 48, 320]}, {}, None),
    "orientation": ({"x": [1, 3, 224, 224]}, {}, None),
    "ddddocr": ({"input1": [1, 1, 64, 256]}, {}, None),
    "ddddocr-old": ({"input1": [1, 1, 64, 256]}, {}, None),
    "tashkeel": ({"char_inputs": [1, 64], "diac_inputs": [1, 64], "input_lengths": [1]}, {},
                 lambda r: {"char_inputs": r.integers(1, 54, (1, 64)).astype(np.int64),
                            "diac_inputs": r.integers(0, 16, (1, 64)).astype(np.int64),
                            "input_lengths": np.array([64], np.int64)}),
    "silero-vad": ({"input": [1, 512], "state": [2, 1, 128]}, {"sr": 16000},
                   lambda r: {"input": r.standard_normal((1, 512)).astype(np.float32),
                              "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}),
}


def count_nodes(gp: onnx.GraphProto) -> int:
    n = 0
    for node in gp.node:
        n += 1
        for a in node.attribute:
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                n += count_nodes(sg)
    return n


def ort_run(model: onnx.ModelProto, feeds: list[dict]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return [sess.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]


def engine_graphopt(model: onnx.ModelProto) -> onnx.ModelProto:
    import graphopt
    from graphopt.passbase import PassContext

    p = graphopt.plugins.get_registry().get_pass("cleanup")()
    return p.run(graphopt.Graph(model), PassContext(verify=False)).model


def engine_onnxscript(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxscript.optimizer

    m = onnx.ModelProto()
    m.CopyFrom(model)
    return onnxscript.optimizer.optimize(m)


_ORT_BASIC = textwrap.dedent("""
    import sys
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = sys.argv[2]
    ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
""")


def engine_ort_basic(model: onnx.ModelProto) -> onnx.ModelProto:
    # In a child process: ONNX Runtime's optimizer has crashed (SIGSEGV) on corpus models.
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.onnx", Path(d) / "opt.onnx"
        src.write_bytes(model.SerializeToString())
        p = subprocess.run([sys.executable, "-c", _ORT_BASIC, str(src), str(dst)], capture_output=True, text=True)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or [""])[-1]
            raise RuntimeError(f"exit {p.returncode}" + (f" {last[:60]}" if last else " (crashed)"))
        return onnx.load(dst)


ENGINES = {"graphopt": engine_graphopt, "onnxscript": engine_onnxscript, "ort-basic": engine_ort_basic}


def prepared(name: str):
    import graphopt
    from graphopt.data import generate_inputs

    shapes, values, make_feeds = CORPUS[name]
    g = graphopt.Graph.load(CACHE / f"{name}.onnx").with_input_shapes(shapes)
    fixed = g.with_input_values(values)
    rng = np.random.default_rng(0)
    feeds = [make_feeds(rng) for _ in range(2)] if make_feeds else generate_inputs(g, seed=0, count=2)
    return g.model, fixed.model, feeds


def corpus(models: list[str]) -> list[dict]:
    rows = []
    for name in models:
        original, fixed, feeds = prepared(name)
        try:
            ref = ort_run(original, feeds)
        except Exception as e:
            ref = None
            print(f"{name}: ONNX Runtime cannot run the original: {str(e).splitlines()[0][:100]}", file=sys.stderr)
        row = {"model": name, "nodes": count_nodes(original.graph)}
        for engine, fn in ENGINES.items():
            t0 = time.perf_counter()
            try:
                out = fn(fixed)
                secs = time.perf_counter() - t0
                got = ort_run(out, feeds)
                err = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0))
                          for ra, rb in zip(ref, got) for a, b in zip(ra, rb)) if ref else None
                row[engine] = {"nodes": count_nodes(out.graph), "seconds": round(secs, 2), "max_abs": err}
            except Exception as e:
                row[engine] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


HOSTILE = textwrap.dedent("""
    import json, resource, sys
    from graphopt.testing import hostile_constant_model
    sys.path.insert(0, sys.argv[2])
    from bench_folding import ENGINES, count_nodes
    m = hostile_constant_model(1 << 28)
    import onnxruntime, onnxscript.optimizer, graphopt.plugins  # imported before the baseline
    graphopt.plugins.get_registry()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = ENGINES[sys.argv[1]](m)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # ort-basic runs in a child process
    print(json.dumps({"engine": sys.argv[1], "model_bytes": m.ByteSize(), "added_mib": round((peak - base) / 1024, 1),
                      "child_peak_mib": round(child / 1024, 1), "nodes_left": count_nodes(out.graph)}))
""")


def hostile() -> list[dict]:
    rows = []
    for engine in ENGINES:
        p = subprocess.run([sys.executable, "-c", HOSTILE, engine, str(Path(__file__).parent)],
                           capture_output=True, text=True, timeout=600)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else
                    {"engine": engine, "error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1][:120]})
    return rows


def large(n: int = 100_000) -> dict:
    """cleanup on n nodes: a chain alternating Identity and Add of a (duplicated) constant."""
    import graphopt
    from onnx import TensorProto, helper, numpy_helper
    from graphopt.passbase import PassContext

    nodes, inits = [], []
    for i in range(n // 2):
        nodes.append(helper.make_node("Identity", [f"t{i}"], [f"u{i}"]))
        nodes.append(helper.make_node("Add", [f"u{i}", f"c{i % 100}"], [f"t{i + 1}"]))
    inits = [numpy_helper.from_array(np.ones(4, np.float32), f"c{j}") for j in range(100)]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info(f"t{n // 2}", TensorProto.FLOAT, [4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = graphopt.plugins.get_registry().get_pass("cleanup")()
    t0 = time.perf_counter()
    out = p.run(graphopt.Graph(m), PassContext(verify=False))
    secs = time.perf_counter() - t0
    return {"nodes_before": n, "nodes_after": len(out.graph.node), "seconds": round(secs, 2),
            "merged_initializers": p.notes.get("dedup-initializers.merged_initializers")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(CORPUS))
    ap.add_argument("--skip-corpus", action="store_true")
    ap.add_argument("--skip-hostile", action="store_true")
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args()
    models = [] if args.skip_corpus else [m for m in args.models.split(",") if m]
    missing = [m for m in models if not (CACHE / f"{m}.onnx").is_file()]
    if missing:
        sys.exit(f"models not in {CACHE}: {', '.join(missing)} (see shared/MODELS.md)")
    rows = corpus(models)
    if rows:
        print_corpus(rows)
    if not args.skip_hostile:
        print("\nhostile model (ConstantOfShape 2^28 floats -> Slice 4): memory each engine adds")
        for r in hostile():
            print("  " + json.dumps(r))
    if not args.skip_large:
        print("\ncleanup on a 100,000-node graph:")
        print("  " + json.dumps(large()))


def print_corpus(rows: list[dict]) -> None:
    print(f"{'model':<13}{'nodes':>7} | " + " | ".join(f"{e:^28}" for e in ENGINES))
    print(f"{'':<13}{'':>7} | " + " | ".join(f"{'nodes':>7}{'secs':>8}{'max abs err':>13}" for _ in ENGINES))
    for r in rows:
        cells = []
        for e in ENGINES:
            c = r[e]
            cells.append(f"{c['error'][:28]:<28}" if "error" in c else
                         f"{c['nodes']:>7}{c['seconds']:>8.2f}{(c['max_abs'] if c['max_abs'] is not None else float('nan')):>13.2e}")
        print(f"{r['model']:<13}{r['nodes']:>7} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
