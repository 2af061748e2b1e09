/* Black-box acceptance tests of the libev adapter (issue 4), from <nq/ev.h>
 * and API.md only: real libev loops (ev_default_loop and ev_loop_new) on the
 * test's thread, 4 producer threads, timeouts within [timeout, timeout +
 * 20 ms], stop and close while the producers notify, double init and close,
 * start/stop habits, and fairness to a repeating timer during a flood. */
#include <nq/ev.h>

#include "bb_common.h"

enum { DEFLOOP, NEWLOOP };
static const char *loop_names[] = {"ev_default_loop", "ev_loop_new"};

static struct ev_loop *make_loop(int which) {
    struct ev_loop *l = which == DEFLOOP ? ev_default_loop(0) : ev_loop_new(EVFLAG_AUTO);
    cr_assert_not_null(l);
    ev_now_update(l);
    return l;
}

static void drop_loop(struct ev_loop *l, int which) {
    if (which == NEWLOOP)
        ev_loop_destroy(l);
}

struct evctx {
    struct ev_loop *loop;
    nq_ev_t *w;
    struct bb_flood *f;
    ev_timer watchdog, aux;
    int watchdog_fired;
    int stopped; /* nq_ev_stop returned */
};

static void watchdog_cb(struct ev_loop *l, ev_timer *t, int revents) {
    (void)revents;
    struct evctx *c = t->data;
    c->watchdog_fired = 1;
    ev_break(l, EVBREAK_ALL);
}

static void evctx_init(struct evctx *c, struct ev_loop *l) {
    memset(c, 0, sizeof(*c));
    c->loop = l;
    ev_timer_init(&c->watchdog, watchdog_cb, 60., 0.);
    c->watchdog.data = c;
    ev_timer_init(&c->aux, NULL, 0., 0.);
    c->aux.data = c;
}

/* Stop then close, on the loop thread: no callback after the stop. */
static void stop_and_close(struct evctx *c, int free_it) {
    int rc = nq_ev_stop(c->loop, c->w);
    if (rc != 0)
        nqt_thread_fail("nq_ev_stop: %d (%s)", rc, nq_err_name(rc));
    if (c->f != NULL)
        c->f->closed = 1;
    c->stopped = 1;
    rc = nq_ev_close(c->w);
    if (rc != 0)
        nqt_thread_fail("nq_ev_close: %d (%s)", rc, nq_err_name(rc));
    rc = nq_ev_close(c->w);
    if (rc != NQ_ECLOSED)
        nqt_thread_fail("second nq_ev_close: %d (%s), want NQ_ECLOSED", rc, nq_err_name(rc));
    if (free_it) {
        memset(c->w, 0xa5, sizeof(*c->w));
        free(c->w);
        c->w = NULL;
    }
    ev_timer_stop(c->loop, &c->watchdog);
}

/* ---- 100k notifies from 4 threads: waits re-armed + subscriptions ---- */
static void flood_done(struct bb_flood *f) {
    stop_and_close(f->user, 1); /* inside a port callback; frees the watcher */
}

static void run_flood(int which, unsigned budget, int nap_us) {
    struct ev_loop *l = make_loop(which);
    struct evctx c;
    struct bb_flood f;
    nq_port_t *port;
    evctx_init(&c, l);
    cr_assert_eq(nq_port_new(&port), 0);
    bb_flood_init(&f, port, BB_TOTAL / BB_NH, 1);
    f.user = &c;
    f.on_done = flood_done;
    f.nap_us = nap_us;
    c.f = &f;
    c.w = malloc(sizeof(nq_ev_t));
    cr_assert_not_null(c.w);
    cr_assert_eq(nq_ev_init(c.w, port), 0);
    if (budget > 0)
        cr_assert_eq(nq_ev_set_budget(c.w, budget), 0);
    cr_assert_eq(nq_ev_start(l, c.w), 0);
    ev_timer_start(l, &c.watchdog);
    int64_t t0 = now_ns();
    bb_flood_start_producers(&f);
    ev_run(l, 0);
    int64_t t1 = now_ns();
    cr_assert_not(c.watchdog_fired, "not complete after 60 s: sent %lld", bb_sent_total(&f));
    bb_flood_stop_producers(&f);
    cr_assert(c.stopped);
    char what[64];
    snprintf(what, sizeof(what), "ev flood (%s)", loop_names[which]);
    bb_flood_assert_exact(&f, what);
    BB_FIG("%s: budget %u, producers nap %d us every 4 notifies, %.1f ms", what,
           budget ? budget : NQ_EV_DEFAULT_BUDGET, nap_us, (t1 - t0) / 1e6);
    cr_assert_null(nq_port_owner(port));
    bb_flood_free_port(&f);
    nq_queue_free(f.q);
    drop_loop(l, which);
}

