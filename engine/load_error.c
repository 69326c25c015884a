/* load_error.c: "<path>: <message>" formatting and the escaping of names
 * from model files, shared by the GGUF and safetensors loaders and the
 * model config reader. Pure functions; any thread.
 */
#include "engine/load_error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int le_err(char *err, size_t errlen, const char *path, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return -1;
    int n = snprintf(err, errlen, "%s: ", path);
    if (n < 0 || (size_t)n >= errlen)
        return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

const char *le_show(const void *p, size_t len, char *buf, size_t cap)
{
    const unsigned char *s = p;
    size_t k = 0;
    for (size_t i = 0; i < len; i++) {
        if (k + 8 >= cap) {
            memcpy(buf + k, "...", 4);
            return buf;
        }
        /* '"' too: the config messages quote strings with it */
        if (s[i] >= 0x20 && s[i] < 0x7f && s[i] != '\\' && s[i] != '"')
            buf[k++] = (char)s[i];
        else
            k += (size_t)snprintf(buf + k, cap - k, "\\x%02x", s[i]);
    }
    buf[k] = '\0';
    return buf;
}
