/* Criterion suite "sub": bounded subscriptions from the receiver's side —
 * capacity defaults, the three ways to receive, blocking with timeouts,
 * one blocked receiver at a time, and closing (drain, then NQ_ECLOSED).
 * Overflow policies and wakers are in test_notify.c. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "nq.h"

#define MS 1000000LL

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

Test(sub, capacity_zero_is_the_queue_default) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.default_capacity = 5;
    nq_queue_t *q;
    nq_handle_t h;
    nq_sub_t *s;
    cr_assert_eq(nq_queue_new(&cfg, &q), 0);
    nq_register(q, NULL, &h);
    cr_assert_eq(nq_subscribe(q, h, NULL, &s), 0, "NULL options: all defaults");
    for (int i = 0; i < 8; i++)
        nq_notify(q, h, i);
    cr_assert_eq(nq_sub_dropped(s), 3, "held 5, dropped the newest 3 (the default policy)");
    int64_t v[8];
    cr_assert_eq(nq_sub_recv_batch(s, v, 8), 5);
    for (int i = 0; i < 5; i++)
        cr_assert_eq(v[i], i);
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(sub, try_recv_batch_and_recv_agree_on_order) {
    nq_queue_t *q;
    nq_handle_t h;
    nq_sub_t *s;
    nq_queue_new(NULL, &q);
    nq_register(q, NULL, &h);
    nq_sub_opts_t o = {.capacity = 100};
    cr_assert_eq(nq_subscribe(q, h, &o, &s), 0);
    int64_t v, batch[7];
    cr_assert_eq(nq_sub_try_recv(s, &v), NQ_EAGAIN);
    cr_assert_eq(nq_sub_recv_batch(s, batch, 7), 0, "empty and open: 0");
    for (int i = 0; i < 100; i++)
        nq_notify(q, h, i);
    int64_t next = 0;
    cr_assert_eq(nq_sub_try_recv(s, &v), 0);
    cr_assert_eq(v, next++);
    cr_assert_eq(nq_sub_recv(s, 0, &v), 0);
    cr_assert_eq(v, next++);
    int n;
    while ((n = nq_sub_recv_batch(s, batch, 7)) > 0)
        for (int i = 0; i < n; i++)
            cr_assert_eq(batch[i], next++);
    cr_assert_eq(next, 100);
    cr_assert_eq(nq_sub_dropped(s), 0);
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(sub, recv_timeouts_are_never_early) {
    nq_queue_t *q;
    nq_handle_t h;
    nq_sub_t *s;
    nq_queue_new(NULL, &q);
    nq_register(q, NULL, &h);
    nq_subscribe(q, h, NULL, &s);
    int64_t v;
    int64_t t0 = now_ns();
    cr_assert_eq(nq_sub_recv(s, 0, &v), NQ_ETIMEDOUT, "0: do not block");
    const int64_t timeouts[] = {1, MS, 10 * MS, 30 * MS};
    for (size_t i = 0; i < sizeof(timeouts) / sizeof(timeouts[0]); i++) {
        t0 = now_ns();
        cr_assert_eq(nq_sub_recv(s, timeouts[i], &v), NQ_ETIMEDOUT);
        int64_t took = now_ns() - t0;
        cr_assert_geq(took, timeouts[i], "%lld ns timeout returned after %lld",
                      (long long)timeouts[i], (long long)took);
        cr_assert_lt(took, timeouts[i] + 2000 * MS);
    }
    nq_sub_close(s);
    nq_queue_free(q);
}

struct blocked {
    nq_sub_t *s;
    int rc;
    int64_t v;
    atomic_int started;
};

static void *blocked_recv(void *arg) {
    struct blocked *b = arg;
    atomic_store(&b->started, 1);
    b->rc = nq_sub_recv(b->s, -1, &b->v);
    return NULL;
}

Test(sub, one_blocked_receiver_at_a_time, .timeout = 30) {
    nq_queue_t *q;
    nq_handle_t h;
    nq_queue_new(NULL, &q);
    nq_register(q, NULL, &h);
    struct blocked b = {0};
    nq_subscribe(q, h, NULL, &b.s);
    pthread_t t;
    pthread_create(&t, NULL, blocked_recv, &b);
    while (!atomic_load(&b.started))
        sched_yield();
    sleep_ms(50); /* let it park */
    int64_t v;
    cr_assert_eq(nq_sub_recv(b.s, 10 * MS, &v), NQ_EBUSY, "a second blocked receiver");
    cr_assert_eq(nq_sub_try_recv(b.s, &v), NQ_EAGAIN, "try_recv never blocks: allowed");
    nq_notify(q, h, 77);
    pthread_join(t, NULL);
    cr_assert_eq(b.rc, 0);
    cr_assert_eq(b.v, 77);
    nq_sub_close(b.s);
    nq_queue_free(q);
}

Test(sub, unregister_wakes_a_blocked_receiver_after_the_drain, .timeout = 30) {
    nq_queue_t *q;
    nq_handle_t h;
    nq_queue_new(NULL, &q);
    nq_register(q, NULL, &h);
    struct blocked b = {0};
    nq_subscribe(q, h, NULL, &b.s);
    pthread_t t;
    pthread_create(&t, NULL, blocked_recv, &b);
    while (!atomic_load(&b.started))
        sched_yield();
    sleep_ms(50);
    nq_unregister(q, h);
    pthread_join(t, NULL);
    cr_assert_eq(b.rc, NQ_ECLOSED, "a blocked receiver learns of the close");

    /* With args held: they come out first, then NQ_ECLOSED, by every call. */
    nq_sub_t *s;
    nq_register(q, NULL, &h);
    nq_subscribe(q, h, NULL, &s);
    nq_notify(q, h, 1);
    nq_notify(q, h, 2);
    nq_notify(q, h, 3);
    nq_unregister(q, h);
    int64_t v, batch[4];
    cr_assert_eq(nq_sub_recv(s, -1, &v), 0);
    cr_assert_eq(v, 1);
    cr_assert_eq(nq_sub_try_recv(s, &v), 0);
    cr_assert_eq(v, 2);
    cr_assert_eq(nq_sub_recv_batch(s, batch, 4), 1);
    cr_assert_eq(batch[0], 3);
    cr_assert_eq(nq_sub_recv_batch(s, batch, 4), NQ_ECLOSED);
    cr_assert_eq(nq_sub_try_recv(s, &v), NQ_ECLOSED);
    cr_assert_eq(nq_sub_recv(s, -1, &v), NQ_ECLOSED, "no block on a closed, drained sub");
    nq_sub_close(b.s);
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(sub, capacity_limits_and_policies_are_validated) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_capacity = 64;
    cfg.default_capacity = 16;
    nq_queue_t *q;
    nq_handle_t h;
    nq_sub_t *s;
    cr_assert_eq(nq_queue_new(&cfg, &q), 0);
    nq_register(q, NULL, &h);
    nq_sub_opts_t o = {.capacity = 65};
    cr_assert_eq(nq_subscribe(q, h, &o, &s), NQ_EINVAL);
    o.capacity = 64;
    cr_assert_eq(nq_subscribe(q, h, &o, &s), 0);
    nq_sub_close(s);
    o.overflow = (nq_overflow_t)2;
    cr_assert_eq(nq_subscribe(q, h, &o, &s), NQ_EINVAL);
    cfg.default_capacity = 65; /* above max_capacity */
    nq_queue_t *q2;
    cr_assert_eq(nq_queue_new(&cfg, &q2), NQ_EINVAL);
    nq_queue_free(q);
}
