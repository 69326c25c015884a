/* json.c: a strict RFC 8259 reader for the JSON inside model files.
 *
 * Parses config.json, safetensors headers and index files, which come from
 * untrusted downloads: UTF-8 is validated, escapes decoded, duplicate keys
 * and deep nesting refused. The tree lives in one arena freed by json_free.
 * Runs on whichever thread loads the model; it keeps no global state.
 */
#include "engine/json.h"

#include "engine/arena.h"

#include <errno.h>
#include <locale.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Deep enough for any real config or tokenizer file, shallow enough that the
 * recursive descent cannot exhaust the stack on hostile input. */
#define JSON_MAX_DEPTH 128

struct json_member_key {
    const char *s; /* NUL-terminated, may hold embedded NULs */
    size_t len;
};

struct json {
    enum json_type type;
    int is_int;           /* number: exact integer in int64 range */
    union {
        int b;
        struct {
            double d;
            int64_t i;
        } num;
        struct {
            const char *s;
            size_t len;
        } str;
        struct {
            struct json **items;          /* n values, file order */
            struct json_member_key *keys; /* objects: n keys, file order */
            size_t *sorted;               /* objects: member indices by key */
            size_t n;
        } agg;
    } u;
};

/* Every node, string and child array comes from the document's arena, so
 * freeing a tree of millions of nodes (a large safetensors header) is a walk
 * over a few chunks rather than a walk over the tree. */
struct json_doc {
    struct arena arena; /* uncapped: the input's size bounds it */
    struct json root;
};

/* ----------------------------------------------------------------- parser */

struct json_parser {
    const unsigned char *s;
    size_t len, pos;
    int max_depth;
    struct json_doc *doc;
    char *err;
    size_t errlen;
    int failed;
    /* Values of arrays and objects being parsed, and their keys; a finished
     * aggregate copies its run off the top into the arena. */
    struct json **stack;
    size_t stack_n, stack_cap;
    struct json_member_key *kstack;
    size_t kstack_n, kstack_cap;
    char *sbuf; /* decoded string scratch */
    size_t sbuf_cap;
    locale_t c_locale; /* strtod must not see the process locale */
};

static void perr(struct json_parser *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void perr(struct json_parser *p, const char *fmt, ...)
{
    if (p->failed)
        return;
    p->failed = 1;
    if (!p->err || p->errlen == 0)
        return;
    int n = snprintf(p->err, p->errlen, "offset %zu: ", p->pos);
    if (n < 0 || (size_t)n >= p->errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err + n, p->errlen - (size_t)n, fmt, ap);
    va_end(ap);
}

static void skip_ws(struct json_parser *p)
{
    while (p->pos < p->len) {
        unsigned char c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            break;
        p->pos++;
    }
}

static int grow(void **buf, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t nc = *cap ? *cap : 16;
    while (nc < need) {
        if (nc > SIZE_MAX / 2 / elem)
            return -1;
        nc *= 2;
    }
    void *nb = realloc(*buf, nc * elem);
    if (!nb)
        return -1;
    *buf = nb;
    *cap = nc;
    return 0;
}

static struct json *new_node(struct json_parser *p, enum json_type t)
{
    struct json *v = arena_alloc(&p->doc->arena, sizeof(*v));
    if (!v) {
        perr(p, "out of memory");
        return NULL;
    }
    memset(v, 0, sizeof(*v));
    v->type = t;
    return v;
}

static int sbuf_put(struct json_parser *p, size_t *n, const void *b, size_t k)
{
    if (grow((void **)&p->sbuf, &p->sbuf_cap, *n + k + 1, 1)) {
        perr(p, "out of memory");
        return -1;
    }
    memcpy(p->sbuf + *n, b, k);
    *n += k;
    return 0;
}

/* Length of the well-formed UTF-8 sequence at s[0..avail), or 0. Refuses
 * overlong forms, surrogates and code points above U+10FFFF (RFC 3629). */
static size_t utf8_seq(const unsigned char *s, size_t avail)
{
    unsigned char c = s[0];
    if (c < 0x80)
        return 1;
    size_t n;
    unsigned char lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf)
        n = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        if (c == 0xe0)
            lo = 0xa0; /* overlong */
        else if (c == 0xed)
            hi = 0x9f; /* surrogates */
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        if (c == 0xf0)
            lo = 0x90; /* overlong */
        else if (c == 0xf4)
            hi = 0x8f; /* above U+10FFFF */
    } else
        return 0;
    if (avail < n)
        return 0;
    if (s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
    return n;
}

