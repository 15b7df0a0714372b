//  --------------------------------------------------------------------------
//  gw_store — the SQL store: users, groups, API keys, channels, model prices,
//  the usage ledger and balances, behind one interface with two back ends
//  chosen by URL:
//
//    sqlite:///abs/path.db, sqlite://rel/path.db, or a plain path  -> SQLite
//    postgres://… or postgresql://…                                -> libpq
//
//  Opening a store applies the embedded, versioned migrations of its back
//  end (schema_migrations: version, applied_at) in one transaction; it is
//  idempotent on restart and refuses a database whose schema is newer than
//  this build. The schema is documented in docs/BILLING.md.
//
//  Money is integer micro-units (1 USD = 1 000 000), never a float. Prices
//  are micro-units per 1 000 000 tokens (so $2.50 / 1M tokens is 2 500 000);
//  multipliers are thousandths (1000 = 1.0).
//
//  Errors: every method returns 0 (or a documented count / 1 = not found)
//  on success, GW_STORE_FAILED when a statement failed (bad data, a
//  constraint, a row that breaks the schema's promises — nothing was
//  changed), or GW_STORE_UNAVAILABLE when the database could not be reached
//  (PostgreSQL connection lost and not restored by one reset, SQLite busy
//  beyond its timeout). gw_store_error describes the last failure. Nothing
//  here asserts on database contents.
//
//  Threading: a gw_store_t is one connection, owned by one thread. Use one
//  store per thread or process; concurrent writers on the same database are
//  safe (transactions, SQLite WAL + busy timeout).

#ifndef GW_STORE_H_INCLUDED
#define GW_STORE_H_INCLUDED

#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>
#include "gw_price.h"

typedef struct _gw_store_t gw_store_t;

#define GW_STORE_FAILED -1
#define GW_STORE_UNAVAILABLE -2

//  Longest name (user, group, key id, model, channel) the store accepts, in
//  bytes. Names are valid UTF-8 without NUL.
#define GW_STORE_NAME_MAX 256

//  Largest token count and price accepted (keeps every product exact in
//  128-bit arithmetic and every sum within BIGINT).
#define GW_STORE_TOKENS_MAX GW_PRICE_TOKENS_MAX
#define GW_STORE_PRICE_MAX GW_PRICE_MAX

//  One usage event to record (STAGES.md §6.2), with its cost already priced.
//  Strings are borrowed from the caller for the duration of the call.
typedef struct {
    uint8_t rid[16];  //  request id: the idempotency key
    int64_t ts;  //  unix ms when the request completed
    const char *key;  //  key id (tenant.key), may be ""
    const char *user;  //  user, not empty
    const char *group;  //  group, not empty
    const char *model;  //  client-facing model, not empty
    const char *channel;  //  channel that served it, may be ""
    int64_t prompt_tokens;  //  0..GW_STORE_TOKENS_MAX
    int64_t completion_tokens;  //  idem
    int64_t cached_tokens;  //  idem, part of prompt_tokens
    bool estimated;  //  usage is the gateway's own estimate
    int status;  //  final HTTP status
    int64_t cost;  //  micro-units, >= 0
    //  Filled by gw_store_record_usage:
    bool duplicate;  //  the rid was already in the ledger; nothing changed
    int64_t recorded_cost;  //  cost in the ledger (the first one, if duplicate)
} gw_usage_event_t;

//  Usage totals (one model, or all).
typedef struct {
    char model[GW_STORE_NAME_MAX + 1];  //  "" for the total
    int64_t requests;  //  ledger rows
    int64_t prompt_tokens;
    int64_t completion_tokens;
    int64_t cached_tokens;
    int64_t cost;  //  micro-units
} gw_usage_sum_t;

//  Prices of one model: gw_price_t (gw_price.h), micro-units per 1M tokens.

//  One API key record.
typedef struct {
    char sha256[65];  //  64 lowercase hex digits of the key's SHA-256
    char name[GW_STORE_NAME_MAX + 1];  //  label, may be ""
    char user[GW_STORE_NAME_MAX + 1];  //  owner
    char models[4096];  //  comma-separated allow-list, "" = all
    int64_t created;  //  unix ms
    int64_t revoked;  //  unix ms, 0 = active
} gw_key_record_t;

//  Scope of a usage query.
typedef enum { GW_USAGE_BY_KEY = 1, GW_USAGE_BY_USER = 2 } gw_usage_scope_t;

//  True if text is a name the store accepts: at most GW_STORE_NAME_MAX bytes
//  of valid UTF-8 without NUL, and not empty unless allow_empty. Lets
//  callers refuse bad input before it reaches a transaction.
bool gw_store_name_valid (const char *text, bool allow_empty);

//  Open the store at url (NULL or "" = "var/aigw.db"), creating the SQLite
//  file (and its folder) if needed, and apply migrations. Returns NULL on
//  failure with a message in error (error_size bytes; error may be NULL).
gw_store_t *gw_store_new (const char *url, char *error, size_t error_size);

//  Close the connection, free everything; nulls the reference.
void gw_store_destroy (gw_store_t **self_p);

//  "sqlite" or "postgres".
const char *gw_store_backend (gw_store_t *self);

//  Schema version of the database (after migrations), and of this build.
int gw_store_version (gw_store_t *self);
int gw_store_latest_version (void);

//  The last failure, "" if none. Owned by the store.
const char *gw_store_error (gw_store_t *self);

