/* model.c: loading a model (either format), binding its tensors by name
 * with every shape checked against the config, and the forward pass over a
 * batch of rows with a paged KV cache.
 *
 * One forward function serves the whole Llama family; the config says
 * where architectures differ (fused projections, qkv bias, RoPE layout and
 * scaling, sliding window). Engine thread only; the matmuls and attention
 * fan out over the CPU pool. */
#include "engine/model.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "engine/gguf.h"
#include "engine/json.h"
#include "engine/model_config.h"
#include "engine/comm.h"
#include "engine/dummy.h"
#include "engine/model_internal.h"
#include "engine/safetensors.h"

/* ---------------------------------------------------------------- helpers */

static void *xmalloc_aligned(size_t n)
{
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0)
        return NULL;
    return p;
}

static const struct tensor *find_tensor(const struct model *m, const char *name)
{
    if (m->dummy)
        return dummy_find(m->dummy, name);
    return m->gguf ? gguf_find_tensor(m->gguf, name) : st_find(m->st, name);
}

static const char *tensor_fmt_name(const struct model *m, const char *hf, const char *gg)
{
    return m->gguf ? gg : hf;
}

static void count_tensor(struct model *m, const struct tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->n_dims; i++)
        n *= t->ne[i];
    m->stats.n_params += n;
    m->stats.weight_bytes += (int64_t)t->nbytes;
    m->stats.n_tensors++;
    m->stats.tensors_by_dtype[t->dtype]++;
    m->stats.params_by_dtype[t->dtype] += n;
}

/* Binds a 2-D weight of shape (rows, cols) in place. */
static int bind_matrix(struct model *m, const char *name, int64_t rows, int64_t cols,
                       struct k_matrix *out, char *err, size_t errlen)
{
    const struct tensor *t = find_tensor(m, name);
    if (!t) {
        snprintf(err, errlen, "%s: missing tensor '%s'", m->path, name);
        return -1;
    }
    if (t->n_dims != 2 || t->ne[0] != cols || t->ne[1] != rows) {
        snprintf(err, errlen,
                 "%s: tensor '%s' has shape [%lld, %lld] (dims %d), the config implies [%lld, %lld]",
                 m->path, name, (long long)t->ne[1], (long long)t->ne[0], t->n_dims,
                 (long long)rows, (long long)cols);
        return -1;
    }
    out->dtype = t->dtype;
    out->rows = rows;
    out->cols = cols;
    out->data = t->data;
    count_tensor(m, t);
    return 0;
}

static int own(struct model *m, void *p)
{
    if (m->n_owned == m->cap_owned) {
        size_t cap = m->cap_owned ? 2 * m->cap_owned : 64;
        void **n = realloc(m->owned, cap * sizeof(*n));
        if (!n)
            return -1;
        m->owned = n;
        m->cap_owned = cap;
    }
    m->owned[m->n_owned++] = p;
    return 0;
}

/* Binds a 1-D vector of n elements, copied to f32 (norms and biases are
 * tiny, and f32 keeps the hot loops free of conversions). */
static int bind_vector(struct model *m, const char *name, int64_t n, float **out,
                       char *err, size_t errlen)
{
    const struct tensor *t = find_tensor(m, name);
    if (!t) {
        snprintf(err, errlen, "%s: missing tensor '%s'", m->path, name);
        return -1;
    }
    if (t->n_dims != 1 || t->ne[0] != n) {
        snprintf(err, errlen, "%s: tensor '%s' has %d dims and %lld elements, the config implies [%lld]",
                 m->path, name, t->n_dims, (long long)t->ne[0], (long long)n);
        return -1;
    }
    if (t->dtype != K_F32 && t->dtype != K_F16 && t->dtype != K_BF16) {
        snprintf(err, errlen, "%s: tensor '%s' is %s; vectors must be f32, f16 or bf16",
                 m->path, name, k_dtype_name(t->dtype));
        return -1;
    }
    float *v = xmalloc_aligned((size_t)n * sizeof(float));
    if (!v || own(m, v) != 0) {
        free(v);
        snprintf(err, errlen, "%s: out of memory", m->path);
        return -1;
    }
    struct k_matrix mat = {t->dtype, 1, n, t->data, K_LAYOUT_ROWS};
    k_dequant_row(&mat, 0, v);
    count_tensor(m, t);
    *out = v;
    return 0;
}

static void count_matmul(struct model *m, const struct k_matrix *w)
{
    if (!w->data)
        return;
    m->stats.matmul_params += w->rows * w->cols;
    m->stats.matmul_bytes += w->rows * k_row_bytes(w->dtype, w->cols);
}

/* ---------------------------------------------------------------- binding */

