/* test_safetensors.c: the safetensors loader through engine/safetensors.h.
 *
 * Writes model directories byte by byte into a temporary directory: a
 * single file, a sharded one with an index and an unaligned F16 tensor,
 * then one mutation per rule (header bounds, JSON, dtypes, shapes, offsets,
 * tiling, index names), every truncation, and random byte flips.
 */
#include <dirent.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/safetensors.h"

static int n_checks, n_failed;
static char root[64]; /* the mkdtemp directory; set once in main */

#define CHECK(cond)                                                        \
    do {                                                                   \
        n_checks++;                                                        \
        if (!(cond)) {                                                     \
            n_failed++;                                                    \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__,         \
                    __LINE__, #cond);                                      \
        }                                                                  \
    } while (0)

/* ------------------------------------------------------------- fixtures */

static void write_bytes(const char *path, const void *b, size_t n)
{
    /* unlink first: truncating a written file makes ext4 flush it */
    unlink(path);
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(b, 1, n, f) != n)) {
        perror(path);
        exit(2);
    }
    fclose(f);
}

/* Removes every file in dir, then dir. The fixtures are one level deep. */
static void rm_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    char p[512];
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
        struct stat sb;
        if (lstat(p, &sb) == 0 && S_ISDIR(sb.st_mode))
            rm_dir(p);
        else
            unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

/* A fresh empty directory under root for one case. */
static const char *case_dir(void)
{
    static char dir[128];
    static int n;
    snprintf(dir, sizeof(dir), "%s/c%d", root, n++);
    if (mkdir(dir, 0700) != 0) {
        perror(dir);
        exit(2);
    }
    return dir;
}

/* A safetensors file: 8-byte little-endian header length, header, data.
 * hdr_len may differ from strlen(hdr) to test the bounds. */
static size_t build_st(uint8_t *out, uint64_t hdr_len, const char *hdr, const void *data,
                       size_t data_len)
{
    size_t h = strlen(hdr);
    for (int i = 0; i < 8; i++)
        out[i] = (uint8_t)(hdr_len >> (8 * i));
    memcpy(out + 8, hdr, h);
    memcpy(out + 8 + h, data, data_len);
    return 8 + h + data_len;
}

static void write_st(const char *dir, const char *file, const char *hdr, const void *data,
                     size_t data_len)
{
    size_t cap = 8 + strlen(hdr) + data_len;
    uint8_t *buf = malloc(cap);
    size_t n = build_st(buf, strlen(hdr), hdr, data, data_len);
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", dir, file);
    write_bytes(path, buf, n);
    free(buf);
}

static void write_text(const char *dir, const char *file, const char *text)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", dir, file);
    write_bytes(path, text, strlen(text));
}

/* Opens dir expecting failure; the message must name want_file (a path
 * prefix) and contain want. */
static void expect_fail_at(int line, const char *dir, const char *want_file, const char *want)
{
    char err[512] = "";
    struct st_model *m = (struct st_model *)1;
    int rc = st_open(dir, &m, err, sizeof(err));
    char prefix[300];
    snprintf(prefix, sizeof(prefix), "%s: ", want_file);
    n_checks++;
    if (rc != -1 || m != NULL || strncmp(err, prefix, strlen(prefix)) != 0 || !strstr(err, want)) {
        n_failed++;
        fprintf(stderr, "%s:%d: expected error \"%s...%s\", got rc %d: \"%s\"\n", __FILE__, line,
                prefix, want, rc, err);
    }
    if (rc == 0)
        st_close(m);
}
#define EXPECT_FAIL_AT(dir, file, want) expect_fail_at(__LINE__, dir, file, want)

/* One model.safetensors with header hdr and data, expected to fail. */
static void expect_single_fail(int line, const char *hdr, const void *data, size_t n,
                               const char *want)
{
    const char *dir = case_dir();
    write_st(dir, "model.safetensors", hdr, data, n);
    char file[256];
    snprintf(file, sizeof(file), "%s/model.safetensors", dir);
    expect_fail_at(line, dir, file, want);
}
#define EXPECT_SINGLE_FAIL(hdr, data, n, want) expect_single_fail(__LINE__, hdr, data, n, want)

