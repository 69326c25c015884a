/* sampler.c: logit processing, truncation and the draw, per request.
 * Engine thread only. The penalty counts are a small open-addressing hash
 * (token -> counts), so a request costs memory for the distinct tokens it
 * has seen, not n_vocab ints. Truncation never sorts the whole vocabulary
 * unless top_p needs it: the top candidates are picked with a bounded heap
 * and only those are sorted. */
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

struct samp_count {
    int32_t token;     /* -1: empty slot */
    uint32_t n_gen;    /* times generated */
    uint32_t in_prompt;
};

struct samp_cand {
    float logit;
    int32_t id;
};

struct sampler {
    struct samp_params p; /* p.logit_bias points at bias */
    struct samp_bias *bias;
    int64_t n_vocab;
    uint64_t rng[4];
    struct samp_count *tab; /* (cap) open addressing, linear probing */
    uint32_t cap, used;
    struct samp_cand *cand; /* (cand_cap) top candidates, grown on demand */
    size_t cand_cap;
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
    if (p->n_logit_bias > 0) {
        s->bias = malloc((size_t)p->n_logit_bias * sizeof(*s->bias));
        if (!s->bias)
            goto oom;
        for (int32_t i = 0; i < p->n_logit_bias; i++) {
            s->bias[i] = p->logit_bias[i];
            s->bias[i].bias = fminf(SAMP_MAX_BIAS, fmaxf(-SAMP_MAX_BIAS, s->bias[i].bias));
        }
    }
    s->p.logit_bias = s->bias;
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++)
        s->rng[i] = splitmix64(&x);
    s->cap = 64;
    s->tab = malloc(s->cap * sizeof(*s->tab));
    if (!s->tab)
        goto oom;
    for (uint32_t i = 0; i < s->cap; i++)
        s->tab[i].token = -1;
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
    free(s->cand);
    free(s->tab);
    free(s->bias);
    free(s);
}

/* ---------------------------------------------------------------- counts */

static uint32_t slot_of(uint32_t cap, int32_t token)
{
    uint32_t h = (uint32_t)token * 2654435761u; /* Knuth's multiplicative hash */
    return (h ^ (h >> 16)) & (cap - 1);
}

static struct samp_count *count_slot(struct sampler *s, int32_t token)
{
    /* Load stays <= 1/2, so probes are short and an empty slot exists. */
    if ((s->used + 1) * 2 > s->cap) {
        uint32_t old_cap = s->cap;
        struct samp_count *old = s->tab;
        s->cap *= 2;
        s->tab = samp_xrealloc(NULL, s->cap * sizeof(*s->tab));
        for (uint32_t i = 0; i < s->cap; i++)
            s->tab[i].token = -1;
        for (uint32_t i = 0; i < old_cap; i++) {
            if (old[i].token < 0)
                continue;
            uint32_t j = slot_of(s->cap, old[i].token);
            while (s->tab[j].token >= 0)
                j = (j + 1) & (s->cap - 1);
            s->tab[j] = old[i];
        }
        free(old);
    }
    uint32_t j = slot_of(s->cap, token);
    while (s->tab[j].token >= 0 && s->tab[j].token != token)
        j = (j + 1) & (s->cap - 1);
    if (s->tab[j].token < 0) {
        s->tab[j].token = token;
        s->tab[j].n_gen = 0;
        s->tab[j].in_prompt = 0;
        s->used++;
    }
    return &s->tab[j];
}

int samp_accept_prompt(struct sampler *s, const int32_t *tokens, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= s->n_vocab)
            return -1;
    for (int64_t i = 0; i < n; i++)
        count_slot(s, tokens[i])->in_prompt = 1;
    return 0;
}

int samp_accept(struct sampler *s, int32_t token)
{
    if (token < 0 || token >= s->n_vocab)
        return -1;
    struct samp_count *c = count_slot(s, token);
    if (c->n_gen < UINT32_MAX)
        c->n_gen++;
    return 0;
}

/* Steps 1-3 of the header's order. O(biases + distinct tokens seen). */
static void apply_bias_and_penalties(const struct sampler *s, float *logits)
{
    for (int32_t i = 0; i < s->p.n_logit_bias; i++)
        logits[s->bias[i].token] += s->bias[i].bias;
    float rep = s->p.repetition_penalty, freq = s->p.frequency_penalty,
          pres = s->p.presence_penalty;
    if (rep == 1.0f && freq == 0.0f && pres == 0.0f)
        return;
    for (uint32_t i = 0; i < s->cap; i++) {
        const struct samp_count *c = &s->tab[i];
        if (c->token < 0)
            continue;
        float v = logits[c->token];
        if (rep != 1.0f)
            v = v > 0.0f ? v / rep : v * rep;
        if (c->n_gen > 0)
            v -= freq * (float)c->n_gen + pres;
        logits[c->token] = v;
    }
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

/* Draws one of cand[0..n) with weights exp((logit - max) / t). */
static int32_t draw_cands(struct sampler *s, const struct samp_cand *c, size_t n,
                          double max, double t)
{
    double z = 0.0;
    for (size_t j = 0; j < n; j++)
        z += exp(((double)c[j].logit - max) / t);
    double u = rng_uniform(s->rng) * z, acc = 0.0;
    for (size_t j = 0; j < n; j++) {
        acc += exp(((double)c[j].logit - max) / t);
        if (acc > u)
            return c[j].id;
    }
    return c[n - 1].id; /* rounding left u just above the sum */
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
        tok = draw_cands(s, c, keep, m, t);
    }

    out->token = tok;
    if (s->p.logprobs || s->p.top_logprobs > 0)
        fill_logprobs(s, logits, m, tok, out);
    return tok;
}
