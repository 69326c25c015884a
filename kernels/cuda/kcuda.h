/* kcuda.h: the one public header of the CUDA kernels.
 *
 * Launchers for every op of a model step on an NVIDIA GPU, callable from
 * C: the engine's CUDA backend calls them, and tests/gpu/ checks each one
 * against a CPU reference. Activations and weights are bf16 (stored as
 * uint16_t here so that C code needs no CUDA type), accumulation is fp32.
 *
 * The paged KV cache on the device, one pair of buffers per layer:
 *   k_cache, v_cache: (n_blocks, KC_BLOCK_TOKENS, n_kv_head, head_dim) bf16
 * A token's place in it is its slot: block * KC_BLOCK_TOKENS + offset. A
 * sequence's blocks are listed in its row of a block table:
 *   block_tables: (n_seqs, max_blocks) int32
 *
 * Every launcher enqueues work on stream s and returns 0, or the CUDA error
 * code of the launch (cudaGetLastError, checked right after the launch);
 * invalid arguments (negative sizes, head_dim not supported) return
 * cudaErrorInvalidValue without launching. Nothing here allocates device
 * memory except where a function says so, and nothing synchronizes, so the
 * decode step can be captured in a CUDA graph.
 */
#ifndef INFERD_KCUDA_H
#define INFERD_KCUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st *kc_stream; /* a cudaStream_t */
typedef uint16_t kc_bf16;              /* bfloat16 storage */

#define KC_BLOCK_TOKENS 16
#define KC_MAX_HEAD_DIM 256 /* head_dim in {64, 80, 96, 128, 256} */

/* ------------------------------------------------------------ elementwise */

/* RMSNorm, with the residual add fused in front (vLLM's
 * fused_add_rms_norm): when resid is not NULL, resid += x first and the
 * norm is taken of the sum (resid keeps the sum for the next layer);
 * otherwise of x. out = sum / sqrt(mean(sum^2) + eps) * w, computed in
 * fp32 in one fixed order per row (batch-invariant). x, out: (rows, dim);
 * w: (dim). out may alias x. */
int kc_rmsnorm(kc_stream s, kc_bf16 *out, kc_bf16 *resid, const kc_bf16 *x, const kc_bf16 *w,
               int64_t rows, int64_t dim, float eps);

/* Rotary embeddings on q and k in place, then k and v written to the paged
 * cache at slot[t] (a slot < 0 is skipped: padding). Every scaling the CPU
 * supports reduces to per-pair inverse frequencies computed on the host:
 *   inv_freq: (n_tables, rope_dim / 2) f32; table_idx: (n_tokens) int8,
 *   the table of each token (LongRoPE's short and long factors), or NULL
 *   for table 0; mscale multiplies cos and sin (LongRoPE's attention
 *   factor, 1 otherwise).
 * Only the first rope_dim dims of each head rotate. interleaved: pairs are
 * (2i, 2i+1) (GGUF llama); otherwise (i, i + rope_dim/2) (Hugging Face).
 * The angle is pos * inv_freq[i] in fp32, as on the CPU.
 * q: (n_tokens, n_head, head_dim); k, v: (n_tokens, n_kv_head, head_dim);
 * pos: (n_tokens) int32; slot: (n_tokens) int64. */
int kc_rope_kv_write(kc_stream s, kc_bf16 *q, kc_bf16 *k, const kc_bf16 *v, const int32_t *pos,
                     const int64_t *slot, int64_t n_tokens, int n_head, int n_kv_head,
                     int head_dim, int rope_dim, int interleaved, const float *inv_freq,
                     const int8_t *table_idx, float mscale, kc_bf16 *k_cache,
                     kc_bf16 *v_cache);

/* out = act(gate) * up, gate_up: (rows, 2 * n_ff) with gate in the first
 * n_ff columns and up in the rest (the fused gate_up projection's output);
 * out: (rows, n_ff). SiLU: g / (1 + exp(-g)). GELU: the tanh form. */
