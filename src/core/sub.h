/* This file is private to libnq: bounded subscriptions (sub.c), built on the
 * handle table (handle.h). A subscription is a single-writer ring: the
 * writer is whoever holds its handle's HELD (one notify at a time), the
 * reader its receiver, which takes no lock a producer takes. An owner (a
 * port) may embed an nq_sub_t at the start of its own struct; it reaches the
 * subscription through the waker and the close hook it installs, and the
 * subscription knows nothing of it.
 */
#ifndef NQ_CORE_SUB_H
#define NQ_CORE_SUB_H

#include "core/handle.h"
#include "core/park.h"

/* A cell: the arg of position p, stamped 2p + 2 once written (2p + 1 while
 * a drop-oldest push overwrites it; 0 never written). 16 bytes, four to a
 * line: a receiver learns from the cell itself whether it holds the arg it
 * wants, and never reads a line the producer writes for anything else. */
typedef struct nq__cell {
    _Atomic uint64_t stamp;
    _Atomic int64_t arg;
} nq__cell_t;

/* Two cache lines: what producers write (and read) per notification, then
 * what the receiver writes per batch, so neither side's stores take the
 * other's line away. */
struct nq_sub {
    /* Line 1: the producer side. Written under HELD of the handle. */
    NQ__CACHELINE_ALIGNED nq_queue_t *q;
    nq__cell_t *ring;          /* capacity cells; position p is in cell p % capacity */
    _Atomic uint64_t tail;     /* positions stored (figures; receivers read stamps) */
    uint64_t head_cache;       /* drop-newest: a head seen, <= the real one */
    _Atomic uint64_t rejected; /* drop-newest: args refused while full */
    char *hint;
    uint32_t capacity;
    uint32_t tidx;             /* tail % capacity */
    _Atomic uint32_t inflight; /* waker calls owed or running */
    uint8_t overflow;          /* nq_overflow_t, set at creation */
    _Atomic uint8_t armed;     /* the receiver asks to be woken: set and taken under HELD */
    uint8_t attached;          /* under HELD: in the handle's array */
    _Atomic uint8_t closed;    /* the handle let go of it: no push follows */

    /* Line 2: the receiver side. */
    NQ__CACHELINE_ALIGNED _Atomic uint64_t head; /* positions consumed */
    _Atomic uint64_t skipped;  /* drop-oldest: positions lapped before being read */
    nq_waker_t waker;          /* called on an armed empty -> non-empty, and on close */
    void (*on_close)(struct nq_sub *s); /* the owner's nq_sub_close, or NULL */
    uint32_t hidx;             /* head % capacity */
    atomic_uint rstate;        /* NQ__R_* */
    nq__park_t park;           /* a receiver blocked in nq_sub_recv */
    uint32_t index, id;        /* the handle's slot and id (handle.h), set at attach */
    uint32_t bytes;            /* charged to the queue (struct and owner part) */
};
_Static_assert(sizeof(struct nq_sub) == 2 * NQ__CACHELINE, "a subscription is two lines");

/* rstate */
#define NQ__R_BUSY 1u    /* a receive is running (receivers exclude each other) */
#define NQ__R_BLOCKED 2u /* a thread is in nq_sub_recv */
#define NQ__R_TOLD 4u    /* a receive returned NQ_ECLOSED */
#define NQ__R_CLOSING 8u /* nq_sub_close runs: receives answer NQ_ECLOSED */

/* Allocates a subscription of `bytes` (>= sizeof(nq_sub_t); the owner's
 * part follows, zeroed) with opts' capacity, overflow, hint and waker. */
int nq__sub_alloc(nq_queue_t *q, const nq_sub_opts_t *opts, size_t bytes, nq_sub_t **out);
/* Attaches s to h (armed if it has a waker); on failure s stays unattached
 * for nq__sub_destroy. */
