/* Relacy model: a subscription's single-writer ring of stamped cells, both
 * overflow modes (src/core/sub.c S1-S4; the push in src/core/sub.h
 * nq__sub_push_held, the receive in sub.c nq__sub_take).
 *
 *   C                                             here
 *   nq__sub_push_held (under HELD):               push(): same; head_cache
 *     t = load(tail) relaxed; c = ring[tidx]        and tidx are rl::var
 *     drop-newest (S2): t - head_cache >= cap:      (plain data under HELD);
 *       head_cache = load(head) acquire; still      a drop-newest arg is an
 *       full: rejected + 1, return                  rl::var, so a producer
 *       store(c->arg) relaxed                       store not ordered after
 *     drop-oldest (S3): store(c->stamp, 2t + 1)     the receiver's read of
 *       relaxed; store(c->arg) release              the cell is a data race;
 *     store(c->stamp, 2t + 2) release (S1);         a drop-oldest arg is an
 *     store(tail, t + 1) relaxed; tidx + 1          rl::atomic (C: 8 bytes,
 *   nq__sub_take (inside BUSY): h = load(head)      never torn)
 *     relaxed; up to NQ__SUB_LAPS laps:           take(): same, line by line
 *     st = load(stamp) acquire (S1)
 *     st == 2h + 2: drop-oldest: load(arg)
 *       acquire, load(stamp) relaxed again:
 *       changed: a lap, look again; drop-newest:
 *       load(arg) relaxed; take it, h + 1
 *     st < 2h + 2: empty, stop
 *     else (lapped, S3): next = (st - 1) / 2 -
 *       cap + 1, or load(tail) relaxed - cap if
 *       later; skip to it
 *     then store(skipped) relaxed, store(head)
 *     release (S2)
 * Left out: the receiver's BUSY (one receiver here), the wake-up (see
 * sub_wake.cpp), the handle's other work under HELD.
 *
 * A push stores position t's arg as t + 1, so each arg names its position
 * (stamps and args start at 0: the C ring is calloc'ed). Checked: every arg
 * the receiver accepts is exactly the one pushed at the position it takes
 * it for (no stale cell, no cell of a later lap), in position order (FIFO);
 * at the end, S4: received + dropped + held == sent, received == what the
 * receiver got; for drop-newest S2 (tail - head <= cap, no skip, no lapped
 * stamp). One producer pushes (capacity 1: 3 args; capacity 2: 4 args); or
 * two producers push 2 args and 1 (capacity 2: one lap), handing the ring
 * over with HELD (model.h hword). The receiver takes up to 2 args, 3 times.
 *
 * Broken variants, each must be caught (in every shape):
 *   arg store relaxed   drop-oldest: the arg stored relaxed (S3's release):
 *                       a receiver that reads an overwriting arg need not
 *                       see its odd stamp, and takes it for position h.
 *   arg load relaxed    drop-oldest: the receiver's load of the arg relaxed
 *                       (S3's acquire): the same.
 *   no odd stamp        drop-oldest: the overwrite not marked (no 2t + 1):
 *                       the second look finds the stamp unchanged.
 *   no second look      drop-oldest: the arg taken without the second load
 *                       of the stamp.
 *   stamp store relaxed the stamp 2t + 2 stored relaxed (S1's release): a
 *                       receiver that sees it reads the arg stale (drop-
 *                       oldest: a wrong value; drop-newest: a data race).
 *   stamp load relaxed  the receiver's first load of the stamp relaxed (S1's
 *                       acquire): the same.
 *   head relaxed        drop-newest: the producer's refresh of head_cache
 *                       relaxed: it reuses a cell the receiver is reading.
 *   head store relaxed  drop-newest: the receiver's store of head relaxed:
 *                       the same.
 */
#include "model.h"

using namespace nqm;

enum {
    CORRECT,
    BROKEN_ARG_STORE,
    BROKEN_ARG_LOAD,
    BROKEN_NO_ODD,
    BROKEN_NO_RELOAD,
    BROKEN_STAMP_STORE,
    BROKEN_STAMP_LOAD,
    BROKEN_HEAD,
    BROKEN_HEAD_STORE
};
enum { NEWEST = 0, OLDEST = 1 };
static const unsigned TAKES = 3, BATCH = 2, LAPS = 64; /* NQ__SUB_LAPS */

