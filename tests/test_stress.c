/* Criterion suite "stress": the queue under load, with exact accounting.
 *
 * 4 producers notify 64 handles (>= 2M notifies, arg = producer << 40 |
 * handle << 32 | per-producer sequence); each handle has 8 subscriptions of
 * capacities 1, 16, 256, 4096, each with both overflow policies. Two consumer
 * threads own half the subscriptions each and are driven only by the
 * subscriptions' wakers (each waker queues the subscription's token on its
 * consumer's nq_evq); they drain with nq_sub_recv_batch or nq_sub_recv.
 * Besides: a thread blocked in nq_sub_recv on one more subscription, two
 * threads running check-then-wait loops with nq_wait, and a loop thread that
 * owns a port, polls its fd and calls nq_port_dispatch only when the fd is
 * readable or a deadline is due, keeps port waits (some with timeouts) armed
 * on 16 handles by re-arming them from their callbacks, and drains 8 port
 * subscriptions partly per call (level-triggered).
 *
 * Checked exactly: per subscription delivered + dropped == sent to its handle;
 * every arg names the subscription's handle; per producer, sequences strictly
 * increase (no duplicate, order kept); no waker is lost (once producers are
 * done and the consumers' queues are drained, every subscription is empty);
 * no blocking receiver or nq_wait misses a wakeup (10 s timeouts never fire:
 * the main thread's final notify to every handle ends them); every port wait
 * started gets exactly one callback (each wait carries its own tag); port
 * timeouts are never early; eventfd writes never exceed dispatches + 1;
 * queue-wide stats agree. Counts / 10 under ThreadSanitizer.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nq.h"
#include "nqtest.h"

#define MS (int64_t)1000000
#define SEC (int64_t)1000000000
#define STALL (10 * SEC) /* no wait in this test may take this long */

#define PRODUCERS 4
#define FINAL_ID PRODUCERS /* the main thread's last notify to every handle */
#define HANDLES 64
#define SUBS_PER_HANDLE 8
#define NSUBS (HANDLES * SUBS_PER_HANDLE)
#define PER_PRODUCER SCALE(1 << 22) /* 4 x 4194304 = 16.8M notifies (>= 2M); ~10 s */
#define PORT_WAIT_HANDLES 16        /* handles [0, 16) */
#define PORT_SUB_FIRST 16           /* handles [16, 24): one port sub each */
#define PORT_SUBS 8
#define BLOCKING_HANDLE 24 /* one more subscription, on a blocked receiver */
#define WAITERS 2

#define ARG(id, h, seq) ((int64_t)(((uint64_t)(id) << 40) | ((uint64_t)(h) << 32) | (uint64_t)(seq)))
#define ARG_ID(a) ((int)((uint64_t)(a) >> 40))
#define ARG_H(a) ((int)(((uint64_t)(a) >> 32) & 0xff))
#define ARG_SEQ(a) ((uint64_t)(a) & 0xffffffffu)

static const uint32_t capacities[4] = {1, 16, 256, 4096};

/* --- shared state --------------------------------------------------------
 * Written before the threads start or by one owner thread; read by the main
 * thread after joining. Flags between threads are atomics. */
static nq_queue_t *q;
static nq_handle_t handles[HANDLES];
static uint64_t sent[PRODUCERS][HANDLES]; /* by each producer alone */
static atomic_llong errors;               /* worker threads count; main asserts */
static char first_error[256];
static atomic_flag first_error_taken = ATOMIC_FLAG_INIT;

/* Published by the main thread once every producer has been joined:
 * expected[h] = notifies h will have had in all, the final one included.
 * Then the final notifies go out, then final_done. */
static uint64_t expected[HANDLES];
static atomic_int expected_ready;
static atomic_int waiters_stop;
static atomic_int final_done;
static atomic_int loop_ready; /* the loop thread's subscriptions and waits exist */

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...) {
    if (!atomic_flag_test_and_set(&first_error_taken)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(first_error, sizeof(first_error), fmt, ap);
        va_end(ap);
    }
    atomic_fetch_add(&errors, 1);
}

