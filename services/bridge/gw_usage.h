//  --------------------------------------------------------------------------
//  gw_usage — the usage event producer (proto/STAGES.md §6.2): sends one
//  usage event per request that reached a backend to service "billing" over
//  its own GWP/1 client session, and keeps every event in a spool — in
//  memory and in an append-only file — until billing acknowledges it (FINAL
//  200) or refuses it for good (FINAL 400). Anything else is resent with
//  exponential back-off. A producer that crashed leaves its spool file
//  behind; the next producer started on the same spool folder takes it over
//  and resends what was not acknowledged (docs/BILLING.md, "The producer").
//
//  Threading: one thread (the bridge actor) owns the object. It polls
//  gw_usage_socket (fetched again before every poll: the session replaces
//  it on reconnect) and calls gw_usage_run at least every
//  gw_usage_timeout () ms.

#ifndef GW_USAGE_H_INCLUDED
#define GW_USAGE_H_INCLUDED

#include <czmq.h>
#include <msgpack.h>
#include <stdint.h>
#include <stdbool.h>

typedef struct _gw_usage_t gw_usage_t;
typedef struct _gw_envelope_t gw_envelope_t;

//  Create a producer sending to service (e.g. "billing") on the broker at
//  endpoint, spooling in folder dir (created if missing) in a file
//  "<name>-<host>-<pid>-<random>.spool" held under an exclusive flock for
//  the object's life. Spool files in dir nobody holds (their producer died)
//  are taken over at once: their unacknowledged events are copied into the
//  new file, the old file deleted, and the events resent. max bounds the
//  events kept (gw_usage_full). Returns NULL (logged) if the endpoint is
//  invalid or the spool cannot be written.
gw_usage_t *gw_usage_new (const char *endpoint, const char *service, const char *dir,
    const char *name, size_t max);

//  Destroy; the spool file stays when it holds unacknowledged events (the
//  next producer takes it over), else it is deleted. Nulls the reference.
void gw_usage_destroy (gw_usage_t **self_p);

//  Options: per-attempt deadline (default 5000 ms), resend back-off
//  (default 100 ms doubling to 5000 ms), fsync after every spool write
//  (default off: a write survives a crash of the process, not of the
//  machine), bus session timers (as gw_client).
void gw_usage_set_timeout (gw_usage_t *self, int timeout_ms);
void gw_usage_set_backoff (gw_usage_t *self, int min_ms, int max_ms);
void gw_usage_set_fsync (gw_usage_t *self, bool fsync);
void gw_usage_set_heartbeat (gw_usage_t *self, int heartbeat_ms, int expiry_ms);

//  Spool one event (body: a msgpack map, STAGES.md §6.2, whose billing
//  idempotency key is rid) and send it. The body is copied. Returns 0, or
//  -1 if the spool is full or the spool file could not be written (the
//  event is not kept then: the caller must not lose it silently — log it).
int gw_usage_submit (
    gw_usage_t *self, const uint8_t rid[16], const void *body, size_t size);

//  True when max events are kept: the caller should stop taking work that
//  would produce more (backpressure), until acknowledgements free room.
bool gw_usage_full (gw_usage_t *self);

//  Events kept (not yet acknowledged).
size_t gw_usage_pending (gw_usage_t *self);

//  The session's socket to poll for input.
zsock_t *gw_usage_socket (gw_usage_t *self);

//  Non-blocking: process every answer available, run the session's timers,
//  send (or resend) the events that are due, compact the spool file.
void gw_usage_run (gw_usage_t *self);

//  Milliseconds until gw_usage_run must be called again.
int gw_usage_timeout (gw_usage_t *self);

//  Path of this producer's spool file.
const char *gw_usage_path (gw_usage_t *self);

//  Counters: "pending= inflight= sent= acked= dropped= retries= recovered=".
void gw_usage_stats (gw_usage_t *self, char *out, size_t out_max);

//  Pack a usage event (STAGES.md §6.2) into out from the request envelope
//  (tenant.key/user/group, model, ann.rl) and the outcome. channel may be
//  NULL. user falls back to tenant.key, then "anonymous", so the event is
//  never refused for a missing principal.
void gw_usage_event_pack (msgpack_sbuffer *out, const uint8_t rid[16], gw_envelope_t *env,
    const char *channel, uint64_t prompt_tokens, uint64_t completion_tokens,
    uint64_t cached_tokens, bool estimated, uint16_t status);

//  Self test of this class.
void gw_usage_test (bool verbose);

#endif
