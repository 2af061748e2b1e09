/* libnq for libuv: a port as a libuv handle.
 *
 * nq_uv_t watches a port's eventfd with a uv_poll_t and keeps a uv_timer_t
 * armed at the port's next wait deadline, and calls nq_port_dispatch on the
 * loop thread when either fires: wait and subscription callbacks then run on
 * the loop like any libuv callback. It is caller-allocated and closes like a
 * uv handle (nq_uv_close + a close callback), and it keeps the loop alive
 * while it is open and referenced (nq_uv_ref / nq_uv_unref).
 *
 *     nq_port_t *port;  nq_port_new(&port);
 *     static nq_uv_t h; nq_uv_init(uv_default_loop(), &h, port);
 *     ... nq_port_wait(port, q, handle, after, 500, on_wake, data, NULL);
 *     uv_run(uv_default_loop(), UV_RUN_DEFAULT);
 *     ... nq_uv_close(&h, on_closed);  // free the port in on_closed, or after
 *
 * Link with `pkg-config --libs nq-uv`. Every function here is called on the
 * loop's thread (the thread that runs uv_run), like libuv's own.
 */
#ifndef NQ_UV_H
#define NQ_UV_H

#include <uv.h>

#include "../nq.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nq_uv nq_uv_t;
typedef void (*nq_uv_close_cb)(nq_uv_t *h);

/* Callbacks per dispatch unless nq_uv_set_budget says otherwise. */
#define NQ_UV_DEFAULT_BUDGET NQ_PORT_DEFAULT_BUDGET

struct nq_uv {
    void *data; /* yours: libnq never touches it */
    /* Private: read or write none of these. */
    uv_poll_t nq__poll;
    uv_timer_t nq__timer;
    uv_loop_t *nq__loop;
    nq_port_t *nq__port;
    nq_uv_close_cb nq__close_cb;
    int nq__state;
    int nq__to_close;
};

/* Attaches port to loop through h (memory the caller owns and keeps until the
 * close callback). The handle is active and referenced at once. NQ_EINVAL for
 * a NULL argument, NQ_EBUSY if the port is already attached (to this or any
 * other adapter: a second init with the same port), NQ_ESYS if libuv refuses
 * the fd (errno set from libuv's error; h is then as never initialised).
 * Like a uv handle, an nq_uv_t must not be initialised again while it is
 * open or closing (before its close callback ran): libuv still holds the
 * two handles inside it, and its memory is not read to find out (it may
 * never have been initialised). */
NQ_EXTERN int nq_uv_init(uv_loop_t *loop, nq_uv_t *h, nq_port_t *port);

/* Starts closing: stops watching, detaches the port (which the caller still
 * owns: free it in close_cb or later), and calls close_cb (may be NULL) once
 * both uv handles have closed, in a later loop iteration, like uv_close. No
 * port callback runs through h after nq_uv_close returns, also when called
 * from inside a port callback: that dispatch stops after it, and what was
 * left stays ready for the port's next owner. (nq_port_free still runs the
 * callbacks of the port's waits, as nq.h says: those are the port's.)
 * NQ_ECLOSED if h is already closing or closed, NQ_EINVAL for NULL or a
 * handle never initialised.
 *
 * uv_walk sees the two handles inside h (a uv_poll_t and a uv_timer_t, each
 * with data == h): a shutdown walk that closes every handle must skip them
 * and call nq_uv_close(h) instead; uv_close on them directly leaves h
 * unusable (libuv asserts when nq_uv_close closes them a second time). */
NQ_EXTERN int nq_uv_close(nq_uv_t *h, nq_uv_close_cb close_cb);

/* Like uv_ref / uv_unref / uv_has_ref: an unreferenced handle does not keep
 * uv_run(UV_RUN_DEFAULT) from returning. Idempotent. nq_uv_has_ref returns
 * 1 or 0, or an error like the others (NQ_EINVAL, NQ_ECLOSED). */
NQ_EXTERN int nq_uv_ref(nq_uv_t *h);
NQ_EXTERN int nq_uv_unref(nq_uv_t *h);
NQ_EXTERN int nq_uv_has_ref(const nq_uv_t *h);

/* At most budget callbacks per nq_port_dispatch, due timeouts first (0:
 * every due timeout and all that was ready when it began); what is left
 * runs in the next loop iteration, after the loop's other ready work. One
 * iteration may dispatch twice, when the poll watcher and the timer both
 * fire in it. Default NQ_UV_DEFAULT_BUDGET. */
NQ_EXTERN int nq_uv_set_budget(nq_uv_t *h, unsigned budget);

#ifdef __cplusplus
}
#endif
#endif /* NQ_UV_H */
