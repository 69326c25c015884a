/* fake_kcuda.c: a test double of kernels/cuda/kcuda.h for
 * tests/unit/test_model_cuda.c, so the CUDA backend's host side
 * (engine/model_cuda.c: step layout, row order, block tables, sampling
 * lists, graph capture and replay, buffer reuse) runs on a machine without
 * a GPU. Never linked into the product.
 *
 * "Device" memory is host memory and every call completes at once. The
 * launchers do not compute a model: each keeps a row's identity (a GEMM
 * output row repeats its input row, attention returns q), so the logits
 * of a row depend only on its input token, which is what lets the test
 * check where each row's results went. What they do check:
 *   - the cache write puts each token's position as a marker at its slot;
 *   - attention reads, for every sequence, the block table entry of every
 *     position it attends and finds that position's marker there, so a
 *     wrong block table, slot or sequence length shows up as a violation;
 *   - kc_sample writes argmax as the token, the row's seed as its logprob
 *     and a digest of the row's lists and step in its top entries (and
 *     the argmax's margin over the next logit as the 20th top logprob).
 * Between kc_capture_begin and kc_capture_end launches are recorded, not
 * run; kc_graph_launch replays them, as a CUDA graph does. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/kcuda.h"
#include "tests/unit/fake_kcuda.h"

struct fake_kc_stats fake_kc;

/* Tensor-parallel ranks call in from a thread each: counters are atomic,
 * and a capture belongs to the thread that began it. */
#define BUMP(field, v) __atomic_fetch_add(&fake_kc.field, (int64_t)(v), __ATOMIC_RELAXED)

static pthread_mutex_t violation_mu = PTHREAD_MUTEX_INITIALIZER;

static void violation(const char *msg)
{
    pthread_mutex_lock(&violation_mu);
    if (fake_kc.violations++ == 0)
        snprintf(fake_kc.first_violation, sizeof(fake_kc.first_violation), "%s", msg);
    pthread_mutex_unlock(&violation_mu);
}

static _Thread_local int cur_device;  /* kc_set_device */
static _Thread_local int stream_error; /* a host call that failed (fake_kc_enqueue) */

/* ------------------------------------------------------------ ops */

struct op {
    void (*fn)(const struct op *o);
    const void *p[8];
    int64_t a[16];
    struct kc_samp_lists lists;
    struct fake_host_call host;
};

struct fake_graph {
    struct op *ops;
    int n, cap;
};

static _Thread_local struct fake_graph *capturing;

static int submit(const struct op *o)
{
    if (!capturing) {
        BUMP(launches, 1);
        o->fn(o);
        return 0;
    }
    if (capturing->n == capturing->cap) {
        int cap = capturing->cap ? 2 * capturing->cap : 64;
        struct op *ops = realloc(capturing->ops, (size_t)cap * sizeof(*ops));
        if (!ops)
            return 2; /* cudaErrorMemoryAllocation */
        capturing->ops = ops;
        capturing->cap = cap;
    }
    capturing->ops[capturing->n++] = *o;
    return 0;
}

static void run_host(const struct op *o)
{
    if (o->host.fn(&o->host) != 0 && stream_error == 0)
        stream_error = 700; /* as an asynchronous error would */
}

int fake_kc_enqueue(const struct fake_host_call *call)
{
    struct op o = {.fn = run_host, .host = *call};
    return submit(&o);
}

int fake_kc_stream_error(void)
{
    return stream_error;
}

int fake_kc_device(void)
{
    return cur_device;
}

