/* bench_kernels.c: the CPU kernels against the machine's ceilings.
 * Measures the memory read bandwidth (1 GiB streamed by every thread of
 * the pool) and the peak f32 FMA and int8 VNNI rates, then k_matmul:
 * GEMV (n_x = 1) in GB/s of weights read, from DRAM (cycling through 1 GiB
 * of weight copies, as a model's layers do) and from cache (one matrix),
 * and GEMM (n_x = 64) in GFLOP/s, each printed as a ratio to its ceiling.
 *
 *   bench_kernels [threads (default 2)] [rows cols (default 4096 4096)]
 *
 * INFERD_ISA selects the path; INFERD_BENCH_HUGEPAGES=1 puts the weights
 * on 2 MB pages; INFERD_BENCH_DTYPES=q4_k,q8_0 limits the dtypes. Built, not run by `meson test`. The ceilings are measured
 * in the same run: on a shared VM they move from run to run, and so do
 * the ratios.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "kernels/kernels.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *xalloc(size_t n)
{
    void *p = aligned_alloc(64, (n + 63) & ~(size_t)63);
    if (!p) {
        fprintf(stderr, "bench_kernels: out of memory (%zu bytes)\n", n);
        exit(2);
    }
    return p;
}

static uint64_t rng = 88172645463325252ull;
static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static float rnd_f(void)
{
    return ((float)(rnd() >> 40) / 16777216.0f - 0.5f) * 2.0f;
}

/* -------------------------------------------------------------- matmul */

static void fill_weights(enum k_dtype t, uint8_t *w, int64_t rows, int64_t cols)
{
    int64_t rb = k_row_bytes(t, cols);
    for (int64_t r = 0; r < rows; r++) {
        uint8_t *row = w + r * rb;
        for (int64_t i = 0; i < rb; i++)
            row[i] = (uint8_t)rnd();
        /* keep every float and scale normal: denormals would bench the
         * microcode, not the kernel */
        int64_t B = k_dtype_block(t), BB = k_dtype_block_bytes(t);
        for (int64_t b = 0; b < cols / B; b++) {
            uint8_t *blk = row + b * BB;
            uint16_t h = k_f32_to_f16(0.001f + 0.001f * (float)(rnd() % 8));
            switch (t) {
            case K_F32: {
                float f = rnd_f();
                memcpy(blk, &f, 4);
                break;
            }
            case K_F16:
                h = k_f32_to_f16(rnd_f());
                memcpy(blk, &h, 2);
                break;
            case K_BF16:
                h = k_f32_to_bf16(rnd_f());
                memcpy(blk, &h, 2);
                break;
            case K_Q8_0:
                memcpy(blk, &h, 2);
                break;
            case K_Q4_K:
                memcpy(blk, &h, 2);
                memcpy(blk + 2, &h, 2);
                break;
            case K_Q6_K:
                memcpy(blk + 208, &h, 2);
                break;
            default:
                break;
            }
        }
    }
}

/* Batch sizes of the decode table: a step of a few sequences. */
static const int64_t decode_nx[] = {1, 2, 4, 8};
#define N_DECODE 4

struct result {
    double gemv_cold, gemv_hot, gemm;
    double decode_us[N_DECODE]; /* from DRAM, per k_matmul */
};

static double time_matmul(struct k_pool *pool, const struct k_matrix *W,
                          const float *x, int64_t nx, float *y, void *scratch,
                          int reps)
{
    double best = 1e30;
    for (int i = 0; i < reps; i++) {
        double t = now_s();
        k_matmul(pool, W, x, W->cols, nx, y, W->rows, scratch);
        t = now_s() - t;
        best = t < best ? t : best;
    }
    return best;
}

