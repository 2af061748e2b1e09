/* Criterion suite "sub": bounded subscriptions.
 *
 * Covers the exact capacity (at most `capacity` unread args, whatever the
 * ring's size), both overflow policies against a reference model (drop the
 * newest arg, or overwrite the oldest unread one), the exact drop count, the
 * capacity-1 DROP_OLDEST "watch", try_recv / recv_batch / a blocking recv
 * whose timeouts are never early and which a notify or an unregister from
 * another thread wakes, what a subscription delivers after its handle is
 * unregistered or its queue freed (what it holds, then NQ_ECLOSED), the waker
 * contract (once per empty -> non-empty transition and once on close, on the
 * notifying thread), the single-blocked-receiver rule (NQ_EBUSY), argument
 * checks (capacity 0 = the queue default, above max_capacity, a bad overflow
 * enum) and per-producer FIFO order with exact accounting under concurrent
 * producers and a concurrent consumer.
 */
#include <criterion/criterion.h>
#include <errno.h>
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

#define MS (int64_t)1000000
#define SEC (int64_t)1000000000
#define SLACK (2 * SEC) /* generous upper bound on any timeout's lateness */

/* --- helpers ------------------------------------------------------------ */

static void sleep_ns(int64_t ns) {
    struct timespec ts = {(time_t)(ns / SEC), (long)(ns % SEC)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static nq_queue_t *new_queue(const nq_config_t *cfg) {
    nq_queue_t *q = NULL;
    int rc = nq_queue_new(cfg, &q);
    cr_assert_eq(rc, 0, "nq_queue_new: %s", nq_err_name(rc));
    cr_assert_not_null(q);
    return q;
}

static nq_handle_t reg(nq_queue_t *q) {
    nq_handle_t h = 0;
    int rc = nq_register(q, NULL, &h);
    cr_assert_eq(rc, 0, "nq_register: %s", nq_err_name(rc));
    return h;
}

static nq_stats_t stats(nq_queue_t *q) {
    nq_stats_t st;
    cr_assert_eq(nq_queue_stats(q, &st), 0);
    return st;
}

static nq_sub_t *sub(nq_queue_t *q, nq_handle_t h, uint32_t cap, nq_overflow_t ov) {
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = cap;
    o.overflow = ov;
    o.debug_hint = "test";
    nq_sub_t *s = NULL;
    int rc = nq_subscribe(q, h, &o, &s);
    cr_assert_eq(rc, 0, "nq_subscribe(cap %u): %s", cap, nq_err_name(rc));
    cr_assert_not_null(s);
    return s;
}

typedef struct counter {
    atomic_int calls;
    atomic_int tid;
} counter_t;

static void count_wake(void *ctx) {
    counter_t *c = ctx;
    atomic_store(&c->tid, cur_tid());
    atomic_fetch_add(&c->calls, 1);
}

/* A thread that sleeps, then notifies once (or unregisters). */
struct delayed {
    nq_queue_t *q;
    nq_handle_t h;
    int64_t delay_ns, arg;
    int unregister;
    atomic_int rc;
    atomic_int tid;
};

static void *delayed_run(void *a) {
    struct delayed *d = a;
    atomic_store(&d->tid, cur_tid());
    sleep_ns(d->delay_ns);
    if (d->unregister)
        atomic_store(&d->rc, nq_unregister(d->q, d->h));
    else
        atomic_store(&d->rc, nq_notify(d->q, d->h, d->arg));
    return NULL;
}

static pthread_t start_delayed(struct delayed *d, nq_queue_t *q, nq_handle_t h, int64_t delay,
                               int64_t arg, int unregister) {
    d->q = q;
    d->h = h;
    d->delay_ns = delay;
    d->arg = arg;
    d->unregister = unregister;
    atomic_init(&d->rc, -9999);
    atomic_init(&d->tid, 0);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, delayed_run, d), 0);
    return t;
}

/* A thread blocked in nq_sub_recv. */
struct receiver {
    nq_sub_t *s;
    int64_t timeout;
    int64_t arg;
    int64_t elapsed;
    atomic_int entered;
    atomic_int rc;
};

static void *recv_thread(void *a) {
    struct receiver *r = a;
    atomic_store(&r->entered, 1);
    int64_t t0 = now_ns();
    int64_t arg = -1;
    int rc = nq_sub_recv(r->s, r->timeout, &arg);
    r->elapsed = now_ns() - t0;
    r->arg = arg;
    atomic_store(&r->rc, rc);
    return NULL;
}

static pthread_t start_receiver(struct receiver *r, nq_sub_t *s, int64_t timeout) {
    r->s = s;
    r->timeout = timeout;
    r->arg = -1;
    r->elapsed = 0;
    atomic_init(&r->entered, 0);
    atomic_init(&r->rc, -9999);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, recv_thread, r), 0);
    return t;
}

/* Waits (up to 10 s) until a thread is parked in nq_sub_recv on s: it has
 * claimed the single-receiver flag and announced its sleep on the futex
 * (white-box: the fields of core/sub.h and core/park.h). */
static void wait_until_parked(nq_sub_t *s) {
    int64_t t0 = now_ns();
    while (!(atomic_load(&s->rstate) & NQ__R_BLOCKED) || atomic_load(&s->park.word) == 0) {
        cr_assert_lt(now_ns() - t0, 10 * SEC, "the receiver never blocked in nq_sub_recv");
        sched_yield();
    }
    sleep_ns(5 * MS); /* let it reach futex_wait; harmless if it already has */
}

/* --- capacity and overflow ---------------------------------------------- */

static const uint32_t caps[] = {1, 2, 3, 5, 7, 8, 64, 1000};

Test(sub, capacity_is_exact_with_drop_newest) {
    nq_queue_t *q = new_queue(NULL);
    for (size_t c = 0; c < sizeof(caps) / sizeof(caps[0]); c++) {
        uint32_t cap = caps[c];
        nq_handle_t h = reg(q);
        nq_sub_t *s = sub(q, h, cap, NQ_DROP_NEWEST);
        for (uint32_t i = 1; i <= cap + 5; i++) {
            int rc = nq_notify(q, h, (int64_t)i);
            cr_assert_eq(rc, i <= cap ? 1 : 0, "cap %u, notify %u returned %d", cap, i, rc);
        }
        cr_assert_eq(nq_sub_dropped(s), 5, "cap %u: dropped %llu", cap,
                     (unsigned long long)nq_sub_dropped(s));
        int64_t buf[1100];
        int n = nq_sub_recv_batch(s, buf, sizeof(buf) / sizeof(buf[0]));
        cr_assert_eq(n, (int)cap, "cap %u held %d unread args", cap, n);
        for (int i = 0; i < n; i++)
            cr_assert_eq(buf[i], i + 1, "cap %u: the oldest args are kept, in order", cap);
        int64_t arg = -7;
        cr_assert_eq(nq_sub_try_recv(s, &arg), NQ_EAGAIN);
        cr_assert_eq(arg, -7, "an empty try_recv wrote *arg");
        /* Room again: the next arg is stored, the drop count is kept. */
        cr_assert_eq(nq_notify(q, h, 99), 1);
        cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
        cr_assert_eq(arg, 99);
        cr_assert_eq(nq_sub_dropped(s), 5);
        nq_sub_close(s);
        cr_assert_eq(nq_unregister(q, h), 0);
    }
    nq_stats_t st = stats(q);
    cr_assert_eq(st.drops, 5 * (sizeof(caps) / sizeof(caps[0])),
                 "queue-wide drops %llu", (unsigned long long)st.drops);
    cr_assert_eq(st.live_subs, 0);
    nq_queue_free(q);
}

