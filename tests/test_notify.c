/* Criterion suite "notify": what nq_notify delivers and how it is counted.
 *
 * nq_notify(h, arg) completes every wait pending on h with arg, pushes arg
 * to every subscription on h and returns how many receivers it reached. These
 * tests check the return value, the `after` numbering of waits, both overflow
 * policies with exact drop counts (delivered + held + dropped == sent), the
 * subscription waker (once per empty -> non-empty transition, on the
 * notifying thread, outside library locks, never after nq_sub_close), that
 * notify never allocates, exact accounting and per-producer order under four
 * producer threads, and that nq_queue_stats counts exactly.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "nq.h"
#include "nqtest.h"
#include "core/internal.h"
#include "core/queue.h"

/* --- helpers ------------------------------------------------------------ */

static nq_queue_t *new_queue(const nq_config_t *cfg) {
    nq_queue_t *q = NULL;
    cr_assert_eq(nq_queue_new(cfg, &q), 0);
    cr_assert_not_null(q);
    return q;
}

static nq_handle_t reg(nq_queue_t *q, const char *hint) {
    nq_handle_t h = 0;
    int rc = nq_register(q, hint, &h);
    cr_assert_eq(rc, 0, "nq_register: %s", nq_err_name(rc));
    return h;
}

static nq_sub_t *sub_w(nq_queue_t *q, nq_handle_t h, uint32_t cap, nq_overflow_t ov,
                       nq_waker_t waker) {
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = cap;
    o.overflow = ov;
    o.waker = waker;
    nq_sub_t *s = NULL;
    int rc = nq_subscribe(q, h, &o, &s);
    cr_assert_eq(rc, 0, "nq_subscribe: %s", nq_err_name(rc));
    return s;
}

static nq_sub_t *sub(nq_queue_t *q, nq_handle_t h, uint32_t cap, nq_overflow_t ov) {
    nq_waker_t none = {NULL, NULL};
    return sub_w(q, h, cap, ov, none);
}

static nq_stats_t stats(nq_queue_t *q) {
    nq_stats_t st;
    cr_assert_eq(nq_queue_stats(q, &st), 0);
    return st;
}

typedef struct counter {
    atomic_int calls;
    atomic_int tid;
} counter_t;

static void count_wake(void *ctx) {
    counter_t *c = ctx;
    atomic_store(&c->tid, cur_tid());
    atomic_fetch_add(&c->calls, 1);
}

static nq_waker_t counting_waker(counter_t *c) {
    atomic_init(&c->calls, 0);
    atomic_init(&c->tid, 0);
    nq_waker_t w = {count_wake, c};
    return w;
}

static nq_wait_t *wait_start(nq_queue_t *q, nq_handle_t h, uint64_t after, nq_waker_t wk) {
    nq_wait_t *w = NULL;
    int rc = nq_wait_start(q, h, after, wk, &w);
    cr_assert_eq(rc, 0, "nq_wait_start: %s", nq_err_name(rc));
    return w;
}

/* --- what notify reaches ------------------------------------------------ */

Test(notify, returns_how_many_receivers_it_reached) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    cr_assert_eq(nq_notify(q, h, 1), 0, "no receivers");
    nq_waker_t none = {NULL, NULL};
    nq_wait_t *w1 = wait_start(q, h, NQ_SEQ_NEXT, none);
    nq_wait_t *w2 = wait_start(q, h, NQ_SEQ_NEXT, none);
    nq_sub_t *s[3];
    for (int i = 0; i < 3; i++)
        s[i] = sub(q, h, 2, NQ_DROP_NEWEST);
    cr_assert_eq(nq_notify(q, h, 2), 5, "2 waits + 3 subs");
    /* Waits are oneshot: only the subscriptions remain. */
    cr_assert_eq(nq_notify(q, h, 3), 3);
    /* Full DROP_NEWEST subscriptions store nothing: not reached. */
    cr_assert_eq(nq_notify(q, h, 4), 0);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(nq_sub_dropped(s[i]), 1);
        nq_sub_close(s[i]);
    }
    cr_assert_eq(nq_notify(q, h, 5), 0);
    nq_wait_release(w1);
    nq_wait_release(w2);
    nq_queue_free(q);
}

