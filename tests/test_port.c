/* Criterion suite "port": the loop side. Completions routed to a port run
 * only inside nq_port_dispatch, on its caller's thread; one eventfd write per
 * dispatch cycle however many notifications arrive; budgets keep the fd
 * readable; timeouts expire in dispatch and nq_port_timeout_ms says when;
 * callbacks may free what is running; nq_port_free completes what is left. */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nq.h"

#define MS 1000000LL

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int readable(nq_port_t *p, int timeout_ms) {
    struct pollfd pfd = {.fd = nq_port_fd(p), .events = POLLIN};
    return poll(&pfd, 1, timeout_ms) == 1 && (pfd.revents & POLLIN);
}

static nq_port_stats_t pstats(nq_port_t *p) {
    nq_port_stats_t st;
    cr_assert_eq(nq_port_stats(p, &st), 0);
    return st;
}

struct rec {
    int calls;
    int status;
    int64_t arg;
    pthread_t thread;
};

static void rec_cb(void *data, int status, int64_t arg) {
    struct rec *r = data;
    r->calls++;
    r->status = status;
    r->arg = arg;
    r->thread = pthread_self();
}

static void setup(nq_queue_t **q, nq_port_t **p) {
    cr_assert_eq(nq_queue_new(NULL, q), 0);
    cr_assert_eq(nq_port_new(p), 0);
}

Test(port, fd_is_a_nonblocking_cloexec_eventfd) {
    nq_port_t *p;
    cr_assert_eq(nq_port_new(&p), 0);
    int fd = nq_port_fd(p);
    cr_assert_geq(fd, 0);
    cr_assert(fcntl(fd, F_GETFD) & FD_CLOEXEC);
    cr_assert(fcntl(fd, F_GETFL) & O_NONBLOCK);
    char path[64], target[64] = {0};
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    cr_assert_gt(readlink(path, target, sizeof(target) - 1), 0);
    cr_assert(strstr(target, "eventfd") != NULL, "fd is %s", target);
    cr_assert_not(readable(p, 0), "an idle port is not readable");
    cr_assert_eq(nq_port_timeout_ms(p), -1, "no deadline");
    nq_port_free(p);
}

Test(port, wait_callback_runs_only_in_dispatch_on_its_thread) {
    nq_queue_t *q;
    nq_port_t *p;
    setup(&q, &p);
    nq_handle_t h;
    cr_assert_eq(nq_register(q, "h", &h), 0);
    struct rec r = {0};
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, rec_cb, &r, NULL), 0);
    cr_assert_eq(nq_notify(q, h, 42), 1);
    cr_assert_eq(r.calls, 0, "no callback outside dispatch");
    cr_assert(readable(p, 1000));
    cr_assert_eq(nq_port_dispatch(p, 0), 1);
    cr_assert_eq(r.calls, 1);
    cr_assert_eq(r.status, 0);
    cr_assert_eq(r.arg, 42);
    cr_assert(pthread_equal(r.thread, pthread_self()));
    cr_assert_eq(nq_port_dispatch(p, 0), 0, "exactly once");
    cr_assert_not(readable(p, 0));
    nq_port_free(p);
    nq_queue_free(q);
}

/* --- one eventfd write per dispatch cycle --------------------------------- */

#define MANY 1000
struct flood {
    nq_queue_t *q;
    nq_handle_t *h;
    int from, to;
};

static void *flood_notify(void *arg) {
    struct flood *f = arg;
    for (int round = 0; round < 10; round++)
        for (int i = f->from; i < f->to; i++)
            nq_notify(f->q, f->h[i], round);
    return NULL;
}

static int sub_cb_calls;
static void drain_cb(nq_sub_t *s, void *data) {
    (void)data;
    int64_t buf[64];
    sub_cb_calls++;
    while (nq_sub_recv_batch(s, buf, 64) > 0) {
    }
}

