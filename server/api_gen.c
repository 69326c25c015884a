/* api_gen.c: one generation in flight, from engine_submit to the last byte.
 *
 * A gen owns the engine requests of one HTTP request (one per prompt; each
 * carries the n samples of its prompt) and, per choice, the incremental
 * detokenizer and the stop-string matcher. The engine thread only marks a
 * gen ready (gen_notify) and wakes the loop once per step; the loop then
 * drains every ready gen's events and turns them into OpenAI's wire
 * format: SSE chunks as they come, or one JSON body at the end.
 *
 * Lifetime: a gen is freed on the loop thread when its response is
 * complete, when the client goes away (on_abort), or when the client stops
 * reading and its queued output passes the bound (then the request is
 * cancelled and the reason logged). Its engine requests are released
 * first, after which the engine never calls gen_notify for them again; it
 * is unlinked from the ready list under the lock, so no stale pointer
 * stays there. Event loop thread, except gen_notify.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/stop.h"
#include "engine/tokenizer.h"
#include "server/api_internal.h"
#include "server/http.h"
#include "server/log.h"

struct choice {
    struct tok_stream *ts;
    struct stop_matcher *sm;
    int done;             /* no more text: finished, or a stop string matched */
    int fin;              /* API_FIN_* */
    int64_t n_tokens;     /* tokens generated up to the end (usage) */
    char *text;           /* the whole text (non-streaming) */
    size_t len, cap;
    int64_t chars;        /* characters emitted so far (text_offset) */
    struct samp_result *lp; /* logprobs of each token, when asked */
    int64_t *lp_off;      /* completions: text_offset of each */
    size_t n_lp, cap_lp, lp_sent;
};

struct sub {
    struct engine_req *er;
    int done;
    int64_t prompt_tokens, cached_tokens;
};

struct gen {
    struct api *a;
    struct http_req *req;
    struct api_gen_spec spec;
    struct sub *subs;
    int n_subs, n_subs_done;
    struct choice *ch;
    int n_ch;
    char id[API_ID_LEN];
    int64_t created;
    double t0, t_first, last_write;
    int failed;           /* 0, or the HTTP status of the failure */
    char fail_msg[160];
    struct jw w;          /* scratch for each chunk or the body */
    /* ready list (guarded by a->ready_mu) */
    int in_ready;
    struct gen *ready_next;
    /* live list (loop thread) */
    struct gen *live_prev, *live_next;
};

static const char *const fin_names[] = {"stop", "length", "abort", "error"};

/* -------------------------------------------------------- engine thread */

static void gen_notify(void *arg)
{
    struct gen *g = arg;
    struct api *a = g->a;
    pthread_mutex_lock(&a->ready_mu);
    if (!g->in_ready) {
        g->in_ready = 1;
        g->ready_next = a->ready_head;
        a->ready_head = g;
    }
    pthread_mutex_unlock(&a->ready_mu);
}

/* ------------------------------------------------------------ lifetime */

static void gen_free(struct gen *g)
{
    struct api *a = g->a;
    for (int i = 0; i < g->n_subs; i++)
        if (g->subs[i].er)
            engine_release(g->subs[i].er);
    /* engine_release returned: gen_notify cannot run for g any more */
    pthread_mutex_lock(&a->ready_mu);
    if (g->in_ready) {
        for (struct gen **pp = &a->ready_head; *pp; pp = &(*pp)->ready_next)
            if (*pp == g) {
                *pp = g->ready_next;
                break;
            }
    }
    pthread_mutex_unlock(&a->ready_mu);
    if (g->live_prev)
        g->live_prev->live_next = g->live_next;
    else if (a->live_head == g)
        a->live_head = g->live_next;
    if (g->live_next)
        g->live_next->live_prev = g->live_prev;
    a->n_live--;
    for (int i = 0; i < g->n_ch; i++) {
        struct choice *c = &g->ch[i];
        tok_stream_destroy(c->ts);
        stop_destroy(c->sm);
        free(c->text);
        free(c->lp);
        free(c->lp_off);
    }
    free(g->ch);
    free(g->subs);
    api_spec_free(&g->spec);
    jw_free(&g->w);
    free(g);
}

