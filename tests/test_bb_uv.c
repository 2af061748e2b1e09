/* Black-box acceptance tests of the libuv adapter (issue 4), from <nq/uv.h>
 * and API.md only: a real libuv loop on the test's thread, 4 producer
 * threads, timeouts within [timeout, timeout + 20 ms], close while the
 * producers notify, double init and close, ref/unref, UV_RUN_ONCE and
 * UV_RUN_NOWAIT, and fairness to a repeating timer during a flood. */
#include <nq/uv.h>

#include "bb_common.h"

/* ---- helpers ---- */
struct uvctx {
    uv_loop_t loop;
    nq_uv_t *h;
    int close_cbs;
    int closed_flag_at_close_cb; /* f->closed was set when close_cb ran */
    int foreign_handles_at_close_cb;
    struct bb_flood *f;
    uv_timer_t watchdog, aux;
    int watchdog_fired;
};

static void walk_count(uv_handle_t *hd, void *arg) {
    struct uvctx *c = arg;
    /* Handles still in the loop that are not the test's own: the adapter's. */
    if (hd != (uv_handle_t *)&c->watchdog && hd != (uv_handle_t *)&c->aux)
        c->foreign_handles_at_close_cb++;
}

static void on_closed(nq_uv_t *h) {
    struct uvctx *c = h->data;
    c->close_cbs++;
    if (cur_tid() != (c->f ? c->f->loop_tid : cur_tid()))
        nqt_thread_fail("close_cb off the loop thread");
    c->closed_flag_at_close_cb = c->f ? c->f->closed : 1;
    /* Both uv handles closed: libuv takes a handle off the loop before its
     * close callback runs, so nothing of the adapter's is left to walk. */
    uv_walk(&c->loop, walk_count, c);
}

/* close_cb that frees the nq_uv_t: ASan catches a later touch. */
static void on_closed_free(nq_uv_t *h) {
    on_closed(h);
    struct uvctx *c = h->data;
    memset(h, 0xa5, sizeof(*h));
    free(h);
    c->h = NULL;
}

static void watchdog_cb(uv_timer_t *t) {
    struct uvctx *c = t->data;
    c->watchdog_fired = 1;
    uv_stop(&c->loop);
}

static void uvctx_init(struct uvctx *c) {
    memset(c, 0, sizeof(*c));
    cr_assert_eq(uv_loop_init(&c->loop), 0);
    cr_assert_eq(uv_timer_init(&c->loop, &c->watchdog), 0);
    c->watchdog.data = c;
    cr_assert_eq(uv_timer_init(&c->loop, &c->aux), 0);
    c->aux.data = c;
}

static void uvctx_close_timers(struct uvctx *c) {
    if (!uv_is_closing((uv_handle_t *)&c->watchdog))
        uv_close((uv_handle_t *)&c->watchdog, NULL);
    if (!uv_is_closing((uv_handle_t *)&c->aux))
        uv_close((uv_handle_t *)&c->aux, NULL);
}

static void uvctx_finish(struct uvctx *c) {
    uvctx_close_timers(c);
    uv_run(&c->loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&c->loop), 0, "uv_loop_close: handles left on the loop");
}

/* ---- 100k notifies from 4 threads: waits re-armed + subscriptions ---- */
static void flood_done(struct bb_flood *f) {
    struct uvctx *c = f->user;
    int rc = nq_uv_close(c->h, on_closed);
    if (rc != 0)
        nqt_thread_fail("nq_uv_close in a callback: %s", nq_err_name(rc));
    f->closed = 1;
    uv_timer_stop(&c->watchdog);
}