/* ---------------------------------------------------------------- cases */

static const float a_vals[6] = {1, 2, 3, 4, 5, 6};      /* F32 [2,3] */
static const uint16_t b_vals[3] = {0x3c00, 0x4000, 0xc200}; /* F16 [3]: 1, 2, -3 */
static const uint16_t c_val = 0x3f80;                   /* BF16 scalar: 1.0 */

/* The valid single-file fixture; the data region is 32 bytes. */
#define VALID_HDR                                                                      \
    "{\"__metadata__\":{\"format\":\"pt\"},"                                           \
    "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"             \
    "\"b\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[24,30]},"              \
    "\"c\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[30,32]}}"

static void valid_data(uint8_t *d)
{
    memcpy(d, a_vals, 24);
    memcpy(d + 24, b_vals, 6);
    memcpy(d + 30, &c_val, 2);
}

static void test_single(void)
{
    const char *dir = case_dir();
    uint8_t data[32];
    valid_data(data);
    write_st(dir, "model.safetensors", VALID_HDR, data, sizeof(data));
    /* a pickle beside it is ignored, never opened */
    write_text(dir, "pytorch_model.bin", "not a pickle");
    char err[512] = "";
    struct st_model *m = NULL;
    int rc = st_open(dir, &m, err, sizeof(err));
    CHECK(rc == 0 && m);
    if (rc) {
        fprintf(stderr, "%s\n", err);
        return;
    }
    CHECK(st_n_tensors(m) == 3);
    CHECK(st_file_bytes(m) == 8 + strlen(VALID_HDR) + 32);
    const struct tensor *a = st_find(m, "a"), *b = st_find(m, "b"), *c = st_find(m, "c");
    CHECK(a && b && c && st_find(m, "d") == NULL && st_find(m, "") == NULL);
    CHECK(st_tensor(m, 0) == a && st_tensor(m, 3) == NULL);
    CHECK(strcmp(a->name, "a") == 0 && a->dtype == K_F32 && a->n_dims == 2);
    CHECK(a->ne[0] == 3 && a->ne[1] == 2 && a->ne[2] == 1 && a->ne[3] == 1);
    CHECK(a->nbytes == 24 && memcmp(a->data, a_vals, 24) == 0);
    CHECK(b->dtype == K_F16 && b->n_dims == 1 && b->ne[0] == 3 && b->nbytes == 6);
    CHECK(memcmp(b->data, b_vals, 6) == 0);
    CHECK(c->dtype == K_BF16 && c->n_dims == 1 && c->ne[0] == 1 && c->nbytes == 2);
    uint16_t cv;
    memcpy(&cv, c->data, 2);
    CHECK(k_bf16_to_f32(cv) == 1.0f);
    st_close(m);
    st_close(NULL);

    /* 4-d shape reversed into ne; a zero-size tensor is legal safetensors */
    dir = case_dir();
    write_st(dir, "model.safetensors",
             "{\"w\":{\"dtype\":\"F16\",\"shape\":[2,1,3,4],\"data_offsets\":[0,48]},"
             "\"e\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[48,48]}}",
             (uint8_t[48]){0}, 48);
    rc = st_open(dir, &m, err, sizeof(err));
    CHECK(rc == 0);
    if (rc == 0) {
        const struct tensor *w = st_find(m, "w"), *e = st_find(m, "e");
        CHECK(w && w->n_dims == 4 && w->ne[0] == 4 && w->ne[1] == 3 && w->ne[2] == 1 &&
              w->ne[3] == 2 && w->nbytes == 48);
        CHECK(e && e->n_dims == 2 && e->ne[0] == 5 && e->ne[1] == 0 && e->nbytes == 0);
        st_close(m);
    }

    /* header padded with trailing spaces, as the safetensors library writes */
    dir = case_dir();
    write_st(dir, "model.safetensors",
             "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}       ",
             "\0\0\x80\x3f", 4);
    rc = st_open(dir, &m, err, sizeof(err));
    CHECK(rc == 0 && st_n_tensors(m) == 1);
    if (rc == 0)
        st_close(m);

    /* only metadata, no tensors, no data */
    dir = case_dir();
    write_st(dir, "model.safetensors", "{\"__metadata__\":{}}", "", 0);
    rc = st_open(dir, &m, err, sizeof(err));
    CHECK(rc == 0 && st_n_tensors(m) == 0);
    if (rc == 0)
        st_close(m);
}