static int64_t usage_completion(const struct gen *g)
{
    int64_t n = 0;
    for (int i = 0; i < g->n_ch; i++)
        n += g->ch[i].n_tokens;
    return n;
}

static int64_t usage_prompt(const struct gen *g)
{
    int64_t n = 0;
    for (int i = 0; i < g->n_subs; i++)
        n += g->subs[i].prompt_tokens;
    return n;
}

static int64_t usage_cached(const struct gen *g)
{
    int64_t n = 0;
    for (int i = 0; i < g->n_subs; i++)
        n += g->subs[i].cached_tokens;
    return n;
}

/* Ends the request without an answer: engine work cancelled, connection
 * dropped (drop_conn) or already gone. */
static void gen_kill(struct gen *g, int drop_conn, int status)
{
    struct api *a = g->a;
    if (g->req)
        api_access_log(a, g->req, status, usage_prompt(g), usage_completion(g),
                       g->t_first > 0 ? g->t_first - g->t0 : -1);
    if (drop_conn && g->req)
        http_abort(g->req);
    a->finished_by_reason[API_FIN_ABORT] += (uint64_t)g->n_ch;
    gen_free(g);
}

/* --------------------------------------------------------------- output */

static void write_usage(struct jw *w, const struct gen *g)
{
    int64_t p = usage_prompt(g), c = usage_completion(g);
    jw_obj(w);
    jw_key(w, "prompt_tokens");
    jw_int(w, p);
    jw_key(w, "completion_tokens");
    jw_int(w, c);
    jw_key(w, "total_tokens");
    jw_int(w, p + c);
    jw_key(w, "prompt_tokens_details");
    jw_obj(w);
    jw_key(w, "cached_tokens");
    jw_int(w, usage_cached(g));
    jw_obj_end(w);
    jw_obj_end(w);
}

/* A token's text for logprobs: its bytes (lossy UTF-8 in the string, the
 * exact bytes in "bytes"). */
static void write_token_bytes(struct jw *w, struct api *a, int32_t id, int with_bytes)
{
    size_t len = 0;
    const char *b = tokenizer_token_bytes(a->tok, id, &len);
    jw_key(w, "token");
    jw_strn(w, b ? b : "", b ? len : 0);
    if (with_bytes) {
        jw_key(w, "bytes");
        jw_arr(w);
        for (size_t i = 0; b && i < len; i++)
            jw_int(w, (unsigned char)b[i]);
        jw_arr_end(w);
    }
}

static double lp_value(float v)
{
    /* OpenAI writes a token that cannot occur as -9999.0 */
    return isfinite(v) ? (double)v : -9999.0;
}

/* Chat shape: {"content": [...], "refusal": null} over tokens [from, to). */
static void write_chat_logprobs(struct jw *w, struct gen *g, const struct choice *c,
                                size_t from, size_t to)
{
    jw_obj(w);
    jw_key(w, "content");
    jw_arr(w);
    for (size_t i = from; i < to; i++) {
        const struct samp_result *r = &c->lp[i];
        jw_obj(w);
        write_token_bytes(w, g->a, r->token, 1);
        jw_key(w, "logprob");
        jw_num(w, lp_value(r->logprob));
        jw_key(w, "top_logprobs");
        jw_arr(w);
        for (int k = 0; k < r->n_top && k < g->spec.top_logprobs; k++) {
            jw_obj(w);
            write_token_bytes(w, g->a, r->top[k].token, 1);
            jw_key(w, "logprob");
            jw_num(w, lp_value(r->top[k].logprob));
            jw_obj_end(w);
        }
        jw_arr_end(w);
        jw_obj_end(w);
    }
    jw_arr_end(w);
    jw_key(w, "refusal");
    jw_null(w);
    jw_obj_end(w);
}

