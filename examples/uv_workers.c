/* uv_workers: libnq on a libuv loop, fed by worker threads.
 *
 * Worker threads (-t, default 4) nq_notify the 64 handles of one queue as
 * fast as they can. The loop thread never blocks on them. Through one port,
 * attached to the loop with an nq_uv_t, it holds:
 *   - a port subscription on every even handle: a bounded buffer (256 args,
 *     drop oldest) whose callback runs while it holds args (level-triggered)
 *     and drains up to 64 of them at a time with nq_sub_recv_batch;
 *   - a port wait on every odd handle, 100 ms timeout. Its callback reads the
 *     handle's count (nq_seq) and waits again for the first notification
 *     after that count, so nothing slips between two waits;
 *   - the same wait on the last handle, which no worker notifies: it times
 *     out every 50 ms and is re-armed.
 * A uv_timer_t prints a status line once a second: notifies/s, callbacks/s,
 * eventfd writes per million notifies (the port writes its eventfd at most
 * once per dispatch, however many notifications arrive) and drops so far.
 *
 * After -d seconds it stops the workers, drains the subscriptions, closes the
 * nq_uv_t (nq_uv_close + close callback), frees port and queue and checks the
 * accounting: per subscription, received + dropped == notifications to its
 * handle; every wait completed, timed out or was cancelled at close, as the
 * queue's own statistics count them. It prints OK, or FAIL and exits 1.
 *
 * Usage: uv_workers [-d seconds (5; fractions too)] [-t threads (4)] [-q: no live line]
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <nq/uv.h> /* includes <nq.h> and <uv.h> */

#define NHANDLES 64 /* the last one is the quiet handle */
#define QUIET (NHANDLES - 1)
#define MAX_THREADS 64

struct target { /* one handle and what the loop holds on it */
    nq_handle_t h;
    nq_sub_t *sub; /* even handles */
    uint64_t received, dropped;
    uint64_t waits, completed, timed_out, cancelled; /* odd handles */
};

struct worker {
    pthread_t thread;
    uint32_t seed;
    uint64_t sent[NHANDLES]; /* its successful notifies; read after the join */
};

static nq_queue_t *queue;
static nq_port_t *port;
static nq_port_stats_t port_final; /* taken just before the port is freed */
static nq_uv_t nquv;
static uv_timer_t status_timer, stop_timer;
static struct target targets[NHANDLES];
static struct worker workers[MAX_THREADS];
static int nthreads = 4;
static atomic_int stop, worker_failed;
static int stopping, failed; /* the loop thread's */
static int tty;
static uint64_t start_ns, last_ns; /* uv_hrtime: at the start, at the last status line */

static void *worker_main(void *arg) {
    struct worker *w = arg;
    uint32_t x = w->seed;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        for (int i = 0; i < 256; i++) {
            x ^= x << 13, x ^= x >> 17, x ^= x << 5; /* xorshift */
            uint32_t t = x % QUIET;                  /* any handle but the quiet one */
            int rc = nq_notify(queue, targets[t].h, (int64_t)x); /* never blocks */
            if (rc < 0) {
                fprintf(stderr, "nq_notify: %s\n", nq_strerror(rc));
                atomic_store(&worker_failed, 1);
                return NULL;
            }
            w->sent[t]++;
        }
    }
    return NULL;
}

/* ---- The loop side: port callbacks run inside nq_port_dispatch, on the loop */

static void on_wait(void *data, int status, int64_t arg);

static void arm_wait(struct target *t) {
    uint64_t seq;
    int rc = nq_seq(queue, t->h, &seq);
    if (rc == 0)
        rc = nq_port_wait(port, queue, t->h, seq /* after */, t == &targets[QUIET] ? 50 : 100,
                          on_wait, t, NULL);
    if (rc < 0) {
        fprintf(stderr, "nq_port_wait: %s\n", nq_strerror(rc));
        failed = 1;
        return;
    }
    t->waits++;
}

static void on_wait(void *data, int status, int64_t arg) {
    struct target *t = data;
    (void)arg; /* the latest arg notified */
    if (status == 0)
        t->completed++;
    else if (status == NQ_ETIMEDOUT)
        t->timed_out++;
    else if (status == NQ_ECANCELED) {
        t->cancelled++; /* still pending when the port was freed */
        return;
    } else {
        fprintf(stderr, "wait: %s\n", nq_strerror(status));
        failed = 1;
        return;
    }
    if (!stopping)
        arm_wait(t);
}

