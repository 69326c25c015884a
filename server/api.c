/* api.c: the API's front door: routing, the API key, errors, the small
 * routes (/health, /ready, /v1/models, /tokenize, /detokenize, /metrics)
 * and the access log. Generation requests go on to api_request.c (decode)
 * and api_gen.c (the engine and the stream). Event loop thread, except
 * api_engine_wake (engine thread).
 */
#include <errno.h>
#include <event2/event.h>
#include <inttypes.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "engine/chat_template.h"
#include "engine/json.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "server/api_internal.h"
#include "server/http.h"
#include "server/log.h"
#include "server/model_text.h"

double api_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void api_random_id(const char *prefix, char *out, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char r[12];
    if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
        /* never fails for 12 bytes once the pool is up; a counter then */
        static uint64_t ctr;
        uint64_t v = ++ctr ^ (uint64_t)time(NULL);
        memcpy(r, &v, sizeof(v));
        memset(r + 8, 0, 4);
    }
    size_t k = (size_t)snprintf(out, n, "%s", prefix);
    for (size_t i = 0; i < sizeof(r) && k + 2 < n; i++) {
        out[k++] = hex[r[i] >> 4];
        out[k++] = hex[r[i] & 15];
    }
    out[k < n ? k : n - 1] = 0;
}

/* ---------------------------------------------------------------- errors */

void api_write_error(struct jw *w, const struct api_err *e)
{
    jw_obj(w);
    jw_key(w, "error");
    jw_obj(w);
    jw_key(w, "message");
    jw_str(w, e->message);
    jw_key(w, "type");
    jw_str(w, e->type ? e->type : "invalid_request_error");
    jw_key(w, "param");
    if (e->param[0])
        jw_str(w, e->param);
    else
        jw_null(w);
    jw_key(w, "code");
    if (e->code)
        jw_str(w, e->code);
    else
        jw_null(w);
    jw_obj_end(w);
    jw_obj_end(w);
}

void api_count_status(struct api *a, int status)
{
    if (status >= 100 && status < 600)
        a->http_by_status[status]++;
}

void api_send_json(struct api *a, struct http_req *req, int status, struct jw *w)
{
    if (!jw_ok(w)) {
        static const char oom[] = "{\"error\":{\"message\":\"out of memory\",\"type\":"
                                  "\"server_error\",\"param\":null,\"code\":null}}";
        api_count_status(a, 500);
        http_respond(req, 500, "application/json", NULL, oom, sizeof(oom) - 1);
        return;
    }
    api_count_status(a, status);
    http_respond(req, status, "application/json", NULL, w->buf ? w->buf : "{}",
                 w->buf ? w->len : 2);
}

void api_send_error(struct api *a, struct http_req *req, const struct api_err *e)
{
    struct jw w;
    jw_init(&w);
    api_write_error(&w, e);
    const char *extra = NULL;
    if (e->status == 503)
        extra = "Retry-After: 1\r\n";
    else if (e->status == 401)
        extra = "WWW-Authenticate: Bearer\r\n";
    api_count_status(a, e->status);
    if (jw_ok(&w))
        http_respond(req, e->status, "application/json", extra, w.buf, w.len);
    else
        http_respond(req, 500, "text/plain", NULL, "out of memory\n", 14);
    jw_free(&w);
}

static void send_err(struct api *a, struct http_req *req, int status, const char *param,
                     const char *code, const char *msg)
{
    struct api_err e;
    api_err_set(&e, status, param, code, "%s", msg);
    api_access_log(a, req, status, -1, -1, -1);
    api_send_error(a, req, &e);
}

void api_access_log(struct api *a, struct http_req *req, int status, int64_t prompt_tokens,
                    int64_t completion_tokens, double ttft)
{
    (void)a;
    if (!req)
        return;
    double total = api_now() - http_req_start_time(req);
    char tok[96] = "";
    if (prompt_tokens >= 0)
        snprintf(tok, sizeof(tok), " prompt_tokens=%" PRId64 " completion_tokens=%" PRId64,
                 prompt_tokens, completion_tokens);
    char tt[32] = "";
    if (ttft >= 0)
        snprintf(tt, sizeof(tt), " ttft=%.3f", ttft);
    log_info("access id=%s peer=%s %s %s status=%d%s%s total=%.3f", http_req_id(req),
             http_req_peer(req), http_req_method(req), http_req_path(req), status, tok, tt,
             total);
}

/* ------------------------------------------------------------------ auth */

/* Whether the Authorization header holds one of the keys. Every key is
 * compared in full and in constant time, so timing says nothing about
 * how much of a guess was right. */
