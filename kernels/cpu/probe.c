/* probe.c: measures this machine's ceilings (memory read bandwidth, f32
 * FMA and int8 dot-product peaks) on the worker pool, so that benchmarks
 * print their figures as ratios of what the hardware does in the same run
 * rather than of a data sheet. Caller's thread + pool. */
#include <immintrin.h>
#include <stdatomic.h>
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
    int streams; /* concurrent sequential streams per thread */
    _Atomic uint64_t sink;
};

/* Reads this thread's share of the buffer as `streams` sequential streams
 * advancing together: a matmul reads several weight rows at once, and one
 * stream alone leaves part of the bandwidth to the prefetcher's mercy. */
__attribute__((target("avx2")))
static void bw_avx2(void *ctx, int ith, int nth)
{
    struct bw_job *c = ctx;
    size_t per = (c->bytes / (size_t)nth) & ~(size_t)4095;
    size_t part = (per / (size_t)c->streams) & ~(size_t)127;
    const uint8_t *p = c->buf + per * (size_t)ith;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    for (size_t i = 0; i < part; i += 128)
        for (int s = 0; s < c->streams; s++) {
            const uint8_t *q = p + (size_t)s * part + i;
            a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)q));
            a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(q + 32)));
            a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(q + 64)));
            a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(q + 96)));
        }
    a0 = _mm256_add_epi64(a0, a1);
    atomic_fetch_add(&c->sink, (uint64_t)_mm256_extract_epi64(a0, 0));
}

static void bw_scalar(void *ctx, int ith, int nth)
{
    struct bw_job *c = ctx;
    size_t per = (c->bytes / (size_t)nth) & ~(size_t)4095;
    const uint64_t *q = (const uint64_t *)(c->buf + per * (size_t)ith);
    uint64_t a = 0, b = 0;
    for (size_t i = 0; i + 1 < per / 8; i += 2) {
        a += q[i];
        b += q[i + 1];
    }
    atomic_fetch_add(&c->sink, a + b);
}

double k_probe_bandwidth(struct k_pool *pool, size_t bytes)
{
    uint8_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, bytes) != 0)
        return 0;
    memset(buf, 1, bytes); /* fault the pages in */
    int simd = k_isa_detect() >= K_ISA_AVX2;
    static const int streams[] = {1, 4, 8};
    double best = 0;
    for (int k = 0; k < (simd ? 3 : 1); k++) {
        struct bw_job j = {buf, bytes, streams[k], 0};
        for (int rep = 0; rep < 4; rep++) {
            double t0 = now_s();
            k_pool_run(pool, simd ? bw_avx2 : bw_scalar, &j);
            double bps = (double)bytes / (now_s() - t0);
            best = bps > best ? bps : best;
        }
    }
    free(buf);
    return best;
}

/* ------------------------------------------------------------ peak rates */

#define PEAK_ITERS 2000000L

/* 12 independent chains in named registers (an array would go through
 * memory): enough to cover latency x throughput of FMA and vpdpbusd. */
#define R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

__attribute__((target("avx512f")))
static void fma512(void *ctx, int ith, int nth)
{
    (void)ith;
    (void)nth;
    __m512 m = _mm512_set1_ps(0.999999f), s = _mm512_set1_ps(1e-7f);
#define F_DECL(i) __m512 a##i = _mm512_set1_ps((float)i);
#define F_STEP(i) a##i = _mm512_fmadd_ps(a##i, m, s);
#define F_SUM(i) t = _mm512_add_ps(t, a##i);
    R12(F_DECL)
    for (long it = 0; it < PEAK_ITERS; it++) {
        R12(F_STEP)
    }
    __m512 t = _mm512_setzero_ps();
    R12(F_SUM)
    *(volatile float *)ctx += _mm512_reduce_add_ps(t);
}

__attribute__((target("avx2,fma")))
static void fma256(void *ctx, int ith, int nth)
{
    (void)ith;
    (void)nth;
    __m256 m = _mm256_set1_ps(0.999999f), s = _mm256_set1_ps(1e-7f);
#define G_DECL(i) __m256 a##i = _mm256_set1_ps((float)i);
#define G_STEP(i) a##i = _mm256_fmadd_ps(a##i, m, s);
#define G_SUM(i) t = _mm256_add_ps(t, a##i);
    R12(G_DECL)
    for (long it = 0; it < PEAK_ITERS; it++) {
        R12(G_STEP)
    }
    __m256 t = _mm256_setzero_ps();
    R12(G_SUM)
    float v[8];
    _mm256_storeu_ps(v, t);
    *(volatile float *)ctx += v[0];
}

__attribute__((target("avx512f,avx512vnni")))
static void vnni512(void *ctx, int ith, int nth)
{
    (void)ith;
    (void)nth;
    __m512i u = _mm512_set1_epi8(3), s = _mm512_set1_epi8(-2);
#define V_DECL(i) __m512i a##i = _mm512_set1_epi32(i);
#define V_STEP(i) a##i = _mm512_dpbusd_epi32(a##i, u, s);
#define V_SUM(i) t = _mm512_add_epi32(t, a##i);
    R12(V_DECL)
    for (long it = 0; it < PEAK_ITERS; it++) {
        R12(V_STEP)
    }
    __m512i t = _mm512_setzero_si512();
    R12(V_SUM)
    /* The chains wrap by design; keep the low bits so the final (signed,
     * C-level) reduction cannot overflow. */
    t = _mm512_and_si512(t, _mm512_set1_epi32(0xffff));
    *(volatile float *)ctx += (float)_mm512_reduce_add_epi32(t);
}

/* Best-of-3 rate of fn on every thread; ops per thread per run given. */
static double peak(struct k_pool *pool, k_pool_fn fn, double ops_per_thread)
{
    volatile float sink = 0;
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now_s();
        k_pool_run(pool, fn, (void *)&sink);
        double r = ops_per_thread * k_pool_size(pool) / (now_s() - t0);
        best = r > best ? r : best;
    }
    return best;
}

double k_probe_f32_flops(struct k_pool *pool)
{
    switch (k_isa_detect()) {
    case K_ISA_AVX512:
        return peak(pool, fma512, (double)PEAK_ITERS * 12 * 16 * 2);
    case K_ISA_AVX2:
        return peak(pool, fma256, (double)PEAK_ITERS * 12 * 8 * 2);
    default:
        return 0;
    }
}

double k_probe_int8_ops(struct k_pool *pool)
{
    if (k_isa_detect() != K_ISA_AVX512)
        return 0;
    /* one vpdpbusd: 64 multiply-adds = 128 ops */
    return peak(pool, vnni512, (double)PEAK_ITERS * 12 * 128);
}
