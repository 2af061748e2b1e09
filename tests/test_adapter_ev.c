/* Criterion suite "adapter_ev": libnq's libev adapter (<nq/ev.h>) on real
 * libev loops (ev_loop_new and ev_default_loop).
 *
 * Covers: 100k notifies from four threads reaching port subscriptions and
 * re-armed port waits on the loop thread only, each exactly once and in each
 * producer's order (received + dropped == sent); port-wait timeouts that fire
 * within 20 ms of their deadline, also when a wait with an earlier deadline
 * is added from a port callback or from another watcher's callback (the
 * port's on_deadline hook re-arms the ev_timer); nq_ev_stop + nq_ev_close
 * while producers notify (no port callback afterwards, port and queue freed
 * cleanly) and nq_ev_close from inside a port callback (that dispatch stops,
 * the rest waits for the next owner); the argument and state checks (double
 * init, double close, idempotent start/stop, a second loop, NULL, a zeroed
 * watcher, re-attaching after close); libev's keep-alive habit (an active
 * watcher keeps ev_run going, ev_unref lets it return; EVRUN_ONCE and
 * EVRUN_NOWAIT); fairness under a flood (an ev_timer keeps firing, the budget
 * bounds the callbacks per loop iteration); and at most one eventfd write per
 * dispatch cycle under load.
 *
 * Timing: a timeout is never early; "within 20 ms" must hold for each wait in
 * at least one of up to five rounds, since a busy machine can deschedule the
 * loop thread for longer (a missing re-arm is late in every round). The
 * fairness test starts with a backlog larger than the loop can drain, so it
 * does not depend on how often the producers get the CPU.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nq.h"
#include "nq/ev.h"
#include "nqtest.h"

#define ADAPTER_HINT "adapter-ev"
#define ADAPTER_STRESS
#define ADAPTER_TIMEOUTS
#include "adapter_common.h"

/* --- helpers ------------------------------------------------------------ */

static int fd_readable(int fd) {
    struct pollfd pf = {fd, POLLIN, 0};
    return poll(&pf, 1, 0) == 1 && (pf.revents & POLLIN);
}

/* Closes and frees in the order the header asks: watcher, port, queue. */
static void teardown(struct ev_loop *loop, nq_ev_t *w, nq_port_t *p, nq_queue_t *q) {
    if (w != NULL) {
        cr_assert_eq(nq_ev_stop(loop, w), 0);
        cr_assert_eq(nq_ev_close(w), 0);
    }
    nq_port_free(p);
    nq_queue_free(q);
}

/* A watchdog: a test whose loop should have ended long ago breaks out and
 * fails instead of hanging until the runner's timeout. */
static int watchdog_fired;
static void watchdog_cb(struct ev_loop *loop, ev_timer *t, int revents) {
    (void)t;
    (void)revents;
    watchdog_fired = 1;
    ev_break(loop, EVBREAK_ALL);
}

/* --- 1. 100k notifies from four threads --------------------------------- */

static struct ev_loop *s_loop;

/* adapter_common.h's stress callbacks end the run with this. */
static void stress_stop_loop(void) {
    ev_break(s_loop, EVBREAK_ALL);
}

Test(adapter_ev, notifies_from_four_threads_run_on_the_loop_thread_once_each_in_order,
     .timeout = 60) {
    const int64_t per = SCALE(100000) / NPROD;
    const int64_t total = per * NPROD;
    struct ev_loop *loop = ev_loop_new(0);
    cr_assert_not_null(loop);
    s_loop = loop;
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "stress");
    nq_port_t *p = new_port();
    nq_ev_t w;
    cr_assert_eq(nq_ev_init(&w, p), 0);
    cr_assert_eq(nq_ev_start(loop, &w), 0);

    /* stress_arm's 5 s wait chain keeps the adapter's ev_timer armed and
     * re-armed. */
    nq_sub_t *held = stress_arm(p, q, h, total);
    ev_timer dog;
    watchdog_fired = 0;
    ev_timer_init(&dog, watchdog_cb, 30., 0.);
    ev_timer_start(loop, &dog);

    prod_t pr;
    prod_start(&pr, q, h, NPROD, per);
    ev_run(loop, 0);
    int64_t sent = prod_join(&pr);
    ev_timer_stop(loop, &dog);

    cr_assert_not(watchdog_fired, "the loop did not see every notification in 30 s");
    cr_assert_eq(sent, total);
    stress_check(p, held, total);

    nq_sub_close(held);
    teardown(loop, &w, p, q);
    ev_loop_destroy(loop);
}

/* --- 2. timeouts ---------------------------------------------------------- */

static struct ev_loop *t_loop;

/* adapter_common.h's t_cb ends the run with this. */
static void timeout_stop_loop(void) {
    ev_break(t_loop, EVBREAK_ALL);
}

static void t_setup(struct ev_loop *loop, nq_ev_t *w) {
    t_loop = loop;
    t_open();
    cr_assert_eq(nq_ev_init(w, t_port), 0);
    cr_assert_eq(nq_ev_start(loop, w), 0);
}

