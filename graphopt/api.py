"""The Python API behind every CLI command: optimize, lower, verify.

Everything is validated (pipeline text, target and its options, input
shapes, output location) before the first pass runs, so a typo costs
nothing. Outputs are written atomically; with ``verify`` a lowered artifact
is checked against ONNX Runtime *before* it is moved into place, so a
failed check leaves nothing behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import __version__
from .artifact import Artifact, is_artifact, versions, write_graph_and_weights, write_manifest
from .artifact import FORMAT, FORMAT_VERSION, complete_programs
from .console import Progress, capture_native_output
from .data import DataSource
from .errors import ArtifactError, OptionError, OutputError, VerificationError
from .fsutil import atomic_directory, private_tempdir
from .graph import Graph
from .manager import PassManager
from .outputs import Reporting, check_dumps, check_outputs, default_artifact_path, dump_paths, model_inputs
from .passbase import PassContext, PassRecord
from .pipeline import Pipeline
from .plugins import Registry, get_registry
from .reference import (artifact_tolerance, check_value_sizes, Comparison, compare_artifact_outputs,
                        reference_session)
from .stats import graph_stats
from .target import LowerContext, Target, resolve_threads

#: What `graphopt lower` runs when no pipeline is given: every lossless clean-up, plus the rewrite of
#: Loop/Scan into ops TVM imports (a no-op on graphs without them). LSTM/GRU/RNN stay whole: the CPU
#: target compiles them natively (targets/recurrent.py); 'lower-recurrent' unrolls them for other targets.
DEFAULT_LOWER_PIPELINE = "cleanup,unroll-loops,fold-batchnorm,cleanup"
#: The default for a target that does not compile LSTM/GRU/RNN itself (cuda, tpu): they are unrolled.
DEFAULT_LOWER_PIPELINE_UNROLLED = "cleanup,unroll-loops,lower-recurrent,fold-batchnorm,cleanup"
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})


def default_lower_pipeline(target: Target) -> str:
    """What `graphopt lower` runs for ``target`` when no pipeline is given: :data:`DEFAULT_LOWER_PIPELINE`,
    plus 'lower-recurrent' where the target does not compile the recurrent ops natively (``native_ops``)."""
    return DEFAULT_LOWER_PIPELINE if RECURRENT_OPS <= set(target.native_ops) else DEFAULT_LOWER_PIPELINE_UNROLLED

#: Inside an artifact's temporary folder: where TVM and the C compiler keep their temporary files.
SCRATCH_DIR = ".scratch"


@dataclass
class RunResult:
    """The outcome of optimize/lower: the graph, per-pass records and (for lower) the artifact."""

    graph: Graph
    records: list[PassRecord]
    pipeline: str
    artifact: Path | None = None
    verification: Comparison | None = None
    manifest: dict | None = None
    native_log: str = ""
    report: dict = field(default_factory=dict)


def _as_graph(model: Graph | str | os.PathLike) -> Graph:
    return model if isinstance(model, Graph) else Graph.load(model)


def _as_pipeline(pipeline: Pipeline | str | os.PathLike | None, default: str, registry: Registry) -> Pipeline:
    if isinstance(pipeline, Pipeline):
        return pipeline
    if pipeline is None:
        return Pipeline.parse(default, registry)
    text = str(pipeline)
    # A Path is always a pipeline file; a string is pipeline text unless it names a .toml file.
    if (isinstance(pipeline, os.PathLike) and not isinstance(pipeline, str)) or text.endswith(".toml"):
        return Pipeline.from_toml(text, registry)
    return Pipeline.parse(text, registry)


def _source_name(model) -> str | None:
    src = getattr(model, "source", model)
    return str(src) if src is not None else None


def _opt_str(path) -> str | None:
    return str(path) if path is not None else None


def _source_digest(graph: Graph) -> str:
    return graph.digest()


def _eval_set(eval_data, graph: Graph):
    """``eval`` as given to optimize/lower (an EvalSet, an .npz path, or None) as a checked EvalSet."""
    from .accuracy import EvalSet, read_eval

    if eval_data is None or isinstance(eval_data, EvalSet):
        return eval_data  # the PassManager checks it against the graph before the first pass
    return read_eval(eval_data, graph)


def _report(graph_in: Graph, graph_out: Graph, pipeline: Pipeline, records, ctx: PassContext, **extra) -> dict:
    return {
        "graphopt": __version__,
        "model": graph_in.source,
        "pipeline": str(pipeline),
        "data": ctx.data.describe(),
        # The manager already measured both ends; recount only for an empty pipeline.
        "before": records[0].before if records else graph_stats(graph_in).to_json(),
        "after": records[-1].after if records else graph_stats(graph_out).to_json(),
        "passes": [r.to_json() for r in records],
        **({"eval": ctx.eval.source} if ctx.eval is not None else {}),
        **extra,
    }


def optimize(
    model: Graph | str | os.PathLike,
    pipeline: Pipeline | str | None = None,
    *,
    output: str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_values: Mapping[str, Any] | None = None,
    data: DataSource | None = None,
    verify: bool = True,
    dump_after: Sequence[str] = (),
    dump_dir: str | os.PathLike = ".",
    report: str | os.PathLike | None = None,
    progress: Progress | None = None,
    registry: Registry | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    eval: Any = None,
    budget: float | None = None,
    verify_layers: bool = False,
) -> RunResult:
    """Run a pass pipeline over a model; optionally save the result and a JSON report.

    With ``verify_layers`` the report's ``layers`` compares every intermediate
    value of the result with the input model's (see
    :func:`graphopt.accuracy.compare_layers`) and names the first that diverges.

    ``data`` is the calibration data of data-aware passes (and the inputs of
    the numerical checks); ``eval`` labelled evaluation data (an
    :class:`~graphopt.accuracy.EvalSet` or an .npz of the inputs plus
    ``labels``) on which the task metric is measured before and after every
    lossy pass; ``budget`` bounds the pipeline's drop of that metric in points
    (without ``eval``: of top-1 agreement with the float model), which passes
    may use to choose (``quantize`` keeps its most sensitive layers in float)
    and which, exceeded at the end, raises :class:`VerificationError`.

    ``output``, ``report`` and the dumps may not be, sit inside or contain an
    input (the model, its external data, the data, the pipeline file), and
    dumps never overwrite a file (:class:`OutputError`, before anything runs).
    The report is written with ``"ok": false`` and the error when the run
    fails; on success it is written *before* ``output``, so a report that
    cannot be written leaves no optimized model behind.
    """
    registry = registry or get_registry()
    data = data or DataSource()
    # A large model is saved with its weights in '<output>.data' beside it: that file is an output too.
    side = Path(str(output) + ".data") if output else None
    check_outputs([("output", output), ("output's weights", side), ("report", report)],
                  model_inputs(model, data, pipeline, eval))
    with Reporting(report, command="optimize", model=_source_name(model), output=_opt_str(output)) as rep:
        pipe = _as_pipeline(pipeline, "cleanup", registry)
        rep.update(pipeline=str(pipe))
        dumps = dump_paths(pipe, dump_after, dump_dir)
        if dumps:
            check_outputs([("output", output), ("output's weights", side), ("report", report),
                           *(("dump", d) for d in dumps)],
                          model_inputs(model, data, pipeline, eval))
            check_dumps(dumps)
        graph = _as_graph(model).with_input_shapes(input_shapes or {}).with_input_values(input_values or {})
        ctx = PassContext(
            data=data, verify=verify, dump_after=tuple(dump_after), dump_dir=str(dump_dir),
            progress=progress, atol=atol, rtol=rtol, eval=_eval_set(eval, graph), budget=budget,
        )
        manager = PassManager(pipe, ctx, registry)
        out, records = manager.run(graph)
        layers = _layers(graph, out, data) if verify_layers else None
        doc = rep.success(_report(graph, out, pipe, records, ctx, output=_opt_str(output),
                                  **({"accuracy": manager.accuracy} if manager.accuracy else {}),
                                  **({"layers": layers} if layers else {})))
        if output:
            out.save(output)
        return RunResult(out, records, str(pipe), report=doc)


def make_target(target: Target | str, options: Mapping[str, Any] | None, registry: Registry) -> Target:
    if isinstance(target, Target):
        return target
    return registry.get_target(target)(**(options or {}))


def lower(
    model: Graph | str | os.PathLike,
    target: Target | str = "cpu",
    output: str | os.PathLike | None = None,
    *,
    pipeline: Pipeline | str | None = None,
    target_options: Mapping[str, Any] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_values: Mapping[str, Any] | None = None,
    data: DataSource | None = None,
    verify: bool = False,
    verify_passes: bool = True,
    dump_after: Sequence[str] = (),
    report: str | os.PathLike | None = None,
    progress: Progress | None = None,
    registry: Registry | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    threads: int | None = None,
    tune: int = 0,
    tuning_db: str | os.PathLike | None = None,
    eval: Any = None,
    budget: float | None = None,
    keep_if_faster: bool = False,
    verify_layers: bool = False,
) -> RunResult:
    """Optimize then lower a model to an artifact directory at ``output``.

    A pipeline with lossy passes is also lowered without them, and both
    artifacts are timed in one run: the report's ``payoff`` gives their
    latency and size; with ``keep_if_faster`` the artifact without the lossy
    passes is kept when the lossy one was not faster (and the report says so).

    ``threads`` caps the threads the artifact runs with (default
    ``$GRAPHOPT_THREADS``, else every core; recorded in the manifest).
    ``tune`` spends that many tuning trials (0: default schedules only),
    recording results in the tuning database ``tuning_db`` (default: under the
    user's cache folder); targets that cannot tune ignore both.

    ``output`` defaults to ``build/<model stem>-<target>`` (see
    :func:`~graphopt.outputs.default_artifact_path`); it, ``report`` and the
    dumps may not be, sit inside or contain an input (:class:`OutputError`,
    before anything runs). With ``verify`` the artifact runs on the data
    source's inputs (generated when none) and is compared with ONNX Runtime on
    the *input* model; outside tolerance raises :class:`VerificationError` and
    no artifact is written. The report is written before the artifact is moved
    into place (a report that cannot be written leaves no artifact) and is
    rewritten with ``"ok": false`` and the error when the run fails. TVM's and
    the C compiler's temporary files live inside the artifact's temporary
    folder and go with it.
    """
    registry = registry or get_registry()
    data = data or DataSource()
    if isinstance(tune, bool) or not isinstance(tune, int) or tune < 0:
        raise OptionError(f"tune = {tune!r}: the number of tuning trials must be an integer of at least 0 (0: no tuning)")
    output = Path(output) if output is not None else default_artifact_path(model, target)
    check_outputs([("artifact", output), ("report", report)], model_inputs(model, data, pipeline, eval))
    with Reporting(report, command="lower", model=_source_name(model), artifact=str(output)) as rep:
        tgt = make_target(target, target_options, registry)
        cannot = tgt.cannot_run_here() if verify else None
        if cannot:  # known before anything is compiled (a GPU target without the GPU)
            raise ArtifactError(f"{output}: --verify runs the artifact, and this machine cannot: {cannot}. "
                                "Lower without --verify, then `graphopt run --verify` where it runs")
        pipe = _as_pipeline(pipeline, default_lower_pipeline(tgt), registry)
        rep.update(pipeline=str(pipe))
        if os.path.lexists(output) and not is_artifact(output):
            raise OutputError(f"{output}: exists and is not a graphopt artifact; choose another output path or remove it")
        dumps = dump_paths(pipe, dump_after, output.parent)
        if dumps:
            check_outputs([("artifact", output), ("report", report), *(("dump", d) for d in dumps)],
                          model_inputs(model, data, pipeline, eval))
            check_dumps(dumps)
        progress = progress or Progress(enabled=False)
        original = _as_graph(model).with_input_shapes(input_shapes or {}).with_input_values(input_values or {})
        ctx = PassContext(data=data, verify=verify_passes, dump_after=tuple(dump_after),
                          dump_dir=str(output.parent), progress=progress, atol=atol, rtol=rtol,
                          eval=_eval_set(eval, original), budget=budget)
        manager = PassManager(pipe, ctx, registry)
        graph, records = manager.run(original)
        layers = _layers(original, graph, data) if verify_layers else None
        tgt.check(graph)
        check_value_sizes(graph)  # the importer evaluates constant subgraphs: no unbounded values
        lctx = LowerContext(progress=progress, threads=resolve_threads(threads), tune_trials=tune,
                            tuning_db=Path(tuning_db) if tuning_db is not None else None)
        comparison = None
        lossy = any(not p.lossless for p in pipe)
        with atomic_directory(output, replace_if=is_artifact) as tmp:
            manifest, native = _build_artifact(graph, original, pipe, tgt, tmp, lctx)
            payoff = None
            if lossy:
                graph, manifest, payoff, native = _payoff(graph, original, pipe, tgt, tmp, lctx, manifest, native,
                                                          data, registry, progress, keep_if_faster)
                if payoff["kept"] == "without":
                    pipe = Pipeline([p for p in pipe if p.lossless])
            artifact_vs_float = None
            lossy = any(not p.lossless for p in pipe)
            if layers is not None:
                # Before the verification: a failed one's report says where the artifact went wrong too.
                layers["artifact"] = _artifact_layers(graph, original, pipe, tgt, tmp, lctx, data, manifest, progress)
                rep.update(layers=layers)
            if verify:
                cannot = type(tgt).cannot_run(manifest)
                if cannot:
                    raise ArtifactError(f"{output}: --verify runs the artifact, and this machine cannot: {cannot}. "
                                        "Lower without --verify, then `graphopt run --verify` where it runs")
                with progress.step("verify against ONNX Runtime"):
                    # A lossy pipeline changed the model on purpose: the artifact must match the graph it
                    # compiled; how far it is from the original is measured, not judged (same run of it).
                    art = Artifact(tmp)
                    checked = graph if lossy else original
                    ref, got, feeds_, session = _reference_and_artifact_outputs(art, checked, data)
                    comparison = compare_artifact_outputs(art.manifest, ref, got, [o.name for o in art.outputs],
                                                          atol=atol, rtol=rtol, graph=checked, feeds=feeds_,
                                                          session=session)
                    if lossy:
                        from .accuracy import output_error

                        feeds = data.samples(original, limit=None if not data.generated else 2)
                        float_ref = data.reference_outputs(original, feeds,
                                                           reference_session(original, threads=art.threads or 0))
                        artifact_vs_float = output_error(float_ref, got, [o.name for o in art.outputs]).to_json()
                if not comparison.ok:
                    what = "the optimized graph it compiled" if lossy else "ONNX Runtime"
                    raise VerificationError(f"{output}: lowered artifact does not match {what}: {comparison.summary()}")
            if artifact_vs_float is not None:
                manager.accuracy["artifact_vs_float"] = artifact_vs_float
            doc = rep.success(_report(original, graph, pipe, records, ctx, artifact=str(output),
                                      **({"accuracy": manager.accuracy} if manager.accuracy else {}),
                                      **({"payoff": payoff} if payoff else {}),
                                      **({"layers": layers} if layers else {}),
                                      target=manifest["target"],
                                      verification=comparison.to_json() if comparison else None))
        return RunResult(graph, records, str(pipe), output, comparison, manifest, native, doc)


def _build_artifact(graph: Graph, original: Graph, pipe: Pipeline, tgt: Target, dest: Path,
                    lctx: LowerContext) -> tuple[dict, str]:
    """Write ``graph`` lowered by ``tgt`` into the folder ``dest`` (weights, code, manifest); returns
    (manifest, native log). TVM's and the C compiler's temporary files live in ``dest``'s scratch folder."""
    with private_tempdir(dest / SCRATCH_DIR):
        lctx.params = tgt.select_params(graph)
        weights = write_graph_and_weights(graph, lctx.params, dest)
        lctx.weights = weights
        lctx.native_log = []
        with capture_native_output() as nlog:
            lowered = tgt.lower(graph, dest, lctx)
        native = nlog.text + "".join(s + "\n" for s in lctx.native_log)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": {"name": Path(original.source).name if original.source else None, "sha256": _source_digest(original)},
        "pipeline": str(pipe),
        "inputs": [s.to_json() for s in graph.inputs],
        "outputs": [s.to_json() for s in graph.outputs],
        "weights": weights,  # a target that packs weights returns a longer list
        "versions": versions(),
        **lowered,
    }
    manifest["programs"] = complete_programs(manifest["programs"], manifest["inputs"], manifest["outputs"])
    write_manifest(dest, manifest)
    return manifest, native


