#!/usr/bin/env python
"""CPU benchmark: ONE table, model × batch × {graphopt default, graphopt tuned, ONNX Runtime fp32, torch eager}.

For each model (builders in ``benchmarks/models.py``) this script

1. builds the ONNX graph (torch models captured with ``graphopt.capture``; ``resnet18`` and
   ``encoder`` with a dynamic batch, so ONE artifact serves batch 1 and 8; real models from the
   corpus with their shapes and fixed values);
2. lowers it with ``graphopt.lower`` (default schedules), timing the whole call; with ``--tune
   TRIALS`` lowers it a second time with ``tune=TRIALS, tuning_db=--tuning-db`` (otherwise the
   tuned column says "not run"); MetaSchedule can only measure kernels of concrete shapes, so for
   a model with a dynamic batch the tuned artifact is lowered per batch with that batch fixed;
3. per batch, runs ``graphopt.bench.measure``: every runtime in a worker process of its own
   (graphopt default, graphopt tuned, ONNX Runtime on the model as given (the original file or the
   captured graph, not graphopt's rewritten ``model.onnx``) with its default graph optimizations, torch
   eager under ``inference_mode`` for torch models), all on the
   same inputs and ``--threads`` threads; outputs are checked against ONNX Runtime first (a runtime
   that disagrees is reported, never timed); then warm-up and interleaved rounds (graphopt, tuned,
   ORT, torch, graphopt, ...) for ``--seconds``;
4. prints one markdown table: median latency, ratio to ONNX Runtime's median in the same run,
   lowering and tuning time, each runtime process's peak RSS, artifact size; and the geometric mean
   of the graphopt/ORT ratios.

Usage::

    python benchmarks/bench_cpu.py                          # every model, default settings
    python benchmarks/bench_cpu.py --models mlp,resnet18 --json out.json
    python benchmarks/bench_cpu.py --tune 2000 --tuning-db ~/.cache/graphopt/tuning
    python benchmarks/bench_cpu.py --threads 1              # single-thread comparison

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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models as bench_models  # noqa: E402  (benchmarks/models.py, beside this script)

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
        "tvm_num_threads_env": os.environ.get("TVM_NUM_THREADS"),
        "loadavg_start": loadavg(),
        "git": git_commit(),
        "versions": vers,
    }


def isa_summary() -> str:
    from graphopt.targets.cpu import host_isa_features

    f = host_isa_features()
    if "avx512f" in f:
        isa = "AVX-512" + ("+VNNI" if "avx512vnni" in f else "") + ("+AMX" if "amx-tile" in f else "")
    elif "avx2" in f and "fma" in f:
        isa = "AVX2+FMA"
    elif "sse4.2" in f:
        isa = "SSE4.2"
    else:
        isa = platform.machine()
    return isa


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def tuning_seconds(steps: dict) -> float | None:
    """Seconds in lowering steps whose label names tuning (what the tuner reports as its own step)."""
    tuned = [v for k, v in steps.items() if "tun" in k.lower()]
    return sum(tuned) if tuned else None


def lower_model(model, graph, shapes, values, out_dir: Path, args, tune: int = 0) -> dict:
    import graphopt

    steps = StepTimes()
    t0 = time.perf_counter()
    graphopt.lower(graph, "cpu", out_dir, input_shapes=shapes or None, input_values=values or None,
                   progress=steps, threads=args.threads, tune=tune,
                   tuning_db=args.tuning_db if tune else None)
    out = {"lower_s": time.perf_counter() - t0, "steps_s": steps.times, "tune_s": tuning_seconds(steps.times),
           "artifact_bytes": dir_bytes(out_dir), "path": str(out_dir)}
    if tune:  # what the tuner did: kernels tuned, and those it could not measure (symbolic shapes)
        out["tuning"] = json.loads((out_dir / "manifest.json").read_text()).get("tuning")
    return out


def work_folder(stack: contextlib.ExitStack, keep: str | None, prefix: str) -> Path:
    """``keep`` (created if missing) when given, else a temporary folder removed when ``stack`` closes."""
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))


def tuned_shapes(graph, feed: dict, shapes: dict | None, values: dict | None) -> dict:
    """Input shapes for the tuned lowering of one batch: the model's, with every symbolic dim fixed.

    MetaSchedule measures kernels on concrete arguments, so a kernel with a symbolic (dynamic
    batch) extent cannot be tuned: the tuned column lowers one static-shape artifact per batch
    (the default column keeps ONE dynamic-batch artifact for every batch).
    """
    out = {k: list(v) for k, v in (shapes or {}).items()}
    for spec in graph.inputs:
        if spec.name in (values or {}) or spec.name in out or spec.name not in feed:
            continue
        if any(not isinstance(d, int) for d in spec.shape):
            out[spec.name] = [int(d) for d in feed[spec.name].shape]
    return out


def bench_model(model, args, workdir: Path) -> list[dict]:
    """Rows (one per batch) for one model; raises on a failure to build or lower it."""
    from graphopt.bench import _ms, measure

    t0 = time.perf_counter()
    graph, shapes, values = bench_models.build(model, args.cache)
    build_s = time.perf_counter() - t0
    default = lower_model(model, graph, shapes, values, workdir / model.name, args)
    import graphopt

    art = graphopt.load(default["path"], threads=args.threads)  # reads the manifest: input/output names
    names = [o.name for o in art.outputs]
    # ONNX Runtime runs the model as the user has it (not graphopt's cleaned-up, unrolled model.onnx),
    # with the values graphopt fixed (--input-value) fed as inputs.
    original = workdir / f"{model.name}.original.onnx"
    graph.save(original)
    dtypes = {s.name: s.dtype for s in graph.inputs}
    fixed = {k: np.asarray(v, dtype=dtypes[k]) for k, v in (values or {}).items()}
    rows = []
    tuned_static: dict = {}  # lowered once when the inputs are static, else once per batch (see tuned_shapes)
    for batch in model.batches:
        feed = {**bench_models.feed(model, batch), **fixed}
        tuned = None
        if args.tune:
            fixed_shapes = tuned_shapes(graph, feed, shapes, values)
            key = json.dumps(fixed_shapes, sort_keys=True)
            if key not in tuned_static:
                suffix = "-tuned" + (f"-b{batch}" if fixed_shapes != (shapes or {}) else "")
                tuned_static[key] = lower_model(model, graph, fixed_shapes, values,
                                                workdir / f"{model.name}{suffix}", args, tune=args.tune)
                tuned_static[key]["input_shapes"] = fixed_shapes
            tuned = tuned_static[key]
        runners = {"graphopt": ("graphopt", default["path"])}
        if tuned:
            runners["tuned"] = ("graphopt", tuned["path"])
        runners["ort"] = ("ort", str(original))
        if model.kind == "torch":
            runners["torch"] = ("python", f"{HERE / 'models.py'}:torch_runner", model.name)
        # graphopt first: it fixes the thread count every other runtime gets.
        m = measure(runners, feed, names, threads=args.threads, seconds=args.seconds, warmup=args.warmup,
                    reference="ort", atol=args.atol, rtol=args.rtol)
        rt = m["runtimes"]
        base = rt["ort"].get("median_ms")
        row = {"model": model.name, "about": model.about, "batch": batch, "threads": m["threads"],
               "build_s": build_s, "lower": default, "tuned_lower": tuned, "runtimes": rt,
               "agreement": m["agreement"], "disagree": m["disagree"], "rounds": m["rounds"],
               "measure_s": m["seconds"], "loadavg": loadavg(),
               "ratio_vs_ort": {k: v["median_ms"] / base for k, v in rt.items() if "median_ms" in v and base}}
        rows.append(row)
        print(f"[{model.name} b{batch}] " + ", ".join(
            f"{k} {_ms(v['median_ms'])} ({row['ratio_vs_ort'][k]:.2f}x)" for k, v in rt.items()
            if "median_ms" in v) + "".join(f"; {k} WRONG: {v}" for k, v in m["disagree"].items()), flush=True)
    return rows


# --------------------------------------------------------------------------- output


def fmt_ms(ms: float) -> str:
    """Milliseconds with 3 significant digits (the table's columns are all in ms)."""
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_mib(n) -> str:
    return "-" if n is None else f"{n / (1 << 20):.0f}"


def _cell(row, r: str) -> tuple[str, str]:
    if r in row.get("disagree", {}):
        return "wrong", ""
    s = row["runtimes"].get(r)
    if s is None or "median_ms" not in s:
        return "-", ""
    return fmt_ms(s["median_ms"]), f"{row['ratio_vs_ort'][r]:.2f}×"


def render_table(rows: list[dict], args) -> str:
    head = ["model", "batch", "graphopt ms", "×ORT", "tuned ms", "×ORT", "ORT ms", "torch ms", "×ORT",
            "lower s", "tune s", "RSS MiB g/t/o/p", "artifact MiB"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    notes = []
    for row in rows:
        if "error" in row or "skipped" in row:
            why = row.get("skipped") or row.get("error")
            out.append(f"| {row['model']} | - | " + " | ".join(["-"] * (len(head) - 2)) + " |")
            notes.append(f"{row['model']}: {why}")
            continue
        g, t, o, p = (_cell(row, r) for r in ("graphopt", "tuned", "ort", "torch"))
        if row.get("tuned_lower") is None:
            t = ("not run", "")
        tl = row.get("tuned_lower") or {}
        tune_s = tl.get("tune_s")
        rss = "/".join(fmt_mib(row["runtimes"][r]["peak_rss_bytes"]) if r in row["runtimes"] else "-"
                       for r in ("graphopt", "tuned", "ort", "torch"))
        out.append("| " + " | ".join([
            row["model"], str(row["batch"]), g[0], g[1], t[0], t[1], o[0], p[0], p[1],
            f"{row['lower']['lower_s']:.1f}",
            "not run" if not tl else (f"{tune_s:.0f}" if tune_s is not None else f"({tl['lower_s']:.0f})"),
            rss, f"{row['lower']['artifact_bytes'] / (1 << 20):.1f}",
        ]) + " |")
        tuning = tl.get("tuning") or {}
        same = [r for r in rows if r["model"] == row["model"] and (r.get("tuned_lower") or {}).get("path") == tl.get("path")]
        if tuning and row is same[0]:
            static = tl.get("input_shapes") or {}
            notes.append(f"{row['model']} tuned" + (f" (batch {row['batch']}, lowered with static shapes "
                                                    + ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in static.items())
                                                    + ")" if len(same) < len([r for r in rows if r["model"] == row["model"]])
                                                    else "")
                         + f": {tuning.get('tuned_tasks', 0)}/{tuning.get('tasks', 0)} kernels use "
                         f"tuned records" + (f"; {tuning['symbolic_tasks']} with symbolic shapes (dynamic batch) "
                                             "could not be tuned and kept the default schedules"
                                             if tuning.get("symbolic_tasks") else ""))
        for r, why in row.get("disagree", {}).items():
            notes.append(f"{row['model']} batch {row['batch']}: {r} output differs from ONNX Runtime ({why}); not timed")
    ratios = [row["ratio_vs_ort"]["graphopt"] for row in rows if "graphopt" in row.get("ratio_vs_ort", {})]
    if ratios:
        gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        out.append("")
        out.append(f"graphopt default / ONNX Runtime: geometric mean {gm:.2f}× over {len(ratios)} rows, "
                   f"worst {max(ratios):.2f}×")
        tr = [row["ratio_vs_ort"]["tuned"] for row in rows if "tuned" in row.get("ratio_vs_ort", {})]
        if tr:
            out.append(f"graphopt tuned / ONNX Runtime: geometric mean "
                       f"{math.exp(sum(math.log(r) for r in tr) / len(tr)):.2f}× over {len(tr)} rows")
    out.append("")
    out.append("ms: median latency of one call (numpy in, numpy out); ×ORT: that median / ONNX Runtime's median in the "
               "same interleaved run; lower s: wall time of graphopt.lower (passes, TVM import and compile, writing); "
               "tune s: the tuning steps of the tuned lowering (in parentheses: the whole tuned lowering, when the tuner "
               "reports no step of its own); RSS: peak resident set of each runtime's own process (g: graphopt, "
               "t: tuned, o: ONNX Runtime, p: torch), runtime library included; artifact: bytes on disk.")
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def render_header(env: dict, args) -> str:
    v = env["versions"]
    return "\n".join([
        f"machine: {env['cpu_model']} (LLVM cpu '{env['host_cpu']}', {env['isa']}), {env['cpu_count']} cores"
        + (f" ({env['affinity']} usable)" if env.get("affinity") not in (None, env["cpu_count"]) else "")
        + f", {env['platform']}"
        + (f"; load average {env['loadavg_start'][0]:.2f}" if env.get("loadavg_start") else ""),
        "versions: " + ", ".join(f"{k} {v[k]}" for k in
                                 ("graphopt", "apache-tvm", "onnxruntime", "torch", "onnx", "numpy", "python")
                                 if v.get(k)) + (f", git {env['git']}" if env.get("git") else ""),
        f"threads: {args.threads} for every runtime (graphopt: lowered and run with it; ORT intra_op_num_threads; "
        f"torch set_num_threads); {args.seconds:g} s of interleaved rounds per row after {args.warmup} warm-up calls"
        + (f"; tuning: {args.tune} trials, database {args.tuning_db}" if args.tune else "; tuning: not run"),
    ])


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    names = list(bench_models.catalog())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(names), help=f"comma-separated subset of {','.join(names)} (default: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every runtime (default: every core this process may use)")
    p.add_argument("--seconds", type=float, default=2.0, help="interleaved timing per row, all runtimes (default 2)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per runtime (default 3)")
    p.add_argument("--tune", type=int, default=0, metavar="TRIALS", help="also lower with this many tuning trials")
    p.add_argument("--tuning-db", metavar="DIR", help="tuning database folder for --tune (default: graphopt's)")
    p.add_argument("--atol", type=float, default=1e-3, help="agreement with ORT: absolute tolerance (default 1e-3)")
    p.add_argument("--rtol", type=float, default=1e-3, help="agreement with ORT: relative to max|ref| (default 1e-3)")
    p.add_argument("--json", metavar="PATH", help="write every number here")
    p.add_argument("--cache", metavar="DIR", help="cache folder of the real models (default: graphopt's)")
    p.add_argument("--keep", metavar="DIR", help="write the artifacts under DIR instead of a temporary folder")
    args = p.parse_args(argv)
    args.model_names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.model_names if m not in names]
    if bad:
        p.error(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(names)}")
    if args.threads is None:
        from graphopt.target import available_cores

        args.threads = available_cores()
    if args.threads < 1 or args.seconds <= 0 or args.warmup < 0 or args.tune < 0:
        p.error("--threads must be >= 1, --seconds > 0, --warmup and --tune >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    env = environment()
    env["isa"] = isa_summary()
    print(render_header(env, args), flush=True)
    catalog = bench_models.catalog()
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        workdir = work_folder(stack, args.keep, "graphopt-bench-")
        for name in args.model_names:
            model = catalog[name]
            t0 = time.perf_counter()
            if model.refused:
                rows.append({"model": name, "skipped": f"not lowered: the CPU target refuses {', '.join(model.refused)} "
                                                      "(expected; see MODELS.md)"})
                print(f"[{name}] skipped: {rows[-1]['skipped']}", flush=True)
                continue
            print(f"[{name}] building, lowering and timing ...", flush=True)
            try:
                rows += bench_model(model, args, workdir)
            except Exception as e:  # noqa: BLE001 - one model failing must not lose the others' rows
                from graphopt.testing import ModelUnavailable

                key = "skipped" if isinstance(e, ModelUnavailable) else "error"
                rows.append({"model": name, key: _one_line(e), "traceback": traceback.format_exc()})
                print(f"[{name}] {key}: {rows[-1][key]}", flush=True)
            else:
                print(f"[{name}] {time.perf_counter() - t0:.0f}s", flush=True)
    total = time.perf_counter() - t_start
    print()
    print(render_header(env, args))
    print()
    print(render_table(rows, args))
    busy = max((r["loadavg"][0] for r in rows if r.get("loadavg")), default=0.0)
    if busy > 0.25 * (os.cpu_count() or 1):
        print(f"note: the machine was busy while measuring (1-min load average up to {busy:.2f} on "
              f"{os.cpu_count()} cores): absolute times are noisy; ratios come from interleaved runs")
    print(f"total {total:.0f}s")
    if args.json:
        env["loadavg_end"] = loadavg()
        doc = {"environment": env, "settings": vars(args), "total_s": total, "rows": rows}
        Path(args.json).write_text(json.dumps(_finite(doc), indent=2, default=str) + "\n", encoding="utf-8")
        print(f"raw numbers: {args.json}")
    return 1 if any("error" in r or r.get("disagree") for r in rows) else 0


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