Test(bb_ev, flood_100k_default_loop, .timeout = 120) {
    run_flood(DEFLOOP, 0, 0);
}

Test(bb_ev, flood_100k_loop_new_small_budget_napping_producers, .timeout = 120) {
    run_flood(NEWLOOP, 16, 20);
}

/* ---- timeouts within [timeout, timeout + 20 ms] ---- */
struct tctx {
    struct evctx c;
    struct bb_tw_set s;
};

static void tw_on_all(struct bb_tw_set *s) {
    struct tctx *t = s->user;
    if (s->n == 8)
        stop_and_close(&t->c, 0);
}

static void tw_loop_timer(struct ev_loop *l, ev_timer *tm, int revents) {
    (void)l;
    (void)revents;
    struct tctx *t = tm->data;
    bb_tw_start(&t->s, "loop3", 3); /* from a loop callback, outside any dispatch */
}

static int timeouts_round(int which, int round) {
    struct ev_loop *l = make_loop(which);
    struct tctx t;
    nq_port_t *port;
    nq_ev_t w;
    evctx_init(&t.c, l);
    cr_assert_eq(nq_port_new(&port), 0);
    bb_tw_init(&t.s, port);
    t.s.user = &t;
    t.s.on_fire = bb_tw_on_fire_std;
    t.s.on_all = tw_on_all;
    bb_tw_start(&t.s, "pre50", 50); /* before the watcher is attached or started */
    t.c.w = &w;
    cr_assert_eq(nq_ev_init(&w, port), 0);
    cr_assert_eq(nq_ev_start(l, &w), 0);
    bb_tw_start_std(&t.s);
    ev_now_update(l);
    ev_timer_init(&t.c.aux, tw_loop_timer, BB_TW_LOOP_TIMER_MS / 1000., 0.);
    t.c.aux.data = &t;
    ev_timer_start(l, &t.c.aux);
    ev_timer_set(&t.c.watchdog, 5., 0.);
    ev_timer_start(l, &t.c.watchdog);
    ev_run(l, 0);
    cr_assert_not(t.c.watchdog_fired, "waits missing after 5 s: %d of %d fired", t.s.fired, t.s.n);
    cr_assert_eq(atomic_load(&nqt_errors), 0, "%s", nqt_first_error);
    cr_assert_eq(t.s.n, 8);
    char what[64];
    snprintf(what, sizeof(what), "ev timeouts (%s)", loop_names[which]);
    int late = bb_tw_check(&t.s, what, round);
    nq_port_free(port);
    bb_tw_free(&t.s);
    drop_loop(l, which);
    return late;
}

static void run_timeouts(int which) {
    int late = 1;
    for (int r = 1; r <= BB_ROUNDS && late; r++)
        late = timeouts_round(which, r);
    cr_assert_eq(late, 0, "a timeout fired more than 20 ms late in each of %d rounds", BB_ROUNDS);
}

Test(bb_ev, timeouts_within_20ms_default_loop, .timeout = 60) {
    run_timeouts(DEFLOOP);
}

Test(bb_ev, timeouts_within_20ms_loop_new, .timeout = 60) {
    run_timeouts(NEWLOOP);
}

/* ---- stop / close while 4 producers keep notifying ---- */
enum { CLOSE_IN_CB, STOP_FROM_TIMER_RESTART, CLOSE_BEFORE_RUN };

