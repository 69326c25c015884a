/* test_kv_cache.c: the paged KV cache through its header: block accounting,
 * all-or-nothing reservation, block tables, reuse after close, that every
 * block's K and V regions are distinct, and the prefix cache (sharing,
 * rope_long, LRU eviction, hash collisions, a random stress against a
 * model of what must be shared). */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kv_cache.h"

static int failures;
#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); failures++; } } while (0)

static const struct kv_geom small_geom = {1, 1, 2, 0};

static struct kv_cache *make_kv(int64_t n_blocks, int max_seqs)
{
    char err[256];
    struct kv_cache *kv = kv_create(&small_geom, n_blocks, max_seqs, err, sizeof(err));
    if (!kv) {
        fprintf(stderr, "kv_create: %s\n", err);
        exit(1);
    }
    return kv;
}

/* What the forward pass does for a prompt after attach: reserve, store,
 * publish. Returns 0 or -1 when blocks ran out. */
static int compute(struct kv_cache *kv, int seq, const int32_t *tokens, int64_t n)
{
    if (kv_seq_reserve(kv, seq, n) != 0)
        return -1;
    kv_seq_set_len(kv, seq, n);
    kv_seq_publish(kv, seq, tokens, n);
    return 0;
}

static void check_accounting(const struct kv_cache *kv)
{
    CHECK(kv_free_blocks(kv) + kv_used_blocks(kv) == kv_n_blocks(kv));
    CHECK(kv_cached_blocks(kv) >= 0 && kv_cached_blocks(kv) <= kv_free_blocks(kv));
}

static void test_prefix_sharing(void)
{
    struct kv_cache *kv = make_kv(16, 6);
    int32_t p[40], q[40];
    for (int i = 0; i < 40; i++)
        p[i] = 1000 + i;
    int a = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, a, p, 40) == 0); /* empty cache */
    CHECK(compute(kv, a, p, 40) == 0);
    int64_t na, nb;
    const int32_t *ta = kv_seq_blocks(kv, a, &na);
    CHECK(na == 3);

    /* Same prompt: both full blocks reused, the same ids, shared. */
    int b = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, b, p, 40) == 32);
    const int32_t *tb = kv_seq_blocks(kv, b, &nb);
    CHECK(nb == 2 && tb[0] == ta[0] && tb[1] == ta[1]);
    CHECK(kv_block_refs(kv, ta[0]) == 2 && kv_block_refs(kv, ta[1]) == 2);
    CHECK(kv_block_refs(kv, ta[2]) == 1);
    CHECK(kv_seq_len(kv, b) == 32 && kv_seq_capacity(kv, b) == 32);
    CHECK(compute(kv, b, p, 40) == 0);
    tb = kv_seq_blocks(kv, b, &nb);
    CHECK(nb == 3 && tb[2] != ta[2]); /* the partial block is private */
    CHECK(kv_used_blocks(kv) == 4);
    check_accounting(kv);

    /* Differs in token 20 (second block): only the first block. */
    memcpy(q, p, sizeof(q));
    q[20] = 7;
    int c = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, c, q, 40) == 16);
    CHECK(kv_block_refs(kv, ta[0]) == 3 && kv_block_refs(kv, ta[1]) == 2);
    kv_seq_close(kv, c);

    /* Exactly 32 tokens: one token is left to compute. */
    int d = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, d, p, 32) == 16);
    kv_seq_close(kv, d);
    d = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, d, p, 33) == 32);
    kv_seq_close(kv, d);
    d = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, d, p, 16) == 0);
    kv_seq_close(kv, d);

    /* Long RoPE stores other keys for the same tokens. */
    int e = kv_seq_open(kv, 1);
    CHECK(kv_seq_attach_prefix(kv, e, p, 40) == 0 && kv_seq_capacity(kv, e) == 0);
    kv_seq_close(kv, e);

    /* Closed: the blocks stay cached, count as free, and still hit. */
    kv_seq_close(kv, a);
    kv_seq_close(kv, b);
    CHECK(kv_free_blocks(kv) == 16 && kv_used_blocks(kv) == 0);
    CHECK(kv_cached_blocks(kv) == 2);
    CHECK(kv_block_refs(kv, ta[0]) == 0);
    int f = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, f, p, 40) == 32);
    const int32_t *tf = kv_seq_blocks(kv, f, &nb);
    CHECK(nb == 2 && tf[0] == ta[0] && tf[1] == ta[1]);
    CHECK(kv_cached_blocks(kv) == 0 && kv_used_blocks(kv) == 2);
    kv_seq_close(kv, f);
    CHECK(kv_free_blocks(kv) == 16 && kv_cached_blocks(kv) == 2);

    struct kv_stats st;
    kv_get_stats(kv, &st);
    /* Queries: 40,40,40,32,33,16,40,40 tokens. Hits: 0,32,16,16,32,0,0,32. */
    CHECK(st.query_tokens == 281 && st.hit_tokens == 128);
    CHECK(st.query_blocks == 2 + 2 + 2 + 1 + 2 + 0 + 2 + 2 && st.hit_blocks == 8);
    CHECK(st.evictions == 0);
    kv_destroy(kv);
}

