/* name_index.c: sort, duplicate check and binary search over a borrowed
 * name -> index table. No allocation, no state of its own.
 */
#include "engine/name_index.h"

#include <stdlib.h>
#include <string.h>

static int ni_cmp(const void *a, const void *b)
{
    return strcmp(((const struct ni_entry *)a)->name, ((const struct ni_entry *)b)->name);
}

size_t ni_sort(struct ni_entry *v, size_t n)
{
    if (n == 0)
        return 0;
    qsort(v, n, sizeof(*v), ni_cmp);
    for (size_t i = 1; i < n; i++)
        if (strcmp(v[i - 1].name, v[i].name) == 0)
            return i;
    return 0;
}

const struct ni_entry *ni_find(const struct ni_entry *v, size_t n, const char *name)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(v[mid].name, name);
        if (c == 0)
            return &v[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}
