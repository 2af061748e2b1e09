/* Criterion suite "adapter_epoll": libnq's epoll adapter (<nq/epoll.h>) in a
 * raw epoll loop written the way the header's sketch shows: epoll_wait with
 * nq_epoll_timeout, then nq_port_dispatch when the port's tag fired or
 * nq_port_timeout_ms() says a deadline is due.
 *
 * Covers: 100k notifies from four threads reaching port subscriptions and
 * re-armed port waits on the loop thread only, each exactly once and in each
 * producer's order (received + dropped == sent); port-wait timeouts within
 * 20 ms of their deadline, also for a wait added from a callback with an
 * earlier deadline (the loop recomputes its timeout each iteration) and while
 * another fd in the set keeps epoll_wait returning early; nq_epoll_del while
 * producers notify (no dispatch afterwards, the fd leaves the set) and from
 * inside a port callback (that dispatch stops; adding the port again resumes
 * it); the argument and state checks (double add and del, bad epoll fds that
 * leave the port unattached, a port in a set cannot be attached elsewhere,
 * nq_epoll_timeout's arithmetic); level-triggered readiness while a budget
 * leaves work; fairness under a flood (a timerfd in the same set keeps being
 * served, every dispatch keeps to its budget); and at most one eventfd write
 * per dispatch cycle under load.
 *
 * Timing: a timeout is never early; "within 20 ms" must hold for each wait in
 * at least one of up to five rounds, since a busy machine can deschedule the
 * loop thread for longer (a deadline the loop ignores is late in every
 * round). The fairness test starts with a backlog larger than the loop can
 * drain, so it does not depend on how often the producers get the CPU.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "nq.h"
#include "nq/epoll.h"
#include "nqtest.h"

#define ADAPTER_HINT "adapter-epoll"
#define ADAPTER_STRESS
#define ADAPTER_TIMEOUTS
#include "adapter_common.h"

/* epoll tags: the port's and the test's other fds. */
enum { TAG_NQ = 0x6e71, TAG_TIMER, TAG_BUSY };

/* --- helpers ------------------------------------------------------------ */

static int new_epfd(void) {
    int fd = epoll_create1(EPOLL_CLOEXEC);
    cr_assert_geq(fd, 0, "epoll_create1: %s", strerror(errno));
    return fd;
}

/* A timerfd firing after first_ms, then every interval_ms (0: once). */
static int new_timerfd(int64_t first_ms, int64_t interval_ms) {
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    cr_assert_geq(fd, 0);
    struct itimerspec its;
    memset(&its, 0, sizeof(its));
    its.it_value.tv_sec = (time_t)(first_ms / 1000);
    its.it_value.tv_nsec = (long)(first_ms % 1000) * 1000000;
    its.it_interval.tv_sec = (time_t)(interval_ms / 1000);
    its.it_interval.tv_nsec = (long)(interval_ms % 1000) * 1000000;
    cr_assert_eq(timerfd_settime(fd, 0, &its, NULL), 0);
    return fd;
}

static void drain_fd(int fd) {
    uint64_t v;
    while (read(fd, &v, sizeof(v)) == (ssize_t)sizeof(v)) {
    }
}

/* Is fd in the epoll set? EPOLL_CTL_MOD says ENOENT when it is not. */
static int in_set(int epfd, int fd) {
    struct epoll_event ev = {.events = EPOLLIN};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev) == 0)
        return 1;
    cr_assert_eq(errno, ENOENT, "epoll_ctl MOD: %s", strerror(errno));
    return 0;
}

/* --- the loop: <nq/epoll.h>'s sketch, with counters ---------------------- */

typedef struct eloop eloop_t;
struct eloop {
    int epfd;
    nq_port_t *p;
    unsigned budget;
    int dispatching; /* 0 once the test took the port out (nq_epoll_del) */
    int stop;        /* set by a callback: leave after this iteration */
    int64_t give_up; /* now_ns() past which the loop leaves and says so */
    int gave_up;
    void (*on_fd)(eloop_t *l, uint64_t tag); /* the test's other fds */
    long iterations, nq_events, dispatches, ran, max_ran, at_budget;
    long nq_events_out; /* the port's tag from an epoll_wait begun after the del */
};

static eloop_t E; /* the loop of the running test (callbacks reach it here) */

static void eloop_init(nq_port_t *p, unsigned budget) {
    memset(&E, 0, sizeof(E));
    E.epfd = new_epfd();
    E.p = p;
    E.budget = budget;
    E.dispatching = 1;
    int rc = nq_epoll_add(E.epfd, p, TAG_NQ);
    cr_assert_eq(rc, 0, "nq_epoll_add: %s", nq_err_name(rc));
}

static void eloop_watch(int fd, uint64_t tag) {
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = tag;
    cr_assert_eq(epoll_ctl(E.epfd, EPOLL_CTL_ADD, fd, &ev), 0);
}

