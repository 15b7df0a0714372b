//  --------------------------------------------------------------------------
//  gw_client — the GWP/1 client session, used by the edge's I/O actor (and
//  by tests and tools) to send requests through the broker and receive their
//  PARTIALs and FINAL (PROTOCOL.md §3).
//
//  Per request (explicit table in gw_client.c):
//
//    state       event                 action                       next
//    ----------  --------------------  ---------------------------  --------
//    pending     PARTIAL               deliver                      streaming
//    pending     FINAL                 deliver, forget              -
//    streaming   PARTIAL               deliver                      streaming
//    streaming   FINAL                 deliver, forget              -
//    any         cancel (by caller)    CANCEL to broker, forget     -
//    any         deadline passed       CANCEL(504), local FINAL 504 -
//    any         broker lost           local FINAL 502              -
//
//  Connection: PING when nothing was sent, or nothing heard, for heartbeat;
//  broker silent for expiry, a DISCONNECT, or the socket monitor reporting
//  the connection dropped = lost: every request in flight completes with a
//  local FINAL 502 (code broker_lost) and the session reconnects on a fresh
//  socket (back-off as gw_worker).
//  Messages for unknown rids (late, after cancel/deadline) are dropped.
//
//  Threading: one thread owns the session.

#ifndef GW_CLIENT_H_INCLUDED
#define GW_CLIENT_H_INCLUDED

#include <czmq.h>
#include <stdint.h>
#include <stdbool.h>

typedef struct _gw_client_t gw_client_t;
typedef struct _gw_msg_t gw_msg_t;

//  Create a session connected to the broker at endpoint. NULL on bad endpoint.
gw_client_t *gw_client_new (const char *endpoint);

//  Destroy; requests in flight are cancelled (CANCEL 499 sent) first.
void gw_client_destroy (gw_client_t **self_p);

//  Options (defaults 1000/3000 ms, 1000/32000 ms).
void gw_client_set_heartbeat (gw_client_t *self, int heartbeat_ms, int expiry_ms);
void gw_client_set_reconnect (gw_client_t *self, int min_ms, int max_ms);
void gw_client_set_body_max (gw_client_t *self, size_t body_max);

//  The socket to poll; replaced on reconnect (fetch before every poll).
zsock_t *gw_client_socket (gw_client_t *self);

//  Send a REQUEST (id, rid, service, deadline, window, flags, envelope and
//  body set by the caller). Takes ownership of *request_p in every case.
//  Returns 0, or -1 if it could not be sent (duplicate rid in flight, the
//  session is waiting out a reconnect back-off, or the socket refused it,
//  e.g. at the high-water mark) — the request is not tracked then. While
//  the session is connecting (just created, or reconnecting) requests are
//  held in order, at most 10000, and leave as soon as the link is up; they
//  are tracked like any other (504 at the deadline, 502 if the broker is
//  lost). A request already past its deadline completes at once with a
//  local FINAL 504 and is not sent.
int gw_client_send (gw_client_t *self, gw_msg_t **request_p);

//  Send a fire-and-forget batch (billing's settles, the edge's releases,
//  STAGES.md §6.3): a REQUEST for service with a fresh rid, an envelope of
//  slip [service], ann.op op and a deadline deadline_ms from now, and body
//  {key: [count items]}, the items being the size packed msgpack bytes at
//  items (copied). Returns gw_client_send's result.
int gw_client_send_batch (gw_client_t *self, const char *service, const char *op,
    const char *key, const void *items, size_t size, uint32_t count, int deadline_ms);

//  Cancel a request in flight (reason 499 or 504) and forget it.
int gw_client_cancel (gw_client_t *self, const uint8_t rid[16], uint16_t reason);

//  Grant a streaming request credit more PARTIALs.
int gw_client_credit (gw_client_t *self, const uint8_t rid[16], uint32_t credit);

//  Non-blocking: the next PARTIAL or FINAL for a request in flight (the
//  caller destroys it), including local FINALs (504 deadline, 502 broker
//  lost), or NULL. A FINAL ends the request.
gw_msg_t *gw_client_recv (gw_client_t *self);

//  Run timers: heartbeat, expiry, deadlines. Call at least every
//  gw_client_timeout () ms.
void gw_client_tick (gw_client_t *self);

//  Milliseconds until the next timer is due.
int gw_client_timeout (gw_client_t *self);

//  Blocking convenience: wait up to timeout_ms for the next PARTIAL/FINAL.
gw_msg_t *gw_client_wait (gw_client_t *self, int timeout_ms);

//  Requests in flight.
size_t gw_client_in_flight (gw_client_t *self);

//  True once the broker has answered since the last (re)connect.
bool gw_client_connected (gw_client_t *self);

//  Self test of this class.
void gw_client_test (bool verbose);

#endif
