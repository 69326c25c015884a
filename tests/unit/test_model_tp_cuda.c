/* test_model_tp_cuda.c: tensor parallelism over GPUs (model_tp_cuda.c and
 * the rank side of model_cuda.c) on a machine without one: the kcuda.h
 * double (fake_kcuda.c) in its computing mode, so each rank's shard does
 * real arithmetic on host memory, and the NCCL double (fake_nccl.c) over
 * the CPU communicator, its collectives in stream order (captured into
 * graphs as NCCL's are). Built only with the CUDA toolkit, as the code
 * under test is.
 *
 * What it checks, for TP = 2, 4 and 8 against one device, on random
 * weights (row and column slices made from the dummy stream) and on the
 * GGUF fixtures (quantised and f16/f32 rows converted and sliced):
 *   - the sampled tokens of a prefill over interleaved sequences, of
 *     decode steps replayed from graphs (collectives inside), and of a
 *     step launched before the last was collected (the sampled ids
 *     broadcast to every rank, resolved on each);
 *   - the logits that go back to the host (the vocabulary slices laid side
 *     by side, padding dropped), within bf16 rounding of one device's;
 *   - no broken invariant in any rank's cache or block tables;
 *   - a GPU that fails mid-job stops the job with a reason that names it,
 *     model_failed reports it, later calls fail at once, nothing hangs;
 *   - two nodes (a forked follower, the NCCL double over comm_tcp): the
 *     same tokens and logits through the control plane (WELCOME with the
 *     NCCL id and sizes, STEP with the sampled rows and placeholders), a
 *     clean shutdown, and a follower killed mid-job stopping the leader;
 *   - refusals: more ranks than GPUs, a split the shapes forbid, ranks that
 *     do not split over the nodes;
 *   - the engine on 2 GPUs: the KV budget from each GPU's memory and a
 *     greedy request, launched ahead, token for token as on one. */
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/model.h"
#include "tests/unit/fake_kcuda.h"

static int failures;
#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);         \
            failures++;                                                                      \
        }                                                                                    \
    } while (0)

/* 8 query heads over 4 KV heads: 2 and 4 ranks split them, 8 replicate
 * the KV heads; a vocabulary no rank count divides (padding, a short last
 * slice); head_dim 8, the smallest the CUDA kernels take. */
static const char *config_json =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\","
    " \"hidden_size\": 64, \"intermediate_size\": 128, \"num_attention_heads\": 8,"
    " \"num_key_value_heads\": 4, \"num_hidden_layers\": 2, \"vocab_size\": 1000,"
    " \"max_position_embeddings\": 1024, \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0,"
    " \"tie_word_embeddings\": %s, \"bos_token_id\": 1, \"eos_token_id\": 2}";

static char cfg_untied[80], cfg_tied[80];

static void check_clean(const char *what)
{
    if (fake_kc.violations)
        fprintf(stderr, "%s: %lld violations, first: %s\n", what,
                (long long)fake_kc.violations, fake_kc.first_violation);
    CHECK(fake_kc.violations == 0);
    fake_kc.violations = 0;
}

static struct model *load(const char *path, int dummy, int tp, int eager, char *err,
                          size_t errlen)
{
    struct model_opts o = {.device = MODEL_DEVICE_CUDA, .tp = tp, .enforce_eager = eager,
                           .n_threads = 2, .dummy_seed = 5,
                           .load_format = dummy ? MODEL_LOAD_DUMMY : MODEL_LOAD_AUTO};
    struct model *m = NULL;
    if (model_load(path, &o, &m, err, errlen))
        return NULL;
    return m;
}

static struct sampler *greedy(int64_t V)
{
    struct samp_params p = samp_params_default();
    p.temperature = 0;
    p.logprobs = 1;
    p.top_logprobs = 20; /* the double's 20th: the argmax's margin */
    char err[256];
    struct sampler *s = samp_create(&p, V, err, sizeof(err));
    if (!s) {
        fprintf(stderr, "samp_create: %s\n", err);
        exit(1);
    }
    return s;
}

