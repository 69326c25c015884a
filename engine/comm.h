/* comm.h: the tensor-parallel communicator, one interface, two transports.
 *
 * Every rank of a tensor-parallel group holds a struct comm and calls the
 * same collectives in the same order with matching arguments (the sharded
 * forward pass does: one all-reduce after attention, one after the MLP).
 * Two implementations:
 *   - CPU: the ranks are threads of this process (comm_cpu_create). Buffers
 *     are HOST pointers. Calls block until every rank has joined the
 *     collective and the result is in place. The all-reduce sums in one
 *     fixed order (rank 0 + rank 1 + ... element by element) and every rank
 *     gets the same bits, so CI can check TP=2 against TP=1 without GPUs.
 *   - NCCL: one rank per GPU, in one process or many (comm_nccl_create,
 *     built with the CUDA toolkit only). Buffers are DEVICE pointers on the
 *     rank's GPU. Collectives are enqueued on the rank's stream and return
 *     before they finish (stream order, as a kernel launch); comm_barrier
 *     and comm_sync wait for the stream. Sums follow NCCL's algorithm, not
 *     the CPU order (its ring and tree reduce each element once, so ranks
 *     get the same bits in practice; NCCL does not document a promise).
 * No NCCL or CUDA type appears here: streams and ids are void pointers, so
 * the engine compiles without those headers. A build without NCCL still
 * has comm_nccl_*: they fail with "built without NCCL".
 *
 * Failure: calls return 0 or -1; comm_error(c) says why. Once aborted
 * (comm_group_abort or comm_abort; NCCL: also any NCCL or CUDA error)
 * every pending and later call returns -1 with the first reason, on every
 * rank of a CPU group, on the aborted rank for NCCL: a rank that dies or
 * an engine that stops never leaves another waiting forever in a
 * collective.
 */
#ifndef INFERD_COMM_H
#define INFERD_COMM_H

#include <stddef.h>
#include <stdint.h>

struct comm;       /* one rank's handle; used by that rank's thread only */
struct comm_group; /* CPU: the ranks of one process, and their meeting point */

/* Bytes of an NCCL unique id (NCCL_UNIQUE_ID_BYTES). */
#define COMM_NCCL_ID_BYTES 128

/* ---- CPU implementation: ranks as threads of one process ---------------- */

/* Makes a group of size ranks (size >= 1). Returns NULL when size < 1 or
 * memory runs out. Caller owns the group. */
struct comm_group *comm_cpu_create(int size);

/* The handle rank `rank` (0 <= rank < size) uses, always the same one.
 * Borrowed: the group owns it and frees it in comm_group_destroy;
 * comm_destroy on it does nothing. Each handle is for one thread at a time. */
struct comm *comm_cpu_rank(struct comm_group *g, int rank);

/* Makes every pending and future call on every rank of g return -1 with
 * comm_error() = "aborted: <why>". Pending calls return promptly (a rank in
 * the middle of its share of a sum finishes that share first). The first
 * abort's message is kept; later ones are ignored. Any thread, any time
 * until comm_group_destroy; not async-signal-safe. */
void comm_group_abort(struct comm_group *g, const char *why);

/* Frees the group and its rank handles. No rank may be inside a call (abort
 * and join the rank threads first). Accepts NULL. */
void comm_group_destroy(struct comm_group *g);

/* ---- NCCL implementation: one rank per GPU (CUDA builds only) ----------- */

/* Fills out (COMM_NCCL_ID_BYTES bytes) with a fresh ncclUniqueId. Rank 0
 * calls it once and hands the bytes to every rank (threads: share them;
 * processes: the control plane carries them). Returns 0, or -1 with the
 * reason in err. */
int comm_nccl_unique_id(void *out, char *err, size_t errlen);

/* Joins rank `rank` of `size` to the communicator named by unique_id
 * (COMM_NCCL_ID_BYTES bytes, borrowed). The calling thread's current CUDA
 * device (cudaSetDevice) is the rank's GPU; stream (a cudaStream_t of that
 * device, borrowed, NULL for the legacy default stream) carries every
 * collective. Every later call on the handle comes from this thread, with
 * that device still current. Blocks until all size ranks have joined, or
 * timeout_ms milliseconds pass (<= 0: no limit). Returns the handle (caller
 * owns it, comm_destroy frees it), or NULL with the reason in err. */
struct comm *comm_nccl_create(int rank, int size, const void *unique_id, void *stream,
                              int timeout_ms, char *err, size_t errlen);

