"""The ``graphopt`` command line.

Exit codes (stable; build systems may rely on them):
  0  success
  1  verification failed (outputs differ from ONNX Runtime beyond tolerance); for ``compare``, a pipeline
     failed (its row holds the one-line error; the table and report are still written)
  2  bad input or usage (missing/corrupt model, unknown pass/option/target, unreadable inputs, plugin failure,
     an output that would overwrite or delete an input, an output the file system refuses)
  3  internal error (a bug: rerun with --debug and report the traceback)
  128+N  stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP): outputs rolled back, temp files removed

With --json, stdout holds exactly one JSON document, on failure too:
``{"ok": false, "error": {"message", "kind", "exit_code"}, "exit_code": N}``; the one-line
error still goes to stderr (for the person watching the build log).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import traceback
from pathlib import Path

import numpy as np

from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_VERIFY_FAILED, GraphoptError, OptionError

EPILOG = """\
examples:
  graphopt lower model.onnx --target cpu -o build/model --verify
  graphopt lower det.onnx -o build/det --input-shape x:1,3,320,320
  graphopt run build/model --inputs x.npz --verify
  graphopt bench build/model --inputs x.npz --threads 2
  graphopt optimize model.onnx --passes 'cleanup,fold-batchnorm' -o small.onnx --report report.json
  graphopt inspect model.onnx --json
  graphopt passes

exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 3 internal error,
  128+N stopped by signal N (outputs rolled back)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 too; keep our one-line format
        raise OptionError(f"{self.prog}: {message} (see --help)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout, nothing else")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summaries, only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks and libraries' own output")
    p.add_argument("--disable-plugin", action="append", default=[], metavar="NAME",
                   help="do not load this plugin (repeatable; also GRAPHOPT_DISABLE_PLUGINS=a,b)")


