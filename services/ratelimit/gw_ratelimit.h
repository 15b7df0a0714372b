//  --------------------------------------------------------------------------
//  gw_ratelimit — the ratelimit stage (service "ratelimit", IDEMPOTENT):
//  admission per proto/STAGES.md §6.1 and settle/release per §6.3, over a
//  gw_limiter (memory or Redis). docs/LIMITS.md is the user's view.
//
//  Admission (ann.op chat, completions, embeddings): estimates the request
//  (prompt tokens from the body, + max_tokens, priced as billing prices:
//  gw_price_cost with the model's prices and the group's multiplier),
//  collects the scopes that have limits (key, user, group, model,
//  ip), and admits it in ONE limiter call. Admitted: writes ann.rl and the
//  x-ratelimit-* entries of ann.headers and FORWARDs. Refused: FINAL 429 in
//  the OpenAI error shape with ann.retry_after (s) and ann.headers. Other
//  operations (models) pass without limits. With the limiter on Redis the
//  admissions that arrive in one turn of the actor's loop are made
//  together, after the turn (gw_stage's flush), in one round trip
//  (gw_limiter_admit_many); the memory back end admits each at once.
//
//  ann.op settle / release (from billing / the edge): body {rid, tokens,
//  cost} → limiter settle / release → FINAL 200 {"settled": bool}; 503 if
//  the limiter is unavailable (the hold then expires by itself).
//
//  Why IDEMPOTENT is safe: the broker re-dispatches a request whose worker
//  died; the limiter's admit is idempotent per rid (a second admit of the
//  same rid reserves nothing and answers admitted), and settle/release are
//  idempotent too.
//
//  Actor commands on the pipe:
//
//    CONNECT endpoint      register as "ratelimit"; signal 0 ok, 1 failed.
//    CONFIGURE capacity N  before CONNECT; signal 0 / 1. Also heartbeat N
//                          and expiry N (bus session timers, ms).
//    RELOAD                reload the limits and prices files; signal 0 ok,
//                          1 failed (old configuration kept).
//    VERBOSE               log decisions at debug level.
//    $TERM                 end the actor.
//
//  Threading: one thread (the actor) owns a gw_ratelimit_t. Admission
//  blocks that thread for one limiter call (one Redis round trip, bounded
//  by the Redis timeout).

#ifndef GW_RATELIMIT_H_INCLUDED
#define GW_RATELIMIT_H_INCLUDED

#include <czmq.h>
#include <stdint.h>
#include <stdbool.h>
#include "gw_limiter.h"

typedef struct _gw_ratelimit_t gw_ratelimit_t;
typedef struct _gw_envelope_t gw_envelope_t;
typedef struct _gw_stage_host_t gw_stage_host_t;

//  What to answer when a request is refused.
typedef struct {
    uint16_t status;  //  429, or 400 for a malformed body
    const char *type;  //  OpenAI error type (static string)
    const char *code;  //  OpenAI error code (static string)
    int64_t retry_after;  //  seconds, -1 = none
    char message[384];  //  human-readable message
} gw_ratelimit_refusal_t;

//  The estimate of one request (STAGES.md §6.1).
typedef struct {
    uint64_t prompt_tokens;  //  ceil (bytes of prompt text / 3)
    uint64_t max_tokens;  //  output tokens reserved (max_tokens × n)
    uint64_t cost;  //  micro-units: gw_price_cost of those tokens, as billing
    int64_t group_milli;  //  the group multiplier applied, thousandths
    bool group_unknown;  //  the store could never be read: prices from the file
        //  only, the group at 1.0
} gw_ratelimit_estimate_t;

//  Create the stage logic over limiter (taken, nulled). Defaults: no
//  limits, default max_tokens 4096, price multiplier 1.5, no prices.
gw_ratelimit_t *gw_ratelimit_new (gw_limiter_t **limiter_p);

//  Destroy; nulls the caller's reference.
void gw_ratelimit_destroy (gw_ratelimit_t **self_p);

//  Read RATE_LIMIT_REQUESTS_PER_MINUTE, RATE_LIMIT_BURST, AIGW_TPM,
//  AIGW_MAX_CONCURRENT (defaults for the key scope), AIGW_DEFAULT_MAX_TOKENS,
//  AIGW_PRICE_MULTIPLIER, AIGW_LIMITS_FILE, AIGW_PRICES_FILE,
//  AIGW_GROUP_MULTIPLIERS (with AIGW_GROUPS_REFRESH_MS) and
//  AIGW_ENFORCE_BALANCE (with AIGW_BALANCE_REFRESH_MS), both reading
//  DATABASE_URL. Returns 0, or -1 with a message in error.
int gw_ratelimit_configure_env (gw_ratelimit_t *self, char *error, size_t error_size);

