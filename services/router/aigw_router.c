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
    curl_global_init (CURL_GLOBAL_DEFAULT);  //  before any thread
    zsys_init ();

    gw_channels_t *channels = gw_channels_new ();
    char error[640];
    const char *file = gw_env ("AIGW_CHANNELS_FILE", NULL);
    if (file && gw_channels_load_file (channels, file, error, sizeof (error))) {
        fprintf (stderr, "aigw-router: AIGW_CHANNELS_FILE %s\n", error);
        gw_channels_destroy (&channels);
        return 1;
    }
    const char *target = gw_env ("TARGET_API_URL", NULL);
    if (target &&
        gw_channels_add_default (channels, target, gw_env ("TARGET_API_KEY", NULL),
            gw_env ("AIGW_TARGET_MODELS", NULL), error, sizeof (error))) {
        fprintf (stderr, "aigw-router: %s\n", error);
        gw_channels_destroy (&channels);
        return 1;
    }
    size_t count = gw_channels_size (channels);
    if (count == 0)
        gw_warn ("router: no channels (set AIGW_CHANNELS_FILE or TARGET_API_URL): every "
                 "model request gets 404");
    for (size_t i = 0; i < count; i++)
        gw_info ("router: channel %s -> %s%s", gw_channels_id (channels, i),
            gw_channels_base_url (channels, i),
            gw_channels_discovers (channels, i) ? " (models discovered)" : "");

    zactor_t *actor = zactor_new (gw_router_actor, channels);  //  takes channels
    assert (actor);
    char value[16];
    snprintf (value, sizeof (value), "%" PRId64,
        gw_env_int ("AIGW_MODELS_REFRESH_S", 300, 1, 86400));
    zstr_sendx (actor, "CONFIGURE", "refresh_s", value, NULL);
    zsock_wait (actor);
    snprintf (value, sizeof (value), "%" PRId64,
        gw_env_int ("AIGW_ROUTER_CAPACITY", 1024, 1, 65535));
    zstr_sendx (actor, "CONFIGURE", "capacity", value, NULL);
    zsock_wait (actor);
    zstr_sendx (actor, "CONFIGURE", "local_models",
        streq (gw_env ("AIGW_LOCAL_MODELS", "0"), "1") ? "1" : "0", NULL);
    zsock_wait (actor);
    zstr_sendx (actor, "CONFIGURE", "local_admin_groups",
        gw_env ("AIGW_LOCAL_ADMIN_GROUPS", ""), NULL);
    zsock_wait (actor);
    zstr_sendx (actor, "CONNECT", bus, NULL);
    if (zsock_wait (actor) != 0) {
        fprintf (stderr, "aigw-router: cannot connect to the bus at %s\n", bus);
        zactor_destroy (&actor);
        return 1;
    }
    gw_info ("router: serving on %s", bus);
    while (!zsys_interrupted)
        zclock_sleep (200);
    gw_info ("router: stopping");
    zactor_destroy (&actor);
    curl_global_cleanup ();
    return 0;
}
