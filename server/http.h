/* http.h: HTTP/1.1 connections over libevent bufferevents, parsed by llhttp.
 *
 * The connection layer of the daemon. It accepts on the listening sockets
 * it is given (plain TCP or TLS), parses requests strictly (every llhttp
 * leniency off: a request with both Content-Length and Transfer-Encoding,
 * two lengths, a bad chunk size or an invalid character is refused with 400
 * and the connection closed), enforces the limits below, answers
 * `Expect: 100-continue`, and hands each complete request (headers and the
 * whole body, chunked bodies decoded) to one handler. Requests pipelined on
 * a connection are answered in order: the next one is parsed only once the
 * response to the current one is complete.
 *
 * While a request is being answered the socket is still read, so a client
 * that closes its end (EOF or reset) is noticed at once, whether its
 * response is streaming or not yet started: the handler's on_abort runs
 * and the handler cancels the work. Bytes the client sends meanwhile are
 * kept (pipelining) up to max_header_bytes, then reading pauses.
 *
 * The layer answers on its own, in OpenAI's error shape, the requests it
 * refuses: 400 (malformed), 408 (header or body timeout), 413 (body too
 * large), 414 (request line too long), 431 (headers too large or too
 * many), 503 (too many connections), 505 (not HTTP/1.x), and logs each.
 *
 * Everything here runs on the event loop's thread: no function may be
 * called from another thread. Ownership: the layer owns every struct
 * http_req; the handler borrows it from on_request until it finishes the
 * response (http_respond, http_stream_end, http_abort) or until on_abort
 * runs, whichever comes first. Connections are never freed inside their
 * own callbacks; they are reaped once per loop iteration.
 */
#ifndef INFERD_HTTP_H
#define INFERD_HTTP_H

#include <stddef.h>
#include <stdint.h>

struct event_base;
struct ssl_ctx_st;

/* Limits; a zero field takes the default shown. */
struct http_limits {
    size_t max_request_line;  /* 8 KiB: method + target + version -> 414 */
    size_t max_header_bytes;  /* 16 KiB: request line and headers -> 431 */
    int max_headers;          /* 100 header fields -> 431 */
    size_t max_body_bytes;    /* 8 MiB, Content-Length or chunked -> 413 */
    double header_timeout_s;  /* 10: from connect (TLS handshake included) or
                               * from the previous response's end, to the
                               * end of the headers -> 408 */
    double body_timeout_s;    /* 10: most time between two reads of a body
                               * -> 408 */
    double min_body_rate;     /* 1024 bytes/s: once a body has taken longer
                               * than body_timeout_s, it must have averaged
                               * at least this since its start -> 408 (a
                               * body dripped in just inside the timeout
                               * would otherwise hold the connection for
                               * hours); < 0: no minimum */
    double idle_timeout_s;    /* 75: keep-alive connection with nothing in
                               * flight; closed silently. Longer than a load
                               * balancer's idle timeout, so it closes first */
    double send_timeout_s;    /* 60: response output pending with no write
                               * progress -> the connection is dropped and
                               * on_abort runs */
    int max_connections;      /* 4096 open connections; beyond it a new
                               * connection gets 503 and is closed */
    size_t max_output_bytes;  /* 1 MiB: output queued for one connection
                               * beyond which http_stream_write refuses */
};

/* Fills in the defaults above for every zero field of l. */
void http_limits_resolve(struct http_limits *l);

struct http_req;

struct http_handler {
    /* A complete request arrived. The handler must finish it with exactly
     * one of: http_respond; http_stream_begin ... http_stream_end;
     * http_abort. It may do so later, from another callback of the loop. */
    void (*on_request)(struct http_req *req, void *arg);
    /* The connection of an unfinished request went away (client EOF or
     * reset, send timeout, write error, server shutdown). The handler must
     * stop using req: it is freed when on_abort returns. Not called for a
     * request the handler itself ended (http_respond, http_stream_end,
     * http_abort). */
    void (*on_abort)(struct http_req *req, void *arg);
    /* Optional: a streaming response's queued output fell below half of
     * max_output_bytes after having been above it (the client caught up). */
    void (*on_drain)(struct http_req *req, void *arg);
    void *arg;
};

/* Counters since http_server_create, and gauges. */
struct http_stats {
    uint64_t connections_accepted;
    uint64_t connections_refused;   /* over max_connections */
    uint64_t requests;              /* handed to on_request */
    uint64_t requests_aborted;      /* on_abort calls */
    uint64_t rejected_malformed;    /* 400 and 505 the layer sent itself */
    uint64_t rejected_too_large;    /* 413, 414, 431 */
    uint64_t timeouts;              /* 408 sent, idle or send timeouts */
    uint64_t responses_by_class[6]; /* [1..5]: 1xx..5xx status lines sent */
    uint64_t bytes_in, bytes_out;
    int connections_open;
    int requests_in_flight;         /* handed over and not yet finished */
};

struct http_server;

/* A server on base (borrowed; it must outlive the server). tls is an
 * OpenSSL SSL_CTX (borrowed, from http_tls_ctx_create) for HTTPS on every
 * listener, or NULL for plain HTTP. limits may be NULL (all defaults).
 * handler is copied. Returns NULL with the reason in err. */
