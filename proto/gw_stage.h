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
//  every hosted stage's session), CONFIGURE capacity|heartbeat|expiry value
//  (signal; applies to every hosted stage, before CONNECT), CONFIGURE of a
//  stage's own key, RELOAD (signal: 1 if any stage failed), VERBOSE, $TERM.
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
    //  Free the state.
    void (*destroy) (void **state_p);
} gw_stage_class_t;

//  The stages one actor runs: add each, then zactor_new (gw_stage_actor,
//  host), which takes the host and every state in it.
gw_stage_host_t *gw_stage_host_new (void);
void gw_stage_host_destroy (gw_stage_host_t **self_p);
//  Add a stage (takes state). At most 8, each service once.
void gw_stage_host_add (gw_stage_host_t *self, const gw_stage_class_t *cls, void *state);

//  The actor.
void gw_stage_actor (zsock_t *pipe, void *args);

//  During a request callback: the session holding the request (answer,
//  error, credit and cancellation go there).
gw_worker_t *gw_stage_session (gw_stage_t *stage);

//  Hand request on along its slip: to the next stage directly when this
//  actor hosts it (gw_worker_pass), else FORWARD through the broker
//  (gw_worker_forward). The caller keeps request and envelope. Returns 0,
//  or -1 as gw_worker_forward.
int gw_stage_forward (gw_stage_t *stage, gw_msg_t *request, gw_envelope_t *envelope);

//  Self test of this class.
void gw_stage_test (bool verbose);

#endif
