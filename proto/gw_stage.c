//  --------------------------------------------------------------------------
//  gw_stage — one actor thread running one or more stages (see gw_stage.h).
//
//  Design note. Each hosted stage keeps its own gw_worker session, so it
//  stays a service of its own on the bus: replicas elsewhere, settle and
//  release requests, the broker's credit and expiry work as with separate
//  actors. Only the hand-off between two hosted stages changes: the first
//  one's forward becomes gw_worker_pass on the session that holds the
//  request and a call of the second one's request function, with that same
//  session. The broker sees one REQUEST and, at the end, the FORWARD or
//  FINAL of the last hosted stage; the envelope's timings still name every
//  stage. A chain of hand-offs is bounded by the slip (GW_ENVELOPE_SLIP_MAX).
//
//  A stage's own sockets (class sockets/input/timeout) are polled with the
//  sessions; the list is asked for again before every poll and after every
//  input call, because a stage replaces a socket when its client session
//  reconnects or closes one when a helper ends, and a freed socket must
//  never reach zmq_poll or input. A request answered later (a parked one)
//  keeps its context with gw_stage_dup: host, stage and the session
//  holding it; sessions live as long as the host, and states are destroyed
//  before sessions, so a kept context never outlives its session.

#include "aigw.h"

#define STAGES_MAX 8
#define TICK_MS 500  //  longest sleep: the stages' ticks run at least this often
#define ITEMS_MAX (1 + STAGES_MAX * (1 + GW_STAGE_SOCKETS_MAX))  //  poll items

typedef struct {
    const gw_stage_class_t *cls;
    void *state;
    gw_worker_t *worker;  //  its session, NULL before CONNECT
} s_hosted_t;

struct _gw_stage_host_t {
    s_hosted_t stages[STAGES_MAX];
    size_t count;
};

//  A request callback's context: which hosted stage runs, on which session.
struct _gw_stage_t {
    gw_stage_host_t *host;
    size_t index;  //  the stage running now
    gw_worker_t *session;  //  the session holding the request
};

gw_stage_host_t *
gw_stage_host_new (void)
{
    gw_stage_host_t *self = (gw_stage_host_t *)zmalloc (sizeof (gw_stage_host_t));
    assert (self);
    return self;
}

void
gw_stage_host_destroy (gw_stage_host_t **self_p)
{
    assert (self_p);
    gw_stage_host_t *self = *self_p;
    if (self) {
        //  States first: a state may hold contexts naming any session.
        for (size_t i = 0; i < self->count; i++)
            self->stages[i].cls->destroy (&self->stages[i].state);
        for (size_t i = 0; i < self->count; i++)
            gw_worker_destroy (&self->stages[i].worker);
        free (self);
        *self_p = NULL;
    }
}

void
gw_stage_host_add (gw_stage_host_t *self, const gw_stage_class_t *cls, void *state)
{
    assert (self);
    assert (cls && cls->service && cls->request && cls->destroy);
    assert (!cls->sockets || cls->input);
    assert (self->count < STAGES_MAX);
    for (size_t i = 0; i < self->count; i++)
        assert (!streq (self->stages[i].cls->service, cls->service));
    self->stages[self->count++] = (s_hosted_t){cls, state, NULL};
}

gw_worker_t *
gw_stage_session (gw_stage_t *stage)
{
    assert (stage);
    return stage->session;
}

gw_stage_t *
gw_stage_dup (gw_stage_t *stage)
{
    assert (stage);
    gw_stage_t *copy = (gw_stage_t *)malloc (sizeof (gw_stage_t));
    assert (copy);
    *copy = *stage;
    return copy;
}

void
gw_stage_destroy (gw_stage_t **self_p)
{
    assert (self_p);
    free (*self_p);
    *self_p = NULL;
}

