/* Relacy model: the handle word (src/core/handle.h H1-H5) between nq_notify
 * and a thread blocked in nq_wait (src/core/wait.c W1-W3, "Wake-up of a
 * blocked nq_wait"; src/core/queue.c nq_notify, nq__notify_slow).
 *
 *   C                                             here
 *   nq_notify fast path (H3): load(word)          notify(): same; the word is
 *     relaxed; while no flag (HELD, WAITERS,        hword (model.h): flags in
 *     RECV): store(arg cell) relaxed (H5), CAS      the low bits, seq above;
 *     word -> seq + 1 (release, fail relaxed)       the arg cell is rl::atomic
 *   nq__notify_slow: nq__hold (CAS acquire         slow(): same; the list of
 *     from a word without HELD); store(arg cell)    waits (one at most here)
 *     relaxed; seq + 1 in the word it will          and the wait's fields are
 *     release; nq__complete_due: each listed        rl::var: plain data that
 *     wait with after < seq; WAITERS cleared        Relacy checks stay under
 *     when the list empties (W2); nq__release       HELD (or handed over by
 *     (store release); nq__wait_run_wakers          state and inflight)
 *   nq__wait_complete_held: unlink; status, arg;  complete(): same
 *     fetch_add(inflight) relaxed; store(state,
 *     DONE) seq_cst (W)
 *   nq__wait_run_wakers -> nq__wait_thread_wake:  run_waker(): same
 *     nq__park_wake (R); fetch_sub(inflight)
 *     release
 *   nq__wait_attach: nq__hold; seq > after:       attach(): same
 *     DONE at once with the arg cell (relaxed);
 *     else link it, release with WAITERS (W2)
 *   nq_wait: park_prepare (P); load(state)        wait(): same, no deadline;
 *     seq_cst (L); park_commit; park_cancel;        the wait is allocated and
 *     nq__wait_quiesce: nq__hold_any then           freed per call (C: on the
 *     nq__release; spin while load(inflight)        stack), so Relacy reports
 *     acquire != 0                                  any touch after return
 *                                                   (a flag: model.h, freed
 *                                                   objects)
 * Left out: generations, LIVE and the tag (one live handle: H4 is not
 * modelled), seq_hi (no 2^32 carry), RECV (no subscription: sub_*.cpp),
 * deadlines and cancels, the queue's refs and counters.
 *
 * Checked, in every execution: no lost wait (a listed wait whose `after` is
 * below seq is completed: otherwise the waiter sleeps for ever, a deadlock);
 * the arg a wait returns is one whose notification is numbered > after
 * (each notify records the number its counting exchange gave its arg; the
 * initial cell, 0, is numbered 0); each wait is completed exactly once; at
 * the end seq counts every notify and WAITERS and HELD are clear.
 *
 * Cases: one notifier calls nq_notify(h, 1) then nq_notify(h, 2); or two
 * notifiers call nq_notify once each (args 1 and 2, numbered in the order
 * their exchanges win: the fast paths race on the arg cell). The waiter
 * calls nq_wait(after 0), then nq_wait(after 1); against two notifiers only
 * nq_wait(after 1) (it must return the arg numbered 2; both calls make the
 * search 30 times longer).
 *
 * Broken variants, each must be caught:
 *   after >=       nq__wait_attach completing when seq >= after: the wait
 *                  returns a notification that is not after `after`.
 *   fast WAITERS   the fast path taken with WAITERS set (it checks only
 *                  HELD and RECV): a notify counts past a listed wait
 *                  without completing it.
 *   attach relaxed nq__wait_attach's hold taken with a relaxed exchange: it
 *                  reads a seq past `after` but a stale arg cell, and the
 *                  list unsynchronised.
 *   release relaxed nq__release's store relaxed: the next holder reads the
 *                  list and the wait's fields unsynchronised.
 *   L acquire      the waiter's re-check of state weakened to acquire.
 *   no quiesce     nq_wait returns without waiting for inflight to drop:
 *                  the completer's park_wake and inflight decrement touch
 *                  its frame after it is gone (W1).
 */
#include "model.h"

using namespace nqm;

enum { CORRECT, BROKEN_AFTER, BROKEN_FAST, BROKEN_ATTACH_RELAXED, BROKEN_RELEASE_RELAXED,
       BROKEN_L, BROKEN_NO_QUIESCE };
enum { W_PENDING = 0, W_DONE = 1 };
static const int NWAITS = 2;

