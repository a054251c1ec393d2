/* graphopt's low-bit weight GEMM: y = x W for a weight stored as 2/3/4/8-bit codes with a float16 scale and
 * offset per output column and group of inputs (what quantize(mode=weight-only) writes; see targets/lowbit.py,
 * which recognizes the decode in the graph, repacks the codes once at lower time and emits the call).
 *
 *   W[k, n] = float(code[n, k]) * scale[n, k / group] + offset[n, k / group]      (float32 mul, then add)
 *
 * exactly as the graph's decode computes it (this file is compiled with -ffp-contract=off so the two stay
 * separate roundings), then a float32 GEMM. Shapes (row-major):
 *
 *   x       [m, k]             float32 activations
 *   codes   [nb, k, cb*4]      uint8, nb = ceil(n/32) blocks of 32 columns; per k, the 32 codes of a block in
 *                              a cb-bit container (cb = 8, 4 or 2; 3-bit codes use 4):
 *                                cb=8: byte j = column j;
 *                                cb=4: byte j (0..15) = column j | column j+16 << 4;
 *                                cb=2: byte j (0..7) = column j | j+8 << 2 | j+16 << 4 | j+24 << 6
 *   scales  [nb, ng, 32]       float16 bits; columns past n: 0
 *   offsets [nb, ng, 32]       float16 bits
 *   y       [m, n]             float32
 *
 * One call computes rows [row0, row0 + rows) of the column blocks [blk0, blk0 + blks). Per block, K is taken
 * in chunks of KC: the chunk's weights are decoded once into a float panel [KC][32] (on the stack, in L1),
 * then every row tile (MR rows x 32 columns, accumulators in registers) runs over the panel. Decoding costs
 * a few instructions per 16 weights, shared by all rows; the weights cross memory at cb/32 of float32's bytes.
 *
 * Three variants: AVX-512 (intrinsics; F16C conversions, masked column tails), and one portable C body compiled
 * for AVX2 + FMA and for the baseline ISA (the compiler vectorizes its loops over 32 columns); targets/lowbit.py
 * picks the one the target CPU runs. Returns 0.
 */
#include <stdint.h>
#include <string.h>

#define GRAPHOPT_LOWBIT_KC 256
#define GRAPHOPT_LOWBIT_MR 8

