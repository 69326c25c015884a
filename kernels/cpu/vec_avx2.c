/* vec_avx2.c: the vector ops on AVX2 + FMA. The 16 canonical lanes of
 * kcpu.h are two ymm registers (lanes 0-7 and 8-15), each accumulating its
 * own elements in order, so the results match the scalar and AVX-512 paths
 * bit for bit. Tails go through masked loads and blends, never through a
 * zero-filled fma (that would turn a -0 lane into +0).
 * Compiled with -mavx2 -mfma -mf16c; called only after detection.
 */
#include "kernels/cpu/simd_avx2.h"

float kc_dot_avx2(const float *a, const float *b, int64_t n)
{
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        lo = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), lo);
        hi = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), hi);
    }
    if (i < n) {
        __m256i k0 = kc_mask8(n - i), k1 = kc_mask8(n - i - 8);
        __m256 f0 = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, k0),
                                    _mm256_maskload_ps(b + i, k0), lo);
        __m256 f1 = _mm256_fmadd_ps(_mm256_maskload_ps(a + i + 8, k1),
                                    _mm256_maskload_ps(b + i + 8, k1), hi);
        lo = _mm256_blendv_ps(lo, f0, _mm256_castsi256_ps(k0));
        hi = _mm256_blendv_ps(hi, f1, _mm256_castsi256_ps(k1));
    }
    return kc_tree16_ymm(lo, hi);
}

void kc_dot_rows_avx2(const float *a, const float *b, int64_t stride,
                      int64_t count, int64_t n, float *out)
{
    for (int64_t t = 0; t < count; t++)
        out[t] = kc_dot_avx2(a, b + t * stride, n);
}

/* y in registers, 32 elements at a time, over all rows: per element the
 * same fma chain in t as count calls of kc_axpy_avx2. */
void kc_axpy_rows_avx2(float *y, const float *w, const float *x,
                       int64_t stride, int64_t count, int64_t n)
{
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 v[4];
        for (int k = 0; k < 4; k++)
            v[k] = _mm256_loadu_ps(y + i + 8 * k);
        for (int64_t t = 0; t < count; t++) {
            const __m256 wt = _mm256_set1_ps(w[t]);
            const float *xt = x + t * stride + i;
            for (int k = 0; k < 4; k++)
                v[k] = _mm256_fmadd_ps(wt, _mm256_loadu_ps(xt + 8 * k), v[k]);
        }
        for (int k = 0; k < 4; k++)
            _mm256_storeu_ps(y + i + 8 * k, v[k]);
    }
    if (i < n)
        for (int64_t t = 0; t < count; t++)
            kc_axpy_avx2(y + i, w[t], x + t * stride + i, n - i);
}

void kc_axpy_avx2(float *y, float a, const float *x, int64_t n)
{
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i),
                                                _mm256_loadu_ps(y + i)));
    if (i < n) {
        __m256i k = kc_mask8(n - i);
        __m256 v = _mm256_fmadd_ps(va, _mm256_maskload_ps(x + i, k),
                                   _mm256_maskload_ps(y + i, k));
        _mm256_maskstore_ps(y + i, k, v);
    }
}

void kc_rmsnorm_avx2(float *out, const float *x, const float *w, int64_t n,
                     float eps)
{
    float ss = kc_dot_avx2(x, x, n);
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    __m256 vr = _mm256_set1_ps(r);
    for (int64_t i = 0; i < n; i += 8) {
        __m256i k = kc_mask8(n - i);
        __m256 v = _mm256_mul_ps(_mm256_maskload_ps(x + i, k), vr);
        v = _mm256_mul_ps(v, _mm256_maskload_ps(w + i, k));
        _mm256_maskstore_ps(out + i, k, v);
    }
}

/* kc_expf, lane by lane: the same operations in the same order. */
static inline __m256 exp8(__m256 x)
{
    __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(KC_LOG2E),
                               _mm256_set1_ps(KC_SHIFTER));
    __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(KC_SHIFTER));
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-KC_LN2_HI), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-KC_LN2_LO), r);
    __m256 p = _mm256_set1_ps(KC_EXP_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(KC_EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(KC_EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(KC_EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(KC_EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(KC_EXP_P5));
    __m256 r2 = _mm256_mul_ps(r, r);
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0f));
    __m256i sb = _mm256_sub_epi32(_mm256_castps_si256(t),
                                  _mm256_set1_epi32(0x4b400000 - 127));
    __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(sb, 23));
    __m256 e = _mm256_mul_ps(y, s);
    __m256 hi = _mm256_cmp_ps(x, _mm256_set1_ps(KC_EXP_HI), _CMP_GT_OQ);
    __m256 lo = _mm256_cmp_ps(x, _mm256_set1_ps(KC_EXP_LO), _CMP_LT_OQ);
    e = _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY), hi);
    return _mm256_blendv_ps(e, _mm256_setzero_ps(), lo);
}

void kc_silu_mul_avx2(float *out, const float *g, const float *u, int64_t n)
{
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n; i += 8) {
        __m256i k = kc_mask8(n - i);
        __m256 vg = _mm256_maskload_ps(g + i, k);
        __m256 vu = _mm256_maskload_ps(u + i, k);
        __m256 s = _mm256_div_ps(vg, _mm256_add_ps(one, exp8(_mm256_xor_ps(vg, sign))));
        _mm256_maskstore_ps(out + i, k, _mm256_mul_ps(s, vu));
    }
}

void kc_softmax_avx2(float *x, int64_t n)
{
    __m256 vm = _mm256_set1_ps(x[0]);
    for (int64_t i = 0; i < n; i += 8) {
        __m256i k = kc_mask8(n - i);
        __m256 v = _mm256_maskload_ps(x + i, k);
        /* (v > m) ? v : m, as the scalar loop; masked lanes keep m */
        __m256 gt = _mm256_and_ps(_mm256_cmp_ps(v, vm, _CMP_GT_OQ),
                                  _mm256_castsi256_ps(k));
        vm = _mm256_blendv_ps(vm, v, gt);
    }
    float lanes[8], mx;
    _mm256_storeu_ps(lanes, vm);
    mx = lanes[0];
    for (int j = 1; j < 8; j++)
        mx = lanes[j] > mx ? lanes[j] : mx;
    __m256 vmx = _mm256_set1_ps(mx);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < n; i += 8) {
        __m256i k = kc_mask8(n - i);
        __m256 e = exp8(_mm256_sub_ps(_mm256_maskload_ps(x + i, k), vmx));
        /* lane of element i is i mod 16: alternate the two halves */
        int h = (int)((i >> 3) & 1);
        acc[h] = _mm256_blendv_ps(acc[h], _mm256_add_ps(acc[h], e),
                                  _mm256_castsi256_ps(k));
        _mm256_maskstore_ps(x + i, k, e);
    }
    __m256 vs = _mm256_set1_ps(kc_tree16_ymm(acc[0], acc[1]));
    for (int64_t i = 0; i < n; i += 8) {
        __m256i k = kc_mask8(n - i);
        _mm256_maskstore_ps(x + i, k, _mm256_div_ps(_mm256_maskload_ps(x + i, k), vs));
    }
}
