/* Criterion suite "limits": bounded memory and configured limits.
 *
 * Checks nq_config_init's defaults against the contract, that each limit of
 * nq_config_t (max_handles, max_waiters_per_handle,
 * max_subscribers_per_handle, memory_limit, max_capacity) answers NQ_ELIMIT,
 * NQ_ENOMEM or NQ_EINVAL at exactly the configured point and never lets the
 * bytes held pass memory_limit; that freeing, closing or unregistering makes
 * room again; that cycles and clients that never drain do not grow memory;
 * and that every allocation failure (nq__alloc_fail_at) is reported as
 * NQ_ENOMEM and leaves nothing behind.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nq.h"
#include "nqtest.h"
#include "core/internal.h"
#include "core/queue.h"


/* --- helpers ------------------------------------------------------------ */

static nq_queue_t *new_queue(const nq_config_t *cfg) {
    nq_queue_t *q = NULL;
    int rc = nq_queue_new(cfg, &q);
    cr_assert_eq(rc, 0, "nq_queue_new: %s", nq_err_name(rc));
    cr_assert_not_null(q);
    return q;
}

static nq_handle_t reg(nq_queue_t *q, const char *hint) {
    nq_handle_t h = 0;
    int rc = nq_register(q, hint, &h);
    cr_assert_eq(rc, 0, "nq_register: %s", nq_err_name(rc));
    return h;
}

static nq_stats_t stats(nq_queue_t *q) {
    nq_stats_t st;
    cr_assert_eq(nq_queue_stats(q, &st), 0);
    return st;
}

static int try_sub(nq_queue_t *q, nq_handle_t h, uint32_t cap, const char *hint, nq_sub_t **out) {
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = cap;
    o.overflow = NQ_DROP_NEWEST;
    o.debug_hint = hint;
    *out = NULL;
    return nq_subscribe(q, h, &o, out);
}

static nq_sub_t *sub(nq_queue_t *q, nq_handle_t h, uint32_t cap) {
    nq_sub_t *s;
    int rc = try_sub(q, h, cap, NULL, &s);
    cr_assert_eq(rc, 0, "nq_subscribe: %s", nq_err_name(rc));
    return s;
}

static const nq_waker_t no_waker = {NULL, NULL};

/* Port callbacks that must never run in these tests. */
static atomic_int port_cbs;

static void never_wait_cb(void *data, int status, int64_t arg) {
    (void)data;
    (void)status;
    (void)arg;
    atomic_fetch_add(&port_cbs, 1);
}

static void never_sub_cb(nq_sub_t *s, void *data) {
    (void)s;
    (void)data;
    atomic_fetch_add(&port_cbs, 1);
}

/* --- defaults and configuration ----------------------------------------- */

Test(limits, config_init_defaults_meet_the_contract) {
    nq_config_t cfg;
    memset(&cfg, 0xa5, sizeof(cfg));
    nq_config_init(&cfg);
    cr_assert_geq(cfg.max_handles, 65536);
    cr_assert_geq(cfg.max_subscribers_per_handle, 64);
    cr_assert_geq(cfg.max_waiters_per_handle, 256);
    cr_assert_geq(cfg.memory_limit, (size_t)256 << 20);
    cr_assert_gt(cfg.default_capacity, 0);
    cr_assert_geq(cfg.max_capacity, 1u << 20);
    nq_config_init(NULL); /* ignored, no crash */

    /* The defaults really allow what they promise: a 2^20 subscription,
     * 64 subscribers and 256 waiters on one handle. */
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, "defaults");
    nq_sub_t *big = NULL;
    cr_assert_eq(try_sub(q, h, 1u << 20, NULL, &big), 0);
    nq_sub_t *subs[63];
    for (int i = 0; i < 63; i++)
        subs[i] = sub(q, h, 1);
    nq_sub_t *extra = NULL;
    cr_assert_eq(try_sub(q, h, 1, NULL, &extra),
                 cfg.max_subscribers_per_handle > 64 ? 0 : NQ_ELIMIT);
    nq_sub_close(extra);
    nq_wait_t *w[256];
    for (int i = 0; i < 256; i++)
        cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, no_waker, &w[i]), 0, "wait %d", i);
    cr_assert_eq(nq_notify(q, h, -1), 256 + 64);
    for (int i = 0; i < 256; i++)
        nq_wait_release(w[i]);
    for (int i = 0; i < 63; i++)
        nq_sub_close(subs[i]);
    for (int i = 1; i < (1 << 20) + 5; i++)
        nq_notify(q, h, i);
    cr_assert_eq(nq_sub_dropped(big), 5, "capacity 2^20 holds 2^20");
    int64_t arg;
    cr_assert_eq(nq_sub_try_recv(big, &arg), 0);
    cr_assert_eq(arg, -1);
    nq_sub_close(big);
    /* And 65536 live handles. */
    nq_handle_t *hs = malloc(sizeof(*hs) * 65535);
    cr_assert_not_null(hs);
    for (int i = 0; i < 65535; i++)
        cr_assert_eq(nq_register(q, NULL, &hs[i]), 0, "handle %d", i);
    cr_assert_eq(stats(q).live_handles, 65536);
    cr_assert_leq(stats(q).bytes_held, stats(q).memory_limit);
    for (int i = 0; i < 65535; i++)
        cr_assert_eq(nq_unregister(q, hs[i]), 0);
    free(hs);
    nq_queue_free(q);
}