#: Inside an artifact's temporary folder: the artifact built without the lossy passes, to compare with.
WITHOUT_LOSSY_DIR = ".without-lossy"
#: Seconds spent timing the two artifacts against each other.
PAYOFF_SECONDS = 2.0


def _payoff(graph, original, pipe, tgt, tmp: Path, lctx, manifest, native, data, registry, progress,
            keep_if_faster: bool):
    """Did the lossy passes pay off? Lower the pipeline without them and compare both artifacts: timed in one
    run, or, for a simulated target (``wall_clock_timing = False``), by their modelled times.

    Returns (graph, manifest, payoff, native) of the artifact kept in ``tmp``: the lossy one, unless
    ``keep_if_faster`` and it was not faster, in which case the other one's files replace it.
    """
    import shutil

    plain_pipe = Pipeline([p for p in pipe if p.lossless])
    untimed = type(tgt).cannot_run(manifest)
    if untimed:
        # Nothing to run on this machine (a GPU artifact without a GPU): keep the lossy artifact, say why,
        # and do not build the other one.
        note = f"not timed: {untimed}" + ("; --keep-if-faster kept the artifact with them" if keep_if_faster else "")
        return graph, manifest, {"timed": False, "kept": "with", "pipeline_without": str(plain_pipe),
                                 "note": note}, native
    plain_dir = tmp / WITHOUT_LOSSY_DIR
    with progress.step("lower without the lossy passes (did they pay off?)"):
        plain_graph, _ = PassManager(plain_pipe, PassContext(data=data, verify=False, progress=progress),
                                     registry).run(original)
        plain_dir.mkdir()
        plain_manifest, plain_native = _build_artifact(plain_graph, original, plain_pipe, tgt, plain_dir, lctx)
    feed = data.samples(original, limit=1)[0]
    if tgt.wall_clock_timing:
        from .bench import measure

        with progress.step("time both artifacts"):
            m = measure({"with": ("graphopt", str(tmp)), "without": ("graphopt", str(plain_dir))}, feed,
                        [o.name for o in graph.outputs], threads=lctx.threads, seconds=PAYOFF_SECONDS, warmup=3)
        lat = {k: m["runtimes"][k].get("median_ms") for k in ("with", "without")}
        comparable = lat["with"] is not None and lat["without"] is not None
        extra, unit = {"threads": m["threads"]}, "ms"
    else:
        with progress.step("model both artifacts' time"):
            lat, comparable, note = _modelled_latency(tgt, tmp, plain_dir, manifest, plain_manifest, feed)
        extra, unit = {"timed": "modelled", "note": note}, "ms modelled"
    size = {"with": _dir_bytes(tmp, skip=plain_dir), "without": _dir_bytes(plain_dir)}
    payoff = {"latency_ms": lat, "size_bytes": size, **extra,
              "speedup": round(lat["without"] / lat["with"], 4) if comparable and lat["with"] else None,
              "size_ratio": round(size["without"] / size["with"], 4) if size["with"] else None,
              "pipeline_without": str(plain_pipe), "kept": "with"}
    if keep_if_faster and comparable and not lat["with"] < lat["without"]:
        payoff["kept"] = "without"
        why = (f"the lossy passes made the artifact slower ({lat['with']:.4g} vs {lat['without']:.4g} {unit} "
               "without them): --keep-if-faster kept the artifact without them")
        payoff["note"] = f"{payoff['note']}; {why}" if payoff.get("note") else why
        for entry in list(tmp.iterdir()):
            if entry != plain_dir:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        for entry in list(plain_dir.iterdir()):
            entry.rename(tmp / entry.name)
        plain_dir.rmdir()
        return plain_graph, plain_manifest, payoff, plain_native
    shutil.rmtree(plain_dir)
    return graph, manifest, payoff, native


