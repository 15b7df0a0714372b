//  --------------------------------------------------------------------------
//  gw_dispatch — the broker's scheduling core.
//
//  Design note. Three kinds of record:
//
//    service  name, its workers (intrusive list), its FIFO wait queue
//             (intrusive list of entries), and since when it has had no
//             worker (for grace).
//    worker   handle, service, capacity, in-flight count, idempotent flag,
//             label, a use stamp (for round robin) and the list of entries
//             dispatched to it, in dispatch order.
//    entry    one request in flight, keyed by its 16-byte rid in a hash:
//             client, service, worker (NULL while queued), payload,
//             deadline, when it was queued, partial-relayed and cancelled
//             flags. An entry sits on exactly one list: its service's queue
//             (worker == NULL) or its worker's list.
//
//  Invariants, true after every operation (the selftest checks them against
//  a naive model):
//    - a worker's in-flight count equals the length of its list, and a
//      dispatch never takes it above its capacity;
//    - a service's queue is no longer than queue_max, and is empty unless
//      none of its workers has free credit (queues are served whenever
//      credit frees up or a worker arrives);
//    - every request accepted ends exactly once: a FINAL action, a worker's
//      FINAL, or its client's cancel;
//    - a service record exists only while it has a worker or a queued
//      request, so unknown service names cannot grow memory beyond queued
//      requests.
//
//  Dispatch picks, among the service's workers with free credit, the lowest
//  in_flight / capacity (compared by cross-multiplication), ties broken by
//  the oldest use stamp (the longest since it was last given a request:
//  round robin). That is O(workers of the service) per dispatch, which is
//  small. Lookups by rid and by worker handle are O(1) hashes; tick is
//  O(queued). Rates: one operation per bus frame set, tens of thousands a
//  second. Nothing here fails on input: unknown rids and workers return -1.
//  Out of memory aborts (czmq's policy).

#include "aigw.h"
#include "gw_dispatch.h"

typedef struct _service_t service_t;
typedef struct _worker_t worker_t;
typedef struct _entry_t entry_t;

struct _entry_t {
    uint8_t rid[16];  //  request id, the hash key
    void *client;  //  client handle
    service_t *service;  //  service the request is for now
    worker_t *worker;  //  worker it is dispatched to, NULL while queued
    void *payload;  //  the request, owned here
    int64_t deadline;  //  unix ms, 0 = none
    int64_t queued_at;  //  unix ms when it last entered the queue
    bool partial;  //  a PARTIAL was relayed: never re-queue
    bool cancelled;  //  the client cancelled; the FINAL is not relayed
    entry_t *prev;  //  neighbours on the queue or the worker's list
    entry_t *next;
};

struct _worker_t {
    void *handle;  //  caller's handle, the hash key
    service_t *service;  //  the service it serves
    uint32_t capacity;  //  1..65535
    uint32_t in_flight;  //  dispatched, not yet finished
    bool idempotent;  //  READY flag IDEMPOTENT
    uint64_t stamp;  //  last registration or dispatch
    char label[GW_LABEL_MAX + 1];  //  READY label
    entry_t *head;  //  dispatched entries, oldest first
    entry_t *tail;
    worker_t *prev;  //  neighbours in the service's list
    worker_t *next;
};

struct _service_t {
    char name[GW_SERVICE_MAX + 1];  //  service name, the hash key
    worker_t *workers;  //  registered workers (list head)
    size_t worker_count;  //  length of workers
    entry_t *head;  //  FIFO wait queue, oldest first
    entry_t *tail;
    size_t queued;  //  length of the queue
    int64_t empty_since;  //  unix ms since it has had no worker
    service_t *gc_next;  //  on the to-collect list during tick
};

struct _gw_dispatch_t {
    zhashx_t *services;  //  name -> service_t
    zhashx_t *workers;  //  handle -> worker_t
    zhashx_t *entries;  //  rid -> entry_t
    size_t queue_max;  //  bound of each queue
    int64_t grace;  //  ms a request waits for a first worker
    size_t queued_total;  //  sum of queue lengths
    uint64_t stamp;  //  use counter for round robin
    gw_dispatch_free_fn *destructor;  //  releases payloads, or NULL
    gw_dispatch_action_t *actions;  //  actions of the last operation
    size_t action_count;  //  used
    size_t action_limit;  //  allocated
};

//  --------------------------------------------------------------------------
//  Hash helpers for handle keys (pointer values); rid keys use gw_rid_hash.

static size_t
s_handle_hash (const void *key)
{
    uint64_t h = (uint64_t)(uintptr_t)key * 0x9E3779B97F4A7C15ULL;
    return (size_t)(h ^ (h >> 29));
}

static int
s_handle_compare (const void *item1, const void *item2)
{
    return item1 < item2 ? -1 : item1 > item2 ? 1 : 0;
}

gw_dispatch_t *
gw_dispatch_new (void)
{
    gw_dispatch_t *self = (gw_dispatch_t *)zmalloc (sizeof (gw_dispatch_t));
    assert (self);
    self->services = zhashx_new ();
    self->workers = zhashx_new ();
    self->entries = gw_rid_map_new (NULL);
    assert (self->services && self->workers);
    zhashx_set_key_duplicator (self->workers, NULL);
    zhashx_set_key_destructor (self->workers, NULL);
    zhashx_set_key_hasher (self->workers, s_handle_hash);
    zhashx_set_key_comparator (self->workers, s_handle_compare);
    self->queue_max = GW_DISPATCH_QUEUE_MAX;
    self->grace = GW_DISPATCH_GRACE;
    self->action_limit = 16;
    self->actions = (gw_dispatch_action_t *)zmalloc (
        self->action_limit * sizeof (gw_dispatch_action_t));
    assert (self->actions);
    return self;
}

static void
s_entry_free (gw_dispatch_t *self, entry_t **entry_p)
{
    entry_t *entry = *entry_p;
    if (entry->payload && self->destructor)
        self->destructor (&entry->payload);
    free (entry);
    *entry_p = NULL;
}

void
gw_dispatch_destroy (gw_dispatch_t **self_p)
{
    assert (self_p);
    if (*self_p) {
        gw_dispatch_t *self = *self_p;
        entry_t *entry = (entry_t *)zhashx_first (self->entries);
        while (entry) {
            s_entry_free (self, &entry);
            entry = (entry_t *)zhashx_next (self->entries);
        }
        worker_t *worker = (worker_t *)zhashx_first (self->workers);
        while (worker) {
            free (worker);
            worker = (worker_t *)zhashx_next (self->workers);
        }
        service_t *service = (service_t *)zhashx_first (self->services);
        while (service) {
            free (service);
            service = (service_t *)zhashx_next (self->services);
        }
        zhashx_destroy (&self->entries);
        zhashx_destroy (&self->workers);
        zhashx_destroy (&self->services);
        free (self->actions);
        free (self);
        *self_p = NULL;
    }
}

void
gw_dispatch_set_queue_max (gw_dispatch_t *self, size_t queue_max)
{
    assert (self);
    self->queue_max = queue_max;
}

void
gw_dispatch_set_grace (gw_dispatch_t *self, int64_t grace_ms)
{
    assert (self);
    self->grace = grace_ms < 0 ? 0 : grace_ms;
}

void
gw_dispatch_set_destructor (gw_dispatch_t *self, gw_dispatch_free_fn *destructor)
{
    assert (self);
    self->destructor = destructor;
}

//  --------------------------------------------------------------------------
//  Actions

static void
s_actions_reset (gw_dispatch_t *self)
{
    self->action_count = 0;
}

static gw_dispatch_action_t *
s_action_add (gw_dispatch_t *self, int type, entry_t *entry)
{
    if (self->action_count == self->action_limit) {
        self->action_limit *= 2;
        self->actions = (gw_dispatch_action_t *)realloc (
            self->actions, self->action_limit * sizeof (gw_dispatch_action_t));
        assert (self->actions);
    }
    gw_dispatch_action_t *action = &self->actions[self->action_count++];
    action->type = type;
    memcpy (action->rid, entry->rid, 16);
    action->client = entry->client;
    action->worker = entry->worker ? entry->worker->handle : NULL;
    action->payload = NULL;
    action->status = 0;
    action->code = NULL;
    //  Service names are validated and bounded: strcpy is safe here.
    strcpy (action->service, entry->service->name);
    return action;
}

