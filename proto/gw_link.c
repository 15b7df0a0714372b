//  --------------------------------------------------------------------------
//  gw_link — a session's DEALER connection to the broker.
//
//  Design note. gw_worker and gw_client keep their connection state
//  machines; what they share at the socket level lives here: the options
//  of PROTOCOL.md §9, the connection monitor of §3.5.6 and the last-send
//  time their PING timers read.
//
//  With ZMQ_IMMEDIATE 1 and a send timeout of 0, gw_link_send never blocks
//  and never queues for a connection that is not up: it hands the frame set
//  to a live connection or fails at once (EAGAIN). So nothing is replayed to
//  a restarted broker, and the session, not libzmq, decides what to retry.
//
//  The monitor is zmq_socket_monitor on an inproc endpoint unique in the
//  process (pid + a process-wide serial), read by a PAIR socket without
//  blocking. It reports only CONNECTED, HANDSHAKE_SUCCEEDED (both: up) and
//  DISCONNECTED (lost, but only after up: libzmq also reports a failed
//  connect attempt as DISCONNECTED, and that is not a lost link). Events
//  arrive as two frames (event + value, then the address). A monitor that
//  cannot start is logged; the link then works without it and the session
//  falls back to its expiry timer.
//
//  Invariants: sock is never NULL; monitor is NULL or a PAIR connected to
//  sock's monitor endpoint; up is false until the monitor reports an up
//  event after the last connect.

#include "aigw.h"

//  Structure of our class

struct _gw_link_t {
    char name[GW_SERVICE_MAX + 16];  //  log prefix, e.g. "worker echo"
    zsock_t *sock;  //  DEALER to the broker; never NULL
    zsock_t *monitor;  //  PAIR reading the DEALER's monitor, or NULL
    char monitor_ep[64];  //  inproc endpoint of the monitor
    bool up;  //  monitor saw the connection up since connect
    int64_t last_send;  //  mono ms, last frame set sent (or connect)
    uint64_t sends;  //  frame sets sent
};

gw_link_t *
gw_link_new (const char *name, int heartbeat_ms, int expiry_ms)
{
    gw_link_t *self = (gw_link_t *)zmalloc (sizeof (gw_link_t));
    assert (self);
    snprintf (self->name, sizeof (self->name), "%s", name ? name : "link");
    self->sock = zsock_new (ZMQ_DEALER);
    assert (self->sock);
    zsock_set_sndhwm (self->sock, 100000);
    zsock_set_rcvhwm (self->sock, 100000);
    zsock_set_linger (self->sock, 0);
    zsock_set_immediate (self->sock, 1);
    zsock_set_sndtimeo (self->sock, 0);
    zsock_set_rcvtimeo (self->sock, 0);
    gw_link_set_heartbeat (self, heartbeat_ms, expiry_ms);
    self->last_send = gw_mono_ms ();
    return self;
}

static void
s_monitor_stop (gw_link_t *self)
{
    if (self->monitor) {
        zmq_socket_monitor (zsock_resolve (self->sock), NULL, 0);
        zsock_destroy (&self->monitor);
    }
}

static void
s_monitor_start (gw_link_t *self)
{
    static uint32_t s_serial;
    uint32_t serial = __atomic_fetch_add (&s_serial, 1, __ATOMIC_RELAXED);
    snprintf (self->monitor_ep, sizeof (self->monitor_ep), "inproc://gw-link-mon-%d-%u",
        (int)getpid (), serial);
    int rc = zmq_socket_monitor (zsock_resolve (self->sock), self->monitor_ep,
        ZMQ_EVENT_CONNECTED | ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_DISCONNECTED);
    if (rc == 0) {
        self->monitor = zsock_new (ZMQ_PAIR);
        assert (self->monitor);
        if (zsock_connect (self->monitor, "%s", self->monitor_ep)) {
            zmq_socket_monitor (zsock_resolve (self->sock), NULL, 0);
            zsock_destroy (&self->monitor);
        }
    }
    if (!self->monitor)
        gw_warn ("%s: socket monitor unavailable: %s", self->name,
            zmq_strerror (zmq_errno ()));
}

