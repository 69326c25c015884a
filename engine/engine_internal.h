/* engine_internal.h: what engine.c (the API, queues and thread) and
 * scheduler.c (one model step: admission, chunked prefill, preemption,
 * sampling) share. Not a public header: nothing outside engine.c and
 * scheduler.c includes it. */
#ifndef INFERD_ENGINE_INTERNAL_H
#define INFERD_ENGINE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>

#include "engine/engine.h"
#include "engine/kv_cache.h"

enum seq_state {
    SEQ_UNBORN,   /* sample i > 0 before its prompt was computed once */
    SEQ_WAITING,  /* in the waiting list, not resident */
    SEQ_RUNNING,  /* resident: holds a KV sequence */
    SEQ_FINISHED,
};

/* One sample of a request: the unit the scheduler runs. */
struct seq {
    struct engine_req *r;
    int index;
    enum seq_state state;
    struct sampler *samp;
    int32_t *tokens;   /* (n_prompt + max_tokens) prompt, then generated */
    int64_t n_tokens;  /* prompt + generated so far */
    int64_t n_gen;
    int kv;            /* KV sequence id while RUNNING, else -1 */
    int64_t computed;  /* positions whose K/V are stored (RUNNING) */
    int64_t admitted;  /* admission counter value: newest is largest */
    double t_last;     /* time of the last sampled token (ITL) */
    /* This step. */
    int sched;         /* scheduled rows: positions [computed, computed + sched) */
};

struct engine_req {
    struct engine *e; /* NULL once the engine let go (DONE posted) */
    uint64_t id;
    pthread_mutex_t mu; /* guards refs, e, the event queue, cancel */
    pthread_cond_t cv;
    int refs;           /* caller + engine */
    int released;       /* the caller gave up its handle: no more notify */
    atomic_int cancel;
    /* Event queue (ring). */
    struct engine_event *q; /* (q_cap) */
    size_t q_head, q_len, q_cap;
    int q_lost;         /* an event was lost to out of memory */

    /* Immutable after submit. */
    int64_t n_prompt, max_tokens;
    int n, priority, ignore_eos;
    int32_t stop_ids[ENGINE_MAX_STOP_TOKENS];
    int n_stop;
    int rope_long;
    void (*notify)(void *);
    void *notify_arg;
    double t_submit;

    /* Engine thread only. */
    struct seq *seqs;   /* (n) */
    int n_finished;
    int forked;         /* samples 1..n-1 were born */
    int admitted_once;
    int failed;         /* a sample ended with ERROR */
    int cancelled;      /* a sample ended CANCELLED */
    int dropped;        /* DONE posted; the engine's reference goes after notify */
    int64_t completion_tokens, cached_tokens;
    int touched;        /* events posted this step */
    uint64_t stamp;     /* gauge counting */
    struct engine_req *next; /* inbox link, then the touched list */
};

struct engine {
    struct model *m;
    const struct model_config *cfg;
    struct kv_cache *kv;
    struct engine_limits lim;
    void (*wake)(void *);
    void *wake_arg;
    pthread_t thread;
    int thread_started;

    pthread_mutex_t mu;  /* guards everything down to `stats` */
    pthread_cond_t cv;
    int stop;
    struct engine_req *inbox_head, *inbox_tail;
    int n_inbox;
    int cancel_pending;
    int n_waiting_reqs;  /* published each step, for the queue bound */
    uint64_t next_id;
    int64_t n_submitted, n_rejected;
    struct engine_stats stats;

    /* Engine thread only. */
    struct engine_req **live; /* (n_live) requests the engine holds */
    int n_live, cap_live;
    struct seq **running;     /* admission order */
    int n_running;
    struct seq **waiting;     /* (priority, id, index) order */
    int n_waiting, cap_waiting;
    struct seq **order;       /* (max_seqs) snapshot of running for planning */
    struct seq **sched;       /* this step's scheduled sequences */
    int n_sched;
    struct model_row *rows;   /* (max_batched_tokens) */
    float *logits;            /* (cap_logits, n_vocab) */
    int64_t cap_logits;
    float *logits_copy;       /* (n_vocab) one row for a forked sample */
    struct model_sample *samples; /* (max_seqs) this step's draws */
    int *samp_of;             /* (max_seqs) per scheduled sample: its draw, or -1 */
    /* Async scheduling (scheduler.c): a decode step launched and not yet
     * collected, its samples (fl[i] drew fl_samples[i]) and the requests
     * held for it. */
    int async;
    struct model_sample *ahead_samples[2]; /* (max_seqs) each */
    struct seq **fl, **fl_next;            /* (max_seqs) each */
    struct model_sample *fl_samples;
    int n_fl, fl_buf;
    struct model_row *fl_rows;             /* (max_seqs) the next launch's rows */
    int64_t admit_counter;
    uint64_t stamp;
    struct engine_req *touched;
    struct engine_stats w;    /* working counters and histograms */
};

double engine_now(void);
/* Posts one event to r's queue (engine thread or destroy). */
void engine_post(struct engine *e, struct engine_req *r, const struct engine_event *ev);
/* Ends sample s: FINISH with reason, frees its KV sequence; DONE and the
 * engine's release of r when it was the last. */
void engine_finish_seq(struct engine *e, struct seq *s, enum engine_finish reason,
                       int32_t stop_token, const char *message);
/* Ends every unfinished sample of r with reason (cancel or error). */
void engine_end_request(struct engine *e, struct engine_req *r, enum engine_finish reason,
                        const char *message);
void engine_hist_observe(struct engine_hist *h, double v);
/* Keeps r's memory alive while a launched step refers to its samples
 * (engine thread), and lets it go. */
void engine_req_hold(struct engine_req *r);
void engine_req_unhold(struct engine_req *r);

/* scheduler.c: removes s from the running or waiting list. */
void sched_unlink(struct engine *e, struct seq *s);
/* scheduler.c: inserts s into the waiting list in (priority, id, index) order.
 * Returns -1 when the list cannot grow. */
int sched_wait(struct engine *e, struct seq *s);
/* scheduler.c: plans and runs one model step; returns the rows run (0 when
 * nothing could run). */
int64_t sched_step(struct engine *e);
/* scheduler.c: collects a step still in flight (engine_destroy). */
void sched_drain(struct engine *e);

#endif
