/* loader_gguf.c: a GGUF v2/v3 file, mmapped read-only and validated.
 *
 * Reads the header (metadata key/values and tensor infos) through a bounds
 * checked cursor, so no count, length or offset in the file is trusted
 * before it is checked against the bytes that are really there; then checks
 * tensor geometry, placement and the tokenizer metadata. Runs on the
 * loading thread; the handle is read-only afterwards.
 */
#include "engine/gguf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/file_map.h"
#include "engine/load_error.h"
#include "engine/name_index.h"

#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_KEY 65535      /* the specification's limit on key names */
#define GGUF_MAX_TENSOR_NAME 1024 /* the spec says 64; allow more, bounded */
/* Smallest possible encodings, used to cap the counts before reserving:
 * a key/value is a length (8), a name (>= 1), a type (4) and a value (>= 1);
 * a tensor info is a length (8), a name (>= 1), n_dims (4), one dim (8), a
 * type (4) and an offset (8). */
#define GGUF_MIN_KV_BYTES 14
#define GGUF_MIN_TENSOR_INFO_BYTES 33

struct gguf_kv {
    char *key;            /* NUL-terminated copy */
    enum gguf_type type;
    enum gguf_type elem;  /* arrays: element type */
    uint64_t n;           /* arrays: element count */
    const uint8_t *val;   /* into the map: the scalar, or the first element */
    char *str;            /* strings: NUL-terminated copy */
    uint64_t str_len;
    uint64_t *offs;       /* string arrays: offset of element i from val */
};

struct gguf_file {
    struct fm_file fm; /* the whole file, read-only */
    uint32_t version;
    uint64_t alignment;
    uint64_t data_off;   /* start of the data section */
    struct gguf_kv *kv;  /* file order */
    size_t n_kv, cap_kv;
    struct ni_entry *kv_by_name; /* sorted by key */
    struct tensor *tensors; /* file order; names malloc'd */
    uint64_t *t_off;        /* offset of each tensor in the data section */
    size_t n_tensors, cap_tensors;
    struct ni_entry *t_by_name; /* sorted by tensor name */
};

/* ---------------------------------------------------------------- tables */

static const struct {
    const char *name;
    unsigned size; /* bytes of a scalar; 0 for string and array */
} gguf_types[] = {
    [GGUF_UINT8] = {"uint8", 1},     [GGUF_INT8] = {"int8", 1},
    [GGUF_UINT16] = {"uint16", 2},   [GGUF_INT16] = {"int16", 2},
    [GGUF_UINT32] = {"uint32", 4},   [GGUF_INT32] = {"int32", 4},
    [GGUF_FLOAT32] = {"float32", 4}, [GGUF_BOOL] = {"bool", 1},
    [GGUF_STRING] = {"string", 0},   [GGUF_ARRAY] = {"array", 0},
    [GGUF_UINT64] = {"uint64", 8},   [GGUF_INT64] = {"int64", 8},
    [GGUF_FLOAT64] = {"float64", 8},
};
#define GGUF_N_TYPES (sizeof(gguf_types) / sizeof(gguf_types[0]))

/* ggml tensor types inferd runs, by their number in the file. */
static const struct {
    uint32_t ggml;
    enum k_dtype dtype;
} gguf_dtypes[] = {
    {0, K_F32}, {1, K_F16}, {8, K_Q8_0}, {12, K_Q4_K}, {14, K_Q6_K}, {30, K_BF16},
};

/* Names of the other ggml types, only so that refusals say what they saw. */
static const char *gguf_ggml_name(uint32_t t)
{
    static const char *const names[] = {
        "f32", "f16", "q4_0", "q4_1", NULL, NULL, "q5_0", "q5_1", "q8_0", "q8_1",
        "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_k", "iq2_xxs", "iq2_xs", "iq3_xxs",
        "iq1_s", "iq4_nl", "iq3_s", "iq2_s", "iq4_xs", "i8", "i16", "i32", "i64", "f64",
        "iq1_m", "bf16", NULL, NULL, NULL, "tq1_0", "tq2_0", NULL, NULL, NULL, "mxfp4",
    };
    return t < sizeof(names) / sizeof(names[0]) && names[t] ? names[t] : "unknown";
}

static const char *gguf_type_name(uint32_t t)
{
    return t < GGUF_N_TYPES ? gguf_types[t].name : "invalid";
}

/* ---------------------------------------------------------------- cursor */

/* Every read of header bytes goes through this cursor, which refuses to
 * move past the end of the mapping. */
