/* test_http.c: the HTTP/1.1 connection layer through http.h.
 *
 * The servers run on an event loop in a second thread; this thread is the
 * client, with blocking sockets and timeouts, sending raw bytes: framing,
 * pipelining, every refusal the layer makes, timeouts, client aborts,
 * streaming with back-pressure, max_connections, drain, and TLS (with a
 * certificate made by the openssl CLI when it exists). Control of the
 * servers (stats, drain, destroy) goes through a pipe into the loop, since
 * nothing in http.h may be called from another thread.
 */
#include "server/http.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

static int failures;
#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                        \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ------------------------------------------------------------ the loop thread */

static struct event_base *base;
static int cmd_pipe[2];

struct cmd {
    void (*fn)(void *arg);
    void *arg;
    sem_t done;
};

static void cmd_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    (void)arg;
    struct cmd *c;
    if (read(fd, &c, sizeof c) != (ssize_t)sizeof c)
        return;
    c->fn(c->arg);
    sem_post(&c->done);
}

/* Runs fn(arg) on the loop thread and waits for it. */
static void in_loop(void (*fn)(void *), void *arg)
{
    struct cmd c = {fn, arg, {{0}}};
    struct cmd *p = &c;
    sem_init(&c.done, 0, 0);
    if (write(cmd_pipe[1], &p, sizeof p) != (ssize_t)sizeof p)
        abort();
    while (sem_wait(&c.done) != 0 && errno == EINTR)
        ;
    sem_destroy(&c.done);
}

static void *loop_main(void *arg)
{
    (void)arg;
    event_base_loop(base, EVLOOP_NO_EXIT_ON_EMPTY);
    return NULL;
}

static void loop_stop(void *arg)
{
    (void)arg;
    event_base_loopbreak(base);
}

/* ------------------------------------------------------------ the test handler */

static atomic_int n_requests, n_aborts, n_drains, n_refused_writes, n_stream_done;

/* Per request work that outlives on_request: a timer. */
struct work {
    struct http_req *req;
    struct event *timer;
    int left;  /* /stream: chunks still to send */
    int flood; /* /flood: write until refused, resume on drain */
};

static void work_free(struct work *w)
{
    if (w->timer)
        event_free(w->timer);
    free(w);
}

static void json_str(char *out, size_t cap, size_t *n, const char *s, size_t len)
{
    if (*n < cap)
        out[(*n)++] = '"';
    for (size_t i = 0; i < len && *n + 8 < cap; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') {
            out[(*n)++] = '\\';
            out[(*n)++] = (char)ch;
        } else if (ch < 0x20) {
            *n += (size_t)snprintf(out + *n, cap - *n, "\\u%04x", ch);
        } else {
            out[(*n)++] = (char)ch;
        }
    }
    if (*n < cap)
        out[(*n)++] = '"';
}

/* Answers {"method":..,"path":..,"query":..,"body":..}. */
static void respond_echo(struct http_req *req)
{
    static char out[1 << 17];
    size_t n = 0, blen;
    const char *body = http_req_body(req, &blen);
    const char *m = http_req_method(req), *p = http_req_path(req), *q = http_req_query(req);
    n += (size_t)snprintf(out + n, sizeof out - n, "{\"method\":");
    json_str(out, sizeof out, &n, m, strlen(m));
    n += (size_t)snprintf(out + n, sizeof out - n, ",\"path\":");
    json_str(out, sizeof out, &n, p, strlen(p));
    n += (size_t)snprintf(out + n, sizeof out - n, ",\"query\":");
    json_str(out, sizeof out, &n, q, strlen(q));
    n += (size_t)snprintf(out + n, sizeof out - n, ",\"body\":");
    json_str(out, sizeof out, &n, body, blen);
    const char *xt = http_req_header(req, "X-Test");
    if (xt) {
        n += (size_t)snprintf(out + n, sizeof out - n, ",\"xtest\":");
        json_str(out, sizeof out, &n, xt, strlen(xt));
    }
    n += (size_t)snprintf(out + n, sizeof out - n, "}");
    http_respond(req, 200, "application/json", "X-Extra: yes\r\n", out, n);
}

static void flood_write(struct work *w)
{
    static char chunk[32768];
    memset(chunk, 'f', sizeof chunk);
    while (http_stream_write(w->req, chunk, sizeof chunk) == 0)
        ;
    atomic_fetch_add(&n_refused_writes, 1);
}

static void work_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct work *w = arg;
    (void)fd;
    (void)what;
    const char *path = http_req_path(w->req);
    if (strcmp(path, "/slow") == 0) {
        struct http_req *req = w->req;
        work_free(w);
        respond_echo(req);
        return;
    }
    /* /stream */
    char buf[64];
    int n = snprintf(buf, sizeof buf, "chunk %d\n", w->left);
    if (http_stream_write(w->req, buf, (size_t)n) != 0) {
        struct http_req *req = w->req;
        work_free(w);
        http_abort(req);
        return;
    }
    if (--w->left == 0) {
        struct http_req *req = w->req;
        work_free(w);
        http_stream_end(req);
        atomic_fetch_add(&n_stream_done, 1);
        return;
    }
    struct timeval tv = {0, 20 * 1000};
    event_add(w->timer, &tv);
}

