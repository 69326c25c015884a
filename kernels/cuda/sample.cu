// sample.cu: kc_sample, the sampler on the device (kcuda.h), in the CPU
// sampler's order (engine/sampler.c). One CTA of 1024 threads per row:
// bias and penalties in place, one pass for max/argmax/sum-exp, radix
// selections for top_k, top_p and top_logprobs, then a draw from a Philox
// uniform keyed by (seed, step). Enqueued on the caller's stream by the
// engine thread; no allocation, no synchronization (graph-capturable).
//
// Choices, and why:
// - Every per-row result depends only on the row's logits and parameters:
//   reductions run in one fixed order per thread and a fixed tree across
//   threads, and the weights that top_p and the draw add up are integers
//   (fixed point, 2^39 for the best token), so their sums are exact in any
//   order. A request samples the same token whatever its row and batch.
// - Selection never sorts the vocabulary: a radix select over a 64-bit
//   rank key (the logit's order-preserving bits, then ~id, so ties go to
//   the lowest id as in the CPU's cand_better) finds the k-th best token
//   (top_k, top_logprobs) or the token where the running weight reaches
//   top_p * total (top_p), 11 bits per pass over the row, with counts and
//   weights histogrammed in shared memory; once the candidate bin holds at
//   most 2048 tokens they are gathered and bitonic-sorted there.
// - The draw walks the kept tokens in ID ORDER (not by rank, as the CPU's
//   truncation path does): the kept set is a threshold on the rank key plus
//   min_p's bar, the walk needs no sort, and with exact integer prefix sums
//   the token whose cumulative weight first exceeds u * total always exists.
//   Same distribution as the CPU; the RNG differs anyway.
// - Logprobs (log-softmax at temperature 1 after penalties) are fp32:
//   (x - max) - log(sum exp(x - max)).
// Known cost: the row is read once for the max and sum, once or twice more
// per selection (top_k, top_p, top_logprobs: a radix pass, then the gather)
// and once for the draw; greedy without logprobs reads it once.
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/cuda/kcuda.h"

