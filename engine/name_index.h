/* name_index.h: a sorted name -> index table, for finding a key or tensor
 * of a model file by name in O(log n) and for spotting duplicate names.
 * The table is a plain array the caller allocates and fills; the names are
 * borrowed (owned by whoever owns the items). Loading thread builds it;
 * read-only (any thread) afterwards.
 */
#ifndef INFERD_NAME_INDEX_H
#define INFERD_NAME_INDEX_H

#include <stddef.h>

struct ni_entry {
    const char *name; /* borrowed, NUL-terminated */
    size_t idx;       /* into the caller's items */
};

/* Sorts v[0..n) by name (strcmp order). Returns i > 0 where v[i - 1] and
 * v[i] have the same name (a duplicate to report), or 0 when all names are
 * unique. */
size_t ni_sort(struct ni_entry *v, size_t n);

/* The entry named name in v[0..n), sorted by ni_sort, or NULL. */
const struct ni_entry *ni_find(const struct ni_entry *v, size_t n, const char *name);

#endif
