/* model_config.c: one model_config from either kind of model file.
 *
 * Hugging Face configs and GGUF metadata name the same facts differently;
 * both land in struct model_config, with the RoPE inverse frequencies
 * precomputed per pair (short and long sets) so the forward pass never
 * needs to know which scaling rule made them. Loader thread only. */
#include "engine/model_config.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "engine/load_error.h"

#define CFG_ERR(...) do { snprintf(err, errlen, __VA_ARGS__); return -1; } while (0)

/* le_show buffer for strings from a file quoted in a message: a plain
 * string is cut after 48 bytes, with "...". */
#define CFG_SHOWN 56

/* ------------------------------------------------------------ RoPE tables */

/* Base inverse frequency of pair i: theta^(-2i/d). */
static double rope_base_inv(const struct model_config *c, int64_t i)
{
    return 1.0 / pow(c->rope_theta, (double)(2 * i) / (double)c->rope_dim);
}

/* Llama 3.x: low frequencies divided by factor, high ones kept, a smooth
 * blend between (the rule of the Llama 3.1 release). */
static double rope_llama3(double inv, double factor, double lo, double hi, double orig)
{
    double wavelen = 2.0 * M_PI / inv;
    double lo_wavelen = orig / lo, hi_wavelen = orig / hi;
    if (wavelen > lo_wavelen)
        return inv / factor;
    if (wavelen < hi_wavelen)
        return inv;
    double smooth = (orig / wavelen - lo) / (hi - lo);
    return (1.0 - smooth) * inv / factor + smooth * inv;
}

static int check_rope_common(struct model_config *c, const char *path, char *err, size_t errlen)
{
    if (c->rope_dim <= 0 || c->rope_dim > c->head_dim || c->rope_dim % 2)
        CFG_ERR("%s: rotary dimension %lld is not an even number in 2..head_dim (%lld)",
                path, (long long)c->rope_dim, (long long)c->head_dim);
    if (c->rope_dim / 2 > MODEL_MAX_ROPE_PAIRS)
        CFG_ERR("%s: rotary dimension %lld is above the supported %d",
                path, (long long)c->rope_dim, 2 * MODEL_MAX_ROPE_PAIRS);
    if (!(c->rope_theta > 0) || !isfinite(c->rope_theta))
        CFG_ERR("%s: rope_theta must be a positive number", path);
    return 0;
}

/* ---------------------------------------------------------- shared checks */

static int check_shape(struct model_config *c, const char *path, char *err, size_t errlen)
{
    struct { const char *name; int64_t v; int64_t max; } f[] = {
        {"vocab size", c->n_vocab, 1 << 24},
        {"hidden size", c->n_embd, 1 << 20},
        {"layer count", c->n_layer, 4096},
        {"attention head count", c->n_head, 4096},
        {"key/value head count", c->n_head_kv, 4096},
        {"head dimension", c->head_dim, 4096},
        {"intermediate size", c->n_ff, 1 << 22},
        {"context length", c->n_ctx, (int64_t)1 << 32},
    };
    for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++)
        if (f[i].v <= 0 || f[i].v > f[i].max)
            CFG_ERR("%s: %s %lld is out of range (1..%lld)", path, f[i].name,
                    (long long)f[i].v, (long long)f[i].max);
    if (c->n_head % c->n_head_kv)
        CFG_ERR("%s: attention heads (%lld) not a multiple of key/value heads (%lld)",
                path, (long long)c->n_head, (long long)c->n_head_kv);
    if (!(c->rms_eps > 0) || c->rms_eps > 1)
        CFG_ERR("%s: rms_norm_eps %g is out of range", path, c->rms_eps);
    return 0;
}

/* ------------------------------------------------------ Hugging Face JSON */

static int hf_int(const struct json *cfg, const char *key, int64_t dflt, int64_t *out,
                  const char *path, char *err, size_t errlen)
{
    const struct json *v = json_get(cfg, key);
    if (!v || json_type(v) == JSON_NULL) {
        if (dflt < 0)
            CFG_ERR("%s: missing integer field \"%s\"", path, key);
        *out = dflt;
        return 0;
    }
    if (json_int64(v, out) != 0)
        CFG_ERR("%s: field \"%s\" must be an integer", path, key);
    return 0;
}

