//  --------------------------------------------------------------------------
//  gw_price — the one pricing formula of aigw (docs/BILLING.md "Pricing").
//
//  Billing prices a request's actual usage with it, and ratelimit prices
//  the same request's admission hold (its estimated tokens) with it, with
//  the same global and group multipliers, so a hold is exactly what billing
//  would charge for those tokens: a budget can never be overshot by a
//  difference in arithmetic.
//
//    raw  = (prompt − cached) × input + cached × cached_input + completion × output
//    cost = ⌊ raw × global_milli × group_milli / 10^12 + 1/2 ⌋     (micro-units)
//
//  Prices are micro-units per 1 000 000 tokens, multipliers thousandths
//  (1000 = 1.0); the product is computed exactly in 128-bit integers and
//  rounded half up once, at the end. Nothing here is a float.
//
//  Threading: pure functions, callable from any thread.

#ifndef GW_PRICE_H_INCLUDED
#define GW_PRICE_H_INCLUDED

#include <stdint.h>
#include <stdbool.h>
#include "gw_mpack.h"

//  Bounds that keep every product exact in 128 bits and every sum in int64.
#define GW_PRICE_TOKENS_MAX 1000000000000LL  //  tokens per field
#define GW_PRICE_MAX 1000000000000LL  //  micro-units per 1M tokens ($1M / 1M)
#define GW_PRICE_MULTIPLIER_MAX 1000000  //  thousandths (1000.0)

//  Prices of one model, micro-units per 1 000 000 tokens.
typedef struct {
    int64_t input;  //  prompt tokens not read from cache
    int64_t output;  //  completion tokens
    int64_t cached_input;  //  prompt tokens read from cache
} gw_price_t;

//  Cost in micro-units of prompt (of which cached were read from the
//  provider's cache) and completion tokens at price, times global_milli and
//  group_milli (thousandths). Returns 0 with *cost set, or -1 (and *cost 0)
//  if a count, price or multiplier is out of its bounds, cached exceeds
//  prompt, or the cost does not fit in int64.
int gw_price_cost (const gw_price_t *price, int64_t global_milli, int64_t group_milli,
    int64_t prompt, int64_t completion, int64_t cached, int64_t *cost);

//  Parse a non-negative decimal ("1.5", "2", "0.125") with at most scale
//  digits after the point into an integer of 10^-scale units (scale 3:
//  "1.5" -> 1500). Returns 0, or -1 if text is not such a number, has more
//  decimals than scale (not exact), or the result exceeds max.
int gw_price_decimal (const char *text, int scale, int64_t max, int64_t *value);

//  Parse a multiplier ("1.5": at most 3 decimals, at most 1000) into
//  thousandths: AIGW_PRICE_MULTIPLIER, read the same way by billing and
//  ratelimit. Returns 0, or -1 (value unchanged).
int gw_price_multiplier (const char *text, int64_t *milli);

//  A price-file value (docs/BILLING.md "Price file"): USD per 1M tokens as
//  a JSON number or a decimal string (msgpack after gw_json), at most 6
//  decimals, into micro-units per 1M tokens, exactly. Returns 0, or -1 if
//  the value is not such a price or exceeds GW_PRICE_MAX.
int gw_price_field (const gw_mvalue_t *value, int64_t *micros);

//  Self test of this class.
void gw_price_test (bool verbose);

#endif
