/* Criterion suite "wait": oneshot waits, blocking and with custom wakers.
 *
 * Covers nq_wait's timeouts (CLOCK_MONOTONIC, never early, EINTR never
 * surfaces under a storm of signals whose handler has no SA_RESTART), the
 * lock-free check-then-wait through nq_seq snapshots (a hammer that must lose
 * no wakeup, and a deterministic setup in which a wrapper that ignores the
 * snapshot provably loses one, so the hammer is known to be able to fail),
 * the race of nq_wait_cancel against a notify from another thread (exactly
 * one wins, the waker runs iff the notify won), the waker contract (at most
 * once, on the completing thread, never after nq_wait_release returns), and
 * nq_queue_free completing a blocked nq_wait.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
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


#define MS    (int64_t)1000000
#define SEC   (int64_t)1000000000
#define SLACK (2 * SEC) /* generous upper bound on any timeout's lateness */

/* --- helpers ------------------------------------------------------------ */

static void sleep_ns(int64_t ns) {
    struct timespec ts = {(time_t)(ns / SEC), (long)(ns % SEC)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static nq_queue_t *new_queue(const nq_config_t *cfg) {
    nq_queue_t *q = NULL;
    cr_assert_eq(nq_queue_new(cfg, &q), 0);
    cr_assert_not_null(q);
    return q;
}

static nq_handle_t reg(nq_queue_t *q) {
    nq_handle_t h = 0;
    int rc = nq_register(q, NULL, &h);
    cr_assert_eq(rc, 0, "nq_register: %s", nq_err_name(rc));
    return h;
}

static nq_stats_t stats(nq_queue_t *q) {
    nq_stats_t st;
    cr_assert_eq(nq_queue_stats(q, &st), 0);
    return st;
}

static uint64_t seq_of(nq_queue_t *q, nq_handle_t h) {
    uint64_t s = 0;
    cr_assert_eq(nq_seq(q, h, &s), 0);
    return s;
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

/* A thread that sleeps, then notifies once. */
struct delayed {
    nq_queue_t *q;
    nq_handle_t h;
    int64_t delay_ns, arg;
    atomic_int rc;
    atomic_int tid;
};

static void *delayed_notify(void *a) {
    struct delayed *d = a;
    atomic_store(&d->tid, cur_tid());
    sleep_ns(d->delay_ns);
    atomic_store(&d->rc, nq_notify(d->q, d->h, d->arg));
    return NULL;
}

static pthread_t start_delayed(struct delayed *d, nq_queue_t *q, nq_handle_t h, int64_t delay,
                               int64_t arg) {
    d->q = q;
    d->h = h;
    d->delay_ns = delay;
    d->arg = arg;
    atomic_init(&d->rc, -9999);
    atomic_init(&d->tid, 0);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, delayed_notify, d), 0);
    return t;
}

/* --- blocking nq_wait ---------------------------------------------------- */

Test(wait, blocks_until_notified_from_another_thread, .timeout = 30) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    struct delayed d;
    int64_t t0 = now_ns();
    pthread_t t = start_delayed(&d, q, h, 100 * MS, 555);
    int64_t arg = 0;
    int rc = nq_wait(q, h, NQ_SEQ_NEXT, -1, &arg);
    int64_t el = now_ns() - t0;
    cr_assert_eq(rc, 0, "%s", nq_err_name(rc));
    cr_assert_eq(arg, 555);
    cr_assert_geq(el, 100 * MS, "returned after %lld ns, before the notify", (long long)el);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(atomic_load(&d.rc), 1, "the blocked wait is one receiver");
    /* With a timeout that is not reached, and a NULL arg. */
    t = start_delayed(&d, q, h, 20 * MS, 556);
    cr_assert_eq(nq_wait(q, h, NQ_SEQ_NEXT, 20 * SEC, NULL), 0);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(stats(q).waits_pending, 0);
    nq_queue_free(q);
}