static void on_request(struct http_req *req, void *arg)
{
    (void)arg;
    atomic_fetch_add(&n_requests, 1);
    const char *path = http_req_path(req);
    if (strcmp(path, "/slow") == 0 || strcmp(path, "/stream") == 0) {
        struct work *w = calloc(1, sizeof *w);
        w->req = req;
        w->timer = evtimer_new(base, work_timer_cb, w);
        http_req_set_data(req, w);
        int ms = 300;
        const char *q = http_req_query(req);
        if (strncmp(q, "ms=", 3) == 0)
            ms = atoi(q + 3);
        if (path[1] == 's' && path[2] == 't') {
            w->left = 5;
            ms = 20;
            http_stream_begin(req, 200, "text/plain", NULL);
        }
        struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
        event_add(w->timer, &tv);
        return;
    }
    if (strcmp(path, "/flood") == 0) {
        struct work *w = calloc(1, sizeof *w);
        w->req = req;
        w->flood = 1;
        http_req_set_data(req, w);
        http_stream_begin(req, 200, "application/octet-stream", NULL);
        flood_write(w);
        return;
    }
    if (strcmp(path, "/nocontent") == 0) {
        http_respond(req, 204, NULL, NULL, NULL, 0);
        return;
    }
    if (strcmp(path, "/drop") == 0) {
        http_abort(req);
        return;
    }
    respond_echo(req);
}

static void on_abort(struct http_req *req, void *arg)
{
    (void)arg;
    atomic_fetch_add(&n_aborts, 1);
    struct work *w = http_req_get_data(req);
    if (w)
        work_free(w);
}

static void on_drain(struct http_req *req, void *arg)
{
    (void)arg;
    atomic_fetch_add(&n_drains, 1);
    struct work *w = http_req_get_data(req);
    if (w && w->flood)
        flood_write(w);
}

/* ------------------------------------------------------------ servers, from the loop */

struct srv {
    struct http_server *s;
    struct http_limits lim;
    struct ssl_ctx_st *tls;
    int port;
    struct http_stats st;
    int ok;
};

static void srv_start(void *arg)
{
    struct srv *v = arg;
    char err[256];
    struct http_handler h = {on_request, on_abort, on_drain, NULL};
    v->ok = 0;
    v->s = http_server_create(base, &v->lim, &h, v->tls, err, sizeof err);
    if (!v->s) {
        fprintf(stderr, "http_server_create: %s\n", err);
        return;
    }
    int fd = http_listen_tcp("127.0.0.1", 0, 0, err, sizeof err);
    if (fd < 0) {
        fprintf(stderr, "http_listen_tcp: %s\n", err);
        return;
    }
    if (http_server_add_listener(v->s, fd, err, sizeof err) != 0) {
        fprintf(stderr, "http_server_add_listener: %s\n", err);
        return;
    }
    v->port = http_server_port(v->s, 0);
    v->ok = v->port > 0;
}

static void srv_stats(void *arg)
{
    struct srv *v = arg;
    http_server_get_stats(v->s, &v->st);
}

static void srv_drain(void *arg)
{
    http_server_drain(((struct srv *)arg)->s);
}

static void srv_destroy(void *arg)
{
    struct srv *v = arg;
    http_server_destroy(v->s);
    v->s = NULL;
}

static struct http_stats stats_of(struct srv *v)
{
    in_loop(srv_stats, v);
    return v->st;
}

/* Waits until the server counts no open connection (closes are noticed
 * asynchronously). */
static void wait_idle(struct srv *v)
{
    double end = now_s() + 3;
    while (now_s() < end && stats_of(v).connections_open > 0)
        sleep_ms(10);
}

/* ------------------------------------------------------------ a raw client */

struct client {
    int fd;
    char buf[1 << 16];
    size_t len;
};

