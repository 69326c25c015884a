/* sampler.h: one row of logits -> one token, per request.
 *
 * A sampler holds one request's sampling parameters, its RNG and the token
 * counts its penalties need. Created when the request is admitted, used and
 * destroyed by the engine thread only; no locking. Samplers of different
 * requests share nothing, so a seeded request samples the same tokens
 * whatever else is in the batch.
 *
 * Order of operations in samp_sample, fixed so results are reproducible:
 *   1. logit_bias (added, each bias clamped to [-100, 100]);
 *   2. repetition_penalty over prompt + generated tokens (llama.cpp/HF:
 *      logit > 0 ? logit / p : logit * p);
 *   3. frequency and presence penalties over generated tokens (OpenAI:
 *      logit -= frequency * count + presence * (count > 0));
 *      -> logprobs are taken here (log-softmax at temperature 1);
 *   4. temperature == 0: greedy (argmax, lowest id on ties), stop;
 *   5. temperature; 6. top_k; 7. top_p; 8. min_p; 9. draw from what is left.
 * Steps 1-3 match vLLM's order (logits processors, then repetition, then
 * frequency/presence) and llama.cpp's (logit bias before penalties).
 */
#ifndef INFERD_SAMPLER_H
#define INFERD_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

#define SAMP_MAX_TOP_LOGPROBS 20 /* OpenAI's limit on top_logprobs */
#define SAMP_MAX_BIAS 100.0f     /* logit_bias values are clamped to +-this */

struct samp_bias {
    int32_t token;
    float bias;
};

/* The request's parameters, named as the OpenAI API names them. Zero is
 * not a neutral value for every field: start from samp_params_default. */
struct samp_params {
    float temperature;        /* [0, 2]; 0 = greedy */
    int32_t top_k;            /* >= -1; 0 or -1 = off */
    float top_p;              /* (0, 1]; 1 = off */
    float min_p;              /* [0, 1]; 0 = off */
    float presence_penalty;   /* [-2, 2]; 0 = off */
    float frequency_penalty;  /* [-2, 2]; 0 = off */
    float repetition_penalty; /* > 0; 1 = off */
    /* n_logit_bias entries, copied by samp_create. A token listed twice
     * gets the sum of its biases, each clamped first and summed in list
     * order, then added to the logit in one add (the API layer passes
     * unique ids). */
    const struct samp_bias *logit_bias;
    int32_t n_logit_bias;
    /* Seeds the request's own RNG. The API layer draws one from entropy
     * when the request names none, so every sampler is seeded. */
    uint64_t seed;
    int logprobs;     /* nonzero: report the chosen token's logprob */
    int top_logprobs; /* [0, 20]: also report this many most likely tokens */
};

struct samp_logprob {
    int32_t token;
    float logprob;
};

struct samp_result {
    int32_t token;
    /* Set when logprobs or top_logprobs was asked for. Log-softmax of the
     * logits after bias and penalties, before temperature and truncation
     * (so a token top_k removed still has its model logprob). */
    float logprob;
    int n_top; /* top_logprobs entries, sorted by logprob desc, then id */
    struct samp_logprob top[SAMP_MAX_TOP_LOGPROBS];
};

struct sampler;

/* Neutral parameters: temperature 1, every filter and penalty off. */
struct samp_params samp_params_default(void);

/* Validates p against a vocabulary of n_vocab tokens and returns a sampler
 * seeded from p->seed, or NULL with a message naming the parameter in err
 * (meant for the client: "temperature must be between 0 and 2, got 3").
 * p->logit_bias is copied; caller keeps ownership of p. Caller owns the
 * result. Out of memory is NULL with a message too. */
struct sampler *samp_create(const struct samp_params *p, int64_t n_vocab,
                            char *err, size_t errlen);
/* Frees everything. Accepts NULL. */
void samp_destroy(struct sampler *s);

/* Records n prompt tokens (repetition_penalty only). Returns 0, or -1 and
 * records nothing when a token is outside [0, n_vocab). */
int samp_accept_prompt(struct sampler *s, const int32_t *tokens, int64_t n);
/* Records one generated token (every penalty). The engine calls it with
 * each token samp_sample returned, and with tokens it forces (if any).
 * Returns 0, or -1 when the token is outside [0, n_vocab). */
