//  --------------------------------------------------------------------------
//  gw_usage — the usage event producer and its spool.
//
//  Design note. Exactly once = never lost (the producer resends until an
//  acknowledgement proves billing's COMMIT) + never twice (billing ignores
//  a rid it already has). This class does the first half.
//
//  Memory: rid -> event (body, back-off, the attempt it is in flight
//  with), GWP rid -> flight (the events of one attempt, in order), and the
//  ready list: events to send at the end of this turn. Each attempt is a
//  REQUEST with a fresh GWP rid (the broker keys requests by it); billing
//  keys events by the body's rid. An event is in exactly one place: ready,
//  in one flight, or waiting for its back-off (due).
//
//  Batches (STAGES.md §6.2, issue #6): gw_usage_submit only spools and
//  queues; gw_usage_run sends everything ready at once, as requests of at
//  most GW_USAGE_BATCH_MAX events / GW_USAGE_BATCH_BYTES ({events: […]},
//  the spooled bodies appended as they are), or in the single form when
//  one event is alone (an idle gateway sends what it always sent). The
//  answer {results: […]} ends or reschedules each event on its own; a
//  failed or timed-out request reschedules all of its events, which go out
//  in whatever request is next. A 400 to a whole batch (a billing that
//  predates batches) resends its events one per request and keeps to the
//  single form for SINGLE_MS. At most INFLIGHT_MAX requests are in flight;
//  (INFLIGHT_EVENTS_MAX events); the rest stay ready.
//
//  File: "<name>-<host>-<pid>-<random>.spool", append-only records after an
//  8-byte magic "GWSPOOL1":
//
//    'E' rid(16) size(4, big-endian) body(size)    an event
//    'A' rid(16)                                   its end (ack or drop)
//
//  A record is written with one write() before the event is sent (and
//  before an end is forgotten), so a producer killed at any instant leaves
//  a file whose complete records say which events are still owed; a torn
//  last record (the crash came mid-write) is ignored: that event was never
//  sent (sending follows the write), so nothing billed is lost with it, and
//  the crash also cost its request's FINAL. The file is compacted when it passes COMPACT_BYTES and
//  is mostly dead records: the live events are written to "<file>.tmp"
//  (locked), which is renamed over the file; with nothing live it is just
//  truncated to the magic.
//
//  Takeover: every producer holds an exclusive flock on its own file for
//  its whole life (the kernel drops it when the process dies, however it
//  dies). At start, a producer tries LOCK_NB on every other *.spool in the
//  folder; a file it can lock (and that is still linked) belongs to a dead
//  producer: its live events are appended to our file, then it is deleted.
//  A crash between the two leaves the events in both files: resent twice,
//  billed once. Stale "*.spool.tmp" files (a crash mid-compaction, the
//  original is intact) are deleted when lockable.
//
//  Rates: per event one write() (+ one fsync with the option), one hash
//  insert, one REQUEST; per ack one 17-byte write() and two hash deletes.
//  Resends scan the spool only when the earliest back-off is due.

#include "aigw.h"
#include "gw_usage.h"
#include "gw_usage_batch.h"
#include <dirent.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>

#define MAGIC "GWSPOOL1"
#define MAGIC_SIZE 8
#define INFLIGHT_MAX 512  //  requests in flight to billing at once
#define INFLIGHT_EVENTS_MAX 8192  //  events in those requests, at most
#define BATCH_BYTES (GW_USAGE_BATCH_BYTES - 64)  //  event bytes per request
#define SINGLE_MS 60000  //  single form only, after a batch was refused
#define COMPACT_BYTES (4 * 1024 * 1024)  //  compaction threshold, bytes
#define EVENT_BODY_MAX (64 * 1024)  //  largest event body kept
#define FILE_READ_MAX (1024LL * 1024 * 1024)  //  largest spool file read

typedef struct _s_flight_t s_flight_t;

typedef struct {
    uint8_t rid[16];  //  the event's rid (hash key points here)
    s_flight_t *flight;  //  the attempt it is in flight with, NULL = none
    bool queued;  //  in the ready list
    bool single;  //  send in the single form only (its batch was refused)
    zframe_t *body;  //  msgpack event body (owned)
    int64_t due;  //  mono ms of the next attempt
    int backoff;  //  ms to wait after the next failure
    uint32_t attempts;  //  attempts made
} s_event_t;

//  One attempt in flight: a REQUEST carrying count events.
struct _s_flight_t {
    uint8_t grid[16];  //  its GWP rid (hash key points here)
    bool batch;  //  sent as {events: […]} (else the single form)
    uint32_t count;  //  events
    s_event_t *events[];  //  count entries, in request order (borrowed)
};

struct _gw_usage_t {
    gw_client_t *client;  //  bus session
    char *service;  //  "billing"
    char *dir;  //  spool folder
    char *path;  //  our spool file
    int fd;  //  our spool file, flock'ed
    off_t size;  //  bytes in our file
    off_t live;  //  bytes of live 'E' records (approximate after takeover)
    size_t max;  //  events kept at most
    zhashx_t *events;  //  rid -> s_event_t (owned)
    zhashx_t *flights;  //  grid -> s_flight_t (owned)
    zlistx_t *ready;  //  s_event_t to send this turn (borrowed)
    int64_t single_until;  //  mono ms: single form only until then
    size_t inflight_events;  //  events in the requests in flight
    int64_t next_due;  //  mono ms of the earliest due event, INT64_MAX none
    int timeout;  //  per-attempt deadline, ms
    int backoff_min, backoff_max;  //  ms
    bool fsync;  //  fsync after every write
    uint64_t n_sent, n_acked, n_dropped, n_retries, n_recovered;
    uint64_t n_batches;  //  requests in the batch form
};

static void
s_event_free (void **item_p)
{
    s_event_t *event = (s_event_t *)*item_p;
    if (event) {
        zframe_destroy (&event->body);
        free (event);
        *item_p = NULL;
    }
}

static void
s_flight_free (void **item_p)
{
    free (*item_p);
    *item_p = NULL;
}

