/* Bounded subscriptions: every notification on a handle, up to `capacity`
 * unread args, with exact drop accounting.
 *
 * The ring holds exactly `capacity` args (no rounding): stored + dropped ==
 * notifications sent to the subscription, and delivered + held == stored.
 * Producers push under the handle slot's lock and the subscription's lock;
 * receivers pop under the subscription's lock only, so a receiver never
 * blocks a producer of another handle, and a full subscription costs its
 * producers one comparison and a counter.
 *
 * Wake-up protocol of a blocked nq_sub_recv (park.h draws it):
 *   producer (push)                          receiver (nq_sub_recv)
 *   ready |= 1 on empty -> non-empty         park_prepare           (seq_cst, P)
 *            (seq_cst, W), under lock        ready != 0 ?           (seq_cst, L)
 *   unlock; nq__park_wake                      yes: cancel park; pop
 *                                              no:  futex_wait until deadline
 * The user's waker is called on the same transitions (empty -> non-empty, and
 * closed), after every lock is released.
 *
 * Invariant of `ready`, on which the lock-free empty receive rests
 * (nq__sub_idle): DATA is set, under the lock, by the push that makes the
 * ring non-empty and cleared, under the lock, only by the pop that empties
 * it; CLOSED is set on every close and never cleared. So outside the lock
 * ready == 0 exactly when the ring is empty and the subscription open.
 */
#include <sched.h>
#include <string.h>

#include "core/queue.h"

#define NQ__READY_DATA 1u
#define NQ__READY_CLOSED 2u

/* What a subscription allocates (queue.h: struct nq_sub): the struct, with
 * the port part for a port subscription, and the ring. */
static size_t nq__sub_bytes(uint32_t capacity, int port) {
    return sizeof(nq_sub_t) + (size_t)capacity * sizeof(int64_t) +
           (port ? sizeof(nq__sub_px_t) : 0);
}

