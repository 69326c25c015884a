/* test_ctl.c: the control-plane messages (engine/ctl.h) against
 * proto/control.md: each message encoded and decoded back; the header's
 * checks; a STEP built from a real KV cache carries every row and block
 * table; and every malformed payload is refused with a message, never read
 * past: every truncation of every message, trailing bytes, out-of-range
 * fields (version 2's GPU memory, step buffer sizes, samples and token
 * placeholders among them), and 20,000 random corruptions of a STEP (run
 * under ASan in CI). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/ctl.h"
#include "engine/kv_cache.h"

static int failures;
#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);         \
            failures++;                                                                      \
        }                                                                                    \
    } while (0)

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* The message at b->p + at: its header checked, payload and type out. */
static const uint8_t *open_msg(const struct ctl_buf *b, size_t at, uint32_t seq,
                               struct ctl_header *h)
{
    char err[256];
    CHECK(b->len >= at + CTL_HEADER_BYTES);
    if (ctl_header_decode(b->p + at, seq, h, err, sizeof(err))) {
        fprintf(stderr, "header: %s\n", err);
        failures++;
        return NULL;
    }
    CHECK(b->len >= at + CTL_HEADER_BYTES + h->length);
    return b->p + at + CTL_HEADER_BYTES;
}

static void test_header(void)
{
    struct ctl_buf b = {0};
    char err[256];
    struct ctl_hello hi = {.node_rank = 1, .nnodes = 2, .tp = 4, .fingerprint = 0x1234};
    CHECK(ctl_encode_hello(&b, 7, &hi, err, sizeof(err)) == 0);
    struct ctl_header h;
    CHECK(ctl_header_decode(b.p, 7, &h, err, sizeof(err)) == 0);
    CHECK(h.type == CTL_HELLO && h.length == 32 && h.seq == 7 && h.version == CTL_VERSION);
    CHECK(ctl_header_decode(b.p, 8, &h, err, sizeof(err)) != 0 && strstr(err, "out of order"));
    uint8_t x[CTL_HEADER_BYTES];
    memcpy(x, b.p, sizeof(x));
    x[0] ^= 1;
    CHECK(ctl_header_decode(x, 7, &h, err, sizeof(err)) != 0 && strstr(err, "magic"));
    memcpy(x, b.p, sizeof(x));
    x[4] = 1; /* a version 1 peer */
    CHECK(ctl_header_decode(x, 7, &h, err, sizeof(err)) != 0 && strstr(err, "version 1"));
    memcpy(x, b.p, sizeof(x));
    x[6] = 9;
    CHECK(ctl_header_decode(x, 7, &h, err, sizeof(err)) != 0 && strstr(err, "type 9"));
    memcpy(x, b.p, sizeof(x));
    x[15] = 0x10; /* 256 MiB */
    CHECK(ctl_header_decode(x, 7, &h, err, sizeof(err)) != 0 && strstr(err, "at most"));
    ctl_buf_free(&b);
}

