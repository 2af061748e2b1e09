/* Criterion suite "handles": the handle lifecycle of the notification queue.
 *
 * A handle names a slot and a generation. These tests check that every call
 * that takes a handle rejects one that is not live (0, garbage, unregistered,
 * stale after its slot was reused, stale after the generation counter
 * wrapped) with NQ_EBADH and never lets it reach the slot's new owner; that
 * nq_unregister completes pending waits with NQ_ECLOSED and lets
 * subscriptions drain before NQ_ECLOSED; that objects of an old registration
 * can be released after their slot was reused without touching the new
 * owner; that nq_queue_dump lists live handles by hint; and, under four
 * notifier threads, that re-registration never re-routes a notification.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "nq.h"
#include "nqtest.h"
#include "core/internal.h"
#include "core/queue.h"
#include "core/testhooks.h"


/* --- helpers ------------------------------------------------------------ */

static nq_queue_t *new_queue(const nq_config_t *cfg) {
    nq_queue_t *q = NULL;
    cr_assert_eq(nq_queue_new(cfg, &q), 0);
    cr_assert_not_null(q);
    return q;
}

static nq_handle_t reg(nq_queue_t *q, const char *hint) {
    nq_handle_t h = 0;
    int rc = nq_register(q, hint, &h);
    cr_assert_eq(rc, 0, "nq_register: %s", nq_err_name(rc));
    cr_assert_neq(h, 0);
    return h;
}

static nq_sub_t *sub(nq_queue_t *q, nq_handle_t h, uint32_t cap, nq_overflow_t ov,
                     const char *hint) {
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = cap;
    o.overflow = ov;
    o.debug_hint = hint;
    nq_sub_t *s = NULL;
    int rc = nq_subscribe(q, h, &o, &s);
    cr_assert_eq(rc, 0, "nq_subscribe: %s", nq_err_name(rc));
    cr_assert_not_null(s);
    return s;
}

static nq_stats_t stats(nq_queue_t *q) {
    nq_stats_t st;
    cr_assert_eq(nq_queue_stats(q, &st), 0);
    return st;
}

/* A waker that counts its calls and remembers the thread of the last one. */
typedef struct counter {
    atomic_int calls;
    atomic_int tid;
} counter_t;

static void count_wake(void *ctx) {
    counter_t *c = ctx;
    atomic_store(&c->tid, cur_tid());
    atomic_fetch_add(&c->calls, 1);
}

static nq_waker_t counting_waker(counter_t *c) {
    nq_waker_t w = {count_wake, c};
    return w;
}

static void port_wait_cb(void *data, int status, int64_t arg) {
    (void)status;
    (void)arg;
    atomic_fetch_add((atomic_int *)data, 1);
}

static void port_sub_cb(nq_sub_t *s, void *data) {
    (void)s;
    atomic_fetch_add((atomic_int *)data, 1);
}

/* Every call that takes a handle must answer NQ_EBADH for `bad`, leave its
 * out-pointers NULL, call no waker and keep no memory. */
static void expect_ebadh_everywhere(nq_queue_t *q, nq_handle_t bad, const char *what) {
    nq_stats_t before = stats(q);
    counter_t c;
    atomic_init(&c.calls, 0);
    atomic_init(&c.tid, 0);
    atomic_int cbs;
    atomic_init(&cbs, 0);
    uint64_t seq = 0;
    int64_t arg = 0;

    cr_assert_eq(nq_notify(q, bad, 1), NQ_EBADH, "%s: nq_notify", what);
    cr_assert_eq(nq_seq(q, bad, &seq), NQ_EBADH, "%s: nq_seq", what);
    /* Timeout 0: a wrongly accepted handle would say NQ_ETIMEDOUT, not hang. */
    cr_assert_eq(nq_wait(q, bad, NQ_SEQ_NEXT, 0, &arg), NQ_EBADH, "%s: nq_wait next", what);
    cr_assert_eq(nq_wait(q, bad, 0, 0, &arg), NQ_EBADH, "%s: nq_wait after 0", what);

    nq_wait_t *w = (nq_wait_t *)&w; /* garbage that must be overwritten */
    cr_assert_eq(nq_wait_start(q, bad, NQ_SEQ_NEXT, counting_waker(&c), &w), NQ_EBADH,
                 "%s: nq_wait_start", what);
    cr_assert_null(w, "%s: nq_wait_start left *out set", what);
    w = (nq_wait_t *)&w;
    cr_assert_eq(nq_wait_start(q, bad, 0, counting_waker(&c), &w), NQ_EBADH,
                 "%s: nq_wait_start after 0", what);
    cr_assert_null(w);

    nq_sub_t *s = (nq_sub_t *)&s;
    cr_assert_eq(nq_subscribe(q, bad, NULL, &s), NQ_EBADH, "%s: nq_subscribe", what);
    cr_assert_null(s, "%s: nq_subscribe left *out set", what);

    nq_port_t *p = NULL;
    cr_assert_eq(nq_port_new_sized(8, &p), 0);
    w = (nq_wait_t *)&w;
    cr_assert_eq(nq_port_wait(p, q, bad, NQ_SEQ_NEXT, -1, port_wait_cb, &cbs, &w), NQ_EBADH,
                 "%s: nq_port_wait", what);
    cr_assert_null(w);
    s = (nq_sub_t *)&s;
    cr_assert_eq(nq_port_subscribe(p, q, bad, NULL, port_sub_cb, &cbs, &s), NQ_EBADH,
                 "%s: nq_port_subscribe", what);
    cr_assert_null(s);
    cr_assert_eq(nq_port_dispatch(p, 0), 0);
    nq_port_stats_t ps;
    cr_assert_eq(nq_port_stats(p, &ps), 0);
    cr_assert_eq(ps.live_items, 0, "%s: a refused port call kept a port item", what);
    nq_port_free(p);

    cr_assert_eq(nq_unregister(q, bad), NQ_EBADH, "%s: nq_unregister", what);

    cr_assert_eq(atomic_load(&c.calls), 0, "%s: a refused call ran the waker", what);
    cr_assert_eq(atomic_load(&cbs), 0);
    nq_stats_t after = stats(q);
    cr_assert_eq(after.bytes_held, before.bytes_held, "%s: bytes %zu -> %zu", what,
                 before.bytes_held, after.bytes_held);
    cr_assert_eq(after.live_waits, before.live_waits);
    cr_assert_eq(after.live_subs, before.live_subs);
    cr_assert_eq(after.live_handles, before.live_handles);
    cr_assert_eq(after.notifies, before.notifies, "%s: a refused notify was counted", what);
    cr_assert_eq(after.waits_pending, before.waits_pending);
}

