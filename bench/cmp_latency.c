/* cmp_latency: workload d, ping-pong latency, libnq against what a libuv,
 * libev or plain-pthreads user writes today.
 *
 * A worker thread sends a ping carrying its sequence number; the responder
 * (an event loop's callback, or a second thread) sends the same number back;
 * the worker waits for that reply, checks it and sends the next ping. Each
 * round trip is timed with h_now_ns; the result line carries lat_p50_ns,
 * lat_p99_ns and lat_p999_ns of the round trip (one_way_p50_ns = p50 / 2,
 * for reading only) and ok = every reply matched its ping, nothing was
 * dropped and nothing failed. N round trips (20,000; --quick 2,000; --n N)
 * follow N/20 (20 .. 1,000) untimed warm-up round trips.
 *
 * Variants (workload ids):
 *   d_idle_same   d_idle_cross   the responder SLEEPS between pings (epoll_wait,
 *                                uv_run, ev_run, a futex or condvar): every
 *                                message is a real wake-up; the worker sleeps
 *                                for the reply too
 *   d_busy_same   d_busy_cross   both sides BUSY-POLL and never sleep
 *   same  = worker and responder pinned to CPU 0 (h_pin)
 *   cross = worker on CPU 0, responder on CPU 1 (ok=false "needs 2 CPUs" on
 *           a 1-CPU machine)
 * Pinning is required for meaningful numbers: on a 2-vCPU VM a wake-up that
 * crosses vCPUs costs ~60 us (the hypervisor must kick the idle vCPU) and one
 * on the same vCPU ~3 us (a context switch); unpinned, every run is a random
 * mix of the two. On the SAME CPU a pure spin never lets the other side run,
 * so every busy-poll loop of every contender calls sched_yield() on each
 * empty poll there (cross: a pause instruction).
 *
 * Contenders (ping -> responder, reply -> worker):
 *   nq_uv     nq_notify(A) -> port subscription on A, port attached to a uv
 *             loop by nq_uv_t; its callback drains A with nq_sub_try_recv and
 *             nq_notify(B) -> the worker's subscription on B (nq_sub_recv).
 *             Busy: the loop spins uv_run(UV_RUN_NOWAIT).
 *   nq_epoll  the same on a raw epoll loop (nq_epoll_add, epoll_wait with
 *             nq_epoll_timeout, nq_port_dispatch). Busy: the loop spins
 *             nq_port_dispatch(port, 0) without epoll_wait.
 *   nq_sub    no loop: a responder thread blocks on its subscription to A
 *             (nq_sub_recv), the worker on its subscription to B.
 *             Busy (all nq_*): the worker, and nq_sub's responder, spin on
 *             nq_sub_try_recv.
 *   uv_async  mutex queue + uv_async_send -> uv loop; reply through a mutex
 *             queue + condition variable (the worker has no loop).
 *             Busy: the loop spins uv_run(UV_RUN_NOWAIT), the worker spins
 *             on the reply queue (lock, look, unlock).
 *   ev_async  the same with libev (ev_async_send, ev_run; busy EVRUN_NOWAIT).
 *   eventfd   mutex queue + one eventfd write per message into an epoll loop;
 *             reply: mutex queue + a second eventfd the worker read()s.
 *             Busy: epoll_wait(0) spin on the loop, non-blocking read() spin
 *             on the worker.
 *   condvar   mutex + condition variable both ways (busy: both spin on the
 *             queue, lock/look/unlock; producers still signal).
 * Baselines, so the driver can compute the ratios its targets need:
 *   raw_cacheline (d_busy_* only)  two threads bouncing one atomic word: the
 *             floor of a busy-poll round trip.
 *   raw_eventfd (d_idle_* only)    two eventfds, epoll_wait + read on each
 *             side, the sequence number is the eventfd value: the floor of a
 *             sleeping round trip.
 *
 * Extra figures: sent / delivered (round trips timed / replies that
 * matched), lat_min_ns, lat_max_ns, lat_mean_ns, run_s; for nq_uv and
 * nq_epoll the port's own counters: syscalls_per_1M (eventfd reads + writes
 * per 1M notifications, two notifications per round trip) and
 * dispatches_per_rt. The port counts only reads that returned data: every
 * dispatch that finds nothing also makes a read() that fails with EAGAIN,
 * so in busy nq_epoll the real count is about dispatches_per_rt + 1 per
 * round trip (strace -f -c shows it).
 *
 * A watchdog ends a run that takes over 30 s with ok=false and a note.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <ev.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <uv.h>

#include <nq.h>
#include <nq/epoll.h>
#include <nq/uv.h>

#include "harness.h"

#define PROGRAM "cmp_latency"
#define WATCHDOG_S 30
#define STOP_ARG INT64_C(-1)                 /* the last message: the responder ends */
#define RAW_EFD_STOP ((uint64_t)1 << 40)     /* raw_eventfd's STOP (seqs stay below) */

