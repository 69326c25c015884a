/* scheduler.c: one step of continuous batching, on the engine thread.
 *
 * Each step plans a batch under the token budget (max_batched_tokens):
 *   1. one decode row for every running sample that has a sampled token to
 *      feed, oldest admission first; when a block cannot be had, the newest
 *      running sample (highest priority value, latest arrival) is preempted:
 *      its blocks are freed and it waits to be recomputed;
 *   2. the next prefill chunk of running samples still computing their
 *      prompt (chunked prefill: a long prompt takes many steps, and the
 *      decode rows of the others ride along in every one of them);
 *   3. admission of waiting samples in (priority, arrival) order while the
 *      budget, max_seqs and free blocks allow, each first attaching the
 *      longest cached prefix of its tokens.
 * then runs the model over the batch and samples one token for every sample
 * whose rows reached its last token.
 *
 * Results do not depend on the plan: model_forward computes each row the
 * same way whatever the batch (tests/unit/test_engine.c checks it bit for
 * bit), the sampler of each sample is its own, and a preempted sample keeps
 * its sampler and tokens, so recomputing it reproduces the same logits. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine_internal.h"

/* ------------------------------------------------------------ lists */

/* Waiting order: priority, then arrival, then sample index. */
static int wait_before(const struct seq *a, const struct seq *b)
{
    if (a->r->priority != b->r->priority)
        return a->r->priority < b->r->priority;
    if (a->r->id != b->r->id)
        return a->r->id < b->r->id;
    return a->index < b->index;
}

int sched_wait(struct engine *e, struct seq *s)
{
    if (e->n_waiting == e->cap_waiting) {
        int cap = e->cap_waiting ? 2 * e->cap_waiting : 64;
        struct seq **nw = realloc(e->waiting, (size_t)cap * sizeof(*nw));
        if (!nw)
            return -1;
        e->waiting = nw;
        e->cap_waiting = cap;
    }
    int pos = e->n_waiting;
    while (pos > 0 && wait_before(s, e->waiting[pos - 1]))
        pos--;
    memmove(e->waiting + pos + 1, e->waiting + pos,
            (size_t)(e->n_waiting - pos) * sizeof(*e->waiting));
    e->waiting[pos] = s;
    e->n_waiting++;
    s->state = SEQ_WAITING;
    s->kv = -1;
    s->computed = 0;
    return 0;
}

static void list_remove(struct seq **list, int *n, struct seq *s)
{
    for (int i = 0; i < *n; i++) {
        if (list[i] == s) {
            memmove(list + i, list + i + 1, (size_t)(*n - i - 1) * sizeof(*list));
            (*n)--;
            return;
        }
    }
}

void sched_unlink(struct engine *e, struct seq *s)
{
    if (s->state == SEQ_RUNNING)
        list_remove(e->running, &e->n_running, s);
    else if (s->state == SEQ_WAITING)
        list_remove(e->waiting, &e->n_waiting, s);
}

/* ------------------------------------------------------------ preemption */

/* Whether a is preempted before b: the higher priority value, then the
 * later arrival (the one the waiting order would admit last). */
static int evict_before(const struct seq *a, const struct seq *b)
{
    return wait_before(b, a);
}

/* The sample to preempt so that `self` can grow: the running sample not in
 * this step's batch that comes first in eviction order, or self when self
 * comes before all of them. self may be NULL. */
static struct seq *pick_victim(struct engine *e, struct seq *self)
{
    struct seq *best = self;
    for (int i = 0; i < e->n_running; i++) {
        struct seq *v = e->running[i];
        if (v == self || v->sched > 0)
            continue;
        if (!best || evict_before(v, best))
            best = v;
    }
    return best;
}

/* Frees s's blocks and queues it to be recomputed. Its published blocks
 * stay in the prefix cache, so the recompute usually attaches most of its
 * tokens instead of computing them. */
static void preempt(struct engine *e, struct seq *s)
{
    sched_unlink(e, s);
    kv_seq_close(e->kv, s->kv);
    s->kv = -1;
    s->sched = 0;
    e->w.preemptions++;
    if (sched_wait(e, s) != 0)
        engine_finish_seq(e, s, ENGINE_FINISH_ERROR, -1, "out of memory requeueing a preempted request");
}

