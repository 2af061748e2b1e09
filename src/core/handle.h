/* This file is private to libnq: the handle table, the bottom layer of the
 * notification queue. It owns the queue object (limits, memory accounting,
 * references), the chunked table of handle slots, and the one 64-bit word
 * per handle that every other layer synchronises on. wait.c and sub.c build
 * on it; queue.c (notify, unregister, stats) sits above them; port.c above
 * that. Nothing here names a wait, a subscription or a port.
 *
 * The handle word (nq__hslot_t.word):
 *   bits  0..2   flags: HELD, WAITERS, RECV
 *   bit   3      LIVE
 *   bits  4..27  generation of the live handle (24 bits, never 0)
 *   bits 28..31  4 bits of the queue's tag (the same in every slot)
 *   bits 32..63  the low 32 bits of seq, the handle's notification count;
 *                the high 32 bits live in seq_hi, written under HELD
 * A handle's high half is what the word's low half reads while the handle
 * is live and nobody holds or listens on it (its id: generation, tag,
 * LIVE), so the fast path checks generation, liveness, queue and "no
 * receivers" in one compare. Its low half is the slot index + 1 plus the
 * other 7 bits of the tag (bits 25..31): subtracting the queue's base and
 * comparing with max_handles checks the index and those bits at once. A
 * handle of another queue fails either check unless the two queues' 11-bit
 * tags are equal (2047 queues created between them).
 *
 * Invariants:
 *   H1  HELD is set only by a compare-exchange from a value with it clear,
 *       and cleared only by its holder's release store. While it is set,
 *       no other thread writes the word (every writer compare-exchanges from
 *       a value without HELD), so the holder may release by a plain store of
 *       the value it computed: one store, no second read-modify-write.
 *   H2  Everything but the word's seq and the arg cells is written only by a
 *       holder of HELD (lists of waits and subscriptions, seq_hi, counts):
 *       the taking compare-exchange is acquire, the release store release,
 *       so each holder sees what the previous one wrote.
 *   H3  A notify with neither WAITERS nor RECV set, and seq not at a 2^32
 *       carry, is one compare-exchange that adds one to seq (the fast path):
 *       it never waits for anyone, and a failed exchange only means another
 *       notify won (retry) or a holder is in (take the slow path).
 *       Otherwise it takes HELD with the same exchange that counts it.
 *   H4  The generation is checked in the same exchange that counts: a notify
 *       whose handle went stale between its load and its exchange fails the
 *       exchange and answers NQ_EBADH; nothing of it is counted.
 *   H5  the newest arg (arg0 or arg1 by generation parity) is stored before the counting exchange (release),
 *       so whoever acquires a seq sees an arg at least as new as the one of
 *       that notification. A stale notify can store into the cell of the
 *       previous-but-one generation only: reuse of a slot goes through the
 *       FIFO free list, so that takes two reuses within one descheduled
 *       instruction window (see docs in queue.c).
 * Nobody sleeps on the word: a thread that finds HELD set spins briefly,
 * then yields (the holder runs a bounded number of instructions: no user
 * callback, no allocation, no syscall is made under HELD; the one exception
 * is nq_queue_dump, a debugging aid, which prints a handle's lists while it
 * holds it).
 *
 * Who holds HELD: a notify to a handle with receivers (the whole push), a
 * wait's attach and cancel, a subscription's attach, detach and arm (a
 * receiver arms only when it found its ring empty and wants a wake-up),
 * register, unregister, nq_queue_stats and dump. A receiver's receive, and
 * nq_seq, never take it.
 */
#ifndef NQ_CORE_HANDLE_H
#define NQ_CORE_HANDLE_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "nq.h"
#include "core/internal.h"

#define NQ__HINT_MAX 64            /* debug hints are cut to 63 bytes */
#define NQ__MAX_HANDLES (1u << 24) /* largest max_handles */
#define NQ__MAX_SUBS 1024u         /* largest max_subscribers_per_handle */
#define NQ__MAX_WAITERS (1u << 20) /* largest max_waiters_per_handle */
#define NQ__MAX_CAPACITY (1u << 28)

