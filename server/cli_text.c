/* cli_text.c: `inferd run [MODEL] PROMPT`: text in, text out on the
 * command line. The prompt is tokenized with the model's own tokenizer,
 * prefilled, then tokens are sampled one by one (the API's sampling
 * parameters), detokenized incrementally and printed as they come, until
 * max tokens, the end-of-sequence token or a stop string. Speed figures go
 * to stderr. Main thread. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "engine/chat_template.h"
#include "engine/gguf.h"
#include "engine/json.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/stop.h"
#include "engine/tokenizer.h"
#include "server/cli.h"
#include "server/model_text.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* PROMPT as the user's message of a conversation (after an optional
 * system message), rendered with the model's chat template, generation
 * prompt added: malloc'd text, or NULL with err set. */
static char *render_chat(const char *src, const struct tokenizer *tok,
                         const struct model_config *cf, const char *system, const char *prompt,
                         char *err, size_t errlen)
{
    struct chat_template *ct = NULL;
    char *out = NULL, *bos = mt_token_text(tok, cf->bos_id), *eos = mt_token_text(tok, cf->eos_id);
    char cerr[400];
    if (!bos || !eos) {
        snprintf(err, errlen, "out of memory");
    } else if (chat_template_compile(src, strlen(src), &ct, cerr, sizeof(cerr))) {
        snprintf(err, errlen, "the model's chat template: %s", cerr);
    } else {
        struct chat_message msgs[2] = {{"system", system}, {"user", prompt}};
        struct chat_render_opts o = {.add_generation_prompt = 1, .bos_token = bos,
                                     .eos_token = eos};
        size_t len;
        if (chat_template_render(ct, system ? msgs : msgs + 1, system ? 2 : 1, &o, &out, &len,
                                 cerr, sizeof(cerr)))
            snprintf(err, errlen, "the model's chat template: %s", cerr);
    }
    chat_template_destroy(ct);
    free(bos);
    free(eos);
    return out;
}

/* Text to stdout (stop_feed may hand back a NULL empty piece). */
static void emit(const char *s, size_t n)
{
    if (n)
        fwrite(s, 1, n, stdout);
}

static int parse_float(const char *flag, const char *s, float *out)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end) {
        cli_error("%s: '%s' is not a number", flag, s);
        return -1;
    }
    *out = (float)v;
    return 0;
}

