/* tokenizer.c: byte-level BPE from a Hugging Face tokenizer.json (see
 * tokenizer.h). The vocabulary and merges live in open-addressing hash
 * tables built once at load; encoding a piece starts from its byte
 * symbols and merges the lowest-ranked adjacent pair (leftmost on ties)
 * through a binary heap, so a long word costs n log n, not n^2.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "engine/tokenizer.h"

#include <errno.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/gguf.h"
#include "engine/json.h"

#define TOK_MAX_SPLITS 4
#define TOK_MAX_AFFIX 4

/* Llama 3's and Qwen2's split regexes (the pre-tokenizers that GGUF files
 * name "llama-bpe" and "qwen2"). */
static const char llama3_pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char qwen2_pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* GPT-2's pre-tokenizer, which ByteLevel(use_regex=true) applies. */
static const char gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

struct added {
    char *text;
    size_t len;
    int32_t id;
    int special;
};

struct split {
    pcre2_code *re;
    int invert;   /* the regex matches the separators' complement */
    int isolated; /* matches become pieces of their own (else removed) */
};

struct tokenizer {
    int64_t n_vocab;
    char **sym;          /* id -> token string as stored (byte symbols) */
    size_t *sym_len;
    char **bytes;        /* id -> decoded bytes */
    size_t *bytes_len;
    uint8_t *special;    /* id -> 1 when a special added token */
    /* vocabulary: string -> id */
    int32_t *vslot;
    size_t vcap;
    /* merges: (left, right) -> rank and merged id */
    uint64_t *mkey;
    int32_t *mrank, *mres;
    size_t mcap;
    struct added *added;
    size_t n_added;
    uint8_t added_first[256]; /* 1 when some added token starts with it */
    struct split splits[TOK_MAX_SPLITS];
    int n_splits;
    int add_prefix_space;
    int ignore_merges;
    /* SentencePiece-style BPE (Llama 2, Mistral, Phi-3, Gemma): symbols
     * are characters, spaces become U+2581, characters outside the
     * vocabulary fall back to <0xXX> byte tokens. */
    int spm;
    int spm_prepend;    /* 0 never, 1 every segment, 2 a segment at offset 0 */
    int spm_metaspace;  /* Metaspace: no prepend before a leading space */
    int spm_byte_decode; /* the decoder has ByteFallback: <0xXX> is a byte */
    int spm_meta_decode; /* Metaspace decoder: the first token loses its spaces */
    int spm_strip_lead; /* decoding drops one leading space */
    int32_t unk_id;     /* -1 none */
    int32_t byte_tok[256]; /* <0xXX> ids, -1 none */
    int32_t prefix[TOK_MAX_AFFIX], suffix[TOK_MAX_AFFIX];
    int n_prefix, n_suffix;
    int32_t byte_sym[256]; /* id of each byte's one-symbol token, -1 none */
    char byte_utf8[256][3]; /* each byte's symbol, UTF-8 */
    uint8_t byte_utf8_len[256];
};

/* ------------------------------------------------------------ hashing */

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

static size_t pow2_at_least(size_t n)
{
    size_t c = 16;
    while (c < n)
        c <<= 1;
    return c;
}

static int32_t vocab_find(const struct tokenizer *t, const char *s, size_t n)
{
    size_t mask = t->vcap - 1;
    for (size_t i = fnv1a(s, n) & mask;; i = (i + 1) & mask) {
        int32_t id = t->vslot[i];
        if (id < 0)
            return -1;
        if (t->sym_len[id] == n && memcmp(t->sym[id], s, n) == 0)
            return id;
    }
}

/* 0, or 1 when the string is already present (a duplicate). */
static int vocab_insert(struct tokenizer *t, int32_t id)
{
    size_t mask = t->vcap - 1;
    for (size_t i = fnv1a(t->sym[id], t->sym_len[id]) & mask;; i = (i + 1) & mask) {
        int32_t o = t->vslot[i];
        if (o < 0) {
            t->vslot[i] = id;
            return 0;
        }
        if (t->sym_len[o] == t->sym_len[id] && memcmp(t->sym[o], t->sym[id], t->sym_len[id]) == 0)
            return 1;
    }
}

static uint64_t pair_key(int32_t a, int32_t b)
{
    return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
}

/* The merge of (a, b): rank, or -1; *res the merged id. */
static int32_t merge_find(const struct tokenizer *t, int32_t a, int32_t b, int32_t *res)
{
    uint64_t k = pair_key(a, b) + 1; /* 0 marks an empty slot */
    size_t mask = t->mcap - 1;
    for (size_t i = mix64(k) & mask;; i = (i + 1) & mask) {
        if (t->mkey[i] == 0)
            return -1;
        if (t->mkey[i] == k) {
            *res = t->mres[i];
            return t->mrank[i];
        }
    }
}

static void merge_insert(struct tokenizer *t, int32_t a, int32_t b, int32_t rank, int32_t res)
{
    uint64_t k = pair_key(a, b) + 1;
    size_t mask = t->mcap - 1;
    for (size_t i = mix64(k) & mask;; i = (i + 1) & mask) {
        if (t->mkey[i] == k)
            return; /* a repeated merge keeps its first (lowest) rank */
        if (t->mkey[i] == 0) {
            t->mkey[i] = k;
            t->mrank[i] = rank;
            t->mres[i] = res;
            return;
        }
    }
}

/* ----------------------------------------------------- byte-level map */

/* GPT-2's bytes_to_unicode: printable bytes map to themselves, the other
 * 68 to U+0100 onwards in byte order. */
static void byte_map(struct tokenizer *t)
{
    int next = 256;
    t->unk_id = -1;
    for (int b = 0; b < 256; b++)
        t->byte_tok[b] = -1;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        int cp = keep ? b : next++;
        if (cp < 0x80) {
            t->byte_utf8[b][0] = (char)cp;
            t->byte_utf8_len[b] = 1;
        } else {
            t->byte_utf8[b][0] = (char)(0xC0 | (cp >> 6));
            t->byte_utf8[b][1] = (char)(0x80 | (cp & 0x3F));
            t->byte_utf8_len[b] = 2;
        }
    }
}

/* The byte a symbol's code point stands for, or -1. */
static int cp_to_byte(uint32_t cp)
{
    if ((cp >= 33 && cp <= 126) || (cp >= 161 && cp <= 172) || (cp >= 174 && cp <= 255))
        return (int)cp;
    if (cp < 256 || cp >= 256 + 68)
        return -1;
    int n = (int)(cp - 256);
    for (int b = 0; b < 256; b++) {
        int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        if (!keep && n-- == 0)
            return b;
    }
    return -1;
}

/* Decodes one UTF-8 sequence of s (valid input: it comes from JSON). */
static size_t utf8_next(const char *s, size_t n, uint32_t *cp)
{
    const uint8_t *u = (const uint8_t *)s;
    if (u[0] < 0x80 || n < 2) {
        *cp = u[0];
        return 1;
    }
    if (u[0] < 0xE0) {
        *cp = ((uint32_t)(u[0] & 0x1F) << 6) | (u[1] & 0x3F);
        return 2;
    }
    if (u[0] < 0xF0 || n < 4) {
        *cp = ((uint32_t)(u[0] & 0x0F) << 12) | ((uint32_t)(u[1] & 0x3F) << 6) | (u[2] & 0x3F);
        return 3;
    }
    *cp = ((uint32_t)(u[0] & 0x07) << 18) | ((uint32_t)(u[1] & 0x3F) << 12) |
          ((uint32_t)(u[2] & 0x3F) << 6) | (u[3] & 0x3F);
    return 4;
}

/* ------------------------------------------------------------ loading */

static int fail(char *err, size_t errlen, const char *path, const char *what)
{
    snprintf(err, errlen, "%s: %s", path, what);
    return -1;
}

static char *dup_bytes(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = 0;
    }
    return p;
}

