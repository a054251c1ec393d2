/* graphopt's int8 GEMM micro-kernel for AVX-512 VNNI (see targets/int8.py).
 *
 * C[i0:i0+rows, 16*jb0 : 16*(jb0+nb)] = A[i0:i0+rows, :K] (uint8, row-major) x W (int8, packed
 * [N/16][K/4][16][4]: for each 16-column block, K/4 groups of 16 columns x 4 consecutive k), int32,
 * exact. A 4 x 64 tile keeps 16 accumulators in zmm registers (vpdpbusd: 64 u8 x s8 products per
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

/* C[i0:i0+rows, 16*jb0 : 16*(jb0+nb)] = A[i0:i0+rows, :K] (uint8) x W (int8, packed [N/16][K/4][16][4]), int32;
 * rows <= MR, nb <= NB. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void vnni_block(const uint8_t* A, const int8_t* W, int32_t* C, int64_t K, int64_t N,
                       int64_t i0, int64_t rows, int64_t jb0, int64_t nb) {
  const int64_t KB = K / 4;
  if (rows == MR && nb == NB) {
    __m512i acc[MR][NB];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_si512();
    const int8_t* w0 = W + (jb0 + 0) * KB * 64;
    const int8_t* w1 = W + (jb0 + 1) * KB * 64;
    const int8_t* w2 = W + (jb0 + 2) * KB * 64;
    const int8_t* w3 = W + (jb0 + 3) * KB * 64;
    const uint8_t* a0 = A + (i0 + 0) * K;
    const uint8_t* a1 = A + (i0 + 1) * K;
    const uint8_t* a2 = A + (i0 + 2) * K;
    const uint8_t* a3 = A + (i0 + 3) * K;
    for (int64_t kb = 0; kb < KB; ++kb) {
      __m512i b0 = _mm512_loadu_si512((const void*)(w0 + kb * 64));
      __m512i b1 = _mm512_loadu_si512((const void*)(w1 + kb * 64));
      __m512i b2 = _mm512_loadu_si512((const void*)(w2 + kb * 64));
      __m512i b3 = _mm512_loadu_si512((const void*)(w3 + kb * 64));
      int32_t s;
#define ROW(r, ap)                                                        \
      __builtin_memcpy(&s, ap + kb * 4, 4);                               \
      {                                                                   \
        __m512i av = _mm512_set1_epi32(s);                                \
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);               \
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);               \
        acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], av, b2);               \
        acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], av, b3);               \
      }
      ROW(0, a0) ROW(1, a1) ROW(2, a2) ROW(3, a3)
#undef ROW
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j)
        _mm512_storeu_si512((void*)(C + (i0 + r) * N + (jb0 + j) * 16), acc[r][j]);
    return;
  }
  /* Edge tiles: one row and one 16-column block at a time. */
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* a = A + (i0 + r) * K;
    for (int64_t j = 0; j < nb; ++j) {
      const int8_t* w = W + (jb0 + j) * KB * 64;
      __m512i acc = _mm512_setzero_si512();
      for (int64_t kb = 0; kb < KB; ++kb) {
        int32_t s;
        __builtin_memcpy(&s, a + kb * 4, 4);
        acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(s), _mm512_loadu_si512((const void*)(w + kb * 64)));
      }
      _mm512_storeu_si512((void*)(C + (i0 + r) * N + (jb0 + j) * 16), acc);
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

/* rows (1..32) x 16*nb columns (nb 1..4), k < K64 on tiles; tmm0-3: C (2 x 2 tiles of up to 16 x 16 int32: rows
 * 0-15 in tmm0-1, rows 16-31 in tmm2-3), tmm4-5: A (up to 16 rows x 64 k each), tmm6-7: B (16 k-groups x 16
 * columns x 4). A tile configured with fewer rows reads and writes only those, so edge tiles (M % 32 rows, an odd
 * last column block) run on the tile unit too instead of the 4-row VNNI code, which was the slow part of small-M
 * GEMMs (a 7x7 conv's 49 rows: 17 of them on VNNI took longer than the 32 on AMX). */