Test(port, one_eventfd_write_per_dispatch_cycle) {
    nq_queue_t *q;
    nq_port_t *p;
    setup(&q, &p);
    static nq_handle_t h[MANY];
    static struct rec r[MANY / 2];
    for (int i = 0; i < MANY; i++)
        cr_assert_eq(nq_register(q, NULL, &h[i]), 0);
    for (int i = 0; i < MANY / 2; i++)
        cr_assert_eq(nq_port_wait(p, q, h[i], NQ_SEQ_NEXT, -1, rec_cb, &r[i], NULL), 0);
    for (int i = MANY / 2; i < MANY; i++)
        cr_assert_eq(nq_port_subscribe(p, q, h[i], NULL, drain_cb, NULL, NULL), 0);

    /* 10000 notifications from two threads between two dispatches. */
    struct flood f1 = {q, h, 0, MANY / 2}, f2 = {q, h, MANY / 2, MANY};
    pthread_t t1, t2;
    nq_port_stats_t before = pstats(p);
    pthread_create(&t1, NULL, flood_notify, &f1);
    pthread_create(&t2, NULL, flood_notify, &f2);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    nq_port_stats_t mid = pstats(p);
    cr_assert_eq(mid.efd_writes - before.efd_writes, 1,
                 "%llu eventfd writes for 10000 notifications in one cycle",
                 (unsigned long long)(mid.efd_writes - before.efd_writes));
    sub_cb_calls = 0;
    int ran = nq_port_dispatch(p, 0);
    cr_assert_eq(ran, MANY, "every wait and every subscription called back once");
    cr_assert_eq(sub_cb_calls, MANY / 2);
    for (int i = 0; i < MANY / 2; i++)
        cr_assert_eq(r[i].calls, 1);
    nq_port_stats_t after = pstats(p);
    cr_assert_eq(after.efd_writes, mid.efd_writes, "the drained dispatch did not re-signal");
    cr_assert_eq(after.efd_reads - mid.efd_reads, 1);
    cr_assert_not(readable(p, 0));
    nq_port_free(p);
    nq_queue_free(q);
}

/* --- budgets ---------------------------------------------------------------- */

Test(port, budget_leaves_the_rest_and_keeps_the_fd_readable) {
    nq_queue_t *q;
    nq_port_t *p;
    setup(&q, &p);
    enum { N = 10 };
    nq_handle_t h[N];
    struct rec r[N];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < N; i++) {
        nq_register(q, NULL, &h[i]);
        cr_assert_eq(nq_port_wait(p, q, h[i], NQ_SEQ_NEXT, -1, rec_cb, &r[i], NULL), 0);
    }
    for (int i = 0; i < N; i++)
        nq_notify(q, h[i], i);
    cr_assert_eq(nq_port_dispatch(p, 3), 3);
    for (int i = 0; i < N; i++)
        cr_assert_eq(r[i].calls, i < 3 ? 1 : 0, "FIFO: the oldest completions run first");
    cr_assert(readable(p, 0), "work left keeps the fd readable");
    cr_assert_eq(nq_port_dispatch(p, 3), 3);
    cr_assert_eq(nq_port_dispatch(p, 0), 4);
    cr_assert_not(readable(p, 0));
    for (int i = 0; i < N; i++)
        cr_assert_eq(r[i].calls, 1);
    nq_port_free(p);
    nq_queue_free(q);
}

/* --- timeouts --------------------------------------------------------------- */

static int deadline_moves;
static void on_deadline(nq_port_t *p, void *data) {
    (void)p;
    (void)data;
    deadline_moves++;
}

Test(port, timeouts_expire_in_dispatch_never_early) {
    nq_queue_t *q;
    nq_port_t *p;
    setup(&q, &p);
    nq_handle_t h;
    nq_register(q, NULL, &h);
    cr_assert_eq(nq_port_on_deadline(p, on_deadline, NULL), 0);
    deadline_moves = 0;
    struct rec slow = {0}, fast = {0}, none = {0};
    int64_t t0 = now_ns();
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, 200, rec_cb, &slow, NULL), 0);
    cr_assert_eq(deadline_moves, 1, "the first deadline is the earliest");
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, 30, rec_cb, &fast, NULL), 0);
    cr_assert_eq(deadline_moves, 2, "an earlier deadline tells the adapter");
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, 500, rec_cb, &none, NULL), 0);
    cr_assert_eq(deadline_moves, 2, "a later deadline does not");
    int64_t t = nq_port_timeout_ms(p);
    cr_assert(t > 0 && t <= 30, "next deadline in %lld ms", (long long)t);

    /* Loop as an epoll loop would: wait for the fd or the timeout. */
    while (fast.calls == 0) {
        readable(p, (int)nq_port_timeout_ms(p));
        nq_port_dispatch(p, 0);
    }
    int64_t took = now_ns() - t0;
    cr_assert_eq(fast.status, NQ_ETIMEDOUT);
    cr_assert_geq(took, 30 * MS, "expired after %lld ns", (long long)took);
    cr_assert_lt(took, 30 * MS + 2000 * MS);
    cr_assert_eq(slow.calls, 0);
    cr_assert_eq(nq_notify(q, h, 9), 2, "the other two are still pending");
    nq_port_dispatch(p, 0);
    cr_assert(slow.calls == 1 && slow.status == 0 && slow.arg == 9);
    cr_assert(none.calls == 1 && none.status == 0);
    cr_assert_eq(nq_port_timeout_ms(p), -1, "completed waits leave the heap");
    cr_assert_eq(pstats(p).deadlines_expired, 1);
    nq_port_free(p);
    nq_queue_free(q);
}

