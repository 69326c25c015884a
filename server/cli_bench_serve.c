/* cli_bench_serve.c: `inferd bench serve`: the online load generator, in
 * the style of `vllm bench serve`. It drives any OpenAI-compatible server
 * over HTTP/1.1 (keep-alive; https through OpenSSL) with streamed
 * completions at a fixed concurrency and/or a Poisson request rate, and
 * reports request and token throughput, TTFT, ITL, TPOT and end-to-end
 * latency as a table, JSON (--json) and a PNG (--plot).
 *
 * One thread: a libevent loop owns every connection. Responses are parsed
 * with llhttp (chunked, Content-Length or close-delimited bodies), the
 * event stream by hand, each chunk's JSON with jansson; chunks are stamped
 * with the time their bytes were read, so the figures include the
 * server's send path and the network, as a client sees them. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <event2/util.h>
#include <jansson.h>
#include <llhttp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "server/cli.h"
#include "server/plot_png.h"

/* Failure reasons kept per run, in order of first appearance. */
#define BS_MAX_ERRORS 8

/* ---- small helpers ---------------------------------------------------- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The one allocator: running out of memory in a load generator is fatal. */
#define bs_realloc(p, n) bs_realloc_at((p), (n), __FILE__, __LINE__)
static void *bs_realloc_at(void *p, size_t n, const char *file, int line)
{
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "inferd: out of memory (%zu bytes) at %s:%d\n", n, file, line);
        abort();
    }
    return q;
}

struct bs_buf {
    char *p;
    size_t n, cap;
};

static void buf_add(struct bs_buf *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1)
            cap *= 2;
        b->p = bs_realloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void buf_free(struct bs_buf *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

struct bs_vec {
    double *v;
    size_t n, cap;
};

static void vec_push(struct bs_vec *a, double x)
{
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 16;
        a->v = bs_realloc(a->v, a->cap * sizeof(double));
    }
    a->v[a->n++] = x;
}

/* splitmix64: prompts and arrival times are the same for the same seed. */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rng_unit(uint64_t *s) /* [0, 1) */
{
    return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

static json_t *bs_jstr(const char *s)
{
    return json_string(s);
}

/* ---- configuration ---------------------------------------------------- */

struct bs_cfg {
    const char *base_url, *endpoint, *model, *api_key, *dataset, *json_path, *plot_path;
    const char *extra_body;
    int64_t num_prompts, input_len, output_len, tok_lo, tok_hi, warmup, seed;
    int64_t concurrency; /* 0: unlimited */
    double rate;         /* requests/s; INFINITY: all at once */
    double temperature, timeout_s;
    int ignore_eos, insecure, chat, num_prompts_set;
    int64_t *sweep; /* concurrency levels, or NULL */
    int64_t n_sweep;
};

/* Where requests go, parsed from --base-url once. */
struct bs_target {
    int tls;
    char host[256];
    int port;
    char prefix[512]; /* path before the endpoint, without a trailing '/' */
    struct sockaddr_storage addr;
    int addr_len;
    SSL_CTX *ssl_ctx;
};

struct bs_prompt {
    char *body; /* the request's JSON */
    size_t body_len;
    int64_t input_tokens; /* known prompt length (token ids), else 0 */
};

/* ---- requests and connections ---------------------------------------- */

struct bs_conn;

struct bs_req {
    const struct bs_prompt *prompt; /* NULL for the GET /v1/models probe */
    struct bs_run *run;
    struct bs_conn *conn;
    struct event *timer;
    double t_start, t_first, t_last, t_end;
    int attempts;
    int got_bytes;  /* any byte of a response arrived on this attempt */
    int status;
    int done, ok;
    char err[200];
    /* The event stream: the current line, and the data of the current event. */
    struct bs_buf line, data;
    struct bs_buf body; /* a non-stream or error body */
    int64_t chunks;     /* content-bearing chunks */
    int64_t usage_out, usage_in; /* from the usage chunk; -1 when absent */
    struct bs_vec itl;
};

struct bs_client;

struct bs_conn {
    struct bs_client *cl;
    struct bufferevent *bev;
    llhttp_t parser;
    struct bs_req *req; /* in flight, or NULL while idle */
    struct bs_conn *next; /* on the idle or the dead list */
    int served;           /* responses completed on it: a reused one may be stale */
    int dead, complete, is_sse, is_ctype;
};

struct bs_run;

/* Long-lived across runs: the loop, the target and the idle connections,
 * so a sweep's later levels reuse warm keep-alive sockets. */
struct bs_client {
    struct event_base *base;
    const struct bs_cfg *cfg;
    struct bs_target *tg;
    char auth[600]; /* the Authorization header line, or "" */
    struct bs_conn *idle, *dead;
    struct event *reap_ev;
    llhttp_settings_t settings;
    struct bs_run *run;
    double t_read; /* when the bytes now being parsed were read */
};

struct bs_run {
    struct bs_client *cl;
    struct bs_req *reqs;
    size_t n;
    size_t arrived, started, finished, in_flight;
    int64_t limit; /* most in flight; 0 = unlimited */
    double rate;
    double t0, t_next;
    uint64_t rng;
    struct event *arrive_ev;
    char errors[BS_MAX_ERRORS][200];
    int n_errors;
    int64_t n_failed;
};

static void run_dispatch(struct bs_run *r);
static void req_start(struct bs_run *r, struct bs_req *q);

static void reap_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct bs_client *cl = arg;
    while (cl->dead) {
        struct bs_conn *k = cl->dead;
        cl->dead = k->next;
        bufferevent_free(k->bev);
        free(k);
    }
}

/* Retires k: off the idle list, no more callbacks, freed by reap_cb on the
 * next loop iteration (never inside its own callback). */
static void conn_kill(struct bs_conn *k)
{
    if (k->dead)
        return;
    for (struct bs_conn **pp = &k->cl->idle; *pp; pp = &(*pp)->next)
        if (*pp == k) {
            *pp = k->next;
            break;
        }
    k->dead = 1;
    k->req = NULL;
    bufferevent_disable(k->bev, EV_READ | EV_WRITE);
    bufferevent_setcb(k->bev, NULL, NULL, NULL, NULL);
    k->next = k->cl->dead;
    k->cl->dead = k;
    event_active(k->cl->reap_ev, 0, 0);
}

static void run_note_error(struct bs_run *r, const char *why)
{
    r->n_failed++;
    for (int i = 0; i < r->n_errors; i++)
        if (!strcmp(r->errors[i], why))
            return;
    if (r->n_errors < BS_MAX_ERRORS)
        snprintf(r->errors[r->n_errors++], sizeof(r->errors[0]), "%s", why);
}

/* The message of an OpenAI error object {"error": {"message": ...}} (or
 * {"error": "..."}, {"message": ...}), or NULL. */
static const char *error_message(json_t *o)
{
    json_t *e = json_object_get(o, "error");
    if (json_is_string(e))
        return json_string_value(e);
    json_t *m = json_object_get(e ? e : o, "message");
    if (e && json_is_string(m))
        return json_string_value(m);
    if (e)
        return "error object without a message";
    return NULL;
}

/* Text of choices[0]: "text" (completions), delta.content (chat stream),
 * delta.reasoning_content (reasoning models stream their thinking there),
 * or message.content (a non-stream chat reply). */
static const char *choice_text(json_t *o)
{
    json_t *c = json_array_get(json_object_get(o, "choices"), 0);
    if (!c)
        return NULL;
    json_t *t = json_object_get(c, "text");
    if (json_is_string(t))
        return json_string_value(t);
    json_t *d = json_object_get(c, "delta");
    if (!d)
        d = json_object_get(c, "message");
    t = json_object_get(d, "content");
    if (json_is_string(t) && json_string_length(t))
        return json_string_value(t);
    t = json_object_get(d, "reasoning_content");
    if (!json_is_string(t))
        t = json_object_get(d, "reasoning");
    return json_is_string(t) ? json_string_value(t) : NULL;
}

static void take_usage(struct bs_req *q, json_t *o)
{
    json_t *u = json_object_get(o, "usage");
    json_t *ct = json_object_get(u, "completion_tokens");
    json_t *pt = json_object_get(u, "prompt_tokens");
    if (json_is_integer(ct))
        q->usage_out = json_integer_value(ct);
    if (json_is_integer(pt))
        q->usage_in = json_integer_value(pt);
}

