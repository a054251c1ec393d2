"""``graphopt compare``: one model through several pipelines, side by side.

For the model as given (the baseline row ``original``: the target's default lossless clean-ups, what
``graphopt lower`` runs without ``--passes``) and for each pipeline (a TOML file or pipeline text), the
pipeline runs (:func:`graphopt.api.optimize`), the result is lowered for the target and verified against
ONNX Runtime on the graph it compiled (:func:`graphopt.api.lower`, ``verify=True``), and the row records:

* ``onnx_bytes``: the optimized model's serialized size, every weight inline (what ``optimize -o`` writes);
* ``weight_bytes``: bytes of its initializers and Constant tensors; ``params``, ``nonzeros``;
* ``flops``: estimated FLOPs of one run of the optimized graph (:mod:`graphopt.stats`' count: a
  multiply-add counts 2 for Conv/Gemm/MatMul, other ops one per output element, symbolic dims 1; zeros
  left by pruning still count), over the nodes that depend on an input: the in-graph decoding of packed
  or sparse weights is computed once, when the CPU target lowers, so it is left out;
  ``flops_all_nodes`` counts every node, as ``graphopt inspect`` does;
* ``accuracy``: the ``--eval`` metric of the optimized graph under ONNX Runtime (the number
  ``graphopt optimize --eval`` reports as the pipeline's final score) and ``accuracy_drop`` against the
  ``original`` row, in points; ``artifact_accuracy``: the same metric of the compiled artifact;
* ``latency``: median / p10 / p90 ms of the artifact on the first ``--data`` sample (its whole batch),
  every artifact timed in ONE interleaved run (:func:`graphopt.bench.measure`, each in its own worker
  process), so ``latency_ratio`` (median / the original's median; below 1 is faster) compares like with
  like; ``artifact_bytes``: the artifact folder's size;
* ``pareto``: whether the row is on the front of best accuracy for its ``.onnx`` size / its latency.

A pipeline that fails (bad options found only while running, a verification failure, a lowering
error, a bug) becomes a row with its one-line error; the others are still compared and the report
is still written. Everything the command line got wrong (a missing or invalid pipeline, unreadable
or mismatched data, an output that would overwrite an input) is refused before anything runs.

The report folder (default ``build/<model stem>-compare``) holds ``compare.json`` (the document
:func:`compare` returns) and ``report.html`` (self-contained: table and inline SVG plots, see
:mod:`graphopt.compare_report`). It is written atomically: built in a temporary folder beside it and
moved into place at the end; a run stopped by an error or a signal leaves nothing behind. An existing
folder is replaced only if it is a compare report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import __version__
from .errors import EXIT_INTERNAL, EXIT_OK, EXIT_VERIFY_FAILED, GraphoptError, OptionError, OutputError

#: ``compare.json``'s ``format``; a folder whose compare.json says so may be replaced by a new report.
FORMAT = "graphopt-compare"
FORMAT_VERSION = 1
#: The baseline row's name.
BASELINE = "original"
REPORT_JSON = "compare.json"
REPORT_HTML = "report.html"
#: Inside the report's temporary folder: the artifacts being compared (removed before it is published).
WORK_DIR = ".work"
#: Warm-up calls per artifact before the interleaved timing.
WARMUP = 3


@dataclass
class Candidate:
    """One row to build: a name, the pipeline, and where it came from (a file, or None for text)."""

    name: str
    pipeline: Any  # graphopt.pipeline.Pipeline
    source: str | None
    baseline: bool = False

    @property
    def spec(self) -> str:
        return str(self.pipeline)


def default_report_dir(model) -> Path:
    """``build/<model stem>-compare`` (relative to the working directory), like ``lower``'s default artifact."""
    src = getattr(model, "source", model)
    stem = Path(str(src)).stem if src and not str(src).startswith("torch:") else "model"
    return Path("build") / f"{stem or 'model'}-compare"


