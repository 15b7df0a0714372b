//  --------------------------------------------------------------------------
//  aigw-auth — the auth stage process: reads its configuration from the
//  environment (gw_auth_launch), registers it on the bus. SIGHUP reloads
//  the keys file; SIGINT/SIGTERM stop the process. A bad keys file at start
//  is a clear error and exit status 1.
//
//  Environment: AIGW_BUS, GATEWAY_API_KEYS, AIGW_KEYS_FILE, AIGW_AUTH_OPEN,
//  AIGW_AUTH_STORE, DATABASE_URL, AIGW_AUTH_CACHE_MS, AIGW_AUTH_CAPACITY,
//  LOG_LEVEL, LOG_FORMAT (docs/ROUTING.md, "Auth"). An unreachable SQL
//  store at start is logged, not fatal: it is retried on use.

#include "aigw.h"
#include "gw_auth.h"

static void
s_usage (void)
{
    printf (
        "usage: aigw-auth [--bus ENDPOINT]\n"
        "  keys: GATEWAY_API_KEYS (comma-separated) and/or AIGW_KEYS_FILE (JSON),\n"
        "  and the SQL store's api_keys (DATABASE_URL; AIGW_AUTH_STORE=0 turns it off);\n"
        "  AIGW_AUTH_OPEN=1 lets every request in when no keys are configured.\n"
        "  SIGHUP reloads the keys file.\n");
}

int
main (int argc, char *argv[])
{
    gw_log_init ("auth");
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
    zactor_t *actor = gw_auth_launch (bus);
    if (!actor)
        return 1;
    gw_signals_wait (&actor, 1);  //  SIGHUP reloads the keys file
    gw_info ("auth: stopping");
    zactor_destroy (&actor);
    return 0;
}