//  --------------------------------------------------------------------------
//  Services

static service_t *
s_service_require (gw_dispatch_t *self, const char *name, int64_t now)
{
    service_t *service = (service_t *)zhashx_lookup (self->services, name);
    if (!service) {
        service = (service_t *)zmalloc (sizeof (service_t));
        assert (service);
        snprintf (service->name, sizeof (service->name), "%s", name);
        service->empty_since = now;
        zhashx_insert (self->services, service->name, service);
    }
    return service;
}

//  Forget a service that has neither workers nor queued requests.
static void
s_service_collect (gw_dispatch_t *self, service_t *service)
{
    if (service->worker_count == 0 && service->queued == 0) {
        zhashx_delete (self->services, service->name);
        free (service);
    }
}

static void
s_queue_unlink (gw_dispatch_t *self, entry_t *entry)
{
    service_t *service = entry->service;
    if (entry->prev)
        entry->prev->next = entry->next;
    else
        service->head = entry->next;
    if (entry->next)
        entry->next->prev = entry->prev;
    else
        service->tail = entry->prev;
    entry->prev = entry->next = NULL;
    service->queued--;
    self->queued_total--;
}

static void
s_queue_append (gw_dispatch_t *self, service_t *service, entry_t *entry, int64_t now)
{
    entry->service = service;
    entry->worker = NULL;
    entry->queued_at = now;
    entry->next = NULL;
    entry->prev = service->tail;
    if (service->tail)
        service->tail->next = entry;
    else
        service->head = entry;
    service->tail = entry;
    service->queued++;
    self->queued_total++;
}

//  Insert entry after 'after' (NULL = at the head).
static void
s_queue_insert_after (
    gw_dispatch_t *self, service_t *service, entry_t *after, entry_t *entry, int64_t now)
{
    entry->service = service;
    entry->worker = NULL;
    entry->queued_at = now;
    entry->prev = after;
    entry->next = after ? after->next : service->head;
    if (entry->next)
        entry->next->prev = entry;
    else
        service->tail = entry;
    if (after)
        after->next = entry;
    else
        service->head = entry;
    service->queued++;
    self->queued_total++;
}

//  --------------------------------------------------------------------------
//  Workers

static void
s_worker_unlink_entry (worker_t *worker, entry_t *entry)
{
    if (entry->prev)
        entry->prev->next = entry->next;
    else
        worker->head = entry->next;
    if (entry->next)
        entry->next->prev = entry->prev;
    else
        worker->tail = entry->prev;
    entry->prev = entry->next = NULL;
    assert (worker->in_flight > 0);
    worker->in_flight--;
}

//  The least loaded worker of service with free credit, or NULL.
static worker_t *
s_service_choose (service_t *service)
{
    worker_t *best = NULL;
    for (worker_t *worker = service->workers; worker; worker = worker->next) {
        if (worker->in_flight >= worker->capacity)
            continue;
        if (!best)
            best = worker;
        else {
            uint64_t lhs = (uint64_t)worker->in_flight * best->capacity;
            uint64_t rhs = (uint64_t)best->in_flight * worker->capacity;
            if (lhs < rhs || (lhs == rhs && worker->stamp < best->stamp))
                best = worker;
        }
    }
    return best;
}

//  Hand entry (not on any list) to worker: SEND action.
static void
s_dispatch_to (gw_dispatch_t *self, entry_t *entry, worker_t *worker)
{
    assert (worker->in_flight < worker->capacity);
    entry->worker = worker;
    entry->service = worker->service;
    entry->prev = worker->tail;
    entry->next = NULL;
    if (worker->tail)
        worker->tail->next = entry;
    else
        worker->head = entry;
    worker->tail = entry;
    worker->in_flight++;
    worker->stamp = ++self->stamp;
    gw_dispatch_action_t *action = s_action_add (self, GW_DISPATCH_SEND, entry);
    action->payload = entry->payload;
}

//  End entry (not on any list) with a broker FINAL.
static void
s_final (gw_dispatch_t *self, entry_t *entry, uint16_t status, const char *code)
{
    gw_dispatch_action_t *action = s_action_add (self, GW_DISPATCH_FINAL, entry);
    action->worker = NULL;
    action->status = status;
    action->code = code;
    zhashx_delete (self->entries, entry->rid);
    s_entry_free (self, &entry);
}

//  End entry (not on any list) silently.
static void
s_forget (gw_dispatch_t *self, entry_t *entry)
{
    zhashx_delete (self->entries, entry->rid);
    s_entry_free (self, &entry);
}

static bool
s_expired (entry_t *entry, int64_t now)
{
    return entry->deadline > 0 && entry->deadline <= now;
}

//  Dispatch queued requests of service while a worker has free credit.
//  Requests past their deadline met on the way get 504.
static void
s_service_serve (gw_dispatch_t *self, service_t *service, int64_t now)
{
    while (service->head) {
        worker_t *worker = s_service_choose (service);
        if (!worker)
            break;
        entry_t *entry = service->head;
        s_queue_unlink (self, entry);
        if (s_expired (entry, now))
            s_final (self, entry, 504, "deadline_exceeded");
        else
            s_dispatch_to (self, entry, worker);
    }
}

//  Place a new or forwarded entry (not on any list, in the hash) for
//  service: 504, dispatch, 503, or queue.
static void
s_place (gw_dispatch_t *self, entry_t *entry, service_t *service, int64_t now)
{
    entry->service = service;
    entry->worker = NULL;
    if (s_expired (entry, now)) {
        s_final (self, entry, 504, "deadline_exceeded");
        s_service_collect (self, service);
        return;
    }
    //  The queue is empty whenever a worker has free credit (invariant).
    worker_t *worker = s_service_choose (service);
    if (worker)
        s_dispatch_to (self, entry, worker);
    else if (service->queued >= self->queue_max) {
        s_final (self, entry, 503, "queue_full");
        s_service_collect (self, service);
    }
    else
        s_queue_append (self, service, entry, now);
}

static void
s_service_link_worker (service_t *service, worker_t *worker)
{
    worker->prev = NULL;
    worker->next = service->workers;
    if (service->workers)
        service->workers->prev = worker;
    service->workers = worker;
    service->worker_count++;
}

static void
s_service_unlink_worker (service_t *service, worker_t *worker, int64_t now)
{
    if (worker->prev)
        worker->prev->next = worker->next;
    else
        service->workers = worker->next;
    if (worker->next)
        worker->next->prev = worker->prev;
    worker->prev = worker->next = NULL;
    service->worker_count--;
    if (service->worker_count == 0)
        service->empty_since = now;
}

//  Remove a worker record and settle its requests (PROTOCOL.md §3.5.2).
static void
s_worker_remove (gw_dispatch_t *self, worker_t *worker, int64_t now)
{
    service_t *service = worker->service;
    s_service_unlink_worker (service, worker, now);
    zhashx_delete (self->workers, worker->handle);
    //  Oldest dispatched first, so re-queued requests keep their order at
    //  the head of the queue and the oldest win if the queue fills up.
    entry_t *after = NULL;
    entry_t *entry = worker->head;
    while (entry) {
        entry_t *next = entry->next;
        entry->prev = entry->next = NULL;
        worker->in_flight--;
        if (entry->cancelled)
            s_forget (self, entry);
        else if (worker->idempotent && !entry->partial && !s_expired (entry, now) &&
            service->queued < self->queue_max) {
            s_queue_insert_after (self, service, after, entry, now);
            after = entry;
        }
        else {
            //  The action names no worker: it is going away.
            entry->worker = NULL;
            if (worker->idempotent && !entry->partial && s_expired (entry, now))
                s_final (self, entry, 504, "deadline_exceeded");
            else if (worker->idempotent && !entry->partial)
                s_final (self, entry, 503, "queue_full");
            else
                s_final (self, entry, 502, "worker_lost");
        }
        entry = next;
    }
    assert (worker->in_flight == 0);
    free (worker);
    s_service_serve (self, service, now);
    s_service_collect (self, service);
}

