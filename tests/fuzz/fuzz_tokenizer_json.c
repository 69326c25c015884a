/* fuzz_tokenizer_json.c: libFuzzer entry point for the tokenizer.json
 * loader, which reads files users download.
 *
 * Any bytes must load or fail with a message, never crash, leak or hang;
 * a tokenizer that loads must encode and decode a fixed text (with its
 * special tokens parsed) without crashing, and its stream must agree with
 * its whole decode.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine/tokenizer.h"

static const char text[] = "Hello, world! \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\x98\x80 <s> 123\n\t x";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fd = memfd_create("tokenizer.json", 0);
    if (fd < 0)
        return 0;
    if (write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return 0;
    }
    char path[64], err[512];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    struct tokenizer *t;
    if (tokenizer_load_hf(path, &t, err, sizeof(err)) == 0) {
        int32_t *ids;
        size_t n;
        if (tokenizer_encode(t, text, sizeof(text) - 1, 1, 1, &ids, &n, err, sizeof(err)) == 0) {
            size_t dl;
            char *d = tokenizer_decode(t, ids, n, 0, &dl);
            struct tok_stream *s = tok_stream_create(t, 0);
            size_t got = 0;
            for (size_t i = 0; s && d && i <= n; i++) {
                size_t pl;
                const char *p = i < n ? tok_stream_push(s, ids[i], &pl) : tok_stream_finish(s, &pl);
                if (!p)
                    break;
                if (got + pl > dl || memcmp(d + got, p, pl) != 0)
                    __builtin_trap(); /* the stream must add up to the decode */
                got += pl;
            }
            if (d && s && got != dl)
                __builtin_trap();
            tok_stream_destroy(s);
            free(d);
            free(ids);
        }
        tokenizer_destroy(t);
    }
    close(fd);
    return 0;
}
