/* cmp_flow: notifications flowing from producer threads to consumers, libnq
 * against what programs use for this today.
 *
 * WHAT IS MEASURED. Producer threads send N notifications, each an int64 arg
 * that carries (producer id, sequence number), to handles; consumers receive
 * them and check every one: per (producer, handle) the sequence only rises
 * (no reordering, no duplicate, no arg sent to another handle), and at the
 * end, per handle, sent == delivered + dropped. Only libnq's bounded
 * subscriptions may drop, and they count it (nq_sub_dropped); every other
 * contender must deliver everything. A run whose accounting fails reports
 * ok=false. Figures (harness.h names):
 *   notifies_per_s  delivered / (first notify .. end of the last drain)
 *   producer_ns     the producers' summed time in their notify loops / calls
 *   lat_p50/p99/p999_ns  one notify call, timed (h_now_ns) every 64th call
 *   syscalls_per_1M libnq ports only: (eventfd reads + writes) * 1e6 / sent,
 *                   from nq_port_stats (the peers' syscalls: strace pass)
 *   sent, delivered, dropped (healthy handles), peak_rss_kb, cpus
 *
 * WORKLOADS (N: total notifications; --n overrides, --quick is small).
 *   a   1 producer -> 1 handle -> 1 subscriber. N = 2,000,000 (50,000).
 *       libnq's subscription holds 2^20 args (8 MB, NQ_DROP_OLDEST; the
 *       queue's largest default capacity): the producer outruns a consumer
 *       that is descheduled for a few ms, and with 65536 args (1.6 ms of a
 *       free-running producer) such a consumer dropped 40-70% on a busy
 *       2-vCPU box. The peers buffer the same backlog unbounded (RSS up to
 *       ~35 MB).
 *   b   4 producers -> 1024 handles -> 64 subscribers; subscriber i takes
 *       handles 16i..16i+15. Producer p starts at handle 256p and goes round
 *       robin. N = 4,000,000 (100,000). libnq: a subscription per handle
 *       (1024, capacity 1024, drop oldest), grouped 16 to a subscriber; the
 *       peers: a queue per subscriber (64), each item carrying its handle.
 *       Four free-running producers outrun one loop thread on 2 vCPUs: the
 *       peers' queues grow (RSS 15-30 MB), libnq's drop once a handle is
 *       1024 behind (seen in some runs; counted, and the run stays ok).
 *       Loop contenders serve everything on one loop thread; nq_sub and
 *       condvar use 2 consumer threads, each owning half the handles.
 *   c   b plus one stalled subscriber that is never drained: after every
 *       healthy notify a producer also notifies the stalled handle (so it
 *       gets N more). libnq's stalled subscription holds 1024 args (drop
 *       oldest) and drops the rest; the peers' stalled queue is unbounded,
 *       as their users write it, and just grows (N items: 64 MB at the
 *       default N; --n is capped so it stays far below 2 GB). Its consumer
 *       is a stuck thread or a loop that never runs. The figures are the
 *       healthy subscribers' (stalled_* report the stalled one, checked too);
 *       producer_ns and latencies cover both kinds of call.
 *   c0  c without the stalled subscriber: the producers make the same calls,
 *       the extra one to a handle nobody subscribes to (libnq: a registered
 *       handle with no receiver; the peers: nothing to queue), so c / c0 is
 *       what a stalled subscriber costs the healthy ones.
 *
 * CONTENDERS, each written the way its users write it:
 *   nq_uv     libnq port + nq_uv_t on a libuv loop; port subscriptions
 *             (nq_port_subscribe) drained with nq_sub_recv_batch in their
 *             callback (at most a capacity's worth per call).
 *   nq_epoll  the same port on a raw epoll loop (nq_epoll_add,
 *             nq_epoll_timeout, nq_port_dispatch with a budget of 1024).
 *   nq_sub    blocking subscriptions on worker threads, no loop. a: the
 *             worker drains with nq_sub_recv_batch and blocks in nq_sub_recv
 *             (5 ms timeout). b, c: a worker owns 512 subscriptions; each
 *             one's waker queues its index on the worker's nq_evq, and the
 *             worker blocks in nq_evq_wait and drains the ones it is given.
 *   uv_async  libuv today: a mutex-protected growable array per subscriber +
 *             uv_async_send after every push; the async callback swaps the
 *             array out under the lock and processes it.
 *   ev_async  libev today: the same with ev_async_send.
 *   eventfd   the mio::Waker way: the same queue, and one eventfd write per
 *             notification; the epoll loop reads the eventfd, then drains.
 *   condvar   a pthread mutex + condition variable queue, as in the original
 *             Python queue.Queue: put appends and signals under the lock, get
 *             takes one item per lock (waiting while empty). One inbox per
 *             consumer thread; an item carries its handle.
 * Producers of every contender run the same loop (run_producer, always
 * inlined); only the put function differs, called directly.
 *
 * MACHINE. The target has 2 vCPUs and nothing is pinned: in a, producer and
 * consumer can have a CPU each; in b and c, four producers and the consumer
 * thread(s) share two CPUs, so the scheduler is part of every figure (the
 * same scheduler for every contender). Take medians of several runs.
 *
 * ENDING. Producers are joined, then a done flag is set and each consumer is
 * woken (an async / eventfd / condvar broadcast / evq token: the loop's usual
 * cross-thread wake, outside the measured path). A consumer ends once it has
 * delivered everything sent to its handles, less what its subscriptions
 * dropped (final once the producers are joined). Watchdog: a consumer not
 * finished 30 s after the producers fails the run (ok=false, a note).
 *
 * Usage: cmp_flow --workload W --contender C [--quick] [--n N] | --list
 */
#include "harness.h"

#include <pthread.h>
#include <stdatomic.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

#include <ev.h>
#include <nq/epoll.h>
#include <nq/uv.h> /* <nq.h> and <uv.h> */

#define PROGRAM       "cmp_flow"
#define SEQ_BITS      40 /* arg = producer << 40 | sequence */
#define SEQ_MASK      ((INT64_C(1) << SEQ_BITS) - 1)
#define MAX_PROD      4
#define MAX_CONS      2
#define BATCH         256        /* args per nq_sub_recv_batch */
#define NQ_BUDGET     1024u      /* callbacks per nq_port_dispatch (= NQ_UV_DEFAULT_BUDGET) */
#define CAP_A         (1u << 20) /* libnq subscription capacity in workload a (the default max) */
#define CAP_B         1024u      /* ... in b, c, c0 (the queue's default) */
#define STALL_CAP     1024u      /* the stalled subscription's (workload c) */
#define WATCHDOG_S    30
#define MAX_N_STALLED 40000000L /* c: the peers' stalled queue holds N 16-byte items */
#define TAG_CTL       UINT64_MAX

#define PAIRS_OF(w)                                                                                \
    w " nq_uv\n" w " nq_epoll\n" w " nq_sub\n" w " uv_async\n" w " ev_async\n" w " eventfd\n" w    \
      " condvar\n"
