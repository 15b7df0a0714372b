//  --------------------------------------------------------------------------
//  gw_msg — the GWP/1 frame codec: the only code that knows frame layout
//  (proto/PROTOCOL.md §2). A gw_msg_t holds one decoded frame set.
//
//  Typical use on a hot path: keep one gw_msg_t per socket and call
//  gw_msg_recv on it repeatedly; fields are overwritten each time. Frames
//  that carry payload (envelope, body) are kept as zframe_t and sent on by
//  reference (zmq_msg_copy shares the buffer), so relaying never copies
//  payload bytes.
//
//  All methods run on the caller's thread; a gw_msg_t is not thread safe.

#ifndef GW_MSG_H_INCLUDED
#define GW_MSG_H_INCLUDED

#include <czmq.h>
#include <msgpack.h>
#include <stdint.h>
#include <stdbool.h>

typedef struct _gw_msg_t gw_msg_t;

#define GW_MSG_SIGNATURE "GWP1"

//  Command codes (PROTOCOL.md §2)
#define GW_MSG_READY 0x01
#define GW_MSG_REQUEST 0x02
#define GW_MSG_FORWARD 0x03
#define GW_MSG_PARTIAL 0x04
#define GW_MSG_FINAL 0x05
#define GW_MSG_CANCEL 0x06
#define GW_MSG_CREDIT 0x07
#define GW_MSG_PING 0x08
#define GW_MSG_PONG 0x09
#define GW_MSG_DISCONNECT 0x0A

//  READY flags
#define GW_READY_IDEMPOTENT 0x01
//  REQUEST / FORWARD flags
#define GW_REQUEST_STREAM 0x01

//  Bounds
#define GW_SERVICE_MAX 127
#define GW_LABEL_MAX 256
#define GW_ENVELOPE_MAX 65536
#define GW_BODY_MAX_DEFAULT (32 * 1024 * 1024)
#define GW_FRAMES_MAX 16

//  Results of gw_msg_recv / gw_msg_decode
#define GW_MSG_OK 0
#define GW_MSG_NONE -1  //  interrupted, or nothing to read
#define GW_MSG_MALFORMED -2  //  frame set dropped; see gw_msg_reason

//  Create an empty message with the given command code.
gw_msg_t *gw_msg_new (int id);

//  Destroy the message and its frames; nulls the caller's reference.
void gw_msg_destroy (gw_msg_t **self_p);

//  Receive one whole frame set from input (a DEALER, or a ROUTER — then the
//  routing id is kept). Returns GW_MSG_OK, GW_MSG_NONE, or GW_MSG_MALFORMED
//  (the frame set was read entirely and dropped; gw_msg_reason says why; the
//  routing id, and the rid if it could be read, are still set so the caller
//  can answer).
int gw_msg_recv (gw_msg_t *self, zsock_t *input);

//  Decode a frame set held in a zmsg (destroyed). If routed, the first frame
//  is a ROUTER routing id. Same results as gw_msg_recv. Used by tests and fuzzing.
int gw_msg_decode (gw_msg_t *self, zmsg_t **msg_p, bool routed);

//  Send the message on output; on a ROUTER socket the routing id must be set.
//  Payload frames are sent by reference; self keeps all its fields, so it can
//  be sent again. Returns 0, or -1 if the send failed (e.g. EHOSTUNREACH on a
//  ROUTER_MANDATORY socket, or EAGAIN at the high-water mark).
int gw_msg_send (gw_msg_t *self, zsock_t *output);

//  Encode into a new zmsg (routing id first if set). Caller owns the result.
zmsg_t *gw_msg_encode (gw_msg_t *self);

//  Copy of the message (payload frames shared by reference). Caller owns it.
gw_msg_t *gw_msg_dup (gw_msg_t *self);

//  Why the last decode failed ("" if it did not).
const char *gw_msg_reason (gw_msg_t *self);

//  Largest body accepted by recv/decode (default GW_BODY_MAX_DEFAULT).
void gw_msg_set_body_max (gw_msg_t *self, size_t body_max);

//  Command name ("REQUEST") for a code, "UNKNOWN" otherwise.
const char *gw_msg_command (int id);

