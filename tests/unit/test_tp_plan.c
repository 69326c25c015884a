/* test_tp_plan.c: the tensor-parallel plan through its header: the
 * divisibility refusals and their messages, KV-head replication (8 KV
 * heads over 16 ranks, 2 over 4), the GQA invariant checked independently
 * on every plan made, the quant-block rule of row-parallel splits, the
 * vocabulary ranges tiling [0, n_vocab) with padded shards, and the bytes:
 * the unsharded total against the loaded model's count, the ranks' sum
 * against total + replicated + padding, replication counted by hand. */
#include <stdio.h>
#include <string.h>

#include "engine/tp_plan.h"

static int failures;
#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);               \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

static struct model_config shape(int64_t E, int64_t layers, int64_t heads, int64_t kv_heads,
                                 int64_t ff, int64_t vocab)
{
    struct model_config c;
    memset(&c, 0, sizeof(c));
    c.arch = ARCH_LLAMA;
    c.n_embd = E;
    c.n_layer = layers;
    c.n_head = heads;
    c.n_head_kv = kv_heads;
    c.head_dim = E / heads;
    c.n_ff = ff;
    c.n_vocab = vocab;
    c.n_ctx = 8192;
    return c;
}

static struct model_config llama3_8b(void)
{
    return shape(4096, 32, 32, 8, 14336, 128256);
}
static struct model_config llama3_70b(void)
{
    return shape(8192, 80, 64, 8, 28672, 128256);
}
static struct model_config llama3_405b(void)
{
    return shape(16384, 126, 128, 8, 53248, 128256);
}

static struct tp_dtypes bf16(void)
{
    struct tp_dtypes d;
    /* norms in f32, as the dummy loader makes them (inspect's numbers) */
    tp_dtypes_uniform(&d, K_BF16, K_F32);
    return d;
}

/* The invariants every plan must keep, checked from the outside. */
static void check_plan(const struct model_config *c, const struct tp_dtypes *dt,
                       const struct tp_plan *p)
{
    int tp = p->tp;
    int64_t group = c->n_head / c->n_head_kv;
    int64_t sum_w = 0, sum_kv = 0, sum_pad_rows = 0;
    int64_t want_per = (c->n_vocab + tp - 1) / tp;
    CHECK(p->vocab_per_rank % TP_VOCAB_PAD == 0);
    CHECK(p->vocab_per_rank >= want_per && p->vocab_per_rank - TP_VOCAB_PAD < want_per);
    for (int r = 0; r < tp; r++) {
        const struct tp_rank_plan *rp = &p->rank[r];
        CHECK(rp->rank == r);
        /* heads and MLP columns: contiguous, equal, tiling the whole */
        CHECK(rp->n_q_heads * tp == c->n_head && rp->q_head0 == r * rp->n_q_heads);
        CHECK(rp->n_ff * tp == c->n_ff && rp->ff0 == r * rp->n_ff);
        /* GQA: every query head reads a KV head this rank holds */
        for (int64_t h = rp->q_head0; h < rp->q_head0 + rp->n_q_heads; h++)
            CHECK(h / group >= rp->kv_head0 && h / group < rp->kv_head0 + rp->n_kv_heads);
        if (p->kv_replicated) {
            CHECK(rp->n_kv_heads == 1 && rp->kv_head0 == r / (tp / c->n_head_kv));
        } else {
            CHECK(rp->n_kv_heads * tp == c->n_head_kv && rp->kv_head0 == r * rp->n_kv_heads);
        }
        /* vocabulary: the ranges tile [0, n_vocab) in rank order */
        CHECK(rp->vocab0 == (r == 0 ? 0 : p->rank[r - 1].vocab1));
        CHECK(rp->vocab0 <= rp->vocab1 && rp->vocab1 - rp->vocab0 <= p->vocab_per_rank);
        CHECK(rp->vocab_rows == p->vocab_per_rank);
        sum_pad_rows += rp->vocab_rows - (rp->vocab1 - rp->vocab0);
        CHECK(rp->kv_bytes_per_token ==
              c->n_layer * 2 * rp->n_kv_heads * c->head_dim * k_row_bytes(dt->kv, 1));
        sum_w += rp->weight_bytes;
        sum_kv += rp->kv_bytes_per_token;
    }
    CHECK(p->rank[tp - 1].vocab1 == c->n_vocab);
    CHECK(sum_w == p->total_weight_bytes + p->replicated_bytes + p->vocab_pad_bytes);
    CHECK(sum_kv == p->kv_bytes_per_token * p->kv_replicas);
    int64_t vocab_row = k_row_bytes(dt->embd, c->n_embd) +
                        (c->tied_embeddings ? 0 : k_row_bytes(dt->lm_head, c->n_embd));
    CHECK(p->vocab_pad_bytes == sum_pad_rows * vocab_row);
    CHECK(p->allreduce_values_per_token == 2 * c->n_layer * c->n_embd);
}

