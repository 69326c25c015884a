// test_elementwise.cu: checks the elementwise launchers of kcuda.h (norm.cu,
// rope.cu, act.cu) against fp32/fp64 CPU references on random bf16 inputs,
// and prints a bandwidth line per kernel next to the measured ceiling.
// Shapes cover odd sizes (the scalar paths), misaligned pointers, GQA,
// both RoPE pairings, partial rope_dim, two frequency tables, padding slots
// and large batches; copies and conversions are checked bit for bit.
// Exit status as gpu_check.h says (2: no device).
#include "tests/gpu/gpu_check.h"

#include <algorithm>
#include <string>

static const double kBound = 1e-2; // bf16 outputs: ~2e-3 expected

/* ---------------------------------------------------------------- helpers */

// Uploads v at element offset off of a fresh buffer (off = 1 makes a bf16
// or f32 pointer that is not 16-byte aligned: the launchers' scalar paths).
// *base is what to cudaFree.
template <typename T> static T *upload_at(const std::vector<T> &v, int off, T **base)
{
    std::vector<T> pad(v.size() + off);
    std::copy(v.begin(), v.end(), pad.begin() + off);
    *base = gc_upload(pad);
    return *base + off;
}

// An exact check: the number of differing elements is the error, bound 0.
static void check_bits(const char *test, const char *cas, const std::vector<uint16_t> &got,
                       const std::vector<uint16_t> &want)
{
    size_t bad = 0;
    for (size_t i = 0; i < want.size(); i++)
        bad += got[i] != want[i];
    gc_check(test, cas, (double)bad, 0);
}

static double gbs(double bytes, double ms)
{
    return bytes / (ms * 1e-3) / 1e9;
}

// Benchmark inputs: a million random values repeated (not zeros, which
// can run faster than real data, and much cheaper to make than n draws).
static std::vector<uint16_t> bench_bf16(gc_rng &rng, int64_t n, float lo, float hi)
{
    std::vector<uint16_t> r = gc_rand_bf16(rng, 1 << 20, lo, hi), v((size_t)n);
    for (size_t i = 0; i < v.size(); i++)
        v[i] = r[i & ((1 << 20) - 1)];
    return v;
}

static double g_ceiling = -1; // kc_measure_bandwidth_gbs, measured once

static void bench_line(const char *name, const char *shape, double bytes, double ms)
{
    printf("{\"bench\": \"%s\", \"shape\": \"%s\", \"ms\": %.4f, \"gbs\": %.1f, \"ceiling_gbs\": "
           "%.1f}\n",
           name, shape, ms, gbs(bytes, ms), g_ceiling);
    fflush(stdout);
}

/* ---------------------------------------------------------------- rmsnorm */

// out = s / sqrt(mean(s^2) + eps) * w with s = bf16(resid + x) when resid,
// else x (the sum the kernel squares is the bf16 value it stores in resid).
static void test_rmsnorm(gc_rng &rng, int64_t rows, int64_t dim, bool resid, bool alias, int off)
{
    const size_t n = (size_t)(rows * dim);
    const float eps = 1e-5f;
    char cas[160];
    snprintf(cas, sizeof cas, "rows=%lld dim=%lld resid=%d alias=%d off=%d", (long long)rows,
             (long long)dim, resid, alias, off);

    std::vector<uint16_t> x = gc_rand_bf16(rng, n, -2, 2), w = gc_rand_bf16(rng, dim, 0.5f, 1.5f);
    std::vector<uint16_t> r = resid ? gc_rand_bf16(rng, n, -2, 2) : std::vector<uint16_t>();

    std::vector<uint16_t> want_r(resid ? n : 0);
    std::vector<float> want(n);
    std::vector<float> srow(dim);
    for (int64_t i = 0; i < rows; i++) {
        double ss = 0;
        for (int64_t j = 0; j < dim; j++) {
            size_t e = (size_t)(i * dim + j);
            float s = gc_bf16_to_f32(x[e]);
            if (resid) {
                want_r[e] = gc_f32_to_bf16(s + gc_bf16_to_f32(r[e]));
                s = gc_bf16_to_f32(want_r[e]);
            }
            srow[j] = s;
            ss += (double)s * s;
        }
        double inv = 1.0 / sqrt(ss / (double)dim + eps);
        for (int64_t j = 0; j < dim; j++)
            want[(size_t)(i * dim + j)] = (float)(srow[j] * inv * gc_bf16_to_f32(w[j]));
    }

    uint16_t *bx, *bw, *br = nullptr, *bo = nullptr;
    uint16_t *dx = upload_at(x, off, &bx), *dw = upload_at(w, off, &bw);
    uint16_t *dr = resid ? upload_at(r, off, &br) : nullptr;
    uint16_t *dout = dx;
    if (!alias) {
        dout = upload_at(std::vector<uint16_t>(n), off, &bo);
        gc_poison(dout, n * 2);
    }
    GC_LAUNCH(kc_rmsnorm(nullptr, dout, dr, dx, dw, rows, dim, eps));
    gc_check_bf16("rmsnorm", cas, dout, n, want, kBound);
    if (resid) {
        std::string c = std::string(cas) + " resid exact";
        check_bits("rmsnorm", c.c_str(), gc_download(dr, n), want_r);
    }

    // Batch invariance: the last row alone gives the same bits as in the
    // batch; and the 16-byte and the element path reduce in the same order.
    if (!alias && !resid) {
        std::vector<uint16_t> all = gc_download(dout, n);
        uint16_t *bo1, *do1 = upload_at(std::vector<uint16_t>(dim), off, &bo1);
        gc_poison(do1, dim * 2);
        GC_LAUNCH(kc_rmsnorm(nullptr, do1, nullptr, dx + (rows - 1) * dim, dw, 1, dim, eps));
        std::vector<uint16_t> last(all.end() - dim, all.end());
        std::string c = std::string(cas) + " last row alone, bits";
        check_bits("rmsnorm", c.c_str(), gc_download(do1, dim), last);
        GC_CUDA(cudaFree(bo1));
        if (off == 0 && dim % 8 == 0) {
            uint16_t *bx1, *bw1, *bo2;
            uint16_t *dx1 = upload_at(x, 1, &bx1), *dw1 = upload_at(w, 1, &bw1);
            uint16_t *do2 = upload_at(std::vector<uint16_t>(n), 1, &bo2);
            gc_poison(do2, n * 2);
            GC_LAUNCH(kc_rmsnorm(nullptr, do2, nullptr, dx1, dw1, rows, dim, eps));
            c = std::string(cas) + " unaligned path, bits";
            check_bits("rmsnorm", c.c_str(), gc_download(do2, n), all);
            GC_CUDA(cudaFree(bx1));
            GC_CUDA(cudaFree(bw1));
            GC_CUDA(cudaFree(bo2));
        }
    }
    GC_CUDA(cudaFree(bx));
    GC_CUDA(cudaFree(bw));
    if (br)
        GC_CUDA(cudaFree(br));
    if (bo)
        GC_CUDA(cudaFree(bo));
}

