// bf16.cuh: the bf16 helpers every elementwise kernel file uses: exact
// widening, round-to-nearest-even narrowing, packing two values for a
// 4-byte store, and the alignment test that picks 16-byte vector paths.
// Internal to kernels/cuda (not part of kcuda.h).
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

namespace kcu {

__device__ __forceinline__ float bf2f(uint16_t h)
{
    return __uint_as_float((uint32_t)h << 16); // exact
}

__device__ __forceinline__ uint16_t f2bf(float f)
{
    return __bfloat16_as_ushort(__float2bfloat16_rn(f)); // round to nearest even
}

__device__ __forceinline__ uint32_t pack2(float a, float b)
{
    return (uint32_t)f2bf(a) | ((uint32_t)f2bf(b) << 16);
}

inline bool aligned16(const void *p)
{
    return ((uintptr_t)p & 15) == 0;
}

} // namespace kcu