static void eloop_run(int64_t give_up_ns) {
    struct epoll_event evs[16];
    E.stop = 0;
    E.give_up = now_ns() + give_up_ns;
    while (!E.stop) {
        if (now_ns() > E.give_up) {
            E.gave_up = 1;
            break;
        }
        int out = !E.dispatching;
        /* A 1 s timeout of the loop's own keeps the give-up check going. */
        int n = epoll_wait(E.epfd, evs, 16, nq_epoll_timeout(E.p, 1000));
        if (n < 0) {
            cr_assert_eq(errno, EINTR, "epoll_wait: %s", strerror(errno));
            continue;
        }
        E.iterations++;
        int nq_ready = nq_port_timeout_ms(E.p) == 0; /* a deadline is due */
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 == TAG_NQ) {
                nq_ready = 1;
                E.nq_events++;
                E.nq_events_out += out;
            } else if (E.on_fd != NULL) {
                E.on_fd(&E, evs[i].data.u64);
            }
        }
        if (nq_ready && E.dispatching) {
            int ran = nq_port_dispatch(E.p, E.budget);
            cr_assert_geq(ran, 0, "nq_port_dispatch: %s", nq_err_name(ran));
            E.dispatches++;
            E.ran += ran;
            if (ran > E.max_ran)
                E.max_ran = ran;
            if (E.budget != 0 && ran == (int)E.budget)
                E.at_budget++;
        }
    }
}

static void eloop_close(void) {
    cr_assert_eq(close(E.epfd), 0);
    E.epfd = -1;
}

/* --- 1. 100k notifies from four threads --------------------------------- */

/* adapter_common.h's stress callbacks end the run with this. */
static void stress_stop_loop(void) {
    E.stop = 1;
}

Test(adapter_epoll, notifies_from_four_threads_run_on_the_loop_thread_once_each_in_order,
     .timeout = 60) {
    const int64_t per = SCALE(100000) / NPROD;
    const int64_t total = per * NPROD;
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "stress");
    nq_port_t *p = new_port();
    eloop_init(p, 256);

    /* stress_arm's 5 s wait chain keeps a deadline in the loop's epoll_wait
     * timeout. */
    nq_sub_t *held = stress_arm(p, q, h, total);

    prod_t pr;
    prod_start(&pr, q, h, NPROD, per);
    eloop_run(30 * SEC);
    int64_t sent = prod_join(&pr);

    cr_assert_not(E.gave_up, "the loop did not see every notification in 30 s");
    cr_assert_eq(sent, total);
    nq_port_stats_t st = stress_check(p, held, total);
    cr_assert_eq(E.ran, (long)st.callbacks, "every callback ran inside the loop's dispatch");
    cr_assert_eq(st.dispatches, (uint64_t)E.dispatches);
    cr_assert_leq(E.max_ran, 256, "the budget held");

    nq_sub_close(held);
    cr_assert_eq(nq_epoll_del(E.epfd, p), 0);
    eloop_close();
    nq_port_free(p);
    nq_queue_free(q);
}

/* --- 2. timeouts ---------------------------------------------------------- */

/* adapter_common.h's t_cb ends the run with this. */
static void timeout_stop_loop(void) {
    E.stop = 1;
}

static void t_setup(void) {
    t_open();
    eloop_init(t_port, 64);
}

static void t_teardown(void) {
    cr_assert_eq(nq_epoll_del(E.epfd, t_port), 0);
    eloop_close();
    nq_port_free(t_port);
    nq_queue_free(t_q);
}

Test(adapter_epoll, waits_of_30_50_100_ms_time_out_within_20_ms, .timeout = 30) {
    int ok[3] = {0, 0, 0}; /* each timeout on time in some round */
    for (int round = 0; round < ROUNDS && !(ok[0] && ok[1] && ok[2]); round++) {
        t_setup();
        trec_t r[3] = {{.timeout_ms = 100}, {.timeout_ms = 50}, {.timeout_ms = 30}};
        for (int i = 0; i < 3; i++)
            t_start(&r[i]);
        cr_assert_eq(t_errors, 0);
        eloop_run(5 * SEC);
        cr_assert_not(E.gave_up);
        cr_assert_eq(t_pending, 0);
        /* Nothing notified: the deadlines were served through
         * nq_port_timeout_ms() == 0, and expiring them did not make the
         * port's fd readable (no callback was pending). */
        cr_assert_eq(E.nq_events, 0, "%ld spurious wakeups by the port's fd", E.nq_events);
        ok[0] |= t_on_time(&r[0], "100 ms");
        ok[1] |= t_on_time(&r[1], "50 ms");
        ok[2] |= t_on_time(&r[2], "30 ms");
        nq_port_stats_t st = pstats(t_port);
        cr_assert_eq(st.deadlines_expired, 3);
        cr_assert_eq(st.deadlines, 0);
        t_teardown();
    }
    cr_assert(ok[0] && ok[1] && ok[2], "a timeout fired late in each of %d rounds", ROUNDS);
}

