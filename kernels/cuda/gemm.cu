// gemm.cu: y = x W^T on the tensor cores through cuBLASLt (kcuda.h).
// A kc_gemm owns one cuBLASLt handle, one 32 MiB device workspace and a
// host hash table of the algorithm chosen per shape; it is used by one
// thread (the engine's) on one stream at a time, since calls share the
// workspace. In deterministic mode every m of a given (n, k) runs the same
// algorithm with no split-K, so a row's result does not depend on the batch.
// INFERD_GEMM_LOG=1 in the environment prints each choice to stderr.
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/kcuda.h"

// The layout mapping, once. cuBLASLt is column-major; a row-major (r, c)
// matrix with leading dimension c is, byte for byte, the column-major
// (c, r) matrix with leading dimension c, i.e. its transpose. So:
//   x (m, k) row-major  = column-major k x m, ld k: x^T  -> B, op N
//   W (n, k) row-major  = column-major k x n, ld k: W^T  -> A, op T (gives W)
//   y (m, n) row-major  = column-major n x m, ld n: y^T  -> D (and C)
// and D = op(A) op(B) = W x^T = (x W^T)^T = y^T, which in row-major bytes is
// y. Both operands are K-major ("TN"), the layout Hopper's bf16 kernels are
// built for (TMA loads of K-contiguous tiles on both sides).

#define KC_GEMM_WORKSPACE ((size_t)32 << 20)

// What deterministic mode guarantees. Within one kc_gemm (so one process,
// one device, one cuBLASLt build), for a given (n, k) and buffers of the
// same alignment class (16-byte aligned, as cudaMalloc and the engine's
// slab give): row r of y is bit-identical whatever m is and whatever the
// other rows of x hold. Why: every m runs the same algorithm (same kernel,
// tile, stages, cluster shape), with split-K off (SPLITK_NUM 1) and no
// reduction scheme, so each output element is summed by one CTA over k in
// the order the kernel fixes, which depends on the tile's k-depth, not on
// m; m only changes how many CTAs run. Not guaranteed: equality across
// cuBLAS versions, GPU models, or with default mode; and the heuristic's
// choice is not promised to be the same in another process, so two
// processes agree only if they pick the same algorithm (INFERD_GEMM_LOG
// shows it). tests/gpu/test_gemm.cu checks the promise bit for bit: rows
// of m = 1, 7, 64 and 2048 against m = 256.
//
// Deterministic mode picks one algorithm per (n, k) by asking the heuristic
// at this m, and runs it for every m. 256 sits just past the ridge point of
// bf16 on an H200 (~200 FLOP per weight byte): the kernel chosen there is
// sized for the boundary between decode (memory-bound, wants many CTAs) and
// prefill (compute-bound, wants big tiles), a compromise for both. The
// choice is made the same way whichever m arrives first.
#define KC_GEMM_DET_REF_M 256

// Candidates asked of the heuristic in deterministic mode, to find one
// that runs without split-K and accepts m = 1.
#define KC_GEMM_DET_CANDIDATES 16

// ------------------------------------------------------------------ errors

// cuBLASLt statuses become CUDA error codes, the launchers' return type
// (kc_error_string reads them); the status itself is logged with file:line.
static int kc_lt_error(cublasStatus_t st, const char *what, const char *file, int line)
{
    fprintf(stderr, "%s:%d: %s: %s\n", file, line, what, cublasLtGetStatusString(st));
    switch (st) {
    case CUBLAS_STATUS_ALLOC_FAILED:
        return (int)cudaErrorMemoryAllocation;
    case CUBLAS_STATUS_INVALID_VALUE:
        return (int)cudaErrorInvalidValue;
    case CUBLAS_STATUS_NOT_SUPPORTED:
    case CUBLAS_STATUS_ARCH_MISMATCH:
        return (int)cudaErrorNotSupported;
    case CUBLAS_STATUS_NOT_INITIALIZED:
        return (int)cudaErrorInitializationError;
    case CUBLAS_STATUS_EXECUTION_FAILED: {
        cudaError_t e = cudaGetLastError(); // the launch error behind it, if any
        return (int)(e != cudaSuccess ? e : cudaErrorLaunchFailure);
    }
    default:
        return (int)cudaErrorUnknown;
    }
}