namespace {

typedef unsigned long long u64;

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kDigit = 11; // radix digit: 2048 bins of (count, weight) = 24 KB
constexpr int kBins = 1 << kDigit;
constexpr int kCand = 2048; // candidates sorted in shared memory; a power of two
constexpr int kMaxTop = 20; // SAMP_MAX_TOP_LOGPROBS
constexpr int kChunk = 128; // ids per warp step of the draw: 32 lanes x 4
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread
// Weights are exp((x - max) / t) * 2^39, truncated: the best token weighs
// 2^39, and n_vocab <= 2^24 such weights sum to at most 2^63. A token below
// 2^-39 of the best (p < 2e-12) weighs 0 and is never drawn.
constexpr float kWeightScale = 0x1p39f;
constexpr int64_t kMaxVocab = (int64_t)1 << 24;
constexpr unsigned kFull = 0xffffffffu;

struct Smem {
    union {
        struct {
            unsigned cnt[kBins];
            // a bin's weight is whi * 2^32 + wlo: two native 32-bit shared
            // atomics (and a carry) instead of sm_90's 64-bit CAS loop
            unsigned wlo[kBins], whi[kBins];
        } h;               // one radix pass
        u64 cand[kCand];   // the gathered bin, sorted by rank key, descending
    } u;
    u64 scan[kWarps];      // block scan scratch
    u64 seg[kWarps];       // the draw: kept weight of each warp's id segment
    float red_m[kWarps], red_s[kWarps];
    int red_i[kWarps];
    unsigned red_n[kWarps];
    float M, S1;           // max logit, sum exp(x - M) at temperature 1
    int argmax;            // lowest id of the max; INT_MAX when none
    unsigned n_finite;     // tokens with a logit above -inf (NaN excluded)
    int find_j;
    u64 find_before, find_need;
    unsigned cand_n;
    int draw_w, draw_tok;
    u64 draw_t;
};

// One row and what the passes over it share.
struct Row {
    float *x;   // (n) this row's logits; written by the penalties, so never
                // read through the non-coherent cache (no __ldg, no restrict)
    int64_t n;
    bool vec;   // 16-byte loads: the base is 16-byte aligned and n % 4 == 0
    float M;    // max logit after bias and penalties
    float k2;   // log2(e) / temperature
    float cutx; // min_p's bar: keep x - M >= t * log(min_p) (-inf: off)
};

// ------------------------------------------------------------ keys, weights

__device__ __forceinline__ bool finite_or_inf(float x)
{
    return x > -INFINITY; // false for -inf and NaN: never a candidate
}

// Order-preserving bits of a float: a > b as floats <=> key(a) > key(b).
// -0 is keyed as +0 because the CPU compares floats, where they tie.
__device__ __forceinline__ uint32_t order_key(float x)
{
    const uint32_t b = x == 0.0f ? 0u : __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The rank of a token: higher logit first, then lower id. Unique per token.
__device__ __forceinline__ u64 rank_key(float x, int64_t i)
{
    return ((u64)order_key(x) << 32) | (u64)(uint32_t)~(uint32_t)i;
}

__device__ __forceinline__ float key_value(u64 k)
{
    const uint32_t o = (uint32_t)(k >> 32);
    return __uint_as_float((o & 0x80000000u) ? (o ^ 0x80000000u) : ~o);
}

__device__ __forceinline__ int32_t key_id(u64 k)
{
    return (int32_t)~(uint32_t)k;
}

// exp((x - M) / t) in fixed point. Rounded ops (no FMA contraction) so every
// call site computes the same integer for the same x: the draw's walk must
// see exactly the weights its totals were summed from.
__device__ __forceinline__ u64 weight(const Row &R, float x)
{
    if (!finite_or_inf(x))
        return 0;
    const float e = exp2f(__fmul_rn(__fsub_rn(x, R.M), R.k2));
    // NaN (inf - inf, or 0 * inf when t is so small that log2(e) / t is
    // inf) weighs 0: with no weight left the draw falls back to the argmax.
    return e > 0.0f ? __float2ull_rz(__fmul_rn(e, kWeightScale)) : 0ull;
}

// Philox4x32-10 (Salmon et al., SC'11; Random123's philox4x32, checked
// against its known-answer vectors in tests/gpu/test_sample.cu, which
// reimplements it). Counter (step lo, step hi, 0, 0), key (seed lo, seed
// hi): the draw depends on the request and its step only.
__host__ __device__ inline u64 draw_bits(uint64_t seed, uint64_t step)
{
    uint32_t c0 = (uint32_t)step, c1 = (uint32_t)(step >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        if (r > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
    }
    return ((u64)c0 << 32) | c1;
}

// ------------------------------------------------------------ row access

// Calls f(id, logit) for this thread's share of the row, ids ascending per
// thread (pass 1's strict > then keeps the lowest id of a tie). The split
// depends on n and the launch's alignment only, never on the row index.
template <class F> __device__ __forceinline__ void for_row(const Row &R, F f)
{
    if (R.vec) {
        const float4 *p = reinterpret_cast<const float4 *>(R.x);
        const int64_t n4 = R.n >> 2;
        for (int64_t j0 = threadIdx.x; j0 < n4; j0 += (int64_t)kUnroll * kThreads) {
            float4 v[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; u++) {
                const int64_t j = j0 + (int64_t)u * kThreads;
                v[u] = j < n4 ? __ldcg(p + j) : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
            }
#pragma unroll
            for (int u = 0; u < kUnroll; u++) {
                const int64_t j = j0 + (int64_t)u * kThreads;
                if (j < n4) {
                    f(4 * j, v[u].x);
                    f(4 * j + 1, v[u].y);
                    f(4 * j + 2, v[u].z);
                    f(4 * j + 3, v[u].w);
                }
            }
        }
    } else {
        for (int64_t i = threadIdx.x; i < R.n; i += kThreads)
            f(i, __ldcg(R.x + i));
    }
}

// Logits i0 .. i0 + 3 (i0 a multiple of 4); -inf past the end.
__device__ __forceinline__ void load4(const Row &R, int64_t i0, float v[4])
{
    if (R.vec) {
        float4 q = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
        if (i0 < R.n)
            q = __ldcg(reinterpret_cast<const float4 *>(R.x + i0));
        v[0] = q.x;
        v[1] = q.y;
        v[2] = q.z;
        v[3] = q.w;
    } else {
#pragma unroll
        for (int q = 0; q < 4; q++)
            v[q] = i0 + q < R.n ? __ldcg(R.x + i0 + q) : -INFINITY;
    }
}

// ------------------------------------------------------------ block primitives

__device__ __forceinline__ u64 warp_sum(u64 v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(kFull, v, o);
    return v;
}

__device__ __forceinline__ u64 warp_incl_scan(u64 v)
{
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u64 y = __shfl_up_sync(kFull, v, o);
        if (lane >= o)
            v += y;
    }
    return v;
}

// Exclusive prefix sum over threads in thread order, and the total.
// Integers: exact, so the grouping does not matter.
__device__ u64 block_excl_scan(Smem &sm, u64 v, u64 *total)
{
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads(); // the previous user of sm.scan is done
    const u64 inc = warp_incl_scan(v);
    if (lane == 31)
        sm.scan[wid] = inc;
    __syncthreads();
    if (wid == 0) {
        const u64 w = warp_incl_scan(sm.scan[lane]);
        sm.scan[lane] = w;
    }
    __syncthreads();
    *total = sm.scan[kWarps - 1];
    return (wid > 0 ? sm.scan[wid - 1] : 0) + inc - v;
}

// Items 0 .. n-1 in rank order with weights val(i) >= 0; thread t owns a
// run of consecutive items. Finds the first item j at which base + (the
// weights through j) >= need; need == 0 means top_p * (total weight),
// clamped to [1, total] (>= 1: the crossing is never a weightless item).
// Leaves j in sm.find_j (-1: never reached), the weight of the items before
// j in sm.find_before, and need in sm.find_need. Starts and ends with a
// barrier.
template <class V>
__device__ void block_find(Smem &sm, int n, V val, u64 base, u64 need, float top_p)
{
    __syncthreads(); // the items (histogram atomics, sorted candidates) are final
    const int per = (n + kThreads - 1) / kThreads;
    const int i0 = (int)threadIdx.x * per;
    u64 local = 0;
    for (int q = 0; q < per; q++)
        if (i0 + q < n)
            local += val(i0 + q);
    u64 total;
    const u64 excl = block_excl_scan(sm, local, &total);
    if (need == 0) {
        const double t = (double)top_p * (double)total;
        need = t >= (double)total ? total : (u64)t;
        if (need < 1)
            need = 1;
    }
    if (threadIdx.x == 0) {
        sm.find_j = -1;
        sm.find_before = 0;
        sm.find_need = need;
    }
    __syncthreads();
    u64 acc = base + excl;
    if (acc < need && acc + local >= need) { // exactly one thread
        for (int q = 0; q < per && i0 + q < n; q++) {
            const u64 v = val(i0 + q);
            if (acc + v >= need) {
                sm.find_j = i0 + q;
                sm.find_before = acc - base;
                break;
            }
            acc += v;
        }
    }
    __syncthreads();
}

// Sorts a[0 .. P) descending, P a power of two.
__device__ void bitonic_desc(u64 *a, int P)
{
    for (int k = 2; k <= P; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < P; i += kThreads) {
                const int l = i ^ j;
                if (l > i) {
                    const u64 x = a[i], y = a[l];
                    const bool desc = (i & k) == 0;
                    if (desc ? x < y : x > y) {
                        a[i] = y;
                        a[l] = x;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// ------------------------------------------------------------ selection

// A selection over the set S = {finite tokens with rank_key >= floor}.
struct Sel {
    bool by_weight; // find where the running weight reaches top_p * total
    u64 need;       // by count: the rank k >= 1 wanted; by weight: 0
    float top_p;
    u64 floor;
    u64 size;       // |S|
    bool list;      // also leave S's best `need` sorted at sm.u.cand[0 ..)
};

// Radix select, most significant digit first. Each pass histograms the
// digit of the tokens still in the candidate bin and keeps the bin where
// the running count (or weight) crosses; `above` is what the bins before it
// hold. Once the bin is small it is gathered, sorted and walked. Returns the
// rank key of the crossing token. Uniform across the block.
__device__ u64 select_key(Smem &sm, const Row &R, const Sel q)
{
    u64 prefix = 0, above = 0, c = q.size, need = q.need;
    int lo = 64; // bits below lo are still open; 64: no digit fixed yet
    for (;;) {
        __syncthreads(); // everyone has read the union's previous contents
        // With list, everything from the bin up (above + c) must fit, so
        // that the best `need` come out sorted at the front.
        const bool all = q.list && above + c <= (u64)kCand;
        if (all || (!q.list && c <= (u64)kCand) || lo == 0) {
            const u64 lb = lo == 64 ? 0 : prefix << lo;
            if (threadIdx.x == 0)
                sm.cand_n = 0;
            __syncthreads();
            for_row(R, [&](int64_t i, float x) {
                if (!finite_or_inf(x))
                    return;
                const u64 k = rank_key(x, i);
                if (k < q.floor)
                    return;
                if (all ? k < lb : (lo < 64 && (k >> lo) != prefix))
                    return;
                const unsigned s = atomicAdd(&sm.cand_n, 1u);
                if (s < (unsigned)kCand)
                    sm.u.cand[s] = k;
            });
            __syncthreads();
            const int cn = min((int)sm.cand_n, kCand);
            int P = 1;
            while (P < cn)
                P <<= 1;
            for (int i = cn + (int)threadIdx.x; i < P; i += kThreads)
                sm.u.cand[i] = 0; // below every real key
            __syncthreads();
            bitonic_desc(sm.u.cand, P); // the gather's order was arbitrary
            block_find(
                sm, cn,
                [&](int i) -> u64 {
                    return q.by_weight ? weight(R, key_value(sm.u.cand[i])) : 1;
                },
                all ? 0 : above, need, q.top_p);
            const int j = sm.find_j;
            if (cn == 0)
                return ~0ull; // nothing qualifies (not reached: S holds the max)
            return sm.u.cand[j >= 0 ? j : cn - 1];
        }
        const int width = lo < kDigit ? lo : kDigit;
        const int shift = lo - width;
        const int nb = 1 << width;
        for (int b = threadIdx.x; b < nb; b += kThreads) {
            sm.u.h.cnt[b] = 0;
            sm.u.h.wlo[b] = 0;
            sm.u.h.whi[b] = 0;
        }
        __syncthreads();
        for_row(R, [&](int64_t i, float x) {
            if (!finite_or_inf(x))
                return;
            const u64 k = rank_key(x, i);
            if (k < q.floor || (lo < 64 && (k >> lo) != prefix))
                return;
            const unsigned b = (unsigned)(k >> shift) & (unsigned)(nb - 1);
            atomicAdd(&sm.u.h.cnt[b], 1u);
            if (q.by_weight) {
                const u64 wt = weight(R, x);
                const unsigned wl = (unsigned)wt, wh = (unsigned)(wt >> 32);
                const unsigned old = atomicAdd(&sm.u.h.wlo[b], wl);
                const unsigned carry = old + wl < old; // wlo wrapped in this add
                if (wh + carry)
                    atomicAdd(&sm.u.h.whi[b], wh + carry);
            }
        });
        // Item i is bin nb - 1 - i: the walk goes from the best bin down.
        block_find(
            sm, nb,
            [&](int i) -> u64 {
                const int b = nb - 1 - i;
                return q.by_weight ? ((u64)sm.u.h.whi[b] << 32) + sm.u.h.wlo[b]
                                   : (u64)sm.u.h.cnt[b];
            },
            above, need, q.top_p);
        const int j = sm.find_j;
        if (j < 0)
            return 0; // not reached (need <= |S|): keep the whole set
        const int b = nb - 1 - j;
        above += sm.find_before;
        need = sm.find_need;
        c = sm.u.h.cnt[b];
        prefix = lo == 64 ? (u64)b : (prefix << width) | (u64)b;
        lo = shift;
    }
}

// ------------------------------------------------------------ steps 1-3

// Reads of what this kernel wrote (logits, bitmap, chunk weights) go
// through L2 (__ldcg), never a possibly stale L1 line or the read-only path.
//
// logit_bias, then repetition over prompt + generated tokens, then
// frequency/presence over generated ones, as the CPU's
// apply_bias_and_penalties. Each list names a token at most once (a
// duplicate bias is summed in list order by its first entry's thread), so
// no two threads write one logit. A token both in the prompt and generated
// gets the repetition penalty once: seen tokens mark a bitmap first.
__device__ void apply_lists(const Row &R, const kc_samp_row &p, const kc_samp_lists &L,
                            int64_t r, uint32_t *bits)
{
    float *x = R.x;
    const int64_t n = R.n;
    const float rep = p.repetition_penalty, freq = p.frequency_penalty,
                pres = p.presence_penalty;
    const bool rep_on = rep != 1.0f;
    const bool pen_on = rep_on || freq != 0.0f || pres != 0.0f;
    int64_t s0 = 0, s1 = 0, p0 = 0, p1 = 0, b0 = 0, b1 = 0;
    if (L.seen_off && L.seen_tok) {
        s0 = L.seen_off[r];
        s1 = L.seen_off[r + 1];
    }
    if (L.prompt_off && L.prompt_tok) {
        p0 = L.prompt_off[r];
        p1 = L.prompt_off[r + 1];
    }
    if (L.bias_off && L.bias_tok && L.bias_val) {
        b0 = L.bias_off[r];
        b1 = L.bias_off[r + 1];
    }
    const bool use_bits = rep_on && s1 > s0 && p1 > p0;
    if (use_bits)
        for (int64_t j = threadIdx.x; j < (n + 31) / 32; j += kThreads)
            bits[j] = 0;
    // O(entries^2) for the duplicate check; bias lists are short (OpenAI
    // caps them at 300) and the API layer passes unique ids anyway.
    for (int64_t j = b0 + threadIdx.x; j < b1; j += kThreads) {
        const int32_t t = L.bias_tok[j];
        if (t < 0 || t >= n)
            continue;
        bool first = true;
        for (int64_t k = b0; k < j && first; k++)
            first = L.bias_tok[k] != t;
        if (!first)
            continue;
        float v = __ldcg(x + t);
        for (int64_t k = j; k < b1; k++)
            if (L.bias_tok[k] == t)
                v = __fadd_rn(v, L.bias_val[k]);
        x[t] = v;
    }
    __syncthreads(); // biased logits and the cleared bitmap are visible
    if (!pen_on)
        return;
    for (int64_t j = s0 + threadIdx.x; j < s1; j += kThreads) {
        const int32_t t = L.seen_tok[j];
        if (t < 0 || t >= n)
            continue;
        if (use_bits)
            atomicOr(&bits[t >> 5], 1u << (t & 31));
        float v = __ldcg(x + t);
        if (rep_on)
            v = v > 0.0f ? __fdiv_rn(v, rep) : __fmul_rn(v, rep);
        const int32_t cnt = L.seen_cnt ? L.seen_cnt[j] : 1;
        if (cnt > 0) // v -= freq * count + presence, unfused as on the CPU
            v = __fsub_rn(v, __fadd_rn(__fmul_rn(freq, (float)cnt), pres));
        x[t] = v;
    }
    __syncthreads();
    if (rep_on) {
        for (int64_t j = p0 + threadIdx.x; j < p1; j += kThreads) {
            const int32_t t = L.prompt_tok[j];
            if (t < 0 || t >= n)
                continue;
            if (use_bits && ((__ldcg(bits + (t >> 5)) >> (t & 31)) & 1u))
                continue; // generated too: already penalized
            const float v = __ldcg(x + t);
            x[t] = v > 0.0f ? __fdiv_rn(v, rep) : __fmul_rn(v, rep);
        }
    }
    __syncthreads();
}

// ------------------------------------------------------------ pass 1

struct MaxSum {
    float m, s; // running max, sum of exp(x - m)
    int i;      // lowest id of the max
    unsigned nf;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b)
{
    MaxSum r;
    r.m = fmaxf(a.m, b.m);
    r.s = (a.m == -INFINITY ? 0.0f : a.s * expf(a.m - r.m)) +
          (b.m == -INFINITY ? 0.0f : b.s * expf(b.m - r.m));
    r.i = a.m > b.m ? a.i : b.m > a.m ? b.i : min(a.i, b.i);
    r.nf = a.nf + b.nf;
    return r;
}

__device__ __forceinline__ MaxSum shfl_down(MaxSum a, int o)
{
    a.m = __shfl_down_sync(kFull, a.m, o);
    a.s = __shfl_down_sync(kFull, a.s, o);
    a.i = __shfl_down_sync(kFull, a.i, o);
    a.nf = __shfl_down_sync(kFull, a.nf, o);
    return a;
}

// Fixed tree: lane 0 of each warp, then warp 0 over the warps.
__device__ void block_max_sum(Smem &sm, MaxSum st)
{
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        st = merge(st, shfl_down(st, o));
    if (lane == 0) {
        sm.red_m[wid] = st.m;
        sm.red_s[wid] = st.s;
        sm.red_i[wid] = st.i;
        sm.red_n[wid] = st.nf;
    }
    __syncthreads();
    if (wid == 0) {
        st.m = sm.red_m[lane];
        st.s = sm.red_s[lane];
        st.i = sm.red_i[lane];
        st.nf = sm.red_n[lane];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            st = merge(st, shfl_down(st, o));
        if (lane == 0) {
            sm.M = st.m;
            sm.S1 = st.s;
            sm.argmax = st.i;
            sm.n_finite = st.nf;
        }
    }
    __syncthreads();
}

// ------------------------------------------------------------ the draw

// Kept weight of token i: in the top_k/top_p set (rank key >= floor) and
// above min_p's bar.
__device__ __forceinline__ u64 kept_weight(const Row &R, u64 floor, float x, int64_t i)
{
    if (!finite_or_inf(x))
        return 0;
    if (floor != 0 && rank_key(x, i) < floor)
        return 0;
    if (!(__fsub_rn(x, R.M) >= R.cutx))
        return 0;
    return weight(R, x);
}

// Inverse CDF in id order. Warp w owns the contiguous chunks
// [w * nch / 32, (w + 1) * nch / 32) of 128 ids; a pass writes each
// chunk's kept weight to the workspace and each warp's total to shared
// memory; the target floor(u * Z) picks a warp, a chunk, a lane, a token.
__device__ int draw(Smem &sm, const Row &R, u64 floor, u64 bits64, int fallback, u64 *chunk_w)
{
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int64_t nch = (R.n + kChunk - 1) / kChunk;
    const int64_t c0 = (int64_t)wid * nch / kWarps, c1 = (int64_t)(wid + 1) * nch / kWarps;
    u64 seg = 0;
    for (int64_t g = c0; g < c1; g += kUnroll) {
        float v[kUnroll][4];
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            if (g + u < c1) {
                load4(R, (g + u) * kChunk + 4 * lane, v[u]);
            } else {
#pragma unroll
                for (int q = 0; q < 4; q++)
                    v[u][q] = -INFINITY;
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            const int64_t i0 = (g + u) * kChunk + 4 * lane;
            u64 m = 0;
            if (g + u < c1)
#pragma unroll
                for (int q = 0; q < 4; q++)
                    m += kept_weight(R, floor, v[u][q], i0 + q);
            m = warp_sum(m);
            if (g + u < c1 && lane == 0)
                chunk_w[g + u] = m;
            seg += m;
        }
    }
    if (lane == 0)
        sm.seg[wid] = seg;
    __syncthreads();
    if (wid == 0) { // the target, and the warp whose segment holds it
        const u64 sw = sm.seg[lane];
        const u64 inc = warp_incl_scan(sw);
        const u64 z = __shfl_sync(kFull, inc, 31);
        if (z == 0) { // only when min_p > 1 or t is denormal: greedy
            if (lane == 0) {
                sm.draw_w = -1;
                sm.draw_tok = fallback;
            }
        } else {
            const u64 t = __umul64hi(z, bits64); // uniform in [0, z)
            const int W = __ffs(__ballot_sync(kFull, inc > t)) - 1;
            if (lane == W) {
                sm.draw_w = W;
                sm.draw_t = t - (inc - sw);
            }
        }
    }
    __syncthreads();
    if (wid == sm.draw_w) {
        u64 t = sm.draw_t; // < this warp's seg: its chunks hold the crossing
        int64_t c = c1 - 1;
        for (int64_t g = c0; g < c1; g += 32) {
            const u64 m = g + lane < c1 ? __ldcg(chunk_w + g + lane) : 0;
            const u64 inc = warp_incl_scan(m);
            const u64 tot = __shfl_sync(kFull, inc, 31);
            if (t >= tot) {
                t -= tot;
                continue;
            }
            const int L = __ffs(__ballot_sync(kFull, inc > t)) - 1;
            t -= __shfl_sync(kFull, inc - m, L);
            c = g + L;
            break;
        }
        const int64_t i0 = c * kChunk + 4 * lane;
        float v[4];
        load4(R, i0, v);
        u64 mq[4], ml = 0;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            mq[q] = kept_weight(R, floor, v[q], i0 + q);
            ml += mq[q];
        }
        const u64 inc = warp_incl_scan(ml);
        const unsigned hit = __ballot_sync(kFull, inc > t);
        const int L = hit ? __ffs(hit) - 1 : 31;
        if (lane == L) {
            // The first of the 4 whose running weight passes tt (< ml).
            // Unrolled: a run-time index would put mq in local memory.
            const u64 tt = t - (inc - ml);
            const int q = tt < mq[0] ? 0 : tt < mq[0] + mq[1] ? 1 : tt < mq[0] + mq[1] + mq[2] ? 2 : 3;
            sm.draw_tok = (int)(i0 + q);
        }
    }
    __syncthreads();
    return sm.draw_tok;
}

// ------------------------------------------------------------ the kernel

__global__ void __launch_bounds__(kThreads)
    sample_kernel(float *logits, int64_t n, int vec, const kc_samp_row *params,
                  kc_samp_lists lists, int32_t *token, float *logprob, int32_t *top_tok,
                  float *top_lp, unsigned char *ws, size_t ws_bits, size_t ws_row)
{
    __shared__ Smem sm;
    const int64_t r = blockIdx.x;
    const kc_samp_row p = params[r];
    unsigned char *w = ws + (size_t)r * ws_row;
    Row R;
    R.x = logits + (size_t)r * (size_t)n;
    R.n = n;
    R.vec = vec != 0;
    R.M = 0.0f;
    R.k2 = 0.0f;
    R.cutx = -INFINITY;

    apply_lists(R, p, lists, r, reinterpret_cast<uint32_t *>(w));

    MaxSum st = {-INFINITY, 0.0f, INT_MAX, 0u};
    for_row(R, [&](int64_t i, float x) {
        if (x > st.m) { // strict: a later tie never replaces the lower id
            st.s = st.s * __expf(st.m - x) + 1.0f;
            st.m = x;
            st.i = (int)i;
            st.nf++;
        } else if (finite_or_inf(x)) {
            st.s += __expf(x - st.m);
            st.nf++;
        }
    });
    block_max_sum(sm, st);
    const float M = sm.M, log_s1 = logf(sm.S1);
    const unsigned nf = sm.n_finite;
    R.M = M;

    int tok = -1;
    if (nf > 0) {
        tok = sm.argmax;
        const float t = p.temperature;
        if (t > 0.0f) { // 0 (and NaN): greedy
            R.k2 = __fdiv_rn(1.4426950408889634f, t);
            if (p.min_p > 0.0f)
                R.cutx = __fmul_rn(t, logf(p.min_p));
            const bool k_on = p.top_k > 0 && (u64)p.top_k < (u64)nf;
            const bool p_on = p.top_p < 1.0f;
            u64 floor = 0;
            if (k_on) {
                Sel q = {false, (u64)p.top_k, 0.0f, 0, (u64)nf, false};
                floor = select_key(sm, R, q);
            }
            if (p_on) {
                Sel q = {true, 0, fmaxf(p.top_p, 0.0f), floor, k_on ? (u64)p.top_k : (u64)nf,
                         false};
                floor = select_key(sm, R, q);
            }
            tok = draw(sm, R, floor, draw_bits(p.seed, p.step), tok,
                       reinterpret_cast<u64 *>(w + ws_bits));
        }
    }

    const int n_top = min(max(p.n_top_logprobs, 0), kMaxTop);
    const int n_eff = (unsigned)n_top < nf ? n_top : (int)nf;
    if (n_eff > 0 && top_tok && top_lp) {
        Sel q = {false, (u64)n_eff, 0.0f, 0, (u64)nf, true};
        select_key(sm, R, q); // leaves the best n_eff sorted in sm.u.cand
    }
    if (threadIdx.x < kMaxTop && top_tok && top_lp) {
        const int j = threadIdx.x;
        int32_t id = -1;
        float lp = -INFINITY;
        if (j < n_eff) {
            const u64 k = sm.u.cand[j];
            id = key_id(k);
            lp = __fsub_rn(__fsub_rn(key_value(k), M), log_s1);
        }
        top_tok[(size_t)r * kMaxTop + j] = id;
        top_lp[(size_t)r * kMaxTop + j] = lp;
    }
    if (threadIdx.x == 0) {
        token[r] = tok;
        if (logprob)
            logprob[r] = tok >= 0 ? __fsub_rn(__fsub_rn(__ldcg(R.x + tok), M), log_s1) : 0.0f;
    }
}

size_t ws_bits_bytes(int64_t n)
{
    return (size_t)((n + 63) / 64) * 8; // the seen-token bitmap, 8-byte multiple
}

size_t ws_row_bytes(int64_t n)
{
    return ws_bits_bytes(n) + (size_t)((n + kChunk - 1) / kChunk) * sizeof(u64);
}

} // namespace

// Per row: a bitmap of n_vocab bits (tokens both generated and in the
// prompt) and one u64 per 128 ids (the draw's chunk weights).
extern "C" size_t kc_sample_workspace(int rows, int64_t n_vocab)
{
    if (rows <= 0 || n_vocab <= 0 || n_vocab > kMaxVocab)
        return 0;
    return (size_t)rows * ws_row_bytes(n_vocab);
}

// params: (rows) kc_samp_row in device memory (read by the kernel, so a
// captured graph picks up new values; hence n_top_logprobs is clamped to
// [0, 20] on the device, not refused here). lists: a host struct of device
// pointers, or NULL for none; within a row each list names a token once
// (bias duplicates are summed), and ids outside [0, n_vocab) are skipped.
// logprob, top_tok and top_lp may be NULL when not wanted; top entries past
// n_top_logprobs are -1 / -inf. A row with no logit above -inf gives token
// -1. workspace: kc_sample_workspace bytes, 8-byte aligned, no clearing
// needed. n_vocab is at most 2^24 (the fixed-point weights' headroom).
extern "C" int kc_sample(kc_stream s, float *logits, int rows, int64_t n_vocab,
                         const struct kc_samp_row *params, const struct kc_samp_lists *lists,
                         int32_t *token, float *logprob, int32_t *top_tok, float *top_lp,
                         void *workspace)
{
    if (rows < 0 || n_vocab <= 0 || n_vocab > kMaxVocab)
        return (int)cudaErrorInvalidValue;
    if (rows == 0)
        return 0;
    if (!logits || !params || !token || !workspace || (uintptr_t)workspace % 8 != 0)
        return (int)cudaErrorInvalidValue;
    kc_samp_lists L = {};
    if (lists)
        L = *lists;
    // 16-byte loads only when every row is aligned alike, so the per-thread
    // split (and the fp32 sum's order) is the same for every row.
    const int vec = ((uintptr_t)logits % 16 == 0) && (n_vocab % 4 == 0);
    sample_kernel<<<rows, kThreads, 0, (cudaStream_t)s>>>(
        logits, n_vocab, vec, params, L, token, logprob, top_tok, top_lp,
        static_cast<unsigned char *>(workspace), ws_bits_bytes(n_vocab), ws_row_bytes(n_vocab));
    return (int)cudaGetLastError();
}
