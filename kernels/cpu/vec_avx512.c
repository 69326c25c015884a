/* vec_avx512.c: the vector ops on AVX-512. One zmm is exactly the 16 lanes
 * of the canonical order (kcpu.h), so a reduction is one accumulator and
 * the kc_tree16 fold; elementwise ops repeat the scalar expression, and
 * the exp is kc_expf's sequence of operations, lane by lane.
 * Compiled with -mavx512f/bw/vl/vnni; called only after detection.
 */
#include "kernels/cpu/simd_avx512.h"

float kc_dot_avx512(const float *a, const float *b, int64_t n)
{
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < n) {
        __mmask16 k = kc_mask16(n - i);
        acc = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i),
                                    _mm512_maskz_loadu_ps(k, b + i), acc, k);
    }
    return kc_tree16_zmm(acc);
}

/* Four rows at a time: each row's fma chain and final tree are exactly
 * kc_dot_avx512's (same bits), but four independent chains hide the fma
 * latency that one chain of n / 16 steps is bound by (attention scores,
 * n = head_dim: 3-4x faster). */
void kc_dot_rows_avx512(const float *a, const float *b, int64_t stride,
                        int64_t count, int64_t n, float *out)
{
    int64_t t = 0;
    if (n % 16 == 0) {
        for (; t + 4 <= count; t += 4) {
            const float *b0 = b + t * stride, *b1 = b0 + stride;
            const float *b2 = b1 + stride, *b3 = b2 + stride;
            __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
            for (int64_t i = 0; i < n; i += 16) {
                const __m512 va = _mm512_loadu_ps(a + i);
                c0 = _mm512_fmadd_ps(va, _mm512_loadu_ps(b0 + i), c0);
                c1 = _mm512_fmadd_ps(va, _mm512_loadu_ps(b1 + i), c1);
                c2 = _mm512_fmadd_ps(va, _mm512_loadu_ps(b2 + i), c2);
                c3 = _mm512_fmadd_ps(va, _mm512_loadu_ps(b3 + i), c3);
            }
            out[t] = kc_tree16_zmm(c0);
            out[t + 1] = kc_tree16_zmm(c1);
            out[t + 2] = kc_tree16_zmm(c2);
            out[t + 3] = kc_tree16_zmm(c3);
        }
    }
    for (; t < count; t++)
        out[t] = kc_dot_avx512(a, b + t * stride, n);
}

/* y in registers, 64 elements at a time, over all rows: per element the
 * same fma chain in t as count calls of kc_axpy_avx512. */
void kc_axpy_rows_avx512(float *y, const float *w, const float *x,
                         int64_t stride, int64_t count, int64_t n)
{
    int64_t i0 = 0;
    /* 128 elements (a whole head of 128) in 8 independent chains: twice
     * the chains of the loop below, so the fma ports stay busy. */
    for (; i0 + 128 <= n; i0 += 128) {
        __m512 v[8];
        for (int q = 0; q < 8; q++)
            v[q] = _mm512_loadu_ps(y + i0 + 16 * q);
        for (int64_t t = 0; t < count; t++) {
            const __m512 wt = _mm512_set1_ps(w[t]);
            const float *xt = x + t * stride + i0;
            for (int q = 0; q < 8; q++)
                v[q] = _mm512_fmadd_ps(wt, _mm512_loadu_ps(xt + 16 * q), v[q]);
        }
        for (int q = 0; q < 8; q++)
            _mm512_storeu_ps(y + i0 + 16 * q, v[q]);
    }
    for (int64_t i = i0; i < n; i += 64) {
        __mmask16 k[4];
        __m512 v[4];
        for (int q = 0; q < 4; q++) {
            k[q] = kc_mask16(n - i - 16 * q);
            v[q] = _mm512_maskz_loadu_ps(k[q], y + i + 16 * q);
        }
        for (int64_t t = 0; t < count; t++) {
            const __m512 wt = _mm512_set1_ps(w[t]);
            const float *xt = x + t * stride + i;
            for (int q = 0; q < 4; q++)
                v[q] = _mm512_fmadd_ps(wt, _mm512_maskz_loadu_ps(k[q], xt + 16 * q), v[q]);
        }
        for (int q = 0; q < 4; q++)
            _mm512_mask_storeu_ps(y + i + 16 * q, k[q], v[q]);
    }
}

