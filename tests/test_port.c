/* Criterion suite "port": the loop side.
 *
 * Covers the port's fd (an EFD_CLOEXEC | EFD_NONBLOCK eventfd that goes
 * readable when callbacks are pending and quiet once they have run),
 * nq_port_wait and nq_port_subscribe routing completions to the port,
 * callbacks that run only inside nq_port_dispatch and on its caller's
 * thread, at most one eventfd write per dispatch cycle (checked exactly,
 * through the stats and through the eventfd's own counter, under 10000
 * notifies from two threads), dispatch budgets, port-wait timeouts (expired
 * inside dispatch, never early, nq_port_timeout_ms, the deadline callback),
 * re-entrancy (a callback that releases its own wait, closes its own
 * subscription, notifies, starts waits, dispatches, frees the port),
 * level-triggered subscription callbacks, nq_port_free completing what is
 * pending, cancel / unregister statuses, attach, and invariant 4 (every
 * wait's callback runs exactly once) under a randomised mix. Three tests
 * check promises the implementation does not yet keep: the fd goes quiet
 * once nothing is pending (a waker preempted between claiming the signal
 * and writing the eventfd leaves it readable for good), and a subscription
 * callback hears of its handle's close even when it drains with a bounded
 * batch or the close lands while it runs.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nq.h"
#include "nqtest.h"
#include "core/internal.h"
#include "core/queue.h"
#include "core/testhooks.h"
#include "core/evq.h"

#define MS (int64_t)1000000
#define SEC (int64_t)1000000000
#define SLACK (2 * SEC) /* generous upper bound on any timeout's lateness */

/* --- helpers ------------------------------------------------------------ */

static void sleep_ns(int64_t ns) {
    struct timespec ts = {(time_t)(ns / SEC), (long)(ns % SEC)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static nq_queue_t *new_queue(void) {
    nq_queue_t *q = NULL;
    cr_assert_eq(nq_queue_new(NULL, &q), 0);
    return q;
}

static nq_handle_t reg(nq_queue_t *q) {
    nq_handle_t h = 0;
    int rc = nq_register(q, NULL, &h);
    cr_assert_eq(rc, 0, "nq_register: %s", nq_err_name(rc));
    return h;
}

static nq_port_t *new_port(void) {
    nq_port_t *p = NULL;
    int rc = nq_port_new(&p);
    cr_assert_eq(rc, 0, "nq_port_new: %s", nq_err_name(rc));
    cr_assert_not_null(p);
    return p;
}

static nq_port_stats_t pstats(nq_port_t *p) {
    nq_port_stats_t st;
    cr_assert_eq(nq_port_stats(p, &st), 0);
    return st;
}

static nq_stats_t qstats(nq_queue_t *q) {
    nq_stats_t st;
    cr_assert_eq(nq_queue_stats(q, &st), 0);
    return st;
}

static int readable(nq_port_t *p) {
    struct pollfd pf = {nq_port_fd(p), POLLIN, 0};
    int rc = poll(&pf, 1, 0);
    cr_assert_geq(rc, 0);
    return rc == 1 && (pf.revents & POLLIN);
}

static nq_sub_opts_t opts(uint32_t cap, nq_overflow_t ov) {
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = cap;
    o.overflow = ov;
    o.debug_hint = "port-test";
    return o;
}

/* Where callbacks run: the test's own dispatch/free wrappers say so. */
enum { WHERE_NONE, WHERE_DISPATCH, WHERE_FREE };
static int where = WHERE_NONE;
static long cb_outside; /* callbacks run outside dispatch and free */
static int main_tid;

static int dispatch(nq_port_t *p, unsigned budget) {
    where = WHERE_DISPATCH;
    int n = nq_port_dispatch(p, budget);
    where = WHERE_NONE;
    return n;
}

static void port_free(nq_port_t *p) {
    where = WHERE_FREE;
    nq_port_free(p);
    where = WHERE_NONE;
}

/* One port wait's record. */
typedef struct wrec {
    int calls;
    int status;
    int64_t arg;
    int tid;
    int where;
    int64_t at;
    int order;              /* this callback's place among all wcb calls */
    /* optional behaviour inside the callback */
    nq_wait_t *self;        /* release it inside the callback */
    nq_port_t *port;        /* for the actions below */
    nq_port_t *free_port;   /* nq_port_free it inside the callback */
    int dispatch_rc;        /* nq_port_dispatch from inside the callback */
} wrec_t;

static int wcb_calls; /* wcb runs on one thread at a time (the dispatcher) */

static void wcb(void *data, int status, int64_t arg) {
    wrec_t *r = data;
    r->order = ++wcb_calls;
    r->calls++;
    r->status = status;
    r->arg = arg;
    r->tid = cur_tid();
    r->where = where;
    r->at = now_ns();
    if (where == WHERE_NONE)
        cb_outside++;
    if (r->port != NULL)
        r->dispatch_rc = nq_port_dispatch(r->port, 0);
    if (r->self != NULL)
        nq_wait_release(r->self);
    if (r->free_port != NULL)
        nq_port_free(r->free_port);
}

static void pwait(nq_port_t *p, nq_queue_t *q, nq_handle_t h, uint64_t after, int64_t to_ms,
                  wrec_t *r, nq_wait_t **out) {
    int rc = nq_port_wait(p, q, h, after, to_ms, wcb, r, out);
    cr_assert_eq(rc, 0, "nq_port_wait: %s", nq_err_name(rc));
}

/* One port subscription's record: drains up to `per_call` args a call. */
typedef struct srec {
    int calls;
    int per_call;        /* 0: all */
    int64_t got[256];
    int ngot;
    int closed_seen;     /* calls in which a receive said NQ_ECLOSED */
    int tid;
    int where;
    int close_self;      /* nq_sub_close(s) inside the callback */
    nq_queue_t *unreg_q; /* nq_unregister(unreg_q, unreg_h) in the first call */
    nq_handle_t unreg_h;
    nq_port_t *free_port;
    int batch;           /* drain with recv_batch instead of try_recv */
} srec_t;

static void scb(nq_sub_t *s, void *data) {
    srec_t *r = data;
    r->calls++;
    r->tid = cur_tid();
    r->where = where;
    if (where == WHERE_NONE)
        cb_outside++;
    int took = 0;
    int rc = 0;
    while (r->per_call == 0 || took < r->per_call) {
        int64_t b[64];
        int want = r->per_call ? r->per_call - took : 1;
        if (want > 64)
            want = 64;
        if (r->batch) {
            rc = nq_sub_recv_batch(s, b, (size_t)want);
            if (rc == 0)
                break; /* empty */
        } else {
            rc = nq_sub_try_recv(s, &b[0]);
            if (rc == 0)
                rc = 1;
            else if (rc == NQ_EAGAIN) {
                rc = 0;
                break; /* empty */
            }
        }
        if (rc < 0)
            break;
        for (int i = 0; i < rc; i++)
            if (r->ngot < 256)
                r->got[r->ngot++] = b[i];
        took += rc;
    }
    if (rc == NQ_ECLOSED)
        r->closed_seen++;
    else
        cr_assert_geq(rc, 0, "receive in a subscription callback: %s", nq_err_name(rc));
    if (r->unreg_q != NULL && r->calls == 1)
        cr_assert_eq(nq_unregister(r->unreg_q, r->unreg_h), 0);
    if (r->close_self)
        nq_sub_close(s);
    if (r->free_port != NULL)
        nq_port_free(r->free_port);
}

static void psub(nq_port_t *p, nq_queue_t *q, nq_handle_t h, uint32_t cap, srec_t *r,
                 nq_sub_t **out) {
    nq_sub_opts_t o = opts(cap, NQ_DROP_NEWEST);
    int rc = nq_port_subscribe(p, q, h, &o, scb, r, out);
    cr_assert_eq(rc, 0, "nq_port_subscribe: %s", nq_err_name(rc));
}

static void setup(void) {
    where = WHERE_NONE;
    cb_outside = 0;
    main_tid = cur_tid();
}

/* --- the fd -------------------------------------------------------------- */

Test(port, fd_is_a_nonblocking_cloexec_eventfd) {
    setup();
    nq_port_t *p = new_port();
    int fd = nq_port_fd(p);
    cr_assert_geq(fd, 0);
    int fdfl = fcntl(fd, F_GETFD);
    int fl = fcntl(fd, F_GETFL);
    cr_assert_geq(fdfl, 0);
    cr_assert(fdfl & FD_CLOEXEC, "the port fd lacks FD_CLOEXEC");
    cr_assert(fl & O_NONBLOCK, "the port fd lacks O_NONBLOCK");
    char path[64], link[128];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, link, sizeof(link) - 1);
    cr_assert_gt(n, 0);
    link[n] = '\0';
    cr_assert_str_eq(link, "anon_inode:[eventfd]", "the port fd is %s", link);
    cr_assert_eq(nq_port_fd(p), fd, "the fd is stable");
    cr_assert_eq(nq_port_fd(NULL), NQ_EINVAL);
    cr_assert_not(readable(p), "a new port's fd is readable");
    cr_assert_eq(nq_port_timeout_ms(p), -1);
    cr_assert_eq(dispatch(p, 0), 0);
    nq_port_stats_t st = pstats(p);
    cr_assert_eq(st.efd_writes, 0);
    cr_assert_eq(st.live_items, 0);
    cr_assert_eq(nq_port_stats(NULL, &st), NQ_EINVAL);
    cr_assert_eq(nq_port_stats(p, NULL), NQ_EINVAL);
    cr_assert_eq(nq_port_dispatch(NULL, 0), NQ_EINVAL);
    port_free(p);
    cr_assert_eq(fcntl(fd, F_GETFD), -1, "nq_port_free left the eventfd open");
    cr_assert_eq(errno, EBADF);
    nq_port_free(NULL);
    nq_port_t *bad = (nq_port_t *)&st;
    cr_assert_eq(nq_port_new_sized(0, &bad), NQ_EINVAL);
    cr_assert_null(bad);
    cr_assert_eq(nq_port_new(NULL), NQ_EINVAL);
}

/* --- routing: callbacks only inside dispatch, on its thread --------------- */

struct notifier {
    nq_queue_t *q;
    const nq_handle_t *h;
    int nh;
    long count; /* notifies, round-robin over h[] starting at first */
    int first;
    int stride;
    atomic_int tid;
    atomic_long reached;
};

static void *notify_thread(void *a) {
    struct notifier *n = a;
    atomic_store(&n->tid, cur_tid());
    long reached = 0;
    int i = n->first;
    for (long k = 0; k < n->count; k++) {
        int rc = nq_notify(n->q, n->h[i], k + 1);
        if (rc > 0)
            reached += rc;
        i = (i + n->stride) % n->nh;
    }
    atomic_store(&n->reached, reached);
    return NULL;
}

static void notify_from_thread(nq_queue_t *q, const nq_handle_t *h, int nh, long count,
                               int first, int stride, struct notifier *n) {
    n->q = q;
    n->h = h;
    n->nh = nh;
    n->count = count;
    n->first = first;
    n->stride = stride;
    atomic_init(&n->tid, 0);
    atomic_init(&n->reached, 0);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, notify_thread, n), 0);
    cr_assert_eq(pthread_join(t, NULL), 0);
}

