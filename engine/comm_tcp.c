/* comm_tcp.c: the communicator for tensor-parallel ranks spread over several
 * processes ("nodes") on the CPU, so the multi-node path runs in CI without
 * GPUs. Node k hosts global ranks [k * local, (k + 1) * local) as threads.
 * Each rank's thread runs its own calls; local rank 0's thread also carries
 * the node's network traffic, so the group has no thread of its own.
 *
 * A collective has three stages: (1) the node's ranks meet in a comm_cpu
 * group (shared memory; the all-reduce sums in local-rank order there);
 * (2) local rank 0 of each node exchanges the node's share with node 0 over
 * TCP: a star, node 0 reads one frame from every other node, combines them
 * in node order and answers each; (3) local rank 0 hands the result to the
 * node's other ranks (a comm_cpu broadcast). The all-reduce thus computes
 * ((node 0's sum + node 1's sum) + node 2's sum) + ..., each node's sum in
 * local-rank order: not comm_cpu's flat order, but every element is summed
 * once, on node 0, and travels as bits, so every rank of every node gets
 * the same bits, run after run.
 *
 * Wire: each frame is a 40-byte little-endian header (magic, version, op,
 * sender, root, sequence number, the call's size argument, payload bytes),
 * then the payload. The receiver checks every field against what it expects
 * at that point and never sizes anything from the header; a mismatch, a
 * short read, EOF, a reset or a network wait past timeout_ms aborts the
 * node's group with a message naming the peer, and an abort frame tells the
 * other nodes (node 0 relays), so no node waits on one that is gone.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "engine/comm_internal.h"

#define TCP_MAGIC 0x43544649u /* "IFTC" as little-endian bytes */
#define TCP_VERSION 1
#define HDR_BYTES 40
#define HELLO_BYTES 12
#define BYTE_ORDER_PROBE 0x01020304u /* in the sender's order: floats travel raw */
#define TCP_MAX_NODES 1024
#define TCP_MAX_LOCAL 1024
#define CONNECT_RETRY_MS 50
/* How long node 0 gives a fresh connection to say hello: a silent stray
 * connection must not hold the rendezvous for the whole timeout. */
#define HELLO_WAIT_MS 5000
/* The abort frame is best effort: a peer that does not read gets EOF. */
#define ABORT_SEND_MS 200
/* A peer that sent while we were sending: how long to read what it said. */
#define EXPLAIN_MS 1000
#define SUM_BLOCK 2048

enum tcp_op {
    OP_NONE = 0, /* expecting nothing: only an abort, a refusal or EOF */
    OP_HELLO = 1,
    OP_WELCOME,
    OP_REFUSE,
    OP_ABORT,
    OP_ALLREDUCE = 16,
    OP_ALLGATHER,
    OP_BROADCAST,
    OP_BARRIER,
};

static const char *op_name(unsigned op)
{
    switch (op) {
    case OP_HELLO:
        return "hello";
    case OP_WELCOME:
        return "welcome";
    case OP_REFUSE:
        return "refusal";
    case OP_ABORT:
        return "abort";
    case OP_ALLREDUCE:
        return "allreduce_f32";
    case OP_ALLGATHER:
        return "allgather_f32";
    case OP_BROADCAST:
        return "broadcast";
    case OP_BARRIER:
        return "barrier";
    }
    return "unknown op";
}

/* Network-level results: NET_FAIL comes with a reason, NET_WOKEN means the
 * group was aborted (abort_reason says why). */
enum { NET_OK = 0, NET_FAIL = -1, NET_WOKEN = -2, NET_PEER = -3 };

struct tcp_frame {
    uint32_t magic;
    uint16_t version, op;
    uint32_t node;    /* the sender */
    int32_t root;     /* broadcast: the global root; else 0 */
    uint64_t seq;     /* collectives since the join, from 0 */
    uint64_t arg;     /* the call's size: n, n_per_rank or bytes */
    uint64_t payload; /* bytes after the header */
};

/* Receiving one frame from one peer, a step at a time. */
struct tcp_rx {
    int fd, node;          /* the peer */
    int self;              /* this node, for messages */
    struct tcp_frame want; /* op OP_NONE: nothing is due */
    void *dst;             /* (want.payload) bytes */
    unsigned char hdr[HDR_BYTES];
    size_t hdr_got, got;
    struct tcp_frame f;      /* the header, once hdr_got == HDR_BYTES */
    char note[COMM_ERR_LEN]; /* an abort's or refusal's text */
    int done;
};

struct tcp_peer {
    int fd;      /* -1: none (a follower talks to node 0 only) */
    int partial; /* a frame was left half-sent: no clean abort frame can
                  * follow on this stream. Under send_mu. */
};

struct tcp_rank {
    struct comm base; /* first: the handle callers see */
    struct comm_tcp_group *g;
    struct comm *cpu; /* this rank in g->cpu; borrowed */
    int local_rank;
};

struct comm_tcp_group {
    int nnodes, node, local, tp;
    int timeout_ms;
    char *addr; /* master_addr */
    int port;   /* node 0: the bound port; others: master_port */
    int listen_fd;
    struct comm_group *cpu; /* the node's ranks */
    struct tcp_rank *ranks; /* (local) */
    struct tcp_peer *peers; /* (nnodes), by node */
    int wake[2];            /* an abort writes a byte; network waits poll it */
    int joined;             /* comm_tcp_join was called; its thread only */
    atomic_int up;          /* joined: sockets may carry abort frames */

    /* Local rank 0's thread only (the joining thread before that). */
    uint64_t seq;
    struct pollfd *pfd;  /* (nnodes + 1) */
    struct tcp_rx *rx;   /* (nnodes) */
    void **io_dst;       /* (nnodes) node 0: where node k's frame goes */
    const void **io_src; /* (nnodes) node 0: what node k is answered */
    size_t *io_len;      /* (nnodes) */
    float *parts;        /* node 0: (nnodes - 1, parts_cap / (nnodes - 1)) f32 */
    size_t parts_cap;    /* floats */

    pthread_mutex_t send_mu; /* one writer per socket: frames vs abort frames */
    pthread_mutex_t abort_mu;
    atomic_int aborted;
    char why[COMM_WHY_LEN]; /* written once, before aborted is set */
};

/* ---- Time ------------------------------------------------------------- */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

/* 0: no deadline. */
static double deadline_after(int ms)
{
    return ms > 0 ? now_ms() + ms : 0;
}

static int expired(double deadline)
{
    return deadline != 0 && now_ms() >= deadline;
}

/* poll()'s timeout for a deadline: -1 for none. */
static int poll_ms(double deadline)
{
    if (deadline == 0)
        return -1;
    double left = deadline - now_ms();
    if (left <= 0)
        return 0;
    return left > INT_MAX - 1 ? INT_MAX : (int)left + 1;
}

/* ---- Frames ----------------------------------------------------------- */

