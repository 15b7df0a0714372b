//  --------------------------------------------------------------------------
//  gw_worker — GWP/1 worker session (PROTOCOL.md §3).
//
//  Design note. One session = one DEALER connection registered for one
//  service. The connection is an explicit state machine (s_table below):
//
//    waiting     the socket is fresh and not connected; a back-off timer runs
//    connecting  connected; READY is offered to the socket until it takes it
//    active      READY sent; requests flow; PING/PONG keep the link alive
//
//  The socket and its monitor are a gw_link (ZMQ_IMMEDIATE=1, send and
//  receive timeouts of 0), so the session never blocks: a frame set is
//  either handed to a live connection or refused at once (EAGAIN), and
//  nothing is ever queued for a connection that does not exist yet or
//  replayed to a restarted broker. The price is that READY cannot be sent
//  until the ZMTP handshake completes, so
//  `connecting` retries it every GREET_RETRY_MS (and at once when the socket
//  monitor reports the handshake) — the first frame set on a connection is
//  always READY.
//
//  Liveness: any input refreshes it; the session PINGs (role W) when it has
//  sent nothing for `heartbeat`, and also when it has heard nothing for
//  `heartbeat` (so a worker that only streams still provokes a PONG); silence
//  for `expiry`, a DISCONNECT, or a monitor DISCONNECTED after the link was
//  up all lead to `waiting`: requests in flight are abandoned, the socket is
//  replaced by a fresh one (new routing id), and the session reconnects after
//  the back-off (reconnect_min doubling to reconnect_max, reset to
//  reconnect_min by the first input after a connect). The monitor is read on
//  every recv and tick; the session asks to be ticked at least every
//  LINK_POLL_MS so a dropped connection is noticed within that time.
//
//  Requests: a zhashx keyed by the 16 raw rid bytes (the key points into the
//  entry, no copy) maps rid -> {window credit, next PARTIAL seq, cancelled,
//  deadline, flags, receipt time}. It holds at most `capacity` entries
//  (≤ 65535): a REQUEST beyond capacity is answered FINAL 503 here and never
//  reaches the application.
//
//  Threading: one thread owns the session. Nothing here asserts on input.

#include "aigw.h"

#define GREET_RETRY_MS 10  //  retry READY while the handshake is pending
#define LINK_POLL_MS 100  //  longest gap between socket monitor reads

//  --------------------------------------------------------------------------
//  Connection state machine

typedef enum { S_WAITING = 0, S_CONNECTING, S_ACTIVE, S_STATES } s_state_t;

typedef enum {
    E_BACKOFF = 0,  //  back-off elapsed
    E_GREET,  //  time to offer READY to the socket
    E_INPUT,  //  any frame set from the broker
    E_PING,  //  PING from the broker
    E_DISCONNECT,  //  DISCONNECT from the broker
    E_EXPIRED,  //  broker silent for expiry
    E_HEARTBEAT,  //  PING is due
    E_LINK_LOST,  //  monitor: connection dropped after it was up
    E_EVENTS
} s_event_t;

//  Actions, run in this order; an action that fails (returns -1) raises the
//  exception: the remaining actions are skipped and the state stays.
#define A_CONNECT 0x01  //  monitor + connect the fresh socket
#define A_GREET 0x02  //  send READY (fails while the handshake is pending)
#define A_ALIVE 0x04  //  liveness = now, reset back-off on first answer
#define A_PONG 0x08  //  answer PONG
#define A_PING 0x10  //  send PING role W
#define A_RESET 0x20  //  abandon requests, fresh socket, back off

typedef struct {
    bool defined;  //  false: the event is ignored in this state
    unsigned actions;
    s_state_t next;
} s_transition_t;

static const s_transition_t s_table[S_STATES][E_EVENTS] = {
    [S_WAITING] =
        {
            [E_BACKOFF] = {true, A_CONNECT, S_CONNECTING},
        },
    [S_CONNECTING] =
        {
            [E_GREET] = {true, A_GREET, S_ACTIVE},
            [E_INPUT] = {true, A_ALIVE, S_CONNECTING},
            [E_PING] = {true, A_ALIVE | A_PONG, S_CONNECTING},
            [E_DISCONNECT] = {true, A_RESET, S_WAITING},
            [E_EXPIRED] = {true, A_RESET, S_WAITING},
            //  E_LINK_LOST: nothing registered yet; libzmq reconnects.
        },
    [S_ACTIVE] =
        {
            [E_INPUT] = {true, A_ALIVE, S_ACTIVE},
            [E_PING] = {true, A_ALIVE | A_PONG, S_ACTIVE},
            [E_HEARTBEAT] = {true, A_PING, S_ACTIVE},
            [E_DISCONNECT] = {true, A_RESET, S_WAITING},
            [E_EXPIRED] = {true, A_RESET, S_WAITING},
            [E_LINK_LOST] = {true, A_RESET, S_WAITING},
        },
};

static const char *s_state_names[] = {"waiting", "connecting", "active"};
static const char *s_event_names[] = {"backoff", "greet", "input", "ping", "disconnect",
    "expired", "heartbeat", "link-lost"};

//  --------------------------------------------------------------------------
//  Structures

typedef struct {
    uint8_t rid[16];  //  request id; the map key points here
    uint64_t deadline;  //  unix ms from the REQUEST meta, 0 = none
    uint32_t flags;  //  REQUEST flags (GW_REQUEST_STREAM)
    uint32_t credit;  //  PARTIALs allowed now (when limited)
    bool unlimited;  //  window was 0: no stream credit limit
    uint32_t seq;  //  next PARTIAL sequence number
    bool cancelled;  //  a CANCEL arrived
    int64_t t_in_us;  //  unix µs when the REQUEST arrived (timings)
} s_request_t;

struct _gw_worker_t {
    char *endpoint;  //  broker bus endpoint
    char service[GW_SERVICE_MAX + 1];  //  service served
    uint32_t capacity;  //  concurrent requests, 1..65535
    uint32_t ready_flags;  //  READY flags (GW_READY_IDEMPOTENT)
    char label[GW_LABEL_MAX + 1];  //  READY label
    int heartbeat;  //  ms, PING interval
    int expiry;  //  ms, broker silence that counts as loss
    int reconnect_min;  //  ms, first back-off
    int reconnect_max;  //  ms, back-off cap
    int backoff;  //  ms, next back-off
    size_t body_max;  //  largest body accepted, bytes

