/* http.c: HTTP/1.1 connections over libevent bufferevents, parsed by llhttp
 * (see http.h for the contract).
 *
 * Owns the listeners, every connection and every request. Runs on the
 * event loop thread only. A connection moves IDLE -> HEADERS -> BODY ->
 * HANDLER (the handler owns the request) -> IDLE again (keep-alive) or
 * CLOSING -> LINGER -> dead; dead connections are freed by one reaper
 * event per loop iteration, never inside their own callbacks.
 */
#include "server/http.h"

#include "server/log.h"

#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <event2/util.h>
#include <llhttp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

/* ------------------------------------------------------------ helpers */

/* Out of memory is fatal, reported with the place that asked. */
#define http_xalloc(p) http_oom_check((p), __FILE__, __LINE__)

static void *http_oom_check(void *p, const char *file, int line)
{
    if (!p) {
        log_error("out of memory at %s:%d", file, line);
        abort();
    }
    return p;
}

/* A growable byte string, always NUL-terminated once non-empty. */
struct hbuf {
    char *p;
    size_t len, cap;
};

static void hbuf_add(struct hbuf *b, const void *data, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n + 1)
            cap *= 2;
        b->p = http_xalloc(realloc(b->p, cap));
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static struct timeval tv_of(double s)
{
    struct timeval tv;
    if (s < 0)
        s = 0;
    tv.tv_sec = (time_t)s;
    tv.tv_usec = (suseconds_t)((s - (double)tv.tv_sec) * 1e6);
    return tv;
}

/* ------------------------------------------------------------ types */

enum conn_state {
    C_IDLE,    /* between requests (or before the first) */
    C_HEADERS, /* a request's head is being parsed */
    C_BODY,    /* its body is being parsed */
    C_HANDLER, /* handed to the handler; input is kept but not parsed */
    C_CLOSING, /* the last response is flushing; then close */
    C_LINGER,  /* write side shut; discarding input until EOF or a timer */
};

/* What the read timer of a connection measures. */
enum rtimer_kind { RT_NONE, RT_HEADER, RT_BODY, RT_IDLE, RT_LINGER };

enum req_state {
    R_PARSING,   /* owned by the connection */
    R_HANDED,    /* owned by the handler */
    R_STREAMING, /* owned by the handler, stream begun */
    R_DONE,      /* finished by the handler */
    R_ABORTED,   /* on_abort called */
};

/* Why llhttp_execute returned HPE_PAUSED. */
enum pause_kind { PK_NONE, PK_HEADERS, PK_MESSAGE };

/* A header: offsets into req->hb (which realloc may move). */
struct hdr {
    size_t name, val, val_len;
};

struct conn;

struct http_req {
    struct conn *c;
    enum req_state state;
    struct hbuf url, hb, body;
    struct hdr *hdrs;
    int n_hdrs, cap_hdrs;
    char *path, *query; /* one allocation: "path\0query\0" */
    const char *method; /* llhttp's static name */
    char id[129];
    double start;
    void *data;
    int minor;
    int is_head;
    int keep_alive;
    int chunked_out; /* the streaming response uses chunked coding */
};

struct conn {
    struct http_server *s;
    struct conn *prev, *next;
    struct bufferevent *bev;
    llhttp_t parser;
    enum conn_state st;
    struct http_req *req;
    struct event *rtimer, *wtimer, *resume_ev;
    enum rtimer_kind rt_kind;
    struct evbuffer_cb_entry *out_cb;
    char peer[64];
    /* Limits of the request being parsed. */
    size_t line_bytes, hdr_bytes, raw_hdr, ext_bytes, body_len;
    double body_t0; /* when the body began (the headers ended) */
    int n_fields;
    int hstate;     /* 0: no header open, 1: in its name, 2: in its value */
    int value_done; /* the open header's value ended: a value now has no name */
    size_t name_len; /* bytes of the open header's name so far */
    char prev_byte; /* last head byte scanned, for line-ending checks */
    enum pause_kind pause_kind;
    int user_status; /* set by a parser callback that refuses the request */
    char user_msg[160];
    size_t in_len; /* input length last seen, for bytes_in */
    int tls, handshake_done;
    int refusing;     /* over max_connections: a 503 and close */
    int linger;       /* in CLOSING: shut the write side and linger */
    int drain_wanted; /* on_drain is due when output falls below half */
    int read_stopped; /* unparsed input reached max_header_bytes */
    int clean;        /* closing normally: send TLS close_notify */
    int dead;
};

struct http_listener {
    struct http_server *s;
    struct evconnlistener *l;
    struct event *retry; /* re-enables accepting after EMFILE and the like */
    int port;
};

struct http_server {
    struct event_base *base;
    struct http_limits lim;
    struct http_handler h;
    SSL_CTX *tls;
    llhttp_settings_t settings;
    struct http_listener **listeners;
    int n_listeners;
    struct conn *conns; /* live */
    struct conn *dead;  /* waiting for the reaper */
    struct event *reaper;
    int n_refusing;
    int draining;
    struct http_stats st;
    time_t date_sec;
    char date[40];
    uint64_t rng[2]; /* xorshift128+, seeded once from getrandom */
};

/* At most this many connections at a time get the 503 over max_connections;
 * beyond it they are closed at once, so a flood costs no memory. */
#define HTTP_MAX_REFUSING 64
/* Bytes handed to llhttp per call; bounds evbuffer_pullup copies. */
#define HTTP_FEED_CHUNK 16384
/* Chunk extensions carry nothing we use; cap what a client may send. */
#define HTTP_MAX_CHUNK_EXT 4096
/* How long a closing connection reads and discards input, so that its
 * last response is not destroyed by a reset (lingering close). */
#define HTTP_LINGER_S 2.0

static void conn_feed(struct conn *c);
static void conn_kill(struct conn *c);
static void conn_send_error(struct conn *c, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ------------------------------------------------------------ limits, text */

void http_limits_resolve(struct http_limits *l)
{
    if (!l->max_request_line)
        l->max_request_line = 8 * 1024;
    if (!l->max_header_bytes)
        l->max_header_bytes = 16 * 1024;
    if (!l->max_headers)
        l->max_headers = 100;
    if (!l->max_body_bytes)
        l->max_body_bytes = 8 * 1024 * 1024;
    if (l->header_timeout_s <= 0)
        l->header_timeout_s = 10;
    if (l->body_timeout_s <= 0)
        l->body_timeout_s = 10;
    if (l->min_body_rate == 0)
        l->min_body_rate = 1024;
    if (l->idle_timeout_s <= 0)
        l->idle_timeout_s = 75;
    if (l->send_timeout_s <= 0)
        l->send_timeout_s = 60;
    if (l->max_connections <= 0)
        l->max_connections = 4096;
    if (!l->max_output_bytes)
        l->max_output_bytes = 1024 * 1024;
}

const char *http_status_text(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 101:
        return "Switching Protocols";
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 204:
        return "No Content";
    case 206:
        return "Partial Content";
    case 301:
        return "Moved Permanently";
    case 302:
        return "Found";
    case 304:
        return "Not Modified";
    case 307:
        return "Temporary Redirect";
    case 308:
        return "Permanent Redirect";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 406:
        return "Not Acceptable";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 411:
        return "Length Required";
    case 413:
        return "Content Too Large";
    case 414:
        return "URI Too Long";
    case 415:
        return "Unsupported Media Type";
    case 417:
        return "Expectation Failed";
    case 422:
        return "Unprocessable Content";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 499:
        return "Client Closed Request";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return "Unknown";
    }
}