Test(limits, queue_new_rejects_bad_configurations) {
    nq_config_t base, cfg;
    nq_config_init(&base);
    nq_queue_t *q = (nq_queue_t *)&q;
    cr_assert_eq(nq_queue_new(&base, NULL), NQ_EINVAL);

    cfg = base;
    cfg.max_handles = 0;
    cr_assert_eq(nq_queue_new(&cfg, &q), NQ_EINVAL);
    cr_assert_null(q, "*out not cleared on failure");
    cfg = base;
    cfg.max_waiters_per_handle = 0;
    cr_assert_eq(nq_queue_new(&cfg, &q), NQ_EINVAL);
    cfg = base;
    cfg.max_subscribers_per_handle = 0;
    cr_assert_eq(nq_queue_new(&cfg, &q), NQ_EINVAL);
    cfg = base;
    cfg.default_capacity = 0;
    cr_assert_eq(nq_queue_new(&cfg, &q), NQ_EINVAL);
    cfg = base;
    cfg.max_handles = UINT32_MAX; /* absurd */
    cr_assert_eq(nq_queue_new(&cfg, &q), NQ_EINVAL);
    cfg = base;
    cfg.max_subscribers_per_handle = UINT32_MAX;
    cr_assert_eq(nq_queue_new(&cfg, &q), NQ_EINVAL);
    cfg = base;
    cfg.max_waiters_per_handle = UINT32_MAX;
    cr_assert_eq(nq_queue_new(&cfg, &q), NQ_EINVAL);
    cfg = base;
    cfg.default_capacity = cfg.max_capacity + 1;
    cr_assert_eq(nq_queue_new(&cfg, &q), NQ_EINVAL);
    /* A memory limit too small for the handle index itself. */
    cfg = base;
    cfg.memory_limit = 100;
    cr_assert_eq(nq_queue_new(&cfg, &q), NQ_ENOMEM);
    cr_assert_null(q);
    /* memory_limit 0 = derived from the limits: something sane. */
    cfg = base;
    cfg.memory_limit = 0;
    q = new_queue(&cfg);
    nq_stats_t st = stats(q);
    cr_assert_gt(st.memory_limit, st.bytes_held);
    nq_queue_free(q);
}

/* The derived limit covers every object the other limits allow, at their
 * largest: here every handle full of port subscriptions (each with a port
 * part) with 63-byte hints, and a port wait per handle beside them. */
static void nop_sub_cb(nq_sub_t *s, void *data) {
    (void)s;
    (void)data;
}
static void nop_wait_cb(void *data, int status, int64_t arg) {
    (void)data;
    (void)status;
    (void)arg;
}

Test(limits, the_derived_memory_limit_holds_every_limit_filled) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = 64;
    cfg.max_subscribers_per_handle = 64;
    cfg.max_waiters_per_handle = 1;
    cfg.default_capacity = 1;
    cfg.memory_limit = 0;
    nq_queue_t *q = new_queue(&cfg);
    nq_port_t *p;
    cr_assert_eq(nq_port_new_sized(64 * 64 + 64, &p), 0);
    char hint[64];
    memset(hint, 'h', 63);
    hint[63] = '\0';
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = 1;
    o.debug_hint = hint;
    int subs = 0;
    for (int i = 0; i < 64; i++) {
        nq_handle_t h = reg(q, hint);
        for (int j = 0; j < 64; j++) {
            int rc = nq_port_subscribe(p, q, h, &o, nop_sub_cb, NULL, NULL);
            cr_assert_eq(rc, 0, "port subscription %d: %s (%zu of %zu bytes held)", subs,
                         nq_strerror(rc), stats(q).bytes_held, stats(q).memory_limit);
            subs++;
        }
        cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, nop_wait_cb, NULL, NULL), 0);
    }
    nq_stats_t st = stats(q);
    cr_log_info("derived limit: %d port subscriptions and 64 port waits hold %zu of %zu bytes",
                subs, st.bytes_held, st.memory_limit);
    cr_assert_leq(st.bytes_held, st.memory_limit);
    nq_port_free(p);
    nq_queue_free(q);
}

/* --- counted limits ----------------------------------------------------- */

