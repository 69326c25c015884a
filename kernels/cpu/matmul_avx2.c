/* matmul_avx2.c: k_matmul on AVX2 + FMA + F16C, in the canonical orders
 * of kcpu.h, for CPUs without AVX-512 VNNI.
 *   float weights: tiles of 2 weight rows x up to 2 activation rows; the 16
 *     canonical lanes are two ymm per pair.
 *   int8: 8 weight rows at a time, lane r = row r after a transpose tree of
 *     the per-row partial sums; up to 4 activation rows share each unpacked
 *     weight block (maddubs with |w| and sign(x, w) for Q8_0, the unsigned
 *     nibbles and 6-bit values directly for the K-quants), and a group of 8
 *     rows is reused from cache for every activation row of a batch.
 * Compiled with -mavx2 -mfma -mf16c; called only after detection.
 */
#include "kernels/cpu/simd_avx2.h"

#define AI KC_AI

static AI int32_t hsum8(__m256i v)
{
    __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4e));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xb1));
    return _mm_cvtsi128_si32(a);
}

/* ------------------------------------------------- activation quantizing */

/* 32 floats -> 32 int8 as quant.c rounds them; returns the 4 sums of 8. */
static AI void quant32(const float *x, __m256 vid, int8_t *q, __m256i *sums)
{
    __m256i qi[4];
    for (int z = 0; z < 4; z++) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + 8 * z), vid);
        __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        v = _mm256_max_ps(v, _mm256_set1_ps(-127.0f));
        v = _mm256_min_ps(v, _mm256_set1_ps(127.0f));
        v = _mm256_andnot_ps(nan, v);
        qi[z] = _mm256_cvtps_epi32(v);
    }
    __m256i p01 = _mm256_packs_epi32(qi[0], qi[1]);
    __m256i p23 = _mm256_packs_epi32(qi[2], qi[3]);
    __m256i b = _mm256_packs_epi16(p01, p23);
    b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, b);
    for (int z = 0; z < 4; z++)
        sums[z] = qi[z];
}

static AI float block_amax(const float *x, int n)
{
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8)
        vmax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), absm), vmax);
    float l[8], amax = 0.0f;
    _mm256_storeu_ps(l, vmax);
    for (int j = 0; j < 8; j++)
        amax = l[j] > amax ? l[j] : amax;
    return amax;
}

void kc_quantize_avx2(const struct kc_mm *m, int64_t r0, int64_t r1)
{
    const struct kc_xq *l = &m->xl;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = m->x + r * m->x_stride;
        uint8_t *row = (uint8_t *)m->xq + r * l->stride;
        int8_t *qs = (int8_t *)(row + l->qs_off);
        float *d = (float *)(row + l->d_off);
        int bl = (int)l->block;
        for (int64_t b = 0; b < l->nb; b++) {
            const float *xb = x + bl * b;
            float amax = block_amax(xb, bl);
            __m256 vid = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            d[b] = amax / 127.0f;
            int32_t part[16];
            int8_t q[256];
            for (int c = 0; c < bl; c += 32) {
                __m256i s[4];
                quant32(xb + c, vid, q + c, s);
                part[c / 16] = hsum8(_mm256_add_epi32(s[0], s[1]));
                part[c / 16 + 1] = hsum8(_mm256_add_epi32(s[2], s[3]));
            }
            if (m->dt == K_Q8_0) {
                memcpy(qs + 32 * b, q, 32);
                ((int32_t *)(row + l->s_off))[b] = part[0] + part[1];
                continue;
            }
            int8_t *qb = qs + 256 * b;
            if (m->dt == K_Q4_K)
                for (int p = 0; p < 8; p++) /* 32-byte chunk p of the order */
                    memcpy(qb + 32 * p, q + 32 * kc_q4k_sub(p >> 1, p & 1), 32);
            else
                memcpy(qb, q, 256);
            kc_xq_ksums(m->dt, part, (int16_t *)(row + l->s_off) + 16 * b);
        }
    }
}

/* ------------------------------------------------------- float weights */

