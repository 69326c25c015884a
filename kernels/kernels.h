/* kernels.h: the one public header of the math kernels.
 *
 * The engine calls these to run a model step. Everything here works on
 * plain host memory; the CPU implementation lives in kernels/cpu/ and picks
 * its SIMD path (AVX-512+VNNI, AVX2+FMA+F16C, scalar) once at run time.
 * All SIMD paths give bit-identical results: each output is reduced in one
 * canonical order, whatever the path, the batch size or the thread count,
 * which is what makes a request's tokens independent of its batch.
 *
 * Threads: k_pool is the CPU worker pool. One thread (the engine thread)
 * calls the kernels; they fan the work out over the pool and return when
 * it is done.
 */
#ifndef INFERD_KERNELS_H
#define INFERD_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- dtypes */

/* Element types of weight tensors. Quantized types are stored in blocks
 * along the innermost (row) dimension, with the same byte layout as GGUF so
 * that a mapped file is used in place. */
enum k_dtype {
    K_F32 = 0,
    K_F16,
    K_BF16,
    K_Q8_0, /* blocks of 32: f16 scale, 32 x int8 (34 bytes) */
    K_Q4_K, /* blocks of 256: f16 d, f16 dmin, 12 B scales, 128 B quants (144 bytes) */
    K_Q6_K, /* blocks of 256: 128 B ql, 64 B qh, 16 x int8 scales, f16 d (210 bytes) */
    K_DTYPE_COUNT
};

/* Name as printed by `inferd inspect` ("f32", "q8_0", ...). */
const char *k_dtype_name(enum k_dtype t);
/* Elements per block (1 for the float types). */
int64_t k_dtype_block(enum k_dtype t);
/* Bytes per block. */
int64_t k_dtype_block_bytes(enum k_dtype t);
/* Bytes of a row of n elements; -1 when n is not a multiple of the block
 * size or the size overflows. */
int64_t k_row_bytes(enum k_dtype t, int64_t n);

/* IEEE half and bfloat16 conversions (round to nearest even). */
float k_f16_to_f32(uint16_t h);
uint16_t k_f32_to_f16(float f);
float k_bf16_to_f32(uint16_t h);
uint16_t k_f32_to_bf16(float f);

/* ------------------------------------------------------------ SIMD level */

enum k_isa { K_ISA_SCALAR = 0, K_ISA_AVX2, K_ISA_AVX512 };

/* The best ISA this CPU supports, or the one forced by the environment
 * variable INFERD_ISA=scalar|avx2|avx512 (never above what the CPU has). */
enum k_isa k_isa_detect(void);
const char *k_isa_name(enum k_isa isa);
/* The path the kernels use: k_isa_detect() until k_isa_select() is called. */
enum k_isa k_isa_active(void);
/* Forces the path of all later kernel calls (clamped to what the CPU has)
 * and returns the one in effect. For tests and benchmarks: call it while
 * no kernel runs. */
enum k_isa k_isa_select(enum k_isa want);

/* ----------------------------------------------------------- thread pool */

struct k_pool;

/* Starts n_threads - 1 workers (the calling thread is the n-th). n_threads
 * <= 0 means one per online CPU. Returns NULL on failure. */
struct k_pool *k_pool_create(int n_threads);
/* Joins the workers. Accepts NULL. */
void k_pool_destroy(struct k_pool *p);
int k_pool_size(const struct k_pool *p);

/* Runs fn(ctx, i, n_threads) on every thread, i = 0..n_threads-1, and
 * returns when all have returned. Not reentrant; call from one thread. */
typedef void (*k_pool_fn)(void *ctx, int ith, int nth);
void k_pool_run(struct k_pool *p, k_pool_fn fn, void *ctx);

/* ---------------------------------------------------------------- matmul */

/* How a weight matrix's bytes are laid out.
 *   K_LAYOUT_ROWS: row-major, each row k_row_bytes(dtype, cols) bytes, the
 *     blocks exactly as in the GGUF file (a mapped file is used in place).
 *   K_LAYOUT_X32: the kernels' own layout, made by k_matrix_pack: rows
 *     taken 32 at a time and interleaved so that one vector instruction
 *     works on 16 or 32 rows (kernels/cpu/kcpu.h has the byte layout).
 *     Same size as the row layout, up to padding of the last 32 rows. */
enum k_layout { K_LAYOUT_ROWS = 0, K_LAYOUT_X32 };

/* A weight matrix: rows rows of cols elements of dtype. data is borrowed
 * (usually mmapped, or a k_matrix_pack buffer) and may be unaligned for
 * the float types in the row layout. A zero layout is K_LAYOUT_ROWS. */
struct k_matrix {
    enum k_dtype dtype;
    int64_t rows; /* output features */
    int64_t cols; /* input features (row length) */
    const void *data;
    enum k_layout layout;
};

/* Bytes k_matrix_pack needs for W (row layout), or 0 when W's dtype has no
 * packed layout (Q4_K and Q8_0 have one). */
