/* matmul.c: k_matmul's front end. Quantizes the activations when the
 * weights are int8 blocks, then hands out output-row chunks to the pool
 * through an atomic counter. Each output element is computed whole by one
 * thread in the canonical order (kcpu.h), so neither the split nor the
 * thread count nor the batch size changes a bit of the result.
 * Runs on the engine thread, fanning out over the pool.
 */
#include <assert.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "kernels/cpu/kcpu.h"

static int is_quant(enum k_dtype t)
{
    return t == K_Q8_0 || t == K_Q4_K || t == K_Q6_K;
}

/* A path without a kernel for the packed layout gets 32 rows at a time
 * unpacked into the row layout, at the front of its work buffer. */
static size_t unpacked_rows_bytes(const struct kc_mm *m)
{
    return (size_t)kc_align64(32 * m->w_stride);
}

static struct kc_mm unpacked_group(const struct kc_mm *m, int64_t g0, int n,
                                   uint8_t *rows)
{
    for (int64_t b = 0; b < m->xl.nb; b++) {
        uint8_t blk[32 * 144];
        int64_t bb = k_dtype_block_bytes(m->dt);
        kc_x32_unpack(m->dt, m->w, m->rows, m->xl.nb, g0, n, b, blk);
        for (int j = 0; j < n; j++)
            memcpy(rows + j * m->w_stride + bb * b, blk + bb * j, (size_t)bb);
    }
    struct kc_mm sub = *m;
    sub.layout = K_LAYOUT_ROWS;
    sub.w = rows;
    sub.rows = n;
    sub.y = m->y + g0;
    return sub;
}

static size_t mm_work(const struct kc_ops *ops, const struct kc_mm *m)
{
    if (m->layout == K_LAYOUT_ROWS || ops->x32)
        return ops->mm_work(m);
    struct kc_mm sub = *m;
    sub.layout = K_LAYOUT_ROWS;
    sub.rows = 32;
    return unpacked_rows_bytes(m) + ops->mm_work(&sub);
}

static void mm_rows(const struct kc_ops *ops, const struct kc_mm *m,
                    int64_t o0, int64_t o1, void *work)
{
    if (m->layout == K_LAYOUT_ROWS || ops->x32) {
        ops->mm_rows(m, o0, o1, work);
        return;
    }
    uint8_t *rows = work;
    void *rest = rows + unpacked_rows_bytes(m);
    for (int64_t g0 = o0; g0 < o1; g0 += 32) {
        int n = o1 - g0 < 32 ? (int)(o1 - g0) : 32;
        struct kc_mm sub = unpacked_group(m, g0, n, rows);
        ops->mm_rows(&sub, 0, n, rest);
    }
}


size_t k_matmul_scratch(const struct k_matrix *W, int64_t n_x)
{
    if (!is_quant(W->dtype) || n_x <= 0)
        return 0;
    return (size_t)(n_x * kc_xq_layout(W->dtype, W->cols).stride);
}

struct mm_job {
    const struct kc_ops *ops;
    struct kc_mm m;
    struct k_pool *pool;
    int64_t align;              /* rows are handed out in multiples */
    _Alignas(64) _Atomic int64_t next; /* first row not yet handed out */
    _Alignas(64) _Atomic int64_t next_q; /* next x row to quantize */
};

static void quant_task(void *ctx, int ith, int nth)
{
    struct mm_job *j = ctx;
    (void)ith;
    (void)nth;
    /* a few rows per grab: quantizing a row costs about a microsecond */
    const int64_t step = 4;
    for (;;) {
        int64_t r = atomic_fetch_add_explicit(&j->next_q, step,
                                              memory_order_relaxed);
        if (r >= j->m.n_x)
            break;
        int64_t e = r + step < j->m.n_x ? r + step : j->m.n_x;
        j->ops->quantize(&j->m, r, e);
    }
}

static void mm_task(void *ctx, int ith, int nth)
{
    struct mm_job *j = ctx;
    void *work = j->pool ? kc_pool_work(j->pool, ith) : NULL;
    /* Guided: each grab takes 1 / (2 nth) of the rows left, in whole
     * tiles. Long first grabs keep the weight streams long (each new
     * range is a stream the hardware prefetcher must pick up again: 8
     * equal chunks per thread decoded at 0.58-0.64 of the roofline here,
     * 2 at 0.64-0.81, guided at 0.66-0.84), and the shrinking last ones
     * keep the threads finishing together. */
    int64_t o0 = atomic_load_explicit(&j->next, memory_order_relaxed);
    while (o0 < j->m.rows) {
        int64_t n = (j->m.rows - o0) / (2 * (int64_t)nth) / j->align * j->align;
        if (n < j->align)
            n = j->align;
        if (!atomic_compare_exchange_weak_explicit(&j->next, &o0, o0 + n,
                                                   memory_order_relaxed,
                                                   memory_order_relaxed))
            continue; /* o0 now holds the current value */
        mm_rows(j->ops, &j->m, o0, o0 + n < j->m.rows ? o0 + n : j->m.rows, work);
        o0 = atomic_load_explicit(&j->next, memory_order_relaxed);
    }
}

void k_matmul(struct k_pool *pool, const struct k_matrix *W, const float *x,
              int64_t x_stride, int64_t n_x, float *y, int64_t y_stride,
              void *scratch)
{
    assert(W && (unsigned)W->dtype < K_DTYPE_COUNT);
    assert(k_row_bytes(W->dtype, W->cols) >= 0);
    if (n_x <= 0 || W->rows <= 0)
        return;
    struct mm_job job, *j = &job;
    memset(j, 0, sizeof(*j));
    j->ops = kc_ops();
    j->pool = pool;
    struct kc_mm *m = &j->m;
    m->dt = W->dtype;
    m->rows = W->rows;
    m->cols = W->cols;
    m->w = W->data;
    m->w_stride = k_row_bytes(W->dtype, W->cols);
    m->layout = W->layout;
    assert(W->layout == K_LAYOUT_ROWS || W->dtype == K_Q4_K || W->dtype == K_Q8_0);
    m->x = x;
    m->x_stride = x_stride;
    m->n_x = n_x;
    m->y = y;
    m->y_stride = y_stride;
    int nth = k_pool_size(pool);

    if (is_quant(W->dtype)) {
        assert(scratch && ((uintptr_t)scratch & 63) == 0);
        m->xq = scratch;
        m->xl = kc_xq_layout(W->dtype, W->cols);
        /* one decode row is cheaper to quantize here than to dispatch */
        if (n_x * W->cols <= 16384 || nth == 1)
            j->ops->quantize(m, 0, n_x);
        else
            k_pool_run(pool, quant_task, j);
    }

    /* rows go out in whole multiples of the path's row tile (mm_task);
     * a packed matrix is cut at its 32-row groups */
    j->align = W->layout == K_LAYOUT_X32 ? 32 : j->ops->row_align;

    size_t work = mm_work(j->ops, m);
    void *own = NULL;
    if (work && pool) {
        if (kc_pool_reserve(pool, work))
            abort(); /* out of memory is fatal in inferd */
    } else if (work) {
        own = aligned_alloc(64, (work + 63) & ~(size_t)63);
        if (!own)
            abort();
    }
    if (pool)
        k_pool_run(pool, mm_task, j);
    else
        mm_rows(j->ops, m, 0, m->rows, own);
    free(own);
}
