/* engine.c: the engine's public API: creation (KV cache sizing), request
 * submission and validation, per-request event queues, cancellation,
 * statistics, and the engine thread's loop around sched_step. Submit,
 * cancel, poll and stats run on any thread and take only short locks; the
 * loop and everything in scheduler.c run on the engine thread.
 *
 * Locks: e->mu (inbox, flags, published stats) and r->mu (a request's
 * queue, refs, its link to the engine). A thread holding r->mu may take
 * e->mu (engine_cancel); never the other way round. */
#include "engine/engine.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/engine_internal.h"

double engine_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------ histograms */

static void hist_init(struct engine_hist *h, const double *bounds, int n)
{
    memset(h, 0, sizeof(*h));
    h->n_bounds = n;
    memcpy(h->bounds, bounds, (size_t)n * sizeof(double));
}

void engine_hist_observe(struct engine_hist *h, double v)
{
    int i = 0;
    while (i < h->n_bounds && v > h->bounds[i])
        i++;
    h->counts[i]++;
    h->sum += v;
    h->count++;
}

static void stats_init(struct engine_stats *s)
{
    static const double secs[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                  0.5, 1, 2.5, 5, 10, 30, 60, 120};
    static const double lat[] = {0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15,
                                 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10};
    static const double toks[] = {1, 2, 4, 8, 16, 32, 64, 128,
                                  256, 512, 1024, 2048, 4096, 8192, 16384, 32768};
    memset(s, 0, sizeof(*s));
    hist_init(&s->step_time, lat, 16);
    hist_init(&s->tokens_per_step, toks, 16);
    hist_init(&s->ttft, secs, 16);
    hist_init(&s->itl, lat, 16);
    hist_init(&s->queue_time, secs, 16);
    hist_init(&s->e2e, secs, 16);
}

/* ------------------------------------------------------------ KV sizing */

/* MemAvailable from /proc/meminfo in bytes, or -1. */
static int64_t mem_available(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        return -1;
    char line[256];
    long long kb = -1;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "MemAvailable: %lld kB", &kb) == 1)
            break;
    fclose(f);
    return kb < 0 ? -1 : (int64_t)kb * 1024;
}

/* The KV budget on a GPU: what --gpu-memory-utilization of its memory
 * leaves after everything already on it (the weights, cuBLAS, other
 * processes) and what the steps will take (model_step_bytes). */
static int device_budget(struct engine *e, const struct engine_opts *o, int64_t block_bytes,
                         int64_t *budget, char *err, size_t errlen)
{
    double util = o->gpu_memory_utilization > 0 ? o->gpu_memory_utilization : 0.9;
    if (o->gpu_memory_utilization < 0 || util > 1) {
        snprintf(err, errlen, "--gpu-memory-utilization must be in (0, 1], got %g",
                 o->gpu_memory_utilization);
        return -1;
    }
    int64_t fr, tot;
    if (model_device_memory(e->m, &fr, &tot) != 0) {
        snprintf(err, errlen, "cannot read the GPU's free memory");
        return -1;
    }
    int64_t step = model_step_bytes(e->m, e->lim.max_batched_tokens, e->lim.max_seqs);
    int64_t used = tot - fr;
    *budget = (int64_t)((double)tot * util) - used - step;
    if (*budget < block_bytes) {
        snprintf(err, errlen,
                 "GPU memory: %.1f GiB of %.1f GiB is in use (weights and runtime) and steps "
                 "of %lld tokens over %d sequences need %.1f GiB more, which leaves no room "
                 "for the KV cache under --gpu-memory-utilization %.2f; raise it, or lower "
                 "--max-batched-tokens or --max-seqs",
                 (double)used / 1073741824.0, (double)tot / 1073741824.0,
                 (long long)e->lim.max_batched_tokens, e->lim.max_seqs,
                 (double)step / 1073741824.0, util);
        return -1;
    }
    return 0;
}