Test(limits, max_handles_gives_elimit_and_unregister_makes_room) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = 8;
    nq_queue_t *q = new_queue(&cfg);
    nq_handle_t h[8];
    for (int i = 0; i < 8; i++)
        h[i] = reg(q, "h");
    size_t full = stats(q).bytes_held;
    nq_handle_t x = 123;
    for (int k = 0; k < 100; k++) {
        cr_assert_eq(nq_register(q, "one too many", &x), NQ_ELIMIT);
        cr_assert_eq(x, 0);
    }
    cr_assert_eq(stats(q).bytes_held, full, "refused registrations kept memory");
    cr_assert_eq(stats(q).live_handles, 8);
    cr_assert_eq(nq_unregister(q, h[3]), 0);
    h[3] = reg(q, "again");
    cr_assert_eq(nq_register(q, NULL, &x), NQ_ELIMIT);
    for (int i = 0; i < 8; i++)
        cr_assert_eq(nq_unregister(q, h[i]), 0);
    for (int i = 0; i < 8; i++)
        h[i] = reg(q, NULL);
    cr_assert_eq(nq_register(q, NULL, &x), NQ_ELIMIT);
    nq_queue_free(q);
}

struct blocked {
    nq_queue_t *q;
    nq_handle_t h;
    atomic_int rc;
};

static void *blocked_wait(void *a) {
    struct blocked *b = a;
    atomic_store(&b->rc, nq_wait(b->q, b->h, NQ_SEQ_NEXT, -1, NULL));
    return NULL;
}

Test(limits, max_waiters_per_handle_gives_elimit_for_every_kind_of_wait, .timeout = 30) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_waiters_per_handle = 4;
    nq_queue_t *q = new_queue(&cfg);
    nq_handle_t h = reg(q, NULL), other = reg(q, NULL);
    nq_wait_t *w[4];
    for (int i = 0; i < 4; i++)
        cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, no_waker, &w[i]), 0);
    nq_stats_t st0 = stats(q);
    nq_wait_t *x = (nq_wait_t *)&x;
    cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, no_waker, &x), NQ_ELIMIT);
    cr_assert_null(x);
    cr_assert_eq(nq_wait(q, h, NQ_SEQ_NEXT, 1000000000, NULL), NQ_ELIMIT,
                 "a blocking wait over the limit must fail at once");
    nq_port_t *p = NULL;
    cr_assert_eq(nq_port_new_sized(4, &p), 0);
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, never_wait_cb, NULL, &x), NQ_ELIMIT);
    cr_assert_null(x);
    nq_stats_t st1 = stats(q);
    cr_assert_eq(st1.bytes_held, st0.bytes_held, "refused waits kept memory");
    cr_assert_eq(st1.live_waits, st0.live_waits);
    cr_assert_eq(st1.waits_pending, 4);
    /* Another handle has its own budget. */
    nq_wait_t *ow = NULL;
    cr_assert_eq(nq_wait_start(q, other, NQ_SEQ_NEXT, no_waker, &ow), 0);
    nq_wait_release(ow);
    /* Releasing one makes room for one. */
    nq_wait_release(w[0]);
    cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, no_waker, &w[0]), 0);
    cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, no_waker, &x), NQ_ELIMIT);
    /* A completed wait is no longer pending: notify frees all four places
     * even before the waits are released. */
    cr_assert_eq(nq_notify(q, h, 1), 4);
    nq_wait_t *w2[4];
    for (int i = 0; i < 4; i++)
        cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, no_waker, &w2[i]), 0);
    cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, no_waker, &x), NQ_ELIMIT);
    for (int i = 0; i < 4; i++) {
        nq_wait_release(w[i]);
        nq_wait_release(w2[i]);
    }
    /* Blocked threads count too. */
    struct blocked b[4];
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        b[i].q = q;
        b[i].h = h;
        atomic_init(&b[i].rc, 1);
        cr_assert_eq(pthread_create(&t[i], NULL, blocked_wait, &b[i]), 0);
    }
    int64_t t0 = now_ns();
    while (stats(q).waits_pending < 4) {
        cr_assert_lt(now_ns() - t0, (int64_t)5000000000);
        usleep(1000);
    }
    cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, no_waker, &x), NQ_ELIMIT);
    cr_assert_eq(nq_notify(q, h, 2), 4);
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(pthread_join(t[i], NULL), 0);
        cr_assert_eq(atomic_load(&b[i].rc), 0);
    }
    cr_assert_eq(nq_port_dispatch(p, 0), 0);
    cr_assert_eq(atomic_load(&port_cbs), 0);
    nq_port_free(p);
    nq_queue_free(q);
}