static int add_split(struct tokenizer *t, const char *pattern, size_t plen, int invert,
                     int isolated, const char *path, char *err, size_t errlen)
{
    if (t->n_splits == TOK_MAX_SPLITS)
        return fail(err, errlen, path, "pre_tokenizer: more than 4 Split steps");
    int ec;
    PCRE2_SIZE eo;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, plen, PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK,
                                   &ec, &eo, NULL);
    if (!re) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(ec, msg, sizeof(msg));
        snprintf(err, errlen, "%s: pre_tokenizer regex at offset %zu: %s", path, (size_t)eo,
                 (const char *)msg);
        return -1;
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* when available; falls back */
    t->splits[t->n_splits].re = re;
    t->splits[t->n_splits].invert = invert;
    t->splits[t->n_splits].isolated = isolated;
    t->n_splits++;
    return 0;
}

/* One pre-tokenizer step: Split (a regex, Isolated or Removed) or
 * ByteLevel (its own GPT-2 regex when use_regex). */
static int load_pretok_step(struct tokenizer *t, const struct json *p, const char *path,
                            char *err, size_t errlen)
{
    const char *type = json_str(json_get(p, "type"), NULL);
    if (!type)
        return fail(err, errlen, path, "pre_tokenizer step without a type");
    if (strcmp(type, "ByteLevel") == 0) {
        t->add_prefix_space = json_bool(json_get(p, "add_prefix_space"));
        const struct json *ur = json_get(p, "use_regex");
        if (!ur || json_bool(ur))
            return add_split(t, gpt2_pattern, sizeof(gpt2_pattern) - 1, 0, 1, path, err, errlen);
        return 0;
    }
    if (strcmp(type, "Split") == 0) {
        size_t plen;
        const char *pat = json_str(json_get(json_get(p, "pattern"), "Regex"), &plen);
        if (!pat)
            return fail(err, errlen, path, "pre_tokenizer Split: only Regex patterns are supported");
        const char *beh = json_str(json_get(p, "behavior"), NULL);
        int isolated = beh && strcmp(beh, "Isolated") == 0;
        if (!beh || (!isolated && strcmp(beh, "Removed") != 0))
            return fail(err, errlen, path, "pre_tokenizer Split: only Isolated and Removed behaviors are supported");
        return add_split(t, pat, plen, json_bool(json_get(p, "invert")), isolated, path, err, errlen);
    }
    snprintf(err, errlen, "%s: unsupported pre_tokenizer '%s'", path, type);
    return -1;
}

static int load_post(struct tokenizer *t, const struct json *pp, const char *path, char *err,
                     size_t errlen)
{
    const char *type = json_str(json_get(pp, "type"), NULL);
    if (!type)
        return 0;
    if (strcmp(type, "Sequence") == 0) {
        const struct json *ps = json_get(pp, "processors");
        for (size_t i = 0; i < json_len(ps); i++)
            if (load_post(t, json_at(ps, i), path, err, errlen))
                return -1;
        return 0;
    }
    if (strcmp(type, "ByteLevel") == 0)
        return 0; /* offsets only */
    if (strcmp(type, "TemplateProcessing") != 0) {
        snprintf(err, errlen, "%s: unsupported post_processor '%s'", path, type);
        return -1;
    }
    const struct json *single = json_get(pp, "single");
    const struct json *special = json_get(pp, "special_tokens");
    int seen_a = 0;
    for (size_t i = 0; i < json_len(single); i++) {
        const struct json *e = json_at(single, i);
        const struct json *st = json_get(e, "SpecialToken");
        if (json_get(e, "Sequence")) {
            seen_a = 1;
            continue;
        }
        const char *name = json_str(json_get(st, "id"), NULL);
        const struct json *ids = json_get(json_get(special, name ? name : ""), "ids");
        if (!name || json_len(ids) != 1)
            return fail(err, errlen, path, "post_processor: a special token without one id");
        int64_t id;
        if (json_int64(json_at(ids, 0), &id) || id < 0 || id >= t->n_vocab)
            return fail(err, errlen, path, "post_processor: special token id outside the vocabulary");
        int32_t *arr = seen_a ? t->suffix : t->prefix;
        int *n = seen_a ? &t->n_suffix : &t->n_prefix;
        if (*n == TOK_MAX_AFFIX)
            return fail(err, errlen, path, "post_processor: too many special tokens");
        arr[(*n)++] = (int32_t)id;
    }
    return 0;
}

/* ------------------------------------------- building, from any format */

/* Room for ids [0, n), n_added added tokens and n_merges merges. */
static int build_alloc(struct tokenizer *t, int64_t n, size_t n_added, size_t n_merges,
                       const char *path, char *err, size_t errlen)
{
    t->n_vocab = n;
    t->sym = calloc((size_t)n, sizeof(*t->sym));
    t->sym_len = calloc((size_t)n, sizeof(*t->sym_len));
    t->bytes = calloc((size_t)n, sizeof(*t->bytes));
    t->bytes_len = calloc((size_t)n, sizeof(*t->bytes_len));
    t->special = calloc((size_t)n, 1);
    t->vcap = pow2_at_least(2 * (size_t)n);
    t->vslot = malloc(t->vcap * sizeof(*t->vslot));
    t->added = calloc(n_added + 1, sizeof(*t->added));
    t->mcap = pow2_at_least(2 * n_merges + 2);
    t->mkey = calloc(t->mcap, sizeof(*t->mkey));
    t->mrank = malloc(t->mcap * sizeof(*t->mrank));
    t->mres = malloc(t->mcap * sizeof(*t->mres));
    if (!t->sym || !t->sym_len || !t->bytes || !t->bytes_len || !t->special || !t->vslot ||
        !t->added || !t->mkey || !t->mrank || !t->mres)
        return fail(err, errlen, path, "out of memory");
    memset(t->vslot, 0xff, t->vcap * sizeof(*t->vslot));
    return 0;
}

/* Vocabulary token id: s in byte-level symbols. */
static int build_token(struct tokenizer *t, int64_t id, const char *s, size_t len,
                       const char *what, const char *path, char *err, size_t errlen)
{
    if (t->sym[id]) {
        snprintf(err, errlen, "%s: %s: two tokens share id %lld", path, what, (long long)id);
        return -1;
    }
    t->sym_len[id] = len;
    t->sym[id] = dup_bytes(s, len);
    char *b = malloc(len + 1);
    if (!t->sym[id] || !b) {
        free(b);
        return fail(err, errlen, path, "out of memory");
    }
    if (vocab_insert(t, (int32_t)id)) {
        free(b);
        snprintf(err, errlen, "%s: %s: token %lld appears twice", path, what, (long long)id);
        return -1;
    }
    size_t nb = 0;
    if (t->spm) {
        /* <0xXX> is that byte; U+2581 (e2 96 81) is a space */
        unsigned hx;
        int is_byte = len == 6 && s[0] == '<' && s[1] == '0' && s[2] == 'x' && s[5] == '>' &&
                      sscanf(s + 3, "%2x", &hx) == 1;
        if (is_byte)
            t->byte_tok[hx] = (int32_t)id; /* the encoder's byte fallback */
        if (is_byte && t->spm_byte_decode) {
            b[nb++] = (char)hx;
        } else {
            for (size_t k = 0; k < len; k++) {
                if (k + 2 < len && (uint8_t)s[k] == 0xE2 && (uint8_t)s[k + 1] == 0x96 &&
                    (uint8_t)s[k + 2] == 0x81) {
                    b[nb++] = ' ';
                    k += 2;
                } else {
                    b[nb++] = s[k];
                }
            }
        }
        t->bytes[id] = b;
        t->bytes_len[id] = nb;
        return 0;
    }
    /* bytes: each symbol's code point is one byte */
    for (size_t k = 0; k < len;) {
        uint32_t cp;
        k += utf8_next(s + k, len - k, &cp);
        int by = cp_to_byte(cp);
        if (by < 0) {
            free(b);
            snprintf(err, errlen, "%s: %s: token %lld has a character outside the byte-level "
                     "alphabet (not a byte-level BPE?)", path, what, (long long)id);
            return -1;
        }
        b[nb++] = (char)by;
    }
    t->bytes[id] = b;
    t->bytes_len[id] = nb;
    return 0;
}