/* ------------------------------------------------------------------- rope */

struct rope_case {
    int64_t n_tokens;
    int n_head, n_kv_head, head_dim, rope_dim, interleaved, n_tables;
    float mscale;
    int max_pos;
    int v_off; // 1: v and v_cache unaligned (element copy path)
};

static std::vector<float> make_inv_freq(gc_rng &rng, int rope_dim, int n_tables)
{
    int pairs = rope_dim / 2;
    std::vector<float> inv((size_t)n_tables * pairs);
    for (int i = 0; i < pairs; i++)
        inv[i] = (float)pow(10000.0, -2.0 * i / rope_dim);
    for (int t = 1; t < n_tables; t++) // LongRoPE-like: per-pair factors
        for (int i = 0; i < pairs; i++)
            inv[(size_t)t * pairs + i] = inv[i] / rng.uniform(1.0f, 16.0f);
    return inv;
}

static void test_rope(gc_rng &rng, const rope_case &c)
{
    const int64_t T = c.n_tokens;
    const int hd = c.head_dim, pairs = c.rope_dim / 2;
    const int64_t q_row = (int64_t)c.n_head * hd, kv_row = (int64_t)c.n_kv_head * hd;
    char cas[200];
    snprintf(cas, sizeof cas, "T=%lld nh=%d nkv=%d hd=%d rope=%d %s tables=%d mscale=%.2f v_off=%d",
             (long long)T, c.n_head, c.n_kv_head, hd, c.rope_dim,
             c.interleaved ? "interleaved" : "hf", c.n_tables, c.mscale, c.v_off);

    std::vector<uint16_t> q = gc_rand_bf16(rng, (size_t)(T * q_row), -1, 1);
    std::vector<uint16_t> k = gc_rand_bf16(rng, (size_t)(T * kv_row), -1, 1);
    std::vector<uint16_t> v = gc_rand_bf16(rng, (size_t)(T * kv_row), -1, 1);
    std::vector<int32_t> pos(T);
    for (auto &p : pos)
        p = (int32_t)(rng.next() % (uint64_t)c.max_pos);
    std::vector<float> inv = make_inv_freq(rng, c.rope_dim, c.n_tables);
    std::vector<int8_t> tab(T);
    for (auto &t : tab)
        t = (int8_t)(rng.next() % (uint64_t)c.n_tables);

    // Slots: distinct, scattered over twice the blocks needed (so blocks
    // are not contiguous), every 5th token padding (-1).
    const int64_t n_blocks = (T + KC_BLOCK_TOKENS - 1) / KC_BLOCK_TOKENS * 2 + 3;
    const int64_t n_slots = n_blocks * KC_BLOCK_TOKENS;
    std::vector<int64_t> perm(n_slots);
    for (int64_t i = 0; i < n_slots; i++)
        perm[i] = i;
    for (int64_t i = n_slots - 1; i > 0; i--)
        std::swap(perm[i], perm[(int64_t)(rng.next() % (uint64_t)(i + 1))]);
    std::vector<int64_t> slot(T);
    for (int64_t t = 0; t < T; t++)
        slot[t] = t % 5 == 3 ? -1 : perm[t];

    // The caches hold old values everywhere, poison in the slots written.
    const size_t cache_n = (size_t)(n_slots * kv_row);
    std::vector<uint16_t> kc0 = gc_rand_bf16(rng, cache_n, -3, 3),
                          vc0 = gc_rand_bf16(rng, cache_n, -3, 3);
    for (int64_t t = 0; t < T; t++)
        if (slot[t] >= 0)
            for (int64_t j = 0; j < kv_row; j++) {
                kc0[(size_t)(slot[t] * kv_row + j)] = 0xffff;
                vc0[(size_t)(slot[t] * kv_row + j)] = 0xffff;
            }

    // Reference: the fp32 angle as on the CPU, cos and sin in fp64.
    std::vector<float> want_q = gc_to_f32(q), want_k = gc_to_f32(k);
    std::vector<double> cs(2 * (size_t)pairs + 2);
    for (int64_t t = 0; t < T; t++) {
        const float *iv = inv.data() + (size_t)(c.n_tables > 1 ? tab[t] : 0) * pairs;
        for (int i = 0; i < pairs; i++) {
            float theta = (float)pos[t] * iv[i];
            cs[2 * i] = cos((double)theta) * c.mscale;
            cs[2 * i + 1] = sin((double)theta) * c.mscale;
        }
        for (int h = 0; h < c.n_head + c.n_kv_head; h++) {
            float *x = h < c.n_head ? want_q.data() + t * q_row + (int64_t)h * hd
                                    : want_k.data() + t * kv_row + (int64_t)(h - c.n_head) * hd;
            for (int i = 0; i < pairs; i++) {
                int a = c.interleaved ? 2 * i : i, b = c.interleaved ? 2 * i + 1 : i + pairs;
                double x1 = x[a], x2 = x[b];
                x[a] = (float)(x1 * cs[2 * i] - x2 * cs[2 * i + 1]);
                x[b] = (float)(x2 * cs[2 * i] + x1 * cs[2 * i + 1]);
            }
        }
    }

    uint16_t *bq, *bk, *bv, *bkc, *bvc;
    int32_t *dpos = gc_upload(pos);
    int64_t *dslot = gc_upload(slot);
    float *dinv = inv.empty() ? nullptr : gc_upload(inv);
    int8_t *dtab = c.n_tables > 1 ? gc_upload(tab) : nullptr;
    uint16_t *dq = upload_at(q, 0, &bq), *dk = upload_at(k, 0, &bk);
    uint16_t *dv = upload_at(v, c.v_off, &bv);
    uint16_t *dkc = upload_at(kc0, 0, &bkc), *dvc = upload_at(vc0, c.v_off, &bvc);

    GC_LAUNCH(kc_rope_kv_write(nullptr, dq, dk, dv, dpos, dslot, T, c.n_head, c.n_kv_head, hd,
                               c.rope_dim, c.interleaved, dinv, dtab, c.mscale, dkc, dvc));

    gc_check_bf16("rope", (std::string(cas) + " q").c_str(), dq, q.size(), want_q, kBound);
    gc_check_bf16("rope", (std::string(cas) + " k").c_str(), dk, k.size(), want_k, kBound);

    // The cache, exactly: the written slots hold the bits left in k (and
    // v), every other slot (padding tokens' included) its old bits.
    std::vector<uint16_t> got_k = gc_download(dk, k.size());
    std::vector<uint16_t> want_kc = kc0, want_vc = vc0;
    for (int64_t t = 0; t < T; t++)
        if (slot[t] >= 0)
            for (int64_t j = 0; j < kv_row; j++) {
                want_kc[(size_t)(slot[t] * kv_row + j)] = got_k[(size_t)(t * kv_row + j)];
                want_vc[(size_t)(slot[t] * kv_row + j)] = v[(size_t)(t * kv_row + j)];
            }
    check_bits("rope", (std::string(cas) + " k_cache exact").c_str(), gc_download(dkc, cache_n),
               want_kc);
    check_bits("rope", (std::string(cas) + " v_cache exact").c_str(), gc_download(dvc, cache_n),
               want_vc);

    for (void *p : {(void *)dpos, (void *)dslot, (void *)dinv, (void *)dtab, (void *)bq, (void *)bk,
                    (void *)bv, (void *)bkc, (void *)bvc})
        if (p)
            GC_CUDA(cudaFree(p));
}

