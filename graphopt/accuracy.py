"""Evaluation data with labels, the task metric, and how far a lossy graph's outputs are from the float model's.

Data roles of a pipeline run (see :class:`~graphopt.passbase.PassContext`):

* **calibration** data (``--data``, a :class:`~graphopt.data.DataSource`) feeds passes that learn from
  activations (ranges, Hessians) and the numerical checks;
* **evaluation** data with labels (``--eval eval.npz``: the model's inputs plus a ``labels`` array whose
  first dim is the inputs' first dim; in Python an :class:`EvalSet` from any iterable of
  ``(inputs, labels)`` and a metric callable) measures the task metric before and after lossy passes.

The default metric is top-1 accuracy of the first output (argmax over its last axis), in points (0-100);
a metric callable gets ``(predictions, labels)`` (the first output and the labels, concatenated over all
batches) and returns a number where higher is better, in the unit ``--budget`` is given in.

:func:`output_error` is the report's error of a lossy graph against the float one: cosine, SNR, max error
(via :func:`graphopt.reference.compare_outputs`) and top-1 agreement of the first output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx

from .data import Feed, check_feed
from .errors import DataError
from .graph import Graph

Metric = Callable[[np.ndarray, np.ndarray], float]


def top1_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Percent of rows whose argmax over the last axis equals the label."""
    pred = np.asarray(predictions)
    pred = pred.reshape(-1, pred.shape[-1]) if pred.ndim > 1 else pred.reshape(-1, 1)
    lab = np.asarray(labels).reshape(-1)
    if pred.shape[0] != lab.shape[0]:
        raise DataError(f"top-1 accuracy: {pred.shape[0]} predictions but {lab.shape[0]} labels")
    return float(100.0 * np.mean(np.argmax(pred, axis=-1) == lab)) if lab.size else 0.0


