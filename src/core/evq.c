/* nq_evq: a conflating set of tokens delivered in FIFO order; many
 * notifiers, one consumer. The C answer to nexus-notify, and the queue a
 * port uses for its ready items.
 *
 * Layout
 *   pending[t]  one byte per token: 1 while t is pending (queued or being
 *               delivered), 0 otherwise.
 *   slots[]     a ring of `size` 64-bit words, size = max_tokens rounded up to
 *               a power of two. Each word is (seq << 32 | token): seq says
 *               which position the slot is ready for (the Vyukov bounded-queue
 *               scheme): seq == pos: free for the notifier that claims pos;
 *               seq == pos + 1: holds the token queued at pos. Positions are
 *               64-bit counters, seq is their low 32 bits.
 *   tail        next position to claim (notifiers, CAS).
 *   head        next position to read (the consumer alone writes it).
 *
 * Notify(t):  xchg(pending[t], 1); if it was 1, done (conflated). Else claim
 *             pos = tail (fetch_add; by CAS in a ring smaller than the token
 *             space, which only a test hook builds), take the wake duty if
 *             the consumer announced a sleep, store (pos+1, t) into
 *             slots[pos & mask], then make the futex wake if it was ours.
 * Poll:       while slots[head] holds seq head+1: take its token, mark the
 *             slot free for head+size; head++. Then, for the whole batch,
 *             xchg(pending[token], 0): a notify landing mid-batch conflates
 *             into this delivery, so one poll never returns a token twice.
 *
 * Invariants
 *   I1  A token is in the ring at most once: only the notifier whose xchg
 *       turns pending[t] from 0 to 1 queues t, and pending[t] returns to 0
 *       only after the consumer has taken t out of its slot.
 *   I2  Hence positions [head, tail) hold distinct tokens, each pending, so
 *       tail - head <= max_tokens <= size: the ring cannot overflow.
 *   I3  A slot is freed (its seq set to pos + size) before the consumer clears
 *       the token's flag, so no notifier can see a flag cleared while the slot
 *       that held it is still occupied.
 *   I4  Tokens leave in the order their positions were claimed. A conflated
 *       notify does not move a token, and may return before the token it
 *       conflated into is in the ring (its first notifier is between its
 *       flag exchange and its claim): a later token can then come out first.
 *
 * Memory ordering (what releases what, and what acquires it)
 *   O1  The consumer's clearing xchg on pending[t] is acq_rel. Its release
 *       half publishes I3's slot free; the notifier's xchg that reads that 0
 *       is acq_rel too, and its acquire half makes the freed slot, and every
 *       earlier free (the consumer frees in order), visible to it.
 *   O2  Every notify's xchg on pending[t] is a release (acq_rel), and every
 *       operation on pending[t] is a read-modify-write, so each notify heads
 *       a release sequence that the consumer's clearing xchg reads from:
 *       a notify conflated into a pending token still happens-before the
 *       return of the poll that delivers it. Thus notify is a release and the
 *       poll that delivers its token an acquire (the contract in nq.h).
 *   O3  The slot store (release) pairs with the consumer's slot load
 *       (acquire): a token is read only after the notifier stored it.
 *   O4  tail is changed only by read-modify-writes (fetch_add, or CAS in a
 *       small ring; seq_cst) and read with acquire, so a notifier that claims
 *       or reads pos has synchronised with every notifier that claimed a
 *       position below pos (their RMWs form one release sequence).
 *   Why a claimed position is always free while I1 holds (so fetch_add may
 *   claim it blind): a notifier Q that claims pos has, by O4, seen the flag
 *   sets of the tokens claimed at pos-size .. pos-1, and made its own: size
 *   + 1 sets of 0 -> 1 over at most max_tokens <= size tokens. Two are of
 *   one token x, at positions a < b. The k-th 0 -> 1 set of x is claimed
 *   and delivered k-th, and each set after the first reads a clear by the
 *   consumer that follows its delivery of the previous entry; so set(b)
 *   reads (O1) a clear that comes, in the consumer's program order, after
 *   its free of slot a >= pos-size, which comes after its free of pos-size:
 *   that free happens-before Q's load of slots[pos & mask], and Q sees seq
 *   == pos. The check stays, as a report (NQ_ELIMIT) that cannot fire. A
 *   smaller ring (a test hook) does fill up; its notifier then reports
 *   NQ_ELIMIT without claiming and clears its flag; a notify that conflated
 *   into it during that instant is lost with it.
 *
 * Wake-up protocol (park.h draws it): the claim on tail is the seq_cst
 * publish W; nq_evq_wait parks only after re-reading tail (seq_cst) and
 * finding it equal to head. The notifier takes the wake duty (R) before its
 * slot store, because once the token is visible the consumer may free the
 * queue; after the store it touches only the futex address. A claimed but
 * unwritten slot (tail != head, slot not ready) never puts the consumer to
 * an untimed sleep: it yields, then naps with a growing timeout.
 *
 * Progress: a conflated notify is one exchange; a new one is an exchange, a
 * fetch_add, a load and a store: wait-free where those are single
 * instructions (x86-64, ARMv8.1). Delivery is blocking: a notifier stopped
 * between its claim and its store holds back its token, the notifies that
 * conflated into it, and every token behind it, until it runs again.
 *
 * Cache lines: tail (written by every notifier), head and the consumer's
 * counters (written by the consumer on every poll), and the park word
 * (written around sleeps) each sit on a line of their own, so a poll does not
 * steal the line a notifier is about to CAS, and vice versa.
 */
