// test_attention.cu: kc_attn_decode and kc_attn_prefill against a CPU
// reference (engine/model.c's attn_worker math: scores * scale, softmax in
// full precision, GQA head h -> KV head h / (n_head / n_kv_head), a window
// keeps positions > pos - window), on random bf16 caches whose block
// tables are shuffled so no sequence is contiguous; then decode GB/s and
// prefill TFLOP/s against the device's measured ceilings.
// Exit status as in gpu_check.h (2: no device).
#include <algorithm>
#include <vector>

#include "tests/gpu/gpu_check.h"

static const char *T_DEC = "attn_decode";
static const char *T_PRE = "attn_prefill";
static const double kBound = 2e-2;

/* ------------------------------------------------------------- fixtures */

// One layer's paged cache, host and device, with each sequence's blocks
// drawn from a shuffled pool (plus spare blocks no sequence owns). Table
// entries past a sequence's blocks are -1: a kernel that reads one faults.
struct paged {
    int n_kv, hd, max_blocks = 0, n_blocks = 0;
    std::vector<int> lens;
    std::vector<int32_t> table;  // (n_seqs, max_blocks)
    std::vector<float> k, v;     // (n_blocks, 16, n_kv, hd), values as the device sees them
    uint16_t *dk = nullptr, *dv = nullptr;
    int32_t *dtable = nullptr, *dlens = nullptr;

    paged(gc_rng &r, const std::vector<int> &seq_lens, int n_kv_, int hd_) : n_kv(n_kv_), hd(hd_), lens(seq_lens)
    {
        int need = 0;
        for (int l : lens) {
            int b = (l + KC_BLOCK_TOKENS - 1) / KC_BLOCK_TOKENS;
            need += b;
            max_blocks = std::max(max_blocks, b + 1);  // one spare column stays -1
        }
        n_blocks = need + 7;
        std::vector<int32_t> pool(n_blocks);
        for (int i = 0; i < n_blocks; i++)
            pool[i] = i;
        for (int i = n_blocks - 1; i > 0; i--)
            std::swap(pool[i], pool[r.next() % (uint64_t)(i + 1)]);
        table.assign(lens.size() * (size_t)max_blocks, -1);
        int next = 0;
        for (size_t s = 0; s < lens.size(); s++)
            for (int b = 0; b < (lens[s] + KC_BLOCK_TOKENS - 1) / KC_BLOCK_TOKENS; b++)
                table[s * max_blocks + b] = pool[next++];
        size_t n = (size_t)n_blocks * KC_BLOCK_TOKENS * n_kv * hd;
        std::vector<uint16_t> hk = gc_rand_bf16(r, n, -1.f, 1.f), hv = gc_rand_bf16(r, n, -1.f, 1.f);
        k = gc_to_f32(hk);
        v = gc_to_f32(hv);
        dk = gc_upload(hk);
        dv = gc_upload(hv);
        dtable = gc_upload(table);
        std::vector<int32_t> l32(lens.begin(), lens.end());
        dlens = gc_upload(l32);
    }
    ~paged()
    {
        cudaFree(dk);
        cudaFree(dv);
        cudaFree(dtable);
        cudaFree(dlens);
    }
    const float *krow(int s, int pos, int kvh) const
    {
        size_t blk = (size_t)table[(size_t)s * max_blocks + pos / KC_BLOCK_TOKENS];
        return &k[((blk * KC_BLOCK_TOKENS + pos % KC_BLOCK_TOKENS) * n_kv + kvh) * hd];
    }
    const float *vrow(int s, int pos, int kvh) const
    {
        size_t blk = (size_t)table[(size_t)s * max_blocks + pos / KC_BLOCK_TOKENS];
        return &v[((blk * KC_BLOCK_TOKENS + pos % KC_BLOCK_TOKENS) * n_kv + kvh) * hd];
    }
};

// One query row of head h of sequence s at position pos, in double.
static void ref_row(const paged &c, int s, int pos, int h, int group, const float *q, float scale,
                    int window, float *out)
{
    int kvh = h / group, hd = c.hd;
    int lo = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
    std::vector<double> sc(pos + 1 - lo);
    double mx = -INFINITY;
    for (int p = lo; p <= pos; p++) {
        const float *kr = c.krow(s, p, kvh);
        double d = 0;
        for (int i = 0; i < hd; i++)
            d += (double)q[i] * kr[i];
        sc[p - lo] = d * scale;
        mx = std::max(mx, sc[p - lo]);
    }
    double sum = 0;
    for (double &x : sc)
        sum += (x = exp(x - mx));
    std::vector<double> o(hd, 0.0);
    for (int p = lo; p <= pos; p++) {
        const float *vr = c.vrow(s, p, kvh);
        double w = sc[p - lo] / sum;
        for (int i = 0; i < hd; i++)
            o[i] += w * vr[i];
    }
    for (int i = 0; i < hd; i++)
        out[i] = (float)o[i];
}

