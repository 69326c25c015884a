/* engine.h: the continuous-batching engine, the public API of engine/.
 *
 * An engine owns a loaded model, its paged KV cache (with the prefix
 * cache) and one engine thread. Callers on any thread submit requests
 * (prompt token ids, sampling parameters, limits) and read each request's
 * events from its own queue; the engine thread packs every live request
 * into each model step (decode rows first, then chunks of prefill), samples
 * one token per finished row and posts the events. Submit and cancel only
 * take a short lock: they never wait for a model step.
 *
 * Events of one request, in order: for each sample i (0 <= i < n), its
 * TOKEN events then exactly one FINISH; after every sample has finished,
 * exactly one DONE with the usage. DONE is always the last event.
 *
 * Results do not depend on the batch: on the CPU a request's logits are
 * the same bits alone or with any other requests, with or without prefix
 * cache hits, and across preemption and recompute; with the same seed the
 * sampled tokens are too.
 */
#ifndef INFERD_ENGINE_H
#define INFERD_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "engine/model.h"
#include "engine/sampler.h"

#define ENGINE_MAX_N 128           /* samples per request */
#define ENGINE_MAX_STOP_TOKENS 64  /* stop_token_ids per request */
#define ENGINE_HIST_BUCKETS 16

/* The KV cache when --kv-cache-memory is not given: half of the memory
 * available (MemAvailable, less the mmapped weights, which must stay
 * resident) once the model is loaded, at most this cap. The slab is
 * mapped lazily: pages cost memory only once sequences write them. */
#define ENGINE_KV_DEFAULT_CAP_BYTES (4LL << 30)

struct engine_opts {
    /* KV cache budget in bytes; 0: the default above. */
    int64_t kv_cache_bytes;
    /* Most sequences (samples) resident at once; 0: 64. */
    int max_seqs;
    /* Most token rows in one model step (decode rows and prefill chunks
     * together); 0: 256. Raised to max_seqs when below it, so every running
     * sequence can decode in every step. */
    int64_t max_batched_tokens;
    /* Most requests waiting for admission; a submit beyond it fails with
     * ENGINE_EFULL (the API answers 503 with Retry-After). 0: 1024. */
    int max_queue;
    /* Longest prompt + completion; 0: the model's context length. Lowered
     * to what the KV cache holds, so that any one request can always run. */
    int64_t max_model_len;
    /* On a GPU, with kv_cache_bytes 0: the fraction of its memory inferd
     * may fill, weights, step buffers and KV cache together (vLLM's
     * --gpu-memory-utilization); 0: 0.9. */
    double gpu_memory_utilization;
    /* Async scheduling: while the device runs a decode step, the next one
     * is launched with the tokens still on the device, and only then are
     * the first one's tokens taken (a request that stops there wastes one
     * row). 0: on when the model runs on a GPU (model_async), 1: on (the
     * CPU too, which gains nothing but runs the same bookkeeping: tests),
     * -1: off. Steps with prefill rows, penalties, forks or waiting
     * requests always run one at a time. */
    int async_scheduling;
    /* Called on the engine thread at most once per step, after that step's
     * events are posted, when there were any (an event loop's wakeup). */
    void (*wake)(void *arg);
    void *wake_arg;
};

struct engine;
struct engine_req;

/* Creates an engine over model m (borrowed: the caller keeps it loaded
 * until engine_destroy) and starts its thread. Returns NULL with the
 * reason in err (KV budget too small for one block, out of memory, thread
 * creation). Caller owns the result. */
struct engine *engine_create(struct model *m, const struct engine_opts *opts,
                             char *err, size_t errlen);
/* Stops the thread and finishes every live request (FINISH cancelled, then
 * DONE), then frees the engine. Requests not yet released stay readable
 * until engine_release. Accepts NULL. */
void engine_destroy(struct engine *e);

/* The effective limits after defaults and clamping. */
struct engine_limits {
    int64_t kv_blocks;          /* KV_BLOCK_TOKENS tokens each */
    int64_t kv_tokens;
    int64_t kv_bytes;
    int max_seqs;
    int64_t max_batched_tokens;
    int max_queue;
    int64_t max_model_len;
};
void engine_get_limits(const struct engine *e, struct engine_limits *out);

struct engine_params {
    /* (n_prompt) token ids, copied by engine_submit. */
    const int32_t *prompt;
    int64_t n_prompt;
    /* Sampling; validated and copied (logit_bias too). Sample i > 0 of a
     * request draws from its own RNG seeded from (seed, i). */
    struct samp_params samp;
    int64_t max_tokens; /* >= 1; prompt + max_tokens <= max_model_len */
    int n;              /* samples of this prompt, [1, ENGINE_MAX_N]; 0 = 1 */
    /* Lower runs first; equal priorities are served in arrival order. The
     * preemption victim is the highest value, latest arrival. */
    int priority;
    int ignore_eos;     /* nonzero: the model's EOS token does not stop */
    /* Tokens that finish a sample with reason stop (besides EOS); copied. */
    const int32_t *stop_token_ids;
    int n_stop_token_ids;
    /* Optional: called on the engine thread after events for this request
     * were posted in a step (at most once per step), with the request's
     * lock held: it must not block nor call any engine function (append to
     * a queue and wake a loop). Never called once engine_release returned,
     * so notify_arg need only live as long as the handle. */
    void (*notify)(void *arg);
    void *notify_arg;
};

