//  --------------------------------------------------------------------------
//  fuzz_usage_batch — libFuzzer target for the usage batch codecs
//  (gw_usage_batch: billing's request decoder, the producer's answer
//  decoder).
//
//  The input is decoded as a batch request. When it is one, every item must
//  lie inside the input, the items must be contiguous, and a batch rebuilt
//  from them (head + items) must decode to the same items. The input is also
//  decoded as an answer for 1..8 results; when that succeeds, the results
//  packed again must decode to the same statuses and costs. Every item (or
//  the whole input, when it is not a batch) also goes through billing's
//  event parser, which is static in gw_billing.c: the file is included
//  here, so the fuzzer reaches the parser billing really runs.

#include "aigw.h"
#include "gw_usage_batch.h"
#include "../../services/billing/gw_billing.c"

//  Billing's per-event parser on bytes from the bus: 0 or -1 with a reason.
static void
s_check_event (const uint8_t *data, size_t size)
{
    static s_pending_t pending;
    const char *why = NULL;
    int rc = s_parse_event (data, size, &pending, &why);
    if (rc != 0 && (rc != -1 || !why || !*why))
        abort ();
    if (rc == 0 &&
        (!pending.user[0] || !pending.model[0] ||
            pending.event.cached_tokens > pending.event.prompt_tokens ||
            pending.scopes_size > SCOPES_RAW_MAX))
        abort ();
}

static gw_usage_item_t s_items[GW_USAGE_BATCH_MAX];
static gw_usage_item_t s_again[GW_USAGE_BATCH_MAX];

static void
s_check_request (const uint8_t *data, size_t size)
{
    const char *why = NULL;
    int count = gw_usage_batch_decode (data, size, s_items, GW_USAGE_BATCH_MAX, &why);
    if (count < -1 || count > GW_USAGE_BATCH_MAX)
        abort ();
    if (count == -1 && (!why || !*why))
        abort ();  //  a refused container always says why
    if (count == 0)
        s_check_event (data, size);
    if (count <= 0)
        return;
    for (int i = 0; i < count; i++)
        s_check_event (s_items[i].data, s_items[i].size);
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    gw_usage_batch_pack_head (&pk, (uint32_t)count);
    for (int i = 0; i < count; i++) {
        if (s_items[i].size == 0 || s_items[i].data < data ||
            s_items[i].data + s_items[i].size > data + size)
            abort ();
        if (i && s_items[i].data != s_items[i - 1].data + s_items[i - 1].size)
            abort ();
        msgpack_sbuffer_write (&sbuf, (const char *)s_items[i].data, s_items[i].size);
    }
    if (gw_usage_batch_decode (sbuf.data, sbuf.size, s_again, GW_USAGE_BATCH_MAX, &why) !=
        count)
        abort ();
    for (int i = 0; i < count; i++)
        if (s_again[i].size != s_items[i].size ||
            memcmp (s_again[i].data, s_items[i].data, s_items[i].size))
            abort ();
    msgpack_sbuffer_destroy (&sbuf);
}

static void
s_check_answer (const uint8_t *data, size_t size)
{
    for (size_t count = 1; count <= 8; count++) {
        uint16_t status[8];
        uint64_t cost[8];
        if (gw_usage_batch_results (data, size, status, cost, count))
            continue;
        msgpack_sbuffer sbuf;
        msgpack_sbuffer_init (&sbuf);
        msgpack_packer pk;
        msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
        gw_usage_batch_pack_results (&pk, (uint32_t)count);
        for (size_t i = 0; i < count; i++) {
            if (status[i] < 100 || status[i] > 999)
                abort ();
            if (status[i] == 200)
                gw_usage_batch_pack_ok (&pk, cost[i], false);
            else
                gw_usage_batch_pack_error (&pk, status[i], "x");
        }
        uint16_t status2[8];
        uint64_t cost2[8];
        if (gw_usage_batch_results (sbuf.data, sbuf.size, status2, cost2, count))
            abort ();
        for (size_t i = 0; i < count; i++)
            if (status2[i] != status[i] || (status[i] == 200 && cost2[i] != cost[i]))
                abort ();
        msgpack_sbuffer_destroy (&sbuf);
    }
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
    s_check_request (data, size);
    s_check_answer (data, size);
    return 0;
}