static void run_flood(unsigned budget, int set_budget, int nap_us) {
    struct uvctx c;
    struct bb_flood f;
    nq_port_t *port;
    uvctx_init(&c);
    cr_assert_eq(nq_port_new(&port), 0);
    bb_flood_init(&f, port, BB_TOTAL / BB_NH, 1);
    f.user = &c;
    f.on_done = flood_done;
    f.nap_us = nap_us; /* producers that nap spread the 100k over the loop's run */
    c.f = &f;
    c.h = malloc(sizeof(nq_uv_t));
    cr_assert_not_null(c.h);
    cr_assert_eq(nq_uv_init(&c.loop, c.h, port), 0);
    c.h->data = &c;
    if (set_budget)
        cr_assert_eq(nq_uv_set_budget(c.h, budget), 0);
    uv_timer_start(&c.watchdog, watchdog_cb, 60000, 0);
    int64_t t0 = now_ns();
    bb_flood_start_producers(&f);
    uv_run(&c.loop, UV_RUN_DEFAULT);
    int64_t t1 = now_ns();
    cr_assert_not(c.watchdog_fired, "the run did not complete in 60 s: sent %lld",
                  bb_sent_total(&f));
    bb_flood_stop_producers(&f);
    cr_assert_eq(c.close_cbs, 1);
    free(c.h);
    bb_flood_assert_exact(&f, set_budget ? "uv flood (budget set)" : "uv flood");
    BB_FIG("uv flood: budget %u, producers nap %d us every 4 notifies, %.1f ms",
           set_budget ? budget : NQ_UV_DEFAULT_BUDGET, nap_us, (t1 - t0) / 1e6);
    bb_flood_free_port(&f);
    cr_assert_eq(f.cancelled_in_free, 0);
    nq_queue_free(f.q);
    uvctx_finish(&c);
}

Test(bb_uv, flood_100k_from_4_threads, .timeout = 120) {
    run_flood(0, 0, 0);
}

Test(bb_uv, flood_100k_small_budget_napping_producers, .timeout = 120) {
    run_flood(16, 1, 20);
}

/* ---- timeouts within [timeout, timeout + 20 ms] ---- */
struct tctx {
    struct uvctx c;
    struct bb_tw_set s;
};

static void tw_on_all(struct bb_tw_set *s) {
    struct tctx *t = s->user;
    if (s->n != 8)
        return;
    int rc = nq_uv_close(t->c.h, on_closed);
    if (rc != 0)
        nqt_thread_fail("nq_uv_close: %s", nq_err_name(rc));
    uv_timer_stop(&t->c.watchdog);
}

static void tw_loop_timer(uv_timer_t *tm) {
    struct tctx *t = tm->data;
    /* From a loop callback, outside any dispatch (see bb_tw_start_std). */
    bb_tw_start(&t->s, "loop3", 3);
}

static int timeouts_round(int round) {
    struct tctx t;
    nq_port_t *port;
    uvctx_init(&t.c);
    cr_assert_eq(nq_port_new(&port), 0);
    bb_tw_init(&t.s, port);
    t.s.user = &t;
    t.s.on_fire = bb_tw_on_fire_std;
    t.s.on_all = tw_on_all;
    /* Started before the adapter is attached. */
    bb_tw_start(&t.s, "pre50", 50);
    nq_uv_t h;
    t.c.h = &h;
    cr_assert_eq(nq_uv_init(&t.c.loop, &h, port), 0);
    h.data = &t.c;
    bb_tw_start_std(&t.s);
    t.c.aux.data = &t;
    uv_timer_start(&t.c.aux, tw_loop_timer, BB_TW_LOOP_TIMER_MS, 0);
    uv_timer_start(&t.c.watchdog, watchdog_cb, 5000, 0);
    uv_run(&t.c.loop, UV_RUN_DEFAULT);
    cr_assert_not(t.c.watchdog_fired, "waits missing after 5 s: %d of %d fired", t.s.fired, t.s.n);
    cr_assert_eq(atomic_load(&nqt_errors), 0, "%s", nqt_first_error);
    cr_assert_eq(t.c.close_cbs, 1);
    cr_assert_eq(t.s.n, 8);
    int late = bb_tw_check(&t.s, "uv timeouts", round);
    nq_port_free(port);
    bb_tw_free(&t.s);
    uvctx_finish(&t.c);
    return late;
}

Test(bb_uv, timeouts_within_20ms, .timeout = 60) {
    int late = 1;
    for (int r = 1; r <= BB_ROUNDS && late; r++)
        late = timeouts_round(r);
    cr_assert_eq(late, 0, "a timeout fired more than 20 ms late in each of %d rounds", BB_ROUNDS);
}

/* ---- close while 4 producers keep notifying ---- */
enum { CLOSE_IN_CB, CLOSE_FROM_TIMER, CLOSE_BEFORE_RUN };

static void close_now(struct uvctx *c) {
    int rc = nq_uv_close(c->h, on_closed_free);
    if (rc != 0)
        nqt_thread_fail("nq_uv_close: %s", nq_err_name(rc));
    c->f->closed = 1;
    /* Double close while closing. */
    rc = nq_uv_close(c->h, on_closed_free);
    if (rc != NQ_ECLOSED)
        nqt_thread_fail("second nq_uv_close while closing: %d (%s), want NQ_ECLOSED", rc,
                        nq_err_name(rc));
    uv_timer_stop(&c->watchdog);
}