Test(adapter_ev, waits_of_30_50_100_ms_time_out_within_20_ms_on_the_default_loop, .timeout = 30) {
    struct ev_loop *loop = ev_default_loop(0);
    cr_assert_not_null(loop);
    int ok[3] = {0, 0, 0}; /* each timeout on time in some round */
    for (int round = 0; round < ROUNDS && !(ok[0] && ok[1] && ok[2]); round++) {
        nq_ev_t w;
        t_setup(loop, &w);
        trec_t r[3] = {{.timeout_ms = 100}, {.timeout_ms = 50}, {.timeout_ms = 30}};
        for (int i = 0; i < 3; i++)
            t_start(&r[i]); /* each earlier than the one armed: on_deadline */
        cr_assert_eq(t_errors, 0);
        int64_t t0 = now_ns();
        ev_run(loop, 0);
        cr_assert_lt(now_ns() - t0, 5 * SEC);
        cr_assert_eq(t_pending, 0);
        ok[0] |= t_on_time(&r[0], "100 ms");
        ok[1] |= t_on_time(&r[1], "50 ms");
        ok[2] |= t_on_time(&r[2], "30 ms");
        nq_port_stats_t st = pstats(t_port);
        cr_assert_eq(st.deadlines_expired, 3);
        cr_assert_eq(st.deadlines, 0);
        teardown(loop, &w, t_port, t_q);
    }
    cr_assert(ok[0] && ok[1] && ok[2], "a timeout fired late in each of %d rounds", ROUNDS);
    ev_loop_destroy(loop);
}

/* A port callback (kick) and an ev_timer callback each add a wait whose
 * deadline is earlier than the one the adapter's timer is armed for. */
static trec_t e_rec[3]; /* 100 ms from the start, 30 ms from kick, 30 ms from the ev_timer */
static int e_kicks, e_timer_calls;

static void e_kick_cb(void *data, int status, int64_t arg) {
    (void)data;
    (void)arg;
    e_kicks++;
    if (status != 0)
        t_errors++;
    t_start(&e_rec[1]); /* deadline ~30 ms: the armed one is at ~100 ms */
}

static void e_timer_cb(struct ev_loop *loop, ev_timer *t, int revents) {
    (void)loop;
    (void)t;
    (void)revents;
    /* At ~40 ms: the first 30 ms wait has expired, the timer is re-armed for
     * ~100 ms; this one is due at ~70 ms, which only on_deadline can arm. */
    e_timer_calls++;
    t_start(&e_rec[2]);
}

/* Runs the loop until the ev_timer has run and every wait has timed out.
 * t_cb breaks the loop when no wait is left, and on a loaded machine that
 * can happen before the 40 ms timer ran (a stall of 60 ms lets one dispatch
 * expire both earlier waits), or in the iteration that then runs the timer
 * (ev_break takes effect after it, with e_rec[2] just started). Such a round
 * goes on until e_rec[2] has timed out too; a watchdog ends a run that would
 * never finish. */
static void e_run(struct ev_loop *loop) {
    ev_timer dog;
    ev_timer_init(&dog, watchdog_cb, 5., 0.);
    ev_timer_start(loop, &dog);
    ev_unref(loop); /* the watchdog alone does not keep ev_run going */
    watchdog_fired = 0;
    do
        ev_run(loop, 0);
    while ((t_pending > 0 || e_timer_calls == 0) && !watchdog_fired);
    cr_assert_not(watchdog_fired, "the waits did not all time out in 5 s");
    ev_ref(loop); /* as libev asks before stopping an unref'ed watcher */
    ev_timer_stop(loop, &dog);
}

Test(adapter_ev, a_wait_added_in_a_callback_with_an_earlier_deadline_rearms_the_timer,
     .timeout = 30) {
    struct ev_loop *loop = ev_loop_new(0);
    cr_assert_not_null(loop);
    int ok[3] = {0, 0, 0}; /* each timeout on time in some round */
    for (int round = 0; round < ROUNDS && !(ok[0] && ok[1] && ok[2]); round++) {
        nq_ev_t w;
        t_setup(loop, &w);
        memset(e_rec, 0, sizeof(e_rec));
        e_kicks = e_timer_calls = 0;
        e_rec[0].timeout_ms = 100;
        e_rec[1].timeout_ms = 30;
        e_rec[2].timeout_ms = 30;
        nq_handle_t kick = reg(t_q, "kick");
        cr_assert_eq(nq_port_wait(t_port, t_q, kick, NQ_SEQ_NEXT, -1, e_kick_cb, NULL, NULL), 0);
        ev_timer tm;
        ev_timer_init(&tm, e_timer_cb, 0.040, 0.);
        ev_now_update(loop);
        t_start(&e_rec[0]);
        ev_timer_start(loop, &tm);
        cr_assert_geq(nq_notify(t_q, kick, 1), 1);
        e_run(loop);
        cr_assert_eq(t_errors, 0);
        cr_assert_eq(e_kicks, 1);
        cr_assert_eq(e_timer_calls, 1);
        cr_assert_eq(t_pending, 0);
        ok[0] |= t_on_time(&e_rec[0], "100 ms armed first");
        ok[1] |= t_on_time(&e_rec[1], "30 ms from a port callback");
        ok[2] |= t_on_time(&e_rec[2], "30 ms from an ev_timer callback");
        ev_timer_stop(loop, &tm);
        teardown(loop, &w, t_port, t_q);
    }
    cr_assert(ok[0] && ok[1] && ok[2], "a timeout fired late in each of %d rounds", ROUNDS);
    ev_loop_destroy(loop);
}

/* --- 3. close ------------------------------------------------------------- */

#define C_CLOSE_AT 50 /* subscription callbacks before the close */

static struct ev_loop *c_loop;
static nq_ev_t c_w;
static nq_port_t *c_port;
static nq_queue_t *c_q;
static nq_handle_t c_h;
static prod_t c_pr;
static int c_closed, c_freeing, c_running_at_close;
static long c_sub_calls, c_wait_calls, c_after_close, c_in_free, c_bad, c_waits_started;
static int c_close_in_cb; /* close from inside the subscription callback */