/* A port callback (kick) and another fd's handler (a one-shot timerfd) each
 * add a wait whose deadline is earlier than the loop's current timeout. */
static trec_t e_rec[3]; /* 100 ms from the start, 30 ms from kick, 30 ms from the timerfd */
static int e_kicks, e_timerfd, e_timer_fired;

static void e_kick_cb(void *data, int status, int64_t arg) {
    (void)data;
    (void)arg;
    e_kicks++;
    if (status != 0)
        t_errors++;
    t_start(&e_rec[1]); /* deadline ~30 ms: the earliest so far was ~100 ms */
}

static void e_on_fd(eloop_t *l, uint64_t tag) {
    (void)l;
    if (tag != TAG_TIMER) {
        t_errors++;
        return;
    }
    drain_fd(e_timerfd);
    e_timer_fired++;
    /* At ~40 ms: the 30 ms wait has expired, the next deadline is ~100 ms;
     * this one is due at ~70 ms. */
    t_start(&e_rec[2]);
}

Test(adapter_epoll, a_wait_added_in_a_callback_with_an_earlier_deadline_is_waited_for,
     .timeout = 30) {
    int ok[3] = {0, 0, 0}; /* each timeout on time in some round */
    for (int round = 0; round < ROUNDS && !(ok[0] && ok[1] && ok[2]); round++) {
        t_setup();
        E.on_fd = e_on_fd;
        memset(e_rec, 0, sizeof(e_rec));
        e_kicks = e_timer_fired = 0;
        e_rec[0].timeout_ms = 100;
        e_rec[1].timeout_ms = 30;
        e_rec[2].timeout_ms = 30;
        nq_handle_t kick = reg(t_q, "kick");
        cr_assert_eq(nq_port_wait(t_port, t_q, kick, NQ_SEQ_NEXT, -1, e_kick_cb, NULL, NULL), 0);
        t_start(&e_rec[0]);
        e_timerfd = new_timerfd(40, 0);
        eloop_watch(e_timerfd, TAG_TIMER);
        cr_assert_geq(nq_notify(t_q, kick, 1), 1);
        /* t_cb stops the loop when no wait is left; on a loaded machine a
         * stall of 60 ms lets one dispatch expire both earlier waits before
         * the timerfd was served: run on until it has, and its wait too. */
        int64_t give_up = now_ns() + 5 * SEC;
        do
            eloop_run(give_up - now_ns());
        while ((t_pending > 0 || e_timer_fired == 0) && !E.gave_up);
        cr_assert_not(E.gave_up);
        cr_assert_eq(t_errors, 0);
        cr_assert_eq(e_kicks, 1);
        cr_assert_eq(e_timer_fired, 1);
        cr_assert_eq(t_pending, 0);
        ok[0] |= t_on_time(&e_rec[0], "100 ms armed first");
        ok[1] |= t_on_time(&e_rec[1], "30 ms from a port callback");
        ok[2] |= t_on_time(&e_rec[2], "30 ms from another fd's handler");
        cr_assert_eq(close(e_timerfd), 0);
        t_teardown();
    }
    cr_assert(ok[0] && ok[1] && ok[2], "a timeout fired late in each of %d rounds", ROUNDS);
}

/* An eventfd written every 200 us by a thread keeps epoll_wait returning
 * long before any deadline; the deadlines must still be served on time. */
typedef struct busy {
    int fd;
    atomic_int stop;
    atomic_long writes;
} busy_t;

static busy_t b_busy;
static long b_served;

static void *busy_main(void *a) {
    busy_t *b = a;
    uint64_t one = 1;
    while (!atomic_load(&b->stop)) {
        if (write(b->fd, &one, sizeof(one)) == (ssize_t)sizeof(one))
            atomic_fetch_add(&b->writes, 1);
        sleep_ns(200000);
    }
    return NULL;
}

static void b_on_fd(eloop_t *l, uint64_t tag) {
    (void)l;
    if (tag == TAG_BUSY) {
        drain_fd(b_busy.fd);
        b_served++;
    } else {
        t_errors++;
    }
}