static float bf(kc_bf16 v)
{
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static kc_bf16 to_bf(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return (kc_bf16)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* ------------------------------------------------------------ launchers */

static void run_embed(const struct op *o)
{
    kc_bf16 *out = (kc_bf16 *)o->p[0];
    const kc_bf16 *table = o->p[1];
    const int32_t *ids = o->p[2];
    int64_t n = o->a[0], dim = o->a[1], nv = o->a[2], v0 = o->a[3], shard = o->a[4];
    for (int64_t r = 0; r < n; r++) {
        int64_t id = (int64_t)ids[r] - v0;
        if (id < 0 || id >= nv) {
            if (!shard) /* a slice holds some ids only; a whole table all */
                violation("kc_embed: id out of range");
            memset(out + r * dim, 0, (size_t)dim * 2);
            continue;
        }
        memmove(out + r * dim, table + id * dim, (size_t)dim * 2);
    }
}

int kc_embed(kc_stream s, kc_bf16 *out, const kc_bf16 *table, const int32_t *ids, int64_t n,
             int64_t dim, int64_t n_vocab)
{
    (void)s;
    struct op o = {.fn = run_embed, .p = {out, table, ids}, .a = {n, dim, n_vocab, 0, 0}};
    return submit(&o);
}

int kc_embed_shard(kc_stream s, kc_bf16 *out, const kc_bf16 *table, const int32_t *ids,
                   int64_t n, int64_t dim, int64_t v0, int64_t n_rows)
{
    (void)s;
    struct op o = {.fn = run_embed, .p = {out, table, ids}, .a = {n, dim, n_rows, v0, 1}};
    return submit(&o);
}

static void run_resolve(const struct op *o)
{
    int32_t *ids = (int32_t *)o->p[0];
    const int32_t *prev = o->p[1];
    for (int64_t i = 0; i < o->a[0]; i++) {
        if (ids[i] >= 0)
            continue;
        int64_t k = -1 - (int64_t)ids[i];
        ids[i] = k < o->a[1] ? prev[k] : -1;
        BUMP(resolved, 1);
    }
}

int kc_resolve_tokens(kc_stream s, int32_t *ids, int64_t n, const int32_t *prev, int n_prev)
{
    (void)s;
    struct op o = {.fn = run_resolve, .p = {ids, prev}, .a = {n, n_prev}};
    return submit(&o);
}

static void run_rmsnorm(const struct op *o)
{
    kc_bf16 *out = (kc_bf16 *)o->p[0], *resid = (kc_bf16 *)o->p[1];
    const kc_bf16 *x = o->p[2], *w = o->p[3];
    int64_t rows = o->a[0], dim = o->a[1];
    size_t bytes = (size_t)(rows * dim) * 2;
    if (!fake_kc.real_math) {
        if (resid)
            memmove(resid, x, bytes);
        memmove(out, x, bytes);
        return;
    }
    double eps;
    memcpy(&eps, &o->a[2], sizeof(eps));
    for (int64_t r = 0; r < rows; r++) {
        const kc_bf16 *src = x + r * dim;
        if (resid) { /* the residual stream takes x, then is normalised */
            for (int64_t i = 0; i < dim; i++)
                resid[r * dim + i] = to_bf(bf(resid[r * dim + i]) + bf(x[r * dim + i]));
            src = resid + r * dim;
        }
        double ss = 0;
        for (int64_t i = 0; i < dim; i++)
            ss += (double)bf(src[i]) * bf(src[i]);
        float inv = (float)(1.0 / sqrt(ss / (double)dim + eps));
        for (int64_t i = 0; i < dim; i++)
            out[r * dim + i] = to_bf(bf(src[i]) * inv * bf(w[i]));
    }
}

int kc_rmsnorm(kc_stream s, kc_bf16 *out, kc_bf16 *resid, const kc_bf16 *x, const kc_bf16 *w,
               int64_t rows, int64_t dim, float eps)
{
    (void)s;
    double e = eps;
    struct op o = {.fn = run_rmsnorm, .p = {out, resid, x, w}, .a = {rows, dim}};
    memcpy(&o.a[2], &e, sizeof(e));
    return submit(&o);
}

static void run_gemm(const struct op *o)
{
    kc_bf16 *y = (kc_bf16 *)o->p[0];
    const kc_bf16 *x = o->p[1], *w = o->p[2];
    int64_t m = o->a[0], n = o->a[1], k = o->a[2];
    if (fake_kc.real_math) { /* y = x w^T, f32 sums, one rounding */
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) {
                float acc = 0;
                for (int64_t t = 0; t < k; t++)
                    acc += bf(x[i * k + t]) * bf(w[j * k + t]);
                y[i * n + j] = to_bf(acc);
            }
        return;
    }
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++)
            y[i * n + j] = x[i * k + j % k];
}

int kc_gemm(struct kc_gemm *g, kc_stream s, kc_bf16 *y, const kc_bf16 *x, const kc_bf16 *w,
            int64_t m, int64_t n, int64_t k)
{
    (void)g, (void)s;
    if (fake_kc.fail_device > 0 && cur_device == fake_kc.fail_device - 1)
        return 2; /* cudaErrorMemoryAllocation, on the GPU the test picked */
    struct op o = {.fn = run_gemm, .p = {y, x, w}, .a = {m, n, k}};
    return submit(&o);
}