static void put16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint16_t get16(const unsigned char *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t get32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint64_t get64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static void frame_encode(const struct tcp_frame *f, unsigned char *p)
{
    put32(p, f->magic);
    put16(p + 4, f->version);
    put16(p + 6, f->op);
    put32(p + 8, f->node);
    put32(p + 12, (uint32_t)f->root);
    put64(p + 16, f->seq);
    put64(p + 24, f->arg);
    put64(p + 32, f->payload);
}

static void frame_decode(const unsigned char *p, struct tcp_frame *f)
{
    f->magic = get32(p);
    f->version = get16(p + 4);
    f->op = get16(p + 6);
    f->node = get32(p + 8);
    f->root = (int32_t)get32(p + 12);
    f->seq = get64(p + 16);
    f->arg = get64(p + 24);
    f->payload = get64(p + 32);
}

static struct tcp_frame frame_make(unsigned op, int node)
{
    return (struct tcp_frame){
        .magic = TCP_MAGIC, .version = TCP_VERSION, .op = (uint16_t)op, .node = (uint32_t)node};
}

/* "allreduce_f32(n=4)" and the like, for mismatch messages. */
static void describe(const struct tcp_frame *f, char *out, size_t len)
{
    switch (f->op) {
    case OP_ALLREDUCE:
        snprintf(out, len, "allreduce_f32(n=%llu)", (unsigned long long)f->arg);
        break;
    case OP_ALLGATHER:
        snprintf(out, len, "allgather_f32(n_per_rank=%llu)", (unsigned long long)f->arg);
        break;
    case OP_BROADCAST:
        snprintf(out, len, "broadcast(bytes=%llu, root=%d)", (unsigned long long)f->arg, f->root);
        break;
    default:
        snprintf(out, len, "%s()", op_name(f->op));
    }
}

/* ---- Sending ---------------------------------------------------------- */

/* Sends header and payload on fd (nonblocking), waiting with poll until
 * deadline. wakeable: an abort (the wake pipe) stops the wait. NET_PEER:
 * the peer sent something while it should be listening (it can only be an
 * abort or EOF); the caller reads it. *partial (may be NULL) is set when
 * the frame was left half-sent. */
static int send_frame(struct comm_tcp_group *g, int fd, int node, int *partial,
                      const struct tcp_frame *f, const void *payload, double deadline, int wakeable,
                      char *why, size_t whylen)
{
    unsigned char hdr[HDR_BYTES];
    frame_encode(f, hdr);
    struct iovec iov[2] = {{hdr, HDR_BYTES}, {(void *)payload, (size_t)f->payload}};
    struct iovec *v = iov;
    int nv = f->payload > 0 ? 2 : 1;
    size_t total = HDR_BYTES + (size_t)f->payload, sent = 0;
    int rc = NET_OK;
    while (sent < total) {
        struct msghdr mh = {.msg_iov = v, .msg_iovlen = (size_t)nv};
        ssize_t n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            sent += (size_t)n;
            while (nv > 0 && (size_t)n >= v->iov_len) {
                n -= (ssize_t)v->iov_len;
                v++, nv--;
            }
            if (nv > 0) {
                v->iov_base = (char *)v->iov_base + n;
                v->iov_len -= (size_t)n;
            }
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            snprintf(why, whylen, "node %d: connection lost (%s) sending %s #%llu", node,
                     strerror(errno), op_name(f->op), (unsigned long long)f->seq);
            rc = NET_FAIL;
            break;
        }
        if (expired(deadline)) {
            snprintf(why, whylen, "node %d: timed out after %d ms sending %s #%llu", node,
                     g->timeout_ms, op_name(f->op), (unsigned long long)f->seq);
            rc = NET_FAIL;
            break;
        }
        struct pollfd p[2] = {{fd, POLLOUT | POLLIN, 0}, {g->wake[0], POLLIN, 0}};
        int pr = poll(p, wakeable ? 2 : 1, poll_ms(deadline));
        if (pr < 0 && errno != EINTR) {
            snprintf(why, whylen, "node %d: poll: %s", node, strerror(errno));
            rc = NET_FAIL;
            break;
        }
        if (pr > 0 && wakeable && p[1].revents) {
            rc = NET_WOKEN;
            break;
        }
        /* Readable, or hung up with no room to write: the peer is not
         * listening any more (it aborted or went away). POLLERR goes round
         * once more, for sendmsg to name the error. */
        short ev = pr > 0 ? p[0].revents : 0;
        if ((ev & POLLIN) || ((ev & POLLHUP) && !(ev & (POLLOUT | POLLERR)))) {
            rc = NET_PEER;
            break;
        }
    }
    if (partial && sent > 0 && sent < total)
        *partial = 1;
    return rc;
}

/* ---- Receiving -------------------------------------------------------- */

static void rx_init(struct tcp_rx *rx, int self, int fd, int node, const struct tcp_frame *want,
                    void *dst)
{
    memset(rx, 0, sizeof(*rx));
    rx->self = self;
    rx->fd = fd;
    rx->node = node;
    rx->want = *want;
    rx->dst = dst;
}

/* The header is in: is it the frame expected? Sets where its payload goes. */
static int rx_check(struct tcp_rx *rx, char *why, size_t whylen)
{
    const struct tcp_frame *f = &rx->f, *w = &rx->want;
    if (f->magic != TCP_MAGIC) {
        snprintf(why, whylen, "node %d: bad frame (magic 0x%08x, expected 0x%08x)", rx->node,
                 f->magic, TCP_MAGIC);
        return NET_FAIL;
    }
    if (f->version != TCP_VERSION) {
        snprintf(why, whylen, "node %d: protocol version %u, this node speaks %u", rx->node,
                 f->version, TCP_VERSION);
        return NET_FAIL;
    }
    if (f->op == OP_ABORT || f->op == OP_REFUSE) {
        if (f->payload >= sizeof(rx->note)) {
            snprintf(why, whylen, "node %d: %s frame of %llu bytes (at most %zu)", rx->node,
                     op_name(f->op), (unsigned long long)f->payload, sizeof(rx->note) - 1);
            return NET_FAIL;
        }
        return NET_OK;
    }
    if (w->op == OP_NONE) {
        snprintf(why, whylen, "node %d: sent %s #%llu out of turn", rx->node, op_name(f->op),
                 (unsigned long long)f->seq);
        return NET_FAIL;
    }
    if (f->op != w->op || f->seq != w->seq) {
        snprintf(why, whylen, "node %d: sent %s #%llu, expected %s #%llu", rx->node, op_name(f->op),
                 (unsigned long long)f->seq, op_name(w->op), (unsigned long long)w->seq);
        return NET_FAIL;
    }
    if (f->node != (uint32_t)rx->node) {
        snprintf(why, whylen, "node %d: frame %s #%llu says it is from node %u", rx->node,
                 op_name(f->op), (unsigned long long)f->seq, f->node);
        return NET_FAIL;
    }
    if (f->arg != w->arg || f->root != w->root) {
        char theirs[64], ours[64];
        describe(f, theirs, sizeof(theirs));
        describe(w, ours, sizeof(ours));
        snprintf(why, whylen, "collective mismatch: node %d called %s, node %d called %s (#%llu)",
                 rx->self, ours, rx->node, theirs, (unsigned long long)f->seq);
        return NET_FAIL;
    }
    if (f->payload != w->payload) {
        snprintf(why, whylen, "node %d: %s #%llu carries %llu payload bytes, expected %llu",
                 rx->node, op_name(f->op), (unsigned long long)f->seq,
                 (unsigned long long)f->payload, (unsigned long long)w->payload);
        return NET_FAIL;
    }
    return NET_OK;
}