int samp_accept(struct sampler *s, int32_t token);

/* ---------------------------------------------------------------- view */

/* A read-only view of a sampler's state, for a backend that samples on a
 * device: scalar parameters here, the token lists through samp_view_seen,
 * samp_view_prompt and samp_view_bias. Nothing in it costs O(n_vocab).
 *
 * The lists reproduce steps 1-3 of samp_sample exactly. For a row x of
 * n_vocab floats, a device gets samp_sample's processed logits bit for bit
 * by:
 *   1. for each (t, b) of the bias list: x[t] = x[t] + b  (ids are unique:
 *      one float add per token);
 *   2. if penalties == 0, stop;
 *   3. for each token t of seen UNION prompt, once:
 *        v = x[t];
 *        if (repetition_penalty != 1) v = v > 0 ? v / rep : v * rep;
 *        if (t is in seen, count c)   v = v - (freq * (float)c + pres);
 *        x[t] = v;
 *      the product, the sum and the difference each rounded to float, no
 *      fused multiply-add (nvcc fuses by default: use __fmul_rn,
 *      __fadd_rn, __fsub_rn, or -fmad=false).
 * A token both generated and in the prompt is in BOTH lists and gets the
 * repetition penalty once: e.g. walk seen applying rep and freq/pres,
 * then walk prompt applying rep only to tokens not in seen. A prompt-only
 * token gets no presence/frequency penalty. Distinct tokens touch distinct
 * logits, so the order among them does not matter. */
struct samp_view {
    float temperature, top_p, min_p;
    float presence_penalty, frequency_penalty, repetition_penalty;
    int32_t top_k;          /* as asked: <= 0, or >= n_vocab, means off */
    int32_t n_top_logprobs; /* 0..20: top_logprobs as asked */
    int want_logprob;       /* logprobs or top_logprobs was asked for */
    uint64_t seed;          /* the request's seed (the CPU RNG's state is not exported) */
    uint64_t step;          /* successful samp_accept calls so far */
    int penalties;          /* repetition != 1 or frequency != 0 or presence != 0 */
    /* What the list functions return now, to size buffers in one pass. */
    int64_t n_seen, n_prompt, n_bias;
};

/* Fills *out from s. Engine thread; O(1). */
void samp_view_get(const struct sampler *s, struct samp_view *out);

/* The lists. Each reads s only (engine thread), writes its first
 * min(count, cap) entries to the caller's arrays (caller owns them) and
 * returns the full count; cap 0 (arrays may be NULL) just counts.
 * O(entries written), never O(n_vocab). Each list names a token at most
 * once and only grows: an entry keeps its position and new entries are
 * appended, so a caller may upload a list's new tail only (counts of seen
 * entries still change in place).
 *
 * seen: every token samp_accept recorded (generated, or forced by the
 * engine), with cnt = how many times, >= 1 (saturating at INT32_MAX), in
 * the order first accepted. */
int64_t samp_view_seen(const struct sampler *s, int32_t *tok, int32_t *cnt, int64_t cap);
/* prompt: every token samp_accept_prompt recorded, in the order first
 * recorded, including those also in seen. Kept whatever
 * repetition_penalty is; only read when it is not 1. */
int64_t samp_view_prompt(const struct sampler *s, int32_t *tok, int64_t cap);
/* bias: one (token, bias) pair per distinct token of logit_bias, in
 * ascending id order; the bias is the list-order sum of that token's
 * entries, each clamped to [-SAMP_MAX_BIAS, SAMP_MAX_BIAS] (so beyond
 * +-100 only when the request listed a token twice). */
int64_t samp_view_bias(const struct sampler *s, int32_t *tok, float *val, int64_t cap);

/* Picks the next token from logits (n_vocab floats), writes it and its
 * logprobs to *out and returns it. logits is modified in place: on return
 * it holds the values after bias and penalties (steps 1-3 above), the ones
 * the logprobs come from. Does not record the token: call samp_accept.
 * Returns -1 (and out->token = -1) when no logit is a number above -inf,
 * which only a broken model produces. O(n_vocab) plus a sort of the top
 * candidates when top_k or top_p is on. */
int32_t samp_sample(struct sampler *s, float *logits, struct samp_result *out);

#endif