int kc_silu_mul(kc_stream s, kc_bf16 *out, const kc_bf16 *gate_up, int64_t rows, int64_t n_ff);
int kc_gelu_mul(kc_stream s, kc_bf16 *out, const kc_bf16 *gate_up, int64_t rows, int64_t n_ff);

/* out[r] = table[ids[r]]: (n, dim) from a (n_vocab, dim) table. An id
 * outside [0, n_vocab) gives a row of zeros (ids are checked on the host;
 * this only keeps a bad id from reading out of bounds). */
int kc_embed(kc_stream s, kc_bf16 *out, const kc_bf16 *table, const int32_t *ids, int64_t n,
             int64_t dim, int64_t n_vocab);
/* kc_embed over a tensor-parallel rank's slice of the vocabulary: table
 * holds rows [v0, v0 + n_rows) of the whole table, and out[r] is row
 * ids[r] - v0 of it, or zeros for an id the slice does not hold (another
 * rank's; summed across ranks after, every id gets its one row). */
int kc_embed_shard(kc_stream s, kc_bf16 *out, const kc_bf16 *table, const int32_t *ids,
                   int64_t n, int64_t dim, int64_t v0, int64_t n_rows);

/* The token ids of a step launched before the previous step's tokens
 * reached the host: every id -1 - k (k >= 0) is replaced in place by
 * prev[k], the previous step's k-th sampled token (still on the device);
 * other ids are left alone. A k >= n_prev gives -1 (then zeros from
 * kc_embed). */
int kc_resolve_tokens(kc_stream s, int32_t *ids, int64_t n, const int32_t *prev, int n_prev);

/* x[r][i] += bias[i]: (rows, dim). */
int kc_bias_add(kc_stream s, kc_bf16 *x, const kc_bf16 *bias, int64_t rows, int64_t dim);

/* Converts n floats to bf16 (round to nearest even) and back; for weight
 * conversion at load and for logits. */
int kc_f32_to_bf16(kc_stream s, kc_bf16 *out, const float *in, int64_t n);
int kc_bf16_to_f32(kc_stream s, float *out, const kc_bf16 *in, int64_t n);

/* ------------------------------------------------------------- attention */

/* Decode attention: one query row per sequence against its cached keys and
 * values (the current token's included: seq_lens[i] tokens, written by
 * kc_rope_kv_write before). GQA: query head h reads KV head
 * h / (n_head / n_kv_head). sliding_window > 0 limits each query to the
 * last sliding_window positions. q, out: (n_seqs, n_head, head_dim).
 * Long contexts are split along the sequence into n_splits parts whose
 * partial results (max, sum, weighted values) are merged in a fixed order;
 * n_splits = 0 picks one from the lengths, 1 is one pass per head (what
 * --deterministic uses: the result then does not depend on the batch).
 * workspace: kc_attn_decode_workspace(...) bytes of device memory (may be
 * NULL when n_splits == 1). */
size_t kc_attn_decode_workspace(int n_seqs, int n_head, int head_dim, int n_splits);
int kc_attn_decode(kc_stream s, kc_bf16 *out, const kc_bf16 *q, const kc_bf16 *k_cache,
                   const kc_bf16 *v_cache, const int32_t *block_tables, int max_blocks,
                   const int32_t *seq_lens, int n_seqs, int n_head, int n_kv_head, int head_dim,
                   float scale, int sliding_window, int n_splits, void *workspace);

/* Prefill and chunked prefill: the query rows of several sequences packed
 * one after the other; sequence i has cu_q_lens[i+1] - cu_q_lens[i] rows,
 * the last ones of its seq_lens[i] tokens (earlier chunks and prefix-cache
 * hits are already in the cache, and so are these rows' own keys). Causal:
 * row j of sequence i (position seq_lens[i] - q_len + j) sees positions
 * <= its own (and, with a sliding window, > position - sliding_window).
 * Tiled with an online softmax (FlashAttention-style), tensor cores for
 * the two products, fp32 accumulation, one fixed reduction order per row.
 * q, out: (cu_q_lens[n_seqs], n_head, head_dim). max_q_len bounds the
 * grid. */
