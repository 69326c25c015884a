/* comm_nccl.c: the communicator across GPUs, one NCCL rank per GPU, built
 * only with the CUDA toolkit and NCCL. The handle's own thread (the rank's
 * GPU worker) makes every call; collectives are enqueued on its stream.
 *
 * The communicator is nonblocking (ncclConfig_t.blocking = 0): no NCCL call
 * parks the thread inside NCCL, every wait is a poll here that also reads
 * the abort flag and the communicator's asynchronous error, as NCCL's
 * fault-tolerance guide prescribes. That is what lets a dead peer or a
 * stopping engine end with ncclCommAbort instead of a hang, at init,
 * enqueue, sync or finalize alike. After an abort or any NCCL or CUDA
 * error the handle is dead: ncclCommAbort has run, and every later call
 * fails with the first reason. Peers are not told; the engine's control
 * plane aborts them.
 *
 * NCCL and the CUDA runtime are reached through kcuda.h (kc_nccl_*, built
 * from kernels/cuda/nccl.c), as the rest of the engine reaches CUDA: no
 * header of theirs is included here.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/comm_internal.h"
#include "kernels/kernels.h" /* kcuda.h: the NCCL and CUDA calls */

_Static_assert(KC_NCCL_ID_BYTES == COMM_NCCL_ID_BYTES, "COMM_NCCL_ID_BYTES");

/* How long comm_destroy lets an orderly finalize take before it aborts: a
 * peer that vanished without aborting would otherwise hold it forever. */
#define FINALIZE_TIMEOUT_MS 10000

struct nccl_rank {
    struct comm base;      /* first: the handle callers see */
    kc_nccl_comm nc;       /* NULL once dead */
    kc_stream stream;      /* borrowed */
    int32_t *barrier_word; /* device: (1) int32, the barrier's all-reduce */
    int dead;
    char dead_msg[COMM_ERR_LEN];
    /* comm_abort from any thread: the request, and its reason under mu. */
    atomic_int abort_req;
    pthread_mutex_t abort_mu;
    char abort_why[COMM_WHY_LEN];
};

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

/* ---- Death: the one way out of every failure ---------------------------- */

/* Aborts the communicator and keeps msg as the answer to every later call.
 * Returns -1. */
static int die(struct nccl_rank *r, const char *msg)
{
    if (!r->dead) {
        snprintf(r->dead_msg, sizeof(r->dead_msg), "%s", msg);
        r->dead = 1;
        if (r->nc) {
            int res = kc_nccl_abort(r->nc);
            r->nc = NULL;
            if (res != KC_NCCL_SUCCESS) {
                size_t len = strlen(r->dead_msg);
                snprintf(r->dead_msg + len, sizeof(r->dead_msg) - len, " (then ncclCommAbort: %s)",
                         kc_nccl_error_string(res));
            }
        }
    }
    return comm_fail(&r->base, "%s", r->dead_msg);
}

static int die_nccl(struct nccl_rank *r, const char *what, int res)
{
    char msg[COMM_ERR_LEN];
    const char *last = r->nc ? kc_nccl_last_error(r->nc) : NULL;
    snprintf(msg, sizeof(msg), "%s: %s%s%s", what, kc_nccl_error_string(res),
             last && *last ? ": " : "", last && *last ? last : "");
    return die(r, msg);
}

static int die_cuda(struct nccl_rank *r, const char *what, int e)
{
    char msg[COMM_ERR_LEN];
    snprintf(msg, sizeof(msg), "%s: %s", what, kc_error_string(e));
    return die(r, msg);
}

/* Acts on a pending comm_abort: returns -1 (the handle is now dead) or 0. */
static int take_abort(struct nccl_rank *r)
{
    if (!atomic_load_explicit(&r->abort_req, memory_order_acquire))
        return 0;
    char msg[COMM_ERR_LEN];
    pthread_mutex_lock(&r->abort_mu);
    snprintf(msg, sizeof(msg), "aborted: %s", r->abort_why);
    pthread_mutex_unlock(&r->abort_mu);
    return die(r, msg);
}

/* Every call starts here: a dead or aborted handle fails at once. */
static int enter(struct nccl_rank *r)
{
    if (r->dead)
        return comm_fail(&r->base, "%s", r->dead_msg);
    return take_abort(r);
}

/* Waits until the communicator's pending NCCL call has finished its host
 * side (nonblocking mode returns ncclInProgress first), then reports its
 * outcome. deadline_ms <= 0: none. Returns 0 or -1 (dead). */
