//  --------------------------------------------------------------------------
//  gw_util — clocks, request ids, environment lookups.
//
//  Request ids come from getrandom(2) through a small per-thread pool so the
//  hot path makes one syscall per 256 ids, not per id.

#include "aigw.h"
#include <sys/random.h>
#include <time.h>

int64_t
gw_time_ms (void)
{
    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t
gw_time_us (void)
{
    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t
gw_mono_ms (void)
{
    struct timespec ts;
    clock_gettime (CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

#define RID_POOL 256
static __thread uint8_t s_pool[RID_POOL * 16];
static __thread size_t s_pool_left;

void
gw_rid_new (uint8_t rid[16])
{
    if (s_pool_left == 0) {
        size_t got = 0;
        while (got < sizeof (s_pool)) {
            ssize_t rc = getrandom (s_pool + got, sizeof (s_pool) - got, 0);
            if (rc > 0)
                got += (size_t)rc;
        }
        s_pool_left = RID_POOL;
    }
    s_pool_left--;
    memcpy (rid, s_pool + s_pool_left * 16, 16);
    rid[6] = (rid[6] & 0x0F) | 0x40;  //  version 4
    rid[8] = (rid[8] & 0x3F) | 0x80;  //  variant 10
}

void
gw_rid_hex (const uint8_t rid[16], char out[33])
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[i * 2] = hex[rid[i] >> 4];
        out[i * 2 + 1] = hex[rid[i] & 15];
    }
    out[32] = 0;
}

static int
s_hexval (char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int
gw_rid_parse (const char *text, uint8_t rid[16])
{
    if (!text)
        return -1;
    size_t len = strlen (text);
    bool dashed = len == 36;
    if (len != 32 && !dashed)
        return -1;
    int nibbles = 0;
    for (size_t i = 0; i < len; i++) {
        if (dashed && (i == 8 || i == 13 || i == 18 || i == 23)) {
            if (text[i] != '-')
                return -1;
            continue;
        }
        int v = s_hexval (text[i]);
        if (v < 0)
            return -1;
        if (nibbles % 2 == 0)
            rid[nibbles / 2] = (uint8_t)(v << 4);
        else
            rid[nibbles / 2] |= (uint8_t)v;
        nibbles++;
    }
    return nibbles == 32 ? 0 : -1;
}

const char *
gw_env (const char *name, const char *fallback)
{
    const char *value = getenv (name);
    return value && *value ? value : fallback;
}

int64_t
gw_env_int (const char *name, int64_t fallback, int64_t min, int64_t max)
{
    const char *value = getenv (name);
    if (!value || !*value)
        return fallback;
    char *end = NULL;
    errno = 0;
    long long n = strtoll (value, &end, 10);
    if (errno || *end || n < min || n > max)
        return fallback;
    return n;
}

char *
gw_testdata_path (const char *relative)
{
    const char *base = gw_env ("AIGW_TESTDATA", "../shared/testdata");
    return zsys_sprintf ("%s/%s", base, relative);
}

void
gw_util_test (bool verbose)
{
    printf (" * gw_util: ");
    uint8_t a[16], b[16], c[16];
    gw_rid_new (a);
    gw_rid_new (b);
    assert (memcmp (a, b, 16) != 0);
    assert ((a[6] >> 4) == 4);
    char hex[33];
    gw_rid_hex (a, hex);
    assert (strlen (hex) == 32);
    assert (gw_rid_parse (hex, c) == 0 && memcmp (a, c, 16) == 0);
    assert (gw_rid_parse ("123e4567-e89b-12d3-a456-426614174000", c) == 0);
    assert (c[0] == 0x12 && c[15] == 0x00);
    assert (gw_rid_parse ("123e4567-e89b-12d3-a456-42661417400", c) == -1);
    assert (gw_rid_parse ("zz3e4567e89b12d3a456426614174000", c) == -1);
    assert (gw_rid_parse ("", c) == -1);
    assert (gw_rid_parse (NULL, c) == -1);
    int64_t t0 = gw_time_ms ();
    assert (t0 > 1600000000000LL);
    assert (gw_time_us () / 1000 >= t0);
    setenv ("GW_UTIL_TEST", "42", 1);
    assert (gw_env_int ("GW_UTIL_TEST", 7, 0, 100) == 42);
    assert (gw_env_int ("GW_UTIL_TEST", 7, 0, 10) == 7);
    setenv ("GW_UTIL_TEST", "4x", 1);
    assert (gw_env_int ("GW_UTIL_TEST", 7, 0, 100) == 7);
    assert (streq (gw_env ("GW_UTIL_TEST_UNSET", "dflt"), "dflt"));
    printf ("OK\n");
}