/* ------------------------------------------------------- gated activations */

static void test_act_mul(gc_rng &rng, bool gelu, int64_t rows, int64_t n_ff, int off)
{
    const char *test = gelu ? "gelu_mul" : "silu_mul";
    char cas[120];
    snprintf(cas, sizeof cas, "rows=%lld n_ff=%lld off=%d", (long long)rows, (long long)n_ff, off);
    std::vector<uint16_t> gu = gc_rand_bf16(rng, (size_t)(rows * 2 * n_ff), -6, 6);
    gu[0] = gc_f32_to_bf16(-100.0f); // exp overflows: silu must give -0, not NaN
    if (n_ff > 1)
        gu[1] = gc_f32_to_bf16(100.0f);
    std::vector<float> want((size_t)(rows * n_ff));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n_ff; i++) {
            double g = gc_bf16_to_f32(gu[(size_t)(r * 2 * n_ff + i)]);
            double u = gc_bf16_to_f32(gu[(size_t)(r * 2 * n_ff + n_ff + i)]);
            double a = gelu
                           ? 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
                           : g / (1.0 + exp(-g));
            want[(size_t)(r * n_ff + i)] = (float)(a * u);
        }
    uint16_t *bg, *bo;
    uint16_t *dg = upload_at(gu, off, &bg),
             *dout = upload_at(std::vector<uint16_t>(want.size()), off, &bo);
    gc_poison(dout, want.size() * 2);
    GC_LAUNCH((gelu ? kc_gelu_mul : kc_silu_mul)(nullptr, dout, dg, rows, n_ff));
    gc_check_bf16(test, cas, dout, want.size(), want, kBound);
    GC_CUDA(cudaFree(bg));
    GC_CUDA(cudaFree(bo));
}

