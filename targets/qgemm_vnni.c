/* graphopt's int8 GEMM micro-kernel for AVX-512 VNNI (see targets/int8.py).
 *
 * C[i0:i0+rows, 16*jb0 : 16*(jb0+nb)] = A[i0:i0+rows, :K] (uint8, row-major) x W (int8, packed
 * [N/16][K/4][16][4]: for each 16-column block, K/4 groups of 16 columns x 4 consecutive k), int32,
 * exact. graphopt_qconv_* is the same product for a stride-1 convolution read straight from its padded
 * NHWC input (implicit GEMM, no im2col copy): row v of A is the window at flat pixel v of the padded image,
 * its K = KH*KW*C values are KH*KW runs of C contiguous bytes, run (p, q) at (p*Wp + q)*C bytes from pixel
 * v, and row v+1 starts C bytes after row v. Rows whose window wraps past the image's right edge (v % Wp >=
 * OW) are computed too and dropped by the caller. A 4 x 64 tile keeps 16 accumulators in zmm registers (vpdpbusd: 64 u8 x s8 products per
 * instruction); edge tiles go one row and one 16-column block at a time. The TIR caller parallelizes
 * over tiles. Compiled with the target attribute only, so the object links on any x86-64 build and the
 * code is called only from artifacts lowered for a CPU with avx512vnni.
 *
 * AMX: where the CPU running the artifact also has AMX-INT8 and Linux grants this process the tile
 * state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once), every call tile of at least AMX_MIN_ROWS rows runs on the
 * tile unit (tdpbusd: 16 x 16 x 64 u8 x s8 products per instruction, into int32 tiles configured with the call's
 * rows; the weights' packing is already AMX's B layout); the K tail past a multiple of 64 and calls with fewer rows
 * take the VNNI code. Both
 * are exact int32 sums, so results are bit-identical either way. GRAPHOPT_NO_AMX=1 in the environment
 * (read once per process) keeps the VNNI code.
 */
#include <immintrin.h>
#include <cpuid.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MR 4
#define NB 4

/* The activation operand of one call: row r of A starts at a + r*lda; its K values are ntaps runs of `run`
 * contiguous bytes, run t at tapoff[t] bytes from the row's start (a GEMM: one run of K at 0). */
typedef struct {
  const uint8_t* a;
  int64_t lda;
  int64_t ntaps;
  const int64_t* tapoff;
  int64_t run;
} a_view;

/* C[0:rows, 16*jb0 : 16*(jb0+nb)] (C: row 0 of the call, ldc int32 per row) = A rows x W (int8, packed
 * [N/16][K/4][16][4]); rows <= MR, nb <= NB. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void vnni_block(const a_view* A, const int8_t* W, int32_t* C, int64_t ldc, int64_t KB,
                       int64_t rows, int64_t jb0, int64_t nb) {
  if (rows == MR && nb == NB) {
    __m512i acc[MR][NB];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_si512();
    const int8_t* w0 = W + (jb0 + 0) * KB * 64;
    const int8_t* w1 = W + (jb0 + 1) * KB * 64;
    const int8_t* w2 = W + (jb0 + 2) * KB * 64;
    const int8_t* w3 = W + (jb0 + 3) * KB * 64;
    int64_t kb = 0;
    for (int64_t t = 0; t < A->ntaps; ++t) {
      const uint8_t* a0 = A->a + A->tapoff[t];
      const uint8_t* a1 = a0 + A->lda;
      const uint8_t* a2 = a1 + A->lda;
      const uint8_t* a3 = a2 + A->lda;
      for (int64_t c = 0; c < A->run; c += 4, ++kb) {
        __m512i b0 = _mm512_loadu_si512((const void*)(w0 + kb * 64));
        __m512i b1 = _mm512_loadu_si512((const void*)(w1 + kb * 64));
        __m512i b2 = _mm512_loadu_si512((const void*)(w2 + kb * 64));
        __m512i b3 = _mm512_loadu_si512((const void*)(w3 + kb * 64));
        int32_t s;
#define ROW(r, ap)                                                        \
        __builtin_memcpy(&s, ap + c, 4);                                  \
        {                                                                 \
          __m512i av = _mm512_set1_epi32(s);                              \
          acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);             \
          acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);             \
          acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], av, b2);             \
          acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], av, b3);             \
        }
        ROW(0, a0) ROW(1, a1) ROW(2, a2) ROW(3, a3)
#undef ROW
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j)
        _mm512_storeu_si512((void*)(C + r * ldc + (jb0 + j) * 16), acc[r][j]);
    return;
  }
  /* Edge tiles: one row and one 16-column block at a time. */
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* a = A->a + r * A->lda;
    for (int64_t j = 0; j < nb; ++j) {
      const int8_t* w = W + (jb0 + j) * KB * 64;
      __m512i acc = _mm512_setzero_si512();
      int64_t kb = 0;
      for (int64_t t = 0; t < A->ntaps; ++t)
        for (int64_t c = 0; c < A->run; c += 4, ++kb) {
          int32_t s;
          __builtin_memcpy(&s, a + A->tapoff[t] + c, 4);
          acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(s), _mm512_loadu_si512((const void*)(w + kb * 64)));
        }
      _mm512_storeu_si512((void*)(C + r * ldc + (jb0 + j) * 16), acc);
    }
  }
}