static int set_limits(struct engine *e, const struct engine_opts *o, char *err, size_t errlen)
{
    struct kv_geom g = model_kv_geom(e->m);
    int64_t block_bytes = kv_bytes_per_token(&g) * KV_BLOCK_TOKENS;
    struct engine_limits *l = &e->lim;
    l->max_seqs = o->max_seqs > 0 ? o->max_seqs : 64;
    if (o->max_seqs < 0 || l->max_seqs > 65536) {
        snprintf(err, errlen, "--max-seqs must be between 1 and 65536, got %d", o->max_seqs);
        return -1;
    }
    l->max_batched_tokens = o->max_batched_tokens > 0 ? o->max_batched_tokens : 256;
    if (o->max_batched_tokens < 0 || l->max_batched_tokens > (1 << 20)) {
        snprintf(err, errlen, "--max-batched-tokens must be between 1 and %d, got %lld",
                 1 << 20, (long long)o->max_batched_tokens);
        return -1;
    }
    if (l->max_batched_tokens < l->max_seqs)
        l->max_batched_tokens = l->max_seqs;
    int64_t budget = o->kv_cache_bytes;
    if (budget < 0) {
        snprintf(err, errlen, "--kv-cache-memory must not be negative");
        return -1;
    }
    if (budget == 0 && model_on_device(e->m)) {
        if (device_budget(e, o, block_bytes, &budget, err, errlen))
            return -1;
    } else if (budget == 0) {
        /* MemAvailable counts the page cache, where the mmapped weights
         * live: take them off, as they must stay resident. */
        struct model_stats ms;
        model_get_stats(e->m, &ms);
        int64_t avail = mem_available();
        int64_t mapped = ms.weight_bytes - ms.repacked_bytes;
        budget = ENGINE_KV_DEFAULT_CAP_BYTES;
        if (avail > 0) {
            int64_t left = avail - (mapped > 0 ? mapped : 0);
            if (left / 2 < budget)
                budget = left / 2;
            if (budget < block_bytes)
                budget = block_bytes;
        }
    }
    int64_t n_blocks = budget / block_bytes;
    if (n_blocks > INT32_MAX / 2)
        n_blocks = INT32_MAX / 2;
    if (n_blocks < 1) {
        snprintf(err, errlen,
                 "KV cache budget of %lld bytes is less than one block of %d tokens "
                 "(%lld bytes for this model)",
                 (long long)budget, KV_BLOCK_TOKENS, (long long)block_bytes);
        return -1;
    }
    l->kv_blocks = n_blocks;
    l->kv_tokens = n_blocks * KV_BLOCK_TOKENS;
    l->kv_bytes = n_blocks * block_bytes;
    l->max_queue = o->max_queue > 0 ? o->max_queue : 1024;
    if (o->max_queue < 0) {
        snprintf(err, errlen, "--max-queue must be positive, got %d", o->max_queue);
        return -1;
    }
    int64_t ctx = e->cfg->n_ctx > 0 ? e->cfg->n_ctx : INT32_MAX;
    l->max_model_len = o->max_model_len > 0 ? o->max_model_len : ctx;
    if (o->max_model_len < 0 || l->max_model_len > ctx) {
        snprintf(err, errlen, "--max-model-len must be between 1 and the model's context (%lld), got %lld",
                 (long long)ctx, (long long)o->max_model_len);
        return -1;
    }
    /* One request must always fit alone, or preemption could not help it. */
    if (l->max_model_len > l->kv_tokens)
        l->max_model_len = l->kv_tokens;
    return 0;
}

/* ------------------------------------------------------------ requests */