static int hf_num(const struct json *cfg, const char *key, double dflt, double *out,
                  const char *path, char *err, size_t errlen)
{
    const struct json *v = json_get(cfg, key);
    if (!v || json_type(v) == JSON_NULL) {
        if (isnan(dflt))
            CFG_ERR("%s: missing number field \"%s\"", path, key);
        *out = dflt;
        return 0;
    }
    if (json_type(v) != JSON_NUMBER)
        CFG_ERR("%s: field \"%s\" must be a number", path, key);
    *out = json_number(v);
    return 0;
}

static int hf_factor_list(const struct json *arr, const char *what, float *dst, int64_t n,
                          const char *path, char *err, size_t errlen)
{
    if (json_type(arr) != JSON_ARRAY || (int64_t)json_len(arr) != n)
        CFG_ERR("%s: rope_scaling.%s must be a list of %lld numbers (rotary dim / 2)",
                path, what, (long long)n);
    for (int64_t i = 0; i < n; i++) {
        const struct json *e = json_at(arr, (size_t)i);
        if (json_type(e) != JSON_NUMBER || !(json_number(e) > 0))
            CFG_ERR("%s: rope_scaling.%s[%lld] must be a positive number", path, what, (long long)i);
        dst[i] = (float)json_number(e);
    }
    return 0;
}

static int hf_rope(const struct json *cfg, struct model_config *c, const char *path,
                   char *err, size_t errlen)
{
    /* transformers 5 writes rope_parameters (with rope_theta inside);
     * earlier versions rope_scaling next to a top-level rope_theta. */
    const struct json *rs = json_get(cfg, "rope_parameters");
    if (!rs || json_type(rs) != JSON_OBJECT)
        rs = json_get(cfg, "rope_scaling");
    if (rs && json_type(rs) != JSON_OBJECT && json_type(rs) != JSON_NULL)
        CFG_ERR("%s: rope_scaling must be an object or null", path);
    double theta = 10000.0;
    if (hf_num(cfg, "rope_theta", theta, &theta, path, err, errlen) ||
        hf_num(rs, "rope_theta", theta, &theta, path, err, errlen))
        return -1;
    c->rope_theta = theta;
    double partial = 1.0;
    if (hf_num(cfg, "partial_rotary_factor", 1.0, &partial, path, err, errlen))
        return -1;
    if (!(partial > 0 && partial <= 1))
        CFG_ERR("%s: partial_rotary_factor %g must be in (0, 1]", path, partial);
    c->rope_dim = (int64_t)((double)c->head_dim * partial);
    if (check_rope_common(c, path, err, errlen))
        return -1;
    int64_t pairs = c->rope_dim / 2;
    c->rope_mscale = 1.0f;
    c->rope_factor = 1.0;
    c->rope_orig_ctx = c->n_ctx;

    const char *type = "default";
    if (rs && json_type(rs) == JSON_OBJECT) {
        const char *t = json_str(json_get(rs, "rope_type"), NULL);
        if (!t)
            t = json_str(json_get(rs, "type"), NULL);
        if (t)
            type = t;
    }
    double factors_short[MODEL_MAX_ROPE_PAIRS], factors_long[MODEL_MAX_ROPE_PAIRS];
    for (int64_t i = 0; i < pairs; i++)
        factors_short[i] = factors_long[i] = 1.0;

    if (!strcmp(type, "default")) {
        c->scaling = ROPE_NONE;
    } else if (!strcmp(type, "linear")) {
        c->scaling = ROPE_LINEAR;
        if (hf_num(rs, "factor", NAN, &c->rope_factor, path, err, errlen))
            return -1;
        if (!(c->rope_factor > 0))
            CFG_ERR("%s: rope_scaling.factor must be positive", path);
        for (int64_t i = 0; i < pairs; i++)
            factors_short[i] = factors_long[i] = c->rope_factor;
    } else if (!strcmp(type, "llama3")) {
        c->scaling = ROPE_LLAMA3;
        double lo, hi;
        int64_t orig;
        if (hf_num(rs, "factor", NAN, &c->rope_factor, path, err, errlen) ||
            hf_num(rs, "low_freq_factor", NAN, &lo, path, err, errlen) ||
            hf_num(rs, "high_freq_factor", NAN, &hi, path, err, errlen) ||
            hf_int(rs, "original_max_position_embeddings", -1, &orig, path, err, errlen))
            return -1;
        if (!(c->rope_factor > 0) || !(lo > 0) || !(hi > lo) || orig <= 0)
            CFG_ERR("%s: llama3 rope_scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor"
                    " and original_max_position_embeddings > 0", path);
        c->rope_orig_ctx = orig;
        for (int64_t i = 0; i < pairs; i++) {
            double inv = rope_base_inv(c, i);
            factors_short[i] = factors_long[i] =
                inv / rope_llama3(inv, c->rope_factor, lo, hi, (double)orig);
        }
    } else if (!strcmp(type, "longrope") || !strcmp(type, "su")) {
        c->scaling = ROPE_LONGROPE;
        int64_t orig;
        if (hf_int(rs, "original_max_position_embeddings", 0, &orig, path, err, errlen) ||
            (orig == 0 && hf_int(cfg, "original_max_position_embeddings", -1, &orig, path, err, errlen)))
            return -1;
        if (orig <= 0)
            CFG_ERR("%s: longrope needs original_max_position_embeddings > 0", path);
        c->rope_orig_ctx = orig;
        float fs[MODEL_MAX_ROPE_PAIRS], fl[MODEL_MAX_ROPE_PAIRS];
        if (hf_factor_list(json_get(rs, "short_factor"), "short_factor", fs, pairs, path, err, errlen) ||
            hf_factor_list(json_get(rs, "long_factor"), "long_factor", fl, pairs, path, err, errlen))
            return -1;
        for (int64_t i = 0; i < pairs; i++) {
            factors_short[i] = fs[i];
            factors_long[i] = fl[i];
        }
        c->rope_factor = (double)c->n_ctx / (double)orig;
        double af;
        if (hf_num(rs, "attention_factor", NAN, &af, path, err, errlen) == 0) {
            c->rope_mscale = (float)af;
        } else {
            c->rope_mscale = c->rope_factor <= 1.0 ? 1.0f
                : (float)sqrt(1.0 + log(c->rope_factor) / log((double)orig));
        }
    } else {
        char safe[CFG_SHOWN];
        CFG_ERR("%s: rope scaling type \"%s\" is not supported (supported: default, linear, llama3, longrope)",
                path, le_show(type, strlen(type), safe, sizeof(safe)));
    }
    for (int64_t i = 0; i < pairs; i++) {
        double inv = rope_base_inv(c, i);
        c->inv_freq_short[i] = (float)(inv / factors_short[i]);
        c->inv_freq_long[i] = (float)(inv / factors_long[i]);
    }
    c->rope_interleaved = 0;
    return 0;
}

