/* Criterion suite "stalled": clients that stop cost producers nothing.
 *
 * 16 handles, each with clients that never come back: two subscriptions of
 * capacity 16 never drained (drop newest, drop oldest; each with a counting
 * waker), a port subscription and 8 port waits on a port never dispatched,
 * and 4 nq_wait_start waits never released. After a warm-up that fills
 * every subscription and completes every wait, 2 producers notify 1M times
 * in all (NQ_LONG=1: 8M; / 10 under ThreadSanitizer), each on its own 8
 * handles, timing each window of 25k notifies (2.5k under TSan).
 *
 * Asserted: the cost of a notify stays flat (the fastest of the last five
 * windows <= 3x the fastest of the first five, for each producer); the
 * queue's bytes held do not change after the warm-up; the resident set grows
 * less than 1 MiB (16 MiB under ThreadSanitizer, whose own pages grow); each subscription's waker ran once (its one empty ->
 * non-empty) and it dropped exactly what it could not hold; each wait's
 * waker ran once; the port wrote its eventfd once and its items did not
 * grow. Printed: the figures behind each.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nq.h"
#include "nqtest.h"

#define HANDLES 16
#define CAP 16
#define PORT_WAITS 8 /* per handle */
#define USER_WAITS 4 /* per handle */
#define PRODUCERS 2
#define WINDOW SCALE(25000) /* notifies a window: short, so few are preempted */
#define MAX_WINDOWS 512
#define WARMUP 100 /* notifies per handle before the measured run */
/* ThreadSanitizer's own trace and shadow pages grow as the producers run
 * (about 2.4 MiB seen): a looser bound there; the other builds keep 1 MiB. */
#ifdef NQT_TSAN
#define RSS_BOUND_KIB 16384
#else
#define RSS_BOUND_KIB 1024
#endif

static nq_queue_t *q;
static nq_handle_t handles[HANDLES];
static uint64_t per_producer;
static atomic_int go;
static atomic_int ready_producers;
static int windows; /* per producer */
static int64_t window_ns[PRODUCERS][MAX_WINDOWS];
static uint64_t sent[PRODUCERS][HANDLES];

static atomic_int sub_wakes[HANDLES][2];
static atomic_int wait_wakes[HANDLES][USER_WAITS];

static void count_wake(void *ctx) {
    atomic_fetch_add_explicit((atomic_int *)ctx, 1, memory_order_relaxed);
}

static atomic_int port_callbacks; /* none until nq_port_free */

static void port_wait_cb(void *data, int status, int64_t arg) {
    (void)data;
    (void)status;
    (void)arg;
    atomic_fetch_add(&port_callbacks, 1);
}

static void port_sub_cb(nq_sub_t *s, void *data) {
    (void)s;
    (void)data;
    atomic_fetch_add(&port_callbacks, 1);
}

static void *producer(void *arg) {
    int p = (int)(intptr_t)arg;
    uint64_t per_window = WINDOW;
    /* Producer p notifies its own handles, in pairs: two neighbouring
     * handles share a cache line (32-byte slots), so no two producers share
     * a handle's lock or its line, and a window's cost does not depend on
     * whether the other producer runs alongside on the other vCPU (with
     * shared lines it read ~29 ns on one vCPU and ~120 ns across two). */
    unsigned j = 0;
    atomic_fetch_add(&ready_producers, 1);
    while (!atomic_load(&go))
        sched_yield();
    for (int w = 0; w < windows; w++) {
        int64_t t = now_ns();
        for (uint64_t k = 0; k < per_window; k++) {
            j = (j + 3) % (HANDLES / PRODUCERS);
            unsigned h = ((j / 2) * PRODUCERS + (unsigned)p) * 2 + j % 2;
            int rc = nq_notify(q, handles[h], (int64_t)k);
            if (rc < 0)
                nqt_thread_fail("nq_notify returned %s", nq_err_name(rc));
            sent[p][h]++;
        }
        window_ns[p][w] = now_ns() - t;
    }
    return NULL;
}

/* The fastest of n windows: a window the machine stole from (another test
 * on the other vCPU, a preemption) only ever reads slower, so the fastest
 * is the library's cost; n = 5 needs every one of 5 windows (~4 ms) stolen
 * to misread. */
