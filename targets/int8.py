"""Integer lowering of quantized matmuls: QDQ in, exact int x int -> int32 kernels out (AVX-512 VNNI or AVX2).

ONNX QDQ graphs import into Relax as float arithmetic with the quantization
rounding kept: ``matmul(dequantize(q_x), dequantize(q_w))``. On a CPU with
AVX-512 VNNI or AVX2, :func:`int8_matmul_pass` rewrites each such matmul whose
activation is quantized per tensor (uint8 or int8) and whose weight is int8
(per tensor or per output channel, any zero point) into

    acc  = q_x x W  ->  int32, exact                      # a C micro-kernel, see KERNELS
    y    = float(acc - zx*colsum(W) - zw*rowsum(q_x) + K*zx*zw) * (sx*sw)

where everything that depends on weights alone (the packed weight, column
sums, the per-channel constants) is a weight transform that the prepack step
runs once at lower time, and the epilogue fuses into one element-wise kernel.
The integer sum is exact; it differs from ONNX Runtime's float QDQ arithmetic
only by float rounding (~1e-6 relative).

Two micro-kernels, chosen from the CPU features the artifact is built for:

* ``avx512vnni`` (``qgemm_vnni.c``): uint8 x int8 with ``vpdpbusd``, 4 x 64
  tiles; weights packed ``[N/16, K/4, 16, 4]`` int8; int8 activations are
  shifted by 128 into uint8 (their zero point too).
* ``avx2`` (``qgemm_avx2.c``): the codes widened to int16, ``vpmaddwd``, 2 x 32
  tiles; weights packed ``[N/8, K/2, 8, 2]`` int8, widened as loaded. The
  faster AVX2 route, ``vpmaddubsw``, saturates its int16 pair sums: ONNX
  Runtime's MatMulInteger on such a CPU is off by up to 1e5 on full-range codes.

Convolutions: the rewrite runs right after ``ConvertLayout`` (with :func:`qdq_layout_pass` first, which
moves the transposes ConvertLayout leaves around quantize / dequantize out of the chain), so a QDQ conv is
NHWC/HWIO: im2col reads the NHWC activations directly and the output stays NHWC for the next layer's
quantize (NCHW convs, where ConvertLayout did not apply, transpose in and out). A K = KH*KW*C that is
not a multiple of the kernel's k-group is padded with zero channels (an RGB 7x7 stem: 147 -> 196).

Each kernel is called from a TIR function that parallelizes over tiles; TIR
scheduling in this TVM kept the accumulators in memory (a workspace allocation
per tile), 5x slower. Its object file is compiled with the system C compiler
(the one ``export_library`` links with) and linked into ``main.so``. Matmuls
whose K is not a multiple of the kernel's k-group (4 or 2), other dtypes,
per-axis activation scales, or CPUs with neither feature set keep the float
lowering.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Kernel:
    """One integer GEMM micro-kernel: its C source and the layout contract the Relax rewrite follows."""

    name: str  #: recorded in the manifest (``target.int8_kernel``)
    source: str  #: C file next to this module
    symbol: str  #: the function the TIR caller calls
    features: tuple  #: LLVM CPU features it needs
    block: int  #: output columns per packed block (one register)
    kgroup: int  #: consecutive k per packed group; K must be a multiple
    a_dtype: str  #: what the kernel reads the activation codes as
    w_dtype: str  #: what the packed weight is stored as
    tile_rows: int  #: rows of C per call from the TIR caller (the C file's CALL_ROWS, or MR)
    tile_blocks: int  #: column blocks of C per call (the C file's CALL_BLOCKS, or NB)
    conv_symbol: str | None = None  #: implicit-GEMM stride-1 convolution entry (see _conv_kernel_primfunc)
    pack_symbol: str | None = None  #: run-time packing of an activation B with its column sums
    zp_symbol: str | None = None  #: the GEMM with both zero points taken out in the kernel (B packed at run time)

    @property
    def path(self) -> Path:
        return Path(__file__).with_name(self.source)


#: In order of preference: the first whose features the target CPU has is used.
KERNELS = (
    Kernel("avx512vnni", "qgemm_vnni.c", "graphopt_qgemm_u8s8_avx512vnni", ("avx512f", "avx512bw", "avx512vnni"),
           block=16, kgroup=4, a_dtype="uint8", w_dtype="int8", tile_rows=32, tile_blocks=4,
           conv_symbol="graphopt_qconv_u8s8_avx512vnni", pack_symbol="graphopt_qpack_b_avx512vnni",
           zp_symbol="graphopt_qgemm_zp_u8s8_avx512vnni"),
    Kernel("avx2", "qgemm_avx2.c", "graphopt_qgemm_s16_avx2", ("avx2",),
           block=8, kgroup=2, a_dtype="int16", w_dtype="int8", tile_rows=2, tile_blocks=4),
)


def select_kernel(features) -> Kernel | None:
    """The integer kernel for a CPU with LLVM ``features``, or None (float lowering of QDQ)."""
    return next((k for k in KERNELS if all(f in features for f in k.features)), None)


def supported(features) -> bool:
    return select_kernel(features) is not None


def kernel_object(scratch: Path, kernel: Kernel) -> Path:
    """Compile ``kernel``'s C source into ``scratch``; returns the object file (deterministic bytes)."""
    from .cc import compile_object

    return compile_object(kernel.path, scratch)


