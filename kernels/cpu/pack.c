/* pack.c: the packed weight layout (K_LAYOUT_X32, kcpu.h). k_matrix_pack
 * makes it from the row layout once, at model load; kc_x32_unpack
 * reads rows back out of it for the paths without a kernel for it and for
 * embedding lookups. Plain C: packing runs once and is bound by memory.
 */
#include <stdatomic.h>

#include "kernels/cpu/kcpu.h"

static uint64_t ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* One packed block of 32 rows; blk[r] is row r's block, NULL for padding.
 * Every byte of the packed block is written once. */
static void pack_q4k_block(const uint8_t *const blk[32], uint8_t *gb)
{
    static const uint8_t zero[144];
    const uint64_t lo4 = 0x0f0f0f0f0f0f0f0full;
    for (int r = 0; r < 32; r++) {
        const uint8_t *p = blk[r] ? blk[r] : zero;
        memcpy(gb + 4 * r, p, 4);
        for (int k = 0; k < 3; k++)
            memcpy(gb + 128 + 128 * k + 4 * r, p + 4 + 4 * k, 4);
    }
    for (int r = 0; r < 16; r++) {
        /* row r in the low nibbles, row 16 + r in the high ones */
        const uint8_t *pl = blk[r] ? blk[r] : zero;
        const uint8_t *ph = blk[r + 16] ? blk[r + 16] : zero;
        uint8_t *lane = gb + 512 + 4 * r;
        for (int s = 0; s < 8; s++) {
            /* sub-block s: nibble c % 2 of quant bytes 64 (c / 2) + 32 h
             * .. +31, in x order (kc_x32_grp) */
            int c = 2 * (s >> 2) + (s & 1), h = (s >> 1) & 1;
            int off = 16 + 64 * (c >> 1) + 32 * h, sh = 4 * (c & 1);
            for (int jj = 0; jj < 8; jj += 2) {
                /* groups jj, jj + 1: 8 weights of each row */
                uint64_t v = ((ld64(pl + off + 4 * jj) >> sh) & lo4) |
                             (((ld64(ph + off + 4 * jj) >> sh) & lo4) << 4);
                uint32_t d0 = (uint32_t)v, d1 = (uint32_t)(v >> 32);
                memcpy(lane + 64 * (8 * s + jj), &d0, 4);
                memcpy(lane + 64 * (8 * s + jj + 1), &d1, 4);
            }
        }
    }
}

static void unpack_q4k(const uint8_t *w, int64_t rows, int64_t nb, int64_t o0,
                       int n, int64_t b, uint8_t *dst)
{
    uint8_t gb[KC_X32_Q4K];
    int64_t g_have = -1;
    for (int i = 0; i < n; i++) {
        int64_t o = o0 + i;
        if (o / 32 != g_have) {
            /* the block's parts, gathered from the planes */
            const uint8_t *pp[KC_X32_PLANES];
            g_have = o / 32;
            kc_x32_parts(w, rows, nb, g_have, b, pp);
            for (int k = 0; k < KC_X32_PLANES; k++)
                memcpy(gb + k * KC_X32_PART, pp[k], KC_X32_PART);
        }
        int r = (int)(o % 32);
        uint8_t *p = dst + 144 * i;
        memcpy(p, gb + 4 * r, 4);
        for (int k = 0; k < 3; k++)
            memcpy(p + 4 + 4 * k, gb + 128 + 128 * k + 4 * r, 4);
        uint8_t *qs = p + 16;
        memset(qs, 0, 128);
        const uint8_t *lane = gb + 512 + 4 * (r & 15);
        int up = 4 * (r >> 4);
        for (int s = 0; s < 8; s++) {
            int c = 2 * (s >> 2) + (s & 1), h = (s >> 1) & 1;
            uint8_t *q = qs + 64 * (c >> 1) + 32 * h;
            int sh = 4 * (c & 1);
            for (int t = 0; t < 32; t++) {
                int v = (lane[64 * (8 * s + t / 4) + t % 4] >> up) & 15;
                q[t] |= (uint8_t)(v << sh);
            }
        }
    }
}

/* One packed Q8_0 block of 32 rows; blk[r] NULL for padding. */
static void pack_q8_block(const uint8_t *const blk[32], uint8_t *gb)
{
    static const uint8_t zero[34];
    for (int r = 0; r < 32; r++) {
        const uint8_t *p = blk[r] ? blk[r] : zero;
        memcpy(gb + 2 * r, p, 2);
        uint8_t *lane = gb + 64 + 64 * 8 * (r >> 4) + 4 * (r & 15);
        for (int q = 0; q < 8; q++) {
            uint32_t v;
            memcpy(&v, p + 2 + 4 * q, 4);
            v ^= 0x80808080u;
            memcpy(lane + 64 * q, &v, 4);
        }
    }
}

