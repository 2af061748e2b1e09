/* Oneshot waits: nq_wait (a blocked thread), nq_wait_start (any runtime, via
 * a waker), and the completion, cancel and release paths that an owner's
 * waits (a port's) share. wait.h says who completes a wait.
 *
 * Invariants:
 *   W1  `listed` (under HELD of the wait's slot) says it is pending. The
 *       holder that completes it unlinks it, stores status and arg, counts
 *       one waker call in flight, then publishes state = DONE; the waker
 *       runs after HELD is released. Release waits for in-flight wakers
 *       before it frees, so a waker never runs on freed memory and never
 *       after nq_wait_release returns.
 *   W2  WAITERS is set in the handle word exactly while the list is
 *       non-empty (both change under HELD), so a notify that finds it clear
 *       with its counting exchange has no wait to complete, and one that
 *       finds it set takes HELD in the same exchange.
 *   W3  No lost `after` wait: attach takes HELD and reads seq in the same
 *       critical section in which it links the wait. A notification counted
 *       before (its exchange is earlier in the word's order) is seen in seq,
 *       and the wait completes at once with the newest arg (handle.h H5); one
 *       counted after finds WAITERS and completes it.
 *
 * Wake-up of a blocked nq_wait (park.h):
 *   completer                               waiter (nq_wait)
 *   state = DONE            (seq_cst, W)    park_prepare          (seq_cst, P)
 *   release HELD                            state != PENDING?     (seq_cst, L)
 *   nq__park_wake: word? -> futex_wake        yes: cancel park; done
 *                                             no:  futex_wait until deadline
 */
#include <sched.h>
#include <string.h>

#include "core/wait.h"

void nq__wait_init(nq_wait_t *w, int kind, nq_waker_t waker, uint32_t bytes, uint32_t refs) {
    w->kind = (uint8_t)kind;
    w->waker = waker;
    w->bytes = bytes;
    atomic_init(&w->state, NQ__W_PENDING);
    atomic_init(&w->inflight, 0);
    atomic_init(&w->refs, refs);
    nq__park_init(&w->park);
}

static void nq__wait_unlink_held(nq__hslot_t *s, nq__hcold_t *cold, nq_wait_t *w) {
    if (w->prev != NULL)
        w->prev->next = w->next;
    else
        cold->waiters = w->next;
    if (w->next != NULL)
        w->next->prev = w->prev;
    w->prev = w->next = NULL;
    w->listed = 0;
    s->nwaiters--; /* the caller clears WAITERS at 0 (W2) */
}

void nq__wait_complete_held(nq__hslot_t *s, nq__hcold_t *cold, nq_wait_t *w, int status,
                            int64_t arg, nq_wait_t **done) {
    nq_queue_t *q = w->q;
    nq__wait_unlink_held(s, cold, w);
    w->status = status;
    w->arg = arg;
    /* Counted under HELD, which nq__wait_quiesce takes before it reads
     * inflight: it cannot miss this increment. */
    atomic_fetch_add_explicit(&w->inflight, 1, memory_order_relaxed);
    /* seq_cst: W of the protocol above; also releases status and arg to
     * nq_wait_result's acquire load. */
    atomic_store_explicit(&w->state, NQ__W_DONE, memory_order_seq_cst);
    w->done_next = *done;
    *done = w;
    _Atomic uint64_t *ctr = status == 0              ? &q->waits_completed
                            : status == NQ_ECLOSED   ? &q->waits_closed
                            : status == NQ_ETIMEDOUT ? &q->waits_timed_out
                                                     : &q->waits_cancelled;
    atomic_fetch_add_explicit(ctr, 1, memory_order_relaxed);
}

void nq__wait_run_wakers(nq_wait_t *done) {
    while (done != NULL) {
        nq_wait_t *w = done;
        done = w->done_next; /* read first: w may be freed once inflight drops */
        if (w->waker.wake != NULL)
            w->waker.wake(w->waker.ctx);
        /* Release pairs with the acquire load in nq__wait_quiesce. */
        atomic_fetch_sub_explicit(&w->inflight, 1, memory_order_release);
    }
}