/* Per-subscription check, owned by the one thread that receives on it. */
struct sub_check {
    int h;
    int oldest; /* NQ_DROP_OLDEST: the final notify is always kept */
    uint64_t delivered;
    uint64_t last_seq[PRODUCERS + 1];
    uint64_t bad_order, bad_arg;
    int complete;
};

static void take(struct sub_check *c, const int64_t *args, int n) {
    for (int k = 0; k < n; k++) {
        int id = ARG_ID(args[k]);
        uint64_t seq = ARG_SEQ(args[k]);
        if (id < 0 || id > FINAL_ID || ARG_H(args[k]) != c->h || seq == 0) {
            c->bad_arg++;
            continue;
        }
        if (seq <= c->last_seq[id])
            c->bad_order++; /* a duplicate, or out of per-producer order */
        c->last_seq[id] = seq;
        c->delivered++;
    }
}

/* --- producers -------------------------------------------------------------- */

static void *producer(void *arg) {
    int p = (int)(intptr_t)arg;
    uint32_t x = 0x9e3779b9u * (uint32_t)(p + 1);
    for (uint64_t seq = 1; seq <= (uint64_t)PER_PRODUCER; seq++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        int h = (int)(x % HANDLES);
        int rc = nq_notify(q, handles[h], ARG(p, h, seq));
        if (rc < 0)
            fail("producer: nq_notify returned %d (handle %d)", rc, h);
        sent[p][h]++;
    }
    return NULL;
}

/* --- consumers: driven by the subscriptions' wakers -------------------------- */

struct consumer {
    int id;
    nq_evq_t *ready;
    int nsubs;
    nq_sub_t *subs[NSUBS / 2];
    struct sub_check check[NSUBS / 2];
    uint32_t tokens[NSUBS / 2];
    uint64_t lost_wakes, batches, wakes_seen;
};
static struct consumer consumers[2];

struct wake_ctx {
    nq_evq_t *e;
    uint32_t token;
};
static struct wake_ctx wake_ctx[NSUBS];

static void sub_wake(void *ctx) {
    struct wake_ctx *w = ctx;
    if (nq_evq_notify(w->e, w->token) != 0)
        fail("waker: nq_evq_notify failed (token %u)", w->token);
}

/* Drains subscription k of consumer c until it is empty (so its next
 * empty -> non-empty transition calls the waker again). Returns how many. */
static uint64_t drain(struct consumer *c, int k) {
    nq_sub_t *s = c->subs[k];
    uint64_t got = 0;
    if (k % 2) {
        int64_t buf[128];
        int n;
        while ((n = nq_sub_recv_batch(s, buf, 128)) > 0) {
            take(&c->check[k], buf, n);
            got += (uint64_t)n;
            c->batches++;
        }
        if (n < 0)
            fail("consumer: recv_batch returned %lld", (long long)n);
    } else {
        int64_t a;
        int rc;
        while ((rc = nq_sub_recv(s, 0, &a)) == 0) {
            take(&c->check[k], &a, 1);
            got++;
        }
        if (rc != NQ_ETIMEDOUT)
            fail("consumer: nq_sub_recv(0) returned %lld", (long long)rc);
    }
    return got;
}

static void *consumer(void *arg) {
    struct consumer *c = arg;
    uint32_t toks[64];
    int64_t idle_since = now_ns();
    for (;;) {
        if (atomic_load(&final_done)) {
            /* Every notify (the final ones too) has returned, so every waker
             * has run: drain what they queued, and then no subscription may
             * hold anything, or a wake-up was lost. */
            size_t n;
            while ((n = nq_evq_poll(c->ready, toks, 64)) > 0) {
                c->wakes_seen += n;
                for (size_t i = 0; i < n; i++)
                    drain(c, (int)toks[i]);
            }
            for (int k = 0; k < c->nsubs; k++) {
                if (drain(c, k) > 0)
                    c->lost_wakes++;
                struct sub_check *ck = &c->check[k];
                uint64_t dropped = nq_sub_dropped(c->subs[k]);
                ck->complete = ck->delivered + dropped == expected[ck->h];
            }
            return NULL;
        }
        int n = nq_evq_wait(c->ready, toks, 64, 50 * MS);
        if (n == NQ_ETIMEDOUT) {
            if (now_ns() - idle_since > STALL && !atomic_load(&expected_ready))
                fail("consumer %d: no wake-up for 10 s while producers ran", c->id);
            continue;
        }
        if (n < 0) {
            fail("consumer: nq_evq_wait returned %lld", (long long)n);
            return NULL;
        }
        idle_since = now_ns();
        c->wakes_seen += (uint64_t)n;
        for (int i = 0; i < n; i++)
            drain(c, (int)toks[i]);
    }
}