def _kernel_primfunc(kernel: Kernel, k: int, n_pad: int):
    """TIR function ``(a [m, k], w [n_pad/block, k/kgroup, block, kgroup]) -> c [m, n_pad] int32`` over tiles."""
    from tvm.script import parser

    T = __import__("tvm.script.tirx", fromlist=["tirx"])
    kb, nb = k // kernel.kgroup, n_pad // kernel.block
    mr, nbt = kernel.tile_rows, kernel.tile_blocks
    rows, cols = f"((m + {mr - 1}) // {mr})", (nb + nbt - 1) // nbt
    # Tile t's row and column tile. The parallel loop hands each thread a contiguous run of t: when A (m x k)
    # is larger than W (k x n_pad), runs of t go along the rows, so each thread reads its own rows of A (the
    # rows the im2col or the producer before it wrote on that thread) and all of W; otherwise along the
    # columns, so each thread reads its own part of W (a deep layer's weights, megabytes, read once).
    i = f"T.Select(m >= {n_pad}, t // {cols}, t % {rows})"
    j = f"T.Select(m >= {n_pad}, t % {cols}, t // {rows})"
    src = f'''
@T.prim_func(private=True)
def qgemm(a: T.handle, w: T.Buffer(({nb}, {kb}, {kernel.block}, {kernel.kgroup}), "{kernel.w_dtype}"), c: T.handle):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    m = T.int64()
    A = T.match_buffer(a, (m, {k}), "{kernel.a_dtype}")
    C = T.match_buffer(c, (m, {n_pad}), "int32")
    for t in T.parallel({rows} * {cols}):
        T.evaluate(T.call_extern("int32", "{kernel.symbol}", A.data, w.data, C.data, T.int64({k}), T.int64({n_pad}),
            {i} * {mr}, T.min(m - {i} * {mr}, {mr}),
            {j} * {nbt}, T.min(T.int64({nb}) - {j} * {nbt}, {nbt})))
'''
    return parser.parse(src, extra_vars={"T": T})


