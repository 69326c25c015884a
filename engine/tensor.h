/* tensor.h: a named weight tensor as a loader found it in a model file.
 *
 * Loaders (loader_safetensors.c, loader_gguf.c) fill these after checking
 * every field against the file; the model binds them by name. The data
 * pointer points into a read-only mapping owned by the loader, valid until
 * the loader's handle is closed.
 */
#ifndef INFERD_TENSOR_H
#define INFERD_TENSOR_H

#include <stdint.h>

#include "kernels/kernels.h"

#define TENSOR_MAX_DIMS 4

struct tensor {
    const char *name;     /* owned by the loader */
    enum k_dtype dtype;
    int n_dims;           /* 1..4 */
    /* ggml order: ne[0] is the innermost (contiguous) dimension. A PyTorch
     * Linear weight of shape [out, in] has ne = {in, out}. Unused dims are 1. */
    int64_t ne[TENSOR_MAX_DIMS];
    const void *data;     /* borrowed, read-only, may be unaligned */
    uint64_t nbytes;      /* exactly the bytes the shape and dtype imply */
};

#endif