static void test_sharded(void)
{
    const char *dir = case_dir();
    /* shard 1: x (F32 [2]) */
    float xv[2] = {0.5f, -1.5f};
    write_st(dir, "model-00001-of-00002.safetensors",
             "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", xv, 8);
    /* shard 2: y (BF16 [1]) then z (F16 [2,2]) at data offset 2; the header
     * is padded so that z lands on an odd address. */
    uint16_t zv[4] = {0x3c00, 0x3800, 0x3400, 0xbc00};
    uint8_t d2[10];
    memcpy(d2, "\x80\x3f", 2);
    memcpy(d2 + 2, zv, 8);
    const char *h2 = "{\"z\":{\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[2,10]},"
                     "\"y\":{\"dtype\":\"BF16\",\"shape\":[1],\"data_offsets\":[0,2]}}";
    char h2p[256];
    /* 8 + header + 2 odd: pad the header to an odd length */
    snprintf(h2p, sizeof(h2p), "%s%s", h2, strlen(h2) % 2 ? "" : " ");
    write_st(dir, "model-00002-of-00002.safetensors", h2p, d2, sizeof(d2));
    write_text(dir, "model.safetensors.index.json",
               "{\"metadata\":{\"total_size\":18},\"weight_map\":{"
               "\"z\":\"model-00002-of-00002.safetensors\","
               "\"x\":\"model-00001-of-00002.safetensors\","
               "\"y\":\"model-00002-of-00002.safetensors\"}}");
    char err[512] = "";
    struct st_model *m = NULL;
    int rc = st_open(dir, &m, err, sizeof(err));
    CHECK(rc == 0);
    if (rc) {
        fprintf(stderr, "%s\n", err);
        return;
    }
    CHECK(st_n_tensors(m) == 3);
    const struct tensor *x = st_find(m, "x"), *y = st_find(m, "y"), *z = st_find(m, "z");
    CHECK(x && y && z);
    CHECK(x->dtype == K_F32 && x->ne[0] == 2 && memcmp(x->data, xv, 8) == 0);
    CHECK(y->dtype == K_BF16 && y->ne[0] == 1);
    CHECK(z->dtype == K_F16 && z->n_dims == 2 && z->ne[0] == 2 && z->ne[1] == 2 && z->nbytes == 8);
    CHECK(((uintptr_t)z->data & 1) == 1); /* unaligned on purpose */
    uint16_t h;
    memcpy(&h, (const uint8_t *)z->data + 2, 2);
    CHECK(k_f16_to_f32(h) == 0.5f);
    memcpy(&h, (const uint8_t *)z->data + 6, 2);
    CHECK(k_f16_to_f32(h) == -1.0f);
    CHECK(st_file_bytes(m) ==
          (8 + strlen("{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}") + 8) +
              (8 + strlen(h2p) + 10));
    st_close(m);
}

