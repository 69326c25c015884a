/* cli_run.c: `inferd logits` and `inferd generate`: run the engine on token
 * ids from the command line and print JSON, for tests and for people
 * checking a model by hand. Several prompts (separated by ';') run as one
 * batch, which is how tests check that a sequence's output does not depend
 * on its neighbours. Main thread only. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kv_cache.h"
#include "engine/model.h"
#include "server/cli.h"

struct run_args {
    const char *model;
    char *tokens;            /* "1,2,3;4,5" */
    int64_t threads;
    int64_t max_tokens;
    int64_t chunk;           /* prefill rows per step per sequence; 0 = all */
    int64_t rope_total;      /* planned length for the LongRoPE choice; 0 = auto */
    int all;                 /* logits: every position, not just the last */
    int ignore_eos;
    int no_repack;           /* keep the file's weight layout */
    int device;              /* MODEL_DEVICE_* */
    int64_t tp;              /* tensor-parallel ranks */
    int64_t nnodes, node_rank, master_port; /* multi-node: this is node 0 */
    const char *master_addr;
};

struct seqs {
    int n;
    int32_t **ids;
    int64_t *len;
};

static void seqs_free(struct seqs *s)
{
    for (int i = 0; i < s->n; i++)
        free(s->ids[i]);
    free(s->ids);
    free(s->len);
}

static int parse_seqs(const char *spec, struct seqs *s)
{
    memset(s, 0, sizeof(*s));
    char *copy = strdup(spec);
    if (!copy)
        return -1;
    int n = 1;
    for (const char *p = spec; *p; p++)
        n += *p == ';';
    s->ids = calloc((size_t)n, sizeof(int32_t *));
    s->len = calloc((size_t)n, sizeof(int64_t));
    if (!s->ids || !s->len)
        goto fail;
    char *save = NULL;
    for (char *tok = strtok_r(copy, ";", &save); tok; tok = strtok_r(NULL, ";", &save)) {
        if (cli_parse_ids("--tokens", tok, &s->ids[s->n], &s->len[s->n]))
            goto fail;
        s->n++;
    }
    if (s->n == 0) {
        cli_error("--tokens: no token ids given");
        goto fail;
    }
    free(copy);
    return 0;
fail:
    free(copy);
    seqs_free(s);
    return -1;
}

static int parse_args(int argc, char **argv, struct run_args *a, int is_generate)
{
    static const struct option opts[] = {
        {"tokens", required_argument, 0, 't'},
        {"threads", required_argument, 0, 'j'},
        {"max-tokens", required_argument, 0, 'n'},
        {"chunk", required_argument, 0, 'c'},
        {"rope-total", required_argument, 0, 'r'},
        {"all", no_argument, 0, 'a'},
        {"ignore-eos", no_argument, 0, 'e'},
        {"no-repack", no_argument, 0, 'R'},
        {"device", required_argument, 0, 'D'},
        {"tensor-parallel-size", required_argument, 0, 'T'},
        {"nnodes", required_argument, 0, 'N'},
        {"master-addr", required_argument, 0, 'A'},
        {"master-port", required_argument, 0, 'P'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    memset(a, 0, sizeof(*a));
    a->max_tokens = 16;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 't': a->tokens = optarg; break;
        case 'j': if (cli_parse_int("--threads", optarg, 0, 1024, &a->threads)) return 2; break;
        case 'n': if (cli_parse_int("--max-tokens", optarg, 1, 1 << 24, &a->max_tokens)) return 2; break;
        case 'c': if (cli_parse_int("--chunk", optarg, 0, 1 << 24, &a->chunk)) return 2; break;
        case 'r': if (cli_parse_int("--rope-total", optarg, 0, (int64_t)1 << 32, &a->rope_total)) return 2; break;
        case 'a': a->all = 1; break;
        case 'e': a->ignore_eos = 1; break;
        case 'R': a->no_repack = 1; break;
        case 'D': if (cli_parse_device(optarg, &a->device)) return 2; break;
        case 'T':
            if (cli_parse_int("--tensor-parallel-size", optarg, 1, 64, &a->tp))
                return 2;
            break;
        case 'N': if (cli_parse_int("--nnodes", optarg, 1, 64, &a->nnodes)) return 2; break;
        case 'A': a->master_addr = optarg; break;
        case 'P': if (cli_parse_int("--master-port", optarg, 1, 65534, &a->master_port)) return 2; break;
        case 'h':
            printf("usage: inferd %s MODEL --tokens IDS[;IDS...] [options]\n"
                   "  --tokens IDS      comma-separated token ids; ';' separates sequences run as one batch\n"
                   "  --threads N       CPU threads (default: all)\n"
                   "  --chunk N         prefill at most N prompt tokens per sequence per step (default: all)\n"
                   "  --rope-total N    planned sequence length for the LongRoPE factor choice\n"
                   "  --no-repack       keep every weight in the file's layout (same results)\n"
                   "  --device D        cpu (default) or cuda (the first GPU; builds with CUDA)\n"
                   "  --tensor-parallel-size N  split the model over N ranks (CPU threads, or\n"
                   "                            one GPU each with --device cuda)\n"
                   "  --nnodes N --master-port P [--master-addr A]  as node 0 of a multi-node\n"
                   "                    job whose other nodes run `inferd serve --node-rank R`\n"
                   "%s", is_generate ? "generate" : "logits",
                   is_generate ? "  --max-tokens N    tokens to generate (default 16)\n"
                                 "  --ignore-eos      do not stop at the end-of-sequence token\n"
                               : "  --all             logits of every position, not just the last\n");
            return 1;
        default:
            return 2;
        }
    }
    if (optind != argc - 1) {
        cli_error("expected one MODEL path");
        return 2;
    }
    if (!a->tokens) {
        cli_error("--tokens is required");
        return 2;
    }
    a->model = argv[optind];
    return 0;
}

