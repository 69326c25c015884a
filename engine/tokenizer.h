/* tokenizer.h: text to token ids and back, as the model's own tokenizer
 * does it.
 *
 * Today: byte-level BPE (GPT-2 style: Llama 3, Qwen2) read from a Hugging
 * Face tokenizer.json: the pre-tokenizer's split regexes (PCRE2, Unicode
 * classes), the 256-symbol byte map, merges by rank with the leftmost pair
 * first on ties (as the `tokenizers` library), `ignore_merges`, added and
 * special tokens (matched before pre-tokenizing, longest first), and the
 * template post-processor's prefix/suffix tokens (BOS). Decoding maps the
 * byte symbols back to bytes and replaces invalid UTF-8 the way Rust's
 * from_utf8_lossy does. A tokenizer is immutable after loading and may be
 * shared by threads; the decode stream is per request.
 */
#ifndef INFERD_TOKENIZER_H
#define INFERD_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

struct tokenizer;

/* Loads a tokenizer.json. On failure returns -1 with a message naming the
 * file and what is wrong (or unsupported) in err. *out is owned by the
 * caller (tokenizer_destroy). */
int tokenizer_load_hf(const char *path, struct tokenizer **out, char *err,
                      size_t errlen);
/* Loads the tokenizer a GGUF file carries (tokenizer.ggml.*): today the
 * byte-level BPE ('gpt2') with the llama-bpe, qwen2 or gpt2
 * pre-tokenizer. Control tokens are special; user-defined tokens are
 * added tokens matched in any text; BOS is prepended when
 * add_bos_token says so. path is for messages. The tokenizer copies what
 * it needs: g may be closed afterwards. */
struct gguf_file;
int tokenizer_load_gguf(const struct gguf_file *g, const char *path, struct tokenizer **out,
                        char *err, size_t errlen);
void tokenizer_destroy(struct tokenizer *t);

int64_t tokenizer_n_vocab(const struct tokenizer *t);

/* Encodes len bytes of text (need not be valid UTF-8: invalid bytes are
 * byte symbols like any other). add_special: apply the post-processor's
 * prefix and suffix tokens (BOS). parse_special: match special added
 * tokens written in the text (as the `tokenizers` library does); when 0,
 * their text is encoded as plain text, so user input cannot forge them.
 * Writes a malloc'd array to *ids (caller frees) and its length to *n.
 * Returns 0, or -1 with err set (out of memory, or a byte with no token). */
int tokenizer_encode(const struct tokenizer *t, const char *text, size_t len,
                     int add_special, int parse_special, int32_t **ids,
                     size_t *n, char *err, size_t errlen);

/* The bytes of token id (special tokens: their text), or NULL for an id
 * outside the vocabulary. Byte-level symbols are mapped back to bytes;
 * the result may end inside a UTF-8 character. *len set. The pointer is
 * owned by the tokenizer. */
const char *tokenizer_token_bytes(const struct tokenizer *t, int32_t id,
                                  size_t *len);
/* Whether id is a special token (skipped by decode with skip_special). */
int tokenizer_is_special(const struct tokenizer *t, int32_t id);

/* Decodes n ids to UTF-8 (invalid sequences become U+FFFD). Returns a
 * malloc'd NUL-terminated string (caller frees) with *len set, or NULL
 * (out of memory). Ids outside the vocabulary are skipped. */
char *tokenizer_decode(const struct tokenizer *t, const int32_t *ids, size_t n,
                       int skip_special, size_t *len);

/* Incremental decoding for streams: tok_stream_push appends one token and
 * returns the text that is complete now (never half a UTF-8 character);
 * tok_stream_finish returns what is left. The concatenation of all
 * returned pieces equals tokenizer_decode of the same ids. Returned
 * pointers are valid until the next call on the stream. */
struct tok_stream;
struct tok_stream *tok_stream_create(const struct tokenizer *t, int skip_special);
void tok_stream_destroy(struct tok_stream *s);
/* NULL on out of memory. */
const char *tok_stream_push(struct tok_stream *s, int32_t id, size_t *len);
const char *tok_stream_finish(struct tok_stream *s, size_t *len);

#endif