static void test_sharded_errors(void)
{
    const char *ok1 = "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    const char *ok2 = "{\"y\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    char ipath[256];
#define INDEX_CASE(map_json, want)                                                \
    do {                                                                          \
        const char *d = case_dir();                                               \
        write_st(d, "a.safetensors", ok1, "abcd", 4);                             \
        write_st(d, "b.safetensors", ok2, "abcd", 4);                             \
        write_text(d, "model.safetensors.index.json", map_json);                  \
        snprintf(ipath, sizeof(ipath), "%s/model.safetensors.index.json", d);     \
        EXPECT_FAIL_AT(d, ipath, want);                                           \
    } while (0)

    INDEX_CASE("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"../b.safetensors\"}}",
               "not a plain file name");
    INDEX_CASE("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"sub/b.safetensors\"}}",
               "not a plain file name");
    INDEX_CASE("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"/tmp/b.safetensors\"}}",
               "not a plain file name");
    INDEX_CASE("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"..\"}}", "not a plain file name");
    INDEX_CASE("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b\\u0000.safetensors\"}}",
               "not a plain file name");
    INDEX_CASE("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"\"}}", "empty file name");
    INDEX_CASE("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"pytorch_model.bin\"}}",
               "pickled weights are not loaded; convert to safetensors");
    INDEX_CASE("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":3}}", "tensor 'y' is not a string");
    INDEX_CASE("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\",\"w\":\"b.safetensors\"}}",
               "lists tensor 'w' in b.safetensors, which does not contain it");
    INDEX_CASE("{\"weight_map\":{\"x\":\"b.safetensors\",\"y\":\"b.safetensors\"}}",
               "lists tensor 'x' in b.safetensors, which does not contain it");
    INDEX_CASE("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\",\"q\":\"a.safetensors\"}}",
               "tensor 'q' in a.safetensors");
    INDEX_CASE("{\"weight_map\":{}}", "weight_map is empty");
    INDEX_CASE("{\"metadata\":{}}", "no \"weight_map\" object");
    INDEX_CASE("{\"weight_map\":[]}", "no \"weight_map\" object");
    INDEX_CASE("[]", "no \"weight_map\" object");
    INDEX_CASE("{\"weight_map\":{\"x\":\"a.safetensors\",\"x\":\"a.safetensors\"}}", "duplicate key");
    INDEX_CASE("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\"}", "JSON: offset");
    INDEX_CASE("{\"weight_map\":{\"x\":\"a.safetensors\",\"\":\"b.safetensors\"}}", "bad tensor name");

    /* a shard holds a tensor the index does not list */
    const char *d = case_dir();
    write_st(d, "a.safetensors",
             "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
             "\"extra\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", "abcdefgh", 8);
    write_text(d, "model.safetensors.index.json", "{\"weight_map\":{\"x\":\"a.safetensors\"}}");
    snprintf(ipath, sizeof(ipath), "%s/model.safetensors.index.json", d);
    EXPECT_FAIL_AT(d, ipath, "tensor 'extra' in ");
    EXPECT_FAIL_AT(d, ipath, "a.safetensors is not listed in weight_map");

    /* a shard the index names that does not exist: the shard's path */
    d = case_dir();
    write_st(d, "a.safetensors", ok1, "abcd", 4);
    write_text(d, "model.safetensors.index.json",
               "{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"c.safetensors\"}}");
    snprintf(ipath, sizeof(ipath), "%s/c.safetensors", d);
    EXPECT_FAIL_AT(d, ipath, "cannot open: No such file");

    /* the same tensor in two shards, and the index says which: ambiguous */
    d = case_dir();
    write_st(d, "a.safetensors", ok1, "abcd", 4);
    write_st(d, "b.safetensors", ok1, "abcd", 4);
    write_text(d, "model.safetensors.index.json",
               "{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\"}}");
    snprintf(ipath, sizeof(ipath), "%s/model.safetensors.index.json", d);
    EXPECT_FAIL_AT(d, ipath, "tensor 'x' is in both");

    /* a tensor listed in the wrong shard */
    d = case_dir();
    write_st(d, "a.safetensors",
             "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
             "\"y\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", "abcdefgh", 8);
    write_st(d, "b.safetensors", "{\"z\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
             "abcd", 4);
    write_text(d, "model.safetensors.index.json",
               "{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\",\"z\":\"b.safetensors\"}}");
    snprintf(ipath, sizeof(ipath), "%s/model.safetensors.index.json", d);
    EXPECT_FAIL_AT(d, ipath, "weight_map says tensor 'y' is in b.safetensors but it is in a.safetensors");

    /* a bad shard is reported with the shard's own path */
    d = case_dir();
    write_st(d, "a.safetensors", ok1, "abcd", 4);
    write_st(d, "b.safetensors", "{\"y\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}",
             "abcdefgh", 8);
    write_text(d, "model.safetensors.index.json",
               "{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\"}}");
    snprintf(ipath, sizeof(ipath), "%s/b.safetensors", d);
    EXPECT_FAIL_AT(d, ipath, "tensor 'y': dtype F64 is not supported");
#undef INDEX_CASE
}

