/* model_internal.h: the loaded model's insides, shared by model.c (the
 * CPU forward pass) and model_cuda.c (the CUDA one). Not for other
 * modules: they go through model.h. Engine thread only. */
#ifndef INFERD_MODEL_INTERNAL_H
#define INFERD_MODEL_INTERNAL_H

#include <pthread.h>

#include "engine/model.h"

struct model_cuda;


struct layer {
    float *attn_norm;          /* (n_embd) */
    struct k_matrix wqkv;      /* fused: ((n_head + 2 n_head_kv) hd, n_embd) */
    struct k_matrix wq;        /* (n_head hd, n_embd) */
    struct k_matrix wk, wv;    /* (n_head_kv hd, n_embd) */
    float *bq, *bk, *bv;       /* biases or NULL */
    struct k_matrix wo;        /* (n_embd, n_head hd) */
    float *ffn_norm;           /* (n_embd) */
    struct k_matrix wgate_up;  /* fused: (2 n_ff, n_embd), gate rows first */
    struct k_matrix wgate, wup;/* (n_ff, n_embd) */
    struct k_matrix wdown;     /* (n_embd, n_ff) */
    /* A GPU tensor-parallel rank's wo and wdown are the whole matrices
     * and its input columns start here (its n_head * head_dim and n_ff of
     * them), sliced as they go to the device; 0 otherwise. */
    int64_t wo_c0, wdown_c0;
};

struct model {
    struct model_config cfg;
    char path[1024];
    struct gguf_file *gguf;
    struct st_model *st;
    struct dummy_model *dummy;
    struct model_cuda *cuda;   /* weights on the GPU (--device cuda), or NULL */
    struct k_pool *pool;
    struct layer *layers;      /* (n_layer) */
    struct k_matrix tok_embd;  /* (n_vocab, n_embd) */
    struct k_matrix output;    /* (n_vocab, n_embd); tok_embd when tied */
    float *out_norm;           /* (n_embd) */
    void **owned;              /* f32 copies of small vectors and repacked
                                * weights, freed at destroy */
    size_t n_owned, cap_owned;
    struct model_stats stats;
    /* Where this model's KV heads sit in the cache's token rows: kv_stride
     * heads per row, its own from kv_head0 (n_head_kv and 0, unless it is
     * a tensor-parallel rank). */
    int64_t kv_stride, kv_head0;
    /* Tensor parallelism (model_tp.c). The model model_load returns holds
     * tp rank models, each computing its shard on its own thread with a
     * communicator; a rank model borrows the weights' memory from it. */
    int tp;                    /* ranks: 1 without tensor parallelism */
    struct model **rank;       /* (tp) rank models, or NULL */
    struct tp_runner *runner;  /* the rank threads */
    struct comm_group *group;  /* the ranks' communicator: one process */
    struct comm_tcp_group *tcp_group; /* or several (multi-node) */
    struct tp_shards *shards;  /* the plan's per-rank ranges */
    struct comm *comm;         /* a rank model's communicator, else NULL */
    const struct tp_shards *tp_shared; /* a rank model's: the main model's plan */
    int64_t vocab0;            /* first embedding / LM head row held */
    int tp_rank;               /* a rank model's global rank */
    int64_t vocab_all;         /* a rank model's: the whole vocabulary (its
                                * cfg.n_vocab is its slice); 0 otherwise */
    struct dummy_model *dummy_view; /* a rank model's: the main model's
                                * random weights (borrowed), or NULL */
    struct tp_gpu *tpg;        /* tensor parallelism over GPUs
                                * (model_tp_cuda.c), or NULL */
    float *tp_logits, *tp_gather; /* a rank's logits, and everyone's */
    struct tp_node *node;      /* multi-node: the control plane (model_node.c) */
    int64_t tp_rank0;          /* global rank of this process's first rank */
    int n_local;               /* ranks in this process (tp / nnodes) */
    int64_t node_kv_blocks;    /* the KV cache the followers were told of */
    int64_t cap_tp_rows;
    /* launch/collect (model.h) on the CPU: the last launch's sampled
     * tokens (what MODEL_TOKEN_PREV names) and the launches not collected */
    int32_t *prev_tok;
    int64_t n_prev, cap_prev;
    int uncollected;
    struct model_row *rows_tmp; /* (cap_rows_tmp) rows with placeholders resolved */
    int64_t cap_rows_tmp;

