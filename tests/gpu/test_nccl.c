/* test_nccl.c: the NCCL communicator (engine/comm_nccl.c) on every visible
 * GPU, one rank thread per GPU as the engine's tensor-parallel ranks run:
 * each collective against host arithmetic on small integers (exact in
 * f32, so every bound is 0), then all-reduce bus bandwidth through
 * comm_allreduce_busbw against a link ceiling measured here. One JSON line
 * per check and per benchmark on stdout (gpu_check.h's format, in C);
 * stderr says what went wrong. Exit status: 0 passed, 1 a check failed,
 * 2 no device or a build without NCCL.
 *
 * Usage: test_nccl [deadline_s]   (run.sh passes its own limit; default 120)
 * INFERD_NCCL_RANKS=k uses the first k GPUs instead of all of them.
 */
#include <cuda_runtime.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/comm.h"
#include "kernels/cuda/kcuda.h"

#define INIT_TIMEOUT_MS 60000
#define AR_BIG 1048579 /* 1M + 3 floats: not a multiple of any vector width */
#define AG_PER_RANK 1000
#define BCAST_BYTES 4099
#define BARRIER_ROUNDS 3
#define DEV_BYTES ((size_t)256 << 20) /* the largest benchmark; every case fits in it */

static const size_t ar_sizes[] = {1, 1000, AR_BIG}; /* C_AR_1, C_AR_1000, C_AR_BIG */
static const size_t bench_bytes[] = {(size_t)1 << 20, (size_t)64 << 20, (size_t)256 << 20};
static const int bench_iters[] = {200, 20, 8};
#define N_BENCH 3

/* Checks, in the order they run; the broadcasts (one per root) come
 * between the fixed ones and the barrier, so an index is computed. */
enum { C_INIT, C_AR_1, C_AR_1000, C_AR_BIG, C_AG, C_AG_INPLACE, C_BCAST0 };
static int idx_barrier(int n)
{
    return C_BCAST0 + n;
}
static int idx_bench(int n, int k)
{
    return C_BCAST0 + n + 1 + k;
}
static int n_cases(int n)
{
    return C_BCAST0 + n + 1 + N_BENCH;
}

/* What the rank threads share. mu guards everything below it. */
struct test {
    int n; /* ranks, one per GPU 0 .. n-1 */
    unsigned char id[COMM_NCCL_ID_BYTES];
    atomic_int arrivals;        /* the barrier check's count */
    pthread_barrier_t teardown; /* no handle is destroyed while a peer may still abort it */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct comm **comms; /* (n) the handles, NULL while absent: what an abort reaches */
    int failed;          /* the first failure aborted every handle */
    char why[192];       /* its reason */
    double *err;         /* (n_cases, n) each rank's error; NAN: not reached */
    double *busbw;       /* (N_BENCH, n) bytes per second */
    int done;            /* rank threads finished */
};

struct rank {
    int r;
    struct test *t;
    struct comm *c;
    cudaStream_t s;
    float *dev;         /* device: DEV_BYTES */
    float *host, *want; /* host: (AR_BIG) f32 each, and at least n * AG_PER_RANK */
};

/* ---- Failure: one rank's failure stops every rank ----------------------- */

/* Prints the reason and aborts every published handle (comm_abort may come
 * from any thread), so no rank waits forever for a peer that gave up.
 * Returns -1. */
static int rank_fail(struct rank *rk, const char *fmt, ...)
{
    char msg[160]; /* with "rank %d: ", it fits t->why */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fprintf(stderr, "test_nccl: rank %d: %s\n", rk->r, msg);
    struct test *t = rk->t;
    pthread_mutex_lock(&t->mu);
    if (!t->failed) {
        t->failed = 1;
        snprintf(t->why, sizeof(t->why), "rank %d: %s", rk->r, msg);
        for (int i = 0; i < t->n; i++)
            if (t->comms[i])
                comm_abort(t->comms[i], t->why);
    }
    pthread_mutex_unlock(&t->mu);
    return -1;
}

static int comm_failed(struct rank *rk, const char *what)
{
    return rank_fail(rk, "%s: %s", what, comm_error(rk->c));
}

