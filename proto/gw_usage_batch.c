//  --------------------------------------------------------------------------
//  gw_usage_batch — codecs of usage event batches (STAGES.md §6.2).
//
//  Design note. A batch is a plain msgpack map so that a producer can build
//  it without re-encoding its spooled events: the head {events: [n] is a
//  few bytes, and each event's spooled body is appended as it is. The
//  decoder only delimits the items (gw_mreader_skip, depth-bounded), so a
//  bad item — a wrong field, not even a map — is billing's per-item 400,
//  and only bytes that cannot be delimited make the whole request a 400.
//  Detection is by key: a single event never has the key "events" (it is
//  not an event field), so the two forms share one service and one rid.
//
//  Rates: one pass over the body per decode, no allocation.

#include "aigw.h"
#include "gw_usage_batch.h"

#define ITEM_DEPTH_MAX 8  //  nesting inside one event (scopes: 2)
#define KEYS_MAX 64  //  keys of the container map

int
gw_usage_batch_decode (const void *data, size_t size, gw_usage_item_t *items,
    size_t items_max, const char **why)
{
    static const char *dummy;
    if (!why)
        why = &dummy;
    *why = "";
    if (!data || !size)
        return 0;
    gw_mreader_t reader;
    gw_mreader_init (&reader, data, size);
    gw_mvalue_t value, key;
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP ||
        value.v.count > KEYS_MAX)
        return 0;  //  not a batch; the event parser says what is wrong
    //  Find "events" without committing to anything: a map that cannot be
    //  read through is not a batch we recognise (the event parser refuses it).
    uint32_t pairs = value.v.count;
    bool events = false;
    uint32_t after = pairs;  //  index of the first pair after "events"
    for (uint32_t i = 0; i < pairs; i++) {
        if (gw_mreader_next (&reader, &key))
            return 0;
        if (key.type == GW_MP_STR && gw_mvalue_streq (&key, "events")) {
            events = true;
            after = i + 1;
            break;
        }
        if (gw_mreader_skip (&reader, ITEM_DEPTH_MAX))
            return 0;
    }
    if (!events)
        return 0;
    //  A batch: from here on every fault is the container's.
    *why = "the batch body is larger than 1 MiB";
    if (size > GW_USAGE_BATCH_BYTES)
        return -1;
    size_t max = items_max < GW_USAGE_BATCH_MAX ? items_max : GW_USAGE_BATCH_MAX;
    *why = "events must be an array of 1 to 256 events";
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_ARRAY ||
        value.v.count == 0 || value.v.count > max || !items)
        return -1;
    uint32_t count = value.v.count;
    *why = "an event of the batch is not well-formed msgpack";
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *start = reader.pos;
        if (gw_mreader_skip (&reader, ITEM_DEPTH_MAX))
            return -1;
        items[i].data = start;
        items[i].size = (size_t)(reader.pos - start);
    }
    //  The rest of the container (keys after "events") must be readable too.
    *why = "malformed batch map";
    for (uint32_t i = after; i < pairs; i++)
        if (gw_mreader_skip (&reader, ITEM_DEPTH_MAX) ||
            gw_mreader_skip (&reader, ITEM_DEPTH_MAX))
            return -1;
    *why = "trailing bytes after the batch map";
    if (gw_mreader_left (&reader))
        return -1;
    *why = "";
    return (int)count;
}

//  {name: [ then count items follow.
static void
s_pack_container (msgpack_packer *pk, const char *name, uint32_t count)
{
    assert (pk);
    msgpack_pack_map (pk, 1);
    gw_mpack_str (pk, name);
    msgpack_pack_array (pk, count);
}

void
gw_usage_batch_pack_head (msgpack_packer *pk, uint32_t count)
{
    s_pack_container (pk, "events", count);
}

void
gw_usage_batch_pack_results (msgpack_packer *pk, uint32_t count)
{
    s_pack_container (pk, "results", count);
}

void
gw_usage_batch_pack_ok (msgpack_packer *pk, uint64_t cost, bool duplicate)
{
    assert (pk);
    msgpack_pack_map (pk, 3);
    gw_mpack_str (pk, "status");
    msgpack_pack_uint16 (pk, 200);
    gw_mpack_str (pk, "cost");
    msgpack_pack_uint64 (pk, cost);
    gw_mpack_str (pk, "duplicate");
    if (duplicate)
        msgpack_pack_true (pk);
    else
        msgpack_pack_false (pk);
}

