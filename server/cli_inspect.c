/* cli_inspect.c: `inferd inspect MODEL`: what a model file holds and the
 * memory it needs, without running it. Main thread only. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "engine/kv_cache.h"
#include "engine/model.h"
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

int cli_inspect(int argc, char **argv)
{
    static const struct option opts[] = {
        {"kv-tokens", required_argument, 0, 'k'},
        {"load-format", required_argument, 0, 'L'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    int64_t kv_tokens = -1;
    int c, load_format = MODEL_LOAD_AUTO;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'k':
            if (cli_parse_int("--kv-tokens", optarg, 1, (int64_t)1 << 32, &kv_tokens))
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
            puts("usage: inferd inspect MODEL [--kv-tokens N] [--load-format dummy]\n"
                 "  --kv-tokens N   size the KV cache for N tokens (default: the context length)\n"
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
    model_destroy(m);
    return 0;
}
