"""The ``tpu`` target's simulator: executes a region's instruction stream on the host and counts its cycles.

:func:`run` decodes a program (``isa.encode``), expands it for the run's M (``isa.instructions``) and
executes it one instruction at a time, each a numpy operation over a whole tile or chunk (a chunk is
hundreds to thousands of rows, so Python's overhead per instruction is small against the BLAS call):

* int8 — bit-exact. Each MATMUL multiplies the raw codes in float32 BLAS when every partial sum of a tile
  fits float32's 24-bit mantissa (``k_t * max|a| * max|b| < 2**24``: true up to 258-row tiles of uint8 x
  uint8), else in float64 (exact below 2**53); either way the tile's result is an exact integer. Tiles
  accumulate in int64; STORE applies the zero points exactly in integer arithmetic,
  ``acc - a_zero*colsum(B) - b_zero*rowsum(A) + K*a_zero*b_zero`` (``b_zero`` per column allowed), and
  wraps to int32: equal to int32 accumulators wrapping in two's complement.
* bf16 — A and B are rounded to bfloat16 (nearest even, NaN kept a NaN) as they are loaded; each MATMUL
  is a float32 matmul of its tile (products of bf16 values are exact in float32; the summation order
  within the tile is the BLAS's); accumulators start at +0.0 and add the tiles in K order in float32.

Cycle model (deterministic; a function of the instruction stream and the configuration only)::

    bytes/cycle   = bandwidth_gbs * 1e9 / (clock_mhz * 1e6)
    dma(bytes)    = ceil(bytes / bytes-per-cycle)            (exact rational arithmetic)
    LOAD_W k x n  : dma(k*n*e) on the memory port, then `rows` cycles on the array shifting the tile in
    LOAD_A m x k  : dma(m*k*e)                               (im2col rows for a conv: each counted)
    MATMUL m,k,n  : m + k + n - 1 array cycles (fill + stream + drain); a smaller tile still holds the
                    whole array, so utilization shows the padding waste
    STORE  m x n  : dma(m*n*4)
    compute_cycles C = array cycles (MATMULs + weight shifts), dma_cycles D = memory-port cycles
    cycles = L0 + max(C, D - L0 - E) + E

with ``e`` the operand size (1 byte int8, 2 bf16), ``L0`` the DMA of the first LOAD_W and LOAD_A (nothing
computes before them) and ``E`` that of the last STORE (nothing overlaps it): in between, double buffering
overlaps all other transfers with compute. utilization = macs / (cycles * rows * cols).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .isa import ACC_BYTES, ELEMENT_BYTES, ArrayConfig, ConvRegion, Instr, Region, decode, instructions

#: float32 holds every integer below this exactly: the bound for an exact int8 tile in float32 BLAS.
_F32_EXACT = 1 << 24


@dataclass
class RegionStats:
    """What one region (or, summed with :meth:`add`, a sequence of them run one after another) cost."""

    instructions: int = 0
    macs: int = 0  #: useful multiply-accumulates, M*K*N
    compute_cycles: int = 0  #: array busy: MATMULs and weight shifts
    dma_cycles: int = 0  #: memory port busy: all loads and stores
    cycles: int = 0  #: the modelled total (see the module docstring)
    bytes_loaded: int = 0  #: off-chip reads: weights (per LOAD_W), activations incl. im2col rows
    bytes_stored: int = 0  #: off-chip writes: results
    utilization: float = 0.0  #: macs / (cycles * pes); 0 when nothing ran
    pes: int = field(default=0)  #: the array's rows * cols (what utilization divides by)

    def _update(self) -> None:
        self.utilization = self.macs / (self.cycles * self.pes) if self.cycles and self.pes else 0.0

    def add(self, other: "RegionStats") -> None:
        """Add ``other``, run after this (its cycles follow, no overlap across regions)."""
        for f in ("instructions", "macs", "compute_cycles", "dma_cycles", "cycles", "bytes_loaded",
                  "bytes_stored"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.pes = self.pes or other.pes
        self._update()

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- cycles
def stats(region: Region, config: ArrayConfig, m: int, instrs: list[Instr] | None = None) -> RegionStats:
    """The cost of running ``region`` over ``m`` rows (the stream of ``instructions`` unless given), without
    executing anything: what a design-space sweep calls."""
    if instrs is None:
        instrs = instructions(region, config, m)
    es = ELEMENT_BYTES[region.dtype]
    # Bytes per cycle as an exact rational: the same cycle counts on every machine.
    per_cycle = Fraction(config.bandwidth_gbs) * 1000 / Fraction(config.clock_mhz)
    cache: dict[int, int] = {}

    def dma(nbytes: int) -> int:
        c = cache.get(nbytes)
        if c is None:
            c = cache[nbytes] = int(-(-Fraction(nbytes) // per_cycle))
        return c

    s = RegionStats(instructions=len(instrs), macs=m * region.k * region.n, pes=config.pes)
    first_w = first_a = last_store = None
    for ins in instrs:
        if ins.op == "LOAD_W":
            nb = ins.k * ins.n * es
            s.bytes_loaded += nb
            s.dma_cycles += dma(nb)
            s.compute_cycles += config.rows
            first_w = dma(nb) if first_w is None else first_w
        elif ins.op == "LOAD_A":
            nb = ins.m * ins.k * es
            s.bytes_loaded += nb
            s.dma_cycles += dma(nb)
            first_a = dma(nb) if first_a is None else first_a
        elif ins.op == "MATMUL":
            s.compute_cycles += ins.m + ins.k + ins.n - 1
        else:  # STORE
            nb = ins.m * ins.n * ACC_BYTES
            s.bytes_stored += nb
            s.dma_cycles += dma(nb)
            last_store = dma(nb)
    lead, tail = (first_w or 0) + (first_a or 0), last_store or 0
    s.cycles = lead + max(s.compute_cycles, s.dma_cycles - lead - tail) + tail
    s._update()
    return s


# ------------------------------------------------------------------------------------------- operands
def bf16_round(x) -> np.ndarray:
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), as float32; a NaN stays a NaN (quiet),
    a finite value past bf16's range becomes an infinity."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    nan = np.isnan(x)
    if nan.any():
        # Truncating a NaN's payload could leave an infinity's bits: keep the top bits and set the quiet bit.
        r = np.where(nan, (u & np.uint32(0xFFFF0000)) | np.uint32(0x00400000), r)
    return r.view(np.float32)


def _codes(x, signed: bool, what: str) -> np.ndarray:
    """``x`` as int16 codes after checking it holds int8 (``signed``) or uint8 values."""
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise ValueError(f"{what}: an int8 region takes integer codes, got {x.dtype}")
    lo, hi = (-128, 127) if signed else (0, 255)
    if x.size and (int(x.min()) < lo or int(x.max()) > hi):
        raise ValueError(f"{what}: codes outside {'int8' if signed else 'uint8'} range {lo}..{hi} "
                         f"(min {int(x.min())}, max {int(x.max())})")
    return x.astype(np.int16, copy=False)


def _floats(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"{what}: a bf16 region takes float32 arrays, got {x.dtype}")
    return bf16_round(x)


def _compute_dtype(region: Region, config: ArrayConfig):
    """float32 when an int8 tile's partial sums are all exact in float32, else float64; float32 for bf16."""
    if region.dtype == "bf16":
        return np.float32
    amax = 128 if region.a_signed else 255
    bmax = 128 if region.b_signed else 255
    return np.float32 if min(region.k, config.rows) * amax * bmax < _F32_EXACT else np.float64


