/* cli_inspect.c: `inferd inspect MODEL`: what a model file holds and the
 * memory it needs, without running it; with --tp N, how it would be split
 * over N tensor-parallel ranks (engine/tp_plan.h). Main thread only. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/tp_plan.h"
#include "server/cli.h"

static const char *rope_name(enum rope_scaling s)
{
    switch (s) {
    case ROPE_NONE: return "none";
    case ROPE_LINEAR: return "linear";
    case ROPE_LLAMA3: return "llama3";
    case ROPE_LONGROPE: return "longrope";
    }
    return "?";
}

static void print_bytes(const char *label, double b)
{
    printf("%-22s %.2f MiB (%.0f bytes)\n", label, b / 1048576.0, b);
}

/* ------------------------------------------------------- tensor parallel */

/* The plan wants each matrix role's dtype, but the model shows only how
 * many tensors and parameters each dtype has (model_get_stats). A file
 * with one matrix dtype (HF checkpoints, dummy shapes, most GGUF types) is
 * exact: that dtype everywhere, norms in the other float type present.
 * For a mixed file (GGUF Q4_K_M: Q4_K and Q6_K) the bytes use the dtype
 * holding the most parameters and o_proj/down_proj the one with the
 * largest blocks, so the block rule errs on the side of refusing.
 * Returns whether the file is mixed. */
static int tp_dtypes_from_stats(const struct model_stats *st, struct tp_dtypes *dt)
{
    int dom = -1, strict = -1, n_matrix = 0;
    for (int t = 0; t < K_DTYPE_COUNT; t++)
        if (st->params_by_dtype[t] &&
            (dom < 0 || st->params_by_dtype[t] > st->params_by_dtype[dom]))
            dom = t;
    if (dom < 0)
        dom = K_BF16;
    /* GGUF and dummy shapes keep norms in f32; HF checkpoints in the
     * matrices' float type */
    enum k_dtype vec = st->tensors_by_dtype[K_F32] || k_dtype_block((enum k_dtype)dom) != 1
                           ? K_F32
                           : (enum k_dtype)dom;
    for (int t = 0; t < K_DTYPE_COUNT; t++) {
        if (!st->tensors_by_dtype[t] || (t == (int)vec && t != dom))
            continue;
        n_matrix++;
        if (strict < 0 || k_dtype_block((enum k_dtype)t) > k_dtype_block((enum k_dtype)strict))
            strict = t;
    }
    tp_dtypes_uniform(dt, (enum k_dtype)dom, vec);
    if (strict >= 0 && k_dtype_block((enum k_dtype)strict) > k_dtype_block((enum k_dtype)dom))
        dt->o = dt->down = (enum k_dtype)strict;
    return n_matrix > 1;
}

static void print_range(char *buf, size_t n, int64_t a, int64_t b, const char *mark)
{
    snprintf(buf, n, "[%lld,%lld)%s", (long long)a, (long long)b, mark);
}

