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