static int bind_layer(struct model *m, int64_t il, char *err, size_t errlen)
{
    const struct model_config *c = &m->cfg;
    struct layer *L = &m->layers[il];
    int64_t E = c->n_embd, hd = c->head_dim;
    int64_t nq = c->n_head * hd, nkv = c->n_head_kv * hd;
    char n[160];
#define NAME(hf, gg) (snprintf(n, sizeof(n), tensor_fmt_name(m, "model.layers.%lld." hf, "blk.%lld." gg), \
                               (long long)il), n)
    if (bind_vector(m, NAME("input_layernorm.weight", "attn_norm.weight"), E, &L->attn_norm, err, errlen))
        return -1;
    if (c->fused_qkv) {
        if (bind_matrix(m, NAME("self_attn.qkv_proj.weight", "attn_qkv.weight"), nq + 2 * nkv, E,
                        &L->wqkv, err, errlen))
            return -1;
    } else {
        if (bind_matrix(m, NAME("self_attn.q_proj.weight", "attn_q.weight"), nq, E, &L->wq, err, errlen) ||
            bind_matrix(m, NAME("self_attn.k_proj.weight", "attn_k.weight"), nkv, E, &L->wk, err, errlen) ||
            bind_matrix(m, NAME("self_attn.v_proj.weight", "attn_v.weight"), nkv, E, &L->wv, err, errlen))
            return -1;
    }
    if (c->qkv_bias) {
        if (bind_vector(m, NAME("self_attn.q_proj.bias", "attn_q.bias"), nq, &L->bq, err, errlen) ||
            bind_vector(m, NAME("self_attn.k_proj.bias", "attn_k.bias"), nkv, &L->bk, err, errlen) ||
            bind_vector(m, NAME("self_attn.v_proj.bias", "attn_v.bias"), nkv, &L->bv, err, errlen))
            return -1;
    }
    if (bind_matrix(m, NAME("self_attn.o_proj.weight", "attn_output.weight"), E, nq, &L->wo, err, errlen) ||
        bind_vector(m, NAME("post_attention_layernorm.weight", "ffn_norm.weight"), E, &L->ffn_norm, err, errlen))
        return -1;
    if (c->fused_gate_up) {
        if (bind_matrix(m, NAME("mlp.gate_up_proj.weight", "ffn_up.weight"), 2 * c->n_ff, E,
                        &L->wgate_up, err, errlen))
            return -1;
    } else {
        if (bind_matrix(m, NAME("mlp.gate_proj.weight", "ffn_gate.weight"), c->n_ff, E, &L->wgate, err, errlen) ||
            bind_matrix(m, NAME("mlp.up_proj.weight", "ffn_up.weight"), c->n_ff, E, &L->wup, err, errlen))
            return -1;
    }
    if (bind_matrix(m, NAME("mlp.down_proj.weight", "ffn_down.weight"), E, c->n_ff, &L->wdown, err, errlen))
        return -1;
#undef NAME
    return 0;
}

static int bind_all(struct model *m, char *err, size_t errlen)
{
    const struct model_config *c = &m->cfg;
    m->layers = calloc((size_t)c->n_layer, sizeof(struct layer));
    if (!m->layers) {
        snprintf(err, errlen, "%s: out of memory", m->path);
        return -1;
    }
    if (bind_matrix(m, tensor_fmt_name(m, "model.embed_tokens.weight", "token_embd.weight"),
                    c->n_vocab, c->n_embd, &m->tok_embd, err, errlen) ||
        bind_vector(m, tensor_fmt_name(m, "model.norm.weight", "output_norm.weight"),
                    c->n_embd, &m->out_norm, err, errlen))
        return -1;
    if (c->tied_embeddings) {
        m->output = m->tok_embd;
    } else if (bind_matrix(m, tensor_fmt_name(m, "lm_head.weight", "output.weight"),
                           c->n_vocab, c->n_embd, &m->output, err, errlen)) {
        return -1;
    }
    for (int64_t il = 0; il < c->n_layer; il++)
        if (bind_layer(m, il, err, errlen))
            return -1;
    count_matmul(m, &m->output);
    for (int64_t il = 0; il < c->n_layer; il++) {
        const struct layer *L = &m->layers[il];
        const struct k_matrix *all[] = {&L->wqkv, &L->wq, &L->wk, &L->wv, &L->wo,
                                        &L->wgate_up, &L->wgate, &L->wup, &L->wdown};
        for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
            count_matmul(m, all[i]);
    }
    return 0;
}

/* Copies w into the kernels' layout when they run it faster that way. */
static int repack_one(struct model *m, struct k_matrix *w, char *err, size_t errlen)
{
    if (!w->data || !k_matrix_pack_wanted(w))
        return 0;
    size_t bytes = k_matrix_packed_bytes(w);
    void *buf = xmalloc_aligned(bytes);
    if (!buf || own(m, buf) != 0) {
        free(buf);
        snprintf(err, errlen, "%s: out of memory repacking %zu bytes of weights "
                 "(--no-repack keeps the file's layout)", m->path, bytes);
        return -1;
    }
    if (k_matrix_pack(m->pool, w, buf, w) != 0) {
        snprintf(err, errlen, "%s: cannot repack a %s matrix", m->path, k_dtype_name(w->dtype));
        return -1;
    }
    m->stats.repacked_tensors++;
    m->stats.repacked_bytes += (int64_t)bytes;
    return 0;
}

/* Repacks every matmul weight that gains from it, the LM head included;
 * the embedding table keeps the file's layout for its row lookups, even
 * when tied. The mapped file's pages of repacked weights are not touched
 * again. */
static int repack_all(struct model *m, char *err, size_t errlen)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (repack_one(m, &m->output, err, errlen))
        return -1;
    for (int64_t il = 0; il < m->cfg.n_layer; il++) {
        struct layer *L = &m->layers[il];
        struct k_matrix *all[] = {&L->wqkv, &L->wq, &L->wk, &L->wv, &L->wo,
                                  &L->wgate_up, &L->wgate, &L->wup, &L->wdown};
        for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
            if (repack_one(m, all[i], err, errlen))
                return -1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    m->stats.repack_seconds =
        (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    return 0;
}

/* ---------------------------------------------------------------- loading */

static int read_file(const char *path, char **out, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    if (fseek(f, 0, SEEK_END) != 0)
        goto io;
    long n = ftell(f);
    if (n < 0 || fseek(f, 0, SEEK_SET) != 0)
        goto io;
    if (n > 64L << 20) {
        snprintf(err, errlen, "%s: %ld bytes is too large for a config file", path, n);
        fclose(f);
        return -1;
    }
    buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n)
        goto io;
    fclose(f);
    buf[n] = 0;
    *out = buf;
    *len = (size_t)n;
    return 0;
io:
    snprintf(err, errlen, "%s: read error", path);
    free(buf);
    fclose(f);
    return -1;
}