static void c_wait_cb(void *data, int status, int64_t arg);

static void c_arm(void) {
    if (nq_port_wait(c_port, c_q, c_h, NQ_SEQ_NEXT, -1, c_wait_cb, NULL, NULL) < 0)
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
    if (c_closed)
        c_after_close++;
    if (status != 0)
        c_bad++;
    c_arm();
}

static void c_sub_cb(nq_sub_t *s, void *data) {
    (void)data;
    if (c_freeing)
        c_bad++; /* subscriptions never call back from nq_port_free */
    if (c_closed)
        c_after_close++;
    c_sub_calls++;
    int64_t buf[32];
    (void)nq_sub_recv_batch(s, buf, 32);
    if (c_close_in_cb && c_sub_calls == C_CLOSE_AT) {
        c_running_at_close = atomic_load(&c_pr.running);
        if (nq_ev_close(&c_w) != 0)
            c_bad++;
        c_closed = 1;
    }
}

static void c_quiet_cb(struct ev_loop *loop, ev_timer *t, int revents) {
    (void)loop;
    (void)t;
    (void)revents; /* the quiet period after the close is over */
}

static ev_timer c_quiet;

static void c_close_cb(struct ev_loop *loop, ev_timer *t, int revents) {
    (void)revents;
    if (c_sub_calls < C_CLOSE_AT) { /* let the flood reach the loop first */
        ev_timer_set(t, 0.005, 0.);
        ev_timer_start(loop, t);
        return;
    }
    c_running_at_close = atomic_load(&c_pr.running);
    if (nq_ev_stop(loop, &c_w) != 0 || nq_ev_close(&c_w) != 0)
        c_bad++;
    c_closed = 1;
    /* 50 ms more of loop with the producers going: nothing may run. */
    ev_timer_init(&c_quiet, c_quiet_cb, 0.050, 0.);
    ev_timer_start(loop, &c_quiet);
}

static void c_setup(void) {
    c_closed = c_freeing = 0;
    c_sub_calls = c_wait_calls = c_after_close = c_in_free = c_bad = c_waits_started = 0;
    c_loop = ev_loop_new(0);
    cr_assert_not_null(c_loop);
    c_q = new_queue();
    c_h = reg(c_q, "flood");
    c_port = new_port();
    cr_assert_eq(nq_ev_init(&c_w, c_port), 0);
    cr_assert_eq(nq_ev_start(c_loop, &c_w), 0);
    nq_sub_opts_t o = sopts(256, NQ_DROP_OLDEST);
    cr_assert_eq(nq_port_subscribe(c_port, c_q, c_h, &o, c_sub_cb, NULL, NULL), 0);
    for (int i = 0; i < 8; i++)
        c_arm();
}

/* After ev_run returned: nothing ran through the closed watcher; free the
 * port while the producers still notify, then the queue. */
static void c_finish(void) {
    cr_assert_eq(c_bad, 0);
    cr_assert(c_closed);
    cr_assert_eq(c_running_at_close, NPROD, "the producers were still notifying at the close");
    cr_assert_eq(c_after_close, 0, "%ld port callbacks after nq_ev_close", c_after_close);
    cr_assert_eq(nq_ev_is_active(&c_w), NQ_ECLOSED);
    uint64_t cbs = pstats(c_port).callbacks;
    cr_assert_eq(cbs, (uint64_t)(c_sub_calls + c_wait_calls));
    sleep_ns(5 * MS); /* producers go on; nothing dispatches the port */
    cr_assert_eq(pstats(c_port).callbacks, cbs);
    cr_assert_eq(atomic_load(&c_pr.running), NPROD);

    c_freeing = 1;
    nq_port_free(c_port); /* producers still running: waits get their callback once */
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
    ev_loop_destroy(c_loop);
}

Test(adapter_ev, stop_and_close_while_producers_notify_end_every_port_callback, .timeout = 60) {
    c_setup();
    c_close_in_cb = 0;
    ev_timer close_t;
    ev_timer_init(&close_t, c_close_cb, 0.010, 0.);
    ev_timer_start(c_loop, &close_t);
    prod_start(&c_pr, c_q, c_h, NPROD, 0);
    int64_t t0 = now_ns();
    /* With the watcher closed and both timers done, nothing is active: ev_run
     * returns by itself. */
    int active = ev_run(c_loop, 0);
    cr_assert_eq(active, 0);
    cr_assert_lt(now_ns() - t0, 15 * SEC);
    cr_assert_geq(c_sub_calls, C_CLOSE_AT);
    c_finish();
}

Test(adapter_ev, close_inside_a_subscription_callback_under_a_flood_stops_every_callback,
     .timeout = 60) {
    c_setup();
    c_close_in_cb = 1;
    ev_timer dog;
    ev_timer_init(&dog, watchdog_cb, 20., 0.);
    ev_timer_start(c_loop, &dog);
    ev_unref(c_loop); /* the watchdog alone does not keep ev_run going */
    watchdog_fired = 0;
    prod_start(&c_pr, c_q, c_h, NPROD, 0);
    int active = ev_run(c_loop, 0); /* returns once the watcher is closed */
    ev_ref(c_loop);
    ev_timer_stop(c_loop, &dog);
    cr_assert_not(watchdog_fired);
    cr_assert_eq(active, 0);
    cr_assert_eq(c_sub_calls, C_CLOSE_AT);
    c_finish();
}

/* Ten waits due at once; the first callback closes the watcher: the rest of
 * that dispatch does not run, and a new watcher on the same port runs it. */
