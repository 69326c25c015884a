// test_gemm.cu: kc_gemm (y = x W^T through cuBLASLt, kcuda.h) against a
// CPU fp32 reference at the model shapes inferd runs, its deterministic
// mode's promise (a row's bits do not depend on the batch), and its speed
// next to the ceilings measured on the same device. One JSON line per
// check and per benchmark on stdout (gpu_check.h); tests/gpu/run.sh runs it.
#include <algorithm>
#include <thread>

#include "tests/gpu/gpu_check.h"

static const double BOUND = 1e-2; // bf16 output rounding alone is ~1e-3 rms
static const int64_t M_MAX = 2048;

// ----------------------------------------------------------------- inputs

// Random bf16 in [-1, 1) made on the device from a hash of the index; the
// host reference downloads exactly these values.
__global__ void fill_bf16(uint16_t *p, size_t n, uint64_t seed)
{
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        uint64_t z = (i + 1) * 0x9e3779b97f4a7c15ull + seed * 0xd1b54a32d192ed03ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        p[i] = __bfloat16_as_ushort(__float2bfloat16_rn(2.0f * u - 1.0f));
    }
}

static uint16_t *alloc_random(size_t n, uint64_t seed)
{
    uint16_t *d = nullptr;
    GC_CUDA(cudaMalloc(&d, n * sizeof(uint16_t) + 16));
    fill_bf16<<<1024, 256>>>(d, n, seed);
    GC_CUDA(cudaGetLastError());
    return d;
}

// ----------------------------------------------------------- the reference

// One fp32 dot product with eight partial sums: the compiler vectorizes
// it (a single running sum it may not reorder), and the error stays far
// under the bf16 rounding the bound is sized for.
static inline float dot(const float *a, const float *b, int64_t k)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= k; i += 8)
        for (int j = 0; j < 8; j++)
            acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < k; i++)
        s += a[i] * b[i];
    return s;
}

// want[(r, j)] = x[rows[r]] . w[j], for the listed rows, on every core:
// each thread takes a band of W's rows and dots each with all listed x
// rows, so a W row is read from memory once.
static std::vector<float> cpu_ref(const std::vector<float> &x, const std::vector<float> &w,
                                  int64_t n, int64_t k, const std::vector<int64_t> &rows)
{
    std::vector<float> want(rows.size() * (size_t)n);
    unsigned nt = std::max(1u, std::min(64u, std::thread::hardware_concurrency()));
    std::vector<std::thread> th;
    for (unsigned t = 0; t < nt; t++)
        th.emplace_back([&, t] {
            int64_t j0 = n * t / nt, j1 = n * (t + 1) / nt;
            for (int64_t j = j0; j < j1; j++)
                for (size_t r = 0; r < rows.size(); r++)
                    want[r * n + j] = dot(&x[(size_t)rows[r] * k], &w[(size_t)j * k], k);
        });
    for (auto &t : th)
        t.join();
    return want;
}

// The rows of y the reference computes: all of them when that is at most
// 2^31 multiply-adds, else the first, the last and 14 drawn at random.
static std::vector<int64_t> pick_rows(int64_t m, int64_t n, int64_t k, gc_rng &rng)
{
    std::vector<int64_t> rows;
    if ((double)m * n * k <= 2147483648.0 || m <= 16) {
        for (int64_t r = 0; r < m; r++)
            rows.push_back(r);
        return rows;
    }
    rows.push_back(0);
    rows.push_back(m - 1);
    while (rows.size() < 16) {
        int64_t r = (int64_t)(rng.next() % (uint64_t)m);
        if (std::find(rows.begin(), rows.end(), r) == rows.end())
            rows.push_back(r);
    }
    std::sort(rows.begin(), rows.end());
    return rows;
}

// ||y[rows] - want|| / ||want||, INFINITY when any element of the whole
// output is not finite (the poison left where nothing was written).
static double rows_err(const std::vector<uint16_t> &y, int64_t n,
                       const std::vector<int64_t> &rows, const std::vector<float> &want)
{
    for (uint16_t h : y)
        if ((h & 0x7f80) == 0x7f80)
            return INFINITY;
    std::vector<float> got(rows.size() * (size_t)n);
    for (size_t r = 0; r < rows.size(); r++)
        for (int64_t j = 0; j < n; j++)
            got[r * n + j] = gc_bf16_to_f32(y[(size_t)rows[r] * n + j]);
    return gc_rel_err(got.data(), want.data(), got.size());
}

