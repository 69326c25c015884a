/* chat_template.c: the evaluator of Jinja2 chat templates.
 *
 * Walks the tree that jinja_parse.c builds, with Python's semantics for the
 * values chat templates handle (str, int, float, bool, None, list, dict,
 * Jinja's Undefined and namespace). One render is one arena with a cap, one
 * output buffer with a cap and a step budget, so hostile templates end with
 * an error instead of taking the process's time or memory. Errors unwind
 * with longjmp to the render entry, which frees the arena and the output:
 * nothing else is allocated during a render. Any thread may render; a
 * render touches no global state.
 */
#include "engine/chat_template.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/jinja_ast.h"
#include "engine/json.h"

#define DEFAULT_MAX_STEPS 10000000ull
#define DEFAULT_MAX_OUTPUT ((size_t)1 << 20)
#define DEFAULT_MAX_MEMORY ((size_t)64 << 20)
/* Macro calls nest the evaluator's recursion; each level may use up to
 * JINJA_MAX_NESTING frames, so this keeps the stack use bounded. */
#define MAX_CALL_DEPTH 16
#define MAX_ARGS 16

struct chat_template {
    struct jinja_template t;
};

/* ----------------------------------------------------------------- values */

enum vtype { V_UNDEF, V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR, V_LIST, V_DICT, V_NS, V_LOOP,
             V_MACRO, V_BUILTIN, V_RANGE };

enum builtin { B_RANGE, B_NAMESPACE, B_RAISE, B_STRFTIME, B_DICT };

struct val {
    uint8_t t;
    uint32_t n; /* V_STR: bytes; V_UNDEF: length of the name (u.s) */
    union {
        int64_t i;
        double f;
        const char *s;
        struct vlist *l;
        struct vdict *d; /* V_DICT, V_NS */
        struct loopst *lp;
        const struct jinja_node *m;
        struct vrange *rg;
        int b;
    } u;
};

struct vlist {
    size_t n;
    struct val v[];
};

struct vdict {
    size_t n, cap;
    struct val *k, *v;
};

/* range() stays lazy so that a loop over it costs no memory. */
struct vrange {
    int64_t start, step;
    size_t n;
};

static struct val range_at(const struct vrange *g, size_t i);

struct loopst {
    const struct vrange *range; /* when not NULL, items is NULL */
    const struct val *items;
    size_t n, i;
};

struct frame {
    struct frame *parent;
    size_t n, cap;
    const char **names;
    size_t *lens;
    struct val *vals;
};

struct rctx {
    jmp_buf jb;
    int rc;
    char *err;
    size_t errlen;
    struct arena ar;
    char *out;
    size_t out_n, out_cap, max_out;
    uint64_t steps, max_steps;
    struct frame *root, *cur;
    struct vdict *globals;
    int ctl; /* 1: break pending, 2: continue pending */
    int call_depth;
    int line; /* of the node being evaluated, for errors raised below it */
};

