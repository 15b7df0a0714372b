//  --------------------------------------------------------------------------
//  gw_msg — GWP/1 frame codec.
//
//  Design note. Frame layout lives here and nowhere else. Decoding reads the
//  whole frame set (so a malformed one is consumed entirely and the socket
//  stays in sync), checks the signature, the command, the frame count for
//  that command and every fixed size exactly, and every variable size against
//  its bound, before it sets any field. Nothing here asserts on input.
//  Fixed-size frames are parsed into fields; envelope and body frames are
//  kept as zframe_t and re-sent by reference, so a broker relaying a 1 MiB
//  body copies none of it.

#include "aigw.h"

struct _gw_msg_t {
    int id;  //  command code, GW_MSG_*
    zframe_t *routing_id;  //  ROUTER peer identity, or NULL
    uint8_t rid[16];  //  request id
    bool has_rid;  //  rid was set or decoded
    char service[GW_SERVICE_MAX + 1];  //  READY/REQUEST/FORWARD service
    uint64_t deadline;  //  unix ms, 0 = none
    uint32_t window;  //  stream credit window, 0 = unlimited
    uint32_t flags;  //  READY or REQUEST flags
    uint32_t capacity;  //  READY capacity, 1..65535
    char label[GW_LABEL_MAX + 1];  //  READY worker label
    uint32_t seq;  //  PARTIAL sequence number
    uint16_t status;  //  FINAL status, CANCEL reason
    uint32_t credit;  //  CREDIT amount
    char role;  //  PING sender role: 'W', 'C', 'B' (0 = not sent)
    zframe_t *envelope;  //  REQUEST/FORWARD/FINAL envelope, or NULL
    gw_envelope_t *live;  //  decoded envelope standing for it (not owned), or NULL
    zframe_t *body;  //  REQUEST/FORWARD/FINAL body, PARTIAL payload
    size_t body_max;  //  largest body accepted, bytes
    const char *reason;  //  why the last decode failed, static string
};

static const char *s_commands[] = {"UNKNOWN", "READY", "REQUEST", "FORWARD", "PARTIAL",
    "FINAL", "CANCEL", "CREDIT", "PING", "PONG", "DISCONNECT"};

//  Frames each command has after signature and command (minimum).
static const int s_frames[] = {0, 4, 5, 5, 3, 4, 2, 2, 0, 0, 0};

//  Write the envelope frame from the live envelope, if there is one (a
//  direct hand-off set it instead of encoding). An envelope that cannot be
//  encoded within GW_ENVELOPE_MAX leaves no frame.
static void
s_materialize (gw_msg_t *self)
{
    if (!self->live)
        return;
    zframe_t *frame = gw_envelope_encode (self->live);
    self->live = NULL;
    if (frame && zframe_size (frame) > GW_ENVELOPE_MAX)
        zframe_destroy (&frame);
    zframe_destroy (&self->envelope);
    self->envelope = frame;
}

gw_msg_t *
gw_msg_new (int id)
{
    gw_msg_t *self = (gw_msg_t *)zmalloc (sizeof (gw_msg_t));
    assert (self);
    self->id = id;
    self->body_max = GW_BODY_MAX_DEFAULT;
    self->reason = "";
    return self;
}

void
gw_msg_destroy (gw_msg_t **self_p)
{
    assert (self_p);
    if (*self_p) {
        gw_msg_t *self = *self_p;
        zframe_destroy (&self->routing_id);
        zframe_destroy (&self->envelope);
        zframe_destroy (&self->body);
        free (self);
        *self_p = NULL;
    }
}

static uint32_t
s_get32 (const byte *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void
s_put32 (byte *p, uint32_t v)
{
    p[0] = (byte)(v >> 24);
    p[1] = (byte)(v >> 16);
    p[2] = (byte)(v >> 8);
    p[3] = (byte)v;
}

static uint64_t
s_get64 (const byte *p)
{
    return ((uint64_t)s_get32 (p) << 32) | s_get32 (p + 4);
}

static void
s_put64 (byte *p, uint64_t v)
{
    s_put32 (p, (uint32_t)(v >> 32));
    s_put32 (p + 4, (uint32_t)v);
}

bool
gw_msg_service_valid (const char *text, size_t size)
{
    if (size < 1 || size > GW_SERVICE_MAX)
        return false;
    for (size_t i = 0; i < size; i++) {
        char c = text[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-' || c == '/' ||
                c == ':'))
            return false;
    }
    return true;
}

//  One received frame: its bytes, and what holds them: a zframe (payload
//  frames: envelope, body; NULL once s_decode took it) or a message on the
//  receiver's stack (fixed frames).
typedef struct {
    const byte *data;
    size_t size;
    zframe_t *frame;
    zmq_msg_t *msg;
} s_part_t;

//  The frame (index after the routing id) of a command that carries a
//  payload (envelope or body), which s_decode keeps as a zframe: the rest
//  are fixed fields, copied out.
static bool
s_payload_frame (int id, int index)
{
    switch (id) {
        case GW_MSG_REQUEST:
        case GW_MSG_FORWARD:
            return index == 5 || index == 6;
        case GW_MSG_PARTIAL:
        case GW_MSG_FINAL:
            return index == 4 || index == 5;
        default:
            return false;
    }
}

//  Take part's frame for self (a copy when the part has none).
static zframe_t *
s_take (s_part_t *part)
{
    zframe_t *frame = part->frame ? part->frame : zframe_new (part->data, part->size);
    part->frame = NULL;
    return frame;
}