static void close_on_cb(struct bb_flood *f) {
    struct evctx *c = f->user;
    if (!f->closed && f->cbs_total >= 200)
        stop_and_close(c, 1); /* inside a port callback, and free the watcher */
}

struct restart {
    struct evctx *c;
    int phase;
    int64_t quiet_until;
    long cbs_at_stop1, cbs_at_restart, cbs_at_stop2;
};
static struct restart rs;

/* Every 10 ms: once callbacks have run, stop; 30 ms later (no callback may
 * run meanwhile), start again; once callbacks have run again, stop and
 * close for good. Progress, not time, moves it on: a starved loop (see the
 * report) only makes it slower. */
static void restart_timer_cb(struct ev_loop *l, ev_timer *t, int revents) {
    (void)revents;
    struct evctx *c = rs.c;
    struct bb_flood *f = c->f;
    if (rs.phase == 0 && f->cbs_total > 0) {
        int rc = nq_ev_stop(l, c->w);
        if (rc != 0)
            nqt_thread_fail("nq_ev_stop: %s", nq_err_name(rc));
        f->closed = 1;
        rs.cbs_at_stop1 = f->cbs_total;
        if (nq_ev_stop(l, c->w) != 0)
            nqt_thread_fail("stopping a stopped watcher is not a no-op");
        if (nq_ev_is_active(c->w) != 0)
            nqt_thread_fail("nq_ev_is_active after stop");
        rs.quiet_until = now_ns() + 30 * 1000000LL;
        rs.phase = 1;
    } else if (rs.phase == 1 && now_ns() >= rs.quiet_until) {
        f->closed = 0;
        rs.cbs_at_restart = f->cbs_total;
        int rc = nq_ev_start(l, c->w);
        if (rc != 0)
            nqt_thread_fail("nq_ev_start again: %s", nq_err_name(rc));
        if (nq_ev_is_active(c->w) != 1)
            nqt_thread_fail("nq_ev_is_active after restart");
        rs.phase = 2;
    } else if (rs.phase == 2 && f->cbs_total > rs.cbs_at_restart) {
        rs.cbs_at_stop2 = f->cbs_total;
        ev_timer_stop(l, t);
        stop_and_close(c, 1);
    }
}

static void quiet_cb(struct ev_loop *l, ev_timer *t, int revents) {
    (void)l;
    (void)t;
    (void)revents;
}

