/* api_request.c: a generation request's JSON body -> struct api_gen_spec.
 *
 * Decoding is where untrusted bytes become numbers, so every field is
 * type-checked and bounded here against the limits table in
 * api_internal.h, and an error names the field (param) and says what was
 * wrong. Unknown fields are ignored, as OpenAI's servers do. The body is
 * parsed by the engine's strict JSON reader (duplicate keys refused, UTF-8
 * checked, nesting capped at API_MAX_DEPTH) because the chat template
 * consumes that tree directly. Event loop thread.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "engine/chat_template.h"
#include "engine/json.h"
#include "engine/tokenizer.h"
#include "server/api_internal.h"

void api_err_set(struct api_err *e, int status, const char *param, const char *code,
                 const char *fmt, ...)
{
    e->status = status;
    e->type = status == 401   ? "invalid_request_error"
              : status == 404 ? "invalid_request_error"
              : status == 429 ? "rate_limit_error"
              : status == 503 ? "service_unavailable"
              : status >= 500 ? "server_error"
                              : "invalid_request_error";
    e->code = code;
    snprintf(e->param, sizeof(e->param), "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof(e->message), fmt, ap);
    va_end(ap);
}

void api_spec_free(struct api_gen_spec *s)
{
    free(s->bias);
    for (int i = 0; i < s->n_stops; i++)
        free(s->stops[i]);
    for (int i = 0; i < s->n_prompts; i++) {
        if (s->prompt_ids)
            free(s->prompt_ids[i]);
        if (s->prompt_text)
            free(s->prompt_text[i]);
    }
    free(s->prompt_ids);
    free(s->prompt_len);
    free(s->prompt_text);
    memset(s, 0, sizeof(*s));
}

static const char *type_name(const struct json *v)
{
    switch (json_type(v)) {
    case JSON_NULL: return "null";
    case JSON_BOOL: return "a boolean";
    case JSON_NUMBER: return "a number";
    case JSON_STRING: return "a string";
    case JSON_ARRAY: return "an array";
    case JSON_OBJECT: return "an object";
    }
    return "a value";
}

struct json *api_parse_body(const char *body, size_t len, struct api_err *e)
{
    char jerr[200];
    if (len == 0) {
        api_err_set(e, 400, "", NULL, "the request body is empty; expected a JSON object");
        return NULL;
    }
    struct json *j = json_parse_depth(body, len, API_MAX_DEPTH, jerr, sizeof(jerr));
    if (!j) {
        api_err_set(e, 400, "", NULL, "the request body is not valid JSON: %s", jerr);
        return NULL;
    }
    if (json_type(j) != JSON_OBJECT) {
        api_err_set(e, 400, "", NULL, "the request body must be a JSON object, got %s",
                    type_name(j));
        json_free(j);
        return NULL;
    }
    return j;
}

/* ------------------------------------------------------- typed getters */
/* Each returns 1 when the field is present (and valid), 0 when absent or
 * null, -1 with e set when it has the wrong type or is out of range. */

static int get_num(const struct json *o, const char *key, double lo, double hi, double *out,
                   struct api_err *e)
{
    const struct json *v = json_get(o, key);
    if (!v || json_type(v) == JSON_NULL)
        return 0;
    if (json_type(v) != JSON_NUMBER) {
        api_err_set(e, 400, key, "invalid_type", "'%s' must be a number, got %s", key,
                    type_name(v));
        return -1;
    }
    double d = json_number(v);
    if (!(d >= lo && d <= hi)) {
        api_err_set(e, 400, key, "invalid_value", "'%s' must be between %g and %g, got %g", key,
                    lo, hi, d);
        return -1;
    }
    *out = d;
    return 1;
}

static int get_int(const struct json *o, const char *key, int64_t lo, int64_t hi, int64_t *out,
                   struct api_err *e)
{
    const struct json *v = json_get(o, key);
    if (!v || json_type(v) == JSON_NULL)
        return 0;
    int64_t x;
    if (json_type(v) != JSON_NUMBER || json_int64(v, &x)) {
        api_err_set(e, 400, key, "invalid_type", "'%s' must be an integer, got %s", key,
                    json_type(v) == JSON_NUMBER ? "a fraction or a number out of range"
                                                : type_name(v));
        return -1;
    }
    if (x < lo || x > hi) {
        api_err_set(e, 400, key, "invalid_value", "'%s' must be between %lld and %lld, got %lld",
                    key, (long long)lo, (long long)hi, (long long)x);
        return -1;
    }
    *out = x;
    return 1;
}

