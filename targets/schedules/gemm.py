"""CPU schedule rules: gemm (see :mod:`graphopt.targets.schedules`).

:class:`Matmul` claims every fused PrimFunc whose one reduction block is a
matmul-like contraction ``C[S.., I.., J] += A[S.., I.., K..] * B[S.., K.., J]``
(any operand layout, broadcast batch dims, weights or activations on either
side) followed by any injective epilogue (bias, activation, residual add,
cast) and preceded by injective prologues (transpose, reshape, pad) that can be
inlined into the reads. Convolutions (whose reads index with sums such as
``h + rh``) are left to the conv rules.

The schedule is register blocking, the loop structure of a BLIS micro-kernel
without packing A:

    parallel for (s, jo, io):             # every core; jo outer so a B panel stays in cache
        acc[MR, NR] = 0                    # local buffer, promoted to vector registers
        for k:
            for ii in MR (unrolled):       # broadcast A[i, k]
                for ji in NR (vectorized): # FMA with B[k, j:j+NR]
                    acc[ii, ji] += A[i, k] * B[k, j]
        C[i.., j..] = epilogue(acc)        # vectorized write-back, the fused ops inlined

``NR`` is one or two vectors of the accumulator dtype at the target's vector
width (:func:`.common.vector_bits`), ``MR`` the rows that keep ``MR * NR / V``
accumulators plus the B vectors in the register file. A B whose innermost
(contiguous) axis is K (``x @ y.T``, e.g. attention's Q·Kᵀ) is first copied
into a ``[S, K, J]`` buffer inside the function so the vectorized axis is
contiguous; weights normally arrive as ``[K, N]`` already (the prepack step
lifts Relax-level ``permute_dims`` of weights out of the function).

Tails (M, N not a multiple of the tile, symbolic extents such as a dynamic
batch) never put a guard inside the vectorized loop (TVM scalarizes a vector
loop whose guard reads the lane: a classifier to N = 8210 ran at ~3 GFLOP/s):

- MR and NR are chosen to divide the extent, or for a symbolic one its known
  factor (``batch * 128`` is a multiple of 128), so most GEMMs tile exactly;
- a static tail shifts the last tile back instead of cutting it: its origin is
  ``min(jo * NR, N - NR)``, so it overlaps its neighbour and recomputes (and
  rewrites, with the same values) a few columns; rows likewise;
- a symbolic M with no usable factor clamps the row origin to
  ``max(min(io * MR, M - MR), 0)`` and keeps a per-row guard, which does not
  depend on the lane and leaves the accumulator a static MR x NR tile (with
  the plain split guard its size was symbolic and it lived in memory).

``sch.loop_partition`` was tried first: in this TVM it crashes (segfault) on a
loop with more than one block under it, and the partitions it makes sit in
new opaque blocks that ``reverse_compute_at`` cannot cross, so the fused
epilogue would be lost. The LoopPartition pass's ``pragma_loop_partition_hint``
does not fire either: NarrowDataType renames the int64 loop variable and the
hint keeps pointing at the old one.

K is not blocked: with ``jo`` outside ``io`` the B panel each core works on is
``K x NR`` (``K * 128`` bytes for fp32 on AVX-512), which stays in L2 for any K
below ~8K, and A's rows are re-read from L2/L3 once per panel. A weight B is
packed at lower time into those panels, ``[N/NR, K, NR]`` (:func:`pack_gemm_weights`,
a Relax pass; the rule reads ``Wp[j // NR, k, j % NR]`` and tiles J by NR):
unpacked, the panel's rows sit ``4 N`` bytes apart and share a few L1 sets
(measured on Zen 3, 2 threads: [128,256]x[256,1024] 0.65 -> 0.54 ms,
[128,1024]x[1024,256] 0.65 -> 0.59 ms). A B of activations given as ``[N, K]``
(attention's Q·Kᵀ) is copied into ``[K, N]`` on every call. Integer and mixed
float/integer products are declined.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from .common import vector_bits

log = logging.getLogger(__name__)

# Kinds of block iterators in a matmul-like block (as dlight's IterKind).
_S, _I, _J, _K, _T = "S", "I", "J", "K", "T"

#: Below this many multiply-adds a GEMM stays on one core: the thread pool's
#: wake-up (a few microseconds) would cost more than the work it shares.
PARALLEL_MIN_MACS = 1 << 17


def gemm_rules() -> list:
    """The rules of this family, most specific first."""
    return [Matmul()]


@dataclass
class _Gemm:
    """A matched matmul block: per-block-iter kinds and operand facts."""

    kinds: list[str]            # one per block iter var: S / I / J / K / T
    b_k_contiguous: bool        # B's innermost index is a K iter (B is "transposed")
    m_static: int | None        # fused I extent when static
    n_static: int | None        # J extent when static
    k_static: int | None
    s_static: int | None
    m_div: int = 1              # a known divisor of the fused I extent (itself when static)
    n_div: int = 1              # the same for J
    b_pack: int = 0             # B read packed as Wp[j // c, k, j % c] (pack_gemm_weights): c, else 0


def _float_dtype(dtype) -> bool:
    return str(dtype).startswith(("float", "bfloat"))


def _dtype_bits(dtype) -> int:
    import tvm

    return tvm.DataType(str(dtype)).bits


def _static(expr) -> int | None:
    from tvm import tirx

    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def _match(block) -> _Gemm | None:
    """Classify ``block`` as ``C[S, I, J] += A[S, I, K] * B[S, K, J]`` (any layout), or None.

    Like dlight's ``detect_iter_traits`` (``tvm.s_tir.dlight.gpu.matmul``), but
    extent-1 iterators are trivial and a missing I (a GEMV, M = 1) or S is
    allowed; every index must be a bare iterator or a constant, which keeps
    convolutions (``A[.., h + rh, ..]``) out; exactly one J iterator (the
    vectorized one) and it must be C's innermost index.
    """
    from tvm import tirx

    if len(block.reads) != 2 or len(block.writes) != 1:
        return None
    a, b, c = block.reads[0], block.reads[1], block.writes[0]
    if not all(_float_dtype(r.source.dtype) for r in (a, b, c)):
        return None
    iter_vars = {iv.var: iv for iv in block.iter_vars}

    def axes(region):
        out = []
        for r in region.region:
            if not (isinstance(r.extent, tirx.IntImm) and r.extent.value == 1):
                return None
            if isinstance(r.min, tirx.Var) and r.min in iter_vars:
                out.append(r.min)
            elif isinstance(r.min, tirx.IntImm):
                out.append(None)
            else:
                return None  # a compound index: a convolution, a gather... not a plain GEMM
        return out

    a_ax, b_ax, c_ax = axes(a), axes(b), axes(c)
    b_pack = _packed_b(b, iter_vars) if b_ax is None else None
    if b_pack is not None:
        b_ax, b_pack = b_pack
    if a_ax is None or b_ax is None or c_ax is None:
        return None
    a_set, b_set, c_set = set(a_ax) - {None}, set(b_ax) - {None}, set(c_ax) - {None}
    kinds = []
    ext = {}
    for iv in block.iter_vars:
        v = iv.var
        if isinstance(iv.dom.extent, tirx.IntImm) and iv.dom.extent.value == 1:
            kind = _T
        elif iv.iter_type == tirx.IterVar.DataPar:
            if v in a_set and v in b_set and v in c_set:
                kind = _S
            elif v in a_set and v in c_set and v not in b_set:
                kind = _I
            elif v in b_set and v in c_set and v not in a_set:
                kind = _J
            else:
                return None
        elif iv.iter_type == tirx.IterVar.CommReduce:
            if v in a_set and v in b_set and v not in c_set:
                kind = _K
            else:
                return None
        else:
            return None
        kinds.append(kind)
        ext.setdefault(kind, []).append(iv.dom.extent)
    if _J not in kinds or _K not in kinds or not c_ax or c_ax[-1] is None:
        return None
    if b_pack and not (b_ax[-1] is not None and b_ax[-1].same_as(c_ax[-1])):
        return None  # the packed axis must be the output's contiguous one
    j_pos = [n for n, iv in enumerate(block.iter_vars) if iv.var.same_as(c_ax[-1])]
    if not j_pos or kinds[j_pos[0]] != _J:
        return None  # the vectorized axis must be the output's contiguous one
    # Other B-and-C-only iterators (a batch dim of B that A broadcasts over) become
    # outer batch loops: fusing them into J would put a div/mod in the vector index.
    for n, kind in enumerate(kinds):
        if kind == _J and n != j_pos[0]:
            kinds[n] = _S
            ext[_S] = [*ext.get(_S, []), block.iter_vars[n].dom.extent]
    ext[_J] = [block.iter_vars[j_pos[0]].dom.extent]
    b_last = b_ax[-1] if b_ax else None
    b_k_contig = b_last is not None and kinds[[iv.var for iv in block.iter_vars].index(b_last)] == _K

    def prod(kind):
        total = 1
        for e in ext.get(kind, []):
            s = _static(e)
            if s is None:
                return None
            total *= s
        return total

    return _Gemm(kinds, b_k_contig, prod(_I), prod(_J), prod(_K), prod(_S),
                 _known_divisor(ext.get(_I, [])), _known_divisor(ext.get(_J, [])), b_pack or 0)


def _packed_b(region, iter_vars):
    """``([j, k, j], c)`` for a read ``Wp[j // c, k, j % c]`` (a weight packed by :func:`pack_gemm_weights`)."""
    from tvm import tirx

    r = region.region
    if len(r) != 3 or not all(isinstance(x.extent, tirx.IntImm) and x.extent.value == 1 for x in r):
        return None
    d, k, m = r[0].min, r[1].min, r[2].min
    if not (isinstance(d, tirx.FloorDiv) and isinstance(m, tirx.FloorMod) and isinstance(k, tirx.Var)
            and k in iter_vars):
        return None
    if not (isinstance(d.a, tirx.Var) and d.a.same_as(m.a) and d.a in iter_vars
            and isinstance(d.b, tirx.IntImm) and isinstance(m.b, tirx.IntImm) and d.b.value == m.b.value):
        return None
    return [d.a, k, d.a], int(d.b.value)


def _known_divisor(extents) -> int:
    """The largest integer known to divide the product of ``extents`` (the product itself when static).

    A symbolic extent such as ``batch * 128`` (a dynamic batch fused with a
    static sequence) is a multiple of 128: a tile that divides 128 covers it
    exactly, with no tail at any batch size.
    """
    from math import gcd

    from tvm import tirx
    from tvm.sym.analyzer import Analyzer

    if not extents:
        return 1
    total = extents[0]
    for e in extents[1:]:
        total = total * e
    if isinstance(total, tirx.IntImm):
        return max(int(total.value), 1)
    try:
        ms = Analyzer().modular_set(total)
        return max(gcd(int(ms.coeff), int(ms.base)), 1)
    except Exception:  # noqa: BLE001 - no divisibility facts: any tile may leave a tail
        return 1


def _fusion_map(kinds: list[str], extents: list, order: list[str]):
    """IndexMap from the block iters to ``order`` (kinds fused row-major, missing kinds = 0).

    dlight's ``make_iter_fusion_index_map`` over this module's kinds.
    """
    from tvm import tirx

    fused: dict[str, object] = {}
    inputs = []
    for n, (kind, extent) in enumerate(zip(kinds, extents)):
        v = tirx.Var(f"i{n}", extent.ty)
        inputs.append(v)
        if kind == _T:
            continue
        fused[kind] = fused[kind] * extent + v if kind in fused else v
    zero = tirx.IntImm(extents[0].ty, 0)
    return tirx.IndexMap(inputs, [fused.get(k, zero) for k in order], None)


def _sub_map(kinds, extents, used: list[bool], order):
    sel = [(k, e) for k, e, u in zip(kinds, extents, used) if u]
    return _fusion_map([k for k, _ in sel], [e for _, e in sel], order)


def _tile_sizes(g: _Gemm, vec: int, vector_bits: int, cores: int) -> tuple[int, int]:
    """(MR, NR) for the micro-kernel; ``vec`` is the vector width in accumulator elements."""
    n, m = g.n_static, g.m_static
    # A GEMV-like tile (one or two rows) has registers to spare: wider NR gives more
    # independent FMA chains and longer contiguous runs of each B row.
    widths = ([16 * vec, 8 * vec, 4 * vec] if m is not None and m <= 2 else []) + [2 * vec, vec]
    if n is not None:  # keep at least 4 column panels per core to share out
        widths = [w for w in widths if w <= 2 * vec or n // w >= 4 * cores]
    if g.b_pack:  # B packed in panels of c columns: the tile is one panel wide
        nr = g.b_pack
    elif n is None:  # symbolic: a width that divides its known factor, else two vectors and a tail
        nr = next((w for w in (2 * vec, vec) if g.n_div % w == 0), 2 * vec)
    elif n <= vec:
        nr = n  # one (partial) vector covers all of N: no tail guard
    else:
        nr = next((w for w in widths if n % w == 0), None)
        if nr is None:  # a tail: the last tile is shifted back (see _shift_tails)
            nr = 2 * vec if n >= 4 * vec else vec
            if vector_bits >= 512 and n % vec and n >= 64 * vec and (m is None or m > 2):
                # Rows of B not vector-aligned (N = 8210: 32840-byte rows) make every vector load
                # straddle two cache lines; four vectors per row spread that cost over twice the FMAs
                # (measured 1.2-1.4x on [32,1024]x[1024,8210] and [40,120]x[120,18710]; on aligned
                # rows, N = 8192, two vectors stay faster). Needs the 32 registers of AVX-512.
                nr = 4 * vec
    # Accumulators MR * NR / vec plus NR / vec B vectors and one broadcast must fit
    # the register file: 32 vector registers with AVX-512, 16 on SSE/AVX2 (and NEON's
    # 32 are not counted on: 16 is safe everywhere).
    regs = 32 if vector_bits >= 512 else 16
    per_row = max(1, -(-nr // vec))
    mr_max = max(1, (regs - per_row - 1) // per_row)
    candidates = [c for c in (8, 6, 4) if c <= mr_max] or [mr_max]
    if m is not None and m <= candidates[0]:
        return max(m, 1), nr
    rows = m if m is not None else g.m_div  # a symbolic M = batch * 128 is tiled as 128-row blocks
    if regs == 16 and 6 in candidates and rows >= 24:
        # AVX2's 16 registers: 6 x 2 vectors keeps 12 FMA chains in flight (4 x 2: 8, fewer than the
        # FMA latency x ports of Zen 3 and Intel cores need). Measured on Zen 3 with M = 128 (a shifted
        # tail tile): [128,256]x[256,1024] 0.80 -> 0.57 ms, [128,1024]x[1024,256] 0.85 -> 0.75 ms.
        # Unless the shifted tail wastes more than that gains (small M):
        waste6, waste4 = -(-rows // 6) * 6 / rows, -(-rows // 4) * 4 / rows
        if waste6 <= waste4 * 1.1:
            return 6, nr
    # A tile height that divides M (or, when M is symbolic, its known factor: batch * 128).
    for c in candidates:
        if g.m_div % c == 0:
            return c, nr
    return candidates[0] if m is not None else min(6, candidates[0]), nr


def _inline_producers_except(sch, block, keep) -> None:
    """Inline every producer of ``block`` (transitively) except the one writing buffer ``keep``."""
    while True:
        inlined = 0
        for p in sch.get_producers(block):
            if sch.get(p).writes[0].source.same_as(keep):
                continue
            try:
                sch.compute_inline(p)
                inlined += 1
            except Exception:  # noqa: BLE001 - not inlinable (e.g. a reduction): it stays a separate nest
                continue
        if not inlined:
            return


def _uses_var(expr, var) -> bool:
    import tvm_ffi
    from tvm import tirx

    found = []
    tvm_ffi.structural_walk(expr, (tirx.Var, lambda v: found.append(v) if v.same_as(var) else None))
    return bool(found)


def _conjuncts(pred) -> list:
    from tvm import tirx

    if isinstance(pred, tirx.And):
        return _conjuncts(pred.a) + _conjuncts(pred.b)
    return [pred]


def _tile_binding(value, tile: int):
    """``(E * tile, inner_var)`` when ``value`` is the split binding ``E * tile + inner``, else None."""
    from tvm import tirx

    if not isinstance(value, tirx.Add):
        return None
    for base, inner in ((value.a, value.b), (value.b, value.a)):
        if (isinstance(inner, tirx.Var) and isinstance(base, tirx.Mul) and isinstance(base.b, tirx.IntImm)
                and int(base.b.value) == tile):
            return base, inner
    return None


def _shift_tails(sch, names: set, mr: int, nr: int, m_div: int = 1):
    """Remove the tail guards from the register tile: the last tile is shifted back, not cut.

    ``split`` leaves a guard ``jo * NR + ji < N`` on every block of the tile when
    NR does not divide N; inside the vectorized ``ji`` loop that guard makes TVM
    scalarize the whole loop (N = 8210 ran at ~3 GFLOP/s), and with a symbolic M
    the guarded accumulator cannot be sized statically, so it is never promoted to
    registers. Here the tile's origin becomes ``min(jo * NR, N - NR)``: every tile
    is full and unguarded, the last one overlaps its neighbour and recomputes (and
    rewrites, with the same values) a few columns. The same for rows when M is
    static; a symbolic M gets ``max(min(io * MR, M - MR), 0)`` and keeps its row
    guard (which does not depend on the vector lane), so the accumulator keeps a
    static MR x NR shape, unless M is known to be a multiple of ``m_div >= MR``
    (then every tile that runs is full: no guard). All three blocks of the tile
    (init, update, write-back) are rewritten alike or not at all. Returns the
    schedule to use.
    """
    import tvm_ffi
    from tvm import s_tir, tirx

    func = sch.mod["main"]
    plans: dict[str, list] = {}
    ok = [True]

    def plan(realize):
        blk = realize.block
        if blk.name_hint not in names:
            return realize
        ivs = list(blk.iter_vars)
        if len(ivs) < 3:
            ok[0] = False
            return realize
        edits = []  # (iter index, new binding, inner var, extra guard or None)
        for idx, tile in ((2, nr), (1, mr)):
            extent = ivs[idx].dom.extent
            value = realize.iter_values[idx]
            static = _static(extent)
            if static is not None and (static % tile == 0 or static <= tile):
                continue  # exact tiles: split left no guard
            if static is None and idx == 2:
                continue  # a symbolic N (rare): keep the guard
            if static is None:
                from tvm.sym.analyzer import Analyzer

                if Analyzer().can_prove(tirx.FloorMod(extent, tirx.IntImm(extent.ty, tile)) == 0):
                    continue
            match = _tile_binding(value, tile)
            if match is None:
                ok[0] = False
                return realize
            base, inner = match
            one = tirx.IntImm(base.ty, tile)
            if static is not None:
                origin = tirx.Min(base, tirx.IntImm(base.ty, static - tile))
                edits.append((idx, origin + inner, inner, None))
            else:
                origin = tirx.Max(tirx.Min(base, extent - one), tirx.IntImm(base.ty, 0))
                new = origin + inner
                # A symbolic M known to be a multiple of m_div >= MR (batch * 128) is either 0 (no tile
                # runs) or at least one full tile: no row guard, the accumulator stays in registers.
                edits.append((idx, new, inner, None if idx == 1 and m_div >= tile else new < extent))
        plans[blk.name_hint] = edits
        return realize

    tvm_ffi.structural_map(func, [(s_tir.SBlockRealize, plan)])
    if not ok[0] or set(plans) != names or not any(plans.values()):
        return sch
    if len({tuple(i for i, *_ in e) for e in plans.values()}) != 1:
        return sch  # the blocks disagree on which axes have tails: leave the guards

    def rewrite(realize):
        edits = plans.get(realize.block.name_hint)
        if not edits:
            return realize
        values = list(realize.iter_values)
        conj = _conjuncts(realize.predicate)
        for idx, new, inner, guard in edits:
            values[idx] = new
            conj = [c for c in conj if not _uses_var(c, inner)]
            if guard is not None:
                conj.append(guard)
        conj = [c for c in conj if not (isinstance(c, tirx.IntImm) and c.value)]
        pred = conj[0] if conj else tirx.IntImm("bool", 1)
        for c in conj[1:]:
            pred = tirx.And(pred, c)
        return s_tir.SBlockRealize(values, pred, realize.block)

    new_func = tvm_ffi.structural_map(func, [(s_tir.SBlockRealize, rewrite)])
    return s_tir.Schedule(new_func)


class Matmul:
    """Register-blocked, vectorized, parallel schedule for matmul-like fused functions (see module doc).

    ``apply`` returns a schedule or None ("not mine"): a function without
    exactly one matmul-like reduction block, with integer operands, or one a
    schedule primitive refuses (an epilogue that cannot be inlined, for
    instance, is left at the root, which still compiles; anything else declines).
    """

    def apply(self, func, target, tunable):  # noqa: ARG002 - dlight ScheduleRule signature
        from tvm import tirx

        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self._schedule(func, target)
        except Exception as e:  # noqa: BLE001 - a primitive refusing means "not mine", never a failed build
            log.debug("gemm rule declined %s: %s", func.attrs.get("global_symbol", "?") if func.attrs else "?", e)
            return None

    def is_target_available(self, target) -> bool:  # dlight's ScheduleRule interface
        return target.kind.name == "llvm"

    def _schedule(self, func, target):
        from tvm import s_tir
        from tvm.s_tir.dlight.analysis import get_root_block
        from tvm.s_tir.dlight.gpu.matmul import auto_inline_producers, get_reduction_blocks

        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        reductions = get_reduction_blocks(sch, blocks)
        if not reductions:
            return None
        main = reductions[0]
        stmt = sch.get(main)
        g = _match(stmt)
        if g is None:
            return None
        out_dtype = stmt.writes[0].source.dtype
        bits = vector_bits(target)  # not llvm_get_vector_width: 512 for every x86 cpu in TVM 0.27
        vec = max(1, bits // _dtype_bits(out_dtype))
        cores = int(target.attrs.get("num-cores", 1) or 1)
        mr, nr = _tile_sizes(g, vec, bits, cores)

        # 1. Normalize to C[S, I, J] += A[S, I, K] * B[S, K, J] (dlight's reindex + transform_layout).
        extents = [iv.dom.extent for iv in stmt.iter_vars]
        ivars = [iv.var for iv in stmt.iter_vars]

        def used(region):  # iterators the region's indices read (Wp[j // c, k, j % c] reads j and k)
            return [any(_uses_var(r.min, v) for r in region.region) for v in ivars]

        a_used, b_used, c_used = used(stmt.reads[0]), used(stmt.reads[1]), used(stmt.writes[0])
        ra = sch.reindex(main, ("read", 0))
        rb = sch.reindex(main, ("read", 1))
        rc = sch.reindex(main, ("write", 0))
        sch.transform_layout(ra, ("write", 0), _sub_map(g.kinds, extents, a_used, [_S, _I, _K]))
        sch.transform_layout(rb, ("write", 0), _sub_map(g.kinds, extents, b_used, [_S, _K, _J]))
        sch.transform_layout(rc, ("read", 0), _sub_map(g.kinds, extents, c_used, [_S, _I, _J]))
        sch.transform_block_layout(main, _fusion_map(g.kinds, extents, [_S, _I, _J, _K]))
        packed = sch.get(rb).writes[0].source  # B in [S, K, J]: the pack buffer when B is K-contiguous

        # 2. Operands: A (and B unless it is K-contiguous) are read in place; prologues inlined.
        sch.compute_inline(ra)
        macs = None if None in (g.m_static, g.n_static, g.k_static, g.s_static) else (
            g.m_static * g.n_static * g.k_static * g.s_static)
        if g.b_k_contiguous:
            auto_inline_producers(sch, rb)  # the pack reads through any prologue
            _inline_producers_except(sch, main, packed)
            packs = [p for p in sch.get_producers(main) if sch.get(p).writes[0].source.same_as(packed)]
            if len(packs) != 1:
                return None
            self._schedule_pack(sch, packs[0], cores, macs)
        else:
            sch.compute_inline(rb)
            auto_inline_producers(sch, main)

        # 3. Register tile: loops (s, jo, io | k | ii, ji).
        s, i, j, k = sch.get_loops(main)
        io, ii = sch.split(i, [None, mr])
        jo, ji = sch.split(j, [None, nr])
        sch.reorder(s, jo, io, k, ii, ji)

        # 4. Accumulate in a local MR x NR tile; write it back (with the epilogue) per tile.
        wb = sch.cache_write(main, 0, "local")
        _inline_whole_consumers(sch, wb)
        sch.reverse_compute_at(wb, io, preserve_unit_loops=True)
        outer = sch.fuse(s, jo, io)
        if cores > 1 and (macs is None or macs >= PARALLEL_MIN_MACS):
            sch.parallel(outer)
        # TIR refuses `vectorize` on the update block once the init is split off (it is no
        # longer a "reduction block"), so vectorize J first: the mark survives the split,
        # and TVM emits full-width vector FMAs (LLVM's own loop vectorizer would pick its
        # preferred width, 256 bits on AVX-512 Intel parts).
        sch.vectorize(ji)
        sch.unroll(ii)
        init = sch.decompose_reduction(main, k)
        sch.vectorize(sch.get_loops(init)[-1])
        wloops = sch.get_loops(wb)
        sch.vectorize(wloops[-1])
        # Epilogue blocks that could not be inlined stay at the root: correct, not tiled.
        names = {sch.get(b).name_hint for b in (init, main, wb)}
        return _shift_tails(sch, names, mr, nr, g.m_div)

    @staticmethod
    def _schedule_pack(sch, rb, cores, macs):
        """The [S, K, J] copy of a K-contiguous B: parallel over (s, k), J inner."""
        loops = sch.get_loops(rb)
        if len(loops) >= 2:
            outer = sch.fuse(*loops[:-1])
            if cores > 1 and (macs is None or macs >= PARALLEL_MIN_MACS):
                sch.parallel(outer)


def _inline_whole_consumers(sch, block) -> None:
    """Inline into ``block`` (the tile write-back) the consumers that cover its whole output.

    dlight's ``auto_inline_consumers`` also reverse-inlined a consumer that reads only part of the
    output (a Slice of the GEMM's columns, as a fused QKV projection is split): the write-back then
    ran over every column of the tile and wrote the sliced tensor out of its bounds, so a MatMul
    followed by a column Slice gave wrong values. A consumer is inlined here only when it writes as
    many elements as ``block`` does (element-wise epilogues, bias, activations, reshapes); anything
    else stays a loop nest of its own at the root (correct, not tiled).
    """
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()
    # dlight's loop (consumers inlined forward into theirs, then reverse-inlined into ``block``), with
    # the reverse step only for consumers that cover the whole output.
    while True:
        inlined = 0
        consumers = sch.get_consumers(block)
        for c in consumers:
            try:
                sch.compute_inline(c)
                inlined += 1
            except Exception:  # noqa: BLE001 - not inlinable forward
                pass
        produced = sch.get(block).writes[0].source
        for c in consumers:
            try:
                st = sch.get(c)
            except Exception:  # noqa: BLE001 - inlined forward above: gone
                continue
            if len(st.writes) != 1 or not analyzer.can_prove_equal(math.prod(st.writes[0].source.shape),
                                                                      math.prod(produced.shape)):
                continue
            try:
                sch.reverse_compute_inline(c)
                inlined += 1
            except Exception:  # noqa: BLE001 - not inlinable: it stays at the root
                pass
        if inlined == 0:
            return


def pack_gemm_weights(target):
    """A Relax pass: ``matmul(x, W)`` with a weight ``W [K, N]`` -> a TE matmul reading ``W`` packed ``[N/c, K, c]``.

    ``c`` is the register tile's width (two vectors of float32: 16 with AVX2, 32
    with AVX-512). Unpacked, the tile reads ``B[k, j:j+c]`` for every k: rows
    ``4 N`` bytes apart, which for N = 256..4096 land in the same few L1 sets and
    evict each other (a 1024-wide B: every row in one set), so the panel a core
    works on streams from L2. Packed, a tile's panel is one contiguous
    ``K x c`` block. The packing is a ``layout_transform`` of an expression of
    weights only (a parameter after ``num_input``, a constant, or ops on those:
    a Gemm's transposed B), which the prepack step lifts out of the program; the
    :class:`Matmul` rule recognises the packed read ``Wp[j // c, k, j % c]``
    and tiles J by ``c``. Matmuls of two activations, non-float, 1-D, batched
    (3-D) weights and symbolic K/N are left alone (an N that is not a multiple of ``c`` is padded to one and
    the product sliced back); so
    are GEMVs (M <= 2 rows, where the rule picks wider tiles) and weights decoded
    from constants of other dtypes (quantized codes: the decode stays inlined in the GEMM).
    """
    import tvm
    from tvm import relax, te
    from tvm.relax.expr_functor import PyExprMutator, mutator

    matmul_op = tvm.ir.Op.get("relax.matmul")
    bits = vector_bits(target)

    def te_matmul(x, wp, out_dtype):
        nb, k_ext, c = wp.shape
        k = te.reduce_axis((0, k_ext), name="k")
        lead = list(x.shape[:-1])

        def body(*idx):
            j = idx[-1]
            return te.sum(x[(*idx[:-1], k)].astype(out_dtype) * wp[j // c, k, j % c].astype(out_dtype), axis=k)

        return te.compute((*lead, nb * c), body, name="matmul_packed")

    def _dims(expr):
        shape = getattr(getattr(expr, "ty", None), "shape", None)
        values = getattr(shape, "values", None)
        if values is None:
            return None
        return [_static(v) for v in values]

    @mutator
    class _Packer(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod_ = mod
            self.weights: set = set()
            self.memo: dict = {}

        def transform(self):
            for gv, func in self.mod_.functions_items():
                if isinstance(func, relax.Function):
                    n_in = func.attrs.get("num_input") if func.attrs is not None else None
                    self.weights = set(func.params[int(n_in):]) if n_in is not None else set()
                    self.memo = {}
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

        def _weight_only(self, expr, dtype, depth=0) -> bool:
            """Whether ``expr`` is computed from weight parameters and constants of ``dtype`` only.

            Constants of another dtype (int8 codes of a QDQ weight, compiled into the program) do not
            count: lifting their decoded copy would inflate the artifact past prepack's limit, and packing
            it on every call would add a pass over the weight that the GEMM's inlined decode does not
            need. Weight *parameters* of any dtype do: an integer weight parameter is the codes of a
            weight-only decode that the CPU target chose to run at lower time (targets/lowbit.py,
            ``decode_codes``; its growth is allowed for), so the decoded weight is packed there too."""
            if isinstance(expr, tvm.ir.Constant):
                return str(expr.ty.dtype) == dtype
            if not isinstance(expr, relax.Var) or depth > 16:
                return False
            if expr in self.weights:
                return True
            if (expr, dtype) in self.memo:
                return self.memo[(expr, dtype)]
            bound = self.lookup_binding(expr)
            ok = (isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op)
                  and all(isinstance(a, relax.ShapeExpr) or self._weight_only(a, dtype, depth + 1)
                          for a in bound.args))
            self.memo[(expr, dtype)] = ok
            return ok

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(matmul_op)):
                return call
            x, w = call.args
            dtype = str(call.ty.dtype)
            xd, wd = _dims(x), _dims(w)
            if not dtype.startswith("float") or str(w.ty.dtype) != dtype or str(x.ty.dtype) != dtype:
                return call
            if xd is None or wd is None or len(wd) != 2 or len(xd) < 2 or None in wd:
                return call
            if None not in xd[:-1] and math.prod(xd[:-1]) <= 2:
                return call  # a GEMV: the rule's wider tiles read B rows contiguously already
            k, n = wd
            c = 2 * max(1, bits // _dtype_bits(dtype))
            if n < 4 * c or not self._weight_only(w, dtype):
                return call
            n_pad = -(-n // c) * c
            if n_pad != n:
                # N not a multiple of the panel width (a classifier's 8210 classes): the weight gets zero
                # columns up to a whole panel (at lower time, like the packing), the GEMM computes the
                # padded width and a slice drops the extra columns. Computing only N columns of the
                # last panel instead made its tile a guarded, scalar loop (ddddocr: 18 -> 26-30 ms).
                w = self.builder_.emit(relax.op.nn.pad(w, [0, 0, 0, n_pad - n]))
            packed = self.builder_.emit(relax.op.layout_transform(
                w, index_map=lambda kk, jj: (jj // c, kk, jj % c)))
            out = self.builder_.call_te(te_matmul, x, packed, dtype, primfunc_name_hint="matmul_packed")
            if n_pad != n:
                out = relax.op.strided_slice(self.builder_.emit(out), axes=[len(xd) - 1], begin=[0], end=[n])
            return out

    @tvm.transform.module_pass(opt_level=0, name="graphopt.PackGemmWeights")
    def _pass(mod, _ctx):
        return _Packer(mod).transform()

    return _pass