/* float16 bits -> float32, exact (subnormals, inf and NaN included). */
static inline float graphopt_half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
  if (e == 0) {
    if (mant == 0) {
      bits = sign;
    } else { /* subnormal: normalize */
      e = 113;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        e--;
      }
      bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (e == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((e + 112) << 23) | (mant << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* ---------------------------------------------------------------- portable variants */
/* One body, compiled twice: for the baseline ISA, and (x86-64) for AVX2 + FMA, where GCC vectorizes the loops
 * over the 32 columns. MADD is the panel product: an explicit fused multiply-add where FMA exists. */
#define GRAPHOPT_LOWBIT_PORTABLE(SUFFIX, ATTR, MADD)                                                             \
  ATTR static void graphopt_lowbit_decode_##SUFFIX(const uint8_t* codes, int cb, const float* s, const float* o, \
                                                   int64_t kn, float* panel) {                                 \
    for (int64_t kk = 0; kk < kn; kk++) {                                                                      \
      const uint8_t* c = codes + kk * (cb * 4);                                                                \
      float* p = panel + kk * 32;                                                                              \
      uint8_t q[32];                                                                                           \
      if (cb == 8) {                                                                                           \
        for (int j = 0; j < 32; j++) q[j] = c[j];                                                              \
      } else if (cb == 4) {                                                                                    \
        for (int j = 0; j < 16; j++) {                                                                         \
          q[j] = c[j] & 15;                                                                                    \
          q[j + 16] = c[j] >> 4;                                                                               \
        }                                                                                                      \
      } else {                                                                                                 \
        for (int j = 0; j < 8; j++) {                                                                          \
          q[j] = c[j] & 3;                                                                                     \
          q[j + 8] = (c[j] >> 2) & 3;                                                                          \
          q[j + 16] = (c[j] >> 4) & 3;                                                                         \
          q[j + 24] = c[j] >> 6;                                                                               \
        }                                                                                                      \
      }                                                                                                        \
      for (int j = 0; j < 32; j++) p[j] = (float)q[j] * s[j] + o[j];                                           \
    }                                                                                                          \
  }                                                                                                            \
                                                                                                               \
  ATTR static void graphopt_lowbit_tile_##SUFFIX(const float* x, int64_t ldx, const float* panel, int64_t kn,  \
                                                 float* y, int64_t ldy, int mr, int cols, int first) {         \
    float acc[GRAPHOPT_LOWBIT_MR][32];                                                                         \
    for (int r = 0; r < mr; r++)                                                                               \
      for (int j = 0; j < 32; j++) acc[r][j] = (first || j >= cols) ? 0.0f : y[r * ldy + j];                  \
    for (int64_t kk = 0; kk < kn; kk++) {                                                                      \
      const float* p = panel + kk * 32;                                                                        \
      for (int r = 0; r < mr; r++) {                                                                           \
        float a = x[r * ldx + kk];                                                                             \
        for (int j = 0; j < 32; j++) acc[r][j] = MADD(a, p[j], acc[r][j]);                                     \
      }                                                                                                        \
    }                                                                                                          \
    for (int r = 0; r < mr; r++)                                                                               \
      for (int j = 0; j < cols; j++) y[r * ldy + j] = acc[r][j];                                               \
  }                                                                                                            \
                                                                                                               \
  ATTR int32_t graphopt_lowbit_gemm_f32_##SUFFIX(const float* x, const uint8_t* codes, const uint16_t* scales, \
                                                 const uint16_t* offsets, float* y, int64_t m, int64_t k,      \
                                                 int64_t n, int64_t group, int64_t ng, int32_t cb, int64_t row0, \
                                                 int64_t rows, int64_t blk0, int64_t blks) {                   \
    (void)m;                                                                                                   \
    float panel[GRAPHOPT_LOWBIT_KC * 32] __attribute__((aligned(64)));                                         \
    float s[32], o[32];                                                                                        \
    for (int64_t b = blk0; b < blk0 + blks; b++) {                                                             \
      int cols = (int)((n - b * 32) < 32 ? (n - b * 32) : 32);                                                 \
      for (int64_t k0 = 0; k0 < k; k0 += GRAPHOPT_LOWBIT_KC) {                                                 \
        int64_t k1 = k0 + GRAPHOPT_LOWBIT_KC < k ? k0 + GRAPHOPT_LOWBIT_KC : k;                                \
        for (int64_t kg = k0; kg < k1;) { /* one group's run of k: one scale and offset vector */             \
          int64_t g = kg / group, ke = (g + 1) * group < k1 ? (g + 1) * group : k1;                            \
          const uint16_t* sh = scales + (b * ng + g) * 32;                                                     \
          const uint16_t* oh = offsets + (b * ng + g) * 32;                                                    \
          for (int j = 0; j < 32; j++) {                                                                       \
            s[j] = graphopt_half_to_float(sh[j]);                                                              \
            o[j] = graphopt_half_to_float(oh[j]);                                                              \
          }                                                                                                    \
          graphopt_lowbit_decode_##SUFFIX(codes + (b * k + kg) * (cb * 4), cb, s, o, ke - kg,                  \
                                          panel + (kg - k0) * 32);                                             \
          kg = ke;                                                                                             \
        }                                                                                                      \
        for (int64_t r = row0; r < row0 + rows; r += GRAPHOPT_LOWBIT_MR) {                                     \
          int mr = (int)(row0 + rows - r < GRAPHOPT_LOWBIT_MR ? row0 + rows - r : GRAPHOPT_LOWBIT_MR);         \
          graphopt_lowbit_tile_##SUFFIX(x + r * k + k0, k, panel, k1 - k0, y + r * n + b * 32, n, mr, cols,    \
                                        k0 == 0);                                                              \
        }                                                                                                      \
      }                                                                                                        \
    }                                                                                                          \
    return 0;                                                                                                  \
  }