static AI __m256 cvt8(enum k_dtype dt, const void *p)
{
    if (dt == K_F32)
        return _mm256_loadu_ps((const float *)p);
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (dt == K_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 16 weights from element i; the tail (left < 16) comes through a zeroed
 * copy so nothing past the row is read. */
static AI void load_w16(enum k_dtype dt, const uint8_t *row, int64_t i,
                        int64_t left, __m256 *lo, __m256 *hi)
{
    int es = dt == K_F32 ? 4 : 2;
    if (left >= 16) {
        *lo = cvt8(dt, row + es * i);
        *hi = cvt8(dt, row + es * (i + 8));
        return;
    }
    uint8_t tmp[64] = {0};
    memcpy(tmp, row + es * i, (size_t)(es * left));
    *lo = cvt8(dt, tmp);
    *hi = cvt8(dt, tmp + 8 * es);
}

/* y[c][a] for NW weight rows and NX activation rows. */
static AI void ftile(const int NW, const int NX, enum k_dtype dt,
                     const uint8_t *const *w, const float *const *x,
                     int64_t K, float *const *y)
{
    __m256 acc[2][2][2];
    for (int a = 0; a < NW; a++)
        for (int c = 0; c < NX; c++)
            acc[a][c][0] = acc[a][c][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= K; i += 16) {
        __m256 wv[2][2];
        for (int a = 0; a < NW; a++)
            load_w16(dt, w[a], i, 16, &wv[a][0], &wv[a][1]);
        for (int c = 0; c < NX; c++) {
            __m256 x0 = _mm256_loadu_ps(x[c] + i), x1 = _mm256_loadu_ps(x[c] + i + 8);
            for (int a = 0; a < NW; a++) {
                acc[a][c][0] = _mm256_fmadd_ps(wv[a][0], x0, acc[a][c][0]);
                acc[a][c][1] = _mm256_fmadd_ps(wv[a][1], x1, acc[a][c][1]);
            }
        }
    }
    if (i < K) {
        __m256i k0 = kc_mask8(K - i), k1 = kc_mask8(K - i - 8);
        __m256 m0 = _mm256_castsi256_ps(k0), m1 = _mm256_castsi256_ps(k1);
        __m256 wv[2][2];
        for (int a = 0; a < NW; a++)
            load_w16(dt, w[a], i, K - i, &wv[a][0], &wv[a][1]);
        for (int c = 0; c < NX; c++) {
            __m256 x0 = _mm256_maskload_ps(x[c] + i, k0);
            __m256 x1 = _mm256_maskload_ps(x[c] + i + 8, k1);
            for (int a = 0; a < NW; a++) {
                acc[a][c][0] = _mm256_blendv_ps(
                    acc[a][c][0], _mm256_fmadd_ps(wv[a][0], x0, acc[a][c][0]), m0);
                acc[a][c][1] = _mm256_blendv_ps(
                    acc[a][c][1], _mm256_fmadd_ps(wv[a][1], x1, acc[a][c][1]), m1);
            }
        }
    }
    for (int a = 0; a < NW; a++)
        for (int c = 0; c < NX; c++)
            y[c][a] = kc_tree16_ymm(acc[a][c][0], acc[a][c][1]);
}

static AI void mm_float(const struct kc_mm *m, int64_t o0, int64_t o1,
                        enum k_dtype dt)
{
    for (int64_t o = o0; o < o1;) {
        int nw = o1 - o >= 2 ? 2 : 1;
        const uint8_t *w[2];
        for (int a = 0; a < nw; a++)
            w[a] = m->w + (o + a) * m->w_stride;
        for (int64_t r = 0; r < m->n_x; r += 2) {
            int nx = m->n_x - r >= 2 ? 2 : 1;
            const float *x[2];
            float *y[2];
            for (int c = 0; c < nx; c++) {
                x[c] = m->x + (r + c) * m->x_stride;
                y[c] = m->y + (r + c) * m->y_stride + o;
            }
            if (nw == 2 && nx == 2)
                ftile(2, 2, dt, w, x, m->cols, y);
            else if (nw == 2)
                ftile(2, 1, dt, w, x, m->cols, y);
            else if (nx == 2)
                ftile(1, 2, dt, w, x, m->cols, y);
            else
                ftile(1, 1, dt, w, x, m->cols, y);
        }
        o += nw;
    }
}

/* ------------------------------------------------------------ int8 */

/* 8 ymm of int32 partials -> their 8 sums, lane r = sum of a[r]. */
static AI __m256i tree8(const __m256i *a)
{
    __m256i t[4];
    for (int p = 0; p < 4; p++)
        t[p] = _mm256_add_epi32(_mm256_unpacklo_epi32(a[2 * p], a[2 * p + 1]),
                                _mm256_unpackhi_epi32(a[2 * p], a[2 * p + 1]));
    __m256i u0 = _mm256_add_epi32(_mm256_unpacklo_epi64(t[0], t[1]),
                                  _mm256_unpackhi_epi64(t[0], t[1]));
    __m256i u1 = _mm256_add_epi32(_mm256_unpacklo_epi64(t[2], t[3]),
                                  _mm256_unpackhi_epi64(t[2], t[3]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                            _mm256_permute2x128_si256(u0, u1, 0x31));
}

/* The f16 at byte offset `at` of 8 rows (offsets off) as 8 floats; hi
 * takes the f16 two bytes further. */
static AI __m256 f16x8(const uint8_t *base, __m256i vidx, int64_t at, int hi)
{
    __m256i h = _mm256_i32gather_epi32((const int *)(base + at), vidx, 1);
    if (hi)
        h = _mm256_srli_epi32(h, 16);
    h = _mm256_and_si256(h, _mm256_set1_epi32(0xffff));
    __m256i p = _mm256_packus_epi32(h, _mm256_setzero_si256());
    p = _mm256_permute4x64_epi64(p, 0x08);
    return _mm256_cvtph_ps(_mm256_castsi256_si128(p));
}

#define RX 4

/* One group of up to 8 weight rows against NX activation rows from r0;
 * lane r of the results is row o0 + r. */
static AI void group_q(const int NX, enum k_dtype dt, const struct kc_mm *m,
                       int64_t o0, int n, int64_t r0)
{
    const uint8_t *row[8];
    int32_t off[8];
    kc_group_rows(m, o0, n, 8, row, off);
    const __m256i vidx = _mm256_loadu_si256((const __m256i *)off);
    const uint8_t *base = m->w + o0 * m->w_stride;
    struct kc_xrow x[RX];
    __m256 acc[RX];
    for (int j = 0; j < NX; j++) {
        x[j] = kc_xrow_at(m, r0 + j);
        acc[j] = _mm256_setzero_ps();
    }
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i lo4 = _mm256_set1_epi8(0x0f), hi2 = _mm256_set1_epi8(0x30);
    for (int64_t b = 0; b < m->xl.nb; b++) {
        __m256i part[RX][8];
        __m128i bpart[RX][8];
        for (int r = 0; r < 8; r++) {
            if (dt == K_Q8_0) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(row[r] + 34 * b + 2));
                __m256i aw = _mm256_abs_epi8(w);
                for (int j = 0; j < NX; j++) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(x[j].qs + 32 * b));
                    __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w));
                    part[j][r] = _mm256_madd_epi16(p, ones);
                }
            } else if (dt == K_Q4_K) {
                const uint8_t *blk = row[r] + 144 * b;
                uint64_t mn, sc = kc_q4k_scales64(blk + 4, &mn);
                __m256i nib[8];
                int xo[8];
                short sv[8];
                for (int k = 0; k < 4; k++) {
                    __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * k));
                    int ce = 2 * (k >> 1), h = k & 1;
                    nib[2 * k] = _mm256_and_si256(q, lo4);
                    nib[2 * k + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), lo4);
                    xo[2 * k] = 64 * ce + 32 * h;
                    xo[2 * k + 1] = 64 * (ce + 1) + 32 * h;
                    sv[2 * k] = (short)((sc >> (8 * kc_q4k_sub(ce, h))) & 0xff);
                    sv[2 * k + 1] = (short)((sc >> (8 * kc_q4k_sub(ce + 1, h))) & 0xff);
                }
                __m128i mv = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mn));
                for (int j = 0; j < NX; j++) {
                    const int8_t *xb = x[j].qs + 256 * b;
                    __m256i s = _mm256_setzero_si256();
                    for (int k = 0; k < 8; k++) {
                        __m256i p = _mm256_maddubs_epi16(
                            nib[k], _mm256_loadu_si256((const __m256i *)(xb + xo[k])));
                        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, _mm256_set1_epi16(sv[k])));
                    }
                    part[j][r] = s;
                    bpart[j][r] = _mm_madd_epi16(
                        mv, _mm_loadu_si128((const __m128i *)((const int16_t *)x[j].s + 16 * b)));
                }
            } else {
                const uint8_t *blk = row[r] + 210 * b;
                __m128i scb = _mm_loadu_si128((const __m128i *)(blk + 192));
                __m256i sc2 = _mm256_broadcastsi128_si256(scb);
                __m256i sc16 = _mm256_cvtepi8_epi16(scb);
                __m256i u[8];
                for (int nh = 0; nh < 2; nh++) {
                    __m256i L0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * nh));
                    __m256i L1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * nh + 32));
                    __m256i H = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * nh));
                    u[4 * nh + 0] = _mm256_or_si256(_mm256_and_si256(L0, lo4),
                                                    _mm256_and_si256(_mm256_slli_epi16(H, 4), hi2));
                    u[4 * nh + 1] = _mm256_or_si256(_mm256_and_si256(L1, lo4),
                                                    _mm256_and_si256(_mm256_slli_epi16(H, 2), hi2));
                    u[4 * nh + 2] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(L0, 4), lo4), _mm256_and_si256(H, hi2));
                    u[4 * nh + 3] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(L1, 4), lo4),
                        _mm256_and_si256(_mm256_srli_epi16(H, 2), hi2));
                }
                /* u[t] holds the 16-element sub-blocks 2t, 2t+1: int16
                 * lanes take their scale, sign-extended from the high byte */
                __m256i sv[8];
                for (int t = 0; t < 8; t++) {
                    char c0 = (char)(2 * t), c1 = (char)(2 * t + 1), z = (char)0x80;
                    __m256i ctl = _mm256_setr_epi8(
                        z, c0, z, c0, z, c0, z, c0, z, c0, z, c0, z, c0, z, c0,
                        z, c1, z, c1, z, c1, z, c1, z, c1, z, c1, z, c1, z, c1);
                    sv[t] = _mm256_srai_epi16(_mm256_shuffle_epi8(sc2, ctl), 8);
                }
                for (int j = 0; j < NX; j++) {
                    const int8_t *xb = x[j].qs + 256 * b;
                    __m256i bs = _mm256_loadu_si256(
                        (const __m256i *)((const int16_t *)x[j].s + 16 * b));
                    __m256i s = _mm256_sub_epi32(_mm256_setzero_si256(),
                                                 _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
                    for (int t = 0; t < 8; t++) {
                        __m256i p = _mm256_maddubs_epi16(
                            u[t], _mm256_loadu_si256((const __m256i *)(xb + 32 * t)));
                        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, sv[t]));
                    }
                    part[j][r] = s;
                }
            }
        }
        if (dt == K_Q8_0) {
            __m256 dw = f16x8(base, vidx, 34 * b, 0);
            for (int j = 0; j < NX; j++) {
                __m256 S = _mm256_cvtepi32_ps(tree8(part[j]));
                acc[j] = _mm256_fmadd_ps(S, _mm256_mul_ps(dw, _mm256_set1_ps(x[j].d[b])), acc[j]);
            }
        } else if (dt == K_Q4_K) {
            __m256 d = f16x8(base, vidx, 144 * b, 0);
            __m256 dm = f16x8(base, vidx, 144 * b, 1);
            for (int j = 0; j < NX; j++) {
                __m256 A = _mm256_cvtepi32_ps(tree8(part[j]));
                __m256 B = _mm256_cvtepi32_ps(kc_tree8x4(bpart[j]));
                __m256 dx = _mm256_set1_ps(x[j].d[b]);
                acc[j] = _mm256_fmadd_ps(A, _mm256_mul_ps(d, dx), acc[j]);
                acc[j] = _mm256_fnmadd_ps(B, _mm256_mul_ps(dm, dx), acc[j]);
            }
        } else {
            /* d is the block's last 2 bytes: read 206..209, not past the row */
            __m256 d = f16x8(base, vidx, 210 * b + 206, 1);
            for (int j = 0; j < NX; j++) {
                __m256 A = _mm256_cvtepi32_ps(tree8(part[j]));
                acc[j] = _mm256_fmadd_ps(A, _mm256_mul_ps(d, _mm256_set1_ps(x[j].d[b])), acc[j]);
            }
        }
    }
    __m256i k = kc_mask8(n);
    for (int j = 0; j < NX; j++)
        _mm256_maskstore_ps(m->y + (r0 + j) * m->y_stride + o0, k, acc[j]);
}

