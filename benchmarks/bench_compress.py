#!/usr/bin/env python
"""Compression benchmark: what each prune / share / distill pipeline costs in accuracy and buys in size,
FLOPs and speed — the table of issue 14, next to the quantization benchmark's.

1. Trains the digits CNN and MLP here (``graphopt.testing.digits_models``, seeded, 60 epochs), calibrates on
   256 training images and evaluates on the 450 held-out ones.
2. Per model and pipeline: ``graphopt.optimize`` with ``--data``/``--eval``, the saved ``.onnx``'s size next
   to the float model's (after ``cleanup``, as every row), the initializer bytes (``compare.weight_bytes``)
   and stored parameters (``graph_stats``; a codebook's indices count one each) and FLOPs of one run (``compare.inference_flops``:
   weights decoded in the graph are computed once, at lower time, and not counted), the held-out accuracy and its
   change, top-1 agreement with the float model; then ``graphopt.lower`` for the CPU with ``--verify`` (the
   artifact checked against the graph it compiled) and its size. All artifacts of a model are timed in one
   interleaved run (``graphopt.bench.measure``, worker processes, same threads) at batch 1 and at batch 64,
   next to ONNX Runtime fp32 on the float model; speed-ups are against the float artifact of the same run.
3. Knowledge distillation: a binary-weight student of the CNN's architecture (first and last layers float)
   trained with ``graphopt.distill`` from the float CNN's graph (no labels, 20 epochs, Adam 0.01, seed 1),
   then ``share(bits=1,per=channel,exact=true)`` to store its binary layers packed (the float first and last left as they are); same columns.

Usage::

    python benchmarks/bench_compress.py                      # everything (about 10 minutes on 2 cores)
    python benchmarks/bench_compress.py --models cnn --pipelines float,prune90 --seconds 1 --no-kd
    python benchmarks/bench_compress.py --json out.json

Absolute times depend on the machine and its load; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PIPELINES = {
    "float": "",
    "prune50+static": "prune(sparsity=0.5),quantize(mode=static)",
    "prune90": "prune(sparsity=0.9)",
    "prune2:4": "prune(pattern=2:4)",
    "channel30": "prune(structure=channel,ratio=0.3)",
    # exact channel counts (11, 22, 45): what multiple=8 (the default) avoids
    "channel30-exact": "prune(structure=channel,ratio=0.3,multiple=1)",
    "share4": "share(bits=4)",
    "share4-channel": "share(bits=4,per=channel)",
    "lowrank30": "distill(method=low-rank,ratio=0.3)",
}
#: The issue's bars per pipeline label: (most points lost, what else must hold, checked on the row).
BARS = {
    "prune50+static": (1.0, None),
    "prune90": (3.0, ("file_ratio", 3.0)),
    "prune2:4": (1.0, None),
    "channel30": (2.0, ("flops_cut", 0.30)),
    "share4": (1.0, ("weight_ratio", 6.0)),
    "lowrank30": (1.0, ("params_cut", 0.30)),
    "kd-binary": (3.0, None),
}


def weight_params(graph) -> int:
    """Parameters of the Conv/Gemm/MatMul weights as the float model holds them (counted on the graph)."""
    from graphopt.stats import graph_stats

    return graph_stats(graph).params


def file_bytes(graph, path: Path) -> int:
    graph.save(path)
    return path.stat().st_size


def kd_student(m, seed: int = 1):
    """A binary-weight student of the digits CNN's architecture distilled from its float graph."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import graphopt
    from graphopt.testing import digits_cnn_module

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    x_tr, _, _, _ = train_test_split(x, digits.target, test_size=0.25, random_state=0)  # digits_models' split
    torch.manual_seed(seed)
    student = digits_cnn_module()
    g = graphopt.distill(m["cnn"], student, {"image": x_tr}, epochs=20, lr=0.01, weights="binary", seed=seed,
                         progress=False)
    return g