/* "token text": logprob, as a member of a completions top_logprobs map.
 * Two tokens with the same (lossy) text share a key, as in OpenAI's own
 * output. */
static void write_lp_member(struct jw *w, struct api *a, int32_t token, float logprob)
{
    size_t len = 0;
    const char *b = tokenizer_token_bytes(a->tok, token, &len);
    jw_keyn(w, b, b ? len : 0);
    jw_num(w, lp_value(logprob));
}

/* Completions shape: tokens, token_logprobs, top_logprobs, text_offset. */
static void write_completion_logprobs(struct jw *w, struct gen *g, const struct choice *c,
                                      size_t from, size_t to)
{
    size_t len;
    jw_obj(w);
    jw_key(w, "tokens");
    jw_arr(w);
    for (size_t i = from; i < to; i++) {
        const char *b = tokenizer_token_bytes(g->a->tok, c->lp[i].token, &len);
        jw_strn(w, b ? b : "", b ? len : 0);
    }
    jw_arr_end(w);
    jw_key(w, "token_logprobs");
    jw_arr(w);
    for (size_t i = from; i < to; i++)
        jw_num(w, lp_value(c->lp[i].logprob));
    jw_arr_end(w);
    /* one {token: logprob} map per position: the k most likely tokens,
     * and the sampled one (alone when logprobs is 0), as vLLM answers */
    jw_key(w, "top_logprobs");
    jw_arr(w);
    for (size_t i = from; i < to; i++) {
        const struct samp_result *r = &c->lp[i];
        jw_obj(w);
        int have_sampled = 0;
        for (int k = 0; k < r->n_top && k < g->spec.top_logprobs; k++) {
            have_sampled |= r->top[k].token == r->token;
            write_lp_member(w, g->a, r->top[k].token, r->top[k].logprob);
        }
        if (!have_sampled)
            write_lp_member(w, g->a, r->token, r->logprob);
        jw_obj_end(w);
    }
    jw_arr_end(w);
    jw_key(w, "text_offset");
    jw_arr(w);
    for (size_t i = from; i < to; i++)
        jw_int(w, c->lp_off[i]);
    jw_arr_end(w);
    jw_obj_end(w);
}

/* The fields every chunk and body starts with. */
static void write_head(struct jw *w, struct gen *g, const char *object)
{
    jw_key(w, "id");
    jw_str(w, g->id);
    jw_key(w, "object");
    jw_str(w, object);
    jw_key(w, "created");
    jw_int(w, g->created);
    jw_key(w, "model");
    jw_str(w, g->a->served_name);
    jw_key(w, "system_fingerprint");
    jw_null(w);
}

/* Sends w as an SSE event. Returns 0, or -1 when the client is not
 * reading (the caller then ends the request). */
static int sse_send(struct gen *g, struct jw *w)
{
    if (!jw_ok(w)) {
        log_error("request %s: out of memory building a stream chunk", g->id);
        return -1;
    }
    if (http_stream_write(g->req, w->buf, w->len)) {
        g->a->n_stream_cancelled_slow++;
        log_warn("request %s cancelled: the client is not reading its stream (%zu bytes "
                 "queued, limit --max-stream-buffer)",
                 http_req_id(g->req), http_req_pending_output(g->req));
        return -1;
    }
    g->last_write = api_now();
    return 0;
}

/* One chunk for choice index idx: text (may be empty), the logprobs of
 * tokens [from, to) when asked, role on the first chat chunk, and the
 * finish reason (fin >= 0) on the last. */