/* The Date header's value, formatted once per second and without the
 * locale (strftime's %a would follow LC_TIME). */
static const char *server_date(struct http_server *s)
{
    static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    time_t now = time(NULL);
    if (now != s->date_sec || !s->date[0]) {
        struct tm tm;
        gmtime_r(&now, &tm);
        snprintf(s->date, sizeof s->date, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[tm.tm_wday],
                 tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min,
                 tm.tm_sec);
        s->date_sec = now;
    }
    return s->date;
}

static uint64_t rng_next(struct http_server *s)
{
    uint64_t a = s->rng[0], b = s->rng[1];
    s->rng[0] = b;
    a ^= a << 23;
    s->rng[1] = a ^ b ^ (a >> 17) ^ (b >> 26);
    return s->rng[1] + b;
}

static void random_id(struct http_server *s, char out[33])
{
    uint64_t a = rng_next(s), b = rng_next(s);
    snprintf(out, 33, "%016llx%016llx", (unsigned long long)a, (unsigned long long)b);
}

/* A client's X-Request-Id is echoed only when it is safe to put in logs
 * and headers as is. */
static int valid_request_id(const char *v)
{
    size_t n = strlen(v);
    if (n < 1 || n > 128)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = v[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '.' || ch == '_' || ch == ':' || ch == '-'))
            return 0;
    }
    return 1;
}

static void format_peer(const struct sockaddr *sa, char *out, size_t n)
{
    char host[INET6_ADDRSTRLEN] = "?";
    if (sa && sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        snprintf(out, n, "%s:%u", host, ntohs(in->sin_port));
    } else if (sa && sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        snprintf(out, n, "[%s]:%u", host, ntohs(in6->sin6_port));
    } else if (sa && sa->sa_family == AF_UNIX) {
        snprintf(out, n, "unix");
    } else {
        snprintf(out, n, "unknown");
    }
}

/* ------------------------------------------------------------ requests */

static struct http_req *req_new(struct conn *c)
{
    struct http_req *r = http_xalloc(calloc(1, sizeof *r));
    r->c = c;
    r->state = R_PARSING;
    r->start = mono_now();
    r->method = "GET";
    return r;
}

static void req_free(struct http_req *r)
{
    if (!r)
        return;
    free(r->url.p);
    free(r->hb.p);
    free(r->body.p);
    free(r->hdrs);
    free(r->path);
    free(r);
}

const char *http_req_method(const struct http_req *req)
{
    return req->method;
}
const char *http_req_path(const struct http_req *req)
{
    return req->path ? req->path : "/";
}
const char *http_req_query(const struct http_req *req)
{
    return req->query ? req->query : "";
}
const char *http_req_id(const struct http_req *req)
{
    return req->id;
}
const char *http_req_peer(const struct http_req *req)
{
    return req->c->peer;
}
double http_req_start_time(const struct http_req *req)
{
    return req->start;
}
int http_req_is_tls(const struct http_req *req)
{
    return req->c->tls;
}
void http_req_set_data(struct http_req *req, void *data)
{
    req->data = data;
}
void *http_req_get_data(const struct http_req *req)
{
    return req->data;
}

const char *http_req_header(const struct http_req *req, const char *name)
{
    for (int i = 0; i < req->n_hdrs; i++)
        if (strcasecmp(req->hb.p + req->hdrs[i].name, name) == 0)
            return req->hb.p + req->hdrs[i].val;
    return NULL;
}

const char *http_req_body(const struct http_req *req, size_t *len)
{
    *len = req->body.len;
    return req->body.p ? req->body.p : "";
}

size_t http_req_pending_output(const struct http_req *req)
{
    return evbuffer_get_length(bufferevent_get_output(req->c->bev));
}

/* ------------------------------------------------------------ timers */

static void rtimer_set(struct conn *c, enum rtimer_kind kind, double seconds)
{
    c->rt_kind = kind;
    if (kind == RT_NONE) {
        event_del(c->rtimer);
        return;
    }
    struct timeval tv = tv_of(seconds);
    event_add(c->rtimer, &tv);
}

/* ------------------------------------------------------------ llhttp callbacks */

/* Refuses the request from inside a parser callback: the status and the
 * message are acted on once llhttp_execute returns. */
static int parse_refuse(struct conn *c, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int parse_refuse(struct conn *c, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->user_msg, sizeof c->user_msg, fmt, ap);
    va_end(ap);
    c->user_status = status;
    llhttp_set_error_reason(&c->parser, "refused by the server");
    return HPE_USER;
}

static int check_header_bytes(struct conn *c)
{
    const struct http_limits *l = &c->s->lim;
    if (c->line_bytes + c->hdr_bytes > l->max_header_bytes)
        return parse_refuse(c, 431, "request headers exceed %zu bytes", l->max_header_bytes);
    return 0;
}

static int on_message_begin(llhttp_t *p)
{
    struct conn *c = p->data;
    assert(!c->req);
    c->req = req_new(c);
    c->line_bytes = c->hdr_bytes = c->raw_hdr = c->ext_bytes = c->body_len = 0;
    c->n_fields = 0;
    c->hstate = 0;
    c->st = C_HEADERS;
    /* The header timeout runs from the first byte of a keep-alive
     * connection's next request (from connect for the first one). */
    if (c->rt_kind == RT_IDLE)
        rtimer_set(c, RT_HEADER, c->s->lim.header_timeout_s);
    return 0;
}

static int count_line(struct conn *c, size_t len)
{
    const struct http_limits *l = &c->s->lim;
    c->line_bytes += len;
    /* +4: the two spaces and CRLF around method, target and version */
    if (c->line_bytes + 4 > l->max_request_line)
        return parse_refuse(c, 414, "request line exceeds %zu bytes", l->max_request_line);
    return check_header_bytes(c);
}

static int on_method(llhttp_t *p, const char *at, size_t len)
{
    (void)at;
    return count_line(p->data, len);
}

