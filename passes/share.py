"""share: weight sharing of Conv/Gemm/MatMul weights: k-means codebooks with packed indices, merged tensors and rows.

Layers are found as :mod:`passes.quantize` finds them: the Conv, Gemm and
MatMul nodes of the main graph whose weight (input 1) is a float32 constant
read by that node alone. Each weight is seen as a matrix ``[out, in]`` whose
columns follow the layer's input columns (``C * kernel`` for a conv).

* ``bits=B`` (1..8): the weight's values are clustered by k-means into
  ``2**B`` shared values, one float32 codebook per tensor (``per=tensor``) or
  per output channel (``per=channel``), and the weight is stored as the
  codebook plus one ``B``-bit index per weight packed into a ``uint8``
  initializer (:mod:`passes._codebook`). A weight with at most ``2**B``
  distinct values (per channel) is stored exactly (a binary ``±alpha`` weight at
  ``bits=1,per=channel``, a ternary one at ``bits=2``) and with fewer bits when
  fewer suffice. With calibration data (``--data``), each weight's squared
  error counts in proportion to the diagonal of its layer's input Hessian
  ``X^T X`` (its input column's energy; plus 1 % of the mean as damping), as
  quantize and prune gather it; without, plain k-means.
* ``merge=T`` (a cosine threshold in (0, 1]): weight tensors that are exactly
  identical become one initializer read by every layer; within a weight, each
  output row (filter) whose ``|cosine|`` with an earlier kept row is at least
  ``T`` becomes ``scale * that row`` (least-squares ``scale``, negative for an
  opposite row), stored as the kept rows, an index per row and a scale per
  row. With ``bits`` as well, the kept rows are what the codebook encodes.

Both forms are decoded in the graph by standard ONNX ops (opset 11+) ending in
a ``Reshape`` to the weight's shape; the codebook indices of several layers
are unpacked together (:func:`passes._codebook.chunks`), so a small layer's
decode costs two or three nodes. The CPU target decodes the weights once, at
lower time (``targets/lowbit.py: decoded_weight_bytes``): the artifact runs
dense float32 kernels. A layer is changed only where its stored form (data
plus its decode's nodes, measured) is smaller than the float32 weight, and the
smaller of codebook and kept rows + codebook is taken; the others are listed
with the reason. The record gives each layer's form, bits, codebooks and
their size, kept rows and relative error (data-weighted when data are
given), and ``weight_bytes``: the layers' stored data (indices, codebooks, kept
rows, row indices and scales) before and after. The result is a function of
the model, options, data and seed only.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import ModelError, OptionError
from graphopt.graph import Graph
from graphopt.ir import IR, toposort
from graphopt.options import Option
from graphopt.passbase import Pass, PassContext, first_reasons

from . import _codebook as cb
from ._emit import Builder, all_names, remove_node
from .quantize import Layer, Quantize, _constant

PER = ("tensor", "channel")
#: Damping added to the Hessian diagonal, relative to its mean (a dead input column still counts a little).
DAMPING = 0.01


class Share(Pass):
    """Share weights of Conv/Gemm/MatMul: k-means codebooks with packed B-bit indices, merged tensors and rows."""

    name = "share"
    lossless = False
    options = (
        Option("bits", int, None, "bits per weight index, 1..8: the weights take 2^bits shared values (k-means; "
               "weighted by the input Hessian's diagonal when --data is given); give it, 'merge', or both"),
        Option("per", str, "tensor", "bits: one codebook per tensor or per output channel", choices=PER),
        Option("exact", bool, False, "bits: only the layers whose weights take at most 2^bits distinct values "
               "(per tensor or per channel, as 'per' says), stored without loss, e.g. a binary or ternary "
               "student's; the others are left as is"),
        Option("bias_correction", bool, None, "with --data: each shared layer's bias absorbs the mean shift of "
               "its outputs on the calibration data (a bias is added where the layer has none); default: below 4 "
               "bits (digits CNN at bits=2: 92.4 -> 96.0 %; at 4 bits it changed nothing measurable)"),
        Option("merge", float, None, "cosine threshold in (0, 1]: identical weight tensors become one, and "
               "output rows within |cosine| >= this of an earlier row become a scaled copy of it"),
    )

    def __init__(self, **options):
        super().__init__(**options)
        o = self.opts
        where = f"pass '{self.name}'"
        if o.bits is None and o.merge is None:
            raise OptionError(f"{where}: option 'bits' (1..8) or option 'merge' (a cosine threshold in (0, 1]) "
                              "is required")
        if o.bits is not None and not 1 <= o.bits <= 8:
            raise OptionError(f"{where}: option 'bits' must be in 1..8, got {o.bits!r}")
        if o.merge is not None and not 0.0 < o.merge <= 1.0:
            raise OptionError(f"{where}: option 'merge' must be in (0, 1], got {o.merge!r}")
        if o.bits is None and ("per" in self.given or o.exact):
            if o.exact:
                raise OptionError(f"{where}: option 'exact' applies to 'bits' (the codebooks)")
            raise OptionError(f"{where}: option 'per' applies to 'bits' (the codebooks)")

    # --------------------------------------------------------------------------------------- run
    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        o = self.opts
        layers, skipped = Quantize(mode="dynamic")._layers(graph)  # the same layers quantize finds
        skipped = {k: why.replace("quantized", "shared") for k, why in skipped.items()}
        if not layers:
            self._finish({}, skipped, {}, False)
            return graph
        if graph.opset < cb.MIN_OPSET:
            raise ModelError(f"{graph.source or 'model'}: share needs opset {cb.MIN_OPSET} or newer (its decode "
                             f"uses GatherElements and Mod); the model is opset {graph.opset}: re-export it at a "
                             "newer opset")
        # Exactly identical tensors (merge): the first layer's weight stands for all.
        by_bytes: dict[tuple, list[list[Layer]]] = {}
        for la in layers:
            key = (la.w.shape, hashlib.sha256(_bits(la.w)).hexdigest()) if o.merge is not None else (la.key,)
            same = by_bytes.setdefault(key, [])
            hit = next((grp for grp in same if _bits(grp[0].w) == _bits(la.w)), None)
            if hit is None:
                same.append([la])
            else:
                hit.append(la)
        groups = {grp[0].key: grp for same in by_bytes.values() for grp in same}
        groups = {la.key: groups[la.key] for la in layers if la.key in groups}  # in graph order
        data_aware = o.bits is not None and not ctx.data.generated
        importance = self._importance(graph, layers, ctx) if data_aware else {}

        plans, why_not = {}, {}
        for key, members in groups.items():
            if o.exact and not _representable(members[0].w2, o.bits, o.per):
                why_not[key] = (f"its weights take more than {2 ** o.bits} distinct values per {o.per} "
                                "(exact=true)")
                continue
            imp = sum(importance[la.key] for la in members) if data_aware else None
            plan = self._plan(members[0], imp)
            if plan is None:
                why_not[key] = "no output rows to merge (none within the threshold)"
            elif plan["bytes"] >= 4 * members[0].w.size:
                why_not[key] = (f"sharing would not make it smaller ({plan['bytes']} bytes with its decode as "
                                f"{plan['record']['form']}, {4 * members[0].w.size} as float32)")
            else:
                plans[key] = plan
        # Codebook indices are unpacked together (cb.chunks); a chunk whose unpacking costs more than its
        # layers save is not worth it.
        chunks = []
        encs = {k: p["form"]["enc"] for k, p in plans.items() if "enc" in p["form"]}
        for chunk in cb.chunks([(k, e["bits"], e["index"].size) for k, e in encs.items()]):
            cost = _measure(lambda b: cb.emit_unpack(b, [encs[k]["index"] for k in chunk], encs[chunk[0]]["bits"]),
                            "share")
            saved = sum(4 * groups[k][0].w.size - plans[k]["bytes"] for k in chunk)
            if saved <= cost:
                for k in chunk:
                    why_not[k] = (f"sharing would not make the file smaller (saves {saved} bytes with the other "
                                  f"{len(chunk) - 1} layer(s) unpacked with it, whose unpacking costs {cost})")
                    del plans[k]
            else:
                chunks.append(chunk)

        per_layer, merged = {}, {}
        for key, members in groups.items():
            first = members[0]
            float_bytes = 4 * first.w.size
            if key in plans:
                per_layer[key] = {"op": first.op, "weights": int(first.w.size), **plans[key]["record"],
                                  "bytes_before": float_bytes, "bytes_after": plans[key]["data_bytes"]}
            elif len(members) > 1:
                per_layer[key] = {"op": first.op, "weights": int(first.w.size), "form": "float32",
                                  "bytes_before": float_bytes, "bytes_after": float_bytes,
                                  "kept_float_why": why_not[key]}
            else:
                skipped[key] = why_not[key]
            for la in members[1:]:
                merged[la.key] = key
                per_layer[la.key] = {"op": la.op, "weights": int(la.w.size), "form": f"merged into {key}",
                                     "bytes_before": 4 * la.w.size, "bytes_after": 0}
        correct = o.bias_correction if o.bias_correction is not None else (o.bits is not None and o.bits < 4)
        corrections = self._corrections(groups, plans) if data_aware and correct else {}
        if corrections:
            self.note("bias_corrected", sorted(corrections))
        result = self._apply(graph, groups, plans, chunks, corrections) if (plans or merged) else graph
        self._finish(per_layer, skipped, merged, data_aware)
        return result

    def _finish(self, per_layer: dict, skipped: dict, merged: dict, data_aware: bool):
        o = self.opts
        before = sum(v["bytes_before"] for v in per_layer.values())
        after = sum(v["bytes_after"] for v in per_layer.values())
        if o.bits is not None:
            self.note("bits", o.bits)
            self.note("per", o.per)
            self.note("data_aware", data_aware)
        if o.merge is not None:
            self.note("merge", o.merge)
            self.note("merged_tensors", merged)
        shared = [k for k, v in per_layer.items() if v["form"] != "float32"]
        self.note("shared_layers", len(shared))
        if skipped:
            self.note("not_shared", skipped)
        self.note("layers", per_layer)
        self.note("weight_bytes", {"before": int(before), "after": int(after),
                                   "ratio": round(before / after, 3) if after else None})
        text = f"{len(shared)} layer(s) shared"
        if merged:
            text += f" ({len(merged)} merged into an identical tensor)"
        if after:
            text += f", weights {before / after:.2f}x smaller"
        if skipped:
            text += f", {len(skipped)} left as is ({first_reasons(skipped)})"
        self.note("summary", text)

    # ---------------------------------------------------------------------------------- planning
    def _importance(self, graph: Graph, layers: list[Layer], ctx: PassContext) -> dict:
        """Per layer, the importance of each weight's error in the stored 2-D layout ``m`` (see :func:`_matrix`):
        its input column's diagonal of ``X^T X`` on the calibration data (per conv group), damped."""
        stats = Quantize(mode="dynamic")._layer_stats(graph, layers, ctx)
        # per layer and conv group: the mean of its input columns (what bias correction needs)
        self._means = {la.key: [np.asarray(st["sum"], np.float64) / max(st["n"], 1) for st in stats[la.key]]
                       for la in layers}
        out = {}
        for la in layers:
            n_out, n_in = la.w2.shape
            imp = np.zeros((n_out, n_in))
            for gi, (rows, _) in enumerate(Quantize._groups(la)):
                h = stats[la.key][gi]["h"]
                d = np.diag(h).astype(np.float64) if isinstance(h, np.ndarray) else np.zeros(n_in)
                mean = float(d.mean()) if d.size else 0.0
                imp[rows] = (d + (DAMPING * mean if mean > 0 else 1.0))[None, :]
            out[la.key] = imp if la.layout == "rows" else imp.T
        return out

    def _plan(self, la: Layer, imp: np.ndarray | None) -> dict | None:
        """The smallest stored form of ``la``'s weight the options allow (:func:`_candidate`: ``form``,
        ``bytes`` in the file, ``data_bytes``, ``record``); None when merge finds no rows to merge and no
        codebook is asked for."""
        o = self.opts
        m, axis = _matrix(la)  # stored 2-D layout; axis: where the output channels run (0 rows, 1 columns)
        candidates = []
        if o.bits is not None:
            enc = cb.encode(m, None if o.per == "tensor" else axis, o.bits, imp)
            w = cb.decode(enc)
            candidates.append(_candidate(la, {"enc": enc}, w, m, imp))
        if o.merge is not None:
            w2 = m if axis == 0 else m.T
            source, scales = cb.merge_rows(w2, o.merge)
            kept = np.unique(source)
            if kept.size < w2.shape[0]:
                index = np.searchsorted(kept, source)
                reps = w2[kept]  # [R, cols]
                form = {"index": index, "kept": kept}
                if o.bits is not None:
                    # The kept rows' importance: every row they stand for, by its scale squared.
                    rimp = None
                    if imp is not None:
                        i2 = imp if axis == 0 else imp.T
                        rimp = np.zeros(reps.shape)
                        np.add.at(rimp, index, (scales ** 2)[:, None] * i2)
                        rimp += 1e-12 * float(rimp.mean() or 1.0)
                    rm = reps if axis == 0 else reps.T
                    enc = cb.encode(rm, None if o.per == "tensor" else axis, o.bits,
                                    None if rimp is None else (rimp if axis == 0 else rimp.T))
                    q = cb.decode(enc)
                    q2 = q if axis == 0 else q.T
                    scales = cb.scales_for(w2, index, q2)  # onto the rows as decoded
                    form["enc"] = enc
                    reps_dec = q2
                else:
                    form["reps"] = reps.astype(np.float32)
                    reps_dec = reps
                form["scales"] = scales.astype(np.float32)
                w = cb.decode_rows(reps_dec if axis == 0 else reps_dec.T, index, form["scales"], axis)
                candidates.append(_candidate(la, form, w, m, imp))
        if not candidates:
            return None
        return min(candidates, key=lambda c: c["bytes"])  # the first of equals: the codebook alone

    def _corrections(self, groups: dict, plans: dict) -> dict:
        """``{layer: bias delta}``: ``(W - W_shared) @ mean(x)`` per output channel, for every layer reading a
        shared weight whose outputs move on average (exactly kept weights move nothing: left alone)."""
        out = {}
        for key, plan in plans.items():
            w = plan["decoded"].astype(np.float64)
            for la in groups[key]:
                _, axis = _matrix(la)
                d2 = la.w2.astype(np.float64) - (w if axis == 0 else w.T)  # [out, in] as la.w2
                delta = np.zeros(d2.shape[0])
                for gi, (rows, _) in enumerate(Quantize._groups(la)):
                    mean = self._means[la.key][gi]
                    if np.ndim(mean) == 1 and mean.size == d2.shape[1]:
                        delta[rows] = d2[rows] @ mean
                scale = float(np.abs(la.w2).max()) if la.w2.size else 0.0
                if np.abs(delta).max(initial=0.0) > 1e-6 * max(scale, 1e-30):
                    out[la.key] = delta
        return out

    # ---------------------------------------------------------------------------------- apply
    @staticmethod
    def _apply(graph: Graph, groups: dict, plans: dict, chunks: list, corrections: dict) -> Graph:
        ir = IR(graph)
        nodes = {(n.name or n.outputs[0].name): n for n in ir.g.nodes}
        namer = cb.ShortNamer(all_names(ir.like.graph), graph.opset)
        out_names = {t.name for t in ir.g.outputs}
        indices = {}
        for chunk in chunks:
            encs = [plans[k]["form"]["enc"] for k in chunk]
            got = cb.emit_unpack(Builder(ir.g, namer, "share", np.float32), [e["index"] for e in encs],
                                 encs[0]["bits"])
            indices.update(zip(chunk, got))
        for key, members in groups.items():
            plan = plans.get(key)
            if plan is None and len(members) == 1:
                continue
            node = nodes[key]
            if plan is not None:
                old = node.inputs[1]
                node.inputs[1] = _emit(Builder(ir.g, namer, key, np.float32), plan["form"], members[0],
                                       indices.get(key))
                _drop_constant_node(old, ir.g, out_names)
            w = node.inputs[1]
            for la in members[1:]:
                other = nodes[la.key]
                old = other.inputs[1]
                other.inputs[1] = w
                _drop_constant_node(old, ir.g, out_names)
            for la in members:
                if la.key in corrections:
                    Quantize._correct_bias(Builder(ir.g, namer, la.key, np.float32), ir.g, nodes[la.key], la,
                                           corrections[la.key])
        toposort(ir.g)
        return ir.to_graph()