/* --- registration ------------------------------------------------------- */

Test(handles, register_gives_distinct_nonzero_live_handles) {
    nq_queue_t *q = new_queue(NULL);
    enum { N = 200 };
    nq_handle_t h[N];
    for (int i = 0; i < N; i++) {
        h[i] = reg(q, i % 2 ? "odd" : NULL);
        for (int j = 0; j < i; j++)
            cr_assert_neq(h[i], h[j], "handle %d repeats handle %d", i, j);
        uint64_t seq = 99;
        cr_assert_eq(nq_seq(q, h[i], &seq), 0);
        cr_assert_eq(seq, 0);
    }
    cr_assert_eq(stats(q).live_handles, N);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(nq_unregister(q, h[i]), 0);
        cr_assert_eq(nq_unregister(q, h[i]), NQ_EBADH, "double unregister of %d", i);
    }
    cr_assert_eq(stats(q).live_handles, 0);
    nq_queue_free(q);
}

Test(handles, null_arguments_return_einval) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, "x");
    uint64_t seq;
    cr_assert_eq(nq_register(NULL, "x", &h), NQ_EINVAL);
    cr_assert_eq(nq_register(q, "x", NULL), NQ_EINVAL);
    cr_assert_eq(nq_unregister(NULL, h), NQ_EINVAL);
    cr_assert_eq(nq_notify(NULL, h, 1), NQ_EINVAL);
    cr_assert_eq(nq_seq(NULL, h, &seq), NQ_EINVAL);
    cr_assert_eq(nq_seq(q, h, NULL), NQ_EINVAL);
    cr_assert_eq(nq_wait(NULL, h, NQ_SEQ_NEXT, 0, NULL), NQ_EINVAL);
    nq_waker_t none = {NULL, NULL};
    cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, none, NULL), NQ_EINVAL);
    cr_assert_eq(nq_subscribe(q, h, NULL, NULL), NQ_EINVAL);
    cr_assert_eq(nq_queue_stats(NULL, NULL), NQ_EINVAL);
    cr_assert_eq(nq_queue_dump(q, NULL), NQ_EINVAL);
    /* The handle is untouched by all of the above. */
    cr_assert_eq(nq_notify(q, h, 5), 0);
    cr_assert_eq(nq_seq(q, h, &seq), 0);
    cr_assert_eq(seq, 1);
    nq_queue_free(q);
    nq_queue_free(NULL);
}

/* --- stale and garbage handles ------------------------------------------ */

Test(handles, garbage_handles_get_ebadh_from_every_call) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = 16;
    nq_queue_t *q = new_queue(&cfg);
    nq_handle_t live = reg(q, "live");
    nq_sub_t *s = sub(q, live, 4, NQ_DROP_NEWEST, NULL);
    counter_t c;
    atomic_init(&c.calls, 0);
    atomic_init(&c.tid, 0);
    nq_wait_t *w = NULL;
    cr_assert_eq(nq_wait_start(q, live, NQ_SEQ_NEXT, counting_waker(&c), &w), 0);

    uint32_t lo = (uint32_t)live, gen = (uint32_t)(live >> 32);
    const struct {
        nq_handle_t h;
        const char *what;
    } bad[] = {
        {0, "zero"},
        {UINT64_MAX, "all ones"},
        {(uint64_t)gen << 32, "live generation, slot bits 0"},
        {((uint64_t)gen << 32) | (cfg.max_handles + 1u), "slot past max_handles"},
        {((uint64_t)gen << 32) | 0xffffffffu, "slot 2^32-1"},
        {((uint64_t)gen << 32) | (lo + 5), "slot never used"},
        {((uint64_t)(gen + 1) << 32) | lo, "live slot, next generation"},
        {((uint64_t)(gen - 1) << 32) | lo, "live slot, previous generation"},
        {(uint64_t)lo, "live slot, generation 0"},
        {live ^ (1ull << 63), "live slot, high generation bit flipped"},
        /* The word's LIVE bit is bit 35 of a handle: without it, an id
         * looks like a dead slot's (found by review: nq_notify said 0). */
        {live & ~(8ull << 32), "live slot, LIVE bit cleared"},
        {(uint64_t)(lo + 5), "slot never used, all-zero high half"},
        {((uint64_t)(gen & ~8u) << 32) | (lo + 5), "slot never used, LIVE bit cleared"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (bad[i].h == live)
            continue;
        expect_ebadh_everywhere(q, bad[i].h, bad[i].what);
    }
    /* None of it reached the live handle. */
    uint64_t seq = 99;
    cr_assert_eq(nq_seq(q, live, &seq), 0);
    cr_assert_eq(seq, 0);
    int64_t arg;
    cr_assert_eq(nq_sub_try_recv(s, &arg), NQ_EAGAIN);
    cr_assert_eq(nq_wait_result(w, &arg), NQ_EAGAIN);
    cr_assert_eq(atomic_load(&c.calls), 0);

    cr_assert_eq(nq_notify(q, live, 42), 2);
    cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
    cr_assert_eq(arg, 42);
    cr_assert_eq(nq_wait_result(w, &arg), 0);
    cr_assert_eq(arg, 42);
    nq_wait_release(w);
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(handles, unregistered_handle_gets_ebadh_from_every_call) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, "soon gone");
    cr_assert_eq(nq_notify(q, h, 1), 0);
    cr_assert_eq(nq_unregister(q, h), 0);
    expect_ebadh_everywhere(q, h, "unregistered");
    nq_queue_free(q);
}

