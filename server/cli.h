/* cli.h: the subcommands of the inferd binary and the small argument
 * helpers they share. Main thread only. */
#ifndef INFERD_CLI_H
#define INFERD_CLI_H

#include <stdint.h>

/* Each returns the process exit status: 0 ok, 1 runtime error, 2 usage. */
int cli_inspect(int argc, char **argv);
int cli_logits(int argc, char **argv);
int cli_generate(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_run(int argc, char **argv);
int cli_bench_load(int argc, char **argv);
int cli_bench_serve(int argc, char **argv);
int cli_tokenize(int argc, char **argv);
int cli_serve(int argc, char **argv);

/* Parses a decimal integer in [lo, hi]; 0 on success, else prints
 * "inferd: <flag>: ..." and returns -1. */
int cli_parse_int(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out);
/* Parses a byte size: a number with an optional K, M, G or T suffix
 * (powers of 1024; "GiB" and "GB" read the same). 0 or -1 as above. */
int cli_parse_size(const char *flag, const char *s, int64_t *out);
/* Parses a --device value: "cpu" or "cuda" (MODEL_DEVICE_*); 0, or -1
 * after printing what was expected. */
int cli_parse_device(const char *s, int *out);
/* Parses "1,2,3" into a malloc'ed array (caller frees); -1 on error. */
int cli_parse_ids(const char *flag, const char *s, int32_t **ids, int64_t *n);
/* Index of the largest of v[0..n), the first one on ties (as greedy
 * decoding in Hugging Face picks). */
int64_t cli_argmax(const float *v, int64_t n);
/* Prints "inferd: msg" to stderr. */
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