int kc_attn_prefill(kc_stream s, kc_bf16 *out, const kc_bf16 *q, const kc_bf16 *k_cache,
                    const kc_bf16 *v_cache, const int32_t *block_tables, int max_blocks,
                    const int32_t *cu_q_lens, const int32_t *seq_lens, int n_seqs,
                    int max_q_len, int n_head, int n_kv_head, int head_dim, float scale,
                    int sliding_window);

/* -------------------------------------------------------------- sampling */

/* Sampling on the device, in the CPU sampler's order (engine/sampler.h):
 * logit_bias, repetition penalty (prompt + generated tokens), presence and
 * frequency penalties (generated tokens), logprobs taken there
 * (log-softmax at temperature 1), then greedy when temperature == 0, else
 * temperature, top_k, top_p, min_p, and a draw from a counter-based RNG
 * (Philox) keyed by (seed, step), so a request samples the same tokens
 * whatever the batch. Only token ids and the logprobs asked for come back
 * to the host. */
struct kc_samp_row {
    float temperature, top_p, min_p;
    float presence_penalty, frequency_penalty, repetition_penalty;
    int32_t top_k;        /* <= 0: off */
    int32_t n_top_logprobs; /* 0..20 */
    uint64_t seed;
    uint64_t step;        /* tokens this sample has generated so far */
};
/* The tokens a row's penalties and bias read, as CSR lists (offsets have
 * rows + 1 entries; a NULL offsets array means none for any row):
 *   seen: generated tokens with their counts (presence/frequency, and
 *         repetition);
 *   prompt: prompt tokens (repetition only; unique ids);
 *   bias: (token, bias) pairs, bias already clamped to [-100, 100]. */
struct kc_samp_lists {
    const int32_t *seen_off, *seen_tok, *seen_cnt;
    const int32_t *prompt_off, *prompt_tok;
    const int32_t *bias_off, *bias_tok;
    const float *bias_val;
};
/* logits: (rows, n_vocab) f32, modified in place (bias and penalties
 * applied). Outputs per row: token[r]; logprob[r] of the chosen token;
 * top_tok / top_lp: (rows, 20) the most likely tokens, sorted by logprob
 * then id (n_top_logprobs of them are valid). workspace:
 * kc_sample_workspace(rows, n_vocab) bytes. */
size_t kc_sample_workspace(int rows, int64_t n_vocab);
int kc_sample(kc_stream s, float *logits, int rows, int64_t n_vocab,
              const struct kc_samp_row *params, const struct kc_samp_lists *lists,
              int32_t *token, float *logprob, int32_t *top_tok, float *top_lp, void *workspace);

/* ----------------------------------------------------------------- GEMMs */

/* y = x W^T through cuBLASLt: x (m, k) bf16 row-major, W (n, k) bf16
 * row-major (a Hugging Face weight as stored), y (m, n) bf16, fp32
 * accumulation. A kc_gemm owns a cuBLASLt handle, a workspace and a cache
 * of the algorithm chosen per (m, n, k); deterministic: one algorithm for
 * every m of a given (n, k), no split-K, so a row's result does not depend
 * on the batch (slower for small m). Returns NULL when cuBLASLt cannot be
 * set up (no device). Allocates its workspace on the device. */
struct kc_gemm;
struct kc_gemm *kc_gemm_create(int deterministic);
void kc_gemm_destroy(struct kc_gemm *g);
int kc_gemm(struct kc_gemm *g, kc_stream s, kc_bf16 *y, const kc_bf16 *x, const kc_bf16 *w,
            int64_t m, int64_t n, int64_t k);

/* --------------------------------------------------------- dummy weights */