/* --- a thread blocked in nq_sub_recv ---------------------------------------- */

static nq_sub_t *blocking_sub;
static struct sub_check blocking_check;
static uint64_t blocking_recvs;

static void *blocking_receiver(void *arg) {
    (void)arg;
    struct sub_check *ck = &blocking_check;
    for (;;) {
        int64_t a;
        int rc = nq_sub_recv(blocking_sub, STALL, &a);
        if (rc == 0) {
            take(ck, &a, 1);
            blocking_recvs++;
        } else {
            fail("blocking receiver: nq_sub_recv returned %s after %llu received (lost "
                 "wake-up?)",
                 nq_err_name(rc), (unsigned long long)ck->delivered);
            return NULL;
        }
        /* Published before the final notifies: the final notify for this
         * handle always comes after, and ends the last block. */
        if (atomic_load(&expected_ready) &&
            ck->delivered + nq_sub_dropped(blocking_sub) == expected[BLOCKING_HANDLE]) {
            ck->complete = 1;
            return NULL;
        }
    }
}

/* --- check-then-wait with nq_wait --------------------------------------------- */

static atomic_llong waits_ok;

static void *waiter(void *arg) {
    int w = (int)(intptr_t)arg;
    for (unsigned i = 0;; i++) {
        int hi = (int)((i * 7 + (unsigned)w * 31) % HANDLES);
        nq_handle_t h = handles[hi];
        uint64_t snap;
        if (nq_seq(q, h, &snap) != 0) {
            fail("waiter: nq_seq failed");
            return NULL;
        }
        /* Read after the snapshot: if it is still 0, the main thread's final
         * notify to h comes after the snapshot, so the wait below ends. */
        if (atomic_load(&waiters_stop))
            return NULL;
        int64_t a = 0;
        int rc = nq_wait(q, h, snap, STALL, &a);
        if (rc != 0) {
            fail("waiter: nq_wait returned %s on handle %d (a lost wake-up?)", nq_err_name(rc), hi);
            return NULL;
        }
        if (ARG_H(a) != hi || ARG_ID(a) > FINAL_ID)
            fail("waiter: arg %lld does not belong to handle %d", (long long)a, hi);
        atomic_fetch_add_explicit(&waits_ok, 1, memory_order_relaxed);
        uint64_t after;
        if (nq_seq(q, h, &after) != 0 || after <= snap)
            fail("waiter: completed with no notification after %llu", (unsigned long long)snap);
    }
}

/* --- the loop thread ------------------------------------------------------------ */

/* Each port wait gets a tag (slot index | generation << 16) as its data, so a
 * second callback, or one for a wait already recycled, is caught at once, and
 * a lost one shows at the end as a slot still in use. */
#define WSLOTS 256
_Static_assert(sizeof(uintptr_t) >= 8, "the wait tags need 64-bit pointers");
struct wslot {
    uint32_t gen;
    int busy;
    int hi;
    int64_t start;
    int64_t timeout_ms;
};

struct loop {
    nq_port_t *p;
    struct wslot slot[WSLOTS];
    int free_slots[WSLOTS];
    int nfree;
    int rearm;
    uint64_t started, called, by_status[4], dispatches, idle_polls;
    uint64_t seqrng;
    /* port subscriptions */
    nq_sub_t *psub[PORT_SUBS];
    struct sub_check pcheck[PORT_SUBS];
    uint64_t psub_calls;
    uint64_t max_writes_over;
};
static struct loop L;

static void port_wait_cb(void *data, int status, int64_t arg);