int nq__sub_new(nq_queue_t *q, nq_handle_t h, const nq_sub_opts_t *opts,
                const nq__sub_port_t *pp, nq_sub_t **out) {
    nq_sub_opts_t o;
    if (opts != NULL)
        o = *opts;
    else
        memset(&o, 0, sizeof(o));
    if (o.overflow != NQ_DROP_NEWEST && o.overflow != NQ_DROP_OLDEST)
        return NQ_EINVAL;
    uint32_t cap = o.capacity ? o.capacity : q->cfg.default_capacity;
    if (cap > q->cfg.max_capacity)
        return NQ_EINVAL;

    size_t bytes = nq__sub_bytes(cap, pp != NULL);
    if (nq__mem_reserve(q, bytes) < 0)
        return NQ_ENOMEM;
    nq_sub_t *s = nq__calloc(1, sizeof(*s) + (pp != NULL ? sizeof(nq__sub_px_t) : 0));
    int64_t *ring = nq__malloc((size_t)cap * sizeof(int64_t));
    size_t hint_bytes = 0;
    char *hint = nq__hint_dup(q, o.debug_hint, &hint_bytes);
    int rc = 0;
    if (s == NULL || ring == NULL ||
        (o.debug_hint != NULL && o.debug_hint[0] != '\0' && hint == NULL)) {
        rc = NQ_ENOMEM;
        goto fail;
    }
    s->q = q;
    s->capacity = cap;
    s->overflow = (uint8_t)o.overflow;
    s->waker = o.waker;
    s->ring = ring;
    s->hint = hint;
    if (pp != NULL) {
        s->port_sub = 1;
        nq__sub_px_t *px = nq__sub_px(s);
        atomic_init(&px->port, pp->port);
        px->token = pp->token;
        px->cb = pp->cb;
        px->data = pp->data;
        px->owned = pp->owned;
    }
    atomic_init(&s->ready, 0);
    atomic_init(&s->receiving, 0);
    atomic_init(&s->inflight, 0);
    atomic_init(&s->dropped, 0);
    atomic_init(&s->stored, 0);
    nq__lock_init(&s->lock);
    nq__park_init(&s->park);

    /* The slot's array of subscribers grows by doubling, from 2, up to
     * max_subscribers_per_handle. A larger array is allocated outside the
     * slot's lock and swapped in under it (notifiers read the array only
     * under that lock); the one it replaces is freed after the unlock. */
    nq_sub_t **stale = NULL;
    size_t stale_bytes = 0;
    int err;
    nq__hslot_t *slot = nq__slot_lock(q, h, &err);
    if (slot == NULL) {
        rc = err;
        goto fail;
    }
    while (slot->nsubs >= slot->subs_cap) {
        uint32_t max = q->cfg.max_subscribers_per_handle;
        uint32_t old_cap = slot->subs_cap;
        if (old_cap >= max) {
            nq__unlock(&slot->lock);
            rc = NQ_ELIMIT;
            goto fail_arr;
        }
        uint32_t new_cap = old_cap == 0 ? 2 : old_cap * 2;
        if (new_cap > max)
            new_cap = max;
        nq__unlock(&slot->lock);
        nq__free(stale);
        nq__mem_release(q, stale_bytes);
        stale = NULL;
        stale_bytes = 0;
        size_t nb = (size_t)new_cap * sizeof(nq_sub_t *);
        if (nq__mem_reserve(q, nb) < 0) {
            rc = NQ_ENOMEM;
            goto fail;
        }
        nq_sub_t **arr = nq__malloc(nb);
        if (arr == NULL) {
            nq__mem_release(q, nb);
            rc = NQ_ENOMEM;
            goto fail;
        }
        slot = nq__slot_lock(q, h, &err);
        if (slot == NULL) {
            nq__free(arr);
            nq__mem_release(q, nb);
            rc = err;
            goto fail;
        }
        if (slot->subs_cap == old_cap) { /* nobody grew it meanwhile */
            nq__hcold_t *cold = nq__slot_cold(q, (uint32_t)h - 1);
            if (slot->nsubs > 0)
                memcpy(arr, cold->subs, (size_t)slot->nsubs * sizeof(nq_sub_t *));
            stale = cold->subs;
            stale_bytes = (size_t)old_cap * sizeof(nq_sub_t *);
            cold->subs = arr; /* kept with the slot until the queue is freed */
            slot->subs_cap = (uint16_t)new_cap;
        } else {
            stale = arr; /* another subscribe grew it first: ours goes */
            stale_bytes = nb;
        }
    }
    s->index = (uint32_t)h - 1;
    s->gen = (uint32_t)(h >> 32);
    s->attached = 1;
    nq__slot_cold(q, s->index)->subs[slot->nsubs++] = s;
    nq__unlock(&slot->lock);
    nq__free(stale);
    nq__mem_release(q, stale_bytes);
    atomic_fetch_add_explicit(&q->refs, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&q->live_subs, 1, memory_order_relaxed);
    *out = s;
    return 0;

fail_arr:
    nq__free(stale);
    nq__mem_release(q, stale_bytes);
fail:
    nq__hint_free(q, hint);
    nq__free(ring);
    nq__free(s);
    nq__mem_release(q, bytes);
    return rc;
}

int nq_subscribe(nq_queue_t *q, nq_handle_t h, const nq_sub_opts_t *opts, nq_sub_t **out) {
    if (q == NULL || out == NULL)
        return NQ_EINVAL;
    *out = NULL;
    return nq__sub_new(q, h, opts, NULL, out);
}

/* Under the slot lock. Returns 1 if arg was stored; sets *wake to s when the
 * push made s non-empty and a waker call is owed (counted in inflight). */
int nq__sub_push_locked(nq_sub_t *s, int64_t arg, nq_sub_t **wake) {
    int stored = 1;
    nq__lock_polite(&s->lock); /* a receiver waiting gets the next turn */
    uint32_t was = s->count;
    if (was < s->capacity) {
        uint32_t i = s->head + was;
        if (i >= s->capacity)
            i -= s->capacity;
        s->ring[i] = arg;
        s->count = was + 1;
    } else if (s->overflow == NQ_DROP_NEWEST) {
        stored = 0;
    } else { /* NQ_DROP_OLDEST: overwrite the oldest unread */
        s->ring[s->head] = arg;
        if (++s->head == s->capacity)
            s->head = 0;
    }
    if (stored)
        atomic_store_explicit(&s->stored, atomic_load_explicit(&s->stored, memory_order_relaxed) + 1,
                              memory_order_relaxed);
    if (!stored || was == s->capacity) /* something was lost */
        atomic_store_explicit(&s->dropped,
                              atomic_load_explicit(&s->dropped, memory_order_relaxed) + 1,
                              memory_order_relaxed);
    if (was == 0) {
        /* W: seq_cst pairs with the receiver's load of ready (L). */
        atomic_fetch_or_explicit(&s->ready, NQ__READY_DATA, memory_order_seq_cst);
        atomic_fetch_add_explicit(&s->inflight, 1, memory_order_relaxed);
        *wake = s;
    }
    nq__unlock(&s->lock);
    return stored;
}