Test(adapter_epoll, deadlines_stay_on_time_while_another_fd_keeps_epoll_wait_returning,
     .timeout = 30) {
    int ok[3] = {0, 0, 0}; /* each timeout on time in some round */
    int starved = 0;       /* rounds in which the busy fd hardly fired */
    for (int round = 0; round < ROUNDS && !(ok[0] && ok[1] && ok[2]); round++) {
        t_setup();
        E.on_fd = b_on_fd;
        b_served = 0;
        b_busy.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        cr_assert_geq(b_busy.fd, 0);
        atomic_store(&b_busy.stop, 0);
        atomic_store(&b_busy.writes, 0);
        eloop_watch(b_busy.fd, TAG_BUSY);
        pthread_t t;
        cr_assert_eq(pthread_create(&t, NULL, busy_main, &b_busy), 0);
        while (atomic_load(&b_busy.writes) == 0)
            sleep_ns(MS / 10);
        trec_t r[3] = {{.timeout_ms = 100}, {.timeout_ms = 50}, {.timeout_ms = 30}};
        for (int i = 0; i < 3; i++)
            t_start(&r[i]);
        eloop_run(5 * SEC);
        atomic_store(&b_busy.stop, 1);
        cr_assert_eq(pthread_join(t, NULL), 0);
        cr_assert_not(E.gave_up);
        cr_assert_eq(t_errors, 0);
        cr_assert_eq(t_pending, 0);
        /* The busy fd woke the loop again and again (every 200 us in
         * theory), and the deadlines were served with the port's fd quiet:
         * through nq_port_timeout_ms() == 0 after epoll_wait. */
        cr_assert_eq(E.nq_events, 0, "%ld wakeups by the port's fd", E.nq_events);
        if (b_served >= 20) {
            ok[0] |= t_on_time(&r[0], "100 ms");
            ok[1] |= t_on_time(&r[1], "50 ms");
            ok[2] |= t_on_time(&r[2], "30 ms");
        } else {
            /* The writer thread hardly ran (a crowded machine): this round
             * did not test what it is for. Try another. */
            starved++;
            cr_log_info("round %d: only %ld wakeups by the busy fd", round, b_served);
        }
        cr_assert_eq(close(b_busy.fd), 0);
        t_teardown();
    }
    cr_assert(ok[0] && ok[1] && ok[2],
              "a timeout fired late in each of %d rounds (%d of them with the busy fd starved)",
              ROUNDS, starved);
}

/* --- 3. nq_epoll_del ------------------------------------------------------ */

#define C_DEL_AT 50 /* subscription callbacks before the del */

static nq_queue_t *c_q;
static nq_handle_t c_h;
static prod_t c_pr;
static int c_timerfd, c_deleted, c_freeing, c_running_at_del, c_del_rc, c_ticks_after;
static long c_sub_calls, c_wait_calls, c_after_del, c_in_free, c_bad, c_waits_started;
static long c_nq_events_at_del, c_dispatches_at_del;

static void c_wait_cb(void *data, int status, int64_t arg);

static void c_arm(void) {
    if (nq_port_wait(E.p, c_q, c_h, NQ_SEQ_NEXT, -1, c_wait_cb, NULL, NULL) < 0)
        c_bad++;
    else
        c_waits_started++;
}

static void c_wait_cb(void *data, int status, int64_t arg) {
    (void)data;
    (void)arg;
    c_wait_calls++;
    if (c_freeing) {
        c_in_free++; /* nq_port_free completes what is left */
        if (status != 0 && status != NQ_ECANCELED)
            c_bad++;
        return;
    }
    if (c_deleted)
        c_after_del++;
    if (status != 0)
        c_bad++;
    c_arm();
}

static void c_sub_cb(nq_sub_t *s, void *data) {
    (void)data;
    if (c_freeing)
        c_bad++; /* subscriptions never call back from nq_port_free */
    if (c_deleted)
        c_after_del++;
    c_sub_calls++;
    int64_t buf[32];
    (void)nq_sub_recv_batch(s, buf, 32);
}

/* Every 5 ms: once the flood reached the loop, take the port out; then 10
 * more ticks (50 ms) of loop with the producers going. */
static void c_on_fd(eloop_t *l, uint64_t tag) {
    if (tag != TAG_TIMER) {
        c_bad++;
        return;
    }
    drain_fd(c_timerfd);
    if (c_deleted) {
        if (++c_ticks_after == 10)
            l->stop = 1;
        return;
    }
    if (c_sub_calls < C_DEL_AT)
        return;
    c_running_at_del = atomic_load(&c_pr.running);
    c_nq_events_at_del = l->nq_events;
    c_dispatches_at_del = l->dispatches;
    c_del_rc = nq_epoll_del(l->epfd, l->p);
    l->dispatching = 0;
    c_deleted = 1;
}

