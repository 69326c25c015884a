/* api.h: the OpenAI-compatible REST API over the HTTP layer.
 *
 * The API turns each HTTP request into an answer: it routes, checks the
 * API key, decodes and bounds the JSON body (one limits table), renders
 * chat templates, tokenizes, submits to the engine and turns the engine's
 * token events back into OpenAI's wire format, one JSON body or a stream
 * of server-sent events. It also answers /health, /ready, /v1/models,
 * /tokenize, /detokenize and /metrics.
 *
 * Threads: everything runs on the event loop's thread except
 * api_engine_wake, which the engine thread calls once per step; token
 * events reach the loop through a lock-protected ready list and one
 * eventfd write per step.
 */
#ifndef INFERD_API_H
#define INFERD_API_H

#include <stddef.h>
#include <stdint.h>

struct event_base;
struct engine;
struct http_req;
struct http_server;
struct model;
struct tokenizer;

struct api_opts {
    const char *served_name;       /* the model id clients name */
    struct model *model;           /* borrowed */
    struct tokenizer *tok;         /* borrowed */
    /* The chat template's source (borrowed; compiled by api_create), or
     * NULL: chat requests then get a 400 saying the model has none. */
    const char *chat_template;
    int trust_request_chat_template; /* accept "chat_template" in requests */
    const char *const *api_keys;   /* n_api_keys keys, copied; 0: no auth */
    int n_api_keys;
    int64_t max_prompt_bytes;      /* 0: 1 MiB of prompt text per request (all prompts) */
    double ping_interval_s;        /* 0: 15 s between SSE keep-alive pings */
};

struct api;

/* An API on base (borrowed). The engine is attached afterwards
 * (api_set_engine), because the engine's wake hook needs the api. Returns
 * NULL with the reason in err (chat template does not compile, eventfd,
 * out of memory). Caller owns the result. */
struct api *api_create(const struct api_opts *opts, struct event_base *base, char *err,
                       size_t errlen);
/* Frees the API. Call after http_server_destroy (which aborts every
 * request) and after engine_destroy. Accepts NULL. */
void api_destroy(struct api *a);
/* The engine requests go to (borrowed) and the HTTP server whose counters
 * /metrics reports (borrowed). */
void api_set_engine(struct api *a, struct engine *e);
void api_set_http(struct api *a, struct http_server *s);

/* The http_handler callbacks; arg is the api. */
void api_on_request(struct http_req *req, void *arg);
void api_on_abort(struct http_req *req, void *arg);
void api_on_drain(struct http_req *req, void *arg);
/* engine_opts.wake: engine thread, once per step with events. */
void api_engine_wake(void *arg);

/* Readiness as /ready reports it: set once the model is loaded; while
 * draining, new generation requests get 503 and /ready says so. */
void api_set_ready(struct api *a, int ready);
void api_set_draining(struct api *a);
/* Generation requests still in flight. */
int api_live_requests(const struct api *a);
/* Cancels every generation in flight (the drain deadline passed): their
 * streams end with an error event, unanswered ones get a 503. */
void api_cancel_all(struct api *a);
/* Whether the engine makes progress: it is idle, or its step counter moved
 * within the last stall_s seconds. Gates /ready and the watchdog ping. */
int api_engine_healthy(struct api *a, double stall_s);

#endif