static int cl_open(struct client *c, int port)
{
    c->len = 0;
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    struct timeval tv = {3, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    return 0;
}

static void cl_close(struct client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
}

static void cl_send(struct client *c, const char *data, size_t len)
{
    while (len) {
        ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
        if (n <= 0)
            return;
        data += n;
        len -= (size_t)n;
    }
}

static void cl_sends(struct client *c, const char *s)
{
    cl_send(c, s, strlen(s));
}

/* Reads more bytes; 0 on EOF, -1 on error or timeout. */
static ssize_t cl_fill(struct client *c)
{
    if (c->len == sizeof c->buf)
        return -1;
    ssize_t n = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
    if (n > 0)
        c->len += (size_t)n;
    return n;
}

static void cl_consume(struct client *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
}

struct resp {
    int status;
    char head[8192];
    char body[1 << 16];
    size_t body_len;
    int chunked, closed_after;
};

/* The value of header name in r->head, or NULL (into a static buffer). */
static const char *resp_header(const struct resp *r, const char *name)
{
    static char val[512];
    size_t nl = strlen(name);
    const char *p = strstr(r->head, "\r\n");
    while (p && p[2]) {
        p += 2;
        if (strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            const char *v = p + nl + 1;
            while (*v == ' ')
                v++;
            size_t k = strcspn(v, "\r");
            if (k >= sizeof val)
                k = sizeof val - 1;
            memcpy(val, v, k);
            val[k] = '\0';
            return val;
        }
        p = strstr(p, "\r\n");
    }
    return NULL;
}

/* Reads one response (after any 1xx when skip_1xx). Returns 0 or -1. */
static int cl_response(struct client *c, struct resp *r, int skip_1xx)
{
    memset(r, 0, sizeof *r);
    for (;;) {
        char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
        while (!end) {
            if (cl_fill(c) <= 0)
                return -1;
            end = memmem(c->buf, c->len, "\r\n\r\n", 4);
        }
        size_t hl = (size_t)(end - c->buf) + 4;
        if (hl >= sizeof r->head)
            return -1;
        memcpy(r->head, c->buf, hl);
        r->head[hl] = '\0';
        cl_consume(c, hl);
        if (sscanf(r->head, "HTTP/1.%*d %d", &r->status) != 1)
            return -1;
        if (r->status / 100 == 1 && skip_1xx)
            continue;
        break;
    }
    if (r->status / 100 == 1 || r->status == 204)
        return 0;
    const char *te = resp_header(r, "Transfer-Encoding");
    const char *cls = resp_header(r, "Content-Length");
    if (te && strcasecmp(te, "chunked") == 0) {
        r->chunked = 1;
        for (;;) {
            char *eol;
            while (!(eol = memmem(c->buf, c->len, "\r\n", 2)))
                if (cl_fill(c) <= 0)
                    return -1;
            size_t sz = strtoul(c->buf, NULL, 16);
            cl_consume(c, (size_t)(eol - c->buf) + 2);
            while (c->len < sz + 2)
                if (cl_fill(c) <= 0)
                    return -1;
            if (memcmp(c->buf + sz, "\r\n", 2) != 0)
                return -1;
            if (r->body_len + sz < sizeof r->body) {
                memcpy(r->body + r->body_len, c->buf, sz);
                r->body_len += sz;
            }
            cl_consume(c, sz + 2);
            if (sz == 0)
                break;
        }
    } else if (cls) {
        size_t n = strtoul(cls, NULL, 10);
        if (n >= sizeof r->body)
            return -1;
        while (c->len < n)
            if (cl_fill(c) <= 0)
                return -1;
        memcpy(r->body, c->buf, n);
        r->body_len = n;
        cl_consume(c, n);
    } else {
        ssize_t k;
        while ((k = cl_fill(c)) > 0)
            ;
        if (k < 0)
            return -1;
        size_t n = c->len < sizeof r->body - 1 ? c->len : sizeof r->body - 1;
        memcpy(r->body, c->buf, n);
        r->body_len = n;
        cl_consume(c, c->len);
        r->closed_after = 1;
    }
    r->body[r->body_len] = '\0';
    return 0;
}

/* Whether the server closed the connection (EOF with nothing more). */
static int cl_eof(struct client *c)
{
    char b[256];
    ssize_t n = recv(c->fd, b, sizeof b, 0);
    return n == 0 || (n < 0 && errno == ECONNRESET);
}

/* Sends raw, expects one response with status, then (when must_close)
 * that the server closed the connection. */
static void expect_status(int port, const char *raw, size_t rawlen, int status, int must_close,
                          const char *body_has)
{
    struct client c;
    struct resp r;
    if (cl_open(&c, port) != 0) {
        CHECK(!"connect");
        return;
    }
    cl_send(&c, raw, rawlen);
    int rc = cl_response(&c, &r, 1);
    CHECK(rc == 0);
    if (r.status != status)
        fprintf(stderr, "  expected %d, got %d for %.60s\n", status, r.status, raw);
    CHECK(r.status == status);
    if (body_has && !strstr(r.body, body_has))
        fprintf(stderr, "  body %s lacks %s\n", r.body, body_has);
    if (body_has)
        CHECK(strstr(r.body, body_has) != NULL);
    if (must_close) {
        const char *conn = resp_header(&r, "Connection");
        CHECK(conn && strcasecmp(conn, "close") == 0);
        CHECK(cl_eof(&c));
    }
    cl_close(&c);
}

#define EXPECT(port, raw, status, must_close, body_has)                                            \
    expect_status(port, raw, sizeof(raw) - 1, status, must_close, body_has)

/* ------------------------------------------------------------ the tests */

static void test_basic(struct srv *v)
{
    struct client c;
    struct resp r;
    CHECK(cl_open(&c, v->port) == 0);
    cl_sends(&c, "GET /v1/models?x=1&y=2 HTTP/1.1\r\nHost: t\r\nX-Test:  spaced value  \r\n"
                 "X-Request-Id: my-id.1:2_3\r\n\r\n");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200);
    CHECK(strstr(r.body, "\"path\":\"/v1/models\"") != NULL);
    CHECK(strstr(r.body, "\"query\":\"x=1&y=2\"") != NULL);
    CHECK(strstr(r.body, "\"xtest\":\"spaced value\"") != NULL);
    const char *id = resp_header(&r, "X-Request-Id");
    CHECK(id && strcmp(id, "my-id.1:2_3") == 0);
    CHECK(resp_header(&r, "Date") != NULL);
    const char *srvh = resp_header(&r, "Server");
    CHECK(srvh && strcmp(srvh, "inferd") == 0);
    const char *ct = resp_header(&r, "Content-Type");
    CHECK(ct && strcmp(ct, "application/json") == 0);
    const char *ex = resp_header(&r, "X-Extra");
    CHECK(ex && strcmp(ex, "yes") == 0);
    const char *conn = resp_header(&r, "Connection");
    CHECK(conn && strcasecmp(conn, "keep-alive") == 0);

    /* POST with Content-Length on the same connection; an invalid
     * request id is replaced with 32 hex digits */
    cl_sends(&c, "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n"
                 "X-Request-Id: bad id!\r\n\r\nhello world");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200);
    CHECK(strstr(r.body, "\"method\":\"POST\"") != NULL);
    CHECK(strstr(r.body, "\"body\":\"hello world\"") != NULL);
    id = resp_header(&r, "X-Request-Id");
    CHECK(id && strlen(id) == 32 && strspn(id, "0123456789abcdef") == 32);

    /* chunked request body, decoded, with a trailer */
    cl_sends(&c, "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                 "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200);
    CHECK(strstr(r.body, "\"body\":\"hello world\"") != NULL);

    /* 204: no body, no Content-Length */
    cl_sends(&c, "GET /nocontent HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 204);
    CHECK(resp_header(&r, "Content-Length") == NULL);

    /* HEAD: the length of the body, without the body */
    cl_sends(&c, "HEAD /h HTTP/1.1\r\nHost: t\r\n\r\nGET /after-head HTTP/1.1\r\nHost: t\r\n\r\n");
    char *end;
    while (!(end = memmem(c.buf, c.len, "\r\n\r\n", 4)))
        if (cl_fill(&c) <= 0)
            break;
    CHECK(end != NULL);
    if (end) {
        CHECK(strncmp(c.buf, "HTTP/1.1 200", 12) == 0);
        cl_consume(&c, (size_t)(end - c.buf) + 4);
    }
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200 && strstr(r.body, "/after-head") != NULL);

    /* Connection: close from the client */
    cl_sends(&c, "GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200);
    conn = resp_header(&r, "Connection");
    CHECK(conn && strcasecmp(conn, "close") == 0);
    CHECK(cl_eof(&c));
    cl_close(&c);

    /* HTTP/1.0 without keep-alive closes */
    EXPECT(v->port, "GET /ten HTTP/1.0\r\n\r\n", 200, 1, "/ten");
}