static int make(const struct model_config *c, const struct tp_dtypes *dt, int tp, struct tp_plan *p,
                char *err, size_t errlen)
{
    int rc = tp_plan_make(c, dt, tp, p, err, errlen);
    if (rc == 0)
        check_plan(c, dt, p);
    return rc;
}

static void expect_refusal(const struct model_config *c, const struct tp_dtypes *dt, int tp,
                           const char *want)
{
    struct tp_plan p;
    char err[256] = "";
    CHECK(make(c, dt, tp, &p, err, sizeof(err)) == -1);
    if (!strstr(err, want)) {
        fprintf(stderr, "tp %d: got '%s', want '%s'\n", tp, err, want);
        failures++;
    }
}

static void test_llama3_8b(void)
{
    struct model_config c = llama3_8b();
    struct tp_dtypes dt = bf16();
    struct tp_plan p;
    char err[256];
    for (int tp = 1; tp <= 16; tp *= 2) {
        CHECK(make(&c, &dt, tp, &p, err, sizeof(err)) == 0);
        /* the unsharded total is the loaded model's weight count
         * (`inferd inspect --load-format dummy tests/configs/llama3-8b.json`) */
        CHECK(p.total_weight_bytes == 16061054976LL);
        CHECK(p.kv_replicated == (tp > 8));
        CHECK(p.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2);
    }
    CHECK(make(&c, &dt, 1, &p, err, sizeof(err)) == 0);
    CHECK(p.replicated_bytes == 0 && p.vocab_pad_bytes == 0 && p.vocab_per_rank == 128256);
    CHECK(make(&c, &dt, 8, &p, err, sizeof(err)) == 0);
    /* ceil(128256 / 8) = 16032 -> 16064: seven full shards, the last short */
    CHECK(p.vocab_per_rank == 16064 && p.rank[7].vocab0 == 7 * 16064 && p.rank[7].vocab1 == 128256);
    CHECK(p.rank[3].n_q_heads == 4 && p.rank[3].q_head0 == 12 && p.rank[3].kv_head0 == 3);
    CHECK(p.rank[3].ff0 == 3 * 1792 && p.rank[3].n_ff == 1792);
    expect_refusal(&c, &dt, 3, "n_head 32 cannot be split over 3 ranks");
    expect_refusal(&c, &dt, 64, "n_head 32 cannot be split over 64 ranks");
    expect_refusal(&c, &dt, 0, "outside 1..64");
    expect_refusal(&c, &dt, 65, "outside 1..64");
}

/* 8 KV heads over 16 ranks (Llama 3.1 405B on two 8-GPU nodes): each KV
 * head on two neighbouring ranks, whose 8 query heads each are its group. */