// Both macros set rc and jump to the function's fail label; every function
// using them declares rc and its other locals before the first use.
#define KC_LT_CHECK(call)                                                                    \
    do {                                                                                     \
        cublasStatus_t st_ = (call);                                                         \
        if (st_ != CUBLAS_STATUS_SUCCESS) {                                                  \
            rc = kc_lt_error(st_, #call, __FILE__, __LINE__);                                \
            goto fail;                                                                       \
        }                                                                                    \
    } while (0)

#define KC_CUDA_CHECK(call)                                                                  \
    do {                                                                                     \
        cudaError_t e_ = (call);                                                             \
        if (e_ != cudaSuccess) {                                                             \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                    \
                    cudaGetErrorString(e_));                                                 \
            rc = (int)e_;                                                                    \
            goto fail;                                                                       \
        }                                                                                    \
    } while (0)

// -------------------------------------------------------- algorithm cache

// One chosen algorithm. The key is the shape and the pointers' alignment
// class: the heuristic is told the alignment (below), so an algorithm
// chosen for 16-byte aligned buffers is not reused for a misaligned view.
// m == 0 marks deterministic mode's per-(n, k) choice (kc_gemm never looks
// up m == 0: an empty product returns early).
struct kc_gemm_entry {
    int64_t m, n, k;
    int32_t align; // 2, 4, 8 or 16 bytes
    int32_t used;
    size_t ws;     // workspace bytes the algorithm needs (<= KC_GEMM_WORKSPACE)
    cublasLtMatmulAlgo_t algo;
};

struct kc_gemm {
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t op; // bf16 x bf16 -> bf16, fp32 compute, A transposed
    void *workspace;         // KC_GEMM_WORKSPACE bytes on the device
    int deterministic;
    int log;
    struct kc_gemm_entry *tab; // open addressing, linear probing
    size_t cap, n_used;        // cap a power of two, n_used <= cap / 2
};

static size_t kc_gemm_hash(int64_t m, int64_t n, int64_t k, int32_t align)
{
    uint64_t h = (uint64_t)m * 0x9e3779b97f4a7c15ull;
    h ^= (uint64_t)n + 0x632be59bd9b4e019ull + (h << 6) + (h >> 2);
    h ^= (uint64_t)k + 0x8cb92ba72f3d8dd7ull + (h << 6) + (h >> 2);
    h ^= (uint64_t)align + (h << 6) + (h >> 2);
    h ^= h >> 31;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 29;
    return (size_t)h;
}

static struct kc_gemm_entry *kc_gemm_find(struct kc_gemm *g, int64_t m, int64_t n, int64_t k,
                                          int32_t align)
{
    size_t mask = g->cap - 1;
    for (size_t i = kc_gemm_hash(m, n, k, align) & mask;; i = (i + 1) & mask) {
        struct kc_gemm_entry *e = &g->tab[i];
        if (!e->used)
            return NULL;
        if (e->m == m && e->n == n && e->k == k && e->align == align)
            return e;
    }
}

// Inserts a copy of *src; returns 0 or cudaErrorMemoryAllocation.
static int kc_gemm_insert(struct kc_gemm *g, const struct kc_gemm_entry *src)
{
    if ((g->n_used + 1) * 2 > g->cap) {
        size_t cap = g->cap * 2;
        struct kc_gemm_entry *t = (struct kc_gemm_entry *)calloc(cap, sizeof *t);
        if (!t)
            return (int)cudaErrorMemoryAllocation;
        for (size_t i = 0; i < g->cap; i++) {
            if (!g->tab[i].used)
                continue;
            const struct kc_gemm_entry *e = &g->tab[i];
            size_t j = kc_gemm_hash(e->m, e->n, e->k, e->align) & (cap - 1);
            while (t[j].used)
                j = (j + 1) & (cap - 1);
            t[j] = *e; // the algo is plain data, meant to be copied
        }
        free(g->tab);
        g->tab = t;
        g->cap = cap;
    }
    size_t mask = g->cap - 1;
    size_t i = kc_gemm_hash(src->m, src->n, src->k, src->align) & mask;
    while (g->tab[i].used)
        i = (i + 1) & mask;
    g->tab[i] = *src;
    g->tab[i].used = 1;
    g->n_used++;
    return 0;
}

// ----------------------------------------------------- layouts, heuristic

// The three layouts of one shape (see the mapping at the top), in storage
// the caller owns: Init writes into it, nothing is allocated.
struct kc_gemm_layouts {
    cublasLtMatrixLayoutOpaque_t a, b, d;
};

