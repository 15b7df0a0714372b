//  --------------------------------------------------------------------------
//  gw_sse — incremental text/event-stream parser (see gw_sse.h).
//
//  Design note. Two buffers: `in` holds bytes fed and not yet split into
//  lines (at most one partial line plus what the caller has not pulled yet),
//  `data` holds the data of the event being assembled, preceded by the bytes
//  "data: " so that a single-line event can be handed out in its wire form
//  ("data: <json>\n\n") without a copy: the bridge sends provider JSON bytes
//  as they came. Both buffers grow on demand (a parser per stream, up to a
//  thousand streams per bridge: nothing is preallocated at the bounds) and
//  shrink again on reset.
//
//  Invariants: in_pos <= in_size <= in_cap; data_size >= PREFIX_SIZE; a
//  line is never longer than line_max, an event's data never larger than
//  event_max, `in` never holds more than line_max + FEED_SLACK bytes.
//
//  Rates: runs once per upstream read (typically one or a few events, a few
//  hundred bytes each): two memchr per line, one memcpy per data line.
//  Failure mode: -1 from gw_sse_next (sticky) on a bound exceeded.

#include <czmq.h>
#include "gw_sse.h"

#define PREFIX "data: "
#define PREFIX_SIZE 6
#define FEED_SLACK                                                                       \
    (256 * 1024)  //  bytes fed beyond one line the caller may leave unpulled
#define SMALL_BUF 4096  //  buffers above this are released on reset
#define NAME_MAX_ 63

struct _gw_sse_t {
    size_t line_max;  //  longest line accepted, bytes
    size_t event_max;  //  largest event data accepted, bytes
    char *in;  //  bytes fed, not yet split into lines
    size_t in_size;  //  bytes used in `in`
    size_t in_cap;  //  bytes allocated for `in`
    size_t in_pos;  //  next byte of `in` to parse
    char *data;  //  PREFIX + data of the current event (+ room for "\n\n")
    size_t data_size;  //  bytes used in `data`, PREFIX included
    size_t data_cap;  //  bytes allocated for `data`
    size_t data_lines;  //  data lines in the current event
    bool skip_lf;  //  last line ended with CR: drop a following LF
    bool dispatched;  //  last next() returned an event: clear it first
    char name[NAME_MAX_ + 1];  //  event field of the current event
    int error;  //  0, or -1 once a bound was exceeded (sticky)
};

static void
s_reserve (char **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return;
    size_t size = *cap ? *cap : 256;
    while (size < need)
        size *= 2;
    char *grown = (char *)realloc (*buf, size);
    assert (grown);  //  bounded by line_max / event_max: OOM here is fatal
    *buf = grown;
    *cap = size;
}

gw_sse_t *
gw_sse_new (size_t line_max, size_t event_max)
{
    gw_sse_t *self = (gw_sse_t *)zmalloc (sizeof (gw_sse_t));
    assert (self);
    self->line_max = line_max < 64 ? 64 : line_max;
    self->event_max = event_max < 64 ? 64 : event_max;
    s_reserve (&self->data, &self->data_cap, 256);
    memcpy (self->data, PREFIX, PREFIX_SIZE);
    self->data_size = PREFIX_SIZE;
    return self;
}

void
gw_sse_destroy (gw_sse_t **self_p)
{
    assert (self_p);
    gw_sse_t *self = *self_p;
    if (self) {
        free (self->in);
        free (self->data);
        free (self);
        *self_p = NULL;
    }
}

void
gw_sse_reset (gw_sse_t *self)
{
    assert (self);
    if (self->in_cap > SMALL_BUF) {
        free (self->in);
        self->in = NULL;
        self->in_cap = 0;
    }
    if (self->data_cap > SMALL_BUF) {
        free (self->data);
        self->data = NULL;
        self->data_cap = 0;
        s_reserve (&self->data, &self->data_cap, 256);
        memcpy (self->data, PREFIX, PREFIX_SIZE);
    }
    self->in_size = self->in_pos = 0;
    self->data_size = PREFIX_SIZE;
    self->data_lines = 0;
    self->skip_lf = self->dispatched = false;
    self->name[0] = 0;
    self->error = 0;
}