/* Added token id, matched in the text before pre-tokenizing (special
 * ones only when parsing special tokens); it decodes to its own text. */
static int build_added(struct tokenizer *t, int64_t id, const char *s, size_t len, int special,
                       const char *path, char *err, size_t errlen)
{
    if (len == 0)
        return fail(err, errlen, path, "an added token without content");
    struct added *ad = &t->added[t->n_added++];
    t->added_first[(uint8_t)s[0]] = 1;
    ad->text = dup_bytes(s, len);
    ad->len = len;
    ad->id = (int32_t)id;
    ad->special = special;
    if (!ad->text)
        return fail(err, errlen, path, "out of memory");
    t->special[id] = (uint8_t)special;
    if (!t->sym[id]) { /* not in the BPE vocabulary */
        t->sym[id] = dup_bytes(s, len);
        t->sym_len[id] = len;
        if (!t->sym[id])
            return fail(err, errlen, path, "out of memory");
        vocab_insert(t, (int32_t)id);
    }
    free(t->bytes[id]);
    t->bytes[id] = dup_bytes(s, len);
    t->bytes_len[id] = len;
    return t->bytes[id] ? 0 : fail(err, errlen, path, "out of memory");
}

/* Merge number rank: a + b -> their concatenation. buf: scratch. */
static int build_merge(struct tokenizer *t, size_t rank, const char *a, size_t la, const char *b,
                       size_t lb, char **buf, size_t *bufcap, const char *path, char *err,
                       size_t errlen)
{
    if (la + lb > *bufcap) {
        size_t cap = 2 * (la + lb) + 16;
        char *nb = realloc(*buf, cap);
        if (!nb)
            return fail(err, errlen, path, "out of memory");
        *buf = nb;
        *bufcap = cap;
    }
    memcpy(*buf, a, la);
    memcpy(*buf + la, b, lb);
    int32_t ia = vocab_find(t, a, la), ib = vocab_find(t, b, lb), ir = vocab_find(t, *buf, la + lb);
    if (ia < 0 || ib < 0 || ir < 0) {
        snprintf(err, errlen, "%s: merges[%zu]: a part or the result is not in the vocabulary",
                 path, rank);
        return -1;
    }
    merge_insert(t, ia, ib, (int32_t)rank, ir);
    return 0;
}

/* "a b": the split at the first space (symbols never hold a raw space). */
static int split_merge(const char *s, size_t l, size_t *la)
{
    const char *sp = memchr(s, ' ', l);
    if (!sp)
        return -1;
    *la = (size_t)(sp - s);
    return 0;
}

static void build_finish(struct tokenizer *t)
{
    for (int by = 0; by < 256; by++)
        t->byte_sym[by] = vocab_find(t, t->byte_utf8[by], t->byte_utf8_len[by]);
}

static int load_model(struct tokenizer *t, const struct json *root, const char *path, char *err,
                      size_t errlen)
{
    const struct json *model = json_get(root, "model");
    const char *type = json_str(json_get(model, "type"), NULL);
    if (!type || strcmp(type, "BPE") != 0)
        return fail(err, errlen, path, "model.type: only BPE is supported");
    const struct json *vocab = json_get(model, "vocab");
    const struct json *added = json_get(root, "added_tokens");
    const struct json *merges = json_get(model, "merges");
    if (json_type(vocab) != JSON_OBJECT || json_len(vocab) == 0)
        return fail(err, errlen, path, "model.vocab: missing or empty");
    t->ignore_merges = json_bool(json_get(model, "ignore_merges"));
    /* ids may be sparse: the vocabulary is as large as the largest id */
    int64_t n = 0;
    for (size_t i = 0; i < json_len(vocab); i++) {
        int64_t id;
        if (json_int64(json_at(vocab, i), &id) || id < 0 || id >= (1 << 24))
            return fail(err, errlen, path, "model.vocab: an id is not an integer in [0, 2^24)");
        if (id + 1 > n)
            n = id + 1;
    }
    for (size_t i = 0; i < json_len(added); i++) {
        int64_t id;
        if (json_int64(json_get(json_at(added, i), "id"), &id) || id < 0 || id >= (1 << 24))
            return fail(err, errlen, path, "added_tokens: an id is not an integer in [0, 2^24)");
        if (id + 1 > n)
            n = id + 1;
    }
    if (build_alloc(t, n, json_len(added), json_len(merges), path, err, errlen))
        return -1;
    for (size_t i = 0; i < json_len(vocab); i++) {
        int64_t id;
        json_int64(json_at(vocab, i), &id);
        if (build_token(t, id, json_key_at(vocab, i), json_key_len(vocab, i), "model.vocab", path,
                        err, errlen))
            return -1;
    }
    for (size_t i = 0; i < json_len(added); i++) {
        const struct json *a = json_at(added, i);
        size_t len;
        const char *content = json_str(json_get(a, "content"), &len);
        int64_t id;
        json_int64(json_get(a, "id"), &id);
        if (!content)
            return fail(err, errlen, path, "added_tokens: a token without content");
        if (build_added(t, id, content, len, json_bool(json_get(a, "special")), path, err, errlen))
            return -1;
    }
    /* merges: "a b" strings (older files) or [a, b] pairs */
    char *buf = NULL;
    size_t bufcap = 0;
    for (size_t i = 0; i < json_len(merges); i++) {
        const struct json *e = json_at(merges, i);
        const char *a, *b;
        size_t la, lb;
        if (json_type(e) == JSON_STRING) {
            size_t l;
            a = json_str(e, &l);
            if (split_merge(a, l, &la)) {
                free(buf);
                return fail(err, errlen, path, "model.merges: an entry without a space");
            }
            b = a + la + 1;
            lb = l - la - 1;
        } else {
            a = json_str(json_at(e, 0), &la);
            b = json_str(json_at(e, 1), &lb);
            if (json_len(e) != 2 || !a || !b) {
                free(buf);
                return fail(err, errlen, path, "model.merges: an entry is not a pair of strings");
            }
        }
        if (build_merge(t, i, a, la, b, lb, &buf, &bufcap, path, err, errlen)) {
            free(buf);
            return -1;
        }
    }
    free(buf);
    build_finish(t);
    return 0;
}

/* 1 when j is {"type": "Replace", "pattern": {"String": from}, "content": to}. */
static int is_replace(const struct json *j, const char *from, const char *to)
{
    const char *ty = json_str(json_get(j, "type"), NULL);
    const char *f = json_str(json_get(json_get(j, "pattern"), "String"), NULL);
    const char *c = json_str(json_get(j, "content"), NULL);
    return ty && f && c && !strcmp(ty, "Replace") && !strcmp(f, from) && !strcmp(c, to);
}

/* The SentencePiece-style rules, in either of the layouts Hugging Face
 * writes them: a normalizer Sequence [Prepend("▁"), Replace(" ", "▁")]
 * (Llama 2 era files) or a Metaspace pre-tokenizer (later files); and a
 * decoder that maps them back (Replace, ByteFallback, Fuse, Strip, or
 * Metaspace). Sets t->spm; anything else in these places is refused. */