static const char PAIRS[] =
    "d_idle_same nq_uv\nd_idle_same nq_epoll\nd_idle_same nq_sub\nd_idle_same uv_async\n"
    "d_idle_same ev_async\nd_idle_same eventfd\nd_idle_same condvar\nd_idle_same raw_eventfd\n"
    "d_idle_cross nq_uv\nd_idle_cross nq_epoll\nd_idle_cross nq_sub\nd_idle_cross uv_async\n"
    "d_idle_cross ev_async\nd_idle_cross eventfd\nd_idle_cross condvar\n"
    "d_idle_cross raw_eventfd\n"
    "d_busy_same nq_uv\nd_busy_same nq_epoll\nd_busy_same nq_sub\nd_busy_same uv_async\n"
    "d_busy_same ev_async\nd_busy_same eventfd\nd_busy_same condvar\n"
    "d_busy_same raw_cacheline\n"
    "d_busy_cross nq_uv\nd_busy_cross nq_epoll\nd_busy_cross nq_sub\nd_busy_cross uv_async\n"
    "d_busy_cross ev_async\nd_busy_cross eventfd\nd_busy_cross condvar\n"
    "d_busy_cross raw_cacheline\n";

/* --- the run's state ------------------------------------------------------ */

typedef struct contender {
    const char *name;
    int (*setup)(void);            /* main thread, before the threads: 0 or -1 (note set) */
    void *(*responder)(void *);    /* the loop / responder thread (pins itself first) */
    void (*send)(int64_t seq);     /* worker: ping seq (STOP_ARG: the last message) */
    int (*recv)(int64_t *seq);     /* worker: the reply; 0, or -1 (note set) */
    void (*teardown)(void);        /* main thread, after both threads joined */
    const char *how;               /* the note: how each side waits */
} contender_t;

static struct {
    const contender_t *c;
    int busy, same, yield;
    int resp_cpu;
    long n, warm;
    int64_t *lat;
    long matched, mismatched;
    pthread_barrier_t bar;
    atomic_int fail;      /* something failed: ok = false */
    atomic_int resp_dead; /* the responder never started its loop */
    atomic_int stop;      /* the responder saw STOP */
    atomic_int sent_last; /* the worker's STOP send has returned */
    char note[160];
    /* port counters (nq_uv, nq_epoll), taken on the loop thread */
    int have_pstats;
    nq_port_stats_t pstats;
} R;

static atomic_int printed; /* the one result line: main's or the watchdog's */
static h_opts_t opts;