static int settle(struct nccl_rank *r, const char *what, int res, double deadline_ms)
{
    while (res == KC_NCCL_IN_PROGRESS) {
        if (take_abort(r) != 0)
            return -1;
        if (deadline_ms > 0 && now_ms() > deadline_ms) {
            char msg[COMM_ERR_LEN];
            snprintf(msg, sizeof(msg), "%s: timed out", what);
            return die(r, msg);
        }
        /* Let NCCL's own threads, which do the work, have the core. */
        sched_yield();
        int q = kc_nccl_async_error(r->nc, &res);
        if (q != KC_NCCL_SUCCESS)
            return die_nccl(r, "ncclCommGetAsyncError", q);
    }
    if (res != KC_NCCL_SUCCESS)
        return die_nccl(r, what, res);
    return 0;
}

/* ---- Collectives ------------------------------------------------------ */

static int nccl_allreduce_f32(struct comm *c, float *buf, int64_t n)
{
    struct nccl_rank *r = (struct nccl_rank *)c;
    if (enter(r) != 0)
        return -1;
    if (n < 0)
        return comm_fail(c, "allreduce_f32: bad element count %lld", (long long)n);
    if (n == 0)
        return 0; /* every rank has n == 0 too: nothing to meet for */
    return settle(r, "ncclAllReduce",
                  kc_nccl_allreduce_sum_f32(r->nc, r->stream, buf, buf, (size_t)n), 0);
}

static int nccl_allreduce_bf16(struct comm *c, uint16_t *buf, int64_t n)
{
    struct nccl_rank *r = (struct nccl_rank *)c;
    if (enter(r) != 0)
        return -1;
    if (n < 0)
        return comm_fail(c, "allreduce_bf16: bad element count %lld", (long long)n);
    if (n == 0)
        return 0;
    return settle(r, "ncclAllReduce (bf16)",
                  kc_nccl_allreduce_sum_bf16(r->nc, r->stream, buf, buf, (size_t)n), 0);
}

static int nccl_allgather_f32(struct comm *c, const float *send, int64_t n_per_rank, float *recv)
{
    struct nccl_rank *r = (struct nccl_rank *)c;
    if (enter(r) != 0)
        return -1;
    if (n_per_rank < 0)
        return comm_fail(c, "allgather_f32: bad element count %lld", (long long)n_per_rank);
    if (n_per_rank == 0)
        return 0;
    return settle(r, "ncclAllGather",
                  kc_nccl_allgather_f32(r->nc, r->stream, recv, send, (size_t)n_per_rank), 0);
}

static int nccl_broadcast(struct comm *c, void *buf, size_t bytes, int root)
{
    struct nccl_rank *r = (struct nccl_rank *)c;
    if (enter(r) != 0)
        return -1;
    if (root < 0 || root >= c->size)
        return comm_fail(c, "broadcast: root %d not in [0, %d)", root, c->size);
    if (bytes == 0)
        return 0;
    return settle(r, "ncclBroadcast", kc_nccl_broadcast(r->nc, r->stream, buf, buf, bytes, root),
                  0);
}

/* Waits for the stream, watching for an abort or an asynchronous NCCL
 * error (a peer gone: the kernels would otherwise wait forever). Polls
 * with sched_yield, so it holds a core while it waits; a decode step's
 * wait is short. The stream (event NULL) or one event. */
static int wait_done(struct nccl_rank *r, kc_event event)
{
    if (enter(r) != 0)
        return -1;
    for (;;) {
        int e = event ? kc_nccl_event_query(event) : kc_nccl_stream_query(r->stream);
        if (e == 0)
            return 0;
        if (e != KC_CUDA_NOT_READY)
            return die_cuda(r, event ? "cudaEventQuery" : "cudaStreamQuery", e);
        if (take_abort(r) != 0)
            return -1;
        int st;
        int q = kc_nccl_async_error(r->nc, &st);
        if (q != KC_NCCL_SUCCESS)
            return die_nccl(r, "ncclCommGetAsyncError", q);
        if (st != KC_NCCL_SUCCESS && st != KC_NCCL_IN_PROGRESS)
            return die_nccl(r, "asynchronous NCCL error", st);
        sched_yield();
    }
}

static int nccl_sync(struct comm *c)
{
    return wait_done((struct nccl_rank *)c, NULL);
}

/* nccl_sync for one event: the work after it may still run. */
static int nccl_wait_event(struct comm *c, void *event)
{
    return wait_done((struct nccl_rank *)c, (kc_event)event);
}

/* A one-int all-reduce meets every rank; waiting for it on the stream
 * makes it a host barrier too. */
static int nccl_barrier(struct comm *c)
{
    struct nccl_rank *r = (struct nccl_rank *)c;
    if (enter(r) != 0)
        return -1;
    if (settle(r, "ncclAllReduce (barrier)",
               kc_nccl_allreduce_sum_i32(r->nc, r->stream, r->barrier_word, r->barrier_word, 1),
               0) != 0)
        return -1;
    return nccl_sync(c);
}