def _modelled_latency(tgt, tmp: Path, plain_dir: Path, manifest, plain_manifest, feed) -> tuple[dict, bool, str]:
    """``(latency_ms, comparable, note)`` of both artifacts from the target's model of its hardware
    (:meth:`Target.modelled_seconds`). Only the accelerator is modelled: the times compare only when both
    leave the same work to the host (a pass that moves matmuls off the array would look free)."""
    cls = type(tgt)
    secs = {"with": cls.modelled_seconds(Artifact(tmp), feed),
            "without": cls.modelled_seconds(Artifact(plain_dir), feed)}
    lat = {k: None if v is None else v * 1e3 for k, v in secs.items()}
    host = [m.get("target", {}).get("host_macs") for m in (manifest, plain_manifest)]
    note = f"modelled time of the '{tgt.name}' target's accelerator, not measured"
    if host[0] != host[1]:
        why = ("the two artifacts leave different work to the host CPU, whose time is not modelled (host "
               f"MACs {host[0]} with the lossy passes, {host[1]} without)")
    elif lat["with"] is None or lat["without"] is None:
        why = "the target gave no modelled time"
    elif not (lat["with"] > 0 and lat["without"] > 0):
        why = "one of them runs nothing on the accelerator"
    else:
        return lat, True, note
    return lat, False, f"{note}; not comparable: {why}"


