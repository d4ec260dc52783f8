/* tracker.c -- the tracking allocator behind kvc_host.alloc/free.
 *
 * Every live allocation has a record in a pointer-keyed hash table (open
 * addressing, linear probing, backward-shift deletion, grown at 70% load).
 * The table and everything else the tracker keeps for itself come from
 * malloc and are not counted.
 *
 * Host blocks come from posix_memalign with GUARD_BYTES of a known pattern
 * right after the user's `size` bytes; free checks the pattern (n_overrun).
 * CUDA blocks come from cudaMalloc when built with KVCH_HAVE_CUDA (no guard
 * bytes: checking them would need a synchronous copy); otherwise CUDA
 * requests fail.
 *
 * A free the tracker cannot match (unknown pointer, double free) is counted
 * in n_bad_free and nothing is released. A free of a live pointer with the
 * wrong size or kind is counted in n_bad_free too, and the block is released
 * as the record says (the record knows the truth), so n_alloc == n_free +
 * live holds at all times.
 *
 * One mutex guards the table and the counters; logging happens after it is
 * released.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef KVCH_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#include "kvch.h"

#define GUARD_BYTES 64
#define TABLE_MIN 64
#define BINDING_MAGIC UINT64_C(0x6b7663682d686f73) /* "kvch-hos" */

/* One live allocation. ptr == NULL marks an empty slot. */
typedef struct record {
    void *ptr;     /* what alloc returned */
    void *base;    /* what to hand back to free()/cudaFree() */
    size_t size;   /* bytes asked for */
    uint64_t seq;  /* allocation number, for a stable leak report */
    int32_t kind;  /* KVC_MEM_* */
    int32_t usage; /* KVC_USAGE_* as given */
} record;

/* What a kvc_host's user_data points at: the tracker and a copy of the
 * logger it was filled with. Owned by the tracker, freed with it. */
typedef struct binding {
    uint64_t magic;
    kvch_tracker *t;
    int has_log;
    kvch_logger log;
    struct binding *next;
} binding;

struct kvch_tracker {
    pthread_mutex_t mu;
    record *slots;
    size_t cap; /* power of two */
    size_t count;
    kvch_tracker_stats st;
    uint64_t n_calls;   /* alloc calls ever, successful or not */
    uint64_t nth_at;    /* n_calls value whose call fails; 0 = off */
    uint64_t from_at;   /* first n_calls value that fails; 0 = off */
    binding self;       /* user_data when no logger is given */
    binding *bindings;  /* with a logger; reused when equal */
};

/* ---- guard pattern ------------------------------------------------------- */

static uint8_t guard_byte(size_t i)
{
    return (uint8_t)(0xa5u ^ (unsigned)(i * 29u));
}

static void guard_write(uint8_t *p)
{
    for (size_t i = 0; i < GUARD_BYTES; i++)
        p[i] = guard_byte(i);
}

static int guard_ok(const uint8_t *p)
{
    for (size_t i = 0; i < GUARD_BYTES; i++)
        if (p[i] != guard_byte(i))
            return 0;
    return 1;
}

/* ---- hash table ------------------------------------------------------------ */

static size_t hash_ptr(const void *p, size_t cap)
{
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    return (size_t)x & (cap - 1);
}

static record *table_find(kvch_tracker *t, const void *p)
{
    if (t->cap == 0)
        return NULL;
    for (size_t i = hash_ptr(p, t->cap);; i = (i + 1) & (t->cap - 1)) {
        if (t->slots[i].ptr == p)
            return &t->slots[i];
        if (t->slots[i].ptr == NULL)
            return NULL;
    }
}

static void table_put_nogrow(record *slots, size_t cap, const record *r)
{
    size_t i = hash_ptr(r->ptr, cap);
    while (slots[i].ptr != NULL)
        i = (i + 1) & (cap - 1);
    slots[i] = *r;
}

/* Makes room for one more record; 0 on success, -1 when out of memory. */
static int table_reserve(kvch_tracker *t)
{
    if ((t->count + 1) * 10 <= t->cap * 7)
        return 0;
    size_t ncap = t->cap ? t->cap * 2 : TABLE_MIN;
    if (ncap < t->cap)
        return -1;
    record *ns = calloc(ncap, sizeof *ns);
    if (ns == NULL)
        return -1;
    for (size_t i = 0; i < t->cap; i++)
        if (t->slots[i].ptr != NULL)
            table_put_nogrow(ns, ncap, &t->slots[i]);
    free(t->slots);
    t->slots = ns;
    t->cap = ncap;
    return 0;
}