int mc_from_hf(const struct json *cfg, const char *path, struct model_config *c,
               char *err, size_t errlen)
{
    memset(c, 0, sizeof(*c));
    c->format = FORMAT_HF;
    if (json_type(cfg) != JSON_OBJECT)
        CFG_ERR("%s: not a JSON object", path);
    const char *mt = json_str(json_get(cfg, "model_type"), NULL);
    if (!mt)
        CFG_ERR("%s: missing \"model_type\"", path);
    if (!strcmp(mt, "llama"))
        c->arch = ARCH_LLAMA;
    else if (!strcmp(mt, "mistral"))
        c->arch = ARCH_MISTRAL;
    else if (!strcmp(mt, "qwen2"))
        c->arch = ARCH_QWEN2;
    else if (!strcmp(mt, "phi3"))
        c->arch = ARCH_PHI3;
    else {
        char safe[CFG_SHOWN];
        CFG_ERR("%s: model_type \"%s\" is not supported (supported: llama, mistral, qwen2, phi3)",
                path, le_show(mt, strlen(mt), safe, sizeof(safe)));
    }
    snprintf(c->arch_name, sizeof(c->arch_name), "%s", mt);

    if (hf_int(cfg, "vocab_size", -1, &c->n_vocab, path, err, errlen) ||
        hf_int(cfg, "hidden_size", -1, &c->n_embd, path, err, errlen) ||
        hf_int(cfg, "num_hidden_layers", -1, &c->n_layer, path, err, errlen) ||
        hf_int(cfg, "num_attention_heads", -1, &c->n_head, path, err, errlen) ||
        hf_int(cfg, "intermediate_size", -1, &c->n_ff, path, err, errlen) ||
        hf_int(cfg, "max_position_embeddings", 2048, &c->n_ctx, path, err, errlen))
        return -1;
    if (hf_int(cfg, "num_key_value_heads", c->n_head, &c->n_head_kv, path, err, errlen))
        return -1;
    if (c->n_head <= 0)
        CFG_ERR("%s: num_attention_heads must be positive", path);
    if (hf_int(cfg, "head_dim", c->n_embd / c->n_head, &c->head_dim, path, err, errlen))
        return -1;
    if (hf_num(cfg, "rms_norm_eps", 1e-6, &c->rms_eps, path, err, errlen))
        return -1;
    if (check_shape(c, path, err, errlen))
        return -1;

    const struct json *tie = json_get(cfg, "tie_word_embeddings");
    c->tied_embeddings = tie ? json_bool(tie) : 0;
    c->qkv_bias = c->arch == ARCH_QWEN2;
    if (c->arch == ARCH_LLAMA && json_bool(json_get(cfg, "attention_bias")))
        CFG_ERR("%s: attention_bias=true is not supported for llama models", path);
    if (json_bool(json_get(cfg, "mlp_bias")))
        CFG_ERR("%s: mlp_bias=true is not supported", path);
    c->fused_qkv = c->fused_gate_up = c->arch == ARCH_PHI3;

    /* Sliding-window attention: Mistral and Phi-3 use it when set; Qwen2
     * only with use_sliding_window (and then not per layer: refused). */
    int64_t sw = 0;
    if (c->arch == ARCH_MISTRAL || c->arch == ARCH_PHI3) {
        if (hf_int(cfg, "sliding_window", 0, &sw, path, err, errlen))
            return -1;
    } else if (c->arch == ARCH_QWEN2 && json_bool(json_get(cfg, "use_sliding_window"))) {
        CFG_ERR("%s: Qwen2 use_sliding_window=true is not supported", path);
    }
    if (sw < 0)
        CFG_ERR("%s: sliding_window must be positive", path);
    c->sliding_window = sw;

    if (hf_rope(cfg, c, path, err, errlen))
        return -1;

    int64_t id;
    const struct json *b = json_get(cfg, "bos_token_id");
    c->bos_id = json_int64(b, &id) == 0 ? id : -1;
    const struct json *e = json_get(cfg, "eos_token_id");
    if (json_type(e) == JSON_ARRAY)
        e = json_at(e, 0);
    c->eos_id = json_int64(e, &id) == 0 ? id : -1;
    return 0;
}