static void run_bias(const struct op *o)
{
    kc_bf16 *x = (kc_bf16 *)o->p[0];
    const kc_bf16 *b = o->p[1];
    if (!fake_kc.real_math)
        return;
    for (int64_t r = 0; r < o->a[0]; r++)
        for (int64_t j = 0; j < o->a[1]; j++)
            x[r * o->a[1] + j] = to_bf(bf(x[r * o->a[1] + j]) + bf(b[j]));
}

int kc_bias_add(kc_stream s, kc_bf16 *x, const kc_bf16 *bias, int64_t rows, int64_t dim)
{
    (void)s;
    struct op o = {.fn = run_bias, .p = {x, bias}, .a = {rows, dim}};
    return submit(&o);
}

static void run_copy2d(const struct op *o)
{
    char *dst = (char *)o->p[0];
    const char *src = o->p[1];
    for (int64_t r = 0; r < o->a[3]; r++)
        memmove(dst + r * o->a[0], src + r * o->a[1], (size_t)o->a[2]);
}

int kc_copy_2d_d2d(kc_stream s, void *dst, size_t dpitch, const void *src, size_t spitch,
                   size_t width, size_t height)
{
    (void)s;
    struct op o = {.fn = run_copy2d,
                   .p = {dst, src},
                   .a = {(int64_t)dpitch, (int64_t)spitch, (int64_t)width, (int64_t)height}};
    return submit(&o);
}

int kc_copy_2d_h2d(kc_stream s, void *dst, size_t dpitch, const void *src, size_t spitch,
                   size_t width, size_t height)
{
    (void)s;
    struct op o = {.a = {(int64_t)dpitch, (int64_t)spitch, (int64_t)width, (int64_t)height}};
    o.p[0] = dst, o.p[1] = src;
    run_copy2d(&o); /* a copy from the host is never captured */
    return 0;
}

/* The marker of position pos at a slot: its two low 16-bit halves in the
 * first two values of the slot's first KV head. */
static void put_marker(kc_bf16 *cache, int64_t slot, int64_t row, int64_t pos)
{
    cache[slot * row] = (kc_bf16)(pos & 0xffff);
    cache[slot * row + 1] = (kc_bf16)((pos >> 16) & 0xffff);
}

static int64_t get_marker(const kc_bf16 *cache, int64_t slot, int64_t row)
{
    return (int64_t)cache[slot * row] | ((int64_t)cache[slot * row + 1] << 16);
}

static void run_rope(const struct op *o)
{
    kc_bf16 *kcache = (kc_bf16 *)o->p[4], *vcache = (kc_bf16 *)o->p[5];
    const int32_t *pos = o->p[0];
    const int64_t *slot = o->p[1];
    int64_t n = o->a[0], row = o->a[1]; /* row: n_kv_head * head_dim */
    for (int64_t t = 0; t < n; t++) {
        if (slot[t] < 0)
            continue;
        if (slot[t] >= fake_kc.kv_slots) {
            violation("kc_rope_kv_write: slot beyond the cache");
            continue;
        }
        put_marker(kcache, slot[t], row, pos[t]);
        put_marker(vcache, slot[t], row, pos[t]);
    }
}

int kc_rope_kv_write(kc_stream s, kc_bf16 *q, kc_bf16 *k, const kc_bf16 *v, const int32_t *pos,
                     const int64_t *slot, int64_t n_tokens, int n_head, int n_kv_head,
                     int head_dim, int rope_dim, int interleaved, const float *inv_freq,
                     const int8_t *table_idx, float mscale, kc_bf16 *k_cache, kc_bf16 *v_cache)
{
    (void)s, (void)q, (void)k, (void)v, (void)n_head, (void)rope_dim, (void)interleaved;
    (void)inv_freq, (void)table_idx, (void)mscale;
    struct op o = {.fn = run_rope,
                   .p = {pos, slot, NULL, NULL, k_cache, v_cache},
                   .a = {n_tokens, (int64_t)n_kv_head * head_dim}};
    return submit(&o);
}

/* Every position sequence i attends must hold its own marker. */
static void check_seq(const struct op *o, int64_t i, int64_t len)
{
    const kc_bf16 *kcache = o->p[2];
    const int32_t *bt = o->p[3];
    int64_t pitch = o->a[0], row = o->a[1];
    for (int64_t p = 0; p < len; p++) {
        if (p / 16 >= pitch) {
            violation("attention: a position beyond the block table's width");
            return;
        }
        int64_t b = bt[i * pitch + p / 16];
        if (b < 0 || b * 16 >= fake_kc.kv_slots) {
            violation("attention: block table entry out of range");
            return;
        }
        if (get_marker(kcache, b * 16 + p % 16, row) != p) {
            violation("attention: the cache does not hold the position the table names");
            return;
        }
    }
}

