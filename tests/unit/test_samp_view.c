/* test_samp_view.c: the sampler's read-only view (samp_view_*) through
 * sampler.h. Random samplers (penalties on and off, logit_bias with
 * duplicates, prompts with repeats) are fed random prompt and generated
 * tokens, and the view is checked against a brute-force recount of what
 * was fed; a reference written here from the view alone must leave a
 * random logits row bit for bit as samp_sample leaves it, which shows the
 * view carries everything steps 1-3 read. Also: step counts samp_accept
 * calls, and a short cap writes no further than cap. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/sampler.h"

static int failures;
#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);               \
            if (++failures > 20)                                                                   \
                exit(1);                                                                           \
        }                                                                                          \
    } while (0)

/* ---------------------------------------------------------------- rng */

static uint64_t rng_next(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int64_t rng_int(uint64_t *x, int64_t n) /* [0, n) */
{
    return (int64_t)(rng_next(x) % (uint64_t)n);
}

static float rng_float(uint64_t *x, float lo, float hi)
{
    return lo + (hi - lo) * (float)((double)(rng_next(x) >> 11) * 0x1.0p-53);
}

/* ---------------------------------------------------------------- reference */

/* The lists the view hands a device, fetched through the header only. */
struct lists {
    struct samp_view v;
    int32_t *seen_tok, *seen_cnt, *prompt_tok, *bias_tok;
    float *bias_val;
};

static void lists_get(const struct sampler *s, struct lists *l)
{
    samp_view_get(s, &l->v);
    int64_t ns = samp_view_seen(s, NULL, NULL, 0);
    int64_t np = samp_view_prompt(s, NULL, 0);
    int64_t nb = samp_view_bias(s, NULL, NULL, 0);
    CHECK(ns == l->v.n_seen && np == l->v.n_prompt && nb == l->v.n_bias);
    l->seen_tok = malloc((size_t)(ns + 1) * sizeof(int32_t));
    l->seen_cnt = malloc((size_t)(ns + 1) * sizeof(int32_t));
    l->prompt_tok = malloc((size_t)(np + 1) * sizeof(int32_t));
    l->bias_tok = malloc((size_t)(nb + 1) * sizeof(int32_t));
    l->bias_val = malloc((size_t)(nb + 1) * sizeof(float));
    CHECK(samp_view_seen(s, l->seen_tok, l->seen_cnt, ns) == ns);
    CHECK(samp_view_prompt(s, l->prompt_tok, np) == np);
    CHECK(samp_view_bias(s, l->bias_tok, l->bias_val, nb) == nb);
}

static void lists_free(struct lists *l)
{
    free(l->seen_tok);
    free(l->seen_cnt);
    free(l->prompt_tok);
    free(l->bias_tok);
    free(l->bias_val);
}

/* Steps 1-3 from the view alone, by the rule in sampler.h: the bias,
 * then seen (repetition, frequency, presence), then prompt tokens not
 * seen (repetition only). mark: n_vocab bytes of scratch. */
static void ref_apply(const struct lists *l, float *x, int64_t n_vocab, unsigned char *mark)
{
    const struct samp_view *v = &l->v;
    for (int64_t i = 0; i < v->n_bias; i++)
        x[l->bias_tok[i]] = x[l->bias_tok[i]] + l->bias_val[i];
    if (!v->penalties)
        return;
    const float rep = v->repetition_penalty, freq = v->frequency_penalty,
                pres = v->presence_penalty;
    memset(mark, 0, (size_t)n_vocab);
    for (int64_t i = 0; i < v->n_seen; i++) {
        int32_t t = l->seen_tok[i];
        float y = x[t];
        if (rep != 1.0f)
            y = y > 0.0f ? y / rep : y * rep;
        y = y - (freq * (float)l->seen_cnt[i] + pres);
        x[t] = y;
        mark[t] = 1;
    }
    if (rep != 1.0f)
        for (int64_t i = 0; i < v->n_prompt; i++) {
            int32_t t = l->prompt_tok[i];
            if (!mark[t])
                x[t] = x[t] > 0.0f ? x[t] / rep : x[t] * rep;
        }
}

/* ---------------------------------------------------------------- brute force */

/* What was fed, recounted the slow way. */
struct truth {
    int64_t n_vocab;
    int32_t *gen_cnt; /* (n_vocab) */
    unsigned char *in_prompt;
    int32_t *gen_order; /* distinct generated tokens, first-accepted order */
    int64_t n_gen_order;
    int32_t *prompt_order; /* distinct prompt tokens, first-recorded order */
    int64_t n_prompt_order;
    uint64_t accepts;
};

static void truth_init(struct truth *t, int64_t n_vocab)
{
    memset(t, 0, sizeof(*t));
    t->n_vocab = n_vocab;
    t->gen_cnt = calloc((size_t)n_vocab, sizeof(int32_t));
    t->in_prompt = calloc((size_t)n_vocab, 1);
    t->gen_order = malloc((size_t)n_vocab * sizeof(int32_t));
    t->prompt_order = malloc((size_t)n_vocab * sizeof(int32_t));
}

static void truth_free(struct truth *t)
{
    free(t->gen_cnt);
    free(t->in_prompt);
    free(t->gen_order);
    free(t->prompt_order);
}

static void feed_prompt(struct sampler *s, struct truth *t, const int32_t *tok, int64_t n)
{
    CHECK(samp_accept_prompt(s, tok, n) == 0);
    for (int64_t i = 0; i < n; i++)
        if (!t->in_prompt[tok[i]]) {
            t->in_prompt[tok[i]] = 1;
            t->prompt_order[t->n_prompt_order++] = tok[i];
        }
}

static void feed_gen(struct sampler *s, struct truth *t, int32_t tok)
{
    CHECK(samp_accept(s, tok) == 0);
    if (t->gen_cnt[tok]++ == 0)
        t->gen_order[t->n_gen_order++] = tok;
    t->accepts++;
}

static float clampf(float b)
{
    return fminf(SAMP_MAX_BIAS, fmaxf(-SAMP_MAX_BIAS, b));
}

/* (a), (c), (d): the view against the truth. */
static void check_view(const struct sampler *s, const struct truth *t, const struct samp_params *p,
                       uint64_t *rng)
{
    struct lists l;
    lists_get(s, &l);
    const struct samp_view *v = &l.v;

    /* The scalars. */
    CHECK(v->temperature == p->temperature && v->top_p == p->top_p && v->min_p == p->min_p);
    CHECK(v->presence_penalty == p->presence_penalty);
    CHECK(v->frequency_penalty == p->frequency_penalty);
    CHECK(v->repetition_penalty == p->repetition_penalty);
    CHECK(v->top_k == p->top_k && v->n_top_logprobs == p->top_logprobs);
    CHECK(v->want_logprob == (p->logprobs || p->top_logprobs > 0));
    CHECK(v->seed == p->seed);
    CHECK(v->step == t->accepts); /* (c) */
    CHECK(v->penalties == (p->repetition_penalty != 1.0f || p->frequency_penalty != 0.0f ||
                           p->presence_penalty != 0.0f));

    /* seen: the distinct generated tokens with their counts, in the order
     * first accepted. */
    CHECK(v->n_seen == t->n_gen_order);
    for (int64_t i = 0; i < v->n_seen && i < t->n_gen_order; i++) {
        CHECK(l.seen_tok[i] == t->gen_order[i]);
        CHECK(l.seen_cnt[i] == t->gen_cnt[t->gen_order[i]] && l.seen_cnt[i] >= 1);
    }
    /* prompt: the distinct prompt tokens, first-recorded order. */
    CHECK(v->n_prompt == t->n_prompt_order);
    for (int64_t i = 0; i < v->n_prompt && i < t->n_prompt_order; i++)
        CHECK(l.prompt_tok[i] == t->prompt_order[i]);
    /* bias: ascending unique ids, each the list-order sum of its clamped
     * entries, computed the slow way. */
    int64_t nb = 0;
    int32_t prev = -1;
    for (int64_t i = 0; i < v->n_bias; i++) {
        int32_t tok = l.bias_tok[i];
        CHECK(tok > prev && tok < t->n_vocab);
        prev = tok;
        float sum = 0.0f;
        int first = 1;
        for (int32_t j = 0; j < p->n_logit_bias; j++) {
            if (p->logit_bias[j].token != tok)
                continue;
            float b = clampf(p->logit_bias[j].bias);
            sum = first ? b : sum + b;
            first = 0;
        }
        CHECK(!first && memcmp(&sum, &l.bias_val[i], sizeof(float)) == 0);
    }
    for (int32_t j = 0; j < p->n_logit_bias; j++) {
        int dup = 0;
        for (int32_t k = 0; k < j; k++)
            dup |= p->logit_bias[k].token == p->logit_bias[j].token;
        nb += !dup;
    }
    CHECK(v->n_bias == nb);

    /* (d) a short cap: full count back, nothing written past cap, and
     * what is written is the list's head. */
    enum { GUARD = 4 };
    const int32_t poison = 0x5a5a5a5a;
    int64_t lens[3] = {v->n_seen, v->n_prompt, v->n_bias};
    for (int w = 0; w < 3; w++) {
        if (lens[w] == 0)
            continue;
        int64_t cap = rng_int(rng, lens[w]); /* < the count */
        int32_t *a = malloc((size_t)(cap + GUARD) * sizeof(int32_t));
        int32_t *b = malloc((size_t)(cap + GUARD) * sizeof(int32_t));
        for (int64_t i = 0; i < cap + GUARD; i++)
            a[i] = b[i] = poison;
        int64_t got = w == 0   ? samp_view_seen(s, a, b, cap)
                      : w == 1 ? samp_view_prompt(s, a, cap)
                               : samp_view_bias(s, a, (float *)b, cap);
        CHECK(got == lens[w]);
        for (int64_t i = cap; i < cap + GUARD; i++)
            CHECK(a[i] == poison && b[i] == poison);
        const int32_t *full = w == 0 ? l.seen_tok : w == 1 ? l.prompt_tok : l.bias_tok;
        for (int64_t i = 0; i < cap; i++)
            CHECK(a[i] == full[i]);
        if (w == 0)
            for (int64_t i = 0; i < cap; i++)
                CHECK(b[i] == l.seen_cnt[i]);
        if (w == 1)
            for (int64_t i = 0; i < cap; i++)
                CHECK(b[i] == poison);
        if (w == 2)
            CHECK(memcmp(b, l.bias_val, (size_t)cap * sizeof(float)) == 0);
        free(a);
        free(b);
    }
    lists_free(&l);
}

/* (b): samp_sample's processed row against ref_apply's from the view. */
static void check_row(struct sampler *s, int64_t n_vocab, uint64_t *rng, float *x, float *y,
                      unsigned char *mark, int32_t *sampled)
{
    for (int64_t i = 0; i < n_vocab; i++) {
        switch (rng_int(rng, 40)) {
        case 0:
            x[i] = 0.0f;
            break;
        case 1:
            x[i] = -0.0f;
            break;
        case 2:
            x[i] = -INFINITY;
            break;
        case 3:
            x[i] = rng_float(rng, -1e-30f, 1e-30f);
            break; /* near 0 */
        default:
            x[i] = rng_float(rng, -20.0f, 20.0f);
        }
    }
    memcpy(y, x, (size_t)n_vocab * sizeof(float));
    struct lists l;
    lists_get(s, &l);
    ref_apply(&l, y, n_vocab, mark);
    struct samp_result r;
    *sampled = samp_sample(s, x, &r);
    int64_t bad = -1;
    for (int64_t i = 0; i < n_vocab && bad < 0; i++)
        if (memcmp(&x[i], &y[i], sizeof(float)) != 0)
            bad = i;
    if (bad >= 0)
        fprintf(stderr, "token %lld: samp_sample %a, view %a\n", (long long)bad, (double)x[bad],
                (double)y[bad]);
    CHECK(bad < 0);
    lists_free(&l);
}

/* ---------------------------------------------------------------- trials */

static void trial(uint64_t seed, int64_t n_vocab, int64_t prompt_len, int rounds)
{
    uint64_t g = seed;
    struct samp_params p = samp_params_default();
    /* Each penalty on about half the time, so all-off happens too. */
    if (rng_int(&g, 2))
        p.repetition_penalty = rng_float(&g, 0.5f, 2.0f);
    if (rng_int(&g, 2))
        p.frequency_penalty = rng_int(&g, 8) ? rng_float(&g, -2.0f, 2.0f) : -0.0f;
    if (rng_int(&g, 2))
        p.presence_penalty = rng_int(&g, 8) ? rng_float(&g, -2.0f, 2.0f) : -0.0f;
    static const float temps[] = {0.0f, 0.5f, 1.0f, 1.7f};
    p.temperature = temps[rng_int(&g, 4)];
    p.top_k = (int32_t)rng_int(&g, 3) - 1 + (rng_int(&g, 2) ? (int32_t)rng_int(&g, 50) : 0);
    if (rng_int(&g, 4) == 0)
        p.top_p = rng_float(&g, 0.3f, 1.0f);
    if (rng_int(&g, 4) == 0)
        p.min_p = rng_float(&g, 0.0f, 0.2f);
    p.logprobs = (int)rng_int(&g, 2);
    p.top_logprobs = rng_int(&g, 2) ? (int)rng_int(&g, SAMP_MAX_TOP_LOGPROBS + 1) : 0;
    p.seed = rng_next(&g);

    /* Biases drawn from a few ids, so duplicates are common; now and then
     * one beyond the clamp, or infinite. */
    int32_t nb = (int32_t)rng_int(&g, 24);
    struct samp_bias *bias = malloc((size_t)(nb + 1) * sizeof(*bias));
    int64_t bias_ids = 1 + rng_int(&g, nb + 1);
    for (int32_t i = 0; i < nb; i++) {
        bias[i].token = (int32_t)rng_int(&g, bias_ids < n_vocab ? bias_ids : n_vocab);
        switch (rng_int(&g, 10)) {
        case 0:
            bias[i].bias = rng_float(&g, -300.0f, 300.0f);
            break;
        case 1:
            bias[i].bias = rng_int(&g, 2) ? INFINITY : -INFINITY;
            break;
        default:
            bias[i].bias = rng_float(&g, -5.0f, 5.0f);
        }
    }
    p.logit_bias = bias;
    p.n_logit_bias = nb;

    char err[256];
    struct sampler *s = samp_create(&p, n_vocab, err, sizeof(err));
    if (!s) {
        fprintf(stderr, "samp_create: %s\n", err);
        exit(1);
    }
    struct truth t;
    truth_init(&t, n_vocab);
    /* Tokens from a sub-range so repeats and prompt/generated overlaps
     * are common; the range is wide sometimes, to grow the table. */
    int64_t span = 1 + rng_int(&g, rng_int(&g, 2) ? n_vocab : (n_vocab < 64 ? n_vocab : 64));

    /* The prompt, in a few calls (chunked prefill may record it so). */
    int32_t *prompt = malloc((size_t)(prompt_len + 1) * sizeof(int32_t));
    for (int64_t i = 0; i < prompt_len; i++)
        prompt[i] = (int32_t)rng_int(&g, span);
    int64_t done = 0;
    while (done < prompt_len) {
        int64_t k = 1 + rng_int(&g, prompt_len - done);
        feed_prompt(s, &t, prompt + done, k);
        done += k;
    }
    /* A rejected prompt records nothing, a rejected token counts nothing. */
    int32_t badp[3] = {0, (int32_t)n_vocab, 1};
    CHECK(samp_accept_prompt(s, badp, 3) == -1);
    CHECK(samp_accept(s, -1) == -1 && samp_accept(s, (int32_t)n_vocab) == -1);
    check_view(s, &t, &p, &g);

    float *x = malloc((size_t)n_vocab * sizeof(float));
    float *y = malloc((size_t)n_vocab * sizeof(float));
    unsigned char *mark = malloc((size_t)n_vocab);
    for (int r = 0; r < rounds; r++) {
        int32_t tok;
        check_row(s, n_vocab, &g, x, y, mark, &tok);
        /* Accept what was sampled, or a forced token, or a burst. */
        int k = rng_int(&g, 8) == 0 ? (int)rng_int(&g, 40) : 1;
        for (int j = 0; j < k; j++) {
            int32_t a = (j == 0 && tok >= 0 && rng_int(&g, 2)) ? tok : (int32_t)rng_int(&g, span);
            feed_gen(s, &t, a);
        }
        if (rng_int(&g, 4) == 0)
            check_view(s, &t, &p, &g);
    }
    check_view(s, &t, &p, &g);
    int32_t last;
    check_row(s, n_vocab, &g, x, y, mark, &last);

    free(x);
    free(y);
    free(mark);
    free(prompt);
    truth_free(&t);
    samp_destroy(s);
    free(bias);
}

/* The worked example of test_sampler.c's penalties, through the view. */
static void test_example(void)
{
    struct samp_params p = samp_params_default();
    p.temperature = 0.0f;
    p.repetition_penalty = 1.5f;
    p.frequency_penalty = 0.5f;
    p.presence_penalty = 0.25f;
    struct samp_bias b[4] = {{5, 300.0f}, {1, 3.0f}, {4, 1.0f}, {1, -150.0f}};
    p.logit_bias = b;
    p.n_logit_bias = 4;
    char err[256];
    struct sampler *s = samp_create(&p, 8, err, sizeof(err));
    CHECK(s != NULL);
    int32_t prompt[] = {0, 1, 1};
    CHECK(samp_accept_prompt(s, prompt, 3) == 0);
    int32_t gen[] = {2, 2, 3, 0};
    for (int i = 0; i < 4; i++)
        CHECK(samp_accept(s, gen[i]) == 0);
    struct samp_view v;
    samp_view_get(s, &v);
    CHECK(v.step == 4 && v.penalties && v.n_seen == 3 && v.n_prompt == 2 && v.n_bias == 3);
    int32_t tok[4], cnt[4];
    float val[4];
    CHECK(samp_view_seen(s, tok, cnt, 4) == 3);
    CHECK(tok[0] == 2 && cnt[0] == 2 && tok[1] == 3 && cnt[1] == 1 && tok[2] == 0 && cnt[2] == 1);
    CHECK(samp_view_prompt(s, tok, 4) == 2 && tok[0] == 0 && tok[1] == 1);
    CHECK(samp_view_bias(s, tok, val, 4) == 3);
    CHECK(tok[0] == 1 && val[0] == 3.0f - 100.0f); /* each clamped, then summed */
    CHECK(tok[1] == 4 && val[1] == 1.0f && tok[2] == 5 && val[2] == 100.0f);
    samp_destroy(s);
}

int main(void)
{
    test_example();
    uint64_t g = 2024;
    for (int i = 0; i < 400; i++) {
        /* Small vocabularies collide a lot; a few large ones grow the
         * table through several rehashes. */
        int64_t n_vocab = i % 50 == 49 ? 20000 + rng_int(&g, 40000) : 1 + rng_int(&g, 600);
        int64_t prompt_len = i % 50 == 49 ? rng_int(&g, 30000) : rng_int(&g, 300);
        trial(rng_next(&g), n_vocab, prompt_len, i % 50 == 49 ? 6 : 30);
    }
    if (failures) {
        fprintf(stderr, "test_samp_view: %d failures\n", failures);
        return 1;
    }
    printf("test_samp_view: ok\n");
    return 0;
}
