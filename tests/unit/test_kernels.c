/* test_kernels.c: unit tests of the CPU kernels through kernels/kernels.h.
 * Conversions (every half and bfloat16), row sizes, the pool, matmul for
 * every dtype against a double-precision reference on the dequantized
 * weights, and the bit-equality promises: the same bits on every SIMD path,
 * for every batch size and every thread count. Also the vector ops.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <immintrin.h>

#include "kernels/kernels.h"

static int failures;

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            failures++;                                                       \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__,  \
                    #cond);                                                   \
            fprintf(stderr, __VA_ARGS__);                                     \
            fputc('\n', stderr);                                              \
        }                                                                     \
    } while (0)

/* ------------------------------------------------------------- helpers */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rnd_unit(void) /* [0, 1) */
{
    return (float)(rnd() >> 40) / 16777216.0f;
}

static float rnd_gauss(void)
{
    float u = rnd_unit() + 1e-7f, v = rnd_unit();
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

static uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bitsf(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void *xalloc(size_t n)
{
    void *p = aligned_alloc(64, (n + 63) & ~(size_t)63);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The SIMD paths this CPU has, lowest first. */
static int n_isas;
static enum k_isa isas[3];

static void find_isas(void)
{
    enum k_isa want[3] = {K_ISA_SCALAR, K_ISA_AVX2, K_ISA_AVX512};
    for (int i = 0; i < 3; i++)
        if (k_isa_select(want[i]) == want[i])
            isas[n_isas++] = want[i];
}

/* ------------------------------------------------------- conversions */

/* The hardware conversion (F16C), where the CPU has it, is the judge of
 * k_f32_to_f16's rounding. */
__attribute__((target("f16c"))) static uint16_t hw_f32_to_f16(float f)
{
    return (uint16_t)_cvtss_sh(f, 0);
}

static void test_f16(void)
{
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = k_f16_to_f32((uint16_t)h);
        uint16_t back = k_f32_to_f16(f);
        int exp = (h >> 10) & 31, man = h & 0x3ff;
        if (exp == 31 && man) { /* NaN: stays a NaN with its sign */
            if (!(f != f) || (back & 0x7c00) != 0x7c00 || !(back & 0x3ff) ||
                (back & 0x8000) != (h & 0x8000))
                bad++;
            continue;
        }
        if (back != h)
            bad++;
    }
    CHECK(bad == 0, "%d halves do not round-trip", bad);

    /* exact values */
    CHECK(k_f16_to_f32(0x3c00) == 1.0f, "1.0");
    CHECK(k_f16_to_f32(0x7bff) == 65504.0f, "max");
    CHECK(k_f16_to_f32(0x0001) == 5.9604644775390625e-8f, "min subnormal");
    CHECK(k_f16_to_f32(0x0400) == 6.103515625e-5f, "min normal");
    CHECK(fbits(k_f16_to_f32(0x8000)) == 0x80000000u, "-0");
    CHECK(k_f16_to_f32(0xfc00) == -INFINITY, "-inf");

    /* rounding: ties to even, overflow, underflow */
    struct {
        float f;
        uint16_t h;
    } cases[] = {
        {1.0f + 0x1p-11f, 0x3c00},           /* tie, even is down */
        {1.0f + 3 * 0x1p-11f, 0x3c02},       /* tie, even is up */
        {1.0f + 0x1p-11f + 0x1p-20f, 0x3c01}, /* above the tie */
        {65504.0f, 0x7bff},
        {65519.99f, 0x7bff},
        {65520.0f, 0x7c00}, /* rounds past max: inf */
        {1e10f, 0x7c00},
        {-1e10f, 0xfc00},
        {0x1p-24f, 0x0001},
        {0x1p-25f, 0x0000},         /* tie to even zero */
        {3 * 0x1p-25f, 0x0002},     /* tie to even 2 */
        {0x1p-25f + 0x1p-40f, 0x0001},
        {0x1p-14f - 0x1p-25f, 0x0400}, /* subnormal rounding up to normal */
        {1e-10f, 0x0000},
        {-1e-10f, 0x8000},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        CHECK(k_f32_to_f16(cases[i].f) == cases[i].h, "f16(%a) = %04x, want %04x",
              (double)cases[i].f, k_f32_to_f16(cases[i].f), cases[i].h);

    if (__builtin_cpu_supports("f16c")) {
        int diff = 0;
        for (int i = 0; i < 2000000; i++) {
            uint32_t u = (uint32_t)rnd();
            /* bias towards the half range */
            if (i & 1)
                u = (u & 0x80000000u) | (0x33000000u + (u % 0x14800000u));
            float f = bitsf(u);
            if (f != f)
                continue;
            if (k_f32_to_f16(f) != hw_f32_to_f16(f))
                diff++;
        }
        CHECK(diff == 0, "%d floats round differently from F16C", diff);
    }
}

static void test_bf16(void)
{
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = k_bf16_to_f32((uint16_t)h);
        CHECK(fbits(f) == h << 16, "bf16 widen %04x", h);
        uint16_t back = k_f32_to_bf16(f);
        if (f != f) {
            if (!(k_bf16_to_f32(back) != k_bf16_to_f32(back)))
                bad++;
        } else if (back != h) {
            bad++;
        }
    }
    CHECK(bad == 0, "%d bfloat16 do not round-trip", bad);
    CHECK(k_f32_to_bf16(1.0f + 0x1p-8f) == 0x3f80, "tie to even down");
    CHECK(k_f32_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82, "tie to even up");
    CHECK(k_f32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f) == 0x3f81, "above tie");
    CHECK(k_f32_to_bf16(bitsf(0x7f7fffffu)) == 0x7f80, "max rounds to inf");
    uint16_t qn = k_f32_to_bf16(bitsf(0x7f800001u)); /* NaN with low payload */
    CHECK((qn & 0x7f80) == 0x7f80 && (qn & 0x7f), "NaN stays NaN: %04x", qn);
}

static void test_row_bytes(void)
{
    CHECK(k_row_bytes(K_F32, 10) == 40, "f32");
    CHECK(k_row_bytes(K_F16, 7) == 14, "f16");
    CHECK(k_row_bytes(K_BF16, 0) == 0, "bf16 empty");
    CHECK(k_row_bytes(K_Q8_0, 64) == 68, "q8_0");
    CHECK(k_row_bytes(K_Q8_0, 33) == -1, "q8_0 partial block");
    CHECK(k_row_bytes(K_Q4_K, 4096) == 16 * 144, "q4_k");
    CHECK(k_row_bytes(K_Q6_K, 512) == 420, "q6_k");
    CHECK(k_row_bytes(K_Q6_K, 100) == -1, "q6_k partial");
    CHECK(k_row_bytes(K_F32, -1) == -1, "negative");
    CHECK(k_row_bytes(K_F32, INT64_MAX / 2) == -1, "overflow");
    CHECK(k_row_bytes(K_DTYPE_COUNT, 4) == -1, "bad dtype");
    CHECK(!strcmp(k_dtype_name(K_Q4_K), "q4_k"), "name");
    CHECK(k_dtype_block(K_Q6_K) == 256 && k_dtype_block_bytes(K_Q6_K) == 210,
          "q6_k geometry");
}

/* ---------------------------------------------------------------- pool */

struct pool_ctx {
    _Atomic long sum;
    _Atomic int calls;
    int seen[64];
};

static void pool_fn(void *ctx, int ith, int nth)
{
    struct pool_ctx *c = ctx;
    atomic_fetch_add(&c->sum, (long)ith + 1);
    atomic_fetch_add(&c->calls, 1);
    if (ith < 64)
        c->seen[ith] = nth;
}

static void nop_fn(void *ctx, int ith, int nth)
{
    (void)ctx;
    (void)ith;
    (void)nth;
}

static void test_pool(void)
{
    for (int n = 1; n <= 4; n++) {
        struct k_pool *p = k_pool_create(n);
        CHECK(p != NULL, "create %d", n);
        if (!p)
            continue;
        CHECK(k_pool_size(p) == n, "size %d", k_pool_size(p));
        for (int it = 0; it < 2000; it++) {
            struct pool_ctx c;
            memset(&c, 0, sizeof(c));
            k_pool_run(p, pool_fn, &c);
            if (atomic_load(&c.calls) != n ||
                atomic_load(&c.sum) != (long)n * (n + 1) / 2) {
                CHECK(0, "run %d with %d threads: %d calls", it, n,
                      atomic_load(&c.calls));
                break;
            }
            for (int i = 0; i < n; i++)
                CHECK(c.seen[i] == n, "nth");
        }
        /* dispatch cost while the workers spin */
        double t0 = now_s();
        const int reps = n <= 2 ? 20000 : 2000; /* 3, 4 overload 2 cores */
        for (int it = 0; it < reps; it++)
            k_pool_run(p, nop_fn, NULL);
        double us = (now_s() - t0) / reps * 1e6;
        printf("pool: %d threads, k_pool_run of an empty task: %.2f us\n", n, us);
        /* a run after the workers fell asleep still completes */
        if (n > 1) {
            struct timespec ts = {0, 20 * 1000 * 1000};
            nanosleep(&ts, NULL);
            struct pool_ctx c;
            memset(&c, 0, sizeof(c));
            t0 = now_s();
            k_pool_run(p, pool_fn, &c);
            printf("pool: %d threads, run after sleeping: %.1f us\n", n,
                   (now_s() - t0) * 1e6);
            CHECK(atomic_load(&c.calls) == n, "run after sleep");
        }
        k_pool_destroy(p);
    }
    k_pool_destroy(NULL);
    struct pool_ctx c;
    memset(&c, 0, sizeof(c));
    k_pool_run(NULL, pool_fn, &c);
    CHECK(atomic_load(&c.calls) == 1, "NULL pool runs on the caller");
}

/* -------------------------------------------------------------- weights */

static const enum k_dtype all_dtypes[] = {K_F32, K_F16, K_BF16,
                                          K_Q8_0, K_Q4_K, K_Q6_K};

static uint16_t f16_in(float lo, float hi)
{
    return k_f32_to_f16(lo + (hi - lo) * rnd_unit());
}

static void put16(uint8_t *p, uint16_t v)
{
    memcpy(p, &v, 2);
}

/* Random weights of dtype: gaussian floats, or random quant bytes with
 * sane f16 scales (what a quantizer could have written). The matrix ends
 * exactly where its allocation does and starts one byte in (the header
 * allows unaligned weights), so ASan sees any read past either end.
 * Free with free_weights. */
static void *make_weights(enum k_dtype t, int64_t rows, int64_t cols)
{
    int64_t rb = k_row_bytes(t, cols);
    uint8_t *base = malloc((size_t)(rows * rb) + 1);
    if (!base) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    uint8_t *w = base + 1;
    for (int64_t r = 0; r < rows; r++) {
        uint8_t *row = w + r * rb;
        switch (t) {
        case K_F32:
            for (int64_t i = 0; i < cols; i++) {
                float f = rnd_gauss() * 0.1f;
                memcpy(row + 4 * i, &f, 4);
            }
            break;
        case K_F16:
            for (int64_t i = 0; i < cols; i++)
                put16(row + 2 * i, k_f32_to_f16(rnd_gauss() * 0.1f));
            break;
        case K_BF16:
            for (int64_t i = 0; i < cols; i++)
                put16(row + 2 * i, k_f32_to_bf16(rnd_gauss() * 0.1f));
            break;
        case K_Q8_0:
            for (int64_t b = 0; b < cols / 32; b++) {
                uint8_t *blk = row + 34 * b;
                put16(blk, f16_in(0.0005f, 0.01f));
                for (int i = 0; i < 32; i++)
                    blk[2 + i] = (uint8_t)rnd();
            }
            break;
        case K_Q4_K:
            for (int64_t b = 0; b < cols / 256; b++) {
                uint8_t *blk = row + 144 * b;
                put16(blk, f16_in(0.0002f, 0.003f));
                put16(blk + 2, f16_in(0.0002f, 0.005f));
                for (int i = 4; i < 144; i++)
                    blk[i] = (uint8_t)rnd();
            }
            break;
        case K_Q6_K:
            for (int64_t b = 0; b < cols / 256; b++) {
                uint8_t *blk = row + 210 * b;
                for (int i = 0; i < 208; i++)
                    blk[i] = (uint8_t)rnd();
                put16(blk + 208, f16_in(0.00005f, 0.0005f));
            }
            break;
        default:
            break;
        }
    }
    return w;
}

/* Independent statement of the dequantization (GGUF's formulas). */
static void free_weights(void *w)
{
    free((uint8_t *)w - 1);
}

static float ref_weight(enum k_dtype t, const uint8_t *row, int64_t i)
{
    uint16_t h;
    switch (t) {
    case K_F32: {
        float f;
        memcpy(&f, row + 4 * i, 4);
        return f;
    }
    case K_F16:
        memcpy(&h, row + 2 * i, 2);
        return k_f16_to_f32(h);
    case K_BF16:
        memcpy(&h, row + 2 * i, 2);
        return k_bf16_to_f32(h);
    case K_Q8_0: {
        const uint8_t *blk = row + 34 * (i / 32);
        memcpy(&h, blk, 2);
        return (float)(int8_t)blk[2 + i % 32] * k_f16_to_f32(h);
    }
    case K_Q4_K: {
        const uint8_t *blk = row + 144 * (i / 256);
        int e = (int)(i % 256), j = e / 32, l = e % 32;
        const uint8_t *s = blk + 4;
        int sc, m;
        if (j < 4) {
            sc = s[j] & 63;
            m = s[j + 4] & 63;
        } else {
            sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
        memcpy(&h, blk, 2);
        float d = k_f16_to_f32(h);
        memcpy(&h, blk + 2, 2);
        float dmin = k_f16_to_f32(h);
        int q = (blk[16 + 32 * (j / 2) + l] >> (4 * (j & 1))) & 0xF;
        float a = d * (float)sc, b = dmin * (float)m;
        float v = a * (float)q;
        return v - b;
    }
    case K_Q6_K: {
        const uint8_t *blk = row + 210 * (i / 256);
        int e = (int)(i % 256), n = e / 128, t2 = e % 128, qu = t2 / 32,
            l = t2 % 32;
        int lo = (blk[64 * n + 32 * (qu & 1) + l] >> (4 * (qu / 2))) & 0xF;
        int hi = (blk[128 + 32 * n + l] >> (2 * qu)) & 3;
        memcpy(&h, blk + 208, 2);
        float d = k_f16_to_f32(h);
        float ds = d * (float)(int8_t)blk[192 + e / 16];
        return ds * (float)((lo | (hi << 4)) - 32);
    }
    default:
        return 0.0f;
    }
}

static void test_dequant(void)
{
    for (size_t ti = 0; ti < sizeof(all_dtypes) / sizeof(all_dtypes[0]); ti++) {
        enum k_dtype t = all_dtypes[ti];
        int64_t cols = k_dtype_block(t) == 1 ? 37 : 3 * k_dtype_block(t);
        int64_t rows = 3;
        uint8_t *w = make_weights(t, rows, cols);
        struct k_matrix W = {t, rows, cols, w, K_LAYOUT_ROWS};
        float *out = xalloc((size_t)cols * 4);
        int bad = 0;
        for (int64_t r = 0; r < rows; r++) {
            k_dequant_row(&W, r, out);
            const uint8_t *row = w + r * k_row_bytes(t, cols);
            for (int64_t i = 0; i < cols; i++)
                if (fbits(out[i]) != fbits(ref_weight(t, row, i)))
                    bad++;
        }
        CHECK(bad == 0, "%s: %d dequantized values differ", k_dtype_name(t), bad);
        free(out);
        free_weights(w);
    }
}

/* --------------------------------------------------------------- matmul */

struct mm_case {
    enum k_dtype t;
    int64_t rows, cols;
    void *w;
    float *x; /* (nx_max, cols) */
    int64_t nx_max;
};

static struct mm_case mm_make(enum k_dtype t, int64_t rows, int64_t cols,
                              int64_t nx_max)
{
    struct mm_case c = {t, rows, cols, make_weights(t, rows, cols), NULL, nx_max};
    c.x = xalloc((size_t)(nx_max * cols) * 4);
    for (int64_t i = 0; i < nx_max * cols; i++)
        c.x[i] = rnd_gauss();
    /* odd rows: an all-zero block and a wide dynamic range */
    if (nx_max > 2) {
        for (int64_t i = 0; i < cols && i < 32; i++)
            c.x[cols + i] = 0.0f;
        for (int64_t i = 0; i < cols; i++)
            c.x[2 * cols + i] *= (i % 7 == 0) ? 1000.0f : 0.001f;
    }
    return c;
}

static void mm_free(struct mm_case *c)
{
    free_weights(c->w);
    free(c->x);
}

/* y = W x for rows [0, n_x) of c->x, with y stride rows + 3 (to catch
 * stride bugs). Returns y (caller frees). */
static float *mm_run(struct k_pool *pool, const struct mm_case *c,
                     const float *x, int64_t n_x)
{
    struct k_matrix W = {c->t, c->rows, c->cols, c->w, K_LAYOUT_ROWS};
    size_t sb = k_matmul_scratch(&W, n_x);
    void *scratch = sb ? xalloc(sb) : NULL;
    int64_t ys = c->rows + 3;
    float *y = xalloc((size_t)(n_x * ys) * 4);
    for (int64_t i = 0; i < n_x * ys; i++)
        y[i] = NAN;
    k_matmul(pool, &W, x, c->cols, n_x, y, ys, scratch);
    free(scratch);
    return y;
}

static int is_quant(enum k_dtype t)
{
    return t == K_Q8_0 || t == K_Q4_K || t == K_Q6_K;
}

/* All rows of the case's weights as f32 (rows, cols); caller frees. */
static float *dequant_all(const struct mm_case *c)
{
    struct k_matrix W = {c->t, c->rows, c->cols, c->w, K_LAYOUT_ROWS};
    float *w = xalloc((size_t)(c->rows * c->cols) * 4);
    for (int64_t o = 0; o < c->rows; o++)
        k_dequant_row(&W, o, w + o * c->cols);
    return w;
}

/* Accuracy against double precision on the dequantized weights.
 * Float weights: |err| <= 1e-5 * sum|w x| + 1e-30 (f32 fma chains of a few
 * hundred terms stay well inside it). Int8: x is rounded to 127 levels
 * per block, so |err| <= sum_i |w_i| * amax(x block of i) / 254, plus the
 * float part; and the whole vector's relative error must be < 1.5e-2. */
static void check_accuracy(const struct mm_case *c, const float *y,
                           int64_t n_x, const char *what)
{
    float *wall = dequant_all(c);
    int64_t blk = c->t == K_Q8_0 ? 32 : 256;
    int bad = 0;
    double worst = 0;
    for (int64_t r = 0; r < n_x; r++) {
        const float *x = c->x + r * c->cols;
        double e2 = 0, r2 = 0;
        for (int64_t o = 0; o < c->rows; o++) {
            const float *wr = wall + o * c->cols;
            double ref = 0, mag = 0, qbound = 0;
            for (int64_t i = 0; i < c->cols; i++) {
                ref += (double)wr[i] * x[i];
                mag += fabs((double)wr[i] * x[i]);
            }
            if (is_quant(c->t)) {
                for (int64_t b0 = 0; b0 < c->cols; b0 += blk) {
                    double amax = 0, wsum = 0;
                    for (int64_t i = b0; i < b0 + blk; i++) {
                        amax = fmax(amax, fabs(x[i]));
                        wsum += fabs(wr[i]);
                    }
                    qbound += wsum * amax / 254.0;
                }
            }
            double got = y[r * (c->rows + 3) + o];
            double err = fabs(got - ref);
            double tol = is_quant(c->t) ? 1.0001 * qbound + 2e-6 * mag + 1e-30
                                        : 1e-5 * mag + 1e-30;
            if (!(err <= tol)) {
                if (bad < 5)
                    fprintf(stderr, "  %s %s row %lld out %lld: got %.9g ref %.9g tol %.3g\n",
                            what, k_dtype_name(c->t), (long long)r,
                            (long long)o, got, ref, tol);
                bad++;
            }
            e2 += (got - ref) * (got - ref);
            r2 += ref * ref;
        }
        double rel = r2 > 0 ? sqrt(e2 / r2) : sqrt(e2);
        if (r != 2) /* row 2 has a 1e6 dynamic range on purpose */
            worst = fmax(worst, rel);
    }
    double lim = is_quant(c->t) ? 1.5e-2 : 1e-6;
    if (c->rows < 100) /* a few outputs can cancel: the bound above rules */
        worst = 0;
    CHECK(bad == 0, "%s %s %lldx%lld: %d outputs outside the bound", what,
          k_dtype_name(c->t), (long long)c->rows, (long long)c->cols, bad);
    CHECK(worst < lim, "%s %s: relative error %.3g >= %.3g", what,
          k_dtype_name(c->t), worst, lim);
    free(wall);
}

/* The activations as the int8 paths see them: x rounded to 127 levels of
 * its block's amax (an independent statement of kcpu.h's rule). */
static void quantize_ref(const float *x, int64_t n, int64_t blk, float *xq)
{
    for (int64_t b0 = 0; b0 < n; b0 += blk) {
        float amax = 0.0f;
        for (int64_t i = b0; i < b0 + blk; i++)
            amax = fmaxf(amax, fabsf(x[i]));
        float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
        for (int64_t i = b0; i < b0 + blk; i++)
            xq[i] = (float)(int)rintf(x[i] * id) * d;
    }
}

/* Int8 paths against double precision on the dequantized weights and the
 * int8-rounded activations: the integer block sums are exact, so only the
 * f32 combine of the block results remains (|err| <= 1e-5 * sum|w x|). */
static void check_exact_int8(const struct mm_case *c, const float *y,
                             int64_t n_x, const char *what)
{
    float *wall = dequant_all(c), *xq = xalloc((size_t)c->cols * 4);
    int64_t blk = c->t == K_Q8_0 ? 32 : 256;
    int bad = 0;
    for (int64_t r = 0; r < n_x; r++) {
        quantize_ref(c->x + r * c->cols, c->cols, blk, xq);
        for (int64_t o = 0; o < c->rows; o++) {
            const float *wr = wall + o * c->cols;
            double ref = 0, mag = 0;
            for (int64_t i = 0; i < c->cols; i++) {
                ref += (double)wr[i] * xq[i];
                mag += fabs((double)wr[i] * xq[i]);
            }
            double got = y[r * (c->rows + 3) + o];
            if (!(fabs(got - ref) <= 1e-5 * mag + 1e-30)) {
                if (bad < 5)
                    fprintf(stderr, "  %s %s row %lld out %lld: got %.9g ref %.9g mag %.3g\n",
                            what, k_dtype_name(c->t), (long long)r,
                            (long long)o, got, ref, mag);
                bad++;
            }
        }
    }
    CHECK(bad == 0, "%s %s %lldx%lld: %d outputs differ from the exact "
          "int8 result", what, k_dtype_name(c->t), (long long)c->rows,
          (long long)c->cols, bad);
    free(wall);
    free(xq);
}

static int same_bits(const float *a, const float *b, int64_t n)
{
    return memcmp(a, b, (size_t)n * 4) == 0;
}

/* Row r of y (stride rows+3) equals row r of ref. */
static int rows_equal(const struct mm_case *c, const float *y, int64_t ry,
                      const float *ref, int64_t rr)
{
    return same_bits(y + ry * (c->rows + 3), ref + rr * (c->rows + 3), c->rows);
}

static void test_matmul(void)
{
    struct k_pool *pools[4] = {NULL, k_pool_create(1), k_pool_create(2),
                               k_pool_create(3)};
    struct shape {
        int64_t rows, cols;
    };
    for (size_t ti = 0; ti < sizeof(all_dtypes) / sizeof(all_dtypes[0]); ti++) {
        enum k_dtype t = all_dtypes[ti];
        int64_t B = k_dtype_block(t);
        struct shape shapes[] = {
            {1, B == 1 ? 1 : B},         {5, B == 1 ? 7 : B},
            {17, B == 1 ? 16 : 2 * B},   {33, B == 1 ? 100 : 3 * B},
            {67, B == 1 ? 257 : 5 * B},  {130, B == 1 ? 1000 : 9 * B},
        };
        for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
            struct mm_case c = mm_make(t, shapes[si].rows, shapes[si].cols, 64);
            int64_t ys = c.rows + 3;
            /* reference result: scalar path, n_x = 64, no pool */
            k_isa_select(K_ISA_SCALAR);
            float *ref = mm_run(NULL, &c, c.x, 64);
            check_accuracy(&c, ref, 64, "scalar");
            if (is_quant(t))
                check_exact_int8(&c, ref, 64, "scalar");
            for (int ii = 0; ii < n_isas; ii++) {
                enum k_isa isa = isas[ii];
                k_isa_select(isa);
                const char *in = k_isa_name(isa);
                /* batch sizes 1..9, 64; threads 1, 2, 3 */
                int64_t nxs[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 64};
                for (size_t ni = 0; ni < sizeof(nxs) / sizeof(nxs[0]); ni++) {
                    int64_t nx = nxs[ni];
                    for (int pi = 0; pi < 4; pi++) {
                        /* every thread count (and no pool) for a few batch
                         * sizes, one rotating choice for the others; the
                         * scalar path, slow, only a few */
                        int all = nx == 1 || nx == 3 || nx == 7 || nx == 64;
                        if (!all && pi != (int)(nx % 4))
                            continue;
                        if (isa == K_ISA_SCALAR &&
                            !((nx == 1 && pi == 2) || (nx == 7 && pi == 3) ||
                              (nx == 64 && pi == 2)))
                            continue;
                        /* start at row 64 - nx: a batch is any slice */
                        int64_t r0 = 64 - nx;
                        float *y = mm_run(pools[pi], &c, c.x + r0 * c.cols, nx);
                        int ok = 1;
                        for (int64_t r = 0; r < nx; r++)
                            ok &= rows_equal(&c, y, r, ref, r0 + r);
                        CHECK(ok, "%s %s %lldx%lld n_x=%lld pool=%d: differs "
                              "from scalar n_x=64",
                              in, k_dtype_name(t), (long long)c.rows,
                              (long long)c.cols, (long long)nx, pi);
                        /* stride padding untouched */
                        int pad_ok = 1;
                        for (int64_t r = 0; r < nx; r++)
                            for (int64_t o = c.rows; o < ys; o++)
                                pad_ok &= y[r * ys + o] != y[r * ys + o];
                        CHECK(pad_ok, "%s wrote past rows", in);
                        free(y);
                    }
                }
            }
            free(ref);
            mm_free(&c);
        }
    }
    for (int i = 0; i < 4; i++)
        k_pool_destroy(pools[i]);
    k_isa_select(K_ISA_AVX512);
}

/* The same product with W packed (k_matrix_pack) first. */
static float *mm_run_packed(struct k_pool *pool, const struct mm_case *c,
                            const float *x, int64_t n_x)
{
    struct k_matrix W = {c->t, c->rows, c->cols, c->w, K_LAYOUT_ROWS}, P;
    size_t pb = k_matrix_packed_bytes(&W);
    CHECK(pb > 0, "%s has no packed layout", k_dtype_name(c->t));
    void *buf = xalloc(pb);
    CHECK(k_matrix_pack(pool, &W, buf, &P) == 0, "k_matrix_pack failed");
    CHECK(P.layout == K_LAYOUT_X32 && P.data == buf && P.rows == c->rows,
          "packed matrix fields");
    size_t sb = k_matmul_scratch(&P, n_x);
    void *scratch = sb ? xalloc(sb) : NULL;
    int64_t ys = c->rows + 3;
    float *y = xalloc((size_t)(n_x * ys) * 4);
    for (int64_t i = 0; i < n_x * ys; i++)
        y[i] = NAN;
    k_matmul(pool, &P, x, c->cols, n_x, y, ys, scratch);
    free(scratch);
    free(buf);
    return y;
}

/* K_LAYOUT_X32: which dtypes have it, that it reads back to the same
 * weights, and that every path gives the row layout's bits from it, on
 * row counts that do and do not fill the last group of 16. */
static void test_matmul_packed(void)
{
    for (size_t ti = 0; ti < sizeof(all_dtypes) / sizeof(all_dtypes[0]); ti++) {
        enum k_dtype t = all_dtypes[ti];
        int64_t cols = k_dtype_block(t) == 1 ? 16 : k_dtype_block(t);
        struct k_matrix W = {t, 4, cols, NULL, K_LAYOUT_ROWS}, P;
        char buf[64];
        int has = t == K_Q4_K || t == K_Q8_0;
        CHECK((k_matrix_packed_bytes(&W) > 0) == has, "%s: packed bytes %zu",
              k_dtype_name(t), k_matrix_packed_bytes(&W));
        if (!has)
            CHECK(k_matrix_pack(NULL, &W, buf, &P) == -1,
                  "%s: k_matrix_pack accepted a dtype without a packed layout",
                  k_dtype_name(t));
    }
    struct k_matrix Wq = {K_Q4_K, 17, 512, NULL, K_LAYOUT_ROWS};
    CHECK(k_matrix_packed_bytes(&Wq) == 1 * 2 * 4608, "Q4_K 17x512 packed bytes %zu",
          k_matrix_packed_bytes(&Wq));
    struct k_matrix W8 = {K_Q8_0, 33, 160, NULL, K_LAYOUT_ROWS};
    CHECK(k_matrix_packed_bytes(&W8) == 2 * 8 * 1088, "Q8_0 33x160 packed bytes %zu",
          k_matrix_packed_bytes(&W8));
    enum k_isa best = k_isa_select(K_ISA_AVX512);
    CHECK(k_matrix_pack_wanted(&Wq) == (best == K_ISA_AVX512),
          "pack wanted on %s", k_isa_name(best));

    struct k_pool *pools[3] = {NULL, k_pool_create(2), k_pool_create(3)};
    struct {
        enum k_dtype t;
        int64_t rows, cols;
    } shapes[] = {{K_Q4_K, 1, 256},   {K_Q4_K, 5, 512},    {K_Q4_K, 16, 256},
                  {K_Q4_K, 19, 768},  {K_Q4_K, 48, 512},   {K_Q4_K, 130, 2304},
                  {K_Q8_0, 1, 32},    {K_Q8_0, 7, 96},     {K_Q8_0, 32, 128},
                  {K_Q8_0, 33, 160},  {K_Q8_0, 70, 224},   {K_Q8_0, 130, 1056}};
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        enum k_dtype t = shapes[si].t;
        struct mm_case c = mm_make(t, shapes[si].rows, shapes[si].cols, 64);
        /* the packed rows read back as the same weights */
        struct k_matrix W = {t, c.rows, c.cols, c.w, K_LAYOUT_ROWS}, P;
        void *pbuf = xalloc(k_matrix_packed_bytes(&W));
        k_matrix_pack(pools[1], &W, pbuf, &P);
        float *a = xalloc((size_t)c.cols * 4), *b = xalloc((size_t)c.cols * 4);
        int same = 1;
        for (int64_t o = 0; o < c.rows; o++) {
            k_dequant_row(&W, o, a);
            k_dequant_row(&P, o, b);
            same &= same_bits(a, b, c.cols);
        }
        CHECK(same, "%s %lldx%lld: packed rows dequantize differently",
              k_dtype_name(t), (long long)c.rows, (long long)c.cols);
        free(a);
        free(b);
        free(pbuf);

        k_isa_select(K_ISA_SCALAR);
        float *ref = mm_run(NULL, &c, c.x, 64);
        for (int ii = 0; ii < n_isas; ii++) {
            k_isa_select(isas[ii]);
            int64_t nxs[] = {1, 2, 3, 4, 5, 9, 64};
            for (size_t ni = 0; ni < sizeof(nxs) / sizeof(nxs[0]); ni++) {
                int64_t nx = nxs[ni];
                if (isas[ii] == K_ISA_SCALAR && nx != 3 && nx != 64)
                    continue;
                struct k_pool *pool = pools[nx % 3];
                int64_t r0 = 64 - nx;
                float *y = mm_run_packed(pool, &c, c.x + r0 * c.cols, nx);
                int ok = 1, pad_ok = 1;
                for (int64_t r = 0; r < nx; r++) {
                    ok &= rows_equal(&c, y, r, ref, r0 + r);
                    for (int64_t o = c.rows; o < c.rows + 3; o++)
                        pad_ok &= y[r * (c.rows + 3) + o] != y[r * (c.rows + 3) + o];
                }
                CHECK(ok, "%s packed %s %lldx%lld n_x=%lld: differs from "
                      "the row layout", k_isa_name(isas[ii]), k_dtype_name(t),
                      (long long)c.rows, (long long)c.cols, (long long)nx);
                CHECK(pad_ok, "%s packed %s wrote past rows", k_isa_name(isas[ii]),
                      k_dtype_name(t));
                free(y);
            }
        }
        free(ref);
        mm_free(&c);
    }
    for (int i = 0; i < 3; i++)
        k_pool_destroy(pools[i]);
    k_isa_select(best);
}