Test(wait, timeouts_are_never_early, .timeout = 30) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    const int64_t tos[] = {0, 1, 1 * MS, 5 * MS, 20 * MS, 100 * MS, 250 * MS};
    for (size_t i = 0; i < sizeof(tos) / sizeof(tos[0]); i++) {
        int64_t arg = 77;
        int64_t t0 = now_ns();
        int rc = nq_wait(q, h, NQ_SEQ_NEXT, tos[i], &arg);
        int64_t el = now_ns() - t0;
        cr_assert_eq(rc, NQ_ETIMEDOUT, "timeout %lld: %s", (long long)tos[i], nq_err_name(rc));
        cr_assert_geq(el, tos[i], "timeout %lld ns returned after %lld ns", (long long)tos[i],
                      (long long)el);
        cr_assert_lt(el, tos[i] + SLACK, "timeout %lld ns took %lld ns", (long long)tos[i],
                     (long long)el);
        cr_assert_eq(arg, 77, "a timed-out wait wrote *arg");
    }
    nq_stats_t st = stats(q);
    cr_assert_eq(st.waits_timed_out, sizeof(tos) / sizeof(tos[0]));
    cr_assert_eq(st.waits_pending, 0);
    cr_assert_eq(st.waits_completed, 0);
    nq_queue_free(q);
}

Test(wait, zero_timeout_still_takes_a_due_notification) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    uint64_t s = seq_of(q, h);
    nq_notify(q, h, 1);
    nq_notify(q, h, 2);
    nq_notify(q, h, 3);
    int64_t arg = 0;
    cr_assert_eq(nq_wait(q, h, s, 0, &arg), 0);
    cr_assert_eq(arg, 3, "the latest arg if several came");
    cr_assert_eq(nq_wait(q, h, s + 2, 0, &arg), 0);
    cr_assert_eq(arg, 3);
    cr_assert_eq(nq_wait(q, h, s + 3, 0, &arg), NQ_ETIMEDOUT);
    cr_assert_eq(nq_wait(q, h, NQ_SEQ_NEXT, 0, &arg), NQ_ETIMEDOUT, "NQ_SEQ_NEXT saw the past");
    nq_queue_free(q);
}

/* --- signals ------------------------------------------------------------- */

static atomic_long sigs_caught;

static void on_usr1(int sig) {
    (void)sig;
    atomic_fetch_add(&sigs_caught, 1);
}

static void install_usr1_without_restart(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: blocking syscalls see EINTR */
    cr_assert_eq(sigaction(SIGUSR1, &sa, NULL), 0);
}

struct storm {
    pthread_t target;
    atomic_int stop;
    atomic_long sent;
};

static void *storm_thread(void *a) {
    struct storm *s = a;
    while (!atomic_load(&s->stop)) {
        pthread_kill(s->target, SIGUSR1);
        atomic_fetch_add(&s->sent, 1);
        usleep(50);
    }
    return NULL;
}

static pthread_t start_storm(struct storm *s) {
    install_usr1_without_restart();
    s->target = pthread_self();
    atomic_init(&s->stop, 0);
    atomic_init(&s->sent, 0);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, storm_thread, s), 0);
    return t;
}

static void stop_storm(struct storm *s, pthread_t t) {
    atomic_store(&s->stop, 1);
    cr_assert_eq(pthread_join(t, NULL), 0);
}

