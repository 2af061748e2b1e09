/* The notification queue: configuration, handles with generations, notify,
 * sequence numbers, memory accounting, stats and dump. Waits are in wait.c,
 * subscriptions in sub.c, ports in port.c; queue.h has the shared structures
 * and the lock order.
 *
 * The path of one notification (nq_notify):
 *   slot = chunks[index(h) / 64] + index % 64   one acquire load
 *   lock(slot); check live && gen        a stale handle stops here: NQ_EBADH
 *   last_arg = arg; seq++
 *   each subscription: push (full -> drop per policy, counted)
 *   each pending wait: complete with arg, onto a private done list
 *   unlock(slot)
 *   run the wakers collected above       outside every lock
 * A handle with no waiters and no subscribers costs the load, the lock, two
 * stores and the unlock: no allocation, no syscall, no shared counter.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/queue.h"

#define NQ__DEF_HANDLES 65536u
#define NQ__DEF_WAITERS 256u
#define NQ__DEF_SUBS 64u
#define NQ__DEF_CAPACITY 1024u
#define NQ__DEF_MAX_CAPACITY (1u << 20)
#define NQ__DEF_MEMORY ((size_t)256 << 20)

void nq_config_init(nq_config_t *cfg) {
    if (cfg == NULL)
        return;
    memset(cfg, 0, sizeof(*cfg));
    cfg->max_handles = NQ__DEF_HANDLES;
    cfg->max_waiters_per_handle = NQ__DEF_WAITERS;
    cfg->max_subscribers_per_handle = NQ__DEF_SUBS;
    cfg->default_capacity = NQ__DEF_CAPACITY;
    cfg->memory_limit = NQ__DEF_MEMORY;
    cfg->max_capacity = NQ__DEF_MAX_CAPACITY;
}

static uint32_t nq__nchunks(uint32_t max_handles) {
    return (max_handles + NQ__CHUNK_SLOTS - 1) >> NQ__CHUNK_SHIFT;
}

/* Slots in chunk c: NQ__CHUNK_SLOTS, or what is left of max_handles. */
static inline uint32_t nq__chunk_slots(const nq_queue_t *q, uint32_t c) {
    uint32_t n = q->cfg.max_handles - (c << NQ__CHUNK_SHIFT);
    return n > NQ__CHUNK_SLOTS ? NQ__CHUNK_SLOTS : n;
}

/* Bytes of chunk c as allocated (and charged): its slots' hot and cold
 * parts, rounded up to a cache line by nq__aligned_alloc. */
static size_t nq__chunk_bytes(const nq_queue_t *q, uint32_t c) {
    size_t b = (size_t)nq__chunk_slots(q, c) * (sizeof(nq__hslot_t) + sizeof(nq__hcold_t));
    return (b + NQ__CACHELINE - 1) & ~(size_t)(NQ__CACHELINE - 1);
}

/* 0 = derived: what the limits can use at most, saturated. */
static size_t nq__derived_memory(const nq_config_t *c) {
    double per_handle = (double)sizeof(nq__hslot_t) + sizeof(nq__hcold_t) + NQ__HINT_MAX +
                        (double)c->max_waiters_per_handle * sizeof(struct nq_wait) +
                        (double)c->max_subscribers_per_handle *
                            (sizeof(struct nq_sub) + sizeof(nq__sub_px_t) + NQ__HINT_MAX +
                             sizeof(void *) + (double)c->default_capacity * sizeof(int64_t));
    /* Every subscription counted as a port one (its port part included),
     * and the queue itself, which nq_queue_new charges too. */
    double total = (double)sizeof(nq_queue_t) + (double)c->max_handles * per_handle +
                   (double)nq__nchunks(c->max_handles) * (sizeof(void *) + NQ__CACHELINE);
    return total >= (double)SIZE_MAX ? SIZE_MAX : (size_t)total;
}

