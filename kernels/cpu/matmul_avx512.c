/* matmul_avx512.c: k_matmul on AVX-512 with VNNI, in the canonical orders
 * of kcpu.h.
 *   float weights: tiles of 4 weight rows x up to 4 activation rows, one
 *     zmm accumulator per pair (its 16 lanes are the canonical lanes);
 *     batches of 4+ rows use 4 x 6 tiles blocked over K.
 *   int8, up to 4 activation rows (decode): 16 (Q8_0) or 8 (K-quants)
 *     weight rows at once, one per lane after a transpose tree of the
 *     per-row partial sums; each weight block is unpacked once for all the
 *     activation rows, and the f32 chain runs per lane.
 *   int8, more activation rows (prefill): a panel of 16 weight rows is
 *     repacked once so that lane j of a vpdpbusd is row j; each 4
 *     activation bytes are then broadcast, every block sum comes out whole
 *     in its lane, and the panel serves every activation row.
 *   Q8_0 and Q4_K packed at load (K_LAYOUT_X32): the same lane-per-row
 *     scheme straight from the packed weights, for every batch size.
 * Compiled with -mavx512f/bw/vl/vnni; called only after detection.
 */
#include "kernels/cpu/simd_avx512.h"

#define AI KC_AI

static AI int32_t load_i32(const void *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ------------------------------------------------- activation quantizing */

/* One block of 16 * nz floats: the same d, q and sums as quant.c. */
static AI float quant_block(const float *x, int nz, int8_t *q, int32_t *part)
{
    __m512 vmax = _mm512_setzero_ps();
    for (int z = 0; z < nz; z++) {
        __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + 16 * z));
        vmax = _mm512_max_ps(a, vmax);
    }
    float amax = _mm512_reduce_max_ps(vmax);
    float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    __m512 vid = _mm512_set1_ps(id);
    for (int z = 0; z < nz; z++) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + 16 * z), vid);
        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        v = _mm512_max_ps(v, _mm512_set1_ps(-127.0f));
        v = _mm512_min_ps(v, _mm512_set1_ps(127.0f));
        v = _mm512_mask_mov_ps(v, nan, _mm512_setzero_ps());
        __m512i qi = _mm512_cvtps_epi32(v);
        _mm_storeu_si128((__m128i *)(q + 16 * z), _mm512_cvtepi32_epi8(qi));
        part[z] = _mm512_reduce_add_epi32(qi);
    }
    return amax / 127.0f;
}

void kc_quantize_avx512(const struct kc_mm *m, int64_t r0, int64_t r1)
{
    const struct kc_xq *l = &m->xl;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = m->x + r * m->x_stride;
        uint8_t *row = (uint8_t *)m->xq + r * l->stride;
        int8_t *qs = (int8_t *)(row + l->qs_off);
        float *d = (float *)(row + l->d_off);
        if (m->dt == K_Q8_0) {
            int32_t *s = (int32_t *)(row + l->s_off);
            for (int64_t b = 0; b < l->nb; b++) {
                int32_t part[2];
                d[b] = quant_block(x + 32 * b, 2, qs + 32 * b, part);
                s[b] = part[0] + part[1];
            }
            continue;
        }
        int16_t *s = (int16_t *)(row + l->s_off);
        for (int64_t b = 0; b < l->nb; b++) {
            int32_t part[16];
            int8_t *qb = qs + 256 * b;
            int16_t *sb = s + 16 * b;
            d[b] = quant_block(x + 256 * b, 16, qb, part);
            if (m->dt == K_Q4_K)
                /* permuted order: swap the 32-byte chunks 1<->2, 5<->6 */
                for (int h = 0; h < 256; h += 128) {
                    __m256i c1 = _mm256_loadu_si256((const __m256i *)(qb + h + 32));
                    __m256i c2 = _mm256_loadu_si256((const __m256i *)(qb + h + 64));
                    _mm256_storeu_si256((__m256i *)(qb + h + 32), c2);
                    _mm256_storeu_si256((__m256i *)(qb + h + 64), c1);
                }
            kc_xq_ksums(m->dt, part, sb);
        }
    }
}

/* ------------------------------------------------------- float weights */