static void arm(int hi) {
    if (L.nfree == 0) {
        fail("loop: no free wait slot (callbacks lost?)");
        return;
    }
    int i = L.free_slots[--L.nfree];
    struct wslot *s = &L.slot[i];
    s->gen++;
    s->busy = 1;
    s->hi = hi;
    L.seqrng = L.seqrng * 6364136223846793005ull + 1442695040888963407ull;
    uint32_t r = (uint32_t)(L.seqrng >> 33);
    s->timeout_ms = r % 3 == 0 ? (int64_t)(r / 3 % 3) : -1; /* 0..2 ms, or none */
    uint64_t after = NQ_SEQ_NEXT;
    if (r & 8) { /* the check-then-wait form: a snapshot */
        if (nq_seq(q, handles[hi], &after) != 0)
            fail("loop: nq_seq failed");
    }
    s->start = now_ns();
    void *tag = (void *)((uintptr_t)i | ((uintptr_t)s->gen << 16)); /* 64-bit pointers */
    int rc = nq_port_wait(L.p, q, handles[hi], after, s->timeout_ms, port_wait_cb, tag, NULL);
    if (rc != 0) {
        fail("loop: nq_port_wait returned %lld", (long long)rc);
        s->busy = 0;
        L.free_slots[L.nfree++] = i;
        return;
    }
    L.started++;
}

static void port_wait_cb(void *data, int status, int64_t arg) {
    uintptr_t tag = (uintptr_t)data;
    int i = (int)(tag & 0xffff);
    if (i >= WSLOTS || !L.slot[i].busy || L.slot[i].gen != (uint32_t)(tag >> 16)) {
        fail("loop: a second callback for port wait slot %d (gen %llu)", i,
             (unsigned long long)(tag >> 16));
        return;
    }
    struct wslot *s = &L.slot[i];
    L.called++;
    s->busy = 0;
    L.free_slots[L.nfree++] = i;
    switch (status) {
    case 0:
        L.by_status[0]++;
        if (ARG_H(arg) != s->hi || ARG_ID(arg) > FINAL_ID)
            fail("loop: port wait on handle %d completed with arg %lld", s->hi, (long long)arg);
        break;
    case NQ_ETIMEDOUT:
        L.by_status[1]++;
        if (s->timeout_ms < 0)
            fail("loop: a port wait without timeout timed out");
        else if (now_ns() - s->start < s->timeout_ms * MS)
            fail("loop: a %lld ms port wait timed out after %lld ns", (long long)s->timeout_ms,
                 (long long)(now_ns() - s->start));
        break;
    case NQ_ECANCELED:
        L.by_status[2]++;
        if (L.rearm)
            fail("loop: NQ_ECANCELED before nq_port_free");
        break;
    default:
        L.by_status[3]++;
        fail("loop: port wait status %lld", (long long)status);
    }
    if (L.rearm)
        arm(s->hi); /* a new port wait from inside a callback */
}

static void port_sub_cb(nq_sub_t *sub, void *data) {
    int k = (int)(intptr_t)data;
    L.psub_calls++;
    int64_t buf[32];
    int n = nq_sub_recv_batch(sub, buf, 32); /* at most 32 a call: level-triggered */
    if (n < 0)
        fail("loop: port sub recv_batch returned %lld", (long long)n);
    else
        take(&L.pcheck[k], buf, n);
}

static int port_subs_complete(void) {
    int all = 1;
    for (int k = 0; k < PORT_SUBS; k++) {
        struct sub_check *ck = &L.pcheck[k];
        ck->complete = ck->delivered + nq_sub_dropped(L.psub[k]) == expected[ck->h];
        all &= ck->complete;
    }
    return all;
}