static void run_decode(const struct op *o)
{
    kc_bf16 *out = (kc_bf16 *)o->p[0];
    const kc_bf16 *q = o->p[1];
    const int32_t *lens = o->p[4];
    int64_t n_seqs = o->a[2], qrow = o->a[3];
    for (int64_t i = 0; i < n_seqs; i++) {
        check_seq(o, i, lens[i]);
        memmove(out + i * qrow, q + i * qrow, (size_t)qrow * 2);
    }
    BUMP(decode_calls, 1);
}

int kc_attn_decode(kc_stream s, kc_bf16 *out, const kc_bf16 *q, const kc_bf16 *k_cache,
                   const kc_bf16 *v_cache, const int32_t *block_tables, int max_blocks,
                   const int32_t *seq_lens, int n_seqs, int n_head, int n_kv_head, int head_dim,
                   float scale, int sliding_window, int n_splits, void *workspace)
{
    (void)s, (void)v_cache, (void)scale, (void)sliding_window, (void)n_splits, (void)workspace;
    struct op o = {.fn = run_decode,
                   .p = {out, q, k_cache, block_tables, seq_lens},
                   .a = {max_blocks, (int64_t)n_kv_head * head_dim, n_seqs,
                         (int64_t)n_head * head_dim}};
    return submit(&o);
}

static void run_prefill(const struct op *o)
{
    kc_bf16 *out = (kc_bf16 *)o->p[0];
    const kc_bf16 *q = o->p[1];
    const int32_t *cu = o->p[4], *lens = o->p[5];
    int64_t n_seqs = o->a[2], qrow = o->a[3], max_q = o->a[4];
    for (int64_t i = 0; i < n_seqs; i++) {
        if (cu[i + 1] - cu[i] > max_q || cu[i + 1] - cu[i] > lens[i])
            violation("kc_attn_prefill: more query rows than max_q or the sequence");
        check_seq(o, i, lens[i]);
        memmove(out + cu[i] * qrow, q + cu[i] * qrow, (size_t)(cu[i + 1] - cu[i]) * qrow * 2);
    }
    BUMP(prefill_calls, 1);
}

int kc_attn_prefill(kc_stream s, kc_bf16 *out, const kc_bf16 *q, const kc_bf16 *k_cache,
                    const kc_bf16 *v_cache, const int32_t *block_tables, int max_blocks,
                    const int32_t *cu_q_lens, const int32_t *seq_lens, int n_seqs,
                    int max_q_len, int n_head, int n_kv_head, int head_dim, float scale,
                    int sliding_window)
{
    (void)s, (void)v_cache, (void)scale, (void)sliding_window;
    struct op o = {.fn = run_prefill,
                   .p = {out, q, k_cache, block_tables, cu_q_lens, seq_lens},
                   .a = {max_blocks, (int64_t)n_kv_head * head_dim, n_seqs,
                         (int64_t)n_head * head_dim, max_q_len}};
    return submit(&o);
}

static void run_silu(const struct op *o)
{
    kc_bf16 *out = (kc_bf16 *)o->p[0];
    const kc_bf16 *gu = o->p[1];
    int64_t rows = o->a[0], ff = o->a[1];
    for (int64_t r = 0; r < rows; r++) {
        if (!fake_kc.real_math) {
            memmove(out + r * ff, gu + r * 2 * ff, (size_t)ff * 2);
            continue;
        }
        for (int64_t i = 0; i < ff; i++) {
            float g = bf(gu[r * 2 * ff + i]), u = bf(gu[r * 2 * ff + ff + i]);
            out[r * ff + i] = to_bf(g / (1.0f + expf(-g)) * u);
        }
    }
}

int kc_silu_mul(kc_stream s, kc_bf16 *out, const kc_bf16 *gate_up, int64_t rows, int64_t n_ff)
{
    (void)s;
    struct op o = {.fn = run_silu, .p = {out, gate_up}, .a = {rows, n_ff}};
    return submit(&o);
}

int kc_gelu_mul(kc_stream s, kc_bf16 *out, const kc_bf16 *gate_up, int64_t rows, int64_t n_ff)
{
    return kc_silu_mul(s, out, gate_up, rows, n_ff);
}