/* ---------------------------------------------------------------- GGUF */

static int gg_int(const struct gguf_file *f, const char *arch, const char *suffix,
                  int64_t dflt, int64_t *out, const char *path, char *err, size_t errlen)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    if (gguf_find_key(f, key) < 0) {
        if (dflt < 0)
            CFG_ERR("%s: missing metadata key %s", path, key);
        *out = dflt;
        return 0;
    }
    if (gguf_get_i64(f, key, out) != 0)
        CFG_ERR("%s: metadata key %s must be an integer", path, key);
    return 0;
}

static int gg_num(const struct gguf_file *f, const char *arch, const char *suffix,
                  double dflt, double *out, const char *path, char *err, size_t errlen)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    if (gguf_find_key(f, key) < 0) {
        if (isnan(dflt))
            CFG_ERR("%s: missing metadata key %s", path, key);
        *out = dflt;
        return 0;
    }
    if (gguf_get_f64(f, key, out) != 0)
        CFG_ERR("%s: metadata key %s must be a number", path, key);
    return 0;
}

/* A per-pair factor tensor (rope_freqs / rope_factors_*): f32, rope_dim/2. */
static int gg_factor_tensor(const struct gguf_file *f, const char *name, int64_t pairs,
                            double *dst, const char *path, char *err, size_t errlen)
{
    const struct tensor *t = gguf_find_tensor(f, name);
    if (!t)
        return 1;
    if (t->dtype != K_F32 || t->n_dims != 1 || t->ne[0] != pairs)
        CFG_ERR("%s: tensor '%s' must be f32 with %lld elements (rotary dim / 2)",
                path, name, (long long)pairs);
    for (int64_t i = 0; i < pairs; i++) {
        float v;
        memcpy(&v, (const char *)t->data + 4 * i, 4);
        if (!(v > 0) || !isfinite(v))
            CFG_ERR("%s: tensor '%s' element %lld is not a positive number", path, name, (long long)i);
        dst[i] = v;
    }
    return 0;
}