Test(adapter_epoll, del_while_producers_notify_ends_dispatch_and_the_fd_leaves_the_set,
     .timeout = 60) {
    c_deleted = c_freeing = c_ticks_after = 0;
    c_sub_calls = c_wait_calls = c_after_del = c_in_free = c_bad = c_waits_started = 0;
    c_del_rc = 1;
    c_q = new_queue();
    c_h = reg(c_q, "flood");
    nq_port_t *p = new_port();
    eloop_init(p, 64);
    E.on_fd = c_on_fd;
    nq_sub_opts_t o = sopts(256, NQ_DROP_OLDEST);
    cr_assert_eq(nq_port_subscribe(p, c_q, c_h, &o, c_sub_cb, NULL, NULL), 0);
    for (int i = 0; i < 8; i++)
        c_arm();
    c_timerfd = new_timerfd(5, 5);
    eloop_watch(c_timerfd, TAG_TIMER);
    prod_start(&c_pr, c_q, c_h, NPROD, 0);
    eloop_run(15 * SEC);

    cr_assert_not(E.gave_up);
    cr_assert_eq(c_bad, 0);
    cr_assert(c_deleted);
    cr_assert_eq(c_del_rc, 0, "nq_epoll_del: %s", nq_err_name(c_del_rc));
    cr_assert_eq(c_running_at_del, NPROD, "the producers were still notifying at the del");
    cr_assert_eq(c_after_del, 0, "%ld port callbacks after nq_epoll_del", c_after_del);
    /* (A tag already in the batch that the del's own iteration is handling
     * is not dispatched; one from a later epoll_wait would be a fd left in
     * the set.) */
    cr_assert_eq(E.nq_events_out, 0, "the port's tag fired after the del");
    cr_assert_leq(E.nq_events, c_nq_events_at_del + 1);
    cr_assert_eq(pstats(p).dispatches, (uint64_t)c_dispatches_at_del);
    cr_assert_not(in_set(E.epfd, nq_port_fd(p)), "the port's fd left the set");
    cr_assert_eq(nq_epoll_del(E.epfd, p), NQ_ECLOSED);
    uint64_t cbs = pstats(p).callbacks;
    cr_assert_eq(cbs, (uint64_t)(c_sub_calls + c_wait_calls));
    cr_assert_eq(atomic_load(&c_pr.running), NPROD);

    c_freeing = 1;
    nq_port_free(p); /* producers still running: waits get their callback once */
    c_freeing = 0;
    cr_assert_gt(prod_join(&c_pr), 0);
    cr_assert_eq(c_bad, 0);
    cr_assert_eq(c_wait_calls, c_waits_started, "every wait's callback ran exactly once");
    cr_assert_eq(c_in_free, 8, "the 8 pending waits completed in nq_port_free");
    nq_stats_t qs;
    cr_assert_eq(nq_queue_stats(c_q, &qs), 0);
    cr_assert_eq(qs.live_waits, 0);
    cr_assert_eq(qs.live_subs, 0);
    nq_queue_free(c_q);
    cr_assert_eq(close(c_timerfd), 0);
    eloop_close();
}

/* Ten waits due at once; the first callback takes the port out of the set:
 * the rest of that dispatch does not run; adding it again runs it. */
static int d_calls[10], d_n, d_del_rc = 1;

static void d_cb(void *data, int status, int64_t arg) {
    int i = (int)(intptr_t)data;
    (void)arg;
    if (status != 0)
        d_calls[i] += 100;
    d_calls[i]++;
    d_n++;
    if (d_n == 1) {
        d_del_rc = nq_epoll_del(E.epfd, E.p);
        E.dispatching = 0;
        E.stop = 1;
    }
    if (d_n == 10)
        E.stop = 1;
}

Test(adapter_epoll, del_inside_a_port_callback_stops_that_dispatch_and_add_resumes, .timeout = 30) {
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "ten");
    nq_port_t *p = new_port();
    for (int i = 0; i < 10; i++)
        cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, d_cb, (void *)(intptr_t)i, NULL), 0);
    cr_assert_eq(nq_notify(q, h, 7), 10);
    eloop_init(p, 0);
    eloop_run(5 * SEC);
    cr_assert_eq(d_del_rc, 0);
    cr_assert_eq(d_n, 1, "%d callbacks ran in the dispatch that took the port out", d_n);
    cr_assert_eq(E.ran, 1);
    cr_assert_eq(pstats(p).callbacks, 1);
    cr_assert_not(in_set(E.epfd, nq_port_fd(p)));
    struct pollfd pf = {nq_port_fd(p), POLLIN, 0};
    cr_assert_eq(poll(&pf, 1, 0), 1, "the rest is still ready");

    cr_assert_eq(nq_epoll_add(E.epfd, p, TAG_NQ), 0, "the port may go back in");
    E.dispatching = 1;
    eloop_run(5 * SEC);
    cr_assert_not(E.gave_up);
    cr_assert_eq(d_n, 10);
    for (int i = 0; i < 10; i++)
        cr_assert_eq(d_calls[i], 1, "wait %d: %d callbacks", i, d_calls[i]);
    cr_assert_eq(nq_epoll_del(E.epfd, p), 0);
    eloop_close();
    nq_port_free(p);
    nq_queue_free(q);
}

/* --- 4. argument and state checks ---------------------------------------- */

/* A del that fails (the port is in another set) leaves everything as it
 * was, including the dispatch it was called from: it runs on. */
static nq_port_t *fd_port;
static int fd_other_epfd, fd_rc, fd_calls;
static void fd_cb(void *data, int status, int64_t arg) {
    (void)data;
    (void)status;
    (void)arg;
    if (fd_calls++ == 0)
        fd_rc = nq_epoll_del(fd_other_epfd, fd_port);
}

