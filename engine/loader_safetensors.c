/* loader_safetensors.c: a Hugging Face model directory's weights, mmapped.
 *
 * Finds model.safetensors or the shards an index names, maps each file
 * read-only and checks its header (strict JSON, closed dtype set, shapes,
 * byte ranges that tile the data region exactly) before handing out any
 * tensor. Pickled checkpoints are never opened. Runs on the loading thread.
 */
#include "engine/safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/file_map.h"
#include "engine/json.h"
#include "engine/load_error.h"
#include "engine/name_index.h"

/* The format's own limit on the header; it also bounds what we parse. */
#define ST_MAX_HEADER (100ull << 20)
/* An index is a name -> file map; even 100k tensors fit well under this. */
#define ST_MAX_INDEX (64ull << 20)

struct st_shard {
    char *path;        /* dir/file, for messages */
    struct fm_file fm; /* the whole file, read-only */
};

struct st_model {
    struct st_shard *shards;
    size_t n_shards;
    struct tensor *tensors;  /* names malloc'd, owned here */
    size_t *tensor_shard;    /* shard index of each tensor */
    size_t n_tensors, cap_tensors;
    struct ni_entry *by_name; /* sorted by name, for st_find; idx into tensors */
    unsigned long long bytes;
};

/* --------------------------------------------------------------- files */

static char *st_join(const char *dir, const char *name)
{
    char *s;
    if (asprintf(&s, "%s/%s", dir, name) < 0)
        return NULL;
    return s;
}

