/* fuzz_api_request.c: libFuzzer entry point for the JSON request decoding
 * of /v1/chat/completions and /v1/completions (api_decode_gen).
 *
 * One input is one request body, decoded as both kinds. A body the API
 * accepts must be within every bound of the limits table and acceptable to
 * what it feeds (samp_create, the prompt's token ids against the vocabulary
 * and the context); a body it refuses must get a 400 or 404 whose OpenAI
 * error object, client text and all, is valid JSON. Nothing may crash or
 * leak. A body naming "chat_template" is also decoded by an API that trusts
 * request templates (--trust-request-chat-template).
 *
 * The setup is the daemon's own, loaded once: the qwen2 fixture model and
 * its tokenizer, the ChatML template, an engine (idle: nothing is
 * submitted; decoding only asks it its limits). INFERD_FUZZ_MODEL and
 * INFERD_FUZZ_CHAT_TEMPLATE override the paths meson sets.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "engine/engine.h"
#include "engine/json.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"
#include "server/api_internal.h"
#include "server/jsonw.h"
#include "server/log.h"
#include "server/model_text.h"

#ifndef FUZZ_MODEL_DIR
#define FUZZ_MODEL_DIR "tests/fixtures/models/qwen2"
#endif
#ifndef FUZZ_CHAT_TEMPLATE
#define FUZZ_CHAT_TEMPLATE "tests/fixtures/chatml.jinja"
#endif

#define SERVED_NAME "qwen2-fuzz"

static struct api *api_plain, *api_trusting;
static struct engine_limits lim;

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_api_request: %s\n", what);
        __builtin_trap();
    }
}

static void setup_fail(const char *what, const char *err)
{
    /* No model, no fuzzing: say why instead of passing vacuously. */
    fprintf(stderr, "fuzz_api_request: %s: %s\n", what, err);
    abort();
}

static const char *path_or(const char *env, const char *dflt)
{
    const char *p = getenv(env);
    return p && *p ? p : dflt;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    char err[512];
    const char *dir = path_or("INFERD_FUZZ_MODEL", FUZZ_MODEL_DIR);
    log_set_level(LOG_ERROR);
    struct model_opts mo = {.n_threads = 1};
    struct model *model = NULL;
    if (model_load(dir, &mo, &model, err, sizeof err))
        setup_fail(dir, err);
    char *unused = NULL;
    struct tokenizer *tok = mt_open_tokenizer(dir, 0, &unused, err, sizeof err);
    if (!tok)
        setup_fail(dir, err);
    size_t tl;
    const char *tpath = path_or("INFERD_FUZZ_CHAT_TEMPLATE", FUZZ_CHAT_TEMPLATE);
    char *tmpl = mt_slurp(tpath, &tl);
    if (!tmpl)
        setup_fail(tpath, "cannot read");
    struct event_base *base = event_base_new();
    if (!base)
        setup_fail("event_base_new", "failed");
    struct api_opts ao = {
        .served_name = SERVED_NAME, .model = model, .tok = tok, .chat_template = tmpl};
    if (!(api_plain = api_create(&ao, base, err, sizeof err)))
        setup_fail("api_create", err);
    ao.trust_request_chat_template = 1;
    if (!(api_trusting = api_create(&ao, base, err, sizeof err)))
        setup_fail("api_create", err);
    /* A small KV cache: the context is what bounds prompts here. */
    struct engine_opts eo = {.kv_cache_bytes = 4 << 20, .max_seqs = 4};
    struct engine *e = engine_create(model, &eo, err, sizeof err);
    if (!e)
        setup_fail("engine_create", err);
    api_set_engine(api_plain, e);
    api_set_engine(api_trusting, e);
    engine_get_limits(e, &lim);
    free(tmpl); /* api_create compiled it */
    return 0;
}

/* A spec the API accepted: every bound of the limits table holds, and the
 * sampler and the context take it as it is. */