Test(notify, completes_every_pending_wait_once_with_its_arg) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL), other = reg(q, NULL);
    enum { N = 10 };
    counter_t c[N], oc;
    nq_wait_t *w[N];
    for (int i = 0; i < N; i++)
        w[i] = wait_start(q, h, NQ_SEQ_NEXT, counting_waker(&c[i]));
    nq_wait_t *ow = wait_start(q, other, NQ_SEQ_NEXT, counting_waker(&oc));
    cr_assert_eq(nq_notify(q, h, -123456789012345), N);
    cr_assert_eq(nq_notify(q, h, 2), 0);
    for (int i = 0; i < N; i++) {
        int64_t arg = 0;
        cr_assert_eq(nq_wait_result(w[i], &arg), 0);
        cr_assert_eq(arg, -123456789012345, "the first notification completes the wait");
        cr_assert_eq(atomic_load(&c[i].calls), 1);
        cr_assert_eq(nq_wait_result(w[i], NULL), 0, "arg may be NULL");
        nq_wait_release(w[i]);
    }
    int64_t arg;
    cr_assert_eq(nq_wait_result(ow, &arg), NQ_EAGAIN, "another handle's wait completed");
    cr_assert_eq(atomic_load(&oc.calls), 0);
    nq_wait_release(ow);
    nq_queue_free(q);
}

Test(notify, wait_completes_with_the_first_notification_numbered_after_after) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    uint64_t seq;
    cr_assert_eq(nq_notify(q, h, 100), 0);
    cr_assert_eq(nq_notify(q, h, 101), 0);
    cr_assert_eq(nq_seq(q, h, &seq), 0);
    cr_assert_eq(seq, 2);
    nq_waker_t none = {NULL, NULL};
    /* after = seq + 2: notifications 3 and 4 do not complete it, 5 does. */
    nq_wait_t *far = wait_start(q, h, seq + 2, none);
    /* after = seq: the next one (number 3). */
    nq_wait_t *next = wait_start(q, h, seq, none);
    nq_wait_t *seqnext = wait_start(q, h, NQ_SEQ_NEXT, none);
    int64_t arg = 0;
    cr_assert_eq(nq_notify(q, h, 103), 2);
    cr_assert_eq(nq_wait_result(next, &arg), 0);
    cr_assert_eq(arg, 103);
    cr_assert_eq(nq_wait_result(seqnext, &arg), 0);
    cr_assert_eq(arg, 103);
    cr_assert_eq(nq_wait_result(far, &arg), NQ_EAGAIN);
    cr_assert_eq(nq_notify(q, h, 104), 0);
    cr_assert_eq(nq_wait_result(far, &arg), NQ_EAGAIN);
    cr_assert_eq(nq_notify(q, h, 105), 1);
    cr_assert_eq(nq_wait_result(far, &arg), 0);
    cr_assert_eq(arg, 105);
    /* after below the count: due at once, with the latest arg. */
    counter_t c;
    nq_wait_t *past = wait_start(q, h, 1, counting_waker(&c));
    cr_assert_eq(atomic_load(&c.calls), 1,
                 "a due wait runs its waker before nq_wait_start returns");
    cr_assert_eq(atomic_load(&c.tid), cur_tid());
    cr_assert_eq(nq_wait_result(past, &arg), 0);
    cr_assert_eq(arg, 105);
    nq_wait_release(far);
    nq_wait_release(next);
    nq_wait_release(seqnext);
    nq_wait_release(past);
    nq_queue_free(q);
}

/* --- overflow policies -------------------------------------------------- */