/* dummy: 0 real weights, 1 random ones, 2 shapes only (model.h); on_gpu:
 * random matrices are made on the device (model_cuda.c), not here */
static int load_hf(struct model *m, const char *dir, int dummy, int on_gpu, uint64_t seed,
                   char *err, size_t errlen)
{
    char cpath[1200];
    struct stat sb;
    /* a dummy model may be named by its config file itself */
    if (dummy && stat(dir, &sb) == 0 && !S_ISDIR(sb.st_mode))
        snprintf(cpath, sizeof(cpath), "%s", dir);
    else
        snprintf(cpath, sizeof(cpath), "%s/config.json", dir);
    char *text = NULL;
    size_t len = 0;
    if (read_file(cpath, &text, &len, err, errlen))
        return -1;
    char jerr[256];
    struct json *cfg = json_parse(text, len, jerr, sizeof(jerr));
    free(text);
    if (!cfg) {
        snprintf(err, errlen, "%s: %s", cpath, jerr);
        return -1;
    }
    int rc = mc_from_hf(cfg, cpath, &m->cfg, err, errlen);
    json_free(cfg);
    if (rc)
        return -1;
    if (dummy)
        return dummy_open(&m->cfg, K_BF16, seed,
                          dummy != 1 ? DUMMY_FILL_NONE
                                     : on_gpu ? DUMMY_FILL_VECTORS : DUMMY_FILL_ALL,
                          &m->dummy, err, errlen);
    return st_open(dir, &m->st, err, errlen);
}

int model_load(const char *path, const struct model_opts *opts, struct model **out,
               char *err, size_t errlen)
{
    struct model *m = calloc(1, sizeof(*m));
    if (!m) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    snprintf(m->path, sizeof(m->path), "%s", path);
    err[0] = 0;
    struct stat sb;
    if (stat(path, &sb) != 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        goto fail;
    }
    if (opts && opts->load_format != MODEL_LOAD_AUTO) {
        if (load_hf(m, path, opts->load_format == MODEL_LOAD_DUMMY ? 1 : 2,
                    opts->device == MODEL_DEVICE_CUDA, opts->dummy_seed, err, errlen))
            goto fail;
    } else if (S_ISDIR(sb.st_mode)) {
        if (load_hf(m, path, 0, 0, 0, err, errlen))
            goto fail;
        m->stats.file_bytes = st_file_bytes(m->st);
    } else {
        if (gguf_open(path, &m->gguf, err, errlen))
            goto fail;
        if (mc_from_gguf(m->gguf, path, &m->cfg, err, errlen))
            goto fail;
        m->stats.file_bytes = gguf_file_bytes(m->gguf);
    }
    if (bind_all(m, err, errlen))
        goto fail;
    m->kv_stride = m->cfg.n_head_kv;
    m->tp = 1;
    int tp = opts && opts->tp > 1 ? opts->tp : 1;
    if (opts && opts->nnodes > 1 && tp < opts->nnodes) {
        snprintf(err, errlen, "--nnodes %d needs --tensor-parallel-size of at least %d (a "
                 "multiple of it): each node runs tp / nnodes ranks", opts->nnodes,
                 opts->nnodes);
        goto fail;
    }
    /* the rank models run the pool's threads between them */
    m->pool = k_pool_create(tp > 1 ? 1 : opts ? opts->n_threads : 0);
    if (!m->pool) {
        snprintf(err, errlen, "cannot start the CPU thread pool");
        goto fail;
    }
    if (opts && opts->device == MODEL_DEVICE_CUDA) {
#ifdef INFERD_CUDA
        /* the CPU layout is not used: no repacking */
        if (tp > 1 ? mtc_create(m, tp, opts, err, errlen)
                   : mcu_create(m, 0, opts->deterministic, opts->enforce_eager, &m->cuda, err,
                                errlen))
            goto fail;
        *out = m;
        return 0;
#else
        snprintf(err, errlen, "--device cuda: this inferd was built without CUDA "
                 "(meson setup -Dcuda=enabled with the CUDA toolkit installed)");
        goto fail;
#endif
    }
    if (tp > 1) {
        /* the ranks slice the file's rows; repacked layouts do not slice */
        if (model_tp_create(m, tp, opts->n_threads, opts, err, errlen))
            goto fail;
    } else if (!(opts && opts->no_repack) && repack_all(m, err, errlen)) {
        goto fail;
    }
    *out = m;
    return 0;
fail:
    model_destroy(m);
    return -1;
}

static void free_activations(struct model *m)
{
    free(m->x);
    free(m->h);
    free(m->qkv);
    free(m->att);
    free(m->gu);
    free(m->act);
    free(m->rope_cs);
    free(m->mm_scratch);
    free(m->att_scores);
    m->x = m->h = m->qkv = m->att = m->gu = m->act = m->rope_cs = m->att_scores = NULL;
    m->mm_scratch = NULL;
    m->cap_rows = 0;
}