/* Reserves blocks for s up to n_tokens, preempting others (or s itself)
 * until it fits. Returns 0, or -1 when s was preempted. */
static int reserve_or_preempt(struct engine *e, struct seq *s, int64_t n_tokens)
{
    while (kv_seq_reserve(e->kv, s->kv, n_tokens) != 0) {
        struct seq *v = pick_victim(e, s);
        preempt(e, v);
        if (v == s)
            return -1;
    }
    return 0;
}

/* ------------------------------------------------------------ planning */

static void schedule(struct engine *e, struct seq *s, int64_t rows)
{
    s->sched = (int)rows;
    e->sched[e->n_sched++] = s;
}

/* Tokens s can still store: its free block slots plus every free block. */
static int64_t room_for(struct engine *e, const struct seq *s, int64_t reserve_blocks)
{
    int64_t free_blocks = kv_free_blocks(e->kv) - reserve_blocks;
    if (free_blocks < 0)
        free_blocks = 0;
    return kv_seq_capacity(e->kv, s->kv) - s->computed + free_blocks * KV_BLOCK_TOKENS;
}

/* Whether w should wait for a running sample that is computing blocks w
 * could then reuse from the prefix cache: computing them twice at once
 * would waste the step (a burst of requests with one system prompt costs
 * one prefill, not one each). */
static int defer_for_prefix(struct engine *e, const struct seq *w)
{
    for (int i = 0; i < e->n_running; i++) {
        const struct seq *s = e->running[i];
        if (s->n_tokens - s->computed <= 1)
            continue;
        int64_t stored = s->computed / KV_BLOCK_TOKENS * KV_BLOCK_TOKENS;
        int64_t lim = w->n_tokens - 1 < s->n_tokens ? w->n_tokens - 1 : s->n_tokens;
        lim = lim / KV_BLOCK_TOKENS * KV_BLOCK_TOKENS;
        if (lim <= stored)
            continue;
        int64_t cmp = stored + KV_BLOCK_TOKENS;
        if (w->tokens[0] == s->tokens[0] &&
            memcmp(w->tokens, s->tokens, (size_t)cmp * sizeof(int32_t)) == 0)
            return 1;
    }
    return 0;
}