Test(wait, signal_storm_never_surfaces_eintr_nor_shortens_a_timeout, .timeout = 30) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = 4;
    nq_sub_t *s = NULL;
    cr_assert_eq(nq_subscribe(q, h, &o, &s), 0);
    struct storm st;
    pthread_t t = start_storm(&st);
    long before = atomic_load(&sigs_caught);
    for (int round = 0; round < 2; round++) {
        const int64_t to = 300 * MS;
        int64_t t0 = now_ns();
        int rc = nq_wait(q, h, NQ_SEQ_NEXT, to, NULL);
        int64_t el = now_ns() - t0;
        cr_assert_eq(rc, NQ_ETIMEDOUT, "nq_wait under signals: %s", nq_err_name(rc));
        cr_assert_geq(el, to, "nq_wait returned early: %lld ns", (long long)el);
        cr_assert_lt(el, to + SLACK);
        t0 = now_ns();
        int64_t arg;
        rc = nq_sub_recv(s, to, &arg);
        el = now_ns() - t0;
        cr_assert_eq(rc, NQ_ETIMEDOUT, "nq_sub_recv under signals: %s", nq_err_name(rc));
        cr_assert_geq(el, to, "nq_sub_recv returned early: %lld ns", (long long)el);
        cr_assert_lt(el, to + SLACK);
    }
    stop_storm(&st, t);
    cr_assert_gt(atomic_load(&sigs_caught) - before, 10, "the storm never hit the waiter");
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(wait, signal_storm_loses_no_notification, .timeout = 30) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = 4;
    nq_sub_t *s = NULL;
    cr_assert_eq(nq_subscribe(q, h, &o, &s), 0);
    struct storm st;
    pthread_t t = start_storm(&st);
    long before = atomic_load(&sigs_caught);
    struct delayed d;
    int64_t t0 = now_ns();
    pthread_t n = start_delayed(&d, q, h, 150 * MS, 99);
    int64_t arg = 0;
    int rc = nq_wait(q, h, NQ_SEQ_NEXT, -1, &arg);
    int64_t el = now_ns() - t0;
    cr_assert_eq(rc, 0, "%s", nq_err_name(rc));
    cr_assert_eq(arg, 99);
    cr_assert_geq(el, 150 * MS);
    cr_assert_eq(pthread_join(n, NULL), 0);
    /* The subscription got the same notification; now block in recv for a
     * second one under the storm. */
    cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
    cr_assert_eq(arg, 99);
    n = start_delayed(&d, q, h, 150 * MS, 100);
    rc = nq_sub_recv(s, -1, &arg);
    cr_assert_eq(rc, 0, "%s", nq_err_name(rc));
    cr_assert_eq(arg, 100);
    cr_assert_eq(pthread_join(n, NULL), 0);
    stop_storm(&st, t);
    cr_assert_gt(atomic_load(&sigs_caught) - before, 10, "the storm never hit the waiter");
    nq_sub_close(s);
    nq_queue_free(q);
}

/* --- check-then-wait without a lock -------------------------------------- */

/* The client's own condition is `produced >= want`. The producer makes it
 * true, then notifies. The client snapshots the handle's count, checks its
 * condition, and waits after the snapshot. CTW_BROKEN is the same client with
 * a bug: it waits for "the next notification from now" and so misses one
 * that lands between its check and its wait. */
enum ctw_variant { CTW_REAL, CTW_BROKEN };

struct ctw {
    nq_queue_t *q;
    nq_handle_t h;
    atomic_long produced;
    atomic_long consumed;
    atomic_int phase; /* window rounds: 1 = client checked, 2 = producer notified */
    atomic_int stop;
    atomic_long waited;
};

static void ctw_window(struct ctw *c) {
    /* The client has checked and found nothing: let the producer notify
     * now, before the client reaches nq_wait. */
    atomic_store(&c->phase, 1);
    while (atomic_load(&c->phase) != 2)
        sched_yield();
}

/* 0 when the condition holds; NQ_ETIMEDOUT when a wakeup was lost. */
static int check_then_wait(struct ctw *c, long want, enum ctw_variant v, int64_t timeout,
                           void (*window)(struct ctw *)) {
    for (;;) {
        uint64_t snap;
        int rc = nq_seq(c->q, c->h, &snap);
        if (rc != 0)
            return rc;
        if (atomic_load(&c->produced) >= want)
            return 0;
        if (window != NULL)
            window(c);
        atomic_fetch_add(&c->waited, 1);
        rc = nq_wait(c->q, c->h, v == CTW_REAL ? snap : NQ_SEQ_NEXT, timeout, NULL);
        if (rc != 0)
            return rc;
    }
}