struct gguf_rd {
    const uint8_t *p;
    size_t size, pos;
    const char *path;
    char *err;
    size_t errlen;
};

static uint16_t gguf_le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t gguf_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t gguf_le64(const uint8_t *p)
{
    return (uint64_t)gguf_le32(p) | (uint64_t)gguf_le32(p + 4) << 32;
}

static size_t rd_left(const struct gguf_rd *r)
{
    return r->size - r->pos;
}

static int rd_need(struct gguf_rd *r, uint64_t n, const char *what)
{
    if (n > rd_left(r))
        return le_err(r->err, r->errlen, r->path,
                      "truncated: %s at offset %zu needs %llu bytes, %zu left", what, r->pos,
                      (unsigned long long)n, rd_left(r));
    return 0;
}

static int rd_u32(struct gguf_rd *r, uint32_t *out, const char *what)
{
    if (rd_need(r, 4, what))
        return -1;
    *out = gguf_le32(r->p + r->pos);
    r->pos += 4;
    return 0;
}

static int rd_u64(struct gguf_rd *r, uint64_t *out, const char *what)
{
    if (rd_need(r, 8, what))
        return -1;
    *out = gguf_le64(r->p + r->pos);
    r->pos += 8;
    return 0;
}

/* A length-prefixed string; the length is checked against the bytes left. */
static int rd_str(struct gguf_rd *r, const uint8_t **s, uint64_t *len, const char *what)
{
    uint64_t n;
    if (rd_u64(r, &n, what))
        return -1;
    if (n > rd_left(r))
        return le_err(r->err, r->errlen, r->path,
                      "%s at offset %zu: string length %llu exceeds the %zu bytes left", what,
                      r->pos - 8, (unsigned long long)n, rd_left(r));
    *s = r->p + r->pos;
    *len = n;
    r->pos += (size_t)n;
    return 0;
}

/* ------------------------------------------------------------- metadata */

static int gguf_read_value(struct gguf_rd *r, struct gguf_kv *kv, const char *kn)
{
    char what[LE_SHOWN + 64];
    snprintf(what, sizeof(what), "key '%s' value", kn);
    if (kv->type == GGUF_STRING) {
        const uint8_t *s;
        if (rd_str(r, &s, &kv->str_len, what))
            return -1;
        kv->str = malloc((size_t)kv->str_len + 1);
        if (!kv->str)
            return le_err(r->err, r->errlen, r->path, "out of memory");
        memcpy(kv->str, s, (size_t)kv->str_len);
        kv->str[kv->str_len] = '\0';
        return 0;
    }
    if (kv->type != GGUF_ARRAY) {
        unsigned sz = gguf_types[kv->type].size;
        if (rd_need(r, sz, what))
            return -1;
        kv->val = r->p + r->pos;
        if (kv->type == GGUF_BOOL && kv->val[0] > 1)
            return le_err(r->err, r->errlen, r->path, "key '%s': bool value %u is not 0 or 1", kn,
                          kv->val[0]);
        r->pos += sz;
        return 0;
    }

    uint32_t et;
    if (rd_u32(r, &et, what))
        return -1;
    if (et >= GGUF_N_TYPES)
        return le_err(r->err, r->errlen, r->path, "key '%s': array element type %u out of range",
                      kn, et);
    if (et == GGUF_ARRAY)
        return le_err(r->err, r->errlen, r->path,
                      "key '%s': nested arrays (arrays of arrays) are not supported", kn);
    kv->elem = (enum gguf_type)et;
    if (rd_u64(r, &kv->n, what))
        return -1;
    kv->val = r->p + r->pos;
    if (et != GGUF_STRING) {
        uint64_t bytes;
        if (__builtin_mul_overflow(kv->n, (uint64_t)gguf_types[et].size, &bytes) ||
            bytes > rd_left(r))
            return le_err(r->err, r->errlen, r->path,
                          "key '%s': array of %llu %s runs past the end of the file (%zu bytes left)",
                          kn, (unsigned long long)kv->n, gguf_types[et].name, rd_left(r));
        if (et == GGUF_BOOL)
            for (uint64_t i = 0; i < kv->n; i++)
                if (kv->val[i] > 1)
                    return le_err(r->err, r->errlen, r->path,
                                  "key '%s': bool element %llu is %u, not 0 or 1", kn,
                                  (unsigned long long)i, kv->val[i]);
        r->pos += (size_t)bytes;
        return 0;
    }
    /* Strings: each needs at least its 8-byte length, which bounds the
     * offset table by the file size before it is allocated. */
    if (kv->n > rd_left(r) / 8)
        return le_err(r->err, r->errlen, r->path,
                      "key '%s': array of %llu strings cannot fit in the %zu bytes left", kn,
                      (unsigned long long)kv->n, rd_left(r));
    kv->offs = malloc((kv->n ? (size_t)kv->n : 1) * sizeof(*kv->offs));
    if (!kv->offs)
        return le_err(r->err, r->errlen, r->path, "out of memory");
    size_t start = r->pos;
    for (uint64_t i = 0; i < kv->n; i++) {
        snprintf(what, sizeof(what), "key '%s' string %llu", kn, (unsigned long long)i);
        kv->offs[i] = r->pos - start;
        const uint8_t *s;
        uint64_t len;
        if (rd_str(r, &s, &len, what))
            return -1;
    }
    return 0;
}

