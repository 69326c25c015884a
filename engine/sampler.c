/* sampler.c: logit processing, truncation and the draw, per request.
 * Engine thread only. The penalty counts are a dense list of the distinct
 * tokens seen, indexed by a small open-addressing hash, so a request costs
 * memory (and each step time) for the distinct tokens it has seen, not
 * n_vocab; the same list is what samp_view hands a device. Truncation
 * never sorts the whole vocabulary: top_k picks its candidates with a
 * bounded heap and sorts only those; top_p alone finds its cut and its
 * draw with histograms over the probabilities and sorts only the one
 * bucket each lands in. */
#include "engine/sampler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Growth of per-request tables mid-generation: out of memory is fatal (the
 * project's rule), reported with the place it happened. */
#define samp_xrealloc(p, n) samp_xrealloc_at((p), (n), __FILE__, __LINE__)
static void *samp_xrealloc_at(void *p, size_t n, const char *file, int line)
{
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "%s:%d: out of memory (%zu bytes)\n", file, line, n);
        abort();
    }
    return q;
}

/* ---------------------------------------------------------------- RNG */

/* xoshiro256** seeded through splitmix64: 256 bits of state per request,
 * so requests never share a stream and a seed replays exactly. */
static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t xoshiro_next(uint64_t s[4])
{
    uint64_t r = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

/* Uniform in [0, 1) with 53 random bits. */
static double rng_uniform(uint64_t s[4])
{
    return (double)(xoshiro_next(s) >> 11) * 0x1.0p-53;
}

/* ---------------------------------------------------------------- state */

/* One distinct token the penalties read. Entries sit in a dense array in
 * the order first recorded, so every walk over them (the penalties, the
 * view) costs the distinct tokens, not the hash table's capacity. */
struct samp_count {
    int32_t token;
    int32_t n_gen; /* times generated; saturates at INT32_MAX (samp_view's int32) */
    int32_t in_prompt;
};

struct samp_cand {
    float logit;
    int32_t id;
};

/* top_p's histograms: TP_NB buckets per level, up to TP_LEVELS levels,
 * each level splitting one bucket of the level above into TP_NB. A
 * bucket holds the tokens whose (max - logit) / t falls in a fixed slice
 * of [0, TP_RANGE); everything further down (weight < e^-64) shares the
 * last one. Level 1 resolves 1/16 of a nat, level 3 about 6e-8;
 * a flat distribution spans a nat or two, so one split is usually enough. */
#define TP_NB 1024
#define TP_LEVELS 3
#define TP_RANGE 64.0
#define TP_SMALL 256 /* a bucket this small is sorted, not split */

struct tp_hist {
    double mass[TP_NB]; /* sum of exp((logit - max) / t), in id order */
    uint32_t cnt[TP_NB];
};

struct sampler {
    struct samp_params p;   /* p.logit_bias points at bias, p.n_logit_bias its length */
    struct samp_bias *bias; /* (p.n_logit_bias) unique ids, ascending; sums of clamped biases */
    int64_t n_vocab;
    uint64_t rng[4];
    uint64_t step;          /* successful samp_accept calls */
    struct samp_count *ent; /* (n_ent) distinct tokens, first-recorded order */
    int32_t *gen_ix;        /* (n_gen_ix) ent indices with n_gen > 0, first-generated order */
    int32_t *prompt_ix;     /* (n_prompt_ix) ent indices with in_prompt, first-recorded order */
    uint32_t n_ent, n_gen_ix, n_prompt_ix, ent_cap; /* ent_cap bounds all three arrays */
    int32_t *tab; /* (cap) ent index or -1; open addressing, linear probing */
    uint32_t cap;
    struct samp_cand *cand; /* (cand_cap) top candidates, grown on demand */
    size_t cand_cap;
    /* (TP_LEVELS + 1) top_p histograms, allocated on first use: level 1,
     * level 1 restricted to min_p's bar, then one per deeper level. */
    struct tp_hist *tp;
};

struct samp_params samp_params_default(void)
{
    struct samp_params p;
    memset(&p, 0, sizeof(p));
    p.temperature = 1.0f;
    p.top_p = 1.0f;
    p.repetition_penalty = 1.0f;
    return p;
}

static int in_range(float v, float lo, float hi)
{
    return v >= lo && v <= hi; /* false for NaN */
}

static int validate(const struct samp_params *p, int64_t n_vocab, char *err, size_t errlen)
{
    if (n_vocab <= 0 || n_vocab > INT32_MAX) {
        snprintf(err, errlen, "sampler: n_vocab %lld is out of range", (long long)n_vocab);
        return -1;
    }
    if (!in_range(p->temperature, 0.0f, 2.0f)) {
        snprintf(err, errlen, "temperature must be between 0 and 2, got %g", (double)p->temperature);
        return -1;
    }
    if (p->top_k < -1) {
        snprintf(err, errlen, "top_k must be -1 or 0 (off) or a positive number, got %d", (int)p->top_k);
        return -1;
    }
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {
        snprintf(err, errlen, "top_p must be greater than 0 and at most 1, got %g", (double)p->top_p);
        return -1;
    }
    if (!in_range(p->min_p, 0.0f, 1.0f)) {
        snprintf(err, errlen, "min_p must be between 0 and 1, got %g", (double)p->min_p);
        return -1;
    }
    if (!in_range(p->presence_penalty, -2.0f, 2.0f)) {
        snprintf(err, errlen, "presence_penalty must be between -2 and 2, got %g",
                 (double)p->presence_penalty);
        return -1;
    }
    if (!in_range(p->frequency_penalty, -2.0f, 2.0f)) {
        snprintf(err, errlen, "frequency_penalty must be between -2 and 2, got %g",
                 (double)p->frequency_penalty);
        return -1;
    }
    if (!(p->repetition_penalty > 0.0f && isfinite(p->repetition_penalty))) {
        snprintf(err, errlen, "repetition_penalty must be greater than 0, got %g",
                 (double)p->repetition_penalty);
        return -1;
    }
    if (p->top_logprobs < 0 || p->top_logprobs > SAMP_MAX_TOP_LOGPROBS) {
        snprintf(err, errlen, "top_logprobs must be between 0 and %d, got %d",
                 SAMP_MAX_TOP_LOGPROBS, p->top_logprobs);
        return -1;
    }
    if (p->n_logit_bias < 0 || (p->n_logit_bias > 0 && !p->logit_bias)) {
        snprintf(err, errlen, "logit_bias: invalid list of %d entries", (int)p->n_logit_bias);
        return -1;
    }
    for (int32_t i = 0; i < p->n_logit_bias; i++) {
        const struct samp_bias *b = &p->logit_bias[i];
        if (b->token < 0 || b->token >= n_vocab) {
            snprintf(err, errlen, "logit_bias: token id %d is outside the vocabulary (n_vocab %lld)",
                     (int)b->token, (long long)n_vocab);
            return -1;
        }
        if (isnan(b->bias)) {
            snprintf(err, errlen, "logit_bias: the bias of token %d is not a number", (int)b->token);
            return -1;
        }
    }
    return 0;
}

/* logit_bias entries in their list position, for merging duplicates. */
struct bias_ent {
    int32_t token, pos;
    float bias;
};

static int bias_ent_cmp(const void *pa, const void *pb)
{
    const struct bias_ent *a = pa, *b = pb;
    if (a->token != b->token)
        return a->token < b->token ? -1 : 1;
    return a->pos < b->pos ? -1 : a->pos > b->pos;
}

/* Copies p's logit_bias into s as one entry per token: each bias clamped,
 * then a token's biases summed in list order. One add per token in
 * samp_sample is what lets a device apply samp_view_bias's pairs and get
 * the same float. Returns 0, or -1 out of memory. */
static int bias_merge(struct sampler *s, const struct samp_params *p)
{
    size_t n = (size_t)p->n_logit_bias;
    struct bias_ent *e = malloc(n * sizeof(*e));
    s->bias = malloc(n * sizeof(*s->bias));
    if (!e || !s->bias) {
        free(e);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        e[i].token = p->logit_bias[i].token;
        e[i].pos = (int32_t)i;
        e[i].bias = fminf(SAMP_MAX_BIAS, fmaxf(-SAMP_MAX_BIAS, p->logit_bias[i].bias));
    }
    qsort(e, n, sizeof(*e), bias_ent_cmp);
    int32_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (k > 0 && s->bias[k - 1].token == e[i].token) {
            s->bias[k - 1].bias += e[i].bias;
        } else {
            s->bias[k].token = e[i].token;
            s->bias[k++].bias = e[i].bias;
        }
    }
    s->p.n_logit_bias = k;
    free(e);
    return 0;
}