void model_destroy(struct model *m)
{
    if (!m)
        return;
#ifdef INFERD_CUDA
    mtc_destroy(m); /* the GPU ranks first: they use the plan and the weights */
#endif
    model_tp_destroy(m);
    free_activations(m);
#ifdef INFERD_CUDA
    mcu_destroy(m->cuda);
#endif
    k_pool_destroy(m->pool);
    for (size_t i = 0; i < m->n_owned; i++)
        free(m->owned[i]);
    free(m->owned);
    free(m->layers);
    gguf_close(m->gguf);
    st_close(m->st);
    dummy_close(m->dummy);
    free(m->prev_tok);
    free(m->rows_tmp);
    free(m->tp_logits);
    free(m->tp_gather);
    free(m);
}

const struct model_config *model_get_config(const struct model *m) { return &m->cfg; }
struct k_pool *model_pool(struct model *m) { return m->pool; }
void model_get_stats(const struct model *m, struct model_stats *st) { *st = m->stats; }

struct kv_geom model_kv_geom(const struct model *m)
{
    /* with tensor parallelism every rank's heads have their place in a
     * token row (replicated KV heads once per rank that holds them) */
#ifdef INFERD_CUDA
    if (m->tpg)
        return mtc_kv_geom(m);
#endif
    struct kv_geom g = {m->cfg.n_layer, m->tp > 1 ? m->kv_stride : m->cfg.n_head_kv,
                        m->cfg.head_dim, m->cuda != NULL};
    return g;
}

int model_rope_long_for(const struct model *m, int64_t total_len)
{
    return m->cfg.scaling == ROPE_LONGROPE && total_len > m->cfg.rope_orig_ctx;
}

/* ------------------------------------------------------------ activations */

static size_t max_mm_scratch(const struct model *m, int64_t rows)
{
    size_t best = k_matmul_scratch(&m->output, rows);
    for (int64_t il = 0; il < m->cfg.n_layer; il++) {
        const struct layer *L = &m->layers[il];
        const struct k_matrix *all[] = {&L->wqkv, &L->wq, &L->wk, &L->wv, &L->wo,
                                        &L->wgate_up, &L->wgate, &L->wup, &L->wdown};
        for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
            if (!all[i]->data)
                continue;
            size_t s = k_matmul_scratch(all[i], rows);
            if (s > best)
                best = s;
        }
    }
    return best;
}

static int ensure_rows(struct model *m, int64_t rows)
{
    if (rows <= m->cap_rows)
        return 0;
    free_activations(m);
    const struct model_config *c = &m->cfg;
    size_t r = (size_t)rows;
    size_t nqkv = (size_t)((c->n_head + 2 * c->n_head_kv) * c->head_dim);
    m->x = xmalloc_aligned(r * (size_t)c->n_embd * sizeof(float));
    m->h = xmalloc_aligned(r * (size_t)c->n_embd * sizeof(float));
    m->qkv = xmalloc_aligned(r * nqkv * sizeof(float));
    m->att = xmalloc_aligned(r * (size_t)(c->n_head * c->head_dim) * sizeof(float));
    m->gu = xmalloc_aligned(r * 2 * (size_t)c->n_ff * sizeof(float));
    m->act = xmalloc_aligned(r * (size_t)c->n_ff * sizeof(float));
    m->rope_cs = xmalloc_aligned(r * (size_t)c->rope_dim * sizeof(float));
    m->mm_scratch_bytes = max_mm_scratch(m, rows);
    m->mm_scratch = xmalloc_aligned(m->mm_scratch_bytes);
    m->att_scores = xmalloc_aligned((size_t)k_pool_size(m->pool) * (size_t)(c->n_head / c->n_head_kv) *
                                    (size_t)c->n_ctx * sizeof(float));
    if (!m->x || !m->h || !m->qkv || !m->att || !m->gu || !m->act || !m->rope_cs ||
        !m->mm_scratch || !m->att_scores) {
        free_activations(m);
        return -1;
    }
    m->cap_rows = rows;
    return 0;
}

/* ---------------------------------------------------------- forward pass */

/* RMSNorm over each row, as Hugging Face computes it: x / sqrt(mean(x^2) +
 * eps) * w, in the kernels' canonical order (batch invariant). */
static void rmsnorm_rows(float *out, const float *x, const float *w, int64_t rows,
                         int64_t n, double eps)
{
    for (int64_t r = 0; r < rows; r++)
        k_rmsnorm(out + r * n, x + r * n, w, n, (float)eps);
}

static void rope_apply(float *v, const float *cs, int64_t pairs, int interleaved)
{
    for (int64_t i = 0; i < pairs; i++) {
        int64_t a = interleaved ? 2 * i : i;
        int64_t b = interleaved ? 2 * i + 1 : i + pairs;
        float c = cs[2 * i], s = cs[2 * i + 1];
        float x1 = v[a], x2 = v[b];
        v[a] = x1 * c - x2 * s;
        v[b] = x2 * c + x1 * s;
    }
}

struct attn_job {
    struct model *m;
    struct kv_cache *kv;
    const struct model_row *rows;
    int64_t n_rows;
    int64_t layer;
};

/* Task units of sub query heads of one row that share a KV head (GQA),
 * spread over the pool in a fixed split. With sub > 1 each block of keys
 * and values is read once for all sub heads while it is in L1, instead of
 * once per head; every head's arithmetic (the calls and their order) is
 * the same for any sub, so the choice, made from the batch size, never
 * changes a bit. */