static _Noreturn void rfail(struct rctx *r, int line, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static _Noreturn void rfail(struct rctx *r, int line, int rc, const char *fmt, ...)
{
    if (r->err && r->errlen) {
        if (line <= 0)
            line = r->line;
        int n = line > 0 ? snprintf(r->err, r->errlen, "line %d: ", line) : 0;
        if (n >= 0 && (size_t)n < r->errlen) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(r->err + n, r->errlen - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    r->rc = rc;
    longjmp(r->jb, 1);
}

static void *ralloc(struct rctx *r, size_t n)
{
    void *p = arena_alloc(&r->ar, n);
    if (!p)
        rfail(r, 0, CHAT_TEMPLATE_ELIMIT, "template used more than %zu bytes of memory",
              r->ar.cap);
    return p;
}

static void step(struct rctx *r, int line, uint64_t n)
{
    r->steps += n;
    if (r->steps > r->max_steps)
        rfail(r, line, CHAT_TEMPLATE_ELIMIT, "template exceeded its budget of %llu steps",
              (unsigned long long)r->max_steps);
}

static struct val mkv(int t)
{
    struct val v;
    memset(&v, 0, sizeof(v));
    v.t = (uint8_t)t;
    return v;
}

static struct val mkint(int64_t i)
{
    struct val v = mkv(V_INT);
    v.u.i = i;
    return v;
}

static struct val mkfloat(double f)
{
    struct val v = mkv(V_FLOAT);
    v.u.f = f;
    return v;
}

static struct val mkbool(int b)
{
    struct val v = mkv(V_BOOL);
    v.u.i = b != 0;
    return v;
}

static struct val mkstr_ref(struct rctx *r, int line, const char *s, size_t n)
{
    if (n > UINT32_MAX)
        rfail(r, line, CHAT_TEMPLATE_ELIMIT, "string too long");
    struct val v = mkv(V_STR);
    v.u.s = s;
    v.n = (uint32_t)n;
    return v;
}

static struct val mkundef(const char *name, size_t n)
{
    struct val v = mkv(V_UNDEF);
    v.u.s = name;
    v.n = (uint32_t)n;
    return v;
}

static struct vlist *newlist(struct rctx *r, size_t n)
{
    if (n > ((size_t)1 << 32))
        rfail(r, 0, CHAT_TEMPLATE_ELIMIT, "list too long");
    struct vlist *l = ralloc(r, sizeof(*l) + n * sizeof(struct val));
    l->n = n;
    return l;
}

static struct val mklist(struct vlist *l)
{
    struct val v = mkv(V_LIST);
    v.u.l = l;
    return v;
}

static struct vdict *newdict(struct rctx *r, size_t cap)
{
    struct vdict *d = ralloc(r, sizeof(*d));
    d->n = 0;
    d->cap = cap ? cap : 4;
    d->k = ralloc(r, d->cap * sizeof(struct val));
    d->v = ralloc(r, d->cap * sizeof(struct val));
    return d;
}

static const char *type_name(struct val v)
{
    static const char *const names[] = {"undefined", "NoneType", "bool", "int", "float", "str",
                                        "list", "dict", "namespace", "LoopContext", "macro",
                                        "function", "range"};
    return names[v.t];
}

/* A growable byte string in the arena (the old copy is abandoned: the cost
 * is bounded by twice the final size). */
struct sb {
    char *p;
    size_t n, cap;
};

static void sb_put(struct rctx *r, struct sb *b, const char *s, size_t n)
{
    if (b->n + n > b->cap) {
        size_t nc = b->cap ? b->cap : 64;
        while (nc < b->n + n + 1) {
            if (nc > r->ar.cap)
                rfail(r, 0, CHAT_TEMPLATE_ELIMIT,
                      "template used more than %zu bytes of memory", r->ar.cap);
            nc *= 2;
        }
        char *np = ralloc(r, nc);
        if (b->n)
            memcpy(np, b->p, b->n);
        b->p = np;
        b->cap = nc;
    }
    if (n)
        memcpy(b->p + b->n, s, n);
    b->n += n;
    r->steps += n / 64; /* copying is work too */
}

static void sb_puts(struct rctx *r, struct sb *b, const char *s)
{
    sb_put(r, b, s, strlen(s));
}

static void sb_putc(struct rctx *r, struct sb *b, char c)
{
    sb_put(r, b, &c, 1);
}

static struct val sb_val(struct rctx *r, struct sb *b)
{
    return mkstr_ref(r, 0, b->p ? b->p : "", b->n);
}

static int key_is(const char *s, size_t n, const char *lit)
{
    return n == strlen(lit) && memcmp(s, lit, n) == 0;
}

/* ------------------------------------------------------------------ UTF-8 */

/* Decodes one code point at s[*i] (invalid bytes decode as themselves, so
 * that input strings that were never validated still index sanely). */
static uint32_t utf8_next(const char *s, size_t n, size_t *i)
{
    const unsigned char *u = (const unsigned char *)s;
    unsigned char c = u[*i];
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (*i + (size_t)len > n)
        len = 1;
    uint32_t cp = len == 1 ? c : len == 2 ? c & 0x1F : len == 3 ? c & 0x0F : c & 0x07;
    for (int k = 1; k < len; k++) {
        if ((u[*i + (size_t)k] & 0xC0) != 0x80) {
            len = 1;
            cp = c;
            break;
        }
        cp = (cp << 6) | (u[*i + (size_t)k] & 0x3F);
    }
    *i += (size_t)len;
    return cp;
}

/* Byte offsets of every code point of s, plus n at the end; *count gets
 * the number of code points. */
static size_t *cp_offsets(struct rctx *r, const char *s, size_t n, size_t *count)
{
    size_t *off = ralloc(r, (n + 1) * sizeof(size_t));
    size_t c = 0, i = 0;
    while (i < n) {
        off[c++] = i;
        utf8_next(s, n, &i);
    }
    off[c] = n;
    *count = c;
    step(r, 0, n / 64);
    return off;
}

static size_t cp_count(const char *s, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += ((unsigned char)s[i] & 0xC0) != 0x80;
    return c;
}

/* Python's str.isspace for the code points that can occur. */
static int py_space(uint32_t c)
{
    return (c >= 9 && c <= 13) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

/* --------------------------------------------------------- str() and repr */

static void fmt_float(double d, char *buf, size_t bn)
{
    if (isnan(d)) {
        snprintf(buf, bn, "nan");
        return;
    }
    if (isinf(d)) {
        snprintf(buf, bn, d < 0 ? "-inf" : "inf");
        return;
    }
    /* Python's repr: the shortest digits that round-trip. */
    char tmp[40];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof(tmp), "%.*e", prec - 1, d);
        if (strtod(tmp, NULL) == d)
            break;
    }
    char digits[32];
    int nd = 0, neg = 0;
    const char *q = tmp;
    if (*q == '-') {
        neg = 1;
        q++;
    }
    for (; *q && *q != 'e'; q++)
        if (*q >= '0' && *q <= '9')
            digits[nd++] = *q;
    int exp = atoi(q + 1);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    char *o = buf;
    char *end = buf + bn - 1;
#define PUT(c) do { if (o < end) *o++ = (c); } while (0)
    if (neg)
        PUT('-');
    if (exp >= -4 && exp < 16) {
        if (exp < 0) {
            PUT('0');
            PUT('.');
            for (int k = 0; k < -exp - 1; k++)
                PUT('0');
            for (int k = 0; k < nd; k++)
                PUT(digits[k]);
        } else {
            for (int k = 0; k <= exp; k++)
                PUT(k < nd ? digits[k] : '0');
            PUT('.');
            if (nd > exp + 1)
                for (int k = exp + 1; k < nd; k++)
                    PUT(digits[k]);
            else
                PUT('0');
        }
    } else {
        PUT(digits[0]);
        if (nd > 1) {
            PUT('.');
            for (int k = 1; k < nd; k++)
                PUT(digits[k]);
        }
        char e[16];
        snprintf(e, sizeof(e), "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
        for (char *c = e; *c; c++)
            PUT(*c);
    }
#undef PUT
    *o = '\0';
}

static void put_str(struct rctx *r, struct sb *b, struct val v, int repr);

static void put_repr_str(struct rctx *r, struct sb *b, const char *s, size_t n)
{
    char q = memchr(s, '\'', n) && !memchr(s, '"', n) ? '"' : '\'';
    sb_putc(r, b, q);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\\' || c == (unsigned char)q) {
            sb_putc(r, b, '\\');
            sb_putc(r, b, (char)c);
        } else if (c == '\n') {
            sb_puts(r, b, "\\n");
        } else if (c == '\r') {
            sb_puts(r, b, "\\r");
        } else if (c == '\t') {
            sb_puts(r, b, "\\t");
        } else if (c < 0x20 || c == 0x7F) {
            char e[8];
            snprintf(e, sizeof(e), "\\x%02x", c);
            sb_puts(r, b, e);
        } else {
            sb_putc(r, b, (char)c);
        }
    }
    sb_putc(r, b, q);
}

/* Python's str(v) (repr = 0) or repr(v) (repr = 1) appended to b. */
static void put_str(struct rctx *r, struct sb *b, struct val v, int repr)
{
    char tmp[48];
    switch (v.t) {
    case V_UNDEF:
        if (repr)
            sb_puts(r, b, "Undefined");
        return;
    case V_NONE: sb_puts(r, b, "None"); return;
    case V_BOOL: sb_puts(r, b, v.u.i ? "True" : "False"); return;
    case V_INT:
        snprintf(tmp, sizeof(tmp), "%lld", (long long)v.u.i);
        sb_puts(r, b, tmp);
        return;
    case V_FLOAT:
        fmt_float(v.u.f, tmp, sizeof(tmp));
        sb_puts(r, b, tmp);
        return;
    case V_STR:
        if (repr)
            put_repr_str(r, b, v.u.s, v.n);
        else
            sb_put(r, b, v.u.s, v.n);
        return;
    case V_LIST:
        sb_putc(r, b, '[');
        for (size_t i = 0; i < v.u.l->n; i++) {
            if (i)
                sb_puts(r, b, ", ");
            put_str(r, b, v.u.l->v[i], 1);
        }
        sb_putc(r, b, ']');
        return;
    case V_DICT:
    case V_NS:
        sb_puts(r, b, v.t == V_NS ? "<Namespace {" : "{");
        for (size_t i = 0; i < v.u.d->n; i++) {
            if (i)
                sb_puts(r, b, ", ");
            put_str(r, b, v.u.d->k[i], 1);
            sb_puts(r, b, ": ");
            put_str(r, b, v.u.d->v[i], 1);
        }
        sb_puts(r, b, v.t == V_NS ? "}>" : "}");
        return;
    case V_LOOP: sb_puts(r, b, "<LoopContext>"); return;
    case V_MACRO: sb_puts(r, b, "<Macro>"); return;
    case V_BUILTIN: sb_puts(r, b, "<built-in function>"); return;
    case V_RANGE: {
        const struct vrange *g = v.u.rg;
        int64_t stop = g->start + (int64_t)g->n * g->step;
        if (g->step == 1)
            snprintf(tmp, sizeof(tmp), "range(%lld, %lld)", (long long)g->start, (long long)stop);
        else
            snprintf(tmp, sizeof(tmp), "range(%lld, %lld, %lld)", (long long)g->start,
                     (long long)stop, (long long)g->step);
        sb_puts(r, b, tmp);
        return;
    }
    }
}

static struct val to_str(struct rctx *r, struct val v)
{
    if (v.t == V_STR)
        return v;
    struct sb b = {0};
    put_str(r, &b, v, 0);
    return sb_val(r, &b);
}

/* Python's json.dumps with ensure_ascii, indent and sort_keys as HF's
 * tojson passes them. */
struct json_style {
    int ascii;
    int indent; /* -1: none */
    const char *item_sep, *key_sep;
    size_t item_sep_n, key_sep_n;
    int sort;
};

static int val_lt(struct rctx *r, int line, struct val a, struct val b);

static void put_json_str(struct rctx *r, struct sb *b, const char *s, size_t n, int ascii)
{
    sb_putc(r, b, '"');
    size_t i = 0;
    while (i < n) {
        size_t at = i;
        uint32_t c = utf8_next(s, n, &i);
        char e[16];
        if (c == '"' || c == '\\') {
            e[0] = '\\';
            e[1] = (char)c;
            sb_put(r, b, e, 2);
        } else if (c == '\n') {
            sb_puts(r, b, "\\n");
        } else if (c == '\r') {
            sb_puts(r, b, "\\r");
        } else if (c == '\t') {
            sb_puts(r, b, "\\t");
        } else if (c == '\b') {
            sb_puts(r, b, "\\b");
        } else if (c == '\f') {
            sb_puts(r, b, "\\f");
        } else if (c < 0x20 || (ascii && c >= 0x7F)) {
            if (c >= 0x10000) {
                uint32_t v = c - 0x10000;
                snprintf(e, sizeof(e), "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
            } else {
                snprintf(e, sizeof(e), "\\u%04x", c);
            }
            sb_puts(r, b, e);
        } else {
            sb_put(r, b, s + at, i - at);
        }
    }
    sb_putc(r, b, '"');
}

static void put_indent(struct rctx *r, struct sb *b, const struct json_style *st, int level)
{
    sb_putc(r, b, '\n');
    for (int k = 0; k < st->indent * level; k++)
        sb_putc(r, b, ' ');
}

static void put_json(struct rctx *r, int line, struct sb *b, struct val v,
                     const struct json_style *st, int level)
{
    char tmp[48];
    if (level > JINJA_MAX_NESTING)
        rfail(r, line, CHAT_TEMPLATE_ELIMIT, "tojson: value nested too deeply");
    switch (v.t) {
    case V_NONE: sb_puts(r, b, "null"); return;
    case V_BOOL: sb_puts(r, b, v.u.i ? "true" : "false"); return;
    case V_INT:
        snprintf(tmp, sizeof(tmp), "%lld", (long long)v.u.i);
        sb_puts(r, b, tmp);
        return;
    case V_FLOAT:
        if (isnan(v.u.f))
            sb_puts(r, b, "NaN");
        else if (isinf(v.u.f))
            sb_puts(r, b, v.u.f < 0 ? "-Infinity" : "Infinity");
        else {
            fmt_float(v.u.f, tmp, sizeof(tmp));
            sb_puts(r, b, tmp);
        }
        return;
    case V_STR: put_json_str(r, b, v.u.s, v.n, st->ascii); return;
    case V_LIST:
        if (v.u.l->n == 0) {
            sb_puts(r, b, "[]");
            return;
        }
        sb_putc(r, b, '[');
        for (size_t i = 0; i < v.u.l->n; i++) {
            if (i)
                sb_put(r, b, st->item_sep, st->item_sep_n);
            if (st->indent >= 0)
                put_indent(r, b, st, level + 1);
            put_json(r, line, b, v.u.l->v[i], st, level + 1);
        }
        if (st->indent >= 0)
            put_indent(r, b, st, level);
        sb_putc(r, b, ']');
        return;
    case V_DICT:
    case V_NS: {
        struct vdict *d = v.u.d;
        if (d->n == 0) {
            sb_puts(r, b, "{}");
            return;
        }
        size_t *order = ralloc(r, d->n * sizeof(size_t));
        for (size_t i = 0; i < d->n; i++)
            order[i] = i;
        if (st->sort) /* insertion sort: dicts in templates are small */
            for (size_t i = 1; i < d->n; i++) {
                step(r, line, i);
                for (size_t j = i; j > 0 && val_lt(r, line, d->k[order[j]], d->k[order[j - 1]]);
                     j--) {
                    size_t t = order[j];
                    order[j] = order[j - 1];
                    order[j - 1] = t;
                }
            }
        sb_putc(r, b, '{');
        for (size_t i = 0; i < d->n; i++) {
            struct val k = d->k[order[i]];
            if (i)
                sb_put(r, b, st->item_sep, st->item_sep_n);
            if (st->indent >= 0)
                put_indent(r, b, st, level + 1);
            if (k.t == V_STR) {
                put_json_str(r, b, k.u.s, k.n, st->ascii);
            } else {
                struct sb kb = {0};
                put_json(r, line, &kb, k, st, level + 1);
                put_json_str(r, b, kb.p, kb.n, st->ascii);
            }
            sb_put(r, b, st->key_sep, st->key_sep_n);
            put_json(r, line, b, d->v[order[i]], st, level + 1);
        }
        if (st->indent >= 0)
            put_indent(r, b, st, level);
        sb_putc(r, b, '}');
        return;
    }
    default:
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "tojson: object of type %s is not JSON serializable",
              type_name(v));
    }
}

/* ---------------------------------------------------- truth and equality */

static int truthy(struct val v)
{
    switch (v.t) {
    case V_UNDEF:
    case V_NONE: return 0;
    case V_BOOL:
    case V_INT: return v.u.i != 0;
    case V_FLOAT: return v.u.f != 0.0;
    case V_STR: return v.n != 0;
    case V_LIST: return v.u.l->n != 0;
    case V_DICT: return v.u.d->n != 0;
    case V_RANGE: return v.u.rg->n != 0;
    default: return 1;
    }
}

static int is_num(struct val v)
{
    return v.t == V_INT || v.t == V_FLOAT || v.t == V_BOOL;
}

static double num(struct val v)
{
    return v.t == V_FLOAT ? v.u.f : (double)v.u.i;
}

static struct val *dict_find(struct vdict *d, struct val k);

static int val_eq(struct val a, struct val b)
{
    if (is_num(a) && is_num(b)) {
        if (a.t != V_FLOAT && b.t != V_FLOAT)
            return a.u.i == b.u.i;
        return num(a) == num(b);
    }
    if (a.t != b.t)
        return 0;
    switch (a.t) {
    case V_UNDEF:
    case V_NONE: return 1;
    case V_STR: return a.n == b.n && memcmp(a.u.s, b.u.s, a.n) == 0;
    case V_LIST:
        if (a.u.l->n != b.u.l->n)
            return 0;
        for (size_t i = 0; i < a.u.l->n; i++)
            if (!val_eq(a.u.l->v[i], b.u.l->v[i]))
                return 0;
        return 1;
    case V_DICT:
        if (a.u.d->n != b.u.d->n)
            return 0;
        for (size_t i = 0; i < a.u.d->n; i++) {
            struct val *o = dict_find(b.u.d, a.u.d->k[i]);
            if (!o || !val_eq(a.u.d->v[i], *o))
                return 0;
        }
        return 1;
    case V_NS: return a.u.d == b.u.d;
    case V_LOOP: return a.u.lp == b.u.lp;
    case V_MACRO: return a.u.m == b.u.m;
    case V_BUILTIN: return a.u.b == b.u.b;
    case V_RANGE: return a.u.rg == b.u.rg;
    }
    return 0;
}

static _Noreturn void undefined_error(struct rctx *r, int line, struct val v)
{
    if (v.u.s && v.n)
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "'%.*s' is undefined", (int)v.n, v.u.s);
    rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "a value is undefined");
}

static int val_lt(struct rctx *r, int line, struct val a, struct val b)
{
    if (is_num(a) && is_num(b)) {
        if (a.t != V_FLOAT && b.t != V_FLOAT)
            return a.u.i < b.u.i;
        return num(a) < num(b);
    }
    if (a.t == V_STR && b.t == V_STR) {
        size_t n = a.n < b.n ? a.n : b.n;
        int c = memcmp(a.u.s, b.u.s, n);
        return c < 0 || (c == 0 && a.n < b.n);
    }
    if (a.t == V_LIST && b.t == V_LIST) {
        size_t n = a.u.l->n < b.u.l->n ? a.u.l->n : b.u.l->n;
        for (size_t i = 0; i < n; i++)
            if (!val_eq(a.u.l->v[i], b.u.l->v[i]))
                return val_lt(r, line, a.u.l->v[i], b.u.l->v[i]);
        return a.u.l->n < b.u.l->n;
    }
    if (a.t == V_UNDEF)
        undefined_error(r, line, a);
    if (b.t == V_UNDEF)
        undefined_error(r, line, b);
    rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "'<' not supported between instances of '%s' and '%s'",
          type_name(a), type_name(b));
}

static struct val *dict_find(struct vdict *d, struct val k)
{
    for (size_t i = 0; i < d->n; i++)
        if (val_eq(d->k[i], k))
            return &d->v[i];
    return NULL;
}

static struct val *dict_find_str(struct vdict *d, const char *s, size_t n)
{
    for (size_t i = 0; i < d->n; i++)
        if (d->k[i].t == V_STR && d->k[i].n == n && memcmp(d->k[i].u.s, s, n) == 0)
            return &d->v[i];
    return NULL;
}