/* Removes *r (a slot of the table), shifting later members of its probe
 * run back so that lookups never need tombstones. */
static void table_remove(kvch_tracker *t, record *r)
{
    size_t mask = t->cap - 1;
    size_t hole = (size_t)(r - t->slots);
    size_t i = hole;
    for (;;) {
        i = (i + 1) & mask;
        if (t->slots[i].ptr == NULL)
            break;
        size_t home = hash_ptr(t->slots[i].ptr, t->cap);
        /* Move slot i into the hole unless its home lies cyclically in
         * (hole, i]: then it is already reachable. */
        int reachable = hole <= i ? (home > hole && home <= i)
                                  : (home > hole || home <= i);
        if (!reachable) {
            t->slots[hole] = t->slots[i];
            hole = i;
        }
    }
    memset(&t->slots[hole], 0, sizeof t->slots[hole]);
    t->count--;
}

/* ---- logging --------------------------------------------------------------- */

static void blog(const binding *b, int32_t level, const char *fmt, ...)
{
    if (b == NULL || !b->has_log || level > b->log.level)
        return;
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    kvch_log_cb((void *)&b->log, level, msg);
}

static const char *kind_word(int32_t kind)
{
    return kind == KVC_MEM_HOST ? "host" : kind == KVC_MEM_CUDA ? "cuda" : "?";
}

static const char *usage_word(int32_t usage)
{
    switch (usage) {
    case KVC_USAGE_INSTANCE: return "instance";
    case KVC_USAGE_CACHE: return "cache";
    case KVC_USAGE_SCRATCH: return "scratch";
    default: return NULL;
    }
}

/* ---- raw memory --------------------------------------------------------------- */

/* Gets a block for kind/size/alignment; fills *base and returns the user
 * pointer, or NULL. Called without the lock held. */
static void *raw_alloc(int32_t kind, size_t size, size_t alignment, void **base)
{
    if (kind == KVC_MEM_HOST) {
        if (size > SIZE_MAX - GUARD_BYTES)
            return NULL;
        void *p = NULL;
        if (posix_memalign(&p, alignment, size + GUARD_BYTES) != 0)
            return NULL;
        guard_write((uint8_t *)p + size);
        *base = p;
        return p;
    }
#ifdef KVCH_HAVE_CUDA
    if (kind == KVC_MEM_CUDA) {
        /* cudaMalloc aligns to 256 bytes; more is had by over-allocating. */
        size_t extra = alignment > 256 ? alignment : 0;
        size_t n = size ? size : 1;
        if (n > SIZE_MAX - extra)
            return NULL;
        void *p = NULL;
        if (cudaMalloc(&p, n + extra) != cudaSuccess) {
            (void)cudaGetLastError(); /* reset the error state cudaMalloc left */
            return NULL;
        }
        uintptr_t u = ((uintptr_t)p + (alignment - 1)) & ~(uintptr_t)(alignment - 1);
        *base = p;
        return (void *)u;
    }
#endif
    (void)size;
    (void)alignment;
    (void)base;
    return NULL;
}

static void raw_free(int32_t kind, void *base)
{
    if (kind == KVC_MEM_HOST) {
        free(base);
        return;
    }
#ifdef KVCH_HAVE_CUDA
    if (kind == KVC_MEM_CUDA) {
        (void)cudaFree(base);
        (void)cudaGetLastError();
    }
#endif
}

/* ---- kvc_host callbacks ------------------------------------------------------ */

static const binding *binding_of(void *user_data)
{
    const binding *b = user_data;
    if (b == NULL || b->magic != BINDING_MAGIC || b->t == NULL)
        return NULL;
    return b;
}

