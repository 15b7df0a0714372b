//  --------------------------------------------------------------------------
//  gw_billing — the billing stage (service "billing", IDEMPOTENT): receives
//  usage events (proto/STAGES.md §6.2), prices them, records them in the
//  ledger and moves balances in one transaction per batch (gw_store),
//  answers each event FINAL 200 {"cost", "duplicate"} only after COMMIT,
//  and then asks ratelimit to settle the request's hold (§6.3).
//
//  Pricing (docs/BILLING.md, proto/gw_price.h — the formula ratelimit prices
//  its holds with too): prices are micro-units per 1 000 000 tokens,
//  multipliers thousandths. For an event
//
//    raw  = (prompt − cached) × input + cached × cached_input + completion × output
//    cost = ⌊ raw × global_milli × group_milli / 10^12 + 1/2 ⌋     (micro-units)
//
//  computed exactly in 128-bit integers, rounded half up once, at the end.
//  A model without a price uses the price of model "*" if there is one,
//  else costs 0 (logged once per model, counted as unpriced).
//
//  The gw_billing_t class holds the store, the price and group tables
//  (refreshed from the store) and the pricing; the actor wraps it in a
//  worker session plus a client session for settles. Commands on the
//  actor's pipe:
//
//    CONNECT endpoint      register as "billing" on the bus (and connect the
//                          settle client); replies a signal: 0 done, 1 bad
//                          endpoint.
//    CONFIGURE key value   before CONNECT for capacity; replies a signal 0 /
//                          1. Keys: capacity (1..65535, default 1024),
//                          batch_max (1..4096, default 256), batch_wait_ms
//                          (0..1000, default 2), refresh_ms (100..3600000,
//                          default 5000), settle (service name for settles,
//                          default "ratelimit"; "-" disables them), heartbeat
//                          and expiry (ms, bus session timers; both or
//                          neither, before CONNECT).
//    STATS                 replies one string frame of key=value counters:
//                          events recorded duplicates rejected failed
//                          batches commits settles settle_errors unpriced.
//    VERBOSE               log every event at debug level.
//    $TERM                 end the actor.
//
//  Threading: one thread (the actor) owns a gw_billing_t.

#ifndef GW_BILLING_H_INCLUDED
#define GW_BILLING_H_INCLUDED

#include <czmq.h>
#include <stdint.h>
#include <stdbool.h>

typedef struct _gw_billing_t gw_billing_t;
typedef struct _gw_store_t gw_store_t;

//  Create billing over an open store (takes ownership of *store_p and nulls
//  it) and load the prices and groups from it. Global multiplier 1.5.
gw_billing_t *gw_billing_new (gw_store_t **store_p);

//  Destroy, closing the store; nulls the reference.
void gw_billing_destroy (gw_billing_t **self_p);

//  Set the global multiplier from an exact decimal string (at most three
//  decimals, at most 1000). Returns 0 or -1 (unchanged).
int gw_billing_set_multiplier (gw_billing_t *self, const char *text);

//  The global multiplier in thousandths.
int64_t gw_billing_multiplier (gw_billing_t *self);

//  Load a JSON price file into the store's model_prices (docs/BILLING.md,
//  "Price file") and refresh the tables. Returns the number of models
//  loaded, or -1 with a message naming the model and field in error.
int gw_billing_load_prices (
    gw_billing_t *self, const char *path, char *error, size_t error_size);

//  Reload prices and groups from the store. Returns 0, or -1 (the tables
//  in memory are kept, the error is logged).
int gw_billing_refresh (gw_billing_t *self);

//  Price usage for model and group with the tables in memory. Returns 0
//  with *cost set, 1 if the model has no price (and no "*" price; *cost is
//  0), or -1 if cached exceeds prompt or the cost does not fit in int64.
int gw_billing_price (gw_billing_t *self, const char *model, const char *group,
    int64_t prompt, int64_t completion, int64_t cached, int64_t *cost);

//  The billing actor; args is a gw_billing_t * handed over (required).
void gw_billing_actor (zsock_t *pipe, void *args);

//  Start the billing stage on the store at url (DATABASE_URL syntax),
//  configured from the environment (AIGW_PRICE_MULTIPLIER, AIGW_PRICES_FILE,
//  AIGW_BILLING_SETTLE, AIGW_BILLING_CAPACITY, AIGW_BILLING_BATCH_MAX,
//  AIGW_BILLING_BATCH_WAIT_MS, AIGW_HEARTBEAT_MS, AIGW_EXPIRY_MS) and
//  connect it to bus. Returns the actor, or NULL after logging why. Used by
//  aigw-billing and by aigw-gateway.
zactor_t *gw_billing_launch (const char *bus, const char *url);

//  Self test of this class: on a temporary SQLite file, and on PostgreSQL
//  when AIGW_TEST_PG_URL is set (required if AIGW_REQUIRE_SERVICES=1).
void gw_billing_test (bool verbose);

#endif
