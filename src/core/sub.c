/* Bounded subscriptions: every notification on a handle, up to `capacity`
 * unread args, with exact drop accounting.
 *
 * The ring: `capacity` cells (exact, no rounding); position p (the p-th arg
 * stored) lives in cell p % capacity, stamped 2p + 2. The producer side
 * (line 1 of struct nq_sub) is written only by the holder of the handle's
 * HELD, so there is one writer at a time, and HELD's acquire/release orders
 * one writer after the previous. The receiver side (line 2) is written only
 * by receivers, which exclude each other with rstate's BUSY bit, never with
 * anything a producer takes. Receivers read cells, not the producer's line.
 *
 * Invariants:
 *   S1  tail = positions stored; head = positions consumed (received or
 *       skipped); head <= tail. The cell of position p is stamped 2p + 2
 *       (release) after its arg is stored: a receiver at head h that loads
 *       stamp 2h + 2 (acquire) reads that arg. A stamp below 2h + 2 (2h + 1:
 *       being written) means "nothing yet".
 *   S2  drop-newest: tail - head <= capacity. The producer stores only when
 *       tail - head_cache < capacity, head_cache being a head it read with
 *       acquire (pairs with the receiver's release store of head, so the
 *       cell it reuses was read before), refreshed only when it looks full.
 *       A refused arg counts in `rejected`. Cells are never overwritten
 *       unread, so a receiver needs no second look.
 *   S3  drop-oldest: the producer never waits. Writing position t over the
 *       cell of t - capacity, it stamps 2t + 1 (relaxed), stores the arg
 *       (release), then stamps 2t + 2 (release). A receiver loads the stamp
 *       (acquire), the arg (acquire), and the stamp again: unchanged, the arg
 *       is position h's (an overwriting arg's acquire would have shown the
 *       odd stamp). A stamp above 2h + 2 names a newer position p' in h's
 *       cell: positions below p' - capacity + 1 are gone, and so are those
 *       below tail - capacity; the receiver counts them as skipped and goes
 *       on from the later of the two. (An 8-byte atomic arg is never torn.)
 *   S4  Exact accounting, per subscription:
 *         sent = tail + rejected
 *         held = min(tail - head, capacity)
 *         dropped = rejected + skipped + (tail - head - held)
 *         received = head - skipped
 *       so received + dropped + held == sent, derived with no producer cost
 *       beyond the stores above.
 *
 * Wake-up protocol (the receiver arms, the producer takes):
 *   receiver, about to sleep or finding          producer, holding HELD
 *   the ring empty with a waker to call          (after its push)
 *     [park_prepare, if it will sleep]             if armed: armed = 0,
 *     take HELD; armed = 1; release HELD             inflight++, owe a wake
 *     re-check head's cell (stamp, acquire)        release HELD
 *     empty: sleep / return EAGAIN                 wake: park_wake, waker()
 *     not:   take the args                         inflight--
 *   No lost wake-up: the arm and every push are ordered by HELD. A push
 *   before the arm released HELD before the receiver took it, so the
 *   re-check sees its stamp; a push after it finds armed set. A receiver
 *   about to sleep always arms under HELD (never trusting an arm left
 *   standing), so the producer's park_wake comes after its park_prepare.
 *   Under load the receiver never finds the ring empty, never arms, and no
 *   producer makes a wake-up. A waker runs at most once per arm: once per
 *   empty -> non-empty transition (a receive that saw the ring empty, or
 *   left it so, arms before it returns; args pushed before the arm took
 *   effect owe no wake, so it takes them with the room it has and arms
 *   again, or, with no room, calls the waker itself: the one case where a
 *   waker runs on a receiving thread), and once on close.
 */
#include <string.h>

#include "core/sub.h"

#define NQ__SUB_SPINS 64 /* re-checks a blocked receive makes before it arms and sleeps */
#define NQ__SUB_LAPS 64  /* lapped cells one receive may step over */