static int on_version(llhttp_t *p, const char *at, size_t len)
{
    (void)at;
    return count_line(p->data, len);
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    int rc = count_line(c, len);
    if (rc)
        return rc;
    hbuf_add(&c->req->url, at, len);
    return 0;
}

/* Closes the header being collected: NUL-terminates its name and value
 * (trailing whitespace of the value removed; llhttp skips the leading). */
static void header_finish(struct conn *c)
{
    struct http_req *r = c->req;
    if (c->hstate == 0 || c->st == C_BODY) {
        c->hstate = 0;
        return;
    }
    struct hdr *h = &r->hdrs[r->n_hdrs - 1];
    if (c->hstate == 1) { /* a name with an empty value */
        hbuf_add(&r->hb, "", 1);
        h->val = r->hb.len;
    }
    size_t end = r->hb.len;
    while (end > h->val && (r->hb.p[end - 1] == ' ' || r->hb.p[end - 1] == '\t'))
        end--;
    r->hb.len = end;
    h->val_len = end - h->val;
    hbuf_add(&r->hb, "", 1);
    c->hstate = 0;
}

/* RFC 9110 tchar. llhttp's loose mode lets a space into a name ("Bad
 * Name", "Name :"), which proxies read differently: refuse it here. */
static int is_tchar(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           (ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL);
}

/* Counts len more bytes of a header name or value against the limit and
 * keeps them (trailers are counted, not kept). */
static int header_bytes(struct conn *c, const char *at, size_t len)
{
    c->hdr_bytes += len;
    int rc = check_header_bytes(c);
    if (rc)
        return rc;
    if (c->st != C_BODY)
        hbuf_add(&c->req->hb, at, len);
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    struct http_req *r = c->req;
    const struct http_limits *l = &c->s->lim;
    for (size_t i = 0; i < len; i++)
        if (!is_tchar((unsigned char)at[i]))
            return parse_refuse(c, 400, "malformed request: invalid character in a header name");
    c->value_done = 0;
    if (c->hstate != 1) {
        c->name_len = 0;
        header_finish(c);
        if (++c->n_fields > l->max_headers)
            return parse_refuse(c, 431, "more than %d request header fields", l->max_headers);
        c->hdr_bytes += 4; /* ": " and CRLF */
        /* Trailers of a chunked body are counted, not kept. */
        if (c->st != C_BODY) {
            if (r->n_hdrs == r->cap_hdrs) {
                r->cap_hdrs = r->cap_hdrs ? 2 * r->cap_hdrs : 16;
                r->hdrs = http_xalloc(realloc(r->hdrs, (size_t)r->cap_hdrs * sizeof *r->hdrs));
            }
            r->hdrs[r->n_hdrs++] = (struct hdr){.name = r->hb.len};
        }
        c->hstate = 1;
    }
    c->name_len += len;
    return header_bytes(c, at, len);
}

static int on_header_field_complete(llhttp_t *p)
{
    struct conn *c = p->data;
    if (c->name_len == 0)
        return parse_refuse(c, 400, "malformed request: a header line with an empty name");
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    struct http_req *r = c->req;
    /* ": v" (an empty name) reaches here with no name before it; proxies
     * that drop such a line see different headers (CVE-2023-25725) */
    if (c->hstate == 0 || c->value_done)
        return parse_refuse(c, 400, "malformed request: a header line with an empty name");
    if (c->hstate == 1) {
        if (c->st != C_BODY) {
            hbuf_add(&r->hb, "", 1); /* ends the name */
            r->hdrs[r->n_hdrs - 1].val = r->hb.len;
        }
        c->hstate = 2;
    }
    return header_bytes(c, at, len);
}

static int on_header_value_complete(llhttp_t *p)
{
    struct conn *c = p->data;
    c->value_done = 1;
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    struct conn *c = p->data;
    header_finish(c);
    /* Pausing here lets conn_feed know exactly where the head ends, and
     * check the limits and Expect before any body byte is read. */
    c->pause_kind = PK_HEADERS;
    return HPE_PAUSED;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    const struct http_limits *l = &c->s->lim;
    c->body_len += len;
    if (c->body_len > l->max_body_bytes)
        return parse_refuse(c, 413, "request body exceeds %zu bytes (--max-body-bytes)",
                            l->max_body_bytes);
    hbuf_add(&c->req->body, at, len);
    return 0;
}

static int on_chunk_ext(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    (void)at;
    c->ext_bytes += len;
    if (c->ext_bytes > HTTP_MAX_CHUNK_EXT)
        return parse_refuse(c, 400, "malformed request: chunk extensions exceed %d bytes",
                            HTTP_MAX_CHUNK_EXT);
    return 0;
}

static int on_trailer_or_chunk_header(llhttp_t *p)
{
    (void)p;
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    struct conn *c = p->data;
    header_finish(c);
    /* After an Upgrade the bytes that follow are another protocol, which
     * we do not speak: answer this request, then close. */
    if (llhttp_get_upgrade(p))
        c->req->keep_alive = 0;
    /* Pipelined requests wait until this one is answered. */
    c->pause_kind = PK_MESSAGE;
    return HPE_PAUSED;
}

/* ------------------------------------------------------------ responses */

static int status_has_body(int status)
{
    return !(status / 100 == 1 || status == 204 || status == 304);
}

enum body_mode { BODY_LENGTH, BODY_CHUNKED, BODY_UNTIL_CLOSE };

/* Queues a status line and the headers on c's output. */
static void write_head(struct conn *c, const char *id, int status, const char *ctype,
                       const char *extra, enum body_mode mode, size_t len, int close)
{
    struct http_server *s = c->s;
    struct evbuffer *out = bufferevent_get_output(c->bev);
    char head[1024];
    int n = snprintf(head, sizeof head, "HTTP/1.1 %d %s\r\nDate: %s\r\nServer: inferd\r\n", status,
                     http_status_text(status), server_date(s));
    evbuffer_add(out, head, (size_t)n);
    if (ctype)
        evbuffer_add_printf(out, "Content-Type: %s\r\n", ctype);
    if (mode == BODY_LENGTH && status_has_body(status))
        evbuffer_add_printf(out, "Content-Length: %zu\r\n", len);
    else if (mode == BODY_CHUNKED)
        evbuffer_add_printf(out, "Transfer-Encoding: chunked\r\n");
    evbuffer_add_printf(out, "X-Request-Id: %s\r\nConnection: %s\r\n", id,
                        close ? "close" : "keep-alive");
    if (extra)
        evbuffer_add(out, extra, strlen(extra));
    evbuffer_add(out, "\r\n", 2);
    if (status >= 100 && status < 600)
        s->st.responses_by_class[status / 100]++;
}