static AI __m512 load_w(enum k_dtype dt, const uint8_t *row, int64_t i)
{
    if (dt == K_F32)
        return _mm512_loadu_ps((const float *)row + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)(row + 2 * i));
    if (dt == K_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static AI __m512 load_w_tail(enum k_dtype dt, const uint8_t *row, int64_t i,
                             __mmask16 k)
{
    if (dt == K_F32)
        return _mm512_maskz_loadu_ps(k, (const float *)row + i);
    __m256i h = _mm256_maskz_loadu_epi16(k, row + 2 * i);
    if (dt == K_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* y[c][a] for NW weight rows w[a] and NX activation rows x[c], over
 * columns [k0, k1). Batches block K so that a chunk of a 16-row weight
 * panel and of 6 activation rows stay in L1 while 4 x 6 tiles sweep them.
 * A lane's partial sum waits in st between chunks, which cannot change it:
 * each lane still adds its elements in increasing order. first: start
 * from zero, else from st; last: fold into y, else save to st. A whole row
 * (k0 = 0, k1 = K, first and last) needs no st.
 * st: (n_x, 16 weight rows, 16 lanes) f32. */
#define FB_NX 6

static AI void fbtile(const int NW, const int NX, enum k_dtype dt,
                      const uint8_t *const *w, const float *const *x,
                      int64_t k0, int64_t k1, float *st, int first, int last,
                      float *const *y)
{
    __m512 acc[4][FB_NX];
    for (int a = 0; a < NW; a++)
        for (int c = 0; c < NX; c++)
            acc[a][c] = first ? _mm512_setzero_ps()
                              : _mm512_load_ps(st + (c * 16 + a) * 16);
    int64_t i = k0;
    for (; i + 16 <= k1; i += 16) {
        __m512 wv[4];
        for (int a = 0; a < NW; a++)
            wv[a] = load_w(dt, w[a], i);
        for (int c = 0; c < NX; c++) {
            __m512 xv = _mm512_loadu_ps(x[c] + i);
            for (int a = 0; a < NW; a++)
                acc[a][c] = _mm512_fmadd_ps(wv[a], xv, acc[a][c]);
        }
    }
    if (i < k1) { /* the row's last, partial group of 16 */
        __mmask16 k = kc_mask16(k1 - i);
        __m512 wv[4];
        for (int a = 0; a < NW; a++)
            wv[a] = load_w_tail(dt, w[a], i, k);
        for (int c = 0; c < NX; c++) {
            __m512 xv = _mm512_maskz_loadu_ps(k, x[c] + i);
            for (int a = 0; a < NW; a++)
                acc[a][c] = _mm512_mask3_fmadd_ps(wv[a], xv, acc[a][c], k);
        }
    }
    for (int a = 0; a < NW; a++)
        for (int c = 0; c < NX; c++) {
            if (last)
                y[c][a] = kc_tree16_zmm(acc[a][c]);
            else
                _mm512_store_ps(st + (c * 16 + a) * 16, acc[a][c]);
        }
}

static AI void ftile_nx(const int NW, int nx, enum k_dtype dt,
                        const uint8_t *const *w, const float *const *x,
                        int64_t K, float *const *y)
{
    switch (nx) {
    case 4:
        fbtile(NW, 4, dt, w, x, 0, K, NULL, 1, 1, y);
        break;
    case 3:
        fbtile(NW, 3, dt, w, x, 0, K, NULL, 1, 1, y);
        break;
    case 2:
        fbtile(NW, 2, dt, w, x, 0, K, NULL, 1, 1, y);
        break;
    default:
        fbtile(NW, 1, dt, w, x, 0, K, NULL, 1, 1, y);
        break;
    }
}

static AI void mm_float(const struct kc_mm *m, int64_t o0, int64_t o1,
                        enum k_dtype dt)
{
    for (int64_t o = o0; o < o1;) {
        int nw = o1 - o >= 4 ? 4 : 1;
        const uint8_t *w[4];
        for (int a = 0; a < nw; a++)
            w[a] = m->w + (o + a) * m->w_stride;
        for (int64_t r = 0; r < m->n_x; r += 4) {
            int nx = m->n_x - r >= 4 ? 4 : (int)(m->n_x - r);
            const float *x[4];
            float *y[4];
            for (int c = 0; c < nx; c++) {
                x[c] = m->x + (r + c) * m->x_stride;
                y[c] = m->y + (r + c) * m->y_stride + o;
            }
            if (nw == 4)
                ftile_nx(4, nx, dt, w, x, m->cols, y);
            else
                ftile_nx(1, nx, dt, w, x, m->cols, y);
        }
        o += nw;
    }
}

static AI void fbtile_nx(const int NW, int nx, enum k_dtype dt,
                         const uint8_t *const *w, const float *const *x,
                         int64_t k0, int64_t k1, float *st, int first, int last,
                         float *const *y)
{
    switch (nx) {
    case 6:
        fbtile(NW, 6, dt, w, x, k0, k1, st, first, last, y);
        break;
    case 5:
        fbtile(NW, 5, dt, w, x, k0, k1, st, first, last, y);
        break;
    case 4:
        fbtile(NW, 4, dt, w, x, k0, k1, st, first, last, y);
        break;
    case 3:
        fbtile(NW, 3, dt, w, x, k0, k1, st, first, last, y);
        break;
    case 2:
        fbtile(NW, 2, dt, w, x, k0, k1, st, first, last, y);
        break;
    default:
        fbtile(NW, 1, dt, w, x, k0, k1, st, first, last, y);
        break;
    }
}

/* Activation rows per block of a batch: a block's rows (and, for int8,
 * the panels it meets) stay in L2 while the block is worked through. */
#define XB 64

static AI void mm_float_blocked(const struct kc_mm *m, int64_t o0, int64_t o1,
                                enum k_dtype dt, float *st)
{
    /* chunk of a 16-row panel plus 6 activation rows: 28-44 KB */
    const int64_t KC = dt == K_F32 ? 256 : 512, K = m->cols;
    for (int64_t p = o0; p < o1; p += 16) {
        int n = o1 - p >= 16 ? 16 : (int)(o1 - p);
        for (int64_t xb = 0; xb < m->n_x; xb += XB) {
            int64_t xe = xb + XB < m->n_x ? xb + XB : m->n_x;
            for (int64_t k0 = 0; k0 < K; k0 += KC) {
                int64_t k1 = k0 + KC < K ? k0 + KC : K;
                int first = k0 == 0, last = k1 == K;
                for (int64_t r = xb; r < xe; r += FB_NX) {
                    int nx = xe - r >= FB_NX ? FB_NX : (int)(xe - r);
                    const float *x[FB_NX];
                    for (int c = 0; c < nx; c++)
                        x[c] = m->x + (r + c) * m->x_stride;
                    for (int a0 = 0; a0 < n;) {
                        int nw = n - a0 >= 4 ? 4 : 1;
                        const uint8_t *w[4];
                        float *y[FB_NX];
                        for (int a = 0; a < nw; a++)
                            w[a] = m->w + (p + a0 + a) * m->w_stride;
                        for (int c = 0; c < nx; c++)
                            y[c] = m->y + (r + c) * m->y_stride + p + a0;
                        float *s = st + ((r - xb) * 16 + a0) * 16;
                        if (nw == 4)
                            fbtile_nx(4, nx, dt, w, x, k0, k1, s, first, last, y);
                        else
                            fbtile_nx(1, nx, dt, w, x, k0, k1, s, first, last, y);
                        a0 += nw;
                    }
                }
            }
        }
    }
}

/* ------------------------------------------- int8, one activation row */

/* Activation rows the one-row kernels take at once. */
#define RX_GEMV 4

/* Software prefetch distance of the one-row kernels, in bytes of each
 * weight row: with 8-16 rows in flight per core the hardware prefetcher
 * alone leaves DRAM bandwidth unused (measured on 2 threads: +15-25%;
 * 256 B ahead did best of 256, 512, 1024, T0/T1/T2). */
#ifndef PF_DIST
#define PF_DIST 256
#endif
/* Software prefetch of the packed kernels: distance in bytes ahead in each
 * of their 4 streams (0: none; 2 blocks ahead did best end to end of 0,
 * 1 and 2 blocks), and one prefetch per X32_PF_STEP lines (every line did
 * better than every other line). */
#ifndef X32_PF
#define X32_PF 2304
#endif
#ifndef X32_PF_STEP
#define X32_PF_STEP 1
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T0
#endif

/* The 256 nibbles of a Q4_K block in x's permuted order: nib[c] is
 * chunk c, the low (c even) or high (c odd) nibbles of quant bytes
 * 64 * (c / 2) .. +63. */
static AI void q4k_nibbles(const uint8_t *blk, __m512i lo4, __m512i nib[4])
{
    __m512i q0 = _mm512_loadu_si512(blk + 16), q1 = _mm512_loadu_si512(blk + 80);
    nib[0] = _mm512_and_si512(q0, lo4);
    nib[1] = _mm512_and_si512(_mm512_srli_epi16(q0, 4), lo4);
    nib[2] = _mm512_and_si512(q1, lo4);
    nib[3] = _mm512_and_si512(_mm512_srli_epi16(q1, 4), lo4);
}

/* The constants of q6k_values, made once by its callers (outside their
 * loops, where they stay in registers). */
struct q6k_consts {
    __m512i lo4, hi2, sh_lo, sh_hi;
};

static AI struct q6k_consts q6k_consts(void)
{
    struct q6k_consts k;
    k.lo4 = _mm512_set1_epi8(0x0f);
    k.hi2 = _mm512_set1_epi8(0x30);
    /* per 256-bit half: bits 0-1 / 2-3 of qh to bits 4-5 for the low
     * nibbles, bits 4-5 / 6-7 for the high nibbles */
    k.sh_lo = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    k.sh_hi = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    return k;
}

/* The 256 unsigned 6-bit values of a Q6_K block in natural order, 64 per
 * zmm. */
static AI void q6k_values(const uint8_t *blk, struct q6k_consts k, __m512i u[4])
{
    const __m512i lo4 = k.lo4, hi2 = k.hi2, sh_lo = k.sh_lo, sh_hi = k.sh_hi;
    for (int nh = 0; nh < 2; nh++) {
        __m512i L = _mm512_loadu_si512(blk + 64 * nh);
        __m256i H = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * nh));
        __m512i Hz = _mm512_inserti64x4(_mm512_castsi256_si512(H), H, 1);
        u[2 * nh] = _mm512_or_si512(_mm512_and_si512(L, lo4),
                                    _mm512_and_si512(_mm512_sllv_epi16(Hz, sh_lo), hi2));
        u[2 * nh + 1] = _mm512_or_si512(
            _mm512_and_si512(_mm512_srli_epi16(L, 4), lo4),
            _mm512_and_si512(_mm512_srlv_epi16(Hz, sh_hi), hi2));
    }
}

/* Q8_0, up to 16 weight rows, lane j = row o0 + j. Per block, 8 zmm hold
 * two rows' 32 products each as 16 int32 partials; a transpose tree turns
 * them into one zmm of 16 block sums, then the f32 chain runs per lane. */
static AI void q8_0_gemv16(const int RX, const struct kc_mm *m, int64_t o0,
                           int n, int64_t r0)
{
    const uint8_t *row[16];
    int32_t off[16];
    kc_group_rows(m, o0, n, 16, row, off);
    const __m512i vidx = _mm512_loadu_si512(off);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    /* after the tree, lane i holds row perm[i]; this puts row j in lane j */
    const __m512i unperm = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9,
                                             13, 10, 14, 11, 15);
    const uint8_t *base = m->w + o0 * m->w_stride;
    struct kc_xrow x[RX_GEMV];
    __m512 acc[RX_GEMV];
    for (int j = 0; j < RX; j++) {
        x[j] = kc_xrow_at(m, r0 + j);
        acc[j] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < m->xl.nb; b++) {
#if PF_DIST
        if ((b & 1) == 0)
            for (int j = 0; j < 16; j++)
                _mm_prefetch((const char *)(row[j] + 34 * b + PF_DIST), PF_HINT);
#endif
        __m512i w[8];
        for (int p = 0; p < 8; p++) {
            __m256i lo = _mm256_loadu_si256((const __m256i *)(row[2 * p] + 34 * b + 2));
            __m256i hi = _mm256_loadu_si256((const __m256i *)(row[2 * p + 1] + 34 * b + 2));
            /* w + 128 is unsigned; sum (w+128) x = sum w x + 128 sum x */
            w[p] = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1),
                                    flip);
        }
        __m512i h = _mm512_i32gather_epi32(vidx, base + 34 * b, 1);
        __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
        for (int j = 0; j < RX; j++) {
            __m512i xb = _mm512_broadcast_i64x4(
                _mm256_loadu_si256((const __m256i *)(x[j].qs + 32 * b)));
            __m512i s[8];
            for (int p = 0; p < 8; p++)
                s[p] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[p], xb);
            /* tree: within each 128-bit lane, then across the lanes */
            __m512i t[4], u[2];
            for (int p = 0; p < 4; p++)
                t[p] = _mm512_add_epi32(_mm512_unpacklo_epi32(s[2 * p], s[2 * p + 1]),
                                        _mm512_unpackhi_epi32(s[2 * p], s[2 * p + 1]));
            for (int p = 0; p < 2; p++)
                u[p] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * p], t[2 * p + 1]),
                                        _mm512_unpackhi_epi64(t[2 * p], t[2 * p + 1]));
            __m512i v = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88),
                                         _mm512_shuffle_i32x4(u[0], u[1], 0xdd));
            v = _mm512_permutexvar_epi32(unperm, v);
            v = _mm512_sub_epi32(v, _mm512_set1_epi32(128 * ((const int32_t *)x[j].s)[b]));
            __m512 dd = _mm512_mul_ps(dw, _mm512_set1_ps(x[j].d[b]));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), dd, acc[j]);
        }
    }
    for (int j = 0; j < RX; j++)
        _mm512_mask_storeu_ps(m->y + (r0 + j) * m->y_stride + o0, kc_mask16(n), acc[j]);
}