//  Defaults for every scope of a kind ("key", "user", "group", "model",
//  "ip") before the limits file applies (the file's defaults.<kind> fields
//  override them). Takes effect at once without a limits file, else at the
//  next load of the file. Returns -1 for an unknown kind.
int gw_ratelimit_set_defaults (
    gw_ratelimit_t *self, const char *kind, const gw_limits_t *limits);

//  Price holds as billing prices: with the store's model prices (falling
//  back to the prices file's) and the multiplier of the request's group
//  (tenant.group, else "default"), read from billing's store at url (opened
//  on demand, the one connection balances use too) and re-read every
//  refresh_ms, as billing re-reads them: a hold is then exactly billing's
//  cost of the tokens it reserves, also for a price set with aigw-admin. A
//  group not in the store is 1.0. url NULL turns it off (prices from the
//  file only, every group 1.0). configure_env calls it from
//  AIGW_GROUP_MULTIPLIERS (default 1), DATABASE_URL and
//  AIGW_GROUPS_REFRESH_MS. Store unavailable before the first read: a
//  request with a cost limit is answered by the limiter's fail mode.
void gw_ratelimit_set_groups (gw_ratelimit_t *self, const char *url, int refresh_ms);

//  Enforce the prepaid balance of every user (AIGW_ENFORCE_BALANCE=1,
//  docs/LIMITS.md "Balance"): the budget of scope user:<name> becomes
//  L = B + S, B the user's balance read from the store at url (opened on
//  demand), S the cost settled on the scope, re-read every refresh_ms.
//  url NULL turns enforcement off. configure_env calls it from
//  AIGW_ENFORCE_BALANCE, DATABASE_URL and AIGW_BALANCE_REFRESH_MS.
void gw_ratelimit_set_balance (gw_ratelimit_t *self, const char *url, int refresh_ms);

//  Load the limits file (docs/LIMITS.md). Returns 0, or -1 with a message
//  naming the entry and field (the previous configuration stays).
int gw_ratelimit_set_limits_file (
    gw_ratelimit_t *self, const char *path, char *error, size_t error_size);

//  Load the prices file, billing's format (docs/BILLING.md "Price file"):
//  {"model": {"input": USD/1M, "output": USD/1M, "cached_input": USD/1M}},
//  numbers or decimal strings; model "*" prices every other model. Returns
//  0, or -1 with a message (the previous prices stay).
int gw_ratelimit_set_prices_file (
    gw_ratelimit_t *self, const char *path, char *error, size_t error_size);

//  Reload both files if either changed (at most every interval_ms unless
//  force). Returns 1 reloaded, 0 unchanged, -1 failed (old kept, logged).
int gw_ratelimit_refresh (gw_ratelimit_t *self, bool force, int interval_ms);

//  Estimate a request body (msgpack map) for op, model and group (tenant.group,
//  NULL = "default"). Returns 0, or -1 if the body is not a msgpack map.
int gw_ratelimit_estimate (gw_ratelimit_t *self, const char *op, const char *model,
    const char *group, const void *body, size_t size, gw_ratelimit_estimate_t *estimate);

//  Admit the request in envelope with body. GW_OK: admitted (envelope
//  annotated with ann.rl and ann.headers). GW_DONE: refused, refusal filled
//  and the envelope annotated with ann.retry_after and ann.headers for the
//  FINAL. Runs on the owning thread.
int gw_ratelimit_admit (gw_ratelimit_t *self, gw_envelope_t *envelope, const void *body,
    size_t size, gw_ratelimit_refusal_t *refusal);

//  The limiter (owned by the stage).
gw_limiter_t *gw_ratelimit_limiter (gw_ratelimit_t *self);

//  The ratelimit actor; args is a gw_ratelimit_t * handed over (required).
void gw_ratelimit_actor (zsock_t *pipe, void *args);

//  Add the ratelimit stage over stage (taken) to a gw_stage host: how
//  gw_ratelimit_actor runs it, and how aigw-gateway co-locates it with
//  other stages in one thread.
void gw_ratelimit_stage (gw_ratelimit_t *stage, gw_stage_host_t *host);

//  Start the ratelimit stage configured from the environment (the variables
//  of aigw-ratelimit, docs/LIMITS.md) and connect it to bus. Returns the
//  actor (it accepts RELOAD: re-read the limits and prices files), or NULL
//  after logging why. Used by aigw-ratelimit and by aigw-gateway.
zactor_t *gw_ratelimit_launch (const char *bus);

//  The stage logic configured from the same environment, without an actor
//  (for gw_ratelimit_stage); NULL after logging why.
gw_ratelimit_t *gw_ratelimit_new_env (void);

//  Self test of this class.
void gw_ratelimit_test (bool verbose);

#endif
