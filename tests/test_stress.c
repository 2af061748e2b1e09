/* Criterion suite "stress": the queue under load, with exact accounting.
 * 4 producers x 64 handles x 8 subscriptions of mixed capacities and both
 * overflow policies, >= 2M notifies whose arg carries (producer, sequence);
 * two consumer threads drain half the subscriptions each; a thread runs
 * check-then-wait loops with nq_wait; a loop thread keeps port waits armed.
 * Checked: per subscription delivered + dropped + held == sent, no
 * duplicate, per-producer order kept; every nq_wait completed by a
 * notification; every port wait called back exactly once. Counts / 10 under
 * ThreadSanitizer. */
#include <criterion/criterion.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nq.h"
#include "nqtest.h"


#define PRODUCERS 4
#define HANDLES 64
#define SUBS_PER_HANDLE 8
#define NSUBS (HANDLES * SUBS_PER_HANDLE)
#define PER_PRODUCER SCALE(500000) /* 4 x 500k = 2M notifies */
#define SEQ_BITS 40

static const uint32_t capacities[SUBS_PER_HANDLE] = {1, 4, 16, 64, 256, 1024, 4096, 65536};

static nq_queue_t *q;
static nq_handle_t handles[HANDLES];
static nq_sub_t *subs[NSUBS];
/* sent[p][h]: notifies producer p made to handle h (written by p alone). */
static uint64_t sent[PRODUCERS][HANDLES];
static atomic_int producers_done;
static atomic_long errors; /* threads count here; the main thread asserts */

struct sub_check {
    uint64_t delivered;
    uint64_t last_seq[PRODUCERS]; /* 0 = none yet; sequences start at 1 */
    uint64_t out_of_order, duplicates;
};
static struct sub_check checks[NSUBS]; /* each owned by one consumer thread */

static void *producer(void *arg) {
    int p = (int)(intptr_t)arg;
    uint32_t x = 0x9e3779b9u * (uint32_t)(p + 1);
    uint64_t seq = 0;
    for (int i = 0; i < PER_PRODUCER; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        int h = (int)(x % HANDLES);
        seq++;
        int rc = nq_notify(q, handles[h], (int64_t)(((uint64_t)p << SEQ_BITS) | seq));
        if (rc < 0 || rc > SUBS_PER_HANDLE + 2 /* + the two kinds of wait */)
            atomic_fetch_add(&errors, 1);
        sent[p][h]++;
    }
    atomic_fetch_add(&producers_done, 1);
    return NULL;
}

static void take(int si, const int64_t *args, int n) {
    struct sub_check *c = &checks[si];
    for (int k = 0; k < n; k++) {
        uint64_t a = (uint64_t)args[k];
        int p = (int)(a >> SEQ_BITS);
        uint64_t seq = a & (((uint64_t)1 << SEQ_BITS) - 1);
        if (p >= PRODUCERS) {
            atomic_fetch_add(&errors, 1);
            continue;
        }
        if (seq == c->last_seq[p])
            c->duplicates++;
        else if (seq < c->last_seq[p])
            c->out_of_order++;
        c->last_seq[p] = seq;
        c->delivered++;
    }
}

static void *consumer(void *arg) {
    int half = (int)(intptr_t)arg;
    int64_t buf[256];
    for (;;) {
        int done = atomic_load(&producers_done) == PRODUCERS;
        int got = 0;
        for (int si = half; si < NSUBS; si += 2) {
            int n = nq_sub_recv_batch(subs[si], buf, 256);
            if (n < 0) {
                atomic_fetch_add(&errors, 1);
                continue;
            }
            take(si, buf, n);
            got += n;
        }
        if (done && got == 0)
            return NULL; /* drained after the last notify */
        if (got == 0) {
            /* Nothing anywhere: block briefly on one subscription. */
            int64_t v;
            int si = half;
            if (nq_sub_recv(subs[si], 1000000, &v) == 0)
                take(si, &v, 1);
        }
    }
}

/* Check-then-wait against the live producers: every wait must be completed
 * by a notification (the producers never stop while this runs). */
static atomic_long waits_ok, waits_lost;
static atomic_int waiter_done;

static void *waiter(void *arg) {
    (void)arg;
    for (int i = 0; i < SCALE(3000); i++) {
        nq_handle_t h = handles[i % HANDLES];
        uint64_t seq;
        if (nq_seq(q, h, &seq) != 0)
            atomic_fetch_add(&errors, 1);
        int64_t v;
        int rc = nq_wait(q, h, seq, 5000 * 1000000LL, &v);
        if (rc == 0)
            atomic_fetch_add(&waits_ok, 1);
        else if (atomic_load(&producers_done) < PRODUCERS)
            atomic_fetch_add(&waits_lost, 1); /* timed out while notifies flowed */
        if (atomic_load(&producers_done) == PRODUCERS)
            break;
    }
    atomic_store(&waiter_done, 1);
    return NULL;
}

/* The loop thread: port waits on every handle, re-armed as they complete. */
static atomic_long port_started, port_called, port_bad;
static void port_cb(void *data, int status, int64_t arg) {
    (void)arg;
    int *armed = data;
    *armed = 0;
    atomic_fetch_add(&port_called, 1);
    if (status != 0 && status != NQ_ECANCELED)
        atomic_fetch_add(&port_bad, 1);
}