//  Decode parts[0..count) (without routing id) into self. Returns GW_MSG_OK
//  or GW_MSG_MALFORMED with self->reason set. Takes ownership of envelope and
//  body frames it keeps (nulls them in the array).
static int
s_decode (gw_msg_t *self, s_part_t *parts, int count)
{
    self->has_rid = false;
    self->live = NULL;
    zframe_destroy (&self->envelope);
    zframe_destroy (&self->body);
#define FAIL(why)                                                                        \
    do {                                                                                 \
        self->reason = why;                                                              \
        return GW_MSG_MALFORMED;                                                         \
    } while (0)
    if (count < 2)
        FAIL ("too few frames");
    if (parts[0].size != 4 || memcmp (parts[0].data, GW_MSG_SIGNATURE, 4))
        FAIL ("bad signature");
    if (parts[1].size != 1)
        FAIL ("bad command frame");
    int id = parts[1].data[0];
    if (id < GW_MSG_READY || id > GW_MSG_DISCONNECT)
        FAIL ("unknown command");
    self->id = id;
    if (count - 2 < s_frames[id]) {
        //  Still read the rid if it is there, so the broker can answer.
        if (id != GW_MSG_READY && count > 2 && parts[2].size == 16) {
            memcpy (self->rid, parts[2].data, 16);
            self->has_rid = true;
        }
        FAIL ("too few frames for command");
    }
    //  Every command with frames beyond the command has the rid first,
    //  except READY.
    if (s_frames[id] > 0 && id != GW_MSG_READY) {
        if (parts[2].size != 16)
            FAIL ("bad request id");
        memcpy (self->rid, parts[2].data, 16);
        self->has_rid = true;
    }
    switch (id) {
        case GW_MSG_READY: {
            size_t size = parts[2].size;
            if (!gw_msg_service_valid ((char *)parts[2].data, size))
                FAIL ("bad service name");
            if (parts[3].size != 4 || parts[4].size != 4)
                FAIL ("bad capacity or flags");
            uint32_t capacity = s_get32 (parts[3].data);
            if (capacity < 1 || capacity > 65535)
                FAIL ("capacity out of range");
            if (parts[5].size > GW_LABEL_MAX)
                FAIL ("label too long");
            memcpy (self->service, parts[2].data, size);
            self->service[size] = 0;
            self->capacity = capacity;
            self->flags = s_get32 (parts[4].data);
            size = parts[5].size;
            memcpy (self->label, parts[5].data, size);
            self->label[size] = 0;
            break;
        }
        case GW_MSG_REQUEST:
        case GW_MSG_FORWARD: {
            size_t size = parts[3].size;
            if (!gw_msg_service_valid ((char *)parts[3].data, size))
                FAIL ("bad service name");
            if (parts[4].size != 16)
                FAIL ("bad meta frame");
            if (parts[5].size > GW_ENVELOPE_MAX)
                FAIL ("envelope too large");
            if (parts[6].size > self->body_max)
                FAIL ("body too large");
            memcpy (self->service, parts[3].data, size);
            self->service[size] = 0;
            const byte *meta = parts[4].data;
            self->deadline = s_get64 (meta);
            self->window = s_get32 (meta + 8);
            self->flags = s_get32 (meta + 12);
            self->envelope = s_take (&parts[5]);
            self->body = s_take (&parts[6]);
            break;
        }
        case GW_MSG_PARTIAL:
            if (parts[3].size != 4)
                FAIL ("bad sequence frame");
            if (parts[4].size > self->body_max)
                FAIL ("payload too large");
            //  Optional frame 5: an envelope (PROTOCOL.md §2, PARTIAL).
            if (count > 5 && parts[5].size > GW_ENVELOPE_MAX)
                FAIL ("envelope too large");
            self->seq = s_get32 (parts[3].data);
            self->body = s_take (&parts[4]);
            if (count > 5 && parts[5].size > 0) {
                self->envelope = s_take (&parts[5]);
            }
            break;
        case GW_MSG_FINAL:
            if (parts[3].size != 2)
                FAIL ("bad status frame");
            if (parts[4].size > GW_ENVELOPE_MAX)
                FAIL ("envelope too large");
            if (parts[5].size > self->body_max)
                FAIL ("body too large");
            self->status = (uint16_t)((parts[3].data[0] << 8) | parts[3].data[1]);
            self->envelope = s_take (&parts[4]);
            self->body = s_take (&parts[5]);
            break;
        case GW_MSG_CANCEL:
            if (parts[3].size != 2)
                FAIL ("bad reason frame");
            self->status = (uint16_t)((parts[3].data[0] << 8) | parts[3].data[1]);
            break;
        case GW_MSG_CREDIT: {
            if (parts[3].size != 4)
                FAIL ("bad credit frame");
            uint32_t credit = s_get32 (parts[3].data);
            if (credit < 1 || credit > 0x7FFFFFFF)
                FAIL ("credit out of range");
            self->credit = credit;
            break;
        }
        case GW_MSG_PING:
            //  Optional role frame; absent, odd-sized or unknown counts as a
            //  client.
            self->role = 'C';
            if (count > 2 && parts[2].size == 1) {
                char role = (char)parts[2].data[0];
                if (role == 'W' || role == 'B')
                    self->role = role;
            }
            break;
        default:
            break;
    }
#undef FAIL
    self->reason = "";
    return GW_MSG_OK;
}

//  Release what parts[0..count) hold: the fixed frames' messages and the
//  payload frames not taken.
static void
s_parts_close (s_part_t *parts, int count)
{
    for (int i = 0; i < count; i++)
        if (parts[i].msg)
            zmq_msg_close (parts[i].msg);
        else
            zframe_destroy (&parts[i].frame);
}

