//  --------------------------------------------------------------------------
//  fuzz_msg — libFuzzer target for the GWP/1 frame codec (gw_msg).
//
//  The input is cut into frames: byte 0 says whether the first frame is a
//  ROUTER routing id (bit 0); then each frame is a length byte followed by
//  that many bytes (a short last frame takes what is left). The frame set is
//  decoded; when decoding succeeds, encoding and decoding again must give a
//  message with the same fields (the codec is its own inverse).

#include "aigw.h"

static void
s_same (gw_msg_t *a, gw_msg_t *b)
{
    if (gw_msg_id (a) != gw_msg_id (b))
        abort ();
    if (gw_msg_has_rid (a) != gw_msg_has_rid (b) ||
        (gw_msg_has_rid (a) && memcmp (gw_msg_rid (a), gw_msg_rid (b), 16)))
        abort ();
    switch (gw_msg_id (a)) {
        case GW_MSG_READY:
            if (strcmp (gw_msg_service (a), gw_msg_service (b)) ||
                gw_msg_capacity (a) != gw_msg_capacity (b) ||
                gw_msg_flags (a) != gw_msg_flags (b) ||
                strcmp (gw_msg_label (a), gw_msg_label (b)))
                abort ();
            break;
        case GW_MSG_REQUEST:
        case GW_MSG_FORWARD:
            if (strcmp (gw_msg_service (a), gw_msg_service (b)) ||
                gw_msg_deadline (a) != gw_msg_deadline (b) ||
                gw_msg_window (a) != gw_msg_window (b) ||
                gw_msg_flags (a) != gw_msg_flags (b) ||
                !zframe_eq (gw_msg_envelope (a), gw_msg_envelope (b)) ||
                !zframe_eq (gw_msg_body (a), gw_msg_body (b)))
                abort ();
            break;
        case GW_MSG_PARTIAL:
            //  The optional envelope frame: absent (NULL) on both, or equal.
            if (gw_msg_seq (a) != gw_msg_seq (b) ||
                !zframe_eq (gw_msg_body (a), gw_msg_body (b)) ||
                (gw_msg_envelope (a) == NULL) != (gw_msg_envelope (b) == NULL) ||
                (gw_msg_envelope (a) &&
                    !zframe_eq (gw_msg_envelope (a), gw_msg_envelope (b))))
                abort ();
            break;
        case GW_MSG_FINAL:
            if (gw_msg_status (a) != gw_msg_status (b) ||
                !zframe_eq (gw_msg_envelope (a), gw_msg_envelope (b)) ||
                !zframe_eq (gw_msg_body (a), gw_msg_body (b)))
                abort ();
            break;
        case GW_MSG_CANCEL:
            if (gw_msg_status (a) != gw_msg_status (b))
                abort ();
            break;
        case GW_MSG_CREDIT:
            if (gw_msg_credit (a) != gw_msg_credit (b))
                abort ();
            break;
        case GW_MSG_PING:
            if (gw_msg_role (a) != gw_msg_role (b))
                abort ();
            break;
        default:
            break;
    }
}

//  gw_msg_recv reads frames off a socket by its own path (fixed frames on
//  the stack, payload frames as zframes): it must agree with gw_msg_decode
//  on the same frames. An inproc PAIR carries them; made once.
static zsock_t *s_tx, *s_rx;

static void
s_close (void)
{
    zsock_destroy (&s_tx);
    zsock_destroy (&s_rx);
}

static void
s_check_recv (zmsg_t *frames, int rc_decode, gw_msg_t *decoded)
{
    if (!s_tx) {
        zsys_init ();
        s_rx = zsock_new_pair ("@inproc://fuzz-msg");
        s_tx = zsock_new_pair (">inproc://fuzz-msg");
        if (!s_rx || !s_tx)
            abort ();
        zsock_set_rcvtimeo (s_rx, 1000);
        atexit (s_close);  //  runs before czmq's own exit handler
    }
    size_t count = zmsg_size (frames);
    if (count == 0)
        return;
    void *handle = zsock_resolve (s_tx);
    size_t index = 0;
    for (zframe_t *frame = zmsg_first (frames); frame; frame = zmsg_next (frames))
        if (zmq_send (handle, zframe_data (frame), zframe_size (frame),
                ++index < count ? ZMQ_SNDMORE : 0) < 0)
            abort ();
    gw_msg_t *received = gw_msg_new (0);
    gw_msg_set_body_max (received, 4096);
    int rc = gw_msg_recv (received, s_rx);
    if (rc != rc_decode)
        abort ();
    if (rc == GW_MSG_OK)
        s_same (decoded, received);
    gw_msg_destroy (&received);
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    bool routed = data[0] & 1;
    zmsg_t *msg = zmsg_new ();
    size_t pos = 1;
    while (pos < size && zmsg_size (msg) < 40) {
        size_t len = data[pos++];
        if (len > size - pos)
            len = size - pos;
        zmsg_addmem (msg, data + pos, len);
        pos += len;
    }
    zmsg_t *copy = routed ? NULL : zmsg_dup (msg);
    gw_msg_t *first = gw_msg_new (0);
    gw_msg_set_body_max (first, 4096);
    int rc = gw_msg_decode (first, &msg, routed);
    if (copy) {
        s_check_recv (copy, rc, first);
        zmsg_destroy (&copy);
    }
    if (msg)
        abort ();  //  decode always takes the zmsg
    if (rc == GW_MSG_OK) {
        zmsg_t *again = gw_msg_encode (first);
        gw_msg_t *second = gw_msg_new (0);
        gw_msg_set_body_max (second, 4096);
        if (gw_msg_decode (second, &again, gw_msg_routing_id (first) != NULL) !=
            GW_MSG_OK)
            abort ();
        s_same (first, second);
        gw_msg_destroy (&second);
    }
    else if (rc != GW_MSG_MALFORMED || !*gw_msg_reason (first))
        abort ();
    gw_msg_destroy (&first);
    return 0;
}