def is_compare_report(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a compare report (its compare.json says so)."""
    f = Path(path) / REPORT_JSON
    try:
        st = os.lstat(f)
        if not stat.S_ISREG(st.st_mode) or st.st_size > (64 << 20):
            return False
        return json.loads(f.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.endswith((".toml", ".TOML")) or \
        (Path(text).suffix != "" and "(" not in text and "," not in text)


def load_pipeline(arg: str | os.PathLike, registry=None):
    """A pipeline argument: an existing file or a name ending in ``.toml`` is a TOML file; anything else is
    pipeline text. Returns ``(Pipeline, source file or None)``; every mistake is an :class:`OptionError`."""
    from .pipeline import Pipeline

    text = os.fspath(arg)
    if isinstance(arg, os.PathLike) or text.endswith(".toml") or os.path.lexists(text):
        try:
            return Pipeline.from_toml(text, registry), text
        except OptionError as e:  # a pass's own option error does not say which file it came from
            if text in str(e):
                raise
            raise type(e)(f"{text}: {e}") from None
    try:
        return Pipeline.parse(text, registry), None
    except OptionError as e:
        if _looks_like_path(text):
            raise OptionError(f"{text}: no such pipeline file (and not pipeline text: {e})") from None
        if text in str(e):
            raise
        raise type(e)(f"pipeline '{text}': {e}") from None


_LABELLED = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.+-]*)=(.*)$", re.S)


def split_label(arg: str | os.PathLike) -> tuple[str | None, str | os.PathLike]:
    """``NAME=PIPELINE`` -> ``(NAME, PIPELINE)``; anything else (an existing file, pipeline text, whose first
    '=' always follows a '(') -> ``(None, arg)``."""
    if isinstance(arg, os.PathLike) or os.path.lexists(arg):
        return None, arg
    m = _LABELLED.match(arg)
    return (m.group(1), m.group(2)) if m else (None, arg)


def candidates(pipelines: Sequence[str | os.PathLike], baseline, registry=None) -> list[Candidate]:
    """The rows: the baseline, then one per pipeline argument, with unique names: ``NAME=`` when given,
    else the TOML file's stem, else the pipeline text (a clash gets a suffix: ``q``, ``q-2``)."""
    if not pipelines:
        raise OptionError("compare: no pipelines given; name at least one TOML file or pipeline text")
    rows = [Candidate(BASELINE, baseline, None, baseline=True)]
    used = {BASELINE}
    for arg in pipelines:
        label, what = split_label(arg)
        pipe, source = load_pipeline(what, registry)
        name = label or (Path(source).stem if source else " ".join(os.fspath(what).split()) or "(no passes)")
        base, n = name, 2
        while name in used:
            name, n = f"{base}-{n}", n + 1
        used.add(name)
        rows.append(Candidate(name, pipe, source))
    return rows


def weight_bytes(graph) -> int:
    """Bytes of a graph's initializers and Constant tensors (their values; lazy ones are not read)."""
    from .graph import tensor_nbytes

    consts = [a.t for n in graph.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return int(sum(tensor_nbytes(t) for t in [*graph.graph.initializer, *consts]))


def inference_flops(graph) -> int:
    """Estimated FLOPs of one run (:func:`graphopt.stats.graph_stats`: nodes computed from weights alone, the
    in-graph decoding of packed or sparse weights, are left out; the CPU target evaluates them when it
    lowers)."""
    from .stats import graph_stats

    return graph_stats(graph).flops


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def pareto_front(points: Mapping[str, tuple[float, float]]) -> set[str]:
    """Names of the points ``(cost, accuracy)`` that no other point beats: none has cost <= and accuracy >=
    with one of them strictly better (lower cost, higher accuracy is better)."""
    front = set()
    for name, (c, a) in points.items():
        dominated = any(c2 <= c and a2 >= a and (c2 < c or a2 > a)
                        for other, (c2, a2) in points.items() if other != name)
        if not dominated:
            front.add(name)
    return front


def _empty_row(c: Candidate) -> dict:
    return {
        "name": c.name, "spec": c.spec, "source": c.source, "baseline": c.baseline, "ok": False, "error": None,
        "nodes": None, "params": None, "nonzeros": None, "onnx_bytes": None, "weight_bytes": None, "flops": None,
        "flops_all_nodes": None,
        "accuracy": None, "accuracy_drop": None, "artifact_accuracy": None, "artifact_bytes": None,
        "verification": None, "latency_ms": None, "latency_p10_ms": None, "latency_p90_ms": None,
        "latency_runs": None, "latency_ratio": None, "peak_rss_bytes": None,
        "pareto": {"size": False, "latency": False}, "notes": [], "seconds": None,
    }


def _artifact_score(art_dir: Path, eval_set, threads) -> float:
    """The eval metric of the compiled artifact (its first output over every eval feed)."""
    from .api import load

    art = load(art_dir, threads=threads)
    first = art.outputs[0].name
    preds = np.concatenate([np.atleast_1d(np.asarray(art.run(f)[first])) for f in eval_set.feeds], axis=0)
    return float(eval_set.metric(preds, eval_set.labels))


def _build_row(c: Candidate, graph, tgt, dest: Path, data, eval_set, *, threads, registry, atol, rtol,
               progress, debug_log) -> dict:
    """Optimize, measure and lower one candidate into ``dest``; fills a row (raises on failure)."""
    import time

    from . import api
    from .console import step
    from .pipeline import Pipeline
    from .stats import all_node_flops, graph_stats

    row = _empty_row(c)
    t0 = time.perf_counter()
    with step(progress, f"{c.name}: run the pipeline"):
        res = api.optimize(graph, c.pipeline, data=data, verify=True, registry=registry, atol=atol, rtol=rtol)
    out = res.graph
    st = graph_stats(out)
    row.update(nodes=st.nodes, params=st.params, nonzeros=st.nonzeros, onnx_bytes=st.bytes,
               flops=inference_flops(out), flops_all_nodes=all_node_flops(out), weight_bytes=weight_bytes(out))
    for r in res.records:
        summary = (r.details or {}).get("summary")
        if isinstance(summary, str) and summary:
            row["notes"].append(f"{r.pipeline}: {summary}")
    with step(progress, f"{c.name}: measure the eval metric"):
        row["accuracy"] = eval_set.score(out)
    with step(progress, f"{c.name}: lower for {tgt.name} and verify"):
        # The pipeline already ran: lower the optimized graph as it is (no passes, hence no payoff timing);
        # the artifact is verified against the graph it compiled.
        low = api.lower(out, tgt, dest, pipeline=Pipeline([]), data=data, verify=True, registry=registry,
                        threads=threads, atol=atol, rtol=rtol)
    debug_log.append(low.native_log)
    row["verification"] = low.verification.to_json() if low.verification is not None else None
    row["artifact_bytes"] = _dir_bytes(dest)
    with step(progress, f"{c.name}: run the artifact on the eval data"):
        row["artifact_accuracy"] = _artifact_score(dest, eval_set, threads)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    row["ok"] = True
    return row


def _time_artifacts(built: dict[str, Path], feed, *, threads, seconds, progress) -> dict:
    from .bench import measure
    from .console import step

    runners = {name: ("graphopt", str(path)) for name, path in built.items()}
    with step(progress, f"time {len(runners)} artifact(s), interleaved ({seconds:g}s)"):
        return measure(runners, feed, [], threads=threads, seconds=seconds, warmup=WARMUP)


def prepare(model, pipelines, *, target="cpu", target_options=None, data=None, eval=None, output=None,
            threads=None, seconds=3.0, registry=None):
    """Check everything the command line gives before anything runs; returns what :func:`compare` needs.

    Raises a :class:`~graphopt.errors.GraphoptError` (exit 2) for a missing or invalid model, pipeline,
    data or evaluation set, a target this machine cannot run or time, or an output that may not be written.
    """
    import math

    from .accuracy import EvalSet, read_eval
    from .api import default_lower_pipeline, make_target
    from .data import DataSource
    from .graph import Graph
    from .manager import PassManager
    from .outputs import check_outputs, model_inputs
    from .passbase import PassContext
    from .pipeline import Pipeline
    from .plugins import get_registry
    from .target import resolve_threads

    registry = registry or get_registry()
    data = data if isinstance(data, DataSource) else DataSource(data)
    if not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
            and seconds > 0):
        raise OptionError(f"seconds = {seconds!r}: the timing budget must be a positive number of seconds")
    resolve_threads(threads)  # a bad count fails here
    if eval is None:
        raise OptionError("compare needs labelled evaluation data to measure accuracy: an .npz of the "
                          "model's inputs plus a 'labels' array")
    graph = Graph.load(model) if not isinstance(model, Graph) else model
    tgt = make_target(target, target_options, registry)
    cannot = tgt.cannot_run_here()
    if cannot:
        raise OptionError(f"compare runs and times the artifacts here, and this machine cannot run target "
                          f"'{tgt.name}': {cannot}")
    if not type(tgt).wall_clock_timing:
        raise OptionError(f"target '{tgt.name}' is simulated on this machine, so the artifacts' wall-clock "
                          "times would mean nothing; compare a target that runs here (e.g. cpu)")
    rows = candidates(pipelines, Pipeline.parse(default_lower_pipeline(tgt), registry), registry)
    output = Path(output) if output is not None else default_report_dir(model)
    inputs = model_inputs(graph, data, None, eval if not isinstance(eval, EvalSet) else None)
    inputs += [("pipeline file", Path(c.source)) for c in rows if c.source]
    check_outputs([("report folder", output)], inputs)
    if os.path.lexists(output) and not is_compare_report(output):
        raise OutputError(f"{output}: exists and is not a graphopt compare report; choose another output path "
                          "or remove it")
    eval_set = eval if isinstance(eval, EvalSet) else read_eval(eval, graph)
    eval_set.check(graph)
    for c in rows:  # what a pass needs (calibration data) is known before anything runs
        PassManager(c.pipeline, PassContext(data=data), registry)
    feed = data.samples(graph, limit=1)[0]  # the inputs are read (and checked against the model) here
    return {"graph": graph, "target": tgt, "rows": rows, "output": output, "data": data, "eval": eval_set,
            "feed": feed, "registry": registry, "threads": threads, "seconds": float(seconds)}


def compare(model, pipelines: Sequence[str | os.PathLike], *, target="cpu", target_options=None, data=None,
            eval=None, output=None, threads: int | None = None, seconds: float = 3.0, progress=None,
            registry=None, atol: float = 1e-4, rtol: float = 1e-3, debug: bool = False,
            debug_log: list | None = None) -> dict:
    """Build, measure and time the model through each pipeline; write the report folder; return its document.

    ``pipelines`` are TOML files or pipeline text (see :func:`load_pipeline`); ``data`` the calibration
    data (a path or :class:`~graphopt.data.DataSource`; its first sample is also the timing feed);
    ``eval`` the labelled evaluation set (an .npz path or :class:`~graphopt.accuracy.EvalSet`);
    ``output`` the report folder (default :func:`default_report_dir`). Bad input raises before anything
    runs; a pipeline that fails is a row with ``"ok": false`` and its error, and the document's
    ``exit_code`` is then 1 (3 when a row failed on an internal error).
    """
    from . import compare_report
    from .fsutil import atomic_directory
    from .outputs import error_json
    from .signals import raise_if_interrupted

    debug_log = debug_log if debug_log is not None else []
    p = prepare(model, pipelines, target=target, target_options=target_options, data=data, eval=eval,
                output=output, threads=threads, seconds=seconds, registry=registry)
    graph, tgt, eval_set, out_dir = p["graph"], p["target"], p["eval"], p["output"]
    rows: list[dict] = []
    notes: list[str] = []
    with atomic_directory(out_dir, replace_if=is_compare_report) as tmp:
        work = tmp / WORK_DIR
        work.mkdir()
        built: dict[str, Path] = {}
        for i, c in enumerate(p["rows"]):
            dest = work / f"{i:02d}"
            try:
                row = _build_row(c, graph, tgt, dest, p["data"], eval_set, threads=threads,
                                 registry=p["registry"], atol=atol, rtol=rtol, progress=progress,
                                 debug_log=debug_log)
                built[c.name] = dest
            except GraphoptError as e:
                raise_if_interrupted()
                row = _empty_row(c)
                row["error"] = error_json(e)
            except Exception as e:  # noqa: BLE001 - a bug in a pass or a library: this row only
                raise_if_interrupted()  # a stop request that TVM turned into an error of its own
                if debug:
                    traceback.print_exc()
                row = _empty_row(c)
                row["error"] = error_json(e)
                row["error"]["message"] += " (rerun with --debug for the traceback and please report it)"
            rows.append(row)
        timing = {"batch": None, "threads": None, "rounds": None, "seconds": None, "warmup": WARMUP,
                  "budget_seconds": p["seconds"], "error": None}
        if built:
            try:
                m = _time_artifacts(built, p["feed"], threads=threads, seconds=p["seconds"], progress=progress)
                timing.update(batch=m["batch"], threads=m["threads"], rounds=m["rounds"],
                              seconds=round(m["seconds"], 3))
                for row in rows:
                    s = m["runtimes"].get(row["name"])
                    if s and s.get("median_ms") is not None:
                        row.update(latency_ms=s["median_ms"], latency_p10_ms=s["p10_ms"],
                                   latency_p90_ms=s["p90_ms"], latency_runs=s["runs"],
                                   peak_rss_bytes=s.get("peak_rss_bytes"))
            except GraphoptError as e:
                raise_if_interrupted()
                timing["error"] = error_json(e)
                notes.append(f"the artifacts could not be timed: {_one_line(e)}")
        shutil.rmtree(work)
        _derive(rows, notes)
        code = EXIT_OK
        if any(not r["ok"] for r in rows) or timing["error"] is not None:
            code = EXIT_VERIFY_FAILED
        if any(r["error"] and r["error"]["kind"] == "InternalError" for r in rows):
            code = EXIT_INTERNAL
        doc = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "graphopt": __version__,
            "ok": code == EXIT_OK, "exit_code": code,
            "model": str(getattr(graph, "source", model) or model),
            "target": {"name": tgt.name, "options": {k: str(v) for k, v in sorted(tgt.given.items())}},
            "data": p["data"].describe(), "eval": eval_set.source, "metric": eval_set.metric_name,
            "eval_samples": int(eval_set.labels.shape[0]),
            "baseline": BASELINE, "timing": timing, "rows": rows, "notes": notes,
            "report": {"dir": str(out_dir), "json": str(out_dir / REPORT_JSON), "html": str(out_dir / REPORT_HTML)},
        }
        plots = compare_report.plots_svg(doc)
        if plots is None:
            doc["notes"].append(compare_report.NO_MATPLOTLIB)
        html = compare_report.render_html(doc, plots)
        (tmp / REPORT_JSON).write_text(dumps(doc), encoding="utf-8")
        (tmp / REPORT_HTML).write_text(html, encoding="utf-8")
    return doc