int nq__sub_alloc(nq_queue_t *q, const nq_sub_opts_t *opts, size_t bytes, nq_sub_t **out) {
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
    size_t total = bytes + (size_t)cap * sizeof(nq__cell_t);
    if (nq__mem_reserve(q, total) < 0)
        return NQ_ENOMEM;
    nq_sub_t *s = nq__aligned_alloc(NQ__CACHELINE, bytes);
    nq__cell_t *ring = nq__calloc(cap, sizeof(nq__cell_t)); /* stamps 0: nothing */
    size_t hint_bytes = 0;
    char *hint = nq__hint_dup(q, o.debug_hint, &hint_bytes);
    if (s == NULL || ring == NULL ||
        (o.debug_hint != NULL && o.debug_hint[0] != '\0' && hint == NULL)) {
        nq__hint_free(q, hint);
        nq__free(ring);
        nq__free(s);
        nq__mem_release(q, total);
        return NQ_ENOMEM;
    }
    memset(s, 0, bytes);
    s->q = q;
    s->ring = ring;
    atomic_init(&s->tail, 0);
    atomic_init(&s->rejected, 0);
    s->hint = hint;
    s->capacity = cap;
    atomic_init(&s->inflight, 0);
    s->overflow = (uint8_t)o.overflow;
    atomic_init(&s->armed, 0);
    atomic_init(&s->closed, 0);
    atomic_init(&s->head, 0);
    atomic_init(&s->skipped, 0);
    s->waker = o.waker;
    atomic_init(&s->rstate, 0);
    nq__park_init(&s->park);
    s->bytes = (uint32_t)bytes;
    *out = s;
    return 0;
}

int nq__sub_attach(nq_sub_t *s, nq_handle_t h) {
    nq_queue_t *q = s->q;
    uint32_t index, id = nq__h_id(h);
    nq__hslot_t *slot = nq__slot_of(q, h, &index);
    if (slot == NULL)
        return NQ_EBADH;
    nq__hcold_t *cold = nq__slot_cold(q, index);
    /* The handle's subscribers: the first in place in the slot, then an
     * array that grows by doubling, from 2, up to
     * max_subscribers_per_handle. A larger array is allocated outside HELD
     * and swapped in under it (producers read the array only under HELD);
     * the one it replaces is freed after the release. */
    nq_sub_t **stale = NULL;
    size_t stale_bytes = 0;
    int rc = 0;
    uint64_t w;
    for (;;) {
        w = nq__hold(slot, id);
        if (w == 0) {
            rc = NQ_EBADH;
            break;
        }
        if (slot->nsubs < cold->subs_cap)
            break;
        uint32_t max = q->cfg.max_subscribers_per_handle, old_cap = cold->subs_cap;
        nq__release(slot, w);
        if (old_cap >= max) {
            rc = NQ_ELIMIT;
            break;
        }
        if (old_cap == 0) { /* the first: in place, nothing to allocate */
            w = nq__hold(slot, id);
            if (w == 0) {
                rc = NQ_EBADH;
                break;
            }
            if (cold->subs_cap == 0)
                cold->subs_cap = 1;
            nq__release(slot, w);
            continue;
        }
        uint32_t new_cap = old_cap * 2;
        if (new_cap > max)
            new_cap = max;
        nq__free(stale);
        nq__mem_release(q, stale_bytes);
        stale = NULL;
        stale_bytes = 0;
        size_t nb = (size_t)new_cap * sizeof(nq_sub_t *);
        if (nq__mem_reserve(q, nb) < 0) {
            rc = NQ_ENOMEM;
            break;
        }
        nq_sub_t **arr = nq__malloc(nb);
        if (arr == NULL) {
            nq__mem_release(q, nb);
            rc = NQ_ENOMEM;
            break;
        }
        w = nq__hold(slot, id);
        if (w == 0) {
            nq__free(arr);
            nq__mem_release(q, nb);
            rc = NQ_EBADH;
            break;
        }
        if (cold->subs_cap == old_cap) { /* nobody grew it meanwhile */
            if (slot->nsubs > 0)
                memcpy(arr, nq__cold_subs(cold), (size_t)slot->nsubs * sizeof(nq_sub_t *));
            stale = old_cap >= 2 ? cold->subs : NULL; /* 1: it was in place */
            stale_bytes = old_cap >= 2 ? (size_t)old_cap * sizeof(nq_sub_t *) : 0;
            cold->subs = arr; /* kept with the slot until the queue is freed */
            cold->subs_cap = (uint16_t)new_cap;
        } else {
            stale = arr; /* another subscribe grew it first: ours goes */
            stale_bytes = nb;
        }
        nq__release(slot, w);
    }
    if (rc == 0) {
        s->index = index;
        s->id = id;
        s->attached = 1;
        if (s->waker.wake != NULL) /* a waker is owed the first arg */
            atomic_store_explicit(&s->armed, 1, memory_order_relaxed);
        nq__cold_subs(cold)[slot->nsubs++] = s;
        nq__release(slot, w | NQ__W_RECV);
        nq__queue_ref(q);
        atomic_fetch_add_explicit(&q->live_subs, 1, memory_order_relaxed);
    }
    nq__free(stale);
    nq__mem_release(q, stale_bytes);
    return rc;
}