Test(sub, capacity_is_exact_with_drop_oldest) {
    nq_queue_t *q = new_queue(NULL);
    for (size_t c = 0; c < sizeof(caps) / sizeof(caps[0]); c++) {
        uint32_t cap = caps[c];
        nq_handle_t h = reg(q);
        nq_sub_t *s = sub(q, h, cap, NQ_DROP_OLDEST);
        for (uint32_t i = 1; i <= cap + 5; i++)
            cr_assert_eq(nq_notify(q, h, (int64_t)i), 1, "DROP_OLDEST always stores the new arg");
        cr_assert_eq(nq_sub_dropped(s), 5);
        int64_t buf[1100];
        int n = nq_sub_recv_batch(s, buf, sizeof(buf) / sizeof(buf[0]));
        cr_assert_eq(n, (int)cap, "cap %u held %d unread args", cap, n);
        for (int i = 0; i < n; i++)
            cr_assert_eq(buf[i], i + 6, "cap %u: the newest args are kept, oldest first", cap);
        cr_assert_eq(nq_sub_try_recv(s, NULL), NQ_EAGAIN);
        nq_sub_close(s);
    }
    nq_queue_free(q);
}

Test(sub, notify_counts_only_the_subscriptions_that_stored_the_arg) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    nq_sub_t *a = sub(q, h, 1, NQ_DROP_NEWEST);
    nq_sub_t *b = sub(q, h, 1, NQ_DROP_OLDEST);
    nq_sub_t *c = sub(q, h, 2, NQ_DROP_NEWEST);
    cr_assert_eq(nq_notify(q, h, 1), 3);
    cr_assert_eq(nq_notify(q, h, 2), 2, "a (full, drop newest) did not store it");
    cr_assert_eq(nq_notify(q, h, 3), 1, "only b stores it");
    cr_assert_eq(nq_sub_dropped(a), 2);
    cr_assert_eq(nq_sub_dropped(b), 2);
    cr_assert_eq(nq_sub_dropped(c), 1);
    nq_sub_close(b);
    cr_assert_eq(nq_notify(q, h, 4), 0, "a closed subscription is no receiver");
    nq_stats_t st = stats(q);
    cr_assert_eq(st.drops, 2 + 2 + 1 + 2, "closed subscriptions' drops stay counted");
    cr_assert_eq(st.notifies, 4);
    nq_sub_close(a);
    nq_sub_close(c);
    nq_queue_free(q);
}

/* The ring against a model: a random mix of notifies, try_recv and
 * recv_batch of random sizes, for small capacities (every wrap position) and
 * both policies. Every arg received and every drop is checked. */
struct model {
    uint32_t cap;
    nq_overflow_t ov;
    int64_t buf[64];
    uint32_t head, count;
    uint64_t dropped;
};

static void model_push(struct model *m, int64_t v) {
    if (m->count < m->cap) {
        m->buf[(m->head + m->count) % m->cap] = v;
        m->count++;
    } else if (m->ov == NQ_DROP_NEWEST) {
        m->dropped++;
    } else {
        m->buf[m->head] = v;
        m->head = (m->head + 1) % m->cap;
        m->dropped++;
    }
}

static int model_pop(struct model *m, int64_t *v) {
    if (m->count == 0)
        return 0;
    *v = m->buf[m->head];
    m->head = (m->head + 1) % m->cap;
    m->count--;
    return 1;
}

static uint32_t rnd(uint64_t *x) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return (uint32_t)(*x >> 11);
}

Test(sub, ring_matches_a_model_through_every_wrap) {
    static const uint32_t mcaps[] = {1, 2, 3, 4, 5, 7, 16, 33};
    nq_queue_t *q = new_queue(NULL);
    uint64_t x = 0x9e3779b97f4a7c15ull;
    int64_t next = 1;
    for (size_t c = 0; c < sizeof(mcaps) / sizeof(mcaps[0]); c++) {
        for (int pol = 0; pol < 2; pol++) {
            struct model m;
            memset(&m, 0, sizeof(m));
            m.cap = mcaps[c];
            m.ov = pol ? NQ_DROP_OLDEST : NQ_DROP_NEWEST;
            nq_handle_t h = reg(q);
            nq_sub_t *s = sub(q, h, m.cap, m.ov);
            for (int op = 0; op < SCALE(20000); op++) {
                uint32_t r = rnd(&x) % 8;
                if (r < 4) {
                    uint32_t k = 1 + rnd(&x) % (m.cap + 2);
                    for (uint32_t i = 0; i < k; i++) {
                        uint32_t held = m.count;
                        int rc = nq_notify(q, h, next);
                        cr_assert_eq(rc, (held < m.cap || m.ov == NQ_DROP_OLDEST) ? 1 : 0);
                        model_push(&m, next++);
                    }
                } else if (r < 6) {
                    int64_t got = 0, want = 0;
                    int rc = nq_sub_try_recv(s, &got);
                    if (model_pop(&m, &want)) {
                        cr_assert_eq(rc, 0);
                        cr_assert_eq(got, want, "cap %u %s: got %lld, model %lld", m.cap,
                                     pol ? "oldest" : "newest", (long long)got, (long long)want);
                    } else {
                        cr_assert_eq(rc, NQ_EAGAIN);
                    }
                } else {
                    int64_t got[40];
                    size_t k = 1 + rnd(&x) % 40;
                    int n = nq_sub_recv_batch(s, got, k);
                    int64_t want;
                    int i = 0;
                    while ((size_t)i < k && model_pop(&m, &want)) {
                        cr_assert_lt(i, n, "recv_batch returned %d, the model holds more", n);
                        cr_assert_eq(got[i], want, "cap %u %s batch[%d]", m.cap,
                                     pol ? "oldest" : "newest", i);
                        i++;
                    }
                    cr_assert_eq(n, i, "recv_batch returned %d, the model %d", n, i);
                }
                cr_assert_eq(nq_sub_dropped(s), m.dropped, "cap %u %s: dropped %llu, model %llu",
                             m.cap, pol ? "oldest" : "newest",
                             (unsigned long long)nq_sub_dropped(s),
                             (unsigned long long)m.dropped);
            }
            cr_assert_gt(m.dropped, 0, "the model never overflowed: nothing was tested");
            nq_sub_close(s);
            cr_assert_eq(nq_unregister(q, h), 0);
        }
    }
    nq_queue_free(q);
}

Test(sub, capacity_one_drop_oldest_is_a_watch) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    nq_sub_t *w = sub(q, h, 1, NQ_DROP_OLDEST);
    for (int i = 1; i <= 10; i++)
        cr_assert_eq(nq_notify(q, h, i * 100), 1);
    int64_t arg = 0;
    cr_assert_eq(nq_sub_try_recv(w, &arg), 0);
    cr_assert_eq(arg, 1000, "a watch holds the latest value");
    cr_assert_eq(nq_sub_dropped(w), 9, "and counts the ones skipped");
    cr_assert_eq(nq_sub_try_recv(w, &arg), NQ_EAGAIN);
    nq_notify(q, h, 1100);
    cr_assert_eq(nq_sub_recv(w, 0, &arg), 0);
    cr_assert_eq(arg, 1100);
    cr_assert_eq(nq_sub_dropped(w), 9, "a value read in time is not skipped");
    nq_notify(q, h, 1);
    nq_notify(q, h, 2);
    int64_t b[4];
    cr_assert_eq(nq_sub_recv_batch(w, b, 4), 1);
    cr_assert_eq(b[0], 2);
    cr_assert_eq(nq_sub_dropped(w), 10);
    nq_sub_close(w);
    nq_queue_free(q);
}

/* --- receiving ---------------------------------------------------------- */