int
gw_stage_forward (gw_stage_t *stage, gw_msg_t *request, gw_envelope_t *envelope)
{
    assert (stage);
    const char *next = gw_envelope_next (envelope);
    gw_stage_host_t *host = stage->host;
    for (size_t i = 0; next && i < host->count; i++) {
        if (!streq (host->stages[i].cls->service, next))
            continue;
        if (gw_worker_pass (stage->session, request, envelope))
            return -1;
        gw_stage_t hand = {host, i, stage->session};
        host->stages[i].cls->request (host->stages[i].state, &hand, request);
        return 0;
    }
    return gw_worker_forward (stage->session, request, envelope);
}

int
gw_stage_envelope (gw_msg_t *request, gw_envelope_t *own)
{
    assert (request);
    assert (own);
    gw_envelope_t *live = gw_msg_live_envelope (request);
    if (live) {
        gw_envelope_copy (own, live);
        return 0;
    }
    zframe_t *frame = gw_msg_envelope (request);
    return frame &&
            gw_envelope_decode (own, zframe_data (frame), zframe_size (frame)) == 0
        ? 0
        : -1;
}

//  The stage's own sockets now (none without a sockets callback).
static size_t
s_sockets (s_hosted_t *hosted, zsock_t **sockets)
{
    if (!hosted->cls->sockets)
        return 0;
    size_t count = hosted->cls->sockets (hosted->state, sockets, GW_STAGE_SOCKETS_MAX);
    assert (count <= GW_STAGE_SOCKETS_MAX);
    return count;
}

//  Input on socket, if the stage still lists it: an earlier input call of
//  this wake-up may have replaced or closed it.
static void
s_input (s_hosted_t *hosted, zsock_t *socket)
{
    zsock_t *sockets[GW_STAGE_SOCKETS_MAX];
    size_t count = s_sockets (hosted, sockets);
    for (size_t i = 0; i < count; i++)
        if (sockets[i] == socket) {
            hosted->cls->input (hosted->state, socket);
            return;
        }
}

//  A pipe command to every stage: the worst answer of those concerned (0
//  if none is); VERBOSE has none.
static int
s_command_all (gw_stage_host_t *host, const char *command, const char *key,
    const char *value, bool *concerned)
{
    int answer = 0;
    *concerned = false;
    for (size_t i = 0; i < host->count; i++) {
        const gw_stage_class_t *cls = host->stages[i].cls;
        int rc =
            cls->command ? cls->command (host->stages[i].state, command, key, value) : -1;
        if (rc >= 0) {
            *concerned = true;
            answer = rc > answer ? rc : answer;
        }
    }
    return answer;
}