int
gw_sse_feed (gw_sse_t *self, const void *data, size_t size)
{
    assert (self);
    if (self->in_pos > 0) {
        memmove (self->in, self->in + self->in_pos, self->in_size - self->in_pos);
        self->in_size -= self->in_pos;
        self->in_pos = 0;
    }
    if (size > self->line_max + FEED_SLACK - self->in_size)
        return -1;
    if (size == 0)
        return 0;
    s_reserve (&self->in, &self->in_cap, self->in_size + size);
    memcpy (self->in + self->in_size, data, size);
    self->in_size += size;
    return 0;
}

int
gw_sse_end (gw_sse_t *self)
{
    return gw_sse_feed (self, "\n\n", 2);
}

size_t
gw_sse_pending (gw_sse_t *self)
{
    assert (self);
    return self->in_size - self->in_pos;
}

//  Process one line (without its terminator). Returns 1 if it dispatched an
//  event, 0 if not, -1 if the event grew beyond event_max.
static int
s_line (gw_sse_t *self, const char *line, size_t size, gw_sse_event_t *event)
{
    if (size == 0) {
        if (self->data_lines == 0) {
            self->name[0] = 0;
            return 0;
        }
        s_reserve (&self->data, &self->data_cap, self->data_size + 2);
        event->data = self->data + PREFIX_SIZE;
        event->size = self->data_size - PREFIX_SIZE;
        event->name = self->name;
        if (self->data_lines == 1) {
            memcpy (self->data + self->data_size, "\n\n", 2);
            event->wire = self->data;
            event->wire_size = self->data_size + 2;
        }
        else {
            event->wire = NULL;
            event->wire_size = 0;
        }
        self->dispatched = true;
        return 1;
    }
    if (line[0] == ':')
        return 0;  //  comment (keep-alive)
    const char *colon = (const char *)memchr (line, ':', size);
    size_t field = colon ? (size_t)(colon - line) : size;
    const char *value = colon ? colon + 1 : line + size;
    size_t value_size = (size_t)(line + size - value);
    if (value_size > 0 && value[0] == ' ') {
        value++;
        value_size--;
    }
    if (field == 4 && memcmp (line, "data", 4) == 0) {
        size_t add = (self->data_lines ? 1 : 0) + value_size;
        if (self->data_size - PREFIX_SIZE + add > self->event_max)
            return -1;
        s_reserve (&self->data, &self->data_cap, self->data_size + add + 2);
        if (self->data_lines)
            self->data[self->data_size++] = '\n';
        memcpy (self->data + self->data_size, value, value_size);
        self->data_size += value_size;
        self->data_lines++;
    }
    else if (field == 5 && memcmp (line, "event", 5) == 0) {
        size_t n = value_size > NAME_MAX_ ? NAME_MAX_ : value_size;
        memcpy (self->name, value, n);
        self->name[n] = 0;
    }
    //  id, retry and unknown fields: ignored
    return 0;
}

int
gw_sse_next (gw_sse_t *self, gw_sse_event_t *event)
{
    assert (self);
    assert (event);
    if (self->error)
        return -1;
    if (self->dispatched) {
        self->data_size = PREFIX_SIZE;
        self->data_lines = 0;
        self->name[0] = 0;
        self->dispatched = false;
    }
    while (self->in_pos < self->in_size) {
        const char *p = self->in + self->in_pos;
        size_t n = self->in_size - self->in_pos;
        if (self->skip_lf) {
            self->skip_lf = false;
            if (p[0] == '\n') {
                self->in_pos++;
                continue;
            }
        }
        const char *lf = (const char *)memchr (p, '\n', n);
        size_t limit = lf ? (size_t)(lf - p) : n;
        const char *cr = (const char *)memchr (p, '\r', limit);
        const char *eol = cr ? cr : lf;
        if (!eol) {
            if (n > self->line_max)
                return self->error = -1;
            return 0;
        }
        size_t size = (size_t)(eol - p);
        if (size > self->line_max)
            return self->error = -1;
        size_t consumed = size + 1;
        if (*eol == '\r') {
            if (size + 1 < n) {
                if (p[size + 1] == '\n')
                    consumed++;
            }
            else
                self->skip_lf = true;
        }
        self->in_pos += consumed;
        int rc = s_line (self, p, size, event);
        if (rc < 0)
            return self->error = -1;
        if (rc > 0)
            return 1;
    }
    return 0;
}

