// test_init.cu: checks the weight fills of kcuda.h (init.cu) bit for bit:
// kc_fill_dummy_bf16 against the host loop of engine/loader_dummy.c,
// written again here as the reference, and kc_fill_bf16 against a
// constant. Lengths cover n = 1, n not a multiple of 4 (a partial last
// draw), unaligned pointers (the element path) and tensors that start
// mid-stream (the state advanced by the draws of the tensors before, as
// dummy_open records it); buffers are poisoned first. Prints a bandwidth
// line per fill next to the measured ceiling. Exit status as gpu_check.h
// says (2: no device).
#include "tests/gpu/gpu_check.h"

#include <string>

static const uint64_t kGamma = 0x9e3779b97f4a7c15ull;

/* -------------------------------------------------------------- reference */

// engine/loader_dummy.c's mix() and fill_bf16_random, as they are there:
// one stream, four values per draw from the low bits up.
static uint64_t ref_mix(uint64_t *s)
{
    uint64_t z = (*s += kGamma);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void ref_fill(uint16_t *dst, size_t n, uint64_t *rng)
{
    size_t i = 0;
    while (i < n) {
        uint64_t r = ref_mix(rng);
        for (int k = 0; k < 4 && i < n; k++, i++, r >>= 16) {
            unsigned sign = (unsigned)(r >> 15) & 1, exp = 118 + ((unsigned)(r >> 7) & 3);
            dst[i] = (uint16_t)(sign << 15 | exp << 7 | ((unsigned)r & 0x7f));
        }
    }
}

/* ---------------------------------------------------------------- helpers */

// The number of differing elements is the error, bound 0.
static void check_bits(const char *test, const std::string &cas, const std::vector<uint16_t> &got,
                       const std::vector<uint16_t> &want)
{
    size_t bad = 0;
    for (size_t i = 0; i < want.size(); i++)
        bad += got[i] != want[i];
    gc_check(test, cas.c_str(), (double)bad, 0);
}

// A poisoned device buffer of n + 8 elements (the 8 past n stay poisoned:
// a write past the end shows); *base is what to cudaFree, the result is
// off elements in (off = 1: not 8- or 16-byte aligned).
static uint16_t *poisoned(int64_t n, int off, uint16_t **base)
{
    size_t bytes = (size_t)(n + off + 8) * 2;
    GC_CUDA(cudaMalloc(base, bytes));
    gc_poison(*base, bytes);
    return *base + off;
}

// Whether the 8 elements after n are still the poison.
static void check_tail(const char *test, const std::string &cas, const uint16_t *d, int64_t n)
{
    std::vector<uint16_t> tail = gc_download(d + n, 8);
    size_t bad = 0;
    for (uint16_t t : tail)
        bad += t != 0xffff;
    gc_check(test, (cas + " nothing past n").c_str(), (double)bad, 0);
}

/* ------------------------------------------------------------------ tests */

// One tensor of n elements from stream state `state`.
static void test_dummy(int64_t n, uint64_t state, int off, const char *why)
{
    char buf[160];
    snprintf(buf, sizeof buf, "n=%lld state=%016llx off=%d (%s)", (long long)n,
             (unsigned long long)state, off, why);
    std::string cas = buf;
    std::vector<uint16_t> want((size_t)n);
    uint64_t rng = state;
    ref_fill(want.data(), (size_t)n, &rng);
    uint16_t *base, *d = poisoned(n, off, &base);
    GC_LAUNCH(kc_fill_dummy_bf16(nullptr, d, n, state));
    check_bits("fill_dummy_bf16", cas, gc_download(d, (size_t)n), want);
    check_tail("fill_dummy_bf16", cas, d, n);
    GC_CUDA(cudaFree(base));
}

// A model's tensors in order, as dummy_open makes them: the host runs one
// stream through all of them; the device fills each from the state where
// the stream stood at its start, computed (as dummy_open does) from the
// draws before it alone.
static void test_stream(uint64_t seed, const std::vector<int64_t> &sizes)
{
    int64_t total = 0;
    for (int64_t n : sizes)
        total += n;
    std::vector<uint16_t> want((size_t)total);
    uint64_t rng = seed;
    int64_t at = 0;
    for (int64_t n : sizes) {
        ref_fill(want.data() + at, (size_t)n, &rng);
        at += n;
    }
    // Each tensor 64-byte aligned in one buffer, as in the host's mapping.
    std::vector<int64_t> start;
    int64_t elems = 0;
    for (int64_t n : sizes) {
        elems = (elems + 31) / 32 * 32;
        start.push_back(elems);
        elems += n;
    }
    uint16_t *d;
    GC_CUDA(cudaMalloc(&d, (size_t)elems * 2));
    gc_poison(d, (size_t)elems * 2);
    uint64_t state = seed;
    for (size_t t = 0; t < sizes.size(); t++) {
        GC_LAUNCH(kc_fill_dummy_bf16(nullptr, d + start[t], sizes[t], state));
        state += (uint64_t)((sizes[t] + 3) / 4) * kGamma;
    }
    std::vector<uint16_t> all = gc_download(d, (size_t)elems), got((size_t)total);
    at = 0;
    for (size_t t = 0; t < sizes.size(); t++) {
        std::copy(all.begin() + start[t], all.begin() + start[t] + sizes[t], got.begin() + at);
        at += sizes[t];
    }
    char buf[160];
    snprintf(buf, sizeof buf, "%zu tensors in one stream, %lld elements, seed=%llx", sizes.size(),
             (long long)total, (unsigned long long)seed);
    check_bits("fill_dummy_bf16", buf, got, want);
    GC_CUDA(cudaFree(d));
}

static void test_const(int64_t n, uint16_t value, int off)
{
    char buf[120];
    snprintf(buf, sizeof buf, "n=%lld value=%04x off=%d", (long long)n, value, off);
    uint16_t *base, *d = poisoned(n, off, &base);
    GC_LAUNCH(kc_fill_bf16(nullptr, d, n, value));
    check_bits("fill_bf16", buf, gc_download(d, (size_t)n),
               std::vector<uint16_t>((size_t)n, value));
    check_tail("fill_bf16", buf, d, n);
    GC_CUDA(cudaFree(base));
}

// Invalid arguments are refused without a launch; nothing to do is 0.
static void test_args()
{
    uint16_t *d;
    GC_CUDA(cudaMalloc(&d, 64));
    int bad = 0;
    bad += kc_fill_dummy_bf16(nullptr, d, -1, 1) != (int)cudaErrorInvalidValue;
    bad += kc_fill_dummy_bf16(nullptr, nullptr, 4, 1) != (int)cudaErrorInvalidValue;
    bad += kc_fill_dummy_bf16(nullptr, nullptr, 0, 1) != 0;
    bad += kc_fill_bf16(nullptr, d, -1, 0) != (int)cudaErrorInvalidValue;
    bad += kc_fill_bf16(nullptr, nullptr, 4, 0) != (int)cudaErrorInvalidValue;
    bad += kc_fill_bf16(nullptr, nullptr, 0, 0) != 0;
    gc_check("fill_args", "invalid arguments refused, n = 0 a no-op", (double)bad, 0);
    GC_CUDA(cudaFree(d));
}

/* ------------------------------------------------------------- benchmarks */

static void benchmarks()
{
    const double ceiling = kc_measure_bandwidth_gbs((size_t)1 << 30);
    const int64_t n = (int64_t)1 << 29; // 1 GiB of bf16
    uint16_t *d;
    GC_CUDA(cudaMalloc(&d, (size_t)n * 2));
    double ms = gc_time_ms([&] { GC_LAUNCH(kc_fill_dummy_bf16(nullptr, d, n, 12345)); }, 10);
    printf("{\"bench\": \"fill_dummy_bf16\", \"shape\": \"n=%lld\", \"ms\": %.4f, \"gbs\": %.1f, "
           "\"ceiling_gbs\": %.1f}\n",
           (long long)n, ms, 2.0 * n / (ms * 1e-3) / 1e9, ceiling);
    ms = gc_time_ms([&] { GC_LAUNCH(kc_fill_bf16(nullptr, d, n, 0x3f80)); }, 10);
    printf("{\"bench\": \"fill_bf16\", \"shape\": \"n=%lld\", \"ms\": %.4f, \"gbs\": %.1f, "
           "\"ceiling_gbs\": %.1f}\n",
           (long long)n, ms, 2.0 * n / (ms * 1e-3) / 1e9, ceiling);
    fflush(stdout);
    GC_CUDA(cudaFree(d));
}

/* ------------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    (void)argc;
    gc_require_device(argv[0]);

    test_args();

    // A state advanced by 12345 draws on the host, as a tensor deep in the
    // model starts.
    uint64_t mid = 42;
    for (int i = 0; i < 12345; i++)
        ref_mix(&mid);

    test_dummy(1, 0, 0, "one element");
    test_dummy(2, 0, 0, "half a draw");
    test_dummy(3, 7, 0, "three lanes");
    test_dummy(4, 7, 0, "one draw");
    test_dummy(5, 7, 0, "a draw and a lane");
    test_dummy(4099, 0x5eed, 0, "n % 4 = 3");
    test_dummy(4096 * 1024, 0x5eed, 0, "a 4096 x 1024 matrix");
    test_dummy(1000003, mid, 0, "mid-stream, n % 4 = 3");
    test_dummy(4096 + 2, mid, 1, "unaligned, mid-stream");
    test_dummy(7, ~0ull, 1, "unaligned, state wraps");
    test_dummy((int64_t)128256 * 64, 0xffffffffffff0000ull, 0, "embedding-shaped, wraps");

    // sizes of a small model's tensors, some not multiples of 4
    test_stream(0, {4096 * 8, 1, 3, 4096, 5, 1001, 4096 * 3 + 2, 14336});
    test_stream(0x123456789abcdefull, {7, 7, 7, 7, 1 << 20, 9});

    const uint16_t one = 0x3f80, zero = 0;
    test_const(1, one, 0);
    test_const(7, one, 0);
    test_const(8, one, 0);
    test_const(4096 + 3, one, 1);
    test_const(1000003, zero, 0);
    test_const(4096, zero, 1);

    benchmarks();
    return gc_finish(argv[0]);
}