Test(handles, stale_handle_never_reaches_the_slot_new_owner) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h1 = reg(q, "first owner");
    cr_assert_eq(nq_notify(q, h1, 1), 0);
    cr_assert_eq(nq_unregister(q, h1), 0);
    nq_handle_t h2 = reg(q, "second owner");
    cr_assert_neq(h2, h1);
    /* The only free slot is h1's: the new handle must be on it, or this
     * test would not be testing reuse. */
    cr_assert_eq((uint32_t)h2, (uint32_t)h1, "slot not reused: %#llx vs %#llx",
                 (unsigned long long)h2, (unsigned long long)h1);

    nq_sub_t *s2 = sub(q, h2, 8, NQ_DROP_NEWEST, "new owner's sub");
    counter_t c;
    atomic_init(&c.calls, 0);
    atomic_init(&c.tid, 0);
    nq_wait_t *w2 = NULL;
    cr_assert_eq(nq_wait_start(q, h2, NQ_SEQ_NEXT, counting_waker(&c), &w2), 0);

    expect_ebadh_everywhere(q, h1, "stale after slot reuse");

    int64_t arg;
    uint64_t seq = 99;
    cr_assert_eq(nq_seq(q, h2, &seq), 0);
    cr_assert_eq(seq, 0, "the old handle's notifications leaked into the new owner's count");
    cr_assert_eq(nq_sub_try_recv(s2, &arg), NQ_EAGAIN);
    cr_assert_eq(nq_wait_result(w2, &arg), NQ_EAGAIN);
    cr_assert_eq(atomic_load(&c.calls), 0);
    /* The old handle cannot unregister the new owner either. */
    cr_assert_eq(nq_unregister(q, h1), NQ_EBADH);
    cr_assert_eq(nq_notify(q, h2, 7), 2);
    cr_assert_eq(nq_sub_try_recv(s2, &arg), 0);
    cr_assert_eq(arg, 7);
    cr_assert_eq(nq_wait_result(w2, &arg), 0);
    cr_assert_eq(arg, 7);
    nq_wait_release(w2);
    nq_sub_close(s2);
    nq_queue_free(q);
}

Test(handles, generation_wrap_retires_the_slot_instead_of_reissuing_a_handle) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = 4;
    nq_queue_t *q = new_queue(&cfg);
    cr_assert_eq(nq__queue_set_gen_bits(q, 2), 0);

    /* Keep one handle live on slot A while slot B is cycled, so the cycle
     * below exercises the free list and retirement, not only fresh slots. */
    nq_handle_t keep = reg(q, "kept");
    enum { MAXH = 64 };
    nq_handle_t seen[MAXH];
    int n = 0, rc;
    nq_handle_t h;
    /* Register/unregister until the queue runs out of usable slots. With
     * generations of 2 bits, each slot yields at most 4 handles. */
    while ((rc = nq_register(q, "cycled", &h)) == 0) {
        cr_assert_lt(n, MAXH, "generations never ran out: slots are reused forever");
        for (int j = 0; j < n; j++)
            cr_assert_neq(h, seen[j], "handle %#llx issued twice (registrations %d and %d)",
                          (unsigned long long)h, j, n);
        cr_assert_neq(h, keep);
        seen[n++] = h;
        /* Every earlier handle is stale: it must not reach the new owner. */
        nq_sub_t *s = sub(q, h, 4, NQ_DROP_NEWEST, NULL);
        for (int j = 0; j < n - 1; j++)
            cr_assert_eq(nq_notify(q, seen[j], (int64_t)seen[j]), NQ_EBADH,
                         "stale handle %d of %d accepted", j, n);
        int64_t arg;
        cr_assert_eq(nq_sub_try_recv(s, &arg), NQ_EAGAIN, "a stale notify reached the new owner");
        cr_assert_eq(nq_notify(q, h, (int64_t)h), 1);
        cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
        cr_assert_eq(arg, (int64_t)h);
        cr_assert_eq(nq_unregister(q, h), 0);
        cr_assert_eq(nq_sub_try_recv(s, &arg), NQ_ECLOSED);
        nq_sub_close(s);
    }
    cr_assert_eq(rc, NQ_ELIMIT, "%s", nq_err_name(rc));
    cr_assert_eq(h, 0);
    /* 3 slots were cycled, each at least once and at most 2^2 times. */
    cr_assert_geq(n, 3);
    cr_assert_leq(n, 3 * 4);
    for (int slot_use = 0, j = 0; j < n; j++, slot_use = 0) {
        for (int k = 0; k < n; k++)
            slot_use += (uint32_t)seen[k] == (uint32_t)seen[j];
        cr_assert_leq(slot_use, 4, "slot %u issued %d handles with 2-bit generations",
                      (uint32_t)seen[j], slot_use);
    }
    nq_stats_t st = stats(q);
    cr_assert_eq(st.retired_slots, 3);
    cr_assert_eq(st.live_handles, 1);
    for (int j = 0; j < n; j++)
        expect_ebadh_everywhere(q, seen[j], "stale after generation wrap");
    /* The kept handle is fine, and unregistering it retires or frees its slot. */
    cr_assert_eq(nq_notify(q, keep, 1), 0);
    cr_assert_eq(nq_unregister(q, keep), 0);
    nq_queue_free(q);
}

Test(handles, one_bit_generations_use_each_slot_once) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = 3;
    nq_queue_t *q = new_queue(&cfg);
    cr_assert_eq(nq__queue_set_gen_bits(q, 1), 0);
    nq_handle_t hs[8];
    int n = 0, rc;
    nq_handle_t h;
    while ((rc = nq_register(q, NULL, &h)) == 0) {
        cr_assert_lt(n, 8);
        hs[n++] = h;
        cr_assert_eq(nq_unregister(q, h), 0);
    }
    cr_assert_eq(rc, NQ_ELIMIT);
    cr_assert_geq(n, 3);
    cr_assert_leq(n, 6);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < i; j++)
            cr_assert_neq(hs[i], hs[j]);
    for (int i = 0; i < n; i++)
        cr_assert_eq(nq_notify(q, hs[i], 1), NQ_EBADH);
    nq_queue_free(q);
}

/* --- unregister --------------------------------------------------------- */

struct blocked {
    nq_queue_t *q;
    nq_handle_t h;
    atomic_int rc;
    atomic_int done;
};

