/* kv_cache.h: the paged key/value cache.
 *
 * Keys and values live in fixed blocks of KV_BLOCK_TOKENS tokens carved
 * once from one slab; each sequence owns a block table mapping its token
 * positions to blocks. Blocks are reference counted so that sequences
 * with a common prompt prefix share its blocks (the prefix cache below).
 * Owned and used by the engine thread only; no locking.
 *
 * Prefix cache. A full block (KV_BLOCK_TOKENS stored tokens) can be
 * published under a content key: a keyed hash of (its parent block, its own
 * token ids, the sequence's rope_long flag, which changes the stored keys
 * for the same tokens). A later sequence whose prompt starts with the same
 * blocks attaches them read-only instead of recomputing them. The hash is
 * SipHash-2-4 with a 128-bit secret drawn from getrandom(2) at kv_create,
 * so a client cannot craft prompts that collide (into one slow bucket, or
 * into another request's cache). Correctness does not even rest on that:
 * each cached block keeps its token ids, rope_long and its parent's
 * publication serial (unique, never reused), and a lookup compares them in
 * full, so a hash collision costs a miss, never another prompt's K/V.
 * Published blocks whose last sequence closed stay cached (counted as free)
 * until kv_seq_reserve, with the plain free list empty, evicts them least
 * recently used first; a cached block whose parent was evicted can no
 * longer be reached and simply ages out.
 *
 * Shared blocks are never written: attach hands out only full blocks in
 * front of the sequence's stored length, and reserve only appends, so
 * writes always land in blocks the sequence owns alone.
 */
#ifndef INFERD_KV_CACHE_H
#define INFERD_KV_CACHE_H

#include <stddef.h>
#include <stdint.h>

#define KV_BLOCK_TOKENS 16

struct kv_geom {
    int64_t n_layer;
    int64_t n_kv_heads;
    int64_t head_dim;
    /* Nonzero: the K/V values live elsewhere (a GPU's memory, in the same
     * block numbering) and this cache only allocates blocks and keeps the
     * tables and the prefix index: no host slab, and kv_block_k/v must not
     * be called. */
    int external;
};

struct kv_cache;

/* Bytes one token of cache takes (K and V, all layers) where it is stored:
 * f32 on the host, bf16 when external. */
int64_t kv_bytes_per_token(const struct kv_geom *g);

/* Allocates n_blocks blocks for up to max_seqs sequences and draws the
 * prefix cache's secret. Returns NULL with a message in err when the memory
 * or the secret (getrandom) cannot be had. Caller owns the result. */
struct kv_cache *kv_create(const struct kv_geom *g, int64_t n_blocks,
                           int max_seqs, char *err, size_t errlen);
/* Frees everything. Accepts NULL. */
void kv_destroy(struct kv_cache *kv);

int64_t kv_n_blocks(const struct kv_cache *kv);

/* A follower's cache (multi-node tensor parallelism): sequence seq's
 * block table and stored length set to the leader's, as a STEP carries
 * them (engine/ctl.h). Opens seq if needed. Such a cache only mirrors:
 * nothing on it reserves, attaches, forks or closes (its blocks are the
 * leader's to allocate). Returns 0, or -1 for a sequence or block out of
 * range, a length past the blocks, or out of memory. */
int kv_seq_mirror(struct kv_cache *kv, int seq, int rope_long, const int32_t *blocks,
                  int64_t n_blocks, int64_t len);
/* Blocks a reserve can have: never used plus cached ones no sequence holds
 * (evictable). kv_free_blocks + kv_used_blocks == kv_n_blocks. */
int64_t kv_free_blocks(const struct kv_cache *kv);
/* Of kv_free_blocks, those that still hold a published prefix. */
int64_t kv_cached_blocks(const struct kv_cache *kv);
/* Blocks held by at least one open sequence. */
int64_t kv_used_blocks(const struct kv_cache *kv);
/* Reference count of block b: how many open sequences hold it. */
int32_t kv_block_refs(const struct kv_cache *kv, int32_t b);

/* Opens an empty sequence; returns its id (>= 0) or -1 when max_seqs are
 * open. rope_long records the per-sequence choice of long RoPE factors
 * (LongRoPE models), fixed for the sequence's life so its keys agree. */
int kv_seq_open(struct kv_cache *kv, int rope_long);
/* Releases the sequence's blocks and its id. Published blocks stay cached;
 * they are released last block first, so eviction takes a prefix's tail
 * before its head. */