// Runs one product into a poisoned y and returns it, or an empty vector
// when the launcher failed (logged; the caller records a failed check).
static std::vector<uint16_t> run_gemm(struct kc_gemm *g, uint16_t *y, const uint16_t *x,
                                      const uint16_t *w, int64_t m, int64_t n, int64_t k)
{
    gc_poison(y, (size_t)m * n * sizeof(uint16_t));
    int rc = kc_gemm(g, 0, y, x, w, m, n, k);
    if (rc != 0) {
        fprintf(stderr, "kc_gemm(m=%lld, n=%lld, k=%lld) returned %d (%s)\n", (long long)m,
                (long long)n, (long long)k, rc, kc_error_string(rc));
        return {};
    }
    return gc_download(y, (size_t)m * n);
}

// Elements of y's first `rows` rows whose bits differ from base's.
static size_t bit_diffs(const std::vector<uint16_t> &y, const std::vector<uint16_t> &base,
                        int64_t rows, int64_t n)
{
    size_t d = 0;
    for (size_t i = 0; i < (size_t)rows * n; i++)
        d += y[i] != base[i];
    return d;
}

// --------------------------------------------------------------- accuracy

// One (n, k): every m against the reference in both modes, then the
// deterministic mode's rows against its m = 256 result, bit for bit (x for
// a smaller m is the first rows of x for a larger one, so row r is the
// same problem in every batch).
static void check_shape(struct kc_gemm *gdef, struct kc_gemm *gdet, int64_t n, int64_t k, uint64_t seed)
{
    const int64_t ms[] = {256, 1, 7, 64, 2048}; // 256 first: the invariance baseline
    const int64_t base_m = 256;
    uint16_t *w = alloc_random((size_t)n * k, seed);
    uint16_t *x = alloc_random((size_t)M_MAX * k, seed + 1);
    uint16_t *y = nullptr;
    GC_CUDA(cudaMalloc(&y, (size_t)M_MAX * n * sizeof(uint16_t)));
    std::vector<float> wf = gc_to_f32(gc_download(w, (size_t)n * k));
    std::vector<float> xf = gc_to_f32(gc_download(x, (size_t)M_MAX * k));
    gc_rng rng(seed);
    std::vector<uint16_t> base_det, base_def;
    char cas[160];

    for (int64_t m : ms) {
        std::vector<int64_t> rows = pick_rows(m, n, k, rng);
        std::vector<float> want = cpu_ref(xf, wf, n, k, rows);
        for (int det = 0; det < 2; det++) {
            std::vector<uint16_t> got = run_gemm(det ? gdet : gdef, y, x, w, m, n, k);
            snprintf(cas, sizeof cas, "%s m=%lld n=%lld k=%lld rows=%zu", det ? "det" : "default",
                     (long long)m, (long long)n, (long long)k, rows.size());
            gc_check("gemm", cas, got.empty() ? INFINITY : rows_err(got, n, rows, want), BOUND);
            if (got.empty())
                continue;
            std::vector<uint16_t> &base = det ? base_det : base_def;
            if (m == base_m) {
                base = got;
                continue;
            }
            if (base.empty())
                continue;
            int64_t r = std::min(m, base_m);
            double frac = (double)bit_diffs(got, base, r, n) / (double)(r * n);
            if (det) {
                // The promise: 0 differing elements (the "rel_err" here is
                // the fraction of elements whose bits differ).
                snprintf(cas, sizeof cas, "det rows 0..%lld of m=%lld == m=%lld, n=%lld k=%lld",
                         (long long)r - 1, (long long)m, (long long)base_m, (long long)n,
                         (long long)k);
                gc_check("gemm_batch_invariant", cas, frac, 0.0);
            } else {
                // Default mode promises nothing here; recorded to show what
                // deterministic mode buys.
                printf("{\"info\": \"gemm_default_batch_variance\", \"m\": %lld, \"n\": %lld, "
                       "\"k\": %lld, \"differing_fraction\": %.3e}\n",
                       (long long)m, (long long)n, (long long)k, frac);
                fflush(stdout);
            }
        }
    }
    cudaFree(y);
    cudaFree(x);
    cudaFree(w);
}

