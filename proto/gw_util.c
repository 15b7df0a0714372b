//  --------------------------------------------------------------------------
//  gw_util — clocks, request ids and rid-keyed maps, error texts,
//  environment lookups.
//
//  Request ids come from getrandom(2) through a small per-thread pool so the
//  hot path makes one syscall per 256 ids, not per id.

#include "aigw.h"
#include <sys/random.h>
#include <time.h>
#include <signal.h>

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

size_t
gw_rid_hash (const void *rid)
{
    uint64_t a, b;
    memcpy (&a, rid, 8);
    memcpy (&b, (const uint8_t *)rid + 8, 8);
    uint64_t h = (a ^ (b * 0x9E3779B97F4A7C15ULL)) * 0xBF58476D1CE4E5B9ULL;
    return (size_t)(h ^ (h >> 31));
}

int
gw_rid_compare (const void *a, const void *b)
{
    return memcmp (a, b, 16);
}

zhashx_t *
gw_rid_map_new (zhashx_destructor_fn destructor)
{
    zhashx_t *map = zhashx_new ();
    assert (map);
    zhashx_set_key_hasher (map, gw_rid_hash);
    zhashx_set_key_comparator (map, gw_rid_compare);
    zhashx_set_key_duplicator (map, NULL);
    zhashx_set_key_destructor (map, NULL);
    zhashx_set_destructor (map, destructor);
    return map;
}

int
gw_fail (char *error, size_t error_size, const char *format, ...)
{
    if (error && error_size) {
        va_list args;
        va_start (args, format);
        vsnprintf (error, error_size, format, args);
        va_end (args);
    }
    return -1;
}

const char *
gw_clip (const char *text, char *out, size_t out_size)
{
    size_t size = strlen (text);
    if (size >= out_size) {
        size = out_size - 4;
        while (size > 0 && ((unsigned char)text[size] & 0xC0) == 0x80)
            size--;
        memcpy (out, text, size);
        strcpy (out + size, "...");
    }
    else
        memcpy (out, text, size + 1);
    return out;
}