static void
s_put32 (uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t
s_get32 (const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

//  Write all of iov to fd. Returns 0 or -1.
static int
s_writev_all (int fd, struct iovec *iov, int count)
{
    while (count > 0) {
        ssize_t n = writev (fd, iov, count);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        while (count > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

//  Append one record to fd. body NULL: an 'A' record. Returns bytes or -1.
static ssize_t
s_record (int fd, const uint8_t rid[16], const void *body, size_t size)
{
    uint8_t head[21];
    head[0] = body ? 'E' : 'A';
    memcpy (head + 1, rid, 16);
    struct iovec iov[2];
    iov[0].iov_base = head;
    iov[0].iov_len = 17;
    int count = 1;
    if (body) {
        s_put32 (head + 17, (uint32_t)size);
        iov[0].iov_len = 21;
        iov[1].iov_base = (void *)body;
        iov[1].iov_len = size;
        count = 2;
    }
    size_t total = iov[0].iov_len + (body ? size : 0);
    return s_writev_all (fd, iov, count) ? -1 : (ssize_t)total;
}

//  Append to our file; on a write error the file may hold a torn record:
//  cut it back. Returns 0 or -1.
static int
s_append (gw_usage_t *self, const uint8_t rid[16], const void *body, size_t size)
{
    ssize_t n = s_record (self->fd, rid, body, size);
    if (n < 0) {
        gw_error ("usage: cannot write the spool %s: %s", self->path, strerror (errno));
        if (ftruncate (self->fd, self->size) == 0)
            lseek (self->fd, self->size, SEEK_SET);
        return -1;
    }
    self->size += n;
    if (body)
        self->live += n;
    if (self->fsync && fdatasync (self->fd))
        gw_error ("usage: fdatasync %s: %s", self->path, strerror (errno));
    return 0;
}

//  Read a whole spool file from fd into events (rid -> s_event_t, owned):
//  'E' adds, 'A' removes; stops at a torn or unknown record. Returns the
//  number of records read, or -1 if the file is not a spool.
static int
s_load (int fd, const char *path, zhashx_t *events)
{
    struct stat st;
    if (fstat (fd, &st) || st.st_size > FILE_READ_MAX)
        return -1;
    size_t size = (size_t)st.st_size;
    uint8_t *data = (uint8_t *)malloc (size ? size : 1);
    assert (data);
    size_t got = 0;
    while (got < size) {
        ssize_t n = pread (fd, data + got, size - got, (off_t)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    int records = -1;
    if (got >= MAGIC_SIZE && memcmp (data, MAGIC, MAGIC_SIZE) == 0) {
        records = 0;
        size_t at = MAGIC_SIZE;
        while (at + 17 <= got) {
            uint8_t type = data[at];
            const uint8_t *rid = data + at + 1;
            if (type == 'A') {
                zhashx_delete (events, rid);
                at += 17;
            }
            else if (type == 'E' && at + 21 <= got) {
                uint32_t length = s_get32 (data + at + 17);
                if (length > EVENT_BODY_MAX || at + 21 + length > got)
                    break;  //  torn
                if (!zhashx_lookup (events, rid)) {
                    s_event_t *event = (s_event_t *)zmalloc (sizeof (s_event_t));
                    assert (event);
                    memcpy (event->rid, rid, 16);
                    event->body = zframe_new (data + at + 21, length);
                    zhashx_insert (events, event->rid, event);
                }
                at += 21 + length;
            }
            else
                break;
            records++;
        }
        if (at < got)
            gw_warn ("usage: %s: %zu trailing bytes ignored (torn or unknown record)",
                path, got - at);
    }
    free (data);
    return records;
}

static void
s_schedule (gw_usage_t *self, s_event_t *event, int64_t due)
{
    event->due = due;
    if (due < self->next_due)
        self->next_due = due;
}

//  Queue event to be sent at the end of this turn.
static void
s_ready (gw_usage_t *self, s_event_t *event)
{
    if (!event->queued) {
        zlistx_add_end (self->ready, event);
        event->queued = true;
    }
}

//  Keep event (taking it over from a file or a submit): write it to our
//  file and put it in the map, ready to send. Returns 0 or -1 (not kept).
static int
s_keep (gw_usage_t *self, s_event_t *event)
{
    if (s_append (self, event->rid, zframe_data (event->body), zframe_size (event->body)))
        return -1;
    event->backoff = self->backoff_min;
    zhashx_insert (self->events, event->rid, event);
    s_ready (self, event);
    return 0;
}

//  Take over the spool files of dead producers in our folder.
static void
s_takeover (gw_usage_t *self)
{
    DIR *dir = opendir (self->dir);
    if (!dir)
        return;
    struct dirent *entry;
    while ((entry = readdir (dir))) {
        const char *name = entry->d_name;
        size_t len = strlen (name);
        bool spool = len > 6 && streq (name + len - 6, ".spool");
        bool tmp = len > 10 && streq (name + len - 10, ".spool.tmp");
        if (!spool && !tmp)
            continue;
        char path[PATH_MAX];
        snprintf (path, sizeof (path), "%s/%s", self->dir, name);
        if (streq (path, self->path))
            continue;
        int fd = open (path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        struct stat st;
        if (flock (fd, LOCK_EX | LOCK_NB) || fstat (fd, &st) || st.st_nlink == 0) {
            close (fd);  //  alive (locked), or already taken over
            continue;
        }
        if (tmp) {
            unlink (path);  //  a compaction that died: the original is intact
            close (fd);
            continue;
        }
        zhashx_t *found = gw_rid_map_new (s_event_free);
        int records = s_load (fd, path, found);
        size_t kept = 0, failed = 0;
        s_event_t *event = (s_event_t *)zhashx_first (found);
        while (event) {
            if (!zhashx_lookup (self->events, event->rid)) {
                s_event_t *copy = (s_event_t *)zmalloc (sizeof (s_event_t));
                assert (copy);
                memcpy (copy->rid, event->rid, 16);
                copy->body = zframe_dup (event->body);
                if (s_keep (self, copy) == 0)
                    kept++;
                else {
                    s_event_free ((void **)&copy);
                    failed++;
                }
            }
            event = (s_event_t *)zhashx_next (found);
        }
        zhashx_destroy (&found);
        if (records < 0)
            gw_warn ("usage: %s is not a spool file; left alone", path);
        else if (failed)
            gw_error (
                "usage: %s: %zu events could not be copied; file kept", path, failed);
        else {
            if (kept && fdatasync (self->fd))
                gw_error ("usage: fdatasync %s: %s", self->path, strerror (errno));
            unlink (path);
            self->n_recovered += kept;
            gw_info ("usage: took over %zu unacknowledged events from %s", kept, path);
        }
        close (fd);
    }
    closedir (dir);
}

//  Open (create) our file with the magic, locked. Returns fd or -1.
static int
s_create (const char *path)
{
    int fd = open (path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    if (flock (fd, LOCK_EX | LOCK_NB) || write (fd, MAGIC, MAGIC_SIZE) != MAGIC_SIZE) {
        close (fd);
        unlink (path);
        return -1;
    }
    return fd;
}

static int
s_mkdirs (const char *dir)
{
    char path[PATH_MAX];
    snprintf (path, sizeof (path), "%s", dir);
    for (char *p = path + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            mkdir (path, 0755);
            *p = '/';
        }
    return mkdir (path, 0755) == 0 || errno == EEXIST ? 0 : -1;
}

gw_usage_t *
gw_usage_new (const char *endpoint, const char *service, const char *dir,
    const char *name, size_t max)
{
    assert (service && dir && name);
    if (!gw_msg_service_valid (service, strlen (service)) || max == 0)
        return NULL;
    if (s_mkdirs (dir)) {
        gw_error ("usage: cannot create the spool folder %s: %s", dir, strerror (errno));
        return NULL;
    }
    gw_usage_t *self = (gw_usage_t *)zmalloc (sizeof (gw_usage_t));
    assert (self);
    self->fd = -1;
    self->service = strdup (service);
    self->dir = strdup (dir);
    self->max = max;
    self->timeout = 5000;
    self->backoff_min = 100;
    self->backoff_max = 5000;
    self->next_due = INT64_MAX;
    self->events = gw_rid_map_new (s_event_free);
    self->flights = gw_rid_map_new (s_flight_free);
    self->ready = zlistx_new ();
    assert (self->ready);
    char host[64] = "host";
    gethostname (host, sizeof (host) - 1);
    host[sizeof (host) - 1] = 0;
    for (char *p = host; *p; p++)
        if (!isalnum ((unsigned char)*p) && *p != '.' && *p != '_')
            *p = '_';
    uint8_t random[16];
    gw_rid_new (random);
    char path[PATH_MAX];
    snprintf (path, sizeof (path), "%s/%s-%s-%d-%02x%02x%02x%02x.spool", dir, name, host,
        (int)getpid (), random[0], random[1], random[2], random[3]);
    self->path = strdup (path);
    self->fd = s_create (self->path);
    if (self->fd < 0) {
        gw_error ("usage: cannot create the spool %s: %s", self->path, strerror (errno));
        gw_usage_destroy (&self);
        return NULL;
    }
    self->size = MAGIC_SIZE;
    self->client = endpoint ? gw_client_new (endpoint) : NULL;
    if (!self->client) {
        gw_usage_destroy (&self);
        return NULL;
    }
    s_takeover (self);
    return self;
}

void
gw_usage_destroy (gw_usage_t **self_p)
{
    assert (self_p);
    gw_usage_t *self = *self_p;
    if (!self)
        return;
    gw_client_destroy (&self->client);
    if (self->fd >= 0) {
        if (zhashx_size (self->events) == 0)
            unlink (self->path);
        else
            gw_warn ("usage: %zu unacknowledged events left in %s for the next producer",
                zhashx_size (self->events), self->path);
        close (self->fd);
    }
    zhashx_destroy (&self->flights);
    zlistx_destroy (&self->ready);
    zhashx_destroy (&self->events);
    free (self->service);
    free (self->dir);
    free (self->path);
    free (self);
    *self_p = NULL;
}

void
gw_usage_set_timeout (gw_usage_t *self, int timeout_ms)
{
    assert (self);
    if (timeout_ms > 0)
        self->timeout = timeout_ms;
}

void
gw_usage_set_backoff (gw_usage_t *self, int min_ms, int max_ms)
{
    assert (self);
    if (min_ms > 0 && max_ms >= min_ms) {
        self->backoff_min = min_ms;
        self->backoff_max = max_ms;
    }
}

void
gw_usage_set_fsync (gw_usage_t *self, bool fsync)
{
    assert (self);
    self->fsync = fsync;
}

void
gw_usage_set_heartbeat (gw_usage_t *self, int heartbeat_ms, int expiry_ms)
{
    assert (self);
    gw_client_set_heartbeat (self->client, heartbeat_ms, expiry_ms);
}

//  The attempt of event failed or is unknown: try again after its back-off.
static void
s_retry (gw_usage_t *self, s_event_t *event, int64_t now)
{
    s_schedule (self, event, now + event->backoff);
    if (event->backoff < self->backoff_max)
        event->backoff = event->backoff * 2 > self->backoff_max ? self->backoff_max
                                                                : event->backoff * 2;
}

//  Send one attempt of count events (taken off the ready list): the single
//  form for one, else a batch. On a refused send, every one backs off.
static void
s_send (gw_usage_t *self, s_event_t **events, uint32_t count)
{
    assert (count > 0);
    int64_t now = gw_mono_ms ();
    s_flight_t *flight =
        (s_flight_t *)zmalloc (sizeof (s_flight_t) + count * sizeof (s_event_t *));
    assert (flight);
    gw_rid_new (flight->grid);
    flight->batch = count > 1;
    flight->count = count;
    zframe_t *body = NULL;
    if (count == 1)
        body = zframe_dup (events[0]->body);
    else {
        msgpack_sbuffer buffer;
        msgpack_sbuffer_init (&buffer);
        msgpack_packer packer;
        msgpack_packer_init (&packer, &buffer, msgpack_sbuffer_write);
        gw_usage_batch_pack_head (&packer, count);
        for (uint32_t i = 0; i < count; i++)
            msgpack_sbuffer_write (&buffer, (const char *)zframe_data (events[i]->body),
                zframe_size (events[i]->body));
        body = zframe_new (buffer.data, buffer.size);
        msgpack_sbuffer_destroy (&buffer);
    }
    gw_msg_t *msg = gw_msg_new (GW_MSG_REQUEST);
    gw_msg_set_rid (msg, flight->grid);
    gw_msg_set_service (msg, self->service);
    gw_msg_set_deadline (msg, (uint64_t)(gw_time_ms () + self->timeout));
    gw_msg_set_body (msg, &body);
    for (uint32_t i = 0; i < count; i++) {
        s_event_t *event = events[i];
        flight->events[i] = event;
        event->attempts++;
        if (event->attempts > 1)
            self->n_retries++;
    }
    if (gw_client_send (self->client, &msg) == 0) {
        for (uint32_t i = 0; i < count; i++)
            events[i]->flight = flight;
        zhashx_insert (self->flights, flight->grid, flight);
        self->inflight_events += count;
        self->n_sent += count;
        self->n_batches += flight->batch;
        return;
    }
    for (uint32_t i = 0; i < count; i++)
        s_retry (self, events[i], now);
    free (flight);
}

//  True while another request (of count events so far) may leave.
static bool
s_room (gw_usage_t *self, uint32_t count)
{
    return zhashx_size (self->flights) + (count > 0) < INFLIGHT_MAX &&
        self->inflight_events + count < INFLIGHT_EVENTS_MAX;
}

//  Send every ready event, in as few requests as the caps allow, while
//  fewer than INFLIGHT_MAX requests (INFLIGHT_EVENTS_MAX events) are in
//  flight.
static void
s_send_ready (gw_usage_t *self)
{
    s_event_t *group[GW_USAGE_BATCH_MAX];
    uint32_t count = 0;
    size_t bytes = 0;
    bool single = gw_mono_ms () < self->single_until;
    while (zlistx_size (self->ready) && s_room (self, count)) {
        s_event_t *event = (s_event_t *)zlistx_first (self->ready);
        size_t size = zframe_size (event->body);
        if (count && bytes + size > BATCH_BYTES) {
            s_send (self, group, count);  //  full: send it, then go on
            count = 0;
            bytes = 0;
            continue;
        }
        zlistx_detach_cur (self->ready);
        event->queued = false;
        if (single || event->single) {
            s_send (self, &event, 1);
            continue;
        }
        group[count++] = event;
        bytes += size;
        if (count == GW_USAGE_BATCH_MAX) {
            s_send (self, group, count);
            count = 0;
            bytes = 0;
        }
    }
    if (count)
        s_send (self, group, count);
}

//  The event ended (ack or drop): note it in the file, forget it.
static void
s_end (gw_usage_t *self, s_event_t *event)
{
    zframe_t *body = event->body;
    off_t bytes = 21 + (off_t)zframe_size (body);
    //  If the end cannot be written, the event is resent after a takeover:
    //  a duplicate, which billing ignores. Nothing is lost either way.
    s_append (self, event->rid, NULL, 0);
    self->live -= bytes;
    if (self->live < 0)
        self->live = 0;
    zhashx_delete (self->events, event->rid);
}

//  Rewrite our file with only the live events (or truncate it).
static void
s_compact (gw_usage_t *self)
{
    if (zhashx_size (self->events) == 0) {
        if (ftruncate (self->fd, MAGIC_SIZE) == 0 &&
            lseek (self->fd, MAGIC_SIZE, SEEK_SET) == MAGIC_SIZE) {
            self->size = MAGIC_SIZE;
            self->live = 0;
        }
        return;
    }
    char tmp[PATH_MAX];
    snprintf (tmp, sizeof (tmp), "%s.tmp", self->path);
    unlink (tmp);
    int fd = s_create (tmp);
    if (fd < 0) {
        gw_error ("usage: cannot compact %s: %s", self->path, strerror (errno));
        return;
    }
    off_t size = MAGIC_SIZE;
    s_event_t *event = (s_event_t *)zhashx_first (self->events);
    while (event) {
        ssize_t n = s_record (
            fd, event->rid, zframe_data (event->body), zframe_size (event->body));
        if (n < 0)
            break;
        size += n;
        event = (s_event_t *)zhashx_next (self->events);
    }
    if (event || (self->fsync && fdatasync (fd)) || rename (tmp, self->path)) {
        gw_error ("usage: cannot compact %s: %s", self->path, strerror (errno));
        close (fd);
        unlink (tmp);
        return;
    }
    close (self->fd);
    self->fd = fd;
    self->size = size;
    self->live = size - MAGIC_SIZE;
}

int
gw_usage_submit (gw_usage_t *self, const uint8_t rid[16], const void *body, size_t size)
{
    assert (self);
    if (zhashx_size (self->events) >= self->max || size > EVENT_BODY_MAX)
        return -1;
    if (zhashx_lookup (self->events, rid))
        return 0;  //  already owed
    s_event_t *event = (s_event_t *)zmalloc (sizeof (s_event_t));
    assert (event);
    memcpy (event->rid, rid, 16);
    event->body = zframe_new (body, size);
    if (s_keep (self, event)) {
        s_event_free ((void **)&event);
        return -1;
    }
    return 0;  //  sent by gw_usage_run, with whatever else is ready
}

bool
gw_usage_full (gw_usage_t *self)
{
    assert (self);
    return zhashx_size (self->events) >= self->max;
}

size_t
gw_usage_pending (gw_usage_t *self)
{
    assert (self);
    return zhashx_size (self->events);
}

zsock_t *
gw_usage_socket (gw_usage_t *self)
{
    assert (self);
    return gw_client_socket (self->client);
}

const char *
gw_usage_path (gw_usage_t *self)
{
    assert (self);
    return self->path;
}

//  One event's outcome: 200 ends it (acknowledged), 400 ends it (refused
//  for good, logged), anything else resends it after its back-off.
static void
s_outcome (gw_usage_t *self, s_event_t *event, uint16_t status, int64_t now)
{
    event->flight = NULL;
    if (status == 200) {
        self->n_acked++;
        s_end (self, event);
    }
    else if (status == 400) {
        char hex[33];
        gw_rid_hex (event->rid, hex);
        gw_error ("usage: billing refused event %s for good (400); dropped", hex);
        self->n_dropped++;
        s_end (self, event);
    }
    else {
        if (event->attempts == 1 || status != 503)
            gw_debug ("usage: billing answered %u; resending later", status);
        s_retry (self, event, now);
    }
}

//  The FINAL of a flight: apply it to each of its events.
static void
s_answer (gw_usage_t *self, s_flight_t *flight, gw_msg_t *msg, int64_t now)
{
    uint16_t status = gw_msg_status (msg);
    if (!flight->batch) {
        s_outcome (self, flight->events[0], status, now);
        return;
    }
    if (status == 400) {
        //  The container was refused: a billing that predates batches.
        //  Nothing was recorded; resend each event alone.
        gw_warn ("usage: billing refused a batch of %u events (400); sending events "
                 "one per request for %d s",
            flight->count, SINGLE_MS / 1000);
        self->single_until = now + SINGLE_MS;
        for (uint32_t i = 0; i < flight->count; i++) {
            s_event_t *event = flight->events[i];
            event->flight = NULL;
            event->single = true;
            s_ready (self, event);
        }
        return;
    }
    uint16_t results[GW_USAGE_BATCH_MAX];
    zframe_t *body = gw_msg_body (msg);
    if (status == 200 &&
        gw_usage_batch_results (body ? zframe_data (body) : NULL,
            body ? zframe_size (body) : 0, results, NULL, flight->count)) {
        gw_error ("usage: unreadable answer to a batch of %u events; resending them",
            flight->count);
        status = 502;
    }
    for (uint32_t i = 0; i < flight->count; i++)
        s_outcome (self, flight->events[i], status == 200 ? results[i] : status, now);
}

void
gw_usage_run (gw_usage_t *self)
{
    assert (self);
    gw_client_tick (self->client);
    gw_msg_t *msg;
    int64_t now = gw_mono_ms ();
    while ((msg = gw_client_recv (self->client))) {
        if (gw_msg_id (msg) != GW_MSG_FINAL) {
            gw_msg_destroy (&msg);
            continue;
        }
        s_flight_t *flight =
            (s_flight_t *)zhashx_lookup (self->flights, gw_msg_rid (msg));
        if (flight) {
            s_answer (self, flight, msg, now);
            self->inflight_events -= flight->count;
            zhashx_delete (self->flights, flight->grid);
        }
        gw_msg_destroy (&msg);
    }
    if (now >= self->next_due) {
        self->next_due = INT64_MAX;
        s_event_t *event = (s_event_t *)zhashx_first (self->events);
        while (event) {
            if (!event->flight && !event->queued) {
                if (event->due <= now)
                    s_ready (self, event);
                else if (event->due < self->next_due)
                    self->next_due = event->due;
            }
            event = (s_event_t *)zhashx_next (self->events);
        }
    }
    s_send_ready (self);
    if (self->size > COMPACT_BYTES && self->live < self->size / 4)
        s_compact (self);
    else if (zhashx_size (self->events) == 0 && self->size > 64 * 1024)
        s_compact (self);
}

int
gw_usage_timeout (gw_usage_t *self)
{
    assert (self);
    int64_t timeout = gw_client_timeout (self->client);
    if (zlistx_size (self->ready) && s_room (self, 0))
        return 0;
    if (self->next_due != INT64_MAX) {
        int64_t left = self->next_due - gw_mono_ms ();
        if (left < timeout)
            timeout = left;
    }
    return timeout < 0 ? 0 : (int)timeout;
}

void
gw_usage_stats (gw_usage_t *self, char *out, size_t out_max)
{
    assert (self);
    snprintf (out, out_max,
        "pending=%zu inflight=%zu sent=%" PRIu64 " acked=%" PRIu64 " dropped=%" PRIu64
        " retries=%" PRIu64 " recovered=%" PRIu64 " batches=%" PRIu64,
        zhashx_size (self->events), zhashx_size (self->flights), self->n_sent,
        self->n_acked, self->n_dropped, self->n_retries, self->n_recovered,
        self->n_batches);
}

//  --------------------------------------------------------------------------
//  The event body

void
gw_usage_event_pack (msgpack_sbuffer *out, const uint8_t rid[16], gw_envelope_t *env,
    const char *channel, uint64_t prompt_tokens, uint64_t completion_tokens,
    uint64_t cached_tokens, bool estimated, uint16_t status)
{
    const char *key = gw_envelope_tenant_str (env, "key");
    const char *user = gw_envelope_tenant_str (env, "user");
    const char *group = gw_envelope_tenant_str (env, "group");
    const char *model = gw_envelope_model (env);
    if (!user || !*user)
        user = key && *key ? key : "anonymous";
    //  ann.rl: hold, est_tokens, lease, scopes (kept raw).
    uint64_t hold = 0, est_tokens = 0;
    bool lease = false, have_est = false, have_lease = false;
    const uint8_t *scopes = NULL;
    size_t scopes_size = 0;
    size_t size = 0;
    const void *raw = gw_envelope_ann_raw (env, "rl", &size);
    if (raw) {
        gw_mreader_t reader;
        gw_mvalue_t map, name, value;
        gw_mreader_init (&reader, raw, size);
        if (gw_mreader_next (&reader, &map) == 0 && map.type == GW_MP_MAP) {
            for (uint32_t i = 0; i < map.v.count; i++) {
                if (gw_mreader_next (&reader, &name))
                    break;
                const uint8_t *at = reader.pos;
                if (gw_mreader_next (&reader, &value))
                    break;
                if (value.type == GW_MP_ARRAY || value.type == GW_MP_MAP) {
                    reader.pos = at;
                    if (gw_mreader_skip (&reader, GW_ENVELOPE_DEPTH_MAX))
                        break;
                    if (value.type == GW_MP_ARRAY && name.type == GW_MP_STR &&
                        gw_mvalue_streq (&name, "scopes")) {
                        scopes = at;
                        scopes_size = (size_t)(reader.pos - at);
                    }
                    continue;
                }
                if (name.type != GW_MP_STR)
                    continue;
                if (value.type == GW_MP_UINT && gw_mvalue_streq (&name, "hold"))
                    hold = value.v.u;
                else if (value.type == GW_MP_UINT &&
                    gw_mvalue_streq (&name, "est_tokens"))
                    est_tokens = value.v.u, have_est = true;
                else if (value.type == GW_MP_BOOL && gw_mvalue_streq (&name, "lease"))
                    lease = value.v.b, have_lease = true;
            }
        }
    }
    msgpack_packer pk;
    msgpack_packer_init (&pk, out, msgpack_sbuffer_write);
    uint32_t pairs = 10 + (key != NULL) + (group != NULL) + (channel != NULL) +
        (scopes != NULL) + have_est + have_lease;
    msgpack_pack_map (&pk, pairs);
    gw_mpack_str (&pk, "rid");
    msgpack_pack_bin (&pk, 16);
    msgpack_pack_bin_body (&pk, rid, 16);
    gw_mpack_str (&pk, "ts");
    msgpack_pack_uint64 (&pk, (uint64_t)gw_time_ms ());
    if (key) {
        gw_mpack_str (&pk, "key");
        gw_mpack_str (&pk, key);
    }
    gw_mpack_str (&pk, "user");
    gw_mpack_str (&pk, user);
    if (group) {
        gw_mpack_str (&pk, "group");
        gw_mpack_str (&pk, group);
    }
    gw_mpack_str (&pk, "model");
    gw_mpack_str (&pk, model && *model ? model : "unknown");
    if (channel) {
        gw_mpack_str (&pk, "channel");
        gw_mpack_str (&pk, channel);
    }
    gw_mpack_str (&pk, "prompt_tokens");
    msgpack_pack_uint64 (&pk, prompt_tokens);
    gw_mpack_str (&pk, "completion_tokens");
    msgpack_pack_uint64 (&pk, completion_tokens);
    gw_mpack_str (&pk, "cached_tokens");
    msgpack_pack_uint64 (
        &pk, cached_tokens > prompt_tokens ? prompt_tokens : cached_tokens);
    gw_mpack_str (&pk, "estimated");
    if (estimated)
        msgpack_pack_true (&pk);
    else
        msgpack_pack_false (&pk);
    gw_mpack_str (&pk, "status");
    msgpack_pack_uint16 (&pk, status);
    gw_mpack_str (&pk, "hold");
    msgpack_pack_uint64 (&pk, hold);
    if (scopes) {
        gw_mpack_str (&pk, "scopes");
        msgpack_sbuffer_write (out, (const char *)scopes, scopes_size);
    }
    if (have_est) {
        gw_mpack_str (&pk, "est_tokens");
        msgpack_pack_uint64 (&pk, est_tokens);
    }
    if (have_lease) {
        gw_mpack_str (&pk, "lease");
        if (lease)
            msgpack_pack_true (&pk);
        else
            msgpack_pack_false (&pk);
    }
}

//  --------------------------------------------------------------------------
//  Self test: broker + a fake billing worker that refuses, ignores or
//  acknowledges on command.

#include "gw_broker.h"

//  Fake billing: answers each REQUEST with the status in mode (0 = no
//  answer at all), records acknowledged rids (body "rid") in a set. Takes
//  both forms: a batch (with mode 200) is answered with one result per
//  event, 400 for the rids in refuse; old answers every batch 400, as a
//  billing that predates batches.
typedef struct {
    gw_worker_t *worker;
    int mode;  //  status to answer, 0 = never answer
    zhashx_t *acked;  //  body rids acknowledged, hex (values unused)
    zhashx_t *refuse;  //  body rids refused 400, hex (values unused)
    size_t requests;  //  REQUESTs seen
    size_t batches;  //  of which in the batch form
    size_t largest;  //  events in the largest batch
    bool old;  //  refuse batches as a whole (400)
} s_fake_t;

//  The rid of one event; answers 400 or acknowledges it.
static uint16_t
s_fake_event (s_fake_t *fake, const uint8_t *data, size_t size)
{
    gw_mreader_t reader;
    gw_mvalue_t value;
    gw_mreader_init (&reader, data, size);
    bool found = gw_mreader_find (&reader, "rid") == 0 &&
        gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_BIN &&
        value.size == 16;
    assert (found);
    char hex[33];
    gw_rid_hex ((const uint8_t *)value.ptr, hex);
    if (zhashx_lookup (fake->refuse, hex))
        return 400;
    zhashx_insert (fake->acked, hex, (void *)"x");
    return 200;
}

static void
s_fake_drain (s_fake_t *fake, int ms)
{
    int64_t end = gw_mono_ms () + ms;
    while (gw_mono_ms () < end) {
        gw_msg_t *msg = gw_worker_wait (fake->worker, 5);
        if (!msg || gw_msg_id (msg) != GW_MSG_REQUEST) {
            gw_msg_destroy (&msg);
            continue;
        }
        fake->requests++;
        zframe_t *body = gw_msg_body (msg);
        gw_usage_item_t items[GW_USAGE_BATCH_MAX];
        int count = gw_usage_batch_decode (
            zframe_data (body), zframe_size (body), items, GW_USAGE_BATCH_MAX, NULL);
        assert (count >= 0);
        if (count > 0) {
            fake->batches++;
            if ((size_t)count > fake->largest)
                fake->largest = (size_t)count;
        }
        if (fake->mode == 200 && count > 0 && !fake->old) {
            msgpack_sbuffer sbuf;
            msgpack_sbuffer_init (&sbuf);
            msgpack_packer pk;
            msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
            gw_usage_batch_pack_results (&pk, (uint32_t)count);
            for (int i = 0; i < count; i++)
                if (s_fake_event (fake, items[i].data, items[i].size) == 200)
                    gw_usage_batch_pack_ok (&pk, 1, false);
                else
                    gw_usage_batch_pack_error (&pk, 400, "refused");
            zframe_t *answer = zframe_new (sbuf.data, sbuf.size);
            msgpack_sbuffer_destroy (&sbuf);
            gw_worker_final (fake->worker, gw_msg_rid (msg), 200, NULL, &answer);
        }
        else if (fake->mode == 200 && count > 0)
            gw_worker_error (fake->worker, gw_msg_rid (msg), 400, NULL, NULL, "no rid");
        else if (fake->mode == 200) {
            uint16_t status = s_fake_event (fake, zframe_data (body), zframe_size (body));
            if (status == 200)
                gw_worker_final (fake->worker, gw_msg_rid (msg), 200, NULL, NULL);
            else
                gw_worker_error (
                    fake->worker, gw_msg_rid (msg), status, NULL, NULL, "no");
        }
        else if (fake->mode)
            gw_worker_error (
                fake->worker, gw_msg_rid (msg), (uint16_t)fake->mode, NULL, NULL, "no");
        gw_msg_destroy (&msg);
    }
}

//  Run the producer and the fake for ms.
static void
s_pump (gw_usage_t *usage, s_fake_t *fake, int ms)
{
    int64_t end = gw_mono_ms () + ms;
    while (gw_mono_ms () < end) {
        gw_usage_run (usage);
        s_fake_drain (fake, 5);
    }
}

static void
s_submit (gw_usage_t *usage, uint8_t rid[16], const char *model)
{
    gw_rid_new (rid);
    gw_envelope_t *env = gw_envelope_new ();
    gw_envelope_set_model (env, model);
    gw_envelope_set_tenant_str (env, "key", "k1");
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    gw_usage_event_pack (&sbuf, rid, env, "ch", 3, 5, 0, false, 200);
    assert (gw_usage_submit (usage, rid, sbuf.data, sbuf.size) == 0);
    msgpack_sbuffer_destroy (&sbuf);
    gw_envelope_destroy (&env);
}

void
gw_usage_test (bool verbose)
{
    printf (" * gw_usage: ");
    char dir[96];
    snprintf (dir, sizeof (dir), "/tmp/aigw-usage-test-%d", (int)getpid ());

    //  The event body: STAGES.md §6.2 from the envelope and ann.rl.
    gw_envelope_t *env = gw_envelope_new ();
    gw_envelope_set_model (env, "gpt-x");
    gw_envelope_set_tenant_str (env, "key", "ab12cd34");
    gw_envelope_set_tenant_str (env, "group", "g1");
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    msgpack_pack_map (&pk, 4);
    gw_mpack_str (&pk, "hold");
    msgpack_pack_uint64 (&pk, 309);
    gw_mpack_str (&pk, "est_tokens");
    msgpack_pack_uint64 (&pk, 106);
    gw_mpack_str (&pk, "lease");
    msgpack_pack_true (&pk);
    gw_mpack_str (&pk, "scopes");
    msgpack_pack_array (&pk, 2);
    gw_mpack_str (&pk, "key:ab12cd34");
    gw_mpack_str (&pk, "user:ab12cd34");
    gw_envelope_set_ann_raw (env, "rl", sbuf.data, sbuf.size);
    msgpack_sbuffer_clear (&sbuf);
    uint8_t rid[16];
    gw_rid_new (rid);
    gw_usage_event_pack (&sbuf, rid, env, "chan", 10, 7, 20, true, 499);
    //  JSON has no bin: check the rid, then render the rest without it.
    gw_mreader_t reader;
    gw_mvalue_t value;
    gw_mreader_init (&reader, sbuf.data, sbuf.size);
    assert (
        gw_mreader_find (&reader, "rid") == 0 && gw_mreader_next (&reader, &value) == 0);
    assert (
        value.type == GW_MP_BIN && value.size == 16 && memcmp (value.ptr, rid, 16) == 0);
    gw_mreader_init (&reader, sbuf.data, sbuf.size);
    assert (gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_MAP);
    size_t head_size = (size_t)(reader.pos - (const uint8_t *)sbuf.data);
    assert (memcmp (reader.pos, "\xa3rid\xc4\x10", 6) == 0);  //  the first pair
    size_t rest = head_size + 6 + 16;
    msgpack_sbuffer json;
    msgpack_sbuffer_init (&json);
    msgpack_sbuffer copy;
    msgpack_sbuffer_init (&copy);
    msgpack_packer cpk;
    msgpack_packer_init (&cpk, &copy, msgpack_sbuffer_write);
    msgpack_pack_map (&cpk, value.v.count - 1);
    msgpack_sbuffer_write (&copy, sbuf.data + rest, sbuf.size - rest);
    assert (gw_json_from_msgpack (copy.data, copy.size, &json, 8, NULL) == 0);
    msgpack_sbuffer_destroy (&copy);
    msgpack_sbuffer_write (&json, "", 1);
    if (verbose)
        printf ("\n   event: %s\n", json.data);
    assert (strstr (json.data, "\"user\":\"ab12cd34\""));  //  key stands in
    assert (strstr (json.data, "\"group\":\"g1\""));
    assert (strstr (json.data, "\"model\":\"gpt-x\""));
    assert (strstr (json.data, "\"channel\":\"chan\""));
    assert (strstr (json.data, "\"cached_tokens\":10"));  //  clamped to prompt
    assert (strstr (json.data, "\"estimated\":true"));
    assert (strstr (json.data, "\"status\":499"));
    assert (strstr (json.data, "\"hold\":309"));
    assert (strstr (json.data, "\"scopes\":[\"key:ab12cd34\",\"user:ab12cd34\"]"));
    assert (strstr (json.data, "\"est_tokens\":106"));
    assert (strstr (json.data, "\"lease\":true"));
    msgpack_sbuffer_destroy (&json);
    msgpack_sbuffer_destroy (&sbuf);
    gw_envelope_destroy (&env);

    zactor_t *broker = zactor_new (gw_broker_actor, NULL);
    assert (broker);
    zstr_sendx (broker, "BIND", "tcp://127.0.0.1:*", NULL);
    char *endpoint = zstr_recv (broker);
    assert (endpoint && *endpoint);
    s_fake_t fake = {0};
    fake.worker = gw_worker_new (endpoint, "billing-test", 64, GW_READY_IDEMPOTENT);
    fake.acked = zhashx_new ();
    fake.refuse = zhashx_new ();
    fake.mode = 503;

    //  1. Refused (503) then unanswered (deadline): kept and resent with
    //  back-off; acknowledged once billing answers 200, then forgotten.
    gw_usage_t *usage = gw_usage_new (endpoint, "billing-test", dir, "test", 3);
    assert (usage);
    gw_usage_set_backoff (usage, 20, 80);
    gw_usage_set_timeout (usage, 150);
    uint8_t r1[16], r2[16], r3[16];
    s_submit (usage, r1, "m");
    s_pump (usage, &fake, 300);
    assert (fake.requests >= 3);  //  first try + resends
    assert (gw_usage_pending (usage) == 1);
    fake.mode = 0;  //  silent: the attempt's deadline passes
    size_t before = fake.requests;
    s_pump (usage, &fake, 500);
    assert (fake.requests > before);
    assert (gw_usage_pending (usage) == 1);
    fake.mode = 200;
    s_pump (usage, &fake, 400);
    assert (gw_usage_pending (usage) == 0);
    char hex[33];
    gw_rid_hex (r1, hex);
    assert (zhashx_lookup (fake.acked, hex));
    //  2. 400 is dropped (logged), not resent.
    fake.mode = 400;
    s_submit (usage, r2, "m");
    before = fake.requests;
    s_pump (usage, &fake, 200);
    assert (gw_usage_pending (usage) == 0);
    assert (fake.requests == before + 1);
    //  3. Backpressure: max events kept, the next submit is refused.
    fake.mode = 0;
    s_submit (usage, r1, "m");
    s_submit (usage, r2, "m");
    s_submit (usage, r3, "m");
    assert (gw_usage_full (usage));
    msgpack_sbuffer_init (&sbuf);
    msgpack_pack_map (&pk, 0);
    uint8_t r4[16];
    gw_rid_new (r4);
    assert (gw_usage_submit (usage, r4, sbuf.data, sbuf.size) == -1);
    msgpack_sbuffer_destroy (&sbuf);
    char stats[256];
    gw_usage_stats (usage, stats, sizeof (stats));
    if (verbose)
        printf ("   (%s)\n", stats);
    assert (strstr (stats, "pending=3 "));

    //  4. Crash: the producer goes away with 3 events owed (its file stays;
    //  a second producer in the same process cannot take over a locked
    //  file, one started after the owner is gone does).
    gw_usage_t *other = gw_usage_new (endpoint, "billing-test", dir, "test", 10);
    assert (other && gw_usage_pending (other) == 0);
    gw_usage_destroy (&other);
    char path[PATH_MAX];
    snprintf (path, sizeof (path), "%s", gw_usage_path (usage));
    //  A torn last record (crash mid-write) is ignored.
    int fd = open (path, O_WRONLY | O_APPEND);
    assert (fd >= 0);
    assert (write (fd, "E0123456789abcdef\0\0\1", 20) == 20);
    close (fd);
    gw_usage_destroy (&usage);
    assert (access (path, F_OK) == 0);
    fake.mode = 200;
    zhashx_purge (fake.acked);
    usage = gw_usage_new (endpoint, "billing-test", dir, "test", 5000);
    assert (usage);
    assert (gw_usage_pending (usage) == 3);
    assert (access (path, F_OK) != 0);  //  taken over and deleted
    s_pump (usage, &fake, 300);
    assert (gw_usage_pending (usage) == 0);
    assert (zhashx_size (fake.acked) == 3);
    char hex1[33], hex3[33];
    gw_rid_hex (r1, hex1);
    gw_rid_hex (r3, hex3);
    assert (zhashx_lookup (fake.acked, hex1) && zhashx_lookup (fake.acked, hex3));
    gw_usage_stats (usage, stats, sizeof (stats));
    assert (strstr (stats, "recovered=3"));

    //  5. Compaction: acknowledged records do not pile up.
    for (int i = 0; i < 2000; i++) {
        uint8_t r[16];
        s_submit (usage, r, "a-model-name-long-enough-to-fill-the-spool-file-quickly");
        if (i % 5 == 4)
            s_pump (usage, &fake, 2);
    }
    s_pump (usage, &fake, 300);
    assert (gw_usage_pending (usage) == 0);
    struct stat st;
    assert (stat (gw_usage_path (usage), &st) == 0 && st.st_size < 64 * 1024 + 4096);

    //  6. Idle: one event leaves at once, in the single form, at the end of
    //  the turn it was submitted in (no waiting to fill a batch).
    size_t requests = fake.requests, batches = fake.batches;
    s_submit (usage, r1, "m");
    gw_usage_run (usage);
    s_fake_drain (&fake, 20);
    assert (fake.requests == requests + 1 && fake.batches == batches);
    gw_usage_run (usage);
    assert (gw_usage_pending (usage) == 0);

    //  7. Under load: 300 events due in one turn leave as two requests
    //  (256 + 44), each event acknowledged by its own result.
    zhashx_purge (fake.acked);
    requests = fake.requests;
    batches = fake.batches;
    for (int i = 0; i < 300; i++) {
        uint8_t r[16];
        s_submit (usage, r, "m");
    }
    s_pump (usage, &fake, 200);
    assert (gw_usage_pending (usage) == 0);
    assert (zhashx_size (fake.acked) == 300);
    assert (fake.requests == requests + 2 && fake.batches == batches + 2);
    assert (fake.largest == GW_USAGE_BATCH_MAX);

    //  8. One bad event in a batch is dropped alone; the others are
    //  acknowledged; nothing is resent.
    zhashx_purge (fake.acked);
    uint8_t batch_rids[10][16];
    for (int i = 0; i < 10; i++)
        s_submit (usage, batch_rids[i], "m");
    gw_rid_hex (batch_rids[4], hex);
    zhashx_insert (fake.refuse, hex, (void *)"x");
    gw_usage_stats (usage, stats, sizeof (stats));
    requests = fake.requests;
    s_pump (usage, &fake, 200);
    assert (gw_usage_pending (usage) == 0);
    assert (zhashx_size (fake.acked) == 9 && !zhashx_lookup (fake.acked, hex));
    assert (fake.requests == requests + 1);
    zhashx_purge (fake.refuse);

    //  9. A batch whose FINAL never comes (billing killed, answer lost):
    //  every event is resent after the deadline, then acknowledged.
    zhashx_purge (fake.acked);
    fake.mode = 0;
    gw_usage_set_timeout (usage, 150);
    gw_usage_set_backoff (usage, 20, 80);
    for (int i = 0; i < 10; i++)
        s_submit (usage, batch_rids[i], "m");
    requests = fake.requests;
    s_pump (usage, &fake, 100);
    assert (fake.requests == requests + 1 && gw_usage_pending (usage) == 10);
    s_pump (usage, &fake, 300);  //  the 150 ms deadline passes: resent
    assert (fake.requests >= requests + 2 && gw_usage_pending (usage) == 10);
    fake.mode = 200;
    s_pump (usage, &fake, 400);
    assert (gw_usage_pending (usage) == 0 && zhashx_size (fake.acked) == 10);

    //  10. A billing that predates batches refuses the batch (400): the
    //  events are not dropped but resent one per request, and later events
    //  go in the single form.
    zhashx_purge (fake.acked);
    fake.old = true;
    batches = fake.batches;
    for (int i = 0; i < 5; i++)
        s_submit (usage, batch_rids[i], "m");
    s_pump (usage, &fake, 200);
    assert (gw_usage_pending (usage) == 0 && zhashx_size (fake.acked) == 5);
    assert (fake.batches == batches + 1);
    for (int i = 0; i < 3; i++)
        s_submit (usage, batch_rids[i], "m");
    s_pump (usage, &fake, 200);
    assert (gw_usage_pending (usage) == 0 && fake.batches == batches + 1);
    fake.old = false;
    gw_usage_stats (usage, stats, sizeof (stats));
    if (verbose)
        printf ("   (%s)\n", stats);
    assert (strstr (stats, "dropped=1 "));  //  the one of step 8
    gw_usage_destroy (&usage);
    assert (rmdir (dir) == 0);  //  nothing owed: no file left

    zhashx_destroy (&fake.acked);
    zhashx_destroy (&fake.refuse);
    gw_worker_destroy (&fake.worker);
    zactor_destroy (&broker);
    zstr_free (&endpoint);
    printf ("OK\n");
}
