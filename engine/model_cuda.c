/* model_cuda.c: the forward pass on an NVIDIA GPU (--device cuda).
 *
 * At load, every weight is converted once to bf16 (dequantised from GGUF
 * blocks, or from f32/f16/bf16) by the CPU pool into pinned staging
 * buffers, two of them so the copy of one overlaps the conversion of the
 * next, and copied to the device; q/k/v and gate/up become one matrix each
 * so a layer runs five GEMMs. The paged KV cache lives on the device with
 * the host kv_cache's block numbering (the host keeps the block tables;
 * its own slab is never touched). A step: one upload of the batch's ids,
 * positions, slots and block tables, then per layer RMSNorm (residual add
 * fused), QKV GEMM, bias, RoPE fused with the KV write, paged attention,
 * output GEMM, RMSNorm, gate/up GEMM, SiLU-mul, down GEMM; then the final
 * norm, the LM head for the rows that want logits, and those logits back
 * to the host as f32, where the engine's sampler takes them as on the CPU.
 * Engine thread only.
 *
 * Not yet: CUDA graphs for decode steps, overlap of step N+1's host work
 * with step N, sampling on the device (kc_sample exists), KV sizing from
 * device memory. Nothing here has run on a GPU yet: tests/gpu/run.sh's
 * engine steps are its first check.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/kv_cache.h"
#include "engine/model_internal.h"

#define STAGE_BYTES ((size_t)64 << 20) /* per staging buffer */

struct cu_layer {
    kc_bf16 *attn_norm, *ffn_norm; /* (E) */
    kc_bf16 *wqkv;                 /* (nq + 2 nkv, E) */
    kc_bf16 *bqkv;                 /* (nq + 2 nkv) or NULL */
    kc_bf16 *wo;                   /* (E, nq) */
    kc_bf16 *wgu;                  /* (2 n_ff, E): gate rows, then up rows */
    kc_bf16 *wdown;                /* (E, n_ff) */
};

struct model_cuda {
    int64_t n_layer;
    int deterministic;
    void *decode_ws; /* split decode's partials (not deterministic) */
    kc_stream stream;
    struct kc_gemm *gemm;
    struct cu_layer *L;
    kc_bf16 *embd;     /* (n_vocab, E) */
    kc_bf16 *output;   /* (n_vocab, E); embd when tied */
    kc_bf16 *out_norm; /* (E) */
    float *inv_freq;   /* (2, rope_dim / 2): short, then long factors */
    /* pinned staging for weights, and its copy events */
    void *stage[2];
    kc_event stage_ev[2];
    int cur;
    size_t fill;
    /* the KV cache: per layer (n_blocks, 16, n_kv_head, head_dim) */
    int64_t kv_blocks;
    kc_bf16 **kc, **vc;
    /* activations for up to cap_rows rows */
    int64_t cap_rows;
    kc_bf16 *x, *h, *qkv, *q, *k, *v, *att, *y, *gu, *act;
    int64_t cap_logits;
    kc_bf16 *hsel, *lg;
    float *lg32;
    /* one step's inputs: pinned on the host, then one copy */
    void *in_host, *in_dev;
    size_t in_cap;
    double load_s;
    uint64_t uploaded;
};

/* CK: a runtime call (kc_* wrapper); KL: a kernel launch. Both name the
 * call and the CUDA error, and go to fail. */
