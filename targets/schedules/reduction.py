"""CPU schedule rule for row reductions with their prologues/epilogues: softmax, layer/RMS norm, mean.

Strategy of TVM's ``dlight.cpu.Reduction``: every block moved under the
shared leading spatial loop, which is ``parallel`` (when the work is large
enough), so each row is reduced and normalized while it is in cache; the zero
init of each reduction is hoisted out of its loop. Unlike dlight, the row loops
are not vectorized or unrolled in TIR: LLVM's own vectorization of them
measured 1.2-1.5x faster (fast softmax, layer norm, one core). A function the
strategy does not fit (column reductions, blocks whose leading axes differ, a
``compute_at`` that is refused) is declined instead of failing the build.
"""

from __future__ import annotations

from tvm.s_tir.dlight.base import ScheduleRule

from .common import normalized_blocks, work_size, worth_parallel


def _leading_s(dom_kind: str) -> int:
    return len(dom_kind) - len(dom_kind.lstrip("S"))


def _same_extents(a, b) -> bool:
    """Whether two lists of loop extents (ints, or symbolic expressions) are the same."""
    import tvm_ffi

    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, int) or isinstance(y, int):
            if not (isinstance(x, int) and isinstance(y, int) and x == y):
                return False
        elif not tvm_ffi.structural_equal(x, y):
            return False
    return True


def _row_contiguous(sch, info) -> bool:
    """Whether every input the reduction block reads along its innermost reduction axis has that axis last.

    True for softmax / norms / mean over the last axis (each row is read
    contiguously); False for a matrix-vector product reading ``W[k, n]`` along
    ``k``, whose rows this strategy would walk with a stride.
    """
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    r_vars = [it.var for it in info.iters if it.kind == "R"]
    if not r_vars:
        return True
    r = r_vars[-1]
    block = sch.get(info.block_rv)
    for read in block.reads:
        used = [collect_vars_used_in_prim_expr(rg.min) for rg in read.region]
        if any(r in u for u in used) and (not used or r not in used[-1]):
            return False
    return True


class RowReduction(ScheduleRule):
    """Functions of >= 2 blocks, at least one a reduction, the last one injective, all starting with spatial axes.

    Example: softmax = max (SR) -> exp (SS) -> sum (SR) -> divide (SS); layer
    norm = mean/variance (SR) -> normalize (SS). The leading spatial axes
    (batch, rows; symbolic ones included) are fused and run in parallel, each
    row's blocks computed together while the row is in cache.
    """

    def apply(self, func, target, _tunable):
        if "llvm" != target.kind.name:
            return None
        got = normalized_blocks(func)
        if got is None:
            return None
        sch, infos = got
        if len(infos) < 2 or all(i.is_injective() for i in infos) or not infos[-1].is_injective():
            return None
        kinds = [i.dom_kind() for i in infos]
        if any(not k or k[0] != "S" for k in kinds):
            return None
        n_lead = min(_leading_s(k) for k in kinds)
        if not n_lead:
            return None
        lead_dom = infos[-1].dom()[:n_lead]
        if any(not _same_extents(i.dom()[:n_lead], lead_dom) for i in infos):
            # E.g. a convolution's padding block ([C, W+2]) before the conv ([K, W, C, R]):
            # computing it under the output's loop would redo it for every output row.
            return None
        if any(not i.is_injective() and not _row_contiguous(sch, i) for i in infos):
            return None  # e.g. a matrix-vector product: the reduction walks a column (GEMM / fallback)
        try:
            self._schedule(sch, infos, n_lead, target)
        except Exception:  # noqa: BLE001 - a primitive refused (e.g. compute_at): not a function for this rule
            return None
        return sch

    @staticmethod
    def _schedule(sch, infos, n_lead, target):
        last = infos[-1].block_rv
        loops = sch.get_loops(last)
        spatial = sch.fuse(*loops[:n_lead]) if n_lead > 1 else loops[0]
        sizes = [work_size(sch, sch.get_loops(i.block_rv)) for i in infos]
        work = None if any(w is None for w in sizes) else max(sizes)  # the reduction reads the most
        if worth_parallel(target, work):
            sch.parallel(spatial)
        for info in reversed(infos[:-1]):
            sch.compute_at(info.block_rv, spatial, preserve_unit_loops=True)
        for info in infos:
            inner = sch.get_loops(info.block_rv)
            if len(inner) <= 1:
                continue
            if info.is_injective():
                # Not vectorized in TIR: LLVM's own vectorization of these row
                # loops measured 1.2-1.5x faster than a TIR ``vectorize`` at the
                # register width (fast softmax and layer norm, one core).
                continue
            else:
                # The reduction's inner loop is left whole: LLVM vectorizes it
                # (TVM emits fast-math flags, so it may reassociate the sum/max);
                # splitting and unrolling it here made a serial chain, 1.3-1.5x slower.
                n_r = sum(1 for it in info.iters if it.kind == "R")
                # The init goes before the reduction loops, not as a branch inside them.
                r_loops = sch.get_loops(info.block_rv)
                if n_r and len(r_loops) > n_r:
                    sch.decompose_reduction(info.block_rv, r_loops[len(r_loops) - n_r])