static int load_spm_rules(struct tokenizer *t, const struct json *norm, const struct json *pre,
                          const struct json *dec, const char *path, char *err, size_t errlen)
{
    static const char meta[] = "\xe2\x96\x81";
    const char *nt = json_str(json_get(norm, "type"), NULL);
    const char *pt = json_str(json_get(pre, "type"), NULL);
    if (nt) {
        /* a Sequence of steps, or one step alone (Gemma: the Replace) */
        int seq = strcmp(nt, "Sequence") == 0;
        const struct json *steps = json_get(norm, "normalizers");
        int prepend = 0, replace = 0, ok = 1;
        size_t n_steps = seq ? json_len(steps) : 1;
        for (size_t i = 0; ok && i < n_steps; i++) {
            const struct json *st = seq ? json_at(steps, i) : norm;
            const char *ty = json_str(json_get(st, "type"), NULL);
            const char *pp = json_str(json_get(st, "prepend"), NULL);
            if (ty && !strcmp(ty, "Prepend") && pp && !strcmp(pp, meta))
                prepend = 1;
            else if (is_replace(st, " ", meta))
                replace = 1;
            else
                ok = 0;
        }
        if (!ok || !replace) {
            snprintf(err, errlen, "%s: normalizer '%s' is not supported (only SentencePiece's "
                     "Prepend and Replace of spaces)", path, nt);
            return -1;
        }
        if (pt) {
            snprintf(err, errlen, "%s: a pre_tokenizer with a SentencePiece normalizer is not "
                     "supported", path);
            return -1;
        }
        t->spm = 1;
        t->spm_prepend = prepend;
    } else if (pt && !strcmp(pt, "Metaspace")) {
        const char *rep = json_str(json_get(pre, "replacement"), NULL);
        const char *scheme = json_str(json_get(pre, "prepend_scheme"), NULL);
        const struct json *split = json_get(pre, "split");
        if (!rep || strcmp(rep, meta) || (split && json_bool(split))) {
            snprintf(err, errlen, "%s: pre_tokenizer Metaspace: only replacement '\u2581' "
                     "without split is supported", path);
            return -1;
        }
        t->spm = 1;
        t->spm_metaspace = 1;
        if (scheme)
            t->spm_prepend = !strcmp(scheme, "always") ? 1 : !strcmp(scheme, "first") ? 2 : 0;
        else
            t->spm_prepend = json_bool(json_get(pre, "add_prefix_space"));
    }
    if (!t->spm)
        return 0;
    const char *dt = json_str(json_get(dec, "type"), NULL);
    if (dt && !strcmp(dt, "Metaspace")) {
        const char *ds = json_str(json_get(dec, "prepend_scheme"), NULL);
        t->spm_meta_decode = ds ? strcmp(ds, "never") != 0 : json_bool(json_get(dec, "add_prefix_space"));
        return 0;
    }
    const struct json *steps = json_get(dec, "decoders");
    int ok = dt && !strcmp(dt, "Sequence");
    for (size_t i = 0; ok && i < json_len(steps); i++) {
        const struct json *st = json_at(steps, i);
        const char *ty = json_str(json_get(st, "type"), NULL);
        if (ty && !strcmp(ty, "ByteFallback")) {
            t->spm_byte_decode = 1;
            continue;
        }
        if (is_replace(st, meta, " ") || (ty && !strcmp(ty, "Fuse")))
            continue;
        int64_t start, stop;
        const char *c = json_str(json_get(st, "content"), NULL);
        if (ty && !strcmp(ty, "Strip") && c && !strcmp(c, " ") &&
            !json_int64(json_get(st, "start"), &start) && start <= 1 &&
            !json_int64(json_get(st, "stop"), &stop) && stop == 0) {
            t->spm_strip_lead = start == 1;
            continue;
        }
        ok = 0;
    }
    if (!ok) {
        snprintf(err, errlen, "%s: decoder '%s' is not supported with a SentencePiece-style "
                 "tokenizer", path, dt ? dt : "?");
        return -1;
    }
    return 0;
}

int tokenizer_load_hf(const char *path, struct tokenizer **out, char *err, size_t errlen)
{
    *out = NULL;
    struct tokenizer *t = calloc(1, sizeof(*t));
    char *text = NULL;
    struct json *root = NULL;
    if (!t)
        return fail(err, errlen, path, "out of memory");
    byte_map(t);
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        goto fail;
    }
    size_t cap = 1 << 20, len = 0;
    text = malloc(cap);
    for (;;) {
        if (!text) {
            fclose(f);
            fail(err, errlen, path, "out of memory");
            goto fail;
        }
        len += fread(text + len, 1, cap - len, f);
        if (len < cap)
            break;
        if (cap > ((size_t)1 << 30)) {
            fclose(f);
            fail(err, errlen, path, "larger than 1 GiB");
            goto fail;
        }
        cap *= 2;
        char *n = realloc(text, cap);
        if (!n)
            free(text);
        text = n;
    }
    int rerr = ferror(f);
    fclose(f);
    if (rerr) {
        fail(err, errlen, path, "read error");
        goto fail;
    }
    char jerr[256];
    root = json_parse(text, len, jerr, sizeof(jerr));
    if (!root) {
        snprintf(err, errlen, "%s: %s", path, jerr);
        goto fail;
    }
    const struct json *pre = json_get(root, "pre_tokenizer");
    const char *pt = json_str(json_get(pre, "type"), NULL);
    if (load_spm_rules(t, json_get(root, "normalizer"), pre, json_get(root, "decoder"), path, err,
                       errlen))
        goto fail;
    if (load_model(t, root, path, err, errlen))
        goto fail;
    if (t->spm) {
        size_t ul;
        const char *unk = json_str(json_get(json_get(root, "model"), "unk_token"), &ul);
        t->unk_id = unk ? vocab_find(t, unk, ul) : -1;
    } else if (pt && strcmp(pt, "Sequence") == 0) {
        const struct json *steps = json_get(pre, "pretokenizers");
        for (size_t i = 0; i < json_len(steps); i++)
            if (load_pretok_step(t, json_at(steps, i), path, err, errlen))
                goto fail;
    } else if (pt) {
        if (load_pretok_step(t, pre, path, err, errlen))
            goto fail;
    }
    const struct json *dec = json_get(root, "decoder");
    const char *dt = json_str(json_get(dec, "type"), NULL);
    if (!t->spm && dt && strcmp(dt, "ByteLevel") != 0) {
        snprintf(err, errlen, "%s: decoder '%s' is not supported yet", path, dt);
        goto fail;
    }
    if (load_post(t, json_get(root, "post_processor"), path, err, errlen))
        goto fail;
    json_free(root);
    free(text);
    *out = t;
    return 0;
fail:
    json_free(root);
    free(text);
    tokenizer_destroy(t);
    return -1;
}

/* GGUF token types (llama.cpp's llama_token_type). */
enum { GGUF_TOK_NORMAL = 1, GGUF_TOK_UNKNOWN = 2, GGUF_TOK_CONTROL = 3,
       GGUF_TOK_USER_DEFINED = 4, GGUF_TOK_UNUSED = 5, GGUF_TOK_BYTE = 6 };

/* One merge candidate of a SentencePiece vocabulary. */
struct spm_merge {
    double score;
    int32_t res, left, right;
};

static int spm_merge_cmp(const void *pa, const void *pb)
{
    const struct spm_merge *a = pa, *b = pb;
    if (a->score != b->score)
        return a->score > b->score ? -1 : 1;
    if (a->res != b->res)
        return a->res < b->res ? -1 : 1;
    if (a->left != b->left)
        return a->left < b->left ? -1 : 1;
    return (a->right > b->right) - (a->right < b->right);
}

/* A GGUF 'llama' (SentencePiece) tokenizer: tokens with scores and types.
 * The merges are derived from the vocabulary as Hugging Face's converter
 * derives them: every split of a token into two tokens, ordered by the
 * merged token's score (then its id, then the parts' ids), so that BPE by
 * rank reproduces SentencePiece's highest-score-first merging. */
