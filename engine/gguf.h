/* gguf.h: a GGUF v3 file, mmapped and validated.
 *
 * Every header field is checked against the file before it is used: magic
 * and version, tensor and key counts against the bytes left, string
 * lengths, value types, array length x element size without overflow,
 * duplicate keys and tensor names, alignment a power of two, 1-4
 * dimensions, known tensor types, row length a multiple of the block,
 * sizes in 64 bits with overflow checks, offsets aligned and inside the
 * file, tensors not overlapping, tokenizer arrays of equal length and
 * special token ids inside the vocabulary. A hostile file is an error
 * naming the file and the field, never a crash or an out-of-bounds read.
 * Called from the thread that loads the model.
 */
#ifndef INFERD_GGUF_H
#define INFERD_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "engine/tensor.h"

/* Metadata value types, numbered as in the GGUF specification. */
enum gguf_type {
    GGUF_UINT8 = 0, GGUF_INT8 = 1, GGUF_UINT16 = 2, GGUF_INT16 = 3,
    GGUF_UINT32 = 4, GGUF_INT32 = 5, GGUF_FLOAT32 = 6, GGUF_BOOL = 7,
    GGUF_STRING = 8, GGUF_ARRAY = 9, GGUF_UINT64 = 10, GGUF_INT64 = 11,
    GGUF_FLOAT64 = 12,
};

struct gguf_file;

/* Opens and validates path. On failure returns -1 with a message naming the
 * file and what is wrong in err; on success *out is owned by the caller. */
int gguf_open(const char *path, struct gguf_file **out, char *err, size_t errlen);
/* Unmaps and frees. Accepts NULL. */
void gguf_close(struct gguf_file *f);

uint32_t gguf_version(const struct gguf_file *f);
unsigned long long gguf_file_bytes(const struct gguf_file *f);

/* ---- metadata. Keys are looked up by exact name; -1 means absent. */
int64_t gguf_find_key(const struct gguf_file *f, const char *key);
size_t gguf_n_keys(const struct gguf_file *f);
const char *gguf_key_name(const struct gguf_file *f, int64_t k);
enum gguf_type gguf_key_type(const struct gguf_file *f, int64_t k);

/* Scalar getters: 0 and *out set when the key exists and its value can be
 * represented exactly in the out type (any integer type into int64 /
 * uint64 when in range; float32/float64 into double; bool into int64 as
 * 0/1), -1 otherwise. */
int gguf_get_i64(const struct gguf_file *f, const char *key, int64_t *out);
int gguf_get_f64(const struct gguf_file *f, const char *key, double *out);
int gguf_get_bool(const struct gguf_file *f, const char *key, int *out);
/* String value (NUL-terminated copy owned by f), or NULL when absent or
 * not a string. len may be NULL. */
const char *gguf_get_str(const struct gguf_file *f, const char *key, size_t *len);

/* Arrays: 0 when key is an array, with its element type and length. */
int gguf_get_arr(const struct gguf_file *f, const char *key,
                 enum gguf_type *elem_type, uint64_t *n);
/* Element i of a numeric array as double / int64 (-1 if not representable). */
int gguf_arr_f64(const struct gguf_file *f, const char *key, uint64_t i, double *out);
int gguf_arr_i64(const struct gguf_file *f, const char *key, uint64_t i, int64_t *out);
/* Element i of a string array (pointer into the mapping, NOT NUL-terminated;
 * length in *len), or NULL. */
const char *gguf_arr_str(const struct gguf_file *f, const char *key, uint64_t i, size_t *len);

/* ---- tensors */
size_t gguf_n_tensors(const struct gguf_file *f);
const struct tensor *gguf_tensor(const struct gguf_file *f, size_t i);
const struct tensor *gguf_find_tensor(const struct gguf_file *f, const char *name);

#endif