/* One complete server-sent event's data. */
static void sse_event(struct bs_client *cl, struct bs_req *q, const char *data, size_t n)
{
    if (n == 6 && !memcmp(data, "[DONE]", 6))
        return;
    json_error_t je;
    json_t *o = json_loadb(data, n, 0, &je);
    if (!o) {
        if (!q->err[0])
            snprintf(q->err, sizeof(q->err), "unparsable stream chunk: %s", je.text);
        return;
    }
    const char *em = error_message(o);
    if (em && !q->err[0])
        snprintf(q->err, sizeof(q->err), "error in stream: %.160s", em);
    const char *t = choice_text(o);
    if (t && *t) {
        double t_now = cl->t_read;
        if (q->chunks++ == 0)
            q->t_first = t_now;
        else
            vec_push(&q->itl, t_now - q->t_last);
        q->t_last = t_now;
    }
    take_usage(q, o);
    json_decref(o);
}

/* A line of the event stream, '\n' and any '\r' removed. Only data lines
 * matter; comments (":...") and other fields are skipped, and a blank line
 * ends the event, whose data lines join with '\n'. */
static void sse_line(struct bs_client *cl, struct bs_req *q, const char *s, size_t n)
{
    if (n && s[n - 1] == '\r')
        n--;
    if (n == 0) {
        if (q->data.n)
            sse_event(cl, q, q->data.p, q->data.n);
        q->data.n = 0;
        return;
    }
    if (n >= 5 && !memcmp(s, "data:", 5)) {
        s += 5;
        n -= 5;
        if (n && *s == ' ') {
            s++;
            n--;
        }
        if (q->data.n)
            buf_add(&q->data, "\n", 1);
        buf_add(&q->data, s, n);
    }
}

static void sse_feed(struct bs_client *cl, struct bs_req *q, const char *s, size_t n)
{
    while (n) {
        const char *nl = memchr(s, '\n', n);
        if (!nl) {
            buf_add(&q->line, s, n);
            return;
        }
        size_t k = (size_t)(nl - s);
        if (q->line.n) {
            buf_add(&q->line, s, k);
            sse_line(cl, q, q->line.p, q->line.n);
            q->line.n = 0;
        } else {
            sse_line(cl, q, s, k);
        }
        s += k + 1;
        n -= k + 1;
    }
}

static void req_release_bufs(struct bs_req *q)
{
    buf_free(&q->line);
    buf_free(&q->data);
    if (q->prompt)
        buf_free(&q->body); /* the models probe keeps its body for the caller */
    if (q->timer) {
        event_free(q->timer);
        q->timer = NULL;
    }
}

/* The request is over, well or not: record it and start what may start. */
static void req_finish(struct bs_run *r, struct bs_req *q, const char *fail)
{
    if (q->done)
        return;
    q->done = 1;
    q->t_end = now_s();
    if (q->conn) {
        q->conn->req = NULL;
        q->conn = NULL;
    }
    char why[200];
    if (!fail && q->status != 200) {
        json_t *o = q->body.n ? json_loadb(q->body.p, q->body.n, 0, NULL) : NULL;
        const char *m = o ? error_message(o) : NULL;
        snprintf(why, sizeof(why), "HTTP %d: %.150s", q->status,
                 m ? m : q->body.n ? q->body.p : "(no body)");
        for (char *c = why; *c; c++)
            if (*c == '\n' || *c == '\r')
                *c = ' ';
        json_decref(o);
        fail = why;
    }
    if (!fail && q->prompt && !q->chunks && q->body.n) {
        /* Not an event stream: a server that ignores "stream" answers with
         * one JSON body; then the first token is the whole reply. */
        json_t *o = json_loadb(q->body.p, q->body.n, 0, NULL);
        const char *t = o ? choice_text(o) : NULL;
        if (o && error_message(o) && !q->err[0])
            snprintf(q->err, sizeof(q->err), "error: %.160s", error_message(o));
        if (t && *t) {
            q->chunks = 1;
            q->t_first = q->t_last = q->t_end;
        }
        if (o)
            take_usage(q, o);
        json_decref(o);
    }
    if (!fail && q->err[0])
        fail = q->err;
    if (!fail && q->prompt && q->chunks == 0)
        fail = "the response carried no text";
    q->ok = !fail;
    if (fail) {
        if (fail != q->err)
            snprintf(q->err, sizeof(q->err), "%s", fail);
        run_note_error(r, q->err);
    }
    req_release_bufs(q);
    r->finished++;
    r->in_flight--;
    if (r->finished == r->n)
        event_base_loopbreak(r->cl->base);
    else
        run_dispatch(r);
}

/* A failure on q's connection: try once more on a fresh one when a reused
 * socket died before answering (the server closed it while idle), else
 * count it as failed. The caller kills the connection. */
static void req_conn_failed(struct bs_run *r, struct bs_req *q, int reused, const char *why)
{
    q->conn = NULL;
    if (reused && !q->got_bytes && q->attempts < 2) {
        r->in_flight--; /* req_start counts it again */
        req_start(r, q);
        return;
    }
    req_finish(r, q, why);
}

/* ---- llhttp callbacks (on the loop, inside llhttp_execute) ----------- */

static int on_hdr_field(llhttp_t *p, const char *at, size_t n)
{
    struct bs_conn *k = p->data;
    k->is_ctype = n == 12 && !strncasecmp(at, "content-type", 12);
    return 0;
}

static int on_hdr_value(llhttp_t *p, const char *at, size_t n)
{
    struct bs_conn *k = p->data;
    if (k->is_ctype && n >= 17 && !strncasecmp(at, "text/event-stream", 17))
        k->is_sse = 1;
    return 0;
}

static int on_headers_done(llhttp_t *p)
{
    struct bs_conn *k = p->data;
    if (k->req)
        k->req->status = llhttp_get_status_code(p);
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    struct bs_conn *k = p->data;
    struct bs_req *q = k->req;
    if (!q)
        return 0;
    /* An event stream labelled otherwise still starts with a field or a
     * comment, where a JSON body starts with '{'. */
    if (q->status == 200 && !k->is_sse && q->body.n == 0 && n && (at[0] == 'd' || at[0] == ':'))
        k->is_sse = 1;
    if (q->status == 200 && k->is_sse && q->prompt)
        sse_feed(k->cl, q, at, n);
    else if (q->body.n < ((size_t)64 << 20))
        buf_add(&q->body, at, n);
    return 0;
}

static int on_message_done(llhttp_t *p)
{
    struct bs_conn *k = p->data;
    k->complete = 1;
    /* Stop here so bytes past this response are never taken for the next. */
    return HPE_PAUSED;
}

/* The response on k is complete: finish its request, and keep k for the
 * next one unless told to close it (bytes trail the response, or the
 * server closed) or the server does not keep the connection alive. */
static void conn_response_done(struct bs_conn *k, int close)
{
    struct bs_req *q = k->req;
    struct bs_run *r = k->cl->run;
    if (q && q->line.n)
        sse_line(k->cl, q, q->line.p, q->line.n);
    if (q && q->data.n) /* a stream that ended without its blank line */
        sse_line(k->cl, q, "", 0);
    int keep = !close && !k->dead && llhttp_should_keep_alive(&k->parser);
    k->served++;
    k->req = NULL;
    if (keep) {
        k->next = k->cl->idle;
        k->cl->idle = k;
    } else {
        conn_kill(k);
    }
    if (q)
        req_finish(r, q, NULL);
}

static void conn_read_cb(struct bufferevent *bev, void *arg)
{
    struct bs_conn *k = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    k->cl->t_read = now_s();
    while (!k->dead && evbuffer_get_length(in) > 0) {
        if (!k->req) { /* bytes nobody asked for: drop the connection */
            conn_kill(k);
            return;
        }
        struct evbuffer_iovec v;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
            break;
        const char *s = v.iov_base;
        size_t n = v.iov_len;
        k->req->got_bytes = 1;
        llhttp_errno_t e = llhttp_execute(&k->parser, s, n);
        size_t used = n;
        if (e == HPE_PAUSED)
            used = (size_t)(llhttp_get_error_pos(&k->parser) - s);
        evbuffer_drain(in, used);
        if (e == HPE_PAUSED && k->complete) {
            conn_response_done(k, evbuffer_get_length(in) > 0);
            continue;
        }
        if (e != HPE_OK) {
            char why[200];
            snprintf(why, sizeof(why), "bad HTTP response: %s", llhttp_get_error_reason(&k->parser));
            struct bs_req *q = k->req;
            conn_kill(k);
            req_finish(k->cl->run, q, why);
            return;
        }
    }
}

