/* tokenizer_runner: the tokenizer behind a pipe, for tests/test_tokenizer.py.
 *
 *   tokenizer_runner TOKENIZER_JSON|MODEL.gguf encode [--add-special] [--no-parse-special] < records
 *   tokenizer_runner TOKENIZER_JSON decode [--skip-special] < records
 *   tokenizer_runner TOKENIZER_JSON bench < text
 *
 * A record is a decimal byte count, a newline, then that many bytes.
 * encode prints one line of space-separated ids per record; decode takes
 * records of space-separated ids and prints each result as a record. The
 * decode also runs the ids through the incremental stream and fails if
 * the concatenated pieces differ from the whole decode, or a piece ends
 * inside a UTF-8 character. bench encodes stdin whole several times and
 * prints MB/s.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/gguf.h"
#include "engine/tokenizer.h"

static char *read_record(size_t *len)
{
    char line[64];
    if (!fgets(line, sizeof(line), stdin))
        return NULL;
    char *end;
    unsigned long long n = strtoull(line, &end, 10);
    if (end == line || n > (1ull << 30))
        return NULL;
    char *buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, stdin) != n) {
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    *len = (size_t)n;
    return buf;
}

/* 1 when s[0..n) ends inside a UTF-8 sequence. */
static int ends_mid_char(const char *s, size_t n)
{
    size_t i = n, k = 0;
    while (i > 0 && k < 4 && ((unsigned char)s[i - 1] & 0xC0) == 0x80) {
        i--;
        k++;
    }
    if (i == 0)
        return k > 0 && n > 0 && ((unsigned char)s[0] & 0xC0) == 0x80 ? 0 : 0;
    unsigned char b = (unsigned char)s[i - 1];
    size_t need = b >= 0xF0 ? 3 : b >= 0xE0 ? 2 : b >= 0xC0 ? 1 : 0;
    return need > k;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: tokenizer_runner TOKENIZER_JSON encode|decode|bench [flags]\n");
        return 2;
    }
    int add_special = 0, parse_special = 1, skip_special = 0;
    for (int i = 3; i < argc; i++) {
        if (strcmp(argv[i], "--add-special") == 0)
            add_special = 1;
        else if (strcmp(argv[i], "--no-parse-special") == 0)
            parse_special = 0;
        else if (strcmp(argv[i], "--skip-special") == 0)
            skip_special = 1;
        else {
            fprintf(stderr, "tokenizer_runner: unknown flag %s\n", argv[i]);
            return 2;
        }
    }
    char err[512];
    struct tokenizer *t;
    size_t plen = strlen(argv[1]);
    if (plen > 5 && strcmp(argv[1] + plen - 5, ".gguf") == 0) {
        struct gguf_file *g;
        if (gguf_open(argv[1], &g, err, sizeof(err))) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
        int rc = tokenizer_load_gguf(g, argv[1], &t, err, sizeof(err));
        gguf_close(g);
        if (rc) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
    } else if (tokenizer_load_hf(argv[1], &t, err, sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    int rc = 0;
    size_t len;
    char *rec;
    if (strcmp(argv[2], "bench") == 0) {
        size_t cap = 1 << 20, n = 0;
        char *text = malloc(cap);
        size_t got;
        while (text && (got = fread(text + n, 1, cap - n, stdin)) > 0) {
            n += got;
            if (n == cap) {
                char *nt = realloc(text, cap *= 2);
                if (!nt)
                    free(text);
                text = nt;
            }
        }
        if (!text) {
            tokenizer_destroy(t);
            return 1;
        }
        double best = 1e30;
        size_t nid = 0;
        for (int r = 0; r < 5; r++) {
            int32_t *ids;
            double t0 = now_s();
            if (tokenizer_encode(t, text, n, 0, 1, &ids, &nid, err, sizeof(err))) {
                fprintf(stderr, "%s\n", err);
                rc = 1;
                break;
            }
            double dt = now_s() - t0;
            best = dt < best ? dt : best;
            free(ids);
        }
        printf("%zu bytes -> %zu tokens, best of 5: %.3f s, %.1f MB/s\n", n, nid, best,
               (double)n / best / 1e6);
        free(text);
    } else if (strcmp(argv[2], "encode") == 0) {
        while ((rec = read_record(&len))) {
            int32_t *ids;
            size_t n;
            if (tokenizer_encode(t, rec, len, add_special, parse_special, &ids, &n, err,
                                 sizeof(err))) {
                fprintf(stderr, "%s\n", err);
                free(rec);
                rc = 1;
                break;
            }
            for (size_t i = 0; i < n; i++)
                printf(i ? " %d" : "%d", ids[i]);
            printf("\n");
            free(ids);
            free(rec);
        }
    } else if (strcmp(argv[2], "decode") == 0) {
        while ((rec = read_record(&len))) {
            int32_t *ids = malloc((len / 2 + 1) * sizeof(int32_t));
            size_t n = 0;
            char *p = rec, *end;
            while (ids && *p) {
                long v = strtol(p, &end, 10);
                if (end == p)
                    break;
                ids[n++] = (int32_t)v;
                p = end;
            }
            size_t dl;
            char *text = ids ? tokenizer_decode(t, ids, n, skip_special, &dl) : NULL;
            struct tok_stream *s = tok_stream_create(t, skip_special);
            char *cat = malloc(dl + 1);
            size_t cl = 0;
            if (!text || !s || !cat) {
                rc = 1;
            } else {
                for (size_t i = 0; i < n && rc == 0; i++) {
                    size_t pl;
                    const char *piece = tok_stream_push(s, ids[i], &pl);
                    if (!piece || cl + pl > dl || ends_mid_char(piece, pl)) {
                        fprintf(stderr, "stream: bad piece after token %zu\n", i);
                        rc = 1;
                        break;
                    }
                    memcpy(cat + cl, piece, pl);
                    cl += pl;
                }
                size_t pl;
                const char *piece = rc ? NULL : tok_stream_finish(s, &pl);
                if (!rc && (!piece || cl + pl != dl || memcmp(cat, text, cl) != 0 ||
                            memcmp(piece, text + cl, pl) != 0)) {
                    fprintf(stderr, "stream: the pieces differ from the whole decode\n");
                    rc = 1;
                }
                if (!rc) {
                    printf("%zu\n", dl);
                    fwrite(text, 1, dl, stdout);
                }
            }
            tok_stream_destroy(s);
            free(cat);
            free(text);
            free(ids);
            free(rec);
            if (rc)
                break;
        }
    } else {
        fprintf(stderr, "tokenizer_runner: unknown mode %s\n", argv[2]);
        rc = 2;
    }
    tokenizer_destroy(t);
    return rc;
}