static void test_replication_8_over_16(void)
{
    struct model_config c = llama3_405b();
    struct tp_dtypes dt = bf16();
    struct tp_plan p;
    char err[256];
    CHECK(make(&c, &dt, 16, &p, err, sizeof(err)) == 0);
    CHECK(p.kv_replicated && p.kv_replicas == 2);
    for (int r = 0; r < 16; r++) {
        CHECK(p.rank[r].kv_head0 == r / 2 && p.rank[r].n_kv_heads == 1);
        CHECK(p.rank[r].q_head0 == 8 * r && p.rank[r].n_q_heads == 8);
    }
    /* replication by hand: 15 extra copies of the 2 x 126 + 1 f32 norms,
     * and per layer 8 extra KV heads' k and v rows (128 x 16384 bf16 each) */
    int64_t norms = 15LL * (2 * 126 + 1) * 16384 * 4;
    int64_t kv = 126LL * 8 * 2 * 128 * 16384 * 2;
    CHECK(p.replicated_bytes == norms + kv);
    CHECK(p.kv_bytes_per_token == 126 * 2 * 8 * 128 * 2);
    CHECK(p.rank[0].kv_bytes_per_token == 126 * 2 * 1 * 128 * 2);
    /* 8064-row shards: fifteen full ones, the last one 7296 rows */
    CHECK(p.vocab_per_rank == 8064 && p.rank[15].vocab0 == 120960);
    CHECK(p.vocab_pad_bytes == (8064 - 7296) * 16384LL * 2 * 2);
    /* every rank holds the same bytes (padded shards) */
    for (int r = 1; r < 16; r++)
        CHECK(p.rank[r].weight_bytes == p.rank[0].weight_bytes);
    CHECK(p.total_weight_bytes == 811715067904LL); /* inspect on llama3-405b.json */
    CHECK(p.allreduce_values_per_token == 2 * 126 * 16384);
    CHECK(p.allreduce_bytes_per_token == 2 * 126 * 16384 * 2);
}

/* 2 KV heads over 4 ranks (Qwen2.5-1.5B's shape): ranks 0-1 share KV head
 * 0, ranks 2-3 KV head 1; with a qkv bias and tied embeddings. */
static void test_replication_2_over_4(void)
{
    struct model_config c = shape(1536, 28, 12, 2, 8960, 151936);
    c.qkv_bias = 1;
    c.tied_embeddings = 1;
    struct tp_dtypes dt = bf16();
    struct tp_plan p;
    char err[256];
    CHECK(make(&c, &dt, 4, &p, err, sizeof(err)) == 0);
    CHECK(p.kv_replicated && p.kv_replicas == 2);
    const int64_t want_kv[4] = {0, 0, 1, 1};
    for (int r = 0; r < 4; r++) {
        CHECK(p.rank[r].kv_head0 == want_kv[r] && p.rank[r].n_kv_heads == 1);
        CHECK(p.rank[r].q_head0 == 3 * r && p.rank[r].n_q_heads == 3);
    }
    /* k and v rows and biases of 2 extra heads per layer, and 3 extra
     * copies of the 57 norms */
    int64_t kv = 28LL * (2 * 2 * 128 * 1536 * 2 + 2 * 2 * 128 * 4);
    CHECK(p.replicated_bytes == kv + 3LL * 57 * 1536 * 4);
    /* tied: the vocabulary's bytes counted once */
    int64_t layer = 2 * 1536 * 4 + (12 + 2 * 2) * 128 * 1536 * 2 + (12 + 2 * 2) * 128 * 4 +
                    1536 * 12 * 128 * 2 + 3 * 8960 * 1536 * 2;
    CHECK(p.total_weight_bytes == 28 * layer + 1536 * 4 + 151936LL * 1536 * 2);
    /* 2 ranks: no replication, one KV head each */
    CHECK(make(&c, &dt, 2, &p, err, sizeof(err)) == 0);
    CHECK(!p.kv_replicated && p.rank[1].kv_head0 == 1 && p.rank[1].n_kv_heads == 1);
    /* 12 heads over 8 ranks do not divide */
    expect_refusal(&c, &dt, 8, "n_head 12 cannot be split over 8 ranks");
}

