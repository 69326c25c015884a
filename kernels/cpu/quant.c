/* quant.c: the scalar definitions of the two conversions around the int8
 * paths: quantizing activation rows to int8 blocks (the SIMD paths produce
 * the same bytes) and dequantizing weight rows to f32, bit-exact with
 * GGUF's reference dequantization (each product and difference rounded to
 * f32 on its own, no fused multiply-add).
 */
#include "kernels/cpu/kcpu.h"

/* --------------------------------------------------- activation rows */

/* One block of n: returns d and writes q (never -128) and its sum. */
static float quant_block(const float *x, int n, int8_t *q, int32_t *sum)
{
    float amax = 0.0f;
    for (int i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
    float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t s = 0;
    for (int i = 0; i < n; i++) {
        float v = x[i] * id;
        /* clamp first: keeps NaN and rounding slop out of the int cast */
        v = v < -127.0f ? -127.0f : v;
        v = v > 127.0f ? 127.0f : v;
        if (v != v)
            v = 0.0f;
        int qi = (int)lrintf(v);
        q[i] = (int8_t)qi;
        s += qi;
    }
    *sum = s;
    return amax / 127.0f;
}

void kc_quantize_scalar(const struct kc_mm *m, int64_t r0, int64_t r1)
{
    const struct kc_xq *l = &m->xl;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = m->x + r * m->x_stride;
        uint8_t *row = (uint8_t *)m->xq + r * l->stride;
        int8_t *qs = (int8_t *)(row + l->qs_off);
        float *d = (float *)(row + l->d_off);
        if (m->dt == K_Q8_0) {
            int32_t *s = (int32_t *)(row + l->s_off);
            for (int64_t b = 0; b < l->nb; b++)
                d[b] = quant_block(x + 32 * b, 32, qs + 32 * b, &s[b]);
            continue;
        }
        int16_t *s = (int16_t *)(row + l->s_off);
        for (int64_t b = 0; b < l->nb; b++) {
            int8_t q[256];
            int32_t total, part[16];
            d[b] = quant_block(x + 256 * b, 256, q, &total);
            for (int k = 0; k < 16; k++) {
                part[k] = 0;
                for (int i = 0; i < 16; i++)
                    part[k] += q[16 * k + i];
            }
            int8_t *qb = qs + 256 * b;
            kc_xq_ksums(m->dt, part, s + 16 * b);
            if (m->dt == K_Q4_K)
                for (int p = 0; p < 256; p++)
                    qb[p] = q[kc_q4k_perm(p)];
            else
                memcpy(qb, q, 256);
        }
    }
}

/* ------------------------------------------------------- weight rows */

static void dequant_q8_0(const uint8_t *blk, float *out)
{
    float d = kc_f16(blk);
    for (int i = 0; i < 32; i++)
        out[i] = (float)(int8_t)blk[2 + i] * d;
}

static void dequant_q4_k(const uint8_t *blk, float *out)
{
    float d = kc_f16(blk), dmin = kc_f16(blk + 2);
    uint8_t sc[8], m[8];
    kc_q4k_scales(blk + 4, sc, m);
    const uint8_t *qs = blk + 16;
    for (int j = 0; j < 8; j++) {
        float dl = d * (float)sc[j], ml = dmin * (float)m[j];
        const uint8_t *q = qs + 32 * (j / 2);
        int sh = 4 * (j & 1);
        for (int l = 0; l < 32; l++) {
            float v = dl * (float)((q[l] >> sh) & 0xF);
            out[32 * j + l] = v - ml;
        }
    }
}

static void dequant_q6_k(const uint8_t *blk, float *out)
{
    const uint8_t *ql = blk, *qh = blk + 128;
    const int8_t *sc = (const int8_t *)(blk + 192);
    float d = kc_f16(blk + 208);
    for (int e = 0; e < 256; e++) {
        int n = e / 128, t = e % 128, quarter = t / 32, l = t % 32;
        int lo = (ql[64 * n + 32 * (quarter & 1) + l] >> (4 * (quarter >> 1))) & 0xF;
        int hi = (qh[32 * n + l] >> (2 * quarter)) & 3;
        int q = (lo | (hi << 4)) - 32;
        float dl = d * (float)sc[e / 16];
        out[e] = dl * (float)q;
    }
}

void k_dequant_row(const struct k_matrix *W, int64_t row, float *out)
{
    if (W->layout == K_LAYOUT_X32) {
        int64_t B = k_dtype_block(W->dtype), nb = W->cols / B;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t blk[144];
            kc_x32_unpack(W->dtype, W->data, W->rows, nb, row, 1, b, blk);
            if (W->dtype == K_Q8_0)
                dequant_q8_0(blk, out + B * b);
            else
                dequant_q4_k(blk, out + B * b);
        }
        return;
    }
    int64_t rb = k_row_bytes(W->dtype, W->cols);
    const uint8_t *p = (const uint8_t *)W->data + row * rb;
    int64_t n = W->cols;
    switch (W->dtype) {
    case K_F32:
        memcpy(out, p, (size_t)n * 4);
        break;
    case K_F16:
        for (int64_t i = 0; i < n; i++)
            out[i] = kc_f16(p + 2 * i);
        break;
    case K_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            out[i] = k_bf16_to_f32(h);
        }
        break;
    case K_Q8_0:
        for (int64_t b = 0; b < n / 32; b++)
            dequant_q8_0(p + 34 * b, out + 32 * b);
        break;
    case K_Q4_K:
        for (int64_t b = 0; b < n / 256; b++)
            dequant_q4_k(p + 144 * b, out + 256 * b);
        break;
    case K_Q6_K:
        for (int64_t b = 0; b < n / 256; b++)
            dequant_q6_k(p + 210 * b, out + 256 * b);
        break;
    default:
        break;
    }
}