static void *tracker_alloc(void *user_data, size_t size, size_t alignment,
                           int32_t mem_kind, int32_t usage)
{
    const binding *b = binding_of(user_data);
    if (b == NULL)
        return NULL; /* not a user_data of ours: nothing to count with */
    kvch_tracker *t = b->t;

    pthread_mutex_lock(&t->mu);
    uint64_t call = ++t->n_calls;
    int injected = (t->nth_at != 0 && call == t->nth_at) ||
                   (t->from_at != 0 && call >= t->from_at);
    if (t->nth_at != 0 && call >= t->nth_at)
        t->nth_at = 0; /* only that one */
    pthread_mutex_unlock(&t->mu);

    const char *why = NULL;
    if (injected)
        why = NULL; /* made on purpose: logged at debug level below */
    else if (mem_kind != KVC_MEM_HOST && mem_kind != KVC_MEM_CUDA)
        why = "unknown memory kind";
    else if (alignment < 8 || (alignment & (alignment - 1)) != 0)
        why = "alignment is not a power of two >= 8";

    void *base = NULL, *p = NULL;
    if (!injected && why == NULL) {
        p = raw_alloc(mem_kind, size, alignment, &base);
        if (p == NULL)
            why = mem_kind == KVC_MEM_CUDA
#ifdef KVCH_HAVE_CUDA
                      ? "cudaMalloc failed"
#else
                      ? "built without CUDA"
#endif
                      : "out of host memory";
    }

    pthread_mutex_lock(&t->mu);
    if (p != NULL && table_reserve(t) != 0) {
        raw_free(mem_kind, base);
        p = NULL;
        why = "out of memory for the tracker's table";
    }
    if (p == NULL) {
        t->st.n_failed++;
        pthread_mutex_unlock(&t->mu);
        if (injected)
            blog(b, KVC_LOG_DEBUG, "alloc call %" PRIu64 " of %zu bytes refused: injected failure",
                 call, size);
        else
            blog(b, KVC_LOG_WARN, "alloc of %zu bytes (%s, alignment %zu) refused: %s",
                 size, kind_word(mem_kind), alignment, why);
        return NULL;
    }
    record r = {.ptr = p, .base = base, .size = size, .seq = t->st.n_alloc,
                .kind = mem_kind, .usage = usage};
    table_put_nogrow(t->slots, t->cap, &r);
    t->count++;
    t->st.n_alloc++;
    t->st.live++;
    t->st.current[mem_kind] += size;
    if (t->st.current[mem_kind] > t->st.peak[mem_kind])
        t->st.peak[mem_kind] = t->st.current[mem_kind];
    pthread_mutex_unlock(&t->mu);
    return p;
}

static void tracker_free(void *user_data, void *ptr, size_t size, int32_t mem_kind)
{
    const binding *b = binding_of(user_data);
    if (b == NULL || ptr == NULL)
        return;
    kvch_tracker *t = b->t;

    pthread_mutex_lock(&t->mu);
    record *rp = table_find(t, ptr);
    if (rp == NULL) {
        t->st.n_bad_free++;
        pthread_mutex_unlock(&t->mu);
        blog(b, KVC_LOG_ERROR, "free of %p (%zu bytes, %s): not a live allocation "
             "(double free or foreign pointer); ignored", ptr, size, kind_word(mem_kind));
        return;
    }
    record r = *rp;
    table_remove(t, rp);
    int mismatch = r.size != size || r.kind != mem_kind;
    int overrun = r.kind == KVC_MEM_HOST && !guard_ok((const uint8_t *)r.ptr + r.size);
    if (mismatch)
        t->st.n_bad_free++;
    if (overrun)
        t->st.n_overrun++;
    t->st.n_free++;
    t->st.live--;
    t->st.current[r.kind] -= r.size;
    pthread_mutex_unlock(&t->mu);

    raw_free(r.kind, r.base);
    if (mismatch)
        blog(b, KVC_LOG_ERROR, "free of %p with %zu bytes (%s); it was allocated with "
             "%zu bytes (%s)", ptr, size, kind_word(mem_kind), r.size, kind_word(r.kind));
    if (overrun)
        blog(b, KVC_LOG_ERROR, "guard bytes after the %zu-byte block %p were overwritten",
             r.size, ptr);
}

static void tracker_log(void *user_data, int32_t level, const char *msg)
{
    const binding *b = binding_of(user_data);
    if (b != NULL && b->has_log)
        kvch_log_cb((void *)&b->log, level, msg);
}

/* ---- public ------------------------------------------------------------------- */

kvch_tracker *kvch_tracker_new(void)
{
    kvch_tracker *t = calloc(1, sizeof *t);
    if (t == NULL)
        return NULL;
    if (pthread_mutex_init(&t->mu, NULL) != 0) {
        free(t);
        return NULL;
    }
    t->self.magic = BINDING_MAGIC;
    t->self.t = t;
    return t;
}