static void test_kv_refusals(void)
{
    struct tp_dtypes dt = bf16();
    /* fewer KV heads than ranks, not dividing them */
    struct model_config c = shape(1536, 2, 12, 3, 1536, 1000);
    expect_refusal(&c, &dt, 4, "n_head_kv 3 cannot be replicated over 4 ranks");
    CHECK(tp_plan_make(&c, &dt, 3, &(struct tp_plan){0}, NULL, 0) == 0);
    /* more KV heads than ranks, not dividing */
    c = shape(3072, 2, 24, 12, 3072, 1000);
    expect_refusal(&c, &dt, 8, "n_head_kv 12 cannot be split over 8 ranks");
    /* Qwen2.5-0.5B's 14 heads */
    c = shape(896, 24, 14, 2, 4864, 151936);
    expect_refusal(&c, &dt, 4, "n_head 14 cannot be split over 4 ranks");
    /* the MLP */
    c = shape(4096, 2, 32, 8, 8190, 1000);
    expect_refusal(&c, &dt, 4, "n_ff 8190 cannot be split over 4 ranks");
    /* every passing plan over a range of shapes keeps the GQA invariant
     * (make() checks it from the outside) */
    const int64_t heads[] = {8, 12, 16, 24, 32, 40, 48, 64, 128};
    const int64_t kvs[] = {1, 2, 4, 8, 16};
    int made = 0;
    for (size_t i = 0; i < sizeof(heads) / sizeof(heads[0]); i++)
        for (size_t j = 0; j < sizeof(kvs) / sizeof(kvs[0]); j++) {
            if (heads[i] % kvs[j])
                continue;
            c = shape(heads[i] * 64, 1, heads[i], kvs[j], 64 * 64, 777);
            for (int tp = 1; tp <= TP_MAX; tp++) {
                struct tp_plan p;
                char err[256];
                made += make(&c, &dt, tp, &p, err, sizeof(err)) == 0;
            }
        }
    CHECK(made > 100);
}

/* A row-parallel split must fall on the dtype's blocks. */
static void test_quant_blocks(void)
{
    struct tp_dtypes q4;
    tp_dtypes_uniform(&q4, K_Q4_K, K_F32);
    /* Qwen2-7B's 18944-wide MLP under 32 heads of 128: o_proj splits on
     * 256s at tp 4 (1024), down_proj not (4736), at tp 2 both do */
    struct model_config c = shape(4096, 28, 32, 4, 18944, 152064);
    expect_refusal(&c, &q4, 4,
                   "down_proj: 4736 input columns per rank is not a multiple of Q4_K's 256-value"
                   " blocks; use tensor parallel size 2 or an f16/bf16/Q8_0 file");
    struct tp_plan p;
    char err[256];
    CHECK(make(&c, &q4, 2, &p, err, sizeof(err)) == 0);
    /* quantized rows sliced on block boundaries add up to the whole */
    int64_t sum = 0;
    for (int r = 0; r < 2; r++)
        sum += p.rank[r].weight_bytes;
    CHECK(sum == p.total_weight_bytes + p.replicated_bytes + p.vocab_pad_bytes);
    /* Q8_0's 32-value blocks take 4736 */
    struct tp_dtypes q8;
    tp_dtypes_uniform(&q8, K_Q8_0, K_F32);
    CHECK(make(&c, &q8, 4, &p, err, sizeof(err)) == 0);
    /* o_proj: 7 heads of 128 per rank = 896 columns; tp 3 does not split
     * the heads, tp 2 does (14 heads: 1792 = 7 x 256) */
    c = shape(3584, 28, 28, 4, 18944, 152064);
    expect_refusal(
        &c, &q4, 4,
        "o_proj: 896 input columns per rank is not a multiple of Q4_K's 256-value blocks;"
        " use tensor parallel size 2 or an f16/bf16/Q8_0 file");
    /* no smaller size fits and Q8_0 does not either: only the float types */
    c = shape(2048, 2, 16, 16, 2 * 288, 1000); /* down: 288 = 9 x 32 per rank at tp 2 */
    expect_refusal(&c, &q4, 2, "down_proj: 288 input columns per rank");
    expect_refusal(&c, &q4, 2, "use an f16/bf16/Q8_0 file");
    c = shape(2048, 2, 16, 16, 2 * 144, 1000); /* 144 = 4.5 x 32 */
    expect_refusal(&c, &q8, 2, "is not a multiple of Q8_0's 32-value blocks; use an f16/bf16 file");
    /* the float types take any split the heads allow */
    struct tp_dtypes f16;
    tp_dtypes_uniform(&f16, K_F16, K_F16);
    CHECK(make(&c, &f16, 2, &p, err, sizeof(err)) == 0);
    /* only the row-parallel roles are held to it: o and down in f16, the
     * rest Q4_K, splits where Q4_K would not */
    c = shape(4096, 28, 32, 4, 18944, 152064);
    q4.o = q4.down = K_F16;
    CHECK(make(&c, &q4, 4, &p, err, sizeof(err)) == 0);
}