#include <limits.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>

#include "core/evq.h"
#include "core/internal.h"
#include "core/park.h"

/* The ring's 64-bit slots and counters must be real atomics, not locks. */
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "nq_evq needs lock-free 64-bit atomics");

/* nq_evq_wait: busy-polls before it yields, and yields before it parks. A
 * wake across vCPUs costs tens of microseconds; a few microseconds of
 * spinning catches a notifier that is already on its way. */
#define NQ__EVQ_SPINS 256
#define NQ__EVQ_YIELDS 4
/* A notifier stalled between its claim and its slot store: nap this long,
 * doubling, while waiting for it. */
#define NQ__EVQ_NAP_MIN 50000LL     /* 50 us */
#define NQ__EVQ_NAP_MAX 10000000LL  /* 10 ms */

struct nq_evq {
    /* Read-only after nq_evq_new. */
    uint32_t max_tokens;
    uint32_t size; /* ring slots, a power of two */
    uint64_t mask; /* size - 1 */
    _Atomic uint64_t *slots;
    atomic_uchar *pending;
    int sc_publish; /* set by a port before use: slot stores are seq_cst */

    /* Notifiers. */
    NQ__CACHELINE_ALIGNED _Atomic uint64_t tail;

    /* The consumer. Atomic only so nq_evq_stats may read them from another
     * thread; the consumer's own accesses are relaxed (plain moves). */
    NQ__CACHELINE_ALIGNED _Atomic uint64_t head;
    _Atomic uint64_t batches;
    _Atomic uint64_t parks;

    /* Sleeping: the futex word and the wakes it cost. */
    NQ__CACHELINE_ALIGNED nq__park_t park;
    _Atomic uint64_t wakes;
};

#define NQ__SLOT(seq, token) (((uint64_t)(uint32_t)(seq) << 32) | (uint32_t)(token))
#define NQ__SLOT_SEQ(w) ((uint32_t)((w) >> 32))
#define NQ__SLOT_TOKEN(w) ((uint32_t)(w))