/* Bigger shapes on the fastest path only: batch invariance across n_x and
 * threads where the tiles and the chunking really differ. */
static void test_matmul_large(void)
{
    struct k_pool *p2 = k_pool_create(2), *p3 = k_pool_create(3);
    enum k_isa best = k_isa_select(K_ISA_AVX512);
    for (size_t ti = 0; ti < sizeof(all_dtypes) / sizeof(all_dtypes[0]); ti++) {
        enum k_dtype t = all_dtypes[ti];
        int64_t cols = k_dtype_block(t) == 1 ? 1024 + 5 : 1024 * 2;
        if (t == K_Q8_0)
            cols = 1024 + 32 * 3;
        struct mm_case c = mm_make(t, 300, cols, 100);
        float *full = mm_run(p3, &c, c.x, 100);
        check_accuracy(&c, full, 100, k_isa_name(best));
        if (is_quant(t))
            check_exact_int8(&c, full, 100, k_isa_name(best));
        int ok = 1;
        for (int64_t r = 0; r < 100; r += 9) {
            float *one = mm_run(p2, &c, c.x + r * cols, 1);
            ok &= rows_equal(&c, one, 0, full, r);
            free(one);
        }
        float *part = mm_run(p2, &c, c.x + 13 * cols, 37);
        for (int64_t r = 0; r < 37; r++)
            ok &= rows_equal(&c, part, r, full, 13 + r);
        free(part);
        CHECK(ok, "%s %s: batch slices differ from the full batch",
              k_isa_name(best), k_dtype_name(t));
        if (n_isas > 1) {
            k_isa_select(isas[n_isas - 2]);
            float *lower = mm_run(p2, &c, c.x, 100);
            CHECK(same_bits(lower, full, 100 * (c.rows + 3) - 3),
                  "%s vs %s %s: large shape differs",
                  k_isa_name(isas[n_isas - 2]), k_isa_name(best),
                  k_dtype_name(t));
            free(lower);
            k_isa_select(best);
        }
        free(full);
        mm_free(&c);
    }
    k_pool_destroy(p2);
    k_pool_destroy(p3);
}

