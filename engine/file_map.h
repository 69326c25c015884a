/* file_map.h: model files brought into memory for the loaders.
 *
 * A weights file is mapped whole, read-only; a small side file (a shard
 * index) is read whole into the heap. Both refuse anything but a regular
 * file, and every failure is written as "<path>: <what went wrong>".
 * Called from the loading thread.
 */
#ifndef INFERD_FILE_MAP_H
#define INFERD_FILE_MAP_H

#include <stddef.h>
#include <stdint.h>

/* A whole file, mapped PROT_READ and MAP_PRIVATE. */
struct fm_file {
    const uint8_t *data; /* NULL when the file is empty (nothing mapped) */
    size_t size;
};

/* Opens, checks and maps path. On success fills *fm, which the caller owns
 * and releases with fm_close; the descriptor is closed before return. On
 * failure returns -1 with a message in err and leaves *fm zeroed. The size
 * is not judged here: callers check it against their format's minimum. */
int fm_open(const char *path, struct fm_file *fm, char *err, size_t errlen);
/* Unmaps and zeroes *fm. Accepts a zeroed (or already closed) fm. */
void fm_close(struct fm_file *fm);

/* Reads path whole into a malloc'd buffer (caller frees), refusing files
 * over max_bytes (a whole number of MiB, for the message). Sets *len; the
 * buffer is not NUL-terminated. On failure returns NULL with err set. */
char *fm_read(const char *path, unsigned long long max_bytes, size_t *len, char *err,
              size_t errlen);

#endif