    s_state_t state;  //  connection state
    gw_link_t *link;  //  DEALER to the broker + its monitor; never NULL
    bool connected;  //  broker answered since the last connect
    uint64_t connects;  //  connects so far
    int64_t reconnect_at;  //  mono ms, waiting: when to connect
    int64_t greet_at;  //  mono ms, connecting: next READY attempt
    int64_t last_recv;  //  mono ms, last input (last send: gw_link)
    int64_t last_ping;  //  mono ms, last PING sent

    zhashx_t *requests;  //  rid -> s_request_t, ≤ capacity entries
    gw_msg_t *in;  //  receive buffer (handed to the caller)
    gw_msg_t *out;  //  send buffer, reused
    uint64_t malformed;  //  malformed frame sets dropped
    uint64_t dropped;  //  frame sets for unknown rids or unexpected
    int64_t malformed_log;  //  mono ms of the last malformed log line
};

static int s_execute (gw_worker_t *self, s_event_t event);

//  --------------------------------------------------------------------------
//  Request map (gw_rid_map_new) and link

static void
s_request_free (void **item_p)
{
    free (*item_p);
    *item_p = NULL;
}

static gw_link_t *
s_link_new (gw_worker_t *self)
{
    char name[GW_SERVICE_MAX + 16];
    snprintf (name, sizeof (name), "worker %s", self->service);
    return gw_link_new (name, self->heartbeat, self->expiry);
}

//  Read the link's monitor events: a connection that came up makes READY due
//  at once. Returns true if the connection dropped after it was up (the
//  caller raises E_LINK_LOST).
static bool
s_link_lost (gw_worker_t *self, int64_t now)
{
    int events = gw_link_events (self->link);
    if (events & GW_LINK_UP)
        self->greet_at = now;  //  READY can go now
    return (events & GW_LINK_LOST) != 0;
}

//  --------------------------------------------------------------------------
//  Sending

//  Send a command with no frames of its own (PONG, DISCONNECT) or PING.
static int
s_send_simple (gw_worker_t *self, int id)
{
    gw_msg_set_id (self->out, id);
    gw_msg_set_role (self->out, id == GW_MSG_PING ? 'W' : 0);
    return gw_link_send (self->link, self->out);
}

//  --------------------------------------------------------------------------
//  Actions

static void
s_abandon (gw_worker_t *self)
{
    size_t count = zhashx_size (self->requests);
    if (count)
        gw_warn ("worker %s: abandoning %zu request(s) in flight", self->service, count);
    zhashx_purge (self->requests);
}

static int
s_action (gw_worker_t *self, unsigned action, int64_t now)
{
    switch (action) {
        case A_CONNECT:
            if (gw_link_connect (self->link, self->endpoint)) {
                gw_error (
                    "worker %s: cannot connect to %s", self->service, self->endpoint);
                self->reconnect_at = now + self->backoff;
                return -1;
            }
            self->connects++;
            self->connected = false;
            self->last_recv = now;
            self->last_ping = now;
            self->greet_at = now;
            return 0;
        case A_GREET:
            gw_msg_set_id (self->out, GW_MSG_READY);
            gw_msg_set_service (self->out, self->service);
            gw_msg_set_capacity (self->out, self->capacity);
            gw_msg_set_flags (self->out, self->ready_flags);
            gw_msg_set_label (self->out, self->label);
            if (gw_link_send (self->link, self->out)) {
                self->greet_at = now + GREET_RETRY_MS;
                return -1;
            }
            gw_debug ("worker %s: READY sent to %s", self->service, self->endpoint);
            return 0;
        case A_ALIVE:
            self->last_recv = now;
            if (!self->connected) {
                self->connected = true;
                self->backoff = self->reconnect_min;
                gw_info ("worker %s: registered with %s", self->service, self->endpoint);
            }
            return 0;
        case A_PONG:
            s_send_simple (self, GW_MSG_PONG);
            return 0;
        case A_PING:
            self->last_ping = now;
            s_send_simple (self, GW_MSG_PING);
            return 0;
        case A_RESET:
            s_abandon (self);
            gw_link_destroy (&self->link);
            self->link = s_link_new (self);
            self->connected = false;
            self->reconnect_at = now + self->backoff;
            gw_info ("worker %s: lost %s, reconnecting in %d ms", self->service,
                self->endpoint, self->backoff);
            self->backoff = self->backoff > self->reconnect_max / 2 ? self->reconnect_max
                                                                    : self->backoff * 2;
            return 0;
        default:
            return 0;
    }
}

//  Run the transition for event in the current state. Returns 0 if the
//  transition completed, -1 if an action raised the exception (state kept)
//  or the event is not defined in this state (ignored).
static int
s_execute (gw_worker_t *self, s_event_t event)
{
    const s_transition_t *t = &s_table[self->state][event];
    if (!t->defined) {
        gw_debug ("worker %s: %s ignored in %s", self->service, s_event_names[event],
            s_state_names[self->state]);
        return -1;
    }
    int64_t now = gw_mono_ms ();
    for (unsigned action = 1; action <= A_RESET; action <<= 1)
        if ((t->actions & action) && s_action (self, action, now))
            return -1;
    self->state = t->next;
    return 0;
}

//  --------------------------------------------------------------------------
//  Public API

gw_worker_t *
gw_worker_new (
    const char *endpoint, const char *service, uint32_t capacity, uint32_t flags)
{
    if (!endpoint || !*endpoint || !service ||
        !gw_msg_service_valid (service, strlen (service)) || capacity < 1 ||
        capacity > 65535)
        return NULL;
    gw_worker_t *self = (gw_worker_t *)zmalloc (sizeof (gw_worker_t));
    assert (self);
    self->endpoint = strdup (endpoint);
    assert (self->endpoint);
    snprintf (self->service, sizeof (self->service), "%s", service);
    self->capacity = capacity;
    self->ready_flags = flags & GW_READY_IDEMPOTENT;
    char host[128] = "";
    gethostname (host, sizeof (host) - 1);
    snprintf (self->label, sizeof (self->label), "%s:%d", host, (int)getpid ());
    self->heartbeat = 1000;
    self->expiry = 3000;
    self->reconnect_min = 1000;
    self->reconnect_max = 32000;
    self->backoff = self->reconnect_min;
    self->body_max = GW_BODY_MAX_DEFAULT;
    self->requests = gw_rid_map_new (s_request_free);
    self->out = gw_msg_new (GW_MSG_PING);
    self->link = s_link_new (self);
    self->state = S_WAITING;
    //  Connect at once; READY goes out from the first recv/tick/wait, so
    //  options set after new (label, heartbeat) are in effect by then.
    if (s_execute (self, E_BACKOFF)) {
        gw_worker_destroy (&self);
        return NULL;
    }
    return self;
}

