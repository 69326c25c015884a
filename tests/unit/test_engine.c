/* test_engine.c: the continuous-batching engine through engine/engine.h, on
 * a fixture model, as f32 (the directory) and as Q8_0 (the GGUF file).
 * Random mixes of requests, submitted from several threads onto a KV cache
 * small enough to force chunked prefill and preemption, with a thread that
 * cancels some of them, must give every request the same tokens and logprob
 * bits as running it alone (the batch invariance engine.h promises). Also:
 * the prefix cache, parameter errors, a full queue, releasing, cancelling
 * and destroying live requests, the callbacks, and the stats. */
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/engine.h"
#include "engine/kv_cache.h"
#include "engine/model.h"

static atomic_int failures;
/* "async" on the command line: every engine but the solo references'
 * runs with async scheduling (decode steps launched ahead of their
 * predecessor's tokens), which must change no token and no logprob bit. */
static int g_async, g_force_sync;
static int64_t g_steps_ahead;
#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); failures++; } } while (0)

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    failures++;
}

#define N_SPECS 40          /* requests per random mix */
#define MAX_PROMPT 60       /* random prompts: 1..MAX_PROMPT tokens */
#define MAX_GEN 40          /* random max_tokens: 1..MAX_GEN */
#define PROMPT_CAP 128
#define MAX_SAMPLES 4
#define TOP_LOGPROBS 5
#define PROMPT_VOCAB 254    /* prompt tokens from [0, 254): no BOS, no EOS */
#define WAIT_MS 60000       /* no event for this long: the engine hangs */
#define BLOCK_TOKENS KV_BLOCK_TOKENS

static int64_t g_n_vocab;
static int64_t g_eos;
static int64_t g_block_bytes; /* KV bytes of one block of this model */

/* ---- small helpers ---------------------------------------------------- */