static void test_lru_eviction(void)
{
    struct kv_cache *kv = make_kv(6, 6);
    int32_t pa[33], pb[33];
    for (int i = 0; i < 33; i++) {
        pa[i] = 100 + i;
        pb[i] = 200 + i;
    }
    int a = kv_seq_open(kv, 0);
    CHECK(compute(kv, a, pa, 33) == 0);
    int64_t n;
    int32_t a_blocks[3], b_blocks[3];
    memcpy(a_blocks, kv_seq_blocks(kv, a, &n), sizeof(a_blocks));
    kv_seq_close(kv, a); /* A's two full blocks cached, its tail freed */
    int b = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, b, pb, 33) == 0);
    CHECK(compute(kv, b, pb, 33) == 0);
    memcpy(b_blocks, kv_seq_blocks(kv, b, &n), sizeof(b_blocks));
    /* B took never-used blocks before any cached one. */
    for (int i = 0; i < 3; i++)
        CHECK(b_blocks[i] != a_blocks[0] && b_blocks[i] != a_blocks[1]);
    kv_seq_close(kv, b);
    CHECK(kv_free_blocks(kv) == 6 && kv_cached_blocks(kv) == 4);

    /* 3 blocks with 2 plain free: evicts the oldest, A's second block (a
     * closed sequence releases its tail first). */
    int c = kv_seq_open(kv, 0);
    CHECK(kv_seq_reserve(kv, c, 48) == 0);
    struct kv_stats st;
    kv_get_stats(kv, &st);
    CHECK(st.evictions == 1 && kv_cached_blocks(kv) == 3);
    const int32_t *tc = kv_seq_blocks(kv, c, &n);
    CHECK(n == 3 && tc[2] == a_blocks[1]);
    /* One more: A's first block goes next, B's prefix stays whole. */
    int d = kv_seq_open(kv, 0);
    CHECK(kv_seq_reserve(kv, d, 16) == 0);
    CHECK(kv_seq_blocks(kv, d, &n)[0] == a_blocks[0]);
    int e = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, e, pa, 33) == 0);
    int f = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, f, pb, 33) == 32);
    /* Every block is held now; all or nothing still holds once B's prefix is
     * released and cached. */
    CHECK(kv_free_blocks(kv) == 0);
    CHECK(kv_seq_reserve(kv, e, 16) == -1 && kv_seq_capacity(kv, e) == 0);
    kv_seq_close(kv, f);
    CHECK(kv_free_blocks(kv) == 2 && kv_cached_blocks(kv) == 2);
    CHECK(kv_seq_reserve(kv, e, 48) == -1 && kv_seq_capacity(kv, e) == 0);
    CHECK(kv_seq_reserve(kv, e, 32) == 0); /* takes B's prefix: the hit is gone */
    kv_get_stats(kv, &st);
    CHECK(st.evictions == 4 && kv_cached_blocks(kv) == 0);
    f = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, f, pb, 33) == 0);
    kv_seq_close(kv, c);
    kv_seq_close(kv, d);
    kv_seq_close(kv, e);
    kv_seq_close(kv, f);
    CHECK(kv_free_blocks(kv) == 6 && kv_used_blocks(kv) == 0 && kv_cached_blocks(kv) == 0);
    kv_destroy(kv);
}

