//  --------------------------------------------------------------------------
//  gw_price — the one pricing formula (billing's cost, ratelimit's hold).
//
//  Design note. Two stages price the same request: ratelimit before it
//  runs (the hold: estimated tokens) and billing after (the cost: actual
//  tokens). If they computed differently — another rounding, another
//  multiplier, a float — a hold could fall short of the cost of the very
//  tokens it reserved, and a budget could be overshot by requests in
//  flight. So the formula lives here once. It is monotone in every token
//  count, so a hold priced from an estimate that covers the actual usage
//  covers its cost too.
//
//  Exactness: tokens ≤ 10^12, prices ≤ 10^12 and multipliers ≤ 10^6 each,
//  so raw ≤ 3·10^24 and raw × global × group ≤ 3·10^36 < 2^127: no
//  intermediate can wrap. The single rounding is half up, at the end
//  (rounding each factor would drift: docs/BILLING.md has the example).

#include "aigw.h"
#include "gw_price.h"
#include <math.h>

int
gw_price_cost (const gw_price_t *price, int64_t global_milli, int64_t group_milli,
    int64_t prompt, int64_t completion, int64_t cached, int64_t *cost)
{
    assert (price);
    assert (cost);
    *cost = 0;
    if (prompt < 0 || completion < 0 || cached < 0 || cached > prompt ||
        prompt > GW_PRICE_TOKENS_MAX || completion > GW_PRICE_TOKENS_MAX)
        return -1;
    if (price->input < 0 || price->input > GW_PRICE_MAX || price->output < 0 ||
        price->output > GW_PRICE_MAX || price->cached_input < 0 ||
        price->cached_input > GW_PRICE_MAX)
        return -1;
    if (global_milli < 0 || global_milli > GW_PRICE_MULTIPLIER_MAX || group_milli < 0 ||
        group_milli > GW_PRICE_MULTIPLIER_MAX)
        return -1;
    unsigned __int128 raw =
        (unsigned __int128)(uint64_t)(prompt - cached) * (uint64_t)price->input +
        (unsigned __int128)(uint64_t)cached * (uint64_t)price->cached_input +
        (unsigned __int128)(uint64_t)completion * (uint64_t)price->output;
    unsigned __int128 scaled = raw * (uint64_t)global_milli * (uint64_t)group_milli;
    const unsigned __int128 unit = (unsigned __int128)1000000000000ULL;
    unsigned __int128 result = (scaled + unit / 2) / unit;
    if (result > (unsigned __int128)INT64_MAX)
        return -1;
    *cost = (int64_t)result;
    return 0;
}

int
gw_price_decimal (const char *text, int scale, int64_t max, int64_t *value)
{
    if (!text || !*text || scale < 0 || scale > 12)
        return -1;
    int64_t whole = 0, fraction = 0;
    int digits = 0, decimals = 0;
    const char *p = text;
    for (; *p >= '0' && *p <= '9'; p++, digits++)
        if (__builtin_mul_overflow (whole, 10, &whole) ||
            __builtin_add_overflow (whole, *p - '0', &whole))
            return -1;
    if (*p == '.') {
        p++;
        for (; *p >= '0' && *p <= '9'; p++, decimals++) {
            if (decimals >= scale)
                return -1;  //  more precision than the unit holds: not exact
            fraction = fraction * 10 + (*p - '0');
        }
        if (decimals == 0)
            return -1;
    }
    if (*p || digits == 0)
        return -1;
    for (int i = decimals; i < scale; i++)
        fraction *= 10;
    int64_t unit = 1;
    for (int i = 0; i < scale; i++)
        unit *= 10;
    int64_t result;
    if (__builtin_mul_overflow (whole, unit, &result) ||
        __builtin_add_overflow (result, fraction, &result) || result > max)
        return -1;
    *value = result;
    return 0;
}

int
gw_price_multiplier (const char *text, int64_t *milli)
{
    assert (milli);
    int64_t value;
    if (gw_price_decimal (text, 3, GW_PRICE_MULTIPLIER_MAX, &value))
        return -1;
    *milli = value;
    return 0;
}

int
gw_price_field (const gw_mvalue_t *value, int64_t *micros)
{
    assert (value);
    assert (micros);
    if (value->type == GW_MP_UINT) {
        if (value->v.u > (uint64_t)GW_PRICE_MAX / 1000000)
            return -1;
        *micros = (int64_t)value->v.u * 1000000;
        return 0;
    }
    if (value->type == GW_MP_FLOAT) {
        //  The JSON text had at most 17 significant digits; a price with at
        //  most six decimals is the integer nearest to value × 10^6.
        double scaled = value->v.f * 1e6;
        if (!isfinite (scaled) || scaled < 0 || scaled > (double)GW_PRICE_MAX)
            return -1;
        double nearest = round (scaled);
        if (fabs (scaled - nearest) > 1e-3)
            return -1;
        *micros = (int64_t)nearest;
        return 0;
    }
    if (value->type == GW_MP_STR && value->size < 64) {
        char text[64];
        memcpy (text, value->ptr, value->size);
        text[value->size] = 0;
        return gw_price_decimal (text, 6, GW_PRICE_MAX, micros);
    }
    return -1;
}

//  --------------------------------------------------------------------------
//  Self test

//  A price-file value from JSON text.
static int
s_field (const char *json, int64_t *micros)
{
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    gw_json_error_t jerror;
    int rc = gw_json_to_msgpack (json, strlen (json), &pk, NULL, &jerror);
    assert (rc == 0);
    gw_mreader_t reader;
    gw_mreader_init (&reader, sbuf.data, sbuf.size);
    gw_mvalue_t value;
    rc = gw_mreader_next (&reader, &value) == 0 ? gw_price_field (&value, micros) : -2;
    msgpack_sbuffer_destroy (&sbuf);
    return rc;
}