static const char PAIRS[] = PAIRS_OF("a") PAIRS_OF("b") PAIRS_OF("c") PAIRS_OF("c0");

/* ===== The run's shape, and what every contender shares ================== */

static struct shape {
    uint32_t nprod, nh, hmask; /* producers; healthy handles (a power of 2) */
    uint32_t off;              /* producer p starts at handle p * off */
    uint32_t group_shift;      /* subscriber of handle h: h >> group_shift */
    uint32_t ngroups;          /* subscribers */
    int stalled;               /* workload c */
    int extra;                 /* c and c0: a second call per notify, to the extra handle */
    long n;                    /* healthy notifications, all producers */
} g;

typedef struct producer {
    pthread_t thread;
    uint32_t id;
    long n;         /* healthy notifications it sends */
    int64_t t0, t1; /* its notify loop */
    int64_t *lat;   /* sampled notify calls, ns */
    size_t nlat;
    int failed;
} producer_t;

typedef struct consumer {
    pthread_t thread;
    uint32_t h_lo, h_hi; /* it serves handles [h_lo, h_hi) */
    int64_t *last;       /* [nprod * nh]: the last sequence seen per (producer, handle) */
    uint64_t *got;       /* [nh]: args delivered per handle */
    uint64_t delivered, bad, expected;
    int expect_known, finished;
    int64_t t_last; /* end of the last drain that delivered something */
    void (*stop)(struct consumer *c);
    void *loop;
} consumer_t;

typedef struct item {
    uint32_t h; /* the handle; g.nh for the stalled one */
    int64_t arg;
} item_t;

static producer_t g_prod[MAX_PROD];
static consumer_t g_cons[MAX_CONS];
static uint32_t g_ncons;
static uint64_t *g_sent_h; /* [nh]: fixed by the round robin */
static uint64_t *g_drop_h; /* [nh]: libnq drops, recorded before its subscriptions close */
static uint64_t g_stall_sent, g_stall_held, g_stall_dropped;
static pthread_barrier_t g_start;
static atomic_int g_done;     /* producers joined: drops are final */
static atomic_int g_woken;    /* main has sent its wake: consumers may tear down */
static atomic_int g_ready;    /* consumers set up */
static atomic_int g_finished; /* consumers done */
static atomic_int g_setup_failed;
static nq_sub_t **g_nqsub; /* [nh]: libnq contenders' subscriptions, else NULL */
static nq_port_stats_t g_pstats;
static int g_have_pstats;

static pthread_mutex_t g_note_mu = PTHREAD_MUTEX_INITIALIZER;
static char g_note[256];
static int g_ok = 1;

/* Records a failure; the first note is kept. Any thread. */
__attribute__((format(printf, 1, 2))) static void fail(const char *fmt, ...) {
    pthread_mutex_lock(&g_note_mu);
    if (g_ok) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(g_note, sizeof(g_note), fmt, ap);
        va_end(ap);
        for (char *s = g_note; *s; s++) /* notes go into JSON unescaped */
            if (*s == '"' || *s == '\\' || (unsigned char)*s < 0x20)
                *s = '\'';
    }
    g_ok = 0;
    pthread_mutex_unlock(&g_note_mu);
}

/* Zeroed memory for n objects of an over-aligned type (a lock per line). */
static void *calloc_lines(size_t n, size_t size) {
    void *p = aligned_alloc(64, n * size); /* size is a multiple of 64 */
    if (p != NULL)
        memset(p, 0, n * size);
    return p;
}

static void sleep_ns(long ns) {
    struct timespec ts = {ns / 1000000000, ns % 1000000000};
    nanosleep(&ts, NULL);
}

/* One delivered arg: the exact-delivery check. */
static inline void take(consumer_t *c, uint32_t h, int64_t arg) {
    uint64_t p = (uint64_t)arg >> SEQ_BITS;
    int64_t k = arg & SEQ_MASK;
    if (h < g.nh && p < g.nprod && (((uint64_t)k + p * g.off) & g.hmask) == h) {
        int64_t *last = &c->last[p * g.nh + h];
        if (k > *last)
            *last = k;
        else
            c->bad++; /* a duplicate or a reordering */
        c->got[h]++;
    } else
        c->bad++; /* not an arg sent to this handle */
    c->delivered++;
}

/* After a drain: is this consumer done? Only once the producers are. */
static void consumer_check(consumer_t *c) {
    if (c->finished || !atomic_load_explicit(&g_done, memory_order_acquire))
        return;
    if (!c->expect_known) {
        uint64_t e = 0;
        for (uint32_t h = c->h_lo; h < c->h_hi; h++)
            e += g_sent_h[h] - (g_nqsub != NULL ? nq_sub_dropped(g_nqsub[h]) : 0);
        c->expected = e;
        c->expect_known = 1;
    }
    if (c->delivered >= c->expected) {
        c->finished = 1;
        atomic_fetch_add(&g_finished, 1);
        if (c->stop != NULL)
            c->stop(c);
    }
}

static void consumer_ready(void) {
    atomic_fetch_add(&g_ready, 1);
}

static void consumer_setup_failed(void) {
    atomic_store(&g_setup_failed, 1);
}

/* Before a consumer frees what main's wake touches. */
static void consumer_quiesce(void) {
    while (!atomic_load(&g_woken))
        sleep_ns(100000);
}

typedef int (*put_fn)(uint32_t h, int64_t arg);
typedef int (*put_stall_fn)(int64_t arg);

/* Every contender's producer: n notifies round robin over the handles, and
 * in workload c one more to the stalled handle after each. Every 64th call
 * of each kind is timed. A put returns < 0 on failure. */
static inline __attribute__((always_inline)) void run_producer(producer_t *pr, put_fn put,
                                                               put_stall_fn put_stall) {
    const uint32_t mask = g.hmask;
    const int extra = g.extra;
    const int64_t base = (int64_t)pr->id << SEQ_BITS;
    const long n = pr->n;
    uint32_t h = (pr->id * g.off) & mask;
    int64_t *lat = pr->lat;
    size_t nlat = 0;
    pthread_barrier_wait(&g_start);
    int64_t t0 = h_now_ns();
    for (long k = 0; k < n; k++) {
        int rc;
        if ((k & 63) == 0) {
            int64_t s = h_now_ns();
            rc = put(h, base | k);
            lat[nlat++] = h_now_ns() - s;
        } else
            rc = put(h, base | k);
        if (rc < 0)
            goto failed;
        if (extra) {
            if ((k & 63) == 32) {
                int64_t s = h_now_ns();
                rc = put_stall(base | k);
                lat[nlat++] = h_now_ns() - s;
            } else
                rc = put_stall(base | k);
            if (rc < 0)
                goto failed;
        }
        h = (h + 1) & mask;
    }
    pr->t1 = h_now_ns();
    pr->t0 = t0;
    pr->nlat = nlat;
    return;
failed:
    pr->failed = 1;
    pr->t1 = h_now_ns();
    pr->t0 = t0;
    pr->nlat = nlat;
}

