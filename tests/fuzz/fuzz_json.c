//  --------------------------------------------------------------------------
//  fuzz_json — libFuzzer target for gw_json.
//
//  Feeds the input to gw_json_to_msgpack; when it is accepted, the msgpack
//  must pass gw_mpack_check, turn back into JSON, and that JSON must turn
//  into byte-identical msgpack again (abort otherwise). Tight limits may only
//  reject more, never change the output. The raw input is also fed to
//  gw_json_from_msgpack as hostile msgpack.

#include <czmq.h>
#include <msgpack.h>
#include "gw_mpack.h"
#include "gw_json.h"

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
    msgpack_sbuffer packed, json, again;
    msgpack_sbuffer_init (&packed);
    msgpack_sbuffer_init (&json);
    msgpack_sbuffer_init (&again);
    msgpack_packer pk;
    gw_json_error_t error;
    gw_json_limits_t limits = gw_json_limits_default ();

    msgpack_packer_init (&pk, &packed, msgpack_sbuffer_write);
    if (gw_json_to_msgpack ((const char *)data, size, &pk, &limits, &error) == 0) {
        if (gw_mpack_check (packed.data, packed.size, limits.max_depth, SIZE_MAX) != 0)
            abort ();
        if (gw_json_from_msgpack (
                packed.data, packed.size, &json, limits.max_depth, &error))
            abort ();
        msgpack_packer_init (&pk, &again, msgpack_sbuffer_write);
        if (gw_json_to_msgpack (json.data, json.size, &pk, &limits, &error))
            abort ();
        if (again.size != packed.size || memcmp (again.data, packed.data, packed.size))
            abort ();
    }
    else if (error.message[0] == 0 || error.offset > size)
        abort ();

    //  Tight limits only ever reject more, never change the output.
    gw_json_limits_t tight = {.max_size = 4096, .max_depth = 3, .max_items = 40};
    msgpack_sbuffer_clear (&again);
    msgpack_packer_init (&pk, &again, msgpack_sbuffer_write);
    if (gw_json_to_msgpack ((const char *)data, size, &pk, &tight, &error) == 0)
        if (again.size != packed.size || memcmp (again.data, packed.data, packed.size))
            abort ();

    msgpack_sbuffer_clear (&json);
    if (gw_json_from_msgpack (data, size, &json, 16, &error) == 0) {
        //  Whatever came out is JSON we accept.
        msgpack_sbuffer_clear (&again);
        msgpack_packer_init (&pk, &again, msgpack_sbuffer_write);
        if (gw_json_to_msgpack (json.data, json.size, &pk, &limits, &error))
            abort ();
    }
    else if (json.size != 0)
        abort ();

    msgpack_sbuffer_destroy (&packed);
    msgpack_sbuffer_destroy (&json);
    msgpack_sbuffer_destroy (&again);
    return 0;
}