int
gw_msg_recv (gw_msg_t *self, zsock_t *input)
{
    assert (self);
    assert (input);
    //  Fixed frames are read into messages on the stack and copied out;
    //  only payload frames (envelope, body) become zframes, sharing the
    //  socket's buffer. No allocation and no czmq option lookup per fixed
    //  frame: this is the broker's hottest path.
    void *handle = zsock_resolve (input);
    int routed = zsock_type (input) == ZMQ_ROUTER;
    //  One more message than frames kept: the last one receives (and
    //  drops) the frames beyond the limit.
    zmq_msg_t msgs[GW_FRAMES_MAX + 2];
    s_part_t parts[GW_FRAMES_MAX + 1];
    int count = 0, id = 0;
    bool overflow = false, more = true;
    for (int index = -routed; more; index++) {
        //  A fixed frame is received in place: a small one's bytes live
        //  inside the zmq_msg_t itself, so the struct must not move.
        bool keep = count < GW_FRAMES_MAX + routed;  //  as gw_msg_decode
        zmq_msg_t *msg = &msgs[keep ? count : GW_FRAMES_MAX + 1];
        s_part_t part = {NULL, 0, NULL, NULL};
        if (index >= 0 && s_payload_frame (id, index)) {
            part.frame = zframe_recv (input);
            if (part.frame) {
                part.data = zframe_data (part.frame);
                part.size = zframe_size (part.frame);
                more = zframe_more (part.frame);
            }
        }
        else {
            zmq_msg_init (msg);
            if (zmq_msg_recv (msg, handle, 0) < 0)  //  the socket's RCVTIMEO decides
                zmq_msg_close (msg);
            else {
                part.msg = msg;
                part.size = zmq_msg_size (msg);
                part.data =
                    part.size ? (const byte *)zmq_msg_data (msg) : (const byte *)"";
                more = zmq_msg_more (msg);
                if (index == 1 && part.size == 1)
                    id = part.data[0];  //  s_decode checks it
            }
        }
        if (!part.data) {
            s_parts_close (parts, count);
            return GW_MSG_NONE;
        }
        if (keep)
            parts[count++] = part;
        else {
            overflow = true;
            s_parts_close (&part, 1);
        }
    }
    int start = 0;
    if (routed) {
        if (self->routing_id)
            zframe_reset (self->routing_id, parts[0].data, parts[0].size);
        else
            self->routing_id = zframe_new (parts[0].data, parts[0].size);
        start = 1;
    }
    int rc;
    if (overflow) {
        //  Decode the first frames anyway: the rid may be readable.
        s_decode (self, parts + start, count - start);
        self->reason = "too many frames";
        rc = GW_MSG_MALFORMED;
    }
    else
        rc = s_decode (self, parts + start, count - start);
    s_parts_close (parts, count);
    return rc;
}

int
gw_msg_decode (gw_msg_t *self, zmsg_t **msg_p, bool routed)
{
    assert (self);
    assert (msg_p);
    zmsg_t *msg = *msg_p;
    if (!msg)
        return GW_MSG_NONE;
    *msg_p = NULL;
    s_part_t parts[GW_FRAMES_MAX + 1];
    int count = 0, rc;
    bool overflow = zmsg_size (msg) > GW_FRAMES_MAX + (routed ? 1 : 0);
    zframe_t *frame;
    while (!overflow && (frame = zmsg_pop (msg)))
        parts[count++] =
            (s_part_t){zframe_data (frame), zframe_size (frame), frame, NULL};
    zmsg_destroy (&msg);
    int start = 0;
    if (routed && count > 0) {
        zframe_destroy (&self->routing_id);
        self->routing_id = parts[0].frame;
        parts[0].frame = NULL;
        start = 1;
    }
    if (overflow) {
        self->reason = "too many frames";
        self->has_rid = false;
        rc = GW_MSG_MALFORMED;
    }
    else
        rc = s_decode (self, parts + start, count - start);
    for (int i = start; i < count; i++)
        zframe_destroy (&parts[i].frame);
    return rc;
}

//  Append a reference copy of frame (or an empty frame for NULL) to msg.
static void
s_append_copy (zmsg_t *msg, zframe_t *frame)
{
    zframe_t *copy = frame ? zframe_dup (frame) : zframe_new_empty ();
    zmsg_append (msg, &copy);
}

//  Build the frames of self into msg (without routing id).
static void
s_encode_into (gw_msg_t *self, zmsg_t *msg)
{
    s_materialize (self);
    byte buf[16];
    zmsg_addmem (msg, GW_MSG_SIGNATURE, 4);
    buf[0] = (byte)self->id;
    zmsg_addmem (msg, buf, 1);
    switch (self->id) {
        case GW_MSG_READY:
            zmsg_addstr (msg, self->service);
            s_put32 (buf, self->capacity);
            zmsg_addmem (msg, buf, 4);
            s_put32 (buf, self->flags);
            zmsg_addmem (msg, buf, 4);
            zmsg_addstr (msg, self->label);
            break;
        case GW_MSG_REQUEST:
        case GW_MSG_FORWARD:
            zmsg_addmem (msg, self->rid, 16);
            zmsg_addstr (msg, self->service);
            s_put64 (buf, self->deadline);
            s_put32 (buf + 8, self->window);
            s_put32 (buf + 12, self->flags);
            zmsg_addmem (msg, buf, 16);
            s_append_copy (msg, self->envelope);
            s_append_copy (msg, self->body);
            break;
        case GW_MSG_PARTIAL:
            zmsg_addmem (msg, self->rid, 16);
            s_put32 (buf, self->seq);
            zmsg_addmem (msg, buf, 4);
            s_append_copy (msg, self->body);
            if (self->envelope && zframe_size (self->envelope))
                s_append_copy (msg, self->envelope);
            break;
        case GW_MSG_FINAL:
            zmsg_addmem (msg, self->rid, 16);
            buf[0] = (byte)(self->status >> 8);
            buf[1] = (byte)self->status;
            zmsg_addmem (msg, buf, 2);
            s_append_copy (msg, self->envelope);
            s_append_copy (msg, self->body);
            break;
        case GW_MSG_CANCEL:
            zmsg_addmem (msg, self->rid, 16);
            buf[0] = (byte)(self->status >> 8);
            buf[1] = (byte)self->status;
            zmsg_addmem (msg, buf, 2);
            break;
        case GW_MSG_CREDIT:
            zmsg_addmem (msg, self->rid, 16);
            s_put32 (buf, self->credit);
            zmsg_addmem (msg, buf, 4);
            break;
        case GW_MSG_PING:
            if (self->role)
                zmsg_addmem (msg, &self->role, 1);
            break;
        default:
            break;
    }
}

