"""PassManager: runs a pipeline with instruments around every pass.

Built-in instruments (always on): timing, before/after stats, numerical
checks (a lossless pass must reproduce its input's outputs on ONNX Runtime;
a lossy pass gets its error measured), IR dumps after named passes, and the
ONNX checker on every output. Plugins add instruments through the
``graphopt_pass_start`` / ``graphopt_pass_end`` hooks.
"""

from __future__ import annotations

import time
from pathlib import Path

from .console import step
from .errors import DataError, GraphoptError, ModelError, OptionError, PluginError, VerificationError
from .graph import Graph
from .passbase import PassContext, PassRecord, needs_calibration_data
from .options import check_tolerance
from .pipeline import Pipeline
from .plugins import Registry, describe_exception, get_registry
from .reference import compare_outputs, reference_session, run_reference
from .stats import graph_stats


#: Samples of the data the error of lossy passes against the float model is measured on.
LOSSY_SAMPLES = 32


class _Reference:
    """Reference outputs of the current graph, recomputed only when it changes."""

    def __init__(self, ctx: PassContext, samples: int = 2):
        self.ctx = ctx
        self.samples = samples
        self.feeds = None
        self.outputs = None
        self.original = None  # the input model's outputs: what lossy passes are measured against
        self.skipped: str | None = None

    def outputs_of(self, graph: Graph):
        if self.feeds is None:
            self.feeds = self.ctx.data.samples(graph, limit=self.samples)
        return run_reference(graph, self.feeds, reference_session(graph))

    def prime(self, graph: Graph) -> None:
        """Outputs of the input model, which every lossless pass must reproduce.

        A model ONNX Runtime cannot load (custom ops) is not verified pass by pass;
        a model it loads but cannot run on the samples is a :class:`DataError`
        naming the model and the inputs (with generated ones, how to give real
        ones): otherwise the first pass would be blamed for the inputs' fault.
        """
        try:
            session = reference_session(graph)
        except ModelError as e:
            self.skipped = f"reference runtime unavailable for the input: {e}"
            return
        self.feeds = self.ctx.data.samples(graph, limit=self.samples)
        self.outputs = self.ctx.data.reference_outputs(graph, self.feeds, session)
        self.original = self.outputs


