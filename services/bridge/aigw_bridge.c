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
    gw_signals_block ();
    zsys_init ();

    zactor_t *bridge = gw_bridge_launch (bus, verbose);
    int status = bridge ? 0 : 1;
    if (bridge) {
        int signal = gw_signals_wait (NULL, 0);
        gw_info ("bridge: signal %d, stopping", signal);
    }
    zactor_destroy (&bridge);
    curl_global_cleanup ();
    return status;
}
