/* api_internal.h: what the api_*.c files share (not for other modules).
 *
 * api.c       routing, auth, errors, the small routes, the access log
 * api_request.c  decoding and bounding a generation request (the limits
 *             table), chat template, tokenizing
 * api_gen.c   one generation in flight: engine events -> OpenAI JSON/SSE
 * metrics.c   /metrics in Prometheus' text format
 * Event loop thread only, except where noted.
 */
#ifndef INFERD_API_INTERNAL_H
#define INFERD_API_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/engine.h"
#include "engine/sampler.h"
#include "server/api.h"
#include "server/jsonw.h"

struct chat_template;
struct event;
struct json;
struct stop_matcher;
struct tok_stream;

/* ------------------------------------------------------ the limits table */
/* Every number, string and array a client sends is bounded here, and the
 * decoder checks each one as it reads it. The values follow OpenAI's own
 * limits where it has them (top_logprobs 20, stop 4) and the hardening
 * notes elsewhere (n, nesting, counts), so no request can fan out, nest or
 * allocate without bound. */
#define API_MAX_N 16                 /* n */
#define API_MAX_TOP_LOGPROBS 20      /* chat top_logprobs */
#define API_MAX_COMPLETION_LOGPROBS 5 /* completions logprobs */
#define API_MAX_STOP 4               /* stop strings */
#define API_MAX_STOP_BYTES 1024      /* one stop string */
#define API_MAX_STOP_TOKEN_IDS 32    /* stop_token_ids (+ the model's own) */
#define API_MAX_LOGIT_BIAS 1024      /* logit_bias entries */
#define API_MAX_MESSAGES 4096        /* chat messages */
#define API_MAX_PROMPTS 64           /* completions prompts in one request */
#define API_MAX_CHOICES 64           /* prompts x n */
#define API_MAX_DEPTH 32             /* JSON nesting */
#define API_MAX_NAME_BYTES 256       /* model, user, role */
#define API_MAX_PRIORITY 1000000     /* |priority| */
#define API_ID_LEN 48

/* An error for the client: HTTP status and OpenAI's error object. */
struct api_err {
    int status;
    const char *type;  /* "invalid_request_error", ... */
    const char *code;  /* NULL: null */
    char param[64];    /* "" : null */
    char message[512];
};

void api_err_set(struct api_err *e, int status, const char *param, const char *code,
                 const char *fmt, ...) __attribute__((format(printf, 5, 6)));

enum api_kind { API_CHAT, API_COMPLETION };

/* A decoded generation request. Owns everything it points to. */
struct api_gen_spec {
    enum api_kind kind;
    int stream, include_usage;
    int n;
    int64_t max_tokens;        /* -1: the kind's default */
    struct samp_params samp;   /* logit_bias points into bias */
    struct samp_bias *bias;
    char *stops[API_MAX_STOP];
    int n_stops;
    int32_t stop_ids[API_MAX_STOP_TOKEN_IDS];
    int n_stop_ids;
    int ignore_eos, skip_special, echo;
    int logprobs;              /* chat: 0/1; completions: -1 off, else k */
    int top_logprobs;
    int priority;
    int n_prompts;
    int32_t **prompt_ids;      /* (n_prompts) arrays */
    size_t *prompt_len;
    char **prompt_text;        /* for echo (completions), else NULL */
    int64_t prompt_bytes;      /* text tokenized so far (max_prompt_bytes) */
};

void api_spec_free(struct api_gen_spec *s);

struct gen;

struct api {
    struct event_base *base;
    struct http_server *http;
    struct engine *engine;
    struct model *model;
    struct tokenizer *tok;
    struct chat_template *tmpl; /* NULL: the model has none */
    char *bos_text, *eos_text;
    char served_name[API_MAX_NAME_BYTES + 1];
    int64_t created;
    int64_t n_vocab;
    int32_t eot_ids[16];       /* the model's end-of-turn tokens */
    int n_eot;
    char **keys;
    size_t *key_lens;
    int n_keys;
    int trust_request_template;
    int64_t max_prompt_bytes;
    double ping_interval_s;
    int ready, draining;

    int efd;                   /* engine -> loop wakeups */
    struct event *wake_ev, *tick_ev;
    pthread_mutex_t ready_mu;  /* guards ready_head and gen.in_ready */
    struct gen *ready_head;
    struct gen *live_head;     /* every generation in flight */
    int n_live;

    /* engine progress, for /ready and the watchdog */
    int64_t last_steps;
    double last_progress;

    /* counters for /metrics */
    uint64_t http_by_status[600];
    uint64_t finished_by_reason[5]; /* stop, length, abort, error, (spare) */
    uint64_t requests_by_route[10];
    uint64_t n_stream_cancelled_slow;
};

enum { API_FIN_STOP, API_FIN_LENGTH, API_FIN_ABORT, API_FIN_ERROR };

/* api.c */
void api_send_error(struct api *a, struct http_req *req, const struct api_err *e);
void api_send_json(struct api *a, struct http_req *req, int status, struct jw *w);
void api_access_log(struct api *a, struct http_req *req, int status, int64_t prompt_tokens,
                    int64_t completion_tokens, double ttft);
void api_count_status(struct api *a, int status);
double api_now(void);
void api_random_id(const char *prefix, char *out, size_t n);
/* Writes the OpenAI error object for e into w. */
void api_write_error(struct jw *w, const struct api_err *e);

/* api_request.c: decodes body into spec. 0, or -1 with e set. */
int api_decode_gen(struct api *a, enum api_kind kind, const char *body, size_t len,
                   struct api_gen_spec *spec, struct api_err *e);
/* Parses a request body as a JSON object, bounded by the limits table. */
struct json *api_parse_body(const char *body, size_t len, struct api_err *e);
/* Renders messages (a JSON array) with the model's template (or src when
 * not NULL): malloc'd text, or NULL with e set. */
char *api_render_chat(struct api *a, const struct json *messages, const struct json *tools,
                      int add_generation_prompt, const struct json *tmpl_src, size_t *len,
                      struct api_err *e);
/* Checks a chat messages array against the limits (roles, contents). */
int api_check_messages(const struct json *msgs, struct api_err *e);

/* api_gen.c */
/* Submits spec (ownership taken, whatever the result) and answers req. */
void api_gen_start(struct api *a, struct http_req *req, struct api_gen_spec *spec);
void api_gen_abort(struct api *a, struct gen *g); /* the client went away */
void api_gen_drain(struct api *a, struct gen *g); /* the client caught up */
void api_gen_pump_ready(struct api *a);           /* engine events arrived */
void api_gen_tick(struct api *a, double now);     /* once a second: pings */
void api_gen_cancel_all(struct api *a);

/* metrics.c */
void api_metrics(struct api *a, struct jw *out);

#endif