static void dict_set(struct rctx *r, struct vdict *d, struct val k, struct val v)
{
    struct val *o = dict_find(d, k);
    if (o) {
        *o = v;
        return;
    }
    if (d->n == d->cap) {
        size_t nc = d->cap * 2;
        struct val *nk = ralloc(r, nc * sizeof(*nk));
        struct val *nv = ralloc(r, nc * sizeof(*nv));
        memcpy(nk, d->k, d->n * sizeof(*nk));
        memcpy(nv, d->v, d->n * sizeof(*nv));
        d->k = nk;
        d->v = nv;
        d->cap = nc;
    }
    d->k[d->n] = k;
    d->v[d->n] = v;
    d->n++;
}

static struct vlist *iterate(struct rctx *r, int line, struct val v);

static int contains(struct rctx *r, int line, struct val hay, struct val needle)
{
    switch (hay.t) {
    case V_STR:
        if (needle.t != V_STR)
            rfail(r, line, CHAT_TEMPLATE_ERUNTIME,
                  "'in <string>' requires string as left operand, not %s", type_name(needle));
        if (needle.n == 0)
            return 1;
        step(r, line, hay.n / 64);
        return memmem(hay.u.s, hay.n, needle.u.s, needle.n) != NULL;
    case V_RANGE:
        return contains(r, line, mklist(iterate(r, line, hay)), needle);
    case V_LIST:
        step(r, line, hay.u.l->n);
        for (size_t i = 0; i < hay.u.l->n; i++)
            if (val_eq(hay.u.l->v[i], needle))
                return 1;
        return 0;
    case V_DICT:
    case V_NS:
        step(r, line, hay.u.d->n);
        return dict_find(hay.u.d, needle) != NULL;
    case V_UNDEF: undefined_error(r, line, hay);
    default:
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "argument of type '%s' is not iterable",
              type_name(hay));
    }
}

/* The items a for loop or a filter iterates: list elements, dict keys or
 * a string's characters; Undefined iterates as empty, as in Jinja. */
static struct vlist *iterate(struct rctx *r, int line, struct val v)
{
    switch (v.t) {
    case V_LIST: return v.u.l;
    case V_UNDEF: return newlist(r, 0);
    case V_RANGE: {
        step(r, line, v.u.rg->n);
        struct vlist *l = newlist(r, v.u.rg->n);
        for (size_t i = 0; i < l->n; i++)
            l->v[i] = range_at(v.u.rg, i);
        return l;
    }
    case V_DICT: {
        struct vlist *l = newlist(r, v.u.d->n);
        memcpy(l->v, v.u.d->k, v.u.d->n * sizeof(struct val));
        return l;
    }
    case V_STR: {
        size_t n;
        size_t *off = cp_offsets(r, v.u.s, v.n, &n);
        struct vlist *l = newlist(r, n);
        for (size_t i = 0; i < n; i++)
            l->v[i] = mkstr_ref(r, line, v.u.s + off[i], off[i + 1] - off[i]);
        return l;
    }
    default:
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "'%s' object is not iterable", type_name(v));
    }
}

/* ------------------------------------------------------------ variables */

static void frame_set(struct rctx *r, struct frame *f, const char *name, size_t len, struct val v)
{
    for (size_t i = 0; i < f->n; i++)
        if (f->lens[i] == len && memcmp(f->names[i], name, len) == 0) {
            f->vals[i] = v;
            return;
        }
    if (f->n == f->cap) {
        size_t nc = f->cap ? f->cap * 2 : 8;
        const char **nn = ralloc(r, nc * sizeof(*nn));
        size_t *nl = ralloc(r, nc * sizeof(*nl));
        struct val *nv = ralloc(r, nc * sizeof(*nv));
        if (f->n) {
            memcpy(nn, f->names, f->n * sizeof(*nn));
            memcpy(nl, f->lens, f->n * sizeof(*nl));
            memcpy(nv, f->vals, f->n * sizeof(*nv));
        }
        f->names = nn;
        f->lens = nl;
        f->vals = nv;
        f->cap = nc;
    }
    f->names[f->n] = name;
    f->lens[f->n] = len;
    f->vals[f->n] = v;
    f->n++;
}

static struct frame *push_frame(struct rctx *r, struct frame *parent)
{
    struct frame *f = ralloc(r, sizeof(*f));
    memset(f, 0, sizeof(*f));
    f->parent = parent;
    return f;
}

static struct val lookup(struct rctx *r, const char *name, size_t len)
{
    for (struct frame *f = r->cur; f; f = f->parent)
        for (size_t i = f->n; i-- > 0;)
            if (f->lens[i] == len && memcmp(f->names[i], name, len) == 0)
                return f->vals[i];
    struct val *g = dict_find_str(r->globals, name, len);
    if (g)
        return *g;
    static const struct {
        const char *name;
        int b;
    } builtins[] = {{"range", B_RANGE}, {"namespace", B_NAMESPACE},
                    {"raise_exception", B_RAISE}, {"strftime_now", B_STRFTIME},
                    {"dict", B_DICT}};
    for (size_t i = 0; i < sizeof(builtins) / sizeof(builtins[0]); i++)
        if (key_is(name, len, builtins[i].name)) {
            struct val v = mkv(V_BUILTIN);
            v.u.b = builtins[i].b;
            return v;
        }
    return mkundef(name, len);
}

/* ----------------------------------------------------------- evaluation */

static struct val eval(struct rctx *r, const struct jinja_node *n);
static void exec_body(struct rctx *r, struct jinja_node *const *b, size_t n);

struct cargs {
    size_t n;
    struct val v[MAX_ARGS];
    const char *kw[MAX_ARGS];
    size_t kwl[MAX_ARGS];
};

static void eval_args(struct rctx *r, const struct jinja_node *n, struct cargs *a)
{
    if (n->n_args > MAX_ARGS)
        rfail(r, n->line, CHAT_TEMPLATE_ERUNTIME, "too many arguments (at most %d)", MAX_ARGS);
    a->n = n->n_args;
    for (size_t i = 0; i < n->n_args; i++) {
        a->v[i] = eval(r, n->args[i]);
        a->kw[i] = n->names ? n->names[i] : NULL;
        a->kwl[i] = n->names ? n->name_lens[i] : 0;
    }
}

/* The pos-th positional argument, or the keyword argument name. */
static int getarg(const struct cargs *a, size_t pos, const char *name, struct val *out)
{
    size_t p = 0;
    for (size_t i = 0; i < a->n; i++) {
        if (!a->kw[i]) {
            if (p++ == pos) {
                *out = a->v[i];
                return 1;
            }
        } else if (name && key_is(a->kw[i], a->kwl[i], name)) {
            *out = a->v[i];
            return 1;
        }
    }
    return 0;
}

static struct val arg_or(const struct cargs *a, size_t pos, const char *name, struct val def)
{
    struct val v;
    return getarg(a, pos, name, &v) ? v : def;
}

static struct val need_str(struct rctx *r, int line, struct val v, const char *what)
{
    if (v.t != V_STR)
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "%s expects a string, got %s", what, type_name(v));
    return v;
}

static int64_t need_int(struct rctx *r, int line, struct val v, const char *what)
{
    if (v.t != V_INT && v.t != V_BOOL) {
        if (v.t == V_UNDEF)
            undefined_error(r, line, v);
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "%s expects an integer, got %s", what,
              type_name(v));
    }
    return v.u.i;
}

static void check_attr_name(struct rctx *r, int line, const char *s, size_t n)
{
    if (n > 0 && s[0] == '_')
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME,
              "access to attribute '%.*s' is not allowed (names starting with '_' are private)",
              (int)(n > 64 ? 64 : n), s);
}

static struct val loop_attr(struct rctx *r, int line, struct loopst *lp, const char *s, size_t n)
{
    int64_t i = (int64_t)lp->i, len = (int64_t)lp->n;
    if (key_is(s, n, "index"))
        return mkint(i + 1);
    if (key_is(s, n, "index0"))
        return mkint(i);
    if (key_is(s, n, "revindex"))
        return mkint(len - i);
    if (key_is(s, n, "revindex0"))
        return mkint(len - i - 1);
    if (key_is(s, n, "first"))
        return mkbool(i == 0);
    if (key_is(s, n, "last"))
        return mkbool(i == len - 1);
    if (key_is(s, n, "length"))
        return mkint(len);
    if (key_is(s, n, "depth"))
        return mkint(1);
    if (key_is(s, n, "depth0"))
        return mkint(0);
    if (key_is(s, n, "previtem")) {
        if (i == 0)
            return mkundef("previtem", 8);
        return lp->range ? range_at(lp->range, (size_t)i - 1) : lp->items[i - 1];
    }
    if (key_is(s, n, "nextitem")) {
        if (i + 1 >= len)
            return mkundef("nextitem", 8);
        return lp->range ? range_at(lp->range, (size_t)i + 1) : lp->items[i + 1];
    }
    (void)r;
    (void)line;
    return mkundef(s, n);
}

static struct val get_attr(struct rctx *r, int line, struct val obj, const char *s, size_t n)
{
    check_attr_name(r, line, s, n);
    switch (obj.t) {
    case V_UNDEF: undefined_error(r, line, obj);
    case V_DICT:
    case V_NS: {
        struct val *v = dict_find_str(obj.u.d, s, n);
        return v ? *v : mkundef(s, n);
    }
    case V_LOOP: return loop_attr(r, line, obj.u.lp, s, n);
    default: return mkundef(s, n);
    }
}

static int64_t norm_index(int64_t i, size_t len)
{
    return i < 0 ? i + (int64_t)len : i;
}

static struct val get_item(struct rctx *r, int line, struct val obj, struct val key)
{
    switch (obj.t) {
    case V_UNDEF: undefined_error(r, line, obj);
    case V_DICT:
    case V_NS: {
        struct val *v = dict_find(obj.u.d, key);
        if (v)
            return *v;
        if (key.t == V_STR)
            return mkundef(key.u.s, key.n);
        return mkundef(NULL, 0);
    }
    case V_LIST:
        if (key.t == V_INT || key.t == V_BOOL) {
            int64_t i = norm_index(key.u.i, obj.u.l->n);
            if (i >= 0 && (size_t)i < obj.u.l->n)
                return obj.u.l->v[i];
        }
        break;
    case V_STR:
        if (key.t == V_INT || key.t == V_BOOL) {
            size_t cnt;
            size_t *off = cp_offsets(r, obj.u.s, obj.n, &cnt);
            int64_t i = norm_index(key.u.i, cnt);
            if (i >= 0 && (size_t)i < cnt)
                return mkstr_ref(r, line, obj.u.s + off[i], off[i + 1] - off[i]);
        }
        break;
    case V_LOOP:
        if (key.t == V_STR)
            return get_attr(r, line, obj, key.u.s, key.n);
        break;
    default:
        break;
    }
    if (key.t == V_STR)
        check_attr_name(r, line, key.u.s, key.n);
    return mkundef(NULL, 0);
}

/* Python's slice.indices. */
static void slice_indices(struct rctx *r, int line, const struct val *sv, size_t len,
                          int64_t *start, int64_t *stop, int64_t *stepv)
{
    int64_t st = 1;
    if (sv[2].t != V_NONE)
        st = need_int(r, line, sv[2], "slice step");
    if (st == 0)
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "slice step cannot be zero");
    int64_t L = (int64_t)len;
    int64_t lo = st < 0 ? -1 : 0, hi = st < 0 ? L - 1 : L;
    int64_t a = st < 0 ? hi : lo, b = st < 0 ? lo : hi;
    if (sv[0].t != V_NONE) {
        a = need_int(r, line, sv[0], "slice index");
        if (a < 0)
            a = a + L < lo ? lo : a + L;
        else if (a > hi)
            a = hi;
    }
    if (sv[1].t != V_NONE) {
        b = need_int(r, line, sv[1], "slice index");
        if (b < 0)
            b = b + L < lo ? lo : b + L;
        else if (b > hi)
            b = hi;
    }
    *start = a;
    *stop = b;
    *stepv = st;
}

