/* file_map.c: open, check and map (or read) a model file, with messages
 * that name the file. Loading thread only; no state of its own.
 */
#include "engine/file_map.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/load_error.h"

/* Opens path read-only and checks that it is a regular file. Returns the
 * descriptor (the caller closes it) with *sb filled, or -1 with err set. */
static int fm_open_regular(const char *path, struct stat *sb, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return le_err(err, errlen, path, "cannot open: %s", strerror(errno));
    if (fstat(fd, sb) != 0) {
        le_err(err, errlen, path, "cannot stat: %s", strerror(errno));
        goto fail;
    }
    if (!S_ISREG(sb->st_mode)) {
        le_err(err, errlen, path, "not a regular file");
        goto fail;
    }
    return fd;

fail:
    close(fd);
    return -1;
}

int fm_open(const char *path, struct fm_file *fm, char *err, size_t errlen)
{
    *fm = (struct fm_file){NULL, 0};
    struct stat sb;
    int fd = fm_open_regular(path, &sb, err, errlen);
    if (fd < 0)
        return -1;
    if ((unsigned long long)sb.st_size > SIZE_MAX) {
        le_err(err, errlen, path, "file too large to map");
        goto fail;
    }
    /* mmap refuses length 0; an empty file is left to the caller's size check */
    if (sb.st_size > 0) {
        void *p = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            le_err(err, errlen, path, "cannot mmap: %s", strerror(errno));
            goto fail;
        }
        fm->data = p;
        fm->size = (size_t)sb.st_size;
    }
    close(fd);
    return 0;

fail:
    close(fd);
    return -1;
}

void fm_close(struct fm_file *fm)
{
    if (fm->data)
        munmap((void *)fm->data, fm->size);
    *fm = (struct fm_file){NULL, 0};
}

char *fm_read(const char *path, unsigned long long max_bytes, size_t *len, char *err,
              size_t errlen)
{
    char *buf = NULL;
    struct stat sb;
    int fd = fm_open_regular(path, &sb, err, errlen);
    if (fd < 0)
        return NULL;
    if ((unsigned long long)sb.st_size > max_bytes) {
        le_err(err, errlen, path, "file is %lld bytes, over the %llu MiB limit",
               (long long)sb.st_size, max_bytes >> 20);
        goto fail;
    }
    size_t n = (size_t)sb.st_size, got = 0;
    buf = malloc(n ? n : 1);
    if (!buf) {
        le_err(err, errlen, path, "out of memory");
        goto fail;
    }
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            le_err(err, errlen, path, "read failed: %s", strerror(errno));
            goto fail;
        }
        if (r == 0) {
            le_err(err, errlen, path, "file shrank while being read");
            goto fail;
        }
        got += (size_t)r;
    }
    close(fd);
    *len = n;
    return buf;

fail:
    free(buf);
    close(fd);
    return NULL;
}