/* One recv on rx's socket, which poll found ready. */
static int rx_step(struct tcp_rx *rx, char *why, size_t whylen)
{
    int in_hdr = rx->hdr_got < HDR_BYTES;
    int is_note = !in_hdr && (rx->f.op == OP_ABORT || rx->f.op == OP_REFUSE);
    char *dst;
    size_t want;
    if (in_hdr) {
        dst = (char *)rx->hdr + rx->hdr_got;
        want = HDR_BYTES - rx->hdr_got;
    } else {
        dst = (is_note ? rx->note : (char *)rx->dst) + rx->got;
        want = (size_t)rx->f.payload - rx->got;
    }
    ssize_t n = recv(rx->fd, dst, want, MSG_DONTWAIT);
    if (n == 0) {
        snprintf(why, whylen, "node %d: connection lost (end of stream%s)", rx->node,
                 rx->hdr_got > 0 ? " in the middle of a frame" : "");
        return NET_FAIL;
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return NET_OK;
        snprintf(why, whylen, "node %d: connection lost (%s)", rx->node, strerror(errno));
        return NET_FAIL;
    }
    if (in_hdr) {
        rx->hdr_got += (size_t)n;
        if (rx->hdr_got < HDR_BYTES)
            return NET_OK;
        frame_decode(rx->hdr, &rx->f);
        if (rx_check(rx, why, whylen) != NET_OK)
            return NET_FAIL;
    } else {
        rx->got += (size_t)n;
    }
    if (rx->got < rx->f.payload)
        return NET_OK;
    if (rx->f.op == OP_ABORT || rx->f.op == OP_REFUSE) {
        rx->note[rx->got] = '\0';
        if (rx->f.op == OP_ABORT)
            snprintf(why, whylen, "node %d aborted: %.150s", rx->node, rx->note);
        else
            snprintf(why, whylen, "refused by node %d: %.150s", rx->node, rx->note);
        return NET_FAIL;
    }
    rx->done = 1;
    return NET_OK;
}

/* Receives one frame on each of rx[0..count), all at once (a dead peer is
 * noticed whichever it is), until deadline. */
static int recv_frames(struct comm_tcp_group *g, struct tcp_rx *rx, int count, double deadline,
                       char *why, size_t whylen)
{
    for (;;) {
        int np = 0;
        int first = -1;
        for (int i = 0; i < count; i++) {
            if (rx[i].done)
                continue;
            if (first < 0)
                first = i;
            g->pfd[np++] = (struct pollfd){rx[i].fd, POLLIN, 0};
        }
        if (np == 0)
            return NET_OK;
        if (expired(deadline)) {
            if (rx[first].want.op == OP_NONE)
                snprintf(why, whylen, "node %d: sent a partial frame out of turn", rx[first].node);
            else
                snprintf(why, whylen, "node %d: timed out after %d ms waiting for %s #%llu",
                         rx[first].node, g->timeout_ms, op_name(rx[first].want.op),
                         (unsigned long long)rx[first].want.seq);
            return NET_FAIL;
        }
        g->pfd[np] = (struct pollfd){g->wake[0], POLLIN, 0};
        int pr = poll(g->pfd, (nfds_t)np + 1, poll_ms(deadline));
        if (pr < 0) {
            if (errno == EINTR)
                continue;
            snprintf(why, whylen, "node %d: poll: %s", g->node, strerror(errno));
            return NET_FAIL;
        }
        if (g->pfd[np].revents)
            return NET_WOKEN;
        int j = 0;
        for (int i = 0; i < count && j < np; i++) {
            if (rx[i].done)
                continue;
            if (g->pfd[j++].revents && rx_step(&rx[i], why, whylen) != NET_OK)
                return NET_FAIL;
        }
    }
}

/* Sends a frame to peer node; a peer that spoke out of turn is heard, so
 * the reason names what it said (an abort, EOF). */
static int peer_send(struct comm_tcp_group *g, int node, const struct tcp_frame *f,
                     const void *payload, double deadline, char *why, size_t whylen)
{
    struct tcp_peer *p = &g->peers[node];
    pthread_mutex_lock(&g->send_mu);
    int rc = send_frame(g, p->fd, node, &p->partial, f, payload, deadline, 1, why, whylen);
    pthread_mutex_unlock(&g->send_mu);
    if (rc != NET_PEER)
        return rc;
    struct tcp_rx *rx = &g->rx[0];
    struct tcp_frame none = frame_make(OP_NONE, g->node);
    rx_init(rx, g->node, p->fd, node, &none, NULL);
    double d = now_ms() + EXPLAIN_MS;
    rc = recv_frames(g, rx, 1, deadline != 0 && deadline < d ? deadline : d, why, whylen);
    return rc == NET_OK ? NET_FAIL : rc; /* NET_OK cannot happen: nothing was due */
}

/* ---- Abort ------------------------------------------------------------ */

/* Tells every peer, best effort: an abort frame where the stream is
 * between frames, then EOF (shutdown), so a peer that missed the frame
 * still stops. */
static void tell_peers(struct comm_tcp_group *g)
{
    pthread_mutex_lock(&g->send_mu);
    if (atomic_load(&g->up)) {
        struct tcp_frame f = frame_make(OP_ABORT, g->node);
        f.payload = strlen(g->why);
        double deadline = now_ms() + ABORT_SEND_MS;
        char ignored[COMM_WHY_LEN];
        for (int k = 0; k < g->nnodes; k++) {
            struct tcp_peer *p = &g->peers[k];
            if (p->fd < 0)
                continue;
            if (!p->partial)
                send_frame(g, p->fd, k, NULL, &f, g->why, deadline, 0, ignored, sizeof(ignored));
            shutdown(p->fd, SHUT_WR);
        }
    }
    pthread_mutex_unlock(&g->send_mu);
}

static void tcp_abort(struct comm_tcp_group *g, const char *why)
{
    pthread_mutex_lock(&g->abort_mu);
    int first = !atomic_load(&g->aborted);
    if (first) {
        snprintf(g->why, sizeof(g->why), "%s", why ? why : "(no reason given)");
        atomic_store(&g->aborted, 1);
    }
    pthread_mutex_unlock(&g->abort_mu);
    if (!first)
        return;
    comm_group_abort(g->cpu, g->why);
    /* The byte stays: every network wait, now and later, ends at once. */
    if (write(g->wake[1], "x", 1) < 0) {
        /* Full or closed: a byte is already there, or nobody waits. */
    }
    tell_peers(g);
}