static void check_spec(const struct api *a, const struct api_gen_spec *s, enum api_kind kind)
{
    check(s->kind == kind, "the spec has another kind");
    check(s->n >= 1 && s->n <= API_MAX_N, "n out of bounds");
    check(s->n_prompts >= 1 && (int64_t)s->n_prompts * s->n <= API_MAX_CHOICES,
          "prompts x n out of bounds");
    check(kind == API_COMPLETION || s->n_prompts == 1, "a chat request with several prompts");
    check(s->max_tokens == -1 || (s->max_tokens >= 1 && s->max_tokens <= INT32_MAX),
          "max_tokens out of bounds");
    for (int k = 0; k < s->n_prompts; k++) {
        int64_t p = (int64_t)s->prompt_len[k];
        check(p >= 1 && p < lim.max_model_len, "a prompt empty or filling the context");
        check(s->max_tokens < 0 || p + s->max_tokens <= lim.max_model_len,
              "prompt + max_tokens beyond the context");
        for (int64_t i = 0; i < p; i++)
            check(s->prompt_ids[k][i] >= 0 && s->prompt_ids[k][i] < a->n_vocab,
                  "a prompt token id outside the vocabulary");
        check(!s->echo || s->prompt_text[k], "echo without the prompt's text");
    }
    check(s->n_stops >= 0 && s->n_stops <= API_MAX_STOP, "too many stop strings");
    for (int k = 0; k < s->n_stops; k++) {
        size_t l = strlen(s->stops[k]);
        check(l >= 1 && l <= API_MAX_STOP_BYTES, "a stop string empty or too long");
    }
    check(s->n_stop_ids >= 0 && s->n_stop_ids <= API_MAX_STOP_TOKEN_IDS, "too many stop ids");
    for (int k = 0; k < s->n_stop_ids; k++)
        check(s->stop_ids[k] >= 0 && s->stop_ids[k] < a->n_vocab, "a stop id out of range");
    check(s->priority >= -API_MAX_PRIORITY && s->priority <= API_MAX_PRIORITY,
          "priority out of bounds");
    check(s->top_logprobs >= 0 && s->top_logprobs <= API_MAX_TOP_LOGPROBS,
          "top_logprobs out of bounds");
    if (kind == API_CHAT)
        check(s->logprobs == 0 || s->logprobs == 1, "chat logprobs not a boolean");
    else
        check(s->logprobs >= -1 && s->logprobs <= API_MAX_COMPLETION_LOGPROBS,
              "completions logprobs out of bounds");
    check(!s->echo || kind == API_COMPLETION, "echo in a chat request");
    check(!s->include_usage || s->stream, "include_usage without stream");
    check(s->samp.n_logit_bias >= 0 && s->samp.n_logit_bias <= API_MAX_LOGIT_BIAS,
          "too many logit_bias entries");

    /* What the engine will do with it: samp_create validates the sampling
     * parameters again, and a refusal there would be a 500 for a request
     * the API called valid. */
    char err[256];
    struct sampler *sp = samp_create(&s->samp, a->n_vocab, err, sizeof err);
    check(sp != NULL, err);
    for (int k = 0; k < s->n_prompts; k++)
        check(samp_accept_prompt(sp, s->prompt_ids[k], (int64_t)s->prompt_len[k]) == 0,
              "the sampler refuses a prompt the API accepted");
    samp_destroy(sp);
}

/* A refusal: a client error, with an error object that is valid JSON. */
static void check_error(const struct api_err *e)
{
    check(e->status == 400 || e->status == 404, "a refusal that is not a 400 or a 404");
    check(e->message[0] != '\0', "a refusal without a message");
    check(e->type != NULL, "a refusal without a type");
    struct jw w;
    jw_init(&w);
    api_write_error(&w, e);
    check(jw_ok(&w), "the error object could not be written");
    char jerr[200];
    struct json *j = json_parse(w.buf, w.len, jerr, sizeof jerr);
    check(j != NULL, "the error object is not valid JSON");
    const struct json *msg = json_get(json_get(j, "error"), "message");
    check(json_type(msg) == JSON_STRING, "the error object has no message");
    json_free(j);
    jw_free(&w);
}

static void decode(struct api *a, enum api_kind kind, const uint8_t *data, size_t size)
{
    struct api_gen_spec spec;
    struct api_err e;
    memset(&e, 0, sizeof e);
    if (api_decode_gen(a, kind, (const char *)data, size, &spec, &e) == 0) {
        check_spec(a, &spec, kind);
        api_spec_free(&spec);
    } else {
        check_error(&e);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    decode(api_plain, API_CHAT, data, size);
    decode(api_plain, API_COMPLETION, data, size);
    if (memmem(data, size, "chat_template", 13))
        decode(api_trusting, API_CHAT, data, size);
    return 0;
}
