//  --------------------------------------------------------------------------
//  gw_broker — the GWP/1 broker actor.
//
//  Design note. The broker reads plain frames only (gw_msg decodes them; the
//  envelope and body are relayed by reference, never decoded). Its state:
//
//    peers     routing id -> peer record (role, worker service, liveness).
//              A peer becomes known by READY (a worker) or by any frame set
//              a client may send (PROTOCOL.md §3.5.3). A peer can be both.
//    dispatch  gw_dispatch: services, workers, credit, queues and the
//              in-flight map keyed by rid. The broker feeds it one
//              operation per frame set and executes the actions it returns.
//
//  Invariants: a peer record outlives every in-flight entry that refers to
//  it (a peer is removed from gw_dispatch, as worker and as client, before
//  it is freed); a peer we fail to send to (ROUTER_MANDATORY: EHOSTUNREACH,
//  or its pipe is full) is marked dead at once, skipped by later actions, and
//  removed ("reaped") after the current frame set is handled, never in the
//  middle of executing actions.
//
//  Rates: tens of thousands of frame sets a second. The loop drains every
//  ready frame set (bounded batches) before sleeping; nothing is logged per
//  message at info level; the request frame set a client sent is kept as
//  the payload and re-sent to the worker by reference (no body copies); the
//  tap costs nothing while nobody subscribes (a counter of subscriptions,
//  kept from XPUB_VERBOSER notifications) and never blocks (bounded SNDHWM,
//  ZMQ_DONTWAIT, drops for slow subscribers).
//
//  Failure behaviour: malformed frame sets are dropped and counted (logged
//  at most once a second per peer); a client's malformed frame set with a
//  readable rid gets FINAL 400. Nothing here asserts on network input.
//  Timers: peers idle for heartbeat get PING; peers silent for expiry are
//  removed (their requests re-queued, failed or cancelled by gw_dispatch);
//  while requests are queued, gw_dispatch_tick runs every 10 ms for
//  deadlines (504) and grace (503).

#include "aigw.h"
#include "gw_dispatch.h"
#include "gw_broker.h"
#include <poll.h>

#define BROKER_TICK_MS 10  //  tick period while requests are queued
#define BROKER_BATCH 1024  //  frame sets handled per wake-up before the pipe
#define BROKER_HWM 100000
#define BROKER_TAP_HWM 10000

//  Routing id as a hash key.
typedef struct {
    size_t size;  //  bytes used, 1..255
    byte data[256];  //  the routing id bytes
} peer_key_t;

typedef struct {
    peer_key_t key;  //  routing id, the hash key
    zframe_t *routing_id;  //  the same, as a frame for sending
    bool worker;  //  sent READY: a registered worker
    char service[GW_SERVICE_MAX + 1];  //  worker: its service
    int64_t last_recv;  //  mono ms of the last frame set from it
    int64_t last_send;  //  mono ms of the last frame set to it
    int64_t last_complaint;  //  mono ms of the last malformed log line
    bool dead;  //  unreachable or gone; reap pending
} peer_t;

typedef struct {
    zsock_t *pipe;  //  actor pipe
    zsock_t *router;  //  the bus
    zsock_t *tap;  //  XPUB, or NULL until TAP
    gw_dispatch_t *dispatch;  //  scheduling core
    zhashx_t *peers;  //  peer_key_t -> peer_t
    peer_t **dead;  //  peers to reap
    size_t dead_count;  //  used
    size_t dead_limit;  //  allocated
    gw_msg_t *msg;  //  receive buffer (handed to dispatch as payload)
    gw_msg_t *out;  //  broker-made frame sets
    msgpack_sbuffer sbuf;  //  FINAL bodies
    size_t body_max;  //  largest body accepted, bytes
    int heartbeat;  //  ms of silence before we PING a peer
    int expiry;  //  ms of silence before we drop a peer
    int64_t started;  //  mono ms at start, for uptime
    int64_t next_heartbeat;  //  mono ms of the next liveness pass
    int64_t next_tick;  //  mono ms of the next dispatch tick
    int64_t last_complaint;  //  mono ms of the last log about an unknown peer
    int tap_subs;  //  live subscriptions on the tap
    uint64_t tap_seq;  //  last tap sequence number
    uint64_t malformed;  //  malformed frame sets received
    uint64_t dropped;  //  frame sets dropped (unknown rid, duplicate…)
    char name[128];  //  broker name in gw.services (host:pid)
    bool verbose;  //  debug logging of routing
    bool terminated;  //  $TERM received
} broker_t;

//  --------------------------------------------------------------------------
//  Peer table

static size_t
s_key_hash (const void *key)
{
    const peer_key_t *k = (const peer_key_t *)key;
    uint64_t hash = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < k->size; i++)
        hash = (hash ^ k->data[i]) * 0x100000001b3ULL;
    return (size_t)hash;
}

static int
s_key_compare (const void *item1, const void *item2)
{
    const peer_key_t *a = (const peer_key_t *)item1, *b = (const peer_key_t *)item2;
    if (a->size != b->size)
        return a->size < b->size ? -1 : 1;
    return memcmp (a->data, b->data, a->size);
}

//  Fill key from a routing id frame. Returns -1 if it is not a usable id.
static int
s_key_set (peer_key_t *key, zframe_t *routing_id)
{
    if (!routing_id || zframe_size (routing_id) == 0 ||
        zframe_size (routing_id) > sizeof (key->data))
        return -1;
    key->size = zframe_size (routing_id);
    memcpy (key->data, zframe_data (routing_id), key->size);
    return 0;
}

static peer_t *
s_peer_lookup (broker_t *self, zframe_t *routing_id)
{
    peer_key_t key;
    if (s_key_set (&key, routing_id))
        return NULL;
    return (peer_t *)zhashx_lookup (self->peers, &key);
}

static peer_t *
s_peer_new (broker_t *self, zframe_t *routing_id, int64_t now)
{
    peer_t *peer = (peer_t *)zmalloc (sizeof (peer_t));
    assert (peer);
    if (s_key_set (&peer->key, routing_id)) {
        free (peer);
        return NULL;
    }
    peer->routing_id = zframe_dup (routing_id);
    peer->last_recv = now;
    peer->last_send = now;
    zhashx_insert (self->peers, &peer->key, peer);
    return peer;
}

//  Mark a peer gone; it is removed by s_reap.
static void
s_peer_kill (broker_t *self, peer_t *peer)
{
    if (peer->dead)
        return;
    peer->dead = true;
    if (self->dead_count == self->dead_limit) {
        self->dead_limit = self->dead_limit ? self->dead_limit * 2 : 16;
        self->dead =
            (peer_t **)realloc (self->dead, self->dead_limit * sizeof (peer_t *));
        assert (self->dead);
    }
    self->dead[self->dead_count++] = peer;
}

//  --------------------------------------------------------------------------
//  Sending

//  Send msg to peer. A failure (peer gone, or its pipe full) kills the peer.
static int
s_send (broker_t *self, peer_t *peer, gw_msg_t *msg)
{
    if (peer->dead)
        return -1;
    gw_msg_set_routing_id (msg, peer->routing_id);
    if (gw_msg_send (msg, self->router) == 0) {
        peer->last_send = gw_mono_ms ();
        return 0;
    }
    if (self->verbose)
        gw_debug ("send failed (%s): peer gone", zmq_strerror (zmq_errno ()));
    s_peer_kill (self, peer);
    return -1;
}

//  Send a frame set with no fields to a routing id (DISCONNECT to a peer we
//  do not know).
static void
s_send_bare (broker_t *self, zframe_t *routing_id, int id)
{
    gw_msg_set_id (self->out, id);
    gw_msg_set_routing_id (self->out, routing_id);
    gw_msg_set_role (self->out, 0);
    gw_msg_send (self->out, self->router);
}

//  Publish one tap message (PROTOCOL.md §7), only while someone listens.
static void
s_tap (broker_t *self, const char *service, int id, const uint8_t *rid, size_t size,
    uint16_t status)
{
    if (!self->tap || self->tap_subs <= 0)
        return;
    char topic[GW_SERVICE_MAX + 16];
    int length = snprintf (topic, sizeof (topic), "%s.%s", service, gw_msg_command (id));
    if (length < 0 || (size_t)length >= sizeof (topic))
        return;
    byte head[40];
    uint64_t seq = ++self->tap_seq;
    uint64_t time_us = (uint64_t)gw_time_us ();
    for (int i = 0; i < 8; i++) {
        head[i] = (byte)(seq >> (56 - 8 * i));
        head[8 + i] = (byte)(time_us >> (56 - 8 * i));
    }
    if (rid)
        memcpy (head + 16, rid, 16);
    else
        memset (head + 16, 0, 16);
    uint32_t size32 = size > UINT32_MAX ? UINT32_MAX : (uint32_t)size;
    head[32] = (byte)(size32 >> 24);
    head[33] = (byte)(size32 >> 16);
    head[34] = (byte)(size32 >> 8);
    head[35] = (byte)size32;
    head[36] = (byte)(status >> 8);
    head[37] = (byte)status;
    head[38] = head[39] = 0;
    void *handle = zsock_resolve (self->tap);
    if (zmq_send (handle, topic, (size_t)length, ZMQ_SNDMORE | ZMQ_DONTWAIT) == length)
        zmq_send (handle, head, sizeof (head), ZMQ_DONTWAIT);
}