static nq_ev_t d_w;
static int d_calls[10], d_order[10], d_n, d_close_rc = 1;
static struct ev_loop *d_loop;

static void d_cb(void *data, int status, int64_t arg) {
    int i = (int)(intptr_t)data;
    (void)arg;
    if (status != 0)
        d_calls[i] += 100;
    d_calls[i]++;
    d_order[d_n++] = i;
    if (d_n == 1)
        d_close_rc = nq_ev_close(&d_w);
    if (d_n == 10)
        ev_break(d_loop, EVBREAK_ALL);
}

Test(adapter_ev, close_inside_a_port_callback_stops_that_dispatch_and_the_rest_waits,
     .timeout = 30) {
    d_loop = ev_loop_new(0);
    cr_assert_not_null(d_loop);
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "ten");
    nq_port_t *p = new_port();
    for (int i = 0; i < 10; i++)
        cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, d_cb, (void *)(intptr_t)i, NULL), 0);
    cr_assert_eq(nq_notify(q, h, 7), 10);
    cr_assert_eq(nq_ev_init(&d_w, p), 0);
    cr_assert_eq(nq_ev_start(d_loop, &d_w), 0);
    cr_assert_eq(ev_run(d_loop, 0), 0, "the closed watcher left nothing active");
    cr_assert_eq(d_close_rc, 0);
    cr_assert_eq(d_n, 1, "%d callbacks ran in the dispatch that closed", d_n);
    cr_assert_eq(pstats(p).callbacks, 1);
    cr_assert(fd_readable(nq_port_fd(p)), "the rest is still ready");

    nq_ev_t w2; /* the port is free again: a new watcher takes it */
    cr_assert_eq(nq_ev_init(&w2, p), 0);
    cr_assert_eq(nq_ev_start(d_loop, &w2), 0);
    ev_run(d_loop, 0);
    cr_assert_eq(d_n, 10);
    for (int i = 0; i < 10; i++)
        cr_assert_eq(d_calls[i], 1, "wait %d: %d callbacks", i, d_calls[i]);
    teardown(d_loop, &w2, p, q);
    ev_loop_destroy(d_loop);
}

/* --- 4. argument and state checks ---------------------------------------- */

Test(adapter_ev, init_of_a_second_watcher_on_the_same_port_is_ebusy) {
    nq_port_t *p = new_port();
    nq_ev_t a, b;
    cr_assert_eq(nq_ev_init(&a, p), 0);
    memset(&b, 0, sizeof(b));
    cr_assert_eq(nq_ev_init(&b, p), NQ_EBUSY);
    cr_assert_eq(nq_ev_is_active(&b), NQ_EINVAL, "b was not initialised");
    cr_assert_eq(nq_port_attach(p, &b), NQ_EBUSY, "the port is attached to a");
    cr_assert_eq(nq_ev_close(&a), 0);
    nq_port_free(p);
}

Test(adapter_ev, close_twice_is_eclosed_and_a_closed_watcher_refuses_every_call) {
    struct ev_loop *loop = ev_loop_new(0);
    nq_port_t *p = new_port();
    nq_ev_t w;
    cr_assert_eq(nq_ev_init(&w, p), 0);
    cr_assert_eq(nq_ev_start(loop, &w), 0);
    cr_assert_eq(nq_ev_close(&w), 0, "close stops a started watcher");
    cr_assert_eq(nq_ev_close(&w), NQ_ECLOSED);
    cr_assert_eq(nq_ev_start(loop, &w), NQ_ECLOSED);
    cr_assert_eq(nq_ev_stop(loop, &w), NQ_ECLOSED);
    cr_assert_eq(nq_ev_set_budget(&w, 4), NQ_ECLOSED);
    cr_assert_eq(nq_ev_is_active(&w), NQ_ECLOSED);
    cr_assert_eq(ev_run(loop, EVRUN_NOWAIT), 0, "close stopped the io watcher");
    nq_port_free(p);
    ev_loop_destroy(loop);
}

Test(adapter_ev, start_and_stop_are_idempotent_and_a_second_loop_is_ebusy) {
    struct ev_loop *l1 = ev_default_loop(0);
    struct ev_loop *l2 = ev_loop_new(0);
    cr_assert_not_null(l1);
    cr_assert_not_null(l2);
    nq_port_t *p = new_port();
    nq_ev_t w;
    cr_assert_eq(nq_ev_init(&w, p), 0);
    cr_assert_eq(nq_ev_is_active(&w), 0);
    cr_assert_eq(nq_ev_stop(l1, &w), 0, "stopping a stopped watcher does nothing");
    cr_assert_eq(nq_ev_start(l1, &w), 0);
    cr_assert_eq(nq_ev_start(l1, &w), 0, "starting a started watcher does nothing");
    cr_assert_eq(nq_ev_is_active(&w), 1);
    cr_assert_eq(nq_ev_start(l2, &w), NQ_EBUSY);
    cr_assert_lt(nq_ev_stop(l2, &w), 0, "l2 does not run it");
    cr_assert_eq(nq_ev_is_active(&w), 1);
    cr_assert_eq(nq_ev_stop(l1, &w), 0);
    cr_assert_eq(nq_ev_stop(l1, &w), 0);
    cr_assert_eq(nq_ev_is_active(&w), 0);
    cr_assert_eq(ev_run(l1, EVRUN_NOWAIT), 0, "stopped: nothing active on l1");
    /* Stopped, it may start on the other loop. */
    cr_assert_eq(nq_ev_start(l2, &w), 0);
    cr_assert_eq(nq_ev_is_active(&w), 1);
    cr_assert_eq(nq_ev_close(&w), 0);
    nq_port_free(p);
    ev_loop_destroy(l2);
    ev_loop_destroy(l1);
}

