/* The libuv adapter: a port watched by a uv_poll_t, its deadlines kept by a
 * uv_timer_t, both owned by one caller-allocated nq_uv_t (hiredis's
 * adapters/libuv.h shape: refuse a double attach; finish the close only in
 * the second close callback).
 *
 * Everything here runs on the loop thread. Producers on other threads touch
 * only the port (they write its eventfd at most once per dispatch cycle);
 * libuv sees that as the fd turning readable. The fd stays readable while
 * work is left over (a budget was reached), so libuv's level-triggered poll
 * calls back in the next iteration, after the loop's timers and other I/O:
 * a flood cannot starve the loop.
 *
 * The timer: the port tells us, through its on_deadline hook (never from
 * inside one of its callbacks), whenever the next deadline may have moved;
 * we re-arm the uv timer from nq_port_timeout_ms() then. libuv's timers
 * count from the loop's cached millisecond clock: the arm refreshes it and
 * rounds up, so the timer fires at the deadline or within about a
 * millisecond after it. The budget is the port's (nq_port_set_budget).
 */
#include <errno.h>

#include "nq/uv.h"

enum {
    NQ__UV_OPEN = 0x6e71756f,    /* "nquo" */
    NQ__UV_CLOSING = 0x6e717563, /* "nquc" */
    NQ__UV_CLOSED = 0x6e717578,  /* "nqux" */
};

static int nq__uv_check(const nq_uv_t *h) {
    if (h == NULL)
        return NQ_EINVAL;
    if (h->nq__state == NQ__UV_OPEN)
        return 0;
    if (h->nq__state == NQ__UV_CLOSING || h->nq__state == NQ__UV_CLOSED)
        return NQ_ECLOSED;
    return NQ_EINVAL; /* never initialised */
}

static void nq__uv_on_timer(uv_timer_t *t);

/* The port's on_deadline hook. */
static void nq__uv_arm(nq_port_t *p, void *data) {
    nq_uv_t *h = data;
    int64_t ms = nq_port_timeout_ms(p);
    if (ms < 0) {
        uv_timer_stop(&h->nq__timer);
        return;
    }
    /* libuv counts from its cached, whole-millisecond "now": refresh it (a
     * clock read) and add 1 ms for the truncation, so the timer never fires
     * before the deadline and one UV_RUN_ONCE that wakes for it also runs
     * the timeout's callback. A due deadline gets 1 ms, not 0: libuv before
     * 1.45 runs a 0 ms timer started inside its own callback again in the
     * same pass (the whole expiry would run in one iteration); the port
     * keeps its fd readable while a timeout is due, so the poll watcher
     * brings the next dispatch at once and the timer is the backstop.
     * Cannot fail: the timer is open, with a cb. */
    uv_update_time(h->nq__loop);
    (void)uv_timer_start(&h->nq__timer, nq__uv_on_timer, (uint64_t)ms + 1, 0);
}

static void nq__uv_on_poll(uv_poll_t *poll, int status, int events) {
    nq_uv_t *h = poll->data;
    (void)events;
    /* status < 0 (an error polling an eventfd) cannot happen short of a
     * closed fd; dispatching then is harmless and clears what it can. */
    (void)status;
    (void)nq_port_dispatch(h->nq__port, NQ_PORT_BUDGET);
}

static void nq__uv_on_timer(uv_timer_t *t) {
    nq_uv_t *h = t->data;
    (void)nq_port_dispatch(h->nq__port, NQ_PORT_BUDGET);
}

int nq_uv_init(uv_loop_t *loop, nq_uv_t *h, nq_port_t *port) {
    if (loop == NULL || h == NULL || port == NULL)
        return NQ_EINVAL;
    int fd = nq_port_fd(port);
    if (fd < 0)
        return NQ_EINVAL;
    int rc = nq_port_attach(port, h);
    if (rc < 0)
        return rc;
    h->nq__loop = loop;
    h->nq__port = port;
    h->nq__close_cb = NULL;
    h->nq__to_close = 0;
    int uerr = uv_poll_init(loop, &h->nq__poll, fd);
    if (uerr < 0)
        goto fail;
    h->nq__poll.data = h;
    /* Neither can fail once uv_poll_init succeeded (libuv 1.x: timer init
     * only links the handle; poll_start with UV_READABLE only queues the
     * watcher). Were they to, the handles would have to be closed through
     * the loop, which needs h to outlive this call: we cannot honour that
     * on an error return, so we rely on libuv's documented behaviour. */
    (void)uv_timer_init(loop, &h->nq__timer);
    h->nq__timer.data = h;
    (void)uv_poll_start(&h->nq__poll, UV_READABLE, nq__uv_on_poll);
    h->nq__state = NQ__UV_OPEN;
    (void)nq_port_on_deadline(port, nq__uv_arm, h); /* arms for waits made before */
    return 0;
fail:
    (void)nq_port_detach(port, h);
    h->nq__state = 0; /* as never initialised: NQ_EINVAL from here on */
    errno = -uerr;
    return NQ_ESYS;
}

static void nq__uv_on_closed(uv_handle_t *uh) {
    nq_uv_t *h = uh->data;
    if (--h->nq__to_close > 0)
        return;
    h->nq__state = NQ__UV_CLOSED;
    if (h->nq__close_cb != NULL)
        h->nq__close_cb(h); /* last: the callback may free h */
}

int nq_uv_close(nq_uv_t *h, nq_uv_close_cb close_cb) {
    int rc = nq__uv_check(h);
    if (rc < 0)
        return rc;
    h->nq__state = NQ__UV_CLOSING;
    h->nq__close_cb = close_cb;
    /* From here no port callback runs through h: libuv calls no poll or
     * timer callback of a closing handle, and a dispatch that is running
     * (we are inside one of its callbacks) stops after this callback, since
     * the port is detached inside it; what is left stays ready. */
    (void)nq_port_on_deadline(h->nq__port, NULL, NULL);
    (void)nq_port_detach(h->nq__port, h);
    h->nq__to_close = 2;
    uv_close((uv_handle_t *)&h->nq__poll, nq__uv_on_closed);
    uv_close((uv_handle_t *)&h->nq__timer, nq__uv_on_closed);
    return 0;
}

int nq_uv_ref(nq_uv_t *h) {
    int rc = nq__uv_check(h);
    if (rc < 0)
        return rc;
    uv_ref((uv_handle_t *)&h->nq__poll);
    uv_ref((uv_handle_t *)&h->nq__timer);
    return 0;
}

int nq_uv_unref(nq_uv_t *h) {
    int rc = nq__uv_check(h);
    if (rc < 0)
        return rc;
    uv_unref((uv_handle_t *)&h->nq__poll);
    uv_unref((uv_handle_t *)&h->nq__timer);
    return 0;
}

int nq_uv_has_ref(const nq_uv_t *h) {
    int rc = nq__uv_check(h);
    if (rc < 0)
        return rc;
    return uv_has_ref((const uv_handle_t *)&h->nq__poll) ? 1 : 0;
}

int nq_uv_set_budget(nq_uv_t *h, unsigned budget) {
    int rc = nq__uv_check(h);
    if (rc < 0)
        return rc;
    return nq_port_set_budget(h->nq__port, budget);
}