static void *ctw_hammer_producer(void *a) {
    struct ctw *c = a;
    uint32_t seed = 12345;
    for (long r = 1; !atomic_load(&c->stop); r++) {
        while (atomic_load(&c->consumed) != r - 1) {
            if (atomic_load(&c->stop))
                return NULL;
            sched_yield();
        }
        /* A little jitter moves the notify around the client's window. */
        seed = seed * 1103515245u + 12345u;
        for (volatile unsigned k = 0; k < (seed >> 20) % 512; k++) {
        }
        atomic_store(&c->produced, r);
        nq_notify(c->q, c->h, r);
    }
    return NULL;
}

Test(wait, check_then_wait_hammer_loses_no_wakeup, .timeout = 60) {
    static struct ctw c;
    c.q = new_queue(NULL);
    c.h = reg(c.q);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, ctw_hammer_producer, &c), 0);
    const long rounds = SCALE(20000);
    long lost = 0, other = 0;
    for (long r = 1; r <= rounds; r++) {
        int rc = check_then_wait(&c, r, CTW_REAL, 5 * SEC, NULL);
        if (rc == NQ_ETIMEDOUT)
            lost++;
        else if (rc != 0)
            other++;
        atomic_store(&c.consumed, r);
        if (lost + other >= 3)
            break; /* enough to fail; don't wait 5 s per round */
    }
    atomic_store(&c.stop, 1);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(other, 0);
    cr_assert_eq(lost, 0, "%ld wakeups lost between check and wait", lost);
    cr_assert_gt(atomic_load(&c.waited), 0, "the client never had to wait: nothing was tested");
    nq_queue_free(c.q);
}

/* Deterministic: in each round the producer notifies exactly once, after the
 * client's snapshot and check and before its nq_wait. */
static void *ctw_window_producer(void *a) {
    struct ctw *c = a;
    for (long r = 1; !atomic_load(&c->stop); r++) {
        while (atomic_load(&c->phase) != 1) {
            if (atomic_load(&c->stop))
                return NULL;
            sched_yield();
        }
        atomic_store(&c->produced, r);
        nq_notify(c->q, c->h, r);
        atomic_store(&c->phase, 2);
        while (atomic_load(&c->consumed) != r) {
            if (atomic_load(&c->stop))
                return NULL;
            sched_yield();
        }
    }
    return NULL;
}

static long ctw_window_rounds(enum ctw_variant v, long rounds, int64_t timeout) {
    static struct ctw c;
    memset(&c, 0, sizeof(c));
    c.q = new_queue(NULL);
    c.h = reg(c.q);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, ctw_window_producer, &c), 0);
    long lost = 0;
    for (long r = 1; r <= rounds; r++) {
        int rc = check_then_wait(&c, r, v, timeout, ctw_window);
        cr_assert(rc == 0 || rc == NQ_ETIMEDOUT, "%s", nq_err_name(rc));
        if (rc == NQ_ETIMEDOUT)
            lost++;
        cr_assert_eq(atomic_load(&c.produced), r);
        atomic_store(&c.phase, 0);
        atomic_store(&c.consumed, r);
    }
    atomic_store(&c.stop, 1);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(seq_of(c.q, c.h), (uint64_t)rounds, "the producer notified once per round");
    nq_queue_free(c.q);
    return lost;
}

Test(wait, check_then_wait_with_the_snapshot_survives_a_notify_in_the_window, .timeout = 30) {
    /* A long timeout: the real wait must return at once, not time out. */
    const long rounds = 50;
    int64_t t0 = now_ns();
    long lost = ctw_window_rounds(CTW_REAL, rounds, 10 * SEC);
    cr_assert_eq(lost, 0, "%ld of %ld notifications in the window were lost", lost, rounds);
    cr_assert_lt(now_ns() - t0, 5 * SEC);
}