Test(notify, drop_newest_keeps_the_oldest_and_counts_every_drop) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    nq_sub_t *s = sub(q, h, 4, NQ_DROP_NEWEST);
    for (int i = 0; i < 10; i++)
        cr_assert_eq(nq_notify(q, h, i), i < 4 ? 1 : 0, "notify %d", i);
    cr_assert_eq(nq_sub_dropped(s), 6);
    int64_t buf[16];
    cr_assert_eq(nq_sub_recv_batch(s, buf, 16), 4);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(buf[i], i);
    cr_assert_eq(nq_sub_recv_batch(s, buf, 16), 0);
    /* Room again after draining. */
    cr_assert_eq(nq_notify(q, h, 50), 1);
    int64_t arg;
    cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
    cr_assert_eq(arg, 50);
    cr_assert_eq(nq_sub_dropped(s), 6);
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(notify, drop_oldest_keeps_the_newest_and_counts_every_drop) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    nq_sub_t *s = sub(q, h, 4, NQ_DROP_OLDEST);
    for (int i = 0; i < 10; i++)
        cr_assert_eq(nq_notify(q, h, i), 1, "DROP_OLDEST always stores");
    cr_assert_eq(nq_sub_dropped(s), 6);
    int64_t arg;
    for (int i = 6; i < 10; i++) {
        cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
        cr_assert_eq(arg, i);
    }
    cr_assert_eq(nq_sub_try_recv(s, &arg), NQ_EAGAIN);
    /* Partly drained, wrapped ring: order still holds. */
    for (int i = 20; i < 23; i++)
        nq_notify(q, h, i);
    cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
    cr_assert_eq(arg, 20);
    for (int i = 23; i < 26; i++)
        nq_notify(q, h, i);
    /* Held: 21 22 23 24 → 25 pushed out 21. */
    cr_assert_eq(nq_sub_dropped(s), 7);
    for (int i = 22; i < 26; i++) {
        cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
        cr_assert_eq(arg, i);
    }
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(notify, watch_capacity_one_drop_oldest_holds_the_latest) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    nq_sub_t *s = sub(q, h, 1, NQ_DROP_OLDEST);
    for (int i = 1; i <= 100; i++)
        nq_notify(q, h, i);
    int64_t arg;
    cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
    cr_assert_eq(arg, 100);
    cr_assert_eq(nq_sub_dropped(s), 99);
    cr_assert_eq(nq_sub_try_recv(s, &arg), NQ_EAGAIN);
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(notify, capacity_is_exact_not_rounded_up) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.default_capacity = 3;
    nq_queue_t *q = new_queue(&cfg);
    nq_handle_t h = reg(q, NULL);
    nq_sub_t *s5 = sub(q, h, 5, NQ_DROP_NEWEST);
    nq_sub_t *s0 = sub(q, h, 0, NQ_DROP_NEWEST); /* 0: the queue default, 3 */
    nq_sub_t *s7 = sub(q, h, 7, NQ_DROP_OLDEST);
    int reached = 0;
    for (int i = 0; i < 20; i++)
        reached += nq_notify(q, h, i);
    cr_assert_eq(reached, 5 + 3 + 20);
    cr_assert_eq(nq_sub_dropped(s5), 15);
    cr_assert_eq(nq_sub_dropped(s0), 17);
    cr_assert_eq(nq_sub_dropped(s7), 13);
    int64_t buf[32];
    cr_assert_eq(nq_sub_recv_batch(s5, buf, 32), 5);
    cr_assert_eq(nq_sub_recv_batch(s0, buf, 32), 3);
    cr_assert_eq(nq_sub_recv_batch(s7, buf, 32), 7);
    cr_assert_eq(buf[0], 13);
    cr_assert_eq(buf[6], 19);
    nq_sub_close(s5);
    nq_sub_close(s0);
    nq_sub_close(s7);
    nq_queue_free(q);
}

Test(notify, bad_subscription_options_are_einval) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.overflow = (nq_overflow_t)7;
    nq_sub_t *s = (nq_sub_t *)&s;
    cr_assert_eq(nq_subscribe(q, h, &o, &s), NQ_EINVAL);
    cr_assert_null(s);
    cr_assert_eq(nq_sub_try_recv(NULL, NULL), NQ_EINVAL);
    int64_t buf[1];
    cr_assert_eq(nq_sub_recv_batch(NULL, buf, 1), NQ_EINVAL);
    cr_assert_eq(nq_sub_recv(NULL, 0, NULL), NQ_EINVAL);
    cr_assert_eq(nq_sub_dropped(NULL), 0);
    nq_sub_close(NULL);
    cr_assert_eq(stats(q).live_subs, 0);
    nq_queue_free(q);
}

/* --- the subscription waker ---------------------------------------------- */

Test(notify, sub_waker_runs_once_per_empty_to_nonempty_transition) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    counter_t c;
    nq_sub_t *s = sub_w(q, h, 3, NQ_DROP_NEWEST, counting_waker(&c));
    cr_assert_eq(atomic_load(&c.calls), 0);
    nq_notify(q, h, 1);
    cr_assert_eq(atomic_load(&c.calls), 1);
    nq_notify(q, h, 2);
    nq_notify(q, h, 3);
    nq_notify(q, h, 4); /* dropped */
    cr_assert_eq(atomic_load(&c.calls), 1, "non-empty -> non-empty is no transition");
    int64_t arg;
    cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
    nq_notify(q, h, 5); /* partly drained: still non-empty */
    cr_assert_eq(atomic_load(&c.calls), 1);
    int64_t buf[8];
    cr_assert_eq(nq_sub_recv_batch(s, buf, 8), 3);
    cr_assert_eq(atomic_load(&c.calls), 1, "draining calls no waker");
    nq_notify(q, h, 6);
    cr_assert_eq(atomic_load(&c.calls), 2);
    cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
    cr_assert_eq(arg, 6);
    /* Many transitions, one call each. */
    for (int i = 0; i < 100; i++) {
        nq_notify(q, h, i);
        nq_notify(q, h, i);
        cr_assert_eq(nq_sub_recv_batch(s, buf, 8), 2);
    }
    cr_assert_eq(atomic_load(&c.calls), 102);
    /* Closing the subscription calls nothing. */
    nq_sub_close(s);
    cr_assert_eq(atomic_load(&c.calls), 102);
    nq_queue_free(q);
}

Test(notify, drop_oldest_overflow_is_no_transition) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    counter_t c;
    nq_sub_t *s = sub_w(q, h, 1, NQ_DROP_OLDEST, counting_waker(&c));
    for (int i = 0; i < 50; i++)
        nq_notify(q, h, i);
    cr_assert_eq(atomic_load(&c.calls), 1);
    nq_sub_close(s);
    nq_queue_free(q);
}

