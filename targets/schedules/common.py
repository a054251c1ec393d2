"""Helpers shared by the element-wise, reduction and fallback CPU schedule rules.

Everything a rule needs to know about the machine comes from the target:
:func:`vector_bits` (SIMD register width) and :func:`num_cores` (threads the
schedule parallelizes for). Nothing is hard-coded to one CPU.
"""

from __future__ import annotations

# A loop nest smaller than this many elements runs on one thread: waking the
# other threads costs microseconds (far more on a loaded machine), more than a
# small copy/add takes. At 2^15 elements (a [1,128,4,64] head transpose) the
# parallel version measured 2x slower than the serial one on 2 busy cores.
PARALLEL_MIN_ELEMENTS = 1 << 16

# When fusing outer loops for ``parallel``, stop once this many iterations per
# core are available (enough for the runtime's static split to balance).
PARALLEL_ITERS_PER_CORE = 4


def vector_bits(target) -> int:
    """Width in bits of the widest SIMD register the code for ``target`` may use.

    Read from the CPU features LLVM enables for the target (``avx512f`` -> 512,
    ``avx``/``avx2`` -> 256, otherwise 128: SSE2 on x86-64, NEON on aarch64).
    ``tvm.target.codegen.llvm_get_vector_width`` is not used: in TVM 0.27 it
    returns the *host's* width for every ``mcpu`` (512 for ``x86-64-v2`` on an
    AVX-512 machine), which would size vectors for registers the build lacks.
    """
    from tvm.target import codegen

    try:
        feats = set(codegen.llvm_get_cpu_features(target))
    except Exception:  # pragma: no cover - non-LLVM or unknown target: be conservative
        feats = set()
    if "avx512f" in feats:
        return 512
    if "avx" in feats or "avx2" in feats:
        return 256
    return 128


def vector_lanes(target, dtype_bits: int) -> int:
    """Elements of ``dtype_bits`` per SIMD register on ``target`` (at least 1).

    Booleans (1 bit) count as bytes, as they are stored.
    """
    return max(vector_bits(target) // max(int(dtype_bits), 8), 1)


def num_cores(target) -> int:
    """Threads the target is built for (``num-cores``; 1 when the target does not say)."""
    try:
        n = target.attrs.get("num-cores", None)
    except Exception:  # pragma: no cover
        n = None
    try:
        return max(int(n), 1) if n is not None else 1
    except (TypeError, ValueError):  # pragma: no cover
        return 1


def static_extent(sch, loop) -> int | None:
    """The loop's extent as an int, or None when it is symbolic (a dynamic dim)."""
    from tvm import tirx

    ext = sch.get(loop).extent
    return int(ext.value) if isinstance(ext, tirx.IntImm) else None


def work_size(sch, loops) -> int | None:
    """Product of the loops' extents, or None when any is symbolic (treated as large)."""
    total = 1
    for lp in loops:
        e = static_extent(sch, lp)
        if e is None:
            return None
        total *= e
    return total


def worth_parallel(target, elements: int | None) -> bool:
    """Whether a loop nest of ``elements`` iterations (None: symbolic) should run on several threads."""
    if num_cores(target) <= 1:
        return False
    return elements is None or elements >= PARALLEL_MIN_ELEMENTS


def parallel_prefix(sch, loops, target):
    """Fuse the leading ``loops`` (all spatial, directly nested) and mark the result ``parallel``.

    Fuses only as many leading loops as needed to give every core
    :data:`PARALLEL_ITERS_PER_CORE` iterations (fewer index divisions per
    element). A symbolic extent (a dynamic batch) counts as 1, since it may be
    1 at run time: the static loops after it are fused in too until they alone
    give every core its share, so a batch-1 call of a dynamic-batch artifact
    is not left on one thread. Returns the parallel loop, or None when
    ``loops`` is empty.
    """
    if not loops:
        return None
    want = num_cores(target) * PARALLEL_ITERS_PER_CORE
    take = 0
    extent = 1
    for lp in loops:
        take += 1
        e = static_extent(sch, lp)
        extent *= e if e is not None else 1
        if extent >= want:
            break
    fused = sch.fuse(*loops[:take]) if take > 1 else loops[0]
    sch.parallel(fused)
    return fused


def write_dtype_bits(sch, block) -> int:
    """Bits of the (first) buffer the block writes; 32 when it writes none."""
    stmt = sch.get(block)
    if stmt.writes:
        return int(stmt.writes[0].source.dtype.bits)
    return 32


def vectorize_inner(sch, loop, lanes: int):
    """Vectorize ``loop`` (innermost, spatial) at ``lanes`` when that needs no tail.

    Static extent <= lanes: the whole loop becomes one vector (extent >= 2).
    Static extent divisible by lanes: split, vectorize the inner part. Otherwise
    (a tail, or a symbolic extent) the loop is left serial: LLVM's loop
    vectorizer handles the remainder there, whereas a TIR split with a tail
    predicate would make TVM scalarize the whole vector loop.
    Returns the vectorized loop or None.
    """
    ext = static_extent(sch, loop)
    if ext is None or ext < 2:
        return None
    if ext <= lanes:
        sch.vectorize(loop)
        return loop
    if ext % lanes == 0:
        _, inner = sch.split(loop, factors=[None, lanes])
        sch.vectorize(inner)
        return inner
    return None


# Calls that lower to one vector instruction (or a select); any other call in a
# block (exp, tanh, erf, log, pow, sigmoid...) becomes a scalar libm call per
# lane when the loop is vectorized in TIR, which is slower than leaving the
# loop to LLVM (that only adds the lane extracts and inserts around the calls).
# ``isnan`` is a self-comparison (the fast-math kernels of ..fast_math use it).
VECTOR_FRIENDLY_CALLS = frozenset({
    "if_then_else", "likely", "fabs", "floor", "ceil", "trunc", "round", "nearbyint", "sqrt", "fma",
    "copysign", "reinterpret", "isnan",
})


def has_scalar_calls(sch, block) -> bool:
    """Whether the block computes something with a call that has no vector form (exp, tanh, erf, ...)."""
    import tvm_ffi
    from tvm import ir

    found = []

    def visit(call):
        op = str(getattr(call.op, "name", ""))
        if op.rsplit(".", 1)[-1] not in VECTOR_FRIENDLY_CALLS:  # "tirx.exp", "prim.if_then_else", ...
            found.append(op)

    tvm_ffi.structural_walk(sch.get(block).body, (ir.Call, visit), order="post")
    return bool(found)


def normalized_blocks(func):
    """``(schedule, block infos)`` of ``func`` in dlight's normal form, or None when it has none."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    return sch, infos


def loop_kind(sch, loop) -> str:
    from tvm import tirx

    kind = sch.get(loop).kind
    return {tirx.ForKind.PARALLEL: "parallel", tirx.ForKind.VECTORIZED: "vectorized"}.get(kind, "serial")
