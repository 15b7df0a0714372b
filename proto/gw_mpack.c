//  --------------------------------------------------------------------------
//  gw_mpack — a bounded msgpack pull reader.
//
//  Design: a cursor (pos, end) over caller-owned bytes. gw_mreader_next reads
//  exactly one token and never allocates. Every length it trusts is checked
//  against the bytes left before use: a str/bin/ext must fit, and an array of
//  n elements (map of n pairs) needs at least n (2n) more bytes, since every
//  msgpack value is at least one byte. So the total of all declared counts in
//  a buffer is bounded by its size, which is what makes msgpack-c's unpacker
//  safe after gw_mpack_check (its zone allocations are at most ~48 bytes per
//  input byte).
//
//  Invariants: pos <= end always; once error is set every call fails (sticky)
//  and pos no longer moves. Skipping inside gw_mreader_find is iterative (a
//  pending-values counter), so it needs no depth bound; gw_mreader_skip and
//  gw_mpack_check recurse at most max_depth levels.
//
//  Rates: runs on every bus frame (envelopes, bodies); a token costs a
//  switch and a bounds check. Failure mode: -1, never an assert on input.

#include <czmq.h>
#include <msgpack.h>
#include "gw_mpack.h"

static int
s_fail (gw_mreader_t *self)
{
    self->error = -1;
    return -1;
}

static inline uint16_t
s_be16 (const uint8_t *p)
{
    return (uint16_t)((uint16_t)p[0] << 8 | p[1]);
}