static int gguf_read_kvs(struct gguf_file *f, struct gguf_rd *r, uint64_t n_kv)
{
    char nb[LE_SHOWN], what[64];
    for (uint64_t i = 0; i < n_kv; i++) {
        if (f->n_kv == f->cap_kv) {
            /* grow as entries really parse, not by the count in the file */
            size_t nc = f->cap_kv ? f->cap_kv * 2 : 32;
            struct gguf_kv *nk = realloc(f->kv, nc * sizeof(*nk));
            if (!nk)
                return le_err(r->err, r->errlen, r->path, "out of memory");
            f->kv = nk;
            f->cap_kv = nc;
        }
        struct gguf_kv *kv = &f->kv[f->n_kv];
        memset(kv, 0, sizeof(*kv));
        const uint8_t *name;
        uint64_t len;
        snprintf(what, sizeof(what), "key #%llu name", (unsigned long long)i);
        if (rd_str(r, &name, &len, what))
            return -1;
        if (len == 0)
            return le_err(r->err, r->errlen, r->path, "key #%llu has an empty name",
                          (unsigned long long)i);
        if (len > GGUF_MAX_KEY)
            return le_err(r->err, r->errlen, r->path, "key #%llu: name is %llu bytes, over %d",
                          (unsigned long long)i, (unsigned long long)len, GGUF_MAX_KEY);
        const char *kn = le_show(name, (size_t)len, nb, sizeof(nb));
        if (memchr(name, '\0', (size_t)len))
            return le_err(r->err, r->errlen, r->path, "key '%s': name contains a NUL byte", kn);
        kv->key = malloc((size_t)len + 1);
        if (!kv->key)
            return le_err(r->err, r->errlen, r->path, "out of memory");
        memcpy(kv->key, name, (size_t)len);
        kv->key[len] = '\0';
        f->n_kv++; /* from here gguf_close frees what kv holds */
        uint32_t type;
        snprintf(what, sizeof(what), "key value type");
        if (rd_u32(r, &type, what))
            return -1;
        if (type >= GGUF_N_TYPES)
            return le_err(r->err, r->errlen, r->path, "key '%s': value type %u out of range", kn,
                          type);
        kv->type = (enum gguf_type)type;
        if (gguf_read_value(r, kv, kn))
            return -1;
    }

    f->kv_by_name = malloc((f->n_kv ? f->n_kv : 1) * sizeof(*f->kv_by_name));
    if (!f->kv_by_name)
        return le_err(r->err, r->errlen, r->path, "out of memory");
    for (size_t i = 0; i < f->n_kv; i++)
        f->kv_by_name[i] = (struct ni_entry){f->kv[i].key, i};
    size_t dup = ni_sort(f->kv_by_name, f->n_kv);
    if (dup) {
        const char *kn = f->kv_by_name[dup].name;
        return le_err(r->err, r->errlen, r->path, "duplicate key '%s'",
                      le_show(kn, strlen(kn), nb, sizeof(nb)));
    }
    return 0;
}

/* ------------------------------------------------------ value conversion */