/* The per-rank table and the totals the README's arithmetic uses. */
static void print_tp(const struct model_config *cf, const struct model_stats *st,
                     const struct tp_plan *p, const struct tp_dtypes *dt, int mixed,
                     int64_t kv_tokens)
{
    const double gib = 1024.0 * 1024.0 * 1024.0;
    int64_t kv_tok = (kv_tokens + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS * KV_BLOCK_TOKENS;
    printf("\n%-22s %d rank%s: q/k/v and gate/up column-parallel, o_proj and down_proj"
           " row-parallel, embedding and LM head vocab-parallel\n",
           "tensor parallel", p->tp, p->tp == 1 ? "" : "s");
    if (p->kv_replicated)
        printf("%-22s %lld for %d ranks: one per rank, each replicated on %lld ranks (*)\n",
               "KV heads", (long long)cf->n_head_kv, p->tp, (long long)p->kv_replicas);
    else
        printf("%-22s %lld per rank\n", "KV heads", (long long)p->rank[0].n_kv_heads);
    printf("%-22s %lld rows per rank (ceil(%lld / %d) rounded up to %d)\n", "vocabulary shards",
           (long long)p->vocab_per_rank, (long long)cf->n_vocab, p->tp, TP_VOCAB_PAD);
    if (mixed)
        printf("%-22s mixed file: bytes as if every matrix were %s, o_proj and down_proj"
               " checked as %s\n",
               "dtypes (guessed)", k_dtype_name(dt->q), k_dtype_name(dt->down));
    char kvh[40];
    snprintf(kvh, sizeof(kvh), "KV GiB (%lld tok)", (long long)kv_tok);
    printf("%-5s %-12s %-10s %-16s %-18s %12s %12s %20s\n", "rank", "q heads", "kv heads",
           "ff columns", "vocab", "weights GiB", "KV B/token", kvh);
    int64_t sum_w = 0, sum_kv = 0;
    for (int r = 0; r < p->tp; r++) {
        const struct tp_rank_plan *rp = &p->rank[r];
        char q[32], kv[32], ff[32], voc[32];
        print_range(q, sizeof(q), rp->q_head0, rp->q_head0 + rp->n_q_heads, "");
        print_range(kv, sizeof(kv), rp->kv_head0, rp->kv_head0 + rp->n_kv_heads,
                    p->kv_replicated ? "*" : "");
        print_range(ff, sizeof(ff), rp->ff0, rp->ff0 + rp->n_ff, "");
        print_range(voc, sizeof(voc), rp->vocab0, rp->vocab1, "");
        printf("%-5d %-12s %-10s %-16s %-18s %12.3f %12lld %20.3f\n", r, q, kv, ff, voc,
               (double)rp->weight_bytes / gib, (long long)rp->kv_bytes_per_token,
               (double)kv_tok * (double)rp->kv_bytes_per_token / gib);
        sum_w += rp->weight_bytes;
        sum_kv += rp->kv_bytes_per_token;
    }
    printf("%-22s %.3f GiB (%lld bytes) = unsharded %lld + replicated %lld + vocab padding"
           " %lld\n",
           "weights, all ranks", (double)sum_w / gib, (long long)sum_w,
           (long long)p->total_weight_bytes, (long long)p->replicated_bytes,
           (long long)p->vocab_pad_bytes);
    if (p->total_weight_bytes != st->weight_bytes)
        printf("%-22s the model's tensors hold %lld bytes: per-matrix dtypes are not visible"
               " to inspect\n",
               "note", (long long)st->weight_bytes);
    printf("%-22s %lld bytes (%s K and V; unsharded %lld)\n", "KV per token, all",
           (long long)sum_kv, k_dtype_name(dt->kv), (long long)p->kv_bytes_per_token);
    printf("%-22s 2 x %lld layers x %lld = %lld values, %.2f MiB %s per token; plus %lld after"
           " the embedding and a %lld-value logits all-gather\n",
           "all-reduce", (long long)cf->n_layer, (long long)cf->n_embd,
           (long long)p->allreduce_values_per_token,
           (double)p->allreduce_bytes_per_token / 1048576.0, k_dtype_name(dt->act),
           (long long)p->embd_allreduce_values, (long long)p->logits_gather_values);
}

int cli_inspect(int argc, char **argv)
{
    static const struct option opts[] = {
        {"kv-tokens", required_argument, 0, 'k'},
        {"load-format", required_argument, 0, 'L'},
        {"tp", required_argument, 0, 't'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    int64_t kv_tokens = -1, tp = 0;
    int c, load_format = MODEL_LOAD_AUTO;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'k':
            if (cli_parse_int("--kv-tokens", optarg, 1, (int64_t)1 << 32, &kv_tokens))
                return 2;
            break;
        case 't':
            if (cli_parse_int("--tp", optarg, 1, TP_MAX, &tp))
                return 2;
            break;
        case 'L':
            /* only sizes are printed: the weights need no values */
            if (strcmp(optarg, "dummy") == 0) {
                load_format = MODEL_LOAD_SHAPES;
            } else if (strcmp(optarg, "auto") != 0) {
                cli_error("--load-format: expected auto or dummy, got '%s'", optarg);
                return 2;
            }
            break;
        case 'h':
            puts("usage: inferd inspect MODEL [--kv-tokens N] [--load-format dummy] [--tp N]\n"
                 "  --kv-tokens N   size the KV cache for N tokens (default: the context length)\n"
                 "  --tp N          how the model splits over N tensor-parallel ranks (1-64):\n"
                 "                  heads, MLP columns, vocabulary, weights and KV per rank\n"
                 "  --load-format dummy  MODEL is a config.json (or its directory): the sizes\n"
                 "                  of that shape, no weight files needed");
            return 0;
        default:
            return 2;
        }
    }
    if (optind != argc - 1) {
        cli_error("inspect: expected one MODEL path");
        return 2;
    }
    const char *path = argv[optind];
    char err[512];
    struct model *m;
    struct model_opts mo = {.n_threads = 1, .load_format = load_format};
    if (model_load(path, &mo, &m, err, sizeof(err))) {
        cli_error("%s", err);
        return 1;
    }
    const struct model_config *cf = model_get_config(m);
    struct model_stats st;
    model_get_stats(m, &st);
    if (kv_tokens < 0)
        kv_tokens = cf->n_ctx;
    struct kv_geom g = model_kv_geom(m);
    /* planned before anything is printed: a size the shape cannot take is
     * a usage error, like any other bad flag */
    struct tp_plan plan;
    struct tp_dtypes dt;
    int mixed = 0;
    if (tp) {
        mixed = tp_dtypes_from_stats(&st, &dt);
        if (tp_plan_make(cf, &dt, (int)tp, &plan, err, sizeof(err))) {
            cli_error("--tp %lld: %s", (long long)tp, err);
            model_destroy(m);
            return 2;
        }
    }

    printf("%-22s %s\n", "model", path);
    printf("%-22s %s\n", "format", cf->format == FORMAT_GGUF ? "gguf" : "safetensors");
    printf("%-22s %s\n", "architecture", cf->arch_name);
    printf("%-22s %lld\n", "layers", (long long)cf->n_layer);
    printf("%-22s %lld\n", "hidden size", (long long)cf->n_embd);
    printf("%-22s %lld\n", "attention heads", (long long)cf->n_head);
    printf("%-22s %lld\n", "key/value heads", (long long)cf->n_head_kv);
    printf("%-22s %lld\n", "head dim", (long long)cf->head_dim);
    printf("%-22s %lld\n", "intermediate size", (long long)cf->n_ff);
    printf("%-22s %lld\n", "vocabulary", (long long)cf->n_vocab);
    printf("%-22s %lld\n", "context length", (long long)cf->n_ctx);
    if (cf->sliding_window)
        printf("%-22s %lld\n", "sliding window", (long long)cf->sliding_window);
    printf("%-22s %s\n", "tied embeddings", cf->tied_embeddings ? "yes" : "no");
    printf("%-22s %s\n", "qkv bias", cf->qkv_bias ? "yes" : "no");
    printf("%-22s theta %g, dims %lld, %s, scaling %s", "rope", cf->rope_theta,
           (long long)cf->rope_dim, cf->rope_interleaved ? "interleaved" : "neox",
           rope_name(cf->scaling));
    if (cf->scaling != ROPE_NONE)
        printf(" (factor %g, original context %lld)", cf->rope_factor, (long long)cf->rope_orig_ctx);
    if (cf->rope_mscale != 1.0f)
        printf(" attention factor %g", (double)cf->rope_mscale);
    printf("\n");
    printf("%-22s %lld (%.3f B)\n", "parameters", (long long)st.n_params, (double)st.n_params / 1e9);
    printf("%-22s", "dtypes");
    for (int t = 0; t < K_DTYPE_COUNT; t++)
        if (st.tensors_by_dtype[t])
            printf(" %s: %lld tensors, %lld params;", k_dtype_name((enum k_dtype)t),
                   (long long)st.tensors_by_dtype[t], (long long)st.params_by_dtype[t]);
    printf("\n");
    print_bytes("weights", (double)st.weight_bytes);
    print_bytes("file size", (double)st.file_bytes);
    char label[64];
    snprintf(label, sizeof(label), "KV cache (%lld tok)", (long long)kv_tokens);
    int64_t blocks = (kv_tokens + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS;
    print_bytes(label, (double)blocks * KV_BLOCK_TOKENS * (double)kv_bytes_per_token(&g));
    printf("%-22s %lld bytes (f32 K and V, all layers)\n", "KV per token",
           (long long)kv_bytes_per_token(&g));
    if (tp)
        print_tp(cf, &st, &plan, &dt, mixed, kv_tokens);
    model_destroy(m);
    return 0;
}