void comm_tcp_abort(struct comm_tcp_group *g, const char *why)
{
    tcp_abort(g, why);
}

/* The abort's reason, for a thread that learned of the abort some other
 * way (the wake pipe, a failed comm_cpu call): the load of the flag orders
 * the read after the write of why. */
static const char *abort_reason(struct comm_tcp_group *g)
{
    return atomic_load(&g->aborted) ? g->why : "(not aborted)";
}

/* ---- The network stage (local rank 0) ----------------------------------- */

/* Opens the network stage of the next collective: what every frame of it
 * carries, and its deadline. */
static int net_begin(struct comm_tcp_group *g, unsigned op, uint64_t arg, int root,
                     struct tcp_frame *want, double *deadline)
{
    if (atomic_load(&g->aborted))
        return NET_WOKEN;
    *want = frame_make(op, 0);
    want->root = root;
    want->arg = arg;
    want->seq = g->seq++;
    *deadline = deadline_after(g->timeout_ms);
    return NET_OK;
}

/* Node 0: one frame from every other node k into io_dst[k] (io_len[k]
 * bytes), then, after the caller has combined them, one frame to each with
 * io_src[k] (io_len[k] bytes). */
static int net_gather(struct comm_tcp_group *g, const struct tcp_frame *want, double deadline,
                      char *why, size_t whylen)
{
    for (int k = 1; k < g->nnodes; k++) {
        struct tcp_frame w = *want;
        w.node = (uint32_t)k;
        w.payload = g->io_len[k];
        rx_init(&g->rx[k - 1], 0, g->peers[k].fd, k, &w, g->io_dst[k]);
    }
    return recv_frames(g, g->rx, g->nnodes - 1, deadline, why, whylen);
}

static int net_reply(struct comm_tcp_group *g, const struct tcp_frame *want, double deadline,
                     char *why, size_t whylen)
{
    for (int k = 1; k < g->nnodes; k++) {
        struct tcp_frame f = *want;
        f.payload = g->io_len[k];
        int rc = peer_send(g, k, &f, g->io_src[k], deadline, why, whylen);
        if (rc != NET_OK)
            return rc;
    }
    return NET_OK;
}

/* A follower: its frame to node 0, then node 0's answer. */
static int net_follow(struct comm_tcp_group *g, const struct tcp_frame *want, const void *out,
                      size_t out_len, void *in, size_t in_len, double deadline, char *why,
                      size_t whylen)
{
    struct tcp_frame f = *want;
    f.node = (uint32_t)g->node;
    f.payload = out_len;
    int rc = peer_send(g, 0, &f, out, deadline, why, whylen);
    if (rc != NET_OK)
        return rc;
    struct tcp_frame w = *want;
    w.payload = in_len;
    rx_init(&g->rx[0], g->node, g->peers[0].fd, 0, &w, in);
    return recv_frames(g, g->rx, 1, deadline, why, whylen);
}

/* buf[i] = ((buf[i] + part_1[i]) + part_2[i]) + ...: node 0's sum, then
 * each other node's in node order, the one order every element gets. */
static void sum_nodes(float *buf, const float *parts, int nparts, int64_t n)
{
    for (int64_t b = 0; b < n; b += SUM_BLOCK) {
        int64_t e = n - b < SUM_BLOCK ? n : b + SUM_BLOCK;
        for (int k = 0; k < nparts; k++) {
            const float *p = parts + (int64_t)k * n;
            for (int64_t i = b; i < e; i++)
                buf[i] += p[i];
        }
    }
}

static int net_allreduce(struct comm_tcp_group *g, float *buf, int64_t n, char *why, size_t whylen)
{
    struct tcp_frame want;
    double deadline;
    if (net_begin(g, OP_ALLREDUCE, (uint64_t)n, 0, &want, &deadline) != NET_OK)
        return NET_WOKEN;
    size_t bytes = (size_t)n * sizeof(float);
    if (g->node != 0)
        return net_follow(g, &want, buf, bytes, buf, bytes, deadline, why, whylen);
    size_t need = (size_t)n * (size_t)(g->nnodes - 1);
    if (need > g->parts_cap) {
        float *p = malloc(need * sizeof(float));
        if (!p) {
            snprintf(why, whylen, "node 0: out of memory for %zu floats of all-reduce scratch",
                     need);
            return NET_FAIL;
        }
        free(g->parts);
        g->parts = p;
        g->parts_cap = need;
    }
    for (int k = 1; k < g->nnodes; k++) {
        g->io_dst[k] = n ? g->parts + (size_t)(k - 1) * (size_t)n : NULL;
        g->io_src[k] = buf;
        g->io_len[k] = bytes;
    }
    int rc = net_gather(g, &want, deadline, why, whylen);
    if (rc != NET_OK)
        return rc;
    sum_nodes(buf, g->parts, g->nnodes - 1, n);
    return net_reply(g, &want, deadline, why, whylen);
}

/* recv: (tp, n) f32, this node's block already gathered locally. */
static int net_allgather(struct comm_tcp_group *g, float *recv, int64_t n, char *why, size_t whylen)
{
    struct tcp_frame want;
    double deadline;
    if (net_begin(g, OP_ALLGATHER, (uint64_t)n, 0, &want, &deadline) != NET_OK)
        return NET_WOKEN;
    size_t block = (size_t)n * (size_t)g->local; /* floats per node */
    size_t all = block * (size_t)g->nnodes;
    if (n == 0)
        recv = NULL; /* it may be NULL already: no arithmetic on it */
    if (g->node != 0)
        return net_follow(g, &want, recv ? recv + block * (size_t)g->node : NULL,
                          block * sizeof(float), recv, all * sizeof(float), deadline, why, whylen);
    for (int k = 1; k < g->nnodes; k++) {
        g->io_dst[k] = recv ? recv + block * (size_t)k : NULL;
        g->io_len[k] = block * sizeof(float);
    }
    int rc = net_gather(g, &want, deadline, why, whylen);
    if (rc != NET_OK)
        return rc;
    for (int k = 1; k < g->nnodes; k++) {
        g->io_src[k] = recv;
        g->io_len[k] = all * sizeof(float);
    }
    return net_reply(g, &want, deadline, why, whylen);
}

/* The root's node sends its bytes to node 0, node 0 to every other node;
 * the others send empty frames, so every node is checked every call. */