/* Leaving the handle: its counts move to the queue's totals, so stats do
 * not drop while it waits to be closed. Under the slot lock and q->lock
 * (nq_queue_stats reads both sides under q->lock). No push follows. */
static void nq__sub_account_locked(nq_sub_t *s) {
    nq_queue_t *q = s->q;
    atomic_fetch_add_explicit(&q->drops_gone, atomic_load_explicit(&s->dropped, memory_order_relaxed),
                              memory_order_relaxed);
    atomic_fetch_add_explicit(&q->stored_gone, atomic_load_explicit(&s->stored, memory_order_relaxed),
                              memory_order_relaxed);
}

/* Under the slot lock and q->lock (nq_unregister): the handle is gone. */
void nq__sub_close_locked(nq_sub_t *s, nq_sub_t **wake) {
    nq__lock(&s->lock);
    nq__sub_account_locked(s);
    s->closed = 1;
    s->attached = 0;
    atomic_fetch_or_explicit(&s->ready, NQ__READY_CLOSED, memory_order_seq_cst);
    atomic_fetch_add_explicit(&s->inflight, 1, memory_order_relaxed);
    *wake = s;
    nq__unlock(&s->lock);
}

/* Outside every lock: wake a blocked receiver, then the user's waker. */
void nq__sub_run_waker(nq_sub_t *s) {
    nq__park_wake(&s->park);
    nq__port_sub_wake(s);
    if (s->waker.wake != NULL)
        s->waker.wake(s->waker.ctx);
    /* Release pairs with the acquire in nq__sub_quiesce. */
    atomic_fetch_sub_explicit(&s->inflight, 1, memory_order_release);
}

static int nq__sub_pop_locked(nq_sub_t *s, int64_t *args, size_t n) {
    size_t k = 0;
    while (k < n && s->count > 0) {
        args[k++] = s->ring[s->head];
        if (++s->head == s->capacity)
            s->head = 0;
        s->count--;
    }
    if (s->count == 0 && k > 0)
        atomic_fetch_and_explicit(&s->ready, ~NQ__READY_DATA, memory_order_relaxed);
    return (int)k;
}

/* Empty and open, without taking the lock: a receiver polling an empty
 * subscription then leaves its lock's cache line to the producers. ready's
 * DATA bit is set by every push that makes the ring non-empty, before its
 * lock is released, and cleared only by the pop that empties it; CLOSED is
 * never cleared. So ready == 0 means the ring was empty and the
 * subscription open at this load (a push still under its lock is not done
 * yet). Acquire, though no data is read on this path: it orders the load
 * after whatever the caller acquired that told it to look (a waker's
 * signal), which happens after the push's fetch_or. */
static inline int nq__sub_idle(nq_sub_t *s) {
    return atomic_load_explicit(&s->ready, memory_order_acquire) == 0;
}

int nq_sub_try_recv(nq_sub_t *s, int64_t *arg) {
    if (s == NULL)
        return NQ_EINVAL;
    if (nq__sub_idle(s))
        return NQ_EAGAIN;
    int64_t tmp;
    nq__lock(&s->lock);
    int n = nq__sub_pop_locked(s, arg != NULL ? arg : &tmp, 1);
    int closed = s->closed;
    if (n == 0 && closed)
        s->told_closed = 1;
    nq__unlock(&s->lock);
    if (n == 1)
        return 0;
    return closed ? NQ_ECLOSED : NQ_EAGAIN;
}