/* ------------------------------------------------------------------------------------------------ AMX */

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_state; /* 0: not asked yet, 1: usable, -1: not */

static int amx_usable(void) {
  int s = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
  if (s) return s > 0;
  unsigned a = 0, b = 0, c = 0, d = 0;
  int ok = __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 24) & 1) && ((d >> 25) & 1);
  const char* off = getenv("GRAPHOPT_NO_AMX");
  if (off && off[0] && off[0] != '0') ok = 0;
  /* Two threads may both ask: the request is idempotent. */
  if (ok) ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  __atomic_store_n(&amx_state, ok ? 1 : -1, __ATOMIC_RELEASE);
  return ok;
}

typedef struct {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* rows (1..32) x 16*nb columns (nb 1..4), on tiles, for the first `kc`-multiple of each run (kc = 64, or the
 * whole run when it is shorter: a multiple of 4); tmm0-3: C (2 x 2 tiles of up to 16 x 16 int32: rows 0-15
 * in tmm0-1, rows 16-31 in tmm2-3), tmm4-5: A (up to 16 rows x kc k each, lda apart), tmm6-7: B (kc/4
 * k-groups x 16 columns x 4). A tile configured with fewer rows reads and writes only those, so edge tiles
 * (M % 32 rows, an odd last column block) run on the tile unit too instead of the 4-row VNNI code, which
 * was the slow part of small-M GEMMs (a 7x7 conv's 49 rows: 17 of them on VNNI took longer than the 32 on
 * AMX). */
__attribute__((target("amx-tile,amx-int8,avx512f")))
static void amx_block(const a_view* A, int64_t kc, const int8_t* W, int32_t* C, int64_t ldc, int64_t KB,
                      int64_t rows, int64_t jb0, int64_t nb) {
  const int r0 = rows < 16 ? (int)rows : 16, r1 = (int)rows - r0;
  const int64_t kc_run = A->run / kc * kc;
  tile_config cfg;
  __builtin_memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = (uint8_t)r0;
  cfg.colsb[0] = cfg.colsb[1] = 64;
  cfg.colsb[4] = (uint16_t)kc;
  if (r1) {
    cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = (uint8_t)r1;
    cfg.colsb[2] = cfg.colsb[3] = 64;
    cfg.colsb[5] = (uint16_t)kc;
  }
  cfg.rows[6] = cfg.rows[7] = (uint8_t)(kc / 4);
  cfg.colsb[6] = cfg.colsb[7] = 64;
  /* Load the configuration only when the thread's current one differs (read back, not cached: other code on
   * this thread may configure tiles too), and never release the tiles: ldtilecfg + tilerelease on every call
   * cost ~12 % of a 128 x 256 x 1024 GEMM's time. */
  tile_config cur;
  _tile_storeconfig(&cur);
  if (__builtin_memcmp(&cur, &cfg, sizeof(cfg))) _tile_loadconfig(&cfg);
  int32_t* c0 = C + jb0 * 16;
  int32_t* c1 = r1 ? C + 16 * ldc + jb0 * 16 : c0; /* rows 16.. exist only when r1 > 0 */
  const uint8_t* a0 = A->a;
  const uint8_t* a1 = r1 ? A->a + 16 * A->lda : a0;
  const int64_t lda = A->lda;
  int64_t j = 0;
  for (; j + 2 <= nb; j += 2) {
    const int8_t* w0 = W + (jb0 + j) * KB * 64;
    const int8_t* w1 = W + (jb0 + j + 1) * KB * 64;
    _tile_zero(0);
    _tile_zero(1);
    if (r1) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t t = 0; t < A->ntaps; ++t) {
      const int64_t off = A->tapoff[t], k0 = t * A->run;
      for (int64_t c = 0; c < kc_run; c += kc) {
        const int64_t k = k0 + c;
        _tile_loadd(4, a0 + off + c, lda);
        _tile_loadd(6, w0 + k * 16, 64);
        _tile_loadd(7, w1 + k * 16, 64);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        if (r1) {
          _tile_loadd(5, a1 + off + c, lda);
          _tile_dpbusd(2, 5, 6);
          _tile_dpbusd(3, 5, 7);
        }
      }
    }
    _tile_stored(0, c0 + j * 16, ldc * 4);
    _tile_stored(1, c0 + j * 16 + 16, ldc * 4);
    if (r1) {
      _tile_stored(2, c1 + j * 16, ldc * 4);
      _tile_stored(3, c1 + j * 16 + 16, ldc * 4);
    }
  }
  if (j < nb) { /* an odd last block: tmm0 and tmm2 only */
    const int8_t* w0 = W + (jb0 + j) * KB * 64;
    _tile_zero(0);
    if (r1) _tile_zero(2);
    for (int64_t t = 0; t < A->ntaps; ++t) {
      const int64_t off = A->tapoff[t], k0 = t * A->run;
      for (int64_t c = 0; c < kc_run; c += kc) {
        _tile_loadd(4, a0 + off + c, lda);
        _tile_loadd(6, w0 + (k0 + c) * 16, 64);
        _tile_dpbusd(0, 4, 6);
        if (r1) {
          _tile_loadd(5, a1 + off + c, lda);
          _tile_dpbusd(2, 5, 6);
        }
      }
    }
    _tile_stored(0, c0 + j * 16, ldc * 4);
    if (r1) _tile_stored(2, c1 + j * 16, ldc * 4);
  }
}