static void print_floats(const float *v, int64_t n)
{
    putchar('[');
    for (int64_t i = 0; i < n; i++)
        printf(i ? ",%.9g" : "%.9g", (double)v[i]);
    putchar(']');
}

/* Shared driver: prefill every sequence (in chunks), then decode greedily
 * max_tokens - 1 further steps (generate) or stop after the prompt (logits). */
static int run(int argc, char **argv, int is_generate)
{
    struct run_args a;
    int rc = parse_args(argc, argv, &a, is_generate);
    if (rc)
        return rc == 1 ? 0 : rc;
    struct seqs s;
    if (parse_seqs(a.tokens, &s))
        return 2;
    char err[512];
    struct model *m = NULL;
    struct kv_cache *kv = NULL;
    struct model_row *rows = NULL;
    float *logits = NULL;
    int *seq_id = NULL;
    int32_t **out = NULL;
    int64_t *n_out = NULL, *done_prefill = NULL;
    int *finished = NULL;
    int *which_seq = NULL; /* (rows) sequence index of each batch row */
    int *row_seq = NULL;   /* (logit rows) sequence index of each logits row */
    rc = 1;

    struct model_opts mo = {.n_threads = (int)a.threads, .no_repack = a.no_repack,
                            .device = a.device, .tp = (int)a.tp, .nnodes = (int)a.nnodes,
                            .master_addr = a.master_addr, .master_port = (int)a.master_port};
    if (model_load(a.model, &mo, &m, err, sizeof(err))) {
        cli_error("%s", err);
        goto done;
    }
    const struct model_config *cf = model_get_config(m);
    int64_t gen = is_generate ? a.max_tokens : 0; /* tokens each sequence grows by */
    int64_t total_rows = 0, blocks = 0;
    for (int i = 0; i < s.n; i++) {
        int64_t len = s.len[i] + gen;
        if (len > cf->n_ctx) {
            cli_error("sequence %d: %lld tokens exceed the context length %lld", i,
                      (long long)len, (long long)cf->n_ctx);
            goto done;
        }
        total_rows += s.len[i];
        blocks += (len + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS;
    }
    struct kv_geom g = model_kv_geom(m);
    kv = kv_create(&g, blocks, s.n, err, sizeof(err));
    if (!kv) {
        cli_error("%s", err);
        goto done;
    }
    rows = calloc((size_t)(total_rows > s.n ? total_rows : s.n), sizeof(*rows));
    int64_t logit_rows = a.all ? total_rows : s.n;
    logits = malloc((size_t)logit_rows * (size_t)cf->n_vocab * sizeof(float));
    seq_id = calloc((size_t)s.n, sizeof(int));
    out = calloc((size_t)s.n, sizeof(int32_t *));
    n_out = calloc((size_t)s.n, sizeof(int64_t));
    done_prefill = calloc((size_t)s.n, sizeof(int64_t));
    finished = calloc((size_t)s.n, sizeof(int));
    which_seq = calloc((size_t)(total_rows > s.n ? total_rows : s.n), sizeof(int));
    row_seq = calloc((size_t)logit_rows, sizeof(int));
    if (!which_seq || !row_seq ||
        !rows || !logits || !seq_id || !out || !n_out || !done_prefill || !finished) {
        cli_error("out of memory");
        goto done;
    }
    for (int i = 0; i < s.n; i++) {
        int64_t planned = a.rope_total ? a.rope_total : s.len[i] + gen;
        seq_id[i] = kv_seq_open(kv, model_rope_long_for(m, planned));
        if (kv_seq_reserve(kv, seq_id[i], s.len[i] + gen)) {
            cli_error("KV cache too small");
            goto done;
        }
        out[i] = malloc((size_t)a.max_tokens * sizeof(int32_t));
        if (!out[i]) {
            cli_error("out of memory");
            goto done;
        }
    }

    /* Prefill, chunk by chunk; every sequence advances in each step. */
    int64_t logit_base = 0;
    for (;;) {
        int64_t n = 0;
        for (int i = 0; i < s.n; i++) {
            int64_t take = s.len[i] - done_prefill[i];
            if (a.chunk > 0 && take > a.chunk)
                take = a.chunk;
            for (int64_t k = 0; k < take; k++) {
                int64_t p = done_prefill[i] + k;
                rows[n].token = s.ids[i][p];
                rows[n].seq = seq_id[i];
                rows[n].pos = p;
                rows[n].want_logits = a.all || p == s.len[i] - 1;
                which_seq[n] = i;
                n++;
            }
            done_prefill[i] += take;
        }
        if (n == 0)
            break;
        if (model_forward(m, kv, rows, n, logits + logit_base * cf->n_vocab, err, sizeof(err))) {
            cli_error("%s", err);
            goto done;
        }
        for (int64_t r = 0; r < n; r++)
            if (rows[r].want_logits)
                row_seq[logit_base++] = which_seq[r];
    }

    if (!is_generate) {
        /* Rows arrive in step order; print each sequence's in position order. */
        printf("{\"n_vocab\":%lld,\"sequences\":[", (long long)cf->n_vocab);
        for (int i = 0; i < s.n; i++) {
            printf(i ? ",{\"logits\":[" : "{\"logits\":[");
            int first_row = 1;
            for (int64_t r = 0; r < logit_rows; r++) {
                if (row_seq[r] != i)
                    continue;
                if (!first_row)
                    putchar(',');
                print_floats(logits + r * cf->n_vocab, cf->n_vocab);
                first_row = 0;
            }
            printf("]}");
        }
        printf("]}\n");
        rc = 0;
        goto done;
    }

    /* Decode: the first generated token comes from the prefill logits. */
    for (int i = 0; i < s.n; i++) {
        int32_t t = (int32_t)cli_argmax(logits + (int64_t)i * cf->n_vocab, cf->n_vocab);
        out[i][n_out[i]++] = t;
        finished[i] = (!a.ignore_eos && t == cf->eos_id) || n_out[i] >= a.max_tokens;
    }
    for (;;) {
        int64_t n = 0;
        for (int i = 0; i < s.n; i++) {
            if (finished[i])
                continue;
            rows[n].token = out[i][n_out[i] - 1];
            rows[n].seq = seq_id[i];
            rows[n].pos = s.len[i] + n_out[i] - 1;
            rows[n].want_logits = 1;
            which_seq[n++] = i;
        }
        if (n == 0)
            break;
        if (model_forward(m, kv, rows, n, logits, err, sizeof(err))) {
            cli_error("%s", err);
            goto done;
        }
        for (int64_t r = 0; r < n; r++) {
            int i = which_seq[r];
            int32_t t = (int32_t)cli_argmax(logits + r * cf->n_vocab, cf->n_vocab);
            out[i][n_out[i]++] = t;
            finished[i] = (!a.ignore_eos && t == cf->eos_id) || n_out[i] >= a.max_tokens;
        }
    }
    printf("{\"sequences\":[");
    for (int i = 0; i < s.n; i++) {
        printf(i ? ",{\"tokens\":[" : "{\"tokens\":[");
        for (int64_t k = 0; k < n_out[i]; k++)
            printf(k ? ",%d" : "%d", out[i][k]);
        printf("]}");
    }
    printf("]}\n");
    rc = 0;
done:
    if (out)
        for (int i = 0; i < s.n; i++)
            free(out[i]);
    free(out);
    free(n_out);
    free(done_prefill);
    free(finished);
    free(which_seq);
    free(row_seq);
    free(seq_id);
    free(logits);
    free(rows);
    kv_destroy(kv);
    model_destroy(m);
    seqs_free(&s);
    return rc;
}

int cli_logits(int argc, char **argv) { return run(argc, argv, 0); }
int cli_generate(int argc, char **argv) { return run(argc, argv, 1); }
