/* Relacy model: the parked-consumer handshake of nq_evq_wait
 * (src/core/evq.c "Wake-up protocol", src/core/park.h).
 *
 *   notifier (nq_evq_notify)                consumer (nq_evq_wait, no deadline)
 *   xchg(pending[t], 1)        acq_rel      poll: nothing
 *   fetch_add(tail)            seq_cst  W   nq__park_prepare: word = 1  seq_cst  P
 *   nq__park_claim: load(word) seq_cst  R   load(tail)                  seq_cst  L
 *     and xchg(word, 0)        seq_cst      tail == head: futex_wait(word, 1)
 *   store(slot)                release      tail != head: ready? poll again;
 *   futex_wake if it claimed                  else yield, then a timed nap
 * (evq_model.h has the line-by-line correspondence.)
 *
 * Two notifiers queue one token each; the consumer calls nq_evq_wait until
 * it holds both. A lost wake-up leaves it in futex_wait with both notifiers
 * done: Relacy reports a deadlock.
 *
 * Broken variants, each must be caught:
 *   P release  nq__park_prepare's store weakened to release: R may read the
 *              old 0 while L misses the claim (the store->load window).
 *   L acquire  the consumer's re-read of tail weakened to acquire.
 */
#include "evq_model.h"

using namespace nqm;

enum { CORRECT, BROKEN_P, BROKEN_L };

template <int V>
struct evq_wait_test : rl::test_suite<evq_wait_test<V>, 3> {
    static evq_orders orders() {
        evq_orders o = evq_orders_c(false);
        if (V == BROKEN_P)
            o.park.prepare = rl::mo_release;
        if (V == BROKEN_L)
            o.wait_tail = rl::mo_acquire;
        return o;
    }
    evq<2> *q;

    void before() { q = new evq<2>(orders()); }
    void after() { delete q; }

    void thread(unsigned idx) {
        if (idx < 2) {
            q->notify(idx);
            return;
        }
        unsigned got = 0, toks[2];
        while (got != 3) {
            unsigned n = q->wait(toks, 2);
            for (unsigned k = 0; k < n; k++)
                got |= 1u << toks[k];
        }
    }
};

int main() {
    report rep;
    const char *m = "evq_wait";
    unsigned b = bound(3);
    check<evq_wait_test<CORRECT> >(rep, m, "correct", rl::fair_context_bound_scheduler_type, 0, b, MUST_PASS);
    check<evq_wait_test<CORRECT> >(rep, m, "correct", rl::random_scheduler_type, scaled(200000), 0, MUST_PASS);
    check<evq_wait_test<BROKEN_P> >(rep, m, "broken (P release)", rl::fair_context_bound_scheduler_type, 0, b, MUST_FAIL);
    check<evq_wait_test<BROKEN_P> >(rep, m, "broken (P release)", rl::random_scheduler_type, scaled(200000), 0, MAY_FAIL);
    check<evq_wait_test<BROKEN_L> >(rep, m, "broken (L acquire)", rl::fair_context_bound_scheduler_type, 0, b, MUST_FAIL);
    check<evq_wait_test<BROKEN_L> >(rep, m, "broken (L acquire)", rl::random_scheduler_type, scaled(200000), 0, MAY_FAIL);
    return finish(rep, m);
}
