/* tp_plan.h: the tensor-parallel sharding plan of a model.
 *
 * Megatron-style, split the way vLLM splits it: q/k/v and gate/up are
 * column-parallel (each rank holds a contiguous range of output rows: its
 * attention heads, its MLP columns), o_proj and down_proj are row-parallel
 * (each rank holds the matching range of input columns, and one all-reduce
 * after attention and one after the MLP sum the ranks' partial outputs),
 * the embedding and LM head are vocab-parallel, norms are replicated.
 * tp_plan_make checks that a model's shape splits over N ranks this way and
 * says which rows each rank holds and what that costs in memory; nothing
 * here runs a model. Pure functions of their arguments, any thread.
 */
#ifndef INFERD_TP_PLAN_H
#define INFERD_TP_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "engine/model.h"
#include "kernels/kernels.h"

#define TP_MAX 64
/* Each rank's share of the vocabulary is rounded up to a multiple of this
 * many rows (vLLM's padding), so every shard of the embedding and the LM
 * head has the same, GEMM-friendly row count. */
#define TP_VOCAB_PAD 64

/* The element type of each weight role (the plan needs them for bytes and
 * for the quant-block rule of row-parallel splits). A fused qkv_proj is
 * split as its q, k and v parts and a fused gate_up_proj as gate and up
 * (vLLM's QKVParallelLinear / MergedColumnParallelLinear): give the fused
 * tensor's dtype to each part. lm_head is ignored with tied embeddings. */
struct tp_dtypes {
    enum k_dtype q, k, v, o;
    enum k_dtype gate, up, down;
    enum k_dtype embd, lm_head;
    enum k_dtype vec; /* norms and biases */
    enum k_dtype kv;  /* a KV cache element: bf16 on a GPU, f32 on the host */
    enum k_dtype act; /* the activations the all-reduces carry */
};

/* Every matrix role `matrices`, norms and biases `vectors`, the KV cache
 * and the all-reduced activations bf16 (what a GPU rank holds). */
void tp_dtypes_uniform(struct tp_dtypes *d, enum k_dtype matrices, enum k_dtype vectors);

/* What rank `rank` holds. Ranges are half-open and index the unsharded
 * model's heads, MLP columns and vocabulary rows. */
struct tp_rank_plan {
    int rank;
    int64_t q_head0, n_q_heads;   /* query heads; o_proj input columns
                                   * [q_head0 * head_dim, (q_head0 + n_q_heads) * head_dim) */
    int64_t kv_head0, n_kv_heads; /* KV heads (k and v rows, and its KV cache);
                                   * one head shared with other ranks when replicated */
    int64_t ff0, n_ff;            /* gate and up rows, down_proj input columns */
    int64_t vocab0, vocab1;       /* embedding and LM head rows; empty (v0 == v1)
                                   * for trailing ranks of a small vocabulary */
    int64_t vocab_rows;           /* rows allocated: vocab1 - vocab0 plus padding */
    int64_t weight_bytes;         /* every weight this rank holds, padding included */
    int64_t kv_bytes_per_token;   /* n_layer x 2 x n_kv_heads x head_dim x kv element */
};

/* A plain value struct: no pointers, nothing to free. */
struct tp_plan {
    int tp;                 /* ranks */
    int kv_replicated;      /* n_head_kv < tp: each KV head on kv_replicas ranks */
    int64_t kv_replicas;    /* ranks holding each KV head (1 unless replicated) */
    int64_t vocab_per_rank; /* padded rows per rank (TP_VOCAB_PAD) */
    /* Weights. Sum over ranks of weight_bytes ==
     * total_weight_bytes + replicated_bytes + vocab_pad_bytes. */
    int64_t total_weight_bytes; /* the unsharded model */
    int64_t replicated_bytes;   /* the copies beyond one: norms on every rank,
                                 * KV heads (and their biases) on kv_replicas ranks */
    int64_t vocab_pad_bytes;    /* padding rows of the embedding and LM head shards */
    /* KV cache: the unsharded model's bytes per token; the ranks' sum is
     * kv_replicas times that when replicated (each copy is stored). */
    int64_t kv_bytes_per_token;
    /* Traffic per token: one all-reduce of n_embd activations after the
     * attention and one after the MLP of each layer (2 x n_layer x n_embd
     * values), plus one after the vocab-parallel embedding lookup (n_embd),
     * plus the all-gather of each rank's logits (tp x vocab_per_rank) for
     * a token that is sampled. */
    int64_t allreduce_values_per_token;
    int64_t allreduce_bytes_per_token; /* layers' values in the act dtype */
    int64_t embd_allreduce_values;
    int64_t logits_gather_values;
    struct tp_rank_plan rank[TP_MAX];
};

/* Plans tp ranks (1..TP_MAX) for the model c with weights of dtypes dt.
 * Refuses (returns -1 with a message naming the rule and the numbers in
 * err, *out unspecified) a shape that does not split: n_head, n_ff or
 * n_head_kv (at least tp) not divisible by tp, fewer KV heads than ranks
 * that do not divide tp, query heads of a rank outside its KV heads' GQA
 * groups, or a row-parallel split (o_proj, down_proj) that cuts a
 * quantized block, with a size or file type that would fit. Returns 0 with
 * *out filled otherwise. */
int tp_plan_make(const struct model_config *c, const struct tp_dtypes *dt, int tp,
                 struct tp_plan *out, char *err, size_t errlen);

#endif
