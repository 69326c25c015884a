/* test_json.c: the strict JSON reader through engine/json.h.
 *
 * Checks the grammar, escapes and surrogate pairs, UTF-8 validation,
 * duplicate keys, the depth cap, exact int64 numbers and trailing bytes,
 * and that every prefix of a valid document fails cleanly.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/json.h"

static int n_checks, n_failed;

#define CHECK(cond)                                                        \
    do {                                                                   \
        n_checks++;                                                        \
        if (!(cond)) {                                                     \
            n_failed++;                                                    \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__,         \
                    __LINE__, #cond);                                      \
        }                                                                  \
    } while (0)

static struct json *parse(const char *s)
{
    char err[256];
    struct json *j = json_parse(s, strlen(s), err, sizeof(err));
    if (!j)
        fprintf(stderr, "unexpected parse failure of %s: %s\n", s, err);
    return j;
}

/* Parses s (len bytes) expecting failure whose message contains want. */
static void expect_fail_n(int line, const char *s, size_t len, const char *want)
{
    char err[256];
    err[0] = '\0';
    struct json *j = json_parse(s, len, err, sizeof(err));
    n_checks++;
    if (j || !strstr(err, want)) {
        n_failed++;
        fprintf(stderr, "%s:%d: expected failure containing \"%s\", got %s \"%s\"\n",
                __FILE__, line, want, j ? "success" : "error", err);
    }
    json_free(j);
}
#define EXPECT_FAIL(s, want) expect_fail_n(__LINE__, s, strlen(s), want)
#define EXPECT_FAIL_N(s, n, want) expect_fail_n(__LINE__, s, n, want)

static void test_scalars(void)
{
    struct json *j = parse(" null ");
    CHECK(j && json_type(j) == JSON_NULL);
    json_free(j);
    j = parse("true");
    CHECK(j && json_type(j) == JSON_BOOL && json_bool(j) == 1);
    json_free(j);
    j = parse("false");
    CHECK(j && json_type(j) == JSON_BOOL && json_bool(j) == 0);
    json_free(j);
    j = parse("\"hi\"");
    size_t n = 9;
    CHECK(j && json_str(j, &n) && strcmp(json_str(j, NULL), "hi") == 0 && n == 2);
    json_free(j);
    j = parse("\t\r\n 1.5e2 \n");
    CHECK(j && json_type(j) == JSON_NUMBER && json_number(j) == 150.0);
    json_free(j);

    EXPECT_FAIL("", "unexpected end of input");
    EXPECT_FAIL("   ", "unexpected end of input");
    EXPECT_FAIL("nul", "invalid literal");
    EXPECT_FAIL("True", "unexpected character 'T'");
    EXPECT_FAIL("nulll", "trailing bytes");
    EXPECT_FAIL("{} {}", "trailing bytes");
    EXPECT_FAIL("1 2", "trailing bytes");
    EXPECT_FAIL("\"a\"x", "trailing bytes");
    EXPECT_FAIL_N("{}\0", 3, "trailing bytes");
    EXPECT_FAIL("\xef\xbb\xbf{}", "byte order mark");
    EXPECT_FAIL("\v1", "unexpected byte 0x0b");
    EXPECT_FAIL("'a'", "unexpected character");
    EXPECT_FAIL("NaN", "unexpected character");
    EXPECT_FAIL("Infinity", "unexpected character");
    EXPECT_FAIL("/* c */ 1", "unexpected character");
}