/* What one run gives: its sampled tokens in order, and the logits rows
 * that went back to the host. */
#define MAX_TOK 64
#define HOST_ROWS 13
struct run {
    int32_t tok[MAX_TOK];
    float margin[MAX_TOK]; /* the token's logit over the next one */
    int n_tok;
    float *logits; /* (HOST_ROWS, V) */
    int64_t V;
    int64_t graph_launches;
};

static void keep(struct run *r, const struct samp_result *res)
{
    if (r->n_tok < MAX_TOK) {
        r->margin[r->n_tok] = res->n_top == 20 ? res->top[19].logprob : 0;
        r->tok[r->n_tok++] = res->token;
    }
}

/* Prefill of three interleaved sequences (two sampled, one to the host),
 * five decode steps (graphs unless eager), a launch ahead, and one
 * 12-row model_forward whose logits the LM head makes in two chunks. */
static int scenario(struct model *m, struct run *out)
{
    const int64_t V = model_get_config(m)->n_vocab;
    char err[256];
    struct kv_geom g = model_kv_geom(m);
    struct kv_cache *kv = kv_create(&g, 64, 8, err, sizeof(err));
    if (!kv) {
        fprintf(stderr, "kv_create: %s\n", err);
        return -1;
    }
    fake_kc.kv_slots = 64 * 16;
    memset(out, 0, sizeof(*out));
    out->V = V;
    out->logits = calloc((size_t)HOST_ROWS * (size_t)V, sizeof(float));
    float *lg = calloc((size_t)16 * (size_t)V, sizeof(float));
    struct sampler *s[3] = {greedy(V), greedy(V), greedy(V)};
    int rc = -1;
    if (model_prepare(m, kv, 64, 8, 512, err, sizeof(err))) {
        fprintf(stderr, "model_prepare: %s\n", err);
        goto done;
    }
    int64_t g0 = fake_kc.graph_launches;
    int seq[3];
    int64_t len[3] = {9, 4, 13};
    int32_t last[3];
    struct model_row rows[32];
    struct model_sample smp[8];
    uint64_t rs = 777;
    int64_t n = 0, at[3] = {0, 0, 0};
    for (int i = 0; i < 3; i++) {
        seq[i] = kv_seq_open(kv, 0);
        CHECK(kv_seq_reserve(kv, seq[i], 100) == 0);
    }
    while (n < len[0] + len[1] + len[2])
        for (int i = 0; i < 3; i++) {
            if (at[i] >= len[i])
                continue;
            rs = rs * 6364136223846793005ull + 1442695040888963407ull;
            rows[n++] = (struct model_row){(int32_t)((rs >> 33) % (uint64_t)V), seq[i], at[i],
                                           at[i] == len[i] - 1};
            at[i]++;
        }
    /* want rows in row order: sequence 1 ends first, then 0, then 2 */
    smp[0] = (struct model_sample){.row = 1, .s = s[0]};
    smp[1] = (struct model_sample){.row = 2, .s = s[2]};
    if (model_forward_sample(m, kv, rows, n, lg, smp, 2, err, sizeof(err))) {
        fprintf(stderr, "prefill: %s\n", err);
        goto done;
    }
    memcpy(out->logits, lg, (size_t)V * sizeof(float)); /* sequence 1's, want row 0 */
    last[0] = smp[0].res.token, last[2] = smp[1].res.token, last[1] = 7;
    keep(out, &smp[0].res);
    keep(out, &smp[1].res);
    for (int step = 0; step < 5; step++) {
        for (int k = 0; k < 3; k++) {
            int i = step % 2 ? 2 - k : k;
            rows[k] = (struct model_row){last[i], seq[i], len[i], 1};
            smp[k] = (struct model_sample){.row = k, .s = s[i]};
        }
        if (model_forward_sample(m, kv, rows, 3, lg, smp, 3, err, sizeof(err))) {
            fprintf(stderr, "decode: %s\n", err);
            goto done;
        }
        for (int k = 0; k < 3; k++) {
            int i = step % 2 ? 2 - k : k;
            last[i] = smp[k].res.token;
            len[i]++;
            keep(out, &smp[k].res);
        }
    }
    /* P, then Q naming P's samples before P is collected */
    struct model_row rp[3], rq[3];
    struct model_sample sp[3], sq[3];
    for (int k = 0; k < 3; k++) {
        rp[k] = (struct model_row){last[k], seq[k], len[k], 1};
        sp[k] = (struct model_sample){.row = k, .s = s[k]};
        rq[2 - k] = (struct model_row){MODEL_TOKEN_PREV(k), seq[k], len[k] + 1, 1};
        sq[2 - k] = (struct model_sample){.row = 2 - k, .s = s[k], .ahead = 1};
    }
    if (model_launch(m, kv, rp, 3, lg, sp, 3, err, sizeof(err)) ||
        model_launch(m, kv, rq, 3, lg, sq, 3, err, sizeof(err)) ||
        model_collect(m, err, sizeof(err)) || model_collect(m, err, sizeof(err))) {
        fprintf(stderr, "launch ahead: %s\n", err);
        goto done;
    }
    for (int k = 0; k < 3; k++) {
        keep(out, &sp[k].res);
        keep(out, &sq[2 - k].res);
    }
    /* 12 rows all wanting logits: more than the 8 the LM head takes */
    kv_seq_close(kv, seq[1]);
    int s4 = kv_seq_open(kv, 0);
    CHECK(kv_seq_reserve(kv, s4, 12) == 0);
    for (int64_t p = 0; p < 12; p++)
        rows[p] = (struct model_row){(int32_t)((p * 97 + 3) % V), s4, p, 1};
    if (model_forward(m, kv, rows, 12, out->logits + V, err, sizeof(err))) {
        fprintf(stderr, "model_forward: %s\n", err);
        goto done;
    }
    out->graph_launches = fake_kc.graph_launches - g0;
    rc = 0;
done:
    for (int i = 0; i < 3; i++)
        samp_destroy(s[i]);
    free(lg);
    kv_destroy(kv);
    return rc;
}