static void fail_note(const char *what) {
    if (atomic_exchange(&R.fail, 1) == 0)
        snprintf(R.note, sizeof(R.note), "%s", what);
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

/* One empty poll of a busy loop: yield on the same CPU, pause across. */
static inline void spin_pause(void) {
    if (R.yield)
        sched_yield();
    else
        cpu_relax();
}

/* The responder's first steps: pin, then (after its own setup) meet the
 * worker. Returns 0, or -1 if it must not run its loop. */
static int resp_pin(void) {
    int rc = h_pin(R.resp_cpu);
    if (rc < 0) {
        fail_note(R.same ? "h_pin(0) failed (responder)" : "h_pin(1) failed (responder)");
        return -1;
    }
    return 0;
}

static void resp_ready(int ok) {
    if (!ok)
        atomic_store(&R.resp_dead, 1);
    pthread_barrier_wait(&R.bar);
}

/* A responder's start: pinned, then its readiness told; 0 when pinning
 * failed (the responder then returns at once). */
static int resp_start(void) {
    int ok = resp_pin() == 0;
    resp_ready(ok);
    return ok;
}

/* Before freeing what the worker's last send touches (a uv_async, an ev
 * loop, an fd): that send must have returned. */
static void resp_wait_sender(void) {
    while (!atomic_load(&R.sent_last))
        sched_yield();
}

/* --- a mutex queue (the peers' payload path) ----------------------------- */

#define MQ_CAP 64

typedef struct mq {
    pthread_mutex_t m;
    pthread_cond_t c;
    unsigned head, count;
    int64_t buf[MQ_CAP];
} mq_t;

static void mq_init(mq_t *q) {
    pthread_mutex_init(&q->m, NULL);
    pthread_cond_init(&q->c, NULL);
    q->head = q->count = 0;
}

static void mq_destroy(mq_t *q) {
    pthread_mutex_destroy(&q->m);
    pthread_cond_destroy(&q->c);
}

static void mq_push(mq_t *q, int64_t v, int signal) {
    pthread_mutex_lock(&q->m);
    if (q->count < MQ_CAP) {
        q->buf[(q->head + q->count) % MQ_CAP] = v;
        q->count++;
    } else {
        fail_note("mutex queue full");
    }
    if (signal)
        pthread_cond_signal(&q->c);
    pthread_mutex_unlock(&q->m);
}

static int mq_pop_locked(mq_t *q, int64_t *v) {
    if (q->count == 0)
        return -1;
    *v = q->buf[q->head];
    q->head = (q->head + 1) % MQ_CAP;
    q->count--;
    return 0;
}

static int mq_pop(mq_t *q, int64_t *v) {
    pthread_mutex_lock(&q->m);
    int rc = mq_pop_locked(q, v);
    pthread_mutex_unlock(&q->m);
    return rc;
}

static void mq_pop_wait(mq_t *q, int64_t *v) {
    pthread_mutex_lock(&q->m);
    while (mq_pop_locked(q, v) < 0)
        pthread_cond_wait(&q->c, &q->m);
    pthread_mutex_unlock(&q->m);
}

static mq_t ping_q, pong_q;

/* The reply path of uv_async, ev_async and condvar. */
static int mq_recv_pong(int64_t *v) {
    if (R.busy) {
        while (mq_pop(&pong_q, v) < 0)
            spin_pause();
    } else {
        mq_pop_wait(&pong_q, v);
    }
    return 0;
}

/* --- libnq: handle A carries pings, handle B replies ---------------------- */

static nq_queue_t *nq_q;
static nq_handle_t nq_a, nq_b;
static nq_sub_t *nq_sub_a, *nq_sub_b; /* the responder's on A, the worker's on B */
static nq_port_t *nq_port;
static nq_uv_t nq_uvh;
static uv_loop_t nq_uvloop;
static int nq_on_uv; /* the port is on nq_uvh (else on epoll) */

static int nq_setup(void) {
    nq_sub_opts_t o = {.capacity = 64, .overflow = NQ_DROP_NEWEST, .debug_hint = "worker"};
    if (nq_queue_new(NULL, &nq_q) < 0 || nq_register(nq_q, "ping", &nq_a) < 0 ||
        nq_register(nq_q, "pong", &nq_b) < 0 || nq_subscribe(nq_q, nq_b, &o, &nq_sub_b) < 0) {
        fail_note("libnq setup failed");
        return -1;
    }
    return 0;
}

static int nq_sub_setup(void) {
    if (nq_setup() < 0)
        return -1;
    nq_sub_opts_t o = {.capacity = 64, .overflow = NQ_DROP_NEWEST, .debug_hint = "responder"};
    if (nq_subscribe(nq_q, nq_a, &o, &nq_sub_a) < 0) {
        fail_note("nq_subscribe failed");
        return -1;
    }
    return 0;
}

static void nq_teardown(void) {
    if (nq_sub_b != NULL && nq_sub_dropped(nq_sub_b) != 0)
        fail_note("the worker subscription dropped replies");
    nq_sub_close(nq_sub_b);
    if (nq_port == NULL) /* nq_sub: the responder's subscription is ours to close */
        nq_sub_close(nq_sub_a);
    nq_queue_free(nq_q);
}

static void nq_send(int64_t seq) {
    if (nq_notify(nq_q, nq_a, seq) != 1)
        fail_note("nq_notify(ping) reached no subscription");
}

static int nq_recv(int64_t *seq) {
    int rc;
    if (R.busy) {
        while ((rc = nq_sub_try_recv(nq_sub_b, seq)) == NQ_EAGAIN)
            spin_pause();
    } else {
        rc = nq_sub_recv(nq_sub_b, -1, seq);
    }
    if (rc < 0) {
        fail_note("nq_sub_recv on the reply failed");
        return -1;
    }
    return 0;
}

/* The responder's work, shared: a ping in, the same number out. */
static void nq_reply(int64_t v) {
    if (v == STOP_ARG) {
        atomic_store(&R.stop, 1);
        return;
    }
    if (nq_notify(nq_q, nq_b, v) != 1)
        fail_note("nq_notify(reply) reached no subscription");
}

/* Port subscription callback (nq_uv, nq_epoll): drain A. */
static void nq_on_ping(nq_sub_t *s, void *data) {
    int64_t v;
    (void)data;
    while (nq_sub_try_recv(s, &v) == 0) {
        nq_reply(v);
        if (v == STOP_ARG && nq_on_uv)
            nq_uv_close(&nq_uvh, NULL); /* uv_run returns once it has closed */
    }
}

static int nq_port_sub_a(void) {
    nq_sub_opts_t o = {.capacity = 64, .overflow = NQ_DROP_NEWEST, .debug_hint = "loop"};
    return nq_port_subscribe(nq_port, nq_q, nq_a, &o, nq_on_ping, NULL, &nq_sub_a);
}

static void nq_port_finish(void) {
    R.have_pstats = nq_port_stats(nq_port, &R.pstats) == 0;
    if (nq_sub_dropped(nq_sub_a) != 0)
        fail_note("the loop subscription dropped pings");
    nq_sub_close(nq_sub_a); /* on the port's thread */
}

static void *nq_uv_main(void *arg) {
    (void)arg;
    nq_on_uv = 1;
    int ok = resp_pin() == 0 && uv_loop_init(&nq_uvloop) == 0;
    if (ok && (nq_port_new(&nq_port) < 0 || nq_uv_init(&nq_uvloop, &nq_uvh, nq_port) < 0 ||
               nq_port_sub_a() < 0)) {
        fail_note("nq_uv setup failed");
        ok = 0; /* (a half-made loop is left to the process exit) */
    }
    resp_ready(ok);
    if (!ok)
        return NULL;
    if (R.busy) {
        while (!atomic_load_explicit(&R.stop, memory_order_relaxed)) {
            uv_run(&nq_uvloop, UV_RUN_NOWAIT);
            spin_pause();
        }
    }
    uv_run(&nq_uvloop, UV_RUN_DEFAULT); /* idle: the whole run; busy: the close */
    resp_wait_sender();
    nq_port_finish();
    nq_port_free(nq_port);
    if (uv_loop_close(&nq_uvloop) != 0)
        fail_note("uv_loop_close: a handle is still open");
    return NULL;
}

static void *nq_epoll_main(void *arg) {
    (void)arg;
    int ep = -1;
    int ok = resp_pin() == 0;
    if (ok && ((ep = epoll_create1(EPOLL_CLOEXEC)) < 0 || nq_port_new(&nq_port) < 0 ||
               nq_epoll_add(ep, nq_port, 1) < 0 || nq_port_sub_a() < 0)) {
        fail_note("nq_epoll setup failed");
        ok = 0;
    }
    resp_ready(ok);
    if (!ok)
        return NULL;
    while (!atomic_load_explicit(&R.stop, memory_order_relaxed)) {
        if (R.busy) {
            if (nq_port_dispatch(nq_port, 0) == 0)
                spin_pause();
            continue;
        }
        struct epoll_event evs[4];
        int n = epoll_wait(ep, evs, 4, nq_epoll_timeout(nq_port, -1));
        if (n < 0 && errno != EINTR) {
            fail_note("epoll_wait failed");
            break;
        }
        if (n > 0 || nq_port_timeout_ms(nq_port) == 0)
            nq_port_dispatch(nq_port, 256);
    }
    resp_wait_sender();
    nq_port_finish();
    nq_epoll_del(ep, nq_port);
    nq_port_free(nq_port);
    close(ep);
    return NULL;
}

static void *nq_sub_main(void *arg) {
    (void)arg;
    if (!resp_start())
        return NULL;
    for (;;) {
        int64_t v;
        int rc;
        if (R.busy) {
            while ((rc = nq_sub_try_recv(nq_sub_a, &v)) == NQ_EAGAIN)
                spin_pause();
        } else {
            rc = nq_sub_recv(nq_sub_a, -1, &v);
        }
        if (rc < 0) {
            fail_note("nq_sub_recv on the ping failed");
            break;
        }
        nq_reply(v);
        if (v == STOP_ARG)
            break;
    }
    return NULL;
}

/* --- uv_async -------------------------------------------------------------- */

static uv_loop_t uvl;
static uv_async_t uva;

static void uva_on_async(uv_async_t *h) {
    int64_t v;
    while (mq_pop(&ping_q, &v) == 0) {
        if (v == STOP_ARG) {
            atomic_store(&R.stop, 1);
            uv_close((uv_handle_t *)h, NULL);
        } else {
            mq_push(&pong_q, v, 1);
        }
    }
}

static int mq_setup(void) {
    mq_init(&ping_q);
    mq_init(&pong_q);
    return 0;
}

static void mq_teardown(void) {
    mq_destroy(&ping_q);
    mq_destroy(&pong_q);
}

static void *uva_main(void *arg) {
    (void)arg;
    int ok = resp_pin() == 0;
    if (ok && (uv_loop_init(&uvl) != 0 || uv_async_init(&uvl, &uva, uva_on_async) != 0)) {
        fail_note("libuv setup failed");
        ok = 0;
    }
    resp_ready(ok);
    if (!ok)
        return NULL;
    if (R.busy) {
        while (!atomic_load_explicit(&R.stop, memory_order_relaxed)) {
            uv_run(&uvl, UV_RUN_NOWAIT);
            spin_pause();
        }
    }
    uv_run(&uvl, UV_RUN_DEFAULT); /* idle: the whole run; busy: the close */
    resp_wait_sender(); /* the loop's fd stays open while uv_async_send may run */
    if (uv_loop_close(&uvl) != 0)
        fail_note("uv_loop_close: a handle is still open");
    return NULL;
}

static void uva_send(int64_t seq) {
    mq_push(&ping_q, seq, 0);
    uv_async_send(&uva);
}

/* --- ev_async -------------------------------------------------------------- */

static struct ev_loop *evl;
static ev_async eva;

static void eva_on_async(struct ev_loop *loop, ev_async *w, int revents) {
    int64_t v;
    (void)revents;
    while (mq_pop(&ping_q, &v) == 0) {
        if (v == STOP_ARG) {
            atomic_store(&R.stop, 1);
            ev_async_stop(loop, w);
            ev_break(loop, EVBREAK_ALL);
        } else {
            mq_push(&pong_q, v, 1);
        }
    }
}

static int eva_setup(void) {
    mq_setup();
    /* Made here, so the worker's first ev_async_send finds it; run on the
     * responder thread only. */
    evl = ev_loop_new(EVBACKEND_EPOLL);
    if (evl == NULL) {
        fail_note("ev_loop_new failed");
        return -1;
    }
    ev_async_init(&eva, eva_on_async);
    ev_async_start(evl, &eva);
    return 0;
}

static void *eva_main(void *arg) {
    (void)arg;
    if (!resp_start())
        return NULL;
    if (R.busy) {
        while (!atomic_load_explicit(&R.stop, memory_order_relaxed)) {
            ev_run(evl, EVRUN_NOWAIT);
            spin_pause();
        }
    } else {
        ev_run(evl, 0);
    }
    resp_wait_sender();
    ev_loop_destroy(evl);
    return NULL;
}

static void eva_send(int64_t seq) {
    mq_push(&ping_q, seq, 0);
    ev_async_send(evl, &eva);
}

/* --- eventfd --------------------------------------------------------------- */

static int efd_ping = -1, efd_pong = -1, ep_loop = -1, ep_worker = -1;

static void efd_write(int fd, uint64_t v) {
    if (write(fd, &v, sizeof(v)) != (ssize_t)sizeof(v))
        fail_note("eventfd write failed");
}

static int efd_setup(void) {
    mq_setup();
    efd_ping = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    /* The worker read()s the reply: blocking when idle, spinning when busy. */
    efd_pong = eventfd(0, EFD_CLOEXEC | (R.busy ? EFD_NONBLOCK : 0));
    ep_loop = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = 1;
    if (efd_ping < 0 || efd_pong < 0 || ep_loop < 0 ||
        epoll_ctl(ep_loop, EPOLL_CTL_ADD, efd_ping, &ev) < 0) {
        fail_note("eventfd setup failed");
        return -1;
    }
    return 0;
}

static void efd_teardown(void) {
    close(efd_ping);
    close(efd_pong);
    close(ep_loop);
    if (ep_worker >= 0)
        close(ep_worker);
    mq_teardown();
}

static void *efd_main(void *arg) {
    (void)arg;
    if (!resp_start())
        return NULL;
    while (!atomic_load_explicit(&R.stop, memory_order_relaxed)) {
        struct epoll_event evs[4];
        int n = epoll_wait(ep_loop, evs, 4, R.busy ? 0 : -1);
        if (n < 0 && errno != EINTR) {
            fail_note("epoll_wait failed");
            break;
        }
        if (n <= 0) {
            if (R.busy)
                spin_pause();
            continue;
        }
        uint64_t c;
        if (read(efd_ping, &c, sizeof(c)) != (ssize_t)sizeof(c))
            continue; /* nothing (spurious) */
        int64_t v;
        while (mq_pop(&ping_q, &v) == 0) {
            if (v == STOP_ARG) {
                atomic_store(&R.stop, 1);
            } else {
                mq_push(&pong_q, v, 0);
                efd_write(efd_pong, 1);
            }
        }
    }
    resp_wait_sender();
    return NULL;
}

static void efd_send(int64_t seq) {
    mq_push(&ping_q, seq, 0);
    efd_write(efd_ping, 1);
}

static int efd_recv(int64_t *seq) {
    uint64_t c;
    for (;;) {
        ssize_t r = read(efd_pong, &c, sizeof(c));
        if (r == (ssize_t)sizeof(c))
            break;
        if (r < 0 && errno == EAGAIN)
            spin_pause(); /* busy: non-blocking */
        else if (!(r < 0 && errno == EINTR)) {
            fail_note("eventfd read failed");
            return -1;
        }
    }
    if (mq_pop(&pong_q, seq) < 0) {
        fail_note("eventfd: readable but no reply queued");
        return -1;
    }
    return 0;
}

/* --- condvar ---------------------------------------------------------------- */

static void *cv_main(void *arg) {
    (void)arg;
    if (!resp_start())
        return NULL;
    for (;;) {
        int64_t v;
        if (R.busy) {
            while (mq_pop(&ping_q, &v) < 0)
                spin_pause();
        } else {
            mq_pop_wait(&ping_q, &v);
        }
        if (v == STOP_ARG)
            break;
        mq_push(&pong_q, v, 1);
    }
    atomic_store(&R.stop, 1);
    return NULL;
}

static void cv_send(int64_t seq) {
    mq_push(&ping_q, seq, 1);
}

/* --- raw_eventfd: the sleeping floor ------------------------------------------ */

static int raw_efd_setup(void) {
    efd_ping = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    efd_pong = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    ep_loop = epoll_create1(EPOLL_CLOEXEC);
    ep_worker = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN};
    if (efd_ping < 0 || efd_pong < 0 || ep_loop < 0 || ep_worker < 0 ||
        epoll_ctl(ep_loop, EPOLL_CTL_ADD, efd_ping, &ev) < 0 ||
        epoll_ctl(ep_worker, EPOLL_CTL_ADD, efd_pong, &ev) < 0) {
        fail_note("raw_eventfd setup failed");
        return -1;
    }
    mq_setup(); /* unused; efd_teardown destroys it */
    return 0;
}

