#!/usr/bin/env python
"""CPU benchmark: graphopt's lowered TVM artifact vs ONNX Runtime (and torch eager), measured in one run.

For each model this script

1. builds the ONNX graph (torch test models: ``graphopt.capture`` at their example
   batch size, static shapes; real models: the pre-trained .onnx from
   ``graphopt.testing.fetch_real_model`` with its symbolic dims fixed);
2. times ``graphopt.lower(graph, "cpu", ...)`` end to end (passes + TVM import +
   TVM compile + writing the artifact), and separately the TVM compile step;
3. runs the artifact (``art.programs["main"](arrays)``, no Python-side checks),
   ONNX Runtime on the same ONNX model (default session options,
   CPUExecutionProvider) and, for torch models, torch eager under
   ``torch.inference_mode``, all on the same inputs and with ``--threads``
   threads (default ``os.cpu_count()``), and checks the outputs agree (a
   mismatching TVM result is reported, never timed);
4. times them interleaved (ORT, TVM, torch, ORT, TVM, torch, ...) after a warm-up,
   with a repeat count chosen per runtime so each measurement takes about
   ``--target-seconds`` (at least ``--min-runs`` runs, at most ``--max-seconds``);
5. prints median / p10 / p90 latency and each runtime's median as a ratio of ONNX
   Runtime's median in the same run (ORT = 1.00x).

Usage::

    python benchmarks/bench_cpu.py                         # all six models
    python benchmarks/bench_cpu.py --models mlp,cnn --repeat 50 --json out.json
    python benchmarks/bench_cpu.py --cache ~/.cache/graphopt/models
    python benchmarks/bench_cpu.py --threads 1                # single-thread comparison

Absolute times depend on the machine and its load; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

TORCH_MODELS = ("mlp", "cnn", "transformer")
REAL_MODEL_NAMES = ("magika", "ppocr-cls", "ppocrv4-det")
ALL_MODELS = TORCH_MODELS + REAL_MODEL_NAMES
RUNTIMES = ("ort", "tvm", "torch")  # order within one round


# --------------------------------------------------------------------------- helpers


class StepTimes:
    """A stand-in for graphopt.console.Progress that records how long each named step took."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, label: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[label] = self.times.get(label, 0.0) + time.perf_counter() - t0


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    from graphopt.artifact import versions
    from graphopt.targets.cpu import host_cpu

    vers = versions()
    try:
        import torch

        vers["torch"] = torch.__version__
    except ModuleNotFoundError:
        vers["torch"] = None
    try:
        import onnxruntime

        vers["onnxruntime"] = onnxruntime.__version__
    except ModuleNotFoundError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": host_cpu(),
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
        "loadavg_start": loadavg(),
        "git": git_commit(),
        "versions": vers,
    }


def stats(times: list[float]) -> dict:
    a = np.asarray(times, dtype=np.float64)
    return {
        "runs": int(a.size),
        "median_ms": float(np.median(a) * 1e3),
        "p10_ms": float(np.percentile(a, 10) * 1e3),
        "p90_ms": float(np.percentile(a, 90) * 1e3),
        "min_ms": float(a.min() * 1e3),
        "mean_ms": float(a.mean() * 1e3),
    }