static int get_bool(const struct json *o, const char *key, int *out, struct api_err *e)
{
    const struct json *v = json_get(o, key);
    if (!v || json_type(v) == JSON_NULL)
        return 0;
    if (json_type(v) != JSON_BOOL) {
        api_err_set(e, 400, key, "invalid_type", "'%s' must be a boolean, got %s", key,
                    type_name(v));
        return -1;
    }
    *out = json_bool(v);
    return 1;
}

static int get_str(const struct json *o, const char *key, size_t max, const char **out,
                   size_t *len, struct api_err *e)
{
    const struct json *v = json_get(o, key);
    if (!v || json_type(v) == JSON_NULL)
        return 0;
    if (json_type(v) != JSON_STRING) {
        api_err_set(e, 400, key, "invalid_type", "'%s' must be a string, got %s", key,
                    type_name(v));
        return -1;
    }
    size_t l;
    const char *s = json_str(v, &l);
    if (l > max) {
        api_err_set(e, 400, key, "invalid_value", "'%s' is %zu bytes long, the limit is %zu", key,
                    l, max);
        return -1;
    }
    *out = s;
    if (len)
        *len = l;
    return 1;
}

/* ------------------------------------------------------------- sampling */

static int decode_sampling(struct api *a, const struct json *o, struct api_gen_spec *s,
                           struct api_err *e)
{
    double d;
    int64_t i;
    int r;
    s->samp = samp_params_default();
#define NUM(key, lo, hi, field)                                                              \
    if ((r = get_num(o, key, lo, hi, &d, e)) < 0)                                            \
        return -1;                                                                           \
    if (r)                                                                                   \
        s->samp.field = (float)d;
    NUM("temperature", 0, 2, temperature)
    NUM("top_p", 0, 1, top_p)
    NUM("min_p", 0, 1, min_p)
    NUM("presence_penalty", -2, 2, presence_penalty)
    NUM("frequency_penalty", -2, 2, frequency_penalty)
    NUM("repetition_penalty", 0, 10, repetition_penalty)
#undef NUM
    if (json_get(o, "top_p") && s->samp.top_p <= 0) {
        api_err_set(e, 400, "top_p", "invalid_value", "'top_p' must be above 0 and at most 1");
        return -1;
    }
    if (json_get(o, "repetition_penalty") && s->samp.repetition_penalty <= 0) {
        api_err_set(e, 400, "repetition_penalty", "invalid_value",
                    "'repetition_penalty' must be above 0");
        return -1;
    }
    if ((r = get_int(o, "top_k", -1, a->n_vocab, &i, e)) < 0)
        return -1;
    if (r)
        s->samp.top_k = (int32_t)i;
    /* seed: any 64-bit integer, as vLLM validates it */
    if ((r = get_int(o, "seed", INT64_MIN, INT64_MAX, &i, e)) < 0)
        return -1;
    if (r) {
        s->samp.seed = (uint64_t)i;
    } else {
        uint64_t rnd = 0;
        if (getrandom(&rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd))
            rnd = (uint64_t)api_now() * 0x9e3779b97f4a7c15ull;
        s->samp.seed = rnd;
    }

