/* libnq for libev: a port as a libev watcher.
 *
 * nq_ev_t holds an ev_io on the port's eventfd and an ev_timer armed at the
 * port's next wait deadline; when either fires it calls nq_port_dispatch, so
 * wait and subscription callbacks run on the loop's thread. It follows libev's
 * habits: caller-allocated, initialised once, started and stopped on a loop
 * (ev_default_loop or ev_loop_new) any number of times; an active watcher
 * keeps ev_run going, and ev_unref(loop) after nq_ev_start lets it end.
 *
 *     nq_ev_t w;
 *     nq_ev_init(&w, port);
 *     nq_ev_start(loop, &w);
 *     ev_run(loop, 0);
 *     nq_ev_stop(loop, &w);
 *     nq_ev_close(&w);          // detaches the port; then nq_port_free(port)
 *
 * Link with `pkg-config --libs nq-ev`. Every function here is called on the
 * loop's thread.
 */
#ifndef NQ_EV_H
#define NQ_EV_H

#include <ev.h>

#include "../nq.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nq_ev nq_ev_t;

/* Callbacks per dispatch unless nq_ev_set_budget says otherwise. */
#define NQ_EV_DEFAULT_BUDGET NQ_PORT_DEFAULT_BUDGET

struct nq_ev {
    void *data; /* yours: libnq never touches it */
    /* Private: read or write none of these. */
    ev_io nq__io;
    ev_timer nq__timer;
    struct ev_loop *nq__loop; /* while started */
    nq_port_t *nq__port;
    int nq__state;
};

/* Attaches port to w (caller's memory, kept until nq_ev_close). NQ_EINVAL for
 * NULL, NQ_EBUSY if the port is already attached (to this or another
 * adapter). Do not init a watcher that is open: nq_ev_close it first. */
NQ_EXTERN int nq_ev_init(nq_ev_t *w, nq_port_t *port);

/* Like ev_io_start / ev_io_stop: start watching on loop (the io watcher, and
 * the timer whenever a wait has a deadline); stop. Starting a started watcher
 * or stopping a stopped one does nothing, as in libev; starting it on a
 * second loop while it runs on another is NQ_EBUSY, stopping it on a loop it
 * does not run on NQ_EINVAL. Stopped inside one of its port callbacks, no
 * more port callbacks run through w (that dispatch stops after the current
 * one; the rest stays ready for the next nq_ev_start, in a later loop
 * iteration even when started again in the same callback). NQ_EINVAL for NULL or
 * a watcher never initialised, NQ_ECLOSED after nq_ev_close. As with libev's
 * watchers, do not nq_ev_init a watcher while it is started (its memory is
 * not read to find out); with the same port a second init is NQ_EBUSY. */
NQ_EXTERN int nq_ev_start(struct ev_loop *loop, nq_ev_t *w);
NQ_EXTERN int nq_ev_stop(struct ev_loop *loop, nq_ev_t *w);

/* Stops w if it runs and detaches its port, which the caller still owns; no
 * port callback runs through w afterwards (nq_port_free still runs the
 * callbacks of the port's waits, as nq.h says: those are the port's). May be
 * called from inside a port callback, which may then free w (as libev lets a
 * callback free its own stopped watcher). NQ_ECLOSED the second time. */
NQ_EXTERN int nq_ev_close(nq_ev_t *w);

/* At most budget callbacks per nq_port_dispatch, due timeouts first (0:
 * every due timeout and all that was ready when the dispatch began); the
 * rest run in the next loop iteration. One iteration may dispatch twice,
 * when the io watcher and the timer are both due in it. */
NQ_EXTERN int nq_ev_set_budget(nq_ev_t *w, unsigned budget);

/* 1 while started on a loop, 0 if not; NQ_EINVAL (NULL, never
 * initialised), NQ_ECLOSED (after nq_ev_close). */
NQ_EXTERN int nq_ev_is_active(const nq_ev_t *w);

#ifdef __cplusplus
}
#endif
#endif /* NQ_EV_H */