static int hex4(struct json_parser *p, uint32_t *out)
{
    if (p->len - p->pos < 4) {
        perr(p, "truncated \\u escape");
        return -1;
    }
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char c = p->s[p->pos + i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= c - '0';
        else if (c >= 'a' && c <= 'f')
            v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            v |= c - 'A' + 10;
        else {
            perr(p, "bad hex digit in \\u escape");
            return -1;
        }
    }
    p->pos += 4;
    *out = v;
    return 0;
}

static size_t utf8_encode(uint32_t cp, unsigned char *o)
{
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xc0 | (cp >> 6));
        o[1] = (unsigned char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xe0 | (cp >> 12));
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (unsigned char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (unsigned char)(0xf0 | (cp >> 18));
    o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (unsigned char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Parses the string at p->pos (at its opening quote) into the arena. */
static int parse_string(struct json_parser *p, const char **out, size_t *out_len)
{
    p->pos++; /* opening quote */
    size_t n = 0;
    for (;;) {
        /* Copy the run of plain bytes up to the next quote, escape or
         * control byte in one go; long strings are mostly such runs. */
        size_t start = p->pos;
        while (p->pos < p->len) {
            unsigned char c = p->s[p->pos];
            if (c == '"' || c == '\\' || c < 0x20)
                break;
            if (c < 0x80) {
                p->pos++;
                continue;
            }
            size_t k = utf8_seq(p->s + p->pos, p->len - p->pos);
            if (!k) {
                if (sbuf_put(p, &n, p->s + start, p->pos - start) == 0)
                    perr(p, "invalid UTF-8 in string");
                return -1;
            }
            p->pos += k;
        }
        if (p->pos > start && sbuf_put(p, &n, p->s + start, p->pos - start))
            return -1;
        if (p->pos >= p->len) {
            perr(p, "unterminated string");
            return -1;
        }
        unsigned char c = p->s[p->pos];
        if (c == '"') {
            p->pos++;
            break;
        }
        if (c < 0x20) {
            perr(p, "unescaped control character 0x%02x in string", c);
            return -1;
        }
        /* backslash */
        p->pos++;
        if (p->pos >= p->len) {
            perr(p, "unterminated string");
            return -1;
        }
        c = p->s[p->pos++];
        unsigned char o[4];
        size_t k = 1;
        switch (c) {
        case '"': o[0] = '"'; break;
        case '\\': o[0] = '\\'; break;
        case '/': o[0] = '/'; break;
        case 'b': o[0] = '\b'; break;
        case 'f': o[0] = '\f'; break;
        case 'n': o[0] = '\n'; break;
        case 'r': o[0] = '\r'; break;
        case 't': o[0] = '\t'; break;
        case 'u': {
            uint32_t cp;
            if (hex4(p, &cp))
                return -1;
            if (cp >= 0xdc00 && cp <= 0xdfff) {
                perr(p, "lone low surrogate \\u%04x", (unsigned)cp);
                return -1;
            }
            if (cp >= 0xd800 && cp <= 0xdbff) {
                /* A high surrogate must be followed by \u and a low one;
                 * a lone half is not text and cannot be UTF-8. */
                if (p->len - p->pos < 2 || p->s[p->pos] != '\\' ||
                    p->s[p->pos + 1] != 'u') {
                    perr(p, "high surrogate \\u%04x not followed by a low surrogate",
                         (unsigned)cp);
                    return -1;
                }
                p->pos += 2;
                uint32_t lo;
                if (hex4(p, &lo))
                    return -1;
                if (lo < 0xdc00 || lo > 0xdfff) {
                    perr(p, "high surrogate \\u%04x followed by \\u%04x, not a low surrogate",
                         (unsigned)cp, (unsigned)lo);
                    return -1;
                }
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            }
            k = utf8_encode(cp, o);
            break;
        }
        default:
            p->pos--;
            perr(p, "invalid escape '\\%c'", c >= 0x20 && c < 0x7f ? c : '?');
            return -1;
        }
        if (sbuf_put(p, &n, o, k))
            return -1;
    }
    char *s = arena_alloc(&p->doc->arena, n + 1);
    if (!s) {
        perr(p, "out of memory");
        return -1;
    }
    if (n)
        memcpy(s, p->sbuf, n);
    s[n] = '\0';
    *out = s;
    *out_len = n;
    return 0;
}

static int is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

static struct json *parse_number(struct json_parser *p)
{
    size_t start = p->pos;
    const unsigned char *s = p->s;
    size_t i = p->pos;
    int neg = 0;
    if (i < p->len && s[i] == '-') {
        neg = 1;
        i++;
    }
    if (i >= p->len || !is_digit(s[i])) {
        p->pos = i;
        perr(p, "expected a digit");
        return NULL;
    }
    size_t int_start = i;
    if (s[i] == '0') {
        i++;
        if (i < p->len && is_digit(s[i])) {
            p->pos = i;
            perr(p, "leading zero in number");
            return NULL;
        }
    } else {
        while (i < p->len && is_digit(s[i]))
            i++;
    }
    size_t int_end = i;
    int frac_zero = 1, has_frac = 0, has_exp = 0;
    if (i < p->len && s[i] == '.') {
        has_frac = 1;
        i++;
        if (i >= p->len || !is_digit(s[i])) {
            p->pos = i;
            perr(p, "expected a digit after '.'");
            return NULL;
        }
        while (i < p->len && is_digit(s[i])) {
            if (s[i] != '0')
                frac_zero = 0;
            i++;
        }
    }
    if (i < p->len && (s[i] == 'e' || s[i] == 'E')) {
        has_exp = 1;
        i++;
        if (i < p->len && (s[i] == '+' || s[i] == '-'))
            i++;
        if (i >= p->len || !is_digit(s[i])) {
            p->pos = i;
            perr(p, "expected a digit in exponent");
            return NULL;
        }
        while (i < p->len && is_digit(s[i]))
            i++;
    }
    struct json *v = new_node(p, JSON_NUMBER);
    if (!v)
        return NULL;

    /* Integers are accumulated exactly so that a tensor offset such as
     * 9007199254740993 is not rounded through a double. */
    if (!has_exp && (!has_frac || frac_zero)) {
        uint64_t mag = 0;
        int ok = 1;
        for (size_t j = int_start; j < int_end; j++) {
            unsigned d = s[j] - '0';
            if (mag > (UINT64_MAX - d) / 10) {
                ok = 0;
                break;
            }
            mag = mag * 10 + d;
        }
        if (ok && !neg && mag <= (uint64_t)INT64_MAX) {
            v->is_int = 1;
            v->u.num.i = (int64_t)mag;
        } else if (ok && neg && mag <= (uint64_t)INT64_MAX + 1) {
            v->is_int = 1;
            v->u.num.i = mag == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)mag;
        }
    }
    if (v->is_int) {
        v->u.num.d = (double)v->u.num.i;
        if (neg && v->u.num.i == 0)
            v->u.num.d = -0.0;
    } else {
        if (!p->c_locale) {
            p->c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
            if (!p->c_locale) {
                perr(p, "cannot create the C locale");
                return NULL;
            }
        }
        size_t n = i - start;
        char small[64];
        char *buf = n < sizeof(small) ? small : malloc(n + 1);
        if (!buf) {
            perr(p, "out of memory");
            return NULL;
        }
        memcpy(buf, s + start, n);
        buf[n] = '\0';
        errno = 0;
        char *end;
        double d = strtod_l(buf, &end, p->c_locale);
        int range = errno == ERANGE && (d > 1.0 || d < -1.0);
        size_t used = (size_t)(end - buf);
        if (buf != small)
            free(buf);
        if (used != n) {
            perr(p, "malformed number");
            return NULL;
        }
        if (range) {
            perr(p, "number out of range of a double");
            return NULL;
        }
        v->u.num.d = d;
    }
    p->pos = i;
    return v;
}

static int key_cmp(const struct json_member_key *a, const struct json_member_key *b)
{
    size_t n = a->len < b->len ? a->len : b->len;
    int c = memcmp(a->s, b->s, n);
    if (c)
        return c;
    return (a->len > b->len) - (a->len < b->len);
}

/* qsort has no context argument in C11; sort indices with a small
 * heap sort over the keys instead (O(n log n), no recursion). */
static void sort_members(size_t *idx, size_t n, const struct json_member_key *keys)
{
    if (n < 2)
        return;
    for (size_t start = n / 2; start-- > 0;) {
        size_t root = start;
        for (;;) {
            size_t child = 2 * root + 1;
            if (child >= n)
                break;
            if (child + 1 < n && key_cmp(&keys[idx[child]], &keys[idx[child + 1]]) < 0)
                child++;
            if (key_cmp(&keys[idx[root]], &keys[idx[child]]) >= 0)
                break;
            size_t t = idx[root];
            idx[root] = idx[child];
            idx[child] = t;
            root = child;
        }
    }
    for (size_t end = n - 1; end > 0; end--) {
        size_t t = idx[0];
        idx[0] = idx[end];
        idx[end] = t;
        size_t root = 0;
        for (;;) {
            size_t child = 2 * root + 1;
            if (child >= end)
                break;
            if (child + 1 < end && key_cmp(&keys[idx[child]], &keys[idx[child + 1]]) < 0)
                child++;
            if (key_cmp(&keys[idx[root]], &keys[idx[child]]) >= 0)
                break;
            size_t t2 = idx[root];
            idx[root] = idx[child];
            idx[child] = t2;
            root = child;
        }
    }
}

static struct json *parse_value(struct json_parser *p, int depth);

static int push_value(struct json_parser *p, struct json *v)
{
    if (grow((void **)&p->stack, &p->stack_cap, p->stack_n + 1, sizeof(*p->stack))) {
        perr(p, "out of memory");
        return -1;
    }
    p->stack[p->stack_n++] = v;
    return 0;
}

/* Moves the last n values (and keys, for objects) off the stacks into v. */
static int finish_aggregate(struct json_parser *p, struct json *v, size_t n, int is_obj)
{
    v->u.agg.n = n;
    if (n == 0)
        return 0;
    if (n > SIZE_MAX / sizeof(struct json_member_key)) {
        perr(p, "out of memory");
        return -1;
    }
    v->u.agg.items = arena_alloc(&p->doc->arena, n * sizeof(struct json *));
    if (!v->u.agg.items) {
        perr(p, "out of memory");
        return -1;
    }
    memcpy(v->u.agg.items, p->stack + p->stack_n - n, n * sizeof(struct json *));
    p->stack_n -= n;
    if (!is_obj)
        return 0;
    v->u.agg.keys = arena_alloc(&p->doc->arena, n * sizeof(struct json_member_key));
    v->u.agg.sorted = arena_alloc(&p->doc->arena, n * sizeof(size_t));
    if (!v->u.agg.keys || !v->u.agg.sorted) {
        perr(p, "out of memory");
        return -1;
    }
    memcpy(v->u.agg.keys, p->kstack + p->kstack_n - n, n * sizeof(struct json_member_key));
    p->kstack_n -= n;
    for (size_t i = 0; i < n; i++)
        v->u.agg.sorted[i] = i;
    sort_members(v->u.agg.sorted, n, v->u.agg.keys);
    for (size_t i = 1; i < n; i++) {
        const struct json_member_key *a = &v->u.agg.keys[v->u.agg.sorted[i - 1]];
        const struct json_member_key *b = &v->u.agg.keys[v->u.agg.sorted[i]];
        if (key_cmp(a, b) == 0) {
            /* printable prefix of the key, enough to find it in the file */
            char shown[64];
            size_t k = 0;
            for (size_t j = 0; j < b->len && k + 1 < sizeof(shown); j++) {
                unsigned char c = (unsigned char)b->s[j];
                shown[k++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
            }
            shown[k] = '\0';
            perr(p, "duplicate key \"%s%s\" in object", shown,
                 b->len > k ? "..." : "");
            return -1;
        }
    }
    return 0;
}

static struct json *parse_array(struct json_parser *p, int depth)
{
    struct json *v = new_node(p, JSON_ARRAY);
    if (!v)
        return NULL;
    p->pos++; /* [ */
    size_t n = 0;
    skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == ']') {
        p->pos++;
        return v;
    }
    for (;;) {
        struct json *e = parse_value(p, depth + 1);
        if (!e || push_value(p, e))
            return NULL;
        n++;
        skip_ws(p);
        if (p->pos >= p->len) {
            perr(p, "unterminated array");
            return NULL;
        }
        unsigned char c = p->s[p->pos];
        if (c == ',') {
            p->pos++;
            continue;
        }
        if (c == ']') {
            p->pos++;
            break;
        }
        perr(p, "expected ',' or ']' in array");
        return NULL;
    }
    return finish_aggregate(p, v, n, 0) ? NULL : v;
}

static struct json *parse_object(struct json_parser *p, int depth)
{
    struct json *v = new_node(p, JSON_OBJECT);
    if (!v)
        return NULL;
    p->pos++; /* { */
    size_t n = 0;
    skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == '}') {
        p->pos++;
        return v;
    }
    for (;;) {
        skip_ws(p);
        if (p->pos >= p->len || p->s[p->pos] != '"') {
            perr(p, "expected a string key in object");
            return NULL;
        }
        struct json_member_key k;
        if (parse_string(p, &k.s, &k.len))
            return NULL;
        skip_ws(p);
        if (p->pos >= p->len || p->s[p->pos] != ':') {
            perr(p, "expected ':' after object key");
            return NULL;
        }
        p->pos++;
        struct json *e = parse_value(p, depth + 1);
        if (!e || push_value(p, e))
            return NULL;
        if (grow((void **)&p->kstack, &p->kstack_cap, p->kstack_n + 1, sizeof(*p->kstack))) {
            perr(p, "out of memory");
            return NULL;
        }
        p->kstack[p->kstack_n++] = k;
        n++;
        skip_ws(p);
        if (p->pos >= p->len) {
            perr(p, "unterminated object");
            return NULL;
        }
        unsigned char c = p->s[p->pos];
        if (c == ',') {
            p->pos++;
            continue;
        }
        if (c == '}') {
            p->pos++;
            break;
        }
        perr(p, "expected ',' or '}' in object");
        return NULL;
    }
    return finish_aggregate(p, v, n, 1) ? NULL : v;
}