Test(limits, max_subscribers_per_handle_gives_elimit_and_close_makes_room) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_subscribers_per_handle = 3;
    nq_queue_t *q = new_queue(&cfg);
    nq_handle_t h = reg(q, NULL), other = reg(q, NULL);
    nq_sub_t *s[3];
    for (int i = 0; i < 3; i++)
        s[i] = sub(q, h, 4);
    nq_stats_t st0 = stats(q);
    nq_sub_t *x;
    cr_assert_eq(try_sub(q, h, 4, "refused", &x), NQ_ELIMIT);
    cr_assert_null(x);
    nq_port_t *p = NULL;
    cr_assert_eq(nq_port_new_sized(4, &p), 0);
    cr_assert_eq(nq_port_subscribe(p, q, h, NULL, never_sub_cb, NULL, &x), NQ_ELIMIT);
    cr_assert_null(x);
    nq_stats_t st1 = stats(q);
    cr_assert_eq(st1.bytes_held, st0.bytes_held, "refused subscriptions kept memory");
    cr_assert_eq(st1.live_subs, 3);
    nq_sub_t *os = sub(q, other, 4);
    nq_sub_close(os);
    cr_assert_eq(nq_notify(q, h, 1), 3);
    nq_sub_close(s[1]);
    s[1] = sub(q, h, 4);
    cr_assert_eq(try_sub(q, h, 4, NULL, &x), NQ_ELIMIT);
    cr_assert_eq(nq_notify(q, h, 2), 3);
    /* Unregister + a new registration on the slot: a fresh budget. */
    cr_assert_eq(nq_unregister(q, h), 0);
    nq_handle_t h2 = reg(q, NULL);
    nq_sub_t *s2[3];
    for (int i = 0; i < 3; i++)
        s2[i] = sub(q, h2, 4);
    cr_assert_eq(try_sub(q, h2, 4, NULL, &x), NQ_ELIMIT);
    for (int i = 0; i < 3; i++) {
        nq_sub_close(s[i]);
        nq_sub_close(s2[i]);
    }
    cr_assert_eq(nq_port_dispatch(p, 0), 0);
    cr_assert_eq(atomic_load(&port_cbs), 0);
    nq_port_free(p);
    nq_queue_free(q);
}

Test(limits, capacity_above_max_capacity_is_einval) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    nq_config_t cfg;
    nq_config_init(&cfg);
    nq_sub_t *s;
    cr_assert_eq(try_sub(q, h, cfg.max_capacity + 1, NULL, &s), NQ_EINVAL);
    cr_assert_null(s);
    cr_assert_eq(try_sub(q, h, UINT32_MAX, NULL, &s), NQ_EINVAL);
    cr_assert_null(s);
    cr_assert_eq(stats(q).live_subs, 0);
    nq_queue_free(q);
}

/* --- memory ------------------------------------------------------------- */

Test(limits, memory_limit_gives_enomem_and_closing_makes_room) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = 64;
    cfg.memory_limit = 256 * 1024;
    nq_queue_t *q = new_queue(&cfg);
    nq_handle_t h[4];
    for (int i = 0; i < 4; i++)
        h[i] = reg(q, "mem");
    enum { MAXS = 1000 };
    nq_sub_t *s[MAXS];
    int n = 0, rc;
    /* 8 KiB rings, spread over handles, until the limit says no. */
    while ((rc = try_sub(q, h[n % 4], 1024, "ring", &s[n])) == 0) {
        cr_assert_lt(n, MAXS - 1, "memory_limit never refused: unbounded growth");
        n++;
        nq_stats_t st = stats(q);
        cr_assert_leq(st.bytes_held, st.memory_limit);
    }
    cr_assert_eq(rc, NQ_ENOMEM, "%s", nq_err_name(rc));
    cr_assert_null(s[n]);
    /* 256 KiB / 8 KiB = 32 at most; some must have fitted. */
    cr_assert_gt(n, 8);
    cr_assert_leq(n, 32);
    nq_stats_t full = stats(q);
    cr_assert_leq(full.bytes_held, full.memory_limit);
    /* Refusals keep nothing. */
    for (int k = 0; k < 10; k++) {
        nq_sub_t *x;
        cr_assert_eq(try_sub(q, h[0], 1024, "again", &x), NQ_ENOMEM);
        nq_wait_t *w = NULL;
        int wrc = nq_wait_start(q, h[0], NQ_SEQ_NEXT, no_waker, &w);
        if (wrc == 0)
            nq_wait_release(w);
        else
            cr_assert_eq(wrc, NQ_ENOMEM);
    }
    cr_assert_eq(stats(q).bytes_held, full.bytes_held, "refused allocations kept memory");
    /* A smaller subscription may still fit; a big one never will. */
    nq_sub_t *huge;
    cr_assert_eq(try_sub(q, h[1], 1u << 20, NULL, &huge), NQ_ENOMEM);
    /* Closing makes room again, for the same number. */
    for (int i = 0; i < n; i++)
        nq_sub_close(s[i]);
    int m = 0;
    while ((rc = try_sub(q, h[m % 4], 1024, "ring", &s[m])) == 0) {
        cr_assert_lt(m, MAXS - 1);
        m++;
    }
    cr_assert_eq(rc, NQ_ENOMEM);
    cr_assert_eq(m, n, "room after closing: %d subscriptions, before: %d", m, n);
    for (int i = 0; i < m; i++)
        nq_sub_close(s[i]);
    nq_queue_free(q);
}

