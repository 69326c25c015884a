/* stop.c: the stop-string matcher. The held-back tail is never longer than
 * the longest stop string minus one byte (plus the piece being looked at),
 * so scanning it again for every piece costs O(piece * stops * stop len). */
#include "engine/stop.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Growth of the buffer mid-stream: out of memory is fatal (the project's
 * rule), reported with the place it happened. */
#define stop_xrealloc(p, n) stop_xrealloc_at((p), (n), __FILE__, __LINE__)
static void *stop_xrealloc_at(void *p, size_t n, const char *file, int line)
{
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "%s:%d: out of memory (%zu bytes)\n", file, line, n);
        abort();
    }
    return q;
}

struct stop_matcher {
    char *stops[STOP_MAX];
    size_t lens[STOP_MAX];
    int n;
    int matched;     /* index of the stop string that matched, or -1 */
    char *buf;       /* [0, emitted): handed out last call; [emitted, len): held */
    size_t len, cap;
    size_t emitted;
};

struct stop_matcher *stop_create(const char *const *stops, int n, char *err, size_t errlen)
{
    if (n < 0 || n > STOP_MAX) {
        snprintf(err, errlen, "stop: at most %d stop strings are allowed, got %d", STOP_MAX, n);
        return NULL;
    }
    for (int i = 0; i < n; i++)
        if (!stops[i] || !stops[i][0]) {
            snprintf(err, errlen, "stop: stop string %d is empty", i);
            return NULL;
        }
    struct stop_matcher *m = calloc(1, sizeof(*m));
    if (!m)
        goto oom;
    m->matched = -1;
    for (int i = 0; i < n; i++) {
        m->lens[i] = strlen(stops[i]);
        m->stops[i] = malloc(m->lens[i] + 1);
        if (!m->stops[i])
            goto oom;
        memcpy(m->stops[i], stops[i], m->lens[i] + 1);
        m->n = i + 1;
    }
    return m;
oom:
    snprintf(err, errlen, "stop: out of memory");
    stop_destroy(m);
    return NULL;
}

void stop_destroy(struct stop_matcher *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->n; i++)
        free(m->stops[i]);
    free(m->buf);
    free(m);
}

int stop_matched(const struct stop_matcher *m)
{
    return m->matched;
}

/* Drops the text handed out by the previous call. */
static void compact(struct stop_matcher *m)
{
    if (m->emitted > 0) {
        memmove(m->buf, m->buf + m->emitted, m->len - m->emitted);
        m->len -= m->emitted;
        m->emitted = 0;
    }
}

int stop_feed(struct stop_matcher *m, const char *piece, size_t len,
              const char **out, size_t *out_len)
{
    compact(m);
    *out = m->buf ? m->buf : ""; /* never NULL, even before any text */
    *out_len = 0;
    if (m->matched >= 0)
        return m->matched;
    if (m->n == 0) {
        *out = piece;
        *out_len = len;
        return -1;
    }
    if (m->len + len > m->cap) {
        m->cap = (m->len + len) * 2;
        m->buf = stop_xrealloc(m->buf, m->cap);
    }
    if (len > 0)
        memcpy(m->buf + m->len, piece, len);
    size_t old = m->len;
    m->len += len;
    *out = m->buf;

    /* Every occurrence ending inside the old tail was ruled out by the
     * previous call, so only ends in the new bytes are tried, in order:
     * the first end wins, and at one end the longest string. */
    for (size_t end = old + 1; end <= m->len; end++) {
        int best = -1;
        for (int i = 0; i < m->n; i++) {
            size_t l = m->lens[i];
            if (l <= end && memcmp(m->buf + end - l, m->stops[i], l) == 0 &&
                (best < 0 || l > m->lens[best]))
                best = i;
        }
        if (best >= 0) {
            m->matched = best;
            *out_len = end - m->lens[best];
            m->emitted = m->len; /* the rest is dropped with the output */
            return best;
        }
    }

    /* Hold back the longest tail that is a proper prefix of a stop string. */
    size_t hold = 0;
    for (int i = 0; i < m->n; i++) {
        size_t l = m->lens[i] - 1 < m->len ? m->lens[i] - 1 : m->len;
        for (; l > hold; l--)
            if (memcmp(m->buf + m->len - l, m->stops[i], l) == 0) {
                hold = l;
                break;
            }
    }
    m->emitted = m->len - hold;
    *out_len = m->emitted;
    return -1;
}

void stop_flush(struct stop_matcher *m, const char **out, size_t *out_len)
{
    compact(m);
    *out = m->buf ? m->buf : "";
    *out_len = m->matched >= 0 ? 0 : m->len;
    m->emitted = m->len;
}
