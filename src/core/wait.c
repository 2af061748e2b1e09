/* Oneshot waits: nq_wait (a blocked thread), nq_wait_start (any runtime, via
 * a waker) and the completion, cancel and release paths that port waits share.
 *
 * A wait is completed exactly once, by whichever comes first under the handle
 * slot's lock: a notification numbered after `after`, nq_unregister
 * (NQ_ECLOSED), a cancel (NQ_ECANCELED) or a port timeout (NQ_ETIMEDOUT).
 * `listed` (under the slot lock) says it is still pending; completing it
 * unlinks it, stores status and arg, publishes state = DONE, and counts one
 * waker call in flight. The waker runs after the slot is unlocked; release
 * waits for in-flight wakers before it frees, so a waker never runs on freed
 * memory and never after nq_wait_release returns.
 *
 * Wake-up protocol of a blocked nq_wait (park.h draws it):
 *   completer                               waiter (nq_wait)
 *   state = DONE            (seq_cst, W)    park_prepare          (seq_cst, P)
 *   unlock slot                             state != PENDING?     (seq_cst, L)
 *   nq__park_wake: word? -> futex_wake        yes: cancel park; done
 *                                             no:  futex_wait until deadline
 */
#include <sched.h>
#include <string.h>

#include "core/queue.h"

static void nq__wait_unlink_locked(nq__hslot_t *s, nq__hcold_t *cold, nq_wait_t *w) {
    if (w->prev != NULL)
        w->prev->next = w->next;
    else
        cold->waiters = w->next;
    if (w->next != NULL)
        w->next->prev = w->prev;
    w->prev = w->next = NULL;
    w->listed = 0;
    s->nwaiters--;
}

/* Under the slot lock. Appends w to *done for nq__wait_run_wakers. */
void nq__wait_complete_locked(nq_wait_t *w, int status, int64_t arg, nq_wait_t **done) {
    nq_queue_t *q = w->q;
    nq__wait_unlink_locked(nq__slot_at(q, w->index), nq__slot_cold(q, w->index), w);
    w->status = status;
    w->arg = arg;
    /* Counted under the slot lock, which nq__wait_quiesce takes before it
     * reads inflight: it cannot miss this increment. */
    atomic_fetch_add_explicit(&w->inflight, 1, memory_order_relaxed);
    /* seq_cst: W of the protocol above; also releases status and arg to
     * nq_wait_result's acquire load. */
    atomic_store_explicit(&w->state, NQ__W_DONE, memory_order_seq_cst);
    w->done_next = *done;
    *done = w;
    switch (status) {
    case 0:
        atomic_fetch_add_explicit(&q->waits_completed, 1, memory_order_relaxed);
        break;
    case NQ_ECLOSED:
        atomic_fetch_add_explicit(&q->waits_closed, 1, memory_order_relaxed);
        break;
    case NQ_ETIMEDOUT:
        atomic_fetch_add_explicit(&q->waits_timed_out, 1, memory_order_relaxed);
        break;
    default:
        atomic_fetch_add_explicit(&q->waits_cancelled, 1, memory_order_relaxed);
        break;
    }
}

/* Runs the wakers of waits completed by nq__wait_complete_locked, outside
 * every lock, each exactly once. */
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

/* Waits for waker calls in flight to return (they are short by contract). */
void nq__wait_quiesce(nq_wait_t *w) {
    nq__hslot_t *s = nq__slot_at(w->q, w->index);
    nq__lock(&s->lock); /* orders us after any completion's increment */
    nq__unlock(&s->lock);
    for (unsigned i = 0; atomic_load_explicit(&w->inflight, memory_order_acquire) != 0; i++) {
        if (i < 64)
            nq__cpu_relax();
        else
            sched_yield();
    }
}

/* Completes w with status if it is still pending: 0, or NQ_EALREADY. Only a
 * port wait's waker runs (it brings the callback); a user's never does, and
 * neither does a port wait's when the port itself cancels it on its own
 * thread (run_port_waker 0: it runs the callback at once, and a waker would
 * only queue a stale token and an eventfd write). */
static int nq__wait_cancel(nq_wait_t *w, int status, int run_port_waker) {
    nq__hslot_t *s = nq__slot_at(w->q, w->index);
    nq_wait_t *done = NULL;
    nq__lock(&s->lock);
    int listed = w->listed;
    if (listed)
        nq__wait_complete_locked(w, status, 0, &done);
    nq__unlock(&s->lock);
    if (!listed)
        return NQ_EALREADY;
    if (w->kind == NQ__WK_PORT && run_port_waker) {
        nq__wait_run_wakers(done); /* the port runs its callback with status */
    } else {
        /* The canceller knows: a cancelled wait's waker never runs. */
        atomic_fetch_sub_explicit(&w->inflight, 1, memory_order_release);
    }
    return 0;
}

