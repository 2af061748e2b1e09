/* This file is private to libnq: oneshot waits (wait.c), built on the handle
 * table (handle.h). A wait is completed exactly once, by a holder of its
 * handle's HELD: a notification numbered after `after` (queue.c), the
 * handle's unregister (NQ_ECLOSED, queue.c), a cancel (wait.c), or its owner
 * (a port's timeout). Whoever runs a wait's callback or frees it knows
 * nothing else about it: a port embeds an nq_wait_t at the start of its own
 * struct and reaches it only through the waker it installs.
 */
#ifndef NQ_CORE_WAIT_H
#define NQ_CORE_WAIT_H

#include "core/handle.h"
#include "core/park.h"

enum { NQ__W_PENDING = 0, NQ__W_DONE = 1 };
enum { NQ__WK_USER, NQ__WK_THREAD, NQ__WK_OWNED };

struct nq_wait {
    nq_queue_t *q;
    uint32_t index;    /* slot index */
    uint32_t id;       /* the handle's id (handle.h) when the wait started */
    uint8_t kind;      /* NQ__WK_* */
    uint8_t listed;    /* under HELD: on the slot's waiter list */
    uint8_t wake_on_cancel; /* a cancel runs the waker (the owner runs a callback) */
    _Atomic int state; /* NQ__W_*; DONE is stored with its status and arg */
    int status;        /* 0, NQ_ECLOSED, NQ_ECANCELED, NQ_ETIMEDOUT */
    uint32_t bytes;    /* allocation charged to the queue (0: on a stack) */
    uint64_t after;    /* completes with the first notification numbered > after */
    int64_t arg;
    nq_waker_t waker;
    struct nq_wait *prev, *next; /* slot list, under HELD */
    struct nq_wait *done_next;   /* the completing thread's private list */
    _Atomic uint32_t inflight;   /* waker calls owed or running */
    _Atomic uint32_t refs;       /* the user's, and an owner's */
    nq__park_t park;             /* NQ__WK_THREAD */
};

/* Prepares w (zeroed memory of `bytes`, charged to the queue by the
 * caller, freed by nq__wait_unref with nq__free) with refs references. */
void nq__wait_init(nq_wait_t *w, int kind, nq_waker_t waker, uint32_t bytes, uint32_t refs);
/* Starts w on h: 1 if it completed at once (its waker is owed: the caller
 * runs nq__wait_run_wakers on it), 0 if pending, or an error.
 * */
int nq__wait_attach(nq_queue_t *q, nq_handle_t h, uint64_t after, nq_wait_t *w);
/* Under HELD of w's slot: completes w (unlinks it, stores status and arg),
 * appending it to *done for nq__wait_run_wakers. The caller clears WAITERS
 * in the word it releases when s->nwaiters drops to 0 (W2). */
void nq__wait_complete_held(nq__hslot_t *s, nq__hcold_t *cold, nq_wait_t *w, int status,
                            int64_t arg, nq_wait_t **done);
/* The word to release after completions: WAITERS cleared if none is left. */
static inline uint64_t nq__waiters_flag(const nq__hslot_t *s, uint64_t w) {
    return s->nwaiters == 0 ? w & ~NQ__W_WAITERS : w;
}
/* Runs the wakers of completed waits, outside HELD, each exactly once. */
void nq__wait_run_wakers(nq_wait_t *done);
/* Completes w with status if still pending: 0, or NQ_EALREADY. run_waker:
 * whether its waker is called (a waiter that cancels its own wait needs no
 * waker; an owner that runs the callback itself neither). */
int nq__wait_cancel_as(nq_wait_t *w, int status, int run_waker);
/* Waits for waker calls in flight on w to return. */
void nq__wait_quiesce(nq_wait_t *w);
/* Drops a reference; the last frees w. */
void nq__wait_unref(nq_wait_t *w);

#endif