/* Drops one reference; frees r with the last. Called without r->mu. */
static void req_unref(struct engine_req *r)
{
    pthread_mutex_lock(&r->mu);
    int last = --r->refs == 0;
    pthread_mutex_unlock(&r->mu);
    if (!last)
        return;
    if (r->seqs) {
        for (int i = 0; i < r->n; i++) {
            samp_destroy(r->seqs[i].samp);
            free(r->seqs[i].tokens);
        }
        free(r->seqs);
    }
    free(r->q);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

void engine_req_hold(struct engine_req *r)
{
    pthread_mutex_lock(&r->mu);
    r->refs++;
    pthread_mutex_unlock(&r->mu);
}

void engine_req_unhold(struct engine_req *r)
{
    req_unref(r);
}

void engine_post(struct engine *e, struct engine_req *r, const struct engine_event *ev)
{
    pthread_mutex_lock(&r->mu);
    if (r->q_len == r->q_cap) {
        size_t cap = r->q_cap ? 2 * r->q_cap : 16;
        struct engine_event *nq = malloc(cap * sizeof(*nq));
        if (!nq) {
            /* Out of memory for the queue: this request cannot be served
             * faithfully. The event is lost; the request is cancelled so it
             * ends (and frees its blocks) at the next step, and a DONE that
             * finds no room replaces the oldest event so the caller still
             * sees the end. */
            atomic_store(&r->cancel, 1);
            r->q_lost = 1;
            if (ev->kind != ENGINE_EV_DONE || r->q_len == 0) {
                pthread_mutex_unlock(&r->mu);
                if (e) {
                    pthread_mutex_lock(&e->mu);
                    e->cancel_pending = 1;
                    pthread_mutex_unlock(&e->mu);
                }
                return;
            }
            r->q_head = (r->q_head + 1) % r->q_cap;
            r->q_len--;
            nq = NULL;
        }
        if (nq) {
            for (size_t i = 0; i < r->q_len; i++)
                nq[i] = r->q[(r->q_head + i) % r->q_cap];
            free(r->q);
            r->q = nq;
            r->q_head = 0;
            r->q_cap = cap;
        }
    }
    r->q[(r->q_head + r->q_len) % r->q_cap] = *ev;
    r->q_len++;
    /* DONE lets go of the engine in the same breath: a caller that reads it
     * and cancels or releases at once no longer reaches the engine. */
    if (ev->kind == ENGINE_EV_DONE)
        r->e = NULL;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    if (!r->touched && e) {
        r->touched = 1;
        r->next = e->touched;
        e->touched = r;
    }
}

/* The engine lets go of r after DONE: removes it from the live list and
 * drops the engine's reference. */
static void engine_drop(struct engine *e, struct engine_req *r)
{
    for (int i = 0; i < e->n_live; i++) {
        if (e->live[i] == r) {
            e->live[i] = e->live[--e->n_live];
            break;
        }
    }
    r->dropped = 1;
    if (!r->touched)
        req_unref(r);
    /* else: the touched list still points at r; dropped after notify. */
}

void engine_finish_seq(struct engine *e, struct seq *s, enum engine_finish reason,
                       int32_t stop_token, const char *message)
{
    struct engine_req *r = s->r;
    if (s->state == SEQ_FINISHED)
        return;
    if (s->index == 0 && r->n > 1 && !r->forked) {
        /* Sample 0 ends (an error or a cancel) before the others were born
         * from its prompt: they never will be; end them all with it. */
        r->forked = 1;
        engine_end_request(e, r, reason, message);
        return;
    }
    if (s->state == SEQ_RUNNING || s->state == SEQ_WAITING)
        sched_unlink(e, s);
    if (s->kv >= 0) {
        kv_seq_close(e->kv, s->kv);
        s->kv = -1;
    }
    s->state = SEQ_FINISHED;
    if (reason == ENGINE_FINISH_ERROR)
        r->failed = 1;
    if (reason == ENGINE_FINISH_CANCELLED)
        r->cancelled = 1;
    struct engine_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.kind = ENGINE_EV_FINISH;
    ev.index = s->index;
    ev.finish = reason;
    ev.stop_token = stop_token;
    if (message)
        snprintf(ev.message, sizeof(ev.message), "%s", message);
    engine_post(e, r, &ev);
    if (++r->n_finished < r->n)
        return;
    memset(&ev, 0, sizeof(ev));
    ev.kind = ENGINE_EV_DONE;
    ev.index = -1;
    ev.stop_token = -1;
    ev.prompt_tokens = r->n_prompt;
    ev.completion_tokens = r->completion_tokens;
    ev.cached_tokens = r->cached_tokens;
    engine_post(e, r, &ev);
    if (r->failed)
        e->w.requests_failed++;
    else if (r->cancelled)
        e->w.requests_cancelled++;
    else
        e->w.requests_finished++;
    engine_hist_observe(&e->w.e2e, engine_now() - r->t_submit);
    engine_drop(e, r);
}

void engine_end_request(struct engine *e, struct engine_req *r, enum engine_finish reason,
                        const char *message)
{
    /* The last finish drops r: hold a reference across the loop. */
    pthread_mutex_lock(&r->mu);
    r->refs++;
    pthread_mutex_unlock(&r->mu);
    for (int i = 0; i < r->n && r->n_finished < r->n; i++)
        engine_finish_seq(e, &r->seqs[i], reason, -1, message);
    req_unref(r);
}

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Checks p against the model and limits; builds the request (samplers and
 * token buffers included) so that nothing is allocated on the engine
 * thread for it later. */
static struct engine_req *req_build(struct engine *e, const struct engine_params *p,
                                    char *err, size_t errlen)
{
    const struct model_config *c = e->cfg;
    int n = p->n == 0 ? 1 : p->n;
    if (!p->prompt || p->n_prompt <= 0) {
        snprintf(err, errlen, "the prompt is empty: at least one token is needed");
        return NULL;
    }
    if (n < 1 || n > ENGINE_MAX_N) {
        snprintf(err, errlen, "n must be between 1 and %d, got %d", ENGINE_MAX_N, p->n);
        return NULL;
    }
    if (p->max_tokens < 1) {
        snprintf(err, errlen, "max_tokens must be at least 1, got %lld", (long long)p->max_tokens);
        return NULL;
    }
    int64_t mml = e->lim.max_model_len;
    if (p->n_prompt > mml || p->max_tokens > mml - p->n_prompt) {
        snprintf(err, errlen,
                 "this model's maximum context length is %lld tokens, but %lld were requested "
                 "(%lld in the prompt, %lld for the completion); shorten the prompt or lower "
                 "max_tokens",
                 (long long)mml, (long long)p->n_prompt + (long long)p->max_tokens,
                 (long long)p->n_prompt, (long long)p->max_tokens);
        return NULL;
    }
    for (int64_t i = 0; i < p->n_prompt; i++) {
        if (p->prompt[i] < 0 || p->prompt[i] >= c->n_vocab) {
            snprintf(err, errlen, "prompt token %lld is %d, outside the vocabulary [0, %lld)",
                     (long long)i, p->prompt[i], (long long)c->n_vocab);
            return NULL;
        }
    }
    if (p->n_stop_token_ids < 0 || p->n_stop_token_ids > ENGINE_MAX_STOP_TOKENS ||
        (p->n_stop_token_ids > 0 && !p->stop_token_ids)) {
        snprintf(err, errlen, "stop_token_ids: at most %d tokens, got %d", ENGINE_MAX_STOP_TOKENS,
                 p->n_stop_token_ids);
        return NULL;
    }
    for (int i = 0; i < p->n_stop_token_ids; i++) {
        if (p->stop_token_ids[i] < 0 || p->stop_token_ids[i] >= c->n_vocab) {
            snprintf(err, errlen, "stop_token_ids[%d] is %d, outside the vocabulary [0, %lld)", i,
                     p->stop_token_ids[i], (long long)c->n_vocab);
            return NULL;
        }
    }
    struct engine_req *r = calloc(1, sizeof(*r));
    if (!r)
        goto oom;
    pthread_mutex_init(&r->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* engine_wait's timeouts */
    pthread_cond_init(&r->cv, &ca);
    pthread_condattr_destroy(&ca);
    r->refs = 2;
    /* Slots reserved now, so that the last events (a FINISH per sample and
     * DONE, which replaces the oldest when memory runs out) always fit. */
    r->q_cap = 16;
    r->q = malloc(r->q_cap * sizeof(*r->q));
    if (!r->q)
        goto oom;
    r->n_prompt = p->n_prompt;
    r->max_tokens = p->max_tokens;
    r->n = n;
    r->priority = p->priority;
    r->ignore_eos = p->ignore_eos;
    r->n_stop = p->n_stop_token_ids;
    if (r->n_stop)
        memcpy(r->stop_ids, p->stop_token_ids, (size_t)r->n_stop * sizeof(int32_t));
    r->notify = p->notify;
    r->notify_arg = p->notify_arg;
    r->rope_long = model_rope_long_for(e->m, p->n_prompt + p->max_tokens);
    r->seqs = calloc((size_t)n, sizeof(struct seq));
    if (!r->seqs)
        goto oom;
    for (int i = 0; i < n; i++) {
        struct seq *s = &r->seqs[i];
        s->r = r;
        s->index = i;
        s->kv = -1;
        s->state = i == 0 ? SEQ_WAITING : SEQ_UNBORN;
        struct samp_params sp = p->samp;
        if (i > 0)
            sp.seed = splitmix64(p->samp.seed ^ splitmix64((uint64_t)i));
        s->samp = samp_create(&sp, c->n_vocab, err, errlen);
        if (!s->samp) {
            req_unref(r);
            req_unref(r);
            return NULL;
        }
        if (samp_accept_prompt(s->samp, p->prompt, p->n_prompt) != 0) {
            snprintf(err, errlen, "the prompt holds a token outside the vocabulary");
            req_unref(r);
            req_unref(r);
            return NULL;
        }
        s->tokens = malloc((size_t)(p->n_prompt + p->max_tokens) * sizeof(int32_t));
        if (!s->tokens)
            goto oom;
        memcpy(s->tokens, p->prompt, (size_t)p->n_prompt * sizeof(int32_t));
        s->n_tokens = p->n_prompt;
    }
    return r;
oom:
    snprintf(err, errlen, "out of memory for a request of %lld prompt tokens, n = %d",
             (long long)p->n_prompt, n);
    if (r) {
        req_unref(r);
        req_unref(r);
    }
    return NULL;
}

int engine_submit(struct engine *e, const struct engine_params *p, struct engine_req **out,
                  char *err, size_t errlen)
{
    *out = NULL;
    struct engine_req *r = req_build(e, p, err, errlen);
    if (!r)
        return ENGINE_EINVAL;
    r->t_submit = engine_now();
    pthread_mutex_lock(&e->mu);
    if (e->stop) {
        pthread_mutex_unlock(&e->mu);
        snprintf(err, errlen, "the engine is shutting down");
        req_unref(r);
        req_unref(r);
        return ENGINE_ESHUTDOWN;
    }
    if (e->n_inbox + e->n_waiting_reqs >= e->lim.max_queue) {
        e->n_rejected++;
        pthread_mutex_unlock(&e->mu);
        snprintf(err, errlen, "the server is busy: %d requests are already waiting",
                 e->lim.max_queue);
        req_unref(r);
        req_unref(r);
        return ENGINE_EFULL;
    }
    r->e = e;
    r->id = e->next_id++;
    r->next = NULL;
    if (e->inbox_tail)
        e->inbox_tail->next = r;
    else
        e->inbox_head = r;
    e->inbox_tail = r;
    e->n_inbox++;
    e->n_submitted++;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    *out = r;
    return ENGINE_OK;
}

static int take_events(struct engine_req *r, struct engine_event *ev, int max)
{
    int n = 0;
    while (n < max && r->q_len > 0) {
        ev[n++] = r->q[r->q_head];
        r->q_head = (r->q_head + 1) % r->q_cap;
        r->q_len--;
    }
    return n;
}

int engine_poll(struct engine_req *r, struct engine_event *ev, int max)
{
    pthread_mutex_lock(&r->mu);
    int n = take_events(r, ev, max);
    pthread_mutex_unlock(&r->mu);
    return n;
}

int engine_wait(struct engine_req *r, struct engine_event *ev, int max, int timeout_ms)
{
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    if (timeout_ms >= 0) {
        dl.tv_sec += timeout_ms / 1000;
        dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (dl.tv_nsec >= 1000000000L) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&r->mu);
    while (r->q_len == 0) {
        int rc = timeout_ms < 0 ? pthread_cond_wait(&r->cv, &r->mu)
                                : pthread_cond_timedwait(&r->cv, &r->mu, &dl);
        if (rc == ETIMEDOUT)
            break;
    }
    int n = take_events(r, ev, max);
    pthread_mutex_unlock(&r->mu);
    return n;
}

void engine_cancel(struct engine_req *r)
{
    pthread_mutex_lock(&r->mu);
    struct engine *e = r->e;
    if (e && !atomic_exchange(&r->cancel, 1)) {
        pthread_mutex_lock(&e->mu);
        e->cancel_pending = 1;
        pthread_cond_signal(&e->cv);
        pthread_mutex_unlock(&e->mu);
    }
    pthread_mutex_unlock(&r->mu);
}

void engine_release(struct engine_req *r)
{
    if (!r)
        return;
    pthread_mutex_lock(&r->mu);
    r->released = 1;
    pthread_mutex_unlock(&r->mu);
    engine_cancel(r);
    req_unref(r);
}

uint64_t engine_req_id(const struct engine_req *r)
{
    return r->id;
}

/* ------------------------------------------------------------ stats */

static void publish_stats(struct engine *e)
{
    e->stamp++;
    int running = 0, waiting = 0;
    for (int i = 0; i < e->n_running; i++) {
        struct engine_req *r = e->running[i]->r;
        if (r->stamp != e->stamp) {
            r->stamp = e->stamp;
            running++;
        }
    }
    e->stamp++;
    for (int i = 0; i < e->n_waiting; i++) {
        struct engine_req *r = e->waiting[i]->r;
        if (r->stamp != e->stamp) {
            r->stamp = e->stamp;
            waiting++;
        }
    }
    struct kv_stats ks;
    kv_get_stats(e->kv, &ks);
    pthread_mutex_lock(&e->mu);
    e->stats = e->w;
    e->stats.running = running;
    e->stats.waiting = waiting;
    e->stats.kv_blocks_total = kv_n_blocks(e->kv);
    e->stats.kv_blocks_used = kv_used_blocks(e->kv);
    e->stats.kv_blocks_free = kv_free_blocks(e->kv);
    e->stats.kv_blocks_cached = kv_cached_blocks(e->kv);
    e->stats.prefix_query_tokens = ks.query_tokens;
    e->stats.prefix_hit_tokens = ks.hit_tokens;
    e->n_waiting_reqs = waiting;
    pthread_mutex_unlock(&e->mu);
}

void engine_get_stats(struct engine *e, struct engine_stats *out)
{
    pthread_mutex_lock(&e->mu);
    *out = e->stats;
    out->requests_submitted = e->n_submitted;
    out->requests_rejected = e->n_rejected;
    out->waiting += e->n_inbox;
    pthread_mutex_unlock(&e->mu);
}

void engine_get_limits(const struct engine *e, struct engine_limits *out)
{
    *out = e->lim;
}

/* ------------------------------------------------------------ thread */

/* Calls each touched request's notify once, then the engine's wake once,
 * and drops the references that engine_drop deferred. */
static void flush_touched(struct engine *e, int wake)
{
    struct engine_req *list = e->touched;
    e->touched = NULL;
    int any = list != NULL;
    while (list) {
        struct engine_req *r = list;
        list = r->next;
        r->next = NULL;
        r->touched = 0;
        /* Under r->mu, so that once engine_release returns no notify runs
         * or will run: notify_arg may die with the caller's handle. */
        pthread_mutex_lock(&r->mu);
        if (r->notify && !r->released)
            r->notify(r->notify_arg);
        pthread_mutex_unlock(&r->mu);
        if (r->dropped)
            req_unref(r);
    }
    if (any && wake && e->wake)
        e->wake(e->wake_arg);
}

static int live_add(struct engine *e, struct engine_req *r)
{
    if (e->n_live == e->cap_live) {
        int cap = e->cap_live ? 2 * e->cap_live : 64;
        struct engine_req **nl = realloc(e->live, (size_t)cap * sizeof(*nl));
        if (!nl)
            return -1;
        e->live = nl;
        e->cap_live = cap;
    }
    e->live[e->n_live++] = r;
    return 0;
}

/* Ends a request the engine could not even list (out of memory): every
 * sample finishes with an error, then DONE, and the engine's reference
 * goes. Its events are queued in the slots reserved at submit. */
static void end_unlisted(struct engine_req *r, const char *why)
{
    struct engine_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.kind = ENGINE_EV_FINISH;
    ev.finish = ENGINE_FINISH_ERROR;
    ev.stop_token = -1;
    snprintf(ev.message, sizeof(ev.message), "%s", why);
    for (int i = 0; i < r->n; i++) {
        ev.index = i;
        engine_post(NULL, r, &ev);
    }
    ev.kind = ENGINE_EV_DONE;
    ev.index = -1;
    ev.prompt_tokens = r->n_prompt;
    engine_post(NULL, r, &ev);
    req_unref(r);
}

/* New requests join the waiting list; cancelled ones end. */
static void take_inbox(struct engine *e, struct engine_req *inbox, int cancels)
{
    while (inbox) {
        struct engine_req *r = inbox;
        inbox = r->next;
        r->next = NULL;
        if (live_add(e, r) != 0) {
            end_unlisted(r, "out of memory admitting the request");
            continue;
        }
        if (sched_wait(e, &r->seqs[0]) != 0)
            engine_end_request(e, r, ENGINE_FINISH_ERROR, "out of memory queueing the request");
    }
    if (!cancels)
        return;
    for (int i = 0; i < e->n_live;) {
        struct engine_req *r = e->live[i];
        if (atomic_load(&r->cancel)) {
            engine_end_request(e, r, ENGINE_FINISH_CANCELLED, NULL);
            /* r left the live list; the slot holds another request now. */
            continue;
        }
        i++;
    }
}

static void *engine_main(void *arg)
{
    struct engine *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (!e->stop && !e->inbox_head && !e->cancel_pending && e->n_running == 0 &&
               e->n_waiting == 0 && e->n_fl == 0)
            pthread_cond_wait(&e->cv, &e->mu);
        if (e->stop) {
            pthread_mutex_unlock(&e->mu);
            break;
        }
        struct engine_req *inbox = e->inbox_head;
        e->inbox_head = e->inbox_tail = NULL;
        /* They wait in the scheduler now: still counted against
         * max_queue until publish_stats recounts. */
        e->n_waiting_reqs += e->n_inbox;
        e->n_inbox = 0;
        int cancels = e->cancel_pending;
        e->cancel_pending = 0;
        pthread_mutex_unlock(&e->mu);

        take_inbox(e, inbox, cancels);
        sched_step(e);
        publish_stats(e);
        flush_touched(e, 1);
    }
    return NULL;
}

/* ------------------------------------------------------------ lifecycle */

struct engine *engine_create(struct model *m, const struct engine_opts *opts,
                             char *err, size_t errlen)
{
    struct engine_opts defaults;
    memset(&defaults, 0, sizeof(defaults));
    if (!opts)
        opts = &defaults;
    struct engine *e = calloc(1, sizeof(*e));
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    e->m = m;
    e->cfg = model_get_config(m);
    e->wake = opts->wake;
    e->wake_arg = opts->wake_arg;
    e->next_id = 1;
    if (set_limits(e, opts, err, errlen) != 0)
        goto fail;
    struct kv_geom g = model_kv_geom(m);
    e->kv = kv_create(&g, e->lim.kv_blocks, e->lim.max_seqs, err, errlen);
    if (!e->kv)
        goto fail;
    e->running = calloc((size_t)e->lim.max_seqs, sizeof(*e->running));
    e->sched = calloc((size_t)e->lim.max_seqs, sizeof(*e->sched));
    e->order = calloc((size_t)e->lim.max_seqs, sizeof(*e->order));
    e->rows = calloc((size_t)e->lim.max_batched_tokens, sizeof(*e->rows));
    e->logits_copy = malloc((size_t)e->cfg->n_vocab * sizeof(float));
    e->samples = calloc((size_t)e->lim.max_seqs, sizeof(*e->samples));
    e->samp_of = calloc((size_t)e->lim.max_seqs, sizeof(*e->samp_of));
    for (int b = 0; b < 2; b++)
        e->ahead_samples[b] = calloc((size_t)e->lim.max_seqs, sizeof(*e->ahead_samples[b]));
    e->fl = calloc((size_t)e->lim.max_seqs, sizeof(*e->fl));
    e->fl_next = calloc((size_t)e->lim.max_seqs, sizeof(*e->fl_next));
    e->fl_rows = calloc((size_t)e->lim.max_seqs, sizeof(*e->fl_rows));
    /* on by default where a launch returns before the step has run */
    e->async = opts->async_scheduling > 0 || (opts->async_scheduling == 0 && model_async(m));
    if (!e->running || !e->sched || !e->order || !e->rows || !e->logits_copy || !e->samples ||
        !e->samp_of || !e->ahead_samples[0] || !e->ahead_samples[1] || !e->fl || !e->fl_next ||
        !e->fl_rows) {
        snprintf(err, errlen, "out of memory for the scheduler");
        goto fail;
    }
    /* On a GPU: every step buffer and the decode graphs, now, so that no
     * step allocates. */
    if (model_prepare(m, e->kv, e->lim.max_batched_tokens, e->lim.max_seqs,
                      e->lim.max_model_len, err, errlen))
        goto fail;
    stats_init(&e->w);
    stats_init(&e->stats);
    publish_stats(e);
    int rc = pthread_create(&e->thread, NULL, engine_main, e);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start the engine thread: %s", strerror(rc));
        goto fail;
    }
    e->thread_started = 1;
    return e;
fail:
    engine_destroy(e);
    return NULL;
}