/* Writes a little-endian field into a payload, to make a bad one. */
static void poke(uint8_t *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* Every prefix of a payload, and the payload with a byte more, refused. */
typedef int (*decode_fn)(const uint8_t *, uint32_t, void *, char *, size_t);

static int dec_hello(const uint8_t *p, uint32_t n, void *o, char *e, size_t el)
{
    return ctl_decode_hello(p, n, o, e, el);
}
static int dec_welcome(const uint8_t *p, uint32_t n, void *o, char *e, size_t el)
{
    return ctl_decode_welcome(p, n, o, e, el);
}
static int dec_refuse(const uint8_t *p, uint32_t n, void *o, char *e, size_t el)
{
    return ctl_decode_refuse(p, n, o, e, el);
}
static int dec_done(const uint8_t *p, uint32_t n, void *o, char *e, size_t el)
{
    return ctl_decode_step_done(p, n, o, e, el);
}
static int dec_shutdown(const uint8_t *p, uint32_t n, void *o, char *e, size_t el)
{
    return ctl_decode_shutdown(p, n, o, e, el);
}
static int dec_step(const uint8_t *p, uint32_t n, void *o, char *e, size_t el)
{
    int rc = ctl_decode_step(p, n, 64, o, e, el);
    if (rc == 0)
        ctl_step_free(o);
    return rc;
}

static void truncations(const uint8_t *payload, uint32_t n, decode_fn fn, const char *what)
{
    union {
        struct ctl_hello a;
        struct ctl_welcome b;
        struct ctl_refuse c;
        struct ctl_step_done d;
        struct ctl_step e;
    } out;
    char err[256];
    uint8_t *copy = malloc((size_t)n + 1);
    for (uint32_t k = 0; k < n; k++) {
        /* a fresh allocation of exactly k bytes: ASan sees any overread */
        uint8_t *p = malloc(k ? k : 1);
        memcpy(p, payload, k);
        err[0] = 0;
        if (fn(p, k, &out, err, sizeof(err)) == 0) {
            fprintf(stderr, "%s: a payload cut to %u of %u bytes was accepted\n", what, k, n);
            failures++;
        }
        CHECK(err[0] != 0);
        free(p);
    }
    memcpy(copy, payload, n);
    copy[n] = 0;
    CHECK(fn(copy, n + 1, &out, err, sizeof(err)) != 0);
    CHECK(fn(copy, n, &out, err, sizeof(err)) == 0);
    free(copy);
}

static void test_small_messages(void)
{
    struct ctl_buf b = {0};
    char err[256];
    struct ctl_header h;
    struct ctl_hello hi = {.node_rank = 2, .nnodes = 3, .tp = 6,
                           .fingerprint = 0xfeedface12345678ull, .flags = CTL_HELLO_CUDA,
                           .gpu_free = 100000000000ull, .gpu_total = 150000000000ull},
                     hi2;
    CHECK(ctl_encode_hello(&b, 0, &hi, err, sizeof(err)) == 0);
    const uint8_t *p = open_msg(&b, 0, 0, &h);
    CHECK(p && h.length == 32 && ctl_decode_hello(p, h.length, &hi2, err, sizeof(err)) == 0);
    CHECK(hi2.node_rank == 2 && hi2.nnodes == 3 && hi2.tp == 6 && hi2.fingerprint == hi.fingerprint);
    CHECK(hi2.flags == CTL_HELLO_CUDA && hi2.gpu_free == hi.gpu_free &&
          hi2.gpu_total == hi.gpu_total);
    truncations(p, h.length, dec_hello, "HELLO");
    /* a CPU node: no flag, no memory */
    struct ctl_buf cpu = {0};
    struct ctl_hello hc = {.node_rank = 1, .nnodes = 2, .tp = 2, .fingerprint = 7};
    CHECK(ctl_encode_hello(&cpu, 0, &hc, err, sizeof(err)) == 0);
    CHECK(ctl_decode_hello(cpu.p + CTL_HEADER_BYTES, 32, &hi2, err, sizeof(err)) == 0);
    CHECK(hi2.flags == 0 && hi2.gpu_free == 0 && hi2.gpu_total == 0 && hi2.fingerprint == 7);
    truncations(cpu.p + CTL_HEADER_BYTES, 32, dec_hello, "HELLO (CPU)");
    ctl_buf_free(&cpu);
    /* layouts that cannot be: the leader's own rank, tp not a multiple */
    struct ctl_hello bad[] = {{.node_rank = 0, .nnodes = 2, .tp = 2, .fingerprint = 1},
                              {.node_rank = 2, .nnodes = 2, .tp = 4, .fingerprint = 1},
                              {.node_rank = 1, .nnodes = 2, .tp = 3, .fingerprint = 1},
                              {.node_rank = 1, .nnodes = 1, .tp = 1, .fingerprint = 1}};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct ctl_buf bb = {0};
        CHECK(ctl_encode_hello(&bb, 0, &bad[i], err, sizeof(err)) == 0);
        CHECK(ctl_decode_hello(bb.p + CTL_HEADER_BYTES, 32, &hi2, err, sizeof(err)) != 0);
        CHECK(strstr(err, "not a valid layout") != NULL);
        ctl_buf_free(&bb);
    }
    /* flags and memory that cannot be: a bit this version does not know,
     * more free than total, memory on a CPU node */
    struct {
        uint16_t flags;
        uint64_t free, total;
        const char *why;
    } badmem[] = {
        {CTL_HELLO_CUDA | 2, 1, 2, "unknown flags"},
        {0x8000, 0, 0, "unknown flags"},
        {CTL_HELLO_CUDA, 3, 2, "GPU memory"},
        {0, 1, 2, "CPU node"},
        {0, 0, 2, "CPU node"},
    };
    for (size_t i = 0; i < sizeof(badmem) / sizeof(badmem[0]); i++) {
        struct ctl_buf bb = {0};
        struct ctl_hello x = {.node_rank = 1, .nnodes = 2, .tp = 2, .fingerprint = 1,
                              .flags = badmem[i].flags, .gpu_free = badmem[i].free,
                              .gpu_total = badmem[i].total};
        CHECK(ctl_encode_hello(&bb, 0, &x, err, sizeof(err)) == 0);
        CHECK(ctl_decode_hello(bb.p + CTL_HEADER_BYTES, 32, &hi2, err, sizeof(err)) != 0);
        CHECK(strstr(err, badmem[i].why) != NULL);
        ctl_buf_free(&bb);
    }

    size_t at = b.len;
    struct ctl_welcome w = {.kv_blocks = 4096, .max_seqs = 256, .max_rows = 8192,
                            .max_len = 131072},
                       w2;
    for (int i = 0; i < CTL_NCCL_ID_BYTES; i++)
        w.nccl_id[i] = (uint8_t)(i * 7);
    CHECK(ctl_encode_welcome(&b, 1, &w, err, sizeof(err)) == 0);
    p = open_msg(&b, at, 1, &h);
    CHECK(p && h.type == CTL_WELCOME && h.length == 160 &&
          ctl_decode_welcome(p, h.length, &w2, err, sizeof(err)) == 0);
    CHECK(w2.kv_blocks == 4096 && w2.max_seqs == 256 && !memcmp(w.nccl_id, w2.nccl_id, CTL_NCCL_ID_BYTES));
    CHECK(w2.flags == 0 && w2.max_rows == 8192 && w2.max_len == 131072);
    truncations(p, h.length, dec_welcome, "WELCOME");
    /* the bounds themselves pass; one past each, or a flag, is refused */
    struct {
        uint32_t flags;
        uint64_t rows, len;
        int ok;
    } ws[] = {
        {0, CTL_MAX_ROWS, CTL_MAX_LEN, 1}, {0, 0, 0, 1},
        {1, 0, 0, 0}, {0, CTL_MAX_ROWS + 1, 0, 0}, {0, 1, CTL_MAX_LEN + 1, 0},
        {0, UINT64_MAX, 1, 0},
    };
    for (size_t i = 0; i < sizeof(ws) / sizeof(ws[0]); i++) {
        struct ctl_buf bb = {0};
        struct ctl_welcome x = w;
        x.flags = ws[i].flags, x.max_rows = ws[i].rows, x.max_len = ws[i].len;
        CHECK(ctl_encode_welcome(&bb, 0, &x, err, sizeof(err)) == 0);
        int rc = ctl_decode_welcome(bb.p + CTL_HEADER_BYTES, 160, &w2, err, sizeof(err));
        CHECK(ws[i].ok ? rc == 0 : rc != 0 && strstr(err, "out of range"));
        ctl_buf_free(&bb);
    }

    at = b.len;
    struct ctl_refuse r;
    CHECK(ctl_encode_refuse(&b, 2, CTL_REFUSE_MODEL, "model differs", err, sizeof(err)) == 0);
    p = open_msg(&b, at, 2, &h);
    CHECK(p && ctl_decode_refuse(p, h.length, &r, err, sizeof(err)) == 0);
    CHECK(r.code == CTL_REFUSE_MODEL && r.n_text == 13 && !memcmp(r.text, "model differs", 13));
    truncations(p, h.length, dec_refuse, "REFUSE");

    at = b.len;
    struct ctl_step_done d;
    CHECK(ctl_encode_step_done(&b, 3, 99, -1, "rank 3: out of memory", err, sizeof(err)) == 0);
    p = open_msg(&b, at, 3, &h);
    CHECK(p && ctl_decode_step_done(p, h.length, &d, err, sizeof(err)) == 0);
    CHECK(d.step_id == 99 && d.status == -1 && d.n_text == 21);
    truncations(p, h.length, dec_done, "STEP_DONE");

    at = b.len;
    struct ctl_refuse sd;
    char longer[3000];
    memset(longer, 'x', sizeof(longer) - 1);
    longer[sizeof(longer) - 1] = 0;
    CHECK(ctl_encode_shutdown(&b, 4, longer, err, sizeof(err)) == 0);
    p = open_msg(&b, at, 4, &h);
    CHECK(p && ctl_decode_shutdown(p, h.length, &sd, err, sizeof(err)) == 0);
    CHECK(sd.n_text == CTL_MAX_MESSAGE); /* cut at the bound */
    truncations(p, h.length, dec_shutdown, "SHUTDOWN");
    ctl_buf_free(&b);
}

