"""prune: zero the least important weights of Conv/Gemm/MatMul, unstructured or N:M, optionally compensated.

Layers are found as :mod:`passes.quantize` finds them: the Conv, Gemm and
MatMul nodes of the main graph whose weight (input 1) is a float32 constant
read by that node alone. Each weight is seen as a matrix ``[out, in]`` whose
columns follow the layer's input columns (``C * kernel`` for a conv, channel
outermost).

* ``sparsity=S``: unstructured; ``scope=layer`` removes ``round(S * size)``
  weights of every layer; ``scope=global`` removes ``S`` of all weights together,
  no layer losing more than 98 %. With calibration data the budget goes where it
  costs least: each layer's relative output error on the data
  (``tr(D H D^T) / tr(W H W^T)``, uncompensated, cheap) is measured at the
  sparsities of ``_prune_math.ERROR_GRID`` and counts are handed out greedily
  on those curves' convex hulls (:func:`_prune_math.error_counts`). Without
  data, one threshold over the scores divided by each layer's mean.
  ``scope=auto`` (default): global with data, layer without.
* ``pattern=N:M``: in each row, every ``M`` consecutive columns keep their
  ``N`` most important weights; a last group of ``t < M`` columns (when ``M``
  does not divide the row) keeps ``ceil(N * t / M)``.
* ``importance``: ``magnitude`` (``|W|``) or ``activation`` (``|W| * ||X_j||``
  over the calibration inputs of the layer, Wanda); ``auto`` (default):
  activation with data, magnitude without.
* ``compensate`` (default: when calibration data are given): the weights kept
  are updated to cancel the pruned ones' effect on the layer's output over the
  calibration inputs, at the same mask: the exact least-squares solution per
  row for layers small enough (``_prune_math.EXACT_FLOPS``), else SparseGPT /
  Optimal Brain Surgeon's column-by-column update with the inverse of
  ``X^T X`` + damping.

Pruned weights are exactly +0.0. ``storage`` says how each pruned weight is
written (:mod:`passes._sparse`): ``dense`` float32 as before; ``sparse``: the
kept values (float32) and a 1-bit-per-weight mask packed 8 per byte, decoded in
the graph by standard ops (Cast/Mul/Floor/Sub/CumSum/Gather/Reshape, opset 11+)
to the dense weight bit for bit; ``auto`` (default): sparse where that is
smaller (from about 1/3 of the weights zero). Lossless passes keep the decode
(fold-constants never inflates a constant). The record's ``weight_bytes`` gives
the layers' weight bytes before and after, and each layer its ``storage``.
The result is a function of the model, options, data and seed only (stable
tie-breaking).
"""

from __future__ import annotations

import re

import numpy as np

from graphopt.errors import ModelError, OptionError
from graphopt.graph import Graph
from graphopt.ir import IR, toposort
from graphopt.options import Option
from graphopt.passbase import Pass, PassContext, first_reasons

from . import _prune_math as pm
from . import _sparse as sp
from ._emit import Builder, Namer, all_names
from .quantize import Layer, Quantize, _constant

IMPORTANCES = ("auto", "magnitude", "activation")
STORAGES = ("auto", "dense", "sparse")
SCOPES = ("auto", "layer", "global")
STRUCTURES = ("weight", "channel")
#: scope=global never removes more than this fraction of one layer (a layer at 100 % cuts the network).
GLOBAL_CAP = 0.98


