"""Winograd convolutions: 3x3, stride-1 float32 convs in fewer multiplications (CPU).

F(m x m, 3 x 3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2015) computes an m x m output tile from an (m+2) x (m+2) input tile
with (m+2)^2 multiplications per input/output channel pair instead of 9 m^2:
F(2x2) 2.25x fewer, F(4x4) 4x fewer. The work becomes

1. input transform ``V = B^T d B`` of every input tile (additions, a few
   multiplications by small constants);
2. ``(m+2)^2`` independent GEMMs ``M[xi, nu] = V[xi, nu] @ U[xi, nu]`` over the
   input channels, where ``U = G w G^T`` is the transformed weight;
3. output transform ``Y = A^T M A`` and the conv's fused epilogue.

Two halves, as in :mod:`.conv`:

- :func:`winograd_pass` (Relax, before legalization) replaces each eligible
  NHWC/HWIO conv2d with a TE kernel reading the transformed weights, chosen by
  :func:`choose_tile`. ``U`` is computed from the weight parameter by a TE
  function of its own, which the prepack step (``LiftTransformParams``) runs
  once at lower time; the artifact stores ``U`` (``(m+2)^2 / 9`` times the
  weight's bytes: 1.78x for F(2x2), 4x for F(4x4)), so the pass converts convs
  only while the extra bytes stay within :data:`GROWTH_BUDGET` of the model's
  weights: the convs over the largest images first (they gain the most), each
  with the largest tile that still fits (F(4x4), else F(2x2), else direct).
- :class:`WinogradConv` (the schedule rule) runs the whole pipeline per tile
  group in one parallel loop: each thread transforms a row of input tiles for
  every channel into a buffer that stays in cache, then, per vector tile of
  output channels, runs the GEMMs with a register tile of ``rows x vector``
  accumulators and the output transform with the epilogue (bias, residual add,
  activation) fused. Nothing but the padded input goes through memory.

Measured (``benchmarks/bench_cpu.py``, ResNet-18 3x3 convs, 2 threads, AVX-512):
see the README's performance section. Winograd is not exact convolution
arithmetic: outputs differ from a direct conv by float rounding (relative
error ~1e-6 for F(2x2), ~1e-5 for F(4x4) against the output's magnitude).
``--target-opt winograd=false`` turns it off.
"""

from __future__ import annotations

import numpy as np

from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from .common import num_cores, parallel_prefix, static_extent, vector_lanes, vectorize_inner, write_dtype_bits
from .conv import MAX_ROWS, _int, _pick_rows, _pick_vector_tile, nchw_source, vector_registers

#: Block annotation that marks the stages of a Winograd kernel for :class:`WinogradConv`.
STAGE_ATTR = "graphopt.winograd_stage"

#: Extra bytes the transformed weights may add, as a fraction of the model's weight bytes:
#: the artifact's packed weights grow at most this much (F(2x2) of every 3x3 conv adds 0.78x).
GROWTH_BUDGET = 1.0

#: ``m -> (B^T, G, A^T)`` for F(m x m, 3 x 3), points 0, +-1 (and +-2 for m = 4), infinity.
MATRICES = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                 dtype=np.float64)),
}

#: Output pixels per image from which F(4x4) beats F(2x2), and from which F(2x2) beats the
#: direct conv (ResNet-18's 3x3 convs in an ad-hoc kernel harness, not a script here; 2 threads,
#: Intel Xeon AVX-512, warm caches: at 56x56 F(4x4) 0.36 ms, F(2x2) 0.49, direct
#: 0.75; at 28x28 F(2x2) 0.45, F(4x4) 0.44, direct 0.75; at 14x14 F(2x2) 0.70, direct 0.74,
#: at 7x7 direct is 1.5x faster: few tiles, and the weights, not the arithmetic, bound it).
F4_MIN_PIXELS = 48 * 48
F2_MIN_PIXELS = 20 * 20
#: Fewest input channels for which the GEMMs pay for the transforms.
MIN_CHANNELS = 16


def choose_tile(oh: int, ow: int, in_channels: int) -> int | None:
    """The output tile ``m`` of F(m x m, 3 x 3) for a stride-1 3x3 conv with an ``oh x ow`` output, or None (direct)."""
    if in_channels < MIN_CHANNELS:
        return None
    if oh * ow >= F4_MIN_PIXELS and oh % 4 == 0 and ow % 4 == 0:
        return 4
    if oh * ow >= F2_MIN_PIXELS and oh % 2 == 0 and ow % 2 == 0:
        return 2
    return None