static size_t
s_body_size (gw_msg_t *msg)
{
    zframe_t *body = gw_msg_body (msg);
    return body ? zframe_size (body) : 0;
}

//  Send a broker FINAL with body in self->sbuf to client; tap it as
//  service.FINAL.
static void
s_send_final (broker_t *self, peer_t *client, const uint8_t rid[16], uint16_t status,
    const char *service)
{
    gw_msg_set_id (self->out, GW_MSG_FINAL);
    gw_msg_set_rid (self->out, rid);
    gw_msg_set_status (self->out, status);
    gw_msg_set_envelope (self->out, NULL);
    zframe_t *body = zframe_new (self->sbuf.data, self->sbuf.size);
    gw_msg_set_body (self->out, &body);
    s_send (self, client, self->out);
    gw_msg_set_body (self->out, NULL);
    s_tap (self, service, GW_MSG_FINAL, rid, self->sbuf.size, status);
}

//  Send a broker error FINAL (PROTOCOL.md §6): the OpenAI error object.
static void
s_send_error (broker_t *self, peer_t *client, const uint8_t rid[16], uint16_t status,
    const char *code, const char *service, const char *detail)
{
    char message[256];
    if (streq (code, "queue_full"))
        snprintf (message, sizeof (message), "service '%s' is busy and its queue is full",
            service);
    else if (streq (code, "no_worker"))
        snprintf (message, sizeof (message), "no worker for service '%s'", service);
    else if (streq (code, "deadline_exceeded"))
        snprintf (message, sizeof (message),
            "deadline passed while waiting for service '%s'", service);
    else if (streq (code, "worker_lost"))
        snprintf (message, sizeof (message),
            "the worker of service '%s' was lost with the request in flight", service);
    else if (streq (code, "unknown_service"))
        snprintf (message, sizeof (message), "unknown broker service '%s'", service);
    else if (streq (code, "duplicate_request_id"))
        snprintf (message, sizeof (message),
            "another request with this id is in flight (service '%s')", service);
    else
        snprintf (message, sizeof (message), "malformed frame set: %s",
            detail ? detail : "invalid");
    msgpack_sbuffer_clear (&self->sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &self->sbuf, msgpack_sbuffer_write);
    gw_msg_error_pack (&pk, "gateway_error", code, message);
    s_send_final (self, client, rid, status, service);
}

//  Answer a request to a broker-answered service (PROTOCOL.md §5).
static void
s_answer_service (
    broker_t *self, peer_t *client, const uint8_t rid[16], const char *service)
{
    if (!streq (service, "gw.services")) {
        s_send_error (self, client, rid, 404, "unknown_service", service, NULL);
        return;
    }
    msgpack_sbuffer_clear (&self->sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &self->sbuf, msgpack_sbuffer_write);
    msgpack_pack_map (&pk, 3);
    gw_mpack_str (&pk, "broker");
    gw_mpack_str (&pk, self->name);
    gw_mpack_str (&pk, "uptime_ms");
    msgpack_pack_uint64 (&pk, (uint64_t)(gw_mono_ms () - self->started));
    gw_mpack_str (&pk, "services");
    gw_dispatch_describe (self->dispatch, &pk);
    s_send_final (self, client, rid, 200, service);
}

//  Execute the actions of the last gw_dispatch operation. tap_cancels: tap
//  the CANCELs (they originate here, not from a client's CANCEL).
static void
s_execute (broker_t *self, bool tap_cancels)
{
    gw_dispatch_action_t *actions;
    size_t count = gw_dispatch_actions (self->dispatch, &actions);
    for (size_t i = 0; i < count; i++) {
        gw_dispatch_action_t *action = &actions[i];
        switch (action->type) {
            case GW_DISPATCH_SEND: {
                gw_msg_t *request = (gw_msg_t *)action->payload;
                //  A forwarded request goes to its next worker as a REQUEST.
                gw_msg_set_id (request, GW_MSG_REQUEST);
                s_send (self, (peer_t *)action->worker, request);
                break;
            }
            case GW_DISPATCH_FINAL:
                s_send_error (self, (peer_t *)action->client, action->rid, action->status,
                    action->code, action->service, NULL);
                break;
            case GW_DISPATCH_CANCEL:
                gw_msg_set_id (self->out, GW_MSG_CANCEL);
                gw_msg_set_rid (self->out, action->rid);
                gw_msg_set_status (self->out, action->status);
                s_send (self, (peer_t *)action->worker, self->out);
                if (tap_cancels)
                    s_tap (self, action->service, GW_MSG_CANCEL, action->rid, 0, 0);
                break;
            default:
                assert (false);
        }
    }
}

//  Remove dead peers: from dispatch as worker and as client, then the
//  record. Removing one may kill others (sends fail); loop until none.
static void
s_reap (broker_t *self)
{
    int64_t now = gw_time_ms ();
    while (self->dead_count > 0) {
        peer_t *peer = self->dead[--self->dead_count];
        if (peer->worker) {
            if (gw_dispatch_worker_remove (self->dispatch, peer, now) == 0) {
                gw_info ("worker removed service=%s", peer->service);
                s_execute (self, true);
            }
        }
        gw_dispatch_client_gone (self->dispatch, peer);
        s_execute (self, true);
        zhashx_delete (self->peers, &peer->key);
        zframe_destroy (&peer->routing_id);
        free (peer);
    }
}

//  --------------------------------------------------------------------------
//  Input

static gw_msg_t *
s_msg_new (broker_t *self)
{
    gw_msg_t *msg = gw_msg_new (0);
    gw_msg_set_body_max (msg, self->body_max);
    return msg;
}

static void
s_payload_free (void **payload_p)
{
    gw_msg_destroy ((gw_msg_t **)payload_p);
}

//  Complain about something a peer sent, at most once a second per peer.
static void
s_complain (broker_t *self, peer_t *peer, const char *what, const char *why)
{
    int64_t now = gw_mono_ms ();
    int64_t *last = peer ? &peer->last_complaint : &self->last_complaint;
    if (now - *last >= 1000) {
        *last = now;
        gw_warn ("%s from %s peer: %s", what,
            peer ? (peer->worker ? "worker" : "client") : "unknown", why);
    }
}

static void
s_handle_malformed (broker_t *self, peer_t *peer)
{
    gw_msg_t *msg = self->msg;
    const char *reason = gw_msg_reason (msg);
    self->malformed++;
    s_complain (self, peer, "malformed frame set", reason);
    zframe_t *routing_id = gw_msg_routing_id (msg);
    if (streq (reason, "bad signature")) {
        //  Another protocol version, or not GWP at all (§8).
        if (routing_id)
            s_send_bare (self, routing_id, GW_MSG_DISCONNECT);
        return;
    }
    //  A client's frame set (REQUEST, CANCEL, CREDIT) whose rid we can read
    //  gets FINAL 400, unless the rid is in flight (that request must still
    //  end exactly once, so the frame set is only dropped).
    int id = gw_msg_id (msg);
    if (!gw_msg_has_rid (msg) ||
        (id != GW_MSG_REQUEST && id != GW_MSG_CANCEL && id != GW_MSG_CREDIT) ||
        gw_dispatch_service (self->dispatch, gw_msg_rid (msg)))
        return;
    if (!peer)
        peer = s_peer_new (self, routing_id, gw_mono_ms ());
    if (!peer)
        return;
    s_send_error (self, peer, gw_msg_rid (msg), 400, "bad_frame", "gw.malformed", reason);
}

//  The peer must be a registered worker for FORWARD, PARTIAL, FINAL. An
//  unknown peer gets DISCONNECT (§3.5.3); a client is ignored.
static bool
s_require_worker (broker_t *self, peer_t *peer)
{
    if (!peer) {
        s_send_bare (self, gw_msg_routing_id (self->msg), GW_MSG_DISCONNECT);
        return false;
    }
    if (!peer->worker) {
        self->dropped++;
        s_complain (self, peer, "worker command", gw_msg_command (gw_msg_id (self->msg)));
        return false;
    }
    return true;
}

