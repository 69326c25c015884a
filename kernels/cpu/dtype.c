/* dtype.c: element types of weights, their block geometry, and the scalar
 * half / bfloat16 conversions every SIMD path must agree with. */
#include <string.h>

#include "kernels/kernels.h"

static const struct {
    const char *name;
    int64_t block;
    int64_t bytes;
} dtype_info[K_DTYPE_COUNT] = {
    [K_F32] = {"f32", 1, 4},
    [K_F16] = {"f16", 1, 2},
    [K_BF16] = {"bf16", 1, 2},
    [K_Q8_0] = {"q8_0", 32, 34},
    [K_Q4_K] = {"q4_k", 256, 144},
    [K_Q6_K] = {"q6_k", 256, 210},
};

const char *k_dtype_name(enum k_dtype t)
{
    return (unsigned)t < K_DTYPE_COUNT ? dtype_info[t].name : "?";
}

int64_t k_dtype_block(enum k_dtype t)
{
    return (unsigned)t < K_DTYPE_COUNT ? dtype_info[t].block : 0;
}

int64_t k_dtype_block_bytes(enum k_dtype t)
{
    return (unsigned)t < K_DTYPE_COUNT ? dtype_info[t].bytes : 0;
}

int64_t k_row_bytes(enum k_dtype t, int64_t n)
{
    if ((unsigned)t >= K_DTYPE_COUNT || n < 0)
        return -1;
    int64_t blk = dtype_info[t].block;
    if (n % blk)
        return -1;
    int64_t nb = n / blk;
    if (nb > INT64_MAX / dtype_info[t].bytes)
        return -1;
    return nb * dtype_info[t].bytes;
}

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float k_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0) {
        /* zero or subnormal: value = man * 2^-24, exact in f32 */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31)
        return bits_f32(sign | 0x7f800000u | (man << 13));
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t k_f32_to_f16(float f)
{
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or nan (keep nan quiet) */
        return sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0);
    if (ax >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return sign | 0x7c00;
    if (ax < 0x38800000u) {
        /* subnormal half (or zero): round ax * 2^24 to nearest even int */
        float v = bits_f32(ax) * 16777216.0f;
        uint32_t m = (uint32_t)v;
        float rem = v - (float)m;
        if (rem > 0.5f || (rem == 0.5f && (m & 1)))
            m++;
        return sign | (uint16_t)m;
    }
    uint32_t r = ax + 0xfffu + ((ax >> 13) & 1); /* round to nearest even */
    return sign | (uint16_t)((r - 0x38000000u) >> 13);
}

float k_bf16_to_f32(uint16_t h)
{
    return bits_f32((uint32_t)h << 16);
}

uint16_t k_f32_to_bf16(float f)
{
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40);
    x += 0x7fffu + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}