Test(adapter_ev, null_arguments_are_einval) {
    struct ev_loop *loop = ev_loop_new(0);
    nq_port_t *p = new_port();
    nq_ev_t w;
    cr_assert_eq(nq_ev_init(NULL, p), NQ_EINVAL);
    cr_assert_eq(nq_ev_init(&w, NULL), NQ_EINVAL);
    cr_assert_eq(nq_ev_start(loop, NULL), NQ_EINVAL);
    cr_assert_eq(nq_ev_stop(loop, NULL), NQ_EINVAL);
    cr_assert_eq(nq_ev_close(NULL), NQ_EINVAL);
    cr_assert_eq(nq_ev_set_budget(NULL, 1), NQ_EINVAL);
    cr_assert_eq(nq_ev_is_active(NULL), NQ_EINVAL);
    cr_assert_eq(nq_ev_init(&w, p), 0, "the failed inits left the port free");
    cr_assert_eq(nq_ev_start(NULL, &w), NQ_EINVAL);
    cr_assert_eq(nq_ev_stop(NULL, &w), NQ_EINVAL);
    cr_assert_eq(nq_ev_is_active(&w), 0);
    cr_assert_eq(nq_ev_close(&w), 0);
    nq_port_free(p);
    ev_loop_destroy(loop);
}

Test(adapter_ev, a_zeroed_watcher_never_initialised_is_einval) {
    struct ev_loop *loop = ev_loop_new(0);
    nq_ev_t w;
    memset(&w, 0, sizeof(w));
    cr_assert_eq(nq_ev_start(loop, &w), NQ_EINVAL);
    cr_assert_eq(nq_ev_stop(loop, &w), NQ_EINVAL);
    cr_assert_eq(nq_ev_set_budget(&w, 1), NQ_EINVAL);
    cr_assert_eq(nq_ev_is_active(&w), NQ_EINVAL);
    cr_assert_eq(nq_ev_close(&w), NQ_EINVAL);
    cr_assert_eq(ev_run(loop, EVRUN_NOWAIT), 0, "nothing was started");
    ev_loop_destroy(loop);
}

Test(adapter_ev, after_close_the_port_can_be_attached_again) {
    nq_port_t *p = new_port();
    nq_ev_t a, b;
    cr_assert_eq(nq_ev_init(&a, p), 0);
    cr_assert_eq(nq_ev_close(&a), 0);
    cr_assert_eq(nq_ev_init(&b, p), 0, "a new watcher");
    cr_assert_eq(nq_ev_close(&b), 0);
    static const char other = 0;
    cr_assert_eq(nq_port_attach(p, &other), 0, "another adapter");
    cr_assert_eq(nq_ev_init(&a, p), NQ_EBUSY);
    cr_assert_eq(nq_port_detach(p, &other), 0);
    cr_assert_eq(nq_ev_init(&a, p), 0, "a closed watcher may be initialised again");
    cr_assert_eq(nq_ev_close(&a), 0);
    nq_port_free(p);
}

/* --- 5. keep-alive: ev_ref / ev_unref, EVRUN_ONCE, EVRUN_NOWAIT ----------- */

static int k_calls, k_broke, k_timer_fired;
static int64_t k_timer_at, k_cb_at;
static struct ev_loop *k_loop;

static void k_cb(void *data, int status, int64_t arg) {
    (void)arg;
    k_calls++;
    k_cb_at = now_ns();
    if (status != 0)
        k_calls += 1000;
    if (data != NULL) {
        k_broke = 1;
        ev_break(k_loop, EVBREAK_ALL);
    }
}

static void k_timer_cb(struct ev_loop *loop, ev_timer *t, int revents) {
    (void)loop;
    (void)t;
    (void)revents;
    k_timer_fired++;
    k_timer_at = now_ns();
}

typedef struct later {
    nq_queue_t *q;
    nq_handle_t h;
    int64_t delay;
    atomic_int rc;
} later_t;

static void *notify_later(void *a) {
    later_t *l = a;
    sleep_ns(l->delay);
    atomic_store(&l->rc, nq_notify(l->q, l->h, 1));
    return NULL;
}