struct notifier_arg {
    nq_queue_t *q;
    nq_handle_t h;
    int64_t arg;
    atomic_int tid;
    atomic_int rc;
};

static void *notify_thread(void *a) {
    struct notifier_arg *n = a;
    atomic_store(&n->tid, cur_tid());
    atomic_store(&n->rc, nq_notify(n->q, n->h, n->arg));
    return NULL;
}

Test(notify, wakers_run_on_the_notifying_thread) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    counter_t cs, cw;
    nq_sub_t *s = sub_w(q, h, 4, NQ_DROP_NEWEST, counting_waker(&cs));
    nq_wait_t *w = wait_start(q, h, NQ_SEQ_NEXT, counting_waker(&cw));
    struct notifier_arg n = {.q = q, .h = h, .arg = 31};
    atomic_init(&n.tid, 0);
    atomic_init(&n.rc, -1);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, notify_thread, &n), 0);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(atomic_load(&n.rc), 2);
    cr_assert_eq(atomic_load(&cs.calls), 1);
    cr_assert_eq(atomic_load(&cw.calls), 1);
    cr_assert_neq(atomic_load(&n.tid), cur_tid());
    cr_assert_eq(atomic_load(&cs.tid), atomic_load(&n.tid), "sub waker on another thread");
    cr_assert_eq(atomic_load(&cw.tid), atomic_load(&n.tid), "wait waker on another thread");
    nq_wait_release(w);
    nq_sub_close(s);
    nq_queue_free(q);
}

/* A waker that calls back into the library on the same handle: it would
 * deadlock if wakers ran under the handle's or the subscription's lock. */
static struct {
    nq_queue_t *q;
    nq_handle_t h, h2;
    nq_sub_t *s;
    atomic_int calls;
    atomic_int rc_seq, rc_notify, rc_dump;
    _Atomic uint64_t seq;
} RE;

static void reentrant_wake(void *ctx) {
    (void)ctx;
    uint64_t seq = 0;
    atomic_store(&RE.rc_seq, nq_seq(RE.q, RE.h, &seq));
    atomic_store(&RE.seq, seq);
    atomic_store(&RE.rc_notify, nq_notify(RE.q, RE.h2, 9));
    FILE *f = fopen("/dev/null", "w");
    atomic_store(&RE.rc_dump, nq_queue_dump(RE.q, f));
    fclose(f);
    int64_t dropped = (int64_t)nq_sub_dropped(RE.s);
    (void)dropped;
    atomic_fetch_add(&RE.calls, 1);
}

Test(notify, wakers_run_outside_library_locks, .timeout = 20) {
    RE.q = new_queue(NULL);
    RE.h = reg(RE.q, "h");
    RE.h2 = reg(RE.q, "h2");
    nq_waker_t wk = {reentrant_wake, NULL};
    RE.s = sub_w(RE.q, RE.h, 4, NQ_DROP_NEWEST, wk);
    nq_wait_t *w = wait_start(RE.q, RE.h, NQ_SEQ_NEXT, wk);
    nq_sub_t *s2 = sub(RE.q, RE.h2, 4, NQ_DROP_NEWEST);
    cr_assert_eq(nq_notify(RE.q, RE.h, 1), 2);
    cr_assert_eq(atomic_load(&RE.calls), 2);
    cr_assert_eq(atomic_load(&RE.rc_seq), 0);
    cr_assert_eq(atomic_load(&RE.seq), 1);
    cr_assert_eq(atomic_load(&RE.rc_notify), 1);
    cr_assert_eq(atomic_load(&RE.rc_dump), 0);
    int64_t buf[4];
    cr_assert_eq(nq_sub_recv_batch(s2, buf, 4), 2);
    nq_wait_release(w);
    nq_sub_close(RE.s);
    nq_sub_close(s2);
    nq_queue_free(RE.q);
}

/* nq_sub_close waits for a waker call in progress, and after it returns
 * the waker never runs again. */
typedef struct close_ctx {
    atomic_int in_waker;
    atomic_int closed;
    atomic_int calls;
} close_ctx_t;

static atomic_int late_calls;

static void slow_wake(void *ctx) {
    close_ctx_t *c = ctx;
    atomic_store(&c->in_waker, 1);
    if (atomic_load(&c->closed))
        atomic_fetch_add(&late_calls, 1);
    for (volatile int i = 0; i < 2000; i++) {
    }
    if (atomic_load(&c->closed))
        atomic_fetch_add(&late_calls, 1);
    atomic_fetch_add(&c->calls, 1);
    atomic_store(&c->in_waker, 0);
}

static struct {
    nq_queue_t *q;
    nq_handle_t h;
    atomic_int stop;
    atomic_long notifies;
} CN;

