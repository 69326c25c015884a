// attn_decode.cu: decode attention over the paged KV cache (kcuda.h).
// One CTA per (sequence, KV head, split) computes every query head of that
// GQA group (up to 8 at a time), so each K/V row is read from memory once
// per group. fp32 online softmax over tiles of the split; with several
// splits the partial (max, sum, weighted values) go to the workspace and a
// second kernel merges them per head in split order 0, 1, 2, ...
// Runs on the caller's stream; no allocation, no synchronization.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "kernels/cuda/kcuda.h"

namespace {

constexpr int kThreads = 128;     // 4 warps per CTA
constexpr int kTokPerThread = 8;  // K/V rows a key slot loads per tile
constexpr int kMaxHeadsPerCta = 8;
// n_splits = 0: at most this many splits, none shorter than kMinChunk
// tokens, and at most kPartialsCap (sequence, split) pairs, which bounds
// the workspace (see kc_attn_decode_workspace).
constexpr int kMaxSplits = 16;
constexpr int kMinChunk = 128;
constexpr int kPartialsCap = 1024;

// Thread layout for one head_dim. A key is read by TPK consecutive lanes
// (a "key slot"), 8 bf16 (16 bytes) each; head_dim 80 and 96 leave the
// top lanes of a 16-lane slot idle rather than break the power-of-two
// shuffle tree. NT slots work on NT keys at once; a tile is NT * 8 keys.
template <int HD> struct DecCfg {
    static_assert(HD % 8 == 0 && HD <= KC_MAX_HEAD_DIM, "head_dim");
    static constexpr int CH = HD / 8;  // 16-byte chunks per row
    static constexpr int TPK = CH <= 8 ? 8 : (CH <= 16 ? 16 : 32);
    static constexpr int NT = kThreads / TPK;
    static constexpr int TILE = NT * kTokPerThread;
    static_assert(TILE % 32 == 0, "softmax reads a tile in warp strides");
};

struct DecArgs {
    kc_bf16 *out;           // (n_seqs, n_head, HD), written when splits == 1
    const kc_bf16 *q;       // (n_seqs, n_head, HD)
    const kc_bf16 *k, *v;   // (n_blocks, 16, n_kv_head, HD)
    const int32_t *tables;  // (n_seqs, max_blocks)
    const int32_t *seq_lens;
    int max_blocks;
    int n_head, n_kv_head;
    int group;     // n_head / n_kv_head
    int n_chunks;  // CTAs per KV head: ceil(group / GM)
    float scale;
    int window;
    int splits;     // gridDim.z
    int min_chunk;  // shortest split, in tokens
    float *ws_acc;  // (n_seqs, n_head, splits, HD): unnormalized sums
    float2 *ws_ml;  // (n_seqs, n_head, splits): (running max, sum of exp)
};

__device__ __forceinline__ void bf16x8_to_f32(const uint4 u, float f[8])
{
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);  // low half: the lower index
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ float warp_max(float x)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x)
{
    // butterfly: every lane ends with the same bits (a + b == b + a)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// The attended range of a sequence and of one split of it. Both kernels
// (and every split) derive it the same way from seq_lens on the device,
// since the host never sees the lengths. A length beyond the block table
// is clamped so that a bad length cannot read outside the table.
__device__ __forceinline__ void split_range(const DecArgs &a, int seq, int split, int64_t *t0,
                                            int64_t *t1)
{
    int64_t len = a.seq_lens[seq];
    const int64_t cap = (int64_t)a.max_blocks * KC_BLOCK_TOKENS;
    len = len < 0 ? 0 : (len > cap ? cap : len);
    // CPU: start = pos + 1 - window when pos + 1 > window (pos = len - 1)
    const int64_t start = (a.window > 0 && len > a.window) ? len - a.window : 0;
    const int64_t n_att = len - start;
    int64_t chunk = n_att;
    if (a.splits > 1) {
        chunk = (n_att + a.splits - 1) / a.splits;
        if (chunk < a.min_chunk)
            chunk = a.min_chunk;
    }
    const int64_t b = start + (int64_t)split * chunk;
    *t0 = b;
    *t1 = b + chunk < len ? b + chunk : len;  // empty when b >= len
}

template <int HD, int GM>
__global__ void __launch_bounds__(kThreads) attn_decode_kernel(const DecArgs a)
{
    using C = DecCfg<HD>;
    __shared__ float s_sc[GM][C::TILE];  // scores, then probabilities
    __shared__ __align__(16) float s_red[C::NT][GM][HD];
    __shared__ float s_m[GM], s_l[GM], s_c[GM];

    const int tid = threadIdx.x;
    const int kl = tid % C::TPK;  // lane within the key slot: dims kl*8 .. kl*8+7
    const int ks = tid / C::TPK;  // key slot
    const int warp = tid / 32, lane = tid % 32;
    const bool lane_on = kl < C::CH;
    const int seq = blockIdx.y, split = blockIdx.z;
    const int kvh = blockIdx.x / a.n_chunks, hc = blockIdx.x % a.n_chunks;
    const int h0 = kvh * a.group + hc * GM;  // first query head of this CTA
    const int G = min(GM, a.group - hc * GM);

    int64_t t_begin, t_end;
    split_range(a, seq, split, &t_begin, &t_end);

    const int64_t sh0 = (int64_t)seq * a.n_head + h0;  // (seq, head h0) row
    float qf[GM][8];
#pragma unroll
    for (int g = 0; g < GM; g++) {
        uint4 u = make_uint4(0, 0, 0, 0);
        if (g < G && lane_on)
            u = __ldg(reinterpret_cast<const uint4 *>(a.q + (sh0 + g) * HD + kl * 8));
        bf16x8_to_f32(u, qf[g]);
    }
    float acc[GM][8];
#pragma unroll
    for (int g = 0; g < GM; g++)
#pragma unroll
        for (int e = 0; e < 8; e++)
            acc[g][e] = 0.f;
    if (tid < GM) {
        s_m[tid] = -INFINITY;
        s_l[tid] = 0.f;
    }
    __syncthreads();

    const int32_t *table = a.tables + (int64_t)seq * a.max_blocks;
    const int64_t row_stride = (int64_t)a.n_kv_head * HD;
    const kc_bf16 *kb = a.k + (int64_t)kvh * HD + kl * 8;
    const kc_bf16 *vb = a.v + (int64_t)kvh * HD + kl * 8;

    for (int64_t t0 = t_begin; t0 < t_end; t0 += C::TILE) {
        // Slot ks takes keys t0 + i*NT + ks: neighbouring slots read
        // neighbouring tokens, mostly in the same cache block.
        int64_t off[kTokPerThread];
        bool ok[kTokPerThread];
        uint4 kr[kTokPerThread];
#pragma unroll
        for (int i = 0; i < kTokPerThread; i++) {
            const int64_t p = t0 + i * C::NT + ks;
            ok[i] = lane_on && p < t_end;
            off[i] = 0;
            kr[i] = make_uint4(0, 0, 0, 0);
            if (ok[i]) {
                off[i] = ((int64_t)table[p >> 4] * KC_BLOCK_TOKENS + (p & 15)) * row_stride;
                kr[i] = __ldg(reinterpret_cast<const uint4 *>(kb + off[i]));
            }
        }
#pragma unroll
        for (int i = 0; i < kTokPerThread; i++) {
            float kf[8];
            bf16x8_to_f32(kr[i], kf);
            const bool valid = t0 + i * C::NT + ks < t_end;
#pragma unroll
            for (int g = 0; g < GM; g++) {
                if (g < G) {  // G is the same for the whole CTA: shuffles stay converged
                    float d = 0.f;
#pragma unroll
                    for (int e = 0; e < 8; e++)
                        d = fmaf(qf[g][e], kf[e], d);
#pragma unroll
                    for (int o = C::TPK / 2; o > 0; o >>= 1)
                        d += __shfl_xor_sync(0xffffffffu, d, o);
                    if (kl == 0)
                        s_sc[g][i * C::NT + ks] = valid ? d * a.scale : -INFINITY;
                }
            }
        }
        // V loads go out now so they fly while the softmax runs.
        uint4 vr[kTokPerThread];
#pragma unroll
        for (int i = 0; i < kTokPerThread; i++)
            vr[i] = ok[i] ? __ldg(reinterpret_cast<const uint4 *>(vb + off[i]))
                          : make_uint4(0, 0, 0, 0);
        __syncthreads();

        // Online softmax, one warp per head: new max, probabilities of the
        // tile, and the factor that rescales what came before.
        for (int g = warp; g < G; g += kThreads / 32) {
            float mx = -INFINITY;
            for (int j = lane; j < C::TILE; j += 32)
                mx = fmaxf(mx, s_sc[g][j]);
            mx = warp_max(mx);
            const float m_old = s_m[g];
            const float m_new = fmaxf(m_old, mx);
            const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no -inf - -inf
            float sum = 0.f;
            for (int j = lane; j < C::TILE; j += 32) {
                const float p = expf(s_sc[g][j] - m_use);  // masked: exp(-inf) = 0
                s_sc[g][j] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            __syncwarp();  // every lane has read s_m[g], s_l[g] before lane 0 writes
            if (lane == 0) {
                const float c = expf(m_old - m_use);  // 0 on the first tile
                s_c[g] = c;
                s_l[g] = s_l[g] * c + sum;
                s_m[g] = m_new;
            }
        }
        __syncthreads();

#pragma unroll
        for (int g = 0; g < GM; g++) {
            if (g < G) {
                const float c = s_c[g];
#pragma unroll
                for (int e = 0; e < 8; e++)
                    acc[g][e] *= c;
            }
        }
#pragma unroll
        for (int i = 0; i < kTokPerThread; i++) {
            float vf[8];
            bf16x8_to_f32(vr[i], vf);  // zeros for masked keys (p is 0 there too)
#pragma unroll
            for (int g = 0; g < GM; g++) {
                if (g < G) {
                    const float p = s_sc[g][i * C::NT + ks];
#pragma unroll
                    for (int e = 0; e < 8; e++)
                        acc[g][e] = fmaf(p, vf[e], acc[g][e]);
                }
            }
        }
        __syncthreads();  // s_sc is rewritten by the next tile
    }

    // Sum the key slots' accumulators in slot order 0, 1, ... (fixed).
    if (lane_on) {
#pragma unroll
        for (int g = 0; g < GM; g++) {
            if (g < G) {
                float4 *dst = reinterpret_cast<float4 *>(&s_red[ks][g][kl * 8]);
                dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
                dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
            }
        }
    }
    __syncthreads();
    for (int idx = tid; idx < G * HD; idx += kThreads) {
        const int g = idx / HD, d = idx - g * HD;
        float sum = 0.f;
#pragma unroll
        for (int s = 0; s < C::NT; s++)
            sum += s_red[s][g][d];
        if (a.splits == 1) {
            const float l = s_l[g];
            a.out[(sh0 + g) * HD + d] = __bfloat16_as_ushort(__float2bfloat16_rn(l > 0.f ? sum / l : 0.f));
        } else {
            a.ws_acc[((sh0 + g) * a.splits + split) * HD + d] = sum;
        }
    }
    if (a.splits > 1 && tid < G)
        a.ws_ml[(sh0 + tid) * a.splits + split] = make_float2(s_m[tid], s_l[tid]);
}

// One CTA per (head, sequence): out = sum_j acc_j e^(m_j - M) / sum_j l_j
// e^(m_j - M), over the non-empty splits j in increasing order. An empty
// split has l == 0 (a non-empty one has l >= 1) and is skipped.
__global__ void __launch_bounds__(kThreads)
    attn_decode_merge(kc_bf16 *out, const float *ws_acc, const float2 *ws_ml, int n_head, int hd,
                      int splits)
{
    const int64_t sh = (int64_t)blockIdx.y * n_head + blockIdx.x;
    const float2 *ml = ws_ml + sh * splits;
    float M = -INFINITY;
    for (int j = 0; j < splits; j++) {
        const float2 x = ml[j];
        if (x.y > 0.f)
            M = fmaxf(M, x.x);
    }
    float L = 0.f;
    for (int j = 0; j < splits; j++) {
        const float2 x = ml[j];
        if (x.y > 0.f)
            L += x.y * expf(x.x - M);
    }
    const float *acc = ws_acc + sh * splits * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.f;
        for (int j = 0; j < splits; j++) {
            const float2 x = ml[j];
            if (x.y > 0.f)
                o += acc[(int64_t)j * hd + d] * expf(x.x - M);
        }
        out[sh * hd + d] = __bfloat16_as_ushort(__float2bfloat16_rn(L > 0.f ? o / L : 0.f));
    }
}

template <int HD>
cudaError_t launch_hd(int gm, dim3 grid, cudaStream_t s, const DecArgs &a)
{
    switch (gm) {
    case 1: attn_decode_kernel<HD, 1><<<grid, kThreads, 0, s>>>(a); break;
    case 2: attn_decode_kernel<HD, 2><<<grid, kThreads, 0, s>>>(a); break;
    case 4: attn_decode_kernel<HD, 4><<<grid, kThreads, 0, s>>>(a); break;
    default: attn_decode_kernel<HD, 8><<<grid, kThreads, 0, s>>>(a); break;
    }
    return cudaGetLastError();
}

bool head_dim_ok(int hd)
{
    return hd == 64 || hd == 80 || hd == 96 || hd == 128 || hd == 256;
}

bool misaligned(const void *p)
{
    return ((uintptr_t)p & 15) != 0;
}

} // namespace

