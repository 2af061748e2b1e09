/* The notification queue's top layer: notify (the fan-out to waits and
 * subscriptions), unregister, the queue's free, stats and dump. The handle
 * table is in handle.c, waits in wait.c, subscriptions in sub.c; this file
 * is the only one that uses all three.
 *
 * The path of one notification (nq_notify):
 *   slot = chunks[index(h) / 64] + index % 64    one acquire load, one line
 *   w = load(word); a stale handle stops here     NQ_EBADH (H4)
 *   no waits, no subscriptions (H3):
 *     arg cell = arg; CAS word: seq + 1            one RMW, nothing to release
 *   else, the slow path: CAS word: HELD + seq + 1
 *     each subscription: push into its ring       plain stores (sub.c S1-S3)
 *     each due wait: complete with arg            (wait.c W1)
 *     release: store word without HELD            one store (H1)
 *     wake-ups armed by receivers                 outside HELD
 * No allocation, no syscall but the wake-ups of receivers that armed them
 * because they were about to sleep, no lock a client can hold.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "core/queue.h"

/* Completes the waits on s due at seq with arg (under HELD): the list of
 * their wakers to run; *reached counts them. */
static NQ__NOINLINE nq_wait_t *nq__complete_due(nq__hslot_t *s, uint64_t seq, int64_t arg,
                                                int *reached) {
    nq_wait_t *done = NULL;
    nq__hcold_t *cold = nq__cold(s);
    for (nq_wait_t *x = cold->waiters, *next; x != NULL; x = next) {
        next = x->next;
        if (x->after < seq) { /* the first notification numbered after `after` */
            nq__wait_complete_held(s, cold, x, 0, arg, &done);
            ++*reached;
        }
    }
    return done;
}

/* The held part of a notify: w is the word as held (HELD set). Pushes to
 * every subscription and completes due waits, releases, then runs the
 * wake-ups owed (at most nsubs: wake has room for them). */
static NQ__INLINE int nq__notify_held(nq__hslot_t *s, uint64_t w, uint32_t id, int64_t arg,
                                      nq_sub_t **wake) {
    atomic_store_explicit(nq__arg_cell(s, id), arg, memory_order_relaxed);
    w += NQ__W_SEQ_ONE;
    if (NQ__UNLIKELY((w >> 32) == 0)) /* the low half carried (H2; release: see nq_seq) */
        atomic_store_explicit(&s->seq_hi,
                              atomic_load_explicit(&s->seq_hi, memory_order_relaxed) + 1,
                              memory_order_release);
    int reached = 0;
    unsigned nwake = 0;
    nq_wait_t *done = NULL;
    if (w & NQ__W_RECV) {
        nq_sub_t **subs = nq__cold_subs(nq__cold(s));
        for (unsigned i = 0, n = s->nsubs; i < n; i++) {
            unsigned r = nq__sub_push_held(subs[i], arg);
            reached += r & NQ__PUSH_STORED;
            if (NQ__UNLIKELY(r & NQ__PUSH_WAKE))
                wake[nwake++] = subs[i];
        }
    }
    if (NQ__UNLIKELY(w & NQ__W_WAITERS)) {
        done = nq__complete_due(s, nq__held_seq(s, w), arg, &reached);
        w = nq__waiters_flag(s, w);
    }
    nq__release(s, w);
    if (NQ__UNLIKELY(done != NULL))
        nq__wait_run_wakers(done);
    if (NQ__UNLIKELY(nwake != 0))
        nq__sub_run_wakers(wake, nwake);
    return reached;
}

#define NQ__FEW_SUBS 16

/* A handle with more subscriptions than NQ__FEW_SUBS: the same, with room
 * for a wake-up per subscription (8 KiB of stack, only here). */
static NQ__NOINLINE int nq__notify_many(nq__hslot_t *s, uint64_t w, uint32_t id, int64_t arg) {
    nq_sub_t *wake[NQ__MAX_SUBS];
    return nq__notify_held(s, w, id, arg, wake);
}

/* The slow path of a notify to slot s with an id of valid form. */
static NQ__NOINLINE int nq__notify_slow(nq__hslot_t *s, uint32_t id, int64_t arg) {
    /* The fast path let through any id without a flag; one without LIVE
     * would match a dead word's id part below. */
    if (!nq__id_valid(id))
        return NQ_EBADH;
    uint64_t w = nq__hold(s, id);
    if (w == 0)
        return NQ_EBADH;
    if (NQ__UNLIKELY(s->nsubs > NQ__FEW_SUBS))
        return nq__notify_many(s, w, id, arg);
    nq_sub_t *wake[NQ__FEW_SUBS];
    return nq__notify_held(s, w, id, arg, wake);
}