static void attn_worker(void *ctx, int ith, int nth)
{
    struct attn_job *j = ctx;
    struct model *m = j->m;
    const struct model_config *c = &m->cfg;
    int64_t hd = c->head_dim, nh = c->n_head, nkv = c->n_head_kv;
    int64_t group = nh / nkv;
    int64_t nqkv = (nh + 2 * nkv) * hd;
    /* KV heads per token row of the cache, and where this model's start
     * (a tensor-parallel rank holds some of them) */
    int64_t kvs = m->kv_stride;
    /* Whole groups when there are enough of them to keep every thread
     * busy (prefill, large batches); single heads otherwise (decode). */
    int64_t sub = j->n_rows * nkv >= 2 * (int64_t)nth ? group : 1;
    int64_t per_row = nh / sub;
    int64_t units = j->n_rows * per_row;
    int64_t per = (units + nth - 1) / nth;
    int64_t u0 = per * ith, u1 = u0 + per < units ? u0 + per : units;
    float *scores = m->att_scores + (size_t)ith * (size_t)group * (size_t)c->n_ctx;
    float scale = (float)(1.0 / sqrt((double)hd));

    for (int64_t u = u0; u < u1; u++) {
        int64_t r = u / per_row, h0 = (u % per_row) * sub, kvh = h0 / group;
        const struct model_row *row = &j->rows[r];
        int64_t nb;
        const int32_t *table = kv_seq_blocks(j->kv, row->seq, &nb);
        int64_t start = 0;
        if (c->sliding_window > 0 && row->pos + 1 > c->sliding_window)
            start = row->pos + 1 - c->sliding_window;
        /* one kernel call per KV block and head: a block's tokens of head
         * kvh are nkv * hd floats apart */
        int64_t n_att = row->pos + 1 - start;
        for (int64_t p = start; p <= row->pos;) {
            int64_t in = p % KV_BLOCK_TOKENS, cnt = KV_BLOCK_TOKENS - in;
            if (cnt > row->pos + 1 - p)
                cnt = row->pos + 1 - p;
            const float *k = kv_block_k(j->kv, j->layer, table[p / KV_BLOCK_TOKENS]) +
                             (in * kvs + m->kv_head0 + kvh) * hd;
            for (int64_t h = 0; h < sub; h++)
                k_dot_rows_f32(m->qkv + r * nqkv + (h0 + h) * hd, k, kvs * hd, cnt, hd,
                               scores + (size_t)h * (size_t)c->n_ctx + (p - start));
            p += cnt;
        }
        for (int64_t h = 0; h < sub; h++) {
            float *sc = scores + (size_t)h * (size_t)c->n_ctx;
            for (int64_t i = 0; i < n_att; i++)
                sc[i] *= scale;
            k_softmax_f32(sc, n_att);
            memset(m->att + r * nh * hd + (h0 + h) * hd, 0, (size_t)hd * sizeof(float));
        }
        for (int64_t p = start; p <= row->pos;) {
            int64_t in = p % KV_BLOCK_TOKENS, cnt = KV_BLOCK_TOKENS - in;
            if (cnt > row->pos + 1 - p)
                cnt = row->pos + 1 - p;
            const float *v = kv_block_v(j->kv, j->layer, table[p / KV_BLOCK_TOKENS]) +
                             (in * kvs + m->kv_head0 + kvh) * hd;
            for (int64_t h = 0; h < sub; h++)
                k_axpy_rows_f32(m->att + r * nh * hd + (h0 + h) * hd,
                                scores + (size_t)h * (size_t)c->n_ctx + (p - start), v,
                                kvs * hd, cnt, hd);
            p += cnt;
        }
    }
}

static void add_rows(float *x, const float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] += y[i];
}

/* ------------------------------------------------- row-parallel stages */

/* The elementwise stages between the matmuls, each over a range of rows.
 * Rows are independent, so a split over threads changes nothing in the
 * result; small batches run inline to skip the dispatch. */
struct rows_job {
    struct model *m;
    struct kv_cache *kv;
    const struct model_row *rows;
    int64_t n;
    int64_t layer;
    void (*fn)(struct rows_job *j, int64_t r0, int64_t r1);
};

static void rows_worker(void *ctx, int ith, int nth)
{
    struct rows_job *j = ctx;
    int64_t per = (j->n + nth - 1) / nth;
    int64_t r0 = per * ith, r1 = r0 + per < j->n ? r0 + per : j->n;
    if (r0 < r1)
        j->fn(j, r0, r1);
}

static void run_rows(struct rows_job *j, void (*fn)(struct rows_job *, int64_t, int64_t))
{
    j->fn = fn;
    if (j->n < 4)
        fn(j, 0, j->n);
    else
        k_pool_run(j->m->pool, rows_worker, j);
}