static int send_chunk(struct gen *g, int idx, const char *text, size_t len, int role, int fin)
{
    struct choice *c = &g->ch[idx];
    struct jw *w = &g->w;
    int chat = g->spec.kind == API_CHAT;
    size_t from = c->lp_sent, to = c->n_lp;
    jw_reset(w);
    jw_raw(w, "data: ", 6);
    jw_obj(w);
    write_head(w, g, chat ? "chat.completion.chunk" : "text_completion");
    jw_key(w, "choices");
    jw_arr(w);
    jw_obj(w);
    jw_key(w, "index");
    jw_int(w, idx);
    if (chat) {
        jw_key(w, "delta");
        jw_obj(w);
        if (role) {
            jw_key(w, "role");
            jw_str(w, "assistant");
        }
        if (role || len) {
            jw_key(w, "content");
            jw_strn(w, text, len);
        }
        jw_obj_end(w);
    } else {
        jw_key(w, "text");
        jw_strn(w, text, len);
    }
    jw_key(w, "logprobs");
    int want_lp = chat ? g->spec.logprobs : g->spec.logprobs >= 0;
    if (want_lp && !role && (to > from || fin >= 0)) {
        if (chat)
            write_chat_logprobs(w, g, c, from, to);
        else
            write_completion_logprobs(w, g, c, from, to);
        c->lp_sent = to;
    } else {
        jw_null(w);
    }
    jw_key(w, "finish_reason");
    if (fin >= 0)
        jw_str(w, fin_names[fin]);
    else
        jw_null(w);
    jw_obj_end(w);
    jw_arr_end(w);
    jw_key(w, "usage");
    jw_null(w);
    jw_obj_end(w);
    jw_raw(w, "\n\n", 2);
    return sse_send(g, w);
}

static size_t utf8_chars(const char *s, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += ((unsigned char)s[i] & 0xc0) != 0x80;
    return c;
}

/* Text that passed the stop matcher: to the stream or the body. */
static int deliver(struct gen *g, int idx, const char *s, size_t n)
{
    struct choice *c = &g->ch[idx];
    if (n == 0)
        return 0;
    c->chars += (int64_t)utf8_chars(s, n);
    if (g->spec.stream)
        return send_chunk(g, idx, s, n, 0, -1);
    if (c->len + n + 1 > c->cap) {
        size_t cap = c->cap ? c->cap : 256;
        while (cap < c->len + n + 1)
            cap *= 2;
        char *nb = realloc(c->text, cap);
        if (!nb)
            return -1;
        c->text = nb;
        c->cap = cap;
    }
    memcpy(c->text + c->len, s, n);
    c->len += n;
    c->text[c->len] = 0;
    return 0;
}

/* The choice is over: the finish chunk when streaming. */
static int choice_end(struct gen *g, int idx, int fin)
{
    struct choice *c = &g->ch[idx];
    c->done = 1;
    c->fin = fin;
    if (g->spec.stream && fin != API_FIN_ERROR && fin != API_FIN_ABORT)
        return send_chunk(g, idx, "", 0, 0, fin);
    return 0;
}

/* Feeds detokenized text through the choice's stop matcher. Returns -1
 * when the stream broke. */
static int feed_text(struct gen *g, int idx, const char *piece, size_t len)
{
    struct choice *c = &g->ch[idx];
    const char *out;
    size_t ol;
    int m = stop_feed(c->sm, piece ? piece : "", piece ? len : 0, &out, &ol);
    if (deliver(g, idx, out, ol))
        return -1;
    if (m >= 0) {
        if (choice_end(g, idx, API_FIN_STOP))
            return -1;
        /* every sample of this prompt stopped: the engine can stop too */
        int sub = idx / g->spec.n, all = 1;
        for (int k = 0; k < g->spec.n; k++)
            all &= g->ch[sub * g->spec.n + k].done;
        if (all && g->subs[sub].er)
            engine_cancel(g->subs[sub].er);
    }
    return 0;
}

/* End of a choice's tokens: what the detokenizer and matcher held back. */
static int flush_text(struct gen *g, int idx)
{
    struct choice *c = &g->ch[idx];
    size_t len;
    const char *rest = tok_stream_finish(c->ts, &len);
    if (feed_text(g, idx, rest, rest ? len : 0))
        return -1;
    if (c->done)
        return 0;
    const char *out;
    stop_flush(c->sm, &out, &len);
    return deliver(g, idx, out, len);
}

