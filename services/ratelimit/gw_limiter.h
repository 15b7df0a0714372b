//  --------------------------------------------------------------------------
//  gw_limiter — the limiter engine behind aigw-ratelimit: one interface, two
//  back ends (docs/LIMITS.md).
//
//  memory   the embedded default: every counter lives in this object, so
//           one process (any number of threads) enforces the limits.
//  redis    REDIS_URL (or REDIS_ADDR + REDIS_PASSWORD + REDIS_DB): every
//           counter lives in Redis and each operation is ONE Lua script, so
//           any number of limiter instances (replicas) enforce one exact
//           limit.
//
//  admit    checks and reserves, all or nothing, every limit of every scope
//           of a request: requests per minute (GCRA, with burst), tokens
//           per minute (GCRA), concurrent leases, request/token/cost quotas
//           per calendar minute/hour/day/month (UTC), and a cost budget.
//           Idempotent per request id: a second admit for a rid that holds
//           (or held) a reservation reserves nothing and answers admitted.
//  settle   releases the lease and corrects the token and cost counters by
//           (actual - estimate); a second settle (or release) is a no-op.
//  release  the same with no usage (the estimate is given back entirely).
//           The record stays as a tombstone for at least 10 minutes: a
//           settle that comes after the release (the request had reached
//           a backend after all) adds the actual usage, once.
//
//  Redis unavailable: each call is bounded by the timeout (default 50 ms for
//  connect and for each command), then retried only after a back-off
//  (100 ms doubling to 2 s), so a dead Redis costs no waiting at all between
//  attempts. admit then answers by the fail mode (closed: refused with
//  limit "unavailable"; open: admitted, nothing reserved); settle/release
//  answer -1. One log line when the outage starts, one when it ends.
//
//  Threading: every method is thread safe (a mutex per instance), so the
//  memory back end can be shared by threads. A Redis instance serialises its
//  calls on its one connection.

#ifndef GW_LIMITER_H_INCLUDED
#define GW_LIMITER_H_INCLUDED

#include <stdint.h>
#include <stdbool.h>
#include <stddef.h>

typedef struct _gw_limiter_t gw_limiter_t;

#define GW_LIMITER_SCOPES_MAX 8  //  scopes per request
#define GW_LIMITER_SCOPE_MAX 200  //  bytes in a scope name
#define GW_LIMITER_WINDOWS 4  //  minute, hour, day, month

//  Quota windows (fixed calendar windows, UTC).
enum { GW_WINDOW_MINUTE = 0, GW_WINDOW_HOUR, GW_WINDOW_DAY, GW_WINDOW_MONTH };

//  The limits of one scope. 0 means unlimited everywhere.
typedef struct {
    uint64_t rpm;  //  requests per minute (GCRA rate)
    uint64_t burst;  //  GCRA bucket size in requests; 0 = rpm
    uint64_t tpm;  //  tokens per minute (GCRA, bucket = tpm)
    uint64_t concurrency;  //  leases held at once
    uint64_t requests[GW_LIMITER_WINDOWS];  //  request quota per window
    uint64_t tokens[GW_LIMITER_WINDOWS];  //  token quota per window
    uint64_t cost[GW_LIMITER_WINDOWS];  //  cost quota per window, micro-units
    uint64_t budget;  //  spend cap in micro-units (no window)
} gw_limits_t;

//  One admission.
typedef struct {
    uint8_t rid[16];  //  request id: the idempotency key
    size_t scopes;  //  0..GW_LIMITER_SCOPES_MAX
    const char *scope[GW_LIMITER_SCOPES_MAX];  //  "key:ab12cd34", "ip:1.2.3.4"…
    gw_limits_t limits[GW_LIMITER_SCOPES_MAX];  //  limits of each scope
    uint64_t tokens;  //  estimated tokens (prompt + max_tokens)
    uint64_t cost;  //  estimated cost, micro-units (the hold)
    int64_t lease_ms;  //  lifetime of the lease and the hold record, > 0
} gw_limiter_request_t;

//  Which limit refused (gw_limiter_result_t.limit).
enum {
    GW_LIMIT_NONE = 0,
    GW_LIMIT_RPM = 1,
    GW_LIMIT_TPM = 2,
    GW_LIMIT_CONCURRENCY = 3,
    GW_LIMIT_REQUESTS = 4,  //  + window (4..7)
    GW_LIMIT_TOKENS = 8,  //  + window (8..11)
    GW_LIMIT_COST = 12,  //  + window (12..15)
    GW_LIMIT_BUDGET = 16,
    GW_LIMIT_UNAVAILABLE = 17  //  Redis unavailable and failing closed
};

//  Outcome of an admit.
typedef struct {
    bool admitted;  //  everything reserved (or failing open, or a duplicate)
    bool duplicate;  //  the rid was already admitted: nothing reserved now
    bool unavailable;  //  the back end could not be reached (fail mode applied)
    int limit;  //  GW_LIMIT_* that refused, GW_LIMIT_NONE when admitted
    int scope;  //  index of the scope that refused, -1 if none
    int64_t retry_after_ms;  //  when a retry can succeed; -1 = not by waiting
    //  For the x-ratelimit-* headers: the binding (least remaining) scope's
    //  values; -1 when no such limit applies.
    int64_t limit_requests;  //  rpm
    int64_t remaining_requests;  //  requests admissible at once after this one
    int64_t reset_requests_ms;  //  until the request bucket is full again
    int64_t limit_tokens;  //  tpm
    int64_t remaining_tokens;  //  tokens admissible at once after this one
    int64_t reset_tokens_ms;  //  until the token bucket is full again
} gw_limiter_result_t;