static int st_is_file(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

static int st_has_suffix(const char *s, size_t len, const char *suf)
{
    size_t n = strlen(suf);
    return len >= n && memcmp(s + len - n, suf, n) == 0;
}

/* First file name in dir that looks like a pickled checkpoint or another
 * weights file we might mention, or 0 when none. Never opens it. */
static int st_scan_dir(const char *dir, const char *const *suffixes, char *out, size_t cap)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int found = 0;
    struct dirent *e;
    while (!found && (e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        for (size_t i = 0; suffixes[i]; i++) {
            if (st_has_suffix(e->d_name, len, suffixes[i])) {
                le_show(e->d_name, len, out, cap);
                found = 1;
                break;
            }
        }
    }
    closedir(d);
    return found;
}

/* --------------------------------------------------------------- header */

static const struct {
    const char *name;
    enum k_dtype dtype;
    int bytes;
} st_dtypes[] = {
    {"F32", K_F32, 4},
    {"F16", K_F16, 2},
    {"BF16", K_BF16, 2},
};

/* Real safetensors dtypes that inferd refuses, named so that the message
 * says "not supported" rather than "unknown". */
static const char *const st_other_dtypes[] = {
    "F64", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64", NULL,
};

struct st_range {
    uint64_t begin, end;
    size_t idx; /* into st_model.tensors */
};

static int st_range_cmp(const void *a, const void *b)
{
    const struct st_range *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return (x->idx > y->idx) - (x->idx < y->idx);
}

static int st_add_tensor(struct st_model *m, size_t shard, struct tensor *t)
{
    if (m->n_tensors == m->cap_tensors) {
        size_t nc = m->cap_tensors ? m->cap_tensors * 2 : 64;
        struct tensor *nt = realloc(m->tensors, nc * sizeof(*nt));
        if (!nt)
            return -1;
        m->tensors = nt;
        size_t *ns = realloc(m->tensor_shard, nc * sizeof(*ns));
        if (!ns)
            return -1;
        m->tensor_shard = ns;
        m->cap_tensors = nc;
    }
    m->tensor_shard[m->n_tensors] = shard;
    m->tensors[m->n_tensors++] = *t;
    return 0;
}

/* Checks one tensor entry of a header and fills t (name not yet set). */
static int st_check_entry(const char *path, const char *name, const struct json *e,
                          const uint8_t *data, uint64_t data_size, struct tensor *t,
                          uint64_t *begin_out, uint64_t *end_out, char *err, size_t errlen)
{
    char nb[LE_SHOWN], vb[LE_SHOWN];
    const char *tn = le_show(name, strlen(name), nb, sizeof(nb));
    if (json_type(e) != JSON_OBJECT)
        return le_err(err, errlen, path, "tensor '%s': entry is not an object", tn);
    static const char *const fields[] = {"dtype", "shape", "data_offsets"};
    for (size_t i = 0; i < json_len(e); i++) {
        const char *k = json_key_at(e, i);
        size_t kl = json_key_len(e, i);
        int known = 0;
        for (size_t f = 0; f < 3; f++)
            known |= kl == strlen(fields[f]) && memcmp(k, fields[f], kl) == 0;
        if (!known)
            return le_err(err, errlen, path, "tensor '%s': unexpected field '%s'", tn,
                          le_show(k, kl, vb, sizeof(vb)));
    }
    for (size_t f = 0; f < 3; f++)
        if (!json_get(e, fields[f]))
            return le_err(err, errlen, path, "tensor '%s': missing field '%s'", tn, fields[f]);

    /* dtype: a closed set */
    size_t dl;
    const char *ds = json_str(json_get(e, "dtype"), &dl);
    if (!ds)
        return le_err(err, errlen, path, "tensor '%s': dtype is not a string", tn);
    int esize = 0;
    for (size_t i = 0; i < sizeof(st_dtypes) / sizeof(st_dtypes[0]); i++) {
        if (dl == strlen(st_dtypes[i].name) && memcmp(ds, st_dtypes[i].name, dl) == 0) {
            t->dtype = st_dtypes[i].dtype;
            esize = st_dtypes[i].bytes;
        }
    }
    if (!esize) {
        const char *shown = le_show(ds, dl, vb, sizeof(vb));
        for (size_t i = 0; st_other_dtypes[i]; i++)
            if (dl == strlen(st_other_dtypes[i]) && memcmp(ds, st_other_dtypes[i], dl) == 0)
                return le_err(err, errlen, path,
                              "tensor '%s': dtype %s is not supported (only F32, F16, BF16)",
                              tn, shown);
        return le_err(err, errlen, path, "tensor '%s': unknown dtype '%s'", tn, shown);
    }

    /* shape: 0-4 non-negative integers, product without overflow */
    const struct json *shape = json_get(e, "shape");
    if (json_type(shape) != JSON_ARRAY)
        return le_err(err, errlen, path, "tensor '%s': shape is not an array", tn);
    size_t nd = json_len(shape);
    if (nd > TENSOR_MAX_DIMS)
        return le_err(err, errlen, path, "tensor '%s': shape has %zu dimensions, at most %d supported",
                      tn, nd, TENSOR_MAX_DIMS);
    uint64_t n_elems = 1;
    int overflow = 0;
    for (int i = 0; i < TENSOR_MAX_DIMS; i++)
        t->ne[i] = 1;
    for (size_t i = 0; i < nd; i++) {
        int64_t d;
        if (json_int64(json_at(shape, i), &d) || d < 0)
            return le_err(err, errlen, path, "tensor '%s': shape[%zu] is not a non-negative integer",
                          tn, i);
        t->ne[nd - 1 - i] = d; /* safetensors is outermost first; ggml order is innermost first */
        overflow |= __builtin_mul_overflow(n_elems, (uint64_t)d, &n_elems);
    }
    t->n_dims = nd ? (int)nd : 1;
    uint64_t nbytes;
    if (overflow || __builtin_mul_overflow(n_elems, (uint64_t)esize, &nbytes))
        return le_err(err, errlen, path, "tensor '%s': shape product overflows", tn);

    /* data_offsets: [begin, end] inside the data region, matching the shape */
    const struct json *off = json_get(e, "data_offsets");
    int64_t b, en;
    if (json_type(off) != JSON_ARRAY || json_len(off) != 2)
        return le_err(err, errlen, path, "tensor '%s': data_offsets is not an array of two integers", tn);
    if (json_int64(json_at(off, 0), &b) || b < 0 || json_int64(json_at(off, 1), &en) || en < 0)
        return le_err(err, errlen, path,
                      "tensor '%s': data_offsets entries must be non-negative integers", tn);
    if (b > en)
        return le_err(err, errlen, path, "tensor '%s': data_offsets begin %lld > end %lld", tn,
                      (long long)b, (long long)en);
    if ((uint64_t)en > data_size)
        return le_err(err, errlen, path,
                      "tensor '%s': data_offsets [%lld, %lld] beyond the data region (%llu bytes)",
                      tn, (long long)b, (long long)en, (unsigned long long)data_size);
    if ((uint64_t)(en - b) != nbytes)
        return le_err(err, errlen, path,
                      "tensor '%s': shape and dtype %s need %llu bytes but data_offsets span %llu",
                      tn, k_dtype_name(t->dtype), (unsigned long long)nbytes,
                      (unsigned long long)(en - b));
    t->data = data + b;
    t->nbytes = nbytes;
    *begin_out = (uint64_t)b;
    *end_out = (uint64_t)en;
    return 0;
}

/* Parses and checks the header of shard si and appends its tensors. */
static int st_load_header(struct st_model *m, size_t si, char *err, size_t errlen)
{
    struct st_shard *sh = &m->shards[si];
    const char *path = sh->path;
    const uint8_t *base = sh->fm.data;
    struct json *hdr = NULL;
    struct st_range *ranges = NULL;
    size_t first = m->n_tensors;
    char jerr[200], nb[LE_SHOWN], nb2[LE_SHOWN];

    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | base[i];
    if (n < 2) {
        le_err(err, errlen, path, "header length %llu is too small", (unsigned long long)n);
        goto fail;
    }
    if (n > ST_MAX_HEADER) {
        le_err(err, errlen, path, "header length %llu exceeds the %llu MiB limit",
               (unsigned long long)n, ST_MAX_HEADER >> 20);
        goto fail;
    }
    if (n > sh->fm.size - 8) {
        le_err(err, errlen, path, "header length %llu runs past the end of the file (%zu bytes)",
               (unsigned long long)n, sh->fm.size);
        goto fail;
    }
    hdr = json_parse((const char *)base + 8, (size_t)n, jerr, sizeof(jerr));
    if (!hdr) {
        le_err(err, errlen, path, "header JSON: %s", jerr);
        goto fail;
    }
    if (json_type(hdr) != JSON_OBJECT) {
        le_err(err, errlen, path, "header is not a JSON object");
        goto fail;
    }
    const uint8_t *data = base + 8 + n;
    uint64_t data_size = sh->fm.size - 8 - n;

    size_t n_members = json_len(hdr);
    ranges = malloc((n_members ? n_members : 1) * sizeof(*ranges));
    if (!ranges) {
        le_err(err, errlen, path, "out of memory");
        goto fail;
    }
    size_t n_ranges = 0;
    for (size_t i = 0; i < n_members; i++) {
        const char *key = json_key_at(hdr, i);
        size_t kl = json_key_len(hdr, i);
        const struct json *e = json_at(hdr, i);
        if (kl == 12 && memcmp(key, "__metadata__", 12) == 0) {
            if (json_type(e) != JSON_OBJECT) {
                le_err(err, errlen, path, "__metadata__ is not an object");
                goto fail;
            }
            for (size_t j = 0; j < json_len(e); j++) {
                if (json_type(json_at(e, j)) != JSON_STRING) {
                    le_err(err, errlen, path, "__metadata__ value '%s' is not a string",
                           le_show(json_key_at(e, j), json_key_len(e, j), nb, sizeof(nb)));
                    goto fail;
                }
            }
            continue;
        }
        if (kl == 0) {
            le_err(err, errlen, path, "empty tensor name");
            goto fail;
        }
        if (memchr(key, '\0', kl)) {
            le_err(err, errlen, path, "tensor name '%s' contains a NUL byte",
                   le_show(key, kl, nb, sizeof(nb)));
            goto fail;
        }
        struct tensor t = {0};
        uint64_t b = 0, en = 0;
        if (st_check_entry(path, key, e, data, data_size, &t, &b, &en, err, errlen))
            goto fail;
        char *name = strdup(key);
        if (!name) {
            le_err(err, errlen, path, "out of memory");
            goto fail;
        }
        t.name = name;
        if (st_add_tensor(m, si, &t)) {
            free(name);
            le_err(err, errlen, path, "out of memory");
            goto fail;
        }
        ranges[n_ranges++] = (struct st_range){b, en, m->n_tensors - 1};
    }

    /* The byte ranges, sorted, must tile [0, data_size) exactly: a gap
     * means bytes nobody accounts for, an overlap means two tensors alias. */
    qsort(ranges, n_ranges, sizeof(*ranges), st_range_cmp);
    uint64_t at = 0;
    for (size_t i = 0; i < n_ranges; i++) {
        const struct st_range *r = &ranges[i];
        const char *tn = m->tensors[r->idx].name;
        if (r->begin > at) {
            le_err(err, errlen, path, "gap in the data region: bytes [%llu, %llu) belong to no tensor (next is '%s')",
                   (unsigned long long)at, (unsigned long long)r->begin,
                   le_show(tn, strlen(tn), nb, sizeof(nb)));
            goto fail;
        }
        if (r->begin < at) {
            const char *pn = m->tensors[ranges[i - 1].idx].name;
            le_err(err, errlen, path, "tensor '%s' [%llu, %llu) overlaps tensor '%s' (ends at %llu)",
                   le_show(tn, strlen(tn), nb, sizeof(nb)), (unsigned long long)r->begin,
                   (unsigned long long)r->end, le_show(pn, strlen(pn), nb2, sizeof(nb2)),
                   (unsigned long long)at);
            goto fail;
        }
        at = r->end;
    }
    if (at != data_size) {
        le_err(err, errlen, path, "tensors cover %llu bytes but the data region has %llu (trailing bytes)",
               (unsigned long long)at, (unsigned long long)data_size);
        goto fail;
    }
    free(ranges);
    json_free(hdr);
    return 0;

fail:
    /* drop this shard's tensors so the model holds only checked ones */
    while (m->n_tensors > first)
        free((char *)m->tensors[--m->n_tensors].name);
    free(ranges);
    json_free(hdr);
    return -1;
}

static int st_add_shard(struct st_model *m, const char *dir, const char *file, char *err,
                        size_t errlen)
{
    struct st_shard *ns = realloc(m->shards, (m->n_shards + 1) * sizeof(*ns));
    if (!ns)
        return le_err(err, errlen, dir, "out of memory");
    m->shards = ns;
    struct st_shard *sh = &m->shards[m->n_shards];
    memset(sh, 0, sizeof(*sh));
    sh->path = st_join(dir, file);
    if (!sh->path)
        return le_err(err, errlen, dir, "out of memory");
    m->n_shards++; /* from here st_close owns path and map */
    if (fm_open(sh->path, &sh->fm, err, errlen))
        return -1;
    if (sh->fm.size < 8)
        return le_err(err, errlen, sh->path,
                      "file is %zu bytes, too small for the 8-byte header length", sh->fm.size);
    m->bytes += sh->fm.size;
    return st_load_header(m, m->n_shards - 1, err, errlen);
}

/* ---------------------------------------------------------------- index */

/* by_name: every tensor by name, for st_find and the cross-shard checks.
 * Returns ni_sort's answer (the index of a duplicate name, or 0), or -1
 * when out of memory. */
static int64_t st_build_by_name(struct st_model *m)
{
    free(m->by_name);
    m->by_name = malloc((m->n_tensors ? m->n_tensors : 1) * sizeof(*m->by_name));
    if (!m->by_name)
        return -1;
    for (size_t i = 0; i < m->n_tensors; i++)
        m->by_name[i] = (struct ni_entry){m->tensors[i].name, i};
    return (int64_t)ni_sort(m->by_name, m->n_tensors);
}

static int st_str_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* A shard name from an index must name a file in the directory itself, and
 * a safetensors one: never a path out of it, never a pickle. */
static int st_check_shard_name(const char *ipath, const char *tname, const char *s, size_t len,
                               char *err, size_t errlen)
{
    char nb[LE_SHOWN], sb[LE_SHOWN];
    const char *shown = le_show(s, len, sb, sizeof(sb));
    if (len == 0)
        return le_err(err, errlen, ipath, "weight_map: tensor '%s' has an empty file name",
                      le_show(tname, strlen(tname), nb, sizeof(nb)));
    if (memchr(s, '/', len) || memchr(s, '\\', len) || memchr(s, '\0', len) ||
        memmem(s, len, "..", 2))
        return le_err(err, errlen, ipath,
                      "weight_map: file name '%s' for tensor '%s' is not a plain file name in the model directory",
                      shown, le_show(tname, strlen(tname), nb, sizeof(nb)));
    if (!st_has_suffix(s, len, ".safetensors"))
        return le_err(err, errlen, ipath,
                      "weight_map: file '%s' for tensor '%s' is not a .safetensors file (pickled weights are not loaded; convert to safetensors)",
                      shown, le_show(tname, strlen(tname), nb, sizeof(nb)));
    return 0;
}

static int st_open_index(struct st_model *m, const char *dir, const char *ipath, char *err,
                         size_t errlen)
{
    int rc = -1;
    char *text = NULL;
    struct json *idx = NULL;
    struct ni_entry *wm = NULL; /* weight_map by tensor name; idx = member of map */
    const char **files = NULL;
    size_t n_files = 0;
    char jerr[200], nb[LE_SHOWN], sb[LE_SHOWN], sb2[LE_SHOWN];

    size_t len;
    text = fm_read(ipath, ST_MAX_INDEX, &len, err, errlen);
    if (!text)
        goto done;
    idx = json_parse(text, len, jerr, sizeof(jerr));
    if (!idx) {
        le_err(err, errlen, ipath, "JSON: %s", jerr);
        goto done;
    }
    const struct json *map = json_get(idx, "weight_map");
    if (json_type(idx) != JSON_OBJECT || json_type(map) != JSON_OBJECT) {
        le_err(err, errlen, ipath, "no \"weight_map\" object");
        goto done;
    }
    size_t n = json_len(map);
    if (n == 0) {
        le_err(err, errlen, ipath, "weight_map is empty");
        goto done;
    }
    wm = malloc(n * sizeof(*wm));
    files = malloc(n * sizeof(*files));
    if (!wm || !files) {
        le_err(err, errlen, ipath, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        const char *tname = json_key_at(map, i);
        size_t tl = json_key_len(map, i);
        if (tl == 0 || memchr(tname, '\0', tl)) {
            le_err(err, errlen, ipath, "weight_map: bad tensor name '%s'",
                   le_show(tname, tl, nb, sizeof(nb)));
            goto done;
        }
        size_t fl;
        const char *f = json_str(json_at(map, i), &fl);
        if (!f) {
            le_err(err, errlen, ipath, "weight_map: value for tensor '%s' is not a string",
                   le_show(tname, tl, nb, sizeof(nb)));
            goto done;
        }
        if (st_check_shard_name(ipath, tname, f, fl, err, errlen))
            goto done;
        wm[i] = (struct ni_entry){tname, i};
        files[n_files++] = f;
    }
    /* unique shard names, opened in name order (the -0000k-of- order) */
    qsort(files, n_files, sizeof(*files), st_str_cmp);
    size_t u = 0;
    for (size_t i = 0; i < n_files; i++)
        if (u == 0 || strcmp(files[u - 1], files[i]) != 0)
            files[u++] = files[i];
    n_files = u;
    for (size_t i = 0; i < n_files; i++)
        if (st_add_shard(m, dir, files[i], err, errlen))
            goto done;

    /* Tensors sorted by name: a name twice across shards is ambiguous. */
    int64_t dup = st_build_by_name(m);
    if (dup < 0) {
        le_err(err, errlen, ipath, "out of memory");
        goto done;
    }
    if (dup > 0) {
        const char *tn = m->by_name[dup].name;
        le_err(err, errlen, ipath, "tensor '%s' is in both %s and %s",
               le_show(tn, strlen(tn), nb, sizeof(nb)),
               m->shards[m->tensor_shard[m->by_name[dup - 1].idx]].path,
               m->shards[m->tensor_shard[m->by_name[dup].idx]].path);
        goto done;
    }
    /* Walk the index and the shards' contents together, both by name
     * (json_parse refused duplicate keys, so wm has none). */
    ni_sort(wm, n);
    size_t a = 0, b = 0;
    while (a < n || b < m->n_tensors) {
        int c = a == n ? 1 : b == m->n_tensors ? -1 : strcmp(wm[a].name, m->by_name[b].name);
        if (c < 0) {
            const char *f = json_str(json_at(map, wm[a].idx), &len);
            le_err(err, errlen, ipath, "weight_map lists tensor '%s' in %s, which does not contain it",
                   le_show(wm[a].name, strlen(wm[a].name), nb, sizeof(nb)),
                   le_show(f, len, sb, sizeof(sb)));
            goto done;
        }
        const struct st_shard *sh = &m->shards[m->tensor_shard[m->by_name[b].idx]];
        const char *tn = m->by_name[b].name;
        if (c > 0) {
            le_err(err, errlen, ipath, "tensor '%s' in %s is not listed in weight_map",
                   le_show(tn, strlen(tn), nb, sizeof(nb)), sh->path);
            goto done;
        }
        const char *f = json_str(json_at(map, wm[a].idx), &len);
        const char *base = strrchr(sh->path, '/') + 1;
        if (strlen(base) != len || memcmp(base, f, len) != 0) {
            le_err(err, errlen, ipath, "weight_map says tensor '%s' is in %s but it is in %s",
                   le_show(tn, strlen(tn), nb, sizeof(nb)), le_show(f, len, sb, sizeof(sb)),
                   le_show(base, strlen(base), sb2, sizeof(sb2)));
            goto done;
        }
        a++;
        b++;
    }
    rc = 0;

done:
    free(files);
    free(wm);
    json_free(idx);
    free(text);
    return rc;
}

/* ------------------------------------------------------------------ API */

int st_open(const char *dir, struct st_model **out, char *err, size_t errlen)
{
    char *single = NULL, *index = NULL;
    struct st_model *m = NULL;
    char found[LE_SHOWN];
    if (err && errlen)
        err[0] = '\0';
    *out = NULL;

    struct stat sb;
    if (stat(dir, &sb) != 0) {
        le_err(err, errlen, dir, "%s", strerror(errno));
        goto fail;
    }
    if (!S_ISDIR(sb.st_mode)) {
        le_err(err, errlen, dir, "not a directory");
        goto fail;
    }
    m = calloc(1, sizeof(*m));
    single = st_join(dir, "model.safetensors");
    index = st_join(dir, "model.safetensors.index.json");
    if (!m || !single || !index) {
        le_err(err, errlen, dir, "out of memory");
        goto fail;
    }
    /* As transformers does: the single file first, then the index. */
    if (st_is_file(single)) {
        if (st_add_shard(m, dir, "model.safetensors", err, errlen))
            goto fail;
        /* one header: json_parse refused duplicate names */
        if (st_build_by_name(m) < 0) {
            le_err(err, errlen, dir, "out of memory");
            goto fail;
        }
    } else if (st_is_file(index)) {
        if (st_open_index(m, dir, index, err, errlen))
            goto fail;
    } else {
        static const char *const pickles[] = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", NULL};
        static const char *const others[] = {".safetensors", NULL};
        if (st_scan_dir(dir, pickles, found, sizeof(found)))
            le_err(err, errlen, dir,
                   "no model.safetensors or model.safetensors.index.json, only %s: pickled weights "
                   "are not loaded; convert to safetensors",
                   found);
        else if (st_scan_dir(dir, others, found, sizeof(found)))
            le_err(err, errlen, dir,
                   "no model.safetensors or model.safetensors.index.json (found %s, but no index "
                   "names it)",
                   found);
        else
            le_err(err, errlen, dir, "no model.safetensors or model.safetensors.index.json");
        goto fail;
    }
    free(single);
    free(index);
    *out = m;
    return 0;

fail:
    free(single);
    free(index);
    st_close(m);
    return -1;
}

void st_close(struct st_model *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->n_shards; i++) {
        fm_close(&m->shards[i].fm);
        free(m->shards[i].path);
    }
    for (size_t i = 0; i < m->n_tensors; i++)
        free((char *)m->tensors[i].name);
    free(m->shards);
    free(m->tensors);
    free(m->tensor_shard);
    free(m->by_name);
    free(m);
}

size_t st_n_tensors(const struct st_model *m)
{
    return m ? m->n_tensors : 0;
}

const struct tensor *st_tensor(const struct st_model *m, size_t i)
{
    return m && i < m->n_tensors ? &m->tensors[i] : NULL;
}

const struct tensor *st_find(const struct st_model *m, const char *name)
{
    if (!m || !name)
        return NULL;
    const struct ni_entry *e = ni_find(m->by_name, m->n_tensors, name);
    return e ? &m->tensors[e->idx] : NULL;
}

unsigned long long st_file_bytes(const struct st_model *m)
{
    return m ? m->bytes : 0;
}