/* n_splits = 0 may use up to min(16, 1024 / n_seqs) splits (at least 1);
 * max(n_seqs, min(16 n_seqs, 1024)) bounds n_seqs times that and, unlike
 * it, never decreases with n_seqs, so a workspace sized for the largest
 * batch serves every smaller one. */
extern "C" size_t kc_attn_decode_workspace(int n_seqs, int n_head, int head_dim, int n_splits)
{
    if (n_seqs <= 0 || n_head <= 0 || !head_dim_ok(head_dim) || n_splits < 0 || n_splits == 1)
        return 0;
    int64_t units;
    if (n_splits > 1) {
        units = (int64_t)n_seqs * n_splits;
    } else {
        int64_t lo = 16 * (int64_t)n_seqs < kPartialsCap ? 16 * (int64_t)n_seqs : kPartialsCap;
        units = n_seqs > lo ? n_seqs : lo;
    }
    return (size_t)units * (size_t)n_head * (size_t)(head_dim + 2) * sizeof(float);
}

extern "C" int kc_attn_decode(kc_stream s, kc_bf16 *out, const kc_bf16 *q, const kc_bf16 *k_cache,
                              const kc_bf16 *v_cache, const int32_t *block_tables, int max_blocks,
                              const int32_t *seq_lens, int n_seqs, int n_head, int n_kv_head,
                              int head_dim, float scale, int sliding_window, int n_splits,
                              void *workspace)
{
    if (n_seqs < 0 || n_head <= 0 || n_kv_head <= 0 || n_head % n_kv_head != 0 ||
        !head_dim_ok(head_dim) || max_blocks < 0 || n_splits < 0 || n_splits > 65535 ||
        n_seqs > 65535)
        return cudaErrorInvalidValue;
    if (n_seqs == 0)
        return 0;
    if (!out || !q || !k_cache || !v_cache || !block_tables || !seq_lens || misaligned(q) ||
        misaligned(k_cache) || misaligned(v_cache))
        return cudaErrorInvalidValue;

    const int group = n_head / n_kv_head;
    const int gm = group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : kMaxHeadsPerCta;
    const int n_chunks = (group + gm - 1) / gm;
    const int64_t grid_x = (int64_t)n_kv_head * n_chunks;

    int splits = n_splits, min_chunk = 1;
    if (n_splits == 0) {
        // Enough splits to give every SM about two CTAs, no more than the
        // longest possible sequence (max_blocks * 16) needs at kMinChunk
        // tokens each, and within the workspace bound.
        int dev = 0, sms = 0;
        cudaError_t e = cudaGetDevice(&dev);
        if (e == cudaSuccess)
            e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        if (e != cudaSuccess)
            return (int)e;
        const int64_t max_ctx = (int64_t)max_blocks * KC_BLOCK_TOKENS;
        const int64_t ctas = (int64_t)n_seqs * grid_x;
        int64_t sp = (max_ctx + kMinChunk - 1) / kMinChunk;
        const int64_t s_occ = (2 * (int64_t)sms + ctas - 1) / ctas;
        const int64_t s_ws = kPartialsCap / n_seqs;
        sp = sp < s_occ ? sp : s_occ;
        sp = sp < s_ws ? sp : s_ws;
        sp = sp < kMaxSplits ? sp : kMaxSplits;
        splits = sp < 1 ? 1 : (int)sp;
        min_chunk = kMinChunk;
    }
    if (splits > 1 && !workspace)
        return cudaErrorInvalidValue;

    DecArgs a;
    a.out = out;
    a.q = q;
    a.k = k_cache;
    a.v = v_cache;
    a.tables = block_tables;
    a.seq_lens = seq_lens;
    a.max_blocks = max_blocks;
    a.n_head = n_head;
    a.n_kv_head = n_kv_head;
    a.group = group;
    a.n_chunks = n_chunks;
    a.scale = scale;
    a.window = sliding_window;
    a.splits = splits;
    a.min_chunk = min_chunk;
    a.ws_acc = nullptr;
    a.ws_ml = nullptr;
    if (splits > 1) {
        // acc first: its size is a multiple of 32 bytes, so ml stays aligned
        a.ws_acc = static_cast<float *>(workspace);
        a.ws_ml = reinterpret_cast<float2 *>(a.ws_acc + (int64_t)n_seqs * n_head * splits * head_dim);
    }

    const dim3 grid((unsigned)grid_x, (unsigned)n_seqs, (unsigned)splits);
    cudaStream_t st = reinterpret_cast<cudaStream_t>(s);
    cudaError_t e;
    switch (head_dim) {
    case 64: e = launch_hd<64>(gm, grid, st, a); break;
    case 80: e = launch_hd<80>(gm, grid, st, a); break;
    case 96: e = launch_hd<96>(gm, grid, st, a); break;
    case 128: e = launch_hd<128>(gm, grid, st, a); break;
    default: e = launch_hd<256>(gm, grid, st, a); break;
    }
    if (e != cudaSuccess || splits == 1)
        return (int)e;
    attn_decode_merge<<<dim3((unsigned)n_head, (unsigned)n_seqs), kThreads, 0, st>>>(
        out, a.ws_acc, a.ws_ml, n_head, head_dim, splits);
    return (int)cudaGetLastError();
}
