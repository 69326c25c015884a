/* test_comm_tcp.c: the TCP communicator through engine/comm.h, with every
 * node a fork()ed process on loopback and its ranks threads of it. Node 0
 * listens on port 0 and hands the port it got to the parent through a pipe;
 * the parent starts the other nodes with it. Each node's ranks report what
 * they saw as fixed-size records on one shared pipe (a write of one record
 * is atomic), and the parent checks them: all-reduce results (hashed) bit
 * for bit against a reference summed in the documented order (within each
 * node in local-rank order, then node sums in node order) on every rank of
 * every process, for 2 and 3 nodes of 1 and 2 ranks; all-gather order;
 * broadcast from every root; 500 mixed small collectives; arguments wrong
 * alike; IPv6; followers started before the leader. Failures: a follower,
 * then the leader, killed with SIGKILL in the middle of all-reduces; an
 * abort on one node; a peer too slow for timeout_ms; a mismatch across
 * nodes; hellos that do not fit (sizes, duplicate node rank, another
 * version) refused on both sides; stray connections ignored. Every wait is
 * bounded: the parent's poll deadlines, and alarm() in every process.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "engine/comm.h"

static atomic_int failures;
#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "[pid %d] %s:%d: CHECK(%s) failed\n", (int)getpid(), __FILE__,         \
                    __LINE__, #cond);                                                              \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

#define MAX_NODES 3
#define MAX_LOCAL 2
#define MAX_TP (MAX_NODES * MAX_LOCAL)
#define WATCHDOG_S 280      /* the parent, the whole run (meson allows 300) */
#define CHILD_WATCHDOG_S 90 /* each node process */
#define JOB_S 100           /* the parent's wait for one job's records */
#define TIMEOUT_MS 20000    /* joins and collectives, where no timeout is tested */
#define LOCALHOST "127.0.0.1"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* one clock for every process */
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* splitmix64: reproducible per (case, rank) streams. */
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
    float m = (float)(r & 0xffffff) / (float)0x1000000;
    int e = (int)((r >> 24) % 40) - 20;
    float v = m * (float)(1 << 10);
    v = e >= 0 ? v * (float)(1u << (e > 20 ? 20 : e)) : v / (float)(1u << -e);
    return (r >> 63) ? -v : v;
}

static uint64_t fnv1a(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

/* ---- Records: what the nodes tell the parent --------------------------- */

enum {
    REC_CREATE = 1, /* a node's create: rc, msg, t = seconds it took */
    REC_AR,         /* an all-reduce result: tcase, hash */
    REC_RESULT,     /* a scenario's outcome on a rank: rc, msg, t = when */
    REC_READY,      /* the node is in its collective loop (kill it now) */
    REC_ABORTED,    /* t = when this rank called comm_abort */
    REC_DONE,       /* a node process ends: bad = its failed checks */
};

struct rec {
    int32_t kind, node, rank, tcase, rc, bad;
    uint64_t hash;
    double t;
    char msg[256];
};
_Static_assert(sizeof(struct rec) <= 512, "a record must be one atomic pipe write");

static void send_rec(int fd, struct rec r)
{
    if (write(fd, &r, sizeof(r)) != (ssize_t)sizeof(r))
        fprintf(stderr, "[pid %d] record lost: %s\n", (int)getpid(), strerror(errno));
}

/* ---- Jobs: one process per node ---------------------------------------- */

struct job;
struct node_ctx {
    const struct job *job;
    int node, res_fd, port;
    struct comm_tcp_group *g;
};

struct rank_ctx {
    struct node_ctx *n;
    struct comm *c;
    int lr, gr; /* local and global rank */
};

typedef void (*rank_fn)(struct rank_ctx *x);
typedef void (*node_fn)(struct node_ctx *n);

struct claim {
    int set, nnodes, node_rank, local; /* what a node says in its hello */
};

struct job {
    const char *name;
    int nnodes, local;
    const char *addr;
    int timeout_ms;
    int leader_last;           /* followers first, node 0 300 ms later */
    rank_fn fn;                /* every rank of every node */
    node_fn custom[MAX_NODES]; /* replaces a follower's whole process */
    struct claim claim[MAX_NODES];
    int kill_node; /* >= 0: SIGKILL it after its REC_READY */
    int arg;       /* scenario's own */
    /* Filled by run_job. */
    struct rec *recs;
    int nrecs, cap;
    double t_kill;
    int status[MAX_NODES];
};

static void *rank_thread(void *p)
{
    struct rank_ctx *x = p;
    x->n->job->fn(x);
    return NULL;
}

/* The body of node `node`'s process. Never returns. */
static void node_main(const struct job *j, int node, int res_fd, int port_fd, int port)
{
    failures = 0; /* the parent's count came along with fork() */
    alarm(CHILD_WATCHDOG_S);
    struct node_ctx n = {.job = j, .node = node, .res_fd = res_fd, .port = port};
    if (j->custom[node]) {
        j->custom[node](&n);
    } else {
        int nn = j->nnodes, nr = node, loc = j->local;
        if (j->claim[node].set) {
            nn = j->claim[node].nnodes;
            nr = j->claim[node].node_rank;
            loc = j->claim[node].local;
        }
        char err[256] = "";
        double t0 = now_s();
        if (port_fd >= 0) {
            /* Node 0 on port 0: learn the port before the others can come. */
            n.g = comm_tcp_open(nn, nr, loc, j->addr, 0, j->timeout_ms, err, sizeof(err));
            int p = n.g ? comm_tcp_port(n.g) : -1;
            if (write(port_fd, &p, sizeof(p)) != (ssize_t)sizeof(p))
                fprintf(stderr, "port pipe: %s\n", strerror(errno));
            close(port_fd);
            if (n.g && comm_tcp_join(n.g, err, sizeof(err)) != 0) {
                comm_tcp_destroy(n.g);
                n.g = NULL;
            }
        } else {
            n.g = comm_tcp_create(nn, nr, loc, j->addr, port, j->timeout_ms, err, sizeof(err));
        }
        struct rec r = {.kind = REC_CREATE, .node = node, .rc = n.g ? 0 : -1, .t = now_s() - t0};
        snprintf(r.msg, sizeof(r.msg), "%s", err);
        send_rec(res_fd, r);
        if (n.g) {
            pthread_t th[MAX_LOCAL];
            struct rank_ctx x[MAX_LOCAL];
            for (int i = 0; i < loc; i++) {
                x[i] = (struct rank_ctx){&n, comm_tcp_rank(n.g, i), i, node * loc + i};
                if (pthread_create(&th[i], NULL, rank_thread, &x[i]) != 0) {
                    fprintf(stderr, "pthread_create failed\n");
                    _exit(1);
                }
            }
            for (int i = 0; i < loc; i++)
                pthread_join(th[i], NULL);
            comm_destroy(x[0].c); /* the group's handle: nothing happens */
            comm_tcp_destroy(n.g);
        }
    }
    send_rec(res_fd, (struct rec){.kind = REC_DONE, .node = node, .bad = failures});
    close(res_fd);
    exit(0);
}

/* A port nobody listens on right now (for a leader that starts late). */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int port = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

static pid_t spawn(const struct job *j, int node, int res[2], int port_fd, int port)
{
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(1);
    }
    if (pid == 0) {
        close(res[0]);
        node_main(j, node, res[1], port_fd, port);
    }
    return pid;
}

