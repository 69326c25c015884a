/* kv_cache.c: block allocator, block tables, the K/V slab and the prefix
 * cache (a chained hash index of published blocks plus an LRU list of the
 * cached blocks no sequence holds). Engine thread only. The slab is one
 * allocation of n_layer x 2 x n_blocks x KV_BLOCK_TOKENS x n_kv_heads x
 * head_dim floats. */
#include "engine/kv_cache.h"

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>

struct kv_seq {
    int open;
    int rope_long;
    int64_t len;     /* positions stored */
    int32_t *blocks; /* block table, n_blocks entries used */
    int64_t n_blocks, cap_blocks;
    int64_t n_pub;        /* leading blocks published or attached */
    uint64_t last_serial; /* serial of the cached block with the content of
                           * block n_pub - 1 (0 when none) */
};

/* What a cached block holds, compared in full on lookup. The chain goes
 * through serials, not hash keys: a serial names one published content and
 * is never reused, so equal (parent serial, tokens, rope_long) means equal
 * prefix by induction, whatever the hash does. */
struct kv_meta {
    uint64_t key;           /* bucket hash of the fields below */
    uint64_t serial;        /* unique per publication, from 1 */
    uint64_t parent_serial; /* the previous block's serial, 0 for the first */
    int32_t tokens[KV_BLOCK_TOKENS];
    int32_t rope_long;
    int32_t hnext;             /* next block in the same index bucket, -1 ends */
    int32_t pnext;             /* next block in the same parent bucket, -1 ends */
    int32_t lru_prev, lru_next; /* unheld cached blocks, oldest first */
    int indexed;
};

struct kv_cache {
    struct kv_geom g;
    int64_t n_blocks;
    int64_t block_floats; /* floats in one block of one layer's K (or V) */
    float *slab;          /* (n_layer, 2, n_blocks, 16, n_kv_heads, head_dim) */
    size_t slab_bytes;
    int32_t *free_list;   /* stack of free block ids */
    int64_t n_free;
    int32_t *refs;        /* (n_blocks) reference counts */
    struct kv_seq *seqs;  /* (max_seqs) */
    int max_seqs;
    struct kv_meta *meta; /* (n_blocks) prefix cache state per block */
    int32_t *buckets;     /* (n_buckets) first block of each chain, -1 empty */
    int32_t *pbuckets;    /* (n_buckets) cached blocks by parent serial */
    uint64_t n_buckets;   /* power of two >= n_blocks */
    int32_t lru_head, lru_tail; /* oldest / newest unheld cached block */
    int64_t n_idle;       /* cached blocks with refs == 0 (in the LRU) */
    uint64_t sip_k0, sip_k1; /* per-process secret */
    uint64_t key_mask;    /* all ones except in collision tests */
    uint64_t next_serial;
    struct kv_stats stats;
};

/* ---- SipHash-2-4 (Aumasson and Bernstein), 64-bit output ---- */

#define ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                        \
    do {                                                                \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);       \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                          \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                          \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);       \
    } while (0)

static uint64_t load_le64(const uint8_t *p)
{
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--)
        x = (x << 8) | p[i];
    return x;
}