int nq_notify(nq_queue_t *q, nq_handle_t h, int64_t arg) {
    if (NQ__UNLIKELY(q == NULL))
        return NQ_EINVAL;
    uint32_t idx = (uint32_t)h - q->lo_base; /* a wrong tag lands past max_handles */
    if (NQ__UNLIKELY(idx >= q->cfg.max_handles))
        return NQ_EBADH;
    nq__hslot_t *s = nq__slot_at(q, idx);
    uint32_t id = nq__h_id(h);
    if (NQ__UNLIKELY(id & NQ__W_FLAGS)) /* no valid id has one; see NQ__W_DEAD */
        return NQ_EBADH;
    _Atomic int64_t *cell = nq__arg_cell(s, id);
    /* Acquire (load and failed exchange; free on x86, ldar on ARM): the
     * arg store below is then ordered after the store of whoever released
     * the word we read, which a dependency alone does not give under C11
     * (H5: a wait must not read an older notification's arg). */
    uint64_t w = atomic_load_explicit(&s->word, memory_order_acquire);
    /* H3: the word's low half equal to the id: live, this generation, no
     * holder, no waits, no subscriptions (anything else: the slow path,
     * which tells a stale handle from a busy one). */
    while ((uint32_t)w == id) {
        uint64_t n;
        if (NQ__UNLIKELY(__builtin_add_overflow(w, NQ__W_SEQ_ONE, &n)))
            break; /* the low half of seq carries: under HELD */
        /* H5: the arg before the count that publishes it (release). */
        atomic_store_explicit(cell, arg, memory_order_relaxed);
        if (atomic_compare_exchange_weak_explicit(&s->word, &w, n, memory_order_release,
                                                  memory_order_acquire))
            return 0;
    }
    return nq__notify_slow(s, id, arg);
}

int nq_unregister(nq_queue_t *q, nq_handle_t h) {
    if (q == NULL)
        return NQ_EINVAL;
    uint32_t index, id = nq__h_id(h);
    nq__hslot_t *s = nq__slot_of(q, h, &index);
    if (s == NULL)
        return NQ_EBADH;
    pthread_mutex_lock(&q->lock);
    uint64_t w = nq__hold(s, id);
    if (w == 0) {
        pthread_mutex_unlock(&q->lock);
        return NQ_EBADH;
    }
    nq__hcold_t *cold = nq__cold(s);
    nq_wait_t *done = NULL;
    nq_sub_t *wake[NQ__MAX_SUBS];
    unsigned nwake = 0;
    while (cold->waiters != NULL)
        nq__wait_complete_held(s, cold, cold->waiters, NQ_ECLOSED, 0, &done);
    for (unsigned i = 0; i < s->nsubs; i++)
        nq__sub_close_held(nq__cold_subs(cold)[i], wake, &nwake);
    s->nsubs = 0;
    atomic_fetch_add_explicit(&q->notifies_gone, nq__held_seq(s, w), memory_order_relaxed);
    char *hint = cold->hint;
    cold->hint = NULL;
    nq__slot_free_locked(q, index, nq__id_gen(id));
    /* Not live: every later call that names h fails its identity check. */
    nq__release(s, (w & ~(NQ__W_LIVE | NQ__W_FLAGS)) | NQ__W_DEAD);
    q->live--;
    pthread_mutex_unlock(&q->lock);

    nq__hint_free(q, hint);
    nq__wait_run_wakers(done);
    nq__sub_run_wakers(wake, nwake);
    return 0;
}

/* --- lifetime ----------------------------------------------------------- */

void nq_queue_free(nq_queue_t *q) {
    if (q == NULL)
        return;
    if (atomic_exchange_explicit(&q->closing, 1, memory_order_relaxed))
        return; /* a second free of the same queue: ignore it */
    pthread_mutex_lock(&q->lock);
    uint32_t used = q->used;
    pthread_mutex_unlock(&q->lock);
    for (uint32_t i = 0; i < used; i++) {
        nq__hslot_t *s = nq__slot_at(q, i);
        uint64_t w = nq__hold_any(s);
        nq__release(s, w);
        if (w & NQ__W_LIVE)
            nq_unregister(q, nq__handle_of(q, i, nq__w_id(w)));
    }
    nq__queue_unref(q);
}

/* --- observability ------------------------------------------------------ */