/* Token embeddings and each row's RoPE cos/sin (shared by all layers). */
static void st_embed(struct rows_job *j, int64_t r0, int64_t r1)
{
    struct model *m = j->m;
    const struct model_config *c = &m->cfg;
    int64_t pairs = c->rope_dim / 2;
    for (int64_t r = r0; r < r1; r++) {
        /* a tensor-parallel rank holds rows [vocab0, vocab0 + rows) of the
         * table: zeros for the others, summed across ranks after */
        int64_t t = (int64_t)j->rows[r].token - m->vocab0;
        if (t >= 0 && t < m->tok_embd.rows)
            k_dequant_row(&m->tok_embd, t, m->x + r * c->n_embd);
        else
            memset(m->x + r * c->n_embd, 0, (size_t)c->n_embd * sizeof(float));
        const float *inv = kv_seq_rope_long(j->kv, j->rows[r].seq) ? c->inv_freq_long : c->inv_freq_short;
        float *cs = m->rope_cs + r * 2 * pairs;
        for (int64_t i = 0; i < pairs; i++) {
            float theta = (float)j->rows[r].pos * inv[i];
            cs[2 * i] = cosf(theta) * c->rope_mscale;
            cs[2 * i + 1] = sinf(theta) * c->rope_mscale;
        }
    }
}

/* h = attn_norm(x). */
static void st_attn_norm(struct rows_job *j, int64_t r0, int64_t r1)
{
    struct model *m = j->m;
    int64_t E = m->cfg.n_embd;
    rmsnorm_rows(m->h + r0 * E, m->x + r0 * E, m->layers[j->layer].attn_norm, r1 - r0, E,
                 m->cfg.rms_eps);
}

/* q, k, v: bias, RoPE, then this row's keys and values into its KV block
 * (all rows are stored before any row attends). */
static void st_qkv_post(struct rows_job *j, int64_t r0, int64_t r1)
{
    struct model *m = j->m;
    const struct model_config *c = &m->cfg;
    const struct layer *L = &m->layers[j->layer];
    int64_t hd = c->head_dim, nh = c->n_head, nkv = c->n_head_kv;
    int64_t nq = nh * hd, nqkv = nq + 2 * nkv * hd, pairs = c->rope_dim / 2;
    for (int64_t r = r0; r < r1; r++) {
        float *q = m->qkv + r * nqkv, *k = q + nq, *v = k + nkv * hd;
        if (c->qkv_bias) {
            add_rows(q, L->bq, nq);
            add_rows(k, L->bk, nkv * hd);
            add_rows(v, L->bv, nkv * hd);
        }
        const float *cs = m->rope_cs + r * 2 * pairs;
        for (int64_t h = 0; h < nh; h++)
            rope_apply(q + h * hd, cs, pairs, c->rope_interleaved);
        for (int64_t h = 0; h < nkv; h++)
            rope_apply(k + h * hd, cs, pairs, c->rope_interleaved);
        int64_t nb;
        const int32_t *table = kv_seq_blocks(j->kv, j->rows[r].seq, &nb);
        int64_t p = j->rows[r].pos;
        int32_t b = table[p / KV_BLOCK_TOKENS];
        size_t off = (size_t)(((p % KV_BLOCK_TOKENS) * m->kv_stride + m->kv_head0) * hd);
        memcpy(kv_block_k(j->kv, j->layer, b) + off, k, (size_t)(nkv * hd) * sizeof(float));
        memcpy(kv_block_v(j->kv, j->layer, b) + off, v, (size_t)(nkv * hd) * sizeof(float));
    }
}

/* x += h (attention output); h = ffn_norm(x). */
static void st_attn_residual_ffn_norm(struct rows_job *j, int64_t r0, int64_t r1)
{
    struct model *m = j->m;
    int64_t E = m->cfg.n_embd;
    add_rows(m->x + r0 * E, m->h + r0 * E, (r1 - r0) * E);
    rmsnorm_rows(m->h + r0 * E, m->x + r0 * E, m->layers[j->layer].ffn_norm, r1 - r0, E,
                 m->cfg.rms_eps);
}

/* act = silu(gate) * up. */
static void st_silu_mul(struct rows_job *j, int64_t r0, int64_t r1)
{
    struct model *m = j->m;
    int64_t ff = m->cfg.n_ff;
    for (int64_t r = r0; r < r1; r++)
        k_silu_mul(m->act + r * ff, m->gu + r * 2 * ff, m->gu + r * 2 * ff + ff, ff);
}

/* x += h (MLP output). */
static void st_mlp_residual(struct rows_job *j, int64_t r0, int64_t r1)
{
    struct model *m = j->m;
    int64_t E = m->cfg.n_embd;
    add_rows(m->x + r0 * E, m->h + r0 * E, (r1 - r0) * E);
}

/* Validates a batch before anything is written. next: (kv_max_seqs)
 * scratch for each sequence's next expected position. */
int model_check_batch(struct model *m, struct kv_cache *kv, const struct model_row *rows,
                      int64_t n, int64_t n_prev, int64_t *next, char *err, size_t errlen)
{
    /* a tensor-parallel rank's config holds its slice of the vocabulary */
    int64_t n_vocab = m->vocab_all ? m->vocab_all : m->cfg.n_vocab;
    for (int64_t r = 0; r < n; r++) {
        int s = rows[r].seq;
        if (kv_seq_valid(kv, s))
            next[s] = kv_seq_len(kv, s);
    }
    for (int64_t r = 0; r < n; r++) {
        const struct model_row *row = &rows[r];
        if (!kv_seq_valid(kv, row->seq)) {
            snprintf(err, errlen, "row %lld: sequence %d is not open", (long long)r, row->seq);
            return -1;
        }
        if (row->token < 0 && -1 - (int64_t)row->token < n_prev)
            ; /* MODEL_TOKEN_PREV(k): the last launch's k-th sample */
        else if (row->token < 0 || row->token >= n_vocab) {
            snprintf(err, errlen, "row %lld: token id %d is outside the vocabulary (0..%lld)",
                     (long long)r, row->token, (long long)n_vocab - 1);
            return -1;
        }
        if (row->pos < 0 || row->pos >= m->cfg.n_ctx) {
            snprintf(err, errlen, "row %lld: position %lld is outside the context (0..%lld)",
                     (long long)r, (long long)row->pos, (long long)m->cfg.n_ctx - 1);
            return -1;
        }
        if (row->pos != next[row->seq]) {
            snprintf(err, errlen, "row %lld: sequence %d continues at position %lld, not %lld",
                     (long long)r, row->seq, (long long)next[row->seq], (long long)row->pos);
            return -1;
        }
        if (row->pos >= kv_seq_capacity(kv, row->seq)) {
            snprintf(err, errlen, "row %lld: position %lld of sequence %d has no KV block reserved",
                     (long long)r, (long long)row->pos, row->seq);
            return -1;
        }
        next[row->seq]++;
    }
    return 0;
}

