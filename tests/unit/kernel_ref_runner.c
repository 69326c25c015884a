/* kernel_ref_runner.c: a small CLI over the CPU kernels for reference
 * tests written in other languages (tests/integration/test_kernels_ref.py).
 *
 *   kernel_ref_runner DTYPE ROWS COLS weights.bin x.bin NX out.bin
 *
 * weights.bin: ROWS rows of COLS elements of DTYPE (f32, f16, bf16, q8_0,
 * q4_k, q6_k) in GGUF's byte layout; x.bin: NX * COLS f32. out.bin gets
 * ROWS * COLS f32 (k_dequant_row of every row) followed by NX * ROWS f32
 * (k_matmul). INFERD_ISA picks the path; INFERD_THREADS the pool size
 * (default 2). Exit 0 on success, 2 on bad arguments or files.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"

static void *read_file(const char *path, size_t want)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "kernel_ref_runner: cannot open %s\n", path);
        return NULL;
    }
    void *p = aligned_alloc(64, (want + 63) & ~(size_t)63);
    size_t got = p ? fread(p, 1, want, f) : 0;
    int extra = fgetc(f) != EOF;
    fclose(f);
    if (!p || got != want || extra) {
        fprintf(stderr, "kernel_ref_runner: %s: want exactly %zu bytes\n",
                path, want);
        free(p);
        return NULL;
    }
    return p;
}

int main(int argc, char **argv)
{
    if (argc != 8) {
        fprintf(stderr, "usage: %s DTYPE ROWS COLS weights.bin x.bin NX out.bin\n",
                argv[0]);
        return 2;
    }
    int dt = -1;
    for (int t = 0; t < K_DTYPE_COUNT; t++)
        if (!strcmp(argv[1], k_dtype_name((enum k_dtype)t)))
            dt = t;
    long long rows = atoll(argv[2]), cols = atoll(argv[3]), nx = atoll(argv[6]);
    int64_t rb = dt < 0 ? -1 : k_row_bytes((enum k_dtype)dt, cols);
    if (dt < 0 || rows <= 0 || cols <= 0 || nx <= 0 || rb < 0) {
        fprintf(stderr, "kernel_ref_runner: bad dtype or shape\n");
        return 2;
    }
    const char *th = getenv("INFERD_THREADS");
    int n_threads = th ? atoi(th) : 2;

    void *w = read_file(argv[4], (size_t)(rows * rb));
    float *x = read_file(argv[5], (size_t)(nx * cols) * 4);
    if (!w || !x)
        return 2;
    struct k_matrix W = {(enum k_dtype)dt, rows, cols, w, K_LAYOUT_ROWS};
    size_t out_n = (size_t)(rows * cols + nx * rows);
    float *out = malloc(out_n * 4);
    size_t sb = k_matmul_scratch(&W, nx);
    void *scratch = sb ? aligned_alloc(64, (sb + 63) & ~(size_t)63) : NULL;
    struct k_pool *pool = k_pool_create(n_threads);
    if (!out || (sb && !scratch) || !pool) {
        fprintf(stderr, "kernel_ref_runner: out of memory\n");
        return 2;
    }
    for (int64_t r = 0; r < rows; r++)
        k_dequant_row(&W, r, out + r * cols);
    k_matmul(pool, &W, x, cols, nx, out + rows * cols, rows, scratch);

    FILE *f = fopen(argv[7], "wb");
    if (!f || fwrite(out, 4, out_n, f) != out_n || fclose(f)) {
        fprintf(stderr, "kernel_ref_runner: cannot write %s\n", argv[7]);
        return 2;
    }
    fprintf(stderr, "kernel_ref_runner: %s %lldx%lld nx=%lld on %s, %d threads\n",
            argv[1], rows, cols, nx, k_isa_name(k_isa_active()), n_threads);
    k_pool_destroy(pool);
    free(scratch);
    free(out);
    free(x);
    free(w);
    return 0;
}