static void *loop(void *arg) {
    (void)arg;
    nq_port_t *p;
    if (nq_port_new(&p) != 0) {
        atomic_fetch_add(&errors, 1);
        return NULL;
    }
    static int armed[HANDLES];
    struct pollfd pfd = {.fd = nq_port_fd(p), .events = POLLIN};
    while (atomic_load(&producers_done) < PRODUCERS) {
        for (int h = 0; h < HANDLES; h++) {
            if (!armed[h]) {
                armed[h] = 1;
                if (nq_port_wait(p, q, handles[h], NQ_SEQ_NEXT, -1, port_cb, &armed[h], NULL) != 0)
                    atomic_fetch_add(&errors, 1);
                else
                    atomic_fetch_add(&port_started, 1);
            }
        }
        poll(&pfd, 1, 10);
        nq_port_dispatch(p, 64);
    }
    nq_port_free(p); /* the ones still pending: NQ_ECANCELED, called back */
    return NULL;
}

Test(stress, producers_subscribers_waits_and_ports_exact_accounting, .timeout = 180) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_capacity = 65536;
    cr_assert_eq(nq_queue_new(&cfg, &q), 0);
    for (int h = 0; h < HANDLES; h++) {
        char hint[16];
        snprintf(hint, sizeof(hint), "h%d", h);
        cr_assert_eq(nq_register(q, hint, &handles[h]), 0);
        for (int k = 0; k < SUBS_PER_HANDLE; k++) {
            nq_sub_opts_t o = {.capacity = capacities[k],
                               .overflow = (k % 2) ? NQ_DROP_OLDEST : NQ_DROP_NEWEST};
            cr_assert_eq(nq_subscribe(q, handles[h], &o, &subs[h * SUBS_PER_HANDLE + k]), 0);
        }
    }
    pthread_t prod[PRODUCERS], cons[2], wt, lt;
    pthread_create(&wt, NULL, waiter, NULL);
    pthread_create(&lt, NULL, loop, NULL);
    for (int c = 0; c < 2; c++)
        pthread_create(&cons[c], NULL, consumer, (void *)(intptr_t)c);
    for (int p = 0; p < PRODUCERS; p++)
        pthread_create(&prod[p], NULL, producer, (void *)(intptr_t)p);
    for (int p = 0; p < PRODUCERS; p++)
        pthread_join(prod[p], NULL);
    for (int c = 0; c < 2; c++)
        pthread_join(cons[c], NULL);
    pthread_join(wt, NULL);
    pthread_join(lt, NULL);

    uint64_t total_sent = 0, total_delivered = 0, total_dropped = 0;
    for (int si = 0; si < NSUBS; si++) {
        int h = si / SUBS_PER_HANDLE;
        uint64_t s = 0;
        for (int p = 0; p < PRODUCERS; p++)
            s += sent[p][h];
        int64_t v;
        uint64_t held = 0;
        while (nq_sub_try_recv(subs[si], &v) == 0)
            held++;
        uint64_t dropped = nq_sub_dropped(subs[si]);
        cr_assert_eq(checks[si].delivered + dropped + held, s,
                     "sub %d (cap %u): delivered %llu + dropped %llu + held %llu != sent %llu", si,
                     capacities[si % SUBS_PER_HANDLE], (unsigned long long)checks[si].delivered,
                     (unsigned long long)dropped, (unsigned long long)held, (unsigned long long)s);
        cr_assert_eq(checks[si].duplicates, 0, "sub %d: duplicates", si);
        cr_assert_eq(checks[si].out_of_order, 0, "sub %d: per-producer order broken", si);
        total_sent += s;
        total_delivered += checks[si].delivered;
        total_dropped += dropped;
    }
    cr_assert_eq(atomic_load(&errors), 0, "errors reported by the worker threads");
    nq_stats_t st;
    nq_queue_stats(q, &st);
    cr_assert_eq(st.notifies, (uint64_t)PRODUCERS * PER_PRODUCER);
    cr_assert_eq(st.drops, total_dropped);
    cr_assert_eq(atomic_load(&waits_lost), 0, "a check-then-wait lost its wakeup");
    cr_assert_gt(atomic_load(&waits_ok), 0);
    cr_assert_eq(atomic_load(&port_called), atomic_load(&port_started),
                 "port waits started %ld, called back %ld", atomic_load(&port_started),
                 atomic_load(&port_called));
    cr_assert_eq(atomic_load(&port_bad), 0);
    fprintf(stderr,
            "stress: %d notifies; subscriptions: %llu sent, %llu delivered, %llu dropped; "
            "%ld nq_wait ok, 0 lost; %ld port waits, each called back once\n",
            PRODUCERS * PER_PRODUCER, (unsigned long long)total_sent,
            (unsigned long long)total_delivered, (unsigned long long)total_dropped,
            atomic_load(&waits_ok), atomic_load(&port_started));
    for (int si = 0; si < NSUBS; si++)
        nq_sub_close(subs[si]);
    nq_queue_free(q);
}
