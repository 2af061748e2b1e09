/* ev_workers: libnq on a libev loop, fed by worker threads (uv_workers.c on
 * libev; read that one for the long story).
 *
 * Worker threads (-t, default 4) nq_notify 16 handles as fast as they can.
 * The loop holds, through a port watched by an nq_ev_t, a subscription on
 * each even handle (256 args, drop oldest; the callback drains up to 64 with
 * nq_sub_recv_batch and is called again while more is held) and a wait on
 * each odd one (re-armed in its callback after the count it saw, 100 ms
 * timeout; the last handle is never notified, so its waits time out). An
 * ev_timer prints a status line once a second. After -d seconds it stops the
 * workers, drains, closes the watcher and checks: per subscription,
 * received + dropped == notifications to its handle; every wait accounted
 * for. OK, or FAIL and exit 1.
 *
 * Usage: ev_workers [-d seconds (5)] [-t threads (4)] [-q: no live line]
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <nq/ev.h> /* includes <nq.h> and <ev.h> */

#define NHANDLES 16
#define QUIET (NHANDLES - 1)
#define MAX_THREADS 64

struct target {
    nq_handle_t h;
    nq_sub_t *sub; /* even handles */
    uint64_t received, dropped, waits, completed, timed_out, cancelled;
};
struct worker {
    pthread_t thread;
    uint64_t sent[NHANDLES];
};

static nq_queue_t *queue;
static nq_port_t *port;
static nq_ev_t watcher;
static ev_timer status_timer, stop_timer;
static struct target targets[NHANDLES];
static struct worker workers[MAX_THREADS];
static int nthreads = 4, stopping, failed, tty;
static atomic_int stop;
static ev_tstamp start, last;

static void *worker_main(void *arg) {
    struct worker *w = arg;
    uint32_t x = 2463534242u + (uint32_t)(w - workers);
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        for (int i = 0; i < 256; i++) {
            x ^= x << 13, x ^= x >> 17, x ^= x << 5;
            uint32_t t = x % QUIET;
            if (nq_notify(queue, targets[t].h, (int64_t)x) >= 0) /* never blocks */
                w->sent[t]++;
        }
    }
    return NULL;
}

static void on_wait(void *data, int status, int64_t arg);

static void arm_wait(struct target *t) {
    uint64_t seq;
    if (nq_seq(queue, t->h, &seq) < 0 ||
        nq_port_wait(port, queue, t->h, seq, 100, on_wait, t, NULL) < 0)
        failed = 1;
    else
        t->waits++;
}

static void on_wait(void *data, int status, int64_t arg) {
    struct target *t = data;
    (void)arg;
    t->completed += status == 0;
    t->timed_out += status == NQ_ETIMEDOUT;
    t->cancelled += status == NQ_ECANCELED; /* pending when the port was freed */
    if (status != 0 && status != NQ_ETIMEDOUT && status != NQ_ECANCELED)
        failed = 1;
    if (!stopping && status != NQ_ECANCELED)
        arm_wait(t);
}

static void drain(struct target *t, int all) {
    int64_t args[64];
    int n;
    do {
        if ((n = nq_sub_recv_batch(t->sub, args, 64)) < 0)
            failed = 1;
        else
            t->received += (uint64_t)n;
    } while (all && n > 0);
}

static void on_sub(nq_sub_t *s, void *data) {
    (void)s;
    drain(data, 0);
}

static void on_status(struct ev_loop *loop, ev_timer *w, int revents) {
    static uint64_t last_notifies, last_callbacks, last_writes;
    (void)w, (void)revents;
    nq_stats_t qs;
    nq_port_stats_t ps;
    nq_queue_stats(queue, &qs);
    nq_port_stats(port, &ps);
    ev_now_update(loop);
    double now = ev_now(loop), dt = now - last;
    printf("%s%5.1fs %6.2fM notifies/s %6.0fk callbacks/s %5.0f efd writes/1M %" PRIu64
           " drops%s",
           tty ? "\r" : "", now - start, (double)(qs.notifies - last_notifies) / dt / 1e6,
           (double)(ps.callbacks - last_callbacks) / dt / 1e3,
           qs.notifies > last_notifies ? (double)(ps.efd_writes - last_writes) * 1e6 /
                                                 (double)(qs.notifies - last_notifies)
                                           : 0.0,
           qs.drops,
           tty ? "\033[K" : "\n");
    fflush(stdout);
    last = now, last_notifies = qs.notifies, last_callbacks = ps.callbacks;
    last_writes = ps.efd_writes;
}