// Queries a little larger than the keys so the softmax is not flat.
static std::vector<uint16_t> rand_q(gc_rng &r, size_t n)
{
    return gc_rand_bf16(r, n, -3.f, 3.f);
}

/* ---------------------------------------------------------------- decode */

static void decode_case(gc_rng &r, const char *name, const std::vector<int> &lens, int n_head, int n_kv,
                        int hd, int window, const std::vector<int> &splits)
{
    paged c(r, lens, n_kv, hd);
    int n = (int)lens.size(), group = n_head / n_kv;
    float scale = 1.0f / sqrtf((float)hd);
    size_t nq = (size_t)n * n_head * hd;
    std::vector<uint16_t> hq = rand_q(r, nq);
    std::vector<float> qf = gc_to_f32(hq), want(nq);
    for (int s = 0; s < n; s++)
        for (int h = 0; h < n_head; h++)
            ref_row(c, s, lens[s] - 1, h, group, &qf[((size_t)s * n_head + h) * hd], scale, window,
                    &want[((size_t)s * n_head + h) * hd]);
    uint16_t *dq = gc_upload(hq), *dout = nullptr;
    GC_CUDA(cudaMalloc(&dout, nq * 2));
    for (int sp : splits) {
        size_t ws = kc_attn_decode_workspace(n, n_head, hd, sp);
        void *dws = nullptr;
        if (ws)
            GC_CUDA(cudaMalloc(&dws, ws));
        gc_poison(dout, nq * 2);
        if (dws)
            gc_poison(dws, ws);
        GC_LAUNCH(kc_attn_decode(nullptr, dout, dq, c.dk, c.dv, c.dtable, c.max_blocks, c.dlens, n,
                                 n_head, n_kv, hd, scale, window, sp, dws));
        char cas[160];
        snprintf(cas, sizeof cas, "%s n_splits=%d", name, sp);
        gc_check_bf16(T_DEC, cas, dout, nq, want, kBound);
        cudaFree(dws);
    }
    cudaFree(dq);
    cudaFree(dout);
}

// n_splits = 1 must give the same bits for a sequence whatever the batch:
// each sequence alone (its own table row, length and query) against the
// batch of all of them.
static void decode_batch_invariance(gc_rng &r)
{
    std::vector<int> lens = {1, 15, 16, 17, 1000, 5000};
    int n_head = 32, n_kv = 8, hd = 128, n = (int)lens.size();
    float scale = 1.0f / sqrtf((float)hd);
    paged c(r, lens, n_kv, hd);
    size_t row = (size_t)n_head * hd, nq = n * row;
    std::vector<uint16_t> hq = rand_q(r, nq);
    uint16_t *dq = gc_upload(hq), *dbatch, *dalone;
    GC_CUDA(cudaMalloc(&dbatch, nq * 2));
    GC_CUDA(cudaMalloc(&dalone, nq * 2));
    gc_poison(dbatch, nq * 2);
    gc_poison(dalone, nq * 2);
    GC_LAUNCH(kc_attn_decode(nullptr, dbatch, dq, c.dk, c.dv, c.dtable, c.max_blocks, c.dlens, n,
                             n_head, n_kv, hd, scale, 0, 1, nullptr));
    for (int s = 0; s < n; s++)
        GC_LAUNCH(kc_attn_decode(nullptr, dalone + s * row, dq + s * row, c.dk, c.dv,
                                 c.dtable + (size_t)s * c.max_blocks, c.max_blocks, c.dlens + s, 1,
                                 n_head, n_kv, hd, scale, 0, 1, nullptr));
    std::vector<uint16_t> a = gc_download(dbatch, nq), b = gc_download(dalone, nq);
    size_t diff = 0;
    for (size_t i = 0; i < nq; i++)
        diff += a[i] != b[i];
    gc_check(T_DEC, "n_splits=1 alone == in batch (bits differing)", (double)diff, 0);
    cudaFree(dq);
    cudaFree(dbatch);
    cudaFree(dalone);
}