//  --------------------------------------------------------------------------
//  Operations

int
gw_dispatch_worker_ready (gw_dispatch_t *self, void *handle, const char *service_name,
    uint32_t capacity, bool idempotent, const char *label, int64_t now)
{
    assert (self);
    assert (handle);
    assert (service_name);
    s_actions_reset (self);
    worker_t *worker = (worker_t *)zhashx_lookup (self->workers, handle);
    if (worker && strcmp (worker->service->name, service_name)) {
        s_worker_remove (self, worker, now);
        worker = NULL;
    }
    if (!worker) {
        worker = (worker_t *)zmalloc (sizeof (worker_t));
        assert (worker);
        worker->handle = handle;
        worker->service = s_service_require (self, service_name, now);
        worker->stamp = ++self->stamp;
        s_service_link_worker (worker->service, worker);
        zhashx_insert (self->workers, handle, worker);
    }
    worker->capacity = capacity ? capacity : 1;
    worker->idempotent = idempotent;
    snprintf (worker->label, sizeof (worker->label), "%s", label ? label : "");
    s_service_serve (self, worker->service, now);
    return 0;
}

int
gw_dispatch_worker_remove (gw_dispatch_t *self, void *handle, int64_t now)
{
    assert (self);
    s_actions_reset (self);
    worker_t *worker = (worker_t *)zhashx_lookup (self->workers, handle);
    if (!worker)
        return -1;
    s_worker_remove (self, worker, now);
    return 0;
}

int
gw_dispatch_request (gw_dispatch_t *self, const uint8_t rid[16], void *client,
    const char *service_name, int64_t deadline, void *payload, int64_t now)
{
    assert (self);
    assert (client);
    s_actions_reset (self);
    if (zhashx_lookup (self->entries, rid))
        return -1;
    entry_t *entry = (entry_t *)zmalloc (sizeof (entry_t));
    assert (entry);
    memcpy (entry->rid, rid, 16);
    entry->client = client;
    entry->payload = payload;
    entry->deadline = deadline;
    zhashx_insert (self->entries, entry->rid, entry);
    s_place (self, entry, s_service_require (self, service_name, now), now);
    return 0;
}

//  The entry for rid if it is dispatched to worker handle, else NULL.
static entry_t *
s_entry_on (gw_dispatch_t *self, const uint8_t rid[16], void *handle)
{
    entry_t *entry = (entry_t *)zhashx_lookup (self->entries, rid);
    if (entry && entry->worker && entry->worker->handle == handle)
        return entry;
    return NULL;
}

int
gw_dispatch_forward (gw_dispatch_t *self, const uint8_t rid[16], void *handle,
    const char *service_name, int64_t deadline, void *payload, int64_t now)
{
    assert (self);
    s_actions_reset (self);
    entry_t *entry = s_entry_on (self, rid, handle);
    if (!entry)
        return -1;
    worker_t *worker = entry->worker;
    s_worker_unlink_entry (worker, entry);
    entry->worker = NULL;
    if (entry->payload && self->destructor)
        self->destructor (&entry->payload);
    entry->payload = payload;
    entry->deadline = deadline;
    bool cancelled = entry->cancelled;
    if (cancelled)
        s_forget (self, entry);
    //  Credit freed: serve the worker's queue first, then place the
    //  forwarded request (behind anything already waiting there).
    s_service_serve (self, worker->service, now);
    if (!cancelled)
        s_place (self, entry, s_service_require (self, service_name, now), now);
    return 0;
}

int
gw_dispatch_final (gw_dispatch_t *self, const uint8_t rid[16], void *handle,
    void **client_p, int64_t now)
{
    assert (self);
    s_actions_reset (self);
    entry_t *entry = s_entry_on (self, rid, handle);
    if (!entry)
        return -1;
    worker_t *worker = entry->worker;
    s_worker_unlink_entry (worker, entry);
    bool relay = !entry->cancelled;
    if (client_p)
        *client_p = entry->client;
    s_forget (self, entry);
    s_service_serve (self, worker->service, now);
    return relay ? 1 : 0;
}

int
gw_dispatch_partial (
    gw_dispatch_t *self, const uint8_t rid[16], void *handle, void **client_p)
{
    assert (self);
    s_actions_reset (self);
    entry_t *entry = s_entry_on (self, rid, handle);
    if (!entry)
        return -1;
    if (entry->cancelled)
        return 0;
    entry->partial = true;
    if (client_p)
        *client_p = entry->client;
    return 1;
}

void *
gw_dispatch_credit (gw_dispatch_t *self, const uint8_t rid[16], void *client)
{
    assert (self);
    s_actions_reset (self);
    entry_t *entry = (entry_t *)zhashx_lookup (self->entries, rid);
    if (entry && entry->client == client && entry->worker && !entry->cancelled)
        return entry->worker->handle;
    return NULL;
}

//  Cancel one entry (no reset of the action list).
static void
s_cancel (gw_dispatch_t *self, entry_t *entry, uint16_t reason)
{
    if (!entry->worker) {
        service_t *service = entry->service;
        s_queue_unlink (self, entry);
        s_forget (self, entry);
        s_service_collect (self, service);
    }
    else if (!entry->cancelled) {
        entry->cancelled = true;
        gw_dispatch_action_t *action = s_action_add (self, GW_DISPATCH_CANCEL, entry);
        action->status = reason;
    }
}

int
gw_dispatch_cancel (
    gw_dispatch_t *self, const uint8_t rid[16], void *client, uint16_t reason)
{
    assert (self);
    s_actions_reset (self);
    entry_t *entry = (entry_t *)zhashx_lookup (self->entries, rid);
    if (!entry || entry->client != client)
        return -1;
    s_cancel (self, entry, reason);
    return 0;
}

size_t
gw_dispatch_client_gone (gw_dispatch_t *self, void *client)
{
    assert (self);
    s_actions_reset (self);
    //  Rare (a client expired): a scan is fine. Collect first, since
    //  cancelling queued entries deletes from the hash being iterated.
    size_t count = 0;
    zlistx_t *mine = zlistx_new ();
    assert (mine);
    entry_t *entry = (entry_t *)zhashx_first (self->entries);
    while (entry) {
        if (entry->client == client)
            zlistx_add_end (mine, entry);
        entry = (entry_t *)zhashx_next (self->entries);
    }
    entry = (entry_t *)zlistx_first (mine);
    while (entry) {
        s_cancel (self, entry, 499);
        count++;
        entry = (entry_t *)zlistx_next (mine);
    }
    zlistx_destroy (&mine);
    return count;
}

void
gw_dispatch_tick (gw_dispatch_t *self, int64_t now)
{
    assert (self);
    s_actions_reset (self);
    if (self->queued_total == 0)
        return;
    service_t *collect = NULL;
    service_t *service = (service_t *)zhashx_first (self->services);
    while (service) {
        int64_t grace_from = -1;
        if (service->worker_count == 0)
            grace_from = service->empty_since;
        entry_t *entry = service->head;
        while (entry) {
            entry_t *next = entry->next;
            if (s_expired (entry, now)) {
                s_queue_unlink (self, entry);
                s_final (self, entry, 504, "deadline_exceeded");
            }
            else if (grace_from >= 0) {
                int64_t since =
                    entry->queued_at > grace_from ? entry->queued_at : grace_from;
                if (now >= since + self->grace) {
                    s_queue_unlink (self, entry);
                    s_final (self, entry, 503, "no_worker");
                }
            }
            entry = next;
        }
        if (service->worker_count == 0 && service->queued == 0) {
            service->gc_next = collect;
            collect = service;
        }
        service = (service_t *)zhashx_next (self->services);
    }
    while (collect) {
        service_t *next = collect->gc_next;
        s_service_collect (self, collect);
        collect = next;
    }
}

const char *
gw_dispatch_service (gw_dispatch_t *self, const uint8_t rid[16])
{
    assert (self);
    entry_t *entry = (entry_t *)zhashx_lookup (self->entries, rid);
    return entry ? entry->service->name : NULL;
}