void kv_seq_close(struct kv_cache *kv, int seq);
int kv_seq_rope_long(const struct kv_cache *kv, int seq);
/* Ensures blocks exist for positions [0, n_tokens). All or nothing: returns
 * 0, or -1 (and allocates nothing) when too few blocks are free. Takes
 * never-used blocks first, then evicts unheld cached blocks, oldest first. */
int kv_seq_reserve(struct kv_cache *kv, int seq, int64_t n_tokens);
/* Tokens whose keys and values are stored: positions [0, len). */
int64_t kv_seq_len(const struct kv_cache *kv, int seq);
/* Records that positions [0, len) are stored (len <= capacity). */
void kv_seq_set_len(struct kv_cache *kv, int seq, int64_t len);
/* Whether seq is an open sequence id. */
int kv_seq_valid(const struct kv_cache *kv, int seq);
int kv_max_seqs(const struct kv_cache *kv);
/* Positions the sequence has blocks for (a multiple of KV_BLOCK_TOKENS). */
int64_t kv_seq_capacity(const struct kv_cache *kv, int seq);

/* Prefix cache lookup for a freshly opened, empty sequence (no blocks, no
 * stored tokens; asserted). tokens: (n_tokens) the prompt, borrowed. Finds
 * the longest run of cached blocks matching the prompt's leading full
 * blocks under the sequence's rope_long, appends them to its block table
 * (shared, reference +1) and sets its stored length to match. Returns the
 * tokens reused: a multiple of KV_BLOCK_TOKENS, at most
 * (n_tokens - 1) / KV_BLOCK_TOKENS blocks, so at least one prompt token is
 * left to compute and the caller gets logits. 0 on a miss or when the
 * table cannot grow. Counts in kv_stats. */
int64_t kv_seq_attach_prefix(struct kv_cache *kv, int seq, const int32_t *tokens, int64_t n_tokens);
/* Extends a kv_seq_attach_prefix hit by part of a block: when a cached
 * block follows the attached run (its parent is the run's last block, same
 * rope_long) and its first L tokens equal the prompt's next L, copies those
 * L tokens' keys and values into a new block of the sequence's own (so a
 * prompt that shares a system prompt ending mid-block recomputes only what
 * differs). L < KV_BLOCK_TOKENS and at least one prompt token is left to
 * compute. Call right after kv_seq_attach_prefix, on its full-block run.
 * Returns L, or 0 (nothing changed) when no cached block matches or no
 * block is free. Counts L in kv_stats.hit_tokens. */
int64_t kv_seq_attach_partial(struct kv_cache *kv, int seq, const int32_t *tokens, int64_t n_tokens);
/* Publishes the sequence's full blocks not yet published, so later
 * sequences can attach them. tokens: (n_tokens) the sequence's token ids
 * from position 0, borrowed; the caller has stored K/V for [0, n_tokens)
 * (only blocks inside the stored length are published). A block whose
 * content is already cached under another block id stays private. */
void kv_seq_publish(struct kv_cache *kv, int seq, const int32_t *tokens, int64_t n_tokens);

/* Opens a copy of sequence src (n > 1 samples of one prompt): the new
 * sequence shares src's published or attached blocks and gets its own copy
 * of the stored tokens after them, so both can go on writing. Returns the
 * new id, or -1 (nothing changed) when no sequence id or too few blocks are
 * free. Call kv_seq_publish on src first to share the most. */
int kv_seq_fork(struct kv_cache *kv, int src);

struct kv_stats {
    int64_t query_tokens; /* prompt tokens offered to kv_seq_attach_prefix */
    int64_t hit_tokens;   /* of those, reused from the cache */
    int64_t query_blocks; /* full blocks that could have been reused */
    int64_t hit_blocks;   /* blocks attached */
    int64_t evictions;    /* cached blocks evicted by reserve */
};
/* Cumulative counters since kv_create. */
void kv_get_stats(const struct kv_cache *kv, struct kv_stats *out);

/* Tests only: ANDs every content key with mask (0 makes all blocks
 * collide) to check that lookups compare contents. Call before any
 * publish. */
void kv_test_set_key_mask(struct kv_cache *kv, uint64_t mask);

/* The block table of seq: *n entries, block ids in position order. Owned
 * by kv, valid until the next reserve or close. */
const int32_t *kv_seq_blocks(const struct kv_cache *kv, int seq, int64_t *n);

/* Base of block b's keys / values for a layer:
 * (KV_BLOCK_TOKENS, n_kv_heads, head_dim) f32, contiguous. */
float *kv_block_k(struct kv_cache *kv, int64_t layer, int32_t block);
float *kv_block_v(struct kv_cache *kv, int64_t layer, int32_t block);

#endif
