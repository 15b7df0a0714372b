//  --------------------------------------------------------------------------
//  gw_log — structured logging shared by every process.
//
//  One line per event on stderr, as text ("2026-11-21T23:45:53.123Z INFO
//  broker: worker expired service=auth") or as JSON lines
//  ({"ts":"…","level":"info","proc":"broker","msg":"…","service":"auth"}).
//  Level from LOG_LEVEL (debug, info, warn, error; default info), format from
//  LOG_FORMAT (text, json; default text). Thread safe: each line is written
//  with one write(2). Nothing is formatted when the level is disabled, so
//  debug calls on hot paths cost one comparison.

#ifndef GW_LOG_H_INCLUDED
#define GW_LOG_H_INCLUDED

#include <stdbool.h>

typedef enum { GW_LOG_DEBUG = 0, GW_LOG_INFO, GW_LOG_WARN, GW_LOG_ERROR } gw_log_level_t;

//  Set the process name and read LOG_LEVEL / LOG_FORMAT. Call once from main.
void gw_log_init (const char *process);

//  Override level and format (format: "text" or "json").
void gw_log_configure (gw_log_level_t level, const char *format);

//  True if messages at this level are written.
bool gw_log_enabled (gw_log_level_t level);

//  Log a message. fields is NULL or a string of space-separated key=value
//  pairs (values without spaces), rendered as extra JSON members in json
//  format. The message is printf-formatted.
void gw_log (gw_log_level_t level, const char *fields, const char *format, ...)
    __attribute__ ((format (printf, 3, 4)));

#define gw_debug(...)                                                                    \
    do {                                                                                 \
        if (gw_log_enabled (GW_LOG_DEBUG))                                               \
            gw_log (GW_LOG_DEBUG, NULL, __VA_ARGS__);                                    \
    } while (0)
#define gw_info(...) gw_log (GW_LOG_INFO, NULL, __VA_ARGS__)
#define gw_warn(...) gw_log (GW_LOG_WARN, NULL, __VA_ARGS__)
#define gw_error(...) gw_log (GW_LOG_ERROR, NULL, __VA_ARGS__)

//  Self test of this class.
void gw_log_test (bool verbose);

#endif