/* Every key collides (mask 0): only the stored contents tell blocks apart. */
static void test_collisions(void)
{
    struct kv_cache *kv = make_kv(8, 4);
    kv_test_set_key_mask(kv, 0);
    int32_t x[17], y[17];
    for (int i = 0; i < 17; i++)
        x[i] = y[i] = 5 + i;
    y[15] = 99; /* same key, other contents */
    int a = kv_seq_open(kv, 0);
    CHECK(compute(kv, a, x, 17) == 0);
    int b = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, b, y, 17) == 0);
    CHECK(compute(kv, b, y, 17) == 0); /* published beside x's block */
    int64_t n;
    int32_t xb = kv_seq_blocks(kv, a, &n)[0], yb = kv_seq_blocks(kv, b, &n)[0];
    kv_seq_close(kv, a);
    kv_seq_close(kv, b);
    CHECK(kv_cached_blocks(kv) == 2);
    int c = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, c, y, 17) == 16 && kv_seq_blocks(kv, c, &n)[0] == yb);
    int d = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, d, x, 17) == 16 && kv_seq_blocks(kv, d, &n)[0] == xb);
    int e = kv_seq_open(kv, 1); /* same tokens and key, other rope_long */
    CHECK(kv_seq_attach_prefix(kv, e, x, 17) == 0);
    kv_seq_close(kv, c);
    kv_seq_close(kv, d);
    kv_seq_close(kv, e);

    /* [X, B] is cached and so is Y: the prompt [Y, B] may reuse Y only, as
     * B's K/V were computed after X. Every key collides, so only the parent
     * check tells the two second blocks apart. */
    int32_t xb2[33], yb2[33];
    for (int i = 0; i < 33; i++)
        xb2[i] = yb2[i] = i < 16 ? x[i] : 300 + i;
    memcpy(yb2, y, 16 * sizeof(int32_t));
    a = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, a, xb2, 33) == 16); /* X */
    CHECK(compute(kv, a, xb2, 33) == 0);
    b = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, b, yb2, 33) == 16);
    CHECK(kv_seq_blocks(kv, b, &n)[0] == yb);
    kv_seq_close(kv, a);
    a = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, a, xb2, 33) == 32); /* [X, B] itself hits */
    kv_seq_close(kv, a);
    kv_seq_close(kv, b);
    CHECK(kv_free_blocks(kv) == 8);
    kv_destroy(kv);

    /* With the real hash: the same second block under another first block. */
    kv = make_kv(8, 4);
    int32_t p[33], q[33];
    for (int i = 0; i < 33; i++)
        p[i] = q[i] = 50 + i;
    q[3] = 1;
    a = kv_seq_open(kv, 0);
    CHECK(compute(kv, a, p, 33) == 0);
    b = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, b, q, 33) == 0);
    kv_seq_close(kv, a);
    kv_seq_close(kv, b);
    CHECK(kv_free_blocks(kv) == 8);
    kv_destroy(kv);
}

/* ---- random stress against a model ---- */

#define ST_BLOCKS 24
#define ST_SEQS 6
#define ST_MAXTOK 128

struct st_seq {
    int open, rope;
    int32_t toks[ST_MAXTOK];
    int64_t n_toks, len, n_pub;
    uint64_t last_serial;
};

/* kv_seq_attach_partial: the leading tokens of a cached block that follows
 * the attached run are copied (keys and values, every layer) into a block
 * of the sequence's own; the source stays cached and unchanged, is never
 * evicted by the copy, and the last prompt token is always left. */