static int load_gguf_spm(struct tokenizer *t, const struct gguf_file *g, uint64_t n,
                         int has_types, const char *path, char *err, size_t errlen)
{
    enum gguf_type et;
    uint64_t n_scores = 0;
    if (gguf_get_arr(g, "tokenizer.ggml.scores", &et, &n_scores) || n_scores != n)
        return fail(err, errlen, path, "tokenizer.ggml.scores: missing or not one per token");
    int asp = 1;
    gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", &asp);
    t->spm = 1;
    t->spm_prepend = asp ? 1 : 0; /* llama.cpp: a space before every text fragment */
    t->spm_byte_decode = 1;
    t->spm_strip_lead = asp;
    size_t n_added = 0;
    for (uint64_t i = 0; has_types && i < n; i++) {
        int64_t ty;
        if (gguf_arr_i64(g, "tokenizer.ggml.token_type", i, &ty) == 0 &&
            (ty == GGUF_TOK_CONTROL || ty == GGUF_TOK_USER_DEFINED))
            n_added++;
    }
    /* candidates: at most (characters - 1) per token */
    size_t n_cand = 0, cap_cand = 0;
    struct spm_merge *cand = NULL;
    if (build_alloc(t, (int64_t)n, n_added, 0, path, err, errlen))
        return -1;
    for (uint64_t i = 0; i < n; i++) {
        size_t len;
        const char *s = gguf_arr_str(g, "tokenizer.ggml.tokens", i, &len);
        int64_t ty = GGUF_TOK_NORMAL;
        if (has_types)
            gguf_arr_i64(g, "tokenizer.ggml.token_type", i, &ty);
        if (ty == GGUF_TOK_CONTROL || ty == GGUF_TOK_USER_DEFINED) {
            if (build_added(t, (int64_t)i, s, len, ty == GGUF_TOK_CONTROL, path, err, errlen))
                goto fail;
        } else if (build_token(t, (int64_t)i, s, len, "tokenizer.ggml.tokens", path, err,
                               errlen)) {
            goto fail;
        }
        if (ty == GGUF_TOK_UNKNOWN && t->unk_id < 0)
            t->unk_id = (int32_t)i;
    }
    for (uint64_t i = 0; i < n; i++) {
        int64_t ty = GGUF_TOK_NORMAL;
        if (has_types)
            gguf_arr_i64(g, "tokenizer.ggml.token_type", i, &ty);
        if (ty != GGUF_TOK_NORMAL && ty != GGUF_TOK_USER_DEFINED)
            continue;
        double score;
        gguf_arr_f64(g, "tokenizer.ggml.scores", i, &score);
        const char *s = t->sym[i];
        size_t len = t->sym_len[i];
        for (size_t k = 1; k < len; k++) {
            if (((uint8_t)s[k] & 0xC0) == 0x80)
                continue; /* split between characters only */
            int32_t a = vocab_find(t, s, k), b = vocab_find(t, s + k, len - k);
            if (a < 0 || b < 0)
                continue;
            if (n_cand == cap_cand) {
                cap_cand = cap_cand ? 2 * cap_cand : 4096;
                struct spm_merge *nc = realloc(cand, cap_cand * sizeof(*nc));
                if (!nc) {
                    fail(err, errlen, path, "out of memory");
                    goto fail;
                }
                cand = nc;
            }
            cand[n_cand++] = (struct spm_merge){score, (int32_t)i, a, b};
        }
    }
    qsort(cand, n_cand, sizeof(*cand), spm_merge_cmp);
    free(t->mkey);
    free(t->mrank);
    free(t->mres);
    t->mcap = pow2_at_least(2 * n_cand + 2);
    t->mkey = calloc(t->mcap, sizeof(*t->mkey));
    t->mrank = malloc(t->mcap * sizeof(*t->mrank));
    t->mres = malloc(t->mcap * sizeof(*t->mres));
    if (!t->mkey || !t->mrank || !t->mres) {
        fail(err, errlen, path, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < n_cand; i++)
        merge_insert(t, cand[i].left, cand[i].right, (int32_t)i, cand[i].res);
    free(cand);
    return 0;
fail:
    free(cand);
    return -1;
}

int tokenizer_load_gguf(const struct gguf_file *g, const char *path, struct tokenizer **out,
                        char *err, size_t errlen)
{
    *out = NULL;
    const char *model = gguf_get_str(g, "tokenizer.ggml.model", NULL);
    if (!model)
        return fail(err, errlen, path, "no tokenizer (tokenizer.ggml.model is missing)");
    if (strcmp(model, "llama") == 0) {
        enum gguf_type et;
        uint64_t n, n_types = 0;
        if (gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n) || et != GGUF_STRING || n == 0 ||
            n >= (1u << 24))
            return fail(err, errlen, path, "tokenizer.ggml.tokens: missing, empty or not strings");
        int has_types = gguf_get_arr(g, "tokenizer.ggml.token_type", &et, &n_types) == 0;
        if (has_types && n_types != n)
            return fail(err, errlen, path, "tokenizer.ggml.token_type: not one per token");
        struct tokenizer *t = calloc(1, sizeof(*t));
        if (!t)
            return fail(err, errlen, path, "out of memory");
        byte_map(t);
        int64_t bos;
        int add_bos = 1; /* llama.cpp's default for SentencePiece models */
        gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &add_bos);
        if (load_gguf_spm(t, g, n, has_types, path, err, errlen)) {
            tokenizer_destroy(t);
            return -1;
        }
        if (add_bos && gguf_get_i64(g, "tokenizer.ggml.bos_token_id", &bos) == 0 && bos >= 0 &&
            bos < t->n_vocab)
            t->prefix[t->n_prefix++] = (int32_t)bos;
        *out = t;
        return 0;
    }
    if (strcmp(model, "gpt2") != 0) {
        snprintf(err, errlen, "%s: tokenizer.ggml.model '%s' is not supported (byte-level BPE "
                 "'gpt2' and SentencePiece 'llama' are)", path, model);
        return -1;
    }
    const char *pre = gguf_get_str(g, "tokenizer.ggml.pre", NULL);
    const char *pattern = gpt2_pattern;
    int ignore_merges = 0;
    if (pre && (strcmp(pre, "llama-bpe") == 0 || strcmp(pre, "llama3") == 0)) {
        pattern = llama3_pattern;
        ignore_merges = 1;
    } else if (pre && strcmp(pre, "qwen2") == 0) {
        pattern = qwen2_pattern;
    } else if (pre && strcmp(pre, "gpt2") != 0 && strcmp(pre, "gpt-2") != 0 &&
               strcmp(pre, "default") != 0) {
        snprintf(err, errlen, "%s: pre-tokenizer '%s' is not supported yet (llama-bpe, qwen2 "
                 "and gpt2 are)", path, pre);
        return -1;
    }
    enum gguf_type et;
    uint64_t n, n_types = 0, n_merges = 0;
    if (gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n) || et != GGUF_STRING || n == 0 ||
        n >= (1u << 24))
        return fail(err, errlen, path, "tokenizer.ggml.tokens: missing, empty or not strings");
    int has_types = gguf_get_arr(g, "tokenizer.ggml.token_type", &et, &n_types) == 0;
    if (has_types && n_types != n)
        return fail(err, errlen, path, "tokenizer.ggml.token_type: not one per token");
    if (gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n_merges) || et != GGUF_STRING)
        return fail(err, errlen, path, "tokenizer.ggml.merges: missing or not strings");
    struct tokenizer *t = calloc(1, sizeof(*t));
    if (!t)
        return fail(err, errlen, path, "out of memory");
    byte_map(t);
    t->ignore_merges = ignore_merges;
    size_t n_added = 0;
    for (uint64_t i = 0; has_types && i < n; i++) {
        int64_t ty;
        if (gguf_arr_i64(g, "tokenizer.ggml.token_type", i, &ty) == 0 &&
            (ty == GGUF_TOK_CONTROL || ty == GGUF_TOK_USER_DEFINED))
            n_added++;
    }
    char *buf = NULL;
    size_t bufcap = 0;
    if (build_alloc(t, (int64_t)n, n_added, n_merges, path, err, errlen))
        goto fail;
    for (uint64_t i = 0; i < n; i++) {
        size_t len;
        const char *s = gguf_arr_str(g, "tokenizer.ggml.tokens", i, &len);
        int64_t ty = GGUF_TOK_NORMAL;
        if (has_types)
            gguf_arr_i64(g, "tokenizer.ggml.token_type", i, &ty);
        if (ty == GGUF_TOK_CONTROL || ty == GGUF_TOK_USER_DEFINED) {
            /* control tokens are special (matched only when parsing
             * special tokens); user-defined ones are always matched */
            if (build_added(t, (int64_t)i, s, len, ty == GGUF_TOK_CONTROL, path, err, errlen))
                goto fail;
        } else if (build_token(t, (int64_t)i, s, len, "tokenizer.ggml.tokens", path, err,
                               errlen)) {
            goto fail;
        }
    }
    for (uint64_t i = 0; i < n_merges; i++) {
        size_t l, la;
        const char *m = gguf_arr_str(g, "tokenizer.ggml.merges", i, &l);
        if (!m || split_merge(m, l, &la)) {
            fail(err, errlen, path, "tokenizer.ggml.merges: an entry without a space");
            goto fail;
        }
        if (build_merge(t, (size_t)i, m, la, m + la + 1, l - la - 1, &buf, &bufcap, path, err,
                        errlen))
            goto fail;
    }
    free(buf);
    buf = NULL;
    build_finish(t);
    if (add_split(t, pattern, strlen(pattern), 0, 1, path, err, errlen))
        goto fail;
    /* BOS when the file says so (add_bos_token), as llama.cpp does */
    int add_bos = 0;
    int64_t bos;
    if (gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &add_bos) == 0 && add_bos &&
        gguf_get_i64(g, "tokenizer.ggml.bos_token_id", &bos) == 0) {
        if (bos < 0 || bos >= t->n_vocab) {
            fail(err, errlen, path, "tokenizer.ggml.bos_token_id: outside the vocabulary");
            goto fail;
        }
        t->prefix[t->n_prefix++] = (int32_t)bos;
    }
    *out = t;
    return 0;