static cublasStatus_t kc_gemm_layouts_init(struct kc_gemm_layouts *l, int64_t m, int64_t n,
                                           int64_t k)
{
    cublasStatus_t st;
    st = cublasLtMatrixLayoutInit(&l->a, CUDA_R_16BF, (uint64_t)k, (uint64_t)n, k); // W^T
    if (st != CUBLAS_STATUS_SUCCESS)
        return st;
    st = cublasLtMatrixLayoutInit(&l->b, CUDA_R_16BF, (uint64_t)k, (uint64_t)m, k); // x^T
    if (st != CUBLAS_STATUS_SUCCESS)
        return st;
    return cublasLtMatrixLayoutInit(&l->d, CUDA_R_16BF, (uint64_t)n, (uint64_t)m, n); // y^T
}

static void kc_gemm_log(const struct kc_gemm *g, const char *what, int64_t m, int64_t n,
                        int64_t k, int align, const cublasLtMatmulAlgo_t *algo, size_t ws,
                        float waves)
{
    if (!g->log)
        return;
    int32_t id = -1, splitk = -1;
    uint32_t tile = 0, red = 0, swz = 0, custom = 0, stages = 0;
    uint16_t cluster = 0, inner = 0;
    size_t wr;
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof id, &wr);
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile, &wr);
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof splitk, &wr);
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red, sizeof red, &wr);
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &swz, sizeof swz, &wr);
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &custom, sizeof custom, &wr);
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages, &wr);
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID, &inner, sizeof inner, &wr);
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster, sizeof cluster, &wr);
    fprintf(stderr,
            "kc_gemm[%s]: %s m=%lld n=%lld k=%lld align=%d: algo %d tile %u stages %u splitk %d "
            "reduction %u swizzle %u custom %u inner %u cluster %u ws %zu waves %.2f\n",
            g->deterministic ? "det" : "default", what, (long long)m, (long long)n, (long long)k,
            align, (int)id, tile, stages, (int)splitk, red, swz, custom, (unsigned)inner,
            (unsigned)cluster, ws, (double)waves);
}

// True when the algorithm reduces over k in one pass: no split-K and no
// reduction scheme (each output element is summed by one CTA, in the
// kernel's fixed k order).
static int kc_gemm_single_pass(const cublasLtMatmulAlgo_t *algo)
{
    int32_t splitk = 0;
    uint32_t red = 0xffffffffu;
    size_t wr;
    if (cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk,
                                             sizeof splitk, &wr) != CUBLAS_STATUS_SUCCESS)
        return 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red,
                                             sizeof red, &wr) != CUBLAS_STATUS_SUCCESS)
        return 0;
    return splitk <= 1 && red == CUBLASLT_REDUCTION_SCHEME_NONE;
}

// Whether algo runs at shape (m, n, k); *ws gets the workspace it needs.
static cublasStatus_t kc_gemm_check(struct kc_gemm *g, const cublasLtMatmulAlgo_t *algo,
                                    int64_t m, int64_t n, int64_t k, size_t *ws)
{
    struct kc_gemm_layouts l;
    cublasLtMatmulHeuristicResult_t r;
    cublasStatus_t st = kc_gemm_layouts_init(&l, m, n, k);
    if (st != CUBLAS_STATUS_SUCCESS)
        return st;
    memset(&r, 0, sizeof r);
    st = cublasLtMatmulAlgoCheck(g->lt, g->op, &l.a, &l.b, &l.d, &l.d, algo, &r);
    if (st == CUBLAS_STATUS_SUCCESS && r.workspaceSize > KC_GEMM_WORKSPACE)
        st = CUBLAS_STATUS_NOT_SUPPORTED;
    *ws = r.workspaceSize;
    return st;
}

