/* fuzz_http.c: libFuzzer entry point for the HTTP request path: llhttp and
 * its glue in server/http.c, under the limits of http.h.
 *
 * One input is one client connection's bytes. Each run makes an event
 * base and a server with small limits listening on an autobound abstract
 * unix socket (http_server_add_listener is the layer's only way in),
 * connects, writes the bytes, and runs the loop until nothing moves; then
 * half-closes and runs it again. Nothing may crash or leak, the server must
 * end with no connection and no request left, every request the handler
 * sees must be within the limits, and whatever the client reads must be
 * HTTP/1.1 responses.
 *
 * The first byte is the harness's, not the connection's:
 *   bits 0-1  how the handler answers: 0 respond (echoing the body),
 *             1 stream it in small chunks, 2 defer the answer to the
 *             driver's next pass (the next request arrives meanwhile),
 *             3 abort the connection
 *   bit 2     vary that per request (answer k uses (bits 0-1) + k)
 *   bits 3-7  k: writes of k*k bytes each (k = 0: one write of everything),
 *             so the fuzzer chooses where the input is split
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/event.h>

#include "server/http.h"
#include "server/log.h"

/* Small, so that inputs of a few KiB reach every limit. */
static const struct http_limits fuzz_limits = {
    .max_request_line = 512,
    .max_header_bytes = 1024,
    .max_headers = 16,
    .max_body_bytes = 2048,
    .max_output_bytes = 4096,
    .max_connections = 4,
};

#define FUZZ_MAX_PENDING 64

enum answer { ANS_RESPOND, ANS_STREAM, ANS_DEFER, ANS_ABORT };

struct run {
    int mode;                                   /* the first byte */
    struct http_req *pending[FUZZ_MAX_PENDING]; /* deferred, unanswered */
    int n_pending;
    uint64_t handed, aborted; /* on_request and on_abort calls */
    uint64_t received;        /* response bytes the client read */
    char head[9];             /* the first of them */
};

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_http: %s\n", what);
        __builtin_trap();
    }
}

/* A header value as http.h promises it: trimmed, one line, within the
 * header limit. */
static void check_header(const struct http_req *req, const char *name)
{
    const char *v = http_req_header(req, name);
    if (!v)
        return;
    size_t n = strlen(v);
    check(n <= fuzz_limits.max_header_bytes, "a header value longer than the header limit");
    check(strpbrk(v, "\r\n") == NULL, "a header value holding CR or LF");
    if (n)
        check(v[0] != ' ' && v[0] != '\t' && v[n - 1] != ' ' && v[n - 1] != '\t',
              "a header value not trimmed");
}

/* Everything the handler may rely on in a request it is handed. */
static void check_request(const struct http_req *req)
{
    size_t len;
    const char *body = http_req_body(req, &len);
    check(body != NULL && body[len] == '\0', "the body is not NUL-terminated");
    check(len <= fuzz_limits.max_body_bytes, "a body over max_body_bytes was handed over");
    const char *path = http_req_path(req), *query = http_req_query(req);
    check(strpbrk(path, "?#") == NULL, "the path holds '?' or '#'");
    check(strchr(query, '#') == NULL, "the query holds '#'");
    check(strlen(path) + strlen(query) + 1 <= fuzz_limits.max_request_line,
          "a target longer than the request line limit");
    const char *method = http_req_method(req);
    check(method && method[0] && strcmp(method, "CONNECT") != 0, "a bad method was handed over");
    const char *id = http_req_id(req);
    size_t idn = strlen(id);
    check(idn >= 1 && idn <= 128 &&
              strspn(id, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                         "0123456789._:-") == idn,
          "a request id unsafe to echo");
    static const char *const names[] = {"host",       "content-length", "transfer-encoding",
                                        "expect",     "x-request-id",   "content-type",
                                        "connection", "authorization"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        check_header(req, names[i]);
    /* The layer frames the body itself: a request carrying both framings
     * is a smuggling vector and must have been refused. */
    check(!(http_req_header(req, "content-length") && http_req_header(req, "transfer-encoding")),
          "Content-Length and Transfer-Encoding together were accepted");
}

static void answer(struct http_req *req, enum answer how)
{
    size_t len;
    const char *body = http_req_body(req, &len);
    switch (how) {
    case ANS_RESPOND:
    case ANS_DEFER:
        http_respond(req, 200, "text/plain", "X-Fuzz: 1\r\n", body, len);
        return;
    case ANS_STREAM:
        http_stream_begin(req, 200, "text/event-stream", NULL);
        for (size_t at = 0; at < len; at += 7) {
            /* a client that does not read: the handler gives up */
            if (http_stream_write(req, body + at, len - at < 7 ? len - at : 7) != 0) {
                http_abort(req);
                return;
            }
        }
        http_stream_end(req);
        return;
    case ANS_ABORT:
        http_abort(req);
        return;
    }
}

static void on_request(struct http_req *req, void *arg)
{
    struct run *r = arg;
    check_request(req);
    int how = r->mode & 3;
    if (r->mode & 4)
        how = (int)((how + r->handed) & 3);
    r->handed++;
    if (how == ANS_DEFER && r->n_pending < FUZZ_MAX_PENDING) {
        r->pending[r->n_pending++] = req;
        return;
    }
    answer(req, how == ANS_DEFER ? ANS_RESPOND : (enum answer)how);
}

static void on_abort(struct http_req *req, void *arg)
{
    struct run *r = arg;
    r->aborted++;
    for (int i = 0; i < r->n_pending; i++)
        if (r->pending[i] == req) {
            r->pending[i] = r->pending[--r->n_pending];
            return;
        }
    /* Only a deferred request can still be unfinished when the
     * connection goes. */
    check(0, "on_abort for a request the handler had finished");
}

/* Answers every deferred request; returns how many. */
static int answer_pending(struct run *r)
{
    int n = 0;
    while (r->n_pending > 0) {
        struct http_req *req = r->pending[--r->n_pending];
        answer(req, ANS_RESPOND);
        n++;
    }
    return n;
}

/* Reads what the server sent, so that its output never blocks. */
static void client_read(struct run *r, int fd)
{
    char buf[16384];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n <= 0)
            return;
        for (ssize_t i = 0; i < n && r->received + (uint64_t)i < sizeof r->head; i++)
            r->head[r->received + (uint64_t)i] = buf[i];
        r->received += (uint64_t)n;
    }
}