static void *hammer_notify(void *a) {
    (void)a;
    while (!atomic_load_explicit(&CN.stop, memory_order_relaxed)) {
        nq_notify(CN.q, CN.h, 1);
        atomic_fetch_add_explicit(&CN.notifies, 1, memory_order_relaxed);
    }
    return NULL;
}

Test(notify, sub_waker_never_runs_after_close_returns, .timeout = 60) {
    CN.q = new_queue(NULL);
    CN.h = reg(CN.q, NULL);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, hammer_notify, NULL), 0);
    while (atomic_load(&CN.notifies) == 0)
        sched_yield(); /* the notifier is running */
    /* Each round waits for the notifier to make progress after the
     * subscription exists, so wakers really run around the close. */
    const int iters = SCALE(3000);
    close_ctx_t *ctx = calloc((size_t)iters, sizeof(*ctx));
    cr_assert_not_null(ctx);
    long in_waker_after_close = 0, total_calls = 0;
    const int64_t t0 = now_ns();
    int n = 0;
    for (int i = 0; i < iters && now_ns() - t0 < 10000000000; i++, n++) {
        nq_waker_t wk = {slow_wake, &ctx[i]};
        nq_sub_t *s = sub_w(CN.q, CN.h, 1, NQ_DROP_OLDEST, wk);
        long n0 = atomic_load(&CN.notifies);
        for (int k = 0; atomic_load(&CN.notifies) - n0 < 2 && k < 1000000; k++) {
            if (k > 1000)
                sched_yield();
        }
        for (volatile int k = 0; k < (i % 7) * 500; k++) {
        } /* close at varying points of the notifier's cycle */
        /* Drain now and then so more empty -> non-empty transitions happen. */
        int64_t arg;
        nq_sub_try_recv(s, &arg);
        nq_sub_close(s);
        if (atomic_load(&ctx[i].in_waker))
            in_waker_after_close++;
        atomic_store(&ctx[i].closed, 1);
        total_calls += atomic_load(&ctx[i].calls);
    }
    atomic_store(&CN.stop, 1);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(in_waker_after_close, 0, "nq_sub_close returned while its waker ran");
    cr_assert_eq(atomic_load(&late_calls), 0, "a waker ran after nq_sub_close returned");
    cr_assert_gt(total_calls, 0, "the waker never ran: the test exercised nothing");
    free(ctx);
    nq_queue_free(CN.q);
}

/* --- notify does bounded work ------------------------------------------- */

Test(notify, never_allocates) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, "h");
    nq_sub_t *a = sub(q, h, 2, NQ_DROP_NEWEST);
    nq_sub_t *b = sub(q, h, 2, NQ_DROP_OLDEST);
    counter_t c;
    nq_wait_t *w = wait_start(q, h, NQ_SEQ_NEXT, counting_waker(&c));
    nq__alloc_fail_at(1, 1); /* every allocation from now on fails */
    int r0 = nq_notify(q, h, 1);
    int r1 = nq_notify(q, h, 2);
    int r2 = nq_notify(q, h, 3);
    long failed = nq__alloc_fail_at(0, 0);
    cr_assert_eq(failed, 0, "nq_notify tried to allocate %ld times", failed);
    cr_assert_eq(r0, 3);
    cr_assert_eq(r1, 2);
    cr_assert_eq(r2, 1);
    nq_wait_release(w);
    nq_sub_close(a);
    nq_sub_close(b);
    nq_queue_free(q);
}

/* --- exact accounting and order under four producers --------------------- */

#define NPROD 4
#define NSUBS 3

static struct {
    nq_queue_t *q;
    nq_handle_t h;
    nq_sub_t *s[NSUBS];
    atomic_int producers_done;
    atomic_long reached; /* sum of notify's return values */
    atomic_long sent;
} MP;

static void *producer(void *a) {
    int id = (int)(intptr_t)a;
    const long n = SCALE(200000);
    long reached = 0;
    for (long i = 0; i < n; i++) {
        /* arg: producer id in the high bits, its own sequence below */
        int rc = nq_notify(MP.q, MP.h, ((int64_t)id << 40) | i);
        if (rc >= 0)
            reached += rc;
        else
            reached = -1000000000;
        if ((i & 255) == 0)
            sched_yield();
    }
    atomic_fetch_add(&MP.reached, reached);
    atomic_fetch_add(&MP.sent, n);
    atomic_fetch_add(&MP.producers_done, 1);
    return NULL;
}

struct consumer_res {
    int idx;
    long received;
    long order_errors;
    long bad_args;
};