//  Field accessors. Strings and frames returned are owned by the message.
int gw_msg_id (gw_msg_t *self);
void gw_msg_set_id (gw_msg_t *self, int id);
zframe_t *gw_msg_routing_id (gw_msg_t *self);
//  Set the routing id (copied); NULL clears it.
void gw_msg_set_routing_id (gw_msg_t *self, zframe_t *routing_id);
const uint8_t *gw_msg_rid (gw_msg_t *self);
bool gw_msg_has_rid (gw_msg_t *self);
void gw_msg_set_rid (gw_msg_t *self, const uint8_t rid[16]);
const char *gw_msg_service (gw_msg_t *self);
//  Set the service; returns -1 (unchanged) if not a valid service name.
int gw_msg_set_service (gw_msg_t *self, const char *service);
uint64_t gw_msg_deadline (gw_msg_t *self);
void gw_msg_set_deadline (gw_msg_t *self, uint64_t deadline_ms);
uint32_t gw_msg_window (gw_msg_t *self);
void gw_msg_set_window (gw_msg_t *self, uint32_t window);
uint32_t gw_msg_flags (gw_msg_t *self);
void gw_msg_set_flags (gw_msg_t *self, uint32_t flags);
uint32_t gw_msg_capacity (gw_msg_t *self);
void gw_msg_set_capacity (gw_msg_t *self, uint32_t capacity);
const char *gw_msg_label (gw_msg_t *self);
void gw_msg_set_label (gw_msg_t *self, const char *label);
uint32_t gw_msg_seq (gw_msg_t *self);
void gw_msg_set_seq (gw_msg_t *self, uint32_t seq);
uint16_t gw_msg_status (gw_msg_t *self);
void gw_msg_set_status (gw_msg_t *self, uint16_t status);
uint32_t gw_msg_credit (gw_msg_t *self);
void gw_msg_set_credit (gw_msg_t *self, uint32_t credit);

//  PING role: 'W' worker, 'C' client, 'B' broker; 0 = send no role frame.
//  A received PING without a role frame reads as 'C'.
char gw_msg_role (gw_msg_t *self);
void gw_msg_set_role (gw_msg_t *self, char role);

//  Envelope and body frames (may be NULL = empty). Getters return a borrowed
//  frame; setters take ownership of *frame_p and null it.
zframe_t *gw_msg_envelope (gw_msg_t *self);
void gw_msg_set_envelope (gw_msg_t *self, zframe_t **frame_p);
zframe_t *gw_msg_body (gw_msg_t *self);
void gw_msg_set_body (gw_msg_t *self, zframe_t **frame_p);
//  Detach and return the body frame (caller owns it).
zframe_t *gw_msg_take_body (gw_msg_t *self);
zframe_t *gw_msg_take_envelope (gw_msg_t *self);

//  A decoded envelope that stands for the envelope frame (not owned): a
//  direct hand-off inside one actor (gw_worker_pass) sets it instead of
//  encoding, and the next stage copies it (gw_stage_envelope). It must
//  outlive every use of the message in that call chain; whatever asks for
//  the frame (gw_msg_envelope, take, dup, send, encode) gets it encoded
//  then, and setting a frame drops it.
typedef struct _gw_envelope_t gw_envelope_t;
void gw_msg_set_live_envelope (gw_msg_t *self, gw_envelope_t *envelope);
gw_envelope_t *gw_msg_live_envelope (gw_msg_t *self);

//  True if text is a valid service name (PROTOCOL.md §2, READY).
bool gw_msg_service_valid (const char *text, size_t size);

//  Pack the OpenAI error object of PROTOCOL.md §6, the body of every FINAL
//  with status >= 400: {"error": {"message": message, "type": type,
//  "param": nil, "code": code}}. A NULL message packs "", a NULL type
//  "server_error", a NULL code nil. Returns 0, or -1 if the packer's write
//  failed.
int gw_msg_error_pack (
    msgpack_packer *pk, const char *type, const char *code, const char *message);

//  The same error object as a new frame (caller owns it) for
//  gw_msg_set_body. Never returns NULL.
zframe_t *gw_msg_error_body (const char *type, const char *code, const char *message);

//  Self test of this class.
void gw_msg_test (bool verbose);

#endif
