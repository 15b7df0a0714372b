//  --------------------------------------------------------------------------
//  gw_dispatch — the broker's scheduling core (PROTOCOL.md §3.1, §3.4, §3.5):
//  services, workers, credit, FIFO wait queues and the in-flight map, with no
//  sockets and no clock of its own.
//
//  The broker actor calls one operation per event (a READY, a REQUEST, a
//  worker's FINAL, a tick of the clock…), passing the current time, and then
//  executes the actions the operation produced, in order:
//
//    GW_DISPATCH_SEND    send action->payload (the REQUEST) to action->worker
//    GW_DISPATCH_FINAL   answer action->client with a broker FINAL
//                        (action->status, action->code) for action->rid
//    GW_DISPATCH_CANCEL  send CANCEL (action->rid, reason action->status)
//                        to action->worker
//
//  Clients and workers are opaque, non-NULL handles chosen by the caller (the
//  actor uses its peer records). A payload is an opaque pointer owned by the
//  dispatcher from the moment an operation accepts it until the request ends;
//  it is then released with the destructor set by gw_dispatch_set_destructor.
//
//  Every operation (every function below that takes a rid, a worker or the
//  time) first empties the action list; actions (and the payload pointers in
//  them) stay valid until the next operation. Not thread safe: one actor owns a dispatcher.

#ifndef GW_DISPATCH_H_INCLUDED
#define GW_DISPATCH_H_INCLUDED

#include <czmq.h>
#include <msgpack.h>
#include <stdint.h>
#include <stdbool.h>
#include "gw_msg.h"

typedef struct _gw_dispatch_t gw_dispatch_t;

//  Action types
#define GW_DISPATCH_SEND 1
#define GW_DISPATCH_FINAL 2
#define GW_DISPATCH_CANCEL 3

//  Defaults (PROTOCOL.md §3.1)
#define GW_DISPATCH_QUEUE_MAX 1024
#define GW_DISPATCH_GRACE 3000

//  One outcome for the actor to execute. A value type: the array returned by
//  gw_dispatch_actions belongs to the dispatcher.
typedef struct {
    int type;  //  GW_DISPATCH_SEND / _FINAL / _CANCEL
    uint8_t rid[16];  //  the request
    void *client;  //  client handle of the request
    void *worker;  //  SEND, CANCEL: the worker; FINAL: NULL
    void *payload;  //  SEND: the request payload; else NULL
    uint16_t status;  //  FINAL: status; CANCEL: reason
    const char *code;  //  FINAL: error code (static string)
    char service[GW_SERVICE_MAX + 1];  //  the service the request was for
} gw_dispatch_action_t;

//  Payload destructor: frees *payload_p and nulls it.
typedef void (gw_dispatch_free_fn) (void **payload_p);

//  Create an empty dispatcher (queue_max 1024, grace 3000 ms, no payload
//  destructor).
gw_dispatch_t *gw_dispatch_new (void);

//  Destroy the dispatcher, releasing every payload it holds; nulls the
//  caller's reference. Produces no actions.
void gw_dispatch_destroy (gw_dispatch_t **self_p);

//  Bound of each service's wait queue (≥ 0; 0 means requests that cannot be
//  dispatched at once get 503). Applies to later arrivals.
void gw_dispatch_set_queue_max (gw_dispatch_t *self, size_t queue_max);

//  How long a request may wait for a service that has no worker at all, ms.
void gw_dispatch_set_grace (gw_dispatch_t *self, int64_t grace_ms);

//  Function that releases payloads (NULL: payloads are not released).
void gw_dispatch_set_destructor (gw_dispatch_t *self, gw_dispatch_free_fn *destructor);

//  A worker sent READY for service with capacity (≥ 1) and flags. A known
//  worker re-registering for the same service gets the new capacity, flags
//  and label; for another service it is removed first (as by
//  gw_dispatch_worker_remove) and then added. May produce SEND actions (its
//  service's queue is served) and, for a changed service, the removal's
//  actions. now is unix ms. Returns 0.
int gw_dispatch_worker_ready (gw_dispatch_t *self, void *worker, const char *service,
    uint32_t capacity, bool idempotent, const char *label, int64_t now);

//  A worker expired, disconnected or became unreachable. Each of its
//  requests: cancelled ones are dropped; if the worker is idempotent and no
//  PARTIAL was relayed, the request is re-queued at the head of its service
//  queue (oldest first; FINAL 503 if the queue is full) and may be
//  dispatched at once; otherwise FINAL 502. Returns 0, or -1 if the worker is
//  unknown (no actions).
int gw_dispatch_worker_remove (gw_dispatch_t *self, void *worker, int64_t now);