static void close_on_cb(struct bb_flood *f) {
    struct uvctx *c = f->user;
    if (!f->closed && f->cbs_total >= 200)
        close_now(c);
}

static void close_timer_cb(uv_timer_t *t) {
    close_now(t->data);
}

static void quiet_timer_cb(uv_timer_t *t) {
    (void)t;
}

static void run_close(int how) {
    static const char *names[] = {"in a port callback", "from a loop timer", "before uv_run"};
    struct uvctx c;
    struct bb_flood f;
    nq_port_t *port;
    uvctx_init(&c);
    cr_assert_eq(nq_port_new(&port), 0);
    bb_flood_init(&f, port, 0, 0);
    f.user = &c;
    c.f = &f;
    c.h = malloc(sizeof(nq_uv_t));
    cr_assert_not_null(c.h);
    cr_assert_eq(nq_uv_init(&c.loop, c.h, port), 0);
    c.h->data = &c;
    bb_flood_start_producers(&f);
    uv_timer_start(&c.watchdog, watchdog_cb, 30000, 0);
    if (how == CLOSE_IN_CB)
        f.on_cb = close_on_cb;
    else if (how == CLOSE_FROM_TIMER)
        uv_timer_start(&c.aux, close_timer_cb, 30, 0);
    else {
        while (bb_sent_total(&f) < 1000)
            sched_yield();
        close_now(&c);
    }
    uv_run(&c.loop, UV_RUN_DEFAULT);
    cr_assert_not(c.watchdog_fired, "close never happened: %ld callbacks", f.cbs_total);
    long cbs_at_close = f.cbs_total;
    long long sent_at_close = bb_sent_total(&f);
    cr_assert_eq(c.close_cbs, 1, "close_cb ran %d times", c.close_cbs);
    cr_assert(c.closed_flag_at_close_cb);
    cr_assert_eq(c.foreign_handles_at_close_cb, 0,
                 "close_cb ran while %d of the adapter's uv handles were still on the loop",
                 c.foreign_handles_at_close_cb);
    cr_assert_null(nq_port_owner(port), "the port is still attached after close_cb");
    /* The loop goes on for 30 ms while the producers still notify. */
    uv_timer_start(&c.aux, quiet_timer_cb, 30, 0);
    uv_run(&c.loop, UV_RUN_DEFAULT);
    cr_assert_eq(c.close_cbs, 1);
    /* The port is freed while the producers still notify its handles. */
    bb_flood_free_port(&f);
    bb_flood_stop_producers(&f);
    long long sent = bb_sent_total(&f);
    nq_queue_free(f.q);
    bb_flood_assert_clean(&f, "uv close");
    cr_assert_eq(f.sub_cbs_in_free, 0, "subscription callbacks inside nq_port_free");
    if (how == CLOSE_BEFORE_RUN)
        cr_assert_eq(cbs_at_close, 0);
    BB_FIG("uv close %s: %ld callbacks before close, %lld notifies sent by then, %lld "
           "in all; close_cb once; 0 callbacks after; nq_port_free ran %ld wait "
           "callbacks with NQ_ECANCELED and %ld with a result",
           names[how], cbs_at_close, sent_at_close, sent, f.cancelled_in_free, f.completed_in_free);
    uvctx_finish(&c);
}

Test(bb_uv, close_in_callback_while_producers_notify, .timeout = 60) {
    run_close(CLOSE_IN_CB);
}

Test(bb_uv, close_from_timer_while_producers_notify, .timeout = 60) {
    run_close(CLOSE_FROM_TIMER);
}

Test(bb_uv, close_before_run_while_producers_notify, .timeout = 60) {
    run_close(CLOSE_BEFORE_RUN);
}