void *
gw_dispatch_client (gw_dispatch_t *self, const uint8_t rid[16])
{
    assert (self);
    entry_t *entry = (entry_t *)zhashx_lookup (self->entries, rid);
    return entry ? entry->client : NULL;
}

size_t
gw_dispatch_actions (gw_dispatch_t *self, gw_dispatch_action_t **actions_p)
{
    assert (self);
    assert (actions_p);
    *actions_p = self->actions;
    return self->action_count;
}

size_t
gw_dispatch_size (gw_dispatch_t *self)
{
    assert (self);
    return zhashx_size (self->entries);
}

size_t
gw_dispatch_queued_total (gw_dispatch_t *self)
{
    assert (self);
    return self->queued_total;
}

size_t
gw_dispatch_queued (gw_dispatch_t *self, const char *name)
{
    assert (self);
    service_t *service = (service_t *)zhashx_lookup (self->services, name);
    return service ? service->queued : 0;
}

size_t
gw_dispatch_workers (gw_dispatch_t *self, const char *name)
{
    assert (self);
    service_t *service = (service_t *)zhashx_lookup (self->services, name);
    return service ? service->worker_count : 0;
}

int
gw_dispatch_in_flight (gw_dispatch_t *self, void *handle)
{
    assert (self);
    worker_t *worker = (worker_t *)zhashx_lookup (self->workers, handle);
    return worker ? (int)worker->in_flight : -1;
}

void
gw_dispatch_describe (gw_dispatch_t *self, msgpack_packer *pk)
{
    assert (self);
    assert (pk);
    msgpack_pack_array (pk, zhashx_size (self->services));
    service_t *service = (service_t *)zhashx_first (self->services);
    while (service) {
        uint64_t capacity = 0, in_flight = 0;
        bool idempotent = service->worker_count > 0;
        for (worker_t *worker = service->workers; worker; worker = worker->next) {
            capacity += worker->capacity;
            in_flight += worker->in_flight;
            idempotent = idempotent && worker->idempotent;
        }
        msgpack_pack_map (pk, 7);
        gw_mpack_str (pk, "name");
        gw_mpack_str (pk, service->name);
        gw_mpack_str (pk, "workers");
        msgpack_pack_uint64 (pk, service->worker_count);
        gw_mpack_str (pk, "capacity");
        msgpack_pack_uint64 (pk, capacity);
        gw_mpack_str (pk, "in_flight");
        msgpack_pack_uint64 (pk, in_flight);
        gw_mpack_str (pk, "queued");
        msgpack_pack_uint64 (pk, service->queued);
        gw_mpack_str (pk, "idempotent");
        if (idempotent)
            msgpack_pack_true (pk);
        else
            msgpack_pack_false (pk);
        gw_mpack_str (pk, "labels");
        msgpack_pack_array (pk, service->worker_count);
        for (worker_t *worker = service->workers; worker; worker = worker->next)
            gw_mpack_str (pk, worker->label);
        service = (service_t *)zhashx_next (self->services);
    }
}

//  --------------------------------------------------------------------------
//  Selftest

//
//  Two parts: a few hand-written scenarios (the examples), then a
//  differential test: random operations applied both to gw_dispatch and to
//  a deliberately naive model (plain arrays, linear scans), comparing every
//  outcome and the invariants after every step.

//  Test payloads are heap objects so ASan sees leaks and double frees.
typedef struct {
    int request;  //  model request index
    int version;  //  bumped by each FORWARD
} t_payload_t;

static int s_t_payloads;  //  live test payloads

static void *
s_t_payload_new (int request, int version)
{
    t_payload_t *payload = (t_payload_t *)zmalloc (sizeof (t_payload_t));
    assert (payload);
    payload->request = request;
    payload->version = version;
    s_t_payloads++;
    return payload;
}

static void
s_t_payload_free (void **payload_p)
{
    assert (payload_p && *payload_p);
    free (*payload_p);
    *payload_p = NULL;
    s_t_payloads--;
}

static void
s_t_rid (uint8_t rid[16], uint32_t index)
{
    memset (rid, 0xA5, 16);
    rid[0] = (uint8_t)(index >> 24);
    rid[1] = (uint8_t)(index >> 16);
    rid[2] = (uint8_t)(index >> 8);
    rid[3] = (uint8_t)index;
}

static uint32_t
s_t_rid_index (const uint8_t rid[16])
{
    return ((uint32_t)rid[0] << 24) | ((uint32_t)rid[1] << 16) | ((uint32_t)rid[2] << 8) |
        rid[3];
}

#define T_HANDLE(n) ((void *)(uintptr_t)(n))

//  Expect exactly one action of type for rid index in the last operation.
static gw_dispatch_action_t *
s_t_expect (gw_dispatch_t *dispatch, int type, uint32_t index)
{
    gw_dispatch_action_t *actions;
    size_t count = gw_dispatch_actions (dispatch, &actions);
    for (size_t i = 0; i < count; i++)
        if (actions[i].type == type && s_t_rid_index (actions[i].rid) == index)
            return &actions[i];
    return NULL;
}

