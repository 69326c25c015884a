/* safetensors.h: a Hugging Face model directory's weights, mmapped.
 *
 * Opens model.safetensors, or every shard named by
 * model.safetensors.index.json, maps each file read-only and checks every
 * header against its file before any tensor is handed out: header length
 * bounds, strict JSON (duplicate keys refused), a closed set of dtypes
 * (F32, F16, BF16), shape x dtype size equal to the byte range, ranges
 * contiguous, non-overlapping and inside the file, tensor names unique
 * across shards and equal to what the index says. Never reads pickled
 * files. Called from the thread that loads the model.
 */
#ifndef INFERD_SAFETENSORS_H
#define INFERD_SAFETENSORS_H

#include <stddef.h>

#include "engine/tensor.h"

struct st_model;

/* Opens the directory dir. On failure returns -1 with a message naming the
 * file and what is wrong in err; on success *out is owned by the caller. */
int st_open(const char *dir, struct st_model **out, char *err, size_t errlen);
/* Unmaps everything. Accepts NULL. Tensors handed out become invalid. */
void st_close(struct st_model *m);

size_t st_n_tensors(const struct st_model *m);
/* Tensor i (0 <= i < st_n_tensors), owned by m. */
const struct tensor *st_tensor(const struct st_model *m, size_t i);
/* Tensor by name, or NULL. Owned by m. */
const struct tensor *st_find(const struct st_model *m, const char *name);
/* Total bytes of all files mapped. */
unsigned long long st_file_bytes(const struct st_model *m);

#endif