Test(wait, check_then_wait_ignoring_the_snapshot_loses_the_notify_in_the_window, .timeout = 30) {
    /* Proves the hammer above can fail: the same client, waiting without
     * its snapshot, loses the wakeup every time the notify lands in the
     * window. */
    const long rounds = 5;
    long lost = ctw_window_rounds(CTW_BROKEN, rounds, 100 * MS);
    cr_assert_geq(lost, 1, "the broken variant lost nothing: the window is not hit");
    cr_assert_eq(lost, rounds);
}

/* --- custom wakers ------------------------------------------------------- */

Test(wait, waker_runs_at_most_once_per_wait) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    counter_t c;
    nq_wait_t *w = NULL;
    cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, counting_waker(&c), &w), 0);
    cr_assert_eq(atomic_load(&c.calls), 0);
    cr_assert_eq(nq_notify(q, h, 1), 1);
    cr_assert_eq(atomic_load(&c.calls), 1);
    cr_assert_eq(atomic_load(&c.tid), cur_tid());
    cr_assert_eq(nq_notify(q, h, 2), 0);
    cr_assert_eq(nq_wait_cancel(w), NQ_EALREADY);
    cr_assert_eq(nq_unregister(q, h), 0);
    cr_assert_eq(atomic_load(&c.calls), 1);
    int64_t arg = 0;
    cr_assert_eq(nq_wait_result(w, &arg), 0);
    cr_assert_eq(arg, 1, "the result is kept");
    nq_wait_release(w);
    cr_assert_eq(atomic_load(&c.calls), 1);

    /* Due at once: the waker runs inside nq_wait_start, once. */
    h = reg(q);
    nq_notify(q, h, 5);
    cr_assert_eq(nq_wait_start(q, h, 0, counting_waker(&c), &w), 0);
    cr_assert_eq(atomic_load(&c.calls), 1);
    cr_assert_eq(nq_wait_result(w, &arg), 0);
    cr_assert_eq(arg, 5);
    nq_notify(q, h, 6);
    nq_wait_release(w);
    cr_assert_eq(atomic_load(&c.calls), 1);
    nq_queue_free(q);
}

Test(wait, wait_states_and_null_arguments) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    nq_waker_t none = {NULL, NULL};
    nq_wait_t *w = NULL;
    int64_t arg = 3;
    cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, none, &w), 0);
    cr_assert_eq(nq_wait_result(w, &arg), NQ_EAGAIN);
    cr_assert_eq(arg, 3);
    cr_assert_eq(nq_wait_cancel(w), 0);
    cr_assert_eq(nq_wait_result(w, &arg), NQ_ECANCELED);
    cr_assert_eq(nq_wait_cancel(w), NQ_EALREADY, "a second cancel must say it lost");
    cr_assert_eq(nq_notify(q, h, 1), 0, "a cancelled wait is no receiver");
    cr_assert_eq(nq_wait_result(w, &arg), NQ_ECANCELED);
    nq_wait_release(w);
    cr_assert_eq(nq_wait_result(NULL, &arg), NQ_EINVAL);
    cr_assert_eq(nq_wait_cancel(NULL), NQ_EINVAL);
    nq_wait_release(NULL);
    nq_stats_t st = stats(q);
    cr_assert_eq(st.waits_cancelled, 1);
    cr_assert_eq(st.live_waits, 0);
    nq_queue_free(q);
}

Test(wait, winning_cancel_never_calls_the_waker) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    counter_t c;
    nq_wait_t *w = NULL;
    cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, counting_waker(&c), &w), 0);
    cr_assert_eq(nq_wait_cancel(w), 0);
    cr_expect_eq(atomic_load(&c.calls), 0,
                 "nq.h: a cancelled wait's waker never runs; it ran %d time(s)",
                 atomic_load(&c.calls));
    nq_wait_release(w);
    cr_expect_eq(atomic_load(&c.calls), 0);
    nq_queue_free(q);
}