static void run_close(int which, int how) {
    static const char *names[] = {"stop+close in a port callback",
                                  "stop from a timer, restart, stop+close",
                                  "stop+close before ev_run"};
    struct ev_loop *l = make_loop(which);
    struct evctx c;
    struct bb_flood f;
    nq_port_t *port;
    evctx_init(&c, l);
    cr_assert_eq(nq_port_new(&port), 0);
    bb_flood_init(&f, port, 0, 0);
    f.user = &c;
    c.f = &f;
    c.w = malloc(sizeof(nq_ev_t));
    cr_assert_not_null(c.w);
    cr_assert_eq(nq_ev_init(c.w, port), 0);
    cr_assert_eq(nq_ev_start(l, c.w), 0);
    ev_timer_set(&c.watchdog, 30., 0.);
    ev_timer_start(l, &c.watchdog);
    bb_flood_start_producers(&f);
    if (how == CLOSE_IN_CB) {
        f.on_cb = close_on_cb;
    } else if (how == STOP_FROM_TIMER_RESTART) {
        memset(&rs, 0, sizeof(rs));
        rs.c = &c;
        ev_timer_init(&c.aux, restart_timer_cb, 0.01, 0.01);
        ev_timer_start(l, &c.aux);
    } else {
        while (bb_sent_total(&f) < 1000)
            sched_yield();
        stop_and_close(&c, 1);
    }
    ev_run(l, 0);
    cr_assert_not(c.watchdog_fired, "never closed: %ld callbacks", f.cbs_total);
    cr_assert(c.stopped);
    long cbs_at_close = f.cbs_total;
    long long sent_at_close = bb_sent_total(&f);
    cr_assert_null(nq_port_owner(port), "the port is still attached after nq_ev_close");
    /* The loop goes on for 30 ms while the producers still notify. */
    ev_timer_init(&c.aux, quiet_cb, 0.03, 0.);
    ev_timer_start(l, &c.aux);
    ev_run(l, 0);
    bb_flood_free_port(&f); /* while the producers still notify */
    bb_flood_stop_producers(&f);
    long long sent = bb_sent_total(&f);
    nq_queue_free(f.q);
    bb_flood_assert_clean(&f, "ev close");
    cr_assert_eq(f.sub_cbs_in_free, 0, "subscription callbacks inside nq_port_free");
    if (how == CLOSE_BEFORE_RUN)
        cr_assert_eq(cbs_at_close, 0);
    if (how == STOP_FROM_TIMER_RESTART) {
        cr_assert_gt(rs.cbs_at_stop1, 0, "no callback before the first stop");
        cr_assert_eq(rs.cbs_at_restart, rs.cbs_at_stop1, "callbacks while stopped");
        cr_assert_gt(rs.cbs_at_stop2, rs.cbs_at_restart, "no callback after the restart");
        BB_FIG("ev %s: %ld callbacks before the stop, none while stopped, %ld after the "
               "restart",
               loop_names[which], rs.cbs_at_stop1, rs.cbs_at_stop2 - rs.cbs_at_restart);
    }
    BB_FIG("ev close (%s) %s: %ld callbacks before close, %lld notifies sent by then, "
           "%lld in all; 0 callbacks after; nq_port_free ran %ld wait callbacks with "
           "NQ_ECANCELED and %ld with a result",
           loop_names[which], names[how], cbs_at_close, sent_at_close, sent, f.cancelled_in_free,
           f.completed_in_free);
    drop_loop(l, which);
}

Test(bb_ev, close_in_callback_while_producers_notify_default_loop, .timeout = 60) {
    run_close(DEFLOOP, CLOSE_IN_CB);
}

Test(bb_ev, close_in_callback_while_producers_notify_loop_new, .timeout = 60) {
    run_close(NEWLOOP, CLOSE_IN_CB);
}

Test(bb_ev, stop_restart_close_while_producers_notify, .timeout = 60) {
    run_close(NEWLOOP, STOP_FROM_TIMER_RESTART);
}

Test(bb_ev, close_before_run_while_producers_notify, .timeout = 60) {
    run_close(DEFLOOP, CLOSE_BEFORE_RUN);
}

