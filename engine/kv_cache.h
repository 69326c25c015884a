/* kv_cache.h: the paged key/value cache.
 *
 * Keys and values live in fixed blocks of KV_BLOCK_TOKENS tokens carved
 * once from one slab; each sequence owns a block table mapping its token
 * positions to blocks. Blocks are reference counted so that a later prefix
 * cache can share them between sequences. Owned and used by the engine
 * thread only; no locking.
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
};

struct kv_cache;

/* Bytes one token of cache takes (K and V, all layers). */
int64_t kv_bytes_per_token(const struct kv_geom *g);

/* Allocates n_blocks blocks for up to max_seqs sequences. Returns NULL with
 * a message in err when the memory cannot be had. Caller owns the result. */
struct kv_cache *kv_create(const struct kv_geom *g, int64_t n_blocks,
                           int max_seqs, char *err, size_t errlen);
/* Frees everything. Accepts NULL. */
void kv_destroy(struct kv_cache *kv);

int64_t kv_n_blocks(const struct kv_cache *kv);
int64_t kv_free_blocks(const struct kv_cache *kv);

/* Opens an empty sequence; returns its id (>= 0) or -1 when max_seqs are
 * open. rope_long records the per-sequence choice of long RoPE factors
 * (LongRoPE models), fixed for the sequence's life so its keys agree. */
int kv_seq_open(struct kv_cache *kv, int rope_long);
/* Releases the sequence's blocks and its id. */
void kv_seq_close(struct kv_cache *kv, int seq);
int kv_seq_rope_long(const struct kv_cache *kv, int seq);
/* Ensures blocks exist for positions [0, n_tokens). All or nothing: returns
 * 0, or -1 (and allocates nothing) when too few blocks are free. */
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

/* The block table of seq: *n entries, block ids in position order. Owned
 * by kv, valid until the next reserve or close. */
const int32_t *kv_seq_blocks(const struct kv_cache *kv, int seq, int64_t *n);

/* Base of block b's keys / values for a layer:
 * (KV_BLOCK_TOKENS, n_kv_heads, head_dim) f32, contiguous. */
float *kv_block_k(struct kv_cache *kv, int64_t layer, int32_t block);
float *kv_block_v(struct kv_cache *kv, int64_t layer, int32_t block);

#endif