template <int V, int MODE, unsigned CAP, unsigned PRODUCERS, unsigned PUSHES>
struct ring_test : rl::test_suite<ring_test<V, MODE, CAP, PRODUCERS, PUSHES>, PRODUCERS + 1> {
    static mo_t mo(bool broken, mo_t good) { return broken ? rl::mo_relaxed : good; }
    /* Producer 0 pushes PUSHES args, producer 1 (if any) one more. */
    static unsigned pushes(unsigned idx) { return idx == 0 ? PUSHES : 1; }
    static const unsigned SENT = PUSHES + PRODUCERS - 1;
    hword hw; /* HELD: the ring's one writer at a time (two producers) */
    /* The cells */
    rl::atomic<unsigned long> stamp[CAP];
    rl::atomic<long> arg[CAP];   /* drop-oldest */
    rl::var<long> varg[CAP];     /* drop-newest */
    /* Producer side */
    rl::atomic<unsigned long> tail, rejected;
    rl::var<unsigned long> head_cache;
    rl::var<unsigned> tidx;
    /* Receiver side */
    rl::atomic<unsigned long> head, skipped;
    unsigned hidx;               /* the one receiver's */
    /* Bookkeeping for the checks (plain: Relacy runs one thread at a time) */
    unsigned long got, next_pos;

    void before() {
        for (unsigned i = 0; i < CAP; i++) {
            stamp[i]($).store(0, rl::mo_relaxed);
            arg[i]($).store(0, rl::mo_relaxed);
            varg[i]($) = 0;
        }
        tail($).store(0, rl::mo_relaxed);
        rejected($).store(0, rl::mo_relaxed);
        head_cache($) = 0;
        tidx($) = 0;
        head($).store(0, rl::mo_relaxed);
        skipped($).store(0, rl::mo_relaxed);
        hidx = 0;
        got = 0;
        next_pos = 0;
    }
    void after() { /* S4, every thread done */
        unsigned long t = tail($).load(rl::mo_relaxed);
        unsigned long h = head($).load(rl::mo_relaxed), sk = skipped($).load(rl::mo_relaxed);
        unsigned long rej = rejected($).load(rl::mo_relaxed);
        RL_ASSERT(h <= t);
        unsigned long held = t - h < CAP ? t - h : CAP;
        unsigned long dropped = rej + sk + (t - h - held);
        unsigned long received = h - sk;
        RL_ASSERT(received == got);
        RL_ASSERT(t + rej == SENT);
        RL_ASSERT(received + dropped + held == SENT);
        if (MODE == NEWEST)
            RL_ASSERT(t - h <= CAP && sk == 0); /* S2 */
    }

    /* nq__sub_push_held */
    void push() {
        unsigned w = PRODUCERS > 1 ? hw.hold() : 0;
        unsigned long t = tail($).load(rl::mo_relaxed);
        unsigned i = tidx($);
        long a = (long)t + 1;
        if (MODE == NEWEST) {
            if (t - head_cache($) >= CAP) {
                head_cache($) = head($).load(mo(V == BROKEN_HEAD, rl::mo_acquire)); /* S2 */
                if (t - head_cache($) >= CAP) {
                    rejected($).store(rejected($).load(rl::mo_relaxed) + 1, rl::mo_relaxed);
                    if (PRODUCERS > 1)
                        hw.release(w);
                    return;
                }
            }
            varg[i]($) = a;
        } else { /* S3 */
            if (V != BROKEN_NO_ODD)
                stamp[i]($).store(2 * t + 1, rl::mo_relaxed);
            arg[i]($).store(a, mo(V == BROKEN_ARG_STORE, rl::mo_release));
        }
        stamp[i]($).store(2 * t + 2, mo(V == BROKEN_STAMP_STORE, rl::mo_release)); /* S1 */
        tail($).store(t + 1, rl::mo_relaxed);
        tidx($) = i + 1 == CAP ? 0 : i + 1;
        if (PRODUCERS > 1)
            hw.release(w);
    }

    /* nq__sub_take: accepted args in out, their positions in pos */
    size_t take(long *out, unsigned long *pos, size_t n) {
        const unsigned long cap = CAP;
        unsigned long h = head($).load(rl::mo_relaxed);
        unsigned long h0 = h, skip = 0;
        unsigned hi = hidx;
        size_t k = 0;
        for (unsigned laps = 0; k < n && laps < LAPS;) {
            unsigned long st = stamp[hi]($).load(mo(V == BROKEN_STAMP_LOAD, rl::mo_acquire));
            if (st == 2 * h + 2) {
                long v;
                if (MODE == OLDEST) {
                    v = arg[hi]($).load(mo(V == BROKEN_ARG_LOAD, rl::mo_acquire));
                    if (V != BROKEN_NO_RELOAD && stamp[hi]($).load(rl::mo_relaxed) != st) {
                        laps++;
                        continue; /* overwritten meanwhile: look again */
                    }
                } else {
                    v = varg[hi]($);
                }
                out[k] = v;
                pos[k++] = h++;
                hi = hi + 1 == cap ? 0 : hi + 1;
                continue;
            }
            if (st < 2 * h + 2)
                break; /* empty */
            RL_ASSERT(MODE == OLDEST); /* S2: drop-newest is never lapped */
            unsigned long next = (st - 1) / 2 - cap + 1;
            unsigned long t = tail($).load(rl::mo_relaxed);
            if (t > cap && t - cap > next)
                next = t - cap;
            laps++;
            skip += next - h;
            h = next;
            hi = (unsigned)(h % cap);
        }
        if (h != h0) {
            hidx = hi;
            if (skip)
                skipped($).store(skipped($).load(rl::mo_relaxed) + skip, rl::mo_relaxed);
            head($).store(h, mo(V == BROKEN_HEAD_STORE, rl::mo_release)); /* S2 */
        }
        return k;
    }

