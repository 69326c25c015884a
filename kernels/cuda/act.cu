// act.cu: the memory-bound elementwise ops of a model step (kcuda.h):
// gated activations (SiLU and GELU times up), the embedding lookup, the
// bias add, and bf16 <-> f32 conversion. Each is one grid-stride kernel
// over 8-element units (16-byte bf16 accesses) when its rows and pointers
// are aligned, and over single elements otherwise. Enqueued by the
// engine's CUDA backend thread on its stream; no allocation, no
// synchronization.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/bf16.cuh"
#include "kernels/cuda/kcuda.h"

namespace
{
using namespace kcu;

constexpr int kVec = 8; // bf16 per 16-byte access
constexpr int kThreads = 256;
// A grid-stride grid of 4096 x 256 threads keeps every SM of an H200
// (132 x 2048 resident threads) full; more blocks only add scheduling.
constexpr int64_t kMaxBlocks = 4096;

__device__ __forceinline__ void unpack8(uint4 u, float f[kVec])
{
    uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ uint4 pack8(const float f[kVec])
{
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
}

__device__ __forceinline__ int64_t first_unit()
{
    return (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t unit_stride()
{
    return (int64_t)gridDim.x * blockDim.x;
}

int grid_for(int64_t units)
{
    int64_t b = (units + kThreads - 1) / kThreads;
    return (int)(b < 1 ? 1 : b > kMaxBlocks ? kMaxBlocks : b);
}

/* ------------------------------------------------------ gated activations */

enum { ACT_SILU, ACT_GELU };

template <int ACT> __device__ __forceinline__ float act(float g)
{
    if (ACT == ACT_SILU)
        return g / (1.0f + expf(-g)); // as the CPU: expf(-g) = inf gives -0, not NaN
    // tanh approximation (gelu_pytorch_tanh); sqrt(2 / pi) = 0.7978845608
    return 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g)));
}

// Unit u of row r covers columns c*W .. c*W + W-1 (W = 8 when V, else 1)
// of out; gate is at the same columns of gate_up's row, up n_ff further.
template <int ACT, bool V>
__global__ void __launch_bounds__(kThreads)
    act_mul_kernel(uint16_t *__restrict__ out, const uint16_t *__restrict__ gate_up, int64_t rows,
                   int64_t n_ff)
{
    const int64_t per_row = V ? n_ff / kVec : n_ff;
    const int64_t total = rows * per_row;
    for (int64_t u = first_unit(); u < total; u += unit_stride()) {
        const int64_t r = u / per_row, c = u - r * per_row;
        const uint16_t *g = gate_up + r * 2 * n_ff;
        if (V) {
            float a[kVec], b[kVec];
            unpack8(*reinterpret_cast<const uint4 *>(g + c * kVec), a);
            unpack8(*reinterpret_cast<const uint4 *>(g + n_ff + c * kVec), b);
#pragma unroll
            for (int e = 0; e < kVec; e++)
                a[e] = act<ACT>(a[e]) * b[e];
            *reinterpret_cast<uint4 *>(out + r * n_ff + c * kVec) = pack8(a);
        } else {
            out[r * n_ff + c] = f2bf(act<ACT>(bf2f(g[c])) * bf2f(g[n_ff + c]));
        }
    }
}

template <int ACT>
int act_mul(kc_stream s, kc_bf16 *out, const kc_bf16 *gate_up, int64_t rows, int64_t n_ff)
{
    if (rows < 0 || n_ff <= 0)
        return (int)cudaErrorInvalidValue;
    if (rows == 0)
        return 0;
    if (!out || !gate_up)
        return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)s;
    if (n_ff % kVec == 0 && aligned16(out) && aligned16(gate_up))
        act_mul_kernel<ACT, true>
            <<<grid_for(rows * (n_ff / kVec)), kThreads, 0, st>>>(out, gate_up, rows, n_ff);
    else
        act_mul_kernel<ACT, false>
            <<<grid_for(rows * n_ff), kThreads, 0, st>>>(out, gate_up, rows, n_ff);
    return (int)cudaGetLastError();
}

/* ------------------------------------------------------------- embedding */