/* ------------------------------------------------------------- embedding */

static void test_embed(gc_rng &rng, int64_t n, int64_t dim, int64_t n_vocab, int off)
{
    char cas[120];
    snprintf(cas, sizeof cas, "n=%lld dim=%lld vocab=%lld off=%d", (long long)n, (long long)dim,
             (long long)n_vocab, off);
    std::vector<uint16_t> table = gc_rand_bf16(rng, (size_t)(n_vocab * dim), -1, 1);
    std::vector<int32_t> ids(n);
    for (int64_t r = 0; r < n; r++)
        ids[r] = (int32_t)(rng.next() % (uint64_t)n_vocab);
    const int32_t bad[] = {-1, (int32_t)n_vocab, INT32_MAX, INT32_MIN};
    for (int64_t r = 1; r < n; r += 3) // every third row from 1 an id out of range
        ids[r] = bad[(r / 3) % 4];
    std::vector<uint16_t> want((size_t)(n * dim), 0);
    for (int64_t r = 0; r < n; r++)
        if (ids[r] >= 0 && ids[r] < n_vocab)
            std::copy(table.begin() + ids[r] * dim, table.begin() + (ids[r] + 1) * dim,
                      want.begin() + r * dim);
    uint16_t *bt, *bo;
    uint16_t *dt = upload_at(table, off, &bt), *dout = upload_at(want, off, &bo);
    int32_t *dids = gc_upload(ids);
    gc_poison(dout, want.size() * 2);
    GC_LAUNCH(kc_embed(nullptr, dout, dt, dids, n, dim, n_vocab));
    check_bits("embed", cas, gc_download(dout, want.size()), want);
    GC_CUDA(cudaFree(bt));
    GC_CUDA(cudaFree(bo));
    GC_CUDA(cudaFree(dids));
}

// kc_embed_shard: a rank's slice [v0, v0 + rows) of a vocab-wide table;
// ids of other slices (and bad ones) give zeros. Exact.
static void test_embed_shard(gc_rng &rng, int64_t n, int64_t dim, int64_t v0, int64_t rows,
                             int off)
{
    char cas[120];
    snprintf(cas, sizeof cas, "n=%lld dim=%lld v0=%lld rows=%lld off=%d", (long long)n,
             (long long)dim, (long long)v0, (long long)rows, off);
    std::vector<uint16_t> table = gc_rand_bf16(rng, (size_t)(rows * dim), -1, 1);
    std::vector<int32_t> ids(n);
    for (int64_t r = 0; r < n; r++) // ids from the whole vocabulary and past it
        ids[r] = (int32_t)(rng.next() % (uint64_t)(v0 + 2 * rows + 1)) - (r % 5 == 4 ? 7 : 0);
    std::vector<uint16_t> want((size_t)(n * dim), 0);
    for (int64_t r = 0; r < n; r++)
        if (ids[r] >= v0 && ids[r] < v0 + rows)
            std::copy(table.begin() + (ids[r] - v0) * dim,
                      table.begin() + (ids[r] - v0 + 1) * dim, want.begin() + r * dim);
    uint16_t *bt, *bo;
    uint16_t *dt = upload_at(table, off, &bt), *dout = upload_at(want, off, &bo);
    int32_t *dids = gc_upload(ids);
    gc_poison(dout, want.size() * 2);
    GC_LAUNCH(kc_embed_shard(nullptr, dout, dt, dids, n, dim, v0, rows));
    check_bits("embed_shard", cas, gc_download(dout, want.size()), want);
    GC_CUDA(cudaFree(bt));
    GC_CUDA(cudaFree(bo));
    GC_CUDA(cudaFree(dids));
}

/* ------------------------------------------------- token placeholders */