/* C[r, block j] += sum over each run's k in [kc_run, run) of A[r, k] * W[k, block j] (what the tiles left). */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void vnni_tail(const a_view* A, int64_t kc_run, const int8_t* W, int32_t* C, int64_t ldc, int64_t KB,
                      int64_t rows, int64_t jb0, int64_t nb) {
  /* Locals: C's stores could alias *A as far as the compiler knows, and reloading it cost 40 % of a 7x7 stem. */
  const uint8_t* const a0 = A->a;
  const int64_t lda = A->lda, ntaps = A->ntaps, run = A->run;
  const int64_t* const tapoff = A->tapoff;
  if (ntaps == 1) { /* a GEMM's K tail (a 7x7 RGB stem's 4 of 196): per (row, block) the loop itself is the cost */
    const uint8_t* const a1 = a0 + tapoff[0];
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* a = a1 + r * lda;
      for (int64_t j = 0; j < nb; ++j) {
        const int8_t* w = W + (jb0 + j) * KB * 64;
        int32_t* c = C + r * ldc + (jb0 + j) * 16;
        __m512i acc = _mm512_loadu_si512((const void*)c);
        for (int64_t kb = kc_run / 4; kb < KB; ++kb) {
          int32_t s;
          __builtin_memcpy(&s, a + kb * 4, 4);
          acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(s), _mm512_loadu_si512((const void*)(w + kb * 64)));
        }
        _mm512_storeu_si512((void*)c, acc);
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* a = a0 + r * lda;
    for (int64_t j = 0; j < nb; ++j) {
      const int8_t* w = W + (jb0 + j) * KB * 64;
      int32_t* c = C + r * ldc + (jb0 + j) * 16;
      __m512i acc = _mm512_loadu_si512((const void*)c);
      for (int64_t t = 0; t < ntaps; ++t) {
        const uint8_t* at = a + tapoff[t];
        const int8_t* wt = w + (t * run) * 16;
        for (int64_t k = kc_run; k < run; k += 4) {
          int32_t s;
          __builtin_memcpy(&s, at + k, 4);
          acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(s), _mm512_loadu_si512((const void*)(wt + k * 16)));
        }
      }
      _mm512_storeu_si512((void*)c, acc);
    }
  }
}

