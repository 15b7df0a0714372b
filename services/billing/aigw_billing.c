//  --------------------------------------------------------------------------
//  aigw-billing — the billing stage process: opens the SQL store (applying
//  migrations), loads the optional price file, starts gw_billing_actor and
//  registers it on the bus. SIGINT/SIGTERM stop it after committing and
//  answering the batch in hand. A store that cannot be opened, a bad price
//  file or a bad multiplier at start is a clear error and exit status 1.
//
//  Environment (docs/BILLING.md, "Configuration"): AIGW_BUS, DATABASE_URL,
//  AIGW_PRICES_FILE, AIGW_PRICE_MULTIPLIER, AIGW_BILLING_CAPACITY,
//  AIGW_BILLING_BATCH_MAX, AIGW_BILLING_BATCH_WAIT_MS, AIGW_BILLING_SETTLE,
//  AIGW_HEARTBEAT_MS and AIGW_EXPIRY_MS (bus session timers), LOG_LEVEL,
//  LOG_FORMAT.

#include "aigw.h"
#include "gw_store.h"
#include "gw_billing.h"

static void
s_usage (void)
{
    printf ("usage: aigw-billing [--bus ENDPOINT] [--database URL]\n"
            "  DATABASE_URL: sqlite:///path.db, a path, or postgres://… (default "
            "var/aigw.db)\n"
            "  AIGW_PRICES_FILE: JSON prices loaded at start; AIGW_PRICE_MULTIPLIER "
            "(default 1.5)\n");
}

int
main (int argc, char *argv[])
{
    gw_log_init ("billing");
    const char *bus = gw_env ("AIGW_BUS", "tcp://127.0.0.1:5555");
    const char *url = gw_env ("DATABASE_URL", "var/aigw.db");
    for (int argn = 1; argn < argc; argn++) {
        if (streq (argv[argn], "--bus") && argn + 1 < argc)
            bus = argv[++argn];
        else if (streq (argv[argn], "--database") && argn + 1 < argc)
            url = argv[++argn];
        else {
            s_usage ();
            return streq (argv[argn], "--help") ? 0 : 2;
        }
    }
    gw_signals_block ();
    zsys_init ();
    zactor_t *actor = gw_billing_launch (bus, url);
    if (!actor)
        return 1;
    gw_signals_wait (NULL, 0);
    gw_info ("billing: stopping");
    zactor_destroy (&actor);
    return 0;
}
