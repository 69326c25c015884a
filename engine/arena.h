/* arena.h: a chunked bump allocator, freed in one call.
 *
 * For trees built from untrusted bytes (the JSON reader's documents, the
 * chat template's syntax tree and each render's values): freeing millions of
 * small nodes becomes a walk over a few chunks, and an optional byte cap lets
 * hostile input run out of budget instead of memory. An arena belongs to one
 * thread at a time; it keeps no global state.
 */
#ifndef INFERD_ARENA_H
#define INFERD_ARENA_H

#include <stddef.h>
#include <stdint.h>

/* cap for an arena limited only by malloc */
#define ARENA_NO_CAP SIZE_MAX

/* A plain value struct so that it can sit inside its owner; the fields are
 * for reading (error messages quote cap), only the functions below write. */
struct arena {
    struct arena_chunk *chunks; /* newest first */
    size_t used;                /* bytes handed out, rounding included */
    size_t cap;                 /* the most used may reach */
};

/* Makes a an empty arena that will hand out at most cap bytes. Allocates
 * nothing, so it cannot fail. */
void arena_init(struct arena *a, size_t cap);

/* Returns n bytes (uninitialised), aligned for max_align_t and rounded up
 * to a multiple of it (n == 0 still takes one unit). The memory is owned by
 * a and lives until arena_free. Returns NULL, leaving a as it was, when the
 * cap would be passed, when n is absurd (over 1 TiB), or when malloc fails. */
void *arena_alloc(struct arena *a, size_t n);

/* Frees every chunk at once; a is left empty with its cap, ready for reuse.
 * Pointers it handed out die here. */
void arena_free(struct arena *a);

#endif