    /* logit_bias: {"token id": bias} */
    const struct json *lb = json_get(o, "logit_bias");
    if (lb && json_type(lb) != JSON_NULL) {
        if (json_type(lb) != JSON_OBJECT) {
            api_err_set(e, 400, "logit_bias", "invalid_type",
                        "'logit_bias' must be an object mapping token ids to biases, got %s",
                        type_name(lb));
            return -1;
        }
        size_t n = json_len(lb);
        if (n > API_MAX_LOGIT_BIAS) {
            api_err_set(e, 400, "logit_bias", "invalid_value",
                        "'logit_bias' has %zu entries, the limit is %d", n, API_MAX_LOGIT_BIAS);
            return -1;
        }
        s->bias = calloc(n ? n : 1, sizeof(*s->bias));
        if (!s->bias) {
            api_err_set(e, 500, "", NULL, "out of memory");
            return -1;
        }
        for (size_t k = 0; k < n; k++) {
            const char *key = json_key_at(lb, k);
            char *end;
            errno = 0;
            long long id = strtoll(key, &end, 10);
            if (!*key || *end || errno || id < 0 || id >= a->n_vocab) {
                api_err_set(e, 400, "logit_bias", "invalid_value",
                            "'logit_bias' keys must be token ids between 0 and %lld, got '%.40s'",
                            (long long)a->n_vocab - 1, key);
                return -1;
            }
            const struct json *v = json_at(lb, k);
            double b = json_number(v);
            if (json_type(v) != JSON_NUMBER || !(b >= -100 && b <= 100)) {
                api_err_set(e, 400, "logit_bias", "invalid_value",
                            "'logit_bias' values must be numbers between -100 and 100 "
                            "(token %lld)", id);
                return -1;
            }
            s->bias[k].token = (int32_t)id;
            s->bias[k].bias = (float)b;
        }
        s->samp.logit_bias = s->bias;
        s->samp.n_logit_bias = (int32_t)n;
    }
    return 0;
}

/* stop: a string or up to API_MAX_STOP strings; stop_token_ids. */
static int decode_stops(struct api *a, const struct json *o, struct api_gen_spec *s,
                        struct api_err *e)
{
    const struct json *st = json_get(o, "stop");
    if (st && json_type(st) != JSON_NULL) {
        size_t n = json_type(st) == JSON_STRING ? 1 : json_len(st);
        if (json_type(st) != JSON_STRING && json_type(st) != JSON_ARRAY) {
            api_err_set(e, 400, "stop", "invalid_type",
                        "'stop' must be a string or an array of strings, got %s", type_name(st));
            return -1;
        }
        if (n > API_MAX_STOP) {
            api_err_set(e, 400, "stop", "invalid_value",
                        "'stop' has %zu strings, the limit is %d", n, API_MAX_STOP);
            return -1;
        }
        for (size_t k = 0; k < n; k++) {
            const struct json *v = json_type(st) == JSON_STRING ? st : json_at(st, k);
            size_t l;
            const char *str = json_str(v, &l);
            if (!str) {
                api_err_set(e, 400, "stop", "invalid_type",
                            "'stop' must hold strings, element %zu is %s", k, type_name(v));
                return -1;
            }
            if (l > API_MAX_STOP_BYTES || memchr(str, 0, l)) {
                api_err_set(e, 400, "stop", "invalid_value",
                            "stop strings must be at most %d bytes without NUL characters",
                            API_MAX_STOP_BYTES);
                return -1;
            }
            if (l == 0) /* an empty stop string would end every text at once */
                continue;
            if (!(s->stops[s->n_stops] = strdup(str))) {
                api_err_set(e, 500, "", NULL, "out of memory");
                return -1;
            }
            s->n_stops++;
        }
    }
    const struct json *ids = json_get(o, "stop_token_ids");
    if (ids && json_type(ids) != JSON_NULL) {
        if (json_type(ids) != JSON_ARRAY || json_len(ids) > API_MAX_STOP_TOKEN_IDS) {
            api_err_set(e, 400, "stop_token_ids", "invalid_value",
                        "'stop_token_ids' must be an array of at most %d token ids",
                        API_MAX_STOP_TOKEN_IDS);
            return -1;
        }
        for (size_t k = 0; k < json_len(ids); k++) {
            int64_t id;
            if (json_int64(json_at(ids, k), &id) || id < 0 || id >= a->n_vocab) {
                api_err_set(e, 400, "stop_token_ids", "invalid_value",
                            "'stop_token_ids' must hold token ids between 0 and %lld",
                            (long long)a->n_vocab - 1);
                return -1;
            }
            s->stop_ids[s->n_stop_ids++] = (int32_t)id;
        }
    }
    return 0;
}

/* --------------------------------------------------------------- prompts */

