/* Criterion suite "churn": producers against clients and handles that come
 * and go, with exact accounting.
 *
 * 8 producers notify 250k times each (NQ_LONG=1: 1M; / 10 under
 * ThreadSanitizer) over 64 handle slots, each arg naming its producer, the
 * producer's sequence number, the slot and the slot's owner epoch. Meanwhile:
 *   - two threads unregister and re-register the slots' handles; each new
 *     handle is a new epoch of its slot (its "next owner", most often on the
 *     same index of the queue's table), and gets 0-2 "epoch subscriptions"
 *     before producers can see it, which live until the handle is
 *     unregistered; the old handle mostly stays published for 10-100 us
 *     more, so producers notify a stale handle while its next owner lives;
 *   - a thread subscribes to random live handles ("churn subscriptions") that
 *     live for a random number of receives, then are closed while attached
 *     (or end with NQ_ECLOSED when their handle goes);
 *   - three workers take subscriptions from a shared pool in turn and receive
 *     on them: blocking nq_sub_recv with short timeouts, nq_sub_try_recv,
 *     nq_sub_recv_batch;
 *   - a thread runs blocking nq_wait (both forms: NQ_SEQ_NEXT and a
 *     snapshot) with timeouts, and nq_wait_start with a counting waker,
 *     finished by nq_wait_cancel, nq_wait_result and nq_wait_release in
 *     random orders, or released while pending;
 *   - a port thread keeps port waits (with and without timeouts) and port
 *     subscriptions armed on random handles, and dispatches on readiness.
 * Every random choice comes from a per-thread PRNG seeded from the run's
 * seed (NQ_SEED, else a fresh one; printed): a seed replays every thread's
 * choices, the producers' slot sequence included; the threads' interleaving
 * is the scheduler's and differs from run to run.
 *
 * Checked, from the producers' logs of every notify (its slot, epoch and
 * result):
 *   to-next-owner  no subscription or wait ever receives an arg notified to
 *                  another slot or to another epoch of its own slot;
 *   dup, reordered per subscription, each producer's sequence numbers
 *                  strictly increase;
 *   lost           an epoch subscription receives + drops exactly what its
 *                  handle's notifies that succeeded sent; a churn or port
 *                  subscription's missing args between the first and the last
 *                  it received from a producer (and after the last, if it saw
 *                  NQ_ECLOSED) are at most its drops;
 *   waits          every wait's status is seen exactly once and the queue's
 *                  counters agree; a user waker runs exactly once for a
 *                  completed wait and never for a cancelled one;
 *   stats          notifies == the notifies that succeeded; the sum of
 *                  nq_notify's returns == args stored + waits completed by a
 *                  notify (exact but for waits started on a snapshot, which
 *                  may complete at once: a bounded window); every byte held
 *                  is returned but the handle slots' own.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <poll.h>
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
#include "core/queue.h" /* the slots' own bytes, kept until the queue is freed */
#include "nqtest.h"

#define PRODUCERS 8
#define SLOTS 64
#define MAXE 4096 /* epochs per slot (16 bits in the arg) */
#define REGS 2    /* re-registering threads; thread r owns slots i % REGS == r */
#define WORKERS 3
#define MAX_LIVE_SUBS 400 /* pool bound: creators skip while it is reached */
#define MAX_CHURN_SUBS 48
#define WSTARTS 16 /* nq_wait_start waits outstanding at most */
#define PWAITS 32  /* port waits outstanding at most */
#define PSUBS 4

/* arg = producer << 54 | slot << 48 | epoch << 32 | seq (seq from 1) */
#define ARG(p, i, e, seq)                                                                     \
    ((int64_t)(((uint64_t)(p) << 54) | ((uint64_t)(i) << 48) | ((uint64_t)(e) << 32) |       \
               (uint64_t)(seq)))
#define ARG_P(a) ((int)((uint64_t)(a) >> 54))
#define ARG_I(a) ((int)(((uint64_t)(a) >> 48) & 0x3f))
#define ARG_E(a) ((uint32_t)(((uint64_t)(a) >> 32) & 0xffff))
#define ARG_SEQ(a) ((uint64_t)(a) & 0xffffffffu)

static nq_queue_t *q;
static uint64_t seed;
static uint64_t per_producer;

/* --- slots: the handle of each epoch ----------------------------------------
 * hist[i][e] is written once, before epoch[i] = e is published (release);
 * readers load epoch[i] (acquire) and then read hist[i][e]. Only slot i's
 * re-registering thread (and, after it is joined, the main thread) changes
 * slot i. */
static _Atomic uint32_t epoch[SLOTS];
static nq_handle_t hist[SLOTS][MAXE];

static void current(int i, uint32_t *e, nq_handle_t *h) {
    *e = atomic_load_explicit(&epoch[i], memory_order_acquire);
    *h = hist[i][*e];
}

/* --- the producers' logs ------------------------------------------------------ */
struct logent {
    int32_t rc; /* nq_notify's result */
    uint16_t e;
    uint8_t i;
};
static struct logent *plog[PRODUCERS]; /* [seq], seq from 1 */

