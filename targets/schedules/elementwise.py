"""CPU schedule rules: element-wise / injective functions (see :mod:`graphopt.targets.schedules`).

:func:`elementwise_rules` is what ``default_rules()`` appends after the GEMM and
convolution rules: :class:`Injective` (functions whose every block is purely
spatial: casts, arithmetic, activations, broadcasts, transposes, copying
reshapes, layout transforms, concat, slice, gather/take, resize, pad, where),
then :class:`~.reduction.RowReduction` (softmax, layer/RMS norm, mean/sum/max
with an epilogue), then :class:`~.fallback.Fallback` (any other function in
dlight's normal form: outer spatial loops fused and parallel).
"""

from __future__ import annotations

from tvm.s_tir.dlight.base import ScheduleRule

from .common import (
    has_scalar_calls,
    normalized_blocks,
    num_cores,
    parallel_prefix,
    static_extent,
    vector_lanes,
    vectorize_inner,
    work_size,
    worth_parallel,
    write_dtype_bits,
)


# Transposed slices (the two swapped axes) smaller than this are not tiled:
# measured 0.9x for an [8,128,64] batch of 128x64 slices, 1.6-1.9x for
# 256x256 and 512x512 slices (one core, minimum of interleaved rounds).
TILE_MIN_ELEMENTS = 1 << 14


def elementwise_rules() -> list:
    """The rules of this family, most specific first."""
    from .fallback import Fallback
    from .reduction import RowReduction

    return [Injective(), RowReduction(), Fallback()]


def _vars_in(expr) -> set:
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    return collect_vars_used_in_prim_expr(expr)


def _transpose_axis(sch, info) -> int | None:
    """For a block that reads some buffer "across" its output: the loop index that buffer's last dim follows.

    A transpose-like read is one whose innermost index does not use the
    innermost loop's variable but does use exactly one other loop variable:
    walking the output contiguously then strides through that input. Returns
    that other loop's position, or None when every read is contiguous (or
    the access pattern is not a simple one).
    """
    block = sch.get(info.block_rv)
    pos = {it.var: i for i, it in enumerate(info.iters)}
    last = info.iters[-1].var
    if not block.writes or len(block.writes[0].region) == 0:
        return None
    if last not in _vars_in(block.writes[0].region[-1].min):
        return None  # the write itself is not contiguous along the inner loop: leave it alone
    for read in block.reads:
        region = read.region
        if len(region) < 2 or any(not _is_one(r.extent) for r in region):
            continue
        used = _vars_in(region[-1].min) & set(pos)
        if last in used or len(used) != 1:
            continue
        (v,) = used
        return pos[v]
    return None


def _is_one(expr) -> bool:
    from tvm import tirx

    return isinstance(expr, tirx.IntImm) and int(expr.value) == 1


class Injective(ScheduleRule):
    """Every block purely spatial: inline what can be inlined, then per remaining loop nest
    fuse + ``parallel`` the outer loops (when there is enough work) and vectorize the inner one.

    Claims a function when all its blocks are injective (iteration kinds all
    ``S``) in dlight's normal form; declines anything with a reduction or an
    opaque iterator. Transposes (an input read across the output's inner
    axis) are tiled so that both the strided reads and the contiguous writes
    stay within a few cache lines. Correct for symbolic extents (those loops
    are fused and parallel, never split) and for extents smaller than a
    vector.
    """

    def apply(self, func, target, _tunable):
        if "llvm" != target.kind.name:
            return None
        got = normalized_blocks(func)
        if got is None:
            return None
        sch, infos = got
        if not infos or any(not info.is_injective() for info in infos):
            return None
        from tvm.s_tir.dlight.base import try_inline

        infos = try_inline(sch, infos)
        try:
            for info in infos:
                _schedule_spatial_nest(sch, info, target)
        except Exception:  # noqa: BLE001 - a primitive refused this structure: not a function for this rule
            return None
        return sch


def _schedule_spatial_nest(sch, info, target) -> None:
    """Parallelize and vectorize one spatial loop nest (all loops bound 1:1 to the block's spatial iters)."""
    block = info.block_rv
    loops = list(sch.get_loops(block))
    if not loops:
        return
    lanes = vector_lanes(target, write_dtype_bits(sch, block))
    par_ok = worth_parallel(target, work_size(sch, loops))

    t_axis = _transpose_axis(sch, info) if len(loops) == len(info.iters) else None
    if t_axis is not None and t_axis < len(loops) - 1:
        tiled = _tile_transpose(sch, loops, t_axis, lanes, target, par_ok)
        if tiled:
            return

    # Widen a short innermost loop by fusing it with its (static) neighbours, so
    # that a vector holds more than 1-3 elements; writes stay contiguous.
    while len(loops) >= 2:
        inner = static_extent(sch, loops[-1])
        prev = static_extent(sch, loops[-2])
        if inner is None or prev is None or inner >= lanes:
            break
        fused = sch.fuse(loops[-2], loops[-1])
        loops = loops[:-2] + [fused]
    inner = loops[-1]
    outer = loops[:-1]
    if not outer and par_ok and static_extent(sch, inner) is not None and not has_scalar_calls(sch, block):
        # A single loop: give it an outer part to share between the cores.
        ext = static_extent(sch, inner)
        if ext % lanes == 0 and ext // lanes >= num_cores(target):
            outer_l, inner = sch.split(inner, factors=[None, lanes])
            sch.parallel(outer_l)
            sch.vectorize(inner)
            return
    if par_ok and outer:
        parallel_prefix(sch, outer, target)
    if not has_scalar_calls(sch, block):
        vectorize_inner(sch, inner, lanes)


def _tile_transpose(sch, loops, t_axis: int, lanes: int, target, par_ok: bool) -> bool:
    """Tile loops ``t_axis`` and innermost by ``lanes`` x ``lanes`` (static, divisible extents only).

    Inside a tile the writes run contiguously along the inner loop (which is
    vectorized) and the reads contiguously along the tile's other side, so each
    cache line fetched is used ``lanes`` times. Returns False (nothing changed)
    when the extents do not allow it.
    """
    a, z = loops[t_axis], loops[-1]
    ea, ez = static_extent(sch, a), static_extent(sch, z)
    tile = lanes
    if ea is None or ez is None or ea % tile or ez % tile or ea < 2 * tile or ez < tile:
        return False
    if ea * ez < TILE_MIN_ELEMENTS:
        return False  # the whole slice sits in L1/L2: tiling only adds loop overhead
    a_o, a_i = sch.split(a, factors=[None, tile])
    z_o, z_i = sch.split(z, factors=[None, tile])
    sch.reorder(a_o, z_o, a_i, z_i)
    sch.vectorize(z_i)
    if par_ok:
        outer = list(loops[:t_axis]) + [a_o]
        parallel_prefix(sch, outer, target)
    return True