/* Runs the loop until three passes in a row change nothing. */
static void run_until_idle(struct event_base *base, struct http_server *s, struct run *r, int fd)
{
    uint64_t last[6] = {0};
    int still = 0;
    for (int pass = 0; still < 3; pass++) {
        check(pass < 100000, "the loop never went idle");
        event_base_loop(base, EVLOOP_NONBLOCK);
        client_read(r, fd);
        struct http_stats st;
        http_server_get_stats(s, &st);
        uint64_t now[6] = {st.bytes_in, st.bytes_out, st.requests,
                           r->aborted,  r->received,  (uint64_t)st.connections_open};
        still = memcmp(now, last, sizeof now) == 0 ? still + 1 : 0;
        memcpy(last, now, sizeof now);
    }
}

/* A listening socket on a fresh abstract unix address; its address in sa. */
static int listen_unix(struct sockaddr_un *sa, socklen_t *sl)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    check(fd >= 0, "socket failed");
    struct sockaddr_un any = {.sun_family = AF_UNIX};
    /* autobind: the kernel picks a unique abstract name */
    check(bind(fd, (struct sockaddr *)&any, sizeof(sa_family_t)) == 0, "bind failed");
    check(listen(fd, 8) == 0, "listen failed");
    *sl = sizeof *sa;
    check(getsockname(fd, (struct sockaddr *)sa, sl) == 0, "getsockname failed");
    return fd;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    /* every refusal is logged as a warning: keep the fuzzer's output */
    log_set_level(LOG_ERROR);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    struct run r = {.mode = data[0]};
    size_t k = (size_t)(data[0] >> 3);
    size_t step = k * k; /* 0, 1, 4, ..., 961 */
    data++;
    size--;

    struct event_base *base = event_base_new();
    check(base != NULL, "event_base_new failed");
    struct http_handler h = {.on_request = on_request, .on_abort = on_abort, .arg = &r};
    char err[256];
    struct http_server *s = http_server_create(base, &fuzz_limits, &h, NULL, err, sizeof err);
    check(s != NULL, err);
    struct sockaddr_un sa;
    socklen_t sl;
    int lfd = listen_unix(&sa, &sl);
    check(http_server_add_listener(s, lfd, err, sizeof err) == 0, err);
    int cfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    check(cfd >= 0 && connect(cfd, (struct sockaddr *)&sa, sl) == 0, "connect failed");
    run_until_idle(base, s, &r, cfd);

    /* The bytes, in writes of step bytes, the loop idle between them and
     * deferred requests answered once it is. */
    size_t at = 0;
    int closed = 0;
    while (at < size && !closed) {
        size_t n = step && step < size - at ? step : size - at;
        ssize_t w = send(cfd, data + at, n, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w > 0)
            at += (size_t)w;
        else if (w < 0 && errno != EAGAIN && errno != EINTR)
            closed = 1; /* the server closed the connection */
        run_until_idle(base, s, &r, cfd);
        if (answer_pending(&r))
            run_until_idle(base, s, &r, cfd);
    }

    /* The client is done sending: every request still parked must be
     * answerable, and then the server must let the connection go. */
    shutdown(cfd, SHUT_WR);
    do
        run_until_idle(base, s, &r, cfd);
    while (answer_pending(&r));

    struct http_stats st;
    http_server_get_stats(s, &st);
    check(st.requests == r.handed, "requests counted and handed over differ");
    check(st.requests_aborted == r.aborted, "aborts counted and reported differ");
    check(st.requests_in_flight == 0, "a request still in flight after the client left");
    check(st.connections_open == 0, "a connection still open after the client left");
    if (r.received)
        check(memcmp(r.head, "HTTP/1.1 ", r.received < 9 ? (size_t)r.received : 9) == 0,
              "the server wrote something other than an HTTP/1.1 response");

    http_server_destroy(s);
    check(r.n_pending == 0, "a deferred request outlived the server");
    close(cfd);
    event_base_free(base);
    return 0;
}
