/* comm_cpu.c: the communicator for ranks that are threads of one process,
 * so the sharded forward pass runs (and is checked against TP=1) without
 * GPUs. Each rank's thread runs its own calls; the group is where they meet.
 *
 * A collective is two meetings of a generation-counted barrier (mutex and
 * condition variable). At the first, each rank has posted its arguments
 * and the last to arrive checks that they agree and grows the shared
 * scratch; between the two, ranks read each other's buffers (the data
 * phase); after the second, no rank touches another's memory, so each can
 * return and reuse its buffers. The all-reduce splits the element range
 * into one slice per rank: each rank sums its slice into the scratch in
 * rank order (rank 0 + rank 1 + ..., the same order for every element
 * whatever the slicing), and after the second meeting every rank copies the
 * whole sum out: every element is computed once, so all ranks get the same
 * bits, and the work and memory traffic are spread over the ranks.
 *
 * Abort: the flag is checked at every meeting and wakes every waiter. A
 * rank that fails may return only when no rank is still in a data phase
 * (which reads its buffer), else a caller could free memory another rank
 * is reading; that wait is bounded, since a rank in a data phase is only
 * copying or summing on its way to the next meeting.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/comm_internal.h"

enum cpu_op { OP_ALLREDUCE = 1, OP_ALLGATHER, OP_BROADCAST, OP_BARRIER };

static const char *op_name(int op)
{
    switch (op) {
    case OP_ALLREDUCE:
        return "allreduce_f32";
    case OP_ALLGATHER:
        return "allgather_f32";
    case OP_BROADCAST:
        return "broadcast";
    case OP_BARRIER:
        return "barrier";
    }
    return "?";
}

/* What a rank brings to the current collective. Written by its rank before
 * the first meeting; read by the others until the second. */
struct cpu_post {
    int op;
    int64_t n;       /* elements per rank: allreduce, allgather */
    size_t bytes;    /* broadcast */
    int root;        /* broadcast */
    const void *src; /* allreduce: buf; allgather: send; broadcast: buf */
    void *dst;       /* allgather: recv */
};

struct cpu_rank {
    struct comm base; /* first: the handle callers see */
    struct comm_group *g;
};

struct comm_group {
    int size;
    struct cpu_rank *ranks; /* (size) */
    struct cpu_post *posts; /* (size) */

    pthread_mutex_t mu; /* guards everything below */
    pthread_cond_t cv;
    int arrived;  /* ranks waiting at the current meeting */
    uint64_t gen; /* meetings completed */
    int in_data;  /* ranks between a first meeting and their second */
    int aborted;
    char why[COMM_WHY_LEN];
    /* The current collective, as its first meeting's last arrival found it. */
    int call_ok;
    char call_err[COMM_ERR_LEN];
    /* Grow-only: (scratch_cap) f32, the all-reduce's sums. Written in data
     * phases, grown only at a first meeting, when no rank is using it. */
    float *scratch;
    int64_t scratch_cap;
};

/* ---- Meetings --------------------------------------------------------- */

static int needs_data_phase(int op, int size)
{
    return op != OP_BARRIER && size > 1;
}

/* The first meeting's last arrival, mu held: do the posts describe one
 * collective? Every rank reads the same verdict, so every rank fails or
 * none does and the group stays in step. */
static void check_call(struct comm_group *g)
{
    const struct cpu_post *p0 = &g->posts[0];
    g->call_ok = 0;
    for (int r = 1; r < g->size; r++) {
        const struct cpu_post *p = &g->posts[r];
        if (p->op != p0->op || p->n != p0->n || p->bytes != p0->bytes || p->root != p0->root) {
            snprintf(g->call_err, sizeof(g->call_err),
                     "collective mismatch: rank 0 called %s(n=%lld, bytes=%zu, root=%d), "
                     "rank %d called %s(n=%lld, bytes=%zu, root=%d)",
                     op_name(p0->op), (long long)p0->n, p0->bytes, p0->root, r, op_name(p->op),
                     (long long)p->n, p->bytes, p->root);
            return;
        }
    }
    if (p0->n < 0 || p0->n > (int64_t)(SIZE_MAX / sizeof(float)) / g->size) {
        snprintf(g->call_err, sizeof(g->call_err), "%s: bad element count %lld", op_name(p0->op),
                 (long long)p0->n);
        return;
    }
    if (p0->op == OP_BROADCAST && (p0->root < 0 || p0->root >= g->size)) {
        snprintf(g->call_err, sizeof(g->call_err), "broadcast: root %d not in [0, %d)", p0->root,
                 g->size);
        return;
    }
    int has_data = p0->n > 0 || p0->bytes > 0;
    for (int r = 0; has_data && r < g->size; r++) {
        const struct cpu_post *p = &g->posts[r];
        if (!p->src || (p0->op == OP_ALLGATHER && !p->dst)) {
            snprintf(g->call_err, sizeof(g->call_err), "%s: rank %d passed a NULL buffer",
                     op_name(p0->op), r);
            return;
        }
    }
    if (p0->op == OP_ALLREDUCE && g->size > 1 && p0->n > g->scratch_cap) {
        float *s = malloc((size_t)p0->n * sizeof(float));
        if (!s) {
            snprintf(g->call_err, sizeof(g->call_err),
                     "allreduce_f32: out of memory for %lld floats of scratch", (long long)p0->n);
            return;
        }
        free(g->scratch);
        g->scratch = s;
        g->scratch_cap = p0->n;
    }
    g->call_ok = 1;
}