void
gw_price_test (bool verbose)
{
    printf (" * gw_price: ");
    int64_t value = -1;
    assert (gw_price_decimal ("1.5", 3, 1000000, &value) == 0 && value == 1500);
    assert (gw_price_decimal ("2", 3, 1000000, &value) == 0 && value == 2000);
    assert (gw_price_decimal ("0.125", 3, 1000000, &value) == 0 && value == 125);
    assert (gw_price_decimal ("0.1255", 3, 1000000, &value) == -1);  //  not exact
    assert (gw_price_decimal ("1000", 3, 1000000, &value) == 0 && value == 1000000);
    assert (gw_price_decimal ("1000.001", 3, 1000000, &value) == -1);  //  > max
    assert (gw_price_decimal ("-1", 3, 1000000, &value) == -1);
    assert (gw_price_decimal ("1.", 3, 1000000, &value) == -1);
    assert (gw_price_decimal (".5", 3, 1000000, &value) == -1);
    assert (gw_price_decimal ("1e3", 3, 1000000, &value) == -1);
    assert (gw_price_decimal ("", 3, 1000000, &value) == -1);
    assert (gw_price_decimal ("99999999999999999999", 3, INT64_MAX, &value) == -1);
    assert (gw_price_decimal ("0.000001", 6, INT64_MAX, &value) == 0 && value == 1);
    value = 7;
    assert (gw_price_multiplier ("1.2345", &value) == -1 && value == 7);
    assert (gw_price_multiplier ("abc", &value) == -1 && value == 7);
    assert (gw_price_multiplier ("1.5", &value) == 0 && value == 1500);

    //  Price-file values: numbers or decimal strings, exact to 6 decimals.
    assert (s_field ("2.5", &value) == 0 && value == 2500000);
    assert (s_field ("\"0.075\"", &value) == 0 && value == 75000);
    assert (s_field ("0.15", &value) == 0 && value == 150000);
    assert (s_field ("3", &value) == 0 && value == 3000000);
    assert (s_field ("\"0.0000001\"", &value) == -1);  //  7 decimals
    assert (s_field ("-1", &value) == -1);
    assert (s_field ("1000001", &value) == -1);  //  > $1M per 1M tokens
    assert (s_field ("[1]", &value) == -1);

    //  1000 in × $2.50/1M + 500 out × $10/1M = $0.0075; × 1.5 = $0.01125.
    gw_price_t gpt = {2500000, 10000000, 1250000};
    int64_t cost = -1;
    assert (gw_price_cost (&gpt, 1500, 1000, 1000, 500, 0, &cost) == 0 && cost == 11250);
    //  Group 0.8: $0.009; 600 fresh + 400 cached: 7000 µ$ × 1.5 = 10500.
    assert (gw_price_cost (&gpt, 1500, 800, 1000, 500, 0, &cost) == 0 && cost == 9000);
    assert (gw_price_cost (&gpt, 1500, 1000, 1000, 500, 400, &cost) == 0);
    assert (cost == 10500);
    assert (gw_price_cost (&gpt, 1500, 1000, 10, 0, 11, &cost) == -1 && cost == 0);
    //  Rounding half up, once, at the end (1 µ$ per 1M tokens).
    gw_price_t tiny = {1, 0, 0};
    assert (gw_price_cost (&tiny, 1000, 1000, 500000, 0, 0, &cost) == 0 && cost == 1);
    assert (gw_price_cost (&tiny, 1000, 1000, 499999, 0, 0, &cost) == 0 && cost == 0);
    assert (gw_price_cost (&tiny, 1500, 333, 1500000, 0, 0, &cost) == 0 && cost == 1);
    assert (gw_price_cost (&tiny, 1500, 333, 1000000, 0, 0, &cost) == 0 && cost == 0);
    //  Monotone: more tokens never cost less (a hold covers any usage below
    //  its estimate), for awkward multipliers too.
    gw_price_t odd = {7, 13, 3};
    for (int64_t milli = 1; milli < 5000; milli += 499) {
        int64_t last = 0;
        for (int64_t tokens = 0; tokens < 3000; tokens += 7) {
            assert (gw_price_cost (&odd, 1500, milli, tokens, tokens / 2, 0, &cost) == 0);
            assert (cost >= last);
            last = cost;
        }
    }
    //  Largest inputs stay exact or fail; never wrap.
    assert (gw_price_cost (&gpt, 1500, 1000, GW_PRICE_TOKENS_MAX, GW_PRICE_TOKENS_MAX, 0,
                &cost) == 0);
    assert (cost == (int64_t)(1000000LL * 12500000LL * 15 / 10));
    assert (gw_price_cost (&gpt, 1500, 1000, GW_PRICE_TOKENS_MAX + 1, 0, 0, &cost) == -1);
    gw_price_t dear = {GW_PRICE_MAX, GW_PRICE_MAX, GW_PRICE_MAX};
    assert (gw_price_cost (&dear, GW_PRICE_MULTIPLIER_MAX, GW_PRICE_MULTIPLIER_MAX,
                GW_PRICE_TOKENS_MAX, GW_PRICE_TOKENS_MAX, 0, &cost) == -1);
    assert (
        gw_price_cost (&gpt, GW_PRICE_MULTIPLIER_MAX + 1, 1000, 1, 1, 0, &cost) == -1);
    if (verbose)
        printf ("\n    ");
    printf ("OK\n");
}