void
gw_usage_batch_pack_error (msgpack_packer *pk, uint16_t status, const char *error)
{
    assert (pk);
    msgpack_pack_map (pk, 2);
    gw_mpack_str (pk, "status");
    msgpack_pack_uint16 (pk, status);
    gw_mpack_str (pk, "error");
    gw_mpack_str (pk, error ? error : "");
}

int
gw_usage_batch_results (
    const void *data, size_t size, uint16_t *status, uint64_t *cost, size_t count)
{
    assert (status);
    if (!data || !size)
        return -1;
    gw_mreader_t reader;
    gw_mreader_init (&reader, data, size);
    gw_mvalue_t value, key;
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP ||
        value.v.count > KEYS_MAX)
        return -1;
    uint32_t pairs = value.v.count;
    bool found = false;
    for (uint32_t p = 0; p < pairs; p++) {
        if (gw_mreader_next (&reader, &key))
            return -1;
        if (found || key.type != GW_MP_STR || !gw_mvalue_streq (&key, "results")) {
            if (gw_mreader_skip (&reader, ITEM_DEPTH_MAX))
                return -1;
            continue;
        }
        if (gw_mreader_next (&reader, &value) || value.type != GW_MP_ARRAY ||
            value.v.count != count)
            return -1;
        for (size_t i = 0; i < count; i++) {
            gw_mvalue_t item;
            if (gw_mreader_next (&reader, &item) || item.type != GW_MP_MAP ||
                item.v.count > KEYS_MAX)
                return -1;
            bool has_status = false;
            if (cost)
                cost[i] = 0;
            for (uint32_t k = 0; k < item.v.count; k++) {
                gw_mvalue_t field;
                if (gw_mreader_next (&reader, &key))
                    return -1;
                const uint8_t *at = reader.pos;
                if (gw_mreader_next (&reader, &field))
                    return -1;
                if (field.type == GW_MP_ARRAY || field.type == GW_MP_MAP) {
                    reader.pos = at;
                    if (gw_mreader_skip (&reader, ITEM_DEPTH_MAX))
                        return -1;
                    continue;
                }
                if (key.type != GW_MP_STR)
                    continue;
                if (gw_mvalue_streq (&key, "status")) {
                    if (field.type != GW_MP_UINT || field.v.u < 100 || field.v.u > 999)
                        return -1;
                    status[i] = (uint16_t)field.v.u;
                    has_status = true;
                }
                else if (gw_mvalue_streq (&key, "cost") && cost) {
                    if (field.type != GW_MP_UINT)
                        return -1;
                    cost[i] = field.v.u;
                }
            }
            if (!has_status)
                return -1;
        }
        found = true;
    }
    return found && gw_mreader_left (&reader) == 0 ? 0 : -1;
}

//  --------------------------------------------------------------------------
//  Self test

static void
s_event (msgpack_sbuffer *out, uint8_t tag)
{
    msgpack_packer pk;
    msgpack_packer_init (&pk, out, msgpack_sbuffer_write);
    msgpack_pack_map (&pk, 2);
    gw_mpack_str (&pk, "rid");
    uint8_t rid[16];
    memset (rid, tag, 16);
    msgpack_pack_bin (&pk, 16);
    msgpack_pack_bin_body (&pk, rid, 16);
    gw_mpack_str (&pk, "scopes");
    msgpack_pack_array (&pk, 1);
    gw_mpack_str (&pk, "key:x");
}

