/* graphopt's exact integer GEMM micro-kernel for AVX2 CPUs without VNNI (see targets/int8.py).
 *
 * C[i0:i0+rows, 8*jb0 : 8*(jb0+nb)] = A[i0:i0+rows, :K] (int16, row-major; the uint8/int8 activation codes
 * widened) x W (int8, packed [N/8][K/2][8][2]: for each 8-column block, K/2 groups of 8 columns x 2
 * consecutive k; widened to int16 as loaded), int32, exact. vpmaddwd multiplies 16 int16 pairs into 8
 * int32 sums without saturation. Weights stay int8 in memory: half the bytes to store and stream (int16
 * weights were 8% faster on K = 768..4608 GEMMs but 20% slower on a 3136 x 576 x 64 one, whose 8-column
 * blocks then no longer fit the L1 cache).
 * (The usual AVX2 u8 x s8 route, vpmaddubsw, is faster but saturates its int16 pair sums: ONNX Runtime's
 * MatMulInteger on such a CPU is off by up to 1e5 on full-range codes. Exactness is the point here.)
 * A 2 x 32 tile keeps 8 accumulators in ymm registers (measured best of 1-6 rows x 2-8 blocks on Zen 3:
 * larger tiles spill); edge tiles go one row and one 8-column block at a time. The TIR caller
 * parallelizes over tiles. Compiled with the target attribute only, so the object links on any x86-64
 * build and the code is called only from artifacts lowered for a CPU with AVX2.
 */
#include <immintrin.h>
#include <stdint.h>

#define MR 2
#define NB 4
#define LOADW(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(p)))

__attribute__((target("avx2")))
int32_t graphopt_qgemm_s16_avx2(const int16_t* A, const int8_t* W, int32_t* C, int64_t K, int64_t N,
                                int64_t i0, int64_t rows, int64_t jb0, int64_t nb) {
  const int64_t KB = K / 2;
  if (rows == MR && nb == NB) {
    __m256i acc[MR][NB];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_si256();
    const int8_t* w[NB];
    for (int j = 0; j < NB; ++j) w[j] = W + (jb0 + j) * KB * 16;
    const int16_t* a[MR];
    for (int r = 0; r < MR; ++r) a[r] = A + (i0 + r) * K;
    for (int64_t kb = 0; kb < KB; ++kb) {
      __m256i b[NB];
      for (int j = 0; j < NB; ++j) b[j] = LOADW(w[j] + kb * 16);
      for (int r = 0; r < MR; ++r) {
        int32_t s; /* one (a[k], a[k+1]) pair, broadcast */
        __builtin_memcpy(&s, a[r] + kb * 2, 4);
        const __m256i av = _mm256_set1_epi32(s);
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(av, b[j]));
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j)
        _mm256_storeu_si256((__m256i*)(C + (i0 + r) * N + (jb0 + j) * 8), acc[r][j]);
    return 0;
  }
  /* Edge tiles: one row and one 8-column block at a time. */
  for (int64_t r = 0; r < rows; ++r) {
    const int16_t* a = A + (i0 + r) * K;
    for (int64_t j = 0; j < nb; ++j) {
      const int8_t* w = W + (jb0 + j) * KB * 16;
      __m256i acc = _mm256_setzero_si256();
      for (int64_t kb = 0; kb < KB; ++kb) {
        int32_t s;
        __builtin_memcpy(&s, a + kb * 2, 4);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_set1_epi32(s),
                                                      LOADW(w + kb * 16)));
      }
      _mm256_storeu_si256((__m256i*)(C + (i0 + r) * N + (jb0 + j) * 8), acc);
    }
  }
  return 0;
}