/* Sums x (n floats) over the ranks of a tensor-parallel rank model; a
 * plain model has nothing to sum. */
static int tp_sum(struct model *m, float *x, int64_t n, char *err, size_t errlen)
{
    if (!m->comm || comm_allreduce_f32(m->comm, x, n) == 0)
        return 0;
    snprintf(err, errlen, "tensor parallel rank %d: %s", comm_rank(m->comm),
             comm_error(m->comm));
    return -1;
}

int model_forward_body(struct model *m, struct kv_cache *kv, const struct model_row *rows,
                       int64_t n, float *logits, char *err, size_t errlen)
{
    const struct model_config *c = &m->cfg;
    if (ensure_rows(m, n)) {
        snprintf(err, errlen, "out of memory for a batch of %lld rows", (long long)n);
        return -1;
    }
    int64_t E = c->n_embd, hd = c->head_dim, nh = c->n_head, nkv = c->n_head_kv;
    int64_t nq = nh * hd, nqkv = nq + 2 * nkv * hd, ff = c->n_ff;
    void *sc = m->mm_scratch;
    struct rows_job rj = {m, kv, rows, n, 0, NULL};
    run_rows(&rj, st_embed);
    if (tp_sum(m, m->x, n * E, err, errlen))
        return -1;

    for (int64_t il = 0; il < c->n_layer; il++) {
        const struct layer *L = &m->layers[il];
        rj.layer = il;
        run_rows(&rj, st_attn_norm);
        if (c->fused_qkv) {
            k_matmul(m->pool, &L->wqkv, m->h, E, n, m->qkv, nqkv, sc);
        } else {
            k_matmul(m->pool, &L->wq, m->h, E, n, m->qkv, nqkv, sc);
            k_matmul(m->pool, &L->wk, m->h, E, n, m->qkv + nq, nqkv, sc);
            k_matmul(m->pool, &L->wv, m->h, E, n, m->qkv + nq + nkv * hd, nqkv, sc);
        }
        run_rows(&rj, st_qkv_post);
        struct attn_job job = {m, kv, rows, n, il};
        k_pool_run(m->pool, attn_worker, &job);
        k_matmul(m->pool, &L->wo, m->att, nq, n, m->h, E, sc);
        if (tp_sum(m, m->h, n * E, err, errlen)) /* row-parallel: partial sums */
            return -1;
        run_rows(&rj, st_attn_residual_ffn_norm);
        if (c->fused_gate_up) {
            k_matmul(m->pool, &L->wgate_up, m->h, E, n, m->gu, 2 * ff, sc);
        } else {
            k_matmul(m->pool, &L->wgate, m->h, E, n, m->gu, 2 * ff, sc);
            k_matmul(m->pool, &L->wup, m->h, E, n, m->gu + ff, 2 * ff, sc);
        }
        run_rows(&rj, st_silu_mul);
        k_matmul(m->pool, &L->wdown, m->act, ff, n, m->h, E, sc);
        if (tp_sum(m, m->h, n * E, err, errlen))
            return -1;
        run_rows(&rj, st_mlp_residual);
    }

    /* Only the rows asked for go through the (large) LM head. */
    int64_t nw = 0;
    for (int64_t r = 0; r < n; r++) {
        if (!rows[r].want_logits)
            continue;
        rmsnorm_rows(m->h + nw * E, m->x + r * E, m->out_norm, 1, E, c->rms_eps);
        nw++;
    }
    if (nw && m->comm)
        return model_tp_logits(m, nw, logits, err, errlen);
    if (nw)
        k_matmul(m->pool, &m->output, m->h, E, nw, logits, c->n_vocab, sc);
    return 0;
}

int model_forward(struct model *m, struct kv_cache *kv, const struct model_row *rows,
                  int64_t n, float *logits, char *err, size_t errlen)
{
    if (n <= 0)
        return 0;
#ifdef INFERD_CUDA
    if (m->cuda || m->tpg)
        return model_forward_sample(m, kv, rows, n, logits, NULL, 0, err, errlen);
#endif
    int64_t *next = malloc((size_t)kv_max_seqs(kv) * sizeof(int64_t));
    if (!next) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (model_check_batch(m, kv, rows, n, 0, next, err, errlen)) {
        free(next);
        return -1;
    }
    int rc = m->tp > 1 ? model_tp_forward(m, kv, rows, n, logits, err, errlen)
                       : model_forward_body(m, kv, rows, n, logits, err, errlen);
    if (rc == 0)
        for (int64_t r = 0; r < n; r++)
            kv_seq_set_len(kv, rows[r].seq, next[rows[r].seq]);
    free(next);
    return rc;
}