    /* Activations, grown to the largest batch seen. */
    int64_t cap_rows;
    float *x;        /* (rows, n_embd) residual stream */
    float *h;        /* (rows, n_embd) normed input / projection output */
    float *qkv;      /* (rows, (n_head + 2 n_head_kv) hd) */
    float *att;      /* (rows, n_head hd) */
    float *gu;       /* (rows, 2 n_ff) gate then up */
    float *act;      /* (rows, n_ff) */
    float *rope_cs;  /* (rows, rope_dim/2, 2) cos, sin */
    void *mm_scratch;
    size_t mm_scratch_bytes;
    float *att_scores; /* (n_threads, n_head / n_head_kv, n_ctx) */
};


/* model.c: validates a batch as model_forward documents it; next[seq]
 * gets each sequence's length after the batch. */
int model_check_batch(struct model *m, struct kv_cache *kv, const struct model_row *rows,
                      int64_t n, int64_t n_prev, int64_t *next, char *err, size_t errlen);

/* model.c: the forward pass over validated rows (model_forward without
 * the checks and the cache bookkeeping); a rank model sums with its peers. */
int model_forward_body(struct model *m, struct kv_cache *kv, const struct model_row *rows,
                       int64_t n, float *logits, char *err, size_t errlen);

/* model_tp.c: splits a loaded model into tp rank models (tp_plan.h) and
 * starts their threads; runs a step on every rank (rank 0 on the calling
 * thread), logits gathered into logits; a rank model's LM head (its vocab
 * rows, all-gathered: rank 0 gets every row in logits); frees it all. */
int model_tp_create(struct model *m, int tp, int n_threads, const struct model_opts *o,
                    char *err, size_t errlen);
int model_tp_forward(struct model *m, struct kv_cache *kv, const struct model_row *rows,
                     int64_t n, float *logits, char *err, size_t errlen);
int model_tp_logits(struct model *m, int64_t nw, float *logits, char *err, size_t errlen);
void model_tp_destroy(struct model *m);
/* The nodes of a tensor-parallel job (model_opts: nnodes, node_rank,
 * master_port), checked: tp splits evenly, the rank and port are in range,
 * tp at most TP_MAX. */
int model_tp_nodes(int tp, const struct model_opts *o, int *nnodes, int *node, char *err,
                   size_t errlen);
/* Starts fn on a thread for each rank first .. n - 1 (th[r], started[r]
 * set), its argument a malloc'd struct tp_thread_arg (ctx, r) that fn
 * frees. */
struct tp_thread_arg {
    void *ctx;
    int r;
};
int model_tp_threads(int first, int n, void *(*fn)(void *), void *ctx, pthread_t *th,
                     int *started, char *err, size_t errlen);
/* Makes m's sharding plan for tp ranks (m->shards), or refuses the shape
 * with the reason. */
int model_tp_plan_make(struct model *m, int tp, char *err, size_t errlen);
/* The sharding plan: the main model's, or a rank model's (the main
 * model's too). */
const struct tp_plan *model_tp_plan(const struct model *rm);
/* model_tp.c builds rank r's model; gpu: wo and wdown stay whole (their
 * columns start at wo_c0 / wdown_c0), no host copy is made. */
int model_tp_make_rank(struct model *m, int r, int threads, struct comm *comm, int gpu,
                       struct model **out, char *err, size_t errlen);

#ifdef INFERD_CUDA
/* model_tp_cuda.c: tensor parallelism over the GPUs of this process: one
 * thread per GPU, each owning its rank model, its model_cuda and its NCCL
 * communicator; the engine thread hands them each call and waits. The
 * model.h calls of a model with tpg set come here. */
int mtc_create(struct model *m, int tp, const struct model_opts *o, char *err, size_t errlen);
void mtc_destroy(struct model *m);
int mtc_launch(struct model *m, struct kv_cache *kv, const struct model_row *rows, int64_t n,
               float *logits, struct model_sample *samples, int64_t n_samples, char *err,
               size_t errlen);