/* ---- double init / attach, double close, bad arguments ---- */
Test(bb_uv, double_init_and_close_rejected, .timeout = 30) {
    struct uvctx c;
    nq_port_t *port;
    uvctx_init(&c);
    cr_assert_eq(nq_port_new(&port), 0);
    nq_uv_t h, h2, zero;
    memset(&zero, 0, sizeof(zero));
    cr_assert_eq(nq_uv_init(NULL, &h, port), NQ_EINVAL);
    cr_assert_eq(nq_uv_init(&c.loop, NULL, port), NQ_EINVAL);
    cr_assert_eq(nq_uv_init(&c.loop, &h, NULL), NQ_EINVAL);
    cr_assert_eq(nq_uv_close(NULL, NULL), NQ_EINVAL);
    cr_assert_eq(nq_uv_close(&zero, NULL), NQ_EINVAL, "close of a never-initialised handle");
    cr_assert_eq(nq_uv_ref(NULL), NQ_EINVAL);
    cr_assert_eq(nq_uv_unref(NULL), NQ_EINVAL);
    cr_assert_eq(nq_uv_has_ref(NULL), NQ_EINVAL);
    cr_assert_eq(nq_uv_set_budget(NULL, 1), NQ_EINVAL);

    cr_assert_eq(nq_uv_init(&c.loop, &h, port), 0);
    h.data = &c;
    cr_assert_not_null(nq_port_owner(port), "nq_uv_init attached the port");
    /* Double attach: a second adapter on the same port, and the same loop. */
    int rc = nq_uv_init(&c.loop, &h2, port);
    cr_assert_eq(rc, NQ_EBUSY, "second nq_uv_init on an attached port: %d (%s)", rc,
                 nq_err_name(rc));
    /* ... and on another loop. */
    uv_loop_t other;
    cr_assert_eq(uv_loop_init(&other), 0);
    rc = nq_uv_init(&other, &h2, port);
    cr_assert_eq(rc, NQ_EBUSY);
    cr_assert_eq(uv_loop_close(&other), 0, "a refused nq_uv_init left handles on the loop");
    /* ... and any other owner. */
    int someone;
    cr_assert_eq(nq_port_attach(port, &someone), NQ_EBUSY);
    /* The refused inits left the first one as it was. */
    cr_assert_eq(nq_uv_has_ref(&h), 1);

    cr_assert_eq(nq_uv_close(&h, on_closed), 0);
    rc = nq_uv_close(&h, on_closed);
    cr_assert_eq(rc, NQ_ECLOSED, "double close while closing: %d (%s)", rc, nq_err_name(rc));
    uv_run(&c.loop, UV_RUN_DEFAULT);
    cr_assert_eq(c.close_cbs, 1, "close_cb ran %d times", c.close_cbs);
    rc = nq_uv_close(&h, on_closed);
    cr_assert_eq(rc, NQ_ECLOSED, "double close after close_cb: %d (%s)", rc, nq_err_name(rc));
    cr_assert_eq(nq_uv_ref(&h), NQ_ECLOSED);
    cr_assert_eq(nq_uv_unref(&h), NQ_ECLOSED);
    cr_assert_eq(nq_uv_has_ref(&h), NQ_ECLOSED);
    uv_run(&c.loop, UV_RUN_DEFAULT);
    cr_assert_eq(c.close_cbs, 1);
    cr_assert_null(nq_port_owner(port));
    /* Closed, the port can be attached again. */
    cr_assert_eq(nq_uv_init(&c.loop, &h2, port), 0);
    h2.data = &c;
    cr_assert_eq(nq_uv_close(&h2, NULL), 0, "close with a NULL close_cb");
    uv_run(&c.loop, UV_RUN_DEFAULT);
    cr_assert_eq(c.close_cbs, 1);
    nq_port_free(port);
    uvctx_finish(&c);
}

/* ---- ref / unref ---- */
struct rctx {
    struct uvctx c;
    int cbs;
    int status;
    int64_t t0, elapsed;
    int tid_ok;
    nq_queue_t *q;
    nq_handle_t hd;
};

static void r_wait_cb(void *data, int status, int64_t arg) {
    (void)arg;
    struct rctx *r = data;
    r->cbs++;
    r->status = status;
    r->elapsed = now_ns() - r->t0;
    r->tid_ok = cur_tid() == r->c.f->loop_tid;
}

static void r_wait_close_cb(void *data, int status, int64_t arg) {
    struct rctx *r = data;
    r_wait_cb(data, status, arg);
    nq_uv_close(r->c.h, on_closed);
}

static void *notify_later(void *p) {
    struct rctx *r = p;
    usleep(10000);
    nq_notify(r->q, r->hd, 7);
    return NULL;
}