static void conn_event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct bs_conn *k = arg;
    if (what & BEV_EVENT_CONNECTED)
        return;
    struct bs_req *q = k->req;
    int reused = k->served > 0;
    if (q && (what & BEV_EVENT_EOF)) {
        /* A body delimited by the close ends here. */
        k->cl->t_read = now_s();
        llhttp_errno_t e = llhttp_finish(&k->parser); /* HPE_PAUSED: on_message_done ran */
        if ((e == HPE_OK || e == HPE_PAUSED) && k->complete) {
            conn_response_done(k, 1);
            return;
        }
    }
    char why[200];
    if (what & BEV_EVENT_TIMEOUT) {
        snprintf(why, sizeof(why), "socket timeout");
    } else if (what & BEV_EVENT_EOF) {
        snprintf(why, sizeof(why), "connection closed by the server %s",
                 q && q->got_bytes ? "mid-response" : "before a response");
    } else {
        unsigned long se = bufferevent_get_openssl_error(bev);
        int err = EVUTIL_SOCKET_ERROR();
        if (se) {
            char sb[160];
            ERR_error_string_n(se, sb, sizeof(sb));
            snprintf(why, sizeof(why), "TLS: %s", sb);
        } else {
            snprintf(why, sizeof(why), "connection error: %s",
                     err ? evutil_socket_error_to_string(err) : "unknown");
        }
    }
    conn_kill(k);
    if (q)
        req_conn_failed(k->cl->run, q, reused, why);
}

static struct bs_conn *conn_new(struct bs_client *cl, char *why, size_t whylen)
{
    struct bs_conn *k = calloc(1, sizeof(*k));
    SSL *ssl = NULL;
    if (!k)
        goto fail;
    k->cl = cl;
    if (cl->tg->tls) {
        ssl = SSL_new(cl->tg->ssl_ctx);
        if (!ssl)
            goto fail;
        SSL_set_tlsext_host_name(ssl, cl->tg->host);
        if (!cl->cfg->insecure)
            SSL_set1_host(ssl, cl->tg->host);
        k->bev = bufferevent_openssl_socket_new(cl->base, -1, ssl, BUFFEREVENT_SSL_CONNECTING,
                                                BEV_OPT_CLOSE_ON_FREE);
        if (!k->bev)
            goto fail;
        ssl = NULL; /* the bufferevent owns it now */
        bufferevent_openssl_set_allow_dirty_shutdown(k->bev, 1);
    } else {
        k->bev = bufferevent_socket_new(cl->base, -1, BEV_OPT_CLOSE_ON_FREE);
        if (!k->bev)
            goto fail;
    }
    bufferevent_setcb(k->bev, conn_read_cb, NULL, conn_event_cb, k);
    if (bufferevent_socket_connect(k->bev, (struct sockaddr *)&cl->tg->addr, cl->tg->addr_len)) {
        snprintf(why, whylen, "connect: %s", strerror(errno));
        goto fail;
    }
    /* Small writes (each request) go out at once. */
    int one = 1;
    evutil_socket_t fd = bufferevent_getfd(k->bev);
    if (fd >= 0)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    bufferevent_enable(k->bev, EV_READ | EV_WRITE);
    return k;
fail:
    if (!why[0])
        snprintf(why, whylen, "cannot open a connection");
    SSL_free(ssl);
    if (k && k->bev)
        bufferevent_free(k->bev);
    free(k);
    return NULL;
}

static void timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct bs_req *q = arg;
    struct bs_run *r = q->run;
    if (q->conn)
        conn_kill(q->conn);
    q->conn = NULL;
    char why[64];
    snprintf(why, sizeof(why), "timed out after %g s", r->cl->cfg->timeout_s);
    req_finish(r, q, why);
}

/* Sends q on an idle keep-alive connection or a new one. */
static void req_start(struct bs_run *r, struct bs_req *q)
{
    struct bs_client *cl = r->cl;
    const struct bs_target *tg = cl->tg;
    r->in_flight++;
    if (q->attempts++ == 0)
        q->t_start = now_s();
    q->got_bytes = 0;
    q->status = 0;
    struct bs_conn *k = cl->idle;
    char why[200] = "";
    if (k) {
        cl->idle = k->next;
        k->next = NULL;
    } else if (!(k = conn_new(cl, why, sizeof(why)))) {
        req_finish(r, q, why);
        return;
    }
    llhttp_init(&k->parser, HTTP_RESPONSE, &cl->settings);
    k->parser.data = k;
    k->complete = k->is_sse = k->is_ctype = 0;
    k->req = q;
    q->conn = k;
    struct evbuffer *out = bufferevent_get_output(k->bev);
    const char *path = q->prompt ? cl->cfg->endpoint : "/v1/models";
    char hostport[300];
    if ((tg->tls && tg->port == 443) || (!tg->tls && tg->port == 80))
        snprintf(hostport, sizeof(hostport), "%s", tg->host);
    else
        snprintf(hostport, sizeof(hostport), strchr(tg->host, ':') ? "[%s]:%d" : "%s:%d",
                 tg->host, tg->port);
    if (q->prompt) {
        evbuffer_add_printf(out,
                            "POST %s%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: inferd-bench/1\r\n"
                            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                            "%sContent-Length: %zu\r\n\r\n",
                            tg->prefix, path, hostport, cl->auth, q->prompt->body_len);
        evbuffer_add(out, q->prompt->body, q->prompt->body_len);
    } else {
        evbuffer_add_printf(out,
                            "GET %s%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: inferd-bench/1\r\n"
                            "Accept: application/json\r\n%s\r\n",
                            tg->prefix, path, hostport, cl->auth);
    }
    if (!q->timer)
        q->timer = evtimer_new(cl->base, timeout_cb, q);
    double left = cl->cfg->timeout_s - (now_s() - q->t_start);
    if (left < 0.001)
        left = 0.001;
    struct timeval tv = {(time_t)left, (suseconds_t)((left - floor(left)) * 1e6)};
    evtimer_add(q->timer, &tv);
}

/* ---- a run: arrivals and dispatch ------------------------------------ */

static void run_dispatch(struct bs_run *r)
{
    while (r->started < r->arrived && (r->limit == 0 || (int64_t)r->in_flight < r->limit)) {
        struct bs_req *q = &r->reqs[r->started++];
        req_start(r, q);
    }
}

/* Poisson arrivals: exponential gaps at the mean rate, scheduled from the
 * run's start so timer lateness never accumulates. */
static void arrive_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct bs_run *r = arg;
    double t = now_s();
    while (r->arrived < r->n && r->t_next <= t) {
        r->arrived++;
        r->t_next += -log(1.0 - rng_unit(&r->rng)) / r->rate;
    }
    if (r->arrived < r->n) {
        double d = r->t_next - t;
        struct timeval tv = {(time_t)d, (suseconds_t)((d - floor(d)) * 1e6)};
        evtimer_add(r->arrive_ev, &tv);
    }
    run_dispatch(r);
}

/* Runs n requests (one per prompt, cycling) to completion. */
static int run_requests(struct bs_client *cl, struct bs_run *r, const struct bs_prompt *prompts,
                        size_t n_prompts, size_t n, int64_t limit, double rate, uint64_t seed)
{
    memset(r, 0, sizeof(*r));
    r->cl = cl;
    r->n = n;
    r->limit = limit;
    r->rate = rate;
    r->rng = seed ^ 0x5851f42d4c957f2dull;
    r->reqs = calloc(n ? n : 1, sizeof(*r->reqs));
    if (!r->reqs)
        return -1;
    for (size_t i = 0; i < n; i++) {
        r->reqs[i].prompt = prompts ? &prompts[i % n_prompts] : NULL;
        r->reqs[i].run = r;
        r->reqs[i].usage_in = r->reqs[i].usage_out = -1;
    }
    if (n == 0)
        return 0;
    cl->run = r;
    r->t0 = r->t_next = now_s();
    if (isinf(rate)) {
        r->arrived = n;
        run_dispatch(r);
    } else {
        r->arrive_ev = evtimer_new(cl->base, arrive_cb, r);
        arrive_cb(-1, 0, r); /* the first request arrives at t0 */
    }
    if (r->finished < r->n)
        event_base_dispatch(cl->base);
    if (r->arrive_ev)
        event_free(r->arrive_ev);
    r->arrive_ev = NULL;
    cl->run = NULL;
    return 0;
}

static void run_free(struct bs_run *r)
{
    for (size_t i = 0; i < r->n; i++) {
        req_release_bufs(&r->reqs[i]);
        buf_free(&r->reqs[i].body);
        free(r->reqs[i].itl.v);
    }
    free(r->reqs);
    r->reqs = NULL;
}