int nq_subscribe(nq_queue_t *q, nq_handle_t h, const nq_sub_opts_t *opts, nq_sub_t **out) {
    if (q == NULL || out == NULL)
        return NQ_EINVAL;
    *out = NULL;
    nq_sub_t *s;
    int rc = nq__sub_alloc(q, opts, sizeof(*s), &s);
    if (rc < 0)
        return rc;
    rc = nq__sub_attach(s, h);
    if (rc < 0) {
        nq__sub_destroy(s);
        return rc;
    }
    *out = s;
    return 0;
}

/* --- producer side (under HELD) ---------------------------------------- */

/* Leaving the handle: its counts move to the queue's totals, so the
 * queue's stats do not drop. Under HELD and q->lock (stats read both sides
 * under q->lock). No push follows. */
static void nq__sub_account_held(nq_sub_t *s) {
    nq_queue_t *q = s->q;
    atomic_fetch_add_explicit(&q->drops_gone, nq__sub_dropped(s), memory_order_relaxed);
    atomic_fetch_add_explicit(&q->stored_gone, nq__sub_stored(s), memory_order_relaxed);
}

void nq__sub_close_held(nq_sub_t *s, nq_sub_t **wake, unsigned *nwake) {
    nq__sub_account_held(s);
    s->attached = 0;
    atomic_store_explicit(&s->armed, 0, memory_order_relaxed);
    /* Release: a receiver that sees closed sees every push before it. */
    atomic_store_explicit(&s->closed, 1, memory_order_release);
    /* Counted under HELD (see nq__sub_quiesce). */
    atomic_fetch_add_explicit(&s->inflight, 1, memory_order_relaxed);
    wake[(*nwake)++] = s;
}

void nq__sub_run_wakers(nq_sub_t **wake, unsigned nwake) {
    for (unsigned i = 0; i < nwake; i++) {
        nq_sub_t *s = wake[i];
        nq__park_wake(&s->park);
        if (s->waker.wake != NULL)
            s->waker.wake(s->waker.ctx);
        /* Release pairs with the acquire in nq__sub_quiesce. */
        atomic_fetch_sub_explicit(&s->inflight, 1, memory_order_release);
    }
}

/* --- figures ------------------------------------------------------------ */

uint64_t nq__sub_stored(const nq_sub_t *s) {
    return atomic_load_explicit(&((nq_sub_t *)s)->tail, memory_order_relaxed);
}