static void
s_t_scenarios (bool verbose)
{
    gw_dispatch_t *dispatch = gw_dispatch_new ();
    gw_dispatch_set_destructor (dispatch, s_t_payload_free);
    gw_dispatch_set_queue_max (dispatch, 2);
    gw_dispatch_set_grace (dispatch, 100);
    gw_dispatch_action_t *action;
    uint8_t rid[16];
    void *client = T_HANDLE (1), *w1 = T_HANDLE (101), *w2 = T_HANDLE (102);
    void *peer = NULL;
    int64_t now = 1000;

    //  Two workers, capacities 1 and 2: least loaded first, ties to the
    //  longest idle.
    gw_dispatch_worker_ready (dispatch, w1, "echo", 1, true, "w1", now);
    gw_dispatch_worker_ready (dispatch, w2, "echo", 2, false, "w2", now);
    for (uint32_t i = 1; i <= 3; i++) {
        s_t_rid (rid, i);
        assert (gw_dispatch_request (
                    dispatch, rid, client, "echo", 0, s_t_payload_new (i, 0), now) == 0);
        action = s_t_expect (dispatch, GW_DISPATCH_SEND, i);
        assert (action);
        assert (action->worker == (i == 1 ? w1 : w2));
        assert (((t_payload_t *)action->payload)->request == (int)i);
    }
    //  Full: the next two queue, the third gets 503.
    s_t_rid (rid, 4);
    assert (gw_dispatch_request (
                dispatch, rid, client, "echo", 0, s_t_payload_new (4, 0), now) == 0);
    assert (gw_dispatch_actions (dispatch, &action) == 0);
    s_t_rid (rid, 5);
    gw_dispatch_request (
        dispatch, rid, client, "echo", now + 50, s_t_payload_new (5, 0), now);
    s_t_rid (rid, 6);
    gw_dispatch_request (dispatch, rid, client, "echo", 0, s_t_payload_new (6, 0), now);
    action = s_t_expect (dispatch, GW_DISPATCH_FINAL, 6);
    assert (action && action->status == 503 && streq (action->code, "queue_full"));
    assert (action->client == client && streq (action->service, "echo"));
    assert (gw_dispatch_queued (dispatch, "echo") == 2);
    //  A duplicate rid is refused and the payload left with the caller.
    s_t_rid (rid, 4);
    void *dup = s_t_payload_new (4, 9);
    assert (gw_dispatch_request (dispatch, rid, client, "echo", 0, dup, now) == -1);
    s_t_payload_free (&dup);

    //  A worker FINAL frees credit: relayed, and the oldest queued goes.
    s_t_rid (rid, 1);
    assert (gw_dispatch_final (dispatch, rid, w2, &peer, now) == -1);
    assert (gw_dispatch_final (dispatch, rid, w1, &peer, now) == 1);
    assert (peer == client);
    action = s_t_expect (dispatch, GW_DISPATCH_SEND, 4);
    assert (action && action->worker == w1);

    //  The queued request with a deadline gets 504 on tick.
    gw_dispatch_tick (dispatch, now + 49);
    assert (gw_dispatch_actions (dispatch, &action) == 0);
    gw_dispatch_tick (dispatch, now + 50);
    action = s_t_expect (dispatch, GW_DISPATCH_FINAL, 5);
    assert (action && action->status == 504 && streq (action->code, "deadline_exceeded"));
    assert (gw_dispatch_queued (dispatch, "echo") == 0);

    //  PARTIAL marks the stream; CREDIT finds the worker; CANCEL goes to
    //  the worker and its FINAL is then not relayed.
    s_t_rid (rid, 2);
    assert (gw_dispatch_partial (dispatch, rid, w2, &peer) == 1 && peer == client);
    assert (gw_dispatch_credit (dispatch, rid, client) == w2);
    assert (gw_dispatch_credit (dispatch, rid, T_HANDLE (2)) == NULL);
    assert (gw_dispatch_cancel (dispatch, rid, T_HANDLE (2), 499) == -1);
    assert (gw_dispatch_cancel (dispatch, rid, client, 499) == 0);
    action = s_t_expect (dispatch, GW_DISPATCH_CANCEL, 2);
    assert (action && action->worker == w2 && action->status == 499);
    assert (gw_dispatch_partial (dispatch, rid, w2, &peer) == 0);
    assert (gw_dispatch_credit (dispatch, rid, client) == NULL);
    assert (gw_dispatch_final (dispatch, rid, w2, &peer, now) == 0);

    //  FORWARD across services keeps the client; the forwarding worker's
    //  credit is freed.
    gw_dispatch_worker_ready (dispatch, T_HANDLE (103), "next", 1, false, "w3", now);
    s_t_rid (rid, 3);
    assert (gw_dispatch_forward (
                dispatch, rid, w2, "next", 0, s_t_payload_new (3, 1), now) == 0);
    action = s_t_expect (dispatch, GW_DISPATCH_SEND, 3);
    assert (action && action->worker == T_HANDLE (103) && action->client == client);
    assert (((t_payload_t *)action->payload)->version == 1);
    assert (gw_dispatch_in_flight (dispatch, w2) == 0);

    //  Worker death: idempotent w1 re-queues (nothing streamed) and the
    //  request goes to w2; the non-idempotent w3 fails its request with 502.
    gw_dispatch_worker_remove (dispatch, w1, now);
    action = s_t_expect (dispatch, GW_DISPATCH_SEND, 4);
    assert (action && action->worker == w2);
    gw_dispatch_worker_remove (dispatch, T_HANDLE (103), now);
    action = s_t_expect (dispatch, GW_DISPATCH_FINAL, 3);
    assert (action && action->status == 502 && streq (action->code, "worker_lost"));
    assert (gw_dispatch_worker_remove (dispatch, T_HANDLE (103), now) == -1);

    //  No worker at all: 503 after grace.
    s_t_rid (rid, 7);
    gw_dispatch_request (dispatch, rid, client, "nobody", 0, s_t_payload_new (7, 0), now);
    assert (gw_dispatch_queued (dispatch, "nobody") == 1);
    gw_dispatch_tick (dispatch, now + 99);
    assert (gw_dispatch_actions (dispatch, &action) == 0);
    gw_dispatch_tick (dispatch, now + 100);
    action = s_t_expect (dispatch, GW_DISPATCH_FINAL, 7);
    assert (action && action->status == 503 && streq (action->code, "no_worker"));
    assert (gw_dispatch_workers (dispatch, "nobody") == 0);

    //  gw.services description packs.
    msgpack_sbuffer buffer;
    msgpack_sbuffer_init (&buffer);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &buffer, msgpack_sbuffer_write);
    gw_dispatch_describe (dispatch, &pk);
    assert (buffer.size > 0);
    msgpack_sbuffer_destroy (&buffer);

    //  The client goes away: its last request is cancelled at the worker.
    assert (gw_dispatch_client_gone (dispatch, client) == 1);
    action = s_t_expect (dispatch, GW_DISPATCH_CANCEL, 4);
    assert (action && action->worker == w2);
    gw_dispatch_destroy (&dispatch);
    assert (s_t_payloads == 0);
    if (verbose)
        printf (" * gw_dispatch: scenarios ok\n");
}

//  --------------------------------------------------------------------------
//  The naive model.

#define M_SERVICES 4
#define M_WORKERS 10
#define M_CLIENTS 4

enum { M_IDLE = 0, M_QUEUED, M_DISPATCHED };

typedef struct {
    bool alive;  //  registered
    int service;  //  index
    uint32_t capacity;  //  credit
    uint32_t in_flight;  //  dispatched
    bool idempotent;  //  READY flag
    uint64_t stamp;  //  last registration or dispatch
} m_worker_t;

typedef struct {
    int state;  //  M_IDLE, M_QUEUED, M_DISPATCHED
    bool accepted;  //  an operation took it
    int client;  //  index
    int service;  //  index
    int worker;  //  index while dispatched
    int64_t deadline;  //  unix ms, 0 = none
    int64_t queued_at;  //  when it entered the queue
    uint64_t order;  //  dispatch order
    bool partial;  //  a PARTIAL was relayed
    bool cancelled;  //  the client cancelled
    void *payload;  //  the payload the dispatcher holds
    int version;  //  payload version
    int ends;  //  ends seen from the dispatcher's outcomes
} m_req_t;

typedef struct {
    int *queue;  //  request indices, oldest first
    size_t queued;  //  length
    int64_t empty_since;  //  when its last worker left
} m_service_t;

typedef struct {
    int type;  //  GW_DISPATCH_*
    uint32_t rid;  //  request index
    int client;  //  client index
    int worker;  //  worker index or -1
    uint16_t status;  //  FINAL status, CANCEL reason
    const char *code;  //  FINAL code
    void *payload;  //  SEND payload
    int service;  //  service index
} m_action_t;

typedef struct {
    m_worker_t workers[M_WORKERS];
    m_service_t services[M_SERVICES];
    m_req_t *reqs;  //  every request ever made
    size_t req_count;  //  used
    size_t req_limit;  //  allocated
    size_t queue_max;  //  as configured
    int64_t grace;  //  as configured
    uint64_t stamp;  //  as the dispatcher's
    uint64_t order;  //  dispatch counter
    m_action_t actions[4096];  //  expected outcome of the step
    size_t action_count;  //  used
} model_t;

static const char *s_m_names[M_SERVICES] = {"alpha", "beta", "gamma", "delta"};

static void
m_action (model_t *m, int type, int r, uint16_t status, const char *code)
{
    assert (m->action_count < 4096);
    m_req_t *req = &m->reqs[r];
    m_action_t *action = &m->actions[m->action_count++];
    action->type = type;
    action->rid = (uint32_t)r;
    action->client = req->client;
    action->worker = type == GW_DISPATCH_FINAL ? -1 : req->worker;
    action->status = status;
    action->code = code;
    action->payload = type == GW_DISPATCH_SEND ? req->payload : NULL;
    action->service = req->service;
}

static bool
m_expired (m_req_t *req, int64_t now)
{
    return req->deadline > 0 && req->deadline <= now;
}

//  Request r ends inside the dispatcher: its payload is released.
static void
m_release (m_req_t *req)
{
    req->state = M_IDLE;
    req->payload = NULL;
}

static void
m_final (model_t *m, int r, uint16_t status, const char *code)
{
    m_action (m, GW_DISPATCH_FINAL, r, status, code);
    m_release (&m->reqs[r]);
}

static int
m_choose (model_t *m, int service)
{
    int best = -1;
    for (int w = 0; w < M_WORKERS; w++) {
        m_worker_t *worker = &m->workers[w];
        if (!worker->alive || worker->service != service ||
            worker->in_flight >= worker->capacity)
            continue;
        if (best < 0)
            best = w;
        else {
            m_worker_t *b = &m->workers[best];
            uint64_t lhs = (uint64_t)worker->in_flight * b->capacity;
            uint64_t rhs = (uint64_t)b->in_flight * worker->capacity;
            if (lhs < rhs || (lhs == rhs && worker->stamp < b->stamp))
                best = w;
        }
    }
    return best;
}