static void *blocked_wait_thread(void *a) {
    struct blocked *b = a;
    int64_t arg = 0;
    int rc = nq_wait(b->q, b->h, NQ_SEQ_NEXT, -1, &arg);
    atomic_store(&b->rc, rc);
    atomic_store(&b->done, 1);
    return NULL;
}

static void wait_pending(nq_queue_t *q, uint64_t n) {
    int64_t t0 = now_ns();
    while (stats(q).waits_pending < n) {
        cr_assert_lt(now_ns() - t0, (int64_t)5000000000, "waiters never got pending");
        usleep(1000);
    }
}

Test(handles, unregister_completes_pending_waits_with_closed) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, "closing");
    nq_handle_t other = reg(q, "other");
    enum { NW = 3 };
    counter_t c[NW];
    nq_wait_t *w[NW];
    for (int i = 0; i < NW; i++) {
        atomic_init(&c[i].calls, 0);
        atomic_init(&c[i].tid, 0);
        cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, counting_waker(&c[i]), &w[i]), 0);
    }
    counter_t oc;
    atomic_init(&oc.calls, 0);
    atomic_init(&oc.tid, 0);
    nq_wait_t *ow = NULL;
    cr_assert_eq(nq_wait_start(q, other, NQ_SEQ_NEXT, counting_waker(&oc), &ow), 0);

    struct blocked b = {.q = q, .h = h};
    atomic_init(&b.rc, 1);
    atomic_init(&b.done, 0);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, blocked_wait_thread, &b), 0);
    wait_pending(q, NW + 2);

    nq_stats_t st0 = stats(q);
    cr_assert_eq(nq_unregister(q, h), 0);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(atomic_load(&b.rc), NQ_ECLOSED, "blocked nq_wait: %s",
                 nq_err_name(atomic_load(&b.rc)));
    for (int i = 0; i < NW; i++) {
        int64_t arg = 5;
        cr_assert_eq(nq_wait_result(w[i], &arg), NQ_ECLOSED);
        cr_assert_eq(atomic_load(&c[i].calls), 1, "waker %d called %d times", i,
                     atomic_load(&c[i].calls));
        cr_assert_eq(atomic_load(&c[i].tid), cur_tid(), "waker not on the unregistering thread");
        cr_assert_eq(nq_wait_cancel(w[i]), NQ_EALREADY);
    }
    nq_stats_t st1 = stats(q);
    cr_assert_eq(st1.waits_closed - st0.waits_closed, NW + 1);
    cr_assert_eq(st1.waits_pending, 1); /* the other handle's */
    /* Nothing later reaches them. */
    cr_assert_eq(nq_notify(q, h, 9), NQ_EBADH);
    for (int i = 0; i < NW; i++) {
        cr_assert_eq(atomic_load(&c[i].calls), 1);
        nq_wait_release(w[i]);
    }
    /* The other handle's wait is untouched. */
    int64_t arg;
    cr_assert_eq(nq_wait_result(ow, &arg), NQ_EAGAIN);
    cr_assert_eq(atomic_load(&oc.calls), 0);
    nq_wait_release(ow);
    nq_queue_free(q);
}

struct blocked_recv {
    nq_sub_t *s;
    atomic_int rc;
};

static void *blocked_recv_thread(void *a) {
    struct blocked_recv *b = a;
    int64_t arg;
    atomic_store(&b->rc, nq_sub_recv(b->s, -1, &arg));
    return NULL;
}

Test(handles, unregister_lets_subscriptions_drain_then_closed) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, "closing");
    nq_sub_t *a = sub(q, h, 8, NQ_DROP_NEWEST, "a");
    nq_sub_t *b = sub(q, h, 8, NQ_DROP_OLDEST, "b");
    nq_sub_t *c = sub(q, h, 8, NQ_DROP_NEWEST, "c");
    cr_assert_eq(nq_notify(q, h, 11), 3);
    cr_assert_eq(nq_notify(q, h, 12), 3);
    cr_assert_eq(nq_notify(q, h, 13), 3);
    /* An empty subscription with a receiver blocked on it. */
    nq_handle_t h2 = reg(q, "empty");
    struct blocked_recv br = {.s = sub(q, h2, 4, NQ_DROP_NEWEST, NULL)};
    atomic_init(&br.rc, 1);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, blocked_recv_thread, &br), 0);
    usleep(20000);

    cr_assert_eq(nq_unregister(q, h), 0);
    cr_assert_eq(nq_unregister(q, h2), 0);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(atomic_load(&br.rc), NQ_ECLOSED, "blocked recv: %s",
                 nq_err_name(atomic_load(&br.rc)));

    int64_t arg;
    for (int64_t v = 11; v <= 13; v++) {
        cr_assert_eq(nq_sub_try_recv(a, &arg), 0);
        cr_assert_eq(arg, v);
    }
    cr_assert_eq(nq_sub_try_recv(a, &arg), NQ_ECLOSED);
    cr_assert_eq(nq_sub_try_recv(a, &arg), NQ_ECLOSED, "ECLOSED is not sticky");

    int64_t buf[8];
    cr_assert_eq(nq_sub_recv_batch(b, buf, 8), 3);
    cr_assert_eq(buf[0], 11);
    cr_assert_eq(buf[2], 13);
    cr_assert_eq(nq_sub_recv_batch(b, buf, 8), NQ_ECLOSED);

    /* Blocking recv: what is held comes first, then ECLOSED at once. */
    int64_t t0 = now_ns();
    for (int64_t v = 11; v <= 13; v++) {
        cr_assert_eq(nq_sub_recv(c, 5000000000, &arg), 0);
        cr_assert_eq(arg, v);
    }
    cr_assert_eq(nq_sub_recv(c, 5000000000, &arg), NQ_ECLOSED);
    cr_assert_lt(now_ns() - t0, (int64_t)2000000000, "recv on a closed sub waited");
    cr_assert_eq(nq_sub_dropped(a), 0);

    nq_sub_close(a);
    nq_sub_close(b);
    nq_sub_close(c);
    nq_sub_close(br.s);
    nq_queue_free(q);
}

