// device.cu: which CUDA devices there are, and error messages (kcuda.h).
// A machine without a driver or a GPU is not an error here: the count is
// 0, and the daemon says so and runs on the CPU.
#include <cuda_runtime.h>
#include <stdio.h>

#include "kernels/cuda/kcuda.h"

extern "C" int kc_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); // clear the sticky "no driver" error
        return 0;
    }
    return n;
}

extern "C" int kc_device_describe(int i, char *buf, size_t n)
{
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, i);
    if (e != cudaSuccess) {
        snprintf(buf, n, "device %d: %s", i, cudaGetErrorString(e));
        return (int)e;
    }
    snprintf(buf, n, "%s, sm_%d%d, %d SMs, %.1f GiB", p.name, p.major, p.minor,
             p.multiProcessorCount, (double)p.totalGlobalMem / (1 << 30));
    return 0;
}

extern "C" const char *kc_error_string(int code)
{
    return cudaGetErrorString((cudaError_t)code);
}

// ------------------------------------------------- runtime wrappers (C)

extern "C" int kc_set_device(int i) { return (int)cudaSetDevice(i); }

extern "C" int kc_malloc(void **p, size_t bytes)
{
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 16);
    if (e != cudaSuccess)
        *p = nullptr;
    return (int)e;
}

extern "C" void kc_free(void *p)
{
    if (p)
        cudaFree(p);
}

extern "C" int kc_malloc_host(void **p, size_t bytes)
{
    cudaError_t e = cudaMallocHost(p, bytes ? bytes : 16);
    if (e != cudaSuccess)
        *p = nullptr;
    return (int)e;
}

extern "C" void kc_free_host(void *p)
{
    if (p)
        cudaFreeHost(p);
}

extern "C" int kc_stream_create(kc_stream *s)
{
    cudaStream_t st = nullptr;
    cudaError_t e = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    *s = (kc_stream)st;
    return (int)e;
}

extern "C" void kc_stream_destroy(kc_stream s)
{
    if (s)
        cudaStreamDestroy((cudaStream_t)s);
}

extern "C" int kc_stream_sync(kc_stream s) { return (int)cudaStreamSynchronize((cudaStream_t)s); }

extern "C" int kc_event_create(kc_event *e)
{
    cudaEvent_t ev = nullptr;
    cudaError_t r = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    *e = (kc_event)ev;
    return (int)r;
}

extern "C" void kc_event_destroy(kc_event e)
{
    if (e)
        cudaEventDestroy((cudaEvent_t)e);
}

extern "C" int kc_event_record(kc_event e, kc_stream s)
{
    return (int)cudaEventRecord((cudaEvent_t)e, (cudaStream_t)s);
}

extern "C" int kc_event_sync(kc_event e) { return (int)cudaEventSynchronize((cudaEvent_t)e); }

extern "C" int kc_copy_h2d(kc_stream s, void *dst, const void *src, size_t bytes)
{
    return (int)cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, (cudaStream_t)s);
}

extern "C" int kc_copy_d2h(kc_stream s, void *dst, const void *src, size_t bytes)
{
    return (int)cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)s);
}

extern "C" int kc_copy_2d_d2d(kc_stream s, void *dst, size_t dpitch, const void *src,
                              size_t spitch, size_t width, size_t height)
{
    return (int)cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height,
                                  cudaMemcpyDeviceToDevice, (cudaStream_t)s);
}

extern "C" int kc_copy_2d_h2d(kc_stream s, void *dst, size_t dpitch, const void *src,
                              size_t spitch, size_t width, size_t height)
{
    return (int)cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height,
                                  cudaMemcpyHostToDevice, (cudaStream_t)s);
}

extern "C" int kc_mem_info(size_t *free_bytes, size_t *total_bytes)
{
    return (int)cudaMemGetInfo(free_bytes, total_bytes);
}

extern "C" int kc_memset(kc_stream s, void *dst, int value, size_t bytes)
{
    return (int)cudaMemsetAsync(dst, value, bytes, (cudaStream_t)s);
}

// Thread-local capture: another thread's CUDA calls (none today, but the
// NCCL ranks of a later design run one per thread) must not be pulled
// into, or invalidate, this stream's capture.
extern "C" int kc_capture_begin(kc_stream s)
{
    return (int)cudaStreamBeginCapture((cudaStream_t)s, cudaStreamCaptureModeThreadLocal);
}

extern "C" int kc_capture_end(kc_stream s, kc_graph *out)
{
    *out = nullptr;
    cudaGraph_t g = nullptr;
    cudaError_t e = cudaStreamEndCapture((cudaStream_t)s, &g);
    if (e != cudaSuccess) {
        if (g)
            cudaGraphDestroy(g);
        return (int)e;
    }
    cudaGraphExec_t x = nullptr;
    e = cudaGraphInstantiate(&x, g, 0);
    cudaGraphDestroy(g); // the executable graph keeps what it needs
    if (e != cudaSuccess)
        return (int)e;
    *out = (kc_graph)x;
    return 0;
}

extern "C" int kc_graph_launch(kc_graph g, kc_stream s)
{
    return (int)cudaGraphLaunch((cudaGraphExec_t)g, (cudaStream_t)s);
}

extern "C" void kc_graph_destroy(kc_graph g)
{
    if (g)
        cudaGraphExecDestroy((cudaGraphExec_t)g);
}