static int
m_alive_count (model_t *m, int service)
{
    int count = 0;
    for (int w = 0; w < M_WORKERS; w++)
        if (m->workers[w].alive && m->workers[w].service == service)
            count++;
    return count;
}

static void
m_dispatch (model_t *m, int r, int w)
{
    m_req_t *req = &m->reqs[r];
    m_worker_t *worker = &m->workers[w];
    assert (worker->in_flight < worker->capacity);
    req->state = M_DISPATCHED;
    req->worker = w;
    req->service = worker->service;
    req->order = ++m->order;
    worker->in_flight++;
    worker->stamp = ++m->stamp;
    m_action (m, GW_DISPATCH_SEND, r, 0, NULL);
}

static void
m_queue_insert (model_t *m, int service, size_t at, int r, int64_t now)
{
    m_service_t *s = &m->services[service];
    memmove (s->queue + at + 1, s->queue + at, (s->queued - at) * sizeof (int));
    s->queue[at] = r;
    s->queued++;
    m->reqs[r].state = M_QUEUED;
    m->reqs[r].service = service;
    m->reqs[r].queued_at = now;
}

static void
m_queue_remove (model_t *m, int service, size_t at)
{
    m_service_t *s = &m->services[service];
    memmove (s->queue + at, s->queue + at + 1, (s->queued - at - 1) * sizeof (int));
    s->queued--;
}

static void
m_serve (model_t *m, int service, int64_t now)
{
    m_service_t *s = &m->services[service];
    while (s->queued > 0) {
        int w = m_choose (m, service);
        if (w < 0)
            break;
        int r = s->queue[0];
        m_queue_remove (m, service, 0);
        if (m_expired (&m->reqs[r], now))
            m_final (m, r, 504, "deadline_exceeded");
        else
            m_dispatch (m, r, w);
    }
}

static void
m_place (model_t *m, int r, int service, int64_t now)
{
    m_req_t *req = &m->reqs[r];
    req->service = service;
    if (m_expired (req, now)) {
        m_final (m, r, 504, "deadline_exceeded");
        return;
    }
    int w = m_choose (m, service);
    if (w >= 0)
        m_dispatch (m, r, w);
    else if (m->services[service].queued >= m->queue_max)
        m_final (m, r, 503, "queue_full");
    else
        m_queue_insert (m, service, m->services[service].queued, r, now);
}

static void
m_worker_remove (model_t *m, int w, int64_t now)
{
    m_worker_t *worker = &m->workers[w];
    int service = worker->service;
    worker->alive = false;
    if (m_alive_count (m, service) == 0)
        m->services[service].empty_since = now;
    //  Its requests, oldest dispatched first (a linear scan per pick).
    size_t at = 0;
    uint64_t last = 0;
    while (true) {
        int pick = -1;
        for (size_t r = 0; r < m->req_count; r++) {
            m_req_t *req = &m->reqs[r];
            if (req->state == M_DISPATCHED && req->worker == w && req->order > last &&
                (pick < 0 || req->order < m->reqs[pick].order))
                pick = (int)r;
        }
        if (pick < 0)
            break;
        m_req_t *req = &m->reqs[pick];
        last = req->order;
        worker->in_flight--;
        bool retry = worker->idempotent && !req->partial;
        if (req->cancelled)
            m_release (req);
        else if (retry && !m_expired (req, now) &&
            m->services[service].queued < m->queue_max) {
            m_queue_insert (m, service, at++, pick, now);
        }
        else {
            req->worker = -1;
            if (retry && m_expired (req, now))
                m_final (m, pick, 504, "deadline_exceeded");
            else if (retry)
                m_final (m, pick, 503, "queue_full");
            else
                m_final (m, pick, 502, "worker_lost");
        }
    }
    assert (worker->in_flight == 0);
    m_serve (m, service, now);
}

static void
m_tick (model_t *m, int64_t now)
{
    for (int service = 0; service < M_SERVICES; service++) {
        m_service_t *s = &m->services[service];
        bool empty = m_alive_count (m, service) == 0;
        size_t at = 0;
        while (at < s->queued) {
            int r = s->queue[at];
            m_req_t *req = &m->reqs[r];
            int64_t since =
                req->queued_at > s->empty_since ? req->queued_at : s->empty_since;
            if (m_expired (req, now)) {
                m_queue_remove (m, service, at);
                m_final (m, r, 504, "deadline_exceeded");
            }
            else if (empty && now >= since + m->grace) {
                m_queue_remove (m, service, at);
                m_final (m, r, 503, "no_worker");
            }
            else
                at++;
        }
    }
}

//  Cancel request r (active, of its client). Returns true if it counts as
//  the request's end.
static bool
m_cancel (model_t *m, int r, uint16_t reason)
{
    m_req_t *req = &m->reqs[r];
    if (req->state == M_QUEUED) {
        m_service_t *s = &m->services[req->service];
        for (size_t at = 0; at < s->queued; at++)
            if (s->queue[at] == r) {
                m_queue_remove (m, req->service, at);
                break;
            }
        m_release (req);
        return true;
    }
    if (!req->cancelled) {
        req->cancelled = true;
        m_action (m, GW_DISPATCH_CANCEL, r, reason, NULL);
        return true;
    }
    return false;
}

//  --------------------------------------------------------------------------
//  The differential driver.

static uint64_t s_t_state;
static bool s_t_trace;  //  AIGW_TRACE=1 prints every step

static uint32_t
s_t_rand (uint32_t bound)
{
    //  xorshift64*
    s_t_state ^= s_t_state >> 12;
    s_t_state ^= s_t_state << 25;
    s_t_state ^= s_t_state >> 27;
    return (uint32_t)((s_t_state * 2685821657736338717ULL) >> 32) % bound;
}

static int
s_t_action_compare (const void *a, const void *b)
{
    const m_action_t *x = (const m_action_t *)a, *y = (const m_action_t *)b;
    if (x->rid != y->rid)
        return x->rid < y->rid ? -1 : 1;
    if (x->type != y->type)
        return x->type < y->type ? -1 : 1;
    return x->worker - y->worker;
}

static int
s_t_service_index (const char *name)
{
    for (int i = 0; i < M_SERVICES; i++)
        if (streq (name, s_m_names[i]))
            return i;
    return -1;
}

#define T_CLIENT(c) T_HANDLE (1 + (c))
#define T_WORKER(w) T_HANDLE (1001 + (w))

//  Compare the dispatcher's actions of the last operation with the model's,
//  and count request ends. Returns false (after printing) on a mismatch.
static bool
s_t_compare (gw_dispatch_t *dispatch, model_t *m, uint64_t step)
{
    static m_action_t got[4096];
    gw_dispatch_action_t *actions;
    size_t count = gw_dispatch_actions (dispatch, &actions);
    bool ok = count == m->action_count;
    for (size_t i = 0; ok && i < count; i++) {
        gw_dispatch_action_t *a = &actions[i];
        m_action_t *g = &got[i];
        g->type = a->type;
        g->rid = s_t_rid_index (a->rid);
        g->client = (int)((uintptr_t)a->client - 1);
        g->worker = a->worker ? (int)((uintptr_t)a->worker - 1001) : -1;
        g->status = a->status;
        g->code = a->code;
        g->payload = a->payload;
        g->service = s_t_service_index (a->service);
    }
    if (ok) {
        qsort (got, count, sizeof (m_action_t), s_t_action_compare);
        qsort (m->actions, count, sizeof (m_action_t), s_t_action_compare);
    }
    for (size_t i = 0; ok && i < count; i++) {
        m_action_t *g = &got[i], *e = &m->actions[i];
        if (g->type != e->type || g->rid != e->rid || g->client != e->client ||
            g->worker != e->worker || g->status != e->status ||
            g->payload != e->payload || g->service != e->service ||
            (g->code == NULL) != (e->code == NULL) ||
            (g->code && strcmp (g->code, e->code)))
            ok = false;
    }
    if (!ok) {
        printf ("gw_dispatch: step %" PRIu64 ": outcome differs\n", step);
        for (size_t i = 0; i < count; i++)
            printf ("  got      type=%d rid=%u client=%d worker=%d status=%u\n",
                actions[i].type, s_t_rid_index (actions[i].rid),
                (int)((uintptr_t)actions[i].client - 1),
                actions[i].worker ? (int)((uintptr_t)actions[i].worker - 1001) : -1,
                actions[i].status);
        for (size_t i = 0; i < m->action_count; i++)
            printf ("  expected type=%d rid=%u client=%d worker=%d status=%u\n",
                m->actions[i].type, m->actions[i].rid, m->actions[i].client,
                m->actions[i].worker, m->actions[i].status);
        return false;
    }
    for (size_t i = 0; i < count; i++)
        if (got[i].type == GW_DISPATCH_FINAL)
            m->reqs[got[i].rid].ends++;
    return true;
}

