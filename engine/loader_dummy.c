/* loader_dummy.c: a model's tensors with random values (see dummy.h).
 * The names and shapes are those bind_all in model.c asks a Hugging Face
 * checkpoint for, derived from the config the same way. */
#include "engine/dummy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

struct dummy_model {
    struct tensor *t;
    char (*names)[96];
    struct dummy_fill *fills; /* how each tensor of t is filled */
    size_t n, cap;
    void *map;
    size_t map_bytes;
    uint64_t bytes;
};

#define GOLDEN_GAMMA 0x9e3779b97f4a7c15ull /* splitmix64's increment */

static int add(struct dummy_model *d, const char *name, int64_t rows, int64_t cols,
               enum dummy_fill_kind how, enum k_dtype dt)
{
    if (d->n == d->cap) {
        size_t cap = d->cap ? 2 * d->cap : 64;
        struct tensor *t = realloc(d->t, cap * sizeof(*t));
        if (t)
            d->t = t;
        char(*nm)[96] = t ? realloc(d->names, cap * sizeof(*nm)) : NULL;
        if (nm)
            d->names = nm;
        struct dummy_fill *f = nm ? realloc(d->fills, cap * sizeof(*f)) : NULL;
        if (!f)
            return -1;
        d->fills = f;
        d->cap = cap;
    }
    struct tensor *t = &d->t[d->n];
    snprintf(d->names[d->n], sizeof(d->names[d->n]), "%s", name);
    memset(t, 0, sizeof(*t));
    t->dtype = dt;
    t->n_dims = rows ? 2 : 1;
    t->ne[0] = cols;
    t->ne[1] = rows ? rows : 1;
    t->ne[2] = t->ne[3] = 1;
    t->nbytes = (uint64_t)(rows ? rows : 1) * (uint64_t)k_row_bytes(dt, cols);
    d->fills[d->n] = (struct dummy_fill){.kind = how, .dtype = dt, .n = (rows ? rows : 1) * cols};
    d->n++;
    return 0;
}

