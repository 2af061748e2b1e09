/* Relacy model: the flag/slot protocol of nq_evq (src/core/evq.c, top
 * comment I1-I4 and O1-O4; evq_model.h has the line-by-line
 * correspondence with nq_evq_notify, nq__evq_claim_exact and nq_evq_poll).
 *
 * Two tokens, a ring of two slots. Notifier A notifies token 0 twice,
 * notifier B token 1 once; before each notify it stores the notify's number
 * in payload[t] (relaxed: the evq must carry the ordering). The consumer
 * polls (nq_evq_poll, never blocking) until both notifiers are done and a
 * poll comes back empty. Checked:
 *   I2  the slot a fetch_add claims is free (seq == pos), asserted in
 *       notify: it cannot fire while O1 holds;
 *   I1  a poll never returns one token twice (asserted in poll);
 *   O2  a notify, conflated or not, happens-before the poll that delivers
 *       its token: after the last delivery of t, payload[t] reads t's
 *       final notify number;
 *   every token queued is delivered (the consumer's last poll is empty).
 *
 * Broken variants, each must be caught:
 *   clear relaxed  poll's xchg(pending[t], 0) weakened from acq_rel to
 *                  relaxed: it no longer acquires the notifies of its
 *                  release sequence (O2: the payload read is stale), nor
 *                  releases the slot frees (O1).
 *   clear first    the flags cleared before the slots are freed (I3 out of
 *                  order): a notifier claims a slot still occupied.
 */
#include "evq_model.h"

using namespace nqm;

enum { CORRECT, BROKEN_CLEAR_RELAXED, BROKEN_CLEAR_FIRST };

/* nq_evq_poll with its two loops swapped: flags cleared before the slots are
 * freed. Only the broken variant uses it. */
static unsigned poll_clear_first(evq<2> *q, unsigned *out, unsigned max) {
    u64 h = q->head($).load(rl::mo_relaxed);
    unsigned n = 0;
    while (n < max) {
        u64 w = q->slots[(h + n) % 2]($).load(rl::mo_acquire);
        if (slot_seq(w) != (unsigned)(h + n + 1))
            break;
        out[n++] = slot_token(w);
    }
    for (unsigned k = 0; k < n; k++)
        q->pending[out[k]]($).exchange(0, q->o.flag_clear);
    for (unsigned k = 0; k < n; k++)
        q->slots[(h + k) % 2]($).store(slot_word(h + k + 2, 0), rl::mo_release);
    q->head($).store(h + n, rl::mo_relaxed);
    return n;
}

template <int V>
struct evq_ring_test : rl::test_suite<evq_ring_test<V>, 3> {
    evq<2> *q;
    rl::atomic<unsigned> payload[2];
    rl::atomic<unsigned> done;

    void before() {
        evq_orders o = evq_orders_c(false);
        if (V == BROKEN_CLEAR_RELAXED)
            o.flag_clear = rl::mo_relaxed;
        q = new evq<2>(o);
        payload[0]($).store(0, rl::mo_relaxed);
        payload[1]($).store(0, rl::mo_relaxed);
        done($).store(0, rl::mo_relaxed);
    }
    void after() { delete q; }

    void thread(unsigned idx) {
        if (idx == 0) { /* A */
            payload[0]($).store(1, rl::mo_relaxed);
            q->notify(0);
            payload[0]($).store(2, rl::mo_relaxed);
            q->notify(0);
            done($).fetch_add(1, rl::mo_release);
            return;
        }
        if (idx == 1) { /* B */
            payload[1]($).store(1, rl::mo_relaxed);
            q->notify(1);
            done($).fetch_add(1, rl::mo_release);
            return;
        }
        unsigned seen[2] = {0, 0}; /* payload read after each delivery */
        for (;;) {
            /* done first: a poll after both notifiers are done sees all. */
            bool finished = done($).load(rl::mo_acquire) == 2;
            unsigned toks[2];
            unsigned n = V == BROKEN_CLEAR_FIRST ? poll_clear_first(q, toks, 2) : q->poll(toks, 2);
            for (unsigned k = 0; k < n; k++)
                seen[toks[k]] = payload[toks[k]]($).load(rl::mo_relaxed);
            if (finished && n == 0)
                break;
            if (n == 0)
                rl::yield(1, $);
        }
        RL_ASSERT(seen[0] == 2); /* O2: the last notify of token 0 */
        RL_ASSERT(seen[1] == 1);
    }
};

int main() {
    report rep;
    const char *m = "evq_ring";
    unsigned b = bound(3);
    check<evq_ring_test<CORRECT> >(rep, m, "correct", rl::fair_context_bound_scheduler_type, 0, b, MUST_PASS);
    check<evq_ring_test<CORRECT> >(rep, m, "correct", rl::random_scheduler_type, scaled(200000), 0, MUST_PASS);
    check<evq_ring_test<BROKEN_CLEAR_RELAXED> >(rep, m, "broken (clear relaxed)", rl::fair_context_bound_scheduler_type, 0, b, MUST_FAIL);
    check<evq_ring_test<BROKEN_CLEAR_RELAXED> >(rep, m, "broken (clear relaxed)", rl::random_scheduler_type, scaled(200000), 0, MAY_FAIL);
    check<evq_ring_test<BROKEN_CLEAR_FIRST> >(rep, m, "broken (clear first)", rl::fair_context_bound_scheduler_type, 0, b, MUST_FAIL);
    check<evq_ring_test<BROKEN_CLEAR_FIRST> >(rep, m, "broken (clear first)", rl::random_scheduler_type, scaled(200000), 0, MAY_FAIL);
    return finish(rep, m);
}