static int net_broadcast(struct comm_tcp_group *g, void *buf, size_t bytes, int root, char *why,
                         size_t whylen)
{
    struct tcp_frame want;
    double deadline;
    if (net_begin(g, OP_BROADCAST, (uint64_t)bytes, root, &want, &deadline) != NET_OK)
        return NET_WOKEN;
    int rn = root / g->local;
    if (g->node != 0) {
        int mine = g->node == rn;
        return net_follow(g, &want, mine ? buf : NULL, mine ? bytes : 0, mine ? NULL : buf,
                          mine ? 0 : bytes, deadline, why, whylen);
    }
    for (int k = 1; k < g->nnodes; k++) {
        g->io_dst[k] = k == rn ? buf : NULL;
        g->io_len[k] = k == rn ? bytes : 0;
    }
    int rc = net_gather(g, &want, deadline, why, whylen);
    if (rc != NET_OK)
        return rc;
    for (int k = 1; k < g->nnodes; k++) {
        g->io_src[k] = k == rn ? NULL : buf;
        g->io_len[k] = k == rn ? 0 : bytes;
    }
    return net_reply(g, &want, deadline, why, whylen);
}

static int net_barrier(struct comm_tcp_group *g, char *why, size_t whylen)
{
    struct tcp_frame want;
    double deadline;
    if (net_begin(g, OP_BARRIER, 0, 0, &want, &deadline) != NET_OK)
        return NET_WOKEN;
    if (g->node != 0)
        return net_follow(g, &want, NULL, 0, NULL, 0, deadline, why, whylen);
    for (int k = 1; k < g->nnodes; k++) {
        g->io_dst[k] = NULL;
        g->io_src[k] = NULL;
        g->io_len[k] = 0;
    }
    int rc = net_gather(g, &want, deadline, why, whylen);
    return rc != NET_OK ? rc : net_reply(g, &want, deadline, why, whylen);
}

/* ---- Collectives ------------------------------------------------------ */

static int fail_aborted(struct tcp_rank *r)
{
    return comm_fail(&r->base, "aborted: %s", abort_reason(r->g));
}

/* The network stage's end: on failure the whole job stops. */
static int net_done(struct tcp_rank *r, int rc, const char *why)
{
    if (rc == NET_OK)
        return 0;
    if (rc == NET_FAIL)
        tcp_abort(r->g, why);
    return fail_aborted(r);
}

/* A stage within the node failed: the reason is the comm_cpu rank's. An
 * abort is news to nobody; anything else (ranks of this node disagreeing,
 * a NULL buffer, no memory) failed this node's ranks alike, but the other
 * nodes would wait for this one in vain, so the job stops. */
static int local_failed(struct tcp_rank *r)
{
    struct comm_tcp_group *g = r->g;
    comm_fail(&r->base, "%s", comm_error(r->cpu));
    if (g->nnodes > 1 && !atomic_load(&g->aborted)) {
        char why[COMM_WHY_LEN];
        snprintf(why, sizeof(why), "node %d: %.170s", g->node, comm_error(r->cpu));
        tcp_abort(g, why);
    }
    return -1;
}

/* Checks that fail every rank of every node alike, with no traffic: the
 * group stays in step. */
static int check_ready(struct tcp_rank *r)
{
    if (!atomic_load(&r->g->up))
        return comm_fail(&r->base, "comm_tcp: the group has not joined (comm_tcp_join)");
    return 0;
}

static int check_count(struct tcp_rank *r, const char *op, int64_t n)
{
    if (check_ready(r) != 0)
        return -1;
    if (n < 0 || (uint64_t)n > SIZE_MAX / sizeof(float) / (size_t)r->g->tp)
        return comm_fail(&r->base, "%s: bad element count %lld", op, (long long)n);
    return 0;
}

static int tcp_allreduce_f32(struct comm *c, float *buf, int64_t n)
{
    struct tcp_rank *r = (struct tcp_rank *)c;
    struct comm_tcp_group *g = r->g;
    char why[COMM_WHY_LEN];
    if (check_count(r, "allreduce_f32", n) != 0)
        return -1;
    if (comm_allreduce_f32(r->cpu, buf, n) != 0)
        return local_failed(r);
    if (g->nnodes == 1)
        return 0;
    if (r->local_rank == 0 && net_done(r, net_allreduce(g, buf, n, why, sizeof(why)), why) != 0)
        return -1;
    if (comm_broadcast(r->cpu, buf, (size_t)n * sizeof(float), 0) != 0)
        return local_failed(r);
    return 0;
}

static int tcp_allgather_f32(struct comm *c, const float *send, int64_t n_per_rank, float *recv)
{
    struct tcp_rank *r = (struct tcp_rank *)c;
    struct comm_tcp_group *g = r->g;
    char why[COMM_WHY_LEN];
    if (check_count(r, "allgather_f32", n_per_rank) != 0)
        return -1;
    /* The node's block of recv, in place when send is recv + rank * n:
     * comm_cpu sees send at its own local offset of the block. */
    float *block = recv ? recv + (int64_t)g->node * g->local * n_per_rank : NULL;
    if (comm_allgather_f32(r->cpu, send, n_per_rank, block) != 0)
        return local_failed(r);
    if (g->nnodes == 1)
        return 0;
    if (r->local_rank == 0 &&
        net_done(r, net_allgather(g, recv, n_per_rank, why, sizeof(why)), why) != 0)
        return -1;
    if (comm_broadcast(r->cpu, recv, (size_t)n_per_rank * (size_t)g->tp * sizeof(float), 0) != 0)
        return local_failed(r);
    return 0;
}

static int tcp_broadcast(struct comm *c, void *buf, size_t bytes, int root)
{
    struct tcp_rank *r = (struct tcp_rank *)c;
    struct comm_tcp_group *g = r->g;
    char why[COMM_WHY_LEN];
    if (check_ready(r) != 0)
        return -1;
    if (root < 0 || root >= g->tp)
        return comm_fail(c, "broadcast: root %d not in [0, %d)", root, g->tp);
    int rn = root / g->local;
    /* The root's node first has the bytes on its local rank 0; it needs no
     * third stage, and the other nodes no first. */
    if (g->node == rn && comm_broadcast(r->cpu, buf, bytes, root % g->local) != 0)
        return local_failed(r);
    if (g->nnodes == 1)
        return 0;
    if (r->local_rank == 0 &&
        net_done(r, net_broadcast(g, buf, bytes, root, why, sizeof(why)), why) != 0)
        return -1;
    if (g->node != rn && comm_broadcast(r->cpu, buf, bytes, 0) != 0)
        return local_failed(r);
    return 0;
}

static int tcp_barrier(struct comm *c)
{
    struct tcp_rank *r = (struct tcp_rank *)c;
    struct comm_tcp_group *g = r->g;
    char why[COMM_WHY_LEN];
    if (check_ready(r) != 0)
        return -1;
    if (comm_barrier(r->cpu) != 0)
        return local_failed(r);
    if (g->nnodes == 1)
        return 0;
    if (r->local_rank == 0 && net_done(r, net_barrier(g, why, sizeof(why)), why) != 0)
        return -1;
    if (comm_barrier(r->cpu) != 0)
        return local_failed(r);
    return 0;
}

