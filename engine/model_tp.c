/* model_tp.c: tensor parallelism on the CPU: a loaded model split into tp
 * rank models, Megatron-style, as tp_plan.h lays it out, each run by its
 * own thread and summing its partial results with the others through a
 * communicator (comm.h). Rank 0 runs on the caller's (engine) thread.
 *
 * A rank model is a struct model whose config has the rank's head, MLP
 * and vocabulary counts and whose matrices are the rank's share of the
 * loaded model's:
 *   - column-parallel q, k, v, gate and up: the rank's output rows, views
 *     into the mapped file (no copy; a fused qkv_proj or gate_up_proj
 *     gives each part its own view);
 *   - row-parallel o_proj and down_proj: the rank's input columns, copied
 *     row by row into the rank's memory (whole quant blocks: tp_plan
 *     refuses splits that would cut one);
 *   - vocab-parallel embedding and LM head: the rank's rows of the
 *     vocabulary (views); norms and biases shared or offset, never copied.
 * Each rank's KV heads have their own place in the cache's token rows
 * (kv_stride heads per row, the rank's from kv_head0), replicated heads
 * included, so no two ranks write one value.
 *
 * The sums run in rank order, the same bits on every rank, so the ranks
 * stay identical; they differ from one rank's sums in rounding only (TP=2
 * gives TP=1's greedy tokens on the parity fixtures, logits within fp32
 * tolerance). Repacked layouts do not slice, so the ranks keep the file's.
 * Engine thread (the caller) and the rank threads, which touch only their
 * rank model. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/comm.h"
#include "engine/model_internal.h"
#include "engine/tp_plan.h"

struct tp_shards {
    struct tp_plan plan;
};

/* The rank threads: each waits for a step (gen), runs it on its rank
 * model and reports. */
struct tp_runner {
    struct model *m;
    int n;
    pthread_t *th;
    int *started;
    pthread_mutex_t mu;
    pthread_cond_t cv, done_cv;
    uint64_t gen;
    int stop, done;
    /* the step */
    struct kv_cache *kv;
    const struct model_row *rows;
    int64_t n_rows;
    int rc[TP_MAX];
    char err[TP_MAX][160];
};


static void *aligned(size_t n)
{
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0)
        return NULL;
    return p;
}

static int keep(struct model *rm, void *p)
{
    if (rm->n_owned == rm->cap_owned) {
        size_t cap = rm->cap_owned ? 2 * rm->cap_owned : 16;
        void **n = realloc(rm->owned, cap * sizeof(*n));
        if (!n)
            return -1;
        rm->owned = n;
        rm->cap_owned = cap;
    }
    rm->owned[rm->n_owned++] = p;
    return 0;
}

/* Rows [r0, r0 + n) of w, in place. */
static struct k_matrix rows_of(const struct k_matrix *w, int64_t r0, int64_t n)
{
    struct k_matrix v = *w;
    v.rows = n;
    v.data = (const char *)w->data + (size_t)r0 * (size_t)k_row_bytes(w->dtype, w->cols);
    return v;
}

/* Columns [c0, c0 + n) of every row of w, copied into rm's memory. */
static int cols_of(struct model *rm, const struct k_matrix *w, int64_t c0, int64_t n,
                   struct k_matrix *out, char *err, size_t errlen)
{
    int64_t blk = k_dtype_block(w->dtype);
    if (c0 % blk != 0 || n % blk != 0) {
        snprintf(err, errlen, "columns %lld..%lld of a %s matrix cut its %lld-value blocks",
                 (long long)c0, (long long)(c0 + n), k_dtype_name(w->dtype), (long long)blk);
        return -1;
    }
    size_t row = (size_t)k_row_bytes(w->dtype, w->cols);
    size_t off = (size_t)k_row_bytes(w->dtype, c0), len = (size_t)k_row_bytes(w->dtype, n);
    char *dst = aligned(len * (size_t)w->rows);
    if (!dst || keep(rm, dst) != 0) {
        free(dst);
        snprintf(err, errlen, "out of memory for a tensor-parallel shard");
        return -1;
    }
    const char *src = w->data;
    for (int64_t r = 0; r < w->rows; r++)
        memcpy(dst + (size_t)r * len, src + (size_t)r * row + off, len);
    *out = *w;
    out->cols = n;
    out->data = dst;
    return 0;
}

/* The matrix a role's rows come from: the part of a fused tensor (q, k or
 * v of qkv_proj; gate or up of gate_up_proj) or the tensor itself. */
