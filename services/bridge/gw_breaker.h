//  --------------------------------------------------------------------------
//  gw_breaker — per-channel circuit breakers (STAGES.md §4).
//
//  A channel that fails `failures` attempts in a row is OPEN for `cooldown`
//  ms: callers skip it. After the cooldown it is HALF-OPEN: gw_breaker_allow
//  lets exactly one caller through as a probe (the others see it as open
//  until the probe reports, or until another cooldown has passed without a
//  report); success closes it, failure opens it for another cooldown.
//
//    state      event                       next
//    ---------  --------------------------  ---------
//    closed     success                     closed (count = 0)
//    closed     failure, count < failures   closed (count + 1)
//    closed     failure, count = failures   open (until now + cooldown)
//    open       cooldown elapsed, allow     half-open (probe taken)
//    half-open  success                     closed
//    half-open  failure                     open (until now + cooldown)
//    half-open  release (no outcome)        open (cooldown already over:
//                                           the next allow probes again)
//
//  Channels are keyed by id; a channel with no failures is not stored, so
//  memory is bounded by the channels that are failing (at most 4096 tracked;
//  beyond that new channels are treated as closed). Times are monotonic ms
//  passed in by the caller, so tests control the clock.
//
//  Threading: one thread (the bridge actor) owns the registry.

#ifndef GW_BREAKER_H_INCLUDED
#define GW_BREAKER_H_INCLUDED

#include <stdint.h>
#include <stdbool.h>

typedef struct _gw_breaker_t gw_breaker_t;

#define GW_BREAKER_CLOSED 0
#define GW_BREAKER_OPEN 1
#define GW_BREAKER_HALF_OPEN 2

//  Create a registry: failures in a row that open a breaker (>= 1), and the
//  cooldown in ms (>= 1).
gw_breaker_t *gw_breaker_new (uint32_t failures, int64_t cooldown_ms);

//  Destroy; nulls the reference.
void gw_breaker_destroy (gw_breaker_t **self_p);

//  State of a channel at time now (does not take the probe).
int gw_breaker_state (gw_breaker_t *self, const char *channel, int64_t now);

//  True if the caller may try the channel now: closed, or half-open with
//  the probe free (the caller then holds the probe and must report success,
//  failure or release).
bool gw_breaker_allow (gw_breaker_t *self, const char *channel, int64_t now);

//  Take the channel even though it is open (every channel of a plan is
//  open: the bridge tries the one whose cooldown ends first). Counts as the
//  probe. Never fails.
void gw_breaker_force (gw_breaker_t *self, const char *channel, int64_t now);

//  Monotonic ms at which the channel's cooldown ends (0 if not open).
int64_t gw_breaker_open_until (gw_breaker_t *self, const char *channel);

//  Report the outcome of an attempt.
void gw_breaker_success (gw_breaker_t *self, const char *channel, int64_t now);
void gw_breaker_failure (gw_breaker_t *self, const char *channel, int64_t now);

//  The attempt ended without an outcome (cancelled): give the probe back.
void gw_breaker_release (gw_breaker_t *self, const char *channel, int64_t now);

//  Channels tracked (failing or open).
size_t gw_breaker_size (gw_breaker_t *self);

//  Self test of this class.
void gw_breaker_test (bool verbose);

#endif
