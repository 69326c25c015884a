/* test_comm.c: the CPU communicator through engine/comm.h, with 1 to 4
 * ranks as threads: all-reduce against a reference summed in rank order,
 * bit for bit on every rank (n = 0, 1, odd, around the slice alignment, 1M
 * and more), and in bf16 (widened, rounded once); all-gather order, in
 * place too; broadcast from every root;
 * thousands of back-to-back collectives of mixed kinds (barrier races);
 * mismatched calls failing on every rank and the group going on; aborts
 * with a rank that never comes, while ranks wait and while they are in the
 * middle of a sum (ASan checks no rank reads a buffer already returned);
 * the bandwidth measurement. A SIGALRM watchdog turns any hang into a
 * failure. The NCCL implementation needs a GPU: only its argument checks
 * (or the no-NCCL stub) run here.
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/comm.h"

static atomic_int failures;
#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);               \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

#define MAX_RANKS 4
#define WATCHDOG_S 240 /* the whole run; far above what it needs */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* splitmix64: reproducible per (rank, case) streams. */
static uint64_t mix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Values spread over many binades, so the order of a sum shows in its bits. */
static float rand_float(uint64_t *s)
{
    uint64_t r = mix(s);
    float m = (float)(r & 0xffffff) / (float)0x1000000; /* [0, 1) */
    int e = (int)((r >> 24) % 40) - 20;
    float v = m * (float)(1 << 10);
    v = e >= 0 ? v * (float)(1u << (e > 20 ? 20 : e)) : v / (float)(1u << -e);
    return (r >> 63) ? -v : v;
}

/* ---- Running a group ---------------------------------------------------- */

typedef void (*rank_fn)(struct comm *c, void *arg);

struct rank_job {
    struct comm *c;
    rank_fn fn;
    void *arg;
};

static void *rank_main(void *p)
{
    struct rank_job *j = p;
    j->fn(j->c, j->arg);
    return NULL;
}

/* Runs fn on every rank of a fresh group of size ranks, one thread each. */
static void run_group(int size, rank_fn fn, void *arg)
{
    struct comm_group *g = comm_cpu_create(size);
    CHECK(g != NULL);
    if (!g)
        return;
    pthread_t th[MAX_RANKS];
    struct rank_job jobs[MAX_RANKS];
    for (int r = 0; r < size; r++) {
        jobs[r] = (struct rank_job){comm_cpu_rank(g, r), fn, arg};
        CHECK(comm_rank(jobs[r].c) == r && comm_size(jobs[r].c) == size);
        CHECK(comm_cpu_rank(g, r) == jobs[r].c); /* always the same handle */
        if (pthread_create(&th[r], NULL, rank_main, &jobs[r]) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            exit(1);
        }
    }
    for (int r = 0; r < size; r++)
        pthread_join(th[r], NULL);
    comm_destroy(jobs[0].c); /* a CPU rank's handle is the group's: no-op */
    comm_group_destroy(g);
}

/* ---- All-reduce: the rank-order sum, bit for bit ---------------------- */

static const int64_t ar_sizes[] = {0,    1,    2,    15,     16,      17,
                                   31,   33,   63,   65,     1000,    2047,
                                   2048, 2049, 4097, 100003, 1 << 20, (1 << 20) + 7};
#define N_AR (sizeof(ar_sizes) / sizeof(ar_sizes[0]))

struct ar_case {
    int size;
    float *in[N_AR][MAX_RANKS]; /* (n) each */
    float *ref[N_AR];           /* (n): in[0] + in[1] + ... in that order */
};

static void ar_rank(struct comm *c, void *arg)
{
    struct ar_case *k = arg;
    int r = comm_rank(c);
    float *buf = malloc(((size_t)(1 << 20) + 7) * sizeof(float));
    /* Twice through: the second round reuses the grown scratch. */
    for (int round = 0; round < 2; round++) {
        for (size_t t = 0; t < N_AR; t++) {
            int64_t n = ar_sizes[t];
            if (n)
                memcpy(buf, k->in[t][r], (size_t)n * sizeof(float));
            int rc = comm_allreduce_f32(c, n ? buf : NULL, n);
            CHECK(rc == 0);
            if (rc != 0) {
                fprintf(stderr, "rank %d n=%lld: %s\n", r, (long long)n, comm_error(c));
                continue;
            }
            if (n && memcmp(buf, k->ref[t], (size_t)n * sizeof(float)) != 0) {
                int64_t i = 0;
                while (i < n && memcmp(&buf[i], &k->ref[t][i], sizeof(float)) == 0)
                    i++;
                fprintf(stderr, "allreduce size %d rank %d n=%lld: element %lld is %a, want %a\n",
                        k->size, r, (long long)n, (long long)i, buf[i], k->ref[t][i]);
                failures++;
            }
        }
    }
    free(buf);
}