int nq_queue_new(const nq_config_t *cfg, nq_queue_t **out) {
    nq_config_t c;
    if (out == NULL)
        return NQ_EINVAL;
    *out = NULL;
    if (cfg == NULL)
        nq_config_init(&c);
    else
        c = *cfg;
    if (c.max_capacity == 0) /* a caller that zeroed the struct by hand */
        c.max_capacity = NQ__DEF_MAX_CAPACITY;
    if (c.max_handles == 0 || c.max_handles > NQ__MAX_HANDLES ||
        c.max_waiters_per_handle == 0 || c.max_waiters_per_handle > NQ__MAX_WAITERS ||
        c.max_subscribers_per_handle == 0 || c.max_subscribers_per_handle > NQ__MAX_SUBS ||
        c.max_capacity > NQ__MAX_CAPACITY || c.default_capacity == 0 ||
        c.default_capacity > c.max_capacity)
        return NQ_EINVAL;
    if (c.memory_limit == 0)
        c.memory_limit = nq__derived_memory(&c);

    size_t table_sz = (size_t)nq__nchunks(c.max_handles) * sizeof(*((nq_queue_t *)0)->chunks);
    if (sizeof(nq_queue_t) + table_sz > c.memory_limit)
        return NQ_ENOMEM;
    nq_queue_t *q = nq__aligned_alloc(NQ__CACHELINE, sizeof(*q));
    if (q == NULL)
        return NQ_ENOMEM;
    memset(q, 0, sizeof(*q));
    q->chunks = nq__calloc(nq__nchunks(c.max_handles), sizeof(*q->chunks));
    if (q->chunks == NULL) {
        nq__free(q);
        return NQ_ENOMEM;
    }
    if (pthread_mutex_init(&q->lock, NULL) != 0) {
        nq__free(q->chunks);
        nq__free(q);
        return NQ_ESYS;
    }
    q->cfg = c;
    q->gen_mask = UINT32_MAX;
    atomic_init(&q->bytes, sizeof(*q) + table_sz);
    atomic_init(&q->refs, 1);
    *out = q;
    return 0;
}

/* --- memory accounting -------------------------------------------------- */

int nq__mem_reserve(nq_queue_t *q, size_t n) {
    /* Relaxed: the counter only bounds memory, it orders nothing. */
    size_t old = atomic_fetch_add_explicit(&q->bytes, n, memory_order_relaxed);
    if (old + n > q->cfg.memory_limit || old + n < old) {
        atomic_fetch_sub_explicit(&q->bytes, n, memory_order_relaxed);
        return NQ_ENOMEM;
    }
    return 0;
}

void nq__mem_release(nq_queue_t *q, size_t n) {
    atomic_fetch_sub_explicit(&q->bytes, n, memory_order_relaxed);
}

char *nq__hint_dup(nq_queue_t *q, const char *hint, size_t *charged) {
    *charged = 0;
    if (hint == NULL || hint[0] == '\0')
        return NULL;
    size_t n = strnlen(hint, NQ__HINT_MAX - 1);
    if (nq__mem_reserve(q, n + 1) < 0)
        return NULL;
    char *s = nq__malloc(n + 1);
    if (s == NULL) {
        nq__mem_release(q, n + 1);
        return NULL;
    }
    memcpy(s, hint, n);
    s[n] = '\0';
    *charged = n + 1;
    return s;
}

void nq__hint_free(nq_queue_t *q, char *hint) {
    if (hint == NULL)
        return;
    nq__mem_release(q, strlen(hint) + 1);
    nq__free(hint);
}

/* --- handles ------------------------------------------------------------ */

#define NQ__H_INDEX(h) ((uint32_t)(h))
#define NQ__H_GEN(h) ((uint32_t)((h) >> 32))
#define NQ__HANDLE(index, gen) (((uint64_t)(gen) << 32) | ((uint64_t)(index) + 1))

/* The slot of index, or NULL if its chunk is not allocated yet. */
nq__hslot_t *nq__slot_at(nq_queue_t *q, uint32_t index) {
    /* Acquire pairs with the release store that published the chunk in
     * nq__chunk_new: its slots' locks and fields are initialised before we
     * see it. */
    nq__hslot_t *c = atomic_load_explicit(&q->chunks[index >> NQ__CHUNK_SHIFT], memory_order_acquire);
    return NQ__LIKELY(c != NULL) ? c + (index & (NQ__CHUNK_SLOTS - 1)) : NULL;
}