static void plan(struct engine *e)
{
    const struct engine_limits *l = &e->lim;
    int64_t budget = l->max_batched_tokens;
    e->n_sched = 0;
    for (int i = 0; i < e->n_running; i++)
        e->running[i]->sched = 0;

    /* 1. Decode rows. Iterate over a snapshot: preemption edits the list. */
    int n = e->n_running;
    memcpy(e->order, e->running, (size_t)n * sizeof(*e->order));
    for (int i = 0; i < n && budget > 0; i++) {
        struct seq *s = e->order[i];
        if (s->state != SEQ_RUNNING || s->n_tokens - s->computed != 1)
            continue;
        if (reserve_or_preempt(e, s, s->computed + 1) != 0)
            continue;
        schedule(e, s, 1);
        budget--;
    }

    /* 2. Prefill chunks of running samples. */
    n = e->n_running;
    memcpy(e->order, e->running, (size_t)n * sizeof(*e->order));
    for (int i = 0; i < n && budget > 0; i++) {
        struct seq *s = e->order[i];
        int64_t pending = s->n_tokens - s->computed;
        if (s->state != SEQ_RUNNING || s->sched > 0 || pending <= 1)
            continue;
        int64_t chunk = pending < budget ? pending : budget;
        int64_t room = room_for(e, s, 0);
        if (chunk > room)
            chunk = room;
        if (chunk <= 0 || kv_seq_reserve(e->kv, s->kv, s->computed + chunk) != 0)
            continue;
        schedule(e, s, chunk);
        budget -= chunk;
    }

    /* 3. Admission. A watermark of free blocks is kept for the running
     * samples' next decode rows, so admitting does not immediately force a
     * preemption; with nothing running the whole cache is there. */
    int64_t watermark = kv_n_blocks(e->kv) / 100;
    if (watermark < 1)
        watermark = 1;
    for (int wi = 0; wi < e->n_waiting && budget > 0 && e->n_running < l->max_seqs;) {
        struct seq *w = e->waiting[wi];
        if (e->n_running > 0 && defer_for_prefix(e, w)) {
            wi++;
            continue;
        }
        int64_t keep = e->n_running > 0 ? watermark : 0;
        if (kv_free_blocks(e->kv) <= keep)
            break;
        int kvid = kv_seq_open(e->kv, w->r->rope_long);
        if (kvid < 0)
            break;
        int64_t hit = kv_seq_attach_prefix(e->kv, kvid, w->tokens, w->n_tokens);
        hit += kv_seq_attach_partial(e->kv, kvid, w->tokens, w->n_tokens);
        w->kv = kvid;
        w->computed = hit;
        int64_t pending = w->n_tokens - hit;
        int64_t chunk = pending < budget ? pending : budget;
        int64_t room = room_for(e, w, keep);
        if (chunk > room)
            chunk = room;
        if (chunk <= 0 || kv_seq_reserve(e->kv, kvid, hit + chunk) != 0) {
            /* Head of the line does not fit: admit nobody behind it. */
            kv_seq_close(e->kv, kvid);
            w->kv = -1;
            w->computed = 0;
            break;
        }
        memmove(e->waiting + wi, e->waiting + wi + 1,
                (size_t)(e->n_waiting - wi - 1) * sizeof(*e->waiting));
        e->n_waiting--;
        w->state = SEQ_RUNNING;
        w->admitted = ++e->admit_counter;
        e->running[e->n_running++] = w;
        struct engine_req *r = w->r;
        if (!r->admitted_once && w->index == 0) {
            r->admitted_once = 1;
            r->cached_tokens = hit;
            engine_hist_observe(&e->w.queue_time, engine_now() - r->t_submit);
        }
        schedule(e, w, chunk);
        budget -= chunk;
    }
}

/* ------------------------------------------------------------ sampling */

static int is_stop(const struct engine *e, const struct engine_req *r, int32_t tok)
{
    if (!r->ignore_eos && tok == e->cfg->eos_id)
        return 1;
    for (int i = 0; i < r->n_stop; i++)
        if (r->stop_ids[i] == tok)
            return 1;
    return 0;
}

/* Takes s's next token, drawn on the host or by the model's device:
 * events, stop checks, bookkeeping. */
static void took(struct engine *e, struct seq *s, const struct samp_result *res)
{
    struct engine_req *r = s->r;
    struct engine_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.tok = *res;
    int32_t tok = res->token;
    double t = engine_now();
    if (s->t_last == 0)
        engine_hist_observe(&e->w.ttft, t - r->t_submit);
    else
        engine_hist_observe(&e->w.itl, t - s->t_last);
    s->t_last = t;
    if (tok < 0) {
        engine_finish_seq(e, s, ENGINE_FINISH_ERROR, -1, "the model produced no finite logit");
        return;
    }
    e->w.generation_tokens++;
    r->completion_tokens++;
    if (is_stop(e, r, tok)) {
        engine_finish_seq(e, s, ENGINE_FINISH_STOP, tok, NULL);
        return;
    }
    ev.kind = ENGINE_EV_TOKEN;
    ev.index = s->index;
    ev.stop_token = -1;
    engine_post(e, r, &ev);
    samp_accept(s->samp, tok);
    s->tokens[s->n_tokens++] = tok;
    s->n_gen++;
    if (s->n_gen >= r->max_tokens)
        engine_finish_seq(e, s, ENGINE_FINISH_LENGTH, -1, NULL);
}

/* Samples the next token of s from row (n_vocab logits, modified). */
static void sample(struct engine *e, struct seq *s, float *row)
{
    struct samp_result res;
    samp_sample(s->samp, row, &res);
    took(e, s, &res);
}