struct sampler *samp_create(const struct samp_params *p, int64_t n_vocab,
                            char *err, size_t errlen)
{
    if (validate(p, n_vocab, err, errlen) != 0)
        return NULL;
    struct sampler *s = calloc(1, sizeof(*s));
    if (!s)
        goto oom;
    s->p = *p;
    s->n_vocab = n_vocab;
    s->p.n_logit_bias = 0;
    if (p->n_logit_bias > 0 && bias_merge(s, p) != 0)
        goto oom;
    s->p.logit_bias = s->bias;
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++)
        s->rng[i] = splitmix64(&x);
    s->cap = 64;
    s->ent_cap = s->cap / 2;
    s->tab = malloc(s->cap * sizeof(*s->tab));
    s->ent = malloc(s->ent_cap * sizeof(*s->ent));
    s->gen_ix = malloc(s->ent_cap * sizeof(*s->gen_ix));
    s->prompt_ix = malloc(s->ent_cap * sizeof(*s->prompt_ix));
    if (!s->tab || !s->ent || !s->gen_ix || !s->prompt_ix)
        goto oom;
    for (uint32_t i = 0; i < s->cap; i++)
        s->tab[i] = -1;
    return s;
oom:
    snprintf(err, errlen, "sampler: out of memory");
    samp_destroy(s);
    return NULL;
}

