"""quantize: int8 QDQ (static, dynamic) and packed low-bit weight-only quantization, calibrated on real data.

Layers are the Conv, Gemm and MatMul nodes of the main graph whose weight
(input 1) is a float32 constant read by that node alone. Per mode:

* ``static``: the weight becomes int8 codes, one scale per output channel,
  behind a DequantizeLinear; the activation input gets a QuantizeLinear /
  DequantizeLinear pair with a scale and zero point calibrated on ``--data``
  (uint8 asymmetric, or int8 symmetric with ``symmetric=true``); a constant
  bias becomes int32 at scale ``s_x * s_w``. A MatMul of two activations
  (attention's Q x K^T and P x V) gets a QuantizeLinear / DequantizeLinear
  pair on both inputs (``act_matmuls``, default on), calibrated the same way.
  Standard QDQ ONNX, as ONNX Runtime's own quantizer writes it.
* ``dynamic``: int8 weights as above; the activation is quantized at run time
  (DynamicQuantizeLinear, then DequantizeLinear).
* ``weight-only``: weights only, ``bits`` 8/4/3/2, one grid (scale and offset,
  float16) per output channel or per ``group`` consecutive inputs; rounded
  to nearest or by GPTQ on the calibration Hessian, biases corrected for the
  mean error the rounding leaves. The codes are stored packed in bit-planes
  (``bits`` bits per weight) and decoded in the graph by float ops
  (Cast/Mul/Floor/Sub/MatMul/Reshape) every ONNX runtime runs; lossless
  passes keep the decode (fold-constants never inflates a constant).

With ``--budget``, layers whose quantization costs the most accuracy (each
measured alone: the task metric on ``--eval``, else top-1 agreement with the
float model on the calibration data) are kept in float until the whole stays
within the budget; the record lists them with what each cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import DataError, ModelError, OptionError
from graphopt.graph import Graph
from graphopt.ir import IR, all_graphs, array, toposort
from graphopt.options import Option
from graphopt.passbase import Pass, PassContext, first_reasons

from . import _quant_math as qm
from ._emit import Builder, Namer, all_names

log = logging.getLogger("graphopt.passes.quantize")

MODES = ("static", "dynamic", "weight-only")
CALIBRATIONS = ("minmax", "percentile", "entropy", "mse")
#: Rows of one layer's input matrix (im2col rows for a conv) used per calibration sample for its Hessian.
HESSIAN_ROWS = 8192


@dataclass
class Layer:
    """One quantizable node: its weight as ``w2`` [out, in] and how that maps back to the stored layout."""

    key: str  # node name, else its first output's name
    op: str
    weight: str
    act: str
    w: np.ndarray  # as stored
    layout: str  # "rows": stored [out, ...] (Conv, Gemm transB); "cols": stored [in, out] (MatMul, Gemm);
    # "act": a MatMul of two activations (static mode), ``weight`` names the second one and ``w`` is empty
    bias: str | None
    attrs: dict = field(default_factory=dict)

    @property
    def w2(self) -> np.ndarray:
        return self.w.reshape(self.w.shape[0], -1) if self.layout == "rows" else self.w.T

    @property
    def axis(self) -> int:
        return 0 if self.layout == "rows" else 1

    @property
    def out_channels(self) -> int:
        return self.w.shape[0] if self.layout == "rows" else self.w.shape[1]


def _key(node: gs.Node) -> str:
    return node.name or node.outputs[0].name


def _constant(t) -> gs.Constant | None:
    if isinstance(t, gs.Constant):
        return t
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        return v if isinstance(v, gs.Constant) else None
    return None


class Quantize(Pass):
    """Quantize weights (and activations) of Conv/Gemm/MatMul: int8 QDQ, dynamic int8, or packed 2-8 bit weights."""

    name = "quantize"
    lossless = False
    options = (
        Option("mode", str, "static", "static: int8 weights and calibrated activations (QDQ); dynamic: int8 "
               "weights, activations quantized at run time; weight-only: packed low-bit weights", choices=MODES),
        Option("bits", int, 8, "weight bits (weight-only; static and dynamic are int8)", choices=(8, 4, 3, 2)),
        Option("group", int, 0, "weight-only: inputs sharing one scale (0: one per output channel)", min=0),
        Option("calibrate", str, "mse", "static: how activation ranges are chosen from the calibration data",
               choices=CALIBRATIONS),
        Option("percentile", float, 99.99, "calibrate=percentile: the percentile kept", min=50.0, max=100.0),
        Option("symmetric", bool, False, "static: int8 symmetric activations instead of uint8 asymmetric"),
        Option("rounding", str, "auto", "weight-only: nearest or gptq (auto: gptq below 8 bits)",
               choices=("auto", "nearest", "gptq")),
        Option("bias_correction", bool, True, "weight-only: correct biases for the mean rounding error "
               "(when calibration data are given)"),
        Option("act_matmuls", bool, True, "static: MatMuls of two activations (attention) get QDQ on both "
               "inputs, as ONNX Runtime's quantizer does; false: they stay float"),
        Option("ops", str, "Conv,Gemm,MatMul", "op types quantized (comma list, quoted in pipeline text)"),
        Option("exclude", str, "", "node names left in float (comma list, quoted in pipeline text)"),
    )

    def __init__(self, **options):
        super().__init__(**options)
        o = self.opts
        where = f"pass '{self.name}'"
        if o.mode != "weight-only":
            for opt, default in (("bits", 8), ("group", 0), ("rounding", "auto")):
                if getattr(o, opt) != default:
                    raise OptionError(f"{where}: option '{opt}' applies to mode=weight-only; mode={o.mode} "
                                      "quantizes weights to int8 per output channel")
        ops = {s.strip() for s in o.ops.split(",") if s.strip()}
        bad = ops - {"Conv", "Gemm", "MatMul"}
        if bad or not ops:
            raise OptionError(f"{where}: option 'ops' = {o.ops!r}: choose among Conv, Gemm, MatMul")
        self.ops = ops
        self.exclude = {s.strip() for s in o.exclude.split(",") if s.strip()}
        self.rounding = o.rounding if o.rounding != "auto" else ("gptq" if o.bits < 8 else "nearest")

    def requires_data(self) -> bool:
        return self.opts.mode == "static" or (self.opts.mode == "weight-only" and self.rounding == "gptq")

    # --------------------------------------------------------------------------------- find layers
    def _layers(self, graph: Graph) -> tuple[list[Layer], dict[str, str]]:
        self._types = None  # tensor name -> numpy dtype from ONNX type inference, made on first need
        ir = IR(graph)
        readers: dict[int, int] = {}
        for n in ir.g.nodes:
            for t in n.inputs:
                readers[id(t)] = readers.get(id(t), 0) + 1
        layers, skipped = [], {}
        for sub in all_graphs(ir.g):
            if sub is not ir.g:
                for node in sub.nodes:
                    if node.op in self.ops:
                        skipped[_key(node)] = "inside an If/Loop/Scan body: only the main graph is quantized"
        for node in ir.g.nodes:
            if node.op not in self.ops or (node.domain or "") not in ("", "ai.onnx"):
                continue
            key = _key(node)
            if key in self.exclude or node.name in self.exclude:
                skipped[key] = "excluded"
                continue
            why = None
            w_t = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
            w = array(w_t) if w_t is not None else None
            if w is None and node.op == "MatMul" and self._act_matmul(node, graph):
                layers.append(Layer(key, node.op, node.inputs[1].name, node.inputs[0].name,
                                    np.zeros(0, np.float32), "act", None))
                continue
            if w is None:
                why = "weight is not a constant"
                if node.op == "MatMul" and self.opts.mode == "static" and not self.opts.act_matmuls:
                    why = "a MatMul of two activations (act_matmuls=false)"
            elif w.dtype != np.float32:
                why = f"weight is {w.dtype}, not float32"
            elif readers.get(id(node.inputs[1]), 0) > 1:
                why = "weight is shared with other nodes"
            elif _constant(node.inputs[0]) is not None:
                why = "both inputs are constants"
            elif node.inputs[0].dtype is not None and np.dtype(node.inputs[0].dtype) != np.float32:
                why = f"input is {np.dtype(node.inputs[0].dtype)}"
            elif node.op == "MatMul" and w.ndim != 2:
                why = f"weight has rank {w.ndim} (a batched MatMul)"
            elif node.op == "Gemm" and w.ndim != 2:
                why = "weight is not 2-D"
            elif node.op == "Conv" and w.ndim < 3:
                why = "weight rank below 3"
            elif not np.isfinite(w).all():
                why = "weight holds NaN or infinity"
            elif self.opts.mode == "weight-only" and w.size and float(np.abs(w).max()) > _FP16_MAX:
                why = f"weight magnitude {float(np.abs(w).max()):.3g} exceeds float16's range (the weight-only grid's " \
                      "scale and offset are float16)"
            if why:
                skipped[key] = why
                continue
            attrs = dict(node.attrs)
            layout = "rows" if node.op == "Conv" or (node.op == "Gemm" and attrs.get("transB", 0)) else "cols"
            out = w.shape[0] if layout == "rows" else w.shape[1]
            bias = None
            if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and not node.inputs[2].is_empty():
                b_t = _constant(node.inputs[2])
                if b_t is not None and array(b_t).dtype == np.float32 and array(b_t).shape == (out,) \
                        and readers.get(id(node.inputs[2]), 0) == 1:
                    bias = node.inputs[2].name
            if node.op == "Gemm" and float(attrs.get("alpha", 1.0)) != 1.0:
                skipped[key] = "Gemm alpha != 1"
                continue
            layers.append(Layer(key, node.op, node.inputs[1].name, node.inputs[0].name, np.asarray(w),
                                layout, bias, attrs))
        return layers, skipped

    def _act_matmul(self, node: gs.Node, graph: Graph) -> bool:
        """Whether ``node`` is a MatMul of two float32 activations that static mode quantizes (an input of
        unknown type is looked up in ONNX type inference, run once; MatMul also takes integer tensors)."""
        if self.opts.mode != "static" or not self.opts.act_matmuls or len(node.inputs) != 2:
            return False
        if any(_constant(t) is not None for t in node.inputs):
            return False
        for t in node.inputs:
            dtype = t.dtype
            if dtype is None:
                if self._types is None:
                    self._types = _inferred_types(graph)
                dtype = self._types.get(t.name)
            if dtype is None or np.dtype(dtype) != np.float32:
                return False
        return True

    # --------------------------------------------------------------------------------------- run
    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        o = self.opts
        opset = graph.opset
        if opset < 10 or (o.mode == "dynamic" and opset < 11):
            raise ModelError(f"{graph.source or 'model'}: quantize(mode={o.mode}) needs opset "
                             f"{11 if o.mode == 'dynamic' else 10} or newer (QuantizeLinear/DequantizeLinear); "
                             f"the model is opset {opset}: re-export it at a newer opset")
        layers, skipped = self._layers(graph)
        if skipped:
            self.note("not_quantized", skipped)
        if not layers:
            self.note("quantized", 0)
            self.note("summary", _summary(0, skipped))
            return graph
        if ctx.budget is not None and ctx.eval is None and ctx.data.generated:
            raise DataError(f"pass '{self}' with a budget needs --eval or calibration data (--data) to measure "
                            "accuracy on; generated inputs have no accuracy")
        plans = self._plan(graph, layers, ctx)
        chosen = [la.key for la in layers]
        if ctx.budget is not None:
            chosen = self._within_budget(graph, layers, plans, ctx)
        out = self._apply(graph, layers, plans, set(chosen))
        self.note("quantized", len(chosen))
        self.note("mode", o.mode)
        if o.mode == "static":
            self.note("calibrate", o.calibrate)
        if o.mode == "weight-only":
            self.note("rounding", self.rounding)
        acts = [la.key for la in layers if la.layout == "act" and la.key in chosen]
        if acts:
            self.note("activation_matmuls", len(acts))
        before = sum(la.w.nbytes for la in layers if la.key in chosen)
        after = sum(plans["weights"][la.key]["bytes"] for la in layers if la.key in chosen)
        self.note("weight_bytes", {"before": int(before), "after": int(after),
                                   "ratio": round(before / after, 3) if after else None})
        kept = {k: f"kept in float by the budget, {why}" for k, why in self.notes.get("kept_float", {}).items()}
        self.note("summary", _summary(len(chosen), {**skipped, **kept})
                  + (f"; weights {before / after:.2f}x smaller" if after else ""))
        return out

    # ------------------------------------------------------------------------------------ plan
    def _plan(self, graph: Graph, layers: list[Layer], ctx: PassContext) -> dict:
        """Everything per layer that does not depend on which layers end up quantized."""
        o = self.opts
        per_axis = graph.opset >= 13
        plans: dict = {"weights": {}, "acts": {}}
        if o.mode in ("static", "dynamic"):
            for la in layers:
                if la.layout == "act":
                    plans["weights"][la.key] = {"bytes": 0}
                    continue
                codes, scale = qm.int8_per_channel(la.w2)
                if not per_axis:  # opset < 13: one scale for the tensor
                    s = np.float32(scale.max())
                    codes = np.clip(np.round(la.w2 / s), -127, 127).astype(np.int8)
                    scale = np.array(s, np.float32)
                stored = codes.reshape(la.w.shape) if la.layout == "rows" else codes.T
                plans["weights"][la.key] = {"codes": np.ascontiguousarray(stored), "scale": scale,
                                            "bytes": stored.size + scale.size * 4}
            if o.mode == "static":
                plans["acts"] = self._calibrate(graph, layers, ctx)
            return plans
        stats = self._layer_stats(graph, layers, ctx) if (self.rounding == "gptq" or
                                                          (o.bias_correction and not ctx.data.generated)) else {}
        for la in layers:
            w2 = la.w2.astype(np.float64)
            parts = self._groups(la)
            result = []
            for gi, (rows, _) in enumerate(parts):
                st = stats.get(la.key, [None] * len(parts))[gi]
                if self.rounding == "gptq" and st is not None and st["n"] > 0:
                    result.append(qm.gptq(w2[rows], st["h"] / st["n"], o.bits, o.group))
                else:
                    result.append(qm.round_nearest(w2[rows], o.bits, o.group))
            codes = np.concatenate([r[0] for r in result], axis=0)
            scales = np.concatenate([r[1] for r in result], axis=0)
            offsets = np.concatenate([r[2] for r in result], axis=0)
            deq = qm.dequantize(codes, scales, offsets, w2.shape[1]).astype(np.float64)
            delta = None
            if o.bias_correction and la.key in stats:
                delta = np.zeros(w2.shape[0])
                for gi, (rows, _) in enumerate(parts):
                    st = stats[la.key][gi]
                    if st["n"]:
                        delta[rows] = (w2[rows] - deq[rows]) @ (st["sum"] / st["n"])
            packed = codes.astype(np.uint8) if o.bits == 8 else qm.pack_bitplanes(codes, o.bits)
            plans["weights"][la.key] = {
                "packed": packed, "n": codes.size, "shape2": codes.shape, "in": w2.shape[1],
                "scales": scales.astype(np.float16), "offsets": offsets.astype(np.float16),
                "bias_delta": delta,
                "bytes": packed.nbytes + 4 * scales.size + (4 * delta.size if delta is not None and la.bias is None else 0),
            }
        return plans

    @staticmethod
    def _groups(la: Layer) -> list[tuple[slice, slice]]:
        """(rows, input channels) of each conv group (one part for everything else)."""
        g = int(la.attrs.get("group", 1)) if la.op == "Conv" else 1
        if g <= 1:
            return [(slice(None), slice(None))]
        m, c = la.w.shape[0] // g, la.w.shape[1]
        return [(slice(i * m, (i + 1) * m), slice(i * c, (i + 1) * c)) for i in range(g)]

    def _calibrate(self, graph: Graph, layers: list[Layer], ctx: PassContext) -> dict:
        acts = ctx.activations(graph, f"pass '{self}'")
        names = list(dict.fromkeys(n for la in layers for n in ([la.act, la.weight] if la.layout == "act"
                                                               else [la.act])))
        obs = {n: qm.Observer() for n in names}
        for values in acts.stream(names):
            for n, v in values.items():
                obs[n].see_range(v)
        if self.opts.calibrate != "minmax":
            for values in acts.stream(names):
                for n, v in values.items():
                    obs[n].see_values(v)
        return {n: qm.activation_params(obs[n], self.opts.calibrate, self.opts.symmetric, self.opts.percentile)
                for n in names}

    def _layer_stats(self, graph: Graph, layers: list[Layer], ctx: PassContext) -> dict:
        """Per layer (per conv group): the Hessian sum X^T X, the column sums of X and the row count."""
        acts = ctx.activations(graph, f"pass '{self}'")
        rng = np.random.default_rng(ctx.seed)
        stats = {la.key: [{"h": 0.0, "sum": 0.0, "n": 0} for _ in self._groups(la)] for la in layers}
        for values in acts.stream([la.act for la in layers]):
            for la in layers:
                x = values[la.act].astype(np.float64)
                for gi, (_, chans) in enumerate(self._groups(la)):
                    rows = _input_rows(la, x, chans)
                    if rows.shape[0] > HESSIAN_ROWS:
                        rows = rows[np.sort(rng.choice(rows.shape[0], HESSIAN_ROWS, replace=False))]
                    st = stats[la.key][gi]
                    st["h"] = st["h"] + rows.T @ rows
                    st["sum"] = st["sum"] + rows.sum(axis=0)
                    st["n"] += rows.shape[0]
        return stats

    # ---------------------------------------------------------------------------- sensitivity
    def _within_budget(self, graph: Graph, layers: list[Layer], plans: dict, ctx: PassContext) -> list[str]:
        """The layers to quantize so the measured drop stays within ``ctx.budget`` (greedy, most sensitive first)."""
        if ctx.eval is not None:
            base = ctx.eval.score(graph)

            def drop(g: Graph) -> float:
                return base - ctx.eval.score(g)
        else:
            from graphopt.accuracy import top1_agreement
            from graphopt.reference import run_reference

            feeds = ctx.calibration(graph, f"pass '{self}'")
            ref = [o[0] for o in run_reference(graph, feeds)]

            def drop(g: Graph) -> float:
                agree = top1_agreement(ref, [o[0] for o in run_reference(g, feeds)])
                return 100.0 - agree if agree is not None else 0.0
        keys = [la.key for la in layers]
        full = drop(self._apply(graph, layers, plans, set(keys)))
        self.note("budget", {"points": ctx.budget, "drop_all_quantized": round(full, 4)})
        if full <= ctx.budget:
            return keys
        cost = {k: drop(self._apply(graph, layers, plans, {k})) for k in keys}
        order = sorted(keys, key=lambda k: (-cost[k], keys.index(k)))
        kept: list[str] = []
        final = full
        for k in order:
            kept.append(k)
            final = drop(self._apply(graph, layers, plans, set(keys) - set(kept)))
            if final <= ctx.budget:
                break
        self.note("kept_float", {k: f"costs {cost[k]:.2f} points quantized alone" for k in kept})
        self.notes["budget"]["drop"] = round(final, 4)
        return [k for k in keys if k not in kept]

    # ---------------------------------------------------------------------------------- apply
    def _apply(self, graph: Graph, layers: list[Layer], plans: dict, chosen: set[str]) -> Graph:
        ir = IR(graph)
        g = ir.g
        namer = Namer(all_names(ir.like.graph), graph.opset)
        nodes = {_key(n): n for n in g.nodes}
        tensors = g.tensors()
        dq_of: dict[str, gs.Tensor] = {}  # activation name -> its DequantizeLinear output (one pair per tensor)
        mode = self.opts.mode
        for la in layers:
            if la.key not in chosen:
                continue
            node = nodes[la.key]
            b = Builder(g, namer, la.key, np.float32)
            if la.layout == "act":  # both inputs are activations: a QDQ pair on each
                for i, name in ((0, la.act), (1, la.weight)):
                    node.inputs[i] = self._qdq(b, tensors[name], name, plans, dq_of)
                continue
            wp = plans["weights"][la.key]
            if mode == "weight-only":
                node.inputs[1] = self._decode(b, la, wp)
                if wp["bias_delta"] is not None:
                    self._correct_bias(b, g, node, la, wp["bias_delta"])
                continue
            scale = wp["scale"]
            axis_attrs = {"axis": la.axis} if scale.ndim else {}
            node.inputs[1] = b.op("DequantizeLinear", [b.const(wp["codes"]), b.const(scale),
                                                      b.const(np.zeros(scale.shape, np.int8))], axis_attrs)
            node.inputs[0] = self._qdq(b, tensors[la.act], la.act, plans, dq_of)
            if mode == "static" and la.bias is not None and scale.ndim and graph.opset >= 13:
                sx, _ = plans["acts"][la.act]
                bscale = (np.float32(sx) * scale).astype(np.float32)
                bias = array(_constant(node.inputs[2])).astype(np.float64)
                codes = np.round(bias / np.where(bscale > 0, bscale, 1.0))
                if np.all(np.abs(codes) < 2 ** 31 - 1) and np.all(bscale > 0):
                    node.inputs[2] = b.op("DequantizeLinear", [b.const(codes.astype(np.int32)), b.const(bscale),
                                                              b.const(np.zeros(bscale.shape, np.int32))], {"axis": 0})
        toposort(g)
        return ir.to_graph()

    def _qdq(self, b: Builder, x: gs.Tensor, name: str, plans: dict, dq_of: dict) -> gs.Tensor:
        """The dequantized copy of activation ``name`` (one QuantizeLinear / DequantizeLinear pair per tensor,
        shared by every layer that reads it; DynamicQuantizeLinear in dynamic mode)."""
        if name not in dq_of:
            if self.opts.mode == "dynamic":
                y, s, z = b.op("DynamicQuantizeLinear", [x], n_out=3)
                dq_of[name] = b.op("DequantizeLinear", [y, s, z])
            else:
                sx, zx = plans["acts"][name]
                zt = np.array(zx, np.int8 if self.opts.symmetric else np.uint8)
                q = b.op("QuantizeLinear", [x, b.const(np.array(sx, np.float32)), b.const(zt)])
                dq_of[name] = b.op("DequantizeLinear", [q, b.const(np.array(sx, np.float32)), b.const(zt)])
        return dq_of[name]

    def _decode(self, b: Builder, la: Layer, wp: dict) -> gs.Tensor:
        """Graph ops turning the packed codes back into the float weight, in the layer's stored layout."""
        bits = self.opts.bits
        rows, cols = wp["shape2"]
        packed = wp["packed"]
        f = b.op("Cast", [b.const(packed)], {"to": 1})
        if bits < 8:
            nb = packed.shape[0]
            f = b.reshape(f, [nb, 1, bits])
            q = b.op("Floor", [b.mul(f, b.const((0.5 ** np.arange(8)).reshape(1, 8, 1).astype(np.float32)))])
            bit = b.sub(q, b.mul(b.op("Floor", [b.mul(q, b.const(np.float32(0.5)))]), b.const(np.float32(2.0))))
            f = b.matmul(bit, b.const((2.0 ** np.arange(bits)).reshape(bits, 1).astype(np.float32)))
            f = b.reshape(f, [nb * 8])
            if nb * 8 != wp["n"]:
                f = _slice(b, f, 0, 0, wp["n"])
        ng = wp["scales"].shape[1]
        f = b.reshape(f, [rows, ng, cols // ng])
        scale = b.op("Cast", [b.const(wp["scales"].reshape(rows, ng, 1))], {"to": 1})
        offset = b.op("Cast", [b.const(wp["offsets"].reshape(rows, ng, 1))], {"to": 1})
        w = b.add(b.mul(f, scale), offset)
        w = b.reshape(w, [rows, cols])
        if cols != wp["in"]:
            w = _slice(b, w, 1, 0, wp["in"])
        if la.layout == "rows":
            return b.reshape(w, list(la.w.shape)) if la.w.ndim != 2 else w
        return b.op("Transpose", [w], {"perm": [1, 0]})

    @staticmethod
    def _correct_bias(b: Builder, g: gs.Graph, node: gs.Node, la: Layer, delta: np.ndarray) -> None:
        delta = delta.astype(np.float32)
        if la.bias is not None:
            node.inputs[2] = b.const((array(_constant(node.inputs[2])).astype(np.float64) + delta).astype(np.float32))
        elif node.op in ("Conv", "Gemm") and len(node.inputs) == 2:
            node.inputs.append(b.const(delta))
        else:
            y = node.outputs[0]
            fresh = gs.Variable(b.namer.fresh(f"{la.key}/uncorrected"))
            node.outputs[0] = fresh
            add = gs.Node("Add", b.namer.fresh(f"{la.key}/bias_correction"), inputs=[fresh, b.const(delta)],
                          outputs=[y])
            g.nodes.append(add)


def _inferred_types(graph: Graph) -> dict:
    """Tensor name -> numpy dtype, from ONNX shape/type inference on the main graph ({} if inference fails)."""
    import onnx
    from onnx import helper, shape_inference

    try:
        model = shape_inference.infer_shapes(graph.model, strict_mode=False)
    except Exception:  # noqa: BLE001 - a model inference cannot read: the types stay unknown
        return {}
    out = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        elem = vi.type.tensor_type.elem_type
        if elem != onnx.TensorProto.UNDEFINED:
            out[vi.name] = helper.tensor_dtype_to_np_dtype(elem)
    return out


def _summary(quantized: int, left: dict) -> str:
    """One line for the CLI: how many layers were quantized, which were left in float and why (the first few)."""
    text = f"{quantized} layer(s) quantized"
    if left:
        text += f", {len(left)} left in float ({first_reasons(left)})"
    return text

#: Largest finite float16: the weight-only grids (scale, offset) are stored as float16.
_FP16_MAX = 65504.0

def _slice(b: Builder, x, axis: int, start: int, end: int):
    if b.opset >= 10:
        return b.op("Slice", [x, b.const(np.array([start], np.int64)), b.const(np.array([end], np.int64)),
                              b.const(np.array([axis], np.int64))])
    return b.op("Slice", [x], {"axes": [axis], "starts": [start], "ends": [end]})


def _input_rows(la: Layer, x: np.ndarray, chans: slice) -> np.ndarray:
    """The layer's input as rows matching the columns of ``w2`` (im2col for a conv)."""
    if la.op == "MatMul":
        return x.reshape(-1, x.shape[-1])
    if la.op == "Gemm":
        x = x.reshape(x.shape[0], -1) if x.ndim > 2 else x
        return x.T if la.attrs.get("transA", 0) else x
    return _im2col(x[:, chans], la)


def _im2col(x: np.ndarray, la: Layer) -> np.ndarray:
    """[N*out positions, C*prod(kernel)] windows of ``x`` as the Conv reads them (pads, strides, dilations)."""
    a = la.attrs
    k = list(la.w.shape[2:])
    nd = len(k)
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    span = [(kk - 1) * d + 1 for kk, d in zip(k, dil)]
    auto = a.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(nd):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + span[i] - size, 0)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads_b.append(lo)
            pads_e.append(total - lo)
    elif auto == "VALID":
        pads_b = pads_e = [0] * nd
    else:
        pads = list(a.get("pads", [0] * 2 * nd))
        pads_b, pads_e = pads[:nd], pads[nd:]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pb, pe) for pb, pe in zip(pads_b, pads_e)])
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    sl = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, d) for d in dil)
    win = win[sl]  # [N, C, out..., k...]
    perm = [0] + list(range(2, 2 + nd)) + [1] + list(range(2 + nd, 2 + 2 * nd))
    win = win.transpose(perm)
    return win.reshape(-1, x.shape[1] * int(np.prod(k)))