static struct k_matrix part_of(const struct k_matrix *fused, int64_t row0, int64_t rows,
                               const struct k_matrix *single, int is_fused)
{
    return is_fused ? rows_of(fused, row0, rows) : *single;
}

const struct tp_plan *model_tp_plan(const struct model *m)
{
    return m->shards ? &m->shards->plan : &m->tp_shared->plan;
}

int model_tp_make_rank(struct model *m, int r, int threads, struct comm *comm, int gpu,
                       struct model **out, char *err, size_t errlen)
{
    const struct tp_plan *plan = &m->shards->plan;
    const struct model_config *c = &m->cfg;
    const struct tp_rank_plan *p = &plan->rank[r];
    int64_t hd = c->head_dim, nq = c->n_head * hd, nkv = c->n_head_kv * hd;
    struct model *rm = calloc(1, sizeof(*rm));
    if (!rm) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    rm->cfg = *c;
    rm->cfg.n_head = p->n_q_heads;
    rm->cfg.n_head_kv = p->n_kv_heads;
    rm->cfg.n_ff = p->n_ff;
    rm->cfg.n_vocab = p->vocab1 - p->vocab0;
    rm->cfg.fused_qkv = 0;
    rm->cfg.fused_gate_up = 0;
    /* messages name the rank; a long path is cut rather than the rank */
    snprintf(rm->path, sizeof(rm->path), "rank %d of %d: %.900s", r, plan->tp, m->path);
    rm->tp = 1;
    rm->comm = comm;
    rm->tp_shared = m->shards;
    rm->vocab0 = p->vocab0;
    rm->vocab_all = c->n_vocab;
    rm->tp_rank = r;
    rm->dummy_view = m->dummy;
    /* this process's ranks' KV heads side by side in a token row: rank r's
     * at (r - first local rank) * n_kv_heads (a replicated head is stored
     * by each rank holding it) */
    rm->kv_stride = m->kv_stride;
    rm->kv_head0 = (int64_t)(r - m->tp_rank0) * p->n_kv_heads;
    rm->out_norm = m->out_norm;
    rm->tok_embd = rows_of(&m->tok_embd, p->vocab0, p->vocab1 - p->vocab0);
    rm->output = rows_of(&m->output, p->vocab0, p->vocab1 - p->vocab0);
    rm->layers = calloc((size_t)c->n_layer, sizeof(*rm->layers));
    rm->pool = k_pool_create(threads);
    if (!rm->layers || !rm->pool) {
        snprintf(err, errlen, "out of memory, or no thread pool, for rank %d", r);
        goto fail;
    }
    int64_t q0 = p->q_head0 * hd, qn = p->n_q_heads * hd;
    int64_t k0 = p->kv_head0 * hd, kn = p->n_kv_heads * hd;
    for (int64_t il = 0; il < c->n_layer; il++) {
        const struct layer *L = &m->layers[il];
        struct layer *R = &rm->layers[il];
        R->attn_norm = L->attn_norm;
        R->ffn_norm = L->ffn_norm;
        struct k_matrix wq = part_of(&L->wqkv, 0, nq, &L->wq, c->fused_qkv);
        struct k_matrix wk = part_of(&L->wqkv, nq, nkv, &L->wk, c->fused_qkv);
        struct k_matrix wv = part_of(&L->wqkv, nq + nkv, nkv, &L->wv, c->fused_qkv);
        R->wq = rows_of(&wq, q0, qn);
        R->wk = rows_of(&wk, k0, kn);
        R->wv = rows_of(&wv, k0, kn);
        if (c->qkv_bias) {
            R->bq = L->bq + q0;
            R->bk = L->bk + k0;
            R->bv = L->bv + k0;
        }
        struct k_matrix wg = part_of(&L->wgate_up, 0, c->n_ff, &L->wgate, c->fused_gate_up);
        struct k_matrix wu = part_of(&L->wgate_up, c->n_ff, c->n_ff, &L->wup, c->fused_gate_up);
        R->wgate = rows_of(&wg, p->ff0, p->n_ff);
        R->wup = rows_of(&wu, p->ff0, p->n_ff);
        if (gpu) { /* sliced on the way to the device */
            R->wo = L->wo;
            R->wo_c0 = q0;
            R->wdown = L->wdown;
            R->wdown_c0 = p->ff0;
        } else if (cols_of(rm, &L->wo, q0, qn, &R->wo, err, errlen) ||
                   cols_of(rm, &L->wdown, p->ff0, p->n_ff, &R->wdown, err, errlen)) {
            goto fail;
        }
    }
    *out = rm;
    return 0;
fail:
    model_destroy(rm);
    return -1;
}