Test(port, wait_callback_runs_only_inside_dispatch_on_its_caller_thread) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q);
    nq_port_t *p = new_port();
    wrec_t r;
    memset(&r, 0, sizeof(r));
    nq_wait_t *w = NULL;
    pwait(p, q, h, NQ_SEQ_NEXT, -1, &r, &w);
    cr_assert_not_null(w);
    cr_assert_eq(pstats(p).live_items, 1);
    cr_assert_eq(dispatch(p, 0), 0, "nothing is due yet");
    cr_assert_not(readable(p));
    struct notifier n;
    notify_from_thread(q, &h, 1, 1, 0, 1, &n);
    cr_assert_eq(atomic_load(&n.reached), 1, "the port wait is a receiver");
    cr_assert_eq(r.calls, 0, "the callback ran on the notifying thread");
    int64_t arg = 0;
    cr_assert_eq(nq_wait_result(w, &arg), 0, "the wait itself completed with the notify");
    cr_assert_eq(arg, 1);
    cr_assert(readable(p), "a pending callback must make the fd readable");
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(r.calls, 1);
    cr_assert_eq(r.status, 0);
    cr_assert_eq(r.arg, 1);
    cr_assert_eq(r.tid, main_tid, "the callback ran on another thread");
    cr_assert_neq(r.tid, atomic_load(&n.tid));
    cr_assert_eq(r.where, WHERE_DISPATCH);
    cr_assert_not(readable(p), "the fd stays readable after the callbacks ran");
    cr_assert_eq(dispatch(p, 0), 0);
    cr_assert_eq(r.calls, 1);
    nq_wait_release(w);
    cr_assert_eq(pstats(p).live_items, 0);

    /* Already due when started (after an old count): the callback still
     * waits for dispatch, with the latest arg. */
    uint64_t s0;
    cr_assert_eq(nq_seq(q, h, &s0), 0);
    nq_notify(q, h, 40);
    nq_notify(q, h, 41);
    memset(&r, 0, sizeof(r));
    pwait(p, q, h, s0, 1000, &r, NULL);
    cr_assert_eq(r.calls, 0, "a due wait called back inside nq_port_wait");
    cr_assert(readable(p));
    cr_assert_eq(nq_port_timeout_ms(p), -1, "a completed wait has no deadline");
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(r.calls, 1);
    cr_assert_eq(r.status, 0);
    cr_assert_eq(r.arg, 41);
    cr_assert_eq(cb_outside, 0);
    cr_assert_eq(pstats(p).live_items, 0);
    cr_assert_eq(qstats(q).live_waits, 0, "a port wait without out leaked");
    port_free(p);
    nq_queue_free(q);
}

Test(port, subscription_callback_runs_only_inside_dispatch) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q);
    nq_port_t *p = new_port();
    srec_t r;
    memset(&r, 0, sizeof(r));
    nq_sub_t *s = NULL;
    psub(p, q, h, 8, &r, &s);
    cr_assert_not_null(s);
    struct notifier n;
    notify_from_thread(q, &h, 1, 3, 0, 1, &n);
    cr_assert_eq(atomic_load(&n.reached), 3);
    cr_assert_eq(r.calls, 0);
    cr_assert(readable(p));
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(r.calls, 1);
    cr_assert_eq(r.ngot, 3);
    for (int i = 0; i < 3; i++)
        cr_assert_eq(r.got[i], i + 1);
    cr_assert_eq(r.tid, main_tid);
    cr_assert_not(readable(p));
    cr_assert_eq(dispatch(p, 0), 0, "a drained subscription was called again");
    nq_notify(q, h, 9);
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(r.calls, 2);
    cr_assert_eq(r.got[3], 9);
    cr_assert_eq(cb_outside, 0);
    nq_sub_close(s);
    cr_assert_eq(pstats(p).live_items, 0);
    cr_assert_eq(qstats(q).live_subs, 0);
    cr_assert_eq(nq_notify(q, h, 10), 0);
    cr_assert_eq(dispatch(p, 0), 0);
    port_free(p);
    nq_queue_free(q);
}

Test(port, bad_arguments_return_errors_and_leak_no_token) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q);
    nq_port_t *p = new_port();
    wrec_t r;
    memset(&r, 0, sizeof(r));
    nq_wait_t *w = (nq_wait_t *)&r;
    cr_assert_eq(nq_port_wait(NULL, q, h, NQ_SEQ_NEXT, -1, wcb, &r, &w), NQ_EINVAL);
    cr_assert_null(w);
    cr_assert_eq(nq_port_wait(p, NULL, h, NQ_SEQ_NEXT, -1, wcb, &r, NULL), NQ_EINVAL);
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, NULL, &r, NULL), NQ_EINVAL);
    cr_assert_eq(nq_port_wait(p, q, 0, NQ_SEQ_NEXT, -1, wcb, &r, NULL), NQ_EBADH);
    cr_assert_eq(nq_port_wait(p, q, h + 7, NQ_SEQ_NEXT, 10, wcb, &r, NULL), NQ_EBADH);
    nq_sub_opts_t o = opts(4, (nq_overflow_t)9);
    nq_sub_t *s = (nq_sub_t *)&r;
    cr_assert_eq(nq_port_subscribe(p, q, h, &o, scb, NULL, &s), NQ_EINVAL);
    cr_assert_null(s);
    o.overflow = NQ_DROP_NEWEST;
    cr_assert_eq(nq_port_subscribe(p, q, h, &o, NULL, NULL, &s), NQ_EINVAL);
    cr_assert_eq(nq_port_subscribe(p, q, 12345, &o, scb, NULL, &s), NQ_EBADH);
    nq_port_stats_t st = pstats(p);
    cr_assert_eq(st.live_items, 0, "a failed call kept a token");
    cr_assert_eq(st.deadlines, 0);
    cr_assert_eq(nq_port_timeout_ms(p), -1);
    nq_stats_t qs = qstats(q);
    cr_assert_eq(qs.live_waits, 0);
    cr_assert_eq(qs.live_subs, 0);
    cr_assert_eq(r.calls, 0);
    cr_assert_eq(dispatch(p, 0), 0);
    port_free(p);
    nq_queue_free(q);
}

/* --- at most one eventfd write per dispatch cycle -------------------------- */

#define EFD_HANDLES 1000
#define EFD_WAITS 500 /* handles [0, 500) have a port wait, the rest a port sub */

static struct {
    nq_port_t *p;
    nq_queue_t *q;
    nq_handle_t h[EFD_HANDLES];
    int wait_calls[EFD_WAITS];
    long sub_args;
    int sub_calls;
    int rearm_fail;
} E;

static void efd_wait_cb(void *data, int status, int64_t arg) {
    int i = (int)(intptr_t)data;
    (void)arg;
    E.wait_calls[i]++;
    if (status != 0)
        E.rearm_fail++;
    /* Re-arm: a new port wait from inside a callback. */
    if (nq_port_wait(E.p, E.q, E.h[i], NQ_SEQ_NEXT, -1, efd_wait_cb, data, NULL) != 0)
        E.rearm_fail++;
}

static void efd_sub_cb(nq_sub_t *s, void *data) {
    (void)data;
    E.sub_calls++;
    int64_t b[32];
    int n;
    while ((n = nq_sub_recv_batch(s, b, 32)) > 0)
        E.sub_args += n;
}

Test(port, at_most_one_eventfd_write_per_dispatch_cycle, .timeout = 60) {
    setup();
    memset(&E, 0, sizeof(E));
    E.q = new_queue();
    E.p = new_port();
    for (int i = 0; i < EFD_HANDLES; i++)
        E.h[i] = reg(E.q);
    for (int i = 0; i < EFD_WAITS; i++)
        cr_assert_eq(nq_port_wait(E.p, E.q, E.h[i], NQ_SEQ_NEXT, -1, efd_wait_cb,
                                  (void *)(intptr_t)i, NULL),
                     0);
    for (int i = EFD_WAITS; i < EFD_HANDLES; i++) {
        nq_sub_opts_t o = opts(64, i % 2 ? NQ_DROP_OLDEST : NQ_DROP_NEWEST);
        cr_assert_eq(nq_port_subscribe(E.p, E.q, E.h[i], &o, efd_sub_cb, NULL, NULL), 0);
    }
    cr_assert_eq(dispatch(E.p, 0), 0);
    const int cycles = 5;
    const long per_thread = 5000; /* 10000 notifies, 10 per handle, per cycle */
    for (int c = 0; c < cycles; c++) {
        nq_port_stats_t before = pstats(E.p);
        cr_assert_not(readable(E.p), "cycle %d: readable before any notify", c);
        struct { pthread_t t; struct notifier n; } th[2];
        for (int k = 0; k < 2; k++) {
            struct notifier *n = &th[k].n;
            n->q = E.q;
            n->h = E.h;
            n->nh = EFD_HANDLES;
            n->count = per_thread;
            n->first = k;
            n->stride = 2;
            atomic_init(&n->tid, 0);
            atomic_init(&n->reached, 0);
            cr_assert_eq(pthread_create(&th[k].t, NULL, notify_thread, n), 0);
        }
        for (int k = 0; k < 2; k++)
            cr_assert_eq(pthread_join(th[k].t, NULL), 0);
        nq_port_stats_t mid = pstats(E.p);
        cr_assert_eq(mid.efd_writes - before.efd_writes, 1,
                     "cycle %d: %llu eventfd writes for 10000 notifies between two dispatches", c,
                     (unsigned long long)(mid.efd_writes - before.efd_writes));
        cr_assert(readable(E.p));
        /* The eventfd's own counter: exactly one write of 1 reached the kernel.
         * (Reading it here leaves dispatch's read with EAGAIN, which it must
         * tolerate.) */
        uint64_t v = 0;
        cr_assert_eq(read(nq_port_fd(E.p), &v, sizeof(v)), (ssize_t)sizeof(v));
        cr_assert_eq(v, 1, "cycle %d: the eventfd counter is %llu", c, (unsigned long long)v);
        cr_assert_not(readable(E.p));
        int ran = dispatch(E.p, 0);
        cr_assert_eq(ran, EFD_HANDLES, "cycle %d: %d callbacks, want one per wait and sub", c, ran);
        nq_port_stats_t after = pstats(E.p);
        cr_assert_eq(after.efd_writes, mid.efd_writes, "a dispatch with nothing left wrote");
        cr_assert_leq(after.efd_writes, after.dispatches + 1);
        cr_assert_not(readable(E.p), "cycle %d: readable after everything ran", c);
        cr_assert_eq(after.live_items, EFD_HANDLES, "re-armed waits + subs");
    }
    for (int i = 0; i < EFD_WAITS; i++)
        cr_assert_eq(E.wait_calls[i], cycles, "wait %d called back %d times", i, E.wait_calls[i]);
    cr_assert_eq(E.sub_calls, cycles * (EFD_HANDLES - EFD_WAITS));
    cr_assert_eq(E.sub_args, (long)cycles * (EFD_HANDLES - EFD_WAITS) * 10);
    cr_assert_eq(E.rearm_fail, 0);
    cr_assert_eq(cb_outside, 0);
    port_free(E.p); /* the re-armed waits: ECANCELED, and they re-arm no more */
    nq_stats_t qs = qstats(E.q);
    cr_assert_eq(qs.live_waits, 0);
    cr_assert_eq(qs.live_subs, 0, "owned port subscriptions were not closed by nq_port_free");
    nq_queue_free(E.q);
}

/* Concurrent notifiers while this thread dispatches: the invariant as a
 * bound, checked after every dispatch. */
struct hammer {
    nq_queue_t *q;
    nq_handle_t *h;
    int nh;
    atomic_int stop;
    atomic_long sent;
};