Test(bb_uv, ref_unref_only_unreferenced_handle_exits, .timeout = 30) {
    struct rctx r;
    struct bb_flood dummy;
    memset(&r, 0, sizeof(r));
    memset(&dummy, 0, sizeof(dummy));
    dummy.loop_tid = cur_tid();
    nq_port_t *port;
    nq_uv_t h;
    uvctx_init(&r.c);
    r.c.f = &dummy;
    uvctx_close_timers(&r.c); /* the loop holds the nq handle only */
    uv_run(&r.c.loop, UV_RUN_NOWAIT);
    cr_assert_eq(nq_port_new(&port), 0);
    cr_assert_eq(nq_queue_new(NULL, &r.q), 0);
    cr_assert_eq(nq_register(r.q, "ref", &r.hd), 0);
    cr_assert_eq(nq_uv_init(&r.c.loop, &h, port), 0);
    h.data = &r.c;
    r.c.h = &h;
    cr_assert_eq(nq_uv_has_ref(&h), 1, "referenced at once");
    cr_assert_eq(uv_loop_alive(&r.c.loop), 1, "an open nq handle keeps the loop alive");
    cr_assert_eq(nq_uv_unref(&h), 0);
    cr_assert_eq(nq_uv_unref(&h), 0, "idempotent");
    cr_assert_eq(nq_uv_has_ref(&h), 0);
    cr_assert_eq(uv_loop_alive(&r.c.loop), 0);
    int64_t t0 = now_ns();
    cr_assert_eq(uv_run(&r.c.loop, UV_RUN_DEFAULT), 0);
    int64_t d1 = now_ns() - t0;
    cr_assert_lt(d1, 100 * 1000000LL, "UV_RUN_DEFAULT with only an unreferenced handle: %.1f ms",
                 d1 / 1e6);

    /* A pending wait with a deadline does not keep an unreferenced handle's
     * loop alive either (its timer is unreferenced too). */
    r.t0 = now_ns();
    cr_assert_eq(nq_port_wait(port, r.q, r.hd, NQ_SEQ_NEXT, 200, r_wait_close_cb, &r, NULL), 0);
    t0 = now_ns();
    cr_assert_eq(uv_run(&r.c.loop, UV_RUN_DEFAULT), 0);
    int64_t d2 = now_ns() - t0;
    cr_assert_lt(d2, 100 * 1000000LL,
                 "an unreferenced handle with a 200 ms deadline held "
                 "UV_RUN_DEFAULT for %.1f ms",
                 d2 / 1e6);
    cr_assert_eq(r.cbs, 0);

    /* Referenced again, the same wait keeps the loop running until it
     * times out; its callback closes the handle and the loop ends. */
    cr_assert_eq(nq_uv_ref(&h), 0);
    cr_assert_eq(nq_uv_ref(&h), 0, "idempotent");
    cr_assert_eq(nq_uv_has_ref(&h), 1);
    uv_run(&r.c.loop, UV_RUN_DEFAULT);
    cr_assert_eq(r.cbs, 1);
    cr_assert_eq(r.status, NQ_ETIMEDOUT);
    cr_assert(r.tid_ok);
    cr_assert_geq(r.elapsed, 200 * 1000000LL);
    cr_assert_eq(r.c.close_cbs, 1);
    BB_FIG("uv ref/unref: DEFAULT returned in %.2f ms (unref'd), %.2f ms (unref'd, a "
           "200 ms deadline pending); ref'd, it ran until the timeout at %.1f ms",
           d1 / 1e6, d2 / 1e6, r.elapsed / 1e6);
    nq_port_free(port);
    nq_queue_free(r.q);
    cr_assert_eq(uv_loop_close(&r.c.loop), 0);
}

static void unref_timer_cb(uv_timer_t *t) {
    (void)t;
}

/* Unreferenced, the handle still delivers while something else keeps the
 * loop running. */