int mc_from_gguf(const struct gguf_file *f, const char *path, struct model_config *c,
                 char *err, size_t errlen)
{
    memset(c, 0, sizeof(*c));
    c->format = FORMAT_GGUF;
    const char *arch = gguf_get_str(f, "general.architecture", NULL);
    if (!arch)
        CFG_ERR("%s: missing metadata key general.architecture", path);
    if (!strcmp(arch, "llama"))
        c->arch = ARCH_LLAMA;
    else if (!strcmp(arch, "qwen2"))
        c->arch = ARCH_QWEN2;
    else if (!strcmp(arch, "phi3"))
        c->arch = ARCH_PHI3;
    else {
        char safe[CFG_SHOWN];
        CFG_ERR("%s: general.architecture \"%s\" is not supported (supported: llama, qwen2, phi3)",
                path, le_show(arch, strlen(arch), safe, sizeof(safe)));
    }
    snprintf(c->arch_name, sizeof(c->arch_name), "%s", arch);

    if (gg_int(f, arch, "embedding_length", -1, &c->n_embd, path, err, errlen) ||
        gg_int(f, arch, "block_count", -1, &c->n_layer, path, err, errlen) ||
        gg_int(f, arch, "attention.head_count", -1, &c->n_head, path, err, errlen) ||
        gg_int(f, arch, "feed_forward_length", -1, &c->n_ff, path, err, errlen) ||
        gg_int(f, arch, "context_length", 2048, &c->n_ctx, path, err, errlen))
        return -1;
    if (gg_int(f, arch, "attention.head_count_kv", c->n_head, &c->n_head_kv, path, err, errlen))
        return -1;
    if (c->n_head <= 0)
        CFG_ERR("%s: %s.attention.head_count must be positive", path, arch);
    if (gg_int(f, arch, "attention.key_length", c->n_embd / c->n_head, &c->head_dim, path, err, errlen))
        return -1;
    int64_t vlen;
    if (gg_int(f, arch, "attention.value_length", c->head_dim, &vlen, path, err, errlen))
        return -1;
    if (vlen != c->head_dim)
        CFG_ERR("%s: attention.value_length %lld differs from key_length %lld (not supported)",
                path, (long long)vlen, (long long)c->head_dim);
    if (gg_num(f, arch, "attention.layer_norm_rms_epsilon", NAN, &c->rms_eps, path, err, errlen))
        return -1;
    /* Vocabulary: the embedding's row count is the truth; vocab_size, when
     * present, must agree (checked by the model against the tensor). */
    const struct tensor *emb = gguf_find_tensor(f, "token_embd.weight");
    if (!emb)
        CFG_ERR("%s: missing tensor token_embd.weight", path);
    if (emb->n_dims != 2)
        CFG_ERR("%s: tensor 'token_embd.weight' must have 2 dimensions", path);
    c->n_vocab = emb->ne[1];
    int64_t vs;
    if (gg_int(f, arch, "vocab_size", c->n_vocab, &vs, path, err, errlen))
        return -1;
    if (vs != c->n_vocab)
        CFG_ERR("%s: %s.vocab_size %lld differs from token_embd rows %lld",
                path, arch, (long long)vs, (long long)c->n_vocab);
    if (check_shape(c, path, err, errlen))
        return -1;

    c->tied_embeddings = gguf_find_tensor(f, "output.weight") == NULL;
    c->qkv_bias = gguf_find_tensor(f, "blk.0.attn_q.bias") != NULL;
    c->fused_qkv = gguf_find_tensor(f, "blk.0.attn_qkv.weight") != NULL;
    c->fused_gate_up = gguf_find_tensor(f, "blk.0.ffn_gate.weight") == NULL;
    int64_t sw;
    if (gg_int(f, arch, "attention.sliding_window", 0, &sw, path, err, errlen))
        return -1;
    c->sliding_window = sw > 0 ? sw : 0;

    /* RoPE. llama.cpp's converter permutes llama q/k rows so that pairs are
     * adjacent; qwen2 and phi3 keep the NeoX halves. */
    c->rope_interleaved = c->arch == ARCH_LLAMA;
    if (gg_num(f, arch, "rope.freq_base", 10000.0, &c->rope_theta, path, err, errlen) ||
        gg_int(f, arch, "rope.dimension_count", c->head_dim, &c->rope_dim, path, err, errlen))
        return -1;
    if (check_rope_common(c, path, err, errlen))
        return -1;
    int64_t pairs = c->rope_dim / 2;
    double fs[MODEL_MAX_ROPE_PAIRS], fl[MODEL_MAX_ROPE_PAIRS];
    for (int64_t i = 0; i < pairs; i++)
        fs[i] = fl[i] = 1.0;
    c->rope_mscale = 1.0f;
    c->rope_factor = 1.0;
    if (gg_int(f, arch, "rope.scaling.original_context_length", c->n_ctx, &c->rope_orig_ctx,
               path, err, errlen))
        return -1;
    char key[128];
    snprintf(key, sizeof(key), "%s.rope.scaling.type", arch);
    const char *stype = gguf_get_str(f, key, NULL);
    int r;
    if ((r = gg_factor_tensor(f, "rope_factors_long.weight", pairs, fl, path, err, errlen)) < 0)
        return -1;
    if (r == 0) {
        c->scaling = ROPE_LONGROPE;
        if (gg_factor_tensor(f, "rope_factors_short.weight", pairs, fs, path, err, errlen) != 0) {
            if (!err[0])
                snprintf(err, errlen, "%s: rope_factors_long.weight without rope_factors_short.weight", path);
            return -1;
        }
        if (c->rope_orig_ctx <= 0)
            CFG_ERR("%s: longrope needs rope.scaling.original_context_length", path);
        c->rope_factor = (double)c->n_ctx / (double)c->rope_orig_ctx;
        double af;
        if (gg_num(f, arch, "rope.scaling.attn_factor", NAN, &af, path, err, errlen) == 0)
            c->rope_mscale = (float)af;
        else
            c->rope_mscale = c->rope_factor <= 1.0 ? 1.0f
                : (float)sqrt(1.0 + log(c->rope_factor) / log((double)c->rope_orig_ctx));
        err[0] = 0;
    } else if ((r = gg_factor_tensor(f, "rope_freqs.weight", pairs, fs, path, err, errlen)) == 0) {
        c->scaling = ROPE_LLAMA3;
        for (int64_t i = 0; i < pairs; i++)
            fl[i] = fs[i];
    } else if (r < 0) {
        return -1;
    } else if (stype && !strcmp(stype, "linear")) {
        c->scaling = ROPE_LINEAR;
        if (gg_num(f, arch, "rope.scaling.factor", NAN, &c->rope_factor, path, err, errlen))
            return -1;
        if (!(c->rope_factor > 0))
            CFG_ERR("%s: %s.rope.scaling.factor must be positive", path, arch);
        for (int64_t i = 0; i < pairs; i++)
            fs[i] = fl[i] = c->rope_factor;
    } else if (stype && strcmp(stype, "none") != 0) {
        char safe[CFG_SHOWN];
        CFG_ERR("%s: %s \"%s\" is not supported (supported: none, linear, llama3 rope_freqs, longrope)",
                path, key, le_show(stype, strlen(stype), safe, sizeof(safe)));
    }
    for (int64_t i = 0; i < pairs; i++) {
        double inv = rope_base_inv(c, i);
        c->inv_freq_short[i] = (float)(inv / fs[i]);
        c->inv_freq_long[i] = (float)(inv / fl[i]);
    }
    int64_t id;
    c->bos_id = gguf_get_i64(f, "tokenizer.ggml.bos_token_id", &id) == 0 ? id : -1;
    c->eos_id = gguf_get_i64(f, "tokenizer.ggml.eos_token_id", &id) == 0 ? id : -1;
    return 0;
}