static void *hammer_thread(void *a) {
    struct hammer *hm = a;
    unsigned i = 0;
    while (!atomic_load_explicit(&hm->stop, memory_order_relaxed)) {
        i++;
        nq_notify(hm->q, hm->h[i % (unsigned)hm->nh], (int64_t)i);
        atomic_fetch_add_explicit(&hm->sent, 1, memory_order_relaxed);
    }
    return NULL;
}

static struct {
    nq_port_t *p;
    nq_queue_t *q;
    nq_handle_t *h;
    long calls;
} HC;

static void hammer_wait_cb(void *data, int status, int64_t arg) {
    (void)arg;
    HC.calls++;
    int i = (int)(intptr_t)data;
    if (status == 0)
        nq_port_wait(HC.p, HC.q, HC.h[i], NQ_SEQ_NEXT, -1, hammer_wait_cb, data, NULL);
}

Test(port, eventfd_writes_never_exceed_dispatch_cycles_under_concurrent_notifies,
     .timeout = 60) {
    setup();
    static nq_handle_t hs[64];
    HC.q = new_queue();
    HC.p = new_port();
    HC.h = hs;
    HC.calls = 0;
    for (int i = 0; i < 64; i++) {
        hs[i] = reg(HC.q);
        cr_assert_eq(nq_port_wait(HC.p, HC.q, hs[i], NQ_SEQ_NEXT, -1, hammer_wait_cb,
                                  (void *)(intptr_t)i, NULL),
                     0);
    }
    struct hammer hm = {HC.q, hs, 64, 0, 0};
    pthread_t t[2];
    for (int k = 0; k < 2; k++)
        cr_assert_eq(pthread_create(&t[k], NULL, hammer_thread, &hm), 0);
    int64_t end = now_ns() + (SCALE(10) >= 10 ? 1 * SEC : 300 * MS);
    long polls = 0;
    while (now_ns() < end) {
        struct pollfd pf = {nq_port_fd(HC.p), POLLIN, 0};
        if (poll(&pf, 1, 10) == 1) {
            polls++;
            dispatch(HC.p, polls % 3 == 0 ? 7 : 0);
        }
        nq_port_stats_t st = pstats(HC.p);
        cr_assert_leq(st.efd_writes, st.dispatches + 1, "%llu eventfd writes in %llu dispatches",
                      (unsigned long long)st.efd_writes, (unsigned long long)st.dispatches);
    }
    atomic_store(&hm.stop, 1);
    for (int k = 0; k < 2; k++)
        cr_assert_eq(pthread_join(t[k], NULL), 0);
    cr_assert_gt(HC.calls, 64, "the loop ran hardly any callback");
    nq_port_stats_t st = pstats(HC.p);
    cr_log_info("port hammer: %ld notifies, %ld callbacks, %llu dispatches, %llu eventfd writes",
                atomic_load(&hm.sent), HC.calls, (unsigned long long)st.dispatches,
                (unsigned long long)st.efd_writes);
    port_free(HC.p);
    nq_queue_free(HC.q);
}

/* The fd goes quiet once every callback has run and no notifier is active.
 * Here a notifier thread completes a port wait while this thread dispatches
 * back to back (as a loop does when its timer fires), so a dispatch can
 * begin between the waker's claim of the signal and its eventfd write. */
static struct {
    nq_queue_t *q;
    nq_handle_t h;
    atomic_long go;
    atomic_long done;
    atomic_int stop;
} Q;

static void *quiet_notifier(void *a) {
    (void)a;
    for (long r = 1;; r++) {
        while (atomic_load(&Q.go) != r)
            if (atomic_load(&Q.stop))
                return NULL;
        nq_notify(Q.q, Q.h, r);
        atomic_store(&Q.done, r);
    }
}

Test(port, fd_goes_quiet_once_nothing_is_pending, .timeout = 60) {
    setup();
    memset(&Q, 0, sizeof(Q));
    Q.q = new_queue();
    Q.h = reg(Q.q);
    nq_port_t *p = new_port();
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, quiet_notifier, NULL), 0);
    const long rounds = SCALE(20000);
    long stuck = 0, first_stuck = 0;
    wrec_t r;
    for (long k = 1; k <= rounds && stuck == 0; k++) {
        memset(&r, 0, sizeof(r));
        pwait(p, Q.q, Q.h, NQ_SEQ_NEXT, -1, &r, NULL);
        atomic_store(&Q.go, k);
        int64_t t0 = now_ns();
        while (r.calls == 0) {
            dispatch(p, 0);
            cr_assert_lt(now_ns() - t0, 10 * SEC, "round %ld: the callback never came", k);
        }
        while (atomic_load(&Q.done) != k)
            sched_yield();
        /* The notifier is done; one spurious readiness may be left over, and
         * the next dispatch must clear it. */
        for (int d = 0; d < 3; d++)
            dispatch(p, 0);
        if (readable(p)) {
            stuck++;
            first_stuck = k;
        }
    }
    atomic_store(&Q.stop, 1);
    cr_assert_eq(pthread_join(t, NULL), 0);
    nq_port_stats_t st = pstats(p);
    cr_expect_eq(stuck, 0,
                 "round %ld: with no callback pending and no notifier running, the fd stays "
                 "readable after 3 dispatches (eventfd writes %llu, reads %llu): a loop polling "
                 "it would spin until the next notification",
                 first_stuck, (unsigned long long)st.efd_writes, (unsigned long long)st.efd_reads);
    port_free(p);
    nq_queue_free(Q.q);
}

/* --- budgets ---------------------------------------------------------------- */

Test(port, budget_leaves_the_rest_for_the_next_dispatch_and_the_fd_readable) {
    setup();
    nq_queue_t *q = new_queue();
    nq_port_t *p = new_port();
    nq_handle_t h[10];
    wrec_t r[10];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < 10; i++) {
        h[i] = reg(q);
        pwait(p, q, h[i], NQ_SEQ_NEXT, -1, &r[i], NULL);
    }
    for (int i = 0; i < 10; i++)
        nq_notify(q, h[i], 100 + i);
    cr_assert_eq(dispatch(p, 3), 3);
    cr_assert(readable(p), "work left over must keep the fd readable");
    cr_assert_eq(dispatch(p, 3), 3);
    cr_assert(readable(p));
    cr_assert_eq(dispatch(p, 1), 1);
    cr_assert(readable(p));
    cr_assert_eq(dispatch(p, 0), 3);
    cr_assert_not(readable(p));
    cr_assert_eq(dispatch(p, 0), 0);
    for (int i = 0; i < 10; i++) {
        cr_assert_eq(r[i].calls, 1, "wait %d: %d callbacks", i, r[i].calls);
        cr_assert_eq(r[i].arg, 100 + i);
    }
    /* Budget 0 runs what was ready when it began, not what its callbacks
     * make ready: a level-triggered subscription comes back next time. */
    srec_t s;
    memset(&s, 0, sizeof(s));
    s.per_call = 1;
    psub(p, q, h[0], 16, &s, NULL);
    for (int i = 0; i < 5; i++)
        nq_notify(q, h[0], i);
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert(readable(p));
    cr_assert_eq(dispatch(p, 100), 1);
    cr_assert_eq(s.calls, 2);
    port_free(p);
    nq_queue_free(q);
}

/* The budget bounds timeout callbacks too, and they come first: a mass
 * expiry is cut into budget-sized dispatches (the rest stay due, so
 * nq_port_timeout_ms says 0 and a loop's timer comes back, with the fd
 * quiet), and a backlog of ready work cannot make a due timeout wait. */
Test(port, budget_bounds_timeout_callbacks_which_run_before_ready_ones, .timeout = 30) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t quiet = reg(q);
    nq_port_t *p = new_port();
    enum { NT = 20, NR = 6 };
    wrec_t t[NT], r[NR];
    nq_handle_t h[NR];
    memset(t, 0, sizeof(t));
    memset(r, 0, sizeof(r));
    for (int i = 0; i < NT; i++)
        pwait(p, q, quiet, NQ_SEQ_NEXT, 0, &t[i], NULL); /* due at once */
    for (int i = 0; i < NR; i++) {
        h[i] = reg(q);
        pwait(p, q, h[i], NQ_SEQ_NEXT, -1, &r[i], NULL);
        nq_notify(q, h[i], 100 + i);
    }
    /* Due waits a notification completed first leave the heap with no
     * callback of their own: their notification brings it. */
    wrec_t both;
    memset(&both, 0, sizeof(both));
    nq_handle_t hb = reg(q);
    pwait(p, q, hb, NQ_SEQ_NEXT, 0, &both, NULL);
    cr_assert_eq(nq_notify(q, hb, 7), 1);
    sleep_ns(2 * MS);
    cr_assert_eq(nq_port_timeout_ms(p), 0);

    int dispatches = 0, timeouts = 0, ready = 0, max_ran = 0;
    while (timeouts < NT || ready < NR || both.calls == 0) {
        cr_assert_lt(++dispatches, 100, "the work never drained");
        int before = timeouts + ready + both.calls;
        int ran = dispatch(p, 4);
        cr_assert_leq(ran, 4, "dispatch(4) ran %d callbacks", ran);
        if (ran > max_ran)
            max_ran = ran;
        timeouts = ready = 0;
        for (int i = 0; i < NT; i++)
            timeouts += t[i].calls;
        for (int i = 0; i < NR; i++)
            ready += r[i].calls;
        cr_assert_eq(ran, timeouts + ready + both.calls - before);
        /* timeouts first: no ready callback while a due timeout is left */
        if (ready + both.calls > 0)
            cr_assert_eq(timeouts, NT, "a ready callback ran with %d of %d due timeouts left",
                         NT - timeouts, NT);
        if (timeouts < NT) {
            cr_assert_eq(nq_port_timeout_ms(p), 0, "due timeouts left, and timeout_ms is not 0");
            cr_assert(readable(p), "ready work left: the fd must stay readable");
        }
    }
    cr_assert_eq(max_ran, 4);
    cr_assert_geq(dispatches, (NT + NR + 1) / 4);
    for (int i = 0; i < NT; i++) {
        cr_assert_eq(t[i].calls, 1);
        cr_assert_eq(t[i].status, NQ_ETIMEDOUT);
    }
    for (int i = 0; i < NR; i++) {
        cr_assert_eq(r[i].calls, 1);
        cr_assert_eq(r[i].status, 0);
        cr_assert_eq(r[i].arg, 100 + i);
    }
    cr_assert_eq(both.calls, 1, "notified and due: one callback");
    cr_assert_eq(both.status, 0, "the notification completed it first");
    cr_assert_eq(both.arg, 7);
    nq_port_stats_t st = pstats(p);
    cr_assert_eq(st.deadlines, 0);
    cr_assert_eq(st.deadlines_expired, NT);
    cr_assert_eq(nq_port_timeout_ms(p), -1);
    cr_assert_eq(dispatch(p, 4), 0);
    cr_assert_not(readable(p));

    /* Due timeouts alone, cut by the budget, keep the fd readable too: the
     * loop comes back through its I/O watcher in its next iteration. */
    wrec_t d[5];
    memset(d, 0, sizeof(d));
    for (int i = 0; i < 5; i++)
        pwait(p, q, quiet, NQ_SEQ_NEXT, 0, &d[i], NULL);
    sleep_ns(2 * MS);
    cr_assert_eq(dispatch(p, 2), 2);
    cr_assert(readable(p), "due timeouts left, and the fd is quiet");
    cr_assert_eq(nq_port_timeout_ms(p), 0);
    cr_assert_eq(dispatch(p, 2), 2);
    cr_assert(readable(p));
    cr_assert_eq(dispatch(p, 2), 1);
    cr_assert_not(readable(p), "nothing left, and the fd is readable");
    cr_assert_eq(nq_port_timeout_ms(p), -1);
    for (int i = 0; i < 5; i++)
        cr_assert_eq(d[i].status, NQ_ETIMEDOUT);
    port_free(p);
    nq_queue_free(q);
}

