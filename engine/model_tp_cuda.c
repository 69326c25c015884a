/* model_tp_cuda.c: tensor parallelism over the GPUs of one process
 * (--device cuda --tensor-parallel-size N).
 *
 * The loaded model is split into N rank models as on the CPU (model_tp.c,
 * tp_plan.h), each with its model_cuda on GPU r and an NCCL communicator
 * (comm.h) on that GPU's stream. Each rank has a thread of its own, rank 0
 * included: a CUDA device is current per thread and an NCCL handle is used
 * from the thread that made it, and the ranks' weight uploads and graph
 * captures then run side by side. The engine thread validates each call
 * once, hands it to every rank thread and waits until all have enqueued
 * it (a launch returns before its step has run, as on one GPU).
 *
 * Several nodes (--nnodes): each process runs tp / nnodes ranks on its
 * GPUs 0 .. local - 1. They meet on the control plane at load (model_
 * node.c; a follower's HELLO says how much memory its GPUs have left, so
 * the leader sizes the KV cache by the fullest GPU of any node), and in
 * NCCL when the leader's engine prepares: its WELCOME carries the NCCL id
 * and the sizes every node prepares for, so every node captures the same
 * graphs and issues the same collectives. The leader sends each step
 * (rows, and the rows rank 0 samples, in order) before its own GPUs run
 * it and reads every follower's STEP_DONE when it collects; a follower
 * runs the steps as they come.
 *
 * A failure on any rank after the call was validated (a CUDA or NCCL
 * error, a peer gone, a node's control connection closed) stops the job: every rank's communicator is aborted,
 * so none waits forever in a collective or for a step, and every later
 * call fails with the first reason, which model_failed reports (the API
 * then answers 503). Engine thread, and the rank threads, which touch only
 * their own rank model (and, to abort, the others' communicators).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/comm.h"
#include "engine/model_internal.h"
#include "engine/tp_plan.h"

/* How long the ranks may take to meet in ncclCommInitRank. */
#define TPG_INIT_TIMEOUT_MS 120000

enum tpg_job { JOB_NONE, JOB_LOAD, JOB_COMM, JOB_PREPARE, JOB_LAUNCH, JOB_COLLECT, JOB_MEMORY,
               JOB_CEILINGS, JOB_DESTROY };

struct tpg_args {
    struct kv_cache *kv;
    const struct model_row *rows;
    int64_t n;
    float *logits;
    struct model_sample *samples;
    int64_t n_samples;
    int64_t max_rows, max_len;
    int max_seqs;
};

struct tp_gpu {
    struct model *m;
    int n;  /* this process's ranks, one per GPU */
    int tp; /* ranks in all: n per node */
    int nnodes, node;
    int joined; /* the NCCL communicator is up */
    /* multi-node: what the first prepare sized everything for (the
     * followers were told; no node may size differently after) */
    struct kv_cache *prep_kv;
    int64_t prep_rows, prep_len;
    int prep_seqs;
    int deterministic, eager;
    pthread_t *th;
    int *started;
    pthread_mutex_t mu;
    pthread_cond_t cv, done_cv;
    uint64_t gen;
    int stop, done;
    enum tpg_job job;
    struct tpg_args a;
    int rc[TP_MAX];
    char err[TP_MAX][256];
    int64_t mem_free[TP_MAX], mem_total[TP_MAX];
    double bw, flops;
    char desc[128];
    unsigned char nccl_id[COMM_NCCL_ID_BYTES];
    /* the engine thread's: the last launch's samples (MODEL_TOKEN_PREV),
     * and scratch for validation */
    int64_t prev_samples;
    int64_t *next;
    int64_t cap_next;
    unsigned char *seen;
    int64_t cap_seen;
    /* a failure stops the job: set once (why first), read by any thread */
    atomic_int broken;
    pthread_mutex_t why_mu;
    char why[256];
};


/* The job stops: the first reason is kept, and every rank's communicator
 * is aborted so that no rank waits for a peer that will not come. Any
 * thread. */
static void tpg_fail(struct tp_gpu *g, const char *why)
{
    pthread_mutex_lock(&g->why_mu);
    int first = !atomic_load(&g->broken);
    if (first) {
        snprintf(g->why, sizeof(g->why), "%.250s", why);
        atomic_store(&g->broken, 1);
    }
    pthread_mutex_unlock(&g->why_mu);
    if (!first)
        return;
    fprintf(stderr, "inferd: tensor parallelism stopped: %s\n", why);
    for (int r = 0; r < g->n; r++)
        if (g->m->rank[r] && g->m->rank[r]->comm)
            comm_abort(g->m->rank[r]->comm, why);
}