char *
gw_strndup (const char *data, size_t size)
{
    char *copy = (char *)malloc (size + 1);
    assert (copy);
    memcpy (copy, data, size);
    copy[size] = 0;
    return copy;
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

static void
s_test_free (void **item_p)
{
    free (*item_p);
    *item_p = NULL;
}

int
gw_actor_configure (zactor_t *actor, const char *key, const char *value)
{
    zstr_sendx (actor, "CONFIGURE", key, value, NULL);
    if (zsock_wait (actor) == 0)
        return 0;
    gw_error ("configuration %s=%s rejected", key, value);
    return -1;
}

int
gw_actor_configure_int (zactor_t *actor, const char *key, int64_t value)
{
    char text[24];
    snprintf (text, sizeof (text), "%" PRId64, value);
    return gw_actor_configure (actor, key, text);
}

int
gw_actor_configure_session (zactor_t *actor)
{
    int64_t heartbeat = gw_env_int ("AIGW_HEARTBEAT_MS", 0, 10, 60000);
    int64_t expiry = gw_env_int ("AIGW_EXPIRY_MS", 0, 20, 600000);
    if (!heartbeat || !expiry)
        return 0;
    return gw_actor_configure_int (actor, "heartbeat", heartbeat) |
        gw_actor_configure_int (actor, "expiry", expiry);
}

zactor_t *
gw_actor_connect (zactor_t *actor, const char *bus, const char *stage)
{
    zstr_sendx (actor, "CONNECT", bus, NULL);
    if (zsock_wait (actor) != 0) {
        gw_error ("%s: cannot connect to the bus at %s", stage, bus);
        zactor_destroy (&actor);
        return NULL;
    }
    gw_info ("%s: serving on %s", stage, bus);
    return actor;
}

void
gw_thread_name (const char *name)
{
    char text[16];
    snprintf (text, sizeof (text), "%s", name);
    pthread_setname_np (pthread_self (), text);
}

static sigset_t
s_signal_set (void)
{
    sigset_t set;
    sigemptyset (&set);
    sigaddset (&set, SIGINT);
    sigaddset (&set, SIGTERM);
    sigaddset (&set, SIGHUP);
    return set;
}

void
gw_signals_block (void)
{
    sigset_t set = s_signal_set ();
    pthread_sigmask (SIG_BLOCK, &set, NULL);
    zsys_handler_set (NULL);
    signal (SIGPIPE, SIG_IGN);
}

int
gw_signals_wait (zactor_t **actors, size_t count)
{
    sigset_t set = s_signal_set ();
    while (true) {
        int signum = 0;
        if (sigwait (&set, &signum))
            continue;
        if (signum != SIGHUP)
            return signum;
        gw_info ("SIGHUP: reloading");
        for (size_t i = 0; i < count; i++)
            if (actors[i]) {
                zstr_send (actors[i], "RELOAD");
                zsock_wait (actors[i]);
            }
    }
}

//  A test actor: CONFIGURE answers 0 for key "size" with a value up to 9
//  digits, 1 otherwise; RELOAD counts and answers 0; STATE reports the last
//  value and the reloads.
static void
s_test_actor (zsock_t *pipe, void *args)
{
    char last[32] = "";
    int reloads = 0;
    zsock_signal (pipe, 0);
    while (true) {
        char *command = NULL, *key = NULL, *value = NULL;
        if (zstr_recvx (pipe, &command, &key, &value, NULL) < 1)
            break;
        bool stop = streq (command, "$TERM");
        if (streq (command, "CONFIGURE")) {
            bool ok = key && value && streq (key, "size") && strlen (value) <= 9;
            if (ok)
                snprintf (last, sizeof (last), "%s", value);
            zsock_signal (pipe, ok ? 0 : 1);
        }
        else if (streq (command, "RELOAD")) {
            reloads++;
            zsock_signal (pipe, 0);
        }
        else if (streq (command, "STATE"))
            zstr_sendf (pipe, "%s/%d", last, reloads);
        zstr_free (&command);
        zstr_free (&key);
        zstr_free (&value);
        if (stop)
            break;
    }
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
    //  rid maps: keys point into items, which the destructor frees
    zhashx_t *map = gw_rid_map_new (NULL);
    assert (gw_rid_compare (a, b) != 0 && gw_rid_compare (a, a) == 0);
    memcpy (c, a, 16);
    assert (gw_rid_hash (a) == gw_rid_hash (c));
    assert (zhashx_insert (map, a, a) == 0);
    assert (zhashx_insert (map, c, c) == -1);  //  same rid, other buffer
    assert (zhashx_lookup (map, c) == a);
    assert (zhashx_lookup (map, b) == NULL);
    zhashx_destroy (&map);
    uint8_t *item = (uint8_t *)malloc (16);
    assert (item);
    memcpy (item, b, 16);
    map = gw_rid_map_new (s_test_free);
    zhashx_insert (map, item, item);
    assert (zhashx_size (map) == 1);
    zhashx_destroy (&map);  //  frees item (ASan checks)
    //  gw_fail, gw_clip
    char error[8];
    assert (gw_fail (error, sizeof (error), "bad %d", 12345678) == -1);
    assert (streq (error, "bad 123"));
    assert (gw_fail (NULL, 0, "x") == -1);
    char clip[8];
    assert (streq (gw_clip ("short", clip, sizeof (clip)), "short"));
    assert (streq (gw_clip ("12345678", clip, sizeof (clip)), "1234..."));
    assert (streq (gw_clip ("123\xc3\xa9"
                            "567",
                       clip, sizeof (clip)),
        "123..."));
    char *copy = gw_strndup ("ab\0cd", 4);
    assert (copy[0] == 'a' && copy[2] == 0 && copy[3] == 'c' && copy[4] == 0);
    free (copy);
    int64_t t0 = gw_time_ms ();
    assert (t0 > 1600000000000LL);
    assert (gw_time_us () / 1000 >= t0);
    setenv ("GW_UTIL_TEST", "42", 1);
    assert (gw_env_int ("GW_UTIL_TEST", 7, 0, 100) == 42);
    assert (gw_env_int ("GW_UTIL_TEST", 7, 0, 10) == 7);
    setenv ("GW_UTIL_TEST", "4x", 1);
    assert (gw_env_int ("GW_UTIL_TEST", 7, 0, 100) == 7);
    assert (streq (gw_env ("GW_UTIL_TEST_UNSET", "dflt"), "dflt"));

    //  gw_actor_configure: the actor's answer decides.
    zactor_t *actor = zactor_new (s_test_actor, NULL);
    assert (actor);
    assert (gw_actor_configure (actor, "size", "12") == 0);
    assert (gw_actor_configure (actor, "colour", "red") == -1);
    assert (gw_actor_configure_int (actor, "size", 1234567890123LL) == -1);
    assert (gw_actor_configure_int (actor, "size", -42) == 0);

    //  gw_signals_wait: SIGHUP sends RELOAD to every actor given (NULL
    //  skipped) and goes on waiting; SIGTERM ends the wait. Thread-directed
    //  signals, so none can reach a thread started before the block.
    gw_signals_block ();
    pthread_kill (pthread_self (), SIGHUP);
    pthread_kill (pthread_self (), SIGTERM);
    zactor_t *actors[] = {actor, NULL};
    assert (gw_signals_wait (actors, 2) == SIGTERM);
    zstr_send (actor, "STATE");
    char *state = zstr_recv (actor);
    assert (state && streq (state, "-42/1"));
    zstr_free (&state);
    zactor_destroy (&actor);
    printf ("OK\n");
}
