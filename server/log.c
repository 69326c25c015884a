/* log.c: lines on stderr, one write(2) each (see log.h). Any thread. */
#include "server/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static enum log_level threshold = LOG_INFO;

void log_set_level(enum log_level level)
{
    threshold = level;
}

int log_parse_level(const char *s)
{
    static const char *const names[] = {"debug", "info", "warn", "error"};
    for (int i = 0; i < 4; i++)
        if (s && strcmp(s, names[i]) == 0)
            return i;
    return -1;
}

void log_msg(enum log_level level, const char *fmt, ...)
{
    static const char *const tags[] = {"debug", "info", "warn", "error"};
    if (level < threshold)
        return;
    char line[4096 + 64];
    size_t n = 0;
    /* journald stamps each line itself; elsewhere the time helps */
    if (!getenv("JOURNAL_STREAM")) {
        struct timespec ts;
        struct tm tm;
        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        n = strftime(line, 32, "%Y-%m-%dT%H:%M:%S", &tm);
        n += (size_t)snprintf(line + n, 16, ".%03ldZ ", ts.tv_nsec / 1000000);
    }
    n += (size_t)snprintf(line + n, sizeof(line) - n, "%s ", tags[level]);
    va_list ap;
    va_start(ap, fmt);
    int w = vsnprintf(line + n, 4096, fmt, ap);
    va_end(ap);
    if (w < 0)
        w = 0;
    n += (size_t)w < 4096 ? (size_t)w : 4095;
    line[n++] = '\n';
    /* stderr may be a pipe that closed; nothing useful to do then */
    ssize_t r = write(STDERR_FILENO, line, n);
    (void)r;
}