/* 8 zmm of int32 partials -> their 8 sums, lane r = sum of a[r]. */
static AI __m256i tree8x16(const __m512i *a)
{
    __m512i t[4];
    for (int p = 0; p < 4; p++)
        t[p] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * p], a[2 * p + 1]),
                                _mm512_unpackhi_epi32(a[2 * p], a[2 * p + 1]));
    /* each 128-bit lane: [a0 a1 a2 a3] and [a4 a5 a6 a7] partials */
    __m512i u0 = _mm512_add_epi32(_mm512_unpacklo_epi64(t[0], t[1]),
                                  _mm512_unpackhi_epi64(t[0], t[1]));
    __m512i u1 = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2], t[3]),
                                  _mm512_unpackhi_epi64(t[2], t[3]));
    __m512i v = _mm512_add_epi32(_mm512_shuffle_i32x4(u0, u1, 0x88),
                                 _mm512_shuffle_i32x4(u0, u1, 0xdd));
    /* v: [u0 L0+L2, u0 L1+L3... ] fold the remaining pair of lanes */
    __m512i w = _mm512_add_epi32(v, _mm512_shuffle_i32x4(v, v, 0xb1));
    return _mm512_castsi512_si256(_mm512_shuffle_i32x4(w, w, 0x08));
}


/* Q4_K, up to 8 weight rows, lane r = row o0 + r: A and B of each row's
 * block (kcpu.h) by maddubs + vpdpwssd, then the f32 chain per lane.
 * The 12 scale bytes of the 8 rows are loaded and unpacked at once
 * (kc_q4k_scales64 on 64-bit lanes), so B of all 8 rows is one madd, and
 * each row's scales are a register vpermw picks from. */
static AI void q4_k_gemv8(const int RX, const struct kc_mm *m, int64_t o0,
                          int n, int64_t r0)
{
    const uint8_t *row[8];
    int32_t off[8];
    kc_group_rows(m, o0, n, 8, row, off);
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    /* vpermw indices: int16 lanes 0-15 take scale kc_q4k_sub(c, 0), 16-31
     * kc_q4k_sub(c, 1), of row q of a table of 4 rows' 8 int16 scales */
    static const _Alignas(64) int16_t sidx_tab[4][4][32] = {
#define Q4_R16(v) v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v
#define Q4_SI(q, c)                                                           \
    {Q4_R16(8 * (q) + 4 * ((c) >> 1) + ((c) & 1)),                            \
     Q4_R16(8 * (q) + 4 * ((c) >> 1) + ((c) & 1) + 2)}
#define Q4_SQ(q) {Q4_SI(q, 0), Q4_SI(q, 1), Q4_SI(q, 2), Q4_SI(q, 3)}
        Q4_SQ(0), Q4_SQ(1), Q4_SQ(2), Q4_SQ(3)
#undef Q4_SQ
#undef Q4_SI
#undef Q4_R16
    };
    const __m512i c3f_lo = _mm512_set1_epi64(0x000000003f3f3f3fll);
    const __m512i c0f_hi = _mm512_set1_epi64(0x0f0f0f0f00000000ll);
    const __m512i c30_hi = _mm512_set1_epi64(0x3030303000000000ll);
    /* after the B fold, row q (q < 4) is in dword 4q and row 4 + q in 4q + 2 */
    const __m512i bperm = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0,
                                            0, 0, 0, 0);
    struct kc_xrow x[RX_GEMV];
    __m256 acc[RX_GEMV];
    for (int j = 0; j < RX; j++) {
        x[j] = kc_xrow_at(m, r0 + j);
        acc[j] = _mm256_setzero_ps();
    }
    const __m512i qlo = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i qhi = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t b = 0; b < m->xl.nb; b++) {
        /* the first 16 bytes of each row's block, rows 0-3 and 4-7; then
         * per row G0 = d | dmin << 16 | u0 << 32, G1 = u1 | u2 << 32 */
        __m512i Z[2];
        for (int i = 0; i < 2; i++) {
            __m512i z = _mm512_castsi128_si512(
                _mm_loadu_si128((const __m128i *)(row[4 * i] + 144 * b)));
            z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(row[4 * i + 1] + 144 * b)), 1);
            z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(row[4 * i + 2] + 144 * b)), 2);
            Z[i] = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(row[4 * i + 3] + 144 * b)), 3);
        }
        const __m512i G0 = _mm512_permutex2var_epi64(Z[0], qlo, Z[1]);
        const __m512i G1 = _mm512_permutex2var_epi64(Z[0], qhi, Z[1]);
        /* kc_q4k_scales64 per 64-bit lane */
        __m512i sc = _mm512_and_si512(_mm512_srli_epi64(G0, 32), c3f_lo);
        sc = _mm512_ternarylogic_epi64(G1, c0f_hi, sc, 0xEA);
        sc = _mm512_ternarylogic_epi64(_mm512_srli_epi64(G0, 2), c30_hi, sc, 0xEA);
        __m512i mn = _mm512_and_si512(G1, c3f_lo);
        mn = _mm512_ternarylogic_epi64(_mm512_srli_epi64(G1, 4), c0f_hi, mn, 0xEA);
        mn = _mm512_ternarylogic_epi64(_mm512_slli_epi64(G1, 30), c30_hi, mn, 0xEA);
        /* int16 scales: SC[0] rows 0-3, SC[1] rows 4-7, 8 per row */
        __m512i SC[2], MN[2];
        SC[0] = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(sc));
        SC[1] = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(sc, 1));
        MN[0] = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(mn));
        MN[1] = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(mn, 1));
        __m512i a[RX_GEMV][8];
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++) {
            const uint8_t *blk = row[r] + 144 * b;
#if PF_DIST
            _mm_prefetch((const char *)(blk + PF_DIST), PF_HINT);
            _mm_prefetch((const char *)(blk + PF_DIST + 64), PF_HINT);
            _mm_prefetch((const char *)(blk + PF_DIST + 128), PF_HINT);
#endif
            __m512i nib[4];
            q4k_nibbles(blk, lo4, nib);
            __m512i S[4];
            for (int c = 0; c < 4; c++)
                S[c] = _mm512_permutexvar_epi16(_mm512_loadu_si512(sidx_tab[r & 3][c]),
                                                SC[r >> 2]);
            for (int j = 0; j < RX; j++) {
                const int8_t *xq = x[j].qs + 256 * b;
                __m512i v = _mm512_madd_epi16(
                    _mm512_maddubs_epi16(nib[0], _mm512_loadu_si512(xq)), S[0]);
                for (int c = 1; c < 4; c++)
                    v = _mm512_dpwssd_epi32(
                        v, _mm512_maddubs_epi16(nib[c], _mm512_loadu_si512(xq + 64 * c)), S[c]);
                a[j][r] = v;
            }
        }
        __m256i h = _mm512_cvtepi64_epi32(G0);
        __m256 d = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(h));
        __m256 dm = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(h, 16)));
        for (int j = 0; j < RX; j++) {
            const __m512i bs4 = _mm512_broadcast_i32x4(
                _mm_loadu_si128((const __m128i *)((const int16_t *)x[j].s + 16 * b)));
            /* lane q of P[i]: row 4i + q, 4 partials */
            __m512i P0 = _mm512_madd_epi16(MN[0], bs4), P1 = _mm512_madd_epi16(MN[1], bs4);
            __m512i w = _mm512_add_epi32(_mm512_unpacklo_epi64(P0, P1),
                                         _mm512_unpackhi_epi64(P0, P1));
            w = _mm512_add_epi32(w, _mm512_shuffle_epi32(w, _MM_PERM_CDAB));
            __m256i Bi = _mm512_castsi512_si256(_mm512_permutexvar_epi32(bperm, w));
            __m256 A = _mm256_cvtepi32_ps(tree8x16(a[j]));
            __m256 B = _mm256_cvtepi32_ps(Bi);
            __m256 dx = _mm256_set1_ps(x[j].d[b]);
            acc[j] = _mm256_fmadd_ps(A, _mm256_mul_ps(d, dx), acc[j]);
            acc[j] = _mm256_fnmadd_ps(B, _mm256_mul_ps(dm, dx), acc[j]);
        }
    }
    for (int j = 0; j < RX; j++)
        _mm256_mask_storeu_ps(m->y + (r0 + j) * m->y_stride + o0,
                              (__mmask8)((1u << n) - 1), acc[j]);
}