static struct val do_slice(struct rctx *r, int line, struct val obj, const struct val *sv)
{
    if (obj.t == V_UNDEF)
        undefined_error(r, line, obj);
    if (obj.t != V_LIST && obj.t != V_STR)
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "'%s' object is not subscriptable",
              type_name(obj));
    size_t len, *off = NULL;
    if (obj.t == V_STR)
        off = cp_offsets(r, obj.u.s, obj.n, &len);
    else
        len = obj.u.l->n;
    int64_t a, b, st;
    slice_indices(r, line, sv, len, &a, &b, &st);
    size_t cnt = 0;
    if (st > 0 && b > a)
        cnt = (size_t)((b - a + st - 1) / st);
    else if (st < 0 && a > b)
        cnt = (size_t)((a - b - st - 1) / -st);
    step(r, line, cnt);
    if (obj.t == V_LIST) {
        struct vlist *l = newlist(r, cnt);
        for (size_t i = 0; i < cnt; i++)
            l->v[i] = obj.u.l->v[a + (int64_t)i * st];
        return mklist(l);
    }
    if (st == 1)
        return mkstr_ref(r, line, obj.u.s + off[a], off[a + (int64_t)cnt] - off[a]);
    struct sb out = {0};
    for (size_t i = 0; i < cnt; i++) {
        int64_t k = a + (int64_t)i * st;
        sb_put(r, &out, obj.u.s + off[k], off[k + 1] - off[k]);
    }
    return sb_val(r, &out);
}

static struct val binop(struct rctx *r, int line, int op, struct val a, struct val b)
{
    if (op == '~') {
        struct sb s = {0};
        put_str(r, &s, a, 0);
        put_str(r, &s, b, 0);
        return sb_val(r, &s);
    }
    if (a.t == V_UNDEF)
        undefined_error(r, line, a);
    if (b.t == V_UNDEF)
        undefined_error(r, line, b);
    if ((a.t == V_INT || a.t == V_BOOL) && (b.t == V_INT || b.t == V_BOOL)) {
        int64_t x = a.u.i, y = b.u.i, z;
        switch (op) {
        case '+':
            if (__builtin_add_overflow(x, y, &z))
                goto overflow;
            return mkint(z);
        case '-':
            if (__builtin_sub_overflow(x, y, &z))
                goto overflow;
            return mkint(z);
        case '*':
            if (__builtin_mul_overflow(x, y, &z))
                goto overflow;
            return mkint(z);
        case '/':
            if (y == 0)
                rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "division by zero");
            return mkfloat((double)x / (double)y);
        case JOP_FLOORDIV:
        case '%': {
            if (y == 0)
                rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "integer division or modulo by zero");
            if (x == INT64_MIN && y == -1)
                goto overflow;
            int64_t q = x / y, m = x % y;
            if (m != 0 && ((m < 0) != (y < 0))) {
                q--;
                m += y;
            }
            return mkint(op == '%' ? m : q);
        }
        case JOP_POW:
            if (y < 0)
                return mkfloat(pow((double)x, (double)y));
            z = 1;
            for (int64_t k = 0; k < y; k++) {
                if (__builtin_mul_overflow(z, x, &z))
                    goto overflow;
                if (z == 0 || z == 1)
                    break;
                if (z == -1) {
                    z = (y - k - 1) % 2 == 0 ? -1 : 1;
                    break;
                }
            }
            return mkint(z);
        }
    }
    if (is_num(a) && is_num(b)) {
        double x = num(a), y = num(b);
        switch (op) {
        case '+': return mkfloat(x + y);
        case '-': return mkfloat(x - y);
        case '*': return mkfloat(x * y);
        case '/':
            if (y == 0)
                rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "float division by zero");
            return mkfloat(x / y);
        case JOP_FLOORDIV:
        case '%': {
            if (y == 0)
                rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "float modulo");
            double m = fmod(x, y);
            if (m != 0 && ((m < 0) != (y < 0)))
                m += y;
            return mkfloat(op == '%' ? m : floor((x - m) / y + 0.5));
        }
        case JOP_POW: return mkfloat(pow(x, y));
        }
    }
    if (op == '+' && a.t == V_STR && b.t == V_STR) {
        struct sb s = {0};
        sb_put(r, &s, a.u.s, a.n);
        sb_put(r, &s, b.u.s, b.n);
        return sb_val(r, &s);
    }
    if (op == '+' && a.t == V_LIST && b.t == V_LIST) {
        struct vlist *l = newlist(r, a.u.l->n + b.u.l->n);
        memcpy(l->v, a.u.l->v, a.u.l->n * sizeof(struct val));
        memcpy(l->v + a.u.l->n, b.u.l->v, b.u.l->n * sizeof(struct val));
        step(r, line, l->n);
        return mklist(l);
    }
    if (op == '*' && (a.t == V_INT || b.t == V_INT) && (a.t == V_STR || b.t == V_STR ||
                                                        a.t == V_LIST || b.t == V_LIST)) {
        struct val seq = a.t == V_INT ? b : a;
        int64_t k = a.t == V_INT ? a.u.i : b.u.i;
        if (k < 0)
            k = 0;
        size_t unit = seq.t == V_STR ? seq.n : seq.u.l->n * sizeof(struct val);
        if (unit && (uint64_t)k > (uint64_t)r->ar.cap / unit)
            rfail(r, line, CHAT_TEMPLATE_ELIMIT, "repetition of %zu bytes x %lld exceeds the "
                  "memory limit of %zu bytes", unit, (long long)k, r->ar.cap);
        if (seq.t == V_STR) {
            struct sb s = {0};
            for (int64_t i = 0; i < k; i++)
                sb_put(r, &s, seq.u.s, seq.n);
            step(r, line, (uint64_t)k);
            return sb_val(r, &s);
        }
        size_t n = seq.u.l->n;
        struct vlist *l = newlist(r, n * (size_t)k);
        for (int64_t i = 0; i < k; i++)
            memcpy(l->v + (size_t)i * n, seq.u.l->v, n * sizeof(struct val));
        step(r, line, l->n);
        return mklist(l);
    }
    if (op == '%' && a.t == V_STR)
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "string formatting with %% is not supported");
    {
        static const char *const names[] = {"==", "!=", "<=", ">=", "//", "**"};
        char o[3] = {(char)op, 0, 0};
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME,
              "unsupported operand type(s) for %s: '%s' and '%s'",
              op >= 256 ? names[op - 256] : o, type_name(a), type_name(b));
    }
overflow:
    rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "integer overflow");
}

/* ------------------------------------------------------ string methods */

static int in_chars(uint32_t c, struct val chars)
{
    if (chars.t != V_STR)
        return py_space(c);
    size_t i = 0;
    while (i < chars.n)
        if (utf8_next(chars.u.s, chars.n, &i) == c)
            return 1;
    return 0;
}

/* which: 1 left, 2 right, 3 both */
static struct val str_strip(struct rctx *r, struct val s, struct val chars, int which)
{
    size_t a = 0, b = s.n;
    if (which & 1)
        while (a < b) {
            size_t i = a;
            if (!in_chars(utf8_next(s.u.s, s.n, &i), chars))
                break;
            a = i;
        }
    if (which & 2)
        while (b > a) {
            size_t k = b - 1;
            while (k > a && ((unsigned char)s.u.s[k] & 0xC0) == 0x80)
                k--;
            size_t i = k;
            if (!in_chars(utf8_next(s.u.s, s.n, &i), chars))
                break;
            b = k;
        }
    step(r, 0, s.n / 64);
    return mkstr_ref(r, 0, s.u.s + a, b - a);
}

static char up(char c)
{
    return c >= 'a' && c <= 'z' ? (char)(c - 32) : c;
}

static char low(char c)
{
    return c >= 'A' && c <= 'Z' ? (char)(c + 32) : c;
}

static int is_alpha(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || ((unsigned char)c & 0x80);
}

/* mode: 'u' upper, 'l' lower, 'c' capitalize, 't' Python title, 'j' Jinja title */
static struct val str_case(struct rctx *r, struct val s, int mode)
{
    char *o = ralloc(r, s.n + 1);
    int start = 1;
    for (size_t i = 0; i < s.n; i++) {
        char c = s.u.s[i];
        switch (mode) {
        case 'u': o[i] = up(c); break;
        case 'l': o[i] = low(c); break;
        case 'c': o[i] = i == 0 ? up(c) : low(c); break;
        case 't':
            o[i] = start ? up(c) : low(c);
            start = !is_alpha(c);
            break;
        default: /* Jinja's title: words begin after whitespace, - ( { [ < */
            o[i] = start ? up(c) : low(c);
            start = c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v' ||
                    c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
        }
    }
    step(r, 0, s.n / 64);
    return mkstr_ref(r, 0, o, s.n);
}

static struct val str_replace(struct rctx *r, int line, struct val s, struct val old, struct val new,
                              int64_t count)
{
    need_str(r, line, old, "replace");
    new = to_str(r, new);
    struct sb b = {0};
    if (old.n == 0) {
        size_t i = 0;
        int64_t done = 0;
        if (count != 0) {
            sb_put(r, &b, new.u.s, new.n);
            done++;
        }
        while (i < s.n) {
            size_t at = i;
            utf8_next(s.u.s, s.n, &i);
            sb_put(r, &b, s.u.s + at, i - at);
            if (count < 0 || done < count) {
                sb_put(r, &b, new.u.s, new.n);
                done++;
            }
        }
        return sb_val(r, &b);
    }
    size_t i = 0;
    int64_t done = 0;
    while (i < s.n) {
        const char *hit = count >= 0 && done >= count
                              ? NULL
                              : memmem(s.u.s + i, s.n - i, old.u.s, old.n);
        if (!hit) {
            sb_put(r, &b, s.u.s + i, s.n - i);
            break;
        }
        size_t at = (size_t)(hit - s.u.s);
        sb_put(r, &b, s.u.s + i, at - i);
        sb_put(r, &b, new.u.s, new.n);
        i = at + old.n;
        done++;
    }
    return sb_val(r, &b);
}

static struct val str_split(struct rctx *r, int line, struct val s, struct val sep,
                            int64_t maxsplit)
{
    struct val parts[64];
    size_t np = 0;
    struct vlist *acc = NULL;
    /* collect into a small buffer, spilling into a growing list */
#define EMIT(it)                                                                    \
    do {                                                                            \
        if (np == 64) {                                                             \
            size_t old = acc ? acc->n : 0;                                          \
            struct vlist *nl = newlist(r, old + 64);                                \
            if (acc)                                                                \
                memcpy(nl->v, acc->v, old * sizeof(struct val));                    \
            memcpy(nl->v + old, parts, 64 * sizeof(struct val));                    \
            acc = nl;                                                               \
            np = 0;                                                                 \
        }                                                                           \
        parts[np++] = (it);                                                         \
    } while (0)
    step(r, line, s.n / 16);
    int64_t done = 0;
    if (sep.t == V_NONE || sep.t == V_UNDEF) {
        size_t i = 0;
        for (;;) {
            while (i < s.n) {
                size_t k = i;
                if (!py_space(utf8_next(s.u.s, s.n, &k)))
                    break;
                i = k;
            }
            if (i >= s.n)
                break;
            if (maxsplit >= 0 && done >= maxsplit) {
                size_t e = s.n;
                struct val rest = str_strip(r, mkstr_ref(r, line, s.u.s + i, e - i), mkv(V_NONE), 2);
                EMIT(rest);
                break;
            }
            size_t j = i;
            while (j < s.n) {
                size_t k = j;
                if (py_space(utf8_next(s.u.s, s.n, &k)))
                    break;
                j = k;
            }
            EMIT(mkstr_ref(r, line, s.u.s + i, j - i));
            done++;
            i = j;
        }
    } else {
        need_str(r, line, sep, "split");
        if (sep.n == 0)
            rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "empty separator");
        size_t i = 0;
        for (;;) {
            const char *hit = maxsplit >= 0 && done >= maxsplit
                                  ? NULL
                                  : memmem(s.u.s + i, s.n - i, sep.u.s, sep.n);
            if (!hit) {
                EMIT(mkstr_ref(r, line, s.u.s + i, s.n - i));
                break;
            }
            size_t at = (size_t)(hit - s.u.s);
            EMIT(mkstr_ref(r, line, s.u.s + i, at - i));
            i = at + sep.n;
            done++;
        }
    }