/* The dtype of each role, for the plan's rules (the quant blocks of the
 * row-parallel splits) and sizes. */
static void dtypes_of(const struct model *m, struct tp_dtypes *d)
{
    const struct layer *L = &m->layers[0];
    const struct model_config *c = &m->cfg;
    tp_dtypes_uniform(d, L->wo.dtype, K_F32);
    d->q = c->fused_qkv ? L->wqkv.dtype : L->wq.dtype;
    d->k = c->fused_qkv ? L->wqkv.dtype : L->wk.dtype;
    d->v = c->fused_qkv ? L->wqkv.dtype : L->wv.dtype;
    d->gate = c->fused_gate_up ? L->wgate_up.dtype : L->wgate.dtype;
    d->up = c->fused_gate_up ? L->wgate_up.dtype : L->wup.dtype;
    d->down = L->wdown.dtype;
    d->embd = m->tok_embd.dtype;
    d->lm_head = m->output.dtype;
    d->kv = K_F32;
    d->act = K_F32;
    /* the strictest block rule over every layer (GGUF mixes dtypes) */
    for (int64_t il = 1; il < c->n_layer; il++) {
        if (k_dtype_block(m->layers[il].wo.dtype) > k_dtype_block(d->o))
            d->o = m->layers[il].wo.dtype;
        if (k_dtype_block(m->layers[il].wdown.dtype) > k_dtype_block(d->down))
            d->down = m->layers[il].wdown.dtype;
    }
}

static void *rank_main(void *arg)
{
    struct tp_thread_arg *a = arg;
    struct tp_runner *run = a->ctx;
    int r = a->r;
    free(a);
    uint64_t seen = 0;
    pthread_mutex_lock(&run->mu);
    for (;;) {
        while (!run->stop && run->gen == seen)
            pthread_cond_wait(&run->cv, &run->mu);
        if (run->stop)
            break;
        seen = run->gen;
        struct kv_cache *kv = run->kv;
        const struct model_row *rows = run->rows;
        int64_t n = run->n_rows;
        pthread_mutex_unlock(&run->mu);
        char err[160] = "";
        int rc = model_forward_body(run->m->rank[r], kv, rows, n, NULL, err, sizeof(err));
        if (rc != 0) /* the others must not wait in a collective for this one */
            comm_abort(run->m->rank[r]->comm, err);
        pthread_mutex_lock(&run->mu);
        run->rc[r] = rc;
        snprintf(run->err[r], sizeof(run->err[r]), "%s", err);
        run->done++;
        pthread_cond_signal(&run->done_cv);
    }
    pthread_mutex_unlock(&run->mu);
    return NULL;
}

int model_tp_nodes(int tp, const struct model_opts *o, int *nnodes, int *node, char *err,
                   size_t errlen)
{
    *nnodes = o->nnodes > 1 ? o->nnodes : 1;
    *node = *nnodes > 1 ? o->node_rank : 0;
    if (*nnodes > 1 && (tp % *nnodes != 0 || *node < 0 || *node >= *nnodes ||
                        o->master_port <= 0 || o->master_port > 65534)) {
        snprintf(err, errlen, "multi-node: --tensor-parallel-size %d over --nnodes %d as "
                 "--node-rank %d with --master-port %d: the ranks must split evenly, the node "
                 "rank be below nnodes and the port in 1..65534 (the control plane uses it + 1)",
                 tp, *nnodes, *node, o->master_port);
        return -1;
    }
    if (tp > TP_MAX) {
        snprintf(err, errlen, "--tensor-parallel-size %d: at most %d", tp, TP_MAX);
        return -1;
    }
    return 0;
}

int model_tp_threads(int first, int n, void *(*fn)(void *), void *ctx, pthread_t *th,
                     int *started, char *err, size_t errlen)
{
    for (int r = first; r < n; r++) {
        struct tp_thread_arg *a = malloc(sizeof(*a));
        if (!a) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        a->ctx = ctx;
        a->r = r;
        if (pthread_create(&th[r], NULL, fn, a) != 0) {
            free(a);
            snprintf(err, errlen, "cannot start the thread of tensor-parallel rank %d", r);
            return -1;
        }
        started[r] = 1;
    }
    return 0;
}

