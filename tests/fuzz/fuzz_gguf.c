/* fuzz_gguf.c: libFuzzer entry point for the GGUF loader.
 *
 * The input is written to a memfd and opened through /proc/self/fd, so the
 * loader runs its real open/mmap path. Any bytes must load or fail with a
 * message naming the file; a loaded file is read through every getter.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine/gguf.h"

/* reads land here so the compiler keeps them */
static volatile uint8_t sink;

static void read_all(const struct gguf_file *f)
{
    for (size_t i = 0; i < gguf_n_keys(f); i++) {
        const char *k = gguf_key_name(f, (int64_t)i);
        if (gguf_find_key(f, k) != (int64_t)i)
            __builtin_trap();
        int64_t v;
        double d;
        int b;
        size_t len;
        (void)gguf_get_i64(f, k, &v);
        (void)gguf_get_f64(f, k, &d);
        (void)gguf_get_bool(f, k, &b);
        (void)gguf_get_str(f, k, &len);
        enum gguf_type et;
        uint64_t n;
        if (gguf_get_arr(f, k, &et, &n) == 0) {
            for (uint64_t j = 0; j < n && j < 64; j++) {
                const char *s = gguf_arr_str(f, k, j, &len);
                for (size_t c = 0; s && c < len; c++)
                    sink ^= (uint8_t)s[c];
                (void)gguf_arr_f64(f, k, j, &d);
                (void)gguf_arr_i64(f, k, j, &v);
            }
        }
    }
    for (size_t i = 0; i < gguf_n_tensors(f); i++) {
        const struct tensor *t = gguf_tensor(f, i);
        if (gguf_find_tensor(f, t->name) != t)
            __builtin_trap();
        /* first and last byte of every tensor must be readable */
        if (t->nbytes) {
            sink ^= ((const uint8_t *)t->data)[0];
            sink ^= ((const uint8_t *)t->data)[t->nbytes - 1];
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fd = memfd_create("fuzz.gguf", MFD_CLOEXEC);
    if (fd < 0)
        return 0;
    if (size && write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return 0;
    }
    char path[64], err[512];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    struct gguf_file *f = NULL;
    if (gguf_open(path, &f, err, sizeof(err)) == 0) {
        read_all(f);
        gguf_close(f);
    } else if (strncmp(err, path, strlen(path)) != 0) {
        __builtin_trap(); /* every failure names the file */
    }
    close(fd);
    return 0;
}