class Prune(Pass):
    """Prune weights of Conv/Gemm/MatMul to a sparsity or an N:M pattern (zeros; stored dense or sparse)."""

    name = "prune"
    lossless = False
    options = (
        Option("sparsity", float, None, "fraction of the weights removed, in [0, 1) (unstructured; give it or "
               "'pattern')"),
        Option("pattern", str, "", "N:M: keep N of every M consecutive input weights of each output row "
               "(e.g. 2:4); instead of 'sparsity'"),
        Option("importance", str, "auto", "magnitude: |W|; activation: |W| * ||X_j|| over the "
               "calibration inputs (Wanda; needs --data); auto: activation when --data is given",
               choices=IMPORTANCES),
        Option("scope", str, "auto", "sparsity: layer: every layer pruned to it; global: one budget over all "
               "layers, spent where the layers' output error on --data grows least (without data: one threshold "
               "on normalized scores), no layer above 98 %; auto: global when --data is given",
               choices=SCOPES),
        Option("compensate", bool, None, "update the kept weights to cancel the output error on the "
               "calibration data (SparseGPT/OBS); default: true when --data is given"),
        Option("structure", str, "weight", "weight: single weights (sparsity or pattern); channel: whole output "
               "channels (conv filters, hidden units) with everything tied to them, by 'ratio'",
               choices=STRUCTURES),
        Option("ratio", float, None, "structure=channel: fraction of the channels of every prunable group "
               "removed, in (0, 1)"),
        Option("multiple", int, 8, "structure=channel: channels kept per group rounded to a multiple of this "
               "(the nearest one, at least one; vector-friendly counts run faster), unless the group is "
               "smaller; 1: exactly round((1 - ratio) * C)", min=1),
        Option("storage", str, "auto", "how pruned weights are stored: sparse (kept values + 1-bit mask, "
               "decoded in the graph), dense (float32 with zeros), auto (sparse where smaller)",
               choices=STORAGES),
    )

    def __init__(self, **options):
        super().__init__(**options)
        o = self.opts
        where = f"pass '{self.name}'"
        self.nm: tuple[int, int] | None = None
        if o.structure == "channel":
            for other in ("sparsity", "pattern", "scope", "storage"):
                if other in self.given:
                    raise OptionError(f"{where}: option '{other}' applies to single weights; structure=channel "
                                      "takes option 'ratio'")
            if o.ratio is None:
                raise OptionError(f"{where}: structure=channel needs option 'ratio' (the fraction of channels "
                                  "removed, in (0, 1))")
            if not 0.0 < o.ratio < 1.0:
                raise OptionError(f"{where}: option 'ratio' must be in (0, 1), got {o.ratio!r}")
            return
        for other in ("ratio", "multiple"):
            if other in self.given:
                raise OptionError(f"{where}: option '{other}' applies to structure=channel; single weights take "
                                  "option 'sparsity' or 'pattern'")
        if o.pattern:
            if o.sparsity is not None:
                raise OptionError(f"{where}: give option 'sparsity' or option 'pattern', not both")
            m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", o.pattern)
            if not m:
                raise OptionError(f"{where}: option 'pattern' must be N:M (two integers, e.g. 2:4), "
                                  f"got {o.pattern!r}")
            n, mm = int(m.group(1)), int(m.group(2))
            if n < 1 or n >= mm:
                raise OptionError(f"{where}: option 'pattern' = {o.pattern!r}: needs 0 < N < M (N kept of "
                                  "every M)")
            if "scope" in self.given and o.scope not in ("layer", "auto"):
                raise OptionError(f"{where}: option 'scope' applies to 'sparsity'; an N:M pattern is the "
                                  "same in every layer")
            self.nm = (n, mm)
        elif o.sparsity is None:
            raise OptionError(f"{where}: option 'sparsity' (a fraction in [0, 1)) or option 'pattern' (N:M) "
                              "is required")
        elif not 0.0 <= o.sparsity < 1.0:
            raise OptionError(f"{where}: option 'sparsity' must be in [0, 1), got {o.sparsity!r}")

    def requires_data(self) -> bool:
        return self.opts.importance == "activation" or self.opts.compensate is True

    # --------------------------------------------------------------------------------------- run
    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        o = self.opts
        data = not ctx.data.generated
        importance = o.importance if o.importance != "auto" else ("activation" if data else "magnitude")
        scope = o.scope if o.scope != "auto" else ("global" if data else "layer")
        if o.structure == "channel":
            from ._structured import prune_channels

            return prune_channels(self, graph, ctx)
        layers, skipped = Quantize(mode="dynamic")._layers(graph)  # the same layers quantize finds
        skipped = {k: why.replace("quantized", "pruned") for k, why in skipped.items()}
        if skipped:
            self.note("not_pruned", skipped)
        if not layers:
            self.note("pruned_layers", 0)
            self.note("summary", _summary(0, 0, 0, skipped))
            return graph
        compensate = o.compensate if o.compensate is not None else not ctx.data.generated
        stats = self._hessians(graph, layers, ctx) if (compensate or importance == "activation") else {}

        scores = []
        for la in layers:
            w2 = la.w2.astype(np.float64)
            score = np.zeros(w2.shape)
            for gi, (rows, _) in enumerate(Quantize._groups(la)):
                col_sq = np.diag(stats[la.key][gi]) if importance == "activation" else None
                score[rows] = pm.importance(w2[rows], col_sq)
            scores.append(score)

        if self.nm is not None:
            masks = [pm.nm_mask(s, *self.nm) for s in scores]
        elif scope == "layer":
            masks = [pm.unstructured_mask(s, int(o.sparsity * s.size + 0.5)) for s in scores]
        else:
            total = int(o.sparsity * sum(s.size for s in scores) + 0.5)
            if stats:  # with data: the budget goes where the layers' output error grows least
                curves = [self._error_curve(la, sc, stats[la.key], False) for la, sc in zip(layers, scores)]
                counts = pm.error_counts(curves, total)
                masks = [pm.unstructured_mask(s, k) for s, k in zip(scores, counts)]
            else:
                normed = [pm.normalized(s) for s in scores]
                counts = pm.global_counts(normed, total, GLOBAL_CAP)
                masks = [pm.unstructured_mask(s, k) for s, k in zip(normed, counts)]
            capped = [la.key for la, s, k in zip(layers, scores, counts) if k == int(np.floor(GLOBAL_CAP * s.size))
                      and k > 0]
            if capped:
                self.note("capped", {k: f"held at {GLOBAL_CAP:.0%} (scope=global never empties a layer)"
                                     for k in capped})

        new, per_layer, failed = {}, {}, []
        for la, mask in zip(layers, masks):
            out, ok = self._pruned(la, mask, stats.get(la.key), compensate)
            if not ok:
                failed.append(la.key)
            w32 = out.astype(np.float32)
            w32[mask] = 0.0  # exactly +0.0
            new[la.key] = w32
            per_layer[la.key] = {"op": la.op, "weights": int(w32.size), "pruned": int(mask.sum()),
                                 "sparsity": round(float(np.count_nonzero(w32 == 0) / max(w32.size, 1)), 6)}
        sparse = self._storage(graph, layers, new)
        for la in layers:
            per_layer[la.key]["storage"] = "sparse" if la.key in sparse else "dense"
        result = self._apply(graph, layers, new, sparse)

        pruned = sum(v["pruned"] for v in per_layer.values())
        total_w = sum(v["weights"] for v in per_layer.values())
        self.note("pruned_layers", len(layers))
        if self.nm is not None:
            self.note("pattern", f"{self.nm[0]}:{self.nm[1]}")
        else:
            self.note("scope", scope)
        self.note("importance", importance)
        self.note("compensate", bool(compensate))
        if failed:
            self.note("not_compensated", {k: "the damped calibration Hessian is not positive definite: pruned "
                                             "without compensation" for k in dict.fromkeys(failed)})
        self.note("layers", per_layer)
        self.note("weights_pruned", pruned)
        self.note("weights_total", total_w)
        self.note("sparsity", round(pruned / total_w, 6) if total_w else 0.0)
        before = sum(4 * new[la.key].size for la in layers)
        after = sum(sparse[la.key][1] if la.key in sparse else 4 * new[la.key].size for la in layers)
        self.note("storage", o.storage)
        self.note("weight_bytes", {"before": int(before), "after": int(after),
                                   "ratio": round(before / after, 3) if after else None})
        self.note("sparse_layers", len(sparse))
        self.note("summary", _summary(len(layers), pruned, total_w, skipped)
                  + (f"; {len(sparse)} stored sparse, weights {before / after:.2f}x smaller" if sparse else ""))
        return result

    @staticmethod
    def _pruned(la: Layer, mask: np.ndarray, hessians: list | None, compensate: bool) -> tuple[np.ndarray, bool]:
        """``la``'s [out, in] weight (float64) with ``mask`` removed and, with ``compensate``, the rest updated
        per conv group; False when a group's Hessian could not be used (pruned without compensation)."""
        w2 = la.w2.astype(np.float64)
        out = w2.copy()
        out[mask] = 0.0
        ok = True
        if compensate:
            for gi, (rows, _) in enumerate(Quantize._groups(la)):
                c = pm.obs_compensate(w2[rows], hessians[gi], mask[rows])
                if c is None:
                    ok = False
                else:
                    out[rows] = c
        return out, ok

    def _error_curve(self, la: Layer, score: np.ndarray, hessians: list, compensate: bool) -> list:
        """(weights removed, relative output error on the calibration data) at each sparsity of
        :data:`_prune_math.ERROR_GRID` up to the cap (scope=global's allocation)."""
        w2 = la.w2.astype(np.float64)
        curve = [(0, 0.0)]
        cap = int(np.floor(GLOBAL_CAP * score.size))
        for s in pm.ERROR_GRID[1:]:
            k = min(int(s * score.size + 0.5), cap)
            if k <= curve[-1][0]:
                continue
            mask = pm.unstructured_mask(score, k)
            out, _ = self._pruned(la, mask, hessians, compensate)
            err = ref = 0.0
            for gi, (rows, _) in enumerate(Quantize._groups(la)):
                e, r = pm.output_error(w2[rows], out[rows], hessians[gi])
                err, ref = err + e, ref + r
            curve.append((k, err / ref if ref > 0 else 0.0))
        return curve

    def _storage(self, graph: Graph, layers: list[Layer], new: dict) -> dict:
        """key -> (stored weight, sparse bytes) of the layers written sparse."""
        o = self.opts
        if o.storage == "dense":
            return {}
        if graph.opset < sp.MIN_OPSET:
            if o.storage == "sparse":
                raise ModelError(f"{graph.source or 'model'}: prune(storage=sparse) needs opset {sp.MIN_OPSET} "
                                 f"or newer (CumSum); the model is opset {graph.opset}: re-export it at a newer "
                                 "opset or use storage=dense")
            self.note("storage_dense_why", f"opset {graph.opset} < {sp.MIN_OPSET}: the sparse decode needs CumSum")
            return {}
        out = {}
        for la in layers:
            stored = _stored(la, new[la.key])
            nbytes = sp.sparse_bytes(stored)
            if o.storage == "sparse" or nbytes + sp.decode_bytes(la.key) < stored.nbytes:
                out[la.key] = (stored, nbytes)
        return out

    # -------------------------------------------------------------------------------- hessians
    def _hessians(self, graph: Graph, layers: list[Layer], ctx: PassContext) -> dict:
        """Per layer (per conv group): X^T X of its calibration inputs (im2col rows for a conv), as quantize
        gathers them (:meth:`Quantize._layer_stats`)."""
        stats = Quantize(mode="dynamic")._layer_stats(graph, layers, ctx)
        cols = {la.key: la.w2.shape[1] for la in layers}
        return {k: [st["h"] if isinstance(st["h"], np.ndarray) else np.zeros((cols[k], cols[k])) for st in groups]
                for k, groups in stats.items()}

    # ---------------------------------------------------------------------------------- apply
    @staticmethod
    def _apply(graph: Graph, layers: list[Layer], new: dict, sparse: dict) -> Graph:
        ir = IR(graph)
        nodes = {(n.name or n.outputs[0].name): n for n in ir.g.nodes}
        namer = Namer(all_names(ir.like.graph), graph.opset) if sparse else None
        for la in layers:
            node = nodes[la.key]
            if la.key in sparse:
                stored = sparse[la.key][0]
                values, packed = sp.encode(stored)
                node.inputs[1] = sp.emit_decode(Builder(ir.g, namer, la.key, np.float32), values, packed,
                                                stored.shape)
            else:
                _constant(node.inputs[1]).values = _stored(la, new[la.key])
        if sparse:
            toposort(ir.g)
        return ir.to_graph()


def _stored(la: Layer, w2: np.ndarray) -> np.ndarray:
    """The pruned ``[out, in]`` matrix in the layer's stored layout, float32 C-contiguous."""
    stored = w2.reshape(la.w.shape) if la.layout == "rows" else w2.T
    return np.ascontiguousarray(stored, dtype=np.float32)


def _summary(layers: int, pruned: int, total: int, left: dict) -> str:
    """One line for the CLI: layers pruned, overall sparsity, which layers were left dense and why."""
    text = f"{layers} layer(s) pruned"
    if total:
        text += f", {pruned} of {total} weights zeroed ({pruned / total:.1%})"
    if left:
        text += f", {len(left)} left dense ({first_reasons(left)})"
    return text