def _layers(original: Graph, graph: Graph, data: DataSource) -> dict:
    """``--verify-layers``: the optimized graph's intermediate values against the original's, per layer."""
    from .accuracy import compare_layers

    return compare_layers(original, graph, data.samples(original, limit=8))


#: Inside an artifact's temporary folder: the probe artifact of ``--verify-layers`` (removed after use).
PROBE_DIR = ".verify-layers"


def _artifact_layers(graph: Graph, original: Graph, pipe: Pipeline, tgt: Target, tmp: Path, lctx: LowerContext,
                     data: DataSource, manifest: dict, progress: Progress) -> dict:
    """``--verify-layers`` on ``lower``: the compiled code's intermediate values against the graph it compiled.

    ``graph`` is lowered again (same target object and options) with its intermediate values (see
    :func:`graphopt.accuracy.probe_graph`) as extra outputs, into a folder inside the artifact's temporary
    folder that is removed afterwards; that probe artifact runs on the feeds of the graph-vs-float section
    and each value is compared with ONNX Runtime's on ``graph``. A probe that cannot be lowered or run does
    not fail the run: the section says why, in ``skipped``.
    """
    import dataclasses
    import shutil

    from .accuracy import (ARTIFACT_DIVERGENCE_SNR_DB, ARTIFACT_INT8_DIVERGENCE_SNR_DB, compare_artifact_layers,
                           probe_graph)
    from .reference import DEFAULT_ATOL, DEFAULT_RTOL, quantized_artifact
    from .signals import raise_if_interrupted

    threshold = ARTIFACT_INT8_DIVERGENCE_SNR_DB if quantized_artifact(manifest) else ARTIFACT_DIVERGENCE_SNR_DB
    section: dict = {"layers": [], "first_divergent": None, "threshold_db": threshold}
    probe_dir = tmp / PROBE_DIR
    doing = "choose the intermediate values to compare"
    try:
        probe, values, total = probe_graph(graph)
        if not values:
            return {**section, "skipped": "the compiled graph has no float intermediate values to compare"}
        section.update(values=len(values), total_values=total, note=(
            "values of the same graph compiled with these tensors as extra outputs (materializing a tensor can "
            "change what the compiler fuses), against ONNX Runtime on the graph the artifact compiled"
            + (f"; {len(values)} of {total} values, evenly spaced in node order" if total > len(values) else "")))
        doing = "compile the graph with its intermediate values as outputs"
        with progress.step(f"lower again with {len(values)} intermediate values as outputs (--verify-layers)"):
            probe_dir.mkdir()
            probe_manifest, _ = _build_artifact(probe, original, pipe, tgt, probe_dir, dataclasses.replace(lctx))
            art = Artifact(probe_dir)
            # What the target reports counting (integer kernels, Winograd convs...) that came out otherwise.
            built, probed = manifest.get("target") or {}, probe_manifest.get("target") or {}
            differs = {k: [v, probed.get(k)] for k, v in built.items()
                       if type(v) is int and k != "threads" and probed.get(k) != v}
            if differs:
                section["build_differs"] = differs
                section["note"] += "; the probe's build differs: " + ", ".join(
                    f"{k} {p} (the artifact: {a})" for k, (a, p) in sorted(differs.items()))
            doing = "run the compiled graph with its intermediate values as outputs"
            feeds = data.samples(original, limit=8)
            # --verify's absolute tolerance for this artifact: below it, a low SNR is a value near zero.
            atol, _ = artifact_tolerance(manifest, DEFAULT_ATOL, DEFAULT_RTOL)
            return {**section, **compare_artifact_layers(graph, values, feeds, art.run, threshold_db=threshold,
                                                         atol=atol)}
    except Exception as e:  # noqa: BLE001 - TVM raises its own types; the run goes on without the section
        raise_if_interrupted()  # a stop request that TVM turned into an error of its own
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {**section, "skipped": f"could not {doing}: {msg}"}
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)