/* b against the one-device run a: logits within bf16 rounding (the sums
 * run in another order and round at every rank), and the same tokens up to
 * the first that a near tie in a decides: a's top two within twice what
 * rounding moved the compared logits (then the sequences part ways; the
 * logits compared are of fixed inputs and stay comparable). */
static void compare(const struct run *a, const struct run *b, const char *what)
{
    double worst = 0, scale = 0;
    for (int64_t i = 0; i < HOST_ROWS * a->V; i++) {
        double d = fabs((double)a->logits[i] - (double)b->logits[i]);
        worst = d > worst ? d : worst;
        scale = fabs((double)a->logits[i]) > scale ? fabs((double)a->logits[i]) : scale;
    }
    if (!(worst <= 0.03 * scale + 1e-4))
        fprintf(stderr, "%s: logits differ by %g (largest %g)\n", what, worst, scale);
    CHECK(scale > 0);
    CHECK(worst <= 0.03 * scale + 1e-4);
    CHECK(a->n_tok == b->n_tok && a->n_tok > 0);
    for (int i = 0; i < a->n_tok && i < b->n_tok; i++) {
        if (a->tok[i] == b->tok[i])
            continue;
        /* a tie within what rounding moved the compared logits by */
        int tie = a->margin[i] <= 2 * worst + 1e-6;
        fprintf(stderr, "%s: token %d is %d, not %d (margin %g, logits moved %g: %s)\n", what,
                i, b->tok[i], a->tok[i], (double)a->margin[i], worst,
                tie ? "a near tie, compared up to here" : "a real difference");
        CHECK(tie);
        break;
    }
}

