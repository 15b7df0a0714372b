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
    gw_signals_block ();
    zsys_init ();

    zactor_t *actor = gw_ratelimit_launch (bus);
    if (!actor)
        return 1;
    gw_signals_wait (&actor, 1);  //  SIGHUP reloads limits and prices
    gw_info ("ratelimit: stopping");
    zactor_destroy (&actor);
    return 0;
}