/* --------------------------------------------------------------- prefill */

struct pseq {
    int q_len, seq_len;
};

static void prefill_case(gc_rng &r, const char *name, const std::vector<pseq> &seqs, int n_head,
                         int n_kv, int hd, int window)
{
    std::vector<int> lens;
    std::vector<int32_t> cu = {0};
    int max_q = 0;
    for (const pseq &p : seqs) {
        lens.push_back(p.seq_len);
        cu.push_back(cu.back() + p.q_len);
        max_q = std::max(max_q, p.q_len);
    }
    paged c(r, lens, n_kv, hd);
    int n = (int)seqs.size(), group = n_head / n_kv;
    float scale = 1.0f / sqrtf((float)hd);
    size_t nq = (size_t)cu.back() * n_head * hd;
    std::vector<uint16_t> hq = rand_q(r, nq);
    std::vector<float> qf = gc_to_f32(hq), want(nq);
    for (int s = 0; s < n; s++)
        for (int j = 0; j < seqs[s].q_len; j++) {
            int pos = seqs[s].seq_len - seqs[s].q_len + j;
            for (int h = 0; h < n_head; h++) {
                size_t o = ((size_t)(cu[s] + j) * n_head + h) * hd;
                ref_row(c, s, pos, h, group, &qf[o], scale, window, &want[o]);
            }
        }
    uint16_t *dq = gc_upload(hq), *dout;
    int32_t *dcu = gc_upload(cu);
    GC_CUDA(cudaMalloc(&dout, nq * 2));
    gc_poison(dout, nq * 2);
    GC_LAUNCH(kc_attn_prefill(nullptr, dout, dq, c.dk, c.dv, c.dtable, c.max_blocks, dcu, c.dlens, n,
                              max_q, n_head, n_kv, hd, scale, window));
    gc_check_bf16(T_PRE, name, dout, nq, want, kBound);
    cudaFree(dq);
    cudaFree(dcu);
    cudaFree(dout);
}

/* ------------------------------------------------------------- arguments */

static void argument_checks(void)
{
    int bad = cudaErrorInvalidValue;
    uint16_t *d = nullptr;
    int32_t *di = nullptr;
    GC_CUDA(cudaMalloc(&d, 4096));
    GC_CUDA(cudaMalloc(&di, 4096));
    GC_CUDA(cudaMemset(di, 0, 4096));
    int rc;
    rc = kc_attn_decode(nullptr, d, d, d, d, di, 1, di, 1, 8, 8, 72, 1.f, 0, 1, nullptr);
    gc_check(T_DEC, "head_dim 72 -> invalid value", rc == bad ? 0 : 1, 0);
    rc = kc_attn_decode(nullptr, d, d, d, d, di, 1, di, 1, 6, 4, 64, 1.f, 0, 1, nullptr);
    gc_check(T_DEC, "n_head % n_kv_head != 0 -> invalid value", rc == bad ? 0 : 1, 0);
    rc = kc_attn_decode(nullptr, d, d, d, d, di, 1, di, 1, 8, 8, 64, 1.f, 0, 3, nullptr);
    gc_check(T_DEC, "n_splits 3 without workspace -> invalid value", rc == bad ? 0 : 1, 0);
    rc = kc_attn_decode(nullptr, d, d, d, d, di, 1, di, -1, 8, 8, 64, 1.f, 0, 1, nullptr);
    gc_check(T_DEC, "n_seqs -1 -> invalid value", rc == bad ? 0 : 1, 0);
    rc = kc_attn_decode(nullptr, d, d, d, d, di, 1, di, 0, 8, 8, 64, 1.f, 0, 1, nullptr);
    gc_check(T_DEC, "n_seqs 0 -> 0", rc == 0 ? 0 : 1, 0);
    rc = kc_attn_prefill(nullptr, d, d, d, d, di, 1, di, di, 1, 1, 8, 8, 72, 1.f, 0);
    gc_check(T_PRE, "head_dim 72 -> invalid value", rc == bad ? 0 : 1, 0);
    rc = kc_attn_prefill(nullptr, d, d, d, d, di, 1, di, di, 1, 1, 6, 4, 64, 1.f, 0);
    gc_check(T_PRE, "n_head % n_kv_head != 0 -> invalid value", rc == bad ? 0 : 1, 0);
    rc = kc_attn_prefill(nullptr, d, d, d, d, di, 1, di, di, 0, 0, 8, 8, 64, 1.f, 0);
    gc_check(T_PRE, "n_seqs 0 -> 0", rc == 0 ? 0 : 1, 0);
    GC_CUDA(cudaDeviceSynchronize());
    cudaFree(d);
    cudaFree(di);
}

