/* comm.c: the communicator's interface: dispatch to the implementation
 * behind each handle, the error setter they share, and the all-reduce
 * bandwidth measurement, written once over the interface so the CPU and
 * NCCL figures mean the same thing. Runs on the calling rank's thread.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/comm_internal.h"

int comm_fail(struct comm *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof(c->err), fmt, ap);
    va_end(ap);
    return -1;
}

int comm_rank(const struct comm *c)
{
    return c->rank;
}

int comm_size(const struct comm *c)
{
    return c->size;
}

const char *comm_error(const struct comm *c)
{
    return c->err;
}

int comm_allreduce_f32(struct comm *c, float *buf, int64_t n)
{
    return c->ops->allreduce_f32(c, buf, n);
}

static float bf16_to_f32(uint16_t v)
{
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static uint16_t f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN stays NaN (quiet) */
        return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

int comm_allreduce_bf16(struct comm *c, uint16_t *buf, int64_t n)
{
    if (c->ops->allreduce_bf16)
        return c->ops->allreduce_bf16(c, buf, n);
    if (n < 0)
        return c->ops->allreduce_f32(c, NULL, n); /* fails alike on every rank */
    /* Host buffers: widen, sum as f32, round once. A rank without the
     * memory must not leave the others waiting: it aborts the group. */
    float *w = malloc((size_t)(n ? n : 1) * sizeof(float));
    if (!w) {
        c->ops->abort(c, "out of memory for a bf16 all-reduce");
        return comm_fail(c, "out of memory for a bf16 all-reduce of %lld values", (long long)n);
    }
    for (int64_t i = 0; i < n; i++)
        w[i] = bf16_to_f32(buf[i]);
    int rc = c->ops->allreduce_f32(c, w, n);
    if (rc == 0)
        for (int64_t i = 0; i < n; i++)
            buf[i] = f32_to_bf16(w[i]);
    free(w);
    return rc;
}

int comm_wait_event(struct comm *c, void *event)
{
    if (c->ops->wait_event)
        return c->ops->wait_event(c, event);
    return c->ops->sync(c);
}

int comm_allgather_f32(struct comm *c, const float *send, int64_t n_per_rank, float *recv)
{
    return c->ops->allgather_f32(c, send, n_per_rank, recv);
}

int comm_broadcast(struct comm *c, void *buf, size_t bytes, int root)
{
    return c->ops->broadcast(c, buf, bytes, root);
}

int comm_barrier(struct comm *c)
{
    return c->ops->barrier(c);
}
int comm_sync(struct comm *c)
{
    return c->ops->sync(c);
}

void comm_abort(struct comm *c, const char *why)
{
    c->ops->abort(c, why);
}

void comm_destroy(struct comm *c)
{
    if (c)
        c->ops->destroy(c);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double comm_allreduce_busbw(struct comm *c, void *buf, size_t bytes, int iters)
{
    /* Every rank gets the same arguments, so every rank takes this exit:
     * none is left alone in a collective. */
    if (bytes < sizeof(float) || iters < 1) {
        comm_fail(c, "allreduce_busbw: need bytes >= 4 and iters >= 1 (got %zu, %d)", bytes, iters);
        return -1.0;
    }
    int64_t n = (int64_t)(bytes / sizeof(float));
    /* The warm-up pays for first-call setup (scratch, NCCL connections);
     * the barrier starts every rank's clock together. */
    if (comm_allreduce_f32(c, buf, n) != 0 || comm_barrier(c) != 0)
        return -1.0;
    double t0 = now_s();
    for (int i = 0; i < iters; i++)
        if (comm_allreduce_f32(c, buf, n) != 0)
            return -1.0;
    if (comm_sync(c) != 0)
        return -1.0;
    double per_iter = (now_s() - t0) / iters;
    if (per_iter <= 0)
        per_iter = 1e-9; /* a clock too coarse for one rank: avoid inf */
    double algbw = (double)n * sizeof(float) / per_iter;
    return algbw * 2.0 * (c->size - 1) / c->size;
}

#ifndef INFERD_NCCL
/* Without NCCL the calls exist and say so, so the engine needs no #ifdef. */
static void nccl_absent(char *err, size_t errlen)
{
    if (err && errlen)
        snprintf(err, errlen, "built without NCCL (tensor parallelism across GPUs)");
}

int comm_nccl_unique_id(void *out, char *err, size_t errlen)
{
    (void)out;
    nccl_absent(err, errlen);
    return -1;
}

struct comm *comm_nccl_create(int rank, int size, const void *unique_id, void *stream,
                              int timeout_ms, char *err, size_t errlen)
{
    (void)rank, (void)size, (void)unique_id, (void)stream, (void)timeout_ms;
    nccl_absent(err, errlen);
    return NULL;
}
#endif
