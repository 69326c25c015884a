/* ctl.h: the control-plane messages between a multi-node deployment's
 * leader and its followers, as proto/control.md defines them (version 2):
 * encoding into a caller's buffer and decoding with every check the text
 * asks for, so a malformed or hostile message is refused with a message
 * saying what was wrong, never read past its end. Pure functions of their
 * arguments (no I/O, no allocation but ctl_buf's growth); any thread.
 */
#ifndef INFERD_CTL_H
#define INFERD_CTL_H

#include <stddef.h>
#include <stdint.h>

#include "engine/model.h"

#define CTL_MAGIC 0x43464E49u /* "INFC" */
#define CTL_VERSION 2
#define CTL_HEADER_BYTES 16
#define CTL_MAX_PAYLOAD ((uint32_t)64 << 20)
#define CTL_MAX_ROWS (1 << 20)
#define CTL_MAX_SEQS 65536
#define CTL_MAX_BLOCKS (1 << 20)
#define CTL_MAX_MESSAGE 1024
#define CTL_NCCL_ID_BYTES 128
#define CTL_MAX_LEN ((uint64_t)1 << 40) /* WELCOME's max_len bound, in tokens */

/* HELLO flags */
#define CTL_HELLO_CUDA 1u /* this node's ranks run on GPUs (--device cuda) */

enum ctl_type {
    CTL_HELLO = 1,
    CTL_WELCOME = 2,
    CTL_REFUSE = 3,
    CTL_STEP = 4,
    CTL_STEP_DONE = 5,
    CTL_SHUTDOWN = 6,
};

enum ctl_refuse_code {
    CTL_REFUSE_VERSION = 1,
    CTL_REFUSE_DUPLICATE = 2,
    CTL_REFUSE_SIZES = 3,
    CTL_REFUSE_MODEL = 4,
};

struct ctl_header {
    uint16_t version, type;
    uint32_t seq, length;
};

/* A growable byte buffer the encoders append to. */
struct ctl_buf {
    uint8_t *p;
    size_t len, cap;
};
void ctl_buf_free(struct ctl_buf *b);

/* Checks the 16 header bytes h: magic, version, a type in 1..6, length at
 * most CTL_MAX_PAYLOAD, seq equal to want_seq. Fills *out. Returns 0, or
 * -1 with the reason in err. */
int ctl_header_decode(const uint8_t h[CTL_HEADER_BYTES], uint32_t want_seq,
                      struct ctl_header *out, char *err, size_t errlen);

struct ctl_hello {
    uint16_t node_rank, nnodes, tp;
    uint16_t flags; /* CTL_HELLO_* */
    uint64_t fingerprint;
    uint64_t gpu_free, gpu_total; /* bytes: the least free memory among the
                                   * node's GPUs after its weights, and that
                                   * GPU's total; 0 on the CPU */
};

struct ctl_welcome {
    uint64_t kv_blocks;
    uint32_t max_seqs, flags;
    uint8_t nccl_id[CTL_NCCL_ID_BYTES];
    uint64_t max_rows, max_len; /* the step buffers every node prepares: the
                                 * most rows in a step, the longest sequence
                                 * in tokens; 0 on the CPU */
};

/* REFUSE, STEP_DONE and SHUTDOWN carry a message: text points into the
 * decoded payload (not terminated), n_text bytes. */
struct ctl_refuse {
    uint16_t code;
    const char *text;
    size_t n_text;
};

struct ctl_step_done {
    uint64_t step_id;
    int32_t status;
    const char *text;
    size_t n_text;
};

struct ctl_seq {
    int32_t seq;
    uint32_t rope_long;
    int64_t len_after;
    uint32_t n_blocks;
    const uint8_t *blocks; /* n_blocks little-endian i32 in the payload:
                            * ctl_block reads entry i */
};

struct ctl_step {
    uint64_t step_id;
    uint32_t n_rows, n_seqs, n_samples;
    const uint8_t *rows;    /* n_rows x 20 bytes in the payload: ctl_row */
    const uint8_t *samples; /* n_samples x 4 bytes in the payload:
                             * ctl_sample_row */
    struct ctl_seq *seqs;   /* (n_seqs) decoded; caller frees (ctl_step_free) */
};

/* Each encoder appends one whole message (header with seq, and payload)
 * to b. Returns 0, or -1 when memory runs out or a field is out of range
 * (err says which). */
int ctl_encode_hello(struct ctl_buf *b, uint32_t seq, const struct ctl_hello *m, char *err,
                     size_t errlen);
int ctl_encode_welcome(struct ctl_buf *b, uint32_t seq, const struct ctl_welcome *m, char *err,
                       size_t errlen);
int ctl_encode_refuse(struct ctl_buf *b, uint32_t seq, uint16_t code, const char *text,
                      char *err, size_t errlen);
int ctl_encode_step_done(struct ctl_buf *b, uint32_t seq, uint64_t step_id, int32_t status,
                         const char *text, char *err, size_t errlen);
int ctl_encode_shutdown(struct ctl_buf *b, uint32_t seq, const char *why, char *err,
                        size_t errlen);
/* STEP from a batch: rows as model_launch takes them (tokens >= 0 or
 * MODEL_TOKEN_PREV(k), k < CTL_MAX_ROWS); of samples (NULL when n_samples
 * is 0) only each row, a want_logits row index, distinct, is sent; for
 * each distinct sequence of the rows, in first-appearance order, its block
 * table and length after the step from kv (the leader's cache). kv_blocks
 * bounds the block ids (what the followers allocated). */
int ctl_encode_step(struct ctl_buf *b, uint32_t seq, uint64_t step_id,
                    const struct model_row *rows, int64_t n_rows,
                    const struct model_sample *samples, int64_t n_samples, struct kv_cache *kv,
                    char *err, size_t errlen);

/* Decoders take one message's payload (length bytes) and check it as
 * proto/control.md says, against kv_blocks for STEP. Pointers in the
 * results point into payload. Return 0, or -1 with the reason in err. */
int ctl_decode_hello(const uint8_t *payload, uint32_t length, struct ctl_hello *out, char *err,
                     size_t errlen);
int ctl_decode_welcome(const uint8_t *payload, uint32_t length, struct ctl_welcome *out,
                       char *err, size_t errlen);
int ctl_decode_refuse(const uint8_t *payload, uint32_t length, struct ctl_refuse *out,
                      char *err, size_t errlen);
int ctl_decode_step_done(const uint8_t *payload, uint32_t length, struct ctl_step_done *out,
                         char *err, size_t errlen);
int ctl_decode_shutdown(const uint8_t *payload, uint32_t length, struct ctl_refuse *out,
                        char *err, size_t errlen);
int ctl_decode_step(const uint8_t *payload, uint32_t length, uint64_t kv_blocks,
                    struct ctl_step *out, char *err, size_t errlen);
void ctl_step_free(struct ctl_step *s);

/* Row i of a decoded STEP (its token may be MODEL_TOKEN_PREV(k): the
 * follower checks k against the previous step's n_samples), sample i's
 * want-row index, and entry i of a sequence's block table. */
struct model_row ctl_row(const struct ctl_step *s, uint32_t i);
uint32_t ctl_sample_row(const struct ctl_step *s, uint32_t i);
int32_t ctl_block(const struct ctl_seq *q, uint32_t i);

/* The model's shape, hashed (FNV-1a 64): a follower and its leader must
 * agree on it. */
uint64_t ctl_fingerprint(const struct model_config *c);

#endif