static void test_numbers(void)
{
    static const struct {
        const char *text;
        int ok;        /* json_int64 succeeds */
        long long val; /* its value */
    } ints[] = {
        {"0", 1, 0},
        {"-0", 1, 0},
        {"42", 1, 42},
        {"-17", 1, -17},
        {"9007199254740993", 1, 9007199254740993LL}, /* 2^53 + 1, not a double */
        {"9223372036854775807", 1, 9223372036854775807LL},
        {"-9223372036854775808", 1, -9223372036854775807LL - 1},
        {"9223372036854775808", 0, 0},
        {"-9223372036854775809", 0, 0},
        {"18446744073709551616", 0, 0},
        {"123456789012345678901234567890", 0, 0},
        {"3.0", 1, 3},
        {"3.000", 1, 3},
        {"-12.00", 1, -12},
        {"3.5", 0, 0},
        {"3.0000000000000001", 0, 0},
        {"1e3", 0, 0}, /* exponent: not written as an integer */
        {"1E0", 0, 0},
        {"0.1", 0, 0},
    };
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++) {
        struct json *j = parse(ints[i].text);
        CHECK(j != NULL);
        int64_t v = 12345;
        int rc = json_int64(j, &v);
        if ((rc == 0) != ints[i].ok || (ints[i].ok && v != ints[i].val)) {
            n_failed++;
            fprintf(stderr, "json_int64(%s): rc %d value %lld\n", ints[i].text, rc,
                    (long long)v);
        }
        n_checks++;
        json_free(j);
    }

    struct json *j = parse("[1e3, -2.5E-3, 1e-400, 0.1, 123456789012345678901234567890, 1E+2]");
    CHECK(j && json_len(j) == 6);
    CHECK(json_number(json_at(j, 0)) == 1000.0);
    CHECK(json_number(json_at(j, 1)) == -2.5e-3);
    CHECK(json_number(json_at(j, 2)) == 0.0); /* underflow is fine */
    CHECK(json_number(json_at(j, 3)) == 0.1);
    CHECK(json_number(json_at(j, 4)) == 1.2345678901234568e29);
    CHECK(json_number(json_at(j, 5)) == 100.0);
    json_free(j);

    /* json_int64 and json_number on non-numbers */
    j = parse("\"5\"");
    int64_t v;
    CHECK(json_int64(j, &v) == -1 && json_number(j) == 0.0);
    json_free(j);
    CHECK(json_int64(NULL, &v) == -1);

    EXPECT_FAIL("01", "leading zero");
    EXPECT_FAIL("-01", "leading zero");
    EXPECT_FAIL("-", "expected a digit");
    EXPECT_FAIL("+1", "unexpected character '+'");
    EXPECT_FAIL(".5", "unexpected character '.'");
    EXPECT_FAIL("1.", "expected a digit after '.'");
    EXPECT_FAIL("1.e5", "expected a digit after '.'");
    EXPECT_FAIL("1e", "expected a digit in exponent");
    EXPECT_FAIL("1e+", "expected a digit in exponent");
    EXPECT_FAIL("0x10", "trailing bytes");
    EXPECT_FAIL("1e400", "out of range");
    EXPECT_FAIL("-1e400", "out of range");
    EXPECT_FAIL("[1,]", "unexpected character ']'");
}

static void test_strings(void)
{
    struct json *j = parse("\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\"");
    CHECK(j && strcmp(json_str(j, NULL), "a\"b\\c/d\b\f\n\r\t") == 0);
    json_free(j);

    /* \u escapes into UTF-8, one to four bytes */
    j = parse("\"\\u0041\\u00e9\\u20AC\\uD83D\\uDE00\"");
    CHECK(j && strcmp(json_str(j, NULL), "A\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80") == 0);
    json_free(j);
    /* highest code point, via a surrogate pair */
    j = parse("\"\\uDBFF\\uDFFF\"");
    CHECK(j && strcmp(json_str(j, NULL), "\xf4\x8f\xbf\xbf") == 0);
    json_free(j);
    /* embedded NUL kept, length says so */
    j = parse("\"a\\u0000b\"");
    size_t n = 0;
    const char *s = json_str(j, &n);
    CHECK(s && n == 3 && memcmp(s, "a\0b", 4) == 0);
    json_free(j);
    /* raw UTF-8 passes through: 2, 3 and 4 byte sequences */
    j = parse("\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf\"");
    CHECK(j && strlen(json_str(j, NULL)) == 13);
    json_free(j);
    /* DEL is not a control character in JSON */
    j = parse("\"\x7f\"");
    CHECK(j != NULL);
    json_free(j);

    EXPECT_FAIL("\"abc", "unterminated string");
    EXPECT_FAIL("\"abc\\", "unterminated string");
    EXPECT_FAIL("\"a\nb\"", "unescaped control character 0x0a");
    EXPECT_FAIL("\"a\tb\"", "unescaped control character 0x09");
    EXPECT_FAIL_N("\"a\0b\"", 5, "unescaped control character 0x00");
    EXPECT_FAIL("\"\\x41\"", "invalid escape '\\x'");
    EXPECT_FAIL("\"\\U0041\"", "invalid escape");
    EXPECT_FAIL("\"\\'\"", "invalid escape");
    EXPECT_FAIL("\"\\u12\"}", "bad hex digit");
    EXPECT_FAIL("\"\\u12", "truncated \\u escape");
    EXPECT_FAIL("\"\\u00g0\"", "bad hex digit");
    /* surrogates: lone, reversed, unpaired */
    EXPECT_FAIL("\"\\uD800\"", "not followed by a low surrogate");
    EXPECT_FAIL("\"\\uD800x\"", "not followed by a low surrogate");
    EXPECT_FAIL("\"\\uD800\\n\"", "not followed by a low surrogate");
    EXPECT_FAIL("\"\\uD800\\u0041\"", "not a low surrogate");
    EXPECT_FAIL("\"\\uD800\\uD800\"", "not a low surrogate");
    EXPECT_FAIL("\"\\uDC00\"", "lone low surrogate");
    EXPECT_FAIL("\"\\uDE00\\uD83D\"", "lone low surrogate");
    /* invalid UTF-8 */
    EXPECT_FAIL("\"\x80\"", "invalid UTF-8");               /* stray continuation */
    EXPECT_FAIL("\"\xc3\"", "invalid UTF-8");               /* truncated */
    EXPECT_FAIL("\"\xc3(\"", "invalid UTF-8");              /* bad continuation */
    EXPECT_FAIL("\"\xc0\xaf\"", "invalid UTF-8");           /* overlong '/' */
    EXPECT_FAIL("\"\xc1\xbf\"", "invalid UTF-8");           /* overlong */
    EXPECT_FAIL("\"\xe0\x80\xaf\"", "invalid UTF-8");       /* overlong 3-byte */
    EXPECT_FAIL("\"\xf0\x80\x80\xaf\"", "invalid UTF-8");   /* overlong 4-byte */
    EXPECT_FAIL("\"\xed\xa0\x80\"", "invalid UTF-8");       /* encoded surrogate */
    EXPECT_FAIL("\"\xf4\x90\x80\x80\"", "invalid UTF-8");   /* > U+10FFFF */
    EXPECT_FAIL("\"\xf5\x80\x80\x80\"", "invalid UTF-8");
    EXPECT_FAIL("\"\xff\"", "invalid UTF-8");
    EXPECT_FAIL("\"\xe2\x82\"", "invalid UTF-8");           /* truncated before quote */
    EXPECT_FAIL_N("\"\xf0\x9f\x98", 4, "invalid UTF-8");    /* truncated at end */
    /* invalid UTF-8 in keys too */
    EXPECT_FAIL("{\"\xc3\":1}", "invalid UTF-8");
}

