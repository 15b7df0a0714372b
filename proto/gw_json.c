//  --------------------------------------------------------------------------
//  gw_json — JSON <-> msgpack transcoder.
//
//  JSON -> msgpack makes two passes over the text and builds no tree.
//  Pass 1 validates the whole text against RFC 8259 (grammar, UTF-8, escapes,
//  limits) with an explicit container stack, and records the member count of
//  every array and object in the order they open. Pass 2 trusts the text
//  (pass 1 accepted it) and is a flat token loop: msgpack is prefix-ordered
//  like JSON, so each '{' / '[' packs a map/array header with the next
//  recorded count, each scalar packs itself, and ',', ':', ']', '}' and
//  whitespace are skipped. Strings without escapes are copied straight from
//  the input; strings with escapes are sized first, then decoded through a
//  small stack buffer. Integers are converted here with overflow checks;
//  only numbers with a fraction or exponent, or integers that overflow 64
//  bits, go through strtod (on a NUL-terminated stack copy, or a heap copy
//  reused for the call when the number is longer than the stack buffer).
//
//  Choices the RFC leaves open, made here:
//  - "-0" (and any integer literal spelling negative zero) packs as the
//    double -0.0, so the sign survives the round trip; "0" packs as uint 0.
//  - Lone or mispaired UTF-16 surrogates in \u escapes are rejected, as are
//    surrogates encoded directly in UTF-8; a byte-order mark is rejected.
//  - Numbers that underflow become 0 or a subnormal; numbers whose magnitude
//    overflows a double are an error.
//  - max_items counts every msgpack value produced: scalars, containers and
//    object keys.
//
//  Memory: the count array starts on the stack (64 containers) and grows by
//  doubling on the heap, capped at max_items and at half the input size (a
//  container takes at least two bytes), so hostile input cannot make it
//  large. The container stack likewise starts on the stack and grows only as
//  deep as the input really nests (at most max_depth). Nothing is allocated
//  per value; a typical request body needs no heap at all besides the
//  output buffer.
//
//  Rates: every HTTP request body passes through gw_json_to_msgpack; about
//  400-450 MB/s for chat bodies on one core (-O2), integers ~300 MB/s.
//
//  msgpack -> JSON reads with the bounded gw_mreader, recursing once per
//  container level (at most max_depth, so keep it in the hundreds at most),
//  and restores out to its original size on failure. Doubles are formatted
//  with %.15g, %.16g or %.17g, the first that strtod reads back to the same
//  bits (snprintf/strtod in the "C" locale: we never call setlocale).

#include <czmq.h>
#include <msgpack.h>
#include <dirent.h>
#include <math.h>
#include "gw_util.h"
#include "gw_mpack.h"
#include "gw_json.h"

#define S_LOCAL_COUNTS 64  //  containers counted without a heap allocation
#define S_LOCAL_DEPTH 64  //  container stack entries without a heap allocation
#define S_NUMBER_BUF 64  //  bytes of a number converted from the stack

//  Bytes that may appear unescaped in a JSON string as-is, without any more
//  checks: printable ASCII except '"' and '\'.
static const uint8_t s_plain[256] = {
    [0x20 ... 0x21] = 1,
    [0x23 ... 0x5b] = 1,
    [0x5d ... 0x7f] = 1,
};

//  Bytes inside an already validated string other than '"' and '\'.
static const uint8_t s_unquoted[256] = {
    [0x00 ... 0x21] = 1,
    [0x23 ... 0x5b] = 1,
    [0x5d ... 0xff] = 1,
};

//  Bytes that can continue a validated number after its integer part.
static const uint8_t s_numeric[256] = {
    ['0' ... '9'] = 1,
    ['.'] = 1,
    ['e'] = 1,
    ['E'] = 1,
    ['+'] = 1,
    ['-'] = 1,
};

typedef struct {
    const uint8_t *start;  //  first byte of the JSON text
    const uint8_t *end;  //  one past the last byte
    const gw_json_limits_t *limits;  //  never NULL
    gw_json_error_t *error;  //  where to report, may be NULL
    uint32_t *counts;  //  members of each container, in opening order
    size_t ncounts;  //  containers opened so far
    size_t counts_max;  //  capacity of counts, in entries
    uint32_t counts_local[S_LOCAL_COUNTS];  //  counts while they fit
    char *scratch;  //  heap copy of a long number for strtod, or NULL
    size_t scratch_size;  //  bytes allocated at scratch
} s_json_t;

static int
s_error (gw_json_error_t *error, size_t offset, const char *format, ...)
{
    if (error) {
        error->offset = offset;
        va_list args;
        va_start (args, format);
        vsnprintf (error->message, sizeof (error->message), format, args);
        va_end (args);
    }
    return -1;
}

#define s_fail(self, p, ...)                                                             \
    s_error ((self)->error, (size_t)((p) - (self)->start), __VA_ARGS__)

static int
s_unexpected (s_json_t *self, const uint8_t *p)
{
    if (p >= self->end)
        return s_fail (self, p, "unexpected end of input");
    if (*p >= 0x20 && *p < 0x7f)
        return s_fail (self, p, "unexpected character '%c'", *p);
    return s_fail (self, p, "unexpected byte 0x%02x", *p);
}

static inline const uint8_t *
s_skip_ws (const uint8_t *p, const uint8_t *end)
{
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    return p;
}

//  Length of the valid UTF-8 sequence at p (RFC 3629: no overlongs, no
//  surrogates, nothing above U+10FFFF), or 0 if invalid or truncated.
static inline size_t
s_utf8_seq (const uint8_t *p, const uint8_t *end)
{
    size_t left = (size_t)(end - p);
    uint8_t c = p[0];
    if (c < 0x80)
        return 1;
    if (c < 0xc2)
        return 0;
    if (c < 0xe0)
        return left >= 2 && (p[1] & 0xc0) == 0x80 ? 2 : 0;
    if (c < 0xf0) {
        if (left < 3 || (p[2] & 0xc0) != 0x80)
            return 0;
        uint8_t low = c == 0xe0 ? 0xa0 : 0x80;
        uint8_t high = c == 0xed ? 0x9f : 0xbf;
        return p[1] >= low && p[1] <= high ? 3 : 0;
    }
    if (c < 0xf5) {
        if (left < 4 || (p[2] & 0xc0) != 0x80 || (p[3] & 0xc0) != 0x80)
            return 0;
        uint8_t low = c == 0xf0 ? 0x90 : 0x80;
        uint8_t high = c == 0xf4 ? 0x8f : 0xbf;
        return p[1] >= low && p[1] <= high ? 4 : 0;
    }
    return 0;
}