//  Transactions committed by gw_store_record_usage since new (counter).
uint64_t gw_store_commits (gw_store_t *self);

//  Record count usage events in ONE transaction: insert each ledger row
//  unless its rid is already there, and move the balance of each user by
//  minus the cost of its new rows (creating the user, balance 0, in the
//  event's group, if unknown). Fills duplicate and recorded_cost of every
//  event. Returns 0 after COMMIT; GW_STORE_FAILED (an event is invalid or a
//  statement failed — nothing committed; record the events one at a time to
//  find the bad one) or GW_STORE_UNAVAILABLE (the database is unreachable;
//  nothing is known to be committed, so the caller retries later — the
//  operation is idempotent). Events may repeat a rid within a batch.
int gw_store_record_usage (gw_store_t *self, gw_usage_event_t *events, size_t count);

//  Usage of a key id or a user over [from_ms, to_ms): the total in *total
//  and one row per model (sorted by model) in rows, at most rows_max.
//  Returns the number of models (which may exceed rows_max: then only the
//  first rows_max are filled), or GW_STORE_FAILED / GW_STORE_UNAVAILABLE.
int gw_store_usage (gw_store_t *self, gw_usage_scope_t scope, const char *who,
    int64_t from_ms, int64_t to_ms, gw_usage_sum_t *total, gw_usage_sum_t *rows,
    size_t rows_max);

//  Model prices. set inserts or replaces; get returns 0, 1 if the model has
//  no price, or an error; each calls fn for every price (sorted by model)
//  and returns the number of prices or an error; delete returns 0 or 1.
int gw_store_price_set (gw_store_t *self, const char *model, const gw_price_t *price);
int gw_store_price_get (gw_store_t *self, const char *model, gw_price_t *price);
int gw_store_price_delete (gw_store_t *self, const char *model);
typedef void (gw_store_price_fn) (const char *model, const gw_price_t *price, void *arg);
int gw_store_price_each (gw_store_t *self, gw_store_price_fn *fn, void *arg);

//  Groups: set inserts or replaces the multiplier (thousandths, 0..1000000);
//  get returns 0 or 1 (no such group); each as for prices.
int gw_store_group_set (gw_store_t *self, const char *name, int64_t multiplier_milli);
int gw_store_group_get (gw_store_t *self, const char *name, int64_t *multiplier_milli);
typedef void (gw_store_group_fn) (const char *name, int64_t multiplier_milli, void *arg);
int gw_store_group_each (gw_store_t *self, gw_store_group_fn *fn, void *arg);

//  Read every model price and every group multiplier, as billing prices and
//  ratelimit holds: on success *prices_p is a new table model -> gw_price_t
//  and *groups_p group -> int64_t thousandths (both own their values; the
//  caller destroys them) and 0 is returned; on failure both are NULL and
//  the error code (GW_STORE_FAILED or GW_STORE_UNAVAILABLE) is returned.
int gw_store_pricing (gw_store_t *self, zhashx_t **prices_p, zhashx_t **groups_p);

//  Users: set creates the user (balance 0) or changes its group; get
//  returns 0 or 1 (no such user), group copied into group (group_size
//  bytes, may be NULL), balance into *balance (may be NULL); credit adds
//  delta micro-units (negative to debit) and returns 0 or 1 (no such
//  user); delete returns 0 or 1 and fails while the user owns keys.
int gw_store_user_set (gw_store_t *self, const char *name, const char *group);
int gw_store_user_get (
    gw_store_t *self, const char *name, char *group, size_t group_size, int64_t *balance);
int gw_store_user_credit (gw_store_t *self, const char *name, int64_t delta);
int gw_store_user_delete (gw_store_t *self, const char *name);

//  API keys, stored by SHA-256 only. add fails if the digest exists or the
//  user does not; get returns 0 or 1; revoke marks the key revoked now and
//  returns 0 or 1 (unknown or already revoked).
int gw_store_key_add (gw_store_t *self, const char *sha256, const char *name,
    const char *user, const char *models);
int gw_store_key_get (gw_store_t *self, const char *sha256, gw_key_record_t *key);
int gw_store_key_revoke (gw_store_t *self, const char *sha256);

//  Call fn for every API key, revoked ones too, sorted by created time then
//  digest; returns the number of keys or an error. The record is valid only
//  during the call. Used by aigw-admin and by auth's open-mode check.
typedef void (gw_store_key_fn) (const gw_key_record_t *key, void *arg);
int gw_store_key_each (gw_store_t *self, gw_store_key_fn *fn, void *arg);

//  Channels: an id and its JSON configuration text. get returns a fresh
//  string (caller frees) or NULL (unknown id, or an error: see
//  gw_store_error, "" if merely unknown); delete returns 0 or 1.
int gw_store_channel_set (gw_store_t *self, const char *id, const char *config);
char *gw_store_channel_get (gw_store_t *self, const char *id);
int gw_store_channel_delete (gw_store_t *self, const char *id);

//  Remove a SQLite database file and its -wal and -shm files (for tests
//  and tools; a missing file is fine).
void gw_store_remove (const char *path);

//  Self test of this class: everything on a temporary SQLite file, and on
//  PostgreSQL when AIGW_TEST_PG_URL is set (required if
//  AIGW_REQUIRE_SERVICES=1).
void gw_store_test (bool verbose);

#endif
