"""ONNX LSTM, GRU and RNN imported whole: one GEMM for the input projection, one native kernel for the recurrence.

The ``lower-recurrent`` pass unrolls a recurrence into ~16 ONNX ops per time
step, which any backend can take but which costs what a deployment notices: a
bi-GRU of 64 steps becomes ~2000 nodes, a kernel launch per node per step, and
a compile time that grows with the sequence (tashkeel's nine bi-GRUs: 19,000
nodes, 46 s of LLVM, 2.2x ONNX Runtime's latency). The CPU target instead
imports these ops directly (a converter added to TVM's ONNX importer, see
:func:`converters`):

    xw   = X W^T + Wb                                  # Relax matmul: scheduled as a GEMM, W^T prepacked
    y, yh, yc = recurrence(xw, R^T, Rb, P, h0, c0, lens)   # call_tir of one TIR function per configuration

where the recurrence is ``recurrent.c`` (sequential in time; per step and
batch row a matrix-vector product, the gate activations as vectorized float32
polynomials, the state update), called once per direction, the directions in
parallel. Everything ONNX defines is covered as ``lower-recurrent`` covers it
(forward/reverse/bidirectional, ``sequence_lens``, initial states, layout 0
and 1, LSTM peepholes and ``input_forget``, GRU ``linear_before_reset`` 0/1,
``clip``, Sigmoid/Tanh/Relu activations), and more: the sequence length and
the batch may be symbolic. float16/bfloat16 recurrences compute in float32;
float64 ones are refused (``lower-recurrent`` first keeps them in float64).

The kernel's C source is compiled twice: for AVX2+FMA (x86-64) and for the
baseline ISA; :func:`variant` picks the one the target CPU runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graphopt.passes.recurrent import DEFAULT_ACTIVATIONS, GATES, RECURRENT_OPS, activation_names

OPS = tuple(sorted(RECURRENT_OPS))
SOURCE = Path(__file__).with_name("recurrent.c")
SYMBOL = "graphopt_recurrence_f32_{variant}"
_KIND = {"RNN": 0, "GRU": 1, "LSTM": 2}
#: The kernel's activation codes (recurrent_body.h's go_act).
_ACT_CODE = {"Sigmoid": 0, "Tanh": 1, "Relu": 2}
_FLT_MAX = 3.4028234663852886e38


def variant(features) -> str:
    """The kernel variant for a CPU with LLVM ``features``: ``avx2`` (with FMA) or ``generic``."""
    return "avx2" if {"avx2", "fma"} <= set(features) else "generic"


def kernel_object(scratch: Path) -> Path:
    """``recurrent.c`` compiled into ``scratch``.

    ``-fno-trapping-math``: the activations' clamps and NaN checks are selects; with trapping math on,
    GCC keeps them as branches (a comparison may raise a floating-point flag) and the loops stay scalar.
    """
    from .cc import compile_object

    return compile_object(SOURCE, scratch, flags=("-fno-trapping-math",))


class _Refused(ValueError):
    """An LSTM/GRU/RNN node this importer cannot take; the message names it and says what to do."""


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _static(value, what: str, node: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _Refused(f"{node}: {what} must be static, got {value}") from None


def _recurrence_primfunc(symbol: str, kind: int, nd: int, hidden: int, gates: int, reverse: str,
                         lbr: int, input_forget: int, acts: list[list[int]], clip: float, has: tuple):
    """TIR function calling the C kernel once per direction (in parallel); ``t`` and ``b`` symbolic."""
    from tvm.script import parser

    T = __import__("tvm.script.tirx", fromlist=["tirx"])
    gh, work = gates * hidden, 2 * gates * hidden + hidden

    def per_dir(values):  # an int32 expression of the direction d
        if nd == 1 or values[0] == values[1]:
            return f"T.int32({values[0]})"
        return f"T.Select(d == 0, T.int32({values[0]}), T.int32({values[1]}))"

    rev = {"forward": "T.int32(0)", "reverse": "T.int32(1)", "bidirectional": "T.Cast('int32', d)"}[reverse]
    act_f, act_g, act_h = (per_dir([a[i] for a in acts]) for i in range(3))
    src = f'''
@T.prim_func(private=True)
def recurrence(xw: T.handle, rt: T.Buffer(({nd}, {hidden}, {gh}), "float32"), rb: T.Buffer(({nd}, {gh}), "float32"),
               p: T.Buffer(({nd}, {3 * hidden}), "float32"), h0: T.handle, c0: T.handle, lens: T.handle,
               y: T.handle, yh: T.handle, yc: T.handle, work: T.Buffer(({nd}, {work}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    t = T.int64()
    b = T.int64()
    nh = T.int64()
    nc = T.int64()
    nl = T.int64()
    XW = T.match_buffer(xw, (t, b, {nd}, {gh}), "float32")
    H0 = T.match_buffer(h0, (nh,), "float32")
    C0 = T.match_buffer(c0, (nc,), "float32")
    L = T.match_buffer(lens, (nl,), "int32")
    Y = T.match_buffer(y, (t, {nd}, b, {hidden}), "float32")
    YH = T.match_buffer(yh, ({nd}, b, {hidden}), "float32")
    YC = T.match_buffer(yc, ({nd}, b, {hidden}), "float32")
    for d in T.parallel({nd}):
        T.evaluate(T.call_extern("int32", "{symbol}", T.int32({kind}), XW.data, rt.data, rb.data, p.data,
            H0.data, C0.data, L.data, Y.data, YH.data, YC.data, work.data, T.Cast("int64", d), T.int64({nd}),
            t, b, T.int64({hidden}), T.int32({has[0]}), T.int32({has[1]}), T.int32({has[2]}), {rev},
            T.int32({lbr}), T.int32({input_forget}), {act_f}, {act_g}, {act_h}, T.float32({clip!r})))
'''
    return parser.parse(src, extra_vars={"T": T})


def _convert(op: str, bb, inputs, attr, symbol: str, used: list):
    """The Relax expression (a Tuple: Y, Y_h[, Y_c]) of one ONNX ``op`` node."""
    from tvm import relax

    name = f"{op} '{attr.get('tvm_custom', {}).get('name') or '?'}'"
    ins = list(inputs) + [None] * (8 - len(inputs))
    x, w, r, bias, lens, h0 = ins[:6]
    c0 = ins[6] if op == "LSTM" else None
    peep = ins[7] if op == "LSTM" else None
    direction = _text(attr.get("direction", "forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        raise _Refused(f"{name}: unknown direction '{direction}'")
    nd = 2 if direction == "bidirectional" else 1
    layout = int(attr.get("layout", 0))
    gates = GATES[op]

    dtype = str(x.ty.dtype)
    if dtype == "float64":
        raise _Refused(f"{name}: float64 recurrences are not compiled natively; add 'lower-recurrent' to the "
                       "pipeline (it unrolls them into float64 ops)")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise _Refused(f"{name}: element type {dtype} is not supported (float32, float16, bfloat16)")

    def f32(e):
        return e if e is None or str(e.ty.dtype) == "float32" else bb.emit(relax.op.astype(e, "float32"))

    x, w, r, bias, h0, c0, peep = (f32(e) for e in (x, w, r, bias, h0, c0, peep))
    r_shape = [_static(v, "R's shape", name) for v in r.ty.shape.values]
    hidden = int(attr["hidden_size"]) if "hidden_size" in attr else r_shape[2]
    gh = gates * hidden
    if r_shape != [nd, gh, hidden]:
        raise _Refused(f"{name}: R has shape {r_shape}, expected {[nd, gh, hidden]}")

    try:
        codes = [_ACT_CODE[a] for a in activation_names(op, attr.get("activations", ()), nd)]
    except ValueError as e:
        raise _Refused(f"{name}: {e}") from None
    per_dir = len(DEFAULT_ACTIVATIONS[op])
    acts = [(codes[d * per_dir: (d + 1) * per_dir] + [0, 0])[:3] for d in range(nd)]
    clip = float(attr["clip"]) if attr.get("clip") is not None else _FLT_MAX
    if not clip > 0:
        raise _Refused(f"{name}: clip must be positive, got {clip}")
    lbr = int(attr.get("linear_before_reset", 0)) if op == "GRU" else 0
    input_forget = int(attr.get("input_forget", 0)) if op == "LSTM" else 0

    emit = bb.emit
    if layout:
        x = emit(relax.op.permute_dims(x, [1, 0, 2]))  # [T, B, I]
    t_len, batch = x.ty.shape.values[0], x.ty.shape.values[1]
    w_in = _static(w.ty.shape.values[2], "W's input size", name)
    # X W^T for every direction at once: [T, B, I] x [I, nd*G*H] (the transposed weight is prepacked).
    wt = emit(relax.op.reshape(emit(relax.op.permute_dims(w, [2, 0, 1])), [w_in, nd * gh]))
    xw = emit(relax.op.matmul(x, wt))
    if bias is not None:
        wb = emit(relax.op.strided_slice(bias, axes=[1], begin=[0], end=[gh]))
        xw = emit(relax.op.add(xw, emit(relax.op.reshape(wb, [nd * gh]))))
        rb = emit(relax.op.strided_slice(bias, axes=[1], begin=[gh], end=[2 * gh]))
    else:
        rb = relax.const(np.zeros((nd, gh), np.float32))
    rt = emit(relax.op.permute_dims(r, [0, 2, 1]))  # [nd, H, G*H]
    p = peep if peep is not None else relax.const(np.zeros((nd, 3 * hidden), np.float32))
    dummy = relax.const(np.zeros((1,), np.float32))

    def state(s):
        if s is None:
            return dummy
        if layout:  # [B, nd, H] -> [nd, B, H]
            s = emit(relax.op.permute_dims(s, [1, 0, 2]))
        return emit(relax.op.reshape(s, [-1]))

    has = (int(h0 is not None), int(c0 is not None), int(lens is not None))
    lens_arg = emit(relax.op.astype(lens, "int32")) if lens is not None else relax.const(np.zeros((1,), np.int32))
    func = _recurrence_primfunc(symbol, _KIND[op], nd, hidden, gates, direction, lbr, input_forget, acts,
                                clip, has)
    gv = bb.add_func(func, f"recurrence_{op.lower()}")
    out_types = [relax.TensorType([t_len, nd, batch, hidden], "float32"),
                 relax.TensorType([nd, batch, hidden], "float32"),
                 relax.TensorType([nd, batch, hidden], "float32"),
                 relax.TensorType([nd, 2 * gh + hidden], "float32")]
    res = emit(relax.call_tir(gv, [emit(relax.op.reshape(xw, [t_len, batch, nd, gh])), rt, rb, p,
                                   state(h0), state(c0), lens_arg], out_types))
    used.append(name)
    y, yh, yc = (emit(relax.TupleGetItem(res, i)) for i in range(3))
    if layout:
        y = emit(relax.op.permute_dims(y, [2, 0, 1, 3]))  # [B, T, nd, H]
        yh = emit(relax.op.permute_dims(yh, [1, 0, 2]))
        yc = emit(relax.op.permute_dims(yc, [1, 0, 2]))
    if dtype != "float32":
        y, yh, yc = (emit(relax.op.astype(e, dtype)) for e in (y, yh, yc))
    return relax.Tuple([y, yh, yc] if op == "LSTM" else [y, yh])


def converters(features, used: list) -> dict:
    """``{op: converter class}`` for TVM's ONNX importer, calling the kernel variant for ``features``.

    Every converted node's name is appended to ``used`` (the caller links the kernel when it is not empty).
    """
    from tvm.relax.frontend.onnx import onnx_frontend

    symbol = SYMBOL.format(variant=variant(features))

    def make(op):
        def impl(cls, bb, inputs, attr, params):
            return _convert(op, bb, inputs, attr, symbol, used)

        return type(f"Native{op}", (onnx_frontend.OnnxOpConverter,),
                    {"_impl_v1": classmethod(impl), "__doc__": f"ONNX {op} through graphopt's recurrence kernel."})

    return {op: make(op) for op in OPS}