def _derive(rows: list[dict], notes: list[str]) -> None:
    """Drops and ratios against the baseline, and the Pareto fronts (size, latency) of the rows that have
    an accuracy."""
    base = next((r for r in rows if r["baseline"]), None)
    base_acc = base["accuracy"] if base and base["ok"] else None
    base_lat = base["latency_ms"] if base else None
    if base is not None and not base["ok"]:
        notes.append(f"the baseline '{BASELINE}' failed: no drops or latency ratios")
    for r in rows:
        if r["accuracy"] is not None and base_acc is not None:
            r["accuracy_drop"] = round(base_acc - r["accuracy"], 6)
        if r["latency_ms"] is not None and base_lat:
            r["latency_ratio"] = round(r["latency_ms"] / base_lat, 4)
    for key, cost in (("size", "onnx_bytes"), ("latency", "latency_ms")):
        pts = {r["name"]: (float(r[cost]), float(r["accuracy"])) for r in rows
               if r["ok"] and r[cost] is not None and r["accuracy"] is not None}
        front = pareto_front(pts)
        for r in rows:
            r["pareto"][key] = r["name"] in front


def dumps(doc: dict) -> str:
    """The JSON text of a compare document (``--json`` and compare.json: the same bytes)."""
    return json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"


# --------------------------------------------------------------------------- the text table
def _fmt_ms(ms: float | None) -> str:
    """A latency as ``graphopt bench`` prints it (``-`` when not measured)."""
    from .bench import _ms

    return "-" if ms is None else _ms(ms)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """The table's header and cells (text), one list per row; a failed row has its error as the pipeline."""
    from .stats import human_bytes, human_count

    head = ["name", "pipeline", ".onnx", "weights", "FLOPs", "accuracy", "drop", "latency", "x orig",
            "artifact", "front"]
    body = []
    for r in doc["rows"]:
        if not r["ok"]:
            body.append([r["name"], f"FAILED: {r['error']['message'] if r['error'] else '?'}"])
            continue
        front = "+".join(k for k in ("size", "latency") if r["pareto"][k])
        body.append([
            r["name"], r["spec"] or "(no passes)", human_bytes(r["onnx_bytes"]), human_bytes(r["weight_bytes"]),
            human_count(r["flops"]), f"{r['accuracy']:.2f}",
            "-" if r["accuracy_drop"] is None else f"{0.0 - r['accuracy_drop'] + 0.0:+.2f}",
            _fmt_ms(r["latency_ms"]), "-" if r["latency_ratio"] is None else f"{r['latency_ratio']:.2f}",
            human_bytes(r["artifact_bytes"]), front or "-",
        ])
    return head, body