Test(limits, memory_limit_bounds_registrations_and_unregister_makes_room) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = 4096;
    nq_queue_t *probe = new_queue(&cfg);
    size_t table = stats(probe).bytes_held;
    nq_queue_free(probe);
    cfg.memory_limit = table + 16 * 1024; /* room for some handles, not 4096 */
    nq_queue_t *q = new_queue(&cfg);
    nq_handle_t *h = calloc(4096, sizeof(*h));
    cr_assert_not_null(h);
    const char *hint = "a hint that costs memory too, 40 bytes..";
    int n = 0, rc;
    while ((rc = nq_register(q, hint, &h[n])) == 0) {
        cr_assert_lt(n, 4095, "memory_limit never refused a registration");
        n++;
    }
    cr_assert_eq(rc, NQ_ENOMEM, "%s", nq_err_name(rc));
    cr_assert_eq(h[n], 0);
    cr_assert_gt(n, 10);
    nq_stats_t st = stats(q);
    cr_assert_leq(st.bytes_held, st.memory_limit);
    cr_assert_eq(st.live_handles, (uint32_t)n);
    for (int i = 0; i < n; i++)
        cr_assert_eq(nq_unregister(q, h[i]), 0);
    int m = 0;
    while ((rc = nq_register(q, hint, &h[m])) == 0) {
        cr_assert_lt(m, 4095);
        m++;
    }
    cr_assert_eq(rc, NQ_ENOMEM);
    cr_assert_eq(m, n, "room after unregistering: %d handles, before: %d", m, n);
    free(h);
    nq_queue_free(q);
}

Test(limits, a_subscriber_that_never_drains_holds_bounded_memory) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q, NULL);
    nq_sub_t *a = sub(q, h, 16);
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = 16;
    o.overflow = NQ_DROP_OLDEST;
    nq_sub_t *b = NULL;
    cr_assert_eq(nq_subscribe(q, h, &o, &b), 0);
    size_t before = stats(q).bytes_held;
    const long n = SCALE(200000);
    for (long i = 0; i < n; i++)
        nq_notify(q, h, i);
    nq_stats_t st = stats(q);
    cr_assert_eq(st.bytes_held, before, "notify grew memory: %zu -> %zu", before, st.bytes_held);
    cr_assert_eq(nq_sub_dropped(a), (uint64_t)(n - 16));
    cr_assert_eq(nq_sub_dropped(b), (uint64_t)(n - 16));
    cr_assert_eq(st.drops, (uint64_t)(2 * (n - 16)));
    int64_t buf[64];
    cr_assert_eq(nq_sub_recv_batch(a, buf, 64), 16);
    cr_assert_eq(buf[15], 15);
    cr_assert_eq(nq_sub_recv_batch(b, buf, 64), 16);
    cr_assert_eq(buf[15], n - 1);
    nq_sub_close(a);
    nq_sub_close(b);
    nq_queue_free(q);
}

Test(limits, create_and_release_cycles_do_not_grow_memory) {
    nq_queue_t *q = new_queue(NULL);
    size_t steady = 0;
    const int n = SCALE(20000);
    for (int i = 0; i < n; i++) {
        nq_handle_t h = reg(q, "cycle");
        nq_sub_t *s;
        cr_assert_eq(try_sub(q, h, 8, "sub", &s), 0);
        nq_wait_t *w = NULL;
        cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, no_waker, &w), 0);
        nq_notify(q, h, i);
        nq_wait_release(w);
        nq_sub_close(s);
        cr_assert_eq(nq_unregister(q, h), 0);
        if (i == 0)
            steady = stats(q).bytes_held;
    }
    nq_stats_t st = stats(q);
    cr_assert_eq(st.bytes_held, steady, "bytes grew from %zu to %zu over %d cycles", steady,
                 st.bytes_held, n);
    cr_assert_eq(st.live_handles, 0);
    cr_assert_eq(st.live_subs, 0);
    cr_assert_eq(st.live_waits, 0);
    nq_queue_free(q);
}

/* --- allocation failures ------------------------------------------------ */

/* Runs op with the k-th allocation failing, for k = 1, 2, ... until op
 * succeeds. Each failure must be NQ_ENOMEM, caused by exactly the injected
 * failure, and leave the queue's accounting as it was. Returns how many
 * failure points were tried. */
typedef int (*op_fn)(nq_queue_t *q, nq_handle_t h, void **obj);