static void test_allreduce(int size)
{
    struct ar_case k = {.size = size};
    int64_t order_differs = 0;
    for (size_t t = 0; t < N_AR; t++) {
        int64_t n = ar_sizes[t];
        size_t bytes = (size_t)(n ? n : 1) * sizeof(float);
        for (int r = 0; r < size; r++) {
            uint64_t s = (uint64_t)t * 1000 + (uint64_t)r * 7 + (uint64_t)size * 100000;
            k.in[t][r] = malloc(bytes);
            for (int64_t i = 0; i < n; i++)
                k.in[t][r][i] = rand_float(&s);
        }
        k.ref[t] = malloc(bytes);
        for (int64_t i = 0; i < n; i++) {
            float acc = k.in[t][0][i];
            for (int r = 1; r < size; r++)
                acc += k.in[t][r][i];
            k.ref[t][i] = acc;
            /* The same terms summed backwards: shows the test could tell. */
            float back = k.in[t][size - 1][i];
            for (int r = size - 2; r >= 0; r--)
                back += k.in[t][r][i];
            order_differs += memcmp(&acc, &back, sizeof(float)) != 0;
        }
    }
    if (size >= 3)
        CHECK(order_differs > 0); /* else the data could not catch a wrong order */
    run_group(size, ar_rank, &k);
    for (size_t t = 0; t < N_AR; t++) {
        for (int r = 0; r < size; r++)
            free(k.in[t][r]);
        free(k.ref[t]);
    }
}

/* ---- bf16 all-reduce ------------------------------------------------------ */

