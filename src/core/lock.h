/* This file is private to libnq: the small lock that guards one handle or one
 * subscription. Only library code takes it, for a bounded number of
 * instructions (no user callback, no allocation, no syscall runs under it),
 * so waiting for it is waiting for another producer's few stores, never for a
 * client. It spins (test-and-test-and-set) and yields the CPU after a while,
 * which matters on machines with few vCPUs where the holder may be
 * preempted. Four bytes, so it fits in every handle slot. */
#ifndef NQ_CORE_LOCK_H
#define NQ_CORE_LOCK_H

#include <sched.h>
#include <stdatomic.h>

#include "core/internal.h"

typedef struct nq__lock {
    atomic_uint held;
} nq__lock_t;

#define NQ__LOCK_SPINS 64

static inline void nq__lock_init(nq__lock_t *l) {
    atomic_init(&l->held, 0);
}

static inline void nq__lock(nq__lock_t *l) {
    for (;;) {
        /* Acquire pairs with the release in nq__unlock: what the previous
         * holder wrote is visible to us. */
        if (!atomic_exchange_explicit(&l->held, 1, memory_order_acquire))
            return;
        for (int i = 0; atomic_load_explicit(&l->held, memory_order_relaxed); i++) {
            if (i < NQ__LOCK_SPINS)
                nq__cpu_relax();
            else
                sched_yield();
        }
    }
}

static inline void nq__unlock(nq__lock_t *l) {
    atomic_store_explicit(&l->held, 0, memory_order_release);
}

#endif