uint64_t nq__sub_held(const nq_sub_t *s) {
    nq_sub_t *m = (nq_sub_t *)s;
    uint64_t h = atomic_load_explicit(&m->head, memory_order_relaxed);
    uint64_t t = atomic_load_explicit(&m->tail, memory_order_relaxed);
    uint64_t n = t > h ? t - h : 0;
    return n < s->capacity ? n : s->capacity;
}

uint64_t nq__sub_dropped(const nq_sub_t *s) {
    nq_sub_t *m = (nq_sub_t *)s;
    /* Relaxed: figures (S4). head before skipped: the receiver stores
     * skipped first, so a skip is not missed (it may be seen twice while
     * the receiver runs, never once producers and receiver are quiet). */
    uint64_t h = atomic_load_explicit(&m->head, memory_order_relaxed);
    uint64_t sk = atomic_load_explicit(&m->skipped, memory_order_relaxed);
    uint64_t t = atomic_load_explicit(&m->tail, memory_order_relaxed);
    uint64_t over = t > h + s->capacity ? t - h - s->capacity : 0;
    return atomic_load_explicit(&m->rejected, memory_order_relaxed) + sk + over;
}

uint64_t nq_sub_dropped(const nq_sub_t *s) {
    return s == NULL ? 0 : nq__sub_dropped(s);
}

/* --- receiver side ------------------------------------------------------ */

/* Enters a receive: 0, or NQ_ECLOSED while nq_sub_close runs. Receivers
 * exclude each other (several threads may share one subscription); a
 * receive holds BUSY for a bounded copy, never while it sleeps. */
static int nq__sub_enter(nq_sub_t *s) {
    unsigned v = atomic_load_explicit(&s->rstate, memory_order_relaxed);
    for (unsigned i = 0;; i++) {
        if (v & NQ__R_CLOSING)
            return NQ_ECLOSED;
        /* Acquire pairs with nq__sub_leave: the last receiver's head. */
        if (!(v & NQ__R_BUSY) &&
            atomic_compare_exchange_weak_explicit(&s->rstate, &v, v | NQ__R_BUSY,
                                                  memory_order_acquire, memory_order_relaxed))
            return 0;
        if (v & NQ__R_BUSY) {
            nq__spin_pause(i);
            v = atomic_load_explicit(&s->rstate, memory_order_relaxed);
        }
    }
}

static void nq__sub_leave(nq_sub_t *s, unsigned set) {
    /* An RMW: nq_sub_close and a blocked receive set bits meanwhile. */
    if (set)
        atomic_fetch_or_explicit(&s->rstate, set, memory_order_relaxed);
    atomic_fetch_and_explicit(&s->rstate, ~NQ__R_BUSY, memory_order_release);
}

static inline uint32_t nq__sub_idx(const nq_sub_t *s, uint64_t pos) {
    return (uint32_t)(pos % s->capacity);
}

