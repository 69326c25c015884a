/* load_error.h: the messages the model-file loaders write.
 *
 * Every refusal reads "<path>: <message>", and any name or string taken
 * from a file is escaped before it is printed, so a hostile file cannot
 * garble the message or the terminal. Pure functions; any thread.
 */
#ifndef INFERD_LOAD_ERROR_H
#define INFERD_LOAD_ERROR_H

#include <stddef.h>

/* Buffer size for le_show that the loaders use: a name is cut to about
 * 90 printed bytes. */
#define LE_SHOWN 96

/* Writes "<path>: <message>" into err (caller's buffer, errlen bytes,
 * always NUL-terminated; err may be NULL or errlen 0, then nothing is
 * written) and returns -1, so that callers `return le_err(...)`. */
int le_err(char *err, size_t errlen, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* The len bytes at p (need not be NUL-terminated; may hold NULs) made safe
 * to print: printable ASCII kept except '\\' and '"', every other byte as
 * \xNN, and "..." once the output would pass cap - 8 bytes. Writes into buf
 * (caller's, cap >= 16 bytes) and returns buf. */
const char *le_show(const void *p, size_t len, char *buf, size_t cap);

#endif