/* The TIR caller's tile: rows <= CALL_ROWS rows of C, nb <= CALL_BLOCKS 16-column blocks. */
#define CALL_ROWS 32
#define CALL_BLOCKS 4
/* Fewer rows than this take the VNNI code even where AMX is usable: a tile product costs the same for 1 row as
 * for 16, while VNNI's cost falls with the rows (a GEMV-like call). */
#define AMX_MIN_ROWS 8

static int32_t product(const a_view* A, const int8_t* W, int32_t* C, int64_t ldc, int64_t KB, int64_t rows,
                       int64_t jb0, int64_t nb) {
  /* Tile k-chunks: 64, or a whole run of 4..60 (a conv of 16 or 32 channels); other runs: 64-chunks plus the
   * VNNI tail. */
  const int64_t kc = A->run >= 64 ? 64 : A->run;
  if (rows >= AMX_MIN_ROWS && kc >= 4 && kc % 4 == 0 && amx_usable()) {
    amx_block(A, kc, W, C, ldc, KB, rows, jb0, nb);
    const int64_t kc_run = A->run / kc * kc;
    if (kc_run < A->run) vnni_tail(A, kc_run, W, C, ldc, KB, rows, jb0, nb);
    return 0;
  }
  for (int64_t r = 0; r < rows; r += MR) {
    a_view sub = *A;
    sub.a = A->a + r * A->lda;
    for (int64_t j = 0; j < nb; j += NB)
      vnni_block(&sub, W, C + r * ldc, ldc, KB, rows - r < MR ? rows - r : MR, jb0 + j, nb - j < NB ? nb - j : NB);
  }
  return 0;
}

/* C[i0:i0+rows, 16*jb0 : 16*(jb0+nb)] = A[i0:i0+rows, :K] x W; C is [M, N] int32. */
int32_t graphopt_qgemm_u8s8_avx512vnni(const uint8_t* A, const int8_t* W, int32_t* C, int64_t K, int64_t N,
                                       int64_t i0, int64_t rows, int64_t jb0, int64_t nb) {
  const int64_t zero = 0;
  const a_view a = {A + i0 * K, K, 1, &zero, K};
  return product(&a, W, C + i0 * N, N, K / 4, rows, jb0, nb);
}

/* Implicit-GEMM stride-1 convolution of one image: rows v0..v0+rows of C ([OH*Wp, N] int32: flat pixels of the
 * padded width) = windows of X (the padded NHWC image, [Hp, Wp, Cin] uint8) x W (packed, K = KH*KW*Cin in
 * (kh, kw, c) order). Cin a multiple of 4, KH*KW <= 64; the caller keeps v0 + rows <= (OH-1)*Wp + OW, so
 * every window read lies inside X. */
int32_t graphopt_qconv_u8s8_avx512vnni(const uint8_t* X, const int8_t* W, int32_t* C, int64_t Cin, int64_t KH,
                                       int64_t KW, int64_t Wp, int64_t N, int64_t v0, int64_t rows, int64_t jb0,
                                       int64_t nb) {
  int64_t tapoff[64];
  for (int64_t p = 0; p < KH; ++p)
    for (int64_t q = 0; q < KW; ++q) tapoff[p * KW + q] = (p * Wp + q) * Cin;
  const a_view a = {X + v0 * Cin, Cin, KH * KW, tapoff, Cin};
  return product(&a, W, C + v0 * N, N, KH * KW * Cin / 4, rows, jb0, nb);
}

/* ------------------------------------------------------------------- a matmul of two activations */