#define GRAPHOPT_MADD_PLAIN(a, b, c) ((c) + (a) * (b))
GRAPHOPT_LOWBIT_PORTABLE(generic, , GRAPHOPT_MADD_PLAIN)
#if defined(__x86_64__)
#define GRAPHOPT_MADD_FMA(a, b, c) __builtin_fmaf((a), (b), (c))
GRAPHOPT_LOWBIT_PORTABLE(avx2, __attribute__((target("avx2,fma"))), GRAPHOPT_MADD_FMA)
#endif

/* ---------------------------------------------------------------- AVX-512 variant */
#if defined(__x86_64__)
#include <immintrin.h>

#define GRAPHOPT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))

GRAPHOPT_AVX512 static inline void graphopt_lowbit_decode_avx512(const uint8_t* codes, int cb, __m512 s0,
                                                                 __m512 s1, __m512 o0, __m512 o1, int64_t kn,
                                                                 float* panel) {
  const __m128i low4 = _mm_set1_epi8(15), low2 = _mm_set1_epi8(3);
  for (int64_t kk = 0; kk < kn; kk++) {
    const uint8_t* c = codes + kk * (cb * 4);
    __m128i q0, q1;
    if (cb == 8) {
      q0 = _mm_loadu_si128((const __m128i*)c);
      q1 = _mm_loadu_si128((const __m128i*)(c + 16));
    } else if (cb == 4) {
      __m128i v = _mm_loadu_si128((const __m128i*)c);
      q0 = _mm_and_si128(v, low4);
      q1 = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
    } else {
      __m128i v = _mm_loadl_epi64((const __m128i*)c);
      __m128i a = _mm_and_si128(v, low2), bb = _mm_and_si128(_mm_srli_epi16(v, 2), low2);
      __m128i cc = _mm_and_si128(_mm_srli_epi16(v, 4), low2), d = _mm_and_si128(_mm_srli_epi16(v, 6), low2);
      q0 = _mm_unpacklo_epi64(a, bb);
      q1 = _mm_unpacklo_epi64(cc, d);
    }
    __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q0));
    __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q1));
    _mm512_store_ps(panel + kk * 32, _mm512_add_ps(_mm512_mul_ps(f0, s0), o0));
    _mm512_store_ps(panel + kk * 32 + 16, _mm512_add_ps(_mm512_mul_ps(f1, s1), o1));
  }
}

/* MR rows x 32 columns over the panel; MR a compile-time constant at each call site (fully unrolled). */
#define GRAPHOPT_LOWBIT_TILE(MR)                                                                                 \
  GRAPHOPT_AVX512 static void graphopt_lowbit_tile##MR(const float* x, int64_t ldx, const float* panel,        \
                                                      int64_t kn, float* y, int64_t ldy, __mmask16 m0,        \
                                                      __mmask16 m1, int first) {                              \
    __m512 a0[MR], a1[MR];                                                                                     \
    for (int r = 0; r < MR; r++) {                                                                             \
      a0[r] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, y + r * ldy);                            \
      a1[r] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, y + r * ldy + 16);                       \
    }                                                                                                          \
    for (int64_t kk = 0; kk < kn; kk++) {                                                                      \
      __m512 p0 = _mm512_load_ps(panel + kk * 32), p1 = _mm512_load_ps(panel + kk * 32 + 16);                  \
      for (int r = 0; r < MR; r++) {                                                                           \
        __m512 a = _mm512_set1_ps(x[r * ldx + kk]);                                                            \
        a0[r] = _mm512_fmadd_ps(a, p0, a0[r]);                                                                 \
        a1[r] = _mm512_fmadd_ps(a, p1, a1[r]);                                                                 \
      }                                                                                                        \
    }                                                                                                          \
    for (int r = 0; r < MR; r++) {                                                                             \
      _mm512_mask_storeu_ps(y + r * ldy, m0, a0[r]);                                                           \
      _mm512_mask_storeu_ps(y + r * ldy + 16, m1, a1[r]);                                                      \
    }                                                                                                          \
  }