/* Takes up to n args (inside enter/leave). S1-S3. */
static size_t nq__sub_take(nq_sub_t *s, int64_t *out, size_t n) {
    const uint64_t cap = s->capacity;
    const int oldest = s->overflow == NQ_DROP_OLDEST;
    uint64_t h = atomic_load_explicit(&s->head, memory_order_relaxed); /* ours */
    uint64_t h0 = h, skipped = 0;
    uint32_t hi = s->hidx;
    size_t k = 0;
    /* A producer lapping us without pause could keep us chasing it: after
     * NQ__SUB_LAPS looks that found a cell overwritten, return what we
     * have (receives stay bounded; the rest is there next time). */
    for (unsigned laps = 0; k < n && laps < NQ__SUB_LAPS;) {
        nq__cell_t *c = &s->ring[hi];
        /* Acquire pairs with the producer's release of the stamp (S1). */
        uint64_t st = atomic_load_explicit(&c->stamp, memory_order_acquire);
        if (st == 2 * h + 2) {
            int64_t v;
            if (oldest) {
                /* S3: acquire, so an overwriting arg shows its odd stamp. */
                v = atomic_load_explicit(&c->arg, memory_order_acquire);
                if (atomic_load_explicit(&c->stamp, memory_order_relaxed) != st) {
                    laps++;
                    continue; /* overwritten meanwhile: look again */
                }
            } else {
                v = atomic_load_explicit(&c->arg, memory_order_relaxed);
            }
            out[k++] = v;
            h++;
            hi = hi + 1 == cap ? 0 : hi + 1;
            continue;
        }
        if (st < 2 * h + 2)
            break; /* not written yet (or being written): empty */
        /* S3: lapped. The cell holds position p' >= h + capacity (written
         * or being written); positions below p' - capacity + 1 are gone. */
        uint64_t next = (st - 1) / 2 - cap + 1;
        /* Positions below tail - capacity are gone too (their cells hold
         * completed newer ones): jump there at once, instead of stepping
         * over the lapped cells one by one. Relaxed: a stale tail only
         * makes the jump shorter. */
        uint64_t t = atomic_load_explicit(&s->tail, memory_order_relaxed);
        if (t > cap && t - cap > next)
            next = t - cap;
        laps++;
        skipped += next - h;
        h = next;
        hi = nq__sub_idx(s, h);
    }
    if (h != h0) {
        s->hidx = hi;
        if (skipped)
            atomic_store_explicit(&s->skipped,
                                  atomic_load_explicit(&s->skipped, memory_order_relaxed) +
                                      skipped,
                                  memory_order_relaxed);
        /* Release pairs with the producer's acquire of head (S2): our reads
         * of the cells come before it reuses them. */
        atomic_store_explicit(&s->head, h, memory_order_release);
    }
    return k;
}

int nq__sub_has_args(nq_sub_t *s) {
    /* Relaxed: the receiver's own head (or, from another thread, a figure:
     * a receive in progress may move it). A stamp of h's position, or of a
     * newer one (lapped): args there. */
    uint64_t h = atomic_load_explicit(&s->head, memory_order_relaxed);
    return atomic_load_explicit(&s->ring[nq__sub_idx(s, h)].stamp, memory_order_acquire) >=
           2 * h + 2;
}

int nq__sub_closed_untold(nq_sub_t *s) {
    return atomic_load_explicit(&s->closed, memory_order_acquire) &&
           !(atomic_load_explicit(&s->rstate, memory_order_relaxed) & NQ__R_TOLD);
}

/* Arms a wake-up (see the protocol at the top): 1 if armed and s is still
 * empty and open, 0 if it holds args or is closed. */
static int nq__sub_arm(nq_sub_t *s, int sleeping) {
    /* Armed already (and not taken yet: a push takes it under HELD): a
     * waker is owed for the next push, or in flight for one we may not see
     * yet, which is as good for a waker. Not for a receiver about to sleep:
     * its park_prepare must be ordered before the taker's park_wake, and only
     * HELD orders them, so it always arms under HELD. */
    if (sleeping || !atomic_load_explicit(&s->armed, memory_order_relaxed)) {
        nq__hslot_t *slot = nq__slot_at(s->q, s->index);
        uint64_t w = nq__hold(slot, s->id);
        if (w == 0)
            return 0; /* the handle is gone: s is closed (or closing) */
        int attached = s->attached;
        if (attached)
            atomic_store_explicit(&s->armed, 1, memory_order_relaxed);
        nq__release(slot, w);
        if (!attached)
            return 0;
    }
    return !nq__sub_has_args(s) && !atomic_load_explicit(&s->closed, memory_order_acquire);
}

int nq__sub_arm_if_empty(nq_sub_t *s) {
    if (nq__sub_has_args(s) || atomic_load_explicit(&s->closed, memory_order_acquire))
        return 0;
    return nq__sub_arm(s, 0);
}

/* One non-blocking receive of up to n args: the count (>= 1), NQ_EAGAIN
 * or NQ_ECLOSED. A receive that saw the ring empty (it got less than it
 * asked for, or left it empty) arms the wake-up, if s has a waker, before it
 * leaves. Args pushed before the arm took effect owe no wake: it takes them
 * too while it has room, and arms again, until the arm holds on an empty
 * ring; with no room left it calls the waker itself (after leaving), so no
 * empty -> non-empty transition goes unannounced. */