/* The word. */
#define NQ__W_HELD 1ull
#define NQ__W_WAITERS 2ull
#define NQ__W_RECV 4ull
#define NQ__W_LIVE 8ull
#define NQ__W_FLAGS 7ull         /* the flags a holder or listener sets */
/* A slot with no live handle (never used, or unregistered) shows WAITERS
 * and RECV, so no id (which has no flag) equals its low half: the fast
 * path's one compare also rejects it. */
#define NQ__W_DEAD (NQ__W_WAITERS | NQ__W_RECV)
#define NQ__W_ID 0xfffffff8ull   /* LIVE, tag and generation */
#define NQ__W_GEN_SHIFT 4
#define NQ__W_TAG_SHIFT 28
#define NQ__W_SEQ_ONE (1ull << 32)
#define NQ__GEN_MAX 0xffffffu

/* Handle values. */
#define NQ__H_INDEX_MASK 0x1ffffffull

/* The id a handle names (its high half): the word's low half while live
 * and idle. A valid id has LIVE set and no flag. */
static inline uint32_t nq__h_id(nq_handle_t h) {
    return (uint32_t)(h >> 32);
}
static inline int nq__id_valid(uint32_t id) {
    return (id & 0xf) == NQ__W_LIVE;
}
static inline uint32_t nq__id_gen(uint32_t id) {
    return (id >> NQ__W_GEN_SHIFT) & NQ__GEN_MAX;
}
static inline uint32_t nq__w_id(uint64_t w) {
    return (uint32_t)w & (uint32_t)NQ__W_ID;
}

struct nq_wait;
struct nq_sub;

/* One handle: 64 bytes, one cache line of its own (no false sharing with a
 * neighbour): a hot part (the first 32 bytes, all a notify without
 * receivers touches) and a cold part (lists, hint) that the slow path reads
 * from the same line. */
typedef struct nq__hslot {
    _Atomic uint64_t word;
    _Atomic int64_t arg0;    /* H5: the newest arg, of even generations */
    _Atomic uint32_t seq_hi; /* seq >> 32: written under HELD, read by nq_seq too */
    /* Bit-fields, under HELD. */
    uint32_t nwaiters : 21; /* <= NQ__MAX_WAITERS; 0 exactly when waiters is NULL */
    uint32_t nsubs : 11;    /* <= NQ__MAX_SUBS, 0 exactly when RECV is clear */
    _Atomic int64_t arg1;   /* H5: of odd generations, 16 bytes after arg0 */
} nq__hslot_t;

typedef struct nq__hcold { /* under HELD */
    struct nq_wait *waiters; /* doubly linked, newest first */
    union {
        struct nq_sub **subs; /* subs_cap >= 2: an array of nsubs, subs_cap allocated */
        struct nq_sub *sub1;  /* subs_cap 1: the one subscriber, in place */
    };
    char *hint;
    uint32_t next_free; /* under q->lock, while free: free list link (index + 1) */
    uint16_t subs_cap;
    uint8_t retired; /* generations ran out: never reused (and q->lock) */
} nq__hcold_t;

typedef struct nq__slot {
    NQ__CACHELINE_ALIGNED nq__hslot_t hot; /* first: a hot part's address is the slot's */
    nq__hcold_t cold;
} nq__slot_t;

/* The handle's subscribers (nsubs of them): in place for the first. */
static inline struct nq_sub **nq__cold_subs(nq__hcold_t *c) {
    return c->subs_cap <= 1 ? &c->sub1 : c->subs;
}

/* The cold part of the slot whose hot part is s. */
static inline nq__hcold_t *nq__cold(nq__hslot_t *s) {
    return &((nq__slot_t *)(void *)s)->cold;
}