void samp_destroy(struct sampler *s)
{
    if (!s)
        return;
    free(s->tp);
    free(s->cand);
    free(s->tab);
    free(s->prompt_ix);
    free(s->gen_ix);
    free(s->ent);
    free(s->bias);
    free(s);
}

/* ---------------------------------------------------------------- counts */

static uint32_t slot_of(uint32_t cap, int32_t token)
{
    uint32_t h = (uint32_t)token * 2654435761u; /* Knuth's multiplicative hash */
    return (h ^ (h >> 16)) & (cap - 1);
}

/* The entry of token, added (zero counts) if new. */
static struct samp_count *count_slot(struct sampler *s, int32_t token)
{
    uint32_t j = slot_of(s->cap, token);
    while (s->tab[j] >= 0 && s->ent[s->tab[j]].token != token)
        j = (j + 1) & (s->cap - 1);
    if (s->tab[j] >= 0)
        return &s->ent[s->tab[j]];
    /* New token. Load stays <= 1/2 (n_ent <= ent_cap == cap / 2), so
     * probes are short and an empty slot exists. */
    if (s->n_ent == s->ent_cap) {
        s->cap *= 2;
        s->ent_cap = s->cap / 2;
        s->ent = samp_xrealloc(s->ent, s->ent_cap * sizeof(*s->ent));
        s->gen_ix = samp_xrealloc(s->gen_ix, s->ent_cap * sizeof(*s->gen_ix));
        s->prompt_ix = samp_xrealloc(s->prompt_ix, s->ent_cap * sizeof(*s->prompt_ix));
        s->tab = samp_xrealloc(s->tab, s->cap * sizeof(*s->tab));
        for (uint32_t i = 0; i < s->cap; i++)
            s->tab[i] = -1;
        for (uint32_t e = 0; e < s->n_ent; e++) {
            uint32_t k = slot_of(s->cap, s->ent[e].token);
            while (s->tab[k] >= 0)
                k = (k + 1) & (s->cap - 1);
            s->tab[k] = (int32_t)e;
        }
        j = slot_of(s->cap, token);
        while (s->tab[j] >= 0)
            j = (j + 1) & (s->cap - 1);
    }
    struct samp_count *c = &s->ent[s->n_ent];
    c->token = token;
    c->n_gen = 0;
    c->in_prompt = 0;
    s->tab[j] = (int32_t)s->n_ent++;
    return c;
}

int samp_accept_prompt(struct sampler *s, const int32_t *tokens, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= s->n_vocab)
            return -1;
    for (int64_t i = 0; i < n; i++) {
        struct samp_count *c = count_slot(s, tokens[i]);
        if (!c->in_prompt) {
            c->in_prompt = 1;
            s->prompt_ix[s->n_prompt_ix++] = (int32_t)(c - s->ent);
        }
    }
    return 0;
}