void
gw_stage_actor (zsock_t *pipe, void *args)
{
    gw_stage_host_t *host = (gw_stage_host_t *)args;
    assert (host && host->count > 0);
    char name[16];
    snprintf (name, sizeof (name), "aigw-%s", host->stages[0].cls->service);
    gw_thread_name (name);
    uint32_t capacity = 1024;
    int heartbeat = 0, expiry = 0;
    bool terminated = false;
    zsock_signal (pipe, 0);
    while (!terminated) {
        zmq_pollitem_t items[ITEMS_MAX];
        zsock_t *owned[ITEMS_MAX];  //  a stage's own socket, per item (or NULL)
        size_t owner[ITEMS_MAX];  //  the stage of that socket
        size_t count = 0;
        items[count++] = (zmq_pollitem_t){zsock_resolve (pipe), 0, ZMQ_POLLIN, 0};
        long timeout = TICK_MS;
        for (size_t i = 0; i < host->count; i++) {
            s_hosted_t *hosted = &host->stages[i];
            if (hosted->cls->timeout) {
                long due = hosted->cls->timeout (hosted->state);
                timeout = due >= 0 && due < timeout ? due : timeout;
            }
            zsock_t *sockets[GW_STAGE_SOCKETS_MAX];
            size_t listed = s_sockets (hosted, sockets);
            for (size_t j = 0; j < listed; j++) {
                owned[count] = sockets[j];
                owner[count] = i;
                items[count++] =
                    (zmq_pollitem_t){zsock_resolve (sockets[j]), 0, ZMQ_POLLIN, 0};
            }
            gw_worker_t *worker = hosted->worker;
            if (!worker)
                continue;
            owned[count] = NULL;
            items[count++] = (zmq_pollitem_t){
                zsock_resolve (gw_worker_socket (worker)), 0, ZMQ_POLLIN, 0};
            long due = gw_worker_timeout (worker);
            timeout = due < timeout ? due : timeout;
        }
        if (zmq_poll (items, (int)count, timeout) < 0) {
            if (zmq_errno () == EINTR)
                continue;
            break;  //  the context is going away
        }
        if (items[0].revents & ZMQ_POLLIN) {
            char *command = NULL, *key = NULL, *value = NULL;
            if (zstr_recvx (pipe, &command, &key, &value, NULL) < 1 ||
                streq (command, "$TERM"))
                terminated = true;
            else if (streq (command, "CONNECT")) {
                bool ok = key != NULL;
                for (size_t i = 0; ok && i < host->count; i++) {
                    s_hosted_t *hosted = &host->stages[i];
                    if (hosted->worker)
                        continue;
                    hosted->worker = gw_worker_new (
                        key, hosted->cls->service, capacity, hosted->cls->ready_flags);
                    ok = hosted->worker != NULL;
                    if (ok && heartbeat && expiry)
                        gw_worker_set_heartbeat (hosted->worker, heartbeat, expiry);
                    if (ok && hosted->cls->connect)
                        ok = hosted->cls->connect (hosted->state, key) == 0;
                }
                zsock_signal (pipe, ok ? 0 : 1);
            }
            else if (streq (command, "CONFIGURE")) {
                long number = value ? atol (value) : 0;
                int rc = 1;
                bool concerned = true;
                if (key && streq (key, "capacity") && number >= 1 && number <= 65535) {
                    capacity = (uint32_t)number;
                    rc = 0;
                }
                else if (key && streq (key, "heartbeat") && number >= 10 &&
                    number <= 60000) {
                    heartbeat = (int)number;
                    rc = 0;
                }
                else if (key && streq (key, "expiry") && number >= 20 &&
                    number <= 600000) {
                    expiry = (int)number;
                    rc = 0;
                }
                else if (key && !streq (key, "capacity") && !streq (key, "heartbeat") &&
                    !streq (key, "expiry")) {
                    rc = s_command_all (host, command, key, value, &concerned);
                    rc = concerned ? rc : 1;
                }
                zsock_signal (pipe, (byte)rc);
            }
            else if (streq (command, "RELOAD")) {
                bool concerned;
                zsock_signal (
                    pipe, (byte)s_command_all (host, command, NULL, NULL, &concerned));
            }
            else if (streq (command, "VERBOSE")) {
                bool concerned;
                s_command_all (host, command, NULL, NULL, &concerned);
            }
            else
                gw_warn ("%s: unknown command %s", host->stages[0].cls->service, command);
            zstr_free (&command);
            zstr_free (&key);
            zstr_free (&value);
            if (terminated)
                break;
        }
        for (size_t i = 0; i < host->count; i++) {
            s_hosted_t *hosted = &host->stages[i];
            for (size_t j = 1; j < count; j++)
                if (owned[j] && owner[j] == i && (items[j].revents & ZMQ_POLLIN))
                    s_input (hosted, owned[j]);
            if (hosted->cls->tick)
                hosted->cls->tick (hosted->state);
            if (!hosted->worker)
                continue;
            gw_msg_t *msg;
            while ((msg = gw_worker_recv (hosted->worker))) {
                if (gw_msg_id (msg) == GW_MSG_REQUEST) {
                    gw_stage_t stage = {host, i, hosted->worker};
                    hosted->cls->request (hosted->state, &stage, msg);
                }
                else if (gw_msg_id (msg) == GW_MSG_CANCEL)
                    gw_worker_final (hosted->worker, gw_msg_rid (msg), 499, NULL, NULL);
                gw_msg_destroy (&msg);
            }
            gw_worker_tick (hosted->worker);
        }
        for (size_t i = 0; i < host->count; i++)
            if (host->stages[i].cls->flush)
                host->stages[i].cls->flush (host->stages[i].state);
    }
    gw_stage_host_destroy (&host);
}

