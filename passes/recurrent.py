"""lower-recurrent: unroll ONNX LSTM, GRU and RNN over a static sequence length into basic ops."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import LoweringError
from graphopt.graph import Graph
from graphopt.ir import IR, GraphSurgeonPass, has_ops
from graphopt.options import Option
from graphopt.passbase import PassContext

from ._emit import Builder, Namer, bind_output, const_value, remove_node, rewrite_graphs, static_dim

log = logging.getLogger("graphopt.passes.recurrent")

RECURRENT_OPS = {"LSTM", "GRU", "RNN"}
#: Gates per op, in the ONNX weight order (LSTM: i o f c; GRU: z r h; RNN: one).
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
#: Activations without parameters, which need no activation_alpha/beta.
_ACTS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}


def activation_names(op: str, activations, nd: int) -> list[str]:
    """The activations of an ``op`` node with ``nd`` directions, canonical (``Sigmoid``/``Tanh``/``Relu``),
    direction after direction, ``len(DEFAULT_ACTIVATIONS[op])`` each, in ONNX order.

    The attribute's strings may be bytes, of any case, or one direction's set for both. ValueError (saying
    what to do) for a wrong count or another activation. Shared with the CPU target's native recurrences
    (``graphopt.targets.recurrent``)."""
    acts = [a.decode() if isinstance(a, bytes) else str(a) for a in activations] or DEFAULT_ACTIVATIONS[op] * nd
    per_dir = len(DEFAULT_ACTIVATIONS[op])
    if len(acts) == per_dir and nd == 2:
        acts = acts * 2
    if len(acts) != per_dir * nd:
        raise ValueError(f"expected {per_dir * nd} activations, got {len(acts)}")
    unknown = sorted({a for a in acts if a.lower() not in _ACTS})
    if unknown:
        raise ValueError(
            f"activation(s) {', '.join(unknown)} are not supported (only Sigmoid, Tanh, Relu); "
            "export the model with the default activations"
        )
    return [_ACTS[a.lower()] for a in acts]


class _Refused(Exception):
    """A node this pass cannot rewrite; the message says why and what to do."""


class LowerRecurrent(GraphSurgeonPass):
    """Unroll LSTM, GRU and RNN nodes over their (static) sequence length into basic ops.

    Each node becomes per-time-step MatMul/Add/Sigmoid/Tanh/Relu/Mul/Where ops
    that TVM's importer and every runtime can take: the input projection of
    all steps is one MatMul, the recurrence one MatMul per step. Covered:
    forward, reverse and bidirectional; ``sequence_lens`` (masks: outputs past
    a sequence's length are zero and Y_h/Y_c hold the state of its last valid
    step); initial states given or absent; any subset of Y/Y_h/Y_c; ``layout``
    0 and 1; LSTM peepholes and ``input_forget``; GRU ``linear_before_reset``
    0 and 1; ``clip``; weights as initializers or computed. Nodes inside
    ``If``/``Loop``/``Scan`` bodies are rewritten too.

    The sequence length must be a known dim of X (fix symbolic input dims with
    ``--input-shape``) and at most ``max_steps``; the unrolled graph checks it
    at run time (a Split with one piece per step fails if the real length
    differs). Activations other than Sigmoid, Tanh and Relu are refused,
    naming the node; all refusals are listed in one error. Everything else
    in the graph is left alone; a graph without these ops is returned as is.
    """

    name = "lower-recurrent"
    lossless = True
    options = (
        Option("max_steps", int, 2048, "refuse nodes whose sequence is longer than this (each step adds ~15 nodes)",
               min=1),
    )

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if not has_ops(graph.graph, RECURRENT_OPS):
            self.note("rewritten", 0)
            return graph
        # X's sequence length comes from inferred shapes (fresh: earlier passes may have left them stale).
        # The unrolled graph re-checks it at run time, so a wrongly inferred length cannot go unnoticed.
        return super().run(graph.infer_shapes(), ctx)

    def rewrite(self, ir: IR, ctx: PassContext) -> None:
        """Unroll every recurrent node of ``ir``, at any depth; reads sequence lengths from the
        tensors' shapes, so ``run`` infers shapes first. Raises LoweringError listing every refusal."""
        refused: list[str] = []

        def rewrite(g: gs.Graph, namer: Namer) -> int:
            n = 0
            for node in [x for x in g.nodes if x.op in RECURRENT_OPS and (x.domain or "") in ("", "ai.onnx")]:
                try:
                    _unroll(g, node, namer, self.opts.max_steps)
                    n += 1
                    log.debug("lower-recurrent: unrolled %s '%s'", node.op, node.name)
                except _Refused as e:
                    refused.append(f"{node.op} '{node.name or node.outputs[0].name}': {e}")
            return n

        count = rewrite_graphs(ir, rewrite)
        if refused:
            hint = f"; {LENGTH_HINT}" if any("sequence length" in r for r in refused) else ""
            raise LoweringError(
                f"{ir.source or 'model'}: lower-recurrent cannot unroll {len(refused)} node(s): "
                + "; ".join(refused) + hint
            )
        self.note("rewritten", count)