static int on_token(struct gen *g, int idx, const struct samp_result *tok)
{
    struct choice *c = &g->ch[idx];
    if (c->done)
        return 0; /* after a stop string: the engine may still be running */
    c->n_tokens++;
    if (g->t_first <= 0)
        g->t_first = api_now();
    if (g->spec.samp.logprobs) {
        if (c->n_lp == c->cap_lp) {
            size_t cap = c->cap_lp ? 2 * c->cap_lp : 16;
            struct samp_result *lp = realloc(c->lp, cap * sizeof(*lp));
            int64_t *off = lp ? realloc(c->lp_off, cap * sizeof(*off)) : NULL;
            if (lp)
                c->lp = lp;
            if (off)
                c->lp_off = off;
            if (!lp || !off)
                return -1;
            c->cap_lp = cap;
        }
        c->lp[c->n_lp] = *tok;
        c->lp_off[c->n_lp] = c->chars;
        c->n_lp++;
    }
    size_t len;
    const char *piece = tok_stream_push(c->ts, tok->token, &len);
    if (!piece)
        return -1;
    return feed_text(g, idx, piece, len);
}

static int on_finish(struct gen *g, const struct engine_event *ev, int sub)
{
    int idx = sub * g->spec.n + ev->index;
    struct choice *c = &g->ch[idx];
    if (c->done)
        return 0;
    if (ev->stop_token >= 0)
        c->n_tokens++; /* the EOS or stop token is generated, not shown */
    switch (ev->finish) {
    case ENGINE_FINISH_STOP:
    case ENGINE_FINISH_LENGTH:
        if (flush_text(g, idx))
            return -1;
        if (c->done)
            return 0; /* a stop string matched in the held-back tail */
        return choice_end(g, idx, ev->finish == ENGINE_FINISH_STOP ? API_FIN_STOP
                                                                   : API_FIN_LENGTH);
    case ENGINE_FINISH_CANCELLED:
        if (!g->failed) {
            g->failed = 503;
            snprintf(g->fail_msg, sizeof(g->fail_msg),
                     "the request was cancelled: the server is shutting down");
        }
        return choice_end(g, idx, API_FIN_ABORT);
    case ENGINE_FINISH_ERROR:
        if (!g->failed) {
            /* a multi-node job that lost a node: unavailable, not broken */
            char why[8];
            g->failed = model_failed(g->a->model, why, sizeof(why)) ? 503 : 500;
            snprintf(g->fail_msg, sizeof(g->fail_msg), "generation failed: %s", ev->message);
        }
        log_error("request %s failed in the engine: %s", g->id, ev->message);
        return choice_end(g, idx, API_FIN_ERROR);
    }
    return 0;
}

