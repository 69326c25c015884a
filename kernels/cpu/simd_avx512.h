/* simd_avx512.h: the AVX-512 helpers that the matmul and vector kernels
 * share (tail mask, the kc_tree16 fold on one zmm). Included only by files
 * compiled with -mavx512f/bw/vl/vnni.
 */
#ifndef INFERD_SIMD_AVX512_H
#define INFERD_SIMD_AVX512_H

#include "kernels/cpu/simd_avx2.h"

/* Lanes i < left of 16 (left >= 0). */
/* The first `left` lanes (none when left <= 0, all when left >= 16). */
static KC_AI __mmask16 kc_mask16(int64_t left)
{
    if (left <= 0)
        return 0;
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

/* kc_tree16 on the lanes of v: its two halves are the lo/hi of the ymm
 * fold. */
static KC_AI float kc_tree16_zmm(__m512 v)
{
    __m256 lo = _mm512_castps512_ps256(v);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return kc_tree16_ymm(lo, hi);
}

#endif