static int add_prompt(struct api_gen_spec *s, int32_t *ids, size_t n, char *text,
                      struct api_err *e)
{
    int k = s->n_prompts;
    int32_t **pi = realloc(s->prompt_ids, (size_t)(k + 1) * sizeof(*pi));
    if (pi)
        s->prompt_ids = pi;
    size_t *pl = pi ? realloc(s->prompt_len, (size_t)(k + 1) * sizeof(*pl)) : NULL;
    if (pl)
        s->prompt_len = pl;
    char **pt = pl ? realloc(s->prompt_text, (size_t)(k + 1) * sizeof(*pt)) : NULL;
    if (pt)
        s->prompt_text = pt;
    if (!pi || !pl || !pt) {
        free(ids);
        free(text);
        api_err_set(e, 500, "", NULL, "out of memory");
        return -1;
    }
    s->prompt_ids[k] = ids;
    s->prompt_len[k] = n;
    s->prompt_text[k] = text;
    s->n_prompts = k + 1;
    return 0;
}

/* Tokenizes text (special tokens parsed, as Hugging Face's tokenizers do
 * by default) and adds it as a prompt. */
static int add_text_prompt(struct api *a, struct api_gen_spec *s, const char *text, size_t len,
                           int add_special, const char *param, struct api_err *e)
{
    /* Tokenizing runs on the event loop: the text of one request is
     * bounded, so no request can hold the loop for long. */
    s->prompt_bytes += (int64_t)len;
    if (s->prompt_bytes > a->max_prompt_bytes) {
        api_err_set(e, 400, param, "context_length_exceeded",
                    "the prompt text is %lld bytes long, the limit is %lld bytes "
                    "(--max-prompt-bytes)",
                    (long long)s->prompt_bytes, (long long)a->max_prompt_bytes);
        return -1;
    }
    int32_t *ids = NULL;
    size_t n = 0;
    char terr[200];
    if (tokenizer_encode(a->tok, text, len, add_special, 1, &ids, &n, terr, sizeof(terr))) {
        api_err_set(e, 400, param, NULL, "the prompt cannot be tokenized: %s", terr);
        return -1;
    }
    char *copy = NULL;
    if (s->echo && !(copy = strndup(text, len))) {
        free(ids);
        api_err_set(e, 500, "", NULL, "out of memory");
        return -1;
    }
    return add_prompt(s, ids, n, copy, e);
}

static int add_ids_prompt(struct api *a, struct api_gen_spec *s, const struct json *arr,
                          struct api_err *e)
{
    size_t n = json_len(arr);
    if (n > (size_t)INT32_MAX) {
        api_err_set(e, 400, "prompt", "context_length_exceeded", "the prompt is too long");
        return -1;
    }
    int32_t *ids = malloc((n ? n : 1) * sizeof(*ids));
    if (!ids) {
        api_err_set(e, 500, "", NULL, "out of memory");
        return -1;
    }
    for (size_t k = 0; k < n; k++) {
        int64_t id;
        if (json_int64(json_at(arr, k), &id) || id < 0 || id >= a->n_vocab) {
            free(ids);
            api_err_set(e, 400, "prompt", "invalid_value",
                        "prompt token ids must be integers between 0 and %lld (element %zu)",
                        (long long)a->n_vocab - 1, k);
            return -1;
        }
        ids[k] = (int32_t)id;
    }
    char *text = NULL;
    if (s->echo) {
        size_t tl;
        if (!(text = tokenizer_decode(a->tok, ids, n, 0, &tl))) {
            free(ids);
            api_err_set(e, 500, "", NULL, "out of memory");
            return -1;
        }
    }
    return add_prompt(s, ids, n, text, e);
}

