//  --------------------------------------------------------------------------
//  gw_mpack — a bounded msgpack reader.
//
//  msgpack-c's unpacker trusts declared array/map/str lengths and will try to
//  allocate gigabytes for a 5-byte input. Everything aigw reads from the bus
//  goes through this reader instead: a pull cursor over a byte range that
//  allocates nothing, refuses any declared count larger than the bytes left,
//  and bounds depth. Writing uses msgpack-c's msgpack_packer (safe: we choose
//  the sizes).
//
//  The reader struct is public so it can live on the stack (hot path, no
//  allocation); treat its fields as private.

#ifndef GW_MPACK_H_INCLUDED
#define GW_MPACK_H_INCLUDED

#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>
#include <msgpack.h>

typedef enum {
    GW_MP_NIL = 1,
    GW_MP_BOOL,
    GW_MP_UINT,  //  non-negative integer (any msgpack int >= 0)
    GW_MP_INT,  //  negative integer
    GW_MP_FLOAT,  //  float32 or float64, widened to double
    GW_MP_STR,
    GW_MP_BIN,
    GW_MP_ARRAY,  //  header only: count elements follow
    GW_MP_MAP,  //  header only: count key/value pairs follow
    GW_MP_EXT
} gw_mp_type_t;

typedef struct {
    gw_mp_type_t type;
    union {
        bool b;
        uint64_t u;
        int64_t i;
        double f;
        uint32_t count;  //  ARRAY elements, MAP pairs
    } v;
    const char *ptr;  //  STR, BIN, EXT: data (not NUL-terminated)
    uint32_t size;  //  STR, BIN, EXT: length in bytes
    int8_t ext_type;  //  EXT only
} gw_mvalue_t;

typedef struct {
    const uint8_t *pos;  //  next byte to read
    const uint8_t *end;  //  one past the last byte
    int error;  //  0, or -1 once anything failed (sticky)
} gw_mreader_t;

//  Start reading size bytes at data. Never fails.
void gw_mreader_init (gw_mreader_t *self, const void *data, size_t size);

//  Read the next token into value. For ARRAY and MAP only the header is read;
//  the caller reads (or skips) the elements. Returns 0, or -1 on truncated or
//  malformed input, or when a declared count exceeds the bytes left (each
//  element needs at least one byte). Errors are sticky.
int gw_mreader_next (gw_mreader_t *self, gw_mvalue_t *value);

//  Skip one whole object (recursively), at most max_depth levels deep.
//  Returns 0 or -1.
int gw_mreader_skip (gw_mreader_t *self, int max_depth);

//  Bytes not yet read.
size_t gw_mreader_left (gw_mreader_t *self);

//  Validate that data holds exactly one well-formed msgpack object of at most
//  max_depth nesting levels and at most max_items values in total, and nothing
//  after it. Returns 0 if valid, -1 if not. After this, msgpack-c's unpacker
//  may be used on the data safely (its allocations are then bounded by about
//  48 bytes per input byte); note that msgpack-c itself fails on more than 32
//  nesting levels (MSGPACK_EMBED_STACK_SIZE), so pass max_depth <= 32 if the
//  data will be unpacked with it. Recursion is max_depth deep.
int gw_mpack_check (const void *data, size_t size, int max_depth, size_t max_items);

//  With the reader positioned at a MAP header (not yet read), find the value
//  for a string key in that map and leave the reader positioned at that value.
//  Returns 0 if found, 1 if the map has no such key (reader then at the end
//  of the map), -1 on malformed input.
int gw_mreader_find (gw_mreader_t *self, const char *key);

//  True if value is a STR equal to the NUL-terminated text.
bool gw_mvalue_streq (const gw_mvalue_t *value, const char *text);

//  Pack a NUL-terminated string (header + bytes) with msgpack-c's packer.
int gw_mpack_str (msgpack_packer *pk, const char *text);

//  Self test of this class.
void gw_mpack_test (bool verbose);

#endif
