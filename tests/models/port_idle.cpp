/* Relacy model: a port's idle/signalled handshake (src/core/port.c, top
 * comment I1-I3 and the stalled head; nq__port_kick, nq__port_signal and
 * the end of nq_port_dispatch).
 *
 *   C (src/core/port.c)                         here
 *   nq__port_signal: nq_evq_notify(ready, t)    waker(): q->notify (evq_model.h;
 *     fetch_add seq_cst (W), slot store           a port's evq publishes with
 *     seq_cst (S, nq__evq_set_sc_publish)         seq_cst: o.publish)
 *   nq__port_kick: load(signalled) seq_cst (R)  kick(): o.kick
 *     and xchg(signalled, 1) seq_cst, then
 *     nq__port_write_efd: write(efd, 1)         efd_write()
 *   nq_port_dispatch                            dispatch(budget)
 *     limit = nq__evq_pending (seq_cst)           as C; each token "runs"
 *     nq__port_run_batch: nq_evq_poll, run        (marks it delivered)
 *     work left (nq__evq_head_ready, seq_cst):    as C: load(signalled)
 *       if signalled == 0 xchg it, write           seq_cst, xchg seq_cst
 *     else: read(efd) (clear it)                   efd_read()
 *       store(signalled, 0) seq_cst (P)            o.reopen
 *       nq__evq_pending > 0 (L, seq_cst)           as C
 *       nq__evq_head_ready (L1, seq_cst)           as C
 *       xchg(signalled, 1) seq_cst, write          as C
 *   the loop: sleeps until the fd is readable   loop(): futex on the counter
 * The eventfd is a counter whose read, write and poll are under the
 * kernel's lock (seq_cst read-modify-writes here); the loop sleeps in the
 * model futex until it is non-zero (level-triggered, like epoll on it).
 * Left out: the pre-idle spin (it only delays the idle path: port.c says
 * so), nested dispatch (efd_cleared), stale tokens and the item table (each
 * token here names one item, run once). Deadlines: only in the DUE cases
 * below, as a count the loop thread owns.
 *
 * Two wakers signal one token each; the loop thread waits for the fd and
 * dispatches until both tokens ran. Checked:
 *   I2  no lost wake-up: the loop never sleeps with a token queued and the
 *       fd clear (that would be a deadlock);
 *   I1  at the end, signalled == 1 implies the fd is readable;
 *   I3  efd writes <= dispatches + 1.
 * Each case runs with budget 0 (all queued at entry) and budget 1 (one
 * token per dispatch: the "work left" return).
 *
 * DUE cases: token 0's callback starts a wait with timeout 0 (port.c: "or a
 * callback started a wait with timeout 0"), so the deadline is due when that
 * dispatch ends, with the evq possibly empty; dispatch times out due waits
 * first, within the budget, and a deadline due at its end is work left. The
 * loop here has no timer: it sleeps on the fd alone, so the fd must come
 * back readable for the deadline (a loop whose I/O watcher brings the next
 * dispatch) and the loop runs until the tokens ran and nothing is due.
 *   due ignored  the "work left" test without the due deadline (the code
 *               before 9b0055a): the idle path reads the fd and the loop
 *               sleeps with the deadline due.
 *
 * Broken variants, each must be caught:
 *   P release   dispatch's store of 0 to signalled (P) weakened to release:
 *               a waker's R can read the old 1 while L misses its claim.
 *   S release   the port's evq publishing with release (a plain evq's
 *               order, no nq__evq_set_sc_publish): L1 can miss a slot store
 *               whose waker's R read the old 1 (the stalled head).
 */
#include "evq_model.h"

using namespace nqm;

enum { CORRECT, BROKEN_P, BROKEN_S, BROKEN_DUE };

template <int V, unsigned BUDGET, bool DUE = false>
struct port_test : rl::test_suite<port_test<V, BUDGET, DUE>, 3> {
    evq<2> *q;
    rl::atomic<int> signalled;
    rl::atomic<unsigned> efd; /* the eventfd's counter */
    mo_t reopen;              /* P: seq_cst */
    unsigned efd_writes;      /* counted in one place each: see below */
    rl::atomic<unsigned> writes;
    unsigned dispatches;      /* the loop thread's */
    unsigned ran;             /* the loop thread's: bit per token run */
    unsigned due;             /* the loop thread's: waits whose deadline is due */

