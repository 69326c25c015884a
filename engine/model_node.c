/* model_node.c: multi-node tensor parallelism's control plane (proto/
 * control.md, engine/ctl.h). The leader (node 0) plans each step and sends
 * it to every follower before running its own ranks; a follower mirrors
 * the step's block tables into its cache, runs its ranks (the tensors go
 * through the communicator, comm_tcp on the CPU) and answers STEP_DONE.
 * The control connection is master_port + 1 (the communicator has
 * master_port). Every wait is bounded: a follower that dies or stops
 * answering fails the leader's step and every later one, saying which
 * node; a leader that goes away ends its followers. Engine thread (the
 * leader's) or the follower's main thread. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "engine/comm.h"
#include "engine/ctl.h"
#include "engine/kv_cache.h"
#include "engine/model_internal.h"

#define NODE_TIMEOUT_MS 120000 /* joining, and a step's answer */

struct tp_node {
    int nnodes, node_rank;
    int *fd;             /* leader: (nnodes) control connection of each follower */
    int lfd;             /* leader: the listening socket until all joined */
    int leader_fd;       /* follower: to the leader */
    uint32_t tx, *rx;    /* next sequence number sent; expected per peer */
    uint32_t rx_leader;
    uint64_t step;       /* the last step sent (leader) */
    uint64_t acked;      /* the last step every follower answered (leader) */
    /* leader: the followers' GPUs, from their HELLO: the least free memory
     * of any, and that GPU's total (0 on the CPU) */
    int64_t peer_free, peer_total;
    atomic_int broken;   /* a failure ended the job: every step fails; set
                          * after why, read by any thread (model_failed) */
    char why[256];
    struct ctl_buf buf;
    uint8_t *in;         /* a received payload */
    size_t in_cap;
};

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec * 1e-6;
}

static int write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Reads n bytes within the deadline; -1 on EOF, error or timeout (errno
 * ETIMEDOUT for the last). */
static int read_all(int fd, void *p, size_t n, double deadline)
{
    char *c = p;
    while (n) {
        double left = deadline - now_ms();
        if (left <= 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        struct pollfd pf = {fd, POLLIN, 0};
        int r = poll(&pf, 1, left > 1e9 ? -1 : (int)left + 1); /* far: no limit */
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = ETIMEDOUT;
            return -1;
        }
        ssize_t got = recv(fd, c, n, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            if (got == 0)
                errno = ECONNRESET;
            return -1;
        }
        c += got;
        n -= (size_t)got;
    }
    return 0;
}

/* Reads one message from fd, its sequence number checked against *rx:
 * header into *h, payload into nd->in. */
static int read_msg(struct tp_node *nd, int fd, uint32_t *rx, struct ctl_header *h,
                    double deadline, const char *peer, char *err, size_t errlen)
{
    uint8_t hb[CTL_HEADER_BYTES];
    char why[200];
    if (read_all(fd, hb, sizeof(hb), deadline)) {
        snprintf(err, errlen, "%s: %s", peer,
                 errno == ETIMEDOUT ? "no answer in time" : "connection lost");
        return -1;
    }
    if (ctl_header_decode(hb, *rx, h, why, sizeof(why))) {
        snprintf(err, errlen, "%s: %s", peer, why);
        return -1;
    }
    if (h->length > nd->in_cap) {
        uint8_t *p = realloc(nd->in, h->length);
        if (!p) {
            snprintf(err, errlen, "%s: out of memory for a %u-byte message", peer, h->length);
            return -1;
        }
        nd->in = p;
        nd->in_cap = h->length;
    }
    if (h->length && read_all(fd, nd->in, h->length, deadline)) {
        snprintf(err, errlen, "%s: connection lost mid-message", peer);
        return -1;
    }
    (*rx)++;
    return 0;
}

static int send_buf(struct tp_node *nd, int fd)
{
    int rc = write_all(fd, nd->buf.p, nd->buf.len);
    nd->buf.len = 0;
    return rc;
}

static void node_fail(struct model *m, const char *why)
{
    struct tp_node *nd = m->node;
    if (!atomic_load(&nd->broken)) {
        snprintf(nd->why, sizeof(nd->why), "%s", why);
        atomic_store(&nd->broken, 1);
        fprintf(stderr, "inferd: tensor parallel job stopped: %s\n", why);
    }
    /* no rank of this node may wait on a peer that will not come (on the
     * CPU one abort stops the node's group; an NCCL handle is per rank) */
    for (int r = 0; m->rank && r < m->n_local; r++)
        if (m->rank[r] && m->rank[r]->comm)
            comm_abort(m->rank[r]->comm, why);
}

