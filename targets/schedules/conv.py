"""CPU schedule rules: convolutions and pooling (see :mod:`graphopt.targets.schedules`).

Two halves:

- :func:`conv_layout_passes` converts 2-D convolutions (and the pooling and
  element-wise ops of the chains around them) to NHWC activations with HWIO
  weights at the Relax level, before legalization. The innermost axis of every
  conv output and of its weights is then the output channel, the axis the
  kernels vectorize over. Relax's ``ConvertLayout`` transposes only at the ends
  of each chain; the weight transposes are ``permute_dims`` on the weight
  parameters, which the prepack step (``LiftTransformParams``) runs once at
  lower time.
- :func:`conv_rules` schedules the fused PrimFuncs that TOPI makes of them:
  one sliding-window reduction (conv, max/avg pool; any layout, 1-D or 2-D,
  transposed convs included) or one column reduction (global pooling over
  non-innermost axes), plus injective producers (padding, dilation) and
  injective epilogues (bias, activation, residual add, the average's divide).
"""

from __future__ import annotations

from .common import PARALLEL_ITERS_PER_CORE, num_cores, vector_bits, vector_lanes, vectorize_inner, work_size, write_dtype_bits  # noqa: F401

from tvm.s_tir.dlight.cpu.base import CPUScheduleRule


# What ConvertLayout aims for. conv2d_transpose is pinned to NCHW/IOHW (the only layout TOPI
# legalizes it in): left out, ConvertLayout moves it to NHWC inside an NHWC chain, which
# then fails to legalize.
DESIRED_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"], "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}


def conv_layout_passes(target, winograd: bool = True, winograd_used: list | None = None,
                       after_layout: list = ()) -> list:
    """Relax passes (before legalization) that put convolutions in the layout the conv rules are fast on.

    1. ``ConvertLayout``: ``nn.conv2d`` becomes NHWC / HWIO (output NHWC), so the
       output channels are innermost in the result; chains of convs, pooling
       and element-wise ops stay NHWC, with transposes only at their ends.
    Then ``after_layout`` (the CPU target's integer-kernel rewrite), and:

    2. with ``winograd``, :func:`.winograd.winograd_pass`: 3x3 stride-1 convs over
       images large enough to gain become Winograd kernels (``winograd_used``
       collects each one's tile and extra weight bytes);
    3. :func:`pack_conv_weights`: each other dense (groups=1) NHWC conv2d whose output
       channels split evenly into the vector tile the schedule uses for this
       ``target`` reads its weights packed as ``[O/t, KH, KW, I, t]``, so the
       kernel streams them contiguously. The packing is a ``layout_transform``
       on the weight parameter, which the prepack step lifts out of the program.

    1-D and transposed convolutions stay as imported (TOPI legalizes only NCW /
    NCHW for them); the rule vectorizes those over their innermost output axis.
    """
    from tvm import relax

    from .winograd import winograd_pass

    return [_guarded_convert_layout(relax.transform.ConvertLayout(DESIRED_LAYOUTS)), *after_layout,
            *([winograd_pass(target, winograd_used)] if winograd else []),
            pack_conv_weights(target)]


def _guarded_convert_layout(convert):
    """``convert`` on modules that have a conv2d, applied to as much of the module as TVM can convert.

    ``ConvertLayout`` walks every op's layout inference even where no conv2d is
    present, and in TVM 0.27 some of them abort the whole pass (magika: "Invalid
    SLayout: can't find S in source layout ABC", from ``stack`` then ``max``).
    :func:`graphopt.targets.layout.robust_convert_layout` hides the ops that
    cannot gain from the conversion, and any op whose inference still aborts,
    so the convolutions are converted anyway; only when even that fails is the
    imported layout (NCHW: slower, correct) kept. Uniform constants are made
    scalars first (:func:`~graphopt.targets.layout.scalarize_uniform_constants`),
    so they do not pin the ops that read them to the original layout.
    """
    import tvm
    from tvm import relax

    from ..layout import clip_as_maximum_minimum, robust_convert_layout, scalarize_uniform_constants

    conv = tvm.ir.Op.get("relax.nn.conv2d")

    def has_conv2d(mod) -> bool:
        found = []

        def visit(e):
            if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.same_as(conv):
                found.append(e)

        for _, f in mod.functions_items():
            if isinstance(f, relax.Function):
                relax.analysis.post_order_visit(f, visit)
        return bool(found)

    @tvm.transform.module_pass(opt_level=0, name="graphopt.ConvertConvLayout")
    def _pass(mod, _ctx):
        if not has_conv2d(mod):
            return mod
        try:
            return robust_convert_layout(scalarize_uniform_constants(clip_as_maximum_minimum(mod)), convert)[0]
        except Exception:  # noqa: BLE001 - see the docstring: the imported layout is a correct fallback
            return mod

    return _pass