__attribute__((target("amx-tile,amx-int8,avx512f")))
static void amx_block(const uint8_t* A, const int8_t* W, int32_t* C, int64_t K, int64_t K64, int64_t N,
                      int64_t i0, int64_t rows, int64_t jb0, int64_t nb) {
  const int r0 = rows < 16 ? (int)rows : 16, r1 = (int)rows - r0;
  tile_config cfg;
  __builtin_memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = (uint8_t)r0;
  cfg.colsb[0] = cfg.colsb[1] = cfg.colsb[4] = 64;
  if (r1) {
    cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = (uint8_t)r1;
    cfg.colsb[2] = cfg.colsb[3] = cfg.colsb[5] = 64;
  }
  cfg.rows[6] = cfg.rows[7] = 16;
  cfg.colsb[6] = cfg.colsb[7] = 64;
  _tile_loadconfig(&cfg);
  const int64_t KB = K / 4;
  int32_t* c0 = C + (i0 + 0) * N + jb0 * 16;
  int32_t* c1 = r1 ? C + (i0 + 16) * N + jb0 * 16 : c0; /* rows 16.. exist only when r1 > 0 */
  const uint8_t* a0 = A + (i0 + 0) * K;
  const uint8_t* a1 = r1 ? A + (i0 + 16) * K : a0;
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
    for (int64_t k = 0; k < K64; k += 64) {
      _tile_loadd(4, a0 + k, K);
      _tile_loadd(6, w0 + k * 16, 64);
      _tile_loadd(7, w1 + k * 16, 64);
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(1, 4, 7);
      if (r1) {
        _tile_loadd(5, a1 + k, K);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
      }
    }
    _tile_stored(0, c0 + j * 16, N * 4);
    _tile_stored(1, c0 + j * 16 + 16, N * 4);
    if (r1) {
      _tile_stored(2, c1 + j * 16, N * 4);
      _tile_stored(3, c1 + j * 16 + 16, N * 4);
    }
  }
  if (j < nb) { /* an odd last block: tmm0 and tmm2 only */
    const int8_t* w0 = W + (jb0 + j) * KB * 64;
    _tile_zero(0);
    if (r1) _tile_zero(2);
    for (int64_t k = 0; k < K64; k += 64) {
      _tile_loadd(4, a0 + k, K);
      _tile_loadd(6, w0 + k * 16, 64);
      _tile_dpbusd(0, 4, 6);
      if (r1) {
        _tile_loadd(5, a1 + k, K);
        _tile_dpbusd(2, 5, 6);
      }
    }
    _tile_stored(0, c0 + j * 16, N * 4);
    if (r1) _tile_stored(2, c1 + j * 16, N * 4);
  }
  _tile_release();
}

/* C[r, block j] += sum over k in [K64, K) of A[r, k] * W[k, block j] (the K tail of an AMX tile). */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void vnni_tail(const uint8_t* A, const int8_t* W, int32_t* C, int64_t K, int64_t K64, int64_t N,
                      int64_t i0, int64_t rows, int64_t jb0, int64_t nb) {
  const int64_t KB = K / 4;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* a = A + (i0 + r) * K;
    for (int64_t j = 0; j < nb; ++j) {
      const int8_t* w = W + (jb0 + j) * KB * 64;
      int32_t* c = C + (i0 + r) * N + (jb0 + j) * 16;
      __m512i acc = _mm512_loadu_si512((const void*)c);
      for (int64_t kb = K64 / 4; kb < KB; ++kb) {
        int32_t s;
        __builtin_memcpy(&s, a + kb * 4, 4);
        acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(s), _mm512_loadu_si512((const void*)(w + kb * 64)));
      }
      _mm512_storeu_si512((void*)c, acc);
    }
  }
}

/* The TIR caller's tile: C[i0:i0+rows, 16*jb0 : 16*(jb0+nb)], rows <= CALL_ROWS, nb <= CALL_BLOCKS. */
#define CALL_ROWS 32
#define CALL_BLOCKS 4
/* Fewer rows than this take the VNNI code even where AMX is usable: a tile product costs the same for 1 row as
 * for 16, while VNNI's cost falls with the rows (a GEMV-like call). */
#define AMX_MIN_ROWS 8

int32_t graphopt_qgemm_u8s8_avx512vnni(const uint8_t* A, const int8_t* W, int32_t* C, int64_t K, int64_t N,
                                       int64_t i0, int64_t rows, int64_t jb0, int64_t nb) {
  const int64_t K64 = K / 64 * 64;
  if (rows >= AMX_MIN_ROWS && K64 > 0 && amx_usable()) {
    amx_block(A, W, C, K, K64, N, i0, rows, jb0, nb);
    if (K64 < K) vnni_tail(A, W, C, K, K64, N, i0, rows, jb0, nb);
    return 0;
  }
  for (int64_t r = 0; r < rows; r += MR)
    for (int64_t j = 0; j < nb; j += NB)
      vnni_block(A, W, C, K, N, i0 + r, rows - r < MR ? rows - r : MR, jb0 + j, nb - j < NB ? nb - j : NB);
  return 0;
}

/* 1 when this process runs call tiles of AMX_MIN_ROWS rows or more on AMX (asks for the tile state on first use), else 0. */
int32_t graphopt_qgemm_amx_in_use(void) { return amx_usable(); }