Test(handles, unregister_runs_sub_waker_once_on_the_unregistering_thread) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    counter_t ce, cf; /* empty and non-empty subscriptions */
    atomic_init(&ce.calls, 0);
    atomic_init(&ce.tid, 0);
    atomic_init(&cf.calls, 0);
    atomic_init(&cf.tid, 0);
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = 4;
    o.waker = counting_waker(&ce);
    nq_sub_t *se = NULL, *sf = NULL;
    cr_assert_eq(nq_subscribe(q, h, &o, &se), 0);
    cr_assert_eq(nq_sub_try_recv(se, NULL), NQ_EAGAIN);
    o.waker = counting_waker(&cf);
    cr_assert_eq(nq_subscribe(q, h, &o, &sf), 0);
    cr_assert_eq(nq_notify(q, h, 1), 2);
    int64_t arg;
    cr_assert_eq(nq_sub_try_recv(se, &arg), 0); /* se is empty again */
    cr_assert_eq(atomic_load(&ce.calls), 1);
    cr_assert_eq(atomic_load(&cf.calls), 1);
    cr_assert_eq(nq_unregister(q, h), 0);
    /* Closing is news for both: a receiver waiting through the waker must
     * learn of it. Exactly one call each, on this thread. */
    cr_assert_eq(atomic_load(&ce.calls), 2);
    cr_assert_eq(atomic_load(&cf.calls), 2);
    cr_assert_eq(atomic_load(&ce.tid), cur_tid());
    cr_assert_eq(atomic_load(&cf.tid), cur_tid());
    cr_assert_eq(nq_sub_try_recv(se, &arg), NQ_ECLOSED);
    cr_assert_eq(nq_sub_try_recv(sf, &arg), 0);
    cr_assert_eq(nq_sub_try_recv(sf, &arg), NQ_ECLOSED);
    cr_assert_eq(atomic_load(&ce.calls), 2);
    cr_assert_eq(atomic_load(&cf.calls), 2);
    nq_sub_close(se);
    nq_sub_close(sf);
    nq_queue_free(q);
}

Test(handles, old_registration_objects_released_after_slot_reuse_leave_new_owner_alone) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h1 = reg(q, "old");
    nq_sub_t *s1 = sub(q, h1, 4, NQ_DROP_NEWEST, "old sub");
    counter_t c1, c2;
    atomic_init(&c1.calls, 0);
    atomic_init(&c1.tid, 0);
    atomic_init(&c2.calls, 0);
    atomic_init(&c2.tid, 0);
    nq_wait_t *w1 = NULL;
    cr_assert_eq(nq_wait_start(q, h1, NQ_SEQ_NEXT, counting_waker(&c1), &w1), 0);
    cr_assert_eq(nq_unregister(q, h1), 0);

    nq_handle_t h2 = reg(q, "new");
    cr_assert_eq((uint32_t)h2, (uint32_t)h1, "slot not reused");
    nq_sub_t *s2 = sub(q, h2, 4, NQ_DROP_NEWEST, "new sub");
    nq_sub_t *s3 = sub(q, h2, 4, NQ_DROP_NEWEST, "new sub 2");
    nq_wait_t *w2 = NULL;
    cr_assert_eq(nq_wait_start(q, h2, NQ_SEQ_NEXT, counting_waker(&c2), &w2), 0);

    /* Release the old objects now that their slot has a new owner. */
    cr_assert_eq(nq_wait_cancel(w1), NQ_EALREADY);
    nq_wait_release(w1);
    nq_sub_close(s1);
    nq_stats_t st = stats(q);
    cr_assert_eq(st.live_subs, 2);
    cr_assert_eq(st.live_waits, 1);
    cr_assert_eq(st.waits_pending, 1);

    cr_assert_eq(nq_notify(q, h2, 77), 3, "closing the old sub detached a new one");
    int64_t arg;
    cr_assert_eq(nq_sub_try_recv(s2, &arg), 0);
    cr_assert_eq(arg, 77);
    cr_assert_eq(nq_sub_try_recv(s3, &arg), 0);
    cr_assert_eq(arg, 77);
    cr_assert_eq(nq_wait_result(w2, &arg), 0);
    cr_assert_eq(arg, 77);
    cr_assert_eq(atomic_load(&c2.calls), 1);
    cr_assert_eq(atomic_load(&c1.calls), 1); /* its ECLOSED, nothing more */
    nq_wait_release(w2);
    nq_sub_close(s3);
    /* Closing s2 leaves h2 with no subscribers: notify reaches nobody. */
    nq_sub_close(s2);
    cr_assert_eq(nq_notify(q, h2, 78), 0);
    nq_queue_free(q);
}

Test(handles, queue_free_closes_everything_and_open_objects_stay_usable) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, "h");
    nq_sub_t *s = sub(q, h, 4, NQ_DROP_NEWEST, "held");
    cr_assert_eq(nq_notify(q, h, 5), 1);
    counter_t c;
    atomic_init(&c.calls, 0);
    atomic_init(&c.tid, 0);
    nq_wait_t *w = NULL;
    cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, counting_waker(&c), &w), 0);
    nq_queue_free(q);
    cr_assert_eq(atomic_load(&c.calls), 1);
    int64_t arg;
    cr_assert_eq(nq_wait_result(w, &arg), NQ_ECLOSED);
    cr_assert_eq(nq_wait_cancel(w), NQ_EALREADY);
    cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
    cr_assert_eq(arg, 5);
    cr_assert_eq(nq_sub_try_recv(s, &arg), NQ_ECLOSED);
    nq_wait_release(w);
    nq_sub_close(s); /* the last reference: the queue's memory goes now (ASan) */
}

/* --- dump --------------------------------------------------------------- */

/* The line of text that contains needle, as a new string (or NULL). */
static char *line_with(const char *text, const char *needle) {
    const char *p = strstr(text, needle);
    if (p == NULL)
        return NULL;
    const char *b = p;
    while (b > text && b[-1] != '\n')
        b--;
    const char *e = strchr(p, '\n');
    if (e == NULL)
        e = p + strlen(p);
    return strndup(b, (size_t)(e - b));
}