/* ---- figures ---------------------------------------------------------- */

struct bs_dist {
    double mean, median, std, p99;
    size_t n;
};

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Percentile by linear interpolation between ranks (numpy's default, which
 * vLLM's figures use), of sorted v. */
static double pctl(const double *v, size_t n, double p)
{
    if (n == 0)
        return NAN;
    double rank = p / 100.0 * (double)(n - 1);
    size_t lo = (size_t)floor(rank), hi = lo + 1 < n ? lo + 1 : lo;
    return v[lo] + (v[hi] - v[lo]) * (rank - (double)lo);
}

/* Sorts v in place. */
static struct bs_dist dist_of(double *v, size_t n, double scale)
{
    struct bs_dist d = {NAN, NAN, NAN, NAN, n};
    if (n == 0)
        return d;
    qsort(v, n, sizeof(double), cmp_double);
    double s = 0, s2 = 0;
    for (size_t i = 0; i < n; i++)
        s += v[i];
    d.mean = s / (double)n;
    for (size_t i = 0; i < n; i++)
        s2 += (v[i] - d.mean) * (v[i] - d.mean);
    d.std = sqrt(s2 / (double)n) * scale;
    d.mean *= scale;
    d.median = pctl(v, n, 50) * scale;
    d.p99 = pctl(v, n, 99) * scale;
    return d;
}

struct bs_result {
    int64_t concurrency; /* 0: unlimited */
    double rate;
    int64_t completed, failed, in_tokens, out_tokens;
    double duration, req_tps, out_tps, total_tps;
    struct bs_dist ttft, itl, tpot, e2e; /* milliseconds */
    char errors[BS_MAX_ERRORS][200];
    int n_errors;
    /* per successful request, in order of start, for the JSON and plot */
    struct bs_vec start, ttft_s, e2e_s, out_lens, in_lens;
    struct bs_vec itl_s; /* every gap of every request, sorted */
};

static void result_free(struct bs_result *res)
{
    free(res->start.v);
    free(res->ttft_s.v);
    free(res->e2e_s.v);
    free(res->out_lens.v);
    free(res->in_lens.v);
    free(res->itl_s.v);
}

static void summarize(const struct bs_run *r, struct bs_result *res)
{
    double t_end = r->t0;
    struct bs_vec tpot = {0}, tmp = {0};
    for (size_t i = 0; i < r->n; i++) {
        const struct bs_req *q = &r->reqs[i];
        t_end = q->t_end > t_end ? q->t_end : t_end;
        if (!q->ok)
            continue;
        int64_t out = q->usage_out >= 0 ? q->usage_out : q->chunks;
        int64_t in = q->usage_in >= 0 ? q->usage_in : q->prompt->input_tokens;
        double e2e = q->t_end - q->t_start, ttft = q->t_first - q->t_start;
        res->completed++;
        res->out_tokens += out;
        res->in_tokens += in;
        vec_push(&res->start, q->t_start - r->t0);
        vec_push(&res->ttft_s, ttft);
        vec_push(&res->e2e_s, e2e);
        vec_push(&res->out_lens, (double)out);
        vec_push(&res->in_lens, (double)in);
        /* TPOT: the decode time per output token after the first. */
        if (out > 1)
            vec_push(&tpot, (e2e - ttft) / (double)(out - 1));
        for (size_t k = 0; k < q->itl.n; k++)
            vec_push(&res->itl_s, q->itl.v[k]);
    }
    res->failed = r->n_failed;
    res->duration = t_end - r->t0;
    double dur = res->duration > 0 ? res->duration : 1e-9;
    res->req_tps = (double)res->completed / dur;
    res->out_tps = (double)res->out_tokens / dur;
    res->total_tps = (double)(res->in_tokens + res->out_tokens) / dur;
    for (size_t i = 0; i < res->ttft_s.n; i++)
        vec_push(&tmp, res->ttft_s.v[i]);
    res->ttft = dist_of(tmp.v, tmp.n, 1e3);
    tmp.n = 0;
    for (size_t i = 0; i < res->e2e_s.n; i++)
        vec_push(&tmp, res->e2e_s.v[i]);
    res->e2e = dist_of(tmp.v, tmp.n, 1e3);
    res->itl = dist_of(res->itl_s.v, res->itl_s.n, 1e3);
    res->tpot = dist_of(tpot.v, tpot.n, 1e3);
    free(tpot.v);
    free(tmp.v);
    memcpy(res->errors, r->errors, sizeof(res->errors));
    res->n_errors = r->n_errors;
}

/* ---- the table -------------------------------------------------------- */

static void print_header(void)
{
    printf("%-6s %7s %6s %5s %8s %8s %10s %10s | %-23s | %-23s | %-23s | %-26s\n", "", "", "",
           "", "", "", "", "", "      TTFT (ms)", "       ITL (ms)", "       TPOT (ms)",
           "     E2E latency (ms)");
    printf("%-6s %7s %6s %5s %8s %8s %10s %10s | %7s %7s %7s | %7s %7s %7s | %7s %7s %7s |"
           " %8s %8s %8s\n",
           "concur", "rate", "ok", "fail", "dur (s)", "req/s", "out tok/s", "tot tok/s", "mean",
           "p50", "p99", "mean", "p50", "p99", "mean", "p50", "p99", "mean", "p50", "p99");
}

/* A figure for the table, or "-" when there is none (nothing succeeded). */
static const char *cell(char *buf, size_t n, int width, int prec, double v)
{
    if (isfinite(v))
        snprintf(buf, n, "%*.*f", width, prec, v);
    else
        snprintf(buf, n, "%*s", width, "-");
    return buf;
}

static void print_row(const struct bs_result *res)
{
    char conc[24], rate[32], c[12][32];
    if (res->concurrency > 0)
        snprintf(conc, sizeof(conc), "%lld", (long long)res->concurrency);
    else
        snprintf(conc, sizeof(conc), "inf");
    if (isinf(res->rate))
        snprintf(rate, sizeof(rate), "inf");
    else
        snprintf(rate, sizeof(rate), "%.2f", res->rate);
    const struct bs_dist *d[4] = {&res->ttft, &res->itl, &res->tpot, &res->e2e};
    for (int i = 0; i < 4; i++) {
        int w = i == 3 ? 8 : 7, prec = i == 1 || i == 2 ? 2 : 1;
        cell(c[3 * i], sizeof(c[0]), w, prec, d[i]->mean);
        cell(c[3 * i + 1], sizeof(c[0]), w, prec, d[i]->median);
        cell(c[3 * i + 2], sizeof(c[0]), w, prec, d[i]->p99);
    }
    printf("%-6s %7s %6lld %5lld %8.2f %8.2f %10.1f %10.1f | %s %s %s | %s %s %s | %s %s %s |"
           " %s %s %s\n",
           conc, rate, (long long)res->completed, (long long)res->failed, res->duration,
           res->req_tps, res->out_tps, res->total_tps, c[0], c[1], c[2], c[3], c[4], c[5], c[6],
           c[7], c[8], c[9], c[10], c[11]);
    fflush(stdout);
}

/* ---- JSON out ---------------------------------------------------------- */

static json_t *num_or_null(double v)
{
    return isfinite(v) ? json_real(v) : json_null();
}

static void put_dist(json_t *o, const char *name, const struct bs_dist *d)
{
    char k[48];
    snprintf(k, sizeof(k), "mean_%s_ms", name);
    json_object_set_new(o, k, num_or_null(d->mean));
    snprintf(k, sizeof(k), "median_%s_ms", name);
    json_object_set_new(o, k, num_or_null(d->median));
    snprintf(k, sizeof(k), "std_%s_ms", name);
    json_object_set_new(o, k, num_or_null(d->std));
    snprintf(k, sizeof(k), "p99_%s_ms", name);
    json_object_set_new(o, k, num_or_null(d->p99));
}

static json_t *vec_json(const struct bs_vec *v, int as_int)
{
    json_t *a = json_array();
    for (size_t i = 0; i < v->n; i++)
        json_array_append_new(a, as_int ? json_integer((json_int_t)v->v[i]) : json_real(v->v[i]));
    return a;
}

static int write_json(const struct bs_cfg *cfg, const char *model, const struct bs_result *res,
                      size_t n_res)
{
    json_t *root = json_object();
    json_object_set_new(root, "tool", bs_jstr("inferd bench serve"));
    json_object_set_new(root, "base_url", bs_jstr(cfg->base_url));
    json_object_set_new(root, "endpoint", bs_jstr(cfg->endpoint));
    json_object_set_new(root, "model", bs_jstr(model));
    json_object_set_new(root, "dataset", bs_jstr(cfg->dataset ? cfg->dataset : "random"));
    json_object_set_new(root, "num_prompts", json_integer(cfg->num_prompts));
    json_object_set_new(root, "input_len", cfg->dataset ? json_null() : json_integer(cfg->input_len));
    json_object_set_new(root, "output_len", json_integer(cfg->output_len));
    json_object_set_new(root, "ignore_eos", json_boolean(cfg->ignore_eos));
    json_object_set_new(root, "temperature", json_real(cfg->temperature));
    json_object_set_new(root, "seed", json_integer(cfg->seed));
    json_t *runs = json_array();
    for (size_t i = 0; i < n_res; i++) {
        const struct bs_result *x = &res[i];
        json_t *o = json_object();
        json_object_set_new(o, "max_concurrency",
                            x->concurrency > 0 ? json_integer(x->concurrency) : json_null());
        json_object_set_new(o, "request_rate",
                            isinf(x->rate) ? bs_jstr("inf") : json_real(x->rate));
        json_object_set_new(o, "completed", json_integer(x->completed));
        json_object_set_new(o, "failed", json_integer(x->failed));
        json_object_set_new(o, "duration_s", json_real(x->duration));
        json_object_set_new(o, "total_input_tokens", json_integer(x->in_tokens));
        json_object_set_new(o, "total_output_tokens", json_integer(x->out_tokens));
        json_object_set_new(o, "request_throughput", json_real(x->req_tps));
        json_object_set_new(o, "output_throughput", json_real(x->out_tps));
        json_object_set_new(o, "total_token_throughput", json_real(x->total_tps));
        put_dist(o, "ttft", &x->ttft);
        put_dist(o, "itl", &x->itl);
        put_dist(o, "tpot", &x->tpot);
        put_dist(o, "e2el", &x->e2e);
        json_t *errs = json_array();
        for (int k = 0; k < x->n_errors; k++)
            json_array_append_new(errs, bs_jstr(x->errors[k]));
        json_object_set_new(o, "errors", errs);
        json_object_set_new(o, "start_s", vec_json(&x->start, 0));
        json_object_set_new(o, "ttfts_s", vec_json(&x->ttft_s, 0));
        json_object_set_new(o, "e2els_s", vec_json(&x->e2e_s, 0));
        json_object_set_new(o, "input_lens", vec_json(&x->in_lens, 1));
        json_object_set_new(o, "output_lens", vec_json(&x->out_lens, 1));
        json_array_append_new(runs, o);
    }
    json_object_set_new(root, "runs", runs);
    int rc = json_dump_file(root, cfg->json_path, JSON_INDENT(1) | JSON_REAL_PRECISION(9));
    json_decref(root);
    if (rc) {
        cli_error("bench serve: cannot write %s", cfg->json_path);
        return -1;
    }
    return 0;
}

/* ---- the plot ---------------------------------------------------------- */

/* An empirical CDF of v (sorted) in at most 2000 points, x scaled. */
static void cdf_points(const double *v, size_t n, double scale, struct bs_vec *x, struct bs_vec *y)
{
    size_t m = n < 2000 ? n : 2000;
    for (size_t i = 0; i < m; i++) {
        size_t k = m == n ? i : (size_t)((double)i * (double)(n - 1) / (double)(m - 1));
        vec_push(x, v[k] * scale);
        vec_push(y, (double)(k + 1) / (double)n);
    }
}

static int write_plot(const struct bs_cfg *cfg, const char *model, struct bs_result *res,
                      size_t n_res)
{
    const int W = 1000, H = 760;
    struct plot_canvas *c = plot_create(W, H);
    if (!c) {
        cli_error("bench serve: out of memory for the plot");
        return -1;
    }
    char title[200], err[300];
    snprintf(title, sizeof(title), "%.60s  in %lld / out %lld  %lld prompts", model,
             (long long)cfg->input_len, (long long)cfg->output_len, (long long)cfg->num_prompts);
    if (cfg->dataset)
        snprintf(title, sizeof(title), "%.60s  %lld prompts", model, (long long)cfg->num_prompts);
    plot_text(c, 12, 6, title, 0x404040u, 1, 0);
    const uint32_t blue = 0x1f77b4u, orange = 0xff7f0eu, green = 0x2ca02cu, red = 0xd62728u;
    int rc = 0;
    if (n_res > 1) {
        /* A sweep: throughput, then latency percentiles, against concurrency. */
        double x[64], tps[64], rps[64], t50[64], t99[64], i50[64], i99[64];
        size_t n = n_res < 64 ? n_res : 64;
        for (size_t i = 0; i < n; i++) {
            x[i] = (double)res[i].concurrency;
            tps[i] = res[i].out_tps;
            rps[i] = res[i].req_tps;
            t50[i] = res[i].ttft.median;
            t99[i] = res[i].ttft.p99;
            i50[i] = res[i].itl.median;
            i99[i] = res[i].itl.p99;
        }
        (void)rps;
        int log_x = x[n - 1] / (x[0] > 0 ? x[0] : 1) >= 8;
        struct plot_series s1[] = {
            {"output tok/s", x, tps, n, blue, PLOT_LINES | PLOT_MARKERS},
        };
        struct plot_axes a1 = {.title = "Output token throughput", .xlabel = "concurrency",
                               .ylabel = "tokens/s", .log_x = log_x};
        struct plot_series s2[] = {
            {"TTFT p50", x, t50, n, blue, PLOT_LINES | PLOT_MARKERS},
            {"TTFT p99", x, t99, n, orange, PLOT_LINES | PLOT_MARKERS},
            {"ITL p50", x, i50, n, green, PLOT_LINES | PLOT_MARKERS},
            {"ITL p99", x, i99, n, red, PLOT_LINES | PLOT_MARKERS},
        };
        struct plot_axes a2 = {.title = "Latency", .xlabel = "concurrency",
                               .ylabel = "milliseconds (log)", .log_x = log_x, .log_y = 1};
        rc |= plot_panel(c, 0, 20, W, (H - 20) / 2, &a1, s1, 1);
        rc |= plot_panel(c, 0, 20 + (H - 20) / 2, W, (H - 20) / 2, &a2, s2, 4);
    } else {
        /* One run: each request's TTFT and latency over the run, then the
         * distributions of TTFT, ITL and latency as CDFs. */
        struct bs_result *r0 = &res[0];
        struct bs_vec tt = {0}, ee = {0}, cx[3] = {{0}}, cy[3] = {{0}}, sorted = {0};
        for (size_t i = 0; i < r0->start.n; i++) {
            vec_push(&tt, r0->ttft_s.v[i] * 1e3);
            vec_push(&ee, r0->e2e_s.v[i] * 1e3);
        }
        const struct bs_vec *src[3] = {&r0->ttft_s, &r0->itl_s, &r0->e2e_s};
        for (int j = 0; j < 3; j++) {
            sorted.n = 0;
            for (size_t i = 0; i < src[j]->n; i++)
                vec_push(&sorted, src[j]->v[i]);
            if (sorted.n)
                qsort(sorted.v, sorted.n, sizeof(double), cmp_double);
            cdf_points(sorted.v, sorted.n, 1e3, &cx[j], &cy[j]);
        }
        struct plot_series s1[] = {
            {"TTFT", r0->start.v, tt.v, tt.n, blue, PLOT_MARKERS},
            {"end-to-end latency", r0->start.v, ee.v, ee.n, orange, PLOT_MARKERS},
        };
        struct plot_axes a1 = {.title = "Per request", .xlabel = "request sent at (s since start)",
                               .ylabel = "milliseconds"};
        struct plot_series s2[] = {
            {"TTFT", cx[0].v, cy[0].v, cx[0].n, blue, PLOT_LINES},
            {"ITL", cx[1].v, cy[1].v, cx[1].n, green, PLOT_LINES},
            {"end-to-end latency", cx[2].v, cy[2].v, cx[2].n, orange, PLOT_LINES},
        };
        struct plot_axes a2 = {.title = "Distribution (CDF)", .xlabel = "milliseconds (log)",
                               .ylabel = "fraction of requests / gaps", .log_x = 1,
                               .ymin = 0, .ymax = 1};
        rc |= plot_panel(c, 0, 20, W, (H - 20) / 2, &a1, s1, 2);
        rc |= plot_panel(c, 0, 20 + (H - 20) / 2, W, (H - 20) / 2, &a2, s2, 3);
        free(tt.v);
        free(ee.v);
        free(sorted.v);
        for (int j = 0; j < 3; j++) {
            free(cx[j].v);
            free(cy[j].v);
        }
    }
    if (rc == 0 && plot_write_png(c, cfg->plot_path, err, sizeof(err))) {
        cli_error("bench serve: %s", err);
        rc = -1;
    }
    plot_destroy(c);
    return rc ? -1 : 0;
}

/* ---- set-up: target, model, prompts ---------------------------------- */

static int parse_base_url(const char *url, struct bs_target *tg)
{
    const char *p = url;
    memset(tg, 0, sizeof(*tg));
    if (!strncasecmp(p, "http://", 7)) {
        p += 7;
        tg->port = 80;
    } else if (!strncasecmp(p, "https://", 8)) {
        p += 8;
        tg->tls = 1;
        tg->port = 443;
    } else {
        cli_error("--base-url: expected http://HOST[:PORT][/PATH] or https://..., got '%s'", url);
        return -1;
    }
    const char *host = p, *host_end;
    if (*p == '[') { /* [IPv6] */
        host = ++p;
        host_end = strchr(p, ']');
        if (!host_end)
            goto bad;
        p = host_end + 1;
    } else {
        p += strcspn(p, ":/");
        host_end = p;
    }
    size_t hn = (size_t)(host_end - host);
    if (hn == 0 || hn >= sizeof(tg->host))
        goto bad;
    memcpy(tg->host, host, hn);
    if (*p == ':') {
        char *end;
        long port = strtol(p + 1, &end, 10);
        if (end == p + 1 || port < 1 || port > 65535)
            goto bad;
        tg->port = (int)port;
        p = end;
    }
    if (*p && *p != '/')
        goto bad;
    size_t pn = strlen(p);
    while (pn && p[pn - 1] == '/')
        pn--;
    if (pn >= sizeof(tg->prefix))
        goto bad;
    memcpy(tg->prefix, p, pn);
    return 0;
bad:
    cli_error("--base-url: cannot read '%s' as http(s)://HOST[:PORT][/PATH]", url);
    return -1;
}

static int resolve_target(struct bs_target *tg)
{
    struct addrinfo hints, *ai = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    char port[16];
    snprintf(port, sizeof(port), "%d", tg->port);
    int e = getaddrinfo(tg->host, port, &hints, &ai);
    if (e || !ai) {
        cli_error("bench serve: cannot resolve %s: %s", tg->host, gai_strerror(e));
        return -1;
    }
    memcpy(&tg->addr, ai->ai_addr, ai->ai_addrlen);
    tg->addr_len = (int)ai->ai_addrlen;
    freeaddrinfo(ai);
    return 0;
}

/* GET /v1/models: the first model's id, malloc'ed; NULL on failure. */
static char *discover_model(struct bs_client *cl)
{
    struct bs_run r;
    char *id = NULL;
    if (run_requests(cl, &r, NULL, 0, 1, 1, INFINITY, 0))
        return NULL;
    struct bs_req *q = &r.reqs[0];
    if (q->status == 200 && q->body.n) {
        json_t *o = json_loadb(q->body.p, q->body.n, 0, NULL);
        json_t *m = json_array_get(json_object_get(o, "data"), 0);
        const char *s = json_string_value(json_object_get(m, "id"));
        if (s)
            id = strdup(s);
        json_decref(o);
    }
    if (!id)
        cli_error("bench serve: GET %s/v1/models gave no model (%s); pass --model",
                  cl->cfg->base_url, q->err[0] ? q->err : "no data[0].id in the reply");
    run_free(&r);
    return id;
}

/* Words for chat prompts: about one token each in common tokenizers. */
static const char *const bs_words[] = {
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but",
    "have", "an", "had", "they", "you", "were", "their", "one", "all", "we", "can", "her",
    "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no", "time",
    "water", "river", "light", "music", "garden", "city", "number", "story", "green", "stone",
    "morning", "paper", "window", "market", "letter",
};

static json_t *words_text(uint64_t *rng, int64_t n)
{
    struct bs_buf b = {0};
    size_t nw = sizeof(bs_words) / sizeof(bs_words[0]);
    for (int64_t i = 0; i < n; i++) {
        const char *w = bs_words[rng_next(rng) % nw];
        if (i)
            buf_add(&b, " ", 1);
        buf_add(&b, w, strlen(w));
    }
    json_t *s = bs_jstr(b.p ? b.p : "");
    buf_free(&b);
    return s;
}

/* Adds the shared fields and serializes o into p (consumes o). */
static int finish_body(const struct bs_cfg *cfg, const char *model, json_t *extra, json_t *o,
                       int64_t max_tokens, struct bs_prompt *p)
{
    json_object_set_new(o, "model", bs_jstr(model));
    json_object_set_new(o, "max_tokens", json_integer(max_tokens));
    json_object_set_new(o, "temperature", json_real(cfg->temperature));
    json_object_set_new(o, "stream", json_true());
    json_t *so = json_object();
    json_object_set_new(so, "include_usage", json_true());
    json_object_set_new(o, "stream_options", so);
    if (cfg->ignore_eos)
        json_object_set_new(o, "ignore_eos", json_true());
    if (extra)
        json_object_update(o, extra);
    p->body = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!p->body)
        return -1;
    p->body_len = strlen(p->body);
    return 0;
}