/* Packs B ([K, N] row-major, uint8 when `is_u8`, else int8) for the kernels: P = [n_pad/16][K/4][16][4] int8 of
 * b' = b - 128 (uint8) or b (int8), columns N..n_pad-1 zero; colsum[n] = sum over k of b'[k][n] (0 past N). K a
 * multiple of 4. One call per matrix (the TIR caller parallelizes over a batch of them). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
int32_t graphopt_qpack_b_avx512vnni(const uint8_t* B, int8_t* P, int32_t* colsum, int64_t K, int64_t N, int64_t n_pad,
                                    int32_t is_u8) {
  const int64_t KB = K / 4;
  const __m128i flip = _mm_set1_epi8(is_u8 ? (char)0x80 : 0); /* u8 - 128 as int8: the top bit flipped */
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t jb = 0; jb < n_pad / 16; ++jb) {
    const int64_t n0 = jb * 16;
    /* Columns past N read nothing and pack as 0 (the flip is masked off too). */
    const __mmask16 m = n0 + 16 <= N ? (__mmask16)0xFFFF : n0 < N ? (__mmask16)((1u << (N - n0)) - 1) : 0;
    int8_t* pj = P + jb * KB * 64;
    __m512i sums = _mm512_setzero_si512();
    for (int64_t kb = 0; kb < KB; ++kb) {
      const uint8_t* b = B + kb * 4 * N + n0;
      /* 4 rows of 16 columns -> 16 columns of 4 consecutive k (a 4 x 16 byte transpose). */
      __m128i r0 = _mm_xor_si128(_mm_maskz_loadu_epi8(m, b), _mm_maskz_mov_epi8(m, flip));
      __m128i r1 = _mm_xor_si128(_mm_maskz_loadu_epi8(m, b + N), _mm_maskz_mov_epi8(m, flip));
      __m128i r2 = _mm_xor_si128(_mm_maskz_loadu_epi8(m, b + 2 * N), _mm_maskz_mov_epi8(m, flip));
      __m128i r3 = _mm_xor_si128(_mm_maskz_loadu_epi8(m, b + 3 * N), _mm_maskz_mov_epi8(m, flip));
      __m128i t0 = _mm_unpacklo_epi8(r0, r1), t1 = _mm_unpackhi_epi8(r0, r1);
      __m128i t2 = _mm_unpacklo_epi8(r2, r3), t3 = _mm_unpackhi_epi8(r2, r3);
      __m512i v = _mm512_inserti32x4(_mm512_castsi128_si512(_mm_unpacklo_epi16(t0, t2)), _mm_unpackhi_epi16(t0, t2), 1);
      v = _mm512_inserti32x4(v, _mm_unpacklo_epi16(t1, t3), 2);
      v = _mm512_inserti32x4(v, _mm_unpackhi_epi16(t1, t3), 3);
      _mm512_storeu_si512((void*)(pj + kb * 64), v);
      sums = _mm512_dpbusd_epi32(sums, ones, v); /* column c: the sum of its 4 k */
    }
    _mm512_storeu_si512((void*)(colsum + n0), sums);
  }
  return 0;
}

/* C[i0:i0+rows, 16*jb0 : 16*(jb0+nb)] = sum over k of (A[r, k] - za) * (b'[k, c] - zb), exact int32: the product of
 * graphopt_qgemm_u8s8_avx512vnni, then A's row sums (computed here) and B's column sums (from the packing) take
 * the zero points out, so no separate sum kernels run. */
__attribute__((target("avx512f,avx512bw")))
int32_t graphopt_qgemm_zp_u8s8_avx512vnni(const uint8_t* A, const int8_t* W, const int32_t* colsum, int32_t* C,
                                          int64_t K, int64_t N, int64_t i0, int64_t rows, int64_t jb0, int64_t nb,
                                          int32_t za, int32_t zb) {
  graphopt_qgemm_u8s8_avx512vnni(A, W, C, K, N, i0, rows, jb0, nb);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* a = A + (i0 + r) * K;
    int32_t rowsum = 0;
    for (int64_t k = 0; k < K; ++k) rowsum += a[k];
    /* In int64, then back: no signed overflow on the way (the exact sum itself fits int32 for any K a model
     * has; past ~2^31 / 255^2 products it would wrap, as the accumulator would). */
    const int64_t row_term = (int64_t)zb * rowsum - K * (int64_t)za * zb;
    int32_t* c = C + (i0 + r) * N + jb0 * 16;
    const int32_t* cs = colsum + jb0 * 16;
    for (int64_t j = 0; j < nb * 16; ++j) c[j] = (int32_t)((int64_t)c[j] - (int64_t)za * cs[j] - row_term);
  }
  return 0;
}

/* 1 when this process runs call tiles of AMX_MIN_ROWS rows or more on AMX (asks for the tile state on first use), else 0. */
int32_t graphopt_qgemm_amx_in_use(void) { return amx_usable(); }
