/* test_model_tp.c: tensor parallelism on the CPU at shapes the parity
 * fixtures do not have: random-weight models (--load-format dummy) with 8
 * query heads split over 2, 4 and 8 ranks, their 2 KV heads replicated
 * past 2 ranks, a Phi-3-style fused qkv_proj and gate_up_proj, Qwen2-style
 * q/k/v biases, and a vocabulary that does not divide by the ranks (the
 * last rank's share short). Each must give the logits of the whole model
 * within fp32 reassociation, over a batch of several sequences with
 * prefill and decode rows, and the same greedy tokens. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/kv_cache.h"
#include "engine/model.h"

static int failures;
#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);         \
            failures++;                                                                      \
        }                                                                                    \
    } while (0)

#define TOL 2e-5 /* relative to the largest logit */

struct shape {
    const char *name, *json;
};

static const struct shape shapes[] = {
    {"llama gqa 8/2",
     "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\","
     " \"hidden_size\": 128, \"intermediate_size\": 256, \"num_attention_heads\": 8,"
     " \"num_key_value_heads\": 2, \"num_hidden_layers\": 2, \"vocab_size\": 1000,"
     " \"max_position_embeddings\": 256, \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0,"
     " \"tie_word_embeddings\": false}"},
    {"phi3 fused 8/8",
     "{\"architectures\": [\"Phi3ForCausalLM\"], \"model_type\": \"phi3\","
     " \"hidden_size\": 128, \"intermediate_size\": 192, \"num_attention_heads\": 8,"
     " \"num_key_value_heads\": 8, \"num_hidden_layers\": 2, \"vocab_size\": 515,"
     " \"max_position_embeddings\": 256, \"original_max_position_embeddings\": 256,"
     " \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0, \"tie_word_embeddings\": false}"},
    {"qwen2 bias tied 8/2",
     "{\"architectures\": [\"Qwen2ForCausalLM\"], \"model_type\": \"qwen2\","
     " \"hidden_size\": 128, \"intermediate_size\": 128, \"num_attention_heads\": 8,"
     " \"num_key_value_heads\": 2, \"num_hidden_layers\": 2, \"vocab_size\": 700,"
     " \"max_position_embeddings\": 256, \"rms_norm_eps\": 1e-6, \"rope_theta\": 1000000.0,"
     " \"tie_word_embeddings\": true}"},
};

static struct model *load(const char *path, int tp)
{
    struct model_opts o = {.load_format = MODEL_LOAD_DUMMY, .dummy_seed = 5, .n_threads = 2,
                           .tp = tp};
    struct model *m = NULL;
    char err[512];
    if (model_load(path, &o, &m, err, sizeof(err))) {
        fprintf(stderr, "model_load tp=%d: %s\n", tp, err);
        failures++;
        return NULL;
    }
    return m;
}

/* Three sequences: two prefills of 9 and 5 tokens, then four decode steps
 * of all three (the third opened later); logits of every want row,
 * concatenated, into out (rows x n_vocab). Returns the rows written. */