/* --- level-triggered subscriptions ----------------------------------------- */

Test(port, subscription_callback_is_level_triggered) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q);
    nq_port_t *p = new_port();
    srec_t r;
    memset(&r, 0, sizeof(r));
    r.per_call = 3;
    psub(p, q, h, 64, &r, NULL);
    for (int i = 0; i < 10; i++)
        nq_notify(q, h, i);
    const int want_got[] = {3, 6, 9, 10};
    for (int d = 0; d < 4; d++) {
        cr_assert(readable(p), "dispatch %d: the fd is quiet with args unread", d);
        cr_assert_eq(dispatch(p, 0), 1, "dispatch %d: the callback ran more than once", d);
        cr_assert_eq(r.calls, d + 1);
        cr_assert_eq(r.ngot, want_got[d]);
    }
    for (int i = 0; i < 10; i++)
        cr_assert_eq(r.got[i], i);
    cr_assert_not(readable(p));
    cr_assert_eq(dispatch(p, 0), 0);
    cr_assert_eq(r.calls, 4);
    /* New args arriving while it is partly drained: still one call per dispatch. */
    for (int i = 0; i < 4; i++)
        nq_notify(q, h, 10 + i);
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(r.ngot, 13);
    nq_notify(q, h, 14);
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(r.ngot, 15);
    for (int i = 10; i < 15; i++)
        cr_assert_eq(r.got[i], i);
    cr_assert_eq(cb_outside, 0);
    port_free(p);
    nq_queue_free(q);
}

/* --- timeouts ----------------------------------------------------------------- */

Test(port, wait_timeouts_expire_inside_dispatch_never_early, .timeout = 30) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q);
    nq_port_t *p = new_port();
    const int64_t tos[] = {30, 0, 10, 20, 1};
    enum { N = sizeof(tos) / sizeof(tos[0]) };
    wrec_t r[N + 1];
    int64_t start[N];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < N; i++) {
        start[i] = now_ns();
        pwait(p, q, h, NQ_SEQ_NEXT, tos[i], &r[i], NULL);
    }
    pwait(p, q, h, NQ_SEQ_NEXT, -1, &r[N], NULL); /* no timeout */
    cr_assert_eq(pstats(p).deadlines, N);
    int64_t tm = nq_port_timeout_ms(p);
    cr_assert(tm >= 0 && tm <= 0 + 1, "timeout_ms %lld with a 0 ms wait pending", (long long)tm);
    /* The loop an epoll user writes: sleep for timeout_ms, then dispatch. */
    int done = 0, seen[N] = {0};
    int64_t t0 = now_ns();
    while (done < N) {
        cr_assert_lt(now_ns() - t0, 10 * SEC, "the timeouts never expired");
        tm = nq_port_timeout_ms(p);
        cr_assert_geq(tm, 0, "timeout_ms -1 with deadlines pending");
        cr_assert_leq(tm, 30, "timeout_ms %lld beyond the latest deadline", (long long)tm);
        struct pollfd pf = {nq_port_fd(p), POLLIN, 0};
        int pr = poll(&pf, 1, (int)tm);
        int before = done;
        int ran = dispatch(p, 0);
        for (int i = 0; i < N; i++)
            if (r[i].calls && !seen[i]) {
                seen[i] = 1;
                done++;
            }
        cr_assert_eq(ran, done - before);
        if (pr == 0 && tm > 0) /* rounded up, so the deadline has passed */
            cr_assert_gt(ran, 0, "poll(timeout_ms = %lld) timed out and dispatch expired nothing",
                         (long long)tm);
    }
    for (int i = 0; i < N; i++) {
        cr_assert_eq(r[i].calls, 1, "wait %d (%lld ms): %d callbacks", i, (long long)tos[i],
                     r[i].calls);
        cr_assert_eq(r[i].status, NQ_ETIMEDOUT, "wait %d: %s", i, nq_err_name(r[i].status));
        cr_assert_eq(r[i].where, WHERE_DISPATCH, "a timeout expired outside dispatch");
        int64_t el = r[i].at - start[i];
        cr_assert_geq(el, tos[i] * MS, "a %lld ms timeout expired after %lld ns", (long long)tos[i],
                      (long long)el);
        cr_assert_lt(el, tos[i] * MS + SLACK);
    }
    /* In the order the callbacks ran: one dispatch that expires several
     * (a late first dispatch on a loaded machine) runs them by deadline too. */
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++)
            if (r[i].order < r[j].order)
                cr_assert_leq(tos[i], tos[j], "the %lld ms timeout expired after the %lld ms one",
                              (long long)tos[i], (long long)tos[j]);
    cr_assert_eq(r[N].calls, 0, "a wait without timeout completed");
    cr_assert_eq(nq_port_timeout_ms(p), -1, "no deadline is left");
    nq_port_stats_t st = pstats(p);
    cr_assert_eq(st.deadlines, 0);
    cr_assert_eq(st.deadlines_expired, N);
    cr_assert_eq(qstats(q).waits_timed_out, N);
    port_free(p);
    cr_assert_eq(r[N].calls, 1);
    cr_assert_eq(r[N].status, NQ_ECANCELED);
    cr_assert_eq(r[N].where, WHERE_FREE);
    nq_queue_free(q);
}

Test(port, timeout_ms_tracks_the_next_deadline, .timeout = 30) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t a = reg(q), b = reg(q);
    nq_port_t *p = new_port();
    wrec_t ra, rb;
    memset(&ra, 0, sizeof(ra));
    memset(&rb, 0, sizeof(rb));
    nq_wait_t *wa = NULL;
    cr_assert_eq(nq_port_timeout_ms(p), -1);
    cr_assert_eq(nq_port_timeout_ms(NULL), -1);
    pwait(p, q, a, NQ_SEQ_NEXT, 5000, &ra, &wa);
    int64_t tm = nq_port_timeout_ms(p);
    cr_assert(tm > 4000 && tm <= 5000, "timeout_ms %lld for a 5000 ms wait", (long long)tm);
    pwait(p, q, b, NQ_SEQ_NEXT, 2000, &rb, NULL);
    tm = nq_port_timeout_ms(p);
    cr_assert(tm > 1000 && tm <= 2000, "timeout_ms %lld for a 2000 ms wait", (long long)tm);
    /* Notified before its timeout: status 0, and its deadline goes. */
    nq_notify(q, b, 5);
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(rb.calls, 1);
    cr_assert_eq(rb.status, 0);
    cr_assert_eq(rb.arg, 5);
    tm = nq_port_timeout_ms(p);
    cr_assert(tm > 2000 && tm <= 5000, "timeout_ms %lld after the earlier wait completed",
              (long long)tm);
    cr_assert_eq(pstats(p).deadlines, 1);
    /* Cancelled: its deadline goes too, and it never times out. */
    cr_assert_eq(nq_wait_cancel(wa), 0);
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(ra.status, NQ_ECANCELED);
    cr_assert_eq(nq_port_timeout_ms(p), -1);
    cr_assert_eq(pstats(p).deadlines, 0);
    cr_assert_eq(pstats(p).deadlines_expired, 0);
    nq_wait_release(wa);
    cr_assert_eq(ra.calls, 1);
    cr_assert_eq(rb.calls, 1);
    port_free(p);
    nq_queue_free(q);
}

static struct {
    int calls;
    nq_port_t *p;
    void *data;
    int tid;
    int inside; /* calls made while a port callback ran */
    int64_t ms; /* nq_port_timeout_ms at the last call */
} DL;
static int in_port_cb; /* set by dl_cb while it runs */

static void on_deadline(nq_port_t *p, void *data) {
    DL.calls++;
    DL.p = p;
    DL.data = data;
    DL.tid = cur_tid();
    DL.inside += in_port_cb;
    DL.ms = nq_port_timeout_ms(p);
}

/* A wait callback that starts another port wait (its deadline earlier than
 * any pending one) from inside the dispatch. */
static nq_queue_t *dl_q;
static nq_handle_t dl_h;
static wrec_t dl_inner;

static void dl_cb(void *data, int status, int64_t arg) {
    in_port_cb = 1;
    wcb(data, status, arg);
    pwait(((wrec_t *)data)->port, dl_q, dl_h, NQ_SEQ_NEXT, 3000, &dl_inner, NULL);
    in_port_cb = 0;
}

/* The hook runs on the port's thread, never from inside a port callback,
 * whenever the next deadline may have moved: at registration when one
 * exists, from nq_port_wait (outside a dispatch) when it moves earlier, and
 * at the end of a dispatch while a deadline exists or after the last went
 * away. A later deadline, a wait without one, a wait due at once, a
 * dispatch with no deadline before or after: no call. */
Test(port, deadline_hook_runs_when_the_next_deadline_may_have_moved_never_inside_a_callback) {
    setup();
    memset(&DL, 0, sizeof(DL));
    memset(&dl_inner, 0, sizeof(dl_inner));
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q);
    nq_port_t *p = new_port();
    int tag;
    cr_assert_eq(nq_port_on_deadline(p, on_deadline, &tag), 0);
    cr_assert_eq(DL.calls, 0, "no deadline: registration calls nothing");
    cr_assert_eq(nq_port_on_deadline(NULL, on_deadline, &tag), NQ_EINVAL);
    wrec_t r[8];
    memset(r, 0, sizeof(r));
    pwait(p, q, h, NQ_SEQ_NEXT, 10000, &r[0], NULL);
    cr_assert_eq(DL.calls, 1, "the first deadline is an earlier one");
    cr_assert_eq(DL.p, p);
    cr_assert_eq(DL.data, &tag);
    cr_assert_eq(DL.tid, main_tid);
    pwait(p, q, h, NQ_SEQ_NEXT, 20000, &r[1], NULL);
    cr_assert_eq(DL.calls, 1, "a later deadline fired the hook");
    pwait(p, q, h, NQ_SEQ_NEXT, -1, &r[2], NULL);
    cr_assert_eq(DL.calls, 1, "a wait without timeout fired the hook");
    pwait(p, q, h, NQ_SEQ_NEXT, 5000, &r[3], NULL);
    cr_assert_eq(DL.calls, 2, "an earlier deadline did not fire the hook");
    pwait(p, q, h, NQ_SEQ_NEXT, 7000, &r[4], NULL);
    cr_assert_eq(DL.calls, 2);
    /* A new owner learns the pending deadline at registration. */
    cr_assert_eq(nq_port_on_deadline(p, on_deadline, &tag), 0);
    cr_assert_eq(DL.calls, 3, "registration with a deadline pending called nothing");
    uint64_t s0;
    cr_assert_eq(nq_seq(q, h, &s0), 0);
    nq_notify(q, h, 1); /* completes the five waits above */
    cr_assert_eq(dispatch(p, 0), 5);
    cr_assert_eq(nq_port_timeout_ms(p), -1);
    cr_assert_eq(DL.calls, 4, "the end of the dispatch did not say the deadlines went");
    cr_assert_eq(DL.ms, -1);
    pwait(p, q, h, s0, 1, &r[5], NULL); /* due at once: no deadline */
    cr_assert_eq(DL.calls, 4, "a wait completed at once has no deadline");
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(DL.calls, 4, "a dispatch with no deadline before or after called it");
    /* From inside a callback: an earlier deadline is told at the end of
     * the dispatch, not from the callback. */
    dl_q = q;
    dl_h = h;
    wrec_t outer;
    memset(&outer, 0, sizeof(outer));
    outer.port = p;
    uint64_t s1;
    cr_assert_eq(nq_seq(q, h, &s1), 0);
    pwait(p, q, h, NQ_SEQ_NEXT, 30000, &r[6], NULL);
    cr_assert_eq(DL.calls, 5, "the first deadline after the heap emptied");
    /* outer.port: wcb also dispatches from inside (refused, NQ_EBUSY). */
    cr_assert_eq(nq_port_wait(p, q, h, s1 - 1, -1, dl_cb, &outer, NULL), 0); /* due */
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(outer.calls, 1);
    cr_assert_eq(DL.inside, 0, "the hook ran inside a port callback");
    cr_assert_eq(DL.calls, 6, "the deadline a callback made was not told at the end");
    cr_assert_leq(DL.ms, 3000);
    cr_assert_eq(nq_port_on_deadline(p, NULL, NULL), 0);
    pwait(p, q, h, NQ_SEQ_NEXT, 100, &r[7], NULL);
    cr_assert_eq(DL.calls, 6, "a removed hook ran");
    port_free(p);
    for (int i = 0; i < 8; i++)
        cr_assert_eq(r[i].calls, 1, "wait %d: %d callbacks", i, r[i].calls);
    cr_assert_eq(dl_inner.calls, 1);
    cr_assert_eq(r[7].status, NQ_ECANCELED);
    nq_queue_free(q);
}

