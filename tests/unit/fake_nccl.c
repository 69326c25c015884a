/* fake_nccl.c: a test double of comm_nccl_unique_id / comm_nccl_create for
 * tests/unit/test_model_cuda.c, over the CPU communicator (comm_cpu) and
 * the kcuda.h double (fake_kcuda.c), whose "device" memory is host memory.
 * Never linked into the product.
 *
 * As with NCCL, a collective is enqueued on the rank's stream: it runs when
 * the double runs that stream's work (at once, or when a captured graph
 * replays), so a graph holds its collectives. The ranks meet in comm_cpu,
 * which blocks until every rank has joined, as NCCL's kernels do. A
 * collective that fails (an abort) marks the rank's stream failed, which
 * comm_sync and comm_wait_event report, as NCCL's asynchronous error is.
 *
 * With fake_nccl_ranks_per_node set, the ranks are in several processes
 * (a test forks its nodes), that many each: the id names a loopback port
 * and the ranks meet through comm_tcp there instead. */
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "engine/comm_internal.h"
#include "tests/unit/fake_kcuda.h"

int fake_nccl_ranks_per_node;

struct fake_group {
    unsigned char id[COMM_NCCL_ID_BYTES];
    struct comm_group *cpu;
    struct comm_tcp_group *tcp;
    int refs;
    struct fake_group *next;
};

struct fake_rank {
    struct comm base;
    struct fake_group *g;
    struct comm *cpu;
};

static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static struct fake_group *groups;
static unsigned long long next_id;

int comm_nccl_unique_id(void *out, char *err, size_t errlen)
{
    pthread_mutex_lock(&reg_mu);
    unsigned long long id = ++next_id;
    pthread_mutex_unlock(&reg_mu);
    memset(out, 0, COMM_NCCL_ID_BYTES);
    memcpy(out, &id, sizeof(id));
    if (fake_nccl_ranks_per_node > 0) { /* a free loopback port for comm_tcp */
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof(a);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) ||
            getsockname(fd, (struct sockaddr *)&a, &len)) {
            if (fd >= 0)
                close(fd);
            snprintf(err, errlen, "fake NCCL: no free port");
            return -1;
        }
        close(fd);
        uint16_t port = ntohs(a.sin_port);
        memcpy((char *)out + 8, &port, sizeof(port));
    }
    return 0;
}

/* ---- collectives, run in stream order ---------------------------------- */

static int do_allreduce_f32(const struct fake_host_call *h)
{
    return comm_allreduce_f32(h->p[0], h->p[1], h->a[0]);
}

static int do_allreduce_bf16(const struct fake_host_call *h)
{
    return comm_allreduce_bf16(h->p[0], h->p[1], h->a[0]);
}

static int do_allgather(const struct fake_host_call *h)
{
    return comm_allgather_f32(h->p[0], h->p[1], h->a[0], h->p[2]);
}

static int do_broadcast(const struct fake_host_call *h)
{
    return comm_broadcast(h->p[0], h->p[1], (size_t)h->a[0], (int)h->a[1]);
}

static int enqueue(struct comm *c, int (*fn)(const struct fake_host_call *), void *p1, void *p2,
                   int64_t a0, int64_t a1)
{
    struct fake_rank *r = (struct fake_rank *)c;
    struct fake_host_call h = {.fn = fn, .p = {r->cpu, p1, p2}, .a = {a0, a1}};
    if (fake_kc_enqueue(&h) != 0)
        return comm_fail(c, "fake NCCL: cannot enqueue");
    return 0;
}

static int f_allreduce_f32(struct comm *c, float *buf, int64_t n)
{
    return enqueue(c, do_allreduce_f32, buf, NULL, n, 0);
}

static int f_allreduce_bf16(struct comm *c, uint16_t *buf, int64_t n)
{
    return enqueue(c, do_allreduce_bf16, buf, NULL, n, 0);
}

static int f_allgather(struct comm *c, const float *send, int64_t n, float *recv)
{
    return enqueue(c, do_allgather, (void *)send, recv, n, 0);
}

