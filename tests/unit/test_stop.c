/* test_stop.c: the stop-string matcher through its header: matches split
 * over 1-byte pieces and over piece boundaries, overlapping stop strings,
 * near misses released later, flush at end, UTF-8 text, pass-through, and
 * that the outcome does not depend on how the text is cut. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/stop.h"

static int failures;
#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); failures++; } } while (0)

/* Feeds text cut into pieces of the given sizes (the last repeats), then
 * flushes unless a stop matched. Returns the matched index; the emitted
 * text goes to got (NUL-terminated). */
static int run(const char *const *stops, int n, const char *text, const size_t *sizes,
               int n_sizes, char *got, size_t got_cap)
{
    char err[128];
    struct stop_matcher *m = stop_create(stops, n, err, sizeof(err));
    if (!m) {
        fprintf(stderr, "stop_create: %s\n", err);
        failures++;
        return -2;
    }
    size_t pos = 0, glen = 0, tlen = strlen(text);
    int k = 0, res = -1;
    const char *out;
    size_t out_len;
    while (pos < tlen) {
        size_t sz = sizes[k < n_sizes - 1 ? k : n_sizes - 1];
        k++;
        if (sz > tlen - pos)
            sz = tlen - pos;
        /* A private copy, so a matcher that kept pointers into old
         * pieces would show up under ASan. */
        char *piece = malloc(sz + 1);
        memcpy(piece, text + pos, sz);
        res = stop_feed(m, piece, sz, &out, &out_len);
        CHECK(glen + out_len < got_cap);
        memcpy(got + glen, out, out_len);
        glen += out_len;
        free(piece);
        pos += sz;
        if (res >= 0)
            break;
    }
    stop_flush(m, &out, &out_len);
    if (res >= 0)
        CHECK(out_len == 0);
    memcpy(got + glen, out, out_len);
    glen += out_len;
    got[glen] = 0;
    CHECK(stop_matched(m) == res);
    stop_destroy(m);
    return res;
}

static void expect_at(const char *const *stops, int n, const char *text, const size_t *sizes,
                   int n_sizes, int want_idx, const char *want_text, int line)
{
    char got[1024];
    int r = run(stops, n, text, sizes, n_sizes, got, sizeof(got));
    if (r != want_idx || strcmp(got, want_text) != 0) {
        fprintf(stderr, "line %d: got (%d, \"%s\"), want (%d, \"%s\")\n", line, r, got,
                want_idx, want_text);
        failures++;
    }
}

/* Every way of cutting short texts into 1..3-byte pieces must agree. */
static void expect_all_cuts_at(const char *const *stops, int n, const char *text, int want_idx,
                            const char *want_text, int line)
{
    static const size_t one[] = {1}, two[] = {2}, three[] = {3}, big[] = {1000},
                        mix1[] = {1, 2, 3}, mix2[] = {3, 1, 2, 1}, mix3[] = {2, 3, 1, 1, 4};
    expect_at(stops, n, text, one, 1, want_idx, want_text, line);
    expect_at(stops, n, text, two, 1, want_idx, want_text, line);
    expect_at(stops, n, text, three, 1, want_idx, want_text, line);
    expect_at(stops, n, text, big, 1, want_idx, want_text, line);
    expect_at(stops, n, text, mix1, 3, want_idx, want_text, line);
    expect_at(stops, n, text, mix2, 4, want_idx, want_text, line);
    expect_at(stops, n, text, mix3, 5, want_idx, want_text, line);
}

#define expect(...) expect_at(__VA_ARGS__, __LINE__)
#define expect_all_cuts(...) expect_all_cuts_at(__VA_ARGS__, __LINE__)

