/* cmp_handles: how notify cost and memory scale with the number of handles.
 *
 * Workloads e_1k, e_10k, e_100k, e_1M: that many registered handles on one
 * loop. A producer thread notifies random handles N times (default 1M,
 * --quick 50k; the random order is precomputed, so the RNG is not timed)
 * while the loop thread consumes. Figures: producer_ns (the producer's own
 * time per notify), notifies_per_s (first notify to last delivery, N over
 * that time) and peak_rss_kb.
 *
 * Contenders:
 *   nq_uv     one port (attached to a uv loop with nq_uv_t) and one port wait
 *             per handle, re-armed in its callback with nq_port_wait(after =
 *             the seq it saw). A wait costs ~150 bytes; a port subscription
 *             per handle would cost capacity x 8 + ~150 bytes more per handle
 *             and be level-triggered: waits are what a user with a million
 *             handles, each "something changed, look again", would use.
 *             The producer calls nq_notify(handle, i).
 *   uv_async  libuv's million_async case: one uv_async_t per handle on one
 *             loop, the producer calls uv_async_send on random ones. libuv
 *             (1.x) scans every async handle of the loop on each wakeup, so
 *             a wakeup costs O(handles), and every send to a handle that is
 *             not pending writes the loop's eventfd. For exact accounting
 *             the producer adds 1 to a per-handle atomic counter next to the
 *             uv_async_t (what the user adds) before each send.
 *
 * Accounting (both conflate: several notifies on one handle may produce one
 * callback). The consumer accounts every notification exactly once: nq_uv by
 * the handle's seq (nq_seq) delta since its last callback, uv_async by
 * exchanging the per-handle counter with 0. The run ends when the consumer
 * has accounted N; ok requires accounted == N, no error, no watchdog
 * timeout, and for nq_uv also nq_queue_stats().notifies == N and each
 * callback's arg being a notify of that handle, newer than the last one seen
 * (no duplicate, no reordering). "delivered" is the accounted count,
 * "wakeups" the callbacks that carried it.
 *
 * Workload mem: bytes per idle registered handle (over 100k handles) and, for
 *   libnq, per subscription of capacity 1024.
 *   nq        bytes_per_handle = slot_bytes_per_handle + index_bytes_per_handle,
 *             both from nq_queue_stats().bytes_held, whatever the layout:
 *             slot_bytes_per_handle: the growth of bytes_held over 100k
 *             registrations / 100k (libnq allocates slots in chunks of 64
 *             when first needed: 64 x 56 bytes, the last one cut to what is
 *             left of max_handles); index_bytes_per_handle: what an empty
 *             queue holds more with max_handles 200k than with 100k, / 100k
 *             (the index sized by max_handles and charged when the queue is
 *             made: a chunk pointer per 64 handles, 8 / 64 = 0.125).
 *             bytes_per_sub from bytes_held deltas: one subscription on each
 *             of 1000 fresh handles (which also allocates each handle's
 *             subscriber array, 2 pointers), and bytes_per_sub_marginal: 63
 *             more on one handle that has its array already;
 *             bytes_per_port_sub: like bytes_per_sub, with
 *             nq_port_subscribe (a port subscription adds its port's part).
 *             rss_* figures: resident-set deltas, malloc overhead included.
 *   uv_async  sizeof(uv_async_t) + a pthread_mutex_t + a queue head (two
 *             pointers), what a user adds per handle to pass data; rss from
 *             100k of them initialised on one loop.
 *   ev_async  sizeof(ev_async) + libev's asyncs[] entry (a pointer) + the
 *             same mutex and queue head; rss likewise.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ev.h>
#include <uv.h>

#include "harness.h"
#include "nq.h"
#include "nq/uv.h"

#define PROGRAM "cmp_handles"

static const char PAIRS[] = "e_1k nq_uv\n"
                            "e_1k uv_async\n"
                            "e_10k nq_uv\n"
                            "e_10k uv_async\n"
                            "e_100k nq_uv\n"
                            "e_100k uv_async\n"
                            "e_1M nq_uv\n"
                            "e_1M uv_async\n"
                            "mem nq\n"
                            "mem uv_async\n"
                            "mem ev_async\n";

/* --- shared state of an e_* run ----------------------------------------- */