enum engine_event_kind {
    ENGINE_EV_TOKEN,  /* a generated token of sample `index` */
    ENGINE_EV_FINISH, /* sample `index` ended */
    ENGINE_EV_DONE,   /* every sample ended; usage; the last event */
};

enum engine_finish {
    ENGINE_FINISH_STOP,      /* EOS or a stop token (stop_token) */
    ENGINE_FINISH_LENGTH,    /* max_tokens reached */
    ENGINE_FINISH_CANCELLED, /* engine_cancel, engine_release or destroy */
    ENGINE_FINISH_ERROR,     /* this request failed; message says why */
};

struct engine_event {
    enum engine_event_kind kind;
    int index; /* sample, for TOKEN and FINISH */
    /* TOKEN: the token and, when asked, its logprobs. */
    struct samp_result tok;
    /* FINISH */
    enum engine_finish finish;
    int32_t stop_token;    /* the token that stopped it (counted in usage,
                            * not sent as a TOKEN), or -1 */
    char message[128];     /* ERROR: the reason */
    /* DONE: usage over all samples. */
    int64_t prompt_tokens;     /* the prompt, counted once */
    int64_t completion_tokens; /* generated tokens, stop tokens included */
    int64_t cached_tokens;     /* prompt tokens the first admission reused */
};

enum {
    ENGINE_OK = 0,
    ENGINE_EINVAL = -1,   /* a parameter is wrong; err says which */
    ENGINE_EFULL = -2,    /* the waiting queue is full: retry later */
    ENGINE_ESHUTDOWN = -3 /* the engine is stopping */
};

/* Validates p and queues the request. Returns ENGINE_OK with *out set (a
 * handle owned by the caller: engine_release it exactly once), or one of
 * the codes above with a message for the client in err. Any thread. */
int engine_submit(struct engine *e, const struct engine_params *p, struct engine_req **out,
                  char *err, size_t errlen);

/* Moves up to max pending events of r into ev; returns how many (0 when
 * none are pending). Never blocks. Any thread. */
int engine_poll(struct engine_req *r, struct engine_event *ev, int max);
/* As engine_poll, but waits up to timeout_ms (< 0: forever) for at least
 * one event. Returns 0 on timeout. */
int engine_wait(struct engine_req *r, struct engine_event *ev, int max, int timeout_ms);

/* Asks the engine to stop r: its unfinished samples finish with reason
 * cancelled and its KV blocks are freed within one step, wherever it is
 * (waiting, prefilling, decoding, preempted). Harmless when repeated or
 * after DONE. Any thread. */
void engine_cancel(struct engine_req *r);
/* Gives up the caller's handle: cancels r if it is still live, and frees
 * it once the engine is done with it too. r is invalid afterwards. */
void engine_release(struct engine_req *r);
/* A number unique within the engine, in submit order. */
uint64_t engine_req_id(const struct engine_req *r);

/* A Prometheus-style histogram: counts[i] observations <= bounds[i]
 * (not cumulative), counts[n_bounds] the rest. */
struct engine_hist {
    int n_bounds;
    double bounds[ENGINE_HIST_BUCKETS];
    uint64_t counts[ENGINE_HIST_BUCKETS + 1];
    double sum;
    uint64_t count;
};

struct engine_stats {
    /* Gauges, as of the end of the last step. */
    int running;      /* requests with a sample resident in the KV cache */
    int waiting;      /* requests queued, including preempted ones */
    int64_t kv_blocks_total, kv_blocks_used, kv_blocks_free, kv_blocks_cached;
    /* Counters since engine_create. */
    int64_t requests_submitted, requests_rejected; /* rejected: queue full */
    int64_t requests_finished, requests_cancelled, requests_failed;
    int64_t preemptions;
    int64_t steps;
    int64_t steps_ahead;            /* launched before the last step's tokens
                                     * reached the host (async scheduling) */
    int64_t prompt_tokens_computed; /* prefill rows run (recompute included) */
    int64_t generation_tokens;      /* tokens sampled */
    int64_t prefix_query_tokens, prefix_hit_tokens; /* prefix cache */
    /* Seconds, except tokens_per_step. */
    struct engine_hist step_time, tokens_per_step, ttft, itl, queue_time, e2e;
};
/* A consistent snapshot. Any thread. */
void engine_get_stats(struct engine *e, struct engine_stats *out);

#endif
