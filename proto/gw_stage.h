//  --------------------------------------------------------------------------
//  gw_stage — the actor that runs one or more stages in one thread, each
//  with its own worker session (its service on the bus): the loop every
//  stage shares (pipe commands, session input, timers, ticks), and
//  co-location's direct hand-off (DESIGN.md §8): a stage that forwards a
//  request to a service hosted by the same actor calls that stage in place
//  of a trip through the broker. The request stays with the session that
//  received it, which answers or forwards it for whichever hosted stage
//  ends its turn.
//
//  Pipe commands (as every stage actor): CONNECT endpoint (signal 0/1:
//  every hosted stage's session, then each stage's connect), CONFIGURE
//  capacity|heartbeat|expiry value (signal; applies to every hosted stage,
//  before CONNECT), CONFIGURE of a stage's own key, RELOAD (signal: 1 if any
//  stage failed), VERBOSE, $TERM.
//
//  A stage may wait for input of its own besides its session (a helper
//  actor's pipe, a gw_client session to the bus): its class lists those
//  sockets (sockets, asked again before every poll, so a socket replaced on
//  a reconnect is followed), the actor polls them with the sessions and
//  calls input for each one that is readable, and timeout shortens the
//  actor's sleep for the stage's own timers (tick runs after every
//  wake-up).
//
//  A stage that answers a request later (after its request callback
//  returned, e.g. from input or tick) keeps the request's context with
//  gw_stage_dup: the context names the session holding the request, which
//  is the session of the stage that received it from the broker (with
//  co-location, another stage's), and gw_stage_session / gw_stage_forward
//  work on it as during the callback.
//
//  Threading: everything runs on the actor's thread, so a stage's state is
//  touched by that thread only.

#ifndef GW_STAGE_H_INCLUDED
#define GW_STAGE_H_INCLUDED

#include <czmq.h>
#include <stdint.h>
#include <stdbool.h>

typedef struct _gw_stage_t gw_stage_t;
typedef struct _gw_stage_host_t gw_stage_host_t;
typedef struct _gw_worker_t gw_worker_t;
typedef struct _gw_msg_t gw_msg_t;
typedef struct _gw_envelope_t gw_envelope_t;

//  What a stage brings to the actor. Every function gets the stage's state.
typedef struct {
    const char *service;  //  registered on the bus
    uint32_t ready_flags;  //  GW_READY_IDEMPOTENT, ...
    //  A REQUEST for the stage: answer it on gw_stage_session (stage) or
    //  hand it on with gw_stage_forward. The actor destroys the message.
    void (*request) (void *state, gw_stage_t *stage, gw_msg_t *request);
    //  A pipe command the actor does not handle itself: VERBOSE (no
    //  answer), RELOAD and CONFIGURE key value (return the answer: 0 done,
    //  1 refused), or -1 when the command is not this stage's. May be NULL.
    int (*command) (void *state, const char *command, const char *key, const char *value);
    //  Periodic work, after every wake-up (at least every 500 ms). May be NULL.
    void (*tick) (void *state);
    //  Free the state. Runs before any session is destroyed, so contexts
    //  kept with gw_stage_dup may be destroyed here (not answered).
    void (*destroy) (void **state_p);
    //  After CONNECT made the stage's session: start what needs the bus
    //  (endpoint), e.g. a gw_client session or a helper actor. Returns 0,
    //  or -1 (CONNECT then signals 1). Called once. May be NULL.
    int (*connect) (void *state, const char *endpoint);
    //  The stage's own sockets to poll for input: write at most max of
    //  them (GW_STAGE_SOCKETS_MAX) into sockets, return how many. Asked
    //  before every poll and after every input call, so sockets may be
    //  replaced or closed at any time by the stage. May be NULL.
    size_t (*sockets) (void *state, zsock_t **sockets, size_t max);
    //  One of those sockets is readable: read what is there without
    //  blocking (it may be nothing by now); the actor polls again at once
    //  while input waits. Answers and forwards of
    //  requests kept with gw_stage_dup may happen here. May be NULL only
    //  if sockets is.
    void (*input) (void *state, zsock_t *socket);
    //  Milliseconds until the stage's tick is due (0 = at once), or -1 when
    //  it has no timer; the actor sleeps at most 500 ms regardless. May be
    //  NULL.
    long (*timeout) (void *state);
    //  After every turn of the loop, once the input of every stage of the
    //  actor is read: finish what request callbacks of this turn deferred
    //  (e.g. one round trip to a store for all of them), answering or
    //  forwarding on contexts kept with gw_stage_dup. May be NULL.
    void (*flush) (void *state);
} gw_stage_class_t;

//  Most sockets one stage may list (sockets callback).
#define GW_STAGE_SOCKETS_MAX 4

//  The stages one actor runs: add each, then zactor_new (gw_stage_actor,
//  host), which takes the host and every state in it.
gw_stage_host_t *gw_stage_host_new (void);
void gw_stage_host_destroy (gw_stage_host_t **self_p);
//  Add a stage (takes state). At most 8, each service once.
void gw_stage_host_add (gw_stage_host_t *self, const gw_stage_class_t *cls, void *state);

//  The actor.
void gw_stage_actor (zsock_t *pipe, void *args);

//  During a request callback, or on a context from gw_stage_dup: the
//  session holding the request (answer, error, credit and cancellation go
//  there).
gw_worker_t *gw_stage_session (gw_stage_t *stage);

//  Keep a request's context past its callback (a request parked until
//  something else happens): a copy of stage, which the caller owns and
//  frees with gw_stage_destroy. Valid until the actor ends; the request
//  itself stays the session's until answered or forwarded (or cancelled:
//  check gw_worker_cancelled (gw_stage_session (copy), rid) first).
gw_stage_t *gw_stage_dup (gw_stage_t *stage);

//  Free a context from gw_stage_dup; nulls the reference. Idempotent.
void gw_stage_destroy (gw_stage_t **self_p);

//  Hand request on along its slip: to the next stage directly when this
//  actor hosts it (gw_worker_pass), else FORWARD through the broker
//  (gw_worker_forward). The caller keeps request and envelope. Works on a
//  context from gw_stage_dup too (later, from input or tick). Returns 0,
//  or -1 as gw_worker_forward.
int gw_stage_forward (gw_stage_t *stage, gw_msg_t *request, gw_envelope_t *envelope);

//  The request's envelope, into own: copied from the stage before when the
//  request was handed over in this actor (its live envelope: no encoding
//  and decoding at a direct hand-off), else decoded from its frame.
//  Returns 0, or -1 if the envelope is missing or malformed.
int gw_stage_envelope (gw_msg_t *request, gw_envelope_t *own);

//  Self test of this class.
void gw_stage_test (bool verbose);

#endif