zmsg_t *
gw_msg_encode (gw_msg_t *self)
{
    assert (self);
    zmsg_t *msg = zmsg_new ();
    if (self->routing_id)
        s_append_copy (msg, self->routing_id);
    s_encode_into (self, msg);
    return msg;
}

//  Send one frame without taking ownership: zmq_msg_copy shares the buffer.
//  output is the zsock_t, not its libzmq handle: czmq resolves its own
//  objects at once, a raw handle only through a socket option lookup.
static int
s_send_ref (zsock_t *output, zframe_t *frame, bool more)
{
    return zframe_send (&frame, output, ZFRAME_REUSE | (more ? ZFRAME_MORE : 0));
}

static int
s_send_mem (void *handle, const void *data, size_t size, bool more)
{
    return zmq_send (handle, data, size, more ? ZMQ_SNDMORE : 0) < 0 ? -1 : 0;
}

static int
s_send_payload (zsock_t *output, void *handle, zframe_t *frame, bool more)
{
    if (frame)
        return s_send_ref (output, frame, more);
    return s_send_mem (handle, "", 0, more);
}

int
gw_msg_send (gw_msg_t *self, zsock_t *output)
{
    assert (self);
    assert (output);
    s_materialize (self);
    void *handle = zsock_resolve (output);
    if (zsock_type (output) == ZMQ_ROUTER) {
        if (!self->routing_id)
            return -1;
        if (s_send_ref (output, self->routing_id, true))
            return -1;
    }
    //  The first frame after the routing id decides whether the peer is
    //  reachable (ROUTER_MANDATORY); once it is sent the rest follow.
    byte head[5];
    memcpy (head, GW_MSG_SIGNATURE, 4);
    head[4] = (byte)self->id;
    if (s_send_mem (handle, head, 4, true))
        return -1;
    bool frames = self->id <= GW_MSG_CREDIT || (self->id == GW_MSG_PING && self->role);
    if (s_send_mem (handle, head + 4, 1, frames))
        return -1;
    byte buf[16];
    int rc = 0;
    switch (self->id) {
        case GW_MSG_READY:
            rc |= s_send_mem (handle, self->service, strlen (self->service), true);
            s_put32 (buf, self->capacity);
            s_put32 (buf + 4, self->flags);
            rc |= s_send_mem (handle, buf, 4, true);
            rc |= s_send_mem (handle, buf + 4, 4, true);
            rc |= s_send_mem (handle, self->label, strlen (self->label), false);
            break;
        case GW_MSG_REQUEST:
        case GW_MSG_FORWARD:
            rc |= s_send_mem (handle, self->rid, 16, true);
            rc |= s_send_mem (handle, self->service, strlen (self->service), true);
            s_put64 (buf, self->deadline);
            s_put32 (buf + 8, self->window);
            s_put32 (buf + 12, self->flags);
            rc |= s_send_mem (handle, buf, 16, true);
            rc |= s_send_payload (output, handle, self->envelope, true);
            rc |= s_send_payload (output, handle, self->body, false);
            break;
        case GW_MSG_PARTIAL: {
            bool envelope = self->envelope && zframe_size (self->envelope);
            rc |= s_send_mem (handle, self->rid, 16, true);
            s_put32 (buf, self->seq);
            rc |= s_send_mem (handle, buf, 4, true);
            rc |= s_send_payload (output, handle, self->body, envelope);
            if (envelope)
                rc |= s_send_ref (output, self->envelope, false);
            break;
        }
        case GW_MSG_FINAL:
            rc |= s_send_mem (handle, self->rid, 16, true);
            buf[0] = (byte)(self->status >> 8);
            buf[1] = (byte)self->status;
            rc |= s_send_mem (handle, buf, 2, true);
            rc |= s_send_payload (output, handle, self->envelope, true);
            rc |= s_send_payload (output, handle, self->body, false);
            break;
        case GW_MSG_CANCEL:
            rc |= s_send_mem (handle, self->rid, 16, true);
            buf[0] = (byte)(self->status >> 8);
            buf[1] = (byte)self->status;
            rc |= s_send_mem (handle, buf, 2, false);
            break;
        case GW_MSG_CREDIT:
            rc |= s_send_mem (handle, self->rid, 16, true);
            s_put32 (buf, self->credit);
            rc |= s_send_mem (handle, buf, 4, false);
            break;
        case GW_MSG_PING:
            if (self->role)
                rc |= s_send_mem (handle, &self->role, 1, false);
            break;
        default:
            break;
    }
    return rc ? -1 : 0;
}