static int resolve(const char *addr, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    char ps[16];
    snprintf(ps, sizeof(ps), "%d", port);
    if (getaddrinfo(addr, ps, &hints, &res) != 0 || !res)
        return -1;
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* ------------------------------------------------------------ leader */

int model_node_leader(struct model *m, int nnodes, const char *addr, int port, char *err,
                      size_t errlen)
{
    struct tp_node *nd = calloc(1, sizeof(*nd));
    if (!nd)
        goto oom;
    m->node = nd;
    nd->nnodes = nnodes;
    nd->lfd = -1;
    nd->leader_fd = -1;
    nd->fd = malloc((size_t)nnodes * sizeof(int));
    nd->rx = calloc((size_t)nnodes, sizeof(uint32_t));
    if (!nd->fd || !nd->rx)
        goto oom;
    for (int i = 0; i < nnodes; i++)
        nd->fd[i] = -1;
    struct sockaddr_storage ss;
    socklen_t sl;
    if (resolve(addr, port + 1, &ss, &sl)) {
        snprintf(err, errlen, "--master-addr %s: cannot resolve", addr);
        return -1;
    }
    nd->lfd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (nd->lfd < 0 || setsockopt(nd->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
        bind(nd->lfd, (struct sockaddr *)&ss, sl) || listen(nd->lfd, nnodes)) {
        snprintf(err, errlen, "control plane: cannot listen on %s port %d: %s", addr, port + 1,
                 strerror(errno));
        return -1;
    }
    uint64_t fp = ctl_fingerprint(&m->cfg);
    double deadline = now_ms() + NODE_TIMEOUT_MS;
    for (int joined = 1; joined < nnodes;) {
        struct pollfd pf = {nd->lfd, POLLIN, 0};
        int left = (int)(deadline - now_ms());
        if (left <= 0 || poll(&pf, 1, left) <= 0) {
            snprintf(err, errlen, "control plane: %d of %d follower nodes joined in %d s",
                     joined - 1, nnodes - 1, NODE_TIMEOUT_MS / 1000);
            return -1;
        }
        int fd = accept4(nd->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        struct ctl_header h;
        struct ctl_hello hi;
        uint32_t rx = 0;
        char why[256];
        uint16_t code = 0;
        if (read_msg(nd, fd, &rx, &h, deadline, "a joining node", why, sizeof(why)) ||
            h.type != CTL_HELLO ||
            ctl_decode_hello(nd->in, h.length, &hi, why, sizeof(why))) {
            if (h.type != CTL_HELLO)
                snprintf(why, sizeof(why), "first message is not HELLO");
            code = CTL_REFUSE_VERSION;
        } else if (hi.nnodes != nnodes || hi.tp != m->tp) {
            snprintf(why, sizeof(why), "node %u has %u nodes and %u ranks, the leader %d and %d",
                     hi.node_rank, hi.nnodes, hi.tp, nnodes, m->tp);
            code = CTL_REFUSE_SIZES;
        } else if (!(hi.flags & CTL_HELLO_CUDA) != !m->tpg) {
            snprintf(why, sizeof(why), "node %u runs on the %s, the leader on the %s",
                     hi.node_rank, hi.flags & CTL_HELLO_CUDA ? "GPU" : "CPU",
                     m->tpg ? "GPU" : "CPU");
            code = CTL_REFUSE_SIZES;
        } else if (nd->fd[hi.node_rank] >= 0) {
            snprintf(why, sizeof(why), "node rank %u joined twice", hi.node_rank);
            code = CTL_REFUSE_DUPLICATE;
        } else if (hi.fingerprint != fp) {
            snprintf(why, sizeof(why), "node %u loaded a model of another shape", hi.node_rank);
            code = CTL_REFUSE_MODEL;
        }
        if (code) {
            char e2[64];
            if (ctl_encode_refuse(&nd->buf, 0, code, why, e2, sizeof(e2)) == 0)
                send_buf(nd, fd);
            close(fd);
            fprintf(stderr, "inferd: control plane: refused a node: %s\n", why);
            /* garbage on the port may be a stray client: keep waiting; a
             * node that says HELLO and does not fit can only mean the job
             * is misconfigured: it will never form */
            if (code != CTL_REFUSE_VERSION) {
                snprintf(err, errlen, "control plane: %s", why);
                return -1;
            }
            continue;
        }
        nd->fd[hi.node_rank] = fd;
        nd->rx[hi.node_rank] = rx;
        if (hi.flags & CTL_HELLO_CUDA &&
            (nd->peer_total == 0 || (int64_t)hi.gpu_free < nd->peer_free)) {
            nd->peer_free = (int64_t)hi.gpu_free;
            nd->peer_total = (int64_t)hi.gpu_total;
        }
        joined++;
    }
    close(nd->lfd);
    nd->lfd = -1;
    return 0;
oom:
    snprintf(err, errlen, "out of memory");
    return -1;
}

int model_node_welcome(struct model *m, struct kv_cache *kv, int64_t max_rows, int64_t max_len,
                       const void *nccl_id, char *err, size_t errlen)
{
    struct tp_node *nd = m->node;
    if (!nd || nd->node_rank != 0)
        return 0;
    struct ctl_welcome w;
    memset(&w, 0, sizeof(w));
    w.kv_blocks = (uint64_t)kv_n_blocks(kv);
    w.max_seqs = (uint32_t)kv_max_seqs(kv);
    w.max_rows = (uint64_t)max_rows;
    w.max_len = (uint64_t)max_len;
    if (nccl_id)
        memcpy(w.nccl_id, nccl_id, CTL_NCCL_ID_BYTES);
    for (int k = 1; k < nd->nnodes; k++) {
        char why[128];
        if (ctl_encode_welcome(&nd->buf, nd->tx, &w, why, sizeof(why)) ||
            send_buf(nd, nd->fd[k])) {
            snprintf(err, errlen, "control plane: node %d: cannot send WELCOME", k);
            node_fail(m, err);
            return -1;
        }
    }
    nd->tx++;
    return 0;
}

int model_node_watch(struct model *m, char *why, size_t n)
{
    struct tp_node *nd = m->node;
    if (!nd)
        return 0;
    if (atomic_load(&nd->broken)) {
        snprintf(why, n, "%s", nd->why);
        return -1;
    }
    int lead = nd->node_rank == 0;
    for (int k = lead ? 1 : 0; k < (lead ? nd->nnodes : 1); k++) {
        int fd = lead ? nd->fd[k] : nd->leader_fd;
        struct pollfd pf = {fd, POLLIN | POLLRDHUP, 0};
        if (fd < 0 || poll(&pf, 1, 0) <= 0)
            continue;
        /* readable may be the next message (STEP_DONE, STEP): only an end
         * of stream or an error with nothing left to read is news */
        char c;
        ssize_t r = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
        if (r > 0 || (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)))
            continue;
        char msg[256];
        if (lead)
            snprintf(msg, sizeof(msg), "node %d: connection lost (%s)", k,
                     r == 0 ? "end of stream" : strerror(errno));
        else
            snprintf(msg, sizeof(msg), "the leader: connection lost (%s)",
                     r == 0 ? "end of stream" : strerror(errno));
        node_fail(m, msg);
        snprintf(why, n, "%s", msg);
        return -1;
    }
    return 0;
}

int model_node_peer_memory(const struct model *m, int64_t *free_bytes, int64_t *total_bytes)
{
    const struct tp_node *nd = m->node;
    if (!nd || nd->node_rank != 0 || nd->peer_total == 0)
        return -1;
    *free_bytes = nd->peer_free;
    *total_bytes = nd->peer_total;
    return 0;
}

int model_node_step_begin(struct model *m, struct kv_cache *kv, const struct model_row *rows,
                          int64_t n, const struct model_sample *samples, int64_t n_samples,
                          char *err, size_t errlen)
{
    struct tp_node *nd = m->node;
    if (atomic_load(&nd->broken)) {
        snprintf(err, errlen, "tensor parallel job stopped: %s", nd->why);
        return -1;
    }
    nd->step++;
    char why[256];
    nd->buf.len = 0;
    if (ctl_encode_step(&nd->buf, nd->tx, nd->step, rows, n, samples, n_samples, kv, why,
                        sizeof(why))) {
        snprintf(err, errlen, "control plane: %s", why);
        return -1;
    }
    for (int k = 1; k < nd->nnodes; k++)
        if (write_all(nd->fd[k], nd->buf.p, nd->buf.len)) {
            snprintf(err, errlen, "node %d: connection lost (sending step %llu)", k,
                     (unsigned long long)nd->step);
            nd->buf.len = 0;
            node_fail(m, err);
            return -1;
        }
    nd->buf.len = 0;
    nd->tx++;
    return 0;
}

int model_node_step_end(struct model *m, char *err, size_t errlen)
{
    struct tp_node *nd = m->node;
    double deadline = now_ms() + NODE_TIMEOUT_MS;
    /* the oldest step not answered: on GPUs the next may be out already */
    uint64_t want = nd->acked + 1;
    if (atomic_load(&nd->broken)) {
        snprintf(err, errlen, "tensor parallel job stopped: %s", nd->why);
        return -1;
    }
    for (int k = 1; k < nd->nnodes; k++) {
        char peer[32], why[256];
        snprintf(peer, sizeof(peer), "node %d", k);
        struct ctl_header h;
        struct ctl_step_done d;
        if (read_msg(nd, nd->fd[k], &nd->rx[k], &h, deadline, peer, why, sizeof(why)) ||
            h.type != CTL_STEP_DONE ||
            ctl_decode_step_done(nd->in, h.length, &d, why, sizeof(why)) ||
            d.step_id != want) {
            if (!why[0] || h.type != CTL_STEP_DONE)
                snprintf(why, sizeof(why), "%s: expected STEP_DONE %llu", peer,
                         (unsigned long long)want);
            snprintf(err, errlen, "%s", why);
            node_fail(m, err);
            return -1;
        }
        if (d.status != 0) {
            snprintf(err, errlen, "%s: step %llu failed: %.*s", peer,
                     (unsigned long long)d.step_id, (int)d.n_text, d.text);
            node_fail(m, err);
            return -1;
        }
    }
    nd->acked = want;
    return 0;
}

/* ------------------------------------------------------------ follower */

int model_node_follower(struct model *m, int nnodes, int node_rank, const char *addr,
                        int port, char *err, size_t errlen)
{
    struct tp_node *nd = calloc(1, sizeof(*nd));
    if (!nd) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    m->node = nd;
    nd->nnodes = nnodes;
    nd->node_rank = node_rank;
    nd->lfd = -1;
    nd->leader_fd = -1;
    struct sockaddr_storage ss;
    socklen_t sl;
    if (resolve(addr, port + 1, &ss, &sl)) {
        snprintf(err, errlen, "--master-addr %s: cannot resolve", addr);
        return -1;
    }
    double deadline = now_ms() + NODE_TIMEOUT_MS;
    for (;;) {
        int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&ss, sl) == 0) {
            nd->leader_fd = fd;
            break;
        }
        if (fd >= 0)
            close(fd);
        if (now_ms() > deadline) {
            snprintf(err, errlen, "control plane: no leader at %s port %d within %d s", addr,
                     port + 1, NODE_TIMEOUT_MS / 1000);
            return -1;
        }
        usleep(100 * 1000);
    }
    int one = 1;
    setsockopt(nd->leader_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct ctl_hello hi = {.node_rank = (uint16_t)node_rank, .nnodes = (uint16_t)nnodes,
                           .tp = (uint16_t)m->tp, .fingerprint = ctl_fingerprint(&m->cfg)};
#ifdef INFERD_CUDA
    if (m->tpg) { /* the leader sizes the KV cache by the fullest GPU of any node */
        int64_t fr, tot;
        hi.flags = CTL_HELLO_CUDA;
        if (mtc_memory(m, &fr, &tot) == 0)
            hi.gpu_free = (uint64_t)fr, hi.gpu_total = (uint64_t)tot;
    }
#endif
    char why[256];
    if (ctl_encode_hello(&nd->buf, nd->tx++, &hi, why, sizeof(why)) ||
        send_buf(nd, nd->leader_fd)) {
        snprintf(err, errlen, "control plane: cannot send HELLO");
        return -1;
    }
    return 0;
}

#ifdef INFERD_CUDA
/* Whether a message from fd is waiting (without reading it). */
static int waiting(int fd)
{
    struct pollfd pf = {fd, POLLIN, 0};
    return poll(&pf, 1, 0) > 0;
}
#endif

/* STEP_DONE for step id: ok, or failed with why. */
static int answer(struct tp_node *nd, uint64_t id, int ok, const char *why, char *err,
                  size_t errlen)
{
    if (ctl_encode_step_done(&nd->buf, nd->tx++, id, ok ? 0 : -1, ok ? "" : why, err,
                             errlen) ||
        send_buf(nd, nd->leader_fd)) {
        snprintf(err, errlen, "the leader: connection lost");
        return -1;
    }
    return 0;
}

int model_follow(struct model *m, char *err, size_t errlen)
{
    struct tp_node *nd = m->node;
    if (!nd || nd->node_rank == 0) {
        snprintf(err, errlen, "not a follower node (--node-rank > 0 with --nnodes)");
        return -1;
    }
    struct ctl_header h;
    struct ctl_welcome w;
    struct kv_cache *kv = NULL;
    int rc = -1;
    /* the leader sizes its KV cache when its engine starts: no limit on
     * that wait beyond the leader's own */
    double forever = now_ms() + 1e12;
    if (read_msg(nd, nd->leader_fd, &nd->rx_leader, &h, forever, "the leader", err, errlen))
        return -1;
    if (h.type == CTL_REFUSE) {
        struct ctl_refuse r;
        if (ctl_decode_refuse(nd->in, h.length, &r, err, errlen) == 0)
            snprintf(err, errlen, "the leader refused this node: %.*s", (int)r.n_text, r.text);
        return -1;
    }
    if (h.type != CTL_WELCOME || ctl_decode_welcome(nd->in, h.length, &w, err, errlen)) {
        if (h.type != CTL_WELCOME)
            snprintf(err, errlen, "the leader: expected WELCOME, got message type %u", h.type);
        return -1;
    }
    struct kv_geom g = model_kv_geom(m);
    kv = kv_create(&g, (int64_t)w.kv_blocks, (int)w.max_seqs, err, errlen);
    if (!kv)
        return -1;
    int32_t *tab = NULL;
    size_t cap_tab = 0;
    struct model_row *rows = NULL;
    struct model_sample *samples = NULL;
    size_t cap_rows = 0;
#ifdef INFERD_CUDA
    uint64_t pend[2]; /* GPUs: steps launched, not yet answered, oldest first */
    int n_pend = 0;
#endif
#ifdef INFERD_CUDA
    /* GPUs: every node's ranks meet in one NCCL communicator (the id came
     * in WELCOME), then prepare for the leader's sizes, so that every
     * node captures the same graphs and issues the same collectives */
    if (m->tpg && (mtc_join(m, w.nccl_id, err, errlen) ||
                   mtc_prepare(m, kv, (int64_t)w.max_rows, (int)w.max_seqs,
                               (int64_t)w.max_len, err, errlen)))
        goto done;
#endif
    for (;;) {
        if (read_msg(nd, nd->leader_fd, &nd->rx_leader, &h, forever, "the leader", err, errlen))
            goto done;
        if (h.type == CTL_SHUTDOWN) {
            struct ctl_refuse s;
            if (ctl_decode_shutdown(nd->in, h.length, &s, err, errlen) == 0)
                fprintf(stderr, "inferd: the leader shut the job down: %.*s\n", (int)s.n_text,
                        s.text);
            rc = 0;
            goto done;
        }
        struct ctl_step st;
        if (h.type != CTL_STEP) {
            snprintf(err, errlen, "the leader: unexpected message type %u", h.type);
            goto done;
        }
        if (ctl_decode_step(nd->in, h.length, w.kv_blocks, &st, err, errlen))
            goto done;
        int ok = 1;
        char why[256] = "";
        if (st.n_rows > cap_rows) {
            struct model_row *r = realloc(rows, st.n_rows * sizeof(*r));
            struct model_sample *sm = realloc(samples, st.n_rows * sizeof(*sm));
            if (r)
                rows = r;
            if (sm)
                samples = sm;
            if (!r || !sm) {
                ctl_step_free(&st);
                snprintf(err, errlen, "out of memory");
                goto done;
            }
            cap_rows = st.n_rows;
        }
        /* each sequence's table, at its length before this step */
        for (uint32_t i = 0; i < st.n_rows; i++)
            rows[i] = ctl_row(&st, i);
        /* the rows the leader's rank 0 samples, in its order: this node's
         * ranks gather the LM head's rows in the same order (no sampler
         * here: only the leader draws) */
        uint32_t n_samples = st.n_samples;
        for (uint32_t i = 0; i < n_samples; i++)
            samples[i] = (struct model_sample){.row = ctl_sample_row(&st, i)};
        for (uint32_t q = 0; q < st.n_seqs && ok; q++) {
            const struct ctl_seq *s = &st.seqs[q];
            if (s->n_blocks > cap_tab) {
                int32_t *t = realloc(tab, s->n_blocks * sizeof(*t));
                if (!t) {
                    ok = 0;
                    snprintf(why, sizeof(why), "out of memory");
                    break;
                }
                tab = t;
                cap_tab = s->n_blocks;
            }
            for (uint32_t k = 0; k < s->n_blocks; k++)
                tab[k] = ctl_block(s, k);
            int64_t before = s->len_after;
            for (uint32_t i = 0; i < st.n_rows; i++)
                if (rows[i].seq == s->seq && rows[i].pos < before)
                    before = rows[i].pos;
            if (s->seq >= (int)w.max_seqs ||
                kv_seq_mirror(kv, s->seq, (int)s->rope_long, tab, s->n_blocks, before)) {
                ok = 0;
                snprintf(why, sizeof(why), "sequence %d does not fit this node's cache", s->seq);
            }
        }
        uint64_t id = st.step_id;
        ctl_step_free(&st);
#ifdef INFERD_CUDA
        if (m->tpg) {
            /* Launched steps are collected (and answered, in order) unless
             * the next STEP is already here: it is launched first, so this
             * node's GPUs get it while they still run the last, as the
             * leader's do (two in flight at most). */
            if (ok && mtc_launch(m, kv, rows, st.n_rows, NULL, samples, n_samples, why,
                                 sizeof(why)))
                ok = 0;
            if (ok)
                pend[n_pend++] = id;
            while (n_pend > 0 && (!ok || n_pend == 2 || !waiting(nd->leader_fd))) {
                char w2[256] = "";
                int ok2 = mtc_collect(m, w2, sizeof(w2)) == 0;
                uint64_t done_id = pend[0];
                pend[0] = pend[1];
                n_pend--;
                if (answer(nd, done_id, ok2, w2, err, errlen))
                    goto done;
                if (!ok2) {
                    snprintf(err, errlen, "step %llu failed here: %s",
                             (unsigned long long)done_id, w2);
                    goto done;
                }
            }
            if (ok)
                continue;
        } else
#endif
        if (ok && model_forward(m, kv, rows, st.n_rows, NULL, why, sizeof(why)))
            ok = 0;
        if (answer(nd, id, ok, why, err, errlen))
            goto done;
        if (!ok) {
            snprintf(err, errlen, "step %llu failed here: %s", (unsigned long long)id, why);
            goto done;
        }
    }
done:
#ifdef INFERD_CUDA
    /* steps still launched (the job ended between them): none may run on
     * after the cache they read is gone */
    for (; m->tpg && n_pend > 0; n_pend--) {
        char w2[256];
        (void)mtc_collect(m, w2, sizeof(w2));
    }
#endif
    free(tab);
    free(rows);
    free(samples);
    if (rc != 0) /* no rank of this node may wait on the others */
        for (int r = 0; r < m->n_local; r++)
            if (m->rank[r] && m->rank[r]->comm)
                comm_abort(m->rank[r]->comm, err);
    kv_destroy(kv);
    return rc;
}

int model_failed(const struct model *m, char *why, size_t n)
{
    const struct tp_node *nd = m->node;
    if (!nd || !atomic_load(&nd->broken)) {
#ifdef INFERD_CUDA
        if (m->tpg)
            return mtc_failed(m, why, n);
#endif
        return 0;
    }
    snprintf(why, n, "%s", nd->why);
    return 1;
}

void model_node_destroy(struct model *m)
{
    struct tp_node *nd = m->node;
    if (!nd)
        return;
    for (int k = 1; nd->fd && k < nd->nnodes; k++) {
        if (nd->fd[k] < 0)
            continue;
        char e[64];
        if (!atomic_load(&nd->broken) && ctl_encode_shutdown(&nd->buf, nd->tx, "the leader is stopping", e,
                                               sizeof(e)) == 0)
            send_buf(nd, nd->fd[k]);
        close(nd->fd[k]);
    }
    if (nd->lfd >= 0)
        close(nd->lfd);
    if (nd->leader_fd >= 0)
        close(nd->leader_fd);
    free(nd->fd);
    free(nd->rx);
    free(nd->in);
    ctl_buf_free(&nd->buf);
    free(nd);
    m->node = NULL;
}