static void test_directory(void)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/does-not-exist", root);
    EXPECT_FAIL_AT(path, path, "No such file or directory");

    const char *d = case_dir();
    EXPECT_FAIL_AT(d, d, "no model.safetensors or model.safetensors.index.json");

    d = case_dir();
    write_text(d, "pytorch_model.bin", "PK\x03\x04 pickle");
    write_text(d, "config.json", "{}");
    EXPECT_FAIL_AT(d, d, "only pytorch_model.bin: pickled weights are not loaded; convert to safetensors");

    d = case_dir();
    write_text(d, "consolidated.safetensors", "x");
    EXPECT_FAIL_AT(d, d, "found consolidated.safetensors, but no index names it");

    d = case_dir();
    write_text(d, "model.safetensors", "");
    snprintf(path, sizeof(path), "%s/model.safetensors", d);
    EXPECT_FAIL_AT(d, path, "file is 0 bytes, too small");
    snprintf(path, sizeof(path), "%s/model.safetensors", d);
    EXPECT_FAIL_AT(path, path, "not a directory");

    /* model.safetensors that is a directory: not taken for the weights */
    d = case_dir();
    snprintf(path, sizeof(path), "%s/model.safetensors", d);
    mkdir(path, 0700);
    EXPECT_FAIL_AT(d, d, "no model.safetensors");
}

