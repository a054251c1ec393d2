"""distill: replace the weight of Gemm/MatMul/Conv layers by a low-rank product fitted to the teacher's activations.

Layers are found as :mod:`passes.quantize` finds them (float32 constant weight
read by that node alone), seen as a matrix ``W`` ``[out, in]`` (a conv's
``in`` is ``C * kernel``); of those, Gemm, MatMul with a 2-D weight and Conv
with ``group=1`` are factorized, the others (grouped convs, MatMuls of two
activations) are listed in the record with the reason. A conv ``C -> N`` with
a ``k x k`` kernel becomes a ``k x k`` conv ``C -> r`` with the node's strides,
pads and dilations, then a 1x1 conv ``r -> N`` with its bias.

``method=low-rank`` (the only one for now): ``W ~= A B`` with ``A`` ``[out, r]``
and ``B`` ``[r, in]``, fitted in closed form to the layer's calibration inputs
``X`` (rows; ``--data`` is required): with ``C = X^T X / n`` + damping and
``C = L L^T`` (Cholesky), ``||X W^T - X B^T A^T||_F`` is ``||(W - A B) L||_F``,
minimised by the truncated SVD ``U_r S_r V_r^T`` of ``W L``: ``A = U_r S_r^1/2``,
``B = S_r^1/2 V_r^T L^-1``. The rank:

* ``ratio=R`` in (0, 1): the layers' weight parameters fall by at least ``R``
  overall, ranks allocated across layers where the data-weighted spectrum loses
  least (:func:`_allocate`: a small layer whose every direction matters, such as
  a classifier, stays whole while wide ones give up their weak directions);
* ``energy=E`` in (0, 1]: the smallest ``r`` whose singular values of ``W L``
  hold a fraction ``E`` of the sum of their squares (the data-weighted energy).

A layer where ``r < 1`` or ``r * (out + in) >= out * in`` (no saving) is left as
is and listed with the reason. Each factorized layer becomes two nodes of its
kind: MatMul ``x @ B^T @ A^T``; Gemm ``B`` (with the original transA) then ``A``
(with the bias, beta); Conv ``[r, in, 1, 1]`` then ``[out, r, 1, 1]`` (with the
bias). The second node keeps the original node's name and output. The record
gives each layer's rank, weight parameters before/after and output error on the
calibration data relative to ``||X W^T||``, and the totals. The result is a
function of the model, options, data and seed only.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from scipy.linalg import solve_triangular

from graphopt.errors import OptionError
from graphopt.graph import Graph
from graphopt.ir import IR, toposort
from graphopt.options import Option
from graphopt.passbase import Pass, PassContext, first_reasons

from ._emit import Builder, Namer, all_names
from .quantize import Layer, Quantize

METHODS = ("low-rank", "drop-layers")
#: Damping added to the diagonal of C = X^T X / n, relative to its mean diagonal (as GPTQ does).
DAMPING = 0.01


class Distill(Pass):
    """Factorize Gemm/MatMul/Conv weights into two low-rank layers fitted to the calibration activations."""

    name = "distill"
    lossless = False
    needs_data = True
    options = (
        Option("method", str, "low-rank", "low-rank: W ~= A B fitted in closed form to the layer's calibration "
               "inputs; drop-layers: remove the 'count' residual blocks that matter least and refit the layers "
               "after them"),
        Option("count", int, None, "drop-layers: how many residual blocks to remove (at least 1)"),
        Option("ratio", float, None, "cut the factorizable layers' weight parameters by at least this fraction "
               "overall, in (0, 1), ranks allocated where the data-weighted spectrum loses least (give it or "
               "'energy')"),
        Option("energy", float, None, "the smallest rank keeping this fraction of the data-weighted spectrum "
               "energy, in (0, 1] (instead of 'ratio')"),
    )

    def __init__(self, **options):
        super().__init__(**options)
        o = self.opts
        where = f"pass '{self.name}'"
        if o.method not in METHODS:
            raise OptionError(f"{where}: method {o.method!r} is not available; choose one of {', '.join(METHODS)}")
        if o.method == "drop-layers":
            for other in ("ratio", "energy"):
                if other in self.given:
                    raise OptionError(f"{where}: option '{other}' applies to method=low-rank; drop-layers takes "
                                      "option 'count'")
            if o.count is None or o.count < 1:
                raise OptionError(f"{where}: method=drop-layers needs option 'count' (how many residual blocks to "
                                  f"remove, at least 1), got {o.count!r}")
            return
        if o.count is not None:
            raise OptionError(f"{where}: option 'count' applies to method=drop-layers")
        if o.ratio is not None and o.energy is not None:
            raise OptionError(f"{where}: give option 'ratio' or option 'energy', not both")
        if o.ratio is None and o.energy is None:
            raise OptionError(f"{where}: option 'ratio' (a fraction in (0, 1)) or option 'energy' (in (0, 1]) "
                              "is required")
        if o.ratio is not None and not 0.0 < o.ratio < 1.0:
            raise OptionError(f"{where}: option 'ratio' must be in (0, 1), got {o.ratio!r}")
        if o.energy is not None and not 0.0 < o.energy <= 1.0:
            raise OptionError(f"{where}: option 'energy' must be in (0, 1], got {o.energy!r}")

    # --------------------------------------------------------------------------------------- run
    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        o = self.opts
        if o.method == "drop-layers":
            from ._drop_layers import drop_layers

            return drop_layers(self, graph, ctx)
        found, skipped = Quantize(mode="dynamic")._layers(graph)  # the same layers quantize finds
        skipped = {k: why.replace("quantized", "factorized") for k, why in skipped.items()}
        layers = []
        for la in found:
            why = _unsupported(la)
            if why:
                skipped[la.key] = why
            else:
                layers.append(la)
        if o.ratio is not None and layers:
            before = sum(_out_in(la)[0] * _out_in(la)[1] for la in layers)
            most = sum(_out_in(la)[0] * _out_in(la)[1] - sum(_out_in(la)) for la in layers if _saves(la, 1))
            if most < o.ratio * before:  # known from the shapes alone: before any data is read
                raise OptionError(f"pass '{self.name}': ratio={o.ratio:g} would leave no rank that saves enough: at "
                                  f"rank 1 everywhere the {len(layers)} layer(s) lose {100 * most / before:.1f} % of "
                                  "their weight parameters; use a smaller ratio")
        if not layers:
            self._finish(skipped, {})
            return graph

        stats = self._stats(graph, layers, ctx)
        fits = {}  # key: (w, h, L, U, S, Vt)
        for la in layers:
            h, n = stats[la.key]
            w = la.w2.astype(np.float64)
            c = h / max(n, 1)
            damp = DAMPING * float(np.mean(np.diag(c)))
            c[np.diag_indices_from(c)] += damp if damp > 0 else 1e-6
            low = np.linalg.cholesky(c)
            u, sv, vt = np.linalg.svd(w @ low, full_matrices=False)
            fits[la.key] = (w, h, low, u, sv, vt)
        if o.ratio is not None:
            ranks = _allocate(layers, {k: f[4] for k, f in fits.items()}, o.ratio)
        factors, per_layer = {}, {}
        for la in layers:
            w, h, low, u, s, vt = fits[la.key]
            out_f, in_f = w.shape
            if o.energy is not None:
                e = s ** 2
                cum = np.cumsum(e) / e.sum() if e.sum() > 0 else np.ones_like(e)
                r = int(np.searchsorted(cum, o.energy - 1e-12) + 1)
                r = min(r, s.size)
                by = f"energy={o.energy:g}"
            else:
                r = ranks.get(la.key, 0)
                by = f"ratio={o.ratio:g} (the parameters are cut where the data-weighted spectrum loses least)"
            if r < 1 or not _saves(la, r):
                skipped[la.key] = _why_not(la, max(r, 0), by) if r >= 1 else f"left whole: {by}"
                continue
            root = np.sqrt(s[:r])
            a = u[:, :r] * root  # [out, r]
            b = solve_triangular(low, vt[:r].T, lower=True, trans="T").T * root[:, None]  # [r, in] = V^T L^-1
            a32, b32 = a.astype(np.float32), b.astype(np.float32)
            d = w - a32.astype(np.float64) @ b32.astype(np.float64)
            ref = float(np.einsum("ij,jk,ik->", w, h, w))
            err = float(np.einsum("ij,jk,ik->", d, h, d))
            factors[la.key] = (a32, b32)
            per_layer[la.key] = {"op": la.op, "shape": [out_f, in_f], "rank": r, "params_before": out_f * in_f,
                                 "params_after": r * (out_f + in_f),
                                 "output_error": round(float(np.sqrt(max(err, 0.0) / ref)) if ref > 0 else 0.0, 6)}
        result = self._apply(graph, [la for la in layers if la.key in factors], factors) if factors else graph
        whole = sum(_out_in(la)[0] * _out_in(la)[1] for la in layers if la.key not in factors)
        self._finish(skipped, per_layer, whole)
        return result

    def _finish(self, skipped: dict, per_layer: dict, whole: int = 0) -> None:
        """``whole``: weight parameters of the factorizable layers left whole (counted in ``params``, whose
        ``cut`` is over every factorizable layer: what ``ratio`` asks for)."""
        before = sum(v["params_before"] for v in per_layer.values()) + whole
        after = sum(v["params_after"] for v in per_layer.values()) + whole
        self.note("method", self.opts.method)
        if self.opts.ratio is not None:
            self.note("ratio", self.opts.ratio)
        else:
            self.note("energy", self.opts.energy)
        self.note("factorized_layers", len(per_layer))
        if skipped:
            self.note("not_factorized", skipped)
        self.note("layers", per_layer)
        cut = round(1.0 - after / before, 6) if before else 0.0
        self.note("params", {"before": before, "after": after, "cut": cut})
        text = f"{len(per_layer)} layer(s) factorized"
        if before:
            text += f", weight parameters {before} -> {after} ({cut:.1%} cut)"
        if skipped:
            text += f", {len(skipped)} left as is ({first_reasons(skipped)})"
        self.note("summary", text)

    # -------------------------------------------------------------------------------- statistics
    def _stats(self, graph: Graph, layers: list[Layer], ctx: PassContext) -> dict:
        """Per layer: (X^T X, row count) of its calibration input rows, as quantize gathers them
        (:meth:`Quantize._layer_stats`; the layers factorized have one group)."""
        stats = Quantize(mode="dynamic")._layer_stats(graph, layers, ctx)
        out = {}
        for la in layers:
            st = stats[la.key][0]
            cols = la.w2.shape[1]
            out[la.key] = (st["h"] if isinstance(st["h"], np.ndarray) else np.zeros((cols, cols)), st["n"])
        return out

    # ---------------------------------------------------------------------------------- apply
    @staticmethod
    def _apply(graph: Graph, layers: list[Layer], factors: dict) -> Graph:
        ir = IR(graph)
        nodes = {(n.name or n.outputs[0].name): n for n in ir.g.nodes}
        namer = Namer(all_names(ir.like.graph), graph.opset)
        for la in layers:
            if la.key not in factors:
                continue
            a, b = factors[la.key]  # [out, r], [r, in]
            node = nodes[la.key]
            bld = Builder(ir.g, namer, la.key, np.float32)
            x = node.inputs[0]
            if la.op == "MatMul":
                first_w, second_w, attrs = b.T, a.T, {}
            elif la.op == "Gemm":
                rows = la.layout == "rows"  # transB=1: stored [out, in]
                first_w, second_w = (b, a) if rows else (b.T, a.T)
                attrs = {"transA": int(node.attrs.get("transA", 0)), "transB": int(rows)}
                if node.attrs.get("transA", 0):
                    node.attrs["transA"] = 0
            else:  # Conv: the first factor keeps the kernel and its geometry, the node becomes a 1x1 conv
                k = tuple(la.w.shape[2:])
                nd = len(k)
                first_w, second_w = b.reshape((b.shape[0], la.w.shape[1]) + k), a.reshape(a.shape + (1,) * nd)
                attrs = {n: node.attrs[n] for n in ("kernel_shape", "strides", "pads", "dilations", "auto_pad")
                         if n in node.attrs}
                attrs["kernel_shape"] = list(k)
                for n in ("strides", "pads", "dilations", "auto_pad"):
                    node.attrs.pop(n, None)
                node.attrs["kernel_shape"] = [1] * nd
            w1 = gs.Constant(namer.fresh(f"{la.key}/low_rank_in"), np.ascontiguousarray(first_w, np.float32))
            w2 = gs.Constant(namer.fresh(f"{la.key}/low_rank_out"), np.ascontiguousarray(second_w, np.float32))
            ins = [x, w1]
            if la.op == "Gemm" and graph.opset < 11:  # C is optional from opset 11
                ins.append(bld.const(np.zeros(first_w.shape[0 if attrs["transB"] else 1], np.float32)))
            mid = bld.op(la.op, ins, attrs, dtype=np.float32)
            node.inputs[0] = mid
            node.inputs[1] = w2
        toposort(ir.g)
        return ir.to_graph()


def _allocate(layers: list[Layer], spectra: dict, ratio: float) -> dict:
    """Ranks that cut the layers' weight parameters by ``ratio`` overall, losing the least data-weighted
    energy: every layer starts whole; the step that removes the smallest share of its layer's energy per
    parameter saved is taken first (factorizing a layer at its largest saving rank, then lowering a rank by
    one), until the cut is reached. ``{key: rank}``; a layer left whole has rank 0."""
    import heapq

    total = sum(_out_in(la)[0] * _out_in(la)[1] for la in layers)
    need = ratio * total
    by_key = {la.key: la for la in layers}
    state = {}
    heap = []
    for la in layers:
        out_f, in_f = _out_in(la)
        s2 = np.asarray(spectra[la.key], dtype=np.float64) ** 2
        energy = float(s2.sum()) or 1.0
        r0 = min(s2.size, (out_f * in_f - 1) // (out_f + in_f))  # the largest rank that saves parameters
        if r0 < 1:
            continue
        state[la.key] = 0  # whole
        # First step: factorize at r0 (saves out*in - r0*(out+in), loses the energy past r0).
        loss = float(s2[r0:].sum()) / energy
        saved = out_f * in_f - r0 * (out_f + in_f)
        heapq.heappush(heap, (loss / saved, la.key, r0))
    cut = 0.0
    while heap and cut < need:
        _, key, r = heapq.heappop(heap)
        la = by_key[key]
        out_f, in_f = _out_in(la)
        s2 = np.asarray(spectra[key], dtype=np.float64) ** 2
        energy = float(s2.sum()) or 1.0
        prev = state[key]
        cut += (out_f * in_f - r * (out_f + in_f)) if prev == 0 else (out_f + in_f)
        state[key] = r
        if r > 1:
            heapq.heappush(heap, (float(s2[r - 1]) / energy / (out_f + in_f), key, r - 1))
    return state


def _out_in(la: Layer) -> tuple[int, int]:
    return la.w2.shape[0], la.w2.shape[1]


def _saves(la: Layer, r: int) -> bool:
    out_f, in_f = _out_in(la)
    return r >= 1 and r * (out_f + in_f) < out_f * in_f


def _why_not(la: Layer, r: int, by: str) -> str:
    out_f, in_f = _out_in(la)
    if r < 1:
        return f"{by} leaves rank {r} for a [{out_f}, {in_f}] weight"
    return f"rank {r} ({by}) would not reduce the parameters of a [{out_f}, {in_f}] weight " \
           f"({r * (out_f + in_f)} >= {out_f * in_f})"


def _unsupported(la: Layer) -> str | None:
    """Why a layer quantize would take is not factorized here (None when it is)."""
    if la.layout == "act":
        return "a MatMul of two activations"
    if la.op != "Conv":
        return None
    if int(la.attrs.get("group", 1)) != 1:
        return "a grouped conv"
    return None