#define NQ__CHUNK_SHIFT 6
#define NQ__CHUNK_SLOTS (1u << NQ__CHUNK_SHIFT)
_Static_assert(sizeof(nq__slot_t) == NQ__CACHELINE, "a handle is one cache line");
_Static_assert(sizeof(nq__hslot_t) == 32, "a handle's hot part is 32 bytes");
_Static_assert(offsetof(nq__hslot_t, arg1) == offsetof(nq__hslot_t, arg0) + 16,
               "nq__arg_cell picks a cell with generation bit 0 (id bit 4) as the offset");

/* H5: the newest-arg cell of generation parity (id bit 4, worth 16 bytes:
 * one AND and one address computation on the fast path). */
static inline _Atomic int64_t *nq__arg_cell(nq__hslot_t *s, uint32_t id) {
    return (_Atomic int64_t *)((char *)&s->arg0 + (id & (1u << NQ__W_GEN_SHIFT)));
}
_Static_assert(sizeof(nq__hcold_t) <= 32, "a handle's cold part is at most 32 bytes");
_Static_assert(NQ__MAX_WAITERS < (1u << 21) && NQ__MAX_SUBS < (1u << 11),
               "the slot's counts fit their bit-fields");

struct nq_queue {
    nq_config_t cfg;
    uint32_t lo_base;     /* a handle's low half is lo_base + slot index */
    uint32_t wtag;        /* the tag's bits in the word (28..31), and LIVE */
    uint32_t gen_mask;    /* generations wrap within this mask (tests narrow it) */
    /* The chunk directory: chunk c holds slots c * NQ__CHUNK_SLOTS onwards,
     * published (release) once initialised, read with acquire. */
    _Atomic(nq__slot_t *) *chunks;
    pthread_mutex_t lock; /* chunk allocation, free list, counters below */
    uint32_t used;        /* slots ever created */
    uint32_t free_head;   /* FIFO free list (index + 1), 0 = empty */
    uint32_t free_tail;
    uint32_t live;        /* live handles */
    uint32_t retired;     /* slots whose generation ran out */
    _Atomic size_t bytes; /* bytes held, against cfg.memory_limit */
    _Atomic uint32_t refs; /* 1 for the owner + 1 per open wait/subscription */
    _Atomic int closing;

    /* Counters of rarer events (per-handle and per-subscription figures
     * are summed by nq_queue_stats). Relaxed: figures, not synchronisation. */
    _Atomic uint64_t notifies_gone; /* seq of unregistered handles */
    _Atomic uint64_t stored_gone;   /* args stored by subscriptions that left */
    _Atomic uint64_t received_gone; /* args received from them */
    _Atomic uint64_t drops_gone;    /* their drops */
    _Atomic uint64_t waits_closed;
    _Atomic uint64_t waits_completed;
    _Atomic uint64_t waits_timed_out;
    _Atomic uint64_t waits_cancelled;
    _Atomic uint32_t live_waits;
    _Atomic uint32_t live_subs;
};

/* --- the handle word ------------------------------------------------------ */

static inline void nq__spin_pause(unsigned i) {
    if (i < 64)
        nq__cpu_relax();
    else
        sched_yield();
}

/* A chunk not allocated yet is this one: dead slots, never written (every
 * hold of one fails its id check), so a lookup needs no NULL check. */
extern nq__slot_t nq__dead_chunk[NQ__CHUNK_SLOTS];

/* The slot of index (in nq__dead_chunk if its chunk is not allocated). */
static inline nq__hslot_t *nq__slot_at(nq_queue_t *q, uint32_t index) {
    /* Acquire pairs with the release that published the chunk. */
    nq__slot_t *c =
        atomic_load_explicit(&q->chunks[index >> NQ__CHUNK_SHIFT], memory_order_acquire);
    return &c[index & (NQ__CHUNK_SLOTS - 1)].hot;
}

/* The slot a handle value names (its generation not checked yet), with its
 * index, or NULL if it names none of this queue's slots or is malformed. */