// kc_resolve_tokens: ids -1 - k take prev[k]; others stay; k past n_prev
// gives -1. Exact.
static void test_resolve(gc_rng &rng, int64_t n, int n_prev)
{
    char cas[80];
    snprintf(cas, sizeof cas, "n=%lld prev=%d", (long long)n, n_prev);
    std::vector<int32_t> prev(n_prev > 0 ? n_prev : 1), ids(n), want(n);
    for (auto &p : prev)
        p = (int32_t)(rng.next() % 150000);
    for (int64_t i = 0; i < n; i++) {
        uint64_t r = rng.next();
        if (r % 3 == 0) { // a real id
            ids[i] = (int32_t)(r % 150000);
            want[i] = ids[i];
        } else { // a placeholder, now and then out of range
            int64_t k = (int64_t)((r >> 8) % (uint64_t)(n_prev + 2));
            ids[i] = (int32_t)(-1 - k);
            want[i] = k < n_prev ? prev[k] : -1;
        }
    }
    int32_t *dids = gc_upload(ids), *dprev = gc_upload(prev);
    GC_LAUNCH(kc_resolve_tokens(nullptr, dids, n, dprev, n_prev));
    std::vector<int32_t> got = gc_download(dids, (size_t)n);
    size_t bad = 0;
    for (int64_t i = 0; i < n; i++)
        bad += got[i] != want[i];
    gc_check("resolve_tokens", cas, (double)bad, 0);
    GC_CUDA(cudaFree(dids));
    GC_CUDA(cudaFree(dprev));
}

/* -------------------------------------------------------------- bias add */

static void test_bias_add(gc_rng &rng, int64_t rows, int64_t dim, int off)
{
    char cas[120];
    snprintf(cas, sizeof cas, "rows=%lld dim=%lld off=%d", (long long)rows, (long long)dim, off);
    std::vector<uint16_t> x = gc_rand_bf16(rng, (size_t)(rows * dim), -4, 4);
    std::vector<uint16_t> b = gc_rand_bf16(rng, (size_t)dim, -1, 1);
    std::vector<float> want(x.size());
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < dim; i++)
            want[(size_t)(r * dim + i)] =
                gc_bf16_to_f32(x[(size_t)(r * dim + i)]) + gc_bf16_to_f32(b[i]);
    uint16_t *bx, *bb;
    uint16_t *dx = upload_at(x, off, &bx), *db = upload_at(b, off, &bb);
    GC_LAUNCH(kc_bias_add(nullptr, dx, db, rows, dim));
    gc_check_bf16("bias_add", cas, dx, x.size(), want, kBound);
    GC_CUDA(cudaFree(bx));
    GC_CUDA(cudaFree(bb));
}

/* ------------------------------------------------------------ conversion */

// f32 -> bf16 against gc_f32_to_bf16 bit for bit (round to nearest even),
// on values of every exponent: subnormals, overflow to inf, inf, -0, NaN
// (any NaN counts as equal).
static void test_f32_to_bf16(gc_rng &rng, int64_t n, int off)
{
    char cas[80];
    snprintf(cas, sizeof cas, "n=%lld off=%d", (long long)n, off);
    std::vector<float> in((size_t)n);
    for (auto &f : in)
        f = ldexpf(rng.uniform(-1, 1), (int)(rng.next() % 280) - 150);
    const float special[] = {INFINITY,      -INFINITY, -0.0f,   NAN,         3.3961776e38f,
                             3.3895314e38f, 1e-40f,    -1e-45f, 1.00390625f, 1.01171875f};
    for (size_t i = 0; i < sizeof special / sizeof *special && i < in.size(); i++)
        in[i * 7 % in.size()] = special[i];
    float *bi;
    uint16_t *bo;
    float *din = upload_at(in, off, &bi);
    uint16_t *dout = upload_at(std::vector<uint16_t>(in.size()), off, &bo);
    gc_poison(dout, in.size() * 2);
    GC_LAUNCH(kc_f32_to_bf16(nullptr, dout, din, n));
    std::vector<uint16_t> got = gc_download(dout, in.size()), want(in.size());
    for (size_t i = 0; i < in.size(); i++) {
        want[i] = gc_f32_to_bf16(in[i]);
        if (isnan(in[i]) && isnan(gc_bf16_to_f32(got[i])))
            got[i] = want[i];
    }
    check_bits("f32_to_bf16", cas, got, want);
    GC_CUDA(cudaFree(bi));
    GC_CUDA(cudaFree(bo));
}