Test(sub, recv_batch_bounds_and_order) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    nq_sub_t *s = sub(q, h, 16, NQ_DROP_NEWEST);
    int64_t b[32];
    cr_assert_eq(nq_sub_recv_batch(s, b, 32), 0, "empty and open: 0");
    cr_assert_eq(nq_sub_recv_batch(s, NULL, 4), NQ_EINVAL);
    cr_assert_eq(nq_sub_recv_batch(s, b, 0), NQ_EINVAL);
    cr_assert_eq(nq_sub_recv_batch(NULL, b, 4), NQ_EINVAL);
    for (int i = 0; i < 10; i++)
        nq_notify(q, h, i);
    memset(b, 0xff, sizeof(b));
    cr_assert_eq(nq_sub_recv_batch(s, b, 3), 3);
    cr_assert_eq(b[0], 0);
    cr_assert_eq(b[2], 2);
    cr_assert_eq(b[3], -1, "recv_batch wrote past n");
    cr_assert_eq(nq_sub_recv_batch(s, b, 32), 7);
    for (int i = 0; i < 7; i++)
        cr_assert_eq(b[i], i + 3);
    cr_assert_eq(nq_sub_recv_batch(s, b, 32), 0);
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(sub, recv_takes_what_is_held_without_blocking) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    nq_sub_t *s = sub(q, h, 4, NQ_DROP_NEWEST);
    nq_notify(q, h, 5);
    nq_notify(q, h, 6);
    int64_t arg = 0;
    int64_t t0 = now_ns();
    cr_assert_eq(nq_sub_recv(s, 10 * SEC, &arg), 0);
    cr_assert_eq(arg, 5);
    cr_assert_eq(nq_sub_recv(s, -1, &arg), 0);
    cr_assert_eq(arg, 6);
    cr_assert_lt(now_ns() - t0, 1 * SEC, "recv blocked while args were held");
    cr_assert_eq(nq_sub_recv(s, 0, &arg), NQ_ETIMEDOUT, "timeout 0 on an empty subscription");
    cr_assert_eq(nq_sub_recv(NULL, 0, &arg), NQ_EINVAL);
    cr_assert_eq(nq_sub_try_recv(NULL, &arg), NQ_EINVAL);
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(sub, recv_timeouts_are_never_early, .timeout = 30) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    nq_sub_t *s = sub(q, h, 4, NQ_DROP_OLDEST);
    const int64_t tos[] = {0, 1, 1 * MS, 5 * MS, 20 * MS, 100 * MS, 250 * MS};
    for (size_t i = 0; i < sizeof(tos) / sizeof(tos[0]); i++) {
        int64_t arg = 77;
        int64_t t0 = now_ns();
        int rc = nq_sub_recv(s, tos[i], &arg);
        int64_t el = now_ns() - t0;
        cr_assert_eq(rc, NQ_ETIMEDOUT, "timeout %lld: %s", (long long)tos[i], nq_err_name(rc));
        cr_assert_geq(el, tos[i], "timeout %lld ns returned after %lld ns", (long long)tos[i],
                      (long long)el);
        cr_assert_lt(el, tos[i] + SLACK);
        cr_assert_eq(arg, 77, "a timed-out recv wrote *arg");
    }
    /* The single-receiver flag is released after a timeout. */
    cr_assert_eq(atomic_load(&s->rstate) & NQ__R_BLOCKED, 0);
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(sub, parked_recv_is_woken_by_a_notify_from_another_thread, .timeout = 30) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    nq_sub_t *s = sub(q, h, 4, NQ_DROP_NEWEST);
    const int64_t timeouts[] = {-1, 20 * SEC};
    for (int round = 0; round < 2; round++) {
        struct delayed d;
        int64_t arg = 0;
        int64_t t0 = now_ns();
        pthread_t t = start_delayed(&d, q, h, 100 * MS, 4242 + round, 0);
        int rc = nq_sub_recv(s, timeouts[round], &arg);
        int64_t el = now_ns() - t0;
        cr_assert_eq(rc, 0, "%s", nq_err_name(rc));
        cr_assert_eq(arg, 4242 + round);
        cr_assert_geq(el, 100 * MS, "returned after %lld ns, before the notify", (long long)el);
        cr_assert_lt(el, 100 * MS + SLACK, "the wake-up came %lld ns late", (long long)el);
        cr_assert_eq(pthread_join(t, NULL), 0);
        cr_assert_eq(atomic_load(&d.rc), 1);
    }
    /* Many rounds of park / notify: no wake-up is lost. */
    struct receiver r;
    for (int i = 0; i < SCALE(200); i++) {
        pthread_t t = start_receiver(&r, s, 10 * SEC);
        if (i % 2)
            wait_until_parked(s);
        cr_assert_eq(nq_notify(q, h, i), 1);
        cr_assert_eq(pthread_join(t, NULL), 0);
        cr_assert_eq(atomic_load(&r.rc), 0, "round %d: %s", i, nq_err_name(atomic_load(&r.rc)));
        cr_assert_eq(r.arg, i);
    }
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(sub, only_one_thread_may_block_in_recv, .timeout = 30) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    nq_sub_t *s = sub(q, h, 4, NQ_DROP_NEWEST);
    struct receiver r;
    pthread_t t = start_receiver(&r, s, 20 * SEC);
    wait_until_parked(s);
    int64_t arg = -3;
    int64_t t0 = now_ns();
    int rc = nq_sub_recv(s, 5 * SEC, &arg);
    cr_assert_eq(rc, NQ_EBUSY, "a second blocking receiver got %s", nq_err_name(rc));
    cr_assert_lt(now_ns() - t0, 2 * SEC, "NQ_EBUSY must not wait");
    cr_assert_eq(nq_sub_recv(s, -1, &arg), NQ_EBUSY);
    cr_assert_eq(arg, -3);
    /* Non-blocking receives are not refused. */
    cr_assert_eq(nq_sub_try_recv(s, &arg), NQ_EAGAIN);
    cr_assert_eq(nq_sub_recv(s, 0, &arg), NQ_ETIMEDOUT);
    /* The refused call did not disturb the blocked one. */
    cr_assert_eq(nq_notify(q, h, 31), 1);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(atomic_load(&r.rc), 0, "%s", nq_err_name(atomic_load(&r.rc)));
    cr_assert_eq(r.arg, 31);
    /* And the flag is free again. */
    struct delayed d;
    pthread_t n = start_delayed(&d, q, h, 20 * MS, 32, 0);
    cr_assert_eq(nq_sub_recv(s, 10 * SEC, &arg), 0);
    cr_assert_eq(arg, 32);
    cr_assert_eq(pthread_join(n, NULL), 0);
    nq_sub_close(s);
    nq_queue_free(q);
}

/* --- closing ------------------------------------------------------------- */

Test(sub, unregister_delivers_what_is_held_then_closed, .timeout = 30) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    nq_sub_t *a = sub(q, h, 4, NQ_DROP_NEWEST); /* try_recv */
    nq_sub_t *b = sub(q, h, 8, NQ_DROP_OLDEST); /* recv_batch */
    nq_sub_t *c = sub(q, h, 4, NQ_DROP_NEWEST); /* blocking recv */
    for (int i = 1; i <= 6; i++)
        nq_notify(q, h, i);
    cr_assert_eq(nq_unregister(q, h), 0);
    cr_assert_eq(nq_notify(q, h, 7), NQ_EBADH);
    nq_sub_t *late = NULL;
    cr_assert_eq(nq_subscribe(q, h, NULL, &late), NQ_EBADH);
    cr_assert_null(late);

    int64_t arg = 0;
    for (int i = 1; i <= 4; i++) {
        cr_assert_eq(nq_sub_try_recv(a, &arg), 0);
        cr_assert_eq(arg, i);
    }
    cr_assert_eq(nq_sub_try_recv(a, &arg), NQ_ECLOSED);
    cr_assert_eq(nq_sub_try_recv(a, &arg), NQ_ECLOSED, "closed stays closed");
    cr_assert_eq(nq_sub_dropped(a), 2, "the drop count survives the close");

    int64_t buf[16];
    cr_assert_eq(nq_sub_recv_batch(b, buf, 4), 4);
    cr_assert_eq(nq_sub_recv_batch(b, buf + 4, 16), 2);
    for (int i = 0; i < 6; i++)
        cr_assert_eq(buf[i], i + 1);
    cr_assert_eq(nq_sub_recv_batch(b, buf, 16), NQ_ECLOSED);

    int64_t t0 = now_ns();
    for (int i = 1; i <= 4; i++) {
        cr_assert_eq(nq_sub_recv(c, -1, &arg), 0);
        cr_assert_eq(arg, i);
    }
    cr_assert_eq(nq_sub_recv(c, -1, &arg), NQ_ECLOSED, "a closed, drained recv must not block");
    cr_assert_eq(nq_sub_recv(c, 5 * SEC, &arg), NQ_ECLOSED);
    cr_assert_eq(nq_sub_recv(c, 0, &arg), NQ_ECLOSED);
    cr_assert_lt(now_ns() - t0, 2 * SEC);
    cr_assert_eq(nq_sub_recv_batch(c, buf, 4), NQ_ECLOSED);

    nq_sub_close(a);
    nq_sub_close(b);
    nq_sub_close(c);
    cr_assert_eq(stats(q).live_subs, 0);
    nq_queue_free(q);
}