void engine_destroy(struct engine *e)
{
    if (!e)
        return;
    if (e->thread_started) {
        pthread_mutex_lock(&e->mu);
        e->stop = 1;
        pthread_cond_signal(&e->cv);
        pthread_mutex_unlock(&e->mu);
        pthread_join(e->thread, NULL);
    }
    /* The thread is gone: this thread is the engine thread now. A step
     * still in flight is collected first (its requests are held). Requests
     * still in the inbox join the live list so they end like the rest. */
    if (e->kv)
        sched_drain(e);
    pthread_mutex_lock(&e->mu);
    struct engine_req *inbox = e->inbox_head;
    e->inbox_head = e->inbox_tail = NULL;
    e->n_inbox = 0;
    pthread_mutex_unlock(&e->mu);
    while (inbox) {
        struct engine_req *r = inbox;
        inbox = r->next;
        r->next = NULL;
        if (live_add(e, r) != 0)
            end_unlisted(r, "out of memory stopping the engine");
    }
    while (e->n_live > 0)
        engine_end_request(e, e->live[e->n_live - 1], ENGINE_FINISH_CANCELLED,
                           "the engine stopped");
    /* Not the engine thread: notify (which the header allows anywhere
     * with the request's lock) but no wake, which it promises to run on
     * the engine thread. */
    flush_touched(e, 0);
    kv_destroy(e->kv);
    free(e->live);
    free(e->running);
    free(e->waiting);
    free(e->sched);
    free(e->order);
    free(e->rows);
    free(e->logits);
    free(e->logits_copy);
    free(e->samples);
    free(e->samp_of);
    free(e->ahead_samples[0]);
    free(e->ahead_samples[1]);
    free(e->fl);
    free(e->fl_next);
    free(e->fl_rows);
    pthread_cond_destroy(&e->cv);
    pthread_mutex_destroy(&e->mu);
    free(e);
}