gw_msg_t *
gw_msg_dup (gw_msg_t *self)
{
    assert (self);
    s_materialize (self);
    gw_msg_t *copy = (gw_msg_t *)zmalloc (sizeof (gw_msg_t));
    assert (copy);
    *copy = *self;
    copy->routing_id = self->routing_id ? zframe_dup (self->routing_id) : NULL;
    copy->envelope = self->envelope ? zframe_dup (self->envelope) : NULL;
    copy->body = self->body ? zframe_dup (self->body) : NULL;
    return copy;
}

const char *
gw_msg_reason (gw_msg_t *self)
{
    return self->reason;
}

void
gw_msg_set_body_max (gw_msg_t *self, size_t body_max)
{
    self->body_max = body_max;
}

const char *
gw_msg_command (int id)
{
    return id >= GW_MSG_READY && id <= GW_MSG_DISCONNECT ? s_commands[id] : s_commands[0];
}

int
gw_msg_id (gw_msg_t *self)
{
    return self->id;
}

void
gw_msg_set_id (gw_msg_t *self, int id)
{
    self->id = id;
}

zframe_t *
gw_msg_routing_id (gw_msg_t *self)
{
    return self->routing_id;
}

void
gw_msg_set_routing_id (gw_msg_t *self, zframe_t *routing_id)
{
    zframe_destroy (&self->routing_id);
    self->routing_id = routing_id ? zframe_dup (routing_id) : NULL;
}

const uint8_t *
gw_msg_rid (gw_msg_t *self)
{
    return self->rid;
}

bool
gw_msg_has_rid (gw_msg_t *self)
{
    return self->has_rid;
}

void
gw_msg_set_rid (gw_msg_t *self, const uint8_t rid[16])
{
    memcpy (self->rid, rid, 16);
    self->has_rid = true;
}

const char *
gw_msg_service (gw_msg_t *self)
{
    return self->service;
}

int
gw_msg_set_service (gw_msg_t *self, const char *service)
{
    size_t size = service ? strlen (service) : 0;
    if (!gw_msg_service_valid (service, size))
        return -1;
    memcpy (self->service, service, size + 1);
    return 0;
}

uint64_t
gw_msg_deadline (gw_msg_t *self)
{
    return self->deadline;
}

void
gw_msg_set_deadline (gw_msg_t *self, uint64_t deadline_ms)
{
    self->deadline = deadline_ms;
}

uint32_t
gw_msg_window (gw_msg_t *self)
{
    return self->window;
}

void
gw_msg_set_window (gw_msg_t *self, uint32_t window)
{
    self->window = window;
}

uint32_t
gw_msg_flags (gw_msg_t *self)
{
    return self->flags;
}

void
gw_msg_set_flags (gw_msg_t *self, uint32_t flags)
{
    self->flags = flags;
}

uint32_t
gw_msg_capacity (gw_msg_t *self)
{
    return self->capacity;
}

void
gw_msg_set_capacity (gw_msg_t *self, uint32_t capacity)
{
    self->capacity = capacity;
}

const char *
gw_msg_label (gw_msg_t *self)
{
    return self->label;
}

void
gw_msg_set_label (gw_msg_t *self, const char *label)
{
    snprintf (self->label, sizeof (self->label), "%s", label ? label : "");
}

uint32_t
gw_msg_seq (gw_msg_t *self)
{
    return self->seq;
}

void
gw_msg_set_seq (gw_msg_t *self, uint32_t seq)
{
    self->seq = seq;
}

uint16_t
gw_msg_status (gw_msg_t *self)
{
    return self->status;
}

void
gw_msg_set_status (gw_msg_t *self, uint16_t status)
{
    self->status = status;
}

uint32_t
gw_msg_credit (gw_msg_t *self)
{
    return self->credit;
}

void
gw_msg_set_credit (gw_msg_t *self, uint32_t credit)
{
    self->credit = credit;
}

char
gw_msg_role (gw_msg_t *self)
{
    return self->role;
}

void
gw_msg_set_role (gw_msg_t *self, char role)
{
    self->role = role;
}

zframe_t *
gw_msg_envelope (gw_msg_t *self)
{
    s_materialize (self);
    return self->envelope;
}

void
gw_msg_set_envelope (gw_msg_t *self, zframe_t **frame_p)
{
    self->live = NULL;
    zframe_destroy (&self->envelope);
    if (frame_p) {
        self->envelope = *frame_p;
        *frame_p = NULL;
    }
}

zframe_t *
gw_msg_body (gw_msg_t *self)
{
    return self->body;
}

void
gw_msg_set_body (gw_msg_t *self, zframe_t **frame_p)
{
    zframe_destroy (&self->body);
    if (frame_p) {
        self->body = *frame_p;
        *frame_p = NULL;
    }
}

zframe_t *
gw_msg_take_body (gw_msg_t *self)
{
    zframe_t *frame = self->body;
    self->body = NULL;
    return frame;
}

void
gw_msg_set_live_envelope (gw_msg_t *self, gw_envelope_t *envelope)
{
    assert (self);
    self->live = envelope;
}

gw_envelope_t *
gw_msg_live_envelope (gw_msg_t *self)
{
    assert (self);
    return self->live;
}

zframe_t *
gw_msg_take_envelope (gw_msg_t *self)
{
    s_materialize (self);
    zframe_t *frame = self->envelope;
    self->envelope = NULL;
    return frame;
}

//  --------------------------------------------------------------------------
//  Self test

static zmsg_t *
s_build (int count, ...)
{
    va_list args;
    va_start (args, count);
    zmsg_t *msg = zmsg_new ();
    for (int i = 0; i < count; i++) {
        const char *data = va_arg (args, const char *);
        int size = va_arg (args, int);
        zmsg_addmem (msg, data, (size_t)size);
    }
    va_end (args);
    return msg;
}