static bool
s_reserved (const char *service)
{
    return strncmp (service, "gw.", 3) == 0;
}

//  Handle one frame set from the bus. False when none was waiting.
static bool
s_handle_bus (broker_t *self)
{
    int rc = gw_msg_recv (self->msg, self->router);
    if (rc == GW_MSG_NONE)
        return false;
    gw_msg_t *msg = self->msg;
    zframe_t *routing_id = gw_msg_routing_id (msg);
    peer_t *peer = s_peer_lookup (self, routing_id);
    int64_t mono = gw_mono_ms ();
    if (peer)
        peer->last_recv = mono;
    if (rc == GW_MSG_MALFORMED) {
        s_handle_malformed (self, peer);
        s_reap (self);
        return true;
    }
    int id = gw_msg_id (msg);
    int64_t now = gw_time_ms ();
    const uint8_t *rid = gw_msg_rid (msg);
    switch (id) {
        case GW_MSG_READY: {
            const char *service = gw_msg_service (msg);
            if (s_reserved (service)) {
                self->malformed++;
                s_complain (self, peer, "READY for a reserved service", service);
                if (peer && peer->worker)
                    s_peer_kill (self, peer);
                s_send_bare (self, routing_id, GW_MSG_DISCONNECT);
                break;
            }
            if (!peer)
                peer = s_peer_new (self, routing_id, mono);
            if (!peer)
                break;
            bool changed = !peer->worker || strcmp (peer->service, service);
            peer->worker = true;
            snprintf (peer->service, sizeof (peer->service), "%s", service);
            gw_dispatch_worker_ready (self->dispatch, peer, service,
                gw_msg_capacity (msg), (gw_msg_flags (msg) & GW_READY_IDEMPOTENT) != 0,
                gw_msg_label (msg), now);
            if (changed)
                gw_info ("worker ready service=%s capacity=%u idempotent=%d label=%s",
                    service, gw_msg_capacity (msg),
                    (gw_msg_flags (msg) & GW_READY_IDEMPOTENT) != 0, gw_msg_label (msg));
            s_tap (self, service, GW_MSG_READY, NULL, 0, 0);
            s_execute (self, true);
            break;
        }
        case GW_MSG_REQUEST: {
            if (!peer)
                peer = s_peer_new (self, routing_id, mono);
            if (!peer)
                break;
            const char *service = gw_msg_service (msg);
            s_tap (self, service, GW_MSG_REQUEST, rid, s_body_size (msg), 0);
            if (s_reserved (service)) {
                s_answer_service (self, peer, rid, service);
                break;
            }
            if (gw_dispatch_request (self->dispatch, rid, peer, service,
                    (int64_t)gw_msg_deadline (msg), msg, now)) {
                //  Another client's request holds this id (ids chosen by
                //  HTTP clients can collide across edges): refuse this one
                //  so it does not wait for its deadline. The same client
                //  repeating itself gets nothing: a FINAL would end its
                //  first request.
                if (gw_dispatch_client (self->dispatch, rid) != peer)
                    s_send_error (
                        self, peer, rid, 409, "duplicate_request_id", service, NULL);
                else {
                    self->dropped++;
                    s_complain (self, peer, "REQUEST", "request id already in flight");
                }
                break;
            }
            self->msg = s_msg_new (self);
            s_execute (self, true);
            break;
        }
        case GW_MSG_FORWARD: {
            if (!s_require_worker (self, peer))
                break;
            const char *service = gw_msg_service (msg);
            s_tap (self, service, GW_MSG_FORWARD, rid, s_body_size (msg), 0);
            if (s_reserved (service)) {
                //  The broker answers: the worker's part ends here.
                void *client = NULL;
                int ended = gw_dispatch_final (self->dispatch, rid, peer, &client, now);
                if (ended < 0)
                    self->dropped++;
                else {
                    s_execute (self, true);
                    if (ended == 1)
                        s_answer_service (self, (peer_t *)client, rid, service);
                }
                break;
            }
            if (gw_dispatch_forward (self->dispatch, rid, peer, service,
                    (int64_t)gw_msg_deadline (msg), msg, now)) {
                self->dropped++;
                break;
            }
            self->msg = s_msg_new (self);
            s_execute (self, true);
            break;
        }
        case GW_MSG_PARTIAL: {
            if (!s_require_worker (self, peer))
                break;
            void *client = NULL;
            int relay = gw_dispatch_partial (self->dispatch, rid, peer, &client);
            if (relay < 0) {
                self->dropped++;
                break;
            }
            s_tap (self, peer->service, GW_MSG_PARTIAL, rid, s_body_size (msg), 0);
            if (relay == 1)
                s_send (self, (peer_t *)client, msg);
            break;
        }
        case GW_MSG_FINAL: {
            if (!s_require_worker (self, peer))
                break;
            void *client = NULL;
            int relay = gw_dispatch_final (self->dispatch, rid, peer, &client, now);
            if (relay < 0) {
                self->dropped++;
                break;
            }
            s_tap (self, peer->service, GW_MSG_FINAL, rid, s_body_size (msg),
                gw_msg_status (msg));
            if (relay == 1)
                s_send (self, (peer_t *)client, msg);
            s_execute (self, true);
            break;
        }
        case GW_MSG_CANCEL: {
            if (!peer)
                peer = s_peer_new (self, routing_id, mono);
            if (!peer)
                break;
            const char *service = gw_dispatch_service (self->dispatch, rid);
            if (service)
                s_tap (self, service, GW_MSG_CANCEL, rid, 0, 0);
            if (gw_dispatch_cancel (self->dispatch, rid, peer, gw_msg_status (msg)))
                self->dropped++;
            else
                s_execute (self, false);
            break;
        }
        case GW_MSG_CREDIT: {
            if (!peer)
                peer = s_peer_new (self, routing_id, mono);
            if (!peer)
                break;
            peer_t *worker = (peer_t *)gw_dispatch_credit (self->dispatch, rid, peer);
            if (!worker) {
                self->dropped++;
                break;
            }
            s_tap (self, worker->service, GW_MSG_CREDIT, rid, 0, 0);
            s_send (self, worker, msg);
            break;
        }
        case GW_MSG_PING:
            if (gw_msg_role (msg) == 'W' && !(peer && peer->worker)) {
                //  A worker we do not know (we restarted, or expired it).
                s_send_bare (self, routing_id, GW_MSG_DISCONNECT);
                break;
            }
            if (!peer)
                peer = s_peer_new (self, routing_id, mono);
            if (peer) {
                gw_msg_set_id (self->out, GW_MSG_PONG);
                s_send (self, peer, self->out);
            }
            break;
        case GW_MSG_PONG:
            if (!peer)
                s_peer_new (self, routing_id, mono);
            break;
        case GW_MSG_DISCONNECT:
            if (peer) {
                if (peer->worker) {
                    s_tap (self, peer->service, GW_MSG_DISCONNECT, NULL, 0, 0);
                    gw_info ("worker disconnected service=%s", peer->service);
                }
                s_peer_kill (self, peer);
            }
            break;
        default:
            break;
    }
    s_reap (self);
    return true;
}

//  Read subscription notices from the tap (XPUB_VERBOSER: one per
//  subscribe and unsubscribe, including those of departing subscribers).
static void
s_handle_tap (broker_t *self)
{
    void *handle = zsock_resolve (self->tap);
    zmq_msg_t notice;
    zmq_msg_init (&notice);
    while (zmq_msg_recv (&notice, handle, ZMQ_DONTWAIT) >= 0) {
        const byte *data = (const byte *)zmq_msg_data (&notice);
        if (zmq_msg_size (&notice) >= 1) {
            if (data[0] == 1)
                self->tap_subs++;
            else if (data[0] == 0 && self->tap_subs > 0)
                self->tap_subs--;
        }
    }
    zmq_msg_close (&notice);
}

//  Liveness pass: PING idle peers, expire silent ones.
static void
s_heartbeat (broker_t *self)
{
    int64_t now = gw_mono_ms ();
    peer_t *peer = (peer_t *)zhashx_first (self->peers);
    while (peer) {
        if (!peer->dead) {
            if (now - peer->last_recv > self->expiry) {
                if (peer->worker)
                    gw_info ("worker expired service=%s", peer->service);
                else
                    gw_debug ("client expired");
                s_peer_kill (self, peer);
            }
            else if (now - peer->last_send >= self->heartbeat) {
                gw_msg_set_id (self->out, GW_MSG_PING);
                gw_msg_set_role (self->out, 'B');
                s_send (self, peer, self->out);
                gw_msg_set_role (self->out, 0);
            }
        }
        peer = (peer_t *)zhashx_next (self->peers);
    }
    s_reap (self);
}