int nq__evq_new_ring(uint32_t max_tokens, uint32_t size, nq_evq_t **out) {
    if (out == NULL)
        return NQ_EINVAL;
    *out = NULL;
    if (max_tokens == 0 || max_tokens > NQ_EVQ_MAX_TOKENS || size == 0 ||
        size > NQ_EVQ_MAX_TOKENS || (size & (size - 1)) != 0)
        return NQ_EINVAL;

    /* One allocation: the struct, then the ring, then the flags. */
    size_t head_sz = (sizeof(nq_evq_t) + NQ__CACHELINE - 1) & ~(size_t)(NQ__CACHELINE - 1);
    size_t ring_sz = (size_t)size * sizeof(_Atomic uint64_t);
    nq_evq_t *e = nq__aligned_alloc(NQ__CACHELINE, head_sz + ring_sz + max_tokens);
    if (e == NULL)
        return NQ_ENOMEM;

    memset(e, 0, head_sz);
    e->max_tokens = max_tokens;
    e->size = size;
    e->mask = size - 1;
    e->slots = (_Atomic uint64_t *)((char *)e + head_sz);
    e->pending = (atomic_uchar *)((char *)e->slots + ring_sz);
    for (uint32_t i = 0; i < size; i++)
        atomic_init(&e->slots[i], NQ__SLOT(i, 0)); /* free for position i */
    for (uint32_t t = 0; t < max_tokens; t++)
        atomic_init(&e->pending[t], 0);
    atomic_init(&e->tail, 0);
    atomic_init(&e->head, 0);
    atomic_init(&e->batches, 0);
    atomic_init(&e->parks, 0);
    atomic_init(&e->wakes, 0);
    nq__park_init(&e->park);
    *out = e;
    return 0;
}

int nq_evq_new(uint32_t max_tokens, nq_evq_t **out) {
    if (max_tokens == 0 || max_tokens > NQ_EVQ_MAX_TOKENS) {
        if (out != NULL)
            *out = NULL;
        return NQ_EINVAL;
    }
    uint32_t size = 1;
    while (size < max_tokens)
        size <<= 1;
    return nq__evq_new_ring(max_tokens, size, out);
}

void nq_evq_free(nq_evq_t *e) {
    nq__free(e);
}

/* Claims a position for a ring smaller than max_tokens (the test hook), by
 * CAS, so that a full ring can be reported without claiming. */
static int nq__evq_claim_small(nq_evq_t *e, uint64_t *posp) {
    /* O4: acquire pairs with the successful CAS of earlier claimers. */
    uint64_t pos = atomic_load_explicit(&e->tail, memory_order_acquire);
    for (;;) {
        /* Acquire pairs with the consumer's release when it freed the slot. */
        uint64_t w = atomic_load_explicit(&e->slots[pos & e->mask], memory_order_acquire);
        uint32_t d = NQ__SLOT_SEQ(w) - (uint32_t)pos;
        if (d == 0) {
            /* seq_cst on success: W of the wake-up protocol (park.h). */
            if (atomic_compare_exchange_strong_explicit(&e->tail, &pos, pos + 1,
                                                        memory_order_seq_cst,
                                                        memory_order_acquire)) {
                *posp = pos;
                return 0;
            }
            continue; /* pos now holds the current tail */
        }
        uint64_t now = atomic_load_explicit(&e->tail, memory_order_acquire);
        if (now != pos) { /* others moved on (the slot may even have lapped us) */
            pos = now;
            continue;
        }
        if (d & 0x80000000u) /* seq behind pos: the slot still holds pos - size */
            return NQ_ELIMIT;
        /* seq ahead of pos with tail == pos cannot be; re-read. */
    }
}

/* O3: release pairs with the consumer's acquire load of the slot. A port's
 * evq stores with seq_cst instead: the port's stalled-head handshake (see
 * port.c) orders this store before the notifier's load of `signalled`
 * against the dispatch's store of `signalled` before its load of the slot. */
static inline void nq__evq_publish(nq_evq_t *e, uint64_t pos, uint32_t token) {
    _Atomic uint64_t *slot = &e->slots[pos & e->mask];
    if (e->sc_publish)
        atomic_store_explicit(slot, NQ__SLOT(pos + 1, token), memory_order_seq_cst);
    else
        atomic_store_explicit(slot, NQ__SLOT(pos + 1, token), memory_order_release);
}

/* Claims the next position of a ring with a slot per token: 0, or
 * NQ_ELIMIT if I2 was found broken (the token is still delivered). */
