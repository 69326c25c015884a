/* main.c: the inferd binary. Dispatches to a subcommand; the HTTP server
 * (`inferd serve`) arrives with the server issue. Main thread only. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>

#include "engine/model.h"
#include "server/cli.h"

void cli_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("inferd: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

int64_t cli_argmax(const float *v, int64_t n)
{
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (v[i] > v[best])
            best = i;
    return best;
}

int cli_parse_int(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi) {
        cli_error("%s: expected an integer in %lld..%lld, got '%s'", flag, (long long)lo,
                  (long long)hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_parse_size(const char *flag, const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    double mult = 1;
    if (end != s && *end) {
        switch (*end) {
        case 'k': case 'K': mult = 1024.0; break;
        case 'm': case 'M': mult = 1048576.0; break;
        case 'g': case 'G': mult = 1073741824.0; break;
        case 't': case 'T': mult = 1099511627776.0; break;
        default: mult = -1; break;
        }
        end++;
        if (*end == 'i' || *end == 'I')
            end++;
        if (*end == 'b' || *end == 'B')
            end++;
    }
    if (end == s || *end || errno || mult < 0 || !(v >= 0) || v * mult > 9.0e18) {
        cli_error("%s: expected a size such as 4G, 512M or 1073741824, got '%s'", flag, s);
        return -1;
    }
    *out = (int64_t)(v * mult);
    return 0;
}

int cli_parse_device(const char *s, int *out)
{
    if (strcmp(s, "cpu") == 0) {
        *out = MODEL_DEVICE_CPU;
        return 0;
    }
    if (strcmp(s, "cuda") == 0) {
        *out = MODEL_DEVICE_CUDA;
        return 0;
    }
    cli_error("--device: expected cpu or cuda, got '%s'", s);
    return -1;
}

int cli_parse_ids(const char *flag, const char *s, int32_t **ids, int64_t *n)
{
    int64_t cap = 16, cnt = 0;
    int32_t *a = malloc((size_t)cap * sizeof(int32_t));
    const char *p = s;
    if (!a)
        return -1;
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX || (*end && *end != ',')) {
            cli_error("%s: expected comma-separated token ids, got '%s'", flag, s);
            free(a);
            return -1;
        }
        if (cnt == cap) {
            cap *= 2;
            int32_t *na = realloc(a, (size_t)cap * sizeof(int32_t));
            if (!na) {
                free(a);
                return -1;
            }
            a = na;
        }
        a[cnt++] = (int32_t)v;
        p = *end ? end + 1 : end;
    }
    if (cnt == 0) {
        cli_error("%s: no token ids given", flag);
        free(a);
        return -1;
    }
    *ids = a;
    *n = cnt;
    return 0;
}

static void usage(FILE *f)
{
    fputs("usage: inferd <command> [options]\n"
          "\n"
          "commands:\n"
          "  serve [MODEL] [options]           the OpenAI-compatible HTTP server (the daemon)\n"
          "  run [MODEL] PROMPT [...]          generate text from a prompt, printed as it comes\n"
          "  inspect MODEL [--kv-tokens N]     describe a model file or directory\n"
          "  generate MODEL --tokens IDS [...] greedy generation from token ids\n"
          "  logits MODEL --tokens IDS [...]   print the logits of a token sequence (JSON)\n"
          "  bench engine MODEL [...]          offline prefill/decode throughput vs the machine's ceilings\n"
          "  bench load MODEL --workload F     concurrent requests through the batching engine\n"
          "  bench serve [--base-url URL ...]  load an OpenAI-compatible server over HTTP (TTFT, ITL, tok/s)\n"
          "  tokenize [MODEL] [TEXT]           the model's token ids for TEXT (or each JSON line of stdin)\n"
          "\n"
          "MODEL is a Hugging Face directory (config.json + *.safetensors) or a .gguf file.\n"
          "Run 'inferd <command> --help' for a command's options.\n", f);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(cmd, "--version")) {
        puts("inferd " INFERD_VERSION);
        return 0;
    }
    if (!strcmp(cmd, "inspect"))
        return cli_inspect(argc - 1, argv + 1);
    if (!strcmp(cmd, "logits"))
        return cli_logits(argc - 1, argv + 1);
    if (!strcmp(cmd, "generate"))
        return cli_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize"))
        return cli_tokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench"))
        return cli_bench(argc - 1, argv + 1);
    if (!strcmp(cmd, "serve"))
        return cli_serve(argc - 1, argv + 1);
    if (!strcmp(cmd, "run"))
        return cli_run(argc - 1, argv + 1);
    cli_error("unknown command '%s' (try 'inferd --help')", cmd);
    return 2;
}