/* epoll_wait on ep, then read fd: the value written (one message in flight).
 * -1 (noted) when epoll_wait fails. */
static int raw_efd_take(int ep, int fd, uint64_t *v) {
    for (;;) {
        struct epoll_event ev;
        int n = epoll_wait(ep, &ev, 1, -1);
        if (n < 0 && errno != EINTR) {
            fail_note("epoll_wait failed");
            return -1;
        }
        if (n > 0 && read(fd, v, sizeof(*v)) == (ssize_t)sizeof(*v))
            return 0;
    }
}

static void *raw_efd_main(void *arg) {
    (void)arg;
    if (!resp_start())
        return NULL;
    for (;;) {
        uint64_t v;
        if (raw_efd_take(ep_loop, efd_ping, &v) < 0)
            break;
        if (v == RAW_EFD_STOP)
            break;
        efd_write(efd_pong, v);
    }
    atomic_store(&R.stop, 1);
    return NULL;
}

static void raw_efd_send(int64_t seq) {
    efd_write(efd_ping, seq == STOP_ARG ? RAW_EFD_STOP : (uint64_t)seq);
}

static int raw_efd_recv(int64_t *seq) {
    uint64_t v;
    if (raw_efd_take(ep_worker, efd_pong, &v) < 0)
        return -1;
    *seq = (int64_t)v;
    return 0;
}