int model_launch(struct model *m, struct kv_cache *kv, const struct model_row *rows, int64_t n,
                 float *logits, struct model_sample *samples, int64_t n_samples, char *err,
                 size_t errlen)
{
    if (m->uncollected >= 2) {
        snprintf(err, errlen, "two steps are already launched and not collected");
        return -1;
    }
#ifdef INFERD_CUDA
    if (m->cuda || m->tpg) {
        if (m->tpg ? mtc_launch(m, kv, rows, n, logits, samples, n_samples, err, errlen)
                   : mcu_launch(m, kv, rows, n, logits, samples, n_samples, 1, err, errlen))
            return -1;
        m->uncollected++;
        return 0;
    }
#endif
    /* The CPU runs the step now; placeholders take the last launch's
     * tokens, which it already has. */
    const struct model_row *run = rows;
    for (int64_t r = 0; r < n; r++) {
        if (rows[r].token >= 0)
            continue;
        if (run == rows) {
            if (n > m->cap_rows_tmp) {
                struct model_row *t = realloc(m->rows_tmp, (size_t)n * sizeof(*t));
                if (!t) {
                    snprintf(err, errlen, "out of memory");
                    return -1;
                }
                m->rows_tmp = t;
                m->cap_rows_tmp = n;
            }
            memcpy(m->rows_tmp, rows, (size_t)n * sizeof(*rows));
            run = m->rows_tmp;
        }
        int64_t k = -1 - (int64_t)rows[r].token;
        if (k >= m->n_prev) {
            snprintf(err, errlen, "row %lld: token placeholder %lld names no sample of the last "
                     "step (%lld)", (long long)r, (long long)k, (long long)m->n_prev);
            return -1;
        }
        m->rows_tmp[r].token = m->prev_tok[k];
    }
    if (model_forward(m, kv, run, n, logits, err, errlen))
        return -1;
    size_t V = (size_t)m->cfg.n_vocab;
    if (n_samples > m->cap_prev) {
        int32_t *t = realloc(m->prev_tok, (size_t)n_samples * sizeof(*t));
        if (!t) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        m->prev_tok = t;
        m->cap_prev = n_samples;
    }
    for (int64_t i = 0; i < n_samples; i++) {
        samp_sample(samples[i].s, logits + (size_t)samples[i].row * V, &samples[i].res);
        m->prev_tok[i] = samples[i].res.token;
    }
    m->n_prev = n_samples;
    m->uncollected++;
    return 0;
}

int model_collect(struct model *m, char *err, size_t errlen)
{
    if (m->uncollected <= 0) {
        snprintf(err, errlen, "no step launched to collect");
        return -1;
    }
    m->uncollected--;
#ifdef INFERD_CUDA
    if (m->tpg)
        return mtc_collect(m, err, errlen);
    if (m->cuda)
        return mcu_collect(m, err, errlen);
#endif
    return 0;
}

int model_async(const struct model *m)
{
    return model_on_device(m);
}

int model_forward_sample(struct model *m, struct kv_cache *kv, const struct model_row *rows,
                         int64_t n, float *logits, struct model_sample *samples,
                         int64_t n_samples, char *err, size_t errlen)
{
    if (m->uncollected > 0) {
        snprintf(err, errlen, "a launched step is not collected");
        return -1;
    }
    if (model_launch(m, kv, rows, n, logits, samples, n_samples, err, errlen))
        return -1;
    return model_collect(m, err, errlen);
}

int model_on_device(const struct model *m)
{
    return m->cuda != NULL || m->tpg != NULL;
}

int model_device_ceilings(struct model *m, double *bytes_per_s, double *flops, char *desc,
                          size_t desc_len)
{
#ifdef INFERD_CUDA
    if (m->tpg)
        return mtc_ceilings(m, bytes_per_s, flops, desc, desc_len);
    if (m->cuda)
        return mcu_ceilings(0, bytes_per_s, flops, desc, desc_len);
#endif
    (void)m, (void)desc, (void)desc_len;
    *bytes_per_s = *flops = 0;
    return -1;
}

int model_device_memory(const struct model *m, int64_t *free_bytes, int64_t *total_bytes)
{
#ifdef INFERD_CUDA
    if (m->tpg)
        return mtc_memory(m, free_bytes, total_bytes);
    if (m->cuda)
        return mcu_memory(free_bytes, total_bytes);
#endif
    (void)m;
    *free_bytes = *total_bytes = 0;
    return -1;
}

int64_t model_step_bytes(const struct model *m, int64_t max_rows, int max_seqs)
{
#ifdef INFERD_CUDA
    if (m->tpg)
        return mtc_step_bytes(m, max_rows, max_seqs);
    if (m->cuda)
        return mcu_step_bytes(m, max_rows, max_seqs);
#endif
    (void)m, (void)max_rows, (void)max_seqs;
    return 0;
}

int model_prepare(struct model *m, struct kv_cache *kv, int64_t max_rows, int max_seqs,
                  int64_t max_len, char *err, size_t errlen)
{
#ifdef INFERD_CUDA
    if (m->tpg)
        return mtc_prepare(m, kv, max_rows, max_seqs, max_len, err, errlen);
    if (m->cuda)
        return mcu_prepare(m, kv, max_rows, max_seqs, max_len, err, errlen);
#endif
    (void)m, (void)kv, (void)max_rows, (void)max_seqs, (void)max_len, (void)err, (void)errlen;
    return 0;
}
