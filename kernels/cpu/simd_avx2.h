/* simd_avx2.h: the AVX2 helpers that the matmul and vector kernels share
 * (tail masks, the kc_tree16 fold on two ymm, an 8-way int32 transpose
 * sum). Included only by files compiled with -mavx2 -mfma (the AVX-512
 * files have those flags too).
 */
#ifndef INFERD_SIMD_AVX2_H
#define INFERD_SIMD_AVX2_H

#include <immintrin.h>

#include "kernels/cpu/kcpu.h"

#define KC_AI __attribute__((always_inline)) inline

/* Lanes i < left of 8 as an all-ones mask. */
static KC_AI __m256i kc_mask8(int64_t left)
{
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int l = left > 8 ? 8 : (left < 0 ? 0 : (int)left);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(l), idx);
}

/* kc_tree16 on the canonical lanes 0-7 (lo) and 8-15 (hi):
 * j += j+8, j += j+4, j += j+2, 0 += 1. */
static KC_AI float kc_tree16_ymm(__m256 lo, __m256 hi)
{
    __m256 a = _mm256_add_ps(lo, hi);
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    __m128 d = _mm_add_ss(c, _mm_movehdup_ps(c));
    return _mm_cvtss_f32(d);
}

/* 8 xmm of int32 partials -> their 8 sums, lane r = sum of a[r]. */
static KC_AI __m256i kc_tree8x4(const __m128i *a)
{
    __m256i q[4];
    for (int k = 0; k < 4; k++)
        q[k] = _mm256_inserti128_si256(_mm256_castsi128_si256(a[k]), a[k + 4], 1);
    __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(q[0], q[1]),
                                  _mm256_unpackhi_epi32(q[0], q[1]));
    __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(q[2], q[3]),
                                  _mm256_unpackhi_epi32(q[2], q[3]));
    return _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1),
                            _mm256_unpackhi_epi64(t0, t1));
}

#endif