int samp_accept(struct sampler *s, int32_t token)
{
    if (token < 0 || token >= s->n_vocab)
        return -1;
    struct samp_count *c = count_slot(s, token);
    if (c->n_gen == 0)
        s->gen_ix[s->n_gen_ix++] = (int32_t)(c - s->ent);
    if (c->n_gen < INT32_MAX)
        c->n_gen++;
    s->step++;
    return 0;
}

static int penalties_on(const struct sampler *s)
{
    return s->p.repetition_penalty != 1.0f || s->p.frequency_penalty != 0.0f ||
           s->p.presence_penalty != 0.0f;
}

/* Steps 1-3 of the header's order. O(biases + distinct tokens seen).
 * The samp_view rule in sampler.h restates this for a device; keep
 * the two in step. */
static void apply_bias_and_penalties(const struct sampler *s, float *logits)
{
    for (int32_t i = 0; i < s->p.n_logit_bias; i++)
        logits[s->bias[i].token] += s->bias[i].bias;
    if (!penalties_on(s))
        return;
    float rep = s->p.repetition_penalty, freq = s->p.frequency_penalty,
          pres = s->p.presence_penalty;
    for (uint32_t i = 0; i < s->n_ent; i++) {
        const struct samp_count *c = &s->ent[i];
        float v = logits[c->token];
        if (rep != 1.0f)
            v = v > 0.0f ? v / rep : v * rep;
        if (c->n_gen > 0)
            v -= freq * (float)c->n_gen + pres;
        logits[c->token] = v;
    }
}

/* ---------------------------------------------------------------- view */

void samp_view_get(const struct sampler *s, struct samp_view *out)
{
    memset(out, 0, sizeof(*out));
    out->temperature = s->p.temperature;
    out->top_p = s->p.top_p;
    out->min_p = s->p.min_p;
    out->presence_penalty = s->p.presence_penalty;
    out->frequency_penalty = s->p.frequency_penalty;
    out->repetition_penalty = s->p.repetition_penalty;
    out->top_k = s->p.top_k;
    out->n_top_logprobs = s->p.top_logprobs;
    out->want_logprob = s->p.logprobs || s->p.top_logprobs > 0;
    out->seed = s->p.seed;
    out->step = s->step;
    out->penalties = penalties_on(s);
    out->n_seen = s->n_gen_ix;
    out->n_prompt = s->n_prompt_ix;
    out->n_bias = s->p.n_logit_bias;
}

int64_t samp_view_seen(const struct sampler *s, int32_t *tok, int32_t *cnt, int64_t cap)
{
    int64_t n = s->n_gen_ix;
    for (int64_t i = 0; i < n && i < cap; i++) {
        const struct samp_count *c = &s->ent[s->gen_ix[i]];
        tok[i] = c->token;
        cnt[i] = c->n_gen;
    }
    return n;
}

int64_t samp_view_prompt(const struct sampler *s, int32_t *tok, int64_t cap)
{
    int64_t n = s->n_prompt_ix;
    for (int64_t i = 0; i < n && i < cap; i++)
        tok[i] = s->ent[s->prompt_ix[i]].token;
    return n;
}

int64_t samp_view_bias(const struct sampler *s, int32_t *tok, float *val, int64_t cap)
{
    int64_t n = s->p.n_logit_bias;
    for (int64_t i = 0; i < n && i < cap; i++) {
        tok[i] = s->bias[i].token;
        val[i] = s->bias[i].bias;
    }
    return n;
}

/* ---------------------------------------------------------------- selection */

/* The total order of candidates: higher logit first, lower id on ties, so
 * every cut (top_k, top_p, top_logprobs) is deterministic. */