fail:
    free(buf);
    tokenizer_destroy(t);
    return -1;
}

void tokenizer_destroy(struct tokenizer *t)
{
    if (!t)
        return;
    for (int64_t i = 0; i < t->n_vocab; i++) {
        if (t->sym)
            free(t->sym[i]);
        if (t->bytes)
            free(t->bytes[i]);
    }
    free(t->sym);
    free(t->sym_len);
    free(t->bytes);
    free(t->bytes_len);
    free(t->special);
    free(t->vslot);
    free(t->mkey);
    free(t->mrank);
    free(t->mres);
    for (size_t i = 0; i < t->n_added; i++)
        free(t->added[i].text);
    free(t->added);
    for (int i = 0; i < t->n_splits; i++)
        pcre2_code_free(t->splits[i].re);
    free(t);
}

int64_t tokenizer_n_vocab(const struct tokenizer *t) { return t->n_vocab; }

/* ----------------------------------------------------------- encoding */

struct ids {
    int32_t *v;
    size_t n, cap;
};

static int ids_push(struct ids *a, int32_t id)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 64;
        int32_t *n = realloc(a->v, cap * sizeof(*n));
        if (!n)
            return -1;
        a->v = n;
        a->cap = cap;
    }
    a->v[a->n++] = id;
    return 0;
}

/* Work space of one encode call. */
struct bpe_work {
    int32_t *id;
    int32_t *prev, *next;
    struct hent { int32_t rank, pos, left, right; } *heap;
    size_t cap, hcap, hn;
    char *sbuf;
    size_t scap;
};

static int hless(const struct hent *a, const struct hent *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void hpush(struct bpe_work *w, struct hent e)
{
    size_t i = w->hn++;
    w->heap[i] = e;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!hless(&w->heap[i], &w->heap[p]))
            break;
        struct hent tmp = w->heap[i];
        w->heap[i] = w->heap[p];
        w->heap[p] = tmp;
        i = p;
    }
}

static struct hent hpop(struct bpe_work *w)
{
    struct hent top = w->heap[0];
    w->heap[0] = w->heap[--w->hn];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < w->hn && hless(&w->heap[l], &w->heap[m]))
            m = l;
        if (r < w->hn && hless(&w->heap[r], &w->heap[m]))
            m = r;
        if (m == i)
            break;
        struct hent tmp = w->heap[i];
        w->heap[i] = w->heap[m];
        w->heap[m] = tmp;
        i = m;
    }
    return top;
}

static void pair_candidate(const struct tokenizer *t, struct bpe_work *w, int32_t l)
{
    int32_t r = w->next[l], res;
    if (r < 0)
        return;
    int32_t rank = merge_find(t, w->id[l], w->id[r], &res);
    if (rank >= 0)
        hpush(w, (struct hent){rank, l, w->id[l], w->id[r]});
}

/* Room for n symbols in w. */
static int bpe_reserve(struct bpe_work *w, size_t n)
{
    if (w->cap >= n)
        return 0;
    size_t cap = n + 64;
    int32_t *a = realloc(w->id, cap * sizeof(int32_t));
    if (a)
        w->id = a;
    int32_t *b = realloc(w->prev, cap * sizeof(int32_t));
    if (b)
        w->prev = b;
    int32_t *c = realloc(w->next, cap * sizeof(int32_t));
    if (c)
        w->next = c;
    /* the heap keeps stale entries (lazy deletion): n - 1 first pairs
     * and at most 2 new ones per merge, n - 1 merges */
    struct hent *h = realloc(w->heap, 3 * cap * sizeof(*h));
    if (h)
        w->heap = h;
    if (!a || !b || !c || !h)
        return -1;
    w->cap = cap;
    return 0;
}

/* Merges the n initial symbols w->id[0..n) by rank, leftmost first on
 * ties, and appends the result to out. -1: out of memory. */
static int bpe_run(const struct tokenizer *t, struct bpe_work *w, size_t n, struct ids *out)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        w->prev[i] = (int32_t)i - 1;
        w->next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    w->hn = 0;
    for (size_t i = 0; i + 1 < n; i++)
        pair_candidate(t, w, (int32_t)i);
    while (w->hn) {
        struct hent e = hpop(w);
        int32_t l = e.pos, r = w->next[l];
        /* stale: the left symbol changed or its neighbour did */
        if (w->id[l] != e.left || r < 0 || w->id[r] != e.right)
            continue;
        int32_t res = -1;
        merge_find(t, e.left, e.right, &res);
        w->id[l] = res;
        w->id[r] = -1;
        w->next[l] = w->next[r];
        if (w->next[r] >= 0)
            w->prev[w->next[r]] = l;
        if (w->prev[l] >= 0)
            pair_candidate(t, w, w->prev[l]);
        pair_candidate(t, w, l);
    }
    for (int32_t i = 0; i >= 0; i = w->next[i])
        if (ids_push(out, w->id[i]))
            return -1;
    return 0;
}

static long utf8_check(const uint8_t *s, size_t n);

/* SentencePiece-style BPE over one segment of text (between added
 * tokens): spaces become U+2581 (and one is prepended when the
 * tokenizer says so), each character is a symbol, and a character
 * outside the vocabulary (or an invalid byte) falls back to <0xXX> byte
 * tokens, else to the unknown token (consecutive unknowns fused). */
