/* test_model.c: the forward pass's batch contract through engine/model.h,
 * on a fixture model: bad batches are refused with a message and leave the
 * cache as it was; good ones advance each sequence. Parity of the numbers
 * themselves is tests/test_parity.py's job. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kv_cache.h"
#include "engine/model.h"

static int failures;
#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); failures++; } } while (0)

static int refused(struct model *m, struct kv_cache *kv, const struct model_row *rows, int64_t n,
                   float *logits, const char *want)
{
    char err[256] = "";
    int rc = model_forward(m, kv, rows, n, logits, err, sizeof(err));
    if (rc != -1 || !strstr(err, want)) {
        fprintf(stderr, "expected refusal containing '%s', got rc %d '%s'\n", want, rc, err);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: test_model MODEL_DIR\n");
        return 2;
    }
    char err[512];
    struct model *m;
    struct model_opts mo = {.n_threads = 2};
    if (model_load(argv[1], &mo, &m, err, sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    const struct model_config *c = model_get_config(m);
    struct kv_geom g = model_kv_geom(m);
    struct kv_cache *kv = kv_create(&g, 8, 2, err, sizeof(err));
    CHECK(kv != NULL);
    float *logits = malloc((size_t)4 * (size_t)c->n_vocab * sizeof(float));
    int a = kv_seq_open(kv, 0), b = kv_seq_open(kv, 0);
    CHECK(kv_seq_reserve(kv, a, 20) == 0 && kv_seq_reserve(kv, b, 16) == 0);

    struct model_row r1[] = {{1, a, 0, 0}, {2, a, 1, 1}};
    struct model_row bad_tok[] = {{1, a, 0, 0}, {(int32_t)c->n_vocab, a, 1, 1}};
    struct model_row gap[] = {{1, a, 0, 0}, {2, a, 2, 1}};
    struct model_row swapped[] = {{2, a, 1, 0}, {1, a, 0, 1}};
    struct model_row closed[] = {{1, 1, 0, 1}};
    struct model_row unreserved[] = {{1, b, 0, 0}};
    CHECK(refused(m, kv, bad_tok, 2, logits, "outside the vocabulary"));
    CHECK(refused(m, kv, gap, 2, logits, "continues at position 1, not 2"));
    CHECK(refused(m, kv, swapped, 2, logits, "continues at position 0, not 1"));
    CHECK(kv_seq_len(kv, a) == 0);
    CHECK(model_forward(m, kv, r1, 2, logits, err, sizeof(err)) == 0);
    CHECK(kv_seq_len(kv, a) == 2);
    /* The same positions again are out of order now. */
    CHECK(refused(m, kv, r1, 2, logits, "continues at position 2, not 0"));

    kv_seq_close(kv, b);
    CHECK(refused(m, kv, closed, 1, logits, "is not open"));
    b = kv_seq_open(kv, 0); /* open, but no blocks */
    unreserved[0].seq = b;
    CHECK(refused(m, kv, unreserved, 1, logits, "no KV block reserved"));
    CHECK(kv_seq_len(kv, b) == 0);

    /* Decode one more token of a and a first token of b in one batch;
     * a's logits must equal a fresh run of its three tokens alone. */
    CHECK(kv_seq_reserve(kv, b, 1) == 0);
    struct model_row step[] = {{3, a, 2, 1}, {7, b, 0, 1}};
    CHECK(model_forward(m, kv, step, 2, logits, err, sizeof(err)) == 0);
    CHECK(kv_seq_len(kv, a) == 3 && kv_seq_len(kv, b) == 1);
    float *solo = malloc((size_t)c->n_vocab * sizeof(float));
    int s = kv_seq_open(kv, 0);
    CHECK(s < 0); /* max 2 sequences */
    kv_seq_close(kv, b);
    s = kv_seq_open(kv, 0);
    CHECK(kv_seq_reserve(kv, s, 3) == 0);
    struct model_row all3[] = {{1, s, 0, 0}, {2, s, 1, 0}, {3, s, 2, 1}};
    CHECK(model_forward(m, kv, all3, 3, solo, err, sizeof(err)) == 0);
    CHECK(memcmp(solo, logits, (size_t)c->n_vocab * sizeof(float)) == 0);

    free(solo);
    free(logits);
    kv_destroy(kv);
    model_destroy(m);
    if (failures)
        fprintf(stderr, "%d checks failed\n", failures);
    else
        printf("model: all checks passed\n");
    return failures ? 1 : 0;
}
