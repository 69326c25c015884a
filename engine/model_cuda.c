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
 * A tensor-parallel rank (model_tp_cuda.c runs one per GPU) holds its
 * shard of the weights, Megatron-style as model_tp.c describes, and its
 * share of every KV head it holds; its communicator sums the activations
 * after the embedding lookup, the attention and the MLP (bf16 all-reduce),
 * and gathers the LM head's vocabulary slices; rank 0 lays them side by
 * side, samples, and broadcasts the sampled ids, which every rank's next
 * launch may name (MODEL_TOKEN_PREV). The collectives are enqueued on the
 * rank's stream, so a decode step's graph holds them too.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/comm.h"
#include "engine/dummy.h"
#include "engine/kv_cache.h"
#include "engine/model_internal.h"
#include "engine/tp_plan.h"

#define STAGE_BYTES ((size_t)64 << 20) /* per staging buffer */

struct cu_layer {
    kc_bf16 *attn_norm, *ffn_norm; /* (E) */
    kc_bf16 *wqkv;                 /* (nq + 2 nkv, E) */
    kc_bf16 *bqkv;                 /* (nq + 2 nkv) or NULL */
    kc_bf16 *wo;                   /* (E, nq) */
    kc_bf16 *wgu;                  /* (2 n_ff, E): gate rows, then up rows */
    kc_bf16 *wdown;                /* (E, n_ff) */
};

/* The step's per-row and per-sequence inputs, in one buffer (pinned on
 * the host, mirrored on the device) so one copy carries them. Offsets are
 * fixed for given (rows, seqs): a graph captured for a batch size reads
 * the same addresses every replay. */
struct step_layout {
    size_t ids, pos, slot, tab, cu_q, seq_len, sel, prm, seen_off, prompt_off, bias_off, total;
};

/* One decode graph: a batch size of the ladder, and its replayable step. */
struct cu_graph {
    int rows;
    kc_graph exec;
};

struct model_cuda {
    int64_t n_layer;
    int deterministic, eager;
    int device;
    /* the vocabulary: V ids in all (what the samplers and the host logits
     * see); this model's LM head gives Vr rows from id v0 (V and 0
     * without tensor parallelism; padded to the plan's rows per rank) */
    int64_t V, Vr, v0;
    int tp, rank; /* 1 and 0 without tensor parallelism */
    int head;     /* lays out the logits and samples: rank 0 */
    const struct tp_plan *plan;
    kc_bf16 *lg_loc, *lg_all; /* (cap_seqs, Vr), (tp, cap_seqs, Vr) */
    void *decode_ws; /* split decode's partials (not deterministic) */
    kc_stream stream;
    kc_event done_ev[2]; /* per launch parity: its outputs are on the host */
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
    /* the KV cache: per layer (n_blocks, 16, n_kv_head, head_dim), bound
     * to one host kv_cache's block numbering */
    const struct kv_cache *kv_bound;
    int64_t kv_blocks;
    kc_bf16 **kc, **vc;
    /* what mcu_prepare sized everything for */
    int64_t cap_rows, cap_seqs, cap_blocks;
    kc_bf16 *x, *h, *qkv, *q, *k, *v, *att, *y, *gu, *act;
    kc_bf16 *hsel, *lg; /* (cap_seqs, E), (cap_seqs, n_vocab) */
    float *lg32;        /* (cap_seqs, n_vocab) */
    void *samp_ws;
    /* inputs: in (layout at capacity), block tables (cap_seqs, cap_blocks)
     * and the sampling lists, each pinned on the host and on the device */
    void *in_host[2], *in_dev; /* host buffers: one per launch parity, so the
                                * next step is built while this one's copy
                                * may still be pending */
    size_t in_cap;
    int32_t *bt_host[2], *bt_dev;
    void *ls_host[2], *ls_dev;
    int64_t ls_cap; /* entries per list kind */
    /* outputs: token, logprob, top tokens, top logprobs per sampled row */
    void *out_host[2], *out_dev;
    /* launched steps not yet collected (model_launch), oldest first */
    struct {
        int par;
        struct model_sample *samples;
        int64_t n_samples;
        kc_event done;
    } fifo[2];
    int q_head, q_len;
    int par;              /* the host buffers the next launch fills */
    int64_t prev_samples; /* samples of the last launch (MODEL_TOKEN_PREV) */
    struct cu_graph *graphs;
    int n_graphs;
    /* build_step's host arrays, sized with the step buffers: a step
     * allocates nothing, here either */
    void *scratch;
    int64_t scr_rows, scr_seqs;
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
    int64_t c0, nc; /* columns c0 .. c0+nc of each */
    uint16_t *dst;  /* (n, nc) bf16 */
    float *tmp;     /* (n_threads, cols) */
};