/* nq_port_stop inside a callback: the dispatch returns after it, the rest
 * stays ready (the fd readable) and runs in the next dispatch; outside a
 * dispatch it does nothing. The port's own budget (NQ_PORT_BUDGET). */
static void stop_cb(void *data, int status, int64_t arg) {
    wrec_t *r = data;
    nq_port_t *p = r->port;
    r->port = NULL; /* wcb: no nested dispatch */
    wcb(data, status, arg);
    r->port = p;
    cr_assert_eq(nq_port_stop(p), 0);
}

Test(port, stop_inside_a_callback_ends_that_dispatch_and_the_budget_is_the_ports) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q);
    nq_port_t *p = new_port();
    cr_assert_eq(nq_port_stop(NULL), NQ_EINVAL);
    cr_assert_eq(nq_port_stop(p), 0);
    cr_assert_eq(nq_port_set_budget(NULL, 4), NQ_EINVAL);
    cr_assert_eq(nq_port_set_budget(p, NQ_PORT_BUDGET), NQ_EINVAL);
    wrec_t r[6];
    memset(r, 0, sizeof(r));
    r[0].port = p;
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, stop_cb, &r[0], NULL), 0);
    for (int i = 1; i < 6; i++)
        pwait(p, q, h, NQ_SEQ_NEXT, -1, &r[i], NULL);
    nq_notify(q, h, 9);
    /* Waits are completed newest first: the stopping one may run at any
     * place; the dispatch ends right after it. */
    int first = dispatch(p, 0);
    cr_assert_geq(first, 1);
    cr_assert_lt(first, 7);
    struct pollfd pfd = {nq_port_fd(p), POLLIN, 0};
    if (first < 6)
        cr_assert_eq(poll(&pfd, 1, 0), 1, "stopped with work left, the fd is not readable");
    /* The port's budget: 2 a dispatch. */
    cr_assert_eq(nq_port_set_budget(p, 2), 0);
    int total = first, rounds = 0;
    while (total < 6) {
        int n = dispatch(p, NQ_PORT_BUDGET);
        cr_assert_leq(n, 2, "a dispatch ran %d callbacks over the port's budget of 2", n);
        total += n;
        cr_assert_lt(++rounds, 10);
    }
    for (int i = 0; i < 6; i++)
        cr_assert_eq(r[i].calls, 1);
    port_free(p);
    nq_queue_free(q);
}

/* --- re-entrancy --------------------------------------------------------------- */

Test(port, callback_may_release_its_own_wait) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q);
    nq_port_t *p = new_port();
    /* Completed by a notify, by a timeout, by a cancel, by an unregister. */
    wrec_t r[4];
    memset(r, 0, sizeof(r));
    nq_wait_t *w[4];
    pwait(p, q, h, NQ_SEQ_NEXT, -1, &r[0], &w[0]);
    pwait(p, q, h, NQ_SEQ_NEXT, 0, &r[1], &w[1]);
    nq_handle_t h2 = reg(q);
    pwait(p, q, h2, NQ_SEQ_NEXT, -1, &r[2], &w[2]);
    nq_handle_t h3 = reg(q);
    pwait(p, q, h3, NQ_SEQ_NEXT, -1, &r[3], &w[3]);
    for (int i = 0; i < 4; i++)
        r[i].self = w[i];
    cr_assert_eq(qstats(q).live_waits, 4);
    nq_notify(q, h, 3);
    cr_assert_eq(nq_wait_cancel(w[2]), 0);
    cr_assert_eq(nq_unregister(q, h3), 0);
    int64_t t0 = now_ns();
    while (r[0].calls + r[1].calls + r[2].calls + r[3].calls < 4) {
        dispatch(p, 0);
        cr_assert_lt(now_ns() - t0, 5 * SEC);
    }
    for (int i = 0; i < 4; i++)
        cr_assert_eq(r[i].calls, 1, "wait %d: %d callbacks", i, r[i].calls);
    cr_assert_eq(r[0].status, 0);
    /* The 0 ms wait was also notified (it is on h): either outcome, once. */
    cr_assert(r[1].status == 0 || r[1].status == NQ_ETIMEDOUT, "%s", nq_err_name(r[1].status));
    cr_assert_eq(r[2].status, NQ_ECANCELED);
    cr_assert_eq(r[3].status, NQ_ECLOSED);
    cr_assert_eq(qstats(q).live_waits, 0, "a wait released in its callback was not freed");
    cr_assert_eq(pstats(p).live_items, 0);
    for (int d = 0; d < 2; d++)
        dispatch(p, 0);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(r[i].calls, 1);
    port_free(p);
    nq_queue_free(q);
}

Test(port, callback_may_close_its_own_subscription) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q);
    nq_port_t *p = new_port();
    srec_t a, b;
    memset(&a, 0, sizeof(a));
    memset(&b, 0, sizeof(b));
    a.per_call = 1;
    a.close_self = 1;
    b.close_self = 1; /* an owned one (no out): the port does not close it twice */
    nq_sub_t *sa = NULL;
    psub(p, q, h, 8, &a, &sa);
    psub(p, q, h, 8, &b, NULL);
    cr_assert_eq(qstats(q).live_subs, 2);
    for (int i = 0; i < 5; i++)
        nq_notify(q, h, i);
    cr_assert_eq(dispatch(p, 0), 2);
    cr_assert_eq(a.calls, 1);
    cr_assert_eq(a.ngot, 1);
    cr_assert_eq(b.calls, 1);
    cr_assert_eq(qstats(q).live_subs, 0, "a subscription closed in its callback is still live");
    cr_assert_eq(pstats(p).live_items, 0);
    cr_assert_eq(nq_notify(q, h, 9), 0, "a closed subscription still received");
    cr_assert_eq(dispatch(p, 0), 0, "a closed subscription was called back");
    cr_assert_eq(a.calls, 1);
    port_free(p);
    nq_queue_free(q);
}

/* A ping-pong: each callback notifies the other handle and starts a new
 * wait on its own. The notify made inside dispatch must bring the loop back. */
static struct {
    nq_port_t *p;
    nq_queue_t *q;
    nq_handle_t h[2];
    int calls[2];
    int bad;
    int limit;
} PP;

static void pp_cb(void *data, int status, int64_t arg) {
    int i = (int)(intptr_t)data;
    PP.calls[i]++;
    if (status != 0 || arg != PP.calls[0] + PP.calls[1])
        PP.bad++;
    if (PP.calls[0] + PP.calls[1] >= PP.limit)
        return;
    if (nq_port_wait(PP.p, PP.q, PP.h[i], NQ_SEQ_NEXT, 1000, pp_cb, data, NULL) != 0)
        PP.bad++;
    if (nq_notify(PP.q, PP.h[1 - i], PP.calls[0] + PP.calls[1] + 1) != 1)
        PP.bad++;
}

Test(port, callbacks_may_notify_and_start_new_waits, .timeout = 30) {
    setup();
    memset(&PP, 0, sizeof(PP));
    PP.q = new_queue();
    PP.p = new_port();
    PP.limit = 400;
    for (int i = 0; i < 2; i++) {
        PP.h[i] = reg(PP.q);
        cr_assert_eq(
            nq_port_wait(PP.p, PP.q, PP.h[i], NQ_SEQ_NEXT, 1000, pp_cb, (void *)(intptr_t)i, NULL),
            0);
    }
    nq_notify(PP.q, PP.h[0], 1);
    while (PP.calls[0] + PP.calls[1] < PP.limit) {
        struct pollfd pf = {nq_port_fd(PP.p), POLLIN, 0};
        int pr = poll(&pf, 1, 2000);
        cr_assert_eq(pr, 1, "after %d callbacks the fd stayed quiet with one pending",
                     PP.calls[0] + PP.calls[1]);
        dispatch(PP.p, 0);
    }
    cr_assert_eq(PP.bad, 0);
    cr_assert_eq(PP.calls[0], PP.limit / 2);
    cr_assert_eq(PP.calls[1], PP.limit / 2);
    cr_assert_eq(cb_outside, 0);
    /* The 400th callback (on h[1]) re-armed nothing; the wait the 399th
     * started on h[0] is still pending: ECANCELED now. */
    port_free(PP.p);
    cr_assert_eq(PP.calls[0], PP.limit / 2 + 1);
    cr_assert_eq(PP.calls[1], PP.limit / 2);
    nq_queue_free(PP.q);
}

Test(port, dispatch_from_inside_a_callback_is_ebusy) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q);
    nq_port_t *p = new_port();
    wrec_t r, r2;
    memset(&r, 0, sizeof(r));
    memset(&r2, 0, sizeof(r2));
    r.port = p;
    r.dispatch_rc = 12345;
    pwait(p, q, h, NQ_SEQ_NEXT, -1, &r, NULL);
    pwait(p, q, h, NQ_SEQ_NEXT, -1, &r2, NULL);
    nq_notify(q, h, 1);
    cr_assert_eq(dispatch(p, 0), 2);
    cr_assert_eq(r.calls, 1);
    cr_assert_eq(r.dispatch_rc, NQ_EBUSY, "nested dispatch returned %d", r.dispatch_rc);
    cr_assert_eq(r2.calls, 1, "the nested dispatch ran the other callback, or lost it");
    cr_assert_eq(dispatch(p, 0), 0, "the nested call left the port marked busy");
    port_free(p);
    nq_queue_free(q);
}

Test(port, attach_is_exclusive) {
    setup();
    nq_port_t *p = new_port();
    int a, b;
    cr_assert_eq(nq_port_attach(p, &a), 0);
    cr_assert_eq(nq_port_attach(p, &b), NQ_EBUSY);
    cr_assert_eq(nq_port_attach(p, &a), NQ_EBUSY, "the same owner twice");
    cr_assert_eq(nq_port_detach(p, &b), NQ_EINVAL, "detach by a non-owner");
    cr_assert_eq(nq_port_attach(p, &b), NQ_EBUSY, "a failed detach let go");
    cr_assert_eq(nq_port_detach(p, &a), 0);
    cr_assert_eq(nq_port_detach(p, &a), NQ_EINVAL);
    cr_assert_eq(nq_port_attach(p, &b), 0, "detach did not free the port for another owner");
    cr_assert_eq(nq_port_attach(NULL, &a), NQ_EINVAL);
    cr_assert_eq(nq_port_attach(p, NULL), NQ_EINVAL);
    cr_assert_eq(nq_port_detach(NULL, &b), NQ_EINVAL);
    cr_assert_eq(nq_port_detach(p, &b), 0);
    port_free(p);
}