static void test_containers(void)
{
    struct json *j = parse("{\"a\": [1, 2, {\"b\": null}], \"c\": {}, \"d\": [], \"e\": \"x\"}");
    CHECK(j && json_type(j) == JSON_OBJECT && json_len(j) == 4);
    CHECK(strcmp(json_key_at(j, 0), "a") == 0 && strcmp(json_key_at(j, 3), "e") == 0);
    CHECK(json_key_len(j, 3) == 1 && json_key_len(j, 4) == 0);
    CHECK(json_key_at(j, 4) == NULL);
    const struct json *a = json_get(j, "a");
    CHECK(json_type(a) == JSON_ARRAY && json_len(a) == 3);
    CHECK(json_at(a, 0) && json_number(json_at(a, 1)) == 2.0 && json_at(a, 3) == NULL);
    CHECK(json_type(json_get(json_at(a, 2), "b")) == JSON_NULL && json_get(json_at(a, 2), "b"));
    CHECK(json_len(json_get(j, "c")) == 0 && json_type(json_get(j, "c")) == JSON_OBJECT);
    CHECK(json_len(json_get(j, "d")) == 0 && json_type(json_get(j, "d")) == JSON_ARRAY);
    CHECK(json_at(j, 3) == json_get(j, "e"));
    CHECK(json_get(j, "zz") == NULL && json_get(j, "") == NULL);
    CHECK(json_get(a, "a") == NULL); /* not an object */
    CHECK(json_key_at(a, 0) == NULL);
    /* chaining through NULL */
    CHECK(json_number(json_get(json_get(j, "nope"), "x")) == 0.0);
    CHECK(json_len(NULL) == 0 && json_at(NULL, 0) == NULL && json_type(NULL) == JSON_NULL);
    CHECK(json_str(NULL, NULL) == NULL && json_bool(NULL) == 0);
    json_free(j);
    json_free(NULL);

    /* lookup in a big object (binary search over sorted keys) */
    char *big = malloc(200000);
    size_t n = 0;
    n += (size_t)sprintf(big + n, "{");
    for (int i = 0; i < 5000; i++)
        n += (size_t)sprintf(big + n, "%s\"k%d\":%d", i ? "," : "", (i * 7919) % 5000, i);
    n += (size_t)sprintf(big + n, "}");
    j = json_parse(big, n, NULL, 0);
    CHECK(j && json_len(j) == 5000);
    int ok = 1;
    for (int i = 0; i < 5000; i++) {
        char k[16];
        snprintf(k, sizeof(k), "k%d", (i * 7919) % 5000);
        int64_t v;
        if (json_int64(json_get(j, k), &v) || v != i)
            ok = 0;
    }
    CHECK(ok);
    json_free(j);
    /* the same with one key repeated far apart */
    n -= 1;
    n += (size_t)sprintf(big + n, ",\"k4321\":0}");
    EXPECT_FAIL_N(big, n, "duplicate key \"k4321\"");
    free(big);

    /* keys with embedded NUL differ from their prefix */
    j = parse("{\"a\\u0000b\": 1, \"a\": 2}");
    CHECK(j && json_key_len(j, 0) == 3 && json_number(json_get(j, "a")) == 2.0);
    json_free(j);

    EXPECT_FAIL("{\"a\":1,\"a\":2}", "duplicate key \"a\"");
    EXPECT_FAIL("{\"a\":1,\"b\":{\"x\":1,\"x\":1}}", "duplicate key \"x\"");
    /* the same key spelled two ways is still the same key */
    EXPECT_FAIL("{\"a\":1,\"\\u0061\":2}", "duplicate key");
    EXPECT_FAIL("{\"a\\u0000\":1,\"a\\u0000\":2}", "duplicate key \"a?\"");
    EXPECT_FAIL("{\"a\" 1}", "expected ':'");
    EXPECT_FAIL("{a:1}", "expected a string key");
    EXPECT_FAIL("{\"a\":1,}", "expected a string key");
    EXPECT_FAIL("{\"a\":1", "unterminated object");
    EXPECT_FAIL("{\"a\":1 \"b\":2}", "expected ',' or '}'");
    EXPECT_FAIL("{", "expected a string key");
    EXPECT_FAIL("[1 2]", "expected ',' or ']'");
    EXPECT_FAIL("[1,", "unexpected end of input");
    EXPECT_FAIL("[", "unexpected end of input");
    EXPECT_FAIL("]", "unexpected character ']'");
    EXPECT_FAIL("[1}", "expected ',' or ']'");
}