void
gw_worker_destroy (gw_worker_t **self_p)
{
    assert (self_p);
    if (*self_p) {
        gw_worker_t *self = *self_p;
        if (self->state == S_ACTIVE && s_send_simple (self, GW_MSG_DISCONNECT) == 0)
            gw_link_set_linger (self->link, 100);  //  let DISCONNECT leave
        gw_link_destroy (&self->link);
        zhashx_destroy (&self->requests);
        gw_msg_destroy (&self->in);
        gw_msg_destroy (&self->out);
        free (self->endpoint);
        free (self);
        *self_p = NULL;
    }
}

void
gw_worker_set_heartbeat (gw_worker_t *self, int heartbeat_ms, int expiry_ms)
{
    assert (self);
    if (heartbeat_ms < 1)
        heartbeat_ms = 1;
    if (expiry_ms < 2 * heartbeat_ms)
        expiry_ms = 2 * heartbeat_ms;
    self->heartbeat = heartbeat_ms;
    self->expiry = expiry_ms;
    //  ZMTP heartbeats apply from the socket's next connection.
    gw_link_set_heartbeat (self->link, heartbeat_ms, expiry_ms);
}

void
gw_worker_set_reconnect (gw_worker_t *self, int min_ms, int max_ms)
{
    assert (self);
    if (min_ms < 1)
        min_ms = 1;
    if (max_ms < min_ms)
        max_ms = min_ms;
    self->reconnect_min = min_ms;
    self->reconnect_max = max_ms;
    self->backoff = min_ms;
}

void
gw_worker_set_label (gw_worker_t *self, const char *label)
{
    assert (self);
    snprintf (self->label, sizeof (self->label), "%s", label ? label : "");
}

void
gw_worker_set_body_max (gw_worker_t *self, size_t body_max)
{
    assert (self);
    self->body_max = body_max;
}

zsock_t *
gw_worker_socket (gw_worker_t *self)
{
    assert (self);
    return gw_link_socket (self->link);
}

//  Dispatch one valid frame set from the broker. Returns true if it goes to
//  the application (self->in is then handed over).
static bool
s_dispatch (gw_worker_t *self, gw_msg_t *msg)
{
    int id = gw_msg_id (msg);
    if (id == GW_MSG_PING) {
        s_execute (self, E_PING);
        return false;
    }
    if (id == GW_MSG_DISCONNECT) {
        s_execute (self, E_INPUT);
        s_execute (self, E_DISCONNECT);
        return false;
    }
    s_execute (self, E_INPUT);
    if (self->state != S_ACTIVE)
        return false;  //  nothing is ours before READY
    if (id == GW_MSG_REQUEST) {
        const uint8_t *rid = gw_msg_rid (msg);
        if (zhashx_lookup (self->requests, rid)) {
            self->dropped++;
            gw_warn ("worker %s: duplicate request id dropped", self->service);
            return false;
        }
        if (zhashx_size (self->requests) >= self->capacity) {
            gw_warn ("worker %s: REQUEST beyond capacity %u refused", self->service,
                self->capacity);
            zframe_t *body = gw_msg_error_body ("gateway_error", "over_capacity",
                "worker received more requests than its capacity");
            gw_msg_set_id (self->out, GW_MSG_FINAL);
            gw_msg_set_rid (self->out, rid);
            gw_msg_set_status (self->out, 503);
            gw_msg_set_envelope (self->out, NULL);
            gw_msg_set_body (self->out, &body);
            gw_link_send (self->link, self->out);
            gw_msg_set_body (self->out, NULL);
            return false;
        }
        s_request_t *req = (s_request_t *)zmalloc (sizeof (s_request_t));
        assert (req);
        memcpy (req->rid, rid, 16);
        req->deadline = gw_msg_deadline (msg);
        req->flags = gw_msg_flags (msg);
        req->unlimited = gw_msg_window (msg) == 0;
        req->credit = gw_msg_window (msg);
        req->t_in_us = gw_time_us ();
        zhashx_insert (self->requests, req->rid, req);
        return true;
    }
    if (id == GW_MSG_CANCEL || id == GW_MSG_CREDIT) {
        s_request_t *req =
            (s_request_t *)zhashx_lookup (self->requests, gw_msg_rid (msg));
        if (!req) {
            self->dropped++;
            return false;
        }
        if (id == GW_MSG_CANCEL)
            req->cancelled = true;
        else {
            uint64_t credit = (uint64_t)req->credit + gw_msg_credit (msg);
            req->credit = credit >= UINT32_MAX ? UINT32_MAX - 1 : (uint32_t)credit;
        }
        return true;
    }
    if (id != GW_MSG_PONG)
        self->dropped++;  //  READY, FORWARD, PARTIAL, FINAL: not for a worker
    return false;
}

static bool s_timers_due (gw_worker_t *self, int64_t now);

gw_msg_t *
gw_worker_recv (gw_worker_t *self)
{
    assert (self);
    if (s_timers_due (self, gw_mono_ms ()))
        gw_worker_tick (self);
    while (true) {
        if (!self->in) {
            self->in = gw_msg_new (0);
            gw_msg_set_body_max (self->in, self->body_max);
        }
        int rc = gw_msg_recv (self->in, gw_link_socket (self->link));
        if (rc == GW_MSG_NONE)
            break;
        if (rc == GW_MSG_MALFORMED) {
            s_execute (self, E_INPUT);
            self->malformed++;
            int64_t now = gw_mono_ms ();
            if (now - self->malformed_log >= 1000) {
                self->malformed_log = now;
                gw_warn ("worker %s: malformed frame set dropped (%s), %" PRIu64
                         " so far",
                    self->service, gw_msg_reason (self->in), self->malformed);
            }
            continue;
        }
        if (s_dispatch (self, self->in)) {
            gw_msg_t *msg = self->in;
            self->in = NULL;
            return msg;
        }
    }
    if (s_link_lost (self, gw_mono_ms ()))
        s_execute (self, E_LINK_LOST);
    return NULL;
}

//  Mono ms at which a PING is due: nothing sent for heartbeat, or nothing
//  heard for heartbeat (at most one PING per heartbeat then).
static int64_t
s_ping_due (gw_worker_t *self)
{
    int64_t ping = gw_link_last_send (self->link) + self->heartbeat;
    int64_t quiet =
        (self->last_recv > self->last_ping ? self->last_recv : self->last_ping) +
        self->heartbeat;
    return quiet < ping ? quiet : ping;
}

