//  --------------------------------------------------------------------------
//  gw_worker — the GWP/1 worker session: what every stage (and the C test
//  worker) uses to serve one service on the bus (PROTOCOL.md §3).
//
//  State machine (explicit table in gw_worker.c):
//
//    state        event             action                         next
//    -----------  ----------------  -----------------------------  ----------
//    connecting   (enter)           new socket, connect            connecting
//    connecting   greet             READY (retried every 10 ms     ready
//                                   until the handshake is done)
//    ready        any input         liveness = now                 ready
//    ready        PING              PONG                           ready
//    ready        DISCONNECT        close socket, back off         waiting
//    ready        expired           close socket, back off         waiting
//    ready        heartbeat         PING if nothing sent, or       ready
//                                   nothing heard, for heartbeat
//    ready        link lost         close socket, back off         waiting
//                 (socket monitor DISCONNECTED after CONNECTED)
//    waiting      backoff elapsed   -                              connecting
//
//  Back-off doubles from reconnect_min to reconnect_max and resets after the
//  broker has answered. A reconnect abandons requests in flight (their
//  clients get 502 from the broker's expiry).
//
//  Requests: the session tracks each REQUEST it hands out (rid -> stream
//  window, next PARTIAL sequence, cancelled) until the application answers it
//  with FINAL or FORWARD. Stream credit is enforced here: gw_worker_partial
//  refuses (GW_AGAIN) when the request's window is exhausted.
//
//  Threading: one thread (the stage's actor) owns the session.

#ifndef GW_WORKER_H_INCLUDED
#define GW_WORKER_H_INCLUDED

#include <czmq.h>
#include <stdint.h>
#include <stdbool.h>

typedef struct _gw_worker_t gw_worker_t;
typedef struct _gw_msg_t gw_msg_t;
typedef struct _gw_envelope_t gw_envelope_t;

//  Create a session for service on the broker at endpoint (e.g.
//  "tcp://127.0.0.1:5555") with capacity concurrent requests and READY
//  flags (GW_READY_IDEMPOTENT). Connects at once. Returns NULL if the
//  arguments are invalid.
gw_worker_t *gw_worker_new (
    const char *endpoint, const char *service, uint32_t capacity, uint32_t flags);

//  Send DISCONNECT, close the socket, free everything; nulls the reference.
void gw_worker_destroy (gw_worker_t **self_p);

//  Options (call before the first recv; defaults 1000/3000 ms, 1000/32000 ms,
//  label "host:pid", body max GW_BODY_MAX_DEFAULT). new connects at once but
//  READY leaves from the first recv/tick/wait, so label and capacity set
//  here are in it; the ZMTP heartbeat options apply from the next socket.
void gw_worker_set_heartbeat (gw_worker_t *self, int heartbeat_ms, int expiry_ms);
void gw_worker_set_reconnect (gw_worker_t *self, int min_ms, int max_ms);
void gw_worker_set_label (gw_worker_t *self, const char *label);
void gw_worker_set_body_max (gw_worker_t *self, size_t body_max);

//  The socket to poll for input. It is replaced on reconnect, so fetch it
//  again before every poll. Never NULL after gw_worker_new.
zsock_t *gw_worker_socket (gw_worker_t *self);

//  Non-blocking: process all input available now (PING, PONG, DISCONNECT are
//  handled here) and return the next message for the application, or NULL.
//  REQUEST: the caller owns it and must answer it with gw_worker_final /
//  gw_worker_error / gw_worker_forward. CANCEL: the client went away or the
//  deadline passed; stop and answer FINAL 499 (or any FINAL). CREDIT: the
//  request's stream window grew (already accounted; informational). The
//  caller destroys the returned message.
gw_msg_t *gw_worker_recv (gw_worker_t *self);

//  Run timers: heartbeat, expiry, reconnect. Call at least every
//  gw_worker_timeout () ms.
void gw_worker_tick (gw_worker_t *self);

//  Milliseconds until the next timer is due (0..heartbeat).
int gw_worker_timeout (gw_worker_t *self);

