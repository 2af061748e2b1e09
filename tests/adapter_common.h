/* Helpers shared by the loop-adapter suites (test_adapter_ev.c,
 * test_adapter_epoll.c, test_adapter_uv.c). Header-only: every function is
 * static inline, so a suite that uses only some of them still builds under
 * -Werror. Include it after <criterion/criterion.h>, "nq.h" and "nqtest.h".
 *
 * A suite defines ADAPTER_HINT (the debug hint of its subscriptions) before
 * including this header. Defining ADAPTER_STRESS as well adds the stress
 * scaffolding (producer threads, the subscription and wait-chain tallies and
 * their callbacks); that suite then defines
 *     static void stress_stop_loop(void);
 * which the callbacks call, on the loop thread, once every subscription and
 * wait chain is done: it ends the loop's run (ev_break, a flag the loop
 * checks, ...).
 *
 * Defining ADAPTER_TIMEOUTS adds the port-wait timeout scaffolding (trec_t,
 * the t_* state, t_open, t_cb, t_start, t_on_time, LATE_MS and ROUNDS); that
 * suite calls t_open on the loop thread at the start of each round, attaches
 * t_port to its loop, and defines
 *     static void timeout_stop_loop(void);
 * which t_cb calls, on the loop thread, once no started wait is pending.
 */
#ifndef NQ_TESTS_ADAPTER_COMMON_H
#define NQ_TESTS_ADAPTER_COMMON_H

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#ifndef ADAPTER_HINT
#error "define ADAPTER_HINT (the suite's debug hint) before including adapter_common.h"
#endif

#define MS  (int64_t)1000000
#define SEC (int64_t)1000000000

/* --- helpers ------------------------------------------------------------ */