Test(port, zero_timeout_expires_at_the_next_dispatch) {
    nq_queue_t *q;
    nq_port_t *p;
    setup(&q, &p);
    nq_handle_t h;
    nq_register(q, NULL, &h);
    struct rec r = {0};
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, 0, rec_cb, &r, NULL), 0);
    cr_assert_eq(nq_port_timeout_ms(p), 0);
    cr_assert_eq(nq_port_dispatch(p, 0), 1);
    cr_assert_eq(r.status, NQ_ETIMEDOUT);
    nq_port_free(p);
    nq_queue_free(q);
}

/* --- completion kinds ------------------------------------------------------- */

Test(port, cancel_close_and_due_waits_call_back_once) {
    nq_queue_t *q;
    nq_port_t *p;
    setup(&q, &p);
    nq_handle_t h, g;
    nq_register(q, NULL, &h);
    nq_register(q, NULL, &g);
    struct rec cancelled = {0}, closed = {0}, due = {0};
    nq_wait_t *w;
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, rec_cb, &cancelled, &w), 0);
    cr_assert_eq(nq_port_wait(p, q, g, NQ_SEQ_NEXT, -1, rec_cb, &closed, NULL), 0);
    nq_notify(q, h, 5); /* seq 1 */
    nq_port_dispatch(p, 0);
    cr_assert_eq(cancelled.calls, 1, "completed by the notify");
    cr_assert_eq(nq_wait_cancel(w), NQ_EALREADY);
    nq_wait_release(w);

    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, rec_cb, &cancelled, &w), 0);
    cr_assert_eq(nq_wait_cancel(w), 0);
    cr_assert_eq(nq_wait_result(w, NULL), NQ_ECANCELED);
    cr_assert_eq(nq_unregister(q, g), 0);
    cr_assert_eq(nq_port_wait(p, q, h, 0 /* seq is 1: due */, -1, rec_cb, &due, NULL), 0);
    cr_assert_eq(due.calls, 0, "even a due wait calls back only in dispatch");
    cr_assert_eq(nq_port_dispatch(p, 0), 3);
    cr_assert(cancelled.calls == 2 && cancelled.status == NQ_ECANCELED);
    cr_assert(closed.calls == 1 && closed.status == NQ_ECLOSED);
    cr_assert(due.calls == 1 && due.status == 0 && due.arg == 5);
    nq_wait_release(w);
    cr_assert_eq(nq_port_dispatch(p, 0), 0);
    nq_port_free(p);
    nq_queue_free(q);
}

/* --- callbacks that call back into libnq ------------------------------------ */

struct reentry {
    nq_port_t *p;
    nq_queue_t *q;
    nq_handle_t h, other;
    nq_wait_t *self;
    nq_sub_t *sub;
    int calls;
    int dispatch_rc;
    struct rec next;
};

static void releasing_cb(void *data, int status, int64_t arg) {
    struct reentry *r = data;
    (void)status;
    (void)arg;
    r->calls++;
    nq_wait_release(r->self); /* the wait whose callback is running */
    r->dispatch_rc = nq_port_dispatch(r->p, 0);
    nq_notify(r->q, r->other, 7); /* another handle */
    /* and a new wait on the same port */
    cr_assert_eq(nq_port_wait(r->p, r->q, r->h, NQ_SEQ_NEXT, -1, rec_cb, &r->next, NULL), 0);
}