// Views that are not 16-byte aligned (x and y one element in, k and n odd,
// so rows start anywhere) and the degenerate sizes.
static void check_edges(struct kc_gemm *gdef, struct kc_gemm *gdet)
{
    const int64_t m = 7, n = 1001, k = 1003;
    uint16_t *w = alloc_random((size_t)n * k, 77);
    uint16_t *x = alloc_random((size_t)m * k + 1, 78);
    uint16_t *y = nullptr;
    GC_CUDA(cudaMalloc(&y, ((size_t)m * n + 1) * sizeof(uint16_t)));
    std::vector<float> wf = gc_to_f32(gc_download(w, (size_t)n * k));
    std::vector<float> xall = gc_to_f32(gc_download(x, (size_t)m * k + 1));
    std::vector<float> xf(xall.begin() + 1, xall.end());
    gc_rng rng(79);
    std::vector<int64_t> rows = pick_rows(m, n, k, rng);
    std::vector<float> want = cpu_ref(xf, wf, n, k, rows);
    for (int det = 0; det < 2; det++) {
        std::vector<uint16_t> got = run_gemm(det ? gdet : gdef, y + 1, x + 1, w, m, n, k);
        gc_check("gemm", det ? "det misaligned m=7 n=1001 k=1003" : "default misaligned m=7 n=1001 k=1003",
                 got.empty() ? INFINITY : rows_err(got, n, rows, want), BOUND);
    }

    // k = 0: an empty sum, y = 0 everywhere it covers.
    gc_poison(y, (size_t)m * n * sizeof(uint16_t));
    int rc = kc_gemm(gdef, 0, y, x, w, m, n, 0);
    std::vector<uint16_t> z = gc_download(y, (size_t)m * n);
    size_t nonzero = 0;
    for (uint16_t h : z)
        nonzero += h != 0;
    gc_check("gemm_args", "k=0 gives zeros", rc != 0 ? INFINITY : (double)nonzero, 0.0);
    // m = 0 is an empty batch; negative sizes and no handle are refused.
    gc_check("gemm_args", "m=0 returns 0", kc_gemm(gdef, 0, y, x, w, 0, n, k) == 0 ? 0 : 1, 0.0);
    gc_check("gemm_args", "m<0 is cudaErrorInvalidValue",
             kc_gemm(gdef, 0, y, x, w, -1, n, k) == (int)cudaErrorInvalidValue ? 0 : 1, 0.0);
    gc_check("gemm_args", "NULL handle is cudaErrorInvalidValue",
             kc_gemm(nullptr, 0, y, x, w, m, n, k) == (int)cudaErrorInvalidValue ? 0 : 1, 0.0);
    gc_check("gemm_args", "odd pointer is cudaErrorInvalidValue",
             kc_gemm(gdef, 0, y, (const kc_bf16 *)((const char *)x + 1), w, m, n, k) ==
                     (int)cudaErrorInvalidValue
                 ? 0
                 : 1,
             0.0);
    cudaFree(y);
    cudaFree(x);
    cudaFree(w);
}

// -------------------------------------------------------------- benchmark

