//  --------------------------------------------------------------------------
//  aigw-broker — the GWP/1 broker process: reads flags and environment,
//  starts gw_broker_actor, binds the bus and the tap, and runs until SIGINT
//  or SIGTERM.
//
//  Flags override the environment (AIGW_BUS, AIGW_TAP); see --help.
//  Exit status: 0 after a signal, 1 if a bind or a setting failed, 2 on
//  bad usage.

#include "aigw.h"
#include "gw_broker.h"

static void
s_usage (FILE *out)
{
    fprintf (out,
        "usage: aigw-broker [options]\n"
        "  --bus ENDPOINT      bus (ROUTER) endpoint; env AIGW_BUS, default "
        "tcp://127.0.0.1:5555\n"
        "  --tap ENDPOINT      tap (XPUB) endpoint; env AIGW_TAP, default "
        "tcp://127.0.0.1:5556\n"
        "  --queue-max N       wait queue bound per service (default 1024)\n"
        "  --heartbeat-ms MS   PING peers idle this long (default 1000)\n"
        "  --expiry-ms MS      drop peers silent this long (default 3000)\n"
        "  --grace-ms MS       how long a request waits for a service with no worker "
        "(default 3000)\n"
        "  --body-max BYTES    largest body accepted (default 33554432)\n"
        "  -v, --verbose       debug logging\n"
        "  -h, --help          this text\n"
        "Logging: LOG_LEVEL (debug, info, warn, error), LOG_FORMAT (text, json).\n");
}

//  Send one CONFIGURE; returns 0 if the actor accepted it.
static int
s_configure (zactor_t *broker, const char *key, const char *value)
{
    if (!value)
        return 0;
    zstr_sendx (broker, "CONFIGURE", key, value, NULL);
    if (zsock_wait (broker) != 0) {
        gw_error ("bad value for %s: %s", key, value);
        return -1;
    }
    return 0;
}

int
main (int argc, char *argv[])
{
    const char *bus = gw_env ("AIGW_BUS", "tcp://127.0.0.1:5555");
    const char *tap = gw_env ("AIGW_TAP", "tcp://127.0.0.1:5556");
    const char *settings[5][2] = {{"queue_max", NULL}, {"heartbeat", NULL},
        {"expiry", NULL}, {"grace", NULL}, {"body_max", NULL}};
    bool verbose = false;
    for (int argn = 1; argn < argc; argn++) {
        const char *arg = argv[argn];
        const char *value = argn + 1 < argc ? argv[argn + 1] : NULL;
        int setting = -1;
        if (streq (arg, "-h") || streq (arg, "--help")) {
            s_usage (stdout);
            return 0;
        }
        else if (streq (arg, "-v") || streq (arg, "--verbose")) {
            verbose = true;
            continue;
        }
        else if (streq (arg, "--bus") && value)
            bus = value;
        else if (streq (arg, "--tap") && value)
            tap = value;
        else if (streq (arg, "--queue-max"))
            setting = 0;
        else if (streq (arg, "--heartbeat-ms"))
            setting = 1;
        else if (streq (arg, "--expiry-ms"))
            setting = 2;
        else if (streq (arg, "--grace-ms"))
            setting = 3;
        else if (streq (arg, "--body-max"))
            setting = 4;
        else {
            fprintf (stderr, "aigw-broker: unknown or incomplete option %s\n", arg);
            s_usage (stderr);
            return 2;
        }
        if (setting >= 0) {
            if (!value) {
                fprintf (stderr, "aigw-broker: %s needs a value\n", arg);
                return 2;
            }
            settings[setting][1] = value;
        }
        argn++;
    }
    gw_log_init ("broker");
    if (verbose)
        gw_log_configure (GW_LOG_DEBUG, gw_env ("LOG_FORMAT", "text"));
    zsys_init ();
    //  SIGINT and SIGTERM set zsys_interrupted (czmq's handler).
    zsys_catch_interrupts ();

    int status = 1;
    char *bound_bus = NULL, *bound_tap = NULL;
    zactor_t *broker = zactor_new (gw_broker_actor, NULL);
    if (!broker)
        goto done;
    if (verbose)
        zstr_send (broker, "VERBOSE");
    //  Heartbeat before expiry does not matter: each is checked alone.
    for (int i = 0; i < 5; i++)
        if (s_configure (broker, settings[i][0], settings[i][1]))
            goto done;
    zstr_sendx (broker, "BIND", bus, NULL);
    bound_bus = zstr_recv (broker);
    if (!bound_bus || !*bound_bus) {
        gw_error ("cannot bind bus %s", bus);
        goto done;
    }
    zstr_sendx (broker, "TAP", tap, NULL);
    bound_tap = zstr_recv (broker);
    if (!bound_tap || !*bound_tap) {
        gw_error ("cannot bind tap %s", tap);
        goto done;
    }
    gw_info ("broker listening bus=%s tap=%s", bound_bus, bound_tap);
    gw_signals_wait (NULL, 0);
    gw_info ("broker stopping");
    status = 0;
done:
    zstr_free (&bound_bus);
    zstr_free (&bound_tap);
    zactor_destroy (&broker);
    return status;
}