/* Everything finished: the last chunks, or the whole body. Frees g. */
static void gen_complete(struct gen *g)
{
    struct api *a = g->a;
    struct jw *w = &g->w;
    int chat = g->spec.kind == API_CHAT;
    for (int i = 0; i < g->n_ch; i++)
        a->finished_by_reason[g->ch[i].fin]++;
    if (g->spec.stream) {
        jw_reset(w);
        if (g->failed) {
            struct api_err e;
            api_err_set(&e, g->failed, "", NULL, "%s", g->fail_msg);
            jw_raw(w, "data: ", 6);
            api_write_error(w, &e);
            jw_raw(w, "\n\n", 2);
        } else if (g->spec.include_usage) {
            jw_raw(w, "data: ", 6);
            jw_obj(w);
            write_head(w, g, chat ? "chat.completion.chunk" : "text_completion");
            jw_key(w, "choices");
            jw_arr(w);
            jw_arr_end(w);
            jw_key(w, "usage");
            write_usage(w, g);
            jw_obj_end(w);
            jw_raw(w, "\n\n", 2);
        }
        jw_raw(w, "data: [DONE]\n\n", 14);
        if (sse_send(g, w)) {
            gen_kill(g, 1, 200);
            return;
        }
        api_access_log(a, g->req, 200, usage_prompt(g), usage_completion(g),
                       g->t_first > 0 ? g->t_first - g->t0 : -1);
        http_stream_end(g->req);
        g->req = NULL;
        gen_free(g);
        return;
    }
    if (g->failed) {
        struct api_err e;
        api_err_set(&e, g->failed, "", NULL, "%s", g->fail_msg);
        api_access_log(a, g->req, g->failed, usage_prompt(g), usage_completion(g), -1);
        api_send_error(a, g->req, &e);
        gen_free(g);
        return;
    }
    jw_reset(w);
    jw_obj(w);
    write_head(w, g, chat ? "chat.completion" : "text_completion");
    jw_key(w, "choices");
    jw_arr(w);
    for (int i = 0; i < g->n_ch; i++) {
        struct choice *c = &g->ch[i];
        jw_obj(w);
        jw_key(w, "index");
        jw_int(w, i);
        if (chat) {
            jw_key(w, "message");
            jw_obj(w);
            jw_key(w, "role");
            jw_str(w, "assistant");
            jw_key(w, "content");
            jw_strn(w, c->text ? c->text : "", c->len);
            jw_key(w, "refusal");
            jw_null(w);
            jw_key(w, "tool_calls");
            jw_arr(w);
            jw_arr_end(w);
            jw_obj_end(w);
        } else {
            jw_key(w, "text");
            const char *echo = g->spec.echo ? g->spec.prompt_text[i / g->spec.n] : NULL;
            if (echo) {
                /* prompt and completion as one string */
                size_t el = strlen(echo);
                char *both = malloc(el + c->len + 1);
                if (both) {
                    memcpy(both, echo, el);
                    memcpy(both + el, c->text ? c->text : "", c->len);
                    jw_strn(w, both, el + c->len);
                    free(both);
                } else {
                    w->oom = 1;
                }
            } else {
                jw_strn(w, c->text ? c->text : "", c->len);
            }
        }
        jw_key(w, "logprobs");
        if (chat ? g->spec.logprobs : g->spec.logprobs >= 0) {
            if (chat)
                write_chat_logprobs(w, g, c, 0, c->n_lp);
            else
                write_completion_logprobs(w, g, c, 0, c->n_lp);
        } else {
            jw_null(w);
        }
        jw_key(w, "finish_reason");
        jw_str(w, fin_names[c->fin]);
        jw_obj_end(w);
    }
    jw_arr_end(w);
    jw_key(w, "usage");
    write_usage(w, g);
    jw_obj_end(w);
    api_access_log(a, g->req, 200, usage_prompt(g), usage_completion(g),
                   g->t_first > 0 ? g->t_first - g->t0 : -1);
    api_send_json(a, g->req, 200, w);
    gen_free(g);
}

/* Drains g's engine events. Frees g when it is over. */
static void gen_pump(struct gen *g)
{
    struct engine_event ev[32];
    for (int s = 0; s < g->n_subs; s++) {
        struct sub *sb = &g->subs[s];
        if (!sb->er)
            continue;
        int n;
        while ((n = engine_poll(sb->er, ev, 32)) > 0) {
            for (int k = 0; k < n; k++) {
                int rc = 0;
                switch (ev[k].kind) {
                case ENGINE_EV_TOKEN:
                    rc = on_token(g, s * g->spec.n + ev[k].index, &ev[k].tok);
                    break;
                case ENGINE_EV_FINISH:
                    rc = on_finish(g, &ev[k], s);
                    break;
                case ENGINE_EV_DONE:
                    sb->done = 1;
                    sb->prompt_tokens = ev[k].prompt_tokens;
                    sb->cached_tokens = ev[k].cached_tokens;
                    g->n_subs_done++;
                    break;
                }
                if (rc) {
                    /* the stream broke (slow reader) or out of memory */
                    gen_kill(g, 1, 499);
                    return;
                }
            }
            if (sb->done) {
                engine_release(sb->er);
                sb->er = NULL;
                break;
            }
        }
    }
    if (g->n_subs_done == g->n_subs)
        gen_complete(g);
}