static int make_random_prompts(const struct bs_cfg *cfg, const char *model, json_t *extra,
                               struct bs_prompt *ps, size_t n)
{
    uint64_t rng = (uint64_t)cfg->seed;
    uint64_t span = (uint64_t)(cfg->tok_hi - cfg->tok_lo);
    for (size_t i = 0; i < n; i++) {
        json_t *o = json_object();
        if (cfg->chat) {
            json_t *msg = json_object(), *msgs = json_array();
            json_object_set_new(msg, "role", bs_jstr("user"));
            json_object_set_new(msg, "content", words_text(&rng, cfg->input_len));
            json_array_append_new(msgs, msg);
            json_object_set_new(o, "messages", msgs);
        } else {
            /* Token ids, so the prompt length is exact whatever the
             * tokenizer; ids from a range clear of special tokens. */
            json_t *ids = json_array();
            for (int64_t k = 0; k < cfg->input_len; k++)
                json_array_append_new(ids, json_integer(cfg->tok_lo + (json_int_t)(rng_next(&rng) % span)));
            json_object_set_new(o, "prompt", ids);
            ps[i].input_tokens = cfg->input_len;
        }
        if (finish_body(cfg, model, extra, o, cfg->output_len, &ps[i]))
            return -1;
    }
    return 0;
}