int nq_queue_stats(const nq_queue_t *cq, nq_stats_t *out) {
    if (cq == NULL || out == NULL)
        return NQ_EINVAL;
    nq_queue_t *q = (nq_queue_t *)cq; /* slots are held; nothing is changed */
    memset(out, 0, sizeof(*out));
    /* Relaxed everywhere: counters, each exact, read at slightly different
     * instants while producers run. */
    pthread_mutex_lock(&q->lock); /* handles and subscriptions leave under it */
    uint64_t notifies = atomic_load_explicit(&q->notifies_gone, memory_order_relaxed);
    uint64_t drops = atomic_load_explicit(&q->drops_gone, memory_order_relaxed);
    uint64_t stored = atomic_load_explicit(&q->stored_gone, memory_order_relaxed);
    for (uint32_t i = 0; i < q->used; i++) {
        nq__hslot_t *s = nq__slot_at(q, i);
        uint64_t w = nq__hold_any(s);
        if (w & NQ__W_LIVE) {
            notifies += nq__held_seq(s, w);
            out->waits_pending += s->nwaiters;
            nq__hcold_t *cold = nq__slot_cold(q, i);
            for (unsigned j = 0; j < s->nsubs; j++) {
                drops += nq__sub_dropped(nq__cold_subs(cold)[j]);
                stored += nq__sub_stored(nq__cold_subs(cold)[j]);
            }
        }
        nq__release(s, w);
    }
    out->live_handles = q->live;
    out->retired_slots = q->retired;
    pthread_mutex_unlock(&q->lock);
    out->notifies = notifies;
    out->drops = drops;
    out->waits_completed = atomic_load_explicit(&q->waits_completed, memory_order_relaxed);
    out->waits_closed = atomic_load_explicit(&q->waits_closed, memory_order_relaxed);
    out->waits_timed_out = atomic_load_explicit(&q->waits_timed_out, memory_order_relaxed);
    out->waits_cancelled = atomic_load_explicit(&q->waits_cancelled, memory_order_relaxed);
    out->deliveries = out->waits_completed + stored;
    out->live_waits = atomic_load_explicit(&q->live_waits, memory_order_relaxed);
    out->live_subs = atomic_load_explicit(&q->live_subs, memory_order_relaxed);
    out->bytes_held = atomic_load_explicit(&q->bytes, memory_order_relaxed);
    out->memory_limit = q->cfg.memory_limit;
    return 0;
}

int nq_queue_dump(const nq_queue_t *cq, FILE *f) {
    if (cq == NULL || f == NULL)
        return NQ_EINVAL;
    nq_queue_t *q = (nq_queue_t *)cq;
    nq_stats_t st;
    nq_queue_stats(q, &st);
    fprintf(f, "nq queue %p: %" PRIu32 " live handles, %zu of %zu bytes held\n", (void *)q,
            st.live_handles, st.bytes_held, st.memory_limit);
    pthread_mutex_lock(&q->lock);
    for (uint32_t i = 0; i < q->used; i++) {
        nq__hslot_t *s = nq__slot_at(q, i);
        nq__hcold_t *cold = nq__slot_cold(q, i);
        uint64_t w = nq__hold_any(s);
        if (!(w & NQ__W_LIVE)) {
            nq__release(s, w);
            continue;
        }
        fprintf(f, "  handle %#" PRIx64 " \"%s\": seq %" PRIu64 ", %" PRIu32
                   " waiters, %u subscribers\n",
                nq__handle_of(q, i, nq__w_id(w)), cold->hint ? cold->hint : "",
                nq__held_seq(s, w), (uint32_t)s->nwaiters, (unsigned)s->nsubs);
        for (nq_wait_t *x = cold->waiters; x != NULL; x = x->next)
            fprintf(f, "    wait %p (%s)\n", (void *)x,
                    x->kind == NQ__WK_OWNED    ? "port"
                    : x->kind == NQ__WK_THREAD ? "thread"
                                               : "waker");
        for (unsigned j = 0; j < s->nsubs; j++) {
            nq_sub_t *sub = nq__cold_subs(cold)[j];
            fprintf(f, "    sub \"%s\": depth %" PRIu64 "/%" PRIu32 ", dropped %" PRIu64 ", %s\n",
                    sub->hint ? sub->hint : "", nq__sub_held(sub), sub->capacity,
                    nq__sub_dropped(sub),
                    sub->overflow == NQ_DROP_OLDEST ? "drop-oldest" : "drop-newest");
        }
        nq__release(s, w);
    }
    pthread_mutex_unlock(&q->lock);
    return ferror(f) ? NQ_ESYS : 0;
}
