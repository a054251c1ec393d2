"""Cut the ``tpu`` target's regions out of a Relax program: matmul / conv2d with a constant weight.

Two steps, both on ``main`` as :func:`graphopt.relax.import_graph` made it (weights are parameters):

1. ``relax.transform.FuseOpsByPattern`` with ``relax.dpl`` patterns named ``tpu.*`` groups every
   ``matmul(x, W)`` / ``matmul(x, permute_dims(W))`` / ``conv2d(x, W)`` that :func:`analyze` accepts into a
   composite function (its ``check`` runs the same analysis, so a rejected match stays a plain host op);
2. :func:`partition` then replaces each call of such a composite function by

       acc = R.call_dps_packed("graphopt.tpu.run", (blob, a, b), out)      # the array (simulated)
       y   = astype(acc, float32) * (s_a * s_w)                             # int8 only: host epilogue

   where ``blob`` is a uint8 constant: :data:`BLOB_HEADER` (region id, flags) + ``isa.encode(region,
   config)``. For an int8 region (``matmul(dequantize(q_a), dequantize(q_w))``, q_a per tensor uint8/int8,
   q_w a constant int8 weight per tensor or per output channel), ``a``/``b`` are the integer codes and the
   zero points travel in the region, so its int32 result is exact; only the final scaling is float. For a
   bf16 region (a float32 matmul / conv whose weight is a parameter or constant), ``a``/``b`` are the float
   tensors, rounded to bf16 by the array.

A transposed weight (Gemm's ``transB``) that is a constant is transposed here, once; one that is a
parameter reaches the array as it is stored and the blob's :data:`FLAG_B_TRANSPOSED` tells the run-time function to
read it as ``[K, N]`` (a view, no copy). Everything else (grouped / depthwise convs, matmuls of two
activations, other dtypes, dynamic K or N, NHWC) stays on the host; :func:`host_ops` lists it with reasons.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from . import isa

#: The run-time function every region calls (registered by ``TpuTarget.load_programs``).
RUN_FUNC = "graphopt.tpu.run"
#: What precedes ``isa.encode``'s bytes in a blob: region id, flags (little endian uint32 each).
BLOB_HEADER = struct.Struct("<II")
#: Flag: ``b`` arrives as the stored ``[N, K]`` weight; read it as its transpose.
FLAG_B_TRANSPOSED = 1


def make_blob(region_id: int, flags: int, region, config) -> bytes:
    return BLOB_HEADER.pack(region_id, flags) + isa.encode(region, config)


def read_blob(blob) -> tuple[int, int, bytes]:
    """``(region id, flags, program bytes)`` of a blob (bytes or a uint8 array)."""
    raw = bytes(memoryview(np.ascontiguousarray(blob)).cast("B")) if not isinstance(blob, bytes) else blob
    rid, flags = BLOB_HEADER.unpack_from(raw)
    return rid, flags, raw[BLOB_HEADER.size:]


@dataclass
class Plan:
    """What :func:`analyze` decided for one matmul / conv2d."""

    kind: str  #: 'gemm' | 'conv'
    dtype: str  #: 'int8' | 'bf16'
    region: object  #: isa.GemmRegion | isa.ConvRegion
    a: object  #: the activation expression the array reads (codes for int8)
    b: object  #: the weight expression (codes for int8), [K, N] / [O, C, KH, KW] unless ``transposed``
    transposed: bool = False
    scale: object = None  #: int8: the float32 scale expression (s_a * s_w), broadcast over the output
    out_shape: list = field(default_factory=list)
    k: int = 0
    n: int = 0
    m: int | None = None
    macs: int | None = None  #: None when M is symbolic
    macs_per_row_unit: int = 0  #: MACs with every symbolic dim taken as 1


def _name(expr) -> str:
    return getattr(getattr(expr, "op", None), "name", "") if type(expr).__name__ == "Call" else ""


def _is_const(expr) -> bool:
    return type(expr).__name__ in ("GenericConst", "Constant")


def _shape(expr):
    values = getattr(getattr(getattr(expr, "ty", None), "shape", None), "values", None)
    return None if values is None else list(values)


def _int(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _dtype(expr) -> str:
    return str(getattr(getattr(expr, "ty", None), "dtype", ""))


def _const_array(expr):
    return expr.value.numpy() if _is_const(expr) else None


def _is_weight(expr, params: set) -> bool:
    """A constant, or one of ``main``'s weight parameters (not an input, not a computed value)."""
    return _is_const(expr) or (type(expr).__name__ == "Var" and expr in params)