static void add_rec(struct job *j, const struct rec *r)
{
    if (j->nrecs == j->cap) {
        j->cap = j->cap ? 2 * j->cap : 64;
        j->recs = realloc(j->recs, (size_t)j->cap * sizeof(*j->recs));
        if (!j->recs) {
            fprintf(stderr, "out of memory\n");
            exit(1);
        }
    }
    j->recs[j->nrecs++] = *r;
}

/* Runs j: forks its nodes, collects their records until every process has
 * closed the pipe (or JOB_S passes), kills kill_node when it is ready, and
 * reaps them all. */
static void run_job(struct job *j)
{
    double t0 = now_s();
    fflush(stdout);
    fflush(stderr);
    int res[2];
    if (pipe(res) != 0) {
        perror("pipe");
        exit(1);
    }
    pid_t pid[MAX_NODES] = {0};
    int port = -1;
    if (j->leader_last) {
        port = free_port();
        for (int k = 1; k < j->nnodes; k++)
            pid[k] = spawn(j, k, res, -1, port);
        sleep_ms(300); /* they retry meanwhile */
        pid[0] = spawn(j, 0, res, -1, port);
    } else {
        int pp[2];
        if (pipe(pp) != 0) {
            perror("pipe");
            exit(1);
        }
        pid[0] = spawn(j, 0, res, pp[1], 0);
        close(pp[1]);
        struct pollfd p = {pp[0], POLLIN, 0};
        if (poll(&p, 1, 20000) != 1 || read(pp[0], &port, sizeof(port)) != (ssize_t)sizeof(port))
            port = -1;
        close(pp[0]);
        CHECK(port > 0);
        for (int k = 1; k < j->nnodes; k++)
            pid[k] = spawn(j, k, res, -1, port > 0 ? port : 1);
    }
    close(res[1]);

    double deadline = now_s() + JOB_S, kill_at = 0;
    int killed = 0;
    char buf[sizeof(struct rec)];
    size_t have = 0;
    for (;;) {
        if (j->kill_node >= 0 && !killed && kill_at > 0 && now_s() >= kill_at) {
            j->t_kill = now_s(); /* before: the survivors may notice at once */
            kill(pid[j->kill_node], SIGKILL);
            killed = 1;
        }
        if (now_s() > deadline) {
            fprintf(stderr, "%s: records still coming after %d s\n", j->name, JOB_S);
            failures++;
            break;
        }
        struct pollfd p = {res[0], POLLIN, 0};
        if (poll(&p, 1, 10) <= 0)
            continue;
        ssize_t n = read(res[0], buf + have, sizeof(buf) - have);
        if (n <= 0)
            break; /* every process has exited (or closed the pipe) */
        have += (size_t)n;
        if (have < sizeof(buf))
            continue;
        have = 0;
        struct rec r;
        memcpy(&r, buf, sizeof(r));
        add_rec(j, &r);
        if (r.kind == REC_READY && r.node == j->kill_node && kill_at == 0)
            kill_at = now_s() + 0.03; /* into the middle of some collective */
    }
    close(res[0]);
    for (int k = 0; k < j->nnodes; k++) {
        int st = 0;
        pid_t w = 0;
        for (int i = 0; i < 2000 && (w = waitpid(pid[k], &st, WNOHANG)) == 0; i++)
            sleep_ms(10);
        if (w == 0) {
            fprintf(stderr, "%s: node %d still running; killing it\n", j->name, k);
            failures++;
            kill(pid[k], SIGKILL);
            waitpid(pid[k], &st, 0);
        }
        j->status[k] = st;
        int want_killed = k == j->kill_node;
        if (want_killed)
            CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
        else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "%s: node %d ended with status 0x%x\n", j->name, k, st);
            failures++;
        }
    }
    /* Failed checks inside the nodes come back in REC_DONE. */
    for (int i = 0; i < j->nrecs; i++)
        if (j->recs[i].kind == REC_DONE && j->recs[i].bad) {
            fprintf(stderr, "%s: node %d: %d check(s) failed\n", j->name, j->recs[i].node,
                    j->recs[i].bad);
            failures += j->recs[i].bad;
        }
    printf("%-28s %d node(s) x %d: %.2f s\n", j->name, j->nnodes, j->local, now_s() - t0);
}