static int cand_better(struct samp_cand a, struct samp_cand b)
{
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

static int cand_cmp(const void *pa, const void *pb)
{
    struct samp_cand a = *(const struct samp_cand *)pa, b = *(const struct samp_cand *)pb;
    return cand_better(a, b) ? -1 : cand_better(b, a) ? 1 : 0;
}

static void heap_swap(struct samp_cand *h, size_t i, size_t j)
{
    struct samp_cand t = h[i];
    h[i] = h[j];
    h[j] = t;
}

/* Min-heap by cand_better: the worst kept candidate sits at the root. */
static void heap_down(struct samp_cand *h, size_t n, size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && cand_better(h[w], h[l]))
            w = l;
        if (r < n && cand_better(h[w], h[r]))
            w = r;
        if (w == i)
            return;
        heap_swap(h, i, w);
        i = w;
    }
}

static void heap_up(struct samp_cand *h, size_t i)
{
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_better(h[p], h[i]))
            return;
        heap_swap(h, p, i);
        i = p;
    }
}

/* Writes the best m tokens with a logit above -inf (NaN skipped) to out,
 * sorted, and returns how many there were (< m when the vocabulary has
 * fewer). O(n log m) at worst; in practice O(n), since after the first
 * few thousand tokens almost none beats the root. */
static size_t select_top(const float *x, int64_t n, size_t m, struct samp_cand *out)
{
    size_t k = 0;
    for (int64_t i = 0; i < n && m > 0; i++) {
        float v = x[i];
        if (!(v > -INFINITY))
            continue;
        struct samp_cand c = {v, (int32_t)i};
        if (k < m) {
            out[k] = c;
            heap_up(out, k++);
        } else if (cand_better(c, out[0])) {
            out[0] = c;
            heap_down(out, k, 0);
        }
    }
    qsort(out, k, sizeof(*out), cand_cmp);
    return k;
}

static struct samp_cand *cand_buf(struct sampler *s, size_t m)
{
    if (m > s->cand_cap) {
        s->cand = samp_xrealloc(s->cand, m * sizeof(*s->cand));
        s->cand_cap = m;
    }
    return s->cand;
}

/* ---------------------------------------------------------------- sampling */

/* log-softmax at temperature 1 over the processed logits, in double. These
 * are the logprobs reported: after bias and penalties, before temperature
 * and truncation (vLLM's V0 sampler reported them after temperature too;
 * V1 by default reports the raw model logits, which equal these when no
 * bias or penalty is set). */
static void fill_logprobs(const struct sampler *s, const float *x, double max,
                          int32_t token, struct samp_result *out)
{
    double sum = 0.0;
    for (int64_t i = 0; i < s->n_vocab; i++)
        if (x[i] > -INFINITY)
            sum += exp((double)x[i] - max);
    double log_z = max + log(sum);
    out->logprob = (float)((double)x[token] - log_z);
    if (s->p.top_logprobs > 0) {
        struct samp_cand top[SAMP_MAX_TOP_LOGPROBS];
        size_t k = select_top(x, s->n_vocab, (size_t)s->p.top_logprobs, top);
        for (size_t j = 0; j < k; j++) {
            out->top[j].token = top[j].id;
            out->top[j].logprob = (float)((double)top[j].logit - log_z);
        }
        out->n_top = (int)k;
    }
}

/* Draws one of cand[0..n) with weights exp((logit - max) / t), given the
 * request's uniform r in [0, 1). */
static int32_t draw_cands(const struct samp_cand *c, size_t n, double max, double t, double r)
{
    double z = 0.0;
    for (size_t j = 0; j < n; j++)
        z += exp(((double)c[j].logit - max) / t);
    double u = r * z, acc = 0.0;
    for (size_t j = 0; j < n; j++) {
        acc += exp(((double)c[j].logit - max) / t);
        if (acc > u)
            return c[j].id;
    }
    return c[n - 1].id; /* rounding left u just above the sum */
}

/* top_k, and top_p whenever top_p_fast is unsure: sorts candidates by
 * rank and cuts the sorted list. The reference top_p_fast reproduces. */