static void *producer(void *arg) {
    int p = (int)(intptr_t)arg;
    uint64_t rng = nqt_rand_init(seed, 100 + (uint64_t)p);
    struct logent *log = plog[p];
    for (uint64_t seq = 1; seq <= per_producer; seq++) {
        int i = (int)(nqt_rand(&rng) % SLOTS);
        uint32_t e;
        nq_handle_t h;
        current(i, &e, &h);
        int rc = nq_notify(q, h, ARG(p, i, e, seq));
        if (rc < 0 && rc != NQ_EBADH) /* EBADH: the handle was just unregistered */
            nqt_thread_fail("producer %d: nq_notify returned %s", p, nq_err_name(rc));
        log[seq].rc = rc;
        log[seq].e = (uint16_t)e;
        log[seq].i = (uint8_t)i;
        if ((seq & 1023) == 0)
            sched_yield(); /* 2 vCPUs: let the churn threads in */
    }
    return NULL;
}

/* --- subscription records --------------------------------------------------------
 * Owned by one thread at a time: a worker between pool_take and pool_put
 * (the pool's mutex orders the hand-offs), or the port thread. */
enum { SUB_EPOCH, SUB_CHURN, SUB_PORT };

struct subrec {
    int kind, i;
    uint32_t e;
    nq_sub_t *s;
    int ops_left; /* churn and port: closed while attached when it reaches 0 */
    int saw_closed;
    uint64_t received, dropped;
    uint64_t first[PRODUCERS], last[PRODUCERS], cnt[PRODUCERS];
    uint64_t dup, reorder, misrouted;
    struct subrec *next; /* on the finished list */
};

static pthread_mutex_t fin_lock = PTHREAD_MUTEX_INITIALIZER;
static struct subrec *finished;
static atomic_long live_recs;  /* pool subscriptions not yet finished */
static atomic_long live_churn; /* of which churn */
static atomic_long subs_made[3], subs_ebadh;

static void take(struct subrec *r, const int64_t *args, int n) {
    for (int k = 0; k < n; k++) {
        int64_t a = args[k];
        int p = ARG_P(a);
        uint64_t seq = ARG_SEQ(a);
        if (p >= PRODUCERS || ARG_I(a) != r->i || ARG_E(a) != r->e || seq == 0 ||
            seq > per_producer) {
            r->misrouted++;
            continue;
        }
        if (r->cnt[p] > 0 && seq == r->last[p]) {
            r->dup++;
            continue;
        }
        if (r->cnt[p] > 0 && seq < r->last[p]) {
            r->reorder++;
            continue;
        }
        if (r->cnt[p] == 0)
            r->first[p] = seq;
        r->last[p] = seq;
        r->cnt[p]++;
        r->received++;
    }
}

/* The last receive is done: read the drops, close, file the record. Drops
 * that happen after this read land after every arg received, so they never
 * hide a gap the checks count. */
static void finish(struct subrec *r, int closed) {
    r->saw_closed = closed;
    r->dropped = nq_sub_dropped(r->s);
    nq_sub_close(r->s); /* a port subscription inside its callback: deferred */
    r->s = NULL;
    pthread_mutex_lock(&fin_lock);
    r->next = finished;
    finished = r;
    pthread_mutex_unlock(&fin_lock);
}

static struct subrec *newrec(int kind, int i, uint32_t e) {
    struct subrec *r = calloc(1, sizeof(*r));
    if (r == NULL)
        abort();
    r->kind = kind;
    r->i = i;
    r->e = e;
    return r;
}

static nq_sub_opts_t sub_opts(uint64_t *rng, const uint32_t *caps, int ncaps) {
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = caps[nqt_rand(rng) % (uint64_t)ncaps];
    o.overflow = nqt_rand(rng) % 2 ? NQ_DROP_OLDEST : NQ_DROP_NEWEST;
    return o;
}

/* The pool: a FIFO of records the workers take in turn. */
#define POOL 1024
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static struct subrec *pool[POOL];
static unsigned pool_head, pool_len;

static void pool_put(struct subrec *r) {
    pthread_mutex_lock(&pool_lock);
    if (pool_len == POOL) { /* MAX_LIVE_SUBS < POOL keeps this from happening */
        pthread_mutex_unlock(&pool_lock);
        nqt_thread_fail("pool overflow");
        return;
    }
    pool[(pool_head + pool_len++) % POOL] = r;
    pthread_mutex_unlock(&pool_lock);
}

static struct subrec *pool_take(void) {
    struct subrec *r = NULL;
    pthread_mutex_lock(&pool_lock);
    if (pool_len > 0) {
        r = pool[pool_head];
        pool_head = (pool_head + 1) % POOL;
        pool_len--;
    }
    pthread_mutex_unlock(&pool_lock);
    return r;
}

static atomic_int stop;      /* producers are done: create nothing more */
static atomic_int all_gone;  /* the main thread has unregistered every handle */