static void test_partial_reuse(void)
{
    struct kv_cache *kv = make_kv(4, 4);
    int32_t p[32], q[32];
    for (int i = 0; i < 32; i++)
        p[i] = q[i] = 500 + i;
    for (int i = 21; i < 32; i++)
        q[i] = 900 + i; /* q shares p's first 21 tokens: block 0 and 5 of block 1 */
    int a = kv_seq_open(kv, 0);
    CHECK(compute(kv, a, p, 32) == 0);
    int64_t n;
    int32_t src = kv_seq_blocks(kv, a, &n)[1];
    /* Mark each stored token's K and V (one layer, one head, 2 dims). */
    for (int t = 0; t < 32; t++) {
        int32_t b = kv_seq_blocks(kv, a, &n)[t / KV_BLOCK_TOKENS];
        kv_block_k(kv, 0, b)[2 * (t % KV_BLOCK_TOKENS)] = (float)t;
        kv_block_v(kv, 0, b)[2 * (t % KV_BLOCK_TOKENS) + 1] = -(float)t;
    }
    kv_seq_close(kv, a); /* both blocks now cached, unheld */
    CHECK(kv_cached_blocks(kv) == 2);

    int b = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, b, q, 32) == 16);
    /* Two blocks free besides the two cached: the copy must take a free one,
     * not evict its own source. */
    CHECK(kv_seq_attach_partial(kv, b, q, 32) == 5);
    CHECK(kv_seq_len(kv, b) == 21);
    const int32_t *tb = kv_seq_blocks(kv, b, &n);
    CHECK(n == 2 && tb[1] != src);
    for (int t = 16; t < 21; t++) {
        CHECK(kv_block_k(kv, 0, tb[1])[2 * (t - 16)] == (float)t);
        CHECK(kv_block_v(kv, 0, tb[1])[2 * (t - 16) + 1] == -(float)t);
    }
    CHECK(kv_block_refs(kv, src) == 0 && kv_cached_blocks(kv) == 1);
    /* The copy is private: b goes on writing from position 21. */
    CHECK(kv_block_refs(kv, tb[1]) == 1);
    CHECK(kv_seq_reserve(kv, b, 32) == 0);
    check_accounting(kv);

    /* The same prompt as the cached one: all but its last token. */
    int c = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, c, p, 32) == 16);
    CHECK(kv_seq_attach_partial(kv, c, p, 32) == 15);
    kv_seq_close(kv, c);
    /* A prompt that ends inside the shared block leaves its last token. */
    int d = kv_seq_open(kv, 0);
    CHECK(kv_seq_attach_prefix(kv, d, p, 20) == 16);
    CHECK(kv_seq_attach_partial(kv, d, p, 20) == 3);
    kv_seq_close(kv, d);
    /* Nothing follows a diverging token, and rope_long must agree. */
    int f = kv_seq_open(kv, 1);
    CHECK(kv_seq_attach_prefix(kv, f, p, 32) == 0);
    CHECK(kv_seq_attach_partial(kv, f, p, 32) == 0);
    kv_seq_close(kv, f);
    kv_seq_close(kv, b);
    check_accounting(kv);
    CHECK(kv_used_blocks(kv) == 0);
    kv_destroy(kv);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* Fingerprint of a sequence's blocks [0, i]: what the block's K/V depend on. */
static uint64_t fp_block(uint64_t parent, int rope, const int32_t *t)
{
    uint64_t h = (parent ^ (uint64_t)rope) * 0x100000001b3ULL + 0xcbf29ce484222325ULL;
    for (int i = 0; i < KV_BLOCK_TOKENS; i++)
        h = (h ^ (uint32_t)t[i]) * 0x100000001b3ULL;
    return h ? h : 1;
}

static uint64_t read_fp(struct kv_cache *kv, int32_t b)
{
    uint64_t v;
    memcpy(&v, kv_block_k(kv, 0, b), sizeof(v));
    return v;
}