/* splitmix64: cheap, and the same stream for the same seed */
static uint64_t mix(uint64_t *s)
{
    uint64_t z = (*s += GOLDEN_GAMMA);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Random bf16 values built from their bits, four per 64-bit draw: sign,
 * an exponent giving magnitudes in [2^-9, 2^-6) (about 0.002 to 0.016,
 * the size of trained weights) and a random mantissa. An 8B model's 16 GB
 * fills in seconds instead of the half minute conversions from float take. */
static void fill_bf16_random(uint16_t *dst, size_t n, uint64_t *rng)
{
    size_t i = 0;
    while (i < n) {
        uint64_t r = mix(rng);
        for (int k = 0; k < 4 && i < n; k++, i++, r >>= 16) {
            unsigned sign = (unsigned)(r >> 15) & 1, exp = 118 + ((unsigned)(r >> 7) & 3);
            dst[i] = (uint16_t)(sign << 15 | exp << 7 | ((unsigned)r & 0x7f));
        }
    }
}

/* How far a tensor moves the stream: what fill below draws. */
static uint64_t draws(const struct dummy_fill *f)
{
    if (f->kind != DUMMY_FILL_RANDOM)
        return 0;
    return f->dtype == K_BF16 ? ((uint64_t)f->n + 3) / 4 : (uint64_t)f->n;
}

static void fill(struct tensor *t, void *dst, enum dummy_fill_kind how, uint64_t *rng)
{
    size_t n = (size_t)(t->ne[0] * t->ne[1]);
    if (how == DUMMY_FILL_RANDOM && t->dtype == K_BF16) {
        fill_bf16_random(dst, n, rng);
        return;
    }
    /* scaled by fan-in so activations keep their size through the layers */
    float a = 0.02f * (t->ne[0] > 4096 ? 4096.0f / (float)t->ne[0] : 1.0f);
    for (size_t i = 0; i < n; i++) {
        float v = how == DUMMY_FILL_ONES ? 1.0f : 0.0f;
        if (how == DUMMY_FILL_RANDOM)
            v = a * (2.0f * (float)(mix(rng) >> 40) * (1.0f / 16777216.0f) - 1.0f);
        switch (t->dtype) {
        case K_F32: ((float *)dst)[i] = v; break;
        case K_F16: ((uint16_t *)dst)[i] = k_f32_to_f16(v); break;
        default: ((uint16_t *)dst)[i] = k_f32_to_bf16(v); break;
        }
    }
}

int dummy_open(const struct model_config *c, enum k_dtype dtype, uint64_t seed, int fill_values,
               struct dummy_model **out, char *err, size_t errlen)
{
    if (dtype != K_F32 && dtype != K_F16 && dtype != K_BF16) {
        snprintf(err, errlen, "dummy weights are f32, f16 or bf16, not %s", k_dtype_name(dtype));
        return -1;
    }
    char nm[96];
    struct dummy_model *d = calloc(1, sizeof(*d));
    if (!d)
        goto oom;
    int64_t E = c->n_embd, hd = c->head_dim, nq = c->n_head * hd, nkv = c->n_head_kv * hd;
#define ADD(name, rows, cols, how, dt)                                                        \
    do {                                                                                      \
        if (add(d, name, rows, cols, how, dt))                                                \
            goto oom;                                                                         \
    } while (0)
    ADD("model.embed_tokens.weight", c->n_vocab, E, DUMMY_FILL_RANDOM, dtype);
    ADD("model.norm.weight", 0, E, DUMMY_FILL_ONES, K_F32);
    if (!c->tied_embeddings)
        ADD("lm_head.weight", c->n_vocab, E, DUMMY_FILL_RANDOM, dtype);
    for (int64_t il = 0; il < c->n_layer; il++) {
#define L(suffix) (snprintf(nm, sizeof(nm), "model.layers.%lld.%s", (long long)il, suffix), nm)
        ADD(L("input_layernorm.weight"), 0, E, DUMMY_FILL_ONES, K_F32);
        ADD(L("post_attention_layernorm.weight"), 0, E, DUMMY_FILL_ONES, K_F32);
        if (c->fused_qkv) {
            ADD(L("self_attn.qkv_proj.weight"), nq + 2 * nkv, E, DUMMY_FILL_RANDOM, dtype);
        } else {
            ADD(L("self_attn.q_proj.weight"), nq, E, DUMMY_FILL_RANDOM, dtype);
            ADD(L("self_attn.k_proj.weight"), nkv, E, DUMMY_FILL_RANDOM, dtype);
            ADD(L("self_attn.v_proj.weight"), nkv, E, DUMMY_FILL_RANDOM, dtype);
        }
        if (c->qkv_bias) {
            ADD(L("self_attn.q_proj.bias"), 0, nq, DUMMY_FILL_ZEROS, K_F32);
            ADD(L("self_attn.k_proj.bias"), 0, nkv, DUMMY_FILL_ZEROS, K_F32);
            ADD(L("self_attn.v_proj.bias"), 0, nkv, DUMMY_FILL_ZEROS, K_F32);
        }
        ADD(L("self_attn.o_proj.weight"), E, nq, DUMMY_FILL_RANDOM, dtype);
        if (c->fused_gate_up) {
            ADD(L("mlp.gate_up_proj.weight"), 2 * c->n_ff, E, DUMMY_FILL_RANDOM, dtype);
        } else {
            ADD(L("mlp.gate_proj.weight"), c->n_ff, E, DUMMY_FILL_RANDOM, dtype);
            ADD(L("mlp.up_proj.weight"), c->n_ff, E, DUMMY_FILL_RANDOM, dtype);
        }
        ADD(L("mlp.down_proj.weight"), E, c->n_ff, DUMMY_FILL_RANDOM, dtype);
#undef L
    }
#undef ADD
    /* one mapping, each tensor 64-byte aligned */
    size_t total = 0;
    for (size_t i = 0; i < d->n; i++) {
        if (d->t[i].nbytes > SIZE_MAX / 2 || total > SIZE_MAX / 2) {
            snprintf(err, errlen, "dummy weights: the config's tensors are too large");
            goto fail;
        }
        total = (total + 63) & ~(size_t)63;
        total += d->t[i].nbytes;
        d->bytes += d->t[i].nbytes;
    }
    d->map = mmap(NULL, total ? total : 64, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (d->map == MAP_FAILED) {
        d->map = NULL;
        snprintf(err, errlen, "dummy weights: cannot map %zu bytes", total);
        goto fail;
    }
    d->map_bytes = total ? total : 64;
    /* huge pages: filling 16 GB in 4 KiB page faults costs more than the
     * filling itself on a VM */
    if (fill_values == DUMMY_FILL_ALL)
        madvise(d->map, d->map_bytes, MADV_HUGEPAGE);
    /* Each tensor starts where the one stream stands after the tensors
     * before it; the fill starts there too, so these states are exactly
     * what made the bytes (and what a GPU needs to make them again). */
    uint64_t state = seed;
    size_t off = 0;
    for (size_t i = 0; i < d->n; i++) {
        off = (off + 63) & ~(size_t)63;
        d->t[i].data = (char *)d->map + off;
        d->t[i].name = d->names[i];
        d->fills[i].state = state;
        state += draws(&d->fills[i]) * GOLDEN_GAMMA; /* mod 2^64, as mix adds */
        if (fill_values == DUMMY_FILL_ALL ||
            (fill_values == DUMMY_FILL_VECTORS && d->t[i].n_dims == 1)) {
            uint64_t rng = d->fills[i].state;
            fill(&d->t[i], (char *)d->map + off, d->fills[i].kind, &rng);
        }
        off += d->t[i].nbytes;
    }
    *out = d;
    return 0;
oom:
    snprintf(err, errlen, "dummy weights: out of memory");
fail:
    dummy_close(d);
    return -1;
}

void dummy_close(struct dummy_model *d)
{
    if (!d)
        return;
    if (d->map)
        munmap(d->map, d->map_bytes);
    free(d->t);
    free(d->names);
    free(d->fills);
    free(d);
}

const struct tensor *dummy_find(const struct dummy_model *d, const char *name)
{
    for (size_t i = 0; i < d->n; i++)
        if (strcmp(d->t[i].name, name) == 0)
            return &d->t[i];
    return NULL;
}

uint64_t dummy_bytes(const struct dummy_model *d)
{
    return d->bytes;
}

int dummy_fill_of(const struct dummy_model *d, const void *data, struct dummy_fill *out)
{
    int64_t at = -1;
    return dummy_fill_at(d, data, out, &at) == 0 && at == 0 ? 0 : -1;
}

int dummy_fill_at(const struct dummy_model *d, const void *data, struct dummy_fill *out,
                  int64_t *elem)
{
    /* From the end: an empty tensor shares its start with the next one,
     * and the one with values is the one meant. A few hundred tensors: a
     * scan costs nothing next to filling any of them. */
    const char *p = data;
    for (size_t i = d->n; i-- > 0;) {
        const char *t = d->t[i].data;
        if (p < t || p >= t + d->t[i].nbytes) {
            if (p == t) { /* an empty tensor */
                *out = d->fills[i];
                *elem = 0;
                return 0;
            }
            continue;
        }
        size_t esz = (size_t)(d->t[i].nbytes / (uint64_t)(d->fills[i].n ? d->fills[i].n : 1));
        if (esz == 0 || (size_t)(p - t) % esz != 0)
            return -1;
        *out = d->fills[i];
        *elem = (int64_t)((size_t)(p - t) / esz);
        return 0;
    }
    return -1;
}