static uint64_t siphash24(uint64_t k0, uint64_t k1, const uint8_t *m, size_t len)
{
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
    size_t end = len - len % 8;
    for (size_t i = 0; i < end; i += 8) {
        uint64_t w = load_le64(m + i);
        v3 ^= w;
        SIPROUND;
        SIPROUND;
        v0 ^= w;
    }
    uint64_t b = (uint64_t)len << 56;
    for (size_t i = 0; i < len % 8; i++)
        b |= (uint64_t)m[end + i] << (8 * i);
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

/* Key of a block: parent serial, rope_long and the token ids, serialised
 * little-endian. Keyed so that crafted prompts cannot pile into one bucket
 * (lookups would turn linear); correctness never rests on it. */
static uint64_t block_key(const struct kv_cache *kv, uint64_t parent, int rope_long,
                          const int32_t *tokens)
{
    uint8_t m[8 + 4 + 4 * KV_BLOCK_TOKENS];
    for (int i = 0; i < 8; i++)
        m[i] = (uint8_t)(parent >> (8 * i));
    uint32_t r = (uint32_t)rope_long;
    for (int i = 0; i < 4; i++)
        m[8 + i] = (uint8_t)(r >> (8 * i));
    for (int t = 0; t < KV_BLOCK_TOKENS; t++)
        for (int i = 0; i < 4; i++)
            m[12 + 4 * t + i] = (uint8_t)((uint32_t)tokens[t] >> (8 * i));
    return siphash24(kv->sip_k0, kv->sip_k1, m, sizeof(m)) & kv->key_mask;
}

int64_t kv_bytes_per_token(const struct kv_geom *g)
{
    /* f32 on the host; bf16 where a GPU holds them (kcuda.h's layout) */
    int64_t elem = g->external ? 2 : (int64_t)sizeof(float);
    return 2 * g->n_layer * g->n_kv_heads * g->head_dim * elem;
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
    /* Anonymous pages: page-aligned for the SIMD loads of attention, and
     * committed only when first written, so a large budget costs nothing at
     * start (inferd starts in about a second whatever --kv-cache-memory). */
    if (!g->external) {
        kv->slab_bytes = floats * sizeof(float);
        void *slab = mmap(NULL, kv->slab_bytes, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (slab == MAP_FAILED)
            goto oom;
        kv->slab = slab;
    }
    kv->free_list = malloc((size_t)n_blocks * sizeof(int32_t));
    kv->refs = calloc((size_t)n_blocks, sizeof(int32_t));
    kv->seqs = calloc((size_t)max_seqs, sizeof(struct kv_seq));
    kv->meta = calloc((size_t)n_blocks, sizeof(struct kv_meta));
    kv->n_buckets = 1;
    while (kv->n_buckets < (uint64_t)n_blocks)
        kv->n_buckets *= 2;
    kv->buckets = malloc(kv->n_buckets * sizeof(int32_t));
    kv->pbuckets = malloc(kv->n_buckets * sizeof(int32_t));
    if (!kv->free_list || !kv->refs || !kv->seqs || !kv->meta || !kv->buckets || !kv->pbuckets)
        goto oom;
    for (uint64_t i = 0; i < kv->n_buckets; i++)
        kv->buckets[i] = kv->pbuckets[i] = -1;
    kv->lru_head = kv->lru_tail = -1;
    kv->key_mask = ~(uint64_t)0;
    kv->next_serial = 1;
    uint8_t secret[16];
    size_t got = 0;
    while (got < sizeof(secret)) {
        ssize_t n = getrandom(secret + got, sizeof(secret) - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            snprintf(err, errlen, "KV cache: getrandom failed for the prefix cache key: %s",
                     strerror(errno));
            kv_destroy(kv);
            return NULL;
        }
        got += (size_t)n;
    }
    kv->sip_k0 = load_le64(secret);
    kv->sip_k1 = load_le64(secret + 8);
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
    free(kv->buckets);
    free(kv->pbuckets);
    free(kv->meta);
    free(kv->refs);
    free(kv->free_list);
    if (kv->slab)
        munmap(kv->slab, kv->slab_bytes);
    free(kv);
}

int64_t kv_n_blocks(const struct kv_cache *kv) { return kv->n_blocks; }
int64_t kv_free_blocks(const struct kv_cache *kv) { return kv->n_free + kv->n_idle; }
int64_t kv_cached_blocks(const struct kv_cache *kv) { return kv->n_idle; }
int64_t kv_used_blocks(const struct kv_cache *kv) { return kv->n_blocks - kv->n_free - kv->n_idle; }
int32_t kv_block_refs(const struct kv_cache *kv, int32_t b) { return kv->refs[b]; }

void kv_get_stats(const struct kv_cache *kv, struct kv_stats *out) { *out = kv->stats; }

void kv_test_set_key_mask(struct kv_cache *kv, uint64_t mask)
{
    kv->key_mask = mask;
}

/* ---- prefix index and LRU ---- */

static void lru_remove(struct kv_cache *kv, int32_t b)
{
    struct kv_meta *m = &kv->meta[b];
    if (m->lru_prev >= 0)
        kv->meta[m->lru_prev].lru_next = m->lru_next;
    else
        kv->lru_head = m->lru_next;
    if (m->lru_next >= 0)
        kv->meta[m->lru_next].lru_prev = m->lru_prev;
    else
        kv->lru_tail = m->lru_prev;
    kv->n_idle--;
}

static void lru_push_newest(struct kv_cache *kv, int32_t b)
{
    struct kv_meta *m = &kv->meta[b];
    m->lru_prev = kv->lru_tail;
    m->lru_next = -1;
    if (kv->lru_tail >= 0)
        kv->meta[kv->lru_tail].lru_next = b;
    else
        kv->lru_head = b;
    kv->lru_tail = b;
    kv->n_idle++;
}

/* The cached block with exactly this content, or -1. */
static int32_t index_find(const struct kv_cache *kv, uint64_t key, uint64_t parent,
                          int rope_long, const int32_t *tokens)
{
    for (int32_t b = kv->buckets[key & (kv->n_buckets - 1)]; b >= 0; b = kv->meta[b].hnext) {
        const struct kv_meta *m = &kv->meta[b];
        if (m->key == key && m->parent_serial == parent && m->rope_long == rope_long &&
            memcmp(m->tokens, tokens, sizeof(m->tokens)) == 0)
            return b;
    }
    return -1;
}

/* Bucket of the children of a parent serial. Serials are ours, not the
 * client's, so a plain multiplicative mix spreads them. */
static uint64_t parent_bucket(const struct kv_cache *kv, uint64_t parent)
{
    return (parent * 0x9e3779b97f4a7c15ULL >> 20) & (kv->n_buckets - 1);
}

static void index_insert(struct kv_cache *kv, int32_t b, uint64_t key, uint64_t parent,
                         int rope_long, const int32_t *tokens)
{
    struct kv_meta *m = &kv->meta[b];
    assert(!m->indexed);
    m->key = key;
    m->serial = kv->next_serial++;
    m->parent_serial = parent;
    m->rope_long = rope_long;
    memcpy(m->tokens, tokens, sizeof(m->tokens));
    uint64_t h = key & (kv->n_buckets - 1);
    m->hnext = kv->buckets[h];
    kv->buckets[h] = b;
    uint64_t ph = parent_bucket(kv, parent);
    m->pnext = kv->pbuckets[ph];
    kv->pbuckets[ph] = b;
    m->indexed = 1;
}

static void index_remove(struct kv_cache *kv, int32_t b)
{
    struct kv_meta *m = &kv->meta[b];
    int32_t *link = &kv->buckets[m->key & (kv->n_buckets - 1)];
    while (*link != b) {
        assert(*link >= 0);
        link = &kv->meta[*link].hnext;
    }
    *link = m->hnext;
    link = &kv->pbuckets[parent_bucket(kv, m->parent_serial)];
    while (*link != b) {
        assert(*link >= 0);
        link = &kv->meta[*link].pnext;
    }
    *link = m->pnext;
    m->indexed = 0;
}

int kv_seq_open(struct kv_cache *kv, int rope_long)
{
    for (int i = 0; i < kv->max_seqs; i++) {
        if (!kv->seqs[i].open) {
            kv->seqs[i].open = 1;
            kv->seqs[i].rope_long = rope_long;
            kv->seqs[i].n_blocks = 0;
            kv->seqs[i].len = 0;
            kv->seqs[i].n_pub = 0;
            kv->seqs[i].last_serial = 0;
            return i;
        }
    }
    return -1;
}

static void block_unref(struct kv_cache *kv, int32_t b)
{
    assert(kv->refs[b] > 0);
    if (--kv->refs[b] > 0)
        return;
    if (kv->meta[b].indexed)
        lru_push_newest(kv, b);
    else
        kv->free_list[kv->n_free++] = b;
}

void kv_seq_close(struct kv_cache *kv, int seq)
{
    struct kv_seq *s = &kv->seqs[seq];
    /* Last block first: the tail of a prefix turns older in the LRU than its
     * head, so eviction never strands a reachable-looking tail. */
    for (int64_t i = s->n_blocks - 1; i >= 0; i--)
        block_unref(kv, s->blocks[i]);
    s->n_blocks = 0;
    s->len = 0;
    s->n_pub = 0;
    s->last_serial = 0;
    s->open = 0;
}

static int seq_grow(struct kv_seq *s, int64_t need)
{
    if (need <= s->cap_blocks)
        return 0;
    int64_t cap = s->cap_blocks ? s->cap_blocks : 8;
    while (cap < need)
        cap *= 2;
    int32_t *nb = realloc(s->blocks, (size_t)cap * sizeof(int32_t));
    if (!nb)
        return -1;
    s->blocks = nb;
    s->cap_blocks = cap;
    return 0;
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
    /* The next write lands at position len: its block must be ours alone. */
    assert(s->len >= s->n_blocks * KV_BLOCK_TOKENS ||
           (kv->refs[s->blocks[s->len / KV_BLOCK_TOKENS]] == 1 &&
            !kv->meta[s->blocks[s->len / KV_BLOCK_TOKENS]].indexed));
    if (need - s->n_blocks > kv->n_free + kv->n_idle)
        return -1;
    if (seq_grow(s, need) != 0)
        return -1;
    while (s->n_blocks < need) {
        int32_t b;
        if (kv->n_free > 0) {
            b = kv->free_list[--kv->n_free];
        } else {
            b = kv->lru_head;
            lru_remove(kv, b);
            index_remove(kv, b);
            kv->stats.evictions++;
        }
        assert(kv->refs[b] == 0 && !kv->meta[b].indexed);
        kv->refs[b] = 1;
        s->blocks[s->n_blocks++] = b;
    }
    return 0;
}

int64_t kv_seq_attach_prefix(struct kv_cache *kv, int seq, const int32_t *tokens,
                             int64_t n_tokens)
{
    struct kv_seq *s = &kv->seqs[seq];
    assert(s->open && s->n_blocks == 0 && s->len == 0);
    if (s->n_blocks != 0 || s->len != 0 || n_tokens <= 0)
        return 0;
    /* Keep the last prompt token to compute: the caller needs its logits. */
    int64_t max_blocks = (n_tokens - 1) / KV_BLOCK_TOKENS;
    kv->stats.query_tokens += n_tokens;
    kv->stats.query_blocks += max_blocks;
    if (max_blocks == 0 || seq_grow(s, max_blocks) != 0)
        return 0;
    uint64_t parent = 0;
    int64_t n = 0;
    while (n < max_blocks) {
        const int32_t *t = tokens + n * KV_BLOCK_TOKENS;
        uint64_t key = block_key(kv, parent, s->rope_long, t);
        int32_t b = index_find(kv, key, parent, s->rope_long, t);
        if (b < 0)
            break;
        if (kv->refs[b]++ == 0)
            lru_remove(kv, b);
        s->blocks[n++] = b;
        parent = kv->meta[b].serial;
    }
    s->n_blocks = n;
    s->n_pub = n;
    s->last_serial = parent;
    s->len = n * KV_BLOCK_TOKENS;
    kv->stats.hit_blocks += n;
    kv->stats.hit_tokens += n * KV_BLOCK_TOKENS;
    return n * KV_BLOCK_TOKENS;
}

int64_t kv_seq_attach_partial(struct kv_cache *kv, int seq, const int32_t *tokens,
                              int64_t n_tokens)
{
    struct kv_seq *s = &kv->seqs[seq];
    int64_t at = s->n_blocks * KV_BLOCK_TOKENS;
    if (s->len != at || s->n_pub != s->n_blocks || n_tokens - 1 <= at)
        return 0;
    /* Leave the last prompt token to compute. */
    int64_t want = n_tokens - 1 - at;
    if (want > KV_BLOCK_TOKENS - 1)
        want = KV_BLOCK_TOKENS - 1;
    const int32_t *t = tokens + at;
    int32_t best = -1;
    int64_t best_len = 0;
    int scanned = 0;
    /* Bounded: a parent with very many children costs at most this much. */
    for (int32_t b = kv->pbuckets[parent_bucket(kv, s->last_serial)]; b >= 0 && scanned < 64;
         b = kv->meta[b].pnext, scanned++) {
        const struct kv_meta *m = &kv->meta[b];
        if (m->parent_serial != s->last_serial || m->rope_long != s->rope_long)
            continue;
        int64_t l = 0;
        while (l < want && m->tokens[l] == t[l])
            l++;
        if (l > best_len) {
            best_len = l;
            best = b;
        }
    }
    if (best < 0)
        return 0;
    /* Hold the source so that the reserve below cannot evict it. */
    if (kv->refs[best]++ == 0)
        lru_remove(kv, best);
    int ok = kv_seq_reserve(kv, seq, at + best_len) == 0;
    if (ok) {
        int32_t d = s->blocks[s->n_blocks - 1];
        size_t bytes = (size_t)best_len * (size_t)(kv->block_floats / KV_BLOCK_TOKENS) * sizeof(float);
        for (int64_t l = 0; l < kv->g.n_layer; l++) {
            memcpy(kv_block_k(kv, l, d), kv_block_k(kv, l, best), bytes);
            memcpy(kv_block_v(kv, l, d), kv_block_v(kv, l, best), bytes);
        }
        s->len = at + best_len;
        kv->stats.hit_tokens += best_len;
    }
    block_unref(kv, best);
    return ok ? best_len : 0;
}

void kv_seq_publish(struct kv_cache *kv, int seq, const int32_t *tokens, int64_t n_tokens)
{
    struct kv_seq *s = &kv->seqs[seq];
    int64_t stored = n_tokens < s->len ? n_tokens : s->len;
    int64_t full = stored / KV_BLOCK_TOKENS;
    assert(full <= s->n_blocks);
    for (int64_t i = s->n_pub; i < full; i++) {
        const int32_t *t = tokens + i * KV_BLOCK_TOKENS;
        int32_t b = s->blocks[i];
        assert(kv->refs[b] == 1 && !kv->meta[b].indexed);
        uint64_t key = block_key(kv, s->last_serial, s->rope_long, t);
        /* Already cached under another block (computed twice at once): keep
         * that one and chain on from it; this copy stays private and is freed
         * at close. */
        int32_t have = index_find(kv, key, s->last_serial, s->rope_long, t);
        if (have < 0) {
            index_insert(kv, b, key, s->last_serial, s->rope_long, t);
            have = b;
        }
        s->last_serial = kv->meta[have].serial;
        s->n_pub = i + 1;
    }
}

int kv_seq_fork(struct kv_cache *kv, int src)
{
    struct kv_seq *s = &kv->seqs[src];
    assert(s->open);
    int64_t shared = s->n_pub;
    int64_t need = (s->len + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS;
    if (need < shared)
        need = shared;
    if (need - shared > kv->n_free + kv->n_idle)
        return -1;
    int d = kv_seq_open(kv, s->rope_long);
    if (d < 0)
        return -1;
    struct kv_seq *c = &kv->seqs[d];
    if (seq_grow(c, need) != 0) {
        kv_seq_close(kv, d);
        return -1;
    }
    /* Published (or attached) blocks are read-only: share them. */
    for (int64_t i = 0; i < shared; i++) {
        int32_t b = s->blocks[i];
        kv->refs[b]++;
        c->blocks[i] = b;
    }
    c->n_blocks = shared;
    c->n_pub = shared;
    c->last_serial = s->last_serial;
    c->len = shared * KV_BLOCK_TOKENS;
    if (kv_seq_reserve(kv, d, s->len) != 0) {
        kv_seq_close(kv, d);
        return -1;
    }
    /* The rest may still be written by src: copy what is stored. */
    for (int64_t i = shared; i < need; i++) {
        int64_t lo = i * KV_BLOCK_TOKENS;
        int64_t n = s->len - lo < KV_BLOCK_TOKENS ? s->len - lo : KV_BLOCK_TOKENS;
        size_t bytes = (size_t)n * (size_t)(kv->block_floats / KV_BLOCK_TOKENS) * sizeof(float);
        for (int64_t l = 0; l < kv->g.n_layer; l++) {
            memcpy(kv_block_k(kv, l, c->blocks[i]), kv_block_k(kv, l, s->blocks[i]), bytes);
            memcpy(kv_block_v(kv, l, c->blocks[i]), kv_block_v(kv, l, s->blocks[i]), bytes);
        }
    }
    c->len = s->len;
    return d;
}

int kv_seq_mirror(struct kv_cache *kv, int seq, int rope_long, const int32_t *blocks,
                  int64_t n_blocks, int64_t len)
{
    if (seq < 0 || seq >= kv->max_seqs || n_blocks < 0 || len < 0 ||
        len > n_blocks * KV_BLOCK_TOKENS)
        return -1;
    for (int64_t i = 0; i < n_blocks; i++)
        if (blocks[i] < 0 || blocks[i] >= kv->n_blocks)
            return -1;
    struct kv_seq *s = &kv->seqs[seq];
    if (seq_grow(s, n_blocks) != 0)
        return -1;
    if (n_blocks)
        memcpy(s->blocks, blocks, (size_t)n_blocks * sizeof(int32_t));
    s->open = 1;
    s->rope_long = rope_long;
    s->n_blocks = n_blocks;
    s->len = len;
    s->n_pub = 0;
    s->last_serial = 0;
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