static void test_stress(void)
{
    struct kv_cache *kv = make_kv(ST_BLOCKS, ST_SEQS);
    struct st_seq seqs[ST_SEQS];
    memset(seqs, 0, sizeof(seqs));
    uint64_t fp[ST_BLOCKS] = {0}; /* model: content of a cached block */
    int cached[ST_BLOCKS] = {0};  /* model: block is in the prefix index */
    /* model: a cached block is found through its parent's publication, so
     * once a parent is evicted its cached children are out of reach even
     * if the parent's content is published again. */
    uint64_t serial[ST_BLOCKS] = {0}, parent[ST_BLOCKS] = {0}, next_serial = 1;
    int32_t base[3][64];
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < 64; i++)
            base[k][i] = (int32_t)(rnd() % 4);
    int64_t hits = 0, evictions_seen = 0;
    for (int op = 0; op < 2000; op++) {
        int si = (int)(rnd() % ST_SEQS);
        struct st_seq *s = &seqs[si];
        int kind = (int)(rnd() % 10);
        if (!s->open) {
            /* Open and attach a prompt that often shares a base prefix. */
            int seq = kv_seq_open(kv, rnd() % 5 == 0);
            CHECK(seq >= 0);
            s = &seqs[seq];
            memset(s, 0, sizeof(*s));
            s->open = 1;
            s->rope = kv_seq_rope_long(kv, seq);
            s->n_toks = 1 + (int64_t)(rnd() % 80);
            int k = (int)(rnd() % 3);
            int64_t shared = (int64_t)(rnd() % 70);
            for (int64_t i = 0; i < s->n_toks; i++)
                s->toks[i] = i < shared && i < 64 ? base[k][i] : (int32_t)(rnd() % 4);
            /* Expected: the longest chain of cached fingerprints. */
            int32_t want[ST_MAXTOK / KV_BLOCK_TOKENS];
            int64_t n_want = 0, max_blocks = (s->n_toks - 1) / KV_BLOCK_TOKENS;
            uint64_t f = 0, ps = 0;
            while (n_want < max_blocks) {
                f = fp_block(f, s->rope, s->toks + n_want * KV_BLOCK_TOKENS);
                int32_t hit = -1;
                for (int32_t b = 0; b < ST_BLOCKS; b++)
                    if (cached[b] && fp[b] == f && parent[b] == ps)
                        hit = b;
                if (hit < 0)
                    break;
                want[n_want++] = hit;
                ps = serial[hit];
            }
            int64_t got = kv_seq_attach_prefix(kv, seq, s->toks, s->n_toks);
            CHECK(got == n_want * KV_BLOCK_TOKENS);
            int64_t n;
            const int32_t *t = kv_seq_blocks(kv, seq, &n);
            CHECK(n == n_want);
            f = 0;
            for (int64_t i = 0; i < n && i < n_want; i++) {
                f = fp_block(f, s->rope, s->toks + i * KV_BLOCK_TOKENS);
                CHECK(t[i] == want[i] && read_fp(kv, t[i]) == f); /* right K/V */
            }
            s->len = got;
            s->n_pub = n_want;
            s->last_serial = n_want ? serial[want[n_want - 1]] : 0;
            hits += got;
        } else if (kind < 2) {
            kv_seq_close(kv, si);
            s->open = 0;
        } else {
            /* Prefill the prompt, or decode a few more tokens. */
            if (s->len == s->n_toks) {
                int64_t more = 1 + (int64_t)(rnd() % 20);
                if (s->n_toks + more > ST_MAXTOK)
                    more = ST_MAXTOK - s->n_toks;
                for (int64_t i = 0; i < more; i++)
                    s->toks[s->n_toks++] = (int32_t)(rnd() % 4);
            }
            int64_t target = s->n_toks, n_old, n;
            kv_seq_blocks(kv, si, &n_old);
            int64_t plain = kv_free_blocks(kv) - kv_cached_blocks(kv);
            int64_t need = (target + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS - n_old;
            if (kv_seq_reserve(kv, si, target) != 0) {
                CHECK(need > kv_free_blocks(kv));
                kv_seq_blocks(kv, si, &n);
                CHECK(n == n_old);
                continue;
            }
            const int32_t *t = kv_seq_blocks(kv, si, &n);
            int64_t evicted = 0;
            for (int64_t i = n_old; i < n; i++) {
                CHECK(kv_block_refs(kv, t[i]) == 1);
                if (cached[t[i]]) {
                    cached[t[i]] = 0;
                    evicted++;
                }
            }
            /* Eviction only once the never-used blocks ran out. */
            CHECK(evicted == (need > plain ? need - plain : 0));
            evictions_seen += evicted;
            /* Store: stamp each block that becomes full with its fingerprint;
             * it must be this sequence's alone. */
            uint64_t f = 0;
            for (int64_t i = 0; i < target / KV_BLOCK_TOKENS; i++) {
                f = fp_block(f, s->rope, s->toks + i * KV_BLOCK_TOKENS);
                if ((i + 1) * KV_BLOCK_TOKENS > s->len) {
                    CHECK(kv_block_refs(kv, t[i]) == 1 && !cached[t[i]]);
                    memcpy(kv_block_k(kv, 0, t[i]), &f, sizeof(f));
                }
            }
            kv_seq_set_len(kv, si, target);
            s->len = target;
            if (rnd() % 4 != 0) {
                kv_seq_publish(kv, si, s->toks, s->n_toks);
                f = 0;
                for (int64_t i = 0; i < target / KV_BLOCK_TOKENS; i++) {
                    f = fp_block(f, s->rope, s->toks + i * KV_BLOCK_TOKENS);
                    if (i < s->n_pub)
                        continue;
                    int32_t have = -1;
                    for (int32_t b = 0; b < ST_BLOCKS; b++)
                        if (cached[b] && fp[b] == f && parent[b] == s->last_serial)
                            have = b;
                    if (have < 0) {
                        have = t[i];
                        cached[have] = 1;
                        fp[have] = f;
                        parent[have] = s->last_serial;
                        serial[have] = next_serial++;
                    }
                    s->last_serial = serial[have];
                }
                s->n_pub = target / KV_BLOCK_TOKENS;
            }
        }
        /* Invariants: refcounts are table occurrences; the counts add up. */
        int occ[ST_BLOCKS] = {0};
        for (int q = 0; q < ST_SEQS; q++) {
            CHECK(kv_seq_valid(kv, q) == seqs[q].open);
            if (!seqs[q].open)
                continue;
            int64_t n;
            const int32_t *t = kv_seq_blocks(kv, q, &n);
            CHECK(kv_seq_len(kv, q) == seqs[q].len);
            for (int64_t i = 0; i < n; i++)
                occ[t[i]]++;
        }
        int64_t used = 0, idle_cached = 0;
        for (int32_t b = 0; b < ST_BLOCKS; b++) {
            CHECK(kv_block_refs(kv, b) == occ[b]);
            used += occ[b] > 0;
            idle_cached += occ[b] == 0 && cached[b];
        }
        CHECK(kv_used_blocks(kv) == used && kv_cached_blocks(kv) == idle_cached);
        check_accounting(kv);
        if (failures)
            break;
    }
    struct kv_stats st;
    kv_get_stats(kv, &st);
    CHECK(st.hit_tokens == hits && st.evictions == evictions_seen);
    /* The stress must actually exercise sharing and eviction. */
    CHECK(hits > 0 && evictions_seen > 0);
    for (int q = 0; q < ST_SEQS; q++)
        if (seqs[q].open)
            kv_seq_close(kv, q);
    CHECK(kv_free_blocks(kv) == ST_BLOCKS && kv_used_blocks(kv) == 0);
    printf("kv_cache stress: %lld tokens reused, %lld evictions\n", (long long)hits,
           (long long)evictions_seen);
    kv_destroy(kv);
}