#define EDGE 5
static int64_t min_of(const int64_t *v, int n) {
    int64_t m = v[0];
    for (int i = 1; i < n; i++)
        m = v[i] < m ? v[i] : m;
    return m;
}

Test(stalled, clients_that_never_drain_cost_producers_nothing, .timeout = 300) {
    per_producer = (uint64_t)SCALE(1000000) / PRODUCERS * (nqt_long() ? 8 : 1);
    per_producer -= per_producer % WINDOW;
    windows = (int)(per_producer / WINDOW);
    cr_assert(windows >= 2 * EDGE && windows <= MAX_WINDOWS);
    nq_port_t *port;
    nq_sub_t *subs[HANDLES][2], *psubs[HANDLES];
    nq_wait_t *waits[HANDLES][USER_WAITS];

    cr_assert_eq(nq_queue_new(NULL, &q), 0);
    cr_assert_eq(nq_port_new(&port), 0);
    for (int h = 0; h < HANDLES; h++) {
        cr_assert_eq(nq_register(q, "stalled", &handles[h]), 0);
        for (int k = 0; k < 2; k++) {
            nq_sub_opts_t o;
            memset(&o, 0, sizeof(o));
            o.capacity = CAP;
            o.overflow = k ? NQ_DROP_OLDEST : NQ_DROP_NEWEST;
            o.waker.wake = count_wake;
            o.waker.ctx = &sub_wakes[h][k];
            cr_assert_eq(nq_subscribe(q, handles[h], &o, &subs[h][k]), 0);
        }
        nq_sub_opts_t po;
        memset(&po, 0, sizeof(po));
        po.capacity = CAP;
        cr_assert_eq(nq_port_subscribe(port, q, handles[h], &po, port_sub_cb, NULL, &psubs[h]), 0);
        for (int k = 0; k < PORT_WAITS; k++)
            cr_assert_eq(nq_port_wait(port, q, handles[h], NQ_SEQ_NEXT, k % 2 ? -1 : 1000000,
                                      port_wait_cb, NULL, NULL),
                         0);
        for (int k = 0; k < USER_WAITS; k++) {
            nq_waker_t wk = {count_wake, &wait_wakes[h][k]};
            cr_assert_eq(nq_wait_start(q, handles[h], NQ_SEQ_NEXT, wk, &waits[h][k]), 0);
        }
    }
    /* Warm-up: every subscription full, every wait completed. */
    for (int h = 0; h < HANDLES; h++)
        for (int k = 0; k < WARMUP; k++)
            cr_assert_geq(nq_notify(q, handles[h], k), 0);

    nq_stats_t st0, st1;
    nq_port_stats_t ps0, ps1;
    cr_assert_eq(nq_queue_stats(q, &st0), 0);
    cr_assert_eq(nq_port_stats(port, &ps0), 0);
    long rss0 = nqt_rss_kib();
    /* A run whose last windows read slower than 3x its first is run again
     * (at most 3 runs in all, against the same stalled clients, which only
     * fill up further): a cost that grows with the stalled clients does so
     * in every run, while a machine that got busy near the end of one
     * (another test starting on both vCPUs) rarely stays so. */
    int runs = 0;
    int64_t t0 = 0, t1 = 0;
    double first_ns = 0, last_ns = 0, worst_ratio = 0;
    do {
        runs++;
        atomic_store(&go, 0);
        atomic_store(&ready_producers, 0);
        pthread_t t[PRODUCERS];
        for (int p = 0; p < PRODUCERS; p++)
            cr_assert_eq(pthread_create(&t[p], NULL, producer, (void *)(intptr_t)p), 0);
        while (atomic_load(&ready_producers) < PRODUCERS)
            sched_yield();
        t0 = now_ns();
        atomic_store(&go, 1);
        for (int p = 0; p < PRODUCERS; p++)
            cr_assert_eq(pthread_join(t[p], NULL), 0);
        t1 = now_ns();
        cr_assert_eq(atomic_load(&nqt_errors), 0, "%lld errors in the threads; the first: %s",
                     (long long)atomic_load(&nqt_errors), nqt_first_error);

        /* Cost per notify, per window. */
        uint64_t per_window = WINDOW;
        worst_ratio = 0;
        for (int p = 0; p < PRODUCERS; p++) {
            double f = (double)min_of(&window_ns[p][0], EDGE) / (double)per_window;
            double l = (double)min_of(&window_ns[p][windows - EDGE], EDGE) / (double)per_window;
            if (l / f > worst_ratio) {
                worst_ratio = l / f;
                first_ns = f;
                last_ns = l;
            }
        }
    } while (worst_ratio > 3.0 && runs < 3);
    long rss1 = nqt_rss_kib();
    cr_assert_eq(nq_queue_stats(q, &st1), 0);
    cr_assert_eq(nq_port_stats(port, &ps1), 0);
    uint64_t total = (uint64_t)PRODUCERS * per_producer;
    fprintf(stderr,
            "# stalled: %llu notifies on %d handles, each with 2 undrained subscriptions (cap "
            "%d), a port subscription and %d port waits on a never-dispatched port, %d "
            "unreleased waits; %.1f ns/notify overall; notify %.1f ns in the first windows, "
            "%.1f ns in the last (x%.2f, bound x3; run %d of at most 3); bytes held %zu -> %zu; "
            "RSS %ld -> %ld KiB (%+ld, bound %d); port: %llu eventfd writes, %u items; drops "
            "%llu\n",
            (unsigned long long)total, HANDLES, CAP, PORT_WAITS, USER_WAITS,
            (double)(t1 - t0) / (double)total, first_ns, last_ns, worst_ratio, runs, st0.bytes_held,
            st1.bytes_held, rss0, rss1, rss1 - rss0, RSS_BOUND_KIB, (unsigned long long)ps1.efd_writes,
            ps1.live_items, (unsigned long long)st1.drops);

    cr_assert_leq(worst_ratio, 3.0, "notify got slower: %.1f ns -> %.1f ns", first_ns, last_ns);
    cr_assert_eq(st1.bytes_held, st0.bytes_held, "bytes held grew: %zu -> %zu", st0.bytes_held,
                 st1.bytes_held);
    cr_assert_lt(rss1 - rss0, RSS_BOUND_KIB, "RSS grew by %ld KiB", rss1 - rss0);
    cr_assert_leq(ps1.efd_writes, 1, "a never-dispatched port wrote its eventfd %llu times",
                  (unsigned long long)ps1.efd_writes);
    cr_assert_eq(ps1.live_items, ps0.live_items);
    cr_assert_eq(ps1.dispatches, 0);
    cr_assert_eq(atomic_load(&port_callbacks), 0);
    cr_assert_eq(st1.notifies, (uint64_t)runs * total + (uint64_t)HANDLES * WARMUP);
    for (int h = 0; h < HANDLES; h++) {
        uint64_t to_h = WARMUP;
        for (int p = 0; p < PRODUCERS; p++)
            to_h += sent[p][h];
        for (int k = 0; k < 2; k++) {
            cr_assert_eq(atomic_load(&sub_wakes[h][k]), 1, "handle %d sub %d: %d waker calls", h,
                         k, atomic_load(&sub_wakes[h][k]));
            cr_assert_eq(nq_sub_dropped(subs[h][k]), to_h - CAP);
        }
        cr_assert_eq(nq_sub_dropped(psubs[h]), to_h - CAP);
        for (int k = 0; k < USER_WAITS; k++) {
            cr_assert_eq(atomic_load(&wait_wakes[h][k]), 1);
            int64_t a;
            cr_assert_eq(nq_wait_result(waits[h][k], &a), 0);
            cr_assert_eq(a, 0, "completed by the first notify");
        }
    }

    for (int h = 0; h < HANDLES; h++) {
        for (int k = 0; k < USER_WAITS; k++)
            nq_wait_release(waits[h][k]);
        nq_sub_close(subs[h][0]);
        nq_sub_close(subs[h][1]);
        nq_sub_close(psubs[h]);
    }
    nq_port_free(port);
    nq_queue_free(q);
}