#undef EMIT
    size_t old = acc ? acc->n : 0;
    struct vlist *l = newlist(r, old + np);
    if (acc)
        memcpy(l->v, acc->v, old * sizeof(struct val));
    memcpy(l->v + old, parts, np * sizeof(struct val));
    return mklist(l);
}

static int str_affix(struct rctx *r, int line, struct val s, struct val a, int end)
{
    if (a.t == V_LIST) {
        for (size_t i = 0; i < a.u.l->n; i++)
            if (str_affix(r, line, s, a.u.l->v[i], end))
                return 1;
        return 0;
    }
    need_str(r, line, a, end ? "endswith" : "startswith");
    if (a.n > s.n)
        return 0;
    return memcmp(end ? s.u.s + s.n - a.n : s.u.s, a.u.s, a.n) == 0;
}

static struct val join(struct rctx *r, int line, struct vlist *items, struct val sep,
                       struct val attr)
{
    struct sb b = {0};
    for (size_t i = 0; i < items->n; i++) {
        if (i)
            put_str(r, &b, sep, 0);
        struct val v = items->v[i];
        if (attr.t == V_STR)
            v = get_item(r, line, v, attr);
        put_str(r, &b, v, 0);
    }
    return sb_val(r, &b);
}

/* Methods called on values: s.strip(), d.items(), loop.cycle()... Returns
 * 0 when obj has no method of that name. */
static int call_method(struct rctx *r, int line, struct val obj, const char *m, size_t mn,
                       const struct cargs *a, struct val *out)
{
    struct val none = mkv(V_NONE);
    if (obj.t == V_STR) {
        if (key_is(m, mn, "strip") || key_is(m, mn, "lstrip") || key_is(m, mn, "rstrip")) {
            int which = m[0] == 'l' ? 1 : m[0] == 'r' ? 2 : 3;
            *out = str_strip(r, obj, arg_or(a, 0, "chars", none), which);
            return 1;
        }
        if (key_is(m, mn, "upper") || key_is(m, mn, "lower") || key_is(m, mn, "title") ||
            key_is(m, mn, "capitalize")) {
            *out = str_case(r, obj, m[0] == 'u' ? 'u' : m[0] == 'l' ? 'l' : m[0] == 't' ? 't' : 'c');
            return 1;
        }
        if (key_is(m, mn, "startswith") || key_is(m, mn, "endswith")) {
            struct val p;
            if (!getarg(a, 0, NULL, &p))
                rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "%.*s() takes an argument", (int)mn, m);
            *out = mkbool(str_affix(r, line, obj, p, m[0] == 'e'));
            return 1;
        }
        if (key_is(m, mn, "split")) {
            struct val mx = arg_or(a, 1, "maxsplit", mkint(-1));
            *out = str_split(r, line, obj, arg_or(a, 0, "sep", none),
                             need_int(r, line, mx, "maxsplit"));
            return 1;
        }
        if (key_is(m, mn, "replace")) {
            struct val o, n;
            if (!getarg(a, 0, NULL, &o) || !getarg(a, 1, NULL, &n))
                rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "replace() takes two arguments");
            *out = str_replace(r, line, obj, o, n,
                               need_int(r, line, arg_or(a, 2, "count", mkint(-1)), "count"));
            return 1;
        }
        if (key_is(m, mn, "find") || key_is(m, mn, "count")) {
            struct val sub = need_str(r, line, arg_or(a, 0, NULL, mkv(V_UNDEF)), "find");
            if (m[0] == 'f') {
                const char *hit = sub.n ? memmem(obj.u.s, obj.n, sub.u.s, sub.n) : obj.u.s;
                *out = mkint(hit ? (int64_t)cp_count(obj.u.s, (size_t)(hit - obj.u.s)) : -1);
            } else {
                int64_t c = 0;
                size_t i = 0;
                if (sub.n == 0)
                    c = (int64_t)cp_count(obj.u.s, obj.n) + 1;
                else
                    while (i < obj.n) {
                        const char *hit = memmem(obj.u.s + i, obj.n - i, sub.u.s, sub.n);
                        if (!hit)
                            break;
                        c++;
                        i = (size_t)(hit - obj.u.s) + sub.n;
                    }
                *out = mkint(c);
            }
            return 1;
        }
        if (key_is(m, mn, "join")) {
            struct val it = arg_or(a, 0, NULL, mkv(V_UNDEF));
            *out = join(r, line, iterate(r, line, it), obj, none);
            return 1;
        }
        return 0;
    }
    if (obj.t == V_DICT) {
        struct vdict *d = obj.u.d;
        if (key_is(m, mn, "items") || key_is(m, mn, "keys") || key_is(m, mn, "values")) {
            struct vlist *l = newlist(r, d->n);
            for (size_t i = 0; i < d->n; i++) {
                if (m[0] == 'k') {
                    l->v[i] = d->k[i];
                } else if (m[0] == 'v') {
                    l->v[i] = d->v[i];
                } else {
                    struct vlist *pair = newlist(r, 2);
                    pair->v[0] = d->k[i];
                    pair->v[1] = d->v[i];
                    l->v[i] = mklist(pair);
                }
            }
            step(r, line, d->n);
            *out = mklist(l);
            return 1;
        }
        if (key_is(m, mn, "get")) {
            struct val k = arg_or(a, 0, "key", mkv(V_UNDEF));
            struct val *v = dict_find(d, k);
            *out = v ? *v : arg_or(a, 1, "default", none);
            return 1;
        }
        return 0;
    }
    if (obj.t == V_LOOP && key_is(m, mn, "cycle")) {
        if (a->n == 0)
            rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "no items for cycling given");
        *out = a->v[obj.u.lp->i % a->n];
        return 1;
    }
    if (obj.t == V_LIST || obj.t == V_DICT || obj.t == V_NS) {
        static const char *const mut[] = {"append", "extend", "insert", "pop", "remove", "clear",
                                          "update", "sort", "reverse", "setdefault", "popitem",
                                          NULL};
        for (int i = 0; mut[i]; i++)
            if (key_is(m, mn, mut[i]))
                rfail(r, line, CHAT_TEMPLATE_ERUNTIME,
                      "%s.%s() is not allowed: template values are immutable", type_name(obj),
                      mut[i]);
    }
    return 0;
}

/* ---------------------------------------------------------------- tests */

static int run_test(struct rctx *r, int line, const char *t, size_t tn, struct val v,
                    const struct cargs *a)
{
    struct val x = arg_or(a, 0, NULL, mkv(V_UNDEF));
    if (key_is(t, tn, "defined"))
        return v.t != V_UNDEF;
    if (key_is(t, tn, "undefined"))
        return v.t == V_UNDEF;
    if (key_is(t, tn, "none"))
        return v.t == V_NONE;
    if (key_is(t, tn, "boolean"))
        return v.t == V_BOOL;
    if (key_is(t, tn, "true"))
        return v.t == V_BOOL && v.u.i;
    if (key_is(t, tn, "false"))
        return v.t == V_BOOL && !v.u.i;
    if (key_is(t, tn, "integer"))
        return v.t == V_INT;
    if (key_is(t, tn, "float"))
        return v.t == V_FLOAT;
    if (key_is(t, tn, "number"))
        return is_num(v);
    if (key_is(t, tn, "string"))
        return v.t == V_STR;
    if (key_is(t, tn, "mapping"))
        return v.t == V_DICT;
    if (key_is(t, tn, "iterable"))
        return v.t == V_LIST || v.t == V_DICT || v.t == V_STR || v.t == V_UNDEF ||
               v.t == V_RANGE;
    if (key_is(t, tn, "sequence"))
        return v.t == V_LIST || v.t == V_DICT || v.t == V_STR || v.t == V_UNDEF ||
               v.t == V_RANGE;
    if (key_is(t, tn, "callable"))
        return v.t == V_MACRO || v.t == V_BUILTIN;
    if (key_is(t, tn, "sameas"))
        return v.t == x.t && (v.t == V_NONE || v.t == V_UNDEF || val_eq(v, x)) &&
               (v.t != V_LIST || v.u.l == x.u.l) && (v.t != V_DICT || v.u.d == x.u.d);
    if (key_is(t, tn, "eq") || key_is(t, tn, "equalto") || key_is(t, tn, "=="))
        return val_eq(v, x);
    if (key_is(t, tn, "ne") || key_is(t, tn, "!="))
        return !val_eq(v, x);
    if (key_is(t, tn, "lt") || key_is(t, tn, "lessthan") || key_is(t, tn, "<"))
        return val_lt(r, line, v, x);
    if (key_is(t, tn, "gt") || key_is(t, tn, "greaterthan") || key_is(t, tn, ">"))
        return val_lt(r, line, x, v);
    if (key_is(t, tn, "le") || key_is(t, tn, "<="))
        return !val_lt(r, line, x, v);
    if (key_is(t, tn, "ge") || key_is(t, tn, ">="))
        return !val_lt(r, line, v, x);
    if (key_is(t, tn, "in"))
        return contains(r, line, x, v);
    if (key_is(t, tn, "odd") || key_is(t, tn, "even")) {
        int64_t i = need_int(r, line, v, "odd/even test");
        return (i % 2 != 0) == (t[0] == 'o');
    }
    if (key_is(t, tn, "divisibleby")) {
        int64_t d = need_int(r, line, x, "divisibleby");
        if (d == 0)
            rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "integer division or modulo by zero");
        return need_int(r, line, v, "divisibleby") % d == 0;
    }
    if (key_is(t, tn, "lower") || key_is(t, tn, "upper")) {
        struct val s = to_str(r, v);
        int has = 0;
        for (size_t i = 0; i < s.n; i++) {
            char c = s.u.s[i];
            if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
                has = 1;
                if ((t[0] == 'l') != (c >= 'a' && c <= 'z'))
                    return 0;
            }
        }
        return has;
    }
    rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "no test named '%.*s'", (int)(tn > 64 ? 64 : tn), t);
}

/* -------------------------------------------------------------- filters */

static struct val apply_filter(struct rctx *r, int line, const char *f, size_t fn, struct val v,
                               const struct cargs *a);

/* select/reject/selectattr/rejectattr */
static struct val filter_select(struct rctx *r, int line, struct val v, const struct cargs *a,
                                int by_attr, int keep)
{
    struct vlist *in = iterate(r, line, v);
    struct vlist *outl = newlist(r, in->n);
    size_t no = 0;
    struct val attr = mkv(V_UNDEF), test = mkv(V_UNDEF);
    size_t first_arg = 0;
    if (by_attr) {
        attr = need_str(r, line, arg_or(a, 0, NULL, mkv(V_UNDEF)), "selectattr");
        first_arg = 1;
    }
    getarg(a, first_arg, NULL, &test);
    struct cargs rest = {0};
    size_t p = 0;
    for (size_t i = 0; i < a->n; i++)
        if (!a->kw[i] && p++ > first_arg)
            rest.v[rest.n++] = a->v[i];
    for (size_t i = 0; i < in->n; i++) {
        step(r, line, 1);
        struct val x = in->v[i];
        if (by_attr)
            x = get_item(r, line, x, attr);
        int ok;
        if (test.t == V_UNDEF)
            ok = truthy(x);
        else
            ok = run_test(r, line, need_str(r, line, test, "select").u.s, test.n, x, &rest);
        if (ok == keep)
            outl->v[no++] = in->v[i];
    }
    outl->n = no;
    return mklist(outl);
}