/* Drains up to 64 args, or all of them. */
static void drain(struct target *t, int all) {
    int64_t args[64];
    int n;
    do {
        n = nq_sub_recv_batch(t->sub, args, 64);
        if (n > 0)
            t->received += (uint64_t)n;
        else if (n < 0) { /* NQ_ECLOSED would mean the handle went away: not here */
            fprintf(stderr, "nq_sub_recv_batch: %s\n", nq_strerror(n));
            failed = 1;
        }
    } while (all && n > 0);
}

static void on_sub(nq_sub_t *s, void *data) {
    (void)s;
    drain(data, 0); /* level-triggered: called again while it holds more */
}

static void on_status(uv_timer_t *timer) {
    static uint64_t last_notifies, last_callbacks, last_writes;
    (void)timer;
    nq_stats_t qs;
    nq_port_stats_t ps;
    nq_queue_stats(queue, &qs);
    nq_port_stats(port, &ps);
    uint64_t now = uv_hrtime(), drops = 0;
    for (int i = 0; i < QUIET; i += 2)
        drops += nq_sub_dropped(targets[i].sub);
    double dt = (double)(now - last_ns) / 1e9;
    uint64_t dn = qs.notifies - last_notifies;
    printf("%s%5.1fs %6.2fM notifies/s %6.0fk callbacks/s %5.0f efd writes/1M %" PRIu64
           " drops%s",
           tty ? "\r" : "", (double)(now - start_ns) / 1e9, (double)dn / dt / 1e6,
           (double)(ps.callbacks - last_callbacks) / dt / 1e3,
           dn ? (double)(ps.efd_writes - last_writes) * 1e6 / (double)dn : 0.0, drops,
           tty ? "\033[K" : "\n");
    fflush(stdout);
    last_ns = now, last_notifies = qs.notifies;
    last_callbacks = ps.callbacks, last_writes = ps.efd_writes;
}

static void on_closed(nq_uv_t *h) {
    (void)h;
    for (int i = 0; i < QUIET; i += 2) {
        targets[i].dropped = nq_sub_dropped(targets[i].sub);
        nq_sub_close(targets[i].sub);
    }
    nq_port_stats(port, &port_final);
    nq_port_free(port); /* the waits still pending get NQ_ECANCELED now */
    port = NULL;
}

static void on_stop(uv_timer_t *timer) {
    (void)timer;
    if (uv_is_active((uv_handle_t *)&status_timer) && uv_hrtime() - last_ns > 100000000)
        on_status(&status_timer); /* the last part of a second */
    atomic_store(&stop, 1);
    for (int i = 0; i < nthreads; i++) /* quick: they look at stop every 256 notifies */
        pthread_join(workers[i].thread, NULL);
    stopping = 1;
    for (int i = 0; i < QUIET; i += 2)
        drain(&targets[i], 1); /* every arg is now received or counted as dropped */
    if (tty && uv_is_active((uv_handle_t *)&status_timer))
        printf("\n"); /* end the live line */
    uv_close((uv_handle_t *)&status_timer, NULL);
    uv_close((uv_handle_t *)&stop_timer, NULL);
    nq_uv_close(&nquv, on_closed); /* then uv_run returns: nothing is left */
}

/* ---- Setup, and the check at the end */

static int check(int ok, const char *what) {
    if (!ok)
        printf("FAIL: %s\n", what);
    return ok;
}