//  --------------------------------------------------------------------------
//  Self test

//  Parse text fed in pieces of `step` bytes (0 = all at once, then end);
//  append each event as "<name>|<data>\x01" to out.
static int
s_parse_all (const char *text, size_t size, size_t step, char *out, size_t out_max)
{
    gw_sse_t *sse = gw_sse_new (1024, 1024);
    size_t pos = 0, out_size = 0;
    out[0] = 0;
    int rc = 0;
    while (pos < size || pos == 0) {
        size_t n = step && step < size - pos ? step : size - pos;
        assert (gw_sse_feed (sse, text + pos, n) == 0);
        pos += n;
        gw_sse_event_t event;
        while ((rc = gw_sse_next (sse, &event)) == 1) {
            int w = snprintf (out + out_size, out_max - out_size, "%s|%.*s\x01",
                event.name, (int)event.size, event.data);
            assert (w > 0 && (size_t)w < out_max - out_size);
            out_size += (size_t)w;
            if (event.wire) {
                assert (event.wire_size == event.size + 8);
                assert (memcmp (event.wire, "data: ", 6) == 0);
                assert (memcmp (event.wire + 6, event.data, event.size) == 0);
                assert (memcmp (event.wire + 6 + event.size, "\n\n", 2) == 0);
            }
            else
                assert (memchr (event.data, '\n', event.size));
        }
        if (rc < 0)
            break;
        if (size == 0)
            break;
    }
    if (rc >= 0) {
        gw_sse_end (sse);
        gw_sse_event_t event;
        while ((rc = gw_sse_next (sse, &event)) == 1) {
            int w = snprintf (out + out_size, out_max - out_size, "%s|%.*s\x01",
                event.name, (int)event.size, event.data);
            assert (w > 0 && (size_t)w < out_max - out_size);
            out_size += (size_t)w;
        }
    }
    gw_sse_destroy (&sse);
    return rc;
}

static void
s_expect (const char *text, const char *expected)
{
    char whole[4096], piece[4096];
    size_t size = strlen (text);
    assert (s_parse_all (text, size, 0, whole, sizeof (whole)) == 0);
    if (!streq (whole, expected)) {
        printf ("\ninput: %s\n got: %s\nwant: %s\n", text, whole, expected);
        assert (false);
    }
    //  Every split gives the same events.
    for (size_t step = 1; step <= size; step++) {
        assert (s_parse_all (text, size, step, piece, sizeof (piece)) == 0);
        if (!streq (piece, expected)) {
            printf ("\nstep %zu input: %s\n got: %s\nwant: %s\n", step, text, piece,
                expected);
            assert (false);
        }
    }
}

