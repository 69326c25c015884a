/* model.h: a loaded model (config + weights) and its forward pass.
 *
 * model_load opens a Hugging Face directory (config.json + safetensors) or
 * a GGUF file, derives one model_config from either, checks every tensor's
 * shape against what the config implies and binds the weights in place
 * (mmapped; only small vectors such as norms and biases are copied to f32).
 * model_forward runs one step over a batch of rows on the CPU kernels.
 * Both run on the engine thread.
 */
#ifndef INFERD_MODEL_H
#define INFERD_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "engine/kv_cache.h"
#include "engine/sampler.h"
#include "kernels/kernels.h"

#define MODEL_MAX_ROPE_PAIRS 256

enum model_arch { ARCH_LLAMA, ARCH_MISTRAL, ARCH_QWEN2, ARCH_PHI3 };

enum rope_scaling { ROPE_NONE, ROPE_LINEAR, ROPE_LLAMA3, ROPE_LONGROPE };

enum model_format { FORMAT_HF, FORMAT_GGUF };

/* Everything the forward pass needs to know about the network's shape.
 * A plain value struct: filled by model_load, read by everyone. */
struct model_config {
    enum model_arch arch;
    enum model_format format;
    char arch_name[32];     /* "llama", "mistral", "qwen2", "phi3" */
    int64_t n_vocab;
    int64_t n_embd;         /* hidden size */
    int64_t n_layer;
    int64_t n_head;
    int64_t n_head_kv;
    int64_t head_dim;
    int64_t n_ff;           /* MLP intermediate size */
    int64_t n_ctx;          /* max_position_embeddings / context_length */
    int64_t sliding_window; /* 0: none */
    double rms_eps;
    int tied_embeddings;    /* LM head shares token embeddings */
    int qkv_bias;
    int fused_qkv;          /* Phi-3: one qkv_proj */
    int fused_gate_up;      /* Phi-3: one gate_up_proj */
    /* RoPE. rope_dim dims of each head rotate (pairs i < rope_dim/2).
     * interleaved: pairs are (2i, 2i+1) (GGUF llama, whose q/k rows were
     * permuted by the converter); otherwise (i, i + rope_dim/2) as in HF. */
    int64_t rope_dim;
    int rope_interleaved;
    double rope_theta;
    enum rope_scaling scaling;
    double rope_factor;
    int64_t rope_orig_ctx;  /* original_max_position_embeddings */
    /* inv_freq[i] per pair, for the short (default) and long factor sets;
     * the long set equals the short one unless scaling is LONGROPE. */
    float inv_freq_short[MODEL_MAX_ROPE_PAIRS];
    float inv_freq_long[MODEL_MAX_ROPE_PAIRS];
    float rope_mscale;      /* cos/sin multiplier (LongRoPE attention factor) */
    int64_t bos_id, eos_id; /* -1 when unknown */
};