static inline uint32_t
s_be32 (const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t
s_be64 (const uint8_t *p)
{
    return (uint64_t)s_be32 (p) << 32 | s_be32 (p + 4);
}

void
gw_mreader_init (gw_mreader_t *self, const void *data, size_t size)
{
    assert (self);
    self->pos = (const uint8_t *)data;
    self->end = data ? self->pos + size : self->pos;
    self->error = 0;
}

//  Width in bytes of the length field of str/bin/ext 8/16/32 (tag order).
static inline size_t
s_lenwidth (uint8_t step)
{
    return (size_t)1 << step;
}

static inline uint32_t
s_readlen (const uint8_t *p, size_t width)
{
    return width == 1 ? p[0] : width == 2 ? s_be16 (p) : s_be32 (p);
}

int
gw_mreader_next (gw_mreader_t *self, gw_mvalue_t *value)
{
    assert (self);
    assert (value);
    if (self->error || self->pos >= self->end)
        return s_fail (self);
    const uint8_t *p = self->pos;
    const uint8_t *end = self->end;
    uint8_t tag = *p++;
    size_t left = (size_t)(end - p);
    value->ptr = NULL;
    value->size = 0;
    value->ext_type = 0;

    //  Fixed-size families first.
    if (tag <= 0x7f) {
        value->type = GW_MP_UINT;
        value->v.u = tag;
        self->pos = p;
        return 0;
    }
    if (tag >= 0xe0) {
        value->type = GW_MP_INT;
        value->v.i = (int8_t)tag;
        self->pos = p;
        return 0;
    }
    uint64_t count = 0;  //  ARRAY/MAP count, or STR/BIN/EXT size
    switch (tag) {
        case 0xc0:
            value->type = GW_MP_NIL;
            self->pos = p;
            return 0;
        case 0xc2:
        case 0xc3:
            value->type = GW_MP_BOOL;
            value->v.b = tag == 0xc3;
            self->pos = p;
            return 0;
        case 0xca: {
            if (left < 4)
                return s_fail (self);
            uint32_t bits = s_be32 (p);
            float f;
            memcpy (&f, &bits, 4);
            value->type = GW_MP_FLOAT;
            value->v.f = (double)f;
            self->pos = p + 4;
            return 0;
        }
        case 0xcb: {
            if (left < 8)
                return s_fail (self);
            uint64_t bits = s_be64 (p);
            value->type = GW_MP_FLOAT;
            memcpy (&value->v.f, &bits, 8);
            self->pos = p + 8;
            return 0;
        }
        case 0xcc:
        case 0xcd:
        case 0xce:
        case 0xcf: {
            size_t width = (size_t)1 << (tag - 0xcc);
            if (left < width)
                return s_fail (self);
            value->type = GW_MP_UINT;
            value->v.u = width == 8 ? s_be64 (p) : s_readlen (p, width);
            self->pos = p + width;
            return 0;
        }
        case 0xd0:
        case 0xd1:
        case 0xd2:
        case 0xd3: {
            size_t width = (size_t)1 << (tag - 0xd0);
            if (left < width)
                return s_fail (self);
            int64_t i;
            if (width == 1)
                i = (int8_t)p[0];
            else if (width == 2)
                i = (int16_t)s_be16 (p);
            else if (width == 4)
                i = (int32_t)s_be32 (p);
            else
                i = (int64_t)s_be64 (p);
            if (i >= 0) {
                value->type = GW_MP_UINT;
                value->v.u = (uint64_t)i;
            }
            else {
                value->type = GW_MP_INT;
                value->v.i = i;
            }
            self->pos = p + width;
            return 0;
        }
        case 0xd4:
        case 0xd5:
        case 0xd6:
        case 0xd7:
        case 0xd8: {
            size_t size = (size_t)1 << (tag - 0xd4);
            if (left < 1 + size)
                return s_fail (self);
            value->type = GW_MP_EXT;
            value->ext_type = (int8_t)p[0];
            value->ptr = (const char *)p + 1;
            value->size = (uint32_t)size;
            self->pos = p + 1 + size;
            return 0;
        }
        case 0xc7:
        case 0xc8:
        case 0xc9: {
            size_t width = s_lenwidth ((uint8_t)(tag - 0xc7));
            if (left < width + 1)
                return s_fail (self);
            count = s_readlen (p, width);
            p += width;
            left -= width;
            value->ext_type = (int8_t)*p++;
            left--;
            if (count > left)
                return s_fail (self);
            value->type = GW_MP_EXT;
            value->ptr = (const char *)p;
            value->size = (uint32_t)count;
            self->pos = p + count;
            return 0;
        }
        default:
            break;
    }
    //  Variable-size families: work out type and count, then bound it.
    gw_mp_type_t type;
    if (tag <= 0x8f) {
        type = GW_MP_MAP;
        count = tag & 0x0f;
    }
    else if (tag <= 0x9f) {
        type = GW_MP_ARRAY;
        count = tag & 0x0f;
    }
    else if (tag <= 0xbf) {
        type = GW_MP_STR;
        count = tag & 0x1f;
    }
    else {
        size_t width;
        if (tag >= 0xc4 && tag <= 0xc6) {
            type = GW_MP_BIN;
            width = s_lenwidth ((uint8_t)(tag - 0xc4));
        }
        else if (tag >= 0xd9 && tag <= 0xdb) {
            type = GW_MP_STR;
            width = s_lenwidth ((uint8_t)(tag - 0xd9));
        }
        else if (tag == 0xdc || tag == 0xdd) {
            type = GW_MP_ARRAY;
            width = tag == 0xdc ? 2 : 4;
        }
        else if (tag == 0xde || tag == 0xdf) {
            type = GW_MP_MAP;
            width = tag == 0xde ? 2 : 4;
        }
        else
            return s_fail (self);  //  0xc1, never used
        if (left < width)
            return s_fail (self);
        count = s_readlen (p, width);
        p += width;
        left -= width;
    }
    value->type = type;
    if (type == GW_MP_STR || type == GW_MP_BIN) {
        if (count > left)
            return s_fail (self);
        value->ptr = (const char *)p;
        value->size = (uint32_t)count;
        self->pos = p + count;
    }
    else {
        //  Each element is at least one byte; a pair at least two.
        if ((type == GW_MP_MAP ? count * 2 : count) > left)
            return s_fail (self);
        value->v.count = (uint32_t)count;
        self->pos = p;
    }
    return 0;
}

//  Skip pending whole values without recursion. Needs no depth bound: the
//  counter only grows by counts already checked against the bytes left.
static int
s_skip_values (gw_mreader_t *self, uint64_t pending)
{
    gw_mvalue_t value;
    while (pending > 0) {
        if (gw_mreader_next (self, &value))
            return -1;
        pending--;
        if (value.type == GW_MP_ARRAY)
            pending += value.v.count;
        else if (value.type == GW_MP_MAP)
            pending += (uint64_t)value.v.count * 2;
    }
    return 0;
}

//  Read one whole object with at most depth_left container levels, counting
//  every value against *items_left.
static int
s_walk (gw_mreader_t *self, int depth_left, size_t *items_left)
{
    gw_mvalue_t value;
    if (*items_left == 0)
        return s_fail (self);
    (*items_left)--;
    if (gw_mreader_next (self, &value))
        return -1;
    if (value.type != GW_MP_ARRAY && value.type != GW_MP_MAP)
        return 0;
    if (depth_left <= 0)
        return s_fail (self);
    uint64_t count =
        value.type == GW_MP_MAP ? (uint64_t)value.v.count * 2 : value.v.count;
    for (uint64_t index = 0; index < count; index++)
        if (s_walk (self, depth_left - 1, items_left))
            return -1;
    return 0;
}

int
gw_mreader_skip (gw_mreader_t *self, int max_depth)
{
    assert (self);
    size_t items = SIZE_MAX;
    return s_walk (self, max_depth, &items);
}

size_t
gw_mreader_left (gw_mreader_t *self)
{
    assert (self);
    return (size_t)(self->end - self->pos);
}

int
gw_mpack_check (const void *data, size_t size, int max_depth, size_t max_items)
{
    gw_mreader_t reader;
    gw_mreader_init (&reader, data, size);
    if (s_walk (&reader, max_depth, &max_items))
        return -1;
    return reader.pos == reader.end ? 0 : -1;
}

int
gw_mreader_find (gw_mreader_t *self, const char *key)
{
    assert (self);
    assert (key);
    gw_mvalue_t map, item;
    if (gw_mreader_next (self, &map))
        return -1;
    if (map.type != GW_MP_MAP)
        return s_fail (self);
    size_t key_size = strlen (key);
    for (uint32_t index = 0; index < map.v.count; index++) {
        if (gw_mreader_next (self, &item))
            return -1;
        if (item.type == GW_MP_STR && item.size == key_size &&
            memcmp (item.ptr, key, key_size) == 0)
            return 0;
        //  Skip the rest of a container key, then the value.
        uint64_t pending = 1;
        if (item.type == GW_MP_ARRAY)
            pending += item.v.count;
        else if (item.type == GW_MP_MAP)
            pending += (uint64_t)item.v.count * 2;
        if (s_skip_values (self, pending))
            return -1;
    }
    return 1;
}

bool
gw_mvalue_streq (const gw_mvalue_t *value, const char *text)
{
    assert (value);
    assert (text);
    if (value->type != GW_MP_STR)
        return false;
    size_t size = strlen (text);
    return value->size == size && (size == 0 || memcmp (value->ptr, text, size) == 0);
}

int
gw_mpack_str (msgpack_packer *pk, const char *text)
{
    assert (pk);
    assert (text);
    size_t size = strlen (text);
    if (size > UINT32_MAX)
        return -1;
    if (msgpack_pack_str (pk, size))
        return -1;
    return msgpack_pack_str_body (pk, text, size) ? -1 : 0;
}

//  --------------------------------------------------------------------------
//  Self test

static int
s_check_hex (const char *hex, int max_depth, size_t max_items)
{
    uint8_t bytes[64];
    size_t size = strlen (hex) / 2;
    assert (size <= sizeof (bytes));
    for (size_t i = 0; i < size; i++) {
        unsigned int byte;
        int rc = sscanf (hex + i * 2, "%2x", &byte);
        assert (rc == 1);
        bytes[i] = (uint8_t)byte;
    }
    return gw_mpack_check (bytes, size, max_depth, max_items);
}

void
gw_mpack_test (bool verbose)
{
    printf (" * gw_mpack: ");
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);

    //  Every scalar family, in widths msgpack-c picks for us.
    msgpack_pack_array (&pk, 17);
    msgpack_pack_nil (&pk);
    msgpack_pack_true (&pk);
    msgpack_pack_false (&pk);
    msgpack_pack_uint64 (&pk, 5);
    msgpack_pack_uint64 (&pk, 200);
    msgpack_pack_uint64 (&pk, 70000);
    msgpack_pack_uint64 (&pk, UINT64_MAX);
    msgpack_pack_int64 (&pk, -3);
    msgpack_pack_int64 (&pk, -200);
    msgpack_pack_int64 (&pk, INT64_MIN);
    msgpack_pack_float (&pk, 0.5f);
    msgpack_pack_double (&pk, -1.25);
    gw_mpack_str (&pk, "hello");
    msgpack_pack_bin (&pk, 3);
    msgpack_pack_bin_body (&pk, "\x00\x01\x02", 3);
    msgpack_pack_ext (&pk, 4, 7);
    msgpack_pack_ext_body (&pk, "abcd", 4);
    msgpack_pack_map (&pk, 1);
    gw_mpack_str (&pk, "k");
    msgpack_pack_array (&pk, 0);
    msgpack_pack_int64 (&pk, 100);  //  positive through int64: reads as UINT

    gw_mreader_t reader;
    gw_mvalue_t value;
    gw_mreader_init (&reader, sbuf.data, sbuf.size);
    assert (gw_mreader_next (&reader, &value) == 0);
    assert (value.type == GW_MP_ARRAY && value.v.count == 17);
    assert (gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_NIL);
    assert (
        gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_BOOL && value.v.b);
    assert (
        gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_BOOL && !value.v.b);
    assert (gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_UINT &&
        value.v.u == 5);
    assert (gw_mreader_next (&reader, &value) == 0 && value.v.u == 200);
    assert (gw_mreader_next (&reader, &value) == 0 && value.v.u == 70000);
    assert (gw_mreader_next (&reader, &value) == 0 && value.v.u == UINT64_MAX);
    assert (gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_INT &&
        value.v.i == -3);
    assert (gw_mreader_next (&reader, &value) == 0 && value.v.i == -200);
    assert (gw_mreader_next (&reader, &value) == 0 && value.v.i == INT64_MIN);
    assert (gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_FLOAT);
    assert (value.v.f == 0.5);
    assert (gw_mreader_next (&reader, &value) == 0 && value.v.f == -1.25);
    assert (gw_mreader_next (&reader, &value) == 0 && gw_mvalue_streq (&value, "hello"));
    assert (!gw_mvalue_streq (&value, "hell"));
    assert (!gw_mvalue_streq (&value, "hello!"));
    assert (gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_BIN);
    assert (value.size == 3 && memcmp (value.ptr, "\x00\x01\x02", 3) == 0);
    assert (!gw_mvalue_streq (&value, "\x00\x01\x02"));
    assert (gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_EXT);
    assert (value.ext_type == 7 && value.size == 4 && memcmp (value.ptr, "abcd", 4) == 0);
    gw_mreader_t copy = reader;
    assert (gw_mreader_next (&copy, &value) == 0 && value.type == GW_MP_MAP);
    assert (value.v.count == 1);
    copy = reader;
    assert (gw_mreader_skip (&copy, 1) == -1);  //  {"k": []} is two levels
    assert (copy.error == -1);
    assert (gw_mreader_skip (&reader, 2) == 0 && gw_mreader_left (&reader) == 1);
    assert (gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_UINT);
    assert (value.v.u == 100);
    assert (gw_mreader_left (&reader) == 0);
    //  Past the end: error, and sticky.
    assert (gw_mreader_next (&reader, &value) == -1);
    assert (reader.error == -1);
    //  [... {"k": []} ...] is three levels deep and 20 values in all.
    assert (gw_mpack_check (sbuf.data, sbuf.size, 3, 100) == 0);
    assert (gw_mpack_check (sbuf.data, sbuf.size, 2, 100) == -1);
    assert (gw_mpack_check (sbuf.data, sbuf.size, 3, 20) == 0);
    assert (gw_mpack_check (sbuf.data, sbuf.size, 3, 19) == -1);
    assert (gw_mpack_check (sbuf.data, sbuf.size - 1, 3, 100) == -1);  //  truncated
    //  Every strict prefix is malformed, and never read out of bounds.
    for (size_t cut = 0; cut < sbuf.size; cut++)
        assert (gw_mpack_check (sbuf.data, cut, 8, 100) == -1);

    //  Hostile declared counts: map32/array32/str32 claiming 4 G, the inputs
    //  that make msgpack-c allocate tens of gigabytes.
    assert (s_check_hex ("df0adfdfdf", 8, 100) == -1);
    assert (s_check_hex ("ddffffffff", 8, 100) == -1);
    assert (s_check_hex ("dbffffffff61", 8, 100) == -1);
    assert (s_check_hex ("c6ffffffff", 8, 100) == -1);
    assert (s_check_hex ("c9ffffffff01", 8, 100) == -1);
    assert (s_check_hex ("93010203", 8, 100) == 0);
    assert (s_check_hex ("94010203", 8, 100) == -1);  //  claims 4, has 3
    assert (s_check_hex ("82a1610181", 8, 100) == -1);  //  map 2 pairs, 3 bytes
    assert (s_check_hex ("c1", 8, 100) == -1);  //  never-used tag
    assert (s_check_hex ("0000", 8, 100) == -1);  //  trailing byte
    assert (s_check_hex ("", 8, 100) == -1);
    assert (s_check_hex ("d40102", 8, 100) == 0);  //  fixext 1
    assert (s_check_hex ("d401", 8, 100) == -1);
    assert (s_check_hex ("c70001", 8, 100) == 0);  //  ext 8, empty
    assert (s_check_hex ("cb3ff0000000000000", 8, 100) == 0);
    assert (s_check_hex ("cb3ff00000000000", 8, 100) == -1);
    assert (s_check_hex ("d0ff", 8, 100) == 0);
    //  Depth: 3 nested arrays pass at 3, fail at 2.
    assert (s_check_hex ("919190", 3, 100) == 0);
    assert (s_check_hex ("919190", 2, 100) == -1);
    assert (s_check_hex ("01", 0, 1) == 0);
    assert (s_check_hex ("01", 0, 0) == -1);
    //  A check-passing buffer is safe for msgpack-c (depth <= 32, its stack).
    msgpack_unpacked unpacked;
    msgpack_unpacked_init (&unpacked);
    size_t offset = 0;
    assert (msgpack_unpack_next (&unpacked, sbuf.data, sbuf.size, &offset) ==
        MSGPACK_UNPACK_SUCCESS);
    assert (offset == sbuf.size);
    assert (
        unpacked.data.type == MSGPACK_OBJECT_ARRAY && unpacked.data.via.array.size == 17);
    msgpack_unpacked_destroy (&unpacked);

    //  Find: string keys, skipping container keys and nested values.
    msgpack_sbuffer_clear (&sbuf);
    msgpack_pack_map (&pk, 4);
    gw_mpack_str (&pk, "a");
    msgpack_pack_array (&pk, 2);
    msgpack_pack_map (&pk, 1);
    gw_mpack_str (&pk, "model");
    msgpack_pack_nil (&pk);
    msgpack_pack_uint64 (&pk, 1);
    msgpack_pack_array (&pk, 1);  //  a non-string key
    gw_mpack_str (&pk, "model");
    msgpack_pack_true (&pk);
    msgpack_pack_uint64 (&pk, 9);  //  an integer key
    msgpack_pack_false (&pk);
    gw_mpack_str (&pk, "model");
    gw_mpack_str (&pk, "tiny");
    gw_mreader_init (&reader, sbuf.data, sbuf.size);
    assert (gw_mreader_find (&reader, "model") == 0);
    assert (gw_mreader_next (&reader, &value) == 0 && gw_mvalue_streq (&value, "tiny"));
    assert (gw_mreader_left (&reader) == 0);
    gw_mreader_init (&reader, sbuf.data, sbuf.size);
    assert (gw_mreader_find (&reader, "absent") == 1);
    assert (gw_mreader_left (&reader) == 0 && reader.error == 0);
    gw_mreader_init (&reader, sbuf.data, sbuf.size - 1);
    assert (gw_mreader_find (&reader, "absent") == -1);
    gw_mreader_init (&reader, "\x01", 1);
    assert (gw_mreader_find (&reader, "a") == -1);  //  not a map
    gw_mreader_init (&reader, NULL, 0);
    assert (gw_mreader_find (&reader, "a") == -1);
    assert (gw_mreader_skip (&reader, 8) == -1);

    msgpack_sbuffer_destroy (&sbuf);
    printf ("OK\n");
}
