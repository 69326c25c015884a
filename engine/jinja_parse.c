/* jinja_parse.c: lexer and parser of Jinja2 chat templates.
 *
 * Turns template source into the tree of jinja_ast.h, applying Jinja's
 * whitespace rules as Hugging Face configures them (trim_blocks and
 * lstrip_blocks on, one trailing newline dropped, newlines normalised).
 * Errors unwind with longjmp to jinja_parse: everything allocated lives in
 * the template's arena, which the caller frees, so nothing leaks.
 */
#include "engine/jinja_ast.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ lexer */

enum tok_kind { TK_TEXT, TK_VBEGIN, TK_VEND, TK_BBEGIN, TK_BEND, TK_NAME, TK_STR, TK_INT,
                TK_FLOAT, TK_OP, TK_EOF };

struct tok {
    enum tok_kind k;
    int line;
    int op;
    const char *s;
    size_t n;
    int64_t i;
    double f;
};

struct parser {
    struct jinja_template *t;
    const char *src; /* normalised copy */
    size_t len;
    struct tok *toks;
    size_t n_toks, cap_toks, pos;
    int depth;
    char *err;
    size_t errlen;
    int rc;
    jmp_buf jb;
};

static _Noreturn void perr(struct parser *p, int line, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static _Noreturn void perr(struct parser *p, int line, int rc, const char *fmt, ...)
{
    if (p->err && p->errlen) {
        int n = snprintf(p->err, p->errlen, "line %d: ", line);
        if (n >= 0 && (size_t)n < p->errlen) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(p->err + n, p->errlen - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    p->rc = rc;
    longjmp(p->jb, 1);
}

static void *palloc(struct parser *p, size_t n)
{
    void *v = arena_alloc(&p->t->arena, n);
    if (!v)
        perr(p, 0, -2, "template too large (out of memory)");
    memset(v, 0, n);
    return v;
}

static struct tok *push_tok(struct parser *p, enum tok_kind k, int line)
{
    if (p->n_toks == p->cap_toks) {
        size_t nc = p->cap_toks ? p->cap_toks * 2 : 256;
        struct tok *nt = palloc(p, nc * sizeof(*nt));
        if (p->n_toks)
            memcpy(nt, p->toks, p->n_toks * sizeof(*nt));
        p->toks = nt;
        p->cap_toks = nc;
    }
    struct tok *t = &p->toks[p->n_toks++];
    memset(t, 0, sizeof(*t));
    t->k = k;
    t->line = line;
    return t;
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

static int is_ident_start(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static size_t put_utf8(char *o, uint32_t cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decodes a string literal body the way Jinja does (Python's
 * unicode-escape): known escapes decode, unknown ones keep the backslash. */
static void lex_string(struct parser *p, size_t *pos, int *line, struct tok *t)
{
    char q = p->src[*pos];
    size_t i = *pos + 1, start = i;
    while (i < p->len && p->src[i] != q) {
        if (p->src[i] == '\\' && i + 1 < p->len)
            i++;
        if (p->src[i] == '\n')
            (*line)++;
        i++;
    }
    if (i >= p->len)
        perr(p, t->line, -1, "unterminated string literal");
    size_t n = i - start;
    char *o = palloc(p, n + 1);
    size_t on = 0;
    for (size_t j = start; j < i; j++) {
        char c = p->src[j];
        if (c != '\\' || j + 1 >= i) {
            o[on++] = c;
            continue;
        }
        char e = p->src[++j];
        int digits = 0;
        switch (e) {
        case 'n': o[on++] = '\n'; break;
        case 't': o[on++] = '\t'; break;
        case 'r': o[on++] = '\r'; break;
        case 'b': o[on++] = '\b'; break;
        case 'f': o[on++] = '\f'; break;
        case 'v': o[on++] = '\v'; break;
        case 'a': o[on++] = '\a'; break;
        case '\\': o[on++] = '\\'; break;
        case '\'': o[on++] = '\''; break;
        case '"': o[on++] = '"'; break;
        case '\n': break; /* line continuation */
        case 'x': digits = 2; break;
        case 'u': digits = 4; break;
        case 'U': digits = 8; break;
        default:
            if (e >= '0' && e <= '7') {
                uint32_t v = 0;
                int k = 0;
                while (k < 3 && j < i && p->src[j] >= '0' && p->src[j] <= '7') {
                    v = v * 8 + (uint32_t)(p->src[j] - '0');
                    j++;
                    k++;
                }
                j--;
                on += put_utf8(o + on, v);
            } else {
                o[on++] = '\\';
                o[on++] = e;
            }
        }
        if (digits) {
            uint32_t v = 0;
            for (int k = 0; k < digits; k++) {
                int h = j + 1 < i ? hexval(p->src[j + 1]) : -1;
                if (h < 0)
                    perr(p, *line, -1, "truncated \\%c escape in string literal", e);
                v = v * 16 + (uint32_t)h;
                j++;
            }
            if (v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
                perr(p, *line, -1, "invalid code point U+%X in string literal", v);
            on += put_utf8(o + on, v);
        }
    }
    o[on] = '\0';
    t->k = TK_STR;
    t->s = o;
    t->n = on;
    *pos = i + 1;
}

static const struct {
    const char *s;
    int op;
} multi_ops[] = {
    {"==", JOP_EQ}, {"!=", JOP_NE}, {"<=", JOP_LE}, {">=", JOP_GE},
    {"//", JOP_FLOORDIV}, {"**", JOP_POW},
};

/* Lexes the inside of a {{ }} or {% %} tag starting at *pos, up to and
 * including its end marker; returns the kind of end marker and sets
 * *strip_after ('-'), *keep_after ('+'). */
static void lex_tag(struct parser *p, size_t *pos, int *line, int is_block, int *strip_after,
                    int *keep_after)
{
    char end = is_block ? '%' : '}';
    int depth = 0;
    int open_line = *line;
    size_t i = *pos;
    for (;;) {
        while (i < p->len && is_space(p->src[i])) {
            if (p->src[i] == '\n')
                (*line)++;
            i++;
        }
        if (i >= p->len)
            perr(p, open_line, -1, "unterminated %s tag (missing '%s')",
                 is_block ? "{%" : "{{", is_block ? "%}" : "}}");
        const char *s = p->src + i;
        size_t left = p->len - i;
        if (depth == 0) {
            if (left >= 3 && (s[0] == '-' || s[0] == '+') && s[1] == end && s[2] == '}') {
                *strip_after = s[0] == '-';
                *keep_after = s[0] == '+';
                *pos = i + 3;
                push_tok(p, is_block ? TK_BEND : TK_VEND, *line);
                return;
            }
            if (left >= 2 && s[0] == end && s[1] == '}') {
                *pos = i + 2;
                push_tok(p, is_block ? TK_BEND : TK_VEND, *line);
                return;
            }
        }
        struct tok *t = push_tok(p, TK_OP, *line);
        char c = s[0];
        if (c == '\'' || c == '"') {
            lex_string(p, &i, line, t);
            continue;
        }
        if (is_digit(c)) {
            size_t j = i;
            int is_float = 0;
            while (j < p->len && (is_digit(p->src[j]) || p->src[j] == '_'))
                j++;
            if (j + 1 < p->len && p->src[j] == '.' && is_digit(p->src[j + 1])) {
                is_float = 1;
                j++;
                while (j < p->len && (is_digit(p->src[j]) || p->src[j] == '_'))
                    j++;
            }
            if (j < p->len && (p->src[j] == 'e' || p->src[j] == 'E')) {
                size_t k = j + 1;
                if (k < p->len && (p->src[k] == '+' || p->src[k] == '-'))
                    k++;
                if (k < p->len && is_digit(p->src[k])) {
                    is_float = 1;
                    j = k;
                    while (j < p->len && is_digit(p->src[j]))
                        j++;
                }
            }
            char buf[64];
            size_t bn = 0;
            for (size_t k = i; k < j && bn < sizeof(buf) - 1; k++)
                if (p->src[k] != '_')
                    buf[bn++] = p->src[k];
            buf[bn] = '\0';
            if (j - i >= sizeof(buf) - 1)
                perr(p, *line, -1, "number literal too long");
            errno = 0;
            if (is_float) {
                t->k = TK_FLOAT;
                t->f = strtod(buf, NULL);
            } else {
                t->k = TK_INT;
                t->i = strtoll(buf, NULL, 10);
                if (errno == ERANGE)
                    perr(p, *line, -1, "integer literal %s out of range", buf);
            }
            i = j;
            continue;
        }
        if (is_ident_start(c)) {
            size_t j = i;
            while (j < p->len && (is_ident_start(p->src[j]) || is_digit(p->src[j])))
                j++;
            t->k = TK_NAME;
            t->s = s;
            t->n = j - i;
            i = j;
            continue;
        }
        int op = 0;
        for (size_t k = 0; k < sizeof(multi_ops) / sizeof(multi_ops[0]); k++)
            if (left >= 2 && s[0] == multi_ops[k].s[0] && s[1] == multi_ops[k].s[1]) {
                op = multi_ops[k].op;
                i += 2;
                break;
            }
        if (!op) {
            if (!strchr("()[]{}.,:|~+-*/%<>=!", c) || c == '!')
                perr(p, *line, -1, "unexpected character '%c' in tag", c);
            op = c;
            i++;
            if (c == '(' || c == '[' || c == '{')
                depth++;
            else if ((c == ')' || c == ']' || c == '}') && depth > 0)
                depth--;
        }
        t->op = op;
    }
}

/* Removes trailing whitespace from the last text token (for "{%-"). */
static void rstrip_text(struct tok *t)
{
    while (t->n > 0 && is_space(t->s[t->n - 1]))
        t->n--;
}

static void lex(struct parser *p)
{
    size_t i = 0;
    int line = 1;
    /* Jinja's lstrip_blocks strips indentation before a block tag only when
     * the tag begins a line: the text holds a newline, or the previous tag's
     * end consumed one, or this is the start of the template. */
    int line_starting = 1;
    int strip_next = 0; /* the previous tag ended with '-' */
    while (i < p->len) {
        size_t j = i;
        while (j + 1 < p->len &&
               !(p->src[j] == '{' && (p->src[j + 1] == '{' || p->src[j + 1] == '%' ||
                                      p->src[j + 1] == '#')))
            j++;
        if (j + 1 >= p->len)
            j = p->len;
        /* text [i, j) */
        const char *text = p->src + i;
        size_t tn = j - i;
        int text_line = line;
        if (strip_next)
            while (tn > 0 && is_space(*text)) {
                if (*text == '\n')
                    text_line++;
                text++;
                tn--;
            }
        for (size_t k = i; k < j; k++)
            if (p->src[k] == '\n')
                line++;
        char kind = j < p->len ? p->src[j + 1] : 0;
        char mod = j + 2 < p->len ? p->src[j + 2] : 0;
        if (kind && mod == '-') {
            while (tn > 0 && is_space(text[tn - 1]))
                tn--;
        } else if ((kind == '%' || kind == '#') && mod != '+') {
            size_t l = tn;
            while (l > 0 && text[l - 1] != '\n')
                l--;
            if (l > 0 || line_starting) {
                size_t k = l;
                while (k < tn && (text[k] == ' ' || text[k] == '\t'))
                    k++;
                if (k == tn)
                    tn = l;
            }
        }
        if (tn > 0) {
            struct tok *t = push_tok(p, TK_TEXT, text_line);
            t->s = text;
            t->n = tn;
        }
        line_starting = 0;
        strip_next = 0;
        if (!kind)
            break;
        i = j + 2 + ((mod == '-' || (mod == '+' && kind != '{')) ? 1 : 0);
        int strip_after = 0, keep_after = 0;
        if (kind == '#') {
            int open_line = line;
            size_t k = i;
            while (k + 1 < p->len && !(p->src[k] == '#' && p->src[k + 1] == '}')) {
                if (p->src[k] == '\n')
                    line++;
                k++;
            }
            if (k + 1 >= p->len)
                perr(p, open_line, -1, "unterminated comment (missing '#}')");
            if (k > i && (p->src[k - 1] == '-' || p->src[k - 1] == '+')) {
                strip_after = p->src[k - 1] == '-';
                keep_after = p->src[k - 1] == '+';
            }
            i = k + 2;
        } else if (kind == '{') {
            push_tok(p, TK_VBEGIN, line);
            lex_tag(p, &i, &line, 0, &strip_after, &keep_after);
            keep_after = 1; /* trim_blocks does not apply to {{ }} */
        } else {
            size_t first = p->n_toks;
            push_tok(p, TK_BBEGIN, line);
            lex_tag(p, &i, &line, 1, &strip_after, &keep_after);
            /* {% raw %}: everything up to {% endraw %} is text. */
            if (p->n_toks == first + 3 && p->toks[first + 1].k == TK_NAME &&
                p->toks[first + 1].n == 3 && memcmp(p->toks[first + 1].s, "raw", 3) == 0) {
                p->n_toks = first;
                int raw_line = line;
                size_t k = i;
                size_t body_end = 0, after = 0;
                int raw_strip = 0, raw_strip_before = 0;
                while (k + 1 < p->len) {
                    if (p->src[k] == '{' && p->src[k + 1] == '%') {
                        size_t m = k + 2;
                        int sb = 0;
                        if (m < p->len && (p->src[m] == '-' || p->src[m] == '+'))
                            sb = p->src[m++] == '-';
                        while (m < p->len && is_space(p->src[m]))
                            m++;
                        if (p->len - m >= 6 && memcmp(p->src + m, "endraw", 6) == 0) {
                            m += 6;
                            while (m < p->len && is_space(p->src[m]))
                                m++;
                            int sa = 0;
                            if (m < p->len && (p->src[m] == '-' || p->src[m] == '+'))
                                sa = p->src[m++] == '-';
                            if (m + 1 < p->len && p->src[m] == '%' && p->src[m + 1] == '}') {
                                body_end = k;
                                after = m + 2;
                                raw_strip = sa;
                                raw_strip_before = sb;
                                break;
                            }
                        }
                    }
                    k++;
                }
                if (!after)
                    perr(p, raw_line, -1, "unterminated raw block (missing endraw)");
                const char *rs = p->src + i;
                size_t rn = body_end - i;
                if (strip_after)
                    while (rn > 0 && is_space(*rs)) {
                        rs++;
                        rn--;
                    }
                else if (!keep_after && rn > 0 && *rs == '\n') {
                    rs++;
                    rn--;
                }
                if (rn > 0) {
                    struct tok *t = push_tok(p, TK_TEXT, raw_line);
                    t->s = rs;
                    t->n = rn;
                    if (raw_strip_before)
                        rstrip_text(t);
                }
                for (size_t q = i; q < after; q++)
                    if (p->src[q] == '\n')
                        line++;
                i = after;
                strip_after = raw_strip;
                keep_after = 0;
            }
        }
        if (strip_after) {
            strip_next = 1;
            /* line_starting follows what the '-' swallowed. */
            size_t k = i;
            while (k < p->len && is_space(p->src[k]))
                k++;
            line_starting = k > i && p->src[k - 1] == '\n';
            for (size_t q = i; q < k; q++)
                if (p->src[q] == '\n')
                    line++;
            i = k;
            strip_next = 0;
        } else if (!keep_after && i < p->len && p->src[i] == '\n') {
            i++; /* trim_blocks */
            line++;
            line_starting = 1;
        }
    }
    push_tok(p, TK_EOF, line);
}

/* ----------------------------------------------------------------- parser */

static struct tok *peek(struct parser *p)
{
    return &p->toks[p->pos];
}

static struct tok *next(struct parser *p)
{
    struct tok *t = &p->toks[p->pos];
    if (t->k != TK_EOF)
        p->pos++;
    return t;
}

static int is_op(struct tok *t, int op)
{
    return t->k == TK_OP && t->op == op;
}

static int is_name(struct tok *t, const char *s)
{
    return t->k == TK_NAME && t->n == strlen(s) && memcmp(t->s, s, t->n) == 0;
}

static const char *tok_desc(struct tok *t, char *buf, size_t n)
{
    switch (t->k) {
    case TK_TEXT: return "template text";
    case TK_VBEGIN: return "'{{'";
    case TK_VEND: return "'}}'";
    case TK_BBEGIN: return "'{%'";
    case TK_BEND: return "'%}'";
    case TK_STR: return "a string";
    case TK_INT:
    case TK_FLOAT: return "a number";
    case TK_EOF: return "end of template";
    case TK_NAME: snprintf(buf, n, "'%.*s'", (int)(t->n > 40 ? 40 : t->n), t->s); return buf;
    case TK_OP:
        if (t->op < 256)
            snprintf(buf, n, "'%c'", t->op);
        else
            snprintf(buf, n, "operator");
        return buf;
    }
    return "?";
}

static _Noreturn void unexpected(struct parser *p, struct tok *t, const char *want)
{
    char b[64];
    perr(p, t->line, -1, "unexpected %s, expected %s", tok_desc(t, b, sizeof(b)), want);
}

static void expect_op(struct parser *p, int op)
{
    struct tok *t = next(p);
    if (!is_op(t, op)) {
        char w[8];
        snprintf(w, sizeof(w), "'%c'", op);
        unexpected(p, t, w);
    }
}

static struct tok *expect_name(struct parser *p)
{
    struct tok *t = next(p);
    if (t->k != TK_NAME)
        unexpected(p, t, "a name");
    return t;
}

static struct jinja_node *mk(struct parser *p, enum jinja_node_kind k, int line)
{
    struct jinja_node *n = palloc(p, sizeof(*n));
    n->kind = k;
    n->line = line;
    return n;
}

/* A growable array of node pointers (and names) in the arena; the waste of
 * doubling is bounded by twice the final size. */
struct nvec {
    struct jinja_node **v;
    const char **names;
    size_t *lens;
    size_t n, cap;
};

static void nvec_push(struct parser *p, struct nvec *v, struct jinja_node *n, const char *name,
                      size_t len)
{
    if (v->n == v->cap) {
        size_t nc = v->cap ? v->cap * 2 : 4;
        struct jinja_node **nv = palloc(p, nc * sizeof(*nv));
        const char **nn = palloc(p, nc * sizeof(*nn));
        size_t *nl = palloc(p, nc * sizeof(*nl));
        if (v->n) {
            memcpy(nv, v->v, v->n * sizeof(*nv));
            memcpy(nn, v->names, v->n * sizeof(*nn));
            memcpy(nl, v->lens, v->n * sizeof(*nl));
        }
        v->v = nv;
        v->names = nn;
        v->lens = nl;
        v->cap = nc;
    }
    v->v[v->n] = n;
    v->names[v->n] = name;
    v->lens[v->n] = len;
    v->n++;
}

static void enter(struct parser *p, int line)
{
    if (++p->depth > JINJA_MAX_NESTING)
        perr(p, line, -2, "nesting deeper than %d levels", JINJA_MAX_NESTING);
}

static struct jinja_node *parse_expr(struct parser *p);
static struct jinja_node *parse_unary(struct parser *p, int with_filter);

static int is_reserved(struct tok *t)
{
    static const char *const kw[] = {"and", "or", "not", "if", "else", "in", "is", NULL};
    for (int i = 0; kw[i]; i++)
        if (is_name(t, kw[i]))
            return 1;
    return 0;
}

/* Call arguments after '(' up to ')': positional and name=value. */
static void parse_args(struct parser *p, struct jinja_node *n)
{
    struct nvec v = {0};
    while (!is_op(peek(p), ')')) {
        if (v.n)
            expect_op(p, ',');
        if (is_op(peek(p), ')'))
            break; /* trailing comma */
        struct tok *t = peek(p);
        if (t->k == TK_NAME && is_op(&p->toks[p->pos + 1], '=')) {
            p->pos += 2;
            nvec_push(p, &v, parse_expr(p), t->s, t->n);
        } else {
            nvec_push(p, &v, parse_expr(p), NULL, 0);
        }
    }
    expect_op(p, ')');
    n->args = v.v;
    n->names = v.names;
    n->name_lens = v.lens;
    n->n_args = v.n;
    n->n_names = v.n;
}

static struct jinja_node *parse_primary(struct parser *p)
{
    struct tok *t = next(p);
    struct jinja_node *n;
    switch (t->k) {
    case TK_NAME:
        n = mk(p, JE_LITERAL, t->line);
        if (is_name(t, "true") || is_name(t, "True")) {
            n->lit = JL_BOOL;
            n->lit_i = 1;
        } else if (is_name(t, "false") || is_name(t, "False")) {
            n->lit = JL_BOOL;
        } else if (is_name(t, "none") || is_name(t, "None")) {
            n->lit = JL_NONE;
        } else {
            if (is_reserved(t))
                unexpected(p, t, "an expression");
            n->kind = JE_NAME;
            n->str = t->s;
            n->str_len = t->n;
        }
        return n;
    case TK_STR: {
        n = mk(p, JE_LITERAL, t->line);
        n->lit = JL_STR;
        n->str = t->s;
        n->str_len = t->n;
        /* Adjacent literals concatenate, as in Python. */
        if (peek(p)->k == TK_STR) {
            size_t total = t->n;
            for (size_t k = p->pos; p->toks[k].k == TK_STR; k++)
                total += p->toks[k].n;
            char *s = palloc(p, total + 1);
            memcpy(s, t->s, t->n);
            size_t o = t->n;
            while (peek(p)->k == TK_STR) {
                struct tok *u = next(p);
                memcpy(s + o, u->s, u->n);
                o += u->n;
            }
            n->str = s;
            n->str_len = total;
        }
        return n;
    }
    case TK_INT:
        n = mk(p, JE_LITERAL, t->line);
        n->lit = JL_INT;
        n->lit_i = t->i;
        return n;
    case TK_FLOAT:
        n = mk(p, JE_LITERAL, t->line);
        n->lit = JL_FLOAT;
        n->lit_f = t->f;
        return n;
    case TK_OP:
        if (t->op == '(') {
            enter(p, t->line);
            if (is_op(peek(p), ')')) {
                next(p);
                p->depth--;
                return mk(p, JE_TUPLE, t->line);
            }
            struct jinja_node *e = parse_expr(p);
            if (is_op(peek(p), ',')) {
                struct nvec v = {0};
                nvec_push(p, &v, e, NULL, 0);
                while (is_op(peek(p), ',')) {
                    next(p);
                    if (is_op(peek(p), ')'))
                        break;
                    nvec_push(p, &v, parse_expr(p), NULL, 0);
                }
                e = mk(p, JE_TUPLE, t->line);
                e->args = v.v;
                e->n_args = v.n;
            }
            expect_op(p, ')');
            p->depth--;
            return e;
        }
        if (t->op == '[' || t->op == '{') {
            enter(p, t->line);
            int close = t->op == '[' ? ']' : '}';
            n = mk(p, t->op == '[' ? JE_LIST : JE_DICT, t->line);
            struct nvec v = {0};
            while (!is_op(peek(p), close)) {
                if (v.n)
                    expect_op(p, ',');
                if (is_op(peek(p), close))
                    break;
                nvec_push(p, &v, parse_expr(p), NULL, 0);
                if (close == '}') {
                    expect_op(p, ':');
                    nvec_push(p, &v, parse_expr(p), NULL, 0);
                }
            }
            next(p);
            n->args = v.v;
            n->n_args = v.n;
            p->depth--;
            return n;
        }
        break;
    default:
        break;
    }
    unexpected(p, t, "an expression");
}

static struct jinja_node *parse_postfix(struct parser *p, struct jinja_node *n)
{
    for (;;) {
        struct tok *t = peek(p);
        if (is_op(t, '.')) {
            next(p);
            struct tok *a = next(p);
            struct jinja_node *m = mk(p, JE_ATTR, a->line);
            m->a = n;
            if (a->k == TK_NAME) {
                m->str = a->s;
                m->str_len = a->n;
            } else if (a->k == TK_INT) {
                /* x.0 is item access in Jinja */
                m->kind = JE_ITEM;
                m->b = mk(p, JE_LITERAL, a->line);
                m->b->lit = JL_INT;
                m->b->lit_i = a->i;
            } else {
                unexpected(p, a, "an attribute name");
            }
            n = m;
        } else if (is_op(t, '[')) {
            next(p);
            enter(p, t->line);
            struct jinja_node *parts[3] = {NULL, NULL, NULL};
            int colons = 0;
            for (;;) {
                struct tok *u = peek(p);
                if (is_op(u, ']'))
                    break;
                if (is_op(u, ':')) {
                    if (++colons > 2)
                        unexpected(p, u, "']'");
                    next(p);
                    continue;
                }
                if (parts[colons])
                    unexpected(p, u, "':' or ']'");
                parts[colons] = parse_expr(p);
            }
            next(p);
            p->depth--;
            struct jinja_node *m;
            if (colons == 0) {
                if (!parts[0])
                    unexpected(p, t, "a subscript");
                m = mk(p, JE_ITEM, t->line);
                m->b = parts[0];
            } else {
                m = mk(p, JE_SLICE, t->line);
                m->b = parts[0];
                m->c = parts[1];
                m->d = parts[2];
            }
            m->a = n;
            n = m;
        } else if (is_op(t, '(')) {
            next(p);
            enter(p, t->line);
            struct jinja_node *m = mk(p, JE_CALL, t->line);
            m->a = n;
            parse_args(p, m);
            p->depth--;
            n = m;
        } else {
            return n;
        }
    }
}

/* Filters (|name(args)) and tests (is [not] name args) after a unary. */
static struct jinja_node *parse_filter_expr(struct parser *p, struct jinja_node *n)
{
    for (;;) {
        struct tok *t = peek(p);
        if (is_op(t, '|')) {
            next(p);
            struct tok *name = expect_name(p);
            struct jinja_node *m = mk(p, JE_FILTER, name->line);
            m->a = n;
            m->str = name->s;
            m->str_len = name->n;
            /* dotted filter names do not occur in chat templates */
            if (is_op(peek(p), '(')) {
                next(p);
                parse_args(p, m);
            }
            n = m;
        } else if (is_name(t, "is")) {
            next(p);
            struct jinja_node *m = mk(p, JE_TEST, t->line);
            if (is_name(peek(p), "not")) {
                next(p);
                m->op = 1;
            }
            struct tok *name = next(p);
            if (name->k != TK_NAME && !(name->k == TK_OP && name->op >= 256))
                unexpected(p, name, "a test name");
            if (name->k == TK_NAME) {
                m->str = name->s;
                m->str_len = name->n;
            } else {
                static const char *const opn[] = {"==", "!=", "<=", ">="};
                if (name->op > JOP_GE)
                    unexpected(p, name, "a test name");
                m->str = opn[name->op - JOP_EQ];
                m->str_len = 2;
            }
            m->a = n;
            struct tok *u = peek(p);
            if (is_op(u, '(')) {
                next(p);
                parse_args(p, m);
            } else if ((u->k == TK_NAME && !is_reserved(u)) || u->k == TK_STR || u->k == TK_INT ||
                       u->k == TK_FLOAT || is_op(u, '[') || is_op(u, '{') || is_op(u, '-')) {
                /* one argument without parentheses: "is divisibleby 3" */
                struct nvec v = {0};
                nvec_push(p, &v, parse_unary(p, 0), NULL, 0);
                m->args = v.v;
                m->names = v.names;
                m->name_lens = v.lens;
                m->n_args = 1;
                m->n_names = 1;
            }
            n = m;
        } else if (is_op(t, '(') && n->kind == JE_FILTER) {
            next(p);
            struct jinja_node *m = mk(p, JE_CALL, t->line);
            m->a = n;
            parse_args(p, m);
            n = m;
        } else {
            return n;
        }
    }
}

static struct jinja_node *parse_unary(struct parser *p, int with_filter)
{
    struct tok *t = peek(p);
    struct jinja_node *n;
    enter(p, t->line);
    if (is_op(t, '-') || is_op(t, '+')) {
        next(p);
        n = mk(p, t->op == '-' ? JE_NEG : JE_POS, t->line);
        n->a = parse_unary(p, 0);
    } else {
        n = parse_primary(p);
    }
    n = parse_postfix(p, n);
    if (with_filter)
        n = parse_filter_expr(p, n);
    p->depth--;
    return n;
}

static struct jinja_node *binop(struct parser *p, int op, int line, struct jinja_node *a,
                                struct jinja_node *b)
{
    struct jinja_node *n = mk(p, JE_BINOP, line);
    n->op = op;
    n->a = a;
    n->b = b;
    return n;
}

static struct jinja_node *parse_pow(struct parser *p)
{
    struct jinja_node *n = parse_unary(p, 1);
    while (is_op(peek(p), JOP_POW)) {
        int line = next(p)->line;
        n = binop(p, JOP_POW, line, n, parse_unary(p, 1));
    }
    return n;
}

static struct jinja_node *parse_math2(struct parser *p)
{
    struct jinja_node *n = parse_pow(p);
    for (;;) {
        struct tok *t = peek(p);
        if (!(is_op(t, '*') || is_op(t, '/') || is_op(t, '%') || is_op(t, JOP_FLOORDIV)))
            return n;
        next(p);
        n = binop(p, t->op, t->line, n, parse_pow(p));
    }
}

static struct jinja_node *parse_concat(struct parser *p)
{
    struct jinja_node *n = parse_math2(p);
    while (is_op(peek(p), '~')) {
        int line = next(p)->line;
        n = binop(p, '~', line, n, parse_math2(p));
    }
    return n;
}

static struct jinja_node *parse_math1(struct parser *p)
{
    struct jinja_node *n = parse_concat(p);
    for (;;) {
        struct tok *t = peek(p);
        if (!(is_op(t, '+') || is_op(t, '-')))
            return n;
        next(p);
        n = binop(p, t->op, t->line, n, parse_concat(p));
    }
}

static struct jinja_node *parse_compare(struct parser *p)
{
    struct jinja_node *first = parse_math1(p);
    struct nvec v = {0};
    int ops[64];
    int line = peek(p)->line;
    for (;;) {
        struct tok *t = peek(p);
        int op = 0;
        if (is_op(t, JOP_EQ) || is_op(t, JOP_NE) || is_op(t, JOP_LE) || is_op(t, JOP_GE) ||
            is_op(t, '<') || is_op(t, '>')) {
            op = t->op;
            next(p);
        } else if (is_name(t, "in")) {
            op = JOP_IN;
            next(p);
        } else if (is_name(t, "not") && is_name(&p->toks[p->pos + 1], "in")) {
            op = JOP_NOTIN;
            p->pos += 2;
        } else {
            break;
        }
        if (v.n >= 64)
            perr(p, t->line, -2, "comparison chain too long");
        ops[v.n] = op;
        nvec_push(p, &v, parse_math1(p), NULL, 0);
    }
    if (!v.n)
        return first;
    struct jinja_node *n = mk(p, JE_COMPARE, line);
    n->a = first;
    n->args = v.v;
    n->n_args = v.n;
    n->ops = palloc(p, v.n * sizeof(int));
    memcpy(n->ops, ops, v.n * sizeof(int));
    return n;
}

static struct jinja_node *parse_not(struct parser *p)
{
    struct tok *t = peek(p);
    if (is_name(t, "not")) {
        next(p);
        enter(p, t->line);
        struct jinja_node *n = mk(p, JE_NOT, t->line);
        n->a = parse_not(p);
        p->depth--;
        return n;
    }
    return parse_compare(p);
}

static struct jinja_node *parse_and(struct parser *p)
{
    struct jinja_node *n = parse_not(p);
    while (is_name(peek(p), "and")) {
        struct jinja_node *m = mk(p, JE_AND, next(p)->line);
        m->a = n;
        m->b = parse_not(p);
        n = m;
    }
    return n;
}

static struct jinja_node *parse_or(struct parser *p)
{
    struct jinja_node *n = parse_and(p);
    while (is_name(peek(p), "or")) {
        struct jinja_node *m = mk(p, JE_OR, next(p)->line);
        m->a = n;
        m->b = parse_and(p);
        n = m;
    }
    return n;
}

/* expr: or-expression, optionally "x if cond [else y]" */
static struct jinja_node *parse_expr(struct parser *p)
{
    enter(p, peek(p)->line);
    struct jinja_node *n = parse_or(p);
    while (is_name(peek(p), "if")) {
        struct jinja_node *m = mk(p, JE_COND, next(p)->line);
        m->b = n;
        m->a = parse_or(p);
        if (is_name(peek(p), "else")) {
            next(p);
            m->c = parse_expr(p);
        }
        n = m;
    }
    p->depth--;
    return n;
}

/* An expression that may be an unparenthesised tuple ("a, b"). */
static struct jinja_node *parse_tuple_expr(struct parser *p)
{
    struct jinja_node *e = parse_expr(p);
    if (!is_op(peek(p), ','))
        return e;
    struct nvec v = {0};
    nvec_push(p, &v, e, NULL, 0);
    while (is_op(peek(p), ',')) {
        next(p);
        nvec_push(p, &v, parse_expr(p), NULL, 0);
    }
    struct jinja_node *t = mk(p, JE_TUPLE, e->line);
    t->args = v.v;
    t->n_args = v.n;
    return t;
}

static void expect_block_end(struct parser *p)
{
    struct tok *t = next(p);
    if (t->k != TK_BEND)
        unexpected(p, t, "'%}'");
}

/* Parses statements until a {% name %} in stops; returns the index of the
 * stop that ended the body, having consumed '{%' and the name only. */
static int parse_body(struct parser *p, struct nvec *out, const char *const *stops,
                      const char *what, int open_line);

static void set_body(struct jinja_node *n, struct nvec *v, int orelse)
{
    if (orelse) {
        n->orelse = v->v;
        n->n_orelse = v->n;
    } else {
        n->body = v->v;
        n->n_body = v->n;
    }
}

static void parse_targets(struct parser *p, struct jinja_node *n)
{
    struct nvec v = {0};
    int paren = 0;
    if (is_op(peek(p), '(')) {
        next(p);
        paren = 1;
    }
    do {
        if (v.n)
            next(p);
        struct tok *t = expect_name(p);
        if (is_reserved(t))
            unexpected(p, t, "a variable name");
        nvec_push(p, &v, NULL, t->s, t->n);
    } while (is_op(peek(p), ','));
    if (paren)
        expect_op(p, ')');
    n->names = v.names;
    n->name_lens = v.lens;
    n->n_names = v.n;
}

static struct jinja_node *parse_statement(struct parser *p, struct tok *open)
{
    struct tok *kw = next(p);
    if (kw->k != TK_NAME)
        unexpected(p, kw, "a statement name");
    int line = kw->line;
    struct nvec body = {0};
    if (is_name(kw, "if")) {
        struct jinja_node *n = mk(p, JN_IF, line);
        n->a = parse_tuple_expr(p);
        expect_block_end(p);
        static const char *const stops[] = {"elif", "else", "endif", NULL};
        struct jinja_node *cur = n;
        for (;;) {
            memset(&body, 0, sizeof(body));
            int s = parse_body(p, &body, stops, "if", line);
            set_body(cur, &body, 0);
            if (s == 0) {
                struct jinja_node *e = mk(p, JN_IF, p->toks[p->pos - 1].line);
                e->a = parse_tuple_expr(p);
                expect_block_end(p);
                cur->orelse = palloc(p, sizeof(*cur->orelse));
                cur->orelse[0] = e;
                cur->n_orelse = 1;
                cur = e;
                continue;
            }
            expect_block_end(p);
            if (s == 1) {
                static const char *const end[] = {"endif", NULL};
                memset(&body, 0, sizeof(body));
                parse_body(p, &body, end, "if", line);
                set_body(cur, &body, 1);
                expect_block_end(p);
            }
            return n;
        }
    }
    if (is_name(kw, "for")) {
        struct jinja_node *n = mk(p, JN_FOR, line);
        parse_targets(p, n);
        if (!is_name(next(p), "in"))
            unexpected(p, &p->toks[p->pos - 1], "'in'");
        /* the iterable is an or-expression, so that "if" starts the filter */
        n->a = parse_or(p);
        if (is_name(peek(p), "if")) {
            next(p);
            n->b = parse_expr(p);
        }
        if (is_name(peek(p), "recursive"))
            perr(p, line, -1, "recursive for loops are not supported");
        expect_block_end(p);
        static const char *const stops[] = {"else", "endfor", NULL};
        int s = parse_body(p, &body, stops, "for", line);
        set_body(n, &body, 0);
        expect_block_end(p);
        if (s == 0) {
            static const char *const end[] = {"endfor", NULL};
            memset(&body, 0, sizeof(body));
            parse_body(p, &body, end, "for", line);
            set_body(n, &body, 1);
            expect_block_end(p);
        }
        return n;
    }
    if (is_name(kw, "set")) {
        struct tok *t = expect_name(p);
        if (is_op(peek(p), '.')) {
            next(p);
            struct tok *a = expect_name(p);
            struct jinja_node *n = mk(p, JN_SET_ATTR, line);
            n->str = t->s;
            n->str_len = t->n;
            n->str2 = a->s;
            n->str2_len = a->n;
            expect_op(p, '=');
            n->a = parse_tuple_expr(p);
            expect_block_end(p);
            return n;
        }
        if (peek(p)->k == TK_BEND) {
            next(p);
            struct jinja_node *n = mk(p, JN_SET_BLOCK, line);
            n->str = t->s;
            n->str_len = t->n;
            static const char *const end[] = {"endset", NULL};
            parse_body(p, &body, end, "set", line);
            set_body(n, &body, 0);
            expect_block_end(p);
            return n;
        }
        p->pos--;
        struct jinja_node *n = mk(p, JN_SET, line);
        parse_targets(p, n);
        expect_op(p, '=');
        n->a = parse_tuple_expr(p);
        expect_block_end(p);
        return n;
    }
    if (is_name(kw, "macro")) {
        struct tok *name = expect_name(p);
        struct jinja_node *n = mk(p, JN_MACRO, line);
        n->str = name->s;
        n->str_len = name->n;
        expect_op(p, '(');
        struct nvec v = {0};
        while (!is_op(peek(p), ')')) {
            if (v.n)
                expect_op(p, ',');
            struct tok *a = expect_name(p);
            struct jinja_node *def = NULL;
            if (is_op(peek(p), '=')) {
                next(p);
                def = parse_expr(p);
            }
            nvec_push(p, &v, def, a->s, a->n);
        }
        next(p);
        n->args = v.v;
        n->n_args = v.n;
        n->names = v.names;
        n->name_lens = v.lens;
        n->n_names = v.n;
        expect_block_end(p);
        static const char *const end[] = {"endmacro", NULL};
        parse_body(p, &body, end, "macro", line);
        set_body(n, &body, 0);
        if (peek(p)->k == TK_NAME)
            next(p); /* {% endmacro name %} */
        expect_block_end(p);
        return n;
    }
    if (is_name(kw, "generation")) {
        /* HF's AssistantTracker marks assistant text; rendering is unchanged. */
        expect_block_end(p);
        struct jinja_node *n = mk(p, JN_IF, line);
        n->a = mk(p, JE_LITERAL, line);
        n->a->lit = JL_BOOL;
        n->a->lit_i = 1;
        static const char *const end[] = {"endgeneration", NULL};
        parse_body(p, &body, end, "generation", line);
        set_body(n, &body, 0);
        expect_block_end(p);
        return n;
    }
    if (is_name(kw, "break") || is_name(kw, "continue")) {
        struct jinja_node *n = mk(p, is_name(kw, "break") ? JN_BREAK : JN_CONTINUE, line);
        expect_block_end(p);
        return n;
    }
    (void)open;
    char b[64];
    perr(p, line, -1, "unknown or misplaced statement %s", tok_desc(kw, b, sizeof(b)));
}

static int parse_body(struct parser *p, struct nvec *out, const char *const *stops,
                      const char *what, int open_line)
{
    enter(p, open_line);
    for (;;) {
        struct tok *t = next(p);
        switch (t->k) {
        case TK_EOF:
            if (stops)
                perr(p, open_line, -1, "unclosed '%s' block (end of template reached)", what);
            p->depth--;
            return -1;
        case TK_TEXT: {
            struct jinja_node *n = mk(p, JN_TEXT, t->line);
            n->str = t->s;
            n->str_len = t->n;
            nvec_push(p, out, n, NULL, 0);
            break;
        }
        case TK_VBEGIN: {
            struct jinja_node *n = mk(p, JN_OUTPUT, t->line);
            n->a = parse_tuple_expr(p);
            struct tok *e = next(p);
            if (e->k != TK_VEND)
                unexpected(p, e, "'}}'");
            nvec_push(p, out, n, NULL, 0);
            break;
        }
        case TK_BBEGIN: {
            struct tok *kw = peek(p);
            if (stops)
                for (int i = 0; stops[i]; i++)
                    if (is_name(kw, stops[i])) {
                        next(p);
                        p->depth--;
                        return i;
                    }
            if (kw->k == TK_NAME && kw->n > 3 && memcmp(kw->s, "end", 3) == 0) {
                char b[64];
                if (stops)
                    perr(p, kw->line, -1, "unexpected %s inside '%s' (opened on line %d)",
                         tok_desc(kw, b, sizeof(b)), what, open_line);
                perr(p, kw->line, -1, "unexpected %s with no open block",
                     tok_desc(kw, b, sizeof(b)));
            }
            if (kw->k == TK_NAME && (is_name(kw, "else") || is_name(kw, "elif"))) {
                char b[64];
                perr(p, kw->line, -1, "unexpected %s outside an if or for block",
                     tok_desc(kw, b, sizeof(b)));
            }
            nvec_push(p, out, parse_statement(p, t), NULL, 0);
            break;
        }
        default:
            unexpected(p, t, "template text or a tag");
        }
    }
}

int jinja_parse(struct jinja_template *t, const char *src, size_t len, char *err, size_t errlen)
{
    struct parser p = {.t = t, .err = err, .errlen = errlen};
    if (err && errlen)
        err[0] = '\0';
    if (setjmp(p.jb))
        return p.rc;
    /* Normalise newlines as Jinja does, and drop one trailing newline
     * (keep_trailing_newline is off in HF's environment). */
    char *s = palloc(&p, len + 1);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            s[n++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n')
                i++;
        } else {
            s[n++] = src[i];
        }
    }
    if (n > 0 && s[n - 1] == '\n')
        n--;
    s[n] = '\0';
    p.src = s;
    p.len = n;
    lex(&p);
    struct nvec body = {0};
    parse_body(&p, &body, NULL, NULL, 1);
    t->body = body.v;
    t->n_body = body.n;
    return 0;
}
