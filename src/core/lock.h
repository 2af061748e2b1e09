/* This file is private to libnq: the small lock that guards one handle or
 * one subscription. Only library code takes it, for a bounded number of
 * instructions (no user callback, no allocation, no syscall runs under it),
 * so waiting for it is waiting for another thread's few stores, and never
 * for long on a client (L4). It spins (test-and-test-and-set) and yields the CPU after a while,
 * which matters on machines with few vCPUs where the holder may be
 * preempted. Four bytes, so it fits in every handle slot.
 *
 * Invariants (the word `held`):
 *   L1  bit 0 (HELD) is set only by a compare-exchange from a value with it
 *       clear, and cleared only by the holder's unlock: mutual exclusion.
 *   L2  bit 1 (WANTED) is a request for the next turn by a waiter that took
 *       the lock with nq__lock and has waited a while: producers
 *       (nq__lock_polite, the notify path) do not take the lock while it is
 *       set, until it expires (L4), so a consumer (the loop thread draining a subscription, a
 *       port's dispatch) cannot be starved by producers that unlock and
 *       relock in a tight loop on another CPU, which a plain spinlock
 *       allows (measured: consumer operations stalled for 180 ms with four
 *       such producers on two vCPUs).
 *   L3  WANTED is best effort: the unlock keeps it (a load and a store: no
 *       second atomic read-modify-write on the notify path), and a request
 *       that lands between that load and store is lost; the waiter sees it
 *       gone and asks again. A waiter that takes the lock clears it; one of
 *       several asking waiters gets the turn, the others ask again.
 *   L4  A request expires: a producer that first found the lock free but
 *       asked for NQ__LOCK_DEFER_NS ago (by the clock, or after
 *       NQ__LOCK_DEFER_LOOKS looks, whichever comes first, so a clock that
 *       stalls cannot stretch it) takes it and clears the request. So a
 *       client thread that asked and then stopped running (in a debugger,
 *       in a signal handler, preempted) costs the notify path a bounded
 *       wait per lock, not a wait until it runs again; a running client
 *       takes its turn long before that, and asks again if it lost it. The
 *       price: a client that is runnable but not running for longer (five
 *       busy threads on two vCPUs) can lose its turn, and waits for the
 *       scheduler to run it again (measured: its longest stall 15-90 ms
 *       with 1 ms of deferral, 4-11 ms with none, 130-390 ms with a plain
 *       spinlock). A producer never waiting long on a client comes first.
 *       Several clients contending for one lock could keep a request
 *       standing most of the time; producers still get the gaps and the
 *       expiry.
 * Orderings: the taking compare-exchange is acquire and the unlock's store
 * release (they pair: what the previous holder wrote is visible); the
 * request (fetch_or) and every load while waiting are relaxed, since they
 * only steer who tries next and carry no data.
 */
#ifndef NQ_CORE_LOCK_H
#define NQ_CORE_LOCK_H

#include <sched.h>
#include <stdatomic.h>

#include "core/internal.h"

typedef struct nq__lock {
    atomic_uint held;
} nq__lock_t;

#define NQ__LOCK_HELD        1u
#define NQ__LOCK_WANTED      2u
#define NQ__LOCK_SPINS       64      /* pauses before yielding (and before asking) */
#define NQ__LOCK_DEFER_NS    1000000 /* L4: 1 ms */
#define NQ__LOCK_DEFER_LOOKS 65536u  /* L4's backstop, whatever the clock says */

static inline void nq__lock_init(nq__lock_t *l) {
    atomic_init(&l->held, 0);
}

static inline void nq__lock_pause(unsigned i) {
    if (i < NQ__LOCK_SPINS)
        nq__cpu_relax();
    else
        sched_yield();
}

/* Takes the lock; after waiting a while, asks producers to let it have the
 * next turn (L2). For everything but the notify path. */
static inline void nq__lock(nq__lock_t *l) {
    unsigned v = 0;
    if (atomic_compare_exchange_strong_explicit(&l->held, &v, NQ__LOCK_HELD, memory_order_acquire,
                                                memory_order_relaxed))
        return;
    for (unsigned i = 0;; i++) {
        v = atomic_load_explicit(&l->held, memory_order_relaxed);
        if (!(v & NQ__LOCK_HELD)) {
            /* Free (perhaps with our own request, or another waiter's):
             * take it, clearing WANTED (L3). Acquire: see nq__unlock. */
            if (atomic_compare_exchange_weak_explicit(&l->held, &v, NQ__LOCK_HELD,
                                                      memory_order_acquire, memory_order_relaxed))
                return;
            continue;
        }
        if (i >= NQ__LOCK_SPINS && !(v & NQ__LOCK_WANTED))
            atomic_fetch_or_explicit(&l->held, NQ__LOCK_WANTED, memory_order_relaxed);
        nq__lock_pause(i);
    }
}

/* Takes the lock on the notify path: only when it is neither held nor
 * asked for (L2), or when the request has stood for NQ__LOCK_DEFER_NS on
 * a free lock (L4). The clock is read only while deferring. */
static inline void nq__lock_polite(nq__lock_t *l) {
    unsigned v = 0;
    /* Acquire pairs with the release in nq__unlock. */
    if (atomic_compare_exchange_strong_explicit(&l->held, &v, NQ__LOCK_HELD, memory_order_acquire,
                                                memory_order_relaxed))
        return;
    int64_t expires = 0; /* when a request on a free lock stops counting */
    unsigned looks = 0;  /* at a request on a free lock */
    for (unsigned i = 0;; i++) {
        v = atomic_load_explicit(&l->held, memory_order_relaxed);
        int take = v == 0;
        if (v == NQ__LOCK_WANTED) {
            int64_t now = nq__now_ns();
            if (looks++ == 0)
                expires = now + NQ__LOCK_DEFER_NS;
            take = now >= expires || looks > NQ__LOCK_DEFER_LOOKS;
        }
        /* Taking stores HELD alone: an expired request goes with it. */
        if (take && atomic_compare_exchange_weak_explicit(
                        &l->held, &v, NQ__LOCK_HELD, memory_order_acquire, memory_order_relaxed))
            return;
        nq__lock_pause(i);
    }
}

static inline void nq__unlock(nq__lock_t *l) {
    /* Keep a request (L3); only the holder changes HELD, so the load sees
     * it set. Release pairs with the acquire of the next taker. */
    unsigned v = atomic_load_explicit(&l->held, memory_order_relaxed);
    atomic_store_explicit(&l->held, v & ~NQ__LOCK_HELD, memory_order_release);
}

#endif