static int authorized(struct api *a, struct http_req *req)
{
    if (a->n_keys == 0)
        return 1;
    const char *h = http_req_header(req, "authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0)
        return 0;
    const char *k = h + 7;
    while (*k == ' ')
        k++;
    size_t kl = strlen(k);
    int ok = 0;
    for (int i = 0; i < a->n_keys; i++) {
        size_t n = a->key_lens[i];
        /* compare the same number of bytes whatever the guess's length */
        unsigned char buf[512];
        if (n > sizeof(buf))
            continue;
        memset(buf, 0, sizeof(buf));
        memcpy(buf, k, kl < n ? kl : n);
        ok |= (kl == n) & (CRYPTO_memcmp(buf, a->keys[i], n) == 0);
    }
    return ok;
}

/* ---------------------------------------------------------- small routes */

static void route_health(struct api *a, struct http_req *req)
{
    static const char body[] = "{\"status\":\"ok\"}";
    api_access_log(a, req, 200, -1, -1, -1);
    api_count_status(a, 200);
    http_respond(req, 200, "application/json", NULL, body, sizeof(body) - 1);
}

static void route_ready(struct api *a, struct http_req *req)
{
    char why[256];
    if (model_failed(a->model, why, sizeof(why))) {
        send_err(a, req, 503, NULL, "not_ready", why);
        return;
    }
    if (!a->ready || a->draining || !api_engine_healthy(a, 60)) {
        send_err(a, req, 503, NULL, "not_ready",
                 a->draining ? "the server is draining"
                 : !a->ready ? "the model is loading"
                             : "the engine is not making progress");
        return;
    }
    static const char body[] = "{\"status\":\"ready\"}";
    api_access_log(a, req, 200, -1, -1, -1);
    api_count_status(a, 200);
    http_respond(req, 200, "application/json", NULL, body, sizeof(body) - 1);
}

static void write_model(struct api *a, struct jw *w)
{
    struct engine_limits lim;
    engine_get_limits(a->engine, &lim);
    jw_obj(w);
    jw_key(w, "id");
    jw_str(w, a->served_name);
    jw_key(w, "object");
    jw_str(w, "model");
    jw_key(w, "created");
    jw_int(w, a->created);
    jw_key(w, "owned_by");
    jw_str(w, "inferd");
    jw_key(w, "max_model_len");
    jw_int(w, lim.max_model_len);
    jw_obj_end(w);
}

static void route_models(struct api *a, struct http_req *req, const char *id)
{
    struct jw w;
    jw_init(&w);
    if (id) {
        if (strcmp(id, a->served_name) != 0) {
            char msg[400];
            snprintf(msg, sizeof(msg), "The model '%.200s' does not exist", id);
            send_err(a, req, 404, "model", "model_not_found", msg);
            return;
        }
        write_model(a, &w);
    } else {
        jw_obj(&w);
        jw_key(&w, "object");
        jw_str(&w, "list");
        jw_key(&w, "data");
        jw_arr(&w);
        write_model(a, &w);
        jw_arr_end(&w);
        jw_obj_end(&w);
    }
    api_access_log(a, req, 200, -1, -1, -1);
    api_send_json(a, req, 200, &w);
    jw_free(&w);
}

/* POST /tokenize: {"prompt"} or {"messages"} -> {"count", "max_model_len",
 * "tokens"} (vLLM's shape). */
static void route_tokenize(struct api *a, struct http_req *req)
{
    struct api_err e;
    size_t len;
    const char *body = http_req_body(req, &len);
    struct json *o = api_parse_body(body, len, &e);
    int32_t *ids = NULL;
    size_t n = 0;
    char *text = NULL;
    if (!o)
        goto fail;
    const struct json *prompt = json_get(o, "prompt"), *msgs = json_get(o, "messages");
    const struct json *add_sp = json_get(o, "add_special_tokens");
    const struct json *add_gen = json_get(o, "add_generation_prompt");
    if ((add_sp && json_type(add_sp) != JSON_BOOL) || (add_gen && json_type(add_gen) != JSON_BOOL)) {
        api_err_set(&e, 400, add_sp && json_type(add_sp) != JSON_BOOL ? "add_special_tokens"
                                                                       : "add_generation_prompt",
                    "invalid_type", "must be a boolean");
        goto fail;
    }
    size_t tl;
    int special;
    if (json_type(prompt) == JSON_STRING && !msgs) {
        const char *t = json_str(prompt, &tl);
        if (!(text = strndup(t, tl))) {
            api_err_set(&e, 500, "", NULL, "out of memory");
            goto fail;
        }
        special = add_sp ? json_bool(add_sp) : 1;
    } else if (msgs && !prompt) {
        if (api_check_messages(msgs, &e))
            goto fail;
        text = api_render_chat(a, msgs, json_get(o, "tools"), add_gen ? json_bool(add_gen) : 1,
                               NULL, &tl, &e);
        if (!text)
            goto fail;
        special = add_sp ? json_bool(add_sp) : 0;
    } else {
        api_err_set(&e, 400, "prompt", "invalid_value",
                    "give either 'prompt' (a string) or 'messages' (an array)");
        goto fail;
    }
    if ((int64_t)tl > a->max_prompt_bytes) {
        api_err_set(&e, 400, "prompt", "invalid_value",
                    "the text is %zu bytes long, the limit is %lld", tl,
                    (long long)a->max_prompt_bytes);
        goto fail;
    }
    char terr[200];
    if (tokenizer_encode(a->tok, text, tl, special, 1, &ids, &n, terr, sizeof(terr))) {
        api_err_set(&e, 400, "prompt", NULL, "the text cannot be tokenized: %s", terr);
        goto fail;
    }
    struct engine_limits lim;
    engine_get_limits(a->engine, &lim);
    struct jw w;
    jw_init(&w);
    jw_obj(&w);
    jw_key(&w, "count");
    jw_int(&w, (int64_t)n);
    jw_key(&w, "max_model_len");
    jw_int(&w, lim.max_model_len);
    jw_key(&w, "tokens");
    jw_arr(&w);
    for (size_t i = 0; i < n; i++)
        jw_int(&w, ids[i]);
    jw_arr_end(&w);
    jw_obj_end(&w);
    api_access_log(a, req, 200, -1, -1, -1);
    api_send_json(a, req, 200, &w);
    jw_free(&w);
    free(ids);
    free(text);
    json_free(o);
    return;
fail:
    free(ids);
    free(text);
    json_free(o);
    api_access_log(a, req, e.status, -1, -1, -1);
    api_send_error(a, req, &e);
}

/* POST /detokenize: {"tokens": [...]} -> {"prompt": text}. */
static void route_detokenize(struct api *a, struct http_req *req)
{
    struct api_err e;
    size_t len;
    const char *body = http_req_body(req, &len);
    struct json *o = api_parse_body(body, len, &e);
    int32_t *ids = NULL;
    if (!o)
        goto fail;
    const struct json *t = json_get(o, "tokens");
    if (json_type(t) != JSON_ARRAY) {
        api_err_set(&e, 400, "tokens", "invalid_type", "'tokens' must be an array of token ids");
        goto fail;
    }
    size_t n = json_len(t);
    if (!(ids = malloc((n ? n : 1) * sizeof(*ids)))) {
        api_err_set(&e, 500, "", NULL, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < n; i++) {
        int64_t id;
        if (json_int64(json_at(t, i), &id) || id < 0 || id >= a->n_vocab) {
            api_err_set(&e, 400, "tokens", "invalid_value",
                        "'tokens' must hold token ids between 0 and %lld (element %zu)",
                        (long long)a->n_vocab - 1, i);
            goto fail;
        }
        ids[i] = (int32_t)id;
    }
    size_t tl;
    char *text = tokenizer_decode(a->tok, ids, n, 0, &tl);
    if (!text) {
        api_err_set(&e, 500, "", NULL, "out of memory");
        goto fail;
    }
    struct jw w;
    jw_init(&w);
    jw_obj(&w);
    jw_key(&w, "prompt");
    jw_strn(&w, text, tl);
    jw_obj_end(&w);
    free(text);
    api_access_log(a, req, 200, -1, -1, -1);
    api_send_json(a, req, 200, &w);
    jw_free(&w);
    free(ids);
    json_free(o);
    return;
fail:
    free(ids);
    json_free(o);
    api_access_log(a, req, e.status, -1, -1, -1);
    api_send_error(a, req, &e);
}

static void route_metrics(struct api *a, struct http_req *req)
{
    struct jw w;
    jw_init(&w);
    api_metrics(a, &w);
    api_access_log(a, req, 200, -1, -1, -1);
    api_count_status(a, 200);
    if (jw_ok(&w))
        http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", NULL,
                     w.buf ? w.buf : "", w.len);
    else
        http_respond(req, 500, "text/plain", NULL, "out of memory\n", 14);
    jw_free(&w);
}

static void route_generate(struct api *a, struct http_req *req, enum api_kind kind)
{
    struct api_err e;
    struct api_gen_spec spec;
    if (a->draining || !a->ready) {
        send_err(a, req, 503, NULL, a->draining ? "server_shutting_down" : "not_ready",
                 a->draining ? "the server is shutting down; retry on another replica"
                             : "the model is loading");
        return;
    }
    char why[256];
    if (model_failed(a->model, why, sizeof(why))) {
        char msg[320];
        snprintf(msg, sizeof(msg), "the model is unavailable: %s; retry on another replica",
                 why);
        send_err(a, req, 503, NULL, "model_unavailable", msg);
        return;
    }
    size_t len;
    const char *body = http_req_body(req, &len);
    if (api_decode_gen(a, kind, body, len, &spec, &e)) {
        api_access_log(a, req, e.status, -1, -1, -1);
        api_send_error(a, req, &e);
        return;
    }
    api_gen_start(a, req, &spec);
}

/* ---------------------------------------------------------------- router */

enum { R_CHAT, R_COMPLETIONS, R_MODELS, R_MODEL, R_TOKENIZE, R_DETOKENIZE, R_HEALTH, R_READY,
       R_METRICS, R_OTHER };

void api_on_request(struct http_req *req, void *arg)
{
    struct api *a = arg;
    const char *m = http_req_method(req), *p = http_req_path(req);
    static const struct {
        const char *path, *method;
        int route;
    } routes[] = {
        {"/v1/chat/completions", "POST", R_CHAT}, {"/v1/completions", "POST", R_COMPLETIONS},
        {"/v1/models", "GET", R_MODELS},          {"/tokenize", "POST", R_TOKENIZE},
        {"/detokenize", "POST", R_DETOKENIZE},    {"/health", "GET", R_HEALTH},
        {"/ready", "GET", R_READY},               {"/metrics", "GET", R_METRICS},
    };
    int route = R_OTHER, method_ok = 0;
    const char *model_id = NULL;
    for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++)
        if (strcmp(p, routes[i].path) == 0) {
            route = routes[i].route;
            method_ok = strcmp(m, routes[i].method) == 0;
            break;
        }
    if (route == R_OTHER && strncmp(p, "/v1/models/", 11) == 0 && p[11]) {
        route = R_MODEL;
        model_id = p + 11;
        method_ok = strcmp(m, "GET") == 0;
    }
    a->requests_by_route[route]++;
    if (route == R_OTHER) {
        char msg[300];
        snprintf(msg, sizeof(msg), "there is no route %.8s %.200s", m, p);
        send_err(a, req, 404, NULL, "not_found", msg);
        return;
    }
    if (!method_ok) {
        char msg[300];
        snprintf(msg, sizeof(msg), "%.8s is not allowed on %.200s", m, p);
        send_err(a, req, 405, NULL, "method_not_allowed", msg);
        return;
    }
    /* liveness and readiness are for load balancers and systemd: no key */
    if (route != R_HEALTH && route != R_READY && !authorized(a, req)) {
        send_err(a, req, 401, NULL, "invalid_api_key",
                 http_req_header(req, "authorization")
                     ? "Incorrect API key provided"
                     : "You didn't provide an API key; pass it as 'Authorization: Bearer KEY'");
        return;
    }
    switch (route) {
    case R_CHAT: route_generate(a, req, API_CHAT); break;
    case R_COMPLETIONS: route_generate(a, req, API_COMPLETION); break;
    case R_MODELS: route_models(a, req, NULL); break;
    case R_MODEL: route_models(a, req, model_id); break;
    case R_TOKENIZE: route_tokenize(a, req); break;
    case R_DETOKENIZE: route_detokenize(a, req); break;
    case R_HEALTH: route_health(a, req); break;
    case R_READY: route_ready(a, req); break;
    case R_METRICS: route_metrics(a, req); break;
    }
}