//  --------------------------------------------------------------------------
//  Pipe commands

static void
s_set_heartbeats (broker_t *self, zsock_t *sock)
{
    zsock_set_heartbeat_ivl (sock, self->heartbeat);
    zsock_set_heartbeat_timeout (sock, self->expiry);
    zsock_set_heartbeat_ttl (sock, self->expiry);
}

//  Bind sock to endpoint; reply the bound endpoint, or "" on failure.
static void
s_bind_reply (broker_t *self, zsock_t *sock, const char *endpoint)
{
    if (!endpoint || zsock_bind (sock, "%s", endpoint) == -1) {
        gw_error ("cannot bind %s: %s", endpoint ? endpoint : "(none)",
            zmq_strerror (zmq_errno ()));
        zstr_send (self->pipe, "");
        return;
    }
    char *bound = zsock_last_endpoint (sock);
    zstr_send (self->pipe, bound ? bound : endpoint);
    zstr_free (&bound);
}

static int
s_configure (broker_t *self, const char *key, const char *value)
{
    if (!key || !value || !*value)
        return -1;
    char *end;
    errno = 0;
    long long number = strtoll (value, &end, 10);
    if (*end || errno || number < 0)
        return -1;
    if (streq (key, "queue_max") && number <= 10000000)
        gw_dispatch_set_queue_max (self->dispatch, (size_t)number);
    else if (streq (key, "heartbeat") && number >= 10 && number <= 3600000) {
        self->heartbeat = (int)number;
        s_set_heartbeats (self, self->router);
        self->next_heartbeat = gw_mono_ms ();
    }
    else if (streq (key, "expiry") && number >= 20 && number <= 3600000) {
        self->expiry = (int)number;
        s_set_heartbeats (self, self->router);
        self->next_heartbeat = gw_mono_ms ();
    }
    else if (streq (key, "grace") && number <= 3600000)
        gw_dispatch_set_grace (self->dispatch, number);
    else if (streq (key, "body_max") && number >= 1 && number <= (1LL << 32)) {
        self->body_max = (size_t)number;
        gw_msg_set_body_max (self->msg, self->body_max);
    }
    else
        return -1;
    return 0;
}

static void
s_handle_pipe (broker_t *self)
{
    zmsg_t *request = zmsg_recv (self->pipe);
    if (!request) {
        self->terminated = true;
        return;
    }
    char *command = zmsg_popstr (request);
    char *arg1 = zmsg_popstr (request);
    char *arg2 = zmsg_popstr (request);
    if (!command || streq (command, "$TERM"))
        self->terminated = true;
    else if (streq (command, "BIND"))
        s_bind_reply (self, self->router, arg1);
    else if (streq (command, "TAP")) {
        if (!self->tap) {
            self->tap = zsock_new (ZMQ_XPUB);
            assert (self->tap);
            zsock_set_sndhwm (self->tap, BROKER_TAP_HWM);
            zsock_set_xpub_nodrop (self->tap, 0);
            zsock_set_xpub_verboser (self->tap, 1);
            zsock_set_linger (self->tap, 0);
        }
        s_bind_reply (self, self->tap, arg1);
    }
    else if (streq (command, "CONFIGURE")) {
        int rc = s_configure (self, arg1, arg2);
        if (rc)
            gw_warn ("bad CONFIGURE %s=%s", arg1 ? arg1 : "", arg2 ? arg2 : "");
        zsock_signal (self->pipe, rc ? 1 : 0);
    }
    else if (streq (command, "VERBOSE"))
        self->verbose = true;
    else if (streq (command, "STATS")) {
        size_t workers = 0;
        peer_t *peer = (peer_t *)zhashx_first (self->peers);
        while (peer) {
            workers += peer->worker;
            peer = (peer_t *)zhashx_next (self->peers);
        }
        zstr_sendf (self->pipe,
            "peers=%zu workers=%zu inflight=%zu queued=%zu malformed=%" PRIu64
            " dropped=%" PRIu64 " tap_subs=%d tap_seq=%" PRIu64,
            zhashx_size (self->peers), workers, gw_dispatch_size (self->dispatch),
            gw_dispatch_queued_total (self->dispatch), self->malformed, self->dropped,
            self->tap_subs, self->tap_seq);
    }
    else
        gw_warn ("unknown broker command %s", command);
    zstr_free (&command);
    zstr_free (&arg1);
    zstr_free (&arg2);
    zmsg_destroy (&request);
}

//  --------------------------------------------------------------------------
//  The actor

static broker_t *
s_broker_new (zsock_t *pipe)
{
    broker_t *self = (broker_t *)zmalloc (sizeof (broker_t));
    assert (self);
    self->pipe = pipe;
    self->heartbeat = 1000;
    self->expiry = 3000;
    self->body_max = GW_BODY_MAX_DEFAULT;
    self->router = zsock_new (ZMQ_ROUTER);
    assert (self->router);
    zsock_set_router_mandatory (self->router, 1);
    zsock_set_sndhwm (self->router, BROKER_HWM);
    zsock_set_rcvhwm (self->router, BROKER_HWM);
    zsock_set_linger (self->router, 0);
    //  A full peer pipe fails the send (the peer is then dropped) instead
    //  of blocking the broker.
    zsock_set_sndtimeo (self->router, 0);
    //  Reads never wait: the loop drains the socket until it is empty.
    zsock_set_rcvtimeo (self->router, 0);
    s_set_heartbeats (self, self->router);
    self->dispatch = gw_dispatch_new ();
    gw_dispatch_set_destructor (self->dispatch, s_payload_free);
    self->peers = zhashx_new ();
    assert (self->peers);
    zhashx_set_key_duplicator (self->peers, NULL);
    zhashx_set_key_destructor (self->peers, NULL);
    zhashx_set_key_hasher (self->peers, s_key_hash);
    zhashx_set_key_comparator (self->peers, s_key_compare);
    self->msg = s_msg_new (self);
    self->out = gw_msg_new (GW_MSG_PING);
    msgpack_sbuffer_init (&self->sbuf);
    char host[64] = "localhost";
    gethostname (host, sizeof (host) - 1);
    snprintf (self->name, sizeof (self->name), "%s:%d", host, (int)getpid ());
    self->started = gw_mono_ms ();
    self->last_complaint = self->started - 1000;
    return self;
}

static void
s_broker_destroy (broker_t **self_p)
{
    broker_t *self = *self_p;
    if (!self)
        return;
    peer_t *peer = (peer_t *)zhashx_first (self->peers);
    while (peer) {
        zframe_destroy (&peer->routing_id);
        free (peer);
        peer = (peer_t *)zhashx_next (self->peers);
    }
    zhashx_destroy (&self->peers);
    gw_dispatch_destroy (&self->dispatch);
    gw_msg_destroy (&self->msg);
    gw_msg_destroy (&self->out);
    msgpack_sbuffer_destroy (&self->sbuf);
    free (self->dead);
    zsock_destroy (&self->tap);
    zsock_destroy (&self->router);
    free (self);
    *self_p = NULL;
}