struct model_opts {
    int n_threads;          /* <= 0: one per CPU */
    /* Keep every weight in the file's layout. By default model_load copies
     * the weights the CPU kernels run faster repacked (Q8_0 and Q4_K on
     * AVX-512: k_matrix_pack_wanted) into the kernels' layout, at the cost of that
     * much anonymous memory and a moment at load; the results are the
     * same bits either way. */
    int no_repack;
    /* MODEL_LOAD_DUMMY: path is a config.json (or a directory holding
     * one) and the weights are random, bf16 (engine/dummy.h). */
    int load_format;
    uint64_t dummy_seed;
    /* MODEL_DEVICE_CUDA: the weights are converted to bf16 on the first
     * GPU and model_forward runs there (builds with CUDA only; otherwise,
     * or with no device, model_load fails saying which). */
    int device;
    /* On the GPU: batch-invariant kernels (one-pass decode attention, one
     * GEMM algorithm per shape without split-K), so a request's output
     * does not depend on its batch, as on the CPU, which always is. */
    int deterministic;
    /* On the GPU: run every step kernel by kernel (vLLM's --enforce-eager)
     * instead of replaying decode steps from CUDA graphs. */
    int enforce_eager;
    /* Tensor parallelism (--tensor-parallel-size): the model split over tp
     * ranks Megatron-style (tp_plan.h), each a thread with n_threads / tp
     * CPU threads, summing partial results through a communicator; 0 or 1:
     * none. model_load refuses a shape that does not split. With
     * MODEL_DEVICE_CUDA: one GPU per rank (GPUs 0 .. tp - 1), NCCL between
     * them; one node only for now. */
    int tp;
    /* Multi-node: the tp ranks spread over nnodes processes (tp / nnodes
     * each), this one node_rank; node 0 (the leader) plans the steps and
     * sends them to the others over the control plane (proto/control.md,
     * master_port + 1), the tensors go through the communicator (TCP on
     * the CPU, at master_addr:master_port). 0 or 1: one process. */
    int nnodes, node_rank;
    const char *master_addr;
    int master_port;
};
enum { MODEL_DEVICE_CPU = 0, MODEL_DEVICE_CUDA = 1 };
/* MODEL_LOAD_SHAPES: as DUMMY with every weight zero and never written,
 * so no memory is touched: for inspect (sizes and counts only). */
enum { MODEL_LOAD_AUTO = 0, MODEL_LOAD_DUMMY = 1, MODEL_LOAD_SHAPES = 2 };

struct model;

/* Loads path (a directory or a .gguf file). On failure returns -1 with a
 * message naming the file and the problem in err. *out is owned by the
 * caller (model_destroy). */
int model_load(const char *path, const struct model_opts *opts,
               struct model **out, char *err, size_t errlen);
void model_destroy(struct model *m);

const struct model_config *model_get_config(const struct model *m);
struct k_pool *model_pool(struct model *m);

/* Weight statistics for `inspect`. */
struct model_stats {
    int64_t n_params;
    int64_t weight_bytes;
    int64_t n_tensors;
    int64_t tensors_by_dtype[K_DTYPE_COUNT];
    int64_t params_by_dtype[K_DTYPE_COUNT];
    unsigned long long file_bytes;
    /* What one decode step streams: every matmul weight (the LM head
     * included, the embedding table only when it is the LM head). */
    int64_t matmul_params;
    int64_t matmul_bytes;
    /* Weights copied into the kernels' layout at load (model_opts). */
    int64_t repacked_tensors;
    int64_t repacked_bytes;
    double repack_seconds;
};
void model_get_stats(const struct model *m, struct model_stats *st);

/* The geometry of the KV cache this model needs. */
struct kv_geom model_kv_geom(const struct model *m);

/* Whether a sequence that may reach total_len tokens uses long RoPE factors
 * (LongRoPE models only; the choice is made once per sequence). */
int model_rope_long_for(const struct model *m, int64_t total_len);

/* One row of a batch: a token at a position of a sequence. */
struct model_row {
    int32_t token;
    int32_t seq;          /* kv_cache sequence id */
    int64_t pos;
    int want_logits;
};

/* Runs the forward pass over n rows. The rows of each sequence continue
 * it: in batch order their positions are kv_seq_len, kv_seq_len + 1, ...,
 * and blocks are reserved for them. Writes n_vocab logits for each row
 * with want_logits, in row order, to logits ((rows wanted) x n_vocab), and
 * advances each sequence's kv_seq_len. Returns 0, or -1 with err set (and
 * the cache unchanged) for an invalid batch: a token outside the
 * vocabulary, a closed sequence, a position out of order or past the
 * context, a position without a reserved block. */
int model_forward(struct model *m, struct kv_cache *kv,
                  const struct model_row *rows, int64_t n, float *logits,
                  char *err, size_t errlen);

