/* jsonw.c: the response JSON writer (see jsonw.h). Any thread, one writer
 * per thread. */
#include "server/jsonw.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void jw_init(struct jw *w)
{
    memset(w, 0, sizeof(*w));
}

void jw_free(struct jw *w)
{
    free(w->buf);
    jw_init(w);
}

void jw_reset(struct jw *w)
{
    char *buf = w->buf;
    size_t cap = w->cap;
    jw_init(w);
    w->buf = buf;
    w->cap = cap;
    if (buf)
        buf[0] = 0;
}

int jw_ok(const struct jw *w)
{
    return !w->oom;
}

static int reserve(struct jw *w, size_t more)
{
    if (w->oom)
        return -1;
    if (w->len + more + 1 <= w->cap)
        return 0;
    size_t cap = w->cap ? w->cap : 256;
    while (cap < w->len + more + 1) {
        if (cap > SIZE_MAX / 2) {
            w->oom = 1;
            return -1;
        }
        cap *= 2;
    }
    char *nb = realloc(w->buf, cap);
    if (!nb) {
        w->oom = 1;
        return -1;
    }
    w->buf = nb;
    w->cap = cap;
    return 0;
}

void jw_raw(struct jw *w, const char *s, size_t n)
{
    if (reserve(w, n))
        return;
    memcpy(w->buf + w->len, s, n);
    w->len += n;
    w->buf[w->len] = 0;
}

static void put(struct jw *w, char c)
{
    if (reserve(w, 1))
        return;
    w->buf[w->len++] = c;
    w->buf[w->len] = 0;
}

/* The comma before a value or a key, unless it is a key's value. */
static void sep(struct jw *w)
{
    if (w->after_key) {
        w->after_key = 0;
        return;
    }
    if (w->depth > 0 && w->depth <= JW_MAX_DEPTH) {
        if (w->has_items[w->depth - 1])
            put(w, ',');
        w->has_items[w->depth - 1] = 1;
    }
}

static void open_(struct jw *w, char c)
{
    sep(w);
    put(w, c);
    w->depth++;
    if (w->depth <= JW_MAX_DEPTH)
        w->has_items[w->depth - 1] = 0;
}

static void close_(struct jw *w, char c)
{
    if (w->depth > 0)
        w->depth--;
    put(w, c);
}

void jw_obj(struct jw *w) { open_(w, '{'); }
void jw_obj_end(struct jw *w) { close_(w, '}'); }
void jw_arr(struct jw *w) { open_(w, '['); }
void jw_arr_end(struct jw *w) { close_(w, ']'); }

/* Length of the valid UTF-8 sequence at s (at most n bytes), or 0. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t len;
    unsigned min;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
        min = 0x80;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        min = 0x800;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        min = 0x10000;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    unsigned cp = c & (0x7f >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

static void str_body(struct jw *w, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    put(w, '"');
    size_t i = 0;
    while (i < n) {
        /* runs of plain ASCII are copied at once */
        size_t j = i;
        while (j < n && p[j] >= 0x20 && p[j] < 0x80 && p[j] != '"' && p[j] != '\\')
            j++;
        if (j > i) {
            jw_raw(w, s + i, j - i);
            i = j;
            continue;
        }
        unsigned c = p[i];
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            jw_raw(w, e, 2);
            i++;
        } else if (c < 0x20) {
            const char *e = c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t" : NULL;
            if (e) {
                jw_raw(w, e, 2);
            } else {
                char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
                jw_raw(w, u, 6);
            }
            i++;
        } else {
            size_t l = utf8_len(p + i, n - i);
            if (l) {
                jw_raw(w, s + i, l);
                i += l;
            } else {
                jw_raw(w, "\xef\xbf\xbd", 3); /* U+FFFD, as from_utf8_lossy */
                i++;
            }
        }
    }
    put(w, '"');
}

void jw_key(struct jw *w, const char *key)
{
    sep(w);
    str_body(w, key, strlen(key));
    put(w, ':');
    w->after_key = 1;
}

void jw_keyn(struct jw *w, const char *key, size_t n)
{
    sep(w);
    str_body(w, key ? key : "", key ? n : 0);
    put(w, ':');
    w->after_key = 1;
}

void jw_strn(struct jw *w, const char *s, size_t n)
{
    sep(w);
    str_body(w, s ? s : "", s ? n : 0);
}

void jw_str(struct jw *w, const char *s)
{
    jw_strn(w, s, s ? strlen(s) : 0);
}

void jw_int(struct jw *w, int64_t v)
{
    char b[32];
    int n = snprintf(b, sizeof(b), "%" PRId64, v);
    sep(w);
    jw_raw(w, b, (size_t)n);
}

void jw_num(struct jw *w, double v)
{
    if (v != v || v > 1.7976931348623157e308 || v < -1.7976931348623157e308) {
        jw_null(w);
        return;
    }
    char b[40];
    int n = 0;
    /* the shortest of %.{9..17}g that reads back as the same double */
    for (int prec = 9; prec <= 17; prec++) {
        n = snprintf(b, sizeof(b), "%.*g", prec, v);
        if (strtod(b, NULL) == v)
            break;
    }
    /* keep it a JSON number that Python reads as a float */
    if (!strpbrk(b, ".eEn") && n < (int)sizeof(b) - 3) {
        b[n++] = '.';
        b[n++] = '0';
        b[n] = 0;
    }
    sep(w);
    jw_raw(w, b, (size_t)n);
}

void jw_bool(struct jw *w, int v)
{
    sep(w);
    jw_raw(w, v ? "true" : "false", v ? 4 : 5);
}

void jw_null(struct jw *w)
{
    sep(w);
    jw_raw(w, "null", 4);
}