void kc_axpy_avx512(float *y, float a, const float *x, int64_t n)
{
    __m512 va = _mm512_set1_ps(a);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = kc_mask16(n - i);
        __m512 v = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(k, x + i),
                                   _mm512_maskz_loadu_ps(k, y + i));
        _mm512_mask_storeu_ps(y + i, k, v);
    }
}

void kc_rmsnorm_avx512(float *out, const float *x, const float *w, int64_t n,
                       float eps)
{
    float ss = kc_dot_avx512(x, x, n);
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    __m512 vr = _mm512_set1_ps(r);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = kc_mask16(n - i);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), vr);
        v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, w + i));
        _mm512_mask_storeu_ps(out + i, k, v);
    }
}

/* kc_expf, lane by lane: the same operations in the same order. */
static inline __m512 exp16(__m512 x)
{
    __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(KC_LOG2E),
                               _mm512_set1_ps(KC_SHIFTER));
    __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(KC_SHIFTER));
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-KC_LN2_HI), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-KC_LN2_LO), r);
    __m512 p = _mm512_set1_ps(KC_EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(KC_EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(KC_EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(KC_EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(KC_EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(KC_EXP_P5));
    __m512 r2 = _mm512_mul_ps(r, r);
    __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0f));
    __m512i sb = _mm512_sub_epi32(_mm512_castps_si512(t),
                                  _mm512_set1_epi32(0x4b400000 - 127));
    __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(sb, 23));
    __m512 e = _mm512_mul_ps(y, s);
    __mmask16 hi = _mm512_cmp_ps_mask(x, _mm512_set1_ps(KC_EXP_HI), _CMP_GT_OQ);
    __mmask16 lo = _mm512_cmp_ps_mask(x, _mm512_set1_ps(KC_EXP_LO), _CMP_LT_OQ);
    e = _mm512_mask_mov_ps(e, hi, _mm512_set1_ps(INFINITY));
    return _mm512_mask_mov_ps(e, lo, _mm512_setzero_ps());
}

void kc_silu_mul_avx512(float *out, const float *g, const float *u, int64_t n)
{
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = kc_mask16(n - i);
        __m512 vg = _mm512_maskz_loadu_ps(k, g + i);
        __m512 vu = _mm512_maskz_loadu_ps(k, u + i);
        __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(vg), _mm512_set1_epi32((int)0x80000000u)));
        __m512 s = _mm512_div_ps(vg, _mm512_add_ps(one, exp16(neg)));
        _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(s, vu));
    }
}

void kc_softmax_avx512(float *x, int64_t n)
{
    /* max is exact in any order; the scalar loop's value for the sign of
     * a zero max cannot change exp(x - max) */
    __m512 vm = _mm512_set1_ps(x[0]);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = kc_mask16(n - i);
        vm = _mm512_mask_max_ps(vm, k, _mm512_maskz_loadu_ps(k, x + i), vm);
    }
    float mx = _mm512_reduce_max_ps(vm);
    __m512 vmx = _mm512_set1_ps(mx), acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = kc_mask16(n - i);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vmx));
        acc = _mm512_mask_add_ps(acc, k, acc, e);
        _mm512_mask_storeu_ps(x + i, k, e);
    }
    __m512 vs = _mm512_set1_ps(kc_tree16_zmm(acc));
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = kc_mask16(n - i);
        _mm512_mask_storeu_ps(x + i, k,
                              _mm512_div_ps(_mm512_maskz_loadu_ps(k, x + i), vs));
    }
}