static int decode_prompt(struct api *a, const struct json *o, struct api_gen_spec *s,
                         struct api_err *e)
{
    const struct json *p = json_get(o, "prompt");
    if (!p || json_type(p) == JSON_NULL) {
        api_err_set(e, 400, "prompt", "missing_required_parameter", "'prompt' is required");
        return -1;
    }
    if (json_type(p) == JSON_STRING) {
        size_t l;
        const char *t = json_str(p, &l);
        return add_text_prompt(a, s, t, l, 1, "prompt", e);
    }
    if (json_type(p) != JSON_ARRAY || json_len(p) == 0) {
        api_err_set(e, 400, "prompt", "invalid_type",
                    "'prompt' must be a string, an array of strings, an array of token ids "
                    "or an array of such arrays, got %s",
                    json_type(p) == JSON_ARRAY ? "an empty array" : type_name(p));
        return -1;
    }
    enum json_type t0 = json_type(json_at(p, 0));
    if (t0 == JSON_NUMBER)
        return add_ids_prompt(a, s, p, e);
    if (json_len(p) > API_MAX_PROMPTS) {
        api_err_set(e, 400, "prompt", "invalid_value",
                    "'prompt' holds %zu prompts, the limit is %d", json_len(p), API_MAX_PROMPTS);
        return -1;
    }
    for (size_t k = 0; k < json_len(p); k++) {
        const struct json *v = json_at(p, k);
        if (json_type(v) == JSON_STRING && t0 == JSON_STRING) {
            size_t l;
            const char *t = json_str(v, &l);
            if (add_text_prompt(a, s, t, l, 1, "prompt", e))
                return -1;
        } else if (json_type(v) == JSON_ARRAY && t0 == JSON_ARRAY && json_len(v) > 0) {
            if (add_ids_prompt(a, s, v, e))
                return -1;
        } else {
            api_err_set(e, 400, "prompt", "invalid_type",
                        "'prompt' must be a string, an array of strings, an array of token ids "
                        "or an array of non-empty arrays of token ids (element %zu is %s)",
                        k, type_name(v));
            return -1;
        }
    }
    return 0;
}

int api_check_messages(const struct json *msgs, struct api_err *e)
{
    static const char *const roles[] = {"system", "user", "assistant", "tool", "developer",
                                        "function"};
    if (!msgs || json_type(msgs) == JSON_NULL) {
        api_err_set(e, 400, "messages", "missing_required_parameter", "'messages' is required");
        return -1;
    }
    if (json_type(msgs) != JSON_ARRAY || json_len(msgs) == 0) {
        api_err_set(e, 400, "messages", "invalid_type",
                    "'messages' must be a non-empty array of message objects, got %s",
                    json_type(msgs) == JSON_ARRAY ? "an empty array" : type_name(msgs));
        return -1;
    }
    if (json_len(msgs) > API_MAX_MESSAGES) {
        api_err_set(e, 400, "messages", "invalid_value",
                    "'messages' holds %zu messages, the limit is %d", json_len(msgs),
                    API_MAX_MESSAGES);
        return -1;
    }
    for (size_t k = 0; k < json_len(msgs); k++) {
        const struct json *m = json_at(msgs, k);
        char param[64];
        snprintf(param, sizeof(param), "messages[%zu]", k);
        if (json_type(m) != JSON_OBJECT) {
            api_err_set(e, 400, param, "invalid_type", "'%s' must be an object, got %s", param,
                        type_name(m));
            return -1;
        }
        const char *role = json_str(json_get(m, "role"), NULL);
        int known = 0;
        for (size_t r = 0; role && r < sizeof(roles) / sizeof(roles[0]); r++)
            known |= strcmp(role, roles[r]) == 0;
        if (!known) {
            snprintf(param, sizeof(param), "messages[%zu].role", k);
            api_err_set(e, 400, param, "invalid_value",
                        "'%s' must be one of system, user, assistant, tool, developer", param);
            return -1;
        }
        const struct json *c = json_get(m, "content");
        snprintf(param, sizeof(param), "messages[%zu].content", k);
        if (json_type(c) == JSON_ARRAY) {
            for (size_t i = 0; i < json_len(c); i++) {
                const struct json *part = json_at(c, i);
                const char *type = json_str(json_get(part, "type"), NULL);
                if (!type || strcmp(type, "text") != 0 ||
                    json_type(json_get(part, "text")) != JSON_STRING) {
                    api_err_set(e, 400, param, "invalid_value",
                                "'%s' parts must be {\"type\": \"text\", \"text\": ...}; "
                                "this model takes text only",
                                param);
                    return -1;
                }
            }
        } else if (json_type(c) != JSON_STRING &&
                   !(json_type(c) == JSON_NULL && strcmp(role, "assistant") == 0)) {
            api_err_set(e, 400, param, "invalid_type",
                        "'%s' must be a string or an array of text parts, got %s", param,
                        type_name(c));
            return -1;
        }
    }
    return 0;
}

/* Whether any message has content given as an array of parts. */
static int has_parts(const struct json *msgs)
{
    for (size_t k = 0; k < json_len(msgs); k++)
        if (json_type(json_get(json_at(msgs, k), "content")) == JSON_ARRAY)
            return 1;
    return 0;
}