static void run_model(const char *path, int dummy, const int *tps, int n_tps, int eager)
{
    char err[256];
    struct run ref, got;
    struct model *m = load(path, dummy, 1, eager, err, sizeof(err));
    if (!m) {
        fprintf(stderr, "%s: %s\n", path, err);
        failures++;
        return;
    }
    int rc = scenario(m, &ref);
    model_destroy(m);
    CHECK(rc == 0);
    check_clean(path);
    if (rc)
        return;
    /* 5 decode steps and the 2 launched ahead replay graphs */
    CHECK(eager ? ref.graph_launches == 0 : ref.graph_launches == 7);
    for (int i = 0; i < n_tps; i++) {
        char what[300];
        snprintf(what, sizeof(what), "%s TP=%d%s", path, tps[i], eager ? " eager" : "");
        m = load(path, dummy, tps[i], eager, err, sizeof(err));
        if (!m) {
            fprintf(stderr, "%s: %s\n", what, err);
            failures++;
            continue;
        }
        int64_t gl0 = fake_kc.graph_launches;
        rc = scenario(m, &got);
        model_destroy(m);
        CHECK(rc == 0);
        check_clean(what);
        if (rc == 0) {
            compare(&ref, &got, what);
            /* every rank replays each decode step's graph */
            CHECK(eager ? got.graph_launches == 0
                        : fake_kc.graph_launches - gl0 == 7 * (int64_t)tps[i]);
        }
        free(got.logits);
    }
    free(ref.logits);
}

/* GPU 1 fails mid-job: the step fails naming it, the job stops for good
 * (model_failed), and destroying the model does not hang. */
static void test_failure(void)
{
    char err[256];
    /* eager: a failing launch, not a graph replay, is what the double
     * can inject */
    struct model *m = load(cfg_untied, 1, 2, 1, err, sizeof(err));
    if (!m) {
        fprintf(stderr, "failure: %s\n", err);
        failures++;
        return;
    }
    struct kv_geom g = model_kv_geom(m);
    struct kv_cache *kv = kv_create(&g, 16, 2, err, sizeof(err));
    fake_kc.kv_slots = 16 * 16;
    int s = kv_seq_open(kv, 0);
    CHECK(kv_seq_reserve(kv, s, 8) == 0);
    struct sampler *sp = greedy(1000);
    struct model_row row = {5, s, 0, 1};
    struct model_sample smp = {.row = 0, .s = sp};
    float *lg = calloc(1000, sizeof(float));
    char why[256] = "";
    CHECK(model_forward_sample(m, kv, &row, 1, lg, &smp, 1, err, sizeof(err)) == 0);
    CHECK(!model_failed(m, why, sizeof(why)));
    /* a bad batch fails alike everywhere and the job goes on */
    row = (struct model_row){5000, s, 1, 1};
    CHECK(model_forward_sample(m, kv, &row, 1, lg, &smp, 1, err, sizeof(err)) != 0);
    CHECK(strstr(err, "outside the vocabulary") != NULL);
    CHECK(!model_failed(m, why, sizeof(why)));
    fake_kc.fail_device = 2; /* GPU 1's next GEMM fails */
    row = (struct model_row){smp.res.token, s, 1, 1};
    CHECK(model_forward_sample(m, kv, &row, 1, lg, &smp, 1, err, sizeof(err)) != 0);
    CHECK(strstr(err, "GPU rank 1") != NULL);
    fake_kc.fail_device = 0;
    CHECK(model_failed(m, why, sizeof(why)));
    CHECK(strstr(why, "GPU rank 1") != NULL);
    row = (struct model_row){3, s, 1, 1};
    CHECK(model_forward_sample(m, kv, &row, 1, lg, &smp, 1, err, sizeof(err)) != 0);
    CHECK(strstr(err, "tensor parallelism stopped") != NULL);
    fake_kc.violations = 0; /* the aborted collectives' */
    samp_destroy(sp);
    free(lg);
    kv_destroy(kv);
    model_destroy(m);
}

static void expect_refusal(const char *path, int dummy, int tp, int nnodes, const char *needle)
{
    struct model_opts o = {.device = MODEL_DEVICE_CUDA, .tp = tp, .n_threads = 1,
                           .nnodes = nnodes, .master_port = 29500, .dummy_seed = 5,
                           .load_format = dummy ? MODEL_LOAD_DUMMY : MODEL_LOAD_AUTO};
    struct model *m = NULL;
    char err[256] = "";
    int rc = model_load(path, &o, &m, err, sizeof(err));
    CHECK(rc != 0 && !m);
    if (!strstr(err, needle))
        fprintf(stderr, "refusal: wanted \"%s\" in: %s\n", needle, err);
    CHECK(strstr(err, needle) != NULL);
    if (m)
        model_destroy(m);
}