/* Fails the caller's call with the abort's message, once no rank is in a
 * data phase any more. mu held. */
static int fail_aborted(struct cpu_rank *r)
{
    struct comm_group *g = r->g;
    while (g->in_data > 0)
        pthread_cond_wait(&g->cv, &g->mu);
    comm_fail(&r->base, "aborted: %s", g->why);
    pthread_mutex_unlock(&g->mu);
    return -1;
}

/* Waits, mu held, until the meeting of generation gen completes (0) or the
 * group is aborted first (-1, mu still held). */
static int await_gen(struct comm_group *g, uint64_t gen)
{
    while (g->gen == gen && !g->aborted)
        pthread_cond_wait(&g->cv, &g->mu);
    /* Completed, even if an abort followed: the meeting happened, and the
     * next one reports the abort. */
    return g->gen == gen ? -1 : 0;
}

/* The first meeting of a collective: the caller has filled its post. On 0
 * the call is valid, every rank got past, and, when the op has one, the
 * data phase has begun. */
static int meet_open(struct cpu_rank *r)
{
    struct comm_group *g = r->g;
    pthread_mutex_lock(&g->mu);
    if (g->aborted)
        return fail_aborted(r);
    uint64_t gen = g->gen;
    if (++g->arrived == g->size) {
        g->arrived = 0;
        check_call(g);
        g->in_data = g->call_ok && needs_data_phase(g->posts[0].op, g->size) ? g->size : 0;
        g->gen++;
        pthread_cond_broadcast(&g->cv);
    } else if (await_gen(g, gen) != 0) {
        return fail_aborted(r);
    }
    if (!g->call_ok) {
        comm_fail(&r->base, "%s", g->call_err);
        pthread_mutex_unlock(&g->mu);
        return -1;
    }
    pthread_mutex_unlock(&g->mu);
    return 0;
}

/* The second meeting: the caller's data phase is over. On 0 no rank reads
 * another's buffer any more. */
static int meet_close(struct cpu_rank *r)
{
    struct comm_group *g = r->g;
    pthread_mutex_lock(&g->mu);
    g->in_data--;
    if (g->aborted) {
        if (g->in_data == 0)
            pthread_cond_broadcast(&g->cv); /* ranks waiting in fail_aborted */
        return fail_aborted(r);
    }
    uint64_t gen = g->gen;
    if (++g->arrived == g->size) {
        g->arrived = 0;
        g->gen++;
        pthread_cond_broadcast(&g->cv);
    } else if (await_gen(g, gen) != 0) {
        return fail_aborted(r);
    }
    pthread_mutex_unlock(&g->mu);
    return 0;
}

/* ---- Collectives ------------------------------------------------------ */

static struct cpu_post *post(struct cpu_rank *r, int op)
{
    struct cpu_post *p = &r->g->posts[r->base.rank];
    memset(p, 0, sizeof(*p));
    p->op = op;
    return p;
}

/* Elements per all-reduce slice: a multiple of 16 floats (a cache line),
 * so no two ranks write the same line of the scratch. */
#define SLICE_ALIGN 16
/* Elements summed at a time: the slice's destination block stays in L1
 * while each rank's source is added to it. */
#define SUM_BLOCK 2048

/* dst[i] = src_0[i] + src_1[i] + ... + src_{size-1}[i] for i in [lo, hi),
 * added left to right: the one order every element of every call gets. */
static void sum_slice(float *dst, const struct cpu_post *posts, int size, int64_t lo, int64_t hi)
{
    for (int64_t b = lo; b < hi; b += SUM_BLOCK) {
        int64_t e = hi - b < SUM_BLOCK ? hi : b + SUM_BLOCK;
        memcpy(dst + b, (const float *)posts[0].src + b, (size_t)(e - b) * sizeof(float));
        for (int r = 1; r < size; r++) {
            const float *s = posts[r].src;
            for (int64_t i = b; i < e; i++)
                dst[i] += s[i];
        }
    }
}

