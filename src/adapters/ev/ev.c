/* The libev adapter: a port watched by an ev_io, its deadlines kept by an
 * ev_timer, both inside one caller-allocated nq_ev_t (hiredis's
 * adapters/libev.h shape: refuse a double attach).
 *
 * Everything here runs on the loop thread; producers touch only the port,
 * whose eventfd turns readable at most once per dispatch cycle. libev's io
 * watchers are level-triggered and the fd stays readable while work is left
 * (a budget was reached), so the rest runs in the next iteration, after the
 * loop's other ready watchers: a flood cannot starve the loop.
 *
 * The timer is re-armed from the port's on_deadline hook, which the port
 * calls (never from inside one of its callbacks) whenever the next deadline
 * may have moved, from a refreshed "now". The budget is the port's
 * (nq_port_set_budget); stopping inside a port callback stops that dispatch
 * (nq_port_stop).
 */
#include "nq/ev.h"

enum {
    NQ__EV_OPEN = 0x6e71656f,   /* "nqeo" */
    NQ__EV_CLOSED = 0x6e716578, /* "nqex" */
};

static int nq__ev_check(const nq_ev_t *w) {
    if (w == NULL)
        return NQ_EINVAL;
    if (w->nq__state == NQ__EV_OPEN)
        return 0;
    return w->nq__state == NQ__EV_CLOSED ? NQ_ECLOSED : NQ_EINVAL;
}

/* The timer does not count as a watcher that keeps ev_run going: the io
 * watcher does, and one ev_unref(loop) after nq_ev_start must be enough to
 * let the loop end, deadlines pending or not (libev's habit for a single
 * watcher). So an active timer is balanced by an ev_unref, and it repeats
 * (ev_timer_again) instead of being one-shot: libev stops a one-shot timer
 * by itself when it fires, which would unbalance the count. */
static void nq__ev_timer_stop(nq_ev_t *w) {
    if (ev_is_active(&w->nq__timer)) {
        ev_ref(w->nq__loop);
        ev_timer_stop(w->nq__loop, &w->nq__timer);
    }
}

/* The port's on_deadline hook (and nq_ev_start's). */
static void nq__ev_arm(nq_port_t *p, void *data) {
    nq_ev_t *w = data;
    struct ev_loop *loop = w->nq__loop;
    int64_t ms = nq_port_timeout_ms(p);
    if (loop == NULL) /* not started: nq_ev_start arms */
        return;
    if (ms < 0) {
        nq__ev_timer_stop(w);
        return;
    }
    /* libev counts from its cached "now": refresh it (a clock read), so the
     * timer does not fire before the deadline. A due deadline (0 ms) still
     * needs a repeat > 0, or ev_timer_again would stop the timer. */
    ev_now_update(loop);
    w->nq__timer.repeat = ms > 0 ? (ev_tstamp)ms / 1000.0 : 1e-6;
    int was_active = ev_is_active(&w->nq__timer);
    ev_timer_again(loop, &w->nq__timer);
    if (!was_active)
        ev_unref(loop);
}

/* From the io watcher or the timer. A port callback may stop or close w,
 * and free it: nothing here touches w after the dispatch, except when the
 * dispatch was refused as nested (an ev_run inside a port callback, which
 * saw the fd readable: the refusal cleared it). The timer may then be armed
 * for a deadline already due: stop it, or it fires every microsecond for as
 * long as the nested loop runs; the outer dispatch's end re-arms it. */
static void nq__ev_dispatch(nq_ev_t *w) {
    if (nq_port_dispatch(w->nq__port, NQ_PORT_BUDGET) == NQ_EBUSY && w->nq__loop != NULL)
        nq__ev_timer_stop(w);
}

static void nq__ev_on_io(struct ev_loop *loop, ev_io *io, int revents) {
    (void)loop;
    (void)revents;
    nq__ev_dispatch(io->data);
}

static void nq__ev_on_timer(struct ev_loop *loop, ev_timer *t, int revents) {
    (void)loop;
    (void)revents;
    nq__ev_dispatch(t->data);
}

int nq_ev_init(nq_ev_t *w, nq_port_t *port) {
    if (w == NULL || port == NULL)
        return NQ_EINVAL;
    int fd = nq_port_fd(port);
    if (fd < 0)
        return NQ_EINVAL;
    int rc = nq_port_attach(port, w);
    if (rc < 0)
        return rc;
    w->nq__port = port;
    w->nq__loop = NULL;
    ev_io_init(&w->nq__io, nq__ev_on_io, fd, EV_READ);
    w->nq__io.data = w;
    ev_init(&w->nq__timer, nq__ev_on_timer);
    w->nq__timer.data = w;
    w->nq__state = NQ__EV_OPEN;
    (void)nq_port_on_deadline(port, nq__ev_arm, w);
    return 0;
}

int nq_ev_start(struct ev_loop *loop, nq_ev_t *w) {
    int rc = nq__ev_check(w);
    if (rc < 0)
        return rc;
    if (loop == NULL)
        return NQ_EINVAL;
    if (w->nq__loop != NULL)
        return w->nq__loop == loop ? 0 : NQ_EBUSY;
    w->nq__loop = loop;
    ev_io_start(loop, &w->nq__io);
    nq__ev_arm(w->nq__port, w);
    return 0;
}

int nq_ev_stop(struct ev_loop *loop, nq_ev_t *w) {
    int rc = nq__ev_check(w);
    if (rc < 0)
        return rc;
    if (loop == NULL)
        return NQ_EINVAL;
    if (w->nq__loop == NULL)
        return 0; /* not started: nothing to do, as in libev */
    if (w->nq__loop != loop)
        return NQ_EINVAL; /* started on another loop */
    ev_io_stop(loop, &w->nq__io);
    nq__ev_timer_stop(w);
    w->nq__loop = NULL;
    /* Inside one of our port callbacks: like a stopped libev watcher, no
     * more callbacks through w (the rest stays ready for the next start). */
    return nq_port_stop(w->nq__port);
}

int nq_ev_close(nq_ev_t *w) {
    int rc = nq__ev_check(w);
    if (rc < 0)
        return rc;
    if (w->nq__loop != NULL)
        (void)nq_ev_stop(w->nq__loop, w);
    (void)nq_port_on_deadline(w->nq__port, NULL, NULL);
    (void)nq_port_detach(w->nq__port, w); /* a running dispatch stops after
                                               the current callback */
    w->nq__state = NQ__EV_CLOSED;
    return 0;
}

int nq_ev_set_budget(nq_ev_t *w, unsigned budget) {
    int rc = nq__ev_check(w);
    if (rc < 0)
        return rc;
    return nq_port_set_budget(w->nq__port, budget);
}

int nq_ev_is_active(const nq_ev_t *w) {
    int rc = nq__ev_check(w);
    if (rc < 0)
        return rc;
    return w->nq__loop != NULL;
}