static float from_bf16(uint16_t v)
{
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest, ties to even (no NaN among the test's values). */
static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static uint16_t bf16_val(int rank, int64_t i)
{
    uint64_t s = (uint64_t)rank * 1000003u + (uint64_t)i;
    return to_bf16(rand_float(&s));
}

/* Widened, summed in rank order, rounded once: every rank the same bits;
 * and two ties that round to even (1 + 2^-8 stays 1, 1 + 2^-7 + 2^-8
 * goes up to 1 + 2^-6). */
static void bf16_rank(struct comm *c, void *arg)
{
    (void)arg;
    static const int64_t ns[] = {0, 1, 7, 4099};
    int r = comm_rank(c), size = comm_size(c);
    for (size_t t = 0; t < sizeof(ns) / sizeof(ns[0]); t++) {
        int64_t n = ns[t];
        uint16_t *buf = malloc((size_t)(n ? n : 1) * 2);
        for (int64_t i = 0; i < n; i++)
            buf[i] = bf16_val(r, i);
        CHECK(comm_allreduce_bf16(c, buf, n) == 0);
        int bad = 0;
        for (int64_t i = 0; i < n; i++) {
            float acc = from_bf16(bf16_val(0, i));
            for (int q = 1; q < size; q++)
                acc += from_bf16(bf16_val(q, i));
            bad += buf[i] != to_bf16(acc);
        }
        CHECK(bad == 0);
        free(buf);
    }
    if (size == 2) {
        uint16_t v[2] = {r == 0 ? 0x3f80 : 0x3b80, r == 0 ? 0x3f81 : 0x3b80};
        CHECK(comm_allreduce_bf16(c, v, 2) == 0);
        CHECK(v[0] == 0x3f80 && v[1] == 0x3f82);
    }
    /* no stream on the CPU: at once */
    CHECK(comm_wait_event(c, NULL) == 0);
}

/* ---- All-gather and broadcast ---------------------------------------- */

static float gather_val(int rank, int64_t i)
{
    return (float)(rank * 1000003 + i) * 0.5f;
}

static void gather_rank(struct comm *c, void *arg)
{
    (void)arg;
    static const int64_t ns[] = {0, 1, 5, 16, 1000, 65537};
    int r = comm_rank(c), size = comm_size(c);
    for (size_t t = 0; t < sizeof(ns) / sizeof(ns[0]); t++) {
        int64_t n = ns[t];
        float *send = malloc((size_t)(n ? n : 1) * sizeof(float));
        float *recv = malloc((size_t)(n ? n * size : 1) * sizeof(float));
        for (int64_t i = 0; i < n; i++)
            send[i] = gather_val(r, i);
        for (int in_place = 0; in_place < 2; in_place++) {
            for (int64_t i = 0; i < n * size; i++)
                recv[i] = -1.0f;
            const float *src = send;
            if (in_place) {
                memcpy(recv + (int64_t)r * n, send, (size_t)n * sizeof(float));
                src = recv + (int64_t)r * n;
            }
            CHECK(comm_allgather_f32(c, src, n, recv) == 0);
            int bad = 0;
            for (int s = 0; s < size; s++)
                for (int64_t i = 0; i < n; i++)
                    bad += recv[(int64_t)s * n + i] != gather_val(s, i);
            CHECK(bad == 0);
        }
        free(send);
        free(recv);
    }
}

static void bcast_rank(struct comm *c, void *arg)
{
    (void)arg;
    static const size_t sizes[] = {0, 1, 13, 4096, 100001};
    int r = comm_rank(c), size = comm_size(c);
    unsigned char *buf = malloc(100001);
    for (int root = 0; root < size; root++) {
        for (size_t t = 0; t < sizeof(sizes) / sizeof(sizes[0]); t++) {
            size_t bytes = sizes[t];
            for (size_t i = 0; i < bytes; i++)
                buf[i] = (unsigned char)(r * 31 + i * 7 + t);
            CHECK(comm_broadcast(c, buf, bytes, root) == 0);
            int bad = 0;
            for (size_t i = 0; i < bytes; i++)
                bad += buf[i] != (unsigned char)(root * 31 + i * 7 + t);
            CHECK(bad == 0);
        }
    }
    free(buf);
}

/* ---- Many small collectives back to back -------------------------------- */

static void stress_rank(struct comm *c, void *arg)
{
    (void)arg;
    int r = comm_rank(c), size = comm_size(c);
    int bad = 0;
    for (int it = 0; it < 3000; it++) {
        /* Integers: exact in any order, so the expected sum is plain. */
        float v[3] = {(float)(r + it), (float)(r * it % 97), 1.0f};
        float want0 = 0, want1 = 0;
        for (int s = 0; s < size; s++) {
            want0 += (float)(s + it);
            want1 += (float)(s * it % 97);
        }
        switch (it % 4) {
        case 0:
        case 1:
            bad += comm_allreduce_f32(c, v, 3) != 0;
            bad += v[0] != want0 || v[1] != want1 || v[2] != (float)size;
            break;
        case 2:
            bad += comm_barrier(c) != 0;
            break;
        case 3: {
            int x = r == it % size ? it : -1;
            bad += comm_broadcast(c, &x, sizeof(x), it % size) != 0;
            bad += x != it;
            break;
        }
        }
    }
    CHECK(bad == 0);
    CHECK(comm_sync(c) == 0);
}

/* ---- Mismatched calls --------------------------------------------------- */

static void mismatch_rank(struct comm *c, void *arg)
{
    (void)arg;
    int r = comm_rank(c);
    float v[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    /* Rank 1 asks for one more element than the others. */
    CHECK(comm_allreduce_f32(c, v, r == 1 ? 5 : 4) == -1);
    CHECK(strstr(comm_error(c), "mismatch") != NULL);
    /* Rank 0 calls a barrier, the rest an all-reduce. */
    int rc = r == 0 ? comm_barrier(c) : comm_allreduce_f32(c, v, 4);
    CHECK(rc == -1 && strstr(comm_error(c), "mismatch") != NULL);
    /* Broadcast from a root out of range: everyone fails alike. */
    CHECK(comm_broadcast(c, v, 4, 99) == -1);
    CHECK(strstr(comm_error(c), "root") != NULL);
    CHECK(comm_allreduce_f32(c, v, -1) == -1);
    /* Nothing moved; the group is still in step. */
    CHECK(v[0] == 1.0f);
    CHECK(comm_allreduce_f32(c, v, 8) == 0);
    CHECK(v[0] == (float)comm_size(c) && v[7] == (float)comm_size(c));
}

/* ---- Abort ------------------------------------------------------------- */

struct abort_case {
    struct comm_group *g;
    int absent;   /* this rank never calls */
    int delay_ms; /* before the aborter aborts */
    const char *why;
    double t_abort;               /* when it did */
    double t_returned[MAX_RANKS]; /* each by its rank; read after join */
};

static void *aborter(void *p)
{
    struct abort_case *k = p;
    sleep_ms(k->delay_ms);
    k->t_abort = now_s();
    comm_group_abort(k->g, k->why);
    comm_group_abort(k->g, "a second reason, ignored");
    return NULL;
}

struct abort_rank_arg {
    struct abort_case *k;
    struct comm *c;
    int op; /* 0 allreduce, 1 barrier, 2 allgather, 3 broadcast */
};

static void *abort_rank(void *p)
{
    struct abort_rank_arg *a = p;
    struct comm *c = a->c;
    int r = comm_rank(c);
    if (r == a->k->absent)
        return NULL; /* the dead rank */
    float buf[64 * (MAX_RANKS + 1)] = {0};
    int rc = -1;
    switch (a->op) {
    case 0:
        rc = comm_allreduce_f32(c, buf, 64);
        break;
    case 1:
        rc = comm_barrier(c);
        break;
    case 2:
        rc = comm_allgather_f32(c, buf, 64, buf + 64);
        break;
    case 3:
        rc = comm_broadcast(c, buf, 64, 0);
        break;
    }
    a->k->t_returned[r] = now_s();
    CHECK(rc == -1);
    CHECK(strstr(comm_error(c), "aborted") && strstr(comm_error(c), a->k->why));
    /* Sticky: every later call fails at once, with the first reason. */
    CHECK(comm_allreduce_f32(c, buf, 64) == -1);
    CHECK(comm_barrier(c) == -1);
    CHECK(comm_sync(c) == -1);
    CHECK(strstr(comm_error(c), a->k->why) != NULL);
    CHECK(strstr(comm_error(c), "ignored") == NULL);
    return NULL;
}

/* size ranks, rank `absent` never calls, the others call op; an aborter
 * thread aborts after 100 ms; every waiting rank must be back within a
 * second of it. */
static void test_abort_absent(int size, int absent, int op)
{
    struct abort_case k = {.absent = absent, .delay_ms = 100, .why = "rank gone"};
    k.g = comm_cpu_create(size);
    pthread_t th[MAX_RANKS], ab;
    struct abort_rank_arg args[MAX_RANKS];
    double t0 = now_s();
    for (int r = 0; r < size; r++) {
        args[r] = (struct abort_rank_arg){&k, comm_cpu_rank(k.g, r), op};
        pthread_create(&th[r], NULL, abort_rank, &args[r]);
    }
    pthread_create(&ab, NULL, aborter, &k);
    for (int r = 0; r < size; r++)
        pthread_join(th[r], NULL);
    pthread_join(ab, NULL);
    for (int r = 0; r < size; r++) {
        if (r == absent)
            continue;
        double back = k.t_returned[r];
        CHECK(back >= k.t_abort); /* nobody gave up before the abort */
        CHECK(back - k.t_abort < 1.0);
        CHECK(back - t0 >= 0.09);
    }
    comm_group_destroy(k.g);
}

/* An abort before any call: every call fails at once. */
static void test_abort_first(void)
{
    struct comm_group *g = comm_cpu_create(2);
    comm_group_abort(g, "engine stopping");
    struct comm *c = comm_cpu_rank(g, 1);
    float v = 1;
    CHECK(comm_allreduce_f32(c, &v, 1) == -1);
    CHECK(strcmp(comm_error(c), "aborted: engine stopping") == 0);
    CHECK(comm_sync(c) == -1);
    CHECK(comm_barrier(c) == -1);
    comm_abort(c, "again"); /* through the generic handle: still the first */
    CHECK(comm_broadcast(c, &v, sizeof(v), 0) == -1);
    CHECK(strcmp(comm_error(c), "aborted: engine stopping") == 0);
    comm_group_destroy(g);
}

/* Abort at random moments while ranks run big all-reduces, each freeing its
 * buffer as soon as a call fails: a rank must not return while another may
 * still read its buffer (ASan reports the use after free if one does). */
struct race_case {
    struct comm_group *g;
    atomic_int started;
};

static void *race_rank(void *p)
{
    void **a = p;
    struct race_case *k = a[0];
    struct comm *c = a[1];
    int64_t n = 300000;
    float *buf = calloc((size_t)n, sizeof(float));
    atomic_fetch_add(&k->started, 1);
    int calls = 0;
    while (comm_allreduce_f32(c, buf, n) == 0)
        calls++;
    CHECK(strstr(comm_error(c), "aborted: race") != NULL);
    memset(buf, 0xff, (size_t)n * sizeof(float)); /* the caller reuses it... */
    free(buf);                                    /* ...or frees it */
    (void)calls;
    return NULL;
}

static void test_abort_races(void)
{
    uint64_t seed = 42;
    for (int it = 0; it < 30; it++) {
        int size = 2 + it % 3;
        struct race_case k = {.g = comm_cpu_create(size)};
        pthread_t th[MAX_RANKS];
        void *args[MAX_RANKS][2];
        for (int r = 0; r < size; r++) {
            args[r][0] = &k;
            args[r][1] = comm_cpu_rank(k.g, r);
            pthread_create(&th[r], NULL, race_rank, args[r]);
        }
        while (atomic_load(&k.started) < size)
            sleep_ms(1);
        struct timespec ts = {0, (long)(mix(&seed) % 3000000)}; /* up to 3 ms */
        nanosleep(&ts, NULL);
        comm_group_abort(k.g, "race");
        for (int r = 0; r < size; r++)
            pthread_join(th[r], NULL);
        comm_group_destroy(k.g);
    }
}

/* ---- Bandwidth ---------------------------------------------------------- */

static void busbw_rank(struct comm *c, void *arg)
{
    (void)arg;
    size_t bytes = (size_t)1 << 20;
    float *buf = calloc(bytes / sizeof(float), sizeof(float));
    double bw = comm_allreduce_busbw(c, buf, bytes, 5);
    if (comm_size(c) == 1)
        CHECK(bw == 0.0);
    else
        CHECK(bw > 0.0);
    if (comm_rank(c) == 0 && comm_size(c) > 1)
        printf("  cpu allreduce busbw, %d ranks, 1 MiB: %.2f GB/s\n", comm_size(c), bw / 1e9);
    CHECK(buf[0] == 0.0f);
    /* Bad arguments, alike on every rank: every rank fails, none hangs. */
    CHECK(comm_allreduce_busbw(c, buf, 2, 5) < 0);
    CHECK(comm_allreduce_busbw(c, buf, bytes, 0) < 0);
    CHECK(comm_barrier(c) == 0);
    free(buf);
}

/* ---- Creation ----------------------------------------------------------- */

static void test_create(void)
{
    CHECK(comm_cpu_create(0) == NULL);
    CHECK(comm_cpu_create(-3) == NULL);
    struct comm_group *g = comm_cpu_create(3);
    CHECK(comm_cpu_rank(g, 3) == NULL && comm_cpu_rank(g, -1) == NULL);
    CHECK(strcmp(comm_error(comm_cpu_rank(g, 0)), "") == 0);
    comm_group_destroy(g);
    comm_group_destroy(NULL);
    comm_destroy(NULL);

    /* NCCL: with it, arguments are checked before any GPU is touched;
     * without it, the stub says so. Either way, NULL and a reason. */
    char err[256] = "";
    unsigned char id[COMM_NCCL_ID_BYTES] = {0};
    CHECK(comm_nccl_create(0, 0, id, NULL, 1000, err, sizeof(err)) == NULL);
    CHECK(err[0] != '\0');
    err[0] = '\0';
    CHECK(comm_nccl_create(2, 2, id, NULL, 1000, err, sizeof(err)) == NULL);
    CHECK(err[0] != '\0');
}

int main(void)
{
    alarm(WATCHDOG_S); /* a hang kills the test (SIGALRM), never the CI run */

    test_create();
    for (int size = 1; size <= MAX_RANKS; size++) {
        double t = now_s();
        test_allreduce(size);
        run_group(size, bf16_rank, NULL);
        run_group(size, gather_rank, NULL);
        run_group(size, bcast_rank, NULL);
        run_group(size, stress_rank, NULL);
        run_group(size, busbw_rank, NULL);
        if (size > 1)
            run_group(size, mismatch_rank, NULL);
        printf("size %d: %.2f s\n", size, now_s() - t);
    }
    test_abort_first();
    for (int op = 0; op < 4; op++) {
        test_abort_absent(2, 1, op);
        test_abort_absent(3, 0, op);
        test_abort_absent(4, 2, op);
    }
    test_abort_races();

    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", (int)failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