static void nccl_abort(struct comm *c, const char *why)
{
    struct nccl_rank *r = (struct nccl_rank *)c;
    pthread_mutex_lock(&r->abort_mu);
    if (!atomic_load_explicit(&r->abort_req, memory_order_relaxed)) {
        snprintf(r->abort_why, sizeof(r->abort_why), "%s", why ? why : "(no reason given)");
        atomic_store_explicit(&r->abort_req, 1, memory_order_release);
    }
    pthread_mutex_unlock(&r->abort_mu);
}

static void nccl_destroy(struct comm *c)
{
    struct nccl_rank *r = (struct nccl_rank *)c;
    if (r->nc && take_abort(r) == 0) {
        /* Orderly: finalize flushes what was issued and waits for the peers
         * to be quiescent, then destroy frees without blocking. */
        if (settle(r, "ncclCommFinalize", kc_nccl_finalize(r->nc),
                   now_ms() + FINALIZE_TIMEOUT_MS) == 0) {
            (void)kc_nccl_destroy(r->nc); /* no caller left to tell of a failure */
            r->nc = NULL;
        }
    }
    /* settle and take_abort aborted r->nc on any failure. */
    kc_free(r->barrier_word); /* likewise: it ignores cudaFree's result; NULL is fine */
    pthread_mutex_destroy(&r->abort_mu);
    free(r);
}

static const struct comm_ops nccl_ops = {
    .allreduce_f32 = nccl_allreduce_f32,
    .allreduce_bf16 = nccl_allreduce_bf16,
    .allgather_f32 = nccl_allgather_f32,
    .broadcast = nccl_broadcast,
    .barrier = nccl_barrier,
    .sync = nccl_sync,
    .wait_event = nccl_wait_event,
    .abort = nccl_abort,
    .destroy = nccl_destroy,
};

/* ---- Creation --------------------------------------------------------- */

int comm_nccl_unique_id(void *out, char *err, size_t errlen)
{
    int res = kc_nccl_unique_id(out);
    if (res != KC_NCCL_SUCCESS) {
        snprintf(err, errlen, "ncclGetUniqueId: %s", kc_nccl_error_string(res));
        return -1;
    }
    return 0;
}

struct comm *comm_nccl_create(int rank, int size, const void *unique_id, void *stream,
                              int timeout_ms, char *err, size_t errlen)
{
    if (size < 1 || rank < 0 || rank >= size || !unique_id) {
        snprintf(err, errlen, "comm_nccl_create: rank %d of %d%s", rank, size,
                 unique_id ? "" : ", no unique id");
        return NULL;
    }
    struct nccl_rank *r = calloc(1, sizeof(*r));
    if (!r) {
        snprintf(err, errlen, "comm_nccl_create: out of memory");
        return NULL;
    }
    if (pthread_mutex_init(&r->abort_mu, NULL) != 0) {
        snprintf(err, errlen, "comm_nccl_create: pthread_mutex_init failed");
        free(r);
        return NULL;
    }
    atomic_init(&r->abort_req, 0);
    r->base.ops = &nccl_ops;
    r->base.rank = rank;
    r->base.size = size;
    r->stream = (kc_stream)stream;

    void *word;
    int e = kc_malloc(&word, sizeof(int32_t));
    if (e != 0) {
        die_cuda(r, "cudaMalloc (barrier word)", e);
        goto fail;
    }
    r->barrier_word = word;
    /* The barrier sums whatever is there; zeroed so no tool sees a read of
     * uninitialised memory. On the rank's stream, ahead of any barrier. */
    e = kc_memset(r->stream, r->barrier_word, 0, sizeof(int32_t));
    if (e != 0) {
        die_cuda(r, "cudaMemsetAsync (barrier word)", e);
        goto fail;
    }

    /* blocking 0: nonblocking, see the top of the file. */
    int res = kc_nccl_comm_init(&r->nc, size, unique_id, rank, 0);
    if (res != KC_NCCL_SUCCESS && res != KC_NCCL_IN_PROGRESS) {
        die_nccl(r, "ncclCommInitRankConfig", res);
        goto fail;
    }
    /* Init meets every rank: the part that waits on peers, hence the limit. */
    if (settle(r, "ncclCommInitRankConfig (waiting for every rank)", res,
               timeout_ms > 0 ? now_ms() + timeout_ms : 0) != 0)
        goto fail;
    return &r->base;
fail:
    snprintf(err, errlen, "%s", r->base.err);
    nccl_destroy(&r->base);
    return NULL;
}