/* Whether the connection closes after req's response. */
static int req_must_close(const struct http_req *req)
{
    return !req->keep_alive || req->c->s->draining;
}

/* The output has been flushed: close now, or first shut the write side
 * and discard input for a while, so the kernel does not answer unread
 * input with a reset that destroys the response at the client. */
static void conn_flushed_close(struct conn *c)
{
    if (c->linger && !c->tls) {
        c->st = C_LINGER;
        shutdown(bufferevent_getfd(c->bev), SHUT_WR);
        if (c->read_stopped) {
            c->read_stopped = 0;
        }
        bufferevent_enable(c->bev, EV_READ);
        rtimer_set(c, RT_LINGER, HTTP_LINGER_S);
        return;
    }
    conn_kill(c);
}

/* Ends the connection once what is queued is written (bounded by the
 * send timeout). */
static void conn_close_after_write(struct conn *c, int linger)
{
    if (c->dead)
        return;
    c->st = C_CLOSING;
    c->linger = linger;
    c->clean = 1;
    rtimer_set(c, RT_NONE, 0);
    if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
        conn_flushed_close(c);
}

/* The handler finished req (it responded in full): keep the connection
 * for the next request, or close it. */
static void req_finish(struct http_req *req)
{
    struct conn *c = req->c;
    struct http_server *s = c->s;
    int close = req_must_close(req);
    req->state = R_DONE;
    s->st.requests_in_flight--;
    c->req = NULL;
    req_free(req);
    if (close) {
        conn_close_after_write(c, 1);
        return;
    }
    c->st = C_IDLE;
    c->drain_wanted = 0;
    c->prev_byte = '\n';
    llhttp_resume(&c->parser);
    if (c->read_stopped) {
        c->read_stopped = 0;
        bufferevent_enable(c->bev, EV_READ);
    }
    if (evbuffer_get_length(bufferevent_get_input(c->bev)))
        rtimer_set(c, RT_HEADER, s->lim.header_timeout_s);
    else
        rtimer_set(c, RT_IDLE, s->lim.idle_timeout_s);
    /* Parse what is pipelined from the loop, not from inside the
     * handler's call. */
    event_active(c->resume_ev, EV_TIMEOUT, 1);
}

void http_respond(struct http_req *req, int status, const char *content_type,
                  const char *extra_headers, const char *body, size_t len)
{
    if (req->state == R_ABORTED)
        return;
    assert(req->state == R_HANDED);
    struct conn *c = req->c;
    write_head(c, req->id, status, content_type, extra_headers, BODY_LENGTH, len,
               req_must_close(req));
    if (!req->is_head && status_has_body(status) && len)
        evbuffer_add(bufferevent_get_output(c->bev), body, len);
    req_finish(req);
}

void http_stream_begin(struct http_req *req, int status, const char *content_type,
                       const char *extra_headers)
{
    if (req->state == R_ABORTED)
        return;
    assert(req->state == R_HANDED);
    /* HTTP/1.0 has no chunked coding: the end of the body is the close. */
    req->chunked_out = req->minor >= 1;
    if (!req->chunked_out)
        req->keep_alive = 0;
    write_head(req->c, req->id, status, content_type, extra_headers,
               req->chunked_out ? BODY_CHUNKED : BODY_UNTIL_CLOSE, 0, req_must_close(req));
    req->state = R_STREAMING;
}

int http_stream_write(struct http_req *req, const char *data, size_t len)
{
    if (req->state == R_ABORTED)
        return -1;
    assert(req->state == R_STREAMING);
    struct conn *c = req->c;
    const struct http_limits *l = &c->s->lim;
    struct evbuffer *out = bufferevent_get_output(c->bev);
    /* A zero-length chunk would end the body. */
    if (len == 0 || req->is_head)
        return 0;
    size_t pending = evbuffer_get_length(out);
    size_t framing = req->chunked_out ? 20 : 0;
    if (pending + len + framing > l->max_output_bytes) {
        c->drain_wanted = 1;
        return -1;
    }
    if (req->chunked_out) {
        evbuffer_add_printf(out, "%zx\r\n", len);
        evbuffer_add(out, data, len);
        evbuffer_add(out, "\r\n", 2);
    } else {
        evbuffer_add(out, data, len);
    }
    if (evbuffer_get_length(out) > l->max_output_bytes / 2)
        c->drain_wanted = 1;
    return 0;
}

void http_stream_end(struct http_req *req)
{
    if (req->state == R_ABORTED)
        return;
    assert(req->state == R_STREAMING);
    if (req->chunked_out && !req->is_head)
        evbuffer_add(bufferevent_get_output(req->c->bev), "0\r\n\r\n", 5);
    req_finish(req);
}

void http_abort(struct http_req *req)
{
    if (req->state == R_ABORTED)
        return;
    assert(req->state == R_HANDED || req->state == R_STREAMING);
    struct conn *c = req->c;
    req->state = R_DONE;
    c->s->st.requests_in_flight--;
    c->req = NULL;
    req_free(req);
    bufferevent_disable(c->bev, EV_READ);
    conn_close_after_write(c, 0);
}

/* Writes the error in OpenAI's shape, logs it, and closes after it. */
static void conn_send_error(struct conn *c, int status, const char *fmt, ...)
{
    struct http_server *s = c->s;
    char msg[200], body[400], id[33];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* Messages are ours (never client bytes), but keep the JSON valid. */
    for (char *p = msg; *p; p++)
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20)
            *p = '\'';
    const char *type = status >= 500 ? "server_error" : "invalid_request_error";
    const char *code = status == 503 ? "\"server_overloaded\"" : "null";
    int n = snprintf(body, sizeof body,
                     "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"param\":null,\"code\":%s}}",
                     msg, type, code);
    log_warn("http: %s: %d %s", c->peer, status, msg);
    switch (status) {
    case 400:
    case 417:
    case 505:
        s->st.rejected_malformed++;
        break;
    case 413:
    case 414:
    case 431:
        s->st.rejected_too_large++;
        break;
    case 408:
        s->st.timeouts++;
        break;
    default:
        break;
    }
    random_id(s, id);
    write_head(c, id, status, "application/json", status == 503 ? "Retry-After: 1\r\n" : NULL,
               BODY_LENGTH, (size_t)n, 1);
    evbuffer_add(bufferevent_get_output(c->bev), body, (size_t)n);
    if (c->req && c->req->state == R_PARSING) {
        req_free(c->req);
        c->req = NULL;
    }
    conn_close_after_write(c, 1);
}

/* ------------------------------------------------------------ parsing */

/* The head is complete: version, limits, Expect. Returns 0 to go on
 * parsing, -1 when the request was refused. */