//  --------------------------------------------------------------------------
//  Self test
//
//  Two stages in one actor, "s1" and "s2", on a real broker (in-process,
//  inproc), and "s3" as a separate worker: s1 passes a request on along
//  its slip, s2 and s3 answer with the envelope they got.

#include "gw_broker.h"

typedef struct {
    char name[8];
    gw_envelope_t *envelope;
    int requests;  //  requests this stage handled
    int reloads;
    bool verbose;
    //  "s5" defers every request to its flush
    gw_msg_t *deferred[8];
    gw_stage_t *contexts[8];
    size_t count;
    int flushes;  //  flushes that answered something
} s_test_state_t;

static void
s_test_request (void *state, gw_stage_t *stage, gw_msg_t *request)
{
    s_test_state_t *self = (s_test_state_t *)state;
    self->requests++;
    //  Handed over from s1 in this actor, the envelope is s1's, copied
    //  (s5's flush reads the frame of its copy of the request instead).
    assert (gw_stage_envelope (request, self->envelope) == 0);
    if (gw_envelope_next (self->envelope)) {
        gw_envelope_set_ann_str (self->envelope, self->name, "passed");
        assert (gw_stage_forward (stage, request, self->envelope) == 0);
        return;
    }
    zframe_t *echo = gw_envelope_encode (self->envelope);
    gw_worker_final (gw_stage_session (stage), gw_msg_rid (request), 200, NULL, &echo);
}

static int
s_test_command (void *state, const char *command, const char *key, const char *value)
{
    s_test_state_t *self = (s_test_state_t *)state;
    if (streq (command, "VERBOSE"))
        self->verbose = true;
    else if (streq (command, "RELOAD"))
        return ++self->reloads > 0 && streq (self->name, "s2") ? 1 : 0;
    else if (streq (command, "CONFIGURE") && key && streq (key, self->name))
        return value && streq (value, "ok") ? 0 : 1;
    return -1;
}

//  "s5": keeps each request (the test sends at most 8 at once) and
//  answers all of them in its flush, with the number deferred together.
static void
s_test_defer (void *state, gw_stage_t *stage, gw_msg_t *request)
{
    s_test_state_t *self = (s_test_state_t *)state;
    assert (self->count < 8);
    self->requests++;
    self->deferred[self->count] = gw_msg_dup (request);
    self->contexts[self->count++] = gw_stage_dup (stage);
}

static void
s_test_flush (void *state)
{
    s_test_state_t *self = (s_test_state_t *)state;
    if (self->count)
        self->flushes++;
    for (size_t i = 0; i < self->count; i++) {
        zframe_t *frame = gw_msg_envelope (self->deferred[i]);
        assert (gw_envelope_decode (
                    self->envelope, zframe_data (frame), zframe_size (frame)) == 0);
        gw_envelope_set_ann_int (self->envelope, "together", (int64_t)self->count);
        zframe_t *echo = gw_envelope_encode (self->envelope);
        gw_worker_final (gw_stage_session (self->contexts[i]),
            gw_msg_rid (self->deferred[i]), 200, NULL, &echo);
        gw_msg_destroy (&self->deferred[i]);
        gw_stage_destroy (&self->contexts[i]);
    }
    self->count = 0;
}

static void
s_test_destroy (void **state_p)
{
    s_test_state_t *self = (s_test_state_t *)*state_p;
    for (size_t i = 0; i < self->count; i++) {
        gw_msg_destroy (&self->deferred[i]);
        gw_stage_destroy (&self->contexts[i]);
    }
    gw_envelope_destroy (&self->envelope);
    free (self);
    *state_p = NULL;
}

