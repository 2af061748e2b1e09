/* Relacy model: the handle/subscription lock (src/core/lock.h).
 *
 * Two producers take it the notify path's way (nq__lock_polite) and one
 * consumer the other way (nq__lock, which asks for the next turn with the
 * WANTED bit); each enters twice and increments a plain variable inside.
 * A lost mutual exclusion or a missing release/acquire pairing shows as a
 * data race on that variable (Relacy checks every plain access), and a
 * request nobody can satisfy as a livelock or deadlock. At the end the
 * count is exact.
 *
 * Broken variants, each must be caught:
 *   drop relaxed    the unlock's store without release: the next holder may
 *                   not see the previous one's writes.
 *   take by store   the asking waiter takes a free lock with a plain store
 *                   after its load (not a compare-exchange): two can hold it.
 *   keeps WANTED    the waiter that takes the lock leaves the request
 *                   standing, and requests never expire: the polite
 *                   producers wait for a consumer that is not there (Relacy
 *                   reports a livelock). Shows that the model can catch a
 *                   stale request at all; with the expiry (L4) a stale
 *                   request only delays them.
 *
 * A second layout runs one producer and two consumers, so one consumer's
 * take also clears the other's request and the other asks again.
 */
#include "model.h"

using namespace nqm;

template <int V, int NPOLITE = 2>
struct lock_test : rl::test_suite<lock_test<V, NPOLITE>, 3> {
    lock lk;
    rl::var<int> count;

    void before() {
        lk.broken = V;
        count($) = 0;
    }
    void after() { RL_ASSERT(count($) == 6); }

    void thread(unsigned idx) {
        for (int k = 0; k < 2; k++) {
            if (idx < (unsigned)NPOLITE)
                lk.take_polite();
            else
                lk.take();
            count($) = count($) + 1;
            lk.drop();
        }
    }
};

int main() {
    report rep;
    const char *m = "lock";
    unsigned b = bound(3);
    check<lock_test<lock::OK> >(rep, m, "correct", rl::fair_context_bound_scheduler_type, 0, b, MUST_PASS);
    check<lock_test<lock::OK> >(rep, m, "correct", rl::random_scheduler_type, scaled(200000), 0, MUST_PASS);
    check<lock_test<lock::BROKEN_DROP_RELAXED> >(rep, m, "broken (drop relaxed)", rl::fair_context_bound_scheduler_type, 0, b, MUST_FAIL);
    check<lock_test<lock::BROKEN_DROP_RELAXED> >(rep, m, "broken (drop relaxed)", rl::random_scheduler_type, scaled(200000), 0, MAY_FAIL);
    check<lock_test<lock::BROKEN_TAKE_BY_STORE> >(rep, m, "broken (take by store)", rl::fair_context_bound_scheduler_type, 0, b, MUST_FAIL);
    check<lock_test<lock::BROKEN_TAKE_BY_STORE> >(rep, m, "broken (take by store)", rl::random_scheduler_type, scaled(200000), 0, MAY_FAIL);
    check<lock_test<lock::OK, 1> >(rep, m, "correct, 1 producer 2 consumers", rl::fair_context_bound_scheduler_type, 0, b, MUST_PASS);
    check<lock_test<lock::BROKEN_TAKE_KEEPS_WANTED> >(rep, m, "broken (take keeps WANTED)", rl::fair_context_bound_scheduler_type, 0, b, MUST_FAIL);
    check<lock_test<lock::BROKEN_TAKE_KEEPS_WANTED, 1> >(rep, m, "broken (take keeps WANTED), 1 producer 2 consumers", rl::fair_context_bound_scheduler_type, 0, b, MUST_FAIL);
    return finish(rep, m);
}