Test(handles, dump_lists_live_handles_by_hint_with_waiters_and_subscribers) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t ha = reg(q, "alpha-handle");
    nq_handle_t hb = reg(q, "beta-handle");
    nq_handle_t hg = reg(q, "gone-handle");
    char longhint[100];
    memset(longhint, 'L', sizeof(longhint) - 1);
    longhint[sizeof(longhint) - 1] = '\0';
    memcpy(longhint, "long-", 5);
    nq_handle_t hl = reg(q, longhint);
    cr_assert_eq(nq_unregister(q, hg), 0);

    nq_sub_t *s1 = sub(q, ha, 4, NQ_DROP_NEWEST, "sub-one");
    nq_sub_t *s2 = sub(q, ha, 2, NQ_DROP_OLDEST, "sub-two");
    nq_waker_t none = {NULL, NULL};
    nq_wait_t *w1 = NULL, *w2 = NULL;
    cr_assert_eq(nq_wait_start(q, hb, NQ_SEQ_NEXT, none, &w1), 0);
    cr_assert_eq(nq_wait_start(q, hb, NQ_SEQ_NEXT, none, &w2), 0);
    /* sub-one: 6 sent, capacity 4, one read: depth 3/4, dropped 2.
     * sub-two: 6 sent, capacity 2, none read: depth 2/2, dropped 4. */
    for (int i = 0; i < 6; i++)
        nq_notify(q, ha, i);
    int64_t arg;
    cr_assert_eq(nq_sub_try_recv(s1, &arg), 0);

    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert_not_null(f);
    cr_assert_eq(nq_queue_dump(q, f), 0);
    fclose(f);
    cr_assert_not_null(buf);

    cr_assert_not_null(strstr(buf, "alpha-handle"), "dump:\n%s", buf);
    cr_assert_not_null(strstr(buf, "beta-handle"), "dump:\n%s", buf);
    cr_assert_null(strstr(buf, "gone-handle"), "an unregistered handle is listed:\n%s", buf);
    /* The hint is cut to 63 bytes. */
    char cut[64];
    memcpy(cut, longhint, 63);
    cut[63] = '\0';
    char *ll = line_with(buf, cut);
    cr_assert_not_null(ll, "long hint missing:\n%s", buf);
    cr_assert_null(strstr(ll, longhint), "hint not cut to 63 bytes: %s", ll);
    free(ll);

    char *la = line_with(buf, "alpha-handle");
    cr_assert_not_null(strstr(la, "seq 6"), "alpha line: %s", la);
    cr_assert_not_null(strstr(la, "2 subscribers"), "alpha line: %s", la);
    cr_assert_not_null(strstr(la, "0 waiters"), "alpha line: %s", la);
    free(la);
    char *lb = line_with(buf, "beta-handle");
    cr_assert_not_null(strstr(lb, "2 waiters"), "beta line: %s", lb);
    cr_assert_not_null(strstr(lb, "0 subscribers"), "beta line: %s", lb);
    free(lb);
    char *l1 = line_with(buf, "sub-one");
    cr_assert_not_null(l1, "dump:\n%s", buf);
    cr_assert_not_null(strstr(l1, "depth 3/4"), "sub-one line: %s", l1);
    cr_assert_not_null(strstr(l1, "dropped 2"), "sub-one line: %s", l1);
    free(l1);
    char *l2 = line_with(buf, "sub-two");
    cr_assert_not_null(l2, "dump:\n%s", buf);
    cr_assert_not_null(strstr(l2, "depth 2/2"), "sub-two line: %s", l2);
    cr_assert_not_null(strstr(l2, "dropped 4"), "sub-two line: %s", l2);
    free(l2);
    /* Two wait lines under beta. */
    int waits = 0;
    for (const char *p = buf; (p = strstr(p, "    wait ")) != NULL; p++)
        waits++;
    cr_assert_eq(waits, 2, "dump:\n%s", buf);
    free(buf);

    nq_wait_release(w1);
    nq_wait_release(w2);
    nq_sub_close(s1);
    nq_sub_close(s2);
    cr_assert_eq(nq_unregister(q, hl), 0);
    cr_assert_eq(nq_unregister(q, hb), 0);
    nq_queue_free(q);
}

/* --- unregister vs notify from 4 threads -------------------------------- */

#define RACE_SLOTS     8
#define RACE_NOTIFIERS 4

static struct {
    nq_queue_t *q;
    _Atomic uint64_t cur[RACE_SLOTS]; /* the handle notifiers should use */
    _Atomic uint64_t old[RACE_SLOTS]; /* the one before it: stale by now */
    atomic_int stop;
    atomic_long ok, reached, badh, other, started;
} R;

static void *race_notifier(void *arg) {
    uint32_t seed = (uint32_t)(uintptr_t)arg * 2654435761u + 1;
    long ok = 0, reached = 0, badh = 0, other = 0;
    atomic_fetch_add(&R.started, 1);
    while (!atomic_load_explicit(&R.stop, memory_order_relaxed)) {
        seed = seed * 1103515245u + 12345u;
        unsigned i = (seed >> 16) % RACE_SLOTS;
        nq_handle_t h = (seed >> 8) & 1 ? atomic_load(&R.old[i]) : atomic_load(&R.cur[i]);
        /* The arg is the handle itself: a subscriber that receives an arg
         * that is not its own handle got a notification meant for another
         * registration. */
        int rc = nq_notify(R.q, h, (int64_t)h);
        if (rc >= 0) {
            ok++;
            reached += rc;
        } else if (rc == NQ_EBADH) {
            badh++;
        } else {
            other++;
        }
        /* Four spinning notifiers on a small machine would starve the
         * registrar; a yield now and then keeps both sides moving. */
        if (((ok + badh) & 31) == 0)
            sched_yield();
    }
    atomic_fetch_add(&R.ok, ok);
    atomic_fetch_add(&R.reached, reached);
    atomic_fetch_add(&R.badh, badh);
    atomic_fetch_add(&R.other, other);
    return NULL;
}

/* Drains a subscription of an unregistered handle: every arg must be h. */
static void drain_closed(nq_sub_t *s, nq_handle_t h, long *received, long *dropped,
                         long *misrouted) {
    int64_t buf[64];
    int rc;
    while ((rc = nq_sub_recv_batch(s, buf, 64)) > 0) {
        for (int k = 0; k < rc; k++) {
            if (buf[k] != (int64_t)h)
                (*misrouted)++;
        }
        *received += rc;
    }
    cr_assert_eq(rc, NQ_ECLOSED, "drain: %s", nq_err_name(rc));
    *dropped += (long)nq_sub_dropped(s);
    nq_sub_close(s);
}