template <bool V>
__global__ void __launch_bounds__(kThreads)
    embed_kernel(uint16_t *__restrict__ out, const uint16_t *__restrict__ table,
                 const int32_t *__restrict__ ids, int64_t n, int64_t dim, int64_t v0,
                 int64_t n_vocab)
{
    const int64_t per_row = V ? dim / kVec : dim;
    const int64_t total = n * per_row;
    for (int64_t u = first_unit(); u < total; u += unit_stride()) {
        const int64_t r = u / per_row, c = u - r * per_row;
        const int64_t id = (int64_t)ids[r] - v0; // a row of this slice of the table
        const bool ok = id >= 0 && id < n_vocab; // else another slice's, or a bad id
        if (V) {
            uint4 x = ok ? *reinterpret_cast<const uint4 *>(table + id * dim + c * kVec)
                         : make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4 *>(out + r * dim + c * kVec) = x;
        } else {
            out[r * dim + c] = ok ? table[id * dim + c] : (uint16_t)0;
        }
    }
}

/* -------------------------------------------------------------- bias add */

template <bool V>
__global__ void __launch_bounds__(kThreads)
    bias_add_kernel(uint16_t *__restrict__ x, const uint16_t *__restrict__ bias, int64_t rows,
                    int64_t dim)
{
    const int64_t per_row = V ? dim / kVec : dim;
    const int64_t total = rows * per_row;
    for (int64_t u = first_unit(); u < total; u += unit_stride()) {
        const int64_t c = u % per_row;
        if (V) {
            uint4 *p = reinterpret_cast<uint4 *>(x) + u; // rows are whole units
            float a[kVec], b[kVec];
            unpack8(*p, a);
            unpack8(*reinterpret_cast<const uint4 *>(bias + c * kVec), b);
#pragma unroll
            for (int e = 0; e < kVec; e++)
                a[e] += b[e];
            *p = pack8(a);
        } else {
            x[u] = f2bf(bf2f(x[u]) + bf2f(bias[c]));
        }
    }
}

/* ------------------------------------------------------------ conversion */

// V: units of 8 (two float4 <-> one uint4) over the first n / 8 * 8
// elements, then the last n % 8 one by one; otherwise all one by one.
template <bool V>
__global__ void __launch_bounds__(kThreads)
    f32_to_bf16_kernel(uint16_t *__restrict__ out, const float *__restrict__ in, int64_t n)
{
    int64_t done = 0;
    if (V) {
        const int64_t units = n / kVec;
        for (int64_t u = first_unit(); u < units; u += unit_stride()) {
            const float4 a = reinterpret_cast<const float4 *>(in)[2 * u];
            const float4 b = reinterpret_cast<const float4 *>(in)[2 * u + 1];
            reinterpret_cast<uint4 *>(out)[u] =
                make_uint4(pack2(a.x, a.y), pack2(a.z, a.w), pack2(b.x, b.y), pack2(b.z, b.w));
        }
        done = units * kVec;
    }
    for (int64_t i = done + first_unit(); i < n; i += unit_stride())
        out[i] = f2bf(in[i]);
}

template <bool V>
__global__ void __launch_bounds__(kThreads)
    bf16_to_f32_kernel(float *__restrict__ out, const uint16_t *__restrict__ in, int64_t n)
{
    int64_t done = 0;
    if (V) {
        const int64_t units = n / kVec;
        for (int64_t u = first_unit(); u < units; u += unit_stride()) {
            float f[kVec];
            unpack8(reinterpret_cast<const uint4 *>(in)[u], f);
            reinterpret_cast<float4 *>(out)[2 * u] = make_float4(f[0], f[1], f[2], f[3]);
            reinterpret_cast<float4 *>(out)[2 * u + 1] = make_float4(f[4], f[5], f[6], f[7]);
        }
        done = units * kVec;
    }
    for (int64_t i = done + first_unit(); i < n; i += unit_stride())
        out[i] = bf2f(in[i]);
}

} // namespace

/* ------------------------------------------------------------- launchers */

extern "C" int kc_silu_mul(kc_stream s, kc_bf16 *out, const kc_bf16 *gate_up, int64_t rows,
                           int64_t n_ff)
{
    return act_mul<ACT_SILU>(s, out, gate_up, rows, n_ff);
}

extern "C" int kc_gelu_mul(kc_stream s, kc_bf16 *out, const kc_bf16 *gate_up, int64_t rows,
                           int64_t n_ff)
{
    return act_mul<ACT_GELU>(s, out, gate_up, rows, n_ff);
}