/* ---- double init / attach, double close, start/stop habits ---- */
Test(bb_ev, double_init_and_close_rejected, .timeout = 30) {
    struct ev_loop *l = make_loop(DEFLOOP);
    struct ev_loop *l2 = make_loop(NEWLOOP);
    nq_port_t *port;
    nq_ev_t w, w2, zero;
    memset(&zero, 0, sizeof(zero));
    cr_assert_eq(nq_port_new(&port), 0);
    cr_assert_eq(nq_ev_init(NULL, port), NQ_EINVAL);
    cr_assert_eq(nq_ev_init(&w, NULL), NQ_EINVAL);
    cr_assert_eq(nq_ev_start(NULL, &zero), NQ_EINVAL);
    cr_assert_eq(nq_ev_start(l, NULL), NQ_EINVAL);
    cr_assert_eq(nq_ev_start(l, &zero), NQ_EINVAL, "start of a never-initialised watcher");
    cr_assert_eq(nq_ev_stop(l, &zero), NQ_EINVAL);
    cr_assert_eq(nq_ev_is_active(NULL), NQ_EINVAL);
    cr_assert_eq(nq_ev_is_active(&zero), NQ_EINVAL);
    cr_assert_eq(nq_ev_set_budget(NULL, 1), NQ_EINVAL);

    cr_assert_eq(nq_ev_init(&w, port), 0);
    cr_assert_not_null(nq_port_owner(port));
    int rc = nq_ev_init(&w2, port);
    cr_assert_eq(rc, NQ_EBUSY, "second nq_ev_init on an attached port: %d (%s)", rc,
                 nq_err_name(rc));
    int someone;
    cr_assert_eq(nq_port_attach(port, &someone), NQ_EBUSY);
    cr_assert_eq(nq_ev_is_active(&w), 0);
    cr_assert_eq(nq_ev_start(l, &w), 0);
    cr_assert_eq(nq_ev_start(l, &w), 0, "starting a started watcher does nothing");
    cr_assert_eq(nq_ev_is_active(&w), 1);
    rc = nq_ev_start(l2, &w);
    cr_assert_eq(rc, NQ_EBUSY, "start on a second loop while running: %d (%s)", rc,
                 nq_err_name(rc));
    cr_assert_eq(nq_ev_stop(l, &w), 0);
    cr_assert_eq(nq_ev_stop(l, &w), 0, "stopping a stopped watcher does nothing");
    cr_assert_eq(nq_ev_is_active(&w), 0);
    /* Stopped, it may start on the other loop. */
    cr_assert_eq(nq_ev_start(l2, &w), 0);
    cr_assert_eq(nq_ev_is_active(&w), 1);
    cr_assert_eq(nq_ev_close(&w), 0, "close stops a running watcher");
    rc = nq_ev_close(&w);
    cr_assert_eq(rc, NQ_ECLOSED, "double close: %d (%s)", rc, nq_err_name(rc));
    cr_assert_eq(nq_ev_start(l, &w), NQ_ECLOSED);
    cr_assert_eq(nq_ev_stop(l, &w), NQ_ECLOSED);
    cr_assert_eq(nq_ev_is_active(&w), NQ_ECLOSED);
    cr_assert_null(nq_port_owner(port));
    /* Nothing of the watcher is left on either loop: both runs return. */
    ev_run(l2, EVRUN_NOWAIT);
    cr_assert_eq(ev_run(l2, 0), 0, "ev_loop_new loop still has active watchers");
    cr_assert_eq(ev_run(l, 0), 0);
    /* Closed, the port takes a new watcher. */
    cr_assert_eq(nq_ev_init(&w2, port), 0);
    cr_assert_eq(nq_ev_close(&w2), 0);
    nq_port_free(port);
    ev_loop_destroy(l2);
}

/* ---- libev habits: ev_unref, EVRUN_NOWAIT / EVRUN_ONCE ---- */
struct rctx {
    int cbs, status, tid;
    int64_t t0, elapsed;
    nq_queue_t *q;
    nq_handle_t hd;
};

static void r_cb(void *data, int status, int64_t arg) {
    (void)arg;
    struct rctx *r = data;
    r->cbs++;
    r->status = status;
    r->tid = cur_tid();
    r->elapsed = now_ns() - r->t0;
}

static void *notify_later(void *p) {
    struct rctx *r = p;
    usleep(10000);
    nq_notify(r->q, r->hd, 9);
    return NULL;
}