struct http_server *http_server_create(struct event_base *base, const struct http_limits *limits,
                                       const struct http_handler *handler,
                                       struct ssl_ctx_st *tls, char *err, size_t errlen);
/* Closes every listener and connection (unfinished requests get on_abort)
 * and frees the server. Accepts NULL. */
void http_server_destroy(struct http_server *s);

/* Opens a listening TCP socket on host:port (host: an IPv4 or IPv6 literal
 * or a name resolved once at startup; port 0 picks a free port) with
 * SO_REUSEADDR, non-blocking and close-on-exec. Returns the fd, or -1 with
 * err set. */
int http_listen_tcp(const char *host, int port, int backlog, char *err, size_t errlen);
/* Serves on fd, a listening stream socket (from http_listen_tcp, or handed
 * over by systemd through LISTEN_FDS). The server owns fd from now on.
 * Returns 0, or -1 with err set. */
int http_server_add_listener(struct http_server *s, int fd, char *err, size_t errlen);
/* The port of listener i (0 = the first added), or -1. */
int http_server_port(const struct http_server *s, int i);
/* Stops accepting (listeners closed), so that a draining daemon takes no
 * new connections; keep-alive connections then close after their current
 * response (Connection: close) and idle ones close now. */
void http_server_drain(struct http_server *s);
void http_server_get_stats(const struct http_server *s, struct http_stats *out);
/* Bytes of responses still queued for clients on all connections: a
 * draining daemon waits for 0 before it closes them (a finished request
 * may not have reached its client yet). */
size_t http_server_pending_output(const struct http_server *s);

/* An SSL_CTX serving cert_file (PEM chain) with key_file: TLS 1.2 and 1.3
 * only, forward-secret AEAD cipher suites, no compression or
 * renegotiation. Returns NULL with the reason (file, OpenSSL's message) in
 * err. Free with http_tls_ctx_destroy (accepts NULL). */
struct ssl_ctx_st *http_tls_ctx_create(const char *cert_file, const char *key_file, char *err,
                                       size_t errlen);
void http_tls_ctx_destroy(struct ssl_ctx_st *ctx);

/* ------------------------------------------------------------ a request */

/* "GET", "POST", ... (NUL-terminated, owned by req). */
const char *http_req_method(const struct http_req *req);
/* The target's path, without the query string, percent-decoding not
 * applied ("/v1/models/qwen"). */
const char *http_req_path(const struct http_req *req);
/* The query string after '?', or "" when none. */
const char *http_req_query(const struct http_req *req);
/* The value of header name (case-insensitive), leading and trailing
 * whitespace removed; for a repeated header, the first. NULL when absent. */
const char *http_req_header(const struct http_req *req, const char *name);
/* The body (decoded when chunked); *len set. Never NULL (empty: ""), and
 * NUL-terminated one byte past *len for convenience. */
const char *http_req_body(const struct http_req *req, size_t *len);
/* The request id: the client's X-Request-Id when it is 1..128 bytes of
 * [A-Za-z0-9._:-], else a fresh random one (32 hex digits). Every response
 * to req carries it in X-Request-Id. */
const char *http_req_id(const struct http_req *req);
/* The peer's address as text ("127.0.0.1:53122", "[::1]:53122"). */
const char *http_req_peer(const struct http_req *req);
/* CLOCK_MONOTONIC seconds at which the request's first byte arrived. */
double http_req_start_time(const struct http_req *req);
/* Whether the connection is TLS. */
int http_req_is_tls(const struct http_req *req);
/* A pointer the handler keeps with the request (NULL until set). */
void http_req_set_data(struct http_req *req, void *data);
void *http_req_get_data(const struct http_req *req);

/* ------------------------------------------------------------ responses */

/* Sends a whole response: the status line, Content-Type (NULL: none),
 * Content-Length, Date, Server, X-Request-Id and Connection, then
 * extra_headers (NULL, or complete "Name: value\r\n" lines), then the
 * body. Finishes req: the handler must not use it afterwards. */
void http_respond(struct http_req *req, int status, const char *content_type,
                  const char *extra_headers, const char *body, size_t len);
/* Starts a streaming response (chunked transfer coding on HTTP/1.1; on
 * HTTP/1.0 the body ends when the connection closes). */
void http_stream_begin(struct http_req *req, int status, const char *content_type,
                       const char *extra_headers);
/* Queues len bytes as one chunk. Returns 0, or -1 without queuing them
 * when the output queued for this connection would exceed
 * max_output_bytes (the client is not reading): the handler then ends
 * the request, normally with http_abort. */
int http_stream_write(struct http_req *req, const char *data, size_t len);
/* Bytes queued for the client and not yet written to the socket. */
size_t http_req_pending_output(const struct http_req *req);
/* Ends a streaming response (the last chunk). Finishes req. */
void http_stream_end(struct http_req *req);
/* Drops the connection without finishing the response (what was queued
 * may still be flushed first). Finishes req; on_abort is not called. */
void http_abort(struct http_req *req);

/* The reason phrase of status ("Not Found"), "Unknown" for others. */
const char *http_status_text(int status);

#endif