void kvch_tracker_free(kvch_tracker *t)
{
    if (t == NULL)
        return;
    for (binding *b = t->bindings, *next; b != NULL; b = next) {
        next = b->next;
        b->magic = 0;
        free(b);
    }
    t->self.magic = 0;
    free(t->slots);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

void kvch_tracker_host(kvch_tracker *t, const kvch_logger *log, kvc_host *host)
{
    if (host == NULL)
        return;
    memset(host, 0, sizeof *host);
    host->struct_size = (uint32_t)sizeof(kvc_host);
    if (t == NULL)
        return;
    host->alloc = tracker_alloc;
    host->free = tracker_free;
    host->user_data = &t->self;
    if (log == NULL)
        return;

    /* The logger is copied, so the caller's struct need not outlive the
     * host; a binding with an equal logger is reused. */
    pthread_mutex_lock(&t->mu);
    binding *b = t->bindings;
    for (; b != NULL; b = b->next)
        if (b->log.level == log->level && b->log.out == log->out &&
            b->log.prefix == log->prefix)
            break;
    if (b == NULL) {
        b = calloc(1, sizeof *b);
        if (b != NULL) {
            b->magic = BINDING_MAGIC;
            b->t = t;
            b->has_log = 1;
            b->log = *log;
            b->next = t->bindings;
            t->bindings = b;
        }
    }
    pthread_mutex_unlock(&t->mu);
    if (b == NULL)
        return; /* out of memory: counting still works, logging is off */
    host->user_data = b;
    host->log = tracker_log;
}

void kvch_tracker_fail_nth(kvch_tracker *t, uint64_t n)
{
    if (t == NULL)
        return;
    pthread_mutex_lock(&t->mu);
    t->nth_at = n ? t->n_calls + n : 0;
    pthread_mutex_unlock(&t->mu);
}

void kvch_tracker_fail_from(kvch_tracker *t, uint64_t n)
{
    if (t == NULL)
        return;
    pthread_mutex_lock(&t->mu);
    t->from_at = n ? t->n_calls + n : 0;
    pthread_mutex_unlock(&t->mu);
}

void kvch_tracker_get(const kvch_tracker *t, kvch_tracker_stats *out)
{
    if (out == NULL)
        return;
    if (t == NULL) {
        memset(out, 0, sizeof *out);
        return;
    }
    kvch_tracker *m = (kvch_tracker *)t; /* the mutex is not part of the value */
    pthread_mutex_lock(&m->mu);
    *out = t->st;
    pthread_mutex_unlock(&m->mu);
}

void kvch_tracker_reset_peak(kvch_tracker *t)
{
    if (t == NULL)
        return;
    pthread_mutex_lock(&t->mu);
    t->st.peak[0] = t->st.current[0];
    t->st.peak[1] = t->st.current[1];
    pthread_mutex_unlock(&t->mu);
}

static int by_seq(const void *a, const void *b)
{
    const record *x = a, *y = b;
    return (x->seq > y->seq) - (x->seq < y->seq);
}

static void leak_line(FILE *f, const record *r)
{
    const char *u = usage_word(r->usage);
    char other[16];
    if (u == NULL) {
        snprintf(other, sizeof other, "%d", (int)r->usage);
        u = other;
    }
    fprintf(f, "kvch leak: %zu bytes %s usage=%s at %p (allocation #%" PRIu64 ")\n",
            r->size, kind_word(r->kind), u, r->ptr, r->seq + 1);
}

uint64_t kvch_tracker_leak_report(const kvch_tracker *t, FILE *f)
{
    if (t == NULL)
        return 0;
    kvch_tracker *m = (kvch_tracker *)t;
    pthread_mutex_lock(&m->mu);
    uint64_t live = t->st.live;
    if (f == NULL) {
        pthread_mutex_unlock(&m->mu);
        return live;
    }
    /* Oldest first; when the copy cannot be had, table order will do. */
    record *list = t->count ? malloc(t->count * sizeof *list) : NULL;
    size_t n = 0;
    for (size_t i = 0; i < t->cap; i++) {
        if (t->slots[i].ptr == NULL)
            continue;
        if (list != NULL)
            list[n++] = t->slots[i];
        else
            leak_line(f, &t->slots[i]);
    }
    if (list != NULL) {
        qsort(list, n, sizeof *list, by_seq);
        for (size_t i = 0; i < n; i++)
            leak_line(f, &list[i]);
        free(list);
    }
    fprintf(f, "kvch leak report: %" PRIu64 " live allocation%s, %" PRIu64
            " bytes host, %" PRIu64 " bytes cuda\n",
            live, live == 1 ? "" : "s", t->st.current[KVC_MEM_HOST],
            t->st.current[KVC_MEM_CUDA]);
    pthread_mutex_unlock(&m->mu);
    return live;
}