void nq__wait_quiesce(nq_wait_t *w) {
    nq__hslot_t *s = nq__slot_at(w->q, w->index);
    /* Orders us after any completion's increment (made under HELD). */
    nq__release(s, nq__hold_any(s));
    for (unsigned i = 0; atomic_load_explicit(&w->inflight, memory_order_acquire) != 0; i++)
        nq__spin_pause(i);
}

int nq__wait_cancel_as(nq_wait_t *w, int status, int run_waker) {
    nq__hslot_t *s = nq__slot_at(w->q, w->index);
    nq_wait_t *done = NULL;
    /* Held whatever the generation: a wait of a handle that is gone is no
     * longer listed (its unregister completed it), and that is the answer. */
    uint64_t word = nq__hold_any(s);
    int listed = w->listed;
    if (listed)
        nq__wait_complete_held(s, nq__cold(s), w, status, 0, &done);
    nq__release(s, nq__waiters_flag(s, word));
    if (!listed)
        return NQ_EALREADY;
    if (run_waker)
        nq__wait_run_wakers(done);
    else /* the canceller knows: no waker call */
        atomic_fetch_sub_explicit(&w->inflight, 1, memory_order_release);
    return 0;
}

int nq__wait_attach(nq_queue_t *q, nq_handle_t h, uint64_t after, nq_wait_t *w) {
    uint32_t index, id = nq__h_id(h);
    nq__hslot_t *s = nq__slot_of(q, h, &index);
    if (s == NULL)
        return NQ_EBADH;
    uint64_t word = nq__hold(s, id);
    if (word == 0)
        return NQ_EBADH;
    uint64_t seq = nq__held_seq(s, word);
    w->q = q;
    w->index = index;
    w->id = id;
    w->after = after == NQ_SEQ_NEXT ? seq : after;
    if (seq > w->after) {
        /* W3: notified since the caller's snapshot: due now, with the
         * latest arg, counted in flight and DONE exactly like a notify. */
        w->status = 0;
        w->arg = atomic_load_explicit(nq__arg_cell(s, id), memory_order_relaxed);
        atomic_fetch_add_explicit(&w->inflight, 1, memory_order_relaxed);
        atomic_store_explicit(&w->state, NQ__W_DONE, memory_order_seq_cst);
        atomic_fetch_add_explicit(&q->waits_completed, 1, memory_order_relaxed);
        nq__release(s, word);
        return 1;
    }
    if (s->nwaiters >= q->cfg.max_waiters_per_handle) {
        nq__release(s, word);
        return NQ_ELIMIT;
    }
    nq__hcold_t *cold = nq__cold(s);
    w->prev = NULL;
    w->next = cold->waiters;
    if (cold->waiters != NULL)
        cold->waiters->prev = w;
    cold->waiters = w;
    s->nwaiters++;
    w->listed = 1;
    nq__release(s, word | NQ__W_WAITERS); /* W2 */
    return 0;
}

/* --- nq_wait: a blocked thread ------------------------------------------ */

static void nq__wait_thread_wake(void *ctx) {
    nq_wait_t *w = ctx;
    nq__park_wake(&w->park);
}