Test(adapter_epoll, a_failed_del_inside_a_callback_does_not_cut_the_dispatch_short) {
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "failed-del");
    nq_port_t *p = fd_port = new_port();
    int epfd = new_epfd();
    fd_other_epfd = new_epfd();
    for (int i = 0; i < 10; i++)
        cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, fd_cb, NULL, NULL), 0);
    cr_assert_eq(nq_epoll_add(epfd, p, TAG_NQ), 0);
    cr_assert_eq(nq_notify(q, h, 1), 10);
    cr_assert_eq(nq_port_dispatch(p, 0), 10, "a failed del stopped the dispatch");
    cr_assert_eq(fd_rc, NQ_ESYS);
    cr_assert_eq(nq_port_owner(p) != NULL, 1, "a failed del detached the port");
    cr_assert_eq(nq_epoll_del(epfd, p), 0);
    cr_assert_null(nq_port_owner(p));
    close(epfd);
    close(fd_other_epfd);
    nq_port_free(p);
    nq_queue_free(q);
}

Test(adapter_epoll, add_twice_is_ebusy_and_del_twice_is_eclosed) {
    int epfd = new_epfd();
    nq_port_t *p = new_port();
    cr_assert_eq(nq_epoll_del(epfd, p), NQ_ECLOSED, "never added");
    cr_assert_eq(nq_epoll_add(epfd, p, 1), 0);
    cr_assert(in_set(epfd, nq_port_fd(p)));
    cr_assert_eq(nq_epoll_add(epfd, p, 1), NQ_EBUSY);
    cr_assert_eq(nq_epoll_del(epfd, p), 0);
    cr_assert_not(in_set(epfd, nq_port_fd(p)));
    cr_assert_eq(nq_epoll_del(epfd, p), NQ_ECLOSED);
    cr_assert_eq(nq_epoll_add(epfd, p, 2), 0, "added again after del");
    cr_assert_eq(nq_epoll_del(epfd, p), 0);
    nq_port_free(p);
    cr_assert_eq(close(epfd), 0);
}

Test(adapter_epoll, a_bad_epoll_fd_fails_and_leaves_the_port_unattached) {
    nq_port_t *p = new_port();
    cr_assert_eq(nq_epoll_add(-1, p, 1), NQ_EINVAL);
    cr_assert_eq(nq_epoll_add(3, NULL, 1), NQ_EINVAL);
    cr_assert_eq(nq_epoll_del(-1, p), NQ_EINVAL);
    cr_assert_eq(nq_epoll_del(3, NULL), NQ_EINVAL);

    int pfd[2];
    cr_assert_eq(pipe2(pfd, O_CLOEXEC), 0);
    errno = 0;
    cr_assert_eq(nq_epoll_add(pfd[0], p, 1), NQ_ESYS);
    cr_assert_eq(errno, EINVAL, "errno %d (%s)", errno, strerror(errno));
    int closed_fd = pfd[1];
    cr_assert_eq(close(pfd[1]), 0);
    errno = 0;
    cr_assert_eq(nq_epoll_add(closed_fd, p, 1), NQ_ESYS);
    cr_assert_eq(errno, EBADF);

    /* Not left attached: the port is free for anyone. */
    static const char other = 0;
    cr_assert_eq(nq_port_attach(p, &other), 0);
    cr_assert_eq(nq_port_detach(p, &other), 0);
    int epfd = new_epfd();
    cr_assert_eq(nq_epoll_add(epfd, p, 1), 0, "a good epoll fd works after the failures");
    cr_assert(in_set(epfd, nq_port_fd(p)));
    cr_assert_eq(nq_epoll_del(epfd, p), 0);
    nq_port_free(p);
    cr_assert_eq(close(epfd), 0);
    cr_assert_eq(close(pfd[0]), 0);
}

Test(adapter_epoll, a_port_in_an_epoll_set_cannot_be_attached_elsewhere) {
    int e1 = new_epfd(), e2 = new_epfd();
    nq_port_t *p = new_port();
    static const char other = 0;
    cr_assert_eq(nq_epoll_add(e1, p, 1), 0);
    cr_assert_eq(nq_port_attach(p, &other), NQ_EBUSY);
    cr_assert_eq(nq_port_detach(p, &other), NQ_EINVAL, "only its owner detaches it");
    cr_assert_eq(nq_epoll_add(e2, p, 1), NQ_EBUSY, "one set at a time");
    cr_assert_not(in_set(e2, nq_port_fd(p)));
    /* Deleting through a set that does not hold it fails and keeps it. */
    errno = 0;
    cr_assert_eq(nq_epoll_del(e2, p), NQ_ESYS);
    cr_assert_eq(errno, ENOENT);
    cr_assert_eq(nq_port_attach(p, &other), NQ_EBUSY, "still attached");
    cr_assert(in_set(e1, nq_port_fd(p)));
    cr_assert_eq(nq_epoll_del(e1, p), 0);
    cr_assert_eq(nq_port_attach(p, &other), 0, "free once deleted");
    cr_assert_eq(nq_epoll_add(e1, p, 1), NQ_EBUSY, "now attached to the other owner");
    cr_assert_eq(nq_epoll_del(e1, p), NQ_ECLOSED, "not in an epoll set");
    cr_assert_eq(nq_port_detach(p, &other), 0);
    nq_port_free(p);
    cr_assert_eq(close(e1), 0);
    cr_assert_eq(close(e2), 0);
}

