/* This file is private to libnq: parking, the three-phase wait used by every
 * blocking call (nq_evq_wait now; nq_wait and nq_sub_recv later).
 *
 * One waiter at a time per nq__park_t; any number of wakers.
 *
 *   waker (any thread)                      waiter (the one consumer)
 *   ------------------                      -------------------------
 *   publish the work with a seq_cst         nq__park_prepare(p)
 *     atomic operation (W)                    word = 1            (seq_cst, P)
 *   nq__park_wake(p)                        re-check for work with a
 *     if load(word) == 1   (seq_cst, R)       seq_cst load (L)
 *        and xchg(word, 0) == 1               found: nq__park_cancel(p)
 *          futex_wake(word)                   none:  nq__park_commit(p, deadline)
 *                                                      futex_wait(word, 1)
 *                                             then   nq__park_cancel(p)
 *
 * Why no wake-up is lost: W, R, P and L are all seq_cst, so they sit in one
 * total order S that agrees with each thread's program order. If the waiter's
 * L misses the work, L is before W in S, hence P < L < W < R and R reads P's
 * 1 (or a later store: another waker's 0, and that waker wakes the waiter).
 * The waker that swaps 1 -> 0 makes the futex call; futex_wait compares the
 * word with 1 inside the kernel, so a wake that lands between L and the
 * waiter's futex_wait makes futex_wait return at once instead of sleeping.
 * Only one waker per sleep makes the syscall (the xchg); the others see 0.
 * A wake that arrives late may end a later, unrelated sleep early: waiters
 * treat every return as "re-check", never as "there is work".
 */
#ifndef NQ_CORE_PARK_H
#define NQ_CORE_PARK_H

#include <stdatomic.h>
#include <stdint.h>

typedef struct nq__park {
    atomic_uint word; /* 1 while the waiter is (about to be) asleep; futex word */
} nq__park_t;

static inline void nq__park_init(nq__park_t *p) {
    atomic_init(&p->word, 0);
}

/* Waiter, phase 1: announce the sleep. The store is seq_cst (P above): it
 * must not be reordered after the waiter's re-check L. */
static inline void nq__park_prepare(nq__park_t *p) {
    atomic_store_explicit(&p->word, 1, memory_order_seq_cst);
}

/* Waiter, phase 3 (either way): no longer asleep. Relaxed: a waker that
 * still reads 1 only makes one needless futex_wake. */
static inline void nq__park_cancel(nq__park_t *p) {
    atomic_store_explicit(&p->word, 0, memory_order_relaxed);
}

/* Waiter, phase 2: sleep until woken, a signal, or deadline_ns (absolute
 * CLOCK_MONOTONIC ns, NQ__NO_DEADLINE for none). Returns 0 (woken, or
 * interrupted: re-check), NQ_ETIMEDOUT, or NQ_ESYS. errno is preserved except
 * on NQ_ESYS. */
int nq__park_commit(nq__park_t *p, int64_t deadline_ns);

/* The syscall half of nq__park_wake, out of line. It touches only the futex
 * word's address (FUTEX_WAKE on a private futex does not read the memory), so
 * it is safe even if the object holding the word was freed meanwhile. */
int nq__park_wake_slow(nq__park_t *p);

/* Waker, part 1, after publishing work with a seq_cst operation: 1 if the
 * waiter announced a sleep and this waker took the duty to wake it (call
 * nq__park_wake_slow), 0 if the waiter is awake or another waker took it. A
 * waker that must not touch the object once its work is visible (the evq:
 * the consumer may free the queue as soon as it sees the token) claims
 * between its seq_cst publish and the store that makes the work visible. */
static inline int nq__park_claim(nq__park_t *p) {
    /* R: seq_cst pairs with the waiter's P (see the top of this file). The
     * load first keeps the common case (waiter awake) to a read of a line
     * that stays shared in every producer's cache. */
    if (atomic_load_explicit(&p->word, memory_order_seq_cst) == 0)
        return 0;
    return atomic_exchange_explicit(&p->word, 0, memory_order_seq_cst) != 0;
}

/* Waker: claim and wake in one. Returns 1 if it made the futex_wake syscall. */
static inline int nq__park_wake(nq__park_t *p) {
    return nq__park_claim(p) ? nq__park_wake_slow(p) : 0;
}

#endif