int model_tp_plan_make(struct model *m, int tp, char *err, size_t errlen)
{
    struct tp_dtypes dt;
    dtypes_of(m, &dt);
    m->shards = calloc(1, sizeof(*m->shards));
    if (!m->shards) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    char why[256];
    if (tp_plan_make(&m->cfg, &dt, tp, &m->shards->plan, why, sizeof(why))) {
        snprintf(err, errlen, "%s: --tensor-parallel-size %d: %s", m->path, tp, why);
        return -1;
    }
    return 0;
}

int model_tp_create(struct model *m, int tp, int n_threads, const struct model_opts *o,
                    char *err, size_t errlen)
{
    int nnodes, node;
    if (model_tp_nodes(tp, o, &nnodes, &node, err, errlen))
        return -1;
    int local = tp / nnodes; /* this process's ranks: global node * local + r */
    if (model_tp_plan_make(m, tp, err, errlen))
        return -1;
    const struct tp_plan *plan = &m->shards->plan;
    /* this process's ranks' KV heads side by side in a token row */
    m->kv_stride = (int64_t)local * plan->rank[0].n_kv_heads;
    m->tp_rank0 = (int64_t)node * local;
    if (nnodes > 1) {
        const char *addr = o->master_addr ? o->master_addr : "127.0.0.1";
        m->tcp_group = comm_tcp_create(nnodes, node, local, addr, o->master_port, 0, err, errlen);
        if (!m->tcp_group)
            return -1;
    } else {
        m->group = comm_cpu_create(tp);
    }
    m->rank = calloc((size_t)local, sizeof(*m->rank));
    struct tp_runner *run = calloc(1, sizeof(*run));
    if ((!m->group && !m->tcp_group) || !m->rank || !run) {
        free(run);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    m->tp = tp;
    m->n_local = local;
    /* the CPU threads asked for (default: every core) shared by the ranks */
    long cpus = n_threads > 0 ? n_threads : sysconf(_SC_NPROCESSORS_ONLN);
    int per = cpus / local > 0 ? (int)(cpus / local) : 1;
    for (int r = 0; r < local; r++) {
        struct comm *c = nnodes > 1 ? comm_tcp_rank(m->tcp_group, r) : comm_cpu_rank(m->group, r);
        if (model_tp_make_rank(m, node * local + r, per, c, 0, &m->rank[r], err, errlen))
            goto fail_run;
    }
    run->m = m;
    run->n = local;
    run->th = calloc((size_t)local, sizeof(*run->th));
    run->started = calloc((size_t)local, sizeof(*run->started));
    pthread_mutex_init(&run->mu, NULL);
    pthread_cond_init(&run->cv, NULL);
    pthread_cond_init(&run->done_cv, NULL);
    m->runner = run;
    if (!run->th || !run->started) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    /* rank 0 runs on the caller's thread */
    if (model_tp_threads(1, local, rank_main, run, run->th, run->started, err, errlen))
        return -1;
    /* the control plane: followers join the leader before anything runs */
    if (nnodes > 1) {
        const char *addr = o->master_addr ? o->master_addr : "127.0.0.1";
        if (node == 0 ? model_node_leader(m, nnodes, addr, o->master_port, err, errlen)
                      : model_node_follower(m, nnodes, node, addr, o->master_port, err, errlen))
            return -1;
    }
    return 0;
fail_run:
    free(run);
    return -1;
}

int model_tp_forward(struct model *m, struct kv_cache *kv, const struct model_row *rows,
                     int64_t n, float *logits, char *err, size_t errlen)
{
    struct tp_runner *run = m->runner;
    /* the leader of a multi-node job: the followers get the step first */
    int lead = m->node && m->tp_rank0 == 0;
    if (lead) {
        if (m->node_kv_blocks == 0) {
            if (model_node_welcome(m, kv, 0, 0, NULL, err, errlen))
                return -1;
            m->node_kv_blocks = kv_n_blocks(kv);
        } else if (m->node_kv_blocks != kv_n_blocks(kv)) {
            snprintf(err, errlen, "multi-node: one KV cache per job (%lld blocks, not %lld)",
                     (long long)m->node_kv_blocks, (long long)kv_n_blocks(kv));
            return -1;
        }
        if (model_node_step_begin(m, kv, rows, n, NULL, 0, err, errlen))
            return -1;
    }
    pthread_mutex_lock(&run->mu);
    run->kv = kv;
    run->rows = rows;
    run->n_rows = n;
    run->done = 0;
    run->gen++;
    pthread_cond_broadcast(&run->cv);
    pthread_mutex_unlock(&run->mu);
    char e0[256] = "";
    int rc = model_forward_body(m->rank[0], kv, rows, n, logits, e0, sizeof(e0));
    if (rc != 0)
        comm_abort(m->rank[0]->comm, e0);
    pthread_mutex_lock(&run->mu);
    while (run->done < run->n - 1)
        pthread_cond_wait(&run->done_cv, &run->mu);
    for (int r = 1; r < run->n && rc == 0; r++)
        if (run->rc[r] != 0) {
            rc = -1;
            snprintf(e0, sizeof(e0), "%s", run->err[r]);
        }
    pthread_mutex_unlock(&run->mu);
    if (lead) {
        /* every follower answers, or the job stops; a rank's own failure
         * (e0) says more than the followers' abort that follows it */
        char e1[256];
        if (model_node_step_end(m, e1, sizeof(e1)) && rc == 0) {
            rc = -1;
            snprintf(e0, sizeof(e0), "%s", e1);
        }
    }
    if (rc != 0)
        snprintf(err, errlen, "%s", e0);
    return rc;
}

int model_tp_logits(struct model *rm, int64_t nw, float *logits, char *err, size_t errlen)
{
    /* every rank's vocabulary range, from the plan the main model keeps;
     * each rank's block is padded to the same row count so the gather is
     * regular */
    const struct tp_plan *plan = &rm->tp_shared->plan;
    int tp = plan->tp;
    int64_t V = rm->output.rows; /* this rank's real rows */
    int64_t per = plan->vocab_per_rank;
    if (nw > rm->cap_tp_rows) {
        free(rm->tp_logits);
        free(rm->tp_gather);
        rm->tp_logits = aligned((size_t)nw * (size_t)per * sizeof(float));
        rm->tp_gather = aligned((size_t)tp * (size_t)nw * (size_t)per * sizeof(float));
        rm->cap_tp_rows = rm->tp_logits && rm->tp_gather ? nw : 0;
        if (!rm->cap_tp_rows) {
            snprintf(err, errlen, "out of memory for the logits of %lld rows", (long long)nw);
            return -1;
        }
    }
    if (V > 0)
        k_matmul(rm->pool, &rm->output, rm->h, rm->cfg.n_embd, nw, rm->tp_logits, per,
                 rm->mm_scratch);
    if (comm_allgather_f32(rm->comm, rm->tp_logits, nw * per, rm->tp_gather) != 0) {
        snprintf(err, errlen, "tensor parallel rank %d: %s", comm_rank(rm->comm),
                 comm_error(rm->comm));
        return -1;
    }
    if (!logits)
        return 0;
    /* rank q's block: (nw, per) rows of its vocabulary range */
    int64_t n_vocab = plan->rank[tp - 1].vocab1;
    for (int q = 0; q < tp; q++) {
        int64_t v0 = plan->rank[q].vocab0, v1 = plan->rank[q].vocab1;
        const float *blk = rm->tp_gather + (size_t)q * (size_t)nw * (size_t)per;
        for (int64_t w = 0; w < nw; w++)
            memcpy(logits + (size_t)w * (size_t)n_vocab + (size_t)v0, blk + (size_t)w * (size_t)per,
                   (size_t)(v1 - v0) * sizeof(float));
    }
    return 0;
}

void model_tp_destroy(struct model *m)
{
    struct tp_runner *run = m->runner;
    if (run) {
        pthread_mutex_lock(&run->mu);
        run->stop = 1;
        pthread_cond_broadcast(&run->cv);
        pthread_mutex_unlock(&run->mu);
        for (int r = 1; r < run->n; r++)
            if (run->started && run->started[r])
                pthread_join(run->th[r], NULL);
        pthread_mutex_destroy(&run->mu);
        pthread_cond_destroy(&run->cv);
        pthread_cond_destroy(&run->done_cv);
        free(run->th);
        free(run->started);
        free(run);
        m->runner = NULL;
    }
    model_node_destroy(m);
    if (m->rank) {
        for (int r = 0; r < m->n_local; r++)
            model_destroy(m->rank[r]);
        free(m->rank);
        m->rank = NULL;
    }
    comm_group_destroy(m->group);
    comm_tcp_destroy(m->tcp_group);
    m->group = NULL;
    m->tcp_group = NULL;
    free(m->shards);
    m->shards = NULL;
}