/* The vocabulary: ceil(n / tp) rounded up to 64 per rank; the ranges tile
 * [0, n) (check_plan), trailing ranks of a small vocabulary are empty. */
static void test_vocab(void)
{
    struct tp_dtypes dt = bf16();
    const int64_t vocabs[] = {1, 63, 64, 65, 100, 256, 32000, 32064, 128256, 151936, 152064};
    for (size_t i = 0; i < sizeof(vocabs) / sizeof(vocabs[0]); i++) {
        struct model_config c = shape(4096, 1, 64, 64, 64 * 64, vocabs[i]);
        for (int tp = 1; tp <= TP_MAX; tp *= 2) {
            struct tp_plan p;
            char err[256];
            CHECK(make(&c, &dt, tp, &p, err, sizeof(err)) == 0);
        }
    }
    struct model_config c = shape(4096, 1, 64, 64, 64 * 64, 100);
    struct tp_plan p;
    char err[256];
    CHECK(make(&c, &dt, 8, &p, err, sizeof(err)) == 0);
    CHECK(p.vocab_per_rank == 64);
    CHECK(p.rank[0].vocab1 == 64 && p.rank[1].vocab0 == 64 && p.rank[1].vocab1 == 100);
    for (int r = 2; r < 8; r++)
        CHECK(p.rank[r].vocab0 == 100 && p.rank[r].vocab1 == 100);
    /* 8 x 64 rows allocated for 100 */
    CHECK(p.vocab_pad_bytes == (8 * 64 - 100) * 4096LL * 2 * 2);
    CHECK(p.logits_gather_values == 8 * 64);
}

/* 70B bf16 over 4 and 8 ranks: the README's numbers. */
static void test_llama3_70b(void)
{
    struct model_config c = llama3_70b();
    struct tp_dtypes dt = bf16();
    struct tp_plan p;
    char err[256];
    CHECK(make(&c, &dt, 4, &p, err, sizeof(err)) == 0);
    CHECK(p.total_weight_bytes == 141110050816LL); /* inspect on llama3-70b.json */
    CHECK(!p.kv_replicated && p.rank[0].n_kv_heads == 2);
    CHECK(p.rank[0].kv_bytes_per_token == 80 * 2 * 2 * 128 * 2);
    CHECK(make(&c, &dt, 8, &p, err, sizeof(err)) == 0);
    CHECK(p.rank[0].n_kv_heads == 1 && !p.kv_replicated);
    expect_refusal(&c, &dt, 3, "n_head 64 cannot be split over 3 ranks");
}

int main(void)
{
    test_llama3_8b();
    test_replication_8_over_16();
    test_replication_2_over_4();
    test_kv_refusals();
    test_quant_blocks();
    test_vocab();
    test_llama3_70b();
    if (failures) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    printf("tp_plan: ok\n");
    return 0;
}