void api_on_abort(struct http_req *req, void *arg)
{
    struct gen *g = http_req_get_data(req);
    if (g)
        api_gen_abort(arg, g);
}

void api_on_drain(struct http_req *req, void *arg)
{
    struct gen *g = http_req_get_data(req);
    if (g)
        api_gen_drain(arg, g);
}

/* ------------------------------------------------------------- lifecycle */

void api_engine_wake(void *arg)
{
    struct api *a = arg;
    uint64_t one = 1;
    /* eventfd counts: a full counter cannot happen at one write per step */
    ssize_t r = write(a->efd, &one, sizeof(one));
    (void)r;
}

static void on_wake(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    uint64_t v;
    ssize_t r = read(fd, &v, sizeof(v));
    (void)r;
    api_gen_pump_ready(arg);
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct api *a = arg;
    double now = api_now();
    api_engine_healthy(a, 1e9); /* refreshes the progress stamp */
    api_gen_tick(a, now);
}

int api_engine_healthy(struct api *a, double stall_s)
{
    if (!a->engine)
        return 0;
    struct engine_stats st;
    engine_get_stats(a->engine, &st);
    double now = api_now();
    if (st.steps != a->last_steps || (st.running == 0 && st.waiting == 0)) {
        a->last_steps = st.steps;
        a->last_progress = now;
        return 1;
    }
    return now - a->last_progress < stall_s;
}

