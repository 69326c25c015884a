/* cli_load.c: `inferd bench load MODEL --workload FILE`: drives the
 * continuous-batching engine in-process with runs of concurrent requests
 * and reports aggregate output tokens/s and TTFT per run as JSON.
 * tests/bench/bench_concurrency.py writes the workload and runs the same
 * token ids against llama.cpp's server side by side.
 *
 * Workload: {"runs": [{"name", "concurrency", "max_tokens", "warm_first",
 * "prompts": [[ids...], ...]}]}. A run submits all its prompts at once,
 * or, with warm_first, prompt 0 alone and the rest when prompt 0's first
 * token arrives. Every request is greedy, ignores EOS and generates exactly
 * max_tokens. Main thread, plus the engine's. */
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/engine.h"
#include "engine/json.h"
#include "engine/model.h"
#include "server/cli.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The engine's wake callback: one condition variable the main thread
 * sleeps on between polls. */
struct waker {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t gen;
};

static void wake_cb(void *arg)
{
    struct waker *w = arg;
    pthread_mutex_lock(&w->mu);
    w->gen++;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static void wait_wake(struct waker *w, uint64_t *seen)
{
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_nsec += 50 * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&w->mu);
    if (w->gen == *seen)
        pthread_cond_timedwait(&w->cv, &w->mu, &dl);
    *seen = w->gen;
    pthread_mutex_unlock(&w->mu);
}

struct load_req {
    int32_t *ids;
    int64_t n_ids;
    struct engine_req *h;
    double t_submit, t_first, t_done;
    int64_t tokens, cached;
    int done;
};

static char *slurp_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[n] = 0;
    *len = (size_t)n;
    return buf;
}

static int submit_one(struct engine *e, struct load_req *q, int64_t max_tokens)
{
    struct engine_params p;
    memset(&p, 0, sizeof(p));
    p.prompt = q->ids;
    p.n_prompt = q->n_ids;
    p.samp = samp_params_default();
    p.samp.temperature = 0;
    p.max_tokens = max_tokens;
    p.n = 1;
    p.ignore_eos = 1;
    char err[256];
    q->t_submit = now_s();
    int rc = engine_submit(e, &p, &q->h, err, sizeof(err));
    if (rc != ENGINE_OK) {
        cli_error("bench load: submit: %s", err);
        return -1;
    }
    return 0;
}

/* Drains q's events; returns 1 once its DONE was seen. */
static int drain(struct load_req *q)
{
    struct engine_event ev[64];
    int n;
    while ((n = engine_poll(q->h, ev, 64)) > 0) {
        for (int i = 0; i < n; i++) {
            if (ev[i].kind == ENGINE_EV_TOKEN) {
                if (q->tokens++ == 0)
                    q->t_first = now_s();
            } else if (ev[i].kind == ENGINE_EV_FINISH && ev[i].finish == ENGINE_FINISH_ERROR) {
                cli_error("bench load: request failed: %s", ev[i].message);
            } else if (ev[i].kind == ENGINE_EV_DONE) {
                q->done = 1;
                q->t_done = now_s();
                q->cached = ev[i].cached_tokens;
            }
        }
    }
    return q->done;
}

