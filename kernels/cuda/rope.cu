// rope.cu: rotary embeddings on q and k in place, and the token's keys and
// values written into the paged KV cache at its slot (kc_rope_kv_write in
// kcuda.h), one launch per layer. One thread block per token: the token's
// cos/sin table is computed once into shared memory and used by every
// head. Enqueued by the engine's CUDA backend thread on its stream; no
// allocation, no synchronization.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/bf16.cuh"
#include "kernels/cuda/kcuda.h"

namespace
{
using namespace kcu;

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 1 << 20; // tokens beyond it are grid-strided

// Per token t (blockIdx.x, grid-strided):
//  1. cs[2i], cs[2i+1] = cos, sin of pos * inv_freq[table][i], times mscale
//     (fp32 angle as on the CPU; sincosf, not __sincosf: positions reach
//     1e5 and more, where the fast intrinsic loses all accuracy);
//  2. every (head, pair) of q and k rotated in place; a k pair is also
//     stored into the cache from the same registers, so the cache holds
//     exactly the bf16 values left in k;
//  3. the dims of k past rope_dim and all of v copied into the cache
//     (16-byte accesses when VEC).
// A token whose slot is < 0 (padding) is rotated but writes no cache.
template <bool VEC>
__global__ void __launch_bounds__(kThreads)
    rope_kv_kernel(uint16_t *q, uint16_t *k, const uint16_t *__restrict__ v,
                   const int32_t *__restrict__ pos, const int64_t *__restrict__ slot,
                   int64_t n_tokens, int n_head, int n_kv_head, int head_dim, int rope_dim,
                   int interleaved, const float *__restrict__ inv_freq,
                   const int8_t *__restrict__ table_idx, float mscale,
                   uint16_t *__restrict__ k_cache, uint16_t *__restrict__ v_cache)
{
    __shared__ float cs[KC_MAX_HEAD_DIM]; // rope_dim / 2 (cos, sin) pairs
    const int pairs = rope_dim / 2;
    const int64_t kv_row = (int64_t)n_kv_head * head_dim; // elements of one token's k or v
    const int64_t q_row = (int64_t)n_head * head_dim;

    for (int64_t t = blockIdx.x; t < n_tokens; t += gridDim.x) {
        const float p = (float)pos[t];
        // table_idx is trusted (there is no n_tables to check against);
        // a negative entry reads table 0 rather than before the array
        const int tab = table_idx && table_idx[t] > 0 ? table_idx[t] : 0;
        const float *inv = inv_freq + (int64_t)tab * pairs;
        for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
            float sn, cn;
            sincosf(p * inv[i], &sn, &cn);
            cs[2 * i] = cn * mscale;
            cs[2 * i + 1] = sn * mscale;
        }
        __syncthreads();

        const int64_t sl = slot[t];
        uint16_t *kc = sl >= 0 ? k_cache + sl * kv_row : nullptr;
        uint16_t *vc = sl >= 0 ? v_cache + sl * kv_row : nullptr;
        uint16_t *qt = q + t * q_row;
        uint16_t *kt = k + t * kv_row;

        // Consecutive threads take consecutive pairs of a head, so a warp
        // reads a contiguous run of each head (both halves for HF pairing).
        const int n_rot = (n_head + n_kv_head) * pairs;
        for (int u = threadIdx.x; u < n_rot; u += blockDim.x) {
            const int h = u / pairs, i = u - h * pairs;
            const bool is_k = h >= n_head;
            uint16_t *x = is_k ? kt + (int64_t)(h - n_head) * head_dim : qt + (int64_t)h * head_dim;
            const int a = interleaved ? 2 * i : i;
            const int b = interleaved ? 2 * i + 1 : i + pairs;
            const float x1 = bf2f(x[a]), x2 = bf2f(x[b]);
            const float c = cs[2 * i], s = cs[2 * i + 1];
            const uint16_t y1 = f2bf(x1 * c - x2 * s);
            const uint16_t y2 = f2bf(x2 * c + x1 * s);
            x[a] = y1;
            x[b] = y2;
            if (is_k && kc) {
                uint16_t *d = kc + (int64_t)(h - n_head) * head_dim;
                d[a] = y1;
                d[b] = y2;
            }
        }

        if (kc) {
            // The unrotated dims of k: none read or written by the loop
            // above, so no barrier is needed between the two.
            const int tail = head_dim - rope_dim;
            const int n_tail = n_kv_head * tail;
            for (int u = threadIdx.x; u < n_tail; u += blockDim.x) {
                const int h = u / tail, d = rope_dim + (u - h * tail);
                kc[(int64_t)h * head_dim + d] = kt[(int64_t)h * head_dim + d];
            }
            const uint16_t *vt = v + t * kv_row;
            if (VEC) {
                const uint4 *src = reinterpret_cast<const uint4 *>(vt);
                uint4 *dst = reinterpret_cast<uint4 *>(vc);
                for (int64_t j = threadIdx.x; j < kv_row / 8; j += blockDim.x)
                    dst[j] = src[j];
            } else {
                for (int64_t j = threadIdx.x; j < kv_row; j += blockDim.x)
                    vc[j] = vt[j];
            }
        }
        __syncthreads(); // cs is rewritten for the next token
    }
}

} // namespace

extern "C" int kc_rope_kv_write(kc_stream s, kc_bf16 *q, kc_bf16 *k, const kc_bf16 *v,
                                const int32_t *pos, const int64_t *slot, int64_t n_tokens,
                                int n_head, int n_kv_head, int head_dim, int rope_dim,
                                int interleaved, const float *inv_freq, const int8_t *table_idx,
                                float mscale, kc_bf16 *k_cache, kc_bf16 *v_cache)
{
    if (n_tokens < 0 || n_head <= 0 || n_kv_head <= 0 || head_dim <= 0 ||
        head_dim > KC_MAX_HEAD_DIM || rope_dim < 0 || rope_dim > head_dim || rope_dim % 2 != 0)
        return (int)cudaErrorInvalidValue;
    // (n_head + n_kv_head) * pairs is an int in the kernel
    if ((int64_t)(n_head + (int64_t)n_kv_head) * KC_MAX_HEAD_DIM > INT32_MAX)
        return (int)cudaErrorInvalidValue;
    if (n_tokens == 0)
        return 0;
    if (!q || !k || !v || !pos || !slot || !k_cache || !v_cache || (rope_dim > 0 && !inv_freq))
        return (int)cudaErrorInvalidValue;

    const int64_t kv_row = (int64_t)n_kv_head * head_dim;
    const bool vec = kv_row % 8 == 0 && aligned16(v) && aligned16(v_cache);
    const int grid = (int)(n_tokens < kMaxGrid ? n_tokens : kMaxGrid);
    cudaStream_t st = (cudaStream_t)s;
    if (vec)
        rope_kv_kernel<true><<<grid, kThreads, 0, st>>>(
            q, k, v, pos, slot, n_tokens, n_head, n_kv_head, head_dim, rope_dim, interleaved,
            inv_freq, table_idx, mscale, k_cache, v_cache);
    else
        rope_kv_kernel<false><<<grid, kThreads, 0, st>>>(
            q, k, v, pos, slot, n_tokens, n_head, n_kv_head, head_dim, rope_dim, interleaved,
            inv_freq, table_idx, mscale, k_cache, v_cache);
    return (int)cudaGetLastError();
}
