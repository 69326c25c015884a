/* kv_cache.c: block allocator, block tables and the K/V slab.
 * Engine thread only. The slab is one allocation of
 * n_layer x 2 x n_blocks x KV_BLOCK_TOKENS x n_kv_heads x head_dim floats. */
#include "engine/kv_cache.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct kv_seq {
    int open;
    int rope_long;
    int64_t len;     /* positions stored */
    int32_t *blocks; /* block table, n_blocks entries used */
    int64_t n_blocks, cap_blocks;
};

struct kv_cache {
    struct kv_geom g;
    int64_t n_blocks;
    int64_t block_floats; /* floats in one block of one layer's K (or V) */
    float *slab;          /* (n_layer, 2, n_blocks, 16, n_kv_heads, head_dim) */
    int32_t *free_list;   /* stack of free block ids */
    int64_t n_free;
    int32_t *refs;        /* (n_blocks) reference counts */
    struct kv_seq *seqs;  /* (max_seqs) */
    int max_seqs;
};

int64_t kv_bytes_per_token(const struct kv_geom *g)
{
    return 2 * g->n_layer * g->n_kv_heads * g->head_dim * (int64_t)sizeof(float);
}

struct kv_cache *kv_create(const struct kv_geom *g, int64_t n_blocks,
                           int max_seqs, char *err, size_t errlen)
{
    struct kv_cache *kv = calloc(1, sizeof(*kv));
    if (!kv)
        goto oom;
    if (n_blocks <= 0 || n_blocks > INT32_MAX || max_seqs <= 0) {
        snprintf(err, errlen, "KV cache: invalid size (%lld blocks, %d sequences)",
                 (long long)n_blocks, max_seqs);
        free(kv);
        return NULL;
    }
    kv->g = *g;
    kv->n_blocks = n_blocks;
    kv->max_seqs = max_seqs;
    kv->block_floats = KV_BLOCK_TOKENS * g->n_kv_heads * g->head_dim;
    size_t floats = (size_t)g->n_layer * 2 * (size_t)n_blocks * (size_t)kv->block_floats;
    /* 64-byte alignment for the SIMD loads of attention. */
    if (posix_memalign((void **)&kv->slab, 64, floats * sizeof(float)) != 0) {
        kv->slab = NULL;
        goto oom;
    }
    memset(kv->slab, 0, floats * sizeof(float));
    kv->free_list = malloc((size_t)n_blocks * sizeof(int32_t));
    kv->refs = calloc((size_t)n_blocks, sizeof(int32_t));
    kv->seqs = calloc((size_t)max_seqs, sizeof(struct kv_seq));
    if (!kv->free_list || !kv->refs || !kv->seqs)
        goto oom;
    /* Stack order: block 0 is handed out first. */
    for (int64_t i = 0; i < n_blocks; i++)
        kv->free_list[i] = (int32_t)(n_blocks - 1 - i);
    kv->n_free = n_blocks;
    return kv;
oom:
    snprintf(err, errlen, "KV cache: out of memory for %lld blocks of %d tokens (%.1f MiB)",
             (long long)n_blocks, KV_BLOCK_TOKENS,
             (double)n_blocks * KV_BLOCK_TOKENS * (double)kv_bytes_per_token(g) / 1048576.0);
    kv_destroy(kv);
    return NULL;
}

void kv_destroy(struct kv_cache *kv)
{
    if (!kv)
        return;
    if (kv->seqs)
        for (int i = 0; i < kv->max_seqs; i++)
            free(kv->seqs[i].blocks);
    free(kv->seqs);
    free(kv->refs);
    free(kv->free_list);
    free(kv->slab);
    free(kv);
}

int64_t kv_n_blocks(const struct kv_cache *kv) { return kv->n_blocks; }
int64_t kv_free_blocks(const struct kv_cache *kv) { return kv->n_free; }

int kv_seq_open(struct kv_cache *kv, int rope_long)
{
    for (int i = 0; i < kv->max_seqs; i++) {
        if (!kv->seqs[i].open) {
            kv->seqs[i].open = 1;
            kv->seqs[i].rope_long = rope_long;
            kv->seqs[i].n_blocks = 0;
            kv->seqs[i].len = 0;
            return i;
        }
    }
    return -1;
}

static void block_unref(struct kv_cache *kv, int32_t b)
{
    if (--kv->refs[b] == 0)
        kv->free_list[kv->n_free++] = b;
}

void kv_seq_close(struct kv_cache *kv, int seq)
{
    struct kv_seq *s = &kv->seqs[seq];
    for (int64_t i = 0; i < s->n_blocks; i++)
        block_unref(kv, s->blocks[i]);
    s->n_blocks = 0;
    s->len = 0;
    s->open = 0;
}

int kv_seq_rope_long(const struct kv_cache *kv, int seq)
{
    return kv->seqs[seq].rope_long;
}

int kv_seq_reserve(struct kv_cache *kv, int seq, int64_t n_tokens)
{
    struct kv_seq *s = &kv->seqs[seq];
    int64_t need = (n_tokens + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS;
    if (need <= s->n_blocks)
        return 0;
    if (need - s->n_blocks > kv->n_free)
        return -1;
    if (need > s->cap_blocks) {
        int64_t cap = s->cap_blocks ? s->cap_blocks : 8;
        while (cap < need)
            cap *= 2;
        int32_t *nb = realloc(s->blocks, (size_t)cap * sizeof(int32_t));
        if (!nb)
            return -1;
        s->blocks = nb;
        s->cap_blocks = cap;
    }
    while (s->n_blocks < need) {
        int32_t b = kv->free_list[--kv->n_free];
        kv->refs[b] = 1;
        s->blocks[s->n_blocks++] = b;
    }
    return 0;
}

int64_t kv_seq_len(const struct kv_cache *kv, int seq)
{
    return kv->seqs[seq].len;
}

void kv_seq_set_len(struct kv_cache *kv, int seq, int64_t len)
{
    kv->seqs[seq].len = len;
}

int kv_seq_valid(const struct kv_cache *kv, int seq)
{
    return seq >= 0 && seq < kv->max_seqs && kv->seqs[seq].open;
}

int kv_max_seqs(const struct kv_cache *kv)
{
    return kv->max_seqs;
}

int64_t kv_seq_capacity(const struct kv_cache *kv, int seq)
{
    return kv->seqs[seq].n_blocks * KV_BLOCK_TOKENS;
}

const int32_t *kv_seq_blocks(const struct kv_cache *kv, int seq, int64_t *n)
{
    *n = kv->seqs[seq].n_blocks;
    return kv->seqs[seq].blocks;
}

float *kv_block_k(struct kv_cache *kv, int64_t layer, int32_t block)
{
    return kv->slab + ((size_t)layer * 2 * (size_t)kv->n_blocks + (size_t)block) * (size_t)kv->block_floats;
}

float *kv_block_v(struct kv_cache *kv, int64_t layer, int32_t block)
{
    return kv->slab + (((size_t)layer * 2 + 1) * (size_t)kv->n_blocks + (size_t)block) * (size_t)kv->block_floats;
}
