/* fuzz_chat_template.c: libFuzzer entry point for the Jinja2 chat-template
 * interpreter (parser and renderer).
 *
 * Templates come with model files, so they are untrusted: any bytes must
 * compile or fail with a message, and a compiled template must render over
 * a small conversation or fail with a message, never crash, leak or run
 * away. The limits are small so that a looping template costs the fuzzer
 * milliseconds, not the defaults' seconds.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/chat_template.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256];
    struct chat_template *t = NULL;
    err[0] = '\0';
    int rc = chat_template_compile((const char *)data, size, &t, err, sizeof(err));
    if (rc != 0) {
        if (t || (rc != CHAT_TEMPLATE_ESYNTAX && rc != CHAT_TEMPLATE_ELIMIT) || !err[0])
            __builtin_trap(); /* a failure says why and returns nothing */
        return 0;
    }
    static const struct chat_message msgs[3] = {
        {"system", "You are terse."},
        {"user", "Hi <|eot_id|> {{ x }}"},
        {"assistant", NULL},
    };
    struct chat_render_opts o;
    memset(&o, 0, sizeof(o));
    o.add_generation_prompt = 1;
    o.bos_token = "<s>";
    o.eos_token = "</s>";
    o.max_steps = 20000;
    o.max_output = 64 * 1024;
    o.max_memory = 4 << 20;
    char *out = NULL;
    size_t out_len = 0;
    err[0] = '\0';
    rc = chat_template_render(t, msgs, 3, &o, &out, &out_len, err, sizeof(err));
    if (rc == 0) {
        if (!out || strlen(out) > out_len || out_len > o.max_output)
            __builtin_trap();
    } else if (out) {
        __builtin_trap(); /* raise_exception('') may leave err empty */
    }
    free(out);
    chat_template_destroy(t);
    return 0;
}