static void *consumer(void *a) {
    struct consumer_res *r = a;
    nq_sub_t *s = MP.s[r->idx];
    int64_t last[NPROD];
    for (int k = 0; k < NPROD; k++)
        last[k] = -1;
    int64_t buf[32];
    for (;;) {
        int done = atomic_load(&MP.producers_done) == NPROD;
        int n = nq_sub_recv_batch(s, buf, 32);
        if (n < 0) {
            r->bad_args++;
            break;
        }
        for (int k = 0; k < n; k++) {
            int id = (int)(buf[k] >> 40);
            int64_t seq = buf[k] & ((1ll << 40) - 1);
            if (id < 0 || id >= NPROD) {
                r->bad_args++;
                continue;
            }
            if (seq <= last[id])
                r->order_errors++;
            last[id] = seq;
        }
        r->received += n;
        if (n == 0) {
            if (done)
                break; /* producers finished before this empty batch */
            int64_t one;
            int rc = nq_sub_recv(s, 1000000, &one); /* up to 1 ms */
            if (rc == 0) {
                int id = (int)(one >> 40);
                int64_t seq = one & ((1ll << 40) - 1);
                if (id < 0 || id >= NPROD) {
                    r->bad_args++;
                } else {
                    if (seq <= last[id])
                        r->order_errors++;
                    last[id] = seq;
                }
                r->received++;
            } else if (rc != NQ_ETIMEDOUT) {
                r->bad_args++;
                break;
            }
        }
    }
    return NULL;
}

Test(notify, four_producers_exact_accounting_and_per_producer_order, .timeout = 60) {
    memset(&MP, 0, sizeof(MP));
    MP.q = new_queue(NULL);
    MP.h = reg(MP.q, NULL);
    const uint32_t caps[NSUBS] = {16, 64, 1};
    const nq_overflow_t ovs[NSUBS] = {NQ_DROP_NEWEST, NQ_DROP_OLDEST, NQ_DROP_OLDEST};
    for (int i = 0; i < NSUBS; i++)
        MP.s[i] = sub(MP.q, MP.h, caps[i], ovs[i]);
    pthread_t pt[NPROD], ct[NSUBS];
    struct consumer_res res[NSUBS];
    memset(res, 0, sizeof(res));
    for (int i = 0; i < NSUBS; i++) {
        res[i].idx = i;
        cr_assert_eq(pthread_create(&ct[i], NULL, consumer, &res[i]), 0);
    }
    for (int i = 0; i < NPROD; i++)
        cr_assert_eq(pthread_create(&pt[i], NULL, producer, (void *)(intptr_t)i), 0);
    for (int i = 0; i < NPROD; i++)
        cr_assert_eq(pthread_join(pt[i], NULL), 0);
    for (int i = 0; i < NSUBS; i++)
        cr_assert_eq(pthread_join(ct[i], NULL), 0);

    long sent = atomic_load(&MP.sent);
    long stored = 0, total_dropped = 0;
    for (int i = 0; i < NSUBS; i++) {
        long dropped = (long)nq_sub_dropped(MP.s[i]);
        int64_t tmp;
        cr_assert_eq(nq_sub_try_recv(MP.s[i], &tmp), NQ_EAGAIN, "sub %d not drained", i);
        cr_assert_eq(res[i].bad_args, 0, "sub %d: foreign args or errors", i);
        cr_assert_eq(res[i].order_errors, 0, "sub %d: %ld args out of producer order", i,
                     res[i].order_errors);
        /* delivered + held (0 now) + dropped == sent, for both policies */
        cr_assert_eq(res[i].received + dropped, sent,
                     "sub %d: received %ld + dropped %ld != sent %ld", i, res[i].received, dropped,
                     sent);
        /* DROP_NEWEST stores what it delivers; DROP_OLDEST stores everything */
        stored += ovs[i] == NQ_DROP_NEWEST ? res[i].received : sent;
        total_dropped += dropped;
    }
    cr_assert_eq(atomic_load(&MP.reached), stored, "notify reported %ld receivers, %ld stored",
                 atomic_load(&MP.reached), stored);
    nq_stats_t st = stats(MP.q);
    cr_assert_eq(st.notifies, (uint64_t)sent);
    cr_assert_eq(st.drops, (uint64_t)total_dropped);
    cr_assert_eq(st.deliveries, (uint64_t)stored);
    for (int i = 0; i < NSUBS; i++)
        nq_sub_close(MP.s[i]);
    nq_queue_free(MP.q);
}

Test(notify, blocked_sub_recv_wakes_on_a_notify_from_another_thread, .timeout = 20) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    nq_sub_t *s = sub(q, h, 4, NQ_DROP_NEWEST);
    struct notifier_arg n = {.q = q, .h = h, .arg = 4242};
    atomic_init(&n.tid, 0);
    atomic_init(&n.rc, -1);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, notify_thread, &n), 0);
    int64_t arg = 0;
    int64_t t0 = now_ns();
    int rc = nq_sub_recv(s, 10000000000, &arg);
    cr_assert_eq(rc, 0, "%s", nq_err_name(rc));
    cr_assert_eq(arg, 4242);
    cr_assert_lt(now_ns() - t0, (int64_t)5000000000);
    cr_assert_eq(pthread_join(t, NULL), 0);
    /* Empty again: a zero timeout is a poll. */
    cr_assert_eq(nq_sub_recv(s, 0, &arg), NQ_ETIMEDOUT);
    nq_sub_close(s);
    nq_queue_free(q);
}

