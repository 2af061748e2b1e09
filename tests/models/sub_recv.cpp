/* Relacy model: a blocking nq_sub_recv against the producer's push and close
 * (src/core/sub.c, "Wake-up protocol of a blocked nq_sub_recv"; park.h).
 *
 *   C (src/core/sub.c)                           here
 *   nq__sub_push_locked: under s->lock, ring,    push(): same; ring, count,
 *     count; on empty -> non-empty                 head, closed are rl::var
 *     fetch_or(ready, DATA) seq_cst (W),           (plain data: Relacy checks
 *     fetch_add(inflight) relaxed                  they stay under the lock)
 *   nq__sub_close_locked: fetch_or(ready,        close(): same
 *     CLOSED) seq_cst, inflight++
 *   nq__sub_run_waker: nq__park_wake (R),        run_waker()
 *     fetch_sub(inflight) release
 *   nq__sub_pop_locked: on empty,                pop_locked(): same
 *     fetch_and(ready, ~DATA) relaxed
 *   nq__sub_idle: load(ready) acquire            try_recv(): same
 *   nq_sub_try_recv, nq_sub_recv: xchg           recv(): same, no deadline
 *     (receiving, 1) acquire; loop: try_recv;
 *     park_prepare (P); load(ready) seq_cst (L);
 *     park_commit; park_cancel; store
 *     (receiving, 0) release
 * Left out: the handle slot's lock around push and close (only the one
 * producer takes it here), the port and user wakers (none set), counters.
 *
 * Capacity 2. The producer pushes 1 and 2 (as nq_notify does), then closes
 * the subscription (as nq_unregister does); the receiver calls nq_sub_recv
 * until NQ_ECLOSED and must get 1, 2, then ECLOSED. A lost wake-up leaves
 * it asleep with the producer done: a deadlock.
 *
 * Broken variants, each must be caught:
 *   L acquire    the receiver's re-check of ready weakened to acquire.
 *   no re-check  park_prepare then park_commit with no look at ready
 *                between: the try_recv before prepare is the only check.
 */
#include "model.h"

using namespace nqm;

enum { CORRECT, BROKEN_L, BROKEN_NO_RECHECK };
enum { E_OK = 0, E_AGAIN = -11, E_CLOSED = -3, E_BUSY = -16 };
static const unsigned READY_DATA = 1, READY_CLOSED = 2, CAP = 2;

template <int V>
struct sub_test : rl::test_suite<sub_test<V>, 2> {
    lock lk;
    rl::var<unsigned> head, count;
    rl::var<int> closed, told_closed;
    rl::var<long> ring[CAP];
    rl::atomic<unsigned> ready, receiving, inflight;
    park pk;

    void before() {
        head($) = 0;
        count($) = 0;
        closed($) = 0;
        told_closed($) = 0;
        ready($).store(0, rl::mo_relaxed);
        receiving($).store(0, rl::mo_relaxed);
        inflight($).store(0, rl::mo_relaxed);
    }

    /* nq__sub_push_locked, NQ_DROP_NEWEST; returns whether a waker is owed */
    bool push(long arg) {
        bool wake = false;
        lk.take_polite();
        unsigned was = count($);
        if (was < CAP) {
            unsigned i = head($) + was;
            if (i >= CAP)
                i -= CAP;
            ring[i]($) = arg;
            count($) = was + 1;
        }
        if (was == 0) {
            ready($).fetch_or(READY_DATA, rl::mo_seq_cst); /* W */
            inflight($).fetch_add(1, rl::mo_relaxed);
            wake = true;
        }
        lk.drop();
        return wake;
    }
    /* nq__sub_close_locked */
    void close() {
        lk.take();
        closed($) = 1;
        ready($).fetch_or(READY_CLOSED, rl::mo_seq_cst);
        inflight($).fetch_add(1, rl::mo_relaxed);
        lk.drop();
    }
    /* nq__sub_run_waker */
    void run_waker() {
        pk.wake(park_orders_c());
        inflight($).fetch_sub(1, rl::mo_release);
    }

    /* nq__sub_pop_locked, one arg */
    int pop_locked(long *arg) {
        int k = 0;
        if (count($) > 0) {
            *arg = ring[head($)]($);
            head($) = head($) + 1 == CAP ? 0 : head($) + 1;
            count($) = count($) - 1;
            k = 1;
        }
        if (count($) == 0 && k > 0)
            ready($).fetch_and(~READY_DATA, rl::mo_relaxed);
        return k;
    }
    /* nq_sub_try_recv */
    int try_recv(long *arg) {
        if (ready($).load(rl::mo_acquire) == 0) /* nq__sub_idle */
            return E_AGAIN;
        lk.take();
        int n = pop_locked(arg);
        int c = closed($);
        if (n == 0 && c)
            told_closed($) = 1;
        lk.drop();
        if (n == 1)
            return E_OK;
        return c ? E_CLOSED : E_AGAIN;
    }
    /* nq_sub_recv, no deadline */
    int recv(long *arg) {
        int rc = try_recv(arg);
        if (rc != E_AGAIN)
            return rc;
        if (receiving($).exchange(1, rl::mo_acquire))
            return E_BUSY;
        park_orders po = park_orders_c();
        for (;;) {
            rc = try_recv(arg);
            if (rc != E_AGAIN)
                break;
            pk.prepare(po);
            if (V != BROKEN_NO_RECHECK) {
                mo_t l = V == BROKEN_L ? rl::mo_acquire : rl::mo_seq_cst;
                if (ready($).load(l) != 0) { /* L */
                    pk.cancel();
                    continue;
                }
            }
            pk.commit(false);
            pk.cancel();
        }
        receiving($).store(0, rl::mo_release);
        return rc;
    }

    void thread(unsigned idx) {
        if (idx == 0) { /* the producer: nq_notify twice, then nq_unregister */
            if (push(1))
                run_waker();
            if (push(2))
                run_waker();
            close();
            run_waker();
            return;
        }
        long got[3] = {0, 0, 0};
        int n = 0, rc;
        long arg = 0;
        while ((rc = recv(&arg)) == E_OK) {
            RL_ASSERT(n < 2);
            got[n++] = arg;
        }
        RL_ASSERT(rc == E_CLOSED);
        RL_ASSERT(n == 2 && got[0] == 1 && got[1] == 2);
    }
};

int main() {
    report rep;
    const char *m = "sub_recv";
    unsigned b = bound(3);
    check<sub_test<CORRECT> >(rep, m, "correct", rl::fair_context_bound_scheduler_type, 0, b, MUST_PASS);
    check<sub_test<CORRECT> >(rep, m, "correct", rl::random_scheduler_type, scaled(200000), 0, MUST_PASS);
    check<sub_test<BROKEN_L> >(rep, m, "broken (L acquire)", rl::fair_context_bound_scheduler_type, 0, b, MUST_FAIL);
    check<sub_test<BROKEN_L> >(rep, m, "broken (L acquire)", rl::random_scheduler_type, scaled(200000), 0, MAY_FAIL);
    check<sub_test<BROKEN_NO_RECHECK> >(rep, m, "broken (no re-check)", rl::fair_context_bound_scheduler_type, 0, b, MUST_FAIL);
    check<sub_test<BROKEN_NO_RECHECK> >(rep, m, "broken (no re-check)", rl::random_scheduler_type, scaled(200000), 0, MAY_FAIL);
    return finish(rep, m);
}