int
gw_msg_error_pack (
    msgpack_packer *pk, const char *type, const char *code, const char *message)
{
    int rc = msgpack_pack_map (pk, 1);
    rc |= gw_mpack_str (pk, "error");
    rc |= msgpack_pack_map (pk, 4);
    rc |= gw_mpack_str (pk, "message");
    rc |= gw_mpack_str (pk, message ? message : "");
    rc |= gw_mpack_str (pk, "type");
    rc |= gw_mpack_str (pk, type ? type : "server_error");
    rc |= gw_mpack_str (pk, "param");
    rc |= msgpack_pack_nil (pk);
    rc |= gw_mpack_str (pk, "code");
    rc |= code ? gw_mpack_str (pk, code) : msgpack_pack_nil (pk);
    return rc ? -1 : 0;
}

zframe_t *
gw_msg_error_body (const char *type, const char *code, const char *message)
{
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    gw_msg_error_pack (&pk, type, code, message);
    zframe_t *frame = zframe_new (sbuf.data, sbuf.size);
    assert (frame);
    msgpack_sbuffer_destroy (&sbuf);
    return frame;
}

//  True if the error body holds key with the string value text, or nil if
//  text is NULL.
static bool
s_test_error_field (zframe_t *body, const char *key, const char *text)
{
    gw_mreader_t reader;
    gw_mvalue_t value;
    gw_mreader_init (&reader, zframe_data (body), zframe_size (body));
    if (gw_mreader_find (&reader, "error") || gw_mreader_find (&reader, key) ||
        gw_mreader_next (&reader, &value))
        return false;
    return text ? gw_mvalue_streq (&value, text) : value.type == GW_MP_NIL;
}

