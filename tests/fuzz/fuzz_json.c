/* fuzz_json.c: libFuzzer entry point for the strict JSON reader.
 *
 * Any bytes must parse or fail with a message, never crash or read past
 * len; a parsed tree is walked through every accessor.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "engine/json.h"

static size_t walk(const struct json *v, int depth)
{
    size_t n = 1;
    size_t len = 0;
    int64_t i;
    (void)json_number(v);
    (void)json_int64(v, &i);
    (void)json_bool(v);
    const char *s = json_str(v, &len);
    if (s && len && s[len] != '\0')
        __builtin_trap(); /* strings are NUL-terminated */
    for (size_t k = 0; k < json_len(v); k++) {
        const char *key = json_key_at(v, k);
        /* a key without embedded NULs must find its own member */
        if (key && strlen(key) == json_key_len(v, k) && json_get(v, key) != json_at(v, k))
            __builtin_trap();
        n += walk(json_at(v, k), depth + 1);
    }
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256];
    struct json *j = json_parse((const char *)data, size, err, sizeof(err));
    if (j)
        (void)walk(j, 0);
    else if (strncmp(err, "offset ", 7) != 0)
        __builtin_trap(); /* every failure says where */
    json_free(j);
    return 0;
}