/* The engine over 2 GPUs: the budget from each GPU's memory (its own KV
 * heads per token), and a greedy request, launched ahead, as on one. */
static int engine_tokens(struct model *m, int32_t *tok, int n)
{
    char err[256] = "";
    struct engine_opts o = {.max_seqs = 4, .max_batched_tokens = 64,
                            .gpu_memory_utilization = 0.25};
    struct engine *e = engine_create(m, &o, err, sizeof(err));
    if (!e) {
        fprintf(stderr, "engine_create: %s\n", err);
        return -1;
    }
    struct engine_limits l;
    engine_get_limits(e, &l);
    int64_t step = model_step_bytes(m, 64, 4);
    struct kv_geom g = model_kv_geom(m);
    int64_t block = kv_bytes_per_token(&g) * 16;
    CHECK(l.kv_bytes == ((fake_kc.mem_total / 4 - (fake_kc.mem_total - fake_kc.mem_free) -
                          step) / block) * block);
    fake_kc.kv_slots = l.kv_blocks * 16;
    struct engine_params p;
    memset(&p, 0, sizeof(p));
    int32_t prompt[6] = {10, 20, 30, 40, 50, 60};
    p.prompt = prompt;
    p.n_prompt = 6;
    p.samp = samp_params_default();
    p.samp.temperature = 0;
    p.max_tokens = n;
    p.ignore_eos = 1;
    struct engine_req *r = NULL;
    int got = 0, done = 0;
    CHECK(engine_submit(e, &p, &r, err, sizeof(err)) == ENGINE_OK);
    for (int iter = 0; iter < 400 && !done && r; iter++) {
        struct engine_event ev[16];
        int k = engine_wait(r, ev, 16, 5000);
        if (k <= 0)
            break;
        for (int j = 0; j < k; j++) {
            if (ev[j].kind == ENGINE_EV_TOKEN && got < n)
                tok[got++] = ev[j].tok.token;
            else if (ev[j].kind == ENGINE_EV_DONE)
                done = 1;
        }
    }
    CHECK(done && got == n);
    struct engine_stats st;
    engine_get_stats(e, &st);
    CHECK(st.steps_ahead > 0);
    if (r)
        engine_release(r);
    engine_destroy(e);
    return done && got == n ? 0 : -1;
}

static void test_engine(void)
{
    char err[256];
    int32_t a[10], b[10];
    /* 8 GiB GPUs, 1 GiB in use, a quarter for us: under 1 GiB of cache,
     * which the double allocates in host memory */
    fake_kc.mem_total = (int64_t)8 << 30;
    fake_kc.mem_free = (int64_t)7 << 30;
    struct model *m1 = load(cfg_untied, 1, 1, 0, err, sizeof(err));
    struct model *m2 = load(cfg_untied, 1, 2, 0, err, sizeof(err));
    if (!m1 || !m2) {
        fprintf(stderr, "engine: %s\n", err);
        failures++;
        model_destroy(m1);
        model_destroy(m2);
        return;
    }
    /* per token each GPU of 2 stores its 2 of the 4 KV heads */
    CHECK(model_kv_geom(m2).n_kv_heads == 2 && model_kv_geom(m1).n_kv_heads == 4);
    CHECK(model_kv_geom(m2).external);
    CHECK(model_async(m2) && model_on_device(m2));
    int ra = engine_tokens(m1, a, 10), rb = engine_tokens(m2, b, 10);
    CHECK(ra == 0 && rb == 0);
    if (ra == 0 && rb == 0)
        CHECK(memcmp(a, b, sizeof(a)) == 0);
    check_clean("engine");
    model_destroy(m1);
    model_destroy(m2);
}

/* ---- several nodes: this process the leader, a forked one the follower */