int nq_wait(nq_queue_t *q, nq_handle_t h, uint64_t after, int64_t timeout_ns, int64_t *arg) {
    if (q == NULL)
        return NQ_EINVAL;
    nq_wait_t w; /* on our stack: nothing is allocated */
    memset(&w, 0, sizeof(w));
    nq__wait_init(&w, NQ__WK_THREAD, (nq_waker_t){nq__wait_thread_wake, &w}, 0, 1);

    int64_t deadline = nq__deadline_ns(timeout_ns);
    /* Hold the queue while we sleep: nq_queue_free on another thread
     * completes us with NQ_ECLOSED and must not free what we still touch. */
    nq__queue_ref(q);
    int rc = nq__wait_attach(q, h, after, &w);
    if (rc < 0) {
        nq__queue_unref(q);
        return rc;
    }
    if (rc == 1) {
        atomic_fetch_sub_explicit(&w.inflight, 1, memory_order_relaxed); /* no waker */
    } else {
        for (;;) {
            nq__park_prepare(&w.park);
            /* L: seq_cst pairs with the completer's store of DONE. */
            if (atomic_load_explicit(&w.state, memory_order_seq_cst) != NQ__W_PENDING) {
                nq__park_cancel(&w.park);
                break;
            }
            if (nq__now_ns() >= deadline) {
                nq__park_cancel(&w.park);
                if (nq__wait_cancel_as(&w, NQ_ETIMEDOUT, 0) == 0)
                    break; /* we won: NQ_ETIMEDOUT */
                continue;  /* completed meanwhile: take its result */
            }
            int prc = nq__park_commit(&w.park, deadline);
            nq__park_cancel(&w.park);
            if (prc == NQ_ESYS && nq__wait_cancel_as(&w, NQ_ESYS, 0) == 0)
                break;
        }
        nq__wait_quiesce(&w); /* a completer may still be inside its waker */
    }
    if (w.status == 0 && arg != NULL)
        *arg = w.arg;
    rc = w.status;
    nq__queue_unref(q);
    return rc;
}

/* --- nq_wait_start: any runtime ----------------------------------------- */

int nq_wait_start(nq_queue_t *q, nq_handle_t h, uint64_t after, nq_waker_t waker,
                  nq_wait_t **out) {
    if (q == NULL || out == NULL)
        return NQ_EINVAL;
    *out = NULL;
    if (nq__mem_reserve(q, sizeof(nq_wait_t)) < 0)
        return NQ_ENOMEM;
    nq_wait_t *w = nq__calloc(1, sizeof(*w));
    if (w == NULL) {
        nq__mem_release(q, sizeof(nq_wait_t));
        return NQ_ENOMEM;
    }
    nq__wait_init(w, NQ__WK_USER, waker, sizeof(*w), 1);
    int rc = nq__wait_attach(q, h, after, w);
    if (rc < 0) {
        nq__free(w);
        nq__mem_release(q, sizeof(nq_wait_t));
        return rc;
    }
    nq__queue_ref(q);
    atomic_fetch_add_explicit(&q->live_waits, 1, memory_order_relaxed);
    *out = w;
    if (rc == 1) {
        w->done_next = NULL;
        nq__wait_run_wakers(w);
    }
    return 0;
}

int nq_wait_result(nq_wait_t *w, int64_t *arg) {
    if (w == NULL)
        return NQ_EINVAL;
    /* Acquire pairs with the completer's seq_cst store of DONE. */
    if (atomic_load_explicit(&w->state, memory_order_acquire) == NQ__W_PENDING)
        return NQ_EAGAIN;
    if (w->status == 0 && arg != NULL)
        *arg = w->arg;
    return w->status;
}

int nq_wait_cancel(nq_wait_t *w) {
    if (w == NULL)
        return NQ_EINVAL;
    return nq__wait_cancel_as(w, NQ_ECANCELED, w->wake_on_cancel);
}

void nq__wait_unref(nq_wait_t *w) {
    if (atomic_fetch_sub_explicit(&w->refs, 1, memory_order_acq_rel) != 1)
        return;
    nq_queue_t *q = w->q;
    nq__wait_quiesce(w);
    atomic_fetch_sub_explicit(&q->live_waits, 1, memory_order_relaxed);
    size_t bytes = w->bytes;
    nq__free(w);
    nq__mem_release(q, bytes);
    nq__queue_unref(q);
}

void nq_wait_release(nq_wait_t *w) {
    if (w == NULL)
        return;
    nq__wait_cancel_as(w, NQ_ECANCELED, w->wake_on_cancel);
    nq__wait_quiesce(w);
    nq__wait_unref(w);
}
