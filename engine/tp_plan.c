/* tp_plan.c: checks that a model's shape splits over N tensor-parallel
 * ranks and lays out what each rank holds (tp_plan.h). The rules, in the
 * order they are checked: attention heads, KV heads (split or replicated),
 * their GQA agreement, the MLP, the quant blocks of the row-parallel
 * matrices; then the vocabulary ranges and the bytes. Pure; any thread. */
#include "engine/tp_plan.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

#define PLAN_ERR(...)                                                                              \
    do {                                                                                           \
        if (errlen)                                                                                \
            snprintf(err, errlen, __VA_ARGS__);                                                    \
        return -1;                                                                                 \
    } while (0)

void tp_dtypes_uniform(struct tp_dtypes *d, enum k_dtype matrices, enum k_dtype vectors)
{
    d->q = d->k = d->v = d->o = matrices;
    d->gate = d->up = d->down = matrices;
    d->embd = d->lm_head = matrices;
    d->vec = vectors;
    d->kv = K_BF16;
    d->act = K_BF16;
}

/* Bytes of rows rows of cols elements; the callers have checked that cols
 * falls on t's blocks, so k_row_bytes cannot fail here. */
static int64_t rows_bytes(enum k_dtype t, int64_t rows, int64_t cols)
{
    return rows * k_row_bytes(t, cols);
}

/* The weights of one layer for a rank holding nq query heads, nkv KV
 * heads and ff MLP columns (the unsharded layer: all of them). */
static int64_t layer_bytes(const struct model_config *c, const struct tp_dtypes *dt, int64_t nq,
                           int64_t nkv, int64_t ff)
{
    int64_t E = c->n_embd, hd = c->head_dim;
    int64_t b = 2 * rows_bytes(dt->vec, 1, E); /* attention and MLP norms */
    b += rows_bytes(dt->q, nq * hd, E) + rows_bytes(dt->k, nkv * hd, E) +
         rows_bytes(dt->v, nkv * hd, E);
    if (c->qkv_bias)
        b += rows_bytes(dt->vec, 1, (nq + 2 * nkv) * hd);
    b += rows_bytes(dt->o, E, nq * hd);
    b += rows_bytes(dt->gate, ff, E) + rows_bytes(dt->up, ff, E);
    b += rows_bytes(dt->down, E, ff);
    return b;
}

/* The embedding and (untied) LM head rows for one vocabulary range. */
static int64_t vocab_bytes(const struct model_config *c, const struct tp_dtypes *dt, int64_t rows)
{
    int64_t b = rows_bytes(dt->embd, rows, c->n_embd);
    if (!c->tied_embeddings)
        b += rows_bytes(dt->lm_head, rows, c->n_embd);
    return b;
}

static void upper(char *dst, size_t n, const char *s)
{
    size_t i = 0;
    for (; s[i] && i + 1 < n; i++)
        dst[i] = (char)toupper((unsigned char)s[i]);
    dst[i] = '\0';
}

static int plan(const struct model_config *c, const struct tp_dtypes *dt, int tp,
                struct tp_plan *out, char *err, size_t errlen, int suggest);

/* A row-parallel matrix is cut along its rows, so each rank's slice of a
 * row must be whole quant blocks (a block's scale covers all its values). */
static int check_row_split(const struct model_config *c, const struct tp_dtypes *dt, int tp,
                           const char *what, enum k_dtype t, int64_t cols, char *err, size_t errlen,
                           int suggest)
{
    int64_t blk = k_dtype_block(t);
    if (blk <= 0)
        PLAN_ERR("%s: unknown dtype %d", what, (int)t);
    if (cols % blk == 0)
        return 0;
    char name[16];
    upper(name, sizeof(name), k_dtype_name(t));
    const char *files =
        cols % k_dtype_block(K_Q8_0) == 0 && t != K_Q8_0 ? "f16/bf16/Q8_0" : "f16/bf16";
    int fits = 0;
    if (suggest) {
        struct tp_plan tmp;
        for (int s = tp - 1; s >= 2 && !fits; s--)
            if (plan(c, dt, s, &tmp, NULL, 0, 0) == 0)
                fits = s;
    }
    if (fits)
        PLAN_ERR("%s: %lld input columns per rank is not a multiple of %s's %lld-value blocks;"
                 " use tensor parallel size %d or an %s file",
                 what, (long long)cols, name, (long long)blk, fits, files);
    PLAN_ERR("%s: %lld input columns per rank is not a multiple of %s's %lld-value blocks;"
             " use an %s file",
             what, (long long)cols, name, (long long)blk, files);
}

