/* test_jsonw.c: the response JSON writer, through server/jsonw.h:
 * separators, escaping, invalid UTF-8 replaced, numbers that read back. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/jsonw.h"

static int failures;

#define CHECK_STR(w, want)                                                                    \
    do {                                                                                      \
        if (!(w)->buf || strcmp((w)->buf, want) != 0) {                                       \
            fprintf(stderr, "FAIL %s:%d: got %s\n  want %s\n", __FILE__, __LINE__,            \
                    (w)->buf ? (w)->buf : "(null)", want);                                    \
            failures++;                                                                       \
        }                                                                                     \
    } while (0)

int main(void)
{
    struct jw w;
    jw_init(&w);

    /* nesting and commas */
    jw_obj(&w);
    jw_key(&w, "a");
    jw_int(&w, 1);
    jw_key(&w, "b");
    jw_arr(&w);
    jw_int(&w, -2);
    jw_null(&w);
    jw_bool(&w, 1);
    jw_obj(&w);
    jw_obj_end(&w);
    jw_arr(&w);
    jw_arr_end(&w);
    jw_arr_end(&w);
    jw_key(&w, "c");
    jw_str(&w, "x");
    jw_obj_end(&w);
    CHECK_STR(&w, "{\"a\":1,\"b\":[-2,null,true,{},[]],\"c\":\"x\"}");

    /* escaping: quotes, backslash, control characters, NUL */
    jw_reset(&w);
    jw_strn(&w, "q\"b\\n\n\t\x01\0z", 10);
    CHECK_STR(&w, "\"q\\\"b\\\\n\\n\\t\\u0001\\u0000z\"");

    /* valid UTF-8 passes; invalid bytes become U+FFFD one by one */
    jw_reset(&w);
    jw_str(&w, "\xc3\xa9\xf0\x9f\x98\x80");
    CHECK_STR(&w, "\"\xc3\xa9\xf0\x9f\x98\x80\"");
    jw_reset(&w);
    jw_str(&w, "a\xff" "b\xe2\x82");
    CHECK_STR(&w, "\"a\xef\xbf\xbd" "b\xef\xbf\xbd\xef\xbf\xbd\"");
    jw_reset(&w);
    jw_str(&w, "\xed\xa0\x80"); /* a UTF-16 surrogate is not UTF-8 */
    CHECK_STR(&w, "\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\"");
    jw_reset(&w);
    jw_str(&w, "\xc0\xaf"); /* overlong */
    CHECK_STR(&w, "\"\xef\xbf\xbd\xef\xbf\xbd\"");

    /* numbers: floats read back exactly, stay floats, non-finite is null */
    double vals[] = {0.1, -2.5, 1e-30, 3.0, -0.0, 123456789.125, (double)-0.31f};
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        jw_reset(&w);
        jw_num(&w, vals[i]);
        double back = strtod(w.buf, NULL);
        if (back != vals[i] || !strpbrk(w.buf, ".eE")) {
            fprintf(stderr, "FAIL number %.17g wrote %s\n", vals[i], w.buf);
            failures++;
        }
    }
    jw_reset(&w);
    jw_arr(&w);
    jw_num(&w, NAN);
    jw_num(&w, INFINITY);
    jw_int(&w, INT64_MIN);
    jw_arr_end(&w);
    CHECK_STR(&w, "[null,null,-9223372036854775808]");

    /* raw framing around a document (SSE) */
    jw_reset(&w);
    jw_raw(&w, "data: ", 6);
    jw_obj(&w);
    jw_obj_end(&w);
    jw_raw(&w, "\n\n", 2);
    CHECK_STR(&w, "data: {}\n\n");

    /* a long string grows the buffer */
    jw_reset(&w);
    char *big = malloc(100001);
    memset(big, 'x', 100000);
    big[100000] = 0;
    jw_str(&w, big);
    if (!jw_ok(&w) || w.len != 100002) {
        fprintf(stderr, "FAIL long string: len %zu\n", w.len);
        failures++;
    }
    free(big);
    jw_free(&w);
    if (failures) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    puts("all jsonw tests passed");
    return 0;
}