/* ---- TCP implementation: ranks over several processes ------------------ */

/* A job of nnodes processes ("nodes") on the CPU, so the multi-node path is
 * tested without GPUs. Node k hosts global ranks [k * local, (k + 1) *
 * local) as threads, tp = nnodes * local ranks in all; comm_rank and
 * comm_size say the global rank and tp. Buffers are HOST pointers and calls
 * block, as with comm_cpu. A collective meets within the node (shared
 * memory), then local rank 0 of each node exchanges the node's share with
 * node 0 over TCP (a star through node 0), then the node's ranks get the
 * result. The all-reduce sums within each node in local-rank order, then
 * the node sums in node order: ((r0 + ... + r_{local-1}) + (node 1's sum))
 * + (node 2's sum) + ..., element by element. That is not comm_cpu's flat
 * order (the results agree to fp32 rounding, not in bits), but every rank
 * of every node gets the same bits, run after run.
 *
 * Arguments wrong alike on every rank (n < 0, root out of range) fail every
 * call alike and the group goes on. Arguments that differ between ranks
 * (on one node or across nodes) abort the whole job: nodes agreeing on a
 * failure would cost a round trip per call. A peer that closes or dies, a
 * malformed frame, or a network wait in a collective longer than
 * timeout_ms (> 0) aborts the node's group with a reason naming the node
 * ("node 2: connection lost (...)"); an abort, from any cause, is sent to
 * the other nodes (best effort; node 0 relays), so every node stops:
 * pending and later calls return -1 with "aborted: <why>", as in comm_cpu.
 * All nodes must run the same build (the hello checks the version). */
struct comm_tcp_group; /* one node's ranks and its sockets */

/* Builds node node_rank's half of a group without waiting for anyone:
 * node 0 binds and listens on master_addr:master_port (a numeric address
 * or a host name; SO_REUSEADDR; port 0: any free port, see comm_tcp_port),
 * the other nodes only keep the address. 1 <= nnodes <= 1024, 1 <= local
 * <= 1024, 0 <= node_rank < nnodes. timeout_ms bounds the join and each
 * collective's network wait (<= 0: no limit; a dead peer is still noticed
 * by its closed connection). Returns the group (caller owns it:
 * comm_tcp_destroy), or NULL with the reason in err. Then comm_tcp_join. */
struct comm_tcp_group *comm_tcp_open(int nnodes, int node_rank, int local,
                                     const char *master_addr, int master_port, int timeout_ms,
                                     char *err, size_t errlen);

/* The port node 0 listens on (the one picked when master_port was 0), for
 * its launcher to hand to the other nodes; on another node, master_port. */
int comm_tcp_port(const struct comm_tcp_group *g);

/* The rendezvous, once per group. Nodes 1.. connect to node 0, retrying
 * until timeout_ms (node 0 may start later), and say hello (version,
 * nnodes, node rank, local); node 0 waits until every node has, then
 * welcomes them all. A hello that does not fit (another protocol version,
 * other nnodes or local, a node rank out of range or taken) fails node 0
 * and every node that connected, with the reason ("refused by node 0: ..."
 * on theirs); a connection that is not ours is dropped. Returns 0, or -1
 * with the reason in err; then the group is unusable (destroy it). A
 * comm_tcp_abort from another thread ends the wait. */
int comm_tcp_join(struct comm_tcp_group *g, char *err, size_t errlen);

/* comm_tcp_open then comm_tcp_join: the call a node with a known port
 * makes. Returns the joined group (caller owns it), or NULL with the
 * reason in err. */
struct comm_tcp_group *comm_tcp_create(int nnodes, int node_rank, int local,
                                       const char *master_addr, int master_port, int timeout_ms,
                                       char *err, size_t errlen);

/* The handle of global rank node_rank * local + local_rank (0 <= local_rank
 * < local; else NULL), always the same one. Borrowed: the group owns it and
 * frees it in comm_tcp_destroy; comm_destroy on it does nothing. Each
 * handle is for one thread at a time; local rank 0's thread also does the
 * node's network traffic inside its calls. */
struct comm *comm_tcp_rank(struct comm_tcp_group *g, int local_rank);

/* comm_group_abort for a TCP group (comm_abort on any of its handles does
 * the same): every pending and future call on every rank of this node
 * returns -1 with "aborted: <why>", and the other nodes are told ("node K
 * aborted: <why>"). The first reason is kept. Any thread, any time until
 * comm_tcp_destroy; it may block for a fraction of a second sending. */
