"""The ``tpu`` target's instruction set: the array's configuration, the regions it runs, their tiled programs.

A region is one matrix product the array computes, ``out[M, N] = sum_k A[M, K] * B[K, N]``, with a constant
weight ``B`` (static K and N) and an activation ``A`` whose row count M is known only at run time
(:class:`GemmRegion`; :class:`ConvRegion` is the same product over im2col rows). What an artifact embeds is
:func:`encode`'s header (the configuration and the region, no data, no M); :func:`instructions` expands it
into the stream the simulator (``sim``) executes and counts once M is known.

The stream is **weight-stationary** and fixed by the configuration alone::

    for each m-block (as many rows as the accumulators hold for one n-tile):
      for each n-tile (n_t <= cols):
        for each k-tile (k_t <= rows):
          LOAD_W  k_t x n_t                      # once per m-block: weights are re-read for every m-block
          for each m-chunk of the block (as many rows as half the activation buffer holds):
            LOAD_A  m_c x k_t                    # once per n-tile: activations are re-read for every n-tile
            MATMUL  m_c rows through the tile, accumulating into the chunk's accumulator rows
            STORE   m_c x n_t                    # after the last k-tile only

Buffer policy (the same for every region on one configuration): the unified buffer holds two weight tiles of
the whole array's size (``rows x cols``, one in use while the next loads) and two activation chunks of
``m_c x k_t`` (double buffered); the accumulators hold ``m-block x n_t`` 32-bit values. Element sizes are
1 byte for int8 codes, 2 for bf16, 4 for the int32 / float32 results.
"""

from __future__ import annotations

import json
import math
import operator
import struct
import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np

from graphopt.errors import OptionError

MAGIC = b"GTPU"
VERSION = 1
#: magic, version, reserved, payload length, CRC-32 of the payload (little endian).
_HEADER = struct.Struct("<4sHHII")
DTYPES = ("int8", "bf16")
#: Bytes of one operand element entering the array, per region dtype.
ELEMENT_BYTES = {"int8": 1, "bf16": 2}
#: Bytes of one accumulator / result element (int32 or float32).
ACC_BYTES = 4
#: The fewest activation rows a chunk must hold; :meth:`ArrayConfig.check` guarantees room for them.
MIN_ROWS = 8
#: The target option each :class:`ArrayConfig` field is set by (named in error messages).
OPTIONS = {"rows": "array", "cols": "array", "buffer_kib": "buffer_kib", "acc_kib": "acc_kib",
           "bandwidth_gbs": "bandwidth_gbs", "clock_mhz": "clock_mhz"}
MAX_ARRAY = 4096


def _opt(field: str, value) -> str:
    return f"target 'tpu': option '{OPTIONS[field]}' = {value!r}"


