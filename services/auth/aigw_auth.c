//  --------------------------------------------------------------------------
//  aigw-auth — the auth stage process: reads its configuration from the
//  environment, starts gw_auth_actor and registers it on the bus. SIGHUP
//  reloads the keys file; SIGINT/SIGTERM stop the process. A bad keys file
//  at start is a clear error and exit status 1.
//
//  Environment: AIGW_BUS, GATEWAY_API_KEYS, AIGW_KEYS_FILE, AIGW_AUTH_OPEN,
//  AIGW_AUTH_STORE, DATABASE_URL, AIGW_AUTH_CACHE_MS, AIGW_AUTH_CAPACITY,
//  LOG_LEVEL, LOG_FORMAT (docs/ROUTING.md, "Auth"). An unreachable SQL
//  store at start is logged, not fatal: it is retried on use.

#include "aigw.h"
#include "gw_auth.h"
#include <signal.h>

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
    //  Block SIGHUP in every thread; the main loop takes it with
    //  sigtimedwait. SIGINT/SIGTERM go to czmq's handler (zsys_interrupted).
    sigset_t hup;
    sigemptyset (&hup);
    sigaddset (&hup, SIGHUP);
    pthread_sigmask (SIG_BLOCK, &hup, NULL);
    zsys_init ();

    gw_auth_t *auth = gw_auth_new ();
    int listed = gw_auth_add_keys (auth, gw_env ("GATEWAY_API_KEYS", NULL));
    const char *file = gw_env ("AIGW_KEYS_FILE", NULL);
    char error[512];
    if (file && gw_auth_set_keys_file (auth, file, error, sizeof (error))) {
        fprintf (stderr, "aigw-auth: AIGW_KEYS_FILE %s\n", error);
        gw_auth_destroy (&auth);
        return 1;
    }
    bool open = streq (gw_env ("AIGW_AUTH_OPEN", "0"), "1");
    const char *use_store = gw_env ("AIGW_AUTH_STORE", "1");
    if (!streq (use_store, "0") && !streq (use_store, "1")) {
        fprintf (stderr, "aigw-auth: AIGW_AUTH_STORE must be 0 or 1\n");
        gw_auth_destroy (&auth);
        return 1;
    }
    if (streq (use_store, "1")) {
        const char *url = gw_env ("DATABASE_URL", NULL);
        int cache_ms = (int)gw_env_int ("AIGW_AUTH_CACHE_MS", 1000, 0, 60000);
        if (gw_auth_set_store (auth, url, cache_ms) == 0)
            gw_info ("auth: also accepting keys from the SQL store (%s), cached %d ms",
                url ? "DATABASE_URL" : "var/aigw.db", cache_ms);
    }
    if (!listed && !file) {
        if (open)
            gw_warn ("auth: OPEN MODE: no keys configured and AIGW_AUTH_OPEN=1, every "
                     "request passes as user anonymous%s",
                streq (use_store, "1") ? " while the SQL store has no keys" : "");
        else
            gw_warn ("auth: no keys in GATEWAY_API_KEYS or AIGW_KEYS_FILE: only keys in "
                     "the SQL store are accepted, if enabled; set AIGW_AUTH_OPEN=1 for "
                     "an open demo gateway");
    }
    else if (open)
        gw_warn ("auth: AIGW_AUTH_OPEN ignored: keys are configured");
    gw_auth_set_open (auth, open);
    gw_info ("auth: %zu key(s) loaded (%d from GATEWAY_API_KEYS)", gw_auth_size (auth),
        listed);

    zactor_t *actor = zactor_new (gw_auth_actor, auth);  //  takes auth
    assert (actor);
    char capacity[16];
    snprintf (capacity, sizeof (capacity), "%" PRId64,
        gw_env_int ("AIGW_AUTH_CAPACITY", 1024, 1, 65535));
    zstr_sendx (actor, "CONFIGURE", "capacity", capacity, NULL);
    zsock_wait (actor);
    zstr_sendx (actor, "CONNECT", bus, NULL);
    if (zsock_wait (actor) != 0) {
        fprintf (stderr, "aigw-auth: cannot connect to the bus at %s\n", bus);
        zactor_destroy (&actor);
        return 1;
    }
    gw_info ("auth: serving on %s", bus);
    struct timespec tick = {0, 200 * 1000 * 1000};
    while (!zsys_interrupted) {
        if (sigtimedwait (&hup, NULL, &tick) == SIGHUP) {
            gw_info ("auth: SIGHUP, reloading keys");
            zstr_send (actor, "RELOAD");
            zsock_wait (actor);
        }
    }
    gw_info ("auth: stopping");
    zactor_destroy (&actor);
    return 0;
}