/* ------------------------------------------------------------ vector ops */

static void test_expf(void)
{
    /* against libm over the range silu and softmax use */
    double worst = 0;
    for (int i = 0; i <= 2000000; i++) {
        float x = -87.0f + 175.0f * (float)i / 2000000.0f;
        if (x > 88.3f)
            break;
        double ref = exp((double)x);
        double got = k_expf(x);
        double ulp = ldexp(1.0, ilogb(ref) - 23);
        worst = fmax(worst, fabs(got - ref) / ulp);
    }
    printf("k_expf: worst error %.2f ulp on [-87, 88.3]\n", worst);
    CHECK(worst < 2.5, "k_expf error %.2f ulp", worst);
    CHECK(k_expf(0.0f) == 1.0f, "exp(0)");
    CHECK(k_expf(-100.0f) == 0.0f, "underflow");
    CHECK(isinf(k_expf(100.0f)), "overflow");
    CHECK(isfinite(k_expf(88.37f)), "near the top");
}

/* k_dot_rows_f32 / k_axpy_rows_f32 give the bits of their loops of
 * k_dot_f32 / k_axpy_f32, on every path, for row lengths around the
 * vector widths and strides wider than a row (as attention's are). */
static void test_vec_rows(void)
{
    int64_t ns[] = {1, 7, 16, 32, 33, 64, 65, 96, 128, 200};
    int64_t counts[] = {0, 1, 5, 16};
    for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++)
        for (size_t ci = 0; ci < sizeof(counts) / sizeof(counts[0]); ci++) {
            int64_t n = ns[ni], cnt = counts[ci], stride = 3 * n + 5;
            float *q = xalloc((size_t)n * 4), *kv = xalloc((size_t)(stride * 16 + n) * 4);
            float *w = xalloc(16 * 4), *y0 = xalloc((size_t)n * 4), *y1 = xalloc((size_t)n * 4);
            float d0[16], d1[16];
            /* its own generator: the shared one's sequence feeds the
             * matmul cases, whose data must not move with this test */
            uint32_t st = 12345u + (uint32_t)(n * 31 + cnt);
            for (int64_t i = 0; i < stride * 16 + n; i++) {
                st = st * 1664525u + 1013904223u;
                kv[i] = (float)(st >> 8) / 16777216.0f - 0.5f;
                if (i < n)
                    q[i] = 2.0f * kv[i];
            }
            for (int t = 0; t < 16; t++)
                w[t] = 0.5f + kv[t * stride + 1];
            for (int ii = 0; ii < n_isas; ii++) {
                k_isa_select(isas[ii]);
                for (int64_t i = 0; i < n; i++)
                    y0[i] = y1[i] = 0.25f * q[i];
                for (int64_t t = 0; t < cnt; t++) {
                    d0[t] = k_dot_f32(q, kv + t * stride, n);
                    k_axpy_f32(y0, w[t], kv + t * stride, n);
                }
                k_dot_rows_f32(q, kv, stride, cnt, n, d1);
                k_axpy_rows_f32(y1, w, kv, stride, cnt, n);
                CHECK(same_bits(d0, d1, cnt), "dot_rows %s n=%lld count=%lld",
                      k_isa_name(isas[ii]), (long long)n, (long long)cnt);
                CHECK(same_bits(y0, y1, n), "axpy_rows %s n=%lld count=%lld",
                      k_isa_name(isas[ii]), (long long)n, (long long)cnt);
            }
            free(q);
            free(kv);
            free(w);
            free(y0);
            free(y1);
        }
    k_isa_select(K_ISA_AVX512);
}