struct wait_obj {
    int ord; /* which of the waiter's calls (bookkeeping, not modelled) */
    rl::var<unsigned long> after;
    rl::var<int> listed, status;
    rl::var<long> arg;
    rl::atomic<int> state;
    rl::atomic<unsigned> inflight;
    park pk;
    explicit wait_obj(int k) : ord(k) {
        listed($) = 0;
        status($) = -1;
        arg($) = 0;
        state($).store(W_PENDING, rl::mo_relaxed);
        inflight($).store(0, rl::mo_relaxed);
    }
};

template <int V, int NOTIFIERS>
struct hw_test : rl::test_suite<hw_test<V, NOTIFIERS>, NOTIFIERS + 1> {
    hword hw;
    rl::atomic<long> cell;         /* the arg cell (H5) */
    rl::var<wait_obj *> waiters;   /* the slot's list: at most one here */
    /* Bookkeeping for the checks, outside the model: Relacy runs one
     * thread at a time, so plain variables are exact. */
    /* the waiter's calls: nq_wait(after 0), nq_wait(after 1); with two
     * notifiers only the second (the search is three times larger) */
    static int first() { return NOTIFIERS == 1 ? 0 : 1; }
    static unsigned long after_of(int k) { return (unsigned long)k; }
    unsigned num[3];               /* num[arg]: the number its notify got */
    int completions[NWAITS];
    long got[NWAITS];
    wait_obj *objs[NWAITS];        /* deleted in after() */
    bool freed[NWAITS];            /* nq_wait returned: its frame is gone */

    hold_orders orders(bool attach) const {
        hold_orders o = hold_orders_c();
        if (V == BROKEN_ATTACH_RELAXED && attach)
            o.take = rl::mo_relaxed;
        if (V == BROKEN_RELEASE_RELAXED)
            o.drop = rl::mo_relaxed;
        return o;
    }

    void before() {
        cell($).store(0, rl::mo_relaxed);
        waiters($) = NULL;
        for (int i = 0; i < 3; i++)
            num[i] = 0;
        for (int i = 0; i < NWAITS; i++) {
            completions[i] = 0;
            got[i] = -1;
            objs[i] = NULL;
            freed[i] = false;
        }
    }
    void after() {
        unsigned w = hw.word($).load(rl::mo_relaxed);
        RL_ASSERT(hword::seq(w) == 2);
        RL_ASSERT((w & hword::FLAGS) == 0);
        for (int i = 0; i < NWAITS; i++)
            delete objs[i];
        for (int i = first(); i < NWAITS; i++) {
            RL_ASSERT(completions[i] == 1);                /* exactly once */
            RL_ASSERT(got[i] >= 0 && got[i] <= 2);
            RL_ASSERT(num[got[i]] > after_of(i));          /* numbered after `after` */
        }
    }

    /* nq__wait_complete_held */
    void complete(wait_obj *x, long a) {
        RL_ASSERT(x->listed($) == 1);
        waiters($) = NULL;
        x->listed($) = 0;
        x->status($) = 0;
        x->arg($) = a;
        completions[x->ord]++;
        x->inflight($).fetch_add(1, rl::mo_relaxed);
        x->state($).store(W_DONE, rl::mo_seq_cst); /* W */
    }
    /* nq__wait_run_wakers: nq__wait_thread_wake */
    void run_waker(wait_obj *x) {
        RL_ASSERT(!freed[x->ord]);
        x->pk.wake(park_orders_c()); /* R */
        RL_ASSERT(!freed[x->ord]);
        x->inflight($).fetch_sub(1, rl::mo_release);
    }

    /* nq__notify_slow */
    void slow(long a) {
        hold_orders o = orders(false);
        unsigned w = hw.hold(o);
        cell($).store(a, rl::mo_relaxed);
        w += hword::SEQ_ONE;
        num[a] = hword::seq(w);
        wait_obj *done = NULL;
        if (w & hword::WAITERS) { /* nq__complete_due */
            wait_obj *x = waiters($);
            if (x != NULL && x->after($) < hword::seq(w)) {
                complete(x, a);
                done = x;
            }
            if (waiters($) == NULL) /* nq__waiters_flag (W2) */
                w &= ~(unsigned)hword::WAITERS;
        }
        hw.release(w, o);
        if (done != NULL)
            run_waker(done);
    }
    /* nq_notify */
    void notify(long a) {
        unsigned w = hw.word($).load(rl::mo_relaxed);
        unsigned busy = V == BROKEN_FAST ? (hword::HELD | hword::RECV) : (unsigned)hword::FLAGS;
        while (!(w & busy)) { /* H3 */
            cell($).store(a, rl::mo_relaxed); /* H5 */
            if (hw.word($).compare_exchange_strong(w, w + hword::SEQ_ONE, rl::mo_release,
                                                   rl::mo_relaxed)) {
                num[a] = hword::seq(w + hword::SEQ_ONE);
                return;
            }
        }
        slow(a);
    }