Test(sub, unregister_wakes_a_parked_recv, .timeout = 30) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    nq_sub_t *s = sub(q, h, 4, NQ_DROP_NEWEST);
    struct receiver r;
    pthread_t t = start_receiver(&r, s, -1);
    wait_until_parked(s);
    cr_assert_eq(nq_unregister(q, h), 0);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(atomic_load(&r.rc), NQ_ECLOSED, "%s", nq_err_name(atomic_load(&r.rc)));
    /* From another thread, with a finite timeout. */
    h = reg(q);
    nq_sub_t *s2 = sub(q, h, 4, NQ_DROP_NEWEST);
    struct delayed d;
    int64_t t0 = now_ns();
    pthread_t u = start_delayed(&d, q, h, 50 * MS, 0, 1);
    int64_t arg;
    int rc = nq_sub_recv(s2, 20 * SEC, &arg);
    cr_assert_eq(rc, NQ_ECLOSED, "%s", nq_err_name(rc));
    cr_assert_lt(now_ns() - t0, 50 * MS + SLACK);
    cr_assert_eq(pthread_join(u, NULL), 0);
    cr_assert_eq(atomic_load(&d.rc), 0);
    nq_sub_close(s);
    nq_sub_close(s2);
    nq_queue_free(q);
}

Test(sub, queue_free_closes_subscriptions_that_outlive_it) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    counter_t c;
    atomic_init(&c.calls, 0);
    atomic_init(&c.tid, 0);
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = 3;
    o.waker.wake = count_wake;
    o.waker.ctx = &c;
    nq_sub_t *s = NULL;
    cr_assert_eq(nq_subscribe(q, h, &o, &s), 0);
    nq_notify(q, h, 1);
    nq_notify(q, h, 2);
    cr_assert_eq(atomic_load(&c.calls), 1);
    nq_queue_free(q);
    cr_assert_eq(atomic_load(&c.calls), 2, "the waker is called on close");
    cr_assert_eq(atomic_load(&c.tid), cur_tid());
    int64_t arg;
    cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
    cr_assert_eq(arg, 1);
    cr_assert_eq(nq_sub_recv(s, -1, &arg), 0);
    cr_assert_eq(arg, 2);
    cr_assert_eq(nq_sub_recv(s, -1, &arg), NQ_ECLOSED);
    cr_assert_eq(nq_sub_dropped(s), 0);
    nq_sub_close(s); /* the last reference: the queue's memory goes now (ASan: no leak) */
}

Test(sub, close_detaches_from_the_handle) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    size_t before = stats(q).bytes_held;
    nq_sub_t *s = sub(q, h, 100, NQ_DROP_NEWEST);
    nq_sub_t *keep = sub(q, h, 100, NQ_DROP_NEWEST);
    cr_assert_eq(stats(q).live_subs, 2);
    nq_notify(q, h, 1);
    nq_sub_close(s);
    cr_assert_eq(stats(q).live_subs, 1);
    cr_assert_eq(nq_notify(q, h, 2), 1, "a closed subscription still received");
    nq_sub_close(keep);
    nq_sub_close(NULL);
    cr_assert_eq(stats(q).live_subs, 0);
    /* The slot keeps its subscriber array; everything else is returned. */
    size_t after = stats(q).bytes_held;
    cr_assert_leq(after, before + 64 * sizeof(void *), "held %zu bytes before, %zu after", before,
                  after);
    nq_queue_free(q);
}

/* A subscription costs its ring (16 bytes a cell: the arg and its stamp)
 * plus its two-line header: the handle's first subscriber sits in the
 * slot; the array of subscribers grows with the next ones (from 2,
 * doubling), instead of being sized for max_subscribers_per_handle at the
 * first. And it grows right: every subscriber up to the limit receives,
 * the next is refused. */
Test(sub, the_subscriber_array_grows_with_the_subscribers) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    size_t before = stats(q).bytes_held;
    nq_sub_t *first = sub(q, h, 1024, NQ_DROP_NEWEST);
    size_t fixed = stats(q).bytes_held - before - 1024 * 16;
    cr_assert_eq(fixed, sizeof(nq_sub_t) + sizeof("test"),
                 "a first subscription of 1024 costs 16 x 1024 + %zu bytes", fixed);
    nq_config_t cfg;
    nq_config_init(&cfg);
    uint32_t max = cfg.max_subscribers_per_handle;
    nq_sub_t **all = calloc(max, sizeof(*all));
    cr_assert_not_null(all);
    all[0] = first;
    for (uint32_t i = 1; i < max; i++)
        all[i] = sub(q, h, 4, NQ_DROP_NEWEST);
    nq_sub_t *extra = NULL;
    cr_assert_eq(nq_subscribe(q, h, NULL, &extra), NQ_ELIMIT);
    cr_assert_eq(nq_notify(q, h, 42), (int)max, "not every subscriber was reached");
    for (uint32_t i = 0; i < max; i++) {
        int64_t v = 0;
        cr_assert_eq(nq_sub_try_recv(all[i], &v), 0, "subscriber %u got nothing", i);
        cr_assert_eq(v, 42);
        nq_sub_close(all[i]);
    }
    free(all);
    nq_queue_free(q);
}

/* --- the waker ----------------------------------------------------------- */

struct notify_once {
    nq_queue_t *q;
    nq_handle_t h;
    int64_t arg;
    atomic_int tid;
};

static void *notify_once_thread(void *a) {
    struct notify_once *n = a;
    atomic_store(&n->tid, cur_tid());
    nq_notify(n->q, n->h, n->arg);
    return NULL;
}

Test(sub, waker_runs_per_transition_and_on_close_on_the_notifying_thread) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    counter_t c, d;
    atomic_init(&c.calls, 0);
    atomic_init(&c.tid, 0);
    atomic_init(&d.calls, 0);
    atomic_init(&d.tid, 0);
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = 4;
    o.overflow = NQ_DROP_NEWEST;
    o.waker.wake = count_wake;
    o.waker.ctx = &c;
    nq_sub_t *s = NULL;
    cr_assert_eq(nq_subscribe(q, h, &o, &s), 0);
    o.capacity = 1;
    o.overflow = NQ_DROP_OLDEST;
    o.waker.ctx = &d;
    nq_sub_t *watch = NULL;
    cr_assert_eq(nq_subscribe(q, h, &o, &watch), 0);
    cr_assert_eq(atomic_load(&c.calls), 0, "subscribing calls no waker");

    nq_notify(q, h, 1);
    cr_assert_eq(atomic_load(&c.calls), 1);
    cr_assert_eq(atomic_load(&c.tid), cur_tid());
    nq_notify(q, h, 2);
    nq_notify(q, h, 3);
    cr_assert_eq(atomic_load(&c.calls), 1, "still non-empty: no new transition");
    cr_assert_eq(atomic_load(&d.calls), 1, "a watch overwritten while full is no transition");
    int64_t arg;
    cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
    nq_notify(q, h, 4);
    cr_assert_eq(atomic_load(&c.calls), 1, "partly drained is still non-empty");
    nq_notify(q, h, 5);
    nq_notify(q, h, 6); /* full: dropped */
    cr_assert_eq(atomic_load(&c.calls), 1, "a dropped arg is no transition");
    int64_t buf[8];
    cr_assert_eq(nq_sub_recv_batch(s, buf, 8), 4);
    cr_assert_eq(nq_sub_try_recv(watch, &arg), 0);
    cr_assert_eq(arg, 6);

    /* Empty again; a notify from another thread calls it on that thread. */
    struct notify_once n = {q, h, 7, 0};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, notify_once_thread, &n), 0);
    cr_assert_eq(pthread_join(t, NULL), 0);
    cr_assert_eq(atomic_load(&c.calls), 2);
    cr_assert_eq(atomic_load(&d.calls), 2);
    cr_assert_eq(atomic_load(&c.tid), atomic_load(&n.tid), "the waker ran on another thread");
    cr_assert_neq(atomic_load(&n.tid), cur_tid());

    /* Close: s holds 7 (non-empty), watch is drained (empty). Both are told. */
    cr_assert_eq(nq_sub_try_recv(watch, &arg), 0);
    cr_assert_eq(nq_unregister(q, h), 0);
    cr_assert_eq(atomic_load(&c.calls), 3, "a non-empty subscription's waker on close");
    cr_assert_eq(atomic_load(&d.calls), 3, "an empty subscription's waker on close");
    cr_assert_eq(atomic_load(&c.tid), cur_tid());
    cr_assert_eq(nq_sub_try_recv(s, &arg), 0);
    cr_assert_eq(arg, 7);
    cr_assert_eq(nq_sub_try_recv(s, &arg), NQ_ECLOSED);
    cr_assert_eq(atomic_load(&c.calls), 3);
    nq_sub_close(s);
    nq_sub_close(watch);
    cr_assert_eq(atomic_load(&c.calls), 3, "closing calls no waker");
    cr_assert_eq(atomic_load(&d.calls), 3);
    nq_queue_free(q);
}

