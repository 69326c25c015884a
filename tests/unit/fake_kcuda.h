/* fake_kcuda.h: what the kcuda.h test double (fake_kcuda.c) counts and
 * checks, for tests/unit/test_model_cuda.c. */
#ifndef INFERD_FAKE_KCUDA_H
#define INFERD_FAKE_KCUDA_H

#include <stdint.h>

struct fake_kc_stats {
    /* set by the test */
    int64_t kv_slots;            /* blocks * 16 of the bound cache */
    int64_t mem_free, mem_total; /* what kc_mem_info reports */
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

#endif