char *api_render_chat(struct api *a, const struct json *messages, const struct json *tools,
                      int add_generation_prompt, const struct json *tmpl_src, size_t *len,
                      struct api_err *e)
{
    struct chat_template *own = NULL;
    const struct chat_template *t = a->tmpl;
    char cerr[400];
    char *out = NULL;
    struct chat_message *flat = NULL;
    char **texts = NULL;
    size_t n = json_len(messages);
    if (tmpl_src) {
        size_t sl;
        const char *src = json_str(tmpl_src, &sl);
        if (!src || chat_template_compile(src, sl, &own, cerr, sizeof(cerr))) {
            api_err_set(e, 400, "chat_template", "invalid_value",
                        "'chat_template' does not compile: %s", src ? cerr : "not a string");
            return NULL;
        }
        t = own;
    }
    if (!t) {
        api_err_set(e, 400, "messages", "no_chat_template",
                    "this model has no chat template; start the server with --chat-template "
                    "FILE, or use /v1/completions");
        return NULL;
    }
    struct chat_render_opts o = {
        .add_generation_prompt = add_generation_prompt,
        .bos_token = a->bos_text,
        .eos_token = a->eos_text,
        .tools = tools && json_type(tools) == JSON_ARRAY ? tools : NULL,
    };
    int rc;
    if (!has_parts(messages)) {
        rc = chat_template_render_json(t, messages, &o, &out, len, cerr, sizeof(cerr));
    } else {
        /* Templates expect string content: text parts are joined. */
        flat = calloc(n, sizeof(*flat));
        texts = calloc(n, sizeof(*texts));
        if (!flat || !texts) {
            api_err_set(e, 500, "", NULL, "out of memory");
            goto done;
        }
        for (size_t k = 0; k < n; k++) {
            const struct json *m = json_at(messages, k);
            const struct json *c = json_get(m, "content");
            flat[k].role = json_str(json_get(m, "role"), NULL);
            if (json_type(c) == JSON_STRING) {
                flat[k].content = json_str(c, NULL);
                continue;
            }
            size_t total = 0;
            for (size_t i = 0; i < json_len(c); i++) {
                size_t l;
                json_str(json_get(json_at(c, i), "text"), &l);
                total += l;
            }
            if (!(texts[k] = malloc(total + 1))) {
                api_err_set(e, 500, "", NULL, "out of memory");
                goto done;
            }
            size_t off = 0;
            for (size_t i = 0; i < json_len(c); i++) {
                size_t l;
                const char *s = json_str(json_get(json_at(c, i), "text"), &l);
                memcpy(texts[k] + off, s, l);
                off += l;
            }
            texts[k][off] = 0;
            flat[k].content = json_type(c) == JSON_NULL ? NULL : texts[k];
        }
        rc = chat_template_render(t, flat, n, &o, &out, len, cerr, sizeof(cerr));
    }
    if (rc) {
        out = NULL;
        /* A template's raise_exception is written for the user ("roles
         * must alternate"); other failures name the template's line. */
        api_err_set(e, 400, "messages", "chat_template_error", "%s%s",
                    rc == CHAT_TEMPLATE_ERAISED ? "" : "the chat template failed: ", cerr);
    }
done:
    if (texts)
        for (size_t k = 0; k < n; k++)
            free(texts[k]);
    free(texts);
    free(flat);
    chat_template_destroy(own);
    return out;
}

/* ------------------------------------------------------------ the whole */

static int check_unsupported(const struct json *o, enum api_kind kind, struct api_err *e)
{
    const struct json *v;
    if (kind == API_COMPLETION) {
        if ((v = json_get(o, "suffix")) && json_type(v) != JSON_NULL &&
            !(json_type(v) == JSON_STRING && json_str(v, NULL)[0] == 0)) {
            api_err_set(e, 400, "suffix", "unsupported_parameter", "'suffix' is not supported");
            return -1;
        }
    }
    const struct json *rf = json_get(o, "response_format");
    if (rf && json_type(rf) != JSON_NULL) {
        const char *t = json_str(json_get(rf, "type"), NULL);
        if (!t || strcmp(t, "text") != 0) {
            api_err_set(e, 400, "response_format", "unsupported_parameter",
                        "'response_format' %s is not supported; only {\"type\": \"text\"}",
                        t ? t : "without a type");
            return -1;
        }
    }
    const struct json *tc = json_get(o, "tool_choice");
    if (tc && json_type(tc) != JSON_NULL) {
        const char *t = json_str(tc, NULL);
        if (!t || (strcmp(t, "none") != 0 && strcmp(t, "auto") != 0)) {
            api_err_set(e, 400, "tool_choice", "unsupported_parameter",
                        "'tool_choice' must be \"none\" or \"auto\"; forcing a tool call is "
                        "not supported");
            return -1;
        }
    }
    return 0;
}