/* Integer-typed (or bool) value at p as int64; -1 when not representable. */
static int gguf_val_i64(enum gguf_type t, const uint8_t *p, int64_t *out)
{
    switch (t) {
    case GGUF_UINT8: *out = p[0]; return 0;
    case GGUF_INT8: *out = (int8_t)p[0]; return 0;
    case GGUF_BOOL: *out = p[0] != 0; return 0;
    case GGUF_UINT16: *out = gguf_le16(p); return 0;
    case GGUF_INT16: *out = (int16_t)gguf_le16(p); return 0;
    case GGUF_UINT32: *out = gguf_le32(p); return 0;
    case GGUF_INT32: *out = (int32_t)gguf_le32(p); return 0;
    case GGUF_INT64: *out = (int64_t)gguf_le64(p); return 0;
    case GGUF_UINT64: {
        uint64_t v = gguf_le64(p);
        if (v > (uint64_t)INT64_MAX)
            return -1;
        *out = (int64_t)v;
        return 0;
    }
    default:
        return -1;
    }
}

/* Numeric value at p as double; integers only when exactly representable. */
static int gguf_val_f64(enum gguf_type t, const uint8_t *p, double *out)
{
    if (t == GGUF_FLOAT32) {
        uint32_t u = gguf_le32(p);
        float v;
        memcpy(&v, &u, 4);
        *out = v;
        return 0;
    }
    if (t == GGUF_FLOAT64) {
        uint64_t u = gguf_le64(p);
        memcpy(out, &u, 8);
        return 0;
    }
    if (t == GGUF_BOOL)
        return -1;
    if (t == GGUF_UINT64) {
        uint64_t v = gguf_le64(p);
        if (v > (1ull << 53))
            return -1;
        *out = (double)v;
        return 0;
    }
    int64_t v;
    if (gguf_val_i64(t, p, &v) || v > (1ll << 53) || v < -(1ll << 53))
        return -1;
    *out = (double)v;
    return 0;
}

/* ---------------------------------------------------------------- tensors */

static int gguf_read_tensor_infos(struct gguf_file *f, struct gguf_rd *r, uint64_t n_t)
{
    char nb[LE_SHOWN], what[LE_SHOWN + 64];
    for (uint64_t i = 0; i < n_t; i++) {
        if (f->n_tensors == f->cap_tensors) {
            size_t nc = f->cap_tensors ? f->cap_tensors * 2 : 64;
            struct tensor *nt = realloc(f->tensors, nc * sizeof(*nt));
            if (!nt)
                return le_err(r->err, r->errlen, r->path, "out of memory");
            f->tensors = nt;
            uint64_t *no = realloc(f->t_off, nc * sizeof(*no));
            if (!no)
                return le_err(r->err, r->errlen, r->path, "out of memory");
            f->t_off = no;
            f->cap_tensors = nc;
        }
        struct tensor *t = &f->tensors[f->n_tensors];
        memset(t, 0, sizeof(*t));
        const uint8_t *name;
        uint64_t len;
        snprintf(what, sizeof(what), "tensor #%llu name", (unsigned long long)i);
        if (rd_str(r, &name, &len, what))
            return -1;
        if (len == 0)
            return le_err(r->err, r->errlen, r->path, "tensor #%llu has an empty name",
                          (unsigned long long)i);
        if (len > GGUF_MAX_TENSOR_NAME)
            return le_err(r->err, r->errlen, r->path, "tensor #%llu: name is %llu bytes, over %d",
                          (unsigned long long)i, (unsigned long long)len, GGUF_MAX_TENSOR_NAME);
        const char *tn = le_show(name, (size_t)len, nb, sizeof(nb));
        if (memchr(name, '\0', (size_t)len))
            return le_err(r->err, r->errlen, r->path, "tensor '%s': name contains a NUL byte", tn);
        char *copy = malloc((size_t)len + 1);
        if (!copy)
            return le_err(r->err, r->errlen, r->path, "out of memory");
        memcpy(copy, name, (size_t)len);
        copy[len] = '\0';
        t->name = copy;
        f->n_tensors++; /* from here gguf_close frees the name */

        snprintf(what, sizeof(what), "tensor '%s' info", tn);
        uint32_t nd;
        if (rd_u32(r, &nd, what))
            return -1;
        if (nd < 1 || nd > TENSOR_MAX_DIMS)
            return le_err(r->err, r->errlen, r->path, "tensor '%s': n_dims %u, expected 1 to %d",
                          tn, nd, TENSOR_MAX_DIMS);
        t->n_dims = (int)nd;
        for (int d = 0; d < TENSOR_MAX_DIMS; d++)
            t->ne[d] = 1;
        for (uint32_t d = 0; d < nd; d++) {
            uint64_t ne;
            if (rd_u64(r, &ne, what))
                return -1;
            if (ne == 0 || ne > (uint64_t)INT64_MAX)
                return le_err(r->err, r->errlen, r->path,
                              "tensor '%s': ne[%u] = %llu, expected 1 to 2^63-1", tn, d,
                              (unsigned long long)ne);
            t->ne[d] = (int64_t)ne;
        }
        uint32_t type;
        if (rd_u32(r, &type, what))
            return -1;
        int known = 0;
        for (size_t k = 0; k < sizeof(gguf_dtypes) / sizeof(gguf_dtypes[0]); k++) {
            if (gguf_dtypes[k].ggml == type) {
                t->dtype = gguf_dtypes[k].dtype;
                known = 1;
            }
        }
        if (!known)
            return le_err(r->err, r->errlen, r->path,
                          "tensor '%s': type %u (%s) is not supported (f32, f16, bf16, q8_0, q4_k, q6_k)",
                          tn, type, gguf_ggml_name(type));
        if (rd_u64(r, &f->t_off[f->n_tensors - 1], what))
            return -1;

        /* size: rows of whole blocks, times the other dims, in 64 bits */
        int64_t blk = k_dtype_block(t->dtype);
        if (t->ne[0] % blk)
            return le_err(r->err, r->errlen, r->path,
                          "tensor '%s': ne[0] = %lld is not a multiple of the %s block size %lld",
                          tn, (long long)t->ne[0], k_dtype_name(t->dtype), (long long)blk);
        int64_t row = k_row_bytes(t->dtype, t->ne[0]);
        uint64_t size = (uint64_t)row, elems = (uint64_t)t->ne[0];
        int over = row < 0;
        for (int d = 1; d < TENSOR_MAX_DIMS; d++) {
            over |= __builtin_mul_overflow(size, (uint64_t)t->ne[d], &size);
            over |= __builtin_mul_overflow(elems, (uint64_t)t->ne[d], &elems);
        }
        if (over || elems > (uint64_t)INT64_MAX)
            return le_err(r->err, r->errlen, r->path, "tensor '%s': size overflows 64 bits", tn);
        t->nbytes = size;
    }
    return 0;
}