/* Every collective has finished when it returns; only an abort is news. */
static int tcp_sync(struct comm *c)
{
    struct tcp_rank *r = (struct tcp_rank *)c;
    if (comm_sync(r->cpu) != 0)
        return local_failed(r);
    return 0;
}

static void tcp_rank_abort(struct comm *c, const char *why)
{
    tcp_abort(((struct tcp_rank *)c)->g, why);
}

static void tcp_rank_destroy(struct comm *c)
{
    (void)c; /* the group owns its ranks */
}

static const struct comm_ops tcp_ops = {
    .allreduce_f32 = tcp_allreduce_f32,
    .allgather_f32 = tcp_allgather_f32,
    .broadcast = tcp_broadcast,
    .barrier = tcp_barrier,
    .sync = tcp_sync,
    .abort = tcp_rank_abort,
    .destroy = tcp_rank_destroy,
};

/* ---- Sockets ---------------------------------------------------------- */

static void set_nodelay(int fd)
{
    int one = 1;
    /* Small frames (barriers, decode-step all-reduces) go out at once. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static int bound_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
        return -1;
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return -1;
}

static struct addrinfo *resolve(const struct comm_tcp_group *g, int passive, char *err,
                                size_t errlen)
{
    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
    char port[16];
    snprintf(port, sizeof(port), "%d", g->port);
    int rc = getaddrinfo(g->addr, port, &hints, &ai);
    if (rc != 0) {
        snprintf(err, errlen, "node %d: cannot resolve master address %s: %s", g->node, g->addr,
                 gai_strerror(rc));
        return NULL;
    }
    return ai;
}

static int listen_on(struct comm_tcp_group *g, char *err, size_t errlen)
{
    struct addrinfo *ai = resolve(g, 1, err, errlen);
    if (!ai)
        return -1;
    int last = 0;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        int fd =
            socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            last = errno;
            continue;
        }
        int one = 1;
        /* A restarted job can bind while the last one's sockets linger. */
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, g->nnodes + 8) == 0) {
            g->listen_fd = fd;
            g->port = bound_port(fd);
            freeaddrinfo(ai);
            return 0;
        }
        last = errno;
        close(fd);
    }
    freeaddrinfo(ai);
    snprintf(err, errlen, "node 0: cannot listen on %s:%d: %s", g->addr, g->port, strerror(last));
    return -1;
}

/* Reads exactly len bytes, or fails (EOF, error, deadline: NET_FAIL, no
 * reason: the caller knows what it was reading) or is woken. */
static int recv_exact(struct comm_tcp_group *g, int fd, void *buf, size_t len, double deadline)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = recv(fd, (char *)buf + got, len - got, MSG_DONTWAIT);
        if (n > 0) {
            got += (size_t)n;
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            return NET_FAIL;
        if (expired(deadline))
            return NET_FAIL;
        struct pollfd p[2] = {{fd, POLLIN, 0}, {g->wake[0], POLLIN, 0}};
        int pr = poll(p, 2, poll_ms(deadline));
        if (pr < 0 && errno != EINTR)
            return NET_FAIL;
        if (pr > 0 && p[1].revents)
            return NET_WOKEN;
    }
    return NET_OK;
}

/* ---- Joining ---------------------------------------------------------- */

enum { HELLO_OK, HELLO_STRAY, HELLO_BAD, HELLO_WOKEN };

/* Node 0 reads a fresh connection's hello. HELLO_STRAY: not one of ours
 * (a port probe, garbage, silence): drop it and keep waiting. HELLO_BAD:
 * one of ours that does not fit this job: err says why, both sides fail. */
static int read_hello(struct comm_tcp_group *g, int fd, double deadline, int *node, char *err,
                      size_t errlen)
{
    double d = now_ms() + HELLO_WAIT_MS;
    if (deadline != 0 && deadline < d)
        d = deadline;
    unsigned char hdr[HDR_BYTES], body[HELLO_BYTES];
    int rc = recv_exact(g, fd, hdr, sizeof(hdr), d);
    if (rc != NET_OK)
        return rc == NET_WOKEN ? HELLO_WOKEN : HELLO_STRAY;
    struct tcp_frame f;
    frame_decode(hdr, &f);
    if (f.magic != TCP_MAGIC)
        return HELLO_STRAY;
    if (f.version != TCP_VERSION) {
        snprintf(err, errlen,
                 "node 0: a node speaks protocol version %u, node 0 speaks %u (mixed builds?)",
                 f.version, TCP_VERSION);
        return HELLO_BAD;
    }
    if (f.op != OP_HELLO || f.payload != HELLO_BYTES) {
        snprintf(err, errlen, "node 0: a node sent %s with %llu bytes where a hello belongs",
                 op_name(f.op), (unsigned long long)f.payload);
        return HELLO_BAD;
    }
    rc = recv_exact(g, fd, body, sizeof(body), d);
    if (rc != NET_OK)
        return rc == NET_WOKEN ? HELLO_WOKEN : HELLO_STRAY;
    uint32_t nn = get32(body), loc = get32(body + 4), probe;
    memcpy(&probe, body + 8, sizeof(probe));
    if (probe != BYTE_ORDER_PROBE) {
        snprintf(err, errlen, "node %u: byte order differs from node 0's", f.node);
        return HELLO_BAD;
    }
    if (nn != (uint32_t)g->nnodes || loc != (uint32_t)g->local) {
        snprintf(err, errlen, "node %u has nnodes=%u local=%u, node 0 has nnodes=%d local=%d",
                 f.node, nn, loc, g->nnodes, g->local);
        return HELLO_BAD;
    }
    if (f.node == 0 || f.node >= (uint32_t)g->nnodes) {
        snprintf(err, errlen, "a node says it is node %u; with nnodes=%d the others are 1..%d",
                 f.node, g->nnodes, g->nnodes - 1);
        return HELLO_BAD;
    }
    if (g->peers[f.node].fd >= 0) {
        snprintf(err, errlen, "node %u joined twice (two processes with node rank %u?)", f.node,
                 f.node);
        return HELLO_BAD;
    }
    *node = (int)f.node;
    return HELLO_OK;
}

/* Best effort: tells a node it is not wanted, with why. */
static void refuse(struct comm_tcp_group *g, int fd, int node, const char *why)
{
    struct tcp_frame f = frame_make(OP_REFUSE, 0);
    f.payload = strnlen(why, COMM_ERR_LEN - 1);
    char ignored[COMM_WHY_LEN];
    send_frame(g, fd, node, NULL, &f, why, now_ms() + ABORT_SEND_MS, 0, ignored, sizeof(ignored));
}

/* Marks the group up unless an abort came first: tell_peers and this
 * agree under send_mu on whether the sockets are the abort's to use. */