/* Runs the current job on rank r's thread. */
static int run_job(struct tp_gpu *g, int r, char *err, size_t errlen)
{
    struct model *rm = g->m->rank[r];
    struct tpg_args *a = &g->a;
    switch (g->job) {
    case JOB_LOAD:
        return mcu_create(rm, r, g->deterministic, g->eager, &rm->cuda, err, errlen);
    case JOB_COMM:
        rm->comm = comm_nccl_create(rm->tp_rank, g->tp, g->nccl_id, mcu_stream(rm->cuda),
                                    TPG_INIT_TIMEOUT_MS, err, errlen);
        return rm->comm ? 0 : -1;
    case JOB_PREPARE:
        return mcu_prepare(rm, a->kv, a->max_rows, a->max_seqs, a->max_len, err, errlen);
    case JOB_LAUNCH:
        /* rank 0 writes the logits; every rank reads the samples' rows
         * and lists (the same step on each), and kv, which none writes */
        return mcu_launch(rm, a->kv, a->rows, a->n, r == 0 ? a->logits : NULL, a->samples,
                          a->n_samples, 0, err, errlen);
    case JOB_COLLECT:
        return mcu_collect(rm, err, errlen);
    case JOB_MEMORY:
        if (mcu_memory(&g->mem_free[r], &g->mem_total[r]) != 0) {
            snprintf(err, errlen, "cannot read GPU %d's free memory", r);
            return -1;
        }
        return 0;
    case JOB_CEILINGS:
        return r == 0 ? mcu_ceilings(0, &g->bw, &g->flops, g->desc, sizeof(g->desc)) : 0;
    case JOB_DESTROY:
        comm_destroy(rm->comm);
        rm->comm = NULL;
        mcu_destroy(rm->cuda);
        rm->cuda = NULL;
        return 0;
    case JOB_NONE:
        break;
    }
    return 0;
}

static void *rank_main(void *arg)
{
    struct tp_thread_arg *ra = arg;
    struct tp_gpu *g = ra->ctx;
    int r = ra->r;
    free(ra);
    uint64_t seen = 0;
    pthread_mutex_lock(&g->mu);
    for (;;) {
        while (!g->stop && g->gen == seen)
            pthread_cond_wait(&g->cv, &g->mu);
        if (g->stop)
            break;
        seen = g->gen;
        pthread_mutex_unlock(&g->mu);
        char err[256] = "";
        int rc = run_job(g, r, err, sizeof(err));
        pthread_mutex_lock(&g->mu);
        g->rc[r] = rc;
        snprintf(g->err[r], sizeof(g->err[r]), "%s", err);
        g->done++;
        pthread_cond_signal(&g->done_cv);
    }
    pthread_mutex_unlock(&g->mu);
    return NULL;
}

/* Hands job to every rank thread and waits for all. On a failure returns
 * -1 with the first failing rank's reason in err; fatal: the job stops
 * (tpg_fail) before the wait, so the ranks still in a collective or a
 * step's wait come out. */
static int dispatch(struct tp_gpu *g, enum tpg_job job, int fatal, char *err, size_t errlen)
{
    pthread_mutex_lock(&g->mu);
    g->job = job;
    g->done = 0;
    g->gen++;
    pthread_cond_broadcast(&g->cv);
    int failed = -1;
    while (g->done < g->n) {
        if (g->nnodes > 1 && fatal) {
            /* a node that dies leaves this one's collectives waiting on
             * it: its control connection closing says so first */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 50 * 1000000L;
            if (ts.tv_nsec >= 1000000000L)
                ts.tv_sec++, ts.tv_nsec -= 1000000000L;
            pthread_cond_timedwait(&g->done_cv, &g->mu, &ts);
            char why[256];
            if (failed < 0 && model_node_watch(g->m, why, sizeof(why)) != 0) {
                failed = g->n;
                pthread_mutex_unlock(&g->mu);
                tpg_fail(g, why);
                pthread_mutex_lock(&g->mu);
            }
        } else {
            pthread_cond_wait(&g->done_cv, &g->mu);
        }
        /* a rank that failed may leave the others waiting on it */
        for (int r = 0; r < g->n && failed < 0 && fatal; r++)
            if (g->rc[r] != 0) {
                failed = r;
                char why[300];
                snprintf(why, sizeof(why), "GPU rank %d: %s", r, g->err[r]);
                pthread_mutex_unlock(&g->mu);
                tpg_fail(g, why);
                pthread_mutex_lock(&g->mu);
            }
    }
    int rc = 0;
    for (int r = 0; r < g->n; r++) {
        if (g->rc[r] == 0)
            continue;
        if (rc == 0)
            snprintf(err, errlen, "GPU rank %d: %s", r, g->err[r]);
        rc = -1;
    }
    for (int r = 0; r < g->n; r++)
        g->rc[r] = 0, g->err[r][0] = 0;
    pthread_mutex_unlock(&g->mu);
    if (rc != 0 && fatal && failed < 0)
        tpg_fail(g, err);
    return rc;
}