nq__hcold_t *nq__slot_cold(nq_queue_t *q, uint32_t index) {
    uint32_t c = index >> NQ__CHUNK_SHIFT;
    /* Relaxed: the caller found the hot part, which ordered the chunk's
     * initialisation before it (acquire in nq__slot_at). */
    nq__hslot_t *hot = atomic_load_explicit(&q->chunks[c], memory_order_relaxed);
    return (nq__hcold_t *)(hot + nq__chunk_slots(q, c)) + (index & (NQ__CHUNK_SLOTS - 1));
}

/* Under q->lock: allocates, charges and publishes chunk c. Its slots are
 * free (not live, generation 0) until nq_register hands them out in order. */
static int nq__chunk_new(nq_queue_t *q, uint32_t c) {
    size_t bytes = nq__chunk_bytes(q, c);
    if (nq__mem_reserve(q, bytes) < 0)
        return NQ_ENOMEM;
    nq__hslot_t *slots = nq__aligned_alloc(NQ__CACHELINE, bytes);
    if (slots == NULL) {
        nq__mem_release(q, bytes);
        return NQ_ENOMEM;
    }
    memset(slots, 0, bytes);
    for (size_t i = 0; i < nq__chunk_slots(q, c); i++) {
        nq__lock_init(&slots[i].lock);
        atomic_init(&slots[i].seq, 0);
    }
    /* Release pairs with the acquire in nq__slot_at. */
    atomic_store_explicit(&q->chunks[c], slots, memory_order_release);
    return 0;
}

/* Locks the slot of a live handle h; NULL with *err = NQ_EBADH otherwise. */
static inline nq__hslot_t *nq__slot_lock_as(nq_queue_t *q, nq_handle_t h, int *err, int polite) {
    uint32_t idx = NQ__H_INDEX(h);
    if (NQ__UNLIKELY(idx == 0 || idx > q->cfg.max_handles)) {
        *err = NQ_EBADH;
        return NULL;
    }
    nq__hslot_t *s = nq__slot_at(q, idx - 1);
    if (NQ__UNLIKELY(s == NULL)) {
        *err = NQ_EBADH;
        return NULL;
    }
    if (polite)
        nq__lock_polite(&s->lock);
    else
        nq__lock(&s->lock);
    if (NQ__UNLIKELY(!s->live || s->gen != NQ__H_GEN(h))) {
        nq__unlock(&s->lock);
        *err = NQ_EBADH;
        return NULL;
    }
    return s;
}

nq__hslot_t *nq__slot_lock(nq_queue_t *q, nq_handle_t h, int *err) {
    return nq__slot_lock_as(q, h, err, 0);
}

/* Test hook: generations wrap within `bits` bits (1..32), so a test can
 * exhaust a slot's generations quickly. Call before the first register. */
int nq__queue_set_gen_bits(nq_queue_t *q, unsigned bits) {
    if (q == NULL || bits == 0 || bits > 32)
        return NQ_EINVAL;
    q->gen_mask = bits == 32 ? UINT32_MAX : (1u << bits) - 1;
    return 0;
}

