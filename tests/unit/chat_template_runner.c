/* chat_template_runner.c: renders one chat template for the Python parity
 * test (tests/test_chat_template.py).
 *
 * Usage: chat_template_runner TEMPLATE CONTEXT.json
 * CONTEXT is an object: messages (array), and optionally
 * add_generation_prompt, bos_token, eos_token, tools, and extra (an object
 * of further template variables). Prints the render to stdout and exits 0;
 * on failure prints "<kind>: <message>" to stderr (kind: syntax, runtime,
 * raised, limit) and exits 1; bad usage or unreadable files exit 2.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/chat_template.h"
#include "engine/json.h"

static char *slurp(const char *path, size_t *len)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (n == cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        if (got == 0)
            break;
        n += got;
    }
    if (f != stdin)
        fclose(f);
    *len = n;
    return buf;
}

static const char *kind(int rc)
{
    switch (rc) {
    case CHAT_TEMPLATE_ESYNTAX: return "syntax";
    case CHAT_TEMPLATE_ERAISED: return "raised";
    case CHAT_TEMPLATE_ELIMIT: return "limit";
    default: return "runtime";
    }
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s TEMPLATE CONTEXT.json\n", argv[0]);
        return 2;
    }
    int status = 2;
    size_t tlen = 0, clen = 0;
    char *tsrc = slurp(argv[1], &tlen);
    char *csrc = slurp(argv[2], &clen);
    struct json *ctx = NULL;
    struct chat_template *t = NULL;
    char *out = NULL;
    char err[1024];
    if (!tsrc || !csrc) {
        fprintf(stderr, "cannot read %s\n", !tsrc ? argv[1] : argv[2]);
        goto done;
    }
    ctx = json_parse(csrc, clen, err, sizeof(err));
    if (!ctx) {
        fprintf(stderr, "%s: %s\n", argv[2], err);
        goto done;
    }
    status = 1;
    int rc = chat_template_compile(tsrc, tlen, &t, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "%s: %s\n", kind(rc), err);
        goto done;
    }
    struct chat_render_opts opts = {
        .add_generation_prompt = json_bool(json_get(ctx, "add_generation_prompt")),
        .bos_token = json_str(json_get(ctx, "bos_token"), NULL),
        .eos_token = json_str(json_get(ctx, "eos_token"), NULL),
        .tools = json_type(json_get(ctx, "tools")) == JSON_ARRAY ? json_get(ctx, "tools") : NULL,
        .extra = json_get(ctx, "extra"),
    };
    size_t n = 0;
    rc = chat_template_render_json(t, json_get(ctx, "messages"), &opts, &out, &n, err,
                                   sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "%s: %s\n", kind(rc), err);
        goto done;
    }
    fwrite(out, 1, n, stdout);
    status = 0;
done:
    free(out);
    chat_template_destroy(t);
    json_free(ctx);
    free(tsrc);
    free(csrc);
    return status;
}