static const struct rec *find_rec(const struct job *j, int kind, int node, int rank)
{
    for (int i = 0; i < j->nrecs; i++) {
        const struct rec *r = &j->recs[i];
        if (r->kind == kind && r->node == node && (rank < 0 || r->rank == rank))
            return r;
    }
    return NULL;
}

static void free_job(struct job *j)
{
    free(j->recs);
    j->recs = NULL;
}

/* Every node joined, and every process finished with every check passed. */
static void check_created(const struct job *j)
{
    for (int k = 0; k < j->nnodes; k++) {
        const struct rec *r = find_rec(j, REC_CREATE, k, -1);
        CHECK(r && r->rc == 0);
        if (r && r->rc != 0)
            fprintf(stderr, "%s: node %d: %s\n", j->name, k, r->msg);
        CHECK(find_rec(j, REC_DONE, k, -1) != NULL);
    }
}

/* ---- The main scenario: results against references --------------------- */

static const int64_t ar_sizes[] = {0,  1,    2,    15,   16,     17,
                                   33, 1000, 2049, 4097, 100003, (1 << 20) + 7};
#define N_AR (int)(sizeof(ar_sizes) / sizeof(ar_sizes[0]))
#define AR_MAX ((1 << 20) + 7)

static void fill_input(float *v, int t, int gr, int tp)
{
    uint64_t s = (uint64_t)t * 1000 + (uint64_t)gr * 7 + (uint64_t)tp * 100000;
    for (int64_t i = 0; i < ar_sizes[t]; i++)
        v[i] = rand_float(&s);
}

static float gather_val(int rank, int64_t i)
{
    return (float)(rank * 1000003 + i) * 0.5f;
}

static void check_gather(struct comm *c, int gr, int tp)
{
    static const int64_t ns[] = {0, 1, 5, 1000, 65537};
    for (size_t t = 0; t < sizeof(ns) / sizeof(ns[0]); t++) {
        int64_t n = ns[t];
        float *send = malloc((size_t)(n ? n : 1) * sizeof(float));
        float *recv = malloc((size_t)(n ? n * tp : 1) * sizeof(float));
        for (int64_t i = 0; i < n; i++)
            send[i] = gather_val(gr, i);
        for (int in_place = 0; in_place < 2; in_place++) {
            for (int64_t i = 0; i < n * tp; i++)
                recv[i] = -1.0f;
            const float *src = send;
            if (in_place) {
                memcpy(recv + (int64_t)gr * n, send, (size_t)n * sizeof(float));
                src = recv + (int64_t)gr * n;
            }
            CHECK(comm_allgather_f32(c, src, n, recv) == 0);
            int bad = 0;
            for (int s = 0; s < tp; s++)
                for (int64_t i = 0; i < n; i++)
                    bad += recv[(int64_t)s * n + i] != gather_val(s, i);
            CHECK(bad == 0);
        }
        free(send);
        free(recv);
    }
}

static void check_broadcast(struct comm *c, int gr, int tp)
{
    static const size_t sizes[] = {0, 1, 13, 100001};
    unsigned char *buf = malloc(100001);
    for (int root = 0; root < tp; root++) {
        for (size_t t = 0; t < sizeof(sizes) / sizeof(sizes[0]); t++) {
            size_t bytes = sizes[t];
            for (size_t i = 0; i < bytes; i++)
                buf[i] = (unsigned char)(gr * 31 + i * 7 + t);
            CHECK(comm_broadcast(c, buf, bytes, root) == 0);
            int bad = 0;
            for (size_t i = 0; i < bytes; i++)
                bad += buf[i] != (unsigned char)(root * 31 + i * 7 + t);
            CHECK(bad == 0);
        }
    }
    free(buf);
}

/* 500 small collectives of every kind, back to back. */
static void check_stress(struct comm *c, int gr, int tp)
{
    int bad = 0;
    for (int it = 0; it < 500; it++) {
        /* Integers: exact in any order, so the expected sum is plain. */
        float v[3] = {(float)(gr + it), (float)(gr * it % 97), 1.0f};
        float want0 = 0, want1 = 0;
        for (int s = 0; s < tp; s++) {
            want0 += (float)(s + it);
            want1 += (float)(s * it % 97);
        }
        switch (it % 4) {
        case 0:
            bad += comm_allreduce_f32(c, v, 3) != 0;
            bad += v[0] != want0 || v[1] != want1 || v[2] != (float)tp;
            break;
        case 1:
            bad += comm_barrier(c) != 0;
            break;
        case 2: {
            int x = gr == it % tp ? it : -1;
            bad += comm_broadcast(c, &x, sizeof(x), it % tp) != 0;
            bad += x != it;
            break;
        }
        case 3: {
            float g[2 * MAX_TP];
            float mine[2] = {(float)gr, (float)it};
            bad += comm_allgather_f32(c, mine, 2, g) != 0;
            for (int s = 0; s < tp; s++)
                bad += g[2 * s] != (float)s || g[2 * s + 1] != (float)it;
            break;
        }
        }
    }
    CHECK(bad == 0);
}