//  A client's REQUEST for rid to service, with an absolute deadline (unix
//  ms, 0 = none). Returns -1 if rid is already in flight (the caller keeps
//  payload; the frame set should be dropped). Otherwise takes payload and
//  returns 0 with exactly one of: SEND (a worker had free credit), FINAL 504
//  (deadline already passed), FINAL 503 queue_full, or nothing (queued).
int gw_dispatch_request (gw_dispatch_t *self, const uint8_t rid[16], void *client,
    const char *service, int64_t deadline, void *payload, int64_t now);

//  A worker's FORWARD of rid to service: ends the worker's part (frees its
//  credit, serves its service's queue) and then places the request for the
//  new service on behalf of the same client, as gw_dispatch_request does,
//  with the new deadline and payload. If the request was cancelled it just
//  ends. Returns -1 if rid is not in flight on this worker (the caller keeps
//  payload); else takes payload and returns 0.
int gw_dispatch_forward (gw_dispatch_t *self, const uint8_t rid[16], void *worker,
    const char *service, int64_t deadline, void *payload, int64_t now);

//  A worker's FINAL for rid: frees its credit, ends the request and serves
//  the service queue (SEND actions). Returns 1 if the FINAL must be relayed
//  to *client_p, 0 if not (the request was cancelled), -1 if rid is not in
//  flight on this worker (drop it; no actions).
int gw_dispatch_final (gw_dispatch_t *self, const uint8_t rid[16], void *worker,
    void **client_p, int64_t now);

//  A worker's PARTIAL for rid. Returns 1 if it must be relayed to *client_p
//  (the request is marked as having streamed: it will not be re-queued), 0
//  if the request was cancelled (drop it), -1 if rid is not in flight on this
//  worker. Produces no actions.
int gw_dispatch_partial (
    gw_dispatch_t *self, const uint8_t rid[16], void *worker, void **client_p);

//  A client's CREDIT for rid: returns the worker to relay it to, or NULL if
//  rid is not dispatched for this client (or was cancelled). No actions.
void *gw_dispatch_credit (gw_dispatch_t *self, const uint8_t rid[16], void *client);

//  A client's CANCEL for rid with reason (499, 504). A queued request is
//  removed; a dispatched one is marked cancelled and a CANCEL action goes to
//  its worker (whose FINAL will then not be relayed). Returns 0, or -1 if
//  rid is not in flight for this client.
int gw_dispatch_cancel (
    gw_dispatch_t *self, const uint8_t rid[16], void *client, uint16_t reason);

//  A client expired or disconnected: all its requests are cancelled (reason
//  499), as gw_dispatch_cancel does. Returns the number of requests.
size_t gw_dispatch_client_gone (gw_dispatch_t *self, void *client);

//  Advance the clock: queued requests past their deadline get FINAL 504;
//  queued requests of a service without workers for grace get FINAL 503.
void gw_dispatch_tick (gw_dispatch_t *self, int64_t now);

//  The service rid is in flight for (queued or dispatched), or NULL. The
//  string is valid until the next operation. No actions.
const char *gw_dispatch_service (gw_dispatch_t *self, const uint8_t rid[16]);

//  The client handle rid is in flight for, or NULL. No actions.
void *gw_dispatch_client (gw_dispatch_t *self, const uint8_t rid[16]);

//  The actions of the last operation; *actions_p is set to the array.
size_t gw_dispatch_actions (gw_dispatch_t *self, gw_dispatch_action_t **actions_p);

//  Requests in flight (queued and dispatched).
size_t gw_dispatch_size (gw_dispatch_t *self);

//  Requests queued in all services.
size_t gw_dispatch_queued_total (gw_dispatch_t *self);

//  Requests queued for service (0 if unknown).
size_t gw_dispatch_queued (gw_dispatch_t *self, const char *service);

//  Registered workers of service (0 if unknown).
size_t gw_dispatch_workers (gw_dispatch_t *self, const char *service);

//  In-flight count of a worker, or -1 if the worker is unknown.
int gw_dispatch_in_flight (gw_dispatch_t *self, void *worker);

//  Pack the services as the msgpack array of gw.services (PROTOCOL.md §5):
//  [{name, workers, capacity, in_flight, queued, idempotent, labels}].
void gw_dispatch_describe (gw_dispatch_t *self, msgpack_packer *pk);

//  Self test of this class, including a differential test against a naive
//  model (AIGW_SEED selects the seed).
void gw_dispatch_test (bool verbose);

#endif