static int plan(const struct model_config *c, const struct tp_dtypes *dt, int tp,
                struct tp_plan *out, char *err, size_t errlen, int suggest)
{
    if (tp < 1 || tp > TP_MAX)
        PLAN_ERR("tensor parallel size %d is outside 1..%d", tp, TP_MAX);
    if (c->n_head <= 0 || c->n_head_kv <= 0 || c->head_dim <= 0 || c->n_embd <= 0 || c->n_ff <= 0 ||
        c->n_vocab <= 0 || c->n_layer <= 0)
        PLAN_ERR("the model's shape has a zero or negative size");
    if (c->n_head % c->n_head_kv)
        PLAN_ERR("n_head %lld is not a multiple of n_head_kv %lld", (long long)c->n_head,
                 (long long)c->n_head_kv);

    /* ------------------------------------------------------ attention */
    if (c->n_head % tp)
        PLAN_ERR("n_head %lld cannot be split over %d ranks", (long long)c->n_head, tp);
    int64_t nq = c->n_head / tp;
    int64_t nkv_total = c->n_head_kv;
    int replicated = nkv_total < tp;
    int64_t replicas = 1, nkv = 0;
    if (!replicated) {
        if (nkv_total % tp)
            PLAN_ERR("n_head_kv %lld cannot be split over %d ranks", (long long)nkv_total, tp);
        nkv = nkv_total / tp;
    } else {
        /* fewer KV heads than ranks: each rank keeps one whole KV head,
         * shared by tp / n_head_kv neighbouring ranks (vLLM) */
        if (tp % nkv_total)
            PLAN_ERR("n_head_kv %lld cannot be replicated over %d ranks: with fewer KV heads"
                     " than ranks, the ranks must be a multiple of the KV heads",
                     (long long)nkv_total, tp);
        replicas = tp / nkv_total;
        nkv = 1;
    }
    /* GQA: query head h reads KV head h / group, so every query head of a
     * rank must fall in a KV head that rank holds. */
    int64_t group = c->n_head / nkv_total;
    for (int r = 0; r < tp; r++) {
        int64_t kv0 = replicated ? r / replicas : (int64_t)r * nkv;
        for (int64_t h = (int64_t)r * nq; h < (int64_t)(r + 1) * nq; h++)
            if (h / group < kv0 || h / group >= kv0 + nkv)
                PLAN_ERR("rank %d: query head %lld reads KV head %lld, which the rank does not"
                         " hold (KV heads [%lld, %lld))",
                         r, (long long)h, (long long)(h / group), (long long)kv0,
                         (long long)(kv0 + nkv));
    }

    /* ------------------------------------------------------------ MLP */
    if (c->n_ff % tp)
        PLAN_ERR("n_ff %lld cannot be split over %d ranks", (long long)c->n_ff, tp);
    int64_t ff = c->n_ff / tp;