/* The stalled queue's check: per producer, sequences only rise. */
static int stall_arg_ok(int64_t *last, int64_t arg) {
    uint64_t p = (uint64_t)arg >> SEQ_BITS;
    int64_t k = arg & SEQ_MASK;
    if (p >= g.nprod || k >= g_prod[p].n || k <= last[p])
        return 0;
    last[p] = k;
    return 1;
}

/* ===== The peers' queue: a mutex-protected growable array ================= */

typedef struct vec {
    item_t *v;
    size_t len, cap;
} vec_t;

static int vec_push(vec_t *q, uint32_t h, int64_t arg) {
    if (q->len == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 256;
        item_t *v = realloc(q->v, cap * sizeof(*v));
        if (v == NULL)
            return -1;
        q->v = v, q->cap = cap;
    }
    q->v[q->len].h = h;
    q->v[q->len].arg = arg;
    q->len++;
    return 0;
}

/* Producers append under the lock; the consumer swaps the array for its
 * empty spare under the lock and processes it outside. */
typedef struct mq {
    _Alignas(64) pthread_mutex_t mu;
    vec_t in;    /* under mu */
    vec_t spare; /* the consumer's */
} mq_t;

static mq_t *g_mq; /* [ngroups + 1]: a queue per subscriber; the last is the stalled one */

static int mq_put(mq_t *m, uint32_t h, int64_t arg) {
    pthread_mutex_lock(&m->mu);
    int rc = vec_push(&m->in, h, arg);
    pthread_mutex_unlock(&m->mu);
    return rc;
}

static void mq_drain(mq_t *m, consumer_t *c) {
    pthread_mutex_lock(&m->mu);
    vec_t full = m->in;
    m->in = m->spare;
    pthread_mutex_unlock(&m->mu);
    for (size_t i = 0; i < full.len; i++)
        take(c, full.v[i].h, full.v[i].arg);
    if (full.len > 0)
        c->t_last = h_now_ns();
    full.len = 0;
    m->spare = full;
}

static int mq_setup(void) {
    g_mq = calloc_lines(g.ngroups + 1, sizeof(*g_mq));
    if (g_mq == NULL)
        return -1;
    for (uint32_t i = 0; i <= g.ngroups; i++)
        pthread_mutex_init(&g_mq[i].mu, NULL);
    return 0;
}

/* The stalled queue is never drained: count and check what it holds. */
static void mq_finish(void) {
    int64_t last[MAX_PROD];
    for (int p = 0; p < MAX_PROD; p++)
        last[p] = -1;
    if (g.stalled) {
        mq_t *m = &g_mq[g.ngroups];
        for (size_t i = 0; i < m->in.len; i++)
            if (m->in.v[i].h != g.nh || !stall_arg_ok(last, m->in.v[i].arg)) {
                fail("stalled queue: item %zu out of order", i);
                break;
            }
        g_stall_held = m->in.len;
    }
    for (uint32_t i = 0; i <= g.ngroups; i++) {
        free(g_mq[i].in.v);
        free(g_mq[i].spare.v);
        pthread_mutex_destroy(&g_mq[i].mu);
    }
    free(g_mq);
}

/* ===== libnq: what nq_uv, nq_epoll and nq_sub share ======================= */

static nq_queue_t *lnq_q;
static nq_handle_t *lnq_h; /* [nh] */
static nq_handle_t lnq_stall_h;
static nq_sub_t *lnq_stall_sub;
static uint32_t lnq_cap; /* healthy subscriptions' capacity */

typedef struct lnq_cbctx {
    consumer_t *c;
    uint32_t h;
} lnq_cbctx_t;
static lnq_cbctx_t *lnq_cbctx; /* [nh]: a port subscription's callback data */

static int lnq_put(uint32_t h, int64_t arg) {
    return nq_notify(lnq_q, lnq_h[h], arg); /* receivers reached, or < 0 */
}

static int lnq_put_stall(int64_t arg) {
    return nq_notify(lnq_q, lnq_stall_h, arg);
}

static void *lnq_producer(void *arg) {
    run_producer(arg, lnq_put, lnq_put_stall);
    return NULL;
}

/* The queue and its handles; the stalled subscription belongs to nobody. */
static int lnq_setup(void) {
    lnq_cap = g.nh == 1 ? CAP_A : CAP_B;
    lnq_h = calloc(g.nh, sizeof(*lnq_h));
    g_nqsub = calloc(g.nh, sizeof(*g_nqsub));
    lnq_cbctx = calloc(g.nh, sizeof(*lnq_cbctx));
    if (lnq_h == NULL || g_nqsub == NULL || lnq_cbctx == NULL)
        return -1;
    int rc = nq_queue_new(NULL, &lnq_q);
    for (uint32_t h = 0; rc == 0 && h < g.nh; h++)
        rc = nq_register(lnq_q, NULL, &lnq_h[h]);
    if (rc == 0 && g.extra) /* c0: notified, nobody subscribed */
        rc = nq_register(lnq_q, "extra", &lnq_stall_h);
    if (rc == 0 && g.stalled) {
        nq_sub_opts_t o = {
            .capacity = STALL_CAP, .overflow = NQ_DROP_OLDEST, .debug_hint = "stalled"};
        rc = nq_subscribe(lnq_q, lnq_stall_h, &o, &lnq_stall_sub);
    }
    if (rc < 0)
        fail("libnq setup: %s", nq_strerror(rc));
    return rc;
}

static void lnq_healthy_opts(nq_sub_opts_t *o) {
    memset(o, 0, sizeof(*o));
    o->capacity = lnq_cap;
    o->overflow = NQ_DROP_OLDEST;
}

/* Receives up to limit args (more if a batch is full at the limit's edge). */
static void lnq_drain(consumer_t *c, nq_sub_t *s, uint32_t h, uint32_t limit) {
    int64_t args[BATCH];
    uint32_t got = 0;
    int n;
    do {
        n = nq_sub_recv_batch(s, args, BATCH);
        if (n < 0) {
            fail("nq_sub_recv_batch: %s", nq_strerror(n));
            break;
        }
        for (int i = 0; i < n; i++)
            take(c, h, args[i]);
        got += (uint32_t)n;
    } while (n == BATCH && got < limit);
    if (got > 0)
        c->t_last = h_now_ns();
}

/* A port subscription's callback: level-triggered, on the loop thread. */
static void lnq_on_sub(nq_sub_t *s, void *data) {
    lnq_cbctx_t *x = data;
    lnq_drain(x->c, s, x->h, lnq_cap);
    consumer_check(x->c);
}

static int lnq_port_subscribe_all(nq_port_t *port, consumer_t *c) {
    nq_sub_opts_t o;
    lnq_healthy_opts(&o);
    for (uint32_t h = c->h_lo; h < c->h_hi; h++) {
        lnq_cbctx[h].c = c;
        lnq_cbctx[h].h = h;
        int rc =
            nq_port_subscribe(port, lnq_q, lnq_h[h], &o, lnq_on_sub, &lnq_cbctx[h], &g_nqsub[h]);
        if (rc < 0) {
            fail("nq_port_subscribe: %s", nq_strerror(rc));
            return rc;
        }
    }
    return 0;
}