static void conv_worker(void *ctx, int ith, int nth)
{
    struct conv_job *j = ctx;
    const struct k_matrix *w = j->w;
    int64_t cols = w->cols, nc = j->nc;
    float *t = j->tmp + (size_t)ith * (size_t)cols;
    /* a column slice (a tensor-parallel rank's): only its bytes are read,
     * as a one-row matrix of its own (whole quant blocks: the plan's rule) */
    int slice = nc != cols && w->layout != K_LAYOUT_X32;
    for (int64_t r = ith; r < j->n; r += nth) {
        const float *src = t + j->c0;
        if (slice) {
            struct k_matrix v = *w;
            v.rows = 1;
            v.cols = nc;
            v.data = (const char *)w->data + (size_t)(j->r0 + r) * (size_t)k_row_bytes(w->dtype, cols) +
                     (size_t)k_row_bytes(w->dtype, j->c0);
            k_dequant_row(&v, 0, t);
            src = t;
        } else {
            k_dequant_row(w, j->r0 + r, t);
        }
        uint16_t *d = j->dst + (size_t)r * (size_t)nc;
        for (int64_t i = 0; i < nc; i++)
            d[i] = k_f32_to_bf16(src[i]);
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

/* --load-format dummy: the values the CPU loader would have written for
 * columns c0 .. c0 + nc of w, whose first value is element e0 of the
 * tensor f describes, made on the device from the stream's state (no
 * host memory, no copy). A slice must start on a draw (4 values). */
static int upload_dummy(struct model_cuda *c, const struct k_matrix *w, int64_t c0, int64_t nc,
                        const struct dummy_fill *f, int64_t e0, kc_bf16 *dst, char *err,
                        size_t errlen)
{
    int e = 0;
    int64_t n = w->rows * nc;
    if (f->kind != DUMMY_FILL_RANDOM) {
        e = kc_fill_bf16(c->stream, dst, n, f->kind == DUMMY_FILL_ONES ? 0x3f80 : 0);
    } else if (nc == w->cols) {
        if (e0 % 4 != 0)
            goto unaligned;
        e = kc_fill_dummy_bf16(c->stream, dst, n, f->state + (uint64_t)(e0 / 4) * DUMMY_GOLDEN);
    } else {
        if ((e0 + c0) % 4 != 0 || w->cols % 4 != 0)
            goto unaligned;
        for (int64_t r = 0; r < w->rows && e == 0; r++) {
            int64_t at = e0 + r * w->cols + c0;
            e = kc_fill_dummy_bf16(c->stream, dst + (size_t)r * (size_t)nc, nc,
                                   f->state + (uint64_t)(at / 4) * DUMMY_GOLDEN);
        }
    }
    if (e != 0) {
        snprintf(err, errlen, "CUDA kernel: %s (dummy weights)", kc_error_string(e));
        return -1;
    }
    c->uploaded += (uint64_t)n * 2;
    return 0;
unaligned:
    snprintf(err, errlen, "--load-format dummy: a tensor-parallel slice starting at value %lld "
             "of a tensor does not start a 4-value draw; choose a tensor-parallel size whose "
             "slices of the heads and MLP are multiples of 4", (long long)(e0 + c0));
    return -1;
}

/* Converts columns c0 .. c0 + nc of every row of w to bf16 and copies
 * them to dst (device, (rows, nc)), staging chunk by chunk. */
static int upload_matrix(struct model *m, struct model_cuda *c, const struct k_matrix *w,
                         int64_t c0, int64_t nc, kc_bf16 *dst, char *err, size_t errlen)
{
    struct dummy_fill f;
    int64_t e0;
    const struct dummy_model *dm = m->dummy ? m->dummy : m->dummy_view;
    if (dm && dummy_fill_at(dm, w->data, &f, &e0) == 0 && f.dtype == K_BF16 &&
        e0 + w->rows * w->cols <= f.n)
        return upload_dummy(c, w, c0, nc, &f, e0, dst, err, errlen);
    int64_t cols = w->cols;
    size_t row_bytes = (size_t)nc * 2;
    int64_t per = (int64_t)(STAGE_BYTES / (row_bytes ? row_bytes : 1));
    int nth = k_pool_size(m->pool);
    float *tmp = malloc((size_t)nth * (size_t)cols * sizeof(float));
    int64_t blk = k_dtype_block(w->dtype);
    if (per < 1 || !tmp || c0 < 0 || c0 + nc > cols || c0 % blk || nc % blk) {
        snprintf(err, errlen, "CUDA upload: columns %lld..%lld of a %lld-column %s matrix "
                 "(a slice must hold whole %lld-value blocks, and a row fit the %zu MiB "
                 "staging buffer)", (long long)c0, (long long)(c0 + nc), (long long)cols,
                 k_dtype_name(w->dtype), (long long)blk, STAGE_BYTES >> 20);
        free(tmp);
        return -1;
    }
    for (int64_t r0 = 0; r0 < w->rows; r0 += per) {
        int64_t n = w->rows - r0 < per ? w->rows - r0 : per;
        int b = c->cur;
        if (stage_wait(c, b, err, errlen))
            goto fail;
        struct conv_job j = {w, r0, n, c0, nc, c->stage[b], tmp};
        k_pool_run(m->pool, conv_worker, &j);
        CK(kc_copy_h2d(c->stream, dst + (size_t)r0 * (size_t)nc, c->stage[b],
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

/* The whole of w. */
static int upload_all(struct model *m, struct model_cuda *c, const struct k_matrix *w,
                      kc_bf16 *dst, char *err, size_t errlen)
{
    return upload_matrix(m, c, w, 0, w->cols, dst, err, errlen);
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

void *mcu_stream(struct model_cuda *c)
{
    return c->stream;
}

int mcu_create(struct model *m, int device, int deterministic, int enforce_eager,
               struct model_cuda **out, char *err, size_t errlen)
{
    const struct model_config *cf = &m->cfg;
    int64_t E = cf->n_embd, hd = cf->head_dim, nq = cf->n_head * hd, nkv = cf->n_head_kv * hd;
    int64_t nqkv = nq + 2 * nkv, ff = cf->n_ff, pairs = cf->rope_dim / 2;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int n_dev = kc_device_count();
    if (n_dev < 1) {
        snprintf(err, errlen, "--device cuda: no CUDA device is visible (no driver, no GPU, or "
                 "CUDA_VISIBLE_DEVICES hides them)");
        return -1;
    }
    if (device < 0 || device >= n_dev) {
        snprintf(err, errlen, "--device cuda: GPU %d is needed but %d %s visible (one per "
                 "tensor-parallel rank of this process; CUDA_VISIBLE_DEVICES may hide some)",
                 device, n_dev, n_dev == 1 ? "is" : "are");
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
    c->eager = enforce_eager;
    c->device = device;
    c->tp = 1;
    c->V = c->Vr = cf->n_vocab;
    c->head = 1;
    if (m->tp_shared) { /* a tensor-parallel rank */
        c->plan = model_tp_plan(m);
        c->tp = c->plan->tp;
        c->V = m->vocab_all;
        c->Vr = c->plan->vocab_per_rank;
        c->v0 = m->vocab0;
        c->rank = m->tp_rank;
        c->head = c->rank == 0;
    }
    c->L = calloc((size_t)cf->n_layer, sizeof(*c->L));
    if (!c->L) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    CK(kc_set_device(device));
    CK(kc_stream_create(&c->stream));
    for (int b = 0; b < 2; b++)
        CK(kc_event_create(&c->done_ev[b]));
    for (int b = 0; b < 2; b++) {
        CK(kc_malloc_host(&c->stage[b], STAGE_BYTES));
        CK(kc_event_create(&c->stage_ev[b]));
        CK(kc_event_record(c->stage_ev[b], c->stream));
    }
    if (!(c->gemm = kc_gemm_create(deterministic))) {
        snprintf(err, errlen, "--device cuda: cuBLASLt could not be set up");
        goto fail;
    }

    /* a rank's slice of the vocabulary: Vr rows, its own first (the
     * padding rows zero, so their logits are 0 and never laid out) */
    int64_t nv = cf->n_vocab;
    size_t pad = (size_t)(c->Vr - nv) * (size_t)E * 2;
    DALLOC(c->embd, (size_t)c->Vr * (size_t)E * 2);
    if (pad)
        CK(kc_memset(c->stream, c->embd + (size_t)nv * (size_t)E, 0, pad));
    if (upload_all(m, c, &m->tok_embd, c->embd, err, errlen))
        goto fail;
    if (cf->tied_embeddings) {
        c->output = c->embd;
    } else {
        DALLOC(c->output, (size_t)c->Vr * (size_t)E * 2);
        if (pad)
            CK(kc_memset(c->stream, c->output + (size_t)nv * (size_t)E, 0, pad));
        if (upload_all(m, c, &m->output, c->output, err, errlen))
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
            if (upload_all(m, c, &L->wqkv, D->wqkv, err, errlen))
                goto fail;
        } else if (upload_all(m, c, &L->wq, D->wqkv, err, errlen) ||
                   upload_all(m, c, &L->wk, D->wqkv + (size_t)nq * (size_t)E, err, errlen) ||
                   upload_all(m, c, &L->wv, D->wqkv + (size_t)(nq + nkv) * (size_t)E, err,
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
        /* a rank's input columns of the row-parallel matrices */
        if (upload_matrix(m, c, &L->wo, L->wo_c0, nq, D->wo, err, errlen))
            goto fail;
        if (cf->fused_gate_up) {
            if (upload_all(m, c, &L->wgate_up, D->wgu, err, errlen))
                goto fail;
        } else if (upload_all(m, c, &L->wgate, D->wgu, err, errlen) ||
                   upload_all(m, c, &L->wup, D->wgu + (size_t)ff * (size_t)E, err, errlen)) {
            goto fail;
        }
        if (upload_matrix(m, c, &L->wdown, L->wdown_c0, ff, D->wdown, err, errlen))
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
    fprintf(stderr, "inferd: weights on GPU %d: %.2f GB bf16 in %.2f s (%.2f GB/s)\n",
            device, (double)c->uploaded / 1e9, c->load_s,
            c->load_s > 0 ? (double)c->uploaded / 1e9 / c->load_s : 0.0);
    *out = c;
    return 0;
fail:
    mcu_destroy(c);
    return -1;
}


/* ------------------------------------------------------- step buffers */

#define N_TOP 20 /* kc_sample's top logprobs per row */

static void free_step(struct model_cuda *c)
{
    kc_bf16 *all[] = {c->x, c->h, c->qkv, c->q, c->k, c->v, c->att, c->y, c->gu, c->act,
                      c->hsel, c->lg, c->lg_loc, c->lg_all};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        kc_free(all[i]);
    c->x = c->h = c->qkv = c->q = c->k = c->v = c->att = c->y = c->gu = c->act = NULL;
    c->hsel = c->lg = c->lg_loc = c->lg_all = NULL;
    kc_free(c->lg32);
    c->lg32 = NULL;
    kc_free(c->samp_ws);
    kc_free(c->decode_ws);
    c->samp_ws = c->decode_ws = NULL;
    for (int b = 0; b < 2; b++) {
        kc_free_host(c->in_host[b]);
        kc_free_host(c->bt_host[b]);
        kc_free_host(c->ls_host[b]);
        kc_free_host(c->out_host[b]);
        c->in_host[b] = c->ls_host[b] = c->out_host[b] = NULL;
        c->bt_host[b] = NULL;
    }
    kc_free(c->in_dev);
    kc_free(c->bt_dev);
    kc_free(c->ls_dev);
    kc_free(c->out_dev);
    c->in_dev = c->ls_dev = c->out_dev = NULL;
    c->bt_dev = NULL;
    c->in_cap = 0;
    c->ls_cap = 0;
    for (int i = 0; i < c->n_graphs; i++)
        kc_graph_destroy(c->graphs[i].exec);
    free(c->graphs);
    c->graphs = NULL;
    c->n_graphs = 0;
    c->cap_rows = c->cap_seqs = c->cap_blocks = 0;
}

static void free_kv(struct model_cuda *c)
{
    for (int64_t il = 0; il < c->n_layer; il++) {
        if (c->kc)
            kc_free(c->kc[il]);
        if (c->vc)
            kc_free(c->vc[il]);
    }
    free(c->kc);
    free(c->vc);
    c->kc = c->vc = NULL;
    c->kv_bound = NULL;
    c->kv_blocks = 0;
}

void mcu_destroy(struct model_cuda *c)
{
    if (!c)
        return;
    if (c->stream)
        kc_stream_sync(c->stream);
    free_step(c);
    free_kv(c);
    for (int64_t il = 0; il < c->n_layer && c->L; il++) {
        struct cu_layer *D = &c->L[il];
        kc_bf16 *all[] = {D->attn_norm, D->ffn_norm, D->wqkv, D->bqkv, D->wo, D->wgu, D->wdown};
        for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
            kc_free(all[i]);
    }
    kc_free(c->inv_freq);
    kc_free(c->out_norm);
    if (c->output != c->embd)
        kc_free(c->output);
    kc_free(c->embd);
    kc_gemm_destroy(c->gemm);
    for (int b = 0; b < 2; b++) {
        kc_free_host(c->stage[b]);
        kc_event_destroy(c->stage_ev[b]);
        kc_event_destroy(c->done_ev[b]);
    }
    kc_stream_destroy(c->stream);
    free(c->scratch);
    free(c->L);
    free(c);
}

int mcu_memory(int64_t *free_bytes, int64_t *total_bytes)
{
    size_t f = 0, t = 0;
    if (kc_mem_info(&f, &t) != 0) {
        *free_bytes = *total_bytes = 0;
        return -1;
    }
    *free_bytes = (int64_t)f;
    *total_bytes = (int64_t)t;
    return 0;
}

int mcu_ceilings(int device, double *bytes_per_s, double *flops, char *desc, size_t desc_len)
{
    /* 4 GiB streamed: far beyond any cache; an 8192^3 GEMM: large enough
     * for the tensor cores' sustained rate */
    double gbs = kc_measure_bandwidth_gbs((size_t)4 << 30);
    double tf = kc_measure_bf16_tflops(8192, 8192, 8192);
    *bytes_per_s = gbs > 0 ? gbs * 1e9 : 0;
    *flops = tf > 0 ? tf * 1e12 : 0;
    if (kc_device_describe(device, desc, desc_len) != 0)
        snprintf(desc, desc_len, "CUDA device %d", device);
    return gbs > 0 && tf > 0 ? 0 : -1;
}

static size_t align16(size_t x)
{
    return (x + 15) & ~(size_t)15;
}

/* rows: token rows; seqs: sequences; sel: logits rows gathered; samp:
 * sampled rows. */
static struct step_layout layout(int64_t rows, int64_t seqs, int64_t sel, int64_t samp)
{
    struct step_layout l;
    size_t o = 0;
    l.ids = o, o = align16(o + (size_t)rows * 4);
    l.pos = o, o = align16(o + (size_t)rows * 4);
    l.slot = o, o = align16(o + (size_t)rows * 8);
    l.tab = o, o = align16(o + (size_t)rows);
    l.cu_q = o, o = align16(o + (size_t)(seqs + 1) * 4);
    l.seq_len = o, o = align16(o + (size_t)seqs * 4);
    l.sel = o, o = align16(o + (size_t)(sel ? sel : 1) * 4);
    l.prm = o, o = align16(o + (size_t)(samp ? samp : 1) * sizeof(struct kc_samp_row));
    l.seen_off = o, o = align16(o + (size_t)(samp + 1) * 4);
    l.prompt_off = o, o = align16(o + (size_t)(samp + 1) * 4);
    l.bias_off = o, o = align16(o + (size_t)(samp + 1) * 4);
    l.total = o;
    return l;
}

/* The lists buffer: seen tokens, their counts, prompt tokens, bias tokens
 * and bias values, cap entries each. */
static size_t lists_bytes(int64_t cap)
{
    return (size_t)cap * 5 * 4;
}

static size_t out_bytes(int64_t rows)
{
    return (size_t)rows * (4 + 4 + N_TOP * 8);
}

int64_t mcu_step_bytes(const struct model *m, int64_t max_rows, int max_seqs)
{
    const struct model_config *cf = &m->cfg;
    int64_t E = cf->n_embd, hd = cf->head_dim, nq = cf->n_head * hd, nkv = cf->n_head_kv * hd;
    /* a tensor-parallel rank: its LM head rows and everyone's gathered,
     * and on rank 0 the whole vocabulary's logits and sampling */
    int tp = m->tp_shared ? model_tp_plan(m)->tp : 1;
    int head = !m->tp_shared || m->tp_rank == 0;
    int64_t nv = m->tp_shared ? m->vocab_all : cf->n_vocab;
    size_t R = (size_t)max_rows, S = (size_t)max_seqs, V = (size_t)nv;
    size_t b = R * (size_t)E * 2 * 3 + R * (size_t)(nq + 2 * nkv) * 2 * 2 + R * (size_t)nkv * 2 * 2 +
               R * (size_t)nq * 2 + R * (size_t)(3 * cf->n_ff) * 2;
    b += S * (size_t)E * 2;
    if (head)
        b += S * V * 2 + S * V * 4 + kc_sample_workspace(max_seqs, nv);
    if (tp > 1)
        b += S * (size_t)model_tp_plan(m)->vocab_per_rank * 2 * (size_t)(1 + tp);
    b += kc_attn_decode_workspace(max_seqs, (int)cf->n_head, (int)hd, 0);
    b += layout(max_rows, max_seqs, max_rows, max_seqs).total + out_bytes(max_seqs);
    /* cuBLASLt's workspace, the graphs, and the allocator's rounding */
    b += (size_t)512 << 20;
    return (int64_t)b;
}

/* ------------------------------------------------------------ a step */

/* What one step runs, built on the host before anything is enqueued. */
struct step {
    int64_t n, n_seqs, nw, n_samp, max_q, max_blocks;
    int64_t pitch;    /* block-table row stride: max_blocks, or cap_blocks for a graph */
    int64_t n_host;   /* logits rows that go back to the host */
    int graph;        /* index into c->graphs, or -1 */
    int64_t rows;     /* rows the kernels see: n, or the graph's size */
    struct step_layout lo;
    int64_t n_seen, n_prompt, n_bias;
    int64_t *next;    /* (max_seqs) each sequence's length after the step */
    int64_t *order;   /* (n) position p of the step runs caller row order[p] */
    int64_t *want_pos;/* (nw) step position of each want row */
    int64_t *host_w;  /* (n_host) want index of each host logits row, in sel order */
};

/* The step's host arrays live in c->scratch (ensure_scratch). */
static void step_free(struct step *st)
{
    (void)st;
}

struct scratch_view {
    int *seq_of;
    int64_t *seq_first, *seq_count, *fill, *next, *order, *want_pos, *host_w;
    char *is_samp;
};

/* Grows c->scratch to hold rows rows over seqs sequences (its contents
 * are lost only when it grows). Kept across mcu_prepare: build_step may
 * prepare again while its arrays are in use. */
static int grow_scratch(struct model_cuda *c, int64_t rows, int64_t seqs)
{
    if (rows > c->scr_rows || seqs > c->scr_seqs) {
        int64_t r = rows > c->scr_rows ? rows : c->scr_rows;
        int64_t q = seqs > c->scr_seqs ? seqs : c->scr_seqs;
        void *p = malloc((size_t)r * (sizeof(int) + 3 * sizeof(int64_t) + 1) +
                         (size_t)q * 4 * sizeof(int64_t) + 64);
        if (!p)
            return -1;
        free(c->scratch);
        c->scratch = p;
        c->scr_rows = r;
        c->scr_seqs = q;
    }
    return 0;
}

/* build_step's arrays for rows rows over seqs sequences, in c->scratch,
 * the counters cleared. */
static int ensure_scratch(struct model_cuda *c, int64_t rows, int64_t seqs,
                          struct scratch_view *v)
{
    if (grow_scratch(c, rows, seqs))
        return -1;
    char *b = c->scratch;
    size_t R = (size_t)c->scr_rows, Q = (size_t)c->scr_seqs;
    v->seq_first = (int64_t *)b, b += Q * sizeof(int64_t);
    v->seq_count = (int64_t *)b, b += Q * sizeof(int64_t);
    v->fill = (int64_t *)b, b += Q * sizeof(int64_t);
    v->next = (int64_t *)b, b += Q * sizeof(int64_t);
    v->order = (int64_t *)b, b += R * sizeof(int64_t);
    v->want_pos = (int64_t *)b, b += R * sizeof(int64_t);
    v->host_w = (int64_t *)b, b += R * sizeof(int64_t);
    v->seq_of = (int *)b, b += R * sizeof(int);
    v->is_samp = b;
    memset(v->seq_count, 0, (size_t)seqs * sizeof(int64_t));
    memset(v->fill, 0, (size_t)seqs * sizeof(int64_t));
    memset(v->is_samp, 0, (size_t)rows);
    return 0;
}

/* The decode graph sizes: dense where batches are small, then every 8 up
 * to 256 and every 32 beyond (a batch runs in the smallest that holds it;
 * the padding rows cost little next to the weights every row reads). */
static int graph_sizes(int64_t cap, int *out, int max)
{
    int n = 0;
    for (int64_t b = 1; b <= cap && n < max;) {
        out[n++] = (int)b;
        b = b < 8 ? 2 * b : b < 256 ? b + 8 : b + 32;
    }
    if (n < max && (n == 0 || out[n - 1] < cap))
        out[n++] = (int)cap;
    return n;
}

static int pick_graph(const struct model_cuda *c, int64_t n)
{
    for (int i = 0; i < c->n_graphs; i++)
        if (c->graphs[i].rows >= n)
            return c->graphs[i].exec ? i : -1;
    return -1;
}

/* A tensor-parallel rank's sum of n bf16 values with the other ranks (in
 * stream order, so a graph captures it); nothing without a communicator. */
static int tp_reduce(struct model *m, kc_bf16 *buf, int64_t n, char *err, size_t errlen)
{
    if (!m->comm || comm_allreduce_bf16(m->comm, buf, n) == 0)
        return 0;
    snprintf(err, errlen, "tensor parallel rank %d: %s", m->tp_rank, comm_error(m->comm));
    return -1;
}

/* Enqueues the forward pass of st (inputs already on the device) up to
 * the final norm, whose output is h. */
static int enqueue_body(struct model *m, struct model_cuda *c, const struct step *st, char *err,
                        size_t errlen)
{
    const struct model_config *cf = &m->cfg;
    int64_t E = cf->n_embd, hd = cf->head_dim, nh = cf->n_head, nkvh = cf->n_head_kv;
    int64_t nq = nh * hd, nkv = nkvh * hd, nqkv = nq + 2 * nkv, ff = cf->n_ff;
    int64_t n = st->rows;
    const struct step_layout *lo = &st->lo;
    char *D = c->in_dev;
    const int32_t *d_ids = (const int32_t *)(D + lo->ids), *d_pos = (const int32_t *)(D + lo->pos);
    const int64_t *d_slot = (const int64_t *)(D + lo->slot);
    const int8_t *d_tab = (const int8_t *)(D + lo->tab);
    const int32_t *d_cu_q = (const int32_t *)(D + lo->cu_q);
    const int32_t *d_seq_len = (const int32_t *)(D + lo->seq_len);
    kc_stream s = c->stream;
    float eps = (float)cf->rms_eps, scale = (float)(1.0 / sqrt((double)hd));
    int window = (int)cf->sliding_window;

    /* ids the host did not know yet: the last step's samples, still here */
    KL(kc_resolve_tokens(s, (int32_t *)d_ids, n, (const int32_t *)c->out_dev,
                         (int)c->cap_seqs));
    /* a rank's slice of the table gives its ids' rows and zeros for the
     * rest: the sum is every row */
    KL(kc_embed_shard(s, c->x, c->embd, d_ids, n, E, c->v0, cf->n_vocab));
    if (tp_reduce(m, c->x, n * E, err, errlen))
        goto fail;
    for (int64_t il = 0; il < cf->n_layer; il++) {
        struct cu_layer *L = &c->L[il];
        /* x is the residual stream; y the last block's output, added in
         * by the fused norm (none before the first layer) */
        if (il == 0)
            KL(kc_rmsnorm(s, c->h, NULL, c->x, L->attn_norm, n, E, eps));
        else
            KL(kc_rmsnorm(s, c->h, c->x, c->y, L->attn_norm, n, E, eps));
        KL(kc_gemm(c->gemm, s, c->qkv, c->h, L->wqkv, n, nqkv, E));
        if (L->bqkv)
            KL(kc_bias_add(s, c->qkv, L->bqkv, n, nqkv));
        /* q, k and v as three contiguous arrays, as the rope kernel takes */
        CK(kc_copy_2d_d2d(s, c->q, (size_t)nq * 2, c->qkv, (size_t)nqkv * 2, (size_t)nq * 2,
                          (size_t)n));
        CK(kc_copy_2d_d2d(s, c->k, (size_t)nkv * 2, c->qkv + nq, (size_t)nqkv * 2,
                          (size_t)nkv * 2, (size_t)n));
        CK(kc_copy_2d_d2d(s, c->v, (size_t)nkv * 2, c->qkv + nq + nkv, (size_t)nqkv * 2,
                          (size_t)nkv * 2, (size_t)n));
        KL(kc_rope_kv_write(s, c->q, c->k, c->v, d_pos, d_slot, n, (int)nh, (int)nkvh, (int)hd,
                            (int)cf->rope_dim, cf->rope_interleaved, c->inv_freq, d_tab,
                            cf->rope_mscale, c->kc[il], c->vc[il]));
        if (st->max_q == 1) /* a decode step; --deterministic: one pass per head */
            KL(kc_attn_decode(s, c->att, c->q, c->kc[il], c->vc[il], c->bt_dev, (int)st->pitch,
                              d_seq_len, (int)st->n_seqs, (int)nh, (int)nkvh, (int)hd, scale,
                              window, c->deterministic ? 1 : 0, c->decode_ws));
        else
            KL(kc_attn_prefill(s, c->att, c->q, c->kc[il], c->vc[il], c->bt_dev, (int)st->pitch,
                               d_cu_q, d_seq_len, (int)st->n_seqs, (int)st->max_q, (int)nh,
                               (int)nkvh, (int)hd, scale, window));
        KL(kc_gemm(c->gemm, s, c->y, c->att, L->wo, n, E, nq));
        if (tp_reduce(m, c->y, n * E, err, errlen)) /* row-parallel: partial sums */
            goto fail;
        KL(kc_rmsnorm(s, c->h, c->x, c->y, L->ffn_norm, n, E, eps));
        KL(kc_gemm(c->gemm, s, c->gu, c->h, L->wgu, n, 2 * ff, E));
        KL(kc_silu_mul(s, c->act, c->gu, n, ff)); /* every supported model: SiLU */
        KL(kc_gemm(c->gemm, s, c->y, c->act, L->wdown, n, E, ff));
        if (tp_reduce(m, c->y, n * E, err, errlen))
            goto fail;
    }
    KL(kc_rmsnorm(s, c->h, c->x, c->y, c->out_norm, n, E, eps));
    return 0;
fail:
    return -1;
}

/* The LM head over rows r0 .. r0 + k of sel (sampled rows first, then
 * the rows going back to the host) into lg32, and the sampler over its
 * first ns rows when ns > 0. */
static int enqueue_head(struct model *m, struct model_cuda *c, const struct step *st, int64_t r0,
                        int64_t k, int64_t ns, char *err, size_t errlen)
{
    const struct model_config *cf = &m->cfg;
    int64_t E = cf->n_embd, V = c->V, Vr = c->Vr;
    const struct step_layout *lo = &st->lo;
    char *D = c->in_dev;
    kc_stream s = c->stream;
    /* the rows asked for, gathered (an embedding lookup into h) */
    KL(kc_embed(s, c->hsel, c->h, (const int32_t *)(D + lo->sel) + r0, k, E, st->rows));
    if (c->tp == 1) {
        KL(kc_gemm(c->gemm, s, c->lg, c->hsel, c->output, k, V, E));
    } else {
        /* every rank's (k, Vr) slice to every rank (bf16 pairs moved as
         * f32 words: Vr is even), then rank 0 lays the slices side by side */
        KL(kc_gemm(c->gemm, s, c->lg_loc, c->hsel, c->output, k, Vr, E));
        if (comm_allgather_f32(m->comm, (const float *)c->lg_loc, k * Vr / 2,
                               (float *)c->lg_all) != 0) {
            snprintf(err, errlen, "tensor parallel rank %d: %s", m->tp_rank,
                     comm_error(m->comm));
            goto fail;
        }
        for (int q = 0; q < c->tp && c->head; q++) {
            int64_t v0 = c->plan->rank[q].vocab0, v1 = c->plan->rank[q].vocab1;
            if (v1 > v0)
                CK(kc_copy_2d_d2d(s, c->lg + v0, (size_t)V * 2,
                                  c->lg_all + (size_t)q * (size_t)k * (size_t)Vr, (size_t)Vr * 2,
                                  (size_t)(v1 - v0) * 2, (size_t)k));
        }
    }
    if (!c->head) /* the others' part ends here, but for the ids below */
        goto bcast;
    KL(kc_bf16_to_f32(s, c->lg32, c->lg, k * V));
    if (ns > 0) {
        char *L = c->ls_dev;
        size_t lc = (size_t)c->ls_cap;
        struct kc_samp_lists ls = {
            (const int32_t *)(D + lo->seen_off), (const int32_t *)L,
            (const int32_t *)(L + lc * 4), (const int32_t *)(D + lo->prompt_off),
            (const int32_t *)(L + lc * 8), (const int32_t *)(D + lo->bias_off),
            (const int32_t *)(L + lc * 12), (const float *)(L + lc * 16)};
        char *O = c->out_dev;
        size_t S = (size_t)c->cap_seqs;
        KL(kc_sample(s, c->lg32, (int)ns, V, (const struct kc_samp_row *)(D + lo->prm), &ls,
                     (int32_t *)O, (float *)(O + S * 4), (int32_t *)(O + S * 8),
                     (float *)(O + S * (8 + N_TOP * 4)), c->samp_ws));
    }
bcast:
    /* the sampled ids to every rank: the next launch's MODEL_TOKEN_PREV
     * rows are resolved from them on each */
    if (c->tp > 1 && ns > 0 && comm_broadcast(m->comm, c->out_dev, (size_t)ns * 4, 0) != 0) {
        snprintf(err, errlen, "tensor parallel rank %d: %s", m->tp_rank, comm_error(m->comm));
        goto fail;
    }
    return 0;
fail:
    return -1;
}

/* Binds the device KV storage to kv. */
static int bind_kv(struct model *m, struct model_cuda *c, struct kv_cache *kv, char *err,
                   size_t errlen)
{
    const struct model_config *cf = &m->cfg;
    if (c->kv_bound == kv && c->kv_blocks == kv_n_blocks(kv))
        return 0;
    CK(kc_stream_sync(c->stream));
    free_kv(c);
    size_t per = (size_t)kv_n_blocks(kv) * KC_BLOCK_TOKENS * (size_t)cf->n_head_kv *
                 (size_t)cf->head_dim * 2;
    c->kc = calloc((size_t)cf->n_layer, sizeof(*c->kc));
    c->vc = calloc((size_t)cf->n_layer, sizeof(*c->vc));
    if (!c->kc || !c->vc) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    for (int64_t il = 0; il < cf->n_layer; il++) {
        DALLOC(c->kc[il], per);
        DALLOC(c->vc[il], per);
    }
    c->kv_bound = kv;
    c->kv_blocks = kv_n_blocks(kv);
    /* graphs hold the old cache's addresses */
    for (int i = 0; i < c->n_graphs; i++) {
        kc_graph_destroy(c->graphs[i].exec);
        c->graphs[i].exec = NULL;
    }
    return 0;
fail:
    free_kv(c);
    return -1;
}

/* The sampling lists' capacity: grown (re-capturing the graphs, which
 * hold its address) when a step needs more. */
static int ensure_lists(struct model_cuda *c, int64_t need, char *err, size_t errlen)
{
    if (need <= c->ls_cap)
        return 0;
    int64_t cap = c->ls_cap ? c->ls_cap : 4096;
    while (cap < need)
        cap *= 2;
    CK(kc_stream_sync(c->stream));
    for (int b = 0; b < 2; b++) {
        kc_free_host(c->ls_host[b]);
        c->ls_host[b] = NULL;
    }
    kc_free(c->ls_dev);
    c->ls_dev = NULL;
    c->ls_cap = 0;
    for (int b = 0; b < 2; b++)
        CK(kc_malloc_host(&c->ls_host[b], lists_bytes(cap)));
    DALLOC(c->ls_dev, lists_bytes(cap));
    c->ls_cap = cap;
    for (int i = 0; i < c->n_graphs; i++) {
        kc_graph_destroy(c->graphs[i].exec);
        c->graphs[i].exec = NULL;
    }
    return 0;
fail:
    return -1;
}

static int capture_graphs(struct model *m, struct model_cuda *c, char *err, size_t errlen);

int mcu_prepare(struct model *m, struct kv_cache *kv, int64_t max_rows, int max_seqs,
                int64_t max_len, char *err, size_t errlen)
{
    struct model_cuda *c = m->cuda;
    const struct model_config *cf = &m->cfg;
    int64_t E = cf->n_embd, hd = cf->head_dim, nq = cf->n_head * hd, nkv = cf->n_head_kv * hd;
    int64_t V = c->V;
    if (bind_kv(m, c, kv, err, errlen))
        return -1;
    int64_t blocks = (max_len + KC_BLOCK_TOKENS - 1) / KC_BLOCK_TOKENS;
    if (blocks > kv_n_blocks(kv))
        blocks = kv_n_blocks(kv);
    if (max_seqs > kv_max_seqs(kv))
        max_seqs = kv_max_seqs(kv);
    if (max_rows < max_seqs)
        max_rows = max_seqs;
    if (max_rows <= c->cap_rows && max_seqs <= c->cap_seqs && blocks <= c->cap_blocks &&
        c->graphs)
        return capture_graphs(m, c, err, errlen);
    CK(kc_stream_sync(c->stream));
    if (max_rows < c->cap_rows)
        max_rows = c->cap_rows;
    if (max_seqs < c->cap_seqs)
        max_seqs = (int)c->cap_seqs;
    if (blocks < c->cap_blocks)
        blocks = c->cap_blocks;
    int64_t ls_cap = c->ls_cap;
    free_step(c);
    size_t R = (size_t)max_rows, S = (size_t)max_seqs;
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
    DALLOC(c->hsel, S * (size_t)E * 2);
    if (c->head) { /* the whole vocabulary's logits, and sampling */
        DALLOC(c->lg, S * (size_t)V * 2);
        DALLOC(c->lg32, S * (size_t)V * sizeof(float));
        DALLOC(c->samp_ws, kc_sample_workspace(max_seqs, V));
    }
    if (c->tp > 1) {
        DALLOC(c->lg_loc, S * (size_t)c->Vr * 2);
        DALLOC(c->lg_all, (size_t)c->tp * S * (size_t)c->Vr * 2);
    }
    /* sized for the most sequences a step can hold, which serves any
     * smaller batch (kcuda.h) */
    if (!c->deterministic)
        DALLOC(c->decode_ws, kc_attn_decode_workspace(max_seqs, (int)cf->n_head, (int)hd, 0));
    c->in_cap = layout(max_rows, max_seqs, max_rows, max_seqs).total;
    for (int b = 0; b < 2; b++)
        CK(kc_malloc_host(&c->in_host[b], c->in_cap));
    DALLOC(c->in_dev, c->in_cap);
    for (int b = 0; b < 2; b++)
        CK(kc_malloc_host((void **)&c->bt_host[b], S * (size_t)blocks * 4));
    DALLOC(c->bt_dev, S * (size_t)blocks * 4);
    for (int b = 0; b < 2; b++)
        CK(kc_malloc_host(&c->out_host[b], out_bytes(max_seqs)));
    DALLOC(c->out_dev, out_bytes(max_seqs));
    c->cap_rows = max_rows;
    c->cap_seqs = max_seqs;
    c->cap_blocks = blocks;
    if (grow_scratch(c, max_rows, kv_max_seqs(kv))) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if (ensure_lists(c, ls_cap > 4096 ? ls_cap : 4096, err, errlen))
        goto fail;
    int sizes[128];
    int ng = graph_sizes(max_seqs, sizes, 128);
    c->graphs = calloc((size_t)ng, sizeof(*c->graphs));
    if (!c->graphs) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    for (int i = 0; i < ng; i++)
        c->graphs[i].rows = sizes[i];
    c->n_graphs = ng;
    return capture_graphs(m, c, err, errlen);
fail:
    free_step(c);
    return -1;
}

/* A graph step of g.rows rows: every row a sequence's decode row, every
 * row sampled (padding rows too, greedily, their results unread). */
static void graph_step_shape(const struct model_cuda *c, int gi, struct step *st)
{
    int64_t b = c->graphs[gi].rows;
    memset(st, 0, sizeof(*st));
    st->n = st->n_seqs = st->nw = st->n_samp = st->rows = b;
    st->max_q = 1;
    st->pitch = c->cap_blocks;
    st->max_blocks = c->cap_blocks;
    st->graph = gi;
    st->lo = layout(b, b, b, b);
}

static int capture_graphs(struct model *m, struct model_cuda *c, char *err, size_t errlen)
{
    if (c->eager)
        return 0;
    for (int i = 0; i < c->n_graphs; i++) {
        if (c->graphs[i].exec)
            continue;
        struct step st;
        graph_step_shape(c, i, &st);
        int e = kc_capture_begin(c->stream);
        if (e == 0) {
            int rc = enqueue_body(m, c, &st, err, errlen);
            if (rc == 0)
                rc = enqueue_head(m, c, &st, 0, st.rows, st.rows, err, errlen);
            kc_graph g = NULL;
            e = kc_capture_end(c->stream, &g);
            if (rc != 0 && e == 0) {
                kc_graph_destroy(g);
                e = -1;
            }
            c->graphs[i].exec = g;
        }
        if (e != 0) {
            /* Not fatal: the same kernels run eagerly, only slower. */
            fprintf(stderr, "inferd: CUDA graph capture for %d rows failed (%s); decode steps "
                    "run eagerly\n", c->graphs[i].rows,
                    e > 0 ? kc_error_string(e) : err);
            for (int j = 0; j < c->n_graphs; j++) {
                kc_graph_destroy(c->graphs[j].exec);
                c->graphs[j].exec = NULL;
            }
            c->eager = 1;
            return 0;
        }
    }
    return 0;
}

/* The tokens a sample's penalties and bias read, appended to the lists
 * (host side of ls) at *at; the row's offsets are written by the caller. */
static void lists_put(struct model_cuda *c, struct sampler *sp, const struct samp_view *v,
                      int64_t *seen, int64_t *prompt, int64_t *bias)
{
    char *L = c->ls_host[c->par];
    size_t lc = (size_t)c->ls_cap;
    int64_t cap = c->ls_cap;
    if (v->penalties) {
        *seen += samp_view_seen(sp, (int32_t *)L + *seen, (int32_t *)(L + lc * 4) + *seen,
                                cap - *seen);
        if (v->repetition_penalty != 1.0f)
            *prompt += samp_view_prompt(sp, (int32_t *)(L + lc * 8) + *prompt, cap - *prompt);
    }
    *bias += samp_view_bias(sp, (int32_t *)(L + lc * 12) + *bias,
                            (float *)(L + lc * 16) + *bias, cap - *bias);
}

/* Entries the samples' lists need, the longest kind. */
static int64_t lists_need(struct model_sample *samples, int64_t n_samples)
{
    int64_t seen = 0, prompt = 0, bias = 0;
    for (int64_t i = 0; i < n_samples; i++) {
        struct samp_view v;
        samp_view_get(samples[i].s, &v);
        if (v.penalties) {
            seen += v.n_seen;
            if (v.repetition_penalty != 1.0f)
                prompt += v.n_prompt;
        }
        bias += v.n_bias;
    }
    int64_t need = seen > prompt ? seen : prompt;
    return need > bias ? need : bias;
}

static void row_params(struct kc_samp_row *p, const struct samp_view *v, int32_t ahead)
{
    memset(p, 0, sizeof(*p));
    p->temperature = v->temperature;
    p->top_p = v->top_p;
    p->min_p = v->min_p;
    p->presence_penalty = v->presence_penalty;
    p->frequency_penalty = v->frequency_penalty;
    p->repetition_penalty = v->repetition_penalty;
    p->top_k = v->top_k;
    p->n_top_logprobs = v->n_top_logprobs;
    p->seed = v->seed;
    p->step = v->step + (uint64_t)(ahead > 0 ? ahead : 0);
}

/* Builds st's inputs on the host (in_host, bt_host, ls_host). */
static int build_step(struct model *m, struct model_cuda *c, struct kv_cache *kv,
                      const struct model_row *rows, int64_t n, struct model_sample *samples,
                      int64_t n_samples, struct step *st, char *err, size_t errlen)
{
    int max_seqs = kv_max_seqs(kv);
    struct scratch_view sv;
    memset(st, 0, sizeof(*st));
    st->graph = -1;
    if (ensure_scratch(c, n, max_seqs, &sv)) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    int *seq_of = sv.seq_of;
    int64_t *seq_first = sv.seq_first, *seq_count = sv.seq_count, *fill = sv.fill;
    char *is_samp = sv.is_samp;
    st->next = sv.next;
    st->order = sv.order;
    st->want_pos = sv.want_pos;
    st->host_w = sv.host_w;
    if (model_check_batch(m, kv, rows, n, c->prev_samples, st->next, err, errlen))
        goto fail;

    /* Rows grouped by sequence (in order of first appearance, each
     * sequence's rows in batch order), which is how the attention kernels
     * take them; every other op works row by row, so the whole step runs
     * in this order and only the logits go back to the callers' order. */
    for (int64_t r = 0; r < n; r++) {
        int sq = rows[r].seq;
        if (seq_count[sq]++ == 0)
            seq_of[st->n_seqs++] = sq;
        st->nw += rows[r].want_logits != 0;
    }
    int64_t off = 0;
    for (int64_t i = 0; i < st->n_seqs; i++) {
        int sq = seq_of[i];
        seq_first[sq] = off;
        off += seq_count[sq];
        if (seq_count[sq] > st->max_q)
            st->max_q = seq_count[sq];
        int64_t blocks = (st->next[sq] + KC_BLOCK_TOKENS - 1) / KC_BLOCK_TOKENS;
        if (blocks > st->max_blocks)
            st->max_blocks = blocks;
    }
    {
        int64_t w = 0;
        for (int64_t r = 0; r < n; r++) {
            int sq = rows[r].seq;
            int64_t p = seq_first[sq] + fill[sq]++;
            st->order[p] = r; /* position p of the step runs row r */
            if (rows[r].want_logits)
                st->want_pos[w++] = p;
        }
    }
    for (int64_t i = 0; i < n_samples; i++) {
        if (samples[i].row < 0 || samples[i].row >= st->nw || is_samp[samples[i].row]) {
            snprintf(err, errlen, "sample %lld names row %lld of %lld logits rows (or twice)",
                     (long long)i, (long long)samples[i].row, (long long)st->nw);
            goto fail;
        }
        is_samp[samples[i].row] = 1;
    }
    st->n_samp = n_samples;
    for (int64_t w = 0; w < st->nw; w++)
        if (!is_samp[w])
            st->host_w[st->n_host++] = w;

    /* Sizes beyond what was prepared: prepare again (allocates), which
     * cannot happen under a step still in flight. */
    if (n > c->cap_rows || st->n_seqs > c->cap_seqs || n_samples > c->cap_seqs ||
        st->max_blocks > c->cap_blocks) {
        if (c->q_len > 0) {
            snprintf(err, errlen, "a step of %lld rows over %lld sequences exceeds what was "
                     "prepared (%lld, %lld) while a step is in flight", (long long)n,
                     (long long)st->n_seqs, (long long)c->cap_rows, (long long)c->cap_seqs);
            goto fail;
        }
        int64_t len = st->max_blocks * KC_BLOCK_TOKENS;
        if (len < c->cap_blocks * KC_BLOCK_TOKENS)
            len = c->cap_blocks * KC_BLOCK_TOKENS;
        int64_t ms = st->n_seqs > n_samples ? st->n_seqs : n_samples;
        if (mcu_prepare(m, kv, n, (int)(ms > c->cap_seqs ? ms : c->cap_seqs), len, err,
                        errlen))
            goto fail;
    }
    if (n_samples > c->cap_seqs) {
        snprintf(err, errlen, "%lld samples in one step: at most %lld", (long long)n_samples,
                 (long long)c->cap_seqs);
        goto fail;
    }
    /* only the head samples: the other ranks' samples may name no sampler
     * (a follower node knows their rows only) */
    int64_t need = c->head ? lists_need(samples, n_samples) : 0;
    if (ensure_lists(c, need, err, errlen) || capture_graphs(m, c, err, errlen))
        goto fail;

    /* A decode step of sampled rows replays the graph of its size. */
    st->rows = n;
    st->pitch = st->max_blocks;
    if (!c->eager && st->max_q == 1 && st->n_samp == n && st->nw == n) {
        int gi = pick_graph(c, n);
        if (gi >= 0) {
            struct step g;
            graph_step_shape(c, gi, &g);
            st->graph = gi;
            st->rows = g.rows;
            st->pitch = g.pitch;
        }
    }
    int64_t R = st->rows, NS = st->graph >= 0 ? st->rows : st->n_seqs;
    int64_t NSEL = st->graph >= 0 ? st->rows : st->nw;
    int64_t NSAMP = st->graph >= 0 ? st->rows : st->n_samp;
    st->lo = layout(R, NS, NSEL, NSAMP);
    const struct step_layout *lo = &st->lo;
    char *H = c->in_host[c->par];
    int32_t *ids = (int32_t *)(H + lo->ids), *pos = (int32_t *)(H + lo->pos);
    int64_t *slot = (int64_t *)(H + lo->slot);
    int8_t *tab = (int8_t *)(H + lo->tab);
    int32_t *cu_q = (int32_t *)(H + lo->cu_q), *seq_len = (int32_t *)(H + lo->seq_len);
    int32_t *sel = (int32_t *)(H + lo->sel);
    struct kc_samp_row *prm = (struct kc_samp_row *)(H + lo->prm);
    int32_t *seen_off = (int32_t *)(H + lo->seen_off);
    int32_t *prompt_off = (int32_t *)(H + lo->prompt_off);
    int32_t *bias_off = (int32_t *)(H + lo->bias_off);
    for (int64_t p = 0; p < R; p++) {
        if (p >= n) { /* graph padding: no cache write, nothing attended */
            ids[p] = 0, pos[p] = 0, slot[p] = -1, tab[p] = 0;
            continue;
        }
        const struct model_row *row = &rows[st->order[p]];
        int64_t nb;
        const int32_t *t = kv_seq_blocks(kv, row->seq, &nb);
        ids[p] = row->token;
        pos[p] = (int32_t)row->pos;
        slot[p] = (int64_t)t[row->pos / KV_BLOCK_TOKENS] * KC_BLOCK_TOKENS +
                  row->pos % KV_BLOCK_TOKENS;
        tab[p] = (int8_t)(kv_seq_rope_long(kv, row->seq) ? 1 : 0);
    }
    cu_q[0] = 0;
    for (int64_t i = 0; i < NS; i++) {
        if (i >= st->n_seqs) {
            cu_q[i + 1] = cu_q[i] + 1;
            seq_len[i] = 0;
            continue;
        }
        int sq = seq_of[i];
        cu_q[i + 1] = cu_q[i] + (int32_t)seq_count[sq];
        seq_len[i] = (int32_t)st->next[sq];
        int64_t nb;
        const int32_t *t = kv_seq_blocks(kv, sq, &nb);
        int64_t need_b = (st->next[sq] + KC_BLOCK_TOKENS - 1) / KC_BLOCK_TOKENS;
        int32_t *bt = c->bt_host[c->par] + i * st->pitch;
        for (int64_t b = 0; b < st->max_blocks; b++)
            bt[b] = b < need_b && b < nb ? t[b] : 0;
    }
    /* sel: the sampled rows in sample order, then the host's in want order */
    for (int64_t i = 0; i < n_samples; i++)
        sel[i] = (int32_t)st->want_pos[samples[i].row];
    for (int64_t j = 0; j < st->n_host; j++)
        sel[n_samples + j] = (int32_t)st->want_pos[st->host_w[j]];
    for (int64_t i = st->nw; i < NSEL; i++)
        sel[i] = (int32_t)i; /* graph padding rows */
    int64_t ns = 0, np = 0, nbias = 0;
    for (int64_t i = 0; i < NSAMP; i++) {
        seen_off[i] = (int32_t)ns, prompt_off[i] = (int32_t)np, bias_off[i] = (int32_t)nbias;
        if (i >= n_samples || !c->head) {
            struct samp_view g;
            memset(&g, 0, sizeof(g));
            g.top_p = 1.0f, g.repetition_penalty = 1.0f; /* greedy, nothing else */
            row_params(&prm[i], &g, 0);
            continue;
        }
        struct samp_view v;
        samp_view_get(samples[i].s, &v);
        row_params(&prm[i], &v, samples[i].ahead);
        lists_put(c, samples[i].s, &v, &ns, &np, &nbias);
    }
    seen_off[NSAMP] = (int32_t)ns, prompt_off[NSAMP] = (int32_t)np, bias_off[NSAMP] = (int32_t)nbias;
    st->n_seen = ns, st->n_prompt = np, st->n_bias = nbias;
    return 0;
fail:
    return -1;
}

/* Copies st's inputs to the device. */
static int upload_step(struct model_cuda *c, const struct step *st, char *err, size_t errlen)
{
    kc_stream s = c->stream;
    CK(kc_copy_h2d(s, c->in_dev, c->in_host[c->par], st->lo.total));
    if (st->n_seqs > 0 && st->max_blocks > 0)
        CK(kc_copy_2d_h2d(s, c->bt_dev, (size_t)st->pitch * 4, c->bt_host[c->par],
                          (size_t)st->pitch * 4, (size_t)st->max_blocks * 4,
                          (size_t)st->n_seqs));
    char *Ld = c->ls_dev, *Lh = c->ls_host[c->par];
    size_t lc = (size_t)c->ls_cap;
    if (st->n_seen) {
        CK(kc_copy_h2d(s, Ld, Lh, (size_t)st->n_seen * 4));
        CK(kc_copy_h2d(s, Ld + lc * 4, Lh + lc * 4, (size_t)st->n_seen * 4));
    }
    if (st->n_prompt)
        CK(kc_copy_h2d(s, Ld + lc * 8, Lh + lc * 8, (size_t)st->n_prompt * 4));
    if (st->n_bias) {
        CK(kc_copy_h2d(s, Ld + lc * 12, Lh + lc * 12, (size_t)st->n_bias * 4));
        CK(kc_copy_h2d(s, Ld + lc * 16, Lh + lc * 16, (size_t)st->n_bias * 4));
    }
    return 0;
fail:
    return -1;
}

int mcu_launch(struct model *m, struct kv_cache *kv, const struct model_row *rows, int64_t n,
               float *logits, struct model_sample *samples, int64_t n_samples, int set_len,
               char *err, size_t errlen)
{
    struct model_cuda *c = m->cuda;
    int64_t V = c->V;
    struct step st;
    memset(&st, 0, sizeof(st));
    if (n > 0 && (c->kv_bound != kv || !c->in_dev)) {
        /* a caller that did not prepare (tools, tests): size for this
         * batch and the cache's longest possible sequence */
        if (c->q_len > 0) {
            snprintf(err, errlen, "a step over another KV cache is still in flight");
            return -1;
        }
        int64_t len = kv_n_blocks(kv) * KC_BLOCK_TOKENS;
        if (m->cfg.n_ctx > 0 && len > m->cfg.n_ctx)
            len = m->cfg.n_ctx;
        if (mcu_prepare(m, kv, n, kv_max_seqs(kv), len, err, errlen))
            return -1;
    }
    if (n > 0 && build_step(m, c, kv, rows, n, samples, n_samples, &st, err, errlen))
        return -1;
    kc_stream s = c->stream;
    int par = c->par;
    if (n > 0) {
        if (upload_step(c, &st, err, errlen))
            goto fail;
        if (st.graph >= 0) {
            CK(kc_graph_launch(c->graphs[st.graph].exec, s));
        } else {
            if (enqueue_body(m, c, &st, err, errlen))
                goto fail;
            for (int64_t r0 = 0; r0 < st.nw; r0 += c->cap_seqs) {
                int64_t k = st.nw - r0 < c->cap_seqs ? st.nw - r0 : c->cap_seqs;
                if (enqueue_head(m, c, &st, r0, k, r0 == 0 ? n_samples : 0, err, errlen))
                    goto fail;
                /* this chunk's host rows, in runs of consecutive want rows
                 * (a copy to pageable memory: the host waits for it) */
                int64_t j0 = r0 > n_samples ? r0 : n_samples;
                for (int64_t j = j0; j < r0 + k && c->head && logits;) {
                    int64_t w = st.host_w[j - n_samples], run = 1;
                    while (j + run < r0 + k && st.host_w[j + run - n_samples] == w + run)
                        run++;
                    CK(kc_copy_d2h(s, logits + (size_t)w * (size_t)V,
                                   c->lg32 + (size_t)(j - r0) * (size_t)V,
                                   (size_t)run * (size_t)V * sizeof(float)));
                    j += run;
                }
            }
        }
    }
    if (n_samples > 0 && c->head) {
        char *O = c->out_dev, *Oh = c->out_host[par];
        size_t S = (size_t)c->cap_seqs, k = (size_t)n_samples;
        CK(kc_copy_d2h(s, Oh, O, k * 4)); /* tokens */
        CK(kc_copy_d2h(s, Oh + S * 4, O + S * 4, k * 4));
        CK(kc_copy_d2h(s, Oh + S * 8, O + S * 8, k * N_TOP * 4));
        CK(kc_copy_d2h(s, Oh + S * (8 + N_TOP * 4), O + S * (8 + N_TOP * 4), k * N_TOP * 4));
    }
    CK(kc_event_record(c->done_ev[par], s));
    /* The cache holds these positions as far as any later launch can
     * tell: the device runs launches in order. */
    for (int64_t r = 0; r < n && set_len; r++)
        kv_seq_set_len(kv, rows[r].seq, st.next[rows[r].seq]);
    int qi = (c->q_head + c->q_len) % 2;
    c->fifo[qi].par = par;
    c->fifo[qi].samples = samples;
    c->fifo[qi].n_samples = n_samples;
    c->q_len++;
    c->par ^= 1;
    c->prev_samples = n_samples;
    step_free(&st);
    return 0;
fail:
    step_free(&st);
    return -1;
}

int mcu_collect(struct model *m, char *err, size_t errlen)
{
    struct model_cuda *c = m->cuda;
    if (c->q_len == 0) {
        snprintf(err, errlen, "no step launched to collect");
        return -1;
    }
    int qi = c->q_head;
    c->q_head = (c->q_head + 1) % 2;
    c->q_len--;
    int par = c->fifo[qi].par;
    struct model_sample *samples = c->fifo[qi].samples;
    int64_t n_samples = c->fifo[qi].n_samples;
    if (m->comm) {
        /* a peer that fails leaves this rank's collectives waiting: the
         * wait notices the abort that follows */
        if (comm_wait_event(m->comm, c->done_ev[par]) != 0) {
            snprintf(err, errlen, "tensor parallel rank %d: %s", m->tp_rank,
                     comm_error(m->comm));
            return -1;
        }
    } else {
        CK(kc_event_sync(c->done_ev[par]));
    }
    if (n_samples > 0 && c->head) {
        const char *Oh = c->out_host[par];
        size_t S = (size_t)c->cap_seqs;
        const int32_t *tok = (const int32_t *)Oh, *ttok = (const int32_t *)(Oh + S * 8);
        const float *lp = (const float *)(Oh + S * 4);
        const float *tlp = (const float *)(Oh + S * (8 + N_TOP * 4));
        for (int64_t i = 0; i < n_samples; i++) {
            struct samp_view v;
            struct samp_result *res = &samples[i].res;
            samp_view_get(samples[i].s, &v);
            memset(res, 0, sizeof(*res));
            res->token = tok[i];
            res->logprob = lp[i];
            res->n_top = v.n_top_logprobs;
            for (int t = 0; t < res->n_top && t < SAMP_MAX_TOP_LOGPROBS; t++) {
                res->top[t].token = ttok[(size_t)i * N_TOP + (size_t)t];
                res->top[t].logprob = tlp[(size_t)i * N_TOP + (size_t)t];
            }
        }
    }
    return 0;
fail:
    return -1;
}