static int every_failure_point(nq_queue_t *q, nq_handle_t h, op_fn op, void **obj,
                               const char *what) {
    for (int k = 1; k < 64; k++) {
        nq_stats_t before = stats(q);
        nq__alloc_fail_at(k, 0);
        int rc = op(q, h, obj);
        long failed = nq__alloc_fail_at(0, 0);
        if (rc == 0) {
            cr_assert_eq(failed, 0, "%s: allocation %d failed yet the call succeeded", what, k);
            return k - 1;
        }
        cr_assert_eq(rc, NQ_ENOMEM, "%s with allocation %d failing: %s", what, k, nq_err_name(rc));
        cr_assert_eq(failed, 1, "%s: ENOMEM without an allocation failing", what);
        cr_assert_null(*obj, "%s: *out set on failure", what);
        nq_stats_t after = stats(q);
        cr_assert_eq(after.bytes_held, before.bytes_held, "%s, allocation %d: bytes %zu -> %zu",
                     what, k, before.bytes_held, after.bytes_held);
        cr_assert_eq(after.live_handles, before.live_handles, "%s", what);
        cr_assert_eq(after.live_subs, before.live_subs, "%s", what);
        cr_assert_eq(after.live_waits, before.live_waits, "%s", what);
        cr_assert_eq(after.waits_pending, before.waits_pending, "%s", what);
    }
    cr_assert_fail("%s never succeeded", what);
    return -1;
}

static int op_register(nq_queue_t *q, nq_handle_t h, void **obj) {
    (void)h;
    nq_handle_t *out = malloc(sizeof(*out));
    cr_assert_not_null(out);
    int rc = nq_register(q, "a hint to copy", out);
    if (rc != 0 || *out == 0) {
        free(out);
        *obj = NULL;
        return rc;
    }
    *obj = out;
    return 0;
}

static int op_subscribe(nq_queue_t *q, nq_handle_t h, void **obj) {
    nq_sub_t *s = NULL;
    int rc = try_sub(q, h, 32, "a sub hint", &s);
    *obj = s;
    return rc;
}

static int op_wait_start(nq_queue_t *q, nq_handle_t h, void **obj) {
    nq_wait_t *w = NULL;
    int rc = nq_wait_start(q, h, NQ_SEQ_NEXT, no_waker, &w);
    *obj = w;
    return rc;
}

Test(limits, every_allocation_failure_is_enomem_and_leaves_nothing) {
    /* nq_queue_new itself. */
    int k;
    nq_queue_t *q = NULL;
    for (k = 1; k < 16; k++) {
        nq__alloc_fail_at(k, 0);
        int rc = nq_queue_new(NULL, &q);
        long failed = nq__alloc_fail_at(0, 0);
        if (rc == 0)
            break;
        cr_assert_eq(rc, NQ_ENOMEM);
        cr_assert_eq(failed, 1);
        cr_assert_null(q);
    }
    cr_assert_gt(k, 1, "nq_queue_new allocates nothing?");
    cr_assert_not_null(q);

    void *obj = NULL;
    int points = every_failure_point(q, 0, op_register, &obj, "nq_register");
    cr_assert_geq(points, 1);
    nq_handle_t h = *(nq_handle_t *)obj;
    free(obj);
    /* The first subscription on a handle allocates more than later ones. */
    points = every_failure_point(q, h, op_subscribe, &obj, "first nq_subscribe");
    cr_assert_geq(points, 2);
    nq_sub_t *s1 = obj;
    points = every_failure_point(q, h, op_subscribe, &obj, "second nq_subscribe");
    cr_assert_geq(points, 2);
    nq_sub_t *s2 = obj;
    points = every_failure_point(q, h, op_wait_start, &obj, "nq_wait_start");
    cr_assert_geq(points, 1);
    nq_wait_t *w = obj;
    /* Everything created after the failures works. */
    cr_assert_eq(nq_notify(q, h, 5), 3);
    int64_t arg;
    cr_assert_eq(nq_sub_try_recv(s1, &arg), 0);
    cr_assert_eq(nq_sub_try_recv(s2, &arg), 0);
    cr_assert_eq(nq_wait_result(w, &arg), 0);
    nq_wait_release(w);
    nq_sub_close(s1);
    nq_sub_close(s2);
    /* A sticky failure: everything that allocates says ENOMEM, the rest works. */
    nq__alloc_fail_at(1, 1);
    nq_handle_t x;
    nq_sub_t *sx;
    nq_wait_t *wx;
    cr_assert_eq(nq_register(q, "x", &x), NQ_ENOMEM);
    cr_assert_eq(try_sub(q, h, 4, NULL, &sx), NQ_ENOMEM);
    cr_assert_eq(nq_wait_start(q, h, NQ_SEQ_NEXT, no_waker, &wx), NQ_ENOMEM);
    cr_assert_eq(nq_notify(q, h, 6), 0);
    cr_assert_eq(nq_wait(q, h, NQ_SEQ_NEXT, 0, NULL), NQ_ETIMEDOUT,
                 "a blocking wait needs no allocation");
    cr_assert_geq(nq__alloc_fail_at(0, 0), 3);
    cr_assert_eq(nq_unregister(q, h), 0);
    nq_queue_free(q);
}

/* --- handle slots in chunks --------------------------------------------- */

/* What a chunk of n slots is charged: their hot and cold parts, rounded up
 * to a line. */
