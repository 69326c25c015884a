/* chat_template.h: a sandboxed interpreter for Jinja2 chat templates.
 *
 * Models ship their prompt format as a Jinja2 template (tokenizer_config.json
 * "chat_template", GGUF "tokenizer.chat_template"). This module compiles the
 * subset of Jinja2 that real chat templates use and renders it the way
 * Hugging Face's apply_chat_template does (trim_blocks, lstrip_blocks,
 * loopcontrols, raise_exception, tojson, strftime_now). Templates are
 * untrusted: every render is bounded in steps, output and memory, nesting is
 * capped, and attributes starting with '_' are refused, so any template gives
 * either its output or an error naming the line, never a crash.
 *
 * A compiled template is immutable; several threads may render it at once.
 */
#ifndef INFERD_CHAT_TEMPLATE_H
#define INFERD_CHAT_TEMPLATE_H

#include <stddef.h>
#include <stdint.h>

struct json;
struct chat_template;

enum chat_template_rc {
    CHAT_TEMPLATE_OK = 0,
    CHAT_TEMPLATE_ESYNTAX = -1, /* the template does not parse */
    CHAT_TEMPLATE_ERUNTIME = -2, /* an error while rendering (type, undefined...) */
    CHAT_TEMPLATE_ERAISED = -3, /* the template called raise_exception(msg) */
    CHAT_TEMPLATE_ELIMIT = -4, /* a step, output, memory or depth limit */
};

/* One message with plain string content. */
struct chat_message {
    const char *role;    /* NUL-terminated */
    const char *content; /* NUL-terminated; NULL renders as none */
};

struct chat_render_opts {
    int add_generation_prompt;
    const char *bos_token; /* NULL: "" */
    const char *eos_token; /* NULL: "" */
    const struct json *tools; /* array of tool schemas, or NULL for none */
    /* An object whose members become extra template variables (e.g.
     * date_string, enable_thinking); NULL for none. */
    const struct json *extra;
    /* Limits; 0 takes the default (10M steps, 1 MiB output, 64 MiB memory). */
    uint64_t max_steps;
    size_t max_output;
    size_t max_memory;
};

/* Compiles len bytes of template source (need not be NUL-terminated). On
 * success returns 0 and *out, which the caller owns and frees with
 * chat_template_destroy. On failure returns CHAT_TEMPLATE_ESYNTAX (or
 * ELIMIT for nesting) and writes "line N: problem" into err. */
int chat_template_compile(const char *src, size_t len, struct chat_template **out, char *err,
                          size_t errlen);

/* Renders t over messages with string content. opts may be NULL (all
 * defaults). On success returns 0 and *out, a NUL-terminated malloc'd string
 * of *out_len bytes that the caller frees with free(). On failure returns a
 * negative chat_template_rc, leaves *out NULL and writes the message into
 * err: the template's own text for ERAISED, "line N: problem" otherwise.
 * The strings in msgs and opts are only read during the call. */
int chat_template_render(const struct chat_template *t, const struct chat_message *msgs,
                         size_t n_msgs, const struct chat_render_opts *opts, char **out,
                         size_t *out_len, char *err, size_t errlen);

/* As chat_template_render, with messages given as a JSON array of objects
 * (nested content, tool_calls and any other fields reach the template as
 * they are). messages is only read during the call. */
int chat_template_render_json(const struct chat_template *t, const struct json *messages,
                              const struct chat_render_opts *opts, char **out, size_t *out_len,
                              char *err, size_t errlen);

/* Frees a compiled template. Accepts NULL. */
void chat_template_destroy(struct chat_template *t);

#endif