//  "s4": a stage with a socket of its own (a PULL fed by the test) that
//  parks every request and acts on it later, when told over that socket:
//  RELEASE answers it, FORWARD hands it on along its slip, SWAP replaces
//  the socket by one bound elsewhere. Its timeout keeps its tick at 5 ms.
typedef struct {
    zsock_t *feed;  //  its own socket, NULL before CONNECT
    gw_stage_t *kept;  //  the parked request's context, or NULL
    gw_msg_t *parked;  //  the parked request, or NULL
    gw_envelope_t *envelope;  //  its envelope
    int connects;  //  connect calls
    int inputs;  //  input calls
    int ticks;  //  tick calls
} s_test_feed_t;

static void
s_test_feed_request (void *state, gw_stage_t *stage, gw_msg_t *request)
{
    s_test_feed_t *self = (s_test_feed_t *)state;
    assert (!self->parked);
    self->kept = gw_stage_dup (stage);
    self->parked = gw_msg_dup (request);
}

static int
s_test_feed_connect (void *state, const char *endpoint)
{
    s_test_feed_t *self = (s_test_feed_t *)state;
    self->connects++;
    self->feed = zsock_new_pull ("@inproc://gw-stage-test-feed1");
    return self->feed ? 0 : -1;
}

static size_t
s_test_feed_sockets (void *state, zsock_t **sockets, size_t max)
{
    s_test_feed_t *self = (s_test_feed_t *)state;
    assert (max >= 1);
    if (!self->feed)
        return 0;
    sockets[0] = self->feed;
    return 1;
}

static void
s_test_feed_input (void *state, zsock_t *socket)
{
    s_test_feed_t *self = (s_test_feed_t *)state;
    assert (socket == self->feed);
    self->inputs++;
    if (!(zsock_events (socket) & ZMQ_POLLIN))
        return;
    char *command = zstr_recv (socket);
    assert (command);
    if (streq (command, "SWAP")) {
        zsock_destroy (&self->feed);
        self->feed = zsock_new_pull ("@inproc://gw-stage-test-feed2");
        assert (self->feed);
    }
    else if (self->parked) {
        const uint8_t *rid = gw_msg_rid (self->parked);
        gw_worker_t *session = gw_stage_session (self->kept);
        assert (!gw_worker_cancelled (session, rid));
        zframe_t *frame = gw_msg_envelope (self->parked);
        assert (frame &&
            gw_envelope_decode (
                self->envelope, zframe_data (frame), zframe_size (frame)) == 0);
        if (streq (command, "RELEASE")) {
            zframe_t *echo = gw_envelope_encode (self->envelope);
            assert (gw_worker_final (session, rid, 200, NULL, &echo) == 0);
        }
        else {
            gw_envelope_set_ann_str (self->envelope, "s4", "forwarded later");
            assert (gw_stage_forward (self->kept, self->parked, self->envelope) == 0);
        }
        gw_msg_destroy (&self->parked);
        gw_stage_destroy (&self->kept);
    }
    zstr_free (&command);
}

static void
s_test_feed_tick (void *state)
{
    ((s_test_feed_t *)state)->ticks++;
}

static long
s_test_feed_timeout (void *state)
{
    return 5;
}

static void
s_test_feed_destroy (void **state_p)
{
    s_test_feed_t *self = (s_test_feed_t *)*state_p;
    zsock_destroy (&self->feed);
    gw_msg_destroy (&self->parked);
    gw_stage_destroy (&self->kept);
    gw_envelope_destroy (&self->envelope);
    free (self);
    *state_p = NULL;
}

static s_test_state_t *
s_test_state (const char *name)
{
    s_test_state_t *self = (s_test_state_t *)zmalloc (sizeof (s_test_state_t));
    assert (self);
    snprintf (self->name, sizeof (self->name), "%s", name);
    self->envelope = gw_envelope_new ();
    return self;
}