/* --- raw_cacheline: the busy floor --------------------------------------------- */

/* Odd: a ping (2 seq - 1) waits; even: the reply (2 seq). UINT64_MAX: stop. */
static struct {
    _Alignas(64) _Atomic uint64_t v;
    char pad[64 - sizeof(uint64_t)]; /* alone on its cache line */
} cell_line;
#define cell cell_line.v

static int raw_cl_setup(void) {
    atomic_init(&cell, 0);
    return 0;
}

static void raw_cl_teardown(void) {}

static void *raw_cl_main(void *arg) {
    (void)arg;
    if (!resp_start())
        return NULL;
    for (;;) {
        uint64_t v = atomic_load_explicit(&cell, memory_order_acquire);
        if ((v & 1) == 0) {
            spin_pause();
            continue;
        }
        if (v == UINT64_MAX)
            break;
        atomic_store_explicit(&cell, v + 1, memory_order_release);
    }
    atomic_store(&R.stop, 1);
    return NULL;
}

static void raw_cl_send(int64_t seq) {
    atomic_store_explicit(&cell, seq == STOP_ARG ? UINT64_MAX : 2 * (uint64_t)seq - 1,
                          memory_order_release);
}

static int raw_cl_recv(int64_t *seq) {
    uint64_t v;
    while ((v = atomic_load_explicit(&cell, memory_order_acquire)) & 1)
        spin_pause();
    *seq = (int64_t)(v / 2);
    return 0;
}