int nq_register(nq_queue_t *q, const char *debug_hint, nq_handle_t *out) {
    if (q == NULL || out == NULL)
        return NQ_EINVAL;
    *out = 0;
    if (atomic_load_explicit(&q->closing, memory_order_relaxed))
        return NQ_ECLOSED;

    size_t charged;
    char *hint = nq__hint_dup(q, debug_hint, &charged);
    if (debug_hint != NULL && debug_hint[0] != '\0' && hint == NULL)
        return NQ_ENOMEM;

    pthread_mutex_lock(&q->lock);
    nq__hslot_t *s;
    uint32_t idx;
    int rc = 0;
    if (q->live >= q->cfg.max_handles) {
        rc = NQ_ELIMIT;
    } else if (q->free_head != 0) {
        idx = q->free_head - 1;
        s = nq__slot_at(q, idx);
        q->free_head = s->next_free;
    } else if (q->used < q->cfg.max_handles) {
        /* The first slot of a chunk: the chunk is allocated now. */
        if ((q->used & (NQ__CHUNK_SLOTS - 1)) == 0)
            rc = nq__chunk_new(q, q->used >> NQ__CHUNK_SHIFT);
        if (rc == 0) {
            idx = q->used++;
            s = nq__slot_at(q, idx);
        }
    } else {
        rc = NQ_ELIMIT; /* every slot is live or retired */
    }
    if (rc < 0) {
        pthread_mutex_unlock(&q->lock);
        nq__hint_free(q, hint);
        return rc;
    }
    nq__lock(&s->lock);
    s->gen = (s->gen + 1) & q->gen_mask; /* never 0 here: see nq_unregister */
    if (s->gen == 0)
        s->gen = 1;
    s->live = 1;
    s->last_arg = 0;
    atomic_store_explicit(&s->seq, 0, memory_order_relaxed);
    nq__slot_cold(q, idx)->hint = hint;
    *out = NQ__HANDLE(idx, s->gen);
    nq__unlock(&s->lock);
    q->live++;
    pthread_mutex_unlock(&q->lock);
    return 0;
}

int nq_unregister(nq_queue_t *q, nq_handle_t h) {
    if (q == NULL)
        return NQ_EINVAL;
    int err;
    pthread_mutex_lock(&q->lock);
    nq__hslot_t *s = nq__slot_lock(q, h, &err);
    if (s == NULL) {
        pthread_mutex_unlock(&q->lock);
        return err;
    }
    nq__hcold_t *cold = nq__slot_cold(q, NQ__H_INDEX(h) - 1);
    nq_wait_t *done = NULL;
    nq_sub_t *wake[NQ__MAX_SUBS];
    unsigned nwake = 0;

    s->live = 0;
    while (cold->waiters != NULL)
        nq__wait_complete_locked(cold->waiters, NQ_ECLOSED, 0, &done);
    for (unsigned i = 0; i < s->nsubs; i++) {
        nq_sub_t *w = NULL;
        nq__sub_close_locked(cold->subs[i], &w);
        if (w != NULL)
            wake[nwake++] = w;
    }
    s->nsubs = 0;
    atomic_fetch_add_explicit(&q->notifies_gone,
                              atomic_load_explicit(&s->seq, memory_order_relaxed),
                              memory_order_relaxed);
    char *hint = cold->hint;
    cold->hint = NULL;
    /* A slot whose next generation would wrap is retired for good, so no
     * handle value is ever issued twice for it. */
    if (((s->gen + 1) & q->gen_mask) == 0 || s->gen == q->gen_mask) {
        s->retired = 1;
        q->retired++;
    } else {
        s->next_free = q->free_head;
        q->free_head = NQ__H_INDEX(h);
    }
    nq__unlock(&s->lock);
    q->live--;
    pthread_mutex_unlock(&q->lock);

    nq__hint_free(q, hint);
    nq__wait_run_wakers(done);
    for (unsigned i = 0; i < nwake; i++)
        nq__sub_run_waker(wake[i]);
    return 0;
}