static int cuda_ok(struct rank *rk, cudaError_t e, const char *call, int line)
{
    if (e == cudaSuccess)
        return 0;
    return rank_fail(rk, "%s:%d: %s: %s", __FILE__, line, call, cudaGetErrorString(e));
}
#define CUDA_OK(rk, call) cuda_ok((rk), (call), #call, __LINE__)

static void record(struct rank *rk, int idx, double err)
{
    pthread_mutex_lock(&rk->t->mu);
    rk->t->err[(size_t)idx * rk->t->n + rk->r] = err;
    pthread_mutex_unlock(&rk->t->mu);
}

/* ---- Host side of a case ------------------------------------------------ */

/* Host to device on the rank's stream. The stream is drained first through
 * comm_sync, which notices an abort: a pageable copy waits for the stream,
 * and that wait would not. */
static int upload(struct rank *rk, void *dst, const void *src, size_t bytes)
{
    if (comm_sync(rk->c) != 0)
        return comm_failed(rk, "comm_sync");
    return CUDA_OK(rk, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, rk->s));
}

static int download(struct rank *rk, void *dst, const void *src, size_t bytes)
{
    if (comm_sync(rk->c) != 0)
        return comm_failed(rk, "comm_sync");
    if (CUDA_OK(rk, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, rk->s)))
        return -1;
    return CUDA_OK(rk, cudaStreamSynchronize(rk->s));
}

/* Fills n bytes with 0xff: NaN in f32, so a row nothing wrote shows. */
static int poison(struct rank *rk, void *dst, size_t bytes)
{
    if (comm_sync(rk->c) != 0)
        return comm_failed(rk, "comm_sync");
    return CUDA_OK(rk, cudaMemsetAsync(dst, 0xff, bytes, rk->s));
}