static int conn_headers_done(struct conn *c)
{
    struct http_server *s = c->s;
    const struct http_limits *l = &s->lim;
    struct http_req *r = c->req;
    llhttp_t *p = &c->parser;
    int major = llhttp_get_http_major(p);
    r->minor = llhttp_get_http_minor(p);
    r->method = llhttp_method_name((llhttp_method_t)llhttp_get_method(p));
    r->is_head = llhttp_get_method(p) == HTTP_HEAD;
    if (major != 1) {
        conn_send_error(c, 505, "HTTP/%d.%d is not supported; use HTTP/1.1", major, r->minor);
        return -1;
    }
    if (c->raw_hdr > l->max_header_bytes) {
        conn_send_error(c, 431, "request headers exceed %zu bytes", l->max_header_bytes);
        return -1;
    }
    if (llhttp_get_method(p) == HTTP_CONNECT) {
        conn_send_error(c, 400, "malformed request: CONNECT is not supported");
        return -1;
    }
    /* HTTP/1.0 has no transfer codings; a proxy might frame it otherwise */
    if (r->minor == 0 && (p->flags & F_TRANSFER_ENCODING)) {
        conn_send_error(c, 400, "malformed request: Transfer-Encoding in an HTTP/1.0 request");
        return -1;
    }
    int chunked = (p->flags & F_CHUNKED) != 0;
    uint64_t cl = (p->flags & F_CONTENT_LENGTH) ? p->content_length : 0;
    if (cl > l->max_body_bytes) {
        conn_send_error(c, 413, "request body exceeds %zu bytes (--max-body-bytes)",
                        l->max_body_bytes);
        return -1;
    }
    const char *expect = http_req_header(r, "expect");
    if (expect) {
        if (strcasecmp(expect, "100-continue") != 0) {
            conn_send_error(c, 417, "unsupported Expect header; only 100-continue is");
            return -1;
        }
        if (r->minor >= 1 && (chunked || cl > 0)) {
            evbuffer_add(bufferevent_get_output(c->bev), "HTTP/1.1 100 Continue\r\n\r\n", 25);
            s->st.responses_by_class[1]++;
        }
    }
    r->keep_alive = llhttp_should_keep_alive(p);
    if (chunked || cl > 0) {
        c->st = C_BODY;
        c->body_t0 = mono_now();
        rtimer_set(c, RT_BODY, l->body_timeout_s);
    }
    return 0;
}

/* Hands the complete request to the handler. */
static void conn_dispatch(struct conn *c)
{
    struct http_server *s = c->s;
    struct http_req *r = c->req;
    const char *url = r->url.p ? r->url.p : "/";
    size_t ulen = strlen(url);
    r->path = http_xalloc(malloc(ulen + 2));
    size_t q = strcspn(url, "?#");
    memcpy(r->path, url, q);
    r->path[q] = '\0';
    r->query = r->path + q + 1;
    if (url[q] == '?') {
        size_t qlen = strcspn(url + q + 1, "#");
        memcpy(r->query, url + q + 1, qlen);
        r->query[qlen] = '\0';
    } else {
        r->query[0] = '\0';
    }
    const char *cid = http_req_header(r, "x-request-id");
    if (cid && valid_request_id(cid))
        snprintf(r->id, sizeof r->id, "%s", cid);
    else
        random_id(s, r->id);
    if (!r->body.p)
        hbuf_add(&r->body, "", 0);
    c->st = C_HANDLER;
    rtimer_set(c, RT_NONE, 0);
    if (evbuffer_get_length(bufferevent_get_input(c->bev)) > s->lim.max_header_bytes) {
        c->read_stopped = 1;
        bufferevent_disable(c->bev, EV_READ);
    }
    r->state = R_HANDED;
    s->st.requests++;
    s->st.requests_in_flight++;
    s->h.on_request(r, s->h.arg);
}

/* Maps an llhttp error to our answer. */
static void conn_parse_error(struct conn *c, llhttp_errno_t e)
{
    /* our callbacks refused it (HPE_USER, or the *_complete callbacks'
     * own codes): our status and reason */
    if (c->user_status) {
        conn_send_error(c, c->user_status, "%s", c->user_msg);
        return;
    }
    if (e == HPE_INVALID_VERSION || e == HPE_PAUSED_H2_UPGRADE) {
        conn_send_error(c, 505, "HTTP version not supported; use HTTP/1.1");
        return;
    }
    const char *reason = llhttp_get_error_reason(&c->parser);
    conn_send_error(c, 400, "malformed request: %s", reason ? reason : llhttp_errno_name(e));
}

/* llhttp's loose mode accepts a bare LF as a line end and obsolete line
 * folding, both smuggling vectors when a proxy reads them differently.
 * The build defines LLHTTP_STRICT_MODE, and these checks on the head's raw
 * bytes keep the refusal (and its message) whatever mode llhttp is in. The body's framing llhttp checks itself. Returns
 * the reason, or NULL. */
static const char *head_scan(struct conn *c, const char *d, size_t n)
{
    char prev = c->prev_byte;
    const char *why = NULL;
    for (size_t i = 0; i < n && !why; i++) {
        char ch = d[i];
        if (ch == '\n' && prev != '\r')
            why = "malformed request: bare LF line ending";
        else if ((ch == ' ' || ch == '\t') && prev == '\n')
            why = "malformed request: obsolete line folding";
        prev = ch;
    }
    c->prev_byte = prev;
    return why;
}

/* Parses buffered input until a request is handed over, more input is
 * needed, or the connection is refused. */
static void conn_feed(struct conn *c)
{
    struct http_server *s = c->s;
    struct evbuffer *in = bufferevent_get_input(c->bev);
    /* After the pause at the end of the head, llhttp must run once more
     * even with no input: a request without a body completes there. */
    int run_empty = 0;
    while (!c->dead && (c->st == C_IDLE || c->st == C_HEADERS || c->st == C_BODY)) {
        size_t avail = evbuffer_get_length(in);
        if (avail == 0 && !run_empty)
            break;
        run_empty = 0;
        size_t n = avail < HTTP_FEED_CHUNK ? avail : HTTP_FEED_CHUNK;
        const char *data = n ? (const char *)evbuffer_pullup(in, (ev_ssize_t)n) : "";
        int head_phase = c->st != C_BODY;
        c->pause_kind = PK_NONE;
        c->user_status = 0;
        llhttp_errno_t e = llhttp_execute(&c->parser, data, n);
        size_t used = n;
        if (e != HPE_OK) {
            const char *pos = llhttp_get_error_pos(&c->parser);
            used = (pos && pos >= data && pos <= data + n) ? (size_t)(pos - data) : n;
        }
        const char *bad = head_phase ? head_scan(c, data, used) : NULL;
        if (head_phase)
            c->raw_hdr += used;
        evbuffer_drain(in, used);
        c->in_len = evbuffer_get_length(in);
        if (bad) {
            conn_send_error(c, 400, "%s", bad);
            return;
        }
        if (e == HPE_OK) {
            /* Whitespace llhttp skips reaches no callback: count raw bytes. */
            if (c->st == C_HEADERS && c->raw_hdr > s->lim.max_header_bytes) {
                conn_send_error(c, 431, "request headers exceed %zu bytes",
                                s->lim.max_header_bytes);
                return;
            }
            continue;
        }
        if (e == HPE_PAUSED && c->pause_kind == PK_HEADERS) {
            if (conn_headers_done(c) < 0)
                return;
            llhttp_resume(&c->parser);
            run_empty = 1;
            continue;
        }
        if (e == HPE_PAUSED && c->pause_kind == PK_MESSAGE) {
            conn_dispatch(c);
            return;
        }
        conn_parse_error(c, e);
        return;
    }
}