struct api *api_create(const struct api_opts *o, struct event_base *base, char *err,
                       size_t errlen)
{
    struct api *a = calloc(1, sizeof(*a));
    if (!a) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    a->efd = -1;
    pthread_mutex_init(&a->ready_mu, NULL);
    a->base = base;
    a->model = o->model;
    a->tok = o->tok;
    a->n_vocab = tokenizer_n_vocab(o->tok);
    const struct model_config *cf = model_get_config(o->model);
    if (cf->n_vocab < a->n_vocab)
        a->n_vocab = cf->n_vocab; /* ids the model can embed */
    snprintf(a->served_name, sizeof(a->served_name), "%s", o->served_name);
    a->created = (int64_t)time(NULL);
    a->trust_request_template = o->trust_request_chat_template;
    a->max_prompt_bytes = o->max_prompt_bytes > 0 ? o->max_prompt_bytes : 1 << 20;
    a->ping_interval_s = o->ping_interval_s > 0 ? o->ping_interval_s : 15;
    a->n_eot = mt_end_of_turn_ids(o->tok, cf->eos_id, a->eot_ids, 16);
    a->bos_text = mt_token_text(o->tok, cf->bos_id);
    a->eos_text = mt_token_text(o->tok, cf->eos_id);
    if (!a->bos_text || !a->eos_text)
        goto oom;
    if (o->chat_template) {
        char cerr[400];
        if (chat_template_compile(o->chat_template, strlen(o->chat_template), &a->tmpl, cerr,
                                  sizeof(cerr))) {
            snprintf(err, errlen, "the chat template does not compile: %s", cerr);
            goto fail;
        }
    }
    if (o->n_api_keys > 0) {
        a->keys = calloc((size_t)o->n_api_keys, sizeof(*a->keys));
        a->key_lens = calloc((size_t)o->n_api_keys, sizeof(*a->key_lens));
        if (!a->keys || !a->key_lens)
            goto oom;
        for (int i = 0; i < o->n_api_keys; i++) {
            size_t l = strlen(o->api_keys[i]);
            if (l == 0 || l > 512) {
                snprintf(err, errlen, "API keys must be 1 to 512 bytes long (key %d is %zu)",
                         i + 1, l);
                goto fail;
            }
            if (!(a->keys[i] = strdup(o->api_keys[i])))
                goto oom;
            a->key_lens[i] = l;
            a->n_keys++;
        }
    }
    a->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (a->efd < 0) {
        snprintf(err, errlen, "eventfd: %s", strerror(errno));
        goto fail;
    }
    a->wake_ev = event_new(base, a->efd, EV_READ | EV_PERSIST, on_wake, a);
    a->tick_ev = event_new(base, -1, EV_PERSIST, on_tick, a);
    struct timeval one_s = {1, 0};
    if (!a->wake_ev || !a->tick_ev || event_add(a->wake_ev, NULL) ||
        event_add(a->tick_ev, &one_s))
        goto oom;
    a->last_progress = api_now();
    return a;
oom:
    snprintf(err, errlen, "out of memory");
fail:
    api_destroy(a);
    return NULL;
}

void api_destroy(struct api *a)
{
    if (!a)
        return;
    if (a->wake_ev)
        event_free(a->wake_ev);
    if (a->tick_ev)
        event_free(a->tick_ev);
    if (a->efd >= 0)
        close(a->efd);
    for (int i = 0; i < a->n_keys; i++) {
        OPENSSL_cleanse(a->keys[i], a->key_lens[i]);
        free(a->keys[i]);
    }
    free(a->keys);
    free(a->key_lens);
    chat_template_destroy(a->tmpl);
    free(a->bos_text);
    free(a->eos_text);
    pthread_mutex_destroy(&a->ready_mu);
    free(a);
}

void api_set_engine(struct api *a, struct engine *e)
{
    a->engine = e;
}

void api_set_http(struct api *a, struct http_server *s)
{
    a->http = s;
}

void api_set_ready(struct api *a, int ready)
{
    a->ready = ready;
}

void api_set_draining(struct api *a)
{
    a->draining = 1;
}

int api_live_requests(const struct api *a)
{
    return a->n_live;
}

void api_cancel_all(struct api *a)
{
    api_gen_cancel_all(a);
}