Test(bb_uv, unreferenced_handle_still_delivers, .timeout = 30) {
    struct rctx r;
    struct bb_flood dummy;
    memset(&r, 0, sizeof(r));
    memset(&dummy, 0, sizeof(dummy));
    dummy.loop_tid = cur_tid();
    nq_port_t *port;
    nq_uv_t h;
    uvctx_init(&r.c);
    r.c.f = &dummy;
    cr_assert_eq(nq_port_new(&port), 0);
    cr_assert_eq(nq_queue_new(NULL, &r.q), 0);
    cr_assert_eq(nq_register(r.q, "ref", &r.hd), 0);
    cr_assert_eq(nq_uv_init(&r.c.loop, &h, port), 0);
    h.data = &r.c;
    r.c.h = &h;
    cr_assert_eq(nq_uv_unref(&h), 0);
    cr_assert_eq(nq_port_wait(port, r.q, r.hd, NQ_SEQ_NEXT, -1, r_wait_cb, &r, NULL), 0);
    uv_timer_start(&r.c.aux, unref_timer_cb, 200, 0);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, notify_later, &r), 0);
    uv_run(&r.c.loop, UV_RUN_DEFAULT);
    pthread_join(th, NULL);
    cr_assert_eq(r.cbs, 1, "the notify at 10 ms did not reach the unreferenced handle");
    cr_assert_eq(r.status, 0);
    cr_assert(r.tid_ok);
    cr_assert_eq(nq_uv_close(&h, on_closed), 0);
    uv_run(&r.c.loop, UV_RUN_DEFAULT);
    cr_assert_eq(r.c.close_cbs, 1);
    nq_port_free(port);
    nq_queue_free(r.q);
    uvctx_finish(&r.c);
}

/* ---- UV_RUN_ONCE and UV_RUN_NOWAIT ---- */
Test(bb_uv, run_once_and_nowait, .timeout = 30) {
    struct rctx r;
    struct bb_flood dummy;
    memset(&r, 0, sizeof(r));
    memset(&dummy, 0, sizeof(dummy));
    dummy.loop_tid = cur_tid();
    nq_port_t *port;
    nq_uv_t h;
    uvctx_init(&r.c);
    r.c.f = &dummy;
    uvctx_close_timers(&r.c);
    uv_run(&r.c.loop, UV_RUN_NOWAIT);
    cr_assert_eq(nq_port_new(&port), 0);
    cr_assert_eq(nq_queue_new(NULL, &r.q), 0);
    cr_assert_eq(nq_register(r.q, "once", &r.hd), 0);
    cr_assert_eq(nq_uv_init(&r.c.loop, &h, port), 0);
    h.data = &r.c;
    r.c.h = &h;

    /* NOWAIT with nothing pending returns at once, loop still alive. */
    int64_t t0 = now_ns();
    int alive = uv_run(&r.c.loop, UV_RUN_NOWAIT);
    int64_t d = now_ns() - t0;
    cr_assert_neq(alive, 0);
    cr_assert_lt(d, 20 * 1000000LL, "NOWAIT blocked %.1f ms", d / 1e6);

    /* NOWAIT with a completed wait: one call runs its callback. */
    cr_assert_eq(nq_port_wait(port, r.q, r.hd, NQ_SEQ_NEXT, -1, r_wait_cb, &r, NULL), 0);
    cr_assert_eq(nq_notify(r.q, r.hd, 5), 1);
    uv_run(&r.c.loop, UV_RUN_NOWAIT);
    cr_assert_eq(r.cbs, 1, "one UV_RUN_NOWAIT did not run the ready callback");
    cr_assert_eq(r.status, 0);
    cr_assert(r.tid_ok);

    /* ONCE blocks for I/O: a thread notifies after 10 ms; one call runs it. */
    cr_assert_eq(nq_port_wait(port, r.q, r.hd, NQ_SEQ_NEXT, -1, r_wait_cb, &r, NULL), 0);
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, notify_later, &r), 0);
    t0 = now_ns();
    uv_run(&r.c.loop, UV_RUN_ONCE);
    d = now_ns() - t0;
    pthread_join(th, NULL);
    cr_assert_eq(r.cbs, 2, "one UV_RUN_ONCE did not deliver the notify from another thread");
    cr_assert_eq(r.status, 0);
    cr_assert(r.tid_ok);
    double once_io_ms = d / 1e6;

    /* ONCE with a 30 ms timeout: each call blocks until there is progress;
     * the callback comes within [30, 50] ms. */
    int once_calls = 0, late = 1, round;
    double once_to_ms = 0, nowait_to_ms = 0;
    int nowait_calls = 0;
    for (round = 1; round <= BB_ROUNDS && late; round++) {
        late = 0;
        int before = r.cbs;
        r.t0 = now_ns();
        cr_assert_eq(nq_port_wait(port, r.q, r.hd, NQ_SEQ_NEXT, 30, r_wait_cb, &r, NULL), 0);
        once_calls = 0;
        while (r.cbs == before && once_calls < 10) {
            uv_run(&r.c.loop, UV_RUN_ONCE);
            once_calls++;
        }
        cr_assert_eq(r.cbs, before + 1, "10 UV_RUN_ONCE calls and no timeout");
        cr_assert_eq(r.status, NQ_ETIMEDOUT);
        cr_assert_geq(r.elapsed, 30 * 1000000LL, "early: %.3f ms", r.elapsed / 1e6);
        once_to_ms = r.elapsed / 1e6;
        late |= r.elapsed > (30 + BB_SLACK_MS) * 1000000LL;

        /* NOWAIT polled (with 0.2 ms naps) drives a 25 ms timeout too. */
        before = r.cbs;
        r.t0 = now_ns();
        cr_assert_eq(nq_port_wait(port, r.q, r.hd, NQ_SEQ_NEXT, 25, r_wait_cb, &r, NULL), 0);
        nowait_calls = 0;
        while (r.cbs == before && now_ns() - r.t0 < 2000 * 1000000LL) {
            uv_run(&r.c.loop, UV_RUN_NOWAIT);
            nowait_calls++;
            if (r.cbs == before)
                usleep(200);
        }
        cr_assert_eq(r.cbs, before + 1, "NOWAIT polling: no timeout in 2 s");
        cr_assert_eq(r.status, NQ_ETIMEDOUT);
        cr_assert_geq(r.elapsed, 25 * 1000000LL, "early: %.3f ms", r.elapsed / 1e6);
        nowait_to_ms = r.elapsed / 1e6;
        late |= r.elapsed > (25 + BB_SLACK_MS) * 1000000LL;
        BB_FIG("uv run modes round %d: ONCE 30 ms timeout fired after %.2f ms (%d calls); "
               "NOWAIT 25 ms timeout after %.2f ms (%d calls)%s",
               round, once_to_ms, once_calls, nowait_to_ms, nowait_calls,
               late ? "  LATE, retried" : "");
    }
    cr_assert_eq(late, 0, "late in every round");
    BB_FIG("uv run modes: ONCE returned %.2f ms after a notify from a thread at 10 ms", once_io_ms);
    cr_assert_eq(nq_uv_close(&h, on_closed), 0);
    uv_run(&r.c.loop, UV_RUN_DEFAULT);
    cr_assert_eq(r.c.close_cbs, 1);
    nq_port_free(port);
    nq_queue_free(r.q);
    cr_assert_eq(uv_loop_close(&r.c.loop), 0);
}

