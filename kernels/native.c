/* calq's CPU decode kernels: at most 16 rows of float32 activations, one thread, row-major contiguous operands.
 * kernels/native.py compiles this file for the host CPU (-march=native, -ffp-contract=off, no -ffast-math: each float
 * operation is the IEEE one written here) and calls it through ctypes; kernels/cpu.py times it against torch's paths.
 *
 *   calq_w8a8   bit for bit int8_linear_ref (act "dynamic" or "static"): the same float32 quantization, exact int32
 *               sums (AVX512-VNNI, AVX2 or plain C), the float64 epilogue in the reference's order.
 *   calq_wxa16  W8A16 and W4A16: the reference's float32 weight (code * scale), its products with x summed in
 *               another order than the reference's BLAS (float32 rounding: within the kernel tests' tolerance).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define CALQ_MAX_ROWS 16

/* Exact int32 dot product of int8 a (|a| <= 127) and int8 b (any value): |b| as unsigned times a with b's sign,
 * so -128 in b is exact. */
static int32_t dot_i8(const int8_t *restrict a, const int8_t *restrict b, int64_t k) {
  int64_t i = 0;
  int32_t acc = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512i sum = _mm512_setzero_si512();
  for (; i + 64 <= k; i += 64) {
    __m512i va = _mm512_loadu_si512(a + i), vb = _mm512_loadu_si512(b + i);
    __m512i signed_a = _mm512_mask_sub_epi8(va, _mm512_movepi8_mask(vb), _mm512_setzero_si512(), va);
    sum = _mm512_dpbusd_epi32(sum, _mm512_abs_epi8(vb), signed_a);
  }
  acc += _mm512_reduce_add_epi32(sum);
#elif defined(__AVX2__)
  __m256i sum = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (; i + 32 <= k; i += 32) {
    __m256i va = _mm256_loadu_si256((const __m256i *)(a + i)), vb = _mm256_loadu_si256((const __m256i *)(b + i));
    /* pairs of |b| * a: at most 2 * 128 * 127 < 2^15, so the int16 sums do not saturate */
    __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(vb), _mm256_sign_epi8(va, vb));
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, ones));
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_hadd_epi32(s4, s4);
  s4 = _mm_hadd_epi32(s4, s4);
  acc += _mm_cvtsi128_si32(s4);
#endif
  for (; i < k; i++) acc += (int32_t)a[i] * (int32_t)b[i];
  return acc;
}

/* quantize_per_token_ref / _quantize_ref on one row: scale = max|x| / 127 (NaN if x holds NaN, 1 if it is 0), or the
 * static scale; q = nan_to_num(clamp(round_half_even(x / scale), -127, 127)). */
static float quantize_row(const float *restrict x, int64_t k, const float *static_scale, int8_t *restrict q) {
  float scale;
  if (static_scale) {
    scale = *static_scale;
  } else {
    float amax = 0.0f;
    int nan = 0;
    for (int64_t i = 0; i < k; i++) {
      float a = fabsf(x[i]);
      amax = a > amax ? a : amax;
      nan |= a != a;
    }
    scale = nan ? NAN : amax / 127.0f;
    if (scale == 0.0f) scale = 1.0f;
  }
  for (int64_t i = 0; i < k; i++) {
    float v = nearbyintf(x[i] / scale);
    v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
    q[i] = v != v ? 0 : (int8_t)v;
  }
  return scale;
}

/* Returns 0, or 1 for more than CALQ_MAX_ROWS rows, 2 when the scratch cannot be allocated. */
int calq_w8a8(const float *x, int64_t m, int64_t k, const float *static_scale, const int8_t *w, int64_t n,
              const float *w_scale, const float *bias, float *out) {
  if (m > CALQ_MAX_ROWS) return 1;
  int8_t *q = malloc(m * k + 1);
  if (!q) return 2;
  float scale[CALQ_MAX_ROWS];
  for (int64_t r = 0; r < m; r++) scale[r] = quantize_row(x + r * k, k, static_scale, q + r * k);
  for (int64_t j = 0; j < n; j++) {
    for (int64_t r = 0; r < m; r++) {
      double o = (double)dot_i8(q + r * k, w + j * k, k) * (double)scale[r] * (double)w_scale[j];
      if (bias) o += (double)bias[j];
      out[r * n + j] = (float)o;
    }
  }
  free(q);
  return 0;
}

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vfloat;
#define vzero() _mm512_setzero_ps()
#define vset1(v) _mm512_set1_ps(v)
#define vload(p) _mm512_loadu_ps(p)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vcodes(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define vsum(v) _mm512_reduce_add_ps(v)
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vfloat;
#define vzero() _mm256_setzero_ps()
#define vset1(v) _mm256_set1_ps(v)
#define vload(p) _mm256_loadu_ps(p)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vcodes(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
static inline float vsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
#endif