static void unpack_q8(const uint8_t *w, int64_t rows, int64_t nb, int64_t o0,
                      int n, int64_t b, uint8_t *dst)
{
    for (int i = 0; i < n; i++) {
        int64_t o = o0 + i;
        const uint8_t *gb = kc_x32_q8_block(w, rows, nb, o / 32, b);
        int r = (int)(o % 32);
        uint8_t *p = dst + 34 * i;
        memcpy(p, gb + 2 * r, 2);
        const uint8_t *lane = gb + 64 + 64 * 8 * (r >> 4) + 4 * (r & 15);
        for (int q = 0; q < 8; q++)
            for (int e = 0; e < 4; e++)
                p[2 + 4 * q + e] = (uint8_t)(lane[64 * q + e] ^ 0x80);
    }
}

void kc_x32_unpack(enum k_dtype dt, const uint8_t *w, int64_t rows, int64_t nb,
                   int64_t o0, int n, int64_t b, uint8_t *dst)
{
    if (dt == K_Q8_0)
        unpack_q8(w, rows, nb, o0, n, b, dst);
    else
        unpack_q4k(w, rows, nb, o0, n, b, dst);
}

size_t k_matrix_packed_bytes(const struct k_matrix *W)
{
    if (!W || (W->dtype != K_Q4_K && W->dtype != K_Q8_0) ||
        W->layout != K_LAYOUT_ROWS || W->rows <= 0 || W->cols <= 0 ||
        W->cols % k_dtype_block(W->dtype))
        return 0;
    int64_t groups = (W->rows + 31) / 32, nb = W->cols / k_dtype_block(W->dtype);
    /* Q8_0: 4 planes of ceil(nb / 4) blocks per group */
    int64_t units = W->dtype == K_Q8_0 ? 4 * ((nb + 3) / 4) : nb;
    int64_t unit_bytes = W->dtype == K_Q8_0 ? KC_X32_Q8 : KC_X32_Q4K;
    if (units > INT64_MAX / unit_bytes / groups)
        return 0;
    return (size_t)(groups * units * unit_bytes);
}

int k_matrix_pack_wanted(const struct k_matrix *W)
{
    return k_matrix_packed_bytes(W) > 0 && kc_ops()->x32;
}

struct pack_job {
    const struct k_matrix *W;
    uint8_t *dst;
    int64_t groups, nb;
    _Atomic int64_t next;
};

static void pack_task(void *ctx, int ith, int nth)
{
    struct pack_job *j = ctx;
    (void)ith;
    (void)nth;
    enum k_dtype dt = j->W->dtype;
    int64_t rb = k_row_bytes(dt, j->W->cols), bb = k_dtype_block_bytes(dt);
    const uint8_t *w = j->W->data;
    for (;;) {
        int64_t g = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (g >= j->groups)
            break;
        const uint8_t *row[32];
        for (int r = 0; r < 32; r++)
            row[r] = 32 * g + r < j->W->rows ? w + (32 * g + r) * rb : NULL;
        for (int64_t b = 0; b < j->nb; b++) {
            const uint8_t *blk[32], *pp[KC_X32_PLANES];
            for (int r = 0; r < 32; r++)
                blk[r] = row[r] ? row[r] + bb * b : NULL;
            if (dt == K_Q8_0) {
                pack_q8_block(blk, (uint8_t *)kc_x32_q8_block(j->dst, j->W->rows,
                                                             j->nb, g, b));
                continue;
            }
            uint8_t gb[KC_X32_Q4K];
            pack_q4k_block(blk, gb);
            /* scattered to the planes */
            kc_x32_parts(j->dst, j->W->rows, j->nb, g, b, pp);
            for (int k = 0; k < KC_X32_PLANES; k++)
                memcpy((uint8_t *)pp[k], gb + k * KC_X32_PART, KC_X32_PART);
        }
    }
}

int k_matrix_pack(struct k_pool *pool, const struct k_matrix *W, void *dst,
                  struct k_matrix *out)
{
    if (!k_matrix_packed_bytes(W) || !dst || ((uintptr_t)dst & 63))
        return -1;
    struct pack_job j = {.W = W, .dst = dst, .nb = W->cols / k_dtype_block(W->dtype),
                         .groups = (W->rows + 31) / 32};
    /* Q8_0 planes end in padding blocks when nb is not a multiple of 4:
     * never read, but zeroed so that the buffer is all defined */
    if (W->dtype == K_Q8_0 && j.nb % 4)
        memset(dst, 0, k_matrix_packed_bytes(W));
    atomic_init(&j.next, 0);
    if (pool)
        k_pool_run(pool, pack_task, &j);
    else
        pack_task(&j, 0, 1);
    *out = *W;
    out->data = dst;
    out->layout = K_LAYOUT_X32;
    return 0;
}