Test(adapter_ev, an_active_watcher_keeps_ev_run_going_and_ev_unref_lets_it_return, .timeout = 30) {
    k_loop = ev_loop_new(0);
    cr_assert_not_null(k_loop);
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "later");
    nq_port_t *p = new_port();
    nq_ev_t w;
    cr_assert_eq(nq_ev_init(&w, p), 0);
    cr_assert_eq(nq_ev_start(k_loop, &w), 0);

    /* A 5 ms one-shot timer, then only the watcher (no deadline armed) is
     * active; ev_run still waits for the notify made 60 ms later. */
    k_calls = k_broke = k_timer_fired = 0;
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, k_cb, &k_loop, NULL), 0);
    ev_timer tm;
    ev_timer_init(&tm, k_timer_cb, 0.005, 0.);
    ev_timer_start(k_loop, &tm);
    later_t l = {.q = q, .h = h, .delay = 60 * MS};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, notify_later, &l), 0);
    ev_run(k_loop, 0);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(atomic_load(&l.rc), 1);
    cr_assert_eq(k_timer_fired, 1);
    cr_assert(k_broke, "ev_run returned before the port callback ran");
    cr_assert_eq(k_calls, 1);
    cr_assert_gt(k_cb_at, k_timer_at);

    /* ev_unref: the watcher alone no longer keeps ev_run going. */
    ev_unref(k_loop);
    int64_t t0 = now_ns();
    cr_assert_eq(ev_run(k_loop, 0), 0);
    cr_assert_lt(now_ns() - t0, 1 * SEC, "ev_run returned at once");
    cr_assert_eq(nq_ev_is_active(&w), 1, "the watcher still runs");
    /* ... and still delivers when the loop runs for any reason. */
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, k_cb, NULL, NULL), 0);
    cr_assert_eq(nq_notify(q, h, 2), 1);
    ev_run(k_loop, EVRUN_NOWAIT);
    cr_assert_eq(k_calls, 2);
    ev_ref(k_loop); /* as libev asks before stopping an unref'ed watcher */

    /* EVRUN_ONCE blocks until the watcher fires, runs it, returns. */
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, k_cb, NULL, NULL), 0);
    l.delay = 20 * MS;
    cr_assert_eq(pthread_create(&t, NULL, notify_later, &l), 0);
    ev_run(k_loop, EVRUN_ONCE);
    cr_assert_eq(k_calls, 3, "EVRUN_ONCE returned with the callback run");
    cr_assert_eq(pthread_join(t, NULL), 0);

    /* EVRUN_NOWAIT: nothing ready, nothing runs; five due waits with a
     * budget of 2 take three passes (2, 2, 1), then nothing is left. */
    ev_run(k_loop, EVRUN_NOWAIT);
    cr_assert_eq(k_calls, 3);
    cr_assert_eq(nq_ev_set_budget(&w, 2), 0);
    for (int i = 0; i < 5; i++)
        cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, k_cb, NULL, NULL), 0);
    cr_assert_eq(nq_notify(q, h, 3), 5);
    const int expect[] = {5, 7, 8, 8, 8};
    for (int i = 0; i < 5; i++) {
        ev_run(k_loop, EVRUN_NOWAIT);
        cr_assert_eq(k_calls, expect[i], "NOWAIT pass %d: %d callbacks", i, k_calls);
    }
    cr_assert_not(fd_readable(nq_port_fd(p)));
    teardown(k_loop, &w, p, q);
    cr_assert_eq(ev_run(k_loop, EVRUN_NOWAIT), 0);
    ev_loop_destroy(k_loop);
}

/* One ev_unref after nq_ev_start is enough even while a wait has a
 * deadline: the adapter's timer does not count as a second watcher (and a
 * timer that fires keeps the count balanced). */
Test(adapter_ev, ev_unref_lets_ev_run_return_with_a_deadline_pending, .timeout = 30) {
    k_loop = ev_loop_new(0);
    cr_assert_not_null(k_loop);
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "deadline");
    nq_port_t *p = new_port();
    nq_ev_t w;
    cr_assert_eq(nq_ev_init(&w, p), 0);
    cr_assert_eq(nq_ev_start(k_loop, &w), 0);
    ev_unref(k_loop);
    k_calls = 0;
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, 500, k_cb, NULL, NULL), 0);
    int64_t t0 = now_ns();
    cr_assert_eq(ev_run(k_loop, 0), 0);
    cr_assert_lt(now_ns() - t0, 250 * MS, "a pending deadline kept ev_run going");
    cr_assert_eq(k_calls, 0);
    /* A short deadline fires (the loop counts no active watcher, so
     * EVRUN_ONCE does not block: poll it), and the count stays balanced
     * afterwards: ev_run still returns at once. */
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, 5, k_cb, NULL, NULL), 0);
    for (int i = 0; i < 2000 && k_calls == 0; i++) {
        ev_run(k_loop, EVRUN_NOWAIT);
        sleep_ns(MS / 2);
    }
    cr_assert_eq(k_calls, 1001, "the 5 ms wait did not time out"); /* k_cb: 1 + 1000 for a status */
    t0 = now_ns();
    cr_assert_eq(ev_run(k_loop, 0), 0);
    cr_assert_lt(now_ns() - t0, 250 * MS, "the count went off balance after the timer fired");
    ev_ref(k_loop);
    teardown(k_loop, &w, p, q);
    ev_loop_destroy(k_loop);
}

/* A port callback that runs a nested ev_run (nq__ev_dispatch allows it)
 * waiting 20 ms for a timer: the port's fd must not stay readable through
 * it, or libev's level-triggered io watcher fires every iteration (the
 * nested dispatch is refused with NQ_EBUSY) and the nested loop spins. */
static struct ev_loop *n_loop;
static int n_fired;
static unsigned n_iters;
static void n_on_timer(struct ev_loop *l, ev_timer *t, int ev) {
    (void)l, (void)t, (void)ev;
    n_fired = 1;
}
static void n_cb(nq_sub_t *s, void *d) {
    (void)d;
    int64_t v;
    while (nq_sub_try_recv(s, &v) == 0) {
    }
    if (n_iters != 0)
        return;
    ev_timer t;
    ev_timer_init(&t, n_on_timer, 0.02, 0);
    ev_timer_start(n_loop, &t);
    unsigned i0 = ev_iteration(n_loop);
    while (!n_fired)
        ev_run(n_loop, EVRUN_ONCE);
    n_iters = ev_iteration(n_loop) - i0;
    ev_break(n_loop, EVBREAK_ALL);
}
Test(adapter_ev, a_nested_ev_run_in_a_port_callback_does_not_spin_on_the_fd, .timeout = 30) {
    n_loop = ev_loop_new(EVFLAG_AUTO);
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "nested");
    nq_port_t *p = new_port();
    nq_sub_opts_t o = {0};
    o.capacity = 16;
    nq_sub_t *s = NULL;
    cr_assert_eq(nq_port_subscribe(p, q, h, &o, n_cb, NULL, &s), 0);
    nq_ev_t w;
    cr_assert_eq(nq_ev_init(&w, p), 0);
    cr_assert_eq(nq_ev_start(n_loop, &w), 0);
    cr_assert_geq(nq_notify(q, h, 1), 0);
    ev_run(n_loop, 0);
    cr_assert(n_fired);
    cr_assert_lt(n_iters, 10, "the nested ev_run spun %u times in 20 ms", n_iters);
    nq_ev_close(&w);
    nq_sub_close(s);
    nq_port_free(p);
    nq_queue_free(q);
    ev_loop_destroy(n_loop);
}