static int32_t truncate_sorted(struct sampler *s, const float *logits, double m, double t,
                               double cut, int top_k_on, int top_p_on, double r)
{
    const int64_t n = s->n_vocab;
    /* top_k: exactly k candidates. top_p alone: start with a few and
     * widen until their mass reaches top_p; a flat distribution ends
     * in a sort of the whole vocabulary, a peaked one never does. */
    size_t want = top_k_on ? (size_t)s->p.top_k : (size_t)(n < 64 ? n : 64);
    double z_all = -1.0; /* softmax denominator over the vocabulary */
    size_t keep;
    for (;;) {
        struct samp_cand *c = cand_buf(s, want);
        size_t k = select_top(logits, n, want, c);
        keep = k;
        if (!top_p_on)
            break;
        double z = 0.0;
        if (top_k_on) {
            for (size_t j = 0; j < k; j++)
                z += exp(((double)c[j].logit - m) / t);
        } else {
            if (z_all < 0.0) {
                z_all = 0.0;
                for (int64_t i = 0; i < n; i++)
                    if (logits[i] > -INFINITY) /* skips NaN too */
                        z_all += exp(((double)logits[i] - m) / t);
            }
            z = z_all;
        }
        /* The smallest prefix whose mass reaches top_p. */
        double target = (double)s->p.top_p * z, acc = 0.0;
        int reached = 0;
        for (size_t j = 0; j < k; j++) {
            acc += exp(((double)c[j].logit - m) / t);
            if (acc >= target) {
                keep = j + 1;
                reached = 1;
                break;
            }
        }
        if (reached || top_k_on || k < want || want >= (size_t)n)
            break;
        want = want * 8 < (size_t)n ? want * 8 : (size_t)n;
    }
    const struct samp_cand *c = s->cand;
    while (keep > 1 && ((double)c[keep - 1].logit - m) / t < cut)
        keep--;
    return draw_cands(c, keep, m, t, r);
}

/* ---------------------------------------------------------------- top_p */

/* top_p alone without the sort. The ranking (logit desc, id asc) is also
 * the order of the key (max - logit) * scale, so a histogram of keys with
 * the weight in each bucket says which bucket a running sum crosses a bar
 * in; only that bucket is sorted (or, when large, split again), and every
 * bucket before it is passed by its sum. Sums come out in a different
 * order than the sort's, so a few ulps apart: a crossing closer to its bar
 * than the worst-case rounding of either (margin) is left to
 * truncate_sorted, which happens about once in 1e4 steps on a flat
 * 152k vocabulary and makes the result identical to it in every case. */
struct tp_ctx {
    const float *x;
    int64_t n;
    double m, t, cut;
    double scale[TP_LEVELS + 1]; /* key units per unit of max - logit */
    double nkeys[TP_LEVELS + 1]; /* TP_NB^level */
    int use_cut;                 /* only tokens at or above min_p's bar */
    int bounded;                 /* only tokens ranked at or before bound */
    struct samp_cand bound;
    double target;
    int strict;                  /* the crossing is acc > target, else >= */
    /* the crossing, once found */
    struct samp_cand hit;
    double acc_prev, acc_at;
};

/* Bucket of logit v at a level. Levels agree (key at level L + 1 divided
 * by TP_NB is the key at L) because scales differ by powers of two, which
 * multiply exactly. -inf and NaN land in the last bucket; tp_in drops them. */
static int64_t tp_key(const struct tp_ctx *c, float v, int level)
{
    double k = (c->m - (double)v) * c->scale[level];
    return k < c->nkeys[level] ? (int64_t)k : (int64_t)c->nkeys[level] - 1;
}

static int tp_in(const struct tp_ctx *c, float v, int32_t id)
{
    if (!(v > -INFINITY))
        return 0;
    if (c->use_cut && ((double)v - c->m) / c->t < c->cut)
        return 0;
    struct samp_cand me = {v, id};
    return !(c->bounded && cand_better(c->bound, me));
}

static int tp_crosses(const struct tp_ctx *c, double acc)
{
    return c->strict ? acc > c->target : acc >= c->target;
}

/* Histogram at level of the tokens in bucket parent of the level above. */
static void tp_hist_pass(const struct tp_ctx *c, int level, int64_t parent, struct tp_hist *h)
{
    memset(h, 0, sizeof(*h));
    for (int64_t i = 0; i < c->n; i++) {
        float v = c->x[i];
        if (tp_key(c, v, level - 1) != parent || !tp_in(c, v, (int32_t)i))
            continue;
        int64_t b = tp_key(c, v, level) - parent * TP_NB;
        h->mass[b] += exp(((double)v - c->m) / c->t);
        h->cnt[b]++;
    }
}