/* --- stats --------------------------------------------------------------- */

Test(notify, stats_count_exactly_in_a_single_thread) {
    nq_queue_t *q = new_queue(NULL);
    nq_stats_t z = stats(q);
    cr_assert_eq(z.notifies, 0);
    cr_assert_eq(z.deliveries, 0);
    cr_assert_eq(z.drops, 0);
    cr_assert_eq(z.live_handles, 0);
    cr_assert_eq(z.live_waits, 0);
    cr_assert_eq(z.live_subs, 0);
    cr_assert_eq(z.waits_pending, 0);
    cr_assert_gt(z.bytes_held, 0, "the handle index is held");
    cr_assert_leq(z.bytes_held, z.memory_limit);
    size_t base = z.bytes_held;

    nq_handle_t a = reg(q, "a"), b = reg(q, NULL);
    nq_sub_t *sn = sub(q, a, 2, NQ_DROP_NEWEST);
    nq_sub_t *so = sub(q, a, 2, NQ_DROP_OLDEST);
    nq_waker_t none = {NULL, NULL};
    nq_wait_t *w1 = wait_start(q, a, NQ_SEQ_NEXT, none);
    nq_wait_t *w2 = wait_start(q, a, NQ_SEQ_NEXT, none);
    nq_wait_t *wc = wait_start(q, b, NQ_SEQ_NEXT, none);
    nq_stats_t st = stats(q);
    cr_assert_eq(st.live_handles, 2);
    cr_assert_eq(st.live_waits, 3);
    cr_assert_eq(st.live_subs, 2);
    cr_assert_eq(st.waits_pending, 3);
    cr_assert_gt(st.bytes_held, base);

    /* 5 notifies on a: the first completes 2 waits; subs get 2 stored each
     * of the first two, then newest drops 3, oldest stores all and drops 3. */
    int reached = 0;
    for (int i = 0; i < 5; i++)
        reached += nq_notify(q, a, i);
    cr_assert_eq(reached, 2 + 2 + 5);
    cr_assert_eq(nq_notify(q, b + 1000, 1), NQ_EBADH); /* not counted */
    st = stats(q);
    cr_assert_eq(st.notifies, 5);
    cr_assert_eq(st.waits_completed, 2);
    cr_assert_eq(st.deliveries, (uint64_t)reached);
    cr_assert_eq(st.drops, 6);
    cr_assert_eq(st.waits_pending, 1);
    cr_assert_eq(st.live_waits, 3, "completed but not released: still live");

    /* A blocking wait that times out, a cancel, a close. */
    cr_assert_eq(nq_wait(q, b, NQ_SEQ_NEXT, 1000000, NULL), NQ_ETIMEDOUT);
    cr_assert_eq(nq_wait_cancel(wc), 0);
    nq_wait_t *wx = wait_start(q, b, NQ_SEQ_NEXT, none);
    st = stats(q);
    cr_assert_eq(st.waits_timed_out, 1);
    cr_assert_eq(st.waits_cancelled, 1);
    cr_assert_eq(st.waits_closed, 0);
    cr_assert_eq(st.waits_pending, 1);
    nq_notify(q, b, 7);
    nq_notify(q, b, 8);
    st = stats(q);
    cr_assert_eq(st.notifies, 7);
    cr_assert_eq(st.waits_completed, 3);
    cr_assert_eq(st.deliveries, (uint64_t)reached + 1);

    nq_wait_t *wy = wait_start(q, b, NQ_SEQ_NEXT, none);
    nq_wait_release(w1);
    nq_wait_release(w2);
    nq_wait_release(wc);
    nq_wait_release(wx);
    nq_sub_close(sn);
    nq_sub_close(so);
    st = stats(q);
    /* Counters of closed subscriptions are kept. */
    cr_assert_eq(st.drops, 6);
    cr_assert_eq(st.deliveries, (uint64_t)reached + 1);
    cr_assert_eq(st.live_subs, 0);
    cr_assert_eq(st.live_waits, 1);
    cr_assert_eq(nq_unregister(q, b), 0);
    st = stats(q);
    cr_assert_eq(st.waits_closed, 1);
    cr_assert_eq(st.notifies, 7, "unregistering a handle must not forget its notifies");
    cr_assert_eq(st.live_handles, 1);
    cr_assert_eq(st.waits_pending, 0);
    nq_wait_release(wy);
    cr_assert_eq(nq_unregister(q, a), 0);
    st = stats(q);
    cr_assert_eq(st.notifies, 7);
    cr_assert_eq(st.live_handles, 0);
    cr_assert_eq(st.live_waits, 0);
    cr_assert_eq(st.waits_completed, 3);
    cr_assert_eq(st.waits_timed_out, 1);
    cr_assert_eq(st.waits_cancelled, 1);
    cr_assert_eq(st.waits_closed, 1);
    cr_assert_eq(st.drops, 6);
    /* Handle slots (and what a slot keeps for reuse) stay with the queue;
     * everything else comes back: cycles do not grow the bytes held. */
    size_t after_first = 0;
    for (int i = 0; i < 100; i++) {
        nq_handle_t e = reg(q, "again");
        nq_sub_t *s = sub(q, e, 8, NQ_DROP_NEWEST);
        nq_wait_t *w = wait_start(q, e, NQ_SEQ_NEXT, none);
        nq_wait_release(w);
        nq_sub_close(s);
        cr_assert_eq(nq_unregister(q, e), 0);
        if (i == 0)
            after_first = stats(q).bytes_held;
    }
    cr_assert_eq(stats(q).bytes_held, after_first, "bytes grow with register/unregister cycles");
    nq_queue_free(q);
}