static void on_stop(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)w, (void)revents;
    atomic_store(&stop, 1);
    for (int i = 0; i < nthreads; i++)
        pthread_join(workers[i].thread, NULL);
    stopping = 1;
    for (int i = 0; i < QUIET; i += 2)
        drain(&targets[i], 1);
    if (ev_is_active(&status_timer)) {
        if (tty)
            printf("\n");
        ev_timer_stop(loop, &status_timer);
    }
    nq_ev_close(&watcher); /* stops it and detaches the port: ev_run returns */
    for (int i = 0; i < QUIET; i += 2) {
        targets[i].dropped = nq_sub_dropped(targets[i].sub);
        nq_sub_close(targets[i].sub);
    }
    nq_port_free(port); /* pending waits get NQ_ECANCELED */
}

int main(int argc, char **argv) {
    double seconds = 5;
    int quiet_line = 0, opt;
    char *end;
    while ((opt = getopt(argc, argv, "d:t:q")) != -1) {
        if (opt == 'd' && (seconds = strtod(optarg, &end)) > 0 && seconds <= 86400 && !*end)
            continue;
        if (opt == 't' && (nthreads = atoi(optarg)) >= 1 && nthreads <= MAX_THREADS)
            continue;
        if (opt == 'q') {
            quiet_line = 1;
            continue;
        }
        fprintf(stderr, "usage: %s [-d seconds (5)] [-t threads (4)] [-q]\n", argv[0]);
        return 2;
    }
    tty = isatty(STDOUT_FILENO);

    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    int rc = loop ? nq_queue_new(NULL, &queue) : NQ_ENOMEM;
    for (int i = 0; rc == 0 && i < NHANDLES; i++)
        rc = nq_register(queue, i == QUIET ? "quiet" : "busy", &targets[i].h);
    if (rc == 0 && (rc = nq_port_new(&port)) == 0 && (rc = nq_ev_init(&watcher, port)) == 0)
        rc = nq_ev_start(loop, &watcher);
    for (int i = 0; rc == 0 && i < NHANDLES; i++) {
        nq_sub_opts_t opts = {.capacity = 256, .overflow = NQ_DROP_OLDEST};
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
    printf("ev_workers: libnq %s, libev %d.%d, %d worker threads -> %d handles, %g s\n",
           nq_version_string(), ev_version_major(), ev_version_minor(), nthreads, NHANDLES,
           seconds);
    fflush(stdout);

    start = last = ev_time();
    for (int i = 0; i < nthreads; i++)
        if (pthread_create(&workers[i].thread, NULL, worker_main, &workers[i]) != 0)
            return 1;
    ev_timer_init(&status_timer, on_status, 1., 1.);
    ev_timer_init(&stop_timer, on_stop, seconds, 0.);
    if (!quiet_line)
        ev_timer_start(loop, &status_timer);
    ev_timer_start(loop, &stop_timer);
    ev_run(loop, 0);
    double elapsed = ev_time() - start;
    ev_loop_destroy(loop);

    nq_stats_t qs;
    nq_queue_stats(queue, &qs);
    uint64_t sent = 0, received = 0, dropped = 0, waits = 0, completed = 0, timed_out = 0,
             cancelled = 0;
    int ok = !failed;
    for (int i = 0; i < NHANDLES; i++) {
        struct target *t = &targets[i];
        uint64_t to_h = 0;
        for (int w = 0; w < nthreads; w++)
            to_h += workers[w].sent[i];
        if (t->sub != NULL && t->received + t->dropped != to_h)
            ok = 0, printf("FAIL: handle %d: received + dropped != %" PRIu64 "\n", i, to_h);
        if (t->sub == NULL && t->waits != t->completed + t->timed_out + t->cancelled)
            ok = 0, printf("FAIL: handle %d: a wait callback did not run exactly once\n", i);
        sent += to_h, received += t->received, dropped += t->dropped, waits += t->waits;
        completed += t->completed, timed_out += t->timed_out, cancelled += t->cancelled;
    }
    if (qs.notifies != sent || qs.drops != dropped || qs.waits_completed != completed ||
        qs.waits_timed_out != timed_out || qs.waits_cancelled != cancelled)
        ok = 0, printf("FAIL: the queue's statistics disagree with the callbacks\n");
    printf("summary: %" PRIu64 " notifies in %.2f s (%.2f M/s); subscriptions: %" PRIu64
           " received + %" PRIu64 " dropped; waits: %" PRIu64 " = %" PRIu64 " completed + %" PRIu64
           " timed out + %" PRIu64 " cancelled\n",
           sent, elapsed, (double)sent / elapsed / 1e6, received, dropped, waits, completed,
           timed_out, cancelled);
    nq_queue_free(queue);
    printf("%s\n", ok ? "OK" : "FAIL");
    return ok ? 0 : 1;
}