static double median(std::vector<double> v)
{
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

// Weight-streaming figures at decode and prefill batch sizes. A small W
// fits in the 50-60 MB L2, and timing one W over and over would measure
// the cache: the launches rotate over enough copies of W to read at least
// 256 MB per timed sample. Each sample is one rotation between events;
// the median over samples is kept.
static void bench_shape(struct kc_gemm *gdef, struct kc_gemm *gdet, int64_t n, int64_t k, double ceil_tf,
                        double ceil_gbs)
{
    const int64_t ms[] = {1, 8, 64, 256, 2048};
    const int samples = 15;
    size_t wbytes = (size_t)n * k * sizeof(uint16_t);
    int copies = (int)std::max<size_t>(1, ((size_t)256 << 20) / wbytes + 1);
    std::vector<uint16_t *> w(copies);
    for (int c = 0; c < copies; c++)
        w[c] = alloc_random((size_t)n * k, 1000 + c);
    uint16_t *x = alloc_random((size_t)M_MAX * k, 999);
    uint16_t *y = nullptr;
    GC_CUDA(cudaMalloc(&y, (size_t)M_MAX * n * sizeof(uint16_t)));
    cudaEvent_t a, b;
    GC_CUDA(cudaEventCreate(&a));
    GC_CUDA(cudaEventCreate(&b));
    for (int det = 0; det < 2; det++) {
        struct kc_gemm *g = det ? gdet : gdef;
        for (int64_t m : ms) {
            bool ok = true;
            std::vector<double> per_launch;
            for (int s = -1; s < samples && ok; s++) { // s = -1: warmup
                GC_CUDA(cudaEventRecord(a, 0));
                for (int c = 0; c < copies && ok; c++)
                    ok = kc_gemm(g, 0, y, x, w[c], m, n, k) == 0;
                GC_CUDA(cudaEventRecord(b, 0));
                GC_CUDA(cudaEventSynchronize(b));
                float ms_ = 0;
                GC_CUDA(cudaEventElapsedTime(&ms_, a, b));
                if (s >= 0)
                    per_launch.push_back(ms_ / copies);
            }
            if (!ok) {
                gc_check("gemm_bench", "kc_gemm failed while timing", INFINITY, 0.0);
                continue;
            }
            double t = median(per_launch) * 1e-3;
            double tflops = 2.0 * m * n * k / t / 1e12;
            double gbs = (double)wbytes / t / 1e9;
            printf("{\"bench\": \"gemm\", \"mode\": \"%s\", \"m\": %lld, \"n\": %lld, \"k\": %lld, "
                   "\"us\": %.2f, \"tflops\": %.2f, \"gbs\": %.1f, \"ceiling_tflops\": %.1f, "
                   "\"ceiling_gbs\": %.1f}\n",
                   det ? "det" : "default", (long long)m, (long long)n, (long long)k, t * 1e6,
                   tflops, gbs, ceil_tf, ceil_gbs);
            fflush(stdout);
        }
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cudaFree(y);
    cudaFree(x);
    for (auto p : w)
        cudaFree(p);
}

int main()
{
    gc_require_device("test_gemm");
    // Each algorithm kc_gemm picks goes to stderr (tests.log under run.sh):
    // the first thing to read when the batch-invariance check fails.
    setenv("INFERD_GEMM_LOG", "1", 0);
    struct kc_gemm *gdef = kc_gemm_create(0);
    struct kc_gemm *gdet = kc_gemm_create(1);
    gc_check("gemm_args", "kc_gemm_create(0) and (1) succeed", gdef && gdet ? 0 : 1, 0.0);
    if (!gdef || !gdet)
        return gc_finish("test_gemm");

    // Llama-3-8B's projections (q, fused qkv, gate or up, down) and
    // Qwen2-1.5B's LM head (n = vocabulary: 151936 x 1536).
    const int64_t shapes[][2] = {{4096, 4096}, {14336, 4096}, {4096, 14336}, {6144, 4096}, {151936, 1536}};
    uint64_t seed = 1;
    for (auto &s : shapes)
        check_shape(gdef, gdet, s[0], s[1], seed += 10);
    check_edges(gdef, gdet);

    double ceil_gbs = kc_measure_bandwidth_gbs((size_t)4 << 30);
    double ceil_tf = kc_measure_bf16_tflops(8192, 8192, 8192);
    printf("{\"bench\": \"ceiling\", \"gbs\": %.1f, \"tflops\": %.1f}\n", ceil_gbs, ceil_tf);
    gc_check("ceiling", "kc_measure_bandwidth_gbs(4 GiB) > 0", ceil_gbs > 0 ? 0 : 1, 0.0);
    gc_check("ceiling", "kc_measure_bf16_tflops(8192^3) > 0", ceil_tf > 0 ? 0 : 1, 0.0);
    // The 8B model's four projection shapes and its LM head (128256 x 4096).
    const int64_t bench[][2] = {{4096, 4096}, {6144, 4096}, {14336, 4096}, {4096, 14336}, {128256, 4096}};
    for (auto &s : bench)
        bench_shape(gdef, gdet, s[0], s[1], ceil_tf, ceil_gbs);

    kc_gemm_destroy(gdet);
    kc_gemm_destroy(gdef);
    return gc_finish("test_gemm");
}