def _prod(dims) -> tuple[int | None, int]:
    """(product of dims or None if one is symbolic, product with symbolic dims as 1)."""
    exact, unit = 1, 1
    for d in dims:
        v = _int(d)
        if v is None:
            exact = None
        else:
            unit *= v
            exact = None if exact is None else exact * v
    return exact, unit


class Reject(Exception):
    """Why a matmul / conv stays on the host."""


def analyze(op: str, attrs, a, b, out_ty, lookup, params: set, config, float_regions: bool) -> Plan:
    """The region for ``op(a, b)`` (``b`` possibly ``permute_dims(W)``), or :class:`Reject` with the reason.

    ``lookup(var)`` returns the value a dataflow var is bound to (None for parameters)."""
    def bound(expr, name):
        e = lookup(expr) if type(expr).__name__ in ("Var", "DataflowVar") else expr
        return e if e is not None and _name(e) == name else None

    out_shape = _shape_of_ty(out_ty)
    if out_shape is None:
        raise Reject("output shape unknown")
    out_dtype = str(getattr(out_ty, "dtype", ""))
    if out_dtype != "float32":
        raise Reject(f"output dtype {out_dtype}")
    transposed = False
    if op == "relax.matmul":
        perm = bound(b, "relax.permute_dims")
        if perm is not None:
            axes = perm.attrs.axes
            w_shape = _shape(perm.args[0])
            if w_shape is None or len(w_shape) != 2 or (axes is not None and [int(x) for x in axes] != [1, 0]):
                raise Reject("weight permutation is not a 2-D transpose")
            b, transposed = perm.args[0], True
    else:
        if int(attrs.groups) != 1:
            raise Reject(f"grouped conv (groups={int(attrs.groups)})")
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
        if layouts != ("NCHW", "OIHW", "NCHW"):
            raise Reject(f"conv layout {'/'.join(layouts)}")
    dqa, dqw = bound(a, "relax.dequantize"), bound(b, "relax.dequantize")
    if dqa is not None and dqw is not None:
        return _int8_plan(op, attrs, dqa, dqw, transposed, out_shape, params, config)
    if dqw is not None and dqa is None:
        # A dequantized weight times an activation that is not a per-tensor dequantize right here (a float
        # activation of a weight-only layer, or one scaled / transposed on the way: Gemm alpha, transA).
        raise Reject("quantized weight with an activation that is not dequantized per tensor right before it")
    if not float_regions:
        raise Reject("float region (float_regions=false)")
    if _dtype(a) != "float32" or _dtype(b) != "float32":
        raise Reject(f"operand dtypes {_dtype(a)} x {_dtype(b)}")
    if not _is_weight(b, params):
        raise Reject("weight is not a constant or a parameter (a product of two activations)")
    return _plan(op, attrs, "bf16", a, b, transposed, out_shape, config)


def _shape_of_ty(ty):
    values = getattr(getattr(ty, "shape", None), "values", None)
    return None if values is None else list(values)