static struct val filter_tojson(struct rctx *r, int line, struct val v, const struct cargs *a)
{
    struct json_style st = {0};
    st.ascii = truthy(arg_or(a, 0, "ensure_ascii", mkbool(0)));
    struct val ind = arg_or(a, 1, "indent", mkv(V_NONE));
    st.indent = -1;
    if (ind.t == V_INT) {
        if (ind.u.i < 0 || ind.u.i > 64)
            rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "tojson: indent out of range");
        st.indent = (int)ind.u.i;
    } else if (ind.t == V_STR) {
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "tojson: string indent is not supported");
    }
    st.item_sep = st.indent >= 0 ? "," : ", ";
    st.key_sep = ": ";
    struct val seps = arg_or(a, 2, "separators", mkv(V_NONE));
    if (seps.t == V_LIST && seps.u.l->n == 2 && seps.u.l->v[0].t == V_STR &&
        seps.u.l->v[1].t == V_STR) {
        st.item_sep = seps.u.l->v[0].u.s;
        st.item_sep_n = seps.u.l->v[0].n;
        st.key_sep = seps.u.l->v[1].u.s;
        st.key_sep_n = seps.u.l->v[1].n;
    } else {
        st.item_sep_n = strlen(st.item_sep);
        st.key_sep_n = strlen(st.key_sep);
    }
    st.sort = truthy(arg_or(a, 3, "sort_keys", mkbool(0)));
    struct sb b = {0};
    put_json(r, line, &b, v, &st, 0);
    return sb_val(r, &b);
}

static struct val parse_number(struct val s, int want_float, struct val def)
{
    char buf[64];
    size_t n = s.n;
    const char *p = s.u.s;
    while (n && (*p == ' ' || *p == '\t' || *p == '\n'))
        p++, n--;
    while (n && (p[n - 1] == ' ' || p[n - 1] == '\t' || p[n - 1] == '\n'))
        n--;
    if (n == 0 || n >= sizeof(buf))
        return def;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (p[i] != '_')
            buf[k++] = p[i];
    buf[k] = '\0';
    char *end;
    errno = 0;
    if (!want_float) {
        long long i = strtoll(buf, &end, 10);
        if (*end == '\0' && errno == 0)
            return mkint(i);
    }
    double d = strtod(buf, &end);
    if (*end != '\0' || isnan(d) || isinf(d))
        return def;
    if (want_float)
        return mkfloat(d);
    if (d >= 9.2e18 || d <= -9.2e18)
        return def;
    return mkint((int64_t)d);
}

static struct val apply_filter(struct rctx *r, int line, const char *f, size_t fn, struct val v,
                               const struct cargs *a)
{
    struct val none = mkv(V_NONE), undef = mkv(V_UNDEF);
#define IS(name) key_is(f, fn, name)
    if (IS("safe"))
        return v;
    if (IS("tojson"))
        return filter_tojson(r, line, v, a);
    if (IS("default") || IS("d")) {
        int boolean = truthy(arg_or(a, 1, "boolean", mkbool(0)));
        if (v.t == V_UNDEF || (boolean && !truthy(v)))
            return arg_or(a, 0, "default_value", mkstr_ref(r, line, "", 0));
        return v;
    }
    if (IS("length") || IS("count")) {
        switch (v.t) {
        case V_STR: return mkint((int64_t)cp_count(v.u.s, v.n));
        case V_LIST: return mkint((int64_t)v.u.l->n);
        case V_DICT:
        case V_NS: return mkint((int64_t)v.u.d->n);
        case V_UNDEF: return mkint(0);
        case V_RANGE: return mkint((int64_t)v.u.rg->n);
        default:
            rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "object of type '%s' has no len()",
                  type_name(v));
        }
    }
    if (IS("string"))
        return to_str(r, v);
    if (IS("trim"))
        return str_strip(r, to_str(r, v), arg_or(a, 0, "chars", none), 3);
    if (IS("upper"))
        return str_case(r, to_str(r, v), 'u');
    if (IS("lower"))
        return str_case(r, to_str(r, v), 'l');
    if (IS("capitalize"))
        return str_case(r, to_str(r, v), 'c');
    if (IS("title"))
        return str_case(r, to_str(r, v), 'j');
    if (IS("replace")) {
        struct val o, n;
        if (!getarg(a, 0, "old", &o) || !getarg(a, 1, "new", &n))
            rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "replace filter takes two arguments");
        struct val c = arg_or(a, 2, "count", none);
        return str_replace(r, line, to_str(r, v), to_str(r, o), n,
                           c.t == V_NONE ? -1 : need_int(r, line, c, "count"));
    }
    if (IS("join"))
        return join(r, line, iterate(r, line, v), arg_or(a, 0, "d", mkstr_ref(r, line, "", 0)),
                    arg_or(a, 1, "attribute", none));
    if (IS("first") || IS("last")) {
        if (v.t == V_STR) {
            if (v.n == 0)
                return mkundef(NULL, 0);
            struct val sv[3] = {mkint(f[0] == 'f' ? 0 : -1), none, none};
            return get_item(r, line, v, sv[0]);
        }
        struct vlist *l = iterate(r, line, v);
        if (l->n == 0)
            return mkundef(NULL, 0);
        return l->v[f[0] == 'f' ? 0 : l->n - 1];
    }
    if (IS("list"))
        return mklist(iterate(r, line, v));
    if (IS("reverse")) {
        if (v.t == V_STR) {
            struct val sv[3] = {none, none, mkint(-1)};
            return do_slice(r, line, v, sv);
        }
        struct vlist *in = iterate(r, line, v);
        struct vlist *o = newlist(r, in->n);
        for (size_t i = 0; i < in->n; i++)
            o->v[i] = in->v[in->n - 1 - i];
        return mklist(o);
    }
    if (IS("int") || IS("float")) {
        int fl = f[0] == 'f';
        struct val def = arg_or(a, 0, "default", fl ? mkfloat(0.0) : mkint(0));
        switch (v.t) {
        case V_INT:
        case V_BOOL: return fl ? mkfloat((double)v.u.i) : mkint(v.u.i);
        case V_FLOAT:
            if (fl)
                return v;
            if (isnan(v.u.f) || v.u.f >= 9.2e18 || v.u.f <= -9.2e18)
                return def;
            return mkint((int64_t)v.u.f);
        case V_STR: return parse_number(v, fl, def);
        default: return def;
        }
    }
    if (IS("abs")) {
        if (v.t == V_INT)
            return v.u.i == INT64_MIN ? mkfloat(9.2233720368547758e18) : mkint(v.u.i < 0 ? -v.u.i : v.u.i);
        if (v.t == V_FLOAT)
            return mkfloat(fabs(v.u.f));
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "bad operand type for abs(): '%s'", type_name(v));
    }
    if (IS("items")) {
        if (v.t == V_UNDEF)
            return mklist(newlist(r, 0));
        if (v.t != V_DICT)
            rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "items filter expects a mapping, got %s",
                  type_name(v));
        struct val out;
        struct cargs none_args = {0};
        call_method(r, line, v, "items", 5, &none_args, &out);
        return out;
    }
    if (IS("selectattr") || IS("rejectattr"))
        return filter_select(r, line, v, a, 1, f[0] == 's');
    if (IS("select") || IS("reject"))
        return filter_select(r, line, v, a, 0, f[0] == 's');
    if (IS("map")) {
        struct vlist *in = iterate(r, line, v);
        struct vlist *o = newlist(r, in->n);
        struct val attr;
        int by_attr = getarg(a, 99, "attribute", &attr);
        struct val fname = arg_or(a, 0, NULL, undef);
        struct val def = arg_or(a, 99, "default", undef);
        struct cargs rest = {0};
        size_t p = 0;
        for (size_t i = 0; i < a->n; i++)
            if (!a->kw[i] && p++ > 0)
                rest.v[rest.n++] = a->v[i];
        if (!by_attr)
            need_str(r, line, fname, "map");
        for (size_t i = 0; i < in->n; i++) {
            step(r, line, 1);
            if (by_attr) {
                o->v[i] = get_item(r, line, in->v[i], attr);
                if (o->v[i].t == V_UNDEF && def.t != V_UNDEF)
                    o->v[i] = def;
            } else {
                o->v[i] = apply_filter(r, line, fname.u.s, fname.n, in->v[i], &rest);
            }
        }
        return mklist(o);
    }
    if (IS("attr")) {
        struct val n = need_str(r, line, arg_or(a, 0, NULL, undef), "attr");
        return get_attr(r, line, v, n.u.s, n.n);
    }
    if (IS("escape") || IS("e")) {
        struct val s = to_str(r, v);
        struct sb b = {0};
        for (size_t i = 0; i < s.n; i++) {
            switch (s.u.s[i]) {
            case '&': sb_puts(r, &b, "&amp;"); break;
            case '<': sb_puts(r, &b, "&lt;"); break;
            case '>': sb_puts(r, &b, "&gt;"); break;
            case '"': sb_puts(r, &b, "&#34;"); break;
            case '\'': sb_puts(r, &b, "&#39;"); break;
            default: sb_putc(r, &b, s.u.s[i]);
            }
        }
        return sb_val(r, &b);
    }
    if (IS("indent")) {
        struct val w = arg_or(a, 0, "width", mkint(4));
        int first = truthy(arg_or(a, 1, "first", mkbool(0)));
        int blank = truthy(arg_or(a, 2, "blank", mkbool(0)));
        struct val ind;
        if (w.t == V_STR) {
            ind = w;
        } else {
            int64_t k = need_int(r, line, w, "indent");
            if (k < 0 || k > 256)
                rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "indent width out of range");
            char *sp = ralloc(r, (size_t)k + 1);
            memset(sp, ' ', (size_t)k);
            ind = mkstr_ref(r, line, sp, (size_t)k);
        }
        struct val s = to_str(r, v);
        struct sb b = {0};
        if (first)
            sb_put(r, &b, ind.u.s, ind.n);
        size_t i = 0, lineno = 0;
        while (i <= s.n) {
            const char *nl = memchr(s.u.s + i, '\n', s.n - i);
            size_t e = nl ? (size_t)(nl - s.u.s) : s.n;
            if (!nl && e == i && lineno > 0)
                break; /* the text ended with a newline */
            if (lineno > 0) {
                sb_putc(r, &b, '\n');
                if (blank || e > i)
                    sb_put(r, &b, ind.u.s, ind.n);
            }
            sb_put(r, &b, s.u.s + i, e - i);
            lineno++;
            if (!nl)
                break;
            i = e + 1;
        }
        return sb_val(r, &b);
    }
#undef IS
    rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "no filter named '%.*s'", (int)(fn > 64 ? 64 : fn), f);
}

/* ------------------------------------------------------------- calls */

static void emit(struct rctx *r, int line, const char *s, size_t n)
{
    if (n > r->max_out - r->out_n)
        rfail(r, line, CHAT_TEMPLATE_ELIMIT, "template output exceeds %zu bytes", r->max_out);
    if (r->out_n + n + 1 > r->out_cap) {
        size_t nc = r->out_cap ? r->out_cap : 4096;
        while (nc < r->out_n + n + 1)
            nc *= 2;
        char *np = realloc(r->out, nc);
        if (!np)
            rfail(r, line, CHAT_TEMPLATE_ELIMIT, "out of memory for the template output");
        r->out = np;
        r->out_cap = nc;
    }
    if (n) /* an undefined variable prints nothing, from s == NULL */
        memcpy(r->out + r->out_n, s, n);
    r->out_n += n;
    r->steps += n / 64;
}

/* Renders body into a string (macro calls, {% set x %}...{% endset %}):
 * the text goes to the output buffer, so the output cap bounds it, and is
 * then cut off into the arena. */
static struct val capture(struct rctx *r, int line, struct jinja_node *const *body, size_t n)
{
    size_t mark = r->out_n;
    exec_body(r, body, n);
    size_t len = r->out_n - mark;
    char *s = ralloc(r, len + 1);
    if (len)
        memcpy(s, r->out + mark, len);
    s[len] = '\0';
    r->out_n = mark;
    return mkstr_ref(r, line, s, len);
}