/* ------------------------------------------------------------ benchmarks */

// Random bf16 in [-1, 1) straight on the device (2 GiB through the host
// would take longer than the benchmark).
__global__ void fill_bf16(uint16_t *p, size_t n, uint64_t seed)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = (i + seed) * 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        float f = (float)(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
        p[i] = __bfloat16_as_ushort(__float2bfloat16_rn(f));
    }
}

// Llama-3-8B-like layer (32/8 heads, head_dim 128), 2048-token contexts.
// 256 sequences' worth of cache (2 GiB of K and V); a smaller batch moves
// to the next sequences on every launch so its reads do not come from L2.
static void benchmarks(gc_rng &r)
{
    const int n_head = 32, n_kv = 8, hd = 128, ctx = 2048, n_all = 256;
    const int mb = ctx / KC_BLOCK_TOKENS;
    const float scale = 1.0f / sqrtf((float)hd);
    double bw = kc_measure_bandwidth_gbs((size_t)1 << 30);
    double tf = kc_measure_bf16_tflops(8192, 8192, 8192);

    size_t n_blocks = (size_t)n_all * mb, n = n_blocks * KC_BLOCK_TOKENS * n_kv * hd;
    uint16_t *dk, *dv;
    GC_CUDA(cudaMalloc(&dk, n * 2));
    GC_CUDA(cudaMalloc(&dv, n * 2));
    fill_bf16<<<4096, 256>>>(dk, n, 1);
    fill_bf16<<<4096, 256>>>(dv, n, 2);
    GC_CUDA(cudaGetLastError());
    std::vector<int32_t> pool(n_blocks), lens(n_all, ctx);
    for (size_t i = 0; i < n_blocks; i++)
        pool[i] = (int32_t)i;
    for (size_t i = n_blocks - 1; i > 0; i--)
        std::swap(pool[i], pool[r.next() % (i + 1)]);
    int32_t *dtable = gc_upload(pool), *dlens = gc_upload(lens);
    std::vector<uint16_t> hq = rand_q(r, (size_t)n_all * n_head * hd);
    uint16_t *dq = gc_upload(hq), *dout;
    GC_CUDA(cudaMalloc(&dout, hq.size() * 2));
    size_t ws = kc_attn_decode_workspace(n_all, n_head, hd, 0);
    ws = std::max(ws, kc_attn_decode_workspace(1, n_head, hd, 0));
    void *dws;
    GC_CUDA(cudaMalloc(&dws, ws));

    const int batches[] = {1, 64, 256};
    for (int b : batches) {
        for (int sp = 0; sp <= 1; sp++) {
            int it = 0;
            double ms = gc_time_ms(
                [&] {
                    int s0 = (it++ * b) % n_all;
                    GC_LAUNCH(kc_attn_decode(nullptr, dout, dq + (size_t)s0 * n_head * hd, dk, dv,
                                             dtable + (size_t)s0 * mb, mb, dlens + s0, b, n_head,
                                             n_kv, hd, scale, 0, sp, dws));
                },
                50);
            double bytes = (double)b * ctx * n_kv * hd * 2 * 2;  // K and V, bf16
            printf("{\"bench\": \"attn_decode\", \"batch\": %d, \"ctx\": %d, \"n_head\": %d, "
                   "\"n_kv_head\": %d, \"head_dim\": %d, \"n_splits\": %d, \"us\": %.2f, "
                   "\"gbs\": %.1f, \"ceiling\": %.1f}\n",
                   b, ctx, n_head, n_kv, hd, sp, ms * 1e3, bytes / (ms * 1e-3) / 1e9, bw);
        }
    }

    // Prefill of one 2048-token prompt (causal): 4 * hd FLOPs per visible
    // (query, key) pair and head, both products counted.
    {
        int32_t cu_h[2] = {0, ctx};
        std::vector<int32_t> cu(cu_h, cu_h + 2);
        int32_t *dcu = gc_upload(cu);
        std::vector<uint16_t> pq = rand_q(r, (size_t)ctx * n_head * hd);
        uint16_t *dpq = gc_upload(pq), *dpo;
        GC_CUDA(cudaMalloc(&dpo, pq.size() * 2));
        int it = 0;
        double ms = gc_time_ms(
            [&] {
                int s0 = it++ % n_all;
                GC_LAUNCH(kc_attn_prefill(nullptr, dpo, dpq, dk, dv, dtable + (size_t)s0 * mb, mb, dcu,
                                          dlens + s0, 1, ctx, n_head, n_kv, hd, scale, 0));
            },
            20);
        double flops = 4.0 * hd * n_head * ((double)ctx * (ctx + 1) / 2);
        printf("{\"bench\": \"attn_prefill\", \"tokens\": %d, \"n_head\": %d, \"n_kv_head\": %d, "
               "\"head_dim\": %d, \"us\": %.2f, \"tflops\": %.1f, \"ceiling\": %.1f}\n",
               ctx, n_head, n_kv, hd, ms * 1e3, flops / (ms * 1e-3) / 1e12, tf);
        cudaFree(dcu);
        cudaFree(dpq);
        cudaFree(dpo);
    }
    fflush(stdout);
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(dtable);
    cudaFree(dlens);
    cudaFree(dq);
    cudaFree(dout);
    cudaFree(dws);
}