def _plan(op, attrs, dtype, a, b, transposed, out_shape, config, **region_kw) -> Plan:
    a_shape, b_shape = _shape(a), [_int(d) for d in (_shape(b) or [])]
    if a_shape is None:
        raise Reject("activation rank unknown")
    if op == "relax.matmul":
        if len(b_shape) != 2 or None in b_shape:
            raise Reject("weight is not a static 2-D matrix")
        if len(a_shape) < 2:
            raise Reject("activation is a vector")
        k, n = (b_shape[1], b_shape[0]) if transposed else b_shape
        if _int(a_shape[-1]) != k:
            raise Reject("K does not match")
        region = isa.GemmRegion(dtype=dtype, k=k, n=n, **region_kw)
        m_exact, m_unit = _prod(out_shape[:-1])
    else:
        if len(b_shape) != 4 or None in b_shape or len(a_shape) != 4:
            raise Reject("conv weight or input is not static 4-D")
        o, c, kh, kw = b_shape
        if _int(a_shape[1]) != c:
            raise Reject("conv channels do not match")
        region = isa.ConvRegion(dtype=dtype, c=c, o=o, kh=kh, kw=kw,
                                strides=tuple(int(v) for v in attrs.strides),
                                pads=tuple(int(v) for v in attrs.padding),
                                dilations=tuple(int(v) for v in attrs.dilation), **region_kw)
        k, n = region.k, region.n
        m_exact, m_unit = _prod([out_shape[0], *out_shape[2:]])
    try:
        region.check()
        isa.encode(region, config)
    except ValueError as e:
        raise Reject(str(e)) from None
    return Plan(kind="gemm" if op == "relax.matmul" else "conv", dtype=dtype, region=region, a=a, b=b,
                transposed=transposed, out_shape=out_shape, k=k, n=n, m=m_exact,
                macs=None if m_exact is None else m_exact * k * n, macs_per_row_unit=m_unit * k * n)


def _scalar_int(expr):
    v = _const_array(expr)
    return None if v is None or v.size != 1 else int(v.reshape(()))


def _int8_plan(op, attrs, dqa, dqw, transposed, out_shape, params, config) -> Plan:
    qa, sa, za = dqa.args
    qw, sw, zw = dqw.args
    a_dt, w_dt = _dtype(qa), _dtype(qw)
    if a_dt not in ("uint8", "int8") or w_dt not in ("uint8", "int8"):
        raise Reject(f"quantized dtypes {a_dt} x {w_dt}")
    if not _is_const(qw):
        raise Reject("quantized weight is not a constant")
    if _shape(sa) != [] or _shape(za) != []:
        raise Reject("activation quantized per axis")
    a_zero = _scalar_int(za)
    if a_zero is None:
        raise Reject("activation zero point not a constant")
    if _dtype(sa) != "float32" or _dtype(sw) != "float32":
        raise Reject("scales are not float32")
    w_shape = [_int(d) for d in (_shape(qw) or [])]
    conv = op != "relax.matmul"
    n = (w_shape[0] if (transposed or conv) else w_shape[-1]) if w_shape else None
    # The weight's per-channel axis must be its output-channel axis.
    n_axis = 0 if (transposed or conv) else 1
    w_axis = int(dqw.attrs.axis) % max(len(w_shape), 1)
    for p in (sw, zw):
        shape = _shape(p)  # [] for a scalar (per tensor); None when unknown
        ps = [None] if shape is None else [_int(d) for d in shape]
        if not (ps == [] or (ps == [n] and w_axis == n_axis)):
            raise Reject("weight scale / zero point is neither per tensor nor per output channel")
    zw_val = _const_array(zw)
    if zw_val is None:
        raise Reject("weight zero point not a constant")
    zs = [int(v) for v in np.asarray(zw_val).reshape(-1)]
    b_zero = zs[0] if len(set(zs)) == 1 else tuple(zs)
    qw_val = _const_array(qw)
    b = qw
    if transposed:  # a constant: transposed here, once
        from tvm import relax

        b = relax.const(np.ascontiguousarray(qw_val.T), w_dt)
        transposed = False
    plan = _plan(op, attrs, "int8", qa, b, False, out_shape, config,
                 a_signed=a_dt == "int8", b_signed=w_dt == "int8", a_zero=a_zero, b_zero=b_zero)
    from tvm import relax

    R = relax.op
    swf = sw if _shape(sw) == [] else (R.reshape(sw, [1, n, 1, 1]) if conv else sw)
    plan.scale = R.multiply(sa, swf)
    return plan


