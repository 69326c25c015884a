// attn_prefill.cu: prefill and chunked-prefill attention over the paged KV
// cache (kcuda.h), FlashAttention-2 style. One CTA of 4 warps per (tile of
// 64 query rows, head, sequence); each warp owns 16 rows. K/V tiles are
// gathered through the block table with cp.async into a two-stage shared
// buffer; QK^T and PV run on tensor cores (mma.sync m16n8k16 bf16, fp32
// accumulators, sm_80+), the online softmax in fp32 registers. A row's
// result depends only on its sequence (one fixed order), never the batch.
// Runs on the caller's stream; no allocation, no synchronization.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels/cuda/kcuda.h"

namespace {

constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

// Tile shapes for one head_dim. Rows in shared memory are padded by 16
// bytes so the 8 rows an ldmatrix phase reads fall in 8 distinct 16-byte
// bank groups. head_dim 256 keeps Q in shared memory (its fragments would
// not fit in registers next to the 16 x 256 output accumulator) and uses
// 32-key tiles.
template <int HD> struct PfCfg {
    static_assert(HD % 16 == 0 && HD <= KC_MAX_HEAD_DIM, "head_dim");
    static constexpr int BM = 64;                   // query rows per CTA
    static constexpr int BN = HD <= 128 ? 64 : 32;  // keys per tile
    static constexpr int LD = HD + 8;               // smem row stride, bf16
    static constexpr int CH = HD / 8;               // 16-byte chunks per row
    static constexpr bool QREG = HD <= 128;
    static constexpr int KS = HD / 16;  // k-steps of QK^T
    static constexpr int NS = BN / 8;   // n-tiles of S (8 keys each)
    static constexpr int NO = HD / 8;   // n-tiles of O (8 dims each)
    static_assert(NS % 2 == 0 && NO % 2 == 0, "ldmatrix.x4 loads tiles in pairs");
    // Q, then K and V with two stages each
    static constexpr size_t SMEM = (size_t)(BM + 4 * BN) * LD * sizeof(uint16_t);
};

struct PfArgs {
    kc_bf16 *out;           // (total_q, n_head, HD)
    const kc_bf16 *q;       // (total_q, n_head, HD)
    const kc_bf16 *k, *v;   // (n_blocks, 16, n_kv_head, HD)
    const int32_t *tables;  // (n_seqs, max_blocks)
    const int32_t *cu_q;    // (n_seqs + 1)
    const int32_t *seq_lens;
    int max_blocks;
    int n_head, n_kv_head;
    float scale_log2;  // scale * log2(e): the softmax runs on exp2
    int window;
};

__device__ __forceinline__ uint32_t smem_u32(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16 bytes global -> shared, asynchronous; zero-filled (nothing read) when
// !ok, which is how rows past the sequence or the query tile stay finite.
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool ok)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(ok ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N> __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix
// i, and lane t receives (row t/4, cols 2(t%4), 2(t%4)+1) of each (of its
// transpose with .trans).
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

// d += a b: a 16x16 (row), b 16x8 (col), d 16x8 f32. Fragments, with
// g = lane/4, t = lane%4: a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..),
// a3 (g+8, 2t+8..); b0 (k 2t.., n g), b1 (k 2t+8.., n g); d0,d1 (g, 2t..),
// d2,d3 (g+8, 2t..).
__device__ __forceinline__ void mma_bf16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi)
{
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low half
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
}

// Gathers keys kv0 .. kv0+BN-1 of one KV head into a stage; keys at or
// past kv_hi are zero-filled (a masked zero V row contributes 0 * 0, never
// 0 * garbage).
template <int HD>
__device__ __forceinline__ void load_kv_tile(uint16_t *sk, uint16_t *sv, const PfArgs &a,
                                             const int32_t *table, int kvh, int64_t kv0,
                                             int64_t kv_hi)
{
    using C = PfCfg<HD>;
    const int64_t row_stride = (int64_t)a.n_kv_head * HD;
    for (int idx = threadIdx.x; idx < C::BN * C::CH; idx += kThreads) {
        const int r = idx / C::CH, c = idx - r * C::CH;
        const int64_t p = kv0 + r;
        const bool ok = p < kv_hi;
        int64_t off = 0;
        if (ok)
            off = ((int64_t)table[p >> 4] * KC_BLOCK_TOKENS + (p & 15)) * row_stride +
                  (int64_t)kvh * HD + c * 8;
        cp_async16(sk + r * C::LD + c * 8, a.k + off, ok);
        cp_async16(sv + r * C::LD + c * 8, a.v + off, ok);
    }
}

template <int HD> __global__ void __launch_bounds__(kThreads) attn_prefill_kernel(const PfArgs a)
{
    using C = PfCfg<HD>;
    extern __shared__ uint4 smem_u4[];
    uint16_t *sQ = reinterpret_cast<uint16_t *>(smem_u4);
    uint16_t *sK = sQ + C::BM * C::LD;  // stages at sK, sK + BN*LD
    uint16_t *sV = sK + 2 * C::BN * C::LD;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int seq = blockIdx.z, h = blockIdx.y;
    const int qt = gridDim.x - 1 - blockIdx.x;  // the longest (last) tiles start first
    const int q_start = a.cu_q[seq];
    const int q_len = a.cu_q[seq + 1] - q_start;
    if ((int64_t)qt * C::BM >= (int64_t)q_len)
        return;  // whole CTA, before any barrier
    const int rows = min(C::BM, q_len - qt * C::BM);  // valid rows of this tile
    int64_t len = a.seq_lens[seq];
    const int64_t cap = (int64_t)a.max_blocks * KC_BLOCK_TOKENS;
    len = len < 0 ? 0 : (len > cap ? cap : len);
    const int kvh = h / (a.n_head / a.n_kv_head);

    // Row j of the sequence sits at position len - q_len + j and sees keys
    // (pos - window, pos]; the CTA needs the union over its valid rows.
    const int64_t qpos0 = len - q_len + (int64_t)qt * C::BM;
    const int64_t qpos_hi = qpos0 + rows - 1;
    const int64_t kv_hi = qpos_hi + 1 < len ? qpos_hi + 1 : len;  // exclusive
    int64_t kv_lo = 0;
    if (a.window > 0 && qpos0 - a.window + 1 > 0)
        kv_lo = qpos0 - a.window + 1;
    const int64_t tile_lo = kv_lo / C::BN * C::BN;
    const int n_tiles = kv_hi > tile_lo ? (int)((kv_hi - tile_lo + C::BN - 1) / C::BN) : 0;
    const int64_t q_row0 = (int64_t)q_start + (int64_t)qt * C::BM;  // packed row of local row 0

    if (n_tiles == 0) {  // nothing visible (a malformed length): zeros, not poison
        for (int idx = tid; idx < rows * C::CH; idx += kThreads) {
            const int r = idx / C::CH, c = idx - r * C::CH;
            *reinterpret_cast<uint4 *>(a.out + ((q_row0 + r) * a.n_head + h) * HD + c * 8) =
                make_uint4(0, 0, 0, 0);
        }
        return;
    }

    for (int idx = tid; idx < C::BM * C::CH; idx += kThreads) {
        const int r = idx / C::CH, c = idx - r * C::CH;
        const bool ok = r < rows;
        const kc_bf16 *src = ok ? a.q + ((q_row0 + r) * a.n_head + h) * HD + c * 8 : a.q;
        cp_async16(sQ + r * C::LD + c * 8, src, ok);
    }
    cp_async_commit();
    const int32_t *table = a.tables + (int64_t)seq * a.max_blocks;
    load_kv_tile<HD>(sK, sV, a, table, kvh, tile_lo, kv_hi);
    cp_async_commit();

    uint32_t qf[C::QREG ? C::KS : 1][4];
    float o[C::NO][4];
#pragma unroll
    for (int d = 0; d < C::NO; d++)
        o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows r0 and r0 + 8
    const int r0 = warp * 16 + gid;
    const int64_t qp0 = qpos0 + r0, qp1 = qp0 + 8;
    // per-lane ldmatrix row/column offsets (see ldsm_x4)
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;  // Q, V
    const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;  // K

    for (int it = 0; it < n_tiles; it++) {
        const int64_t kv0 = tile_lo + (int64_t)it * C::BN;
        const int st = it & 1;
        // The other stage was last read in iteration it-1, which ended on
        // a barrier: refill it while this one is used.
        if (it + 1 < n_tiles)
            load_kv_tile<HD>(sK + (st ^ 1) * C::BN * C::LD, sV + (st ^ 1) * C::BN * C::LD, a, table,
                             kvh, kv0 + C::BN, kv_hi);
        cp_async_commit();  // possibly empty: keeps the group count fixed
        cp_async_wait<1>(); // all but the newest group: Q and this tile
        __syncthreads();
        const uint16_t *k_s = sK + st * C::BN * C::LD;
        const uint16_t *v_s = sV + st * C::BN * C::LD;

        if constexpr (C::QREG) {
            if (it == 0) {
#pragma unroll
                for (int kk = 0; kk < C::KS; kk++)
                    ldsm_x4(qf[kk], sQ + (warp * 16 + a_row) * C::LD + kk * 16 + a_col);
            }
        }

        // S = Q K^T for this warp's 16 rows and the tile's BN keys
        float s[C::NS][4];
#pragma unroll
        for (int j = 0; j < C::NS; j++)
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < C::KS; kk++) {
            uint32_t af[4];
            if constexpr (C::QREG) {
                af[0] = qf[kk][0];
                af[1] = qf[kk][1];
                af[2] = qf[kk][2];
                af[3] = qf[kk][3];
            } else {
                ldsm_x4(af, sQ + (warp * 16 + a_row) * C::LD + kk * 16 + a_col);
            }
#pragma unroll
            for (int jp = 0; jp < C::NS / 2; jp++) {
                uint32_t b[4];  // b0, b1 of n-tile 2jp, then of 2jp+1
                ldsm_x4(b, k_s + (jp * 16 + b_row) * C::LD + kk * 16 + b_col);
                mma_bf16(s[2 * jp], af, b[0], b[1]);
                mma_bf16(s[2 * jp + 1], af, b[2], b[3]);
            }
        }
#pragma unroll
        for (int j = 0; j < C::NS; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                s[j][e] *= a.scale_log2;

        // Masks by absolute position, only on tiles that need them: causal,
        // window, and keys past kv_hi (zero-filled, so they must not count).
        const bool full = kv0 + C::BN - 1 <= qpos0 && kv0 + C::BN <= kv_hi &&
                          (a.window <= 0 || kv0 > qpos_hi - a.window);
        if (!full) {
#pragma unroll
            for (int j = 0; j < C::NS; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int64_t kp = kv0 + j * 8 + tig * 2 + (e & 1);
                    const int64_t qp = e < 2 ? qp0 : qp1;
                    const bool vis =
                        kp <= qp && kp < kv_hi && (a.window <= 0 || kp > qp - a.window);
                    if (!vis)
                        s[j][e] = -INFINITY;
                }
            }
        }

        // Online softmax; a row's 64 scores are spread over its 4-lane quad.
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < C::NS; j++) {
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // A row with nothing visible yet keeps max -inf; subtracting 0
        // instead keeps exp2(-inf - -inf) = NaN out.
        const float mu0 = mn0 == -INFINITY ? 0.f : mn0;
        const float mu1 = mn1 == -INFINITY ? 0.f : mn1;
        const float c0 = exp2f(m0 - mu0), c1 = exp2f(m1 - mu1);
        m0 = mn0;
        m1 = mn1;
        float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
        for (int j = 0; j < C::NS; j++) {
            s[j][0] = exp2f(s[j][0] - mu0);
            s[j][1] = exp2f(s[j][1] - mu0);
            s[j][2] = exp2f(s[j][2] - mu1);
            s[j][3] = exp2f(s[j][3] - mu1);
            rs0 += s[j][0] + s[j][1];
            rs1 += s[j][2] + s[j][3];
        }
        l0 = l0 * c0 + rs0;  // this lane's columns only; the quad sums at the end
        l1 = l1 * c1 + rs1;
#pragma unroll
        for (int d = 0; d < C::NO; d++) {
            o[d][0] *= c0;
            o[d][1] *= c0;
            o[d][2] *= c1;
            o[d][3] *= c1;
        }

        // O += P V: the S accumulators of n-tiles 2kc, 2kc+1 are exactly the
        // A fragment of k-step kc (P rounded to bf16, as in FlashAttention).
#pragma unroll
        for (int kc = 0; kc < C::BN / 16; kc++) {
            uint32_t pa[4];
            pa[0] = pack_bf16(s[2 * kc][0], s[2 * kc][1]);
            pa[1] = pack_bf16(s[2 * kc][2], s[2 * kc][3]);
            pa[2] = pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]);
            pa[3] = pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
            for (int dp = 0; dp < C::NO / 2; dp++) {
                uint32_t b[4];  // b0, b1 of dim tile 2dp, then of 2dp+1
                ldsm_x4_t(b, v_s + (kc * 16 + a_row) * C::LD + dp * 16 + a_col);
                mma_bf16(o[2 * dp], pa, b[0], b[1]);
                mma_bf16(o[2 * dp + 1], pa, b[2], b[3]);
            }
        }
        __syncthreads();  // this stage is refilled two iterations on
    }
    cp_async_wait<0>();

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    if (r0 < rows) {
        kc_bf16 *dst = a.out + ((q_row0 + r0) * a.n_head + h) * HD + tig * 2;
#pragma unroll
        for (int d = 0; d < C::NO; d++)
            *reinterpret_cast<uint32_t *>(dst + d * 8) = pack_bf16(o[d][0] * inv0, o[d][1] * inv0);
    }
    if (r0 + 8 < rows) {
        kc_bf16 *dst = a.out + ((q_row0 + r0 + 8) * a.n_head + h) * HD + tig * 2;
#pragma unroll
        for (int d = 0; d < C::NO; d++)
            *reinterpret_cast<uint32_t *>(dst + d * 8) = pack_bf16(o[d][2] * inv1, o[d][3] * inv1);
    }
}