/* Runs one workload entry; appends its JSON object to out. */
static int run_one(struct engine *e, struct waker *wk, const struct json *run, FILE *out,
                   int first)
{
    const char *name = json_str(json_get(run, "name"), NULL);
    int64_t max_tokens = 0;
    if (json_int64(json_get(run, "max_tokens"), &max_tokens) || max_tokens < 1) {
        cli_error("bench load: a run needs max_tokens >= 1");
        return -1;
    }
    const struct json *prompts = json_get(run, "prompts");
    size_t n = json_len(prompts);
    if (json_type(prompts) != JSON_ARRAY || n == 0) {
        cli_error("bench load: a run needs a non-empty prompts array");
        return -1;
    }
    int warm = json_bool(json_get(run, "warm_first"));
    struct load_req *q = calloc(n, sizeof(*q));
    int rc = -1;
    if (!q)
        return -1;
    for (size_t i = 0; i < n; i++) {
        const struct json *a = json_at(prompts, i);
        q[i].n_ids = (int64_t)json_len(a);
        q[i].ids = malloc((size_t)(q[i].n_ids + 1) * sizeof(int32_t));
        if (!q[i].ids)
            goto done;
        for (int64_t k = 0; k < q[i].n_ids; k++) {
            int64_t v;
            if (json_int64(json_at(a, (size_t)k), &v) || v < 0 || v > INT32_MAX) {
                cli_error("bench load: prompt %zu: token %lld is not a token id", i, (long long)k);
                goto done;
            }
            q[i].ids[k] = (int32_t)v;
        }
    }
    struct engine_stats before;
    engine_get_stats(e, &before);
    uint64_t seen = 0;
    double t0 = now_s();
    size_t submitted = warm ? 1 : n;
    for (size_t i = 0; i < submitted; i++)
        if (submit_one(e, &q[i], max_tokens) != 0)
            goto done;
    size_t finished = 0;
    while (finished < n) {
        wait_wake(wk, &seen);
        finished = 0;
        for (size_t i = 0; i < submitted; i++)
            finished += q[i].done || drain(&q[i]);
        if (submitted < n && (q[0].tokens > 0 || q[0].done)) {
            for (size_t i = submitted; i < n; i++)
                if (submit_one(e, &q[i], max_tokens) != 0)
                    goto done;
            submitted = n;
        }
    }
    double t_end = 0;
    int64_t toks = 0, cached = 0;
    for (size_t i = 0; i < n; i++) {
        toks += q[i].tokens;
        cached += q[i].cached;
        if (q[i].t_done > t_end)
            t_end = q[i].t_done;
    }
    struct engine_stats after;
    engine_get_stats(e, &after);
    double wall = t_end - t0;
    fprintf(out, "%s    {\"name\": \"%s\", \"concurrency\": %zu, \"output_tokens\": %lld, "
                 "\"wall_s\": %.4f, \"tok_s\": %.3f, \"cached_tokens\": %lld, "
                 "\"preemptions\": %lld, \"prompt_tokens_computed\": %lld, \"ttft_s\": [",
            first ? "" : ",\n", name ? name : "", n, (long long)toks, wall,
            wall > 0 ? (double)toks / wall : 0.0, (long long)cached,
            (long long)(after.preemptions - before.preemptions),
            (long long)(after.prompt_tokens_computed - before.prompt_tokens_computed));
    for (size_t i = 0; i < n; i++)
        fprintf(out, "%s%.4f", i ? ", " : "", q[i].t_first - q[i].t_submit);
    fprintf(out, "], \"finish_s\": [");
    for (size_t i = 0; i < n; i++)
        fprintf(out, "%s%.4f", i ? ", " : "", q[i].t_done - q[i].t_submit);
    fprintf(out, "]}");
    fflush(out);
    fprintf(stderr, "%-16s c=%-3zu %6lld tokens in %7.2f s: %7.2f tok/s, TTFT first %.2f s, "
                    "cached %lld\n",
            name ? name : "", n, (long long)toks, wall, wall > 0 ? (double)toks / wall : 0.0,
            q[0].t_first - q[0].t_submit, (long long)cached);
    rc = 0;
done:
    for (size_t i = 0; i < n; i++) {
        engine_release(q[i].h);
        free(q[i].ids);
    }
    free(q);
    return rc;
}