/* Q6_K, up to 8 weight rows: A of each row's block (kcpu.h), the -32
 * offset folded in before the sum, then the f32 chain per lane. */
static AI void q6_k_gemv8(const int RX, const struct kc_mm *m, int64_t o0,
                          int n, int64_t r0)
{
    const uint8_t *row[8];
    int32_t off[8];
    kc_group_rows(m, o0, n, 8, row, off);
    const __m256i vidx = _mm256_loadu_si256((const __m256i *)off);
    const uint8_t *base = m->w + o0 * m->w_stride;
    const struct q6k_consts k6 = q6k_consts();
    /* 8 int16 lanes (16 elements) per scale: 64-element chunk k takes
     * scales 4k .. 4k+3 */
    __m512i sidx[4];
    for (int k = 0; k < 4; k++) {
        short e[32];
        for (int l = 0; l < 32; l++)
            e[l] = (short)(4 * k + l / 8);
        sidx[k] = _mm512_loadu_si512(e);
    }
    struct kc_xrow x[RX_GEMV];
    __m256 acc[RX_GEMV];
    for (int j = 0; j < RX; j++) {
        x[j] = kc_xrow_at(m, r0 + j);
        acc[j] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < m->xl.nb; b++) {
        __m256i bs[RX_GEMV];
        for (int j = 0; j < RX; j++)
            bs[j] = _mm256_loadu_si256((const __m256i *)((const int16_t *)x[j].s + 16 * b));
        __m512i a[RX_GEMV][8];
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++) {
            const uint8_t *blk = row[r] + 210 * b;
#if PF_DIST
            _mm_prefetch((const char *)(blk + PF_DIST), PF_HINT);
            _mm_prefetch((const char *)(blk + PF_DIST + 64), PF_HINT);
            _mm_prefetch((const char *)(blk + PF_DIST + 128), PF_HINT);
            _mm_prefetch((const char *)(blk + PF_DIST + 192), PF_HINT);
#endif
            __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
            __m512i scz = _mm512_castsi256_si512(sc16);
            __m512i u[4], S[4];
            q6k_values(blk, k6, u);
            for (int k = 0; k < 4; k++)
                S[k] = _mm512_permutexvar_epi16(sidx[k], scz);
            for (int j = 0; j < RX; j++) {
                const int8_t *xq = x[j].qs + 256 * b;
                /* -32 * sum_k sc_k * bsum_k, as 8 partials in the low half */
                __m256i corr = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs[j]), 5);
                __m512i v = _mm512_inserti64x4(_mm512_setzero_si512(),
                                               _mm256_sub_epi32(_mm256_setzero_si256(), corr), 0);
                for (int k = 0; k < 4; k++)
                    v = _mm512_dpwssd_epi32(
                        v, _mm512_maddubs_epi16(u[k], _mm512_loadu_si512(xq + 64 * k)), S[k]);
                a[j][r] = v;
            }
        }
        /* d is the block's last 2 bytes: read 206..209, not past the row */
        __m256i h = _mm256_i32gather_epi32((const int *)(base + 210 * b + 206), vidx, 1);
        __m256 d = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(h, 16)));
        for (int j = 0; j < RX; j++) {
            __m256 A = _mm256_cvtepi32_ps(tree8x16(a[j]));
            acc[j] = _mm256_fmadd_ps(A, _mm256_mul_ps(d, _mm256_set1_ps(x[j].d[b])), acc[j]);
        }
    }
    for (int j = 0; j < RX; j++)
        _mm256_mask_storeu_ps(m->y + (r0 + j) * m->y_stride + o0,
                              (__mmask8)((1u << n) - 1), acc[j]);
}

/* Rows [o0, o1) against activation rows [r0, r0 + RX). */
static AI void gemv_rx(const int RX, const struct kc_mm *m, int64_t o0,
                       int64_t o1, int64_t r0)
{
    switch (m->dt) {
    case K_Q8_0:
        for (int64_t o = o0; o < o1; o += 16)
            q8_0_gemv16(RX, m, o, o1 - o >= 16 ? 16 : (int)(o1 - o), r0);
        break;
    case K_Q4_K:
        for (int64_t o = o0; o < o1; o += 8)
            q4_k_gemv8(RX, m, o, o1 - o >= 8 ? 8 : (int)(o1 - o), r0);
        break;
    default:
        for (int64_t o = o0; o < o1; o += 8)
            q6_k_gemv8(RX, m, o, o1 - o >= 8 ? 8 : (int)(o1 - o), r0);
        break;
    }
}