// bf16 -> f32 is exact: every bf16 bit pattern (NaNs included) must come
// back as its bits shifted left by 16.
static void test_bf16_to_f32(int64_t n, int off)
{
    char cas[80];
    snprintf(cas, sizeof cas, "n=%lld off=%d", (long long)n, off);
    std::vector<uint16_t> in((size_t)n);
    for (size_t i = 0; i < in.size(); i++)
        in[i] = (uint16_t)(i * 40503u); // odd multiplier: all patterns in 65536
    uint16_t *bi;
    float *bo;
    uint16_t *din = upload_at(in, off, &bi);
    float *dout = upload_at(std::vector<float>(in.size()), off, &bo);
    gc_poison(dout, in.size() * 4);
    GC_LAUNCH(kc_bf16_to_f32(nullptr, dout, din, n));
    std::vector<float> got = gc_download(dout, in.size());
    size_t bad = 0;
    for (size_t i = 0; i < in.size(); i++) {
        uint32_t u;
        memcpy(&u, &got[i], 4);
        bad += u != (uint32_t)in[i] << 16;
    }
    gc_check("bf16_to_f32", cas, (double)bad, 0);
    GC_CUDA(cudaFree(bi));
    GC_CUDA(cudaFree(bo));
}

/* ---------------------------------------------------------- invalid args */

static void check_rc(const char *cas, int rc, int want)
{
    gc_check("args", cas, rc == want ? 0 : 1, 0);
}

static void test_args(void)
{
    const int inval = (int)cudaErrorInvalidValue;
    kc_bf16 *p = nullptr; // never dereferenced: each call returns before launching
    check_rc("rmsnorm rows<0", kc_rmsnorm(nullptr, p, p, p, p, -1, 64, 1e-5f), inval);
    check_rc("rmsnorm dim=0", kc_rmsnorm(nullptr, p, p, p, p, 4, 0, 1e-5f), inval);
    check_rc("rmsnorm rows=0", kc_rmsnorm(nullptr, p, p, p, p, 0, 64, 1e-5f), 0);
    check_rc("rope head_dim>max",
             kc_rope_kv_write(nullptr, p, p, p, nullptr, nullptr, 1, 8, 8, KC_MAX_HEAD_DIM + 2, 64,
                              0, nullptr, nullptr, 1, p, p),
             inval);
    check_rc("rope odd rope_dim",
             kc_rope_kv_write(nullptr, p, p, p, nullptr, nullptr, 1, 8, 8, 128, 63, 0, nullptr,
                              nullptr, 1, p, p),
             inval);
    check_rc("rope rope_dim>head_dim",
             kc_rope_kv_write(nullptr, p, p, p, nullptr, nullptr, 1, 8, 8, 64, 128, 0, nullptr,
                              nullptr, 1, p, p),
             inval);
    check_rc("rope n_tokens<0",
             kc_rope_kv_write(nullptr, p, p, p, nullptr, nullptr, -1, 8, 8, 128, 128, 0, nullptr,
                              nullptr, 1, p, p),
             inval);
    check_rc("rope n_tokens=0",
             kc_rope_kv_write(nullptr, p, p, p, nullptr, nullptr, 0, 8, 8, 128, 128, 0, nullptr,
                              nullptr, 1, p, p),
             0);
    check_rc("silu n_ff=0", kc_silu_mul(nullptr, p, p, 4, 0), inval);
    check_rc("gelu rows<0", kc_gelu_mul(nullptr, p, p, -1, 64), inval);
    check_rc("silu rows=0", kc_silu_mul(nullptr, p, p, 0, 64), 0);
    check_rc("embed dim=0", kc_embed(nullptr, p, p, nullptr, 4, 0, 10), inval);
    check_rc("embed n=0", kc_embed(nullptr, p, p, nullptr, 0, 64, 10), 0);
    check_rc("bias_add rows<0", kc_bias_add(nullptr, p, p, -1, 64), inval);
    check_rc("f32_to_bf16 n<0", kc_f32_to_bf16(nullptr, p, nullptr, -1), inval);
    check_rc("bf16_to_f32 n=0", kc_bf16_to_f32(nullptr, nullptr, p, 0), 0);
}

/* ------------------------------------------------------------ benchmarks */