static void unregister_vs_notify(unsigned gen_bits) {
    memset(&R, 0, sizeof(R));
    R.q = new_queue(NULL);
    if (gen_bits)
        cr_assert_eq(nq__queue_set_gen_bits(R.q, gen_bits), 0);
    nq_sub_t *subs[RACE_SLOTS];
    for (int i = 0; i < RACE_SLOTS; i++) {
        nq_handle_t h = reg(R.q, NULL);
        subs[i] = sub(R.q, h, 64, NQ_DROP_NEWEST, NULL);
        atomic_store(&R.cur[i], h);
    }
    pthread_t t[RACE_NOTIFIERS];
    for (int k = 0; k < RACE_NOTIFIERS; k++)
        cr_assert_eq(pthread_create(&t[k], NULL, race_notifier, (void *)(uintptr_t)(k + 1)), 0);
    while (atomic_load(&R.started) < RACE_NOTIFIERS)
        sched_yield();

    long received = 0, dropped = 0, misrouted = 0, reused = 0;
    /* At least min_iters re-registrations and at least 300 ms of them, so
     * the notifiers get to run against many generations; at most max_iters
     * (2-bit generations use up a slot every 3 registrations) or 2 s. */
    const int min_iters = SCALE(4000), max_iters = SCALE(60000);
    const int64_t t0 = now_ns();
    for (int it = 0; it < max_iters; it++) {
        int64_t el = now_ns() - t0;
        if ((it >= min_iters && el >= 300000000) || el >= 2000000000)
            break;
        int i = it % RACE_SLOTS;
        nq_handle_t oldh = atomic_load(&R.cur[i]);
        nq_sub_t *olds = subs[i];
        nq_handle_t newh;
        if (it % 4 != 3) {
            /* Unregister first: the new registration can take the same slot,
             * while notifiers still hold the old handle. */
            cr_assert_eq(nq_unregister(R.q, oldh), 0);
            newh = reg(R.q, NULL);
            subs[i] = sub(R.q, newh, 64, NQ_DROP_NEWEST, NULL);
            atomic_store(&R.cur[i], newh);
        } else {
            /* Register first: both handles are live for a while. */
            newh = reg(R.q, NULL);
            subs[i] = sub(R.q, newh, 64, NQ_DROP_NEWEST, NULL);
            atomic_store(&R.cur[i], newh);
            for (volatile int k = 0; k < 200; k++) {
            } /* both live for a moment */
            cr_assert_eq(nq_unregister(R.q, oldh), 0);
        }
        atomic_store(&R.old[i], oldh);
        if ((uint32_t)newh == (uint32_t)oldh)
            reused++;
        drain_closed(olds, oldh, &received, &dropped, &misrouted);
    }
    atomic_store(&R.stop, 1);
    for (int k = 0; k < RACE_NOTIFIERS; k++)
        cr_assert_eq(pthread_join(t[k], NULL), 0);
    for (int i = 0; i < RACE_SLOTS; i++) {
        nq_handle_t h = atomic_load(&R.cur[i]);
        cr_assert_eq(nq_unregister(R.q, h), 0);
        drain_closed(subs[i], h, &received, &dropped, &misrouted);
    }

    long ok = atomic_load(&R.ok), reached = atomic_load(&R.reached);
    cr_assert_eq(atomic_load(&R.other), 0, "notify returned something other than >= 0 or EBADH");
    cr_assert_eq(misrouted, 0, "%ld args reached a registration they were not sent to", misrouted);
    cr_assert_gt(ok, 100, "the notifiers hardly ran");
    cr_assert_gt(atomic_load(&R.badh), 0, "no stale handle was ever tried");
    /* Exact accounting: each successful notify hit exactly one subscription,
     * which stored it (returned 1) or dropped it (returned 0). */
    cr_assert_eq(reached, received, "notify reported %ld receivers, subs got %ld", reached,
                 received);
    cr_assert_eq(ok, received + dropped, "ok %ld != received %ld + dropped %ld", ok, received,
                 dropped);
    nq_stats_t st = stats(R.q);
    cr_assert_eq(st.notifies, (uint64_t)ok, "stats.notifies %llu, successful notifies %ld",
                 (unsigned long long)st.notifies, ok);
    cr_assert_eq(st.drops, (uint64_t)dropped);
    cr_assert_eq(st.live_handles, 0);
    cr_assert_eq(st.live_subs, 0);
    if (gen_bits == 0)
        cr_assert_gt(reused, 0, "slots were never reused: the race was not exercised");
    else
        cr_assert_gt(st.retired_slots, 0, "generations never wrapped");
    nq_queue_free(R.q);
}

Test(handles, unregister_vs_notify_from_4_threads, .timeout = 60) {
    unregister_vs_notify(0);
}

Test(handles, unregister_vs_notify_from_4_threads_with_2_bit_generations, .timeout = 60) {
    unregister_vs_notify(2);
}

/* --- Core 2.0: handles name their queue; seq passes 2^32 ------------------ */

/* The first handles of two queues used to be equal (0x100000001), so
 * nq_notify(b, handle_of_a, 42) reached b's subscriber. A handle carries its
 * queue's tag: another queue's handle gets NQ_EBADH from every call, and
 * reaches nobody. */
Test(handles, another_queues_handle_gets_ebadh_from_every_call) {
    enum { NQ = 8 };
    nq_queue_t *q[NQ];
    nq_handle_t h[NQ];
    nq_sub_t *s[NQ];
    for (int i = 0; i < NQ; i++) {
        q[i] = new_queue(NULL);
        h[i] = reg(q[i], "first");
        s[i] = sub(q[i], h[i], 4, NQ_DROP_NEWEST, "watch");
    }
    for (int i = 0; i < NQ; i++)
        for (int j = 0; j < NQ; j++) {
            if (i == j)
                continue;
            cr_assert_neq(h[i], h[j], "queues %d and %d issued the same first handle", i, j);
            expect_ebadh_everywhere(q[j], h[i], "another queue's handle");
        }
    for (int i = 0; i < NQ; i++) {
        int64_t arg;
        cr_assert_eq(nq_sub_try_recv(s[i], &arg), NQ_EAGAIN, "queue %d got a foreign notify", i);
        cr_assert_eq(nq_notify(q[i], h[i], 7), 1);
        cr_assert_eq(nq_sub_try_recv(s[i], &arg), 0);
        cr_assert_eq(arg, 7);
        nq_sub_close(s[i]);
        nq_queue_free(q[i]);
    }
}

