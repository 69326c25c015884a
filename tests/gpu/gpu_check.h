// gpu_check.h: what the GPU kernel tests share (tests/gpu/test_*.cu).
//
// Each test program checks kernels of kcuda.h against a CPU reference in
// fp32 on fresh random inputs: outputs are poisoned (NaN bit patterns)
// before every launch, a NaN or Inf in the result fails, and the error is
// the relative Frobenius norm ||gpu - cpu|| / ||cpu||, which must stay
// within the bound the test gives (bf16 has 8 bits of mantissa, so about
// 4e-3 per rounding). Each check prints one line to stdout:
//   {"test": "...", "case": "...", "rel_err": x, "bound": y, "ok": true}
// and a benchmark prints {"bench": "...", ..., "ceiling": ...}; run.sh
// collects them. Exit status: 0 when every check passed, 1 otherwise, 2
// when there is no device (the script says so instead of failing).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "kernels/cuda/kcuda.h"

static int gc_failures = 0;

#define GC_CUDA(call)                                                                        \
    do {                                                                                     \
        cudaError_t e_ = (call);                                                             \
        if (e_ != cudaSuccess) {                                                             \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                    \
                    cudaGetErrorString(e_));                                                 \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

// A launcher's return code: 0 or a CUDA error.
#define GC_LAUNCH(call)                                                                      \
    do {                                                                                     \
        int rc_ = (call);                                                                    \
        if (rc_ != 0) {                                                                      \
            fprintf(stderr, "%s:%d: %s returned %d (%s)\n", __FILE__, __LINE__, #call, rc_,  \
                    kc_error_string(rc_));                                                   \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

// Exits 2 (skip) when there is no device.
static inline void gc_require_device(const char *prog)
{
    if (kc_device_count() < 1) {
        fprintf(stderr, "%s: no CUDA device\n", prog);
        exit(2);
    }
    char d[256];
    kc_device_describe(0, d, sizeof d);
    fprintf(stderr, "%s: %s\n", prog, d);
}

// Deterministic random numbers (splitmix64), uniform in [lo, hi).
struct gc_rng {
    uint64_t s;
    explicit gc_rng(uint64_t seed) : s(seed) {}
    uint64_t next()
    {
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(next() >> 40) * (1.0f / 16777216.0f); }
};

static inline float gc_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t gc_f32_to_bf16(float f) // round to nearest even
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000)
        return 0x7fc0;
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

// Random bf16 values; the host copy holds exactly the values the device
// sees (rounded), so references start from the same inputs.
static inline std::vector<uint16_t> gc_rand_bf16(gc_rng &r, size_t n, float lo, float hi)
{
    std::vector<uint16_t> v(n);
    for (auto &x : v)
        x = gc_f32_to_bf16(r.uniform(lo, hi));
    return v;
}

static inline std::vector<float> gc_to_f32(const std::vector<uint16_t> &v)
{
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); i++)
        o[i] = gc_bf16_to_f32(v[i]);
    return o;
}

template <typename T> static inline T *gc_upload(const std::vector<T> &v)
{
    T *d = nullptr;
    GC_CUDA(cudaMalloc(&d, v.size() * sizeof(T) + 16));
    GC_CUDA(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

template <typename T> static inline std::vector<T> gc_download(const T *d, size_t n)
{
    std::vector<T> v(n);
    GC_CUDA(cudaDeviceSynchronize());
    GC_CUDA(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
}

// Fills n bytes with 0xff: NaN in bf16 and f32, -1 in integers.
static inline void gc_poison(void *d, size_t bytes)
{
    GC_CUDA(cudaMemset(d, 0xff, bytes));
}

// ||got - want|| / ||want||, or INFINITY when got holds a NaN or Inf.
static inline double gc_rel_err(const float *got, const float *want, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]))
            return INFINITY;
        double d = (double)got[i] - (double)want[i];
        num += d * d;
        den += (double)want[i] * (double)want[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

// Records one check (a JSON line) and counts a failure.
static inline void gc_check(const char *test, const char *cas, double err, double bound)
{
    bool ok = err <= bound;
    printf("{\"test\": \"%s\", \"case\": \"%s\", \"rel_err\": %.3e, \"bound\": %.1e, \"ok\": %s}\n",
           test, cas, isfinite(err) ? err : 1e30, bound, ok ? "true" : "false");
    fflush(stdout);
    if (!ok)
        gc_failures++;
}

static inline void gc_check_bf16(const char *test, const char *cas, const uint16_t *dev, size_t n,
                                 const std::vector<float> &want, double bound)
{
    std::vector<uint16_t> got = gc_download(dev, n);
    std::vector<float> g = gc_to_f32(got);
    gc_check(test, cas, gc_rel_err(g.data(), want.data(), n), bound);
}

static inline int gc_finish(const char *prog)
{
    fprintf(stderr, "%s: %s (%d failed)\n", prog, gc_failures ? "FAILED" : "ok", gc_failures);
    return gc_failures ? 1 : 0;
}

// Milliseconds of a callable, averaged over iters runs after a warmup.
template <typename F> static inline double gc_time_ms(F f, int iters)
{
    cudaEvent_t a, b;
    GC_CUDA(cudaEventCreate(&a));
    GC_CUDA(cudaEventCreate(&b));
    f();
    GC_CUDA(cudaDeviceSynchronize());
    GC_CUDA(cudaEventRecord(a));
    for (int i = 0; i < iters; i++)
        f();
    GC_CUDA(cudaEventRecord(b));
    GC_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    GC_CUDA(cudaEventElapsedTime(&ms, a, b));
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return ms / iters;
}