/* Small batches (decode of a few sequences): each weight block is unpacked
 * once and used for up to RX_GEMV activation rows, no repacking. */
#ifndef RX_CAP
#define RX_CAP 4
#endif
static void mm_q_gemv(const struct kc_mm *m, int64_t o0, int64_t o1)
{
    for (int64_t r = 0; r < m->n_x;) {
        int64_t left = m->n_x - r;
        switch (left < RX_CAP ? left : RX_CAP) {
        case 1:
            gemv_rx(1, m, o0, o1, r);
            r += 1;
            break;
        case 2:
            gemv_rx(2, m, o0, o1, r);
            r += 2;
            break;
        case 3:
            gemv_rx(3, m, o0, o1, r);
            r += 3;
            break;
        default:
            gemv_rx(4, m, o0, o1, r);
            r += 4;
            break;
        }
    }
}

/* ------------------------------------ int8, many rows: repacked panels */

/* Panel of 16 weight rows over all columns, lane j = row j:
 *   P   groups of 4 consecutive (in x's order) unsigned weight bytes,
 *       (G, 16 lanes, 4) with G = cols / 4; Q8_0 stores w + 128
 *   f0  (nb, 16) f32: Q8_0 d, Q4_K d, Q6_K d
 *   f1  (nb, 16) f32: Q4_K dmin
 *   i0  Q4_K (nb, 8, 16) int32 sub-block scales; Q6_K (nb, 16, 16)
 *   i1  Q4_K (nb, 4, 16) int32: mins of sub-blocks 2k | 2k+1 << 16 */
struct panel {
    uint8_t *P;
    float *f0, *f1;
    int32_t *i0, *i1;
};

static struct panel panel_at(const struct kc_mm *m, void *work)
{
    int64_t nb = m->xl.nb;
    uint8_t *p = work;
    struct panel pn;
    pn.P = p;
    p += kc_align64(16 * m->cols);
    pn.f0 = (float *)p;
    p += 64 * nb;
    pn.f1 = (float *)p;
    p += 64 * nb;
    pn.i0 = (int32_t *)p;
    p += 64 * 16 * nb;
    pn.i1 = (int32_t *)p;
    return pn;
}

/* Int8 batches up to this many rows take the one-row kernels (each weight
 * block unpacked once per 4 rows), larger ones the repacked panels. */
#ifndef GEMV_MAX_NX
#define GEMV_MAX_NX 4
#endif

/* Float batches from this many rows take the K-blocked tiles. */
#ifndef FB_MIN_NX
#define FB_MIN_NX 4
#endif

static size_t panel_bytes(const struct kc_mm *m)
{
    int64_t nb = m->cols / (m->dt == K_Q8_0 ? 32 : 256);
    return (size_t)(kc_align64(16 * m->cols) + 64 * nb * (2 + 16 + 4));
}

/* Panels repacked together: as many as fit 512 KB, at most 4, so that a
 * block of activation rows is read once per group of panels. */
static int panels_per_group(const struct kc_mm *m)
{
    int64_t g = (512 * 1024) / (int64_t)panel_bytes(m);
    return g < 1 ? 1 : (g > 4 ? 4 : (int)g);
}

size_t kc_mm_work_avx512(const struct kc_mm *m)
{
    if (m->layout == K_LAYOUT_X32)
        return 0;
    if (m->dt == K_F32 || m->dt == K_F16 || m->dt == K_BF16)
        return m->n_x >= FB_MIN_NX
                   ? (size_t)((m->n_x < XB ? m->n_x : XB) * 16 * 16 * 4)
                   : 0;
    if (m->n_x <= GEMV_MAX_NX)
        return 0;
    return panel_bytes(m) * (size_t)panels_per_group(m);
}

/* In place: r[j] lane l becomes r[l] lane j (a 16 x 16 dword transpose:
 * two unpack stages inside the 128-bit lanes, then 4 x 4 of the lanes). */
static AI void transpose16(__m512i *r)
{
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    /* u[4i + k], 128-bit lane L: rows 4i..4i+3 of column 4L + k */
    for (int k = 0; k < 4; k++) {
        __m512i s0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44);
        __m512i s1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xee);
        __m512i s2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44);
        __m512i s3 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xee);
        r[k] = _mm512_shuffle_i32x4(s0, s2, 0x88);
        r[4 + k] = _mm512_shuffle_i32x4(s0, s2, 0xdd);
        r[8 + k] = _mm512_shuffle_i32x4(s1, s3, 0x88);
        r[12 + k] = _mm512_shuffle_i32x4(s1, s3, 0xdd);
    }
}

/* Q8_0 blocks b and b + 1 (when it exists) of 16 rows into the panel. */
static AI void repack_q8_0(const uint8_t *const *row, int64_t b, int two,
                           struct panel pn)
{
    __m512i r[16];
    for (int j = 0; j < 16; j++) {
        const uint8_t *p = row[j] + 34 * b + 2;
        __m256i lo = _mm256_loadu_si256((const __m256i *)p);
        __m256i hi = two ? _mm256_loadu_si256((const __m256i *)(p + 34))
                         : _mm256_setzero_si256();
        r[j] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
    transpose16(r);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int g = 0; g < (two ? 16 : 8); g++)
        _mm512_store_si512(pn.P + (8 * b + g) * 64, _mm512_xor_si512(r[g], flip));
}

/* Q4_K block b of 16 rows: the nibbles in x's permuted order, the scales
 * and mins as int32 lanes. */
static AI void repack_q4_k(const uint8_t *const *row, int64_t b, struct panel pn)
{
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    __m512i ch[4][16];
    __m512i sm[16];
    for (int j = 0; j < 16; j++) {
        const uint8_t *blk = row[j] + 144 * b;
        __m512i nib[4];
        q4k_nibbles(blk, lo4, nib);
        for (int c = 0; c < 4; c++)
            ch[c][j] = nib[c];
        uint64_t mn, sc = kc_q4k_scales64(blk + 4, &mn);
        /* lanes 0-7 the scales, 8-15 the mins */
        sm[j] = _mm512_cvtepu8_epi32(_mm_set_epi64x((long long)mn, (long long)sc));
    }
    for (int c = 0; c < 4; c++) {
        transpose16(ch[c]);
        for (int gg = 0; gg < 16; gg++)
            _mm512_store_si512(pn.P + (64 * b + 16 * c + gg) * 64, ch[c][gg]);
    }
    transpose16(sm);
    for (int s = 0; s < 8; s++)
        _mm512_store_si512(pn.i0 + (8 * b + s) * 16, sm[s]);
    for (int k = 0; k < 4; k++)
        _mm512_store_si512(pn.i1 + (4 * b + k) * 16,
                           _mm512_or_si512(sm[8 + 2 * k],
                                           _mm512_slli_epi32(sm[9 + 2 * k], 16)));
}

/* Q6_K block b of 16 rows: the 6-bit values in natural order, the scales
 * sign-extended to int32 lanes. */
static AI void repack_q6_k(const uint8_t *const *row, int64_t b, struct panel pn)
{
    const struct q6k_consts k6 = q6k_consts();
    __m512i ch[4][16];
    __m512i sc[16];
    for (int j = 0; j < 16; j++) {
        const uint8_t *blk = row[j] + 210 * b;
        __m512i u[4];
        q6k_values(blk, k6, u);
        for (int c = 0; c < 4; c++)
            ch[c][j] = u[c];
        sc[j] = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 192)));
    }
    for (int c = 0; c < 4; c++) {
        transpose16(ch[c]);
        for (int gg = 0; gg < 16; gg++)
            _mm512_store_si512(pn.P + (64 * b + 16 * c + gg) * 64, ch[c][gg]);
    }
    transpose16(sc);
    for (int k = 0; k < 16; k++)
        _mm512_store_si512(pn.i0 + (16 * b + k) * 16, sc[k]);
}