static int embed_launch(kc_stream s, kc_bf16 *out, const kc_bf16 *table, const int32_t *ids,
                        int64_t n, int64_t dim, int64_t v0, int64_t n_vocab)
{
    if (n < 0 || dim <= 0 || n_vocab < 0 || v0 < 0)
        return (int)cudaErrorInvalidValue;
    if (n == 0)
        return 0;
    if (!out || !ids || (n_vocab > 0 && !table))
        return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)s;
    if (dim % kVec == 0 && aligned16(out) && aligned16(table))
        embed_kernel<true><<<grid_for(n * (dim / kVec)), kThreads, 0, st>>>(out, table, ids, n,
                                                                           dim, v0, n_vocab);
    else
        embed_kernel<false><<<grid_for(n * dim), kThreads, 0, st>>>(out, table, ids, n, dim, v0,
                                                                   n_vocab);
    return (int)cudaGetLastError();
}

extern "C" int kc_embed(kc_stream s, kc_bf16 *out, const kc_bf16 *table, const int32_t *ids,
                        int64_t n, int64_t dim, int64_t n_vocab)
{
    return embed_launch(s, out, table, ids, n, dim, 0, n_vocab);
}

extern "C" int kc_embed_shard(kc_stream s, kc_bf16 *out, const kc_bf16 *table,
                              const int32_t *ids, int64_t n, int64_t dim, int64_t v0,
                              int64_t n_rows)
{
    return embed_launch(s, out, table, ids, n, dim, v0, n_rows);
}

namespace {

// One thread per id: a placeholder -1 - k becomes prev[k] (k < n_prev);
// a placeholder out of range becomes -1, which kc_embed turns into zeros
// (the host checks the range; this only keeps a bad one in bounds).
__global__ void resolve_kernel(int32_t *ids, int64_t n, const int32_t *prev, int n_prev)
{
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    const int32_t v = ids[i];
    if (v >= 0)
        return;
    const int64_t k = -1 - (int64_t)v;
    ids[i] = k < n_prev ? prev[k] : -1;
}

} // namespace

extern "C" int kc_resolve_tokens(kc_stream s, int32_t *ids, int64_t n, const int32_t *prev,
                                 int n_prev)
{
    if (n < 0 || n_prev < 0)
        return (int)cudaErrorInvalidValue;
    if (n == 0)
        return 0;
    if (!ids || (n_prev > 0 && !prev))
        return (int)cudaErrorInvalidValue;
    resolve_kernel<<<(unsigned)((n + kThreads - 1) / kThreads), kThreads, 0, (cudaStream_t)s>>>(
        ids, n, prev, n_prev);
    return (int)cudaGetLastError();
}

extern "C" int kc_bias_add(kc_stream s, kc_bf16 *x, const kc_bf16 *bias, int64_t rows, int64_t dim)
{
    if (rows < 0 || dim <= 0)
        return (int)cudaErrorInvalidValue;
    if (rows == 0)
        return 0;
    if (!x || !bias)
        return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)s;
    if (dim % kVec == 0 && aligned16(x) && aligned16(bias))
        bias_add_kernel<true>
            <<<grid_for(rows * (dim / kVec)), kThreads, 0, st>>>(x, bias, rows, dim);
    else
        bias_add_kernel<false><<<grid_for(rows * dim), kThreads, 0, st>>>(x, bias, rows, dim);
    return (int)cudaGetLastError();
}

extern "C" int kc_f32_to_bf16(kc_stream s, kc_bf16 *out, const float *in, int64_t n)
{
    if (n < 0)
        return (int)cudaErrorInvalidValue;
    if (n == 0)
        return 0;
    if (!out || !in)
        return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)s;
    if (aligned16(out) && aligned16(in))
        f32_to_bf16_kernel<true><<<grid_for(n / kVec + 1), kThreads, 0, st>>>(out, in, n);
    else
        f32_to_bf16_kernel<false><<<grid_for(n), kThreads, 0, st>>>(out, in, n);
    return (int)cudaGetLastError();
}

extern "C" int kc_bf16_to_f32(kc_stream s, float *out, const kc_bf16 *in, int64_t n)
{
    if (n < 0)
        return (int)cudaErrorInvalidValue;
    if (n == 0)
        return 0;
    if (!out || !in)
        return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)s;
    if (aligned16(out) && aligned16(in))
        bf16_to_f32_kernel<true><<<grid_for(n / kVec + 1), kThreads, 0, st>>>(out, in, n);
    else
        bf16_to_f32_kernel<false><<<grid_for(n), kThreads, 0, st>>>(out, in, n);
    return (int)cudaGetLastError();
}