static size_t chunk_bytes(uint32_t n) {
    size_t b = (size_t)n * (sizeof(nq__hslot_t) + sizeof(nq__hcold_t));
    return (b + NQ__CACHELINE - 1) & ~(size_t)(NQ__CACHELINE - 1);
}

/* A forged handle of like's queue and generation, naming slot index
 * (0-based): the handle value layout of core/handle.h. */
static nq_handle_t forged(nq_handle_t like, uint32_t index) {
    return (like & ~(nq_handle_t)NQ__H_INDEX_MASK) | ((uint64_t)index + 1);
}

/* Slots are charged a chunk at a time, when the first slot of a chunk is
 * handed out; max_handles that is not a multiple of the chunk size gets a
 * short last chunk; handles on both sides of a chunk boundary work; and
 * unregistered slots are reused, in their chunks, without new memory. */
Test(limits, handle_slots_come_in_chunks_charged_when_first_used) {
    enum { C = NQ__CHUNK_SLOTS, N = 3 * C + 5 };
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = N;
    nq_queue_t *q = new_queue(&cfg);
    nq_handle_t h[N];
    size_t start = stats(q).bytes_held, total = 0;
    for (uint32_t i = 0; i < N; i++) {
        size_t before = stats(q).bytes_held;
        h[i] = reg(q, NULL);
        cr_assert_eq(nq__h_index(q, h[i]), i, "slots are handed out in order");
        size_t grew = stats(q).bytes_held - before;
        size_t want = i % C != 0 ? 0 : chunk_bytes(N - i < C ? N - i : C);
        cr_assert_eq(grew, want, "register #%u grew bytes_held by %zu, not %zu", i, grew, want);
        total += grew;
        /* A slot of the chunk not handed out yet is no handle. */
        if (i % C != C - 1 && i + 1 < N)
            cr_assert_eq(nq_notify(q, forged(h[0], i + 1), 0), NQ_EBADH);
    }
    cr_assert_eq(total, 3 * chunk_bytes(C) + chunk_bytes(5));
    cr_log_info("%u handles in chunks of %u: %zu bytes of slots (%zu a full chunk, %zu the "
                "last of 5), %.3f per handle",
                (unsigned)N, (unsigned)C, total, chunk_bytes(C), chunk_bytes(5),
                (double)total / N);
    nq_handle_t x = 0;
    cr_assert_eq(nq_register(q, NULL, &x), NQ_ELIMIT);
    cr_assert_eq(stats(q).bytes_held, start + total);
    /* Every handle is its own, across the boundaries. */
    for (uint32_t i = 0; i < N; i++)
        cr_assert_eq(nq_notify(q, h[i], (int64_t)i * 3), 0);
    for (uint32_t i = 0; i < N; i++) {
        uint64_t seq = 0;
        cr_assert_eq(nq_seq(q, h[i], &seq), 0);
        cr_assert_eq(seq, 1, "handle %u saw %llu notifies", i, (unsigned long long)seq);
    }
    const uint32_t edge[] = {C - 1, C, 2 * C - 1, 2 * C, 3 * C, N - 1};
    nq_sub_t *s[6];
    for (int k = 0; k < 6; k++)
        s[k] = sub(q, h[edge[k]], 4);
    for (int k = 0; k < 6; k++)
        cr_assert_eq(nq_notify(q, h[edge[k]], edge[k]), 1);
    for (int k = 0; k < 6; k++) {
        int64_t arg = -1;
        cr_assert_eq(nq_sub_try_recv(s[k], &arg), 0);
        cr_assert_eq(arg, (int64_t)edge[k], "subscription on handle %u got %lld", edge[k],
                     (long long)arg);
        cr_assert_eq(nq_sub_try_recv(s[k], &arg), NQ_EAGAIN);
        nq_sub_close(s[k]);
    }
    /* Unregister every other handle and the whole of chunk 1: register takes
     * those slots back (no new chunk), under new generations. */
    size_t held = stats(q).bytes_held;
    uint32_t freed = 0;
    for (uint32_t i = 0; i < N; i++) {
        if (i % 2 == 0 || (i >= C && i < 2 * C)) {
            cr_assert_eq(nq_unregister(q, h[i]), 0);
            freed++;
        }
    }
    for (uint32_t k = 0; k < freed; k++) {
        nq_handle_t y = reg(q, NULL);
        uint32_t i = nq__h_index(q, y);
        cr_assert_lt(i, (uint32_t)N);
        cr_assert_neq(y, h[i], "a handle value was issued twice");
        cr_assert_eq(nq_notify(q, h[i], 0), NQ_EBADH, "the old handle reached the new owner");
        h[i] = y;
    }
    cr_assert_eq(nq_register(q, NULL, &x), NQ_ELIMIT);
    cr_assert_eq(stats(q).bytes_held, held, "reused slots cost memory");
    cr_assert_eq(stats(q).live_handles, (uint32_t)N);
    for (uint32_t i = 0; i < N; i++)
        cr_assert_eq(nq_notify(q, h[i], 1), 0);
    nq_queue_free(q);
}