static int spm_segment(const struct tokenizer *t, struct bpe_work *w, const uint8_t *p, size_t n,
                       int at_start, struct ids *out, char *err, size_t errlen)
{
    static const uint8_t meta[3] = {0xE2, 0x96, 0x81};
    int prepend = t->spm_prepend == 1 || (t->spm_prepend == 2 && at_start);
    if (t->spm_metaspace && n > 0 && p[0] == ' ')
        prepend = 0;
    /* the normalized text */
    size_t cap = 3 * n + 3;
    if (w->scap < cap) {
        char *sb = realloc(w->sbuf, cap);
        if (!sb)
            goto oom;
        w->sbuf = sb;
        w->scap = cap;
    }
    uint8_t *q = (uint8_t *)w->sbuf;
    size_t m = 0;
    if (prepend) {
        memcpy(q, meta, 3);
        m = 3;
    }
    for (size_t i = 0; i < n; i++) {
        if (p[i] == ' ') {
            memcpy(q + m, meta, 3);
            m += 3;
        } else {
            q[m++] = p[i];
        }
    }
    if (bpe_reserve(w, m))
        goto oom;
    size_t ns = 0;
    int last_unk = 0;
    for (size_t i = 0; i < m;) {
        long k = utf8_check(q + i, m - i);
        size_t cl = k > 0 ? (size_t)k : 1;
        int32_t id = k > 0 ? vocab_find(t, (const char *)q + i, cl) : -1;
        if (id >= 0) {
            w->id[ns++] = id;
            last_unk = 0;
        } else {
            int have = 1;
            for (size_t b = 0; b < cl; b++)
                have &= t->byte_tok[q[i + b]] >= 0;
            if (have) {
                for (size_t b = 0; b < cl; b++)
                    w->id[ns++] = t->byte_tok[q[i + b]];
                last_unk = 0;
            } else if (t->unk_id >= 0) {
                if (!last_unk)
                    w->id[ns++] = t->unk_id;
                last_unk = 1;
            } else {
                snprintf(err, errlen, "tokenizer: a character has no token and there is no "
                         "byte fallback or unknown token");
                return -1;
            }
        }
        i += cl;
    }
    if (bpe_run(t, w, ns, out))
        goto oom;
    return 0;
oom:
    snprintf(err, errlen, "tokenizer: out of memory");
    return -1;
}

/* BPE over one piece of raw bytes. */
static int bpe_piece(const struct tokenizer *t, struct bpe_work *w, const uint8_t *p, size_t n,
                     struct ids *out, char *err, size_t errlen)
{
    if (n == 0)
        return 0;
    /* the piece as byte symbols: whole-word lookup first (ignore_merges) */
    if (t->ignore_merges) {
        if (w->scap < 2 * n) {
            char *s = realloc(w->sbuf, 2 * n);
            if (!s)
                goto oom;
            w->sbuf = s;
            w->scap = 2 * n;
        }
        size_t sl = 0;
        for (size_t i = 0; i < n; i++) {
            memcpy(w->sbuf + sl, t->byte_utf8[p[i]], t->byte_utf8_len[p[i]]);
            sl += t->byte_utf8_len[p[i]];
        }
        int32_t id = vocab_find(t, w->sbuf, sl);
        if (id >= 0)
            return ids_push(out, id) ? -1 : 0;
    }
    if (bpe_reserve(w, n))
        goto oom;
    for (size_t i = 0; i < n; i++) {
        w->id[i] = t->byte_sym[p[i]];
        if (w->id[i] < 0) {
            snprintf(err, errlen, "tokenizer: byte 0x%02x has no token", p[i]);
            return -1;
        }
    }
    if (bpe_run(t, w, n, out))
        goto oom;
    return 0;
oom:
    snprintf(err, errlen, "tokenizer: out of memory");
    return -1;
}

/* Pre-tokenizer step k over [p, p + n): pieces go to step k + 1, the last
 * step's to BPE. */
static int pretok(const struct tokenizer *t, struct bpe_work *w, pcre2_match_data **md, int k,
                  const uint8_t *p, size_t n, struct ids *out, char *err, size_t errlen)
{
    if (k == t->n_splits)
        return bpe_piece(t, w, p, n, out, err, errlen);
    const struct split *sp = &t->splits[k];
    size_t pos = 0;
    while (pos < n) {
        int rc = pcre2_match(sp->re, p, n, pos, PCRE2_NO_UTF_CHECK, md[k], NULL);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0) {
            snprintf(err, errlen, "tokenizer: pre_tokenizer regex failed (%d)", rc);
            return -1;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md[k]);
        size_t s = ov[0], e = ov[1];
        if (e == s) { /* an empty match: step over one character */
            size_t adv = 1;
            while (s + adv < n && (p[s + adv] & 0xC0) == 0x80)
                adv++;
            if (s > pos && pretok(t, w, md, k + 1, p + pos, s - pos, out, err, errlen))
                return -1;
            if (pretok(t, w, md, k + 1, p + s, adv, out, err, errlen))
                return -1;
            pos = s + adv;
            continue;
        }
        /* the delimiters are the matches, or with invert the gaps;
         * Isolated keeps them as pieces, Removed drops them */
        int keep_gap = !sp->invert || sp->isolated, keep_match = sp->invert || sp->isolated;
        if (s > pos && keep_gap && pretok(t, w, md, k + 1, p + pos, s - pos, out, err, errlen))
            return -1;
        if (keep_match && pretok(t, w, md, k + 1, p + s, e - s, out, err, errlen))
            return -1;
        pos = e;
    }
    if (pos < n && (!sp->invert || sp->isolated))
        return pretok(t, w, md, k + 1, p + pos, n - pos, out, err, errlen);
    return 0;
}

/* The pre-tokenizer over a segment that may hold invalid UTF-8 (the
 * regexes must only see valid text): valid runs go through it, each
 * maximal invalid subpart becomes a piece of its own. */
static int pretok_valid(const struct tokenizer *t, struct bpe_work *w, pcre2_match_data **md,
                        const uint8_t *p, size_t n, struct ids *out, char *err, size_t errlen)
{
    size_t run = 0, i = 0;
    while (i < n) {
        long k = utf8_check(p + i, n - i);
        if (k > 0) {
            i += (size_t)k;
            continue;
        }
        size_t bad = k < 0 ? (size_t)-k : n - i; /* incomplete at the end */
        if (i > run && pretok(t, w, md, 0, p + run, i - run, out, err, errlen))
            return -1;
        if (bpe_piece(t, w, p + i, bad, out, err, errlen))
            return -1;
        i += bad;
        run = i;
    }
    if (n > run)
        return pretok(t, w, md, 0, p + run, n - run, out, err, errlen);
    return 0;
}

/* The longest added token at text[i], or NULL. */
static const struct added *added_at(const struct tokenizer *t, const char *text, size_t len,
                                    size_t i, int parse_special)
{
    const struct added *best = NULL;
    if (!t->added_first[(uint8_t)text[i]])
        return NULL;
    for (size_t k = 0; k < t->n_added; k++) {
        const struct added *a = &t->added[k];
        if (a->special && !parse_special)
            continue;
        if (a->len <= len - i && memcmp(text + i, a->text, a->len) == 0 &&
            (!best || a->len > best->len))
            best = a;
    }
    return best;
}

int tokenizer_encode(const struct tokenizer *t, const char *text, size_t len, int add_special,
                     int parse_special, int32_t **ids, size_t *n, char *err, size_t errlen)
{
    struct ids out = {0};
    struct bpe_work w = {0};
    pcre2_match_data *md[TOK_MAX_SPLITS] = {0};
    char *pre = NULL;
    *ids = NULL;
    *n = 0;
    for (int k = 0; k < t->n_splits; k++) {
        md[k] = pcre2_match_data_create_from_pattern(t->splits[k].re, NULL);
        if (!md[k])
            goto oom;
    }
    if (add_special)
        for (int k = 0; k < t->n_prefix; k++)
            if (ids_push(&out, t->prefix[k]))
                goto oom;
    /* segments between added tokens go through the pre-tokenizer */
    size_t seg = 0;
    for (size_t i = 0; i <= len;) {
        const struct added *a = i < len ? added_at(t, text, len, i, parse_special) : NULL;
        if (i < len && !a) {
            i++;
            continue;
        }
        if (i > seg) {
            const uint8_t *sp = (const uint8_t *)text + seg;
            size_t sn = i - seg;
            if (t->spm) {
                if (spm_segment(t, &w, sp, sn, seg == 0, &out, err, errlen))
                    goto fail;
                sn = 0; /* done */
            } else if (t->add_prefix_space && sp[0] != ' ') {
                char *np = realloc(pre, sn + 1);
                if (!np)
                    goto oom;
                pre = np;
                pre[0] = ' ';
                memcpy(pre + 1, sp, sn);
                sp = (const uint8_t *)pre;
                sn++;
            }
            if (sn && pretok_valid(t, &w, md, sp, sn, &out, err, errlen))
                goto fail;
        }
        if (i == len)
            break;
        if (ids_push(&out, a->id))
            goto oom;
        i += a->len;
        seg = i;
    }
    if (add_special)
        for (int k = 0; k < t->n_suffix; k++)
            if (ids_push(&out, t->suffix[k]))
                goto oom;
    *ids = out.v;
    *n = out.n;
    out.v = NULL;
    int rc = 0;
    goto done;
oom:
    snprintf(err, errlen, "tokenizer: out of memory");
fail:
    rc = -1;
done:
    free(out.v);
    free(w.id);
    free(w.prev);
    free(w.next);
    free(w.heap);
    free(w.sbuf);
    free(pre);
    for (int k = 0; k < t->n_splits; k++)
        pcre2_match_data_free(md[k]);
    return rc;
}

