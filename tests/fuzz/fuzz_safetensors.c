/* fuzz_safetensors.c: libFuzzer entry point for the safetensors loader.
 *
 * The first input byte picks a mode: even, the rest is model.safetensors;
 * odd, the rest is model.safetensors.index.json beside two fixed valid
 * shards. Files go into one temporary directory made at start-up. Any bytes
 * must load or fail with a message naming a path; never crash.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/safetensors.h"

static char dir[64]; /* the harness's one directory, made once */
static volatile uint8_t sink; /* reads land here so the compiler keeps them */

static void put(const char *name, const void *b, size_t n)
{
    char p[128];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    unlink(p);
    FILE *f = fopen(p, "wb");
    if (!f)
        abort();
    if (n && fwrite(b, 1, n, f) != n)
        abort();
    fclose(f);
}

static void put_st(const char *name, const char *hdr, const char *data, size_t n)
{
    uint8_t buf[256];
    size_t h = strlen(hdr);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)((uint64_t)h >> (8 * i));
    memcpy(buf + 8, hdr, h);
    memcpy(buf + 8 + h, data, n);
    put(name, buf, 8 + h + n);
}

static void cleanup(void)
{
    static const char *const names[] = {"model.safetensors", "model.safetensors.index.json",
                                        "a.safetensors", "b.safetensors"};
    char p[128];
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
        unlink(p);
    }
    rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    snprintf(dir, sizeof(dir), "/tmp/fuzz_st_XXXXXX");
    if (!mkdtemp(dir))
        abort();
    atexit(cleanup);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    char p[128];
    if (data[0] & 1) {
        snprintf(p, sizeof(p), "%s/model.safetensors", dir);
        unlink(p);
        put_st("a.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
               "abcd", 4);
        put_st("b.safetensors", "{\"y\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}",
               "abcd", 4);
        put("model.safetensors.index.json", data + 1, size - 1);
    } else {
        put("model.safetensors", data + 1, size - 1);
    }
    char err[512];
    struct st_model *m = NULL;
    if (st_open(dir, &m, err, sizeof(err)) == 0) {
        for (size_t i = 0; i < st_n_tensors(m); i++) {
            const struct tensor *t = st_tensor(m, i);
            if (st_find(m, t->name) != t)
                __builtin_trap();
            if (t->nbytes) {
                sink ^= ((const uint8_t *)t->data)[0];
                sink ^= ((const uint8_t *)t->data)[t->nbytes - 1];
            }
        }
        st_close(m);
    } else if (strncmp(err, dir, strlen(dir)) != 0) {
        __builtin_trap(); /* every failure names a path in the directory */
    }
    return 0;
}