/* Samples 1..n-1 are born when sample 0 first finishes the prompt: each
 * takes a fork of its KV sequence (the prompt's blocks shared) and draws
 * its first token from the same logits. With no room they wait and
 * recompute the prompt through the prefix cache instead. */
static void fork_samples(struct engine *e, struct seq *s, const float *row)
{
    struct engine_req *r = s->r;
    r->forked = 1;
    size_t bytes = (size_t)e->cfg->n_vocab * sizeof(float);
    for (int i = 1; i < r->n; i++) {
        struct seq *c = &r->seqs[i];
        if (c->state != SEQ_UNBORN)
            continue;
        int kvid = e->n_running < e->lim.max_seqs ? kv_seq_fork(e->kv, s->kv) : -1;
        if (kvid < 0) {
            if (sched_wait(e, c) != 0)
                engine_finish_seq(e, c, ENGINE_FINISH_ERROR, -1, "out of memory queueing a sample");
            continue;
        }
        c->kv = kvid;
        c->computed = s->computed;
        c->state = SEQ_RUNNING;
        c->admitted = ++e->admit_counter;
        e->running[e->n_running++] = c;
        memcpy(e->logits_copy, row, bytes);
        sample(e, c, e->logits_copy);
    }
}

/* Whether s's next token must be drawn on the host from its logits row:
 * sample 0 finishing the prompt of a request with n > 1, whose row the
 * forked samples draw from too. Every other draw happens inside
 * model_forward_sample (on the GPU there). */
static int draws_on_host(const struct seq *s)
{
    return s->index == 0 && s->r->n > 1 && !s->r->forked;
}

/* After the model ran s's scheduled rows: publish its new full blocks and,
 * when the rows reached its last token, take the token drawn (res) or
 * sample it from row. */
static void advance(struct engine *e, struct seq *s, float *row, const struct samp_result *res)
{
    if (!(s->n_gen > 0 && s->sched == 1)) /* recompute counts as prompt */
        e->w.prompt_tokens_computed += s->sched;
    s->computed += s->sched;
    s->sched = 0;
    kv_seq_publish(e->kv, s->kv, s->tokens, s->computed);
    if (res) {
        took(e, s, res);
        return;
    }
    if (!row)
        return;
    if (draws_on_host(s))
        fork_samples(e, s, row);
    sample(e, s, row);
}

/* ------------------------------------------------------------ the step */

static int64_t fill_rows(struct engine *e, struct seq *const *list, int n, int64_t *n_want)
{
    int64_t k = 0;
    *n_want = 0;
    for (int i = 0; i < n; i++) {
        const struct seq *s = list[i];
        for (int64_t p = s->computed; p < s->computed + s->sched; p++) {
            e->rows[k].token = s->tokens[p];
            e->rows[k].seq = s->kv;
            e->rows[k].pos = p;
            e->rows[k].want_logits = p == s->n_tokens - 1;
            *n_want += e->rows[k].want_logits;
            k++;
        }
    }
    return k;
}

static int ensure_logits(struct engine *e, int64_t rows)
{
    if (rows <= e->cap_logits)
        return 0;
    float *nl = realloc(e->logits, (size_t)rows * (size_t)e->cfg->n_vocab * sizeof(float));
    if (!nl)
        return -1;
    e->logits = nl;
    e->cap_logits = rows;
    return 0;
}

/* Runs the model over the scheduled samples list[0..n) and advances each:
 * their rows in one batch, one draw per sample whose rows reach its last
 * token (on the host only where draws_on_host says). Returns 0, or -1
 * with the model's message in err and nothing advanced. */