struct gguf_span {
    uint64_t off;
    size_t idx;
};

static int gguf_span_cmp(const void *a, const void *b)
{
    const struct gguf_span *x = a, *y = b;
    if (x->off != y->off)
        return x->off < y->off ? -1 : 1;
    return (x->idx > y->idx) - (x->idx < y->idx);
}

/* Offsets aligned, inside the file, not overlapping; names unique. */
static int gguf_place_tensors(struct gguf_file *f, struct gguf_rd *r)
{
    char nb[LE_SHOWN], nb2[LE_SHOWN];
    struct gguf_span *by_off = NULL;
    int rc = -1;
    uint64_t avail = f->fm.size >= f->data_off ? f->fm.size - f->data_off : 0;
    for (size_t i = 0; i < f->n_tensors; i++) {
        struct tensor *t = &f->tensors[i];
        const char *tn = le_show(t->name, strlen(t->name), nb, sizeof(nb));
        uint64_t off = f->t_off[i];
        if (off % f->alignment)
            return le_err(r->err, r->errlen, r->path,
                          "tensor '%s': offset %llu is not a multiple of the alignment %llu", tn,
                          (unsigned long long)off, (unsigned long long)f->alignment);
        if (f->data_off > f->fm.size || off > avail || t->nbytes > avail - off)
            return le_err(r->err, r->errlen, r->path,
                          "tensor '%s': offset %llu + size %llu beyond end of file (%zu bytes, "
                          "data section at %llu)",
                          tn, (unsigned long long)off, (unsigned long long)t->nbytes, f->fm.size,
                          (unsigned long long)f->data_off);
        t->data = f->fm.data + f->data_off + off;
    }

    f->t_by_name = malloc((f->n_tensors ? f->n_tensors : 1) * sizeof(*f->t_by_name));
    by_off = malloc((f->n_tensors ? f->n_tensors : 1) * sizeof(*by_off));
    if (!f->t_by_name || !by_off) {
        le_err(r->err, r->errlen, r->path, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < f->n_tensors; i++)
        f->t_by_name[i] = (struct ni_entry){f->tensors[i].name, i};
    size_t dup = ni_sort(f->t_by_name, f->n_tensors);
    if (dup) {
        const char *n = f->t_by_name[dup].name;
        le_err(r->err, r->errlen, r->path, "duplicate tensor name '%s'",
               le_show(n, strlen(n), nb, sizeof(nb)));
        goto done;
    }

    /* Sorted by offset, each tensor must end at or before the next one
     * starts; two tensors sharing bytes would alias each other's weights. */
    for (size_t i = 0; i < f->n_tensors; i++)
        by_off[i] = (struct gguf_span){f->t_off[i], i};
    qsort(by_off, f->n_tensors, sizeof(*by_off), gguf_span_cmp);
    for (size_t i = 1; i < f->n_tensors; i++) {
        size_t a = by_off[i - 1].idx, b = by_off[i].idx;
        if (f->t_off[a] + f->tensors[a].nbytes > f->t_off[b]) {
            const char *an = f->tensors[a].name, *bn = f->tensors[b].name;
            le_err(r->err, r->errlen, r->path,
                   "tensor '%s' (offset %llu) overlaps tensor '%s' (offset %llu, size %llu)",
                   le_show(bn, strlen(bn), nb, sizeof(nb)), (unsigned long long)f->t_off[b],
                   le_show(an, strlen(an), nb2, sizeof(nb2)), (unsigned long long)f->t_off[a],
                   (unsigned long long)f->tensors[a].nbytes);
            goto done;
        }
    }
    rc = 0;

done:
    free(by_off);
    return rc;
}

/* ------------------------------------------------------------- tokenizer */

static const struct gguf_kv *gguf_kv_find(const struct gguf_file *f, const char *key)
{
    int64_t k = gguf_find_key(f, key);
    return k < 0 ? NULL : &f->kv[k];
}

/* The vocabulary arrays agree in length and element type, and the special
 * token ids point into the vocabulary, so the tokenizer can index by id. */
static int gguf_check_tokenizer(const struct gguf_file *f, struct gguf_rd *r)
{
    static const struct {
        const char *key;
        enum gguf_type elem;
    } arrays[] = {
        {"tokenizer.ggml.tokens", GGUF_STRING},
        {"tokenizer.ggml.scores", GGUF_FLOAT32},
        {"tokenizer.ggml.token_type", GGUF_INT32},
    };
    static const char *const ids[] = {
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
    };
    const struct gguf_kv *first = NULL;
    for (size_t i = 0; i < sizeof(arrays) / sizeof(arrays[0]); i++) {
        const struct gguf_kv *kv = gguf_kv_find(f, arrays[i].key);
        if (!kv)
            continue;
        if (kv->type != GGUF_ARRAY || kv->elem != arrays[i].elem)
            return le_err(r->err, r->errlen, r->path, "%s is %s%s%s, expected an array of %s",
                          arrays[i].key, kv->type == GGUF_ARRAY ? "an array of " : "a ",
                          gguf_type_name(kv->type == GGUF_ARRAY ? kv->elem : kv->type),
                          kv->type == GGUF_ARRAY ? "" : " value", gguf_type_name(arrays[i].elem));
        if (first && kv->n != first->n)
            return le_err(r->err, r->errlen, r->path, "%s has %llu entries but %s has %llu",
                          arrays[i].key, (unsigned long long)kv->n, first->key,
                          (unsigned long long)first->n);
        if (!first)
            first = kv;
    }
    const struct gguf_kv *tokens = gguf_kv_find(f, "tokenizer.ggml.tokens");
    for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
        const struct gguf_kv *kv = gguf_kv_find(f, ids[i]);
        if (!kv)
            continue;
        int64_t id;
        if (kv->type == GGUF_ARRAY || kv->type == GGUF_STRING || kv->type == GGUF_BOOL ||
            gguf_val_i64(kv->type, kv->val, &id))
            return le_err(r->err, r->errlen, r->path, "%s is a %s, expected an integer", ids[i],
                          gguf_type_name(kv->type));
        if (!tokens)
            return le_err(r->err, r->errlen, r->path,
                          "%s is set but there is no tokenizer.ggml.tokens", ids[i]);
        if (id < 0 || (uint64_t)id >= tokens->n)
            return le_err(r->err, r->errlen, r->path,
                          "%s = %lld is outside the vocabulary (%llu tokens)", ids[i],
                          (long long)id, (unsigned long long)tokens->n);
    }
    return 0;
}

