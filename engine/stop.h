/* stop.h: streaming stop-string matcher over detokenized text.
 *
 * The request's text arrives in pieces as tokens are detokenized. The
 * matcher passes on what can safely be shown now, holds back any tail that
 * could still grow into a stop string, and reports when one has matched:
 * the stop string and everything after it are never passed on. One matcher
 * per request, used by one thread at a time (the event loop); no locking.
 *
 * Which stop string wins does not depend on how the text is cut into
 * pieces: the match is the occurrence that ends first in the text, and of
 * those ending at the same byte, the longest (it starts first). Matching is
 * on bytes; valid UTF-8 text and stop strings are therefore only ever cut
 * at character boundaries, as long as each piece is whole characters.
 */
#ifndef INFERD_STOP_H
#define INFERD_STOP_H

#include <stddef.h>

#define STOP_MAX 4 /* OpenAI's limit on stop strings per request */

struct stop_matcher;

/* A matcher for n stop strings (0 <= n <= STOP_MAX), each NUL-terminated
 * and non-empty; copied, so the caller keeps ownership of stops. Returns
 * NULL with a message for the client in err when the list is invalid, or
 * on out of memory. With n == 0 every piece passes straight through.
 * Caller owns the result. */
struct stop_matcher *stop_create(const char *const *stops, int n, char *err, size_t errlen);
/* Frees everything. Accepts NULL. */
void stop_destroy(struct stop_matcher *m);

/* Feeds one piece of len bytes. Sets *out / *out_len to the text that may
 * be emitted now (possibly empty); *out points into m or into piece and is
 * valid until the next call on m or until piece is freed, whichever comes
 * first. Returns the index of the stop string that matched (>= 0), after
 * which *out is the last text before it and further pieces are ignored
 * (empty output, same index); or -1 while no stop string has matched. */
int stop_feed(struct stop_matcher *m, const char *piece, size_t len,
              const char **out, size_t *out_len);

/* End of stream: sets *out / *out_len to the held-back tail, which can no
 * longer become a stop string (empty after a match). Valid until the next
 * call on m. Later feeds start from an empty tail. */
void stop_flush(struct stop_matcher *m, const char **out, size_t *out_len);

/* Index of the stop string that matched, or -1. */
int stop_matched(const struct stop_matcher *m);

#endif
