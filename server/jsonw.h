/* jsonw.h: a JSON writer into a growable buffer, for response bodies.
 *
 * The API layer writes every response (and every stream chunk) straight
 * into one buffer in the order the wire format wants its fields, with
 * commas placed by the writer. Strings are escaped for JSON and any
 * invalid UTF-8 becomes U+FFFD, so text from the model or a client can
 * never break the document. Out of memory is remembered and reported by
 * jw_ok, so callers check once at the end. One writer per thread; no
 * locking.
 */
#ifndef INFERD_JSONW_H
#define INFERD_JSONW_H

#include <stddef.h>
#include <stdint.h>

#define JW_MAX_DEPTH 32

struct jw {
    char *buf;    /* NUL-terminated once anything was written */
    size_t len, cap;
    int oom;
    int depth;
    unsigned char has_items[JW_MAX_DEPTH]; /* a comma is due before the next item */
    int after_key;
};

/* An empty writer (no allocation until the first write). */
void jw_init(struct jw *w);
/* Frees the buffer. */
void jw_free(struct jw *w);
/* Empties the buffer, keeping its memory. */
void jw_reset(struct jw *w);
/* 1 when every write so far succeeded. */
int jw_ok(const struct jw *w);

void jw_obj(struct jw *w);     /* { */
void jw_obj_end(struct jw *w); /* } */
void jw_arr(struct jw *w);     /* [ */
void jw_arr_end(struct jw *w); /* ] */
/* A member name inside an object; the next value is its value. */
void jw_key(struct jw *w, const char *key);
/* A member name of n bytes (may hold NULs or invalid UTF-8: escaped and
 * replaced as strings are). */
void jw_keyn(struct jw *w, const char *key, size_t n);
void jw_str(struct jw *w, const char *s);             /* NUL-terminated */
void jw_strn(struct jw *w, const char *s, size_t n);  /* n bytes, NULs escaped */
void jw_int(struct jw *w, int64_t v);
/* A finite double, shortest form that reads back the same (%.17g at
 * worst); NaN and infinities, which JSON cannot hold, become null. */
void jw_num(struct jw *w, double v);
void jw_bool(struct jw *w, int v);
void jw_null(struct jw *w);
/* Raw bytes appended as they are (a separator is not added): for SSE
 * framing around a document. */
void jw_raw(struct jw *w, const char *s, size_t n);

#endif
