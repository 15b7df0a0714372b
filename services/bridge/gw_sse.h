//  --------------------------------------------------------------------------
//  gw_sse — incremental parser for text/event-stream (the WHATWG "server-sent
//  events" format) as upstream model providers send it.
//
//  Pull style: feed bytes as they arrive (any split), then call gw_sse_next
//  until it returns 0. Lines end with LF, CRLF or CR (a CR at the end of the
//  bytes fed so far is resolved by the next feed); comment lines (":…") and
//  unknown fields are skipped; several data lines join with LF; a blank line
//  dispatches the event if it has data. Line length, event size and bytes
//  buffered are bounded: input beyond them is an error, never a crash.
//
//  Threading: one thread owns a parser.

#ifndef GW_SSE_H_INCLUDED
#define GW_SSE_H_INCLUDED

#include <stddef.h>
#include <stdbool.h>

typedef struct _gw_sse_t gw_sse_t;

//  One dispatched event. Pointers stay valid until the next gw_sse_next,
//  gw_sse_feed or gw_sse_reset on the parser.
typedef struct {
    const char *data;  //  data lines joined with LF (not NUL-terminated)
    size_t size;  //  bytes in data
    const char *name;  //  "event:" field (NUL-terminated, truncated to 63), "" if none
    const char *wire;  //  "data: <data>\n\n" when data is a single line, else NULL
    size_t wire_size;  //  bytes in wire
} gw_sse_event_t;

//  Create a parser: line_max bounds one line, event_max the data of one
//  event (bytes). Both at least 64.
gw_sse_t *gw_sse_new (size_t line_max, size_t event_max);

//  Destroy; nulls the reference.
void gw_sse_destroy (gw_sse_t **self_p);

//  Forget everything buffered (start of a new stream).
void gw_sse_reset (gw_sse_t *self);

//  Append size bytes. Returns 0, or -1 if the bytes buffered and not yet
//  parsed would exceed line_max + 256 KiB (the caller stopped pulling) —
//  nothing is appended then. Errors are not sticky here; see gw_sse_next.
int gw_sse_feed (gw_sse_t *self, const void *data, size_t size);

//  End of stream: a last line or event without its terminator is completed
//  (lenient: "data: [DONE]" at EOF still dispatches). Call gw_sse_next after.
int gw_sse_end (gw_sse_t *self);

//  Next complete event: returns 1 (event filled), 0 (need more bytes), or -1
//  (a line longer than line_max or an event larger than event_max; sticky
//  until gw_sse_reset).
int gw_sse_next (gw_sse_t *self, gw_sse_event_t *event);

//  Bytes fed and not yet consumed by gw_sse_next.
size_t gw_sse_pending (gw_sse_t *self);

//  Self test of this class.
void gw_sse_test (bool verbose);

#endif