int api_decode_gen(struct api *a, enum api_kind kind, const char *body, size_t len,
                   struct api_gen_spec *s, struct api_err *e)
{
    memset(s, 0, sizeof(*s));
    s->kind = kind;
    s->max_tokens = -1;
    s->logprobs = kind == API_COMPLETION ? -1 : 0;
    s->skip_special = 1;
    struct json *o = api_parse_body(body, len, e);
    if (!o)
        return -1;
    int64_t i;
    int r;
    const char *str;
    size_t sl;
    if (check_unsupported(o, kind, e))
        goto fail;

    if ((r = get_str(o, "model", API_MAX_NAME_BYTES, &str, &sl, e)) < 0)
        goto fail;
    if (r && (sl != strlen(a->served_name) || memcmp(str, a->served_name, sl) != 0)) {
        api_err_set(e, 404, "model", "model_not_found",
                    "The model '%.*s' does not exist; this server serves '%s'",
                    (int)(sl > 200 ? 200 : sl), str, a->served_name);
        goto fail;
    }
    if (get_str(o, "user", API_MAX_NAME_BYTES, &str, NULL, e) < 0)
        goto fail;
    s->n = 1;
    if ((r = get_int(o, "n", 1, API_MAX_N, &i, e)) < 0)
        goto fail;
    if (r)
        s->n = (int)i;
    if (kind == API_COMPLETION) {
        if ((r = get_int(o, "best_of", 1, API_MAX_N, &i, e)) < 0)
            goto fail;
        if (r && i != s->n) {
            api_err_set(e, 400, "best_of", "unsupported_parameter",
                        "'best_of' must equal 'n' (%d): ranking extra samples is not supported",
                        s->n);
            goto fail;
        }
    }
    /* max_completion_tokens supersedes max_tokens */
    if ((r = get_int(o, "max_completion_tokens", 1, INT32_MAX, &i, e)) < 0)
        goto fail;
    if (!r && (r = get_int(o, "max_tokens", 1, INT32_MAX, &i, e)) < 0)
        goto fail;
    if (r)
        s->max_tokens = i;
    if (get_bool(o, "stream", &s->stream, e) < 0)
        goto fail;
    const struct json *so = json_get(o, "stream_options");
    if (so && json_type(so) != JSON_NULL) {
        if (!s->stream) {
            api_err_set(e, 400, "stream_options", "invalid_value",
                        "'stream_options' is only allowed when 'stream' is true");
            goto fail;
        }
        if (json_type(so) != JSON_OBJECT) {
            api_err_set(e, 400, "stream_options", "invalid_type",
                        "'stream_options' must be an object, got %s", type_name(so));
            goto fail;
        }
        if (get_bool(so, "include_usage", &s->include_usage, e) < 0) {
            snprintf(e->param, sizeof(e->param), "stream_options.include_usage");
            goto fail;
        }
    }
    if (get_bool(o, "ignore_eos", &s->ignore_eos, e) < 0 ||
        get_bool(o, "skip_special_tokens", &s->skip_special, e) < 0)
        goto fail;
    if ((r = get_int(o, "priority", -API_MAX_PRIORITY, API_MAX_PRIORITY, &i, e)) < 0)
        goto fail;
    if (r)
        s->priority = (int)i;