static void run_habits(int which) {
    struct ev_loop *l = make_loop(which);
    struct rctx r;
    memset(&r, 0, sizeof(r));
    nq_port_t *port;
    nq_ev_t w;
    int me = cur_tid();
    cr_assert_eq(nq_port_new(&port), 0);
    cr_assert_eq(nq_queue_new(NULL, &r.q), 0);
    cr_assert_eq(nq_register(r.q, "habits", &r.hd), 0);
    cr_assert_eq(nq_ev_init(&w, port), 0);
    cr_assert_eq(nq_ev_start(l, &w), 0);
    /* An active watcher keeps ev_run going; ev_unref after start lets it end. */
    ev_unref(l);
    int64_t t0 = now_ns();
    ev_run(l, 0);
    int64_t d = now_ns() - t0;
    cr_assert_lt(d, 100 * 1000000LL, "ev_run with only an unref'd watcher: %.1f ms", d / 1e6);
    ev_ref(l);
    /* NOWAIT runs a ready callback in one call. */
    cr_assert_eq(nq_port_wait(port, r.q, r.hd, NQ_SEQ_NEXT, -1, r_cb, &r, NULL), 0);
    cr_assert_eq(nq_notify(r.q, r.hd, 3), 1);
    ev_run(l, EVRUN_NOWAIT);
    cr_assert_eq(r.cbs, 1, "one EVRUN_NOWAIT did not run the ready callback");
    cr_assert_eq(r.status, 0);
    cr_assert_eq(r.tid, me);
    /* ONCE blocks until a notify from another thread arrives. */
    cr_assert_eq(nq_port_wait(port, r.q, r.hd, NQ_SEQ_NEXT, -1, r_cb, &r, NULL), 0);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, notify_later, &r), 0);
    ev_run(l, EVRUN_ONCE);
    pthread_join(th, NULL);
    cr_assert_eq(r.cbs, 2, "one EVRUN_ONCE did not deliver the notify from another thread");
    cr_assert_eq(r.tid, me);
    /* ONCE with a 30 ms timeout. */
    int late = 1, calls = 0;
    for (int round = 1; round <= BB_ROUNDS && late; round++) {
        int before = r.cbs;
        r.t0 = now_ns();
        cr_assert_eq(nq_port_wait(port, r.q, r.hd, NQ_SEQ_NEXT, 30, r_cb, &r, NULL), 0);
        for (calls = 0; r.cbs == before && calls < 10; calls++)
            ev_run(l, EVRUN_ONCE);
        cr_assert_eq(r.cbs, before + 1);
        cr_assert_eq(r.status, NQ_ETIMEDOUT);
        cr_assert_geq(r.elapsed, 30 * 1000000LL, "early: %.3f ms", r.elapsed / 1e6);
        late = r.elapsed > (30 + BB_SLACK_MS) * 1000000LL;
        BB_FIG("ev habits (%s) round %d: EVRUN_ONCE 30 ms timeout after %.2f ms (%d calls)",
               loop_names[which], round, r.elapsed / 1e6, calls);
    }
    cr_assert_eq(late, 0);
    cr_assert_eq(nq_ev_stop(l, &w), 0);
    cr_assert_eq(nq_ev_close(&w), 0);
    nq_port_free(port);
    nq_queue_free(r.q);
    drop_loop(l, which);
}

Test(bb_ev, unref_nowait_once_default_loop, .timeout = 30) {
    run_habits(DEFLOOP);
}

Test(bb_ev, unref_nowait_once_loop_new, .timeout = 30) {
    run_habits(NEWLOOP);
}

/* ---- fairness: a repeating timer keeps firing during a flood ---- */
struct fctx {
    struct evctx c;
    struct bb_flood f;
    ev_timer tick, end;
    int64_t last_tick, max_gap;
    int ticks, ticks_pending, flooding;
    long cbs_at_end;
    struct bb_meter per_dispatch;
};

static void f_tick(struct ev_loop *l, ev_timer *t, int revents) {
    (void)l;
    (void)revents;
    struct fctx *x = t->data;
    if (!x->flooding)
        return;
    int64_t n = now_ns();
    if (n - x->last_tick > x->max_gap)
        x->max_gap = n - x->last_tick;
    x->last_tick = n;
    x->ticks++;
    if (bb_readable(nq_port_fd(x->f.port)))
        x->ticks_pending++;
}

static void f_on_cb(struct bb_flood *f) {
    struct fctx *x = f->user;
    bb_meter_count(&x->per_dispatch, f->port);
}

static void f_end(struct ev_loop *l, ev_timer *t, int revents) {
    (void)revents;
    struct fctx *x = t->data;
    int64_t n = now_ns();
    if (n - x->last_tick > x->max_gap)
        x->max_gap = n - x->last_tick;
    x->flooding = 0;
    x->cbs_at_end = x->f.cbs_total;
    ev_timer_stop(l, &x->tick);
    stop_and_close(&x->c, 0);
}

#define FAIR_MS     300
#define FAIR_BUDGET 8