def _pipeline_args(p: argparse.ArgumentParser, default_help: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--passes", metavar="PIPELINE", help=f"pass pipeline text, e.g. 'cleanup,fold-batchnorm' ({default_help})")
    g.add_argument("--pipeline", metavar="FILE.toml", help="pass pipeline from a TOML file")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="fix a symbolic input's dims, e.g. x:1,3,320,320 (repeatable)")
    p.add_argument("--input-value", action="append", default=[], metavar="NAME=VALUE",
                   help="fix an input to a constant (a number or comma list, dtype from the input), "
                        "e.g. sr=16000, so what depends on it folds (repeatable)")
    p.add_argument("--data", metavar="PATH", help="inputs for calibration/verification: .npz/.npy or a folder of them")
    p.add_argument("--seed", type=int, default=0, help="seed for generated inputs (default 0)")
    p.add_argument("--eval", metavar="EVAL.npz",
                   help="labelled evaluation data: the model's inputs plus a 'labels' array (one per sample); "
                        "top-1 accuracy is measured before and after every lossy pass")
    p.add_argument("--budget", type=float, metavar="POINTS",
                   help="largest accuracy drop allowed, in points of the --eval metric (without --eval: of top-1 "
                        "agreement with the float model); quantize keeps its most sensitive layers in float to "
                        "stay within it, and a pipeline that still exceeds it fails (exit 1)")
    p.add_argument("--verify-layers", action="store_true",
                   help="compare every intermediate value of the optimized graph with the input model's "
                        "(ONNX Runtime, on --data) and name the first layer whose SNR falls below 20 dB; lower "
                        "also compares the compiled code's intermediate values with ONNX Runtime's on the graph "
                        "it compiled (a second, probe build)")
    p.add_argument("--report", metavar="FILE.json",
                   help="write the per-pass JSON record here (also on failure: \"ok\": false and the error)")
    p.add_argument("--dump-after", action="append", default=[], metavar="PASS",
                   help="write the graph after this pass next to the output, as NN-PASS.onnx; "
                        "never overwrites a file (repeatable)")
    p.add_argument("--no-verify-passes", action="store_true", help="skip the numerical check of lossless passes")
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-3, help="tolerance relative to max|reference| (default 1e-3)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphopt", description="Optimize neural-network graphs and lower them through TVM.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("lower", help="optimize and compile a model into an artifact directory",
                       epilog="example: graphopt lower model.onnx --target cpu -o build/model --verify",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="input .onnx file (never modified)")
    p.add_argument("-t", "--target", default="cpu", help="target name (see `graphopt targets`; default cpu)")
    p.add_argument("-o", "--output", help="artifact directory to write, replaced atomically "
                                           "(default: build/<model stem>-<target>, printed)")
    p.add_argument("--target-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="target option, e.g. mcpu=portable (repeatable)")
    p.add_argument("--verify", action="store_true", help="run the artifact and compare with ONNX Runtime")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads the artifact runs with (default: $GRAPHOPT_THREADS, else every core)")
    p.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                   help="tune kernels with MetaSchedule, TRIALS measured candidates in all, shared between kernels "
                        "by FLOPs; results are kept in the tuning database and reused, so a second run with the "
                        "same TRIALS measures nothing (default 0: default schedules, no tuning; needs "
                        "pip install 'graphopt[tune]')")
    p.add_argument("--keep-if-faster", action="store_true",
                   help="with lossy passes (quantize): keep the artifact built without them when the lossy one "
                        "did not run faster (both are always built and timed; the report's 'payoff' says which)")
    p.add_argument("--tuning-db", metavar="DIR",
                   help="tuning database folder, one database per target CPU inside "
                        "(default: $XDG_CACHE_HOME/graphopt/tuning, else ~/.cache/graphopt/tuning)")
    _pipeline_args(p, "default: the lossless clean-ups")
    _common(p)

    p = sub.add_parser("optimize", help="run a pass pipeline and write the optimized .onnx",
                       epilog="example: graphopt optimize model.onnx --passes cleanup -o out.onnx --report r.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    _pipeline_args(p, "default: cleanup")
    _common(p)

    p = sub.add_parser("run", help="run an artifact, optionally verifying against ONNX Runtime",
                       epilog="example: graphopt run build/model --inputs x.npz --verify -o out.npz",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="artifact directory from `graphopt lower`")
    p.add_argument("-i", "--inputs", metavar="PATH", help=".npz (one array per input) / .npy / folder; default: generated")
    p.add_argument("--seed", type=int, default=0, help="seed for generated inputs")
    p.add_argument("--verify", action="store_true", help="compare with ONNX Runtime on the artifact's model.onnx")
    p.add_argument("-o", "--output", metavar="OUT.npz",
                   help="write the outputs of the first input here (same outputs, same bytes)")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--threads", type=int, metavar="N",
                   help="cap the threads (default: $GRAPHOPT_THREADS, else the artifact's own count)")
    p.add_argument("--device", metavar="DEVICE",
                   help="where the programs run: cpu, cuda, cuda:N (default: the device kind each program was "
                        "built for, its first device)")
    _common(p)

    p = sub.add_parser("bench", help="time an artifact next to ONNX Runtime on the same inputs and threads",
                       epilog="example: graphopt bench build/model --inputs x.npz --seconds 5 --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="artifact directory from `graphopt lower`")
    p.add_argument("-i", "--inputs", metavar="PATH", help=".npz (one array per input) / .npy / folder (first "
                   "sample used); default: generated")
    p.add_argument("--seed", type=int, default=0, help="seed for generated inputs")
    p.add_argument("--threads", type=int, metavar="N",
                   help="cap the threads of both runtimes (default: $GRAPHOPT_THREADS, else the artifact's count)")
    p.add_argument("--seconds", type=float, default=3.0, metavar="S",
                   help="time spent in timed runs, both runtimes together (default 3)")
    p.add_argument("--warmup", type=int, default=5, metavar="N", help="untimed runs of each runtime first (default 5)")
    p.add_argument("--profile", action="store_true",
                   help="also print the artifact's per-kernel time shares (TVM's VM profiler, separate runs)")
    p.add_argument("--atol", type=float, default=1e-4, help="output agreement check: absolute tolerance")
    p.add_argument("--rtol", type=float, default=1e-3, help="output agreement check: relative to max|reference|")
    _common(p)

    p = sub.add_parser("inspect", help="ops, parameters, bytes, FLOPs, inputs and outputs of a model; "
                       "or what an artifact folder holds and whether it runs here",
                       epilog="examples: graphopt inspect model.onnx --json; graphopt inspect build/model")
    p.add_argument("model")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...")
    _common(p)

    p = sub.add_parser("compare", help="optimize and lower a model with several pipelines; compare size, FLOPs, "
                       "accuracy and latency in a table and an HTML report",
                       epilog="example: graphopt compare model.onnx --pipelines int8.toml 'prune(sparsity=0.5)' "
                              "--data calib.npz --eval eval.npz -o build/compare\n"
                              "exit codes: 0 every row built and timed, 1 a pipeline failed or the timing did "
                              "(its row says why; the report is still written), 2 bad input (nothing written), "
                              "3 a row failed on an internal error",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="input .onnx file (never modified)")
    p.add_argument("--pipelines", nargs="+", required=True, metavar="PIPELINE",
                   help="pipelines to compare: TOML files (named by their stem) or pipeline text such as "
                        "'quantize(mode=static)', either one optionally as NAME=PIPELINE; the model through the "
                        "target's default clean-ups is always the baseline row 'original'")
    p.add_argument("--data", metavar="PATH", help="calibration inputs (.npz/.npy or a folder); its first sample "
                   "(whole batch) is also what the artifacts are timed on (default: generated)")
    p.add_argument("--eval", metavar="EVAL.npz", required=True,
                   help="labelled evaluation data: the model's inputs plus a 'labels' array (one per sample)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="report folder: report.html and compare.json, replaced atomically "
                        "(default: build/<model stem>-compare, printed)")
    p.add_argument("-t", "--target", default="cpu", help="target name (see `graphopt targets`; default cpu)")
    p.add_argument("--target-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="target option, e.g. mcpu=portable (repeatable)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads the artifacts run with (default: $GRAPHOPT_THREADS, else every core)")
    p.add_argument("--seconds", type=float, default=3.0, metavar="S",
                   help="time spent in the interleaved timing of all artifacts together (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed for generated inputs (default 0)")
    _common(p)

    for name, helptext in (("passes", "list available passes and their options"),
                           ("targets", "list available targets and their options"),
                           ("plugins", "list loaded plugins and where they come from")):
        p = sub.add_parser(name, help=helptext)
        _common(p)
    return parser


# --------------------------------------------------------------------------- output helpers
class _Out:
    def __init__(self, args):
        self.json = getattr(args, "json", False)
        self.quiet = getattr(args, "quiet", False) or self.json

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text)

    def emit(self, doc) -> None:
        if self.json:
            print(json.dumps(doc, indent=2, sort_keys=True, default=str))


def _progress(args):
    from .console import Progress

    return Progress(enabled=not (args.quiet or args.json))


def _data(args, attr="data"):
    from .data import DataSource

    return DataSource(getattr(args, attr, None) or None, seed=args.seed, option="--" + attr)


def _pipeline(args):
    # --pipeline always names a file, whatever its suffix; --passes is always text.
    return Path(args.pipeline) if args.pipeline else args.passes


def _kv(items, flag):
    out = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise OptionError(f"{flag} '{item}': expected KEY=VALUE")
        out[k.strip()] = v.strip()
    return out


@contextlib.contextmanager
def _early_report(args, command: str):
    """A failure while reading the command line's own values still gets its ``--report``.

    (The API writes the report for everything after these values are parsed.)
    """
    try:
        yield
    except GraphoptError as e:
        if getattr(args, "report", None):
            from .outputs import Reporting, check_outputs, model_inputs

            with contextlib.suppress(GraphoptError):
                check_outputs([("report", args.report)], model_inputs(args.model, args.data, _pipeline(args)))
                Reporting(args.report, command=command, model=str(args.model)).failure(e)
        raise


def _record_lines(records):
    from .stats import human_bytes, human_count

    for r in records:
        v = r.verification or {}
        check = ""
        if v.get("max_abs") is not None:
            check = f"  max|Δ| {float(v['max_abs']):.2g}"
        elif v.get("skipped"):
            check = "  (not verified)"
        b, a = r.before, r.after
        yield (f"  {r.pipeline:<28} {r.seconds:7.2f}s  nodes {b['nodes']}→{a['nodes']}  "
               f"size {human_bytes(b['bytes'])}→{human_bytes(a['bytes'])}  "
               f"FLOPs {human_count(b['flops'])}→{human_count(a['flops'])}{check}")
        summary = (r.details or {}).get("summary")  # a pass's own one-line account (PassRecord.details)
        if isinstance(summary, str) and summary:
            yield f"    {summary}"


def _layer_lines(layers):
    """``--verify-layers``: where the error starts, and the worst layers; then one line for the compiled
    artifact's intermediate values (``lower`` only)."""
    if not layers:
        return
    if "layers" in layers:
        rows = layers["layers"]
        first = layers["first_divergent"]
        if first is None:
            yield f"layers: {len(rows)} values compared with the input model, none below {layers['threshold_db']:g} dB SNR"
        else:
            yield (f"layers: first to diverge (SNR below {layers['threshold_db']:g} dB) is {first['op']} "
                   f"'{first['node']}' (value '{first['value']}': SNR {float(first['snr_db']):.1f} dB, "
                   f"cosine {first['cosine']:.5f})")
        worst = sorted((r for r in rows if r["snr_db"] != "inf"), key=lambda r: float(r["snr_db"]))[:5]
        for r in worst:
            yield f"  {r['op']:<12} {r['node'][:60]:<60} SNR {float(r['snr_db']):6.1f} dB  cosine {r['cosine']:.5f}"
    if layers.get("artifact"):
        yield _artifact_layer_line(layers["artifact"])


def _artifact_layer_line(art: dict) -> str:
    """The artifact section of ``--verify-layers`` (see :func:`graphopt.api._artifact_layers`) in one line."""
    if "skipped" in art:
        return f"artifact layers: not compared ({art['skipped']})"
    rows, first = art["layers"], art["first_divergent"]
    of = f" of {art['total_values']}" if art.get("total_values", len(rows)) > len(rows) else ""
    differs = art.get("build_differs") or {}
    tail = ("; the probe's build differs: " + ", ".join(f"{k} {p} (the artifact: {a})"
                                                         for k, (a, p) in sorted(differs.items()))) if differs else ""
    if first is not None:
        if "mismatch" in first:
            what = first["mismatch"]
        else:
            what = f"SNR {float(first['snr_db']):.1f} dB, cosine {first['cosine']:.5f}, max|Δ| {first['max_abs']:.3g}"
        return (f"artifact layers: first to diverge from ONNX Runtime on the compiled graph (SNR below "
                f"{art['threshold_db']:g} dB, {len(rows)}{of} values compared) is {first['op']} '{first['node']}' "
                f"(value '{first['value']}': {what}){tail}")
    finite = [r for r in rows if r["snr_db"] != "inf"]
    if finite:
        w = min(finite, key=lambda r: float(r["snr_db"]))
        worst = f"worst SNR {float(w['snr_db']):.1f} dB, '{w['value']}'"
        if float(w["snr_db"]) < art["threshold_db"]:  # a value near zero: its differences are within atol
            worst += f", max|Δ| {w['max_abs']:.3g} within atol {art.get('atol', 0):g}"
    else:
        worst = "all identical"
    return (f"artifact layers: {len(rows)}{of} values agree with ONNX Runtime on the compiled graph "
            f"({worst}; threshold {art['threshold_db']:g} dB){tail}")


def _accuracy_lines(acc):
    """What a lossy pipeline cost, against the float model: output error, task metric, the artifact's error."""
    from .accuracy import ErrorVsFloat

    if not acc:
        return
    def err(d):
        if not d or "skipped" in d:
            return "not measured" + (f" ({d['skipped']})" if d and "skipped" in d else "")
        fl = {k: (float(v) if isinstance(v, str) else v) for k, v in d.items()}
        return ErrorVsFloat(fl["cosine"], fl["snr_db"], fl["max_abs"], fl["top1_agreement"], fl["samples"]).summary()
    yield f"vs the float model: {err(acc.get('vs_float'))}"
    if "drop" in acc:
        yield (f"{acc['metric']} on {acc['eval_data']}: {acc['float']:.2f} → {acc['final']:.2f} "
               f"({-acc['drop']:+.2f} points" + (f", budget {acc['budget']:g})" if "budget" in acc else ")"))
    if "artifact_vs_float" in acc:
        yield f"artifact vs the float model: {err(acc['artifact_vs_float'])}"


# --------------------------------------------------------------------------- commands
def cmd_lower(args, out: _Out, debug_log: list) -> int:
    from . import api
    from .graph import parse_input_shapes, parse_input_values
    from .outputs import default_artifact_path

    with _early_report(args, "lower"):
        target_options = _kv(args.target_opt, "--target-opt")
        input_shapes = parse_input_shapes(args.input_shape)
        input_values = parse_input_values(args.input_value)
        data = _data(args)
    output = args.output or default_artifact_path(args.model, args.target)
    res = api.lower(
        args.model, args.target, output, pipeline=_pipeline(args),
        target_options=target_options, input_shapes=input_shapes,
        input_values=input_values,
        data=data, verify=args.verify, verify_passes=not args.no_verify_passes,
        dump_after=args.dump_after, report=args.report, progress=_progress(args), atol=args.atol, rtol=args.rtol,
        threads=args.threads, tune=args.tune, tuning_db=args.tuning_db, eval=args.eval, budget=args.budget,
        keep_if_faster=args.keep_if_faster, verify_layers=args.verify_layers,
    )
    debug_log.append(res.native_log)
    out.say(f"lowered {args.model} → {res.artifact} (target {args.target}, {res.manifest['target'].get('arch') or res.manifest['target'].get('mcpu', '')})")
    out.say(f"pipeline: {res.pipeline}")
    for line in _record_lines(res.records):
        out.say(line)
    for line in [*_accuracy_lines(res.report.get("accuracy")), *_layer_lines(res.report.get("layers"))]:
        out.say(line)
    decoded = res.manifest["target"].get("decoded_weight_bytes")
    if decoded:
        out.say(f"note: {decoded / 2**10:.0f} KiB of weights stored sparse or as codebooks in the model are decoded "
                "at lower time and run on dense kernels (smaller file, not a faster artifact)")
    pay = res.report.get("payoff")
    if pay:
        from .stats import human_bytes

        if pay.get("timed") is False:
            out.say(f"did the lossy passes pay off: {pay['note']}")
        else:
            lat, size = pay["latency_ms"], pay["size_bytes"]
            ms = {k: "?" if lat.get(k) is None else f"{lat[k]:.4g}" for k in ("with", "without")}
            speed = "n/a" if pay.get("speedup") is None else f"{pay['speedup']:.2f}x; below 1 is slower"
            out.say(f"did the lossy passes pay off: {ms['with']} ms vs {ms['without']} ms without them"
                    f"{' (modelled)' if pay.get('timed') == 'modelled' else ''} "
                    f"(speed-up {speed}), {human_bytes(size['with'])} vs "
                    f"{human_bytes(size['without'])}" + (f"; {pay['note']}" if pay.get("note") else ""))
    if res.verification:
        out.say(f"verified against ONNX Runtime: {res.verification.summary()}")
    out.emit({"ok": True, "artifact": str(res.artifact), "manifest": res.manifest, "report": res.report})
    return EXIT_OK


def cmd_optimize(args, out: _Out, debug_log: list) -> int:
    from . import api
    from .graph import parse_input_shapes, parse_input_values

    with _early_report(args, "optimize"):
        input_shapes = parse_input_shapes(args.input_shape)
        input_values = parse_input_values(args.input_value)
        data = _data(args)
    res = api.optimize(
        args.model, _pipeline(args), output=args.output, input_shapes=input_shapes,
        input_values=input_values,
        data=data, verify=not args.no_verify_passes, dump_after=args.dump_after,
        dump_dir=str(Path(args.output).parent), report=args.report, progress=_progress(args),
        atol=args.atol, rtol=args.rtol, eval=args.eval, budget=args.budget, verify_layers=args.verify_layers,
    )
    out.say(f"optimized {args.model} → {args.output}")
    out.say(f"pipeline: {res.pipeline}")
    for line in _record_lines(res.records):
        out.say(line)
    for line in [*_accuracy_lines(res.report.get("accuracy")), *_layer_lines(res.report.get("layers"))]:
        out.say(line)
    out.emit(res.report)
    return EXIT_OK


def cmd_compare(args, out: _Out, debug_log: list) -> int:
    from .compare import compare, format_table

    doc = compare(args.model, args.pipelines, target=args.target, target_options=_kv(args.target_opt, "--target-opt"),
                  data=_data(args), eval=args.eval, output=args.output, threads=args.threads, seconds=args.seconds,
                  progress=_progress(args), debug=args.debug, debug_log=debug_log)
    for r in doc["rows"]:
        if not r["ok"]:
            print(f"graphopt: error: pipeline '{r['name']}' failed: {r['error']['message']}", file=sys.stderr)
    if doc["timing"]["error"] is not None:
        print(f"graphopt: error: the artifacts could not be timed: {doc['timing']['error']['message']}",
              file=sys.stderr)
    if not out.quiet:
        for note in doc["notes"]:
            if not note.startswith("the artifacts could not be timed"):
                print(f"graphopt: note: {note}", file=sys.stderr)
    for line in format_table(doc):
        out.say(line)
    out.say(f"report: {doc['report']['html']} (figures in {doc['report']['json']})")
    out.emit(doc)
    return doc["exit_code"]


def cmd_run(args, out: _Out, debug_log: list) -> int:
    from .api import verify_artifact
    from .artifact import Artifact
    from .console import capture_native_output
    from .data import DataSource
    from .fsutil import atomic_write_bytes
    from .outputs import check_outputs

    check_outputs([("output", args.output)], [("artifact", args.artifact), ("inputs", args.inputs)])
    with capture_native_output() as nlog:
        art = Artifact(args.artifact, threads=args.threads, device=args.device)
        art.load_programs()
    debug_log.append(nlog.text)
    for note in art.notes:
        if not out.quiet:
            print(f"graphopt: note: {note}", file=sys.stderr)
    ref_graph = art.reference_graph()
    data = DataSource(args.inputs or None, seed=args.seed, option="--inputs")
    feeds = data.samples(ref_graph, limit=None if args.inputs else 1)
    results = [art.run(f) for f in feeds]
    doc = {"artifact": str(art.path), "inputs": data.describe(), "threads": art.threads, "outputs": [
        {"name": k, "shape": list(v.shape), "dtype": v.dtype.name,
         "min": float(np.min(v)) if v.size else None, "max": float(np.max(v)) if v.size else None}
        for k, v in results[0].items()
    ]}
    for o in doc["outputs"]:
        out.say(f"{o['name']}: {o['dtype']}{o['shape']} min {o['min']:.4g} max {o['max']:.4g}" if o["min"] is not None
                else f"{o['name']}: {o['dtype']}{o['shape']}")
    report = art.target_cls.run_report(art)  # what the target measured during these runs (tpu: cycles per region)
    if report is not None:
        doc["target_report"] = report
        for line in art.target_cls.report_lines(report):
            out.say(line)
    code = EXIT_OK
    if args.verify:
        cmp = verify_artifact(art, ref_graph, data, atol=args.atol, rtol=args.rtol)
        doc["verification"] = cmp.to_json()
        if cmp.ok:
            out.say(f"verified against ONNX Runtime: {cmp.summary()}")
        else:
            print(f"graphopt: error: {args.artifact}: outputs differ from ONNX Runtime: {cmp.summary()}", file=sys.stderr)
            code = EXIT_VERIFY_FAILED
    if args.output:
        # np.savez stamps members with zipfile's fixed 1980 date: same outputs, same bytes (tested).
        buf = io.BytesIO()
        np.savez(buf, **results[0])
        atomic_write_bytes(args.output, buf.getvalue())
        doc["output"] = args.output
    doc["ok"] = code == EXIT_OK
    out.emit(doc)
    return code


def cmd_bench(args, out: _Out, debug_log: list) -> int:
    from .bench import bench, format_report

    doc = bench(args.artifact, inputs=args.inputs, seed=args.seed, threads=args.threads, seconds=args.seconds,
                warmup=args.warmup, profile=args.profile, atol=args.atol, rtol=args.rtol)
    if not out.quiet:
        for note in doc["notes"]:
            print(f"graphopt: note: {note}", file=sys.stderr)
    for line in format_report(doc):
        out.say(line)
    out.emit(doc)
    return EXIT_OK


def cmd_inspect(args, out: _Out, debug_log: list) -> int:
    from .graph import Graph, parse_input_shapes
    from .stats import human_bytes, human_count, inspect_graph

    from .artifact import is_artifact

    if is_artifact(Path(args.model)):
        return _inspect_artifact(args, out)
    g = Graph.load(args.model).with_input_shapes(parse_input_shapes(args.input_shape))
    doc = inspect_graph(g)
    out.emit(doc)
    out.say(f"{args.model}: opset {doc['opset']}, producer {doc['producer'] or '?'}")
    for kind in ("inputs", "outputs"):
        for s in doc[kind]:
            out.say(f"  {kind[:-1]:<6} {s['name']}: {s['dtype']}{s['shape']}")
    out.say(f"  nodes {doc['nodes']}, parameters {human_count(doc['params'])} "
            f"({human_count(doc['nonzeros'])} non-zero), {human_bytes(doc['bytes'])}, "
            f"~{human_count(doc['flops'])} FLOPs (estimated; symbolic dims = 1)")
    out.say("  ops: " + ", ".join(f"{k}×{v}" for k, v in doc["ops"].items()))
    return EXIT_OK


def _inspect_artifact(args, out: _Out) -> int:
    """``graphopt inspect <artifact folder>``: what it is and whether it runs here, from its manifest alone
    (hashes checked, no code loaded: a GPU artifact is described on a machine without a GPU)."""
    from .artifact import Artifact
    from .stats import human_bytes

    art = Artifact(args.model)
    doc = art.describe()
    out.emit(doc)
    t = doc["target"]
    src = (doc.get("source") or {}).get("name") or "?"
    out.say(f"{args.model}: graphopt artifact (format {doc['format_version']}) of {src}, target '{t.get('name')}', "
            f"{human_bytes(doc['bytes'] or 0)}")
    out.say(f"  pipeline {doc['pipeline']}")
    facts = {k: t[k] for k in ("mcpu", "arch", "cuda_version", "threads", "array") if t.get(k) is not None}
    a = facts.get("array")
    if isinstance(a, dict):  # the tpu target's simulated array
        facts["array"] = (f"{a.get('rows')}x{a.get('cols')} @ {a.get('clock_mhz')} MHz, {a.get('bandwidth_gbs')} GB/s, "
                          f"buffer {a.get('buffer_kib')} KiB")
    if facts:
        out.say("  target " + ", ".join(f"{k} {v}" for k, v in facts.items()))
    for p in doc["programs"]:
        acc = f" via {p['accelerator']}" if p.get("accelerator") else ""
        out.say(f"  program {p['name']}: {p['device']}{acc}, rank {p['rank']}, {p['library']} "
                f"({human_bytes(p['library_bytes'] or 0)}), {p['weights']} weights ({human_bytes(p['weight_bytes'])})")
    for kind in ("inputs", "outputs"):
        for spec in doc[kind]:
            out.say(f"  {kind[:-1]:<6} {spec['name']}: {spec['dtype']}{spec['shape']}")
    runs = doc["runs_here"]
    out.say("  runs here: yes" if runs is True else f"  runs here: no: {runs}")
    return EXIT_OK


def _listing(kind: str, args, out: _Out) -> int:
    from .plugins import get_registry

    reg = get_registry(args.disable_plugin)
    table = reg.passes if kind == "passes" else reg.targets
    doc = []
    for name in sorted(table):
        cls = table[name]
        entry = {"name": name, "plugin": cls.plugin, "summary": cls.summary(),
                 "options": [o.to_json() for o in cls.options]}
        if kind == "passes":
            entry["lossless"] = cls.lossless
        doc.append(entry)
        out.say(f"{name:<22} {'lossless ' if kind == 'passes' and cls.lossless else ('lossy    ' if kind == 'passes' else '')}"
                f"{cls.summary()}  [{cls.plugin}]")
        for o in cls.options:
            out.say(f"    {o.describe()}")
    out.emit(doc)
    return EXIT_OK


def cmd_plugins(args, out: _Out, debug_log: list) -> int:
    from .plugins import get_registry

    reg = get_registry(args.disable_plugin)
    doc = [p.to_json() for p in reg.plugins.values()]
    for p in reg.plugins.values():
        what = ", ".join(p.passes + p.targets) or "-"
        out.say(f"{p.name:<22} {p.status:<9} {p.source}")
        out.say(f"    provides: {what}" + (f"\n    error: {p.error}" if p.error else ""))
        for w in p.warnings:
            out.say(f"    warning: {w}")
    out.emit(doc)
    return EXIT_OK


COMMANDS = {
    "lower": cmd_lower, "optimize": cmd_optimize, "compare": cmd_compare, "run": cmd_run, "bench": cmd_bench,
    "inspect": cmd_inspect,
    "passes": lambda a, o, d: _listing("passes", a, o), "targets": lambda a, o, d: _listing("targets", a, o),
    "plugins": cmd_plugins,
}


def _where_raised(e: BaseException) -> str:
    """``module:line`` of the innermost frame of ``e``'s traceback (who called sys.exit)."""
    tb = e.__traceback__
    if tb is None:
        return "unknown code"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_globals.get('__name__', tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"


def main(argv=None) -> int:
    """Run one command; returns the exit code (never raises, never exits 0 on an error).

    Errors become one line on stderr (and, with ``--json``, one JSON error
    object on stdout). SystemExit or any other BaseException raised inside a
    command (a library or plugin calling ``sys.exit(0)``) is an error, not a
    silent success; SIGTERM/SIGHUP unwind like Ctrl-C (exit 128 + signal).
    """
    from .outputs import error_json
    from .signals import Interrupted, orderly_unwind

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug = "--debug" in argv
    as_json = "--json" in argv
    debug_log: list[str] = []
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")
    error: dict | None = None
    parsed = False
    try:
        args = build_parser().parse_args(argv)
        parsed, as_json = True, getattr(args, "json", False)
        if args.version:
            from . import __version__

            print(f"graphopt {__version__}")
            return EXIT_OK
        if not args.command:
            build_parser().print_help()
            return EXIT_BAD_INPUT
        out = _Out(args)
        from .plugins import get_registry

        reg = get_registry(args.disable_plugin)
        if not out.quiet and args.command != "plugins":
            for p in reg.failures():
                print(f"graphopt: warning: plugin '{p.name}' not loaded: {p.error} "
                      f"(disable it with --disable-plugin {p.name})", file=sys.stderr)
            for p in reg.plugins.values():
                for w in p.warnings:
                    print(f"graphopt: warning: plugin '{p.name}': {w}", file=sys.stderr)
        with orderly_unwind():
            code = COMMANDS[args.command](args, out, debug_log)
    except GraphoptError as e:
        if debug:
            traceback.print_exc()
        print(f"graphopt: error: {e}", file=sys.stderr)
        code, error = e.exit_code, error_json(e)
    except Interrupted as e:
        print(f"graphopt: interrupted ({signal_name(e.signum)}); outputs rolled back", file=sys.stderr)
        code, error = e.exit_code, {"message": str(e), "kind": "Interrupted", "exit_code": e.exit_code}
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        code, error = 130, {"message": "interrupted", "kind": "Interrupted", "exit_code": 130}
    except SystemExit as e:  # raised inside a command: never a silent exit 0
        if not parsed:  # argparse's own exit after printing --help
            return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_BAD_INPUT)
        if debug:
            traceback.print_exc()
        msg = (f"internal error: sys.exit({e.code!r}) was called inside the command by {_where_raised(e)} "
               "(rerun with --debug for the traceback and please report it)")
        print(f"graphopt: {msg}", file=sys.stderr)
        code, error = EXIT_INTERNAL, {"message": msg, "kind": "SystemExit", "exit_code": EXIT_INTERNAL}
    except BaseException as e:  # a bug in graphopt or a library (or a stray BaseException)
        if debug:
            traceback.print_exc()
        print(f"graphopt: internal error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
              " (rerun with --debug for the traceback and please report it)", file=sys.stderr)
        code, error = EXIT_INTERNAL, error_json(e)
    if error is not None and as_json:
        print(json.dumps({"ok": False, "error": error, "exit_code": code}, indent=2, sort_keys=True, default=str))
    if debug and any(debug_log):
        print("---- library output ----\n" + "".join(debug_log), file=sys.stderr)
    return code


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