/* Fails a call on a stopped job with the reason it stopped. */
static int stopped(struct tp_gpu *g, char *err, size_t errlen)
{
    if (!atomic_load(&g->broken))
        return 0;
    pthread_mutex_lock(&g->why_mu);
    snprintf(err, errlen, "tensor parallelism stopped: %.200s", g->why);
    pthread_mutex_unlock(&g->why_mu);
    return -1;
}

int mtc_create(struct model *m, int tp, const struct model_opts *o, char *err, size_t errlen)
{
    int nnodes, node;
    if (model_tp_nodes(tp, o, &nnodes, &node, err, errlen))
        return -1;
    int local = tp / nnodes; /* this node's ranks: GPUs 0 .. local - 1 */
    int n_dev = kc_device_count();
    if (n_dev < local) {
        snprintf(err, errlen, "--tensor-parallel-size %d%s with --device cuda needs %d GPUs here, "
                 "one per rank; %d %s visible (CUDA_VISIBLE_DEVICES may hide some)", tp,
                 nnodes > 1 ? " over these nodes" : "", local, n_dev < 0 ? 0 : n_dev,
                 n_dev == 1 ? "is" : "are");
        return -1;
    }
    if (model_tp_plan_make(m, tp, err, errlen))
        return -1;
    const struct tp_plan *plan = model_tp_plan(m);
    struct tp_gpu *g = calloc(1, sizeof(*g));
    m->rank = calloc((size_t)local, sizeof(*m->rank));
    if (!g || !m->rank) {
        free(g);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    g->m = m;
    g->n = local;
    g->tp = tp;
    g->nnodes = nnodes;
    g->node = node;
    g->deterministic = o->deterministic;
    g->eager = o->enforce_eager;
    atomic_init(&g->broken, 0);
    pthread_mutex_init(&g->mu, NULL);
    pthread_mutex_init(&g->why_mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    pthread_cond_init(&g->done_cv, NULL);
    m->tpg = g;
    m->tp = tp;
    m->n_local = local;
    m->tp_rank0 = (int64_t)node * local;
    m->kv_stride = plan->rank[0].n_kv_heads; /* each GPU's own cache */
    /* the CPU threads asked for (default: every core) convert the ranks'
     * weights between them */
    long cpus = o->n_threads > 0 ? o->n_threads : sysconf(_SC_NPROCESSORS_ONLN);
    int per = cpus / local > 0 ? (int)(cpus / local) : 1;
    for (int r = 0; r < local; r++)
        if (model_tp_make_rank(m, node * local + r, per, NULL, 1, &m->rank[r], err, errlen))
            return -1;
    g->th = calloc((size_t)local, sizeof(*g->th));
    g->started = calloc((size_t)local, sizeof(*g->started));
    if (!g->th || !g->started) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (model_tp_threads(0, local, rank_main, g, g->th, g->started, err, errlen))
        return -1;
    /* the weights first, every GPU at once; the communicator only when all
     * have them, so that a rank that fails to load leaves no other waiting
     * in ncclCommInitRank */
    if (dispatch(g, JOB_LOAD, 0, err, errlen))
        return -1;
    if (nnodes == 1) {
        if (comm_nccl_unique_id(g->nccl_id, err, errlen) ||
            dispatch(g, JOB_COMM, 0, err, errlen))
            return -1;
        g->joined = 1;
        return 0;
    }
    /* several nodes: they meet on the control plane now (a follower says
     * how much memory its GPUs have left), in NCCL when the leader's
     * engine prepares (WELCOME carries the id and the sizes) */
    const char *addr = o->master_addr ? o->master_addr : "127.0.0.1";
    return node == 0 ? model_node_leader(m, nnodes, addr, o->master_port, err, errlen)
                     : model_node_follower(m, nnodes, node, addr, o->master_port, err, errlen);
}

int mtc_join(struct model *m, const void *nccl_id, char *err, size_t errlen)
{
    struct tp_gpu *g = m->tpg;
    memcpy(g->nccl_id, nccl_id, COMM_NCCL_ID_BYTES);
    if (dispatch(g, JOB_COMM, 0, err, errlen))
        return -1;
    g->joined = 1;
    return 0;
}

void mtc_destroy(struct model *m)
{
    struct tp_gpu *g = m->tpg;
    if (!g)
        return;
    /* the followers first hear that the job ends (between steps), then
     * every node's communicator is finalised */
    model_node_destroy(m);
    int all = 1;
    for (int r = 0; r < g->n; r++)
        all = all && g->started && g->started[r];
    if (all) {
        char err[256];
        (void)dispatch(g, JOB_DESTROY, 0, err, sizeof(err));
    }
    pthread_mutex_lock(&g->mu);
    g->stop = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
    for (int r = 0; r < g->n; r++)
        if (g->started && g->started[r])
            pthread_join(g->th[r], NULL);
    /* threads that never started (a failed create): their ranks' GPU
     * state, if any, goes with model_destroy on this thread */
    pthread_mutex_destroy(&g->mu);
    pthread_mutex_destroy(&g->why_mu);
    pthread_cond_destroy(&g->cv);
    pthread_cond_destroy(&g->done_cv);
    free(g->th);
    free(g->started);
    free(g->next);
    free(g->seen);
    free(g);
    m->tpg = NULL;
}

/* What model_check_batch and the samples' rows must satisfy, checked once
 * here: a bad batch fails the call alike on every rank, before anything is
 * enqueued, and the job goes on. */
static int validate(struct tp_gpu *g, struct kv_cache *kv, const struct model_row *rows,
                    int64_t n, const struct model_sample *samples, int64_t n_samples, char *err,
                    size_t errlen)
{
    int64_t ms = kv_max_seqs(kv);
    if (ms > g->cap_next) {
        int64_t *p = realloc(g->next, (size_t)ms * sizeof(*p));
        if (!p)
            goto oom;
        g->next = p;
        g->cap_next = ms;
    }
    if (model_check_batch(g->m, kv, rows, n, g->prev_samples, g->next, err, errlen))
        return -1;
    int64_t nw = 0;
    for (int64_t r = 0; r < n; r++)
        nw += rows[r].want_logits != 0;
    if (nw > g->cap_seen) {
        unsigned char *p = realloc(g->seen, (size_t)nw);
        if (!p)
            goto oom;
        g->seen = p;
        g->cap_seen = nw;
    }
    if (nw)
        memset(g->seen, 0, (size_t)nw);
    for (int64_t i = 0; i < n_samples; i++) {
        int64_t w = samples[i].row;
        if (w < 0 || w >= nw || g->seen[w]) {
            snprintf(err, errlen, "sample %lld names row %lld of %lld logits rows (or twice)",
                     (long long)i, (long long)w, (long long)nw);
            return -1;
        }
        g->seen[w] = 1;
    }
    return 0;
oom:
    snprintf(err, errlen, "out of memory");
    return -1;
}

int mtc_launch(struct model *m, struct kv_cache *kv, const struct model_row *rows, int64_t n,
               float *logits, struct model_sample *samples, int64_t n_samples, char *err,
               size_t errlen)
{
    struct tp_gpu *g = m->tpg;
    int lead = g->nnodes > 1 && g->node == 0;
    if (stopped(g, err, errlen))
        return -1;
    if (lead && !g->joined) { /* a caller that did not prepare: this step's sizes */
        int64_t len = kv_n_blocks(kv) * KV_BLOCK_TOKENS;
        if (m->cfg.n_ctx > 0 && len > m->cfg.n_ctx)
            len = m->cfg.n_ctx;
        if (mtc_prepare(m, kv, n, kv_max_seqs(kv), len, err, errlen))
            return -1;
    }
    if (validate(g, kv, rows, n, samples, n_samples, err, errlen))
        return -1;
    /* the followers get the step first, then this node's GPUs run it */
    if (lead && model_node_step_begin(m, kv, rows, n, samples, n_samples, err, errlen))
        return -1;
    g->a = (struct tpg_args){.kv = kv, .rows = rows, .n = n, .logits = logits,
                             .samples = samples, .n_samples = n_samples};
    if (dispatch(g, JOB_LAUNCH, 1, err, errlen))
        return -1;
    /* the ranks share kv: its lengths advance once, here */
    for (int64_t r = 0; r < n; r++)
        kv_seq_set_len(kv, rows[r].seq, g->next[rows[r].seq]);
    g->prev_samples = n_samples;
    return 0;
}

int mtc_collect(struct model *m, char *err, size_t errlen)
{
    struct tp_gpu *g = m->tpg;
    if (stopped(g, err, errlen) || dispatch(g, JOB_COLLECT, 1, err, errlen))
        return -1;
    /* the leader: every follower ran it too */
    if (g->nnodes > 1 && g->node == 0 && model_node_step_end(m, err, errlen)) {
        tpg_fail(g, err);
        return -1;
    }
    return 0;
}

int mtc_prepare(struct model *m, struct kv_cache *kv, int64_t max_rows, int max_seqs,
                int64_t max_len, char *err, size_t errlen)
{
    struct tp_gpu *g = m->tpg;
    if (stopped(g, err, errlen))
        return -1;
    if (g->nnodes > 1) {
        /* every node must capture the same graphs and issue the same
         * collectives: one preparation, the leader's sizes */
        if (g->prep_kv) {
            if (kv == g->prep_kv && max_rows <= g->prep_rows && max_seqs <= g->prep_seqs &&
                max_len <= g->prep_len)
                return 0;
            snprintf(err, errlen, "multi-node: the GPUs were prepared for one KV cache, %lld "
                     "rows, %d sequences and %lld tokens; no node may prepare again",
                     (long long)g->prep_rows, g->prep_seqs, (long long)g->prep_len);
            return -1;
        }
        if (g->node == 0) {
            if (comm_nccl_unique_id(g->nccl_id, err, errlen) ||
                model_node_welcome(m, kv, max_rows, max_len, g->nccl_id, err, errlen) ||
                dispatch(g, JOB_COMM, 0, err, errlen))
                return -1;
            g->joined = 1;
        }
        g->prep_kv = kv, g->prep_rows = max_rows, g->prep_seqs = max_seqs;
        g->prep_len = max_len;
    }
    g->a = (struct tpg_args){.kv = kv, .max_rows = max_rows, .max_seqs = max_seqs,
                             .max_len = max_len};
    return dispatch(g, JOB_PREPARE, 1, err, errlen);
}

int mtc_memory(const struct model *m, int64_t *free_bytes, int64_t *total_bytes)
{
    struct tp_gpu *g = m->tpg;
    char err[256];
    *free_bytes = *total_bytes = 0;
    if (stopped(g, err, sizeof(err)) || dispatch(g, JOB_MEMORY, 0, err, sizeof(err)))
        return -1;
    /* the KV cache has the same blocks on every GPU: the fullest decides */
    int lo = 0;
    for (int r = 1; r < g->n; r++)
        if (g->mem_free[r] < g->mem_free[lo])
            lo = r;
    *free_bytes = g->mem_free[lo];
    *total_bytes = g->mem_total[lo];
    /* the leader: or a follower's, if fuller (from its HELLO) */
    int64_t pf, pt;
    if (model_node_peer_memory(m, &pf, &pt) == 0 && pf < *free_bytes)
        *free_bytes = pf, *total_bytes = pt;
    return 0;
}

int64_t mtc_step_bytes(const struct model *m, int64_t max_rows, int max_seqs)
{
    int64_t most = 0;
    for (int r = 0; r < m->tpg->n; r++) {
        int64_t b = mcu_step_bytes(m->rank[r], max_rows, max_seqs);
        most = b > most ? b : most;
    }
    return most;
}

int mtc_ceilings(struct model *m, double *bytes_per_s, double *flops, char *desc,
                 size_t desc_len)
{
    struct tp_gpu *g = m->tpg;
    char err[256];
    *bytes_per_s = *flops = 0;
    if (stopped(g, err, sizeof(err)) || dispatch(g, JOB_CEILINGS, 0, err, sizeof(err)))
        return -1;
    *bytes_per_s = g->bw;
    *flops = g->flops;
    snprintf(desc, desc_len, "%s (x%d, tensor parallel; per GPU)", g->desc, g->n);
    return g->bw > 0 && g->flops > 0 ? 0 : -1;
}

struct kv_geom mtc_kv_geom(const struct model *m)
{
    /* what each GPU stores per token: its own KV heads (a replicated head
     * is stored by every rank holding it) */
    struct kv_geom geom = {m->cfg.n_layer, m->kv_stride, m->cfg.head_dim, 1};
    return geom;
}

int mtc_failed(const struct model *m, char *why, size_t n)
{
    struct tp_gpu *g = m->tpg;
    if (!atomic_load(&g->broken))
        return 0;
    pthread_mutex_lock(&g->why_mu);
    snprintf(why, n, "%s", g->why);
    pthread_mutex_unlock(&g->why_mu);
    return 1;
}