/* On the consumer's thread: drops are kept, then its subscriptions closed. */
static void lnq_close_subs(consumer_t *c) {
    for (uint32_t h = c->h_lo; h < c->h_hi; h++) {
        g_drop_h[h] = nq_sub_dropped(g_nqsub[h]);
        nq_sub_close(g_nqsub[h]);
    }
}

static void lnq_finish(h_result_t *r) {
    (void)r;
    if (g.stalled) {
        int64_t last[MAX_PROD], args[BATCH];
        for (int p = 0; p < MAX_PROD; p++)
            last[p] = -1;
        int n;
        while ((n = nq_sub_recv_batch(lnq_stall_sub, args, BATCH)) > 0)
            for (int i = 0; i < n; i++) {
                if (!stall_arg_ok(last, args[i]))
                    fail("stalled subscription: out of order");
                g_stall_held++;
            }
        g_stall_dropped = nq_sub_dropped(lnq_stall_sub);
        nq_sub_close(lnq_stall_sub);
    }
    /* The queue's own count must agree with ours. */
    nq_stats_t qs;
    uint64_t drops = g_stall_dropped;
    for (uint32_t h = 0; h < g.nh; h++)
        drops += g_drop_h[h];
    if (nq_queue_stats(lnq_q, &qs) == 0 && qs.drops != drops)
        fail("nq_queue_stats: %" PRIu64 " drops, the subscriptions say %" PRIu64, qs.drops, drops);
    nq_queue_free(lnq_q);
    free(lnq_h);
    free(g_nqsub);
    g_nqsub = NULL;
    free(lnq_cbctx);
}

/* ===== Contender nq_uv: a port on a libuv loop ============================ */

static uv_async_t nquv_ctl; /* main's wake at the end */

static void stop_uv(consumer_t *c) {
    uv_stop(c->loop);
}

static void nquv_on_ctl(uv_async_t *a) {
    consumer_check(a->data);
}

static void *nquv_consumer(void *arg) {
    consumer_t *c = arg;
    uv_loop_t loop;
    nq_port_t *port = NULL;
    nq_uv_t nquv;
    int rc = uv_loop_init(&loop);
    if (rc == 0)
        rc = nq_port_new(&port);
    if (rc == 0)
        rc = nq_uv_init(&loop, &nquv, port);
    if (rc == 0)
        rc = lnq_port_subscribe_all(port, c);
    if (rc < 0 || uv_async_init(&loop, &nquv_ctl, nquv_on_ctl) < 0) {
        fail("nq_uv setup: %s", nq_strerror(rc));
        consumer_setup_failed();
        return NULL;
    }
    nquv_ctl.data = c;
    c->loop = &loop;
    c->stop = stop_uv;
    consumer_ready();

    uv_run(&loop, UV_RUN_DEFAULT); /* until consumer_check stops it */

    consumer_quiesce();
    nq_port_stats(port, &g_pstats);
    g_have_pstats = 1;
    lnq_close_subs(c);
    nq_uv_close(&nquv, NULL);
    uv_close((uv_handle_t *)&nquv_ctl, NULL);
    uv_run(&loop, UV_RUN_DEFAULT); /* the closes */
    nq_port_free(port);
    uv_loop_close(&loop);
    return NULL;
}

static void nquv_wake(void) {
    uv_async_send(&nquv_ctl);
}

/* ===== Contender nq_epoll: a port on a raw epoll loop ===================== */

#define TAG_NQ 1
static int nqep_ctl = -1; /* eventfd: main's wake at the end */

static void *nqep_consumer(void *arg) {
    consumer_t *c = arg;
    nq_port_t *port = NULL;
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    nqep_ctl = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_CTL};
    int rc = epfd < 0 || nqep_ctl < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, nqep_ctl, &ev) < 0
                 ? NQ_ESYS
                 : nq_port_new(&port);
    if (rc == 0)
        rc = nq_epoll_add(epfd, port, TAG_NQ);
    if (rc == 0)
        rc = lnq_port_subscribe_all(port, c);
    if (rc < 0) {
        fail("nq_epoll setup: %s", nq_strerror(rc));
        consumer_setup_failed();
        return NULL;
    }
    consumer_ready();

    while (!c->finished) {
        struct epoll_event evs[8];
        int n = epoll_wait(epfd, evs, 8, nq_epoll_timeout(port, -1));
        if (n < 0 && errno != EINTR) {
            fail("epoll_wait: %s", strerror(errno));
            break;
        }
        int nq_ready = nq_port_timeout_ms(port) == 0; /* a deadline is due (none here) */
        for (int i = 0; i < n; i++) {
            uint64_t v;
            if (evs[i].data.u64 == TAG_NQ)
                nq_ready = 1;
            else if (read(nqep_ctl, &v, sizeof(v)) < 0 && errno != EAGAIN)
                fail("read: %s", strerror(errno));
        }
        if (nq_ready)
            nq_port_dispatch(port, NQ_BUDGET); /* the callbacks run here */
        consumer_check(c);
    }

    consumer_quiesce();
    nq_port_stats(port, &g_pstats);
    g_have_pstats = 1;
    lnq_close_subs(c);
    nq_epoll_del(epfd, port);
    nq_port_free(port);
    close(nqep_ctl);
    close(epfd);
    return NULL;
}

static void nqep_wake(void) {
    uint64_t one = 1;
    if (write(nqep_ctl, &one, sizeof(one)) != (ssize_t)sizeof(one))
        fail("write: %s", strerror(errno));
}

/* ===== Contender nq_sub: blocking subscriptions on worker threads ========= */

typedef struct ns_wake {
    nq_evq_t *evq;
    uint32_t token;
} ns_wake_t;
static ns_wake_t *ns_wctx;         /* [nh] */
static nq_evq_t *ns_evq[MAX_CONS]; /* b, c: a worker's ready subscriptions */

/* A subscription's waker (empty -> non-empty), on the producer's thread. */
static void ns_waker(void *ctx) {
    ns_wake_t *w = ctx;
    nq_evq_notify(w->evq, w->token);
}

/* a: one subscription; block in nq_sub_recv when it is empty. */
static void ns_run_one(consumer_t *c) {
    nq_sub_t *s = g_nqsub[0];
    while (!c->finished) {
        lnq_drain(c, s, 0, UINT32_MAX);
        consumer_check(c);
        if (c->finished)
            break;
        int64_t arg;
        int rc = nq_sub_recv(s, 5 * 1000000 /* 5 ms: then look at the done flag */, &arg);
        if (rc == 0) {
            take(c, 0, arg);
            c->t_last = h_now_ns();
        } else if (rc != NQ_ETIMEDOUT) {
            fail("nq_sub_recv: %s", nq_strerror(rc));
            break;
        }
    }
}

