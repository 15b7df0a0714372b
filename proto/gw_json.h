//  --------------------------------------------------------------------------
//  gw_json — JSON <-> msgpack transcoder. "msgpack inside, JSON only at the
//  edges": the edge turns each HTTP JSON body into msgpack once with
//  gw_json_to_msgpack, and turns msgpack back into JSON with
//  gw_json_from_msgpack.
//
//  JSON in is strict RFC 8259: one value, optional surrounding whitespace,
//  UTF-8 validated (no overlongs, no surrogates encoded in UTF-8, no bytes
//  > F4), \u escapes with surrogate pairs checked, no DOM: two passes over the
//  text, the first validates and counts container members, the second packs
//  with known counts. Numbers: integers that fit int64/uint64 stay integers
//  (negative -> int, non-negative -> uint); everything else is a double
//  (strtod); a number whose magnitude overflows a double is an error.
//  Duplicate keys are passed through. Depth, input size and total value count
//  are bounded by gw_json_limits_t.
//
//  Choices the RFC leaves to implementations: "-0" (an integer literal for
//  negative zero) packs as the double -0.0 so the sign survives the round
//  trip ("0" is uint 0); a lone or mispaired surrogate in a \u escape is
//  rejected; a byte-order mark is rejected; a number that underflows becomes
//  0.0 (or a subnormal). max_items counts every value packed, keys included.
//
//  JSON out escapes ", \, control characters (\b \f \n \r \t, others as
//  \u00XX); passes valid UTF-8 through; map keys must be strings; bin is
//  written as a string only if valid UTF-8 (else error); doubles use the
//  shortest representation that round-trips (%.17g fallback) and always
//  contain a '.' or 'e' so they re-read as doubles; NaN/Inf are errors.
//  msgpack -> JSON -> msgpack is the identity for anything JSON can express.

#ifndef GW_JSON_H_INCLUDED
#define GW_JSON_H_INCLUDED

#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>
#include <msgpack.h>

typedef struct {
    size_t max_size;  //  bytes of input, default 32 MiB
    int max_depth;  //  nesting of arrays/objects, default 64
    size_t max_items;  //  values in total, default 4 Mi
} gw_json_limits_t;

typedef struct {
    size_t offset;  //  byte offset of the problem in the input
    char message[96];  //  human-readable, e.g. "unexpected character '}'"
} gw_json_error_t;

//  Defaults described above.
gw_json_limits_t gw_json_limits_default (void);

//  Transcode size bytes of JSON text into msgpack, appended through pk.
//  limits may be NULL for defaults; error may be NULL. Returns 0 on success,
//  -1 on invalid input or a limit exceeded (error filled, nothing or a
//  partial value appended: callers discard the buffer on failure).
int gw_json_to_msgpack (const char *json, size_t size, msgpack_packer *pk,
    const gw_json_limits_t *limits, gw_json_error_t *error);

//  Transcode one msgpack object (size bytes) to JSON appended to out (with
//  msgpack_sbuffer_write). Input is read with the bounded reader, so hostile
//  input is safe. Returns 0, or -1 if the input is malformed, nested deeper
//  than max_depth, or not expressible as JSON (non-string key, NaN, invalid
//  UTF-8 string, ext) — error filled if not NULL.
int gw_json_from_msgpack (const void *data, size_t size, msgpack_sbuffer *out,
    int max_depth, gw_json_error_t *error);

//  Append text to out with JSON string escaping and the surrounding quotes.
//  Returns 0, or -1 if text (size bytes) is not valid UTF-8.
int gw_json_escape (const char *text, size_t size, msgpack_sbuffer *out);

//  Decimal digits of value, after a '-' when negative, into buffer (at
//  least 21 bytes, not terminated); returns the length. For -n pass n's
//  magnitude as value.
size_t gw_json_format_u64 (char *buffer, uint64_t value, bool negative);

//  Self test of this class. Reads the JSONTestSuite cases from
//  gw_testdata_path ("JSONTestSuite/test_parsing").
void gw_json_test (bool verbose);

#endif