static void repack(const struct kc_mm *m, int64_t o0, int n, struct panel pn)
{
    const uint8_t *row[16];
    int32_t off[16];
    kc_group_rows(m, o0, n, 16, row, off);
    const __m512i vidx = _mm512_loadu_si512(off);
    const uint8_t *base = m->w + o0 * m->w_stride;
    int64_t nb = m->xl.nb, bb = k_dtype_block_bytes(m->dt);
    for (int64_t b = 0; b < nb; b++) {
#if PF_DIST
        for (int j = 0; j < 16; j++)
            for (int64_t l = 0; l < bb; l += 64)
                _mm_prefetch((const char *)(row[j] + bb * b + l + PF_DIST), PF_HINT);
#endif
        if (m->dt == K_Q8_0) {
            if ((b & 1) == 0)
                repack_q8_0(row, b, b + 1 < nb, pn);
            __m512i h = _mm512_i32gather_epi32(vidx, base + 34 * b, 1);
            _mm512_store_ps(pn.f0 + 16 * b, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h)));
        } else if (m->dt == K_Q4_K) {
            repack_q4_k(row, b, pn);
            __m512i h = _mm512_i32gather_epi32(vidx, base + 144 * b, 1);
            _mm512_store_ps(pn.f0 + 16 * b, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h)));
            _mm512_store_ps(pn.f1 + 16 * b, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(
                                                _mm512_srli_epi32(h, 16))));
        } else {
            repack_q6_k(row, b, pn);
            /* d is the block's last 2 bytes: read 206..209 */
            __m512i h = _mm512_i32gather_epi32(vidx, base + 210 * b + 206, 1);
            _mm512_store_ps(pn.f0 + 16 * b, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(
                                                _mm512_srli_epi32(h, 16))));
        }
    }
}

#define RX_MAX 4

/* RX activation rows against the panel; y rows get lanes [0, n). */
static AI void panel_rows(const int RX, enum k_dtype dt, const struct kc_mm *m,
                          struct panel pn, int64_t r0, int64_t o0, int n)
{
    struct kc_xrow x[RX_MAX];
    for (int j = 0; j < RX; j++)
        x[j] = kc_xrow_at(m, r0 + j);
    __m512 f[RX_MAX];
    for (int j = 0; j < RX; j++)
        f[j] = _mm512_setzero_ps();
    int64_t nb = m->xl.nb;
    if (dt == K_Q8_0) {
        for (int64_t b = 0; b < nb; b++) {
            __m512i s[RX_MAX];
            for (int j = 0; j < RX; j++)
                s[j] = _mm512_set1_epi32(-128 * ((const int32_t *)x[j].s)[b]);
            const uint8_t *P = pn.P + 8 * b * 64;
            for (int g = 0; g < 8; g++) {
                __m512i p = _mm512_load_si512(P + 64 * g);
                for (int j = 0; j < RX; j++)
                    s[j] = _mm512_dpbusd_epi32(
                        s[j], p, _mm512_set1_epi32(load_i32(x[j].qs + 32 * b + 4 * g)));
            }
            __m512 dw = _mm512_load_ps(pn.f0 + 16 * b);
            for (int j = 0; j < RX; j++)
                f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[j]),
                                       _mm512_mul_ps(dw, _mm512_set1_ps(x[j].d[b])), f[j]);
        }
    } else if (dt == K_Q4_K) {
        for (int64_t b = 0; b < nb; b++) {
            __m512i A[RX_MAX], B[RX_MAX];
            for (int j = 0; j < RX; j++) {
                A[j] = _mm512_setzero_si512();
                B[j] = _mm512_setzero_si512();
            }
            const uint8_t *P = pn.P + 64 * b * 64;
            for (int c = 0; c < 4; c++)
                for (int h = 0; h < 2; h++) {
                    __m512i t[RX_MAX];
                    for (int j = 0; j < RX; j++)
                        t[j] = _mm512_setzero_si512();
                    for (int gg = 0; gg < 8; gg++) {
                        int g = 16 * c + 8 * h + gg;
                        __m512i p = _mm512_load_si512(P + 64 * g);
                        for (int j = 0; j < RX; j++)
                            t[j] = _mm512_dpbusd_epi32(
                                t[j], p,
                                _mm512_set1_epi32(load_i32(x[j].qs + 256 * b + 4 * g)));
                    }
                    __m512i sc = _mm512_load_si512(
                        pn.i0 + (8 * b + kc_q4k_sub(c, h)) * 16);
                    for (int j = 0; j < RX; j++)
                        A[j] = _mm512_add_epi32(A[j], _mm512_mullo_epi32(t[j], sc));
                }
            for (int k = 0; k < 4; k++) {
                __m512i mp = _mm512_load_si512(pn.i1 + (4 * b + k) * 16);
                for (int j = 0; j < RX; j++)
                    B[j] = _mm512_dpwssd_epi32(
                        B[j], mp,
                        _mm512_set1_epi32(load_i32((const int16_t *)x[j].s + 16 * b + 2 * k)));
            }
            __m512 d = _mm512_load_ps(pn.f0 + 16 * b);
            __m512 dm = _mm512_load_ps(pn.f1 + 16 * b);
            for (int j = 0; j < RX; j++) {
                __m512 dx = _mm512_set1_ps(x[j].d[b]);
                f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(A[j]), _mm512_mul_ps(d, dx), f[j]);
                f[j] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(B[j]), _mm512_mul_ps(dm, dx), f[j]);
            }
        }
    } else {
        for (int64_t b = 0; b < nb; b++) {
            __m512i A[RX_MAX];
            for (int j = 0; j < RX; j++)
                A[j] = _mm512_setzero_si512();
            const uint8_t *P = pn.P + 64 * b * 64;
            for (int k = 0; k < 16; k++) {
                __m512i t[RX_MAX];
                for (int j = 0; j < RX; j++)
                    t[j] = _mm512_set1_epi32(-32 * ((const int16_t *)x[j].s)[16 * b + k]);
                for (int gg = 0; gg < 4; gg++) {
                    int g = 4 * k + gg;
                    __m512i p = _mm512_load_si512(P + 64 * g);
                    for (int j = 0; j < RX; j++)
                        t[j] = _mm512_dpbusd_epi32(
                            t[j], p, _mm512_set1_epi32(load_i32(x[j].qs + 256 * b + 4 * g)));
                }
                __m512i sc = _mm512_load_si512(pn.i0 + (16 * b + k) * 16);
                for (int j = 0; j < RX; j++)
                    A[j] = _mm512_add_epi32(A[j], _mm512_mullo_epi32(t[j], sc));
            }
            __m512 d = _mm512_load_ps(pn.f0 + 16 * b);
            for (int j = 0; j < RX; j++)
                f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(A[j]),
                                       _mm512_mul_ps(d, _mm512_set1_ps(x[j].d[b])), f[j]);
        }
    }
    for (int j = 0; j < RX; j++)
        _mm512_mask_storeu_ps(m->y + (r0 + j) * m->y_stride + o0, kc_mask16(n), f[j]);
}

static AI void panel_all(enum k_dtype dt, const struct kc_mm *m,
                         struct panel pn, int64_t o0, int n, int64_t r0,
                         int64_t r1)
{
    int64_t r = r0;
    for (; r + RX_MAX <= r1; r += RX_MAX)
        panel_rows(RX_MAX, dt, m, pn, r, o0, n);
    switch (r1 - r) {
    case 3:
        panel_rows(3, dt, m, pn, r, o0, n);
        break;
    case 2:
        panel_rows(2, dt, m, pn, r, o0, n);
        break;
    case 1:
        panel_rows(1, dt, m, pn, r, o0, n);
        break;
    default:
        break;
    }
}