int nq__wait_cancel_status(nq_wait_t *w, int status) {
    return nq__wait_cancel(w, status, 1);
}

int nq__wait_cancel_by_port(nq_wait_t *w, int status) {
    return nq__wait_cancel(w, status, 0);
}

/* Starts w on h: 1 if it completed at once (its waker is owed: the caller
 * runs nq__wait_run_wakers on it), 0 if pending, or an error. */
int nq__wait_attach(nq_queue_t *q, nq_handle_t h, uint64_t after, nq_wait_t *w) {
    int err;
    nq__hslot_t *s = nq__slot_lock(q, h, &err);
    if (s == NULL)
        return err;
    uint64_t seq = atomic_load_explicit(&s->seq, memory_order_relaxed);
    w->q = q;
    w->index = (uint32_t)h - 1;
    w->gen = (uint32_t)(h >> 32);
    w->after = after == NQ_SEQ_NEXT ? seq : after;
    if (seq > w->after) {
        /* Notified since the caller's snapshot: due now, with the latest arg.
         * Counted as in flight and DONE exactly like a notify would. */
        w->status = 0;
        w->arg = s->last_arg;
        atomic_fetch_add_explicit(&w->inflight, 1, memory_order_relaxed);
        atomic_store_explicit(&w->state, NQ__W_DONE, memory_order_seq_cst);
        atomic_fetch_add_explicit(&q->waits_completed, 1, memory_order_relaxed);
        nq__unlock(&s->lock);
        return 1;
    }
    if (s->nwaiters >= q->cfg.max_waiters_per_handle) {
        nq__unlock(&s->lock);
        return NQ_ELIMIT;
    }
    nq__hcold_t *cold = nq__slot_cold(q, w->index);
    w->prev = NULL;
    w->next = cold->waiters;
    if (cold->waiters != NULL)
        cold->waiters->prev = w;
    cold->waiters = w;
    s->nwaiters++;
    w->listed = 1;
    nq__unlock(&s->lock);
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
    w.kind = NQ__WK_THREAD;
    w.waker.wake = nq__wait_thread_wake;
    w.waker.ctx = &w;
    nq__park_init(&w.park);
    atomic_init(&w.state, NQ__W_PENDING);
    atomic_init(&w.inflight, 0);

    int64_t deadline = nq__deadline_ns(timeout_ns);
    /* Hold the queue while we sleep: nq_queue_free on another thread
     * completes us with NQ_ECLOSED and must not free what we still touch. */
    atomic_fetch_add_explicit(&q->refs, 1, memory_order_relaxed);
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
                if (nq__wait_cancel_status(&w, NQ_ETIMEDOUT) == 0)
                    break; /* we won: NQ_ETIMEDOUT */
                continue;  /* completed meanwhile: take its result */
            }
            int prc = nq__park_commit(&w.park, deadline);
            nq__park_cancel(&w.park);
            if (prc == NQ_ESYS) {
                if (nq__wait_cancel_status(&w, NQ_ESYS) == 0)
                    break;
            }
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
    w->kind = NQ__WK_USER;
    w->waker = waker;
    atomic_init(&w->state, NQ__W_PENDING);
    atomic_init(&w->inflight, 0);
    atomic_init(&w->refs, 1);
    int rc = nq__wait_attach(q, h, after, w);
    if (rc < 0) {
        nq__free(w);
        nq__mem_release(q, sizeof(nq_wait_t));
        return rc;
    }
    atomic_fetch_add_explicit(&q->refs, 1, memory_order_relaxed);
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
    return nq__wait_cancel_status(w, NQ_ECANCELED);
}

/* Frees w once nobody refers to it. */
void nq__wait_unref(nq_wait_t *w) {
    if (atomic_fetch_sub_explicit(&w->refs, 1, memory_order_acq_rel) != 1)
        return;
    nq_queue_t *q = w->q;
    nq__wait_quiesce(w);
    atomic_fetch_sub_explicit(&q->live_waits, 1, memory_order_relaxed);
    nq__free(w);
    nq__mem_release(q, sizeof(nq_wait_t));
    nq__queue_unref(q);
}

void nq_wait_release(nq_wait_t *w) {
    if (w == NULL)
        return;
    nq__wait_cancel_status(w, NQ_ECANCELED);
    nq__wait_quiesce(w);
    nq__wait_unref(w);
}