static void *worker(void *arg) {
    uint64_t rng = nqt_rand_init(seed, 200 + (uint64_t)(intptr_t)arg);
    for (;;) {
        struct subrec *r = pool_take();
        if (r == NULL) {
            if (atomic_load(&all_gone) && atomic_load(&live_recs) == 0)
                return NULL;
            usleep(50);
            continue;
        }
        int ops = 1 + (int)(nqt_rand(&rng) % 8), closed = 0;
        for (int k = 0; k < ops && !closed; k++) {
            int64_t buf[64];
            int rc;
            switch (nqt_rand(&rng) % 3) {
            case 0: /* blocking, up to 200 us */
                rc = nq_sub_recv(r->s, (int64_t)(nqt_rand(&rng) % 200000), &buf[0]);
                if (rc == 0)
                    take(r, buf, 1);
                else if (rc == NQ_ECLOSED)
                    closed = 1;
                else if (rc != NQ_ETIMEDOUT)
                    nqt_thread_fail("worker: nq_sub_recv returned %s", nq_err_name(rc));
                break;
            case 1:
                while ((rc = nq_sub_try_recv(r->s, &buf[0])) == 0)
                    take(r, buf, 1);
                if (rc == NQ_ECLOSED)
                    closed = 1;
                else if (rc != NQ_EAGAIN)
                    nqt_thread_fail("worker: nq_sub_try_recv returned %s", nq_err_name(rc));
                break;
            default:
                rc = nq_sub_recv_batch(r->s, buf, 1 + nqt_rand(&rng) % 64);
                if (rc > 0)
                    take(r, buf, rc);
                else if (rc == NQ_ECLOSED)
                    closed = 1;
                else if (rc < 0)
                    nqt_thread_fail("worker: nq_sub_recv_batch returned %s", nq_err_name(rc));
                break;
            }
        }
        int churn = r->kind == SUB_CHURN;
        if (closed || (churn && --r->ops_left <= 0)) {
            finish(r, closed);
            if (churn)
                atomic_fetch_sub(&live_churn, 1);
            atomic_fetch_sub(&live_recs, 1);
        } else {
            pool_put(r);
        }
    }
}

/* --- re-registering --------------------------------------------------------------- */
static atomic_long reregs;

static const uint32_t epoch_caps[] = {1, 16, 256};
static const uint32_t churn_caps[] = {1, 16, 256, 4096};

/* Subscriptions on a handle nobody can notify yet: they see all of it. */
static void epoch_subs(uint64_t *rng, int i, uint32_t e, nq_handle_t h) {
    int n = (int)(nqt_rand(rng) % 3);
    for (int k = 0; k < n && atomic_load(&live_recs) < MAX_LIVE_SUBS; k++) {
        struct subrec *r = newrec(SUB_EPOCH, i, e);
        nq_sub_opts_t o = sub_opts(rng, epoch_caps, 3);
        int rc = nq_subscribe(q, h, &o, &r->s);
        if (rc != 0) {
            nqt_thread_fail("epoch subscribe returned %s", nq_err_name(rc));
            free(r);
            return;
        }
        atomic_fetch_add(&subs_made[SUB_EPOCH], 1);
        atomic_fetch_add(&live_recs, 1);
        pool_put(r);
    }
}

static void *reregister(void *arg) {
    int me = (int)(intptr_t)arg;
    uint64_t rng = nqt_rand_init(seed, 300 + (uint64_t)me);
    while (!atomic_load(&stop)) {
        usleep((useconds_t)(100 + nqt_rand(&rng) % 900));
        int i = me + REGS * (int)(nqt_rand(&rng) % (SLOTS / REGS));
        uint32_t e = atomic_load_explicit(&epoch[i], memory_order_relaxed); /* ours */
        if (e + 1 >= MAXE)
            continue;
        int rc = nq_unregister(q, hist[i][e]);
        if (rc != 0)
            nqt_thread_fail("nq_unregister returned %s", nq_err_name(rc));
        nq_handle_t h;
        rc = nq_register(q, "churn", &h);
        if (rc != 0) {
            nqt_thread_fail("nq_register returned %s", nq_err_name(rc));
            return NULL;
        }
        epoch_subs(&rng, i, e + 1, h);
        /* The old handle stays published a while: producers notify it while
         * its slot index may already belong to h (the next owner), whose
         * epoch subscriptions would catch any arg routed to it. */
        if (nqt_rand(&rng) % 4)
            usleep((useconds_t)(10 + nqt_rand(&rng) % 90));
        hist[i][e + 1] = h;
        /* Release pairs with the acquire in current(). */
        atomic_store_explicit(&epoch[i], e + 1, memory_order_release);
        atomic_fetch_add(&reregs, 1);
    }
    return NULL;
}

/* --- churn subscriptions --------------------------------------------------------------- */
static void *sub_churn(void *arg) {
    (void)arg;
    uint64_t rng = nqt_rand_init(seed, 400);
    while (!atomic_load(&stop)) {
        usleep((useconds_t)(nqt_rand(&rng) % 300));
        if (atomic_load(&live_churn) >= MAX_CHURN_SUBS || atomic_load(&live_recs) >= MAX_LIVE_SUBS)
            continue;
        int i = (int)(nqt_rand(&rng) % SLOTS);
        uint32_t e;
        nq_handle_t h;
        current(i, &e, &h);
        struct subrec *r = newrec(SUB_CHURN, i, e);
        r->ops_left = 1 + (int)(nqt_rand(&rng) % 40);
        nq_sub_opts_t o = sub_opts(&rng, churn_caps, 4);
        int rc = nq_subscribe(q, h, &o, &r->s);
        if (rc == NQ_EBADH) { /* unregistered since we read it */
            atomic_fetch_add(&subs_ebadh, 1);
            free(r);
            continue;
        }
        if (rc != 0) {
            nqt_thread_fail("churn subscribe returned %s", nq_err_name(rc));
            free(r);
            continue;
        }
        atomic_fetch_add(&subs_made[SUB_CHURN], 1);
        atomic_fetch_add(&live_churn, 1);
        atomic_fetch_add(&live_recs, 1);
        pool_put(r);
    }
    return NULL;
}