/* An adapter closing from inside a callback detaches the port there: the
 * running dispatch stops after that callback, and what it had not run stays
 * ready (fd readable) for the next dispatch, exactly once each. */
static int detach_owner;
static int detach_ran[8];
static nq_port_t *detach_port;
static void detach_cb(void *data, int status, int64_t arg) {
    (void)status;
    (void)arg;
    int i = (int)(intptr_t)data;
    detach_ran[i]++;
    if (i == 0)
        cr_assert_eq(nq_port_detach(detach_port, &detach_owner), 0);
}

Test(port, detach_inside_a_callback_stops_the_dispatch_and_keeps_the_rest) {
    setup();
    nq_queue_t *q = new_queue();
    nq_port_t *p = detach_port = new_port();
    nq_handle_t h[8];
    for (int i = 0; i < 8; i++) {
        h[i] = reg(q);
        cr_assert_eq(nq_port_wait(p, q, h[i], 0, -1, detach_cb, (void *)(intptr_t)i, NULL), 0);
    }
    cr_assert_eq(nq_port_attach(p, &detach_owner), 0);
    for (int i = 0; i < 8; i++)
        cr_assert_eq(nq_notify(q, h[i], i), 1);
    cr_assert_eq(dispatch(p, 0), 1, "the dispatch went on after its owner detached");
    cr_assert_eq(detach_ran[0], 1);
    for (int i = 1; i < 8; i++)
        cr_assert_eq(detach_ran[i], 0, "wait %d ran after the detach", i);
    cr_assert(readable(p), "the rest is not signalled for the next owner");
    cr_assert_eq(dispatch(p, 0), 7, "the rest did not run in the next dispatch");
    for (int i = 0; i < 8; i++)
        cr_assert_eq(detach_ran[i], 1, "wait %d ran %d times", i, detach_ran[i]);
    cr_assert_eq(dispatch(p, 0), 0);
    cr_assert_not(readable(p));
    port_free(p);
    nq_queue_free(q);
}

/* The same when the callback is a timeout's: the expiry stops there too. */
Test(port, detach_inside_a_timeout_callback_stops_the_expiry) {
    setup();
    memset(detach_ran, 0, sizeof(detach_ran));
    nq_queue_t *q = new_queue();
    nq_port_t *p = detach_port = new_port();
    for (int i = 0; i < 3; i++) {
        nq_handle_t h = reg(q);
        cr_assert_eq(nq_port_wait(p, q, h, 0, 0, detach_cb, (void *)(intptr_t)i, NULL), 0);
        sleep_ns(MS / 10); /* distinct deadlines: expiry order 0, 1, 2 */
    }
    cr_assert_eq(nq_port_attach(p, &detach_owner), 0);
    cr_assert_eq(dispatch(p, 0), 1, "the expiry went on after its owner detached");
    cr_assert_eq(detach_ran[0], 1);
    cr_assert_eq(detach_ran[1] + detach_ran[2], 0);
    cr_assert_eq(nq_port_timeout_ms(p), 0, "the rest are due for the next owner");
    cr_assert_eq(dispatch(p, 0), 2);
    cr_assert_eq(detach_ran[1] + detach_ran[2], 2);
    port_free(p);
    nq_queue_free(q);
}

/* A timeout is the port's own doing: it costs no eventfd write and leaves
 * no token behind to wake the loop again for nothing. */
Test(port, a_timeout_costs_no_eventfd_write) {
    setup();
    nq_queue_t *q = new_queue();
    nq_port_t *p = new_port();
    nq_handle_t h = reg(q);
    wrec_t r = {0};
    pwait(p, q, h, 0, 0, &r, NULL);
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(r.status, NQ_ETIMEDOUT);
    cr_assert_not(readable(p), "a timeout left the fd readable");
    cr_assert_eq(pstats(p).efd_writes, 0);
    nq_wait_t *w;
    pwait(p, q, h, 0, 0, &r, &w);
    port_free(p); /* cancels nothing (already due), runs its callback */
    cr_assert_eq(r.calls, 2);
    nq_wait_release(w);
    nq_queue_free(q);
}

/* Sustained load: while a dispatch leaves work it can run, the fd stays
 * readable untouched: no eventfd read, no write, whatever the number of
 * dispatches (the syscall target of the benchmark issue). The last one,
 * going idle, reads it once and leaves it quiet. */
Test(port, sustained_work_costs_no_syscall_per_dispatch) {
    setup();
    nq_queue_t *q = new_queue();
    nq_port_t *p = new_port();
    nq_handle_t h = reg(q);
    srec_t r = {0};
    r.per_call = 1; /* level-triggered: called again while it holds args */
    psub(p, q, h, 1000, &r, NULL);
    for (int i = 0; i < 1000; i++)
        cr_assert_eq(nq_notify(q, h, i), 1);
    nq_port_stats_t before = pstats(p);
    cr_assert_eq(before.efd_writes, 1, "1000 notifies, one wake-up");
    int dispatches = 0;
    while (r.calls < 1000 && dispatches < 2000) {
        cr_assert(readable(p), "work left, but the fd went quiet");
        dispatch(p, 0);
        dispatches++;
    }
    cr_assert_eq(r.calls, 1000);
    nq_port_stats_t mid = pstats(p);
    cr_assert_leq(mid.efd_reads + mid.efd_writes - before.efd_writes, 1,
                  "%llu reads and %llu writes in %d dispatches with work left",
                  (unsigned long long)mid.efd_reads,
                  (unsigned long long)(mid.efd_writes - before.efd_writes), dispatches);
    dispatch(p, 0); /* nothing left: goes idle */
    cr_assert_not(readable(p));
    cr_assert_eq(pstats(p).efd_reads, 1);
    port_free(p);
    nq_queue_free(q);
}

/* The pre-idle spin backs off: with nothing arriving (here: nobody
 * notifies at all), it spins 4 times in a row, then once per 64 dispatches,
 * so a busy-polling caller or a one-CPU ping-pong does not pay it each
 * time. Nothing ever arrives, so it never catches anything. */
Test(port, the_pre_idle_spin_backs_off_when_it_catches_nothing) {
    setup();
    nq_port_t *p = new_port();
    for (int i = 0; i < 256; i++)
        cr_assert_eq(dispatch(p, 0), 0);
    nq_port_stats_t st = pstats(p);
    cr_assert_geq(st.idle_spins, 4, "it never spun");
    cr_assert_leq(st.idle_spins, 4 + 256 / 64, "%llu spins in 256 empty dispatches",
                  (unsigned long long)st.idle_spins);
    cr_assert_eq(st.idle_spin_hits, 0);
    port_free(p);
}

/* ... and it pays when a producer is in full flow on another thread: some
 * spin catches a notification (and the back-off lets it try again). */
struct flow {
    nq_queue_t *q;
    nq_handle_t h;
    atomic_int stop;
};

/* Pins the calling thread to one CPU (of two or more), so the producer and
 * the dispatcher do not share one when other work loads the machine (the
 * spin can only catch a producer that runs meanwhile). */
static void pin_to(int cpu) {
    if (sysconf(_SC_NPROCESSORS_ONLN) < 2)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    (void)pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void *flow_thread(void *a) {
    struct flow *f = a;
    pin_to(1);
    for (int64_t i = 0; !atomic_load_explicit(&f->stop, memory_order_relaxed); i++)
        nq_notify(f->q, f->h, i);
    return NULL;
}

Test(port, the_pre_idle_spin_catches_a_producer_in_full_flow, .timeout = 60) {
    setup();
    nq_queue_t *q = new_queue();
    nq_port_t *p = new_port();
    nq_handle_t h = reg(q);
    srec_t r = {0};
    r.per_call = 0; /* drain all: the evq empties, so each dispatch may spin */
    psub(p, q, h, 64, &r, NULL);
    struct flow f = {q, h, 0};
    pthread_t t;
    cpu_set_t was;
    cr_assert_eq(pthread_getaffinity_np(pthread_self(), sizeof(was), &was), 0);
    pin_to(0);
    cr_assert_eq(pthread_create(&t, NULL, flow_thread, &f), 0);
    int64_t end = now_ns() + 30 * SEC; /* ends at the first catch: ms when idle */
    while (pstats(p).idle_spin_hits == 0 && now_ns() < end)
        dispatch(p, 0);
    atomic_store(&f.stop, 1);
    cr_assert_eq(pthread_join(t, NULL), 0);
    (void)pthread_setaffinity_np(pthread_self(), sizeof(was), &was);
    nq_port_stats_t st = pstats(p);
#ifdef NQT_TSAN
    /* A timing property: under ThreadSanitizer a notify is ~10x slower
     * while a spin's pauses are not, and with other suites loading both
     * vCPUs no spin caught one in 30 s (56938 tries). The normal build
     * asserts it; here it is only reported. */
    cr_log_info("%llu spins, %llu caught a notification", (unsigned long long)st.idle_spins,
                (unsigned long long)st.idle_spin_hits);
#else
    cr_assert_gt(st.idle_spin_hits, 0, "%llu spins in 30 s of flow, none caught anything",
                 (unsigned long long)st.idle_spins);
#endif
    port_free(p);
    nq_queue_free(q);
}

/* A waker preempted between claiming its evq slot and storing its token
 * stalls the evq's head: dispatch can run nothing behind it. It must not
 * keep the fd readable for it (a level-triggered loop would spin until that
 * thread runs again); the stalled waker signals once it has stored. */
Test(port, a_stalled_waker_gets_the_signal_duty_and_the_loop_sleeps) {
    setup();
    nq_queue_t *q = new_queue();
    nq_port_t *p = new_port();
    nq_handle_t h = reg(q);
    wrec_t r = {0};
    pwait(p, q, h, 0, -1, &r, NULL); /* token 0 */
    nq_port_stats_t ps = pstats(p);
    uint32_t stalled = ps.max_items - 1; /* names no item: spurious when run */
    uint64_t pos;
    nq_evq_t *e = nq__port_evq(p);
    cr_assert_eq(nq__evq_claim_for_test(e, stalled, &pos), 1);
    cr_assert_eq(nq_notify(q, h, 7), 1); /* queued behind the stalled head */
    cr_assert(readable(p));
    cr_assert_eq(dispatch(p, 0), 0, "ran past a head that was not written");
    cr_assert_not(readable(p), "the fd stays readable for a stalled head: the loop spins");
    cr_assert_eq(dispatch(p, 0), 0);
    cr_assert_not(readable(p));
    uint64_t writes = pstats(p).efd_writes;
    /* The waker resumes: store, then its half of the signal. */
    nq__evq_publish_for_test(e, pos, stalled);
    nq__port_kick(p);
    cr_assert(readable(p), "the resumed waker did not signal");
    cr_assert_eq(pstats(p).efd_writes, writes + 1);
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(r.calls, 1);
    cr_assert_eq(r.arg, 7);
    cr_assert_not(readable(p));
    port_free(p);
    nq_queue_free(q);
}

/* The same race for real: a thread stalls 20 ms between claim and store
 * while the loop waits in epoll. The loop wakes a handful of times, not
 * thousands, and the wait behind the stalled head still completes. */
typedef struct stall_arg {
    nq_port_t *p;
    uint32_t token;
} stall_arg_t;

static void *stalling_waker(void *a) {
    stall_arg_t *sa = a;
    nq_evq_t *e = nq__port_evq(sa->p);
    uint64_t pos;
    if (nq__evq_claim_for_test(e, sa->token, &pos) == 1) {
        nq__port_kick(sa->p); /* some earlier waker's signal, say */
        sleep_ns(20 * MS);
        nq__evq_publish_for_test(e, pos, sa->token);
        nq__port_kick(sa->p);
    }
    return NULL;
}

Test(port, a_stalled_waker_costs_the_loop_no_busy_spin, .timeout = 30) {
    setup();
    nq_queue_t *q = new_queue();
    nq_port_t *p = new_port();
    nq_handle_t h = reg(q);
    wrec_t r = {0};
    pwait(p, q, h, 0, -1, &r, NULL);
    stall_arg_t sa = {p, pstats(p).max_items - 1};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, stalling_waker, &sa), 0);
    sleep_ns(2 * MS);
    cr_assert_eq(nq_notify(q, h, 9), 1); /* likely behind the stalled head */
    int wakeups = 0;
    int64_t end = now_ns() + 5 * SEC;
    while (r.calls == 0 && now_ns() < end) {
        struct pollfd pf = {nq_port_fd(p), POLLIN, 0};
        if (poll(&pf, 1, 1000) == 1) {
            wakeups++;
            dispatch(p, 0);
        }
    }
    pthread_join(t, NULL);
    cr_assert_eq(r.calls, 1, "the wait behind the stalled head never ran");
    cr_assert_leq(wakeups, 10, "%d loop wakeups during a 20 ms stall: the loop spun", wakeups);
    port_free(p);
    nq_queue_free(q);
}