//  Earliest mono ms at which a timer is due.
static int64_t
s_next_due (gw_worker_t *self)
{
    switch (self->state) {
        case S_WAITING:
            return self->reconnect_at;
        case S_CONNECTING: {
            int64_t due = self->last_recv + self->expiry;
            return self->greet_at < due ? self->greet_at : due;
        }
        default: {
            int64_t due = self->last_recv + self->expiry;
            int64_t ping = s_ping_due (self);
            return ping < due ? ping : due;
        }
    }
}

static bool
s_timers_due (gw_worker_t *self, int64_t now)
{
    return now >= s_next_due (self);
}

void
gw_worker_tick (gw_worker_t *self)
{
    assert (self);
    int64_t now = gw_mono_ms ();
    if (self->state == S_WAITING) {
        if (now < self->reconnect_at)
            return;
        if (s_execute (self, E_BACKOFF))
            return;
    }
    //  Input waiting to be read is a sign of life the caller has not
    //  collected yet: let recv see it (and data before the monitor) before
    //  judging the link.
    if (!gw_link_input (self->link)) {
        if (s_link_lost (self, now) && s_execute (self, E_LINK_LOST) == 0)
            return;
        if (now >= self->last_recv + self->expiry) {
            gw_warn ("worker %s: broker silent for %d ms", self->service, self->expiry);
            s_execute (self, E_EXPIRED);
            return;
        }
    }
    if (self->state == S_CONNECTING && now >= self->greet_at)
        s_execute (self, E_GREET);
    if (self->state == S_ACTIVE && now >= s_ping_due (self))
        s_execute (self, E_HEARTBEAT);
}

int
gw_worker_timeout (gw_worker_t *self)
{
    assert (self);
    int64_t wait = s_next_due (self) - gw_mono_ms ();
    int cap = self->state == S_WAITING
        ? self->heartbeat
        : (self->heartbeat < LINK_POLL_MS ? self->heartbeat : LINK_POLL_MS);
    if (wait < 0)
        wait = 0;
    return wait > cap ? cap : (int)wait;
}

gw_msg_t *
gw_worker_wait (gw_worker_t *self, int timeout_ms)
{
    assert (self);
    int64_t end = timeout_ms < 0 ? INT64_MAX : gw_mono_ms () + timeout_ms;
    while (!zsys_interrupted) {
        gw_msg_t *msg = gw_worker_recv (self);
        if (msg)
            return msg;
        gw_worker_tick (self);
        int64_t now = gw_mono_ms ();
        if (now >= end)
            break;
        int64_t wait = gw_worker_timeout (self);
        if (end - now < wait)
            wait = end - now;
        zmq_pollitem_t item = {
            zsock_resolve (gw_link_socket (self->link)), 0, ZMQ_POLLIN, 0};
        if (zmq_poll (&item, 1, (long)wait) < 0 && zmq_errno () == EINTR)
            break;
    }
    return NULL;
}

int
gw_worker_partial (
    gw_worker_t *self, const uint8_t rid[16], const void *data, size_t size)
{
    return gw_worker_partial_env (self, rid, data, size, NULL);
}

int
gw_worker_partial_env (gw_worker_t *self, const uint8_t rid[16], const void *data,
    size_t size, zframe_t **envelope_p)
{
    assert (self);
    assert (rid);
    s_request_t *req = (s_request_t *)zhashx_lookup (self->requests, rid);
    if (!req || !(req->flags & GW_REQUEST_STREAM) || req->cancelled ||
        size > self->body_max)
        return GW_ERROR;
    if (!req->unlimited && req->credit == 0)
        return GW_AGAIN;
    zframe_t *payload = zframe_new (data, size);
    gw_msg_set_id (self->out, GW_MSG_PARTIAL);
    gw_msg_set_rid (self->out, rid);
    gw_msg_set_seq (self->out, req->seq);
    gw_msg_set_body (self->out, &payload);
    if (envelope_p && *envelope_p && zframe_size (*envelope_p) <= GW_ENVELOPE_MAX)
        gw_msg_set_envelope (self->out, envelope_p);
    if (envelope_p)
        zframe_destroy (envelope_p);  //  one over the bound
    int rc = gw_link_send (self->link, self->out);
    gw_msg_set_body (self->out, NULL);
    gw_msg_set_envelope (self->out, NULL);
    if (rc)
        return GW_ERROR;
    req->seq++;
    if (!req->unlimited)
        req->credit--;
    return GW_OK;
}

int
gw_worker_final (gw_worker_t *self, const uint8_t rid[16], uint16_t status,
    zframe_t **envelope_p, zframe_t **body_p)
{
    assert (self);
    assert (rid);
    zframe_t *envelope = envelope_p ? *envelope_p : NULL;
    zframe_t *body = body_p ? *body_p : NULL;
    if (envelope_p)
        *envelope_p = NULL;
    if (body_p)
        *body_p = NULL;
    if (!zhashx_lookup (self->requests, rid)) {
        zframe_destroy (&envelope);
        zframe_destroy (&body);
        return -1;
    }
    gw_msg_set_id (self->out, GW_MSG_FINAL);
    gw_msg_set_rid (self->out, rid);
    gw_msg_set_status (self->out, status);
    gw_msg_set_envelope (self->out, &envelope);
    gw_msg_set_body (self->out, &body);
    int rc = gw_link_send (self->link, self->out);
    gw_msg_set_envelope (self->out, NULL);
    gw_msg_set_body (self->out, NULL);
    zhashx_delete (self->requests, rid);
    if (rc)
        gw_warn ("worker %s: FINAL %u could not be sent", self->service, status);
    return rc;
}

int
gw_worker_error (gw_worker_t *self, const uint8_t rid[16], uint16_t status,
    const char *type, const char *code, const char *message)
{
    assert (self);
    if (!zhashx_lookup (self->requests, rid))
        return -1;
    zframe_t *body = gw_msg_error_body (type, code, message);
    return gw_worker_final (self, rid, status, NULL, &body);
}

//  Move envelope past the stage at its cursor: cursor + 1, and that
//  stage's timing (named as the slip names it: co-located stages share a
//  session, PROTOCOL.md §2) from req's start to now. Returns the encoded
//  envelope, or NULL (cursor restored) if it grew past GW_ENVELOPE_MAX.
static void
s_advance (gw_worker_t *self, s_request_t *req, gw_envelope_t *envelope)
{
    size_t cursor = gw_envelope_cursor (envelope);
    const char *stage = gw_envelope_slip (envelope, cursor);
    gw_envelope_set_cursor (envelope, cursor + 1);
    gw_envelope_timing_add (envelope, stage ? stage : self->service,
        (uint64_t)req->t_in_us, (uint64_t)gw_time_us ());
}