/* --- the table ------------------------------------------------------------------ */

static const contender_t CONTENDERS[] = {
    {"nq_uv", nq_setup, nq_uv_main, nq_send, nq_recv, nq_teardown,
     "nq_uv port sub, worker nq_sub_recv"},
    {"nq_epoll", nq_setup, nq_epoll_main, nq_send, nq_recv, nq_teardown,
     "epoll + nq_port_dispatch, worker nq_sub_recv"},
    {"nq_sub", nq_sub_setup, nq_sub_main, nq_send, nq_recv, nq_teardown,
     "both threads on nq subscriptions"},
    {"uv_async", mq_setup, uva_main, uva_send, mq_recv_pong, mq_teardown,
     "mutex queue + uv_async_send, reply mutex + condvar"},
    {"ev_async", eva_setup, eva_main, eva_send, mq_recv_pong, mq_teardown,
     "mutex queue + ev_async_send, reply mutex + condvar"},
    {"eventfd", efd_setup, efd_main, efd_send, efd_recv, efd_teardown,
     "mutex queue + eventfd into epoll, reply mutex queue + eventfd"},
    {"condvar", mq_setup, cv_main, cv_send, mq_recv_pong, mq_teardown,
     "mutex + condvar both ways"},
    {"raw_eventfd", raw_efd_setup, raw_efd_main, raw_efd_send, raw_efd_recv, efd_teardown,
     "baseline: eventfd + epoll_wait each side"},
    {"raw_cacheline", raw_cl_setup, raw_cl_main, raw_cl_send, raw_cl_recv, raw_cl_teardown,
     "baseline: one atomic word bounced"},
};