// Large enough to stream from device memory rather than the 50 MB L2;
// bytes count each input read once and each output written once.
static void benchmarks(gc_rng &rng)
{
    const int iters = 20;
    g_ceiling = kc_measure_bandwidth_gbs((size_t)1 << 30);
    char shape[80];

    { // rmsnorm with the residual add: x, resid read; resid, out written
        const int64_t rows = 16384, dim = 4096, n = rows * dim;
        uint16_t *x = gc_upload(bench_bf16(rng, n, -1, 1)),
                 *r = gc_upload(bench_bf16(rng, n, -1, 1));
        uint16_t *w = gc_upload(bench_bf16(rng, dim, 0.5f, 1.5f)),
                 *o = gc_upload(std::vector<uint16_t>(n));
        double ms = gc_time_ms(
            [&] { GC_LAUNCH(kc_rmsnorm(nullptr, o, r, x, w, rows, dim, 1e-5f)); }, iters);
        snprintf(shape, sizeof shape, "%lldx%lld resid", (long long)rows, (long long)dim);
        bench_line("rmsnorm", shape, 8.0 * n + 2.0 * dim, ms);
        for (void *p : {(void *)x, (void *)r, (void *)w, (void *)o})
            GC_CUDA(cudaFree(p));
    }
    { // rope + KV write, Llama-3-8B shapes, every token written
        const int64_t T = 16384;
        const int nh = 32, nkv = 8, hd = 128;
        const int64_t qn = T * nh * hd, kn = T * nkv * hd;
        std::vector<int32_t> pos(T);
        std::vector<int64_t> slot(T);
        for (int64_t t = 0; t < T; t++) {
            pos[t] = (int32_t)(t % 8192);
            slot[t] = t;
        }
        std::vector<float> inv = make_inv_freq(rng, hd, 1);
        uint16_t *q = gc_upload(bench_bf16(rng, qn, -1, 1)),
                 *k = gc_upload(bench_bf16(rng, kn, -1, 1));
        uint16_t *v = gc_upload(bench_bf16(rng, kn, -1, 1));
        uint16_t *kc = gc_upload(std::vector<uint16_t>(kn)),
                 *vc = gc_upload(std::vector<uint16_t>(kn));
        int32_t *dpos = gc_upload(pos);
        int64_t *dslot = gc_upload(slot);
        float *dinv = gc_upload(inv);
        double ms = gc_time_ms(
            [&] {
                GC_LAUNCH(kc_rope_kv_write(nullptr, q, k, v, dpos, dslot, T, nh, nkv, hd, hd, 0,
                                           dinv, nullptr, 1.0f, kc, vc));
            },
            iters);
        snprintf(shape, sizeof shape, "T=%lld nh=%d nkv=%d hd=%d", (long long)T, nh, nkv, hd);
        // q and k read and written, v read, k and v cache written
        bench_line("rope_kv_write", shape, 2.0 * (2 * qn + 2 * kn + kn + 2 * kn), ms);
        for (void *p : {(void *)q, (void *)k, (void *)v, (void *)kc, (void *)vc, (void *)dpos,
                        (void *)dslot, (void *)dinv})
            GC_CUDA(cudaFree(p));
    }
    for (int gelu = 0; gelu < 2; gelu++) { // Llama-3-8B MLP: gate_up read, out written
        const int64_t rows = 8192, n_ff = 14336;
        uint16_t *gu = gc_upload(bench_bf16(rng, rows * 2 * n_ff, -4, 4));
        uint16_t *o = gc_upload(std::vector<uint16_t>(rows * n_ff));
        double ms = gc_time_ms(
            [&] { GC_LAUNCH((gelu ? kc_gelu_mul : kc_silu_mul)(nullptr, o, gu, rows, n_ff)); },
            iters);
        snprintf(shape, sizeof shape, "%lldx%lld", (long long)rows, (long long)n_ff);
        bench_line(gelu ? "gelu_mul" : "silu_mul", shape, 2.0 * 3 * rows * n_ff, ms);
        GC_CUDA(cudaFree(gu));
        GC_CUDA(cudaFree(o));
    }
    { // embedding: rows read from a 32k-token table, written out
        const int64_t n = 16384, dim = 4096, vocab = 32000;
        std::vector<int32_t> ids(n);
        for (auto &id : ids)
            id = (int32_t)(rng.next() % vocab);
        uint16_t *t = gc_upload(bench_bf16(rng, vocab * dim, -1, 1));
        uint16_t *o = gc_upload(std::vector<uint16_t>(n * dim));
        int32_t *dids = gc_upload(ids);
        double ms =
            gc_time_ms([&] { GC_LAUNCH(kc_embed(nullptr, o, t, dids, n, dim, vocab)); }, iters);
        snprintf(shape, sizeof shape, "%lldx%lld vocab=%lld", (long long)n, (long long)dim,
                 (long long)vocab);
        bench_line("embed", shape, 2.0 * 2 * n * dim, ms);
        for (void *p : {(void *)t, (void *)o, (void *)dids})
            GC_CUDA(cudaFree(p));
    }
    { // bias add in place
        const int64_t rows = 16384, dim = 6144, n = rows * dim;
        uint16_t *x = gc_upload(bench_bf16(rng, n, -1, 1)),
                 *b = gc_upload(bench_bf16(rng, dim, -1e-3f, 1e-3f));
        double ms = gc_time_ms([&] { GC_LAUNCH(kc_bias_add(nullptr, x, b, rows, dim)); }, iters);
        snprintf(shape, sizeof shape, "%lldx%lld", (long long)rows, (long long)dim);
        bench_line("bias_add", shape, 4.0 * n + 2.0 * dim, ms);
        GC_CUDA(cudaFree(x));
        GC_CUDA(cudaFree(b));
    }
    { // conversions: 128M elements each way
        const int64_t n = (int64_t)1 << 27;
        std::vector<float> f(n);
        for (auto &x : f)
            x = rng.uniform(-1, 1);
        float *df = gc_upload(f);
        uint16_t *db = gc_upload(std::vector<uint16_t>(n));
        double ms = gc_time_ms([&] { GC_LAUNCH(kc_f32_to_bf16(nullptr, db, df, n)); }, iters);
        snprintf(shape, sizeof shape, "%lld", (long long)n);
        bench_line("f32_to_bf16", shape, 6.0 * n, ms);
        ms = gc_time_ms([&] { GC_LAUNCH(kc_bf16_to_f32(nullptr, df, db, n)); }, iters);
        bench_line("bf16_to_f32", shape, 6.0 * n, ms);
        GC_CUDA(cudaFree(df));
        GC_CUDA(cudaFree(db));
    }
}