/* --- arguments ------------------------------------------------------------ */

Test(sub, capacity_zero_is_the_queue_default) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.default_capacity = 5;
    nq_queue_t *q = new_queue(&cfg);
    nq_handle_t h = reg(q);
    nq_sub_t *s = sub(q, h, 0, NQ_DROP_NEWEST);
    nq_sub_t *n = NULL;
    cr_assert_eq(nq_subscribe(q, h, NULL, &n), 0, "NULL opts = defaults");
    for (int i = 0; i < 9; i++)
        nq_notify(q, h, i);
    cr_assert_eq(nq_sub_dropped(s), 4, "capacity 0 must be the default 5");
    cr_assert_eq(nq_sub_dropped(n), 4, "NULL opts: capacity must be the default 5");
    int64_t b[16];
    cr_assert_eq(nq_sub_recv_batch(s, b, 16), 5);
    cr_assert_eq(b[4], 4);
    cr_assert_eq(nq_sub_recv_batch(n, b, 16), 5);
    nq_sub_close(s);
    nq_sub_close(n);
    nq_queue_free(q);

    /* The built-in default (1024 per nq.h). */
    q = new_queue(NULL);
    h = reg(q);
    s = sub(q, h, 0, NQ_DROP_NEWEST);
    for (int i = 0; i < 1030; i++)
        nq_notify(q, h, i);
    cr_assert_eq(nq_sub_dropped(s), 6);
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(sub, capacity_above_max_capacity_is_einval) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    cfg.max_capacity = 64;
    cfg.default_capacity = 8;
    nq_queue_t *q = new_queue(&cfg);
    nq_handle_t h = reg(q);
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    nq_sub_t *s = (nq_sub_t *)&o;
    const uint32_t bad[] = {65, 1000, UINT32_MAX};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        o.capacity = bad[i];
        int rc = nq_subscribe(q, h, &o, &s);
        cr_assert_eq(rc, NQ_EINVAL, "capacity %u: %s", bad[i], nq_err_name(rc));
        cr_assert_null(s, "a failed subscribe must set *out to NULL");
    }
    o.capacity = 64;
    cr_assert_eq(nq_subscribe(q, h, &o, &s), 0, "capacity == max_capacity is accepted");
    nq_sub_close(s);
    cr_assert_eq(stats(q).live_subs, 0);
    nq_queue_free(q);

    /* A default above the maximum is refused when the queue is made. */
    cfg.default_capacity = 65;
    nq_queue_t *q2 = (nq_queue_t *)&o;
    cr_assert_eq(nq_queue_new(&cfg, &q2), NQ_EINVAL);
    cr_assert_null(q2);

    q = new_queue(NULL); /* default max_capacity 2^20 */
    h = reg(q);
    o.capacity = (1u << 20) + 1;
    cr_assert_eq(nq_subscribe(q, h, &o, &s), NQ_EINVAL);
    o.capacity = 1u << 20;
    cr_assert_eq(nq_subscribe(q, h, &o, &s), 0);
    nq_sub_close(s);
    nq_queue_free(q);
}

Test(sub, bad_overflow_and_bad_arguments) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    size_t bytes = stats(q).bytes_held;
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = 4;
    nq_sub_t *s = NULL;
    const int bad[] = {2, 3, -1, 1000, INT32_MIN};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        o.overflow = (nq_overflow_t)bad[i];
        int rc = nq_subscribe(q, h, &o, &s);
        cr_assert_eq(rc, NQ_EINVAL, "overflow %d: %s", bad[i], nq_err_name(rc));
        cr_assert_null(s);
    }
    o.overflow = NQ_DROP_OLDEST;
    cr_assert_eq(nq_subscribe(NULL, h, &o, &s), NQ_EINVAL);
    cr_assert_eq(nq_subscribe(q, h, &o, NULL), NQ_EINVAL);
    cr_assert_eq(nq_subscribe(q, 0, &o, &s), NQ_EBADH);
    cr_assert_eq(nq_subscribe(q, h + 1, &o, &s), NQ_EBADH, "a handle never issued");
    cr_assert_eq(nq_subscribe(q, h ^ (1ull << 32), &o, &s), NQ_EBADH, "wrong generation");
    cr_assert_eq(nq_subscribe(q, UINT64_MAX, &o, &s), NQ_EBADH);
    nq_stats_t st = stats(q);
    cr_assert_eq(st.live_subs, 0);
    cr_assert_eq(st.bytes_held, bytes, "a refused subscribe kept memory");
    cr_assert_eq(nq_sub_dropped(NULL), 0);
    nq_queue_free(q);
}

/* --- FIFO per producer, concurrently --------------------------------------- */

#define FIFO_PRODUCERS 3
#define FIFO_SUBS 4

struct fifo {
    nq_queue_t *q;
    nq_handle_t h;
    nq_sub_t *s[FIFO_SUBS];
    long per_producer;
    atomic_int producers_done;
};

struct fifo_producer {
    struct fifo *f;
    int id;
};

static void *fifo_produce(void *a) {
    struct fifo_producer *p = a;
    for (long i = 1; i <= p->f->per_producer; i++) {
        int rc = nq_notify(p->f->q, p->f->h, ((int64_t)p->id << 40) | i);
        if (rc < 0)
            return (void *)1;
        if ((i & 1023) == 0)
            sched_yield(); /* interleave the producers on few vCPUs */
    }
    atomic_fetch_add(&p->f->producers_done, 1);
    return NULL;
}