static void mm_q_panels(const struct kc_mm *m, int64_t o0, int64_t o1,
                        void *work)
{
    int np_max = panels_per_group(m);
    size_t pb = panel_bytes(m);
    struct panel pn[4];
    for (int i = 0; i < np_max; i++)
        pn[i] = panel_at(m, (uint8_t *)work + i * pb);
    for (int64_t o = o0; o < o1; o += 16 * np_max) {
        int np = 0, n[4];
        for (; np < np_max && o + 16 * np < o1; np++) {
            int64_t left = o1 - (o + 16 * np);
            n[np] = left >= 16 ? 16 : (int)left;
            repack(m, o + 16 * np, n[np], pn[np]);
        }
        for (int64_t xb = 0; xb < m->n_x; xb += XB) {
            int64_t xe = xb + XB < m->n_x ? xb + XB : m->n_x;
            for (int i = 0; i < np; i++) {
                switch (m->dt) {
                case K_Q8_0:
                    panel_all(K_Q8_0, m, pn[i], o + 16 * i, n[i], xb, xe);
                    break;
                case K_Q4_K:
                    panel_all(K_Q4_K, m, pn[i], o + 16 * i, n[i], xb, xe);
                    break;
                default:
                    panel_all(K_Q6_K, m, pn[i], o + 16 * i, n[i], xb, xe);
                    break;
                }
            }
        }
    }
}

/* ------------------------------------- Q4_K in the packed layout (X32) */

/* The 8 scales of 16 rows (one 64-byte half of the packed scale parts)
 * as bytes sc0..3 | sc4..7 of each dword (kc_q4k_scales64 per dword). */
/* Byte o of a packed block given by its part pointers (kc_x32_parts); o
 * is a constant wherever this is inlined, so it costs nothing. */
static AI const uint8_t *x32_at(const uint8_t *const *pp, int o)
{
    return pp[o / KC_X32_PART] + o % KC_X32_PART;
}

static AI void x32_scales(const uint8_t *const *pp, int o, __m512i *sc_lo,
                          __m512i *sc_hi)
{
    const __m512i u0 = _mm512_loadu_si512(x32_at(pp, o));
    const __m512i u2 = _mm512_loadu_si512(x32_at(pp, o + 256));
    *sc_lo = _mm512_and_si512(u0, _mm512_set1_epi32(0x3f3f3f3f));
    *sc_hi = _mm512_ternarylogic_epi32(_mm512_and_si512(u2, _mm512_set1_epi32(0x0f0f0f0f)),
                                       _mm512_srli_epi32(u0, 2),
                                       _mm512_set1_epi32(0x30303030), 0xF8);
}

/* The same for the 8 mins. */
static AI void x32_mins(const uint8_t *const *pp, int o, __m512i *m_lo,
                        __m512i *m_hi)
{
    const __m512i u1 = _mm512_loadu_si512(x32_at(pp, o + 128));
    const __m512i u2 = _mm512_loadu_si512(x32_at(pp, o + 256));
    *m_lo = _mm512_and_si512(u1, _mm512_set1_epi32(0x3f3f3f3f));
    *m_hi = _mm512_ternarylogic_epi32(
        _mm512_and_si512(_mm512_srli_epi32(u2, 4), _mm512_set1_epi32(0x0f0f0f0f)),
        _mm512_srli_epi32(u1, 2), _mm512_set1_epi32(0x30303030), 0xF8);
}

/* The constants of q4k_x32_block, made once by its callers. */
struct x32_consts {
    __m512i lo4;
    __m512i bsel[4]; /* vpshufb: byte k of each dword, zero-extended */
    __m512i msel[2]; /* vpshufb: bytes 2k, 2k + 1 of each dword as int16 */
};

static AI struct x32_consts x32_consts(void)
{
    struct x32_consts k;
    k.lo4 = _mm512_set1_epi8(0x0f);
    for (int q = 0; q < 4; q++) {
        int8_t e[64];
        for (int i = 0; i < 64; i++)
            e[i] = (i & 3) == 0 ? (int8_t)((i & 15) + q) : (int8_t)-1;
        k.bsel[q] = _mm512_loadu_si512(e);
    }
    for (int q = 0; q < 2; q++) {
        int8_t e[64];
        for (int i = 0; i < 64; i++)
            e[i] = (i & 1) == 0 ? (int8_t)((i & 12) + 2 * q + ((i >> 1) & 1)) : (int8_t)-1;
        k.msel[q] = _mm512_loadu_si512(e);
    }
    return k;
}

/* One packed block (32 rows, kcpu.h; pp its parts) against block b of activation
 * rows x[0..RX): f0 gets rows 0-15, f1 rows 16-31. Per sub-block, tl sums
 * the low nibbles (rows 0-15) and tf the whole bytes (rows 0-15 plus 16
 * times rows 16-31), so rows 16-31 are (tf - tl) / 16, exact; the 16 is
 * taken out of their block sum A1 once per block. */
static AI void q4k_x32_block(const int RX, const struct x32_consts *k,
                             const uint8_t *const *pp, const struct kc_xrow *x, int64_t b,
                             __m512 *f0, __m512 *f1)
{
    __m512i sc_lo0, sc_hi0, sc_lo1, sc_hi1;
    x32_scales(pp, 128, &sc_lo0, &sc_hi0);
    x32_scales(pp, 192, &sc_lo1, &sc_hi1);
    __m512i A0[RX_GEMV], A1[RX_GEMV];
    for (int j = 0; j < RX; j++) {
        A0[j] = _mm512_setzero_si512();
        A1[j] = _mm512_setzero_si512();
    }
    /* unrolled whole: the x offsets become displacements */
#pragma GCC unroll 8
    for (int s = 0; s < 8; s++) {
        const __m512i sc0 = _mm512_shuffle_epi8(s < 4 ? sc_lo0 : sc_hi0, k->bsel[s & 3]);
        const __m512i sc1 = _mm512_shuffle_epi8(s < 4 ? sc_lo1 : sc_hi1, k->bsel[s & 3]);
        __m512i tl[RX_GEMV], tf[RX_GEMV];
        for (int j = 0; j < RX; j++) {
            tl[j] = _mm512_setzero_si512();
            tf[j] = _mm512_setzero_si512();
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            const __m512i w = _mm512_loadu_si512(x32_at(pp, 512 + 64 * (8 * s + i)));
            const __m512i wl = _mm512_and_si512(w, k->lo4);
            for (int j = 0; j < RX; j++) {
                const __m512i xb = _mm512_set1_epi32(
                    load_i32(x[j].qs + 256 * b + 4 * kc_x32_grp(s, i)));
                tl[j] = _mm512_dpbusd_epi32(tl[j], wl, xb);
                tf[j] = _mm512_dpbusd_epi32(tf[j], w, xb);
            }
        }
        for (int j = 0; j < RX; j++) {
            A0[j] = _mm512_add_epi32(A0[j], _mm512_mullo_epi32(tl[j], sc0));
            A1[j] = _mm512_add_epi32(
                A1[j], _mm512_mullo_epi32(_mm512_sub_epi32(tf[j], tl[j]), sc1));
        }
    }
    __m512i m_lo0, m_hi0, m_lo1, m_hi1;
    x32_mins(pp, 128, &m_lo0, &m_hi0);
    x32_mins(pp, 192, &m_lo1, &m_hi1);
    const __m512i h0 = _mm512_loadu_si512(x32_at(pp, 0));
    const __m512i h1 = _mm512_loadu_si512(x32_at(pp, 64));
    const __m512 d0 = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h0));
    const __m512 d1 = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h1));
    const __m512 dm0 = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h0, 16)));
    const __m512 dm1 = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h1, 16)));
    for (int j = 0; j < RX; j++) {
        const int16_t *xs = (const int16_t *)x[j].s + 16 * b;
        __m512i B0 = _mm512_setzero_si512(), B1 = _mm512_setzero_si512();
        for (int q = 0; q < 4; q++) {
            const __m512i xp = _mm512_set1_epi32(load_i32(xs + 2 * q));
            B0 = _mm512_dpwssd_epi32(
                B0, _mm512_shuffle_epi8(q < 2 ? m_lo0 : m_hi0, k->msel[q & 1]), xp);
            B1 = _mm512_dpwssd_epi32(
                B1, _mm512_shuffle_epi8(q < 2 ? m_lo1 : m_hi1, k->msel[q & 1]), xp);
        }
        const __m512 dx = _mm512_set1_ps(x[j].d[b]);
        const __m512i a1 = _mm512_srai_epi32(A1[j], 4);
        f0[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(A0[j]), _mm512_mul_ps(d0, dx), f0[j]);
        f0[j] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(B0), _mm512_mul_ps(dm0, dx), f0[j]);
        f1[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), _mm512_mul_ps(d1, dx), f1[j]);
        f1[j] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(B1), _mm512_mul_ps(dm1, dx), f1[j]);
    }
}