void
gw_broker_actor (zsock_t *pipe, void *args)
{
    gw_thread_name ("aigw-broker");
    broker_t *self = s_broker_new (pipe);
    zsock_signal (pipe, 0);
    int64_t now = gw_mono_ms ();
    self->next_heartbeat = now;
    self->next_tick = now + BROKER_TICK_MS;
    //  The loop sleeps in poll () on the sockets' ZMQ_FDs, not in
    //  zmq_poll, which probes every socket's mailbox before and after
    //  sleeping (libzmq: getpid + a zero-timeout poll per probe, the
    //  largest share of the broker's syscalls). A socket's ZMQ_FD becomes
    //  readable when anything arrives after a read of it came back empty,
    //  so each turn ends by reading the router until it is empty, after
    //  every send of the turn (a send may consume the router's wake-up);
    //  the pipe and the tap are asked directly (ZMQ_EVENTS, a drain) every
    //  turn, since sends on them can do the same.
    while (!self->terminated) {
        if (zsock_events (pipe) & ZMQ_POLLIN)
            s_handle_pipe (self);
        if (self->terminated)
            break;
        if (self->tap)
            s_handle_tap (self);
        int64_t now_ms = gw_mono_ms ();
        if (now_ms >= self->next_heartbeat) {
            s_heartbeat (self);
            int period =
                (self->heartbeat < self->expiry ? self->heartbeat : self->expiry) / 4;
            self->next_heartbeat = now_ms + (period > 5 ? period : 5);
        }
        if (now_ms >= self->next_tick) {
            if (gw_dispatch_queued_total (self->dispatch) > 0) {
                gw_dispatch_tick (self->dispatch, gw_time_ms ());
                s_execute (self, true);
                s_reap (self);
            }
            self->next_tick = now_ms + BROKER_TICK_MS;
        }
        //  Drain the router last, in bounded batches so the pipe stays
        //  responsive; a full batch means more may be waiting: no sleep.
        int count = 0;
        while (count < BROKER_BATCH && s_handle_bus (self))
            count++;
        now_ms = gw_mono_ms ();
        int64_t wake = self->next_heartbeat;
        if (gw_dispatch_queued_total (self->dispatch) > 0 && self->next_tick < wake)
            wake = self->next_tick;
        int64_t timeout = count == BROKER_BATCH ? 0 : wake > now_ms ? wake - now_ms : 0;
        struct pollfd fds[3] = {{zsock_fd (pipe), POLLIN, 0},
            {zsock_fd (self->router), POLLIN, 0},
            {self->tap ? zsock_fd (self->tap) : -1, POLLIN, 0}};
        if (poll (fds, self->tap ? 3 : 2, (int)timeout) < 0 && errno != EINTR)
            break;
    }
    s_broker_destroy (&self);
}

//  --------------------------------------------------------------------------
//  Selftest

//
//  The broker runs in-process on inproc endpoints; the peers are raw DEALER
//  sockets speaking gw_msg, so every rule is checked on the wire.

typedef struct {
    zsock_t *sock;  //  DEALER
    char name[16];  //  for failure messages
} t_peer_t;

static t_peer_t *
s_t_peer (const char *endpoint, const char *name)
{
    t_peer_t *peer = (t_peer_t *)zmalloc (sizeof (t_peer_t));
    assert (peer);
    peer->sock = zsock_new (ZMQ_DEALER);
    assert (peer->sock);
    zsock_set_linger (peer->sock, 0);
    assert (zsock_connect (peer->sock, "%s", endpoint) == 0);
    snprintf (peer->name, sizeof (peer->name), "%s", name);
    return peer;
}

static void
s_t_peer_destroy (t_peer_t **peer_p)
{
    zsock_destroy (&(*peer_p)->sock);
    free (*peer_p);
    *peer_p = NULL;
}

static void
s_t_send (t_peer_t *peer, gw_msg_t **msg_p)
{
    assert (gw_msg_send (*msg_p, peer->sock) == 0);
    gw_msg_destroy (msg_p);
}

static void
s_t_ready (t_peer_t *peer, const char *service, uint32_t capacity, uint32_t flags)
{
    gw_msg_t *msg = gw_msg_new (GW_MSG_READY);
    gw_msg_set_service (msg, service);
    gw_msg_set_capacity (msg, capacity);
    gw_msg_set_flags (msg, flags);
    gw_msg_set_label (msg, peer->name);
    s_t_send (peer, &msg);
}

static void
s_t_request (t_peer_t *peer, uint8_t rid[16], const char *service, uint64_t deadline,
    uint32_t flags)
{
    gw_rid_new (rid);
    gw_msg_t *msg = gw_msg_new (GW_MSG_REQUEST);
    gw_msg_set_rid (msg, rid);
    gw_msg_set_service (msg, service);
    gw_msg_set_deadline (msg, deadline);
    gw_msg_set_window (msg, 8);
    gw_msg_set_flags (msg, flags);
    zframe_t *body = zframe_from ("hello");
    gw_msg_set_body (msg, &body);
    s_t_send (peer, &msg);
}

static void
s_t_simple (t_peer_t *peer, int id, const uint8_t rid[16], uint16_t status, uint32_t seq)
{
    gw_msg_t *msg = gw_msg_new (id);
    gw_msg_set_rid (msg, rid);
    gw_msg_set_status (msg, status);
    gw_msg_set_seq (msg, seq);
    gw_msg_set_credit (msg, seq ? seq : 1);
    if (id == GW_MSG_FINAL || id == GW_MSG_PARTIAL) {
        zframe_t *body = zframe_from (id == GW_MSG_FINAL ? "done" : "chunk");
        gw_msg_set_body (msg, &body);
    }
    s_t_send (peer, &msg);
}

static void
s_t_forward (t_peer_t *peer, gw_msg_t *request, const char *service)
{
    gw_msg_t *msg = gw_msg_dup (request);
    gw_msg_set_id (msg, GW_MSG_FORWARD);
    gw_msg_set_routing_id (msg, NULL);
    gw_msg_set_service (msg, service);
    s_t_send (peer, &msg);
}

//  Next frame set other than PING/PONG on any of peers (PINGs are
//  answered), or NULL after timeout ms. *which_p is set to the index.
static gw_msg_t *
s_t_recv_any (t_peer_t **peers, int count, int timeout, int *which_p)
{
    zpoller_t *poller = zpoller_new (NULL);
    for (int i = 0; i < count; i++)
        zpoller_add (poller, peers[i]->sock);
    int64_t until = gw_mono_ms () + timeout;
    gw_msg_t *msg = gw_msg_new (0);
    gw_msg_t *result = NULL;
    while (!result) {
        int64_t left = until - gw_mono_ms ();
        if (left < 0)
            break;
        void *which = zpoller_wait (poller, (int)left);
        if (!which)
            break;
        for (int i = 0; i < count; i++) {
            if (peers[i]->sock != which)
                continue;
            if (gw_msg_recv (msg, peers[i]->sock) != GW_MSG_OK)
                break;
            if (gw_msg_id (msg) == GW_MSG_PING) {
                gw_msg_t *pong = gw_msg_new (GW_MSG_PONG);
                s_t_send (peers[i], &pong);
            }
            else if (gw_msg_id (msg) != GW_MSG_PONG) {
                result = msg;
                msg = NULL;
                if (which_p)
                    *which_p = i;
            }
            break;
        }
    }
    gw_msg_destroy (&msg);
    zpoller_destroy (&poller);
    return result;
}

static gw_msg_t *
s_t_recv (t_peer_t *peer, int timeout)
{
    return s_t_recv_any (&peer, 1, timeout, NULL);
}

//  Receive and check the command (and rid, if given) of the next frame set.
static gw_msg_t *
s_t_expect (t_peer_t *peer, int id, const uint8_t *rid)
{
    gw_msg_t *msg = s_t_recv (peer, 2000);
    if (!msg || gw_msg_id (msg) != id || (rid && memcmp (gw_msg_rid (msg), rid, 16))) {
        printf ("gw_broker: %s expected %s, got %s\n", peer->name, gw_msg_command (id),
            msg ? gw_msg_command (gw_msg_id (msg)) : "nothing");
        assert (false);
    }
    return msg;
}

//  Wait until the broker has handled everything peer sent before: PING
//  (as role) and wait for the PONG.
static void
s_t_sync (t_peer_t *peer, char role)
{
    gw_msg_t *ping = gw_msg_new (GW_MSG_PING);
    gw_msg_set_role (ping, role);
    s_t_send (peer, &ping);
    gw_msg_t *msg = gw_msg_new (0);
    while (true) {
        zsock_set_rcvtimeo (peer->sock, 2000);
        int rc = gw_msg_recv (msg, peer->sock);
        assert (rc == GW_MSG_OK);
        if (gw_msg_id (msg) == GW_MSG_PONG)
            break;
        assert (gw_msg_id (msg) == GW_MSG_PING);
    }
    gw_msg_destroy (&msg);
}

//  Nothing but PINGs arrives for timeout ms.
static void
s_t_silent (t_peer_t *peer, int timeout)
{
    gw_msg_t *msg = s_t_recv (peer, timeout);
    if (msg)
        printf ("gw_broker: %s expected nothing, got %s\n", peer->name,
            gw_msg_command (gw_msg_id (msg)));
    assert (!msg);
}

//  The value of key in a msgpack map (trusted input: our own broker's).
static msgpack_object *
s_t_map_get (msgpack_object *map, const char *key)
{
    if (!map || map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        msgpack_object *k = &map->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == strlen (key) &&
            memcmp (k->via.str.ptr, key, k->via.str.size) == 0)
            return &map->via.map.ptr[i].val;
    }
    return NULL;
}

static bool
s_t_str_is (msgpack_object *object, const char *text)
{
    return object && object->type == MSGPACK_OBJECT_STR &&
        object->via.str.size == strlen (text) &&
        memcmp (object->via.str.ptr, text, object->via.str.size) == 0;
}

