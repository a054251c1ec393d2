"""The tpu target's instruction set and simulator (targets/tpu/isa.py, sim.py): exactness, programs, cycle counts.

int8 results are compared bit for bit with int64 numpy references; bf16 with float64 (within bf16 error)
and bit for bit with a separate implementation of the stated rounding and per-K-tile accumulation rule.
Small arrays (4x4, 8x16) and small buffers make every case run through many tiles, blocks and chunks.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from graphopt.errors import OptionError
from graphopt.targets.tpu import isa, sim
from graphopt.targets.tpu.isa import ArrayConfig, ConvRegion, GemmRegion

TINY = ArrayConfig(rows=4, cols=4, buffer_kib=1, acc_kib=1)  # chunks of 60-120 rows, blocks of 64 rows
SMALL = ArrayConfig(rows=8, cols=16, buffer_kib=2, acc_kib=1)
CHUNKY = ArrayConfig(rows=4, cols=4, buffer_kib=1, acc_kib=8)  # int8: blocks of 512 rows, chunks of 124


def wrap32(x: np.ndarray) -> np.ndarray:
    return (((x.astype(np.int64) + 2**31) % 2**32) - 2**31).astype(np.int32)


def codes(rng, shape, signed: bool) -> np.ndarray:
    """Full-range codes, with the extremes always present."""
    lo, hi = (-128, 127) if signed else (0, 255)
    x = rng.integers(lo, hi + 1, size=shape)
    flat = x.reshape(-1)
    flat[:2] = (lo, hi)[:flat.size]
    return x.astype(np.int8 if signed else np.uint8)


def ref_gemm(a, b, az, bz) -> np.ndarray:
    bz = np.asarray(bz, np.int64)
    return wrap32((a.astype(np.int64) - az) @ (b.astype(np.int64) - bz))


def ref_conv(x, w, r: ConvRegion) -> np.ndarray:
    """Direct convolution in int64, padding with a_zero (a real zero)."""
    n, c, h, wd = x.shape
    o = w.shape[0]
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = r.strides, r.pads, r.dilations
    oh = (h + pt + pb - dh * (r.kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (r.kw - 1) - 1) // sw + 1
    xp = np.full((n, c, h + pt + pb, wd + pl + pr), r.a_zero, np.int64)
    xp[:, :, pt:pt + h, pl:pl + wd] = x
    xp -= r.a_zero
    bz = np.broadcast_to(np.asarray(r.b_zero, np.int64), (o,))
    wz = w.astype(np.int64) - bz[:, None, None, None]
    out = np.zeros((n, o, oh, ow), np.int64)
    for i in range(r.kh):
        for j in range(r.kw):
            patch = xp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            out += np.einsum("nchw,oc->nohw", patch, wz[:, :, i, j])
    return wrap32(out)


# ------------------------------------------------------------------------------------------- int8 gemm
GEMM_CASES = [
    # (config, M, K, N, a_signed, b_signed, a_zero, b_zero)
    (TINY, 1, 1, 1, False, True, 0, 0),
    (TINY, 1, 7, 5, False, True, 3, 0),
    (TINY, 300, 13, 9, False, True, 128, 0),  # several blocks and chunks, K and N ragged
    (TINY, 257, 6, 11, True, True, -5, 7),
    (TINY, 130, 10, 6, True, False, 0, 200),
    (TINY, 70, 9, 7, False, False, 255, (0, 1, 2, 3, 250, 255, 128)),  # per-column b_zero
    (SMALL, 1000, 37, 50, False, True, 17, tuple(range(-25, 25))),
    (SMALL, 64, 8, 16, True, True, 0, 0),  # exactly one tile
    (CHUNKY, 1100, 10, 6, False, True, 77, (-128, 127, 0, 1, -1, 5)),  # 3 blocks, 5 chunks each
    (ArrayConfig(), 33, 300, 200, False, True, 10, -3),
    (ArrayConfig(rows=512, cols=8, buffer_kib=64, acc_kib=1), 20, 600, 9, False, False, 0, 0),  # float64 tiles
]


@pytest.mark.parametrize("case", range(len(GEMM_CASES)))
def test_int8_gemm_bit_exact(case):
    cfg, M, K, N, asg, bsg, az, bz = GEMM_CASES[case]
    rng = np.random.default_rng(case)
    a, b = codes(rng, (M, K), asg), codes(rng, (K, N), bsg)
    r = GemmRegion("int8", K, N, a_signed=asg, b_signed=bsg, a_zero=az, b_zero=bz)
    out, st = sim.run(isa.encode(r, cfg), a, b)
    assert out.dtype == np.int32 and out.shape == (M, N)
    np.testing.assert_array_equal(out, ref_gemm(a, b, az, bz))
    assert st.macs == M * K * N


def test_int8_gemm_leading_dims_and_any_int_dtype():
    rng = np.random.default_rng(1)
    a, b = codes(rng, (2, 3, 5, 12), False), codes(rng, (12, 7), True)
    r = GemmRegion("int8", 12, 7, a_zero=9, b_zero=-2)
    out, _ = sim.run(isa.encode(r, TINY), a.astype(np.int64), b.astype(np.int32))
    assert out.shape == (2, 3, 5, 7)
    np.testing.assert_array_equal(out, ref_gemm(a.reshape(-1, 12), b, 9, -2).reshape(2, 3, 5, 7))


def test_chunky_config_has_several_chunks_per_block():
    block, chunk = isa.chunking(GemmRegion("int8", 10, 6), CHUNKY, 1100)
    assert (block, chunk) == (512, 124)  # (1024 - 2*4*4) // (2*4): two weight tiles, two chunks


def test_empty_m_and_numpy_typed_regions():
    r = GemmRegion("int8", np.int64(6), 3, a_signed=np.bool_(True), a_zero=np.array(-4),
                   b_zero=np.array([1, 2, 3], np.int8))
    assert r == GemmRegion("int8", 6, 3, a_signed=True, a_zero=-4, b_zero=(1, 2, 3))
    out, st = sim.run(isa.encode(r, TINY), np.zeros((0, 6), np.int8), np.zeros((6, 3), np.int8))
    assert out.shape == (0, 3) and st.macs == 0 and st.cycles == 0 and st.utilization == 0.0


def test_int8_wraps_like_int32():
    # Every product 255*255, K = 40000: the exact sum 2.6e9 overflows int32.
    K = 40000
    a, b = np.full((3, K), 255, np.uint8), np.full((K, 2), 255, np.uint8)
    r = GemmRegion("int8", K, 2, b_signed=False)
    out, _ = sim.run(isa.encode(r, ArrayConfig()), a, b)
    exact = 255 * 255 * K
    assert exact > 2**31
    assert (out == np.int32(exact - 2**32)).all()


def test_int8_codes_out_of_range_or_float_refused():
    r = GemmRegion("int8", 4, 4)  # uint8 activation, int8 weight
    p = isa.encode(r, TINY)
    ok_a, ok_b = np.zeros((2, 4), np.int32), np.zeros((4, 4), np.int32)
    with pytest.raises(ValueError, match="uint8 range"):
        sim.run(p, ok_a - 1, ok_b)
    with pytest.raises(ValueError, match="int8 range"):
        sim.run(p, ok_a, ok_b + 128)
    with pytest.raises(ValueError, match="integer codes"):
        sim.run(p, ok_a.astype(np.float32), ok_b)
    with pytest.raises(ValueError, match="shape"):
        sim.run(p, np.zeros((2, 5), np.int32), ok_b)


# ------------------------------------------------------------------------------------------- int8 conv
CONV_CASES = [
    # (config, N, C, H, W, O, KH, KW, strides, pads, dilations, a_signed, a_zero, b_zero)
    (TINY, 1, 3, 9, 8, 5, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, 0, 0),
    (TINY, 2, 3, 11, 10, 6, 3, 3, (2, 2), (0, 1, 2, 0), (1, 1), False, 100, 3),  # strided, asymmetric pads
    (SMALL, 1, 5, 12, 13, 9, 3, 3, (1, 2), (2, 2, 2, 2), (2, 2), True, -7, (1, -2, 3, 0, 5, 6, -7, 8, 9)),
    (SMALL, 2, 20, 7, 7, 33, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, 4, 0),  # 1x1
    (CHUNKY, 3, 2, 20, 21, 5, 3, 3, (1, 1), (1, 2, 0, 1), (2, 1), True, 127, -128),  # several blocks and chunks
    (SMALL, 1, 4, 10, 9, 3, 1, 1, (2, 2), (1, 0, 0, 1), (1, 1), False, 250, -1),  # 1x1 strided, padded
    (ArrayConfig(), 1, 16, 15, 15, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, 128, 0),
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_int8_conv_bit_exact(case):
    cfg, n, c, h, w, o, kh, kw, st, pads, dil, asg, az, bz = CONV_CASES[case]
    rng = np.random.default_rng(100 + case)
    x, wt = codes(rng, (n, c, h, w), asg), codes(rng, (o, c, kh, kw), True)
    r = ConvRegion("int8", c, o, kh, kw, st, pads, dil, a_signed=asg, a_zero=az, b_zero=bz)
    out, stats = sim.run(isa.encode(r, cfg), x, wt)
    ref = ref_conv(x, wt, r)
    assert out.shape == ref.shape and out.dtype == np.int32
    np.testing.assert_array_equal(out, ref)
    assert stats.macs == n * ref.shape[2] * ref.shape[3] * c * kh * kw * o


def test_conv_kernel_larger_than_input_refused():
    r = ConvRegion("int8", 1, 1, 5, 5, (1, 1), (0, 0, 0, 0), (1, 1))
    with pytest.raises(ValueError, match="smaller than"):
        sim.run(isa.encode(r, TINY), np.zeros((1, 1, 3, 3), np.uint8), np.zeros((1, 1, 5, 5), np.int8))


# ------------------------------------------------------------------------------------------- bf16
def bf16_scalar(x: float) -> float:
    """Round-to-nearest-even to bfloat16, one value at a time: the nearer of the two bf16 neighbours."""
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    if math.isnan(x) or math.isinf(x):
        return x
    lo = u & 0xFFFF0000
    hi = lo + 0x10000
    f = lambda bits: struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]  # noqa: E731
    # Past the largest bf16 the next step up is 2**128 (which rounds to infinity), as in IEEE rounding.
    up = math.copysign(2.0**128, x) if math.isinf(f(hi)) else f(hi)
    dlo, dhi = abs(x - f(lo)), abs(up - x)
    if dlo < dhi or (dlo == dhi and not (lo >> 16) & 1):
        return f(lo)
    return f(hi)


def test_bf16_rounding():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(2000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 2000),
                        np.array([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, 3.4e38, -3.4e38,
                                  np.inf, -np.inf, 1e-40], np.float32)])
    got = sim.bf16_round(x)
    want = np.array([bf16_scalar(float(v)) for v in x], np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert got[-10 + 2] == 1.0 and got[-10 + 3] == 1.0 + 2**-6 and got[-10 + 4] == 1.0 + 2**-7
    nan = sim.bf16_round(np.array([np.nan, struct.unpack("<f", b"\x01\x00\x80\x7f")[0]], np.float32))
    assert np.isnan(nan).all()
    ml = pytest.importorskip("ml_dtypes")
    np.testing.assert_array_equal(got, x.astype(ml.bfloat16).astype(np.float32))


def ref_bf16_gemm(a, b, rows) -> np.ndarray:
    """The stated rule, over whole M and N: bf16 operands, float32 matmul per K-tile, float32 sum in order."""
    a = np.array([bf16_scalar(float(v)) for v in a.reshape(-1)], np.float32).reshape(a.shape)
    b = np.array([bf16_scalar(float(v)) for v in b.reshape(-1)], np.float32).reshape(b.shape)
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for k0 in range(0, a.shape[1], rows):
        acc += np.ascontiguousarray(a[:, k0:k0 + rows]) @ np.ascontiguousarray(b[k0:k0 + rows])
    return acc


@pytest.mark.parametrize("cfg,M,K,N", [(TINY, 150, 11, 6), (SMALL, 90, 40, 35), (ArrayConfig(), 20, 300, 130)])
def test_bf16_gemm(cfg, M, K, N):
    rng = np.random.default_rng(K)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    out, st = sim.run(isa.encode(GemmRegion("bf16", K, N), cfg), a, b)
    assert out.dtype == np.float32 and st.macs == M * K * N
    # Within bf16 error of float64 on the unrounded operands (two roundings of 2**-9 each per product).
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    err = np.abs(out - a.astype(np.float64) @ b.astype(np.float64))
    assert (err <= scale * 2.0**-7).all()
    # The reference's K-tile sums in float32, as the array's accumulators: equal up to the order the host's
    # BLAS adds within a tile (bit-exact on an AVX-512 host, a few ulps apart on an AVX2 one).
    ref = ref_bf16_gemm(a, b, cfg.rows)
    assert (np.abs(out.astype(np.float64) - ref) <= scale * 2.0**-21).all()


def test_bf16_conv():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 6, 9, 9)).astype(np.float32)
    w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    r = ConvRegion("bf16", 6, 5, 3, 3, (2, 1), (1, 0, 1, 2), (1, 2))
    out, _ = sim.run(isa.encode(r, SMALL), x, w)
    xb, wb = sim.bf16_round(x).astype(np.float64), sim.bf16_round(w).astype(np.float64)
    # Float64 direct conv on the bf16 operands, through the int64 reference's loop structure.
    oh, ow = r.output_size(9, 9)
    xp = np.zeros((1, 6, 11, 11))
    xp[:, :, 1:10, 0:9] = xb
    ref = np.zeros((1, 5, oh, ow))
    for i in range(3):
        for j in range(3):
            ref += np.einsum("nchw,oc->nohw", xp[:, :, i:i + 2 * (oh - 1) + 1:2, 2 * j:2 * j + ow], wb[:, :, i, j])
    assert out.shape == (1, 5, oh, ow)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


# ------------------------------------------------------------------------------------------- configs and programs
@pytest.mark.parametrize("kwargs,msg", [
    (dict(rows=0), "option 'array' = 0 must be a power of two"),
    (dict(rows=96), "option 'array' = 96 must be a power of two (e.g. 64, 128, 256)"),
    (dict(cols=96), "option 'array' = 96 must be a power of two"),
    (dict(rows=8192, cols=8192), "option 'array' = 8192 must be a power of two of at most 4096"),
    (dict(buffer_kib=16), "option 'buffer_kib' = 16 is too small for a 128x128 array: give at least 68"),
    (dict(acc_kib=3), "option 'acc_kib' = 3 is too small"),
    (dict(bandwidth_gbs=0.0), "option 'bandwidth_gbs' = 0.0 must be a positive number"),
    (dict(clock_mhz=-1), "option 'clock_mhz' = -1 must be a positive number"),
])
def test_config_refusals(kwargs, msg):
    with pytest.raises(OptionError) as e:
        ArrayConfig(**kwargs).check()
    assert str(e.value).startswith("target 'tpu': ") and msg in str(e.value)
    assert "\n" not in str(e.value)


def test_config_minimum_is_accepted():
    cfg = ArrayConfig(rows=4, cols=4)
    ArrayConfig(rows=4, cols=4, buffer_kib=cfg.min_buffer_kib(), acc_kib=cfg.min_acc_kib()).check()
    ArrayConfig().check()
    assert ArrayConfig().to_json()["rows"] == 128


def test_encode_decode_round_trip_and_determinism():
    cfg = ArrayConfig(rows=64, cols=32, bandwidth_gbs=12.5)
    for r in (GemmRegion("int8", 70, 40, a_signed=True, a_zero=-3, b_zero=tuple(range(-20, 20))),
              GemmRegion("bf16", 9, 3),
              ConvRegion("int8", 3, 8, 3, 3, (2, 2), (1, 0, 1, 0), (2, 2), a_zero=12)):
        p = isa.encode(r, cfg)
        assert p[:4] == b"GTPU" and p == isa.encode(r, cfg)
        assert isa.decode(p) == (cfg, r)
    assert isa.encode(GemmRegion("int8", 5, 5), cfg) != isa.encode(GemmRegion("int8", 5, 5), ArrayConfig())


def test_bad_programs_refused():
    p = isa.encode(GemmRegion("int8", 5, 5), TINY)
    flipped = p[:40] + bytes([p[40] ^ 1]) + p[41:]
    for bad, msg in ((p[:10], "truncated"), (p[:-1], "truncated"), (b"", "truncated"), (b"XTPU" + p[4:], "magic"),
                     (p[:4] + b"\x09\x00" + p[6:], "version"), (flipped, "damaged")):
        with pytest.raises(ValueError, match=msg):
            isa.decode(bad)
    with pytest.raises(ValueError, match="b_zero"):
        isa.encode(GemmRegion("int8", 5, 3, b_zero=(1, 2)), TINY)
    with pytest.raises(ValueError, match="a_zero"):
        isa.encode(GemmRegion("int8", 5, 3, a_zero=-1), TINY)
    with pytest.raises(OptionError):
        isa.encode(GemmRegion("int8", 5, 3), ArrayConfig(rows=3))


def test_instruction_stream_respects_buffers():
    r = GemmRegion("bf16", 13, 9)
    m = 300
    block, chunk = isa.chunking(r, TINY, m)
    es, ins = 2, isa.instructions(r, TINY, m)
    assert 1 < chunk < block < m  # several blocks, several chunks per block
    assert chunk * 4 * es * 2 + 2 * 16 * es <= TINY.buffer_kib * 1024
    assert block * 4 * 4 <= TINY.acc_kib * 1024
    for i in ins:
        assert i.k <= TINY.rows and i.n <= TINY.cols and i.m <= chunk
    # Every output element stored exactly once; every MAC done exactly once.
    stored = np.zeros((m, 9), int)
    macs = 0
    for i in ins:
        if i.op == "STORE":
            stored[i.m0:i.m0 + i.m, i.n0:i.n0 + i.n] += 1
        if i.op == "MATMUL":
            macs += i.m * i.k * i.n
    assert (stored == 1).all() and macs == m * 13 * 9
    assert ins[0].to_json() == {"op": "LOAD_W", "m0": 0, "m": 0, "k0": 0, "k": 4, "n0": 0, "n": 4}
    assert isa.instructions(r, TINY, 0) == []


# ------------------------------------------------------------------------------------------- stats
def test_stats():
    r = GemmRegion("int8", 13, 9)
    m = 300
    a, b = np.ones((m, 13), np.uint8), np.ones((13, 9), np.int8)
    out, st = sim.run(isa.encode(r, TINY), a, b)
    assert (out == 13).all()
    assert st.macs == m * 13 * 9 and 0 < st.utilization <= 1
    assert st.cycles >= max(st.compute_cycles, st.dma_cycles)
    assert st.instructions == len(isa.instructions(r, TINY, m))
    # Weights once per m-block, activations once per n-tile, results once.
    block, _ = isa.chunking(r, TINY, m)
    n_blocks, n_tiles = -(-m // block), -(-9 // 4)
    assert st.bytes_loaded == n_blocks * 13 * 9 + n_tiles * m * 13
    assert st.bytes_stored == m * 9 * 4
    assert st == sim.stats(r, TINY, m)
    bf = sim.stats(GemmRegion("bf16", 13, 9), TINY, m)
    assert bf.bytes_loaded == 2 * st.bytes_loaded and bf.bytes_stored == st.bytes_stored


def test_stats_design_space_trends():
    r = GemmRegion("int8", 64, 64)
    small, big = (sim.stats(r, ArrayConfig(rows=s, cols=s), 64) for s in (64, 256))
    assert 0 < big.utilization < small.utilization <= 1
    fast, slow = (sim.stats(r, ArrayConfig(bandwidth_gbs=bw), 4096) for bw in (300.0, 3.0))
    assert slow.cycles > fast.cycles and slow.dma_cycles > fast.dma_cycles
    assert slow.compute_cycles == fast.compute_cycles
    # Many chunks: transfers overlap compute (double buffering), so the total is less than their sum.
    many = sim.stats(r, TINY, 4096)
    assert max(many.compute_cycles, many.dma_cycles) <= many.cycles < many.compute_cycles + many.dma_cycles


def test_stats_add():
    r = GemmRegion("int8", 64, 64)
    s1, s2 = sim.stats(r, ArrayConfig(), 100), sim.stats(r, ArrayConfig(), 300)
    total = sim.RegionStats()
    total.add(s1)
    total.add(s2)
    assert total.macs == s1.macs + s2.macs and total.cycles == s1.cycles + s2.cycles
    assert total.utilization == pytest.approx(total.macs / (total.cycles * 128 * 128))
    assert set(total.to_json()) >= {"instructions", "macs", "compute_cycles", "dma_cycles", "cycles",
                                   "bytes_loaded", "bytes_stored", "utilization"}