int
gw_worker_forward (gw_worker_t *self, gw_msg_t *request, gw_envelope_t *envelope)
{
    assert (self);
    assert (request);
    assert (envelope);
    const uint8_t *rid = gw_msg_rid (request);
    s_request_t *req = (s_request_t *)zhashx_lookup (self->requests, rid);
    const char *next = gw_envelope_next (envelope);
    if (!req || !next || gw_msg_set_service (self->out, next))
        return -1;
    size_t cursor = gw_envelope_cursor (envelope);
    s_advance (self, req, envelope);
    zframe_t *encoded = gw_envelope_encode (envelope);
    if (!encoded || zframe_size (encoded) > GW_ENVELOPE_MAX) {
        zframe_destroy (&encoded);
        gw_envelope_set_cursor (envelope, cursor);
        return -1;
    }
    gw_msg_set_id (self->out, GW_MSG_FORWARD);
    gw_msg_set_rid (self->out, rid);
    gw_msg_set_deadline (self->out, gw_msg_deadline (request));
    gw_msg_set_window (self->out, gw_msg_window (request));
    gw_msg_set_flags (self->out, gw_msg_flags (request));
    gw_msg_set_envelope (self->out, &encoded);
    //  Borrow the request's body: it is sent by reference and taken back.
    zframe_t *body = gw_msg_body (request);
    gw_msg_set_body (self->out, &body);
    int rc = gw_link_send (self->link, self->out);
    gw_msg_take_body (self->out);
    gw_msg_set_envelope (self->out, NULL);
    zhashx_delete (self->requests, rid);
    if (rc)
        gw_warn ("worker %s: FORWARD to %s could not be sent", self->service,
            gw_msg_service (self->out));
    return rc;
}

int
gw_worker_pass (gw_worker_t *self, gw_msg_t *request, gw_envelope_t *envelope)
{
    assert (self);
    assert (request);
    assert (envelope);
    s_request_t *req =
        (s_request_t *)zhashx_lookup (self->requests, gw_msg_rid (request));
    const char *next = gw_envelope_next (envelope);
    if (!req || !next || gw_msg_set_service (request, next))
        return -1;
    s_advance (self, req, envelope);
    //  Not encoded: the next stage copies the envelope itself
    //  (gw_stage_envelope); the frame is written only if asked for.
    gw_msg_set_live_envelope (request, envelope);
    req->t_in_us = gw_time_us ();  //  the next stage's timing starts now
    return 0;
}

uint32_t
gw_worker_credit (gw_worker_t *self, const uint8_t rid[16])
{
    assert (self);
    s_request_t *req = (s_request_t *)zhashx_lookup (self->requests, rid);
    if (!req)
        return 0;
    return req->unlimited ? UINT32_MAX : req->credit;
}

bool
gw_worker_cancelled (gw_worker_t *self, const uint8_t rid[16])
{
    assert (self);
    s_request_t *req = (s_request_t *)zhashx_lookup (self->requests, rid);
    return !req || req->cancelled;
}

size_t
gw_worker_in_flight (gw_worker_t *self)
{
    assert (self);
    return zhashx_size (self->requests);
}

bool
gw_worker_connected (gw_worker_t *self)
{
    assert (self);
    return self->connected;
}

uint64_t
gw_worker_connects (gw_worker_t *self)
{
    assert (self);
    return self->connects;
}

//  --------------------------------------------------------------------------
//  Self test: the session against a fake broker (a raw ROUTER + gw_msg), so
//  the test scripts exactly what the broker does.

typedef struct {
    zsock_t *router;  //  the fake broker
    gw_worker_t *worker;  //  session under test
    zlist_t *app;  //  messages the session handed to the application
    zlist_t *seen;  //  frame sets the fake broker received
    bool pong;  //  fake broker answers PING with PONG
} s_bench_t;

static zsock_t *
s_test_router (int port)
{
    zsock_t *router = zsock_new (ZMQ_ROUTER);
    assert (router);
    zsock_set_linger (router, 0);
    int64_t end = gw_mono_ms () + 2000;
    int rc = -1;
    while (rc < 0 && gw_mono_ms () < end) {
        if (port)
            rc = zsock_bind (router, "tcp://127.0.0.1:%d", port);
        else
            rc = zsock_bind (router, "tcp://127.0.0.1:*");
        if (rc < 0)
            zclock_sleep (20);  //  the old listener may still be closing
    }
    assert (rc > 0);
    return router;
}

static int
s_test_port (zsock_t *router)
{
    const char *endpoint = zsock_endpoint (router);
    const char *colon = strrchr (endpoint, ':');
    assert (colon);
    return atoi (colon + 1);
}

//  Run the session once and collect whatever the fake broker received.
static void
s_bench_step (s_bench_t *b, int wait_ms)
{
    gw_msg_t *msg;
    if (b->worker) {
        while ((msg = gw_worker_recv (b->worker)))
            zlist_append (b->app, msg);
        gw_worker_tick (b->worker);
    }
    zmq_pollitem_t item = {zsock_resolve (b->router), 0, ZMQ_POLLIN, 0};
    zmq_poll (&item, 1, wait_ms);
    while (zsock_events (b->router) & ZMQ_POLLIN) {
        msg = gw_msg_new (0);
        if (gw_msg_recv (msg, b->router) != GW_MSG_OK) {
            gw_msg_destroy (&msg);
            continue;
        }
        if (gw_msg_id (msg) == GW_MSG_PING && b->pong) {
            gw_msg_t *pong = gw_msg_new (GW_MSG_PONG);
            gw_msg_set_routing_id (pong, gw_msg_routing_id (msg));
            gw_msg_send (pong, b->router);
            gw_msg_destroy (&pong);
        }
        zlist_append (b->seen, msg);
    }
}

static gw_msg_t *
s_take (zlist_t *list, int id)
{
    for (gw_msg_t *msg = (gw_msg_t *)zlist_first (list); msg;
         msg = (gw_msg_t *)zlist_next (list))
        if (gw_msg_id (msg) == id) {
            zlist_remove (list, msg);
            return msg;
        }
    return NULL;
}

//  Wait up to timeout_ms for the fake broker to receive a frame set of
//  command id (taken out of seen; other frame sets stay).
static gw_msg_t *
s_expect_broker (s_bench_t *b, int id, int timeout_ms)
{
    int64_t end = gw_mono_ms () + timeout_ms;
    do {
        gw_msg_t *msg = s_take (b->seen, id);
        if (msg)
            return msg;
        s_bench_step (b, 5);
    } while (gw_mono_ms () < end);
    return s_take (b->seen, id);
}

