/* kcpu.h: private seam between the CPU kernel front ends (matmul.c, vec.c)
 * and their per-ISA implementations. It defines the canonical reduction
 * orders every path must follow bit for bit, the layout of activations
 * quantized to int8, and the one expf all paths share.
 * Not installed; only kernels/cpu/ includes it.
 */
#ifndef INFERD_KCPU_H
#define INFERD_KCPU_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels/kernels.h"

/* ------------------------------------------------------ canonical orders
 *
 * Float weights (F32, F16, BF16), k_dot_f32 and the sum of squares of
 * k_rmsnorm: 16 partial sums. Lane j accumulates elements i = j mod 16 in
 * increasing i with fmaf(w[i], x[i], lane); then the lanes are folded by a
 * fixed tree: j += j+8, j += j+4, j += j+2, 0 += 1 (kc_tree16).
 *
 * Quantized weights: every integer block sum is exact, so only the float
 * combine has an order. For each output, acc = 0 and, for blocks b in
 * increasing order:
 *   Q8_0: acc = fmaf((float)S_b, dw_b * dx_b, acc)
 *         S_b = sum of the 32 products q_w * q_x
 *   Q4_K: acc = fmaf((float)A_b, d_b * dx_b, acc)
 *         acc = fmaf((float)B_b, -(dmin_b * dx_b), acc)
 *         A_b = sum_j sc_j * (sum over sub-block j of q_w * q_x)
 *         B_b = sum_j m_j * (sum over sub-block j of q_x)
 *   Q6_K: acc = fmaf((float)A_b, d_b * dx_b, acc)
 *         A_b = sum_k sc_k * (sum over 16-sub-block k of (u_w - 32) * q_x)
 * dw, d, dmin are the weight's f16 scales widened to f32, dx the f32 scale
 * of the activation block. All int sums fit int32 (worst cases: Q8_0
 * 520192; Q4_K 30.7M; Q6_K 133M). */

static inline float kc_tree16(float a[16])
{
    for (int s = 8; s >= 1; s >>= 1)
        for (int j = 0; j < s; j++)
            a[j] = a[j] + a[j + s];
    return a[0];
}

/* ----------------------------------------------- quantized activations
 *
 * x rows are quantized to int8 per block with one f32 scale:
 *   d = amax / 127, q = rint(x * (127 / amax)) clamped to [-127, 127]
 * (never -128, so the sign and offset tricks of the SIMD paths cannot
 * overflow). Block of 32 for Q8_0 weights, 256 for the K-quants.
 * One quantized row, at a 64-byte aligned stride:
 *   qs  int8[K]     Q4_K permutes each 256-block into the order its
 *                   nibbles unpack (see kc_q4k_perm), the others keep it
 *   d   float[nb]
 *   s   Q8_0: int32[nb] block sums
 *       Q4_K: int16[nb][16], per-32 sums in [0..8), zeros after
 *       Q6_K: int16[nb][16], per-16 sums */
struct kc_xq {
    int64_t qs_off, d_off, s_off, stride; /* bytes */
    int64_t nb, block;
};

static inline int64_t kc_align64(int64_t n)
{
    return (n + 63) & ~(int64_t)63;
}

static inline struct kc_xq kc_xq_layout(enum k_dtype t, int64_t cols)
{
    struct kc_xq l;
    l.block = t == K_Q8_0 ? 32 : 256;
    l.nb = cols / l.block;
    l.qs_off = 0;
    l.d_off = kc_align64(cols);
    l.s_off = l.d_off + kc_align64(4 * l.nb);
    l.stride = l.s_off + kc_align64(t == K_Q8_0 ? 4 * l.nb : 32 * l.nb);
    return l;
}

/* Q4_K: position p of a permuted 256-block holds natural element
 * kc_q4k_perm(p). Chunk c = p / 64 is the low (c even) or high (c odd)
 * nibbles of the 64 quant bytes 64 * (c / 2) .. +63, so one 64-byte load
 * of the weights lines up with one 64-byte load of x. */
static inline int kc_q4k_perm(int p)
{
    int c = p >> 6, t = p & 63;
    return 64 * (2 * (c >> 1) + (t >> 5)) + 32 * (c & 1) + (t & 31);
}

/* The int16 sums of one K-quant block from its 16 per-16 sums part[k]:
 * Q4_K per-32 sums then zeros, Q6_K the per-16 sums as they are. */
static inline void kc_xq_ksums(enum k_dtype t, const int32_t part[16],
                               int16_t sb[16])
{
    if (t == K_Q4_K) {
        for (int k = 0; k < 8; k++)
            sb[k] = (int16_t)(part[2 * k] + part[2 * k + 1]);
        for (int k = 8; k < 16; k++)
            sb[k] = 0;
    } else {
        for (int k = 0; k < 16; k++)
            sb[k] = (int16_t)part[k];
    }
}

