/* test_gguf.c: the GGUF loader through engine/gguf.h.
 *
 * Builds GGUF files byte by byte in a temporary directory: a valid one
 * with every supported tensor type and tokenizer metadata (checked through
 * every getter), then one patch per rule (counts, lengths, types, arrays,
 * alignment, dims, sizes, offsets, overlaps, duplicates, token ids), every
 * truncation, and random byte flips.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/gguf.h"

static int n_checks, n_failed;
static char root[64];  /* mkdtemp directory */
static char fpath[128]; /* the one file each case writes */

#define CHECK(cond)                                                        \
    do {                                                                   \
        n_checks++;                                                        \
        if (!(cond)) {                                                     \
            n_failed++;                                                    \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__,         \
                    __LINE__, #cond);                                      \
        }                                                                  \
    } while (0)

/* ---------------------------------------------------------------- builder */

struct gb {
    uint8_t *p;
    size_t n, cap;
};

static void gb_raw(struct gb *b, const void *s, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 256;
        b->p = realloc(b->p, b->cap);
        if (!b->p)
            exit(2);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

static void gb_u8(struct gb *b, uint8_t v) { gb_raw(b, &v, 1); }

static void gb_u32(struct gb *b, uint32_t v)
{
    uint8_t x[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    gb_raw(b, x, 4);
}

static void gb_u64(struct gb *b, uint64_t v)
{
    gb_u32(b, (uint32_t)v);
    gb_u32(b, (uint32_t)(v >> 32));
}

static void gb_strn(struct gb *b, const char *s, size_t n)
{
    gb_u64(b, n);
    gb_raw(b, s, n);
}

static void gb_str(struct gb *b, const char *s) { gb_strn(b, s, strlen(s)); }

static void gb_pad(struct gb *b, size_t align)
{
    while (b->n % align)
        gb_u8(b, 0);
}

static void patch_u32(struct gb *b, size_t at, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        b->p[at + i] = (uint8_t)(v >> (8 * i));
}

static void patch_u64(struct gb *b, size_t at, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        b->p[at + i] = (uint8_t)(v >> (8 * i));
}

static void gb_header(struct gb *b, uint32_t version, uint64_t n_t, uint64_t n_kv)
{
    gb_raw(b, "GGUF", 4);
    gb_u32(b, version);
    gb_u64(b, n_t);
    gb_u64(b, n_kv);
}

/* key/value helpers: each returns the offset of its value */
static size_t kv_head(struct gb *b, const char *key, uint32_t type)
{
    gb_str(b, key);
    gb_u32(b, type);
    return b->n;
}

static size_t kv_u32(struct gb *b, const char *key, uint32_t v)
{
    size_t at = kv_head(b, key, GGUF_UINT32);
    gb_u32(b, v);
    return at;
}

static size_t kv_string(struct gb *b, const char *key, const char *s)
{
    size_t at = kv_head(b, key, GGUF_STRING);
    gb_str(b, s);
    return at;
}

static size_t kv_arr_head(struct gb *b, const char *key, uint32_t elem, uint64_t n)
{
    size_t at = kv_head(b, key, GGUF_ARRAY);
    gb_u32(b, elem);
    gb_u64(b, n);
    return at;
}

static void tinfo(struct gb *b, const char *name, uint32_t nd, const uint64_t *ne, uint32_t type,
                  uint64_t off)
{
    gb_str(b, name);
    gb_u32(b, nd);
    for (uint32_t i = 0; i < nd; i++)
        gb_u64(b, ne[i]);
    gb_u32(b, type);
    gb_u64(b, off);
}

/* ------------------------------------------------------- the valid file */

#define NT 6
static const struct {
    const char *name;
    uint32_t nd;
    uint64_t ne[4];
    uint32_t type;       /* ggml number */
    enum k_dtype dtype;  /* what it maps to */
    uint64_t nbytes;
} std_t[NT] = {
    {"token_embd.weight", 2, {4, 4}, 0, K_F32, 64},
    {"blk.0.attn_q.weight", 2, {32, 2}, 8, K_Q8_0, 68},
    {"blk.0.ffn_up.weight", 2, {256, 1}, 12, K_Q4_K, 144},
    {"output.weight", 1, {256}, 14, K_Q6_K, 210},
    {"output_norm.weight", 1, {8}, 1, K_F16, 16},
    {"bf16.weight", 4, {2, 1, 1, 2}, 30, K_BF16, 8},
};

/* Where the fields of the valid file are, for patching. */
struct pos {
    size_t version, n_t, n_kv;
    size_t first_key_len, align_type, align_val, bool_val, arch_len;
    size_t scores_elem, scores_n, tokens_elem, tokens_n, bos_val, eos_val;
    size_t t_ndims[NT], t_ne[NT], t_type[NT], t_off[NT];
    size_t data_start;
    uint64_t off[NT]; /* tensor offsets in the data section */
};

struct opts {
    uint32_t version;
    uint32_t align; /* 0: no general.alignment key (default 32) */
};

/* Data bytes are a pattern of their position, so a tensor's data pointer
 * can be checked against where it should point. */
static uint8_t data_byte(size_t i) { return (uint8_t)(i * 7 + 3); }

static void std_file(struct gb *b, struct pos *p, const struct opts *o)
{
    memset(p, 0, sizeof(*p));
    b->n = 0;
    uint32_t align = o->align ? o->align : 32;
    size_t n_kv = 13 + (o->align ? 1 : 0);
    gb_header(b, o->version, NT, n_kv);
    p->version = 4;
    p->n_t = 8;
    p->n_kv = 16;
    p->first_key_len = b->n;
    p->arch_len = kv_string(b, "general.architecture", "llama");
    if (o->align) {
        p->align_type = kv_head(b, "general.alignment", GGUF_UINT32) - 4;
        p->align_val = b->n;
        gb_u32(b, o->align);
    }
    kv_u32(b, "llama.block_count", 2);
    kv_head(b, "some.f32", GGUF_FLOAT32);
    gb_u32(b, 0x3f000000); /* 0.5 */
    kv_head(b, "some.i64", GGUF_INT64);
    gb_u64(b, (uint64_t)-5);
    kv_head(b, "some.u64", GGUF_UINT64);
    gb_u64(b, (1ull << 53) + 1);
    p->bool_val = kv_head(b, "some.bool", GGUF_BOOL);
    gb_u8(b, 1);
    kv_head(b, "some.f64", GGUF_FLOAT64);
    gb_u64(b, 0x400921fb54442d18ull); /* pi */
    kv_head(b, "some.i8", GGUF_INT8);
    gb_u8(b, 0xfe); /* -2 */
    p->tokens_elem = kv_arr_head(b, "tokenizer.ggml.tokens", GGUF_STRING, 4);
    p->tokens_n = p->tokens_elem + 4;
    gb_str(b, "<s>");
    gb_str(b, "</s>");
    gb_str(b, "a");
    gb_strn(b, "", 0);
    p->scores_elem = kv_arr_head(b, "tokenizer.ggml.scores", GGUF_FLOAT32, 4);
    p->scores_n = p->scores_elem + 4;
    gb_u32(b, 0);
    gb_u32(b, 0);
    gb_u32(b, 0xbf800000); /* -1 */
    gb_u32(b, 0xc0000000); /* -2 */
    kv_arr_head(b, "tokenizer.ggml.token_type", GGUF_INT32, 4);
    gb_u32(b, 3);
    gb_u32(b, 3);
    gb_u32(b, 1);
    gb_u32(b, (uint32_t)-1);
    p->bos_val = kv_u32(b, "tokenizer.ggml.bos_token_id", 0);
    p->eos_val = kv_u32(b, "tokenizer.ggml.eos_token_id", 1);

    uint64_t off = 0;
    for (int i = 0; i < NT; i++) {
        off = (off + align - 1) / align * align;
        p->off[i] = off;
        gb_str(b, std_t[i].name);
        p->t_ndims[i] = b->n;
        gb_u32(b, std_t[i].nd);
        p->t_ne[i] = b->n;
        for (uint32_t d = 0; d < std_t[i].nd; d++)
            gb_u64(b, std_t[i].ne[d]);
        p->t_type[i] = b->n;
        gb_u32(b, std_t[i].type);
        p->t_off[i] = b->n;
        gb_u64(b, off);
        off += std_t[i].nbytes;
    }
    gb_pad(b, align);
    p->data_start = b->n;
    for (uint64_t i = 0; i < off; i++)
        gb_u8(b, data_byte((size_t)i));
}

static void write_file(const struct gb *b)
{
    /* unlink first: truncating a written file makes ext4 flush it */
    unlink(fpath);
    FILE *f = fopen(fpath, "wb");
    if (!f || (b->n && fwrite(b->p, 1, b->n, f) != b->n)) {
        perror(fpath);
        exit(2);
    }
    fclose(f);
}

static void expect_fail(int line, const struct gb *b, const char *want)
{
    write_file(b);
    char err[512] = "";
    struct gguf_file *f = (struct gguf_file *)1;
    int rc = gguf_open(fpath, &f, err, sizeof(err));
    char prefix[160];
    snprintf(prefix, sizeof(prefix), "%s: ", fpath);
    n_checks++;
    if (rc != -1 || f != NULL || strncmp(err, prefix, strlen(prefix)) != 0 || !strstr(err, want)) {
        n_failed++;
        fprintf(stderr, "%s:%d: expected error \"...%s\", got rc %d: \"%s\"\n", __FILE__, line,
                want, rc, err);
    }
    if (rc == 0)
        gguf_close(f);
}
#define EXPECT_FAIL(b, want) expect_fail(__LINE__, b, want)

static struct gguf_file *expect_ok(int line, const struct gb *b)
{
    write_file(b);
    char err[512] = "";
    struct gguf_file *f = NULL;
    n_checks++;
    if (gguf_open(fpath, &f, err, sizeof(err)) != 0) {
        n_failed++;
        fprintf(stderr, "%s:%d: expected success, got \"%s\"\n", __FILE__, line, err);
        return NULL;
    }
    return f;
}
#define EXPECT_OK(b) expect_ok(__LINE__, b)

/* ------------------------------------------------------------------ cases */

static void test_valid(void)
{
    struct gb b = {0};
    struct pos p;
    std_file(&b, &p, &(struct opts){3, 32});
    struct gguf_file *f = EXPECT_OK(&b);
    if (!f) {
        free(b.p);
        return;
    }
    CHECK(gguf_version(f) == 3);
    CHECK(gguf_file_bytes(f) == b.n);
    CHECK(gguf_n_keys(f) == 14);
    int64_t k = gguf_find_key(f, "llama.block_count");
    CHECK(k == 2 && strcmp(gguf_key_name(f, k), "llama.block_count") == 0);
    CHECK(gguf_key_type(f, k) == GGUF_UINT32);
    CHECK(gguf_find_key(f, "nope") == -1 && gguf_key_name(f, 14) == NULL &&
          gguf_key_name(f, -1) == NULL);
    CHECK(gguf_key_type(f, gguf_find_key(f, "tokenizer.ggml.tokens")) == GGUF_ARRAY);

    int64_t i64;
    double f64;
    int bv;
    CHECK(gguf_get_i64(f, "llama.block_count", &i64) == 0 && i64 == 2);
    CHECK(gguf_get_i64(f, "some.i64", &i64) == 0 && i64 == -5);
    CHECK(gguf_get_i64(f, "some.i8", &i64) == 0 && i64 == -2);
    CHECK(gguf_get_i64(f, "some.u64", &i64) == 0 && i64 == (1ll << 53) + 1);
    CHECK(gguf_get_i64(f, "some.bool", &i64) == 0 && i64 == 1);
    CHECK(gguf_get_i64(f, "some.f32", &i64) == -1);
    CHECK(gguf_get_i64(f, "general.architecture", &i64) == -1);
    CHECK(gguf_get_i64(f, "tokenizer.ggml.tokens", &i64) == -1);
    CHECK(gguf_get_i64(f, "missing", &i64) == -1);
    CHECK(gguf_get_f64(f, "some.f32", &f64) == 0 && f64 == 0.5);
    CHECK(gguf_get_f64(f, "some.f64", &f64) == 0 && f64 == 3.141592653589793);
    CHECK(gguf_get_f64(f, "llama.block_count", &f64) == 0 && f64 == 2.0);
    CHECK(gguf_get_f64(f, "some.u64", &f64) == -1); /* 2^53 + 1: not exact */
    CHECK(gguf_get_f64(f, "some.bool", &f64) == -1);
    CHECK(gguf_get_bool(f, "some.bool", &bv) == 0 && bv == 1);
    CHECK(gguf_get_bool(f, "llama.block_count", &bv) == -1);
    size_t len = 0;
    const char *s = gguf_get_str(f, "general.architecture", &len);
    CHECK(s && strcmp(s, "llama") == 0 && len == 5);
    CHECK(gguf_get_str(f, "llama.block_count", &len) == NULL);
    CHECK(gguf_get_str(f, "general.architecture", NULL) != NULL);

    enum gguf_type et;
    uint64_t n;
    CHECK(gguf_get_arr(f, "tokenizer.ggml.tokens", &et, &n) == 0 && et == GGUF_STRING && n == 4);
    CHECK(gguf_get_arr(f, "tokenizer.ggml.scores", &et, &n) == 0 && et == GGUF_FLOAT32 && n == 4);
    CHECK(gguf_get_arr(f, "general.architecture", &et, &n) == -1);
    s = gguf_arr_str(f, "tokenizer.ggml.tokens", 1, &len);
    CHECK(s && len == 4 && memcmp(s, "</s>", 4) == 0);
    s = gguf_arr_str(f, "tokenizer.ggml.tokens", 3, &len);
    CHECK(s && len == 0);
    CHECK(gguf_arr_str(f, "tokenizer.ggml.tokens", 4, &len) == NULL);
    CHECK(gguf_arr_str(f, "tokenizer.ggml.scores", 0, &len) == NULL);
    CHECK(gguf_arr_f64(f, "tokenizer.ggml.scores", 3, &f64) == 0 && f64 == -2.0);
    CHECK(gguf_arr_f64(f, "tokenizer.ggml.scores", 4, &f64) == -1);
    CHECK(gguf_arr_f64(f, "tokenizer.ggml.tokens", 0, &f64) == -1);
    CHECK(gguf_arr_i64(f, "tokenizer.ggml.token_type", 3, &i64) == 0 && i64 == -1);
    CHECK(gguf_arr_i64(f, "tokenizer.ggml.token_type", 0, &i64) == 0 && i64 == 3);
    CHECK(gguf_arr_i64(f, "tokenizer.ggml.scores", 0, &i64) == -1);
    CHECK(gguf_arr_f64(f, "tokenizer.ggml.token_type", 2, &f64) == 0 && f64 == 1.0);

    CHECK(gguf_n_tensors(f) == NT && gguf_tensor(f, NT) == NULL);
    for (int i = 0; i < NT; i++) {
        const struct tensor *t = gguf_tensor(f, i);
        CHECK(t && strcmp(t->name, std_t[i].name) == 0);
        CHECK(gguf_find_tensor(f, std_t[i].name) == t);
        CHECK(t->dtype == std_t[i].dtype && t->n_dims == (int)std_t[i].nd);
        CHECK(t->nbytes == std_t[i].nbytes);
        for (int d = 0; d < 4; d++)
            CHECK(t->ne[d] == (d < (int)std_t[i].nd ? (int64_t)std_t[i].ne[d] : 1));
        const uint8_t *data = t->data;
        int same = 1;
        for (uint64_t j = 0; j < t->nbytes; j++)
            same &= data[j] == data_byte((size_t)(p.off[i] + j));
        CHECK(same);
        CHECK(data == NULL || memcmp(data, b.p + p.data_start + p.off[i], t->nbytes) == 0);
    }
    CHECK(gguf_find_tensor(f, "token_embd") == NULL);
    gguf_close(f);
    gguf_close(NULL);

    /* version 2 is the same layout */
    std_file(&b, &p, &(struct opts){2, 32});
    f = EXPECT_OK(&b);
    CHECK(f && gguf_version(f) == 2);
    gguf_close(f);
    /* no general.alignment: the default 32 */
    std_file(&b, &p, &(struct opts){3, 0});
    f = EXPECT_OK(&b);
    CHECK(f && gguf_n_keys(f) == 13);
    gguf_close(f);
    /* a larger alignment moves the data section and the offsets */
    std_file(&b, &p, &(struct opts){3, 256});
    f = EXPECT_OK(&b);
    CHECK(f && p.data_start % 256 == 0 && p.off[1] == 256 && p.off[3] == 768);
    if (f)
        CHECK(memcmp(gguf_find_tensor(f, "output.weight")->data, b.p + p.data_start + 768, 210) == 0);
    gguf_close(f);

    /* the smallest file: a header, no keys, no tensors */
    b.n = 0;
    gb_header(&b, 3, 0, 0);
    f = EXPECT_OK(&b);
    CHECK(f && gguf_n_tensors(f) == 0 && gguf_n_keys(f) == 0 && gguf_find_key(f, "x") == -1 &&
          gguf_find_tensor(f, "x") == NULL);
    gguf_close(f);
    free(b.p);
}

/* Each patch of one field of the valid file, with the error it must give. */
static void test_patches(void)
{
    struct gb b = {0};
    struct pos p;
    const struct opts o = {3, 32};
#define PATCH(stmt, want)                       \
    do {                                        \
        std_file(&b, &p, &o);                   \
        stmt;                                   \
        EXPECT_FAIL(&b, want);                  \
    } while (0)

    /* magic and version */
    PATCH(memcpy(b.p, "GGUX", 4), "not a GGUF file (magic 'GGUX')");
    PATCH(memcpy(b.p, "\0\0\0\0", 4), "not a GGUF file (magic '\\x00\\x00\\x00\\x00')");
    PATCH(patch_u32(&b, p.version, 1), "GGUF version 1 is not supported");
    PATCH(patch_u32(&b, p.version, 4), "unsupported GGUF version 4");
    PATCH(patch_u32(&b, p.version, 0), "unsupported GGUF version 0");
    PATCH(patch_u32(&b, p.version, 0x03000000), "big-endian GGUF is not supported");

    /* counts against the bytes left, before any reservation */
    PATCH(patch_u64(&b, p.n_t, 1ull << 40), "tensor count 1099511627776");
    PATCH(patch_u64(&b, p.n_t, UINT64_MAX), "cannot fit in the");
    PATCH(patch_u64(&b, p.n_kv, 1ull << 40), "key/value count 1099511627776 cannot fit");
    PATCH(patch_u64(&b, p.n_kv, UINT64_MAX), "key/value count");
    PATCH(patch_u64(&b, p.n_t, 7), "tensor #6 has an empty name"); /* reads the padding */
    PATCH(patch_u64(&b, p.n_kv, 15), "");      /* reads tensor infos as a key: any error */
    PATCH(patch_u64(&b, p.n_kv, 13), "");      /* reads a key as tensor info: any error */

    /* strings bounded by the bytes left */
    PATCH(patch_u64(&b, p.first_key_len, 1ull << 62), "key #0 name at offset 24: string length 4611686018427387904 exceeds");
    PATCH(patch_u64(&b, p.first_key_len, UINT64_MAX), "exceeds the");
    PATCH(patch_u64(&b, p.first_key_len, 0), "key #0 has an empty name");
    PATCH(patch_u64(&b, p.arch_len, b.n), "key 'general.architecture' value at offset");

    /* value types in range, bools 0 or 1 */
    PATCH(patch_u32(&b, p.arch_len - 4, 13), "key 'general.architecture': value type 13 out of range");
    PATCH(patch_u32(&b, p.arch_len - 4, UINT32_MAX), "value type 4294967295 out of range");
    PATCH(b.p[p.bool_val] = 2, "key 'some.bool': bool value 2 is not 0 or 1");

    /* arrays: element type, nesting, length x size */
    PATCH(patch_u32(&b, p.scores_elem, 13), "key 'tokenizer.ggml.scores': array element type 13 out of range");
    PATCH(patch_u32(&b, p.scores_elem, GGUF_ARRAY), "key 'tokenizer.ggml.scores': nested arrays");
    PATCH(patch_u64(&b, p.scores_n, 1ull << 62), "key 'tokenizer.ggml.scores': array of 4611686018427387904 float32 runs past the end");
    PATCH(patch_u64(&b, p.scores_n, 1ull << 61), "array of 2305843009213693952 float32 runs past the end");
    PATCH(patch_u64(&b, p.scores_n, b.n / 4), "runs past the end of the file");
    PATCH(patch_u64(&b, p.tokens_n, 1ull << 60), "key 'tokenizer.ggml.tokens': array of 1152921504606846976 strings cannot fit");
    PATCH(patch_u64(&b, p.tokens_n, 5), "");
    PATCH(patch_u64(&b, p.tokens_elem + 12, 1ull << 40), "key 'tokenizer.ggml.tokens' string 0 at offset");
    /* a different element type of the same size parses, then the
     * tokenizer check refuses it */
    PATCH(patch_u32(&b, p.scores_elem, GGUF_INT32), "tokenizer.ggml.scores is an array of int32, expected an array of float32");

    /* alignment */
    PATCH(patch_u32(&b, p.align_val, 0), "general.alignment 0 is not a nonzero power of two");
    PATCH(patch_u32(&b, p.align_val, 48), "general.alignment 48 is not a nonzero power of two");
    PATCH(patch_u32(&b, p.align_type, GGUF_INT32), "general.alignment is a int32, expected uint32");
    PATCH(patch_u32(&b, p.align_type, GGUF_FLOAT32), "general.alignment is a float32, expected uint32");
    PATCH(patch_u32(&b, p.align_val, 64), "tensor 'blk.0.ffn_up.weight': offset 160 is not a multiple of the alignment 64");

    /* dims, types, blocks, sizes */
    PATCH(patch_u32(&b, p.t_ndims[0], 0), "tensor 'token_embd.weight': n_dims 0, expected 1 to 4");
    PATCH(patch_u32(&b, p.t_ndims[0], 5), "tensor 'token_embd.weight': n_dims 5, expected 1 to 4");
    PATCH(patch_u32(&b, p.t_ndims[0], UINT32_MAX), "n_dims 4294967295");
    PATCH(patch_u64(&b, p.t_ne[0], 0), "tensor 'token_embd.weight': ne[0] = 0, expected 1 to 2^63-1");
    PATCH(patch_u64(&b, p.t_ne[0] + 8, 0), "tensor 'token_embd.weight': ne[1] = 0");
    PATCH(patch_u64(&b, p.t_ne[0] + 8, 1ull << 63), "ne[1] = 9223372036854775808");
    PATCH(patch_u32(&b, p.t_type[1], 2), "tensor 'blk.0.attn_q.weight': type 2 (q4_0) is not supported");
    PATCH(patch_u32(&b, p.t_type[1], 28), "type 28 (f64) is not supported");
    PATCH(patch_u32(&b, p.t_type[1], 4), "type 4 (unknown) is not supported");
    PATCH(patch_u32(&b, p.t_type[1], 1000), "tensor 'blk.0.attn_q.weight': type 1000 (unknown)");
    PATCH(patch_u64(&b, p.t_ne[1], 33), "tensor 'blk.0.attn_q.weight': ne[0] = 33 is not a multiple of the q8_0 block size 32");
    PATCH(patch_u64(&b, p.t_ne[2], 128), "ne[0] = 128 is not a multiple of the q4_k block size 256");
    PATCH(patch_u64(&b, p.t_ne[3], 255), "q6_k block size 256");
    PATCH(patch_u64(&b, p.t_ne[0], 1ull << 62), "tensor 'token_embd.weight': size overflows 64 bits");
    PATCH(patch_u64(&b, p.t_ne[0] + 8, 1ull << 62), "tensor 'token_embd.weight': size overflows");
    PATCH((patch_u64(&b, p.t_ne[5] + 8, 1ull << 32), patch_u64(&b, p.t_ne[5] + 16, 1ull << 32)),
          "tensor 'bf16.weight': size overflows");
    /* a larger but representable size must then fail the bounds */
    PATCH(patch_u64(&b, p.t_ne[0] + 8, 1ull << 40), "tensor 'token_embd.weight': offset 0 + size 17592186044416 beyond end of file (1512 bytes, data section at 928)");

    /* offsets: aligned, inside the file, not overlapping */
    PATCH(patch_u64(&b, p.t_off[1], 65), "tensor 'blk.0.attn_q.weight': offset 65 is not a multiple of the alignment 32");
    PATCH(patch_u64(&b, p.t_off[5], 1ull << 40), "tensor 'bf16.weight': offset 1099511627776 + size 8 beyond end of file");
    PATCH(patch_u64(&b, p.t_off[5], UINT64_MAX - 31), "beyond end of file");
    PATCH(patch_u64(&b, p.t_off[5], p.off[5] + 32), "tensor 'bf16.weight': offset 608 + size 8 beyond end of file");
    PATCH(patch_u64(&b, p.t_off[2], 64), "tensor 'blk.0.ffn_up.weight' (offset 64) overlaps tensor 'blk.0.attn_q.weight' (offset 64, size 68)");
    PATCH(patch_u64(&b, p.t_off[2], 96), "tensor 'blk.0.ffn_up.weight' (offset 96) overlaps tensor 'blk.0.attn_q.weight'");
    PATCH(patch_u64(&b, p.t_off[0], 512), "tensor 'token_embd.weight' (offset 512) overlaps tensor 'output.weight' (offset 320, size 210)");

    /* special token ids inside the vocabulary */
    PATCH(patch_u32(&b, p.bos_val, 4), "tokenizer.ggml.bos_token_id = 4 is outside the vocabulary (4 tokens)");
    PATCH(patch_u32(&b, p.eos_val, UINT32_MAX), "tokenizer.ggml.eos_token_id = 4294967295 is outside the vocabulary");
    PATCH((patch_u32(&b, p.bos_val - 4, GGUF_INT32), patch_u32(&b, p.bos_val, (uint32_t)-1)),
          "tokenizer.ggml.bos_token_id = -1 is outside the vocabulary");
    PATCH(patch_u32(&b, p.bos_val - 4, GGUF_FLOAT32), "tokenizer.ggml.bos_token_id is a float32, expected an integer");
#undef PATCH
    /* the int32 bos id of 0 above is fine */
    std_file(&b, &p, &o);
    patch_u32(&b, p.bos_val - 4, GGUF_INT32);
    gguf_close(EXPECT_OK(&b));
    free(b.p);
}

/* Headers built whole, for rules a one-field patch cannot reach. */
static void test_built(void)
{
    struct gb b = {0};
    uint64_t ne4[1] = {4};

    /* duplicate keys */
    b.n = 0;
    gb_header(&b, 3, 0, 3);
    kv_u32(&b, "a.b", 1);
    kv_u32(&b, "c", 1);
    kv_string(&b, "a.b", "x");
    EXPECT_FAIL(&b, "duplicate key 'a.b'");

    /* key names: NUL inside, too long */
    b.n = 0;
    gb_header(&b, 3, 0, 1);
    gb_strn(&b, "a\0b", 3);
    gb_u32(&b, GGUF_UINT8);
    gb_u8(&b, 1);
    EXPECT_FAIL(&b, "key 'a\\x00b': name contains a NUL byte");
    b.n = 0;
    gb_header(&b, 3, 0, 1);
    char *longkey = malloc(70000);
    memset(longkey, 'k', 70000);
    gb_strn(&b, longkey, 70000);
    free(longkey);
    gb_u32(&b, GGUF_UINT8);
    gb_u8(&b, 1);
    EXPECT_FAIL(&b, "key #0: name is 70000 bytes, over 65535");

    /* every scalar type, a bool array, an empty array: all fine */
    b.n = 0;
    gb_header(&b, 3, 0, 6);
    kv_head(&b, "u16", GGUF_UINT16);
    gb_raw(&b, "\xff\xff", 2);
    kv_head(&b, "i16", GGUF_INT16);
    gb_raw(&b, "\xff\xff", 2);
    kv_head(&b, "u8", GGUF_UINT8);
    gb_u8(&b, 200);
    kv_head(&b, "u64", GGUF_UINT64);
    gb_u64(&b, UINT64_MAX);
    kv_arr_head(&b, "bools", GGUF_BOOL, 3);
    gb_raw(&b, "\x01\x00\x01", 3);
    kv_arr_head(&b, "empty", GGUF_STRING, 0);
    struct gguf_file *f = EXPECT_OK(&b);
    if (f) {
        int64_t v;
        double d;
        CHECK(gguf_get_i64(f, "u16", &v) == 0 && v == 65535);
        CHECK(gguf_get_i64(f, "i16", &v) == 0 && v == -1);
        CHECK(gguf_get_i64(f, "u8", &v) == 0 && v == 200);
        CHECK(gguf_get_i64(f, "u64", &v) == -1); /* above INT64_MAX */
        CHECK(gguf_get_f64(f, "i16", &d) == 0 && d == -1.0);
        CHECK(gguf_arr_i64(f, "bools", 2, &v) == 0 && v == 1);
        CHECK(gguf_arr_i64(f, "bools", 1, &v) == 0 && v == 0);
        uint64_t n = 9;
        CHECK(gguf_get_arr(f, "empty", NULL, &n) == 0 && n == 0);
        CHECK(gguf_arr_str(f, "empty", 0, NULL) == NULL);
        gguf_close(f);
    }
    b.n = 0;
    gb_header(&b, 3, 0, 1);
    kv_arr_head(&b, "bools", GGUF_BOOL, 3);
    gb_raw(&b, "\x01\x00\x07", 3);
    EXPECT_FAIL(&b, "key 'bools': bool element 2 is 7, not 0 or 1");

    /* duplicate tensor names */
    b.n = 0;
    gb_header(&b, 3, 2, 0);
    tinfo(&b, "w", 1, ne4, 0, 0);
    tinfo(&b, "w", 1, ne4, 0, 32);
    gb_pad(&b, 32);
    gb_raw(&b, (uint8_t[48]){0}, 48);
    EXPECT_FAIL(&b, "duplicate tensor name 'w'");
    /* tensor names: empty, NUL inside */
    b.n = 0;
    gb_header(&b, 3, 1, 0);
    tinfo(&b, "", 1, ne4, 0, 0);
    gb_pad(&b, 32);
    gb_raw(&b, (uint8_t[16]){0}, 16);
    EXPECT_FAIL(&b, "tensor #0 has an empty name");
    b.n = 0;
    gb_header(&b, 3, 1, 0);
    gb_strn(&b, "w\0x", 3);
    gb_u32(&b, 1);
    gb_u64(&b, 4);
    gb_u32(&b, 0);
    gb_u64(&b, 0);
    gb_pad(&b, 32);
    gb_raw(&b, (uint8_t[16]){0}, 16);
    EXPECT_FAIL(&b, "tensor 'w\\x00x': name contains a NUL byte");
    /* the data section starts at the aligned offset: data written right
     * after the header (unpadded) leaves the tensor short */
    b.n = 0;
    gb_header(&b, 3, 1, 0);
    tinfo(&b, "w", 1, ne4, 0, 0);
    size_t hdr_end = b.n;
    gb_raw(&b, (uint8_t[16]){0}, 16);
    EXPECT_FAIL(&b, "tensor 'w': offset 0 + size 16 beyond end of file");
    CHECK(hdr_end % 32 != 0);
    /* zero-size tensors share an offset without overlapping */
    b.n = 0;
    gb_header(&b, 3, 2, 0);
    tinfo(&b, "a", 1, ne4, 0, 0);
    tinfo(&b, "b", 1, ne4, 0, 32);
    gb_pad(&b, 32);
    gb_raw(&b, (uint8_t[48]){0}, 48);
    gguf_close(EXPECT_OK(&b));

    /* tokenizer arrays: equal lengths, right types, ids need a vocabulary */
    b.n = 0;
    gb_header(&b, 3, 0, 2);
    kv_arr_head(&b, "tokenizer.ggml.tokens", GGUF_STRING, 2);
    gb_str(&b, "a");
    gb_str(&b, "b");
    kv_arr_head(&b, "tokenizer.ggml.scores", GGUF_FLOAT32, 3);
    gb_raw(&b, (uint8_t[12]){0}, 12);
    EXPECT_FAIL(&b, "tokenizer.ggml.scores has 3 entries but tokenizer.ggml.tokens has 2");
    b.n = 0;
    gb_header(&b, 3, 0, 2);
    kv_arr_head(&b, "tokenizer.ggml.scores", GGUF_FLOAT32, 2);
    gb_raw(&b, (uint8_t[8]){0}, 8);
    kv_arr_head(&b, "tokenizer.ggml.token_type", GGUF_INT32, 1);
    gb_raw(&b, (uint8_t[4]){0}, 4);
    EXPECT_FAIL(&b, "tokenizer.ggml.token_type has 1 entries but tokenizer.ggml.scores has 2");
    b.n = 0;
    gb_header(&b, 3, 0, 1);
    kv_arr_head(&b, "tokenizer.ggml.tokens", GGUF_INT32, 1);
    gb_u32(&b, 0);
    EXPECT_FAIL(&b, "tokenizer.ggml.tokens is an array of int32, expected an array of string");
    b.n = 0;
    gb_header(&b, 3, 0, 1);
    kv_string(&b, "tokenizer.ggml.tokens", "abc");
    EXPECT_FAIL(&b, "tokenizer.ggml.tokens is a string value, expected an array of string");
    b.n = 0;
    gb_header(&b, 3, 0, 1);
    kv_u32(&b, "tokenizer.ggml.unknown_token_id", 0);
    EXPECT_FAIL(&b, "tokenizer.ggml.unknown_token_id is set but there is no tokenizer.ggml.tokens");
    b.n = 0;
    gb_header(&b, 3, 0, 2);
    kv_arr_head(&b, "tokenizer.ggml.tokens", GGUF_STRING, 1);
    gb_str(&b, "a");
    kv_string(&b, "tokenizer.ggml.padding_token_id", "0");
    EXPECT_FAIL(&b, "tokenizer.ggml.padding_token_id is a string, expected an integer");
    b.n = 0;
    gb_header(&b, 3, 0, 2);
    kv_arr_head(&b, "tokenizer.ggml.tokens", GGUF_STRING, 1);
    gb_str(&b, "a");
    kv_head(&b, "tokenizer.ggml.padding_token_id", GGUF_UINT64);
    gb_u64(&b, 1ull << 63);
    EXPECT_FAIL(&b, "tokenizer.ggml.padding_token_id is a uint64, expected an integer");

    /* too small, not a file */
    b.n = 0;
    gb_raw(&b, "GGUF\3\0\0\0", 8);
    EXPECT_FAIL(&b, "file is 8 bytes, too small for a GGUF header (24 bytes)");
    char err[512];
    struct gguf_file *g = NULL;
    CHECK(gguf_open(root, &g, err, sizeof(err)) == -1 && g == NULL && strstr(err, "not a regular file"));
    char missing[160];
    snprintf(missing, sizeof(missing), "%s/missing.gguf", root);
    CHECK(gguf_open(missing, &g, err, sizeof(err)) == -1 && strstr(err, "missing.gguf: cannot open: No such file"));
    /* a tiny err buffer and a NULL one */
    CHECK(gguf_open(missing, &g, err, 4) == -1 && strlen(err) < 4);
    CHECK(gguf_open(missing, &g, NULL, 0) == -1);
    free(b.p);
}

static void test_truncation(void)
{
    struct gb b = {0};
    struct pos p;
    std_file(&b, &p, &(struct opts){3, 32});
    size_t full = b.n;
    int all = 1;
    for (size_t cut = 0; cut < full; cut++) {
        b.n = cut;
        write_file(&b);
        char err[512] = "";
        struct gguf_file *f = NULL;
        if (gguf_open(fpath, &f, err, sizeof(err)) == 0) {
            all = 0;
            fprintf(stderr, "truncated to %zu bytes: opened\n", cut);
            gguf_close(f);
        } else if (strncmp(err, fpath, strlen(fpath)) != 0) {
            all = 0;
            fprintf(stderr, "truncated to %zu bytes: message without path: %s\n", cut, err);
        }
    }
    CHECK(all);
    b.n = full;
    gguf_close(EXPECT_OK(&b));
    free(b.p);
}

static void test_flips(void)
{
    struct gb b = {0};
    struct pos p;
    std_file(&b, &p, &(struct opts){3, 32});
    uint8_t *orig = malloc(b.n);
    memcpy(orig, b.p, b.n);
    uint32_t rng = 777;
    int ok = 1, opened = 0;
    for (int it = 0; it < 4000; it++) {
        memcpy(b.p, orig, b.n);
        int flips = 1 + it % 4;
        for (int k = 0; k < flips; k++) {
            rng = rng * 1664525u + 1013904223u;
            /* mostly in the header, where the structure is */
            size_t span = it % 5 ? p.data_start : b.n;
            size_t at = (rng >> 8) % span;
            rng = rng * 1664525u + 1013904223u;
            b.p[at] = (uint8_t)(rng >> 24);
        }
        write_file(&b);
        char err[512] = "";
        struct gguf_file *f = NULL;
        if (gguf_open(fpath, &f, err, sizeof(err)) == 0) {
            opened++;
            /* whatever loaded must be self-consistent */
            for (size_t i = 0; i < gguf_n_tensors(f); i++) {
                const struct tensor *t = gguf_tensor(f, i);
                if (gguf_find_tensor(f, t->name) != t)
                    ok = 0;
            }
            for (size_t i = 0; i < gguf_n_keys(f); i++) {
                const char *k = gguf_key_name(f, (int64_t)i);
                enum gguf_type et;
                uint64_t n;
                if (gguf_find_key(f, k) != (int64_t)i)
                    ok = 0;
                if (gguf_get_arr(f, k, &et, &n) == 0)
                    for (uint64_t j = 0; j < n && j < 8; j++) {
                        size_t l;
                        double d;
                        int64_t v;
                        (void)gguf_arr_str(f, k, j, &l);
                        (void)gguf_arr_f64(f, k, j, &d);
                        (void)gguf_arr_i64(f, k, j, &v);
                    }
            }
            gguf_close(f);
        } else if (strncmp(err, fpath, strlen(fpath)) != 0) {
            ok = 0;
        }
    }
    CHECK(ok);
    CHECK(opened > 0);
    free(orig);
    free(b.p);
}

int main(void)
{
    snprintf(root, sizeof(root), "/tmp/test_gguf_XXXXXX");
    if (!mkdtemp(root)) {
        perror("mkdtemp");
        return 2;
    }
    snprintf(fpath, sizeof(fpath), "%s/model.gguf", root);
    test_valid();
    test_patches();
    test_built();
    test_truncation();
    test_flips();
    unlink(fpath);
    rmdir(root);
    printf("test_gguf: %d checks, %d failed\n", n_checks, n_failed);
    return n_failed ? 1 : 0;
}