/* --- waits ------------------------------------------------------------------------------------
 * Outcomes, by who saw them. A wait started on a snapshot may complete at
 * once, reached by no notify: those completions are "snap_ok", the window
 * of the stats check. */
enum { WS_OK, WS_TIMEDOUT, WS_CANCELED, WS_CLOSED, WS_N };
static atomic_long w_seen[WS_N];    /* statuses seen, every kind of wait */
static atomic_long w_next_ok;      /* completions that a notify made for sure */
static atomic_long w_snap_ok;      /* completions that may have come at once */
static atomic_long w_unknown_done; /* released pending, then found completed or closed */
static atomic_long w_started, w_badh, w_misrouted, w_waker_bad;
static atomic_long w_blocking, w_user, w_port;

static void see_status(int st) {
    switch (st) {
    case 0:
        atomic_fetch_add(&w_seen[WS_OK], 1);
        break;
    case NQ_ETIMEDOUT:
        atomic_fetch_add(&w_seen[WS_TIMEDOUT], 1);
        break;
    case NQ_ECANCELED:
        atomic_fetch_add(&w_seen[WS_CANCELED], 1);
        break;
    case NQ_ECLOSED:
        atomic_fetch_add(&w_seen[WS_CLOSED], 1);
        break;
    default:
        nqt_thread_fail("a wait ended with %s", nq_err_name(st));
    }
}

static void see_ok(int i, uint32_t e, int snapshot, int64_t a) {
    if (ARG_P(a) >= PRODUCERS || ARG_I(a) != i || ARG_E(a) != e || ARG_SEQ(a) == 0)
        atomic_fetch_add(&w_misrouted, 1);
    atomic_fetch_add(snapshot ? &w_snap_ok : &w_next_ok, 1);
}

/* after: NQ_SEQ_NEXT, or a snapshot (0 on EBADH: the caller skips). */
static int pick_after(uint64_t *rng, nq_handle_t h, uint64_t *after) {
    if (nqt_rand(rng) % 2) {
        *after = NQ_SEQ_NEXT;
        return 0;
    }
    return nq_seq(q, h, after);
}

struct wstart {
    nq_wait_t *w;
    int i, snapshot;
    uint32_t e;
    atomic_int wakes;
};

static void user_wake(void *ctx) {
    struct wstart *ws = ctx;
    atomic_fetch_add_explicit(&ws->wakes, 1, memory_order_relaxed);
}

/* Ends an nq_wait_start wait one of three ways; every outcome is checked
 * against the waker's count once release has returned (no waker runs after). */
static void wstart_end(uint64_t *rng, struct wstart *ws) {
    int how = (int)(nqt_rand(rng) % 3);
    int64_t a = 0;
    int st;
    if (how == 2) { /* release while maybe pending: the waker says what happened */
        st = nq_wait_result(ws->w, &a);
        nq_wait_release(ws->w);
        int wk = atomic_load(&ws->wakes);
        if (st == NQ_EAGAIN) {
            if (wk == 0) {
                see_status(NQ_ECANCELED);
            } else if (wk == 1) {
                atomic_fetch_add(&w_unknown_done, 1); /* completed or closed: not told */
            } else {
                atomic_fetch_add(&w_waker_bad, 1);
            }
        } else {
            see_status(st);
            if (st == 0)
                see_ok(ws->i, ws->e, ws->snapshot, a);
            if (wk != 1)
                atomic_fetch_add(&w_waker_bad, 1);
        }
    } else {
        if (how == 1)
            (void)nq_wait_result(ws->w, &a); /* a look first, maybe EAGAIN */
        int crc = nq_wait_cancel(ws->w);
        st = nq_wait_result(ws->w, &a);
        nq_wait_release(ws->w);
        int wk = atomic_load(&ws->wakes);
        if (crc == 0) {
            if (st != NQ_ECANCELED || wk != 0)
                atomic_fetch_add(&w_waker_bad, 1);
        } else if (crc == NQ_EALREADY) {
            if (st == NQ_EAGAIN || st == NQ_ECANCELED || wk != 1)
                atomic_fetch_add(&w_waker_bad, 1);
        } else {
            nqt_thread_fail("nq_wait_cancel returned %s", nq_err_name(crc));
        }
        see_status(st);
        if (st == 0)
            see_ok(ws->i, ws->e, ws->snapshot, a);
    }
    free(ws);
}

