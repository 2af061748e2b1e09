/* Relacy model: the receiver-armed wake-up of a blocked nq_sub_recv
 * (src/core/sub.c "Wake-up protocol (the receiver arms, the producer
 * takes)", nq__sub_arm, nq_sub_recv; the push's end in src/core/sub.h
 * nq__sub_push_held; src/core/queue.c nq__notify_held; park.h).
 *
 *   C                                             here
 *   nq__notify_slow: nq__hold; push:              push(): same; args are
 *     store(arg); store(stamp, 2t + 2) release;     rl::var (the ring's
 *     load(armed) relaxed: set: store(armed,        capacity is never reached
 *     0) relaxed, fetch_add(inflight) relaxed,      here: sub_ring.cpp checks
 *     owe a wake-up; nq__release                    the ring itself)
 *   nq__sub_run_wakers: nq__park_wake (R);        same
 *     fetch_sub(inflight) release
 *   nq_sub_recv, no deadline, no waker:           recv(): same
 *     nq__sub_recv_some: take one arg (load
 *       (stamp) acquire == 2h + 2: copy, store
 *       (head) release)
 *     park_prepare (P)
 *     nq__sub_arm(s, sleeping = 1): nq__hold;
 *       attached: store(armed, 1) relaxed;
 *       nq__release; then the re-check
 *       (nq__sub_has_args: load(stamp) acquire
 *       >= 2h + 2), load(closed) acquire
 *     armed and empty: park_commit; park_cancel
 *     else park_cancel, look again
 * Left out: rstate (BUSY, BLOCKED, CLOSING: sub_close.cpp), the spin rounds
 * before the first arm (they repeat the first look), deadlines, the waker
 * (a waker is called unconditionally by a producer that took the arm; only
 * the park's wake is conditional, on R), drops.
 *
 * The receiver calls nq_sub_recv twice and must get both args, in order; a
 * lost wake-up leaves it asleep with the producers done: a deadlock. Cases:
 * one producer pushes 1 then 2; or two producers push one arg each.
 *
 * A receiver about to sleep arms under HELD every time (nq__sub_arm's
 * `sleeping`). The code before 2683f70 skipped the hold when it read armed
 * already set (a relaxed load), and that is caught ("armed shortcut"): a
 * receive arms, finds in its re-check an arg pushed just before the arm,
 * and returns with armed left set; the next push takes the arm (armed = 0)
 * and its park_wake comes before the next nq_sub_recv's park_prepare in the
 * seq_cst order (R reads 0: nobody asleep). That nq_sub_recv has no HELD
 * between its park_prepare and the producer, so it may read armed still 1
 * (the producer's store of 0 is not ordered before its load) and the cell
 * from before the push (nothing pairs with its acquire): it skips the arm,
 * finds the ring empty and sleeps with an arg in it; every later push sees
 * armed clear and owes nothing.

 * Broken variants, each must be caught:
 *   armed shortcut  the arm of the code before 2683f70 (above).
 *   no re-check     the receiver sleeps after arming with no look at tail.
 *   arm without HELD  armed stored (relaxed) without taking HELD: a push
 *                   may miss the arm while the re-check misses the push.
 *   late prepare    park_prepare after the arm and its re-check: a push
 *                   between them runs park_wake before there is a sleep to
 *                   wake.
 */
#include "model.h"

using namespace nqm;

enum { CORRECT, BROKEN_SHORTCUT, BROKEN_NO_RECHECK, BROKEN_ARM_NO_HELD, BROKEN_PREPARE_LATE };
static const unsigned CAP = 2;

template <int V, unsigned PRODUCERS>
struct wake_test : rl::test_suite<wake_test<V, PRODUCERS>, PRODUCERS + 1> {
    hword hw;
    rl::atomic<unsigned long> stamp[CAP];
    rl::var<long> arg[CAP];
    rl::atomic<unsigned long> tail, head;
    rl::atomic<unsigned> armed, inflight;
    rl::var<int> attached;
    park pk;

    void before() {
        for (unsigned i = 0; i < CAP; i++) {
            stamp[i]($).store(0, rl::mo_relaxed);
            arg[i]($) = 0;
        }
        tail($).store(0, rl::mo_relaxed);
        head($).store(0, rl::mo_relaxed);
        armed($).store(0, rl::mo_relaxed);
        inflight($).store(0, rl::mo_relaxed);
        attached($) = 1;
    }
    void after() { RL_ASSERT(inflight($).load(rl::mo_relaxed) == 0); }

