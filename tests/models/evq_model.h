/* The nq_evq of src/core/evq.c, restated for Relacy (used by evq_ring.cpp,
 * evq_wait.cpp and port_idle.cpp). Each step names the C it mirrors; every
 * atomic takes the memory_order the C code uses, from evq_orders (a broken
 * variant weakens one field).
 *
 *   C (src/core/evq.c)                          here
 *   nq_evq_notify: xchg(pending[t], 1) acq_rel  notify(): o.flag_set
 *   nq__evq_claim_exact: fetch_add(tail) seq_cst  o.claim (W)
 *     then load(slots[pos]) acquire, seq == pos   asserted (I2: cannot fail)
 *   nq__park_claim (load, xchg; seq_cst)        pk.claim(o.park) (R)
 *   nq__evq_publish: store(slot) release, or    o.publish
 *     seq_cst with sc_publish (a port's evq)
 *   nq__park_wake_slow                          pk.wake_slow()
 *   nq_evq_poll: load(slot) acquire; store     poll()
 *     (slot, head+size) release; then per
 *     token xchg(pending, 0) acq_rel            o.flag_clear
 *   nq__evq_ready: relaxed loads                ready()
 *   nq__evq_head_ready: slot load seq_cst (L1)  head_ready(): o.head_ready
 *   nq__evq_pending: tail load seq_cst (L)      pending_count(): o.pending_tail
 *   nq_evq_wait phase 2 (untimed)               wait()
 * Left out: the small ring's CAS claim (a test hook; ports and nq_evq_new
 * rings are exact), the NQ_ELIMIT wait loop behind the I2 report (asserted
 * unreachable instead), statistics counters (relaxed, no ordering), and
 * nq_evq_wait's phase 1 (spins and yields reading relaxed, changing
 * nothing). Phase 2's stall path yields once (C: NQ__EVQ_YIELDS = 4) and
 * then naps with a timed futex wait.
 *
 * Slots hold (seq << 32 | token) as in C; positions stay far below 2^32.
 */
#ifndef NQ_MODELS_EVQ_MODEL_H
#define NQ_MODELS_EVQ_MODEL_H

#include "model.h"

namespace nqm {

struct evq_orders {
    mo_t flag_set;     /* notify's xchg on pending[t]: acq_rel (O1, O2) */
    mo_t flag_clear;   /* poll's clearing xchg: acq_rel (O1) */
    mo_t claim;        /* fetch_add on tail: seq_cst (W, O4) */
    mo_t publish;      /* slot store: release (O3); seq_cst for a port */
    mo_t wait_tail;    /* nq_evq_wait's re-read of tail: seq_cst (L) */
    mo_t pending_tail; /* nq__evq_pending: seq_cst */
    mo_t head_ready;   /* nq__evq_head_ready: seq_cst (L1) */
    park_orders park;
};

inline evq_orders evq_orders_c(bool sc_publish) {
    evq_orders o;
    o.flag_set = rl::mo_acq_rel;
    o.flag_clear = rl::mo_acq_rel;
    o.claim = rl::mo_seq_cst;
    o.publish = sc_publish ? rl::mo_seq_cst : rl::mo_release;
    o.wait_tail = rl::mo_seq_cst;
    o.pending_tail = rl::mo_seq_cst;
    o.head_ready = rl::mo_seq_cst;
    o.park = park_orders_c();
    return o;
}

typedef unsigned long long u64;

inline u64 slot_word(u64 seq, unsigned token) {
    return ((u64)(unsigned)seq << 32) | token;
}
inline unsigned slot_seq(u64 w) { return (unsigned)(w >> 32); }
inline unsigned slot_token(u64 w) { return (unsigned)w; }

/* TOKENS tokens, a ring of SIZE = TOKENS slots (a power of two). */
template <unsigned TOKENS>
struct evq {
    static const unsigned SIZE = TOKENS;
    rl::atomic<u64> slots[SIZE];
    rl::atomic<unsigned> pending[TOKENS]; /* C: atomic_uchar */
    rl::atomic<u64> tail;
    rl::atomic<u64> head;
    park pk;
    evq_orders o;

    explicit evq(const evq_orders &orders) : o(orders) {
        for (unsigned i = 0; i < SIZE; i++)
            slots[i]($).store(slot_word(i, 0), rl::mo_relaxed);
        for (unsigned t = 0; t < TOKENS; t++)
            pending[t]($).store(0, rl::mo_relaxed);
        tail($).store(0, rl::mo_relaxed);
        head($).store(0, rl::mo_relaxed);
    }

    /* nq_evq_notify: 1 if it queued the token, 0 if conflated. */
    int notify(unsigned token) {
        if (pending[token]($).exchange(1, o.flag_set))
            return 0;
        /* nq__evq_claim_exact */
        u64 pos = tail($).fetch_add(1, o.claim);
        u64 w = slots[pos % SIZE]($).load(rl::mo_acquire);
        RL_ASSERT(slot_seq(w) == (unsigned)pos); /* I2: the claimed slot is free */
        bool wake = pk.claim(o.park);
        slots[pos % SIZE]($).store(slot_word(pos + 1, token), o.publish);
        if (wake)
            pk.wake_slow();
        return 1;
    }

    /* nq_evq_poll */
    unsigned poll(unsigned *out, unsigned max) {
        u64 h = head($).load(rl::mo_relaxed);
        unsigned n = 0;
        while (n < max) {
            u64 w = slots[h % SIZE]($).load(rl::mo_acquire);
            if (slot_seq(w) != (unsigned)(h + 1))
                break;
            unsigned token = slot_token(w);
            slots[h % SIZE]($).store(slot_word(h + SIZE, 0), rl::mo_release);
            for (unsigned k = 0; k < n; k++)
                RL_ASSERT(out[k] != token); /* I1: one poll never returns a token twice */
            out[n++] = token;
            h++;
        }
        if (n == 0)
            return 0;
        for (unsigned k = 0; k < n; k++)
            pending[out[k]]($).exchange(0, o.flag_clear);
        head($).store(h, rl::mo_relaxed);
        return n;
    }

    /* nq__evq_ready */
    bool ready() {
        u64 h = head($).load(rl::mo_relaxed);
        u64 w = slots[h % SIZE]($).load(rl::mo_relaxed);
        return slot_seq(w) == (unsigned)(h + 1);
    }

    /* nq__evq_head_ready (L1 of the port's protocol) */
    bool head_ready() {
        u64 h = head($).load(rl::mo_relaxed);
        u64 w = slots[h % SIZE]($).load(o.head_ready);
        return slot_seq(w) == (unsigned)(h + 1);
    }

    /* nq__evq_pending */
    u64 pending_count() {
        u64 t = tail($).load(o.pending_tail);
        return t - head($).load(rl::mo_relaxed);
    }

    /* nq_evq_wait with no deadline, phase 2 (after the first poll). */
    unsigned wait(unsigned *out, unsigned max) {
        unsigned n = poll(out, max);
        if (n > 0)
            return n;
        int stalls = 0;
        for (;;) {
            n = poll(out, max);
            if (n > 0)
                return n;
            pk.prepare(o.park);
            u64 t = tail($).load(o.wait_tail);
            if (t != head($).load(rl::mo_relaxed)) {
                if (ready()) {
                    pk.cancel();
                    continue;
                }
                if (stalls++ < 1) {
                    pk.cancel();
                    rl::yield(1, $);
                    continue;
                }
                pk.commit(true); /* the nap: timed */
                pk.cancel();
                continue;
            }
            stalls = 0;
            pk.commit(false);
            pk.cancel();
        }
    }
};

} // namespace nqm

#endif
