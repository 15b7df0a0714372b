//  --------------------------------------------------------------------------
//  fuzz_mpack — libFuzzer target for the bounded msgpack reader.
//
//  Walks the input token by token, skips and searches it with gw_mreader,
//  and validates it with gw_mpack_check. Whenever the check passes (depth 32,
//  msgpack-c's own stack size), msgpack-c's msgpack_unpack_next must unpack
//  the same bytes completely; run with max_allocation_size_mb so that a huge
//  allocation is a crash.

#include <czmq.h>
#include <msgpack.h>
#include "gw_mpack.h"

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
    gw_mreader_t reader;
    gw_mvalue_t value;

    //  Token walk: every token consumes at least one byte.
    gw_mreader_init (&reader, data, size);
    size_t tokens = 0;
    while (gw_mreader_next (&reader, &value) == 0) {
        tokens++;
        if (value.type == GW_MP_STR || value.type == GW_MP_BIN || value.type == GW_MP_EXT)
            if ((const uint8_t *)value.ptr < data ||
                (const uint8_t *)value.ptr + value.size > data + size)
                abort ();
    }
    if (tokens > size || reader.error != -1)
        abort ();

    gw_mreader_init (&reader, data, size);
    while (gw_mreader_skip (&reader, 16) == 0)
        ;
    gw_mreader_init (&reader, data, size);
    if (gw_mreader_find (&reader, "model") == 0)
        gw_mreader_skip (&reader, 16);

    if (gw_mpack_check (data, size, 32, 1 << 20) == 0) {
        msgpack_unpacked unpacked;
        msgpack_unpacked_init (&unpacked);
        size_t offset = 0;
        msgpack_unpack_return rc =
            msgpack_unpack_next (&unpacked, (const char *)data, size, &offset);
        if (rc != MSGPACK_UNPACK_SUCCESS || offset != size)
            abort ();
        msgpack_unpacked_destroy (&unpacked);
    }
    return 0;
}