int main(int argc, char **argv) {
    double seconds = 5;
    int quiet_line = 0, opt;
    char *end;
    while ((opt = getopt(argc, argv, "d:t:qh")) != -1) {
        if (opt == 'd' && (seconds = strtod(optarg, &end)) > 0 && seconds <= 86400 && !*end)
            continue;
        if (opt == 't' && (nthreads = atoi(optarg)) >= 1 && nthreads <= MAX_THREADS)
            continue;
        if (opt == 'q') {
            quiet_line = 1;
            continue;
        }
        fprintf(opt == 'h' ? stdout : stderr,
                "usage: %s [-d seconds (5)] [-t threads (4, at most %d)] [-q: no live line]\n",
                argv[0], MAX_THREADS);
        return opt == 'h' ? 0 : 2;
    }
    tty = isatty(STDOUT_FILENO);

    uv_loop_t *loop = uv_default_loop();
    int rc = nq_queue_new(NULL, &queue);
    for (int i = 0; rc == 0 && i < NHANDLES; i++) {
        char hint[32];
        snprintf(hint, sizeof(hint), i == QUIET ? "quiet" : "handle %d", i);
        rc = nq_register(queue, hint, &targets[i].h);
    }
    if (rc == 0)
        rc = nq_port_new(&port);
    if (rc == 0)
        rc = nq_uv_init(loop, &nquv, port);
    for (int i = 0; rc == 0 && i < NHANDLES; i++) {
        nq_sub_opts_t opts = {.capacity = 256, .overflow = NQ_DROP_OLDEST, .debug_hint = "loop"};
        if (i % 2 == 0 && i != QUIET)
            rc = nq_port_subscribe(port, queue, targets[i].h, &opts, on_sub, &targets[i],
                                   &targets[i].sub);
        else
            arm_wait(&targets[i]);
    }
    if (rc < 0 || failed) {
        fprintf(stderr, "setup: %s\n", nq_strerror(rc));
        return 1;
    }

    printf("uv_workers: libnq %s, libuv %s, %d worker thread%s -> %d handles (%d subscriptions, "
           "%d waits, 1 quiet), %g s\n",
           nq_version_string(), uv_version_string(), nthreads, nthreads > 1 ? "s" : "", NHANDLES,
           NHANDLES / 2,
           NHANDLES / 2, seconds);
    fflush(stdout);
    start_ns = last_ns = uv_hrtime();
    for (int i = 0; i < nthreads; i++) {
        workers[i].seed = 2463534242u + 7919u * (uint32_t)i; /* any nonzero seed */
        if (pthread_create(&workers[i].thread, NULL, worker_main, &workers[i]) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            return 1;
        }
    }
    uv_timer_init(loop, &status_timer);
    uv_timer_init(loop, &stop_timer);
    if (!quiet_line)
        uv_timer_start(&status_timer, on_status, 1000, 1000);
    uv_timer_start(&stop_timer, on_stop, (uint64_t)(seconds * 1000 + 0.5), 0);
    uv_run(loop, UV_RUN_DEFAULT);
    double elapsed = (double)(uv_hrtime() - start_ns) / 1e9;
    int loop_busy = uv_loop_close(loop) != 0; /* UV_EBUSY: a handle was left open */

    /* The check: our own counts against each other and the queue's. */
    nq_stats_t qs;
    nq_queue_stats(queue, &qs);
    uint64_t sent = 0, received = 0, dropped = 0, waits = 0, completed = 0, timed_out = 0,
             cancelled = 0;
    int ok = !failed && !atomic_load(&worker_failed);
    ok &= check(!loop_busy, "uv_loop_close: a handle is still open");
    for (int i = 0; i < NHANDLES; i++) {
        struct target *t = &targets[i];
        uint64_t to_h = 0, seq = 0;
        for (int w = 0; w < nthreads; w++)
            to_h += workers[w].sent[i];
        nq_seq(queue, t->h, &seq);
        ok &= check(seq == to_h, "a handle's count differs from the notifies made to it");
        if (t->sub != NULL)
            ok &= check(t->received + t->dropped == to_h,
                        "subscription: received + dropped != notifications to its handle");
        else
            ok &= check(t->waits == t->completed + t->timed_out + t->cancelled,
                        "a wait's callback did not run exactly once");
        sent += to_h, received += t->received, dropped += t->dropped, waits += t->waits;
        completed += t->completed, timed_out += t->timed_out, cancelled += t->cancelled;
    }
    ok &= check(qs.notifies == sent && qs.drops == dropped && qs.waits_completed == completed &&
                    qs.waits_timed_out == timed_out && qs.waits_cancelled == cancelled,
                "the queue's statistics disagree with the callbacks");
    ok &= check(targets[QUIET].completed == 0, "the quiet handle's wait completed");

    printf("summary: %" PRIu64 " notifies in %.2f s (%.2f M/s) by %d threads\n", sent, elapsed,
           (double)sent / elapsed / 1e6, nthreads);
    printf("  loop: %" PRIu64 " callbacks in %" PRIu64 " dispatches, %" PRIu64
           " eventfd writes (%.1f per 1M notifies)\n",
           port_final.callbacks, port_final.dispatches, port_final.efd_writes,
           sent ? (double)port_final.efd_writes * 1e6 / (double)sent : 0.0);
    printf("  %d subscriptions: %" PRIu64 " received + %" PRIu64 " dropped = %" PRIu64
           " notifications to their handles\n",
           NHANDLES / 2, received, dropped, received + dropped);
    printf("  %d waits: %" PRIu64 " started = %" PRIu64 " completed + %" PRIu64
           " timed out (%" PRIu64 " on the quiet handle) + %" PRIu64 " cancelled at close\n",
           NHANDLES / 2, waits, completed, timed_out, targets[QUIET].timed_out, cancelled);
    nq_queue_free(queue);
    printf("%s\n", ok ? "OK: every notification received or counted as dropped, every wait "
                        "accounted for"
                      : "FAIL");
    return ok ? 0 : 1;
}
