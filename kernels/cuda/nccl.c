/* nccl.c: the NCCL collectives across GPUs behind kcuda.h, so that the
 * engine's communicator (engine/comm_nccl.c) includes no NCCL or CUDA
 * header. Built only when NCCL is found. One call each, no state, no
 * checks of its own: the result goes back as an int for the caller to
 * check, and a handle is an ncclComm_t under another name. Runs on
 * whatever thread calls (the rank's GPU worker).
 */
#include <cuda_runtime.h>
#include <nccl.h>
#include <string.h>

#include "kernels/cuda/kcuda.h"

_Static_assert(sizeof(ncclUniqueId) == KC_NCCL_ID_BYTES, "KC_NCCL_ID_BYTES");
_Static_assert(ncclSuccess == KC_NCCL_SUCCESS, "KC_NCCL_SUCCESS");
_Static_assert(ncclInProgress == KC_NCCL_IN_PROGRESS, "KC_NCCL_IN_PROGRESS");
_Static_assert(cudaErrorNotReady == KC_CUDA_NOT_READY, "KC_CUDA_NOT_READY");

const char *kc_nccl_error_string(int res)
{
    return ncclGetErrorString((ncclResult_t)res);
}

const char *kc_nccl_last_error(kc_nccl_comm c)
{
    return ncclGetLastError(c);
}

int kc_nccl_unique_id(void *out)
{
    ncclUniqueId id;
    ncclResult_t res = ncclGetUniqueId(&id);
    if (res == ncclSuccess)
        memcpy(out, &id, sizeof(id));
    return (int)res;
}

int kc_nccl_comm_init(kc_nccl_comm *out, int nranks, const void *id, int rank, int blocking)
{
    ncclUniqueId uid;
    memcpy(&uid, id, sizeof(uid));
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = blocking;
    /* kc_nccl_comm and ncclComm_t are the same type: NCCL writes the
     * handle straight into *out, in progress or not. */
    return (int)ncclCommInitRankConfig(out, nranks, uid, rank, &cfg);
}

int kc_nccl_async_error(kc_nccl_comm c, int *state)
{
    ncclResult_t st = ncclSuccess;
    ncclResult_t res = ncclCommGetAsyncError(c, &st);
    *state = (int)st;
    return (int)res;
}

int kc_nccl_finalize(kc_nccl_comm c)
{
    return (int)ncclCommFinalize(c);
}

int kc_nccl_destroy(kc_nccl_comm c)
{
    return (int)ncclCommDestroy(c);
}

int kc_nccl_abort(kc_nccl_comm c)
{
    return (int)ncclCommAbort(c);
}

/* ---- Collectives ------------------------------------------------------ */

int kc_nccl_allreduce_sum_f32(kc_nccl_comm c, kc_stream s, float *recv, const float *send, size_t n)
{
    return (int)ncclAllReduce(send, recv, n, ncclFloat32, ncclSum, c, (cudaStream_t)s);
}

int kc_nccl_allreduce_sum_i32(kc_nccl_comm c, kc_stream s, int32_t *recv, const int32_t *send,
                              size_t n)
{
    return (int)ncclAllReduce(send, recv, n, ncclInt32, ncclSum, c, (cudaStream_t)s);
}

int kc_nccl_allreduce_sum_bf16(kc_nccl_comm c, kc_stream s, kc_bf16 *recv, const kc_bf16 *send,
                               size_t n)
{
    return (int)ncclAllReduce(send, recv, n, ncclBfloat16, ncclSum, c, (cudaStream_t)s);
}

int kc_nccl_allgather_f32(kc_nccl_comm c, kc_stream s, float *recv, const float *send,
                          size_t n_per_rank)
{
    return (int)ncclAllGather(send, recv, n_per_rank, ncclFloat32, c, (cudaStream_t)s);
}

int kc_nccl_broadcast(kc_nccl_comm c, kc_stream s, void *recv, const void *send, size_t bytes,
                      int root)
{
    return (int)ncclBroadcast(send, recv, bytes, ncclUint8, root, c, (cudaStream_t)s);
}

int kc_nccl_stream_query(kc_stream s)
{
    return (int)cudaStreamQuery((cudaStream_t)s);
}

int kc_nccl_event_query(kc_event e)
{
    return (int)cudaEventQuery((cudaEvent_t)e);
}