static AI void mm_q(enum k_dtype dt, const struct kc_mm *m, int64_t o0,
                    int64_t o1)
{
    /* each group of 8 rows stays in cache while every activation row
     * passes over it, RX at a time */
    for (int64_t o = o0; o < o1; o += 8) {
        int n = o1 - o >= 8 ? 8 : (int)(o1 - o);
        int64_t r = 0;
        for (; r + RX <= m->n_x; r += RX)
            group_q(RX, dt, m, o, n, r);
        switch (m->n_x - r) {
        case 3:
            group_q(3, dt, m, o, n, r);
            break;
        case 2:
            group_q(2, dt, m, o, n, r);
            break;
        case 1:
            group_q(1, dt, m, o, n, r);
            break;
        default:
            break;
        }
    }
}

/* -------------------------------------------------------------- entry */

size_t kc_mm_work_avx2(const struct kc_mm *m)
{
    (void)m;
    return 0;
}

void kc_mm_rows_avx2(const struct kc_mm *m, int64_t o0, int64_t o1, void *work)
{
    (void)work;
    switch (m->dt) {
    case K_F32:
        mm_float(m, o0, o1, K_F32);
        break;
    case K_F16:
        mm_float(m, o0, o1, K_F16);
        break;
    case K_BF16:
        mm_float(m, o0, o1, K_BF16);
        break;
    case K_Q8_0:
        mm_q(K_Q8_0, m, o0, o1);
        break;
    case K_Q4_K:
        mm_q(K_Q4_K, m, o0, o1);
        break;
    default:
        mm_q(K_Q6_K, m, o0, o1);
        break;
    }
}