/* --- cancel, release, unregister -------------------------------------------------- */

Test(port, cancelled_wait_gets_ecanceled_exactly_once) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q);
    nq_port_t *p = new_port();
    wrec_t r[3];
    memset(r, 0, sizeof(r));
    nq_wait_t *w[3];
    pwait(p, q, h, NQ_SEQ_NEXT, 50, &r[0], &w[0]); /* cancelled */
    pwait(p, q, h, NQ_SEQ_NEXT, -1, &r[1], &w[1]); /* released while pending */
    cr_assert_eq(nq_wait_cancel(w[0]), 0);
    cr_assert_eq(r[0].calls, 0, "the callback ran inside nq_wait_cancel");
    cr_assert_eq(nq_wait_cancel(w[0]), NQ_EALREADY, "a second cancel must lose");
    nq_wait_release(w[1]);
    cr_assert_eq(r[1].calls, 0, "the callback ran inside nq_wait_release");
    cr_assert_eq(nq_notify(q, h, 1), 0, "cancelled waits are no receivers");
    cr_assert(readable(p));
    cr_assert_eq(dispatch(p, 0), 2);
    cr_assert_eq(r[0].calls, 1);
    cr_assert_eq(r[0].status, NQ_ECANCELED);
    cr_assert_eq(r[0].arg, 0);
    cr_assert_eq(r[1].calls, 1);
    cr_assert_eq(r[1].status, NQ_ECANCELED);
    int64_t arg;
    cr_assert_eq(nq_wait_result(w[0], &arg), NQ_ECANCELED);
    sleep_ns(80 * MS); /* past the cancelled wait's timeout: no second callback */
    cr_assert_eq(dispatch(p, 0), 0);
    cr_assert_eq(r[0].calls, 1);
    cr_assert_eq(pstats(p).deadlines_expired, 0);
    nq_wait_release(w[0]);

    /* A cancel that loses to a notify says so; the callback has status 0. */
    pwait(p, q, h, NQ_SEQ_NEXT, -1, &r[2], &w[2]);
    nq_notify(q, h, 77);
    cr_assert_eq(nq_wait_cancel(w[2]), NQ_EALREADY);
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(r[2].calls, 1);
    cr_assert_eq(r[2].status, 0);
    cr_assert_eq(r[2].arg, 77);
    nq_wait_release(w[2]);
    cr_assert_eq(r[2].calls, 1);
    cr_assert_eq(qstats(q).live_waits, 0);
    cr_assert_eq(cb_outside, 0);
    port_free(p);
    nq_queue_free(q);
}

Test(port, unregister_completes_port_waits_with_eclosed) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q);
    nq_port_t *p = new_port();
    wrec_t r[2];
    memset(r, 0, sizeof(r));
    nq_wait_t *w = NULL;
    pwait(p, q, h, NQ_SEQ_NEXT, 10000, &r[0], &w); /* held, with a deadline */
    pwait(p, q, h, NQ_SEQ_NEXT, -1, &r[1], NULL);  /* owned by the port */
    srec_t s;
    memset(&s, 0, sizeof(s));
    psub(p, q, h, 8, &s, NULL);
    cr_assert_eq(nq_unregister(q, h), 0);
    cr_assert_eq(r[0].calls + r[1].calls + s.calls, 0, "callbacks ran inside nq_unregister");
    cr_assert(readable(p));
    cr_assert_eq(dispatch(p, 0), 3);
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(r[i].calls, 1);
        cr_assert_eq(r[i].status, NQ_ECLOSED, "wait %d: %s", i, nq_err_name(r[i].status));
    }
    cr_assert_eq(s.calls, 1, "an empty subscription is told of the close");
    cr_assert_eq(s.closed_seen, 1);
    cr_assert_eq(dispatch(p, 0), 0, "a closed, drained subscription was called again");
    cr_assert_eq(nq_port_timeout_ms(p), -1, "a closed wait kept its deadline");
    cr_assert_eq(pstats(p).deadlines, 0);
    cr_assert_eq(nq_wait_result(w, NULL), NQ_ECLOSED);
    nq_wait_release(w);
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, wcb, &r[0], NULL), NQ_EBADH);

    /* With args held: they come first, then NQ_ECLOSED in the same call. */
    h = reg(q);
    srec_t t;
    memset(&t, 0, sizeof(t));
    psub(p, q, h, 8, &t, NULL);
    nq_notify(q, h, 5);
    nq_notify(q, h, 6);
    cr_assert_eq(nq_unregister(q, h), 0);
    cr_assert_eq(dispatch(p, 0), 1);
    cr_assert_eq(t.ngot, 2);
    cr_assert_eq(t.got[0], 5);
    cr_assert_eq(t.got[1], 6);
    cr_assert_eq(t.closed_seen, 1);
    /* It saw NQ_ECLOSED already: one more "closed and drained" call is
     * allowed, then no more. */
    dispatch(p, 0);
    cr_assert_eq(dispatch(p, 0), 0, "a closed, drained subscription keeps being called");
    cr_assert_leq(t.calls, 2);
    cr_assert_eq(t.ngot, 2);
    cr_assert_eq(r[0].calls, 1);
    cr_assert_eq(r[1].calls, 1);
    cr_assert_eq(cb_outside, 0);
    port_free(p);
    nq_queue_free(q);
}

/* nq.h: a port subscription's callback is called "once after its handle was
 * unregistered and it is drained", so a callback that bounds its work still
 * learns of the close. Two ways the close can land after the callback last
 * looked: the callback drains with one bounded recv_batch a call, and the
 * unregister happens inside the callback itself (as from another thread
 * while it runs). */
Test(port, bounded_subscription_callback_learns_of_the_close) {
    setup();
    nq_queue_t *q = new_queue();
    nq_port_t *p = new_port();
    /* One recv_batch of 2 a call; 4 args held when the handle goes. */
    nq_handle_t h = reg(q);
    srec_t a;
    memset(&a, 0, sizeof(a));
    a.batch = 1;
    a.per_call = 2;
    psub(p, q, h, 8, &a, NULL);
    for (int i = 0; i < 4; i++)
        nq_notify(q, h, i);
    cr_assert_eq(nq_unregister(q, h), 0);
    for (int d = 0; d < 5; d++)
        dispatch(p, 0);
    cr_assert_eq(a.ngot, 4);
    cr_expect_eq(a.closed_seen, 1,
                 "a callback draining 2 a call was called %d times and never saw NQ_ECLOSED",
                 a.calls);
    port_free(p);
    nq_queue_free(q);
}

Test(port, subscription_callback_learns_of_a_close_made_while_it_runs) {
    setup();
    nq_queue_t *q = new_queue();
    nq_port_t *p = new_port();
    /* The callback drains everything, then the handle is unregistered while
     * it runs (here by the callback itself; the same as another thread's
     * nq_unregister landing after its last receive). */
    nq_handle_t h = reg(q);
    srec_t b;
    memset(&b, 0, sizeof(b));
    b.unreg_q = q;
    b.unreg_h = h;
    psub(p, q, h, 8, &b, NULL);
    nq_notify(q, h, 1);
    for (int d = 0; d < 5; d++)
        dispatch(p, 0);
    cr_assert_eq(b.ngot, 1);
    cr_expect_eq(b.closed_seen, 1,
                 "unregistered while its callback ran: called %d times, never with NQ_ECLOSED",
                 b.calls);
    port_free(p);
    nq_queue_free(q);
}

/* --- nq_port_free ------------------------------------------------------------------ */

Test(port, free_completes_pending_waits_with_ecanceled_once) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q), h2 = reg(q);
    nq_port_t *p = new_port();
    wrec_t r[4];
    memset(r, 0, sizeof(r));
    nq_wait_t *w0 = NULL, *w3 = NULL;
    pwait(p, q, h, NQ_SEQ_NEXT, -1, &r[0], &w0);   /* pending, held */
    pwait(p, q, h, NQ_SEQ_NEXT, 5000, &r[1], NULL); /* pending, with a deadline */
    pwait(p, q, h, NQ_SEQ_NEXT, -1, &r[2], NULL);   /* pending */
    pwait(p, q, h2, NQ_SEQ_NEXT, -1, &r[3], &w3);  /* completed, callback not yet run */
    srec_t so, sh;
    memset(&so, 0, sizeof(so));
    memset(&sh, 0, sizeof(sh));
    nq_sub_t *held = NULL;
    psub(p, q, h2, 8, &so, NULL);  /* owned: the port closes it */
    psub(p, q, h2, 8, &sh, &held); /* held: stops calling back */
    nq_notify(q, h2, 42);
    cr_assert_eq(qstats(q).live_subs, 2);
    port_free(p);
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(r[i].calls, 1, "wait %d: %d callbacks", i, r[i].calls);
        cr_assert_eq(r[i].where, WHERE_FREE);
        cr_assert_eq(r[i].tid, main_tid);
    }
    for (int i = 0; i < 3; i++)
        cr_assert_eq(r[i].status, NQ_ECANCELED, "wait %d: %s", i, nq_err_name(r[i].status));
    cr_assert_eq(r[3].status, 0, "a completed wait keeps its status");
    cr_assert_eq(r[3].arg, 42);
    cr_assert_eq(so.calls + sh.calls, 0, "nq_port_free called a subscription back");
    cr_assert_eq(nq_wait_result(w0, NULL), NQ_ECANCELED);
    nq_wait_release(w0);
    nq_wait_release(w3);
    cr_assert_eq(qstats(q).live_waits, 0);
    cr_assert_eq(qstats(q).live_subs, 1, "the owned subscription was not closed");
    /* The held subscription still works as a plain one. */
    cr_assert_eq(nq_notify(q, h2, 43), 1);
    int64_t arg;
    cr_assert_eq(nq_sub_try_recv(held, &arg), 0);
    cr_assert_eq(arg, 42);
    cr_assert_eq(nq_sub_try_recv(held, &arg), 0);
    cr_assert_eq(arg, 43);
    cr_assert_eq(so.calls + sh.calls, 0);
    nq_sub_close(held);
    cr_assert_eq(qstats(q).live_subs, 0);
    cr_assert_eq(nq_notify(q, h, 1), 0, "cancelled waits are no receivers");
    nq_queue_free(q);
}