static void test_expect(struct srv *v)
{
    struct client c;
    struct resp r;
    CHECK(cl_open(&c, v->port) == 0);
    cl_sends(&c,
             "POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 100);
    cl_sends(&c, "abcde");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200 && strstr(r.body, "\"body\":\"abcde\"") != NULL);
    cl_close(&c);

    /* over the limit: 413 at once, no 100 */
    CHECK(cl_open(&c, v->port) == 0);
    cl_sends(&c, "POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n"
                 "Expect: 100-continue\r\n\r\n");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 413);
    CHECK(strstr(r.body, "--max-body-bytes") != NULL);
    CHECK(cl_eof(&c));
    cl_close(&c);

    EXPECT(v->port, "POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nExpect: magic\r\n\r\nx",
           417, 1, "Expect");
}

static void test_pipelining(struct srv *v)
{
    struct client c;
    struct resp r;
    CHECK(cl_open(&c, v->port) == 0);
    /* the first is slow: the others must still come back after it */
    cl_sends(&c, "GET /slow?ms=200 HTTP/1.1\r\nHost: t\r\n\r\n"
                 "POST /two HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
                 "GET /three HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200 && strstr(r.body, "\"path\":\"/slow\"") != NULL);
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200 && strstr(r.body, "\"path\":\"/two\"") != NULL &&
          strstr(r.body, "\"body\":\"abc\"") != NULL);
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200 && strstr(r.body, "\"path\":\"/three\"") != NULL);
    cl_close(&c);

    /* more pipelined input than max_header_bytes: reading pauses while
     * the first is answered, then resumes */
    static char big[40000];
    int n = snprintf(big, sizeof big,
                     "GET /slow?ms=100 HTTP/1.1\r\nHost: t\r\n\r\n"
                     "POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: 30000\r\n\r\n");
    memset(big + n, 'b', 30000);
    n += 30000;
    CHECK(cl_open(&c, v->port) == 0);
    cl_send(&c, big, (size_t)n);
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200 && strstr(r.body, "\"path\":\"/slow\"") != NULL);
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200 && strstr(r.body, "\"path\":\"/big\"") != NULL && r.body_len > 30000);
    cl_close(&c);

    /* a request after Connection: close is not answered */
    CHECK(cl_open(&c, v->port) == 0);
    cl_sends(&c, "GET /one HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                 "GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200 && strstr(r.body, "/one") != NULL);
    CHECK(cl_eof(&c));
    cl_close(&c);
}