void
gw_msg_test (bool verbose)
{
    printf (" * gw_msg: ");
    uint8_t rid[16];
    gw_rid_new (rid);

    //  Every command round-trips through a real DEALER/ROUTER pair.
    zsock_t *router = zsock_new_router ("inproc://gw_msg_test");
    zsock_t *dealer = zsock_new_dealer (">inproc://gw_msg_test");
    assert (router && dealer);

    gw_msg_t *msg = gw_msg_new (GW_MSG_REQUEST);
    gw_msg_set_rid (msg, rid);
    assert (gw_msg_set_service (msg, "model.tiny/v1:x") == 0);
    assert (gw_msg_set_service (msg, "bad service") == -1);
    assert (gw_msg_set_service (msg, "") == -1);
    gw_msg_set_deadline (msg, 1234567890123ULL);
    gw_msg_set_window (msg, 64);
    gw_msg_set_flags (msg, GW_REQUEST_STREAM);
    zframe_t *env = zframe_new ("\x81\xa1v\x01", 4);
    zframe_t *body = zframe_new ("\x80", 1);
    gw_msg_set_envelope (msg, &env);
    gw_msg_set_body (msg, &body);
    assert (!env && !body);
    assert (gw_msg_send (msg, dealer) == 0);
    assert (gw_msg_send (msg, dealer) == 0);  //  still intact: send twice

    gw_msg_t *in = gw_msg_new (0);
    for (int round = 0; round < 2; round++) {
        assert (gw_msg_recv (in, router) == GW_MSG_OK);
        assert (gw_msg_id (in) == GW_MSG_REQUEST);
        assert (gw_msg_routing_id (in));
        assert (memcmp (gw_msg_rid (in), rid, 16) == 0);
        assert (streq (gw_msg_service (in), "model.tiny/v1:x"));
        assert (gw_msg_deadline (in) == 1234567890123ULL);
        assert (gw_msg_window (in) == 64);
        assert (gw_msg_flags (in) == GW_REQUEST_STREAM);
        assert (zframe_size (gw_msg_envelope (in)) == 4);
        assert (zframe_size (gw_msg_body (in)) == 1);
    }

    //  Router -> dealer, each command.
    int ids[] = {GW_MSG_PARTIAL, GW_MSG_FINAL, GW_MSG_CANCEL, GW_MSG_CREDIT, GW_MSG_PING,
        GW_MSG_PONG, GW_MSG_DISCONNECT, GW_MSG_REQUEST};
    for (size_t i = 0; i < sizeof (ids) / sizeof (ids[0]); i++) {
        gw_msg_set_id (in, ids[i]);
        gw_msg_set_seq (in, 7);
        gw_msg_set_status (in, 429);
        gw_msg_set_credit (in, 5);
        assert (gw_msg_send (in, router) == 0);
        gw_msg_t *out = gw_msg_new (0);
        assert (gw_msg_recv (out, dealer) == GW_MSG_OK);
        assert (gw_msg_id (out) == ids[i]);
        assert (!gw_msg_routing_id (out));
        if (ids[i] == GW_MSG_PARTIAL)  //  with the optional envelope frame
            assert (gw_msg_seq (out) == 7 && zframe_size (gw_msg_body (out)) == 1 &&
                zframe_size (gw_msg_envelope (out)) == 4);
        if (ids[i] == GW_MSG_FINAL)
            assert (
                gw_msg_status (out) == 429 && zframe_size (gw_msg_envelope (out)) == 4);
        if (ids[i] == GW_MSG_CANCEL)
            assert (gw_msg_status (out) == 429);
        if (ids[i] == GW_MSG_CREDIT)
            assert (gw_msg_credit (out) == 5);
        if (ids[i] <= GW_MSG_CREDIT)
            assert (memcmp (gw_msg_rid (out), rid, 16) == 0);
        gw_msg_destroy (&out);
    }

    //  READY
    gw_msg_t *ready = gw_msg_new (GW_MSG_READY);
    gw_msg_set_service (ready, "auth");
    gw_msg_set_capacity (ready, 100);
    gw_msg_set_flags (ready, GW_READY_IDEMPOTENT);
    gw_msg_set_label (ready, "host:42");
    assert (gw_msg_send (ready, dealer) == 0);
    assert (gw_msg_recv (in, router) == GW_MSG_OK);
    assert (gw_msg_id (in) == GW_MSG_READY);
    assert (streq (gw_msg_service (in), "auth"));
    assert (gw_msg_capacity (in) == 100);
    assert (gw_msg_flags (in) == GW_READY_IDEMPOTENT);
    assert (streq (gw_msg_label (in), "host:42"));

    //  encode/decode and dup
    gw_msg_t *copy = gw_msg_dup (msg);
    zmsg_t *zmsg = gw_msg_encode (copy);
    assert (zmsg_size (zmsg) == 7);
    gw_msg_t *back = gw_msg_new (0);
    assert (gw_msg_decode (back, &zmsg, false) == GW_MSG_OK);
    assert (!zmsg);
    assert (gw_msg_id (back) == GW_MSG_REQUEST && gw_msg_window (back) == 64);
    gw_msg_destroy (&back);
    gw_msg_destroy (&copy);

    //  Malformed frame sets: each is rejected with a reason, never a crash.
    struct {
        zmsg_t *msg;
        const char *reason;
    } bad[] = {
        {s_build (1, "GWP1", 4), "too few frames"},
        {s_build (2, "GWP2", 4, "\x08", 1), "bad signature"},
        {s_build (2, "GWP1", 4, "\x0b", 1), "unknown command"},
        {s_build (2, "GWP1", 4, "\x00", 1), "unknown command"},
        {s_build (2, "GWP1", 4, "\x08\x08", 2), "bad command frame"},
        {s_build (3, "GWP1", 4, "\x02", 1, "short", 5), "too few frames for command"},
        {s_build (7, "GWP1", 4, "\x02", 1, "0123456789abcdef", 15, "svc", 3,
             "0123456789abcdef", 16, "", 0, "", 0),
            "bad request id"},
        {s_build (7, "GWP1", 4, "\x02", 1, "0123456789abcdef", 16, "s c", 3,
             "0123456789abcdef", 16, "", 0, "", 0),
            "bad service name"},
        {s_build (7, "GWP1", 4, "\x02", 1, "0123456789abcdef", 16, "svc", 3, "0123", 4,
             "", 0, "", 0),
            "bad meta frame"},
        {s_build (6, "GWP1", 4, "\x01", 1, "svc", 3, "\0\0\0\0", 4, "\0\0\0\0", 4, "", 0),
            "capacity out of range"},
        {s_build (4, "GWP1", 4, "\x07", 1, "0123456789abcdef", 16, "\0\0\0\0", 4),
            "credit out of range"},
        {s_build (4, "GWP1", 4, "\x07", 1, "0123456789abcdef", 16, "\0\0\0", 3),
            "bad credit frame"},
        {s_build (6, "GWP1", 4, "\x05", 1, "0123456789abcdef", 16, "\0", 1, "", 0, "", 0),
            "bad status frame"},
    };
    for (size_t i = 0; i < sizeof (bad) / sizeof (bad[0]); i++) {
        gw_msg_t *m = gw_msg_new (0);
        int rc = gw_msg_decode (m, &bad[i].msg, false);
        if (verbose)
            printf ("\n   bad[%zu]: %s", i, gw_msg_reason (m));
        assert (rc == GW_MSG_MALFORMED);
        assert (streq (gw_msg_reason (m), bad[i].reason));
        gw_msg_destroy (&m);
    }
    //  Too many frames
    zmsg_t *many = zmsg_new ();
    for (int i = 0; i < GW_FRAMES_MAX + 2; i++)
        zmsg_addstr (many, "x");
    gw_msg_t *m = gw_msg_new (0);
    assert (gw_msg_decode (m, &many, false) == GW_MSG_MALFORMED);
    assert (streq (gw_msg_reason (m), "too many frames"));
    //  Body over the configured bound
    gw_msg_set_body_max (m, 8);
    zmsg_t *big = s_build (
        5, "GWP1", 4, "\x04", 1, "0123456789abcdef", 16, "\0\0\0\1", 4, "0123456789", 10);
    assert (gw_msg_decode (m, &big, false) == GW_MSG_MALFORMED);
    assert (streq (gw_msg_reason (m), "payload too large"));
    //  The rid is still available after a later-frame failure, so the broker
    //  can answer FINAL 400.
    assert (gw_msg_has_rid (m));
    //  PARTIAL: without frame 5 there is no envelope; an empty frame 5 is
    //  none either; an envelope over its bound is refused; a frame after
    //  the envelope is ignored. Encoding round-trips the envelope.
    zmsg_t *partial =
        s_build (4, "GWP1", 4, "\x04", 1, "0123456789abcdef", 16, "\0\0\0\1", 4);
    zmsg_addstr (partial, "data");
    assert (gw_msg_decode (m, &partial, false) == GW_MSG_OK);
    assert (gw_msg_seq (m) == 1 && !gw_msg_envelope (m));
    partial = s_build (
        6, "GWP1", 4, "\x04", 1, "0123456789abcdef", 16, "\0\0\0\2", 4, "data", 4, "", 0);
    assert (gw_msg_decode (m, &partial, false) == GW_MSG_OK && !gw_msg_envelope (m));
    partial = s_build (7, "GWP1", 4, "\x04", 1, "0123456789abcdef", 16, "\0\0\0\3", 4,
        "data", 4, "\x81\xa1v\x01", 4, "future", 6);
    assert (gw_msg_decode (m, &partial, false) == GW_MSG_OK);
    assert (gw_msg_seq (m) == 3 && zframe_size (gw_msg_envelope (m)) == 4);
    zmsg_t *again = gw_msg_encode (m);
    assert (zmsg_size (again) == 6);
    gw_msg_t *back2 = gw_msg_new (0);
    assert (gw_msg_decode (back2, &again, false) == GW_MSG_OK);
    assert (memcmp (zframe_data (gw_msg_envelope (back2)), "\x81\xa1v\x01", 4) == 0);
    assert (zframe_streq (gw_msg_body (back2), "data"));
    gw_msg_destroy (&back2);
    partial = s_build (
        5, "GWP1", 4, "\x04", 1, "0123456789abcdef", 16, "\0\0\0\4", 4, "data", 4);
    zframe_t *huge = zframe_new (NULL, GW_ENVELOPE_MAX + 1);
    zmsg_append (partial, &huge);
    assert (gw_msg_decode (m, &partial, false) == GW_MSG_MALFORMED);
    assert (streq (gw_msg_reason (m), "envelope too large"));
    //  Extra trailing frames are ignored (forward compatibility).
    zmsg_t *extra = s_build (3, "GWP1", 4, "\x08", 1, "future", 6);
    assert (gw_msg_decode (m, &extra, false) == GW_MSG_OK);
    assert (gw_msg_id (m) == GW_MSG_PING);
    gw_msg_destroy (&m);

    //  Malformed frame set over a socket leaves the socket in sync.
    zmsg_t *junk = s_build (3, "junk", 4, "x", 1, "y", 1);
    zmsg_send (&junk, dealer);
    gw_msg_send (ready, dealer);
    assert (gw_msg_recv (in, router) == GW_MSG_MALFORMED);
    assert (gw_msg_recv (in, router) == GW_MSG_OK && gw_msg_id (in) == GW_MSG_READY);

    //  PING role: sent when set, 'C' when absent.
    gw_msg_t *ping = gw_msg_new (GW_MSG_PING);
    gw_msg_set_role (ping, 'W');
    assert (gw_msg_send (ping, dealer) == 0);
    assert (gw_msg_recv (in, router) == GW_MSG_OK && gw_msg_role (in) == 'W');
    gw_msg_set_role (ping, 0);
    assert (gw_msg_send (ping, dealer) == 0);
    assert (gw_msg_recv (in, router) == GW_MSG_OK && gw_msg_role (in) == 'C');
    gw_msg_destroy (&ping);

    assert (streq (gw_msg_command (GW_MSG_FINAL), "FINAL"));
    assert (streq (gw_msg_command (99), "UNKNOWN"));

    //  Error bodies: the OpenAI error object, one map of four keys.
    zframe_t *error = gw_msg_error_body ("gateway_error", "no_worker", "none");
    assert (gw_mpack_check (zframe_data (error), zframe_size (error), 4, 16) == 0);
    assert (s_test_error_field (error, "message", "none"));
    assert (s_test_error_field (error, "type", "gateway_error"));
    assert (s_test_error_field (error, "param", NULL));
    assert (s_test_error_field (error, "code", "no_worker"));
    zframe_destroy (&error);
    error = gw_msg_error_body (NULL, NULL, NULL);
    assert (s_test_error_field (error, "message", ""));
    assert (s_test_error_field (error, "type", "server_error"));
    assert (s_test_error_field (error, "code", NULL));
    assert (!s_test_error_field (error, "param", "x"));
    zframe_destroy (&error);

    //  A live envelope stands for the frame: written when the frame is
    //  asked for (here by gw_msg_dup, then by a send), dropped by a new
    //  frame.
    gw_envelope_t *live = gw_envelope_new ();
    gw_envelope_set_model (live, "live-model");
    gw_msg_set_live_envelope (msg, live);
    assert (gw_msg_live_envelope (msg) == live);
    gw_msg_t *twin = gw_msg_dup (msg);
    assert (!gw_msg_live_envelope (msg) && !gw_msg_live_envelope (twin));
    gw_envelope_t *seen = gw_envelope_new ();
    zframe_t *frame = gw_msg_envelope (twin);
    assert (gw_envelope_decode (seen, zframe_data (frame), zframe_size (frame)) == 0);
    assert (streq (gw_envelope_model (seen), "live-model"));
    gw_envelope_set_model (live, "sent-model");
    gw_msg_set_live_envelope (twin, live);
    assert (gw_msg_send (twin, dealer) == 0);
    gw_msg_t *got = gw_msg_new (0);
    assert (gw_msg_recv (got, router) == GW_MSG_OK && !gw_msg_live_envelope (got));
    frame = gw_msg_envelope (got);
    assert (gw_envelope_decode (seen, zframe_data (frame), zframe_size (frame)) == 0);
    assert (streq (gw_envelope_model (seen), "sent-model"));
    gw_msg_set_live_envelope (got, live);
    gw_msg_set_envelope (got, NULL);
    assert (!gw_msg_live_envelope (got) && !gw_msg_envelope (got));
    gw_msg_destroy (&got);
    gw_msg_destroy (&twin);
    gw_envelope_destroy (&seen);
    gw_envelope_destroy (&live);

    gw_msg_destroy (&ready);
    gw_msg_destroy (&in);
    gw_msg_destroy (&msg);
    zsock_destroy (&dealer);
    zsock_destroy (&router);
    printf ("OK\n");
}
