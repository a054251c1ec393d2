"""CPU fallback schedule: whatever no other rule claimed gets its outer spatial loops fused and parallel."""

from __future__ import annotations

from tvm.s_tir.dlight.base import ScheduleRule

from .common import normalized_blocks, parallel_prefix, vector_lanes, vectorize_inner, work_size, worth_parallel, write_dtype_bits


class Fallback(ScheduleRule):
    """Any function in dlight's normal form: inline spatial blocks, then per loop nest fuse its
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
        from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

        infos = try_inline_contiguous_spatial(sch, infos)
        changed = False
        for info in infos:
            loops = list(sch.get_loops(info.block_rv))
            kind = info.dom_kind()
            if len(loops) != len(kind):
                continue  # the nest changed shape while inlining: leave it as it is
            lead = len(kind) - len(kind.lstrip("S"))
            if lead == len(kind) and lead:
                lanes = vector_lanes(target, write_dtype_bits(sch, info.block_rv))
                if vectorize_inner(sch, loops[-1], lanes) is not None:
                    changed = True
                    loops = list(sch.get_loops(info.block_rv))[: lead - 1] if lead > 1 else []
                    lead = len(loops)
            if lead and worth_parallel(target, work_size(sch, list(sch.get_loops(info.block_rv)))):
                parallel_prefix(sch, loops[:lead], target)
                changed = True
        return sch if changed else None