Test(wait, releasing_a_pending_wait_never_calls_the_waker) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    counter_t c;
    nq_wait_t *w = NULL;
    cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, counting_waker(&c), &w), 0);
    nq_wait_release(w); /* = cancel, then free */
    cr_expect_eq(atomic_load(&c.calls), 0,
                 "releasing a pending wait cancels it; its waker ran %d time(s)",
                 atomic_load(&c.calls));
    cr_expect_eq(nq_notify(q, h, 1), 0);
    cr_expect_eq(atomic_load(&c.calls), 0);
    nq_queue_free(q);
}

/* nq_wait_release waits for a waker call in progress, and after it returns
 * the waker never runs again. */
typedef struct rel_ctx {
    atomic_int in_waker;
    atomic_int released;
    atomic_int calls;
} rel_ctx_t;

static atomic_long late_wakes;

static void slow_wake(void *ctx) {
    rel_ctx_t *c = ctx;
    atomic_store(&c->in_waker, 1);
    if (atomic_load(&c->released))
        atomic_fetch_add(&late_wakes, 1);
    for (volatile int i = 0; i < 2000; i++) {
    }
    if (atomic_load(&c->released))
        atomic_fetch_add(&late_wakes, 1);
    atomic_fetch_add(&c->calls, 1);
    atomic_store(&c->in_waker, 0);
}

static struct {
    nq_queue_t *q;
    nq_handle_t h;
    atomic_int stop;
    atomic_long notifies;
} HN;

static void *hammer_notify(void *a) {
    (void)a;
    while (!atomic_load_explicit(&HN.stop, memory_order_relaxed)) {
        nq_notify(HN.q, HN.h, 1);
        atomic_fetch_add_explicit(&HN.notifies, 1, memory_order_relaxed);
    }
    return NULL;
}

Test(wait, waker_never_runs_after_release_returns, .timeout = 60) {
    HN.q = new_queue(NULL);
    HN.h = reg(HN.q);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, hammer_notify, NULL), 0);
    while (atomic_load(&HN.notifies) == 0)
        sched_yield(); /* the notifier is running */
    /* Each round waits for the notifier to make progress after the wait
     * exists, so its waker really runs around the release. */
    const int iters = SCALE(30000);
    rel_ctx_t *ctx = calloc((size_t)iters, sizeof(*ctx));
    cr_assert_not_null(ctx);
    long running_after_release = 0, twice = 0, completed = 0;
    const int64_t t0 = now_ns();
    int n = 0;
    for (int i = 0; i < iters && now_ns() - t0 < 10 * SEC; i++, n++) {
        nq_waker_t wk = {slow_wake, &ctx[i]};
        nq_wait_t *w = NULL;
        cr_assert_eq(nq_wait_start(HN.q, HN.h, NQ_SEQ_NEXT, wk, &w), 0);
        if (i % 2 == 0) { /* every other round: let a notify come */
            long n0 = atomic_load(&HN.notifies);
            for (int k = 0; atomic_load(&HN.notifies) == n0 && k < 1000000; k++) {
                if (k > 1000)
                    sched_yield();
            }
        }
        for (volatile int k = 0; k < (i % 5) * 300; k++) {
        } /* release at varying points of the notifier's cycle */
        if (nq_wait_result(w, NULL) == 0)
            completed++;
        nq_wait_release(w);
        if (atomic_load(&ctx[i].in_waker))
            running_after_release++;
        atomic_store(&ctx[i].released, 1);
    }
    atomic_store(&HN.stop, 1);
    cr_assert_eq(pthread_join(t, NULL), 0);
    for (int i = 0; i < n; i++)
        twice += atomic_load(&ctx[i].calls) > 1;
    cr_assert_eq(running_after_release, 0, "nq_wait_release returned while its waker ran");
    cr_assert_eq(atomic_load(&late_wakes), 0, "a waker ran after nq_wait_release returned");
    cr_assert_eq(twice, 0, "a waker ran twice for one wait");
    cr_assert_gt(completed, 0, "no wait was ever completed by the notifier");
    free(ctx);
    nq_queue_free(HN.q);
}

/* --- cancel vs notify ---------------------------------------------------- */