/* b, c: many subscriptions; block in nq_evq_wait for the ready ones. */
static void ns_run_many(consumer_t *c, nq_evq_t *evq, uint32_t ctl) {
    uint32_t *tok = malloc((ctl + 1) * sizeof(*tok));
    if (tok == NULL)
        fail("out of memory");
    while (tok != NULL && !c->finished) {
        int n = nq_evq_wait(evq, tok, ctl + 1, 100 * 1000000 /* ns */);
        if (n == NQ_ETIMEDOUT)
            n = 0;
        else if (n < 0) {
            fail("nq_evq_wait: %s", nq_strerror(n));
            break;
        }
        for (int i = 0; i < n; i++)
            if (tok[i] != ctl) {
                uint32_t h = c->h_lo + tok[i];
                lnq_drain(c, g_nqsub[h], h, UINT32_MAX); /* to empty: the next push wakes again */
            }
        consumer_check(c);
    }
    free(tok);
}

static void *ns_consumer(void *arg) {
    consumer_t *c = arg;
    uint32_t nown = c->h_hi - c->h_lo, me = (uint32_t)(c - g_cons);
    int many = g.nh > 1;
    nq_sub_opts_t o;
    lnq_healthy_opts(&o);
    int rc = many ? nq_evq_new(nown + 1, &ns_evq[me]) : 0; /* + main's wake token */
    for (uint32_t h = c->h_lo; rc == 0 && h < c->h_hi; h++) {
        if (many) {
            ns_wctx[h].evq = ns_evq[me];
            ns_wctx[h].token = h - c->h_lo;
            o.waker.wake = ns_waker;
            o.waker.ctx = &ns_wctx[h];
        }
        rc = nq_subscribe(lnq_q, lnq_h[h], &o, &g_nqsub[h]);
    }
    if (rc < 0) {
        fail("nq_sub setup: %s", nq_strerror(rc));
        consumer_setup_failed();
        return NULL;
    }
    consumer_ready();

    if (many)
        ns_run_many(c, ns_evq[me], nown);
    else
        ns_run_one(c);

    consumer_quiesce();
    lnq_close_subs(c);
    nq_evq_free(ns_evq[me]);
    return NULL;
}

static int ns_setup(void) {
    ns_wctx = calloc(g.nh, sizeof(*ns_wctx));
    return ns_wctx == NULL ? -1 : lnq_setup();
}

static void ns_wake(void) {
    for (uint32_t i = 0; i < g_ncons; i++)
        if (ns_evq[i] != NULL) /* a: the worker looks at the flag every 5 ms */
            nq_evq_notify(ns_evq[i], g_cons[i].h_hi - g_cons[i].h_lo);
}

static void ns_finish(h_result_t *r) {
    lnq_finish(r);
    free(ns_wctx);
}

/* ===== Contender uv_async: libuv's async handle + a mutex queue =========== */

static uv_async_t *uva; /* [ngroups] */
static uv_async_t uva_ctl;
static uv_loop_t uva_stall_loop; /* a loop that never runs: the stuck consumer */
static uv_async_t uva_stall;

static int uva_put(uint32_t h, int64_t arg) {
    uint32_t i = h >> g.group_shift;
    if (mq_put(&g_mq[i], h, arg) < 0)
        return -1;
    return uv_async_send(&uva[i]);
}

static int uva_put_stall(int64_t arg) {
    if (!g.stalled)
        return 0; /* c0: the extra handle has no subscriber: nothing to queue */
    if (mq_put(&g_mq[g.ngroups], g.nh, arg) < 0)
        return -1;
    return uv_async_send(&uva_stall);
}

static void *uva_producer(void *arg) {
    run_producer(arg, uva_put, uva_put_stall);
    return NULL;
}

static void uva_on_async(uv_async_t *a) {
    consumer_t *c = &g_cons[0];
    mq_drain(a->data, c);
    consumer_check(c);
}

static void uva_on_ctl(uv_async_t *a) {
    consumer_check(a->data);
}

static void uva_on_stall(uv_async_t *a) {
    (void)a; /* never runs */
}

static int uva_setup(void) {
    uva = calloc(g.ngroups, sizeof(*uva));
    if (uva == NULL || mq_setup() < 0)
        return -1;
    if (g.stalled && (uv_loop_init(&uva_stall_loop) < 0 ||
                      uv_async_init(&uva_stall_loop, &uva_stall, uva_on_stall) < 0))
        return -1;
    return 0;
}