/* ||got - want|| / ||want||; INFINITY when got holds a NaN or Inf. */
static double rel_err(const float *got, const float *want, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]))
            return INFINITY;
        double d = (double)got[i] - (double)want[i];
        num += d * d;
        den += (double)want[i] * (double)want[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Rank r's element i of an all-reduce: an integer in [-254, 254], so any
 * sum over fewer than 2^16 ranks is exact in f32 whatever the order. */
static float ar_value(int r, size_t i)
{
    return (float)((int)((i * 7u + (size_t)r * 13u) % 509u) - 254);
}

/* Rank r's element i of an all-gather: exact while r * 1000 + i < 2^24. */
static float ag_value(int r, size_t i)
{
    return (float)((size_t)r * AG_PER_RANK + i);
}

static unsigned char bcast_byte(int r, size_t i)
{
    return (unsigned char)(r * 37 + (int)(i * 11) + 1);
}

/* ---- The cases ---------------------------------------------------------- */

static int case_allreduce(struct rank *rk, size_t n, int idx)
{
    for (size_t i = 0; i < n; i++) {
        rk->host[i] = ar_value(rk->r, i);
        float sum = 0;
        for (int q = 0; q < rk->t->n; q++)
            sum += ar_value(q, i);
        rk->want[i] = sum;
    }
    if (upload(rk, rk->dev, rk->host, n * sizeof(float)))
        return -1;
    if (comm_allreduce_f32(rk->c, rk->dev, (int64_t)n) != 0)
        return comm_failed(rk, "comm_allreduce_f32");
    memset(rk->host, 0xff, n * sizeof(float));
    if (download(rk, rk->host, rk->dev, n * sizeof(float)))
        return -1;
    record(rk, idx, rel_err(rk->host, rk->want, n));
    return 0;
}

/* recv is (n, AG_PER_RANK): rank q's row q. In place, each rank's send is
 * its own row of recv, as the header allows. */
static int case_allgather(struct rank *rk, int in_place, int idx)
{
    int n = rk->t->n;
    size_t per = AG_PER_RANK, total = (size_t)n * per;
    float *recv = rk->dev, *send = in_place ? recv + (size_t)rk->r * per : recv + total;
    for (size_t i = 0; i < per; i++)
        rk->host[i] = ag_value(rk->r, i);
    if (poison(rk, recv, total * sizeof(float)))
        return -1;
    if (upload(rk, send, rk->host, per * sizeof(float)))
        return -1;
    if (comm_allgather_f32(rk->c, send, (int64_t)per, recv) != 0)
        return comm_failed(rk, "comm_allgather_f32");
    for (int q = 0; q < n; q++)
        for (size_t i = 0; i < per; i++)
            rk->want[(size_t)q * per + i] = ag_value(q, i);
    if (download(rk, rk->host, recv, total * sizeof(float)))
        return -1;
    record(rk, idx, rel_err(rk->host, rk->want, total));
    return 0;
}

/* Every rank starts from its own bytes; all must end with root's. The
 * error is the fraction of bytes that differ. */
static int case_broadcast(struct rank *rk, int root, int idx)
{
    unsigned char *h = (unsigned char *)rk->host;
    for (size_t i = 0; i < BCAST_BYTES; i++)
        h[i] = bcast_byte(rk->r, i);
    if (upload(rk, rk->dev, h, BCAST_BYTES))
        return -1;
    if (comm_broadcast(rk->c, rk->dev, BCAST_BYTES, root) != 0)
        return comm_failed(rk, "comm_broadcast");
    memset(h, 0, BCAST_BYTES);
    if (download(rk, h, rk->dev, BCAST_BYTES))
        return -1;
    size_t bad = 0;
    for (size_t i = 0; i < BCAST_BYTES; i++)
        bad += h[i] != bcast_byte(root, i);
    record(rk, idx, (double)bad / BCAST_BYTES);
    return 0;
}

/* Each round every rank counts itself in, then waits at the barrier: once
 * it returns, every rank has counted itself in for this round. The error
 * is the number of rounds where one had not. */
static int case_barrier(struct rank *rk, int idx)
{
    int bad = 0;
    for (int k = 0; k < BARRIER_ROUNDS; k++) {
        atomic_fetch_add(&rk->t->arrivals, 1);
        if (comm_barrier(rk->c) != 0)
            return comm_failed(rk, "comm_barrier");
        bad += atomic_load(&rk->t->arrivals) < rk->t->n * (k + 1);
    }
    record(rk, idx, bad);
    return 0;
}

static int bench_allreduce(struct rank *rk, int k, int idx)
{
    if (comm_sync(rk->c) != 0)
        return comm_failed(rk, "comm_sync");
    if (CUDA_OK(rk, cudaMemsetAsync(rk->dev, 0, bench_bytes[k], rk->s)))
        return -1;
    double bw = comm_allreduce_busbw(rk->c, rk->dev, bench_bytes[k], bench_iters[k]);
    if (bw < 0)
        return comm_failed(rk, "comm_allreduce_busbw");
    pthread_mutex_lock(&rk->t->mu);
    rk->t->busbw[(size_t)k * rk->t->n + rk->r] = bw;
    pthread_mutex_unlock(&rk->t->mu);
    record(rk, idx, 0);
    return 0;
}

/* ---- A rank thread ------------------------------------------------------ */

static int run_cases(struct rank *rk)
{
    struct test *t = rk->t;
    int n = t->n;
    if (CUDA_OK(rk, cudaSetDevice(rk->r)) ||
        CUDA_OK(rk, cudaStreamCreateWithFlags(&rk->s, cudaStreamNonBlocking)) ||
        CUDA_OK(rk, cudaMalloc((void **)&rk->dev, DEV_BYTES)))
        return -1;
    size_t host_n = AR_BIG > (size_t)n * AG_PER_RANK ? AR_BIG : (size_t)n * AG_PER_RANK;
    rk->host = malloc(host_n * sizeof(float));
    rk->want = malloc(host_n * sizeof(float));
    if (!rk->host || !rk->want)
        return rank_fail(rk, "out of host memory");

    char err[256];
    struct comm *c = comm_nccl_create(rk->r, n, t->id, rk->s, INIT_TIMEOUT_MS, err, sizeof(err));
    if (!c)
        return rank_fail(rk, "comm_nccl_create: %s", err);
    rk->c = c;
    pthread_mutex_lock(&t->mu);
    t->comms[rk->r] = c;
    if (t->failed) /* a peer failed before this handle could be reached */
        comm_abort(c, t->why);
    pthread_mutex_unlock(&t->mu);
    record(rk, C_INIT, 0);

    for (int k = C_AR_1; k <= C_AR_BIG; k++)
        if (case_allreduce(rk, ar_sizes[k - C_AR_1], k))
            return -1;
    if (case_allgather(rk, 0, C_AG) || case_allgather(rk, 1, C_AG_INPLACE))
        return -1;
    for (int root = 0; root < n; root++)
        if (case_broadcast(rk, root, C_BCAST0 + root))
            return -1;
    if (case_barrier(rk, idx_barrier(n)))
        return -1;
    for (int k = 0; k < N_BENCH; k++)
        if (bench_allreduce(rk, k, idx_bench(n, k)))
            return -1;
    if (comm_sync(c) != 0)
        return comm_failed(rk, "comm_sync");
    return 0;
}

static void *rank_main(void *arg)
{
    struct rank *rk = arg;
    struct test *t = rk->t;
    (void)run_cases(rk);
    /* Every rank is past its last call before any handle goes away. */
    pthread_barrier_wait(&t->teardown);
    pthread_mutex_lock(&t->mu);
    t->comms[rk->r] = NULL;
    pthread_mutex_unlock(&t->mu);
    comm_destroy(rk->c);
    cudaFree(rk->dev);
    if (rk->s)
        cudaStreamDestroy(rk->s);
    free(rk->host);
    free(rk->want);
    pthread_mutex_lock(&t->mu);
    t->done++;
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

/* ---- The ceiling -------------------------------------------------------- */

/* The CUDA runtime reports no link bandwidth (cudaDeviceGetP2PAttribute
 * gives only a performance rank), and nvidia-smi topo is not reachable
 * from C: the ceiling is a copy GPU 0 -> GPU 1 measured here. Returns GB/s,
 * or 0 with the reason in note. */
static double measure_peer_gbs(char *note, size_t len)
{
    const size_t bytes = (size_t)256 << 20;
    const int iters = 10;
    int access = 0, perf = -1, enabled = 0;
    void *src = NULL, *dst = NULL;
    cudaStream_t s = NULL;
    cudaEvent_t a = NULL, b = NULL;
    float ms = 0;
    double gbs = 0;
    cudaError_t e;

#define PEER_CALL(call)                                                                            \
    do {                                                                                           \
        if ((e = (call)) != cudaSuccess) {                                                         \
            snprintf(note, len, "no ceiling: %s failed: %s", #call, cudaGetErrorString(e));        \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)
    PEER_CALL(cudaDeviceCanAccessPeer(&access, 0, 1));
    PEER_CALL(cudaDeviceGetP2PAttribute(&perf, cudaDevP2PAttrPerformanceRank, 0, 1));
    PEER_CALL(cudaSetDevice(1));
    PEER_CALL(cudaMalloc(&dst, bytes));
    PEER_CALL(cudaSetDevice(0));
    if (access) {
        PEER_CALL(cudaDeviceEnablePeerAccess(1, 0));
        enabled = 1;
    }
    PEER_CALL(cudaMalloc(&src, bytes));
    PEER_CALL(cudaMemset(src, 0, bytes));
    PEER_CALL(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    PEER_CALL(cudaEventCreate(&a));
    PEER_CALL(cudaEventCreate(&b));
    PEER_CALL(cudaMemcpyPeerAsync(dst, 1, src, 0, bytes, s)); /* warm-up */
    PEER_CALL(cudaEventRecord(a, s));
    for (int i = 0; i < iters; i++)
        PEER_CALL(cudaMemcpyPeerAsync(dst, 1, src, 0, bytes, s));
    PEER_CALL(cudaEventRecord(b, s));
    PEER_CALL(cudaEventSynchronize(b));
    PEER_CALL(cudaEventElapsedTime(&ms, a, b));
#undef PEER_CALL
    if (ms > 0)
        gbs = (double)bytes * iters / (ms * 1e-3) / 1e9;
    snprintf(note, len,
             "ceiling = cudaMemcpyPeer GPU 0 -> 1 measured here (peer access %s, P2P "
             "performance rank %d): CUDA reports no link bandwidth; NVLS or several links can "
             "put NCCL above one copy",
             access ? "on" : "off", perf);
out:
    cudaSetDevice(0);
    if (a)
        cudaEventDestroy(a);
    if (b)
        cudaEventDestroy(b);
    if (s)
        cudaStreamDestroy(s);
    cudaFree(src);
    cudaSetDevice(1);
    cudaFree(dst);
    cudaSetDevice(0);
    /* Left as NCCL expects to find it: it enables what it uses itself. */
    if (enabled)
        cudaDeviceDisablePeerAccess(1);
    cudaGetLastError();
    return gbs;
}

/* ---- Report ------------------------------------------------------------- */

static void case_name(int n, int idx, char *buf, size_t len)
{
    if (idx == C_INIT)
        snprintf(buf, len, "comm_nccl_create, %d ranks", n);
    else if (idx >= C_AR_1 && idx <= C_AR_BIG)
        snprintf(buf, len, "allreduce n=%zu, %d ranks", ar_sizes[idx - C_AR_1], n);
    else if (idx == C_AG || idx == C_AG_INPLACE)
        snprintf(buf, len, "allgather order%s, %d per rank, %d ranks",
                 idx == C_AG_INPLACE ? " (in place)" : "", AG_PER_RANK, n);
    else if (idx < idx_barrier(n))
        snprintf(buf, len, "broadcast %d bytes from root %d, %d ranks", BCAST_BYTES, idx - C_BCAST0,
                 n);
    else if (idx == idx_barrier(n))
        snprintf(buf, len, "barrier x%d, %d ranks", BARRIER_ROUNDS, n);
    else
        snprintf(buf, len, "allreduce_busbw %zu MiB ran, %d ranks",
                 bench_bytes[idx - idx_bench(n, 0)] >> 20, n);
}

/* One check line per case: the worst rank's error; a rank that never got
 * there counts as an error of 1e30. Returns the failures. Caller holds mu. */
static int print_checks(const struct test *t)
{
    int failures = 0;
    for (int idx = 0; idx < n_cases(t->n); idx++) {
        double worst = 0;
        for (int r = 0; r < t->n; r++) {
            double e = t->err[(size_t)idx * t->n + r];
            if (!isfinite(e) || e > worst)
                worst = isfinite(e) ? e : 1e30;
            if (worst >= 1e30)
                break;
        }
        char name[96];
        case_name(t->n, idx, name, sizeof(name));
        int ok = worst <= 0;
        failures += !ok;
        printf("{\"test\": \"nccl\", \"case\": \"%s\", \"rel_err\": %.3e, \"bound\": %.1e, "
               "\"ok\": %s}\n",
               name, worst, 0.0, ok ? "true" : "false");
    }
    return failures;
}

/* One bench line per size that every rank measured: the slowest rank's bus
 * bandwidth. Caller holds mu. */
static void print_benches(const struct test *t, double ceiling_gbs, const char *note)
{
    for (int k = 0; k < N_BENCH; k++) {
        double worst = INFINITY;
        for (int r = 0; r < t->n; r++) {
            double bw = t->busbw[(size_t)k * t->n + r];
            if (!(bw >= 0)) {
                worst = NAN;
                break;
            }
            if (bw < worst)
                worst = bw;
        }
        if (isnan(worst))
            continue; /* its check line says it failed */
        printf("{\"bench\": \"nccl_allreduce\", \"ranks\": %d, \"bytes\": %zu, \"iters\": %d, "
               "\"figure\": %.2f, \"unit\": \"GB/s\", \"ceiling\": %.2f, \"note\": \"%s\"}\n",
               t->n, bench_bytes[k], bench_iters[k], worst / 1e9, ceiling_gbs, note);
    }
}

/* ---- main --------------------------------------------------------------- */

int main(int argc, char **argv)
{
    double deadline_s = argc > 1 ? atof(argv[1]) : 120;
    if (!(deadline_s > 0))
        deadline_s = 120;
    int ndev = kc_device_count();
    if (ndev < 1) {
        fprintf(stderr, "test_nccl: no CUDA device\n");
        return 2;
    }
    for (int i = 0; i < ndev; i++) {
        char d[256];
        kc_device_describe(i, d, sizeof d);
        fprintf(stderr, "test_nccl: GPU %d: %s\n", i, d);
    }
    int n = ndev;
    const char *env = getenv("INFERD_NCCL_RANKS");
    if (env && atoi(env) >= 1 && atoi(env) < ndev)
        n = atoi(env);

    static struct test t;
    char err[256];
    if (comm_nccl_unique_id(t.id, err, sizeof(err)) != 0) {
        fprintf(stderr, "test_nccl: %s\n", err);
        if (strstr(err, "built without NCCL"))
            return 2;
        printf("{\"test\": \"nccl\", \"case\": \"comm_nccl_unique_id\", \"rel_err\": 1e30, "
               "\"bound\": 0, \"ok\": false}\n");
        return 1;
    }

    /* With one GPU nothing crosses a link: bus bandwidth is 0 by the
     * definition (2 (n - 1) / n), and so is the ceiling. */
    char note[320] = "one GPU: nothing crosses a link";
    double ceiling = 0;
    if (n >= 2) {
        ceiling = measure_peer_gbs(note, sizeof(note));
        fprintf(stderr, "test_nccl: GPU 0 -> 1 copy: %.1f GB/s (%s)\n", ceiling, note);
    }
    fprintf(stderr, "test_nccl: %d ranks\n", n);

    t.n = n;
    atomic_init(&t.arrivals, 0);
    t.comms = calloc((size_t)n, sizeof(*t.comms));
    t.err = malloc((size_t)n_cases(n) * n * sizeof(*t.err));
    t.busbw = malloc((size_t)N_BENCH * n * sizeof(*t.busbw));
    struct rank *ranks = calloc((size_t)n, sizeof(*ranks));
    pthread_t *th = calloc((size_t)n, sizeof(*th));
    if (!t.comms || !t.err || !t.busbw || !ranks || !th) {
        fprintf(stderr, "test_nccl: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < (size_t)n_cases(n) * n; i++)
        t.err[i] = NAN;
    for (size_t i = 0; i < (size_t)N_BENCH * n; i++)
        t.busbw[i] = -1;
    pthread_mutex_init(&t.mu, NULL);
    pthread_cond_init(&t.cv, NULL);
    pthread_barrier_init(&t.teardown, NULL, (unsigned)n);

    int started = 0;
    for (int r = 0; r < n; r++) {
        ranks[r].r = r;
        ranks[r].t = &t;
        if (pthread_create(&th[r], NULL, rank_main, &ranks[r]) != 0)
            break;
        started++;
    }
    if (started < n) {
        /* The started ranks would wait at the teardown barrier forever. */
        fprintf(stderr, "test_nccl: pthread_create failed for rank %d\n", started);
        fflush(stdout);
        _exit(1);
    }

    /* The watchdog: past the deadline every handle is aborted, so every
     * rank waiting in NCCL returns; a rank that still does not is left. */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += (time_t)deadline_s;
    pthread_mutex_lock(&t.mu);
    while (t.done < n) {
        if (pthread_cond_timedwait(&t.cv, &t.mu, &until) != 0 && t.done < n) {
            if (t.failed) /* aborted already, and still stuck after the grace period */
                break;
            fprintf(stderr, "test_nccl: past the deadline of %.0f s: aborting every rank\n",
                    deadline_s);
            t.failed = 1;
            snprintf(t.why, sizeof(t.why), "test_nccl: deadline of %.0f s", deadline_s);
            for (int r = 0; r < n; r++)
                if (t.comms[r])
                    comm_abort(t.comms[r], t.why);
            until.tv_sec += 15;
        }
    }
    int n_done = t.done;
    int failures = print_checks(&t);
    print_benches(&t, ceiling, note);
    pthread_mutex_unlock(&t.mu);
    fflush(stdout);
    if (n_done < n) {
        fprintf(stderr, "test_nccl: %d of %d rank threads never returned\n", n - n_done, n);
        _exit(1);
    }
    for (int r = 0; r < n; r++)
        pthread_join(th[r], NULL);
    fprintf(stderr, "test_nccl: %s (%d failed)\n", failures ? "FAILED" : "ok", failures);
    pthread_barrier_destroy(&t.teardown);
    free(t.comms);
    free(t.err);
    free(t.busbw);
    free(ranks);
    free(th);
    return failures ? 1 : 0;
}
