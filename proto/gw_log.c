//  --------------------------------------------------------------------------
//  gw_log — structured logging. Each line is formatted into a stack buffer
//  and written with a single write(2) to stderr, so lines from threads and
//  from processes sharing a terminal never interleave. Lines are capped at
//  4 KiB (longer messages are truncated with "…").

#include "aigw.h"
#include <stdarg.h>
#include <time.h>
#include <unistd.h>

static gw_log_level_t s_level = GW_LOG_INFO;
static bool s_json = false;
static char s_process[32] = "aigw";
static const char *s_names[] = {"DEBUG", "INFO", "WARN", "ERROR"};
static const char *s_json_names[] = {"debug", "info", "warn", "error"};

static gw_log_level_t
s_parse_level (const char *text, gw_log_level_t fallback)
{
    if (!text)
        return fallback;
    if (strcasecmp (text, "debug") == 0 || strcasecmp (text, "trace") == 0)
        return GW_LOG_DEBUG;
    if (strcasecmp (text, "info") == 0)
        return GW_LOG_INFO;
    if (strcasecmp (text, "warn") == 0 || strcasecmp (text, "warning") == 0)
        return GW_LOG_WARN;
    if (strcasecmp (text, "error") == 0 || strcasecmp (text, "fatal") == 0)
        return GW_LOG_ERROR;
    return fallback;
}

void
gw_log_init (const char *process)
{
    snprintf (s_process, sizeof (s_process), "%s", process ? process : "aigw");
    s_level = s_parse_level (getenv ("LOG_LEVEL"), GW_LOG_INFO);
    const char *format = getenv ("LOG_FORMAT");
    s_json = format && strcasecmp (format, "json") == 0;
}

void
gw_log_configure (gw_log_level_t level, const char *format)
{
    s_level = level;
    s_json = format && strcasecmp (format, "json") == 0;
}

bool
gw_log_enabled (gw_log_level_t level)
{
    return level >= s_level;
}

//  Append a JSON-escaped copy of text (without quotes), never past end.
static size_t
s_json_append (char *buf, size_t pos, size_t cap, const char *text)
{
    for (const unsigned char *p = (const unsigned char *)text; *p && pos + 7 < cap; p++) {
        if (*p == '"' || *p == '\\') {
            buf[pos++] = '\\';
            buf[pos++] = (char)*p;
        }
        else if (*p == '\n' || *p == '\r' || *p == '\t') {
            buf[pos++] = '\\';
            buf[pos++] = *p == '\n' ? 'n' : *p == '\r' ? 'r' : 't';
        }
        else if (*p < 0x20)
            pos += (size_t)snprintf (buf + pos, cap - pos, "\\u%04x", *p);
        else
            buf[pos++] = (char)*p;
    }
    return pos;
}

void
gw_log (gw_log_level_t level, const char *fields, const char *format, ...)
{
    if (level < s_level)
        return;
    char msg[3072];
    va_list args;
    va_start (args, format);
    int n = vsnprintf (msg, sizeof (msg), format, args);
    va_end (args);
    if (n < 0)
        return;

    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r (&ts.tv_sec, &tm);
    char stamp[64];
    snprintf (stamp, sizeof (stamp), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ",
        tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
        ts.tv_nsec / 1000000);

    char line[4096];
    size_t cap = sizeof (line) - 2, pos = 0;
    if (s_json) {
        pos = (size_t)snprintf (line, cap, "{\"ts\":\"%s\",\"level\":\"%s\",\"proc\":\"",
            stamp, s_json_names[level]);
        pos = s_json_append (line, pos, cap, s_process);
        pos += (size_t)snprintf (
            line + pos, cap - pos, "\",\"pid\":%d,\"msg\":\"", (int)getpid ());
        pos = s_json_append (line, pos, cap, msg);
        if (pos < cap)
            line[pos++] = '"';
        //  key=value pairs become extra members
        const char *f = fields ? fields : "";
        while (*f && pos + 16 < cap) {
            while (*f == ' ')
                f++;
            const char *eq = strchr (f, '=');
            const char *sp = strchr (f, ' ');
            if (!eq || (sp && sp < eq))
                break;
            const char *vend = sp ? sp : f + strlen (f);
            char key[64], value[512];
            snprintf (key, sizeof (key), "%.*s", (int)(eq - f), f);
            snprintf (value, sizeof (value), "%.*s", (int)(vend - eq - 1), eq + 1);
            pos += (size_t)snprintf (line + pos, cap - pos, ",\"");
            pos = s_json_append (line, pos, cap, key);
            pos += (size_t)snprintf (line + pos, cap - pos, "\":\"");
            pos = s_json_append (line, pos, cap, value);
            if (pos < cap)
                line[pos++] = '"';
            f = vend;
        }
        if (pos < cap)
            line[pos++] = '}';
    }
    else {
        pos =
            (size_t)snprintf (line, cap, "%s %-5s %s[%d]: %s%s%s", stamp, s_names[level],
                s_process, (int)getpid (), msg, fields ? " " : "", fields ? fields : "");
    }
    if (pos > cap)
        pos = cap;
    line[pos++] = '\n';
    ssize_t rc = write (STDERR_FILENO, line, pos);
    (void)rc;
}

void
gw_log_test (bool verbose)
{
    printf (" * gw_log: ");
    //  Capture stderr through a pipe and check both formats.
    int fds[2];
    assert (pipe (fds) == 0);
    int saved = dup (STDERR_FILENO);
    dup2 (fds[1], STDERR_FILENO);
    gw_log_init ("logtest");
    gw_log_configure (GW_LOG_INFO, "json");
    gw_debug ("hidden %d", 1);
    gw_log (GW_LOG_WARN, "service=auth worker=w1", "worker \"%s\" expired", "x\ny");
    gw_log_configure (GW_LOG_DEBUG, "text");
    gw_debug ("visible %d", 2);
    dup2 (saved, STDERR_FILENO);
    close (saved);
    close (fds[1]);
    char buf[4096] = {0};
    ssize_t n = read (fds[0], buf, sizeof (buf) - 1);
    close (fds[0]);
    assert (n > 0);
    if (verbose)
        printf ("\n%s", buf);
    assert (!strstr (buf, "hidden"));
    char *first = buf, *second = strchr (buf, '\n');
    assert (second);
    *second++ = 0;
    assert (strstr (first, "\"level\":\"warn\""));
    assert (strstr (first, "\"proc\":\"logtest\""));
    assert (strstr (first, "\"msg\":\"worker \\\"x\\ny\\\" expired\""));
    assert (strstr (first, "\"service\":\"auth\",\"worker\":\"w1\"}"));
    assert (strstr (second, "DEBUG logtest["));
    assert (strstr (second, "visible 2"));
    gw_log_configure (GW_LOG_INFO, "text");
    printf ("OK\n");
}