void
gw_link_destroy (gw_link_t **self_p)
{
    assert (self_p);
    if (*self_p) {
        gw_link_t *self = *self_p;
        s_monitor_stop (self);
        zsock_destroy (&self->sock);
        free (self);
        *self_p = NULL;
    }
}

void
gw_link_set_heartbeat (gw_link_t *self, int heartbeat_ms, int expiry_ms)
{
    assert (self);
    zsock_set_heartbeat_ivl (self->sock, heartbeat_ms);
    zsock_set_heartbeat_timeout (self->sock, expiry_ms);
    zsock_set_heartbeat_ttl (self->sock, expiry_ms);
}

void
gw_link_set_linger (gw_link_t *self, int linger_ms)
{
    assert (self);
    zsock_set_linger (self->sock, linger_ms);
}

int
gw_link_connect (gw_link_t *self, const char *endpoint)
{
    assert (self);
    assert (endpoint);
    s_monitor_start (self);
    if (zsock_connect (self->sock, "%s", endpoint)) {
        s_monitor_stop (self);
        return -1;
    }
    self->up = false;
    self->last_send = gw_mono_ms ();
    return 0;
}

int
gw_link_events (gw_link_t *self)
{
    assert (self);
    if (!self->monitor)
        return 0;
    int events = 0;
    void *handle = zsock_resolve (self->monitor);
    while (true) {
        zmq_msg_t part;
        zmq_msg_init (&part);
        if (zmq_msg_recv (&part, handle, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close (&part);
            return events;
        }
        uint16_t event = 0;
        if (zmq_msg_size (&part) >= 6)
            memcpy (&event, zmq_msg_data (&part), 2);
        bool more = zmq_msg_more (&part);
        zmq_msg_close (&part);
        while (more) {  //  the address frame
            zmq_msg_init (&part);
            if (zmq_msg_recv (&part, handle, ZMQ_DONTWAIT) < 0)
                more = false;
            else
                more = zmq_msg_more (&part);
            zmq_msg_close (&part);
        }
        if (event == ZMQ_EVENT_CONNECTED || event == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
            self->up = true;
            events |= GW_LINK_UP;
        }
        else if (event == ZMQ_EVENT_DISCONNECTED && self->up) {
            self->up = false;
            return events | GW_LINK_LOST;
        }
    }
}

bool
gw_link_up (gw_link_t *self)
{
    assert (self);
    return self->up;
}

int
gw_link_send (gw_link_t *self, gw_msg_t *msg)
{
    assert (self);
    assert (msg);
    if (gw_msg_send (msg, self->sock))
        return -1;
    self->last_send = gw_mono_ms ();
    self->sends++;
    return 0;
}

bool
gw_link_input (gw_link_t *self)
{
    assert (self);
    return (zsock_events (self->sock) & ZMQ_POLLIN) != 0;
}

int64_t
gw_link_last_send (gw_link_t *self)
{
    assert (self);
    return self->last_send;
}

uint64_t
gw_link_sends (gw_link_t *self)
{
    assert (self);
    return self->sends;
}

zsock_t *
gw_link_socket (gw_link_t *self)
{
    assert (self);
    return self->sock;
}

//  --------------------------------------------------------------------------
//  Self test: a link against a raw ROUTER standing in for the broker.

//  Read link events until one of want is seen or timeout_ms passes;
//  returns every event seen.
static int
s_test_await (gw_link_t *link, int want, int timeout_ms)
{
    int seen = 0;
    int64_t end = gw_mono_ms () + timeout_ms;
    while (!(seen & want) && gw_mono_ms () < end) {
        seen |= gw_link_events (link);
        if (!(seen & want))
            zclock_sleep (5);
    }
    return seen;
}

void
gw_link_test (bool verbose)
{
    printf (" * gw_link: ");
    if (!verbose)
        gw_log_configure (GW_LOG_ERROR, "text");

    //  Options of PROTOCOL.md §9; nothing sent before a connection is up
    gw_link_t *link = gw_link_new ("test", 200, 700);
    assert (link);
    zsock_t *sock = gw_link_socket (link);
    assert (zsock_type (sock) == ZMQ_DEALER);
    assert (zsock_sndhwm (sock) == 100000 && zsock_rcvhwm (sock) == 100000);
    assert (zsock_linger (sock) == 0);
    assert (zsock_immediate (sock) == 1);
    assert (zsock_sndtimeo (sock) == 0 && zsock_rcvtimeo (sock) == 0);
    assert (zsock_heartbeat_ivl (sock) == 200);
    assert (zsock_heartbeat_timeout (sock) == 700);
    assert (zsock_heartbeat_ttl (sock) == 700);
    gw_link_set_heartbeat (link, 300, 900);
    assert (zsock_heartbeat_ivl (sock) == 300);
    assert (zsock_heartbeat_timeout (sock) == 900 && zsock_heartbeat_ttl (sock) == 900);
    gw_msg_t *ping = gw_msg_new (GW_MSG_PING);
    gw_msg_set_role (ping, 'C');
    assert (gw_link_send (link, ping) == -1);
    assert (gw_link_sends (link) == 0);
    assert (gw_link_connect (link, "bogus://x") == -1);
    assert (!gw_link_up (link));
    assert (gw_link_events (link) == 0);

    //  Up after connecting to a ROUTER
    zsock_t *router = zsock_new (ZMQ_ROUTER);
    assert (router);
    zsock_set_linger (router, 0);
    int port = zsock_bind (router, "tcp://127.0.0.1:*");
    assert (port > 0);
    char endpoint[64];
    snprintf (endpoint, sizeof (endpoint), "tcp://127.0.0.1:%d", port);
    assert (gw_link_connect (link, endpoint) == 0);
    assert (s_test_await (link, GW_LINK_UP, 2000) == GW_LINK_UP);
    assert (gw_link_up (link));

    //  Sends counted and timed; the ROUTER gets them, its answer is input
    int64_t before = gw_mono_ms ();
    int64_t end = before + 2000;
    while (gw_link_send (link, ping) && gw_mono_ms () < end)
        zclock_sleep (5);  //  until the handshake has completed
    assert (gw_link_sends (link) == 1);
    assert (gw_link_last_send (link) >= before);
    assert (gw_link_send (link, ping) == 0);
    assert (gw_link_sends (link) == 2);
    gw_msg_t *in = gw_msg_new (0);
    zsock_set_rcvtimeo (router, 2000);
    assert (gw_msg_recv (in, router) == GW_MSG_OK && gw_msg_id (in) == GW_MSG_PING);
    assert (gw_msg_recv (in, router) == GW_MSG_OK && gw_msg_role (in) == 'C');
    assert (!gw_link_input (link));
    gw_msg_t *pong = gw_msg_new (GW_MSG_PONG);
    gw_msg_set_routing_id (pong, gw_msg_routing_id (in));
    assert (gw_msg_send (pong, router) == 0);
    end = gw_mono_ms () + 2000;
    while (!gw_link_input (link) && gw_mono_ms () < end)
        zclock_sleep (5);
    assert (gw_link_input (link));
    assert (gw_msg_recv (in, gw_link_socket (link)) == GW_MSG_OK);
    assert (gw_msg_id (in) == GW_MSG_PONG);
    assert (!gw_link_input (link));

    //  Lost when the ROUTER goes
    zsock_destroy (&router);
    assert (s_test_await (link, GW_LINK_LOST, 2000) & GW_LINK_LOST);
    assert (!gw_link_up (link));
    assert (gw_link_events (link) == 0);  //  reported once
    gw_link_set_linger (link, 100);
    assert (zsock_linger (gw_link_socket (link)) == 100);
    gw_link_destroy (&link);
    assert (link == NULL);
    gw_link_destroy (&link);  //  idempotent

    gw_msg_destroy (&pong);
    gw_msg_destroy (&in);
    gw_msg_destroy (&ping);
    printf ("OK\n");
}