int cli_run(int argc, char **argv)
{
    static const struct option opts[] = {
        {"max-tokens", required_argument, 0, 'n'},
        {"temperature", required_argument, 0, 'T'},
        {"top-p", required_argument, 0, 'P'},
        {"top-k", required_argument, 0, 'K'},
        {"min-p", required_argument, 0, 'M'},
        {"presence-penalty", required_argument, 0, 'r'},
        {"frequency-penalty", required_argument, 0, 'f'},
        {"repetition-penalty", required_argument, 0, 'R'},
        {"seed", required_argument, 0, 's'},
        {"stop", required_argument, 0, 'S'},
        {"stop-token-ids", required_argument, 0, 'I'},
        {"threads", required_argument, 0, 'j'},
        {"ignore-eos", no_argument, 0, 'e'},
        {"no-repack", no_argument, 0, 'N'},
        {"special", no_argument, 0, 'X'},
        {"chat", no_argument, 0, 'C'},
        {"system", required_argument, 0, 'Y'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    struct samp_params sp = samp_params_default();
    sp.temperature = 0.0f; /* greedy unless asked */
    int64_t max_tokens = 256, threads = 0, seed = 0;
    int ignore_eos = 0, no_repack = 0, n_stop = 0, special = 0, chat = 0;
    const char *system = NULL;
    const char *stop_ids_arg = NULL;
    int32_t *stop_ids = NULL;
    int64_t n_stop_ids = 0;
    const char *stops[STOP_MAX];
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        int64_t v;
        switch (c) {
        case 'n': if (cli_parse_int("--max-tokens", optarg, 1, 1 << 24, &max_tokens)) return 2; break;
        case 'T': if (parse_float("--temperature", optarg, &sp.temperature)) return 2; break;
        case 'P': if (parse_float("--top-p", optarg, &sp.top_p)) return 2; break;
        case 'K':
            if (cli_parse_int("--top-k", optarg, -1, 1 << 24, &v))
                return 2;
            sp.top_k = (int32_t)v;
            break;
        case 'M': if (parse_float("--min-p", optarg, &sp.min_p)) return 2; break;
        case 'r': if (parse_float("--presence-penalty", optarg, &sp.presence_penalty)) return 2; break;
        case 'f': if (parse_float("--frequency-penalty", optarg, &sp.frequency_penalty)) return 2; break;
        case 'R': if (parse_float("--repetition-penalty", optarg, &sp.repetition_penalty)) return 2; break;
        case 's':
            if (cli_parse_int("--seed", optarg, 0, INT64_MAX, &seed))
                return 2;
            sp.seed = (uint64_t)seed;
            break;
        case 'S':
            if (n_stop == STOP_MAX) {
                cli_error("--stop: at most %d stop strings", STOP_MAX);
                return 2;
            }
            stops[n_stop++] = optarg;
            break;
        case 'I': stop_ids_arg = optarg; break;
        case 'j': if (cli_parse_int("--threads", optarg, 0, 1024, &threads)) return 2; break;
        case 'e': ignore_eos = 1; break;
        case 'N': no_repack = 1; break;
        case 'X': special = 1; break;
        case 'C': chat = 1; break;
        case 'Y': system = optarg; break;
        case 'h':
            puts("usage: inferd run [MODEL] PROMPT [options]\n"
                 "  MODEL                  a .gguf file or Hugging Face directory (default:\n"
                 "                         $INFERD_MODEL, else the model deploy/setup.sh installs)\n"
                 "  --max-tokens N         tokens to generate (default 256)\n"
                 "  --temperature T        0 (default) is greedy\n"
                 "  --top-p P --top-k K --min-p P\n"
                 "  --presence-penalty X --frequency-penalty X --repetition-penalty X\n"
                 "  --seed N               reproducible sampling\n"
                 "  --stop STR             stop before this text (up to 4)\n"
                 "  --stop-token-ids IDS   also stop at these token ids (comma-separated)\n"
                 "  --ignore-eos           do not stop at the end-of-sequence token\n"
                 "  --chat                 PROMPT is a user message: apply the model's chat template\n"
                 "  --system TEXT          with --chat, a system message first\n"
                 "  --special              parse special tokens written in PROMPT\n"
                 "                         (e.g. <|im_start|>; by default they are plain text)\n"
                 "  --threads N --no-repack");
            return 0;
        default:
            return 2;
        }
    }
    int npos = argc - optind;
    if (npos < 1 || npos > 2) {
        cli_error("run: expected [MODEL] PROMPT (see inferd run --help)");
        return 2;
    }
    if (system && !chat) {
        cli_error("--system needs --chat");
        return 2;
    }
    /* the last allocation before the cleanup path below */
    if (stop_ids_arg && cli_parse_ids("--stop-token-ids", stop_ids_arg, &stop_ids, &n_stop_ids))
        return 2;
    char defbuf[4096];
    const char *path = npos == 2 ? argv[optind] : mt_default_model(defbuf, sizeof(defbuf));
    const char *prompt = argv[argc - 1];

    char err[512];
    int rc = 1;
    struct model *m = NULL;
    struct tokenizer *tok = NULL;
    struct kv_cache *kv = NULL;
    struct sampler *smp = NULL;
    struct stop_matcher *stop = NULL;
    struct tok_stream *ts = NULL;
    char *tmpl = NULL, *rendered = NULL;
    int32_t *ids = NULL;
    struct model_row *rows = NULL;
    float *logits = NULL;
    size_t n_ids = 0;

    struct stat sb;
    if (npos == 1 && stat(path, &sb) != 0) {
        cli_error("no model given and %s does not exist: run deploy/setup.sh run, or name a "
                  "model (inferd run MODEL PROMPT)", path);
        goto done;
    }
    double t0 = now_s();
    struct model_opts mo = {.n_threads = (int)threads, .no_repack = no_repack};
    if (model_load(path, &mo, &m, err, sizeof(err)) ||
        !(tok = mt_open_tokenizer(path, chat, &tmpl, err, sizeof(err)))) {
        cli_error("%s", err);
        goto done;
    }
    const struct model_config *cf = model_get_config(m);
    if (tokenizer_n_vocab(tok) > cf->n_vocab) {
        cli_error("%s: the tokenizer has %lld tokens, the model %lld", path,
                  (long long)tokenizer_n_vocab(tok), (long long)cf->n_vocab);
        goto done;
    }
    if (!(smp = samp_create(&sp, cf->n_vocab, err, sizeof(err))) ||
        !(stop = stop_create(stops, n_stop, err, sizeof(err)))) {
        cli_error("%s", err);
        goto done;
    }
    /* the prompt is the user's text: special tokens are parsed only on
     * request (--special). With --chat the template's output is encoded
     * as HF's apply_chat_template does: its special tokens parsed, no
     * BOS added (the template writes its own). */
    if (chat) {
        if (!tmpl) {
            cli_error("%s: the model ships no chat template (run it without --chat)", path);
            goto done;
        }
        if (!(rendered = render_chat(tmpl, tok, cf, system, prompt, err, sizeof(err)))) {
            cli_error("%s", err);
            goto done;
        }
    }
    if (chat ? tokenizer_encode(tok, rendered, strlen(rendered), 0, 1, &ids, &n_ids, err,
                                sizeof(err))
             : tokenizer_encode(tok, prompt, strlen(prompt), 1, special, &ids, &n_ids, err,
                                sizeof(err))) {
        cli_error("%s", err);
        goto done;
    }
    if (n_ids == 0) {
        cli_error("run: the prompt is empty and the model adds no BOS token");
        goto done;
    }
    int64_t total = (int64_t)n_ids + max_tokens;
    if (total > cf->n_ctx) {
        total = cf->n_ctx;
        if ((int64_t)n_ids >= total) {
            cli_error("run: the prompt (%zu tokens) fills the context length %lld", n_ids,
                      (long long)cf->n_ctx);
            goto done;
        }
    }
    struct kv_geom g = model_kv_geom(m);
    kv = kv_create(&g, (total + KV_BLOCK_TOKENS - 1) / KV_BLOCK_TOKENS, 1, err, sizeof(err));
    rows = calloc(n_ids, sizeof(*rows));
    logits = malloc((size_t)cf->n_vocab * sizeof(float));
    ts = tok_stream_create(tok, 1);
    if (!kv || !rows || !logits || !ts) {
        cli_error("%s", kv ? "out of memory" : err);
        goto done;
    }
    int seq = kv_seq_open(kv, model_rope_long_for(m, total));
    if (seq < 0 || kv_seq_reserve(kv, seq, total) || samp_accept_prompt(smp, ids, (int64_t)n_ids)) {
        cli_error("run: cannot reserve the KV cache");
        goto done;
    }
    double t_load = now_s() - t0;
    t0 = now_s();
    for (size_t i = 0; i < n_ids; i++)
        rows[i] = (struct model_row){ids[i], seq, (int64_t)i, i + 1 == n_ids};
    if (model_forward(m, kv, rows, (int64_t)n_ids, logits, err, sizeof(err))) {
        cli_error("%s", err);
        goto done;
    }
    double t_prefill = now_s() - t0;
    t0 = now_s();
    int64_t n_gen = 0;
    const char *why = "max_tokens";
    for (int64_t pos = (int64_t)n_ids; pos < total; pos++) {
        struct samp_result res;
        int32_t next = samp_sample(smp, logits, &res);
        if (next < 0) {
            cli_error("run: no token can be sampled (every logit is -inf or NaN)");
            goto done;
        }
        n_gen++;
        if (!ignore_eos && next == cf->eos_id) {
            why = "eos";
            break;
        }
        int stop_id = 0;
        for (int64_t k = 0; k < n_stop_ids; k++)
            stop_id |= stop_ids[k] == next;
        if (stop_id) {
            why = "stop_token";
            break;
        }
        size_t pl, ol;
        const char *piece = tok_stream_push(ts, next, &pl), *o;
        if (!piece) {
            cli_error("out of memory");
            goto done;
        }
        int hit = stop_feed(stop, piece, pl, &o, &ol);
        emit(o, ol);
        fflush(stdout);
        if (hit >= 0) {
            why = "stop";
            break;
        }
        if (pos + 1 == total)
            break;
        samp_accept(smp, next);
        struct model_row r = {next, seq, pos, 1};
        if (model_forward(m, kv, &r, 1, logits, err, sizeof(err))) {
            cli_error("%s", err);
            goto done;
        }
    }
    if (strcmp(why, "stop") != 0) {
        size_t pl, ol;
        const char *piece = tok_stream_finish(ts, &pl), *o;
        if (piece) {
            int hit = stop_feed(stop, piece, pl, &o, &ol);
            emit(o, ol);
            if (hit < 0) {
                stop_flush(stop, &o, &ol);
                emit(o, ol);
            }
        }
    }
    printf("\n");
    fflush(stdout);
    double t_dec = now_s() - t0;
    fprintf(stderr,
            "inferd: %zu prompt tokens, %lld generated (%s); load %.2f s, prefill %.1f tok/s, "
            "decode %.1f tok/s\n",
            n_ids, (long long)n_gen, why, t_load, (double)n_ids / t_prefill,
            n_gen > 1 ? (double)(n_gen - 1) / t_dec : 0.0);
    rc = 0;
done:
    free(stop_ids);
    free(tmpl);
    free(rendered);
    free(ids);
    free(rows);
    free(logits);
    tok_stream_destroy(ts);
    stop_destroy(stop);
    samp_destroy(smp);
    kv_destroy(kv);
    tokenizer_destroy(tok);
    model_destroy(m);
    return rc;
}

/* `inferd tokenize [MODEL] [TEXT]`: the model's token ids for TEXT as a JSON
 * array; without TEXT, one JSON string per line of stdin, one array per
 * line of stdout (so a script tokenizes many texts with one load). Special
 * tokens written in the text stay plain text unless --special. */
int cli_tokenize(int argc, char **argv)
{
    int special = 0, add_special = 0, c;
    static const struct option opts[] = {
        {"special", no_argument, 0, 's'},
        {"add-special", no_argument, 0, 'a'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 's': special = 1; break;
        case 'a': add_special = 1; break;
        case 'h':
            puts("usage: inferd tokenize [MODEL] [TEXT] [--special] [--add-special]\n"
                 "  without TEXT: reads one JSON string per line, writes one JSON array per line");
            return 0;
        default:
            return 2;
        }
    }
    char buf[4096], err[512];
    const char *path = NULL, *text = NULL;
    int left = argc - optind;
    if (left == 2) {
        path = argv[optind];
        text = argv[optind + 1];
    } else if (left == 1) {
        struct stat st;
        if (stat(argv[optind], &st) == 0)
            path = argv[optind];
        else
            text = argv[optind];
    } else if (left > 2) {
        cli_error("tokenize: usage: inferd tokenize [MODEL] [TEXT]");
        return 2;
    }
    if (!path)
        path = mt_default_model(buf, sizeof(buf));
    char *tmpl_unused = NULL;
    struct tokenizer *tok = mt_open_tokenizer(path, 0, &tmpl_unused, err, sizeof(err));
    if (!tok) {
        cli_error("%s", err);
        return 1;
    }
    int rc = 0;
    char *line = NULL;
    size_t cap = 0;
    for (;;) {
        const char *s = text;
        size_t len = text ? strlen(text) : 0;
        struct json *j = NULL;
        if (!text) {
            ssize_t n = getline(&line, &cap, stdin);
            if (n < 0)
                break;
            j = json_parse(line, (size_t)n, err, sizeof(err));
            s = j ? json_str(j, &len) : NULL;
            if (!s) {
                cli_error("tokenize: each input line must be one JSON string%s%s", j ? "" : ": ",
                          j ? "" : err);
                json_free(j);
                rc = 1;
                break;
            }
        }
        int32_t *ids = NULL;
        size_t n_ids = 0;
        if (tokenizer_encode(tok, s, len, add_special, special, &ids, &n_ids, err, sizeof(err))) {
            cli_error("tokenize: %s", err);
            json_free(j);
            rc = 1;
            break;
        }
        putchar('[');
        for (size_t i = 0; i < n_ids; i++)
            printf("%s%d", i ? ", " : "", ids[i]);
        puts("]");
        free(ids);
        json_free(j);
        if (text)
            break;
    }
    fflush(stdout);
    free(line);
    tokenizer_destroy(tok);
    return rc;
}