/* --- 6. fairness ---------------------------------------------------------- */

/* Four subscriptions on one handle, each taking one arg a callback, start
 * with a backlog of F_CAP args each (more callbacks than the loop can run in
 * the test's time, even if the producers stall), and four producers keep
 * them full. A 2 ms repeating ev_timer must keep firing while that work is
 * pending, and no loop iteration may run more than the budget. */
#define F_TICKS  50 /* 2 ms ticks the flood must let through */
#define F_BUDGET 3u /* callbacks per loop wakeup */
#define F_SUBS   4
#define F_CAP    (1u << 16) /* backlog per subscription */
/* The ticks may take this many times their nominal time: a loop starved
 * by the flood never gets them at all (the run gives up after 15 s), while
 * a loop on a crowded 2-vCPU machine under a sanitizer may be descheduled
 * for long stretches. The real fairness check is f_contended below. */
#define F_SLACK 100

static long f_ticks, f_contended, f_cbs, f_iter_cbs, f_max_iter, f_at_budget, f_wrong_thread;
static int f_tid, f_port_fd;

static void f_sub_cb(nq_sub_t *s, void *data) {
    (void)data;
    f_cbs++;
    f_iter_cbs++;
    f_wrong_thread += cur_tid() != f_tid;
    int64_t arg;
    (void)nq_sub_recv_batch(s, &arg, 1); /* only part: called again */
}

static void f_tick_cb(struct ev_loop *loop, ev_timer *t, int revents) {
    (void)t;
    (void)revents;
    f_ticks++;
    if (fd_readable(f_port_fd))
        f_contended++; /* the tick came while port work was pending */
    if (f_ticks == F_TICKS)
        ev_break(loop, EVBREAK_ALL);
}

/* Once per loop iteration, before it blocks: callbacks since the last. */
static void f_prepare_cb(struct ev_loop *loop, ev_prepare *pw, int revents) {
    (void)loop;
    (void)pw;
    (void)revents;
    if (f_iter_cbs > f_max_iter)
        f_max_iter = f_iter_cbs;
    if (f_iter_cbs == (long)F_BUDGET)
        f_at_budget++;
    f_iter_cbs = 0;
}

Test(adapter_ev, a_flood_cannot_starve_a_timer_and_the_budget_bounds_each_wakeup, .timeout = 60) {
    struct ev_loop *loop = ev_loop_new(0);
    cr_assert_not_null(loop);
    f_tid = cur_tid();
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "flood");
    nq_port_t *p = new_port();
    f_port_fd = nq_port_fd(p);
    nq_ev_t w;
    cr_assert_eq(nq_ev_init(&w, p), 0);
    cr_assert_eq(nq_ev_set_budget(&w, F_BUDGET), 0);
    cr_assert_eq(nq_ev_start(loop, &w), 0);
    for (int i = 0; i < F_SUBS; i++) {
        nq_sub_opts_t o = sopts(F_CAP, NQ_DROP_OLDEST);
        cr_assert_eq(nq_port_subscribe(p, q, h, &o, f_sub_cb, NULL, NULL), 0);
    }
    for (uint32_t i = 0; i < F_CAP; i++)
        cr_assert_eq(nq_notify(q, h, (int64_t)i), F_SUBS);
    ev_timer tick;
    ev_timer_init(&tick, f_tick_cb, 0.002, 0.002);
    ev_prepare prep;
    ev_prepare_init(&prep, f_prepare_cb);
    ev_prepare_start(loop, &prep);

    prod_t pr;
    prod_start(&pr, q, h, NPROD, 0);
    ev_now_update(loop);
    ev_timer_start(loop, &tick);
    int64_t t0 = now_ns();
    ev_run(loop, 0);
    int64_t took = now_ns() - t0;
    int running = atomic_load(&pr.running);
    int64_t sent = prod_join(&pr);

    cr_assert_eq(running, NPROD, "the producers gave up before the ticks were in");
    cr_assert_eq(f_ticks, F_TICKS);
    cr_assert_eq(f_wrong_thread, 0);
    /* The ticks came while the flood was pending ... */
    cr_assert_geq(f_contended, F_TICKS * 4 / 5, "only %ld of %d ticks came with work pending",
                  f_contended, F_TICKS);
    /* ... and at least 1% of the nominal 500 a second (F_SLACK). */
    cr_assert_lt(took, (int64_t)F_TICKS * 2 * MS * F_SLACK, "%d ticks of 2 ms took %.1f ms",
                 F_TICKS, (double)took / MS);
    /* The budget held every wakeup, and the flood reached it. */
    cr_assert_leq(f_max_iter, (long)F_BUDGET, "%ld callbacks in one loop iteration", f_max_iter);
    cr_assert_gt(f_at_budget, 0);
    nq_port_stats_t st = pstats(p);
    cr_assert_eq(st.callbacks, (uint64_t)f_cbs);
    cr_assert_leq(st.efd_writes, st.dispatches + 1);
    cr_log_info("fairness: %d ticks in %.1f ms, %ld with work pending; %ld callbacks, %llu "
                "dispatches, %lld sent",
                F_TICKS, (double)took / MS, f_contended, f_cbs, (unsigned long long)st.dispatches,
                (long long)sent);
    ev_timer_stop(loop, &tick);
    ev_prepare_stop(loop, &prep);
    teardown(loop, &w, p, q);
    ev_loop_destroy(loop);
}