static struct val call_macro(struct rctx *r, int line, const struct jinja_node *m,
                             const struct cargs *a)
{
    if (r->call_depth >= MAX_CALL_DEPTH)
        rfail(r, line, CHAT_TEMPLATE_ELIMIT, "macro calls nested deeper than %d",
              MAX_CALL_DEPTH);
    struct frame *f = push_frame(r, r->root);
    size_t pos = 0;
    for (size_t i = 0; i < a->n; i++) {
        if (a->kw[i])
            continue;
        if (pos >= m->n_names)
            rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "macro '%.*s' takes not more than %zu "
                  "argument(s)", (int)m->str_len, m->str, m->n_names);
        frame_set(r, f, m->names[pos], m->name_lens[pos], a->v[i]);
        pos++;
    }
    for (size_t i = 0; i < a->n; i++) {
        if (!a->kw[i])
            continue;
        size_t k;
        for (k = 0; k < m->n_names; k++)
            if (m->name_lens[k] == a->kwl[i] && memcmp(m->names[k], a->kw[i], a->kwl[i]) == 0)
                break;
        if (k == m->n_names)
            rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "macro '%.*s' has no parameter '%.*s'",
                  (int)m->str_len, m->str, (int)a->kwl[i], a->kw[i]);
        frame_set(r, f, m->names[k], m->name_lens[k], a->v[i]);
    }
    struct frame *saved = r->cur;
    r->cur = f;
    for (size_t k = 0; k < m->n_names; k++) {
        int set = 0;
        for (size_t i = 0; i < f->n; i++)
            if (f->names[i] == m->names[k])
                set = 1;
        if (!set)
            frame_set(r, f, m->names[k], m->name_lens[k],
                      m->args[k] ? eval(r, m->args[k]) : mkundef(m->names[k], m->name_lens[k]));
    }
    r->call_depth++;
    int saved_ctl = r->ctl;
    struct val v = capture(r, line, m->body, m->n_body);
    r->ctl = saved_ctl;
    r->call_depth--;
    r->cur = saved;
    return v;
}

static struct val call_builtin(struct rctx *r, int line, int b, const struct cargs *a)
{
    switch (b) {
    case B_RANGE: {
        int64_t lo = 0, hi, st = 1;
        struct val x;
        size_t np = 0;
        for (size_t i = 0; i < a->n; i++)
            np += !a->kw[i];
        if (np == 0 || np > 3)
            rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "range expected 1 to 3 arguments");
        getarg(a, 0, NULL, &x);
        hi = need_int(r, line, x, "range");
        if (np >= 2) {
            lo = hi;
            getarg(a, 1, NULL, &x);
            hi = need_int(r, line, x, "range");
        }
        if (np == 3) {
            getarg(a, 2, NULL, &x);
            st = need_int(r, line, x, "range");
            if (st == 0)
                rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "range() arg 3 must not be zero");
        }
        uint64_t cnt = 0;
        if (st > 0 && hi > lo)
            cnt = ((uint64_t)hi - (uint64_t)lo + (uint64_t)st - 1) / (uint64_t)st;
        else if (st < 0 && lo > hi)
            cnt = ((uint64_t)lo - (uint64_t)hi + (uint64_t)(-st) - 1) / (uint64_t)(-st);
        if (cnt > ((uint64_t)1 << 40))
            rfail(r, line, CHAT_TEMPLATE_ELIMIT, "range of %llu items is too long",
                  (unsigned long long)cnt);
        struct vrange *g = ralloc(r, sizeof(*g));
        g->start = lo;
        g->step = st;
        g->n = (size_t)cnt;
        struct val v = mkv(V_RANGE);
        v.u.rg = g;
        return v;
    }
    case B_NAMESPACE:
    case B_DICT: {
        struct vdict *d = newdict(r, a->n + 1);
        for (size_t i = 0; i < a->n; i++) {
            if (a->kw[i]) {
                dict_set(r, d, mkstr_ref(r, line, a->kw[i], a->kwl[i]), a->v[i]);
            } else if (a->v[i].t == V_DICT) {
                for (size_t k = 0; k < a->v[i].u.d->n; k++)
                    dict_set(r, d, a->v[i].u.d->k[k], a->v[i].u.d->v[k]);
            } else {
                rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "%s() takes keyword arguments",
                      b == B_DICT ? "dict" : "namespace");
            }
        }
        struct val v = mkv(b == B_DICT ? V_DICT : V_NS);
        v.u.d = d;
        return v;
    }
    case B_RAISE: {
        struct val m = to_str(r, arg_or(a, 0, NULL, mkstr_ref(r, line, "", 0)));
        if (r->err && r->errlen)
            snprintf(r->err, r->errlen, "%.*s", (int)(m.n > 4096 ? 4096 : m.n), m.u.s);
        r->rc = CHAT_TEMPLATE_ERAISED;
        longjmp(r->jb, 1);
    }
    case B_STRFTIME: {
        struct val fmt = need_str(r, line, arg_or(a, 0, NULL, mkv(V_UNDEF)), "strftime_now");
        char f[128], buf[256];
        if (fmt.n >= sizeof(f))
            rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "strftime_now: format too long");
        memcpy(f, fmt.u.s, fmt.n);
        f[fmt.n] = '\0';
        time_t now = time(NULL);
        struct tm tm;
        localtime_r(&now, &tm);
        size_t n = strftime(buf, sizeof(buf), f, &tm);
        char *s = ralloc(r, n + 1);
        memcpy(s, buf, n + 1);
        return mkstr_ref(r, line, s, n);
    }
    }
    rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "unknown function");
}

static struct val eval_call(struct rctx *r, const struct jinja_node *n)
{
    struct cargs a;
    const struct jinja_node *fn = n->a;
    if (fn->kind == JE_ATTR) {
        struct val obj = eval(r, fn->a);
        check_attr_name(r, n->line, fn->str, fn->str_len);
        if (obj.t == V_UNDEF)
            undefined_error(r, n->line, obj);
        eval_args(r, n, &a);
        struct val out;
        if (call_method(r, n->line, obj, fn->str, fn->str_len, &a, &out))
            return out;
        struct val f = get_attr(r, n->line, obj, fn->str, fn->str_len);
        if (f.t == V_MACRO)
            return call_macro(r, n->line, f.u.m, &a);
        if (f.t == V_BUILTIN)
            return call_builtin(r, n->line, f.u.b, &a);
        rfail(r, n->line, CHAT_TEMPLATE_ERUNTIME, "'%s' object has no method '%.*s'",
              type_name(obj), (int)(fn->str_len > 64 ? 64 : fn->str_len), fn->str);
    }
    struct val f = eval(r, fn);
    eval_args(r, n, &a);
    if (f.t == V_MACRO)
        return call_macro(r, n->line, f.u.m, &a);
    if (f.t == V_BUILTIN)
        return call_builtin(r, n->line, f.u.b, &a);
    if (f.t == V_UNDEF)
        undefined_error(r, n->line, f);
    rfail(r, n->line, CHAT_TEMPLATE_ERUNTIME, "'%s' object is not callable", type_name(f));
}

static struct val eval_literal(struct rctx *r, const struct jinja_node *n)
{
    switch (n->lit) {
    case JL_NONE: return mkv(V_NONE);
    case JL_BOOL: return mkbool((int)n->lit_i);
    case JL_INT: return mkint(n->lit_i);
    case JL_FLOAT: return mkfloat(n->lit_f);
    case JL_STR: return mkstr_ref(r, n->line, n->str, n->str_len);
    }
    return mkv(V_NONE);
}

static struct val range_at(const struct vrange *g, size_t i)
{
    return mkint(g->start + (int64_t)i * g->step);
}

static struct val eval(struct rctx *r, const struct jinja_node *n)
{
    step(r, n->line, 1);
    r->line = n->line;
    switch (n->kind) {
    case JE_LITERAL: return eval_literal(r, n);
    case JE_NAME: return lookup(r, n->str, n->str_len);
    case JE_ATTR: return get_attr(r, n->line, eval(r, n->a), n->str, n->str_len);
    case JE_ITEM: {
        struct val o = eval(r, n->a);
        return get_item(r, n->line, o, eval(r, n->b));
    }
    case JE_SLICE: {
        struct val o = eval(r, n->a);
        struct val sv[3];
        sv[0] = n->b ? eval(r, n->b) : mkv(V_NONE);
        sv[1] = n->c ? eval(r, n->c) : mkv(V_NONE);
        sv[2] = n->d ? eval(r, n->d) : mkv(V_NONE);
        return do_slice(r, n->line, o, sv);
    }
    case JE_CALL: return eval_call(r, n);
    case JE_FILTER: {
        struct val v = eval(r, n->a);
        struct cargs a;
        eval_args(r, n, &a);
        return apply_filter(r, n->line, n->str, n->str_len, v, &a);
    }
    case JE_TEST: {
        struct val v = eval(r, n->a);
        struct cargs a;
        eval_args(r, n, &a);
        int t = run_test(r, n->line, n->str, n->str_len, v, &a);
        return mkbool(n->op ? !t : t);
    }
    case JE_NOT: return mkbool(!truthy(eval(r, n->a)));
    case JE_NEG:
    case JE_POS: {
        struct val v = eval(r, n->a);
        if (v.t == V_INT || v.t == V_BOOL) {
            if (n->kind == JE_POS)
                return mkint(v.u.i);
            if (v.u.i == INT64_MIN)
                rfail(r, n->line, CHAT_TEMPLATE_ERUNTIME, "integer overflow");
            return mkint(-v.u.i);
        }
        if (v.t == V_FLOAT)
            return mkfloat(n->kind == JE_NEG ? -v.u.f : v.u.f);
        if (v.t == V_UNDEF)
            undefined_error(r, n->line, v);
        rfail(r, n->line, CHAT_TEMPLATE_ERUNTIME, "bad operand type for unary %c: '%s'",
              n->kind == JE_NEG ? '-' : '+', type_name(v));
    }
    case JE_BINOP: {
        struct val a = eval(r, n->a);
        return binop(r, n->line, n->op, a, eval(r, n->b));
    }
    case JE_AND: {
        struct val a = eval(r, n->a);
        return truthy(a) ? eval(r, n->b) : a;
    }
    case JE_OR: {
        struct val a = eval(r, n->a);
        return truthy(a) ? a : eval(r, n->b);
    }
    case JE_COMPARE: {
        struct val left = eval(r, n->a);
        for (size_t i = 0; i < n->n_args; i++) {
            struct val right = eval(r, n->args[i]);
            int ok;
            switch (n->ops[i]) {
            case JOP_EQ: ok = val_eq(left, right); break;
            case JOP_NE: ok = !val_eq(left, right); break;
            case '<': ok = val_lt(r, n->line, left, right); break;
            case '>': ok = val_lt(r, n->line, right, left); break;
            case JOP_LE: ok = !val_lt(r, n->line, right, left); break;
            case JOP_GE: ok = !val_lt(r, n->line, left, right); break;
            case JOP_IN: ok = contains(r, n->line, right, left); break;
            default: ok = !contains(r, n->line, right, left); break;
            }
            if (!ok)
                return mkbool(0);
            left = right;
        }
        return mkbool(1);
    }
    case JE_COND:
        if (truthy(eval(r, n->a)))
            return eval(r, n->b);
        return n->c ? eval(r, n->c) : mkundef(NULL, 0);
    case JE_LIST:
    case JE_TUPLE: {
        struct vlist *l = newlist(r, n->n_args);
        for (size_t i = 0; i < n->n_args; i++)
            l->v[i] = eval(r, n->args[i]);
        return mklist(l);
    }
    case JE_DICT: {
        struct vdict *d = newdict(r, n->n_args / 2 + 1);
        for (size_t i = 0; i + 1 < n->n_args; i += 2) {
            struct val k = eval(r, n->args[i]);
            dict_set(r, d, k, eval(r, n->args[i + 1]));
        }
        struct val v = mkv(V_DICT);
        v.u.d = d;
        return v;
    }
    default:
        rfail(r, n->line, CHAT_TEMPLATE_ERUNTIME, "statement used as an expression");
    }
}