static void *wait_churn(void *arg) {
    (void)arg;
    uint64_t rng = nqt_rand_init(seed, 500);
    struct wstart *out[WSTARTS];
    int nout = 0;
    while (!atomic_load(&stop)) {
        int i = (int)(nqt_rand(&rng) % SLOTS);
        uint32_t e;
        nq_handle_t h;
        current(i, &e, &h);
        uint64_t r = nqt_rand(&rng) % 8, after;
        if (r < 2) { /* blocking nq_wait, up to 500 us */
            if (pick_after(&rng, h, &after) != 0) {
                atomic_fetch_add(&w_badh, 1);
                continue;
            }
            int64_t a = 0;
            int st = nq_wait(q, h, after, (int64_t)(nqt_rand(&rng) % 500000), &a);
            if (st == NQ_EBADH) {
                atomic_fetch_add(&w_badh, 1);
                continue;
            }
            atomic_fetch_add(&w_started, 1);
            atomic_fetch_add(&w_blocking, 1);
            see_status(st);
            if (st == 0)
                see_ok(i, e, after != NQ_SEQ_NEXT, a);
        } else if (r < 5 && nout < WSTARTS) {
            struct wstart *ws = calloc(1, sizeof(*ws));
            if (ws == NULL)
                abort();
            ws->i = i;
            ws->e = e;
            if (pick_after(&rng, h, &after) != 0) {
                atomic_fetch_add(&w_badh, 1);
                free(ws);
                continue;
            }
            ws->snapshot = after != NQ_SEQ_NEXT;
            nq_waker_t wk = {user_wake, ws};
            int rc = nq_wait_start(q, h, after, wk, &ws->w);
            if (rc == NQ_EBADH) {
                atomic_fetch_add(&w_badh, 1);
                free(ws);
                continue;
            }
            if (rc != 0) {
                nqt_thread_fail("nq_wait_start returned %s", nq_err_name(rc));
                free(ws);
                continue;
            }
            atomic_fetch_add(&w_started, 1);
            atomic_fetch_add(&w_user, 1);
            out[nout++] = ws;
        } else if (nout > 0) {
            int k = (int)(nqt_rand(&rng) % (uint64_t)nout);
            wstart_end(&rng, out[k]);
            out[k] = out[--nout];
        } else {
            usleep(20);
        }
    }
    while (nout > 0)
        wstart_end(&rng, out[--nout]);
    return NULL;
}

/* --- the port thread ---------------------------------------------------------------------------- */
struct pwait {
    int busy, i, snapshot;
    uint32_t e, gen;
    int64_t start, timeout_ms;
};
static struct pwait pw[PWAITS];
static int pw_busy;
static struct subrec *psub[PSUBS];
static uint64_t p_dispatches, p_sub_calls;

static void pwait_cb(void *data, int status, int64_t a) {
    uintptr_t tag = (uintptr_t)data;
    unsigned k = (unsigned)(tag & 0xffff);
    if (k >= PWAITS || !pw[k].busy || pw[k].gen != (uint32_t)(tag >> 16)) {
        nqt_thread_fail("port: a second callback for port wait %u", k);
        return;
    }
    struct pwait *w = &pw[k];
    w->busy = 0;
    pw_busy--;
    see_status(status);
    if (status == 0)
        see_ok(w->i, w->e, w->snapshot, a);
    if (status == NQ_ETIMEDOUT && (w->timeout_ms < 0 || now_ns() - w->start < w->timeout_ms * 1000000))
        nqt_thread_fail("port: a wait timed out early (or without a timeout)");
}

static void psub_cb(nq_sub_t *s, void *data) {
    struct subrec *r = data;
    int64_t buf[32];
    p_sub_calls++;
    int n = nq_sub_recv_batch(s, buf, 32); /* level-triggered: the rest next time */
    if (n > 0)
        take(r, buf, n);
    unsigned k = r->ops_left >> 16; /* its psub[] index */
    if (n == NQ_ECLOSED || (n >= 0 && (--r->ops_left & 0xffff) == 0)) {
        psub[k] = NULL;
        finish(r, n == NQ_ECLOSED);
    } else if (n < 0) {
        nqt_thread_fail("port: recv_batch returned %s", nq_err_name(n));
    }
}

static nq_port_t *port;

static void port_arm(uint64_t *rng) {
    for (unsigned k = 0; k < PWAITS; k++) {
        if (pw[k].busy || nqt_rand(rng) % 4)
            continue;
        struct pwait *w = &pw[k];
        w->i = (int)(nqt_rand(rng) % SLOTS);
        nq_handle_t h;
        current(w->i, &w->e, &h);
        uint64_t after;
        if (pick_after(rng, h, &after) != 0) {
            atomic_fetch_add(&w_badh, 1);
            continue;
        }
        w->snapshot = after != NQ_SEQ_NEXT;
        w->timeout_ms = nqt_rand(rng) % 3 == 0 ? -1 : (int64_t)(nqt_rand(rng) % 4);
        w->start = now_ns();
        w->gen++;
        void *tag = (void *)((uintptr_t)k | ((uintptr_t)w->gen << 16));
        int rc = nq_port_wait(port, q, h, after, w->timeout_ms, pwait_cb, tag, NULL);
        if (rc == NQ_EBADH) {
            atomic_fetch_add(&w_badh, 1);
            continue;
        }
        if (rc != 0) {
            nqt_thread_fail("nq_port_wait returned %s", nq_err_name(rc));
            continue;
        }
        w->busy = 1;
        pw_busy++;
        atomic_fetch_add(&w_started, 1);
        atomic_fetch_add(&w_port, 1);
    }
    for (unsigned k = 0; k < PSUBS; k++) {
        if (psub[k] != NULL || nqt_rand(rng) % 4)
            continue;
        int i = (int)(nqt_rand(rng) % SLOTS);
        uint32_t e;
        nq_handle_t h;
        current(i, &e, &h);
        struct subrec *r = newrec(SUB_PORT, i, e);
        r->ops_left = (int)(k << 16 | (1 + nqt_rand(rng) % 40)); /* index | callbacks left */
        nq_sub_opts_t o = sub_opts(rng, churn_caps, 4);
        int rc = nq_port_subscribe(port, q, h, &o, psub_cb, r, &r->s);
        if (rc == NQ_EBADH) {
            atomic_fetch_add(&subs_ebadh, 1);
            free(r);
            continue;
        }
        if (rc != 0) {
            nqt_thread_fail("nq_port_subscribe returned %s", nq_err_name(rc));
            free(r);
            continue;
        }
        atomic_fetch_add(&subs_made[SUB_PORT], 1);
        psub[k] = r;
    }
}