static int64_t run(struct model *m, float *out, int32_t *greedy)
{
    const struct model_config *c = model_get_config(m);
    struct kv_geom g = model_kv_geom(m);
    char err[512];
    struct kv_cache *kv = kv_create(&g, 64, 4, err, sizeof(err));
    if (!kv) {
        fprintf(stderr, "kv_create: %s\n", err);
        failures++;
        return 0;
    }
    int s[3];
    int64_t len[3] = {0, 0, 0}, nout = 0;
    int32_t last[3];
    struct model_row rows[32];
    for (int i = 0; i < 3; i++) {
        s[i] = kv_seq_open(kv, 0);
        CHECK(kv_seq_reserve(kv, s[i], 64) == 0);
    }
    int64_t n = 0;
    for (int64_t p = 0; p < 9; p++)
        rows[n++] = (struct model_row){(int32_t)((p * 37 + 3) % c->n_vocab), s[0], p, p == 8};
    for (int64_t p = 0; p < 5; p++)
        rows[n++] = (struct model_row){(int32_t)((p * 91 + 7) % c->n_vocab), s[1], p, p == 4};
    if (model_forward(m, kv, rows, n, out, err, sizeof(err))) {
        fprintf(stderr, "forward: %s\n", err);
        failures++;
        kv_destroy(kv);
        return 0;
    }
    len[0] = 9, len[1] = 5;
    for (int k = 0; k < 2; k++) {
        const float *lg = out + (size_t)k * (size_t)c->n_vocab;
        int64_t best = 0;
        for (int64_t v = 1; v < c->n_vocab; v++)
            if (lg[v] > lg[best])
                best = v;
        last[k] = (int32_t)best;
        greedy[nout + k] = (int32_t)best;
    }
    nout = 2;
    last[2] = 11;
    for (int step = 0; step < 4; step++) {
        n = 0;
        for (int i = 0; i < 3; i++)
            if (i < 2 || step > 0)
                rows[n++] = (struct model_row){last[i], s[i], len[i], 1};
        float *lg0 = out + (size_t)nout * (size_t)c->n_vocab;
        if (model_forward(m, kv, rows, n, lg0, err, sizeof(err))) {
            fprintf(stderr, "forward: %s\n", err);
            failures++;
            break;
        }
        for (int64_t k = 0; k < n; k++) {
            const float *lg = lg0 + (size_t)k * (size_t)c->n_vocab;
            int64_t best = 0;
            for (int64_t v = 1; v < c->n_vocab; v++)
                if (lg[v] > lg[best])
                    best = v;
            int i = (int)k;
            len[i]++;
            last[i] = (int32_t)best;
            greedy[nout + k] = (int32_t)best;
        }
        nout += n;
    }
    kv_destroy(kv);
    return nout;
}

int main(void)
{
    char path[64];
    snprintf(path, sizeof(path), "/tmp/inferd-test-model-tp-%d.json", (int)getpid());
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        FILE *f = fopen(path, "w");
        if (!f || fputs(shapes[si].json, f) < 0 || fclose(f) != 0) {
            perror(path);
            return 1;
        }
        struct model *whole = load(path, 1);
        if (!whole)
            continue;
        int64_t V = model_get_config(whole)->n_vocab;
        float *ref = calloc((size_t)32 * (size_t)V, sizeof(float));
        float *got = calloc((size_t)32 * (size_t)V, sizeof(float));
        int32_t g_ref[32], g_got[32];
        int64_t nref = run(whole, ref, g_ref);
        CHECK(nref == 13);
        double scale = 0;
        for (int64_t i = 0; i < nref * V; i++)
            scale = fmax(scale, fabs(ref[i]));
        model_destroy(whole);
        for (int tp = 2; tp <= 8; tp *= 2) {
            struct model *m = load(path, tp);
            if (!m)
                continue;
            struct kv_geom g = model_kv_geom(m);
            /* every rank's KV heads in a token row (replicas included) */
            CHECK(g.n_kv_heads == (model_get_config(m)->n_head_kv >= tp
                                       ? model_get_config(m)->n_head_kv
                                       : tp));
            memset(got, 0, (size_t)32 * (size_t)V * sizeof(float));
            int64_t n = run(m, got, g_got);
            double worst = 0;
            for (int64_t i = 0; i < n * V; i++)
                worst = fmax(worst, fabs((double)got[i] - (double)ref[i]));
            printf("%s tp=%d: %lld logits rows, max |d| / max |logit| = %.3g\n",
                   shapes[si].name, tp, (long long)n, worst / scale);
            CHECK(n == nref);
            CHECK(worst / scale <= TOL);
            CHECK(memcmp(g_got, g_ref, (size_t)n * sizeof(int32_t)) == 0);
            model_destroy(m);
        }
        free(ref);
        free(got);
    }
    /* a shape that does not split: 8 heads over 3 ranks */
    FILE *f = fopen(path, "w");
    if (f) {
        fputs(shapes[0].json, f);
        fclose(f);
        struct model_opts o = {.load_format = MODEL_LOAD_DUMMY, .tp = 3};
        struct model *m = NULL;
        char err[512] = "";
        CHECK(model_load(path, &o, &m, err, sizeof(err)) != 0);
        CHECK(strstr(err, "--tensor-parallel-size 3") && strstr(err, "n_head 8"));
    }
    unlink(path);
    if (failures) {
        fprintf(stderr, "test_model_tp: %d failures\n", failures);
        return 1;
    }
    printf("test_model_tp: ok\n");
    return 0;
}
