/* Relacy model: nq_sub_close (nq__sub_shutdown, then the free) against a
 * thread blocked in nq_sub_recv, and against a notify's push
 * (src/core/sub.c: nq__sub_shutdown, nq__sub_detach, nq__sub_quiesce,
 * nq_sub_recv, nq__sub_recv_some, nq__sub_enter/leave, nq__sub_arm;
 * src/core/sub.h nq__sub_push_held; park.h).
 *
 *   C                                             here
 *   nq__sub_shutdown: fetch_or(rstate, CLOSING)   close(): same; the
 *     seq_cst; nq__sub_detach: nq__hold_any;        subscription is allocated
 *     attached: drop it from the handle's           in before() and marked
 *     array (RECV cleared with the last),           freed at the end of
 *     attached = 0, store(armed, 0) relaxed,        close() (model.h, freed
 *     store(closed, 1) release; nq__release;        objects); the handle's
 *     nq__park_wake; spin while load(rstate)        array (one entry) and
 *     acquire & (BUSY | BLOCKED);                   attached are rl::var
 *     nq__sub_quiesce: nq__hold_any, nq__release,   (plain data under HELD)
 *     spin while load(inflight) acquire != 0;
 *     nq__sub_destroy frees it
 *   nq_sub_recv, no deadline, no waker: (BLOCKED  recv(): same
 *     set: fetch_or acquire); loop:
 *     nq__sub_recv_some: nq__sub_enter (CAS
 *       BUSY acquire unless CLOSING: ECLOSED);
 *       take one (load(stamp) acquire == 2h + 2);
 *       none and load(closed) acquire:
 *       take again, none: ECLOSED (TOLD);
 *       nq__sub_leave (fetch_and ~BUSY release)
 *     park_prepare (P); load(rstate) seq_cst (L)
 *     & CLOSING, or nq__sub_arm fails: cancel,
 *     look again; else park_commit, park_cancel
 *     then fetch_and(rstate, ~BLOCKED) release:
 *     its last touch of the subscription
 *   nq__sub_arm(s, sleeping = 1): nq__hold,       arm(): same; the
 *     armed = 1 if attached, nq__release; then      "shortcut" cases arm as
 *     !has_args (load(stamp) acquire < 2h + 2)      the code before 2683f70
 *     && !load(closed) acquire                      did: no hold if armed is
 *                                                   set already
 *   nq__notify_slow with RECV: nq__hold; each     notify(): one subscription
 *     subscription in the array: push; armed:
 *     owe a wake-up; nq__release; run it
 * Left out: q->lock (stats only), the owner's on_close, the waker, the
 * TOLD bookkeeping's readers, deadlines, the spin rounds, and the closer's
 * extra nq__park_wake every 256 spins: a backstop that makes a missed
 * CLOSING cost time, not a hang; the model checks that the protocol does not
 * need it.
 *
 * The receiver is in nq_sub_recv when the close starts (BLOCKED set before
 * the threads run: closing a subscription while another thread may still
 * call in is the caller's bug). It starts with armed set (a receive armed
 * and found args) or clear.
 * Checked: the receiver returns NQ_ECLOSED (or the pushed arg, received
 * before the close began), nothing touches the subscription after close
 * frees it (asserted at every touch), no push touches it after its detach
 * (asserted under HELD: it is still attached), no deadlock (the closer
 * spinning for ever on BLOCKED is a livelock).
 *
 * The CLOSING check after park_prepare (L) is not needed by the code as it
 * is: a receiver about to sleep arms under HELD, so its arm and the
 * closer's detach are ordered by HELD (an arm after the detach finds it
 * detached and does not sleep; a detach after the arm is followed by the
 * closer's park_wake, whose R reads the receiver's park_prepare): "L
 * removed" is run for information and passes. L is what covers a close for
 * an arm that takes no HELD, as the code before 2683f70 had it when armed
 * was set already ("shortcut" cases): that arm is correct with L (the
 * notify lost wake-up of sub_wake.cpp aside: the close here wakes the
 * receiver anyway), and L weakened or removed there is caught.
 *
 * Broken variants, each must be caught:
 *   L relaxed, shortcut  the receiver's CLOSING check relaxed, with the
 *                  arm of the code before 2683f70: nothing orders the
 *                  closer's fetch_or and park_wake against the receiver's
 *                  park_prepare and re-checks.
 *   L removed, shortcut  the same check gone.
 *   detach without HELD  the array entry, attached, armed, closed and RECV
 *                  changed without taking HELD: a notify in flight pushes
 *                  into a subscription being freed.
 *   no wait        close frees without waiting for BUSY and BLOCKED to
 *                  clear: the receiver touches freed memory.
 * The notify cases (three threads: a search 300 times longer) run only for
 * the correct variant and "detach without HELD".
 */
#include "model.h"

using namespace nqm;

enum { CORRECT, CORRECT_SHORTCUT, BROKEN_L_RELAXED, BROKEN_L_REMOVED, BROKEN_DETACH_NO_HELD,
       BROKEN_NO_WAIT, L_REMOVED };