static void *port_thread(void *arg) {
    (void)arg;
    uint64_t rng = nqt_rand_init(seed, 600);
    int64_t idle_since = now_ns();
    for (unsigned it = 0;; it++) {
        if (!atomic_load(&stop))
            port_arm(&rng);
        int live = pw_busy;
        for (unsigned k = 0; k < PSUBS; k++)
            live += psub[k] != NULL;
        if (atomic_load(&all_gone) && live == 0)
            break;
        int64_t tm = nq_port_timeout_ms(port);
        int wait_ms = tm < 0 || tm > 5 ? 5 : (int)tm;
        struct pollfd pf = {nq_port_fd(port), POLLIN, 0};
        int pr = poll(&pf, 1, wait_ms);
        if (pr == 1 || (tm >= 0 && tm <= wait_ms)) {
            int ran = nq_port_dispatch(port, it % 2 ? 0 : 8);
            if (ran < 0)
                nqt_thread_fail("nq_port_dispatch returned %s", nq_err_name(ran));
            p_dispatches++;
            idle_since = now_ns();
        } else if (atomic_load(&all_gone) && now_ns() - idle_since > 10 * (int64_t)1000000000) {
            nqt_thread_fail("port: %d items never called back after every handle went", live);
            break;
        }
    }
    return NULL;
}

/* --- the checks ------------------------------------------------------------------------------------ */

/* Every notify that succeeded, as (slot, epoch, producer, seq) sorted. */
static uint64_t *keys;
static size_t nkeys;