class PassManager:
    """Run ``pipeline`` over a Graph; returns the result and one record per pass."""

    def __init__(self, pipeline: Pipeline, ctx: PassContext | None = None, registry: Registry | None = None):
        """Validate what the run will need before any pass runs.

        Tolerances must be finite and >= 0, and every ``dump_after`` name must
        be a pass of ``pipeline`` (by name or as printed); otherwise
        :class:`~graphopt.errors.OptionError`.
        """
        self.pipeline = pipeline
        self.ctx = ctx or PassContext()
        self.registry = registry or get_registry()
        check_tolerance("atol", self.ctx.atol)
        check_tolerance("rtol", self.ctx.rtol)
        known = {p.name for p in pipeline} | {str(p) for p in pipeline}
        unknown = [d for d in self.ctx.dump_after if d not in known]
        if unknown:
            raise OptionError(
                f"dump after {', '.join(repr(d) for d in unknown)}: not a pass in the pipeline "
                f"'{pipeline}' (choose from: {', '.join(sorted({p.name for p in pipeline})) or 'none'})"
            )
        if self.ctx.budget is not None and (not isinstance(self.ctx.budget, (int, float)) or isinstance(self.ctx.budget, bool)
                                            or not 0 <= self.ctx.budget < float("inf")):
            raise OptionError(f"budget {self.ctx.budget!r}: the accuracy drop allowed must be a number of points >= 0")
        if self.ctx.data.generated and self.ctx.budget is not None and self.ctx.eval is None \
                and any(not p.lossless for p in pipeline):
            raise DataError("--budget needs data to measure accuracy on: give --eval EVAL.npz (inputs and labels) "
                            "or --data FILE.npz (top-1 agreement with the float model); generated inputs have none")
        if self.ctx.data.generated:
            needy = [str(p) for p in pipeline if p.requires_data()]
            if needy:
                raise needs_calibration_data(self.ctx.data, f"pass '{needy[0]}'")
        #: The whole pipeline's accuracy against the float model, filled by :meth:`run` (the report's "accuracy").
        self.accuracy: dict = {}

    def run(self, graph: Graph) -> tuple[Graph, list[PassRecord]]:
        ctx = self.ctx
        if len(self.pipeline):
            # A Graph built in memory was never checked (Graph.load checks files): an invalid input would
            # otherwise be blamed on the first pass.
            graph.check(where=f"{graph.source or 'input model'}")
        lossy = any(not p.lossless for p in self.pipeline)
        # Lossless checks need a couple of samples; what a lossy pipeline costs is measured on more.
        ref = _Reference(ctx, samples=LOSSY_SAMPLES if lossy and not ctx.data.generated else 2)
        if (ctx.verify or lossy) and len(self.pipeline):
            ref.prime(graph)
        if ctx.eval is not None:
            ctx.eval.check(graph)
            float_score = score = ctx.eval.score(graph)
        stats = graph_stats(graph).to_json()
        records: list[PassRecord] = []
        for index, p in enumerate(self.pipeline):
            record = PassRecord(p.name, str(p), p.plugin, p.lossless, before=stats)
            self.registry.call_instrument("graphopt_pass_start", pass_=p, graph=graph, context=ctx)
            p.notes = {}
            label = f"pass {index + 1}/{len(self.pipeline)}: {p}"
            t0 = time.perf_counter()
            with step(ctx.progress, label):
                try:
                    out = p.run(graph.copy(), ctx)
                except (GraphoptError, KeyboardInterrupt):
                    raise
                except BaseException as e:
                    # A plugin's pass may raise anything, SystemExit included: name it, never exit quietly.
                    info = self.registry.plugins.get(p.plugin)
                    if info is not None and info.builtin and isinstance(e, Exception):
                        raise  # a bug in graphopt itself: exit 3 with the traceback under --debug
                    raise PluginError(f"pass '{p.name}' from plugin '{p.plugin}' failed: {describe_exception(e)}") from e
            record.seconds = round(time.perf_counter() - t0, 4)
            if not isinstance(out, Graph):
                raise PluginError(f"pass '{p.name}' from plugin '{p.plugin}' returned {type(out).__name__}, not a Graph")
            out.source = graph.source
            try:
                out.check(where=f"output of pass '{p.name}'")
            except ModelError as e:
                raise PluginError(f"pass '{p.name}' from plugin '{p.plugin}' produced an invalid model: {e}") from e
            record.details = dict(p.notes)
            stats = graph_stats(out).to_json()
            record.after = stats
            if ctx.verify:
                record.verification = self._verify(p, out, ref)
            if not p.lossless:
                record.accuracy = {"vs_float": self._measure_lossy(out, ref)}
                if ctx.eval is not None:
                    after = ctx.eval.score(out)
                    record.accuracy.update(metric=ctx.eval.metric_name, before=score, after=after,
                                           drop=round(score - after, 6))
                    score = after
            if p.name in ctx.dump_after or str(p) in ctx.dump_after:
                dump = Path(ctx.dump_dir) / f"{index + 1:02d}-{p.name}.onnx"
                out.save(dump)
                record.details["dump"] = str(dump)
            self.registry.call_instrument("graphopt_pass_end", pass_=p, graph=out, record=record, context=ctx)
            records.append(record)
            graph = out
        if lossy:
            self.accuracy = {"vs_float": self._measure_lossy(graph, ref)} if ref.original is not None else {}
            if ctx.eval is not None:
                self.accuracy.update(metric=ctx.eval.metric_name, eval_data=ctx.eval.source, float=float_score,
                                     final=score, drop=round(float_score - score, 6))
            self._check_budget()
        return graph, records

    def _measure_lossy(self, out: Graph, ref: _Reference) -> dict:
        """The error of ``out`` against the input (float) model on the verification feeds."""
        from .accuracy import output_error

        if ref.original is None:
            return {"skipped": ref.skipped or "no reference outputs"}
        try:
            got = ref.outputs_of(out)
        except ModelError as e:
            return {"skipped": str(e)}
        return output_error(ref.original, got, [o.name for o in out.outputs]).to_json()

    def _check_budget(self) -> None:
        """With a budget: the pipeline's drop (task metric, else top-1 disagreement) must stay within it."""
        budget = self.ctx.budget
        if budget is None:
            return
        acc = self.accuracy
        if "drop" in acc:
            drop, what = acc["drop"], f"{acc['metric']} dropped {acc['drop']:.2f} points ({acc['float']:.2f} → {acc['final']:.2f})"
        else:
            agree = acc.get("vs_float", {}).get("top1_agreement")
            if agree is None:
                return
            drop, what = 100.0 - agree, f"top-1 agreement with the float model is {agree:.2f}%"
        acc["budget"] = budget
        if drop > budget + 1e-9:
            raise VerificationError(f"accuracy budget exceeded: {what}, over the budget of {budget:g} points; "
                                    "raise --budget or use a milder pipeline")

    def _verify(self, p, out: Graph, ref: _Reference) -> dict:
        if ref.outputs is None:
            return {"skipped": ref.skipped or "no reference outputs"}
        try:
            got = ref.outputs_of(out)
        except ModelError as e:
            # The pass's input ran; its output does not: a bug of the pass, lossy or not (never handed on).
            raise VerificationError(f"pass '{p.name}' produced a model ONNX Runtime cannot run: {e}") from e
        names = [o.name for o in out.outputs]
        cmp = compare_outputs(ref.outputs, got, names, atol=self.ctx.atol, rtol=self.ctx.rtol)
        result = {"reference": "onnxruntime", "samples": len(ref.feeds), **cmp.to_json()}
        if p.lossless and not cmp.ok:
            raise VerificationError(f"lossless pass '{p.name}' changed the model's outputs: {cmp.summary()}")
        ref.outputs = got  # the next pass is compared with this one's output
        return result