/* The activation rows of a packed kernel and its zeroed accumulators:
 * f0 for rows 0-15 of the group, f1 for rows 16-31. */
static AI void x32_start(const int RX, const struct kc_mm *m, int64_t r0,
                         struct kc_xrow *x, __m512 *f0, __m512 *f1)
{
    for (int j = 0; j < RX; j++) {
        x[j] = kc_xrow_at(m, r0 + j);
        f0[j] = _mm512_setzero_ps();
        f1[j] = _mm512_setzero_ps();
    }
}

/* The n valid outputs of group g for each activation row. */
static AI void x32_store(const int RX, const struct kc_mm *m, int64_t g, int n,
                         int64_t r0, const __m512 *f0, const __m512 *f1)
{
    const int n0 = n < 16 ? n : 16, n1 = n - n0;
    for (int j = 0; j < RX; j++) {
        float *y = m->y + (r0 + j) * m->y_stride + 32 * g;
        _mm512_mask_storeu_ps(y, kc_mask16(n0), f0[j]);
        if (n1 > 0)
            _mm512_mask_storeu_ps(y + 16, kc_mask16(n1), f1[j]);
    }
}

/* Rows 32 g .. 32 g + n - 1 of a K_LAYOUT_X32 Q4_K matrix against
 * activation rows [r0, r0 + RX). The weights stream in order from the 4
 * planes, 1152 bytes of each per block of 32 rows. */
static AI void q4k_x32(const int RX, const struct kc_mm *m, int64_t g, int n,
                       int64_t r0)
{
    const int64_t nb = m->xl.nb;
    const uint8_t *pp[KC_X32_PLANES];
    kc_x32_parts(m->w, m->rows, nb, g, 0, pp);
    const struct x32_consts k = x32_consts();
    struct kc_xrow x[RX_GEMV];
    __m512 f0[RX_GEMV], f1[RX_GEMV];
    x32_start(RX, m, r0, x, f0, f1);
    for (int64_t b = 0; b < nb; b++) {
#if X32_PF
        for (int q = 0; q < KC_X32_PLANES; q++)
            for (int l = 0; l < KC_X32_PART; l += 64 * X32_PF_STEP)
                _mm_prefetch((const char *)(pp[q] + X32_PF + l), PF_HINT);
#endif
        q4k_x32_block(RX, &k, pp, x, b, f0, f1);
        for (int q = 0; q < KC_X32_PLANES; q++)
            pp[q] += KC_X32_PART;
    }
    x32_store(RX, m, g, n, r0, f0, f1);
}

/* Q8_0, rows 32 g .. 32 g + n - 1 of a K_LAYOUT_X32 matrix (kcpu.h)
 * against activation rows [r0, r0 + RX): 16 vpdpbusd per block of 32
 * rows, each lane a row's whole block sum (plus 128 times the x block
 * sum, taken out first), then the f32 chain per lane. */
static AI void q8_x32(const int RX, const struct kc_mm *m, int64_t g, int n,
                      int64_t r0)
{
    const int64_t nb = m->xl.nb;
    struct kc_xrow x[RX_GEMV];
    __m512 f0[RX_GEMV], f1[RX_GEMV];
    x32_start(RX, m, r0, x, f0, f1);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = kc_x32_q8_block(m->w, m->rows, nb, g, b);
#if X32_PF
        /* the same plane 4 blocks on: X32_PF bytes of it ahead */
        for (int l = 0; l < KC_X32_Q8; l += 64)
            _mm_prefetch((const char *)(p + X32_PF + l), PF_HINT);
#endif
        const __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        const __m512 d1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)));
        for (int j = 0; j < RX; j++) {
            const int8_t *xq = x[j].qs + 32 * b;
            __m512i s0 = _mm512_set1_epi32(-128 * ((const int32_t *)x[j].s)[b]), s1 = s0;
#pragma GCC unroll 8
            for (int q = 0; q < 8; q++) {
                const __m512i xb = _mm512_set1_epi32(load_i32(xq + 4 * q));
                s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512(p + 64 + 64 * q), xb);
                s1 = _mm512_dpbusd_epi32(s1, _mm512_loadu_si512(p + 576 + 64 * q), xb);
            }
            const __m512 dx = _mm512_set1_ps(x[j].d[b]);
            f0[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(d0, dx), f0[j]);
            f1[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_mul_ps(d1, dx), f1[j]);
        }
    }
    x32_store(RX, m, g, n, r0, f0, f1);
}

/* One group of a packed matrix against RX activation rows. */
static AI void x32_rows(const int RX, const struct kc_mm *m, int64_t g, int n,
                        int64_t r0)
{
    if (m->dt == K_Q8_0)
        q8_x32(RX, m, g, n, r0);
    else
        q4k_x32(RX, m, g, n, r0);
}

/* Packed rows [o0, o1) (o0 a multiple of 32): one group of 32 rows at a
 * time against every activation row, 4 at a time, so that the group's
 * weights are read from memory once and from cache for the rest. */
static void mm_x32(const struct kc_mm *m, int64_t o0, int64_t o1)
{
    for (int64_t o = o0; o < o1; o += 32) {
        int n = o1 - o < 32 ? (int)(o1 - o) : 32;
        int64_t g = o / 32, r = 0;
        for (; r + 4 <= m->n_x; r += 4)
            x32_rows(4, m, g, n, r);
        switch (m->n_x - r) {
        case 3:
            x32_rows(3, m, g, n, r);
            break;
        case 2:
            x32_rows(2, m, g, n, r);
            break;
        case 1:
            x32_rows(1, m, g, n, r);
            break;
        default:
            break;
        }
    }
}

/* -------------------------------------------------------------- entry */

void kc_mm_rows_avx512(const struct kc_mm *m, int64_t o0, int64_t o1,
                       void *work)
{
    switch (m->dt) {
    case K_F32:
        if (m->n_x >= FB_MIN_NX)
            mm_float_blocked(m, o0, o1, K_F32, work);
        else
            mm_float(m, o0, o1, K_F32);
        break;
    case K_F16:
        if (m->n_x >= FB_MIN_NX)
            mm_float_blocked(m, o0, o1, K_F16, work);
        else
            mm_float(m, o0, o1, K_F16);
        break;
    case K_BF16:
        if (m->n_x >= FB_MIN_NX)
            mm_float_blocked(m, o0, o1, K_BF16, work);
        else
            mm_float(m, o0, o1, K_BF16);
        break;
    default:
        if (m->layout == K_LAYOUT_X32)
            mm_x32(m, o0, o1);
        else if (m->n_x <= GEMV_MAX_NX)
            mm_q_gemv(m, o0, o1);
        else
            mm_q_panels(m, o0, o1, work);
        break;
    }
}