/* --- the worker: the timed ping-pong --------------------------------------------- */

static void *worker_main(void *arg) {
    (void)arg;
    const contender_t *c = R.c;
    if (h_pin(0) < 0)
        fail_note("h_pin(0) failed (worker)");
    pthread_barrier_wait(&R.bar);
    if (atomic_load(&R.resp_dead)) {
        atomic_store(&R.sent_last, 1);
        return NULL;
    }
    long total = R.warm + R.n, matched = 0, mismatched = 0; /* locals: no line shared */
    for (long i = 0; i < total && !atomic_load_explicit(&R.fail, memory_order_relaxed); i++) {
        int64_t seq = i + 1, got = 0;
        int64_t t0 = h_now_ns();
        c->send(seq);
        if (c->recv(&got) < 0)
            break;
        int64_t t1 = h_now_ns();
        if (got == seq)
            matched++;
        else
            mismatched++;
        if (i >= R.warm)
            R.lat[i - R.warm] = t1 - t0;
    }
    c->send(STOP_ARG);
    R.matched = matched, R.mismatched = mismatched;
    atomic_store(&R.sent_last, 1);
    return NULL;
}

static void *watchdog_main(void *arg) {
    struct timespec ts;
    (void)arg;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += WATCHDOG_S;
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
    if (atomic_exchange(&printed, 1) == 0) {
        h_result_t r;
        h_begin(&r, PROGRAM, &opts);
        h_end(&r, 0, "watchdog: the run exceeded 30 s");
        _exit(1);
    }
    return NULL;
}

static int pair_listed(const char *w, const char *c) {
    char line[96];
    snprintf(line, sizeof(line), "%s %s\n", w, c);
    const char *p = PAIRS;
    size_t k = strlen(line);
    for (;;) {
        if (strncmp(p, line, k) == 0)
            return 1;
        p = strchr(p, '\n');
        if (p == NULL || *++p == '\0')
            return 0;
    }
}

static int finish(h_result_t *r, int ok, const char *note) {
    if (atomic_exchange(&printed, 1) != 0)
        for (;;)
            pause(); /* the watchdog is printing and exiting */
    return h_end(r, ok, note);
}