static int fairness_round(int which, int round, int paced) {
    struct ev_loop *l = make_loop(which);
    struct fctx *x = calloc(1, sizeof(*x));
    cr_assert_not_null(x);
    nq_port_t *port;
    nq_ev_t w;
    evctx_init(&x->c, l);
    cr_assert_eq(nq_port_new(&port), 0);
    bb_flood_init(&x->f, port, 0, 0);
    if (paced) {
        bb_flood_add_waits(&x->f, 31);
        x->f.nap_us = 50;
    }
    x->f.user = x;
    x->f.on_cb = f_on_cb;
    x->c.f = &x->f;
    x->c.w = &w;
    cr_assert_eq(nq_ev_init(&w, port), 0);
    cr_assert_eq(nq_ev_set_budget(&w, FAIR_BUDGET), 0);
    cr_assert_eq(nq_ev_start(l, &w), 0);
    bb_flood_start_producers(&x->f);
    while (bb_sent_total(&x->f) < 1000)
        sched_yield();
    x->flooding = 1;
    x->last_tick = now_ns();
    ev_now_update(l);
    ev_timer_init(&x->tick, f_tick, 0.005, 0.005);
    ev_timer_init(&x->end, f_end, FAIR_MS / 1000., 0.);
    x->tick.data = x->end.data = x;
    ev_timer_start(l, &x->tick);
    ev_timer_start(l, &x->end);
    ev_run(l, 0);
    bb_flood_stop_producers(&x->f);
    long long sent = bb_sent_total(&x->f);
    bb_flood_assert_clean(&x->f, "ev fairness");
    cr_assert_leq(x->per_dispatch.max, FAIR_BUDGET, "a dispatch ran %ld callbacks, budget %d",
                  x->per_dispatch.max, FAIR_BUDGET);
    int want = FAIR_MS / 5 / 4;
    int ok = x->ticks >= want && x->max_gap <= 100 * 1000000LL &&
             x->ticks_pending >= x->ticks / 2 && x->cbs_at_end >= 100;
    BB_FIG("ev fairness (%s, %s producers) round %d: %lld notifies in %d ms, %ld port "
           "callbacks (<= %ld per dispatch, budget %d); 5 ms timer fired %d times (want "
           ">= %d), %d of them with port work pending, longest gap %.1f ms%s",
           loop_names[which], paced ? "napping" : "unthrottled", round, sent, FAIR_MS,
           x->cbs_at_end, x->per_dispatch.max, FAIR_BUDGET, x->ticks, want, x->ticks_pending,
           x->max_gap / 1e6, ok ? "" : "  NOT MET, retried");
    if (!ok && round == 3) {
        cr_assert_geq(x->ticks, want, "the timer starved during the flood");
        cr_assert_leq(x->max_gap, 100 * 1000000LL, "the timer stalled %.1f ms", x->max_gap / 1e6);
        cr_assert_geq(x->ticks_pending, x->ticks / 2,
                      "the port had no work pending at most ticks: no flood");
        cr_assert_geq(x->cbs_at_end, 100, "the port starved");
    }
    bb_flood_free_port(&x->f);
    nq_queue_free(x->f.q);
    drop_loop(l, which);
    free(x);
    return ok;
}

Test(bb_ev, fairness_timer_fires_during_flood_default_loop, .timeout = 60) {
    for (int r = 1; r <= 3; r++)
        if (fairness_round(DEFLOOP, r, 1))
            return;
}

Test(bb_ev, fairness_timer_fires_during_flood_loop_new, .timeout = 60) {
    for (int r = 1; r <= 3; r++)
        if (fairness_round(NEWLOOP, r, 1))
            return;
}

/* 4 producers that never pause: see bb_skip_unless_unthrottled. */
Test(bb_ev, fairness_unthrottled_producers, .timeout = 60) {
    bb_skip_unless_unthrottled();
    for (int r = 1; r <= 3; r++)
        if (fairness_round(NEWLOOP, r, 0))
            return;
}

/* libnq-ev, nq-ev.pc; libnq never links libev. */
Test(bb_ev, packaging, .timeout = 30) {
    static const char *const req[] = {"nq", NULL};
    static const char *const libs[] = {"-lnq-ev", NULL};
    bb_check_packaging("nq-ev", req, libs, "libnq-ev.so");
}