# ----------------------------------------------------------------------------------------------------- patterns
def patterns(check):
    """The ``tpu.*`` fusion patterns; ``check(op_name, ctx)`` decides each match."""
    from tvm.relax.dpl import is_op, wildcard
    from tvm.relax.transform import FusionPattern

    w = wildcard()
    perm = is_op("relax.permute_dims")(w)
    mm_t = is_op("relax.matmul")(wildcard(), perm)
    mm = is_op("relax.matmul")(wildcard(), wildcard())
    conv = is_op("relax.nn.conv2d")(wildcard(), wildcard())
    return [
        FusionPattern("tpu.matmul_transposed", mm_t, {"root": mm_t, "perm": perm},
                      lambda ctx: check("relax.matmul", ctx)),
        FusionPattern("tpu.matmul", mm, {"root": mm}, lambda ctx: check("relax.matmul", ctx)),
        FusionPattern("tpu.conv2d", conv, {"root": conv}, lambda ctx: check("relax.nn.conv2d", ctx)),
    ]


def _bindings(func) -> dict:
    """var -> bound value of every binding in a Relax function."""
    from tvm import relax

    out = {}
    body = func.body
    if isinstance(body, relax.SeqExpr):
        for block in body.blocks:
            for bnd in block.bindings:
                if isinstance(bnd, relax.VarBinding):
                    out[bnd.var] = bnd.value
    return out


@dataclass
class Result:
    regions: list  #: manifest entries of the regions offloaded
    host: list  #: manifest entries of the matmuls / convs left on the host (with the reason)

    @property
    def offloaded_macs(self) -> int:
        return sum(r["macs"] if r["macs"] is not None else r["macs_per_unit"] for r in self.regions)

    @property
    def host_macs(self) -> int:
        return sum(h["macs"] if h["macs"] is not None else h["macs_per_unit"] for h in self.host)