/* Reads --dataset: one JSON object per line, {"prompt": ..., "max_tokens": N}
 * or {"messages": [...], "max_tokens": N}. Fills *ps (caller frees). */
static int load_dataset(const struct bs_cfg *cfg, const char *model, json_t *extra,
                        struct bs_prompt **ps, size_t *n)
{
    FILE *f = fopen(cfg->dataset, "r");
    if (!f) {
        cli_error("--dataset: cannot open %s: %s", cfg->dataset, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0, cnt = 0, have = 0;
    ssize_t len;
    int64_t lineno = 0;
    int rc = -1;
    *ps = NULL;
    while ((len = getline(&line, &cap, f)) != -1) {
        lineno++;
        size_t k = 0;
        while (k < (size_t)len && (line[k] == ' ' || line[k] == '\t' || line[k] == '\r' || line[k] == '\n'))
            k++;
        if (k == (size_t)len)
            continue;
        json_error_t je;
        json_t *in = json_loadb(line, (size_t)len, 0, &je);
        if (!json_is_object(in)) {
            cli_error("%s:%lld: not a JSON object (%s)", cfg->dataset, (long long)lineno,
                      in ? "wrong type" : je.text);
            json_decref(in);
            goto done;
        }
        json_t *prompt = json_object_get(in, "prompt"), *msgs = json_object_get(in, "messages");
        json_t *mt = json_object_get(in, "max_tokens");
        int64_t max_tokens = json_is_integer(mt) ? json_integer_value(mt) : cfg->output_len;
        int64_t input_tokens = 0;
        json_t *o = json_object();
        if (cfg->chat && json_is_array(msgs)) {
            json_object_set(o, "messages", msgs);
        } else if (cfg->chat && json_is_string(prompt)) {
            json_t *m = json_object(), *a = json_array();
            json_object_set_new(m, "role", bs_jstr("user"));
            json_object_set(m, "content", prompt);
            json_array_append_new(a, m);
            json_object_set_new(o, "messages", a);
        } else if (!cfg->chat && prompt) {
            json_object_set(o, "prompt", prompt);
            if (json_is_array(prompt) && json_is_integer(json_array_get(prompt, 0)))
                input_tokens = (int64_t)json_array_size(prompt);
        } else {
            cli_error("%s:%lld: needs \"%s\" for %s", cfg->dataset, (long long)lineno,
                      cfg->chat ? "messages\" or \"prompt" : "prompt", cfg->endpoint);
            json_decref(o);
            json_decref(in);
            goto done;
        }
        json_decref(in);
        if (cnt == have) {
            have = have ? have * 2 : 64;
            *ps = bs_realloc(*ps, have * sizeof(**ps));
        }
        memset(&(*ps)[cnt], 0, sizeof(**ps));
        (*ps)[cnt].input_tokens = input_tokens;
        if (max_tokens < 1 || finish_body(cfg, model, extra, o, max_tokens, &(*ps)[cnt])) {
            cli_error("%s:%lld: bad max_tokens or request", cfg->dataset, (long long)lineno);
            goto done;
        }
        cnt++;
    }
    if (cnt == 0) {
        cli_error("--dataset: %s has no requests", cfg->dataset);
        goto done;
    }
    rc = 0;
done:
    if (rc) {
        for (size_t i = 0; i < cnt; i++)
            free((*ps)[i].body);
        free(*ps);
        *ps = NULL;
        cnt = 0;
    }
    *n = cnt;
    free(line);
    fclose(f);
    return rc;
}

/* ---- the command ------------------------------------------------------ */

static void usage(void)
{
    puts("usage: inferd bench serve [options]\n"
         "Streams completions from an OpenAI-compatible server and reports request and token\n"
         "throughput, TTFT, inter-token latency (ITL), TPOT and end-to-end latency.\n"
         "\n"
         "target:\n"
         "  --base-url URL         http(s)://HOST[:PORT][/PATH] (default http://127.0.0.1:8000)\n"
         "  --endpoint PATH        /v1/completions (default) or /v1/chat/completions\n"
         "  --model NAME           model to request (default: the first of GET /v1/models)\n"
         "  --api-key KEY          sent as a bearer token (default: $OPENAI_API_KEY)\n"
         "  --insecure             https: do not verify the server's certificate\n"
         "load:\n"
         "  --num-prompts N        requests per run (default 100; a dataset's line count)\n"
         "  --concurrency C        most requests in flight (default: no limit)\n"
         "  --request-rate R       Poisson arrivals at R req/s, or inf: all at once (default inf)\n"
         "  --sweep-concurrency L  runs at each concurrency of a list, e.g. 1,8,32: one row each\n"
         "  --warmup N             requests sent and not counted before measuring (default 0)\n"
         "  --timeout S            seconds a request may take in all (default 600)\n"
         "  --seed N               prompts and arrival times (default 0)\n"
         "requests:\n"
         "  --input-len L          random prompts of L tokens (default 128)\n"
         "  --output-len O         max_tokens of each request (default 128)\n"
         "  --token-range LO:HI    random prompt token ids in [LO, HI) (default 1000:20000);\n"
         "                         the chat endpoint gets L words of text instead\n"
         "  --dataset FILE.jsonl   {\"prompt\": ..., \"max_tokens\": N} or {\"messages\": [...], ...}\n"
         "  --ignore-eos           send \"ignore_eos\": true so every request makes max_tokens\n"
         "  --temperature T        (default 0)\n"
         "  --extra-body JSON      fields merged into every request body\n"
         "output:\n"
         "  --json FILE            the figures (and per-request TTFT, latency, lengths) as JSON\n"
         "  --plot FILE.png        TTFT and latency per request and as CDFs; for a sweep,\n"
         "                         throughput and TTFT/ITL p50/p99 against concurrency");
}

static int parse_range(const char *s, int64_t *lo, int64_t *hi)
{
    char *end;
    errno = 0;
    long long a = strtoll(s, &end, 10);
    if (end == s || *end != ':' || errno)
        return -1;
    const char *t = end + 1;
    long long b = strtoll(t, &end, 10);
    if (end == t || *end || errno || a < 0 || b <= a || b > INT32_MAX)
        return -1;
    *lo = a;
    *hi = b;
    return 0;
}

static void raise_fd_limit(void)
{
    /* Each in-flight request holds a socket; unlimited concurrency over
     * many prompts wants more than the usual 1024. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void print_errors(const struct bs_result *res)
{
    if (!res->failed)
        return;
    fprintf(stderr, "inferd: bench serve: %lld request(s) failed; first reasons:\n",
            (long long)res->failed);
    for (int i = 0; i < res->n_errors && i < 5; i++)
        fprintf(stderr, "  %s\n", res->errors[i]);
}

int cli_bench_serve(int argc, char **argv)
{
    static const struct option opts[] = {
        {"base-url", required_argument, 0, 'u'},
        {"endpoint", required_argument, 0, 'e'},
        {"model", required_argument, 0, 'm'},
        {"api-key", required_argument, 0, 'k'},
        {"num-prompts", required_argument, 0, 'n'},
        {"concurrency", required_argument, 0, 'c'},
        {"max-concurrency", required_argument, 0, 'c'},
        {"request-rate", required_argument, 0, 'r'},
        {"input-len", required_argument, 0, 'I'},
        {"output-len", required_argument, 0, 'O'},
        {"token-range", required_argument, 0, 'T'},
        {"dataset", required_argument, 0, 'd'},
        {"ignore-eos", no_argument, 0, 'E'},
        {"temperature", required_argument, 0, 't'},
        {"warmup", required_argument, 0, 'w'},
        {"timeout", required_argument, 0, 'x'},
        {"seed", required_argument, 0, 's'},
        {"json", required_argument, 0, 'j'},
        {"plot", required_argument, 0, 'p'},
        {"sweep-concurrency", required_argument, 0, 'S'},
        {"extra-body", required_argument, 0, 'B'},
        {"insecure", no_argument, 0, 'K'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    struct bs_cfg cfg = {
        .base_url = "http://127.0.0.1:8000",
        .endpoint = "/v1/completions",
        .num_prompts = 100,
        .input_len = 128,
        .output_len = 128,
        .tok_lo = 1000,
        .tok_hi = 20000,
        .rate = INFINITY,
        .timeout_s = 600,
    };
    const char *sweep = NULL;
    int c;
    char *end;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'u': cfg.base_url = optarg; break;
        case 'e': cfg.endpoint = optarg; break;
        case 'm': cfg.model = optarg; break;
        case 'k': cfg.api_key = optarg; break;
        case 'd': cfg.dataset = optarg; break;
        case 'j': cfg.json_path = optarg; break;
        case 'p': cfg.plot_path = optarg; break;
        case 'S': sweep = optarg; break;
        case 'B': cfg.extra_body = optarg; break;
        case 'E': cfg.ignore_eos = 1; break;
        case 'K': cfg.insecure = 1; break;
        case 'n':
            if (cli_parse_int("--num-prompts", optarg, 1, 10000000, &cfg.num_prompts))
                return 2;
            cfg.num_prompts_set = 1;
            break;
        case 'c': if (cli_parse_int("--concurrency", optarg, 1, 100000, &cfg.concurrency)) return 2; break;
        case 'I': if (cli_parse_int("--input-len", optarg, 1, 1 << 24, &cfg.input_len)) return 2; break;
        case 'O': if (cli_parse_int("--output-len", optarg, 1, 1 << 24, &cfg.output_len)) return 2; break;
        case 'w': if (cli_parse_int("--warmup", optarg, 0, 1000000, &cfg.warmup)) return 2; break;
        case 's': if (cli_parse_int("--seed", optarg, 0, INT64_MAX, &cfg.seed)) return 2; break;
        case 'T':
            if (parse_range(optarg, &cfg.tok_lo, &cfg.tok_hi)) {
                cli_error("--token-range: expected LO:HI with 0 <= LO < HI, got '%s'", optarg);
                return 2;
            }
            break;
        case 'r':
            errno = 0;
            cfg.rate = strtod(optarg, &end);
            if (end == optarg || *end || errno || !(cfg.rate > 0)) {
                cli_error("--request-rate: expected requests/s > 0 or inf, got '%s'", optarg);
                return 2;
            }
            break;
        case 't':
            errno = 0;
            cfg.temperature = strtod(optarg, &end);
            if (end == optarg || *end || errno || !(cfg.temperature >= 0) || cfg.temperature > 100) {
                cli_error("--temperature: expected a number >= 0, got '%s'", optarg);
                return 2;
            }
            break;
        case 'x':
            errno = 0;
            cfg.timeout_s = strtod(optarg, &end);
            if (end == optarg || *end || errno || !(cfg.timeout_s > 0) || cfg.timeout_s > 1e7) {
                cli_error("--timeout: expected seconds > 0, got '%s'", optarg);
                return 2;
            }
            break;
        case 'h': usage(); return 0;
        default: return 2;
        }
    }
    if (optind != argc) {
        cli_error("bench serve: unexpected argument '%s' (try --help)", argv[optind]);
        return 2;
    }
    if (cfg.endpoint[0] != '/') {
        cli_error("--endpoint: expected a path such as /v1/completions, got '%s'", cfg.endpoint);
        return 2;
    }
    cfg.chat = strstr(cfg.endpoint, "chat") != NULL;
    if (!cfg.api_key && getenv("OPENAI_API_KEY") && *getenv("OPENAI_API_KEY"))
        cfg.api_key = getenv("OPENAI_API_KEY");
    if (sweep) {
        int32_t *lv;
        if (cli_parse_ids("--sweep-concurrency", sweep, &lv, &cfg.n_sweep))
            return 2;
        cfg.sweep = calloc((size_t)cfg.n_sweep, sizeof(int64_t));
        for (int64_t i = 0; cfg.sweep && i < cfg.n_sweep; i++)
            cfg.sweep[i] = lv[i];
        free(lv);
        if (!cfg.sweep)
            return 1;
        for (int64_t i = 0; i < cfg.n_sweep; i++)
            if (cfg.sweep[i] < 1 || cfg.sweep[i] > 100000) {
                cli_error("--sweep-concurrency: levels must be in 1..100000");
                free(cfg.sweep);
                return 2;
            }
    }

    int rc = 1;
    struct bs_target tg;
    struct bs_client cl;
    memset(&cl, 0, sizeof(cl));
    json_t *extra = NULL;
    char *model = NULL;
    struct bs_prompt *prompts = NULL;
    size_t n_prompts = 0;
    struct bs_result *res = NULL;
    size_t n_res = 0;
    if (parse_base_url(cfg.base_url, &tg)) {
        rc = 2;
        goto done;
    }
    if (cfg.extra_body) {
        json_error_t je;
        extra = json_loads(cfg.extra_body, 0, &je);
        if (!json_is_object(extra)) {
            cli_error("--extra-body: expected a JSON object (%s)", extra ? "wrong type" : je.text);
            rc = 2;
            goto done;
        }
    }
    if (resolve_target(&tg))
        goto done;
    if (tg.tls) {
        tg.ssl_ctx = SSL_CTX_new(TLS_client_method());
        if (!tg.ssl_ctx) {
            cli_error("bench serve: cannot create a TLS context");
            goto done;
        }
        SSL_CTX_set_default_verify_paths(tg.ssl_ctx);
        SSL_CTX_set_verify(tg.ssl_ctx, cfg.insecure ? SSL_VERIFY_NONE : SSL_VERIFY_PEER, NULL);
    }
    /* A server that drops a connection must not kill the load generator. */
    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();
    cl.cfg = &cfg;
    cl.tg = &tg;
    cl.base = event_base_new();
    if (!cl.base || !(cl.reap_ev = event_new(cl.base, -1, 0, reap_cb, &cl))) {
        cli_error("bench serve: cannot create the event loop");
        goto done;
    }
    if (cfg.api_key)
        snprintf(cl.auth, sizeof(cl.auth), "Authorization: Bearer %.500s\r\n", cfg.api_key);
    llhttp_settings_init(&cl.settings);
    cl.settings.on_header_field = on_hdr_field;
    cl.settings.on_header_value = on_hdr_value;
    cl.settings.on_headers_complete = on_headers_done;
    cl.settings.on_body = on_body;
    cl.settings.on_message_complete = on_message_done;

    if (cfg.model)
        model = strdup(cfg.model);
    else if (!(model = discover_model(&cl)))
        goto done;
    if (cfg.dataset) {
        if (load_dataset(&cfg, model, extra, &prompts, &n_prompts))
            goto done;
        if (!cfg.num_prompts_set)
            cfg.num_prompts = (int64_t)n_prompts;
    } else {
        /* Fresh prompts for the warmup and for each sweep level: a prompt
         * sent twice would measure the server's prefix cache, not its
         * prefill. */
        n_prompts = (size_t)cfg.warmup +
                    (size_t)cfg.num_prompts * (size_t)(cfg.sweep ? cfg.n_sweep : 1);
        prompts = calloc(n_prompts, sizeof(*prompts));
        if (!prompts || make_random_prompts(&cfg, model, extra, prompts, n_prompts)) {
            cli_error("bench serve: cannot build the requests");
            goto done;
        }
    }

    printf("target   %s://%s:%d%s%s  model %s\n", tg.tls ? "https" : "http", tg.host, tg.port,
           tg.prefix, cfg.endpoint, model);
    if (cfg.dataset)
        printf("requests %lld from %s (%zu lines), max_tokens from the file or %lld",
               (long long)cfg.num_prompts, cfg.dataset, n_prompts, (long long)cfg.output_len);
    else if (cfg.chat)
        printf("requests %lld random, %lld words in, %lld tokens out", (long long)cfg.num_prompts,
               (long long)cfg.input_len, (long long)cfg.output_len);
    else
        printf("requests %lld random, %lld token ids in [%lld, %lld), %lld tokens out",
               (long long)cfg.num_prompts, (long long)cfg.input_len, (long long)cfg.tok_lo,
               (long long)cfg.tok_hi, (long long)cfg.output_len);
    printf("%s, temperature %g, seed %lld\n", cfg.ignore_eos ? ", ignore_eos" : "",
           cfg.temperature, (long long)cfg.seed);
    fflush(stdout);

    if (cfg.warmup > 0) {
        struct bs_run r;
        int64_t lim = cfg.sweep ? cfg.sweep[0] : cfg.concurrency;
        double t0 = now_s();
        if (run_requests(&cl, &r, prompts, cfg.dataset ? n_prompts : (size_t)cfg.warmup,
                         (size_t)cfg.warmup, lim, INFINITY, (uint64_t)cfg.seed))
            goto done;
        fprintf(stderr, "warmup: %lld requests in %.2f s, %lld failed%s%s\n",
                (long long)cfg.warmup, now_s() - t0, (long long)r.n_failed,
                r.n_errors ? ": " : "", r.n_errors ? r.errors[0] : "");
        run_free(&r);
    }

    n_res = cfg.sweep ? (size_t)cfg.n_sweep : 1;
    res = calloc(n_res, sizeof(*res));
    if (!res)
        goto done;
    printf("\n");
    print_header();
    for (size_t i = 0; i < n_res; i++) {
        struct bs_run r;
        res[i].concurrency = cfg.sweep ? cfg.sweep[i] : cfg.concurrency;
        res[i].rate = cfg.rate;
        struct bs_prompt *ps = prompts;
        size_t nps = n_prompts;
        if (!cfg.dataset) {
            ps = prompts + cfg.warmup + (size_t)cfg.num_prompts * i;
            nps = (size_t)cfg.num_prompts;
        }
        if (run_requests(&cl, &r, ps, nps, (size_t)cfg.num_prompts, res[i].concurrency,
                         cfg.rate, (uint64_t)cfg.seed))
            goto done;
        summarize(&r, &res[i]);
        run_free(&r);
        print_row(&res[i]);
    }
    rc = 0;
    for (size_t i = 0; i < n_res; i++) {
        print_errors(&res[i]);
        if (res[i].completed == 0)
            rc = 1; /* nothing measured: say so in the exit status */
    }
    if (cfg.json_path && write_json(&cfg, model, res, n_res))
        rc = 1;
    if (cfg.plot_path && write_plot(&cfg, model, res, n_res))
        rc = 1;
done:
    for (size_t i = 0; i < n_res && res; i++)
        result_free(&res[i]);
    free(res);
    for (size_t i = 0; i < n_prompts && prompts; i++)
        free(prompts[i].body);
    free(prompts);
    free(model);
    json_decref(extra);
    while (cl.idle) {
        struct bs_conn *k = cl.idle;
        conn_kill(k);
    }
    if (cl.reap_ev) {
        reap_cb(-1, 0, &cl);
        event_free(cl.reap_ev);
    }
    if (cl.base)
        event_base_free(cl.base);
    SSL_CTX_free(tg.ssl_ctx);
    free(cfg.sweep);
    return rc;
}
