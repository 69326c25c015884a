/* matmul_scalar.c: the scalar path, written as the plain statement of the
 * canonical orders in kcpu.h. It is the fallback on CPUs without AVX2 and
 * the reference the SIMD paths are tested against bit for bit. Compiled
 * without target flags; fmaf is the C library's (a single rounding).
 */
#include "kernels/cpu/kcpu.h"

/* ------------------------------------------------------- float weights */

static float wf(enum k_dtype dt, const uint8_t *row, int64_t i)
{
    uint16_t h;
    switch (dt) {
    case K_F32: {
        float f;
        memcpy(&f, row + 4 * i, 4);
        return f;
    }
    case K_F16:
        memcpy(&h, row + 2 * i, 2);
        return k_f16_to_f32(h);
    default:
        memcpy(&h, row + 2 * i, 2);
        return k_bf16_to_f32(h);
    }
}

static float dot_float(enum k_dtype dt, const uint8_t *w, const float *x,
                       int64_t n)
{
    float acc[16] = {0};
    for (int64_t i = 0; i < n; i++)
        acc[i & 15] = fmaf(wf(dt, w, i), x[i], acc[i & 15]);
    return kc_tree16(acc);
}

/* ----------------------------------------------------- int8 weights */

static float dot_q8_0(const uint8_t *w, struct kc_xrow x, int64_t nb)
{
    const int8_t *qx = x.qs;
    const float *dx = x.d;
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + 34 * b;
        int32_t s = 0;
        for (int i = 0; i < 32; i++)
            s += (int8_t)blk[2 + i] * qx[32 * b + i];
        acc = fmaf((float)s, kc_f16(blk) * dx[b], acc);
    }
    return acc;
}

static float dot_q4_k(const uint8_t *w, struct kc_xrow x, int64_t nb)
{
    const int8_t *qx = x.qs;
    const float *dx = x.d;
    const int16_t *sx = x.s;
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + 144 * b, *qs = blk + 16;
        const int8_t *xb = qx + 256 * b;
        uint8_t sc[8], m[8];
        kc_q4k_scales(blk + 4, sc, m);
        int32_t a = 0, bm = 0;
        /* x is in the permuted order: chunk c pairs with the low (even c)
         * or high (odd c) nibbles of quant bytes 64 * (c / 2) .. +63 */
        for (int c = 0; c < 4; c++)
            for (int h = 0; h < 2; h++) {
                int32_t s = 0;
                for (int t = 32 * h; t < 32 * h + 32; t++) {
                    int q = (qs[64 * (c >> 1) + t] >> (4 * (c & 1))) & 0xF;
                    s += q * xb[64 * c + t];
                }
                a += sc[kc_q4k_sub(c, h)] * s;
            }
        for (int j = 0; j < 8; j++)
            bm += m[j] * sx[16 * b + j];
        acc = fmaf((float)a, kc_f16(blk) * dx[b], acc);
        acc = fmaf((float)bm, -(kc_f16(blk + 2) * dx[b]), acc);
    }
    return acc;
}

static float dot_q6_k(const uint8_t *w, struct kc_xrow x, int64_t nb)
{
    const int8_t *qx = x.qs;
    const float *dx = x.d;
    const int16_t *sx = x.s;
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + 210 * b, *ql = blk, *qh = blk + 128;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const int8_t *xb = qx + 256 * b;
        int32_t a = 0;
        for (int k = 0; k < 16; k++) {
            int32_t s = 0;
            for (int e = 16 * k; e < 16 * k + 16; e++) {
                int n = e >> 7, t = e & 127, quarter = t >> 5, i = t & 31;
                int lo = (ql[64 * n + 32 * (quarter & 1) + i] >>
                          (4 * (quarter >> 1))) & 0xF;
                int hi = (qh[32 * n + i] >> (2 * quarter)) & 3;
                s += (lo | (hi << 4)) * xb[e];
            }
            a += sc[k] * (s - 32 * sx[16 * b + k]);
        }
        acc = fmaf((float)a, kc_f16(blk + 208) * dx[b], acc);
    }
    return acc;
}

size_t kc_mm_work_scalar(const struct kc_mm *m)
{
    (void)m;
    return 0;
}

void kc_mm_rows_scalar(const struct kc_mm *m, int64_t o0, int64_t o1,
                           void *work)
{
    (void)work;
    for (int64_t r = 0; r < m->n_x; r++) {
        struct kc_xrow xq = {0};
        if (m->xq)
            xq = kc_xrow_at(m, r);
        const float *x = m->x + r * m->x_stride;
        float *y = m->y + r * m->y_stride;
        for (int64_t o = o0; o < o1; o++) {
            const uint8_t *w = m->w + o * m->w_stride;
            switch (m->dt) {
            case K_Q8_0:
                y[o] = dot_q8_0(w, xq, m->xl.nb);
                break;
            case K_Q4_K:
                y[o] = dot_q4_k(w, xq, m->xl.nb);
                break;
            case K_Q6_K:
                y[o] = dot_q6_k(w, xq, m->xl.nb);
                break;
            default:
                y[o] = dot_float(m->dt, w, x, m->cols);
                break;
            }
        }
    }
}

