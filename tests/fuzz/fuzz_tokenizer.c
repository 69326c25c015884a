/* fuzz_tokenizer.c: libFuzzer entry point for the byte-level BPE tokenizer.
 *
 * Any bytes must encode (with and without special-token parsing), and the
 * ids must decode the same whether all at once or streamed one token at a
 * time through tok_stream: the server streams, the tests compare whole
 * decodes, so a difference is a bug a client would see. The tokenizer is
 * the llama3 fixture, loaded once; INFERD_FUZZ_TOKENIZER names another
 * tokenizer.json (FUZZ_TOKENIZER_JSON, set by meson, is the default).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer.h"

#ifndef FUZZ_TOKENIZER_JSON
#define FUZZ_TOKENIZER_JSON "tests/fixtures/tokenizers/llama3.json"
#endif

static struct tokenizer *tok;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *path = getenv("INFERD_FUZZ_TOKENIZER");
    if (!path || !*path)
        path = FUZZ_TOKENIZER_JSON;
    char err[512];
    if (tokenizer_load_hf(path, &tok, err, sizeof(err)) != 0) {
        /* No tokenizer, no fuzzing: say why instead of passing vacuously. */
        fprintf(stderr, "fuzz_tokenizer: %s\n", err);
        abort();
    }
    return 0;
}

/* Decodes ids both ways and aborts when they differ. */
static void check_stream(const int32_t *ids, size_t n, int skip_special)
{
    size_t whole_len = 0;
    char *whole = tokenizer_decode(tok, ids, n, skip_special, &whole_len);
    if (!whole)
        abort();
    struct tok_stream *st = tok_stream_create(tok, skip_special);
    if (!st)
        abort();
    /* The pieces concatenated: never longer than the whole decode when
     * they agree, so compare as we go and stop at the first excess. */
    size_t at = 0, len = 0;
    for (size_t i = 0; i < n; i++) {
        const char *p = tok_stream_push(st, ids[i], &len);
        if (!p || len > whole_len - at || memcmp(p, whole + at, len) != 0)
            abort();
        at += len;
    }
    const char *p = tok_stream_finish(st, &len);
    if (!p || len != whole_len - at || memcmp(p, whole + at, len) != 0)
        abort();
    tok_stream_destroy(st);
    free(whole);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256];
    for (int parse_special = 0; parse_special <= 1; parse_special++) {
        int32_t *ids = NULL;
        size_t n = 0;
        /* A byte-level BPE has a token for every byte: encoding never fails
         * on content, only on memory. */
        if (tokenizer_encode(tok, (const char *)data, size, parse_special, parse_special, &ids,
                             &n, err, sizeof(err)) != 0)
            abort();
        for (size_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= tokenizer_n_vocab(tok))
                abort();
        check_stream(ids, n, 0);
        check_stream(ids, n, 1);
        free(ids);
    }
    return 0;
}