static void *loop_thread(void *arg) {
    (void)arg;
    if (nq_port_new(&L.p) != 0) {
        fail("loop: nq_port_new failed");
        atomic_store(&loop_ready, 1);
        return NULL;
    }
    for (int i = 0; i < WSLOTS; i++)
        L.free_slots[i] = WSLOTS - 1 - i;
    L.nfree = WSLOTS;
    L.rearm = 1;
    L.seqrng = 42;
    static const uint32_t pcaps[PORT_SUBS] = {1, 16, 256, 4096, 1, 16, 256, 4096};
    for (int k = 0; k < PORT_SUBS; k++) {
        nq_sub_opts_t o;
        memset(&o, 0, sizeof(o));
        o.capacity = pcaps[k];
        o.overflow = k < 4 ? NQ_DROP_NEWEST : NQ_DROP_OLDEST;
        L.pcheck[k].h = PORT_SUB_FIRST + k;
        if (nq_port_subscribe(L.p, q, handles[PORT_SUB_FIRST + k], &o, port_sub_cb,
                              (void *)(intptr_t)k, &L.psub[k]) != 0)
            fail("loop: nq_port_subscribe failed");
    }
    for (int hi = 0; hi < PORT_WAIT_HANDLES; hi++)
        for (int j = 0; j < 3; j++)
            arm(hi);
    atomic_store(&loop_ready, 1);
    int64_t last_cb = now_ns();
    uint64_t last_called = 0, last_sub_calls = 0;
    int fd = nq_port_fd(L.p);
    for (unsigned it = 0;; it++) {
        int64_t tm = nq_port_timeout_ms(L.p);
        int wait_ms = tm < 0 || tm > 100 ? 100 : (int)tm;
        struct pollfd pf = {fd, POLLIN, 0};
        int pr = poll(&pf, 1, wait_ms);
        if (pr < 0 && errno != EINTR) {
            fail("loop: poll failed");
            break;
        }
        /* Dispatch only as a loop would: on readiness, or a deadline due. */
        if (pr == 1 || (tm >= 0 && tm <= wait_ms)) {
            int ran = nq_port_dispatch(L.p, it % 2 ? 0 : 16);
            if (ran < 0)
                fail("loop: nq_port_dispatch returned %lld", (long long)ran);
            L.dispatches++;
        } else {
            L.idle_polls++;
        }
        nq_port_stats_t st;
        nq_port_stats(L.p, &st);
        if (st.efd_writes > st.dispatches + 1)
            fail("loop: %llu eventfd writes in %llu dispatches", (unsigned long long)st.efd_writes,
                 (unsigned long long)st.dispatches);
        if (L.called != last_called || L.psub_calls != last_sub_calls) {
            last_called = L.called;
            last_sub_calls = L.psub_calls;
            last_cb = now_ns();
        }
        if (atomic_load(&final_done) && port_subs_complete())
            break;
        if (now_ns() - last_cb > STALL) {
            fail("loop: no callback for 10 s (a lost eventfd wake-up?)");
            break;
        }
    }
    /* Stop re-arming; what is still pending gets NQ_ECANCELED from free. */
    L.rearm = 0;
    nq_port_free(L.p);
    int busy = 0;
    for (int i = 0; i < WSLOTS; i++)
        busy += L.slot[i].busy;
    if (busy)
        fail("loop: %d port waits never called back (of %llu started)", busy,
             (unsigned long long)L.started);
    return NULL;
}

/* --- the test --------------------------------------------------------------------- */