// Asks the heuristic for shape (m, n, k) with buffers aligned to align
// bytes. Default mode takes its first answer, excluding reductions in
// bf16: split-K is allowed only when the partial sums meet in fp32
// (REDUCTION_SCHEME_COMPUTE_TYPE), so accumulation stays fp32 throughout.
// Deterministic mode asks with REDUCTION_SCHEME_NONE only, and takes the
// first answer that is single-pass (checked on the algorithm itself, not
// trusted from the preference) and also accepts m = 1.
static int kc_gemm_choose(struct kc_gemm *g, int64_t m, int64_t n, int64_t k, int32_t align,
                          struct kc_gemm_entry *out)
{
    int rc = 0, count = 0, found = -1;
    cublasLtMatmulPreference_t pref = NULL;
    struct kc_gemm_layouts l;
    cublasLtMatmulHeuristicResult_t res[KC_GEMM_DET_CANDIDATES];
    uint64_t ws_max = KC_GEMM_WORKSPACE;
    uint32_t mask = g->deterministic
                        ? (uint32_t)CUBLASLT_REDUCTION_SCHEME_NONE
                        : (uint32_t)(CUBLASLT_REDUCTION_SCHEME_NONE |
                                     CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE);
    uint32_t al = (uint32_t)align;
    int want = g->deterministic ? KC_GEMM_DET_CANDIDATES : 1;

    memset(res, 0, sizeof res);
    KC_LT_CHECK(kc_gemm_layouts_init(&l, m, n, k));
    KC_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    KC_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                     &ws_max, sizeof ws_max));
    KC_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask, sizeof mask));
    // The heuristic assumes 256-byte aligned buffers unless told otherwise;
    // kc_gemm is handed views into larger buffers, so say what they are.
    KC_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al, sizeof al));
    KC_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al, sizeof al));
    KC_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al, sizeof al));
    KC_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al, sizeof al));
    KC_LT_CHECK(cublasLtMatmulAlgoGetHeuristic(g->lt, g->op, &l.a, &l.b, &l.d, &l.d, pref, want,
                                               res, &count));
    for (int i = 0; i < count && found < 0; i++) {
        size_t ws1 = 0;
        if (res[i].state != CUBLAS_STATUS_SUCCESS || res[i].workspaceSize > KC_GEMM_WORKSPACE)
            continue;
        if (g->deterministic &&
            (!kc_gemm_single_pass(&res[i].algo) ||
             kc_gemm_check(g, &res[i].algo, 1, n, k, &ws1) != CUBLAS_STATUS_SUCCESS))
            continue;
        found = i;
    }
    if (found < 0) {
        fprintf(stderr, "%s:%d: kc_gemm: no cuBLASLt algorithm for m=%lld n=%lld k=%lld align=%d%s\n",
                __FILE__, __LINE__, (long long)m, (long long)n, (long long)k, (int)align,
                g->deterministic ? " (deterministic: single-pass, valid at m=1)" : "");
        rc = (int)cudaErrorNotSupported;
        goto fail;
    }
    memset(out, 0, sizeof *out);
    out->m = m;
    out->n = n;
    out->k = k;
    out->align = align;
    out->ws = res[found].workspaceSize;
    out->algo = res[found].algo;
    kc_gemm_log(g, "heuristic", m, n, k, align, &out->algo, out->ws, res[found].wavesCount);
fail:
    if (pref)
        cublasLtMatmulPreferenceDestroy(pref);
    return rc;
}

// The algorithm for shape (m, n, k) at an alignment class, from the cache
// or chosen now (host work only: safe while a CUDA graph is captured).
// Deterministic mode: the (n, k) choice is made at KC_GEMM_DET_REF_M and
// kept under m = 0; each m then re-uses that algorithm after
// cublasLtMatmulAlgoCheck confirms it runs at that m. If it does not, the
// call fails rather than run another algorithm and break the promise.
static int kc_gemm_lookup(struct kc_gemm *g, int64_t m, int64_t n, int64_t k, int32_t align,
                          const struct kc_gemm_entry **out)
{
    int rc;
    struct kc_gemm_entry e;
    const struct kc_gemm_entry *e0;

    if ((*out = kc_gemm_find(g, m, n, k, align)) != NULL)
        return 0;
    if (!g->deterministic) {
        if ((rc = kc_gemm_choose(g, m, n, k, align, &e)) != 0)
            return rc;
    } else {
        if ((e0 = kc_gemm_find(g, 0, n, k, align)) == NULL) {
            if ((rc = kc_gemm_choose(g, KC_GEMM_DET_REF_M, n, k, align, &e)) != 0)
                return rc;
            e.m = 0;
            if ((rc = kc_gemm_insert(g, &e)) != 0)
                return rc;
            e0 = kc_gemm_find(g, 0, n, k, align);
        }
        e = *e0;
        e.m = m;
        cublasStatus_t st = kc_gemm_check(g, &e.algo, m, n, k, &e.ws);
        if (st != CUBLAS_STATUS_SUCCESS) {
            fprintf(stderr, "kc_gemm: deterministic algorithm for n=%lld k=%lld does not run at m=%lld\n",
                    (long long)n, (long long)k, (long long)m);
            return kc_lt_error(st, "cublasLtMatmulAlgoCheck", __FILE__, __LINE__);
        }
        kc_gemm_log(g, "reuse", m, n, k, align, &e.algo, e.ws, 0.0f);
    }
    if ((rc = kc_gemm_insert(g, &e)) != 0)
        return rc;
    *out = kc_gemm_find(g, m, n, k, align);
    return 0;
}

