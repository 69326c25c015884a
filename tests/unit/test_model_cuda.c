/* test_model_cuda.c: the CUDA backend's host side (engine/model_cuda.c)
 * on a machine without a GPU, over the kcuda.h test double in
 * fake_kcuda.c. Built only when the CUDA toolkit is found (model_cuda.c
 * exists only then); no GPU is needed.
 *
 * The double keeps each row's identity through the layers, so the logits
 * of a row are the embedding row of its input token repeated across the
 * vocabulary (fake_kcuda.c). That gives every check a reference computed
 * here from the dummy weights alone:
 *   - each sample's token is the argmax of its own input token's row, and
 *     its params and lists reached its own row (the double echoes the
 *     seed, the step and a digest of the lists);
 *   - logits that go back to the host land at their want-row index,
 *     including when the LM head runs in several chunks;
 *   - attention found every attended position where the block table says
 *     (markers written by the cache write), in eager steps and in graph
 *     replays with padding rows;
 *   - decode steps replay captured graphs, allocate nothing, and growing
 *     the sampling lists re-captures them;
 *   - a step launched before the last one is collected takes its tokens
 *     on the device (MODEL_TOKEN_PREV) and skips the draws not accepted;
 *   - --enforce-eager captures nothing; the engine sizes the KV cache from
 *     the device's free memory and serves a request through all of it,
 *     launching decode steps ahead of their tokens. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/dummy.h"
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

enum { E = 64, V = 1200, LAYERS = 2, SEED = 7 };

static const char *config_json =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\","
    " \"hidden_size\": 64, \"intermediate_size\": 96, \"num_attention_heads\": 4,"
    " \"num_key_value_heads\": 2, \"num_hidden_layers\": 2, \"vocab_size\": 1200,"
    " \"max_position_embeddings\": 1024, \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0,"
    " \"tie_word_embeddings\": false, \"bos_token_id\": 1, \"eos_token_id\": 2}";

static char cfg_path[64];
static const uint16_t *embd; /* (V, E) the dummy embedding table */