static void run_to_f32(const struct op *o)
{
    float *out = (float *)o->p[0];
    const kc_bf16 *in = o->p[1];
    for (int64_t i = 0; i < o->a[0]; i++)
        out[i] = bf(in[i]);
}

int kc_bf16_to_f32(kc_stream s, float *out, const kc_bf16 *in, int64_t n)
{
    (void)s;
    struct op o = {.fn = run_to_f32, .p = {out, in}, .a = {n}};
    return submit(&o);
}

int kc_f32_to_bf16(kc_stream s, kc_bf16 *out, const float *in, int64_t n)
{
    (void)s;
    for (int64_t i = 0; i < n; i++)
        out[i] = to_bf(in[i]);
    return 0;
}

size_t kc_attn_decode_workspace(int n_seqs, int n_head, int head_dim, int n_splits)
{
    (void)n_splits;
    return (size_t)n_seqs * (size_t)n_head * (size_t)head_dim * 4;
}

size_t kc_sample_workspace(int rows, int64_t n_vocab)
{
    return (size_t)rows * (size_t)n_vocab;
}

static int64_t span(const int32_t *off, int64_t r)
{
    return off ? off[r + 1] - off[r] : 0;
}

static void run_sample(const struct op *o)
{
    float *logits = (float *)o->p[0];
    const struct kc_samp_row *prm = o->p[1];
    int32_t *token = (int32_t *)o->p[2], *top_tok = (int32_t *)o->p[4];
    float *logprob = (float *)o->p[3], *top_lp = (float *)o->p[5];
    const struct kc_samp_lists *L = &o->lists;
    int64_t rows = o->a[0], nv = o->a[1];
    for (int64_t r = 0; r < rows; r++) {
        const float *x = logits + r * nv;
        int64_t best = 0;
        for (int64_t j = 1; j < nv; j++)
            if (x[j] > x[best])
                best = j;
        token[r] = (int32_t)best;
        float second = -INFINITY; /* the margin, for tests that compare runs */
        for (int64_t j = 0; j < nv; j++)
            if (j != best && x[j] > second)
                second = x[j];
        logprob[r] = (float)prm[r].seed;
        int32_t *t = top_tok + r * 20;
        memset(t, 0, 20 * sizeof(*t));
        for (int i = 0; i < 20; i++)
            top_lp[r * 20 + i] = 0;
        top_lp[r * 20 + 19] = nv > 1 ? x[best] - second : 0;
        t[0] = (int32_t)span(L->seen_off, r);
        for (int64_t j = 0; j < t[0]; j++)
            t[1] += L->seen_tok[L->seen_off[r] + j] * L->seen_cnt[L->seen_off[r] + j];
        t[2] = (int32_t)span(L->bias_off, r);
        for (int64_t j = 0; j < t[2]; j++)
            t[1] += L->bias_tok[L->bias_off[r] + j];
        t[3] = (int32_t)prm[r].step;
        t[4] = (int32_t)span(L->prompt_off, r);
        t[5] = prm[r].top_k;
        t[6] = (int32_t)lrintf(prm[r].temperature * 1000);
    }
    BUMP(sample_rows, rows);
}

int kc_sample(kc_stream s, float *logits, int rows, int64_t n_vocab,
              const struct kc_samp_row *params, const struct kc_samp_lists *lists,
              int32_t *token, float *logprob, int32_t *top_tok, float *top_lp, void *workspace)
{
    (void)s, (void)workspace;
    struct op o = {.fn = run_sample,
                   .p = {logits, params, token, logprob, top_tok, top_lp},
                   .a = {rows, n_vocab}};
    if (lists)
        o.lists = *lists;
    return submit(&o);
}

/* ------------------------------------------------------------ GEMM handle */

struct kc_gemm {
    int deterministic;
};

struct kc_gemm *kc_gemm_create(int deterministic)
{
    struct kc_gemm *g = malloc(sizeof(*g));
    if (g)
        g->deterministic = deterministic;
    return g;
}

void kc_gemm_destroy(struct kc_gemm *g)
{
    free(g);
}

/* ------------------------------------------------------------ dummy fill */