def _bits(w: np.ndarray) -> bytes:
    """A weight's bytes: equal bytes, identical tensors (+0.0 and -0.0 differ, as NaN payloads would)."""
    return np.ascontiguousarray(w).tobytes()


def _matrix(la: Layer) -> tuple[np.ndarray, int]:
    """The weight as stored, as a 2-D matrix, and the axis its output channels run along."""
    if la.layout == "rows":
        return np.ascontiguousarray(la.w.reshape(la.w.shape[0], -1), np.float32), 0
    return np.ascontiguousarray(la.w, np.float32), 1


def _measure(emit, prefix: str) -> int:
    """Bytes that ``emit(builder)`` adds to a serialized model, emitted aside (see :func:`cb.emitted_bytes`)."""
    namer = cb.ShortNamer(set(), cb.MIN_OPSET)
    namer.counter = 100  # names as long as a small model's get (slightly longer: a conservative count)
    b = Builder(gs.Graph(opset=cb.MIN_OPSET), namer, prefix, np.float32)
    emit(b)
    return cb.emitted_bytes(b)


def _candidate(la: Layer, form: dict, w: np.ndarray, m: np.ndarray, imp: np.ndarray | None) -> dict:
    """One stored form of ``la``'s weight: its bytes in the file (data and the layer's own decode nodes; the
    unpacking its codebook indices share with other layers is counted per chunk), record and error."""
    data = (cb.encoded_bytes(form["enc"]) if "enc" in form else int(form["reps"].nbytes)) + \
        (int(form["index"].size) * 8 if "index" in form else 0)
    split_out = "share/Split199"  # the layer's own output of its chunk's unpacking
    nbytes = _measure(lambda b: _emit(b, form, la, gs.Variable(split_out)), la.key)
    if "enc" in form:
        nbytes += cb.packed_bytes(form["enc"]["index"].size, form["enc"]["bits"]) + len(split_out) + 3
    d = (w.astype(np.float64) - m.astype(np.float64))
    h = np.ones_like(d) if imp is None else imp
    ref = float((h * m.astype(np.float64) ** 2).sum())
    err = float(np.sqrt((h * d * d).sum() / ref)) if ref > 0 else 0.0
    record: dict = {}
    if "index" in form:
        record["form"] = "rows+codebook" if "enc" in form else "rows"
        record["rows"] = int(form["index"].size)
        record["kept_rows"] = int(form["kept"].size)
    else:
        record["form"] = "codebook"
    if "enc" in form:
        enc = form["enc"]
        record["bits"] = enc["bits"]
        record["codebooks"] = 1 if enc["axis"] is None else int(enc["codebook"].shape[enc["axis"]])
        record["codebook_size"] = int(enc["entries"])
    record["error"] = round(err, 6)
    return {"form": form, "record": record, "data_bytes": data, "bytes": nbytes, "decoded": w}