def format_table(doc: dict, spec_width: int = 40) -> list[str]:
    """The aligned text table ``graphopt compare`` prints, with a heading line and footnotes."""
    head, body = table_rows(doc)
    cells = [[_short(c, spec_width) if j == 1 and len(row) == len(head) else c for j, c in enumerate(row)]
             for row in body]  # a failed row's error is shown whole
    full = [row for row in cells if len(row) == len(head)]
    widths = [max([len(head[j])] + [len(row[j]) for row in full]) for j in range(len(head))]
    right = {2, 3, 4, 5, 6, 7, 8, 9}

    def line(row):
        if len(row) < len(head):  # a failed row: name, then its error across the rest
            return f"{row[0]:<{widths[0]}}  {row[1]}"
        return "  ".join(c.rjust(widths[j]) if j in right else c.ljust(widths[j])
                         for j, c in enumerate(row)).rstrip()

    t = doc["timing"]
    if t["error"] is None and t["batch"] is not None:
        timed = (f"latency: median of the artifact on batch {t['batch']}, {t['threads']} thread(s), "
                 f"{t['rounds']} interleaved rounds")
    else:
        timed = "latency: not measured" + (f" ({t['error']['message']})" if t["error"] else "")
    lines = [f"{doc['model']} on target {doc['target']['name']}: {doc['metric']} on {doc['eval']} "
             f"({doc['eval_samples']} samples); {timed}",
             line(head), *(line(r) for r in cells),
             "drop: accuracy minus the original's, in points; x orig: latency / the original's (below 1 is "
             "faster); front: on the Pareto front of accuracy for .onnx size / latency"]
    return lines