static int nq__sub_recv_some(nq_sub_t *s, int64_t *out, size_t n) {
    int rc = nq__sub_enter(s);
    if (rc < 0)
        return rc;
    size_t k = nq__sub_take(s, out, n);
    nq_waker_t self = {NULL, NULL};
    if (s->waker.wake != NULL && (k < n || !nq__sub_has_args(s))) {
        for (int round = 0;
             !nq__sub_arm(s, 0) && !atomic_load_explicit(&s->closed, memory_order_acquire);
             round++) {
            /* Full, or a producer laps us round after round: announce. */
            if (k == n || round == 4) {
                /* Args came, no room: announce them (counted in flight, so
                 * a close waits for the call). */
                self = s->waker;
                atomic_fetch_add_explicit(&s->inflight, 1, memory_order_relaxed);
                break;
            }
            k += nq__sub_take(s, out + k, n - k);
        }
    }
    unsigned told = 0;
    /* Acquire pairs with the release of closed: every push before the close
     * is visible to the second look. */
    if (k == 0 && atomic_load_explicit(&s->closed, memory_order_acquire)) {
        /* No push follows: each take makes progress; only an empty ring
         * (not one whose take stopped at NQ__SUB_LAPS) is the end. */
        while ((k = nq__sub_take(s, out, n)) == 0 && nq__sub_has_args(s)) {
        }
        if (k == 0) {
            told = NQ__R_TOLD;
            rc = NQ_ECLOSED;
        }
    }
    nq__sub_leave(s, told);
    /* After leaving: the waker may receive from s itself. */
    if (self.wake != NULL) {
        self.wake(self.ctx);
        /* Release pairs with the acquire in nq__sub_quiesce. */
        atomic_fetch_sub_explicit(&s->inflight, 1, memory_order_release);
    }
    if (rc < 0)
        return rc;
    return k > 0 ? (int)k : NQ_EAGAIN;
}

int nq_sub_try_recv(nq_sub_t *s, int64_t *arg) {
    if (s == NULL)
        return NQ_EINVAL;
    int64_t tmp;
    int rc = nq__sub_recv_some(s, arg != NULL ? arg : &tmp, 1);
    return rc > 0 ? 0 : rc;
}

int nq_sub_recv_batch(nq_sub_t *s, int64_t *args, size_t n) {
    if (s == NULL || args == NULL || n == 0)
        return NQ_EINVAL;
    if (n > INT32_MAX)
        n = INT32_MAX;
    int rc = nq__sub_recv_some(s, args, n);
    return rc == NQ_EAGAIN ? 0 : rc;
}