int kc_fill_dummy_bf16(kc_stream s, kc_bf16 *dst, int64_t n, uint64_t state)
{
    (void)s;
    /* the loader's values: one splitmix64 draw per four, as dummy.h says */
    for (int64_t i = 0; i < n; i += 4) {
        uint64_t z = state + (uint64_t)(i / 4 + 1) * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        for (int k = 0; k < 4 && i + k < n; k++, z >>= 16) {
            unsigned sign = (unsigned)(z >> 15) & 1, exp = 118 + ((unsigned)(z >> 7) & 3);
            dst[i + k] = (kc_bf16)(sign << 15 | exp << 7 | ((unsigned)z & 0x7f));
        }
    }
    return 0;
}

int kc_fill_bf16(kc_stream s, kc_bf16 *dst, int64_t n, kc_bf16 value)
{
    (void)s;
    for (int64_t i = 0; i < n; i++)
        dst[i] = value;
    return 0;
}

/* ------------------------------------------------------------ runtime */

double kc_measure_bandwidth_gbs(size_t bytes)
{
    (void)bytes;
    return -1;
}

double kc_measure_bf16_tflops(int64_t m, int64_t n, int64_t k)
{
    (void)m, (void)n, (void)k;
    return -1;
}

int kc_device_count(void)
{
    return fake_kc.devices > 0 ? fake_kc.devices : 1;
}

int kc_device_describe(int i, char *buf, size_t n)
{
    snprintf(buf, n, "fake device %d", i);
    return 0;
}

const char *kc_error_string(int code)
{
    return code == 0 ? "no error" : "fake CUDA error";
}

int kc_set_device(int i)
{
    if (i < 0 || i >= kc_device_count())
        return 101; /* cudaErrorInvalidDevice */
    cur_device = i;
    return 0;
}

int kc_malloc(void **p, size_t bytes)
{
    BUMP(mallocs, 1);
    *p = calloc(1, bytes ? bytes : 1);
    return *p ? 0 : 2;
}

void kc_free(void *p)
{
    free(p);
}

int kc_malloc_host(void **p, size_t bytes)
{
    return kc_malloc(p, bytes);
}

void kc_free_host(void *p)
{
    free(p);
}

int kc_stream_create(kc_stream *s)
{
    *s = (kc_stream)(uintptr_t)0x5;
    return 0;
}

void kc_stream_destroy(kc_stream s)
{
    (void)s;
}

int kc_stream_sync(kc_stream s)
{
    (void)s;
    if (capturing) {
        violation("synchronize during a capture");
        return 900; /* cudaErrorStreamCaptureUnsupported */
    }
    return 0;
}

int kc_event_create(kc_event *e)
{
    *e = (kc_event)(uintptr_t)0x7;
    return 0;
}

void kc_event_destroy(kc_event e)
{
    (void)e;
}

int kc_event_record(kc_event e, kc_stream s)
{
    (void)e, (void)s;
    return 0;
}

int kc_event_sync(kc_event e)
{
    (void)e;
    return 0;
}

int kc_copy_h2d(kc_stream s, void *dst, const void *src, size_t bytes)
{
    (void)s;
    if (capturing)
        violation("a host copy inside a capture");
    memmove(dst, src, bytes);
    return 0;
}

int kc_copy_d2h(kc_stream s, void *dst, const void *src, size_t bytes)
{
    return kc_copy_h2d(s, dst, src, bytes);
}

int kc_memset(kc_stream s, void *dst, int value, size_t bytes)
{
    (void)s;
    memset(dst, value, bytes);
    return 0;
}

int kc_mem_info(size_t *free_bytes, size_t *total_bytes)
{
    *free_bytes = (size_t)fake_kc.mem_free;
    *total_bytes = (size_t)fake_kc.mem_total;
    return 0;
}

int kc_capture_begin(kc_stream s)
{
    (void)s;
    if (capturing)
        return 900;
    capturing = calloc(1, sizeof(*capturing));
    return capturing ? 0 : 2;
}

int kc_capture_end(kc_stream s, kc_graph *out)
{
    (void)s;
    *out = (kc_graph)capturing;
    capturing = NULL;
    BUMP(captures, 1);
    return *out ? 0 : 900;
}

int kc_graph_launch(kc_graph g, kc_stream s)
{
    (void)s;
    struct fake_graph *fg = (struct fake_graph *)g;
    for (int i = 0; i < fg->n; i++)
        fg->ops[i].fn(&fg->ops[i]);
    BUMP(graph_launches, 1);
    return 0;
}

void kc_graph_destroy(kc_graph g)
{
    struct fake_graph *fg = (struct fake_graph *)g;
    if (!fg)
        return;
    free(fg->ops);
    free(fg);
}
