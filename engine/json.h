/* json.h: a small strict JSON reader for model files.
 *
 * The engine must not depend on the server's JSON library, yet it reads
 * config.json, safetensors headers and (later) tokenizer.json, all of which
 * come from files a user downloaded. This parser is strict: RFC 8259
 * grammar only, UTF-8 validated, \u escapes (with surrogate pairs) decoded,
 * duplicate object keys refused, nesting depth capped, trailing bytes
 * refused. It builds an immutable tree owned by the root.
 */
#ifndef INFERD_JSON_H
#define INFERD_JSON_H

#include <stddef.h>
#include <stdint.h>

enum json_type { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT };

struct json;

/* Parses len bytes of text (need not be NUL-terminated). On failure returns
 * NULL and writes a message with the byte offset into err. The caller owns
 * the result and frees it with json_free. */
struct json *json_parse(const char *text, size_t len, char *err, size_t errlen);
/* As json_parse, refusing arrays and objects nested deeper than max_depth
 * (clamped to [1, 128], json_parse's own cap): for client requests, whose
 * depth the server bounds far below what model files need. */
struct json *json_parse_depth(const char *text, size_t len, int max_depth, char *err,
                              size_t errlen);
/* Frees a tree returned by json_parse. Accepts NULL. */
void json_free(struct json *root);

/* Accessors. All accept NULL and then return NULL / 0 / JSON_NULL, so that
 * lookups chain: json_number(json_get(json_get(cfg, "rope_scaling"), "factor")). */
enum json_type json_type(const struct json *v);
/* Member of an object, or NULL when v is not an object or lacks key. */
const struct json *json_get(const struct json *v, const char *key);
/* Number of elements of an array or members of an object; 0 otherwise. */
size_t json_len(const struct json *v);
/* Element i of an array, or value of member i of an object (in file order). */
const struct json *json_at(const struct json *v, size_t i);
/* Key of member i of an object (NUL-terminated, owned by the tree). */
const char *json_key_at(const struct json *v, size_t i);
/* Length in bytes of that key, which may hold embedded NULs (a \u0000
 * escape); 0 when v is not an object or i is out of range. */
size_t json_key_len(const struct json *v, size_t i);
/* The value of a number (0 when not a number). */
double json_number(const struct json *v);
/* 0 and *out set when v is a number that is an exact integer in int64
 * range (written without fraction or exponent, or with a zero fraction);
 * -1 otherwise. */
int json_int64(const struct json *v, int64_t *out);
/* String contents (NUL-terminated, may contain embedded NULs: use *len),
 * owned by the tree; NULL when not a string. len may be NULL. */
const char *json_str(const struct json *v, size_t *len);
/* 1 for true, 0 for false or not a bool. */
int json_bool(const struct json *v);

#endif