Test(sub, fifo_per_producer_and_exact_accounting_under_concurrency, .timeout = 60) {
    static const uint32_t fcaps[FIFO_SUBS] = {1, 16, 16, 1u << 19};
    static const nq_overflow_t fov[FIFO_SUBS] = {NQ_DROP_OLDEST, NQ_DROP_NEWEST, NQ_DROP_OLDEST,
                                                 NQ_DROP_NEWEST};
    static struct fifo f;
    memset(&f, 0, sizeof(f));
    f.q = new_queue(NULL);
    f.h = reg(f.q);
    f.per_producer = SCALE(150000);
    for (int i = 0; i < FIFO_SUBS; i++)
        f.s[i] = sub(f.q, f.h, fcaps[i], fov[i]);
    struct fifo_producer p[FIFO_PRODUCERS];
    pthread_t t[FIFO_PRODUCERS];
    for (int i = 0; i < FIFO_PRODUCERS; i++) {
        p[i].f = &f;
        p[i].id = i;
        cr_assert_eq(pthread_create(&t[i], NULL, fifo_produce, &p[i]), 0);
    }
    /* This thread consumes concurrently: recv_batch on three, a blocking
     * recv on the watch. */
    int64_t last[FIFO_SUBS][FIFO_PRODUCERS];
    uint64_t got[FIFO_SUBS];
    memset(last, 0, sizeof(last));
    memset(got, 0, sizeof(got));
    const uint64_t sent = (uint64_t)FIFO_PRODUCERS * (uint64_t)f.per_producer;
    int64_t buf[256];
    long bad_order = 0, bad_tag = 0;
    for (;;) {
        int finished = atomic_load(&f.producers_done) == FIFO_PRODUCERS;
        int progress = 0;
        for (int k = 0; k < FIFO_SUBS; k++) {
            int n;
            if (k == 0) {
                int64_t a;
                int rc = nq_sub_recv(f.s[0], finished ? 0 : 1 * MS, &a);
                n = rc == 0 ? 1 : 0;
                buf[0] = a;
                cr_assert(rc == 0 || rc == NQ_ETIMEDOUT, "%s", nq_err_name(rc));
            } else {
                n = nq_sub_recv_batch(f.s[k], buf, 256);
                cr_assert_geq(n, 0);
            }
            progress += n;
            for (int i = 0; i < n; i++) {
                int id = (int)(buf[i] >> 40);
                int64_t seq = buf[i] & ((1ll << 40) - 1);
                if (id < 0 || id >= FIFO_PRODUCERS || seq < 1 || seq > f.per_producer) {
                    bad_tag++;
                    continue;
                }
                if (seq <= last[k][id])
                    bad_order++;
                last[k][id] = seq;
            }
            got[k] += (uint64_t)n;
        }
        if (finished && progress == 0)
            break;
    }
    for (int i = 0; i < FIFO_PRODUCERS; i++) {
        void *ret;
        cr_assert_eq(pthread_join(t[i], &ret), 0);
        cr_assert_null(ret, "a notify failed");
    }
    cr_assert_eq(bad_tag, 0, "%ld args were not ones the producers sent", bad_tag);
    cr_assert_eq(bad_order, 0, "%ld args out of per-producer order (or duplicated)", bad_order);
    uint64_t drops = 0;
    for (int k = 0; k < FIFO_SUBS; k++) {
        uint64_t dr = nq_sub_dropped(f.s[k]);
        drops += dr;
        cr_assert_eq(got[k] + dr, sent, "sub %d (cap %u): delivered %llu + dropped %llu != sent %llu",
                     k, fcaps[k], (unsigned long long)got[k], (unsigned long long)dr,
                     (unsigned long long)sent);
        cr_assert_eq(nq_sub_try_recv(f.s[k], NULL), NQ_EAGAIN);
    }
    cr_assert_eq(nq_sub_dropped(f.s[3]), 0, "the big subscription never fills");
    /* DROP_OLDEST keeps the newest: the last notify of all reached both
     * such subscriptions; the big one got every producer's last. */
    int last_kept0 = 0, last_kept2 = 0;
    for (int id = 0; id < FIFO_PRODUCERS; id++) {
        cr_assert_eq(last[3][id], f.per_producer);
        last_kept0 |= last[0][id] == f.per_producer;
        last_kept2 |= last[2][id] == f.per_producer;
    }
    cr_assert(last_kept0, "the watch lost the final notification");
    cr_assert(last_kept2, "DROP_OLDEST lost the final notification");
    nq_stats_t st = stats(f.q);
    cr_assert_eq(st.notifies, sent);
    cr_assert_eq(st.drops, drops);
    cr_log_info("sub fifo: sent %llu per subscription, delivered %llu/%llu/%llu/%llu, "
                "dropped %llu/%llu/%llu/%llu",
                (unsigned long long)sent, (unsigned long long)got[0], (unsigned long long)got[1],
                (unsigned long long)got[2], (unsigned long long)got[3],
                (unsigned long long)nq_sub_dropped(f.s[0]),
                (unsigned long long)nq_sub_dropped(f.s[1]),
                (unsigned long long)nq_sub_dropped(f.s[2]),
                (unsigned long long)nq_sub_dropped(f.s[3]));
    for (int k = 0; k < FIFO_SUBS; k++)
        nq_sub_close(f.s[k]);
    nq_queue_free(f.q);
}

/* --- what a subscription costs, and its one allocation --------------------- */

static void never_cb(nq_sub_t *s, void *data) {
    (void)s;
    (void)data;
    cr_assert_fail("a port callback ran");
}

/* A plain subscription is charged its struct and its ring; a port
 * subscription its port part on top; the first on a handle sits in the
 * slot, the second allocates the handle's subscriber array (2 pointers).
 * Closing returns all but the array. */
Test(sub, a_subscription_is_charged_header_ring_and_port_part_exactly) {
    nq_queue_t *q = new_queue(NULL);
    nq_port_t *p;
    cr_assert_eq(nq_port_new(&p), 0);
    nq_handle_t h = reg(q);
    nq_sub_opts_t o; /* no debug hint: it would be charged too */
    memset(&o, 0, sizeof(o));
    o.capacity = 1000;
    size_t b0 = stats(q).bytes_held;
    nq_sub_t *s, *ps;
    cr_assert_eq(nq_subscribe(q, h, &o, &s), 0);
    size_t b1 = stats(q).bytes_held;
    cr_assert_eq(b1 - b0, sizeof(nq_sub_t) + 1000 * 16);
    cr_assert_eq(nq_port_subscribe(p, q, h, &o, never_cb, NULL, &ps), 0);
    size_t b2 = stats(q).bytes_held - 2 * sizeof(void *); /* the array, now */
    cr_log_info("a subscription of capacity 1000: %zu bytes (%zu over its ring), a port "
                "subscription %zu (%zu over its ring)",
                b1 - b0, b1 - b0 - 16000, b2 - b1, b2 - b1 - 16000);
    /* Two cache lines (the producer's and the receiver's) and the ring;
     * a port's part adds at most one more line. */
    cr_assert_eq(sizeof(nq_sub_t), 128);
    cr_assert_leq(b1 - b0, 1000 * 16 + 128, "a subscription costs more than cap x 16 + 128");
    cr_assert_gt(b2 - b1, sizeof(nq_sub_t) + 16000, "the port's part is not charged");
    cr_assert_leq(b2 - b1, sizeof(nq_sub_t) + 16000 + 64, "a port's part grew past a line");
    nq_sub_close(ps);
    nq_sub_close(s);
    cr_assert_eq(stats(q).bytes_held, b0 + 2 * sizeof(void *));
    nq_port_free(p);
    nq_queue_free(q);
}

static void count_cb(nq_sub_t *s, void *data) {
    int64_t args[8];
    int n;
    while ((n = nq_sub_recv_batch(s, args, 8)) > 0)
        for (int i = 0; i < n; i++)
            cr_assert_eq(args[i], -1);
    (*(int *)data)++;
}

/* The port part sits right after the subscription's struct, in the same
 * allocation: subscriptions kept full with all-ones args (both policies,
 * small capacities) must keep their own port, token, callback and data,
 * and count their drops exactly. */
Test(sub, a_full_ring_leaves_the_port_part_after_it_intact) {
    nq_queue_t *q = new_queue(NULL);
    nq_port_t *p;
    cr_assert_eq(nq_port_new(&p), 0);
    nq_handle_t h = reg(q);
    enum { K = 6 };
    nq_sub_t *s[K];
    int calls[K] = {0};
    for (int k = 0; k < K; k++) {
        nq_sub_opts_t o;
        memset(&o, 0, sizeof(o));
        o.capacity = 1 + (uint32_t)k / 2;
        o.overflow = k % 2 ? NQ_DROP_OLDEST : NQ_DROP_NEWEST;
        cr_assert_eq(nq_port_subscribe(p, q, h, &o, count_cb, &calls[k], &s[k]), 0);
    }
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 10; i++)
            cr_assert_geq(nq_notify(q, h, -1), K / 2, "the drop-oldest ones always store");
        cr_assert_geq(nq_port_dispatch(p, 0), 0);
    }
    for (int k = 0; k < K; k++) {
        uint64_t cap = 1 + (uint64_t)k / 2;
        cr_assert_eq(calls[k], 3, "subscription %d: %d callbacks", k, calls[k]);
        cr_assert_eq(nq_sub_dropped(s[k]), 3 * (10 - cap), "subscription %d", k);
        nq_sub_close(s[k]);
    }
    nq_port_free(p);
    nq_queue_free(q);
}

/* --- Core 2.0: close against a blocked receive, shared receivers, lapping -- */

/* nq_sub_close on one thread while another is blocked in nq_sub_recv on the
 * same subscription: the blocked receive returns NQ_ECLOSED and the close
 * returns only after it has left (before: a use-after-free with a timeout, a
 * hang without one). Both with and without a timeout, the close coming at
 * varied moments: before the receiver parks, while it spins, once parked. */
struct close_race {
    nq_sub_t *s;
    int64_t timeout;
    atomic_int entered, rc;
};

