/* dummy.h: random weights at a real model's shape, from its config alone.
 *
 * `--load-format dummy` (the name vLLM users know) benchmarks a model
 * without its files: the tensors a Hugging Face checkpoint of that config
 * would hold, with the same names and shapes, filled with small random
 * values (matrices of magnitude 0.002 to 0.016 with random signs, norm
 * weights 1, biases 0) from a seed, so two runs compute the same numbers. The output
 * is meaningless text; the arithmetic, memory traffic and timings are
 * those of the real model. Called from the thread that loads the model.
 */
#ifndef INFERD_DUMMY_H
#define INFERD_DUMMY_H

#include <stddef.h>
#include <stdint.h>

#include "engine/model.h"
#include "engine/tensor.h"

struct dummy_model;

/* Builds every tensor config c implies, of dtype (K_F32, K_F16 or K_BF16;
 * vectors are always f32), in one anonymous mapping. fill 0 leaves every
 * value zero and the mapping untouched (no memory used: shapes only). Returns -1 with the
 * reason in err (out of memory names the bytes needed). *out is owned by
 * the caller. */
int dummy_open(const struct model_config *c, enum k_dtype dtype, uint64_t seed, int fill,
               struct dummy_model **out, char *err, size_t errlen);
void dummy_close(struct dummy_model *d);
/* Tensor by Hugging Face name, or NULL. Owned by d. */
const struct tensor *dummy_find(const struct dummy_model *d, const char *name);
/* Bytes of all tensors. */
uint64_t dummy_bytes(const struct dummy_model *d);

#endif
