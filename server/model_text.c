/* model_text.c: a model's tokenizer, chat template and end-of-turn tokens,
 * read from beside its weights (see model_text.h). Main thread. */
#include "server/model_text.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/gguf.h"
#include "engine/json.h"
#include "engine/tokenizer.h"

/* The model used when none is named: $INFERD_MODEL, else the one
 * deploy/setup.sh installs. Writes the path to buf. */
const char *mt_default_model(char *buf, size_t n)
{
    const char *env = getenv("INFERD_MODEL");
    if (env && *env)
        return env;
    const char *data = getenv("XDG_DATA_HOME"), *home = getenv("HOME");
    if (data && *data)
        snprintf(buf, n, "%s/inferd/default.gguf", data);
    else
        snprintf(buf, n, "%s/.local/share/inferd/default.gguf", home ? home : "");
    return buf;
}

/* A file's whole contents (NUL-terminated), or NULL. */
char *mt_slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = NULL;
    size_t cap = 0, n = 0, got;
    do {
        if (n + 65536 + 1 > cap) {
            cap = 2 * cap + 65536 + 1;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = nb;
        }
        got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
    } while (got > 0);
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

/* The model's tokenizer (its GGUF metadata, or tokenizer.json beside the
 * weights of a Hugging Face directory) and, when want_template, its chat
 * template source (tokenizer.chat_template, or tokenizer_config.json's
 * chat_template) into *tmpl (malloc'd; NULL when the model has none). */
struct tokenizer *mt_open_tokenizer(const char *path, int want_template, char **tmpl,
                                        char *err, size_t errlen)
{
    struct tokenizer *t = NULL;
    struct stat sb;
    *tmpl = NULL;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        char p[4096];
        if ((size_t)snprintf(p, sizeof(p), "%s/tokenizer_config.json", path) >= sizeof(p)) {
            snprintf(err, errlen, "the model path is too long (%zu bytes)", strlen(path));
            return NULL;
        }
        size_t len;
        char *cfg = want_template ? mt_slurp(p, &len) : NULL;
        if (cfg) {
            char jerr[256];
            struct json *j = json_parse(cfg, len, jerr, sizeof(jerr));
            const struct json *ct = json_get(j, "chat_template");
            /* a list of named templates: the one named "default" */
            for (size_t i = 0; json_type(ct) == JSON_ARRAY && i < json_len(ct); i++) {
                const char *name = json_str(json_get(json_at(ct, i), "name"), NULL);
                if (name && strcmp(name, "default") == 0) {
                    ct = json_get(json_at(ct, i), "template");
                    break;
                }
            }
            size_t tl;
            const char *src = json_str(ct, &tl);
            if (src) {
                *tmpl = malloc(tl + 1);
                if (*tmpl) {
                    memcpy(*tmpl, src, tl);
                    (*tmpl)[tl] = 0;
                }
            }
            json_free(j);
            free(cfg);
        }
        if ((size_t)snprintf(p, sizeof(p), "%s/tokenizer.json", path) < sizeof(p))
            tokenizer_load_hf(p, &t, err, errlen);
        return t;
    }
    struct gguf_file *g;
    if (gguf_open(path, &g, err, errlen))
        return NULL;
    tokenizer_load_gguf(g, path, &t, err, errlen);
    size_t tl;
    const char *src = want_template ? gguf_get_str(g, "tokenizer.chat_template", &tl) : NULL;
    if (src && (*tmpl = malloc(tl + 1))) {
        memcpy(*tmpl, src, tl);
        (*tmpl)[tl] = 0;
    }
    gguf_close(g);
    return t;
}

/* The text of token id (empty when none). */
char *mt_token_text(const struct tokenizer *t, int64_t id)
{
    size_t l = 0;
    const char *b = id >= 0 ? tokenizer_token_bytes(t, (int32_t)id, &l) : NULL;
    char *s = malloc(l + 1);
    if (s) {
        if (b)
            memcpy(s, b, l);
        s[l] = 0;
    }
    return s;
}


int mt_end_of_turn_ids(const struct tokenizer *t, int64_t eos_id, int32_t *out, int max)
{
    static const char *const names[] = {
        "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
        "<|end_of_text|>", "</s>", "<end_of_turn>",
    };
    int n = 0;
    if (eos_id >= 0 && n < max)
        out[n++] = (int32_t)eos_id;
    /* A vocabulary scan, once at startup: the names are special tokens
     * whose ids differ between models. */
    int64_t nv = tokenizer_n_vocab(t);
    for (int64_t id = 0; id < nv && n < max; id++) {
        if (id == eos_id || !tokenizer_is_special(t, (int32_t)id))
            continue;
        size_t len;
        const char *b = tokenizer_token_bytes(t, (int32_t)id, &len);
        for (size_t k = 0; b && k < sizeof(names) / sizeof(names[0]); k++)
            if (strlen(names[k]) == len && memcmp(b, names[k], len) == 0) {
                out[n++] = (int32_t)id;
                break;
            }
    }
    return n;
}