static uint64_t rng_next(uint64_t *s)
{
    /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static int64_t rng_range(uint64_t *s, int64_t lo, int64_t hi) /* [lo, hi] */
{
    return lo + (int64_t)(rng_next(s) % (uint64_t)(hi - lo + 1));
}

static void sleep_us(int64_t us)
{
    struct timespec ts = {us / 1000000, (long)(us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void count_cb(void *arg)
{
    atomic_fetch_add((atomic_int *)arg, 1);
}

static void die_hung(const char *what)
{
    fprintf(stderr, "%s: timed out; the engine looks hung, giving up\n", what);
    exit(1);
}

/* ---- requests and their results ------------------------------------- */

struct spec {
    int32_t prompt[PROMPT_CAP];
    int64_t n_prompt;
    int64_t max_tokens;
    int n;
    float temperature, top_p;
    uint64_t seed;
    int32_t stop[3];
    int n_stop;
    int ignore_eos;
};

struct sample_out {
    int n_tok;
    struct samp_result *tok; /* (max_tokens) */
    int finished;
    enum engine_finish finish;
    int32_t stop_token;
};

struct req_out {
    int n;
    struct sample_out s[MAX_SAMPLES];
    int done;
    int64_t prompt_tokens, completion_tokens, cached_tokens;
};

static void out_free(struct req_out *o)
{
    for (int i = 0; i < MAX_SAMPLES; i++)
        free(o->s[i].tok);
    memset(o, 0, sizeof(*o));
}

static struct engine_params spec_params(const struct spec *sp, atomic_int *notify_count)
{
    struct engine_params p;
    memset(&p, 0, sizeof(p));
    p.prompt = sp->prompt;
    p.n_prompt = sp->n_prompt;
    p.samp = samp_params_default();
    p.samp.temperature = sp->temperature;
    p.samp.top_p = sp->top_p;
    p.samp.seed = sp->seed;
    p.samp.logprobs = 1;
    p.samp.top_logprobs = TOP_LOGPROBS;
    p.max_tokens = sp->max_tokens;
    p.n = sp->n;
    p.ignore_eos = sp->ignore_eos;
    p.stop_token_ids = sp->stop;
    p.n_stop_token_ids = sp->n_stop;
    if (notify_count) {
        p.notify = count_cb;
        p.notify_arg = notify_count;
    }
    return p;
}

static int is_stop_token(const struct spec *sp, int32_t t)
{
    if (t == g_eos && !sp->ignore_eos)
        return 1;
    for (int i = 0; i < sp->n_stop; i++)
        if (sp->stop[i] == t)
            return 1;
    return 0;
}

static void out_init(struct req_out *o, const struct spec *sp)
{
    memset(o, 0, sizeof(*o));
    o->n = sp->n ? sp->n : 1;
    for (int i = 0; i < o->n; i++) {
        o->s[i].tok = calloc((size_t)sp->max_tokens, sizeof(struct samp_result));
        o->s[i].stop_token = -1;
    }
}

/* Adds one event to o, checking it against engine.h's order: per sample
 * its TOKENs then one FINISH, DONE last with the usage. */
static void out_feed(struct req_out *o, const struct spec *sp, const struct engine_event *e,
                     const char *what)
{
    if (o->done) {
        fail("%s: event kind %d after DONE", what, (int)e->kind);
        return;
    }
    if (e->kind == ENGINE_EV_DONE) {
        o->done = 1;
        o->prompt_tokens = e->prompt_tokens;
        o->completion_tokens = e->completion_tokens;
        o->cached_tokens = e->cached_tokens;
        int64_t want = 0;
        for (int i = 0; i < o->n; i++) {
            if (!o->s[i].finished)
                fail("%s: DONE before sample %d finished", what, i);
            want += o->s[i].n_tok + (o->s[i].stop_token >= 0);
        }
        if (e->prompt_tokens != sp->n_prompt)
            fail("%s: prompt_tokens %lld, want %lld", what, (long long)e->prompt_tokens,
                 (long long)sp->n_prompt);
        if (e->completion_tokens != want)
            fail("%s: completion_tokens %lld, want %lld", what, (long long)e->completion_tokens,
                 (long long)want);
        if (e->cached_tokens < 0 || e->cached_tokens >= sp->n_prompt)
            fail("%s: cached_tokens %lld of a %lld-token prompt", what,
                 (long long)e->cached_tokens, (long long)sp->n_prompt);
        return;
    }
    if (e->index < 0 || e->index >= o->n) {
        fail("%s: event kind %d for sample %d of %d", what, (int)e->kind, e->index, o->n);
        return;
    }
    struct sample_out *s = &o->s[e->index];
    if (s->finished) {
        fail("%s: event kind %d for sample %d after its FINISH", what, (int)e->kind, e->index);
        return;
    }
    if (e->kind == ENGINE_EV_TOKEN) {
        if (s->n_tok >= sp->max_tokens) {
            fail("%s: sample %d: more than max_tokens %lld tokens", what, e->index,
                 (long long)sp->max_tokens);
            return;
        }
        const struct samp_result *t = &e->tok;
        if (t->token < 0 || t->token >= g_n_vocab || is_stop_token(sp, t->token))
            fail("%s: sample %d: token %d sent", what, e->index, t->token);
        if (t->n_top != TOP_LOGPROBS || !(t->logprob <= 0.0f))
            fail("%s: sample %d: n_top %d logprob %g", what, e->index, t->n_top,
                 (double)t->logprob);
        s->tok[s->n_tok++] = *t;
        return;
    }
    if (e->kind != ENGINE_EV_FINISH) {
        fail("%s: event kind %d", what, (int)e->kind);
        return;
    }
    s->finished = 1;
    s->finish = e->finish;
    s->stop_token = e->stop_token;
    switch (e->finish) {
    case ENGINE_FINISH_STOP:
        if (!is_stop_token(sp, e->stop_token) || s->n_tok + 1 > sp->max_tokens)
            fail("%s: sample %d: stop on %d after %d tokens", what, e->index, e->stop_token,
                 s->n_tok);
        break;
    case ENGINE_FINISH_LENGTH:
        if (s->n_tok != sp->max_tokens || e->stop_token != -1)
            fail("%s: sample %d: length after %d of %lld tokens, stop_token %d", what, e->index,
                 s->n_tok, (long long)sp->max_tokens, e->stop_token);
        break;
    case ENGINE_FINISH_CANCELLED:
        if (e->stop_token != -1)
            fail("%s: sample %d: cancelled with stop_token %d", what, e->index, e->stop_token);
        break;
    case ENGINE_FINISH_ERROR:
        fail("%s: sample %d: error '%s'", what, e->index, e->message);
        break;
    default:
        fail("%s: sample %d: finish %d", what, e->index, (int)e->finish);
    }
}

/* Reads r's remaining events until DONE into o (out_init'ed), then checks
 * that none follow. Exits on a timeout: a hung engine must fail the test,
 * not hang it. */
static void collect_rest(struct engine_req *r, const struct spec *sp, struct req_out *o,
                         const char *what)
{
    int64_t max_events = (int64_t)o->n * (sp->max_tokens + 1) + 1, n_events = 0;
    struct engine_event ev[16];
    while (!o->done) {
        int k = engine_wait(r, ev, 16, WAIT_MS);
        if (k <= 0)
            die_hung(what);
        CHECK(k <= 16);
        for (int j = 0; j < k; j++) {
            if (++n_events > max_events) {
                fail("%s: more events than %lld", what, (long long)max_events);
                return;
            }
            out_feed(o, sp, &ev[j], what);
        }
    }
    struct engine_event extra;
    if (engine_poll(r, &extra, 1) != 0)
        fail("%s: an event after DONE", what);
}

static void collect(struct engine_req *r, const struct spec *sp, struct req_out *o, const char *what)
{
    out_init(o, sp);
    collect_rest(r, sp, o, what);
}

static int same_tok(const struct samp_result *a, const struct samp_result *b)
{
    return a->token == b->token && memcmp(&a->logprob, &b->logprob, sizeof(float)) == 0 &&
           a->n_top == b->n_top &&
           memcmp(a->top, b->top, (size_t)a->n_top * sizeof(a->top[0])) == 0;
}

/* got must equal want bit for bit; a sample of a cancelled request that
 * ended cancelled must have a prefix of want's tokens instead. */
static void compare(const struct req_out *got, const struct req_out *want, int cancelled,
                    const char *what)
{
    if (got->n != want->n) {
        fail("%s: %d samples, want %d", what, got->n, want->n);
        return;
    }
    if (got->prompt_tokens != want->prompt_tokens)
        fail("%s: prompt_tokens %lld, want %lld", what, (long long)got->prompt_tokens,
             (long long)want->prompt_tokens);
    for (int i = 0; i < got->n; i++) {
        const struct sample_out *g = &got->s[i], *w = &want->s[i];
        int prefix = cancelled && g->finish == ENGINE_FINISH_CANCELLED;
        if (prefix ? g->n_tok > w->n_tok
                   : (g->finish != w->finish || g->stop_token != w->stop_token ||
                      g->n_tok != w->n_tok))
            fail("%s: sample %d: finish %d stop %d after %d tokens, alone: finish %d stop %d "
                 "after %d%s",
                 what, i, (int)g->finish, g->stop_token, g->n_tok, (int)w->finish,
                 w->stop_token, w->n_tok, cancelled ? " (cancelled)" : "");
        int m = g->n_tok < w->n_tok ? g->n_tok : w->n_tok;
        for (int t = 0; t < m; t++)
            if (!same_tok(&g->tok[t], &w->tok[t])) {
                fail("%s: sample %d: token %d differs: %d (%a) vs alone %d (%a)", what, i, t,
                     g->tok[t].token, (double)g->tok[t].logprob, w->tok[t].token,
                     (double)w->tok[t].logprob);
                break;
            }
    }
}

/* ---- engines ---------------------------------------------------------- */

static struct engine *make_engine(struct model *m, int64_t kv_blocks, int max_seqs,
                                  int64_t max_batched, int max_queue, atomic_int *wake_count)
{
    struct engine_opts o;
    memset(&o, 0, sizeof(o));
    o.kv_cache_bytes = kv_blocks * g_block_bytes;
    o.max_seqs = max_seqs;
    o.max_batched_tokens = max_batched;
    o.max_queue = max_queue;
    o.async_scheduling = g_async && !g_force_sync ? 1 : -1;
    if (wake_count) {
        o.wake = count_cb;
        o.wake_arg = wake_count;
    }
    char err[256] = "";
    struct engine *e = engine_create(m, &o, err, sizeof(err));
    if (!e) {
        fprintf(stderr, "engine_create: %s\n", err);
        exit(1);
    }
    struct engine_limits l;
    engine_get_limits(e, &l);
    CHECK(l.kv_blocks == kv_blocks);
    CHECK(l.kv_tokens == kv_blocks * BLOCK_TOKENS);
    CHECK(l.max_seqs == max_seqs);
    return e;
}

static struct engine_req *submit_ok(struct engine *e, const struct spec *sp, atomic_int *notify,
                                    const char *what)
{
    struct engine_params p = spec_params(sp, notify);
    struct engine_req *r = NULL;
    char err[256] = "";
    int rc = engine_submit(e, &p, &r, err, sizeof(err));
    if (rc != ENGINE_OK || !r) {
        fprintf(stderr, "%s: engine_submit: %d '%s'\n", what, rc, err);
        exit(1);
    }
    return r;
}

/* Waits (bounded) for the engine's gauges to settle at idle: they are as
 * of the end of the last step. */
static void idle_stats(struct engine *e, struct engine_stats *st)
{
    for (int i = 0; i < 500; i++) {
        engine_get_stats(e, st);
        if (st->running == 0 && st->waiting == 0 && st->kv_blocks_used == 0)
            return;
        sleep_us(10000);
    }
}

static void check_hist(const struct engine_hist *h, const char *name)
{
    uint64_t sum = 0;
    if (h->n_bounds < 0 || h->n_bounds > ENGINE_HIST_BUCKETS) {
        fail("hist %s: n_bounds %d", name, h->n_bounds);
        return;
    }
    for (int i = 0; i <= h->n_bounds; i++)
        sum += h->counts[i];
    if (sum != h->count)
        fail("hist %s: counts sum to %llu, count %llu", name, (unsigned long long)sum,
             (unsigned long long)h->count);
    for (int i = 1; i < h->n_bounds; i++)
        if (!(h->bounds[i] > h->bounds[i - 1]))
            fail("hist %s: bounds not increasing at %d", name, i);
    if (h->count && !(h->sum >= 0))
        fail("hist %s: sum %g", name, h->sum);
}

static void check_all_hists(const struct engine_stats *st)
{
    check_hist(&st->step_time, "step_time");
    check_hist(&st->tokens_per_step, "tokens_per_step");
    check_hist(&st->ttft, "ttft");
    check_hist(&st->itl, "itl");
    check_hist(&st->queue_time, "queue_time");
    check_hist(&st->e2e, "e2e");
}

/* ---- random request specs --------------------------------------------- */

static void random_tokens(uint64_t *rng, int32_t *t, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        t[i] = (int32_t)rng_range(rng, 0, PROMPT_VOCAB - 1);
}

static void make_specs(struct spec *specs, int n_specs, uint64_t seed)
{
    uint64_t rng = seed;
    int32_t prefix[3][48];
    int64_t n_prefix[3];
    for (int i = 0; i < 3; i++) {
        n_prefix[i] = rng_range(&rng, 16, 48);
        random_tokens(&rng, prefix[i], n_prefix[i]);
    }
    static const int ns[] = {1, 1, 1, 2, 3};
    for (int i = 0; i < n_specs; i++) {
        struct spec *sp = &specs[i];
        memset(sp, 0, sizeof(*sp));
        sp->n_prompt = rng_range(&rng, 1, MAX_PROMPT);
        int64_t shared = 0;
        if (rng_range(&rng, 0, 1)) { /* half share a common prefix */
            int k = (int)rng_range(&rng, 0, 2);
            shared = n_prefix[k];
            memcpy(sp->prompt, prefix[k], (size_t)shared * sizeof(int32_t));
            if (sp->n_prompt < shared)
                sp->n_prompt = shared + rng_range(&rng, 0, MAX_PROMPT - shared);
        }
        random_tokens(&rng, sp->prompt + shared, sp->n_prompt - shared);
        sp->n = ns[rng_range(&rng, 0, 4)];
        sp->max_tokens = rng_range(&rng, 1, MAX_GEN);
        /* n samples must fit the small KV of the mix together. */
        if (sp->n > 1 && sp->n_prompt + sp->max_tokens > 80)
            sp->max_tokens = 80 - sp->n_prompt;
        if (rng_range(&rng, 0, 1)) {
            sp->temperature = 0.8f;
            sp->top_p = 0.9f;
        } else {
            sp->temperature = 0.0f;
            sp->top_p = 1.0f;
        }
        sp->seed = rng_next(&rng);
        if (rng_range(&rng, 0, 3) == 0) {
            sp->n_stop = (int)rng_range(&rng, 1, 3);
            for (int j = 0; j < sp->n_stop; j++)
                sp->stop[j] = (int32_t)rng_range(&rng, 0, 255);
        }
        sp->ignore_eos = rng_range(&rng, 0, 4) == 0;
    }
}

/* ---- 1. solo references (and 7. stats) -------------------------------- */

/* Runs each spec alone, one after another, on one engine with ample KV:
 * the references the mixes must match. Also checks the engine's counters
 * against what was received. */
static void solo_runs(struct model *m, const struct spec *specs, int n_specs, struct req_out *outs,
                      int expect_hits)
{
    atomic_int wake = 0;
    /* notify follows the step's posts, so it may come after the caller
     * read DONE, and never after engine_release: the handles are kept
     * until the engine is idle, and then every request must have had one. */
    atomic_int *notify = calloc((size_t)n_specs, sizeof(*notify));
    struct engine_req **held = calloc((size_t)n_specs, sizeof(*held));
    g_force_sync = 1;
    struct engine *e = make_engine(m, 512, 8, 0, 0, &wake);
    g_force_sync = 0;
    int64_t generated = 0, sampled_first = 0, cached = 0, computed_min = 0;
    uint64_t last_id = 0;
    for (int i = 0; i < n_specs; i++) {
        char what[64];
        snprintf(what, sizeof(what), "solo %d", i);
        struct engine_req *r = submit_ok(e, &specs[i], &notify[i], what);
        uint64_t id = engine_req_id(r);
        if (i > 0 && id <= last_id)
            fail("%s: id %llu after %llu", what, (unsigned long long)id,
                 (unsigned long long)last_id);
        last_id = id;
        collect(r, &specs[i], &outs[i], what);
        held[i] = r;
        generated += outs[i].completion_tokens;
        cached += outs[i].cached_tokens;
        computed_min += specs[i].n_prompt - outs[i].cached_tokens;
        for (int s = 0; s < outs[i].n; s++) {
            sampled_first += outs[i].s[s].n_tok > 0 || outs[i].s[s].stop_token >= 0;
            if (outs[i].s[s].finish == ENGINE_FINISH_CANCELLED)
                fail("%s: sample %d cancelled", what, s);
        }
    }
    struct engine_stats st;
    idle_stats(e, &st);
    /* The last step's notify follows its stats: give it a moment. */
    for (int t = 0; t < 200; t++) {
        int all = 1;
        for (int i = 0; i < n_specs; i++)
            all &= atomic_load(&notify[i]) > 0;
        if (all)
            break;
        sleep_us(10000);
    }
    for (int i = 0; i < n_specs; i++)
        engine_release(held[i]);
    free(held);
    CHECK(st.running == 0 && st.waiting == 0 && st.kv_blocks_used == 0);
    CHECK(st.kv_blocks_total == 512);
    CHECK(st.kv_blocks_used + st.kv_blocks_free == st.kv_blocks_total);
    CHECK(st.requests_submitted == n_specs);
    if (st.requests_finished != n_specs || st.requests_cancelled || st.requests_failed ||
        st.requests_rejected)
        fail("solo: %d requests: %lld finished, %lld cancelled, %lld failed, %lld rejected",
             n_specs, (long long)st.requests_finished, (long long)st.requests_cancelled,
             (long long)st.requests_failed, (long long)st.requests_rejected);
    CHECK(st.preemptions == 0);
    CHECK(st.steps > 0);
    if (st.generation_tokens != generated)
        fail("solo: generation_tokens %lld, received %lld", (long long)st.generation_tokens,
             (long long)generated);
    if ((int64_t)st.ttft.count != sampled_first)
        fail("solo: ttft.count %llu, samples with a first token %lld",
             (unsigned long long)st.ttft.count, (long long)sampled_first);
    CHECK(st.prompt_tokens_computed >= computed_min);
    CHECK(st.prefix_hit_tokens >= cached);
    CHECK(st.prefix_query_tokens >= st.prefix_hit_tokens);
    if (expect_hits)
        CHECK(st.prefix_hit_tokens > 0); /* the shared prefixes */
    CHECK(st.e2e.count == (uint64_t)n_specs);
    check_all_hists(&st);
    /* 6. wake: at least once, at most once per step. */
    CHECK(atomic_load(&wake) > 0);
    CHECK(atomic_load(&wake) <= st.steps);
    engine_destroy(e);
    for (int i = 0; i < n_specs; i++)
        if (atomic_load(&notify[i]) < 1)
            fail("solo %d: notify never called", i);
    free(notify);
}

/* ---- 2. random mixes -------------------------------------------------- */

enum { CANCEL_NONE, CANCEL_NOW, CANCEL_LATER, CANCEL_TWICE, CANCEL_AFTER_DONE };

struct mix {
    struct engine *e;
    const struct spec *specs;
    int n_specs;
    uint64_t seed;
    int n_submitters;
    struct engine_req *handle[N_SPECS];
    atomic_int state[N_SPECS]; /* 0: not yet submitted, 1: handle set, 2: submit failed */
    atomic_int done[N_SPECS];  /* DONE read */
    atomic_int notify[N_SPECS];
    int cancel_mode[N_SPECS];
    atomic_int cancel_sent[N_SPECS]; /* cancelled before DONE was read */
};

struct submitter {
    struct mix *mx;
    int t;
};

static void *submitter_main(void *arg)
{
    struct submitter *sb = arg;
    struct mix *mx = sb->mx;
    uint64_t rng = mx->seed * 31 + (uint64_t)sb->t + 1;
    for (int i = sb->t; i < mx->n_specs; i += mx->n_submitters) {
        sleep_us(rng_range(&rng, 0, 1500));
        struct engine_params p = spec_params(&mx->specs[i], &mx->notify[i]);
        char err[256] = "";
        struct engine_req *r = NULL;
        int rc = engine_submit(mx->e, &p, &r, err, sizeof(err));
        if (rc != ENGINE_OK || !r) {
            fail("mix: submit %d: %d '%s'", i, rc, err);
            atomic_store(&mx->state[i], 2);
            continue;
        }
        mx->handle[i] = r;
        atomic_store(&mx->state[i], 1);
    }
    return NULL;
}

/* Waits (bounded) for request i's submit; returns its handle or NULL. */
static struct engine_req *wait_handle(struct mix *mx, int i)
{
    double deadline = now_s() + WAIT_MS / 1000.0;
    while (atomic_load(&mx->state[i]) == 0) {
        if (now_s() > deadline)
            die_hung("mix: waiting for a submit");
        sleep_us(50);
    }
    return atomic_load(&mx->state[i]) == 1 ? mx->handle[i] : NULL;
}

static void *canceller_main(void *arg)
{
    struct mix *mx = arg;
    uint64_t rng = mx->seed * 77 + 5;
    for (int i = 0; i < mx->n_specs; i++) {
        int mode = mx->cancel_mode[i];
        if (mode == CANCEL_NONE || mode == CANCEL_AFTER_DONE)
            continue;
        struct engine_req *r = wait_handle(mx, i);
        if (!r)
            continue;
        if (mode == CANCEL_LATER)
            sleep_us(rng_range(&rng, 0, 30000));
        if (mode == CANCEL_TWICE)
            sleep_us(rng_range(&rng, 0, 5000));
        if (!atomic_load(&mx->done[i]))
            atomic_store(&mx->cancel_sent[i], 1);
        engine_cancel(r);
        if (mode == CANCEL_TWICE) {
            sleep_us(rng_range(&rng, 0, 2000));
            engine_cancel(r);
        }
    }
    for (int i = 0; i < mx->n_specs; i++) {
        if (mx->cancel_mode[i] != CANCEL_AFTER_DONE)
            continue;
        struct engine_req *r = wait_handle(mx, i);
        double deadline = now_s() + 4 * WAIT_MS / 1000.0;
        while (!atomic_load(&mx->done[i])) {
            if (now_s() > deadline)
                die_hung("mix: waiting for a DONE to cancel after");
            sleep_us(200);
        }
        if (r)
            engine_cancel(r);
    }
    return NULL;
}

static void mix_run(struct model *m, const struct spec *specs, int n_specs,
                    const struct req_out *solo, uint64_t seed, int64_t kv_blocks,
                    const char *model_name)
{
    struct mix *mx = calloc(1, sizeof(*mx));
    struct req_out *outs = calloc((size_t)n_specs, sizeof(*outs));
    atomic_int wake = 0;
    mx->e = make_engine(m, kv_blocks, 8, 32, 0, &wake);
    mx->specs = specs;
    mx->n_specs = n_specs;
    mx->seed = seed;
    mx->n_submitters = 2 + (int)(seed % 2);
    uint64_t rng = seed ^ 0xc0ffee;
    int n_cancel = 0;
    for (int i = 0; i < n_specs; i++) {
        mx->cancel_mode[i] = rng_range(&rng, 0, 3) == 0 ? (int)rng_range(&rng, 1, 4) : CANCEL_NONE;
        n_cancel += mx->cancel_mode[i] != CANCEL_NONE;
    }

    pthread_t sub[3], canc;
    struct submitter sbs[3];
    for (int t = 0; t < mx->n_submitters; t++) {
        sbs[t] = (struct submitter){mx, t};
        CHECK(pthread_create(&sub[t], NULL, submitter_main, &sbs[t]) == 0);
    }
    CHECK(pthread_create(&canc, NULL, canceller_main, mx) == 0);

    int64_t generated = 0;
    for (int i = 0; i < n_specs; i++) {
        struct engine_req *r = wait_handle(mx, i);
        if (!r)
            continue;
        char what[96];
        snprintf(what, sizeof(what), "%s mix seed %llu request %d", model_name,
                 (unsigned long long)seed, i);
        collect(r, &specs[i], &outs[i], what);
        atomic_store(&mx->done[i], 1);
        generated += outs[i].completion_tokens;
    }
    for (int t = 0; t < mx->n_submitters; t++)
        pthread_join(sub[t], NULL);
    pthread_join(canc, NULL);

    int n_cancelled = 0, n_stopped = 0;
    int64_t n_tokens = 0;
    for (int i = 0; i < n_specs; i++) {
        if (atomic_load(&mx->state[i]) != 1)
            continue;
        char what[96];
        snprintf(what, sizeof(what), "%s mix seed %llu request %d", model_name,
                 (unsigned long long)seed, i);
        int cancelled = atomic_load(&mx->cancel_sent[i]);
        compare(&outs[i], &solo[i], cancelled, what);
        for (int s = 0; s < outs[i].n; s++) {
            n_cancelled += outs[i].s[s].finish == ENGINE_FINISH_CANCELLED;
            n_stopped += outs[i].s[s].finish == ENGINE_FINISH_STOP;
            n_tokens += outs[i].s[s].n_tok;
        }
        engine_release(mx->handle[i]);
    }

    struct engine_stats st;
    idle_stats(mx->e, &st);
    printf("  %s mix seed %llu: %d submitters, %d cancels planned, %lld tokens, %d samples "
           "stopped, %d cancelled, %lld steps, %lld preemptions, %lld prefix hit tokens, "
           "%lld prompt rows\n",
           model_name, (unsigned long long)seed, mx->n_submitters, n_cancel,
           (long long)n_tokens, n_stopped, n_cancelled,
           (long long)st.steps, (long long)st.preemptions, (long long)st.prefix_hit_tokens,
           (long long)st.prompt_tokens_computed);
    g_steps_ahead += st.steps_ahead;
    if (!g_async)
        CHECK(st.steps_ahead == 0);
    CHECK(st.kv_blocks_used == 0);
    CHECK(st.running == 0);
    CHECK(st.waiting == 0);
    CHECK(st.kv_blocks_total == kv_blocks);
    CHECK(st.kv_blocks_used + st.kv_blocks_free == st.kv_blocks_total);
    CHECK(st.preemptions > 0);
    CHECK(st.prefix_hit_tokens > 0);
    CHECK(st.requests_submitted == n_specs);
    CHECK(st.requests_failed == 0);
    CHECK(st.requests_finished + st.requests_cancelled == n_specs);
    /* A cancel can land after a token was sampled and before it is sent. */
    CHECK(st.generation_tokens >= generated);
    CHECK(st.steps > 0);
    check_all_hists(&st);
    CHECK(atomic_load(&wake) > 0);
    CHECK(atomic_load(&wake) <= st.steps);
    engine_destroy(mx->e);
    /* Handles are released as soon as DONE is read, which may be before
     * the step's notify: only the total is certain. */
    int notified = 0;
    for (int i = 0; i < n_specs; i++)
        notified += atomic_load(&mx->notify[i]) > 0;
    if (notified == 0)
        fail("%s mix seed %llu: notify never called", model_name, (unsigned long long)seed);
    for (int i = 0; i < n_specs; i++)
        out_free(&outs[i]);
    free(outs);
    free(mx);
}

/* ---- 3. directed preemption ------------------------------------------ */

static void test_preemption(struct model *m)
{
    struct spec sp[2];
    uint64_t rng = 1234;
    for (int i = 0; i < 2; i++) {
        memset(&sp[i], 0, sizeof(sp[i]));
        sp[i].n_prompt = 40;
        random_tokens(&rng, sp[i].prompt, 40);
        sp[i].max_tokens = 60;
        sp[i].n = 1;
        sp[i].ignore_eos = 1; /* run to the end: both need 7 blocks */
        sp[i].temperature = i ? 0.8f : 0.0f;
        sp[i].top_p = i ? 0.9f : 1.0f;
        sp[i].seed = 99 + (uint64_t)i;
    }
    struct req_out solo[2], got[2];
    solo_runs(m, sp, 2, solo, 0);
    struct engine *e = make_engine(m, 10, 8, 0, 0, NULL);
    struct engine_req *r[2];
    for (int i = 0; i < 2; i++)
        r[i] = submit_ok(e, &sp[i], NULL, "preemption");
    for (int i = 0; i < 2; i++) {
        char what[32];
        snprintf(what, sizeof(what), "preemption %d", i);
        collect(r[i], &sp[i], &got[i], what);
        compare(&got[i], &solo[i], 0, what);
        engine_release(r[i]);
    }
    struct engine_stats st;
    idle_stats(e, &st);
    if (st.preemptions <= 0)
        fail("preemption: two 100-token requests on 10 blocks, no preemption");
    CHECK(st.kv_blocks_used == 0 && st.running == 0 && st.waiting == 0);
    /* The recompute ran again the rows a preemption threw away. */
    CHECK(st.prompt_tokens_computed > 80);
    CHECK(st.generation_tokens == 120);
    engine_destroy(e);
    for (int i = 0; i < 2; i++) {
        out_free(&solo[i]);
        out_free(&got[i]);
    }
}

/* ---- 4. prefix cache -------------------------------------------------- */

static void test_prefix_cache(struct model *m)
{
    struct engine *e = make_engine(m, 64, 8, 0, 0, NULL);
    uint64_t rng = 4242;
    static const int64_t lens[] = {40, 32};
    int64_t hits = 0;
    for (int k = 0; k < 2; k++) {
        struct spec sp;
        memset(&sp, 0, sizeof(sp));
        sp.n_prompt = lens[k];
        random_tokens(&rng, sp.prompt, sp.n_prompt);
        sp.max_tokens = 20;
        sp.n = 1;
        sp.temperature = 0.8f;
        sp.top_p = 0.9f;
        sp.seed = 7;
        struct req_out a, b;
        struct engine_req *r = submit_ok(e, &sp, NULL, "prefix A");
        collect(r, &sp, &a, "prefix A");
        engine_release(r);
        CHECK(a.cached_tokens == 0);
        r = submit_ok(e, &sp, NULL, "prefix B");
        collect(r, &sp, &b, "prefix B");
        engine_release(r);
        /* 40 tokens: two full blocks, 32: the first (the last token is
         * always recomputed); then, when A filled and published the next
         * block, the part of it that B's prompt shares (all but the last
         * token): 39 and 31. */
        int64_t full = (sp.n_prompt - 1) / BLOCK_TOKENS * BLOCK_TOKENS;
        if (b.cached_tokens != full && b.cached_tokens != sp.n_prompt - 1)
            fail("prefix: B's cached_tokens %lld of %lld", (long long)b.cached_tokens,
                 (long long)sp.n_prompt);
        hits += b.cached_tokens;
        compare(&b, &a, 0, "prefix: B against A");
        out_free(&a);
        out_free(&b);
    }
    struct engine_stats st;
    idle_stats(e, &st);
    CHECK(st.prefix_hit_tokens == hits && hits >= 32 + 16);
    engine_destroy(e);
}

/* ---- 5. errors and lifetimes ------------------------------------------ */

static void expect_einval(struct engine *e, const struct engine_params *p, const char *what)
{
    struct engine_req *r = NULL;
    char err[256] = "";
    int rc = engine_submit(e, p, &r, err, sizeof(err));
    if (rc != ENGINE_EINVAL || !err[0]) {
        fail("%s: submit gave %d '%s', want EINVAL with a message", what, rc, err);
        if (rc == ENGINE_OK && r)
            engine_release(r);
    }
}

static void test_errors(struct model *m)
{
    char err[256] = "";
    struct engine_opts eo;
    memset(&eo, 0, sizeof(eo));
    eo.kv_cache_bytes = g_block_bytes - 1; /* not one block */
    struct engine *bad = engine_create(m, &eo, err, sizeof(err));
    CHECK(bad == NULL && err[0]);
    engine_destroy(bad);
    engine_destroy(NULL);

    struct engine *e = make_engine(m, 64, 8, 0, 0, NULL);
    struct engine_limits lim;
    engine_get_limits(e, &lim);
    CHECK(lim.max_model_len == 128);
    CHECK(lim.max_queue == 1024);
    CHECK(lim.max_batched_tokens == 256);
    CHECK(lim.kv_bytes == 64 * g_block_bytes);

    struct spec sp;
    memset(&sp, 0, sizeof(sp));
    sp.n_prompt = 10;
    for (int i = 0; i < 10; i++)
        sp.prompt[i] = i + 1;
    sp.max_tokens = 5;
    sp.n = 1;
    sp.top_p = 1.0f;
    int32_t many_stops[ENGINE_MAX_STOP_TOKENS + 1];
    for (int i = 0; i <= ENGINE_MAX_STOP_TOKENS; i++)
        many_stops[i] = i;
    int32_t bad_prompt[10];

    struct engine_params p = spec_params(&sp, NULL);
    memcpy(bad_prompt, sp.prompt, sizeof(bad_prompt));
    bad_prompt[3] = (int32_t)g_n_vocab;
    p.prompt = bad_prompt;
    expect_einval(e, &p, "token 256");
    bad_prompt[3] = -1;
    expect_einval(e, &p, "token -1");
    p = spec_params(&sp, NULL);
    p.n_prompt = 0;
    expect_einval(e, &p, "n_prompt 0");
    p = spec_params(&sp, NULL);
    p.max_tokens = 0;
    expect_einval(e, &p, "max_tokens 0");
    p.max_tokens = -3;
    expect_einval(e, &p, "max_tokens -3");
    p.max_tokens = lim.max_model_len - p.n_prompt + 1;
    expect_einval(e, &p, "prompt + max_tokens > max_model_len");
    p = spec_params(&sp, NULL);
    p.n = ENGINE_MAX_N + 1;
    expect_einval(e, &p, "n = ENGINE_MAX_N + 1");
    p.n = -1;
    expect_einval(e, &p, "n = -1");
    p = spec_params(&sp, NULL);
    p.samp.temperature = 3.0f;
    expect_einval(e, &p, "temperature 3");
    p = spec_params(&sp, NULL);
    int32_t stop_bad = (int32_t)g_n_vocab;
    p.stop_token_ids = &stop_bad;
    p.n_stop_token_ids = 1;
    expect_einval(e, &p, "stop token 256");
    p.stop_token_ids = many_stops;
    p.n_stop_token_ids = ENGINE_MAX_STOP_TOKENS + 1;
    expect_einval(e, &p, "too many stop tokens");

    /* The limits themselves are fine: a prompt that fills max_model_len
     * exactly, and n = 0 (one sample). */
    p = spec_params(&sp, NULL);
    p.max_tokens = lim.max_model_len - p.n_prompt;
    p.ignore_eos = 1;
    struct engine_req *r = NULL;
    CHECK(engine_submit(e, &p, &r, err, sizeof(err)) == ENGINE_OK);
    struct spec full = sp;
    full.max_tokens = p.max_tokens;
    full.ignore_eos = 1;
    struct req_out o;
    collect(r, &full, &o, "errors: full length");
    CHECK(o.s[0].finish == ENGINE_FINISH_LENGTH && o.s[0].n_tok == full.max_tokens);
    out_free(&o);
    engine_release(r);
    p = spec_params(&sp, NULL);
    p.n = 0;
    CHECK(engine_submit(e, &p, &r, err, sizeof(err)) == ENGINE_OK);
    collect(r, &sp, &o, "errors: n 0");
    CHECK(o.n == 1);
    out_free(&o);
    engine_release(r);

    struct engine_stats st;
    idle_stats(e, &st);
    CHECK(st.requests_rejected == 0);
    CHECK(st.requests_submitted == 2);
    engine_destroy(e);
}

/* A long request keeps the only sequence slot busy, so later submits
 * queue up until max_queue is reached. */
static void test_queue_full(struct model *m)
{
    struct engine *e = make_engine(m, 64, 1, 0, 2, NULL);
    struct spec sp;
    memset(&sp, 0, sizeof(sp));
    uint64_t rng = 555;
    sp.n_prompt = 60;
    random_tokens(&rng, sp.prompt, 60);
    sp.max_tokens = 68;
    sp.n = 1; /* one sequence slot */
    sp.ignore_eos = 1;
    sp.top_p = 1.0f;
    sp.temperature = 0.8f;
    struct engine_req *reqs[64];
    int n_reqs = 0, n_full = 0;
    for (int i = 0; i < 64 && n_full < 3; i++) {
        struct engine_params p = spec_params(&sp, NULL);
        char err[256] = "";
        struct engine_req *r = NULL;
        int rc = engine_submit(e, &p, &r, err, sizeof(err));
        if (rc == ENGINE_OK) {
            CHECK(r != NULL);
            reqs[n_reqs++] = r;
        } else if (rc == ENGINE_EFULL) {
            CHECK(err[0] != 0);
            n_full++;
        } else {
            fail("queue full: submit %d gave %d '%s'", i, rc, err);
        }
    }
    if (n_full == 0)
        fail("queue full: no EFULL in 64 submits with max_queue 2");
    CHECK(n_reqs >= 2);
    struct engine_stats st;
    engine_get_stats(e, &st);
    CHECK(st.requests_rejected == n_full);
    /* Wait (bounded) for the first to be running, then release them all
     * without reading a single event: running, waiting, or done. */
    for (int i = 0; i < 500 && st.running == 0; i++) {
        sleep_us(2000);
        engine_get_stats(e, &st);
    }
    if (st.running != 1)
        printf("  queue full: no request seen running before the releases\n");
    for (int i = 0; i < n_reqs; i++)
        engine_release(reqs[i]);
    idle_stats(e, &st);
    CHECK(st.running == 0 && st.waiting == 0 && st.kv_blocks_used == 0);
    CHECK(st.requests_rejected == n_full);
    engine_destroy(e);
}

/* Cancel twice while decoding, then once more after DONE. */
static void test_cancel_twice(struct model *m)
{
    struct engine *e = make_engine(m, 64, 8, 0, 0, NULL);
    struct spec sp;
    memset(&sp, 0, sizeof(sp));
    uint64_t rng = 777;
    sp.n_prompt = 20;
    random_tokens(&rng, sp.prompt, 20);
    sp.max_tokens = 100;
    sp.n = 2;
    sp.ignore_eos = 1;
    sp.temperature = 0.8f;
    sp.top_p = 0.9f;
    sp.seed = 3;
    struct engine_req *r = submit_ok(e, &sp, NULL, "cancel twice");
    struct engine_event ev;
    struct req_out o;
    out_init(&o, &sp);
    /* Wait for the first event, a token, then cancel. */
    CHECK(engine_wait(r, &ev, 1, WAIT_MS) == 1);
    CHECK(ev.kind == ENGINE_EV_TOKEN);
    out_feed(&o, &sp, &ev, "cancel twice");
    engine_cancel(r);
    engine_cancel(r);
    collect_rest(r, &sp, &o, "cancel twice");
    /* Cancelled within a step, long before 100 tokens. */
    for (int s = 0; s < o.n; s++)
        CHECK(o.s[s].finish == ENGINE_FINISH_CANCELLED);
    engine_cancel(r); /* after DONE: harmless */
    struct engine_event extra;
    CHECK(engine_poll(r, &extra, 1) == 0);
    engine_release(r);
    out_free(&o);
    struct engine_stats st;
    idle_stats(e, &st);
    CHECK(st.requests_cancelled == 1);
    CHECK(st.kv_blocks_used == 0);
    engine_destroy(e);
}

static atomic_int order_seq;
static void order_cb(void *arg)
{
    atomic_store((atomic_int *)arg, atomic_fetch_add(&order_seq, 1) + 1);
}
/* Stamps only the first notify: the step of a request's first event. */
static void first_cb(void *arg)
{
    int zero = 0;
    atomic_compare_exchange_strong((atomic_int *)arg, &zero, atomic_fetch_add(&order_seq, 1) + 1);
}

/* Priority: a lower value is admitted first whatever the arrival order,
 * and the preemption victim is the highest value, not the newest. */
static void test_priority(struct model *m)
{
    uint64_t rng = 4242;
    struct spec a, b, c;
    memset(&a, 0, sizeof(a));
    a.n_prompt = 8;
    random_tokens(&rng, a.prompt, 8);
    a.max_tokens = 30;
    a.n = 1;
    a.ignore_eos = 1;
    a.top_p = 1.0f;
    b = c = a;
    random_tokens(&rng, b.prompt, 8);
    random_tokens(&rng, c.prompt, 8);
    /* Admission: one sequence at a time; the blocker runs, then B
     * (priority 5) and C (priority -1) wait; C must go first. */
    struct engine *e = make_engine(m, 64, 1, 0, 0, NULL);
    struct engine_req *ra = submit_ok(e, &a, NULL, "priority blocker");
    struct engine_event ev;
    CHECK(engine_wait(ra, &ev, 1, WAIT_MS) == 1);
    struct engine_params pb = spec_params(&b, NULL), pc = spec_params(&c, NULL);
    pb.priority = 5;
    pc.priority = -1;
    /* B's first event must come in a later step than C's last. */
    atomic_int b_first = 0, c_last = 0;
    pb.notify = first_cb;
    pb.notify_arg = &b_first;
    pc.notify = order_cb;
    pc.notify_arg = &c_last;
    char err[256];
    struct engine_req *rb = NULL, *rc = NULL;
    CHECK(engine_submit(e, &pb, &rb, err, sizeof(err)) == ENGINE_OK);
    CHECK(engine_submit(e, &pc, &rc, err, sizeof(err)) == ENGINE_OK);
    struct req_out ob, oc;
    out_init(&ob, &b);
    out_init(&oc, &c);
    collect_rest(rb, &b, &ob, "priority b");
    collect_rest(rc, &c, &oc, "priority c");
    out_free(&ob);
    out_free(&oc);
    for (int t = 0; t < 200 && (atomic_load(&b_first) == 0 || atomic_load(&c_last) == 0); t++)
        sleep_us(10000);
    if (!(atomic_load(&c_last) > 0 && atomic_load(&b_first) > atomic_load(&c_last)))
        fail("priority: the priority 5 request ran before the priority -1 one (%d, %d)",
             atomic_load(&b_first), atomic_load(&c_last));
    engine_release(ra);
    engine_release(rb);
    engine_release(rc);
    engine_destroy(e);

    /* Preemption: B (priority 5) arrives first, A (priority 0) second; six
     * blocks cannot hold both to their 5 blocks each, so one is preempted:
     * B, so A finishes first. (With equal priorities A, the newest, would
     * be the victim.) */
    for (int prio = 0; prio < 2; prio++) {
        struct spec x = a, y = b;
        x.n_prompt = y.n_prompt = 16;
        random_tokens(&rng, x.prompt, 16);
        random_tokens(&rng, y.prompt, 16);
        x.max_tokens = y.max_tokens = 60;
        e = make_engine(m, 6, 2, 0, 0, NULL);
        struct engine_params px = spec_params(&x, NULL), py = spec_params(&y, NULL);
        py.priority = prio ? 5 : 0;
        /* Finish order, robust to polling: each request's notify stamps a
         * global sequence; the last stamp is its DONE's step. */
        atomic_int lx = 0, ly = 0;
        px.notify = order_cb;
        px.notify_arg = &lx;
        py.notify = order_cb;
        py.notify_arg = &ly;
        struct engine_req *rx = NULL, *ry = NULL;
        CHECK(engine_submit(e, &py, &ry, err, sizeof(err)) == ENGINE_OK);
        CHECK(engine_submit(e, &px, &rx, err, sizeof(err)) == ENGINE_OK);
        struct spec sx = x, sy = y;
        struct req_out ox, oy;
        out_init(&ox, &sx);
        out_init(&oy, &sy);
        collect_rest(rx, &sx, &ox, "preemption order x");
        collect_rest(ry, &sy, &oy, "preemption order y");
        out_free(&ox);
        out_free(&oy);
        int first;
        struct engine_stats st;
        idle_stats(e, &st);
        CHECK(st.preemptions > 0);
        for (int t = 0; t < 200 && (atomic_load(&lx) == 0 || atomic_load(&ly) == 0); t++)
            sleep_us(10000);
        first = atomic_load(&lx) < atomic_load(&ly) ? 'x' : 'y';
        if (first != (prio ? 'x' : 'y'))
            fail("preemption with %s priorities: %c finished first", prio ? "different" : "equal",
                 first ? first : '?');
        engine_release(rx);
        engine_release(ry);
        engine_destroy(e);
    }
}

/* engine_destroy with requests still live and unreleased: they stay
 * readable, and each ends in DONE. */
static void test_destroy_live(struct model *m)
{
    struct engine *e = make_engine(m, 16, 2, 0, 0, NULL);
    struct spec sp[5];
    uint64_t rng = 888;
    struct engine_req *r[5];
    for (int i = 0; i < 5; i++) {
        memset(&sp[i], 0, sizeof(sp[i]));
        sp[i].n_prompt = 30;
        random_tokens(&rng, sp[i].prompt, 30);
        sp[i].max_tokens = 90;
        sp[i].n = i == 0 ? 2 : 1;
        sp[i].ignore_eos = 1;
        sp[i].top_p = 1.0f;
        if (i < 4)
            r[i] = submit_ok(e, &sp[i], NULL, "destroy live");
    }
    struct engine_event ev;
    struct req_out o;
    out_init(&o, &sp[0]);
    CHECK(engine_wait(r[0], &ev, 1, WAIT_MS) == 1); /* it is running */
    CHECK(ev.kind == ENGINE_EV_TOKEN);
    out_feed(&o, &sp[0], &ev, "destroy live 0");
    /* The last one most likely still sits in the inbox. */
    r[4] = submit_ok(e, &sp[4], NULL, "destroy live");
    engine_destroy(e);
    for (int i = 0; i < 5; i++) {
        char what[32];
        snprintf(what, sizeof(what), "destroy live %d", i);
        if (i > 0)
            out_init(&o, &sp[i]);
        collect_rest(r[i], &sp[i], &o, what);
        for (int s = 0; s < o.n; s++)
            CHECK(o.s[s].finish == ENGINE_FINISH_CANCELLED || o.s[s].finish == ENGINE_FINISH_LENGTH);
        out_free(&o);
        engine_release(r[i]);
    }
}

/* ---- the suite -------------------------------------------------------- */

static void run_suite(const char *path, const char *name)
{
    char err[512];
    struct model *m;
    struct model_opts mo = {.n_threads = 2};
    if (model_load(path, &mo, &m, err, sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    const struct model_config *c = model_get_config(m);
    g_n_vocab = c->n_vocab;
    g_eos = c->eos_id;
    struct kv_geom g = model_kv_geom(m);
    g_block_bytes = 2 * g.n_layer * g.n_kv_heads * g.head_dim * 4 * BLOCK_TOKENS;
    CHECK(g_block_bytes == kv_bytes_per_token(&g) * BLOCK_TOKENS);
    CHECK(g_n_vocab == 256 && c->n_ctx == 128);

    double t0 = now_s();
    test_errors(m);
    test_queue_full(m);
    test_cancel_twice(m);
    test_priority(m);
    test_destroy_live(m);
    test_prefix_cache(m);
    test_preemption(m);
    double t1 = now_s();
    printf("%s: directed tests %.2f s\n", name, t1 - t0);

    static const uint64_t seeds[] = {1, 2, 3};
    struct spec *specs = calloc(N_SPECS, sizeof(*specs));
    struct req_out *solo = calloc(N_SPECS, sizeof(*solo));
    for (size_t k = 0; k < sizeof(seeds) / sizeof(seeds[0]); k++) {
        double a = now_s();
        make_specs(specs, N_SPECS, seeds[k]);
        solo_runs(m, specs, N_SPECS, solo, 1);
        double b = now_s();
        mix_run(m, specs, N_SPECS, solo, seeds[k], 16, name);
        printf("%s: seed %llu: solo %.2f s, mix %.2f s\n", name, (unsigned long long)seeds[k],
               b - a, now_s() - b);
        for (int i = 0; i < N_SPECS; i++)
            out_free(&solo[i]);
    }
    free(specs);
    free(solo);
    model_destroy(m);
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3 || (argc == 3 && strcmp(argv[2], "async") != 0)) {
        fprintf(stderr, "usage: test_engine MODEL_DIR [async]\n");
        return 2;
    }
    g_async = argc == 3;
    char gguf[4096];
    snprintf(gguf, sizeof(gguf), "%s/model-q8_0.gguf", argv[1]);
    double t0 = now_s();
    run_suite(argv[1], "f32");
    run_suite(gguf, "q8_0");
    if (g_async) {
        /* the mixes must have run chains of steps ahead, or this mode
         * tested nothing */
        printf("engine: %lld decode steps launched ahead\n", (long long)g_steps_ahead);
        CHECK(g_steps_ahead > 0);
    }
    int nf = atomic_load(&failures);
    if (nf)
        fprintf(stderr, "%d checks failed\n", nf);
    else
        printf("engine: all checks passed (%.1f s)\n", now_s() - t0);
    return nf ? 1 : 0;
}