/* ------------------------------------------------------------------ open */

int gguf_open(const char *path, struct gguf_file **out, char *err, size_t errlen)
{
    struct gguf_file *f = NULL;
    if (err && errlen)
        err[0] = '\0';
    *out = NULL;

    f = calloc(1, sizeof(*f));
    if (!f) {
        le_err(err, errlen, path, "out of memory");
        goto fail;
    }
    if (fm_open(path, &f->fm, err, errlen))
        goto fail;
    if (f->fm.size < 24) {
        le_err(err, errlen, path, "file is %zu bytes, too small for a GGUF header (24 bytes)",
               f->fm.size);
        goto fail;
    }

    struct gguf_rd r = {f->fm.data, f->fm.size, 0, path, err, errlen};
    if (memcmp(f->fm.data, "GGUF", 4) != 0) {
        char mb[LE_SHOWN];
        le_err(err, errlen, path, "not a GGUF file (magic '%s')",
               le_show(f->fm.data, 4, mb, sizeof(mb)));
        goto fail;
    }
    r.pos = 4;
    uint32_t version;
    uint64_t n_t, n_kv;
    if (rd_u32(&r, &version, "version"))
        goto fail;
    if (version == 1) {
        le_err(err, errlen, path, "GGUF version 1 is not supported (only 2 and 3)");
        goto fail;
    }
    if (version == 0x02000000u || version == 0x03000000u) {
        le_err(err, errlen, path, "big-endian GGUF is not supported");
        goto fail;
    }
    if (version != 2 && version != 3) {
        le_err(err, errlen, path, "unsupported GGUF version %u (only 2 and 3)", version);
        goto fail;
    }
    f->version = version;
    if (rd_u64(&r, &n_t, "tensor count") || rd_u64(&r, &n_kv, "key/value count"))
        goto fail;
    /* Counts against the bytes that could hold them, before anything is
     * reserved: a 1 KiB file cannot claim 2^60 tensors. */
    uint64_t left = rd_left(&r);
    if (n_kv > left / GGUF_MIN_KV_BYTES) {
        le_err(err, errlen, path, "key/value count %llu cannot fit in the %llu bytes left",
               (unsigned long long)n_kv, (unsigned long long)left);
        goto fail;
    }
    if (n_t > left / GGUF_MIN_TENSOR_INFO_BYTES ||
        n_kv * GGUF_MIN_KV_BYTES + n_t * GGUF_MIN_TENSOR_INFO_BYTES > left) {
        le_err(err, errlen, path,
               "tensor count %llu (with %llu keys) cannot fit in the %llu bytes left",
               (unsigned long long)n_t, (unsigned long long)n_kv, (unsigned long long)left);
        goto fail;
    }
    if (gguf_read_kvs(f, &r, n_kv))
        goto fail;

    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    const struct gguf_kv *al = gguf_kv_find(f, "general.alignment");
    if (al) {
        if (al->type != GGUF_UINT32) {
            le_err(err, errlen, path, "general.alignment is a %s, expected uint32",
                   gguf_type_name(al->type));
            goto fail;
        }
        uint32_t a = gguf_le32(al->val);
        if (a == 0 || (a & (a - 1))) {
            le_err(err, errlen, path, "general.alignment %u is not a nonzero power of two", a);
            goto fail;
        }
        f->alignment = a;
    }
    if (gguf_read_tensor_infos(f, &r, n_t))
        goto fail;
    /* The data section starts at the first aligned offset after the header
     * (pos <= size < 2^63, alignment <= 2^31: no overflow). */
    f->data_off = ((uint64_t)r.pos + f->alignment - 1) / f->alignment * f->alignment;
    if (gguf_place_tensors(f, &r) || gguf_check_tokenizer(f, &r))
        goto fail;
    *out = f;
    return 0;

fail:
    gguf_close(f);
    return -1;
}