int nq_notify(nq_queue_t *q, nq_handle_t h, int64_t arg) {
    if (NQ__UNLIKELY(q == NULL))
        return NQ_EINVAL;
    int err;
    /* Polite: a consumer waiting for this slot gets the next turn. */
    nq__hslot_t *s = nq__slot_lock_as(q, h, &err, 1);
    if (NQ__UNLIKELY(s == NULL))
        return err;

    int reached = 0;
    s->last_arg = arg;
    /* Relaxed: seq is only written under the slot lock; lock-free readers
     * (none yet) would need no ordering with the rest of the slot. */
    atomic_store_explicit(&s->seq, atomic_load_explicit(&s->seq, memory_order_relaxed) + 1,
                          memory_order_relaxed);

    if (NQ__LIKELY(s->nsubs == 0 && s->nwaiters == 0)) { /* the slot's first 32 bytes */
        nq__unlock(&s->lock);
        return 0;
    }

    nq__hcold_t *cold = nq__slot_cold(q, NQ__H_INDEX(h) - 1);
    nq_sub_t *wake[NQ__MAX_SUBS];
    unsigned nwake = 0;
    for (unsigned i = 0; i < s->nsubs; i++) {
        nq_sub_t *w = NULL;
        reached += nq__sub_push_locked(cold->subs[i], arg, &w);
        if (w != NULL)
            wake[nwake++] = w;
    }
    nq_wait_t *done = NULL;
    uint64_t seq = atomic_load_explicit(&s->seq, memory_order_relaxed);
    for (nq_wait_t *w = cold->waiters, *next; w != NULL; w = next) {
        next = w->next;
        if (w->after < seq) { /* the first notification numbered after `after` */
            nq__wait_complete_locked(w, 0, arg, &done);
            reached++;
        }
    }
    nq__unlock(&s->lock);

    nq__wait_run_wakers(done);
    for (unsigned i = 0; i < nwake; i++)
        nq__sub_run_waker(wake[i]);
    return reached;
}

int nq_seq(nq_queue_t *q, nq_handle_t h, uint64_t *seq) {
    if (q == NULL || seq == NULL)
        return NQ_EINVAL;
    int err;
    nq__hslot_t *s = nq__slot_lock(q, h, &err);
    if (s == NULL)
        return err;
    *seq = atomic_load_explicit(&s->seq, memory_order_relaxed);
    nq__unlock(&s->lock);
    return 0;
}

/* --- lifetime ----------------------------------------------------------- */

static void nq__queue_destroy(nq_queue_t *q) {
    for (uint32_t i = 0; i < q->used; i++)
        nq__free(nq__slot_cold(q, i)->subs);
    /* Relaxed: the last unref (acq_rel) ordered every publication before us. */
    for (uint32_t c = 0; c < nq__nchunks(q->cfg.max_handles); c++)
        nq__free(atomic_load_explicit(&q->chunks[c], memory_order_relaxed));
    pthread_mutex_destroy(&q->lock);
    nq__free(q->chunks);
    nq__free(q);
}

/* Drops one reference; the last frees the queue. Acq_rel: every access a
 * releasing wait or subscription made happens-before the free. */
void nq__queue_unref(nq_queue_t *q) {
    if (atomic_fetch_sub_explicit(&q->refs, 1, memory_order_acq_rel) == 1)
        nq__queue_destroy(q);
}

void nq_queue_free(nq_queue_t *q) {
    if (q == NULL)
        return;
    if (atomic_exchange_explicit(&q->closing, 1, memory_order_relaxed))
        return; /* a second free of the same queue: ignore it */
    for (uint32_t i = 0; i < q->cfg.max_handles && i < q->used; i++) {
        nq__hslot_t *s = nq__slot_at(q, i);
        nq_handle_t h = 0;
        nq__lock(&s->lock);
        if (s->live)
            h = NQ__HANDLE(i, s->gen);
        nq__unlock(&s->lock);
        if (h != 0)
            nq_unregister(q, h);
    }
    nq__queue_unref(q);
}

/* --- observability ------------------------------------------------------ */