def _sel(idx, exprs):
    """``exprs[k]`` where ``idx == k`` (a select chain the unrolled loop over ``idx`` folds away)."""
    from tvm import tirx

    e = exprs[-1]
    for k in range(len(exprs) - 2, -1, -1):
        e = tirx.Select(idx == k, exprs[k], e)
    return e


def _lin(coefs, terms, dtype):
    """``sum(c * t)`` over the non-zero coefficients, without multiplying by +-1."""
    from tvm import tirx

    acc = None
    for c, t in zip(coefs, terms):
        if c == 0:
            continue
        v = t if c == 1 else (-t if c == -1 else t * tirx.const(float(c), dtype))
        acc = v if acc is None else acc + v
    return acc if acc is not None else tirx.const(0.0, dtype)


def te_weight_transform(weight, m: int, t: int):
    """``U[xi, nu, o // t, i, o % t] = (G w[:, :, i, o] G^T)[xi, nu]`` from an HWIO 3x3 weight, computed in float64."""
    from tvm import te

    _bt, g, _at = MATRICES[m]
    al = m + 2
    _kh, _kw, ci, co = weight.shape
    dtype = weight.dtype

    def body(xi, nu, fo, i, fi):
        w = [[weight[r, s, i, fo * t + fi].astype("float64") for s in range(3)] for r in range(3)]
        rows = [_sel(nu, [_lin(g[q], w[r], "float64") for q in range(al)]) for r in range(3)]
        return _sel(xi, [_lin(g[p], rows, "float64") for p in range(al)]).astype(dtype)

    return te.compute((al, al, co // t, ci, t), body, name="winograd_weight")


def te_winograd_conv(data, u, padding, m: int, nchw_in: bool = False):
    """NHWC output of a stride-1 3x3 conv of ``data`` (NHWC, or NCHW when ``nchw_in``) with transformed weights ``u``.

    The output's height and width must be multiples of ``m``. Stages (block
    annotation :data:`STAGE_ATTR`): ``pad``, ``V1``/``V`` (input transform, rows
    then columns), ``M`` (the GEMMs), ``Y1``/``out`` (output transform).
    """
    import tvm
    from tvm import te, topi

    bt, _g, at = MATRICES[m]
    al = m + 2
    if nchw_in:
        n, c, h, w = data.shape
    else:
        n, h, w, c = data.shape
    _a, _b, fo, _c, t = u.shape
    dtype = data.dtype
    pt, pl, pb, pr = padding
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    th, tw = oh // m, ow // m

    def stage(name):
        return {STAGE_ATTR: name}

    if nchw_in:
        def pad_nchw(b, y, x, cc):
            inside = tvm.tirx.all(y >= pt, y < h + pt, x >= pl, x < w + pl)
            return tvm.tirx.if_then_else(
                inside, data[b, cc, te.max(te.min(y - pt, h - 1), 0), te.max(te.min(x - pl, w - 1), 0)],
                tvm.tirx.const(0, dtype))
        padded = te.compute((n, h + pt + pb, w + pl + pr, c), pad_nchw, name="pad_temp", attrs=stage("pad"))
    elif any(int(p) for p in padding):
        padded = topi.nn.pad(data, [0, pt, pl, 0], [0, pb, pr, 0], name="pad_temp")
    else:
        padded = data
    v1 = te.compute(
        (al, n, th, tw, al, c),
        lambda xi, b, y, x, j, cc: _sel(xi, [_lin(bt[k], [padded[b, y * m + i, x * m + j, cc] for i in range(al)], dtype)
                                           for k in range(al)]),
        name="winograd_V1", attrs=stage("V1"))
    v = te.compute(
        (al, al, n, th, tw, c),
        lambda xi, nu, b, y, x, cc: _sel(nu, [_lin(bt[k], [v1[xi, b, y, x, j, cc] for j in range(al)], dtype)
                                             for k in range(al)]),
        name="winograd_V", attrs=stage("V"))
    rc = te.reduce_axis((0, c), name="rc")
    mm = te.compute(
        (al, al, n, th, tw, fo * t),
        lambda xi, nu, b, y, x, k: te.sum(v[xi, nu, b, y, x, rc] * u[xi, nu, k // t, rc, k % t], axis=rc),
        name="winograd_M", attrs=stage("M"))
    y1 = te.compute(
        (m, n, th, tw, al, fo * t),
        lambda a, b, y, x, nu, k: _sel(a, [_lin(at[q], [mm[xi, nu, b, y, x, k] for xi in range(al)], dtype)
                                          for q in range(m)]),
        name="winograd_Y1", attrs=stage("Y1"))
    return te.compute(
        (n, oh, ow, fo * t),
        lambda b, y, x, k: _sel(x % m, [_lin(at[q], [y1[y % m, b, y // m, x // m, nu, k] for nu in range(al)], dtype)
                                       for q in range(m)]),
        name="conv2d_winograd", attrs=stage("out"))


def _ty(expr):
    """The Relax type of ``expr`` (``.ty`` in TVM 0.27, ``.struct_info`` before)."""
    return getattr(expr, "ty", None) or expr.struct_info


def _weight_param(mutator, expr, weight_params) -> bool:
    """Whether ``expr`` is a weight parameter of ``main``, possibly through ConvertLayout's ``permute_dims``."""
    from tvm import relax

    seen = 0
    while isinstance(expr, relax.Var) and seen < 4:
        if any(expr.same_as(p) for p in weight_params):
            return True
        bound = mutator.lookup_binding(expr)
        if not (isinstance(bound, relax.Call) and getattr(bound.op, "name", None) == "relax.permute_dims"):
            return False
        expr = bound.args[0]
        seen += 1
    return False


def winograd_pass(target, used: list | None = None, budget: float | None = None):
    """A Relax pass: eligible NHWC/HWIO conv2d calls become Winograd TE kernels (see the module docstring).

    Eligible: float32, 3x3 kernel, stride 1, dilation 1, one group, static
    channels and spatial size, output channels a multiple of the vector tile,
    a tile from :func:`choose_tile`, and a weight that is a weight parameter of
    ``main`` (so its transform is lifted and runs once). ``used`` collects
    ``{"m": tile, "extra_bytes": bytes the transformed weight adds}`` per converted conv.
    """
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from graphopt.relax import rewrite_relax_functions

    conv_op = tvm.ir.Op.get("relax.nn.conv2d")
    lanes = vector_lanes(target, 32)

    def plan(call):
        """``(m, t, extra bytes)`` for a conv call, or None when it stays a direct conv."""
        a = call.attrs
        if (a.data_layout, a.kernel_layout, a.out_layout) != ("NHWC", "HWIO", "NHWC") or int(a.groups) != 1:
            return None
        if any(int(s) != 1 for s in a.strides) or any(int(d) != 1 for d in a.dilation):
            return None
        if str(_ty(call).dtype) != "float32" or str(a.out_dtype or "float32") not in ("float32", ""):
            return None
        data, weight = call.args
        wdims = [_int(d) for d in getattr(_ty(weight).shape, "values", [None])]
        odims = [_int(d) for d in getattr(_ty(call).shape, "values", [None])]
        if len(wdims) != 4 or wdims[:2] != [3, 3] or any(d is None for d in wdims) \
                or len(odims) != 4 or any(d is None for d in odims[1:]) \
                or str(_ty(weight).dtype) != "float32" or str(_ty(data).dtype) != "float32":
            return None
        ci, co = wdims[2], wdims[3]
        t = _pick_vector_tile(co, lanes)
        if co % t:
            return None
        m = choose_tile(odims[1], odims[2], ci)
        if m is None:
            return None
        # (tile, extra bytes) from the preferred tile down: F(4x4) may fall back to F(2x2) for the budget.
        options = [(k, ((k + 2) ** 2 - 9) * ci * co * 4) for k in (4, 2) if k <= m]
        return options, t, odims[1] * odims[2]

    @mutator
    class _Scan(PyExprMutator):
        """Finds the candidate convs of ``main`` (calls whose weight is a weight parameter)."""

        def __init__(self, mod, weight_params):
            super().__init__(mod)
            self.weight_params = weight_params
            self.found = []

        def visit_call_(self, call):
            if isinstance(call.op, tvm.ir.Op) and call.op.same_as(conv_op):
                p = plan(call)
                if p is not None and _weight_param(self, call.args[1], self.weight_params):
                    self.found.append((call, p))
            return super().visit_call_(call)

    @mutator
    class _Rewrite(PyExprMutator):
        def __init__(self, mod, chosen):
            super().__init__(mod)
            self.chosen = chosen

        def visit_call_(self, call):
            hit = next((p for c, p in self.chosen if c.same_as(call)), None)
            call = super().visit_call_(call)
            if hit is None:
                return call
            m, t, extra = hit
            data, weight = call.args
            u = self.builder_.emit(self.builder_.call_te(te_weight_transform, weight, m, t,
                                                         primfunc_name_hint="winograd_weight_transform"))
            src = nchw_source(self, data)
            if used is not None:
                used.append({"m": m, "extra_bytes": extra})
            return self.builder_.call_te(te_winograd_conv, src, u, [int(v) for v in call.attrs.padding], m,
                                         src is not data, primfunc_name_hint=f"conv2d_winograd_f{m}")

    @tvm.transform.module_pass(opt_level=0, name="graphopt.WinogradConvs")
    def _pass(mod, _ctx):
        main = next((f for gv, f in mod.functions_items() if gv.name_hint == "main"), None)
        if not isinstance(main, relax.Function):
            return mod
        num_input = main.attrs.get("num_input") if main.attrs is not None else None
        if num_input is None:
            return mod  # weights are not parameters: their transform could not be lifted
        weight_params = list(main.params[int(num_input):])
        total = 0
        for p in weight_params:
            dims = [_int(d) for d in getattr(_ty(p).shape, "values", [None])]
            if any(d is None for d in dims) or not hasattr(_ty(p), "dtype"):
                continue
            total += int(np.prod(dims, dtype=np.int64)) * np.dtype(str(_ty(p).dtype)).itemsize
        scan = _Scan(mod, weight_params)
        scan.visit_expr(main)
        # The largest images first: the conv there is bound by arithmetic, which Winograd cuts.
        chosen, spent = [], 0
        for call, (options, t, _pixels) in sorted(scan.found, key=lambda cp: -cp[1][2]):
            for m, extra in options:
                if spent + extra <= (GROWTH_BUDGET if budget is None else budget) * total:
                    chosen.append((call, (m, t, extra)))
                    spent += extra
                    break
        if not chosen:
            return mod
        return rewrite_relax_functions(mod, lambda m: _Rewrite(m, chosen))

    return _pass


def _stage(sch, block) -> str | None:
    ann = sch.get(block).annotations
    v = ann.get(STAGE_ATTR) if ann is not None else None
    return str(v) if v is not None else None


class WinogradConv(CPUScheduleRule):
    """Schedules the fused PrimFunc of a :func:`te_winograd_conv` kernel and its epilogue.

    Claims a function whose root blocks are: an optional padding pass, the
    stages ``V1, V, M, Y1, out`` (by their :data:`STAGE_ATTR` annotation),
    then injective epilogues. Schedule, with ``(b, ty, tx)`` output tiles
    and ``k`` output channels:

    - epilogues that write an NHWC tensor of the output's shape are inlined
      into the last of them (the anchor); its loops split into tile rows, tile
      groups of ``rows`` tiles and vector tiles of channels; ``(b, ty, tx-group)``
      fused and parallel, channel tiles serial inside;
    - per parallel iteration: ``V1, V`` for the group's tiles and all input
      channels; per channel tile: the GEMMs (``rows x vector`` accumulators in
      registers over the input channels), ``Y1`` and the anchor, unrolled over
      the tile's pixels and vectorized over channels;
    - padding inlined into ``V1``; epilogues that change the layout: parallel passes after.
    """

    def apply(self, func, target, _tunable):
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            sch = s_tir.Schedule(func)
            return sch if self._schedule(sch, target) else None
        except Exception:  # noqa: BLE001 - a shape the rule did not foresee: decline, never fail the build
            return None

    @staticmethod
    def _schedule(sch, target) -> bool:
        root = sch.get_sblock("root")
        blocks = list(sch.get_child_blocks(root))
        stages = {}
        for b in blocks:
            s = _stage(sch, b)
            if s is not None:
                stages[s] = b
        if not all(k in stages for k in ("V1", "V", "M", "Y1", "out")):
            return False
        idx = [i for i, b in enumerate(blocks) if _stage(sch, b) == "out"][0]
        producers = blocks[:[i for i, b in enumerate(blocks) if _stage(sch, b) == "V1"][0]]
        m = _int(sch.get(stages["Y1"]).writes[0].source.shape[0])  # Y1 is [m, n, th, tw, m + 2, k]
        # Padding is read straight from the input by the input transform (a bounds test per
        # tile row, not a padded copy of the image through memory and a parallel pass of its own).
        kept = []
        for p in reversed(producers):
            try:
                sch.compute_inline(p)
            except Exception:  # noqa: BLE001 - not inlinable: one parallel pass before the tiles
                kept.insert(0, p)
        producers = kept
        anchor = stages["out"]
        out_shape = [_int(d) for d in sch.get(anchor).writes[0].source.shape[1:]]
        later = blocks[idx + 1:]
        while later:
            nxt = later[0]
            st = sch.get(nxt)
            if len(st.writes) != 1 or [_int(d) for d in st.writes[0].source.shape[1:]] != out_shape \
                    or len(sch.get_loops(nxt)) != 4:
                break
            try:
                sch.compute_inline(anchor)
            except Exception:  # noqa: BLE001 - not inlinable: it stays the anchor
                break
            anchor = nxt
            later = later[1:]

        lanes = vector_lanes(target, 32)
        u_tile = _int(sch.get(stages["M"]).reads[1].source.shape[-1])
        regs = vector_registers(target)
        nvec = -(-u_tile // lanes)
        max_rows = MAX_ROWS[32 if regs >= 32 else 16]
        b, y, x, k = sch.get_loops(anchor)
        ow = static_extent(sch, x)
        if ow is None or static_extent(sch, y) is None or ow % m:
            return False
        rows = _pick_rows(ow // m, max(1, min(max_rows, (regs - 4) // nvec)))
        ty, ay = sch.split(y, [None, m])
        txo, tx_ax = sch.split(x, [None, rows * m])
        txi, ax = sch.split(tx_ax, [None, m])
        ko, ki = sch.split(k, [None, u_tile])
        sch.reorder(b, ty, txo, ko, ay, txi, ax, ki)
        par = sch.fuse(b, ty, txo)
        if num_cores(target) > 1:
            sch.parallel(par)
        sch.vectorize(ki)
        sch.unroll(ax)
        sch.unroll(ay)

        y1 = stages["Y1"]
        sch.compute_at(y1, ko, preserve_unit_loops=True)
        yl = sch.get_loops(y1)[-6:]  # a, b, ty, tx, nu, k
        sch.unroll(yl[0])
        sch.unroll(yl[4])
        sch.vectorize(yl[5])

        mm = stages["M"]
        sch.compute_at(mm, ko, preserve_unit_loops=True)
        xi, nu, _mb, _mty, mtx, mk, rc = sch.get_loops(mm)[-7:]
        sch.reorder(xi, nu, rc, mtx, mk)
        wb = sch.cache_write(mm, 0, "local")
        sch.reverse_compute_at(wb, nu, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(wb)[-1])
        sch.unroll(mtx)
        sch.vectorize(mk)
        sch.decompose_reduction(mm, rc)

        for name, unrolled in (("V", 2), ("V1", 1)):
            blk = stages[name]
            sch.compute_at(blk, par, preserve_unit_loops=True)
            bl = sch.get_loops(blk)
            inner = vectorize_inner(sch, bl[-1], lanes)
            if inner is None and static_extent(sch, bl[-1]) is None:
                return False
            for lp in bl[1:1 + unrolled]:
                sch.unroll(lp)

        for p in producers:
            pl = sch.get_loops(p)
            vectorize_inner(sch, pl[-1], vector_lanes(target, write_dtype_bits(sch, p)))
            if num_cores(target) > 1 and len(pl) > 1:
                parallel_prefix(sch, pl[:-1], target)
        for c in later:
            cl = sch.get_loops(c)
            if cl:
                vectorize_inner(sch, cl[-1], vector_lanes(target, write_dtype_bits(sch, c)))
                if num_cores(target) > 1 and len(cl) > 1:
                    parallel_prefix(sch, cl[:-1], target)
        return True


def winograd_rules() -> list:
    """The Winograd schedule rule (tried before the general conv rule, which would claim its kernels slowly)."""
    return [WinogradConv()]