// ------------------------------------------------------------- public API

extern "C" struct kc_gemm *kc_gemm_create(int deterministic)
{
    int rc = 0;
    int32_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const char *env = getenv("INFERD_GEMM_LOG");
    struct kc_gemm *g = (struct kc_gemm *)calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->deterministic = deterministic != 0;
    g->log = env && env[0] && strcmp(env, "0") != 0;
    g->cap = 64;
    g->tab = (struct kc_gemm_entry *)calloc(g->cap, sizeof *g->tab);
    if (!g->tab)
        goto fail;
    KC_LT_CHECK(cublasLtCreate(&g->lt));
    KC_LT_CHECK(cublasLtMatmulDescCreate(&g->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    KC_LT_CHECK(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    KC_LT_CHECK(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    KC_CUDA_CHECK(cudaMalloc(&g->workspace, KC_GEMM_WORKSPACE));
    return g;
fail:
    fprintf(stderr, "kc_gemm_create: %s\n", rc ? cudaGetErrorString((cudaError_t)rc) : "out of memory");
    kc_gemm_destroy(g);
    return NULL;
}

extern "C" void kc_gemm_destroy(struct kc_gemm *g)
{
    if (!g)
        return;
    if (g->workspace)
        cudaFree(g->workspace);
    if (g->op)
        cublasLtMatmulDescDestroy(g->op);
    if (g->lt)
        cublasLtDestroy(g->lt);
    free(g->tab);
    free(g);
}

// The alignment class of the three buffers: the largest of 16, 8, 4, 2
// bytes that divides every address (0 when one is not even 2-aligned).
static int32_t kc_gemm_align(const void *a, const void *b, const void *c)
{
    uintptr_t v = (uintptr_t)a | (uintptr_t)b | (uintptr_t)c;
    for (int32_t al = 16; al >= 2; al >>= 1)
        if ((v & (uintptr_t)(al - 1)) == 0)
            return al;
    return 0;
}

extern "C" int kc_gemm(struct kc_gemm *g, kc_stream s, kc_bf16 *y, const kc_bf16 *x,
                       const kc_bf16 *w, int64_t m, int64_t n, int64_t k)
{
    int rc = 0;
    int32_t align;
    const struct kc_gemm_entry *e = NULL;
    struct kc_gemm_layouts l;
    const float alpha = 1.0f, beta = 0.0f;

    if (!g || m < 0 || n < 0 || k < 0)
        return (int)cudaErrorInvalidValue;
    if (m == 0 || n == 0)
        return 0;
    if (!y || ((uintptr_t)y & 1))
        return (int)cudaErrorInvalidValue;
    if (k == 0) { // an empty sum: y = 0 (bf16 +0 is all zero bits)
        KC_CUDA_CHECK(cudaMemsetAsync(y, 0, (size_t)m * (size_t)n * sizeof(kc_bf16), s));
        return 0;
    }
    if (!x || !w || (align = kc_gemm_align(y, x, w)) == 0)
        return (int)cudaErrorInvalidValue;
    if ((rc = kc_gemm_lookup(g, m, n, k, align, &e)) != 0)
        return rc;
    KC_LT_CHECK(kc_gemm_layouts_init(&l, m, n, k));
    // beta = 0: C is not read; it names y so that no other buffer is needed.
    KC_LT_CHECK(cublasLtMatmul(g->lt, g->op, &alpha, w, &l.a, x, &l.b, &beta, y, &l.d, y, &l.d,
                               &e->algo, g->workspace, KC_GEMM_WORKSPACE, (cudaStream_t)s));
    KC_CUDA_CHECK(cudaGetLastError());
    return 0;
fail:
    return rc;
}