    /* nq__wait_attach: 1 if due at once, 0 if listed */
    int attach(unsigned long after, wait_obj *x) {
        hold_orders o = orders(true);
        unsigned w = hw.hold(o);
        unsigned long s = hword::seq(w);
        x->after($) = after;
        bool due = V == BROKEN_AFTER ? s >= after : s > after;
        if (due) { /* W3 */
            x->status($) = 0;
            x->arg($) = cell($).load(rl::mo_relaxed);
            completions[x->ord]++;
            x->inflight($).fetch_add(1, rl::mo_relaxed);
            x->state($).store(W_DONE, rl::mo_seq_cst);
            hw.release(w, o);
            return 1;
        }
        RL_ASSERT(waiters($) == NULL);
        waiters($) = x;
        x->listed($) = 1;
        hw.release(w | hword::WAITERS, o); /* W2 */
        return 0;
    }

    /* nq_wait, no deadline: the arg it returns */
    long wait(int k) {
        wait_obj *x = objs[k] = new wait_obj(k);
        if (attach(after_of(k), x) == 1) {
            x->inflight($).fetch_sub(1, rl::mo_relaxed); /* no waker */
        } else {
            mo_t l = V == BROKEN_L ? rl::mo_acquire : rl::mo_seq_cst;
            for (;;) {
                x->pk.prepare(park_orders_c()); /* P */
                if (x->state($).load(l) != W_PENDING) { /* L */
                    x->pk.cancel();
                    break;
                }
                x->pk.commit(false);
                x->pk.cancel();
            }
            /* nq__wait_quiesce */
            hold_orders o = orders(false);
            hw.release(hw.hold(o), o);
            while (V != BROKEN_NO_QUIESCE && x->inflight($).load(rl::mo_acquire) != 0)
                rl::yield(1, $);
        }
        RL_ASSERT(x->status($) == 0);
        long a = x->arg($);
        freed[k] = true; /* C: nq_wait returns, its stack frame goes */
        return a;
    }

    void thread(unsigned idx) {
        if (idx < (unsigned)NOTIFIERS) {
            if (NOTIFIERS == 1) {
                notify(1);
                notify(2);
            } else {
                notify(1 + idx);
            }
            return;
        }
        for (int k = first(); k < NWAITS; k++)
            got[k] = wait(k);
    }
};

template <int V>
static void cases(report &rep, const char *what, unsigned b, bool broken) {
    expect e = broken ? MUST_FAIL : MUST_PASS, r = broken ? MAY_FAIL : MUST_PASS;
    const char *m = "handle_word";
    char w[128];
    std::snprintf(w, sizeof(w), "%s, one notifier", what);
    check<hw_test<V, 1> >(rep, m, w, rl::fair_context_bound_scheduler_type, 0, b, e);
    check<hw_test<V, 1> >(rep, m, w, rl::random_scheduler_type, scaled(100000), 0, r);
    std::snprintf(w, sizeof(w), "%s, two notifiers", what);
    check<hw_test<V, 2> >(rep, m, w, rl::fair_context_bound_scheduler_type, 0, b, e);
    check<hw_test<V, 2> >(rep, m, w, rl::random_scheduler_type, scaled(100000), 0, r);
}

int main() {
    report rep;
    unsigned b = bound(3);
    cases<CORRECT>(rep, "correct", b, false);
    cases<BROKEN_AFTER>(rep, "broken (after >=)", b, true);
    cases<BROKEN_FAST>(rep, "broken (fast WAITERS)", b, true);
    cases<BROKEN_ATTACH_RELAXED>(rep, "broken (attach relaxed)", b, true);
    cases<BROKEN_RELEASE_RELAXED>(rep, "broken (release relaxed)", b, true);
    cases<BROKEN_L>(rep, "broken (L acquire)", b, true);
    cases<BROKEN_NO_QUIESCE>(rep, "broken (no quiesce)", b, true);
    return finish(rep, "handle_word");
}