static void *close_race_recv(void *a) {
    struct close_race *r = a;
    int64_t arg = -1;
    atomic_store(&r->entered, 1);
    atomic_store(&r->rc, nq_sub_recv(r->s, r->timeout, &arg));
    return NULL;
}

Test(sub, close_while_another_thread_is_blocked_in_recv_returns_closed, .timeout = 120) {
    nq_queue_t *q = new_queue(NULL);
    nq_handle_t h = reg(q);
    uint64_t seed = nqt_seed(), rng = nqt_rand_init(seed, 1);
    cr_log_info("seed %#llx", (unsigned long long)seed);
    int rounds = SCALE(400), parked_rounds = 0;
    for (int i = 0; i < rounds; i++) {
        struct close_race r;
        r.s = sub(q, h, 4, i % 2 ? NQ_DROP_OLDEST : NQ_DROP_NEWEST);
        r.timeout = i % 3 == 0 ? -1 : 1 * SEC;
        atomic_init(&r.entered, 0);
        atomic_init(&r.rc, 1);
        pthread_t t;
        cr_assert_eq(pthread_create(&t, NULL, close_race_recv, &r), 0);
        /* The receiver is inside nq_sub_recv (its single-receiver bit is
         * up): close at once, after a short spin, or once it is parked. A
         * receive that has not started yet is no part of this contract:
         * calling it on a freed subscription is the caller's bug. */
        int how = (int)(nqt_rand(&rng) % 3);
        while (!(atomic_load(&r.s->rstate) & NQ__R_BLOCKED))
            sched_yield();
        if (how == 1) {
            for (long spin = (long)(nqt_rand(&rng) % 20000); spin > 0; spin--)
                __asm__ __volatile__("" ::: "memory");
        } else if (how == 2) {
            wait_until_parked(r.s);
            parked_rounds++;
        }
        nq_sub_close(r.s); /* returns once the receiver has left */
        int rc = atomic_load(&r.rc);
        cr_assert(rc == NQ_ECLOSED || rc == 1,
                  "round %d: the blocked receive returned %s before the close was done", i,
                  nq_err_name(rc));
        cr_assert_eq(pthread_join(t, NULL), 0);
        rc = atomic_load(&r.rc);
        cr_assert_eq(rc, NQ_ECLOSED, "round %d: the receive returned %s, not NQ_ECLOSED", i,
                     nq_err_name(rc));
    }
    cr_log_info("%d rounds, %d of them with the receiver parked", rounds, parked_rounds);
    cr_assert_eq(stats(q).live_subs, 0);
    nq_queue_free(q);
}

/* Several receiver threads may share one subscription: each arg is received
 * exactly once, and received + dropped == sent, with both policies, while
 * two producers notify and each receiver mixes try_recv, recv_batch and a
 * blocking recv. */
#define SH_PRODUCERS 2
#define SH_RECEIVERS 3
struct shared_ctx {
    nq_queue_t *q;
    nq_handle_t h;
    nq_sub_t *s;
    long per_producer;
    atomic_int done;
    atomic_llong received;
    unsigned char *seen; /* [SH_PRODUCERS][per_producer] */
};

static void *shared_producer(void *a) {
    struct shared_ctx *c = ((void **)a)[0];
    int id = (int)(intptr_t)((void **)a)[1];
    for (long k = 0; k < c->per_producer; k++)
        if (nq_notify(c->q, c->h, ((int64_t)id << 32) | k) < 0)
            nqt_thread_fail("notify failed");
    return NULL;
}

static void shared_take(struct shared_ctx *c, int64_t v, int64_t *last) {
    int id = (int)(v >> 32);
    long k = (long)(v & 0xffffffff);
    if (id < 0 || id >= SH_PRODUCERS || k >= c->per_producer) {
        nqt_thread_fail("garbage arg %#llx", (unsigned long long)v);
        return;
    }
    unsigned char *b = &c->seen[id * c->per_producer + k];
    if (atomic_exchange((_Atomic unsigned char *)b, 1))
        nqt_thread_fail("arg %d/%ld received twice", id, k);
    if (k <= last[id])
        nqt_thread_fail("producer %d: %ld after %lld on one receiver", id, k,
                        (long long)last[id]);
    last[id] = k;
    atomic_fetch_add(&c->received, 1);
}

static void *shared_receiver(void *a) {
    struct shared_ctx *c = ((void **)a)[0];
    int id = (int)(intptr_t)((void **)a)[1];
    int64_t last[SH_PRODUCERS] = {-1, -1}, buf[16];
    for (unsigned n = 0;; n++) {
        int got = 0;
        if (id == 0) {
            int rc = nq_sub_recv_batch(c->s, buf, 1 + n % 16);
            for (int i = 0; i < rc; i++)
                shared_take(c, buf[i], last);
            got = rc > 0;
        } else if (id == 1) {
            int rc = nq_sub_try_recv(c->s, &buf[0]);
            if (rc == 0)
                shared_take(c, buf[0], last);
            got = rc == 0;
        } else {
            int rc = nq_sub_recv(c->s, 1 * MS, &buf[0]);
            if (rc == 0)
                shared_take(c, buf[0], last);
            else if (rc != NQ_ETIMEDOUT && rc != NQ_EBUSY)
                nqt_thread_fail("recv: %s", nq_err_name(rc));
            got = rc == 0;
        }
        if (!got && atomic_load(&c->done))
            break;
    }
    return NULL;
}

static void shared_run(nq_overflow_t ov, uint32_t cap) {
    struct shared_ctx c;
    memset(&c, 0, sizeof(c));
    c.q = new_queue(NULL);
    c.h = reg(c.q);
    c.s = sub(c.q, c.h, cap, ov);
    c.per_producer = SCALE(200000);
    c.seen = calloc((size_t)SH_PRODUCERS * c.per_producer, 1);
    cr_assert_not_null(c.seen);
    atomic_init(&c.done, 0);
    atomic_init(&c.received, 0);
    pthread_t p[SH_PRODUCERS], r[SH_RECEIVERS];
    void *pa[SH_PRODUCERS][2], *ra[SH_RECEIVERS][2];
    for (int i = 0; i < SH_RECEIVERS; i++) {
        ra[i][0] = &c;
        ra[i][1] = (void *)(intptr_t)i;
        cr_assert_eq(pthread_create(&r[i], NULL, shared_receiver, ra[i]), 0);
    }
    for (int i = 0; i < SH_PRODUCERS; i++) {
        pa[i][0] = &c;
        pa[i][1] = (void *)(intptr_t)i;
        cr_assert_eq(pthread_create(&p[i], NULL, shared_producer, pa[i]), 0);
    }
    for (int i = 0; i < SH_PRODUCERS; i++)
        cr_assert_eq(pthread_join(p[i], NULL), 0);
    atomic_store(&c.done, 1);
    for (int i = 0; i < SH_RECEIVERS; i++)
        cr_assert_eq(pthread_join(r[i], NULL), 0);
    cr_assert_eq(atomic_load(&nqt_errors), 0, "%s", nqt_first_error);
    /* The receivers stopped once the producers were done and they found it
     * empty: what is left is nothing. */
    int64_t x;
    while (nq_sub_try_recv(c.s, &x) == 0)
        atomic_fetch_add(&c.received, 1);
    long long sent = (long long)SH_PRODUCERS * c.per_producer;
    long long got = atomic_load(&c.received), dropped = (long long)nq_sub_dropped(c.s);
    cr_log_info("%s cap %u: sent %lld, received %lld, dropped %lld",
                ov == NQ_DROP_OLDEST ? "drop-oldest" : "drop-newest", cap, sent, got, dropped);
    cr_assert_eq(got + dropped, sent, "received %lld + dropped %lld != sent %lld", got, dropped,
                 sent);
    nq_stats_t st = stats(c.q);
    cr_assert_eq(st.drops, (uint64_t)dropped);
    nq_sub_close(c.s);
    nq_queue_free(c.q);
    free(c.seen);
}

Test(sub, receivers_on_several_threads_share_one_subscription_drop_newest, .timeout = 120) {
    shared_run(NQ_DROP_NEWEST, 64);
}

Test(sub, receivers_on_several_threads_share_one_subscription_drop_oldest, .timeout = 120) {
    shared_run(NQ_DROP_OLDEST, 8);
}