Test(port, a_callback_may_release_its_wait_and_call_anything) {
    nq_queue_t *q;
    nq_port_t *p;
    setup(&q, &p);
    struct reentry r = {.p = p, .q = q};
    nq_register(q, NULL, &r.h);
    nq_register(q, NULL, &r.other);
    nq_sub_t *osub;
    cr_assert_eq(nq_subscribe(q, r.other, NULL, &osub), 0);
    cr_assert_eq(nq_port_wait(p, q, r.h, NQ_SEQ_NEXT, 1000, releasing_cb, &r, &r.self), 0);
    nq_notify(q, r.h, 1);
    cr_assert_eq(nq_port_dispatch(p, 0), 1);
    cr_assert_eq(r.calls, 1);
    cr_assert_eq(r.dispatch_rc, NQ_EBUSY, "dispatch from inside a callback is refused");
    int64_t v;
    cr_assert_eq(nq_sub_try_recv(osub, &v), 0);
    cr_assert_eq(v, 7);
    nq_notify(q, r.h, 2);
    nq_port_dispatch(p, 0);
    cr_assert(r.next.calls == 1 && r.next.arg == 2, "the wait started in the callback works");
    nq_sub_close(osub);
    nq_port_free(p);
    nq_queue_free(q);
}

static int closing_calls;
static void closing_sub_cb(nq_sub_t *s, void *data) {
    (void)data;
    closing_calls++;
    nq_sub_close(s); /* the subscription whose callback is running */
}

Test(port, a_callback_may_close_its_subscription) {
    nq_queue_t *q;
    nq_port_t *p;
    setup(&q, &p);
    nq_handle_t h;
    nq_register(q, NULL, &h);
    nq_sub_t *s;
    closing_calls = 0;
    cr_assert_eq(nq_port_subscribe(p, q, h, NULL, closing_sub_cb, NULL, &s), 0);
    nq_notify(q, h, 1);
    nq_notify(q, h, 2);
    cr_assert_eq(nq_port_dispatch(p, 0), 1);
    cr_assert_eq(closing_calls, 1);
    cr_assert_eq(nq_notify(q, h, 3), 0, "closed: no receiver left");
    cr_assert_eq(nq_port_dispatch(p, 0), 0);
    cr_assert_eq(pstats(p).live_items, 0);
    nq_port_free(p);
    nq_queue_free(q);
}

static void freeing_cb(void *data, int status, int64_t arg) {
    (void)status;
    (void)arg;
    nq_port_free(data); /* deferred until dispatch returns */
}

Test(port, port_free_inside_a_callback_is_deferred) {
    nq_queue_t *q;
    nq_port_t *p;
    setup(&q, &p);
    nq_handle_t h;
    nq_register(q, NULL, &h);
    struct rec other = {0};
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, freeing_cb, p, NULL), 0);
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, rec_cb, &other, NULL), 0);
    nq_notify(q, h, 1);
    nq_port_dispatch(p, 0); /* frees the port on return: ASan checks the rest */
    cr_assert_eq(other.calls, 1, "every wait still called back exactly once");
    nq_queue_free(q);
}

/* --- level-triggered subscriptions ----------------------------------------- */

static int partial_calls;
static int64_t partial_got[16];
static int partial_n;
static void partial_cb(nq_sub_t *s, void *data) {
    (void)data;
    partial_calls++;
    int64_t v;
    if (nq_sub_try_recv(s, &v) == 0) /* take one per call */
        partial_got[partial_n++] = v;
}