static inline nq__hslot_t *nq__slot_of(nq_queue_t *q, nq_handle_t h, uint32_t *index) {
    uint32_t idx = (uint32_t)h - q->lo_base; /* a wrong tag lands past max_handles */
    if (NQ__UNLIKELY(idx >= q->cfg.max_handles || !nq__id_valid(nq__h_id(h))))
        return NULL;
    *index = idx;
    return nq__slot_at(q, idx);
}

/* The slot index a handle names (unchecked). */
static inline uint32_t nq__h_index(const nq_queue_t *q, nq_handle_t h) {
    return (uint32_t)h - q->lo_base;
}

static inline nq_handle_t nq__handle_of(const nq_queue_t *q, uint32_t index, uint32_t id) {
    return ((uint64_t)id << 32) | (uint64_t)(q->lo_base + index);
}

/* The cold part of a slot whose chunk is allocated. */
static inline nq__hcold_t *nq__slot_cold(nq_queue_t *q, uint32_t index) {
    return nq__cold(nq__slot_at(q, index));
}

/* Takes HELD on s if the id part of its word, masked, is id: returns the
 * word as held (HELD set), or 0 if it does not match. */
static inline uint64_t nq__hold_masked(nq__hslot_t *s, uint32_t mask, uint32_t id) {
    uint64_t w = atomic_load_explicit(&s->word, memory_order_relaxed);
    for (unsigned i = 0;; i++) {
        if (NQ__UNLIKELY((nq__w_id(w) & mask) != id))
            return 0;
        /* Acquire: H2, pairs with nq__release. */
        if (!(w & NQ__W_HELD) &&
            atomic_compare_exchange_weak_explicit(&s->word, &w, w | NQ__W_HELD,
                                                  memory_order_acquire, memory_order_relaxed))
            return w | NQ__W_HELD;
        if (w & NQ__W_HELD) {
            nq__spin_pause(i);
            w = atomic_load_explicit(&s->word, memory_order_relaxed);
        }
    }
}

/* Takes HELD on s if its word is the live handle of id (that generation). */
static inline uint64_t nq__hold(nq__hslot_t *s, uint32_t id) {
    return nq__hold_masked(s, UINT32_MAX, id);
}

/* Takes HELD whatever the word says (a free slot, or an object that must
 * order itself after every holder of a slot it was on). */
static inline uint64_t nq__hold_any(nq__hslot_t *s) {
    return nq__hold_masked(s, 0, 0);
}

/* Releases HELD, leaving the word as w says otherwise (H1). Release pairs
 * with the acquire of the next holder and of fast-path readers (H2). */
static inline void nq__release(nq__hslot_t *s, uint64_t w) {
    atomic_store_explicit(&s->word, w & ~NQ__W_HELD, memory_order_release);
}

/* seq of a held word. */
static inline uint64_t nq__held_seq(nq__hslot_t *s, uint64_t w) {
    /* Relaxed: under HELD (H2), or after an acquire of a word past it. */
    return ((uint64_t)atomic_load_explicit(&s->seq_hi, memory_order_relaxed) << 32) | (w >> 32);
}

/* --- the queue object ----------------------------------------------------- */

int nq__mem_reserve(nq_queue_t *q, size_t n);
void nq__mem_release(nq_queue_t *q, size_t n);
static inline void nq__queue_ref(nq_queue_t *q) {
    atomic_fetch_add_explicit(&q->refs, 1, memory_order_relaxed);
}
void nq__queue_unref(nq_queue_t *q);
char *nq__hint_dup(nq_queue_t *q, const char *hint, size_t *charged);
void nq__hint_free(nq_queue_t *q, char *hint);

/* Frees a slot whose handle was just made not live (queue.c, under q->lock
 * and HELD): onto the free list, or retired when its generations ran out. */
void nq__slot_free_locked(nq_queue_t *q, uint32_t index, uint32_t gen);

#endif