/* ---- fairness: a repeating timer keeps firing during a flood ---- */
struct fctx {
    struct uvctx c;
    struct bb_flood f;
    uv_timer_t tick, end;
    int64_t flood_t0, last_tick, max_gap;
    int ticks, ticks_pending;
    int flooding;
    long cbs_at_end;
    /* Callbacks per dispatch, read from the port's own dispatch counter. */
    struct bb_meter per_dispatch;
    int64_t cpu_ns; /* the loop thread's CPU time during the flood */
};

static int64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void f_tick(uv_timer_t *t) {
    struct fctx *x = t->data;
    if (!x->flooding)
        return;
    int64_t n = now_ns();
    if (n - x->last_tick > x->max_gap)
        x->max_gap = n - x->last_tick;
    x->last_tick = n;
    x->ticks++;
    if (bb_readable(nq_port_fd(x->f.port)))
        x->ticks_pending++; /* the port had work left while the timer ran */
}

static void f_on_cb(struct bb_flood *f) {
    struct fctx *x = f->user;
    bb_meter_count(&x->per_dispatch, f->port);
}

static void f_end(uv_timer_t *t) {
    struct fctx *x = t->data;
    int64_t n = now_ns();
    if (n - x->last_tick > x->max_gap)
        x->max_gap = n - x->last_tick;
    x->flooding = 0;
    x->cbs_at_end = x->f.cbs_total;
    x->cpu_ns = thread_cpu_ns() - x->cpu_ns;
    int rc = nq_uv_close(x->c.h, on_closed);
    if (rc != 0)
        nqt_thread_fail("nq_uv_close: %s", nq_err_name(rc));
    x->f.closed = 1;
    uv_close((uv_handle_t *)&x->tick, NULL);
    uv_close((uv_handle_t *)&x->end, NULL);
}

#define FAIR_MS     300
#define FAIR_BUDGET 8