static void main_rank(struct rank_ctx *x)
{
    const struct job *j = x->n->job;
    struct comm *c = x->c;
    int tp = j->nnodes * j->local;
    CHECK(comm_rank(c) == x->gr && comm_size(c) == tp);
    CHECK(comm_tcp_rank(x->n->g, x->lr) == c);
    float *buf = malloc((size_t)AR_MAX * sizeof(float));
    /* Twice through: the second round reuses grown scratch. */
    for (int round = 0; round < 2; round++) {
        for (int t = 0; t < N_AR; t++) {
            fill_input(buf, t, x->gr, tp);
            struct rec r = {
                .kind = REC_AR, .node = x->n->node, .rank = x->gr, .tcase = round * N_AR + t};
            r.rc = comm_allreduce_f32(c, ar_sizes[t] ? buf : NULL, ar_sizes[t]);
            r.hash = fnv1a(buf, (size_t)ar_sizes[t] * sizeof(float));
            if (r.rc)
                snprintf(r.msg, sizeof(r.msg), "%s", comm_error(c));
            send_rec(x->n->res_fd, r);
        }
    }
    check_gather(c, x->gr, tp);
    check_broadcast(c, x->gr, tp);
    check_stress(c, x->gr, tp);

    /* Arguments wrong alike everywhere: every rank fails, none waits, the
     * group goes on. */
    float v[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    CHECK(comm_broadcast(c, v, 4, tp) == -1 && strstr(comm_error(c), "root"));
    CHECK(comm_allreduce_f32(c, v, -1) == -1 && strstr(comm_error(c), "element count"));
    CHECK(comm_allgather_f32(c, v, -3, v) == -1);
    CHECK(v[0] == 1.0f);
    CHECK(comm_allreduce_f32(c, v, 8) == 0 && v[0] == (float)tp && v[7] == (float)tp);

    double bw = comm_allreduce_busbw(c, buf, (size_t)1 << 20, 3);
    CHECK(bw > 0.0);
    if (x->gr == 0)
        printf("  tcp allreduce busbw, %d node(s) x %d, 1 MiB: %.3f GB/s\n", j->nnodes, j->local,
               bw / 1e9);
    CHECK(comm_sync(c) == 0);
    CHECK(comm_barrier(c) == 0);
    free(buf);
}

/* The parent's side: the reference in the documented order, and every
 * rank's hash of every case. */
static void check_main(const struct job *j)
{
    check_created(j);
    int tp = j->nnodes * j->local;
    float *in[MAX_TP];
    float *ref = malloc((size_t)AR_MAX * sizeof(float));
    for (int r = 0; r < tp; r++)
        in[r] = malloc((size_t)AR_MAX * sizeof(float));
    int64_t order_differs = 0;
    for (int t = 0; t < N_AR; t++) {
        int64_t n = ar_sizes[t];
        for (int r = 0; r < tp; r++)
            fill_input(in[r], t, r, tp);
        for (int64_t i = 0; i < n; i++) {
            float acc = 0;
            for (int k = 0; k < j->nnodes; k++) {
                float part = in[k * j->local][i];
                for (int l = 1; l < j->local; l++)
                    part += in[k * j->local + l][i];
                acc = k == 0 ? part : acc + part;
            }
            ref[i] = acc;
            float flat = in[0][i];
            for (int r = 1; r < tp; r++)
                flat += in[r][i];
            order_differs += memcmp(&flat, &acc, sizeof(float)) != 0;
        }
        uint64_t want = fnv1a(ref, (size_t)n * sizeof(float));
        for (int round = 0; round < 2; round++) {
            for (int r = 0; r < tp; r++) {
                const struct rec *got = NULL;
                for (int i = 0; i < j->nrecs && !got; i++)
                    if (j->recs[i].kind == REC_AR && j->recs[i].rank == r &&
                        j->recs[i].tcase == round * N_AR + t)
                        got = &j->recs[i];
                CHECK(got && got->rc == 0);
                if (got && got->rc == 0 && got->hash != want) {
                    fprintf(stderr, "%s: allreduce n=%lld round %d: rank %d's bits differ\n",
                            j->name, (long long)n, round, r);
                    failures++;
                }
                if (got && got->rc != 0)
                    fprintf(stderr, "%s: rank %d: %s\n", j->name, r, got->msg);
            }
        }
    }
    /* With two levels the documented order is not the flat one: the
     * hashes above could tell them apart. */
    if (j->nnodes > 1 && j->local > 1)
        CHECK(order_differs > 0);
    for (int r = 0; r < tp; r++)
        free(in[r]);
    free(ref);
}

/* ---- Smaller scenarios -------------------------------------------------- */

/* An all-reduce of integers and a broadcast from the last rank. */
static void small_rank(struct rank_ctx *x)
{
    struct comm *c = x->c;
    int tp = comm_size(c);
    float v[1000];
    for (int i = 0; i < 1000; i++)
        v[i] = (float)(x->gr * 1000 + i);
    CHECK(comm_allreduce_f32(c, v, 1000) == 0);
    int bad = 0;
    for (int i = 0; i < 1000; i++)
        bad += v[i] != (float)(1000 * (tp * (tp - 1) / 2) + tp * i);
    CHECK(bad == 0);
    int word = x->gr == tp - 1 ? 12345 : 0;
    CHECK(comm_broadcast(c, &word, sizeof(word), tp - 1) == 0 && word == 12345);
    CHECK(comm_barrier(c) == 0);
    send_rec(x->n->res_fd, (struct rec){.kind = REC_RESULT, .node = x->n->node, .rank = x->gr});
}

static void check_small(const struct job *j)
{
    check_created(j);
    for (int r = 0; r < j->nnodes * j->local; r++) {
        const struct rec *rr = NULL;
        for (int i = 0; i < j->nrecs && !rr; i++)
            if (j->recs[i].kind == REC_RESULT && j->recs[i].rank == r)
                rr = &j->recs[i];
        CHECK(rr != NULL);
    }
}

/* All-reduces until one fails; node arg's local rank 0 says when it is in
 * the loop. Reports the failure and when it came. */
static void loop_rank(struct rank_ctx *x)
{
    struct comm *c = x->c;
    int64_t n = 65536;
    float *buf = malloc((size_t)n * sizeof(float));
    int rc = 0, it;
    for (it = 0; it < 20000 && rc == 0; it++) {
        for (int64_t i = 0; i < n; i++)
            buf[i] = 1.0f;
        if (it == 20 && x->lr == 0 && x->n->node == x->n->job->kill_node)
            send_rec(x->n->res_fd, (struct rec){.kind = REC_READY, .node = x->n->node});
        rc = comm_allreduce_f32(c, buf, n);
        if (rc == 0)
            CHECK(buf[0] == (float)comm_size(c) && buf[n - 1] == (float)comm_size(c));
    }
    struct rec r = {
        .kind = REC_RESULT, .node = x->n->node, .rank = x->gr, .rc = rc, .t = now_s(), .tcase = it};
    snprintf(r.msg, sizeof(r.msg), "%s", comm_error(c));
    send_rec(x->n->res_fd, r);
    /* Sticky: every later call fails at once. */
    double t0 = now_s();
    CHECK(comm_allreduce_f32(c, buf, n) == -1);
    CHECK(comm_barrier(c) == -1);
    CHECK(comm_sync(c) == -1);
    CHECK(now_s() - t0 < 1.0);
    free(buf);
}

/* The killed node's survivors: every rank failed, soon after the kill,
 * with a reason naming `name` (or, relayed, the node that relayed it). */
static void check_killed(const struct job *j, const char *name, const char *relay)
{
    CHECK(j->t_kill > 0);
    for (int k = 0; k < j->nnodes; k++) {
        if (k == j->kill_node)
            continue;
        for (int l = 0; l < j->local; l++) {
            const struct rec *r = find_rec(j, REC_RESULT, k, k * j->local + l);
            CHECK(r != NULL);
            if (!r)
                continue;
            CHECK(r->rc == -1);
            CHECK(r->tcase > 20); /* the collectives ran before the kill */
            double after = r->t - j->t_kill;
            CHECK(after >= 0 && after < 5.0); /* a closed socket, not the 20 s timeout */
            int named = strstr(r->msg, name) || (relay && strstr(r->msg, relay));
            CHECK(named);
            if (!named || after >= 5.0 || after < 0)
                fprintf(stderr, "%s: node %d rank %d after %.3f s: %s\n", j->name, k,
                        k * j->local + l, after, r->msg);
            if (k == 0 && l == 0)
                printf("  node 0 rank 0, %.3f s after the kill: %s\n", after, r->msg);
            if (k == 1 && l == 0 && j->kill_node != 1)
                printf("  node 1 rank %d, %.3f s after the kill: %s\n", j->local, after, r->msg);
        }
    }
}

/* Node 1's last rank aborts (comm_abort through its handle, without
 * calling a collective); every other rank waits in a barrier. */
static void abort_rank(struct rank_ctx *x)
{
    struct comm *c = x->c;
    const struct job *j = x->n->job;
    if (x->n->node == 1 && x->lr == j->local - 1) {
        sleep_ms(200);
        double t = now_s();
        comm_abort(c, "engine stopping");
        comm_abort(c, "a second reason, ignored");
        send_rec(x->n->res_fd, (struct rec){.kind = REC_ABORTED, .node = 1, .rank = x->gr, .t = t});
        return;
    }
    struct rec r = {.kind = REC_RESULT, .node = x->n->node, .rank = x->gr};
    r.rc = comm_barrier(c);
    r.t = now_s();
    snprintf(r.msg, sizeof(r.msg), "%s", comm_error(c));
    send_rec(x->n->res_fd, r);
    float v = 1;
    CHECK(comm_allreduce_f32(c, &v, 1) == -1);
    CHECK(comm_sync(c) == -1);
    CHECK(strstr(comm_error(c), "engine stopping") && !strstr(comm_error(c), "ignored"));
}

/* Node 1 comes to the barrier late (job.arg ms); node 0 must not wait
 * longer than timeout_ms. */
static void late_rank(struct rank_ctx *x)
{
    if (x->n->node == 1)
        sleep_ms(x->n->job->arg);
    struct rec r = {.kind = REC_RESULT, .node = x->n->node, .rank = x->gr};
    double t0 = now_s();
    r.rc = comm_barrier(x->c);
    r.t = now_s() - t0;
    snprintf(r.msg, sizeof(r.msg), "%s", comm_error(x->c));
    send_rec(x->n->res_fd, r);
}

/* Node 1 asks for one element more than node 0. */
static void mismatch_rank(struct rank_ctx *x)
{
    float v[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    CHECK(comm_allreduce_f32(x->c, v, 4) == 0 && v[0] == 2.0f);
    struct rec r = {.kind = REC_RESULT, .node = x->n->node, .rank = x->gr};
    r.rc = comm_allreduce_f32(x->c, v, x->n->node == 1 ? 5 : 4);
    snprintf(r.msg, sizeof(r.msg), "%s", comm_error(x->c));
    send_rec(x->n->res_fd, r);
}

/* ---- Raw clients: what is not a comm_tcp node -------------------------- */

static int raw_connect(int port)
{
    for (int i = 0; i < 200; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET,
                                .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0)
            return fd;
        if (fd >= 0)
            close(fd);
        sleep_ms(20);
    }
    return -1;
}

static void put_le(unsigned char *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* A hello from protocol version 99: the header is 40 bytes, magic
 * 0x43544649 then the version at offset 4 (every version keeps those two
 * first); node 0 must refuse it with a refusal frame (op 3). */
static void version_client(struct node_ctx *n)
{
    struct rec r = {.kind = REC_RESULT, .node = n->node, .rank = n->node, .rc = -1};
    int fd = raw_connect(n->port);
    unsigned char h[40 + 12] = {0};
    put_le(h, 0x43544649u, 4);
    put_le(h + 4, 99, 2);  /* version */
    put_le(h + 6, 1, 2);   /* hello */
    put_le(h + 8, 1, 4);   /* node 1 */
    put_le(h + 32, 12, 8); /* payload */
    put_le(h + 40, 2, 4);  /* nnodes */
    put_le(h + 44, 1, 4);  /* local */
    uint32_t probe = 0x01020304u;
    memcpy(h + 48, &probe, 4);
    unsigned char back[40];
    size_t got = 0;
    if (fd >= 0 && write(fd, h, sizeof(h)) == (ssize_t)sizeof(h)) {
        struct pollfd p = {fd, POLLIN, 0};
        while (got < sizeof(back) && poll(&p, 1, 10000) == 1) {
            ssize_t k = read(fd, back + got, sizeof(back) - got);
            if (k <= 0)
                break;
            got += (size_t)k;
        }
    }
    if (got == sizeof(back))
        r.rc = back[6] | back[7] << 8;
    send_rec(n->res_fd, r);
    if (fd >= 0)
        close(fd);
}

/* Garbage, then a connection that closes at once, then a real node: the
 * garbage must not stop node 0 waiting for it. */
static void stray_client(struct node_ctx *n)
{
    int fd = raw_connect(n->port);
    unsigned char junk[40];
    memset(junk, 0x5a, sizeof(junk));
    if (fd >= 0) {
        CHECK(write(fd, junk, sizeof(junk)) == (ssize_t)sizeof(junk));
        close(fd);
    }
    fd = raw_connect(n->port);
    if (fd >= 0)
        close(fd);
    char err[256] = "";
    n->g = comm_tcp_create(2, 1, 1, LOCALHOST, n->port, TIMEOUT_MS, err, sizeof(err));
    send_rec(n->res_fd, (struct rec){.kind = REC_CREATE, .node = 1, .rc = n->g ? 0 : -1});
    if (!n->g) {
        fprintf(stderr, "stray: node 1: %s\n", err);
        return;
    }
    struct rank_ctx x = {n, comm_tcp_rank(n->g, 0), 0, 1};
    small_rank(&x);
    comm_tcp_destroy(n->g);
}

/* ---- In-process checks -------------------------------------------------- */

static void test_args(void)
{
    struct {
        int nn, nr, loc;
        const char *addr;
        int port;
        const char *want;
    } bad[] = {
        {0, 0, 1, LOCALHOST, 1234, "nnodes"},
        {2, 2, 1, LOCALHOST, 1234, "node rank"},
        {2, -1, 1, LOCALHOST, 1234, "node rank"},
        {2, 0, 0, LOCALHOST, 1234, "local"},
        {2, 1, 1, NULL, 1234, "address"},
        {2, 1, 1, "", 1234, "address"},
        {2, 1, 1, LOCALHOST, 0, "port"},
        {2, 0, 1, LOCALHOST, 70000, "port"},
        {2, 0, 1, "not-an-address-at-all", 0, "resolve"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char err[256] = "";
        struct comm_tcp_group *g = comm_tcp_create(bad[i].nn, bad[i].nr, bad[i].loc, bad[i].addr,
                                                   bad[i].port, 1000, err, sizeof(err));
        CHECK(g == NULL);
        CHECK(strstr(err, bad[i].want) != NULL);
        if (!strstr(err, bad[i].want))
            fprintf(stderr, "args case %zu: \"%s\"\n", i, err);
        comm_tcp_destroy(g);
    }
    comm_tcp_destroy(NULL);

    /* A group that has not joined fails every call, saying so. */
    char err[256] = "";
    struct comm_tcp_group *g = comm_tcp_open(2, 0, 1, LOCALHOST, 0, 1000, err, sizeof(err));
    CHECK(g != NULL);
    if (g) {
        CHECK(comm_tcp_port(g) > 0);
        CHECK(comm_tcp_rank(g, 1) == NULL && comm_tcp_rank(g, -1) == NULL);
        float v = 1;
        CHECK(comm_allreduce_f32(comm_tcp_rank(g, 0), &v, 1) == -1);
        CHECK(strstr(comm_error(comm_tcp_rank(g, 0)), "not joined") != NULL);
        comm_tcp_destroy(g);
    }
}

/* One node, three ranks: no sockets; the sum is comm_cpu's rank order. */
struct one_node {
    struct comm_tcp_group *g;
    float in[3][100];
};

static void *one_node_rank(void *p)
{
    void **a = p;
    struct one_node *k = a[0];
    int r = (int)(intptr_t)a[1];
    struct comm *c = comm_tcp_rank(k->g, r);
    float v[100];
    memcpy(v, k->in[r], sizeof(v));
    CHECK(comm_rank(c) == r && comm_size(c) == 3);
    CHECK(comm_allreduce_f32(c, v, 100) == 0);
    int bad = 0;
    for (int i = 0; i < 100; i++) {
        float want = k->in[0][i] + k->in[1][i] + k->in[2][i];
        bad += memcmp(&v[i], &want, sizeof(float)) != 0;
    }
    CHECK(bad == 0);
    int word = r == 2 ? 7 : 0;
    CHECK(comm_broadcast(c, &word, sizeof(word), 2) == 0 && word == 7);
    CHECK(comm_barrier(c) == 0);
    CHECK(comm_sync(c) == 0);
    return NULL;
}

static void test_one_node(void)
{
    char err[256] = "";
    struct one_node k;
    /* An address is not needed with one node. */
    k.g = comm_tcp_create(1, 0, 3, NULL, 0, 1000, err, sizeof(err));
    CHECK(k.g != NULL);
    if (!k.g) {
        fprintf(stderr, "one node: %s\n", err);
        return;
    }
    uint64_t s = 5;
    for (int r = 0; r < 3; r++)
        for (int i = 0; i < 100; i++)
            k.in[r][i] = rand_float(&s);
    pthread_t th[3];
    void *args[3][2];
    for (int r = 0; r < 3; r++) {
        args[r][0] = &k;
        args[r][1] = (void *)(intptr_t)r;
        pthread_create(&th[r], NULL, one_node_rank, args[r]);
    }
    for (int r = 0; r < 3; r++)
        pthread_join(th[r], NULL);
    comm_tcp_destroy(k.g);
}

/* Nobody listening: a follower gives up after timeout_ms. Node 0 with
 * nobody coming: the same. */
static void test_join_timeouts(void)
{
    int lfd = socket(AF_INET, SOCK_STREAM, 0); /* bound, not listening: refused */
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    CHECK(bind(lfd, (struct sockaddr *)&a, sizeof(a)) == 0);
    CHECK(getsockname(lfd, (struct sockaddr *)&a, &len) == 0);
    char err[256] = "";
    double t0 = now_s();
    struct comm_tcp_group *g =
        comm_tcp_create(2, 1, 1, LOCALHOST, ntohs(a.sin_port), 300, err, sizeof(err));
    double dt = now_s() - t0;
    CHECK(g == NULL && strstr(err, "could not connect") && strstr(err, "node 1"));
    CHECK(dt >= 0.25 && dt < 5.0);
    printf("  no leader, %.2f s: %s\n", dt, err);
    close(lfd);

    t0 = now_s();
    g = comm_tcp_create(3, 0, 1, LOCALHOST, 0, 300, err, sizeof(err));
    dt = now_s() - t0;
    CHECK(g == NULL && strstr(err, "timed out") && strstr(err, "0 of 2"));
    CHECK(dt >= 0.25 && dt < 5.0);
    printf("  no followers, %.2f s: %s\n", dt, err);
}

/* An abort from another thread ends node 0's wait for the others. */
static void *abort_later(void *p)
{
    sleep_ms(100);
    comm_tcp_abort(p, "stop joining");
    return NULL;
}

static void test_abort_join(void)
{
    char err[256] = "";
    struct comm_tcp_group *g = comm_tcp_open(2, 0, 1, LOCALHOST, 0, TIMEOUT_MS, err, sizeof(err));
    CHECK(g != NULL);
    if (!g)
        return;
    pthread_t th;
    pthread_create(&th, NULL, abort_later, g);
    double t0 = now_s();
    CHECK(comm_tcp_join(g, err, sizeof(err)) == -1);
    CHECK(now_s() - t0 < 5.0);
    CHECK(strstr(err, "stop joining") != NULL);
    pthread_join(th, NULL);
    CHECK(comm_tcp_join(g, err, sizeof(err)) == -1); /* once only */
    comm_tcp_destroy(g);
}

static int have_ipv6_loopback(void)
{
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    if (fd < 0)
        return 0;
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    int ok = bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
    close(fd);
    return ok;
}

/* ---- The jobs ---------------------------------------------------------- */

static struct job job_defaults(const char *name, int nnodes, int local, rank_fn fn)
{
    return (struct job){.name = name,
                        .nnodes = nnodes,
                        .local = local,
                        .addr = LOCALHOST,
                        .timeout_ms = TIMEOUT_MS,
                        .fn = fn,
                        .kill_node = -1};
}

static void test_main_jobs(void)
{
    static const int shapes[][2] = {{2, 1}, {2, 2}, {3, 1}, {3, 2}};
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        struct job j = job_defaults("main", shapes[s][0], shapes[s][1], main_rank);
        run_job(&j);
        check_main(&j);
        free_job(&j);
    }
}

static void test_small_jobs(void)
{
    struct job j = job_defaults("followers first", 3, 1, small_rank);
    j.leader_last = 1;
    run_job(&j);
    check_small(&j);
    free_job(&j);

    if (have_ipv6_loopback()) {
        j = job_defaults("ipv6 ::1", 2, 2, small_rank);
        j.addr = "::1";
        run_job(&j);
        check_small(&j);
        free_job(&j);
    } else {
        printf("ipv6: no ::1 here, skipped\n");
    }

    j = job_defaults("stray connections", 2, 1, small_rank);
    j.custom[1] = stray_client;
    run_job(&j);
    check_small(&j);
    free_job(&j);
}

static void test_kills(void)
{
    /* A follower dies: node 0 notices its socket close (not the timeout),
     * and the other follower is told. */
    struct job j = job_defaults("kill follower", 3, 2, loop_rank);
    j.kill_node = 2;
    run_job(&j);
    check_killed(&j, "node 2", "node 0");
    free_job(&j);

    j = job_defaults("kill follower", 2, 1, loop_rank);
    j.kill_node = 1;
    run_job(&j);
    check_killed(&j, "node 1", NULL);
    free_job(&j);

    /* The leader dies: every follower's ranks fail, naming node 0. */
    j = job_defaults("kill leader", 3, 2, loop_rank);
    j.kill_node = 0;
    run_job(&j);
    check_killed(&j, "node 0", NULL);
    free_job(&j);
}

static void test_abort(void)
{
    struct job j = job_defaults("abort on node 1", 2, 2, abort_rank);
    run_job(&j);
    check_created(&j);
    const struct rec *a = find_rec(&j, REC_ABORTED, 1, -1);
    CHECK(a != NULL);
    for (int gr = 0; gr < 3 && a; gr++) { /* rank 3 is the aborter */
        const struct rec *r = find_rec(&j, REC_RESULT, gr / 2, gr);
        CHECK(r && r->rc == -1);
        if (!r)
            continue;
        CHECK(r->t >= a->t && r->t - a->t < 5.0);
        CHECK(strstr(r->msg, "aborted: ") == r->msg && strstr(r->msg, "engine stopping"));
        if (gr < 2) /* node 0 heard it from node 1 */
            CHECK(strstr(r->msg, "node 1 aborted: engine stopping") != NULL);
        if (gr == 0)
            printf("  rank 0, %.3f s after the abort: %s\n", r->t - a->t, r->msg);
    }
    free_job(&j);
}

static void test_timeout(void)
{
    struct job j = job_defaults("timeout", 2, 1, late_rank);
    j.timeout_ms = 500;
    j.arg = 1500;
    run_job(&j);
    check_created(&j);
    const struct rec *r0 = find_rec(&j, REC_RESULT, 0, 0), *r1 = find_rec(&j, REC_RESULT, 1, 1);
    CHECK(r0 && r0->rc == -1 && strstr(r0->msg, "node 1") && strstr(r0->msg, "timed out"));
    CHECK(r0 && r0->t >= 0.45 && r0->t < 5.0);
    if (r0)
        printf("  node 0 after %.3f s: %s\n", r0->t, r0->msg);
    CHECK(r1 && r1->rc == -1);
    if (r1)
        printf("  node 1: %s\n", r1->msg);
    free_job(&j);
}

static void test_mismatch(void)
{
    struct job j = job_defaults("mismatch across nodes", 2, 1, mismatch_rank);
    run_job(&j);
    check_created(&j);
    const struct rec *r0 = find_rec(&j, REC_RESULT, 0, 0), *r1 = find_rec(&j, REC_RESULT, 1, 1);
    CHECK(r0 && r0->rc == -1 && strstr(r0->msg, "collective mismatch"));
    CHECK(r0 && strstr(r0->msg, "n=5") && strstr(r0->msg, "n=4"));
    CHECK(r1 && r1->rc == -1 && strstr(r1->msg, "mismatch"));
    if (r0)
        printf("  node 0: %s\n", r0->msg);
    if (r1)
        printf("  node 1: %s\n", r1->msg);
    free_job(&j);
}

/* Node 0's create failed with want0; every follower's with "refused". */
static void check_refused(const struct job *j, const char *want0)
{
    const struct rec *r = find_rec(j, REC_CREATE, 0, -1);
    CHECK(r && r->rc == -1 && strstr(r->msg, want0));
    CHECK(r && r->t < 5.0); /* at once, not at the timeout */
    if (r)
        printf("  node 0: %s\n", r->msg);
    for (int k = 1; k < j->nnodes; k++) {
        if (j->custom[k])
            continue;
        r = find_rec(j, REC_CREATE, k, -1);
        CHECK(r && r->rc == -1 && strstr(r->msg, "refused by node 0"));
        CHECK(r && r->t < 5.0);
        if (r)
            printf("  node %d: %s\n", k, r->msg);
    }
}

static void test_hellos(void)
{
    struct job j = job_defaults("hello: other local", 2, 2, small_rank);
    j.claim[1] = (struct claim){1, 2, 1, 1};
    run_job(&j);
    check_refused(&j, "local=1");
    free_job(&j);

    j = job_defaults("hello: other nnodes", 2, 2, small_rank);
    j.claim[1] = (struct claim){1, 3, 1, 2};
    run_job(&j);
    check_refused(&j, "nnodes=3");
    free_job(&j);

    j = job_defaults("hello: node rank twice", 3, 1, small_rank);
    j.claim[2] = (struct claim){1, 3, 1, 1};
    run_job(&j);
    check_refused(&j, "joined twice");
    free_job(&j);

    j = job_defaults("hello: version 99", 2, 1, small_rank);
    j.custom[1] = version_client;
    run_job(&j);
    check_refused(&j, "version 99");
    const struct rec *r = find_rec(&j, REC_RESULT, 1, -1);
    CHECK(r && r->rc == 3); /* a refusal frame came back */
    free_job(&j);
}

int main(void)
{
    alarm(WATCHDOG_S); /* a hang kills the test (SIGALRM), never the CI run */
    signal(SIGPIPE, SIG_IGN);

    test_args();
    test_one_node();
    test_join_timeouts();
    test_abort_join();
    test_main_jobs();
    test_small_jobs();
    test_kills();
    test_abort();
    test_timeout();
    test_mismatch();
    test_hellos();

    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", (int)failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