def max_abs_diff(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Worst |got - ref| over all outputs (inf on a shape mismatch or a NaN/inf disagreement)."""
    if len(ref) != len(got):
        return float("inf")
    worst = 0.0
    for r, g in zip(ref, got):
        r = np.asarray(r, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        if r.shape != g.shape:
            return float("inf")
        fr, fg = np.isfinite(r), np.isfinite(g)
        if not np.array_equal(fr, fg) or not np.array_equal(r[~fr], g[~fg]):
            return float("inf")
        if r.size:
            worst = max(worst, float(np.abs(r[fr] - g[fg]).max(initial=0.0)))
    return worst


def agree(ref: list[np.ndarray], got: list[np.ndarray], atol: float, rtol: float) -> bool:
    from graphopt.reference import compare_outputs

    names = [f"out{i}" for i in range(len(ref))]
    return len(ref) == len(got) and compare_outputs([ref], [got], names, atol=atol, rtol=rtol).ok


# --------------------------------------------------------------------------- models


class Skip(Exception):
    """The model cannot be benchmarked here (e.g. its download failed); the message says why."""


_TORCH_MODELS = None


def load_model(name: str, cache_dir):
    """``(graph, input_shapes, feed, torch_module, torch_inputs, info)`` for one model, or raise :class:`Skip`."""
    global _TORCH_MODELS
    import graphopt
    from graphopt.data import generate_inputs
    from graphopt.graph import Graph
    from graphopt.testing import REAL_MODELS, fetch_real_model

    if name in TORCH_MODELS:
        if _TORCH_MODELS is None:
            from graphopt.testing import torch_models

            _TORCH_MODELS = torch_models()
        module, example = _TORCH_MODELS[name]
        t0 = time.perf_counter()
        graph = graphopt.capture(module, example)
        info = {"capture_s": time.perf_counter() - t0}
        feed = {s.name: t.detach().cpu().numpy() for s, t in zip(graph.inputs, example)}
        return graph, None, feed, module, tuple(example), info
    try:
        path = fetch_real_model(name, cache_dir)
    except Exception as e:  # noqa: BLE001 - ModelUnavailable or any other fetch problem: a skip, not a crash
        raise Skip(f"model not available: {type(e).__name__}: {e}") from e
    spec = REAL_MODELS[name]
    graph = Graph.load(path)
    feed = generate_inputs(graph.with_input_shapes(spec.input_shapes), seed=0)[0]
    return graph, dict(spec.input_shapes), feed, None, None, {"path": str(path)}


# --------------------------------------------------------------------------- timing


def warmup(fn, min_calls: int, min_seconds: float, max_seconds: float) -> list[float]:
    """Call ``fn`` at least ``min_calls`` times and for ``min_seconds``, stopping after ``max_seconds``."""
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        if (len(times) >= min_calls and spent >= min_seconds) or spent >= max_seconds:
            return times


def plan_runs(per_call: float, args) -> int:
    if args.repeat:
        return args.repeat
    n = max(args.min_runs, math.ceil(args.target_seconds / max(per_call, 1e-7)))
    n = min(n, args.max_runs)
    if n * per_call > args.max_seconds:  # a slow runtime: stay inside the per-measurement cap
        n = max(args.floor_runs, int(args.max_seconds / per_call))
    return n


def measure(fns: dict, counts: dict, budget_s: float, floor_runs: int) -> dict[str, list[float]]:
    """Time each ``fns[r]`` ``counts[r]`` times, interleaved round by round and spread evenly.

    Runtime r runs in round i when floor((i+1)*n_r/R) > floor(i*n_r/R), R = max n_r,
    so a runtime with fewer runs still has them spread across the whole measurement.
    A runtime stops early once its timed runs add up to ``budget_s`` (and it has
    ``floor_runs``), so a runtime that turns slow mid-way cannot stall the benchmark.
    """
    rounds = max(counts.values())
    times = {r: [] for r in fns}
    spent = dict.fromkeys(fns, 0.0)
    perf = time.perf_counter
    for i in range(rounds):
        for r, fn in fns.items():
            n = counts[r]
            if (i + 1) * n // rounds > i * n // rounds and (spent[r] < budget_s or len(times[r]) < floor_runs):
                t0 = perf()
                fn()
                dt = perf() - t0
                times[r].append(dt)
                spent[r] += dt
    return times


# --------------------------------------------------------------------------- one model


def bench_model(name, graph, input_shapes, feed, module, example, info, args, workdir) -> dict:
    import onnxruntime as ort

    import graphopt

    rec: dict = {"model": name, **info}
    ref_graph = graph.with_input_shapes(input_shapes or {})
    rec["inputs"] = {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in feed.items()}

    # --- compile
    out_dir = Path(workdir) / name
    steps = StepTimes()
    t0 = time.perf_counter()
    graphopt.lower(graph, "cpu", out_dir, input_shapes=input_shapes, progress=steps)
    rec["compile_s"] = time.perf_counter() - t0
    rec["compile_steps_s"] = steps.times
    rec["tvm_compile_s"] = next((v for k, v in steps.times.items() if k.startswith("compile for")), None)
    art = graphopt.load(out_dir)
    prog = art.programs["main"]
    tvm_args = [np.ascontiguousarray(feed[s.name]) for s in art.inputs]

    # --- runtimes
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(ref_graph.to_bytes(), so, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    fns = {
        "ort": lambda: sess.run(out_names, feed),
        "tvm": lambda: prog(tvm_args),
    }
    if module is not None:
        import torch

        torch.set_num_threads(args.threads)
        tin = tuple(example)

        def run_torch():
            with torch.inference_mode():
                return module(*tin)

        fns["torch"] = run_torch

    # --- correctness (also the first warm-up call of each runtime)
    ref = [np.asarray(x) for x in sess.run(out_names, feed)]
    got = prog(tvm_args)
    rec["tvm_max_abs_diff"] = max_abs_diff(ref, got)
    rec["tvm_ok"] = agree(ref, got, args.atol, args.rtol)
    if "torch" in fns:
        import torch

        tout = fns["torch"]()
        touts = [tout] if isinstance(tout, torch.Tensor) else list(tout)
        touts = [t.detach().cpu().numpy() for t in touts]
        rec["torch_max_abs_diff"] = max_abs_diff(ref, touts)
        rec["torch_ok"] = agree(ref, touts, args.atol, args.rtol)
    if not rec["tvm_ok"]:
        rec["tvm_skipped"] = (f"TVM output differs from ONNX Runtime (max abs diff {rec['tvm_max_abs_diff']:.3g}, "
                              f"tolerance {args.atol:g} + {args.rtol:g}*max|ref|): not timed")
        del fns["tvm"]
    if "torch" in fns and not rec["torch_ok"]:
        rec["torch_skipped"] = "torch output differs from ONNX Runtime: not timed"
        del fns["torch"]

    # --- warm-up, then plan a repeat count per runtime from the warm-up's median call time
    counts = {}
    rec["warmup_ms"] = {}
    for r, fn in fns.items():
        w = warmup(fn, args.warmup, args.warmup_seconds, args.max_seconds / 2)
        rec["warmup_ms"][r] = [t * 1e3 for t in w]
        per_call = float(np.median(w[1:] if len(w) > 1 else w))
        counts[r] = plan_runs(per_call, args)
    rec["planned_runs"] = counts

    t0 = time.perf_counter()
    times = measure(fns, counts, max(args.max_seconds, args.target_seconds), args.floor_runs)
    rec["measure_s"] = time.perf_counter() - t0
    rec["loadavg"] = loadavg()
    rec["times_ms"] = {r: [t * 1e3 for t in ts] for r, ts in times.items()}
    rec["stats"] = {r: stats(ts) for r, ts in times.items()}
    base = rec["stats"]["ort"]["median_ms"]
    rec["ratio_vs_ort"] = {r: s["median_ms"] / base for r, s in rec["stats"].items()}
    return rec


# --------------------------------------------------------------------------- output


def fmt_ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f}s"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_lat(rec: dict, r: str) -> tuple[str, str, str]:
    s = rec.get("stats", {}).get(r)
    if s is None:
        why = rec.get(f"{r}_skipped")
        return ("wrong" if why else "-", "", "")
    return (fmt_ms(s["median_ms"]), f"{fmt_ms(s['p10_ms'])}-{fmt_ms(s['p90_ms'])}",
            f"{rec['ratio_vs_ort'][r]:.2f}x")


def fmt_diff(d) -> str:
    if d is None:
        return "-"
    return "0" if d == 0 else f"{d:.1e}"


def render_table(results: list[dict]) -> str:
    head = ["model", "compile s", "(tvm s)", "ORT ms", "p10-p90", "TVM ms", "p10-p90", "TVM/ORT",
            "torch ms", "p10-p90", "torch/ORT", "|TVM-ORT|", "|torch-ORT|", "runs o/t/p"]
    rows = []
    notes = []
    for rec in results:
        if "error" in rec or "skipped" in rec:
            rows.append([rec["model"], "skipped" if "skipped" in rec else "error"] + [""] * (len(head) - 2))
            notes.append(f"{rec['model']}: {rec.get('skipped') or rec.get('error')}")
            continue
        o = fmt_lat(rec, "ort")
        t = fmt_lat(rec, "tvm")
        p = fmt_lat(rec, "torch")
        runs = "/".join(str(rec["stats"][r]["runs"]) if r in rec["stats"] else "-" for r in RUNTIMES)
        tvm_c = rec.get("tvm_compile_s")
        rows.append([
            rec["model"], f"{rec['compile_s']:.1f}", f"{tvm_c:.1f}" if tvm_c is not None else "-",
            o[0], o[1], t[0], t[1], t[2], p[0], p[1], p[2],
            fmt_diff(rec.get("tvm_max_abs_diff")), fmt_diff(rec.get("torch_max_abs_diff")), runs,
        ])
        for r in ("tvm", "torch"):
            if rec.get(f"{r}_skipped"):
                notes.append(f"{rec['model']}: {rec[f'{r}_skipped']}")
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells):  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    if notes:
        out.append("")
        out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def render_header(env: dict, args) -> str:
    v = env["versions"]
    lines = [
        f"host: {env['cpu_model']} (LLVM cpu '{env['host_cpu']}'), {env['cpu_count']} cores"
        + (f" ({env['affinity']} usable)" if env.get("affinity") not in (None, env["cpu_count"]) else "")
        + f", {env['platform']}"
        + (f"; load average {env['loadavg_start'][0]:.2f}" if env.get("loadavg_start") else ""),
        "versions: " + ", ".join(f"{k} {v[k]}" for k in
                                 ("graphopt", "apache-tvm", "onnxruntime", "torch", "onnx", "numpy", "python")
                                 if v.get(k)) + (f", git {env['git']}" if env.get("git") else ""),
        f"threads: ORT intra_op={args.threads}, torch={args.threads}, TVM_NUM_THREADS={args.threads}; "
        + (f"fixed {args.repeat} runs per runtime" if args.repeat else
           f"~{args.target_seconds:g}s per measurement, >= {args.min_runs} runs, cap {args.max_seconds:g}s"),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ALL_MODELS),
                   help=f"comma-separated subset of {','.join(ALL_MODELS)} (default: all)")
    p.add_argument("--repeat", type=int, default=0,
                   help="fixed number of timed runs per runtime (default: adaptive, see --target-seconds)")
    p.add_argument("--target-seconds", type=float, default=1.5,
                   help="adaptive repeat: aim for this much time per runtime measurement (default 1.5)")
    p.add_argument("--min-runs", type=int, default=5, help="adaptive repeat: at least this many runs (default 5)")
    p.add_argument("--max-runs", type=int, default=5000, help="adaptive repeat: at most this many runs (default 5000)")
    p.add_argument("--max-seconds", type=float, default=8.0,
                   help="cap per runtime measurement for slow runtimes; fewer than --min-runs (but at least "
                        "--floor-runs) are taken when one call is this slow (default 8)")
    p.add_argument("--floor-runs", type=int, default=3, help="fewest timed runs under --max-seconds (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per runtime before timing (default 3)")
    p.add_argument("--warmup-seconds", type=float, default=0.2,
                   help="keep warming up for at least this long (default 0.2)")
    p.add_argument("--atol", type=float, default=1e-3, help="TVM/torch vs ORT check: absolute tolerance")
    p.add_argument("--rtol", type=float, default=1e-3, help="TVM/torch vs ORT check: tolerance relative to max|ref|")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for every runtime: ORT intra_op_num_threads, torch.set_num_threads and "
                        "TVM_NUM_THREADS (default: all cores, os.cpu_count())")
    p.add_argument("--json", metavar="PATH", help="write the raw numbers (every timed run) here")
    p.add_argument("--cache", metavar="DIR", help="cache folder for the downloaded real models "
                   "(default: $GRAPHOPT_MODEL_CACHE or ~/.cache/graphopt/models)")
    p.add_argument("--keep", metavar="DIR", help="write the lowered artifacts under DIR instead of a temp folder")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in names if m not in ALL_MODELS]
    if bad:
        p.error(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(ALL_MODELS)}")
    if args.repeat < 0 or args.min_runs < 1 or args.floor_runs < 1 or args.threads < 1:
        p.error("--repeat, --min-runs, --floor-runs and --threads must be positive")
    args.model_names = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    # TVM's runtime thread pool reads this once, when first used; set it before anything runs.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    env = environment()
    print(render_header(env, args), flush=True)
    results = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            workdir = Path(args.keep)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphopt-bench-")))
        for name in args.model_names:
            t0 = time.perf_counter()
            try:
                graph, shapes, feed, module, example, info = load_model(name, args.cache)
            except Skip as e:
                results.append({"model": name, "skipped": str(e)})
                print(f"[{name}] skipped: {e}", flush=True)
                continue
            except Exception as e:  # noqa: BLE001 - e.g. a capture failure: report it, go on
                results.append({"model": name, "error": f"could not build the model: {_one_line(e)}",
                                "traceback": traceback.format_exc()})
                print(f"[{name}] error: {results[-1]['error']}", flush=True)
                continue
            print(f"[{name}] lowering and timing ...", flush=True)
            try:
                rec = bench_model(name, graph, shapes, feed, module, example, info, args, workdir)
            except Exception as e:  # noqa: BLE001
                rec = {"model": name, "error": _one_line(e), "traceback": traceback.format_exc()}
                print(f"[{name}] error: {rec['error']}", flush=True)
            else:
                s = rec["stats"]
                print(f"[{name}] compile {rec['compile_s']:.1f}s; " + ", ".join(
                    f"{r} {fmt_ms(s[r]['median_ms'])} ms ({rec['ratio_vs_ort'][r]:.2f}x)" for r in s)
                    + f"; {time.perf_counter() - t0:.0f}s total", flush=True)
            results.append(rec)
    total = time.perf_counter() - t_start
    print()
    print(render_table(results))
    busy = max((r["loadavg"][0] for r in results if r.get("loadavg")), default=0.0)
    if busy > 0.25 * (os.cpu_count() or 1):
        print(f"\nnote: the machine was busy while measuring (1-min load average up to {busy:.2f} on "
              f"{os.cpu_count()} cores): absolute times are noisy, thread-pool runtimes (torch/OpenMP) most of all")
    print(f"\nlatency: median over timed runs, ms; ratio = median / ORT median in this run (ORT = 1.00x); "
          f"total {total:.0f}s")
    if args.json:
        env["loadavg_end"] = loadavg()
        doc = {"environment": env, "settings": vars(args), "total_s": total, "results": results}
        Path(args.json).write_text(json.dumps(_finite(doc), indent=2, default=str) + "\n", encoding="utf-8")
        print(f"raw numbers: {args.json}")
    return 1 if any("error" in r for r in results) else 0


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _finite(o):
    """JSON-safe copy: numpy scalars as Python numbers, inf/nan as strings (strict JSON has neither)."""
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return o


if __name__ == "__main__":
    sys.exit(main())