def partition(mod, config, float_regions: bool = True):
    """``(module with every offloadable matmul / conv replaced by a tpu.run call, Result)``."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    main = mod["main"]
    n_inputs = int(main.attrs["num_input"]) if main.attrs is not None and "num_input" in main.attrs else 0
    params = set(list(main.params)[n_inputs:])
    orig = _bindings(main)

    def check(op, ctx):
        call = ctx.matched_expr
        b = call.args[1]
        try:
            analyze(op, call.attrs, call.args[0], b, call.ty, orig.get, params, config, float_regions)
        except Reject:
            return False
        except Exception:  # noqa: BLE001 - a form analyze does not know: stays on the host
            return False
        return True

    fused = relax.transform.FuseOpsByPattern(patterns(check), bind_constants=True, annotate_codegen=False)(mod)
    regions, host = [], []
    fmain = fused["main"]
    params = set(list(fmain.params)[n_inputs:])
    composites = {gv: f for gv, f in fused.functions_items()
                  if isinstance(f, relax.Function) and f.attrs is not None and "Composite" in f.attrs}

    @mutator
    class _Replace(PyExprMutator):
        def _lookup(self, var):
            try:
                return self.lookup_binding(var)
            except Exception:  # noqa: BLE001
                return None

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, relax.GlobalVar) or call.op not in composites:
                return call
            func = composites[call.op]
            sub = dict(zip(func.params, call.args))
            inner = _bindings(func)
            root = [v for v in inner.values() if _name(v) in ("relax.matmul", "relax.nn.conv2d")][-1]

            def arg(e):  # a composite param -> the call's argument; an inner var -> its value, substituted
                if e in sub:
                    return sub[e]
                if e in inner:
                    v = inner[e]
                    return relax.Call(v.op, [arg(x) for x in v.args], v.attrs) if isinstance(v, relax.Call) else v
                return e

            a, b = arg(root.args[0]), root.args[1]
            b_expr = arg(b) if b not in inner else None
            perm = inner.get(b)
            lookup = self._lookup

            def look(v):  # a permute_dims inside the composite is seen as the bound value of its var
                return perm_call if (perm is not None and v is b_key) else lookup(v)

            if perm is not None:
                perm_call = relax.Call(perm.op, [arg(x) for x in perm.args], perm.attrs)
                b_key = relax.Var("tpu_perm", perm.ty)
                b_expr = b_key
            else:
                perm_call, b_key = None, None
            try:
                plan = analyze(_name(root), root.attrs, a, b_expr, call.ty, look, params, config, float_regions)
            except Exception:  # noqa: BLE001 - accepted by check, refused here: keep the host op (inline it)
                return relax.Call(root.op, [a, perm_call if perm is not None else b_expr], root.attrs)
            return self._emit(plan)

        def _emit(self, plan: Plan):
            rid = len(regions)
            flags = FLAG_B_TRANSPOSED if plan.transposed else 0
            blob = np.frombuffer(make_blob(rid, flags, plan.region, config), np.uint8).copy()
            out_dtype = "int32" if plan.dtype == "int8" else "float32"
            out_ty = relax.TensorType(plan.out_shape, out_dtype)
            acc = relax.call_dps_packed(RUN_FUNC, relax.Tuple([relax.const(blob, "uint8"), plan.a, plan.b]), out_ty)
            regions.append({
                "id": rid, "kind": plan.kind, "dtype": plan.dtype, "k": plan.k, "n": plan.n, "m": plan.m,
                "macs": plan.macs, "macs_per_unit": plan.macs_per_row_unit,
                "shape": [(_int(d) if _int(d) is not None else str(d)) for d in plan.out_shape],
                **({"kernel": [plan.region.kh, plan.region.kw], "strides": list(plan.region.strides)}
                   if plan.kind == "conv" else {}),
                "weight_transposed": plan.transposed,
            })
            if plan.dtype == "bf16":
                return acc
            accv = self.builder_.emit(acc)
            return relax.op.multiply(relax.op.astype(accv, "float32"), plan.scale)

    rw = _Replace(fused)
    for gv, func in fused.functions_items():
        if isinstance(func, relax.Function) and gv not in composites:
            rw.builder_.update_func(gv, rw.visit_expr(func))
    out = rw.builder_.get()
    for gv in list(composites):
        if gv in out.functions:
            del out[gv]
    out = relax.transform.DeadCodeElimination()(out)
    host = host_ops(out, config, float_regions)
    return out, Result(regions, host)


def host_ops(mod, config, float_regions: bool) -> list[dict]:
    """The matmuls / convs of ``mod`` (after :func:`partition`) left on the host, with MACs and the reason."""
    from tvm import relax

    out = []
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        binds = _bindings(func)
        main = func
        n_inputs = int(main.attrs["num_input"]) if main.attrs is not None and "num_input" in main.attrs else 0
        params = set(list(main.params)[n_inputs:])
        for var, v in binds.items():
            op = _name(v)
            if op not in ("relax.matmul", "relax.nn.conv2d"):
                continue
            shape = _shape_of_ty(v.ty) or []
            if op == "relax.matmul":
                k = _int((_shape(v.args[0]) or [None])[-1])
                exact, unit = _prod(shape)
            else:
                ws = [_int(d) for d in (_shape(v.args[1]) or [None] * 4)]
                k = None if None in ws else ws[1] * ws[2] * ws[3]
                exact, unit = _prod(shape)
            try:
                analyze(op, v.attrs, v.args[0], v.args[1], v.ty, binds.get, params, config, float_regions)
                reason = "not partitioned"
            except Reject as e:
                reason = str(e)
            except Exception as e:  # noqa: BLE001
                reason = f"not analyzable: {type(e).__name__}"
            out.append({"op": "conv2d" if op == "relax.nn.conv2d" else "matmul",
                        "macs": None if exact is None or k is None else exact * k,
                        "macs_per_unit": unit * (k or 0), "reason": reason})
    return out