void comm_tcp_abort(struct comm_tcp_group *g, const char *why);

/* Closes the sockets and frees the group and its rank handles. No rank may
 * be inside a call (abort and join the rank threads first). A peer still
 * in a collective then sees the connection lost. Accepts NULL. */
void comm_tcp_destroy(struct comm_tcp_group *g);

/* ---- The interface ------------------------------------------------------ */

int comm_rank(const struct comm *c);
int comm_size(const struct comm *c);

/* In-place sum over ranks of buf: (n) f32 (host or device, see above).
 * n >= 0. Arguments that must match across ranks (n, root, the order of
 * calls): the CPU implementation checks them, and every rank's call fails
 * alike ("collective mismatch") with the group still in step; NCCL cannot,
 * and a mismatch there hangs or corrupts until an abort. */
int comm_allreduce_f32(struct comm *c, float *buf, int64_t n);

/* comm_allreduce_f32 over bf16 values (the bits, as uint16_t): what the
 * GPU ranks sum, in the activations' own type. NCCL sums in ncclBfloat16
 * (its order and rounding). The CPU and TCP implementations widen each
 * value to f32, sum as comm_allreduce_f32 does and round the sum to the
 * nearest bf16 (ties to even) once, so every rank still gets the same
 * bits. */
int comm_allreduce_bf16(struct comm *c, uint16_t *buf, int64_t n);

/* recv: (size, n_per_rank) f32: rank 0's send, then rank 1's, ... on every
 * rank. send: (n_per_rank) f32, borrowed; it may be recv + rank *
 * n_per_rank (in place). */
int comm_allgather_f32(struct comm *c, const float *send, int64_t n_per_rank, float *recv);

/* Copies root's bytes of buf to every other rank's buf. */
int comm_broadcast(struct comm *c, void *buf, size_t bytes, int root);

/* Returns when every rank has called it (NCCL: and this rank's stream has
 * drained up to it). */
int comm_barrier(struct comm *c);

/* Waits until this rank's collectives have completed: CPU, at once; NCCL,
 * the stream drained. Unlike cudaStreamSynchronize it notices an abort or
 * an NCCL error while it waits, so the engine's host waits belong here.
 * NCCL: not while the stream is being captured into a graph (nor
 * comm_barrier); the collectives themselves may be captured. */
int comm_sync(struct comm *c);

/* Waits until event (a cudaEvent_t recorded on this rank's stream, as a
 * void pointer) has completed, noticing an abort or an asynchronous NCCL
 * error as comm_sync does, but without waiting for work enqueued after
 * the event (a step launched ahead of the one being collected). CPU and
 * TCP: no stream, returns 0 at once (-1 once aborted). */
int comm_wait_event(struct comm *c, void *event);

/* The reason for the last failed call on c: "" when none failed. Owned by
 * c; valid until the next call on c. Rank thread only. */
const char *comm_error(const struct comm *c);

/* Aborts: CPU, c's whole group, as comm_group_abort does. NCCL, this rank
 * only (its peers are other threads or processes: they fail when their
 * collectives do, or when the control plane aborts them): sets a flag that
 * c's own thread acts on (ncclCommAbort) at its next call or while it
 * waits in comm_barrier / comm_sync; a thread blocked on the stream
 * elsewhere is not freed, which is why host waits use comm_sync. Any
 * thread; the first reason is kept. */
void comm_abort(struct comm *c, const char *why);

/* Frees an NCCL handle (ncclCommAbort after an abort or error, an orderly
 * finalize otherwise). A CPU rank handle is the group's: nothing happens.
 * The rank thread, outside any call. Accepts NULL. */
void comm_destroy(struct comm *c);

/* All-reduce bus bandwidth in bytes per second, as nccl-tests defines it:
 * algbw (bytes / time per all-reduce) * 2 (size - 1) / size; 0 with one
 * rank. Runs one warm-up all-reduce, a barrier, then iters timed ones on
 * buf: bytes bytes (host for CPU, device for NCCL; borrowed, contents
 * overwritten; zeros keep the CPU sums free of slow denormals). A
 * collective: every rank calls it with the same bytes and iters. Returns
 * < 0 (comm_error says why) on failure or when bytes < 4 or iters < 1. */
double comm_allreduce_busbw(struct comm *c, void *buf, size_t bytes, int iters);

#endif
