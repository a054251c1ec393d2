"""CPU schedule rule for row reductions with their prologues/epilogues: softmax, layer/RMS norm, mean.

Strategy of TVM's ``dlight.cpu.Reduction``: every block moved under the
shared leading spatial loop, which is ``parallel`` (when the work is large
enough), so each row is reduced and normalized while it is in cache; the zero
init of each reduction is hoisted out of its loop. A reduction over the row's
last axis is split into one partial result per vector lane (the lane loop
vectorized in TIR), because LLVM left some of those sums as scalar chains;
the element-wise row loops are not vectorized or unrolled in TIR: LLVM's own
vectorization of them measured 1.2-1.5x faster (fast softmax, layer norm, one
core). A function the
strategy does not fit (column reductions, blocks whose leading axes differ, a
``compute_at`` that is refused) is declined instead of failing the build.
"""

from __future__ import annotations

from tvm.s_tir.dlight.base import ScheduleRule

from .common import has_scalar_calls, normalized_blocks, work_size, worth_parallel


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
        sizes = [work_size(sch, sch.get_loops(i.block_rv)) for i in infos]
        work = None if any(w is None for w in sizes) else max(sizes)  # the reduction reads the most
        # Each one-axis reduction becomes per-lane partial results and their sum (before compute_at:
        # rfactor refuses a block that compute_at has moved).
        order = []  # (block, "rf": a lane-partials block | "reduce" | None: injective)
        for info in infos[:-1]:
            # Only a block whose axes are the row's and then one reduction axis (an inner spatial axis
            # would put the lane loop outside it: strided reads, a larger partial buffer), and whose
            # body has no scalar-only call (an exp inside a sum: per-lane calls once vectorized in TIR).
            one_axis = info.dom_kind() == "S" * n_lead + "R"
            rf = _lane_partials(sch, info.block_rv, target) \
                if one_axis and not has_scalar_calls(sch, info.block_rv) else None
            if rf is not None:
                order.append((rf, "rf"))
            order.append((info.block_rv, None if info.is_injective() else "reduce"))
        loops = sch.get_loops(last)
        spatial = sch.fuse(*loops[:n_lead]) if n_lead > 1 else loops[0]
        if worth_parallel(target, work):
            sch.parallel(spatial)
        for block, _ in reversed(order):
            sch.compute_at(block, spatial, preserve_unit_loops=True)
        for block, kind in order:
            # Injective row loops are not vectorized in TIR: LLVM's own vectorization of them
            # measured 1.2-1.5x faster than a TIR ``vectorize`` at the register width (fast
            # softmax and layer norm, one core).
            under = _loops_under(sch, sch.get_loops(block), spatial)
            if kind is None or not under:
                continue
            if kind == "rf":
                # Loops under the row: (lane, unit loops..., step). The lane loop goes innermost and
                # is vectorized: each step adds one vector into the partial results; the init before
                # the steps is one vector store. The partial results stay in the default scope: a
                # row's one vector of them becomes a stack array LLVM keeps in a register, while a "local"
                # buffer was allocated from the workspace pool once per row (a call each way).
                lane, step = under[0], under[-1]
                sch.reorder(step, *under[1:-1], lane)
                sch.vectorize(lane)
                sch.decompose_reduction(block, step)
            else:
                # The init goes before the block's loops under the row, not as a branch inside them.
                # (A reduction loop not split into lanes is left whole for LLVM to vectorize.)
                sch.decompose_reduction(block, under[0])


def _loops_under(sch, loops, outer) -> list:
    """The loops of ``loops`` (a block's, outermost first) nested under ``outer``."""
    for i, lp in enumerate(loops):
        if sch.get(lp).same_as(sch.get(outer)):
            return loops[i + 1:]
    raise ValueError("the block is not under the row loop")


def _lane_partials(sch, block, target):
    """Split a one-axis reduction into one partial result per vector lane; returns the rfactor block, or None.

    LLVM does not reassociate every float reduction TVM emits: a layer norm's
    mean came out as a chain of scalar ``vaddss``, one add per element, four
    cycles each (ad-hoc harness: a [128, 256] layer norm took 67 us; with lanes, 10 us). Here
    the row is reduced as ``lanes`` interleaved partial results (``rfactor``:
    block ``x_rf[lane] += x[step * lanes + lane]``), then ``block`` reduces
    the lanes once per row. The order of the additions is fixed by the
    schedule, so results are deterministic. None when the reduction loop is
    symbolic, shorter than two vectors or not a multiple of the lanes (``block``
    unchanged), or when rfactor refuses the block (its split loop is fused
    back: the same single loop).
    """
    from .common import static_extent, vector_lanes, write_dtype_bits

    loops = sch.get_loops(block)
    if not loops:
        return None
    lanes = vector_lanes(target, write_dtype_bits(sch, block))
    extent = static_extent(sch, loops[-1])
    if lanes <= 1 or extent is None or extent < 2 * lanes or extent % lanes:
        return None
    _, inner = sch.split(loops[-1], [None, lanes])
    try:
        return sch.rfactor(inner, factor_axis=0)
    except Exception:  # noqa: BLE001 - e.g. a reducer rfactor does not know
        # Undo the split, so the block keeps the single reduction loop LLVM vectorizes.
        sch.fuse(*sch.get_loops(block)[-2:])
        return None