static void test_depth(void)
{
    char buf[1024];
    /* 128 levels of arrays parse, 129 do not */
    for (int depth = 128; depth <= 129; depth++) {
        size_t n = 0;
        for (int i = 0; i < depth; i++)
            buf[n++] = '[';
        for (int i = 0; i < depth; i++)
            buf[n++] = ']';
        char err[256] = "";
        struct json *j = json_parse(buf, n, err, sizeof(err));
        if (depth == 128)
            CHECK(j != NULL);
        else
            CHECK(!j && strstr(err, "nesting deeper than 128"));
        json_free(j);
    }
    /* a very deep unterminated input stops at the cap without recursing on */
    size_t big = 1 << 20;
    char *deep = malloc(big);
    memset(deep, '[', big);
    EXPECT_FAIL_N(deep, big, "nesting deeper");
    memset(deep, '{', big);
    EXPECT_FAIL_N(deep, big, "expected a string key");
    for (size_t i = 0; i + 5 <= big; i += 5)
        memcpy(deep + i, "{\"a\":", 5);
    EXPECT_FAIL_N(deep, big - big % 5, "nesting deeper");
    free(deep);
}

static void test_prefixes(void)
{
    /* Every strict prefix of a document (here not itself a document) fails
     * with a message and without reading past len (ASan checks this: each
     * prefix is copied into an exact-size buffer). */
    const char *doc = "{\"k\\u00e9\": [true, false, null, -1.5e+3, \"\\uD83D\\uDE00\xc3\xa9\"], \"z\": {}}";
    size_t len = strlen(doc);
    struct json *full = json_parse(doc, len, NULL, 0);
    CHECK(full != NULL);
    json_free(full);
    int all_fail = 1;
    for (size_t n = 0; n < len; n++) {
        char *cut = malloc(n ? n : 1);
        memcpy(cut, doc, n);
        char err[128];
        struct json *j = json_parse(cut, n, err, sizeof(err));
        if (j || !strstr(err, "offset ")) {
            all_fail = 0;
            fprintf(stderr, "prefix %zu parsed or had no message\n", n);
        }
        json_free(j);
        free(cut);
    }
    CHECK(all_fail);
    /* a tiny error buffer is truncated, not overrun; NULL err is fine */
    char small[8];
    CHECK(json_parse("[", 1, small, sizeof(small)) == NULL && strlen(small) < sizeof(small));
    CHECK(json_parse("[", 1, NULL, 0) == NULL);
    CHECK(json_parse(NULL, 0, small, sizeof(small)) == NULL);
}

int main(void)
{
    test_scalars();
    test_numbers();
    test_strings();
    test_containers();
    test_depth();
    test_prefixes();
    printf("test_json: %d checks, %d failed\n", n_checks, n_failed);
    return n_failed ? 1 : 0;
}