static void test_header_rules(void)
{
    uint8_t data[64];
    memset(data, 0, sizeof(data));
    uint8_t buf[512];
    const char *d;
    char path[256];

    /* header length bounds */
#define LEN_CASE(hdr_len, hdr, nd, want)                                         \
    do {                                                                         \
        d = case_dir();                                                          \
        size_t n_ = build_st(buf, hdr_len, hdr, data, nd);                       \
        snprintf(path, sizeof(path), "%s/model.safetensors", d);                 \
        write_bytes(path, buf, n_);                                              \
        EXPECT_FAIL_AT(d, path, want);                                           \
    } while (0)
    LEN_CASE(0, "{}", 0, "header length 0 is too small");
    LEN_CASE(1, "{}", 0, "header length 1 is too small");
    LEN_CASE((100ull << 20) + 1, "{}", 0, "exceeds the 100 MiB limit");
    LEN_CASE(UINT64_MAX, "{}", 0, "exceeds the 100 MiB limit");
    LEN_CASE(3, "{}", 0, "runs past the end of the file (10 bytes)");
    LEN_CASE(1000, "{}", 64, "runs past the end of the file");
    LEN_CASE(2, "{x", 0, "header JSON: offset 1: expected a string key");
#undef LEN_CASE

    EXPECT_SINGLE_FAIL("[]", data, 0, "header is not a JSON object");
    EXPECT_SINGLE_FAIL("{\"a\":1,\"a\":2}", data, 0, "header JSON: offset");
    EXPECT_SINGLE_FAIL("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                       "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                       data, 8, "duplicate key \"a\"");
    EXPECT_SINGLE_FAIL("{\"a\":{}} trailing", data, 0, "trailing bytes");
    EXPECT_SINGLE_FAIL("{\"__metadata__\":{\"k\":1}}", data, 0, "__metadata__ value 'k' is not a string");
    EXPECT_SINGLE_FAIL("{\"__metadata__\":[]}", data, 0, "__metadata__ is not an object");
    EXPECT_SINGLE_FAIL("{\"\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", data, 4,
                       "empty tensor name");
    EXPECT_SINGLE_FAIL("{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
                       data, 4, "tensor name 'a\\x00b' contains a NUL byte");
    EXPECT_SINGLE_FAIL("{\"a\":[1]}", data, 0, "tensor 'a': entry is not an object");
    EXPECT_SINGLE_FAIL("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}",
                       data, 4, "tensor 'a': unexpected field 'x'");
    EXPECT_SINGLE_FAIL("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", data, 4,
                       "tensor 'a': missing field 'shape'");
    EXPECT_SINGLE_FAIL("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", data, 4,
                       "tensor 'a': missing field 'dtype'");
    EXPECT_SINGLE_FAIL("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", data, 4,
                       "tensor 'a': missing field 'data_offsets'");
    EXPECT_SINGLE_FAIL("{\"a\":{}}", data, 0, "tensor 'a': missing field 'dtype'");

    /* dtypes: a closed set; the message names the tensor and the dtype */
    EXPECT_SINGLE_FAIL("{\"w.0\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}", data, 8,
                       "tensor 'w.0': dtype F64 is not supported (only F32, F16, BF16)");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}", data, 8,
                       "tensor 'w': dtype I64 is not supported");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F8_E4M3\",\"shape\":[1],\"data_offsets\":[0,1]}}", data, 1,
                       "tensor 'w': dtype F8_E4M3 is not supported");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", data, 1,
                       "dtype U8 is not supported");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"BOOL\",\"shape\":[1],\"data_offsets\":[0,1]}}", data, 1,
                       "dtype BOOL is not supported");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", data, 4,
                       "tensor 'w': unknown dtype 'f32'");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\\n\",\"shape\":[1],\"data_offsets\":[0,4]}}", data, 4,
                       "unknown dtype 'F32\\x0a'");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]}}", data, 4,
                       "tensor 'w': dtype is not a string");

    /* shapes */
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":1,\"data_offsets\":[0,4]}}", data, 4,
                       "tensor 'w': shape is not an array");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", data, 4,
                       "tensor 'w': shape[0] is not a non-negative integer");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1.5],\"data_offsets\":[0,4]}}", data, 4,
                       "shape[1] is not a non-negative integer");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", data, 4,
                       "shape[0] is not a non-negative integer");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[1e2],\"data_offsets\":[0,4]}}", data, 4,
                       "shape[0] is not a non-negative integer");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],\"data_offsets\":[0,4]}}",
                       data, 4, "shape[0] is not a non-negative integer");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,4]}}", data, 4,
                       "tensor 'w': shape has 5 dimensions, at most 4 supported");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,2],\"data_offsets\":[0,4]}}",
                       data, 4, "tensor 'w': shape product overflows");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,4]}}",
                       data, 4, "shape product overflows"); /* 2^62 x 4 bytes */
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", data, 4,
                       "tensor 'w': shape and dtype f32 need 8 bytes but data_offsets span 4");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,4]}}", data, 4,
                       "need 6 bytes but data_offsets span 4");

    /* data_offsets */
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", data, 4,
                       "tensor 'w': data_offsets is not an array of two integers");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", data, 4,
                       "data_offsets is not an array of two integers");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":{}}}", data, 4,
                       "data_offsets is not an array of two integers");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", data, 4,
                       "data_offsets entries must be non-negative integers");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4.5]}}", data, 4,
                       "data_offsets entries must be non-negative integers");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,0]}}", data, 4,
                       "tensor 'w': data_offsets begin 4 > end 0");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", data, 4,
                       "tensor 'w': data_offsets [4, 8] beyond the data region (4 bytes)");
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[9223372036854775803,9223372036854775807]}}",
                       data, 4, "beyond the data region");

    /* tiling of the data region: gaps, overlaps, trailing bytes */
    EXPECT_SINGLE_FAIL("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", data, 8,
                       "gap in the data region: bytes [0, 4) belong to no tensor (next is 'w')");
    EXPECT_SINGLE_FAIL("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
                       data, 12, "gap in the data region: bytes [4, 8)");
    EXPECT_SINGLE_FAIL("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                       data, 8, "tensor 'b' [4, 8) overlaps tensor 'a' (ends at 8)");
    EXPECT_SINGLE_FAIL("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
                       data, 4, "overlaps tensor");
    EXPECT_SINGLE_FAIL("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", data, 6,
                       "tensors cover 4 bytes but the data region has 6 (trailing bytes)");
    EXPECT_SINGLE_FAIL("{}", data, 1, "tensors cover 0 bytes but the data region has 1");
    /* a hostile name is printed escaped and cut */
    char big[1200];
    int k = snprintf(big, sizeof(big), "{\"");
    for (int i = 0; i < 1000; i++)
        big[k++] = 'n';
    snprintf(big + k, sizeof(big) - (size_t)k, "\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}");
    EXPECT_SINGLE_FAIL(big, data, 8, "nnnn...': dtype F64");
}