/* --- 7. nq_ev_stop inside a port callback ------------------------------- */

/* Like a stopped libev watcher, a watcher stopped inside one of its port
 * callbacks calls back no more: that dispatch stops after the callback, the
 * rest stays ready and runs after the next nq_ev_start. */
static struct ev_loop *sp_loop;
static nq_ev_t sp_w;
static int sp_n, sp_stop_rc = 1, sp_calls[10], sp_active_after;

static void sp_cb(void *data, int status, int64_t arg) {
    (void)arg;
    int i = (int)(intptr_t)data;
    if (status != 0)
        sp_stop_rc = -100;
    sp_calls[i]++;
    if (++sp_n == 1) {
        sp_stop_rc = nq_ev_stop(sp_loop, &sp_w);
        sp_active_after = nq_ev_is_active(&sp_w);
    }
    if (sp_n == 10)
        ev_break(sp_loop, EVBREAK_ALL);
}

Test(adapter_ev, stop_inside_a_port_callback_stops_that_dispatch_and_start_resumes, .timeout = 30) {
    sp_loop = ev_loop_new(0);
    cr_assert_not_null(sp_loop);
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "ten");
    nq_port_t *p = new_port();
    for (int i = 0; i < 10; i++)
        cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, sp_cb, (void *)(intptr_t)i, NULL), 0);
    cr_assert_eq(nq_notify(q, h, 7), 10);
    cr_assert_eq(nq_ev_init(&sp_w, p), 0);
    cr_assert_eq(nq_ev_start(sp_loop, &sp_w), 0);
    cr_assert_eq(ev_run(sp_loop, 0), 0, "the stopped watcher left nothing active");
    cr_assert_eq(sp_stop_rc, 0);
    cr_assert_eq(sp_active_after, 0);
    cr_assert_eq(sp_n, 1, "%d callbacks ran in the dispatch that stopped the watcher", sp_n);
    cr_assert_eq(pstats(p).callbacks, 1);
    cr_assert(fd_readable(nq_port_fd(p)), "the rest is still ready");
    cr_assert_eq(nq_port_owner(p), &sp_w, "the port is still the watcher's");

    cr_assert_eq(nq_ev_start(sp_loop, &sp_w), 0);
    ev_run(sp_loop, 0);
    cr_assert_eq(sp_n, 10);
    for (int i = 0; i < 10; i++)
        cr_assert_eq(sp_calls[i], 1, "wait %d: %d callbacks", i, sp_calls[i]);
    teardown(sp_loop, &sp_w, p, q);
    ev_loop_destroy(sp_loop);
}

/* A nested ev_run inside a port callback while the watcher's timer is armed
 * for a deadline already due (budget 1 left two due timeouts): the timer
 * must not fire every microsecond while the nested loop runs. */
static struct ev_loop *nt_loop;
static int nt_calls, nt_fired;
static unsigned nt_iters;

static void nt_on_timer(struct ev_loop *loop, ev_timer *t, int revents) {
    (void)loop;
    (void)t;
    (void)revents;
    nt_fired = 1;
}

static void nt_cb(void *data, int status, int64_t arg) {
    (void)data;
    (void)arg;
    (void)status;
    if (++nt_calls > 1) {
        if (nt_calls == 3)
            ev_break(nt_loop, EVBREAK_ALL);
        return;
    }
    ev_timer t;
    ev_timer_init(&t, nt_on_timer, 0.02, 0);
    ev_timer_start(nt_loop, &t);
    unsigned i0 = ev_iteration(nt_loop);
    while (!nt_fired)
        ev_run(nt_loop, EVRUN_ONCE);
    nt_iters = ev_iteration(nt_loop) - i0;
}

Test(adapter_ev, a_nested_ev_run_does_not_spin_on_a_due_deadline, .timeout = 30) {
    nt_loop = ev_loop_new(EVFLAG_AUTO);
    cr_assert_not_null(nt_loop);
    nq_queue_t *q = new_queue();
    nq_handle_t h = reg(q, "due");
    nq_port_t *p = new_port();
    for (int i = 0; i < 3; i++)
        cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, 0, nt_cb, NULL, NULL), 0);
    nq_ev_t w;
    cr_assert_eq(nq_ev_init(&w, p), 0);
    cr_assert_eq(nq_ev_set_budget(&w, 1), 0);
    cr_assert_eq(nq_ev_start(nt_loop, &w), 0);
    ev_run(nt_loop, 0);
    cr_assert_eq(nt_calls, 3);
    cr_assert(nt_fired);
    cr_log_info("a nested ev_run of 20 ms with two due timeouts left: %u iterations", nt_iters);
    cr_assert_lt(nt_iters, 10, "the nested ev_run spun %u times in 20 ms", nt_iters);
    cr_assert_eq(pstats(p).deadlines_expired, 3);
    teardown(nt_loop, &w, p, q);
    ev_loop_destroy(nt_loop);
}