#define KEY(i, e, p, seq)                                                                      \
    (((uint64_t)(i) << 52) | ((uint64_t)(e) << 36) | ((uint64_t)(p) << 32) | (uint64_t)(seq))

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static size_t lower(uint64_t k) {
    size_t lo = 0, hi = nkeys;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (keys[mid] < k)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Notifies that succeeded on (i, e) from producer p with seq in [a, b]. */
static uint64_t sent_in(int i, uint32_t e, int p, uint64_t a, uint64_t b) {
    return lower(KEY(i, e, p, b) + 1) - lower(KEY(i, e, p, a));
}

static uint64_t sent_to(int i, uint32_t e) {
    return lower(KEY(i, e + 1, 0, 0)) - lower(KEY(i, e, 0, 0));
}

Test(churn, notifies_against_churning_handles_subscriptions_and_waits, .timeout = 300) {
    seed = nqt_seed();
    per_producer = (uint64_t)SCALE(250000) * (nqt_long() ? 4 : 1);
    fprintf(stderr, "# churn: seed %llu (NQ_SEED=%llu replays each thread's choices)\n",
            (unsigned long long)seed, (unsigned long long)seed);
    int64_t t0 = now_ns();

    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_subscribers_per_handle = 256;
    cr_assert_eq(nq_queue_new(&cfg, &q), 0);
    nq_stats_t st0;
    cr_assert_eq(nq_queue_stats(q, &st0), 0);
    uint64_t rng = nqt_rand_init(seed, 1);
    for (int i = 0; i < SLOTS; i++) {
        cr_assert_eq(nq_register(q, "churn", &hist[i][0]), 0);
        epoch_subs(&rng, i, 0, hist[i][0]);
    }
    for (int p = 0; p < PRODUCERS; p++) {
        plog[p] = calloc(per_producer + 1, sizeof(struct logent));
        cr_assert_not_null(plog[p]);
    }
    cr_assert_eq(nq_port_new(&port), 0);

    pthread_t prod[PRODUCERS], reg[REGS], wk[WORKERS], sc, wc, pt;
    for (int w = 0; w < WORKERS; w++)
        cr_assert_eq(pthread_create(&wk[w], NULL, worker, (void *)(intptr_t)w), 0);
    for (int r = 0; r < REGS; r++)
        cr_assert_eq(pthread_create(&reg[r], NULL, reregister, (void *)(intptr_t)r), 0);
    cr_assert_eq(pthread_create(&sc, NULL, sub_churn, NULL), 0);
    cr_assert_eq(pthread_create(&wc, NULL, wait_churn, NULL), 0);
    cr_assert_eq(pthread_create(&pt, NULL, port_thread, NULL), 0);
    for (int p = 0; p < PRODUCERS; p++)
        cr_assert_eq(pthread_create(&prod[p], NULL, producer, (void *)(intptr_t)p), 0);
    for (int p = 0; p < PRODUCERS; p++)
        cr_assert_eq(pthread_join(prod[p], NULL), 0);
    int64_t t_produced = now_ns();

    /* The end: nothing new, then every handle goes, so every wait ends and
     * every subscription is drained to NQ_ECLOSED. */
    atomic_store(&stop, 1);
    for (int r = 0; r < REGS; r++)
        cr_assert_eq(pthread_join(reg[r], NULL), 0);
    cr_assert_eq(pthread_join(sc, NULL), 0);
    cr_assert_eq(pthread_join(wc, NULL), 0);
    for (int i = 0; i < SLOTS; i++)
        cr_assert_eq(nq_unregister(q, hist[i][atomic_load(&epoch[i])]), 0);
    atomic_store(&all_gone, 1);
    for (int w = 0; w < WORKERS; w++)
        cr_assert_eq(pthread_join(wk[w], NULL), 0);
    cr_assert_eq(pthread_join(pt, NULL), 0);
    nq_port_free(port);
    int64_t t_end = now_ns();
    cr_assert_eq(atomic_load(&nqt_errors), 0, "%lld errors in the threads; the first: %s",
                 (long long)atomic_load(&nqt_errors), nqt_first_error);

    /* The producers' logs. */
    uint64_t sent = (uint64_t)PRODUCERS * per_producer, accepted = 0, rejected = 0, rc_sum = 0;
    for (int p = 0; p < PRODUCERS; p++)
        for (uint64_t s = 1; s <= per_producer; s++)
            if (plog[p][s].rc >= 0)
                accepted++;
    keys = malloc((accepted + 1) * sizeof(*keys));
    cr_assert_not_null(keys);
    for (int p = 0; p < PRODUCERS; p++) {
        for (uint64_t s = 1; s <= per_producer; s++) {
            struct logent *l = &plog[p][s];
            if (l->rc < 0) {
                rejected++;
                continue;
            }
            rc_sum += (uint64_t)l->rc;
            keys[nkeys++] = KEY(l->i, l->e, p, s);
        }
        free(plog[p]);
    }
    qsort(keys, nkeys, sizeof(*keys), cmp_u64);

    /* Subscription by subscription. */
    uint64_t delivered = 0, dropped = 0, lost = 0, excess = 0, dup = 0, reorder = 0,
             misrouted = 0, nsubs = 0, exact_subs = 0;
    for (struct subrec *r = finished, *next; r != NULL; r = next) {
        next = r->next;
        nsubs++;
        delivered += r->received;
        dropped += r->dropped;
        dup += r->dup;
        reorder += r->reorder;
        misrouted += r->misrouted;
        if (r->kind == SUB_EPOCH) {
            /* It saw every notify its handle accepted. */
            uint64_t want = sent_to(r->i, r->e), got = r->received + r->dropped;
            cr_assert(r->saw_closed);
            if (got < want)
                lost += want - got;
            else
                excess += got - want;
            exact_subs++;
        } else {
            uint64_t missing = 0;
            for (int p = 0; p < PRODUCERS; p++) {
                if (r->cnt[p] == 0)
                    continue;
                uint64_t span = sent_in(r->i, r->e, p, r->first[p],
                                        r->saw_closed ? UINT32_MAX : r->last[p]);
                if (span < r->cnt[p])
                    excess += r->cnt[p] - span; /* received what was never sent to it */
                else
                    missing += span - r->cnt[p];
            }
            if (missing > r->dropped)
                lost += missing - r->dropped;
        }
        free(r);
    }

    nq_stats_t st;
    cr_assert_eq(nq_queue_stats(q, &st), 0);
    long wok = atomic_load(&w_seen[WS_OK]), wto = atomic_load(&w_seen[WS_TIMEDOUT]),
         wca = atomic_load(&w_seen[WS_CANCELED]), wcl = atomic_load(&w_seen[WS_CLOSED]),
         wun = atomic_load(&w_unknown_done);
    uint64_t args_stored = st.deliveries - st.waits_completed;
    /* rc_sum == args stored + waits a notify completed; completions seen on
     * NQ_SEQ_NEXT waits are certainly by a notify, those on a snapshot may
     * have come at once, and those released unseen may be either or closed. */
    uint64_t by_notify_lo = args_stored + (uint64_t)atomic_load(&w_next_ok);
    uint64_t by_notify_hi = by_notify_lo + (uint64_t)atomic_load(&w_snap_ok) + (uint64_t)wun;

    fprintf(stderr,
            "# seed %llu: sent %llu, delivered %llu, dropped %llu, lost %llu, dup %llu, "
            "reordered %llu, to-next-owner %llu\n",
            (unsigned long long)seed, (unsigned long long)sent,
            (unsigned long long)(delivered + (uint64_t)wok), (unsigned long long)dropped,
            (unsigned long long)lost, (unsigned long long)dup, (unsigned long long)reorder,
            (unsigned long long)(misrouted + (uint64_t)atomic_load(&w_misrouted)));
    fprintf(stderr,
            "# churn: %.1f s producing (%.1f s in all); %llu accepted, %llu stale-rejected; "
            "%ld re-registrations; subscriptions %llu (%ld epoch, %ld churn, %ld port; %ld "
            "EBADH), %llu args received, %llu exact; waits %ld (%ld blocking, %ld waker, %ld "
            "port): %ld ok, %ld timed out, %ld cancelled, %ld closed, %ld released unseen; "
            "%llu port dispatches, %llu port sub callbacks; sum of notify returns %llu in "
            "[%llu, %llu]\n",
            (double)(t_produced - t0) / 1e9, (double)(t_end - t0) / 1e9,
            (unsigned long long)accepted, (unsigned long long)rejected, atomic_load(&reregs),
            (unsigned long long)nsubs, atomic_load(&subs_made[SUB_EPOCH]),
            atomic_load(&subs_made[SUB_CHURN]), atomic_load(&subs_made[SUB_PORT]),
            atomic_load(&subs_ebadh), (unsigned long long)delivered,
            (unsigned long long)exact_subs, atomic_load(&w_started), atomic_load(&w_blocking),
            atomic_load(&w_user), atomic_load(&w_port), wok, wto, wca, wcl, wun,
            (unsigned long long)p_dispatches, (unsigned long long)p_sub_calls,
            (unsigned long long)rc_sum, (unsigned long long)by_notify_lo,
            (unsigned long long)by_notify_hi);

    cr_assert_eq(misrouted, 0, "%llu args reached a subscription of another handle or epoch",
                 (unsigned long long)misrouted);
    cr_assert_eq(atomic_load(&w_misrouted), 0, "%ld waits completed with another handle's arg",
                 atomic_load(&w_misrouted));
    cr_assert_eq(dup, 0, "%llu duplicated args", (unsigned long long)dup);
    cr_assert_eq(reorder, 0, "%llu args out of a producer's order", (unsigned long long)reorder);
    cr_assert_eq(excess, 0, "%llu args received or dropped beyond what was sent",
                 (unsigned long long)excess);
    cr_assert_eq(lost, 0, "%llu args lost beyond the counted drops", (unsigned long long)lost);
    cr_assert_eq(atomic_load(&w_waker_bad), 0, "%ld waits whose waker ran a wrong number of times",
                 atomic_load(&w_waker_bad));
    cr_assert_eq(nsubs, (uint64_t)(atomic_load(&subs_made[SUB_EPOCH]) +
                                   atomic_load(&subs_made[SUB_CHURN]) +
                                   atomic_load(&subs_made[SUB_PORT])));

    /* The queue's own counters. */
    cr_assert_eq(st.notifies, accepted, "stats: %llu notifies, %llu accepted",
                 (unsigned long long)st.notifies, (unsigned long long)accepted);
    cr_assert_geq(st.drops, dropped); /* + drops after a closing reader's last look */
    cr_assert_eq((long)st.waits_timed_out, wto);
    cr_assert_geq((long)st.waits_completed, wok);
    cr_assert_geq((long)st.waits_closed, wcl);
    cr_assert_geq((long)st.waits_cancelled, wca);
    cr_assert_eq((long)(st.waits_completed - (uint64_t)wok + st.waits_closed - (uint64_t)wcl +
                        st.waits_cancelled - (uint64_t)wca),
                 wun, "stats: waits the test did not see end: %lld, unseen %ld",
                 (long long)(st.waits_completed - (uint64_t)wok + st.waits_closed -
                             (uint64_t)wcl + st.waits_cancelled - (uint64_t)wca),
                 wun);
    cr_assert_eq((long)(st.waits_completed + st.waits_closed + st.waits_cancelled +
                        st.waits_timed_out),
                 atomic_load(&w_started));
    cr_assert(rc_sum >= by_notify_lo && rc_sum <= by_notify_hi,
              "sum of nq_notify returns %llu outside [%llu, %llu]", (unsigned long long)rc_sum,
              (unsigned long long)by_notify_lo, (unsigned long long)by_notify_hi);
    cr_assert_eq(st.live_handles, 0);
    cr_assert_eq(st.live_subs, 0);
    cr_assert_eq(st.live_waits, 0);
    cr_assert_eq(st.waits_pending, 0);
    /* Every wait and subscription gave its bytes back: what remains are the
     * handle slots and their subscriber arrays, kept for reuse. */
    size_t kept = 0;
    for (uint32_t k = 0; k < q->used; k++)
        if (nq__slot_cold(q, k)->subs_cap >= 2) /* the first one is in place */
            kept += (size_t)nq__slot_cold(q, k)->subs_cap * sizeof(nq_sub_t *);
    /* Slots come in chunks, charged whole (hot + cold parts, rounded up to
     * a cache line) when the chunk's first slot is first used. */
    for (uint32_t c = 0; c * NQ__CHUNK_SLOTS < q->used; c++) {
        uint32_t n = q->cfg.max_handles - c * NQ__CHUNK_SLOTS;
        n = n > NQ__CHUNK_SLOTS ? NQ__CHUNK_SLOTS : n;
        size_t b = (size_t)n * (sizeof(nq__hslot_t) + sizeof(nq__hcold_t));
        kept += (b + NQ__CACHELINE - 1) & ~(size_t)(NQ__CACHELINE - 1);
    }
    cr_assert_eq(st.bytes_held, st0.bytes_held + kept,
                 "bytes held %zu at the end, %zu at the start + %zu kept by %u slots",
                 st.bytes_held, st0.bytes_held, kept, q->used);
    cr_assert_gt(dropped, 0, "nothing was dropped: the overflow paths were not exercised");
    cr_assert_gt(rejected, 0, "no notify met a stale handle: the churn did not overlap");
    cr_assert_gt(exact_subs, 0);
    free(keys);
    nq_queue_free(q);
}