/* How many of a decoded STEP's rows want logits. */
static uint32_t want_rows(const struct ctl_step *st)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < st->n_rows; i++)
        n += ctl_row(st, i).want_logits ? 1 : 0;
    return n;
}

static void test_step(void)
{
    struct kv_geom g = {2, 2, 8, 0};
    char err[256];
    struct kv_cache *kv = kv_create(&g, 64, 8, err, sizeof(err));
    CHECK(kv != NULL);
    if (!kv)
        return;
    int a = kv_seq_open(kv, 0), b2 = kv_seq_open(kv, 1);
    CHECK(kv_seq_reserve(kv, a, 40) == 0 && kv_seq_reserve(kv, b2, 5) == 0);
    /* a: prefill 0..36 interleaved with b2's 0..4. Want rows, in row
     * order: b2's 4 (row 9), a's 10 (row 15), a's 36 (the last); the two
     * last rows of each sequence carry placeholders, the first and the
     * last that a step can name */
    struct model_row rows[64];
    int n = 0;
    for (int p = 0; p < 37; p++) {
        rows[n++] = (struct model_row){100 + p, a, p, p == 10 || p == 36};
        if (p < 5)
            rows[n++] = (struct model_row){7 * p, b2, p, p == 4};
    }
    rows[9].token = MODEL_TOKEN_PREV(0);
    rows[n - 1].token = MODEL_TOKEN_PREV(CTL_MAX_ROWS - 1);
    struct model_sample smp[4] = {{.row = 2}, {.row = 0}};
    struct ctl_buf buf = {0};
    CHECK(ctl_encode_step(&buf, 5, 42, rows, n, smp, 2, kv, err, sizeof(err)) == 0);
    struct ctl_header h;
    const uint8_t *p = open_msg(&buf, 0, 5, &h);
    struct ctl_step st;
    CHECK(p && ctl_decode_step(p, h.length, 64, &st, err, sizeof(err)) == 0);
    CHECK(st.step_id == 42 && st.n_rows == (uint32_t)n && st.n_seqs == 2 && st.n_samples == 2);
    for (int i = 0; i < n; i++) {
        struct model_row r = ctl_row(&st, (uint32_t)i);
        CHECK(r.token == rows[i].token && r.seq == rows[i].seq && r.pos == rows[i].pos &&
              r.want_logits == rows[i].want_logits);
    }
    CHECK(ctl_row(&st, 9).token == -1 && ctl_row(&st, (uint32_t)n - 1).token == -CTL_MAX_ROWS);
    CHECK(want_rows(&st) == 3 && ctl_sample_row(&st, 0) == 2 && ctl_sample_row(&st, 1) == 0);
    int64_t nb;
    const int32_t *ta = kv_seq_blocks(kv, a, &nb);
    CHECK(st.seqs[0].seq == a && st.seqs[0].len_after == 37 && st.seqs[0].n_blocks == 3);
    CHECK(st.seqs[1].seq == b2 && st.seqs[1].len_after == 5 && st.seqs[1].n_blocks == 1 &&
          st.seqs[1].rope_long == 1);
    for (uint32_t k = 0; k < 3; k++)
        CHECK(ctl_block(&st.seqs[0], k) == ta[k]);
    ctl_step_free(&st);
    truncations(p, h.length, dec_step, "STEP");

    /* no samples (the CPU's steps): samples may be NULL */
    struct ctl_buf nos = {0};
    CHECK(ctl_encode_step(&nos, 0, 1, rows, n, NULL, 0, kv, err, sizeof(err)) == 0);
    CHECK(ctl_decode_step(nos.p + CTL_HEADER_BYTES, (uint32_t)(nos.len - CTL_HEADER_BYTES), 64,
                          &st, err, sizeof(err)) == 0);
    CHECK(st.n_samples == 0 && st.n_rows == (uint32_t)n);
    ctl_step_free(&st);
    truncations(nos.p + CTL_HEADER_BYTES, (uint32_t)(nos.len - CTL_HEADER_BYTES), dec_step,
                "STEP (no samples)");
    ctl_buf_free(&nos);

    /* refused: blocks past the follower's cache; a row past its sequence;
     * a reserved word set; a token below the last placeholder; samples
     * out of range, twice, or more than the want rows */
    CHECK(ctl_decode_step(p, h.length, 2, &st, err, sizeof(err)) != 0 && strstr(err, "outside"));
    uint8_t *c = malloc(h.length);
    size_t at_rows = 24, at_samples = at_rows + 20 * (size_t)n;
    memcpy(c, p, h.length);
    c[at_rows + 8] = 60; /* row 0's position: 60, past a's 37 */
    CHECK(ctl_decode_step(c, h.length, 64, &st, err, sizeof(err)) != 0 && strstr(err, "row 0"));
    memcpy(c, p, h.length);
    poke(c + 20, 1, 4);
    CHECK(ctl_decode_step(c, h.length, 64, &st, err, sizeof(err)) != 0 &&
          strstr(err, "reserved 1"));
    memcpy(c, p, h.length);
    poke(c + at_rows, (uint32_t)(-1 - CTL_MAX_ROWS), 4);
    CHECK(ctl_decode_step(c, h.length, 64, &st, err, sizeof(err)) != 0 && strstr(err, "row 0"));
    memcpy(c, p, h.length);
    poke(c + at_samples, 3, 4); /* want rows 0 .. 2 */
    CHECK(ctl_decode_step(c, h.length, 64, &st, err, sizeof(err)) != 0 &&
          strstr(err, "sample 0 draws from want row 3 (of 3)"));
    memcpy(c, p, h.length);
    poke(c + at_samples + 4, 2, 4); /* sample 1 = sample 0 */
    CHECK(ctl_decode_step(c, h.length, 64, &st, err, sizeof(err)) != 0 && strstr(err, "twice"));
    memcpy(c, p, h.length);
    c[at_rows + 20 * 9 + 16] = 0; /* rows 9 and 15 no longer want logits */
    c[at_rows + 20 * 15 + 16] = 0;
    CHECK(ctl_decode_step(c, h.length, 64, &st, err, sizeof(err)) != 0 &&
          strstr(err, "2 samples of 1 want rows"));
    memcpy(c, p, h.length);
    poke(c + 16, (uint32_t)n + 1, 4); /* n_samples past n_rows */
    CHECK(ctl_decode_step(c, h.length, 64, &st, err, sizeof(err)) != 0 &&
          strstr(err, "out of range"));
    /* random corruption: refused or accepted, never a crash or overread
     * (and an accepted one still satisfies every rule) */
    int accepted = 0;
    for (int it = 0; it < 20000; it++) {
        memcpy(c, p, h.length);
        int flips = 1 + (int)(next() % 4);
        for (int f = 0; f < flips; f++)
            c[next() % h.length] ^= (uint8_t)(1u << (next() % 8));
        if (ctl_decode_step(c, h.length, 64, &st, err, sizeof(err)) == 0) {
            accepted++;
            for (uint32_t i = 0; i < st.n_rows; i++) {
                struct model_row r = ctl_row(&st, i);
                CHECK(r.token >= -CTL_MAX_ROWS && r.pos >= 0);
            }
            uint32_t nw = want_rows(&st), seen = 0;
            CHECK(st.n_samples <= nw);
            for (uint32_t k = 0; k < st.n_samples; k++) {
                uint32_t w = ctl_sample_row(&st, k);
                CHECK(w < nw && w < 32 && !(seen >> w & 1));
                seen |= w < 32 ? 1u << w : 0;
            }
            for (uint32_t q = 0; q < st.n_seqs; q++)
                for (uint32_t k = 0; k < st.seqs[q].n_blocks; k++)
                    CHECK(ctl_block(&st.seqs[q], k) >= 0 && ctl_block(&st.seqs[q], k) < 64);
            ctl_step_free(&st);
        }
    }
    printf("ctl: 20000 corrupted STEPs, %d accepted (every rule still held)\n", accepted);
    free(c);
    /* the encoder refuses what it cannot describe, and leaves no message */
    size_t len = buf.len;
    struct model_sample past[] = {{.row = 3}}, twice[] = {{.row = 1}, {.row = 1}},
                        neg[] = {{.row = -1}},
                        many[] = {{.row = 0}, {.row = 1}, {.row = 2}, {.row = 3}};
    CHECK(ctl_encode_step(&buf, 6, 43, rows, n, past, 1, kv, err, sizeof(err)) != 0 &&
          strstr(err, "want row 3 (of 3)"));
    CHECK(ctl_encode_step(&buf, 6, 43, rows, n, twice, 2, kv, err, sizeof(err)) != 0 &&
          strstr(err, "twice"));
    CHECK(ctl_encode_step(&buf, 6, 43, rows, n, neg, 1, kv, err, sizeof(err)) != 0 &&
          strstr(err, "want row -1"));
    CHECK(ctl_encode_step(&buf, 6, 43, rows, n, many, 4, kv, err, sizeof(err)) != 0 &&
          strstr(err, "sample 3"));
    CHECK(ctl_encode_step(&buf, 6, 43, rows, 2, many, 3, kv, err, sizeof(err)) != 0 &&
          strstr(err, "3 samples of 2 rows"));
    rows[0].token = -1 - CTL_MAX_ROWS;
    CHECK(ctl_encode_step(&buf, 6, 43, rows, n, smp, 2, kv, err, sizeof(err)) != 0 &&
          strstr(err, "placeholder"));
    rows[0].token = 100;
    rows[0].seq = 7; /* not open */
    CHECK(ctl_encode_step(&buf, 6, 43, rows, n, smp, 2, kv, err, sizeof(err)) != 0 &&
          strstr(err, "not open"));
    CHECK(buf.len == len);
    ctl_buf_free(&buf);
    kv_destroy(kv);
}

static void test_fingerprint(void)
{
    struct model_config a;
    memset(&a, 0, sizeof(a));
    a.n_layer = 32, a.n_embd = 4096, a.n_head = 32, a.n_head_kv = 8, a.head_dim = 128;
    a.n_ff = 14336, a.n_vocab = 128256, a.n_ctx = 8192;
    struct model_config b = a;
    CHECK(ctl_fingerprint(&a) == ctl_fingerprint(&b));
    b.n_ff++;
    CHECK(ctl_fingerprint(&a) != ctl_fingerprint(&b));
}

int main(void)
{
    test_header();
    test_small_messages();
    test_step();
    test_fingerprint();
    if (failures) {
        fprintf(stderr, "test_ctl: %d failures\n", failures);
        return 1;
    }
    printf("test_ctl: ok\n");
    return 0;
}
