//  --------------------------------------------------------------------------
//  gw_usage_batch — the wire form of a batch of usage events (STAGES.md
//  §6.2, "Batches"): the request body {events: [event, …]} a producer sends
//  to billing, and the answer {results: [result, …]}, one result per event
//  in order. Both sides (the bridge's producer, billing) use these codecs;
//  both decoders take hostile bytes and are fuzzed (tests/fuzz).
//
//  The decoders allocate nothing: items are slices of the caller's buffer.

#ifndef GW_USAGE_BATCH_H_INCLUDED
#define GW_USAGE_BATCH_H_INCLUDED

#include <msgpack.h>
#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>

#define GW_USAGE_BATCH_MAX 256  //  events per batch request, at most
#define GW_USAGE_BATCH_BYTES (1024 * 1024)  //  body of a batch request, at most

//  One item of a batch: size bytes at data (inside the decoded body).
typedef struct {
    const uint8_t *data;
    size_t size;
} gw_usage_item_t;

//  Decode a usage REQUEST body. Returns the number of events (1 ..
//  items_max, at most GW_USAGE_BATCH_MAX) when the body is a batch (a map
//  with the key "events"), with each event's bytes in items (pointing into
//  data; an item need not be a map — the caller validates each one). Returns
//  0 when the body is not a batch (the caller reads it as one event, and
//  refuses it if it is not one). Returns -1 when it is a batch whose
//  container is malformed (not an array of 1..max well-formed msgpack
//  values, over GW_USAGE_BATCH_BYTES, trailing bytes), with the reason in
//  *why (static text).
int gw_usage_batch_decode (const void *data, size_t size, gw_usage_item_t *items,
    size_t items_max, const char **why);

//  Pack the head of a batch request, {events: [ — then the caller appends
//  count packed event maps (raw msgpack bytes).
void gw_usage_batch_pack_head (msgpack_packer *pk, uint32_t count);

//  Pack the head of a batch answer, {results: [ — then count results.
void gw_usage_batch_pack_results (msgpack_packer *pk, uint32_t count);

//  Pack one result: {status: 200, cost, duplicate}.
void gw_usage_batch_pack_ok (msgpack_packer *pk, uint64_t cost, bool duplicate);

//  Pack one result: {status, error} (status 400, 500, 503…).
void gw_usage_batch_pack_error (msgpack_packer *pk, uint16_t status, const char *error);

//  Decode a batch answer (the body of its FINAL 200): exactly count
//  results, each a map with "status" (uint 100..999); fills status[i] and,
//  when cost is not NULL, cost[i] (0 when absent). Unknown keys are
//  skipped. Returns 0, or -1 if the body is not such an answer (then
//  nothing is known about any event).
int gw_usage_batch_results (
    const void *data, size_t size, uint16_t *status, uint64_t *cost, size_t count);

//  Self test of this class.
void gw_usage_batch_test (bool verbose);

#endif