static struct {
    nq_queue_t *q;
    nq_handle_t h;
    atomic_long go;    /* iteration i may start once go == i + 1 */
    atomic_long armed; /* the notifier saw go: both sides start racing */
    atomic_long done;  /* iteration i notified once done == i + 1 */
    atomic_int bias;   /* > 0: extra spins before the cancel; < 0: before the notify */
    atomic_int rc;     /* notify's return of the latest iteration */
    atomic_int tid;
    atomic_int stop;
} CR;

/* Past this bias, the side told to wait also sleeps 100 us: a spin alone
 * does not let the other side run when both share one CPU (TSan on a loaded
 * 2-core machine: cancel once never won in 10 s). */
#define STEER_SLEEP_AT (1 << 16)

static void *cancel_race_notifier(void *a) {
    (void)a;
    atomic_store(&CR.tid, cur_tid());
    uint32_t seed = 99;
    for (long i = 0;; i++) {
        while (atomic_load(&CR.go) != i + 1) {
            if (atomic_load(&CR.stop))
                return NULL;
            sched_yield();
        }
        atomic_store(&CR.armed, i + 1);
        seed = seed * 1103515245u + 12345u;
        int extra = -atomic_load(&CR.bias);
        for (volatile unsigned k = 0; k < (seed >> 16) % 512 + (extra > 0 ? (unsigned)extra : 0);
             k++) {
        }
        if (extra > STEER_SLEEP_AT)
            sleep_ns(100 * 1000); /* see STEER_SLEEP_AT */
        atomic_store(&CR.rc, nq_notify(CR.q, CR.h, 1000 + i));
        atomic_store(&CR.done, i + 1);
    }
}

Test(wait, cancel_vs_notify_exactly_one_wins, .timeout = 60) {
    CR.q = new_queue(NULL);
    CR.h = reg(CR.q);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, cancel_race_notifier, NULL), 0);
    /* iters iterations, more while one side has never won (up to 5 s), and
     * never more than 10 s in all (a loaded machine). */
    const long iters = SCALE(20000);
    const int64_t t0 = now_ns();
    long cancel_won = 0, notify_won = 0, bad_outcome = 0, bad_waker = 0, wrong_thread = 0;
    uint32_t seed = 7;
    for (long i = 0;; i++) {
        int64_t el = now_ns() - t0;
        if (i >= iters && ((cancel_won > 0 && notify_won > 0) || el > 5 * SEC))
            break;
        if (el > 10 * SEC)
            break;
        counter_t c;
        nq_wait_t *w = NULL;
        cr_assert_eq(nq_wait_start(CR.q, CR.h, NQ_SEQ_NEXT, counting_waker(&c), &w), 0);
        atomic_store(&CR.go, i + 1);
        for (int k = 0; atomic_load(&CR.armed) != i + 1; k++) {
            if (k > 1000)
                sched_yield();
        }
        seed = seed * 1103515245u + 12345u;
        int extra = atomic_load(&CR.bias);
        for (volatile unsigned k = 0; k < (seed >> 16) % 512 + (extra > 0 ? (unsigned)extra : 0);
             k++) {
        }
        if (extra > STEER_SLEEP_AT)
            sleep_ns(100 * 1000);
        int crc = nq_wait_cancel(w);
        while (atomic_load(&CR.done) != i + 1)
            sched_yield();
        int nrc = atomic_load(&CR.rc);
        int64_t arg = -1;
        int rrc = nq_wait_result(w, &arg);
        int crc2 = nq_wait_cancel(w);
        nq_wait_release(w); /* waits for the notifier's waker call, if any */
        int calls = atomic_load(&c.calls);
        /* Steer the race to its even point, whatever the speed of each side
         * (TSan slows them differently): whoever won waits longer next time. */
        int b = atomic_load(&CR.bias);
        int step = 16 + (b < 0 ? -b : b) / 4;
        b += crc == 0 ? step : -step;
        atomic_store(&CR.bias, b > (1 << 22) ? (1 << 22) : b < -(1 << 22) ? -(1 << 22) : b);
        if (crc == 0) {
            cancel_won++;
            if (rrc != NQ_ECANCELED || nrc != 0 || crc2 != NQ_EALREADY)
                bad_outcome++;
            if (calls != 0)
                bad_waker++;
        } else if (crc == NQ_EALREADY) {
            notify_won++;
            if (rrc != 0 || arg != 1000 + i || nrc != 1 || crc2 != NQ_EALREADY)
                bad_outcome++;
            if (calls != 1)
                bad_waker++;
            else if (atomic_load(&c.tid) != atomic_load(&CR.tid))
                wrong_thread++;
        } else {
            bad_outcome++;
        }
    }
    atomic_store(&CR.stop, 1);
    cr_expect_eq(pthread_join(t, NULL), 0);
    cr_expect_eq(bad_outcome, 0, "%ld of %ld iterations: both or neither won, or results disagree",
                 bad_outcome, cancel_won + notify_won);
    cr_expect_eq(wrong_thread, 0, "%ld wakers ran off the notifying thread", wrong_thread);
    cr_expect_gt(cancel_won, 0, "cancel never won: the race was not exercised");
    cr_expect_gt(notify_won, 0, "notify never won: the race was not exercised");
    cr_expect_eq(bad_waker, 0,
                 "%ld iterations: waker calls != (notify won) (cancel won %ld, notify won %ld)",
                 bad_waker, cancel_won, notify_won);
    nq_stats_t st = stats(CR.q);
    cr_expect_eq(st.waits_cancelled, (uint64_t)cancel_won);
    cr_expect_eq(st.waits_completed, (uint64_t)notify_won);
    cr_expect_eq(st.live_waits, 0);
    cr_expect_eq(st.waits_pending, 0);
    nq_queue_free(CR.q);
}