void api_gen_pump_ready(struct api *a)
{
    /* One gen at a time, each taken off the list under the lock: the
     * engine thread may notify a gen again (relinking it at the head)
     * while an earlier one is pumped, so a private walk of the list as it
     * stood would follow links rewritten under it and lose the gens after
     * (their last events then never pumped: a request hung). A gen freed
     * meanwhile has left the list under the same lock (gen_free). At most
     * as many pumps as the list held on entry, so a busy engine cannot
     * keep the loop from writing to the sockets: a gen notified after
     * that has its own wake pending. */
    pthread_mutex_lock(&a->ready_mu);
    int budget = 0;
    for (struct gen *g = a->ready_head; g; g = g->ready_next)
        budget++;
    pthread_mutex_unlock(&a->ready_mu);
    while (budget-- > 0) {
        pthread_mutex_lock(&a->ready_mu);
        struct gen *g = a->ready_head;
        if (g) {
            a->ready_head = g->ready_next;
            g->ready_next = NULL;
            g->in_ready = 0;
        }
        pthread_mutex_unlock(&a->ready_mu);
        if (!g)
            return;
        gen_pump(g);
    }
}

/* ------------------------------------------------------------- requests */

void api_gen_start(struct api *a, struct http_req *req, struct api_gen_spec *spec)
{
    struct api_err e;
    char err[256];
    struct gen *g = calloc(1, sizeof(*g));
    if (!g) {
        api_spec_free(spec);
        api_err_set(&e, 500, "", NULL, "out of memory");
        api_send_error(a, req, &e);
        return;
    }
    g->a = a;
    g->req = req;
    g->spec = *spec;
    memset(spec, 0, sizeof(*spec));
    g->t0 = http_req_start_time(req);
    g->created = (int64_t)time(NULL);
    jw_init(&g->w);
    api_random_id(g->spec.kind == API_CHAT ? "chatcmpl-" : "cmpl-", g->id, sizeof(g->id));
    g->n_subs = g->spec.n_prompts;
    g->n_ch = g->spec.n_prompts * g->spec.n;
    g->subs = calloc((size_t)g->n_subs, sizeof(*g->subs));
    g->ch = calloc((size_t)g->n_ch, sizeof(*g->ch));
    /* live from here: gen_free unlinks */
    g->live_next = a->live_head;
    if (a->live_head)
        a->live_head->live_prev = g;
    a->live_head = g;
    a->n_live++;
    if (!g->subs || !g->ch)
        goto oom;
    for (int i = 0; i < g->n_ch; i++) {
        struct choice *c = &g->ch[i];
        c->ts = tok_stream_create(a->tok, g->spec.skip_special);
        c->sm = stop_create((const char *const *)g->spec.stops, g->spec.n_stops, err,
                            sizeof(err));
        if (!c->ts || !c->sm) {
            if (!c->sm && c->ts) {
                api_err_set(&e, 400, "stop", "invalid_value", "%s", err);
                goto fail;
            }
            goto oom;
        }
        if (g->spec.echo)
            c->chars = (int64_t)utf8_chars(g->spec.prompt_text[i / g->spec.n],
                                           strlen(g->spec.prompt_text[i / g->spec.n]));
    }

    struct engine_limits lim;
    engine_get_limits(a->engine, &lim);
    int32_t stop_ids[API_MAX_STOP_TOKEN_IDS + 16];
    int n_stop = 0;
    for (int i = 0; i < g->spec.n_stop_ids; i++)
        stop_ids[n_stop++] = g->spec.stop_ids[i];
    if (!g->spec.ignore_eos)
        for (int i = 0; i < a->n_eot; i++)
            stop_ids[n_stop++] = a->eot_ids[i];
    for (int s = 0; s < g->n_subs; s++) {
        int64_t p = (int64_t)g->spec.prompt_len[s];
        int64_t room = lim.max_model_len - p;
        int64_t mt = g->spec.max_tokens > 0 ? g->spec.max_tokens
                     : g->spec.kind == API_COMPLETION ? (room < 16 ? room : 16)
                                                       : room;
        struct engine_params ep = {
            .prompt = g->spec.prompt_ids[s],
            .n_prompt = p,
            .samp = g->spec.samp,
            .max_tokens = mt,
            .n = g->spec.n,
            .priority = g->spec.priority,
            .ignore_eos = g->spec.ignore_eos,
            .stop_token_ids = stop_ids,
            .n_stop_token_ids = n_stop,
            .notify = gen_notify,
            .notify_arg = g,
        };
        int rc = a->draining ? ENGINE_ESHUTDOWN
                             : engine_submit(a->engine, &ep, &g->subs[s].er, err, sizeof(err));
        if (rc == ENGINE_EFULL) {
            api_err_set(&e, 503, "", "server_overloaded",
                        "the server is at capacity (%d requests queued); retry shortly",
                        lim.max_queue);
            goto fail;
        } else if (rc == ENGINE_ESHUTDOWN) {
            api_err_set(&e, 503, "", "server_shutting_down",
                        "the server is shutting down; retry on another replica");
            goto fail;
        } else if (rc != ENGINE_OK) {
            api_err_set(&e, 400, "", "invalid_value", "%s", err);
            goto fail;
        }
    }
    http_req_set_data(req, g);
    if (g->spec.stream) {
        http_stream_begin(req, 200, "text/event-stream",
                          "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n");
        g->last_write = api_now();
        if (g->spec.kind == API_CHAT) {
            for (int i = 0; i < g->n_ch; i++)
                if (send_chunk(g, i, "", 0, 1, -1)) {
                    gen_kill(g, 1, 499);
                    return;
                }
        } else if (g->spec.echo) {
            for (int i = 0; i < g->n_ch; i++) {
                const char *t = g->spec.prompt_text[i / g->spec.n];
                if (send_chunk(g, i, t, strlen(t), 0, -1)) {
                    gen_kill(g, 1, 499);
                    return;
                }
            }
        }
    }
    return;
oom:
    api_err_set(&e, 500, "", NULL, "out of memory");
fail:
    api_access_log(a, req, e.status, 0, 0, -1);
    api_send_error(a, req, &e);
    g->req = NULL;
    gen_free(g);
}

void api_gen_abort(struct api *a, struct gen *g)
{
    (void)a;
    log_info("request %s: the client went away; cancelled", http_req_id(g->req));
    gen_kill(g, 0, 499); /* req stays valid until on_abort returns */
}

void api_gen_drain(struct api *a, struct gen *g)
{
    (void)a;
    (void)g; /* nothing is held back: output is written as it comes */
}

void api_gen_tick(struct api *a, double now)
{
    static const char ping[] = ": ping\n\n";
    for (struct gen *g = a->live_head, *next; g; g = next) {
        next = g->live_next;
        if (!g->spec.stream || !g->req || now - g->last_write < a->ping_interval_s)
            continue;
        /* a client that is not reading gets no pings on top */
        if (http_req_pending_output(g->req) > 0)
            continue;
        if (http_stream_write(g->req, ping, sizeof(ping) - 1) == 0)
            g->last_write = now;
    }
}

void api_gen_cancel_all(struct api *a)
{
    for (struct gen *g = a->live_head; g; g = g->live_next)
        for (int s = 0; s < g->n_subs; s++)
            if (g->subs[s].er)
                engine_cancel(g->subs[s].er);
}
