/* log.h: the daemon's one logger: lines on stderr, which journald takes.
 *
 * Each line is "<level> <message>" with an RFC 3339 UTC timestamp in front
 * unless stderr is the journal (JOURNAL_STREAM set), which stamps lines
 * itself. Any thread may log; a line is written with one write(2), so
 * lines from different threads never interleave. The level threshold is
 * the only state, set once at startup (the process-wide logger DESIGN.md
 * section 7 allows).
 */
#ifndef INFERD_LOG_H
#define INFERD_LOG_H

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

/* Lines below level are dropped. Default LOG_INFO. Call before threads. */
void log_set_level(enum log_level level);
/* Parses "debug", "info", "warn" or "error"; -1 when none of those. */
int log_parse_level(const char *s);
/* Formats and writes one line (a trailing newline is added; lines longer
 * than 4 KiB are cut). */
void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