int main(void)
{
    char err[128];

    /* Validation. */
    const char *five[] = {"a", "b", "c", "d", "e"};
    CHECK(stop_create(five, 5, err, sizeof(err)) == NULL && strstr(err, "at most 4"));
    const char *empty[] = {"a", ""};
    CHECK(stop_create(empty, 2, err, sizeof(err)) == NULL && strstr(err, "stop string 1 is empty"));
    const char *null1[] = {NULL};
    CHECK(stop_create(null1, 1, err, sizeof(err)) == NULL && strstr(err, "empty"));
    CHECK(stop_create(five, -1, err, sizeof(err)) == NULL);

    /* The held-back tail, step by step: "Hello</" then "s>" with "</s>". */
    {
        const char *s[] = {"</s>"};
        struct stop_matcher *m = stop_create(s, 1, err, sizeof(err));
        const char *out;
        size_t n;
        CHECK(stop_feed(m, "Hello<", 6, &out, &n) == -1 && n == 5 && !memcmp(out, "Hello", 5));
        CHECK(stop_feed(m, "/", 1, &out, &n) == -1 && n == 0);
        CHECK(stop_feed(m, "s", 1, &out, &n) == -1 && n == 0);
        CHECK(stop_feed(m, ">tail", 5, &out, &n) == 0 && n == 0);
        CHECK(stop_matched(m) == 0);
        /* After a match everything is dropped. */
        CHECK(stop_feed(m, "more", 4, &out, &n) == 0 && n == 0);
        stop_flush(m, &out, &n);
        CHECK(n == 0);
        stop_destroy(m);
    }
    /* A near miss is held, then released once it cannot match. */
    {
        const char *s[] = {"</s>"};
        struct stop_matcher *m = stop_create(s, 1, err, sizeof(err));
        const char *out;
        size_t n;
        CHECK(stop_feed(m, "a</", 3, &out, &n) == -1 && n == 1 && out[0] == 'a');
        CHECK(stop_feed(m, "b", 1, &out, &n) == -1 && n == 3 && !memcmp(out, "</b", 3));
        /* Held tail at the end of the stream is flushed. */
        CHECK(stop_feed(m, "</s", 3, &out, &n) == -1 && n == 0);
        stop_flush(m, &out, &n);
        CHECK(n == 3 && !memcmp(out, "</s", 3));
        stop_destroy(m);
    }

    const char *eos[] = {"</s>"};
    expect_all_cuts(eos, 1, "The answer is 42.</s> and more", 0, "The answer is 42.");
    expect_all_cuts(eos, 1, "</s>", 0, "");
    expect_all_cuts(eos, 1, "no stop here </ s> <</s", -1, "no stop here </ s> <</s");
    /* Near misses that overlap the real match: "<<</s>" must emit "<<". */
    expect_all_cuts(eos, 1, "x<<</s>", 0, "x<<");
    const char *aab[] = {"aab"};
    expect_all_cuts(aab, 1, "aaaab", 0, "aa");
    expect_all_cuts(aab, 1, "aaaa", -1, "aaaa");

    /* One stop string a prefix of another: the shorter ends first. */
    const char *pre[] = {"Observation:", "Obs"};
    expect_all_cuts(pre, 2, "Thought. Observation: x", 1, "Thought. ");
    const char *pre2[] = {"ab", "abc"};
    expect_all_cuts(pre2, 2, "xxabc", 0, "xx");
    /* At the same end the longer one (earlier start) wins. */
    const char *suf[] = {"b", "ab"};
    expect_all_cuts(suf, 2, "xab", 1, "x");
    /* The first to end wins, whatever the list order and the cuts. */
    const char *ov[] = {"abcd", "bc"};
    expect_all_cuts(ov, 2, "zabcd", 1, "za");
    /* Four strings, the last one matches. */
    const char *four[] = {"STOP", "END", "###", "\n\nUser:"};
    expect_all_cuts(four, 4, "Sure.\n\nUser: hi", 3, "Sure.");
    expect_all_cuts(four, 4, "ST EN ## \n\nUse", -1, "ST EN ## \n\nUse");

    /* UTF-8: multibyte text and stop strings, cut between characters. */
    const char *jp[] = {"。終", "🛑"};
    static const size_t by_char[] = {3, 3, 3, 3, 3, 3, 3};
    expect(jp, 2, "日本語。終わり", by_char, 7, 0, "日本語");
    expect(jp, 2, "日本語。です", by_char, 7, -1, "日本語。です");
    expect_all_cuts(jp, 2, "é🛑ü", 1, "é");
    expect_all_cuts(jp, 2, "ü。ü", -1, "ü。ü");

    /* No stop strings: every piece passes straight through. */
    {
        struct stop_matcher *m = stop_create(NULL, 0, err, sizeof(err));
        CHECK(m != NULL);
        const char *out;
        size_t n;
        const char *piece = "</s> anything";
        CHECK(stop_feed(m, piece, strlen(piece), &out, &n) == -1 && out == piece &&
              n == strlen(piece));
        stop_flush(m, &out, &n);
        CHECK(n == 0);
        stop_destroy(m);
    }
    expect_all_cuts(NULL, 0, "plain text", -1, "plain text");
    stop_destroy(NULL);

    if (failures) {
        fprintf(stderr, "test_stop: %d failures\n", failures);
        return 1;
    }
    printf("test_stop: ok\n");
    return 0;
}