def _emit(b: Builder, form: dict, la: Layer, idx):
    """The decode of ``form`` into ``b`` from its codebook indices ``idx`` (a flat int32 tensor, None without
    a codebook); returns the tensor holding the weight in its stored shape."""
    shape = [int(d) for d in la.w.shape]
    if "index" not in form:
        return cb.emit_lookup(b, idx, form["enc"], shape)
    axis = 0 if la.layout == "rows" else 1
    if "enc" in form:
        reps = cb.emit_lookup(b, idx, form["enc"], form["enc"]["shape"])
    else:
        reps = b.const(np.ascontiguousarray(form["reps"] if axis == 0 else form["reps"].T))
    return cb.emit_rows(b, reps, form["index"], form["scales"], axis, shape)


def _drop_constant_node(t, g: gs.Graph, out_names: set) -> None:
    """Remove the Constant node behind ``t`` when nothing reads ``t`` any more (an initializer simply drops
    out of the export)."""
    if isinstance(t, gs.Variable) and not t.outputs and t.name not in out_names and len(t.inputs) == 1 \
            and t.inputs[0].op == "Constant" and _constant(t) is not None:
        remove_node(t.inputs[0], g)


def _representable(w2: np.ndarray, bits: int, per: str) -> bool:
    """Whether ``w2`` ([out, in]) takes at most ``2^bits`` distinct values in the whole tensor or in each row."""
    rows = [w2.reshape(-1)] if per == "tensor" else list(w2)
    return all(np.unique(r).size <= 2 ** bits for r in rows)