    void thread(unsigned idx) {
        if (idx < PRODUCERS) {
            for (unsigned k = 0; k < pushes(idx); k++)
                push();
            return;
        }
        for (unsigned r = 0; r < TAKES; r++) {
            long out[BATCH];
            unsigned long pos[BATCH];
            size_t n = take(out, pos, BATCH);
            for (size_t j = 0; j < n; j++) {
                RL_ASSERT(pos[j] >= next_pos);         /* FIFO */
                RL_ASSERT(out[j] == (long)pos[j] + 1); /* the arg of that position */
                next_pos = pos[j] + 1;
                got++;
            }
        }
    }
};

template <int V, int MODE, unsigned CAP, unsigned PRODUCERS, unsigned PUSHES>
static void run(report &rep, const char *what, unsigned b, expect e) {
    const char *m = "sub_ring";
    char w[160];
    if (PRODUCERS == 1)
        std::snprintf(w, sizeof(w), "%s, %s, capacity %u, one producer: %u args", what,
                      MODE == OLDEST ? "drop-oldest" : "drop-newest", CAP, PUSHES);
    else
        std::snprintf(w, sizeof(w), "%s, %s, capacity %u, two producers: %u args + 1", what,
                      MODE == OLDEST ? "drop-oldest" : "drop-newest", CAP, PUSHES);
    check<ring_test<V, MODE, CAP, PRODUCERS, PUSHES> >(
        rep, m, w, rl::fair_context_bound_scheduler_type, 0, b, e);
    check<ring_test<V, MODE, CAP, PRODUCERS, PUSHES> >(rep, m, w, rl::random_scheduler_type,
                                                      scaled(50000), 0,
                                                      e == MUST_PASS ? MUST_PASS : MAY_FAIL);
}

/* Every shape of one variant */
template <int V, int MODE>
static void shapes(report &rep, const char *what, unsigned b, expect e) {
    run<V, MODE, 1, 1, 3>(rep, what, b, e);
    run<V, MODE, 2, 1, 4>(rep, what, b, e);
    run<V, MODE, 2, 2, 2>(rep, what, b, e);
}

int main() {
    report rep;
    unsigned b = bound(3);
    shapes<CORRECT, OLDEST>(rep, "correct", b, MUST_PASS);
    shapes<CORRECT, NEWEST>(rep, "correct", b, MUST_PASS);
    shapes<BROKEN_ARG_STORE, OLDEST>(rep, "broken (arg store relaxed)", b, MUST_FAIL);
    shapes<BROKEN_ARG_LOAD, OLDEST>(rep, "broken (arg load relaxed)", b, MUST_FAIL);
    shapes<BROKEN_NO_ODD, OLDEST>(rep, "broken (no odd stamp)", b, MUST_FAIL);
    shapes<BROKEN_NO_RELOAD, OLDEST>(rep, "broken (no second look)", b, MUST_FAIL);
    shapes<BROKEN_STAMP_STORE, OLDEST>(rep, "broken (stamp store relaxed)", b, MUST_FAIL);
    shapes<BROKEN_STAMP_STORE, NEWEST>(rep, "broken (stamp store relaxed)", b, MUST_FAIL);
    shapes<BROKEN_STAMP_LOAD, OLDEST>(rep, "broken (stamp load relaxed)", b, MUST_FAIL);
    shapes<BROKEN_STAMP_LOAD, NEWEST>(rep, "broken (stamp load relaxed)", b, MUST_FAIL);
    shapes<BROKEN_HEAD, NEWEST>(rep, "broken (head relaxed)", b, MUST_FAIL);
    shapes<BROKEN_HEAD_STORE, NEWEST>(rep, "broken (head store relaxed)", b, MUST_FAIL);
    return finish(rep, "sub_ring");
}