//  Blocking convenience for simple workers: wait up to timeout_ms (-1 =
//  forever) for the next message, running timers. NULL on timeout or when
//  interrupted (zsys_interrupted).
gw_msg_t *gw_worker_wait (gw_worker_t *self, int timeout_ms);

//  Send one PARTIAL (size bytes copied) for a request in flight. Returns
//  GW_OK, GW_AGAIN if the stream window is exhausted (nothing sent: wait for
//  CREDIT), or GW_ERROR if the rid is unknown, not a stream, or cancelled.
int gw_worker_partial (
    gw_worker_t *self, const uint8_t rid[16], const void *data, size_t size);

//  The same, with an envelope (PROTOCOL.md §2: PARTIAL frame 5) sent with
//  this PARTIAL, e.g. response headers on the first one. envelope_p may be
//  NULL. Same returns; on GW_OK the session has taken *envelope_p (and
//  nulled it; one over GW_ENVELOPE_MAX is dropped, the PARTIAL still sent),
//  otherwise the caller keeps it (to send with the PARTIAL after CREDIT).
int gw_worker_partial_env (gw_worker_t *self, const uint8_t rid[16], const void *data,
    size_t size, zframe_t **envelope_p);

//  Send the FINAL for a request (takes ownership of *envelope_p and *body_p,
//  either may be NULL, in every case) and forget the request. Returns 0, or
//  -1 if the rid is unknown (e.g. abandoned by a reconnect) — nothing is sent
//  then — or if the socket refused the frame set (the request is forgotten).
int gw_worker_final (gw_worker_t *self, const uint8_t rid[16], uint16_t status,
    zframe_t **envelope_p, zframe_t **body_p);

//  FINAL with an OpenAI error object as body:
//  {"error":{"message","type","param":nil,"code"}}. code may be NULL.
int gw_worker_error (gw_worker_t *self, const uint8_t rid[16], uint16_t status,
    const char *type, const char *code, const char *message);

//  FORWARD a request to the next service of its slip: advances the cursor of
//  envelope, appends this stage's timing (the slip's service at the cursor,
//  µs at REQUEST receipt or at the gw_worker_pass that brought it, µs now), encodes it, sends FORWARD with the request's rid, deadline,
//  window, flags and body (shared, not copied), and forgets the request.
//  The caller keeps ownership of request and envelope. Returns 0, or -1 if
//  the slip has no next service or the rid is unknown.
int gw_worker_forward (gw_worker_t *self, gw_msg_t *request, gw_envelope_t *envelope);

//  Co-location (DESIGN.md §8): hand a request in flight to the next stage
//  of its slip that runs in this same thread, instead of FORWARDing it
//  through the broker. Advances the cursor and appends this stage's timing
//  like gw_worker_forward, writes the next service into request and the
//  envelope as its live envelope (gw_msg_set_live_envelope: not encoded;
//  the caller keeps envelope unchanged until the next stage is done with
//  the request), and keeps the request: the next stage answers or forwards
//  it on this session. Returns 0, or -1 if the slip has no next service or
//  the rid is unknown (nothing changed then).
int gw_worker_pass (gw_worker_t *self, gw_msg_t *request, gw_envelope_t *envelope);

//  PARTIALs the request may send now (UINT32_MAX when unlimited), 0 for an
//  unknown rid.
uint32_t gw_worker_credit (gw_worker_t *self, const uint8_t rid[16]);

//  True if a CANCEL arrived for this request (or it is unknown).
bool gw_worker_cancelled (gw_worker_t *self, const uint8_t rid[16]);

//  Requests handed out and not yet answered.
size_t gw_worker_in_flight (gw_worker_t *self);

//  True once the broker has answered since the last (re)connect.
bool gw_worker_connected (gw_worker_t *self);

//  How many times the session has (re)connected (1 after the first connect).
uint64_t gw_worker_connects (gw_worker_t *self);

//  Self test of this class.
void gw_worker_test (bool verbose);

#endif
