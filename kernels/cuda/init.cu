// init.cu: weights made on the device (kcuda.h): the random bf16 values
// of --load-format dummy, bit for bit those engine/loader_dummy.c makes on
// the host, and constant fills (norm weights of one, biases of zero). An
// 8B-shaped model's 16 GB then never cross PCIe nor wait on a host loop.
// Enqueued by the engine's CUDA backend thread at load; no allocation, no
// synchronization.
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/bf16.cuh"
#include "kernels/cuda/kcuda.h"

namespace
{
using namespace kcu;

constexpr int kThreads = 256;
// As act.cu: 4096 x 256 threads in a grid-stride loop fill every SM.
constexpr int64_t kMaxBlocks = 4096;
constexpr uint64_t kGamma = 0x9e3779b97f4a7c15ull; // splitmix64's increment

int grid_for(int64_t units)
{
    int64_t b = (units + kThreads - 1) / kThreads;
    return (int)(b < 1 ? 1 : b > kMaxBlocks ? kMaxBlocks : b);
}

__device__ __forceinline__ int64_t first_unit()
{
    return (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t unit_stride()
{
    return (int64_t)gridDim.x * blockDim.x;
}

/* ---------------------------------------------------------- dummy values */

// Draw k of a splitmix64 stream whose state is s: the host's mix() called
// k + 1 times, computed directly (the state only ever adds kGamma).
__device__ __forceinline__ uint64_t draw(uint64_t s, int64_t k)
{
    uint64_t z = s + (uint64_t)(k + 1) * kGamma;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// The four bf16 values of draw r, lane j in bits 16j..16j+15 (element
// 4k + j, so on a little-endian device the word is the memory image).
// Per lane, as the host: sign = bit 15, mantissa = bits 0..6, exponent =
// 118 + bits 7..8; all lanes at once, since 118 + 3 fits bits 7..14 and
// no lane carries into the next.
__device__ __forceinline__ uint64_t dummy_lanes(uint64_t r)
{
    const uint64_t sign = r & 0x8000800080008000ull, mant = r & 0x007f007f007f007full;
    const uint64_t e = (r >> 7) & 0x0003000300030003ull;
    return sign | mant | ((e + 0x0076007600760076ull) << 7);
}

// Unit k: draw k, elements 4k .. 4k + 3 (fewer in the last unit). V: dst
// is 8-byte aligned, so a whole unit is one 8-byte store.
template <bool V>
__global__ void __launch_bounds__(kThreads)
    fill_dummy_kernel(uint16_t *__restrict__ dst, int64_t n, uint64_t state)
{
    const int64_t units = (n + 3) / 4;
    for (int64_t k = first_unit(); k < units; k += unit_stride()) {
        const uint64_t w = dummy_lanes(draw(state, k));
        const int64_t i = 4 * k;
        if (V && i + 4 <= n) {
            reinterpret_cast<uint2 *>(dst)[k] = make_uint2((uint32_t)w, (uint32_t)(w >> 32));
        } else {
            for (int j = 0; j < 4 && i + j < n; j++)
                dst[i + j] = (uint16_t)(w >> (16 * j));
        }
    }
}

/* -------------------------------------------------------------- constants */

// V: dst 16-byte aligned; units of 8 over the first n / 8 * 8 elements,
// then the rest one by one.
template <bool V>
__global__ void __launch_bounds__(kThreads)
    fill_const_kernel(uint16_t *__restrict__ dst, int64_t n, uint16_t value)
{
    int64_t done = 0;
    if (V) {
        const uint32_t two = (uint32_t)value * 0x10001u;
        const uint4 u = make_uint4(two, two, two, two);
        const int64_t units = n / 8;
        for (int64_t k = first_unit(); k < units; k += unit_stride())
            reinterpret_cast<uint4 *>(dst)[k] = u;
        done = units * 8;
    }
    for (int64_t i = done + first_unit(); i < n; i += unit_stride())
        dst[i] = value;
}

inline bool aligned8(const void *p)
{
    return ((uintptr_t)p & 7) == 0;
}

} // namespace

/* ------------------------------------------------------------- launchers */

extern "C" int kc_fill_dummy_bf16(kc_stream s, kc_bf16 *dst, int64_t n, uint64_t state)
{
    if (n < 0)
        return (int)cudaErrorInvalidValue;
    if (n == 0)
        return 0;
    if (!dst)
        return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)s;
    const int64_t units = (n + 3) / 4;
    if (aligned8(dst))
        fill_dummy_kernel<true><<<grid_for(units), kThreads, 0, st>>>(dst, n, state);
    else
        fill_dummy_kernel<false><<<grid_for(units), kThreads, 0, st>>>(dst, n, state);
    return (int)cudaGetLastError();
}

extern "C" int kc_fill_bf16(kc_stream s, kc_bf16 *dst, int64_t n, kc_bf16 value)
{
    if (n < 0)
        return (int)cudaErrorInvalidValue;
    if (n == 0)
        return 0;
    if (!dst)
        return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)s;
    if (aligned16(dst))
        fill_const_kernel<true><<<grid_for(n / 8 + 1), kThreads, 0, st>>>(dst, n, value);
    else
        fill_const_kernel<false><<<grid_for(n), kThreads, 0, st>>>(dst, n, value);
    return (int)cudaGetLastError();
}