static int go_up(struct comm_tcp_group *g, char *err, size_t errlen)
{
    pthread_mutex_lock(&g->send_mu);
    int aborted = atomic_load(&g->aborted);
    if (!aborted)
        atomic_store(&g->up, 1);
    pthread_mutex_unlock(&g->send_mu);
    if (aborted)
        snprintf(err, errlen, "aborted: %s", abort_reason(g));
    return aborted ? -1 : 0;
}

static int leader_join(struct comm_tcp_group *g, double deadline, char *err, size_t errlen)
{
    int joined = 0;
    while (joined < g->nnodes - 1) {
        if (expired(deadline)) {
            int missing = 1;
            while (g->peers[missing].fd >= 0)
                missing++;
            snprintf(err, errlen,
                     "node 0: timed out after %d ms waiting for the other nodes to join "
                     "(%d of %d joined; node %d is missing)",
                     g->timeout_ms, joined, g->nnodes - 1, missing);
            goto fail;
        }
        struct pollfd p[2] = {{g->listen_fd, POLLIN, 0}, {g->wake[0], POLLIN, 0}};
        int pr = poll(p, 2, poll_ms(deadline));
        if (pr < 0 && errno != EINTR) {
            snprintf(err, errlen, "node 0: poll: %s", strerror(errno));
            goto fail;
        }
        if (pr > 0 && p[1].revents) {
            snprintf(err, errlen, "aborted: %s", abort_reason(g));
            goto fail;
        }
        if (pr <= 0 || !p[0].revents)
            continue;
        int fd = accept4(g->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED)
                continue;
            snprintf(err, errlen, "node 0: accept: %s", strerror(errno));
            goto fail;
        }
        set_nodelay(fd);
        int node = -1;
        switch (read_hello(g, fd, deadline, &node, err, errlen)) {
        case HELLO_OK:
            g->peers[node].fd = fd;
            joined++;
            break;
        case HELLO_STRAY:
            close(fd);
            break;
        case HELLO_WOKEN:
            close(fd);
            snprintf(err, errlen, "aborted: %s", abort_reason(g));
            goto fail;
        case HELLO_BAD:
            refuse(g, fd, -1, err);
            close(fd);
            goto fail;
        }
    }
    struct tcp_frame w = frame_make(OP_WELCOME, 0);
    for (int k = 1; k < g->nnodes; k++) {
        char why[COMM_WHY_LEN];
        int rc = send_frame(g, g->peers[k].fd, k, NULL, &w, NULL, deadline, 1, why, sizeof(why));
        if (rc == NET_OK)
            continue;
        if (rc == NET_WOKEN)
            snprintf(err, errlen, "aborted: %s", abort_reason(g));
        else if (rc == NET_PEER)
            snprintf(err, errlen, "node %d: hung up before its welcome", k);
        else
            snprintf(err, errlen, "%s", why);
        goto fail;
    }
    if (go_up(g, err, errlen) != 0)
        goto fail;
    close(g->listen_fd);
    g->listen_fd = -1;
    return 0;
fail:
    for (int k = 1; k < g->nnodes; k++) {
        if (g->peers[k].fd < 0)
            continue;
        refuse(g, g->peers[k].fd, k, err);
        close(g->peers[k].fd);
        g->peers[k].fd = -1;
    }
    return -1;
}

/* Connects to a (nonblocking), within deadline. Returns the socket, or -1
 * with *err_no set (-2: woken by an abort). */
static int try_connect(struct comm_tcp_group *g, const struct addrinfo *a, double deadline,
                       int *err_no)
{
    int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
        *err_no = errno;
        return -1;
    }
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0)
        return fd;
    if (errno != EINPROGRESS) {
        *err_no = errno;
        close(fd);
        return -1;
    }
    for (;;) {
        struct pollfd p[2] = {{fd, POLLOUT, 0}, {g->wake[0], POLLIN, 0}};
        int pr = poll(p, 2, poll_ms(deadline));
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr > 0 && p[1].revents) {
            close(fd);
            return -2;
        }
        int soerr = pr == 0 ? ETIMEDOUT : pr < 0 ? errno : 0;
        socklen_t len = sizeof(soerr);
        if (pr > 0 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0)
            soerr = errno;
        if (soerr == 0)
            return fd;
        *err_no = soerr;
        close(fd);
        return -1;
    }
}

static int follower_join(struct comm_tcp_group *g, double deadline, char *err, size_t errlen)
{
    struct addrinfo *ai = resolve(g, 0, err, errlen);
    if (!ai)
        return -1;
    int fd = -1, last = ECONNREFUSED;
    /* Node 0 may start later: retry until the deadline. */
    for (;;) {
        for (const struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
            fd = try_connect(g, a, deadline, &last);
            if (fd == -2) {
                freeaddrinfo(ai);
                snprintf(err, errlen, "aborted: %s", abort_reason(g));
                return -1;
            }
        }
        if (fd >= 0)
            break;
        if (expired(deadline)) {
            freeaddrinfo(ai);
            snprintf(err, errlen, "node %d: could not connect to node 0 at %s:%d within %d ms (%s)",
                     g->node, g->addr, g->port, g->timeout_ms, strerror(last));
            return -1;
        }
        double d = now_ms() + CONNECT_RETRY_MS;
        struct pollfd p = {g->wake[0], POLLIN, 0};
        if (poll(&p, 1, poll_ms(deadline != 0 && deadline < d ? deadline : d)) > 0) {
            freeaddrinfo(ai);
            snprintf(err, errlen, "aborted: %s", abort_reason(g));
            return -1;
        }
    }
    freeaddrinfo(ai);
    set_nodelay(fd);
    g->peers[0].fd = fd;

    unsigned char body[HELLO_BYTES];
    uint32_t probe = BYTE_ORDER_PROBE;
    put32(body, (uint32_t)g->nnodes);
    put32(body + 4, (uint32_t)g->local);
    memcpy(body + 8, &probe, sizeof(probe));
    struct tcp_frame f = frame_make(OP_HELLO, g->node);
    f.payload = HELLO_BYTES;
    char why[COMM_WHY_LEN];
    int rc = send_frame(g, fd, 0, NULL, &f, body, deadline, 1, why, sizeof(why));
    if (rc == NET_OK || rc == NET_PEER) {
        /* NET_PEER: node 0 answered (a refusal, EOF) before taking it all. */
        struct tcp_frame w = frame_make(OP_WELCOME, 0);
        rx_init(&g->rx[0], g->node, fd, 0, &w, NULL);
        rc = recv_frames(g, g->rx, 1, deadline, why, sizeof(why));
    }
    if (rc == NET_WOKEN)
        snprintf(err, errlen, "aborted: %s", abort_reason(g));
    else if (rc != NET_OK)
        snprintf(err, errlen, "%s", why);
    if (rc != NET_OK || go_up(g, err, errlen) != 0) {
        close(fd);
        g->peers[0].fd = -1;
        return -1;
    }
    return 0;
}

/* ---- The group -------------------------------------------------------- */