void
gw_sse_test (bool verbose)
{
    printf (" * gw_sse: ");

    s_expect ("data: {\"a\":1}\n\n", "|{\"a\":1}\x01");
    s_expect ("data: a\n\ndata: b\n\n", "|a\x01|b\x01");
    //  CRLF, CR alone, and CR at a split point followed by LF
    s_expect ("data: a\r\n\r\ndata: b\r\n\r\n", "|a\x01|b\x01");
    s_expect ("data: a\r\rdata: b\r\r", "|a\x01|b\x01");
    s_expect ("data: a\r\n\ndata: b\n\r\n", "|a\x01|b\x01");
    //  Multi-line data joins with LF
    s_expect ("data: {\"a\":\ndata: 1}\n\n", "|{\"a\":\n1}\x01");
    //  Comments and keep-alives, unknown fields, id, retry
    s_expect (": ping\n\n:x\ndata: x\nid: 7\nretry: 10\nfoo: bar\n\n", "|x\x01");
    //  Event names; a name without data dispatches nothing and is cleared
    s_expect (
        "event: error\ndata: {}\n\nevent: lost\n\ndata: y\n\n", "error|{}\x01|y\x01");
    //  "data:" without space, with two spaces; a field without a colon
    s_expect ("data:x\n\ndata:  y\n\ndata\n\n", "|x\x01| y\x01|\x01");
    //  [DONE], also at EOF without its blank line or line end
    s_expect ("data: [DONE]\n\n", "|[DONE]\x01");
    s_expect ("data: z\n\ndata: [DONE]", "|z\x01|[DONE]\x01");
    s_expect ("data: [DONE]\r", "|[DONE]\x01");
    //  Blank lines only
    s_expect ("\n\n\r\n\r\r", "");
    //  An OpenAI-like stream with usage
    s_expect ("data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n"
              "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2}}\n\n"
              "data: [DONE]\n\n",
        "|{\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\x01"
        "|{\"choices\":[],\"usage\":{\"prompt_tokens\":2}}\x01|[DONE]\x01");

    //  Bounds: a line longer than line_max, an event larger than event_max
    gw_sse_t *sse = gw_sse_new (64, 100);
    gw_sse_event_t event;
    char big[200];
    memset (big, 'x', sizeof (big));
    assert (gw_sse_feed (sse, "data: ", 6) == 0);
    assert (gw_sse_feed (sse, big, 100) == 0);
    assert (gw_sse_next (sse, &event) == -1);
    assert (gw_sse_next (sse, &event) == -1);  //  sticky
    gw_sse_reset (sse);
    assert (gw_sse_next (sse, &event) == 0);
    for (int i = 0; i < 3; i++) {
        assert (gw_sse_feed (sse, "data: ", 6) == 0);
        assert (gw_sse_feed (sse, big, 40) == 0);
        assert (gw_sse_feed (sse, "\n", 1) == 0);
    }
    assert (gw_sse_next (sse, &event) == -1);  //  3 x 40 + 2 > 100
    gw_sse_reset (sse);
    //  Feeding without pulling is bounded
    char *flood = (char *)zmalloc (300 * 1024);
    memset (flood, '\n', 300 * 1024);
    assert (gw_sse_feed (sse, flood, 300 * 1024) == -1);
    assert (gw_sse_feed (sse, flood, 1024) == 0);
    assert (gw_sse_next (sse, &event) == 0);
    assert (gw_sse_pending (sse) == 0);
    free (flood);
    //  Event data stays valid until the next call; reset after an event
    assert (gw_sse_feed (sse, "data: one\n\ndata: two\n\n", 22) == 0);
    assert (gw_sse_next (sse, &event) == 1 && event.size == 3);
    gw_sse_reset (sse);
    assert (gw_sse_next (sse, &event) == 0);
    assert (gw_sse_feed (sse, "data: 3\n\n", 9) == 0);
    assert (gw_sse_next (sse, &event) == 1 && event.size == 1 && event.data[0] == '3');
    gw_sse_destroy (&sse);
    assert (sse == NULL);

    //  Hostile bytes: random input never crashes and respects bounds.
    sse = gw_sse_new (128, 256);
    unsigned seed = 7;
    for (int round = 0; round < 2000; round++) {
        char junk[97];
        for (size_t i = 0; i < sizeof (junk); i++) {
            seed = seed * 1103515245 + 12345;
            const char alphabet[] = "data: \r\n:xevent";
            junk[i] = alphabet[(seed >> 16) % (sizeof (alphabet) - 1)];
        }
        if (gw_sse_feed (sse, junk, sizeof (junk)) == 0) {
            int rc;
            while ((rc = gw_sse_next (sse, &event)) == 1)
                assert (event.size <= 256);
            if (rc < 0)
                gw_sse_reset (sse);
        }
        else
            gw_sse_reset (sse);
    }
    gw_sse_destroy (&sse);
    printf ("OK\n");
}