int mtc_collect(struct model *m, char *err, size_t errlen);
int mtc_prepare(struct model *m, struct kv_cache *kv, int64_t max_rows, int max_seqs,
                int64_t max_len, char *err, size_t errlen);
int mtc_memory(const struct model *m, int64_t *free_bytes, int64_t *total_bytes);
int64_t mtc_step_bytes(const struct model *m, int64_t max_rows, int max_seqs);
int mtc_ceilings(struct model *m, double *bytes_per_s, double *flops, char *desc,
                 size_t desc_len);
struct kv_geom mtc_kv_geom(const struct model *m);
int mtc_failed(const struct model *m, char *why, size_t n);
/* A follower node: its ranks join the job's NCCL communicator (the id
 * from the leader's WELCOME). */
int mtc_join(struct model *m, const void *nccl_id, char *err, size_t errlen);
#endif

/* model_node.c: the control plane of a multi-node job. The leader accepts
 * every follower's HELLO; sends each step (STEP) before its own ranks run
 * it and waits for every STEP_DONE after, oldest first (the first step, or
 * on GPUs the first prepare, also sends WELCOME); a follower says HELLO. A failure stops the job: every later
 * step fails with the first reason, and the communicator is aborted. */
int model_node_leader(struct model *m, int nnodes, const char *addr, int port, char *err,
                      size_t errlen);
int model_node_follower(struct model *m, int nnodes, int node_rank, const char *addr,
                        int port, char *err, size_t errlen);
/* WELCOME: the cache's size; on GPUs also the sizes every node prepares
 * its step buffers for and the NCCL id (0, 0 and NULL on the CPU). */
int model_node_welcome(struct model *m, struct kv_cache *kv, int64_t max_rows, int64_t max_len,
                       const void *nccl_id, char *err, size_t errlen);
/* STEP: the rows, and on GPUs the want rows rank 0 samples, in order. */
int model_node_step_begin(struct model *m, struct kv_cache *kv, const struct model_row *rows,
                          int64_t n, const struct model_sample *samples, int64_t n_samples,
                          char *err, size_t errlen);
/* Whether the other nodes' control connections are still there (the
 * leader: every follower's; a follower: the leader's), without waiting;
 * a closed one stops the job: -1 with the reason. */
int model_node_watch(struct model *m, char *why, size_t n);
/* The leader: the followers' fullest GPU (from their HELLO), or -1. */
int model_node_peer_memory(const struct model *m, int64_t *free_bytes, int64_t *total_bytes);
int model_node_step_end(struct model *m, char *err, size_t errlen);
void model_node_destroy(struct model *m);

#ifdef INFERD_CUDA
/* model_cuda.c: the weights on the device (bf16), and the forward pass
 * there; logits come back to the host as f32, so the engine's sampler and
 * everything after it are the same as on the CPU. */
/* device: the GPU (this thread's current one after). A tensor-parallel
 * rank model (m->tp_shared set) holds its shard: its communicator
 * (m->comm, created after on mcu_stream) sums the activations and
 * gathers the logits; only rank 0 samples and returns results. */
int mcu_create(struct model *m, int device, int deterministic, int enforce_eager,
               struct model_cuda **out, char *err, size_t errlen);
void *mcu_stream(struct model_cuda *c);
void mcu_destroy(struct model_cuda *c);
/* set_len: advance the sequences' lengths in kv (0 for tensor-parallel
 * ranks, which share kv: their caller does it once). */
int mcu_launch(struct model *m, struct kv_cache *kv, const struct model_row *rows, int64_t n,
               float *logits, struct model_sample *samples, int64_t n_samples, int set_len,
               char *err, size_t errlen);
int mcu_collect(struct model *m, char *err, size_t errlen);
int mcu_memory(int64_t *free_bytes, int64_t *total_bytes);
int mcu_ceilings(int device, double *bytes_per_s, double *flops, char *desc, size_t desc_len);
int64_t mcu_step_bytes(const struct model *m, int64_t max_rows, int max_seqs);
int mcu_prepare(struct model *m, struct kv_cache *kv, int64_t max_rows, int max_seqs,
                int64_t max_len, char *err, size_t errlen);
#endif

#endif
