/* arena.c: the chunked bump allocator of arena.h.
 *
 * Chunks of 64 KiB (one larger chunk for a larger request) are pushed on a
 * list and never revisited: the space left in an older chunk is abandoned
 * when a request does not fit, a waste bounded by one request per chunk.
 */
#include "engine/arena.h"

#include <stdlib.h>

#define ARENA_CHUNK_BYTES 65536

struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
    max_align_t data[];
};

void arena_init(struct arena *a, size_t cap)
{
    a->chunks = NULL;
    a->used = 0;
    a->cap = cap;
}

void *arena_alloc(struct arena *a, size_t n)
{
    /* No real request is this large; refusing it first keeps the rounding
     * and the chunk header sum below from overflowing. */
    if (n > ((size_t)1 << 40))
        return NULL;
    n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
    if (n == 0)
        n = sizeof(max_align_t);
    if (n > a->cap - a->used) /* used never passes cap, so no underflow */
        return NULL;
    struct arena_chunk *c = a->chunks;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > ARENA_CHUNK_BYTES ? n : ARENA_CHUNK_BYTES;
        c = malloc(sizeof(*c) + cap);
        if (!c)
            return NULL;
        c->used = 0;
        c->cap = cap;
        c->next = a->chunks;
        a->chunks = c;
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    a->used += n;
    return p;
}

void arena_free(struct arena *a)
{
    struct arena_chunk *c = a->chunks;
    while (c) {
        struct arena_chunk *next = c->next;
        free(c);
        c = next;
    }
    a->chunks = NULL;
    a->used = 0;
}
