//  --------------------------------------------------------------------------
//  gw_link — the DEALER connection a GWP/1 session (gw_worker, gw_client)
//  keeps to the broker: one socket with the options of PROTOCOL.md §9, its
//  connection monitor (PROTOCOL.md §3.5.6), and the time of the last send.
//
//  A link is one socket for its whole life: a session that must reconnect
//  on a fresh socket (new routing id) destroys its link and makes a new one.
//  All methods run on the session's thread; a gw_link_t is not thread safe.

#ifndef GW_LINK_H_INCLUDED
#define GW_LINK_H_INCLUDED

#include <czmq.h>
#include <stdint.h>
#include <stdbool.h>
#include "gw_msg.h"

typedef struct _gw_link_t gw_link_t;

//  Results of gw_link_events (a bit set)
#define GW_LINK_UP 0x01  //  the connection came up (connected or handshake done)
#define GW_LINK_LOST 0x02  //  the connection dropped after it was up

//  --------------------------------------------------------------------------
//  Create a fresh, unconnected DEALER with the options of PROTOCOL.md §9:
//  send/receive HWM 100 000, linger 0, ZMQ_IMMEDIATE 1, send and receive
//  timeouts 0, and ZMTP heartbeats (interval heartbeat_ms, timeout and TTL
//  expiry_ms). name (e.g. "worker echo", "client") prefixes log lines.
//  Aborts on out-of-memory; never returns NULL.

gw_link_t *gw_link_new (const char *name, int heartbeat_ms, int expiry_ms);

//  Destroy the link: stop the monitor and close the socket (frame sets not
//  yet sent are dropped unless gw_link_set_linger was called). Idempotent;
//  nulls the caller's reference.
void gw_link_destroy (gw_link_t **self_p);

//  Set the ZMTP heartbeat options; they apply from the socket's next
//  connection.
void gw_link_set_heartbeat (gw_link_t *self, int heartbeat_ms, int expiry_ms);

//  Let gw_link_destroy wait up to linger_ms for queued frame sets to leave
//  (a final DISCONNECT, CANCELs). Default 0.
void gw_link_set_linger (gw_link_t *self, int linger_ms);

//  Start the connection monitor and connect the socket to endpoint; the
//  last-send time is reset to now. Returns 0, or -1 if the endpoint is
//  invalid (the monitor is stopped again; connect may be retried). A
//  monitor that cannot start is logged and the link works without it.
int gw_link_connect (gw_link_t *self, const char *endpoint);

//  Read every pending monitor event; never blocks. Returns a set of
//  GW_LINK_UP (the connection came up) and GW_LINK_LOST (it dropped after it
//  was up; reading stops at that event). 0 if nothing happened or there is
//  no monitor.
int gw_link_events (gw_link_t *self);

//  True while the monitor has seen the connection up and not lost.
bool gw_link_up (gw_link_t *self);

//  Send msg (gw_msg_send; msg keeps its fields) and note the time. Returns
//  0, or -1 if the socket refused it at once (handshake pending, no
//  connection, high-water mark).
int gw_link_send (gw_link_t *self, gw_msg_t *msg);

//  True if a frame set is waiting to be received on the socket.
bool gw_link_input (gw_link_t *self);

//  Mono ms of the last successful send (or of connect, or new).
int64_t gw_link_last_send (gw_link_t *self);

//  Frame sets sent since new.
uint64_t gw_link_sends (gw_link_t *self);

//  The DEALER, for receiving and polling. Owned by the link; valid until
//  the link is destroyed.
zsock_t *gw_link_socket (gw_link_t *self);

//  Self test of this class.
void gw_link_test (bool verbose);

#endif