def _dir_bytes(path: Path, skip: Path | None = None) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*")
               if p.is_file() and (skip is None or skip not in p.parents))


def _reference_and_artifact_outputs(artifact: Artifact, reference: Graph, data: DataSource):
    """``(ref, got, feeds, session)``: ONNX Runtime's outputs of ``reference`` and the artifact's on the data
    source's samples (generated: 2), those samples and the reference session."""
    feeds = data.samples(reference, limit=None if not data.generated else 2)
    # ONNX Runtime on as many threads as the artifact (the same machine share on both sides).
    session = reference_session(reference, threads=artifact.threads or 0)
    ref = data.reference_outputs(reference, feeds, session)  # fails as the inputs' fault, not the artifact's
    return ref, artifact.run_many(feeds), feeds, session


def verify_artifact(
    artifact: Artifact,
    reference: Graph | None = None,
    data: DataSource | None = None,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> Comparison:
    """Run ``artifact`` and ONNX Runtime (on ``reference``, default: the artifact's own graph) on the same inputs.

    An artifact with integer kernels is checked with the wider quantization tolerances when ``atol`` and
    ``rtol`` are the defaults, and then within the model's own drift (see
    :func:`graphopt.reference.compare_artifact_outputs`).
    """
    reference = reference or artifact.reference_graph()
    ref, got, feeds, session = _reference_and_artifact_outputs(artifact, reference, data or DataSource())
    return compare_artifact_outputs(artifact.manifest, ref, got, [o.name for o in artifact.outputs], atol=atol,
                                    rtol=rtol, graph=reference, feeds=feeds, session=session)


def load(path: str | os.PathLike, *, threads: int | None = None, device: str | None = None) -> Artifact:
    """Load an artifact directory written by :func:`lower` (or ``graphopt lower``).

    The compiled code runs with the threads recorded in the manifest, capped by
    ``threads`` (default ``$GRAPHOPT_THREADS``, else no cap); ``Artifact.threads``
    is the count in effect and ``Artifact.notes`` say why it differs from either.
    """
    art = Artifact(path, threads=threads, device=device)
    art.load_programs()
    return art


def bench(artifact: str | os.PathLike, feed: Mapping[str, Any] | None = None, **options) -> dict:
    """Time an artifact next to ONNX Runtime on the same inputs and threads (what ``graphopt bench`` prints).

    ``feed`` is ``{input name: array}`` (default: the first sample of
    ``inputs=``, else generated from ``seed=``); ``options`` are those of
    :func:`graphopt.bench.bench` (``threads``, ``seconds``, ``warmup``,
    ``profile``, ``atol``, ``rtol``). Each runtime runs in a process of its
    own; outputs that disagree raise :class:`VerificationError` before any
    timing. Returns the measurement as a dict (see :func:`graphopt.bench.bench`).
    """
    from .bench import bench as run_bench

    return run_bench(artifact, feed, **options)