Test(notify, stats_keep_counts_of_subscriptions_closed_by_unregister) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    nq_sub_t *s = sub(q, h, 2, NQ_DROP_NEWEST);
    for (int i = 0; i < 5; i++)
        nq_notify(q, h, i);
    nq_stats_t st = stats(q);
    cr_assert_eq(st.drops, 3);
    cr_assert_eq(st.deliveries, 2);
    cr_assert_eq(nq_unregister(q, h), 0);
    /* The subscription is closed by unregister but still open (not yet
     * nq_sub_close'd): the queue's totals must not go down meanwhile. */
    st = stats(q);
    cr_expect_eq(st.notifies, 5);
    cr_expect_eq(st.drops, 3, "drops went from 3 to %llu after unregister",
                 (unsigned long long)st.drops);
    cr_expect_eq(st.deliveries, 2, "deliveries went from 2 to %llu after unregister",
                 (unsigned long long)st.deliveries);
    nq_sub_close(s);
    st = stats(q);
    cr_expect_eq(st.drops, 3);
    cr_expect_eq(st.deliveries, 2);
    nq_queue_free(q);
}

/* --- a consumer is not starved by producers ------------------------------ */

/* Four producers notify one handle in a tight loop for 0.5 s while this
 * thread drains its subscription and reads its seq (neither takes anything
 * a producer holds: the ring is the receiver's, nq_seq reads the word).
 * Printed: consumer operations and the longest; asserted only that the
 * consumer kept going (at least 1000 operations), since on a loaded machine
 * the scheduler alone can pause any thread. */
static nq_queue_t *st_q;
static nq_handle_t st_h;
static atomic_int st_stop;

static void *st_producer(void *arg) {
    (void)arg;
    int64_t n = 0;
    while (!atomic_load_explicit(&st_stop, memory_order_relaxed))
        nq_notify(st_q, st_h, ++n);
    return NULL;
}

Test(notify, a_consumer_keeps_going_while_four_producers_notify_in_a_tight_loop, .timeout = 60) {
    cr_assert_eq(nq_queue_new(NULL, &st_q), 0);
    cr_assert_eq(nq_register(st_q, "tight", &st_h), 0);
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = 64;
    o.overflow = NQ_DROP_OLDEST;
    nq_sub_t *s;
    cr_assert_eq(nq_subscribe(st_q, st_h, &o, &s), 0);
    atomic_store(&st_stop, 0);
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        cr_assert_eq(pthread_create(&t[i], NULL, st_producer, NULL), 0);
    long ops = 0;
    int64_t worst = 0, t0 = now_ns();
    while (now_ns() - t0 < 500 * (int64_t)1000000) {
        int64_t a = now_ns(), buf[8];
        uint64_t seq;
        cr_assert_geq(nq_sub_recv_batch(s, buf, 8), 0);
        cr_assert_eq(nq_seq(st_q, st_h, &seq), 0);
        int64_t d = now_ns() - a;
        if (d > worst)
            worst = d;
        ops++;
    }
    atomic_store(&st_stop, 1);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(pthread_join(t[i], NULL), 0);
    cr_log_info("tight-loop producers x4: the consumer did %ld drain+seq operations in 0.5 s, "
                "the longest %.3f ms",
                ops, (double)worst / 1e6);
    cr_assert_geq(ops, 1000, "the consumer was starved: %ld operations in 0.5 s", ops);
    nq_sub_close(s);
    nq_queue_free(st_q);
}
