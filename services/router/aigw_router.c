//  --------------------------------------------------------------------------
//  aigw-router — the router stage process: loads the channel table
//  (AIGW_CHANNELS_FILE and/or TARGET_API_URL), starts gw_router_actor and
//  registers it on the bus. A bad channel file is a clear error naming the
//  field and exit status 1. SIGINT/SIGTERM stop the process.
//
//  Environment: AIGW_BUS, AIGW_CHANNELS_FILE, TARGET_API_URL, TARGET_API_KEY,
//  AIGW_TARGET_MODELS, AIGW_MODELS_REFRESH_S, AIGW_LOCAL_MODELS,
//  AIGW_LOCAL_ADMIN_GROUPS,
//  AIGW_ROUTER_CAPACITY, LOG_LEVEL, LOG_FORMAT (docs/ROUTING.md).

#include "aigw.h"
#include "gw_router.h"
#include "gw_channels.h"
#include <curl/curl.h>

static void
s_usage (void)
{
    printf ("usage: aigw-router [--bus ENDPOINT]\n"
            "  channels: AIGW_CHANNELS_FILE (JSON, docs/ROUTING.md) and/or\n"
            "  TARGET_API_URL, TARGET_API_KEY, AIGW_TARGET_MODELS (default channel).\n");
}

int
main (int argc, char *argv[])
{
    gw_log_init ("router");
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
    curl_global_init (CURL_GLOBAL_DEFAULT);  //  before any thread
    zsys_init ();

    zactor_t *actor = gw_router_launch (bus);
    if (!actor) {
        curl_global_cleanup ();
        return 1;
    }
    gw_signals_wait (NULL, 0);
    gw_info ("router: stopping");
    zactor_destroy (&actor);
    curl_global_cleanup ();
    return 0;
}