int nq_queue_stats(const nq_queue_t *cq, nq_stats_t *out) {
    if (cq == NULL || out == NULL)
        return NQ_EINVAL;
    nq_queue_t *q = (nq_queue_t *)cq; /* locks are taken; nothing is changed */
    memset(out, 0, sizeof(*out));
    /* Relaxed everywhere: counters, each exact, read at slightly different
     * instants while producers run. */
    pthread_mutex_lock(&q->lock); /* handles and subscriptions leave under it */
    uint64_t notifies = atomic_load_explicit(&q->notifies_gone, memory_order_relaxed);
    uint64_t drops = atomic_load_explicit(&q->drops_gone, memory_order_relaxed);
    uint64_t stored = atomic_load_explicit(&q->stored_gone, memory_order_relaxed);
    for (uint32_t i = 0; i < q->used; i++) {
        nq__hslot_t *s = nq__slot_at(q, i);
        nq__lock(&s->lock);
        if (s->live) {
            notifies += atomic_load_explicit(&s->seq, memory_order_relaxed);
            out->waits_pending += s->nwaiters;
        }
        nq__hcold_t *cold = nq__slot_cold(q, i);
        for (unsigned j = 0; j < s->nsubs; j++) {
            drops += atomic_load_explicit(&cold->subs[j]->dropped, memory_order_relaxed);
            stored += atomic_load_explicit(&cold->subs[j]->stored, memory_order_relaxed);
        }
        nq__unlock(&s->lock);
    }
    out->live_handles = q->live;
    out->retired_slots = q->retired;
    pthread_mutex_unlock(&q->lock);
    out->notifies = notifies;
    out->drops = drops;
    out->waits_completed = atomic_load_explicit(&q->waits_completed, memory_order_relaxed);
    out->waits_closed = atomic_load_explicit(&q->waits_closed, memory_order_relaxed);
    out->waits_timed_out = atomic_load_explicit(&q->waits_timed_out, memory_order_relaxed);
    out->waits_cancelled = atomic_load_explicit(&q->waits_cancelled, memory_order_relaxed);
    out->deliveries = out->waits_completed + stored;
    out->live_waits = atomic_load_explicit(&q->live_waits, memory_order_relaxed);
    out->live_subs = atomic_load_explicit(&q->live_subs, memory_order_relaxed);
    out->bytes_held = atomic_load_explicit(&q->bytes, memory_order_relaxed);
    out->memory_limit = q->cfg.memory_limit;
    return 0;
}

int nq_queue_dump(const nq_queue_t *cq, FILE *f) {
    if (cq == NULL || f == NULL)
        return NQ_EINVAL;
    nq_queue_t *q = (nq_queue_t *)cq;
    nq_stats_t st;
    nq_queue_stats(q, &st);
    fprintf(f, "nq queue %p: %" PRIu32 " live handles, %zu of %zu bytes held\n", (void *)q,
            st.live_handles, st.bytes_held, st.memory_limit);
    pthread_mutex_lock(&q->lock);
    for (uint32_t i = 0; i < q->used; i++) {
        nq__hslot_t *s = nq__slot_at(q, i);
        nq__hcold_t *cold = nq__slot_cold(q, i);
        nq__lock(&s->lock);
        if (!s->live) {
            nq__unlock(&s->lock);
            continue;
        }
        fprintf(f, "  handle %#" PRIx64 " \"%s\": seq %" PRIu64 ", %" PRIu32 " waiters, %u subscribers\n",
                NQ__HANDLE(i, s->gen), cold->hint ? cold->hint : "", 
                atomic_load_explicit(&s->seq, memory_order_relaxed), s->nwaiters,
                (unsigned)s->nsubs);
        for (nq_wait_t *w = cold->waiters; w != NULL; w = w->next)
            fprintf(f, "    wait %p (%s)\n", (void *)w,
                    w->kind == NQ__WK_PORT ? "port" : w->kind == NQ__WK_THREAD ? "thread" : "waker");
        for (unsigned j = 0; j < s->nsubs; j++) {
            nq_sub_t *sub = cold->subs[j];
            nq__lock(&sub->lock);
            fprintf(f, "    sub \"%s\": depth %" PRIu32 "/%" PRIu32 ", dropped %" PRIu64 ", %s\n",
                    sub->hint ? sub->hint : "", sub->count, sub->capacity,
                    atomic_load_explicit(&sub->dropped, memory_order_relaxed),
                    sub->overflow == NQ_DROP_OLDEST ? "drop-oldest" : "drop-newest");
            nq__unlock(&sub->lock);
        }
        nq__unlock(&s->lock);
    }
    pthread_mutex_unlock(&q->lock);
    return ferror(f) ? NQ_ESYS : 0;
}