//  Create a limiter. url NULL or "" (or "memory") = the in-process back end;
//  "redis://[[user]:password@]host[:port][/db]" = Redis (connects lazily, at
//  the first call, so a Redis that is down at start is an outage, not an
//  error). Returns NULL if the url is malformed.
gw_limiter_t *gw_limiter_new (const char *url);

//  Create from the environment: REDIS_URL, else REDIS_ADDR (host:port) with
//  REDIS_PASSWORD and REDIS_DB, else memory. Also reads AIGW_RATELIMIT_FAIL
//  (open|closed, default closed), AIGW_REDIS_TIMEOUT_MS (default 100) and
//  AIGW_RATELIMIT_PREFIX (default "aigw"). NULL if the settings are invalid
//  (error written to stderr by the caller's log).
gw_limiter_t *gw_limiter_new_env (void);

//  Destroy; nulls the caller's reference.
void gw_limiter_destroy (gw_limiter_t **self_p);

//  Fail mode when the back end is unavailable (default closed).
void gw_limiter_set_fail_open (gw_limiter_t *self, bool open);

//  Connect and command timeout for Redis, 1..10000 ms (default 50).
void gw_limiter_set_timeout (gw_limiter_t *self, int timeout_ms);

//  Key prefix (default "aigw"); keys are "{prefix}:rl:…" so that every key
//  of a script shares one hash tag (valid on Redis Cluster, one slot).
void gw_limiter_set_prefix (gw_limiter_t *self, const char *prefix);

//  Fake clock for tests: unix µs used by every later call (0 = the real
//  clock). On Redis the clock is otherwise the server's TIME, one clock
//  for every replica.
void gw_limiter_set_time (gw_limiter_t *self, int64_t now_us);

//  Check and reserve every limit of request, all or nothing; fills result.
//  Returns 0 when admitted (result->admitted), 1 when refused (result->limit
//  and result->retry_after_ms say why and when). Never blocks longer than
//  about two timeouts. Scopes must be distinct, non-empty, at most
//  GW_LIMITER_SCOPE_MAX bytes, without NUL (asserted: our own input).
int gw_limiter_admit (
    gw_limiter_t *self, const gw_limiter_request_t *request, gw_limiter_result_t *result);

//  Admit count requests, in order, each exactly as gw_limiter_admit would
//  (rcs[i] its return, results[i] its result). On Redis the whole batch
//  takes one round trip, not one per request.
void gw_limiter_admit_many (gw_limiter_t *self, const gw_limiter_request_t *requests,
    size_t count, gw_limiter_result_t *results, int *rcs);

//  Settle rid with its actual usage: release its lease and correct its token
//  and cost counters by (actual - estimate); if rid was released, add the
//  actual usage (the estimate was given back already). Returns 1 settled, 0
//  nothing to do (unknown rid, already settled, or expired), -1 back end
//  unavailable (retry later; the hold expires by itself otherwise).
int gw_limiter_settle (
    gw_limiter_t *self, const uint8_t rid[16], uint64_t tokens, uint64_t cost);

//  Release rid without usage: the lease, and the estimated tokens and cost
//  given back in full. The record stays, released, until it would have
//  expired and at least 10 minutes, for a settle that may still come. Same
//  returns as settle (0 also when rid was released already).
int gw_limiter_release (gw_limiter_t *self, const uint8_t rid[16]);

//  End rid's concurrency lease only (the request's FINAL went out); the
//  hold stays until settle or release. Idempotent; returns 1 if rid is
//  held, 0 if unknown or finished, -1 if the store is unavailable.
int gw_limiter_unlease (gw_limiter_t *self, const uint8_t rid[16]);

//  One item of gw_limiter_finish.
typedef struct {
    uint8_t rid[16];
    uint64_t tokens;  //  settle: the actual usage
    uint64_t cost;
    int mode;  //  0 settle, 1 release, 2 unlease
} gw_limiter_finish_t;

//  Settle, release or unlease count items, in order, each exactly as the
//  single calls above would; results[i] gets the item's return (1, 0 or
//  -1). On Redis the whole batch takes two round trips (every record read,
//  then every script call), not two per item. Returns the number of items
//  that changed something, or -1 if any item's back end was unavailable.
int gw_limiter_finish (
    gw_limiter_t *self, const gw_limiter_finish_t *items, size_t count, int *results);

//  The actual cost settled so far against scope's budget counter (the sum
//  of the costs given to settle for requests that held on a budget of
//  scope; holds and releases excluded), micro-units. The balance refresh
//  of the ratelimit stage reads it (docs/LIMITS.md "Balance"). Returns 0,
//  or -1 if the back end is unavailable.
int gw_limiter_budget_settled (gw_limiter_t *self, const char *scope, uint64_t *settled);

//  "memory" or "redis".
const char *gw_limiter_backend (gw_limiter_t *self);

//  True unless the Redis back end is in an outage.
bool gw_limiter_available (gw_limiter_t *self);

//  True if failing open.
bool gw_limiter_fail_open (gw_limiter_t *self);

//  Name of a GW_LIMIT_* value ("rpm", "tokens_per_day", …).
const char *gw_limiter_limit_name (int limit);

//  True if every field of limits is 0 (the scope needs no counter).
bool gw_limits_empty (const gw_limits_t *limits);

//  Self test of this class.
void gw_limiter_test (bool verbose);

#endif