static int f_broadcast(struct comm *c, void *buf, size_t bytes, int root)
{
    return enqueue(c, do_broadcast, buf, NULL, (int64_t)bytes, root);
}

/* The stream's work has all run; a collective of it that failed is news. */
static int f_sync(struct comm *c)
{
    struct fake_rank *r = (struct fake_rank *)c;
    if (fake_kc_stream_error() != 0 || comm_sync(r->cpu) != 0)
        return comm_fail(c, "fake NCCL: %s", comm_error(r->cpu)[0] ? comm_error(r->cpu)
                                                                  : "a collective failed");
    return 0;
}

static int f_wait_event(struct comm *c, void *event)
{
    (void)event;
    return f_sync(c);
}

static int f_barrier(struct comm *c)
{
    struct fake_rank *r = (struct fake_rank *)c;
    if (comm_barrier(r->cpu) != 0)
        return comm_fail(c, "%s", comm_error(r->cpu));
    return 0;
}

static void f_abort(struct comm *c, const char *why)
{
    comm_abort(((struct fake_rank *)c)->cpu, why);
}

static void f_destroy(struct comm *c)
{
    struct fake_rank *r = (struct fake_rank *)c;
    pthread_mutex_lock(&reg_mu);
    if (--r->g->refs == 0) {
        struct fake_group **pp = &groups;
        while (*pp != r->g)
            pp = &(*pp)->next;
        *pp = r->g->next;
        comm_group_destroy(r->g->cpu);
        comm_tcp_destroy(r->g->tcp);
        free(r->g);
    }
    pthread_mutex_unlock(&reg_mu);
    free(r);
}

static const struct comm_ops fake_ops = {
    .allreduce_f32 = f_allreduce_f32,
    .allreduce_bf16 = f_allreduce_bf16,
    .allgather_f32 = f_allgather,
    .broadcast = f_broadcast,
    .barrier = f_barrier,
    .sync = f_sync,
    .wait_event = f_wait_event,
    .abort = f_abort,
    .destroy = f_destroy,
};

struct comm *comm_nccl_create(int rank, int size, const void *unique_id, void *stream,
                              int timeout_ms, char *err, size_t errlen)
{
    (void)stream, (void)timeout_ms;
    if (errlen)
        err[0] = 0;
    if (size < 1 || rank < 0 || rank >= size || !unique_id) {
        snprintf(err, errlen, "fake NCCL: rank %d of %d", rank, size);
        return NULL;
    }
    struct fake_rank *r = calloc(1, sizeof(*r));
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_lock(&reg_mu);
    struct fake_group *g = groups;
    while (g && memcmp(g->id, unique_id, COMM_NCCL_ID_BYTES) != 0)
        g = g->next;
    int local = fake_nccl_ranks_per_node > 0 ? fake_nccl_ranks_per_node : size;
    if (!g && (g = calloc(1, sizeof(*g))) != NULL) {
        memcpy(g->id, unique_id, COMM_NCCL_ID_BYTES);
        uint16_t port;
        memcpy(&port, (const char *)unique_id + 8, sizeof(port));
        if (local < size) /* this process's ranks meet the others' over TCP */
            g->tcp = comm_tcp_create(size / local, rank / local, local, "127.0.0.1", port,
                                     60000, err, errlen);
        else
            g->cpu = comm_cpu_create(size);
        if (!g->cpu && !g->tcp) {
            free(g);
            g = NULL;
        } else {
            g->next = groups;
            groups = g;
        }
    }
    if (g)
        g->refs++;
    pthread_mutex_unlock(&reg_mu);
    if (!g) {
        free(r);
        if (!err[0])
            snprintf(err, errlen, "out of memory");
        return NULL;
    }
    r->base.ops = &fake_ops;
    r->base.rank = rank;
    r->base.size = size;
    r->g = g;
    r->cpu = g->tcp ? comm_tcp_rank(g->tcp, rank % local) : comm_cpu_rank(g->cpu, rank);
    return &r->base;
}