static void test_vec(void)
{
    int64_t ns[] = {0, 1, 3, 15, 16, 17, 31, 33, 64, 100, 255, 1000, 4096, 4099};
    for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++) {
        int64_t n = ns[ni];
        size_t sz = (size_t)(n + 1) * 4;
        float *a = xalloc(sz), *b = xalloc(sz), *w = xalloc(sz);
        for (int64_t i = 0; i < n; i++) {
            a[i] = rnd_gauss() * 4.0f;
            b[i] = rnd_gauss();
            w[i] = 1.0f + 0.1f * rnd_gauss();
        }
        /* reference results on the scalar path */
        float dots[3] = {0}, *ax[3] = {0}, *rn[3] = {0}, *sm[3] = {0}, *sf[3] = {0};
        for (int ii = 0; ii < n_isas; ii++) {
            k_isa_select(isas[ii]);
            dots[ii] = k_dot_f32(a, b, n);
            ax[ii] = xalloc(sz);
            memcpy(ax[ii], b, (size_t)n * 4);
            k_axpy_f32(ax[ii], 0.37f, a, n);
            rn[ii] = xalloc(sz);
            if (n)
                k_rmsnorm(rn[ii], a, w, n, 1e-6f);
            sm[ii] = xalloc(sz);
            k_silu_mul(sm[ii], a, b, n);
            sf[ii] = xalloc(sz);
            memcpy(sf[ii], a, (size_t)n * 4);
            if (n)
                k_softmax_f32(sf[ii], n);
        }
        for (int ii = 1; ii < n_isas; ii++) {
            const char *in = k_isa_name(isas[ii]);
            CHECK(fbits(dots[ii]) == fbits(dots[0]), "dot %s n=%lld", in, (long long)n);
            CHECK(same_bits(ax[ii], ax[0], n), "axpy %s n=%lld", in, (long long)n);
            CHECK(same_bits(rn[ii], rn[0], n), "rmsnorm %s n=%lld", in, (long long)n);
            CHECK(same_bits(sm[ii], sm[0], n), "silu_mul %s n=%lld", in, (long long)n);
            CHECK(same_bits(sf[ii], sf[0], n), "softmax %s n=%lld", in, (long long)n);
        }
        /* accuracy of the scalar results */
        double dref = 0, mag = 0, ss = 0, mx = -INFINITY, se = 0;
        for (int64_t i = 0; i < n; i++) {
            dref += (double)a[i] * b[i];
            mag += fabs((double)a[i] * b[i]);
            ss += (double)a[i] * a[i];
            mx = fmax(mx, a[i]);
        }
        for (int64_t i = 0; i < n; i++)
            se += exp((double)a[i] - mx);
        CHECK(fabs(dots[0] - dref) <= 1e-6 * mag + 1e-30, "dot n=%lld", (long long)n);
        double r = n ? 1.0 / sqrt(ss / (double)n + 1e-6) : 0;
        int bad = 0;
        for (int64_t i = 0; i < n; i++) {
            double v = fma(0.37, (double)a[i], (double)b[i]);
            bad += fabs(ax[0][i] - v) > 1e-6 * (fabs(v) + 1);
            v = a[i] * r * w[i];
            bad += fabs(rn[0][i] - v) > 1e-5 * (fabs(v) + 1e-6);
            v = (double)a[i] / (1.0 + exp(-(double)a[i])) * b[i];
            bad += fabs(sm[0][i] - v) > 1e-5 * (fabs(v) + 1e-30);
            v = exp((double)a[i] - mx) / se;
            bad += fabs(sf[0][i] - v) > 1e-5 * v + 1e-30;
        }
        CHECK(bad == 0, "vector op accuracy n=%lld: %d bad", (long long)n, bad);
        for (int ii = 0; ii < n_isas; ii++) {
            free(ax[ii]);
            free(rn[ii]);
            free(sm[ii]);
            free(sf[ii]);
        }
        free(a);
        free(b);
        free(w);
    }
    /* aliasing promised by the header: out == x, out == gate */
    float v[40], u[40], o[40];
    for (int i = 0; i < 40; i++) {
        v[i] = rnd_gauss();
        u[i] = rnd_gauss();
    }
    float wv[40];
    for (int i = 0; i < 40; i++)
        wv[i] = 1.0f;
    k_rmsnorm(o, v, wv, 40, 1e-5f);
    k_rmsnorm(v, v, wv, 40, 1e-5f);
    CHECK(same_bits(o, v, 40), "rmsnorm in place");
    k_silu_mul(o, v, u, 40);
    k_silu_mul(v, v, u, 40);
    CHECK(same_bits(o, v, 40), "silu_mul in place");
    k_isa_select(K_ISA_AVX512);
}

int main(void)
{
    find_isas();
    printf("paths on this CPU:");
    for (int i = 0; i < n_isas; i++)
        printf(" %s", k_isa_name(isas[i]));
    printf(" (detected: %s)\n", k_isa_name(k_isa_detect()));
    struct {
        const char *name;
        void (*fn)(void);
    } tests[] = {
        {"f16", test_f16},         {"bf16", test_bf16},
        {"row_bytes", test_row_bytes}, {"pool", test_pool},
        {"dequant", test_dequant}, {"expf", test_expf},
        {"vec", test_vec},         {"vec_rows", test_vec_rows},
        {"matmul", test_matmul},
        {"matmul_large", test_matmul_large},
        {"matmul_packed", test_matmul_packed},
    };
    for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
        double t0 = now_s();
        tests[i].fn();
        printf("%-13s %.2f s\n", tests[i].name, now_s() - t0);
    }
    if (failures) {
        fprintf(stderr, "test_kernels: %d failures\n", failures);
        return 1;
    }
    printf("test_kernels: all passed\n");
    return 0;
}