//  Invariants after a step. Returns false (after printing) if one fails.
static bool
s_t_invariants (gw_dispatch_t *dispatch, model_t *m, uint64_t step)
{
    const char *broken = NULL;
    size_t active = 0, queued = 0;
    for (size_t r = 0; r < m->req_count; r++)
        if (m->reqs[r].state != M_IDLE)
            active++;
    for (int s = 0; s < M_SERVICES && !broken; s++) {
        m_service_t *service = &m->services[s];
        queued += service->queued;
        if (gw_dispatch_queued (dispatch, s_m_names[s]) != service->queued)
            broken = "queue length";
        else if (service->queued > m->queue_max)
            broken = "queue above queue_max";
        else if (gw_dispatch_workers (dispatch, s_m_names[s]) !=
            (size_t)m_alive_count (m, s))
            broken = "worker count";
        else if (service->queued > 0 && m_choose (m, s) >= 0)
            broken = "queued while credit is free";
    }
    for (int w = 0; w < M_WORKERS && !broken; w++) {
        m_worker_t *worker = &m->workers[w];
        int in_flight = gw_dispatch_in_flight (dispatch, T_WORKER (w));
        if (in_flight != (worker->alive ? (int)worker->in_flight : -1))
            broken = "worker in-flight count";
    }
    //  A dispatch never takes a worker above its capacity.
    for (size_t i = 0; i < m->action_count && !broken; i++)
        if (m->actions[i].type == GW_DISPATCH_SEND) {
            m_worker_t *worker = &m->workers[m->actions[i].worker];
            if (worker->in_flight > worker->capacity)
                broken = "in-flight above capacity";
        }
    if (!broken && gw_dispatch_size (dispatch) != active)
        broken = "in-flight map size";
    if (!broken && gw_dispatch_queued_total (dispatch) != queued)
        broken = "queued total";
    if (!broken && s_t_payloads != (int)active)
        broken = "live payloads";
    for (size_t r = 0; r < m->req_count && !broken; r++)
        if (m->reqs[r].ends > 1)
            broken = "a request ended twice";
    if (broken) {
        printf ("gw_dispatch: step %" PRIu64 ": invariant broken: %s\n", step, broken);
        return false;
    }
    return true;
}

static int
m_new_request (model_t *m)
{
    if (m->req_count == m->req_limit) {
        m->req_limit = m->req_limit ? m->req_limit * 2 : 1024;
        m->reqs = (m_req_t *)realloc (m->reqs, m->req_limit * sizeof (m_req_t));
        assert (m->reqs);
    }
    m_req_t *req = &m->reqs[m->req_count];
    memset (req, 0, sizeof (m_req_t));
    req->worker = -1;
    return (int)m->req_count++;
}

//  A random request in state (M_QUEUED, M_DISPATCHED, or -1 for either).
static int
m_pick (model_t *m, int state)
{
    size_t count = 0;
    for (size_t r = 0; r < m->req_count; r++)
        if (m->reqs[r].state != M_IDLE && (state < 0 || m->reqs[r].state == state))
            count++;
    if (count == 0)
        return -1;
    size_t nth = s_t_rand ((uint32_t)count);
    for (size_t r = 0; r < m->req_count; r++)
        if (m->reqs[r].state != M_IDLE && (state < 0 || m->reqs[r].state == state) &&
            nth-- == 0)
            return (int)r;
    return -1;
}

static int64_t
s_t_deadline (int64_t now)
{
    return s_t_rand (3) == 0 ? 0 : now + 1 + s_t_rand (400);
}

