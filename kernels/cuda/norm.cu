// norm.cu: RMSNorm on the device, with the residual add fused in front
// (kc_rmsnorm in kcuda.h). One thread block per row, whose size depends
// only on dim, so a row's sum of squares is reduced in one fixed order
// whatever the number of rows (batch invariance). Enqueued by the engine's
// CUDA backend thread on its stream; no allocation, no synchronization.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/bf16.cuh"
#include "kernels/cuda/kcuda.h"

namespace
{
using namespace kcu;

constexpr int kVec = 8;               // bf16 per 16-byte access
constexpr int64_t kMaxGrid = 1 << 20; // rows beyond it are grid-strided

// Chunk c (elements 8c .. 8c+7) of a row, as floats. V: one 16-byte load
// (row 16-byte aligned, dim a multiple of 8); otherwise element loads, with
// zeros past dim. Both paths see the same chunks in the same order, so the
// sum of squares is bit for bit the same whichever is taken.
template <bool V>
__device__ __forceinline__ void load8(const uint16_t *row, int64_t c, int64_t dim, float f[kVec])
{
    if (V) {
        uint4 u = *reinterpret_cast<const uint4 *>(row + c * kVec);
        uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            f[2 * i] = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    } else {
#pragma unroll
        for (int e = 0; e < kVec; e++) {
            int64_t i = c * kVec + e;
            f[e] = i < dim ? bf2f(row[i]) : 0.0f;
        }
    }
}

template <bool V>
__device__ __forceinline__ void store8(uint16_t *row, int64_t c, int64_t dim, const float f[kVec])
{
    if (V) {
        *reinterpret_cast<uint4 *>(row + c * kVec) =
            make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
    } else {
#pragma unroll
        for (int e = 0; e < kVec; e++) {
            int64_t i = c * kVec + e;
            if (i < dim)
                row[i] = f2bf(f[e]);
        }
    }
}

// Pass 1: each thread sums the squares of its chunks (c = tid, tid + B, ...)
// in increasing c with fmaf; with RESID it first stores resid + x rounded
// to bf16 and squares that (the value the next layer reads back, so the
// fused and unfused forms agree). Reduction: a butterfly over the warp,
// then every thread adds the warp sums in warp order. Pass 2 reads back
// the chunks the same thread touched in pass 1 (so out may alias x, and
// the resid just written is this thread's own store), scales and stores.
// No __restrict__: out may alias x.
template <bool V, bool RESID>
__global__ void rmsnorm_kernel(uint16_t *out, uint16_t *resid, const uint16_t *x, const uint16_t *w,
                               int64_t rows, int64_t dim, float eps)
{
    __shared__ float warp_ss[32];
    const int64_t chunks = (dim + kVec - 1) / kVec;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;

    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const uint16_t *xr = x + r * dim;
        uint16_t *rr = RESID ? resid + r * dim : nullptr;
        uint16_t *outr = out + r * dim;

        float ss = 0.0f;
        for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
            float v[kVec];
            load8<V>(xr, c, dim, v);
            if (RESID) {
                float a[kVec];
                load8<V>(rr, c, dim, a);
#pragma unroll
                for (int e = 0; e < kVec; e++)
                    v[e] = bf2f(f2bf(v[e] + a[e]));
                store8<V>(rr, c, dim, v);
            }
#pragma unroll
            for (int e = 0; e < kVec; e++)
                ss = fmaf(v[e], v[e], ss);
        }
        // xor butterfly: a + b == b + a, so every lane ends with the same bits
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0)
            warp_ss[warp] = ss;
        __syncthreads();
        float tot = 0.0f;
        for (int i = 0; i < n_warps; i++)
            tot += warp_ss[i];
        // as the CPU (kc_rmsnorm_scalar): IEEE division and sqrt, no rsqrtf
        const float inv = 1.0f / sqrtf(tot / (float)dim + eps);

        const uint16_t *src = RESID ? rr : xr;
        for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
            float v[kVec], g[kVec];
            load8<V>(src, c, dim, v);
            load8<V>(w, c, dim, g);
#pragma unroll
            for (int e = 0; e < kVec; e++)
                v[e] = (v[e] * inv) * g[e];
            store8<V>(outr, c, dim, v);
        }
        __syncthreads(); // warp_ss is rewritten for the next row
    }
}

template <bool V, bool RESID>
void launch(cudaStream_t s, int grid, int threads, kc_bf16 *out, kc_bf16 *resid, const kc_bf16 *x,
            const kc_bf16 *w, int64_t rows, int64_t dim, float eps)
{
    rmsnorm_kernel<V, RESID><<<grid, threads, 0, s>>>(out, resid, x, w, rows, dim, eps);
}

} // namespace

extern "C" int kc_rmsnorm(kc_stream s, kc_bf16 *out, kc_bf16 *resid, const kc_bf16 *x,
                          const kc_bf16 *w, int64_t rows, int64_t dim, float eps)
{
    if (rows < 0 || dim <= 0)
        return (int)cudaErrorInvalidValue;
    if (rows == 0)
        return 0;
    if (!out || !x || !w)
        return (int)cudaErrorInvalidValue;

    // The block size is a function of dim alone (never of rows): one
    // thread per 8-element chunk up to 1024, whole warps.
    const int64_t chunks = (dim + kVec - 1) / kVec;
    int64_t t = (chunks + 31) / 32 * 32;
    const int threads = (int)(t > 1024 ? 1024 : t);
    const int grid = (int)(rows < kMaxGrid ? rows : kMaxGrid);

    const bool v = dim % kVec == 0 && aligned16(out) && aligned16(x) && aligned16(w) &&
                   (!resid || aligned16(resid));
    cudaStream_t st = (cudaStream_t)s;
    if (resid) {
        if (v)
            launch<true, true>(st, grid, threads, out, resid, x, w, rows, dim, eps);
        else
            launch<false, true>(st, grid, threads, out, resid, x, w, rows, dim, eps);
    } else {
        if (v)
            launch<true, false>(st, grid, threads, out, resid, x, w, rows, dim, eps);
        else
            launch<false, false>(st, grid, threads, out, resid, x, w, rows, dim, eps);
    }
    return (int)cudaGetLastError();
}