static int run_batch(struct engine *e, struct seq *const *list, int n_list, int64_t *n_rows,
                     char *err, size_t errlen)
{
    int64_t want;
    int64_t n = fill_rows(e, list, n_list, &want);
    *n_rows = n;
    if (ensure_logits(e, want) != 0) {
        snprintf(err, errlen, "out of memory for logits");
        return -1;
    }
    int64_t ns = 0, k = 0;
    for (int i = 0; i < n_list; i++) {
        struct seq *s = list[i];
        e->samp_of[i] = -1;
        if (s->computed + s->sched != s->n_tokens)
            continue;
        if (!draws_on_host(s)) {
            e->samples[ns].row = k;
            e->samples[ns].s = s->samp;
            e->samp_of[i] = (int)ns++;
        }
        k++;
    }
    if (model_forward_sample(e->m, e->kv, e->rows, n, e->logits, e->samples, ns, err, errlen))
        return -1;
    k = 0;
    for (int i = 0; i < n_list; i++) {
        struct seq *s = list[i];
        int last = s->computed + s->sched == s->n_tokens;
        float *row = last ? e->logits + (size_t)(k++) * (size_t)e->cfg->n_vocab : NULL;
        advance(e, s, row, e->samp_of[i] >= 0 ? &e->samples[e->samp_of[i]].res : NULL);
    }
    return 0;
}

/* The batch failed as a whole (it should not: requests are validated at
 * submit). Run each sample alone so that only one that fails by itself
 * fails, with the model's message. */
static void run_isolated(struct engine *e)
{
    char err[256];
    for (int i = 0; i < e->n_sched; i++) {
        struct seq *s = e->sched[i];
        int64_t n;
        if (run_batch(e, &s, 1, &n, err, sizeof(err)) != 0)
            engine_end_request(e, s->r, ENGINE_FINISH_ERROR, err);
    }
}

/* ------------------------------------------------------------ async */

/* Whether s's next draw may be launched before its last one reaches the
 * host (ahead draws in flight after this one): a running decode sample
 * whose draw happens in the step and needs no token the host has not
 * seen (penalties read every generated token), and which cannot reach
 * max_tokens before the one launched ahead (that row would be past it). */
static int can_run_ahead(const struct engine *e, const struct seq *s, int ahead)
{
    (void)e;
    if (s->state != SEQ_RUNNING || draws_on_host(s))
        return 0;
    if (s->n_gen + 1 + ahead > s->r->max_tokens)
        return 0;
    struct samp_view v;
    samp_view_get(s->samp, &v);
    return !v.penalties;
}

/* Launches fl[0..n) (one decode row each, its token MODEL_TOKEN_PREV of
 * the launch before when prev, else known) without collecting it. The
 * requests are held until the step is collected. Returns 0, or -1 with
 * nothing launched. */
static int launch_ahead(struct engine *e, struct seq *const *list, int n, int prev)
{
    int buf = e->fl_buf ^ 1;
    struct model_sample *smp = e->ahead_samples[buf];
    for (int k = 0; k < n; k++) {
        const struct seq *s = list[k];
        int64_t pos = prev ? s->computed + 1 : s->computed;
        e->fl_rows[k].token = prev ? MODEL_TOKEN_PREV(k) : s->tokens[pos];
        e->fl_rows[k].seq = s->kv;
        e->fl_rows[k].pos = pos;
        e->fl_rows[k].want_logits = 1;
        smp[k].row = k;
        smp[k].s = s->samp;
        smp[k].ahead = prev ? 1 : 0;
    }
    char err[256];
    if (ensure_logits(e, n) != 0 ||
        model_launch(e->m, e->kv, e->fl_rows, n, e->logits, smp, n, err, sizeof(err)))
        return -1;
    for (int k = 0; k < n; k++)
        engine_req_hold(list[k]->r);
    e->fl_buf = buf;
    e->w.steps_ahead += prev;
    return 0;
}

/* Collects the step in flight (fl, its samples fl_samples) and advances
 * every sample of it still running. */
static void collect_inflight(struct engine *e, struct seq **fl, int n,
                             struct model_sample *smp)
{
    char err[256];
    int rc = model_collect(e->m, err, sizeof(err));
    for (int k = 0; k < n; k++) {
        struct seq *s = fl[k];
        if (s->state == SEQ_RUNNING && s->sched == 1) {
            if (rc == 0)
                advance(e, s, NULL, &smp[k].res);
            else
                engine_end_request(e, s->r, ENGINE_FINISH_ERROR, err);
        }
    }
    for (int k = 0; k < n; k++)
        engine_req_unhold(fl[k]->r);
}