//  One round of steps random operations. Returns the number of failures.
static int
s_t_round (uint64_t steps, size_t queue_max, int64_t grace, bool verbose)
{
    model_t *m = (model_t *)zmalloc (sizeof (model_t));
    assert (m);
    m->queue_max = queue_max;
    m->grace = grace;
    for (int s = 0; s < M_SERVICES; s++) {
        m->services[s].queue =
            (int *)zmalloc (sizeof (int) * (queue_max + M_WORKERS * 8 + 1));
        assert (m->services[s].queue);
    }
    gw_dispatch_t *dispatch = gw_dispatch_new ();
    gw_dispatch_set_destructor (dispatch, s_t_payload_free);
    gw_dispatch_set_queue_max (dispatch, queue_max);
    gw_dispatch_set_grace (dispatch, grace);
    int64_t now = 1700000000000;
    uint8_t rid[16];
    int failed = 0;
    size_t counts[12] = {0};
    for (uint64_t step = 0; step < steps + 3 && !failed; step++) {
        m->action_count = 0;
        bool draining = step >= steps;
        int op = draining ? 100 : (int)s_t_rand (100);
        int rc_impl = 0, rc_model = 0;
        void *peer_impl = NULL, *peer_model = NULL;
        bool called = true;  //  false if the step found nothing to do
        if (draining && step == steps) {
            //  Drain 1: every worker leaves.
            for (int w = 0; w < M_WORKERS && !failed; w++)
                if (m->workers[w].alive) {
                    m->action_count = 0;
                    gw_dispatch_worker_remove (dispatch, T_WORKER (w), now);
                    m_worker_remove (m, w, now);
                    if (!s_t_compare (dispatch, m, step) ||
                        !s_t_invariants (dispatch, m, step))
                        failed++;
                }
            continue;
        }
        else if (draining) {
            //  Drain 2, 3: time passes beyond every grace and deadline.
            now += grace + 1000;
            gw_dispatch_tick (dispatch, now);
            m_tick (m, now);
        }
        else if (op < 8) {
            //  A worker registers (or re-registers, maybe elsewhere).
            counts[0]++;
            int w = (int)s_t_rand (M_WORKERS);
            int s = (int)s_t_rand (M_SERVICES);
            uint32_t capacity = 1 + s_t_rand (4);
            bool idempotent = s_t_rand (2);
            gw_dispatch_worker_ready (
                dispatch, T_WORKER (w), s_m_names[s], capacity, idempotent, "w", now);
            m_worker_t *worker = &m->workers[w];
            if (worker->alive && worker->service != s)
                m_worker_remove (m, w, now);
            if (!worker->alive) {
                worker->alive = true;
                worker->service = s;
                worker->in_flight = 0;
                worker->stamp = ++m->stamp;
            }
            worker->capacity = capacity;
            worker->idempotent = idempotent;
            m_serve (m, s, now);
        }
        else if (op < 12) {
            //  A worker dies (or an unknown one is removed).
            counts[1]++;
            int w = (int)s_t_rand (M_WORKERS);
            rc_impl = gw_dispatch_worker_remove (dispatch, T_WORKER (w), now);
            if (m->workers[w].alive)
                m_worker_remove (m, w, now);
            else
                rc_model = -1;
        }
        else if (op < 42) {
            //  A client REQUEST; now and then a duplicate rid.
            counts[2]++;
            int c = (int)s_t_rand (M_CLIENTS);
            int s = (int)s_t_rand (M_SERVICES);
            int64_t deadline = s_t_deadline (now);
            int dup = s_t_rand (50) == 0 ? m_pick (m, -1) : -1;
            if (dup >= 0) {
                s_t_rid (rid, (uint32_t)dup);
                void *payload = s_t_payload_new (dup, 99);
                rc_impl = gw_dispatch_request (
                    dispatch, rid, T_CLIENT (c), s_m_names[s], deadline, payload, now);
                rc_model = -1;
                s_t_payload_free (&payload);
            }
            else {
                int r = m_new_request (m);
                m_req_t *req = &m->reqs[r];
                req->client = c;
                req->deadline = deadline;
                req->accepted = true;
                req->payload = s_t_payload_new (r, 0);
                s_t_rid (rid, (uint32_t)r);
                rc_impl = gw_dispatch_request (dispatch, rid, T_CLIENT (c), s_m_names[s],
                    deadline, req->payload, now);
                req->state = M_QUEUED;  //  active while placed
                m_place (m, r, s, now);
            }
        }
        else if (op < 60) {
            //  A worker FINAL; now and then from the wrong worker.
            counts[3]++;
            int r = m_pick (m, M_DISPATCHED);
            called = r >= 0;
            if (r >= 0) {
                m_req_t *req = &m->reqs[r];
                bool wrong = s_t_rand (20) == 0;
                int w = wrong ? (req->worker + 1) % M_WORKERS : req->worker;
                s_t_rid (rid, (uint32_t)r);
                rc_impl =
                    gw_dispatch_final (dispatch, rid, T_WORKER (w), &peer_impl, now);
                if (wrong)
                    rc_model = -1;
                else {
                    m->workers[w].in_flight--;
                    rc_model = req->cancelled ? 0 : 1;
                    peer_model = T_CLIENT (req->client);
                    if (rc_impl == 1)
                        req->ends++;
                    m_release (req);
                    m_serve (m, m->workers[w].service, now);
                }
            }
        }
        else if (op < 70) {
            //  A worker FORWARDs to a random service.
            counts[4]++;
            int r = m_pick (m, M_DISPATCHED);
            called = r >= 0;
            if (r >= 0) {
                m_req_t *req = &m->reqs[r];
                int w = req->worker;
                int s = (int)s_t_rand (M_SERVICES);
                int64_t deadline = s_t_deadline (now);
                void *payload = s_t_payload_new (r, req->version + 1);
                s_t_rid (rid, (uint32_t)r);
                rc_impl = gw_dispatch_forward (
                    dispatch, rid, T_WORKER (w), s_m_names[s], deadline, payload, now);
                m->workers[w].in_flight--;
                req->version++;
                req->payload = payload;
                req->deadline = deadline;
                if (req->cancelled)
                    m_release (req);
                m_serve (m, m->workers[w].service, now);
                if (!req->cancelled) {
                    req->state = M_QUEUED;
                    req->worker = -1;
                    m_place (m, r, s, now);
                }
            }
        }
        else if (op < 78) {
            //  A PARTIAL.
            counts[5]++;
            int r = m_pick (m, M_DISPATCHED);
            called = r >= 0;
            if (r >= 0) {
                m_req_t *req = &m->reqs[r];
                s_t_rid (rid, (uint32_t)r);
                rc_impl = gw_dispatch_partial (
                    dispatch, rid, T_WORKER (req->worker), &peer_impl);
                if (req->cancelled)
                    rc_model = 0;
                else {
                    req->partial = true;
                    rc_model = 1;
                    peer_model = T_CLIENT (req->client);
                }
            }
        }
        else if (op < 84) {
            //  A CANCEL; now and then from the wrong client.
            counts[6]++;
            int r = m_pick (m, -1);
            called = r >= 0;
            if (r >= 0) {
                m_req_t *req = &m->reqs[r];
                bool wrong = s_t_rand (10) == 0;
                int c = wrong ? (req->client + 1) % M_CLIENTS : req->client;
                s_t_rid (rid, (uint32_t)r);
                rc_impl = gw_dispatch_cancel (dispatch, rid, T_CLIENT (c), 499);
                if (wrong)
                    rc_model = -1;
                else if (m_cancel (m, r, 499))
                    req->ends++;
            }
        }
        else if (op < 87) {
            //  A CREDIT.
            counts[7]++;
            int r = m_pick (m, -1);
            called = r >= 0;
            if (r >= 0) {
                m_req_t *req = &m->reqs[r];
                s_t_rid (rid, (uint32_t)r);
                peer_impl = gw_dispatch_credit (dispatch, rid, T_CLIENT (req->client));
                peer_model = req->state == M_DISPATCHED && !req->cancelled
                    ? T_WORKER (req->worker)
                    : NULL;
            }
        }
        else if (op < 88) {
            //  A client goes away.
            counts[8]++;
            int c = (int)s_t_rand (M_CLIENTS);
            rc_impl = (int)gw_dispatch_client_gone (dispatch, T_CLIENT (c));
            for (size_t r = 0; r < m->req_count; r++)
                if (m->reqs[r].state != M_IDLE && m->reqs[r].client == c) {
                    rc_model++;
                    if (m_cancel (m, (int)r, 499))
                        m->reqs[r].ends++;
                }
        }
        else {
            //  Time passes.
            counts[9]++;
            now += s_t_rand (3) == 0 ? s_t_rand (grace + 300) : s_t_rand (40);
            gw_dispatch_tick (dispatch, now);
            m_tick (m, now);
        }
        if (s_t_trace)
            printf (
                "step %" PRIu64 " op %d now %" PRId64 " rc %d\n", step, op, now, rc_impl);
        if (rc_impl != rc_model || peer_impl != peer_model) {
            printf ("gw_dispatch: step %" PRIu64 " op %d: returned %d/%p, model %d/%p\n",
                step, op, rc_impl, peer_impl, rc_model, peer_model);
            failed++;
        }
        else if (called &&
            (!s_t_compare (dispatch, m, step) || !s_t_invariants (dispatch, m, step)))
            failed++;
    }
    //  Everything accepted has ended exactly once, and nothing is left.
    for (size_t r = 0; r < m->req_count && !failed; r++)
        if (m->reqs[r].accepted && m->reqs[r].ends != 1) {
            printf ("gw_dispatch: request %zu ended %d times\n", r, m->reqs[r].ends);
            failed++;
        }
    if (!failed && (gw_dispatch_size (dispatch) != 0 || s_t_payloads != 0)) {
        printf ("gw_dispatch: %zu requests left after draining\n",
            gw_dispatch_size (dispatch));
        failed++;
    }
    if (verbose)
        printf (" * gw_dispatch: round queue_max=%zu grace=%" PRId64
                ": %zu requests, ops "
                "ready=%zu remove=%zu request=%zu final=%zu forward=%zu partial=%zu "
                "cancel=%zu credit=%zu gone=%zu tick=%zu\n",
            queue_max, grace, m->req_count, counts[0], counts[1], counts[2], counts[3],
            counts[4], counts[5], counts[6], counts[7], counts[8], counts[9]);
    gw_dispatch_destroy (&dispatch);
    for (int s = 0; s < M_SERVICES; s++)
        free (m->services[s].queue);
    free (m->reqs);
    free (m);
    return failed;
}

void
gw_dispatch_test (bool verbose)
{
    printf (" * gw_dispatch: ");
    s_t_scenarios (verbose);

    uint64_t seed = (uint64_t)gw_env_int ("AIGW_SEED", 0, 0, INT64_MAX);
    if (seed == 0)
        seed = (uint64_t)gw_time_us () ^ ((uint64_t)getpid () << 32);
    printf (
        "differential seed=%" PRIu64 " (AIGW_SEED=%" PRIu64 " to replay)\n", seed, seed);
    s_t_state = seed | 1;
    s_t_trace = gw_env_int ("AIGW_TRACE", 0, 0, 1) == 1;
    static const size_t queue_maxes[] = {0, 1, 3, 8, 1024};
    static const int64_t graces[] = {0, 50, 200, 1000};
    int failed = 0;
    uint64_t total = 0;
    for (int round = 0; round < 8 && !failed; round++) {
        uint64_t steps = 5000;
        failed +=
            s_t_round (steps, queue_maxes[s_t_rand (5)], graces[s_t_rand (4)], verbose);
        total += steps;
    }
    if (failed)
        printf ("gw_dispatch: differential test FAILED (seed=%" PRIu64 ")\n", seed);
    fflush (stdout);
    assert (failed == 0);
    assert (total >= 20000);
    printf (" * gw_dispatch: %" PRIu64 " random operations agree with the model: OK\n",
        total);
}