static int match_lit(struct json_parser *p, const char *lit)
{
    size_t n = strlen(lit);
    if (p->len - p->pos < n || memcmp(p->s + p->pos, lit, n) != 0) {
        perr(p, "invalid literal (expected '%s')", lit);
        return -1;
    }
    p->pos += n;
    return 0;
}

static struct json *parse_value(struct json_parser *p, int depth)
{
    skip_ws(p);
    if (p->pos >= p->len) {
        perr(p, "unexpected end of input");
        return NULL;
    }
    unsigned char c = p->s[p->pos];
    /* depth counts the arrays and objects around this value */
    if ((c == '[' || c == '{') && depth >= p->max_depth) {
        perr(p, "nesting deeper than %d", p->max_depth);
        return NULL;
    }
    struct json *v;
    switch (c) {
    case '{':
        return parse_object(p, depth);
    case '[':
        return parse_array(p, depth);
    case '"':
        v = new_node(p, JSON_STRING);
        if (!v || parse_string(p, &v->u.str.s, &v->u.str.len))
            return NULL;
        return v;
    case 't':
        if (match_lit(p, "true") || !(v = new_node(p, JSON_BOOL)))
            return NULL;
        v->u.b = 1;
        return v;
    case 'f':
        if (match_lit(p, "false"))
            return NULL;
        return new_node(p, JSON_BOOL);
    case 'n':
        if (match_lit(p, "null"))
            return NULL;
        return new_node(p, JSON_NULL);
    default:
        if (c == '-' || is_digit(c))
            return parse_number(p);
        if (c == 0xef && p->pos == 0)
            perr(p, "byte order mark is not allowed");
        else if (c >= 0x20 && c < 0x7f)
            perr(p, "unexpected character '%c'", c);
        else
            perr(p, "unexpected byte 0x%02x", c);
        return NULL;
    }
}

