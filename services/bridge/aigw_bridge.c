//  --------------------------------------------------------------------------
//  aigw-bridge — the model bridge stage as its own process: reads its
//  configuration from the environment, starts the gw_bridge actor and waits
//  for SIGINT / SIGTERM.
//
//  Environment:
//    AIGW_BUS                   broker endpoint (tcp://127.0.0.1:5555)
//    AIGW_BRIDGE_CAPACITY       requests taken at once (1024)
//    AIGW_BRIDGE_MAXCONNECTS    idle upstream connections kept (256)
//    AIGW_BRIDGE_CONNECT_TIMEOUT_MS  upper bound of a connect (5000)
//    AIGW_BREAKER_FAILURES      failures in a row that open a breaker (3)
//    AIGW_BREAKER_COOLDOWN_MS   how long it stays open (30000)
//    AIGW_HEARTBEAT_MS, AIGW_EXPIRY_MS  bus session timers (1000, 3000)
//    AIGW_BILLING               1: send usage events to billing (default); 0: none
//    AIGW_SPOOL_DIR             usage event spool folder (var/spool)
//    AIGW_SPOOL_MAX             events spooled at most; beyond, 503 (100000)
//    AIGW_SPOOL_FSYNC           1: fsync every spool write (0)
//    AIGW_DISCONNECT            cancel (default) or drain, on client disconnect
//    LOG_LEVEL, LOG_FORMAT      see gw_log

#include "aigw.h"
#include <curl/curl.h>
#include "gw_bridge.h"

static int
s_configure (zactor_t *bridge, const char *key, int64_t value)
{
    char text[32];
    snprintf (text, sizeof (text), "%" PRId64, value);
    zstr_sendx (bridge, "CONFIGURE", key, text, NULL);
    if (zsock_wait (bridge) != 0) {
        gw_error ("bridge: invalid %s=%s", key, text);
        return -1;
    }
    return 0;
}

int
main (int argc, char *argv[])
{
    gw_log_init ("bridge");
    if (curl_global_init (CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        gw_error ("bridge: curl_global_init failed");
        return 1;
    }
    const char *bus = gw_env ("AIGW_BUS", "tcp://127.0.0.1:5555");
    bool verbose = false;
    for (int argn = 1; argn < argc; argn++) {
        if (streq (argv[argn], "--bus") && argn + 1 < argc)
            bus = argv[++argn];
        else if (streq (argv[argn], "-v") || streq (argv[argn], "--verbose"))
            verbose = true;
        else {
            fprintf (stderr,
                "usage: aigw-bridge [--bus endpoint] [-v]\n"
                "configuration: see the environment variables in the source\n");
            return 2;
        }
    }
    //  Block SIGINT/SIGTERM in every thread (threads created from here on,
    //  libzmq's and curl's included, inherit the mask) and take them with
    //  sigwait below: a clean stop whatever thread the signal hits.
    sigset_t signals;
    sigemptyset (&signals);
    sigaddset (&signals, SIGINT);
    sigaddset (&signals, SIGTERM);
    pthread_sigmask (SIG_BLOCK, &signals, NULL);
    zsys_handler_set (NULL);
    zsys_init ();

    zactor_t *bridge = zactor_new (gw_bridge_actor, NULL);
    assert (bridge);
    if (verbose)
        zstr_send (bridge, "VERBOSE");
    int rc = 0;
    rc |= s_configure (
        bridge, "capacity", gw_env_int ("AIGW_BRIDGE_CAPACITY", 1024, 1, 65535));
    rc |= s_configure (
        bridge, "maxconnects", gw_env_int ("AIGW_BRIDGE_MAXCONNECTS", 256, 1, 100000));
    rc |= s_configure (bridge, "connect_timeout_ms",
        gw_env_int ("AIGW_BRIDGE_CONNECT_TIMEOUT_MS", 5000, 1, 600000));
    rc |= s_configure (
        bridge, "breaker_failures", gw_env_int ("AIGW_BREAKER_FAILURES", 3, 1, 1000000));
    rc |= s_configure (bridge, "breaker_cooldown_ms",
        gw_env_int ("AIGW_BREAKER_COOLDOWN_MS", 30000, 1, 86400000));
    int64_t heartbeat = gw_env_int ("AIGW_HEARTBEAT_MS", 0, 10, 60000);
    int64_t expiry = gw_env_int ("AIGW_EXPIRY_MS", 0, 20, 600000);
    if (heartbeat && expiry) {
        rc |= s_configure (bridge, "heartbeat", heartbeat);
        rc |= s_configure (bridge, "expiry", expiry);
    }
    rc |= s_configure (bridge, "billing", gw_env_int ("AIGW_BILLING", 1, 0, 1));
    rc |= s_configure (
        bridge, "spool_max", gw_env_int ("AIGW_SPOOL_MAX", 100000, 1, 10000000));
    rc |= s_configure (bridge, "spool_fsync", gw_env_int ("AIGW_SPOOL_FSYNC", 0, 0, 1));
    const char *names[] = {"spool_dir", "disconnect"};
    const char *values[] = {
        gw_env ("AIGW_SPOOL_DIR", "var/spool"), gw_env ("AIGW_DISCONNECT", "cancel")};
    for (int i = 0; i < 2; i++) {
        zstr_sendx (bridge, "CONFIGURE", names[i], values[i], NULL);
        if (zsock_wait (bridge) != 0) {
            gw_error ("bridge: invalid %s=%s", names[i], values[i]);
            rc = -1;
        }
    }
    if (rc == 0) {
        zstr_sendx (bridge, "CONNECT", bus, NULL);
        rc = zsock_wait (bridge) == 0 ? 0 : -1;
        if (rc)
            gw_error ("bridge: cannot connect to %s", bus);
    }
    if (rc == 0) {
        gw_info ("bridge: serving \"bridge\" on %s", bus);
        int signal = 0;
        sigwait (&signals, &signal);
        gw_info ("bridge: signal %d, stopping", signal);
    }
    zactor_destroy (&bridge);
    curl_global_cleanup ();
    return rc ? 1 : 0;
}