//  Send a REQUEST along slip (comma-separated).
static void
s_test_send (gw_client_t *client, const char *slip)
{
    uint8_t rid[16];
    gw_rid_new (rid);
    gw_envelope_t *request_env = gw_envelope_new ();
    gw_envelope_set_rid (request_env, rid);
    char services[64];
    snprintf (services, sizeof (services), "%s", slip);
    char *first = NULL;
    for (char *name = strtok (services, ","); name; name = strtok (NULL, ",")) {
        gw_envelope_slip_append (request_env, name);
        if (!first)
            first = name;
    }
    gw_envelope_set_cursor (request_env, 0);
    gw_envelope_set_deadline (request_env, (uint64_t)gw_time_ms () + 5000);
    zframe_t *frame = gw_envelope_encode (request_env);
    gw_envelope_destroy (&request_env);
    gw_msg_t *msg = gw_msg_new (GW_MSG_REQUEST);
    gw_msg_set_rid (msg, rid);
    gw_msg_set_service (msg, first);
    gw_msg_set_deadline (msg, (uint64_t)gw_time_ms () + 5000);
    gw_msg_set_envelope (msg, &frame);
    assert (gw_client_send (client, &msg) == 0);
}

//  Send a REQUEST along slip and return its FINAL's status; a 200's body is
//  decoded into env (the answering stage's envelope).
static int
s_test_call (gw_client_t *client, const char *slip, gw_envelope_t *env)
{
    s_test_send (client, slip);
    int64_t until = gw_mono_ms () + 5000;
    int status = -1;
    while (status < 0 && gw_mono_ms () < until) {
        gw_msg_t *reply = gw_client_wait (client, 100);
        if (reply && gw_msg_id (reply) == GW_MSG_FINAL) {
            status = gw_msg_status (reply);
            zframe_t *body = gw_msg_body (reply);
            if (status == 200)
                assert (body &&
                    gw_envelope_decode (env, zframe_data (body), zframe_size (body)) ==
                        0);
        }
        gw_msg_destroy (&reply);
    }
    return status;
}