void
gw_usage_batch_test (bool verbose)
{
    printf (" * gw_usage_batch: ");
    gw_usage_item_t items[GW_USAGE_BATCH_MAX];
    const char *why = NULL;
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);

    //  A single event is not a batch.
    s_event (&sbuf, 1);
    assert (gw_usage_batch_decode (sbuf.data, sbuf.size, items, 256, &why) == 0);
    assert (gw_usage_batch_decode (NULL, 0, items, 256, &why) == 0);
    assert (gw_usage_batch_decode ("\x93\x01\x02\x03", 4, items, 256, &why) == 0);

    //  A batch of three: the items are the packed events, byte for byte;
    //  the second is not even a map (the caller refuses that item alone).
    msgpack_sbuffer_clear (&sbuf);
    gw_usage_batch_pack_head (&pk, 3);
    size_t at1 = sbuf.size;
    s_event (&sbuf, 1);
    size_t at2 = sbuf.size;
    msgpack_pack_uint8 (&pk, 7);
    size_t at3 = sbuf.size;
    s_event (&sbuf, 3);
    assert (gw_usage_batch_decode (sbuf.data, sbuf.size, items, 256, &why) == 3);
    assert (items[0].data == (uint8_t *)sbuf.data + at1 && items[0].size == at2 - at1);
    assert (items[1].data == (uint8_t *)sbuf.data + at2 && items[1].size == 1);
    assert (
        items[2].data == (uint8_t *)sbuf.data + at3 && items[2].size == sbuf.size - at3);
    //  Fewer slots than items, trailing bytes, a truncated item: the
    //  container is malformed.
    assert (gw_usage_batch_decode (sbuf.data, sbuf.size, items, 2, &why) == -1);
    assert (*why);
    msgpack_sbuffer_write (&sbuf, "\xc0", 1);
    assert (gw_usage_batch_decode (sbuf.data, sbuf.size, items, 256, &why) == -1);
    assert (strstr (why, "trailing"));
    assert (gw_usage_batch_decode (sbuf.data, sbuf.size - 4, items, 256, &why) == -1);
    if (verbose)
        printf ("\n   truncated: %s\n", why);
    //  Empty, or not an array.
    msgpack_sbuffer_clear (&sbuf);
    gw_usage_batch_pack_head (&pk, 0);
    assert (gw_usage_batch_decode (sbuf.data, sbuf.size, items, 256, &why) == -1);
    msgpack_sbuffer_clear (&sbuf);
    msgpack_pack_map (&pk, 1);
    gw_mpack_str (&pk, "events");
    gw_mpack_str (&pk, "no");
    assert (gw_usage_batch_decode (sbuf.data, sbuf.size, items, 256, &why) == -1);
    //  A declared count beyond the bytes is refused before anything is read.
    assert (gw_usage_batch_decode ("\x81\xa6"
                                   "events\xdd\xff\xff\xff\xff",
                13, items, 256, &why) == -1);
    //  Other keys around "events" are allowed.
    msgpack_sbuffer_clear (&sbuf);
    msgpack_pack_map (&pk, 3);
    gw_mpack_str (&pk, "v");
    msgpack_pack_uint8 (&pk, 1);
    gw_mpack_str (&pk, "events");
    msgpack_pack_array (&pk, 1);
    s_event (&sbuf, 9);
    gw_mpack_str (&pk, "w");
    msgpack_pack_array (&pk, 0);
    assert (gw_usage_batch_decode (sbuf.data, sbuf.size, items, 256, &why) == 1);

    //  Answers: packed results decode to the same statuses and costs.
    msgpack_sbuffer_clear (&sbuf);
    gw_usage_batch_pack_results (&pk, 3);
    gw_usage_batch_pack_ok (&pk, 10500, false);
    gw_usage_batch_pack_error (&pk, 400, "Invalid usage event: rid is required.");
    gw_usage_batch_pack_ok (&pk, 7, true);
    uint16_t status[3];
    uint64_t cost[3];
    assert (gw_usage_batch_results (sbuf.data, sbuf.size, status, cost, 3) == 0);
    assert (status[0] == 200 && cost[0] == 10500);
    assert (status[1] == 400 && cost[1] == 0);
    assert (status[2] == 200 && cost[2] == 7);
    assert (gw_usage_batch_results (sbuf.data, sbuf.size, status, NULL, 3) == 0);
    //  The wrong count, a truncated body, no results: unknown outcome.
    assert (gw_usage_batch_results (sbuf.data, sbuf.size, status, cost, 2) == -1);
    assert (gw_usage_batch_results (sbuf.data, sbuf.size - 1, status, cost, 3) == -1);
    assert (gw_usage_batch_results ("\x80", 1, status, cost, 0) == -1);
    assert (gw_usage_batch_results (NULL, 0, status, cost, 1) == -1);
    //  A result without a status.
    msgpack_sbuffer_clear (&sbuf);
    gw_usage_batch_pack_results (&pk, 1);
    msgpack_pack_map (&pk, 1);
    gw_mpack_str (&pk, "cost");
    msgpack_pack_uint8 (&pk, 1);
    assert (gw_usage_batch_results (sbuf.data, sbuf.size, status, cost, 1) == -1);
    msgpack_sbuffer_destroy (&sbuf);
    printf ("OK\n");
}