int main(int argc, char **argv) {
    opts = h_parse(argc, argv, PAIRS);
    if (!pair_listed(opts.workload, opts.contender)) {
        fprintf(stderr, "%s: no pair (%s, %s)\n", argv[0], opts.workload, opts.contender);
        h_usage(argv[0], PAIRS);
        return 2;
    }
    for (size_t i = 0; i < sizeof(CONTENDERS) / sizeof(CONTENDERS[0]); i++)
        if (strcmp(CONTENDERS[i].name, opts.contender) == 0)
            R.c = &CONTENDERS[i];
    R.busy = strncmp(opts.workload, "d_busy", 6) == 0;
    R.same = strstr(opts.workload, "_same") != NULL;
    R.yield = R.busy && R.same;
    R.resp_cpu = R.same ? 0 : 1;
    R.n = opts.n > 0 ? opts.n : opts.quick ? 2000 : 20000;
    R.warm = R.n / 20 < 20 ? 20 : R.n / 20 > 1000 ? 1000 : R.n / 20;

    h_result_t res;
    h_begin(&res, PROGRAM, &opts);
    h_int(&res, "worker_cpu", 0);
    h_int(&res, "loop_cpu", R.resp_cpu);
    if (!R.same && h_ncpus() < 2)
        return finish(&res, 0, "needs 2 CPUs");

    pthread_t wd, worker, resp;
    if (pthread_create(&wd, NULL, watchdog_main, NULL) != 0)
        return finish(&res, 0, "pthread_create failed");
    pthread_detach(wd);

    R.lat = calloc((size_t)R.n, sizeof(int64_t));
    if (R.lat == NULL)
        return finish(&res, 0, "out of memory");
    if (R.c->setup() < 0)
        return finish(&res, 0, R.note);
    pthread_barrier_init(&R.bar, NULL, 2);
    int64_t t0 = h_now_ns();
    if (pthread_create(&resp, NULL, R.c->responder, NULL) != 0 ||
        pthread_create(&worker, NULL, worker_main, NULL) != 0)
        return finish(&res, 0, "pthread_create failed");
    pthread_join(worker, NULL);
    pthread_join(resp, NULL);
    double run_s = (double)(h_now_ns() - t0) / 1e9;
    R.c->teardown();
    pthread_barrier_destroy(&R.bar);

    long total = R.warm + R.n;
    int ok = !atomic_load(&R.fail) && R.mismatched == 0 && R.matched == total;
    if (!atomic_load(&R.fail) && !ok)
        snprintf(R.note, sizeof(R.note), "%ld of %ld replies matched their ping", R.matched,
                 total);
    long timed = R.matched + R.mismatched - R.warm; /* round trips timed */
    if (timed < 0)
        timed = 0;
    if (timed > R.n)
        timed = R.n;
    int64_t sum = 0, mn = INT64_MAX, mx = 0;
    for (long i = 0; i < timed; i++) {
        sum += R.lat[i];
        mn = R.lat[i] < mn ? R.lat[i] : mn;
        mx = R.lat[i] > mx ? R.lat[i] : mx;
    }
    int64_t p50 = h_percentile(R.lat, (size_t)timed, 0.50);
    int64_t p99 = h_percentile(R.lat, (size_t)timed, 0.99);
    int64_t p999 = h_percentile(R.lat, (size_t)timed, 0.999);
    h_int(&res, "sent", timed);
    h_int(&res, "delivered", R.matched - (R.matched > R.warm ? R.warm : R.matched));
    h_int(&res, "dropped", 0);
    h_int(&res, "lat_p50_ns", p50);
    h_int(&res, "lat_p99_ns", p99);
    h_int(&res, "lat_p999_ns", p999);
    h_int(&res, "one_way_p50_ns", p50 / 2);
    h_int(&res, "lat_min_ns", timed > 0 ? mn : 0);
    h_int(&res, "lat_max_ns", mx);
    h_num(&res, "lat_mean_ns", timed > 0 ? (double)sum / (double)timed : 0.0);
    h_num(&res, "run_s", run_s);
    if (R.have_pstats && total > 0) {
        double notifies = 2.0 * (double)(total + 1); /* pings + replies + STOP */
        h_num(&res, "syscalls_per_1M",
              (double)(R.pstats.efd_writes + R.pstats.efd_reads) * 1e6 / notifies);
        h_num(&res, "dispatches_per_rt", (double)R.pstats.dispatches / (double)total);
    }
    char note[256];
    snprintf(note, sizeof(note), "%s%s%s; %s, %s", ok ? "" : R.note, ok ? "" : "; ", R.c->how,
             R.busy ? (R.yield ? "busy-poll with sched_yield" : "busy-poll") : "sleeping",
             R.same ? "both on CPU 0" : "worker CPU 0, loop CPU 1");
    free(R.lat);
    return finish(&res, ok, note);
}