/* The step in flight: launch the next one ahead of it when every one of
 * its samples can go on (nobody waiting to be admitted, blocks for one
 * more row each), then take its tokens. */
static int64_t step_inflight(struct engine *e)
{
    int n = e->n_fl;
    struct seq **fl = e->fl;
    struct model_sample *smp = e->fl_samples;
    int ahead = e->n_waiting == 0;
    for (int k = 0; k < n && ahead; k++) {
        struct seq *s = fl[k];
        ahead = s->sched == 1 && can_run_ahead(e, s, 1) &&
                kv_seq_reserve(e->kv, s->kv, s->computed + 2) == 0;
    }
    if (ahead && launch_ahead(e, fl, n, 1) != 0)
        ahead = 0;
    e->n_fl = 0;
    collect_inflight(e, fl, n, smp);
    if (!ahead)
        return n;
    /* The step launched ahead is in flight now: its samples that are still
     * running have their row scheduled (position computed, the token just
     * taken), the others' results will be dropped. */
    for (int k = 0; k < n; k++) {
        e->fl_next[k] = fl[k];
        if (fl[k]->state == SEQ_RUNNING)
            fl[k]->sched = 1;
    }
    struct seq **t = e->fl;
    e->fl = e->fl_next;
    e->fl_next = t;
    e->fl_samples = e->ahead_samples[e->fl_buf];
    e->n_fl = n;
    return n;
}

void sched_drain(struct engine *e)
{
    if (e->n_fl == 0)
        return;
    int n = e->n_fl;
    e->n_fl = 0;
    collect_inflight(e, e->fl, n, e->fl_samples);
}

/* Whether this plan may start a chain of steps launched ahead: decode rows
 * only, each able to run ahead, nobody waiting. */
static int plan_runs_ahead(const struct engine *e)
{
    /* every running sample in the step: a chain only carries its own */
    if (!e->async || e->n_waiting > 0 || e->n_sched == 0 || e->n_sched != e->n_running)
        return 0;
    for (int i = 0; i < e->n_sched; i++) {
        const struct seq *s = e->sched[i];
        if (s->sched != 1 || s->n_tokens - s->computed != 1 || !can_run_ahead(e, s, 1))
            return 0;
    }
    return 1;
}

int64_t sched_step(struct engine *e)
{
    if (e->n_fl > 0) {
        double t0 = engine_now();
        int64_t n = step_inflight(e);
        e->w.steps++;
        engine_hist_observe(&e->w.step_time, engine_now() - t0);
        engine_hist_observe(&e->w.tokens_per_step, (double)n);
        return n;
    }
    if (e->n_running == 0 && e->n_waiting == 0)
        return 0;
    plan(e);
    /* Nothing could run: the running samples hold every block between
     * them (all mid-prefill). Preempt the newest until one can. */
    while (e->n_sched == 0 && e->n_running > 0) {
        preempt(e, pick_victim(e, NULL));
        plan(e);
    }
    if (e->n_sched == 0) {
        /* Nothing running, and the head of the queue does not fit in an
         * empty cache: only a budget below one request could do that. */
        if (e->n_waiting > 0)
            engine_end_request(e, e->waiting[0]->r, ENGINE_FINISH_ERROR,
                               "the request does not fit in the KV cache");
        return 0;
    }
    double t0 = engine_now();
    int64_t n;
    char err[256];
    if (plan_runs_ahead(e) && launch_ahead(e, e->sched, e->n_sched, 0) == 0) {
        /* in flight: taken by the next call, after it launches the step
         * after this one */
        memcpy(e->fl, e->sched, (size_t)e->n_sched * sizeof(*e->fl));
        e->n_fl = e->n_sched;
        e->fl_samples = e->ahead_samples[e->fl_buf];
        n = e->n_sched;
    } else if (run_batch(e, e->sched, e->n_sched, &n, err, sizeof(err)) != 0) {
        run_isolated(e);
    }
    e->n_sched = 0;
    e->w.steps++;
    engine_hist_observe(&e->w.step_time, engine_now() - t0);
    engine_hist_observe(&e->w.tokens_per_step, (double)n);
    return n;
}