int main(void)
{
    gc_require_device("test_attention");
    gc_rng r(0x5eed);
    const std::vector<int> mixed = {1, 15, 16, 17, 1000, 5000};
    const std::vector<int> short_mix = {1, 17, 300, 2100};

    argument_checks();

    // decode: GQA shapes of Llama 3 8B, Qwen2.5 7B; MHA; a window across
    // block edges; every head_dim; groups of 16 and 12 (two CTAs per KV head)
    decode_case(r, "gqa 32/8 hd128", mixed, 32, 8, 128, 0, {1, 0, 3});
    decode_case(r, "gqa 28/4 hd128", mixed, 28, 4, 128, 0, {1, 0});
    decode_case(r, "mha 16/16 hd64", mixed, 16, 16, 64, 0, {1, 0});
    decode_case(r, "gqa 32/8 hd128 window 700", mixed, 32, 8, 128, 700, {1, 0, 5});
    decode_case(r, "mha 8/8 hd64 window 16", mixed, 8, 8, 64, 16, {1, 0});
    decode_case(r, "gqa 8/4 hd80", short_mix, 8, 4, 80, 0, {1, 0});
    decode_case(r, "mha 32/32 hd96 (phi-3)", short_mix, 32, 32, 96, 0, {1, 0});
    decode_case(r, "gqa 8/1 hd256", short_mix, 8, 1, 256, 0, {1, 0});
    decode_case(r, "gqa 16/1 hd128", short_mix, 16, 1, 128, 0, {1, 0});
    decode_case(r, "gqa 12/1 hd64", short_mix, 12, 1, 64, 0, {1, 0});
    decode_case(r, "gqa 32/8 hd128 one 5000-token sequence", {5000}, 32, 8, 128, 0, {0, 1, 16});
    decode_batch_invariance(r);

    // prefill: plain, chunked (earlier context already cached), packed
    // sequences of different lengths, windows, every head_dim
    const std::vector<pseq> packed = {{1, 1},     {64, 64}, {65, 130}, {130, 1000},
                                      {17, 17},   {5, 600}, {200, 200}, {1, 77}};
    prefill_case(r, "plain 200 gqa 32/8 hd128", {{200, 200}}, 32, 8, 128, 0);
    prefill_case(r, "chunked 77 of 300 gqa 32/8 hd128", {{77, 300}}, 32, 8, 128, 0);
    prefill_case(r, "packed gqa 28/4 hd128", packed, 28, 4, 128, 0);
    prefill_case(r, "packed gqa 32/8 hd128 window 50", packed, 32, 8, 128, 50);
    prefill_case(r, "packed mha 8/8 hd64 window 64", packed, 8, 8, 64, 64);
    prefill_case(r, "packed mha 8/8 hd64", packed, 8, 8, 64, 0);
    prefill_case(r, "packed gqa 8/4 hd80", packed, 8, 4, 80, 0);
    prefill_case(r, "packed mha 8/8 hd96 (phi-3)", packed, 8, 8, 96, 0);
    prefill_case(r, "packed gqa 8/1 hd256", packed, 8, 1, 256, 0);
    prefill_case(r, "packed gqa 8/1 hd256 window 40", packed, 8, 1, 256, 40);

    benchmarks(r);
    return gc_finish("test_attention");
}
