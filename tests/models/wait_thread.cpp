/* Relacy model: a thread blocked in nq_wait against nq_notify, and the
 * `after` sequence check (src/core/wait.c "Wake-up protocol of a blocked
 * nq_wait", nq__wait_attach, nq__wait_complete_locked, nq__wait_quiesce;
 * src/core/queue.c nq_notify).
 *
 *   C                                             here
 *   nq_notify: lock(slot); last_arg = arg;        notify(): same; last_arg,
 *     store(seq, seq + 1) relaxed; each listed      the waiter list, status,
 *     wait with after < seq completes               arg, after, listed are
 *   nq__wait_complete_locked: unlink; status,       rl::var (plain data under
 *     arg; fetch_add(inflight) relaxed;             the slot lock, or handed
 *     store(state, DONE) seq_cst (W)                over by state/inflight)
 *   unlock; nq__wait_run_wakers: nq__park_wake    same
 *     (R), fetch_sub(inflight) release
 *   nq__wait_attach: lock(slot); load(seq)        attach(): same
 *     relaxed; seq > after: DONE at once, with
 *     last_arg; else list it
 *   nq_wait: park_prepare (P); load(state)        wait(): same, no deadline;
 *     seq_cst (L); park_commit; park_cancel;        the wait is allocated and
 *     nq__wait_quiesce: lock/unlock the slot,       freed per call (C: on the
 *     spin while load(inflight) acquire != 0        stack), so Relacy reports
 *                                                   any touch after return
 * Left out: deadlines and cancels, generations, the queue's refs and
 * counters; one waiter at a time on the list.
 *
 * The notifier calls nq_notify(h, 1) then nq_notify(h, 2) (arg = the
 * notification's number). The waiter calls nq_wait(after 0), which must
 * return an arg > 0, then nq_wait(after 1), which must return 2: the first
 * notification numbered > 1 (or, attached after it, the latest arg, 2).
 *
 * Broken variants, each must be caught:
 *   L acquire    the waiter's re-check of state weakened to acquire.
 *   after >=     nq__wait_attach completing when seq >= after (one too
 *                early): nq_wait(after 1) can return notification 1.
 */
#include "model.h"

using namespace nqm;

enum { CORRECT, BROKEN_L, BROKEN_AFTER };
enum { W_PENDING = 0, W_DONE = 1 };

struct wait_obj {
    rl::var<unsigned long> after;
    rl::var<int> listed, status;
    rl::var<long> arg;
    rl::atomic<int> state;
    rl::atomic<unsigned> inflight;
    park pk;
    wait_obj() {
        listed($) = 0;
        status($) = -1;
        arg($) = 0;
        state($).store(W_PENDING, rl::mo_relaxed);
        inflight($).store(0, rl::mo_relaxed);
    }
};

template <int V>
struct wait_test : rl::test_suite<wait_test<V>, 2> {
    lock slot;                        /* the handle slot's lock */
    rl::atomic<unsigned long> seq;    /* written under it, relaxed */
    rl::var<long> last_arg;
    rl::var<wait_obj *> waiters;      /* the list: at most one here */

    void before() {
        seq($).store(0, rl::mo_relaxed);
        last_arg($) = 0;
        waiters($) = NULL;
    }

    /* nq_notify */
    void notify(long a) {
        slot.take_polite();
        last_arg($) = a;
        seq($).store(seq($).load(rl::mo_relaxed) + 1, rl::mo_relaxed);
        wait_obj *w = waiters($), *done = NULL;
        if (w == NULL) {
            slot.drop();
            return;
        }
        unsigned long s = seq($).load(rl::mo_relaxed);
        if (w->after($) < s) { /* nq__wait_complete_locked */
            waiters($) = NULL;
            w->listed($) = 0;
            w->status($) = 0;
            w->arg($) = a;
            w->inflight($).fetch_add(1, rl::mo_relaxed);
            w->state($).store(W_DONE, rl::mo_seq_cst); /* W */
            done = w;
        }
        slot.drop();
        if (done != NULL) { /* nq__wait_run_wakers: nq__wait_thread_wake */
            done->pk.wake(park_orders_c());
            done->inflight($).fetch_sub(1, rl::mo_release);
        }
    }

    /* nq__wait_attach: 1 if due at once, 0 if listed */
    int attach(unsigned long after, wait_obj *w) {
        slot.take();
        unsigned long s = seq($).load(rl::mo_relaxed);
        w->after($) = after;
        bool due = V == BROKEN_AFTER ? s >= after : s > after;
        if (due) {
            w->status($) = 0;
            w->arg($) = last_arg($);
            w->inflight($).fetch_add(1, rl::mo_relaxed);
            w->state($).store(W_DONE, rl::mo_seq_cst);
            slot.drop();
            return 1;
        }
        waiters($) = w;
        w->listed($) = 1;
        slot.drop();
        return 0;
    }

    /* nq_wait, no deadline: the arg it returns */
    long wait(unsigned long after) {
        wait_obj *w = new wait_obj;
        if (attach(after, w) == 1) {
            w->inflight($).fetch_sub(1, rl::mo_relaxed); /* no waker */
        } else {
            mo_t l = V == BROKEN_L ? rl::mo_acquire : rl::mo_seq_cst;
            for (;;) {
                w->pk.prepare(park_orders_c());
                if (w->state($).load(l) != W_PENDING) { /* L */
                    w->pk.cancel();
                    break;
                }
                w->pk.commit(false);
                w->pk.cancel();
            }
            /* nq__wait_quiesce */
            slot.take();
            slot.drop();
            while (w->inflight($).load(rl::mo_acquire) != 0)
                rl::yield(1, $);
        }
        RL_ASSERT(w->status($) == 0);
        long a = w->arg($);
        delete w; /* C: nq_wait returns, its stack frame goes */
        return a;
    }

    void thread(unsigned idx) {
        if (idx == 0) {
            notify(1);
            notify(2);
            return;
        }
        long a = wait(0);
        RL_ASSERT(a == 1 || a == 2);
        a = wait(1);
        RL_ASSERT(a == 2);
    }
};

int main() {
    report rep;
    const char *m = "wait_thread";
    unsigned b = bound(3);
    check<wait_test<CORRECT> >(rep, m, "correct", rl::fair_context_bound_scheduler_type, 0, b, MUST_PASS);
    check<wait_test<CORRECT> >(rep, m, "correct", rl::random_scheduler_type, scaled(200000), 0, MUST_PASS);
    check<wait_test<BROKEN_L> >(rep, m, "broken (L acquire)", rl::fair_context_bound_scheduler_type, 0, b, MUST_FAIL);
    check<wait_test<BROKEN_L> >(rep, m, "broken (L acquire)", rl::random_scheduler_type, scaled(200000), 0, MAY_FAIL);
    check<wait_test<BROKEN_AFTER> >(rep, m, "broken (after >=)", rl::fair_context_bound_scheduler_type, 0, b, MUST_FAIL);
    check<wait_test<BROKEN_AFTER> >(rep, m, "broken (after >=)", rl::random_scheduler_type, scaled(200000), 0, MAY_FAIL);
    return finish(rep, m);
}