static inline void sleep_ns(int64_t ns) {
    struct timespec ts = {(time_t)(ns / SEC), (long)(ns % SEC)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static inline nq_queue_t *new_queue(void) {
    nq_queue_t *q = NULL;
    int rc = nq_queue_new(NULL, &q);
    cr_assert_eq(rc, 0, "nq_queue_new: %s", nq_err_name(rc));
    return q;
}

static inline nq_handle_t reg(nq_queue_t *q, const char *hint) {
    nq_handle_t h = 0;
    int rc = nq_register(q, hint, &h);
    cr_assert_eq(rc, 0, "nq_register: %s", nq_err_name(rc));
    return h;
}

/* Callbacks per nq_port_dispatch, counted from inside the callbacks: the
 * port's dispatch counter says when a new dispatch began. Returns how many
 * callbacks the current dispatch has run, this one included, or -1 if the
 * port's stats could not be read. */
typedef struct dmeter {
    uint64_t dispatch; /* the one the last callback ran in */
    unsigned in_this, max;
} dmeter_t;

static inline int dmeter_count(dmeter_t *m, nq_port_t *p) {
    nq_port_stats_t ps;
    if (nq_port_stats(p, &ps) != 0)
        return -1;
    if (ps.dispatches != m->dispatch) {
        m->dispatch = ps.dispatches;
        m->in_this = 0;
    }
    if (++m->in_this > m->max)
        m->max = m->in_this;
    return (int)m->in_this;
}

static inline nq_port_t *new_port(void) {
    nq_port_t *p = NULL;
    int rc = nq_port_new(&p);
    cr_assert_eq(rc, 0, "nq_port_new: %s", nq_err_name(rc));
    cr_assert_not_null(p);
    return p;
}

static inline nq_port_stats_t pstats(const nq_port_t *p) {
    nq_port_stats_t st;
    cr_assert_eq(nq_port_stats(p, &st), 0);
    return st;
}

static inline nq_stats_t qstats(const nq_queue_t *q) {
    nq_stats_t st;
    cr_assert_eq(nq_queue_stats(q, &st), 0);
    return st;
}

static inline nq_sub_opts_t sopts(uint32_t cap, nq_overflow_t ov) {
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = cap;
    o.overflow = ov;
    o.debug_hint = ADAPTER_HINT;
    return o;
}

#ifdef ADAPTER_STRESS

#include <pthread.h>
#include <stdatomic.h>

#define NPROD      4
#define ENC(id, i) (((int64_t)(id) << 32) | (int64_t)(i))
#define ENC_ID(a)  ((int)((a) >> 32))
#define ENC_SEQ(a) ((int64_t)((a)&0xffffffff))

/* Defined by the including suite: ends the loop's run (see the top). */
static void stress_stop_loop(void);

/* --- producers: NPROD threads notifying one handle ----------------------- */

typedef struct prod prod_t;
typedef struct prod_arg {
    prod_t *pr;
    int id;
} prod_arg_t;

struct prod {
    nq_queue_t *q;
    nq_handle_t h;
    int64_t count;   /* notifies per thread; 0: until stop */
    int64_t give_up; /* now_ns() past which a flood stops by itself */
    atomic_int stop;
    atomic_int errors; /* nq_notify failed */
    atomic_int running;
    _Atomic int64_t sent[NPROD];
    prod_arg_t arg[NPROD];
    pthread_t t[NPROD];
    int n;
};

static inline void *prod_main(void *a) {
    prod_arg_t *pa = a;
    prod_t *pr = pa->pr;
    int64_t i = 0;
    while (pr->count == 0 || i < pr->count) {
        if (atomic_load_explicit(&pr->stop, memory_order_relaxed))
            break;
        if ((i & 255) == 0 && now_ns() > pr->give_up)
            break;
        if (nq_notify(pr->q, pr->h, ENC(pa->id, i)) < 0)
            atomic_fetch_add(&pr->errors, 1);
        i++;
    }
    atomic_store(&pr->sent[pa->id], i);
    atomic_fetch_sub(&pr->running, 1);
    return NULL;
}

static inline void prod_start(prod_t *pr, nq_queue_t *q, nq_handle_t h, int n, int64_t count) {
    memset(pr, 0, sizeof(*pr));
    pr->q = q;
    pr->h = h;
    pr->n = n;
    pr->count = count;
    pr->give_up = now_ns() + 20 * SEC;
    atomic_store(&pr->running, n);
    for (int k = 0; k < n; k++) {
        pr->arg[k].pr = pr;
        pr->arg[k].id = k;
        cr_assert_eq(pthread_create(&pr->t[k], NULL, prod_main, &pr->arg[k]), 0);
    }
}

static inline int64_t prod_join(prod_t *pr) {
    atomic_store(&pr->stop, 1);
    int64_t total = 0;
    for (int k = 0; k < pr->n; k++) {
        cr_assert_eq(pthread_join(pr->t[k], NULL), 0);
        total += atomic_load(&pr->sent[k]);
    }
    cr_assert_eq(atomic_load(&pr->errors), 0, "nq_notify failed in a producer");
    return total;
}

/* --- stress: two subscriptions and two wait chains on one handle ---------- */

typedef struct ssub { /* one port subscription's tally */
    int per_call;     /* args taken per callback (0: all it holds) */
    int64_t total;    /* notifies the handle will get */
    int64_t got;
    int64_t dropped; /* nq_sub_dropped once done (final: all was sent) */
    int64_t last[NPROD];
    long calls, wrong_thread, bad, out_of_order;
    int done;
} ssub_t;

typedef struct schain { /* a port wait re-armed in its callback */
    nq_port_t *p;
    nq_queue_t *q;
    nq_handle_t h;
    int64_t timeout_ms;
    int64_t total;
    int64_t last[NPROD];
    long calls, completed, timeouts, wrong_thread, bad, out_of_order;
    int done;
} schain_t;

static int s_loop_tid;
static ssub_t s_subs[2];
static schain_t s_chains[2];

static inline void stress_maybe_stop(void) {
    for (int i = 0; i < 2; i++)
        if (!s_subs[i].done || !s_chains[i].done)
            return;
    stress_stop_loop();
}

static inline int check_order(int64_t *last, int64_t arg) {
    int id = ENC_ID(arg);
    if (id < 0 || id >= NPROD)
        return -1;
    int64_t i = ENC_SEQ(arg);
    if (i <= last[id])
        return 1;
    last[id] = i;
    return 0;
}

static inline void stress_sub_cb(nq_sub_t *s, void *data) {
    ssub_t *r = data;
    r->calls++;
    if (cur_tid() != s_loop_tid)
        r->wrong_thread++;
    int took = 0;
    for (;;) {
        int64_t buf[64];
        size_t want = 64;
        if (r->per_call > 0) {
            if (took >= r->per_call)
                break;
            if ((size_t)(r->per_call - took) < want)
                want = (size_t)(r->per_call - took);
        }
        int n = nq_sub_recv_batch(s, buf, want);
        if (n < 0)
            r->bad++;
        if (n <= 0)
            break;
        for (int k = 0; k < n; k++) {
            int o = check_order(r->last, buf[k]);
            r->bad += o < 0;
            r->out_of_order += o > 0;
        }
        r->got += n;
        took += n;
    }
    if (!r->done && r->got + (int64_t)nq_sub_dropped(s) >= r->total) {
        r->done = 1;
        r->dropped = (int64_t)nq_sub_dropped(s);
        stress_maybe_stop();
    }
}

static inline void stress_wait_cb(void *data, int status, int64_t arg) {
    schain_t *r = data;
    r->calls++;
    if (cur_tid() != s_loop_tid)
        r->wrong_thread++;
    if (status == 0) {
        r->completed++;
        int o = check_order(r->last, arg);
        r->bad += o < 0;
        r->out_of_order += o > 0;
    } else if (status == NQ_ETIMEDOUT) {
        r->timeouts++; /* a stalled machine; the chain goes on */
    } else {
        r->bad++;
        r->done = 1;
        stress_maybe_stop();
        return;
    }
    uint64_t seq = 0;
    if (nq_seq(r->q, r->h, &seq) < 0)
        r->bad++;
    if ((int64_t)seq >= r->total) {
        r->done = 1; /* every notification is in: the chain ends */
        stress_maybe_stop();
        return;
    }
    if (nq_port_wait(r->p, r->q, r->h, seq, r->timeout_ms, stress_wait_cb, r, NULL) < 0) {
        r->bad++;
        r->done = 1;
        stress_maybe_stop();
    }
}

/* Sets up, from the loop thread, what the loop will serve: two subscriptions
 * on (q, h) through p, one that drains all it holds and has room for every
 * notify (so it must receive each exactly once), one that takes 16 a call
 * (256 args, drop oldest; called again while it holds more); and two wait
 * chains, one without a timeout, one with a 5 s timeout that keeps a deadline
 * armed. Returns the first subscription's handle (the test closes it). */
static inline nq_sub_t *stress_arm(nq_port_t *p, nq_queue_t *q, nq_handle_t h, int64_t total) {
    s_loop_tid = cur_tid();
    memset(s_subs, 0, sizeof(s_subs));
    memset(s_chains, 0, sizeof(s_chains));
    nq_sub_t *held = NULL;
    for (int i = 0; i < 2; i++) {
        s_subs[i].total = total;
        s_subs[i].per_call = i == 0 ? 0 : 16;
        for (int k = 0; k < NPROD; k++)
            s_subs[i].last[k] = -1;
        nq_sub_opts_t o = i == 0 ? sopts(1u << 17, NQ_DROP_NEWEST) : sopts(256, NQ_DROP_OLDEST);
        cr_assert_eq(
            nq_port_subscribe(p, q, h, &o, stress_sub_cb, &s_subs[i], i == 0 ? &held : NULL), 0);
        s_chains[i] = (schain_t){.p = p,
                                 .q = q,
                                 .h = h,
                                 .timeout_ms = i == 0 ? -1 : 5000,
                                 .total = total,
                                 .last = {-1, -1, -1, -1}};
        cr_assert_eq(
            nq_port_wait(p, q, h, 0, s_chains[i].timeout_ms, stress_wait_cb, &s_chains[i], NULL),
            0);
    }
    return held;
}

/* After the loop and the producers are done: every callback on the loop
 * thread, in each producer's order, and each subscription received plus
 * dropped exactly what was sent (a duplicate would be out of order, a loss a
 * shortfall); the first, with room for all, dropped nothing. Then p's stats:
 * the callbacks counted here, at most one eventfd write per dispatch, no
 * item left but the two subscriptions. Returns p's stats. */
static inline nq_port_stats_t stress_check(const nq_port_t *p, nq_sub_t *held, int64_t total) {
    long callbacks = 0;
    for (int i = 0; i < 2; i++) {
        ssub_t *r = &s_subs[i];
        cr_assert_eq(r->wrong_thread, 0, "sub %d: callback off the loop thread", i);
        cr_assert_eq(r->bad, 0, "sub %d: bad arg or receive error", i);
        cr_assert_eq(r->out_of_order, 0, "sub %d: %ld args out of order or twice", i,
                     r->out_of_order);
        cr_assert(r->done);
        cr_assert_eq(r->got + r->dropped, total, "sub %d: %lld + %lld dropped", i,
                     (long long)r->got, (long long)r->dropped);
        cr_assert_gt(r->got, 0);
        schain_t *c = &s_chains[i];
        cr_assert_eq(c->wrong_thread, 0, "wait chain %d: callback off the loop thread", i);
        cr_assert_eq(c->bad, 0, "wait chain %d: bad status, arg or re-arm", i);
        cr_assert_eq(c->out_of_order, 0, "wait chain %d: arg out of order", i);
        cr_assert_gt(c->completed, 0);
        callbacks += r->calls + c->calls;
    }
    cr_assert_eq(s_subs[0].dropped, 0, "room for all: nothing dropped");
    cr_assert_eq(nq_sub_dropped(held), 0);

    nq_port_stats_t st = pstats(p);
    cr_assert_eq(st.callbacks, (uint64_t)callbacks);
    cr_assert_leq(st.efd_writes, st.dispatches + 1, "efd_writes %llu, dispatches %llu",
                  (unsigned long long)st.efd_writes, (unsigned long long)st.dispatches);
    cr_log_info("stress: subs got %lld+%lld dropped, %lld+%lld dropped; waits %ld, %ld (%ld "
                "timed out); %llu dispatches, %llu efd writes",
                (long long)s_subs[0].got, (long long)s_subs[0].dropped, (long long)s_subs[1].got,
                (long long)s_subs[1].dropped, s_chains[0].completed, s_chains[1].completed,
                s_chains[1].timeouts, (unsigned long long)st.dispatches,
                (unsigned long long)st.efd_writes);
    cr_assert_eq(st.live_items, 2, "the two subscriptions; every wait was released");
    return st;
}

#endif /* ADAPTER_STRESS */

#ifdef ADAPTER_TIMEOUTS

#define LATE_MS 20 /* a timeout may fire up to this much after its deadline */
#define ROUNDS  5  /* rounds in which each timeout must once be on time */

/* Defined by the including suite: ends the loop's run (see the top). */
static void timeout_stop_loop(void);

typedef struct trec {
    int64_t timeout_ms;
    int64_t started, fired;
    int calls, status, wrong_thread;
} trec_t;

static nq_port_t *t_port;
static nq_queue_t *t_q;
static nq_handle_t t_quiet; /* never notified */
static int t_pending, t_tid, t_errors;

/* A fresh round on the calling (loop) thread: counters reset, a new queue
 * with one handle that is never notified, and a new port, not yet attached. */
static inline void t_open(void) {
    t_tid = cur_tid();
    t_pending = t_errors = 0;
    t_q = new_queue();
    t_quiet = reg(t_q, "quiet");
    t_port = new_port();
}

static inline void t_cb(void *data, int status, int64_t arg) {
    trec_t *r = data;
    (void)arg;
    r->fired = now_ns();
    r->calls++;
    r->status = status;
    r->wrong_thread += cur_tid() != t_tid;
    if (--t_pending == 0)
        timeout_stop_loop();
}

/* Starts r's wait now (from the test or from inside a callback). */
static inline void t_start(trec_t *r) {
    r->started = now_ns();
    r->calls = 0;
    if (nq_port_wait(t_port, t_q, t_quiet, NQ_SEQ_NEXT, r->timeout_ms, t_cb, r, NULL) < 0)
        t_errors++;
    else
        t_pending++;
}

/* Asserts that r timed out once, never early; 1 if it also fired within
 * LATE_MS of its deadline, 0 (logged) if later. */
static inline int t_on_time(const trec_t *r, const char *what) {
    cr_assert_eq(r->calls, 1, "%s: %d callbacks", what, r->calls);
    cr_assert_eq(r->status, NQ_ETIMEDOUT, "%s: %s", what, nq_err_name(r->status));
    cr_assert_eq(r->wrong_thread, 0);
    int64_t took = r->fired - r->started;
    cr_assert_geq(took, r->timeout_ms * MS, "%s: fired %.3f ms after a %lld ms wait began", what,
                  (double)took / MS, (long long)r->timeout_ms);
    if (took <= (r->timeout_ms + LATE_MS) * MS)
        return 1;
    cr_log_info("%s: fired %.3f ms after a %lld ms wait began", what, (double)took / MS,
                (long long)r->timeout_ms);
    return 0;
}

#endif /* ADAPTER_TIMEOUTS */

#endif