static inline int nq__evq_claim_exact(nq_evq_t *e, uint64_t *posp) {
    /* I2: the position we claim is free (the argument at the top), so a
     * fetch_add claims it outright: wait-free. seq_cst: W of the wake-up
     * protocol; acq_rel is part of it (O4's chain). */
    uint64_t pos = atomic_fetch_add_explicit(&e->tail, 1, memory_order_seq_cst);
    *posp = pos;
    uint64_t w = atomic_load_explicit(&e->slots[pos & e->mask], memory_order_acquire);
    if (NQ__LIKELY(NQ__SLOT_SEQ(w) == (uint32_t)pos))
        return 0;
    /* I2 broken: cannot happen. Report it, and still deliver: wait for the
     * consumer to free the slot rather than lose the token. */
    for (int i = 0;
         NQ__SLOT_SEQ(atomic_load_explicit(&e->slots[pos & e->mask], memory_order_acquire)) !=
         (uint32_t)pos;
         i++)
        i < 64 ? nq__cpu_relax() : (void)sched_yield();
    return NQ_ELIMIT;
}

int nq_evq_notify(nq_evq_t *e, uint32_t token) {
    if (NQ__UNLIKELY(e == NULL || token >= e->max_tokens))
        return NQ_EINVAL;

    /* O1/O2: acq_rel. Release: the caller's writes reach the consumer with
     * this token. Acquire: if we read the consumer's 0, we see the slots it
     * freed before clearing. */
    if (atomic_exchange_explicit(&e->pending[token], 1, memory_order_acq_rel))
        return 0; /* conflated into the pending one */

    uint64_t pos;
    int rc = 0;
    if (NQ__LIKELY(e->size >= e->max_tokens)) {
        rc = nq__evq_claim_exact(e, &pos);
    } else if (nq__evq_claim_small(e, &pos) < 0) {
        /* A ring smaller than the token space is full. Undo our claim on the
         * flag (an RMW, to keep O2's release sequences unbroken): a notify
         * that conflated into it meanwhile is lost with it. */
        atomic_exchange_explicit(&e->pending[token], 0, memory_order_acq_rel);
        return NQ_ELIMIT;
    }

    /* Take the wake duty before the token becomes visible: once it is, the
     * consumer may poll it and free the queue, and we must not touch e. */
    int wake = nq__park_claim(&e->park);
    if (NQ__UNLIKELY(wake))
        atomic_fetch_add_explicit(&e->wakes, 1, memory_order_relaxed);
    nq__park_t *park = &e->park;

    nq__evq_publish(e, pos, token);
    if (NQ__UNLIKELY(wake))
        nq__park_wake_slow(park); /* the address only, never the memory */
    return rc;
}