struct json *json_parse(const char *text, size_t len, char *err, size_t errlen)
{
    return json_parse_depth(text, len, JSON_MAX_DEPTH, err, errlen);
}

struct json *json_parse_depth(const char *text, size_t len, int max_depth, char *err,
                              size_t errlen)
{
    struct json_parser p = {
        .s = (const unsigned char *)text,
        .len = len,
        .max_depth = max_depth < 1 ? 1 : max_depth > JSON_MAX_DEPTH ? JSON_MAX_DEPTH : max_depth,
        .err = err,
        .errlen = errlen,
    };
    if (err && errlen)
        err[0] = '\0';
    struct json_doc *doc = calloc(1, sizeof(*doc));
    if (!doc) {
        perr(&p, "out of memory");
        return NULL;
    }
    arena_init(&doc->arena, ARENA_NO_CAP);
    p.doc = doc;
    if (!text && len) {
        perr(&p, "no input");
        goto fail;
    }
    struct json *v = parse_value(&p, 0);
    if (!v)
        goto fail;
    skip_ws(&p);
    if (p.pos != p.len) {
        perr(&p, "trailing bytes after the JSON value");
        goto fail;
    }
    doc->root = *v;
    free(p.stack);
    free(p.kstack);
    free(p.sbuf);
    if (p.c_locale)
        freelocale(p.c_locale);
    return &doc->root;

fail:
    free(p.stack);
    free(p.kstack);
    free(p.sbuf);
    if (p.c_locale)
        freelocale(p.c_locale);
    json_free(&doc->root);
    return NULL;
}