def _length_unknown(x: gs.Tensor, axis: int) -> str:
    """Why the sequence length of ``x`` is unknown, and what to do about it."""
    if x.shape is None or axis >= len(x.shape):
        return f"the shape of its input '{x.name}' is unknown, so its sequence length (dim {axis}) is too"
    return f"its sequence length (dim {axis} of input '{x.name}', shape {list(x.shape)}) is not static"


#: Said once after the list of refused nodes when any of them has an unknown sequence length.
LENGTH_HINT = ("fix the model's symbolic input dims with --input-shape NAME:D1,D2,... and let fold-constants "
               "(cleanup) run first so the shape computations feeding these inputs fold")


def _direction_count(direction: str) -> int:
    return 2 if direction == "bidirectional" else 1


def _unroll(g: gs.Graph, node: gs.Node, namer: Namer, max_steps: int) -> None:
    op = node.op
    attrs = node.attrs
    gates = GATES[op]
    ins = list(node.inputs) + [gs.Variable.empty()] * (8 - len(node.inputs))
    x, w, r, bias, seq_lens, init_h = ins[:6]
    init_c = ins[6] if op == "LSTM" else None
    peep = ins[7] if op == "LSTM" else None
    present = lambda t: t is not None and t.name != ""  # noqa: E731

    direction = attrs.get("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction not in ("forward", "reverse", "bidirectional"):
        raise _Refused(f"unknown direction '{direction}'")
    nd = _direction_count(direction)
    layout = int(attrs.get("layout", 0))
    hidden = attrs.get("hidden_size")
    if hidden is None:
        hidden = static_dim(r, 2)
    if hidden is None:
        raise _Refused("hidden_size is not given and R's shape is unknown")
    hidden = int(hidden)
    clip = attrs.get("clip")
    input_forget = int(attrs.get("input_forget", 0)) if op == "LSTM" else 0
    lbr = int(attrs.get("linear_before_reset", 0)) if op == "GRU" else 0

    try:
        acts = activation_names(op, attrs.get("activations", []), nd)
    except ValueError as e:
        raise _Refused(str(e)) from None
    per_dir = len(DEFAULT_ACTIVATIONS[op])

    time_axis = 1 if layout else 0
    steps = static_dim(x, time_axis)
    if steps is None:
        raise _Refused(_length_unknown(x, time_axis))
    if steps > max_steps:
        raise _Refused(f"its sequence length {steps} is over lower-recurrent(max_steps={max_steps})")

    wv, rv, bv, pv = const_value(w), const_value(r), const_value(bias) if present(bias) else None, None
    if present(peep):
        pv = const_value(peep)
    dtype = None
    for cand in (wv, rv):
        if cand is not None:
            dtype = cand.dtype
            break
    if dtype is None:
        dtype = x.dtype if x.dtype is not None else (w.dtype if w.dtype is not None else None)
    if dtype is None:
        raise _Refused("the element type of X and W is unknown (run shape inference, or give W as an initializer)")
    dtype = np.dtype(dtype)

    prefix = node.name or node.outputs[0].name
    b = Builder(g, namer, prefix, dtype)
    outs = remove_node(node, g)
    outs += [gs.Variable.empty()] * (3 - len(outs))
    H = hidden

    xs = b.op("Transpose", [x], {"perm": [1, 0, 2]}) if layout else x  # [T, B, I]

    seq = None
    if present(seq_lens):
        sv = const_value(seq_lens)
        if sv is None or not np.all(sv == steps):
            seq = b.op("Cast", [seq_lens], {"to": 7})  # int64
            # masks[t, b] = t < seq_lens[b], shaped [T, B, 1] so it broadcasts over hidden units
            less = b.op("Less", [b.const(np.arange(steps, dtype=np.int64).reshape(steps, 1)), b.reshape(seq, [1, -1])])
            seq = b.op("Reshape", [less, b.const(np.array([steps, -1, 1], np.int64))])

    def pick(t, tv, d, transpose: bool):
        """Direction ``d`` of a [nd, ...] weight, transposed to [in, out] when asked."""
        if tv is not None:
            arr = tv[d]
            return b.const(arr.T if transpose else arr)
        piece = b.gather(t, d, 0)
        return b.op("Transpose", [piece], {"perm": [1, 0]}) if transpose else piece

    def bias_parts(d):
        """(Wb, Rb) of direction d as constants/tensors of shape [G*H], or (None, None)."""
        if not present(bias):
            return None, None
        if bv is not None:
            return bv[d, : gates * H], bv[d, gates * H:]
        row = b.gather(bias, d, 0)
        wb, rb = b.split(row, [gates * H, gates * H], 0)
        return wb, rb

    def act(name, t):
        return b.op(name, [t])

    def clipped(t):
        return b.clip(t, float(clip)) if clip is not None else t

    y_dirs, h_dirs, c_dirs = [], [], []
    for d in range(nd):
        reverse = direction == "reverse" or d == 1
        f_act, g_act, h_act = (acts[d * per_dir: (d + 1) * per_dir] + [None, None])[:3]
        wt = pick(w, wv, d, True)       # [I, G*H]
        rt = pick(r, rv, d, True)       # [H, G*H]
        wb, rb = bias_parts(d)
        rbh = None  # GRU linear_before_reset: R's h bias stays inside r * (...)
        if wb is not None:
            if isinstance(wb, np.ndarray):
                xb = wb + rb
                if op == "GRU" and lbr:
                    xb = wb.copy()
                    xb[: 2 * H] += rb[: 2 * H]
                    rbh = b.const(rb[2 * H:])
                xb = b.const(xb)
            else:
                if op == "GRU" and lbr:
                    rzr, rbh = b.split(rb, [2 * H, H], 0)
                    xb = b.add(wb, b.op("Concat", [rzr, b.const(np.zeros(H, dtype))], {"axis": 0}))
                else:
                    xb = b.add(wb, rb)
        else:
            xb = None
        proj = b.matmul(xs, wt)  # [T, B, G*H]
        if xb is not None:
            proj = b.add(proj, xb)
        pieces = b.split(proj, [1] * steps, 0)
        x_t = [b.reshape(p, [-1, gates * H]) for p in pieces]

        # initial states are [nd, B, H], or [B, nd, H] with layout=1
        h = b.gather(init_h, d, time_axis) if present(init_h) else None
        c = b.gather(init_c, d, time_axis) if op == "LSTM" and present(init_c) else None
        if op == "LSTM" and present(peep):
            if pv is not None:
                p_i, p_o, p_f = (b.const(pv[d, k * H:(k + 1) * H]) for k in range(3))
            else:
                p_i, p_o, p_f = b.split(b.gather(peep, d, 0), [H, H, H], 0)
        else:
            p_i = p_o = p_f = None
        if op == "GRU" and not lbr:
            if rv is not None:
                rt_zr, rt_h = b.const(rv[d, : 2 * H].T), b.const(rv[d, 2 * H:].T)
            else:
                rt_zr, rt_h = b.split(rt, [2 * H, H], 1)
        y_t: list = [None] * steps
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        for t in order:
            xt = x_t[t]
            if op == "RNN":
                pre = xt if h is None else b.add(xt, b.matmul(h, rt))
                h_new, c_new = act(f_act, clipped(pre)), None
            elif op == "LSTM":
                pre = xt if h is None else b.add(xt, b.matmul(h, rt))
                gi, go, gf, gc = b.split(pre, [H] * 4, 1)
                if p_i is not None and c is not None:
                    gi = b.add(gi, b.mul(p_i, c))
                    gf = b.add(gf, b.mul(p_f, c))
                i_g = act(f_act, clipped(gi))
                f_g = b.sub(b.const(1.0), i_g) if input_forget else act(f_act, clipped(gf))
                c_new = b.mul(i_g, act(g_act, clipped(gc)))
                if c is not None:
                    c_new = b.add(b.mul(f_g, c), c_new)
                if p_o is not None:
                    go = b.add(go, b.mul(p_o, c_new))
                o_g = act(f_act, clipped(go))
                h_new = b.mul(o_g, act(h_act, c_new))
            else:  # GRU
                xzr, xh = b.split(xt, [2 * H, H], 1)
                if lbr:
                    if h is not None:
                        rzr, rh = b.split(b.matmul(h, rt), [2 * H, H], 1)
                        if rbh is not None:
                            rh = b.add(rh, rbh)
                        zr = act(f_act, clipped(b.add(xzr, rzr)))
                    else:
                        rh = rbh
                        zr = act(f_act, clipped(xzr))
                    z, rg = b.split(zr, [H, H], 1)
                    hh_pre = xh if rh is None else b.add(xh, b.mul(rg, rh))
                else:
                    zr = act(f_act, clipped(xzr if h is None else b.add(xzr, b.matmul(h, rt_zr))))
                    z, rg = b.split(zr, [H, H], 1)
                    hh_pre = xh if h is None else b.add(xh, b.matmul(b.mul(rg, h), rt_h))
                hh = act(g_act, clipped(hh_pre))
                # H_t = (1 - z) * hh + z * H_{t-1}
                h_new = b.sub(hh, b.mul(z, hh)) if h is None else b.add(hh, b.mul(z, b.sub(h, hh)))
                c_new = None
            if seq is not None:
                m = b.gather(seq, t, 0)  # [B, 1] bool
                zero = b.const(np.zeros((), dtype))
                y_t[t] = h_new  # masked once, after the steps are stacked (below)
                h = b.op("Where", [m, h_new, zero if h is None else h])
                if c_new is not None:
                    c = b.op("Where", [m, c_new, zero if c is None else c])
            else:
                y_t[t] = h_new
                h = h_new
                c = c_new
        if outs[0].name:
            cat = b.op("Concat", y_t, {"axis": 0}) if steps > 1 else y_t[0]  # [T*B, H]
            if seq is not None:
                # Outputs past a sequence's length are zero: one Where over all steps, not one per step
                # (a Where per step fused with the Concat into one kernel of a hundred-odd ops, which took
                # LLVM minutes to compile).
                cat = b.op("Where", [seq, b.reshape(cat, [steps, -1, H]), b.const(np.zeros((), dtype))])
            y_dirs.append(b.reshape(cat, [steps, 1, -1, H]))
        h_dirs.append(h)
        c_dirs.append(c)

    def stack_dirs(parts, shape):
        parts = [b.reshape(p, shape) for p in parts]
        return b.op("Concat", parts, {"axis": 0 if len(shape) == 3 else 1}) if len(parts) > 1 else parts[0]

    if outs[0].name:
        y = b.op("Concat", y_dirs, {"axis": 1}) if nd > 1 else y_dirs[0]  # [T, nd, B, H]
        if layout:
            y = b.op("Transpose", [y], {"perm": [2, 0, 1, 3]})
        bind_output(b, y, outs[0])
    for k, states in ((1, h_dirs), (2, c_dirs)):
        if not outs[k].name:
            continue
        s = stack_dirs(states, [1, -1, H])  # [nd, B, H]
        if layout:
            s = b.op("Transpose", [s], {"perm": [1, 0, 2]})
        bind_output(b, s, outs[k])
