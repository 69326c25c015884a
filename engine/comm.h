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

/* ---- The interface ------------------------------------------------------ */

int comm_rank(const struct comm *c);
int comm_size(const struct comm *c);

/* In-place sum over ranks of buf: (n) f32 (host or device, see above).
 * n >= 0. Arguments that must match across ranks (n, root, the order of
 * calls): the CPU implementation checks them, and every rank's call fails
 * alike ("collective mismatch") with the group still in step; NCCL cannot,
 * and a mismatch there hangs or corrupts until an abort. */
int comm_allreduce_f32(struct comm *c, float *buf, int64_t n);

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
