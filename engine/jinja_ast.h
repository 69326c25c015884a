/* jinja_ast.h: the syntax tree shared by the chat-template parser
 * (jinja_parse.c) and its evaluator (chat_template.c). Internal to the
 * chat_template module; nothing outside engine/chat_template*.c and
 * engine/jinja_*.c includes it.
 *
 * The tree lives in one arena owned by the compiled template; strings point
 * into that arena (the normalised source copy or decoded literals).
 */
#ifndef INFERD_JINJA_AST_H
#define INFERD_JINJA_AST_H

#include "engine/arena.h"

#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>

/* Deep enough for any real template, shallow enough that recursive descent
 * and recursive evaluation stay far from the end of a thread's stack. */
#define JINJA_MAX_NESTING 96

enum jinja_node_kind {
    /* statements */
    JN_TEXT,     /* str */
    JN_OUTPUT,   /* a: expression to print */
    JN_IF,       /* a: condition; body; orelse (elif is an if in orelse) */
    JN_FOR,      /* names: targets; a: iterable; b: filter or NULL; body; orelse */
    JN_SET,      /* names: targets; a: value */
    JN_SET_ATTR, /* str: variable; str2: attribute; a: value */
    JN_SET_BLOCK, /* str: variable; body captured */
    JN_MACRO,    /* str: name; names: params; args: defaults (NULL = none); body */
    JN_BREAK,
    JN_CONTINUE,
    /* expressions */
    JE_LITERAL,  /* lit_* */
    JE_NAME,     /* str */
    JE_ATTR,     /* a.str */
    JE_ITEM,     /* a[b] */
    JE_SLICE,    /* a[b:c:d], each may be NULL */
    JE_CALL,     /* a(args) with names[i] the keyword or NULL */
    JE_FILTER,   /* a|str(args) */
    JE_TEST,     /* a is str(args); op = 1 for "is not" */
    JE_NOT,      /* not a */
    JE_NEG,      /* -a */
    JE_POS,      /* +a */
    JE_BINOP,    /* a op b: + - * / // % ** ~ */
    JE_AND,
    JE_OR,
    JE_COMPARE,  /* a, then ops[i] against args[i], chained */
    JE_COND,     /* b if a else c (c may be NULL) */
    JE_LIST,     /* args */
    JE_TUPLE,    /* args (behaves as a list) */
    JE_DICT,     /* args: keys and values alternating */
};

/* Binary and comparison operators beyond single characters. */
enum {
    JOP_EQ = 256,
    JOP_NE,
    JOP_LE,
    JOP_GE,
    JOP_FLOORDIV,
    JOP_POW,
    JOP_IN,
    JOP_NOTIN,
};

enum jinja_lit { JL_NONE, JL_BOOL, JL_INT, JL_FLOAT, JL_STR };

struct jinja_node {
    enum jinja_node_kind kind;
    int line;
    int op;
    const char *str;
    size_t str_len;
    const char *str2;
    size_t str2_len;
    struct jinja_node *a, *b, *c, *d;
    struct jinja_node **args; /* n_args */
    size_t n_args;
    const char **names; /* n_names; keyword names of args, targets, params */
    size_t *name_lens;
    size_t n_names;
    int *ops; /* JE_COMPARE: n_args operators */
    struct jinja_node **body, **orelse;
    size_t n_body, n_orelse;
    enum jinja_lit lit;
    int64_t lit_i;
    double lit_f;
};

struct jinja_template {
    struct arena arena; /* capped: a hostile template runs out of budget, not memory */
    struct jinja_node **body;
    size_t n_body;
};

/* Parses src into t (whose arena must be set up with arena_init and a cap). Returns 0,
 * or -1 (syntax) / -2 (nesting too deep) with "line N: problem" in err. */
int jinja_parse(struct jinja_template *t, const char *src, size_t len, char *err, size_t errlen);

#endif