    /* nq__notify_slow with RECV set: nq__sub_push_held, then the wake-up */
    void push(long a) {
        unsigned w = hw.hold();
        unsigned long t = tail($).load(rl::mo_relaxed);
        arg[t % CAP]($) = a;
        stamp[t % CAP]($).store(2 * t + 2, rl::mo_release); /* S1 */
        tail($).store(t + 1, rl::mo_relaxed);
        bool owe = false;
        if (armed($).load(rl::mo_relaxed)) { /* taken */
            armed($).store(0, rl::mo_relaxed);
            inflight($).fetch_add(1, rl::mo_relaxed);
            owe = true;
        }
        hw.release(w);
        if (owe) { /* nq__sub_run_wakers */
            pk.wake(park_orders_c());
            inflight($).fetch_sub(1, rl::mo_release);
        }
    }

    /* nq__sub_recv_some, one arg: 1 if it took one */
    int take(long *a) {
        unsigned long h = head($).load(rl::mo_relaxed);
        if (stamp[h % CAP]($).load(rl::mo_acquire) != 2 * h + 2)
            return 0;
        *a = arg[h % CAP]($);
        head($).store(h + 1, rl::mo_release);
        return 1;
    }
    /* nq__sub_has_args */
    bool has_args() {
        unsigned long h = head($).load(rl::mo_relaxed);
        return stamp[h % CAP]($).load(rl::mo_acquire) >= 2 * h + 2;
    }

    /* nq__sub_arm(s, 1): 1 if armed and still empty */
    int arm() {
        if (V == BROKEN_ARM_NO_HELD) {
            armed($).store(1, rl::mo_relaxed);
        } else if (V != BROKEN_SHORTCUT || !armed($).load(rl::mo_relaxed)) {
            unsigned w = hw.hold();
            if (attached($))
                armed($).store(1, rl::mo_relaxed);
            hw.release(w);
        }
        if (V == BROKEN_NO_RECHECK)
            return 1;
        return !has_args();
    }

    /* nq_sub_recv, no deadline */
    long recv() {
        park_orders po = park_orders_c();
        for (;;) {
            long a;
            if (take(&a))
                return a;
            if (V != BROKEN_PREPARE_LATE)
                pk.prepare(po); /* P */
            if (!arm()) {
                pk.cancel();
                continue;
            }
            if (V == BROKEN_PREPARE_LATE)
                pk.prepare(po);
            pk.commit(false);
            pk.cancel();
        }
    }

    void thread(unsigned idx) {
        if (idx < PRODUCERS) {
            if (PRODUCERS == 1) {
                push(1);
                push(2);
            } else {
                push(1 + idx);
            }
            return;
        }
        long a = recv(), b = recv();
        if (PRODUCERS == 1)
            RL_ASSERT(a == 1 && b == 2);
        else
            RL_ASSERT(a + b == 3 && a != b);
    }
};

template <int V>
static void cases(report &rep, const char *what, unsigned b, bool broken) {
    expect e = broken ? MUST_FAIL : MUST_PASS, r = broken ? MAY_FAIL : MUST_PASS;
    const char *m = "sub_wake";
    char w[128];
    std::snprintf(w, sizeof(w), "%s, one producer", what);
    check<wake_test<V, 1> >(rep, m, w, rl::fair_context_bound_scheduler_type, 0, b, e);
    check<wake_test<V, 1> >(rep, m, w, rl::random_scheduler_type, scaled(100000), 0, r);
    std::snprintf(w, sizeof(w), "%s, two producers", what);
    check<wake_test<V, 2> >(rep, m, w, rl::fair_context_bound_scheduler_type, 0, b, e);
    check<wake_test<V, 2> >(rep, m, w, rl::random_scheduler_type, scaled(100000), 0, r);
}

int main() {
    report rep;
    unsigned b = bound(3);
    cases<CORRECT>(rep, "correct", b, false);
    cases<BROKEN_SHORTCUT>(rep, "broken (armed shortcut, before 2683f70)", b, true);
    cases<BROKEN_NO_RECHECK>(rep, "broken (no re-check)", b, true);
    cases<BROKEN_ARM_NO_HELD>(rep, "broken (arm without HELD)", b, true);
    cases<BROKEN_PREPARE_LATE>(rep, "broken (late prepare)", b, true);
    return finish(rep, "sub_wake");
}
