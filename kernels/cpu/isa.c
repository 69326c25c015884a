/* isa.c: which SIMD path the CPU kernels take. Detects the CPU's features
 * once (cpuid, and xgetbv for the OS saving the wide registers), applies
 * the INFERD_ISA override, and hands the kernels the table of the chosen
 * path. Any thread may call; the first call decides.
 */
#include <cpuid.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/kcpu.h"

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* The best path this CPU can run, ignoring the environment. */
static enum k_isa isa_hw(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return K_ISA_SCALAR;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    int f16c = (c >> 29) & 1;
    if (!osxsave || !avx)
        return K_ISA_SCALAR;
    uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 6) != 6) /* SSE and AVX state saved by the OS */
        return K_ISA_SCALAR;
    if (__get_cpuid_max(0, NULL) < 7)
        return K_ISA_SCALAR;
    __cpuid_count(7, 0, a, b, c, d);
    int avx2 = (b >> 5) & 1;
    int avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1;
    int avx512vl = (b >> 31) & 1, vnni = (c >> 11) & 1;
    if (!(avx2 && fma && f16c))
        return K_ISA_SCALAR;
    /* opmask, upper zmm halves and zmm16-31 saved by the OS */
    int os512 = (xcr0 & 0xe0) == 0xe0;
    /* VNNI is required: without vpdpbusd the int8 paths of AVX-512 would
     * be no faster than AVX2's. */
    if (os512 && avx512f && avx512bw && avx512vl && vnni)
        return K_ISA_AVX512;
    return K_ISA_AVX2;
}

static enum k_isa isa_from_env(enum k_isa hw)
{
    const char *e = getenv("INFERD_ISA");
    if (!e || !*e)
        return hw;
    enum k_isa want = hw;
    if (!strcmp(e, "scalar"))
        want = K_ISA_SCALAR;
    else if (!strcmp(e, "avx2"))
        want = K_ISA_AVX2;
    else if (!strcmp(e, "avx512"))
        want = K_ISA_AVX512;
    return want < hw ? want : hw;
}

enum k_isa k_isa_detect(void)
{
    return isa_from_env(isa_hw());
}

const char *k_isa_name(enum k_isa isa)
{
    switch (isa) {
    case K_ISA_SCALAR:
        return "scalar";
    case K_ISA_AVX2:
        return "avx2";
    case K_ISA_AVX512:
        return "avx512";
    }
    return "?";
}

/* -1 until decided; then the k_isa in effect. */
static _Atomic int isa_active = -1;

enum k_isa k_isa_select(enum k_isa want)
{
    enum k_isa hw = isa_hw();
    enum k_isa got = want < hw ? want : hw;
    if ((int)got < 0)
        got = K_ISA_SCALAR;
    atomic_store(&isa_active, (int)got);
    return got;
}

enum k_isa k_isa_active(void)
{
    int v = atomic_load_explicit(&isa_active, memory_order_acquire);
    if (v < 0) {
        v = (int)k_isa_detect();
        int expect = -1;
        /* two first callers agree: both computed the same value */
        atomic_compare_exchange_strong(&isa_active, &expect, v);
        v = atomic_load(&isa_active);
    }
    return (enum k_isa)v;
}

#define KC_TABLE(name, level, align, packed)                                  \
    static const struct kc_ops ops_##name = {                                 \
        .isa = level,                                                         \
        .quantize = kc_quantize_##name,                                       \
        .mm_work = kc_mm_work_##name,                                         \
        .mm_rows = kc_mm_rows_##name,                                         \
        .row_align = align,                                                   \
        .x32 = packed,                                                        \
        .dot = kc_dot_##name,                                                 \
        .axpy = kc_axpy_##name,                                               \
        .dot_rows = kc_dot_rows_##name,                                       \
        .axpy_rows = kc_axpy_rows_##name,                                     \
        .rmsnorm = kc_rmsnorm_##name,                                         \
        .silu_mul = kc_silu_mul_##name,                                       \
        .softmax = kc_softmax_##name,                                         \
    };
/* row_align: the output-row tile of each path's matmul; packed: whether
 * it has kernels for K_LAYOUT_X32 */
KC_TABLE(scalar, K_ISA_SCALAR, 4, 0)
KC_TABLE(avx2, K_ISA_AVX2, 8, 0)
KC_TABLE(avx512, K_ISA_AVX512, 16, 1)

const struct kc_ops *kc_ops(void)
{
    switch (k_isa_active()) {
    case K_ISA_AVX512:
        return &ops_avx512;
    case K_ISA_AVX2:
        return &ops_avx2;
    default:
        return &ops_scalar;
    }
}