static gw_msg_t *
s_expect_app (s_bench_t *b, int id, int timeout_ms)
{
    int64_t end = gw_mono_ms () + timeout_ms;
    do {
        gw_msg_t *msg = s_take (b->app, id);
        if (msg)
            return msg;
        s_bench_step (b, 5);
    } while (gw_mono_ms () < end);
    return s_take (b->app, id);
}

static void
s_bench_run (s_bench_t *b, int ms)
{
    int64_t end = gw_mono_ms () + ms;
    while (gw_mono_ms () < end)
        s_bench_step (b, 5);
}

static void
s_bench_clear (zlist_t *list)
{
    while (zlist_size (list)) {
        gw_msg_t *msg = (gw_msg_t *)zlist_pop (list);
        gw_msg_destroy (&msg);
    }
}

static void
s_fb_send (s_bench_t *b, zframe_t *peer, gw_msg_t *msg)
{
    gw_msg_set_routing_id (msg, peer);
    int rc = gw_msg_send (msg, b->router);
    assert (rc == 0);
    gw_msg_destroy (&msg);
}

static gw_msg_t *
s_test_request (const uint8_t rid[16], uint64_t deadline, uint32_t window, uint32_t flags,
    zframe_t *envelope, const char *body)
{
    gw_msg_t *msg = gw_msg_new (GW_MSG_REQUEST);
    gw_msg_set_rid (msg, rid);
    gw_msg_set_service (msg, "echo");
    gw_msg_set_deadline (msg, deadline);
    gw_msg_set_window (msg, window);
    gw_msg_set_flags (msg, flags);
    zframe_t *frame = envelope ? envelope : zframe_new ("env", 3);
    gw_msg_set_envelope (msg, &frame);
    frame = zframe_new (body, strlen (body));
    gw_msg_set_body (msg, &frame);
    return msg;
}

static gw_msg_t *
s_test_simple (int id, const uint8_t rid[16], uint32_t value)
{
    gw_msg_t *msg = gw_msg_new (id);
    if (rid)
        gw_msg_set_rid (msg, rid);
    if (id == GW_MSG_CANCEL)
        gw_msg_set_status (msg, (uint16_t)value);
    if (id == GW_MSG_CREDIT)
        gw_msg_set_credit (msg, value);
    if (id == GW_MSG_PING)
        gw_msg_set_role (msg, 'B');
    return msg;
}

static bool
s_frame_is (zframe_t *frame, const char *text)
{
    return frame && zframe_size (frame) == strlen (text) &&
        memcmp (zframe_data (frame), text, strlen (text)) == 0;
}