def vector_registers(target) -> int:
    """Architectural vector registers: 32 with AVX-512 and on AArch64, 16 on other x86-64."""
    arch = str(target.attrs.get("mtriple", "")) if hasattr(target, "attrs") else ""
    if vector_bits(target) >= 512 or arch.startswith("aarch64"):
        return 32
    import platform

    return 32 if not arch and platform.machine() in ("aarch64", "arm64") else 16


def pack_conv_weights(target):
    """A Relax pass: NHWC/HWIO dense float conv2d -> a TE conv reading weights packed ``[O/t, KH, KW, I, t]``.

    ``t`` is :func:`_pick_vector_tile` of the output channels for ``target`` (the
    tile :class:`WindowReduction` will vectorize), so a kernel tile reads one
    contiguous run of weights per (kh, kw, ci). Convs that are grouped, not
    float, not NHWC/HWIO, have symbolic channel counts or a tile that does not
    divide the channels are left alone (TOPI legalizes them as before).
    """
    import tvm
    from tvm import relax, te, topi
    from tvm.relax.expr_functor import PyExprMutator, mutator

    conv_op = tvm.ir.Op.get("relax.nn.conv2d")

    def te_conv(data, wp, strides, padding, dilation, out_dtype, nchw_in=False):
        """NHWC conv on packed weights; ``nchw_in``: ``data`` is NCHW, transposed by the padding pass."""
        if nchw_in:
            n, c, h, w = data.shape
        else:
            n, h, w, c = data.shape
        fo, kh, kw, _, fi = wp.shape
        pt, pl, pb, pr = padding
        sh, sw = strides
        dh, dw = dilation
        oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
        ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
        padded = data
        if nchw_in:
            # One pass writes the padded NHWC tensor straight from the NCHW input: the
            # network's first conv needs no separate transpose kernel.
            def pad_nchw(b, y, x, cc):
                inside = tvm.tirx.all(y >= pt, y < h + pt, x >= pl, x < w + pl)
                return tvm.tirx.if_then_else(
                    inside, data[b, cc, te.max(te.min(y - pt, h - 1), 0), te.max(te.min(x - pl, w - 1), 0)],
                    tvm.tirx.const(0, data.dtype))
            padded = te.compute((n, h + pt + pb, w + pl + pr, c), pad_nchw, name="pad_temp")
        elif any(int(p) for p in padding):
            padded = topi.nn.pad(data, [0, pt, pl, 0], [0, pb, pr, 0], name="pad_temp")
        ry = te.reduce_axis((0, kh), name="ry")
        rx = te.reduce_axis((0, kw), name="rx")
        rc = te.reduce_axis((0, c), name="rc")
        return te.compute(
            (n, oh, ow, fo * fi),
            lambda b, y, x, f: te.sum(
                padded[b, y * sh + ry * dh, x * sw + rx * dw, rc].astype(out_dtype)
                * wp[f // fi, ry, rx, rc, f % fi].astype(out_dtype),
                axis=[ry, rx, rc]),
            name="conv2d_nhwc_packed",
        )

    def te_conv_transpose(data, wp, strides, padding, output_padding, out_dtype, nchw_in):
        """Transposed conv as a gather over the taps that reach each output; NCHW out, NCHW or NHWC in.

        Output row ``Y`` gets input row ``y`` through tap ``ky`` when ``Y + pt = y*s + ky``:
        with ``q, r = divmod(Y + pt, s)`` the taps are ``ky = r + t*s`` (``t < ceil(k/s)``)
        and ``y = q - t``. The input is padded so ``y`` out of range reads zeros, so the
        reduction has no branch; taps past the kernel (``k`` not a multiple of ``s``)
        are masked. Nothing multiplies the zeros TOPI's dilate-then-convolve inserts.
        The reduction is NHWC (vectorized over output channels); a last injective
        stage writes NCHW, which the schedule does per register tile, so the
        epilogues fused after it (bias, activation) need no transpose pass.
        """
        if nchw_in:
            n, c, h, w = data.shape
        else:
            n, h, w, c = data.shape
        fo, kh, kw, _, fi = wp.shape
        pt, pl, pb, pr = padding
        sh, sw = strides
        oph, opw = output_padding
        oh = (h - 1) * sh - pt - pb + kh + oph
        ow = (w - 1) * sw - pl - pr + kw + opw
        th, tw = -(-int(kh) // sh), -(-int(kw) // sw)
        hp = max(int(h) + th - 1, (int(oh) - 1 + pt) // sh + th)
        wpad = max(int(w) + tw - 1, (int(ow) - 1 + pl) // sw + tw)
        before = [0, th - 1, tw - 1, 0]
        after = [0, hp - (int(h) + th - 1), wpad - (int(w) + tw - 1), 0]
        if nchw_in:
            before, after = [before[i] for i in (0, 3, 1, 2)], [after[i] for i in (0, 3, 1, 2)]
        padded = topi.nn.pad(data, before, after, name="pad_temp") if any(before + after) else data

        def read(b, yy, xx, cc):
            return padded[b, cc, yy, xx] if nchw_in else padded[b, yy, xx, cc]
        ty = te.reduce_axis((0, th), name="ty")
        tx = te.reduce_axis((0, tw), name="tx")
        rc = te.reduce_axis((0, c), name="rc")
        masked = int(kh) % sh or int(kw) % sw

        def body(b, y, x, f):
            ky = (y + pt) % sh + ty * sh
            kx = (x + pl) % sw + tx * sw
            v = read(b, (y + pt) // sh - ty + (th - 1), (x + pl) // sw - tx + (tw - 1), rc).astype(out_dtype)
            if masked:
                wv = wp[f // fi, te.min(ky, kh - 1), te.min(kx, kw - 1), rc, f % fi].astype(out_dtype)
                wv = wv * tvm.tirx.Cast(out_dtype, tvm.tirx.all(ky < kh, kx < kw))
            else:
                wv = wp[f // fi, ky, kx, rc, f % fi].astype(out_dtype)
            return te.sum(v * wv, axis=[ty, tx, rc])

        conv = te.compute((n, oh, ow, fo * fi), body, name="conv2d_transpose_nhwc")
        return te.compute((n, fo * fi, oh, ow), lambda b, f, y, x: conv[b, y, x, f], name="conv2d_transpose_nchw")

    convt_op = tvm.ir.Op.get("relax.nn.conv2d_transpose")

    @mutator
    class _Packer(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod_ = mod

        def transform(self):
            for gv, func in self.mod_.functions_items():
                if isinstance(func, relax.Function):
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.same_as(convt_op):
                return self.conv_transpose(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(conv_op)):
                return call
            a = call.attrs
            if (a.data_layout, a.kernel_layout, a.out_layout) != ("NHWC", "HWIO", "NHWC") or int(a.groups) != 1:
                return call
            data, weight = call.args
            wshape = getattr(weight.ty, "shape", None) if hasattr(weight, "ty") else None
            wshape = wshape if wshape is not None else getattr(weight.struct_info, "shape", None)
            dtype = str(call.struct_info.dtype) if hasattr(call, "struct_info") else str(call.ty.dtype)
            if wshape is None or not dtype.startswith("float"):
                return call
            dims = [_int(d) for d in wshape.values] if hasattr(wshape, "values") else None
            if not dims or any(d is None for d in dims):
                return call
            f = dims[3]
            t = _pick_vector_tile(f, vector_lanes(target, tvm.DataType(dtype).bits))
            if f % t:
                return call
            packed = self.builder_.emit(relax.op.layout_transform(
                weight, index_map=lambda kh, kw, i, o: (o // t, kh, kw, i, o % t)))
            src, nchw_in = data, False
            if any(int(v) for v in a.padding):
                src = nchw_source(self, data)
                nchw_in = src is not data
            return self.builder_.call_te(
                te_conv, src, packed, [int(v) for v in a.strides], [int(v) for v in a.padding],
                [int(v) for v in a.dilation], dtype, nchw_in, primfunc_name_hint="conv2d_nhwc_packed")

        def conv_transpose(self, call):
            """NCHW/IOHW conv2d_transpose (groups 1, no dilation, static H/W/kernel) -> NHWC gather TE."""
            a = call.attrs
            if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "IOHW", "NCHW") or int(a.groups) != 1 \
                    or any(int(d) != 1 for d in a.dilation):
                return call
            data, weight = call.args
            dtype = str(call.ty.dtype)
            wdims = [_int(d) for d in getattr(weight.ty.shape, "values", [None])]
            ddims = [_int(d) for d in getattr(data.ty.shape, "values", [None])]
            if not dtype.startswith("float") or len(wdims) != 4 or any(d is None for d in wdims) \
                    or len(ddims) != 4 or any(d is None for d in ddims[1:]):
                return call
            _i, f, kh, kw = wdims
            t = _pick_vector_tile(f, vector_lanes(target, tvm.DataType(dtype).bits))
            t = t if f % t == 0 else 1
            packed = self.builder_.emit(relax.op.layout_transform(
                weight, index_map=lambda i, o, ky, kx: (o // t, ky, kx, i, o % t)))
            # ConvertLayout hands an NHWC chain to the (NCHW-pinned) transposed conv through a
            # permute_dims: read the NHWC tensor before it instead of permuting twice.
            src = data
            if isinstance(data, relax.Var):
                bound = self.lookup_binding(data)
                if isinstance(bound, relax.Call) and getattr(bound.op, "name", None) == "relax.permute_dims" \
                        and bound.attrs.axes is not None and [int(x) for x in bound.attrs.axes] == [0, 3, 1, 2]:
                    src = bound.args[0]
            return self.builder_.call_te(
                te_conv_transpose, src, packed, [int(v) for v in a.strides], [int(v) for v in a.padding],
                [int(v) for v in a.output_padding], dtype, src is data, primfunc_name_hint="conv2d_transpose")

    @tvm.transform.module_pass(opt_level=0, name="graphopt.PackConvWeights")
    def _pass(mod, _ctx):
        return _Packer(mod).transform()

    return _pass


def nchw_source(mutator, data):
    """The NCHW tensor ``data`` is ``permute_dims(axes=[0, 2, 3, 1])`` of, else ``data``.

    ConvertLayout hands an NCHW input to an NHWC conv through that transpose; a padded
    conv reads the NCHW tensor instead and transposes while padding (one pass, not two).
    The transpose stays only if something else reads it. ``mutator``: the
    ``PyExprMutator`` whose bindings ``data`` is looked up in.
    """
    from tvm import relax

    if not isinstance(data, relax.Var):
        return data
    bound = mutator.lookup_binding(data)
    if isinstance(bound, relax.Call) and getattr(bound.op, "name", None) == "relax.permute_dims" \
            and bound.attrs.axes is not None and [int(x) for x in bound.attrs.axes] == [0, 2, 3, 1]:
        return bound.args[0]
    return data


def conv_rules() -> list:
    """The rules of this family, most specific first."""
    from .winograd import winograd_rules

    return [*winograd_rules(), WindowReduction()]


_REDUCE = 2  # tirx.IterVar.CommReduce
_SPATIAL = 0  # tirx.IterVar.DataPar


def _int(expr):
    """The value of a constant extent, or None for a symbolic one."""
    from tvm import tirx

    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def _vars_in(expr) -> set:
    from tvm.tirx.analysis import undefined_vars

    return set(undefined_vars(expr))


def _pick_vector_tile(extent, lanes: int) -> int:
    """Output elements per vector tile along the innermost output axis.

    2 or 1 full vectors when they divide the extent; else the largest power of
    two below a vector (at least 4) that divides it (24 channels on AVX-512:
    tiles of 8). LLVM splits odd-sized vectors (24 = 16 + 8) into code 20x
    slower than whole registers, so those are avoided. An axis shorter than a
    vector is one tile; otherwise a full vector with a predicated tail (also for
    symbolic extents).
    """
    if extent is None:
        return lanes
    for v in (2 * lanes, lanes):
        if extent % v == 0:
            return v
    p = lanes // 2
    while p >= 4:
        if extent % p == 0:
            return p
        p //= 2
    if extent <= lanes:
        return extent
    return lanes


def _pick_rows(extent, max_rows: int) -> int:
    """Output rows per register tile: a divisor of the extent in [max_rows/2, max_rows] when there is one."""
    if extent is None:
        return max_rows
    if extent <= max_rows:
        return extent
    for r in range(max_rows, max(max_rows // 2, 1) - 1, -1):
        if extent % r == 0:
            return r
    return max_rows


class WindowReduction(CPUScheduleRule):
    """Register-tiled, parallel, vectorized schedule for convolutions and pooling.

    Claims a PrimFunc whose blocks (all at the root, one loop nest each) are
    injective producers, exactly one reduction block, then injective
    epilogues; the reduction's iterators must be spatial-then-reduction, it
    must write ``out[spatial...]`` with at least two spatial axes, and it must
    be a window reduction (some read index mixes a spatial and a reduction
    iterator: conv, pooling) or a column reduction (no read's innermost index
    involves a reduction iterator while the innermost spatial iterator is the
    innermost index of every multi-dimensional read: global pooling in NHWC).
    Everything else (matmul, softmax-style row reductions, ...) is declined.

    Schedule of the reduction block ``out[..., r, v]`` (``v`` the innermost
    output axis, ``r`` the one before it):

    - ``v`` split into vector tiles (1-2 vectors of the target's width), ``r``
      into register rows, so one tile of ``rows x tile`` accumulators lives in
      registers (``local`` cache, rows unrolled, tile vectorized) while the
      reduction loops run around it;
    - all outer spatial loops and the tile loops fused into one ``parallel``
      loop (symbolic extents such as a dynamic batch included); the channel
      tiles go outermost when the weights are larger than one image of
      activations (deep layers), so the weights are streamed once; with
      weights of at least :data:`TAP_ORDER_MIN_WEIGHTS` elements the parallel
      loop is channel tiles x batch and the taps run outside the output rows
      (a whole output tile accumulates tap by tap);
    - epilogues inlined into one block computed per tile, vectorized, so
      bias / activation / residual add cost no extra pass over memory;
    - producers (padding) materialized once, parallel over their outer axes.
    """

    def apply(self, func, target, _tunable):
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):  # noqa: SIM102
            return None
        try:
            sch = s_tir.Schedule(func)
            plan = self._analyze(sch)
            if plan is None:
                return None
            self._schedule(sch, plan, target)
            return sch
        except Exception:  # noqa: BLE001 - ScheduleError or an internal check: decline, never fail the build
            return None

    # ------------------------------------------------------------------ analysis

    @staticmethod
    def _analyze(sch):
        root = sch.get_sblock("root") if _has_root(sch) else None
        if root is None:
            return None
        blocks = sch.get_child_blocks(root)
        stmts = [sch.get(b) for b in blocks]
        red = [i for i, s in enumerate(stmts) if any(iv.iter_type == _REDUCE for iv in s.iter_vars)]
        if len(red) != 1:
            return None
        ci = red[0]
        conv, cstmt = blocks[ci], stmts[ci]
        if any(iv.iter_type not in (_SPATIAL, _REDUCE) for s in stmts for iv in s.iter_vars):
            return None
        kinds = [iv.iter_type for iv in cstmt.iter_vars]
        n_s = kinds.index(_REDUCE)
        if n_s < 2 or any(k != _REDUCE for k in kinds[n_s:]):
            return None
        loops = sch.get_loops(conv)
        if len(loops) != len(kinds):
            return None
        # Each iterator bound straight to its own loop (TE's T.axis.remap), no predicate.
        realize = _realize_of(sch, conv)
        if realize is None or not _is_true(realize.predicate):
            return None
        loop_vars = [sch.get(lp).loop_var for lp in loops]
        if [v.same_as(lv) for v, lv in zip(realize.iter_values, loop_vars)] != [True] * len(loops):
            return None
        svars = [iv.var for iv in cstmt.iter_vars[:n_s]]
        rvars = [iv.var for iv in cstmt.iter_vars[n_s:]]
        if len(cstmt.writes) != 1:
            return None
        w = cstmt.writes[0]
        if len(w.region) != n_s or any(not (_is_unit(r) and r.min.same_as(v)) for r, v in zip(w.region, svars)):
            return None
        # Reduction body reads: the window test looks at each index expression.
        sset, rset = set(svars), set(rvars)
        window = False
        column = True
        inner_s = svars[-1]
        for rd in cstmt.reads:
            if rd.source.same_as(w.source):
                continue
            idx = [r.min for r in rd.region]
            for e in idx:
                vs = _vars_in(e)
                if vs & sset and vs & rset:
                    window = True
            if len(idx) >= 2:
                last = _vars_in(idx[-1])
                if last & rset or not (len(idx[-1:]) and idx[-1].same_as(inner_s)):
                    column = False
        if not (window or column):
            return None
        # Loop order: when the weights (read through the vector axis, not the batch axis)
        # outweigh one image of activations, put the channel tiles outermost so each
        # thread streams its share of the weights once instead of once per output row.
        weight_bytes = act_bytes = None
        for rd in cstmt.reads:
            if rd.source.same_as(w.source) or not rd.region:
                continue
            idx = [r.min for r in rd.region]
            size = 1
            for d in rd.source.shape:
                size = size * _int(d) if size is not None and _int(d) is not None else None
            # Weights: indexed by the vector axis (plain ``w[..., f]`` or packed
            # ``w[f // t, ..., f % t]``), never by the batch axis.
            if any(inner_s in _vars_in(e) for e in idx) and not any(svars[0] in _vars_in(e) for e in idx):
                weight_bytes = size
            elif any(svars[0] in _vars_in(e) for e in idx[:1]):
                per_image = 1
                for d in rd.source.shape[1:]:
                    per_image = per_image * _int(d) if per_image is not None and _int(d) is not None else None
                act_bytes = per_image
        channels_first = bool(weight_bytes and act_bytes and weight_bytes > act_bytes)
        # Pooling: one operand (a conv also reads weights).
        pool = len({rd.source for rd in cstmt.reads if not rd.source.same_as(w.source)}) == 1
        producers = [blocks[i] for i in range(ci)]
        consumers = [blocks[i] for i in range(ci + 1, len(blocks))]
        return {"conv": conv, "n_s": n_s, "producers": producers, "consumers": consumers,
                "out_buffer": w.source, "dtype": w.source.dtype, "channels_first": channels_first,
                "weight_elems": weight_bytes or 0,
                "window": window, "pool": pool}

    # ------------------------------------------------------------------ schedule

    @staticmethod
    def _schedule(sch, plan, target):
        import tvm

        conv, n_s = plan["conv"], plan["n_s"]
        lanes = vector_lanes(target, tvm.DataType(str(plan["dtype"])).bits)
        # Accumulators: the vector registers less room for the weight vectors and the
        # broadcast input (28 of 32 with AVX-512, 12 of 16 with AVX2 / SSE), and at most
        # MAX_ROWS[registers] rows. With 32 registers a 14 x 2-vector tile (28 chains) measured
        # 6-10 % faster than 8 x 2 on ResNet-18's 3x3 convs (Intel Xeon, AVX-512, 2 threads:
        # 56x56x64 267 -> 291 GFLOP/s, 14x14x256 265 -> 294); with 16, 6 x 2 leaves room
        # for the two weight vectors and the broadcast.
        regs = vector_registers(target)
        acc_regs = regs - 4
        max_rows = MAX_ROWS[32 if regs >= 32 else 16]

        # Epilogues: inline all but the last into their consumer; the last is computed per tile.
        consumers = list(plan["consumers"])
        kept = []
        for i, b in enumerate(consumers):
            if i < len(consumers) - 1:
                try:
                    sch.compute_inline(b)
                    continue
                except Exception:  # noqa: BLE001 - a block that cannot be inlined is computed per tile
                    pass
            kept.append(b)

        # Producers of a column reduction (an element-wise chain fused before a global pooling,
        # magika's GELU before its max over time) are inlined into it: one pass over memory,
        # not one parallel pass per op. A window reduction would recompute an inlined producer
        # once per tap, and padding would put a branch in its inner loop: those stay materialized.
        producers = []
        for p in reversed(plan["producers"]):
            if not plan["window"] and not _is_guarded(sch, p):
                try:
                    sch.compute_inline(p)
                    continue
                except Exception:  # noqa: BLE001 - kept as a pass of its own
                    pass
            producers.insert(0, p)
        plan = dict(plan, producers=producers)

        loops = sch.get_loops(conv)
        s_loops, r_loops = loops[:n_s], loops[n_s:]
        # A small reduction (a 32x32 CNN's convs) runs on one thread: waking the pool twice
        # (padding, then the conv) costs more than the few microseconds of work it shares.
        macs = work_size(sch, loops)
        threads = num_cores(target) > 1 and (macs is None or macs >= CONV_PARALLEL_MIN_MACS)
        # Trailing unit axes (NCHW with W = 1, keepdims pooling) do not count: the vector
        # axis is the innermost spatial axis longer than 1, the row axis the one before.
        k = n_s - 1
        while k > 1 and _int(sch.get(s_loops[k]).extent) == 1:
            k -= 1
        units = s_loops[k + 1:]
        # The row axis likewise skips unit axes between it and the vector axis (NHWC with
        # W = 1, a 1-D conv imported as 2-D: rows over H, not one row of W).
        j = k - 1
        while j > 0 and _int(sch.get(s_loops[j]).extent) == 1:
            j -= 1
        v_ext = _int(sch.get(s_loops[k]).extent)
        r_ext = _int(sch.get(s_loops[j]).extent)
        vt = _pick_vector_tile(v_ext, lanes)
        nvec = -(-vt // lanes)
        rows = _pick_rows(r_ext, max(1, min(max_rows, acc_regs // nvec)))
        vo, vi = sch.split(s_loops[k], factors=[None, vt])
        ro, ri = sch.split(s_loops[j], factors=[None, rows])
        outer = s_loops[:j] + s_loops[j + 1:k]
        # Deep convs with a window and large weights (ResNet-18's 3x3 convs at 7x7x512): each
        # thread streams its channel tiles' weights one tap at a time, and every output row of
        # the tile reuses that tap's slice while it is in L1, accumulating in a per-tile buffer;
        # the weights come from beyond L2 once per tile, overlapped with arithmetic, instead of
        # stalling the first output row of every tile (ad-hoc harness, cold weights, 2 threads:
        # 7x7x512 1.27 -> 1.20 ms, its stride-2 conv 0.60 -> 0.58; at 14x14x256, whose 2.4 MB of
        # weights stay in the two cores' L2, it was 2-4 % slower: hence TAP_ORDER_MIN_WEIGHTS).
        # Needs NHWC-like loops (batch, rows, columns, channels; taps then input channels) and
        # enough channel tiles x batch to keep every core busy.
        taps = r_loops[:-1]
        tap_order = (plan["channels_first"] and plan["weight_elems"] >= TAP_ORDER_MIN_WEIGHTS
                     and n_s == 4 and len(r_loops) == 3 and j == 2 and k == 3
                     and any((_int(sch.get(t).extent) or 1) > 1 for t in taps)
                     and (_int(sch.get(vo).extent) or 0) * (_int(sch.get(outer[0]).extent) or 1)
                     >= num_cores(target) * PARALLEL_ITERS_PER_CORE)
        if tap_order:
            sch.reorder(vo, outer[0], *taps, outer[1], ro, r_loops[-1], ri, vi, *units)
            par = sch.fuse(vo, outer[0])
        elif plan["channels_first"]:
            sch.reorder(vo, *outer, ro, *r_loops, ri, vi, *units)
            par = sch.fuse(vo, *outer, ro)
        else:
            sch.reorder(*outer, vo, ro, *r_loops, ri, vi, *units)
            par = sch.fuse(*outer, vo, ro)
        if threads:
            sch.parallel(par)
        if units:
            vi = sch.fuse(vi, *units)

        # Accumulate in a tile-sized local buffer (registers after unrolling), write out per tile.
        wb = sch.cache_write(conv, 0, "local")
        sch.reverse_compute_at(wb, par, preserve_unit_loops=True)
        if kept:
            try:
                sch.compute_inline(wb)  # the first epilogue reads the accumulators directly
                wb = None
            except Exception:  # noqa: BLE001
                pass
        for b in kept:
            sch.reverse_compute_at(b, par, preserve_unit_loops=True)
        for b in ([wb] if wb is not None else []) + kept:
            bl = sch.get_loops(b)
            if len(bl) > 1 and _int(sch.get(bl[-1]).extent) is not None:
                sch.vectorize(bl[-1])

        # Vectorize before splitting off the init: once decomposed, the update block has no
        # init and is no longer a reduction block that vectorize accepts.
        sch.unroll(ri)
        sch.vectorize(vi)
        init = sch.decompose_reduction(conv, r_loops[0])
        il = sch.get_loops(init)
        if sch.get(il[-1]).kind != 2:  # ForKind.VECTORIZED
            sch.vectorize(il[-1])

        # Producers (padding, dilation): one pass, parallel over the outer axes, the innermost
        # axis (channels in NHWC) vectorized when it splits into whole vectors.
        # A pooling's padding is computed per tile, inside the parallel loop: the few input
        # rows one tile reads (1.5x recomputed at stride 2) stay in L1 instead of a padded
        # copy of the whole image going through memory (ResNet's 112x112x64 max-pool:
        # 0.51 -> 0.26 ms). A conv would redo its padding once per channel tile: kept global.
        for p in plan["producers"]:
            if plan["pool"]:
                try:
                    sch.compute_at(p, par, preserve_unit_loops=True)
                    vectorize_inner(sch, sch.get_loops(p)[-1], vector_lanes(target, write_dtype_bits(sch, p)))
                    continue
                except Exception:  # noqa: BLE001 - not computable per tile: one parallel pass below
                    pass
            pl = sch.get_loops(p)
            if len(pl) > 1:
                vectorize_inner(sch, pl[-1], vector_lanes(target, write_dtype_bits(sch, p)))
                if threads:
                    sch.parallel(sch.fuse(*pl[:-1]))
            elif pl and threads:
                sch.parallel(pl[0])


#: Most output rows in one register tile, by the ISA's vector register count (see WindowReduction).
MAX_ROWS = {32: 14, 16: 8}

#: Weight elements from which a deep conv accumulates tap by tap (4 MiB of float32; see WindowReduction).
TAP_ORDER_MIN_WEIGHTS = 1 << 20

#: Multiply-adds below which a conv / pooling kernel runs on one thread (see WindowReduction).
#: The 32x32 test CNN's convs (0.4-0.6 M) measured 2x faster serial than on 2 threads (loaded machine).
CONV_PARALLEL_MIN_MACS = 1 << 20


def _is_guarded(sch, block) -> bool:
    """Whether the block's value has a branch (padding, dilation: ``if_then_else`` / ``Select``)."""
    import tvm_ffi
    from tvm import ir, tirx

    found = []

    def visit_call(call):
        if str(getattr(call.op, "name", "")).rsplit(".", 1)[-1] == "if_then_else":
            found.append(call)

    tvm_ffi.structural_walk(sch.get(block).body, [(ir.Call, visit_call), (tirx.Select, found.append)], order="post")
    return bool(found)


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


def _realize_of(sch, block):
    from tvm_ffi import get_global_func

    return get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)


def _is_true(expr) -> bool:
    from tvm import tirx

    return isinstance(expr, tirx.IntImm) and int(expr.value) == 1


def _is_unit(rng) -> bool:
    return _int(rng.extent) == 1
