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

static int
s_configure (zactor_t *actor, const char *key, int64_t value)
{
    char text[24];
    snprintf (text, sizeof (text), "%" PRId64, value);
    zstr_sendx (actor, "CONFIGURE", key, text, NULL);
    return zsock_wait (actor);
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
    zsys_init ();
    char error[512];
    gw_store_t *store = gw_store_new (url, error, sizeof (error));
    if (!store) {
        fprintf (stderr, "aigw-billing: DATABASE_URL: %s\n", error);
        return 1;
    }
    gw_info ("billing: store %s, schema version %d", gw_store_backend (store),
        gw_store_version (store));
    gw_billing_t *billing = gw_billing_new (&store);
    const char *multiplier = gw_env ("AIGW_PRICE_MULTIPLIER", "1.5");
    if (gw_billing_set_multiplier (billing, multiplier)) {
        fprintf (stderr,
            "aigw-billing: AIGW_PRICE_MULTIPLIER=%s: must be a decimal number 0..1000 "
            "with at most 3 decimals\n",
            multiplier);
        gw_billing_destroy (&billing);
        return 1;
    }
    const char *prices = gw_env ("AIGW_PRICES_FILE", NULL);
    if (prices) {
        int loaded = gw_billing_load_prices (billing, prices, error, sizeof (error));
        if (loaded < 0) {
            fprintf (stderr, "aigw-billing: AIGW_PRICES_FILE %s\n", error);
            gw_billing_destroy (&billing);
            return 1;
        }
        gw_info ("billing: %d price(s) loaded from %s", loaded, prices);
    }
    gw_info ("billing: global price multiplier %s", multiplier);

    zactor_t *actor = zactor_new (gw_billing_actor, billing);  //  takes billing
    assert (actor);
    const char *settle = gw_env ("AIGW_BILLING_SETTLE", "ratelimit");
    zstr_sendx (actor, "CONFIGURE", "settle", settle, NULL);
    int rc = zsock_wait (actor);
    rc |= s_configure (
        actor, "capacity", gw_env_int ("AIGW_BILLING_CAPACITY", 1024, 1, 65535));
    rc |= s_configure (
        actor, "batch_max", gw_env_int ("AIGW_BILLING_BATCH_MAX", 256, 1, 4096));
    rc |= s_configure (
        actor, "batch_wait_ms", gw_env_int ("AIGW_BILLING_BATCH_WAIT_MS", 2, 0, 1000));
    int64_t heartbeat = gw_env_int ("AIGW_HEARTBEAT_MS", 0, 10, 60000);
    int64_t expiry = gw_env_int ("AIGW_EXPIRY_MS", 0, 20, 600000);
    if (heartbeat && expiry) {
        rc |= s_configure (actor, "heartbeat", heartbeat);
        rc |= s_configure (actor, "expiry", expiry);
    }
    if (rc) {
        fprintf (stderr,
            "aigw-billing: bad configuration (AIGW_BILLING_SETTLE=%s must be a service "
            "name)\n",
            settle);
        zactor_destroy (&actor);
        return 1;
    }
    zstr_sendx (actor, "CONNECT", bus, NULL);
    if (zsock_wait (actor) != 0) {
        fprintf (stderr, "aigw-billing: cannot connect to the bus at %s\n", bus);
        zactor_destroy (&actor);
        return 1;
    }
    gw_info ("billing: serving on %s", bus);
    while (!zsys_interrupted)
        zclock_sleep (200);
    gw_info ("billing: stopping");
    zactor_destroy (&actor);
    return 0;
}