/* A loopback port p with p + 1 free too (the control plane's). */
static int free_port_pair(void)
{
    for (int tries = 0; tries < 50; tries++) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof(a);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) ||
            getsockname(fd, (struct sockaddr *)&a, &len)) {
            if (fd >= 0)
                close(fd);
            continue;
        }
        int port = ntohs(a.sin_port);
        close(fd);
        struct sockaddr_in b = a;
        b.sin_port = htons((uint16_t)(port + 1));
        fd = socket(AF_INET, SOCK_STREAM, 0);
        int ok = fd >= 0 && port < 65534 && bind(fd, (struct sockaddr *)&b, sizeof(b)) == 0;
        if (fd >= 0)
            close(fd);
        if (ok)
            return port;
    }
    return -1;
}

static struct model *load_node(const char *path, int tp, int node, int port, char *err,
                               size_t errlen)
{
    struct model_opts o = {.device = MODEL_DEVICE_CUDA, .tp = tp, .n_threads = 1,
                           .dummy_seed = 5, .load_format = MODEL_LOAD_DUMMY, .nnodes = 2,
                           .node_rank = node, .master_addr = "127.0.0.1", .master_port = port};
    struct model *m = NULL;
    if (model_load(path, &o, &m, err, errlen))
        return NULL;
    return m;
}

/* The follower node: loads its ranks, follows the leader's steps until it
 * shuts the job down. Exit status 0 only then. */
static pid_t start_follower(const char *path, int tp, int port)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    alarm(120); /* nothing may leave it behind */
    char err[256] = "";
    struct model *m = load_node(path, tp, 1, port, err, sizeof(err));
    int rc = m ? model_follow(m, err, sizeof(err)) : -1;
    if (rc)
        fprintf(stderr, "follower: %s\n", err);
    model_destroy(m);
    _exit(rc == 0 ? 0 : 1);
}