/* A chunk that cannot be charged or allocated refuses the registration with
 * NQ_ENOMEM and leaves nothing behind; the next one that can, takes the
 * same slot; slots of chunks already held still register. */
Test(limits, a_chunk_that_cannot_be_charged_or_allocated_is_enomem) {
    enum { C = NQ__CHUNK_SLOTS };
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = 4 * C;
    nq_queue_t *probe = new_queue(&cfg);
    size_t empty = stats(probe).bytes_held;
    nq_queue_free(probe);
    /* Room for one chunk and 100 bytes of the next. */
    cfg.memory_limit = empty + chunk_bytes(C) + 100;
    nq_queue_t *q = new_queue(&cfg);
    nq_handle_t h[C];
    for (uint32_t i = 0; i < C; i++)
        h[i] = reg(q, NULL);
    nq_stats_t full = stats(q);
    nq_handle_t x = 7;
    for (int k = 0; k < 3; k++) {
        cr_assert_eq(nq_register(q, NULL, &x), NQ_ENOMEM);
        cr_assert_eq(x, 0);
    }
    cr_assert_eq(stats(q).bytes_held, full.bytes_held, "a refused chunk kept memory");
    cr_assert_eq(stats(q).live_handles, (uint32_t)C);
    cr_assert_eq(nq_notify(q, forged(h[0], C), 0), NQ_EBADH, "a slot of an unallocated chunk");
    /* A freed slot of the held chunk registers without a new chunk. */
    cr_assert_eq(nq_unregister(q, h[5]), 0);
    h[5] = reg(q, NULL);
    cr_assert_eq(nq__h_index(q, h[5]), 5);
    cr_assert_eq(nq_register(q, NULL, &x), NQ_ENOMEM);
    nq_queue_free(q);

    /* The same with the chunk's allocation failing, under no memory limit. */
    nq_config_init(&cfg);
    cfg.max_handles = 4 * C;
    q = new_queue(&cfg);
    for (uint32_t i = 0; i < C; i++)
        reg(q, NULL);
    size_t before = stats(q).bytes_held;
    nq__alloc_fail_at(1, 0);
    cr_assert_eq(nq_register(q, NULL, &x), NQ_ENOMEM);
    cr_assert_eq(nq__alloc_fail_at(0, 0), 1, "the chunk's allocation was not the one refused");
    cr_assert_eq(stats(q).bytes_held, before);
    cr_assert_eq(stats(q).live_handles, (uint32_t)C);
    x = reg(q, NULL);
    cr_assert_eq(nq__h_index(q, x), C, "the retry did not take the first slot of the new chunk");
    cr_assert_eq(stats(q).bytes_held, before + chunk_bytes(C));
    cr_assert_eq(nq_notify(q, x, 9), 0);
    nq_queue_free(q);
}

typedef struct range {
    uintptr_t lo, hi;
} range_t;

static int range_cmp(const void *a, const void *b) {
    const range_t *x = a, *y = b;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

/* Within a chunk: the hot parts are 32-byte aligned (never across two cache
 * lines), and every slot's hot and cold parts lie inside the bytes charged
 * for its chunk, overlapping nothing else, the short last chunk included. */
Test(limits, slot_parts_are_aligned_disjoint_and_inside_their_chunk) {
    enum { C = NQ__CHUNK_SLOTS, N = 3 * C + 5 };
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = N;
    nq_queue_t *q = new_queue(&cfg);
    for (uint32_t i = 0; i < N; i++)
        reg(q, NULL);
    static range_t r[2 * N];
    for (uint32_t i = 0; i < N; i++) {
        uintptr_t hot = (uintptr_t)nq__slot_at(q, i), cold = (uintptr_t)nq__slot_cold(q, i);
        uintptr_t base = (uintptr_t)nq__slot_at(q, i & ~(uint32_t)(C - 1));
        size_t bytes = chunk_bytes(N - (i & ~(uint32_t)(C - 1)) < C ? N - (i & ~(uint32_t)(C - 1)) : C);
        cr_assert_eq(hot % 32, 0, "slot %u: hot part at %#lx", i, (unsigned long)hot);
        cr_assert(hot >= base && hot + sizeof(nq__hslot_t) <= base + bytes, "slot %u: hot part outside", i);
        cr_assert(cold >= base && cold + sizeof(nq__hcold_t) <= base + bytes, "slot %u: cold part outside", i);
        r[2 * i] = (range_t){hot, hot + sizeof(nq__hslot_t)};
        r[2 * i + 1] = (range_t){cold, cold + sizeof(nq__hcold_t)};
    }
    qsort(r, 2 * N, sizeof(r[0]), range_cmp);
    for (uint32_t k = 1; k < 2 * N; k++)
        cr_assert_leq(r[k - 1].hi, r[k].lo, "two slot parts overlap");
    nq_queue_free(q);
}