static void *uva_consumer(void *arg) {
    consumer_t *c = arg;
    uv_loop_t loop;
    int rc = uv_loop_init(&loop);
    for (uint32_t i = 0; rc == 0 && i < g.ngroups; i++) {
        rc = uv_async_init(&loop, &uva[i], uva_on_async);
        uva[i].data = &g_mq[i];
    }
    if (rc == 0)
        rc = uv_async_init(&loop, &uva_ctl, uva_on_ctl);
    if (rc < 0) {
        fail("uv_async setup: %s", uv_strerror(rc));
        consumer_setup_failed();
        return NULL;
    }
    uva_ctl.data = c;
    c->loop = &loop;
    c->stop = stop_uv;
    consumer_ready();

    uv_run(&loop, UV_RUN_DEFAULT);

    consumer_quiesce();
    for (uint32_t i = 0; i < g.ngroups; i++)
        uv_close((uv_handle_t *)&uva[i], NULL);
    uv_close((uv_handle_t *)&uva_ctl, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    return NULL;
}

static void uva_wake(void) {
    uv_async_send(&uva_ctl);
}

static void uva_finish(h_result_t *r) {
    (void)r;
    if (g.stalled) {
        uv_close((uv_handle_t *)&uva_stall, NULL);
        uv_run(&uva_stall_loop, UV_RUN_DEFAULT);
        uv_loop_close(&uva_stall_loop);
    }
    mq_finish();
    free(uva);
}

/* ===== Contender ev_async: libev's async watcher + a mutex queue ========== */

static struct ev_loop *eva_loop, *eva_stall_loop; /* the stall loop never runs */
static ev_async *eva;                             /* [ngroups] */
static ev_async eva_ctl, eva_stall;

static int eva_put(uint32_t h, int64_t arg) {
    uint32_t i = h >> g.group_shift;
    if (mq_put(&g_mq[i], h, arg) < 0)
        return -1;
    ev_async_send(eva_loop, &eva[i]);
    return 0;
}

static int eva_put_stall(int64_t arg) {
    if (!g.stalled)
        return 0; /* c0: the extra handle has no subscriber: nothing to queue */
    if (mq_put(&g_mq[g.ngroups], g.nh, arg) < 0)
        return -1;
    ev_async_send(eva_stall_loop, &eva_stall);
    return 0;
}

static void *eva_producer(void *arg) {
    run_producer(arg, eva_put, eva_put_stall);
    return NULL;
}

static void eva_on_async(struct ev_loop *loop, ev_async *w, int revents) {
    (void)loop, (void)revents;
    consumer_t *c = &g_cons[0];
    mq_drain(w->data, c);
    consumer_check(c);
}

static void eva_on_ctl(struct ev_loop *loop, ev_async *w, int revents) {
    (void)loop, (void)w, (void)revents;
    consumer_check(&g_cons[0]);
}

static void eva_on_stall(struct ev_loop *loop, ev_async *w, int revents) {
    (void)loop, (void)w, (void)revents; /* never runs */
}

static void stop_ev(consumer_t *c) {
    ev_break(c->loop, EVBREAK_ALL);
}

/* libev loops are not tied to a thread: set up here, run by the consumer. */
static int eva_setup(void) {
    eva = calloc(g.ngroups, sizeof(*eva));
    eva_loop = ev_loop_new(EVFLAG_AUTO);
    if (eva == NULL || eva_loop == NULL || mq_setup() < 0)
        return -1;
    for (uint32_t i = 0; i < g.ngroups; i++) {
        ev_async_init(&eva[i], eva_on_async);
        eva[i].data = &g_mq[i];
        ev_async_start(eva_loop, &eva[i]);
    }
    ev_async_init(&eva_ctl, eva_on_ctl);
    ev_async_start(eva_loop, &eva_ctl);
    if (g.stalled) {
        if ((eva_stall_loop = ev_loop_new(EVFLAG_AUTO)) == NULL)
            return -1;
        ev_async_init(&eva_stall, eva_on_stall);
        ev_async_start(eva_stall_loop, &eva_stall);
    }
    return 0;
}

static void *eva_consumer(void *arg) {
    consumer_t *c = arg;
    c->loop = eva_loop;
    c->stop = stop_ev;
    consumer_ready();
    ev_run(eva_loop, 0);
    consumer_quiesce();
    return NULL;
}

static void eva_wake(void) {
    ev_async_send(eva_loop, &eva_ctl);
}

static void eva_finish(h_result_t *r) {
    (void)r;
    for (uint32_t i = 0; i < g.ngroups; i++)
        ev_async_stop(eva_loop, &eva[i]);
    ev_async_stop(eva_loop, &eva_ctl);
    ev_loop_destroy(eva_loop);
    if (g.stalled) {
        ev_async_stop(eva_stall_loop, &eva_stall);
        ev_loop_destroy(eva_stall_loop);
    }
    mq_finish();
    free(eva);
}

/* ===== Contender eventfd: one eventfd write per notification ============== */

static int efd_ep = -1, efd_ctl = -1;
static int efd_stall = -1, efd_stall_ep = -1; /* in an epoll set nobody waits on */
static int *efd_fd;                           /* [ngroups] */

static int efd_signal(int fd) {
    uint64_t one = 1;
    return write(fd, &one, sizeof(one)) == (ssize_t)sizeof(one) ? 0 : -1;
}

static int efd_put(uint32_t h, int64_t arg) {
    uint32_t i = h >> g.group_shift;
    if (mq_put(&g_mq[i], h, arg) < 0)
        return -1;
    return efd_signal(efd_fd[i]); /* every time, like mio's Waker::wake */
}

static int efd_put_stall(int64_t arg) {
    if (!g.stalled)
        return 0; /* c0: the extra handle has no subscriber: nothing to queue */
    if (mq_put(&g_mq[g.ngroups], g.nh, arg) < 0)
        return -1;
    return efd_signal(efd_stall);
}

static void *efd_producer(void *arg) {
    run_producer(arg, efd_put, efd_put_stall);
    return NULL;
}

static int efd_add(int ep, int *fd, uint64_t tag) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag};
    *fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return *fd < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, *fd, &ev) < 0 ? -1 : 0;
}