enum { E_AGAIN = -11, E_CLOSED = -3 };
enum { R_BUSY = 1, R_BLOCKED = 2, R_TOLD = 4, R_CLOSING = 8 };
static const unsigned CAP = 1;

struct sub {
    rl::atomic<unsigned long> stamp[CAP];
    rl::var<long> arg[CAP];
    rl::atomic<unsigned long> tail, head;
    rl::atomic<unsigned> armed, closed, inflight, rstate;
    rl::var<int> attached;
    park pk;
    explicit sub(unsigned armed0) {
        for (unsigned i = 0; i < CAP; i++) {
            stamp[i]($).store(0, rl::mo_relaxed);
            arg[i]($) = 0;
        }
        tail($).store(0, rl::mo_relaxed);
        head($).store(0, rl::mo_relaxed);
        armed($).store(armed0, rl::mo_relaxed);
        closed($).store(0, rl::mo_relaxed);
        inflight($).store(0, rl::mo_relaxed);
        rstate($).store(R_BLOCKED, rl::mo_relaxed); /* in nq_sub_recv already */
        attached($) = 1;
    }
};

template <int V, bool PRODUCER, unsigned ARMED>
struct close_test : rl::test_suite<close_test<V, PRODUCER, ARMED>, PRODUCER ? 3 : 2> {
    hword hw;                /* the handle's word */
    rl::var<sub *> subs;     /* the handle's array: one entry at most */
    sub *s;                  /* the closer's and the receiver's pointer */
    /* Bookkeeping for the checks (plain: one thread runs at a time) */
    bool freed;              /* close "freed" s (model.h: freed objects) */
    int rc;
    long got;

    void before() {
        s = new sub(ARMED);
        subs($) = s;
        hw.word($).store(hword::RECV, rl::mo_relaxed);
        freed = false;
        rc = 1;
        got = 0;
    }
    void after() {
        RL_ASSERT(freed);
        delete s;
        RL_ASSERT(rc == E_CLOSED || (PRODUCER && rc == 0 && got == 1));
        unsigned w = hw.word($).load(rl::mo_relaxed);
        RL_ASSERT((w & (hword::HELD | hword::RECV)) == 0);
    }

    /* --- producer ---------------------------------------------------------- */

    /* nq__notify_slow: nq__sub_push_held on each subscription */
    void notify(long a) {
        unsigned w = hw.hold();
        sub *owe = NULL;
        if (w & hword::RECV) {
            sub *x = subs($);
            RL_ASSERT(x != NULL && !freed && x->attached($));
            unsigned long t = x->tail($).load(rl::mo_relaxed);
            x->arg[t % CAP]($) = a; /* capacity 1, one push: never full */
            x->stamp[t % CAP]($).store(2 * t + 2, rl::mo_release);
            x->tail($).store(t + 1, rl::mo_relaxed);
            if (x->armed($).load(rl::mo_relaxed)) {
                x->armed($).store(0, rl::mo_relaxed);
                x->inflight($).fetch_add(1, rl::mo_relaxed);
                owe = x;
            }
        }
        hw.release(w);
        if (owe != NULL) { /* nq__sub_run_wakers */
            RL_ASSERT(!freed);
            owe->pk.wake(park_orders_c());
            RL_ASSERT(!freed);
            owe->inflight($).fetch_sub(1, rl::mo_release);
        }
    }

    /* --- receiver ---------------------------------------------------------- */