size_t nq_evq_poll(nq_evq_t *e, uint32_t *out, size_t max) {
    if (NQ__UNLIKELY(e == NULL || out == NULL || max == 0))
        return 0;

    /* head is ours: relaxed (nq_evq_stats reads it without ordering). An
     * empty poll is these two loads and nothing else: no store, no counter. */
    uint64_t head = atomic_load_explicit(&e->head, memory_order_relaxed);
    size_t n = 0;
    while (n < max) {
        _Atomic uint64_t *slot = &e->slots[head & e->mask];
        /* O3: acquire pairs with the notifier's release store of the slot. */
        uint64_t w = atomic_load_explicit(slot, memory_order_acquire);
        if (NQ__SLOT_SEQ(w) != (uint32_t)(head + 1))
            break; /* empty, or claimed and not yet written */
        uint32_t token = NQ__SLOT_TOKEN(w);
        /* I3: free the slot for position head + size before clearing the
         * flag. Release pairs with the acquire load of the notifier that
         * will claim that position. */
        atomic_store_explicit(slot, NQ__SLOT(head + e->size, 0), memory_order_release);
        out[n++] = token;
        head++;
    }
    if (n == 0)
        return 0;
    /* Clear the flags only once the batch is taken: a notify that lands
     * meanwhile conflates into this delivery instead of re-queueing the token
     * into the batch being read. */
    for (size_t k = 0; k < n; k++)
        atomic_exchange_explicit(&e->pending[out[k]], 0, memory_order_acq_rel);
    atomic_store_explicit(&e->head, head, memory_order_relaxed);
    atomic_store_explicit(&e->batches,
                          atomic_load_explicit(&e->batches, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    return n;
}

/* Is the slot at head filled? A cheap check for the spin loop. */
static int nq__evq_ready(nq_evq_t *e) {
    uint64_t head = atomic_load_explicit(&e->head, memory_order_relaxed);
    uint64_t w = atomic_load_explicit(&e->slots[head & e->mask], memory_order_relaxed);
    return NQ__SLOT_SEQ(w) == (uint32_t)(head + 1);
}

int nq_evq_wait(nq_evq_t *e, uint32_t *out, size_t max, int64_t timeout_ns) {
    if (e == NULL || out == NULL || max == 0)
        return NQ_EINVAL;
    if (max > INT_MAX)
        max = INT_MAX;

    size_t n = nq_evq_poll(e, out, max);
    if (n > 0)
        return (int)n;
    if (timeout_ns == 0)
        return NQ_ETIMEDOUT;
    int64_t deadline = nq__deadline_ns(timeout_ns);

    /* Phase 1: spin, then yield, watching the next slot. */
    int i;
    for (i = 0; i < NQ__EVQ_SPINS && !nq__evq_ready(e); i++)
        nq__cpu_relax();
    for (i = 0; i < NQ__EVQ_YIELDS && !nq__evq_ready(e); i++)
        sched_yield();

    /* Phase 2: park until a notifier wakes us or the deadline passes. */
    int stalls = 0;
    int64_t nap = 0;
    for (;;) {
        n = nq_evq_poll(e, out, max);
        if (n > 0)
            return (int)n;
        if (nq__now_ns() >= deadline)
            return NQ_ETIMEDOUT;

        nq__park_prepare(&e->park);
        /* L of the protocol: seq_cst pairs with the notifier's claim on tail
         * (fetch_add, or CAS in a small ring). */
        uint64_t tail = atomic_load_explicit(&e->tail, memory_order_seq_cst);
        if (tail != atomic_load_explicit(&e->head, memory_order_relaxed)) {
            /* Something was claimed since: either ready now, or a notifier is
             * between its claim and its slot store. It may have passed its
             * wake check already, so do not sleep untimed on it: yield a few
             * times, then nap with a growing timeout (it may have been
             * descheduled for long; a SCHED_FIFO consumer would otherwise
             * starve it). Notifiers that claim meanwhile still wake us. */
            if (nq__evq_ready(e)) {
                nq__park_cancel(&e->park);
                continue;
            }
            if (stalls++ < NQ__EVQ_YIELDS) {
                nq__park_cancel(&e->park);
                sched_yield();
                continue;
            }
            nap = nap == 0 ? NQ__EVQ_NAP_MIN : (nap * 2 > NQ__EVQ_NAP_MAX ? NQ__EVQ_NAP_MAX : nap * 2);
            int64_t until = nq__now_ns() + nap;
            atomic_store_explicit(&e->parks,
                                  atomic_load_explicit(&e->parks, memory_order_relaxed) + 1,
                                  memory_order_relaxed);
            int rc = nq__park_commit(&e->park, until < deadline ? until : deadline);
            nq__park_cancel(&e->park);
            if (rc == NQ_ESYS)
                return rc;
            continue;
        }
        stalls = 0;
        nap = 0;
        atomic_store_explicit(&e->parks,
                              atomic_load_explicit(&e->parks, memory_order_relaxed) + 1,
                              memory_order_relaxed);
        int rc = nq__park_commit(&e->park, deadline);
        nq__park_cancel(&e->park);
        if (rc == NQ_ESYS)
            return rc;
        /* Woken, interrupted or timed out: poll again; the deadline check
         * above decides, with the clock, never early. */
    }
}

void nq__evq_set_sc_publish(nq_evq_t *e) {
    e->sc_publish = 1;
}

int nq__evq_head_ready(nq_evq_t *e) {
    uint64_t head = atomic_load_explicit(&e->head, memory_order_relaxed);
    /* seq_cst: L1 of the port's wake-up protocol (port.c), after its P. */
    uint64_t w = atomic_load_explicit(&e->slots[head & e->mask], memory_order_seq_cst);
    return NQ__SLOT_SEQ(w) == (uint32_t)(head + 1);
}

int nq__evq_claim_for_test(nq_evq_t *e, uint32_t token, uint64_t *pos) {
    if (atomic_exchange_explicit(&e->pending[token], 1, memory_order_acq_rel))
        return 0;
    (void)nq__evq_claim_exact(e, pos); /* the ports' rings are exact */
    return 1;
}

void nq__evq_publish_for_test(nq_evq_t *e, uint64_t pos, uint32_t token) {
    nq__evq_publish(e, pos, token);
}

uint64_t nq__evq_pending(nq_evq_t *e) {
    /* seq_cst pairs with the notifiers' fetch_add on tail (W; port.c). */
    uint64_t tail = atomic_load_explicit(&e->tail, memory_order_seq_cst);
    return tail - atomic_load_explicit(&e->head, memory_order_relaxed);
}

int nq_evq_stats(const nq_evq_t *e, nq_evq_stats_t *out) {
    if (e == NULL || out == NULL)
        return NQ_EINVAL;
    nq_evq_t *m = (nq_evq_t *)e; /* atomics are read, never written */
    /* tail first: head, read after, may have passed it, never the reverse
     * by more than the progress in between; clamp below. */
    uint64_t tail = atomic_load_explicit(&m->tail, memory_order_relaxed);
    uint64_t head = atomic_load_explicit(&m->head, memory_order_relaxed);
    memset(out, 0, sizeof(*out));
    out->max_tokens = e->max_tokens;
    out->ring_size = e->size;
    out->delivered = head;
    /* Read apart, tail may lag head's newer value: never report < 0. */
    out->queued = tail > head ? tail : head;
    out->pending = out->queued - head;
    out->batches = atomic_load_explicit(&m->batches, memory_order_relaxed);
    out->parks = atomic_load_explicit(&m->parks, memory_order_relaxed);
    out->wakes = atomic_load_explicit(&m->wakes, memory_order_relaxed);
    return 0;
}

int nq__evq_check(const nq_evq_t *e, const char **why) {
    const char *dummy;
    if (why == NULL)
        why = &dummy;
    *why = NULL;
    if (e == NULL) {
        *why = "NULL queue";
        return NQ_EINVAL;
    }
    nq_evq_t *m = (nq_evq_t *)e;
    uint64_t head = atomic_load_explicit(&m->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&m->tail, memory_order_acquire);
    if (tail < head) {
        *why = "tail is behind head";
        return NQ_ELIMIT;
    }
    if (tail - head > e->max_tokens) {
        *why = "more entries than tokens";
        return NQ_ELIMIT;
    }
    uint64_t set = 0;
    for (uint32_t t = 0; t < e->max_tokens; t++)
        set += atomic_load_explicit(&m->pending[t], memory_order_acquire) != 0;
    if (set != tail - head) {
        *why = "pending flags do not match the entries in the ring";
        return NQ_ELIMIT;
    }
    /* Each queued entry is written, names a pending token, and no token is
     * queued twice (quadratic, but this is a test hook). */
    for (uint64_t pos = head; pos != tail; pos++) {
        uint64_t w = atomic_load_explicit(&m->slots[pos & e->mask], memory_order_acquire);
        if (NQ__SLOT_SEQ(w) != (uint32_t)(pos + 1)) {
            *why = "a claimed slot was never written";
            return NQ_ELIMIT;
        }
        uint32_t t = NQ__SLOT_TOKEN(w);
        if (t >= e->max_tokens ||
            atomic_load_explicit(&m->pending[t], memory_order_acquire) == 0) {
            *why = "a queued token is not flagged pending";
            return NQ_ELIMIT;
        }
        for (uint64_t q = pos + 1; q != tail; q++) {
            uint64_t w2 = atomic_load_explicit(&m->slots[q & e->mask], memory_order_acquire);
            if (NQ__SLOT_TOKEN(w2) == t) {
                *why = "a token is queued twice";
                return NQ_ELIMIT;
            }
        }
    }
    /* Free slots are ready for the position they will be claimed at. */
    for (uint64_t pos = tail; pos != head + e->size; pos++) {
        uint64_t w = atomic_load_explicit(&m->slots[pos & e->mask], memory_order_acquire);
        if (NQ__SLOT_SEQ(w) != (uint32_t)pos) {
            *why = "a free slot is not ready for its next position";
            return NQ_ELIMIT;
        }
    }
    return 0;
}