/* --- the queue going away ------------------------------------------------ */

struct blocked {
    nq_queue_t *q;
    nq_handle_t h;
    atomic_int rc;
};

static void *blocked_wait(void *a) {
    struct blocked *b = a;
    atomic_store(&b->rc, nq_wait(b->q, b->h, NQ_SEQ_NEXT, -1, NULL));
    return NULL;
}

Test(wait, queue_free_completes_a_blocked_wait_with_closed, .timeout = 30) {
    /* The waiter wakes on another thread while nq_queue_free goes on to
     * drop the queue: what nq_wait touches after waking must still be
     * there. Several rounds, as the window is narrow (ASan/TSan see it). */
    for (int round = 0; round < 20; round++) {
        nq_queue_t *q = new_queue(NULL);
        nq_handle_t h = reg(q);
        struct blocked b = {.q = q, .h = h};
        atomic_init(&b.rc, 1);
        pthread_t t;
        cr_assert_eq(pthread_create(&t, NULL, blocked_wait, &b), 0);
        int64_t t0 = now_ns();
        while (stats(q).waits_pending < 1) {
            cr_assert_lt(now_ns() - t0, 5 * SEC);
            usleep(200);
        }
        nq_queue_free(q);
        cr_assert_eq(pthread_join(t, NULL), 0);
        cr_assert_eq(atomic_load(&b.rc), NQ_ECLOSED, "round %d: %s", round,
                     nq_err_name(atomic_load(&b.rc)));
    }
}

Test(wait, unregister_completes_a_blocked_wait_with_closed, .timeout = 20) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    struct blocked b = {.q = q, .h = h};
    atomic_init(&b.rc, 1);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, blocked_wait, &b), 0);
    int64_t t0 = now_ns();
    while (stats(q).waits_pending < 1) {
        cr_assert_lt(now_ns() - t0, 5 * SEC);
        usleep(1000);
    }
    cr_assert_eq(nq_unregister(q, h), 0);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(atomic_load(&b.rc), NQ_ECLOSED, "%s", nq_err_name(atomic_load(&b.rc)));
    cr_assert_eq(stats(q).waits_closed, 1);
    nq_queue_free(q);
}
