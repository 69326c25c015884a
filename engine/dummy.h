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

/* What dummy_open writes: nothing (every value zero, the mapping untouched,
 * no memory used: shapes only), every tensor, or only the vectors (norms
 * and biases, a few KB) when a GPU makes the matrices itself from
 * dummy_fill_of. */
enum { DUMMY_FILL_NONE = 0, DUMMY_FILL_ALL = 1, DUMMY_FILL_VECTORS = 2 };

/* Builds every tensor config c implies, of dtype (K_F32, K_F16 or K_BF16;
 * vectors are always f32), in one anonymous mapping, filled as fill
 * (DUMMY_FILL_*) says. Returns -1 with the reason in err (out of memory
 * names the bytes needed). *out is owned by the caller. */
int dummy_open(const struct model_config *c, enum k_dtype dtype, uint64_t seed, int fill,
               struct dummy_model **out, char *err, size_t errlen);
void dummy_close(struct dummy_model *d);
/* Tensor by Hugging Face name, or NULL. Owned by d. */
const struct tensor *dummy_find(const struct dummy_model *d, const char *name);
/* Bytes of all tensors. */
uint64_t dummy_bytes(const struct dummy_model *d);

/* How one tensor's values follow from the seed, so that another device
 * can make the same bytes from the config alone (kc_fill_dummy_bf16 does
 * on a GPU) instead of copying them from the mapping.
 *
 * The values come from one splitmix64 stream that starts at the seed and
 * runs through the tensors in order. A random tensor draws from it: bf16
 * one 64-bit value per 4 elements (element i takes 16-bit lane i % 4 of
 * draw i / 4, from the low bits up: sign = bit 15, exponent = 118 + bits
 * 7..8, mantissa = bits 0..6), f32 and f16 one per element. ONES and
 * ZEROS draw nothing. splitmix64 is counter-based: draw k (from 0) of a
 * tensor whose start state is s is the finalizer of
 * s + (k + 1) * 0x9e3779b97f4a7c15 (mod 2^64), so every draw can be made
 * independently. */
enum dummy_fill_kind { DUMMY_FILL_RANDOM, DUMMY_FILL_ONES, DUMMY_FILL_ZEROS };
struct dummy_fill {
    enum dummy_fill_kind kind;
    enum k_dtype dtype; /* the tensor's: K_F32 for vectors */
    int64_t n;          /* elements */
    uint64_t state;     /* the stream's state before the tensor's first draw */
};
/* The fill of the tensor whose values start at data (a tensor's data as
 * dummy_find returns it, or a k_matrix bound to it): 0 and *out set, or
 * -1 when no tensor of d starts there. Known also when d holds shapes
 * only (fill 0): the states are arithmetic. Reads d only. */
int dummy_fill_of(const struct dummy_model *d, const void *data, struct dummy_fill *out);
/* The same for a pointer anywhere inside a tensor's values (a row or
 * column slice of it, as a tensor-parallel rank takes): *elem is the
 * index of the element data points at. -1 when no tensor holds data or
 * it points inside an element. */
int dummy_fill_at(const struct dummy_model *d, const void *data, struct dummy_fill *out,
                  int64_t *elem);
/* Draw k of a random tensor's stream starting at state s is the finalizer
 * of s + (k + 1) * DUMMY_GOLDEN: a slice starting at element e (e % 4 ==
 * 0, bf16) is a stream of its own starting at s + (e / 4) * DUMMY_GOLDEN. */
#define DUMMY_GOLDEN 0x9e3779b97f4a7c15ull

#endif