void gguf_close(struct gguf_file *f)
{
    if (!f)
        return;
    for (size_t i = 0; i < f->n_kv; i++) {
        free(f->kv[i].key);
        free(f->kv[i].str);
        free(f->kv[i].offs);
    }
    for (size_t i = 0; i < f->n_tensors; i++)
        free((char *)f->tensors[i].name);
    free(f->kv);
    free(f->kv_by_name);
    free(f->tensors);
    free(f->t_off);
    free(f->t_by_name);
    fm_close(&f->fm);
    free(f);
}

/* ------------------------------------------------------------- accessors */

uint32_t gguf_version(const struct gguf_file *f)
{
    return f ? f->version : 0;
}

unsigned long long gguf_file_bytes(const struct gguf_file *f)
{
    return f ? f->fm.size : 0;
}

int64_t gguf_find_key(const struct gguf_file *f, const char *key)
{
    if (!f || !key || !f->kv_by_name)
        return -1;
    const struct ni_entry *e = ni_find(f->kv_by_name, f->n_kv, key);
    return e ? (int64_t)e->idx : -1;
}

size_t gguf_n_keys(const struct gguf_file *f)
{
    return f ? f->n_kv : 0;
}

const char *gguf_key_name(const struct gguf_file *f, int64_t k)
{
    if (!f || k < 0 || (uint64_t)k >= f->n_kv)
        return NULL;
    return f->kv[k].key;
}