//  Check a broker error FINAL: status, and the OpenAI error object's code.
static void
s_t_check_error (gw_msg_t *final, uint16_t status, const char *code)
{
    assert (gw_msg_id (final) == GW_MSG_FINAL);
    if (gw_msg_status (final) != status) {
        printf ("gw_broker: expected FINAL %u, got %u\n", status, gw_msg_status (final));
        assert (false);
    }
    zframe_t *body = gw_msg_body (final);
    assert (body);
    msgpack_unpacked result;
    msgpack_unpacked_init (&result);
    size_t offset = 0;
    assert (msgpack_unpack_next (&result, (const char *)zframe_data (body),
                zframe_size (body), &offset) == MSGPACK_UNPACK_SUCCESS);
    msgpack_object *error = s_t_map_get (&result.data, "error");
    assert (error);
    assert (s_t_str_is (s_t_map_get (error, "type"), "gateway_error"));
    assert (s_t_str_is (s_t_map_get (error, "code"), code));
    msgpack_object *param = s_t_map_get (error, "param");
    assert (param && param->type == MSGPACK_OBJECT_NIL);
    msgpack_object *message = s_t_map_get (error, "message");
    assert (message && message->type == MSGPACK_OBJECT_STR && message->via.str.size > 0);
    msgpack_unpacked_destroy (&result);
}

static char *
s_t_command (zactor_t *broker, const char *command, const char *arg)
{
    zstr_sendx (broker, command, arg, NULL);
    return zstr_recv (broker);
}

static void
s_t_configure (zactor_t *broker, const char *key, const char *value)
{
    zstr_sendx (broker, "CONFIGURE", key, value, NULL);
    assert (zsock_wait (broker) == 0);
}

//  The value of name=N in the broker's STATS line.
static long
s_t_stat (zactor_t *broker, const char *name)
{
    char *stats = s_t_command (broker, "STATS", NULL);
    char pattern[64];
    snprintf (pattern, sizeof (pattern), "%s=", name);
    char *found = strstr (stats, pattern);
    long value = found ? atol (found + strlen (pattern)) : -1;
    zstr_free (&stats);
    return value;
}