Test(port, free_inside_a_wait_callback_is_deferred_until_dispatch_returns) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q), h2 = reg(q);
    nq_port_t *p = new_port();
    wrec_t r[4];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < 3; i++)
        pwait(p, q, h, NQ_SEQ_NEXT, -1, &r[i], NULL); /* all three notified */
    nq_wait_t *w3 = NULL;
    pwait(p, q, h2, NQ_SEQ_NEXT, 1, &r[3], &w3); /* pending (times out, or cancelled) */
    srec_t so, sh;
    memset(&so, 0, sizeof(so));
    memset(&sh, 0, sizeof(sh));
    nq_sub_t *held = NULL;
    psub(p, q, h, 8, &so, NULL);
    psub(p, q, h, 8, &sh, &held);
    for (int i = 0; i < 3; i++)
        r[i].free_port = p; /* whichever runs first frees the port */
    nq_notify(q, h, 5);
    dispatch(p, 0); /* ASan: nothing touches the port after it is freed */
    for (int i = 0; i < 4; i++)
        cr_assert_eq(r[i].calls, 1, "wait %d: %d callbacks", i, r[i].calls);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(r[i].status, 0);
        cr_assert_eq(r[i].arg, 5);
    }
    cr_assert(r[3].status == NQ_ECANCELED || r[3].status == NQ_ETIMEDOUT, "%s",
              nq_err_name(r[3].status));
    cr_assert_leq(so.calls, 1);
    cr_assert_leq(sh.calls, 1);
    nq_wait_release(w3);
    nq_sub_close(held);
    nq_stats_t st = qstats(q);
    cr_assert_eq(st.live_waits, 0);
    cr_assert_eq(st.live_subs, 0);
    nq_queue_free(q);
}

/* A callback that frees the port, then keeps using it the way callbacks may. */
static struct {
    nq_port_t *p;
    nq_queue_t *q;
    nq_handle_t h;
    int calls;
    int wait_rc;
    int dispatch_rc;
    wrec_t late;
} FR;

static void free_then_use_cb(nq_sub_t *s, void *data) {
    (void)data;
    FR.calls++;
    int64_t b[8];
    nq_sub_recv_batch(s, b, 8);
    nq_port_free(FR.p);
    nq_port_free(FR.p); /* twice: still deferred, still once */
    FR.dispatch_rc = nq_port_dispatch(FR.p, 0);
    FR.wait_rc = nq_port_wait(FR.p, FR.q, FR.h, NQ_SEQ_NEXT, -1, wcb, &FR.late, NULL);
    cr_assert(nq_port_timeout_ms(FR.p) >= -1);
}

Test(port, free_inside_a_subscription_callback_is_deferred) {
    setup();
    memset(&FR, 0, sizeof(FR));
    FR.q = new_queue();
    FR.h = reg(FR.q);
    FR.p = new_port();
    nq_sub_opts_t o = opts(8, NQ_DROP_NEWEST);
    cr_assert_eq(nq_port_subscribe(FR.p, FR.q, FR.h, &o, free_then_use_cb, NULL, NULL), 0);
    wrec_t r;
    memset(&r, 0, sizeof(r));
    pwait(FR.p, FR.q, FR.h, NQ_SEQ_NEXT, -1, &r, NULL);
    nq_notify(FR.q, FR.h, 1);
    dispatch(FR.p, 0);
    cr_assert_eq(FR.calls, 1);
    cr_assert_eq(FR.dispatch_rc, NQ_EBUSY);
    cr_assert_eq(r.calls, 1, "the other wait's callback: %d", r.calls);
    cr_assert_eq(r.status, 0);
    if (FR.wait_rc == 0) /* accepted on a closing port: then it must be called back once */
        cr_assert_eq(FR.late.calls, 1, "a wait started on a freed port got %d callbacks",
                     FR.late.calls);
    else
        cr_assert_eq(FR.late.calls, 0);
    nq_stats_t st = qstats(FR.q);
    cr_assert_eq(st.live_subs, 0);
    cr_assert_eq(st.live_waits, 0);
    nq_queue_free(FR.q);
}

Test(port, notifying_a_held_subscription_after_its_port_is_freed_is_safe) {
    setup();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q);
    nq_port_t *p = new_port();
    srec_t r;
    memset(&r, 0, sizeof(r));
    nq_sub_t *s = NULL;
    psub(p, q, h, 4, &r, &s);
    nq_notify(q, h, 1);
    port_free(p);
    struct notifier n;
    notify_from_thread(q, &h, 1, 10, 0, 1, &n); /* ASan: no port is touched */
    cr_assert_eq(r.calls, 0);
    int64_t b[8];
    cr_assert_eq(nq_sub_recv_batch(s, b, 8), 4);
    cr_assert_eq(nq_sub_dropped(s), 7);
    cr_assert_eq(nq_unregister(q, h), 0);
    cr_assert_eq(nq_sub_try_recv(s, NULL), NQ_ECLOSED);
    nq_sub_close(s);
    nq_queue_free(q);
}

/* --- invariant 4: every wait's callback runs exactly once ---------------------------- */

#define MIX_HANDLES 16

static struct {
    nq_queue_t *q;
    _Atomic nq_handle_t h[MIX_HANDLES];
    atomic_int stop;
    atomic_long notifies;
} MX;

static void *mix_notifier(void *a) {
    (void)a;
    unsigned i = 0;
    while (!atomic_load(&MX.stop)) {
        nq_handle_t h = atomic_load(&MX.h[i++ % MIX_HANDLES]);
        if (nq_notify(MX.q, h, (int64_t)i) >= 0)
            atomic_fetch_add(&MX.notifies, 1);
        if (i % 64 == 0)
            sched_yield();
    }
    return NULL;
}

static uint32_t rnd(uint64_t *x) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return (uint32_t)(*x >> 11);
}

Test(port, every_wait_callback_runs_exactly_once_under_a_random_mix, .timeout = 60) {
    setup();
    memset(&MX, 0, sizeof(MX));
    MX.q = new_queue();
    for (int i = 0; i < MIX_HANDLES; i++)
        atomic_store(&MX.h[i], reg(MX.q));
    nq_port_t *p = new_port();
    const int nw = SCALE(30000);
    /* + 1: a last wait, on a handle nobody notifies, cancelled for sure
     * (a cancel in the mix wins only when it beats its wait's completion). */
    wrec_t *r = calloc((size_t)nw + 1, sizeof(*r));
    nq_wait_t **held = calloc((size_t)nw + 1, sizeof(*held));
    int64_t *start = calloc((size_t)nw + 1, sizeof(*start));
    int64_t *tmo = calloc((size_t)nw + 1, sizeof(*tmo));
    cr_assert(r && held && start && tmo);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, mix_notifier, NULL), 0);
    uint64_t x = 88172645463325252ull;
    int started = 0, refused = 0, cancels = 0, releases = 0, unregs = 0;
    while (started < nw) {
        uint32_t op = rnd(&x) % 100;
        if (op < 60) {
            int i = started;
            int hi = (int)(rnd(&x) % MIX_HANDLES);
            nq_handle_t h = atomic_load(&MX.h[hi]);
            tmo[i] = (rnd(&x) % 3 == 0) ? -1 : (int64_t)(rnd(&x) % 4);
            int keep = rnd(&x) % 2;
            start[i] = now_ns();
            int rc = nq_port_wait(p, MX.q, h, rnd(&x) % 4 ? NQ_SEQ_NEXT : 0, tmo[i], wcb, &r[i],
                                  keep ? &held[i] : NULL);
            started++;
            if (rc != 0) {
                cr_assert_eq(rc, NQ_EBADH, "%s", nq_err_name(rc)); /* raced an unregister */
                r[i].calls = -1000;                                /* never called back */
                refused++;
            }
        } else if (op < 70 && started > 0) {
            int i = (int)(rnd(&x) % (uint32_t)started);
            if (held[i] != NULL) {
                if (rnd(&x) % 2) {
                    int rc = nq_wait_cancel(held[i]);
                    cr_assert(rc == 0 || rc == NQ_EALREADY);
                    cancels++;
                } else {
                    nq_wait_release(held[i]);
                    held[i] = NULL;
                    releases++;
                }
            }
        } else if (op < 72) {
            int hi = (int)(rnd(&x) % MIX_HANDLES);
            nq_handle_t old = atomic_load(&MX.h[hi]);
            atomic_store(&MX.h[hi], reg(MX.q));
            cr_assert_eq(nq_unregister(MX.q, old), 0);
            unregs++;
        } else {
            dispatch(p, rnd(&x) % 2 ? 0 : 1 + rnd(&x) % 16);
        }
    }
    {
        int i = started++;
        tmo[i] = -1;
        start[i] = now_ns();
        pwait(p, MX.q, reg(MX.q), NQ_SEQ_NEXT, -1, &r[i], &held[i]);
        cr_assert_eq(nq_wait_cancel(held[i]), 0, "a wait nobody notifies was not cancelled");
        cancels++;
    }
    atomic_store(&MX.stop, 1);
    cr_assert_eq(pthread_join(t, NULL), 0);
    for (int k = 0; k < 50; k++) {
        sleep_ns(1 * MS);
        dispatch(p, 0);
    }
    port_free(p); /* the rest: ECANCELED */
    int by_status[5] = {0};
    for (int i = 0; i < started; i++) {
        if (r[i].calls == -1000)
            continue;
        cr_assert_eq(r[i].calls, 1, "wait %d: %d callbacks", i, r[i].calls);
        int s = r[i].status;
        cr_assert(s == 0 || s == NQ_ETIMEDOUT || s == NQ_ECANCELED || s == NQ_ECLOSED, "wait %d: %s",
                  i, nq_err_name(s));
        by_status[s == 0 ? 0 : s == NQ_ETIMEDOUT ? 1 : s == NQ_ECANCELED ? 2 : 3]++;
        if (s == NQ_ETIMEDOUT) {
            cr_assert_geq(tmo[i], 0, "wait %d timed out without a timeout", i);
            cr_assert_geq(r[i].at - start[i], tmo[i] * MS, "wait %d timed out early", i);
        }
        if (held[i] != NULL) {
            int64_t arg = 0;
            int rs = nq_wait_result(held[i], &arg);
            cr_assert_eq(rs, s, "wait %d: result %s, callback %s", i, nq_err_name(rs),
                         nq_err_name(s));
            nq_wait_release(held[i]);
        }
    }
    cr_assert_eq(cb_outside, 0);
    cr_assert_gt(by_status[0], 0);
    cr_assert_gt(by_status[1], 0, "no wait timed out: the mix did not test timeouts");
    cr_assert_gt(by_status[2], 0);
    cr_assert_gt(by_status[3], 0);
    cr_log_info("port mix: %d waits (%d refused), %d ok, %d timed out, %d cancelled, %d closed; "
                "%d cancels, %d releases, %d unregisters, %ld notifies",
                started, refused, by_status[0], by_status[1], by_status[2], by_status[3], cancels,
                releases, unregs, atomic_load(&MX.notifies));
    nq_stats_t st = qstats(MX.q);
    cr_assert_eq(st.live_waits, 0);
    free(r);
    free(held);
    free(start);
    free(tmo);
    nq_queue_free(MX.q);
}