/* --load-format dummy on the device: the random bf16 weights of
 * engine/dummy.h made in place from a tensor's start state (struct
 * dummy_fill), the same bits the host would make: element i takes 16-bit
 * lane i % 4 (from the low bits) of splitmix64 draw i / 4 of that state,
 * sign = bit 15, exponent = 118 + bits 7..8, mantissa = bits 0..6.
 * dst: (n) bf16. */
int kc_fill_dummy_bf16(kc_stream s, kc_bf16 *dst, int64_t n, uint64_t state);
/* dst[i] = value for i < n (norm weights of one, biases of zero). */
int kc_fill_bf16(kc_stream s, kc_bf16 *dst, int64_t n, kc_bf16 value);

/* -------------------------------------------------------------- ceilings */

/* Measured on the device in use, for benchmarks to print next to their
 * figures: the read bandwidth of a streaming kernel over bytes bytes
 * (GB/s), and the bf16 tensor-core rate of a large cuBLASLt GEMM
 * (TFLOP/s). Each allocates what it needs, synchronizes and frees it.
 * Return < 0 on failure. */
double kc_measure_bandwidth_gbs(size_t bytes);
double kc_measure_bf16_tflops(int64_t m, int64_t n, int64_t k);

/* ---------------------------------------------------------------- device */

/* The number of usable CUDA devices (0 when there is no driver or no
 * device: never an error), and a one-line description of device i. */
int kc_device_count(void);
int kc_device_describe(int i, char *buf, size_t n);
/* The message of a CUDA error code returned above. */
const char *kc_error_string(int code);

/* The runtime calls a backend needs, wrapped so that code outside
 * kernels/ includes no CUDA header. Each returns 0 or the CUDA error code
 * (kc_error_string says what it means); frees accept NULL. */
typedef struct CUevent_st *kc_event;
int kc_set_device(int i);
int kc_malloc(void **p, size_t bytes);      /* device memory */
void kc_free(void *p);
int kc_malloc_host(void **p, size_t bytes); /* pinned host memory */
void kc_free_host(void *p);
int kc_stream_create(kc_stream *s);         /* a non-blocking stream */
void kc_stream_destroy(kc_stream s);
int kc_stream_sync(kc_stream s);
int kc_event_create(kc_event *e);           /* timing disabled */
void kc_event_destroy(kc_event e);
int kc_event_record(kc_event e, kc_stream s);
int kc_event_sync(kc_event e);
int kc_copy_h2d(kc_stream s, void *dst, const void *src, size_t bytes);
int kc_copy_d2h(kc_stream s, void *dst, const void *src, size_t bytes);
/* height rows of width bytes, from rows spitch bytes apart to rows
 * dpitch bytes apart, device to device. */
int kc_copy_2d_d2d(kc_stream s, void *dst, size_t dpitch, const void *src, size_t spitch,
                   size_t width, size_t height);
int kc_copy_2d_h2d(kc_stream s, void *dst, size_t dpitch, const void *src, size_t spitch,
                   size_t width, size_t height);
int kc_memset(kc_stream s, void *dst, int value, size_t bytes);
/* Free and total memory of the current device, in bytes. */
int kc_mem_info(size_t *free_bytes, size_t *total_bytes);

/* CUDA graphs: kc_capture_begin starts recording the work enqueued on s
 * (nothing runs), kc_capture_end stops and instantiates it; kc_graph_launch
 * replays it on s with the same pointers and sizes, and one CPU call
 * instead of one per kernel. Only work that allocates nothing and does not
 * synchronize can be captured (every launcher above qualifies). */
typedef struct CUgraphExec_st *kc_graph;
int kc_capture_begin(kc_stream s);
int kc_capture_end(kc_stream s, kc_graph *out);
int kc_graph_launch(kc_graph g, kc_stream s);
void kc_graph_destroy(kc_graph g);

/* ------------------------------------------------------------------ NCCL */

