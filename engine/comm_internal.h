/* comm_internal.h: what the communicator's implementations share and its
 * callers do not see: the operation table behind struct comm, and the
 * error setter. Included by comm.c, comm_cpu.c and comm_nccl.c only.
 */
#ifndef INFERD_COMM_INTERNAL_H
#define INFERD_COMM_INTERNAL_H

#include "engine/comm.h"

#define COMM_ERR_LEN 256
/* An abort's reason: shorter than COMM_ERR_LEN, so "aborted: <why>" fits. */
#define COMM_WHY_LEN 192

/* One implementation. The wrappers in comm.c check nothing the
 * implementation must not see itself (argument checks are collective:
 * every rank must fail the same call, see comm_cpu.c). */
struct comm_ops {
    int (*allreduce_f32)(struct comm *c, float *buf, int64_t n);
    /* NULL: comm.c widens to f32 and calls allreduce_f32 (host buffers) */
    int (*allreduce_bf16)(struct comm *c, uint16_t *buf, int64_t n);
    int (*allgather_f32)(struct comm *c, const float *send, int64_t n_per_rank, float *recv);
    int (*broadcast)(struct comm *c, void *buf, size_t bytes, int root);
    int (*barrier)(struct comm *c);
    int (*sync)(struct comm *c);
    /* NULL: no stream (host collectives), so sync says it all */
    int (*wait_event)(struct comm *c, void *event);
    void (*abort)(struct comm *c, const char *why); /* any thread */
    void (*destroy)(struct comm *c);
};

/* The first member of each implementation's handle. */
struct comm {
    const struct comm_ops *ops;
    int rank, size;
    char err[COMM_ERR_LEN]; /* written by the rank's own thread only */
};

/* Formats the reason for the failing call into c->err. Returns -1, so a
 * failure path reads `return comm_fail(c, ...)`. */
int comm_fail(struct comm *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