static void resume_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;
    (void)fd;
    (void)what;
    if (!c->dead && c->st == C_IDLE)
        conn_feed(c);
}

/* ------------------------------------------------------------ connection events */

static void read_cb(struct bufferevent *bev, void *arg)
{
    struct conn *c = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    size_t len = evbuffer_get_length(in);
    if (c->dead)
        return;
    if (len > c->in_len)
        c->s->st.bytes_in += len - c->in_len;
    c->in_len = len;
    switch (c->st) {
    case C_CLOSING:
    case C_LINGER:
        evbuffer_drain(in, len);
        c->in_len = 0;
        return;
    case C_HANDLER:
        /* Kept for pipelining, up to a bound; then the socket waits. */
        if (len > c->s->lim.max_header_bytes) {
            c->read_stopped = 1;
            bufferevent_disable(bev, EV_READ);
        }
        return;
    case C_BODY: {
        /* every read restarts the stall timer, so a slow drip also has
         * to keep an average rate once past the first timeout */
        const struct http_limits *l = &c->s->lim;
        double took = mono_now() - c->body_t0;
        double got = (double)(c->body_len + len);
        if (l->min_body_rate > 0 && took > l->body_timeout_s &&
            got < l->min_body_rate * took) {
            conn_send_error(c, 408, "request body arriving at %.0f bytes/s, below the "
                            "minimum of %.0f (--min-body-rate)", got / took, l->min_body_rate);
            return;
        }
        rtimer_set(c, RT_BODY, l->body_timeout_s);
        break;
    }
    default:
        break;
    }
    conn_feed(c);
}

static void write_cb(struct bufferevent *bev, void *arg)
{
    struct conn *c = arg;
    struct evbuffer *out = bufferevent_get_output(bev);
    size_t len = evbuffer_get_length(out);
    if (c->dead)
        return;
    if (c->st == C_CLOSING) {
        if (len == 0)
            conn_flushed_close(c);
        return;
    }
    struct http_req *r = c->req;
    if (r && r->state == R_STREAMING && c->drain_wanted && len <= c->s->lim.max_output_bytes / 2) {
        c->drain_wanted = 0;
        if (c->s->h.on_drain)
            c->s->h.on_drain(r, c->s->h.arg);
    }
}

static void event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct conn *c = arg;
    if (c->dead)
        return;
    if (what & BEV_EVENT_CONNECTED) {
        c->handshake_done = 1;
        return;
    }
    char reason[160] = "";
    if (c->tls) {
        unsigned long e;
        /* libevent also queues SSL_get_error's small codes (no library
         * part); the first real OpenSSL error says more. */
        while ((e = bufferevent_get_openssl_error(bev)))
            if (!reason[0] && ERR_GET_LIB(e) != 0)
                ERR_error_string_n(e, reason, sizeof reason);
        ERR_clear_error();
    }
    if (what & BEV_EVENT_ERROR) {
        int err = EVUTIL_SOCKET_ERROR();
        if (c->tls && !c->handshake_done) {
            log_info("http: %s: TLS handshake failed: %s", c->peer,
                     reason[0] ? reason : "connection closed");
        } else if (c->req && (c->req->state == R_HANDED || c->req->state == R_STREAMING)) {
            log_info("http: %s: connection error during request %s: %s", c->peer, c->req->id,
                     reason[0] ? reason : evutil_socket_error_to_string(err));
        }
        conn_kill(c);
        return;
    }
    if (what & BEV_EVENT_EOF) {
        if (c->st == C_CLOSING && evbuffer_get_length(bufferevent_get_output(bev)) > 0)
            return; /* half-closed: the client may still read; keep flushing */
        if (c->req && (c->req->state == R_HANDED || c->req->state == R_STREAMING))
            log_info("http: %s: client closed the connection during request %s", c->peer,
                     c->req->id);
        conn_kill(c);
    }
}

/* Progress of the output: bytes_out, and the send timeout, which runs
 * while output is pending and restarts whenever some of it is written. */
static void out_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
    struct conn *c = arg;
    (void)buf;
    if (c->dead)
        return;
    c->s->st.bytes_out += info->n_deleted;
    size_t now_len = info->orig_size + info->n_added - info->n_deleted;
    if (now_len == 0) {
        event_del(c->wtimer);
    } else if (info->n_deleted > 0 || !evtimer_pending(c->wtimer, NULL)) {
        struct timeval tv = tv_of(c->s->lim.send_timeout_s);
        event_add(c->wtimer, &tv);
    }
}

static void wtimer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;
    (void)fd;
    (void)what;
    if (c->dead)
        return;
    c->s->st.timeouts++;
    log_warn("http: %s: no write progress for %g s (--send-timeout); dropping the connection",
             c->peer, c->s->lim.send_timeout_s);
    conn_kill(c);
}

static void rtimer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;
    struct http_server *s = c->s;
    (void)fd;
    (void)what;
    if (c->dead)
        return;
    switch (c->rt_kind) {
    case RT_HEADER:
        if (c->tls && !c->handshake_done) {
            s->st.timeouts++;
            log_warn("http: %s: TLS handshake not complete after %g s; closing", c->peer,
                     s->lim.header_timeout_s);
            conn_kill(c);
            return;
        }
        conn_send_error(c, 408, "request headers not received within %g s",
                        s->lim.header_timeout_s);
        return;
    case RT_BODY:
        conn_send_error(c, 408, "request body stalled for more than %g s", s->lim.body_timeout_s);
        return;
    case RT_IDLE:
        s->st.timeouts++;
        conn_kill(c);
        return;
    case RT_LINGER:
    case RT_NONE:
        conn_kill(c);
        return;
    }
}

/* ------------------------------------------------------------ connection lifetime */