static void
s_t_main (bool verbose)
{
    zactor_t *broker = zactor_new (gw_broker_actor, NULL);
    assert (broker);
    if (verbose)
        zstr_send (broker, "VERBOSE");
    s_t_configure (broker, "heartbeat", "100");
    s_t_configure (broker, "expiry", "2000");
    s_t_configure (broker, "grace", "200");
    s_t_configure (broker, "queue_max", "2");
    zstr_sendx (broker, "CONFIGURE", "nonsense", "1", NULL);
    assert (zsock_wait (broker) == 1);

    //  BIND replies the real endpoint, ephemeral ports included.
    char *endpoint = s_t_command (broker, "BIND", "tcp://127.0.0.1:*");
    assert (strncmp (endpoint, "tcp://127.0.0.1:", 16) == 0 && atoi (endpoint + 16) > 0);
    zstr_free (&endpoint);
    endpoint = s_t_command (broker, "BIND", "inproc://gw-broker-test");
    assert (streq (endpoint, "inproc://gw-broker-test"));
    zstr_free (&endpoint);
    endpoint = s_t_command (broker, "BIND", "bogus://nowhere");
    assert (streq (endpoint, ""));
    zstr_free (&endpoint);
    endpoint = s_t_command (broker, "TAP", "inproc://gw-broker-tap");
    assert (streq (endpoint, "inproc://gw-broker-tap"));
    zstr_free (&endpoint);

    //  A tap subscriber; nothing is published until it is counted.
    assert (s_t_stat (broker, "tap_subs") == 0);
    zsock_t *tap = zsock_new_sub ("inproc://gw-broker-tap", "");
    assert (tap);
    for (int i = 0; i < 200 && s_t_stat (broker, "tap_subs") < 1; i++)
        zclock_sleep (5);
    assert (s_t_stat (broker, "tap_subs") == 1);

    const char *bus = "inproc://gw-broker-test";
    t_peer_t *a = s_t_peer (bus, "A");
    t_peer_t *b = s_t_peer (bus, "B");
    t_peer_t *client = s_t_peer (bus, "client");
    s_t_ready (a, "echo", 1, GW_READY_IDEMPOTENT);
    s_t_sync (a, 'W');
    s_t_ready (b, "echo", 2, 0);
    s_t_sync (b, 'W');

    //  Dispatch by credit: A (1/1) takes the first, B (capacity 2) the next
    //  two; then two queue (queue_max 2) and the sixth gets 503.
    uint8_t r[16][16];
    for (int i = 0; i < 16; i++)
        gw_rid_new (r[i]);
    uint64_t deadline = (uint64_t)gw_time_ms () + 60000;
    for (int i = 1; i <= 6; i++)
        s_t_request (client, r[i], "echo", deadline, GW_REQUEST_STREAM);
    gw_msg_t *msg = s_t_expect (a, GW_MSG_REQUEST, r[1]);
    assert (streq (gw_msg_service (msg), "echo") && gw_msg_deadline (msg) == deadline);
    assert (gw_msg_window (msg) == 8 && gw_msg_flags (msg) == GW_REQUEST_STREAM);
    assert (zframe_streq (gw_msg_body (msg), "hello"));
    gw_msg_destroy (&msg);
    msg = s_t_expect (b, GW_MSG_REQUEST, r[2]);
    gw_msg_destroy (&msg);
    msg = s_t_expect (b, GW_MSG_REQUEST, r[3]);
    gw_msg_destroy (&msg);
    msg = s_t_expect (client, GW_MSG_FINAL, r[6]);
    s_t_check_error (msg, 503, "queue_full");
    gw_msg_destroy (&msg);
    s_t_silent (a, 30);
    assert (s_t_stat (broker, "queued") == 2);

    //  A's FINAL is relayed, and the oldest queued request goes to A.
    s_t_simple (a, GW_MSG_FINAL, r[1], 200, 0);
    msg = s_t_expect (client, GW_MSG_FINAL, r[1]);
    assert (gw_msg_status (msg) == 200 && zframe_streq (gw_msg_body (msg), "done"));
    gw_msg_destroy (&msg);
    msg = s_t_expect (a, GW_MSG_REQUEST, r[4]);
    gw_msg_destroy (&msg);

    //  PARTIALs then the FINAL, in order; B's freed credit takes r5.
    for (uint32_t seq = 0; seq < 3; seq++)
        s_t_simple (b, GW_MSG_PARTIAL, r[2], 0, seq);
    s_t_simple (b, GW_MSG_FINAL, r[2], 200, 0);
    for (uint32_t seq = 0; seq < 3; seq++) {
        msg = s_t_expect (client, GW_MSG_PARTIAL, r[2]);
        assert (gw_msg_seq (msg) == seq && zframe_streq (gw_msg_body (msg), "chunk"));
        gw_msg_destroy (&msg);
    }
    msg = s_t_expect (client, GW_MSG_FINAL, r[2]);
    gw_msg_destroy (&msg);
    msg = s_t_expect (b, GW_MSG_REQUEST, r[5]);
    gw_msg_destroy (&msg);

    //  CREDIT reaches the worker. CANCEL reaches the worker, and its FINAL
    //  (499) is not relayed: the next thing the client sees is the answer
    //  to its gw.services request.
    s_t_simple (client, GW_MSG_CREDIT, r[5], 0, 4);
    msg = s_t_expect (b, GW_MSG_CREDIT, r[5]);
    assert (gw_msg_credit (msg) == 4);
    gw_msg_destroy (&msg);
    s_t_simple (client, GW_MSG_CANCEL, r[3], 499, 0);
    msg = s_t_expect (b, GW_MSG_CANCEL, r[3]);
    assert (gw_msg_status (msg) == 499);
    gw_msg_destroy (&msg);
    s_t_simple (b, GW_MSG_FINAL, r[3], 499, 0);
    s_t_sync (b, 'W');
    uint8_t services_rid[16];
    s_t_request (client, services_rid, "gw.services", 0, 0);
    msg = s_t_expect (client, GW_MSG_FINAL, services_rid);
    assert (gw_msg_status (msg) == 200);
    {
        zframe_t *body = gw_msg_body (msg);
        msgpack_unpacked result;
        msgpack_unpacked_init (&result);
        size_t offset = 0;
        assert (msgpack_unpack_next (&result, (const char *)zframe_data (body),
                    zframe_size (body), &offset) == MSGPACK_UNPACK_SUCCESS);
        assert (s_t_map_get (&result.data, "broker"));
        msgpack_object *uptime = s_t_map_get (&result.data, "uptime_ms");
        assert (uptime && uptime->type == MSGPACK_OBJECT_POSITIVE_INTEGER);
        msgpack_object *services = s_t_map_get (&result.data, "services");
        assert (services && services->type == MSGPACK_OBJECT_ARRAY);
        bool found = false;
        for (uint32_t i = 0; i < services->via.array.size; i++) {
            msgpack_object *service = &services->via.array.ptr[i];
            if (!s_t_str_is (s_t_map_get (service, "name"), "echo"))
                continue;
            found = true;
            assert (s_t_map_get (service, "workers")->via.u64 == 2);
            assert (s_t_map_get (service, "capacity")->via.u64 == 3);
            assert (s_t_map_get (service, "in_flight")->via.u64 == 2);
            assert (s_t_map_get (service, "queued")->via.u64 == 0);
            assert (s_t_map_get (service, "idempotent")->type == MSGPACK_OBJECT_BOOLEAN);
            assert (!s_t_map_get (service, "idempotent")->via.boolean);
            msgpack_object *labels = s_t_map_get (service, "labels");
            assert (labels && labels->via.array.size == 2);
        }
        assert (found);
        msgpack_unpacked_destroy (&result);
    }
    gw_msg_destroy (&msg);
    //  An unknown broker service is 404.
    s_t_request (client, r[0], "gw.nothing", 0, 0);
    msg = s_t_expect (client, GW_MSG_FINAL, r[0]);
    s_t_check_error (msg, 404, "unknown_service");
    gw_msg_destroy (&msg);

    //  FORWARD along a three-service slip; the FINAL goes to the client.
    t_peer_t *stage[3];
    const char *names[3] = {"stage1", "stage2", "stage3"};
    for (int i = 0; i < 3; i++) {
        stage[i] = s_t_peer (bus, names[i]);
        s_t_ready (stage[i], names[i], 1, 0);
        s_t_sync (stage[i], 'W');
    }
    s_t_request (client, r[7], "stage1", deadline, 0);
    for (int i = 0; i < 3; i++) {
        msg = s_t_expect (stage[i], GW_MSG_REQUEST, r[7]);
        assert (streq (gw_msg_service (msg), names[i]));
        assert (zframe_streq (gw_msg_body (msg), "hello"));
        if (i < 2)
            s_t_forward (stage[i], msg, names[i + 1]);
        else
            s_t_simple (stage[i], GW_MSG_FINAL, r[7], 200, 0);
        gw_msg_destroy (&msg);
    }
    msg = s_t_expect (client, GW_MSG_FINAL, r[7]);
    assert (gw_msg_status (msg) == 200);
    gw_msg_destroy (&msg);

    //  A queued request past its deadline gets 504.
    s_t_request (client, r[8], "stage3", deadline, 0);
    msg = s_t_expect (stage[2], GW_MSG_REQUEST, r[8]);
    gw_msg_destroy (&msg);
    int64_t start = gw_mono_ms ();
    s_t_request (client, r[9], "stage3", (uint64_t)gw_time_ms () + 100, 0);
    msg = s_t_expect (client, GW_MSG_FINAL, r[9]);
    s_t_check_error (msg, 504, "deadline_exceeded");
    assert (gw_mono_ms () - start >= 90);
    gw_msg_destroy (&msg);
    s_t_simple (stage[2], GW_MSG_FINAL, r[8], 200, 0);
    msg = s_t_expect (client, GW_MSG_FINAL, r[8]);
    gw_msg_destroy (&msg);

    //  No worker at all: 503 after grace (200 ms).
    start = gw_mono_ms ();
    s_t_request (client, r[10], "nosuch", deadline, 0);
    msg = s_t_expect (client, GW_MSG_FINAL, r[10]);
    s_t_check_error (msg, 503, "no_worker");
    assert (gw_mono_ms () - start >= 190);
    gw_msg_destroy (&msg);

    //  A worker the broker does not know gets DISCONNECT for PING('W') and
    //  for a FINAL; a client's PING gets PONG.
    t_peer_t *stranger = s_t_peer (bus, "stranger");
    gw_msg_t *ping = gw_msg_new (GW_MSG_PING);
    gw_msg_set_role (ping, 'W');
    s_t_send (stranger, &ping);
    msg = s_t_expect (stranger, GW_MSG_DISCONNECT, NULL);
    gw_msg_destroy (&msg);
    s_t_simple (stranger, GW_MSG_FINAL, r[10], 200, 0);
    msg = s_t_expect (stranger, GW_MSG_DISCONNECT, NULL);
    gw_msg_destroy (&msg);
    s_t_sync (stranger, 'C');

    //  Malformed frame sets: a REQUEST with a bad meta frame and a readable
    //  rid gets FINAL 400; garbage is counted and dropped.
    long malformed = s_t_stat (broker, "malformed");
    zmsg_t *raw = zmsg_new ();
    zmsg_addmem (raw, "GWP1", 4);
    zmsg_addmem (raw, "\x02", 1);
    zmsg_addmem (raw, r[11], 16);
    zmsg_addstr (raw, "echo");
    zmsg_addmem (raw, "short-meta", 10);
    zmsg_addmem (raw, "", 0);
    zmsg_addmem (raw, "", 0);
    zmsg_send (&raw, client->sock);
    msg = s_t_expect (client, GW_MSG_FINAL, r[11]);
    s_t_check_error (msg, 400, "bad_frame");
    gw_msg_destroy (&msg);
    //  A malformed CANCEL for a rid not in flight: 400 as well.
    raw = zmsg_new ();
    zmsg_addmem (raw, "GWP1", 4);
    zmsg_addmem (raw, "\x06", 1);
    zmsg_addmem (raw, r[14], 16);
    zmsg_addmem (raw, "\x01", 1);
    zmsg_send (&raw, client->sock);
    msg = s_t_expect (client, GW_MSG_FINAL, r[14]);
    s_t_check_error (msg, 400, "bad_frame");
    gw_msg_destroy (&msg);
    //  Not GWP/1 at all: DISCONNECT (§8).
    zstr_sendx (client->sock, "garbage", "more", NULL);
    msg = s_t_expect (client, GW_MSG_DISCONNECT, NULL);
    gw_msg_destroy (&msg);
    raw = zmsg_new ();
    zmsg_addmem (raw, "GWP1", 4);
    zmsg_addmem (raw, "\x0F", 1);
    zmsg_send (&raw, client->sock);
    s_t_sync (client, 'C');
    assert (s_t_stat (broker, "malformed") == malformed + 4);

    //  The tap saw the traffic with consecutive sequence numbers.
    bool seen_request = false, seen_partial = false, seen_forward = false;
    bool seen_error = false, seen_ready = false;
    uint64_t last_seq = 0;
    int count = 0;
    zsock_set_rcvtimeo (tap, 100);
    while (true) {
        zmsg_t *tapped = zmsg_recv (tap);
        if (!tapped)
            break;
        assert (zmsg_size (tapped) == 2);
        char *topic = zmsg_popstr (tapped);
        zframe_t *head = zmsg_pop (tapped);
        assert (zframe_size (head) == 40);
        const byte *h = zframe_data (head);
        uint64_t seq = 0;
        for (int i = 0; i < 8; i++)
            seq = (seq << 8) | h[i];
        assert (seq == last_seq + 1);
        last_seq = seq;
        uint16_t status = (uint16_t)((h[36] << 8) | h[37]);
        if (streq (topic, "echo.REQUEST"))
            seen_request = true;
        if (streq (topic, "echo.PARTIAL"))
            seen_partial = true;
        if (streq (topic, "stage2.FORWARD") && memcmp (h + 16, r[7], 16) == 0)
            seen_forward = true;
        if (streq (topic, "nosuch.FINAL") && status == 503)
            seen_error = true;
        if (streq (topic, "echo.READY"))
            seen_ready = true;
        if (verbose && count < 5)
            printf (
                " * gw_broker: tap %s seq=%" PRIu64 " status=%u\n", topic, seq, status);
        count++;
        zstr_free (&topic);
        zframe_destroy (&head);
        zmsg_destroy (&tapped);
    }
    assert (seen_request && seen_partial && seen_forward && seen_error && seen_ready);
    assert (count > 20);

    //  Nobody subscribed, nothing published.
    zsock_destroy (&tap);
    for (int i = 0; i < 200 && s_t_stat (broker, "tap_subs") > 0; i++)
        zclock_sleep (5);
    assert (s_t_stat (broker, "tap_subs") == 0);
    long seq_before = s_t_stat (broker, "tap_seq");
    s_t_request (client, r[12], "gw.services", 0, 0);
    msg = s_t_expect (client, GW_MSG_FINAL, r[12]);
    gw_msg_destroy (&msg);
    assert (s_t_stat (broker, "tap_seq") == seq_before);

    //  A worker that says DISCONNECT is removed.
    gw_msg_t *bye = gw_msg_new (GW_MSG_DISCONNECT);
    s_t_send (stage[0], &bye);
    s_t_sync (client, 'C');
    s_t_request (client, r[13], "gw.services", 0, 0);
    msg = s_t_expect (client, GW_MSG_FINAL, r[13]);
    gw_msg_destroy (&msg);
    assert (s_t_stat (broker, "workers") == 4);

    for (int i = 0; i < 3; i++)
        s_t_peer_destroy (&stage[i]);
    s_t_peer_destroy (&stranger);
    s_t_peer_destroy (&a);
    s_t_peer_destroy (&b);
    s_t_peer_destroy (&client);
    zactor_destroy (&broker);
    if (verbose)
        printf (" * gw_broker: main scenario ok (%d tap messages)\n", count);
}