@dataclass(frozen=True)
class ArrayConfig:
    """One accelerator design point. Frozen: it is part of every program encoded for it."""

    rows: int = 128  #: systolic array rows (the K extent of a weight tile)
    cols: int = 128  #: columns (the N extent of a weight tile)
    buffer_kib: int = 24576  #: on-chip unified buffer (activations + weight tiles), KiB
    acc_kib: int = 4096  #: accumulator memory (int32 / float32), KiB
    bandwidth_gbs: float = 30.0  #: off-chip memory bandwidth, GB/s (1e9 bytes per second)
    clock_mhz: float = 700.0

    @property
    def pes(self) -> int:
        """Processing elements (multiply-accumulate units) in the array."""
        return self.rows * self.cols

    def min_buffer_kib(self) -> int:
        """The smallest unified buffer that runs every region: two weight tiles and two 8-row activation
        chunks, at bf16's 2 bytes per element (so the same design point runs int8 and bf16 regions)."""
        es = max(ELEMENT_BYTES.values())
        return -(-(2 * self.rows * self.cols * es + 2 * MIN_ROWS * self.rows * es) // 1024)

    def min_acc_kib(self) -> int:
        """The smallest accumulator memory: 8 rows of ``cols`` 32-bit accumulators."""
        return -(-(MIN_ROWS * self.cols * ACC_BYTES) // 1024)

    def check(self) -> None:
        """Raise :class:`OptionError` naming the option when this is not a design point the model runs."""
        for f in ("rows", "cols"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 2 or v & (v - 1):
                raise OptionError(f"{_opt(f, v)} must be a power of two (e.g. 64, 128, 256)")
            if v > MAX_ARRAY:
                raise OptionError(f"{_opt(f, v)} must be a power of two of at most {MAX_ARRAY} (e.g. 64, 128, 256)")
        for f in ("buffer_kib", "acc_kib"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise OptionError(f"{_opt(f, v)} must be a whole number of KiB, at least 1")
        for f in ("bandwidth_gbs", "clock_mhz"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise OptionError(f"{_opt(f, v)} must be a positive number")
        need = self.min_buffer_kib()
        if self.buffer_kib < need:
            raise OptionError(f"{_opt('buffer_kib', self.buffer_kib)} is too small for a {self.rows}x{self.cols} "
                              f"array: give at least {need} (two weight tiles and two {MIN_ROWS}-row activation "
                              "tiles) or a smaller array")
        need = self.min_acc_kib()
        if self.acc_kib < need:
            raise OptionError(f"{_opt('acc_kib', self.acc_kib)} is too small for a {self.rows}x{self.cols} "
                              f"array: give at least {need} ({MIN_ROWS} rows of {self.cols} 32-bit accumulators) "
                              "or a smaller array")

    def to_json(self) -> dict:
        return asdict(self)


def _check_zero(name: str, z: int, signed: bool) -> None:
    lo, hi = (-128, 127) if signed else (0, 255)
    if isinstance(z, bool) or not isinstance(z, int) or not lo <= z <= hi:
        raise ValueError(f"{name} = {z!r} is not an {'int8' if signed else 'uint8'} code ({lo}..{hi})")


def _index(v):
    """``v`` as a Python int when it is an integer of any kind (numpy's included), else unchanged."""
    try:
        return v if isinstance(v, bool) else operator.index(v)
    except TypeError:
        return v


class _Operands:
    """The dtype and zero-point fields shared by both regions, and their checks."""

    def __post_init__(self) -> None:
        # Zero points and shapes often come from numpy arrays (ONNX initializers): hold them as Python ints
        # and tuples, so equal regions compare equal and encode to the same bytes.
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("a_signed", "b_signed"):
                v = bool(v) if isinstance(v, (bool, np.bool_)) else v
            elif isinstance(v, np.ndarray) and v.ndim == 0:
                v = _index(v.item())
            elif isinstance(v, (list, tuple, np.ndarray)):
                v = tuple(_index(x) for x in np.asarray(v).reshape(-1).tolist())
            elif f.name != "dtype":
                v = _index(v)
            object.__setattr__(self, f.name, v)

    def _check_operands(self, n: int) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"region dtype {self.dtype!r} is not one of {DTYPES}")
        _check_zero("a_zero", self.a_zero, self.a_signed)
        bz = self.b_zero if isinstance(self.b_zero, tuple) else (self.b_zero,)
        if isinstance(self.b_zero, tuple) and len(bz) != n:
            raise ValueError(f"b_zero has {len(bz)} per-column zero points for N = {n}")
        for z in bz:
            _check_zero("b_zero", z, self.b_signed)
        if self.dtype == "bf16" and (self.a_zero != 0 or any(bz)):
            raise ValueError("a bf16 region has no zero points")


def _positive(**dims) -> None:
    for name, v in dims.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"region {name} = {v!r} must be a positive integer")


@dataclass(frozen=True)
class GemmRegion(_Operands):
    """``out[M, N] = sum_k A[M, K] * B[K, N]`` on the array.

    dtype ``'int8'``: A and B are 8-bit codes (``a_signed`` / ``b_signed`` say int8 vs uint8), ``a_zero`` /
    ``b_zero`` their zero points (``b_zero`` an int, or a tuple of N ints: one per column); the result is
    int32: exactly ``sum_k (A - a_zero)(B - b_zero)`` wrapped to int32 (two's complement), what int32
    accumulators hold.

    dtype ``'bf16'``: A and B are float32 rounded to bfloat16 (round to nearest even) as they enter the
    array; products exact, accumulated in float32 in K-tile order (tile by tile, each tile's dot products a
    float32 matmul); the result is float32. No zero points.
    """

    dtype: str  #: 'int8' | 'bf16'
    k: int  #: static K (the weight is constant)
    n: int  #: static N
    a_signed: bool = False
    b_signed: bool = True
    a_zero: int = 0
    b_zero: int | tuple = 0

    def check(self) -> None:
        """ValueError when the fields do not describe a region (a bug in whoever built it)."""
        _positive(k=self.k, n=self.n)
        self._check_operands(self.n)


@dataclass(frozen=True)
class ConvRegion(_Operands):
    """NCHW conv2d (groups == 1) lowered by im2col on the accelerator side: the activation tile loads gather
    im2col rows (padding reads as ``a_zero``, i.e. a real zero), then it is a :class:`GemmRegion` with
    ``K = C*KH*KW`` (ordered c, kh, kw: the weight ``[O, C, KH, KW]`` reshaped) and ``N = O``; for an input
    ``[N_batch, C, H, W]``, ``M = N_batch*OH*OW`` (ordered batch, oh, ow). Same dtype rules as GemmRegion."""

    dtype: str
    c: int
    o: int
    kh: int
    kw: int
    strides: tuple = (1, 1)  #: (h, w)
    pads: tuple = (0, 0, 0, 0)  #: top, left, bottom, right
    dilations: tuple = (1, 1)  #: (h, w)
    a_signed: bool = False
    b_signed: bool = True
    a_zero: int = 0
    b_zero: int | tuple = 0

    @property
    def k(self) -> int:
        return self.c * self.kh * self.kw

    @property
    def n(self) -> int:
        return self.o

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """(OH, OW) for an input of spatial size (h, w); ValueError when the kernel does not fit."""
        (sh, sw), (pt, pl, pb, pr), (dh, dw) = self.strides, self.pads, self.dilations
        oh = (h + pt + pb - dh * (self.kh - 1) - 1) // sh + 1
        ow = (w + pl + pr - dw * (self.kw - 1) - 1) // sw + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"conv input {h}x{w} is smaller than the (dilated) {self.kh}x{self.kw} kernel")
        return oh, ow

    def check(self) -> None:
        _positive(c=self.c, o=self.o, kh=self.kh, kw=self.kw)
        for name, v, n, lo in (("strides", self.strides, 2, 1), ("pads", self.pads, 4, 0),
                               ("dilations", self.dilations, 2, 1)):
            if (not isinstance(v, tuple) or len(v) != n
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= lo for x in v)):
                raise ValueError(f"conv {name} = {v!r} must be {n} integers >= {lo}")
        self._check_operands(self.o)


Region = GemmRegion | ConvRegion


# ------------------------------------------------------------------------------------------- the program header
def encode(region: Region, config: ArrayConfig) -> bytes:
    """The program header embedded in an artifact: ``MAGIC``, ``VERSION``, and a canonical JSON payload
    (sorted keys, no spaces) naming the configuration and the region, with its length and CRC-32.

    Deterministic: equal (region, config) give equal bytes. Checks both first (OptionError / ValueError).
    """
    config.check()
    region.check()
    kind = "gemm" if isinstance(region, GemmRegion) else "conv"
    payload = json.dumps({"config": config.to_json(), "kind": kind, "region": asdict(region)},
                         sort_keys=True, separators=(",", ":")).encode()
    return _HEADER.pack(MAGIC, VERSION, 0, len(payload), zlib.crc32(payload)) + payload


def decode(program: bytes) -> tuple[ArrayConfig, Region]:
    """The (config, region) :func:`encode` wrote; ValueError on a bad magic, an unknown version, a truncated
    or damaged program, or fields that do not describe one."""
    program = bytes(program)
    if len(program) < _HEADER.size:
        raise ValueError(f"tpu program is truncated ({len(program)} bytes; the header alone is {_HEADER.size})")
    magic, version, _, size, crc = _HEADER.unpack_from(program)
    if magic != MAGIC:
        raise ValueError(f"not a tpu program (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ValueError(f"tpu program version {version} is not supported (this simulator reads {VERSION})")
    payload = program[_HEADER.size:]
    if len(payload) != size:
        raise ValueError(f"tpu program is truncated or padded: payload of {len(payload)} bytes, header says {size}")
    if zlib.crc32(payload) != crc:
        raise ValueError("tpu program is damaged (CRC-32 mismatch)")
    try:
        d = json.loads(payload)
        cfg = ArrayConfig(**d["config"])
        cls = {"gemm": GemmRegion, "conv": ConvRegion}[d["kind"]]
        r = dict(d["region"])
        # JSON has no tuples: restore those the dataclasses hold.
        for f in fields(cls):
            if isinstance(r.get(f.name), list):
                r[f.name] = tuple(r[f.name])
        region = cls(**r)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"tpu program payload does not describe a region: {e}") from None
    try:
        cfg.check()
    except OptionError as e:
        raise ValueError(f"tpu program has a bad configuration: {e}") from None
    region.check()
    return cfg, region


# ------------------------------------------------------------------------------------------- the instruction stream
@dataclass(frozen=True)
class Instr:
    """One instruction: ``op`` on rows ``m0:m0+m`` of A / the output, ``k0:k0+k`` of K, ``n0:n0+n`` of N.

    LOAD_W uses (k, n); LOAD_A (m, k); MATMUL all three; STORE (m, n). Unused extents are 0.
    """

    op: str  #: 'LOAD_W' | 'LOAD_A' | 'MATMUL' | 'STORE'
    m0: int
    m: int
    k0: int
    k: int
    n0: int
    n: int

    def to_json(self) -> dict:
        return asdict(self)


def chunking(region: Region, config: ArrayConfig, m: int) -> tuple[int, int]:
    """(block, chunk): rows per m-block (what the accumulators hold for one n-tile) and per m-chunk (what
    one of the two activation buffers holds for one k-tile), both at least 1 and at most max(m, 1)."""
    es = ELEMENT_BYTES[region.dtype]
    kt, nt = min(region.k, config.rows), min(region.n, config.cols)
    act = config.buffer_kib * 1024 - 2 * config.rows * config.cols * es
    chunk_rows = act // (2 * kt * es)
    block_rows = config.acc_kib * 1024 // (nt * ACC_BYTES)
    block = max(1, min(m, block_rows))
    return block, max(1, min(block, chunk_rows))


def instructions(region: Region, config: ArrayConfig, m: int) -> list[Instr]:
    """The weight-stationary stream for ``m`` rows (see the module docstring); empty when ``m == 0``."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"row count m = {m!r} must be a non-negative integer")
    K, N = region.k, region.n
    block, chunk = chunking(region, config, m)
    out: list[Instr] = []
    for b0 in range(0, m, block):
        b1 = min(m, b0 + block)
        for n0 in range(0, N, config.cols):
            nt = min(config.cols, N - n0)
            for k0 in range(0, K, config.rows):
                kt = min(config.rows, K - k0)
                last = k0 + kt == K
                out.append(Instr("LOAD_W", 0, 0, k0, kt, n0, nt))
                for m0 in range(b0, b1, chunk):
                    mc = min(chunk, b1 - m0)
                    out.append(Instr("LOAD_A", m0, mc, k0, kt, 0, 0))
                    out.append(Instr("MATMUL", m0, mc, k0, kt, n0, nt))
                    if last:
                        out.append(Instr("STORE", m0, mc, 0, 0, n0, nt))
    return out