static int wait_child(pid_t pid, int secs)
{
    for (int i = 0; i < secs * 20; i++) {
        int st;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
        struct timespec ts = {0, 50 * 1000000L};
        nanosleep(&ts, NULL);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return -1;
}

/* TP over two nodes (tp / 2 GPUs each): the same tokens and logits as one
 * device, through WELCOME (NCCL id, sizes), STEP with the sampled rows and
 * placeholders, and every STEP_DONE; the leader's end shuts the follower
 * down cleanly. */
static void test_nodes(int tp, const struct run *ref)
{
    char err[256] = "", what[64];
    snprintf(what, sizeof(what), "two nodes, TP=%d", tp);
    int port = free_port_pair();
    CHECK(port > 0);
    fake_nccl_ranks_per_node = tp / 2;
    pid_t child = start_follower(cfg_untied, tp, port);
    struct model *m = load_node(cfg_untied, tp, 0, port, err, sizeof(err));
    if (!m) {
        fprintf(stderr, "%s: leader: %s\n", what, err);
        failures++;
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
        fake_nccl_ranks_per_node = 0;
        return;
    }
    struct run got;
    int rc = scenario(m, &got);
    CHECK(rc == 0);
    check_clean(what);
    if (rc == 0)
        compare(ref, &got, what);
    free(got.logits);
    model_destroy(m); /* SHUTDOWN: the follower exits 0 */
    CHECK(wait_child(child, 60) == 0);
    fake_nccl_ranks_per_node = 0;
}

/* The follower dies mid-job: the leader's next step fails naming it, the
 * job is stopped for good (model_failed), nothing waits forever. */
static void test_node_dies(void)
{
    char err[256] = "", why[256] = "";
    int port = free_port_pair();
    fake_nccl_ranks_per_node = 1;
    pid_t child = start_follower(cfg_untied, 2, port);
    struct model *m = load_node(cfg_untied, 2, 0, port, err, sizeof(err));
    if (!m) {
        fprintf(stderr, "node dies: leader: %s\n", err);
        failures++;
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
        fake_nccl_ranks_per_node = 0;
        return;
    }
    struct kv_geom g = model_kv_geom(m);
    struct kv_cache *kv = kv_create(&g, 16, 2, err, sizeof(err));
    fake_kc.kv_slots = 16 * 16;
    CHECK(model_prepare(m, kv, 16, 2, 128, err, sizeof(err)) == 0);
    int s = kv_seq_open(kv, 0);
    CHECK(kv_seq_reserve(kv, s, 8) == 0);
    struct sampler *sp = greedy(1000);
    struct model_row row = {5, s, 0, 1};
    struct model_sample smp = {.row = 0, .s = sp};
    float *lg = calloc(1000, sizeof(float));
    CHECK(model_forward_sample(m, kv, &row, 1, lg, &smp, 1, err, sizeof(err)) == 0);
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    time_t t0 = time(NULL);
    row = (struct model_row){smp.res.token, s, 1, 1};
    CHECK(model_forward_sample(m, kv, &row, 1, lg, &smp, 1, err, sizeof(err)) != 0);
    CHECK(time(NULL) - t0 < 30);
    if (!strstr(err, "node 1"))
        fprintf(stderr, "node dies: %s\n", err);
    CHECK(strstr(err, "node 1") != NULL);
    CHECK(model_failed(m, why, sizeof(why)) && strstr(why, "node 1"));
    fake_kc.violations = 0;
    samp_destroy(sp);
    free(lg);
    kv_destroy(kv);
    model_destroy(m);
    fake_nccl_ranks_per_node = 0;
}

static void write_config(char *path, size_t n, const char *tied)
{
    snprintf(path, n, "/tmp/inferd-test-tp-cuda-%d-%s.json", (int)getpid(), tied);
    FILE *f = fopen(path, "w");
    if (!f || fprintf(f, config_json, tied) < 0 || fclose(f) != 0) {
        perror(path);
        exit(1);
    }
}

int main(int argc, char **argv)
{
    const char *fixtures = argc > 1 ? argv[1] : "tests/fixtures/models";
    write_config(cfg_untied, sizeof(cfg_untied), "false");
    write_config(cfg_tied, sizeof(cfg_tied), "true");
    fake_kc.real_math = 1;
    fake_kc.devices = 8;
    fake_kc.mem_total = (int64_t)80 << 30;
    fake_kc.mem_free = (int64_t)60 << 30;

    int all[] = {2, 4, 8};
    run_model(cfg_untied, 1, all, 3, 0);
    run_model(cfg_tied, 1, all, 3, 0);
    run_model(cfg_untied, 1, all, 1, 1); /* --enforce-eager */
    /* the fixtures' weights, converted and sliced on the host: quantised
     * (whole blocks per slice), f16, f32; biases, fused tensors, tied and
     * replicated KV heads */
    const char *files[] = {"qwen2/model-q8_0.gguf", "phi3/model-f32.gguf",
                           "mistral/model-f16.gguf", "llama3/model-q8_0.gguf"};
    int two[] = {2, 4};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        char path[1024];
        snprintf(path, sizeof(path), "%s/%s", fixtures, files[i]);
        run_model(path, 0, two, strstr(files[i], "mistral") ? 2 : 1, 0);
    }

    {
        char err[256];
        struct run ref;
        struct model *m = load(cfg_untied, 1, 1, 0, err, sizeof(err));
        int rc = m ? scenario(m, &ref) : -1;
        model_destroy(m);
        CHECK(rc == 0);
        if (rc == 0) {
            test_nodes(2, &ref);
            test_nodes(4, &ref);
        }
        free(ref.logits);
        test_node_dies();
    }
    test_failure();
    expect_refusal(cfg_untied, 1, 16, 1, "needs 16 GPUs");
    expect_refusal(cfg_untied, 1, 3, 1, "--tensor-parallel-size 3");
    expect_refusal(cfg_untied, 1, 3, 2, "must split evenly");
    test_engine();

    unlink(cfg_untied);
    unlink(cfg_tied);
    if (failures) {
        fprintf(stderr, "test_model_tp_cuda: %d failures\n", failures);
        return 1;
    }
    printf("test_model_tp_cuda: ok\n");
    return 0;
}