/* Every prefix of a valid file fails cleanly; one byte more fails too. */
static void test_truncation(void)
{
    uint8_t data[32], buf[512];
    valid_data(data);
    size_t n = build_st(buf, strlen(VALID_HDR), VALID_HDR, data, sizeof(data));
    const char *d = case_dir();
    char path[256];
    snprintf(path, sizeof(path), "%s/model.safetensors", d);
    int all = 1;
    for (size_t cut = 0; cut < n; cut++) {
        write_bytes(path, buf, cut);
        char err[512] = "";
        struct st_model *m = NULL;
        if (st_open(d, &m, err, sizeof(err)) == 0) {
            all = 0;
            fprintf(stderr, "truncated to %zu bytes: opened\n", cut);
            st_close(m);
        } else if (strncmp(err, path, strlen(path)) != 0) {
            all = 0;
            fprintf(stderr, "truncated to %zu bytes: message without path: %s\n", cut, err);
        }
    }
    CHECK(all);
    buf[n] = 0;
    write_bytes(path, buf, n + 1);
    EXPECT_FAIL_AT(d, path, "trailing bytes");
    write_bytes(path, buf, n);
    struct st_model *m = NULL;
    char err[512];
    CHECK(st_open(d, &m, err, sizeof(err)) == 0);
    st_close(m);
}

/* Random byte flips in the header and data: whatever happens, no crash,
 * and a failure always names the file. ASan/UBSan watch the reads. */
static void test_flips(void)
{
    uint8_t data[32], buf[512], mut[512];
    valid_data(data);
    size_t n = build_st(buf, strlen(VALID_HDR), VALID_HDR, data, sizeof(data));
    const char *d = case_dir();
    char path[256];
    snprintf(path, sizeof(path), "%s/model.safetensors", d);
    uint32_t rng = 12345;
    int ok = 1, opened = 0;
    for (int it = 0; it < 3000; it++) {
        memcpy(mut, buf, n);
        int flips = 1 + it % 3;
        for (int f = 0; f < flips; f++) {
            rng = rng * 1664525u + 1013904223u;
            size_t at = (rng >> 8) % n;
            rng = rng * 1664525u + 1013904223u;
            mut[at] = (uint8_t)(rng >> 24);
        }
        write_bytes(path, mut, n);
        char err[512] = "";
        struct st_model *m = NULL;
        if (st_open(d, &m, err, sizeof(err)) == 0) {
            opened++;
            for (size_t i = 0; i < st_n_tensors(m); i++) {
                const struct tensor *t = st_tensor(m, i);
                if (st_find(m, t->name) != t)
                    ok = 0;
            }
            st_close(m);
        } else if (strncmp(err, path, strlen(path)) != 0) {
            ok = 0;
        }
    }
    CHECK(ok);
    CHECK(opened > 0); /* flips in the data bytes keep the file valid */
}

int main(void)
{
    snprintf(root, sizeof(root), "/tmp/test_safetensors_XXXXXX");
    if (!mkdtemp(root)) {
        perror("mkdtemp");
        return 2;
    }
    test_single();
    test_sharded();
    test_sharded_errors();
    test_directory();
    test_header_rules();
    test_truncation();
    test_flips();
    rm_dir(root);
    printf("test_safetensors: %d checks, %d failed\n", n_checks, n_failed);
    return n_failed ? 1 : 0;
}