def _im2col(x: np.ndarray, region: ConvRegion, pad_value) -> np.ndarray:
    """[N*OH*OW, C*KH*KW] rows (batch, oh, ow) x (c, kh, kw) of ``x`` [N, C, H, W], padding ``pad_value``."""
    n, c, h, w = x.shape
    oh, ow = region.output_size(h, w)
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = region.strides, region.pads, region.dilations
    xp = np.full((n, c, h + pt + pb, w + pl + pr), pad_value, dtype=x.dtype)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    win = sliding_window_view(xp, (dh * (region.kh - 1) + 1, dw * (region.kw - 1) + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :oh, :ow]  # [n, c, oh, ow, kh, kw], a view
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(n * oh * ow, region.k)


def _operands(region: Region, config: ArrayConfig, a, b):
    """(A [M, K], B [K, N]) in the compute dtype, and the output's shape maker ``finish(out [M, N])``."""
    K, N = region.k, region.n
    a, b = np.asarray(a), np.asarray(b)
    if region.dtype == "int8":
        a, b = _codes(a, region.a_signed, "activation"), _codes(b, region.b_signed, "weight")
        pad = region.a_zero
    else:
        a, b = _floats(a, "activation"), _floats(b, "weight")
        pad = 0.0
    dt = _compute_dtype(region, config)
    if isinstance(region, ConvRegion):
        if a.ndim != 4 or a.shape[1] != region.c:
            raise ValueError(f"conv activation has shape {a.shape}; expected [N, {region.c}, H, W]")
        if b.shape != (region.o, region.c, region.kh, region.kw):
            raise ValueError(f"conv weight has shape {b.shape}; expected "
                             f"{(region.o, region.c, region.kh, region.kw)}")
        nb = a.shape[0]
        oh, ow = region.output_size(a.shape[2], a.shape[3])
        A = _im2col(a.astype(dt), region, pad)  # gathered once, in the dtype the MATMULs read
        B = b.reshape(N, K).T

        def finish(out):
            return np.ascontiguousarray(out.reshape(nb, oh, ow, N).transpose(0, 3, 1, 2))
    else:
        if a.ndim < 1 or a.shape[-1] != K:
            raise ValueError(f"gemm activation has shape {a.shape}; expected [..., {K}]")
        if b.shape != (K, N):
            raise ValueError(f"gemm weight has shape {b.shape}; expected {(K, N)}")
        lead = a.shape[:-1]
        A, B = a.reshape(-1, K), b

        def finish(out):
            return out.reshape(*lead, N)
    return np.ascontiguousarray(A, dtype=dt), np.ascontiguousarray(B, dtype=dt), finish


# ------------------------------------------------------------------------------------------- execution
def run(program: bytes, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, RegionStats]:
    """Execute ``program`` (from ``isa.encode``) on activation ``a`` and weight ``b``; (result, stats).

    gemm: ``a`` [..., K] (leading dims flattened into M and restored in the result), ``b`` [K, N].
    conv: ``a`` [N, C, H, W], ``b`` [O, C, KH, KW] -> [N, O, OH, OW].
    int8: integer arrays of the codes (any integer dtype; ValueError when a value is out of the int8 /
    uint8 range the region says), int32 result. bf16: float arrays (taken as float32), float32 result.
    ValueError for a bad program or shapes that do not match it.
    """
    config, region = decode(program)
    A, B, finish = _operands(region, config, a, b)
    m = A.shape[0]
    instrs = instructions(region, config, m)
    exact = region.dtype == "int8"
    out = np.empty((m, region.n), np.int32 if exact else np.float32)
    acc = np.zeros((m, region.n), np.int64 if exact else np.float32)
    if exact:
        fix = _ZeroPoints(region, A, B)
    w = at = None
    for ins in instrs:
        op = ins.op
        if op == "LOAD_W":
            w = B[ins.k0:ins.k0 + ins.k, ins.n0:ins.n0 + ins.n]
        elif op == "LOAD_A":
            at = A[ins.m0:ins.m0 + ins.m, ins.k0:ins.k0 + ins.k]
        elif op == "MATMUL":
            rows, cols = slice(ins.m0, ins.m0 + ins.m), slice(ins.n0, ins.n0 + ins.n)
            p = at @ w
            acc[rows, cols] += p.astype(np.int64) if exact else p
        else:  # STORE
            rows, cols = slice(ins.m0, ins.m0 + ins.m), slice(ins.n0, ins.n0 + ins.n)
            out[rows, cols] = fix.store(acc[rows, cols], rows, cols) if exact else acc[rows, cols]
    return finish(out), stats(region, config, m, instrs)


class _ZeroPoints:
    """The exact zero-point correction STORE applies to int64 accumulators, then the wrap to int32."""

    def __init__(self, region: Region, A: np.ndarray, B: np.ndarray):
        K = region.k
        self.az = region.a_zero
        bz = region.b_zero
        self.bz = np.asarray(bz if isinstance(bz, tuple) else (bz,) * region.n, dtype=np.int64)
        # Sums of integer codes, exact in float64 (|sum| < 2**53), then int64.
        self.rowsum = A.sum(axis=1, dtype=np.float64).astype(np.int64) if self.bz.any() else None
        self.colsum = B.sum(axis=0, dtype=np.float64).astype(np.int64) if self.az else None
        self.const = K * self.az * self.bz

    def store(self, acc: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
        x = acc
        if self.colsum is not None:
            x = x - self.az * self.colsum[cols]
        if self.rowsum is not None:
            x = x - self.rowsum[rows, None] * self.bz[cols] + self.const[cols]
        # Two's-complement wrap, written out: int64 -> int32 casts are not promised to wrap.
        return ((x + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)
