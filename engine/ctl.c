/* ctl.c: the control-plane messages (ctl.h, proto/control.md). Every
 * field is read through rd_* from a cursor that knows how many bytes are
 * left, so a short or lying payload ends in a message, never past the
 * buffer. */
#include "engine/ctl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kv_cache.h"

/* ------------------------------------------------------------ writing */

void ctl_buf_free(struct ctl_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static int grow(struct ctl_buf *b, size_t more)
{
    if (b->len + more <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more)
        cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static void put(struct ctl_buf *b, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++)
        b->p[b->len++] = (uint8_t)(v >> (8 * i));
}

/* Starts a message: reserves the header, whose length begin_end fills. */
static int begin(struct ctl_buf *b, uint16_t type, uint32_t seq, size_t payload, size_t *at)
{
    if (payload > CTL_MAX_PAYLOAD || grow(b, CTL_HEADER_BYTES + payload))
        return -1;
    *at = b->len;
    put(b, CTL_MAGIC, 4);
    put(b, CTL_VERSION, 2);
    put(b, type, 2);
    put(b, seq, 4);
    put(b, payload, 4);
    return 0;
}

static int oom(char *err, size_t errlen, const char *what)
{
    snprintf(err, errlen, "control message %s: out of memory or over %u bytes", what,
             (unsigned)CTL_MAX_PAYLOAD);
    return -1;
}

static size_t text_len(const char *text)
{
    size_t n = text ? strlen(text) : 0;
    return n > CTL_MAX_MESSAGE ? CTL_MAX_MESSAGE : n;
}

static void put_text(struct ctl_buf *b, const char *text, size_t n)
{
    put(b, n, 2);
    if (n)
        memcpy(b->p + b->len, text, n);
    b->len += n;
}

int ctl_encode_hello(struct ctl_buf *b, uint32_t seq, const struct ctl_hello *m, char *err,
                     size_t errlen)
{
    size_t at;
    if (begin(b, CTL_HELLO, seq, 32, &at))
        return oom(err, errlen, "HELLO");
    put(b, m->node_rank, 2);
    put(b, m->nnodes, 2);
    put(b, m->tp, 2);
    put(b, m->flags, 2);
    put(b, m->fingerprint, 8);
    put(b, m->gpu_free, 8);
    put(b, m->gpu_total, 8);
    return 0;
}

int ctl_encode_welcome(struct ctl_buf *b, uint32_t seq, const struct ctl_welcome *m, char *err,
                       size_t errlen)
{
    size_t at;
    if (begin(b, CTL_WELCOME, seq, 32 + CTL_NCCL_ID_BYTES, &at))
        return oom(err, errlen, "WELCOME");
    put(b, m->kv_blocks, 8);
    put(b, m->max_seqs, 4);
    put(b, m->flags, 4);
    memcpy(b->p + b->len, m->nccl_id, CTL_NCCL_ID_BYTES);
    b->len += CTL_NCCL_ID_BYTES;
    put(b, m->max_rows, 8);
    put(b, m->max_len, 8);
    return 0;
}

int ctl_encode_refuse(struct ctl_buf *b, uint32_t seq, uint16_t code, const char *text,
                      char *err, size_t errlen)
{
    size_t at, n = text_len(text);
    if (begin(b, CTL_REFUSE, seq, 4 + n, &at))
        return oom(err, errlen, "REFUSE");
    put(b, code, 2);
    put_text(b, text, n);
    return 0;
}

int ctl_encode_step_done(struct ctl_buf *b, uint32_t seq, uint64_t step_id, int32_t status,
                         const char *text, char *err, size_t errlen)
{
    size_t at, n = status == 0 ? 0 : text_len(text);
    if (begin(b, CTL_STEP_DONE, seq, 14 + n, &at))
        return oom(err, errlen, "STEP_DONE");
    put(b, step_id, 8);
    put(b, (uint32_t)status, 4);
    put_text(b, text, n);
    return 0;
}

int ctl_encode_shutdown(struct ctl_buf *b, uint32_t seq, const char *why, char *err,
                        size_t errlen)
{
    size_t at, n = text_len(why);
    if (begin(b, CTL_SHUTDOWN, seq, 2 + n, &at))
        return oom(err, errlen, "SHUTDOWN");
    put_text(b, why, n);
    return 0;
}

int ctl_encode_step(struct ctl_buf *b, uint32_t seq, uint64_t step_id,
                    const struct model_row *rows, int64_t n_rows,
                    const struct model_sample *samples, int64_t n_samples, struct kv_cache *kv,
                    char *err, size_t errlen)
{
    if (n_rows < 1 || n_rows > CTL_MAX_ROWS) {
        snprintf(err, errlen, "STEP: %lld rows (1 .. %d)", (long long)n_rows, CTL_MAX_ROWS);
        return -1;
    }
    if (n_samples < 0 || n_samples > n_rows) {
        snprintf(err, errlen, "STEP: %lld samples of %lld rows", (long long)n_samples,
                 (long long)n_rows);
        return -1;
    }
    /* the distinct sequences, first appearance first, and each one's
     * length after the step */
    int max_seqs = kv_max_seqs(kv);
    int32_t *order = malloc((size_t)n_rows * sizeof(*order));
    int64_t *len_after = calloc((size_t)max_seqs, sizeof(*len_after));
    char *seen = calloc((size_t)max_seqs, 1);
    char *drawn = calloc((size_t)n_rows, 1); /* want-row index -> sampled */
    int rc = -1;
    if (!order || !len_after || !seen || !drawn) {
        oom(err, errlen, "STEP");
        goto done;
    }
    uint32_t n_seqs = 0;
    int64_t n_want = 0;
    size_t payload = 24 + 20 * (size_t)n_rows + 4 * (size_t)n_samples;
    for (int64_t r = 0; r < n_rows; r++) {
        int s = rows[r].seq;
        if (s < 0 || s >= max_seqs || !kv_seq_valid(kv, s)) {
            snprintf(err, errlen, "STEP: row %lld names sequence %d, not open", (long long)r, s);
            goto done;
        }
        if (rows[r].token < -CTL_MAX_ROWS) {
            snprintf(err, errlen, "STEP: row %lld: token %d is neither a token nor a placeholder",
                     (long long)r, rows[r].token);
            goto done;
        }
        n_want += rows[r].want_logits ? 1 : 0;
        if (rows[r].pos + 1 > len_after[s])
            len_after[s] = rows[r].pos + 1;
        if (!seen[s]) {
            seen[s] = 1;
            order[n_seqs++] = s;
        }
    }
    if (n_seqs > CTL_MAX_SEQS) {
        snprintf(err, errlen, "STEP: %u sequences (at most %d)", n_seqs, CTL_MAX_SEQS);
        goto done;
    }
    for (int64_t k = 0; k < n_samples; k++) {
        int64_t w = samples[k].row;
        if (w < 0 || w >= n_want || drawn[w]) {
            snprintf(err, errlen, "STEP: sample %lld draws from want row %lld (of %lld)%s",
                     (long long)k, (long long)w, (long long)n_want,
                     w >= 0 && w < n_want ? ", drawn twice" : "");
            goto done;
        }
        drawn[w] = 1;
    }
    for (uint32_t i = 0; i < n_seqs; i++) {
        int64_t need = (len_after[order[i]] + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS;
        payload += 20 + 4 * (size_t)need;
    }
    size_t at;
    if (begin(b, CTL_STEP, seq, payload, &at)) {
        oom(err, errlen, "STEP");
        goto done;
    }
    put(b, step_id, 8);
    put(b, (uint64_t)n_rows, 4);
    put(b, n_seqs, 4);
    put(b, (uint64_t)n_samples, 4);
    put(b, 0, 4);
    for (int64_t r = 0; r < n_rows; r++) {
        put(b, (uint32_t)rows[r].token, 4);
        put(b, (uint32_t)rows[r].seq, 4);
        put(b, (uint64_t)rows[r].pos, 8);
        put(b, rows[r].want_logits ? 1 : 0, 4);
    }
    for (int64_t k = 0; k < n_samples; k++)
        put(b, (uint64_t)samples[k].row, 4);
    for (uint32_t i = 0; i < n_seqs; i++) {
        int s = order[i];
        int64_t nb;
        const int32_t *t = kv_seq_blocks(kv, s, &nb);
        int64_t need = (len_after[s] + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS;
        if (need > nb) {
            b->len = at; /* not a message: take it back */
            snprintf(err, errlen, "STEP: sequence %d needs %lld blocks, has %lld reserved", s,
                     (long long)need, (long long)nb);
            goto done;
        }
        put(b, (uint32_t)s, 4);
        put(b, kv_seq_rope_long(kv, s) ? 1 : 0, 4);
        put(b, (uint64_t)len_after[s], 8);
        put(b, (uint64_t)need, 4);
        for (int64_t k = 0; k < need; k++)
            put(b, (uint32_t)t[k], 4);
    }
    rc = 0;
done:
    free(order);
    free(len_after);
    free(seen);
    free(drawn);
    return rc;
}

/* ------------------------------------------------------------ reading */

struct cur {
    const uint8_t *p;
    size_t left;
    int bad;
};

static uint64_t rd(struct cur *c, int bytes)
{
    if (c->bad || c->left < (size_t)bytes) {
        c->bad = 1;
        return 0;
    }
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v |= (uint64_t)c->p[i] << (8 * i);
    c->p += bytes;
    c->left -= (size_t)bytes;
    return v;
}

static const char *rd_text(struct cur *c, size_t *n)
{
    *n = (size_t)rd(c, 2);
    if (c->bad || *n > CTL_MAX_MESSAGE || *n > c->left) {
        c->bad = 1;
        *n = 0;
        return NULL;
    }
    const char *t = (const char *)c->p;
    c->p += *n;
    c->left -= *n;
    return t;
}

/* The payload must end exactly where its fields do. */
static int finish(struct cur *c, const char *what, char *err, size_t errlen)
{
    if (c->bad) {
        snprintf(err, errlen, "%s: payload shorter than its fields", what);
        return -1;
    }
    if (c->left) {
        snprintf(err, errlen, "%s: %zu bytes beyond its fields", what, c->left);
        return -1;
    }
    return 0;
}

int ctl_header_decode(const uint8_t h[CTL_HEADER_BYTES], uint32_t want_seq,
                      struct ctl_header *out, char *err, size_t errlen)
{
    struct cur c = {h, CTL_HEADER_BYTES, 0};
    uint32_t magic = (uint32_t)rd(&c, 4);
    out->version = (uint16_t)rd(&c, 2);
    out->type = (uint16_t)rd(&c, 2);
    out->seq = (uint32_t)rd(&c, 4);
    out->length = (uint32_t)rd(&c, 4);
    if (magic != CTL_MAGIC) {
        snprintf(err, errlen, "not a control message (magic 0x%08x)", magic);
        return -1;
    }
    if (out->version != CTL_VERSION) {
        snprintf(err, errlen, "control protocol version %u, this inferd speaks %d",
                 out->version, CTL_VERSION);
        return -1;
    }
    if (out->type < CTL_HELLO || out->type > CTL_SHUTDOWN) {
        snprintf(err, errlen, "unknown control message type %u", out->type);
        return -1;
    }
    if (out->seq != want_seq) {
        snprintf(err, errlen, "control message %u out of order (expected %u)", out->seq,
                 want_seq);
        return -1;
    }
    if (out->length > CTL_MAX_PAYLOAD) {
        snprintf(err, errlen, "control message of %u bytes (at most %u)", out->length,
                 (unsigned)CTL_MAX_PAYLOAD);
        return -1;
    }
    return 0;
}

int ctl_decode_hello(const uint8_t *payload, uint32_t length, struct ctl_hello *out, char *err,
                     size_t errlen)
{
    struct cur c = {payload, length, 0};
    out->node_rank = (uint16_t)rd(&c, 2);
    out->nnodes = (uint16_t)rd(&c, 2);
    out->tp = (uint16_t)rd(&c, 2);
    out->flags = (uint16_t)rd(&c, 2);
    out->fingerprint = rd(&c, 8);
    out->gpu_free = rd(&c, 8);
    out->gpu_total = rd(&c, 8);
    if (finish(&c, "HELLO", err, errlen))
        return -1;
    if (out->nnodes < 2 || out->node_rank < 1 || out->node_rank >= out->nnodes ||
        out->tp < out->nnodes || out->tp % out->nnodes != 0) {
        snprintf(err, errlen, "HELLO: node %u of %u with %u ranks is not a valid layout",
                 out->node_rank, out->nnodes, out->tp);
        return -1;
    }
    if (out->flags & ~CTL_HELLO_CUDA) {
        snprintf(err, errlen, "HELLO: unknown flags 0x%x", out->flags);
        return -1;
    }
    if (out->gpu_free > out->gpu_total ||
        (!(out->flags & CTL_HELLO_CUDA) && (out->gpu_free || out->gpu_total))) {
        snprintf(err, errlen, "HELLO: GPU memory %llu free of %llu bytes on a %s node",
                 (unsigned long long)out->gpu_free, (unsigned long long)out->gpu_total,
                 out->flags & CTL_HELLO_CUDA ? "GPU" : "CPU");
        return -1;
    }
    return 0;
}

int ctl_decode_welcome(const uint8_t *payload, uint32_t length, struct ctl_welcome *out,
                       char *err, size_t errlen)
{
    struct cur c = {payload, length, 0};
    out->kv_blocks = rd(&c, 8);
    out->max_seqs = (uint32_t)rd(&c, 4);
    out->flags = (uint32_t)rd(&c, 4);
    if (!c.bad && c.left >= CTL_NCCL_ID_BYTES) {
        memcpy(out->nccl_id, c.p, CTL_NCCL_ID_BYTES);
        c.p += CTL_NCCL_ID_BYTES;
        c.left -= CTL_NCCL_ID_BYTES;
    } else {
        c.bad = 1;
    }
    out->max_rows = rd(&c, 8);
    out->max_len = rd(&c, 8);
    if (finish(&c, "WELCOME", err, errlen))
        return -1;
    if (out->kv_blocks < 1 || out->kv_blocks > INT32_MAX || out->max_seqs < 1 ||
        out->max_seqs > CTL_MAX_SEQS || out->flags != 0) {
        snprintf(err, errlen, "WELCOME: %llu blocks, %u sequences, flags %u: out of range",
                 (unsigned long long)out->kv_blocks, out->max_seqs, out->flags);
        return -1;
    }
    if (out->max_rows > CTL_MAX_ROWS || out->max_len > CTL_MAX_LEN) {
        snprintf(err, errlen, "WELCOME: step buffers of %llu rows, %llu tokens: out of range",
                 (unsigned long long)out->max_rows, (unsigned long long)out->max_len);
        return -1;
    }
    return 0;
}

int ctl_decode_refuse(const uint8_t *payload, uint32_t length, struct ctl_refuse *out,
                      char *err, size_t errlen)
{
    struct cur c = {payload, length, 0};
    out->code = (uint16_t)rd(&c, 2);
    out->text = rd_text(&c, &out->n_text);
    if (finish(&c, "REFUSE", err, errlen))
        return -1;
    if (out->code < CTL_REFUSE_VERSION || out->code > CTL_REFUSE_MODEL) {
        snprintf(err, errlen, "REFUSE: unknown code %u", out->code);
        return -1;
    }
    return 0;
}

int ctl_decode_step_done(const uint8_t *payload, uint32_t length, struct ctl_step_done *out,
                         char *err, size_t errlen)
{
    struct cur c = {payload, length, 0};
    out->step_id = rd(&c, 8);
    out->status = (int32_t)(uint32_t)rd(&c, 4);
    out->text = rd_text(&c, &out->n_text);
    if (finish(&c, "STEP_DONE", err, errlen))
        return -1;
    if (out->status != 0 && out->status != -1) {
        snprintf(err, errlen, "STEP_DONE: status %d (0 or -1)", out->status);
        return -1;
    }
    return 0;
}

int ctl_decode_shutdown(const uint8_t *payload, uint32_t length, struct ctl_refuse *out,
                        char *err, size_t errlen)
{
    struct cur c = {payload, length, 0};
    out->code = 0;
    out->text = rd_text(&c, &out->n_text);
    return finish(&c, "SHUTDOWN", err, errlen);
}

struct model_row ctl_row(const struct ctl_step *s, uint32_t i)
{
    struct cur c = {s->rows + (size_t)i * 20, 20, 0};
    struct model_row r;
    r.token = (int32_t)(uint32_t)rd(&c, 4);
    r.seq = (int32_t)(uint32_t)rd(&c, 4);
    r.pos = (int64_t)rd(&c, 8);
    r.want_logits = (int)(rd(&c, 4) & 1);
    return r;
}

uint32_t ctl_sample_row(const struct ctl_step *s, uint32_t i)
{
    struct cur c = {s->samples + (size_t)i * 4, 4, 0};
    return (uint32_t)rd(&c, 4);
}

int32_t ctl_block(const struct ctl_seq *q, uint32_t i)
{
    struct cur c = {q->blocks + (size_t)i * 4, 4, 0};
    return (int32_t)(uint32_t)rd(&c, 4);
}

void ctl_step_free(struct ctl_step *s)
{
    free(s->seqs);
    s->seqs = NULL;
}

int ctl_decode_step(const uint8_t *payload, uint32_t length, uint64_t kv_blocks,
                    struct ctl_step *out, char *err, size_t errlen)
{
    struct cur c = {payload, length, 0};
    memset(out, 0, sizeof(*out));
    out->step_id = rd(&c, 8);
    out->n_rows = (uint32_t)rd(&c, 4);
    out->n_seqs = (uint32_t)rd(&c, 4);
    out->n_samples = (uint32_t)rd(&c, 4);
    uint32_t reserved = (uint32_t)rd(&c, 4);
    if (c.bad) {
        snprintf(err, errlen, "STEP: payload shorter than its fields");
        return -1;
    }
    if (out->n_rows < 1 || out->n_rows > CTL_MAX_ROWS || out->n_seqs < 1 ||
        out->n_seqs > CTL_MAX_SEQS || out->n_seqs > out->n_rows ||
        out->n_samples > out->n_rows || reserved != 0) {
        snprintf(err, errlen, "STEP: %u rows over %u sequences, %u samples, reserved %u: "
                 "out of range", out->n_rows, out->n_seqs, out->n_samples, reserved);
        return -1;
    }
    size_t fixed = (size_t)out->n_rows * 20 + (size_t)out->n_samples * 4;
    if (c.left < fixed) {
        snprintf(err, errlen, "STEP: payload shorter than its %u rows and %u samples",
                 out->n_rows, out->n_samples);
        return -1;
    }
    out->rows = c.p;
    out->samples = c.p + (size_t)out->n_rows * 20;
    c.p += fixed;
    c.left -= fixed;
    out->seqs = calloc(out->n_seqs, sizeof(*out->seqs));
    /* sequence id -> entry + 1, so every check is linear in the message */
    uint32_t *where = calloc(CTL_MAX_SEQS, sizeof(*where));
    /* want-row index -> sampled already */
    uint8_t *drawn = calloc(out->n_rows, 1);
    if (!out->seqs || !where || !drawn) {
        free(where);
        free(drawn);
        ctl_step_free(out);
        snprintf(err, errlen, "STEP: out of memory");
        return -1;
    }
    for (uint32_t i = 0; i < out->n_seqs; i++) {
        struct ctl_seq *q = &out->seqs[i];
        q->seq = (int32_t)(uint32_t)rd(&c, 4);
        q->rope_long = (uint32_t)rd(&c, 4);
        q->len_after = (int64_t)rd(&c, 8);
        q->n_blocks = (uint32_t)rd(&c, 4);
        if (c.bad || q->n_blocks > CTL_MAX_BLOCKS || c.left < (size_t)q->n_blocks * 4) {
            snprintf(err, errlen, "STEP: sequence entry %u runs past the payload", i);
            goto fail;
        }
        q->blocks = c.p;
        c.p += (size_t)q->n_blocks * 4;
        c.left -= (size_t)q->n_blocks * 4;
        if (q->seq < 0 || q->seq >= CTL_MAX_SEQS || q->rope_long > 1 || q->len_after < 1 ||
            q->len_after > (int64_t)q->n_blocks * KV_BLOCK_TOKENS) {
            snprintf(err, errlen, "STEP: sequence %d: length %lld over %u blocks, rope_long %u",
                     q->seq, (long long)q->len_after, q->n_blocks, q->rope_long);
            goto fail;
        }
        for (uint32_t k = 0; k < q->n_blocks; k++) {
            int32_t bl = ctl_block(q, k);
            if (bl < 0 || (uint64_t)bl >= kv_blocks) {
                snprintf(err, errlen, "STEP: sequence %d: block %d outside the cache (%llu)",
                         q->seq, bl, (unsigned long long)kv_blocks);
                goto fail;
            }
        }
        if (where[q->seq]) {
            snprintf(err, errlen, "STEP: sequence %d listed twice", q->seq);
            goto fail;
        }
        where[q->seq] = i + 1;
    }
    if (finish(&c, "STEP", err, errlen))
        goto fail;
    uint32_t n_want = 0;
    for (uint32_t r = 0; r < out->n_rows; r++) {
        struct model_row row = ctl_row(out, r);
        const struct ctl_seq *q = row.seq >= 0 && row.seq < CTL_MAX_SEQS && where[row.seq]
                                      ? &out->seqs[where[row.seq] - 1]
                                      : NULL;
        struct cur fc = {out->rows + (size_t)r * 20 + 16, 4, 0};
        uint32_t flags = (uint32_t)rd(&fc, 4);
        /* a negative token is a placeholder, MODEL_TOKEN_PREV(k) for the
         * previous step's sample k: only the follower knows how many there
         * were, so here k is only held to CTL_MAX_ROWS */
        if (!q || row.token < -CTL_MAX_ROWS || row.pos < 0 || row.pos >= q->len_after ||
            (flags & ~1u)) {
            snprintf(err, errlen, "STEP: row %u (token %d, sequence %d, position %lld, flags %u) "
                     "does not fit its sequence", r, row.token, row.seq, (long long)row.pos,
                     flags);
            goto fail;
        }
        n_want += flags & 1u;
    }
    if (out->n_samples > n_want) {
        snprintf(err, errlen, "STEP: %u samples of %u want rows", out->n_samples, n_want);
        goto fail;
    }
    for (uint32_t k = 0; k < out->n_samples; k++) {
        uint32_t w = ctl_sample_row(out, k);
        if (w >= n_want || drawn[w]) {
            snprintf(err, errlen, "STEP: sample %u draws from want row %u (of %u)%s", k, w,
                     n_want, w < n_want ? ", drawn twice" : "");
            goto fail;
        }
        drawn[w] = 1;
    }
    free(where);
    free(drawn);
    return 0;
fail:
    free(where);
    free(drawn);
    ctl_step_free(out);
    return -1;
}

uint64_t ctl_fingerprint(const struct model_config *c)
{
    int64_t f[] = {c->n_layer, c->n_embd, c->n_head, c->n_head_kv, c->head_dim,
                   c->n_ff, c->n_vocab, c->n_ctx};
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++)
        for (int b = 0; b < 8; b++) {
            h ^= (uint8_t)((uint64_t)f[i] >> (8 * b));
            h *= 0x100000001b3ull;
        }
    return h;
}