static struct result bench_dtype(struct k_pool *pool, enum k_dtype t,
                                 enum k_layout layout, int64_t rows,
                                 int64_t cols, uint8_t *big, size_t big_bytes,
                                 const float *x, float *y, void *scratch)
{
    struct result r;
    int64_t rb = k_row_bytes(t, cols);
    size_t mat = (size_t)(rows * rb);
    if (layout == K_LAYOUT_X32) {
        /* the row layout made aside, then packed as model_load does */
        uint8_t *tmp = xalloc(mat);
        fill_weights(t, tmp, rows, cols);
        struct k_matrix W0 = {t, rows, cols, tmp, K_LAYOUT_ROWS}, P;
        mat = k_matrix_packed_bytes(&W0);
        k_matrix_pack(pool, &W0, big, &P);
        free(tmp);
    } else {
        fill_weights(t, big, rows, cols);
    }
    size_t mat_pad = (mat + 4095) & ~(size_t)4095;
    int copies = (int)(big_bytes / mat_pad);
    if (copies < 1)
        copies = 1;
    for (int c = 1; c < copies; c++)
        memcpy(big + (size_t)c * mat_pad, big, mat);

    /* From DRAM: each call reads a different copy, as the layers of a
     * model do; n_x = 1 is the GEMV, the others a decode batch */
    int calls = copies * 2 < 64 ? 64 : copies * 2;
    struct k_matrix W = {t, rows, cols, big, layout};
    k_matmul(pool, &W, x, cols, 1, y, rows, scratch); /* warm up */
    for (int d = 0; d < N_DECODE; d++) {
        double best = 1e30;
        for (int rep = 0; rep < 3; rep++) {
            double t0 = now_s();
            for (int i = 0; i < calls; i++) {
                W.data = big + (size_t)(i % copies) * mat_pad;
                k_matmul(pool, &W, x, cols, decode_nx[d], y, rows, scratch);
            }
            double per = (now_s() - t0) / calls;
            best = per < best ? per : best;
        }
        r.decode_us[d] = best * 1e6;
    }
    r.gemv_cold = (double)mat / (r.decode_us[0] * 1e-6) / 1e9;
    /* GEMV from cache: one matrix over and over */
    W.data = big;
    double tt = time_matmul(pool, &W, x, 1, y, scratch, 200);
    r.gemv_hot = (double)mat / tt / 1e9;
    /* GEMM, 64 activation rows */
    tt = time_matmul(pool, &W, x, 64, y, scratch, 5);
    r.gemm = 2.0 * (double)rows * (double)cols * 64 / tt / 1e9;
    return r;
}