/* Sorts the at most cap tokens of bucket key and walks them from *acc. */
static int tp_collect(struct sampler *s, struct tp_ctx *c, int level, int64_t key,
                      uint32_t cap, double *acc)
{
    struct samp_cand *cd = cand_buf(s, cap > 0 ? cap : 1);
    size_t k = 0;
    for (int64_t i = 0; i < c->n && k < cap; i++) {
        float v = c->x[i];
        if (tp_key(c, v, level) != key || !tp_in(c, v, (int32_t)i))
            continue;
        cd[k].logit = v;
        cd[k++].id = (int32_t)i;
    }
    /* Ties (a flat distribution) arrive in id order, already sorted. */
    size_t j = 1;
    while (j < k && !cand_better(cd[j], cd[j - 1]))
        j++;
    if (j < k)
        qsort(cd, k, sizeof(*cd), cand_cmp);
    for (j = 0; j < k; j++) {
        double prev = *acc;
        *acc += exp(((double)cd[j].logit - c->m) / c->t);
        if (tp_crosses(c, *acc)) {
            c->hit = cd[j];
            c->acc_prev = prev;
            c->acc_at = *acc;
            return 1;
        }
    }
    return 0;
}

/* Walks the buckets of h (the children of parent) in rank order, adding
 * their weight to *acc, and descends into the first whose sum crosses the
 * bar; a bucket that does not hold the crossing after all (rounding) is
 * passed and the walk goes on. Bucket last (-1: none) is where the bounded
 * set ends and its weight in h is not the set's: it is always entered and
 * the walk stops there. Returns 1 at the crossing, 0 when exhausted. */
static int tp_walk(struct sampler *s, struct tp_ctx *c, int level, int64_t parent,
                   const struct tp_hist *h, int last, double *acc)
{
    int end = last >= 0 ? last : TP_NB - 1;
    for (int b = 0; b <= end; b++) {
        if (h->cnt[b] == 0)
            continue;
        double next = *acc + h->mass[b];
        if (b != last && !tp_crosses(c, next)) {
            *acc = next;
            continue;
        }
        int64_t key = parent * TP_NB + b;
        int found;
        if (level < TP_LEVELS && h->cnt[b] > TP_SMALL) {
            struct tp_hist *sub = &s->tp[level + 1];
            tp_hist_pass(c, level + 1, key, sub);
            found = tp_walk(s, c, level + 1, key, sub, -1, acc);
        } else {
            found = tp_collect(s, c, level, key, h->cnt[b], acc);
        }
        if (found)
            return 1;
    }
    return 0;
}

/* top_p (then min_p) and the draw with uniform r, as truncate_sorted
 * would: returns the token, or -1 when a sum came within rounding of its
 * bar and the caller must sort. */