def top1_agreement(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float | None:
    """Percent of rows where both outputs pick the same class (argmax of the last axis); None if no classes."""
    same = total = 0
    for r, g in zip(ref, got):
        r, g = np.asarray(r), np.asarray(g)
        if r.dtype.kind != "f" or r.ndim == 0 or r.shape[-1] < 2 or r.shape != g.shape:
            return None
        a = np.argmax(r.reshape(-1, r.shape[-1]), axis=-1)
        b = np.argmax(g.reshape(-1, g.shape[-1]), axis=-1)
        same += int(np.sum(a == b))
        total += a.size
    return 100.0 * same / total if total else None


@dataclass
class EvalSet:
    """Labelled evaluation data: feeds, their labels (first dims add up to the labels'), and a metric."""

    feeds: list[Feed]
    labels: np.ndarray
    metric: Metric = top1_accuracy
    metric_name: str = "top-1 accuracy"
    source: str = "in-memory"

    @classmethod
    def from_batches(cls, batches: Iterable[tuple[Feed, np.ndarray]], metric: Metric | None = None,
                     metric_name: str | None = None) -> "EvalSet":
        """From any iterable of ``(inputs, labels)`` pairs (Python API)."""
        feeds, labels = [], []
        for i, item in enumerate(batches):
            if not (isinstance(item, tuple) and len(item) == 2):
                raise DataError(f"evaluation data: item {i} must be an (inputs, labels) pair")
            feeds.append(dict(item[0]))
            labels.append(np.asarray(item[1]).reshape(-1))
        if not feeds:
            raise DataError("evaluation data: empty (no (inputs, labels) pairs)")
        name = metric_name or (getattr(metric, "__name__", "metric") if metric else "top-1 accuracy")
        return cls(feeds, np.concatenate(labels), metric or top1_accuracy, name)

    def check(self, graph: Graph) -> "EvalSet":
        """Check the feeds against ``graph``'s inputs and the labels' length against the samples; returns self."""
        where = f"evaluation data ({self.source})"
        self.feeds = [check_feed(f, graph.inputs, where) for f in self.feeds]
        samples = 0
        for f in self.feeds:
            firsts = {v.shape[0] for v in f.values() if v.ndim}
            if len(firsts) != 1:
                raise DataError(f"{where}: the inputs do not share a first (sample) dim: {sorted(firsts)}")
            samples += firsts.pop()
        if self.labels.ndim == 0 or self.labels.shape[0] != samples:
            n = 0 if self.labels.ndim == 0 else self.labels.shape[0]
            raise DataError(f"{where}: 'labels' has {n} entries but the inputs hold {samples} samples; "
                            "give one label per sample")
        return self

    def predictions(self, graph: Graph, session=None) -> np.ndarray:
        """The first output of ``graph`` on every feed (ONNX Runtime), concatenated along axis 0."""
        from .reference import reference_session, run_reference

        outs = run_reference(graph, self.feeds, session or reference_session(graph))
        return np.concatenate([np.atleast_1d(np.asarray(o[0])) for o in outs], axis=0)

    def score(self, graph: Graph) -> float:
        value = self.metric(self.predictions(graph), self.labels)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(f"evaluation metric {self.metric_name}: returned {value!r}, not a number") from None


def read_eval(path: str | os.PathLike, graph: Graph) -> EvalSet:
    """An :class:`EvalSet` from an .npz holding the model's inputs and a ``labels`` array."""
    from .graph import TensorSpec

    specs = list(graph.inputs) + [TensorSpec("labels", "int64", ["n"])]
    from .data import _read_one

    path = Path(path)
    raw = _read_one(path, specs)  # names and dtypes are checked below, once 'labels' is taken out
    if "labels" not in raw:
        raise DataError(f"{path}: holds no 'labels' array; --eval needs the model's inputs plus 'labels' "
                        "(one label per sample)")
    labels = np.asarray(raw.pop("labels"))
    if labels.dtype.kind not in "iub":
        raise DataError(f"{path}: 'labels' has dtype {labels.dtype}; class indices (integers) expected")
    return EvalSet([raw], labels.reshape(-1) if labels.ndim > 1 and labels.size == labels.shape[0] else labels,
                   source=str(path)).check(graph)


@dataclass
class ErrorVsFloat:
    """How far a graph's outputs are from the float model's on the same inputs."""

    cosine: float
    snr_db: float
    max_abs: float
    top1_agreement: float | None
    samples: int

    def to_json(self) -> dict:
        def clean(v):
            if v is None:
                return None
            return v if np.isfinite(v) else ("inf" if v > 0 else "-inf")
        return {"cosine": clean(self.cosine), "snr_db": clean(self.snr_db), "max_abs": clean(self.max_abs),
                "top1_agreement": self.top1_agreement, "samples": self.samples}

    def summary(self) -> str:
        top = f", top-1 agreement {self.top1_agreement:.2f}%" if self.top1_agreement is not None else ""
        return f"cosine {self.cosine:.5f}, SNR {self.snr_db:.1f} dB, max|Δ| {self.max_abs:.3g}{top}"


def output_error(ref: Sequence[Sequence[np.ndarray]], got: Sequence[Sequence[np.ndarray]],
                 names: Sequence[str]) -> ErrorVsFloat:
    """Error of ``got`` against ``ref`` (lists per feed of outputs): the report's figures for a lossy pass."""
    from .reference import compare_outputs

    cmp = compare_outputs(ref, got, names)
    first_ref = [r[0] for r in ref]
    first_got = [g[0] for g in got]
    return ErrorVsFloat(cmp.cosine, cmp.snr_db, cmp.max_abs, top1_agreement(first_ref, first_got), len(ref))


#: A layer whose output's SNR against the float model falls below this diverges (``--verify-layers``).
DIVERGENCE_SNR_DB = 20.0


def compare_layers(reference: Graph, graph: Graph, feeds, *, threshold_db: float = DIVERGENCE_SNR_DB) -> dict:
    """Intermediate values of ``graph`` against ``reference`` (the float model), layer by layer.

    Every float value that a node of ``reference``'s main graph computes and
    that ``graph`` still has under the same name (passes keep the names of the
    values they do not remove) is compared on ``feeds`` (both run by ONNX
    Runtime, streamed feed by feed): cosine and SNR per value, in the
    reference's node order. ``first_divergent`` is the first whose SNR is
    below ``threshold_db`` (None when none is): where the error starts, not
    where it is largest.
    """
    from .activations import Activations

    ref_values = [(o, n.op_type, n.name or o) for n in reference.graph.node for o in n.output if o]
    have = {o for n in graph.graph.node for o in n.output if o}
    specs = reference.infer_shapes().value_specs()
    names = [(o, op, node) for o, op, node in ref_values if o in have and specs.get(o) is not None
             and specs[o].dtype.startswith("float")]
    if not names:
        return {"layers": [], "first_divergent": None, "threshold_db": threshold_db}
    wanted = [o for o, _, _ in names]
    acc = {o: [0.0, 0.0, 0.0, 0.0] for o in wanted}  # sum r*r, sum g*g, sum r*g, sum (r-g)^2
    for rv, gv in zip(Activations(reference, feeds).stream(wanted), Activations(graph, feeds).stream(wanted)):
        for o in wanted:
            r = rv[o].astype(np.float64).ravel()
            g = gv[o].astype(np.float64).ravel()
            if r.shape != g.shape:
                acc[o] = None
                continue
            if acc[o] is None:
                continue
            fin = np.isfinite(r) & np.isfinite(g)
            _accumulate(acc[o], r[fin], g[fin])
    layers, first = [], None
    for o, op, node in names:
        a = acc[o]
        if a is None:
            continue
        cos, snr = _cosine_snr(a)
        layers.append({"value": o, "op": op, "node": node, "cosine": cos,
                       "snr_db": snr if np.isfinite(snr) else "inf"})
        if first is None and snr < threshold_db:
            first = layers[-1]
    return {"layers": layers, "first_divergent": first, "threshold_db": threshold_db}


def _accumulate(a: list, r: np.ndarray, g: np.ndarray) -> float:
    """Add to ``a`` the sums [r·r, g·g, r·g, (r-g)·(r-g)] of float64 vectors ``r`` (reference) and ``g``;
    returns max|r-g| (0 when empty)."""
    d = r - g
    a[0] += float(r @ r)
    a[1] += float(g @ g)
    a[2] += float(r @ g)
    a[3] += float(d @ d)
    return float(np.abs(d).max()) if d.size else 0.0


def _cosine_snr(a) -> tuple[float, float]:
    """Cosine and SNR (dB) from the sums [r·r, g·g, r·g, (r-g)·(r-g)] of a reference r and a value g."""
    cos = a[2] / np.sqrt(a[0] * a[1]) if a[0] > 0 and a[1] > 0 else (1.0 if a[3] == 0 else 0.0)
    snr = float("inf") if a[3] == 0 else 10 * np.log10(max(a[0], 1e-300) / a[3])
    return float(cos), float(snr)


#: ``--verify-layers`` on ``lower``: an intermediate value of the compiled artifact whose SNR against ONNX
#: Runtime's value of the same name, on the graph the artifact compiled, falls below this diverges. Both
#: compute the same graph, so only float rounding separates them (float artifacts: SNR above 100 dB; the
#: reordered sums of fast_math or Winograd convs lose a few bits, still far above 40 dB). Measured, worst value
#: per model: 130-146 dB on small MLPs, CNNs and a transformer encoder, 103 dB ppocr-cls, 114 dB orientation;
#: 64 dB on ppocrv4-det's final sigmoid (values near zero; its next worst 111 dB), 75 dB on ppocrv6-rec's final
#: softmax (next worst 101 dB).
ARTIFACT_DIVERGENCE_SNR_DB = 40.0
#: The same for an artifact with integer kernels or compiled quantize nodes (see
#: :func:`graphopt.reference.artifact_tolerance`): exact int32 sums against ONNX Runtime's float QDQ arithmetic
#: flip a QuantizeLinear's rounding now and then (one step, about 1/255 of that tensor's range) and the flips
#: propagate, more with every layer. Measured with ``quantize(mode=static)`` on 4 feeds, worst value per model:
#: 132-137 dB on MLPs and a small CNN (no flip), 73 dB the digits CNN, 70 dB a 2-layer transformer encoder; deep
#: networks drift down layer by layer, no layer dropping at once: ppocr-cls (MobileNetV3) 28.6 dB, ppocrv4-det
#: 24.0 dB (its final sigmoid 8.6 dB on values near zero, max|Δ| 9e-5: under ``atol``), orientation (PP-LCNet)
#: 22.7 dB, ppocrv6-rec (SVTR: convs, then attention) 17.4 dB. Bugs simulated in one layer of the compiled probe
#: (digits CNN / orientation, SNR at that layer): kernel taps flipped -1.1 / -2.7 dB, per-channel scales of the
#: wrong channels 6.5 / 1.2 dB, bias dropped 38.8 / 1.4 dB, an activation zero point off by one 37.2 / 23.1 dB,
#: a weight scale 5 % off 26.0 / 25.2 dB. So 12 dB, halfway (in dB) between the deepest drift and the gross
#: bugs; a bug of a step or a few percent is within a deep network's drift: no SNR threshold catches it.
ARTIFACT_INT8_DIVERGENCE_SNR_DB = 12.0
#: Most intermediate values the probe artifact of ``--verify-layers`` exposes (beyond: evenly spaced in node order).
MAX_PROBE_VALUES = 256


def probe_graph(graph: Graph, cap: int = MAX_PROBE_VALUES) -> tuple[Graph, list[tuple[str, str, str]], int]:
    """A copy of ``graph`` whose outputs also hold its intermediate values, for ``--verify-layers`` to read
    from the compiled copy; returns (copy, the values as (value, op, node), how many qualified).

    The values: float outputs of the main graph's nodes whose rank shape inference knows and that depend on
    a graph input (a value computed from weights alone is the same on every input: not a layer), in node
    order; at most ``cap`` of them, evenly spaced in node order when more qualify.
    """
    probe = graph.infer_shapes()
    known = {vi.name: vi for vi in (*probe.graph.value_info, *probe.graph.output)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    specs = probe.value_specs()
    live = {i.name for i in graph.inputs}
    found = []
    for n in probe.graph.node:
        subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
        if not (subgraph or any(i in live for i in n.input if i)):
            continue
        for o in n.output:
            if not o:
                continue
            live.add(o)
            if o in known and specs[o].dtype.startswith("float"):
                found.append((o, n.op_type, n.name or o))
    chosen = found
    if len(found) > cap:
        chosen = [found[i] for i in sorted({int(round(i)) for i in np.linspace(0, len(found) - 1, cap)})]
    declared = {o.name for o in probe.graph.output}
    probe.graph.output.extend(known[v] for v, _, _ in chosen if v not in declared)
    return probe, chosen, len(found)


def compare_artifact_layers(graph: Graph, values: Sequence[tuple[str, str, str]], feeds,
                            run: Callable[[Feed], dict], *, threshold_db: float = ARTIFACT_DIVERGENCE_SNR_DB,
                            atol: float = 0.0) -> dict:
    """``values`` (from :func:`probe_graph`) as ``run`` (a compiled artifact exposing them) computes them,
    against ONNX Runtime's values of the same names on ``graph``, feed by feed.

    Per value: cosine, SNR (dB) and max|Δ|. A value whose shape differs, or that is NaN/inf where the other is
    not, has SNR -inf. ``first_divergent`` is the first in node order whose SNR is below ``threshold_db`` and
    whose max|Δ| exceeds ``atol``: a value near zero everywhere (a sigmoid's background) can have a low SNR
    from differences that ``--verify``'s absolute tolerance accepts.
    """
    from .activations import Activations

    names = [v for v, _, _ in values]
    acc: dict[str, list | str] = {v: [0.0, 0.0, 0.0, 0.0, 0.0] for v in names}  # the sums of _cosine_snr, max|Δ|
    feeds = list(feeds)
    for feed, ref in zip(feeds, Activations(graph, feeds).stream(names)):
        got = run(feed)
        for v in names:
            a = acc[v]
            if isinstance(a, str):
                continue
            r = np.asarray(ref[v]).astype(np.float64).ravel()
            g = np.asarray(got[v])
            if np.asarray(ref[v]).shape != g.shape:
                acc[v] = f"shape {list(g.shape)}, ONNX Runtime's {list(np.shape(ref[v]))}"
                continue
            g = g.astype(np.float64).ravel()
            fr, fg = np.isfinite(r), np.isfinite(g)
            if not (np.array_equal(fr, fg) and np.array_equal(r[~fr], g[~fg], equal_nan=True)):
                acc[v] = f"{int(np.sum(fr != fg))} values NaN or infinite on one side only"
                continue
            a[4] = max(a[4], _accumulate(a, r[fr], g[fg]))
    layers, first = [], None
    for v, op, node in values:
        a = acc[v]
        if isinstance(a, str):
            row = {"value": v, "op": op, "node": node, "cosine": 0.0, "snr_db": "-inf", "max_abs": None,
                   "mismatch": a}
            snr = float("-inf")
        else:
            cos, snr = _cosine_snr(a)
            row = {"value": v, "op": op, "node": node, "cosine": cos, "snr_db": snr if np.isfinite(snr) else "inf",
                   "max_abs": a[4]}
        layers.append(row)
        if first is None and snr < threshold_db and not (row["max_abs"] is not None and row["max_abs"] <= atol):
            first = row
    return {"layers": layers, "first_divergent": first, "threshold_db": threshold_db, "atol": atol,
            "samples": len(feeds)}