static void noop_wait_cb(void *data, int status, int64_t arg) {
    (void)arg;
    *(int *)data = status;
}

Test(adapter_epoll, timeout_is_the_smaller_of_the_loop_and_the_port_deadline) {
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "t");
    nq_port_t *p = new_port();
    cr_assert_eq(nq_epoll_timeout(NULL, -1), NQ_EINVAL);
    cr_assert_eq(nq_epoll_timeout(NULL, 10), NQ_EINVAL);
    /* No deadline: the loop's own, or -1. */
    cr_assert_eq(nq_epoll_timeout(p, -1), -1);
    cr_assert_eq(nq_epoll_timeout(p, -7), -1);
    cr_assert_eq(nq_epoll_timeout(p, 0), 0);
    cr_assert_eq(nq_epoll_timeout(p, 7), 7);
    cr_assert_eq(nq_epoll_timeout(p, INT_MAX), INT_MAX);
    /* A 500 ms deadline. */
    int st_far = 1, st_huge = 1, st_due = 1;
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, 500, noop_wait_cb, &st_far, NULL), 0);
    int t = nq_epoll_timeout(p, -1);
    cr_assert(t > 400 && t <= 500, "%d", t);
    cr_assert_eq(nq_epoll_timeout(p, 10), 10);
    cr_assert_eq(nq_epoll_timeout(p, 0), 0);
    t = nq_epoll_timeout(p, 100000);
    cr_assert(t > 400 && t <= 500, "%d", t);
    cr_assert_eq((int64_t)nq_epoll_timeout(p, -1), nq_port_timeout_ms(p));
    nq_port_free(p);
    cr_assert_eq(st_far, NQ_ECANCELED);

    /* A deadline past INT_MAX ms is clamped to what epoll_wait takes. */
    p = new_port();
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, INT64_MAX / 4, noop_wait_cb, &st_huge, NULL),
                 0);
    cr_assert_gt(nq_port_timeout_ms(p), (int64_t)INT_MAX);
    cr_assert_eq(nq_epoll_timeout(p, -1), INT_MAX);
    cr_assert_eq(nq_epoll_timeout(p, 3), 3);
    /* A due deadline: 0, whatever the loop wanted. */
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, 0, noop_wait_cb, &st_due, NULL), 0);
    cr_assert_eq(nq_epoll_timeout(p, -1), 0);
    cr_assert_eq(nq_epoll_timeout(p, 1000), 0);
    cr_assert_eq(nq_port_dispatch(p, 0), 1);
    cr_assert_eq(st_due, NQ_ETIMEDOUT);
    cr_assert_eq(nq_epoll_timeout(p, -1), INT_MAX);
    nq_port_free(p);
    cr_assert_eq(st_huge, NQ_ECANCELED);
    nq_queue_free(q);
}

/* Level-triggered: while a budget leaves work, the port's fd stays in the
 * ready list with its tag; once all ran, epoll_wait is quiet. */
static int l_calls;
static void l_cb(void *data, int status, int64_t arg) {
    (void)data;
    (void)arg;
    l_calls += status == 0 ? 1 : 1000;
}

Test(adapter_epoll, the_tag_fires_level_triggered_while_a_budget_leaves_work) {
    int epfd = new_epfd();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "five");
    nq_port_t *p = new_port();
    const uint64_t tag = 0xfeedface12345678ull;
    cr_assert_eq(nq_epoll_add(epfd, p, tag), 0);
    struct epoll_event ev;
    cr_assert_eq(epoll_wait(epfd, &ev, 1, 0), 0, "nothing pending: quiet");
    for (int i = 0; i < 5; i++)
        cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, l_cb, NULL, NULL), 0);
    cr_assert_eq(nq_notify(q, h, 1), 5);
    const int expect[] = {2, 2, 1};
    for (int i = 0; i < 3; i++) {
        memset(&ev, 0, sizeof(ev));
        cr_assert_eq(epoll_wait(epfd, &ev, 1, 1000), 1, "pass %d", i);
        cr_assert_eq(ev.data.u64, tag);
        cr_assert(ev.events & EPOLLIN);
        cr_assert_eq(nq_port_dispatch(p, 2), expect[i]);
    }
    cr_assert_eq(l_calls, 5);
    cr_assert_eq(epoll_wait(epfd, &ev, 1, 0), 0, "all ran: quiet again");
    cr_assert_eq(nq_epoll_del(epfd, p), 0);
    nq_port_free(p);
    nq_queue_free(q);
    cr_assert_eq(close(epfd), 0);
}