static int32_t top_p_fast(struct sampler *s, const float *logits, double m, double t,
                          double cut, double r)
{
    const int64_t n = s->n_vocab;
    if (!s->tp)
        s->tp = samp_xrealloc(NULL, (TP_LEVELS + 1) * sizeof(*s->tp));
    struct tp_ctx c;
    memset(&c, 0, sizeof(c));
    c.x = logits;
    c.n = n;
    c.m = m;
    c.t = t;
    c.cut = cut;
    c.scale[1] = (TP_NB / TP_RANGE) / t;
    c.nkeys[1] = TP_NB;
    for (int l = 2; l <= TP_LEVELS; l++) {
        c.scale[l] = c.scale[l - 1] * TP_NB;
        c.nkeys[l] = c.nkeys[l - 1] * TP_NB;
    }
    /* Level 1 for everything, and for what min_p keeps. z_all is summed
     * exactly as truncate_sorted sums it, so the bar is the same double. */
    struct tp_hist *h1 = &s->tp[0], *h1cut = &s->tp[1];
    const int min_p_on = cut > -INFINITY;
    memset(h1, 0, sizeof(*h1));
    if (min_p_on)
        memset(h1cut, 0, sizeof(*h1cut));
    double z_all = 0.0, z_cut = 0.0;
    for (int64_t i = 0; i < n; i++) {
        float v = logits[i];
        if (!(v > -INFINITY))
            continue;
        double e = ((double)v - m) / t, w = exp(e);
        z_all += w;
        int64_t b = tp_key(&c, v, 1);
        h1->mass[b] += w;
        h1->cnt[b]++;
        if (min_p_on && e >= cut) {
            z_cut += w;
            h1cut->mass[b] += w;
            h1cut->cnt[b]++;
        }
    }
    /* Any two sums of the same positive terms, in any order and grouping
     * of depth d, differ by at most 2 d 2^-53 of the total; d here is at
     * most 2n + TP_NB * TP_LEVELS. Eight times that, to spare a proof. */
    const double margin = z_all * (2.0 * (double)n + TP_NB * TP_LEVELS) * 0x1p-49;

    /* top_p: the first token at which the running sum reaches the bar. */
    double acc = 0.0;
    c.target = (double)s->p.top_p * z_all;
    int found = tp_walk(s, &c, 1, 0, h1, -1, &acc);
    if (found ? !(c.acc_prev < c.target - margin && c.acc_at >= c.target + margin)
              : !(acc < c.target - margin))
        return -1;
    /* What is kept: the prefix through the hit (all of it when the bar was
     * never reached), less min_p's tail. */
    double z_keep;
    if (min_p_on && (!found || ((double)c.hit.logit - m) / t < cut)) {
        c.use_cut = 1;
        z_keep = z_cut;
    } else {
        c.bounded = found;
        c.bound = c.hit;
        z_keep = found ? c.acc_at : acc;
    }

    /* The draw: the first kept token whose running sum passes r * z. */
    c.target = r * z_keep;
    c.strict = 1;
    acc = 0.0;
    const struct tp_hist *h = c.use_cut ? h1cut : h1;
    int last = c.bounded ? (int)tp_key(&c, c.bound.logit, 1) : -1;
    if (!tp_walk(s, &c, 1, 0, h, last, &acc))
        return -1;
    if (!(c.acc_prev < c.target - 2.0 * margin && c.acc_at > c.target + 2.0 * margin))
        return -1;
    return c.hit.id;
}

int32_t samp_sample(struct sampler *s, float *logits, struct samp_result *out)
{
    const int64_t n = s->n_vocab;
    memset(out, 0, sizeof(*out));
    out->token = -1;
    apply_bias_and_penalties(s, logits);

    /* Pass 1: the max and the greedy choice (strict >: lowest id wins). */
    float max = -INFINITY;
    int32_t argmax = -1;
    for (int64_t i = 0; i < n; i++)
        if (logits[i] > max) {
            max = logits[i];
            argmax = (int32_t)i;
        }
    if (argmax < 0)
        return -1;

    const double t = s->p.temperature, m = max;
    /* Relative to the best token, min_p keeps p_i >= min_p * p_max, i.e.
     * (logit_i - max) / t >= log(min_p). The best token always survives
     * top_k and top_p, so renormalising after them does not move this. */
    const double cut = s->p.min_p > 0.0f ? log((double)s->p.min_p) : -INFINITY;
    const int top_k_on = s->p.top_k > 0 && s->p.top_k < n;
    const int top_p_on = s->p.top_p < 1.0f;
    int32_t tok;

    if (t == 0.0) {
        tok = argmax;
    } else if (!top_k_on && !top_p_on) {
        /* No ordering needed: two passes over the vocabulary. */
        double z = 0.0;
        for (int64_t i = 0; i < n; i++) {
            double e = ((double)logits[i] - m) / t;
            if (e >= cut)
                z += exp(e);
        }
        double u = rng_uniform(s->rng) * z, acc = 0.0;
        tok = argmax;
        for (int64_t i = 0; i < n; i++) {
            double e = ((double)logits[i] - m) / t;
            if (e >= cut) {
                acc += exp(e);
                if (acc > u) {
                    tok = (int32_t)i;
                    break;
                }
            }
        }
    } else {
        /* One uniform per draw whichever path takes it, so the fast path
         * and the sort agree token for token. */
        double r = rng_uniform(s->rng);
        tok = -1;
        if (top_p_on && !top_k_on && isfinite(m))
            tok = top_p_fast(s, logits, m, t, cut, r);
        if (tok < 0)
            tok = truncate_sorted(s, logits, m, t, cut, top_k_on, top_p_on, r);
    }

    out->token = tok;
    if (s->p.logprobs || s->p.top_logprobs > 0)
        fill_logprobs(s, logits, m, tok, out);
    return tok;
}