int nq_sub_recv_batch(nq_sub_t *s, int64_t *args, size_t n) {
    if (s == NULL || args == NULL || n == 0)
        return NQ_EINVAL;
    if (n > INT32_MAX)
        n = INT32_MAX;
    if (nq__sub_idle(s))
        return 0;
    nq__lock(&s->lock);
    int k = nq__sub_pop_locked(s, args, n);
    int closed = s->closed;
    if (k == 0 && closed)
        s->told_closed = 1;
    nq__unlock(&s->lock);
    if (k == 0 && closed)
        return NQ_ECLOSED;
    return k;
}

int nq_sub_recv(nq_sub_t *s, int64_t timeout_ns, int64_t *arg) {
    if (s == NULL)
        return NQ_EINVAL;
    int rc = nq_sub_try_recv(s, arg);
    if (rc != NQ_EAGAIN || timeout_ns == 0)
        return rc == NQ_EAGAIN ? NQ_ETIMEDOUT : rc;
    /* One blocked receiver at a time: the park word has one sleeper. */
    if (atomic_exchange_explicit(&s->receiving, 1, memory_order_acquire))
        return NQ_EBUSY;
    int64_t deadline = nq__deadline_ns(timeout_ns);
    for (;;) {
        rc = nq_sub_try_recv(s, arg);
        if (rc != NQ_EAGAIN)
            break;
        if (nq__now_ns() >= deadline) {
            rc = NQ_ETIMEDOUT;
            break;
        }
        nq__park_prepare(&s->park);
        /* L: seq_cst pairs with the producer's fetch_or of ready (W). */
        if (atomic_load_explicit(&s->ready, memory_order_seq_cst) != 0) {
            nq__park_cancel(&s->park);
            continue;
        }
        int prc = nq__park_commit(&s->park, deadline);
        nq__park_cancel(&s->park);
        if (prc == NQ_ESYS) {
            rc = prc;
            break;
        }
    }
    atomic_store_explicit(&s->receiving, 0, memory_order_release);
    return rc;
}

uint64_t nq_sub_dropped(const nq_sub_t *s) {
    if (s == NULL)
        return 0;
    return atomic_load_explicit(&((nq_sub_t *)s)->dropped, memory_order_relaxed);
}

void nq__sub_quiesce(nq_sub_t *s) {
    nq__lock(&s->lock); /* orders us after any producer's increment */
    nq__unlock(&s->lock);
    for (unsigned i = 0; atomic_load_explicit(&s->inflight, memory_order_acquire) != 0; i++) {
        if (i < 64)
            nq__cpu_relax();
        else
            sched_yield();
    }
}

/* Detaches s from its handle (if still attached) and waits for wakers in
 * flight; afterwards no producer or waker touches s. */
void nq__sub_detach(nq_sub_t *s) {
    nq_queue_t *q = s->q;
    nq__hslot_t *slot = nq__slot_at(q, s->index);
    pthread_mutex_lock(&q->lock);
    nq__lock(&slot->lock);
    if (s->attached) {
        nq__sub_account_locked(s);
        nq_sub_t **subs = nq__slot_cold(q, s->index)->subs;
        for (unsigned i = 0; i < slot->nsubs; i++) {
            if (subs[i] == s) {
                subs[i] = subs[--slot->nsubs];
                break;
            }
        }
        nq__lock(&s->lock);
        s->attached = 0;
        s->closed = 1;
        /* "closed" always shows in ready, so the receive fast path (which
         * trusts ready == 0 to mean open) stays right if s outlives this. */
        atomic_fetch_or_explicit(&s->ready, NQ__READY_CLOSED, memory_order_relaxed);
        nq__unlock(&s->lock);
    }
    nq__unlock(&slot->lock);
    pthread_mutex_unlock(&q->lock);
    nq__sub_quiesce(s);
}

void nq__sub_destroy(nq_sub_t *s) {
    nq_queue_t *q = s->q;
    atomic_fetch_sub_explicit(&q->live_subs, 1, memory_order_relaxed);
    nq__hint_free(q, s->hint);
    nq__free(s->ring);
    nq__mem_release(q, nq__sub_bytes(s->capacity, s->port_sub));
    nq__free(s);
    nq__queue_unref(q);
}

void nq_sub_close(nq_sub_t *s) {
    if (s == NULL)
        return;
    if (s->port_sub) { /* a port subscription, even if its port is gone */
        nq__port_sub_close(s);
        return;
    }
    nq__sub_detach(s);
    nq__sub_destroy(s);
}