template <int HD> cudaError_t launch_hd(dim3 grid, cudaStream_t s, const PfArgs &a)
{
    // over 48 KB of dynamic shared memory needs the opt-in (a host-side
    // attribute, not a stream operation: fine under graph capture)
    cudaError_t e = cudaFuncSetAttribute(attn_prefill_kernel<HD>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)PfCfg<HD>::SMEM);
    if (e != cudaSuccess)
        return e;
    attn_prefill_kernel<HD><<<grid, kThreads, PfCfg<HD>::SMEM, s>>>(a);
    return cudaGetLastError();
}

bool misaligned(const void *p)
{
    return ((uintptr_t)p & 15) != 0;
}

} // namespace

extern "C" int kc_attn_prefill(kc_stream s, kc_bf16 *out, const kc_bf16 *q, const kc_bf16 *k_cache,
                               const kc_bf16 *v_cache, const int32_t *block_tables, int max_blocks,
                               const int32_t *cu_q_lens, const int32_t *seq_lens, int n_seqs,
                               int max_q_len, int n_head, int n_kv_head, int head_dim, float scale,
                               int sliding_window)
{
    if (n_seqs < 0 || max_q_len < 0 || n_head <= 0 || n_kv_head <= 0 ||
        n_head % n_kv_head != 0 || max_blocks < 0 || n_seqs > 65535 || n_head > 65535 ||
        !(head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128 ||
          head_dim == 256))
        return cudaErrorInvalidValue;
    if (n_seqs == 0 || max_q_len == 0)
        return 0;
    if (!out || !q || !k_cache || !v_cache || !block_tables || !cu_q_lens || !seq_lens ||
        misaligned(out) || misaligned(q) || misaligned(k_cache) || misaligned(v_cache))
        return cudaErrorInvalidValue;

    PfArgs a;
    a.out = out;
    a.q = q;
    a.k = k_cache;
    a.v = v_cache;
    a.tables = block_tables;
    a.cu_q = cu_q_lens;
    a.seq_lens = seq_lens;
    a.max_blocks = max_blocks;
    a.n_head = n_head;
    a.n_kv_head = n_kv_head;
    a.scale_log2 = scale * kLog2e;
    a.window = sliding_window;

    const int q_tiles = (int)(((int64_t)max_q_len + 63) / 64);
    const dim3 grid((unsigned)q_tiles, (unsigned)n_head, (unsigned)n_seqs);
    cudaStream_t st = reinterpret_cast<cudaStream_t>(s);
    switch (head_dim) {
    case 64: return (int)launch_hd<64>(grid, st, a);
    case 80: return (int)launch_hd<80>(grid, st, a);
    case 96: return (int)launch_hd<96>(grid, st, a);
    case 128: return (int)launch_hd<128>(grid, st, a);
    default: return (int)launch_hd<256>(grid, st, a);
    }
}