//  Worker expiry: re-queue (idempotent, nothing streamed) or 502.
static void
s_t_expiry (bool verbose)
{
    zactor_t *broker = zactor_new (gw_broker_actor, NULL);
    assert (broker);
    s_t_configure (broker, "heartbeat", "40");
    s_t_configure (broker, "expiry", "200");
    s_t_configure (broker, "grace", "2000");
    char *endpoint = s_t_command (broker, "BIND", "inproc://gw-broker-expiry");
    assert (streq (endpoint, "inproc://gw-broker-expiry"));
    t_peer_t *w1 = s_t_peer (endpoint, "w1");  //  idempotent, goes silent
    t_peer_t *w3 = s_t_peer (endpoint, "w3");  //  idempotent, streamed, silent
    t_peer_t *w4 = s_t_peer (endpoint, "w4");  //  not idempotent, silent
    t_peer_t *client = s_t_peer (endpoint, "client");
    s_t_ready (w1, "job", 1, GW_READY_IDEMPOTENT);
    s_t_sync (w1, 'W');
    s_t_ready (w3, "job2", 1, GW_READY_IDEMPOTENT);
    s_t_sync (w3, 'W');
    s_t_ready (w4, "job3", 1, 0);
    s_t_sync (w4, 'W');
    uint8_t q1[16], q2[16], q3[16];
    s_t_request (client, q1, "job", 0, 0);
    s_t_request (client, q2, "job2", 0, GW_REQUEST_STREAM);
    s_t_request (client, q3, "job3", 0, 0);
    gw_msg_t *msg = s_t_expect (w1, GW_MSG_REQUEST, q1);
    gw_msg_destroy (&msg);
    msg = s_t_expect (w3, GW_MSG_REQUEST, q2);
    gw_msg_destroy (&msg);
    msg = s_t_expect (w4, GW_MSG_REQUEST, q3);
    gw_msg_destroy (&msg);
    s_t_simple (w3, GW_MSG_PARTIAL, q2, 0, 0);
    msg = s_t_expect (client, GW_MSG_PARTIAL, q2);
    gw_msg_destroy (&msg);
    //  A second worker for "job" arrives while w1 holds q1.
    t_peer_t *w2 = s_t_peer (endpoint, "w2");
    s_t_ready (w2, "job", 1, GW_READY_IDEMPOTENT);
    s_t_sync (w2, 'W');

    //  w1, w3, w4 fall silent; the client and w2 answer PINGs.
    t_peer_t *alive[2] = {client, w2};
    bool got_q1 = false, failed_q2 = false, failed_q3 = false;
    int64_t start = gw_mono_ms ();
    while (!(got_q1 && failed_q2 && failed_q3)) {
        int which = -1;
        msg = s_t_recv_any (alive, 2, 2000, &which);
        if (!msg) {
            char *stats = s_t_command (broker, "STATS", NULL);
            printf ("gw_broker: expiry stalled: q1=%d q2=%d q3=%d %s\n", got_q1,
                failed_q2, failed_q3, stats);
            fflush (stdout);
            zstr_free (&stats);
        }
        assert (msg);
        if (which == 1) {
            //  q1, re-queued to w2.
            assert (gw_msg_id (msg) == GW_MSG_REQUEST &&
                memcmp (gw_msg_rid (msg), q1, 16) == 0);
            s_t_simple (w2, GW_MSG_FINAL, q1, 200, 0);
        }
        else {
            assert (gw_msg_id (msg) == GW_MSG_FINAL);
            if (memcmp (gw_msg_rid (msg), q1, 16) == 0) {
                assert (gw_msg_status (msg) == 200);
                got_q1 = true;
            }
            else if (memcmp (gw_msg_rid (msg), q2, 16) == 0) {
                s_t_check_error (msg, 502, "worker_lost");
                failed_q2 = true;
            }
            else {
                assert (memcmp (gw_msg_rid (msg), q3, 16) == 0);
                s_t_check_error (msg, 502, "worker_lost");
                failed_q3 = true;
            }
        }
        gw_msg_destroy (&msg);
    }
    int64_t took = gw_mono_ms () - start;
    assert (took >= 150 && took < 1500);
    assert (s_t_stat (broker, "workers") == 1);
    //  The expired worker wakes up: DISCONNECT.
    gw_msg_t *ping = gw_msg_new (GW_MSG_PING);
    gw_msg_set_role (ping, 'W');
    s_t_send (w1, &ping);
    msg = s_t_expect (w1, GW_MSG_DISCONNECT, NULL);
    gw_msg_destroy (&msg);
    if (verbose)
        printf (" * gw_broker: expiry after %" PRId64 " ms ok\n", took);
    zstr_free (&endpoint);
    s_t_peer_destroy (&w1);
    s_t_peer_destroy (&w2);
    s_t_peer_destroy (&w3);
    s_t_peer_destroy (&w4);
    s_t_peer_destroy (&client);
    zactor_destroy (&broker);
}

//  Request ids come from clients (the edge takes HTTP clients' own): a
//  second client reusing an id in flight gets 409 at once; the first is
//  undisturbed; the same client repeating itself gets nothing.
static void
s_t_duplicate (bool verbose)
{
    zactor_t *broker = zactor_new (gw_broker_actor, NULL);
    assert (broker);
    char *endpoint = s_t_command (broker, "BIND", "inproc://gw-broker-dup");
    assert (streq (endpoint, "inproc://gw-broker-dup"));
    zstr_free (&endpoint);
    t_peer_t *worker = s_t_peer ("inproc://gw-broker-dup", "W");
    t_peer_t *first = s_t_peer ("inproc://gw-broker-dup", "C1");
    t_peer_t *second = s_t_peer ("inproc://gw-broker-dup", "C2");
    s_t_ready (worker, "dup", 4, 0);
    s_t_sync (worker, 'W');
    uint8_t rid[16];
    s_t_request (first, rid, "dup", (uint64_t)gw_time_ms () + 60000, 0);
    gw_msg_t *msg = s_t_expect (worker, GW_MSG_REQUEST, rid);
    gw_msg_t *again = gw_msg_dup (msg);
    gw_msg_set_routing_id (again, NULL);
    gw_msg_t *copy = gw_msg_dup (again);
    s_t_send (second, &again);
    gw_msg_t *refused = s_t_expect (second, GW_MSG_FINAL, rid);
    s_t_check_error (refused, 409, "duplicate_request_id");
    gw_msg_destroy (&refused);
    s_t_send (first, &copy);  //  the owner repeating itself: dropped
    s_t_silent (first, 50);
    s_t_silent (worker, 50);
    s_t_simple (worker, GW_MSG_FINAL, rid, 200, 0);
    gw_msg_t *final = s_t_expect (first, GW_MSG_FINAL, rid);
    assert (gw_msg_status (final) == 200);
    gw_msg_destroy (&final);
    s_t_silent (second, 50);
    gw_msg_destroy (&msg);
    s_t_peer_destroy (&second);
    s_t_peer_destroy (&first);
    s_t_peer_destroy (&worker);
    zactor_destroy (&broker);
    if (verbose)
        printf ("   duplicate request ids: OK\n");
}

void
gw_broker_test (bool verbose)
{
    printf (" * gw_broker: ");
    if (verbose)
        printf ("\n");
    int64_t start = gw_mono_ms ();
    s_t_main (verbose);
    s_t_expiry (verbose);
    s_t_duplicate (verbose);
    printf ("OK (%" PRId64 " ms)\n", gw_mono_ms () - start);
}