static void test_refusals(struct srv *v)
{
    int p = v->port;
    EXPECT(p,
           "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
           "\r\n0\r\n\r\n",
           400, 1, "malformed request");
    EXPECT(p, "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcde",
           400, 1, "malformed request");
    EXPECT(p,
           "POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
           400, 1, "malformed request");
    EXPECT(p, "POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
           400, 1, NULL);
    EXPECT(p, "GET /x HTTP/1.1\r\nHost: t\r\nBad\x01Name: v\r\n\r\n", 400, 1, "malformed");
    EXPECT(p, "GET /x HTTP/1.1\r\nHost: t\r\nBad Name: v\r\n\r\n", 400, 1, "malformed");
    EXPECT(p, "GET /x HTTP/1.1\r\nHost: t\r\nBad : v\r\n\r\n", 400, 1, "malformed request");
    EXPECT(p, "GET /x HTTP/1.1\r\nHost: t\r\n: v\r\n\r\n", 400, 1, "empty name");
    EXPECT(p, "GET /x HTTP/1.1\nHost: t\n\n", 400, 1, "bare LF");
    EXPECT(p, "GET /x HTTP/1.1\r\nHost: t\r\nX-A: a\r\n folded\r\n\r\n", 400, 1, "folding");
    EXPECT(p, "GET /x HTTP/1.1\r\nHost: t\r\nContent-Length: \r\n\r\n", 400, 1, NULL);
    EXPECT(p, "POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
           400, 1, NULL);
    EXPECT(p, "GET /x HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n", 400, 1, NULL);
    EXPECT(p, "GET /x HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\n", 400, 1, NULL);
    EXPECT(p, "GET /x HTTP/1.1\r\nHost: t\r\nContent-Length: 0x5\r\n\r\n", 400, 1, NULL);
    EXPECT(p, "POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, 1,
           "HTTP/1.0");
    EXPECT(p, "GET /up HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", 200, 1,
           "/up");
    EXPECT(p, "CONNECT example.com:443 HTTP/1.1\r\nHost: t\r\n\r\n", 400, 1, "CONNECT");
    EXPECT(p, "GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505, 1, "HTTP/1.1");
    EXPECT(p, "GET / HTTP/3.1\r\nHost: t\r\n\r\n", 505, 1, NULL);

    /* 431: one big header, and too many fields */
    static char big[32768];
    int n = snprintf(big, sizeof big, "GET / HTTP/1.1\r\nHost: t\r\nX-Big: ");
    memset(big + n, 'a', 20000);
    n += 20000;
    n += snprintf(big + n, sizeof big - (size_t)n, "\r\n\r\n");
    expect_status(p, big, (size_t)n, 431, 1, "request headers exceed 16384 bytes");
    n = snprintf(big, sizeof big, "GET / HTTP/1.1\r\nHost: t\r\n");
    for (int i = 0; i < 120; i++)
        n += snprintf(big + n, sizeof big - (size_t)n, "X-H%d: v\r\n", i);
    n += snprintf(big + n, sizeof big - (size_t)n, "\r\n");
    expect_status(p, big, (size_t)n, 431, 1, "header fields");

    /* 414: a request line over 8 KiB */
    n = snprintf(big, sizeof big, "GET /");
    memset(big + n, 'u', 9000);
    n += 9000;
    n += snprintf(big + n, sizeof big - (size_t)n, " HTTP/1.1\r\nHost: t\r\n\r\n");
    expect_status(p, big, (size_t)n, 414, 1, "request line exceeds 8192 bytes");

    /* 413: declared, and chunked counted as it arrives */
    EXPECT(p, "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 70000\r\n\r\n", 413, 1,
           "request body exceeds 65536 bytes (--max-body-bytes)");
    n = snprintf(big, sizeof big,
                 "POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (int i = 0; i < 5; i++) {
        n += snprintf(big + n, sizeof big - (size_t)n, "1000\r\n");
        memset(big + n, 'c', 4096);
        n += 4096;
        n += snprintf(big + n, sizeof big - (size_t)n, "\r\n");
    }
    struct client c;
    struct resp r;
    CHECK(cl_open(&c, p) == 0);
    cl_send(&c, big, (size_t)n);
    for (int i = 0; i < 12; i++)
        cl_send(&c, big + (n - 4096 - 8), 4096 + 8); /* more 4 KiB chunks: 65 KiB in all */
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 413);
    CHECK(cl_eof(&c));
    cl_close(&c);
}