/* ----------------------------------------------------------- statements */

static void assign_targets(struct rctx *r, int line, struct frame *f, const struct jinja_node *n,
                           struct val v)
{
    if (n->n_names == 1) {
        frame_set(r, f, n->names[0], n->name_lens[0], v);
        return;
    }
    struct vlist *l = iterate(r, line, v);
    if (l->n != n->n_names)
        rfail(r, line, CHAT_TEMPLATE_ERUNTIME, "cannot unpack %zu values into %zu names", l->n,
              n->n_names);
    for (size_t i = 0; i < l->n; i++)
        frame_set(r, f, n->names[i], n->name_lens[i], l->v[i]);
}

static void exec_for(struct rctx *r, const struct jinja_node *n)
{
    struct val seq = eval(r, n->a);
    const struct vrange *range = seq.t == V_RANGE && !n->b ? seq.u.rg : NULL;
    struct vlist *items = range ? NULL : iterate(r, n->line, seq);
    size_t count = range ? range->n : items->n;
    struct frame *f = push_frame(r, r->cur);
    struct frame *saved = r->cur;
    r->cur = f;
    if (n->b) {
        /* The loop filter runs first, so loop.length counts what passes. */
        struct vlist *kept = newlist(r, items->n);
        size_t k = 0;
        for (size_t i = 0; i < items->n; i++) {
            assign_targets(r, n->line, f, n, items->v[i]);
            if (truthy(eval(r, n->b)))
                kept->v[k++] = items->v[i];
        }
        kept->n = k;
        items = kept;
    }
    struct loopst *lp = ralloc(r, sizeof(*lp));
    lp->range = range;
    lp->items = range ? NULL : items->v;
    lp->n = range ? range->n : items->n;
    struct val lv = mkv(V_LOOP);
    lv.u.lp = lp;
    count = lp->n;
    for (size_t i = 0; i < count; i++) {
        step(r, n->line, 1);
        lp->i = i;
        /* each iteration starts from the loop's own scope */
        f->n = 0;
        frame_set(r, f, "loop", 4, lv);
        assign_targets(r, n->line, f, n, range ? range_at(range, i) : items->v[i]);
        exec_body(r, n->body, n->n_body);
        if (r->ctl == 1) {
            r->ctl = 0;
            break;
        }
        r->ctl = 0;
    }
    r->cur = saved;
    if (count == 0)
        exec_body(r, n->orelse, n->n_orelse);
}

static void exec_node(struct rctx *r, const struct jinja_node *n)
{
    step(r, n->line, 1);
    r->line = n->line;
    switch (n->kind) {
    case JN_TEXT: emit(r, n->line, n->str, n->str_len); return;
    case JN_OUTPUT: {
        struct val v = eval(r, n->a);
        if (v.t == V_STR) {
            emit(r, n->line, v.u.s, v.n);
        } else {
            struct sb b = {0};
            put_str(r, &b, v, 0);
            emit(r, n->line, b.p, b.n);
        }
        return;
    }
    case JN_IF:
        if (truthy(eval(r, n->a)))
            exec_body(r, n->body, n->n_body);
        else
            exec_body(r, n->orelse, n->n_orelse);
        return;
    case JN_FOR: exec_for(r, n); return;
    case JN_SET: assign_targets(r, n->line, r->cur, n, eval(r, n->a)); return;
    case JN_SET_ATTR: {
        struct val ns = lookup(r, n->str, n->str_len);
        if (ns.t != V_NS)
            rfail(r, n->line, CHAT_TEMPLATE_ERUNTIME,
                  "cannot assign attribute on non-namespace object '%.*s'", (int)n->str_len,
                  n->str);
        check_attr_name(r, n->line, n->str2, n->str2_len);
        struct val v = eval(r, n->a);
        dict_set(r, ns.u.d, mkstr_ref(r, n->line, n->str2, n->str2_len), v);
        return;
    }
    case JN_SET_BLOCK:
        frame_set(r, r->cur, n->str, n->str_len, capture(r, n->line, n->body, n->n_body));
        return;
    case JN_MACRO: {
        struct val m = mkv(V_MACRO);
        m.u.m = n;
        frame_set(r, r->cur, n->str, n->str_len, m);
        return;
    }
    case JN_BREAK: r->ctl = 1; return;
    case JN_CONTINUE: r->ctl = 2; return;
    default:
        rfail(r, n->line, CHAT_TEMPLATE_ERUNTIME, "expression used as a statement");
    }
}

static void exec_body(struct rctx *r, struct jinja_node *const *b, size_t n)
{
    for (size_t i = 0; i < n && !r->ctl; i++)
        exec_node(r, b[i]);
}

/* ---------------------------------------------------------------- API */

int chat_template_compile(const char *src, size_t len, struct chat_template **out, char *err,
                          size_t errlen)
{
    *out = NULL;
    struct chat_template *t = calloc(1, sizeof(*t));
    if (!t) {
        snprintf(err, errlen, "out of memory");
        return CHAT_TEMPLATE_ELIMIT;
    }
    /* The tree is a small multiple of the source; the cap stops a huge
     * template from taking unbounded memory. */
    arena_init(&t->t.arena, 64 * len + ((size_t)1 << 20));
    int rc = jinja_parse(&t->t, src, len, err, errlen);
    if (rc != 0) {
        chat_template_destroy(t);
        return rc == -2 ? CHAT_TEMPLATE_ELIMIT : CHAT_TEMPLATE_ESYNTAX;
    }
    *out = t;
    return 0;
}

void chat_template_destroy(struct chat_template *t)
{
    if (!t)
        return;
    arena_free(&t->t.arena);
    free(t);
}

/* Converts a JSON tree into template values; strings point into it. */
static struct val from_json(struct rctx *r, const struct json *j, int depth)
{
    if (depth > JINJA_MAX_NESTING)
        rfail(r, 0, CHAT_TEMPLATE_ELIMIT, "input nested too deeply");
    step(r, 0, 1);
    switch (json_type(j)) {
    case JSON_NULL: return mkv(V_NONE);
    case JSON_BOOL: return mkbool(json_bool(j));
    case JSON_NUMBER: {
        int64_t i;
        if (json_int64(j, &i) == 0)
            return mkint(i);
        return mkfloat(json_number(j));
    }
    case JSON_STRING: {
        size_t n;
        const char *s = json_str(j, &n);
        return mkstr_ref(r, 0, s, n);
    }
    case JSON_ARRAY: {
        size_t n = json_len(j);
        struct vlist *l = newlist(r, n);
        for (size_t i = 0; i < n; i++)
            l->v[i] = from_json(r, json_at(j, i), depth + 1);
        return mklist(l);
    }
    case JSON_OBJECT: {
        size_t n = json_len(j);
        struct vdict *d = newdict(r, n + 1);
        for (size_t i = 0; i < n; i++) {
            d->k[i] = mkstr_ref(r, 0, json_key_at(j, i), json_key_len(j, i));
            d->v[i] = from_json(r, json_at(j, i), depth + 1);
        }
        d->n = n;
        struct val v = mkv(V_DICT);
        v.u.d = d;
        return v;
    }
    }
    return mkv(V_NONE);
}

static void set_global(struct rctx *r, const char *name, struct val v)
{
    dict_set(r, r->globals, mkstr_ref(r, 0, name, strlen(name)), v);
}

struct render_in {
    const struct chat_template *t;
    const struct chat_message *msgs;
    size_t n_msgs;
    const struct json *jmsgs;
    const struct chat_render_opts *opts;
};

/* Everything that may fail runs here, below the setjmp in render(). */
static void render_body(struct rctx *r, const struct render_in *in)
{
    const struct chat_render_opts *opts = in->opts;
    r->globals = newdict(r, 16);
    struct val messages;
    if (in->jmsgs) {
        if (json_type(in->jmsgs) != JSON_ARRAY)
            rfail(r, 0, CHAT_TEMPLATE_ERUNTIME, "messages must be a JSON array");
        messages = from_json(r, in->jmsgs, 0);
    } else {
        struct vlist *l = newlist(r, in->n_msgs);
        for (size_t i = 0; i < in->n_msgs; i++) {
            const struct chat_message *m = &in->msgs[i];
            struct vdict *d = newdict(r, 2);
            dict_set(r, d, mkstr_ref(r, 0, "role", 4),
                     mkstr_ref(r, 0, m->role ? m->role : "", m->role ? strlen(m->role) : 0));
            dict_set(r, d, mkstr_ref(r, 0, "content", 7),
                     m->content ? mkstr_ref(r, 0, m->content, strlen(m->content))
                                : mkv(V_NONE));
            l->v[i] = mkv(V_DICT);
            l->v[i].u.d = d;
        }
        messages = mklist(l);
    }
    set_global(r, "messages", messages);
    set_global(r, "add_generation_prompt", mkbool(opts->add_generation_prompt));
    const char *bos = opts->bos_token ? opts->bos_token : "";
    const char *eos = opts->eos_token ? opts->eos_token : "";
    set_global(r, "bos_token", mkstr_ref(r, 0, bos, strlen(bos)));
    set_global(r, "eos_token", mkstr_ref(r, 0, eos, strlen(eos)));
    set_global(r, "tools", opts->tools ? from_json(r, opts->tools, 0) : mkv(V_NONE));
    if (opts->extra) {
        if (json_type(opts->extra) != JSON_OBJECT)
            rfail(r, 0, CHAT_TEMPLATE_ERUNTIME, "extra variables must be a JSON object");
        for (size_t i = 0; i < json_len(opts->extra); i++) {
            struct val k = mkstr_ref(r, 0, json_key_at(opts->extra, i),
                                     json_key_len(opts->extra, i));
            if (!dict_find(r->globals, k))
                dict_set(r, r->globals, k, from_json(r, json_at(opts->extra, i), 0));
        }
    }
    r->root = push_frame(r, NULL);
    r->cur = r->root;
    exec_body(r, in->t->t.body, in->t->t.n_body);
    emit(r, 0, "", 0); /* makes sure the buffer exists, for the NUL */
    r->out[r->out_n] = '\0';
}

static int render(const struct render_in *in, char **out, size_t *out_len, char *err,
                  size_t errlen)
{
    static const struct chat_render_opts defaults = {0};
    struct render_in local = *in;
    if (!local.opts)
        local.opts = &defaults;
    *out = NULL;
    if (out_len)
        *out_len = 0;
    if (err && errlen)
        err[0] = '\0';
    struct rctx *r = calloc(1, sizeof(*r));
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return CHAT_TEMPLATE_ELIMIT;
    }
    r->err = err;
    r->errlen = errlen;
    r->max_steps = local.opts->max_steps ? local.opts->max_steps : DEFAULT_MAX_STEPS;
    r->max_out = local.opts->max_output ? local.opts->max_output : DEFAULT_MAX_OUTPUT;
    arena_init(&r->ar, local.opts->max_memory ? local.opts->max_memory : DEFAULT_MAX_MEMORY);
    int rc = 0;
    if (setjmp(r->jb) == 0)
        render_body(r, &local);
    else
        rc = r->rc;
    if (rc == 0) {
        *out = r->out;
        if (out_len)
            *out_len = r->out_n;
        r->out = NULL;
    }
    free(r->out);
    arena_free(&r->ar);
    free(r);
    return rc;
}

int chat_template_render(const struct chat_template *t, const struct chat_message *msgs,
                         size_t n_msgs, const struct chat_render_opts *opts, char **out,
                         size_t *out_len, char *err, size_t errlen)
{
    struct render_in in = {.t = t, .msgs = msgs, .n_msgs = n_msgs, .opts = opts};
    return render(&in, out, out_len, err, errlen);
}

int chat_template_render_json(const struct chat_template *t, const struct json *messages,
                              const struct chat_render_opts *opts, char **out, size_t *out_len,
                              char *err, size_t errlen)
{
    struct render_in in = {.t = t, .jmsgs = messages, .opts = opts};
    return render(&in, out, out_len, err, errlen);
}