/* A drop-oldest ring lapped many times while its receiver reads slowly: no
 * arg is torn or duplicated, every arg it gets is newer than the last one
 * (FIFO), and received + dropped + held == sent at every pause, the drops
 * derived on the receiver's side (S3, S4 of sub.c). Capacity 1 to 5. */
Test(sub, a_lapped_drop_oldest_ring_accounts_exactly, .timeout = 120) {
    for (uint32_t cap = 1; cap <= 5; cap++) {
        nq_queue_t *q = new_queue(NULL);
        nq_handle_t h = reg(q);
        nq_sub_t *s = sub(q, h, cap, NQ_DROP_OLDEST);
        struct delayed d[1];
        (void)d;
        long sent = 0, received = 0;
        int64_t last = -1, buf[7];
        uint64_t rng = nqt_rand_init(nqt_seed(), cap);
        for (int round = 0; round < SCALE(2000); round++) {
            long burst = (long)(nqt_rand(&rng) % (3 * cap + 2));
            for (long k = 0; k < burst; k++)
                nq_notify(q, h, ++sent);
            int n = nq_sub_recv_batch(s, buf, 1 + nqt_rand(&rng) % 7);
            cr_assert_geq(n, 0);
            for (int i = 0; i < n; i++) {
                cr_assert_gt(buf[i], last, "cap %u: %lld after %lld", cap, (long long)buf[i],
                             (long long)last);
                cr_assert_leq(buf[i], sent);
                last = buf[i];
            }
            received += n;
            /* What is held is the newest args: at most cap, ending at sent. */
            long held = 0;
            uint64_t dropped = nq_sub_dropped(s);
            held = sent - received - (long)dropped;
            cr_assert(held >= 0 && held <= (long)cap, "cap %u: held %ld", cap, held);
        }
        int64_t x;
        while (nq_sub_try_recv(s, &x) == 0) {
            cr_assert_gt(x, last);
            last = x;
            received++;
        }
        cr_assert_eq(received + (long)nq_sub_dropped(s), sent);
        nq_sub_close(s);
        nq_queue_free(q);
    }
}

/* The same while a producer thread laps it without pause (the receiver and
 * the producer race on cells: torn or stale copies must be discarded). */
struct lap_ctx {
    nq_queue_t *q;
    nq_handle_t h;
    long n;
    atomic_int done;
};

static void *lap_producer(void *a) {
    struct lap_ctx *c = a;
    for (long k = 1; k <= c->n; k++)
        nq_notify(c->q, c->h, k * 0x10001); /* a pattern: torn values show */
    atomic_store(&c->done, 1);
    return NULL;
}

Test(sub, a_drop_oldest_ring_lapped_by_a_running_producer_never_yields_a_stale_arg,
     .timeout = 120) {
    for (uint32_t cap = 1; cap <= 8; cap *= 2) {
        struct lap_ctx c = {new_queue(NULL), 0, SCALE(1000000), 0};
        c.h = reg(c.q);
        nq_sub_t *s = sub(c.q, c.h, cap, NQ_DROP_OLDEST);
        pthread_t t;
        cr_assert_eq(pthread_create(&t, NULL, lap_producer, &c), 0);
        long received = 0;
        int64_t last = 0, buf[4];
        for (;;) {
            int done = atomic_load(&c.done);
            int n = nq_sub_recv_batch(s, buf, 4);
            for (int i = 0; i < n; i++) {
                cr_assert_eq(buf[i] % 0x10001, 0, "cap %u: a torn arg %#llx", cap,
                             (unsigned long long)buf[i]);
                cr_assert_gt(buf[i], last, "cap %u: %lld after %lld", cap, (long long)buf[i],
                             (long long)last);
                last = buf[i];
            }
            received += n;
            if (done && n == 0)
                break;
        }
        cr_assert_eq(pthread_join(t, NULL), 0);
        cr_assert_eq(last, c.n * 0x10001, "the newest arg was not the last received");
        long dropped = (long)nq_sub_dropped(s);
        cr_log_info("cap %u: %ld received, %ld dropped of %ld", cap, received, dropped, c.n);
        cr_assert_eq(received + dropped, c.n);
        nq_sub_close(s);
        nq_queue_free(c.q);
    }
}

/* A consumer driven only by a subscription's waker (each call posts a token
 * on an evq the consumer waits on) drains in batches until one comes back
 * short, as bench/cmp_flow's worker does. An arg pushed between the take
 * that emptied the ring and the arm of its wake-up owes no wake: the
 * receive must take it itself or announce it, or the consumer sleeps with
 * args held (the first version of the receiver-armed wake-up lost exactly
 * this one, and the worker hung). Batches of 1 (try_recv), 3 and 64. */
struct wd_ctx {
    nq_queue_t *q;
    nq_handle_t h;
    nq_sub_t *s;
    nq_evq_t *evq;
    long per_producer;
    atomic_int producers_done;
};

static void wd_waker(void *ctx) {
    nq_evq_notify(((struct wd_ctx *)ctx)->evq, 0);
}

static void *wd_producer(void *a) {
    struct wd_ctx *c = a;
    for (long k = 1; k <= c->per_producer; k++) {
        nq_notify(c->q, c->h, k);
        if ((k & 1023) == 0)
            sched_yield(); /* let the consumer empty the ring now and then */
    }
    atomic_fetch_add(&c->producers_done, 1);
    return NULL;
}

static void waker_driven_drain(size_t batch) {
    struct wd_ctx c;
    memset(&c, 0, sizeof(c));
    c.q = new_queue(NULL);
    c.h = reg(c.q);
    c.per_producer = SCALE(300000);
    cr_assert_eq(nq_evq_new(1, &c.evq), 0);
    nq_sub_opts_t o;
    memset(&o, 0, sizeof(o));
    o.capacity = 256;
    o.overflow = NQ_DROP_OLDEST;
    o.waker = (nq_waker_t){wd_waker, &c};
    cr_assert_eq(nq_subscribe(c.q, c.h, &o, &c.s), 0);
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        cr_assert_eq(pthread_create(&t[i], NULL, wd_producer, &c), 0);
    long received = 0, sent = 2 * c.per_producer;
    int64_t buf[64];
    uint32_t tok;
    int64_t idle_since = 0;
    for (;;) {
        int n = nq_evq_wait(c.evq, &tok, 1, 100 * MS);
        if (n == NQ_ETIMEDOUT) {
            /* Producers done and no wake for a while: every arg must be in. */
            if (atomic_load(&c.producers_done) == 2) {
                if (idle_since == 0)
                    idle_since = now_ns();
                else if (now_ns() - idle_since > 2 * SEC)
                    break;
            }
            continue;
        }
        idle_since = 0;
        int got;
        do { /* drain until a short batch, then wait for the waker */
            got = batch == 1 ? (nq_sub_try_recv(c.s, buf) == 0) : nq_sub_recv_batch(c.s, buf, batch);
            cr_assert_geq(got, 0);
            received += got;
        } while ((size_t)got == batch);
        if (received + (long)nq_sub_dropped(c.s) == sent &&
            atomic_load(&c.producers_done) == 2)
            break;
    }
    for (int i = 0; i < 2; i++)
        cr_assert_eq(pthread_join(t[i], NULL), 0);
    long dropped = (long)nq_sub_dropped(c.s);
    cr_assert_eq(received + dropped, sent,
                 "batch %zu: %ld received + %ld dropped of %ld: a wake-up was lost with %llu "
                 "args held",
                 batch, received, dropped, sent, (unsigned long long)(sent - received - dropped));
    nq_sub_close(c.s);
    nq_evq_free(c.evq);
    nq_queue_free(c.q);
}

Test(sub, a_waker_driven_consumer_draining_to_a_short_batch_loses_no_wakeup_1, .timeout = 120) {
    waker_driven_drain(1);
}

Test(sub, a_waker_driven_consumer_draining_to_a_short_batch_loses_no_wakeup_3, .timeout = 120) {
    waker_driven_drain(3);
}

Test(sub, a_waker_driven_consumer_draining_to_a_short_batch_loses_no_wakeup_64, .timeout = 120) {
    waker_driven_drain(64);
}