    /* The receiver's every touch of the subscription: never after the free. */
    sub *S() {
        RL_ASSERT(!freed);
        return s;
    }
    int enter() {
        unsigned v = S()->rstate($).load(rl::mo_relaxed);
        for (;;) {
            if (v & R_CLOSING)
                return E_CLOSED;
            if (!(v & R_BUSY) &&
                S()->rstate($).compare_exchange_strong(v, v | R_BUSY, rl::mo_acquire, rl::mo_relaxed))
                return 0;
            if (v & R_BUSY) {
                rl::yield(1, $);
                v = S()->rstate($).load(rl::mo_relaxed);
            }
        }
    }
    void leave(unsigned set) {
        if (set)
            S()->rstate($).fetch_or(set, rl::mo_relaxed);
        S()->rstate($).fetch_and(~(unsigned)R_BUSY, rl::mo_release);
    }
    int take(long *a) {
        unsigned long h = S()->head($).load(rl::mo_relaxed);
        if (S()->stamp[h % CAP]($).load(rl::mo_acquire) != 2 * h + 2)
            return 0;
        *a = S()->arg[h % CAP]($);
        S()->head($).store(h + 1, rl::mo_release);
        return 1;
    }
    bool has_args() {
        unsigned long h = S()->head($).load(rl::mo_relaxed);
        return S()->stamp[h % CAP]($).load(rl::mo_acquire) >= 2 * h + 2;
    }
    /* nq__sub_recv_some, one arg, no waker */
    int recv_some(long *arg) {
        int r = enter();
        if (r < 0)
            return r;
        int k = take(arg);
        unsigned told = 0;
        if (k == 0 && S()->closed($).load(rl::mo_acquire)) {
            k = take(arg);
            if (k == 0) {
                told = R_TOLD;
                r = E_CLOSED;
            }
        }
        leave(told);
        if (r < 0)
            return r;
        return k > 0 ? k : E_AGAIN;
    }
    /* nq__sub_arm(s, 1) */
    int arm() {
        bool shortcut = V == CORRECT_SHORTCUT || V == BROKEN_L_RELAXED || V == BROKEN_L_REMOVED;
        if (!shortcut || !S()->armed($).load(rl::mo_relaxed)) {
            unsigned w = hw.hold();
            int att = S()->attached($);
            if (att)
                S()->armed($).store(1, rl::mo_relaxed);
            hw.release(w);
            if (!att)
                return 0;
        }
        return !has_args() && !S()->closed($).load(rl::mo_acquire);
    }
    /* nq_sub_recv, no deadline, BLOCKED already set */
    void recv() {
        park_orders po = park_orders_c();
        long arg = 0;
        int r;
        for (;;) {
            r = recv_some(&arg);
            if (r != E_AGAIN)
                break;
            S()->pk.prepare(po); /* P */
            bool closing = false;
            if (V != BROKEN_L_REMOVED && V != L_REMOVED) { /* L */
                mo_t l = V == BROKEN_L_RELAXED ? rl::mo_relaxed : rl::mo_seq_cst;
                closing = (S()->rstate($).load(l) & R_CLOSING) != 0;
            }
            if (closing || !arm()) {
                S()->pk.cancel();
                continue;
            }
            S()->pk.commit(false);
            S()->pk.cancel();
        }
        S()->rstate($).fetch_and(~(unsigned)R_BLOCKED, rl::mo_release); /* the last touch */
        rc = r > 0 ? 0 : r;
        got = arg;
    }

    /* --- closer ------------------------------------------------------------ */

    void detach() {
        if (V == BROKEN_DETACH_NO_HELD) {
            if (s->attached($)) {
                subs($) = NULL;
                hw.word($).fetch_and(~(unsigned)hword::RECV, rl::mo_relaxed);
                s->attached($) = 0;
                s->armed($).store(0, rl::mo_relaxed);
                s->closed($).store(1, rl::mo_release);
            }
            return;
        }
        unsigned w = hw.hold();
        if (s->attached($)) {
            subs($) = NULL;
            w &= ~(unsigned)hword::RECV; /* the last subscription */
            s->attached($) = 0;
            s->armed($).store(0, rl::mo_relaxed);
            s->closed($).store(1, rl::mo_release);
        }
        hw.release(w);
    }
    /* nq__sub_shutdown, then nq__sub_destroy */
    void close() {
        s->rstate($).fetch_or(R_CLOSING, rl::mo_seq_cst);
        detach();
        s->pk.wake(park_orders_c());
        if (V != BROKEN_NO_WAIT)
            while (s->rstate($).load(rl::mo_acquire) & (R_BUSY | R_BLOCKED))
                rl::yield(1, $);
        /* nq__sub_quiesce */
        hw.release(hw.hold());
        while (s->inflight($).load(rl::mo_acquire) != 0)
            rl::yield(1, $);
        freed = true; /* nq__sub_destroy (the memory goes in after()) */
    }

    void thread(unsigned idx) {
        if (idx == 0)
            close();
        else if (idx == 1)
            recv();
        else
            notify(1);
    }
};

template <int V, bool PRODUCER, unsigned ARMED>
static void run(report &rep, const char *what, unsigned b, expect e) {
    const char *m = "sub_close";
    char w[160];
    std::snprintf(w, sizeof(w), "%s, %s, armed %s", what, PRODUCER ? "a notify" : "no notify",
                  ARMED ? "set" : "clear");
    check<close_test<V, PRODUCER, ARMED> >(rep, m, w, rl::fair_context_bound_scheduler_type, 0,
                                          b, e);
    check<close_test<V, PRODUCER, ARMED> >(rep, m, w, rl::random_scheduler_type, scaled(50000),
                                          0, e == MUST_PASS ? MUST_PASS : MAY_FAIL);
}

int main() {
    report rep;
    unsigned b = bound(3);
    run<CORRECT, false, 1>(rep, "correct", b, MUST_PASS);
    run<CORRECT, true, 1>(rep, "correct", b, MUST_PASS);
    run<L_REMOVED, false, 1>(rep, "L removed (not needed)", b, MAY_FAIL);
    run<CORRECT_SHORTCUT, false, 1>(rep, "correct, shortcut", b, MUST_PASS);
    run<BROKEN_L_RELAXED, false, 1>(rep, "broken (L relaxed, shortcut)", b, MUST_FAIL);
    run<BROKEN_L_REMOVED, false, 1>(rep, "broken (L removed, shortcut)", b, MUST_FAIL);
    run<BROKEN_DETACH_NO_HELD, true, 0>(rep, "broken (detach without HELD)", b, MUST_FAIL);
    run<BROKEN_NO_WAIT, false, 1>(rep, "broken (no wait)", b, MUST_FAIL);
    return finish(rep, "sub_close");
}