/* ------------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    (void)argc;
    gc_require_device(argv[0]);
    gc_rng rng(0x5eed0e1e);

    test_args();

    // rows, dim, resid, out aliases x, element offset (unaligned path)
    test_rmsnorm(rng, 1, 4096, false, false, 0);
    test_rmsnorm(rng, 1, 4096, true, true, 0);
    test_rmsnorm(rng, 4, 5120, true, false, 0);
    test_rmsnorm(rng, 7, 3072, false, true, 0);
    test_rmsnorm(rng, 3, 1000, true, false, 0); // 125 chunks: not a whole warp
    test_rmsnorm(rng, 5, 1001, true, false, 0); // dim % 8 != 0: element path
    test_rmsnorm(rng, 2, 4099, false, false, 0);
    test_rmsnorm(rng, 6, 4096, true, false, 1);  // unaligned pointers
    test_rmsnorm(rng, 2, 16384, true, false, 0); // 2 chunks per thread
    test_rmsnorm(rng, 1, 40000, false, false, 0);
    test_rmsnorm(rng, 3, 33, false, false, 0);
    test_rmsnorm(rng, 2, 1, true, false, 0);
    test_rmsnorm(rng, 4096, 4096, true, false, 0);
    test_rmsnorm(rng, 4096, 2048, false, false, 0);

    // n_tokens, n_head, n_kv_head, head_dim, rope_dim, interleaved,
    // n_tables, mscale, max_pos, v_off
    const rope_case rc[] = {
        {5, 32, 8, 128, 128, 0, 1, 1.0f, 4096, 0},
        {7, 28, 4, 128, 128, 1, 1, 1.0f, 4096, 0},
        {3, 32, 8, 64, 64, 1, 1, 1.0f, 2048, 0},
        {9, 32, 32, 96, 96, 0, 2, 1.1902f, 131072, 0}, // Phi-3 LongRoPE
        {11, 32, 32, 96, 48, 0, 2, 1.1902f, 131072, 0},
        {1, 28, 4, 128, 64, 1, 2, 1.0f, 32768, 0},
        {17, 32, 8, 80, 32, 0, 1, 1.0f, 2048, 0},
        {33, 16, 2, 256, 256, 0, 2, 1.3f, 8192, 0},
        {6, 8, 1, 64, 0, 0, 1, 1.0f, 100, 0}, // no rotation: a pure cache write
        {21, 32, 8, 128, 128, 1, 2, 1.0f, 65536, 1},
        {4096, 32, 8, 128, 128, 0, 1, 1.0f, 8192, 0},
        {4096, 28, 4, 128, 128, 1, 2, 1.0f, 131072, 0},
    };
    for (const rope_case &c : rc)
        test_rope(rng, c);

    for (int gelu = 0; gelu < 2; gelu++) {
        test_act_mul(rng, gelu, 1, 14336, 0);
        test_act_mul(rng, gelu, 4, 8192, 0);
        test_act_mul(rng, gelu, 5, 1001, 0);
        test_act_mul(rng, gelu, 3, 8, 0);
        test_act_mul(rng, gelu, 2, 4096, 1);
        test_act_mul(rng, gelu, 4096, 8192, 0);
    }

    test_embed(rng, 5, 4096, 1000, 0);
    test_embed(rng, 4096, 3072, 500, 0);
    test_embed(rng, 7, 1001, 300, 0);
    test_embed(rng, 9, 256, 40, 1);
    test_embed(rng, 1, 8, 1, 0);
    test_embed_shard(rng, 300, 4096, 64000, 32064, 0);
    test_embed_shard(rng, 77, 1001, 128, 64, 1);
    test_embed_shard(rng, 9, 256, 0, 40, 0);
    test_resolve(rng, 1, 1);
    test_resolve(rng, 256, 256);
    test_resolve(rng, 5000, 300);
    test_resolve(rng, 7, 0);

    test_bias_add(rng, 1, 4096, 0);
    test_bias_add(rng, 4096, 1536, 0);
    test_bias_add(rng, 5, 1001, 0);
    test_bias_add(rng, 3, 24, 1);

    test_f32_to_bf16(rng, 1, 0);
    test_f32_to_bf16(rng, 7, 0);
    test_f32_to_bf16(rng, 1000003, 0);
    test_f32_to_bf16(rng, 4096 * 4096, 0);
    test_f32_to_bf16(rng, 1000, 1);
    test_bf16_to_f32(65536, 0);
    test_bf16_to_f32(3 * 65536 + 5, 0);
    test_bf16_to_f32(65536 + 3, 1);

    benchmarks(rng);
    return gc_finish(argv[0]);
}