static int cpu_allreduce_f32(struct comm *c, float *buf, int64_t n)
{
    struct cpu_rank *r = (struct cpu_rank *)c;
    struct comm_group *g = r->g;
    struct cpu_post *p = post(r, OP_ALLREDUCE);
    p->n = n;
    p->src = buf;
    if (meet_open(r) != 0)
        return -1;
    if (!needs_data_phase(OP_ALLREDUCE, g->size))
        return 0; /* one rank: the sum is its own buffer */
    int64_t chunk = (n + g->size - 1) / g->size;
    chunk = (chunk + SLICE_ALIGN - 1) / SLICE_ALIGN * SLICE_ALIGN;
    int64_t lo = (int64_t)c->rank * chunk;
    int64_t hi = lo + chunk;
    lo = lo < n ? lo : n;
    hi = hi < n ? hi : n;
    sum_slice(g->scratch, g->posts, g->size, lo, hi);
    if (meet_close(r) != 0)
        return -1;
    /* The scratch stays put until every rank reaches the next first
     * meeting, so this copy needs no third one. */
    if (n > 0)
        memcpy(buf, g->scratch, (size_t)n * sizeof(float));
    return 0;
}

static int cpu_allgather_f32(struct comm *c, const float *send, int64_t n_per_rank, float *recv)
{
    struct cpu_rank *r = (struct cpu_rank *)c;
    struct comm_group *g = r->g;
    struct cpu_post *p = post(r, OP_ALLGATHER);
    p->n = n_per_rank;
    p->src = send;
    p->dst = recv;
    if (meet_open(r) != 0)
        return -1;
    size_t bytes = (size_t)n_per_rank * sizeof(float);
    for (int s = 0; s < g->size && bytes > 0; s++) {
        const float *src = g->posts[s].src;
        float *dst = recv + (int64_t)s * n_per_rank;
        if (src != dst) /* in place: this rank's part is already there */
            memcpy(dst, src, bytes);
    }
    if (!needs_data_phase(OP_ALLGATHER, g->size))
        return 0; /* one rank read only its own buffer */
    return meet_close(r);
}

static int cpu_broadcast(struct comm *c, void *buf, size_t bytes, int root)
{
    struct cpu_rank *r = (struct cpu_rank *)c;
    struct comm_group *g = r->g;
    struct cpu_post *p = post(r, OP_BROADCAST);
    p->bytes = bytes;
    p->root = root;
    p->src = buf;
    if (meet_open(r) != 0)
        return -1;
    if (!needs_data_phase(OP_BROADCAST, g->size))
        return 0;
    if (c->rank != root && bytes > 0)
        memcpy(buf, g->posts[root].src, bytes);
    return meet_close(r);
}

static int cpu_barrier(struct comm *c)
{
    struct cpu_rank *r = (struct cpu_rank *)c;
    post(r, OP_BARRIER);
    return meet_open(r);
}

/* Every CPU collective has finished when it returns; only an abort is news. */
static int cpu_sync(struct comm *c)
{
    struct cpu_rank *r = (struct cpu_rank *)c;
    struct comm_group *g = r->g;
    pthread_mutex_lock(&g->mu);
    if (g->aborted)
        return fail_aborted(r);
    pthread_mutex_unlock(&g->mu);
    return 0;
}

static void cpu_abort(struct comm *c, const char *why)
{
    comm_group_abort(((struct cpu_rank *)c)->g, why);
}

static void cpu_destroy(struct comm *c)
{
    (void)c; /* the group owns its ranks */
}

static const struct comm_ops cpu_ops = {
    .allreduce_f32 = cpu_allreduce_f32,
    .allgather_f32 = cpu_allgather_f32,
    .broadcast = cpu_broadcast,
    .barrier = cpu_barrier,
    .sync = cpu_sync,
    .abort = cpu_abort,
    .destroy = cpu_destroy,
};

/* ---- The group -------------------------------------------------------- */

struct comm_group *comm_cpu_create(int size)
{
    if (size < 1)
        return NULL;
    struct comm_group *g = calloc(1, sizeof(*g));
    if (!g)
        return NULL;
    g->size = size;
    g->ranks = calloc((size_t)size, sizeof(*g->ranks));
    g->posts = calloc((size_t)size, sizeof(*g->posts));
    if (!g->ranks || !g->posts)
        goto fail;
    if (pthread_mutex_init(&g->mu, NULL) != 0)
        goto fail;
    if (pthread_cond_init(&g->cv, NULL) != 0) {
        pthread_mutex_destroy(&g->mu);
        goto fail;
    }
    for (int i = 0; i < size; i++) {
        g->ranks[i].base.ops = &cpu_ops;
        g->ranks[i].base.rank = i;
        g->ranks[i].base.size = size;
        g->ranks[i].g = g;
    }
    return g;
fail:
    free(g->posts);
    free(g->ranks);
    free(g);
    return NULL;
}

struct comm *comm_cpu_rank(struct comm_group *g, int rank)
{
    if (rank < 0 || rank >= g->size)
        return NULL;
    return &g->ranks[rank].base;
}

void comm_group_abort(struct comm_group *g, const char *why)
{
    pthread_mutex_lock(&g->mu);
    if (!g->aborted) {
        snprintf(g->why, sizeof(g->why), "%s", why ? why : "(no reason given)");
        g->aborted = 1;
    }
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

void comm_group_destroy(struct comm_group *g)
{
    if (!g)
        return;
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    free(g->scratch);
    free(g->posts);
    free(g->ranks);
    free(g);
}