static float bf(uint16_t v)
{
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* What the double's forward pass gives token t: logit j = embd[t][j % E]. */
static float expect_logit(int32_t t, int64_t j)
{
    return bf(embd[(int64_t)t * E + j % E]);
}

static int32_t expect_token(int32_t t)
{
    int64_t best = 0;
    for (int64_t j = 1; j < V; j++)
        if (expect_logit(t, j) > expect_logit(t, best))
            best = j;
    return (int32_t)best;
}

static struct model *load(int eager)
{
    struct model_opts o = {.device = MODEL_DEVICE_CUDA, .load_format = MODEL_LOAD_DUMMY,
                           .dummy_seed = SEED, .enforce_eager = eager, .n_threads = 1};
    struct model *m = NULL;
    char err[256];
    if (model_load(cfg_path, &o, &m, err, sizeof(err))) {
        fprintf(stderr, "model_load: %s\n", err);
        exit(1);
    }
    return m;
}

static struct kv_cache *make_kv(struct model *m, int64_t blocks, int max_seqs)
{
    struct kv_geom g = model_kv_geom(m);
    CHECK(g.external);
    char err[256];
    struct kv_cache *kv = kv_create(&g, blocks, max_seqs, err, sizeof(err));
    if (!kv) {
        fprintf(stderr, "kv_create: %s\n", err);
        exit(1);
    }
    fake_kc.kv_slots = blocks * 16;
    return kv;
}

static struct sampler *sampler(float temp, uint64_t seed, float presence, float rep,
                               int top_logprobs, int n_bias)
{
    struct samp_params p = samp_params_default();
    p.temperature = temp;
    p.seed = seed;
    p.presence_penalty = presence;
    p.repetition_penalty = rep;
    p.top_logprobs = top_logprobs;
    p.logprobs = top_logprobs > 0;
    p.top_k = 40;
    struct samp_bias b[8];
    for (int i = 0; i < n_bias; i++)
        b[i] = (struct samp_bias){100 + 7 * i, 1.5f};
    p.logit_bias = b;
    p.n_logit_bias = n_bias;
    char err[256];
    struct sampler *s = samp_create(&p, V, err, sizeof(err));
    if (!s) {
        fprintf(stderr, "samp_create: %s\n", err);
        exit(1);
    }
    return s;
}

/* The double's digest of what reached a sampled row (fake_kcuda.c). */
static void check_digest(const struct model_sample *ms, const char *what)
{
    struct samp_view v;
    samp_view_get(ms->s, &v);
    const struct samp_result *r = &ms->res;
    if (r->logprob != (float)v.seed || r->n_top != v.n_top_logprobs)
        fprintf(stderr, "%s: seed %g, n_top %d\n", what, (double)r->logprob, r->n_top);
    CHECK(r->logprob == (float)v.seed);
    CHECK(r->n_top == v.n_top_logprobs);
    if (r->n_top < 7)
        return;
    int64_t n_seen = v.penalties ? v.n_seen : 0;
    int64_t n_prompt = v.penalties && v.repetition_penalty != 1.0f ? v.n_prompt : 0;
    int32_t tok[2048], cnt[2048];
    float val[64];
    int64_t sum = 0;
    if (n_seen) {
        samp_view_seen(ms->s, tok, cnt, 2048);
        for (int64_t i = 0; i < n_seen; i++)
            sum += (int64_t)tok[i] * cnt[i];
    }
    int64_t nb = samp_view_bias(ms->s, tok, val, 64);
    for (int64_t i = 0; i < nb; i++)
        sum += tok[i];
    CHECK(r->top[0].token == n_seen);
    CHECK(r->top[1].token == (int32_t)sum);
    CHECK(r->top[2].token == nb);
    CHECK(r->top[3].token == (int32_t)v.step);
    CHECK(r->top[4].token == n_prompt);
    CHECK(r->top[5].token == v.top_k);
    CHECK(r->top[6].token == (int32_t)(v.temperature * 1000 + 0.5f));
}

static void check_clean(const char *what)
{
    if (fake_kc.violations)
        fprintf(stderr, "%s: %lld violations, first: %s\n", what,
                (long long)fake_kc.violations, fake_kc.first_violation);
    CHECK(fake_kc.violations == 0);
    fake_kc.violations = 0;
}

static void forward(struct model *m, struct kv_cache *kv, const struct model_row *rows,
                    int64_t n, float *logits, struct model_sample *smp, int64_t ns)
{
    char err[256];
    if (model_forward_sample(m, kv, rows, n, logits, smp, ns, err, sizeof(err))) {
        fprintf(stderr, "model_forward_sample: %s\n", err);
        failures++;
    }
}

/* Prefill of three interleaved sequences, two sampled and one back to the
 * host; decode steps by graph; a mixed step; list growth; chunked logits. */
static void test_steps(void)
{
    struct model *m = load(0);
    struct kv_cache *kv = make_kv(m, 64, 8);
    char err[256];
    fake_kc.captures = 0;
    if (model_prepare(m, kv, 64, 8, 512, err, sizeof(err))) {
        fprintf(stderr, "model_prepare: %s\n", err);
        exit(1);
    }
    CHECK(fake_kc.captures == 4); /* 1, 2, 4, 8 rows */
    check_clean("prepare");

    int seq[4];
    int64_t len[4] = {20, 5, 37, 1};
    int32_t last[4];
    uint64_t rs = 12345;
    struct model_row rows[64];
    float *logits = calloc((size_t)64 * V, sizeof(float));
    int32_t *prompt[4];
    for (int i = 0; i < 3; i++) {
        seq[i] = kv_seq_open(kv, 0);
        CHECK(kv_seq_reserve(kv, seq[i], 200) == 0);
        prompt[i] = malloc((size_t)len[i] * sizeof(int32_t));
        for (int64_t p = 0; p < len[i]; p++) {
            rs = rs * 6364136223846793005ull + 1442695040888963407ull;
            prompt[i][p] = (int32_t)((rs >> 33) % V);
        }
    }
    /* rows round-robin across the sequences: the backend regroups them */
    int64_t n = 0, at[3] = {0, 0, 0};
    while (n < len[0] + len[1] + len[2]) {
        for (int i = 0; i < 3; i++) {
            if (at[i] >= len[i])
                continue;
            rows[n] = (struct model_row){prompt[i][at[i]], seq[i], at[i], at[i] == len[i] - 1};
            at[i]++;
            n++;
        }
    }
    /* want rows in row order: b (len 5) ends first, then a, then c */
    struct sampler *sa = sampler(0.7f, 11, 0.5f, 1.3f, 8, 0);
    struct sampler *sc = sampler(0.0f, 13, 0.0f, 1.0f, 8, 3);
    CHECK(samp_accept_prompt(sa, prompt[0], len[0]) == 0);
    CHECK(samp_accept(sa, 5) == 0 && samp_accept(sa, 9) == 0 && samp_accept(sa, 5) == 0);
    struct model_sample smp[8];
    memset(smp, 0, sizeof(smp));
    smp[0] = (struct model_sample){.row = 2, .s = sc}; /* c's want row is the third */
    smp[1] = (struct model_sample){.row = 1, .s = sa};
    int64_t eager0 = fake_kc.launches, graphs0 = fake_kc.graph_launches;
    forward(m, kv, rows, n, logits, smp, 2);
    check_clean("prefill");
    CHECK(fake_kc.launches > eager0 && fake_kc.graph_launches == graphs0);
    CHECK(smp[1].res.token == expect_token(prompt[0][19]));
    CHECK(smp[0].res.token == expect_token(prompt[2][36]));
    check_digest(&smp[1], "prefill a");
    check_digest(&smp[0], "prefill c");
    int ok = 1;
    for (int64_t j = 0; j < V; j++) /* b's row went to the host, want index 0 */
        ok &= logits[j] == expect_logit(prompt[1][4], j);
    CHECK(ok);
    for (int i = 0; i < 3; i++)
        CHECK(kv_seq_len(kv, seq[i]) == len[i]);
    last[0] = smp[1].res.token;
    last[1] = expect_token(prompt[1][4]);
    last[2] = smp[0].res.token;

    /* Decode steps: every row sampled, a graph of 4 rows (one padding),
     * rows in a different order each step, nothing allocated. */
    struct sampler *sb = sampler(1.0f, 17, 0.0f, 1.0f, 8, 2);
    struct sampler *ss[3] = {sa, sb, sc};
    int64_t mallocs0 = fake_kc.mallocs;
    for (int step = 0; step < 6; step++) {
        int64_t g0 = fake_kc.graph_launches, e0 = fake_kc.launches;
        for (int k = 0; k < 3; k++) {
            int i = step % 2 ? 2 - k : k;
            rows[k] = (struct model_row){last[i], seq[i], len[i], 1};
            smp[k] = (struct model_sample){.row = k, .s = ss[i]};
        }
        forward(m, kv, rows, 3, logits, smp, 3);
        check_clean("decode");
        CHECK(fake_kc.graph_launches == g0 + 1);
        CHECK(fake_kc.launches == e0);
        for (int k = 0; k < 3; k++) {
            int i = step % 2 ? 2 - k : k;
            CHECK(smp[k].res.token == expect_token(last[i]));
            check_digest(&smp[k], "decode");
            CHECK(samp_accept(ss[i], smp[k].res.token) == 0);
            last[i] = smp[k].res.token;
            len[i]++;
        }
    }
    CHECK(fake_kc.mallocs == mallocs0);

    /* A mixed step: a's decode row beside d's 1-token prompt and c's
     * decode row; d's logits go to the host. Eager (not all sampled). */
    seq[3] = kv_seq_open(kv, 0);
    CHECK(kv_seq_reserve(kv, seq[3], 100) == 0);
    rows[0] = (struct model_row){last[0], seq[0], len[0], 1};
    rows[1] = (struct model_row){77, seq[3], 0, 1};
    rows[2] = (struct model_row){last[2], seq[2], len[2], 1};
    smp[0] = (struct model_sample){.row = 2, .s = sc};
    smp[1] = (struct model_sample){.row = 0, .s = sa};
    int64_t g0 = fake_kc.graph_launches;
    forward(m, kv, rows, 3, logits, smp, 2);
    check_clean("mixed");
    CHECK(fake_kc.graph_launches == g0);
    CHECK(smp[1].res.token == expect_token(last[0]));
    CHECK(smp[0].res.token == expect_token(last[2]));
    ok = 1;
    for (int64_t j = 0; j < V; j++)
        ok &= logits[(size_t)V + (size_t)j] == expect_logit(77, j);
    CHECK(ok);
    last[0] = smp[1].res.token, len[0]++;
    last[2] = smp[0].res.token, len[2]++;
    last[3] = expect_token(77), len[3] = 1;

    /* Lists beyond their first capacity (4096 entries): four samplers
     * with 1100 distinct seen tokens each. The buffer grows and the
     * graphs are captured again, then replayed. */
    struct sampler *big[4];
    for (int i = 0; i < 4; i++) {
        big[i] = sampler(0.5f, 100 + (uint64_t)i, 0.25f, 1.0f, 8, 0);
        for (int32_t t = 0; t < 1100; t++)
            CHECK(samp_accept(big[i], (t * 7 + i) % V) == 0);
    }
    int64_t cap0 = fake_kc.captures;
    g0 = fake_kc.graph_launches;
    for (int i = 0; i < 4; i++) {
        rows[i] = (struct model_row){last[i], seq[i], len[i], 1};
        smp[i] = (struct model_sample){.row = i, .s = big[i]};
    }
    forward(m, kv, rows, 4, logits, smp, 4);
    check_clean("lists");
    CHECK(fake_kc.captures == cap0 + 4);
    CHECK(fake_kc.graph_launches == g0 + 1);
    for (int i = 0; i < 4; i++) {
        CHECK(smp[i].res.token == expect_token(last[i]));
        CHECK(smp[i].res.top[0].token == 1100);
        check_digest(&smp[i], "lists");
        last[i] = smp[i].res.token;
        len[i]++;
    }

    /* Launch ahead: step Q is launched before step P is collected, its
     * tokens named MODEL_TOKEN_PREV (P's samples, in another order); the
     * device substitutes them; the RNG step counts the draw not yet
     * accepted. A third launch without a collect is refused. */
    {
        struct model_sample sp[3], sq[3];
        struct model_row rp[3], rq[3];
        int who[3] = {0, 2, 3};
        struct sampler *plain[3];
        for (int k = 0; k < 3; k++) {
            plain[k] = sampler(0.0f, 40 + (uint64_t)k, 0.0f, 1.0f, 8, 0);
            rp[k] = (struct model_row){last[who[k]], seq[who[k]], len[who[k]], 1};
            sp[k] = (struct model_sample){.row = k, .s = plain[k]};
            /* Q's rows in reverse: row j continues P's sample 2 - j */
            rq[2 - k] = (struct model_row){MODEL_TOKEN_PREV(k), seq[who[k]], len[who[k]] + 1, 1};
            sq[2 - k] = (struct model_sample){.row = 2 - k, .s = plain[k], .ahead = 1};
        }
        int64_t res0 = fake_kc.resolved;
        CHECK(model_launch(m, kv, rp, 3, logits, sp, 3, err, sizeof(err)) == 0);
        CHECK(model_launch(m, kv, rq, 3, logits, sq, 3, err, sizeof(err)) == 0);
        CHECK(model_launch(m, kv, rq, 3, logits, sq, 3, err, sizeof(err)) != 0);
        CHECK(strstr(err, "not collected") != NULL);
        CHECK(model_collect(m, err, sizeof(err)) == 0);
        for (int k = 0; k < 3; k++) {
            CHECK(sp[k].res.token == expect_token(last[who[k]]));
            CHECK(sp[k].res.top[3].token == 0);
        }
        CHECK(model_collect(m, err, sizeof(err)) == 0);
        CHECK(model_collect(m, err, sizeof(err)) != 0);
        CHECK(fake_kc.resolved == res0 + 3);
        for (int k = 0; k < 3; k++) {
            CHECK(sq[2 - k].res.token == expect_token(sp[k].res.token));
            CHECK(sq[2 - k].res.top[3].token == 1); /* step + ahead */
            last[who[k]] = sq[2 - k].res.token;
            len[who[k]] += 2;
        }
        check_clean("launch ahead");
        for (int k = 0; k < 3; k++)
            samp_destroy(plain[k]);
    }

    /* model_forward: 30 rows all wanting logits, more than the 8 rows
     * the LM head takes at once: chunks, every row at its own index. */
    int s5 = kv_seq_open(kv, 0);
    (void)s5;
    kv_seq_close(kv, seq[1]); /* room: max_seqs is 8 */
    int s6 = kv_seq_open(kv, 0);
    CHECK(kv_seq_reserve(kv, s6, 30) == 0);
    for (int64_t p = 0; p < 30; p++)
        rows[p] = (struct model_row){(int32_t)(p * 31 % V), s6, p, 1};
    if (model_forward(m, kv, rows, 30, logits, err, sizeof(err))) {
        fprintf(stderr, "model_forward: %s\n", err);
        failures++;
    }
    check_clean("chunked");
    ok = 1;
    for (int64_t p = 0; p < 30; p++)
        for (int64_t j = 0; j < V; j++)
            ok &= logits[(size_t)p * V + (size_t)j] == expect_logit((int32_t)(p * 31 % V), j);
    CHECK(ok);

    /* A step larger than prepared (100 rows > 64): prepared again inside
     * the step, its host arrays kept through it. */
    {
        static struct model_row big_rows[100];
        int s7 = kv_seq_open(kv, 0);
        CHECK(kv_seq_reserve(kv, s7, 100) == 0);
        for (int64_t p = 0; p < 100; p++)
            big_rows[p] = (struct model_row){(int32_t)(p * 13 % V), s7, p, p == 99};
        smp[0] = (struct model_sample){.row = 0, .s = sb};
        forward(m, kv, big_rows, 100, logits, smp, 1);
        check_clean("re-prepare");
        CHECK(smp[0].res.token == expect_token((int32_t)(99 * 13 % V)));
    }

    /* Another cache: the device storage follows it. */
    struct kv_cache *kv2 = make_kv(m, 20, 2);
    int t0 = kv_seq_open(kv2, 0);
    CHECK(kv_seq_reserve(kv2, t0, 3) == 0);
    for (int64_t p = 0; p < 3; p++)
        rows[p] = (struct model_row){(int32_t)(p + 40), t0, p, p == 2};
    smp[0] = (struct model_sample){.row = 0, .s = sb};
    forward(m, kv2, rows, 3, logits, smp, 1);
    check_clean("second cache");
    CHECK(smp[0].res.token == expect_token(42));

    for (int i = 0; i < 4; i++)
        samp_destroy(big[i]);
    for (int i = 0; i < 3; i++) {
        samp_destroy(ss[i]);
        free(prompt[i]);
    }
    free(logits);
    kv_destroy(kv2);
    kv_destroy(kv);
    model_destroy(m);
}

static void test_eager(void)
{
    struct model *m = load(1);
    struct kv_cache *kv = make_kv(m, 16, 4);
    char err[256];
    int64_t c0 = fake_kc.captures, g0 = fake_kc.graph_launches;
    CHECK(model_prepare(m, kv, 16, 4, 128, err, sizeof(err)) == 0);
    int s = kv_seq_open(kv, 0);
    CHECK(kv_seq_reserve(kv, s, 4) == 0);
    struct sampler *sp = sampler(0.0f, 3, 0.0f, 1.0f, 0, 0);
    struct model_row row = {5, s, 0, 1};
    struct model_sample smp = {.row = 0, .s = sp};
    float *logits = calloc(V, sizeof(float));
    for (int64_t p = 0; p < 3; p++) {
        row.pos = p;
        forward(m, kv, &row, 1, logits, &smp, 1);
        CHECK(smp.res.token == expect_token(row.token));
        row.token = smp.res.token;
    }
    check_clean("eager");
    CHECK(fake_kc.captures == c0 && fake_kc.graph_launches == g0);
    samp_destroy(sp);
    free(logits);
    kv_destroy(kv);
    model_destroy(m);
}

/* The engine over the device: the KV budget from free memory under
 * --gpu-memory-utilization, a clear error when nothing is left, and a
 * greedy request whose every token follows from the one before. */
static void test_engine(void)
{
    struct model *m = load(0);
    char err[256] = "";
    fake_kc.mem_total = (int64_t)8 << 30;
    fake_kc.mem_free = (int64_t)1 << 30;
    struct engine_opts o = {.max_seqs = 4, .max_batched_tokens = 64,
                            .gpu_memory_utilization = 0.5};
    struct engine *e = engine_create(m, &o, err, sizeof(err));
    CHECK(!e);
    CHECK(strstr(err, "GPU memory") && strstr(err, "--gpu-memory-utilization"));
    if (e)
        engine_destroy(e);

    fake_kc.mem_free = (int64_t)7 << 30; /* 1 GiB in use */
    o.gpu_memory_utilization = 0.25;     /* 2 GiB: 1 GiB left, less the steps */
    e = engine_create(m, &o, err, sizeof(err));
    if (!e) {
        fprintf(stderr, "engine_create: %s\n", err);
        failures++;
        model_destroy(m);
        return;
    }
    struct engine_limits l;
    engine_get_limits(e, &l);
    int64_t step = model_step_bytes(m, 64, 4);
    struct kv_geom g = model_kv_geom(m);
    int64_t block = kv_bytes_per_token(&g) * 16;
    CHECK(l.kv_bytes == ((((int64_t)2 << 30) - ((int64_t)1 << 30) - step) / block) * block);
    fake_kc.kv_slots = l.kv_blocks * 16;

    struct engine_params p;
    memset(&p, 0, sizeof(p));
    int32_t prompt[6] = {10, 20, 30, 40, 50, 60};
    p.prompt = prompt;
    p.n_prompt = 6;
    p.samp = samp_params_default();
    p.samp.temperature = 0;
    p.max_tokens = 8;
    p.ignore_eos = 1;
    struct engine_req *r = NULL;
    CHECK(engine_submit(e, &p, &r, err, sizeof(err)) == ENGINE_OK);
    int32_t prev = prompt[5], got = 0;
    int done = 0;
    for (int iter = 0; iter < 200 && !done && r; iter++) {
        struct engine_event ev[16];
        int k = engine_wait(r, ev, 16, 5000);
        if (k <= 0)
            break;
        for (int j = 0; j < k; j++) {
            if (ev[j].kind == ENGINE_EV_TOKEN) {
                CHECK(ev[j].tok.token == expect_token(prev));
                prev = ev[j].tok.token;
                got++;
            } else if (ev[j].kind == ENGINE_EV_DONE) {
                done = 1;
            }
        }
    }
    CHECK(done && got == 8);
    check_clean("engine");
    /* on a device the engine launches decode steps ahead by default */
    struct engine_stats st;
    engine_get_stats(e, &st);
    CHECK(st.steps_ahead > 0);
    CHECK(fake_kc.resolved > 0);
    if (r)
        engine_release(r);
    engine_destroy(e);
    model_destroy(m);
}

int main(void)
{
    snprintf(cfg_path, sizeof(cfg_path), "/tmp/inferd-test-model-cuda-%d.json", (int)getpid());
    FILE *f = fopen(cfg_path, "w");
    if (!f || fputs(config_json, f) < 0 || fclose(f) != 0) {
        perror(cfg_path);
        return 1;
    }
    /* the reference embedding: the CPU loader's bytes for the same seed */
    struct model_opts co = {.load_format = MODEL_LOAD_DUMMY, .dummy_seed = SEED, .n_threads = 1};
    struct model *cpu = NULL;
    char err[256];
    if (model_load(cfg_path, &co, &cpu, err, sizeof(err))) {
        fprintf(stderr, "model_load (cpu): %s\n", err);
        return 1;
    }
    struct model_config mc = *model_get_config(cpu);
    struct dummy_model *d = NULL;
    if (dummy_open(&mc, K_BF16, SEED, DUMMY_FILL_ALL, &d, err, sizeof(err))) {
        fprintf(stderr, "dummy_open: %s\n", err);
        return 1;
    }
    embd = dummy_find(d, "model.embed_tokens.weight")->data;
    fake_kc.mem_total = (int64_t)80 << 30;
    fake_kc.mem_free = (int64_t)60 << 30;

    test_steps();
    test_eager();
    test_engine();

    dummy_close(d);
    model_destroy(cpu);
    unlink(cfg_path);
    if (failures) {
        fprintf(stderr, "test_model_cuda: %d failures\n", failures);
        return 1;
    }
    printf("test_model_cuda: ok\n");
    return 0;
}