    /* logprobs: a boolean (+ top_logprobs) in chat, a count in completions */
    if (kind == API_CHAT) {
        if (get_bool(o, "logprobs", &s->logprobs, e) < 0)
            goto fail;
        if ((r = get_int(o, "top_logprobs", 0, API_MAX_TOP_LOGPROBS, &i, e)) < 0)
            goto fail;
        if (r) {
            if (!s->logprobs && i > 0) {
                api_err_set(e, 400, "top_logprobs", "invalid_value",
                            "'top_logprobs' needs 'logprobs' set to true");
                goto fail;
            }
            s->top_logprobs = (int)i;
        }
    } else {
        if ((r = get_int(o, "logprobs", 0, API_MAX_COMPLETION_LOGPROBS, &i, e)) < 0)
            goto fail;
        if (r) {
            s->logprobs = (int)i;
            s->top_logprobs = (int)i;
        }
        if (get_bool(o, "echo", &s->echo, e) < 0)
            goto fail;
        if (s->echo && s->logprobs >= 0) {
            api_err_set(e, 400, "echo", "unsupported_parameter",
                        "'echo' together with 'logprobs' is not supported (prompt logprobs)");
            goto fail;
        }
    }
    if (decode_sampling(a, o, s, e) || decode_stops(a, o, s, e))
        goto fail;
    s->samp.logprobs = s->logprobs > 0 || (kind == API_COMPLETION && s->logprobs == 0);
    s->samp.top_logprobs = s->top_logprobs;

    if (kind == API_CHAT) {
        const struct json *msgs = json_get(o, "messages");
        if (api_check_messages(msgs, e))
            goto fail;
        int add_gen = 1;
        if (get_bool(o, "add_generation_prompt", &add_gen, e) < 0)
            goto fail;
        const struct json *ts = json_get(o, "chat_template");
        if (ts && json_type(ts) == JSON_NULL)
            ts = NULL;
        if (ts && !a->trust_request_template) {
            api_err_set(e, 400, "chat_template", "unsupported_parameter",
                        "'chat_template' from requests is refused; the operator can allow it "
                        "with --trust-request-chat-template");
            goto fail;
        }
        const struct json *tools = json_get(o, "tools");
        if (tools && json_type(tools) != JSON_NULL && json_type(tools) != JSON_ARRAY) {
            api_err_set(e, 400, "tools", "invalid_type", "'tools' must be an array, got %s",
                        type_name(tools));
            goto fail;
        }
        size_t tl;
        char *text = api_render_chat(a, msgs, tools, add_gen, ts, &tl, e);
        if (!text)
            goto fail;
        /* The template wrote the special tokens (BOS included) itself, as
         * apply_chat_template's output is tokenized. */
        r = add_text_prompt(a, s, text, tl, 0, "messages", e);
        free(text);
        if (r)
            goto fail;
    } else if (decode_prompt(a, o, s, e)) {
        goto fail;
    }
    if ((int64_t)s->n_prompts * s->n > API_MAX_CHOICES) {
        api_err_set(e, 400, "n", "invalid_value",
                    "%d prompts x n=%d makes %d choices, the limit is %d", s->n_prompts, s->n,
                    s->n_prompts * s->n, API_MAX_CHOICES);
        goto fail;
    }

    /* Lengths against the context: never truncate silently. */
    struct engine_limits lim;
    engine_get_limits(a->engine, &lim);
    for (int k = 0; k < s->n_prompts; k++) {
        const char *param = kind == API_CHAT ? "messages" : "prompt";
        int64_t p = (int64_t)s->prompt_len[k];
        if (p == 0) {
            api_err_set(e, 400, param, "invalid_value", "the prompt is empty");
            goto fail;
        }
        if (p >= lim.max_model_len) {
            api_err_set(e, 400, param, "context_length_exceeded",
                        "This model's maximum context length is %lld tokens, but the prompt "
                        "has %lld tokens; there is no room to generate any",
                        (long long)lim.max_model_len, (long long)p);
            goto fail;
        }
        if (s->max_tokens > 0 && p + s->max_tokens > lim.max_model_len) {
            api_err_set(e, 400, json_get(o, "max_completion_tokens") ? "max_completion_tokens"
                                                                     : "max_tokens",
                        "context_length_exceeded",
                        "This model's maximum context length is %lld tokens, but %lld tokens "
                        "were asked for (%lld in the prompt, %lld to generate)",
                        (long long)lim.max_model_len, (long long)(p + s->max_tokens),
                        (long long)p, (long long)s->max_tokens);
            goto fail;
        }
    }
    json_free(o);
    return 0;
fail:
    json_free(o);
    api_spec_free(s);
    return -1;
}