static void list_remove(struct conn **head, struct conn *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        *head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
}

static void list_push(struct conn **head, struct conn *c)
{
    c->prev = NULL;
    c->next = *head;
    if (*head)
        (*head)->prev = c;
    *head = c;
}

/* Marks c dead (idempotent): an unfinished request gets on_abort now;
 * the memory goes at the next reaper run. */
static void conn_kill(struct conn *c)
{
    struct http_server *s = c->s;
    if (c->dead)
        return;
    c->dead = 1;
    bufferevent_disable(c->bev, EV_READ | EV_WRITE);
    event_del(c->rtimer);
    event_del(c->wtimer);
    event_del(c->resume_ev);
    list_remove(&s->conns, c);
    list_push(&s->dead, c);
    if (c->refusing)
        s->n_refusing--;
    else
        s->st.connections_open--;
    event_active(s->reaper, EV_TIMEOUT, 1);
    struct http_req *r = c->req;
    if (r && (r->state == R_HANDED || r->state == R_STREAMING)) {
        r->state = R_ABORTED;
        s->st.requests_aborted++;
        s->st.requests_in_flight--;
        s->h.on_abort(r, s->h.arg);
    }
}

static void conn_free(struct conn *c)
{
    if (c->out_cb)
        evbuffer_remove_cb_entry(bufferevent_get_output(c->bev), c->out_cb);
    if (c->tls) {
        SSL *ssl = bufferevent_openssl_get_ssl(c->bev);
        /* A clean close sends close_notify without waiting for the
         * peer's; after an error the socket may be gone, so no shutdown. */
        if (ssl && c->clean && c->handshake_done) {
            SSL_set_shutdown(ssl, SSL_RECEIVED_SHUTDOWN);
            SSL_shutdown(ssl);
        }
        ERR_clear_error();
    }
    /* CLOSE_ON_FREE: frees the SSL and closes the socket. */
    bufferevent_free(c->bev);
    event_free(c->rtimer);
    event_free(c->wtimer);
    event_free(c->resume_ev);
    req_free(c->req);
    free(c);
}

static void reaper_cb(evutil_socket_t fd, short what, void *arg)
{
    struct http_server *s = arg;
    (void)fd;
    (void)what;
    while (s->dead) {
        struct conn *c = s->dead;
        list_remove(&s->dead, c);
        conn_free(c);
    }
}

static void conn_new(struct http_server *s, evutil_socket_t fd, const struct sockaddr *sa,
                     int refusing)
{
    struct bufferevent *bev = NULL;
    int opts = BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS;
    char peer[64];
    format_peer(sa, peer, sizeof peer);
    if (s->tls) {
        SSL *ssl = SSL_new(s->tls);
        if (!ssl) {
            log_warn("http: %s: cannot create a TLS session; closing", peer);
            ERR_clear_error();
            evutil_closesocket(fd);
            return;
        }
        bev = bufferevent_openssl_socket_new(s->base, fd, ssl, BUFFEREVENT_SSL_ACCEPTING, opts);
        if (!bev) {
            SSL_free(ssl);
            evutil_closesocket(fd);
            log_warn("http: %s: cannot create a bufferevent; closing", peer);
            return;
        }
        /* Clients often close without close_notify; that is an EOF, not
         * an error to report. */
        bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
    } else {
        bev = bufferevent_socket_new(s->base, fd, opts);
        if (!bev) {
            evutil_closesocket(fd);
            log_warn("http: %s: cannot create a bufferevent; closing", peer);
            return;
        }
    }
    struct conn *c = http_xalloc(calloc(1, sizeof *c));
    c->s = s;
    c->bev = bev;
    c->tls = s->tls != NULL;
    c->refusing = refusing;
    c->prev_byte = '\n';
    memcpy(c->peer, peer, sizeof peer);
    c->rtimer = http_xalloc(evtimer_new(s->base, rtimer_cb, c));
    c->wtimer = http_xalloc(evtimer_new(s->base, wtimer_cb, c));
    c->resume_ev = http_xalloc(event_new(s->base, -1, 0, resume_cb, c));
    llhttp_init(&c->parser, HTTP_REQUEST, &s->settings);
    c->parser.data = c;
    /* Strict parsing: every leniency off (they are off by default; this
     * says so where a reader looks). */
    llhttp_set_lenient_headers(&c->parser, 0);
    llhttp_set_lenient_chunked_length(&c->parser, 0);
    llhttp_set_lenient_keep_alive(&c->parser, 0);
    llhttp_set_lenient_transfer_encoding(&c->parser, 0);
    bufferevent_setcb(bev, read_cb, write_cb, event_cb, c);
    /* The write callback fires once output is at most half the cap: the
     * point where on_drain is due, and (at 0) where a closing
     * connection may go. */
    bufferevent_setwatermark(bev, EV_WRITE, s->lim.max_output_bytes / 2, 0);
    c->out_cb = http_xalloc(evbuffer_add_cb(bufferevent_get_output(bev), out_cb, c));
    list_push(&s->conns, c);
    if (refusing) {
        s->n_refusing++;
        s->st.connections_refused++;
        bufferevent_enable(bev, EV_READ | EV_WRITE);
        conn_send_error(c, 503, "too many connections (%d); retry later", s->lim.max_connections);
        return;
    }
    s->st.connections_accepted++;
    s->st.connections_open++;
    c->st = C_IDLE;
    rtimer_set(c, RT_HEADER, s->lim.header_timeout_s);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
}

/* ------------------------------------------------------------ listeners */

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
                      int socklen, void *arg)
{
    struct http_listener *hl = arg;
    struct http_server *s = hl->s;
    (void)l;
    (void)socklen;
    int one = 1;
    /* Streamed tokens are small writes that must not wait for Nagle. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (s->st.connections_open >= s->lim.max_connections) {
        if (s->n_refusing >= HTTP_MAX_REFUSING) {
            char peer[64];
            format_peer(sa, peer, sizeof peer);
            s->st.connections_refused++;
            log_warn("http: %s: too many connections (%d); closed without a response", peer,
                     s->lim.max_connections);
            evutil_closesocket(fd);
            return;
        }
        conn_new(s, fd, sa, 1);
        return;
    }
    conn_new(s, fd, sa, 0);
}

static void accept_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    struct http_listener *hl = arg;
    (void)fd;
    (void)what;
    if (hl->l)
        evconnlistener_enable(hl->l);
}

static void accept_error_cb(struct evconnlistener *l, void *arg)
{
    struct http_listener *hl = arg;
    int err = EVUTIL_SOCKET_ERROR();
    /* Out of descriptors (EMFILE) and the like: retrying at once would
     * spin the loop, so pause accepting briefly. */
    log_warn("http: accept failed: %s; pausing accepts for 100 ms",
             evutil_socket_error_to_string(err));
    evconnlistener_disable(l);
    struct timeval tv = {0, 100 * 1000};
    event_add(hl->retry, &tv);
}