def _batched_kernel_primfunc(kernel: Kernel, k: int, n_pad: int, zero_points: tuple[int, int] | None = None):
    """TIR function ``(a [b, m, k], w [b, n_pad/block, k/kgroup, block, kgroup]) -> c [b, m, n_pad] int32``: one
    GEMM per batch entry (a matmul of two activations: attention's heads), parallel over the entries' tiles.
    With ``zero_points = (za, zb)``: ``(a uint8, w, colsum [b, n_pad]) -> c``, the exact sum of (a - za)(b' - zb)
    (``kernel.zp_symbol``; w and colsum from :func:`_pack_b_primfunc`)."""
    from tvm.script import parser

    T = __import__("tvm.script.tirx", fromlist=["tirx"])
    kb, nb = k // kernel.kgroup, n_pad // kernel.block
    mr, nbt = kernel.tile_rows, kernel.tile_blocks
    rows, cols = f"((m + {mr - 1}) // {mr})", -(-nb // nbt)
    per = f"({rows} * {cols})"
    i, j = f"(t % {per} // {cols})", f"(t % {per} % {cols})"
    zp = zero_points is not None
    a_dtype, symbol = ("uint8", kernel.zp_symbol) if zp else (kernel.a_dtype, kernel.symbol)
    sums_param = " s: T.handle," if zp else ""
    sums_buffer = f'\n    S = T.match_buffer(s, (bn, {n_pad}), "int32")' if zp else ""
    sums_arg = " T.address_of(S[t // {per}, 0]),".format(per=per) if zp else ""
    zp_args = f", T.int32({zero_points[0]}), T.int32({zero_points[1]})" if zp else ""
    src = f'''
@T.prim_func(private=True)
def qbgemm(a: T.handle, w: T.handle,{sums_param} c: T.handle):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    bn = T.int64()
    m = T.int64()
    A = T.match_buffer(a, (bn, m, {k}), "{a_dtype}")
    W = T.match_buffer(w, (bn, {nb}, {kb}, {kernel.block}, {kernel.kgroup}), "{kernel.w_dtype}"){sums_buffer}
    C = T.match_buffer(c, (bn, m, {n_pad}), "int32")
    for t in T.parallel(bn * {per}):
        T.evaluate(T.call_extern("int32", "{symbol}", T.address_of(A[t // {per}, 0, 0]),
            T.address_of(W[t // {per}, 0, 0, 0, 0]),{sums_arg} T.address_of(C[t // {per}, 0, 0]), T.int64({k}),
            T.int64({n_pad}), {i} * {mr}, T.min(m - {i} * {mr}, {mr}), {j} * {nbt},
            T.min(T.int64({nb}) - {j} * {nbt}, {nbt}){zp_args}))
'''
    return parser.parse(src, extra_vars={"T": T})


def _pack_b_primfunc(kernel: Kernel, k: int, n: int, n_pad: int, dtype: str):
    """TIR function ``b [bn, k, n] (uint8 or int8) -> (packed [bn, n_pad/block, k/kgroup, block, kgroup] int8,
    colsum [bn, n_pad] int32)``: ``kernel.pack_symbol`` once per matrix, in parallel."""
    from tvm.script import parser

    T = __import__("tvm.script.tirx", fromlist=["tirx"])
    kb, nb = k // kernel.kgroup, n_pad // kernel.block
    src = f'''
@T.prim_func(private=True, s_tir=True)
def qpack(b: T.handle, p: T.handle, s: T.handle):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    bn = T.int64()
    B = T.match_buffer(b, (bn, {k}, {n}), "{dtype}")
    P = T.match_buffer(p, (bn, {nb}, {kb}, {kernel.block}, {kernel.kgroup}), "int8")
    S = T.match_buffer(s, (bn, {n_pad}), "int32")
    # A root block: with one input, Relax's reshape detection (RewriteDataflowReshape) inspects the function
    # and expects one.
    with T.sblock("root"):
        for t in T.parallel(bn):
            T.evaluate(T.call_extern("int32", "{kernel.pack_symbol}", T.address_of(B[t, 0, 0]),
                T.address_of(P[t, 0, 0, 0, 0]), T.address_of(S[t, 0]), T.int64({k}), T.int64({n}), T.int64({n_pad}),
                T.int32({int(dtype == "uint8")})))
'''
    return parser.parse(src, extra_vars={"T": T})


def _conv_kernel_primfunc(kernel: Kernel, cin: int, kh: int, kw: int, hp: int, wp: int, oh: int, ow: int,
                          n_pad: int):
    """TIR function ``(x [n, hp, wp, cin] uint8, padded; w packed) -> c [n, oh, wp, n_pad] int32``: a stride-1
    convolution as an implicit GEMM over each image's flat padded pixels (``kernel.conv_symbol``; no im2col).
    Row v = i*wp + j of an image's C is the window at output pixel (i, j); the rows with j >= ow (windows
    that wrap past the right edge) are computed for a uniform row stride and dropped by the caller's slice,
    and the last image row stops at v = (oh-1)*wp + ow, so no window reads past the image."""
    from tvm.script import parser

    T = __import__("tvm.script.tirx", fromlist=["tirx"])
    kb, nb = kh * kw * cin // kernel.kgroup, n_pad // kernel.block
    mr, nbt = kernel.tile_rows, kernel.tile_blocks
    v = (oh - 1) * wp + ow
    rows, cols = -(-v // mr), -(-nb // nbt)
    per = rows * cols
    # Tile order as in _kernel_primfunc: along the rows when the image's rows outnumber the columns.
    if v >= n_pad:
        i, j = f"(t % {per} // {cols})", f"(t % {per} % {cols})"
    else:
        i, j = f"(t % {per} % {rows})", f"(t % {per} // {rows})"
    src = f'''
@T.prim_func(private=True)
def qconv(x: T.handle, w: T.Buffer(({nb}, {kb}, {kernel.block}, {kernel.kgroup}), "{kernel.w_dtype}"), c: T.handle):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    n = T.int64()
    X = T.match_buffer(x, (n, {hp}, {wp}, {cin}), "uint8")
    C = T.match_buffer(c, (n, {oh}, {wp}, {n_pad}), "int32")
    for t in T.parallel(n * {per}):
        T.evaluate(T.call_extern("int32", "{kernel.conv_symbol}", T.address_of(X[t // {per}, 0, 0, 0]), w.data,
            T.address_of(C[t // {per}, 0, 0, 0]), T.int64({cin}), T.int64({kh}), T.int64({kw}), T.int64({wp}),
            T.int64({n_pad}), {i} * {mr}, T.min(T.int64({v}) - {i} * {mr}, {mr}),
            {j} * {nbt}, T.min(T.int64({nb}) - {j} * {nbt}, {nbt})))
'''
    return parser.parse(src, extra_vars={"T": T})


def _im2col_primfunc(n, c, h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, out_dtype, c_pad=None, padded=False):
    """TIR function: [N, OH, OW, KH, KW, C'] windows of x (NHWC, uint8) as ``out_dtype`` (widened in the copy
    for a kernel that reads int16); taps in the padding read the zero point; C innermost, so the copies are
    contiguous and vectorize. ``C' = c_pad`` (default C): channels C..C'-1 read 0, so that KH*KW*C' is a
    multiple of the kernel's k-group (the weight rows there are 0 too). ``padded``: x already holds the
    padding (zero point) and the padding channels (0), so every tap is a plain copy (``pt = pl = 0`` and
    ``c == c_pad``). Opaque (``op_pattern`` 8): nothing is fused into it, or every producer (a quantize)
    would be recomputed once per tap."""
    from tvm import te, tirx

    x = te.placeholder((n, h, w, c), "uint8", name="x")
    z = te.placeholder((), "uint8", name="z")
    c_pad = c if c_pad is None else c_pad

    def tap(b, i, j, p, q, cc):
        hh = i * sh + p * dh - pt
        ww = j * sw + q * dw - pl
        if padded:
            return x[b, hh, ww, cc].astype(out_dtype)
        inside = tirx.all(hh >= 0, hh < h, ww >= 0, ww < w)
        v = tirx.if_then_else(inside, x[b, tirx.max(tirx.min(hh, h - 1), 0), tirx.max(tirx.min(ww, w - 1), 0),
                                        tirx.min(cc, c - 1)], z())
        if c_pad != c:
            v = tirx.if_then_else(cc < c, v, tirx.const(0, "uint8"))
        return v.astype(out_dtype)

    out = te.compute((n, oh, ow, kh, kw, c_pad), tap, name="im2col")
    func = te.create_prim_func([x, z, out]).without_attr("global_symbol")
    # Rows of windows in parallel; the window's C run is one vectorizable copy (the padding test does not
    # depend on it, so LLVM hoists it). Pre-padded x with unit dilation: a window row's KW taps x C are
    # one contiguous run of x, copied as one vector (a 7x7 RGB stem: 28 bytes, not 7 copies of 4).
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    b, i, j, p, q, cc = sch.get_loops(sch.get_sblock("im2col"))
    sch.parallel(sch.fuse(b, i))
    if padded and dw == 1 and kw * c_pad <= 64:
        sch.vectorize(sch.fuse(q, cc))
    elif c_pad <= 64:
        sch.vectorize(cc)
    return sch.mod["main"].with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True)


def _scalar_value(expr):
    """The Python number of a scalar constant (a zero point known at lower time), else None."""
    value = getattr(expr, "value", None) if type(expr).__name__ in ("GenericConst", "Constant") else None
    try:
        return None if value is None or value.numpy().size != 1 else value.numpy().reshape(()).item()
    except Exception:  # noqa: BLE001 - not a tensor constant we can read
        return None


def _constant_zero(expr) -> bool:
    """Whether ``expr`` is a constant tensor of zeros (a weight zero point known at lower time)."""
    value = getattr(expr, "value", None) if type(expr).__name__ in ("GenericConst", "Constant") else None
    try:
        return value is not None and not value.numpy().any()
    except Exception:  # noqa: BLE001 - not a tensor constant we can read: assume non-zero (still exact)
        return False


def _static_shape(expr):
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    values = getattr(shape, "values", None)
    return None if values is None else list(values)


def _int(v):
    try:
        return int(v)
    except TypeError:
        return None


def qdq_layout_pass():
    """A Relax pass: transposes move across quantize / dequantize and cancel, so NHWC chains stay NHWC.

    ``ConvertLayout`` has no layout rule for ``quantize`` / ``dequantize``: between two NHWC convs of a QDQ
    graph it leaves ``permute_dims`` to NCHW before the quantize and back to NHWC after the dequantize (two
    full transposes per conv). Both ops are element-wise with a per-tensor or per-axis scale, so

        permute_dims(dequantize(q, axis=a), p)  ->  dequantize(permute_dims(q, p), axis=p.index(a))
        quantize(permute_dims(x, p), axis=a)    ->  permute_dims(quantize(x, axis=p[a]), p)

    and two consecutive ``permute_dims`` compose (an identity one disappears). Applied until nothing changes.
    """
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from graphopt.relax import rewrite_relax_functions

    R = relax.op

    moves = []  # one entry per rewrite of the current round (the mutator is made by rewrite_relax_functions)

    @mutator
    class _Mover(PyExprMutator):
        def _bound(self, expr, name):
            e = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
            return e if isinstance(e, relax.Call) and getattr(e.op, "name", "") == name else None

        @staticmethod
        def _perm(call, ndim):
            axes = call.attrs.axes
            return list(range(ndim))[::-1] if axes is None else [int(a) for a in axes]

        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", "")
            try:
                if name == "relax.permute_dims":
                    ndim = len(call.ty.shape.values)
                    perm = self._perm(call, ndim)
                    inner = self._bound(call.args[0], "relax.permute_dims")
                    if inner is not None:
                        p0 = self._perm(inner, ndim)
                        both = [p0[i] for i in perm]
                        moves.append(name)
                        return inner.args[0] if both == list(range(ndim)) else R.permute_dims(inner.args[0], both)
                    dq = self._bound(call.args[0], "relax.dequantize")
                    if dq is not None:
                        q, sc, zp = dq.args
                        axis = int(dq.attrs.axis) % ndim
                        moved = self.builder_.emit(R.permute_dims(q, perm))
                        moves.append(name)
                        return R.dequantize(moved, sc, zp, axis=perm.index(axis), out_dtype=str(dq.attrs.out_dtype))
                if name == "relax.quantize":
                    pd = self._bound(call.args[0], "relax.permute_dims")
                    if pd is not None:
                        x, sc, zp = pd.args[0], call.args[1], call.args[2]
                        ndim = len(call.ty.shape.values)
                        perm = self._perm(pd, ndim)
                        axis = int(call.attrs.axis) % ndim
                        q = self.builder_.emit(R.quantize(x, sc, zp, axis=perm[axis], out_dtype=str(call.attrs.out_dtype)))
                        moves.append(name)
                        return R.permute_dims(q, perm)
            except Exception:  # noqa: BLE001 - a form this pass does not know (symbolic rank...): left as it is
                return call
            return call

    @tvm.transform.module_pass(opt_level=0, name="graphopt.QdqLayout")
    def _pass(mod, _ctx):
        for _ in range(8):
            moves.clear()
            mod = relax.transform.DeadCodeElimination()(rewrite_relax_functions(mod, _Mover))
            if not moves:
                break
        return mod

    return _pass


def int8_matmul_pass(used: list, kernel: Kernel):
    """The Relax module pass (see the module docstring) calling ``kernel``; appends to ``used`` one entry per
    matmul rewritten."""
    import tvm
    import tvm_ffi
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from graphopt.relax import rewrite_relax_functions

    R = relax.op

    kernels: dict[tuple, object] = {}  # (k, n_pad) or ("conv", ...) -> GlobalVar of its TIR function

    @mutator
    class _Rewriter(PyExprMutator):
        def _producer(self, expr, name):
            if not isinstance(expr, relax.Var):
                return expr if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == name else None
            bound = self.lookup_binding(expr)
            return bound if isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == name else None

        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", "")
            if name not in ("relax.matmul", "relax.nn.conv2d") or len(call.args) != 2:
                return call
            try:
                out = self._rewrite(call) if name == "relax.matmul" else self._rewrite_conv(call)
            except Exception:  # noqa: BLE001 - any shape this rewrite does not know keeps the float lowering
                return call
            return call if out is None else out

        def _rewrite(self, call):
            x_dq = self._producer(call.args[0], "relax.dequantize")
            perm = self._producer(call.args[1], "relax.permute_dims")
            transposed = perm is not None
            w_dq = self._producer(perm.args[0] if transposed else call.args[1], "relax.dequantize")
            if x_dq is None or w_dq is None:
                return None
            qx, sx, zx = x_dq.args
            qw, sw, zw = w_dq.args
            x_dtype = str(qx.ty.dtype)
            if not transposed and (len(_static_shape(qw) or []) >= 3 or str(qw.ty.dtype) == "uint8"):
                # A batched matmul of two activations (attention) or a stacked weight: one GEMM per leading
                # index; a 2-D uint8 B can only be an activation (weights are int8) and goes the same way.
                return self._rewrite_activations(qx, sx, zx, qw, sw, zw, str(call.ty.dtype))
            if x_dtype not in ("uint8", "int8") or str(qw.ty.dtype) != "int8":
                return None
            if _static_shape(sx) != [] or _static_shape(zx) != []:
                return None  # per-axis activation scales: not a GEMM epilogue
            wshape = [_int(d) for d in (_static_shape(qw) or [])]
            xshape = _static_shape(qx)
            if len(wshape) != 2 or None in wshape or not xshape or len(xshape) < 1:
                return None
            if transposed and [int(a) for a in perm.attrs.axes] != [1, 0]:
                return None
            k, n = (wshape[1], wshape[0]) if transposed else wshape
            if _int(xshape[-1]) != k or k % kernel.kgroup:
                return None
            # Per-channel weight parameters must run along N: axis 0 of a stored [N, K], axis 1 of a [K, N].
            w_axis, n_axis = int(w_dq.attrs.axis) % 2, 0 if transposed else 1
            for p in (sw, zw):
                ps = _static_shape(p)
                if not (ps == [] or (ps is not None and [_int(d) for d in ps] == [n] and w_axis == n_axis)):
                    return None
            wkn = self.builder_.emit(R.permute_dims(qw, [1, 0])) if transposed else qw
            lead = xshape[:-1]
            x2 = self.builder_.emit(R.reshape(qx, [-1, k])) if len(xshape) != 2 else qx
            y = self._gemm(x2, x_dtype, sx, zx, wkn, sw, zw, k, n, out_shape=[*lead, n] if len(xshape) != 2 else None)
            used.append({"op": "matmul", "k": k, "n": n, "activation": x_dtype})
            out_dtype = str(call.ty.dtype)
            return y if out_dtype == "float32" else R.astype(y, out_dtype)

        def _rewrite_activations(self, qx, sx, zx, qw, sw, zw, out_dtype):
            """matmul(dequantize(q_x), dequantize(q_w)) of two activations (or a stacked weight), [B..., M, K] x
            [B..., K, N] with the same leading dims, both per tensor: q_w is shifted to int8 if uint8 and packed at
            run time, one GEMM per leading index (attention's Q x K^T and P x V)."""
            bb = self.builder_
            xs, ws = _static_shape(qx), _static_shape(qw)
            if not xs or not ws or len(xs) != len(ws) or len(xs) < 2:
                return None
            if any(_static_shape(p) != [] for p in (sx, zx, sw, zw)):
                return None
            x_dtype, w_dtype = str(qx.ty.dtype), str(qw.ty.dtype)
            if x_dtype not in ("uint8", "int8") or w_dtype not in ("uint8", "int8"):
                return None
            k, n = _int(ws[-2]), _int(ws[-1])
            if k is None or n is None or _int(xs[-1]) != k or k % kernel.kgroup:
                return None
            lead = list(xs[:-2])
            for a, b in zip(lead, ws[:-2]):
                if not tvm_ffi.structural_equal(a, b, map_free_vars=False):
                    return None  # broadcast leading dims: keep the float matmul
            m = xs[-2]
            blk, kg = kernel.block, kernel.kgroup
            n_pad = -(-n // blk) * blk
            i32 = "int32"
            # Activations as the kernel reads them (uint8: int8 codes shifted by 128, zero point too).
            xu, zx32, za, zb = qx, R.astype(zx, i32), _scalar_value(zx), _scalar_value(zw)
            if x_dtype == "int8":
                xu = bb.emit(R.astype(R.add(R.astype(qx, i32), relax.const(128, i32)), "uint8"))
                zx32 = R.add(zx32, relax.const(128, i32))
                za = None if za is None else za + 128
            x3 = bb.emit(R.reshape(xu, [-1, m, k]))
            bn = x3.ty.shape.values[0]
            in_kernel = kernel.zp_symbol is not None and za is not None and zb is not None
            if in_kernel:
                # Zero points known at lower time: B is packed (and its column sums taken) by one C call per
                # matrix, and the GEMM takes both zero points out itself; no sum or transpose kernels.
                zb = zb - 128 if w_dtype == "uint8" else zb
                pkey = ("pack", k, n, n_pad, w_dtype)
                if pkey not in kernels:
                    kernels[pkey] = bb.add_func(_pack_b_primfunc(kernel, k, n, n_pad, w_dtype), f"qpack_{kernel.name}")
                packed = bb.emit(relax.call_tir(kernels[pkey], [bb.emit(R.reshape(qw, [-1, k, n]))], [
                    relax.TensorType([bn, n_pad // blk, k // kg, blk, kg], "int8"), relax.TensorType([bn, n_pad], i32)]))
                args = [x3, bb.emit(relax.TupleGetItem(packed, 0)), bb.emit(relax.TupleGetItem(packed, 1))]
                key = ("zp", k, n_pad, int(za), int(zb))
            else:
                # Weights as int8 (u8 - 128), packed by Relax ops; the activations widened for AVX2's kernel.
                zw32, w8 = R.astype(zw, i32), qw
                if w_dtype == "uint8":
                    w8 = bb.emit(R.astype(R.subtract(R.astype(qw, i32), relax.const(128, i32)), "int8"))
                    zw32 = R.subtract(zw32, relax.const(128, i32))
                w3 = bb.emit(R.reshape(w8, [-1, k, n]))
                if n_pad != n:
                    w3 = bb.emit(R.nn.pad(w3, [0, 0, 0, 0, 0, n_pad - n]))
                packed = bb.emit(R.permute_dims(R.reshape(w3, [-1, k // kg, kg, n_pad // blk, blk]), [0, 3, 1, 4, 2]))
                args = [bb.emit(R.astype(x3, "int16")) if kernel.a_dtype == "int16" else x3, packed]
                key = ("batched", k, n_pad)
            if key not in kernels:
                zero_points = (int(za), int(zb)) if in_kernel else None
                kernels[key] = bb.add_func(_batched_kernel_primfunc(kernel, k, n_pad, zero_points),
                                           f"qbgemm_{kernel.name}_k{k}_n{n_pad}")
            acc = bb.emit(relax.call_tir(kernels[key], args, relax.TensorType([bn, m, n_pad], i32)))
            if n_pad != n:
                acc = bb.emit(R.strided_slice(acc, axes=[2], begin=[0], end=[n]))
            exact = bb.emit(R.reshape(acc, [*lead, m, n]))
            if not in_kernel:
                # acc - zx*colsum(w) - zw*rowsum(x) + K*zx*zw, all at run time.
                colsum = R.sum(R.astype(w8, i32), axis=[-2], keepdims=True)
                rowsum = R.sum(R.astype(xu, i32), axis=[-1], keepdims=True)
                exact = R.add(R.subtract(R.subtract(exact, R.multiply(zx32, colsum)), R.multiply(zw32, rowsum)),
                              R.multiply(R.multiply(zx32, zw32), relax.const(k, i32)))
            y = R.multiply(R.astype(exact, "float32"), R.multiply(R.astype(sx, "float32"), R.astype(sw, "float32")))
            used.append({"op": "matmul", "k": k, "n": n, "activation": x_dtype, "weights": "activation"})
            return y if out_dtype == "float32" else R.astype(y, out_dtype)

        def _operands(self, call):
            """(q_x, s_x, z_x, q_w, s_w, z_w, w_axis) of a call on two dequantized operands, else None."""
            x_dq = self._producer(call.args[0], "relax.dequantize")
            w_dq = self._producer(call.args[1], "relax.dequantize")
            if x_dq is None or w_dq is None:
                return None
            qx, sx, zx = x_dq.args
            qw, sw, zw = w_dq.args
            if str(qx.ty.dtype) not in ("uint8", "int8") or str(qw.ty.dtype) != "int8":
                return None
            if _static_shape(sx) != [] or _static_shape(zx) != []:
                return None
            return qx, sx, zx, qw, sw, zw, int(w_dq.attrs.axis)

        def _rewrite_conv(self, call):
            """conv2d (NHWC/HWIO or NCHW/OIHW, one group) on QDQ operands: im2col of q_x (padded with its zero
            point), GEMM."""
            a = call.attrs
            layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout))
            nhwc = layouts == ("NHWC", "HWIO", "NHWC")
            if int(a.groups) != 1 or not (nhwc or layouts == ("NCHW", "OIHW", "NCHW")):
                return None
            ops = self._operands(call)
            if ops is None:
                return None
            qx, sx, zx, qw, sw, zw, w_axis = ops
            x_dtype = str(qx.ty.dtype)
            wshape = [_int(d) for d in (_static_shape(qw) or [])]
            xshape = _static_shape(qx)
            if len(wshape) != 4 or None in wshape or not xshape or len(xshape) != 4:
                return None
            if nhwc:
                kh, kw, c, o = wshape
                h, w, xc = _int(xshape[1]), _int(xshape[2]), _int(xshape[3])
                o_axis = 3
            else:
                o, c, kh, kw = wshape
                h, w, xc = _int(xshape[2]), _int(xshape[3]), _int(xshape[1])
                o_axis = 0
            if h is None or w is None or xc != c:
                return None
            # K = KH*KW*C must be a multiple of the kernel's k-group: pad the channels with zero weights
            # (and zero activations, so the row sums stay exact) when it is not (an RGB input's 7x7 conv:
            # K = 147 -> 196).
            c_pad = next(cp for cp in range(c, c + kernel.kgroup + 1) if (cp * kh * kw) % kernel.kgroup == 0)
            for p in (sw, zw):
                ps = _static_shape(p)
                if not (ps == [] or (ps is not None and [_int(d) for d in ps] == [o] and w_axis % 4 == o_axis)):
                    return None
            sh, sw_ = (int(v) for v in a.strides)
            dh, dw = (int(v) for v in a.dilation)
            pt, pl, pb, pr = (int(v) for v in a.padding)
            oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
            ow = (w + pl + pr - (kw - 1) * dw - 1) // sw_ + 1
            bb = self.builder_
            k = c * kh * kw
            xu, zxu = qx, zx
            if x_dtype == "int8":  # pad and shift together: the GEMM reads uint8
                xu = bb.emit(R.astype(R.add(R.astype(qx, "int32"), relax.const(128, "int32")), "uint8"))
                zxu = bb.emit(R.astype(R.add(R.astype(zx, "int32"), relax.const(128, "int32")), "uint8"))
            n_batch = xshape[0]
            xt = xu if nhwc else bb.emit(R.permute_dims(xu, [0, 2, 3, 1]))  # NHWC: window rows contiguous in C
            nb = _int(n_batch)
            tir_n = nb if nb is not None else tvm.tirx.Var("n", "int64")  # a symbolic batch binds from x's shape
            a_dtype = "int16" if kernel.a_dtype == "int16" else "uint8"
            zx_value = _scalar_value(zx)
            if zx_value is not None and x_dtype == "int8":
                zx_value += 128
            implicit = (kernel.conv_symbol is not None and a_dtype == "uint8" and sh == sw_ == 1 and dh == dw == 1
                        and c % kernel.kgroup == 0 and kh * kw <= 64 and zx_value is not None and _constant_zero(zw))
            if implicit:
                # Stride 1: an implicit GEMM straight from the padded input (the pad fuses into the quantize
                # that makes x), no im2col copy of KH*KW times the activations. A weight zero point that is
                # not 0 needs the window sums (im2col's rows), so it takes the im2col route.
                xp = xt
                if pt or pb or pl or pr:
                    xp = bb.emit(R.nn.pad(xt, [0, 0, pt, pb, pl, pr, 0, 0], pad_value=float(zx_value)))
                x2, k_real, conv = None, None, (xp, c, kh, kw, h + pt + pb, w + pl + pr, oh, ow)
            else:
                if c_pad != c and zx_value is not None:
                    # Few channels (an RGB input): pad x once, spatially with its zero point, then the channels
                    # with 0 (fused into the quantize before it), so im2col copies whole window rows of KW*C'
                    # bytes instead of KW*KH taps of C bytes with a bounds test each (ResNet-18's stem im2col,
                    # ad-hoc: 0.24 -> 0.09 ms).
                    xt = bb.emit(R.nn.pad(R.nn.pad(xt, [0, 0, pt, pb, pl, pr, 0, 0], pad_value=float(zx_value)),
                                          [0, 0, 0, 0, 0, 0, 0, c_pad - c], pad_value=0.0))
                    im2col_func = _im2col_primfunc(tir_n, c_pad, h + pt + pb, w + pl + pr, kh, kw, sh, sw_, dh, dw,
                                                   0, 0, oh, ow, a_dtype, padded=True)
                else:
                    im2col_func = _im2col_primfunc(tir_n, c, h, w, kh, kw, sh, sw_, dh, dw, pt, pl, oh, ow, a_dtype,
                                                   c_pad)
                im2col = bb.add_func(im2col_func, f"im2col_{a_dtype}")
                cols = bb.emit(relax.call_tir(im2col, [xt, zxu],
                                              relax.TensorType([n_batch, oh, ow, kh, kw, c_pad], a_dtype)))
                k_real, k, conv = k, c_pad * kh * kw, None
                x2 = bb.emit(R.reshape(cols, [-1, k]))
                if c_pad != c:  # zero weights for the padding channels (a weight-only transform: lower time)
                    widths = [0, 0, 0, 0, 0, c_pad - c, 0, 0] if nhwc else [0, 0, 0, c_pad - c, 0, 0, 0, 0]
                    qw = bb.emit(R.nn.pad(qw, widths))
            # Weight columns in the window order (KH, KW, C): a weight-only transform, done at lower time.
            if nhwc:
                wkn = bb.emit(R.reshape(qw, [k, o]))
            else:
                wkn = bb.emit(R.permute_dims(R.reshape(R.permute_dims(qw, [0, 2, 3, 1]), [o, k]), [1, 0]))
            y = self._gemm(x2, a_dtype, sx, zxu, wkn, sw, zw, k, o, k_real=k_real, out_shape=[n_batch, oh, ow, o],
                           conv=conv)
            if not nhwc:
                y = R.permute_dims(y, [0, 3, 1, 2])
            used.append({"op": "conv2d", "k": k, "n": o, "activation": x_dtype, "implicit": implicit})
            out_dtype = str(call.ty.dtype)
            return y if out_dtype == "float32" else R.astype(y, out_dtype)

        def _gemm(self, x2, x_dtype, sx, zx, wkn, sw, zw, k, n, k_real=None, out_shape=None, conv=None):
            """float32 [M, n] (or ``out_shape``) = dequantized (q_x [M, k] x W [k, n]), through the integer kernel. ``x_dtype``
            int16: uint8 codes already widened (by the im2col copy). ``k_real``: the products that are real
            taps when columns past it are padding (x and W both 0 there), for the zero-point correction.
            ``out_shape`` (last dim n): the int32 sums are reshaped to it BEFORE the float epilogue, so the
            epilogue is element-wise on the layer's own shape and fuses with what follows (bias, ReLU, the next
            quantize) into one kernel; a reshape after it (a symbolic batch makes it opaque) split that kernel
            in two, with a float32 tensor written and read back between them. ``conv`` = (x_padded, cin, kh,
            kw, hp, wp, oh, ow): no ``x2``; the product is the implicit-GEMM stride-1 convolution of the padded
            NHWC uint8 x (``out_shape`` = [n, oh, ow, n])."""
            bb = self.builder_
            blk, kg = kernel.block, kernel.kgroup
            n_pad = -(-n // blk) * blk
            wpad = bb.emit(R.nn.pad(wkn, [0, 0, 0, n_pad - n])) if n_pad != n else wkn
            if kernel.w_dtype != "int8":
                wpad = bb.emit(R.astype(wpad, kernel.w_dtype))
            packed = bb.emit(R.permute_dims(R.reshape(wpad, [k // kg, kg, n_pad // blk, blk]), [2, 0, 3, 1]))
            colsum = bb.emit(R.sum(R.astype(wkn, "int32"), axis=[0]))
            zx32 = R.astype(zx, "int32")
            xu = x2
            if kernel.a_dtype == "int16" and x_dtype != "int16":  # both widen exactly; the zero point stays
                xu = bb.emit(R.astype(x2, "int16"))
            elif x_dtype == "int8":  # u8 x s8 only: shift the activations (and their zero point) by 128
                xu = bb.emit(R.astype(R.add(R.astype(x2, "int32"), relax.const(128, "int32")), "uint8"))
                zx32 = R.add(zx32, relax.const(128, "int32"))
            zw32 = R.astype(zw, "int32")
            # acc - zx*colsum - zw*rowsum + K*zx*zw; the weight-only parts are lifted to lower time.
            corr = bb.emit(R.subtract(R.multiply(zx32, colsum), R.multiply(R.multiply(zx32, zw32),
                                                                             relax.const(k_real or k, "int32"))))
            scale = bb.emit(R.multiply(R.astype(sx, "float32"), R.astype(sw, "float32")))
            if conv is not None:
                xp, cin, kh, kw, hp, wp, oh, ow = conv
                key = ("conv", cin, kh, kw, hp, wp, oh, ow, n_pad)
                if key not in kernels:
                    kernels[key] = bb.add_func(_conv_kernel_primfunc(kernel, cin, kh, kw, hp, wp, oh, ow, n_pad),
                                               f"qconv_{kernel.name}_k{k}_n{n_pad}")
                acc = bb.emit(relax.call_tir(kernels[key], [xp, packed],
                                             relax.TensorType([out_shape[0], oh, wp, n_pad], "int32")))
                if wp != ow or n_pad != n:  # the wrapped windows' rows and the padding columns
                    acc = bb.emit(R.strided_slice(acc, axes=[2, 3], begin=[0, 0], end=[ow, n]))
            else:
                key = (k, n_pad)
                if key not in kernels:
                    kernels[key] = bb.add_func(_kernel_primfunc(kernel, k, n_pad), f"qgemm_{kernel.name}_k{k}_n{n_pad}")
                m = xu.ty.shape.values[0]
                acc = bb.emit(relax.call_tir(kernels[key], [xu, packed], relax.TensorType([m, n_pad], "int32")))
                if n_pad != n:
                    acc = bb.emit(R.strided_slice(acc, axes=[1], begin=[0], end=[n]))
                if out_shape is not None:
                    acc = bb.emit(R.reshape(acc, out_shape))
            exact = R.subtract(acc, corr)
            if not _constant_zero(zw):
                # A weight zero point not known to be 0: subtract zw * (row sums of q_x) at run time.
                rows = R.sum(R.astype(xu, "int32"), axis=[1], keepdims=True)
                if out_shape is not None:
                    rows = R.reshape(rows, [*out_shape[:-1], 1])
                exact = R.subtract(exact, R.multiply(rows, zw32))
            return R.multiply(R.astype(exact, "float32"), scale)

    @tvm.transform.module_pass(opt_level=0, name="graphopt.Int8Matmul")
    def _pass(mod, _ctx):
        out = rewrite_relax_functions(mod, _Rewriter)
        # The float weights the rewritten matmuls read are dead now; left in, the prepack step would
        # lift them (and refuse to store them: 4x the int8 weights).
        return relax.transform.DeadCodeElimination()(out) if used else out

    return _pass