int cli_bench_load(int argc, char **argv)
{
    static const struct option opts[] = {
        {"workload", required_argument, 0, 'w'},
        {"json", required_argument, 0, 'o'},
        {"threads", required_argument, 0, 'j'},
        {"kv-cache-memory", required_argument, 0, 'k'},
        {"max-seqs", required_argument, 0, 's'},
        {"max-batched-tokens", required_argument, 0, 'b'},
        {"max-queue", required_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *workload = NULL, *json_path = NULL;
    int64_t threads = 0, v;
    struct engine_opts eo;
    memset(&eo, 0, sizeof(eo));
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'w': workload = optarg; break;
        case 'o': json_path = optarg; break;
        case 'j': if (cli_parse_int("--threads", optarg, 0, 1024, &threads)) return 2; break;
        case 'k': if (cli_parse_size("--kv-cache-memory", optarg, &eo.kv_cache_bytes)) return 2; break;
        case 's':
            if (cli_parse_int("--max-seqs", optarg, 1, 65536, &v))
                return 2;
            eo.max_seqs = (int)v;
            break;
        case 'b':
            if (cli_parse_int("--max-batched-tokens", optarg, 1, 1 << 20, &v))
                return 2;
            eo.max_batched_tokens = v;
            break;
        case 'q':
            if (cli_parse_int("--max-queue", optarg, 1, 1 << 24, &v))
                return 2;
            eo.max_queue = (int)v;
            break;
        case 'h':
            puts("usage: inferd bench load MODEL --workload FILE [options]\n"
                 "  --workload FILE          runs of concurrent prompts (JSON, see tests/bench/bench_concurrency.py)\n"
                 "  --json FILE              write the results there (default: stdout)\n"
                 "  --threads N              CPU threads (default: one per CPU)\n"
                 "  --kv-cache-memory SIZE   KV cache budget, e.g. 2G\n"
                 "  --max-seqs N             most sequences resident at once (default 64)\n"
                 "  --max-batched-tokens N   most token rows per step (default 256)\n"
                 "  --max-queue N            most requests waiting for admission (default 1024)");
            return 0;
        default:
            return 2;
        }
    }
    if (optind + 1 != argc || !workload) {
        cli_error("bench load: usage: inferd bench load MODEL --workload FILE [options]");
        return 2;
    }
    size_t len;
    char *text = slurp_file(workload, &len);
    if (!text) {
        cli_error("bench load: cannot read %s", workload);
        return 1;
    }
    char err[512];
    struct json *wl = json_parse(text, len, err, sizeof(err));
    free(text);
    if (!wl) {
        cli_error("bench load: %s: %s", workload, err);
        return 1;
    }
    const struct json *runs = json_get(wl, "runs");
    if (json_type(runs) != JSON_ARRAY) {
        cli_error("bench load: %s: expected {\"runs\": [...]}", workload);
        json_free(wl);
        return 1;
    }
    struct model *m = NULL;
    struct model_opts mo = {.n_threads = (int)threads};
    double t_load = now_s();
    if (model_load(argv[optind], &mo, &m, err, sizeof(err))) {
        cli_error("%s", err);
        json_free(wl);
        return 1;
    }
    struct waker wk = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    eo.wake = wake_cb;
    eo.wake_arg = &wk;
    struct engine *e = engine_create(m, &eo, err, sizeof(err));
    if (!e) {
        cli_error("%s", err);
        model_destroy(m);
        json_free(wl);
        return 1;
    }
    struct engine_limits lim;
    engine_get_limits(e, &lim);
    fprintf(stderr, "engine: KV cache %lld tokens (%lld blocks, %.1f MiB), max-seqs %d, "
                    "max-batched-tokens %lld, max-model-len %lld; ready in %.2f s\n",
            (long long)lim.kv_tokens, (long long)lim.kv_blocks, (double)lim.kv_bytes / 1048576.0,
            lim.max_seqs, (long long)lim.max_batched_tokens, (long long)lim.max_model_len,
            now_s() - t_load);
    FILE *out = json_path ? fopen(json_path, "w") : stdout;
    int rc = 0;
    if (!out) {
        cli_error("bench load: cannot write %s", json_path);
        rc = 1;
        goto end;
    }
    fprintf(out, "{\"model\": \"%s\", \"kv_tokens\": %lld, \"runs\": [\n", argv[optind],
            (long long)lim.kv_tokens);
    for (size_t i = 0; i < json_len(runs); i++) {
        if (run_one(e, &wk, json_at(runs, i), out, i == 0) != 0) {
            rc = 1;
            break;
        }
    }
    fprintf(out, "\n]}\n");
    if (json_path)
        fclose(out);
end:
    engine_destroy(e);
    model_destroy(m);
    json_free(wl);
    return rc;
}