static void fail_msg(char *err, size_t errlen, const char *msg)
{
    if (err && errlen)
        snprintf(err, errlen, "%s", msg);
}

struct comm_tcp_group *comm_tcp_open(int nnodes, int node_rank, int local, const char *master_addr,
                                     int master_port, int timeout_ms, char *err, size_t errlen)
{
    char msg[COMM_ERR_LEN];
    if (nnodes < 1 || nnodes > TCP_MAX_NODES || local < 1 || local > TCP_MAX_LOCAL) {
        snprintf(msg, sizeof(msg),
                 "comm_tcp: need 1 <= nnodes <= %d and 1 <= local <= %d (got %d, %d)",
                 TCP_MAX_NODES, TCP_MAX_LOCAL, nnodes, local);
        fail_msg(err, errlen, msg);
        return NULL;
    }
    if (node_rank < 0 || node_rank >= nnodes) {
        snprintf(msg, sizeof(msg), "comm_tcp: node rank %d not in [0, %d)", node_rank, nnodes);
        fail_msg(err, errlen, msg);
        return NULL;
    }
    if (nnodes > 1 && (!master_addr || !master_addr[0])) {
        fail_msg(err, errlen, "comm_tcp: no master address");
        return NULL;
    }
    if (master_port < 0 || master_port > 65535 || (master_port == 0 && node_rank != 0)) {
        snprintf(
            msg, sizeof(msg),
            "comm_tcp: master port %d not in [1, 65535] (0, any free port, is for node 0 only)",
            master_port);
        fail_msg(err, errlen, msg);
        return NULL;
    }
    struct comm_tcp_group *g = calloc(1, sizeof(*g));
    if (!g) {
        fail_msg(err, errlen, "comm_tcp: out of memory");
        return NULL;
    }
    g->nnodes = nnodes;
    g->node = node_rank;
    g->local = local;
    g->tp = nnodes * local;
    g->timeout_ms = timeout_ms;
    g->port = master_port;
    g->listen_fd = -1;
    g->wake[0] = g->wake[1] = -1;
    if (pthread_mutex_init(&g->send_mu, NULL) != 0) {
        free(g);
        fail_msg(err, errlen, "comm_tcp: pthread_mutex_init failed");
        return NULL;
    }
    if (pthread_mutex_init(&g->abort_mu, NULL) != 0) {
        pthread_mutex_destroy(&g->send_mu);
        free(g);
        fail_msg(err, errlen, "comm_tcp: pthread_mutex_init failed");
        return NULL;
    }
    /* From here comm_tcp_destroy undoes whatever was built. */
    g->addr = strdup(master_addr ? master_addr : "");
    g->ranks = calloc((size_t)local, sizeof(*g->ranks));
    g->peers = calloc((size_t)nnodes, sizeof(*g->peers));
    g->pfd = calloc((size_t)nnodes + 1, sizeof(*g->pfd));
    g->rx = calloc((size_t)nnodes, sizeof(*g->rx));
    g->io_dst = calloc((size_t)nnodes, sizeof(*g->io_dst));
    g->io_src = calloc((size_t)nnodes, sizeof(*g->io_src));
    g->io_len = calloc((size_t)nnodes, sizeof(*g->io_len));
    g->cpu = comm_cpu_create(local);
    if (!g->addr || !g->ranks || !g->peers || !g->pfd || !g->rx || !g->io_dst || !g->io_src ||
        !g->io_len || !g->cpu) {
        snprintf(msg, sizeof(msg), "comm_tcp: out of memory");
        goto fail;
    }
    for (int k = 0; k < nnodes; k++)
        g->peers[k].fd = -1;
    if (pipe2(g->wake, O_NONBLOCK | O_CLOEXEC) != 0) {
        g->wake[0] = g->wake[1] = -1;
        snprintf(msg, sizeof(msg), "comm_tcp: pipe: %s", strerror(errno));
        goto fail;
    }
    for (int i = 0; i < local; i++) {
        struct tcp_rank *r = &g->ranks[i];
        r->base.ops = &tcp_ops;
        r->base.rank = node_rank * local + i;
        r->base.size = g->tp;
        r->g = g;
        r->cpu = comm_cpu_rank(g->cpu, i);
        r->local_rank = i;
    }
    if (node_rank == 0 && nnodes > 1 && listen_on(g, msg, sizeof(msg)) != 0)
        goto fail;
    return g;
fail:
    fail_msg(err, errlen, msg);
    comm_tcp_destroy(g);
    return NULL;
}

int comm_tcp_port(const struct comm_tcp_group *g)
{
    return g->port;
}

int comm_tcp_join(struct comm_tcp_group *g, char *err, size_t errlen)
{
    char msg[COMM_ERR_LEN] = "";
    if (g->joined) {
        fail_msg(err, errlen, "comm_tcp: already joined");
        return -1;
    }
    g->joined = 1;
    double deadline = deadline_after(g->timeout_ms);
    int rc;
    if (g->nnodes == 1)
        rc = go_up(g, msg, sizeof(msg));
    else if (g->node == 0)
        rc = leader_join(g, deadline, msg, sizeof(msg));
    else
        rc = follower_join(g, deadline, msg, sizeof(msg));
    if (rc != 0) {
        /* Calls on the group fail with the reason, as after an abort. */
        tcp_abort(g, msg);
        fail_msg(err, errlen, msg);
    }
    return rc;
}

struct comm_tcp_group *comm_tcp_create(int nnodes, int node_rank, int local,
                                       const char *master_addr, int master_port, int timeout_ms,
                                       char *err, size_t errlen)
{
    struct comm_tcp_group *g =
        comm_tcp_open(nnodes, node_rank, local, master_addr, master_port, timeout_ms, err, errlen);
    if (g && comm_tcp_join(g, err, errlen) != 0) {
        comm_tcp_destroy(g);
        return NULL;
    }
    return g;
}

struct comm *comm_tcp_rank(struct comm_tcp_group *g, int local_rank)
{
    if (local_rank < 0 || local_rank >= g->local)
        return NULL;
    return &g->ranks[local_rank].base;
}

void comm_tcp_destroy(struct comm_tcp_group *g)
{
    if (!g)
        return;
    for (int k = 0; g->peers && k < g->nnodes; k++)
        if (g->peers[k].fd >= 0)
            close(g->peers[k].fd);
    if (g->listen_fd >= 0)
        close(g->listen_fd);
    if (g->wake[0] >= 0) {
        close(g->wake[0]);
        close(g->wake[1]);
    }
    comm_group_destroy(g->cpu);
    free(g->parts);
    free(g->io_len);
    free(g->io_src);
    free(g->io_dst);
    free(g->rx);
    free(g->pfd);
    free(g->peers);
    free(g->ranks);
    free(g->addr);
    pthread_mutex_destroy(&g->abort_mu);
    pthread_mutex_destroy(&g->send_mu);
    free(g);
}