/* A long-lived handle passes 2^32 notifications: the word keeps seq's low
 * half, the carry goes to seq_hi under HELD. nq_seq and `after` waits stay
 * right on both sides of the carry, with and without receivers. */
Test(handles, seq_carries_past_2_to_the_32) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, "long-lived"), g = reg(q, "with a subscriber");
    nq_sub_t *s = sub(q, g, 8, NQ_DROP_NEWEST, "s");
    const uint64_t base = ((uint64_t)1 << 32) - 3;
    nq_handle_t hs[2] = {h, g};
    for (int k = 0; k < 2; k++) {
        nq_handle_t x = hs[k];
        cr_assert_eq(nq__handle_set_seq(q, x, base), 0);
        uint64_t seq = 0;
        for (uint64_t i = 1; i <= 6; i++) {
            cr_assert_geq(nq_notify(q, x, (int64_t)i), 0);
            cr_assert_eq(nq_seq(q, x, &seq), 0);
            cr_assert_eq(seq, base + i, "seq %#llx, not %#llx", (unsigned long long)seq,
                         (unsigned long long)(base + i));
        }
        /* A wait after a count below the carry completes at once with the
         * newest arg; one after the current count waits for the next. */
        int64_t arg = 0;
        cr_assert_eq(nq_wait(q, x, base + 2, 0, &arg), 0);
        cr_assert_eq(arg, 6);
        cr_assert_eq(nq_wait(q, x, seq, 0, &arg), NQ_ETIMEDOUT);
        nq_wait_t *w;
        counter_t c;
        atomic_init(&c.calls, 0);
        atomic_init(&c.tid, 0);
        cr_assert_eq(nq_wait_start(q, x, seq, counting_waker(&c), &w), 0);
        cr_assert_eq(nq_wait_result(w, &arg), NQ_EAGAIN);
        cr_assert_geq(nq_notify(q, x, 77), 1);
        cr_assert_eq(nq_wait_result(w, &arg), 0);
        cr_assert_eq(arg, 77);
        cr_assert_eq(atomic_load(&c.calls), 1);
        nq_wait_release(w);
    }
    int64_t buf[8];
    cr_assert_eq(nq_sub_recv_batch(s, buf, 8), 7);
    cr_assert_eq(buf[6], 77);
    /* The queue's count takes the whole seq of both handles. */
    cr_assert_eq(stats(q).notifies, 2 * (base + 7));
    nq_sub_close(s);
    nq_queue_free(q);
}

/* nq_seq reads the word without HELD; seq_hi changes with a carry of the
 * low half. Readers on two threads check every nq_seq they make while a
 * producer takes the handle across the carry again and again (the count is
 * set to 2^32 k - 2 between rounds): none may be outside the round's
 * [2^32 k - 2, 2^32 k + 1]. A reader that paired a carried seq_hi with the
 * low half from before the carry was 2^32 off (found by review; caught in
 * under 20 s by this loop before the fix). 2 s (NQ_LONG: 20 s). */
static nq_queue_t *sc_q;
static nq_handle_t sc_h;
static atomic_ullong sc_gen, sc_checks, sc_bad;
static atomic_int sc_stop;

static void *sc_reader(void *a) {
    (void)a;
    while (!atomic_load(&sc_stop)) {
        uint64_t g1 = atomic_load(&sc_gen);
        if ((g1 & 1) || g1 == 0)
            continue;
        uint64_t v;
        if (nq_seq(sc_q, sc_h, &v) != 0)
            atomic_fetch_add(&sc_bad, 1);
        if (atomic_load(&sc_gen) != g1)
            continue;
        uint64_t base = ((g1 / 2) << 32) - 2;
        atomic_fetch_add(&sc_checks, 1);
        if (v < base || v > base + 3)
            atomic_fetch_add(&sc_bad, 1);
    }
    return NULL;
}

Test(handles, nq_seq_is_exact_across_the_carry_while_producers_carry_it, .timeout = 120) {
    sc_q = new_queue(NULL);
    sc_h = reg(sc_q, "carry");
    atomic_store(&sc_gen, 0);
    atomic_store(&sc_stop, 0);
    atomic_store(&sc_bad, 0);
    atomic_store(&sc_checks, 0);
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        cr_assert_eq(pthread_create(&t[i], NULL, sc_reader, NULL), 0);
    int64_t end = now_ns() + (nqt_long() ? 20 : 2) * (int64_t)1000000000;
    unsigned long rounds = 0;
    while (now_ns() < end && atomic_load(&sc_bad) == 0) {
        for (int j = 0; j < 1000; j++, rounds++) {
            uint64_t k = atomic_fetch_add(&sc_gen, 1) / 2 + 1; /* odd: changing */
            cr_assert_eq(nq__handle_set_seq(sc_q, sc_h, (k << 32) - 2), 0);
            atomic_fetch_add(&sc_gen, 1); /* even: this round's range holds */
            for (int n = 0; n < 3; n++)
                cr_assert_geq(nq_notify(sc_q, sc_h, n), 0);
        }
    }
    atomic_store(&sc_stop, 1);
    for (int i = 0; i < 2; i++)
        cr_assert_eq(pthread_join(t[i], NULL), 0);
    cr_log_info("%lu carries, %llu checked reads", rounds,
                (unsigned long long)atomic_load(&sc_checks));
    cr_assert_eq(atomic_load(&sc_bad), 0, "nq_seq was off by a carry %llu times",
                 (unsigned long long)atomic_load(&sc_bad));
    cr_assert_gt(atomic_load(&sc_checks), 0);
    nq_queue_free(sc_q);
}