static void nop_fn(void *ctx, int ith, int nth)
{
    (void)ctx;
    (void)ith;
    (void)nth;
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    int64_t rows = argc > 3 ? atoll(argv[2]) : 4096;
    int64_t cols = argc > 3 ? atoll(argv[3]) : 4096;
    struct k_pool *pool = k_pool_create(threads);
    if (!pool)
        return 2;
    printf("bench_kernels: %d threads, path %s, matrix %lldx%lld\n", threads,
           k_isa_name(k_isa_active()), (long long)rows, (long long)cols);

    /* ceilings */
    size_t big_bytes = (size_t)1 << 30;
    uint8_t *big = aligned_alloc((size_t)2 << 20, big_bytes);
    if (!big)
        return 2;
    /* 2 MB pages make the int8 GEMVs 5-20% faster here (fewer page walks
     * across 8-16 rows in flight); off by default, as a mapped file gets */
    const char *hp = getenv("INFERD_BENCH_HUGEPAGES");
    if (hp && *hp == '1') {
        madvise(big, big_bytes, MADV_HUGEPAGE);
        printf("weights and stream buffer on 2 MB pages (madvise)\n");
    }
    for (size_t i = 0; i < big_bytes; i += 8)
        *(uint64_t *)(big + i) = i;
    /* The same probes `inferd bench engine` prints its ratios against. */
    double bw = k_probe_bandwidth(pool, big_bytes) / 1e9;
    printf("memory read bandwidth (1 GiB, best of 1, 4 and 8 streams per thread): %.1f GB/s\n", bw);
    double peak = k_probe_f32_flops(pool) / 1e9, peak8 = k_probe_int8_ops(pool) / 1e9;
    printf("peak f32 FMA: %.1f GFLOP/s\n", peak);
    if (peak8 > 0)
        printf("peak int8 vpdpbusd: %.1f GOP/s (2 ops per multiply-add)\n", peak8);
    double t0 = now_s();
    for (int i = 0; i < 20000; i++)
        k_pool_run(pool, nop_fn, NULL);
    printf("k_pool_run dispatch (empty task): %.2f us\n",
           (now_s() - t0) / 20000 * 1e6);

    float *x = xalloc((size_t)(64 * cols) * 4);
    float *y = xalloc((size_t)(64 * rows) * 4);
    for (int64_t i = 0; i < 64 * cols; i++)
        x[i] = rnd_f();
    size_t sb = 0;
    for (int t = 0; t < K_DTYPE_COUNT; t++) {
        struct k_matrix W = {(enum k_dtype)t, rows, cols, NULL, K_LAYOUT_ROWS};
        size_t s = k_matmul_scratch(&W, 64);
        sb = s > sb ? s : sb;
    }
    void *scratch = xalloc(sb + 64);

    printf("\n%-9s %9s %8s %12s %14s %8s %8s\n", "dtype", "GEMV GB/s",
           "of BW", "(cached)", "GEMM GFLOP/s", "of FMA", "of int8");
    /* every dtype in the row layout, then those with a packed layout
     * packed (what model_load uses when k_matrix_pack_wanted) */
    struct result res[2 * K_DTYPE_COUNT];
    char names[2 * K_DTYPE_COUNT][16];
    int n_res = 0;
    for (int v = 0; v < 2 * K_DTYPE_COUNT; v++) {
        enum k_dtype t = (enum k_dtype)(v % K_DTYPE_COUNT);
        enum k_layout lay = v < K_DTYPE_COUNT ? K_LAYOUT_ROWS : K_LAYOUT_X32;
        struct k_matrix W0 = {t, rows, cols, NULL, K_LAYOUT_ROWS};
        const char *only = getenv("INFERD_BENCH_DTYPES");
        if (only && !strstr(only, k_dtype_name(t)))
            continue;
        if (k_row_bytes(t, cols) < 0 ||
            (lay == K_LAYOUT_X32 && !k_matrix_packed_bytes(&W0)))
            continue;
        struct result r = bench_dtype(pool, t, lay, rows, cols, big, big_bytes,
                                      x, y, scratch);
        snprintf(names[n_res], sizeof(names[0]), "%s%s", k_dtype_name(t),
                 lay == K_LAYOUT_X32 ? "/x32" : "");
        res[n_res] = r;
        int q = t == K_Q8_0 || t == K_Q4_K || t == K_Q6_K;
        char i8[16] = "";
        if (q && peak8 > 0)
            snprintf(i8, sizeof(i8), "%.2f", r.gemm / peak8);
        printf("%-9s %9.1f %8.2f %12.1f %14.1f %8.2f %8s\n", names[n_res],
               r.gemv_cold, r.gemv_cold / bw, r.gemv_hot, r.gemm, r.gemm / peak, i8);
        fflush(stdout);
        n_res++;
    }
    /* the weights are read once per step whatever the batch: the ideal
     * batch time is the GEMV's */
    printf("\nbatched decode from DRAM, us per k_matmul (x the n_x=1 time):\n%-9s",
           "dtype");
    for (int d = 0; d < N_DECODE; d++)
        printf("   n_x=%-8lld", (long long)decode_nx[d]);
    printf("\n");
    for (int i = 0; i < n_res; i++) {
        printf("%-9s", names[i]);
        for (int d = 0; d < N_DECODE; d++)
            printf(" %7.0f (%.2fx)", res[i].decode_us[d],
                   res[i].decode_us[d] / res[i].decode_us[0]);
        printf("\n");
    }
    free(scratch);
    free(x);
    free(y);
    free(big);
    k_pool_destroy(pool);
    return 0;
}