Test(port, subscription_callback_is_level_triggered) {
    nq_queue_t *q;
    nq_port_t *p;
    setup(&q, &p);
    nq_handle_t h;
    nq_register(q, NULL, &h);
    partial_calls = partial_n = 0;
    nq_sub_t *s;
    cr_assert_eq(nq_port_subscribe(p, q, h, NULL, partial_cb, NULL, &s), 0);
    for (int i = 0; i < 3; i++)
        nq_notify(q, h, 10 + i);
    cr_assert_eq(nq_port_dispatch(p, 0), 1, "called once per dispatch, not in a loop");
    cr_assert(readable(p, 0), "still non-empty: the fd stays readable");
    cr_assert_eq(nq_port_dispatch(p, 0), 1);
    cr_assert_eq(nq_port_dispatch(p, 0), 1);
    cr_assert_eq(nq_port_dispatch(p, 0), 0, "drained: no more calls");
    cr_assert_eq(partial_n, 3);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(partial_got[i], 10 + i);
    cr_assert_not(readable(p, 0));
    /* Unregister: one more call to see NQ_ECLOSED, then silence. */
    nq_unregister(q, h);
    cr_assert_eq(nq_port_dispatch(p, 0), 1);
    int64_t v;
    cr_assert_eq(nq_sub_try_recv(s, &v), NQ_ECLOSED);
    cr_assert_eq(nq_port_dispatch(p, 0), 0);
    nq_sub_close(s);
    nq_port_free(p);
    nq_queue_free(q);
}

/* --- nq_port_free ------------------------------------------------------------ */

Test(port, free_completes_pending_waits_with_canceled) {
    nq_queue_t *q;
    nq_port_t *p;
    setup(&q, &p);
    nq_handle_t h;
    nq_register(q, NULL, &h);
    struct rec pending = {0}, done = {0};
    nq_wait_t *held;
    nq_sub_t *kept;
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, 5000, rec_cb, &pending, &held), 0);
    cr_assert_eq(nq_port_subscribe(p, q, h, NULL, drain_cb, NULL, &kept), 0);
    cr_assert_eq(nq_port_subscribe(p, q, h, NULL, drain_cb, NULL, NULL), 0);
    nq_port_free(p);
    cr_assert_eq(pending.calls, 1);
    cr_assert_eq(pending.status, NQ_ECANCELED);
    cr_assert_eq(nq_wait_result(held, NULL), NQ_ECANCELED);
    nq_wait_release(held);
    /* The subscription the caller kept still works, without callbacks. */
    cr_assert_eq(nq_notify(q, h, 4), 1, "the port-owned subscription was closed");
    int64_t v;
    cr_assert_eq(nq_sub_try_recv(kept, &v), 0);
    cr_assert_eq(v, 4);
    nq_sub_close(kept);
    (void)done;
    nq_queue_free(q);
}

/* --- from other threads ------------------------------------------------------ */

struct mt {
    nq_queue_t *q;
    nq_handle_t h;
    atomic_int stop;
};

static void *mt_notifier(void *arg) {
    struct mt *m = arg;
    int64_t i = 0;
    while (!atomic_load(&m->stop))
        nq_notify(m->q, m->h, i++);
    return NULL;
}

static pthread_t loop_thread;
static atomic_int off_thread;
static atomic_int mt_calls;
static void mt_cb(void *data, int status, int64_t arg) {
    (void)data;
    (void)arg;
    if (status == 0)
        atomic_fetch_add(&mt_calls, 1);
    if (!pthread_equal(pthread_self(), loop_thread))
        atomic_fetch_add(&off_thread, 1);
}

Test(port, waits_rearmed_against_a_notifying_thread, .timeout = 60) {
    nq_queue_t *q;
    nq_port_t *p;
    setup(&q, &p);
    struct mt m = {.q = q};
    nq_register(q, NULL, &m.h);
    loop_thread = pthread_self();
    atomic_store(&mt_calls, 0);
    pthread_t t;
    pthread_create(&t, NULL, mt_notifier, &m);
    int started = 0;
    for (int i = 0; i < 2000; i++) {
        cr_assert_eq(nq_port_wait(p, q, m.h, NQ_SEQ_NEXT, 1000, mt_cb, NULL, NULL), 0);
        started++;
        while (atomic_load(&mt_calls) < started) {
            readable(p, 100);
            nq_port_dispatch(p, 0);
        }
    }
    atomic_store(&m.stop, 1);
    pthread_join(t, NULL);
    cr_assert_eq(atomic_load(&mt_calls), started, "every wait completed once by a notify");
    cr_assert_eq(atomic_load(&off_thread), 0, "callbacks ran on the dispatching thread");
    nq_port_stats_t st = pstats(p);
    cr_assert_leq(st.efd_writes, st.dispatches + 1, "at most one write per dispatch cycle");
    nq_port_free(p);
    nq_queue_free(q);
}