static inline int
s_hexdigit (uint8_t c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c |= 0x20;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

//  Four hex digits at p as a code unit, or -1.
static inline int32_t
s_hex4 (const uint8_t *p, const uint8_t *end)
{
    if (end - p < 4)
        return -1;
    int32_t value = 0;
    for (int i = 0; i < 4; i++) {
        int digit = s_hexdigit (p[i]);
        if (digit < 0)
            return -1;
        value = value << 4 | digit;
    }
    return value;
}

//  --------------------------------------------------------------------------
//  Pass 1: validate and count.

//  p is at the opening quote; returns the byte after the closing quote.
static const uint8_t *
s_scan_string (s_json_t *self, const uint8_t *p)
{
    const uint8_t *end = self->end;
    p++;
    while (true) {
        while (p < end && s_plain[*p])
            p++;
        if (p == end) {
            s_fail (self, p, "unterminated string");
            return NULL;
        }
        uint8_t c = *p;
        if (c == '"')
            return p + 1;
        if (c == '\\') {
            if (end - p < 2) {
                s_fail (self, p, "unterminated string");
                return NULL;
            }
            uint8_t escape = p[1];
            if (escape == 'u') {
                int32_t unit = s_hex4 (p + 2, end);
                if (unit < 0) {
                    s_fail (self, p, "invalid \\u escape");
                    return NULL;
                }
                if (unit >= 0xdc00 && unit <= 0xdfff) {
                    s_fail (self, p, "lone low surrogate \\u%04x", (unsigned)unit);
                    return NULL;
                }
                if (unit >= 0xd800 && unit <= 0xdbff) {
                    int32_t low = -1;
                    if (end - p >= 12 && p[6] == '\\' && p[7] == 'u')
                        low = s_hex4 (p + 8, end);
                    if (low < 0xdc00 || low > 0xdfff) {
                        s_fail (self, p, "lone high surrogate \\u%04x", (unsigned)unit);
                        return NULL;
                    }
                    p += 12;
                }
                else
                    p += 6;
            }
            else if (escape == '"' || escape == '\\' || escape == '/' || escape == 'b' ||
                escape == 'f' || escape == 'n' || escape == 'r' || escape == 't')
                p += 2;
            else {
                s_fail (self, p, "invalid escape");
                return NULL;
            }
            continue;
        }
        if (c < 0x20) {
            s_fail (self, p, "control character 0x%02x in string", c);
            return NULL;
        }
        size_t size = s_utf8_seq (p, end);
        if (size == 0) {
            s_fail (self, p, "invalid UTF-8 in string");
            return NULL;
        }
        p += size;
    }
}

static inline bool
s_isdigit (const uint8_t *p, const uint8_t *end)
{
    return p < end && *p >= '0' && *p <= '9';
}

//  p is at '-' or a digit; returns the byte after the number.
static const uint8_t *
s_scan_number (s_json_t *self, const uint8_t *p)
{
    const uint8_t *end = self->end;
    if (*p == '-')
        p++;
    if (!s_isdigit (p, end))
        goto invalid;
    if (*p == '0')
        p++;
    else
        while (s_isdigit (p, end))
            p++;
    if (p < end && *p == '.') {
        p++;
        if (!s_isdigit (p, end))
            goto invalid;
        while (s_isdigit (p, end))
            p++;
    }
    if (p < end && (*p | 0x20) == 'e') {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (!s_isdigit (p, end))
            goto invalid;
        while (s_isdigit (p, end))
            p++;
    }
    return p;
invalid:
    s_fail (self, p, "invalid number");
    return NULL;
}

static const uint8_t *
s_scan_literal (s_json_t *self, const uint8_t *p, const char *word, size_t size)
{
    if ((size_t)(self->end - p) < size || memcmp (p, word, size) != 0) {
        s_fail (self, p, "invalid literal");
        return NULL;
    }
    return p + size;
}

//  Record a new container with no members yet.
static int
s_open (s_json_t *self, const uint8_t *p)
{
    if (self->ncounts == self->counts_max) {
        //  Never more containers than values, nor than input bytes / 2.
        size_t cap = self->limits->max_items;
        size_t by_size = (size_t)(self->end - self->start) / 2 + 1;
        if (cap > by_size)
            cap = by_size;
        size_t max = self->counts_max * 2;
        if (max > cap)
            max = cap;
        if (max <= self->ncounts)
            return s_fail (self, p, "too many containers");
        uint32_t *counts;
        if (self->counts == self->counts_local) {
            counts = (uint32_t *)malloc (max * sizeof (uint32_t));
            if (counts)
                memcpy (counts, self->counts_local, self->ncounts * sizeof (uint32_t));
        }
        else
            counts = (uint32_t *)realloc (self->counts, max * sizeof (uint32_t));
        if (!counts)
            return s_fail (self, p, "out of memory");
        self->counts = counts;
        self->counts_max = max;
    }
    self->counts[self->ncounts++] = 0;
    return 0;
}

//  Double the container stack, moving it to the heap the first time.
static int
s_grow_stack (
    s_json_t *self, const uint8_t *p, size_t **stack, size_t *size, size_t *local)
{
    size_t *grown;
    if (*stack == local) {
        grown = (size_t *)malloc (*size * 2 * sizeof (size_t));
        if (grown)
            memcpy (grown, local, *size * sizeof (size_t));
    }
    else
        grown = (size_t *)realloc (*stack, *size * 2 * sizeof (size_t));
    if (!grown)
        return s_fail (self, p, "out of memory");
    *stack = grown;
    *size *= 2;
    return 0;
}

static int
s_pass1 (s_json_t *self)
{
    const gw_json_limits_t *limits = self->limits;
    const uint8_t *p = self->start;
    const uint8_t *end = self->end;
    //  Open containers: (index in counts) << 1 | 1 if object.
    //  The stack grows by doubling as depth is reached, so its size is bounded
    //  by both max_depth and the input actually read.
    size_t stack_local[S_LOCAL_DEPTH];
    size_t *stack = stack_local;
    size_t stack_size = S_LOCAL_DEPTH;
    size_t max_depth = limits->max_depth > 0 ? (size_t)limits->max_depth : 0;
    size_t depth = 0;
    size_t items = 0;
    size_t top = 0;
    int rc = -1;

value:
    p = s_skip_ws (p, end);
    if (p == end) {
        s_unexpected (self, p);
        goto done;
    }
    if (++items > limits->max_items) {
        s_fail (self, p, "more than %zu values", limits->max_items);
        goto done;
    }
    switch (*p) {
        case '{':
        case '[':
            if (depth >= max_depth) {
                s_fail (self, p, "nesting deeper than %d", limits->max_depth);
                goto done;
            }
            if (depth == stack_size &&
                s_grow_stack (self, p, &stack, &stack_size, stack_local))
                goto done;
            if (s_open (self, p))
                goto done;
            top = (self->ncounts - 1) << 1 | (*p == '{');
            stack[depth++] = top;
            p = s_skip_ws (p + 1, end);
            if (p < end && *p == ((top & 1) ? '}' : ']')) {
                p++;
                depth--;
                goto after;
            }
            if (top & 1)
                goto key;
            goto value;
        case '"':
            p = s_scan_string (self, p);
            break;
        case 't':
            p = s_scan_literal (self, p, "true", 4);
            break;
        case 'f':
            p = s_scan_literal (self, p, "false", 5);
            break;
        case 'n':
            p = s_scan_literal (self, p, "null", 4);
            break;
        case '-':
        case '0' ... '9':
            p = s_scan_number (self, p);
            break;
        default:
            s_unexpected (self, p);
            goto done;
    }
    if (!p)
        goto done;
    goto after;

key:
    //  p is at a non-blank byte where an object key must start.
    if (p == end || *p != '"') {
        s_unexpected (self, p);
        goto done;
    }
    if (++items > limits->max_items) {
        s_fail (self, p, "more than %zu values", limits->max_items);
        goto done;
    }
    p = s_scan_string (self, p);
    if (!p)
        goto done;
    p = s_skip_ws (p, end);
    if (p == end || *p != ':') {
        s_unexpected (self, p);
        goto done;
    }
    p++;
    goto value;

after:
    //  A value just ended; p is the byte after it.
    p = s_skip_ws (p, end);
    if (depth == 0) {
        if (p != end) {
            s_unexpected (self, p);
            goto done;
        }
        rc = 0;
        goto done;
    }
    top = stack[depth - 1];
    if (self->counts[top >> 1] == UINT32_MAX) {
        s_fail (self, p, "container too large");
        goto done;
    }
    self->counts[top >> 1]++;
    if (p < end && *p == ',') {
        p = s_skip_ws (p + 1, end);
        if (top & 1)
            goto key;
        goto value;
    }
    if (p < end && *p == ((top & 1) ? '}' : ']')) {
        p++;
        depth--;
        goto after;
    }
    s_unexpected (self, p);

done:
    if (stack != stack_local)
        free (stack);
    return rc;
}

//  --------------------------------------------------------------------------
//  Pass 2: pack. The text is valid; only out-of-memory and number overflow
//  can fail here.

static inline size_t
s_utf8_put (char *out, uint32_t cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | cp >> 12);
        out[1] = (char)(0x80 | (cp >> 6 & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | cp >> 18);
    out[1] = (char)(0x80 | (cp >> 12 & 0x3f));
    out[2] = (char)(0x80 | (cp >> 6 & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

//  p is at the opening quote of a validated string.
static const uint8_t *
s_pack_string (s_json_t *self, const uint8_t *p, msgpack_packer *pk)
{
    const uint8_t *begin = ++p;
    size_t shrink = 0;  //  bytes the escapes lose when decoded
    while (true) {
        while (s_unquoted[*p])
            p++;
        if (*p == '"')
            break;
        if (p[1] == 'u') {
            int32_t unit = s_hex4 (p + 2, self->end);
            if (unit >= 0xd800 && unit <= 0xdbff) {
                shrink += 12 - 4;
                p += 12;
            }
            else {
                shrink += 6 - (unit < 0x80 ? 1 : unit < 0x800 ? 2 : 3);
                p += 6;
            }
        }
        else {
            shrink += 1;
            p += 2;
        }
    }
    const uint8_t *close = p;
    size_t size = (size_t)(close - begin) - shrink;
    if (size > UINT32_MAX) {
        s_fail (self, begin, "string too long");
        return NULL;
    }
    if (msgpack_pack_str (pk, size))
        goto nomem;
    if (shrink == 0) {
        if (msgpack_pack_str_body (pk, begin, size))
            goto nomem;
        return close + 1;
    }
    char buffer[256];
    size_t used = 0;
    const uint8_t *q = begin;
    while (q < close) {
        const uint8_t *slash = (const uint8_t *)memchr (q, '\\', (size_t)(close - q));
        if (!slash)
            slash = close;
        size_t run = (size_t)(slash - q);
        if (used + run > sizeof (buffer) - 4) {
            if (used && msgpack_pack_str_body (pk, buffer, used))
                goto nomem;
            used = 0;
        }
        if (run > sizeof (buffer) - 4) {
            if (msgpack_pack_str_body (pk, q, run))
                goto nomem;
        }
        else {
            memcpy (buffer + used, q, run);
            used += run;
        }
        q = slash;
        if (q == close)
            break;
        //  The buffer has room for 4 more bytes here.
        switch (q[1]) {
            case 'b':
                buffer[used++] = '\b';
                break;
            case 'f':
                buffer[used++] = '\f';
                break;
            case 'n':
                buffer[used++] = '\n';
                break;
            case 'r':
                buffer[used++] = '\r';
                break;
            case 't':
                buffer[used++] = '\t';
                break;
            case 'u': {
                uint32_t cp = (uint32_t)s_hex4 (q + 2, close);
                if (cp >= 0xd800 && cp <= 0xdbff) {
                    uint32_t low = (uint32_t)s_hex4 (q + 8, close);
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
                    q += 6;
                }
                used += s_utf8_put (buffer + used, cp);
                q += 4;
                break;
            }
            default:  //  '"', '\\', '/'
                buffer[used++] = (char)q[1];
                break;
        }
        q += 2;
    }
    if (used && msgpack_pack_str_body (pk, buffer, used))
        goto nomem;
    return close + 1;
nomem:
    s_fail (self, begin, "out of memory");
    return NULL;
}

//  Convert size bytes of a validated number at p with strtod.
static int
s_strtod (s_json_t *self, const uint8_t *p, size_t size, double *result)
{
    char local[S_NUMBER_BUF];
    char *text = local;
    if (size >= sizeof (local)) {
        if (size >= self->scratch_size) {
            char *scratch = (char *)realloc (self->scratch, size + 1);
            if (!scratch)
                return s_fail (self, p, "out of memory");
            self->scratch = scratch;
            self->scratch_size = size + 1;
        }
        text = self->scratch;
    }
    memcpy (text, p, size);
    text[size] = 0;
    *result = strtod (text, NULL);
    if (isinf (*result))
        return s_fail (self, p, "number out of range");
    return 0;
}

//  p is at '-' or a digit of a validated number.
static const uint8_t *
s_pack_number (s_json_t *self, const uint8_t *p, msgpack_packer *pk)
{
    const uint8_t *start = p;
    const uint8_t *end = self->end;
    bool negative = *p == '-';
    if (negative)
        p++;
    uint64_t magnitude = 0;
    bool overflow = false;
    while (p < end && *p >= '0' && *p <= '9') {
        unsigned digit = (unsigned)(*p - '0');
        if (magnitude > (UINT64_MAX - digit) / 10)
            overflow = true;
        else
            magnitude = magnitude * 10 + digit;
        p++;
    }
    bool integer = !(p < end && (*p == '.' || *p == 'e' || *p == 'E'));
    if (integer && !overflow) {
        int rc = 0;
        bool packed = true;
        if (!negative)
            rc = msgpack_pack_uint64 (pk, magnitude);
        else if (magnitude > 0 && magnitude <= (uint64_t)INT64_MAX)
            rc = msgpack_pack_int64 (pk, -(int64_t)magnitude);
        else if (magnitude == (uint64_t)INT64_MAX + 1)
            rc = msgpack_pack_int64 (pk, INT64_MIN);
        else
            packed = false;  //  -0, or below INT64_MIN: a double
        if (rc) {
            s_fail (self, start, "out of memory");
            return NULL;
        }
        if (packed)
            return p;
    }
    while (p < end && s_numeric[*p])
        p++;
    double number = 0;
    if (s_strtod (self, start, (size_t)(p - start), &number))
        return NULL;
    if (msgpack_pack_double (pk, number)) {
        s_fail (self, start, "out of memory");
        return NULL;
    }
    return p;
}

static int
s_pass2 (s_json_t *self, msgpack_packer *pk)
{
    const uint8_t *p = self->start;
    const uint8_t *end = self->end;
    size_t index = 0;
    while (p < end) {
        int rc = 0;
        switch (*p) {
            case ' ':
            case '\t':
            case '\n':
            case '\r':
            case ',':
            case ':':
            case ']':
            case '}':
                p++;
                continue;
            case '{':
                assert (index < self->ncounts);
                rc = msgpack_pack_map (pk, self->counts[index++]);
                p++;
                break;
            case '[':
                assert (index < self->ncounts);
                rc = msgpack_pack_array (pk, self->counts[index++]);
                p++;
                break;
            case '"':
                p = s_pack_string (self, p, pk);
                if (!p)
                    return -1;
                break;
            case 't':
                rc = msgpack_pack_true (pk);
                p += 4;
                break;
            case 'f':
                rc = msgpack_pack_false (pk);
                p += 5;
                break;
            case 'n':
                rc = msgpack_pack_nil (pk);
                p += 4;
                break;
            default:
                p = s_pack_number (self, p, pk);
                if (!p)
                    return -1;
                break;
        }
        if (rc)
            return s_fail (self, p, "out of memory");
    }
    return 0;
}

gw_json_limits_t
gw_json_limits_default (void)
{
    gw_json_limits_t limits = {
        .max_size = 32 * 1024 * 1024, .max_depth = 64, .max_items = 4 * 1024 * 1024};
    return limits;
}

int
gw_json_to_msgpack (const char *json, size_t size, msgpack_packer *pk,
    const gw_json_limits_t *limits, gw_json_error_t *error)
{
    assert (pk);
    assert (json || size == 0);
    gw_json_limits_t defaults = gw_json_limits_default ();
    if (error) {
        error->offset = 0;
        error->message[0] = 0;
    }
    if (!json)
        json = "";
    s_json_t self = {.start = (const uint8_t *)json,
        .end = (const uint8_t *)json + size,
        .limits = limits ? limits : &defaults,
        .error = error,
        .counts_max = S_LOCAL_COUNTS};
    self.counts = self.counts_local;
    if (size > self.limits->max_size)
        return s_error (error, self.limits->max_size, "input larger than %zu bytes",
            self.limits->max_size);
    int rc = s_pass1 (&self);
    if (rc == 0)
        rc = s_pass2 (&self, pk);
    if (self.counts != self.counts_local)
        free (self.counts);
    free (self.scratch);
    return rc;
}

//  --------------------------------------------------------------------------
//  msgpack -> JSON

typedef struct {
    gw_mreader_t reader;  //  bounded cursor over the input
    const uint8_t *base;  //  start of the input, for error offsets
    msgpack_sbuffer *out;  //  where JSON goes
    gw_json_error_t *error;  //  may be NULL
} s_emit_t;

#define s_emit_fail(self, ...)                                                           \
    s_error ((self)->error, (size_t)((self)->reader.pos - (self)->base), __VA_ARGS__)

static inline int
s_put (msgpack_sbuffer *out, const void *data, size_t size)
{
    return msgpack_sbuffer_write (out, (const char *)data, size);
}

size_t
gw_json_format_u64 (char *buffer, uint64_t value, bool negative)
{
    char digits[20];
    size_t count = 0;
    do {
        digits[count++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    size_t size = 0;
    if (negative)
        buffer[size++] = '-';
    while (count)
        buffer[size++] = digits[--count];
    return size;
}

//  Shortest of %.15g, %.16g, %.17g that reads back to the same bits, with a
//  '.' or exponent so it re-reads as a double. buffer holds 32 bytes.
static size_t
s_format_double (char *buffer, double value)
{
    int size = 0;
    for (int precision = 15; precision <= 17; precision++) {
        size = snprintf (buffer, 32, "%.*g", precision, value);
        double back = strtod (buffer, NULL);
        if (memcmp (&back, &value, sizeof (double)) == 0)
            break;
    }
    if (!memchr (buffer, '.', (size_t)size) && !memchr (buffer, 'e', (size_t)size) &&
        !memchr (buffer, 'E', (size_t)size)) {
        buffer[size++] = '.';
        buffer[size++] = '0';
        buffer[size] = 0;
    }
    return (size_t)size;
}

static int
s_emit (s_emit_t *self, int depth_left)
{
    gw_mvalue_t value;
    char number[32];
    const uint8_t *at = self->reader.pos;
    if (gw_mreader_next (&self->reader, &value))
        return s_emit_fail (self, "malformed msgpack");
    int rc = 0;
    switch (value.type) {
        case GW_MP_NIL:
            rc = s_put (self->out, "null", 4);
            break;
        case GW_MP_BOOL:
            rc = value.v.b ? s_put (self->out, "true", 4) : s_put (self->out, "false", 5);
            break;
        case GW_MP_UINT:
            rc = s_put (self->out, number, gw_json_format_u64 (number, value.v.u, false));
            break;
        case GW_MP_INT:
            //  Magnitude without overflowing on INT64_MIN.
            rc = s_put (self->out, number,
                gw_json_format_u64 (number, (uint64_t)(-(value.v.i + 1)) + 1, true));
            break;
        case GW_MP_FLOAT:
            if (!isfinite (value.v.f))
                return s_error (self->error, (size_t)(at - self->base),
                    "NaN or infinity is not JSON");
            rc = s_put (self->out, number, s_format_double (number, value.v.f));
            break;
        case GW_MP_STR:
        case GW_MP_BIN:
            if (gw_json_escape (value.ptr, value.size, self->out))
                return s_error (self->error, (size_t)(at - self->base),
                    "invalid UTF-8 in %s", value.type == GW_MP_STR ? "str" : "bin");
            break;
        case GW_MP_EXT:
            return s_error (self->error, (size_t)(at - self->base),
                "ext type %d is not JSON", value.ext_type);
        case GW_MP_ARRAY:
        case GW_MP_MAP: {
            bool map = value.type == GW_MP_MAP;
            if (depth_left <= 0)
                return s_error (self->error, (size_t)(at - self->base),
                    "nesting deeper than allowed");
            rc = s_put (self->out, map ? "{" : "[", 1);
            for (uint32_t index = 0; index < value.v.count && rc == 0; index++) {
                if (index > 0 && s_put (self->out, ",", 1))
                    break;
                if (map) {
                    gw_mvalue_t key;
                    const uint8_t *key_at = self->reader.pos;
                    if (gw_mreader_next (&self->reader, &key))
                        return s_emit_fail (self, "malformed msgpack");
                    if (key.type != GW_MP_STR)
                        return s_error (self->error, (size_t)(key_at - self->base),
                            "map key is not a string");
                    if (gw_json_escape (key.ptr, key.size, self->out))
                        return s_error (self->error, (size_t)(key_at - self->base),
                            "invalid UTF-8 in map key");
                    rc = s_put (self->out, ":", 1);
                    if (rc)
                        break;
                }
                if (s_emit (self, depth_left - 1))
                    return -1;
            }
            if (rc == 0)
                rc = s_put (self->out, map ? "}" : "]", 1);
            break;
        }
    }
    if (rc)
        return s_emit_fail (self, "out of memory");
    return 0;
}

int
gw_json_from_msgpack (const void *data, size_t size, msgpack_sbuffer *out, int max_depth,
    gw_json_error_t *error)
{
    assert (out);
    if (error) {
        error->offset = 0;
        error->message[0] = 0;
    }
    size_t restore = out->size;
    s_emit_t self = {.base = (const uint8_t *)data, .out = out, .error = error};
    gw_mreader_init (&self.reader, data, size);
    int rc = s_emit (&self, max_depth);
    if (rc == 0 && gw_mreader_left (&self.reader) > 0)
        rc = s_emit_fail (&self, "trailing bytes after the object");
    if (rc)
        out->size = restore;
    return rc;
}

int
gw_json_escape (const char *text, size_t size, msgpack_sbuffer *out)
{
    assert (out);
    assert (text || size == 0);
    static const char hex[] = "0123456789abcdef";
    size_t restore = out->size;
    if (s_put (out, "\"", 1))
        goto failed;
    if (size > 0) {
        const uint8_t *p = (const uint8_t *)text;
        const uint8_t *end = p + size;
        const uint8_t *run = p;
        while (p < end) {
            uint8_t c = *p;
            if (s_plain[c]) {
                p++;
                continue;
            }
            if (c >= 0x80) {
                size_t seq = s_utf8_seq (p, end);
                if (seq == 0)
                    goto failed;
                p += seq;
                continue;
            }
            if (p > run && s_put (out, run, (size_t)(p - run)))
                goto failed;
            char escape[6] = {'\\', 0, '0', '0', 0, 0};
            size_t escape_size = 2;
            switch (c) {
                case '"':
                case '\\':
                    escape[1] = (char)c;
                    break;
                case '\b':
                    escape[1] = 'b';
                    break;
                case '\f':
                    escape[1] = 'f';
                    break;
                case '\n':
                    escape[1] = 'n';
                    break;
                case '\r':
                    escape[1] = 'r';
                    break;
                case '\t':
                    escape[1] = 't';
                    break;
                default:
                    escape[1] = 'u';
                    escape[4] = hex[c >> 4];
                    escape[5] = hex[c & 15];
                    escape_size = 6;
                    break;
            }
            if (s_put (out, escape, escape_size))
                goto failed;
            run = ++p;
        }
        if (p > run && s_put (out, run, (size_t)(p - run)))
            goto failed;
    }
    if (s_put (out, "\"", 1))
        goto failed;
    return 0;
failed:
    out->size = restore;
    return -1;
}

//  --------------------------------------------------------------------------
//  Self test

//  JSON text -> msgpack in out (cleared first). Returns the transcoder's rc.
static int
s_to (const char *json, size_t size, msgpack_sbuffer *out, const gw_json_limits_t *limits,
    gw_json_error_t *error)
{
    msgpack_sbuffer_clear (out);
    msgpack_packer pk;
    msgpack_packer_init (&pk, out, msgpack_sbuffer_write);
    return gw_json_to_msgpack (json, size, &pk, limits, error);
}

//  Assert that msgpack in packed goes to JSON and back to the same bytes.
//  Returns the JSON text (freshly allocated).
static char *
s_roundtrip (msgpack_sbuffer *packed)
{
    msgpack_sbuffer json, again;
    msgpack_sbuffer_init (&json);
    msgpack_sbuffer_init (&again);
    gw_json_error_t error;
    assert (gw_mpack_check (packed->data, packed->size, 64, SIZE_MAX) == 0);
    int rc = gw_json_from_msgpack (packed->data, packed->size, &json, 64, &error);
    assert (rc == 0);
    rc = s_to (json.data, json.size, &again, NULL, &error);
    assert (rc == 0);
    assert (again.size == packed->size);
    assert (memcmp (again.data, packed->data, packed->size) == 0);
    char *text = (char *)malloc (json.size + 1);
    assert (text);
    memcpy (text, json.data, json.size);
    text[json.size] = 0;
    msgpack_sbuffer_destroy (&json);
    msgpack_sbuffer_destroy (&again);
    return text;
}

//  Assert json is accepted and comes back out as expect (NULL: as json).
static void
s_assert_json (const char *json, const char *expect)
{
    msgpack_sbuffer packed;
    msgpack_sbuffer_init (&packed);
    gw_json_error_t error;
    int rc = s_to (json, strlen (json), &packed, NULL, &error);
    if (rc)
        printf ("\n%s: %s at %zu\n", json, error.message, error.offset);
    assert (rc == 0);
    char *text = s_roundtrip (&packed);
    if (strcmp (text, expect ? expect : json) != 0)
        printf ("\n%s -> %s\n", json, text);
    assert (streq (text, expect ? expect : json));
    free (text);
    msgpack_sbuffer_destroy (&packed);
}

//  Assert json is rejected; returns the error offset.
static size_t
s_assert_bad (const char *json, size_t size, const gw_json_limits_t *limits)
{
    msgpack_sbuffer packed;
    msgpack_sbuffer_init (&packed);
    gw_json_error_t error;
    int rc = s_to (json, size, &packed, limits, &error);
    if (rc == 0)
        printf ("\naccepted: %.*s\n", (int)size, json);
    assert (rc == -1);
    assert (error.message[0]);
    msgpack_sbuffer_destroy (&packed);
    return error.offset;
}

//  Read one msgpack value from packed and return it.
static gw_mvalue_t
s_first (msgpack_sbuffer *packed)
{
    gw_mreader_t reader;
    gw_mvalue_t value;
    gw_mreader_init (&reader, packed->data, packed->size);
    int rc = gw_mreader_next (&reader, &value);
    assert (rc == 0);
    return value;
}

static void
s_test_numbers (void)
{
    msgpack_sbuffer packed;
    msgpack_sbuffer_init (&packed);
    gw_mvalue_t value;

    assert (s_to ("9223372036854775807", 19, &packed, NULL, NULL) == 0);
    value = s_first (&packed);
    assert (value.type == GW_MP_UINT && value.v.u == INT64_MAX);
    assert (s_to ("-9223372036854775808", 20, &packed, NULL, NULL) == 0);
    value = s_first (&packed);
    assert (value.type == GW_MP_INT && value.v.i == INT64_MIN);
    assert (s_to ("18446744073709551615", 20, &packed, NULL, NULL) == 0);
    value = s_first (&packed);
    assert (value.type == GW_MP_UINT && value.v.u == UINT64_MAX);
    assert (s_to ("18446744073709551616", 20, &packed, NULL, NULL) == 0);
    value = s_first (&packed);
    assert (value.type == GW_MP_FLOAT && value.v.f == 18446744073709551616.0);
    assert (s_to ("-9223372036854775809", 20, &packed, NULL, NULL) == 0);
    value = s_first (&packed);
    assert (value.type == GW_MP_FLOAT && value.v.f == -9223372036854775808.0);
    assert (s_to ("-0", 2, &packed, NULL, NULL) == 0);
    value = s_first (&packed);
    assert (value.type == GW_MP_FLOAT && value.v.f == 0 && signbit (value.v.f));
    assert (s_to ("0", 1, &packed, NULL, NULL) == 0);
    value = s_first (&packed);
    assert (value.type == GW_MP_UINT && value.v.u == 0);
    assert (s_to ("-1", 2, &packed, NULL, NULL) == 0);
    value = s_first (&packed);
    assert (value.type == GW_MP_INT && value.v.i == -1);
    assert (s_to ("1.5e300", 7, &packed, NULL, NULL) == 0);
    value = s_first (&packed);
    assert (value.type == GW_MP_FLOAT && value.v.f == 1.5e300);
    assert (s_to ("1e-400", 6, &packed, NULL, NULL) == 0);  //  underflow: 0
    value = s_first (&packed);
    assert (value.type == GW_MP_FLOAT && value.v.f == 0);

    s_assert_json ("9223372036854775807", NULL);
    s_assert_json ("-9223372036854775808", NULL);
    s_assert_json ("18446744073709551615", NULL);
    s_assert_json ("18446744073709551616", "1.8446744073709552e+19");
    s_assert_json ("-0", "-0.0");
    s_assert_json ("-0.0", NULL);
    s_assert_json ("0.0", NULL);
    s_assert_json ("1.0", NULL);
    s_assert_json ("1E2", "100.0");
    s_assert_json ("0.1", NULL);
    s_assert_json ("1.5e300", "1.5e+300");
    s_assert_json ("1e22", "1e+22");
    s_assert_json ("-1.5", NULL);
    s_assert_json ("0.30000000000000004", NULL);
    s_assert_json ("5e-324", "4.94065645841247e-324");
    s_assert_json ("1.7976931348623157e308", "1.7976931348623157e+308");
    s_assert_json ("[1,-2,3.25,true,false,null]", NULL);
    //  A number longer than the stack buffer takes the heap copy.
    char longer[600];
    memset (longer, '0', sizeof (longer));
    memcpy (longer, "0.", 2);
    memcpy (longer + 550, "123e550", 7);  //  1.23e-549 * 1e550
    assert (s_to (longer, 557, &packed, NULL, NULL) == 0);
    value = s_first (&packed);
    assert (value.type == GW_MP_FLOAT && value.v.f == 12.3);
    memset (longer, '9', 400);
    assert (s_to (longer, 400, &packed, NULL, NULL) == -1);  //  ~1e400 overflows
    assert (s_to (longer, 300, &packed, NULL, NULL) == 0);
    value = s_first (&packed);
    assert (value.type == GW_MP_FLOAT && value.v.f == 1e300);
    assert (s_assert_bad ("1e400", 5, NULL) == 0);
    assert (s_assert_bad ("-1e400", 6, NULL) == 0);
    assert (s_assert_bad ("[1,2e999]", 9, NULL) == 3);

    //  Grammar.
    s_assert_bad ("01", 2, NULL);
    s_assert_bad ("-", 1, NULL);
    s_assert_bad ("1.", 2, NULL);
    s_assert_bad (".5", 2, NULL);
    s_assert_bad ("1e", 2, NULL);
    s_assert_bad ("1e+", 3, NULL);
    s_assert_bad ("+1", 2, NULL);
    s_assert_bad ("0x10", 4, NULL);
    s_assert_bad ("Infinity", 8, NULL);
    s_assert_bad ("NaN", 3, NULL);

    //  Doubles from msgpack, including a float32 widened.
    msgpack_sbuffer json;
    msgpack_sbuffer_init (&json);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &packed, msgpack_sbuffer_write);
    msgpack_sbuffer_clear (&packed);
    msgpack_pack_array (&pk, 4);
    msgpack_pack_float (&pk, 0.1f);
    msgpack_pack_double (&pk, -0.0);
    msgpack_pack_double (&pk, 100);
    msgpack_pack_double (&pk, 1e-7);
    assert (gw_json_from_msgpack (packed.data, packed.size, &json, 4, NULL) == 0);
    assert (json.size == strlen ("[0.10000000149011612,-0.0,100.0,1e-07]"));
    assert (memcmp (json.data, "[0.10000000149011612,-0.0,100.0,1e-07]", json.size) == 0);
    msgpack_sbuffer_destroy (&json);
    msgpack_sbuffer_destroy (&packed);
}

static void
s_test_strings (void)
{
    msgpack_sbuffer packed;
    msgpack_sbuffer_init (&packed);
    gw_mvalue_t value;

    //  Escapes decode to UTF-8; the surrogate pair is U+1F600.
    const char *json =
        "\"a\\\"\\\\\\/\\b\\f\\n\\r\\t\\u0041\\u00e9\\u20ac\\ud83d\\ude00\\u0000z\"";
    assert (s_to (json, strlen (json), &packed, NULL, NULL) == 0);
    value = s_first (&packed);
    const char *expect = "a\"\\/\b\f\n\r\tA\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\x00z";
    assert (value.type == GW_MP_STR && value.size == 21);
    assert (memcmp (value.ptr, expect, 21) == 0);
    char *text = s_roundtrip (&packed);
    assert (streq (text,
        "\"a\\\"\\\\/\\b\\f\\n\\r\\tA\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\\u0000z\""));
    free (text);
    s_assert_json ("\"\\u001f\x7f\"", "\"\\u001f\x7f\"");
    s_assert_json ("\"caf\xc3\xa9 \xe6\x97\xa5\xf0\x9f\x98\x80\"", NULL);
    s_assert_json ("{\"\\u00e9\":\"\"}", "{\"\xc3\xa9\":\"\"}");

    //  A long string with escapes spread out, to exercise buffer flushes.
    size_t size = 6000;
    char *big = (char *)malloc (size + 2);
    assert (big);
    big[0] = '"';
    for (size_t i = 1; i <= size; i++)
        big[i] = (i % 97 == 0) ? '\\' : (i % 97 == 1 && i > 1) ? 'n' : 'x';
    big[size + 1] = '"';
    if (big[size] == '\\')
        big[size] = 'x';
    assert (s_to (big, size + 2, &packed, NULL, NULL) == 0);
    text = s_roundtrip (&packed);
    free (text);
    //  Long escape runs and long unescaped runs, alternating.
    for (size_t i = 1; i <= size; i++)
        big[i] = (i - 1) / 300 % 2 ? 'y' : "\\u00e9"[(i - 1) % 6];
    int rc = s_to (big, size + 2, &packed, NULL, NULL);
    assert (rc == 0);
    text = s_roundtrip (&packed);
    free (text);
    free (big);

    //  Rejected: lone and mispaired surrogates, bad escapes, raw controls,
    //  invalid UTF-8 of every kind, BOM.
    assert (s_assert_bad ("\"\\ud800\"", 8, NULL) == 1);
    assert (s_assert_bad ("\"ab\\udc00\"", 10, NULL) == 3);
    s_assert_bad ("\"\\ud800\\u0041\"", 14, NULL);
    s_assert_bad ("\"\\ud800\\ud800\"", 14, NULL);
    s_assert_bad ("\"\\udc00\\ud800\"", 14, NULL);
    s_assert_bad ("\"\\ud800\\n\"", 10, NULL);
    s_assert_bad ("\"\\ud800", 7, NULL);
    s_assert_bad ("\"\\u12\"", 6, NULL);
    s_assert_bad ("\"\\u12g4\"", 8, NULL);
    s_assert_bad ("\"\\x41\"", 6, NULL);
    s_assert_bad ("\"\\'\"", 4, NULL);
    s_assert_bad ("\"a\tb\"", 5, NULL);
    s_assert_bad ("\"a\nb\"", 5, NULL);
    s_assert_bad ("\"a\0b\"", 5, NULL);
    s_assert_bad ("\"\xc0\xaf\"", 4, NULL);  //  overlong
    s_assert_bad ("\"\xe0\x80\xaf\"", 5, NULL);  //  overlong
    s_assert_bad ("\"\xed\xa0\x80\"", 5, NULL);  //  UTF-8 surrogate
    s_assert_bad ("\"\xf4\x90\x80\x80\"", 6, NULL);  //  above U+10FFFF
    s_assert_bad ("\"\xf5\x80\x80\x80\"", 6, NULL);
    s_assert_bad ("\"\x80\"", 3, NULL);
    s_assert_bad ("\"\xe2\x82\"", 4, NULL);  //  truncated
    s_assert_bad ("\"\xe2\x82", 3, NULL);
    s_assert_bad ("\"abc", 4, NULL);
    s_assert_bad ("\"abc\\", 5, NULL);
    s_assert_bad ("\xef\xbb\xbf{}", 5, NULL);

    //  gw_json_escape: controls, and invalid UTF-8 leaves out unchanged.
    msgpack_sbuffer out;
    msgpack_sbuffer_init (&out);
    assert (gw_json_escape ("a\x01\"\n", 4, &out) == 0);
    assert (out.size == 13 && memcmp (out.data, "\"a\\u0001\\\"\\n\"", 13) == 0);
    assert (gw_json_escape ("ok\xff", 3, &out) == -1);
    assert (out.size == 13);
    assert (gw_json_escape (NULL, 0, &out) == 0);
    assert (out.size == 15 && memcmp (out.data + 13, "\"\"", 2) == 0);
    msgpack_sbuffer_destroy (&out);
    msgpack_sbuffer_destroy (&packed);
}

static void
s_test_limits (void)
{
    msgpack_sbuffer packed;
    msgpack_sbuffer_init (&packed);
    gw_json_limits_t limits = gw_json_limits_default ();
    assert (limits.max_size == 32 * 1024 * 1024);
    assert (limits.max_depth == 64);
    assert (limits.max_items == 4 * 1024 * 1024);

    //  Depth: 64 levels pass, 65 fail, for arrays and objects.
    char deep[1024];
    for (int levels = 64; levels <= 65; levels++) {
        size_t size = 0;
        for (int i = 0; i < levels; i++)
            deep[size++] = '[';
        for (int i = 0; i < levels; i++)
            deep[size++] = ']';
        int rc = s_to (deep, size, &packed, NULL, NULL);
        assert (rc == (levels <= 64 ? 0 : -1));
        size = 0;
        for (int i = 0; i < levels; i++) {
            memcpy (deep + size, "{\"a\":", 5);
            size += 5;
        }
        deep[size++] = '1';
        for (int i = 0; i < levels; i++)
            deep[size++] = '}';
        rc = s_to (deep, size, &packed, NULL, NULL);
        assert (rc == (levels <= 64 ? 0 : -1));
        if (rc == 0)
            free (s_roundtrip (&packed));
    }
    assert (s_assert_bad (deep, 5, NULL) == 5);  //  "{\"a\":" alone: end of input
    limits.max_depth = 2;
    assert (s_to ("[[1]]", 5, &packed, &limits, NULL) == 0);
    assert (s_assert_bad ("[[[1]]]", 7, &limits) == 2);
    assert (s_assert_bad ("[{\"a\":[]}]", 10, &limits) == 6);
    limits.max_depth = 0;
    assert (s_to ("1", 1, &packed, &limits, NULL) == 0);
    s_assert_bad ("[]", 2, &limits);
    //  A large max_depth puts the container stack on the heap.
    limits.max_depth = 200;
    char *nested = (char *)malloc (400);
    assert (nested);
    memset (nested, '[', 200);
    memset (nested + 200, ']', 200);
    assert (s_to (nested, 400, &packed, &limits, NULL) == 0);
    assert (s_to (nested, 399, &packed, &limits, NULL) == -1);
    free (nested);

    //  Size.
    limits = gw_json_limits_default ();
    limits.max_size = 8;
    assert (s_to ("[1,2,3]", 7, &packed, &limits, NULL) == 0);
    assert (s_to ("[1,2,3] ", 8, &packed, &limits, NULL) == 0);
    s_assert_bad ("[1,2,3]  ", 9, &limits);

    //  Items: every value, keys included.
    limits = gw_json_limits_default ();
    limits.max_items = 4;
    assert (s_to ("[1,2,3]", 7, &packed, &limits, NULL) == 0);
    assert (s_assert_bad ("[1,2,3,4]", 9, &limits) == 7);
    limits.max_items = 5;
    assert (s_to ("{\"a\":1,\"b\":2}", 13, &packed, &limits, NULL) == 0);  //  5 with keys
    s_assert_bad ("{\"a\":[1],\"b\":2}", 15, &limits);

    //  Many containers: the count array grows past the stack.
    limits = gw_json_limits_default ();
    size_t many = 10000;
    char *wide = (char *)malloc (many * 3 + 2);
    assert (wide);
    size_t size = 0;
    wide[size++] = '[';
    for (size_t i = 0; i < many; i++) {
        memcpy (wide + size, i % 2 ? "{}," : "[],", 3);
        size += 3;
    }
    wide[size - 1] = ']';
    assert (s_to (wide, size, &packed, NULL, NULL) == 0);
    free (s_roundtrip (&packed));
    limits.max_items = 5000;
    s_assert_bad (wide, size, &limits);
    free (wide);

    //  Duplicate keys pass through, in order.
    assert (s_to ("{\"a\":1,\"a\":2}", 13, &packed, NULL, NULL) == 0);
    gw_mvalue_t value = s_first (&packed);
    assert (value.type == GW_MP_MAP && value.v.count == 2);
    s_assert_json ("{\"a\":1,\"a\":2}", NULL);
    s_assert_json (
        " {\"a\" : [ 1 , {} , [] ] ,\n\"b\":\"\"}\r\n\t", "{\"a\":[1,{},[]],\"b\":\"\"}");

    //  Structure errors and where they are reported.
    assert (s_assert_bad ("[1,]", 4, NULL) == 3);
    assert (s_assert_bad ("[1 2]", 5, NULL) == 3);
    assert (s_assert_bad ("{\"a\" 1}", 7, NULL) == 5);
    assert (s_assert_bad ("{1:2}", 5, NULL) == 1);
    assert (s_assert_bad ("{\"a\":1,}", 8, NULL) == 7);
    assert (s_assert_bad ("[1]]", 4, NULL) == 3);
    assert (s_assert_bad ("[1}", 3, NULL) == 2);
    assert (s_assert_bad ("{\"a\":1]", 7, NULL) == 6);
    assert (s_assert_bad ("1 2", 3, NULL) == 2);
    assert (s_assert_bad ("", 0, NULL) == 0);
    assert (s_assert_bad ("   ", 3, NULL) == 3);
    assert (s_assert_bad (NULL, 0, NULL) == 0);
    assert (s_assert_bad ("tru", 3, NULL) == 0);
    assert (s_assert_bad ("nul", 3, NULL) == 0);
    assert (s_assert_bad ("[true false]", 12, NULL) == 6);
    assert (s_assert_bad ("[", 1, NULL) == 1);
    assert (s_assert_bad ("{", 1, NULL) == 1);
    assert (s_assert_bad ("1\0", 2, NULL) == 1);
    gw_json_error_t error;
    assert (s_to ("[1,}", 4, &packed, NULL, &error) == -1);
    assert (streq (error.message, "unexpected character '}'") && error.offset == 3);
    msgpack_sbuffer_destroy (&packed);
}

static void
s_test_from_msgpack (void)
{
    msgpack_sbuffer packed, json;
    msgpack_sbuffer_init (&packed);
    msgpack_sbuffer_init (&json);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &packed, msgpack_sbuffer_write);
    gw_json_error_t error;

    //  Non-string map key.
    msgpack_pack_map (&pk, 1);
    msgpack_pack_uint64 (&pk, 1);
    msgpack_pack_nil (&pk);
    assert (gw_json_from_msgpack (packed.data, packed.size, &json, 8, &error) == -1);
    assert (streq (error.message, "map key is not a string") && error.offset == 1);
    assert (json.size == 0);
    //  NaN and infinity.
    msgpack_sbuffer_clear (&packed);
    msgpack_pack_array (&pk, 1);
    msgpack_pack_double (&pk, NAN);
    assert (gw_json_from_msgpack (packed.data, packed.size, &json, 8, &error) == -1);
    assert (strstr (error.message, "NaN") && json.size == 0);
    msgpack_sbuffer_clear (&packed);
    msgpack_pack_float (&pk, -INFINITY);
    assert (gw_json_from_msgpack (packed.data, packed.size, &json, 8, &error) == -1);
    //  Ext.
    msgpack_sbuffer_clear (&packed);
    msgpack_pack_ext (&pk, 1, 5);
    msgpack_pack_ext_body (&pk, "x", 1);
    assert (gw_json_from_msgpack (packed.data, packed.size, &json, 8, &error) == -1);
    assert (streq (error.message, "ext type 5 is not JSON"));
    //  Invalid UTF-8 in a str, in a key, and in a bin; valid bin is a string.
    msgpack_sbuffer_clear (&packed);
    msgpack_pack_str (&pk, 2);
    msgpack_pack_str_body (&pk, "\xc3\x28", 2);
    assert (gw_json_from_msgpack (packed.data, packed.size, &json, 8, &error) == -1);
    assert (strstr (error.message, "UTF-8"));
    msgpack_sbuffer_clear (&packed);
    msgpack_pack_map (&pk, 1);
    msgpack_pack_str (&pk, 1);
    msgpack_pack_str_body (&pk, "\xff", 1);
    msgpack_pack_nil (&pk);
    assert (gw_json_from_msgpack (packed.data, packed.size, &json, 8, &error) == -1);
    assert (strstr (error.message, "UTF-8"));
    msgpack_sbuffer_clear (&packed);
    msgpack_pack_bin (&pk, 1);
    msgpack_pack_bin_body (&pk, "\xff", 1);
    assert (gw_json_from_msgpack (packed.data, packed.size, &json, 8, &error) == -1);
    msgpack_sbuffer_clear (&packed);
    msgpack_pack_bin (&pk, 2);
    msgpack_pack_bin_body (&pk, "hi", 2);
    assert (gw_json_from_msgpack (packed.data, packed.size, &json, 8, &error) == 0);
    assert (json.size == 4 && memcmp (json.data, "\"hi\"", 4) == 0);
    msgpack_sbuffer_clear (&json);
    //  Malformed, truncated, trailing bytes, too deep: -1 and out unchanged.
    assert (gw_json_from_msgpack ("\xc1", 1, &json, 8, &error) == -1);
    assert (gw_json_from_msgpack ("\xdd\xff\xff\xff\xff", 5, &json, 8, &error) == -1);
    assert (gw_json_from_msgpack ("\x92\x01", 2, &json, 8, &error) == -1);
    assert (gw_json_from_msgpack ("\x01\x02", 2, &json, 8, &error) == -1);
    assert (strstr (error.message, "trailing"));
    assert (gw_json_from_msgpack ("", 0, &json, 8, &error) == -1);
    assert (gw_json_from_msgpack (NULL, 0, &json, 8, &error) == -1);
    assert (gw_json_from_msgpack ("\x91\x91\x90", 3, &json, 2, &error) == -1);
    assert (json.size == 0);
    assert (gw_json_from_msgpack ("\x91\x91\x90", 3, &json, 3, &error) == 0);
    assert (json.size == 6 && memcmp (json.data, "[[[]]]", 6) == 0);
    msgpack_sbuffer_clear (&json);
    //  Integers in every width and sign.
    msgpack_sbuffer_clear (&packed);
    msgpack_pack_array (&pk, 6);
    msgpack_pack_int8 (&pk, -128);
    msgpack_pack_int64 (&pk, INT64_MIN);
    msgpack_pack_uint64 (&pk, UINT64_MAX);
    msgpack_pack_int32 (&pk, 7);
    msgpack_pack_uint8 (&pk, 0);
    msgpack_pack_int16 (&pk, -300);
    assert (gw_json_from_msgpack (packed.data, packed.size, &json, 8, &error) == 0);
    const char *expect = "[-128,-9223372036854775808,18446744073709551615,7,0,-300]";
    assert (json.size == strlen (expect) && memcmp (json.data, expect, json.size) == 0);
    msgpack_sbuffer_destroy (&json);
    msgpack_sbuffer_destroy (&packed);
}

//  Every JSONTestSuite parsing case: y_ accepted and round-tripped, n_
//  rejected, i_ either (accepted ones must round-trip too).
static void
s_test_suite (bool verbose)
{
    char *dirname = gw_testdata_path ("JSONTestSuite/test_parsing");
    assert (dirname);
    DIR *dir = opendir (dirname);
    if (!dir)
        printf ("\ncannot open %s\n", dirname);
    assert (dir);
    size_t files = 0, yes = 0, no = 0, either = 0, either_accepted = 0;
    msgpack_sbuffer packed;
    msgpack_sbuffer_init (&packed);
    struct dirent *entry;
    while ((entry = readdir (dir))) {
        const char *name = entry->d_name;
        if (name[0] == '.')
            continue;
        files++;
        char *path = zsys_sprintf ("%s/%s", dirname, name);
        assert (path);
        FILE *file = fopen (path, "rb");
        assert (file);
        int rc = fseek (file, 0, SEEK_END);
        assert (rc == 0);
        long length = ftell (file);
        assert (length >= 0);
        rewind (file);
        char *text = (char *)malloc ((size_t)length + 1);
        assert (text);
        size_t got = fread (text, 1, (size_t)length, file);
        assert (got == (size_t)length);
        fclose (file);
        gw_json_error_t error;
        rc = s_to (text, got, &packed, NULL, &error);
        if (verbose)
            printf ("\n  %s: %s%s", name, rc ? "rejected: " : "accepted",
                rc ? error.message : "");
        if (name[0] == 'y') {
            if (rc)
                printf ("\n%s rejected: %s at %zu\n", name, error.message, error.offset);
            assert (rc == 0);
            free (s_roundtrip (&packed));
            yes++;
        }
        else if (name[0] == 'n') {
            if (rc == 0)
                printf ("\n%s accepted\n", name);
            assert (rc == -1);
            no++;
        }
        else if (name[0] == 'i') {
            if (rc == 0) {
                free (s_roundtrip (&packed));
                either_accepted++;
            }
            either++;
        }
        free (text);
        free (path);
    }
    closedir (dir);
    msgpack_sbuffer_destroy (&packed);
    printf ("%s%zu y_ accepted, %zu n_ rejected, %zu i_ survived (%zu accepted) ... ",
        verbose ? "\n  " : "", yes, no, either, either_accepted);
    if (files < 300)
        printf ("\nonly %zu files in %s\n", files, dirname);
    assert (files >= 300);
    assert (yes >= 90 && no >= 180 && either >= 30);
    free (dirname);
}

void
gw_json_test (bool verbose)
{
    printf (" * gw_json: ");
    s_test_numbers ();
    s_test_strings ();
    s_test_limits ();
    s_test_from_msgpack ();
    s_test_suite (verbose);
    printf ("OK\n");
}