/* Rows r0 .. r0 + rows - 1 (rows 1, 2 or 4: a constant where inlined) of calq_wxa16 for the 4 columns w[c]. The
 * weight w = code * scale is the reference's float32 product, made once per 4 columns for all rows; x * w is summed
 * with fused multiply-adds into a lanes-wide sum per row and column, then over the lanes. */
static inline __attribute__((always_inline)) void wxa16_rows(const float *restrict x, int64_t k, int rows,
                                                             const int8_t *const w[4], const float *const s[4],
                                                             int64_t group_size, float d[4][4]) {
  int64_t groups = (k + group_size - 1) / group_size;
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < 4; c++) d[r][c] = 0.0f;
#ifdef LANES
  vfloat acc[4][4];
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < 4; c++) acc[r][c] = vzero();
#endif
  for (int64_t g = 0; g < groups; g++) {
    int64_t i = g * group_size, end = i + group_size < k ? i + group_size : k;
#ifdef LANES
    vfloat scale[4];
    for (int c = 0; c < 4; c++) scale[c] = vset1(s[c][g]);
    for (; i + LANES <= end; i += LANES) {
      vfloat wv[4];
      for (int c = 0; c < 4; c++) wv[c] = vmul(vcodes(w[c] + i), scale[c]);
      for (int r = 0; r < rows; r++) {
        vfloat xv = vload(x + r * k + i);
        for (int c = 0; c < 4; c++) acc[r][c] = vfma(xv, wv[c], acc[r][c]);
      }
    }
#endif
    for (; i < end; i++)
      for (int c = 0; c < 4; c++) {
        float wi = (float)w[c][i] * s[c][g];
        for (int r = 0; r < rows; r++) d[r][c] += x[r * k + i] * wi;
      }
  }
#ifdef LANES
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < 4; c++) d[r][c] += vsum(acc[r][c]);
#endif
}

/* W8A16 and W4A16: out[r, j] = sum_i x[r, i] * (codes[j, i] * scales[j, i / group_size]) (+ bias[j]) in float32,
 * codes int8 (N, K): W8A16's qweight with one group (group_size = K), or W4A16's q - zero. Returns 0, or 1 for more
 * than CALQ_MAX_ROWS rows or a group size below 1. */
int calq_wxa16(const float *x, int64_t m, int64_t k, const int8_t *codes, int64_t n, const float *scales,
               int64_t group_size, const float *bias, float *out) {
  if (m > CALQ_MAX_ROWS || group_size <= 0) return 1;
  int64_t groups = (k + group_size - 1) / group_size;
  for (int64_t j0 = 0; j0 < n; j0 += 4) {
    int cols = n - j0 < 4 ? (int)(n - j0) : 4;
    const int8_t *w[4];
    const float *s[4];
    for (int c = 0; c < 4; c++) { /* a short last block repeats its first column */
      w[c] = codes + (j0 + (c < cols ? c : 0)) * k;
      s[c] = scales + (j0 + (c < cols ? c : 0)) * groups;
    }
    float d[4][4];
    int64_t r = 0;
    for (; r < m; r += 4) {
      int rows = m - r >= 4 ? 4 : (m - r >= 2 ? 2 : 1);
      if (rows == 4) wxa16_rows(x + r * k, k, 4, w, s, group_size, d);
      else if (rows == 2) wxa16_rows(x + r * k, k, 2, w, s, group_size, d);
      else wxa16_rows(x + r * k, k, 1, w, s, group_size, d);
      for (int rr = 0; rr < rows; rr++)
        for (int c = 0; c < cols; c++) out[(r + rr) * n + j0 + c] = bias ? d[rr][c] + bias[j0 + c] : d[rr][c];
      r += rows - 4;
    }
  }
  return 0;
}