size_t k_matrix_packed_bytes(const struct k_matrix *W);
/* Whether the active kernel path runs W faster packed (k_matrix_pack):
 * true for Q4_K and Q8_0 on AVX-512 VNNI. Every path accepts both layouts and gives
 * the same bits for both; this only says which is faster. */
int k_matrix_pack_wanted(const struct k_matrix *W);
/* Writes W (row layout) into dst in K_LAYOUT_X32 and sets *out to the
 * packed matrix, which borrows dst. dst: k_matrix_packed_bytes(W) bytes,
 * 64-byte aligned, owned by the caller and kept while *out is used. pool
 * may be NULL (the calling thread does it all). Returns 0, or -1 when W
 * has no packed layout. */
int k_matrix_pack(struct k_pool *pool, const struct k_matrix *W, void *dst,
                  struct k_matrix *out);

/* y[r][o] = sum_i W[o][i] * x[r][i] for r < n_x, o < W->rows.
 * x: (n_x, W->cols) f32, row stride x_stride floats.
 * y: (n_x, W->rows) f32, row stride y_stride floats.
 * Quantized weights are multiplied against x quantized per row to int8
 * (the same way for every batch size). scratch: at least
 * k_matmul_scratch(W, n_x) bytes, 64-byte aligned, owned by the caller.
 * Batch invariant: y[r] depends only on x[r] and W.
 * The scratch size is 0 for the float types (scratch may then be NULL).
 * pool may be NULL: the calling thread does all the work. The pool keeps
 * per-thread work buffers that grow on first use (out of memory aborts).
 * Any batch can be split into k_matmul calls of any sizes with the same
 * bits as the result. */
size_t k_matmul_scratch(const struct k_matrix *W, int64_t n_x);
void k_matmul(struct k_pool *pool, const struct k_matrix *W, const float *x,
              int64_t x_stride, int64_t n_x, float *y, int64_t y_stride,
              void *scratch);

/* Converts row `row` of W to f32 (for embedding lookups). out: W->cols. */
void k_dequant_row(const struct k_matrix *W, int64_t row, float *out);

/* ------------------------------------------------------------ vector ops
 *
 * Single-threaded, on the calling thread. Reductions use the canonical
 * order of the matmul (16 fmaf partial sums by index mod 16, then a fixed
 * tree), elementwise ops the same float expression on every path, so the
 * results are bit-identical across SIMD paths. n may be any size >= 0;
 * pointers need no alignment. */

/* sum_i a[i] * b[i]. */
float k_dot_f32(const float *a, const float *b, int64_t n);
/* y[i] += a * x[i], as fmaf(a, x[i], y[i]). */
void k_axpy_f32(float *y, float a, const float *x, int64_t n);
/* Attention's loops in one call each, with the same bits as the loops:
 * out[t] = k_dot_f32(a, b + t * stride, n) for t < count, and
 * k_axpy_f32(y, w[t], x + t * stride, n) for t = 0, 1, .., count - 1. */
void k_dot_rows_f32(const float *a, const float *b, int64_t stride,
                    int64_t count, int64_t n, float *out);
void k_axpy_rows_f32(float *y, const float *w, const float *x, int64_t stride,
                     int64_t count, int64_t n);
/* out[i] = (x[i] * r) * w[i], r = 1 / sqrtf(sum(x^2) / n + eps).
 * out may alias x. */
void k_rmsnorm(float *out, const float *x, const float *w, int64_t n,
               float eps);
/* out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)).
 * out may alias gate or up. */
void k_silu_mul(float *out, const float *gate, const float *up, int64_t n);
/* In place: x[i] = exp(x[i] - max) / sum_j exp(x[j] - max). n >= 1. */
void k_softmax_f32(float *x, int64_t n);
/* The kernels' exp (about 1 ulp; 0 below -87.3, +inf above 88.37): the
 * same function silu and softmax use, for callers that must agree. */
float k_expf(float x);


/* ------------------------------------------------------------- ceilings */

/* Measured on the pool, for benchmarks to print ratios against: streaming
 * read bandwidth over a buffer of `bytes` (bytes/s), peak f32
 * FMA rate (FLOP/s, 0 on the scalar path), peak int8 dot-product rate
 * (ops/s counting multiply and add, 0 without AVX512-VNNI). */
double k_probe_bandwidth(struct k_pool *pool, size_t bytes);
double k_probe_f32_flops(struct k_pool *pool);
double k_probe_int8_ops(struct k_pool *pool);

/* ------------------------------------------------------------------ CUDA */

/* Builds with the CUDA toolkit (INFERD_CUDA) also have the GPU kernels
 * and the runtime calls a backend needs, all C, no CUDA header: see
 * kernels/cuda/kcuda.h, reached through this one header. */
#ifdef INFERD_CUDA
#include "kernels/cuda/kcuda.h"
#endif

#endif
