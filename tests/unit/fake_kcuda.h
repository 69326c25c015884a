/* fake_kcuda.h: what the kcuda.h test double (fake_kcuda.c) counts and
 * checks, for tests/unit/test_model_cuda.c. */
#ifndef INFERD_FAKE_KCUDA_H
#define INFERD_FAKE_KCUDA_H

#include <stdint.h>

struct fake_kc_stats {
    /* set by the test */
    int64_t kv_slots;            /* blocks * 16 of the bound cache */
    int64_t mem_free, mem_total; /* what kc_mem_info reports (every device) */
    int devices;                 /* kc_device_count (0: one) */
    /* Nonzero: GEMMs, RMSNorm, bias and SiLU compute (f32 sums of bf16
     * values, rounded once) instead of keeping each row's identity, so
     * that tensor-parallel shards can be checked against one device. */
    int real_math;
    int fail_device;             /* k > 0: kc_gemm fails on device k - 1 */
    /* counted by the double */
    int64_t mallocs;         /* device and pinned allocations */
    int64_t launches;        /* launches run eagerly */
    int64_t captures;        /* graphs captured */
    int64_t graph_launches;  /* graphs replayed */
    int64_t decode_calls, prefill_calls, sample_rows;
    int64_t resolved;        /* placeholder ids replaced by kc_resolve_tokens */
    int64_t violations;      /* broken invariants (see fake_kcuda.c) */
    char first_violation[160];
};

extern struct fake_kc_stats fake_kc;

/* A call on the host that runs in stream order: now, or when the graph
 * being captured on this thread replays (the fake NCCL's collectives).
 * A nonzero return is the stream's error (fake_kc_stream_error). */
struct fake_host_call {
    int (*fn)(const struct fake_host_call *c);
    void *p[3];
    int64_t a[3];
};
int fake_kc_enqueue(const struct fake_host_call *call);
/* The first failed host call's error on this thread's streams, or 0. */
int fake_kc_stream_error(void);
/* This thread's current device (kc_set_device). */
int fake_kc_device(void);

/* fake_nccl.c: > 0: the ranks are in several processes, that many each,
 * meeting through comm_tcp on loopback; 0: all in this one (comm_cpu). */
extern int fake_nccl_ranks_per_node;

#endif