/* --- 6. fairness ---------------------------------------------------------- */

/* Four subscriptions on one handle, each taking one arg a callback, start
 * with a backlog of F_CAP args each (more callbacks than the loop can run in
 * the test's time, even if the producers stall), and four producers keep
 * them full. A 2 ms timerfd in the same set must keep being served while
 * that work is pending, and no dispatch may run more than the budget. */
#define F_TICKS  50 /* 2 ms timerfd ticks the flood must let through */
#define F_BUDGET 3u /* the loop's dispatch budget */
#define F_SUBS   4
#define F_CAP    (1u << 16) /* backlog per subscription */
/* The ticks may take this many times their nominal time: a loop starved
 * by the flood never gets them at all (the run gives up after 15 s), while
 * a loop on a crowded 2-vCPU machine under a sanitizer may be descheduled
 * for long stretches. The real fairness check is f_contended below. */
#define F_SLACK 100

static int f_timerfd, f_tid, f_port_fd;
static long f_ticks, f_contended, f_cbs, f_wrong_thread, f_bad;

static void f_sub_cb(nq_sub_t *s, void *data) {
    (void)data;
    f_cbs++;
    f_wrong_thread += cur_tid() != f_tid;
    int64_t arg;
    (void)nq_sub_recv_batch(s, &arg, 1); /* only part: called again */
}

static void f_on_fd(eloop_t *l, uint64_t tag) {
    if (tag != TAG_TIMER) {
        f_bad++;
        return;
    }
    drain_fd(f_timerfd);
    f_ticks++;
    struct pollfd pf = {f_port_fd, POLLIN, 0};
    if (poll(&pf, 1, 0) == 1)
        f_contended++; /* the tick came while port work was pending */
    if (f_ticks == F_TICKS)
        l->stop = 1;
}

Test(adapter_epoll, a_flood_cannot_starve_a_timerfd_and_each_dispatch_keeps_its_budget,
     .timeout = 60) {
    f_tid = cur_tid();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "flood");
    nq_port_t *p = new_port();
    f_port_fd = nq_port_fd(p);
    eloop_init(p, F_BUDGET);
    E.on_fd = f_on_fd;
    for (int i = 0; i < F_SUBS; i++) {
        nq_sub_opts_t o = sopts(F_CAP, NQ_DROP_OLDEST);
        cr_assert_eq(nq_port_subscribe(p, q, h, &o, f_sub_cb, NULL, NULL), 0);
    }
    for (uint32_t i = 0; i < F_CAP; i++)
        cr_assert_eq(nq_notify(q, h, (int64_t)i), F_SUBS);
    prod_t pr;
    prod_start(&pr, q, h, NPROD, 0);
    f_timerfd = new_timerfd(2, 2);
    eloop_watch(f_timerfd, TAG_TIMER);
    int64_t t0 = now_ns();
    eloop_run(15 * SEC);
    int64_t took = now_ns() - t0;
    int running = atomic_load(&pr.running);
    int64_t sent = prod_join(&pr);

    cr_assert_not(E.gave_up);
    cr_assert_eq(f_bad, 0);
    cr_assert_eq(running, NPROD, "the producers gave up before the ticks were in");
    cr_assert_eq(f_ticks, F_TICKS);
    cr_assert_eq(f_wrong_thread, 0);
    /* The ticks came while the flood was pending ... */
    cr_assert_geq(f_contended, F_TICKS * 4 / 5, "only %ld of %d ticks came with work pending",
                  f_contended, F_TICKS);
    /* ... and at least 1% of the nominal 500 a second (F_SLACK). */
    cr_assert_lt(took, (int64_t)F_TICKS * 2 * MS * F_SLACK, "%d ticks of 2 ms took %.1f ms",
                 F_TICKS, (double)took / MS);
    /* Every dispatch kept to the budget, and the flood reached it. */
    cr_assert_leq(E.max_ran, (long)F_BUDGET, "%ld callbacks in one dispatch", E.max_ran);
    cr_assert_gt(E.at_budget, 0);
    nq_port_stats_t st = pstats(p);
    cr_assert_eq(st.callbacks, (uint64_t)f_cbs);
    cr_assert_leq(st.efd_writes, st.dispatches + 1);
    cr_log_info("fairness: %d ticks in %.1f ms, %ld with work pending; %ld callbacks, %llu "
                "dispatches, %lld sent",
                F_TICKS, (double)took / MS, f_contended, f_cbs, (unsigned long long)st.dispatches,
                (long long)sent);
    cr_assert_eq(nq_epoll_del(E.epfd, p), 0);
    cr_assert_eq(close(f_timerfd), 0);
    eloop_close();
    nq_port_free(p);
    nq_queue_free(q);
}