int nq__sub_attach(nq_sub_t *s, nq_handle_t h);
#define NQ__PUSH_STORED 1u /* the arg was stored */
#define NQ__PUSH_WAKE 2u   /* its receiver armed a wake-up, now owed (inflight counted) */

/* Under HELD: pushes arg; NQ__PUSH_* bits. Inline: the notify path's inner
 * loop. */
static NQ__INLINE unsigned nq__sub_push_held(nq_sub_t *s, int64_t arg) {
    /* Relaxed: the only writer is us (HELD); S1-S3 of sub.c. */
    uint64_t t = atomic_load_explicit(&s->tail, memory_order_relaxed);
    nq__cell_t *c = &s->ring[s->tidx];
    if (s->overflow == NQ_DROP_NEWEST) {
        if (NQ__UNLIKELY(t - s->head_cache >= s->capacity)) {
            /* S2: acquire pairs with the receiver's release of head. */
            s->head_cache = atomic_load_explicit(&s->head, memory_order_acquire);
            if (t - s->head_cache >= s->capacity) {
                atomic_store_explicit(&s->rejected,
                                      atomic_load_explicit(&s->rejected, memory_order_relaxed) + 1,
                                      memory_order_relaxed);
                return 0; /* full and no wake owed: it is not empty */
            }
        }
        atomic_store_explicit(&c->arg, arg, memory_order_relaxed);
    } else {
        /* S3: the odd stamp, then the arg with release: a receiver whose
         * acquire load of the arg reads this one sees the odd stamp. */
        atomic_store_explicit(&c->stamp, 2 * t + 1, memory_order_relaxed);
        atomic_store_explicit(&c->arg, arg, memory_order_release);
    }
    /* S1: release publishes the arg with its position. */
    atomic_store_explicit(&c->stamp, 2 * t + 2, memory_order_release);
    atomic_store_explicit(&s->tail, t + 1, memory_order_relaxed);
    s->tidx = s->tidx + 1 == s->capacity ? 0 : s->tidx + 1;
    if (NQ__LIKELY(!atomic_load_explicit(&s->armed, memory_order_relaxed)))
        return NQ__PUSH_STORED;
    /* Taken. Counted under HELD, which nq__sub_quiesce takes before it
     * reads inflight: it cannot miss this increment. */
    atomic_store_explicit(&s->armed, 0, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->inflight, 1, memory_order_relaxed);
    return NQ__PUSH_STORED | NQ__PUSH_WAKE;
}

/* Under HELD and q->lock (nq_unregister): the handle is gone. Always owes
 * a wake-up (appended like a push's). */
void nq__sub_close_held(nq_sub_t *s, nq_sub_t **wake, unsigned *nwake);
/* Runs the wake-ups collected by the two above, outside HELD. */
void nq__sub_run_wakers(nq_sub_t **wake, unsigned nwake);
/* Per-subscription figures (any thread; exact once producers and receiver
 * are quiet). */
uint64_t nq__sub_stored(const nq_sub_t *s);
uint64_t nq__sub_dropped(const nq_sub_t *s);
uint64_t nq__sub_held(const nq_sub_t *s);
/* Receiver side, for an owner that drives one: does s hold args? Is it
 * closed with its receiver not yet told? Arm a wake-up if s is empty:
 * returns 1 if armed (or armed already) and still empty, 0 if it holds
 * args or is closed. */
int nq__sub_has_args(nq_sub_t *s);
int nq__sub_closed_untold(nq_sub_t *s);
int nq__sub_arm_if_empty(nq_sub_t *s);
/* Closing: stops receives (they answer NQ_ECLOSED), detaches s from its
 * handle, waits for a blocked receiver to leave and for wakers in flight. */
void nq__sub_shutdown(nq_sub_t *s);
/* Waits for waker calls in flight on s to return. */
void nq__sub_quiesce(nq_sub_t *s);
/* Frees s (after nq__sub_shutdown, or an attach that failed). */
void nq__sub_destroy(nq_sub_t *s);

#endif