/* Sub-block (scale index) of the first and second 32 bytes of chunk c. */
static inline int kc_q4k_sub(int c, int half)
{
    return 4 * (c >> 1) + (c & 1) + 2 * half;
}

/* Unpacks the 12 bytes of Q4_K 6-bit scales and mins. */
static inline void kc_q4k_scales(const uint8_t *s, uint8_t sc[8], uint8_t m[8])
{
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 0xF) | ((s[j] >> 6) << 4));
        m[j + 4] = (uint8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

/* The same unpacking on 32-bit words, for the SIMD paths: returns the 8
 * scales (byte j = sc[j]) and writes the 8 mins likewise. */
static inline uint64_t kc_q4k_scales64(const uint8_t *s, uint64_t *m)
{
    uint32_t u0, u1, u2;
    memcpy(&u0, s, 4);
    memcpy(&u1, s + 4, 4);
    memcpy(&u2, s + 8, 4);
    /* (b >> 6) << 4 of each byte is (word >> 2) & 0x30 per byte */
    uint32_t sc_lo = u0 & 0x3f3f3f3fu, m_lo = u1 & 0x3f3f3f3fu;
    uint32_t sc_hi = (u2 & 0x0f0f0f0fu) | ((u0 >> 2) & 0x30303030u);
    uint32_t m_hi = ((u2 >> 4) & 0x0f0f0f0fu) | ((u1 >> 2) & 0x30303030u);
    *m = m_lo | ((uint64_t)m_hi << 32);
    return sc_lo | ((uint64_t)sc_hi << 32);
}

/* ----------------------------------------- packed Q4_K, 32 rows (X32)
 *
 * K_LAYOUT_X32 of a Q4_K matrix: rows are taken 32 at a time, the last
 * group padded with zero rows (all-zero blocks: d = dmin = 0). Group g,
 * block b is KC_X32_Q4K bytes at (g * nb + b) * KC_X32_Q4K:
 *   [0, 128)      dword r (r < 32): bytes 0..3 of row r's block (f16 d,
 *                 f16 dmin)
 *   [128, 512)    part k = 0..2, 128 bytes each: dword r holds the scale
 *                 bytes 4k .. 4k+3 of row r (the 12 packed 6-bit scales)
 *   [512, 4608)   64 quant vectors of 64 bytes: vector 8 s + j, byte
 *                 4 r + e (r < 16) holds, at x position
 *                 4 kc_x32_grp(s, j) + e, row r's weight in its low nibble
 *                 and row 16 + r's in its high nibble,
 * where x positions are those of the permuted activation block (kc_xq)
 * and kc_x32_grp(s, j) is the j-th of the 8 groups of 4 positions that
 * make up sub-block s. A vpdpbusd of a vector's low nibbles against 4
 * broadcast x bytes gives rows 0-15 in its 16 lanes; of the whole bytes,
 * rows 0-15 plus 16 times rows 16-31. So one AND per 64 bytes unpacks
 * the weights, and each scale multiplies whole lanes. The integer block
 * sums are the same integers as in the row layout, so both layouts give
 * the same bits.
 *
 * The blocks are not stored whole: block (g, b) is cut into KC_X32_PLANES
 * parts of KC_X32_PART bytes, and part k lives in plane k, at offset
 * (g * nb + b) * KC_X32_PART of it, plane k starting at byte
 * k * groups * nb * KC_X32_PART of the matrix. A kernel walking the
 * blocks in order then reads 4 sequential streams instead of one, which
 * is what keeps DRAM busy from one core (measured here: 1 stream 22-29
 * GB/s, 4 streams 34-41 GB/s, 2 threads). */
#define KC_X32_Q4K 4608
#define KC_X32_PLANES 4
#define KC_X32_PART (KC_X32_Q4K / KC_X32_PLANES)

/* The KC_X32_PLANES part pointers of block (g, b) of a packed matrix. */
static inline void kc_x32_parts(const uint8_t *w, int64_t rows, int64_t nb,
                                int64_t g, int64_t b, const uint8_t *pp[KC_X32_PLANES])
{
    int64_t plane = ((rows + 31) / 32) * nb * KC_X32_PART;
    for (int k = 0; k < KC_X32_PLANES; k++)
        pp[k] = w + k * plane + (g * nb + b) * KC_X32_PART;
}

/* The j-th group of 4 x positions (position / 4) of Q4_K sub-block s:
 * sub-block s is chunk c = 2 (s / 4) + s % 2, half h = (s / 2) % 2 (the
 * inverse of kc_q4k_sub). */
static inline int kc_x32_grp(int s, int j)
{
    return 16 * (2 * (s >> 2) + (s & 1)) + 8 * ((s >> 1) & 1) + j;
}

/* ----------------------------------------- packed Q8_0, 32 rows (X32)
 *
 * K_LAYOUT_X32 of a Q8_0 matrix: rows taken 32 at a time, the last group
 * padded with zero rows. Block (g, b) is KC_X32_Q8 bytes:
 *   [0, 64)       f16 d of rows 0..31
 *   [64, 1088)    16 vectors of 64 bytes: vector 8 h + q, byte 4 r + e is
 *                 row 16 h + r's weight at position 4 q + e of the block,
 *                 plus 128 (as an unsigned byte)
 * so a vpdpbusd against 4 broadcast x bytes gives 16 rows' sums plus 128
 * times the x sum, which the activation block's sum takes back out. The
 * block sums are the row layout's integers: the same bits.
 * Blocks of a group go round 4 planes: block (g, b) is at offset
 * (g * nbq + b / 4) * KC_X32_Q8 of plane b % 4, nbq = ceil(nb / 4), each
 * plane groups * nbq * KC_X32_Q8 bytes; walking b in order reads 4
 * streams (see KC_X32_PLANES). */
#define KC_X32_Q8 1088

static inline const uint8_t *kc_x32_q8_block(const uint8_t *w, int64_t rows,
                                             int64_t nb, int64_t g, int64_t b)
{
    int64_t nbq = (nb + 3) / 4;
    int64_t plane = ((rows + 31) / 32) * nbq * KC_X32_Q8;
    return w + (b & 3) * plane + (g * nbq + b / 4) * KC_X32_Q8;
}

/* pack.c: block b of rows [o0, o0 + n) of a packed Q4_K or Q8_0 matrix of
 * `rows` rows in the row layout, into dst (row i at dst + i * the
 * dtype's block bytes). */
void kc_x32_unpack(enum k_dtype dt, const uint8_t *w, int64_t rows, int64_t nb,
                   int64_t o0, int n, int64_t b, uint8_t *dst);

static inline float kc_f16(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return k_f16_to_f32(h);
}

/* -------------------------------------------------------------- expf
 *
 * The one exponential of the kernels. Every SIMD path runs exactly these
 * float operations, so exp-based kernels agree bit for bit. Cephes-style
 * range reduction and polynomial (about 1 ulp); inputs below -87.3 give 0
 * and above 88.37 give +inf, which is all silu and softmax need. */
#define KC_EXP_HI 88.3762626647949f
#define KC_EXP_LO (-87.3365447504019f)
#define KC_LOG2E 1.44269504088896341f
#define KC_LN2_HI 0.693359375f
#define KC_LN2_LO (-2.12194440e-4f)
#define KC_EXP_P0 1.9875691500e-4f
#define KC_EXP_P1 1.3981999507e-3f
#define KC_EXP_P2 8.3334519073e-3f
#define KC_EXP_P3 4.1665795894e-2f
#define KC_EXP_P4 1.6666665459e-1f
#define KC_EXP_P5 5.0000001201e-1f
#define KC_SHIFTER 12582912.0f /* 1.5 * 2^23: adding it rounds to an integer */

static inline float kc_expf(float x)
{
    if (x > KC_EXP_HI)
        return INFINITY;
    if (x < KC_EXP_LO)
        return 0.0f;
    float t = fmaf(x, KC_LOG2E, KC_SHIFTER);
    float n = t - KC_SHIFTER;
    float r = fmaf(n, -KC_LN2_HI, x);
    r = fmaf(n, -KC_LN2_LO, r);
    float p = KC_EXP_P0;
    p = fmaf(p, r, KC_EXP_P1);
    p = fmaf(p, r, KC_EXP_P2);
    p = fmaf(p, r, KC_EXP_P3);
    p = fmaf(p, r, KC_EXP_P4);
    p = fmaf(p, r, KC_EXP_P5);
    float r2 = r * r;
    float y = fmaf(p, r2, r) + 1.0f;
    uint32_t tb, sb;
    memcpy(&tb, &t, 4);
    /* the low mantissa bits of t hold n; rebuild 2^n from them */
    sb = (tb - 0x4b400000u + 127u) << 23;
    float s;
    memcpy(&s, &sb, 4);
    return y * s;
}

/* ------------------------------------------------------- per-ISA table */

/* One matmul as the per-ISA kernels see it. x_q is the quantized copy of
 * x (quantized types only). */
struct kc_mm {
    enum k_dtype dt;
    enum k_layout layout; /* K_LAYOUT_X32: only with x32 paths or pack.c */
    int64_t rows, cols;
    const uint8_t *w;
    int64_t w_stride; /* bytes per weight row */
    const float *x;
    int64_t x_stride;
    int64_t n_x;
    const uint8_t *xq;
    struct kc_xq xl;
    float *y;
    int64_t y_stride;
};

/* The quantized activation row r of m. */
struct kc_xrow {
    const int8_t *qs;
    const float *d;
    const void *s; /* int32 (Q8_0) or int16 (K-quants) sums */
};

static inline struct kc_xrow kc_xrow_at(const struct kc_mm *m, int64_t r)
{
    const uint8_t *p = m->xq + r * m->xl.stride;
    struct kc_xrow x = {(const int8_t *)(p + m->xl.qs_off),
                        (const float *)(p + m->xl.d_off), p + m->xl.s_off};
    return x;
}

/* Row pointers and gather offsets (bytes from row o0) for a group of
 * n <= G weight rows from o0; the missing rows repeat the last one, so
 * their loads stay inside the matrix (the SIMD paths mask them off). */
static inline void kc_group_rows(const struct kc_mm *m, int64_t o0, int n,
                                 int G, const uint8_t **row, int32_t *off)
{
    for (int j = 0; j < G; j++) {
        int jj = j < n ? j : n - 1;
        row[j] = m->w + (o0 + jj) * m->w_stride;
        off[j] = (int32_t)(jj * m->w_stride);
    }
}

struct kc_ops {
    enum k_isa isa;
    /* Quantizes x rows [r0, r1) into m->xq (identical bytes on every path). */
    void (*quantize)(const struct kc_mm *m, int64_t r0, int64_t r1);
    /* Per-thread work bytes mm_rows needs. */
    size_t (*mm_work)(const struct kc_mm *m);
    /* y[r][o] for all r < n_x and o in [o0, o1). o0 is a multiple of
     * row_align; work: mm_work bytes, 64-byte aligned, private to the
     * calling thread. */
    void (*mm_rows)(const struct kc_mm *m, int64_t o0, int64_t o1, void *work);
    int row_align;
    /* mm_rows takes K_LAYOUT_X32 matrices itself; otherwise matmul.c
     * unpacks 32 rows at a time and gives it the row layout. */
    int x32;
    float (*dot)(const float *a, const float *b, int64_t n);
    void (*axpy)(float *y, float a, const float *x, int64_t n);
    void (*dot_rows)(const float *a, const float *b, int64_t stride,
                     int64_t count, int64_t n, float *out);
    void (*axpy_rows)(float *y, const float *w, const float *x,
                      int64_t stride, int64_t count, int64_t n);
    void (*rmsnorm)(float *out, const float *x, const float *w, int64_t n,
                    float eps);
    void (*silu_mul)(float *out, const float *gate, const float *up, int64_t n);
    void (*softmax)(float *x, int64_t n);
};

/* The table of the ISA in effect (k_isa_select, else k_isa_detect). */
const struct kc_ops *kc_ops(void);

/* Each path's entry points (matmul_<isa>.c, vec_<isa>.c, quant.c); isa.c
 * puts them in the tables. */
#define KC_DECLARE_PATH(isa)                                                  \
    void kc_quantize_##isa(const struct kc_mm *m, int64_t r0, int64_t r1);    \
    size_t kc_mm_work_##isa(const struct kc_mm *m);                           \
    void kc_mm_rows_##isa(const struct kc_mm *m, int64_t o0, int64_t o1,      \
                          void *work);                                        \
    float kc_dot_##isa(const float *a, const float *b, int64_t n);            \
    void kc_axpy_##isa(float *y, float a, const float *x, int64_t n);         \
    void kc_dot_rows_##isa(const float *a, const float *b, int64_t stride,    \
                           int64_t count, int64_t n, float *out);             \
    void kc_axpy_rows_##isa(float *y, const float *w, const float *x,         \
                            int64_t stride, int64_t count, int64_t n);        \
    void kc_rmsnorm_##isa(float *out, const float *x, const float *w,         \
                          int64_t n, float eps);                              \
    void kc_silu_mul_##isa(float *out, const float *g, const float *u,        \
                           int64_t n);                                        \
    void kc_softmax_##isa(float *x, int64_t n);
KC_DECLARE_PATH(scalar)
KC_DECLARE_PATH(avx2)
KC_DECLARE_PATH(avx512)

/* Per-thread work buffers owned by the pool (pool.c). kc_pool_reserve is
 * called by the dispatching thread before k_pool_run; returns 0 or -1. */
int kc_pool_reserve(struct k_pool *p, size_t bytes);
void *kc_pool_work(struct k_pool *p, int ith);

#endif