void json_free(struct json *root)
{
    if (!root)
        return;
    struct json_doc *doc = (struct json_doc *)((char *)root - offsetof(struct json_doc, root));
    arena_free(&doc->arena);
    free(doc);
}

/* -------------------------------------------------------------- accessors */

enum json_type json_type(const struct json *v)
{
    return v ? v->type : JSON_NULL;
}

const struct json *json_get(const struct json *v, const char *key)
{
    if (!v || v->type != JSON_OBJECT || !key)
        return NULL;
    struct json_member_key k = {key, strlen(key)};
    size_t lo = 0, hi = v->u.agg.n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        size_t i = v->u.agg.sorted[mid];
        int c = key_cmp(&v->u.agg.keys[i], &k);
        if (c == 0)
            return v->u.agg.items[i];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

size_t json_len(const struct json *v)
{
    if (!v || (v->type != JSON_ARRAY && v->type != JSON_OBJECT))
        return 0;
    return v->u.agg.n;
}

const struct json *json_at(const struct json *v, size_t i)
{
    if (!v || (v->type != JSON_ARRAY && v->type != JSON_OBJECT) || i >= v->u.agg.n)
        return NULL;
    return v->u.agg.items[i];
}

const char *json_key_at(const struct json *v, size_t i)
{
    if (!v || v->type != JSON_OBJECT || i >= v->u.agg.n)
        return NULL;
    return v->u.agg.keys[i].s;
}

size_t json_key_len(const struct json *v, size_t i)
{
    if (!v || v->type != JSON_OBJECT || i >= v->u.agg.n)
        return 0;
    return v->u.agg.keys[i].len;
}

double json_number(const struct json *v)
{
    return v && v->type == JSON_NUMBER ? v->u.num.d : 0.0;
}

int json_int64(const struct json *v, int64_t *out)
{
    if (!v || v->type != JSON_NUMBER || !v->is_int)
        return -1;
    if (out)
        *out = v->u.num.i;
    return 0;
}

const char *json_str(const struct json *v, size_t *len)
{
    if (!v || v->type != JSON_STRING)
        return NULL;
    if (len)
        *len = v->u.str.len;
    return v->u.str.s;
}

int json_bool(const struct json *v)
{
    return v && v->type == JSON_BOOL ? v->u.b : 0;
}