static int efd_setup(void) {
    efd_fd = malloc(g.ngroups * sizeof(*efd_fd));
    efd_ep = epoll_create1(EPOLL_CLOEXEC);
    if (efd_fd == NULL || efd_ep < 0 || mq_setup() < 0 || efd_add(efd_ep, &efd_ctl, TAG_CTL) < 0)
        return -1;
    for (uint32_t i = 0; i < g.ngroups; i++)
        if (efd_add(efd_ep, &efd_fd[i], i) < 0)
            return -1;
    if (g.stalled && ((efd_stall_ep = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
                      efd_add(efd_stall_ep, &efd_stall, 0) < 0))
        return -1;
    return 0;
}

static void *efd_consumer(void *arg) {
    consumer_t *c = arg;
    consumer_ready();
    while (!c->finished) {
        struct epoll_event evs[64];
        int n = epoll_wait(efd_ep, evs, 64, -1);
        if (n < 0 && errno != EINTR) {
            fail("epoll_wait: %s", strerror(errno));
            break;
        }
        for (int i = 0; i < n; i++) {
            uint64_t tag = evs[i].data.u64, v;
            int fd = tag == TAG_CTL ? efd_ctl : efd_fd[tag];
            if (read(fd, &v, sizeof(v)) < 0 && errno != EAGAIN) /* first clear, then drain */
                fail("read: %s", strerror(errno));
            if (tag != TAG_CTL)
                mq_drain(&g_mq[tag], c);
        }
        consumer_check(c);
    }
    consumer_quiesce();
    return NULL;
}

static void efd_wake(void) {
    if (efd_signal(efd_ctl) < 0)
        fail("write: %s", strerror(errno));
}

static void efd_finish(h_result_t *r) {
    (void)r;
    for (uint32_t i = 0; i < g.ngroups; i++)
        close(efd_fd[i]);
    close(efd_ctl);
    close(efd_ep);
    if (g.stalled)
        close(efd_stall), close(efd_stall_ep);
    mq_finish();
    free(efd_fd);
}

/* ===== Contender condvar: mutex + condition variable, one item per get ==== */

typedef struct inbox {
    _Alignas(64) pthread_mutex_t mu;
    pthread_cond_t not_empty;
    item_t *v; /* a growable ring: cap is a power of 2 */
    size_t head, len, cap;
} inbox_t;

static inbox_t *cv_box;   /* [ncons + 1]: a consumer thread's inbox; the last is the stalled one */
static uint32_t cv_shift; /* inbox of handle h: h >> cv_shift */

static int cv_push(inbox_t *b, uint32_t h, int64_t arg) {
    if (b->len == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        item_t *v = malloc(cap * sizeof(*v));
        if (v == NULL)
            return -1;
        for (size_t i = 0; i < b->len; i++)
            v[i] = b->v[(b->head + i) & (b->cap - 1)];
        free(b->v);
        b->v = v, b->cap = cap, b->head = 0;
    }
    item_t *it = &b->v[(b->head + b->len) & (b->cap - 1)];
    it->h = h;
    it->arg = arg;
    b->len++;
    return 0;
}

/* queue.Queue.put: append and notify under the lock. */
static int cv_put_box(inbox_t *b, uint32_t h, int64_t arg) {
    pthread_mutex_lock(&b->mu);
    int rc = cv_push(b, h, arg);
    pthread_cond_signal(&b->not_empty);
    pthread_mutex_unlock(&b->mu);
    return rc;
}

static int cv_put(uint32_t h, int64_t arg) {
    return cv_put_box(&cv_box[h >> cv_shift], h, arg);
}

static int cv_put_stall(int64_t arg) {
    if (!g.stalled)
        return 0; /* c0: the extra handle has no subscriber: nothing to queue */
    return cv_put_box(&cv_box[g_ncons], g.nh, arg);
}

static void *cv_producer(void *arg) {
    run_producer(arg, cv_put, cv_put_stall);
    return NULL;
}

static int cv_setup(void) {
    cv_box = calloc_lines(g_ncons + 1, sizeof(*cv_box));
    if (cv_box == NULL)
        return -1;
    for (uint32_t i = 0; i <= g_ncons; i++) {
        pthread_mutex_init(&cv_box[i].mu, NULL);
        pthread_cond_init(&cv_box[i].not_empty, NULL);
    }
    for (cv_shift = 0; (g.nh >> cv_shift) > g_ncons; cv_shift++)
        ;
    return 0;
}

/* queue.Queue.get, in a loop: one item per lock, waiting while empty. */
static void *cv_consumer(void *arg) {
    consumer_t *c = arg;
    inbox_t *b = &cv_box[c - g_cons];
    consumer_ready();
    for (;;) {
        pthread_mutex_lock(&b->mu);
        while (b->len == 0) {
            consumer_check(c); /* done, and everything delivered? */
            if (c->finished)
                break;
            pthread_cond_wait(&b->not_empty, &b->mu);
        }
        if (c->finished) {
            pthread_mutex_unlock(&b->mu);
            break;
        }
        item_t it = b->v[b->head];
        b->head = (b->head + 1) & (b->cap - 1);
        size_t left = --b->len;
        pthread_mutex_unlock(&b->mu);
        take(c, it.h, it.arg);
        if (left == 0) /* the last delivery always empties the inbox */
            c->t_last = h_now_ns();
    }
    consumer_quiesce();
    return NULL;
}

static void cv_wake(void) {
    for (uint32_t i = 0; i < g_ncons; i++) {
        pthread_mutex_lock(&cv_box[i].mu);
        pthread_cond_broadcast(&cv_box[i].not_empty);
        pthread_mutex_unlock(&cv_box[i].mu);
    }
}

static void cv_finish(h_result_t *r) {
    (void)r;
    if (g.stalled) {
        int64_t last[MAX_PROD];
        for (int p = 0; p < MAX_PROD; p++)
            last[p] = -1;
        inbox_t *b = &cv_box[g_ncons];
        for (size_t i = 0; i < b->len; i++) {
            item_t *it = &b->v[(b->head + i) & (b->cap - 1)];
            if (it->h != g.nh || !stall_arg_ok(last, it->arg)) {
                fail("stalled inbox: item %zu out of order", i);
                break;
            }
        }
        g_stall_held = b->len;
    }
    for (uint32_t i = 0; i <= g_ncons; i++) {
        free(cv_box[i].v);
        pthread_cond_destroy(&cv_box[i].not_empty);
        pthread_mutex_destroy(&cv_box[i].mu);
    }
    free(cv_box);
}

/* ===== The contenders, and the run ======================================== */

typedef struct contender {
    const char *name;
    int workers;               /* consumers are worker threads (2 in b, c) */
    int (*setup)(void);        /* main thread, before any consumer starts */
    void *(*consumer)(void *); /* sets up its side, consumer_ready(), runs */
    void *(*producer)(void *);
    void (*wake)(void);            /* main: the producers are done */
    void (*finish)(h_result_t *r); /* main, consumers joined: the stalled queue, free */
    const char *what;              /* for the note */
} contender_t;

static const contender_t CONTENDERS[] = {
    {"nq_uv", 0, lnq_setup, nquv_consumer, lnq_producer, nquv_wake, lnq_finish,
     "port subscriptions on a libuv loop"},
    {"nq_epoll", 0, lnq_setup, nqep_consumer, lnq_producer, nqep_wake, lnq_finish,
     "port subscriptions on an epoll loop"},
    {"nq_sub", 1, ns_setup, ns_consumer, lnq_producer, ns_wake, ns_finish,
     "blocking subscriptions on worker threads"},
    {"uv_async", 0, uva_setup, uva_consumer, uva_producer, uva_wake, uva_finish,
     "mutex array + uv_async_send per notify"},
    {"ev_async", 0, eva_setup, eva_consumer, eva_producer, eva_wake, eva_finish,
     "mutex array + ev_async_send per notify"},
    {"eventfd", 0, efd_setup, efd_consumer, efd_producer, efd_wake, efd_finish,
     "mutex array + eventfd write per notify"},
    {"condvar", 1, cv_setup, cv_consumer, cv_producer, cv_wake, cv_finish,
     "mutex + condvar inbox, one item per get"},
};

/* Prints what there is and leaves at once: a consumer may be stuck. */
static void bail(h_result_t *r, const char *why) {
    fail("%s", why);
    h_end(r, 0, g_note);
    _exit(1);
}

int main(int argc, char **argv) {
    h_opts_t o = h_parse(argc, argv, PAIRS);
    const contender_t *ct = NULL;
    for (size_t i = 0; i < sizeof(CONTENDERS) / sizeof(CONTENDERS[0]); i++)
        if (strcmp(o.contender, CONTENDERS[i].name) == 0)
            ct = &CONTENDERS[i];
    int wa = strcmp(o.workload, "a") == 0, wc = strcmp(o.workload, "c") == 0,
        wc0 = strcmp(o.workload, "c0") == 0;
    if (ct == NULL ||
        (!wa && !wc && strcmp(o.workload, "b") != 0 && strcmp(o.workload, "c0") != 0)) {
        h_usage(argv[0], PAIRS);
        return 2;
    }
    if (wa)
        g = (struct shape){.nprod = 1, .nh = 1, .group_shift = 0, .n = o.quick ? 50000 : 2000000};
    else
        g = (struct shape){.nprod = 4,
                           .nh = 1024,
                           .group_shift = 4,
                           .stalled = wc,
                           .extra = wc || wc0,
                           .n = o.quick ? 100000 : 4000000};
    if (o.n > 0)
        g.n = o.n;
    if (g.n < (long)g.nprod || g.n > SEQ_MASK || (g.stalled && g.n > MAX_N_STALLED)) {
        fprintf(stderr, "%s: --n out of range (%u .. %ld)\n", argv[0], g.nprod,
                g.stalled ? MAX_N_STALLED : (long)SEQ_MASK);
        return 2;
    }
    g.hmask = g.nh - 1;
    g.off = g.nh / g.nprod;
    g.ngroups = g.nh >> g.group_shift;
    g_ncons = ct->workers && !wa ? 2 : 1;

    h_result_t r;
    h_begin(&r, PROGRAM, &o);
    h_int(&r, "cpus", h_ncpus());

    /* What each producer sends, and so what each handle must account for. */
    g_sent_h = calloc(g.nh, sizeof(*g_sent_h));
    g_drop_h = calloc(g.nh, sizeof(*g_drop_h));
    if (g_sent_h == NULL || g_drop_h == NULL)
        bail(&r, "out of memory");
    for (uint32_t p = 0; p < g.nprod; p++) {
        producer_t *pr = &g_prod[p];
        pr->id = p;
        pr->n = g.n / g.nprod + (p < (uint32_t)(g.n % g.nprod));
        pr->lat = malloc(((size_t)pr->n / 64 + 2) * 2 * sizeof(*pr->lat));
        if (pr->lat == NULL)
            bail(&r, "out of memory");
        uint32_t first = (p * g.off) & g.hmask;
        for (uint32_t h = 0; h < g.nh; h++)
            g_sent_h[h] +=
                (uint64_t)pr->n / g.nh + (((h - first) & g.hmask) < (uint64_t)pr->n % g.nh ? 1 : 0);
        if (g.stalled)
            g_stall_sent += (uint64_t)pr->n;
    }
    for (uint32_t i = 0; i < g_ncons; i++) {
        consumer_t *c = &g_cons[i];
        c->h_lo = g.nh / g_ncons * i;
        c->h_hi = g.nh / g_ncons * (i + 1);
        c->last = malloc((size_t)g.nprod * g.nh * sizeof(*c->last));
        c->got = calloc(g.nh, sizeof(*c->got));
        if (c->last == NULL || c->got == NULL)
            bail(&r, "out of memory");
        for (size_t k = 0; k < (size_t)g.nprod * g.nh; k++)
            c->last[k] = -1;
    }

    /* Consumers first, set up and waiting; then the producers, together. */
    if (ct->setup() < 0)
        bail(&r, "setup failed");
    for (uint32_t i = 0; i < g_ncons; i++)
        if (pthread_create(&g_cons[i].thread, NULL, ct->consumer, &g_cons[i]) != 0)
            bail(&r, "pthread_create failed");
    for (int64_t until = h_now_ns() + 10 * INT64_C(1000000000);
         atomic_load(&g_ready) < (int)g_ncons;) {
        if (atomic_load(&g_setup_failed) || h_now_ns() > until)
            bail(&r, "consumer setup failed");
        sleep_ns(100000);
    }
    pthread_barrier_init(&g_start, NULL, g.nprod + 1);
    for (uint32_t p = 0; p < g.nprod; p++)
        if (pthread_create(&g_prod[p].thread, NULL, ct->producer, &g_prod[p]) != 0)
            bail(&r, "pthread_create failed");
    pthread_barrier_wait(&g_start);

    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 120;
    int prod_failed = 0;
    for (uint32_t p = 0; p < g.nprod; p++) {
        if (pthread_timedjoin_np(g_prod[p].thread, NULL, &deadline) != 0)
            bail(&r, "watchdog: a producer ran for 120 s");
        prod_failed |= g_prod[p].failed;
    }
    if (prod_failed)
        bail(&r, "a notify failed");

    /* Done: wake the consumers, and give them 30 s to finish. */
    atomic_store_explicit(&g_done, 1, memory_order_release);
    ct->wake();
    atomic_store(&g_woken, 1);
    for (int64_t until = h_now_ns() + WATCHDOG_S * INT64_C(1000000000);
         atomic_load(&g_finished) < (int)g_ncons;) {
        if (h_now_ns() > until) {
            char why[128];
            snprintf(why, sizeof(why), "watchdog: consumers not finished %d s after the producers",
                     WATCHDOG_S);
            bail(&r, why);
        }
        sleep_ns(200000);
    }
    for (uint32_t i = 0; i < g_ncons; i++)
        pthread_join(g_cons[i].thread, NULL);
    ct->finish(&r);

    /* The accounting: per handle, sent == delivered + dropped. */
    uint64_t sent = 0, delivered = 0, dropped = 0, bad = 0, calls = 0;
    int64_t t_start = INT64_MAX, t_end = 0, busy = 0;
    for (uint32_t i = 0; i < g_ncons; i++) {
        bad += g_cons[i].bad;
        if (g_cons[i].t_last > t_end)
            t_end = g_cons[i].t_last;
    }
    for (uint32_t h = 0; h < g.nh; h++) {
        uint64_t got = 0;
        for (uint32_t i = 0; i < g_ncons; i++)
            got += g_cons[i].got[h];
        if (got + g_drop_h[h] != g_sent_h[h] && g_ok)
            fail("handle %u: sent %" PRIu64 ", delivered %" PRIu64 " + dropped %" PRIu64, h,
                 g_sent_h[h], got, g_drop_h[h]);
        sent += g_sent_h[h], delivered += got, dropped += g_drop_h[h];
    }
    if (bad > 0)
        fail("%" PRIu64 " args out of order, duplicated or misdelivered", bad);
    if (g.stalled && g_stall_held + g_stall_dropped != g_stall_sent)
        fail("stalled: sent %" PRIu64 " != held %" PRIu64 " + dropped %" PRIu64, g_stall_sent,
             g_stall_held, g_stall_dropped);

    size_t nlat = 0;
    for (uint32_t p = 0; p < g.nprod; p++)
        nlat += g_prod[p].nlat;
    int64_t *lat = malloc((nlat + 1) * sizeof(*lat));
    nlat = 0;
    for (uint32_t p = 0; p < g.nprod; p++) {
        producer_t *pr = &g_prod[p];
        if (pr->t0 < t_start)
            t_start = pr->t0;
        busy += pr->t1 - pr->t0;
        calls += (uint64_t)pr->n * (g.extra ? 2 : 1);
        if (lat != NULL)
            memcpy(lat + nlat, pr->lat, pr->nlat * sizeof(*lat)), nlat += pr->nlat;
        free(pr->lat);
    }

    h_num(&r, "notifies_per_s",
          t_end > t_start ? (double)delivered * 1e9 / (double)(t_end - t_start) : 0);
    h_num(&r, "producer_ns", (double)busy / (double)calls);
    h_int(&r, "sent", (int64_t)sent);
    h_int(&r, "delivered", (int64_t)delivered);
    h_int(&r, "dropped", (int64_t)dropped);
    if (g.stalled) {
        h_int(&r, "stalled_sent", (int64_t)g_stall_sent);
        h_int(&r, "stalled_held", (int64_t)g_stall_held);
        h_int(&r, "stalled_dropped", (int64_t)g_stall_dropped);
    }
    if (g_have_pstats)
        h_num(&r, "syscalls_per_1M",
              (double)(g_pstats.efd_reads + g_pstats.efd_writes) * 1e6 / (double)sent);
    if (lat != NULL && nlat > 0) {
        h_int(&r, "lat_p50_ns", h_percentile(lat, nlat, 0.50));
        h_int(&r, "lat_p99_ns", h_percentile(lat, nlat, 0.99));
        h_int(&r, "lat_p999_ns", h_percentile(lat, nlat, 0.999));
    }
    free(lat);
    if (g_ok)
        snprintf(g_note, sizeof(g_note), "%s; %u producer%s, %u consumer thread%s", ct->what,
                 g.nprod, g.nprod > 1 ? "s" : "", g_ncons, g_ncons > 1 ? "s" : "");
    for (uint32_t i = 0; i < g_ncons; i++)
        free(g_cons[i].last), free(g_cons[i].got);
    free(g_sent_h);
    free(g_drop_h);
    return h_end(&r, g_ok, g_note);
}
