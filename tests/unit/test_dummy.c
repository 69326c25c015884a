/* test_dummy.c: dummy weights (engine/dummy.h) through their header: the
 * bytes are those of one splitmix64 stream run from the seed through the
 * tensors in order (the values --load-format dummy has always made); each
 * tensor's recorded fill (dummy_fill_of) regenerates its bytes alone,
 * draw k computed from the start state without the draws before it (what
 * a GPU does); shapes only records the same fills without touching
 * memory; and a pointer that starts no tensor is refused. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/dummy.h"

static int failures;
#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); failures++; } } while (0)

#define GAMMA 0x9e3779b97f4a7c15ull

/* splitmix64's finalizer */
static uint64_t finalize(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The stream as the loader has always run it: the state advances first. */
static uint64_t next(uint64_t *s)
{
    return finalize(*s += GAMMA);
}

/* One bf16 value from a 16-bit lane: sign, exponent 118..121, mantissa. */
static uint16_t lane_value(unsigned r)
{
    return (uint16_t)((r & 0x8000) | (118 + ((r >> 7) & 3)) << 7 | (r & 0x7f));
}

/* Element i of a bf16 random tensor from its start state alone. */
static uint16_t bf16_at(uint64_t state, int64_t i)
{
    uint64_t r = finalize(state + (uint64_t)(i / 4 + 1) * GAMMA);
    return lane_value((unsigned)(r >> (16 * (i % 4))) & 0xffff);
}

/* The tensor names dummy_open makes for c, in its order. */
static int names_of(const struct model_config *c, char (*out)[96])
{
    int n = 0;
#define N(...) snprintf(out[n++], 96, __VA_ARGS__)
    N("model.embed_tokens.weight");
    N("model.norm.weight");
    if (!c->tied_embeddings)
        N("lm_head.weight");
    for (int64_t l = 0; l < c->n_layer; l++) {
        const char *p = "model.layers";
        N("%s.%lld.input_layernorm.weight", p, (long long)l);
        N("%s.%lld.post_attention_layernorm.weight", p, (long long)l);
        if (c->fused_qkv) {
            N("%s.%lld.self_attn.qkv_proj.weight", p, (long long)l);
        } else {
            N("%s.%lld.self_attn.q_proj.weight", p, (long long)l);
            N("%s.%lld.self_attn.k_proj.weight", p, (long long)l);
            N("%s.%lld.self_attn.v_proj.weight", p, (long long)l);
        }
        if (c->qkv_bias) {
            N("%s.%lld.self_attn.q_proj.bias", p, (long long)l);
            N("%s.%lld.self_attn.k_proj.bias", p, (long long)l);
            N("%s.%lld.self_attn.v_proj.bias", p, (long long)l);
        }
        N("%s.%lld.self_attn.o_proj.weight", p, (long long)l);
        if (c->fused_gate_up) {
            N("%s.%lld.mlp.gate_up_proj.weight", p, (long long)l);
        } else {
            N("%s.%lld.mlp.gate_proj.weight", p, (long long)l);
            N("%s.%lld.mlp.up_proj.weight", p, (long long)l);
        }
        N("%s.%lld.mlp.down_proj.weight", p, (long long)l);
    }
#undef N
    return n;
}

static void check_model(const struct model_config *c, enum k_dtype dtype, uint64_t seed,
                        const char *label)
{
    char err[256];
    struct dummy_model *full = NULL, *shapes = NULL;
    if (dummy_open(c, dtype, seed, 1, &full, err, sizeof(err)) ||
        dummy_open(c, dtype, seed, 0, &shapes, err, sizeof(err))) {
        fprintf(stderr, "%s: dummy_open: %s\n", label, err);
        failures++;
        dummy_close(full);
        return;
    }
    char(*names)[96] = calloc(512, 96);
    int n = names_of(c, names);
    uint64_t stream = seed; /* the one stream, run in order */
    int n_random = 0;
    for (int i = 0; i < n; i++) {
        const struct tensor *t = dummy_find(full, names[i]), *ts = dummy_find(shapes, names[i]);
        CHECK(t && ts);
        if (!t || !ts)
            continue;
        struct dummy_fill f, fs;
        CHECK(dummy_fill_of(full, t->data, &f) == 0);
        CHECK(dummy_fill_of(shapes, ts->data, &fs) == 0);
        /* shapes only: the same fill, from arithmetic alone */
        CHECK(f.kind == fs.kind && f.dtype == fs.dtype && f.n == fs.n && f.state == fs.state);
        CHECK(f.n == t->ne[0] * t->ne[1] && f.dtype == t->dtype);
        CHECK(f.state == stream);
        int is_vec = strstr(names[i], "norm.weight") || strstr(names[i], ".bias");
        CHECK(f.kind == (is_vec ? (strstr(names[i], ".bias") ? DUMMY_FILL_ZEROS : DUMMY_FILL_ONES)
                                : DUMMY_FILL_RANDOM));
        if (f.kind == DUMMY_FILL_ONES || f.kind == DUMMY_FILL_ZEROS) {
            CHECK(t->dtype == K_F32);
            float want = f.kind == DUMMY_FILL_ONES ? 1.0f : 0.0f;
            int64_t bad = 0;
            for (int64_t e = 0; e < f.n; e++)
                bad += ((const float *)t->data)[e] != want;
            CHECK(bad == 0);
            continue;
        }
        n_random++;
        if (dtype == K_BF16) {
            /* in order from the one stream, as the loader always did */
            const uint16_t *v = t->data;
            int64_t bad_stream = 0, bad_alone = 0;
            for (int64_t e = 0; e < f.n; e += 4) {
                uint64_t r = next(&stream);
                for (int64_t j = e; j < e + 4 && j < f.n; j++, r >>= 16)
                    bad_stream += v[j] != lane_value((unsigned)r & 0xffff);
            }
            /* from (state, n) alone, each element on its own */
            for (int64_t e = 0; e < f.n; e++)
                bad_alone += v[e] != bf16_at(f.state, e);
            if (bad_stream || bad_alone)
                fprintf(stderr, "%s: %s: %lld differ from the stream, %lld from its state\n",
                        label, names[i], (long long)bad_stream, (long long)bad_alone);
            CHECK(bad_stream == 0 && bad_alone == 0);
        } else {
            /* f32: one draw per element, scaled by fan-in */
            float a = 0.02f * (t->ne[0] > 4096 ? 4096.0f / (float)t->ne[0] : 1.0f);
            const float *v = t->data;
            int64_t bad = 0;
            for (int64_t e = 0; e < f.n; e++) {
                float want =
                    a * (2.0f * (float)(next(&stream) >> 40) * (1.0f / 16777216.0f) - 1.0f);
                bad += fabsf(v[e] - want) > 1e-7f;
            }
            CHECK(bad == 0);
        }
    }
    CHECK(n_random > 0);
    /* the whole model is these tensors */
    uint64_t bytes = 0;
    for (int i = 0; i < n; i++) {
        const struct tensor *t = dummy_find(full, names[i]);
        bytes += t ? t->nbytes : 0;
    }
    CHECK(bytes == dummy_bytes(full));
    /* pointers that start no tensor */
    struct dummy_fill f;
    const struct tensor *t0 = dummy_find(full, names[0]);
    CHECK(dummy_fill_of(full, NULL, &f) == -1);
    CHECK(dummy_fill_of(full, (const char *)t0->data + 2, &f) == -1);
    CHECK(dummy_fill_of(full, dummy_find(shapes, names[0])->data, &f) == -1);
    free(names);
    dummy_close(full);
    dummy_close(shapes);
}

int main(void)
{
    /* Llama-like: separate projections, untied head, odd sizes so that
     * tensors end mid-draw (n % 4 != 0) and later ones start mid-stream. */
    struct model_config llama = {
        .n_vocab = 301, .n_embd = 67, .n_layer = 3, .n_head = 4, .n_head_kv = 2,
        .head_dim = 16, .n_ff = 133,
    };
    check_model(&llama, K_BF16, 0, "llama bf16 seed 0");
    check_model(&llama, K_BF16, 0xfedcba9876543210ull, "llama bf16 big seed");
    check_model(&llama, K_F32, 7, "llama f32");
    /* Qwen2-like: q/k/v biases, tied embeddings. */
    struct model_config qwen = llama;
    qwen.qkv_bias = 1;
    qwen.tied_embeddings = 1;
    check_model(&qwen, K_BF16, 3, "qwen2 bf16");
    /* Phi-3-like: fused qkv and gate_up. */
    struct model_config phi = llama;
    phi.fused_qkv = 1;
    phi.fused_gate_up = 1;
    check_model(&phi, K_BF16, 11, "phi3 bf16");
    /* A model whose embedding alone is a few million elements. */
    struct model_config wide = {
        .n_vocab = 32003, .n_embd = 256, .n_layer = 1, .n_head = 4, .n_head_kv = 4,
        .head_dim = 64, .n_ff = 1001,
    };
    check_model(&wide, K_BF16, 99, "wide bf16");
    if (failures)
        fprintf(stderr, "test_dummy: %d failed\n", failures);
    return failures ? 1 : 0;
}