#define CK(call)                                                                             \
    do {                                                                                     \
        int e_ = (call);                                                                     \
        if (e_ != 0) {                                                                       \
            snprintf(err, errlen, "CUDA: %s (%s:%d: %s)", kc_error_string(e_), __FILE__,     \
                     __LINE__, #call);                                                       \
            goto fail;                                                                       \
        }                                                                                    \
    } while (0)

#define KL(call)                                                                             \
    do {                                                                                     \
        int rc_ = (call);                                                                    \
        if (rc_ != 0) {                                                                      \
            snprintf(err, errlen, "CUDA kernel: %s (%s:%d: %s)", kc_error_string(rc_),       \
                     __FILE__, __LINE__, #call);                                             \
            goto fail;                                                                       \
        }                                                                                    \
    } while (0)

/* ------------------------------------------------------- weight upload */

struct conv_job {
    const struct k_matrix *w;
    int64_t r0, n;  /* rows r0 .. r0+n of w */
    uint16_t *dst;  /* (n, cols) bf16 */
    float *tmp;     /* (n_threads, cols) */
};

static void conv_worker(void *ctx, int ith, int nth)
{
    struct conv_job *j = ctx;
    int64_t cols = j->w->cols;
    float *t = j->tmp + (size_t)ith * (size_t)cols;
    for (int64_t r = ith; r < j->n; r += nth) {
        k_dequant_row(j->w, j->r0 + r, t);
        uint16_t *d = j->dst + (size_t)r * (size_t)cols;
        for (int64_t i = 0; i < cols; i++)
            d[i] = k_f32_to_bf16(t[i]);
    }
}

/* Waits until staging buffer b may be written again. */
static int stage_wait(struct model_cuda *c, int b, char *err, size_t errlen)
{
    CK(kc_event_sync(c->stage_ev[b]));
    return 0;
fail:
    return -1;
}

/* Converts rows of w to bf16 and copies them to dst (device), staging
 * chunk by chunk. */
static int upload_matrix(struct model *m, struct model_cuda *c, const struct k_matrix *w,
                         kc_bf16 *dst, char *err, size_t errlen)
{
    int64_t cols = w->cols;
    size_t row_bytes = (size_t)cols * 2;
    int64_t per = (int64_t)(STAGE_BYTES / row_bytes);
    int nth = k_pool_size(m->pool);
    float *tmp = malloc((size_t)nth * (size_t)cols * sizeof(float));
    if (per < 1 || !tmp) {
        snprintf(err, errlen, "CUDA upload: a row of %lld values does not fit staging",
                 (long long)cols);
        free(tmp);
        return -1;
    }
    for (int64_t r0 = 0; r0 < w->rows; r0 += per) {
        int64_t n = w->rows - r0 < per ? w->rows - r0 : per;
        int b = c->cur;
        if (stage_wait(c, b, err, errlen))
            goto fail;
        struct conv_job j = {w, r0, n, c->stage[b], tmp};
        k_pool_run(m->pool, conv_worker, &j);
        CK(kc_copy_h2d(c->stream, dst + (size_t)r0 * (size_t)cols, c->stage[b],
                       (size_t)n * row_bytes));
        CK(kc_event_record(c->stage_ev[b], c->stream));
        c->cur ^= 1;
        c->uploaded += (uint64_t)n * row_bytes;
    }
    free(tmp);
    return 0;
fail:
    free(tmp);
    return -1;
}

/* n f32 values (host) to bf16 on the device. */
static int upload_vector(struct model_cuda *c, const float *v, int64_t n, kc_bf16 *dst,
                         char *err, size_t errlen)
{
    int b = c->cur;
    if ((size_t)n * 2 > STAGE_BYTES) {
        snprintf(err, errlen, "CUDA upload: vector of %lld values too large", (long long)n);
        return -1;
    }
    if (stage_wait(c, b, err, errlen))
        return -1;
    uint16_t *s = c->stage[b];
    for (int64_t i = 0; i < n; i++)
        s[i] = k_f32_to_bf16(v[i]);
    CK(kc_copy_h2d(c->stream, dst, s, (size_t)n * 2));
    CK(kc_event_record(c->stage_ev[b], c->stream));
    c->cur ^= 1;
    return 0;
fail:
    return -1;
}

static int dev_alloc(void **p, size_t bytes, char *err, size_t errlen)
{
    int e = kc_malloc(p, bytes);
    if (e != 0) {
        snprintf(err, errlen, "CUDA: cannot allocate %.2f GiB on the device: %s",
                 (double)bytes / (1 << 30), kc_error_string(e));
        return -1;
    }
    return 0;
}

#define DALLOC(ptr, bytes)                                                                   \
    do {                                                                                     \
        if (dev_alloc((void **)&(ptr), (bytes), err, errlen))                                \
            goto fail;                                                                       \
    } while (0)

int mcu_create(struct model *m, int deterministic, struct model_cuda **out, char *err,
               size_t errlen)
{
    const struct model_config *cf = &m->cfg;
    int64_t E = cf->n_embd, hd = cf->head_dim, nq = cf->n_head * hd, nkv = cf->n_head_kv * hd;
    int64_t nqkv = nq + 2 * nkv, ff = cf->n_ff, pairs = cf->rope_dim / 2;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (kc_device_count() < 1) {
        snprintf(err, errlen, "--device cuda: no CUDA device is visible (no driver, no GPU, or "
                 "CUDA_VISIBLE_DEVICES hides them)");
        return -1;
    }
    if (hd > KC_MAX_HEAD_DIM || (hd % 8) != 0) {
        snprintf(err, errlen, "--device cuda: head_dim %lld is not supported by the CUDA "
                 "kernels", (long long)hd);
        return -1;
    }
    struct model_cuda *c = calloc(1, sizeof(*c));
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    c->n_layer = cf->n_layer;
    c->deterministic = deterministic;
    c->L = calloc((size_t)cf->n_layer, sizeof(*c->L));
    if (!c->L) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    CK(kc_set_device(0));
    CK(kc_stream_create(&c->stream));
    for (int b = 0; b < 2; b++) {
        CK(kc_malloc_host(&c->stage[b], STAGE_BYTES));
        CK(kc_event_create(&c->stage_ev[b]));
        CK(kc_event_record(c->stage_ev[b], c->stream));
    }
    if (!(c->gemm = kc_gemm_create(deterministic))) {
        snprintf(err, errlen, "--device cuda: cuBLASLt could not be set up");
        goto fail;
    }

    DALLOC(c->embd, (size_t)cf->n_vocab * (size_t)E * 2);
    if (upload_matrix(m, c, &m->tok_embd, c->embd, err, errlen))
        goto fail;
    if (cf->tied_embeddings) {
        c->output = c->embd;
    } else {
        DALLOC(c->output, (size_t)cf->n_vocab * (size_t)E * 2);
        if (upload_matrix(m, c, &m->output, c->output, err, errlen))
            goto fail;
    }
    DALLOC(c->out_norm, (size_t)E * 2);
    if (upload_vector(c, m->out_norm, E, c->out_norm, err, errlen))
        goto fail;
    for (int64_t il = 0; il < cf->n_layer; il++) {
        const struct layer *L = &m->layers[il];
        struct cu_layer *D = &c->L[il];
        DALLOC(D->attn_norm, (size_t)E * 2);
        DALLOC(D->ffn_norm, (size_t)E * 2);
        DALLOC(D->wqkv, (size_t)nqkv * (size_t)E * 2);
        DALLOC(D->wo, (size_t)E * (size_t)nq * 2);
        DALLOC(D->wgu, (size_t)2 * (size_t)ff * (size_t)E * 2);
        DALLOC(D->wdown, (size_t)E * (size_t)ff * 2);
        if (upload_vector(c, L->attn_norm, E, D->attn_norm, err, errlen) ||
            upload_vector(c, L->ffn_norm, E, D->ffn_norm, err, errlen))
            goto fail;
        /* q, k and v rows one after the other: one GEMM per layer */
        if (cf->fused_qkv) {
            if (upload_matrix(m, c, &L->wqkv, D->wqkv, err, errlen))
                goto fail;
        } else if (upload_matrix(m, c, &L->wq, D->wqkv, err, errlen) ||
                   upload_matrix(m, c, &L->wk, D->wqkv + (size_t)nq * (size_t)E, err, errlen) ||
                   upload_matrix(m, c, &L->wv, D->wqkv + (size_t)(nq + nkv) * (size_t)E, err,
                                 errlen)) {
            goto fail;
        }
        if (cf->qkv_bias) {
            DALLOC(D->bqkv, (size_t)nqkv * 2);
            if (upload_vector(c, L->bq, nq, D->bqkv, err, errlen) ||
                upload_vector(c, L->bk, nkv, D->bqkv + nq, err, errlen) ||
                upload_vector(c, L->bv, nkv, D->bqkv + nq + nkv, err, errlen))
                goto fail;
        }
        if (upload_matrix(m, c, &L->wo, D->wo, err, errlen))
            goto fail;
        if (cf->fused_gate_up) {
            if (upload_matrix(m, c, &L->wgate_up, D->wgu, err, errlen))
                goto fail;
        } else if (upload_matrix(m, c, &L->wgate, D->wgu, err, errlen) ||
                   upload_matrix(m, c, &L->wup, D->wgu + (size_t)ff * (size_t)E, err, errlen)) {
            goto fail;
        }
        if (upload_matrix(m, c, &L->wdown, D->wdown, err, errlen))
            goto fail;
    }
    DALLOC(c->inv_freq, (size_t)2 * (size_t)(pairs ? pairs : 1) * sizeof(float));
    if (pairs) {
        CK(kc_copy_h2d(c->stream, c->inv_freq, cf->inv_freq_short,
                       (size_t)pairs * sizeof(float)));
        CK(kc_copy_h2d(c->stream, c->inv_freq + pairs, cf->inv_freq_long,
                       (size_t)pairs * sizeof(float)));
    }
    CK(kc_stream_sync(c->stream));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    c->load_s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    fprintf(stderr, "inferd: weights on the GPU: %.2f GB bf16 in %.2f s (%.2f GB/s)\n",
            (double)c->uploaded / 1e9, c->load_s,
            c->load_s > 0 ? (double)c->uploaded / 1e9 / c->load_s : 0.0);
    *out = c;
    return 0;
fail:
    mcu_destroy(c);
    return -1;
}

static void free_acts(struct model_cuda *c)
{
    kc_bf16 *all[] = {c->x, c->h, c->qkv, c->q, c->k, c->v, c->att, c->y, c->gu, c->act,
                      c->hsel, c->lg};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        kc_free(all[i]);
    kc_free(c->lg32);
    c->x = c->h = c->qkv = c->q = c->k = c->v = c->att = c->y = c->gu = c->act = NULL;
    c->hsel = c->lg = NULL;
    c->lg32 = NULL;
    c->cap_rows = c->cap_logits = 0;
}

void mcu_destroy(struct model_cuda *c)
{
    if (!c)
        return;
    if (c->stream)
        kc_stream_sync(c->stream);
    free_acts(c);
    for (int64_t il = 0; il < c->n_layer; il++) {
        if (c->L) {
            struct cu_layer *D = &c->L[il];
            kc_bf16 *all[] = {D->attn_norm, D->ffn_norm, D->wqkv, D->bqkv, D->wo, D->wgu,
                              D->wdown};
            for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
                kc_free(all[i]);
        }
        if (c->kc)
            kc_free(c->kc[il]);
        if (c->vc)
            kc_free(c->vc[il]);
    }
    free(c->kc);
    free(c->vc);
    kc_free(c->decode_ws);
    kc_free(c->inv_freq);
    kc_free(c->out_norm);
    if (c->output != c->embd)
        kc_free(c->output);
    kc_free(c->embd);
    kc_gemm_destroy(c->gemm);
    for (int b = 0; b < 2; b++) {
        kc_free_host(c->stage[b]);
        kc_event_destroy(c->stage_ev[b]);
    }
    kc_free_host(c->in_host);
    kc_free(c->in_dev);
    kc_stream_destroy(c->stream);
    free(c->L);
    free(c);
}

/* -------------------------------------------------------------- a step */

/* The device KV cache, once the engine's kv_cache (and so the block count)
 * is known. */
static int ensure_kv(struct model *m, struct model_cuda *c, struct kv_cache *kv, char *err,
                     size_t errlen)
{
    if (c->kc)
        return 0;
    const struct model_config *cf = &m->cfg;
    size_t per = (size_t)kv_n_blocks(kv) * KC_BLOCK_TOKENS * (size_t)cf->n_head_kv *
                 (size_t)cf->head_dim * 2;
    c->kc = calloc((size_t)cf->n_layer, sizeof(*c->kc));
    c->vc = calloc((size_t)cf->n_layer, sizeof(*c->vc));
    if (!c->kc || !c->vc) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    c->kv_blocks = kv_n_blocks(kv);
    for (int64_t il = 0; il < cf->n_layer; il++) {
        DALLOC(c->kc[il], per);
        DALLOC(c->vc[il], per);
    }
    /* sized for the most sequences a step can hold, which serves any
     * smaller batch (kcuda.h) */
    if (!c->deterministic)
        DALLOC(c->decode_ws, kc_attn_decode_workspace(kv_max_seqs(kv), (int)cf->n_head,
                                                      (int)cf->head_dim, 0));
    return 0;
fail:
    return -1;
}

static int ensure_acts(struct model *m, struct model_cuda *c, int64_t rows, int64_t n_logits,
                       char *err, size_t errlen)
{
    const struct model_config *cf = &m->cfg;
    int64_t E = cf->n_embd, hd = cf->head_dim, nq = cf->n_head * hd, nkv = cf->n_head_kv * hd;
    if (rows > c->cap_rows || n_logits > c->cap_logits) {
        int64_t r = rows > c->cap_rows ? rows : c->cap_rows;
        int64_t nl = n_logits > c->cap_logits ? n_logits : c->cap_logits;
        free_acts(c);
        size_t R = (size_t)r;
        DALLOC(c->x, R * (size_t)E * 2);
        DALLOC(c->h, R * (size_t)E * 2);
        DALLOC(c->y, R * (size_t)E * 2);
        DALLOC(c->qkv, R * (size_t)(nq + 2 * nkv) * 2);
        DALLOC(c->q, R * (size_t)nq * 2);
        DALLOC(c->k, R * (size_t)nkv * 2);
        DALLOC(c->v, R * (size_t)nkv * 2);
        DALLOC(c->att, R * (size_t)nq * 2);
        DALLOC(c->gu, R * (size_t)(2 * cf->n_ff) * 2);
        DALLOC(c->act, R * (size_t)cf->n_ff * 2);
        DALLOC(c->hsel, (size_t)(nl ? nl : 1) * (size_t)E * 2);
        DALLOC(c->lg, (size_t)(nl ? nl : 1) * (size_t)cf->n_vocab * 2);
        DALLOC(c->lg32, (size_t)(nl ? nl : 1) * (size_t)cf->n_vocab * sizeof(float));
        c->cap_rows = r;
        c->cap_logits = nl;
    }
    return 0;
fail:
    free_acts(c);
    return -1;
}

/* The step's inputs, laid out in one buffer (host pinned, then device). */
struct step_layout {
    size_t ids, pos, slot, tab, cu_q, seq_len, btab, sel, total;
};

static size_t align16(size_t x)
{
    return (x + 15) & ~(size_t)15;
}

static struct step_layout layout(int64_t n, int64_t n_seqs, int64_t max_blocks, int64_t nw)
{
    struct step_layout l;
    size_t o = 0;
    l.ids = o, o = align16(o + (size_t)n * 4);
    l.pos = o, o = align16(o + (size_t)n * 4);
    l.slot = o, o = align16(o + (size_t)n * 8);
    l.tab = o, o = align16(o + (size_t)n);
    l.cu_q = o, o = align16(o + (size_t)(n_seqs + 1) * 4);
    l.seq_len = o, o = align16(o + (size_t)n_seqs * 4);
    l.btab = o, o = align16(o + (size_t)(n_seqs * max_blocks) * 4);
    l.sel = o, o = align16(o + (size_t)(nw ? nw : 1) * 4);
    l.total = o;
    return l;
}

int mcu_forward(struct model *m, struct kv_cache *kv, const struct model_row *rows, int64_t n,
                float *logits, char *err, size_t errlen)
{
    struct model_cuda *c = m->cuda;
    const struct model_config *cf = &m->cfg;
    int64_t E = cf->n_embd, hd = cf->head_dim, nh = cf->n_head, nkvh = cf->n_head_kv;
    int64_t nq = nh * hd, nkv = nkvh * hd, nqkv = nq + 2 * nkv, ff = cf->n_ff;
    int64_t V = cf->n_vocab;
    int64_t *next = NULL, *order = NULL, *inv_order = NULL;
    int *seq_of = NULL;
    int64_t *seq_first = NULL, *seq_count = NULL;
    if (n <= 0)
        return 0;
    int max_seqs = kv_max_seqs(kv);
    next = malloc((size_t)max_seqs * sizeof(*next));
    seq_first = malloc((size_t)max_seqs * sizeof(*seq_first));
    seq_count = calloc((size_t)max_seqs, sizeof(*seq_count));
    order = malloc((size_t)n * sizeof(*order));
    inv_order = malloc((size_t)n * sizeof(*inv_order));
    seq_of = malloc((size_t)n * sizeof(*seq_of));
    if (!next || !seq_first || !seq_count || !order || !inv_order || !seq_of) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if (model_check_batch(m, kv, rows, n, next, err, errlen))
        goto fail;
    if (ensure_kv(m, c, kv, err, errlen))
        goto fail;

    /* Rows grouped by sequence (in order of first appearance, each
     * sequence's rows in batch order), which is how the attention kernels
     * take them; every other op works row by row, so the whole step runs
     * in this order and only the logits go back to the callers' order. */
    int64_t n_seqs = 0, nw = 0, max_q = 0, max_blocks = 0;
    for (int64_t r = 0; r < n; r++) {
        int s = rows[r].seq;
        if (seq_count[s]++ == 0)
            seq_of[n_seqs++] = s;
        nw += rows[r].want_logits != 0;
    }
    {
        int64_t off = 0;
        for (int64_t i = 0; i < n_seqs; i++) {
            int s = seq_of[i];
            seq_first[s] = off;
            off += seq_count[s];
            if (seq_count[s] > max_q)
                max_q = seq_count[s];
            int64_t blocks = (next[s] + KC_BLOCK_TOKENS - 1) / KC_BLOCK_TOKENS;
            if (blocks > max_blocks)
                max_blocks = blocks;
        }
        int64_t *fill = calloc((size_t)max_seqs, sizeof(*fill));
        if (!fill) {
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
        for (int64_t r = 0; r < n; r++) {
            int s = rows[r].seq;
            int64_t p = seq_first[s] + fill[s]++;
            order[p] = r;     /* position p of the step runs row r */
            inv_order[r] = p;
        }
        free(fill);
    }
    if (ensure_acts(m, c, n, nw, err, errlen))
        goto fail;
    struct step_layout lo = layout(n, n_seqs, max_blocks, nw);
    if (lo.total > c->in_cap) {
        kc_free_host(c->in_host);
        kc_free(c->in_dev);
        c->in_host = c->in_dev = NULL;
        c->in_cap = 0;
        CK(kc_malloc_host(&c->in_host, lo.total));
        DALLOC(c->in_dev, lo.total);
        c->in_cap = lo.total;
    }
    /* the previous step's copies from in_host are complete: each step ends
     * with a synchronize */
    char *H = c->in_host;
    int32_t *ids = (int32_t *)(H + lo.ids), *pos = (int32_t *)(H + lo.pos);
    int64_t *slot = (int64_t *)(H + lo.slot);
    int8_t *tab = (int8_t *)(H + lo.tab);
    int32_t *cu_q = (int32_t *)(H + lo.cu_q), *seq_len = (int32_t *)(H + lo.seq_len);
    int32_t *btab = (int32_t *)(H + lo.btab), *sel = (int32_t *)(H + lo.sel);
    for (int64_t p = 0; p < n; p++) {
        const struct model_row *row = &rows[order[p]];
        int64_t nb;
        const int32_t *t = kv_seq_blocks(kv, row->seq, &nb);
        ids[p] = row->token;
        pos[p] = (int32_t)row->pos;
        slot[p] = (int64_t)t[row->pos / KV_BLOCK_TOKENS] * KC_BLOCK_TOKENS +
                  row->pos % KV_BLOCK_TOKENS;
        tab[p] = (int8_t)(kv_seq_rope_long(kv, row->seq) ? 1 : 0);
    }
    cu_q[0] = 0;
    for (int64_t i = 0; i < n_seqs; i++) {
        int s = seq_of[i];
        cu_q[i + 1] = cu_q[i] + (int32_t)seq_count[s];
        seq_len[i] = (int32_t)next[s];
        int64_t nb;
        const int32_t *t = kv_seq_blocks(kv, s, &nb);
        int64_t need = (next[s] + KC_BLOCK_TOKENS - 1) / KC_BLOCK_TOKENS;
        for (int64_t b = 0; b < max_blocks; b++)
            btab[i * max_blocks + b] = b < need && b < nb ? t[b] : 0;
    }
    /* logits in the callers' row order */
    {
        int64_t w = 0;
        for (int64_t r = 0; r < n; r++)
            if (rows[r].want_logits)
                sel[w++] = (int32_t)inv_order[r];
    }
    CK(kc_copy_h2d(c->stream, c->in_dev, c->in_host, lo.total));
    char *D = c->in_dev;
    const int32_t *d_ids = (const int32_t *)(D + lo.ids), *d_pos = (const int32_t *)(D + lo.pos);
    const int64_t *d_slot = (const int64_t *)(D + lo.slot);
    const int8_t *d_tab = (const int8_t *)(D + lo.tab);
    const int32_t *d_cu_q = (const int32_t *)(D + lo.cu_q);
    const int32_t *d_seq_len = (const int32_t *)(D + lo.seq_len);
    const int32_t *d_btab = (const int32_t *)(D + lo.btab);
    const int32_t *d_sel = (const int32_t *)(D + lo.sel);
    kc_stream st = c->stream;
    float eps = (float)cf->rms_eps, scale = (float)(1.0 / sqrt((double)hd));
    int window = (int)cf->sliding_window;

    KL(kc_embed(st, c->x, c->embd, d_ids, n, E, V));
    for (int64_t il = 0; il < cf->n_layer; il++) {
        struct cu_layer *L = &c->L[il];
        /* x is the residual stream; y the last block's output, added in
         * by the fused norm (none before the first layer) */
        if (il == 0)
            KL(kc_rmsnorm(st, c->h, NULL, c->x, L->attn_norm, n, E, eps));
        else
            KL(kc_rmsnorm(st, c->h, c->x, c->y, L->attn_norm, n, E, eps));
        KL(kc_gemm(c->gemm, st, c->qkv, c->h, L->wqkv, n, nqkv, E));
        if (L->bqkv)
            KL(kc_bias_add(st, c->qkv, L->bqkv, n, nqkv));
        /* q, k and v as three contiguous arrays, as the rope kernel takes */
        CK(kc_copy_2d_d2d(st, c->q, (size_t)nq * 2, c->qkv, (size_t)nqkv * 2, (size_t)nq * 2,
                          (size_t)n));
        CK(kc_copy_2d_d2d(st, c->k, (size_t)nkv * 2, c->qkv + nq, (size_t)nqkv * 2,
                          (size_t)nkv * 2, (size_t)n));
        CK(kc_copy_2d_d2d(st, c->v, (size_t)nkv * 2, c->qkv + nq + nkv, (size_t)nqkv * 2,
                          (size_t)nkv * 2, (size_t)n));
        KL(kc_rope_kv_write(st, c->q, c->k, c->v, d_pos, d_slot, n, (int)nh, (int)nkvh, (int)hd,
                            (int)cf->rope_dim, cf->rope_interleaved, c->inv_freq, d_tab,
                            cf->rope_mscale, c->kc[il], c->vc[il]));
        if (max_q == 1) /* a decode step; --deterministic: one pass per head */
            KL(kc_attn_decode(st, c->att, c->q, c->kc[il], c->vc[il], d_btab, (int)max_blocks,
                              d_seq_len, (int)n_seqs, (int)nh, (int)nkvh, (int)hd, scale,
                              window, c->deterministic ? 1 : 0, c->decode_ws));
        else
            KL(kc_attn_prefill(st, c->att, c->q, c->kc[il], c->vc[il], d_btab,
                               (int)max_blocks, d_cu_q, d_seq_len, (int)n_seqs, (int)max_q,
                               (int)nh, (int)nkvh, (int)hd, scale, window));
        KL(kc_gemm(c->gemm, st, c->y, c->att, L->wo, n, E, nq));
        KL(kc_rmsnorm(st, c->h, c->x, c->y, L->ffn_norm, n, E, eps));
        KL(kc_gemm(c->gemm, st, c->gu, c->h, L->wgu, n, 2 * ff, E));
        KL(kc_silu_mul(st, c->act, c->gu, n, ff));
        KL(kc_gemm(c->gemm, st, c->y, c->act, L->wdown, n, E, ff));
    }
    KL(kc_rmsnorm(st, c->h, c->x, c->y, c->out_norm, n, E, eps));
    if (nw) {
        /* the rows asked for, gathered (an embedding lookup into h) */
        KL(kc_embed(st, c->hsel, c->h, d_sel, nw, E, n));
        KL(kc_gemm(c->gemm, st, c->lg, c->hsel, c->output, nw, V, E));
        KL(kc_bf16_to_f32(st, c->lg32, c->lg, nw * V));
        CK(kc_copy_d2h(st, logits, c->lg32, (size_t)nw * (size_t)V * sizeof(float)));
    }
    CK(kc_stream_sync(st));
    for (int64_t r = 0; r < n; r++)
        kv_seq_set_len(kv, rows[r].seq, next[rows[r].seq]);
    free(next);
    free(seq_first);
    free(seq_count);
    free(order);
    free(inv_order);
    free(seq_of);
    return 0;
fail:
    free(next);
    free(seq_first);
    free(seq_count);
    free(order);
    free(inv_order);
    free(seq_of);
    return -1;
}