GRAPHOPT_LOWBIT_TILE(1)
GRAPHOPT_LOWBIT_TILE(2)
GRAPHOPT_LOWBIT_TILE(3)
GRAPHOPT_LOWBIT_TILE(4)
GRAPHOPT_LOWBIT_TILE(5)
GRAPHOPT_LOWBIT_TILE(6)
GRAPHOPT_LOWBIT_TILE(7)
GRAPHOPT_LOWBIT_TILE(8)

GRAPHOPT_AVX512 int32_t graphopt_lowbit_gemm_f32_avx512(const float* x, const uint8_t* codes,
                                                        const uint16_t* scales, const uint16_t* offsets, float* y,
                                                        int64_t m, int64_t k, int64_t n, int64_t group, int64_t ng,
                                                        int32_t cb, int64_t row0, int64_t rows, int64_t blk0,
                                                        int64_t blks) {
  (void)m;
  float panel[GRAPHOPT_LOWBIT_KC * 32] __attribute__((aligned(64)));
  for (int64_t b = blk0; b < blk0 + blks; b++) {
    int cols = (int)((n - b * 32) < 32 ? (n - b * 32) : 32);
    __mmask16 m0 = cols >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << cols) - 1);
    __mmask16 m1 = cols >= 32 ? (__mmask16)0xffff : cols <= 16 ? (__mmask16)0 : (__mmask16)((1u << (cols - 16)) - 1);
    for (int64_t k0 = 0; k0 < k; k0 += GRAPHOPT_LOWBIT_KC) {
      int64_t k1 = k0 + GRAPHOPT_LOWBIT_KC < k ? k0 + GRAPHOPT_LOWBIT_KC : k;
      for (int64_t kg = k0; kg < k1;) {
        int64_t g = kg / group, ke = (g + 1) * group < k1 ? (g + 1) * group : k1;
        const uint16_t* sh = scales + (b * ng + g) * 32;
        const uint16_t* oh = offsets + (b * ng + g) * 32;
        __m512 s0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sh));
        __m512 s1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sh + 16)));
        __m512 o0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)oh));
        __m512 o1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(oh + 16)));
        graphopt_lowbit_decode_avx512(codes + (b * k + kg) * (cb * 4), cb, s0, s1, o0, o1, ke - kg,
                                      panel + (kg - k0) * 32);
        kg = ke;
      }
      int64_t kn = k1 - k0;
      for (int64_t r = row0; r < row0 + rows; r += GRAPHOPT_LOWBIT_MR) {
        int mr = (int)(row0 + rows - r < GRAPHOPT_LOWBIT_MR ? row0 + rows - r : GRAPHOPT_LOWBIT_MR);
        const float* xr = x + r * k + k0;
        float* yr = y + r * n + b * 32;
        int first = k0 == 0;
        switch (mr) {
          case 8: graphopt_lowbit_tile8(xr, k, panel, kn, yr, n, m0, m1, first); break;
          case 7: graphopt_lowbit_tile7(xr, k, panel, kn, yr, n, m0, m1, first); break;
          case 6: graphopt_lowbit_tile6(xr, k, panel, kn, yr, n, m0, m1, first); break;
          case 5: graphopt_lowbit_tile5(xr, k, panel, kn, yr, n, m0, m1, first); break;
          case 4: graphopt_lowbit_tile4(xr, k, panel, kn, yr, n, m0, m1, first); break;
          case 3: graphopt_lowbit_tile3(xr, k, panel, kn, yr, n, m0, m1, first); break;
          case 2: graphopt_lowbit_tile2(xr, k, panel, kn, yr, n, m0, m1, first); break;
          default: graphopt_lowbit_tile1(xr, k, panel, kn, yr, n, m0, m1, first); break;
        }
      }
    }
  }
  return 0;
}
#endif
