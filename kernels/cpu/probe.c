/* probe.c: measures this machine's ceilings (memory bandwidth, f32 FMA and
 * int8 dot-product peaks) on the worker pool, so that benchmarks print
 * their figures as ratios of what the hardware can do, measured in the
 * same run rather than taken from a data sheet. Caller's thread + pool. */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/kernels.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------- bandwidth */

struct bw_job {
    const uint8_t *buf;
    size_t bytes;
    uint64_t sink[64];
};

__attribute__((target("avx2")))
static uint64_t read_avx2(const uint8_t *p, size_t n)
{
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 128 <= n; i += 128) {
        a0 = _mm256_xor_si256(a0, _mm256_load_si256((const __m256i *)(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
    }
    a0 = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    return (uint64_t)_mm256_extract_epi64(a0, 0);
}

static uint64_t read_scalar(const uint8_t *p, size_t n)
{
    const uint64_t *q = (const uint64_t *)p;
    uint64_t a = 0, b = 0;
    for (size_t i = 0; i + 1 < n / 8; i += 2) {
        a ^= q[i];
        b ^= q[i + 1];
    }
    return a ^ b;
}

static void bw_worker(void *ctx, int ith, int nth)
{
    struct bw_job *j = ctx;
    size_t per = (j->bytes / (size_t)nth) & ~(size_t)4095;
    const uint8_t *p = j->buf + per * (size_t)ith;
    j->sink[ith % 64] += k_isa_detect() >= K_ISA_AVX2 ? read_avx2(p, per) : read_scalar(p, per);
}

double k_probe_bandwidth(struct k_pool *pool, size_t bytes)
{
    uint8_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, bytes) != 0)
        return 0;
    memset(buf, 1, bytes); /* fault the pages in */
    struct bw_job j = {buf, bytes, {0}};
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now_s();
        k_pool_run(pool, bw_worker, &j);
        double dt = now_s() - t0;
        double gbs = (double)bytes / dt;
        if (gbs > best)
            best = gbs;
    }
    free(buf);
    return best;
}

/* ------------------------------------------------------------ peak rates */

struct peak_job {
    int64_t iters;
    float fsink[64];
    int isink[64];
};

#define PEAK_ACC 12

__attribute__((target("avx512f")))
static float fma_avx512(int64_t iters)
{
    __m512 acc[PEAK_ACC];
    __m512 m = _mm512_set1_ps(0.999999f), a = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < PEAK_ACC; i++)
        acc[i] = _mm512_set1_ps((float)i);
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < PEAK_ACC; i++)
            acc[i] = _mm512_fmadd_ps(acc[i], m, a);
    __m512 s = acc[0];
    for (int i = 1; i < PEAK_ACC; i++)
        s = _mm512_add_ps(s, acc[i]);
    return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma")))
static float fma_avx2(int64_t iters)
{
    __m256 acc[PEAK_ACC];
    __m256 m = _mm256_set1_ps(0.999999f), a = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < PEAK_ACC; i++)
        acc[i] = _mm256_set1_ps((float)i);
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < PEAK_ACC; i++)
            acc[i] = _mm256_fmadd_ps(acc[i], m, a);
    __m256 s = acc[0];
    for (int i = 1; i < PEAK_ACC; i++)
        s = _mm256_add_ps(s, acc[i]);
    float out[8];
    _mm256_storeu_ps(out, s);
    return out[0];
}

__attribute__((target("avx512f,avx512vnni")))
static int vnni_avx512(int64_t iters)
{
    __m512i acc[PEAK_ACC];
    __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
    for (int i = 0; i < PEAK_ACC; i++)
        acc[i] = _mm512_set1_epi32(i);
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < PEAK_ACC; i++)
            acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    __m512i s = acc[0];
    for (int i = 1; i < PEAK_ACC; i++)
        s = _mm512_add_epi32(s, acc[i]);
    /* The accumulators wrap by design; keep the low bits so the final
     * (signed, C-level) reduction cannot overflow. */
    return _mm512_reduce_add_epi32(_mm512_and_si512(s, _mm512_set1_epi32(0xffff)));
}

static void fma_worker(void *ctx, int ith, int nth)
{
    (void)nth;
    struct peak_job *j = ctx;
    enum k_isa isa = k_isa_detect();
    j->fsink[ith % 64] = isa == K_ISA_AVX512 ? fma_avx512(j->iters)
                       : isa == K_ISA_AVX2 ? fma_avx2(j->iters) : 0;
}

static void vnni_worker(void *ctx, int ith, int nth)
{
    (void)nth;
    struct peak_job *j = ctx;
    j->isink[ith % 64] = vnni_avx512(j->iters);
}

double k_probe_f32_flops(struct k_pool *pool)
{
    enum k_isa isa = k_isa_detect();
    if (isa == K_ISA_SCALAR)
        return 0;
    int lanes = isa == K_ISA_AVX512 ? 16 : 8;
    struct peak_job j = {.iters = 20 * 1000 * 1000};
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now_s();
        k_pool_run(pool, fma_worker, &j);
        double dt = now_s() - t0;
        double f = (double)j.iters * PEAK_ACC * lanes * 2 * k_pool_size(pool) / dt;
        if (f > best)
            best = f;
    }
    return best;
}

double k_probe_int8_ops(struct k_pool *pool)
{
    if (k_isa_detect() != K_ISA_AVX512)
        return 0;
    struct peak_job j = {.iters = 20 * 1000 * 1000};
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now_s();
        k_pool_run(pool, vnni_worker, &j);
        double dt = now_s() - t0;
        /* one vpdpbusd: 64 multiply-adds = 128 ops */
        double f = (double)j.iters * PEAK_ACC * 128 * k_pool_size(pool) / dt;
        if (f > best)
            best = f;
    }
    return best;
}
