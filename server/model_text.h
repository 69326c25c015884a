/* model_text.h: what turns text into a model's tokens and back, found
 * beside its weights: the tokenizer (GGUF metadata, or tokenizer.json in a
 * Hugging Face directory), the chat template source, and the token ids that
 * end a turn. Shared by the command-line tools and the daemon. Main thread
 * (loading); the results are immutable.
 */
#ifndef INFERD_MODEL_TEXT_H
#define INFERD_MODEL_TEXT_H

#include <stddef.h>
#include <stdint.h>

struct tokenizer;

/* The model used when none is named: $INFERD_MODEL, else the one
 * deploy/setup.sh installs. Writes the path to buf when it builds one. */
const char *mt_default_model(char *buf, size_t n);
/* A file's whole contents, NUL-terminated, *len bytes (malloc'd, caller
 * frees), or NULL (errno set). */
char *mt_slurp(const char *path, size_t *len);
/* The model's tokenizer and, when want_template, its chat template source
 * (tokenizer.chat_template, or tokenizer_config.json's chat_template) in
 * *tmpl (malloc'd; NULL when the model has none). Returns the tokenizer
 * (caller owns it), or NULL with the reason in err. */
struct tokenizer *mt_open_tokenizer(const char *path, int want_template, char **tmpl, char *err,
                                    size_t errlen);
/* The text of token id as a malloc'd string ("" for -1 or an unknown id),
 * or NULL on out of memory. */
char *mt_token_text(const struct tokenizer *t, int64_t id);
/* Special tokens that end a turn in the chat formats inferd knows
 * (<|im_end|>, <|eot_id|>, <|end|>, <|endoftext|>, ...), besides the
 * model's EOS: ids written to out (at most max), count returned. */
int mt_end_of_turn_ids(const struct tokenizer *t, int64_t eos_id, int32_t *out, int max);

#endif