Test(stress, producers_consumers_waits_and_ports_with_exact_accounting, .timeout = 180) {
    int64_t t0 = now_ns();
    cr_assert_eq(nq_queue_new(NULL, &q), 0);
    for (int h = 0; h < HANDLES; h++) {
        char hint[16];
        snprintf(hint, sizeof(hint), "h%d", h);
        cr_assert_eq(nq_register(q, hint, &handles[h]), 0);
    }
    for (int c = 0; c < 2; c++) {
        consumers[c].id = c;
        cr_assert_eq(nq_evq_new(NSUBS / 2, &consumers[c].ready), 0);
    }
    for (int si = 0; si < NSUBS; si++) {
        int h = si / SUBS_PER_HANDLE, k = si % SUBS_PER_HANDLE;
        struct consumer *c = &consumers[si % 2];
        int local = c->nsubs++;
        wake_ctx[si].e = c->ready;
        wake_ctx[si].token = (uint32_t)local;
        nq_sub_opts_t o;
        memset(&o, 0, sizeof(o));
        o.capacity = capacities[k / 2];
        o.overflow = k % 2 ? NQ_DROP_OLDEST : NQ_DROP_NEWEST;
        o.waker.wake = sub_wake;
        o.waker.ctx = &wake_ctx[si];
        c->check[local].h = h;
        c->check[local].oldest = o.overflow == NQ_DROP_OLDEST;
        cr_assert_eq(nq_subscribe(q, handles[h], &o, &c->subs[local]), 0);
    }
    nq_sub_opts_t bo;
    memset(&bo, 0, sizeof(bo));
    bo.capacity = 32;
    bo.overflow = NQ_DROP_NEWEST;
    cr_assert_eq(nq_subscribe(q, handles[BLOCKING_HANDLE], &bo, &blocking_sub), 0);
    blocking_check.h = BLOCKING_HANDLE;

    pthread_t prod[PRODUCERS], cons[2], wt[WAITERS], lt, bt;
    cr_assert_eq(pthread_create(&lt, NULL, loop_thread, NULL), 0);
    while (!atomic_load(&loop_ready)) /* its subscriptions must see every notify */
        sched_yield();
    cr_assert_eq(pthread_create(&bt, NULL, blocking_receiver, NULL), 0);
    for (int c = 0; c < 2; c++)
        cr_assert_eq(pthread_create(&cons[c], NULL, consumer, &consumers[c]), 0);
    for (int w = 0; w < WAITERS; w++)
        cr_assert_eq(pthread_create(&wt[w], NULL, waiter, (void *)(intptr_t)w), 0);
    for (int p = 0; p < PRODUCERS; p++)
        cr_assert_eq(pthread_create(&prod[p], NULL, producer, (void *)(intptr_t)p), 0);
    for (int p = 0; p < PRODUCERS; p++)
        cr_assert_eq(pthread_join(prod[p], NULL), 0);
    int64_t t_produced = now_ns();

    /* The end: publish what every handle will have had, then one final
     * notify to each handle (it ends every blocked wait and receive), then
     * say so. */
    for (int h = 0; h < HANDLES; h++) {
        expected[h] = 1;
        for (int p = 0; p < PRODUCERS; p++)
            expected[h] += sent[p][h];
    }
    atomic_store(&expected_ready, 1);
    atomic_store(&waiters_stop, 1);
    for (int h = 0; h < HANDLES; h++)
        cr_assert_geq(nq_notify(q, handles[h], ARG(FINAL_ID, h, 1)), 0);
    atomic_store(&final_done, 1);

    for (int c = 0; c < 2; c++)
        cr_assert_eq(pthread_join(cons[c], NULL), 0);
    for (int w = 0; w < WAITERS; w++)
        cr_assert_eq(pthread_join(wt[w], NULL), 0);
    cr_assert_eq(pthread_join(bt, NULL), 0);
    cr_assert_eq(pthread_join(lt, NULL), 0);
    int64_t t_end = now_ns();

    cr_assert_eq(atomic_load(&errors), 0, "%lld errors in worker threads; the first: %s",
                 (long long)atomic_load(&errors), first_error);

    /* Exact accounting, subscription by subscription. */
    uint64_t total_sent = 0, total_delivered = 0, total_dropped = 0, lost_wakes = 0;
    for (int c = 0; c < 2; c++) {
        struct consumer *cs = &consumers[c];
        lost_wakes += cs->lost_wakes;
        for (int k = 0; k < cs->nsubs; k++) {
            struct sub_check *ck = &cs->check[k];
            uint64_t dropped = nq_sub_dropped(cs->subs[k]);
            cr_assert_eq(ck->bad_arg, 0, "sub (handle %d): %llu args of another handle", ck->h,
                         (unsigned long long)ck->bad_arg);
            cr_assert_eq(ck->bad_order, 0, "sub (handle %d): %llu args duplicated or out of order",
                         ck->h, (unsigned long long)ck->bad_order);
            cr_assert_eq(ck->delivered + dropped, expected[ck->h],
                         "sub (handle %d): delivered %llu + dropped %llu != sent %llu", ck->h,
                         (unsigned long long)ck->delivered, (unsigned long long)dropped,
                         (unsigned long long)expected[ck->h]);
            cr_assert(ck->complete);
            if (ck->oldest) /* nothing follows the final notify: DROP_OLDEST keeps it */
                cr_assert_eq(ck->last_seq[FINAL_ID], 1, "sub (handle %d) lost the final notify",
                             ck->h);
            total_sent += expected[ck->h];
            total_delivered += ck->delivered;
            total_dropped += dropped;
        }
    }
    cr_assert_eq(lost_wakes, 0, "%llu subscriptions held args that no waker announced",
                 (unsigned long long)lost_wakes);
    for (int k = 0; k < PORT_SUBS; k++) {
        struct sub_check *ck = &L.pcheck[k];
        uint64_t dropped = nq_sub_dropped(L.psub[k]);
        cr_assert_eq(ck->bad_arg + ck->bad_order, 0, "port sub %d: bad args or order", k);
        cr_assert_eq(ck->delivered + dropped, expected[ck->h],
                     "port sub %d: delivered %llu + dropped %llu != sent %llu", k,
                     (unsigned long long)ck->delivered, (unsigned long long)dropped,
                     (unsigned long long)expected[ck->h]);
        total_sent += expected[ck->h];
        total_delivered += ck->delivered;
        total_dropped += dropped;
    }
    {
        struct sub_check *ck = &blocking_check;
        uint64_t dropped = nq_sub_dropped(blocking_sub);
        cr_assert_eq(ck->bad_arg + ck->bad_order, 0);
        cr_assert_eq(ck->delivered + dropped, expected[BLOCKING_HANDLE]);
        cr_assert(ck->complete);
        total_sent += expected[BLOCKING_HANDLE];
        total_delivered += ck->delivered;
        total_dropped += dropped;
    }
    /* Big subscriptions must have kept pace; not every one dropped. */
    cr_assert_lt(total_dropped, total_sent);
    cr_assert_gt(total_dropped, 0, "nothing was dropped: the overflow paths were not exercised");

    /* Port waits: each called back exactly once (checked per wait above). */
    cr_assert_eq(L.called, L.started, "port waits started %llu, called back %llu",
                 (unsigned long long)L.started, (unsigned long long)L.called);
    cr_assert_gt(L.by_status[0], 0, "no port wait was completed by a notify");
    cr_assert_gt(L.by_status[1], 0, "no port wait timed out");
    cr_assert_gt(atomic_load(&waits_ok), 0);

    nq_stats_t st;
    cr_assert_eq(nq_queue_stats(q, &st), 0);
    uint64_t notifies = (uint64_t)PRODUCERS * (uint64_t)PER_PRODUCER + HANDLES;
    cr_assert_eq(st.notifies, notifies);
    cr_assert_eq(st.drops, total_dropped, "queue drops %llu, subscriptions %llu",
                 (unsigned long long)st.drops, (unsigned long long)total_dropped);
    cr_assert_eq(st.waits_pending, 0);
    cr_assert_eq(st.live_waits, 0);

    fprintf(stderr,
            "stress: %llu notifies in %.1f s (%.1f s in all); subscriptions: %llu sent, %llu "
            "delivered, %llu dropped; consumers woken %llu+%llu times, 0 lost; blocking recv "
            "%llu; nq_wait %lld ok, 0 lost; port: %llu waits (%llu notified, %llu timed out, "
            "%llu cancelled at free), each called back once, %llu sub callbacks, %llu "
            "dispatches\n",
            (unsigned long long)notifies, (double)(t_produced - t0) / 1e9,
            (double)(t_end - t0) / 1e9, (unsigned long long)total_sent,
            (unsigned long long)total_delivered, (unsigned long long)total_dropped,
            (unsigned long long)consumers[0].wakes_seen,
            (unsigned long long)consumers[1].wakes_seen, (unsigned long long)blocking_recvs,
            (long long)atomic_load(&waits_ok), (unsigned long long)L.started,
            (unsigned long long)L.by_status[0], (unsigned long long)L.by_status[1],
            (unsigned long long)L.by_status[2], (unsigned long long)L.psub_calls,
            (unsigned long long)L.dispatches);

    for (int c = 0; c < 2; c++) {
        for (int k = 0; k < consumers[c].nsubs; k++)
            nq_sub_close(consumers[c].subs[k]);
        nq_evq_free(consumers[c].ready);
    }
    for (int k = 0; k < PORT_SUBS; k++)
        nq_sub_close(L.psub[k]); /* held subs outlive their port: close them here */
    nq_sub_close(blocking_sub);
    nq_queue_free(q);
}