int nq_sub_recv(nq_sub_t *s, int64_t timeout_ns, int64_t *arg) {
    if (s == NULL)
        return NQ_EINVAL;
    int64_t tmp, *out = arg != NULL ? arg : &tmp;
    int rc;
    if (timeout_ns == 0) {
        rc = nq__sub_recv_some(s, out, 1);
        return rc == NQ_EAGAIN ? NQ_ETIMEDOUT : rc > 0 ? 0 : rc;
    }
    /* BLOCKED from the first step: nq_sub_close on another thread waits
     * for it to clear. One blocked receiver at a time: the park word has
     * one sleeper. */
    unsigned v = atomic_fetch_or_explicit(&s->rstate, NQ__R_BLOCKED, memory_order_acquire);
    if (v & NQ__R_BLOCKED)
        return NQ_EBUSY;
    int64_t deadline = nq__deadline_ns(timeout_ns);
    for (unsigned spins = 0;; spins++) {
        rc = nq__sub_recv_some(s, out, 1);
        if (rc != NQ_EAGAIN)
            break;
        if (nq__now_ns() >= deadline) {
            rc = NQ_ETIMEDOUT;
            break;
        }
        if (spins < NQ__SUB_SPINS) { /* a producer in flow is here soon */
            nq__cpu_relax();
            continue;
        }
        nq__park_prepare(&s->park);
        /* Closing (nq_sub_close on another thread) sets CLOSING, then wakes
         * the park: seq_cst pairs with its fetch_or, like P/L of park.h. */
        if ((atomic_load_explicit(&s->rstate, memory_order_seq_cst) & NQ__R_CLOSING) ||
            !nq__sub_arm(s, 1)) {
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
    /* Release: our last touch of s; nq_sub_close frees it once it sees the
     * bit clear (acquire). */
    atomic_fetch_and_explicit(&s->rstate, ~NQ__R_BLOCKED, memory_order_release);
    return rc > 0 ? 0 : rc;
}

/* --- closing ------------------------------------------------------------ */

void nq__sub_quiesce(nq_sub_t *s) {
    nq__hslot_t *slot = nq__slot_at(s->q, s->index);
    nq__release(slot, nq__hold_any(slot)); /* after any increment made under HELD */
    for (unsigned i = 0; atomic_load_explicit(&s->inflight, memory_order_acquire) != 0; i++)
        nq__spin_pause(i);
}

/* Detaches s from its handle if still attached. */
static void nq__sub_detach(nq_sub_t *s) {
    nq_queue_t *q = s->q;
    nq__hslot_t *slot = nq__slot_at(q, s->index);
    pthread_mutex_lock(&q->lock); /* stats read the totals and the slots under it */
    uint64_t w = nq__hold_any(slot);
    if (s->attached) {
        nq__sub_account_held(s);
        nq_sub_t **subs = nq__cold_subs(nq__slot_cold(q, s->index));
        for (unsigned i = 0; i < slot->nsubs; i++) {
            if (subs[i] == s) {
                subs[i] = subs[--slot->nsubs];
                break;
            }
        }
        if (slot->nsubs == 0)
            w &= ~NQ__W_RECV;
        s->attached = 0;
        atomic_store_explicit(&s->armed, 0, memory_order_relaxed);
        atomic_store_explicit(&s->closed, 1, memory_order_release);
    }
    nq__release(slot, w);
    pthread_mutex_unlock(&q->lock);
}

void nq__sub_shutdown(nq_sub_t *s) {
    /* seq_cst: pairs with the blocked receiver's check after park_prepare. */
    atomic_fetch_or_explicit(&s->rstate, NQ__R_CLOSING, memory_order_seq_cst);
    nq__sub_detach(s);
    nq__park_wake(&s->park);
    /* A receive in progress ends within a bounded copy; a blocked one wakes
     * (above, or at its next look) and leaves with NQ_ECLOSED. */
    for (unsigned i = 0; atomic_load_explicit(&s->rstate, memory_order_acquire) &
                         (NQ__R_BUSY | NQ__R_BLOCKED);
         i++) {
        if ((i & 255) == 255)
            nq__park_wake(&s->park);
        nq__spin_pause(i);
    }
    nq__sub_quiesce(s);
}

void nq__sub_destroy(nq_sub_t *s) {
    nq_queue_t *q = s->q;
    int counted = s->id != 0; /* attached once (an id is never 0) */
    nq__hint_free(q, s->hint);
    nq__free(s->ring);
    nq__mem_release(q, s->bytes + (size_t)s->capacity * sizeof(nq__cell_t));
    nq__free(s);
    if (counted) {
        atomic_fetch_sub_explicit(&q->live_subs, 1, memory_order_relaxed);
        nq__queue_unref(q);
    }
}

void nq_sub_close(nq_sub_t *s) {
    if (s == NULL)
        return;
    if (s->on_close != NULL) { /* an owner's (a port's), even if the owner is gone */
        s->on_close(s);
        return;
    }
    nq__sub_shutdown(s);
    nq__sub_destroy(s);
}