static int fairness_round(int round, int paced) {
    struct fctx *x = calloc(1, sizeof(*x));
    cr_assert_not_null(x);
    nq_port_t *port;
    uvctx_init(&x->c);
    uvctx_close_timers(&x->c);
    cr_assert_eq(nq_port_new(&port), 0);
    bb_flood_init(&x->f, port, 0, 0);
    if (paced) {
        /* 32 waits per handle: a notify makes 32 callbacks ready, far more
         * than a budget of 8; producers nap so the machine has CPU left. */
        bb_flood_add_waits(&x->f, 31);
        x->f.nap_us = 50;
    }
    x->f.user = x;
    x->f.on_cb = f_on_cb;
    x->c.f = &x->f;
    nq_uv_t h;
    x->c.h = &h;
    cr_assert_eq(nq_uv_init(&x->c.loop, &h, port), 0);
    h.data = &x->c;
    cr_assert_eq(nq_uv_set_budget(&h, FAIR_BUDGET), 0);
    uv_timer_init(&x->c.loop, &x->tick);
    uv_timer_init(&x->c.loop, &x->end);
    x->tick.data = x->end.data = x;
    bb_flood_start_producers(&x->f);
    while (bb_sent_total(&x->f) < 1000)
        sched_yield();
    x->flooding = 1;
    x->flood_t0 = x->last_tick = now_ns();
    x->cpu_ns = thread_cpu_ns();
    uv_update_time(&x->c.loop);
    uv_timer_start(&x->tick, f_tick, 5, 5);
    uv_timer_start(&x->end, f_end, FAIR_MS, 0);
    uv_run(&x->c.loop, UV_RUN_DEFAULT);
    bb_flood_stop_producers(&x->f);
    long long sent = bb_sent_total(&x->f);
    bb_flood_assert_clean(&x->f, "uv fairness");
    cr_assert_eq(x->c.close_cbs, 1);
    cr_assert_leq(x->per_dispatch.max, FAIR_BUDGET, "a dispatch ran %ld callbacks, budget %d",
                  x->per_dispatch.max, FAIR_BUDGET);
    int want = FAIR_MS / 5 / 4; /* a quarter of the ticks a free loop would get */
    int ok = x->ticks >= want && x->max_gap <= 100 * 1000000LL &&
             x->ticks_pending >= x->ticks / 2 && x->cbs_at_end >= 100;
    BB_FIG("uv fairness (%s producers) round %d: %lld notifies in %d ms, %ld port callbacks (<= "
           "%ld per "
           "dispatch, budget %d); 5 ms timer fired %d times (want >= %d), %d of them with "
           "port work pending, longest gap %.1f ms; loop thread CPU %.1f ms%s",
           paced ? "napping" : "unthrottled", round, sent, FAIR_MS, x->cbs_at_end,
           x->per_dispatch.max, FAIR_BUDGET, x->ticks, want, x->ticks_pending, x->max_gap / 1e6,
           x->cpu_ns / 1e6, ok ? "" : "  NOT MET, retried");
    if (!ok && round == 3) {
        cr_assert_geq(x->ticks, want, "the timer starved during the flood");
        cr_assert_leq(x->max_gap, 100 * 1000000LL, "the timer stalled %.1f ms", x->max_gap / 1e6);
        cr_assert_geq(x->ticks_pending, x->ticks / 2,
                      "the port had no work pending at most ticks: no flood");
        cr_assert_geq(x->cbs_at_end, 100, "the port starved");
    }
    bb_flood_free_port(&x->f);
    nq_queue_free(x->f.q);
    uvctx_finish(&x->c);
    free(x);
    return ok;
}

Test(bb_uv, fairness_timer_fires_during_flood, .timeout = 60) {
    for (int r = 1; r <= 3; r++)
        if (fairness_round(r, 1))
            return;
}

/* The same with 4 producers that never pause on 8 handles: see
 * bb_skip_unless_unthrottled. */
Test(bb_uv, fairness_unthrottled_producers, .timeout = 60) {
    bb_skip_unless_unthrottled();
    for (int r = 1; r <= 3; r++)
        if (fairness_round(r, 0))
            return;
}

/* Installed as libnq-uv with nq-uv.pc (Requires: nq libuv); libnq never
 * links libuv. */
Test(bb_uv, packaging, .timeout = 30) {
    static const char *const req[] = {"nq", "libuv", NULL};
    static const char *const libs[] = {"-lnq-uv", NULL};
    bb_check_packaging("nq-uv", req, libs, "libnq-uv.so");
}