/* One sample drawn inside model_forward_sample from a want_logits row. */
struct model_sample {
    int64_t row;            /* index among the batch's want_logits rows */
    struct sampler *s;      /* read (its RNG may advance); samp_accept
                             * stays the caller's job */
    int32_t ahead;          /* tokens s drew that it has not accepted yet
                             * (a step launched before the last collect):
                             * a counter-based RNG skips that many draws */
    struct samp_result res; /* out: the token and its logprobs */
};

/* A row's token may name a token not yet known on the host: the k-th
 * sampled token of the step launched just before (model_launch). */
#define MODEL_TOKEN_PREV(k) (-1 - (int32_t)(k))

/* model_forward, then one draw per entry of samples (distinct rows). On a
 * GPU the logits of those rows never leave it: sampling runs there and
 * only the results come back. logits gets the rows no sample names (in
 * want-row order, at their want-row index); the named rows' slots are
 * scratch. On the CPU this is model_forward followed by samp_sample. */
int model_forward_sample(struct model *m, struct kv_cache *kv, const struct model_row *rows,
                         int64_t n, float *logits, struct model_sample *samples,
                         int64_t n_samples, char *err, size_t errlen);

/* model_forward_sample in two halves, so the host can prepare the next
 * step while the device runs this one. model_launch validates the batch,
 * advances the sequences' lengths and enqueues the step; on a GPU it
 * returns before the step has run (model_async), on the CPU after.
 * model_collect waits for the oldest launched step not yet collected and
 * writes its samples' res and its logits (the arrays given at launch,
 * which must stay valid until then). At most two launched steps may be
 * uncollected. Rows of a launch may carry MODEL_TOKEN_PREV tokens naming
 * the samples of the launch just before it, collected or not; the device
 * substitutes them, so the host never waits for them. */
int model_launch(struct model *m, struct kv_cache *kv, const struct model_row *rows, int64_t n,
                 float *logits, struct model_sample *samples, int64_t n_samples, char *err,
                 size_t errlen);
int model_collect(struct model *m, char *err, size_t errlen);
/* A follower node (model_opts.node_rank > 0): runs the leader's steps
 * until it shuts the job down (returns 0) or fails or goes away (-1 with
 * the reason in err). */
int model_follow(struct model *m, char *err, size_t errlen);

/* Whether the model can no longer run steps: a multi-node job whose
 * follower failed or went away (why says which node and how). Any
 * thread. */
int model_failed(const struct model *m, char *why, size_t n);

/* Whether model_launch returns before its step has run (a GPU). */
int model_async(const struct model *m);

/* Whether the forward pass runs on a GPU (the KV cache then lives there:
 * model_kv_geom says external). */
int model_on_device(const struct model *m);
/* The GPU's ceilings, measured now (a second or so): streaming read
 * bandwidth in bytes/s and the bf16 tensor-core rate in FLOP/s, and a
 * one-line description of the device. -1 on the CPU. */
int model_device_ceilings(struct model *m, double *bytes_per_s, double *flops, char *desc,
                          size_t desc_len);
/* The device's free and total memory in bytes; -1 on the CPU. */
int model_device_memory(const struct model *m, int64_t *free_bytes, int64_t *total_bytes);
/* Device memory model_prepare takes beyond the KV cache for steps of up
 * to max_rows rows over up to max_seqs sequences (activations, logits,
 * sampling, graphs); 0 on the CPU. */
int64_t model_step_bytes(const struct model *m, int64_t max_rows, int max_seqs);
/* Binds the device's KV storage to kv and allocates every per-step buffer
 * for steps of up to max_rows rows, max_seqs sequences and max_len tokens
 * per sequence, so that no step allocates; captures the decode graphs
 * (unless enforce_eager). Nothing to do on the CPU. A step beyond these
 * sizes, or over another kv, prepares again first (allocating then). */
int model_prepare(struct model *m, struct kv_cache *kv, int64_t max_rows, int max_seqs,
                  int64_t max_len, char *err, size_t errlen);

#endif