static void listener_free(struct http_listener *hl)
{
    if (!hl)
        return;
    if (hl->l)
        evconnlistener_free(hl->l); /* LEV_OPT_CLOSE_ON_FREE closes the fd */
    if (hl->retry)
        event_free(hl->retry);
    free(hl);
}

int http_listen_tcp(const char *host, int port, int backlog, char *err, size_t errlen)
{
    struct addrinfo hints, *res = NULL;
    char portstr[16];
    int fd = -1, saved = 0;
    if (port < 0 || port > 65535) {
        snprintf(err, errlen, "port %d out of range", port);
        return -1;
    }
    if (backlog <= 0)
        backlog = 1024;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    snprintf(portstr, sizeof portstr, "%d", port);
    const char *node = (host && host[0] && strcmp(host, "*") != 0) ? host : NULL;
    int rc = getaddrinfo(node, portstr, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot resolve %s: %s", node ? node : "*", gai_strerror(rc));
        return -1;
    }
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            saved = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, backlog) == 0)
            break;
        saved = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        snprintf(err, errlen, "cannot listen on %s:%d: %s", node ? node : "*", port,
                 strerror(saved ? saved : EADDRNOTAVAIL));
    return fd;
}

int http_server_add_listener(struct http_server *s, int fd, char *err, size_t errlen)
{
    struct http_listener *hl = NULL;
    int acc = 0;
    socklen_t alen = sizeof acc;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &alen) != 0 || !acc) {
        snprintf(err, errlen, "fd %d is not a listening socket", fd);
        goto fail;
    }
    if (s->draining) {
        snprintf(err, errlen, "the server is draining");
        goto fail;
    }
    evutil_make_socket_nonblocking(fd);
    evutil_make_socket_closeonexec(fd);
    hl = http_xalloc(calloc(1, sizeof *hl));
    hl->s = s;
    hl->port = -1;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET)
            hl->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6)
            hl->port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    hl->retry = evtimer_new(s->base, accept_retry_cb, hl);
    /* backlog 0: the socket is already listening */
    hl->l = evconnlistener_new(s->base, accept_cb, hl,
                               LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, 0, fd);
    if (!hl->retry || !hl->l) {
        snprintf(err, errlen, "cannot listen on fd %d: out of memory", fd);
        goto fail;
    }
    evconnlistener_set_error_cb(hl->l, accept_error_cb);
    s->listeners =
        http_xalloc(realloc(s->listeners, (size_t)(s->n_listeners + 1) * sizeof *s->listeners));
    s->listeners[s->n_listeners++] = hl;
    return 0;

fail:
    /* The server owns fd even when it cannot use it. */
    if (hl && hl->l)
        listener_free(hl);
    else {
        listener_free(hl);
        close(fd);
    }
    return -1;
}

int http_server_port(const struct http_server *s, int i)
{
    if (!s || i < 0 || i >= s->n_listeners)
        return -1;
    return s->listeners[i]->port;
}

/* ------------------------------------------------------------ server */

struct http_server *http_server_create(struct event_base *base, const struct http_limits *limits,
                                       const struct http_handler *handler, struct ssl_ctx_st *tls,
                                       char *err, size_t errlen)
{
    struct http_server *s = NULL;
    if (!base || !handler || !handler->on_request || !handler->on_abort) {
        snprintf(err, errlen,
                 "http_server_create: an event base and a handler with on_request "
                 "and on_abort are required");
        return NULL;
    }
    s = http_xalloc(calloc(1, sizeof *s));
    s->base = base;
    if (limits)
        s->lim = *limits;
    http_limits_resolve(&s->lim);
    s->h = *handler;
    s->tls = tls;
    if (getrandom(s->rng, sizeof s->rng, 0) != (ssize_t)sizeof s->rng) {
        /* Request ids need to be unique, not secret. */
        s->rng[0] = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
        s->rng[1] = (uint64_t)(mono_now() * 1e9);
    }
    if (!s->rng[0] && !s->rng[1])
        s->rng[1] = 1;
    llhttp_settings_init(&s->settings);
    s->settings.on_message_begin = on_message_begin;
    s->settings.on_method = on_method;
    s->settings.on_url = on_url;
    s->settings.on_version = on_version;
    s->settings.on_header_field = on_header_field;
    s->settings.on_header_value = on_header_value;
    s->settings.on_header_value_complete = on_header_value_complete;
    s->settings.on_header_field_complete = on_header_field_complete;
    s->settings.on_headers_complete = on_headers_complete;
    s->settings.on_body = on_body;
    s->settings.on_chunk_extension_name = on_chunk_ext;
    s->settings.on_chunk_extension_value = on_chunk_ext;
    s->settings.on_chunk_header = on_trailer_or_chunk_header;
    s->settings.on_message_complete = on_message_complete;
    s->reaper = event_new(base, -1, 0, reaper_cb, s);
    if (!s->reaper) {
        snprintf(err, errlen, "cannot create the reaper event");
        goto fail;
    }
    /* A write to a socket the peer reset raises SIGPIPE, whose default
     * action would kill the daemon; the error return is enough. */
    signal(SIGPIPE, SIG_IGN);
    return s;

fail:
    free(s);
    return NULL;
}

void http_server_drain(struct http_server *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n_listeners; i++) {
        listener_free(s->listeners[i]);
        s->listeners[i] = NULL;
    }
    s->n_listeners = 0;
    s->draining = 1;
    struct conn *next;
    for (struct conn *c = s->conns; c; c = next) {
        next = c->next;
        if (c->st == C_IDLE && evbuffer_get_length(bufferevent_get_input(c->bev)) == 0 &&
            evbuffer_get_length(bufferevent_get_output(c->bev)) == 0) {
            c->clean = 1;
            conn_kill(c);
        }
    }
}

size_t http_server_pending_output(const struct http_server *s)
{
    size_t n = 0;
    for (const struct conn *c = s ? s->conns : NULL; c; c = c->next)
        n += evbuffer_get_length(bufferevent_get_output(c->bev));
    return n;
}

void http_server_destroy(struct http_server *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n_listeners; i++)
        listener_free(s->listeners[i]);
    free(s->listeners);
    s->listeners = NULL;
    s->n_listeners = 0;
    /* conn_kill moves each to the dead list (and runs on_abort) */
    while (s->conns)
        conn_kill(s->conns);
    reaper_cb(-1, 0, s);
    event_free(s->reaper);
    free(s);
}

void http_server_get_stats(const struct http_server *s, struct http_stats *out)
{
    *out = s->st;
}