    /* -------------------------------------------- row-parallel blocks */
    if (check_row_split(c, dt, tp, "o_proj", dt->o, nq * c->head_dim, err, errlen, suggest) ||
        check_row_split(c, dt, tp, "down_proj", dt->down, ff, err, errlen, suggest))
        return -1;
    /* column-parallel rows are whole rows of n_embd values, which the
     * loaded model's shapes already put on block boundaries */
    const enum k_dtype whole[] = {dt->q, dt->k, dt->v, dt->gate, dt->up, dt->embd, dt->lm_head};
    size_t n_whole = sizeof(whole) / sizeof(whole[0]) - (c->tied_embeddings ? 1 : 0);
    for (size_t i = 0; i < n_whole; i++)
        if (k_row_bytes(whole[i], c->n_embd) < 0)
            PLAN_ERR("n_embd %lld is not a multiple of %s's blocks", (long long)c->n_embd,
                     k_dtype_name(whole[i]));
    if (k_dtype_block(dt->vec) != 1 || k_dtype_block(dt->kv) != 1 || k_dtype_block(dt->act) != 1)
        PLAN_ERR("norms, biases, the KV cache and activations must be a float type");

    /* ---------------------------------------------------------- plan */
    memset(out, 0, sizeof(*out));
    out->tp = tp;
    out->kv_replicated = replicated;
    out->kv_replicas = replicas;
    int64_t per = (c->n_vocab + tp - 1) / tp;
    per = (per + TP_VOCAB_PAD - 1) / TP_VOCAB_PAD * TP_VOCAB_PAD;
    out->vocab_per_rank = per;
    int64_t kv_elem = k_row_bytes(dt->kv, 1);
    int64_t norm_e = rows_bytes(dt->vec, 1, c->n_embd);
    for (int r = 0; r < tp; r++) {
        struct tp_rank_plan *p = &out->rank[r];
        p->rank = r;
        p->q_head0 = (int64_t)r * nq;
        p->n_q_heads = nq;
        p->kv_head0 = replicated ? r / replicas : (int64_t)r * nkv;
        p->n_kv_heads = nkv;
        p->ff0 = (int64_t)r * ff;
        p->n_ff = ff;
        p->vocab0 = (int64_t)r * per < c->n_vocab ? (int64_t)r * per : c->n_vocab;
        p->vocab1 = p->vocab0 + per < c->n_vocab ? p->vocab0 + per : c->n_vocab;
        p->vocab_rows = per;
        p->weight_bytes =
            c->n_layer * layer_bytes(c, dt, nq, nkv, ff) + norm_e + vocab_bytes(c, dt, per);
        p->kv_bytes_per_token = c->n_layer * 2 * nkv * c->head_dim * kv_elem;
        out->vocab_pad_bytes += vocab_bytes(c, dt, per - (p->vocab1 - p->vocab0));
    }
    out->total_weight_bytes = c->n_layer * layer_bytes(c, dt, c->n_head, nkv_total, c->n_ff) +
                              norm_e + vocab_bytes(c, dt, c->n_vocab);
    /* every rank holds all norms; each KV head's k/v rows (and biases) on
     * `replicas` ranks: tp heads' worth stored where n_head_kv would do */
    out->replicated_bytes = (int64_t)(tp - 1) * (2 * c->n_layer + 1) * norm_e;
    if (replicated) {
        int64_t extra = tp - nkv_total;
        int64_t kv_rows = rows_bytes(dt->k, extra * c->head_dim, c->n_embd) +
                          rows_bytes(dt->v, extra * c->head_dim, c->n_embd);
        if (c->qkv_bias)
            kv_rows += rows_bytes(dt->vec, 1, 2 * extra * c->head_dim);
        out->replicated_bytes += c->n_layer * kv_rows;
    }
    out->kv_bytes_per_token = c->n_layer * 2 * nkv_total * c->head_dim * kv_elem;
    out->allreduce_values_per_token = 2 * c->n_layer * c->n_embd;
    out->allreduce_bytes_per_token = out->allreduce_values_per_token * k_row_bytes(dt->act, 1);
    out->embd_allreduce_values = c->n_embd;
    out->logits_gather_values = (int64_t)tp * per;
    return 0;
}

int tp_plan_make(const struct model_config *c, const struct tp_dtypes *dt, int tp,
                 struct tp_plan *out, char *err, size_t errlen)
{
    return plan(c, dt, tp, out, err, errlen, 1);
}
