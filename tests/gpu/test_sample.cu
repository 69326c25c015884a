// test_sample.cu: kc_sample (kernels/cuda/sample.cu) against a CPU
// reference written here from engine/sampler.c's semantics (bias, then
// repetition over prompt + generated, then frequency/presence; logprobs at
// temperature 1 there; greedy; temperature, top_k, top_p, min_p).
//
// The engine's sampler draws from its own xoshiro stream, so the draw is
// checked three ways instead of token for token against it: every token
// lies in the set top_k/top_p/min_p keep; the token is the one the kernel's
// documented rule gives (Philox4x32-10 of (seed, step), reimplemented here
// and checked against Random123's known answers, then the inverse CDF over
// the kept tokens in id order), allowing a miss only where the target falls
// within rounding of a boundary; and 20k draws over 16 tokens follow the
// softmax (chi-square). A request samples the same whatever its row and
// batch: compared bit for bit alone, in a batch of 64 and reversed.
#include "tests/gpu/gpu_check.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <set>

namespace {

constexpr int kTop = 20;
constexpr double kNear = 1e-5; // relative to the kept weight: the kernel's fp32 weights
                                // (x - max, * log2(e) / t, exp2f) against double

// ------------------------------------------------------------ Philox

// Philox4x32-10 as in Salmon et al. (SC'11) and Random123's philox4x32.
void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1)
{
    for (int r = 0; r < 10; r++) {
        if (r > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint64_t p0 = (uint64_t)0xD2511F53u * c[0];
        const uint64_t p1 = (uint64_t)0xCD9E8D57u * c[2];
        const uint32_t o[4] = {(uint32_t)(p1 >> 32) ^ c[1] ^ k0, (uint32_t)p1,
                               (uint32_t)(p0 >> 32) ^ c[3] ^ k1, (uint32_t)p0};
        memcpy(c, o, sizeof o);
    }
}

// The kernel's 64 random bits: counter (step lo, step hi, 0, 0), key
// (seed lo, seed hi), output words 0 and 1.
uint64_t draw_bits(uint64_t seed, uint64_t step)
{
    uint32_t c[4] = {(uint32_t)step, (uint32_t)(step >> 32), 0, 0};
    philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
    return ((uint64_t)c[0] << 32) | c[1];
}

void test_philox_kat()
{
    // Random123 tests/kat_vectors, the three "philox4x32 10" lines:
    // counter[4] key[2] -> output[4].
    static const uint32_t kat[3][10] = {
        {0, 0, 0, 0, 0, 0, 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
        {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0x408f276d,
         0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
        {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0, 0xd16cfe09,
         0x94fdcceb, 0x5001e420, 0x24126ea1},
    };
    int bad = 0;
    for (const auto &v : kat) {
        uint32_t c[4] = {v[0], v[1], v[2], v[3]};
        philox4x32_10(c, v[4], v[5]);
        for (int i = 0; i < 4; i++)
            bad += c[i] != v[6 + i];
    }
    gc_check("sample", "philox4x32_10_known_answers", bad, 0);
}

// ------------------------------------------------------------ inputs

struct Req {
    kc_samp_row p;
    std::vector<int32_t> seen, seen_cnt, prompt, bias_tok;
    std::vector<float> bias_val;
};

kc_samp_row row_params(float temperature)
{
    kc_samp_row p;
    memset(&p, 0, sizeof p);
    p.temperature = temperature;
    p.top_p = 1.0f;
    p.repetition_penalty = 1.0f;
    return p;
}

float normal(gc_rng &g)
{
    const float u1 = g.uniform(1e-7f, 1.0f), u2 = g.uniform(0.0f, 1.0f);
    return sqrtf(-2.0f * logf(u1)) * cosf(6.28318530718f * u2);
}

enum Flavor { PEAKED, BF16, FLAT, MASKED, TIED_MAX, CONSTANT, N_FLAVORS };

// A row of logits shaped like a model's (a broad bulk and a few peaks), or
// one of the awkward cases: bf16 values (many exact ties), a flat row
// (top_p cuts deep), -inf and NaN entries, a tie at the max, all equal.
void gen_logits(gc_rng &g, float *x, int64_t n, int flavor)
{
    if (flavor == CONSTANT) {
        for (int64_t i = 0; i < n; i++)
            x[i] = 1.0f;
        return;
    }
    const float scale = flavor == FLAT ? 0.5f : 2.0f;
    for (int64_t i = 0; i < n; i++)
        x[i] = scale * normal(g);
    if (flavor != FLAT)
        for (int j = 0; j < 8; j++)
            x[g.next() % n] = g.uniform(8.0f, 16.0f);
    if (flavor == BF16)
        for (int64_t i = 0; i < n; i++)
            x[i] = gc_bf16_to_f32(gc_f32_to_bf16(x[i]));
    if (flavor == MASKED) {
        for (int64_t i = 0; i < n; i++)
            if (g.next() % 10 == 0)
                x[i] = -INFINITY;
        for (int j = 0; j < 3; j++)
            x[g.next() % n] = NAN;
    }
    if (flavor == TIED_MAX) {
        float m = -INFINITY;
        for (int64_t i = 0; i < n; i++)
            m = std::max(m, x[i]);
        for (int j = 0; j < 3; j++)
            x[g.next() % n] = m + 1.0f;
    }
}

// ------------------------------------------------------------ reference

bool finite_or_inf(float v)
{
    return v > -INFINITY;
}

// Steps 1-3 of engine/sampler.c, in float as it does them.
void ref_apply(float *x, const Req &q)
{
    for (size_t j = 0; j < q.bias_tok.size(); j++)
        x[q.bias_tok[j]] += q.bias_val[j];
    const float rep = q.p.repetition_penalty, freq = q.p.frequency_penalty,
                pres = q.p.presence_penalty;
    if (rep == 1.0f && freq == 0.0f && pres == 0.0f)
        return;
    std::map<int32_t, int32_t> gen;
    for (size_t j = 0; j < q.seen.size(); j++)
        gen[q.seen[j]] = q.seen_cnt[j];
    std::set<int32_t> all(q.seen.begin(), q.seen.end());
    all.insert(q.prompt.begin(), q.prompt.end());
    for (int32_t t : all) {
        float v = x[t];
        if (rep != 1.0f)
            v = v > 0.0f ? v / rep : v * rep;
        auto it = gen.find(t);
        if (it != gen.end() && it->second > 0)
            v -= freq * (float)it->second + pres;
        x[t] = v;
    }
}

// What the deterministic part of a row gives: argmax, log-softmax, ranks.
struct Ref {
    int32_t argmax = -1;
    double m = -INFINITY, log_z = 0;
    std::vector<int32_t> order; // finite ids by (logit desc, id asc)
    std::vector<int32_t> rank;  // (n) position in order, -1 when not finite
};

Ref ref_row(const float *x, int64_t n)
{
    Ref r;
    for (int64_t i = 0; i < n; i++)
        if (x[i] > r.m) {
            r.m = x[i];
            r.argmax = (int32_t)i;
        }
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        if (finite_or_inf(x[i])) {
            s += exp((double)x[i] - r.m);
            r.order.push_back((int32_t)i);
        }
    r.log_z = r.m + log(s);
    std::sort(r.order.begin(), r.order.end(),
              [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
    r.rank.assign(n, -1);
    for (size_t j = 0; j < r.order.size(); j++)
        r.rank[r.order[j]] = (int32_t)j;
    return r;
}

// The kept set and the kernel's draw, in double. near_*: a boundary lies
// within rounding, so the kernel may differ from this by one token there.
struct Expect {
    int32_t tok = -1;
    size_t keep = 0; // the top_k/top_p prefix of the order
    double cut = -INFINITY;
    bool near_p = false, near_min = false, near_draw = false;
};

Expect ref_draw(const float *x, int64_t n, const Ref &rf, const kc_samp_row &p)
{
    Expect e;
    const double t = p.temperature, m = rf.m;
    const size_t nf = rf.order.size();
    auto w = [&](int32_t i) { return exp(((double)x[i] - m) / t); };
    const size_t K = p.top_k > 0 && (size_t)p.top_k < nf ? (size_t)p.top_k : nf;
    e.keep = K;
    if (p.top_p < 1.0f) {
        double z = 0, acc = 0;
        for (size_t j = 0; j < K; j++)
            z += w(rf.order[j]);
        const double target = (double)p.top_p * z;
        for (size_t j = 0; j < K; j++) {
            const double prev = acc;
            acc += w(rf.order[j]);
            if (fabs(acc - target) < kNear * z || fabs(prev - target) < kNear * z)
                e.near_p = true;
            if (acc >= target) {
                e.keep = j + 1;
                break;
            }
        }
    }
    e.cut = p.min_p > 0.0f ? log((double)p.min_p) : -INFINITY;
    std::vector<char> kept(n, 0);
    for (size_t j = 0; j < e.keep; j++) {
        const int32_t i = rf.order[j];
        const double d = ((double)x[i] - m) / t;
        kept[i] = d >= e.cut;
        if (fabs(d - e.cut) < 1e-5)
            e.near_min = true;
    }
    double z = 0;
    for (int64_t i = 0; i < n; i++)
        if (kept[i])
            z += w((int32_t)i);
    const long double u = (long double)draw_bits(p.seed, p.step) * 0x1p-64L;
    const long double target = u * z;
    long double acc = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!kept[i])
            continue;
        const long double prev = acc;
        acc += w((int32_t)i);
        if (acc > target) {
            e.tok = (int32_t)i;
            e.near_draw = (target - prev) < kNear * z || (acc - target) < kNear * z;
            break;
        }
    }
    return e;
}

// ------------------------------------------------------------ device run

struct Out {
    std::vector<int32_t> tok, top_tok;
    std::vector<float> lp, top_lp, logits;
};

// One kc_sample launch on fresh device buffers: outputs and workspace
// poisoned first; offset shifts the logits off 16-byte alignment.
Out run(int64_t n, const std::vector<float> &logits, const std::vector<Req> &req,
        int offset = 0)
{
    const int rows = (int)req.size();
    const size_t nl = (size_t)rows * (size_t)n;
    float *d_buf = nullptr;
    GC_CUDA(cudaMalloc(&d_buf, (nl + offset) * sizeof(float) + 16));
    float *d_x = d_buf + offset;
    GC_CUDA(cudaMemcpy(d_x, logits.data(), nl * sizeof(float), cudaMemcpyHostToDevice));

    std::vector<kc_samp_row> P(rows);
    std::vector<int32_t> so(rows + 1, 0), po(rows + 1, 0), bo(rows + 1, 0), st, sc, pt, bt;
    std::vector<float> bv;
    for (int r = 0; r < rows; r++) {
        const Req &q = req[r];
        P[r] = q.p;
        st.insert(st.end(), q.seen.begin(), q.seen.end());
        sc.insert(sc.end(), q.seen_cnt.begin(), q.seen_cnt.end());
        pt.insert(pt.end(), q.prompt.begin(), q.prompt.end());
        bt.insert(bt.end(), q.bias_tok.begin(), q.bias_tok.end());
        bv.insert(bv.end(), q.bias_val.begin(), q.bias_val.end());
        so[r + 1] = (int32_t)st.size();
        po[r + 1] = (int32_t)pt.size();
        bo[r + 1] = (int32_t)bt.size();
    }
    kc_samp_row *d_p = gc_upload(P);
    // A kind of list nobody uses travels as NULL, the way the engine may.
    std::vector<void *> owned;
    kc_samp_lists L;
    memset(&L, 0, sizeof L);
    if (!st.empty()) {
        L.seen_off = gc_upload(so);
        L.seen_tok = gc_upload(st);
        L.seen_cnt = gc_upload(sc);
        owned.insert(owned.end(), {(void *)L.seen_off, (void *)L.seen_tok, (void *)L.seen_cnt});
    }
    if (!pt.empty()) {
        L.prompt_off = gc_upload(po);
        L.prompt_tok = gc_upload(pt);
        owned.insert(owned.end(), {(void *)L.prompt_off, (void *)L.prompt_tok});
    }
    if (!bt.empty()) {
        L.bias_off = gc_upload(bo);
        L.bias_tok = gc_upload(bt);
        L.bias_val = gc_upload(bv);
        owned.insert(owned.end(), {(void *)L.bias_off, (void *)L.bias_tok, (void *)L.bias_val});
    }
    int32_t *d_tok, *d_tt;
    float *d_lp, *d_tl;
    void *d_ws;
    const size_t ws = kc_sample_workspace(rows, n);
    GC_CUDA(cudaMalloc(&d_tok, rows * sizeof(int32_t)));
    GC_CUDA(cudaMalloc(&d_lp, rows * sizeof(float)));
    GC_CUDA(cudaMalloc(&d_tt, (size_t)rows * kTop * sizeof(int32_t)));
    GC_CUDA(cudaMalloc(&d_tl, (size_t)rows * kTop * sizeof(float)));
    GC_CUDA(cudaMalloc(&d_ws, ws + 16));
    gc_poison(d_tok, rows * sizeof(int32_t));
    gc_poison(d_lp, rows * sizeof(float));
    gc_poison(d_tt, (size_t)rows * kTop * sizeof(int32_t));
    gc_poison(d_tl, (size_t)rows * kTop * sizeof(float));
    gc_poison(d_ws, ws); // the kernel clears what it needs

    GC_LAUNCH(kc_sample(nullptr, d_x, rows, n, d_p, &L, d_tok, d_lp, d_tt, d_tl, d_ws));
    GC_CUDA(cudaGetLastError());
    Out o;
    o.tok = gc_download(d_tok, rows);
    o.lp = gc_download(d_lp, rows);
    o.top_tok = gc_download(d_tt, (size_t)rows * kTop);
    o.top_lp = gc_download(d_tl, (size_t)rows * kTop);
    o.logits = gc_download(d_x, nl);
    for (void *ptr : owned)
        GC_CUDA(cudaFree(ptr));
    GC_CUDA(cudaFree(d_p));
    GC_CUDA(cudaFree(d_buf));
    GC_CUDA(cudaFree(d_tok));
    GC_CUDA(cudaFree(d_lp));
    GC_CUDA(cudaFree(d_tt));
    GC_CUDA(cudaFree(d_tl));
    GC_CUDA(cudaFree(d_ws));
    return o;
}

// ------------------------------------------------------------ checks

// The deterministic outputs of every row against the reference: the
// processed logits bit for bit, greedy tokens, the chosen token's logprob
// and the top list. For sampled rows, membership in the kept set and the
// inverse-CDF token. One line per quantity for the whole batch.
struct Tally {
    double logits_bad = 0, greedy_bad = 0, lp_err = 0, top_id_bad = 0, top_lp_err = 0,
           top_tail_bad = 0;
    double k_bad = 0, p_bad = 0, min_bad = 0, draw_bad = 0, draw_near = 0;
    int sampled = 0;
};

void check_rows(const char *cas, int64_t n, const std::vector<float> &in,
                const std::vector<Req> &req, const Out &o)
{
    Tally t;
    std::vector<float> x(n);
    for (size_t r = 0; r < req.size(); r++) {
        const Req &q = req[r];
        memcpy(x.data(), in.data() + r * n, n * sizeof(float));
        ref_apply(x.data(), q);
        if (memcmp(x.data(), o.logits.data() + r * n, n * sizeof(float)) != 0)
            for (int64_t i = 0; i < n; i++)
                t.logits_bad += memcmp(&x[i], &o.logits[r * n + i], sizeof(float)) != 0;
        const Ref rf = ref_row(x.data(), n);
        const int32_t tok = o.tok[r];
        if (rf.argmax < 0) { // nothing finite: -1
            t.greedy_bad += tok != -1;
            continue;
        }
        if (!(q.p.temperature > 0.0f)) {
            t.greedy_bad += tok != rf.argmax;
        } else {
            t.sampled++;
            if (tok < 0 || tok >= n || rf.rank[tok] < 0) {
                t.draw_bad++;
                continue;
            }
            const Expect e = ref_draw(x.data(), n, rf, q.p);
            const size_t nf = rf.order.size();
            if (q.p.top_k > 0 && (size_t)q.p.top_k < nf)
                t.k_bad += (size_t)rf.rank[tok] >= (size_t)q.p.top_k;
            t.p_bad += (size_t)rf.rank[tok] >= e.keep + (e.near_p ? 1 : 0);
            t.min_bad += ((double)x[tok] - rf.m) / q.p.temperature < e.cut - 1e-5;
            if (tok != e.tok) {
                if (e.near_draw || e.near_p || e.near_min)
                    t.draw_near++;
                else
                    t.draw_bad++;
            }
        }
        if (tok >= 0 && tok < n)
            t.lp_err = std::max(t.lp_err, fabs((double)o.lp[r] - ((double)x[tok] - rf.log_z)));
        const int n_top = std::min(std::max(q.p.n_top_logprobs, 0), kTop);
        const int n_eff = std::min<int>(n_top, (int)rf.order.size());
        for (int j = 0; j < kTop; j++) {
            const int32_t id = o.top_tok[r * kTop + j];
            const float lp = o.top_lp[r * kTop + j];
            if (j < n_eff) {
                const int32_t want = rf.order[j];
                t.top_id_bad += id != want;
                const double err = fabs((double)lp - ((double)x[want] - rf.log_z));
                t.top_lp_err = std::max(t.top_lp_err, isfinite(lp) ? err : INFINITY);
            } else {
                t.top_tail_bad += !(id == -1 && lp == -INFINITY);
            }
        }
    }
    char name[160];
    auto line = [&](const char *what, double err, double bound) {
        snprintf(name, sizeof name, "%s: %s", cas, what);
        gc_check("sample", name, err, bound);
    };
    line("processed logits bit-exact (mismatches)", t.logits_bad, 0);
    line("greedy token == argmax, lowest id (mismatches)", t.greedy_bad, 0);
    line("chosen logprob (max abs err)", t.lp_err, 1e-4);
    line("top_logprobs ids (mismatches)", t.top_id_bad, 0);
    line("top_logprobs values (max abs err)", t.top_lp_err, 1e-4);
    line("top_logprobs past n: -1, -inf (mismatches)", t.top_tail_bad, 0);
    if (t.sampled > 0) {
        line("token among top_k (violations)", t.k_bad, 0);
        line("token in top_p nucleus (violations)", t.p_bad, 0);
        line("token above min_p (violations)", t.min_bad, 0);
        line("token == inverse CDF in id order (misses off a boundary)", t.draw_bad, 0);
        // Misses within rounding of a boundary: a handful, never most.
        line("token == inverse CDF (misses at a boundary, fraction)",
             t.draw_near / t.sampled, 0.25);
    }
}

// ------------------------------------------------------------ suites

// Greedy rows of every flavor: argmax, logprobs, top lists.
void suite_greedy(int64_t n, int rows, uint64_t seed, int offset = 0)
{
    gc_rng g(seed);
    std::vector<float> in((size_t)rows * n);
    std::vector<Req> req(rows);
    const int n_tops[] = {20, 5, 1, 0, 20, 13, 2, 20};
    for (int r = 0; r < rows; r++) {
        gen_logits(g, in.data() + (size_t)r * n, n, r % N_FLAVORS);
        req[r].p = row_params(0.0f);
        req[r].p.n_top_logprobs = n_tops[r % 8];
    }
    const Out o = run(n, in, req, offset);
    char cas[96];
    snprintf(cas, sizeof cas, "greedy n_vocab=%lld rows=%d%s", (long long)n, rows,
             offset ? " unaligned" : "");
    check_rows(cas, n, in, req, o);
}

// Random lists (overlapping prompt and generated tokens, duplicate biases)
// under every penalty: the processed logits must match bit for bit.
void suite_penalties(int64_t n, int rows, uint64_t seed)
{
    gc_rng g(seed);
    std::vector<float> in((size_t)rows * n);
    std::vector<Req> req(rows);
    const float reps[] = {1.0f, 1.3f, 0.7f, 2.0f}, freqs[] = {0.0f, 0.5f, -0.5f, 2.0f},
                press[] = {0.0f, 1.0f, -1.0f, 2.0f};
    for (int r = 0; r < rows; r++) {
        gen_logits(g, in.data() + (size_t)r * n, n, r % 2 ? BF16 : PEAKED);
        Req &q = req[r];
        q.p = row_params(0.0f);
        q.p.n_top_logprobs = 5;
        q.p.repetition_penalty = reps[r % 4];
        q.p.frequency_penalty = freqs[(r / 4) % 4];
        q.p.presence_penalty = press[(r / 2) % 4];
        std::set<int32_t> seen, prompt;
        const int ns = (int)(g.next() % 300), np = (int)(g.next() % 2000), nb = (int)(g.next() % 40);
        while ((int)seen.size() < ns)
            seen.insert((int32_t)(g.next() % n));
        for (int32_t t : seen) // half the generated tokens were in the prompt too
            if (g.next() % 2)
                prompt.insert(t);
        while ((int)prompt.size() < np)
            prompt.insert((int32_t)(g.next() % n));
        q.seen.assign(seen.begin(), seen.end());
        for (size_t j = q.seen.size(); j > 1; j--) // not in id order
            std::swap(q.seen[j - 1], q.seen[g.next() % j]);
        for (size_t j = 0; j < q.seen.size(); j++)
            q.seen_cnt.push_back(1 + (int32_t)(g.next() % 5));
        q.prompt.assign(prompt.begin(), prompt.end());
        for (int j = 0; j < nb; j++) {
            // some entries repeat an earlier token: summed in list order
            q.bias_tok.push_back(j > 0 && g.next() % 4 == 0 ? q.bias_tok[g.next() % j]
                                                             : (int32_t)(g.next() % n));
            q.bias_val.push_back(g.uniform(-100.0f, 100.0f));
        }
    }
    const Out o = run(n, in, req);
    char cas[96];
    snprintf(cas, sizeof cas, "penalties n_vocab=%lld rows=%d", (long long)n, rows);
    check_rows(cas, n, in, req, o);
}

// Each step of the CPU's order moves the argmax where it should.
void suite_penalty_semantics()
{
    const int64_t n = 32000;
    const int32_t A = 1234, B = 20000, C = 777; // best, second, a low one
    auto base = [&](std::vector<float> &x) {
        gc_rng g(99);
        x.resize(n);
        for (auto &v : x)
            v = g.uniform(-1.0f, 1.0f);
        x[A] = 3.0f;
        x[B] = 2.5f;
        x[C] = 0.0f;
    };
    struct Case {
        const char *name;
        int32_t want;
        Req q;
    };
    std::vector<Case> cases;
    auto add = [&](const char *name, int32_t want) -> Req & {
        cases.push_back({name, want, Req{}});
        cases.back().q.p = row_params(0.0f);
        return cases.back().q;
    };
    {
        Req &q = add("logit_bias raises a low token", C);
        q.bias_tok = {C};
        q.bias_val = {5.0f};
    }
    {
        Req &q = add("logit_bias listed twice adds both", C);
        q.bias_tok = {C, B, C};
        q.bias_val = {1.5f, -1.0f, 1.6f}; // 1 + 3.1 > 3, B down to 1.5
    }
    {
        Req &q = add("repetition over generated tokens", B);
        q.p.repetition_penalty = 1.5f; // 3 -> 2 < 2.5
        q.seen = {A};
        q.seen_cnt = {1};
    }
    {
        Req &q = add("repetition over prompt tokens", B);
        q.p.repetition_penalty = 1.5f;
        q.prompt = {A};
    }
    {
        Req &q = add("repetition once for prompt + generated", A);
        q.p.repetition_penalty = 1.5f; // 3 -> 2 > B's 2.5 / 1.5; twice: 1.33
        q.seen = {A, B};
        q.seen_cnt = {1, 1};
        q.prompt = {B, A};
    }
    {
        Req &q = add("repetition < 1 boosts a positive prompt token", B);
        q.p.repetition_penalty = 0.5f; // 2.5 -> 5
        q.prompt = {B};
    }
    {
        Req &q = add("presence penalty", B);
        q.p.presence_penalty = 1.0f; // 3 -> 2
        q.seen = {A};
        q.seen_cnt = {1};
    }
    {
        Req &q = add("frequency penalty x3", B);
        q.p.frequency_penalty = 0.2f; // 3 - 0.6 = 2.4
        q.seen = {A};
        q.seen_cnt = {3};
    }
    {
        Req &q = add("frequency penalty x2 keeps the best", A);
        q.p.frequency_penalty = 0.2f; // 3 - 0.4 = 2.6
        q.seen = {A};
        q.seen_cnt = {2};
    }
    {
        Req &q = add("bias before repetition", B);
        q.bias_tok = {A};
        q.bias_val = {1.0f};            // 4, then / 2 = 2 < 2.5
        q.p.repetition_penalty = 2.0f; // bias after repetition would give 2.5 (tie, A wins)
        q.seen = {A};
        q.seen_cnt = {1};
    }
    std::vector<float> one, in;
    base(one);
    std::vector<Req> req;
    for (const Case &c : cases) {
        in.insert(in.end(), one.begin(), one.end());
        req.push_back(c.q);
    }
    const Out o = run(n, in, req);
    for (size_t i = 0; i < cases.size(); i++) {
        char name[128];
        snprintf(name, sizeof name, "semantics: %s (token %d, want %d)", cases[i].name,
                 o.tok[i], cases[i].want);
        gc_check("sample", name, o.tok[i] != cases[i].want, 0);
    }
    check_rows("semantics", n, in, req, o);
}

kc_samp_row rand_sampling(gc_rng &g)
{
    static const float temps[] = {0.3f, 0.7f, 1.0f, 1.5f, 2.0f};
    static const int32_t ks[] = {0, 0, 1, 5, 40, 2047, 2049, 5000};
    static const float ps[] = {1.0f, 1.0f, 0.95f, 0.9f, 0.5f, 0.1f};
    static const float mins[] = {0.0f, 0.0f, 0.05f, 0.2f};
    kc_samp_row p = row_params(temps[g.next() % 5]);
    p.top_k = ks[g.next() % 8];
    p.top_p = ps[g.next() % 6];
    p.min_p = mins[g.next() % 4];
    p.n_top_logprobs = (int32_t)(g.next() % 21);
    p.seed = g.next();
    p.step = g.next() % 100000;
    return p;
}

// Sampling over every flavor and mix of filters: membership and the draw.
void suite_sampling(int64_t n, int rows, uint64_t seed)
{
    gc_rng g(seed);
    std::vector<float> in((size_t)rows * n);
    std::vector<Req> req(rows);
    for (int r = 0; r < rows; r++) {
        gen_logits(g, in.data() + (size_t)r * n, n, r % N_FLAVORS);
        req[r].p = rand_sampling(g);
    }
    // Fixed corners on top of the random mix.
    if (rows >= 8) {
        req[0].p.top_k = 1; // must be the argmax
        req[1].p.top_k = 3, req[1].p.top_p = 1.0f, req[1].p.min_p = 0.0f;
        req[2].p.top_k = 0, req[2].p.top_p = 0.9f, req[2].p.min_p = 0.0f;
        req[3].p.top_k = 100, req[3].p.top_p = 0.8f, req[3].p.min_p = 0.05f;
        req[4].p.top_k = 0, req[4].p.top_p = 1.0f, req[4].p.min_p = 0.1f;
        req[5].p.top_k = 0, req[5].p.top_p = 1.0f, req[5].p.min_p = 0.0f; // constant row
        req[6].p.top_k = 5000, req[6].p.top_p = 0.99f, req[6].p.min_p = 0.0f;
        req[7].p.top_k = 0, req[7].p.top_p = 0.5f, req[7].p.min_p = 0.0f;
    }
    const Out o = run(n, in, req);
    char cas[96];
    snprintf(cas, sizeof cas, "sampling n_vocab=%lld rows=%d", (long long)n, rows);
    check_rows(cas, n, in, req, o);
    int top1_bad = 0;
    for (int r = 0; r < rows; r++)
        if (req[r].p.top_k == 1) {
            std::vector<float> x(in.begin() + (size_t)r * n, in.begin() + (size_t)(r + 1) * n);
            top1_bad += o.tok[r] != ref_row(x.data(), n).argmax;
        }
    snprintf(cas, sizeof cas, "sampling n_vocab=%lld: top_k=1 is greedy (mismatches)",
             (long long)n);
    gc_check("sample", cas, top1_bad, 0);
}

bool same_row(const Out &a, int ra, const Out &b, int rb)
{
    return a.tok[ra] == b.tok[rb] && memcmp(&a.lp[ra], &b.lp[rb], sizeof(float)) == 0 &&
           memcmp(&a.top_tok[ra * kTop], &b.top_tok[rb * kTop], kTop * sizeof(int32_t)) == 0 &&
           memcmp(&a.top_lp[ra * kTop], &b.top_lp[rb * kTop], kTop * sizeof(float)) == 0;
}

// A request's outputs do not depend on its row or on the rest of the batch.
void suite_batch_invariance()
{
    const int64_t n = 151936;
    const int rows = 64;
    gc_rng g(4242);
    std::vector<float> in((size_t)rows * n);
    std::vector<Req> req(rows);
    for (int r = 0; r < rows; r++) {
        gen_logits(g, in.data() + (size_t)r * n, n, r % N_FLAVORS);
        req[r].p = rand_sampling(g);
        if (r % 3 == 0) { // some with penalties, so the in-place writes count too
            req[r].p.repetition_penalty = 1.2f;
            req[r].p.presence_penalty = 0.5f;
            for (int j = 0; j < 50; j++) {
                req[r].seen.push_back((int32_t)(j * 997 % n));
                req[r].seen_cnt.push_back(1 + j % 3);
                req[r].prompt.push_back((int32_t)(j * 1999 % n));
            }
            req[r].bias_tok = {(int32_t)(g.next() % n)};
            req[r].bias_val = {3.0f};
        }
    }
    const Out a = run(n, in, req);
    const Out a2 = run(n, in, req);
    int bad = 0;
    for (int r = 0; r < rows; r++)
        bad += !same_row(a, r, a2, r);
    gc_check("sample", "batch of 64 run twice: bit-identical rows (mismatches)", bad, 0);

    std::vector<float> rin((size_t)rows * n);
    std::vector<Req> rreq(rows);
    for (int r = 0; r < rows; r++) {
        memcpy(rin.data() + (size_t)(rows - 1 - r) * n, in.data() + (size_t)r * n,
               n * sizeof(float));
        rreq[rows - 1 - r] = req[r];
    }
    const Out b = run(n, rin, rreq);
    bad = 0;
    for (int r = 0; r < rows; r++)
        bad += !same_row(a, r, b, rows - 1 - r);
    gc_check("sample", "batch of 64 reversed: same outputs per request (mismatches)", bad, 0);

    bad = 0;
    for (int r : {0, 1, 5, 17, 31, 42, 63}) {
        std::vector<float> one(in.begin() + (size_t)r * n, in.begin() + (size_t)(r + 1) * n);
        const Out c = run(n, one, {req[r]});
        bad += !same_row(a, r, c, 0);
    }
    gc_check("sample", "row alone == same row in a batch of 64 (mismatches)", bad, 0);
    check_rows("batch of 64", n, in, req, a);
}

// 20k draws over 16 tokens against the kept softmax: chi-square.
void suite_statistics(int rows = 20000)
{
    const int64_t n = 16;
    gc_rng g(7);
    std::vector<float> one(n);
    for (auto &v : one)
        v = g.uniform(-2.0f, 2.0f);
    struct Cfg {
        const char *name;
        float t, top_p, min_p;
        int32_t top_k;
    } cfgs[] = {
        {"t=1", 1.0f, 1.0f, 0.0f, 0},
        {"t=0.7 top_k=5", 0.7f, 1.0f, 0.0f, 5},
        {"t=1.3 top_p=0.8 min_p=0.05", 1.3f, 0.8f, 0.05f, 0},
    };
    for (const Cfg &c : cfgs) {
        std::vector<float> in;
        in.reserve((size_t)rows * n);
        std::vector<Req> req(rows);
        for (int r = 0; r < rows; r++) {
            in.insert(in.end(), one.begin(), one.end());
            req[r].p = row_params(c.t);
            req[r].p.top_k = c.top_k;
            req[r].p.top_p = c.top_p;
            req[r].p.min_p = c.min_p;
            req[r].p.seed = 0x5eed;
            req[r].p.step = (uint64_t)r;
        }
        const Out o = run(n, in, req);
        // Expected probabilities over the kept set, as the CPU defines it.
        const Ref rf = ref_row(one.data(), n);
        kc_samp_row p = req[0].p;
        const Expect e = ref_draw(one.data(), n, rf, p);
        std::vector<double> prob(n, 0.0);
        double z = 0;
        for (size_t j = 0; j < e.keep; j++) {
            const int32_t i = rf.order[j];
            const double d = ((double)one[i] - rf.m) / c.t;
            if (d >= e.cut)
                z += prob[i] = exp(d);
        }
        std::vector<int> cnt(n, 0);
        int outside = 0;
        for (int r = 0; r < rows; r++) {
            if (o.tok[r] < 0 || o.tok[r] >= n || prob[o.tok[r]] == 0.0)
                outside++;
            else
                cnt[o.tok[r]]++;
        }
        double chi2 = 0;
        int dof = -1;
        for (int64_t i = 0; i < n; i++) {
            if (prob[i] == 0.0)
                continue;
            const double want = rows * prob[i] / z;
            chi2 += (cnt[i] - want) * (cnt[i] - want) / want;
            dof++;
        }
        char name[128];
        snprintf(name, sizeof name, "statistics %s: draws outside the kept set", c.name);
        gc_check("sample", name, outside, 0);
        // dof + 7 standard deviations: p < 1e-6 for these dof; the seeds
        // are fixed, so the result is too.
        snprintf(name, sizeof name, "statistics %s: chi-square (%d dof) over %d draws", c.name,
                 dof, rows);
        gc_check("sample", name, chi2, dof + 7.0 * sqrt(2.0 * dof));
    }
}

void suite_edges()
{
    // Arguments refused before any launch, and an empty batch.
    float dummy_f;
    int32_t dummy_i;
    kc_samp_row dummy_p;
    int bad = 0;
    bad += kc_sample(nullptr, &dummy_f, -1, 16, &dummy_p, nullptr, &dummy_i, &dummy_f, &dummy_i,
                     &dummy_f, &dummy_f) != (int)cudaErrorInvalidValue;
    bad += kc_sample(nullptr, &dummy_f, 1, 0, &dummy_p, nullptr, &dummy_i, &dummy_f, &dummy_i,
                     &dummy_f, &dummy_f) != (int)cudaErrorInvalidValue;
    bad += kc_sample(nullptr, &dummy_f, 1, -5, &dummy_p, nullptr, &dummy_i, &dummy_f, &dummy_i,
                     &dummy_f, &dummy_f) != (int)cudaErrorInvalidValue;
    bad += kc_sample(nullptr, nullptr, 0, 16, nullptr, nullptr, nullptr, nullptr, nullptr,
                     nullptr, nullptr) != 0;
    bad += kc_sample_workspace(0, 151936) != 0;
    bad += kc_sample_workspace(4, 151936) < 4 * (151936 / 8);
    GC_CUDA(cudaGetLastError());
    gc_check("sample", "invalid arguments refused, rows == 0 is a no-op (failures)", bad, 0);

    // A row with nothing above -inf gives -1; its neighbours are unaffected.
    const int64_t n = 1000;
    std::vector<float> in(3 * n);
    gc_rng g(5);
    gen_logits(g, in.data(), n, PEAKED);
    for (int64_t i = 0; i < n; i++)
        in[n + i] = i % 2 ? -INFINITY : NAN;
    gen_logits(g, in.data() + 2 * n, n, MASKED);
    std::vector<Req> req(3);
    for (int r = 0; r < 3; r++) {
        req[r].p = row_params(r == 1 ? 0.8f : 0.0f);
        req[r].p.n_top_logprobs = 20;
        req[r].p.seed = 11;
    }
    const Out o = run(n, in, req);
    gc_check("sample", "row of -inf/NaN: token -1", o.tok[1] != -1, 0);
    check_rows("edges n_vocab=1000", n, in, req, o);

    // Temperatures at the edge of fp32: 1e-30 leaves weight on the tied
    // maxima only; at a denormal log2(e) / t overflows, no weight is left,
    // and the draw falls back to the argmax.
    std::vector<float> tied(2 * n);
    gen_logits(g, tied.data(), n, TIED_MAX);
    memcpy(tied.data() + n, tied.data(), n * sizeof(float));
    std::vector<Req> treq(2);
    treq[0].p = row_params(1e-30f);
    treq[1].p = row_params(1e-45f);
    treq[0].p.seed = treq[1].p.seed = 3;
    const Out to = run(n, tied, treq);
    const Ref rf = ref_row(tied.data(), n);
    gc_check("sample", "temperature 1e-30: a tied max token",
             !(to.tok[0] >= 0 && to.tok[0] < n && tied[to.tok[0]] == (float)rf.m), 0);
    gc_check("sample", "temperature 1e-45 (denormal): the argmax", to.tok[1] != rf.argmax, 0);
}

// ------------------------------------------------------------ benchmark

void bench()
{
    const int64_t n = 151936;
    const double ceiling = kc_measure_bandwidth_gbs((size_t)1 << 30);
    struct Cfg {
        const char *name;
        float t, top_p;
        int32_t top_k, n_top;
    } cfgs[] = {
        {"greedy", 0.0f, 1.0f, 0, 0},
        {"t=0.7 top_p=0.9", 0.7f, 0.9f, 0, 0},
        {"t=0.8 top_k=50 top_p=0.95 logprobs=5", 0.8f, 0.95f, 50, 5},
    };
    for (int rows : {1, 64, 256}) {
        gc_rng g(1000 + rows);
        std::vector<float> in((size_t)rows * n);
        for (int r = 0; r < rows; r++)
            gen_logits(g, in.data() + (size_t)r * n, n, PEAKED);
        float *d_x = gc_upload(in);
        int32_t *d_tok, *d_tt;
        float *d_lp, *d_tl;
        void *d_ws;
        GC_CUDA(cudaMalloc(&d_tok, rows * sizeof(int32_t)));
        GC_CUDA(cudaMalloc(&d_lp, rows * sizeof(float)));
        GC_CUDA(cudaMalloc(&d_tt, (size_t)rows * kTop * sizeof(int32_t)));
        GC_CUDA(cudaMalloc(&d_tl, (size_t)rows * kTop * sizeof(float)));
        GC_CUDA(cudaMalloc(&d_ws, kc_sample_workspace(rows, n)));
        for (const Cfg &c : cfgs) {
            std::vector<kc_samp_row> P(rows);
            for (int r = 0; r < rows; r++) {
                P[r] = row_params(c.t);
                P[r].top_p = c.top_p;
                P[r].top_k = c.top_k;
                P[r].n_top_logprobs = c.n_top;
                P[r].seed = 1;
                P[r].step = (uint64_t)r;
            }
            kc_samp_row *d_p = gc_upload(P);
            // No penalties: the in-place pass leaves the logits as they are,
            // so every repetition samples the same input.
            auto f = [&] {
                GC_LAUNCH(kc_sample(nullptr, d_x, rows, n, d_p, nullptr, d_tok, d_lp, d_tt, d_tl,
                                    d_ws));
            };
            double ms[3];
            for (double &m : ms)
                m = gc_time_ms(f, 50);
            std::sort(ms, ms + 3);
            const double us = ms[1] * 1e3;
            const double gbs = (double)rows * n * sizeof(float) / (us * 1e3);
            printf("{\"bench\": \"sample\", \"case\": \"%s\", \"rows\": %d, \"n_vocab\": %lld, "
                   "\"us\": %.2f, \"gbs\": %.1f, \"ceiling\": %.1f}\n",
                   c.name, rows, (long long)n, us, gbs, ceiling);
            fflush(stdout);
            GC_CUDA(cudaFree(d_p));
        }
        GC_CUDA(cudaFree(d_x));
        GC_CUDA(cudaFree(d_tok));
        GC_CUDA(cudaFree(d_lp));
        GC_CUDA(cudaFree(d_tt));
        GC_CUDA(cudaFree(d_tl));
        GC_CUDA(cudaFree(d_ws));
    }
}

} // namespace

int main()
{
    gc_require_device("test_sample");
    test_philox_kat();
    suite_edges();
    suite_penalty_semantics();
    suite_greedy(151936, 12, 1);
    suite_greedy(32000, 12, 2);
    suite_greedy(256000, 6, 3);
    suite_greedy(1000, 12, 4);         // the vocabulary fits the candidate buffer
    suite_greedy(17, 12, 5);           // n % 4 != 0: scalar loads
    suite_greedy(32000, 12, 6, 1);     // base off 16-byte alignment: scalar loads
    suite_penalties(32000, 16, 7);
    suite_penalties(151936, 8, 8);
    suite_sampling(151936, 48, 9);
    suite_sampling(32000, 48, 10);
    suite_sampling(1000, 48, 11);
    suite_sampling(17, 24, 12);
    suite_batch_invariance();
    suite_statistics();
    bench();
    return gc_finish("test_sample");
}