static void test_timeouts(struct srv *v)
{
    struct client c;
    struct resp r;
    /* header timeout: an incomplete head */
    CHECK(cl_open(&c, v->port) == 0);
    double t0 = now_s();
    cl_sends(&c, "GET / HTTP/1.1\r\nHost: t\r\n");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 408);
    CHECK(now_s() - t0 < 2.0);
    CHECK(cl_eof(&c));
    cl_close(&c);

    /* body timeout: a body that stops */
    CHECK(cl_open(&c, v->port) == 0);
    cl_sends(&c, "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 408);
    CHECK(strstr(r.body, "body") != NULL);
    cl_close(&c);

    /* idle keep-alive: closed silently */
    CHECK(cl_open(&c, v->port) == 0);
    cl_sends(&c, "GET /a HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK(cl_response(&c, &r, 0) == 0);
    t0 = now_s();
    CHECK(cl_eof(&c));
    double dt = now_s() - t0;
    CHECK(dt > 0.5 && dt < 2.5);
    cl_close(&c);
}

static void test_abort(struct srv *v)
{
    struct client c;
    int a0 = atomic_load(&n_aborts);
    uint64_t s0 = stats_of(v).requests_aborted;
    CHECK(cl_open(&c, v->port) == 0);
    cl_sends(&c, "GET /slow?ms=1000 HTTP/1.1\r\nHost: t\r\n\r\n");
    sleep_ms(100);
    cl_close(&c); /* EOF while the handler works */
    double end = now_s() + 2;
    while (atomic_load(&n_aborts) == a0 && now_s() < end)
        sleep_ms(10);
    CHECK(atomic_load(&n_aborts) == a0 + 1);
    CHECK(stats_of(v).requests_aborted == s0 + 1);

    /* a reset during a stream */
    CHECK(cl_open(&c, v->port) == 0);
    cl_sends(&c, "GET /stream HTTP/1.1\r\nHost: t\r\n\r\n");
    sleep_ms(30);
    struct linger lg = {1, 0};
    setsockopt(c.fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    cl_close(&c);
    end = now_s() + 2;
    while (atomic_load(&n_aborts) == a0 + 1 && now_s() < end)
        sleep_ms(10);
    CHECK(atomic_load(&n_aborts) == a0 + 2);

    /* http_abort: closed without a response and without on_abort */
    CHECK(cl_open(&c, v->port) == 0);
    cl_sends(&c, "GET /drop HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK(cl_eof(&c));
    cl_close(&c);
    sleep_ms(50);
    CHECK(atomic_load(&n_aborts) == a0 + 2);
}

static void test_stream(struct srv *v)
{
    struct client c;
    struct resp r;
    int d0 = atomic_load(&n_stream_done);
    CHECK(cl_open(&c, v->port) == 0);
    cl_sends(&c, "GET /stream HTTP/1.1\r\nHost: t\r\n\r\n");
    /* the raw framing of the first chunk */
    char *end;
    while (!(end = memmem(c.buf, c.len, "\r\n\r\n", 4)))
        if (cl_fill(&c) <= 0)
            break;
    CHECK(end && memmem(c.buf, c.len, "Transfer-Encoding: chunked", 26) != NULL);
    CHECK(cl_response(&c, &r, 0) == 0); /* parses what is buffered, then the rest */
    CHECK(r.chunked);
    CHECK(strcmp(r.body, "chunk 5\nchunk 4\nchunk 3\nchunk 2\nchunk 1\n") == 0);
    /* keep-alive after a stream */
    cl_sends(&c, "GET /after HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200 && strstr(r.body, "/after") != NULL);
    cl_close(&c);
    CHECK(atomic_load(&n_stream_done) == d0 + 1);

    /* HTTP/1.0: no chunked coding, the close ends the body */
    CHECK(cl_open(&c, v->port) == 0);
    cl_sends(&c, "GET /stream HTTP/1.0\r\n\r\n");
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(!r.chunked && r.closed_after);
    CHECK(strcmp(r.body, "chunk 5\nchunk 4\nchunk 3\nchunk 2\nchunk 1\n") == 0);
    cl_close(&c);
}

static void test_flood(struct srv *v)
{
    /* a client that does not read: writes are refused, on_drain runs as
     * the kernel takes some, then the send timeout drops it */
    struct client c;
    int a0 = atomic_load(&n_aborts);
    int rcv = 4096;
    c.len = 0;
    c.fd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(c.fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)v->port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(connect(c.fd, (struct sockaddr *)&a, sizeof a) == 0);
    cl_sends(&c, "GET /flood HTTP/1.1\r\nHost: t\r\n\r\n");
    double end = now_s() + 4;
    while (atomic_load(&n_aborts) == a0 && now_s() < end)
        sleep_ms(20);
    CHECK(atomic_load(&n_aborts) == a0 + 1);
    CHECK(atomic_load(&n_refused_writes) >= 1);
    CHECK(atomic_load(&n_drains) >= 1);
    cl_close(&c);
}

static void test_max_connections(struct srv *v)
{
    struct client cs[4], extra;
    struct resp r;
    wait_idle(v);
    for (int i = 0; i < 4; i++)
        CHECK(cl_open(&cs[i], v->port) == 0);
    /* the server sees them in order; the fifth is over the limit */
    double end = now_s() + 2;
    while (stats_of(v).connections_open < 4 && now_s() < end)
        sleep_ms(5);
    CHECK(cl_open(&extra, v->port) == 0);
    CHECK(cl_response(&extra, &r, 0) == 0);
    CHECK(r.status == 503);
    const char *ra = resp_header(&r, "Retry-After");
    CHECK(ra && strcmp(ra, "1") == 0);
    CHECK(strstr(r.body, "\"type\":\"server_error\"") != NULL);
    CHECK(cl_eof(&extra));
    cl_close(&extra);
    for (int i = 0; i < 4; i++)
        cl_close(&cs[i]);
    CHECK(stats_of(v).connections_refused >= 1);
}

static void test_drain(struct srv *v)
{
    struct client c, idle;
    struct resp r;
    CHECK(cl_open(&idle, v->port) == 0);
    cl_sends(&idle, "GET /a HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK(cl_response(&idle, &r, 0) == 0);
    CHECK(cl_open(&c, v->port) == 0);
    cl_sends(&c, "GET /slow?ms=300 HTTP/1.1\r\nHost: t\r\n\r\n");
    sleep_ms(50);
    in_loop(srv_drain, v);
    /* the idle one closes now; the busy one gets its answer, then close */
    CHECK(cl_eof(&idle));
    CHECK(cl_response(&c, &r, 0) == 0);
    CHECK(r.status == 200);
    const char *conn = resp_header(&r, "Connection");
    CHECK(conn && strcasecmp(conn, "close") == 0);
    CHECK(cl_eof(&c));
    cl_close(&c);
    cl_close(&idle);
    CHECK(cl_open(&c, v->port) != 0); /* the listener is gone */
    cl_close(&c);
}

/* ------------------------------------------------------------ TLS */

static SSL *tls_connect(SSL_CTX *cctx, int port, int *fd_out)
{
    struct client c;
    if (cl_open(&c, port) != 0)
        return NULL;
    SSL *ssl = SSL_new(cctx);
    SSL_set_fd(ssl, c.fd);
    SSL_set_tlsext_host_name(ssl, "localhost");
    *fd_out = c.fd;
    if (SSL_connect(ssl) != 1) {
        SSL_free(ssl);
        close(c.fd);
        ERR_clear_error();
        return NULL;
    }
    return ssl;
}

static void test_tls(const char *dir)
{
    char cmd[2048], cert[512], key[512], err[256];
    snprintf(cert, sizeof cert, "%s/cert.pem", dir);
    snprintf(key, sizeof key, "%s/key.pem", dir);
    if (system("command -v openssl >/dev/null 2>&1") != 0) {
        printf("SKIP tls: no openssl binary\n");
        return;
    }
    snprintf(cmd, sizeof cmd,
             "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
             "-days 1 -subj /CN=localhost -keyout %s -out %s >/dev/null 2>&1",
             key, cert);
    if (system(cmd) != 0) {
        printf("SKIP tls: openssl req failed\n");
        return;
    }
    /* errors name the file */
    CHECK(http_tls_ctx_create("/nonexistent/cert.pem", key, err, sizeof err) == NULL);
    CHECK(strstr(err, "/nonexistent/cert.pem") != NULL);
    CHECK(http_tls_ctx_create(cert, cert, err, sizeof err) == NULL);
    CHECK(strstr(err, "cert.pem") != NULL);
    http_tls_ctx_destroy(NULL);

    struct srv v = {0};
    v.tls = http_tls_ctx_create(cert, key, err, sizeof err);
    if (!v.tls)
        fprintf(stderr, "http_tls_ctx_create: %s\n", err);
    CHECK(v.tls != NULL);
    if (!v.tls)
        return;
    v.lim.header_timeout_s = 2;
    in_loop(srv_start, &v);
    CHECK(v.ok);

    SSL_CTX *cctx = SSL_CTX_new(TLS_client_method());
    int fd = -1;
    SSL *ssl = tls_connect(cctx, v.port, &fd);
    CHECK(ssl != NULL);
    if (ssl) {
        const char *req = "GET /secure HTTP/1.1\r\nHost: t\r\n\r\n"
                          "GET /again HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
        CHECK(SSL_write(ssl, req, (int)strlen(req)) == (int)strlen(req));
        char buf[8192];
        size_t len = 0;
        int n;
        while (len < sizeof buf - 1 &&
               (n = SSL_read(ssl, buf + len, (int)(sizeof buf - 1 - len))) > 0)
            len += (size_t)n;
        buf[len] = '\0';
        CHECK(strstr(buf, "HTTP/1.1 200") != NULL);
        CHECK(strstr(buf, "\"path\":\"/secure\"") != NULL);
        CHECK(strstr(buf, "\"path\":\"/again\"") != NULL);
        CHECK(SSL_version(ssl) >= TLS1_2_VERSION);
        SSL_free(ssl);
        close(fd);
    }
    ERR_clear_error();

    /* a client that drops during the handshake, and one mid-request */
    struct client raw;
    CHECK(cl_open(&raw, v.port) == 0);
    cl_sends(&raw, "\x16\x03\x01\x00\x05hello");
    cl_close(&raw);
    ssl = tls_connect(cctx, v.port, &fd);
    CHECK(ssl != NULL);
    if (ssl) {
        const char *req = "GET /slow?ms=500 HTTP/1.1\r\nHost: t\r\n\r\n";
        int a0 = atomic_load(&n_aborts);
        SSL_write(ssl, req, (int)strlen(req));
        sleep_ms(100);
        SSL_free(ssl); /* no close_notify: a dirty close */
        close(fd);
        double end = now_s() + 2;
        while (atomic_load(&n_aborts) == a0 && now_s() < end)
            sleep_ms(10);
        CHECK(atomic_load(&n_aborts) == a0 + 1);
    }
    SSL_CTX_free(cctx);

    /* TLS 1.1 is refused */
    cctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(cctx, TLS1_VERSION);
    SSL_CTX_set_max_proto_version(cctx, TLS1_1_VERSION);
    SSL_CTX_set_cipher_list(cctx, "DEFAULT:@SECLEVEL=0");
    ssl = tls_connect(cctx, v.port, &fd);
    CHECK(ssl == NULL);
    if (ssl) {
        SSL_free(ssl);
        close(fd);
    }
    SSL_CTX_free(cctx);
    ERR_clear_error();

    wait_idle(&v);
    in_loop(srv_destroy, &v);
    http_tls_ctx_destroy(v.tls);
    printf("ok tls\n");
}

/* ------------------------------------------------------------ main */

static int count_fds(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

static void unit_checks(void)
{
    struct http_limits l = {0};
    http_limits_resolve(&l);
    CHECK(l.max_request_line == 8192 && l.max_header_bytes == 16384 && l.max_headers == 100);
    CHECK(l.max_body_bytes == 8u << 20 && l.max_connections == 4096);
    CHECK(l.max_output_bytes == 1u << 20 && l.idle_timeout_s == 75);
    CHECK(strcmp(http_status_text(404), "Not Found") == 0);
    CHECK(strcmp(http_status_text(799), "Unknown") == 0);
    char err[128];
    CHECK(http_listen_tcp("no.such.host.invalid", 0, 0, err, sizeof err) < 0);
    CHECK(err[0] != '\0');
    int fd = http_listen_tcp("::1", 0, 16, err, sizeof err);
    if (fd >= 0)
        close(fd); /* IPv6 loopback may be absent */
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    unit_checks();
    int fds0 = count_fds();
    base = event_base_new();
    if (!base || pipe(cmd_pipe) != 0)
        return 1;
    struct event *cmd_ev = event_new(base, cmd_pipe[0], EV_READ | EV_PERSIST, cmd_cb, NULL);
    event_add(cmd_ev, NULL);
    pthread_t th;
    pthread_create(&th, NULL, loop_main, NULL);

    struct srv v = {0};
    v.lim.header_timeout_s = 0.5;
    v.lim.body_timeout_s = 0.5;
    v.lim.idle_timeout_s = 1.0;
    v.lim.send_timeout_s = 1.0;
    v.lim.max_body_bytes = 65536;
    v.lim.max_output_bytes = 256 * 1024;
    v.lim.max_connections = 64;
    in_loop(srv_start, &v);
    CHECK(v.ok);
    if (!v.ok)
        return 1;

    double t0 = now_s();
    test_basic(&v);
    printf("ok basic\n");
    test_expect(&v);
    printf("ok expect\n");
    test_pipelining(&v);
    printf("ok pipelining\n");
    test_refusals(&v);
    printf("ok refusals\n");
    test_timeouts(&v);
    printf("ok timeouts\n");
    test_abort(&v);
    printf("ok abort\n");
    test_stream(&v);
    printf("ok stream\n");
    test_flood(&v);
    printf("ok flood\n");
    struct srv m = {0};
    m.lim.max_connections = 4;
    in_loop(srv_start, &m);
    test_max_connections(&m);
    in_loop(srv_destroy, &m);
    printf("ok max_connections\n");

    struct http_stats st = stats_of(&v);
    CHECK(st.requests_aborted == (uint64_t)atomic_load(&n_aborts));
    CHECK(st.requests == (uint64_t)atomic_load(&n_requests));
    CHECK(st.rejected_malformed >= 10);
    CHECK(st.rejected_too_large >= 5);
    CHECK(st.timeouts >= 3);
    CHECK(st.responses_by_class[1] >= 1 && st.responses_by_class[2] >= 10);
    CHECK(st.responses_by_class[4] >= 15 && st.responses_by_class[5] >= 2);
    CHECK(st.bytes_in > 0 && st.bytes_out > 0);
    CHECK(st.connections_accepted > 20);
    printf("stats: accepted %llu refused %llu requests %llu aborted %llu malformed %llu "
           "too_large %llu timeouts %llu in %llu out %llu\n",
           (unsigned long long)st.connections_accepted, (unsigned long long)st.connections_refused,
           (unsigned long long)st.requests, (unsigned long long)st.requests_aborted,
           (unsigned long long)st.rejected_malformed, (unsigned long long)st.rejected_too_large,
           (unsigned long long)st.timeouts, (unsigned long long)st.bytes_in,
           (unsigned long long)st.bytes_out);

    test_drain(&v);
    printf("ok drain\n");
    wait_idle(&v);
    st = stats_of(&v);
    CHECK(st.connections_open == 0 && st.requests_in_flight == 0);
    in_loop(srv_destroy, &v);

    /* destroy with a request in flight: on_abort runs */
    struct srv w = {0};
    in_loop(srv_start, &w);
    struct client c;
    CHECK(cl_open(&c, w.port) == 0);
    cl_sends(&c, "GET /slow?ms=2000 HTTP/1.1\r\nHost: t\r\n\r\n");
    double end = now_s() + 2;
    while (stats_of(&w).requests_in_flight == 0 && now_s() < end)
        sleep_ms(5);
    int a0 = atomic_load(&n_aborts);
    in_loop(srv_destroy, &w);
    CHECK(atomic_load(&n_aborts) == a0 + 1);
    CHECK(cl_eof(&c));
    cl_close(&c);

    char dir[] = "/tmp/test_http_XXXXXX";
    if (mkdtemp(dir)) {
        test_tls(dir);
        char cmd[256];
        snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
        if (system(cmd) != 0)
            fprintf(stderr, "cannot remove %s\n", dir);
    }

    in_loop(loop_stop, NULL);
    pthread_join(th, NULL);
    event_free(cmd_ev);
    event_base_free(base);
    close(cmd_pipe[0]);
    close(cmd_pipe[1]);
    int fds1 = count_fds();
    if (fds1 != fds0)
        fprintf(stderr, "fds: %d before, %d after\n", fds0, fds1);
    CHECK(fds1 == fds0);
    printf("%s (%.1f s)\n", failures ? "FAILED" : "all http tests passed", now_s() - t0);
    return failures ? 1 : 0;
}