static struct {
    uint32_t nhandles;
    long n;                      /* notifies to send */
    uint32_t *idx;               /* n random handle indexes */
    atomic_int go;               /* the loop is about to run: start */
    int producer_cpu;
    int64_t t_start, t_stop;     /* producer's first and last notify */
    int64_t t_end;               /* consumer: the last accounting */
    uint64_t accounted;          /* consumer thread only */
    uint64_t wakeups;            /* callbacks */
    uint64_t errors;             /* consumer: bad status, bad arg, refused re-arm */
    long prod_errors;            /* producer: refused notifies/sends */
    int closing;                 /* teardown: cancelled callbacks are expected */
    int timed_out;
    uv_loop_t *loop;
} g;

static uint64_t xorshift64(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static uint32_t *make_indexes(long n, uint32_t nhandles) {
    uint32_t *v = malloc((size_t)n * sizeof(*v));
    if (v == NULL)
        return NULL;
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (long i = 0; i < n; i++)
        v[i] = (uint32_t)(xorshift64(&s) % nhandles);
    return v;
}

static void wait_go(void) {
    if (g.producer_cpu >= 0)
        (void)h_pin(g.producer_cpu);
    while (!atomic_load_explicit(&g.go, memory_order_acquire))
        sched_yield();
}

static void on_watchdog(uv_timer_t *t) {
    g.timed_out = 1;
    uv_stop(t->loop);
}

/* --- nq_uv ------------------------------------------------------------- */

static struct {
    nq_queue_t *q;
    nq_port_t *port;
    nq_uv_t nu;
    nq_handle_t *handles;  /* by index */
    nq_handle_t *hv;       /* n: handles[idx[i]], the producer's sequence */
    uint64_t *last_seq;    /* by index: seq accounted so far */
    int64_t *last_arg;     /* by index: the last arg a callback brought */
} nqs;

static void nq_on_wake(void *data, int status, int64_t arg) {
    uint32_t i = (uint32_t)(uintptr_t)data;
    if (status != 0) {
        if (!g.closing)
            g.errors++;
        return;
    }
    g.wakeups++;
    /* arg is the producer's loop index: it must name this handle and be
     * newer than the last one seen here. */
    if (arg < 0 || arg >= g.n || g.idx[arg] != i || arg <= nqs.last_arg[i])
        g.errors++;
    nqs.last_arg[i] = arg;
    uint64_t seq;
    if (nq_seq(nqs.q, nqs.handles[i], &seq) < 0) {
        g.errors++;
        return;
    }
    g.accounted += seq - nqs.last_seq[i];
    nqs.last_seq[i] = seq;
    if (nq_port_wait(nqs.port, nqs.q, nqs.handles[i], seq, -1, nq_on_wake, data, NULL) < 0)
        g.errors++;
    if (g.accounted >= (uint64_t)g.n && g.t_end == 0) {
        g.t_end = h_now_ns();
        uv_stop(g.loop);
    }
}

static void *nq_producer(void *arg) {
    (void)arg;
    wait_go();
    const nq_handle_t *hv = nqs.hv;
    nq_queue_t *q = nqs.q;
    long n = g.n, bad = 0;
    int64_t t0 = h_now_ns();
    for (long i = 0; i < n; i++)
        bad += nq_notify(q, hv[i], i) < 0;
    g.t_stop = h_now_ns();
    g.t_start = t0;
    g.prod_errors = bad;
    return NULL;
}

static int run_nq_uv(h_result_t *r, int64_t watchdog_ms) {
    uint32_t nh = g.nhandles;
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = nh;
    /* 1 slot (56, in chunks of 64) + one live wait (152) per handle,
     * with room to spare. */
    cfg.memory_limit = (size_t)nh * 1024 + ((size_t)64 << 20);
    int rc = nq_queue_new(&cfg, &nqs.q);
    if (rc < 0) {
        fprintf(stderr, "nq_queue_new: %s\n", nq_strerror(rc));
        return -1;
    }
    rc = nq_port_new_sized(nh + 64, &nqs.port);
    if (rc < 0) {
        fprintf(stderr, "nq_port_new_sized: %s\n", nq_strerror(rc));
        return -1;
    }
    nqs.handles = malloc((size_t)nh * sizeof(*nqs.handles));
    nqs.last_seq = calloc(nh, sizeof(*nqs.last_seq));
    nqs.last_arg = malloc((size_t)nh * sizeof(*nqs.last_arg));
    nqs.hv = malloc((size_t)g.n * sizeof(*nqs.hv));
    if (!nqs.handles || !nqs.last_seq || !nqs.last_arg || !nqs.hv)
        return -1;
    for (uint32_t i = 0; i < nh; i++) {
        nqs.last_arg[i] = -1;
        if ((rc = nq_register(nqs.q, NULL, &nqs.handles[i])) < 0 ||
            (rc = nq_port_wait(nqs.port, nqs.q, nqs.handles[i], 0, -1, nq_on_wake,
                               (void *)(uintptr_t)i, NULL)) < 0) {
            fprintf(stderr, "setup of handle %u: %s\n", i, nq_strerror(rc));
            return -1;
        }
    }
    for (long i = 0; i < g.n; i++)
        nqs.hv[i] = nqs.handles[g.idx[i]];

    uv_loop_t loop;
    uv_loop_init(&loop);
    g.loop = &loop;
    if ((rc = nq_uv_init(&loop, &nqs.nu, nqs.port)) < 0) {
        fprintf(stderr, "nq_uv_init: %s\n", nq_strerror(rc));
        return -1;
    }
    uv_timer_t wd;
    uv_timer_init(&loop, &wd);
    uv_timer_start(&wd, on_watchdog, (uint64_t)watchdog_ms, 0);

    pthread_t th;
    if (pthread_create(&th, NULL, nq_producer, NULL) != 0)
        return -1;
    atomic_store_explicit(&g.go, 1, memory_order_release);
    uv_run(&loop, UV_RUN_DEFAULT);
    pthread_join(th, NULL);

    nq_stats_t st;
    nq_queue_stats(nqs.q, &st);
    nq_port_stats_t ps;
    nq_port_stats(nqs.port, &ps);

    g.closing = 1;
    uv_timer_stop(&wd);
    uv_close((uv_handle_t *)&wd, NULL);
    nq_uv_close(&nqs.nu, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    nq_port_free(nqs.port); /* the pending waits call back with NQ_ECANCELED */
    nq_queue_free(nqs.q);

    h_int(r, "notifies_counted", (int64_t)st.notifies);
    h_int(r, "efd_writes", (int64_t)ps.efd_writes);
    h_int(r, "dispatches", (int64_t)ps.dispatches);
    h_num(r, "syscalls_per_1M",
          1e6 * (double)(ps.efd_writes + ps.efd_reads) / (double)g.n);
    free(nqs.handles);
    free(nqs.last_seq);
    free(nqs.last_arg);
    free(nqs.hv);
    return st.notifies == (uint64_t)g.n ? 0 : 1;
}

/* --- uv_async ---------------------------------------------------------- */

typedef struct ua {
    uv_async_t a;
    _Atomic uint64_t count; /* what the user adds for exact accounting */
} ua_t;

static struct {
    ua_t *h;       /* nhandles */
    ua_t **hv;     /* n: &h[idx[i]], the producer's sequence */
} uas;

static void ua_on_async(uv_async_t *a) {
    ua_t *u = (ua_t *)a;
    uint64_t c = atomic_exchange_explicit(&u->count, 0, memory_order_acquire);
    g.wakeups++;
    g.accounted += c;
    if (g.accounted >= (uint64_t)g.n && g.t_end == 0) {
        g.t_end = h_now_ns();
        uv_stop(g.loop);
    }
}

static void *ua_producer(void *arg) {
    (void)arg;
    wait_go();
    ua_t *const *hv = uas.hv;
    long n = g.n, bad = 0;
    int64_t t0 = h_now_ns();
    for (long i = 0; i < n; i++) {
        ua_t *u = hv[i];
        /* Release: the count is visible to the callback the send causes. */
        atomic_fetch_add_explicit(&u->count, 1, memory_order_release);
        bad += uv_async_send(&u->a) != 0;
    }
    g.t_stop = h_now_ns();
    g.t_start = t0;
    g.prod_errors = bad;
    return NULL;
}

static int run_uv_async(h_result_t *r, int64_t watchdog_ms) {
    (void)r;
    uint32_t nh = g.nhandles;
    uv_loop_t loop;
    uv_loop_init(&loop);
    g.loop = &loop;
    uas.h = calloc(nh, sizeof(*uas.h));
    uas.hv = malloc((size_t)g.n * sizeof(*uas.hv));
    if (!uas.h || !uas.hv)
        return -1;
    for (uint32_t i = 0; i < nh; i++) {
        int rc = uv_async_init(&loop, &uas.h[i].a, ua_on_async);
        if (rc < 0) {
            fprintf(stderr, "uv_async_init: %s\n", uv_strerror(rc));
            return -1;
        }
        atomic_init(&uas.h[i].count, 0);
    }
    for (long i = 0; i < g.n; i++)
        uas.hv[i] = &uas.h[g.idx[i]];
    uv_timer_t wd;
    uv_timer_init(&loop, &wd);
    uv_timer_start(&wd, on_watchdog, (uint64_t)watchdog_ms, 0);

    pthread_t th;
    if (pthread_create(&th, NULL, ua_producer, NULL) != 0)
        return -1;
    atomic_store_explicit(&g.go, 1, memory_order_release);
    uv_run(&loop, UV_RUN_DEFAULT);
    pthread_join(th, NULL);

    g.closing = 1;
    uv_close((uv_handle_t *)&wd, NULL);
    for (uint32_t i = 0; i < nh; i++)
        uv_close((uv_handle_t *)&uas.h[i].a, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    free(uas.h);
    free(uas.hv);
    return 0;
}

static int run_e(const h_opts_t *o, uint32_t nhandles) {
    h_result_t r;
    h_begin(&r, PROGRAM, o);
    g.nhandles = nhandles;
    g.n = o->n > 0 ? o->n : o->quick ? 50000 : 1000000;
    g.idx = make_indexes(g.n, nhandles);
    if (g.idx == NULL)
        return 1;
    int ncpu = h_ncpus();
    g.producer_cpu = ncpu >= 2 ? 0 : -1;
    if (ncpu >= 2)
        (void)h_pin(1); /* the loop thread */
    int64_t watchdog_ms = o->quick ? 10000 : 30000;
    int64_t t_setup = h_now_ns();
    int rc;
    const char *note;
    if (strcmp(o->contender, "nq_uv") == 0) {
        rc = run_nq_uv(&r, watchdog_ms);
        note = "one port wait per handle re-armed in its callback with after=seq; "
               "accounted by seq deltas";
    } else {
        rc = run_uv_async(&r, watchdog_ms);
        note = "one uv_async_t per handle plus a per-handle atomic counter for "
               "accounting; libuv scans all async handles per wakeup";
    }
    if (rc < 0) {
        fprintf(stderr, "%s: setup failed\n", o->contender);
        return 1;
    }
    int64_t t_all = h_now_ns() - t_setup;
    double e2e_s = g.t_end > g.t_start ? (double)(g.t_end - g.t_start) / 1e9 : 0;
    int ok = rc == 0 && !g.timed_out && g.errors == 0 && g.prod_errors == 0 &&
             g.accounted == (uint64_t)g.n;
    h_int(&r, "handles", nhandles);
    h_int(&r, "sent", g.n);
    h_int(&r, "delivered", (int64_t)g.accounted);
    h_int(&r, "dropped", 0);
    h_int(&r, "wakeups", (int64_t)g.wakeups);
    h_int(&r, "errors", (int64_t)g.errors + g.prod_errors);
    h_num(&r, "producer_ns", (double)(g.t_stop - g.t_start) / (double)g.n);
    h_num(&r, "notifies_per_s", e2e_s > 0 ? (double)g.n / e2e_s : 0);
    h_num(&r, "run_s", (double)t_all / 1e9);
    free(g.idx);
    return h_end(&r, ok, g.timed_out ? "watchdog: the consumer never accounted every notify"
                                     : note);
}

/* --- mem --------------------------------------------------------------- */

#define MEM_HANDLES 100000u
#define MEM_SUBS 1000u
#define MEM_SHARED_SUBS 64u /* the default max_subscribers_per_handle */

static size_t held(nq_queue_t *q) {
    nq_stats_t st;
    nq_queue_stats(q, &st);
    return st.bytes_held;
}

/* bytes_held of an empty queue of max_handles handles. */
static size_t held_empty(uint32_t max_handles) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = max_handles;
    nq_queue_t *q;
    if (nq_queue_new(&cfg, &q) < 0)
        return 0;
    size_t b = held(q);
    nq_queue_free(q);
    return b;
}

static void on_port_sub(nq_sub_t *s, void *data) {
    (void)s;
    (void)data;
}

static int run_mem_nq(h_result_t *r) {
    /* The index's share: charged up front, it grows with max_handles. */
    size_t e1 = held_empty(MEM_HANDLES), e2 = held_empty(2 * MEM_HANDLES);
    if (e1 == 0 || e2 < e1)
        return -1;
    double index_per_handle = (double)(e2 - e1) / MEM_HANDLES;
    /* Handles. */
    long rss0 = h_rss_kb();
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_handles = MEM_HANDLES;
    nq_queue_t *q;
    if (nq_queue_new(&cfg, &q) < 0)
        return -1;
    size_t h0 = held(q); /* the queue and its index */
    for (uint32_t i = 0; i < MEM_HANDLES; i++) {
        nq_handle_t h;
        if (nq_register(q, NULL, &h) < 0)
            return -1;
    }
    size_t h1 = held(q);
    long rss1 = h_rss_kb();
    double slot_per_handle = (double)(h1 - h0) / MEM_HANDLES;
    h_num(r, "bytes_per_handle", slot_per_handle + index_per_handle);
    h_num(r, "slot_bytes_per_handle", slot_per_handle);
    h_num(r, "index_bytes_per_handle", index_per_handle);
    h_num(r, "rss_bytes_per_handle", (double)(rss1 - rss0) * 1024.0 / MEM_HANDLES);
    nq_queue_t *q_handles = q; /* freed at the end: its memory, freed now, would
                                  be reused below and hide the subs' RSS */

    /* Subscriptions of capacity 1024: one on each of MEM_SUBS fresh handles. */
    nq_config_init(&cfg);
    cfg.max_handles = MEM_SUBS + 1;
    if (nq_queue_new(&cfg, &q) < 0)
        return -1;
    nq_handle_t hs[MEM_SUBS + 1];
    for (uint32_t i = 0; i <= MEM_SUBS; i++)
        if (nq_register(q, NULL, &hs[i]) < 0)
            return -1;
    static nq_sub_t *subs[MEM_SUBS + MEM_SHARED_SUBS];
    nq_sub_opts_t so;
    memset(&so, 0, sizeof(so));
    so.capacity = 1024;
    long rss2 = h_rss_kb();
    size_t s0 = held(q);
    for (uint32_t i = 0; i < MEM_SUBS; i++)
        if (nq_subscribe(q, hs[i], &so, &subs[i]) < 0)
            return -1;
    size_t s1 = held(q);
    long rss3 = h_rss_kb();
    /* Then MEM_SHARED_SUBS on one more handle: the first allocates the
     * handle's subscriber array, the rest are marginal. */
    if (nq_subscribe(q, hs[MEM_SUBS], &so, &subs[MEM_SUBS]) < 0)
        return -1;
    size_t s2 = held(q);
    for (uint32_t i = 1; i < MEM_SHARED_SUBS; i++)
        if (nq_subscribe(q, hs[MEM_SUBS], &so, &subs[MEM_SUBS + i]) < 0)
            return -1;
    size_t s3 = held(q);
    h_num(r, "bytes_per_sub", (double)(s1 - s0) / MEM_SUBS);
    h_num(r, "bytes_per_sub_marginal", (double)(s3 - s2) / (MEM_SHARED_SUBS - 1));
    h_num(r, "rss_bytes_per_sub", (double)(rss3 - rss2) * 1024.0 / MEM_SUBS);
    h_num(r, "sub_target_bytes", 1024 * 16 + 128);
    for (uint32_t i = 0; i < MEM_SUBS + MEM_SHARED_SUBS; i++)
        nq_sub_close(subs[i]);
    nq_queue_free(q);

    /* Port subscriptions of capacity 1024, likewise on fresh handles (the
     * port keeps them: nq_port_free closes them). */
    nq_config_init(&cfg);
    cfg.max_handles = MEM_SUBS;
    nq_port_t *port;
    if (nq_queue_new(&cfg, &q) < 0 || nq_port_new_sized(MEM_SUBS, &port) < 0)
        return -1;
    for (uint32_t i = 0; i < MEM_SUBS; i++)
        if (nq_register(q, NULL, &hs[i]) < 0)
            return -1;
    s0 = held(q);
    for (uint32_t i = 0; i < MEM_SUBS; i++)
        if (nq_port_subscribe(port, q, hs[i], &so, on_port_sub, NULL, NULL) < 0)
            return -1;
    s1 = held(q);
    h_num(r, "bytes_per_port_sub", (double)(s1 - s0) / MEM_SUBS);
    nq_port_free(port);
    nq_queue_free(q);
    nq_queue_free(q_handles);
    return 0;
}

/* What a user adds per handle to pass data through an async handle. */
typedef struct user_queue {
    pthread_mutex_t mu;
    void *head, *tail;
} user_queue_t;

typedef struct ua_user {
    uv_async_t a;
    user_queue_t uq;
} ua_user_t;

typedef struct ev_user {
    ev_async a;
    user_queue_t uq;
} ev_user_t;

static void ua_noop(uv_async_t *a) {
    (void)a;
}

static void ev_noop(struct ev_loop *loop, ev_async *w, int revents) {
    (void)loop;
    (void)w;
    (void)revents;
}

static int run_mem_uv(h_result_t *r) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    long rss0 = h_rss_kb();
    ua_user_t *v = calloc(MEM_HANDLES, sizeof(*v));
    if (v == NULL)
        return -1;
    for (uint32_t i = 0; i < MEM_HANDLES; i++) {
        uv_async_init(&loop, &v[i].a, ua_noop);
        pthread_mutex_init(&v[i].uq.mu, NULL);
    }
    long rss1 = h_rss_kb();
    h_num(r, "bytes_per_handle", (double)(sizeof(uv_async_t) + sizeof(user_queue_t)));
    h_int(r, "sizeof_handle", (int64_t)sizeof(uv_async_t));
    h_num(r, "rss_bytes_per_handle", (double)(rss1 - rss0) * 1024.0 / MEM_HANDLES);
    for (uint32_t i = 0; i < MEM_HANDLES; i++) {
        pthread_mutex_destroy(&v[i].uq.mu);
        uv_close((uv_handle_t *)&v[i].a, NULL);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    free(v);
    return 0;
}

static int run_mem_ev(h_result_t *r) {
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    if (loop == NULL)
        return -1;
    long rss0 = h_rss_kb();
    ev_user_t *v = calloc(MEM_HANDLES, sizeof(*v));
    if (v == NULL)
        return -1;
    for (uint32_t i = 0; i < MEM_HANDLES; i++) {
        ev_async_init(&v[i].a, ev_noop);
        ev_async_start(loop, &v[i].a);
        pthread_mutex_init(&v[i].uq.mu, NULL);
    }
    long rss1 = h_rss_kb();
    /* libev keeps a pointer per started async in its asyncs[] array. */
    h_num(r, "bytes_per_handle",
          (double)(sizeof(ev_async) + sizeof(void *) + sizeof(user_queue_t)));
    h_int(r, "sizeof_handle", (int64_t)sizeof(ev_async));
    h_num(r, "rss_bytes_per_handle", (double)(rss1 - rss0) * 1024.0 / MEM_HANDLES);
    for (uint32_t i = 0; i < MEM_HANDLES; i++) {
        ev_async_stop(loop, &v[i].a);
        pthread_mutex_destroy(&v[i].uq.mu);
    }
    ev_loop_destroy(loop);
    free(v);
    return 0;
}

static int run_mem(const h_opts_t *o) {
    h_result_t r;
    h_begin(&r, PROGRAM, o);
    int rc;
    const char *note;
    if (strcmp(o->contender, "nq") == 0) {
        rc = run_mem_nq(&r);
        note = "bytes from nq_queue_stats bytes_held: handle = slot (chunk growth / 100k) "
               "+ index (empty-queue growth per max_handle); "
               "bytes_per_sub = one cap-1024 sub on each of 1000 fresh handles (incl. "
               "the handle's subscriber array), marginal = 63 more on one handle";
    } else if (strcmp(o->contender, "uv_async") == 0) {
        rc = run_mem_uv(&r);
        note = "sizeof(uv_async_t) + pthread_mutex_t + queue head; rss over 100k";
    } else {
        rc = run_mem_ev(&r);
        note = "sizeof(ev_async) + asyncs[] pointer + pthread_mutex_t + queue head; "
               "rss over 100k";
    }
    if (rc < 0) {
        fprintf(stderr, "mem %s: setup failed\n", o->contender);
        return 1;
    }
    h_int(&r, "handles", MEM_HANDLES);
    return h_end(&r, 1, note);
}

/* --- main -------------------------------------------------------------- */

static int pair_listed(const char *w, const char *c) {
    char line[128];
    snprintf(line, sizeof(line), "%s %s\n", w, c);
    for (const char *p = PAIRS; (p = strstr(p, line)) != NULL; p++)
        if (p == PAIRS || p[-1] == '\n')
            return 1;
    return 0;
}

int main(int argc, char **argv) {
    h_opts_t o = h_parse(argc, argv, PAIRS);
    if (!pair_listed(o.workload, o.contender)) {
        h_usage(argv[0], PAIRS);
        return 2;
    }
    if (strcmp(o.workload, "mem") == 0)
        return run_mem(&o);
    uint32_t nh = strcmp(o.workload, "e_1k") == 0     ? 1000u
                  : strcmp(o.workload, "e_10k") == 0  ? 10000u
                  : strcmp(o.workload, "e_100k") == 0 ? 100000u
                                                       : 1000000u;
    return run_e(&o, nh);
}
