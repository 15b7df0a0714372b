//  --------------------------------------------------------------------------
//  gw_broker — the GWP/1 broker actor (PROTOCOL.md): one ROUTER socket (the
//  bus) that workers and clients connect to, one XPUB socket (the tap), and
//  the scheduling core gw_dispatch.
//
//  Start it with zactor_new (gw_broker_actor, NULL); it signals when ready.
//  Commands on the pipe (string frames):
//
//    BIND endpoint         bind the bus; replies one string frame: the bound
//                          endpoint (tcp://127.0.0.1:* gets its real port),
//                          or "" on failure. May be sent more than once.
//    TAP endpoint          bind the tap (XPUB); same reply as BIND.
//    CONFIGURE key value   set queue_max, heartbeat (ms), expiry (ms), grace
//                          (ms) or body_max (bytes); replies a signal:
//                          0 done, 1 unknown key or bad value.
//    VERBOSE               log routing decisions at debug level.
//    STATS                 replies one string frame of key=value counters:
//                          peers workers inflight queued malformed dropped
//                          tap_subs tap_seq.
//    $TERM                 end the actor (zactor_destroy sends it).
//
//  Threading: everything runs on the actor's thread.

#ifndef GW_BROKER_H_INCLUDED
#define GW_BROKER_H_INCLUDED

#include <czmq.h>
#include <stdbool.h>

//  The broker actor. args is unused (NULL).
void gw_broker_actor (zsock_t *pipe, void *args);

//  Self test of this class.
void gw_broker_test (bool verbose);

#endif
