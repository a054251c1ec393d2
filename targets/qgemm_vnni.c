/* graphopt's int8 GEMM micro-kernel for AVX-512 VNNI (see targets/int8.py).
 *
 * C[i0:i0+rows, 16*jb0 : 16*(jb0+nb)] = A[i0:i0+rows, :K] (uint8, row-major) x W (int8, packed
 * [N/16][K/4][16][4]: for each 16-column block, K/4 groups of 16 columns x 4 consecutive k), int32,
 * exact. A 4 x 64 tile keeps 16 accumulators in zmm registers (vpdpbusd: 64 u8 x s8 products per
 * instruction); edge tiles go one row and one 16-column block at a time. The TIR caller parallelizes
 * over tiles. Compiled with the target attribute only, so the object links on any x86-64 build and the
 * code is called only from artifacts lowered for a CPU with avx512vnni.
 */
#include <immintrin.h>
#include <stdint.h>

#define MR 4
#define NB 4

/* C[i0:i0+rows, 16*jb0 : 16*(jb0+nb)] = A[i0:i0+rows, :K] (uint8) x W (int8, packed [N/16][K/4][16][4]), int32. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
int32_t graphopt_qgemm_u8s8_avx512vnni(const uint8_t* A, const int8_t* W, int32_t* C, int64_t K, int64_t N,
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
    return 0;
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
  return 0;
}