enum gguf_type gguf_key_type(const struct gguf_file *f, int64_t k)
{
    if (!f || k < 0 || (uint64_t)k >= f->n_kv)
        return (enum gguf_type)-1; /* no such key: outside the enum on purpose */
    return f->kv[k].type;
}

int gguf_get_i64(const struct gguf_file *f, const char *key, int64_t *out)
{
    const struct gguf_kv *kv = gguf_kv_find(f, key);
    if (!kv || kv->type == GGUF_STRING || kv->type == GGUF_ARRAY)
        return -1;
    return gguf_val_i64(kv->type, kv->val, out);
}

int gguf_get_f64(const struct gguf_file *f, const char *key, double *out)
{
    const struct gguf_kv *kv = gguf_kv_find(f, key);
    if (!kv || kv->type == GGUF_STRING || kv->type == GGUF_ARRAY)
        return -1;
    return gguf_val_f64(kv->type, kv->val, out);
}

int gguf_get_bool(const struct gguf_file *f, const char *key, int *out)
{
    const struct gguf_kv *kv = gguf_kv_find(f, key);
    if (!kv || kv->type != GGUF_BOOL)
        return -1;
    *out = kv->val[0] != 0;
    return 0;
}

const char *gguf_get_str(const struct gguf_file *f, const char *key, size_t *len)
{
    const struct gguf_kv *kv = gguf_kv_find(f, key);
    if (!kv || kv->type != GGUF_STRING)
        return NULL;
    if (len)
        *len = (size_t)kv->str_len;
    return kv->str;
}

int gguf_get_arr(const struct gguf_file *f, const char *key, enum gguf_type *elem_type,
                 uint64_t *n)
{
    const struct gguf_kv *kv = gguf_kv_find(f, key);
    if (!kv || kv->type != GGUF_ARRAY)
        return -1;
    if (elem_type)
        *elem_type = kv->elem;
    if (n)
        *n = kv->n;
    return 0;
}

/* Element i of a numeric array, or NULL. */
static const uint8_t *gguf_arr_elem(const struct gguf_file *f, const char *key, uint64_t i,
                                    enum gguf_type *t)
{
    const struct gguf_kv *kv = gguf_kv_find(f, key);
    if (!kv || kv->type != GGUF_ARRAY || kv->elem == GGUF_STRING || i >= kv->n)
        return NULL;
    *t = kv->elem;
    return kv->val + i * gguf_types[kv->elem].size;
}

int gguf_arr_f64(const struct gguf_file *f, const char *key, uint64_t i, double *out)
{
    enum gguf_type t;
    const uint8_t *p = gguf_arr_elem(f, key, i, &t);
    return p ? gguf_val_f64(t, p, out) : -1;
}

int gguf_arr_i64(const struct gguf_file *f, const char *key, uint64_t i, int64_t *out)
{
    enum gguf_type t;
    const uint8_t *p = gguf_arr_elem(f, key, i, &t);
    return p ? gguf_val_i64(t, p, out) : -1;
}

const char *gguf_arr_str(const struct gguf_file *f, const char *key, uint64_t i, size_t *len)
{
    const struct gguf_kv *kv = gguf_kv_find(f, key);
    if (!kv || kv->type != GGUF_ARRAY || kv->elem != GGUF_STRING || i >= kv->n)
        return NULL;
    const uint8_t *p = kv->val + kv->offs[i];
    if (len)
        *len = (size_t)gguf_le64(p);
    return (const char *)p + 8;
}

size_t gguf_n_tensors(const struct gguf_file *f)
{
    return f ? f->n_tensors : 0;
}

const struct tensor *gguf_tensor(const struct gguf_file *f, size_t i)
{
    return f && i < f->n_tensors ? &f->tensors[i] : NULL;
}

const struct tensor *gguf_find_tensor(const struct gguf_file *f, const char *name)
{
    if (!f || !name || !f->t_by_name)
        return NULL;
    const struct ni_entry *e = ni_find(f->t_by_name, f->n_tensors, name);
    return e ? &f->tensors[e->idx] : NULL;
}