    void before() {
        q = new evq<2>(evq_orders_c(V != BROKEN_S));
        signalled($).store(0, rl::mo_relaxed); /* atomic_init */
        efd($).store(0, rl::mo_relaxed);
        writes($).store(0, rl::mo_relaxed);
        reopen = V == BROKEN_P ? rl::mo_release : rl::mo_seq_cst;
        dispatches = 0;
        ran = 0;
        due = 0;
    }
    void after() {
        /* I1: every waker is done, so a 1 in signalled has had its write. */
        if (signalled($).load(rl::mo_relaxed) == 1)
            RL_ASSERT(efd($).load(rl::mo_relaxed) > 0);
        /* I3 */
        RL_ASSERT(writes($).load(rl::mo_relaxed) <= dispatches + 1);
        delete q;
    }

    /* nq__port_write_efd */
    void efd_write() {
        efd($).fetch_add(1, rl::mo_seq_cst);
        futex_wake(efd); /* the kernel wakes the loop's poll */
        writes($).fetch_add(1, rl::mo_relaxed);
    }
    /* read(efd): clears it */
    void efd_read() { efd($).exchange(0, rl::mo_seq_cst); }

    /* nq__port_kick */
    void kick() {
        if (signalled($).load(rl::mo_seq_cst) == 0 &&
            signalled($).exchange(1, rl::mo_seq_cst) == 0)
            efd_write();
    }

    /* nq__port_run_batch */
    void run_batch(u64 limit) {
        unsigned toks[2];
        while (limit > 0) {
            unsigned n = q->poll(toks, limit < 2 ? (unsigned)limit : 2);
            if (n == 0)
                break;
            limit -= n;
            for (unsigned i = 0; i < n; i++) {
                ran |= 1u << toks[i]; /* nq__port_run */
                if (DUE && toks[i] == 0)
                    due++; /* nq_port_wait(..., 0 ms, ...) in the callback */
            }
        }
    }

    /* nq_port_dispatch, from its budget to its end */
    void dispatch() {
        dispatches++;
        u64 limit = q->pending_count();
        unsigned expired = 0; /* nq__port_expire(p, budget) */
        while (due > 0 && (BUDGET == 0 || expired < BUDGET)) {
            due--;
            expired++;
        }
        u64 room = BUDGET == 0 ? ~(u64)0 : BUDGET - expired;
        if (room < limit)
            limit = room;
        run_batch(limit);
        if (q->head_ready() || (V != BROKEN_DUE && due > 0)) { /* work left (nq__port_due) */
            if (signalled($).load(rl::mo_seq_cst) == 0 &&
                signalled($).exchange(1, rl::mo_seq_cst) == 0)
                efd_write();
            return;
        }
        efd_read();
        signalled($).store(0, reopen); /* P */
        if (q->pending_count() > 0) {  /* L */
            if (!q->head_ready())      /* L1 */
                return;                /* a stalled head */
            if (signalled($).exchange(1, rl::mo_seq_cst) == 0)
                efd_write();
        }
    }

    void thread(unsigned idx) {
        if (idx < 2) { /* nq__port_signal */
            q->notify(idx);
            kick();
            return;
        }
        while (ran != 3 || due > 0) {
            while (efd($).load(rl::mo_seq_cst) == 0) /* the loop's poll */
                futex_wait(efd, 0, false);
            dispatch();
        }
    }
};

template <int V, bool DUE = false>
static void cases(report &rep, const char *what, unsigned b, bool broken) {
    expect e = broken ? MUST_FAIL : MUST_PASS, r = broken ? MAY_FAIL : MUST_PASS;
    const char *m = "port_idle";
    char w[96];
    std::snprintf(w, sizeof(w), "%s, budget 0", what);
    check<port_test<V, 0, DUE> >(rep, m, w, rl::fair_context_bound_scheduler_type, 0, b, e);
    check<port_test<V, 0, DUE> >(rep, m, w, rl::random_scheduler_type, scaled(100000), 0, r);
    std::snprintf(w, sizeof(w), "%s, budget 1", what);
    check<port_test<V, 1, DUE> >(rep, m, w, rl::fair_context_bound_scheduler_type, 0, b, e);
    check<port_test<V, 1, DUE> >(rep, m, w, rl::random_scheduler_type, scaled(100000), 0, r);
}

int main() {
    report rep;
    unsigned b = bound(3);
    cases<CORRECT>(rep, "correct", b, false);
    cases<BROKEN_P>(rep, "broken (P release)", b, true);
    cases<BROKEN_S>(rep, "broken (S release)", b, true);
    cases<CORRECT, true>(rep, "correct, a callback makes a deadline due", b, false);
    cases<BROKEN_DUE, true>(rep, "broken (due ignored)", b, true);
    return finish(rep, "port_idle");
}
