/* cli_bench.c: `inferd bench engine MODEL`: offline prefill and decode
 * throughput at several batch sizes, printed next to this machine's
 * memory-bandwidth and compute ceilings measured in the same run (in the
 * style of `vllm bench throughput`; a benchmark, not a test). Also
 * dispatches `bench load` (cli_load.c) and `bench serve`, the online load
 * generator against any OpenAI-compatible server (cli_bench_serve.c).
 * Main thread. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/kv_cache.h"
#include "engine/model.h"
#include "server/cli.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct bench_result {
    int64_t batch;
    double prefill_tps, decode_tps, step_ms;
    double prefill_ceiling, decode_roofline;
};

/* xorshift: the prompts are random token ids, the same every run. */
static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* gpus: the GPUs bw and peak add up (tensor parallelism), each holding
 * its own share of every token's KV (model_kv_geom gives one GPU's). */
static int bench_batch(struct model *m, int64_t B, int64_t P, int64_t G, int64_t chunk,
                       double bw, double peak, int gpus, struct bench_result *res)
{
    const struct model_config *c = model_get_config(m);
    struct model_stats st;
    model_get_stats(m, &st);
    struct kv_geom g = model_kv_geom(m);
    char err[512];
    int rc = -1;
    int64_t per_seq_blocks = (P + G + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS;
    struct kv_cache *kv = kv_create(&g, B * per_seq_blocks, (int)B, err, sizeof(err));
    struct model_row *rows = calloc((size_t)(B * P), sizeof(*rows));
    float *logits = malloc((size_t)B * (size_t)c->n_vocab * sizeof(float));
    int *seq = calloc((size_t)B, sizeof(int));
    int32_t *last = calloc((size_t)B, sizeof(int32_t));
    /* greedy draws inside the step: on a GPU only token ids come back, as
     * in serving */
    struct model_sample *smp = calloc((size_t)B, sizeof(*smp));
    if (!kv || !rows || !logits || !seq || !last || !smp) {
        cli_error("bench: %s", kv ? "out of memory" : err);
        goto done;
    }
    struct samp_params sp = samp_params_default();
    sp.temperature = 0;
    for (int64_t b = 0; b < B; b++) {
        smp[b].row = b;
        if (!(smp[b].s = samp_create(&sp, c->n_vocab, err, sizeof(err)))) {
            cli_error("bench: %s", err);
            goto done;
        }
    }
    /* step buffers and decode graphs before the clock starts */
    if (model_prepare(m, kv, B * P < chunk ? B * P : chunk, (int)B, P + G, err, sizeof(err))) {
        cli_error("bench: %s", err);
        goto done;
    }
    uint64_t rs = 0x9e3779b97f4a7c15ull;
    for (int64_t b = 0; b < B; b++) {
        seq[b] = kv_seq_open(kv, model_rope_long_for(m, P + G));
        kv_seq_reserve(kv, seq[b], P + G);
        for (int64_t p = 0; p < P; p++) {
            struct model_row *r = &rows[b * P + p];
            r->token = (int32_t)(rng_next(&rs) % (uint64_t)c->n_vocab);
            r->seq = seq[b];
            r->pos = p;
            r->want_logits = p == P - 1;
        }
    }
    /* Prefill whole prompts, as many per step as fit in chunk rows (at
     * least one): what a server's chunked prefill runs. */
    double t0 = now_s();
    for (int64_t b0 = 0; b0 < B;) {
        int64_t nseq = chunk / P < 1 ? 1 : chunk / P;
        if (nseq > B - b0)
            nseq = B - b0;
        for (int64_t i = 0; i < nseq; i++)
            smp[b0 + i].row = i;
        if (model_forward_sample(m, kv, rows + b0 * P, nseq * P, logits, smp + b0, nseq, err,
                                 sizeof(err))) {
            cli_error("bench: %s", err);
            goto done;
        }
        b0 += nseq;
    }
    double t_prefill = now_s() - t0;
    for (int64_t b = 0; b < B; b++)
        smp[b].row = b;
    for (int64_t b = 0; b < B; b++)
        last[b] = smp[b].res.token;
    t0 = now_s();
    for (int64_t step = 0; step < G; step++) {
        for (int64_t b = 0; b < B; b++) {
            rows[b].token = last[b];
            rows[b].seq = seq[b];
            rows[b].pos = P + step;
            rows[b].want_logits = 1;
        }
        if (model_forward_sample(m, kv, rows, B, logits, smp, B, err, sizeof(err))) {
            cli_error("bench: %s", err);
            goto done;
        }
        for (int64_t b = 0; b < B; b++)
            last[b] = smp[b].res.token;
    }
    double t_decode = now_s() - t0;

    res->batch = B;
    res->prefill_tps = (double)(B * P) / t_prefill;
    res->decode_tps = (double)(B * G) / t_decode;
    res->step_ms = 1e3 * t_decode / (double)G;
    /* Decode roofline: each step streams the matmul weights once plus the
     * batch's keys and values at the mean context length. */
    double kv_read = (double)B * ((double)P + (double)G / 2) * (double)kv_bytes_per_token(&g) *
                     (double)gpus;
    res->decode_roofline = bw > 0 ? (double)B * bw / ((double)st.matmul_bytes + kv_read) : 0;
    /* Prefill ceiling: 2 FLOP per matmul parameter per token plus causal
     * attention (QK^T and PV: 2 x 2 x n_head x head_dim x mean context). */
    double attn = 4.0 * (double)c->n_layer * (double)(c->n_head * c->head_dim) * ((double)P / 2);
    res->prefill_ceiling = peak > 0 ? peak / (2.0 * (double)st.matmul_params + attn) : 0;
    rc = 0;
done:
    for (int64_t b = 0; smp && b < B; b++)
        samp_destroy(smp[b].s);
    free(smp);
    free(rows);
    free(logits);
    free(seq);
    free(last);
    kv_destroy(kv);
    return rc;
}

static int bench_engine(int argc, char **argv)
{
    static const struct option opts[] = {
        {"batch", required_argument, 0, 'b'},
        {"prompt", required_argument, 0, 'p'},
        {"gen", required_argument, 0, 'g'},
        {"threads", required_argument, 0, 'j'},
        {"json", required_argument, 0, 'o'},
        {"no-repack", no_argument, 0, 'R'},
        {"load-format", required_argument, 0, 'L'},
        {"device", required_argument, 0, 'D'},
        {"deterministic", no_argument, 0, 'T'},
        {"enforce-eager", no_argument, 0, 'E'},
        {"prefill-chunk", required_argument, 0, 'C'},
        {"tensor-parallel-size", required_argument, 0, 'P'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *batches = "1,8", *json_path = NULL;
    int64_t P = 128, G = 32, threads = 0, chunk = 8192, tp = 1;
    int c, no_repack = 0, load_format = MODEL_LOAD_AUTO, device = MODEL_DEVICE_CPU;
    int deterministic = 0, eager = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'b': batches = optarg; break;
        case 'p': if (cli_parse_int("--prompt", optarg, 1, 1 << 20, &P)) return 2; break;
        case 'g': if (cli_parse_int("--gen", optarg, 1, 1 << 20, &G)) return 2; break;
        case 'j': if (cli_parse_int("--threads", optarg, 0, 1024, &threads)) return 2; break;
        case 'o': json_path = optarg; break;
        case 'R': no_repack = 1; break;
        case 'L':
            if (strcmp(optarg, "dummy") == 0) {
                load_format = MODEL_LOAD_DUMMY;
            } else if (strcmp(optarg, "auto") != 0) {
                cli_error("--load-format: expected auto or dummy, got '%s'", optarg);
                return 2;
            }
            break;
        case 'D':
            if (cli_parse_device(optarg, &device))
                return 2;
            break;
        case 'T': deterministic = 1; break;
        case 'E': eager = 1; break;
        case 'C': if (cli_parse_int("--prefill-chunk", optarg, 1, 1 << 20, &chunk)) return 2; break;
        case 'P': if (cli_parse_int("--tensor-parallel-size", optarg, 1, 64, &tp)) return 2; break;
        case 'h':
            puts("usage: inferd bench engine MODEL [options]\n"
                 "  --batch LIST   batch sizes, comma-separated (default 1,8)\n"
                 "  --prompt N     prompt tokens per sequence (default 128)\n"
                 "  --gen N        decode steps (default 32)\n"
                 "  --prefill-chunk N  most prompt tokens per prefill step (default 8192;\n"
                 "                 a prompt longer than that still runs whole)\n"
                 "  --threads N    CPU threads (default: all)\n"
                 "  --no-repack    keep every weight in the file's layout\n"
                 "  --device D     cpu (default) or cuda (the first GPU; builds with CUDA)\n"
                 "  --deterministic  GPU: batch-invariant kernels (the CPU always is)\n"
                 "  --enforce-eager  GPU: no CUDA graphs for decode steps\n"
                 "  --tensor-parallel-size N  split the model over N ranks (CPU threads, or\n"
                   "                            one GPU each with --device cuda)\n"
                 "  --load-format dummy  MODEL is a config.json (or its directory): random\n"
                 "                 bf16 weights at that shape, no weight files needed\n"
                 "  --json FILE    also write the results as JSON");
            return 0;
        default:
            return 2;
        }
    }
    if (optind != argc - 1) {
        cli_error("bench engine: expected one MODEL path");
        return 2;
    }
    int32_t *bs;
    int64_t nb;
    if (cli_parse_ids("--batch", batches, &bs, &nb))
        return 2;
    for (int64_t i = 0; i < nb; i++)
        if (bs[i] < 1 || bs[i] > 4096) {
            cli_error("--batch: sizes must be in 1..4096");
            free(bs);
            return 2;
        }
    const char *path = argv[optind];
    char err[512];
    struct model *m;
    struct model_opts mo = {.n_threads = (int)threads, .no_repack = no_repack,
                            .load_format = load_format, .device = device,
                            .deterministic = deterministic, .enforce_eager = eager,
                            .tp = (int)tp};
    double t0 = now_s();
    if (model_load(path, &mo, &m, err, sizeof(err))) {
        cli_error("%s", err);
        free(bs);
        return 1;
    }
    double t_load = now_s() - t0;
    const struct model_config *cf = model_get_config(m);
    struct model_stats st;
    model_get_stats(m, &st);
    if (P + G > cf->n_ctx) {
        cli_error("bench: --prompt + --gen (%lld) exceed the context length %lld",
                  (long long)(P + G), (long long)cf->n_ctx);
        model_destroy(m);
        free(bs);
        return 2;
    }
    struct k_pool *pool = model_pool(m);
    double bw, f32 = 0, i8 = 0, bf16 = 0, peak;
    int quant = 0, gpu = model_on_device(m);
    const char *peak_name = "f32 FMA";
    printf("model       %s (%s, %.3f B params, matmul weights %.1f MiB)\n", path, cf->arch_name,
           (double)st.n_params / 1e9, (double)st.matmul_bytes / 1048576.0);
    if (gpu) {
        /* the GPU's own ceilings, measured here: HBM read bandwidth and
         * the bf16 tensor-core rate (every GPU weight is bf16) */
        char desc[256];
        if (model_device_ceilings(m, &bw, &bf16, desc, sizeof(desc)))
            cli_error("bench: the GPU's ceilings could not be measured; ratios are 0");
        printf("machine     %s; read bandwidth %.1f GB/s; bf16 GEMM %.1f TFLOP/s\n", desc,
               bw / 1e9, bf16 / 1e12);
        if (tp > 1) { /* every GPU streams its shard: the ceilings add up */
            bw *= (double)tp;
            bf16 *= (double)tp;
            printf("            x %lld GPUs: ceilings %.1f GB/s, %.1f TFLOP/s (the all-reduces "
                   "not counted)\n", (long long)tp, bw / 1e9, bf16 / 1e12);
        }
        peak = bf16;
        peak_name = "bf16 tensor-core";
    } else {
        bw = k_probe_bandwidth(pool, (size_t)1 << 30);
        f32 = k_probe_f32_flops(pool);
        i8 = k_probe_int8_ops(pool);
        for (int t = K_Q8_0; t < K_DTYPE_COUNT; t++)
            quant |= st.params_by_dtype[t] > 0;
        peak = quant && i8 > 0 ? i8 : f32;
        if (quant && i8 > 0)
            peak_name = "int8";
        printf("machine     %d threads, %s; read bandwidth %.1f GB/s; f32 FMA peak %.0f GFLOP/s;"
               " int8 dot peak %.0f GOP/s\n", k_pool_size(pool), k_isa_name(k_isa_detect()),
               bw / 1e9, f32 / 1e9, i8 / 1e9);
    }
    printf("load        %.3f s (repacked %lld matrices, %.1f MiB, in %.3f s)\n", t_load,
           (long long)st.repacked_tensors, (double)st.repacked_bytes / 1048576.0,
           st.repack_seconds);
    printf("prompt %lld tokens, %lld decode steps; ceilings: decode = bandwidth roofline,"
           " prefill = %s peak\n\n", (long long)P, (long long)G, peak_name);
    printf("%6s %14s %14s %8s %14s %14s %8s %10s\n", "batch", "prefill tok/s", "ceiling",
           "ratio", "decode tok/s", "roofline", "ratio", "step ms");
    struct bench_result *res = calloc((size_t)nb, sizeof(*res));
    int rc = res ? 0 : 1;
    for (int64_t i = 0; i < nb && rc == 0; i++) {
        if (bench_batch(m, bs[i], P, G, chunk, bw, peak, gpu ? (int)tp : 1, &res[i])) {
            rc = 1;
            break;
        }
        struct bench_result *r = &res[i];
        printf("%6lld %14.1f %14.1f %8.2f %14.1f %14.1f %8.2f %10.3f\n", (long long)r->batch,
               r->prefill_tps, r->prefill_ceiling, r->prefill_ceiling > 0 ? r->prefill_tps / r->prefill_ceiling : 0,
               r->decode_tps, r->decode_roofline, r->decode_roofline > 0 ? r->decode_tps / r->decode_roofline : 0,
               r->step_ms);
        fflush(stdout);
    }
    if (rc == 0 && json_path) {
        FILE *f = fopen(json_path, "w");
        if (!f) {
            cli_error("%s: cannot write", json_path);
            rc = 1;
        } else {
            fputs("{\"model\":\"", f);
            for (const char *q = path; *q; q++) {
                if (*q == '"' || *q == '\\')
                    fputc('\\', f);
                if ((unsigned char)*q < 0x20)
                    fprintf(f, "\\u%04x", *q);
                else
                    fputc(*q, f);
            }
            fprintf(f, "\",\"device\":\"%s\",\"threads\":%d,\"bandwidth_Bps\":%.0f,"
                       "\"f32_flops\":%.0f,\"int8_ops\":%.0f,\"bf16_flops\":%.0f,"
                       "\"load_s\":%.3f,\"prompt\":%lld,\"gen\":%lld,\"results\":[",
                    gpu ? "cuda" : "cpu", k_pool_size(pool), bw, f32, i8, bf16, t_load,
                    (long long)P, (long long)G);
            for (int64_t i = 0; i < nb; i++)
                fprintf(f, "%s{\"batch\":%lld,\"prefill_tps\":%.2f,\"prefill_ceiling\":%.2f,"
                           "\"decode_tps\":%.2f,\"decode_roofline\":%.2f,\"step_ms\":%.4f}",
                        i ? "," : "", (long long)res[i].batch, res[i].prefill_tps,
                        res[i].prefill_ceiling, res[i].decode_tps, res[i].decode_roofline,
                        res[i].step_ms);
            fprintf(f, "]}\n");
            fclose(f);
        }
    }
    free(res);
    free(bs);
    model_destroy(m);
    return rc;
}

int cli_bench(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "engine"))
        return bench_engine(argc - 1, argv + 1);
    if (argc >= 2 && !strcmp(argv[1], "load"))
        return cli_bench_load(argc - 1, argv + 1);
    if (argc >= 2 && !strcmp(argv[1], "serve"))
        return cli_bench_serve(argc - 1, argv + 1);
    cli_error("bench: expected 'engine', 'load' or 'serve' (usage: inferd bench engine|load MODEL"
              " [options], inferd bench serve [--base-url URL] [options])");
    return 2;
}
