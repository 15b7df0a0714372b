//  --------------------------------------------------------------------------
//  aigw-ratelimit — the ratelimit stage process: reads its configuration
//  from the environment, starts gw_ratelimit_actor and registers it on the
//  bus as "ratelimit". SIGHUP reloads the limits and prices files;
//  SIGINT/SIGTERM stop the process. Bad configuration at start is a clear
//  error and exit status 1; a Redis that is down at start is an outage
//  (fail mode applies), not an error.
//
//  Environment (docs/LIMITS.md): AIGW_BUS, REDIS_URL | REDIS_ADDR +
//  REDIS_PASSWORD + REDIS_DB, AIGW_RATELIMIT_FAIL, AIGW_REDIS_TIMEOUT_MS,
//  AIGW_RATELIMIT_PREFIX, RATE_LIMIT_REQUESTS_PER_MINUTE, RATE_LIMIT_BURST,
//  AIGW_TPM, AIGW_MAX_CONCURRENT, AIGW_DEFAULT_MAX_TOKENS,
//  AIGW_PRICE_MULTIPLIER, AIGW_LIMITS_FILE, AIGW_PRICES_FILE,
//  AIGW_RATELIMIT_CAPACITY, AIGW_GROUP_MULTIPLIERS, AIGW_GROUPS_REFRESH_MS,
//  AIGW_ENFORCE_BALANCE, DATABASE_URL, AIGW_BALANCE_REFRESH_MS,
//  AIGW_HEARTBEAT_MS, AIGW_EXPIRY_MS, LOG_LEVEL, LOG_FORMAT.

#include "aigw.h"
#include "gw_ratelimit.h"
#include <signal.h>

static void
s_usage (void)
{
    printf ("usage: aigw-ratelimit [--bus ENDPOINT]\n"
            "  counters in memory, or in Redis with REDIS_URL (or REDIS_ADDR);\n"
            "  limits from RATE_LIMIT_REQUESTS_PER_MINUTE, RATE_LIMIT_BURST, AIGW_TPM,\n"
            "  AIGW_MAX_CONCURRENT and AIGW_LIMITS_FILE; prices from AIGW_PRICES_FILE.\n"
            "  SIGHUP reloads the files. See docs/LIMITS.md.\n");
}

int
main (int argc, char *argv[])
{
    gw_log_init ("ratelimit");
    const char *bus = gw_env ("AIGW_BUS", "tcp://127.0.0.1:5555");
    for (int argn = 1; argn < argc; argn++) {
        if (streq (argv[argn], "--bus") && argn + 1 < argc)
            bus = argv[++argn];
        else {
            s_usage ();
            return streq (argv[argn], "--help") ? 0 : 2;
        }
    }
    sigset_t hup;
    sigemptyset (&hup);
    sigaddset (&hup, SIGHUP);
    pthread_sigmask (SIG_BLOCK, &hup, NULL);
    zsys_init ();

    gw_limiter_t *limiter = gw_limiter_new_env ();
    if (!limiter) {
        fprintf (
            stderr, "aigw-ratelimit: invalid limiter settings (see the log above)\n");
        return 1;
    }
    bool redis = streq (gw_limiter_backend (limiter), "redis");
    bool fail_open = gw_limiter_fail_open (limiter);
    gw_ratelimit_t *stage = gw_ratelimit_new (&limiter);
    char error[512];
    if (gw_ratelimit_configure_env (stage, error, sizeof (error))) {
        fprintf (stderr, "aigw-ratelimit: %s\n", error);
        gw_ratelimit_destroy (&stage);
        return 1;
    }
    if (redis)
        gw_info ("ratelimit: counters in Redis, failing %s if it is unavailable",
            fail_open ? "open" : "closed");
    else
        gw_info ("ratelimit: counters in memory (embedded; set REDIS_URL to share them "
                 "between replicas)");

    if (gw_env ("AIGW_PRICES_FILE", NULL) &&
        !streq (gw_env ("AIGW_GROUP_MULTIPLIERS", "1"), "0"))
        gw_info ("ratelimit: pricing holds with the group multipliers of %s (re-read "
                 "every %s ms)",
            gw_env ("DATABASE_URL", "var/aigw.db"),
            gw_env ("AIGW_GROUPS_REFRESH_MS", "5000"));
    if (streq (gw_env ("AIGW_ENFORCE_BALANCE", "0"), "1"))
        gw_info ("ratelimit: enforcing user balances from %s every %s ms",
            gw_env ("DATABASE_URL", "var/aigw.db"),
            gw_env ("AIGW_BALANCE_REFRESH_MS", "1000"));
    zactor_t *actor = zactor_new (gw_ratelimit_actor, stage);  //  takes stage
    assert (actor);
    char capacity[16];
    snprintf (capacity, sizeof (capacity), "%" PRId64,
        gw_env_int ("AIGW_RATELIMIT_CAPACITY", 1024, 1, 65535));
    zstr_sendx (actor, "CONFIGURE", "capacity", capacity, NULL);
    zsock_wait (actor);
    int64_t heartbeat = gw_env_int ("AIGW_HEARTBEAT_MS", 0, 10, 60000);
    int64_t expiry = gw_env_int ("AIGW_EXPIRY_MS", 0, 20, 600000);
    if (heartbeat && expiry) {
        char text[16];
        snprintf (text, sizeof (text), "%" PRId64, heartbeat);
        zstr_sendx (actor, "CONFIGURE", "heartbeat", text, NULL);
        zsock_wait (actor);
        snprintf (text, sizeof (text), "%" PRId64, expiry);
        zstr_sendx (actor, "CONFIGURE", "expiry", text, NULL);
        zsock_wait (actor);
    }
    if (gw_log_enabled (GW_LOG_DEBUG))
        zstr_send (actor, "VERBOSE");  //  every decision at debug level
    zstr_sendx (actor, "CONNECT", bus, NULL);
    if (zsock_wait (actor) != 0) {
        fprintf (stderr, "aigw-ratelimit: cannot connect to the bus at %s\n", bus);
        zactor_destroy (&actor);
        return 1;
    }
    gw_info ("ratelimit: serving on %s", bus);
    struct timespec tick = {0, 200 * 1000 * 1000};
    while (!zsys_interrupted) {
        if (sigtimedwait (&hup, NULL, &tick) == SIGHUP) {
            gw_info ("ratelimit: SIGHUP, reloading limits and prices");
            zstr_send (actor, "RELOAD");
            zsock_wait (actor);
        }
    }
    gw_info ("ratelimit: stopping");
    zactor_destroy (&actor);
    return 0;
}