/* ----------------------------------------------------------- decoding */

const char *tokenizer_token_bytes(const struct tokenizer *t, int32_t id, size_t *len)
{
    if (id < 0 || id >= t->n_vocab || !t->bytes[id]) {
        *len = 0;
        return NULL;
    }
    *len = t->bytes_len[id];
    return t->bytes[id];
}

int tokenizer_is_special(const struct tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab && t->special[id];
}

/* Length of the valid UTF-8 sequence at s[0..n): > 0 valid, -k the
 * length k >= 1 of a maximal invalid subpart, 0 an incomplete but so far
 * valid sequence that runs to the end. */
static long utf8_check(const uint8_t *s, size_t n)
{
    uint8_t b = s[0];
    if (b < 0x80)
        return 1;
    size_t need;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF)
        need = 2;
    else if (b >= 0xE0 && b <= 0xEF) {
        need = 3;
        if (b == 0xE0)
            lo = 0xA0;
        if (b == 0xED)
            hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 4;
        if (b == 0xF0)
            lo = 0x90;
        if (b == 0xF4)
            hi = 0x8F;
    } else {
        return -1;
    }
    for (size_t k = 1; k < need; k++) {
        if (k >= n)
            return 0;
        uint8_t c = s[k];
        if (k == 1 ? (c < lo || c > hi) : (c < 0x80 || c > 0xBF))
            return -(long)k;
    }
    return (long)need;
}

/* Appends the lossy UTF-8 of in[0..n) to out; with final == 0 an
 * incomplete tail is left unconsumed. Returns the bytes consumed, or -1
 * on out of memory. */
struct buf {
    char *p;
    size_t n, cap;
};

static int buf_put(struct buf *b, const void *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np)
            return -1;
        b->p = np;
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

static long lossy(struct buf *out, const uint8_t *in, size_t n, int final)
{
    static const char repl[3] = {(char)0xEF, (char)0xBF, (char)0xBD};
    size_t i = 0;
    while (i < n) {
        long k = utf8_check(in + i, n - i);
        if (k > 0) {
            if (buf_put(out, in + i, (size_t)k))
                return -1;
            i += (size_t)k;
        } else if (k < 0) {
            if (buf_put(out, repl, 3))
                return -1;
            i += (size_t)-k;
        } else if (!final) {
            break;
        } else {
            if (buf_put(out, repl, 3))
                return -1;
            i = n;
        }
    }
    return (long)i;
}

struct tok_stream {
    const struct tokenizer *t;
    int skip_special;
    int started;     /* some text was emitted (the leading space is decided) */
    int first_done;  /* a token went through (Metaspace's first-token rule) */
    struct buf pend; /* byte-level: bytes of an incomplete character */
    struct buf run;  /* SentencePiece: a run of <0xXX> byte tokens */
    struct buf out;
};

struct tok_stream *tok_stream_create(const struct tokenizer *t, int skip_special)
{
    struct tok_stream *s = calloc(1, sizeof(*s));
    if (s) {
        s->t = t;
        s->skip_special = skip_special;
    }
    return s;
}

void tok_stream_destroy(struct tok_stream *s)
{
    if (!s)
        return;
    free(s->pend.p);
    free(s->run.p);
    free(s->out.p);
    free(s);
}

/* SentencePiece's ByteFallback decoder: a run of byte tokens is its
 * bytes when they are valid UTF-8, else one U+FFFD per token. */
static int flush_run(struct tok_stream *s)
{
    static const char repl[3] = {(char)0xEF, (char)0xBF, (char)0xBD};
    if (s->run.n == 0)
        return 0;
    const uint8_t *r = (const uint8_t *)s->run.p;
    size_t i = 0;
    while (i < s->run.n) {
        long k = utf8_check(r + i, s->run.n - i);
        if (k <= 0)
            break;
        i += (size_t)k;
    }
    int rc = 0;
    if (i == s->run.n)
        rc = buf_put(&s->out, r, s->run.n);
    else
        for (size_t k = 0; k < s->run.n && rc == 0; k++)
            rc = buf_put(&s->out, repl, 3);
    s->run.n = 0;
    return rc;
}

/* The output of one push or of the finish, after the decoder's Strip of
 * one leading space of the whole text. */
static const char *stream_out(struct tok_stream *s, size_t *len)
{
    const char *p = s->out.p;
    size_t n = s->out.n;
    if (!s->started && n > 0) {
        s->started = 1;
        if (s->t->spm_strip_lead && p[0] == ' ') {
            p++;
            n--;
        }
    }
    *len = n;
    return p;
}

const char *tok_stream_push(struct tok_stream *s, int32_t id, size_t *len)
{
    const struct tokenizer *t = s->t;
    s->out.n = 0;
    if (buf_put(&s->out, "", 0))
        return NULL;
    size_t l;
    const char *b = tokenizer_token_bytes(t, id, &l);
    if (b && !(s->skip_special && t->special[id])) {
        int first = !s->first_done;
        s->first_done = 1;
        if (t->spm && first && t->spm_meta_decode) {
            /* Metaspace's decoder drops every U+2581 of the first token */
            for (size_t k = 0; k < l; k++)
                if (b[k] != ' ' && buf_put(&s->out, b + k, 1))
                    return NULL;
        } else if (t->spm) {
            if (l == 1 && t->byte_tok[(uint8_t)b[0]] == id) {
                if (buf_put(&s->run, b, 1))
                    return NULL;
            } else if (flush_run(s) || buf_put(&s->out, b, l)) {
                return NULL;
            }
        } else {
            if (buf_put(&s->pend, b, l))
                return NULL;
            long used = lossy(&s->out, (const uint8_t *)s->pend.p, s->pend.n, 0);
            if (used < 0)
                return NULL;
            memmove(s->pend.p, s->pend.p + used, s->pend.n - (size_t)used);
            s->pend.n -= (size_t)used;
        }
    }
    return stream_out(s, len);
}

const char *tok_stream_finish(struct tok_stream *s, size_t *len)
{
    s->out.n = 0;
    if (buf_put(&s->out, "", 0) || flush_run(s))
        return NULL;
    if (s->pend.n) {
        if (lossy(&s->out, (const uint8_t *)s->pend.p, s->pend.n, 1) < 0)
            return NULL;
        s->pend.n = 0;
    }
    return stream_out(s, len);
}

char *tokenizer_decode(const struct tokenizer *t, const int32_t *ids, size_t n, int skip_special,
                       size_t *len)
{
    /* the stream is the definition: the whole decode is its pieces */
    struct tok_stream *s = tok_stream_create(t, skip_special);
    struct buf all = {0};
    if (!s || buf_put(&all, "", 0))
        goto oom;
    for (size_t i = 0; i <= n; i++) {
        size_t l;
        const char *p = i < n ? tok_stream_push(s, ids[i], &l) : tok_stream_finish(s, &l);
        if (!p || buf_put(&all, p, l))
            goto oom;
    }
    tok_stream_destroy(s);
    *len = all.n;
    return all.p;
oom:
    tok_stream_destroy(s);
    free(all.p);
    return NULL;
}