void
gw_stage_test (bool verbose)
{
    printf (" * gw_stage: ");
    zactor_t *broker = zactor_new (gw_broker_actor, NULL);
    assert (broker);
    zstr_sendx (broker, "BIND", "inproc://gw-stage-test", NULL);
    char *endpoint = zstr_recv (broker);
    assert (endpoint && *endpoint);

    static const gw_stage_class_t s1_class = {.service = "s1",
        .ready_flags = GW_READY_IDEMPOTENT,
        .request = s_test_request,
        .command = s_test_command,
        .destroy = s_test_destroy};
    static const gw_stage_class_t s2_class = {.service = "s2",
        .ready_flags = GW_READY_IDEMPOTENT,
        .request = s_test_request,
        .command = s_test_command,
        .destroy = s_test_destroy};
    static const gw_stage_class_t s4_class = {.service = "s4",
        .request = s_test_feed_request,
        .tick = s_test_feed_tick,
        .destroy = s_test_feed_destroy,
        .connect = s_test_feed_connect,
        .sockets = s_test_feed_sockets,
        .input = s_test_feed_input,
        .timeout = s_test_feed_timeout};
    static const gw_stage_class_t s5_class = {.service = "s5",
        .request = s_test_defer,
        .destroy = s_test_destroy,
        .flush = s_test_flush};
    s_test_state_t *s1 = s_test_state ("s1");
    s_test_state_t *s2 = s_test_state ("s2");
    s_test_state_t *s5 = s_test_state ("s5");
    s_test_feed_t *s4 = (s_test_feed_t *)zmalloc (sizeof (s_test_feed_t));
    assert (s4);
    s4->envelope = gw_envelope_new ();
    gw_stage_host_t *host = gw_stage_host_new ();
    gw_stage_host_add (host, &s1_class, s1);
    gw_stage_host_add (host, &s2_class, s2);
    gw_stage_host_add (host, &s4_class, s4);
    gw_stage_host_add (host, &s5_class, s5);
    zactor_t *actor = zactor_new (gw_stage_actor, host);
    assert (actor);
    assert (gw_actor_configure (actor, "capacity", "0") == -1);
    assert (gw_actor_configure (actor, "capacity", "8") == 0);
    assert (gw_actor_configure (actor, "s2", "ok") == 0);  //  a stage's own key
    assert (gw_actor_configure (actor, "s2", "no") == -1);
    assert (gw_actor_configure (actor, "nobody", "1") == -1);
    zstr_send (actor, "VERBOSE");
    zstr_send (actor, "RELOAD");
    assert (zsock_wait (actor) == 1);  //  s2 refused
    assert (s1->reloads == 1 && s2->reloads == 1 && s1->verbose && s2->verbose);
    zstr_sendx (actor, "CONNECT", endpoint, NULL);
    assert (zsock_wait (actor) == 0);

    gw_worker_t *s3 = gw_worker_new (endpoint, "s3", 8, GW_READY_IDEMPOTENT);
    gw_client_t *client = gw_client_new (endpoint);
    assert (s3 && client);
    gw_envelope_t *env = gw_envelope_new ();

    //  s1 -> s2: handed over in the thread, answered by s2 on s1's session;
    //  both timings in the envelope, under their own names.
    assert (s_test_call (client, "s1,s2", env) == 200);
    assert (s1->requests == 1 && s2->requests == 1);
    assert (streq (gw_envelope_ann_str (env, "s1"), "passed"));
    assert (gw_envelope_timings (env) == 1);
    assert (streq (gw_envelope_timing (env, 0, NULL, NULL), "s1"));
    assert (gw_envelope_cursor (env) == 1);

    //  s2 on its own: its own session.
    assert (s_test_call (client, "s2", env) == 200);
    assert (s2->requests == 2 && gw_envelope_timings (env) == 0);

    //  s1 -> s5: s5 defers to its flush, which answers after the turn's
    //  input is read, on s1's session; requests that arrive together are
    //  answered together.
    assert (s_test_call (client, "s1,s5", env) == 200);
    assert (s5->requests == 1 && s5->flushes == 1);
    assert (gw_envelope_ann_int (env, "together", 0) == 1);
    //  s5 kept a copy of the request (gw_msg_dup): its frame was written
    //  from s1's live envelope, with s1's annotation and timing.
    assert (streq (gw_envelope_ann_str (env, "s1"), "passed"));
    assert (gw_envelope_timings (env) == 1 && gw_envelope_cursor (env) == 1);
    for (int i = 0; i < 3; i++)
        s_test_send (client, "s5");
    int answered = 0;
    for (int64_t end = gw_mono_ms () + 5000; answered < 3 && gw_mono_ms () < end;) {
        gw_msg_t *reply = gw_client_wait (client, 100);
        if (reply && gw_msg_id (reply) == GW_MSG_FINAL) {
            assert (gw_msg_status (reply) == 200);
            answered++;
        }
        gw_msg_destroy (&reply);
    }
    assert (answered == 3 && s5->requests == 4);
    assert (s5->flushes >= 2 && s5->flushes <= 4);

    //  s1 -> s3: not hosted, so FORWARDed through the broker.
    int64_t until = gw_mono_ms () + 5000;
    s_test_send (client, "s1,s3");
    gw_msg_t *got = NULL;
    while (!got && gw_mono_ms () < until)
        got = gw_worker_wait (s3, 100);
    assert (got && gw_msg_id (got) == GW_MSG_REQUEST);
    zframe_t *forwarded = gw_msg_envelope (got);
    assert (
        gw_envelope_decode (env, zframe_data (forwarded), zframe_size (forwarded)) == 0);
    assert (streq (gw_envelope_ann_str (env, "s1"), "passed"));
    assert (gw_worker_final (s3, gw_msg_rid (got), 204, NULL, NULL) == 0);
    gw_msg_destroy (&got);
    int status = -1;
    while (status < 0 && gw_mono_ms () < until) {
        gw_msg_t *reply = gw_client_wait (client, 100);
        if (reply && gw_msg_id (reply) == GW_MSG_FINAL)
            status = gw_msg_status (reply);
        gw_msg_destroy (&reply);
    }
    assert (status == 204 && s1->requests == 3);

    //  A stage's own socket: s1 hands the request to s4, which parks it
    //  (no answer yet) and answers it when its socket says so, on s1's
    //  session (the one holding the request).
    assert (s4->connects == 1);
    zsock_t *feed = zsock_new_push (">inproc://gw-stage-test-feed1");
    assert (feed);
    s_test_send (client, "s1,s4");
    gw_msg_t *early = gw_client_wait (client, 200);
    assert (!early);
    zstr_send (feed, "RELEASE");
    until = gw_mono_ms () + 5000;
    status = -1;
    while (status < 0 && gw_mono_ms () < until) {
        gw_msg_t *reply = gw_client_wait (client, 100);
        if (reply && gw_msg_id (reply) == GW_MSG_FINAL) {
            status = gw_msg_status (reply);
            zframe_t *body = gw_msg_body (reply);
            assert (body &&
                gw_envelope_decode (env, zframe_data (body), zframe_size (body)) == 0);
        }
        gw_msg_destroy (&reply);
    }
    assert (status == 200 && s1->requests == 4 && s4->inputs >= 1);
    assert (streq (gw_envelope_ann_str (env, "s1"), "passed"));
    assert (gw_envelope_cursor (env) == 1);

    //  The stage replaces its socket: the new one is polled. A parked
    //  request forwarded later goes on through the broker to s3.
    s_test_send (client, "s1,s4,s3");
    zstr_send (feed, "SWAP");
    zsock_destroy (&feed);
    feed = zsock_new_push (">inproc://gw-stage-test-feed2");
    assert (feed);
    zclock_sleep (50);
    zstr_send (feed, "FORWARD");
    until = gw_mono_ms () + 5000;
    got = NULL;
    while (!got && gw_mono_ms () < until)
        got = gw_worker_wait (s3, 100);
    assert (got && gw_msg_id (got) == GW_MSG_REQUEST);
    forwarded = gw_msg_envelope (got);
    assert (
        gw_envelope_decode (env, zframe_data (forwarded), zframe_size (forwarded)) == 0);
    assert (streq (gw_envelope_ann_str (env, "s4"), "forwarded later"));
    assert (gw_envelope_timings (env) == 2);  //  s1, then s4
    assert (gw_worker_final (s3, gw_msg_rid (got), 204, NULL, NULL) == 0);
    gw_msg_destroy (&got);
    status = -1;
    while (status < 0 && gw_mono_ms () < until) {
        gw_msg_t *reply = gw_client_wait (client, 100);
        if (reply && gw_msg_id (reply) == GW_MSG_FINAL)
            status = gw_msg_status (reply);
        gw_msg_destroy (&reply);
    }
    assert (status == 204);
    zsock_destroy (&feed);

    //  Its timeout (5 ms) shortens the actor's sleep: ticks run far more
    //  often than every 500 ms.
    int ticks = s4->ticks;
    zclock_sleep (300);
    assert (s4->ticks - ticks >= 3);  //  500 ms sleeps would give at most 1

    //  A request parked when the actor ends is freed, not answered.
    s_test_send (client, "s1,s4");
    zclock_sleep (50);
    if (verbose)
        printf ("\n    s1 %d, s2 %d requests; s4 %d inputs, %d ticks", s1->requests,
            s2->requests, s4->inputs, s4->ticks);

    gw_envelope_destroy (&env);
    gw_client_destroy (&client);
    gw_worker_destroy (&s3);
    zactor_destroy (&actor);  //  takes the host and the states
    zstr_free (&endpoint);
    zactor_destroy (&broker);
    printf ("OK\n");
}