/* NCCL: the collectives across GPUs, wrapped so that the engine's
 * communicator (engine/comm_nccl.c) includes no NCCL or CUDA header.
 * Implemented in nccl.c, built only when NCCL is found (the engine then
 * has INFERD_NCCL): nothing else may call these. Thin: each is one NCCL
 * call and returns its ncclResult_t as an int, KC_NCCL_SUCCESS or an
 * error code (kc_nccl_error_string says what it means); a communicator
 * made nonblocking answers KC_NCCL_IN_PROGRESS until the call's host side
 * is done (kc_nccl_async_error says when). */
typedef struct ncclComm *kc_nccl_comm; /* an ncclComm_t */

#define KC_NCCL_ID_BYTES 128  /* NCCL_UNIQUE_ID_BYTES */
#define KC_NCCL_SUCCESS 0     /* ncclSuccess */
#define KC_NCCL_IN_PROGRESS 7 /* ncclInProgress */
#define KC_CUDA_NOT_READY 600 /* cudaErrorNotReady */

/* The name of an NCCL result code (ncclGetErrorString), and the last
 * error NCCL recorded for c (ncclGetLastError; may be empty). Static
 * strings: not freed. */
const char *kc_nccl_error_string(int res);
const char *kc_nccl_last_error(kc_nccl_comm c);

/* Fills out (KC_NCCL_ID_BYTES bytes) with a fresh ncclUniqueId. */
int kc_nccl_unique_id(void *out);
/* ncclCommInitRankConfig: rank of nranks, the group named by id
 * (KC_NCCL_ID_BYTES bytes, borrowed), on the calling thread's current
 * device; blocking 0 makes the communicator nonblocking. *out is the
 * handle even when the result is an error or KC_NCCL_IN_PROGRESS (then
 * kc_nccl_abort frees it). */
int kc_nccl_comm_init(kc_nccl_comm *out, int nranks, const void *id, int rank, int blocking);
/* ncclCommGetAsyncError: *state is KC_NCCL_SUCCESS, KC_NCCL_IN_PROGRESS
 * (an operation's host side still running) or the error that broke c. */
int kc_nccl_async_error(kc_nccl_comm c, int *state);
/* ncclCommFinalize (flushes what was issued; nonblocking: poll with
 * kc_nccl_async_error), then ncclCommDestroy (frees c); ncclCommAbort
 * frees c at once, whatever its state. */
int kc_nccl_finalize(kc_nccl_comm c);
int kc_nccl_destroy(kc_nccl_comm c);
int kc_nccl_abort(kc_nccl_comm c);

/* Collectives enqueued on stream s, every rank of c calling each with the
 * same counts; recv may alias send (in place). Sums of n f32, int32 or
 * bf16 elements (ncclAllReduce, ncclSum); recv: (nranks, n_per_rank) f32,
 * rank r's send in row r (ncclAllGather); bytes bytes of root's send in
 * every rank's recv (ncclBroadcast). */
int kc_nccl_allreduce_sum_f32(kc_nccl_comm c, kc_stream s, float *recv, const float *send,
                              size_t n);
int kc_nccl_allreduce_sum_i32(kc_nccl_comm c, kc_stream s, int32_t *recv, const int32_t *send,
                              size_t n);
int kc_nccl_allreduce_sum_bf16(kc_nccl_comm c, kc_stream s, kc_bf16 *recv, const kc_bf16 *send,
                               size_t n);
int kc_nccl_allgather_f32(kc_nccl_comm c, kc_stream s, float *recv, const float *send,
                          size_t n_per_rank);
int kc_nccl_broadcast(kc_nccl_comm c, kc_stream s, void *recv, const void *send, size_t bytes,
                      int root);

/* Whether the work enqueued on s has finished, without waiting
 * (cudaStreamQuery): 0 done, KC_CUDA_NOT_READY not yet, else a CUDA error
 * code (kc_error_string). Here, not among the runtime wrappers, because
 * only the communicator's polling wait (which also watches NCCL's
 * asynchronous error) needs it. */
int kc_nccl_stream_query(kc_stream s);
/* The same for one event (cudaEventQuery): the work before it is done. */
int kc_nccl_event_query(kc_event e);

#ifdef __cplusplus
}
#endif

#endif