int main(void)
{
    test_partial_reuse();
    char err[256];
    struct kv_geom g = {3, 2, 8, 0};
    CHECK(kv_bytes_per_token(&g) == 2 * 3 * 2 * 8 * 4);
    CHECK(kv_create(&g, 0, 1, err, sizeof(err)) == NULL && strstr(err, "invalid size"));
    struct kv_cache *kv = kv_create(&g, 10, 4, err, sizeof(err));
    CHECK(kv != NULL);
    CHECK(kv_n_blocks(kv) == 10 && kv_free_blocks(kv) == 10);

    int a = kv_seq_open(kv, 0), b = kv_seq_open(kv, 1);
    CHECK(a >= 0 && b >= 0 && a != b);
    CHECK(kv_seq_rope_long(kv, a) == 0 && kv_seq_rope_long(kv, b) == 1);
    CHECK(kv_seq_reserve(kv, a, 1) == 0 && kv_seq_capacity(kv, a) == KV_BLOCK_TOKENS);
    CHECK(kv_seq_reserve(kv, a, KV_BLOCK_TOKENS) == 0 && kv_free_blocks(kv) == 9);
    CHECK(kv_seq_reserve(kv, a, KV_BLOCK_TOKENS + 1) == 0 && kv_free_blocks(kv) == 8);
    /* All or nothing: 9 blocks wanted, 8 free. */
    CHECK(kv_seq_reserve(kv, b, 9 * KV_BLOCK_TOKENS) == -1);
    CHECK(kv_free_blocks(kv) == 8 && kv_seq_capacity(kv, b) == 0);
    CHECK(kv_seq_reserve(kv, b, 8 * KV_BLOCK_TOKENS) == 0 && kv_free_blocks(kv) == 0);

    /* Block tables: distinct blocks, and distinct memory per layer/K/V. */
    int64_t na, nb;
    const int32_t *ta = kv_seq_blocks(kv, a, &na);
    const int32_t *tb = kv_seq_blocks(kv, b, &nb);
    CHECK(na == 2 && nb == 8);
    int seen[10] = {0};
    for (int64_t i = 0; i < na; i++)
        seen[ta[i]]++;
    for (int64_t i = 0; i < nb; i++)
        seen[tb[i]]++;
    for (int i = 0; i < 10; i++)
        CHECK(seen[i] == 1);
    size_t block_floats = KV_BLOCK_TOKENS * 2 * 8;
    for (int64_t l = 0; l < 3; l++)
        for (int32_t blk = 0; blk < 10; blk++) {
            float *k = kv_block_k(kv, l, blk), *v = kv_block_v(kv, l, blk);
            for (size_t i = 0; i < block_floats; i++) {
                k[i] = (float)(l * 1000 + blk * 10 + 1);
                v[i] = (float)(l * 1000 + blk * 10 + 2);
            }
        }
    for (int64_t l = 0; l < 3; l++)
        for (int32_t blk = 0; blk < 10; blk++) {
            CHECK(kv_block_k(kv, l, blk)[block_floats - 1] == (float)(l * 1000 + blk * 10 + 1));
            CHECK(kv_block_v(kv, l, blk)[0] == (float)(l * 1000 + blk * 10 + 2));
        }

    /* Stored length: set by the forward pass, reset by close. */
    CHECK(kv_seq_len(kv, a) == 0);
    kv_seq_set_len(kv, a, 17);
    CHECK(kv_seq_len(kv, a) == 17);
    CHECK(kv_seq_valid(kv, a) && !kv_seq_valid(kv, 3) && !kv_seq_valid(kv, -1) && !kv_seq_valid(kv, 4));
    CHECK(kv_max_seqs(kv) == 4);

    /* Close frees every block; ids are reused. */
    kv_seq_close(kv, b);
    CHECK(kv_free_blocks(kv) == 8);
    int c = kv_seq_open(kv, 0);
    CHECK(c == b);
    CHECK(kv_seq_capacity(kv, c) == 0 && kv_seq_len(kv, c) == 0);
    CHECK(kv_seq_open(kv, 0) >= 0 && kv_seq_open(kv, 0) >= 0);
    CHECK(kv_seq_open(kv, 0) == -1); /* max_seqs = 4 */
    kv_seq_close(kv, a);
    CHECK(kv_free_blocks(kv) == 10);
    kv_destroy(kv);
    kv_destroy(NULL);

    test_prefix_sharing();
    test_lru_eviction();
    test_collisions();
    test_stress();

    if (failures)
        fprintf(stderr, "%d checks failed\n", failures);
    else
        printf("kv_cache: all checks passed\n");
    return failures ? 1 : 0;
}
