/* A fourth loop adapter, written outside the library on the public port
 * API alone: libevent 2. src/adapters/README.md shows the adapter part of
 * this file (between the two "adapter" lines) verbatim; make check builds
 * and runs it when configure finds libevent.
 *
 * The demo: a worker thread notifies a handle 100000 times; a port
 * subscription on the libevent loop drains it (level-triggered, 64 args a
 * call), a port wait with a 50 ms timeout on a handle nobody notifies times
 * out on the loop's timer, and the loop ends when both are done. Prints
 * "OK" with the counts when the accounting is exact.
 */
#include <event2/event.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include <nq.h>

/* --- adapter: nq_event_t ------------------------------------------------ */
typedef struct nq_event {
    struct event *io;    /* the port's eventfd, persistent, level-triggered */
    struct event *timer; /* the port's next deadline */
    nq_port_t *port;
} nq_event_t;

/* Both watchers dispatch with the port's own budget: what is left keeps
 * the fd readable, so libevent calls back after its other ready events. */
static void nq_event_on_ready(evutil_socket_t fd, short what, void *arg) {
    nq_event_t *w = arg;
    (void)fd;
    (void)what;
    (void)nq_port_dispatch(w->port, NQ_PORT_BUDGET);
}

/* The port's on_deadline hook: it runs whenever the next deadline may have
 * moved, never from inside a port callback. Round up: never early. */
static void nq_event_arm(nq_port_t *p, void *arg) {
    nq_event_t *w = arg;
    int64_t ms = nq_port_timeout_ms(p);
    if (ms < 0) {
        evtimer_del(w->timer);
        return;
    }
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000 + 1};
    evtimer_add(w->timer, &tv);
}

/* Attaches port to base through w (NQ_EBUSY if another adapter has it). */
static int nq_event_init(struct event_base *base, nq_event_t *w, nq_port_t *port) {
    int rc = nq_port_attach(port, w);
    if (rc < 0)
        return rc;
    w->port = port;
    w->io = event_new(base, nq_port_fd(port), EV_READ | EV_PERSIST, nq_event_on_ready, w);
    w->timer = evtimer_new(base, nq_event_on_ready, w);
    if (w->io == NULL || w->timer == NULL || event_add(w->io, NULL) < 0) {
        if (w->io != NULL)
            event_free(w->io);
        if (w->timer != NULL)
            event_free(w->timer);
        (void)nq_port_detach(port, w);
        return NQ_ENOMEM;
    }
    (void)nq_port_on_deadline(port, nq_event_arm, w); /* arms for waits made before */
    return 0;
}

/* Closes w; allowed inside a port callback (that dispatch stops after it).
 * libevent frees a non-running event at once. */
static void nq_event_close(nq_event_t *w) {
    (void)nq_port_on_deadline(w->port, NULL, NULL);
    (void)nq_port_detach(w->port, w);
    event_free(w->io);
    event_free(w->timer);
}
/* --- adapter end -------------------------------------------------------- */

#define N 100000

static nq_queue_t *q;
static nq_handle_t busy, idle;
static nq_event_t adapter;
static long received, dropped, calls, done_parts;
static int wait_status = 1;

static void *producer(void *arg) {
    (void)arg;
    for (long i = 1; i <= N; i++)
        nq_notify(q, busy, i);
    return NULL;
}

static void finish_part(void) {
    if (++done_parts == 2)
        nq_event_close(&adapter); /* no event left: the loop ends */
}

static void on_args(nq_sub_t *s, void *data) {
    int64_t buf[64];
    int n = nq_sub_recv_batch(s, buf, 64); /* level-triggered: the rest later */
    (void)data;
    calls++;
    if (n > 0)
        received += n;
    dropped = (long)nq_sub_dropped(s);
    if (received + dropped == N) { /* exact once the producer is done */
        nq_sub_close(s);
        finish_part();
    }
}

static void on_timeout(void *data, int status, int64_t arg) {
    (void)data;
    (void)arg;
    wait_status = status;
    finish_part();
}

int main(void) {
    nq_port_t *port;
    struct event_base *base = event_base_new();
    nq_sub_opts_t opts = {.capacity = 4096, .overflow = NQ_DROP_OLDEST};
    nq_sub_t *s;
    pthread_t t;
    if (base == NULL || nq_queue_new(NULL, &q) < 0 || nq_port_new_sized(64, &port) < 0 ||
        nq_register(q, "busy", &busy) < 0 || nq_register(q, "idle", &idle) < 0 ||
        nq_port_subscribe(port, q, busy, &opts, on_args, NULL, &s) < 0 ||
        nq_port_wait(port, q, idle, NQ_SEQ_NEXT, 50, on_timeout, NULL, NULL) < 0 ||
        nq_event_init(base, &adapter, port) < 0) {
        fprintf(stderr, "setup failed\n");
        return 1;
    }
    pthread_create(&t, NULL, producer, NULL);
    event_base_dispatch(base);
    pthread_join(t, NULL);
    int ok = wait_status == NQ_ETIMEDOUT && done_parts == 2 && received + dropped == N;
    printf("%s: %ld args received in %ld callbacks, %ld dropped (capacity 4096), the idle "
           "wait: %s\n",
           ok ? "OK" : "FAILED", received, calls, dropped, nq_err_name(wait_status));
    nq_port_free(port);
    nq_queue_free(q);
    event_base_free(base);
    return ok ? 0 : 1;
}
