"""CPU fallback schedule: whatever no other rule claimed gets its outer spatial loops fused and parallel."""

from __future__ import annotations

from tvm.s_tir.dlight.base import ScheduleRule

from .common import has_scalar_calls, normalized_blocks, parallel_prefix, vector_lanes, vectorize_inner, work_size, worth_parallel, write_dtype_bits


class Fallback(ScheduleRule):
    """Any function in dlight's normal form: per block, fuse its
    leading spatial loops and mark them ``parallel`` (when there is enough work), and vectorize
    an all-spatial nest's inner loop.

    Only loops bound to data-parallel iterators are parallelized, so no two
    threads ever write one element or share a reduction. Declines functions
    not in normal form (opaque blocks, non-trivial bindings) and functions it
    would leave unchanged, so :func:`~.report.schedule_report` shows them as
    unscheduled.
    """

    def apply(self, func, target, _tunable):
        if "llvm" != target.kind.name:
            return None
        got = normalized_blocks(func)
        if got is None:
            return None
        sch, infos = got
        # No inlining here: folding a producer such as a padding block into a
        # reduction puts its condition in the innermost loop (several times
        # slower for a convolution); every block keeps its own loop nest.
        try:
            changed = self._schedule(sch, infos, target)
        except Exception:  # noqa: BLE001 - a primitive refused this structure: leave the function as it is
            return None
        return sch if changed else None

    @staticmethod
    def _schedule(sch, infos, target) -> bool:
        changed = False
        for info in infos:
            loops = list(sch.get_loops(info.block_rv))
            kind = info.dom_kind()
            if len(loops) != len(kind):
                continue  # the nest changed shape while inlining: leave it as it is
            if "O" in kind:
                continue  # an opaque iterator (a scan, an in-place update): order matters, keep it serial
            lead = len(kind) - len(kind.lstrip("S"))
            if 0 < lead < len(kind) and kind[lead:] == "R" * (len(kind) - lead) and _column_reduction(sch, info):
                _schedule_column_reduction(sch, info, loops, lead, target)
                changed = True
                continue
            if lead == len(kind) and lead:
                lanes = vector_lanes(target, write_dtype_bits(sch, info.block_rv))
                if not has_scalar_calls(sch, info.block_rv) and vectorize_inner(sch, loops[-1], lanes) is not None:
                    changed = True
                    loops = list(sch.get_loops(info.block_rv))[: lead - 1] if lead > 1 else []
                    lead = len(loops)
            if lead and worth_parallel(target, work_size(sch, list(sch.get_loops(info.block_rv)))):
                parallel_prefix(sch, loops[:lead], target)
                changed = True
        return changed



def _column_reduction(sch, info) -> bool:
    """A reduction whose inputs are contiguous along the last *spatial* axis, not the reduction one.

    E.g. ``y[n] += x[k] * W[k, n]`` (a matrix-vector product against a
    row-major weight) or a sum over a middle axis: walking ``k`` innermost
    strides through memory, walking ``n`` innermost does not.
    """
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    s_last = [it.var for it in info.iters if it.kind == "S"][-1]
    r_vars = {it.var for it in info.iters if it.kind == "R"}
    block = sch.get(info.block_rv)
    strided = False
    for read in block.reads:
        if not read.region:
            continue
        last = collect_vars_used_in_prim_expr(read.region[-1].min)
        outer = set().union(*(collect_vars_used_in_prim_expr(rg.min) for rg in read.region[:-1]))
        if last & r_vars and s_last in outer:
            return False  # an input is read along k in rows of n (W[n, k]): a row reduction, keep the order
        if s_last in last and outer & r_vars:
            strided = True
    return strided


def _schedule_column_reduction(sch, info, loops, lead, target) -> None:
    """Move the reduction loops inside the spatial ones but outside a tile of the last spatial loop.

    The last spatial loop is split into tiles of a few vectors; per tile the
    reduction runs outermost and the tile innermost (``acc[n:n+T] += x[k] *
    W[k, n:n+T]``, contiguous, which LLVM vectorizes). The spatial prefix and
    the tile index are parallel when the work is large enough.
    """
    lanes = vector_lanes(target, write_dtype_bits(sch, info.block_rv))
    par_ok = worth_parallel(target, work_size(sch, loops))
    s_loops, r_loops = loops[:lead], loops[lead:]
    last = s_loops[-1]
    ext = sch.get(last).extent
    tile = None
    from tvm import tirx

    if isinstance(ext, tirx.IntImm):
        e = int(ext.value)
        for cand in (lanes * 4, lanes * 2, lanes):
            if e % cand == 0 and e > cand:
                tile = cand
                break
    if tile is None:
        # No clean tile: whole last axis innermost (still contiguous).
        sch.reorder(*s_loops[:-1], *r_loops, last)
        prefix = s_loops[:-1]
    else:
        s_o, s_i = sch.split(last, factors=[None, tile])
        sch.reorder(*s_loops[:-1], s_o, *r_loops, s_i)
        prefix = [*s_loops[:-1], s_o]

    if prefix and par_ok:
        parallel_prefix(sch, prefix, target)
    # The zero-init goes before the reduction loops instead of a branch in the
    # inner loop (after ``parallel``, which wants the block still whole).
    sch.decompose_reduction(info.block_rv, r_loops[0])