def model_rows(args, work: Path, name: str, m, extra: dict) -> list[dict]:
    import graphopt
    from graphopt.accuracy import EvalSet, top1_accuracy, top1_agreement
    from graphopt.bench import measure
    from graphopt.compare import inference_flops, weight_bytes
    from graphopt.data import DataSource
    from graphopt.stats import graph_stats

    from bench_cpu import dir_bytes

    d = m["data"]
    ev = EvalSet([d["eval"]], d["labels"], source="digits held-out (450)")
    g = m[name]
    float_pred = ev.predictions(g)
    float_acc = top1_accuracy(float_pred, d["labels"])
    base = graph_stats(g)
    base_flops = inference_flops(g)
    base_weights = weight_bytes(g)
    g.save(work / f"{name}.onnx")
    # sizes against the float model after cleanup (what the float row lowers), so every row is cleaned alike
    float_file = file_bytes(graphopt.optimize(g, "cleanup").graph, work / f"{name}-cleanup.onnx")
    rows, runners = [], {"ort-fp32": ("ort", str(work / f"{name}.onnx"))}
    jobs = [(label, PIPELINES[label], g) for label in args.pipelines] + \
           [(label, text, start) for label, (text, start) in extra.items()]
    for label, text, start in jobs:
        t0 = time.perf_counter()
        try:
            res = graphopt.optimize(start, ("cleanup," + text + ",cleanup") if text else "cleanup",
                                    data=DataSource(feeds=[d["calib"]]), eval=ev)
        except graphopt.GraphoptError as e:
            print(f"[digits-{name} {label}] skipped: {e}", flush=True)
            continue
        opt_s = time.perf_counter() - t0
        out_graph = res.graph
        pred = ev.predictions(out_graph)
        st = graph_stats(out_graph)
        size = file_bytes(out_graph, work / f"{name}-{label}.onnx")
        art = work / f"{name}-{label}"
        t0 = time.perf_counter()
        lowered = graphopt.lower(out_graph, "cpu", art, verify=True, threads=args.threads)
        lower_s = time.perf_counter() - t0
        acc = top1_accuracy(pred, d["labels"])
        row = {"model": f"digits-{name}", "label": label, "pipeline": text or "(float)",
               "accuracy": acc, "float_accuracy": float_acc, "drop": float_acc - acc,
               "agreement": top1_agreement([float_pred], [pred]),
               "file_bytes": size, "file_ratio": float_file / size,
               "weight_bytes": weight_bytes(out_graph), "weight_ratio": base_weights / weight_bytes(out_graph),
               "params": st.params, "params_cut": 1 - st.params / base.params,
               "flops": inference_flops(out_graph), "flops_cut": 1 - inference_flops(out_graph) / base_flops,
               "artifact_bytes": dir_bytes(art), "optimize_s": opt_s, "lower_s": lower_s,
               "verification": lowered.verification.summary() if lowered.verification else None}
        rows.append(row)
        runners[label] = ("graphopt", str(art))
        print(f"[digits-{name} {label}] acc {acc:.2f} ({acc - float_acc:+.2f}) agree {row['agreement']:.1f}%, "
              f"file {row['file_ratio']:.2f}x smaller, weights {row['weight_ratio']:.2f}x, params {-row['params_cut']:+.1%}, "
              f"FLOPs {-row['flops_cut']:+.1%}"
              f", artifact {row['artifact_bytes'] / 1024:.0f} KiB", flush=True)
    for batch in (1, 64):
        feed = {"image": np.ascontiguousarray(np.resize(d["eval"]["image"], (batch, 1, 8, 8)))}
        m_ = measure(runners, feed, ["logits"], threads=args.threads, seconds=args.seconds, warmup=3)
        lat = {k: v.get("median_ms") for k, v in m_["runtimes"].items()}
        for row in rows:
            row[f"latency_b{batch}_ms"] = lat.get(row["label"])
            row[f"ort_fp32_b{batch}_ms"] = lat.get("ort-fp32")
            f = lat.get("float")
            row[f"speedup_b{batch}"] = f / lat[row["label"]] if f and lat.get(row["label"]) else None
        print(f"[digits-{name} batch {batch}] " + ", ".join(f"{k} {v:.4f} ms" for k, v in lat.items() if v),
              flush=True)
    for row in rows:
        bar = BARS.get(row["label"])
        if bar:
            most, extra_bar = bar
            ok = row["drop"] <= most and (extra_bar is None or (row.get(extra_bar[0]) or 0) >= extra_bar[1])
            row["meets_bar"] = bool(ok)
            row["bar"] = f"<= {most} pt" + (f", {extra_bar[0]} >= {extra_bar[1]}" if extra_bar else "")
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | pipeline | accuracy (Δ pt) | agree | file smaller | weights smaller | params cut | FLOPs cut "
            "| artifact KiB | b1 ms (× float) | b64 ms (× float) | ORT fp32 b1 / b64 ms | bar |")
    lines = [head, "|" + " --- |" * 13]
    for r in rows:
        wr = f"{r['weight_ratio']:.2f}×"
        bar = "" if "meets_bar" not in r else (("meets " if r["meets_bar"] else "MISSES ") + r["bar"])
        what = f"`{r['pipeline']}`" if r["label"] != "kd-binary" else \
            f"binary student (`graphopt.distill`), then `{r['pipeline']}`"
        lines.append(
            f"| {r['model']} | {what} | {r['accuracy']:.2f} ({-r['drop']:+.2f}) | {r['agreement']:.1f}% | "
            f"{r['file_ratio']:.2f}× | {wr} | {r['params_cut']:.1%} | {r['flops_cut']:.1%} | "
            f"{r['artifact_bytes'] / 1024:.0f} | {r['latency_b1_ms']:.4f} ({r['speedup_b1']:.2f}×) | "
            f"{r['latency_b64_ms']:.4f} ({r['speedup_b64']:.2f}×) | {r['ort_fp32_b1_ms']:.4f} / "
            f"{r['ort_fp32_b64_ms']:.4f} | {bar} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,mlp", help="digits models: cnn, mlp (comma-separated)")
    ap.add_argument("--pipelines", default=",".join(PIPELINES), help="labels of PIPELINES (comma-separated)")
    ap.add_argument("--no-kd", action="store_true", help="skip the graphopt.distill binary-student row")
    ap.add_argument("--epochs", type=int, default=60, help="training epochs of the digits models")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=2.0, help="timing per runner and batch")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--table-from", help="print the table of a --json file written before, and stop")
    args = ap.parse_args(argv)
    if args.table_from:
        print(table(json.loads(Path(args.table_from).read_text())["rows"]))
        return 0
    args.models = [x for x in args.models.split(",") if x]
    args.pipelines = [x for x in args.pipelines.split(",") if x]
    unknown = [p for p in args.pipelines if p not in PIPELINES]
    if unknown:
        ap.error(f"unknown pipeline label(s) {unknown}; known: {', '.join(PIPELINES)}")

    from graphopt.testing import digits_models

    from bench_cpu import environment, git_commit, isa_summary

    env = environment()
    print(f"machine: {env['cpu_model']} (LLVM cpu '{env['host_cpu']}', {isa_summary()}), {env['cpu_count']} cores; "
          f"commit {git_commit()}", flush=True)
    t0 = time.perf_counter()
    m = digits_models(epochs=args.epochs)
    print(f"trained the digits CNN and MLP ({args.epochs} epochs) in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_compress_") as tmp:
        work = Path(tmp)
        for name in args.models:
            extra = {}
            if name == "cnn" and not args.no_kd:
                t0 = time.perf_counter()
                student = kd_student(m)
                print(f"distilled a binary-weight student in {time.perf_counter() - t0:.1f} s", flush=True)
                extra["kd-binary"] = ("share(bits=1,per=channel,exact=true)", student)
            rows += model_rows(args, work, name, m, extra)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