void
gw_worker_test (bool verbose)
{
    printf (" * gw_worker: ");
    if (!verbose)
        gw_log_configure (GW_LOG_ERROR, "text");
    zsock_t *router = s_test_router (0);
    int port = s_test_port (router);
    char endpoint[64];
    snprintf (endpoint, sizeof (endpoint), "tcp://127.0.0.1:%d", port);

    //  Invalid arguments
    assert (gw_worker_new (endpoint, "bad name", 1, 0) == NULL);
    assert (gw_worker_new (endpoint, "echo", 0, 0) == NULL);
    assert (gw_worker_new (endpoint, "echo", 65536, 0) == NULL);
    assert (gw_worker_new ("bogus://x", "echo", 1, 0) == NULL);

    gw_worker_t *worker = gw_worker_new (endpoint, "echo", 4, GW_READY_IDEMPOTENT);
    assert (worker);
    gw_worker_set_heartbeat (worker, 100, 300);
    gw_worker_set_reconnect (worker, 100, 400);
    gw_worker_set_label (worker, "test:1");
    s_bench_t bench = {router, worker, zlist_new (), zlist_new (), true};
    s_bench_t *b = &bench;

    //  READY with service, capacity, flags and label
    gw_msg_t *msg = s_expect_broker (b, GW_MSG_READY, 1000);
    assert (msg);
    assert (streq (gw_msg_service (msg), "echo"));
    assert (gw_msg_capacity (msg) == 4);
    assert (gw_msg_flags (msg) == GW_READY_IDEMPOTENT);
    assert (streq (gw_msg_label (msg), "test:1"));
    zframe_t *peer = zframe_dup (gw_msg_routing_id (msg));
    gw_msg_destroy (&msg);
    assert (gw_worker_connects (worker) == 1);
    assert (!gw_worker_connected (worker));

    //  PING from the broker is answered with PONG; the worker is connected
    s_fb_send (b, peer, s_test_simple (GW_MSG_PING, NULL, 0));
    msg = s_expect_broker (b, GW_MSG_PONG, 1000);
    assert (msg);
    gw_msg_destroy (&msg);
    assert (gw_worker_connected (worker));

    //  PING role W after being idle for a heartbeat
    s_bench_clear (b->seen);
    int64_t start = gw_mono_ms ();
    msg = s_expect_broker (b, GW_MSG_PING, 1000);
    assert (msg);
    assert (gw_msg_role (msg) == 'W');
    assert (gw_mono_ms () - start >= 50);
    gw_msg_destroy (&msg);

    //  A streaming request with window 2: PARTIALs until the window is
    //  exhausted, GW_AGAIN, then CREDIT opens it again
    uint8_t rid_a[16], rid_b[16], rid_c[16], rid_d[16], rid_x[16];
    gw_rid_new (rid_a);
    gw_rid_new (rid_b);
    gw_rid_new (rid_c);
    gw_rid_new (rid_d);
    gw_rid_new (rid_x);
    uint64_t deadline = (uint64_t)gw_time_ms () + 60000;
    s_fb_send (
        b, peer, s_test_request (rid_a, deadline, 2, GW_REQUEST_STREAM, NULL, "hello"));
    msg = s_expect_app (b, GW_MSG_REQUEST, 1000);
    assert (msg);
    assert (memcmp (gw_msg_rid (msg), rid_a, 16) == 0);
    assert (s_frame_is (gw_msg_body (msg), "hello"));
    gw_msg_destroy (&msg);
    assert (gw_worker_in_flight (worker) == 1);
    assert (gw_worker_credit (worker, rid_a) == 2);
    assert (!gw_worker_cancelled (worker, rid_a));
    assert (gw_worker_partial (worker, rid_a, "p0", 2) == GW_OK);
    assert (gw_worker_partial (worker, rid_a, "p1", 2) == GW_OK);
    assert (gw_worker_partial (worker, rid_a, "p2", 2) == GW_AGAIN);
    assert (gw_worker_credit (worker, rid_a) == 0);
    for (uint32_t seq = 0; seq < 2; seq++) {
        msg = s_expect_broker (b, GW_MSG_PARTIAL, 1000);
        assert (msg);
        assert (memcmp (gw_msg_rid (msg), rid_a, 16) == 0);
        assert (gw_msg_seq (msg) == seq);
        assert (s_frame_is (gw_msg_body (msg), seq ? "p1" : "p0"));
        gw_msg_destroy (&msg);
    }
    s_fb_send (b, peer, s_test_simple (GW_MSG_CREDIT, rid_a, 1));
    msg = s_expect_app (b, GW_MSG_CREDIT, 1000);
    assert (msg);
    gw_msg_destroy (&msg);
    assert (gw_worker_credit (worker, rid_a) == 1);
    assert (gw_worker_partial (worker, rid_a, "p2", 2) == GW_OK);
    assert (gw_worker_partial (worker, rid_a, "p3", 2) == GW_AGAIN);
    msg = s_expect_broker (b, GW_MSG_PARTIAL, 1000);
    assert (msg && gw_msg_seq (msg) == 2);
    gw_msg_destroy (&msg);

    //  CANCEL marks the request; PARTIALs are refused; FINAL 499 ends it
    s_fb_send (b, peer, s_test_simple (GW_MSG_CANCEL, rid_a, 499));
    msg = s_expect_app (b, GW_MSG_CANCEL, 1000);
    assert (msg && gw_msg_status (msg) == 499);
    gw_msg_destroy (&msg);
    assert (gw_worker_cancelled (worker, rid_a));
    assert (gw_worker_partial (worker, rid_a, "p3", 2) == GW_ERROR);
    zframe_t *envelope = zframe_new ("E", 1);
    zframe_t *body = zframe_new ("B", 1);
    assert (gw_worker_final (worker, rid_a, 499, &envelope, &body) == 0);
    assert (envelope == NULL && body == NULL);
    msg = s_expect_broker (b, GW_MSG_FINAL, 1000);
    assert (msg);
    assert (memcmp (gw_msg_rid (msg), rid_a, 16) == 0);
    assert (gw_msg_status (msg) == 499);
    assert (
        s_frame_is (gw_msg_envelope (msg), "E") && s_frame_is (gw_msg_body (msg), "B"));
    gw_msg_destroy (&msg);
    assert (gw_worker_in_flight (worker) == 0);

    //  Unknown rids: -1 / GW_ERROR, frames still taken
    envelope = zframe_new ("E", 1);
    assert (gw_worker_final (worker, rid_a, 200, &envelope, NULL) == -1);
    assert (envelope == NULL);
    assert (gw_worker_error (worker, rid_x, 500, "server_error", NULL, "x") == -1);
    assert (gw_worker_partial (worker, rid_x, "p", 1) == GW_ERROR);
    assert (gw_worker_credit (worker, rid_x) == 0);
    assert (gw_worker_cancelled (worker, rid_x));
    //  CANCEL and CREDIT for unknown rids never reach the application
    s_fb_send (b, peer, s_test_simple (GW_MSG_CANCEL, rid_x, 499));
    s_fb_send (b, peer, s_test_simple (GW_MSG_CREDIT, rid_x, 5));
    s_bench_run (b, 50);
    assert (zlist_size (b->app) == 0);

    //  Non-streaming request: no PARTIALs; error FINAL with the OpenAI object
    s_fb_send (b, peer, s_test_request (rid_b, 0, 0, 0, NULL, "{}"));
    msg = s_expect_app (b, GW_MSG_REQUEST, 1000);
    assert (msg);
    gw_msg_destroy (&msg);
    assert (gw_worker_credit (worker, rid_b) == UINT32_MAX);
    assert (gw_worker_partial (worker, rid_b, "p", 1) == GW_ERROR);
    assert (gw_worker_error (worker, rid_b, 429, "rate_limit_error", "rpm_exceeded",
                "Too many requests") == 0);
    msg = s_expect_broker (b, GW_MSG_FINAL, 1000);
    assert (msg && gw_msg_status (msg) == 429);
    {
        zframe_t *frame = gw_msg_body (msg);
        gw_mreader_t reader;
        gw_mvalue_t value;
        gw_mreader_init (&reader, zframe_data (frame), zframe_size (frame));
        assert (gw_mreader_find (&reader, "error") == 0);
        gw_mreader_t inner = reader;
        assert (gw_mreader_find (&inner, "message") == 0);
        assert (gw_mreader_next (&inner, &value) == 0 &&
            gw_mvalue_streq (&value, "Too many requests"));
        inner = reader;
        assert (gw_mreader_find (&inner, "type") == 0);
        assert (gw_mreader_next (&inner, &value) == 0 &&
            gw_mvalue_streq (&value, "rate_limit_error"));
        inner = reader;
        assert (gw_mreader_find (&inner, "param") == 0);
        assert (gw_mreader_next (&inner, &value) == 0 && value.type == GW_MP_NIL);
        inner = reader;
        assert (gw_mreader_find (&inner, "code") == 0);
        assert (gw_mreader_next (&inner, &value) == 0 &&
            gw_mvalue_streq (&value, "rpm_exceeded"));
    }
    gw_msg_destroy (&msg);

    //  FORWARD: next service from the slip, cursor advanced, same rid,
    //  deadline, window, flags and body
    gw_envelope_t *env = gw_envelope_new ();
    gw_envelope_set_rid (env, rid_c);
    gw_envelope_slip_append (env, "echo");
    gw_envelope_slip_append (env, "router");
    gw_envelope_slip_append (env, "bridge");
    gw_envelope_set_cursor (env, 0);
    gw_envelope_set_deadline (env, deadline);
    s_fb_send (b, peer,
        s_test_request (rid_c, deadline, 8, GW_REQUEST_STREAM, gw_envelope_encode (env),
            "payload-bytes"));
    gw_envelope_destroy (&env);
    gw_msg_t *request = s_expect_app (b, GW_MSG_REQUEST, 1000);
    assert (request);
    env = gw_envelope_new ();
    zframe_t *frame = gw_msg_envelope (request);
    assert (gw_envelope_decode (env, zframe_data (frame), zframe_size (frame)) == 0);
    assert (streq (gw_envelope_next (env), "router"));
    assert (gw_worker_forward (worker, request, env) == 0);
    assert (gw_envelope_cursor (env) == 1);
    assert (gw_worker_in_flight (worker) == 0);
    assert (gw_worker_forward (worker, request, env) == -1);  //  forgotten
    assert (s_frame_is (gw_msg_body (request), "payload-bytes"));  //  still the caller's
    gw_msg_destroy (&request);
    gw_envelope_destroy (&env);
    msg = s_expect_broker (b, GW_MSG_FORWARD, 1000);
    assert (msg);
    assert (memcmp (gw_msg_rid (msg), rid_c, 16) == 0);
    assert (streq (gw_msg_service (msg), "router"));
    assert (gw_msg_deadline (msg) == deadline);
    assert (gw_msg_window (msg) == 8);
    assert (gw_msg_flags (msg) == GW_REQUEST_STREAM);
    assert (s_frame_is (gw_msg_body (msg), "payload-bytes"));
    env = gw_envelope_new ();
    frame = gw_msg_envelope (msg);
    assert (gw_envelope_decode (env, zframe_data (frame), zframe_size (frame)) == 0);
    assert (gw_envelope_cursor (env) == 1);
    assert (gw_envelope_slip_size (env) == 3);
    assert (streq (gw_envelope_next (env), "bridge"));
    assert (memcmp (gw_envelope_rid (env), rid_c, 16) == 0);
    assert (gw_envelope_timings (env) == 1);
    assert (streq (gw_envelope_timing (env, 0, NULL, NULL), "echo"));
    gw_msg_destroy (&msg);

    //  FORWARD at the end of the slip fails and keeps the request
    gw_envelope_set_cursor (env, 2);
    s_fb_send (b, peer, s_test_request (rid_d, 0, 0, 0, gw_envelope_encode (env), "x"));
    request = s_expect_app (b, GW_MSG_REQUEST, 1000);
    assert (request);
    assert (gw_worker_forward (worker, request, env) == -1);
    assert (gw_envelope_cursor (env) == 2);
    assert (gw_worker_in_flight (worker) == 1);
    assert (gw_worker_final (worker, rid_d, 200, NULL, NULL) == 0);
    gw_msg_destroy (&request);
    gw_envelope_destroy (&env);
    msg = s_expect_broker (b, GW_MSG_FINAL, 1000);
    assert (
        msg && memcmp (gw_msg_rid (msg), rid_d, 16) == 0 && gw_msg_status (msg) == 200);
    gw_msg_destroy (&msg);

    //  More REQUESTs than capacity: the fifth is refused with FINAL 503
    uint8_t rids[5][16];
    for (int i = 0; i < 5; i++) {
        gw_rid_new (rids[i]);
        s_fb_send (b, peer, s_test_request (rids[i], 0, 0, 0, NULL, "x"));
    }
    msg = s_expect_broker (b, GW_MSG_FINAL, 1000);
    assert (msg && gw_msg_status (msg) == 503);
    assert (memcmp (gw_msg_rid (msg), rids[4], 16) == 0);
    gw_msg_destroy (&msg);
    for (int i = 0; i < 4; i++) {
        msg = s_expect_app (b, GW_MSG_REQUEST, 1000);
        assert (msg);
        gw_msg_destroy (&msg);
    }
    assert (gw_worker_in_flight (worker) == 4);
    s_bench_clear (b->seen);

    //  DISCONNECT: requests abandoned, fresh socket (new routing id), READY
    s_fb_send (b, peer, s_test_simple (GW_MSG_DISCONNECT, NULL, 0));
    msg = s_expect_broker (b, GW_MSG_READY, 1500);
    assert (msg);
    assert (!zframe_eq (peer, gw_msg_routing_id (msg)));
    zframe_destroy (&peer);
    peer = zframe_dup (gw_msg_routing_id (msg));
    gw_msg_destroy (&msg);
    assert (gw_worker_in_flight (worker) == 0);
    assert (gw_worker_final (worker, rids[0], 200, NULL, NULL) == -1);
    assert (gw_worker_connects (worker) == 2);
    int64_t until = gw_mono_ms () + 1000;
    while (!gw_worker_connected (worker) && gw_mono_ms () < until)
        s_bench_step (b, 5);
    assert (gw_worker_connected (worker));

    //  Silence: reconnect after expiry with a new READY each time, and the
    //  back-off doubles (100, 200, 400 ms on top of the 300 ms expiry)
    b->pong = false;
    int64_t ready_at[3];
    for (int i = 0; i < 3; i++) {
        s_bench_clear (b->seen);
        msg = s_expect_broker (b, GW_MSG_READY, 1500);
        assert (msg);
        ready_at[i] = gw_mono_ms ();
        assert (!zframe_eq (peer, gw_msg_routing_id (msg)));
        zframe_destroy (&peer);
        peer = zframe_dup (gw_msg_routing_id (msg));
        gw_msg_destroy (&msg);
        assert (!gw_worker_connected (worker));
    }
    int64_t gap1 = ready_at[1] - ready_at[0], gap2 = ready_at[2] - ready_at[1];
    if (verbose)
        printf ("(reconnect gaps %" PRId64 " %" PRId64 " ms) ", gap1, gap2);
    //  Lower bounds only (a slow machine only lengthens gaps): expiry plus
    //  200 ms, then expiry plus 400 ms; without back-off both would be ~400.
    assert (gap1 >= 480 && gap2 >= 680);
    b->pong = true;
    until = gw_mono_ms () + 1000;
    while (!gw_worker_connected (worker) && gw_mono_ms () < until)
        s_bench_step (b, 5);
    assert (gw_worker_connected (worker));
    zframe_destroy (&peer);

    //  Broker restart on the same port: the socket monitor notices within
    //  milliseconds (expiry here is 5 s) and the worker registers again
    gw_worker_t *worker2 = gw_worker_new (endpoint, "echo2", 1, 0);
    assert (worker2);
    gw_worker_set_heartbeat (worker2, 500, 5000);
    gw_worker_set_reconnect (worker2, 100, 400);
    b->worker = worker2;
    msg = s_expect_broker (b, GW_MSG_READY, 1000);
    assert (msg && streq (gw_msg_service (msg), "echo2"));
    gw_msg_destroy (&msg);
    gw_worker_destroy (&worker);  //  sends DISCONNECT
    msg = s_expect_broker (b, GW_MSG_DISCONNECT, 1000);
    assert (msg);
    gw_msg_destroy (&msg);
    s_bench_clear (b->seen);
    zsock_destroy (&b->router);
    b->router = s_test_router (port);
    start = gw_mono_ms ();
    msg = s_expect_broker (b, GW_MSG_READY, 1500);
    assert (msg && streq (gw_msg_service (msg), "echo2"));
    if (verbose)
        printf ("(re-registered after %" PRId64 " ms) ", gw_mono_ms () - start);
    assert (gw_mono_ms () - start < 1500);
    assert (gw_worker_connects (worker2) == 2);
    gw_msg_destroy (&msg);

    gw_worker_destroy (&worker2);
    s_bench_clear (b->app);
    s_bench_clear (b->seen);
    zlist_destroy (&b->app);
    zlist_destroy (&b->seen);
    zsock_destroy (&b->router);
    printf ("OK\n");
}
