/* Criterion suite "evq": the conflating FIFO token queue. Every bullet of its
 * contract in nq.h: range checks, conflation, FIFO, bounded polls, the
 * no-overflow invariant (and that a forced overflow is reported), the
 * blocking wait (wake-up across threads, timeouts never early, signals never
 * surface), release/acquire, and a 4-producer stress with exact accounting. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include "core/evq.h"
#include "nq.h"
#include "nqtest.h"


#define MS 1000000LL

static nq_evq_t *mk(uint32_t n) {
    nq_evq_t *e = NULL;
    cr_assert_eq(nq_evq_new(n, &e), 0);
    cr_assert_not_null(e);
    return e;
}

static void check(nq_evq_t *e) {
    const char *why = NULL;
    cr_assert_eq(nq__evq_check(e, &why), 0, "invariant broken: %s", why ? why : "?");
}

/* --- argument checks ---------------------------------------------------- */

Test(evq, rejects_bad_arguments) {
    nq_evq_t *e = (nq_evq_t *)0x1;
    cr_assert_eq(nq_evq_new(0, &e), NQ_EINVAL);
    cr_assert_null(e, "out is cleared on failure");
    cr_assert_eq(nq_evq_new(NQ_EVQ_MAX_TOKENS + 1, &e), NQ_EINVAL);
    cr_assert_eq(nq_evq_new(UINT32_MAX, &e), NQ_EINVAL);
    cr_assert_eq(nq_evq_new(16, NULL), NQ_EINVAL);

    e = mk(16);
    uint32_t out[4];
    nq_evq_stats_t st;
    cr_assert_eq(nq_evq_notify(NULL, 0), NQ_EINVAL);
    cr_assert_eq(nq_evq_notify(e, 16), NQ_EINVAL, "token == max_tokens is out of range");
    cr_assert_eq(nq_evq_notify(e, UINT32_MAX), NQ_EINVAL);
    cr_assert_eq(nq_evq_poll(NULL, out, 4), 0);
    cr_assert_eq(nq_evq_poll(e, NULL, 4), 0);
    cr_assert_eq(nq_evq_poll(e, out, 0), 0);
    cr_assert_eq(nq_evq_wait(NULL, out, 4, 0), NQ_EINVAL);
    cr_assert_eq(nq_evq_wait(e, NULL, 4, 0), NQ_EINVAL);
    cr_assert_eq(nq_evq_wait(e, out, 0, 0), NQ_EINVAL);
    cr_assert_eq(nq_evq_stats(NULL, &st), NQ_EINVAL);
    cr_assert_eq(nq_evq_stats(e, NULL), NQ_EINVAL);
    check(e);
    cr_assert_eq(nq_evq_poll(e, out, 4), 0, "rejected notifies queued nothing");
    nq_evq_free(e);
    nq_evq_free(NULL);
}

Test(evq, largest_queue_allowed) {
    nq_evq_t *e = mk(NQ_EVQ_MAX_TOKENS);
    uint32_t out[2];
    cr_assert_eq(nq_evq_notify(e, NQ_EVQ_MAX_TOKENS - 1), 0);
    cr_assert_eq(nq_evq_notify(e, 0), 0);
    cr_assert_eq(nq_evq_poll(e, out, 2), 2);
    cr_assert_eq(out[0], NQ_EVQ_MAX_TOKENS - 1);
    cr_assert_eq(out[1], 0);
    nq_evq_free(e);
}

/* --- conflation and order ------------------------------------------------ */

Test(evq, conflates_until_polled) {
    nq_evq_t *e = mk(8);
    uint32_t out[8];
    for (int i = 0; i < 100; i++)
        cr_assert_eq(nq_evq_notify(e, 3), 0);
    cr_assert_eq(nq_evq_poll(e, out, 8), 1, "100 notifies of one token: one delivery");
    cr_assert_eq(out[0], 3);
    cr_assert_eq(nq_evq_poll(e, out, 8), 0);
    cr_assert_eq(nq_evq_notify(e, 3), 0);
    cr_assert_eq(nq_evq_poll(e, out, 8), 1, "notified again after the poll: delivered again");
    cr_assert_eq(out[0], 3);
    nq_evq_stats_t st;
    cr_assert_eq(nq_evq_stats(e, &st), 0);
    cr_assert_eq(st.queued, 2);
    cr_assert_eq(st.delivered, 2);
    cr_assert_eq(st.pending, 0);
    cr_assert_eq(st.max_tokens, 8);
    cr_assert_eq(st.ring_size, 8);
    nq_evq_free(e);
}

Test(evq, fifo_over_1000_tokens) {
    enum { N = 1000 };
    nq_evq_t *e = mk(N);
    uint32_t order[N], out[N];
    for (uint32_t i = 0; i < N; i++)
        order[i] = i;
    srand(7);
    for (uint32_t i = N - 1; i > 0; i--) { /* shuffle */
        uint32_t j = (uint32_t)rand() % (i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    for (uint32_t i = 0; i < N; i++)
        cr_assert_eq(nq_evq_notify(e, order[i]), 0);
    for (uint32_t i = 0; i < N; i += 3) /* re-notifying a pending token does not move it */
        cr_assert_eq(nq_evq_notify(e, order[i]), 0);
    check(e);
    cr_assert_eq(nq_evq_poll(e, out, N), N);
    for (uint32_t i = 0; i < N; i++)
        cr_assert_eq(out[i], order[i], "position %u: got %u, expected %u", i, out[i], order[i]);
    nq_evq_free(e);
}

Test(evq, poll_with_a_limit_leaves_the_rest_in_order) {
    enum { N = 1000 };
    nq_evq_t *e = mk(N);
    uint32_t out[7];
    for (uint32_t i = 0; i < N; i++)
        nq_evq_notify(e, (i * 37) % N); /* 37 is coprime with 1000: a permutation */
    uint32_t next = 0;
    size_t n;
    while ((n = nq_evq_poll(e, out, 7)) > 0) {
        cr_assert_leq(n, 7);
        for (size_t k = 0; k < n; k++, next++)
            cr_assert_eq(out[k], (next * 37) % N);
        check(e);
    }
    cr_assert_eq(next, N);
    nq_evq_free(e);
}

Test(evq, wraps_around_the_ring) {
    /* 3 tokens in a ring of 4 slots: positions run far past the ring size and
     * past 2^16, so slot sequence numbers lap many times. */
    nq_evq_t *e = mk(3);
    uint32_t out[3];
    for (uint32_t round = 0; round < 100000; round++) {
        uint32_t a = round % 3, b = (round + 1) % 3;
        cr_assert_eq(nq_evq_notify(e, a), 0);
        cr_assert_eq(nq_evq_notify(e, b), 0);
        cr_assert_eq(nq_evq_notify(e, a), 0);
        size_t n = nq_evq_poll(e, out, round % 2 ? 1 : 3);
        if (round % 2) {
            cr_assert_eq(n, 1);
            cr_assert_eq(out[0], a);
            cr_assert_eq(nq_evq_poll(e, out, 3), 1);
            cr_assert_eq(out[0], b);
        } else {
            cr_assert_eq(n, 2);
            cr_assert(out[0] == a && out[1] == b);
        }
    }
    check(e);
    nq_evq_stats_t st;
    nq_evq_stats(e, &st);
    cr_assert_eq(st.queued, 200000);
    cr_assert_eq(st.delivered, 200000);
    nq_evq_free(e);
}

Test(evq, no_wake_syscall_without_a_sleeper) {
    nq_evq_t *e = mk(64);
    uint32_t out[64];
    for (int i = 0; i < 100000; i++) {
        nq_evq_notify(e, (uint32_t)i % 64);
        if (i % 100 == 99)
            nq_evq_poll(e, out, 64);
    }
    nq_evq_stats_t st;
    nq_evq_stats(e, &st);
    cr_assert_eq(st.wakes, 0, "a notify made a futex wake with nobody asleep");
    cr_assert_eq(st.parks, 0);
    nq_evq_free(e);
}

/* --- the overflow that cannot happen ------------------------------------ */

Test(evq, forced_overflow_is_reported_and_harmless) {
    nq_evq_t *e = NULL;
    /* A ring smaller than the token space: the hook breaks the invariant. */
    cr_assert_eq(nq__evq_new_ring(8, 4, &e), 0);
    for (uint32_t t = 0; t < 4; t++)
        cr_assert_eq(nq_evq_notify(e, t), 0);
    cr_assert_eq(nq_evq_notify(e, 4), NQ_ELIMIT, "a full ring is reported");
    cr_assert_eq(nq_evq_notify(e, 2), 0, "conflating into a queued token still works");
    check(e); /* token 4 is not left pending */
    uint32_t out[8];
    cr_assert_eq(nq_evq_poll(e, out, 8), 4);
    for (uint32_t t = 0; t < 4; t++)
        cr_assert_eq(out[t], t);
    cr_assert_eq(nq_evq_notify(e, 4), 0, "after the drain the token queues normally");
    cr_assert_eq(nq_evq_poll(e, out, 8), 1);
    cr_assert_eq(out[0], 4);
    nq_evq_free(e);
    cr_assert_eq(nq__evq_new_ring(8, 3, &e), NQ_EINVAL, "ring size must be a power of two");
    cr_assert_null(e);
}

/* --- blocking wait -------------------------------------------------------- */

Test(evq, wait_returns_at_once_when_ready) {
    nq_evq_t *e = mk(16);
    uint32_t out[16];
    nq_evq_notify(e, 5);
    nq_evq_notify(e, 9);
    cr_assert_eq(nq_evq_wait(e, out, 16, -1), 2);
    cr_assert(out[0] == 5 && out[1] == 9);
    int64_t t0 = now_ns();
    cr_assert_eq(nq_evq_wait(e, out, 16, 0), NQ_ETIMEDOUT, "timeout 0 does not block");
    cr_assert_lt(now_ns() - t0, 100 * MS);
    nq_evq_free(e);
}

Test(evq, timeouts_are_never_early) {
    nq_evq_t *e = mk(16);
    uint32_t out[1];
    const int64_t timeouts[] = {1, 1 * MS, 5 * MS, 20 * MS};
    for (size_t i = 0; i < sizeof(timeouts) / sizeof(timeouts[0]); i++) {
        int64_t t0 = now_ns();
        cr_assert_eq(nq_evq_wait(e, out, 1, timeouts[i]), NQ_ETIMEDOUT);
        int64_t took = now_ns() - t0;
        cr_assert_geq(took, timeouts[i], "timeout %lld ns returned after %lld ns",
                      (long long)timeouts[i], (long long)took);
        cr_assert_lt(took, timeouts[i] + 2000 * MS);
    }
    nq_evq_free(e);
}

struct later {
    nq_evq_t *e;
    int64_t delay_ns;
    uint32_t token;
};

static void *notify_later(void *arg) {
    struct later *l = arg;
    struct timespec ts = {0, (long)l->delay_ns};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
    nq_evq_notify(l->e, l->token);
    return NULL;
}

Test(evq, parked_wait_is_woken_by_another_thread) {
    nq_evq_t *e = mk(16);
    struct later l = {e, 50 * MS, 11};
    pthread_t t;
    pthread_create(&t, NULL, notify_later, &l);
    uint32_t out[4];
    int64_t t0 = now_ns();
    cr_assert_eq(nq_evq_wait(e, out, 4, -1), 1);
    cr_assert_eq(out[0], 11);
    cr_assert_geq(now_ns() - t0, 40 * MS, "it did wait for the notify");
    pthread_join(t, NULL);
    nq_evq_stats_t st;
    nq_evq_stats(e, &st);
    cr_assert_geq(st.parks, 1, "the consumer slept on the futex");
    cr_assert_eq(st.wakes, 1, "exactly one futex wake");
    nq_evq_free(e);
}

/* --- signals -------------------------------------------------------------- */

static atomic_int signals;
static void on_sigusr1(int sig) {
    (void)sig;
    atomic_fetch_add_explicit(&signals, 1, memory_order_relaxed);
}

struct storm {
    pthread_t target;
    atomic_int stop;
};

static void *signal_storm(void *arg) {
    struct storm *s = arg;
    struct timespec ms = {0, 1000000};
    while (!atomic_load(&s->stop)) {
        pthread_kill(s->target, SIGUSR1);
        nanosleep(&ms, NULL);
    }
    return NULL;
}

Test(evq, signals_never_surface) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigusr1; /* no SA_RESTART: the futex returns EINTR */
    sigemptyset(&sa.sa_mask);
    cr_assert_eq(sigaction(SIGUSR1, &sa, NULL), 0);

    nq_evq_t *e = mk(16);
    uint32_t out[1];
    struct storm s = {.target = pthread_self()};
    atomic_init(&s.stop, 0);
    pthread_t t;
    pthread_create(&t, NULL, signal_storm, &s);

    int64_t t0 = now_ns();
    cr_assert_eq(nq_evq_wait(e, out, 1, 50 * MS), NQ_ETIMEDOUT);
    cr_assert_geq(now_ns() - t0, 50 * MS, "an interrupted wait returned early");

    struct later l = {e, 80 * MS, 6};
    pthread_t n;
    pthread_create(&n, NULL, notify_later, &l);
    cr_assert_eq(nq_evq_wait(e, out, 1, -1), 1, "an untimed wait survives the storm");
    cr_assert_eq(out[0], 6);
    pthread_join(n, NULL);

    atomic_store(&s.stop, 1);
    pthread_join(t, NULL);
    cr_assert_gt(atomic_load(&signals), 10, "the storm did interrupt");
    signal(SIGUSR1, SIG_DFL);
    nq_evq_free(e);
}

/* --- release / acquire ---------------------------------------------------- */

/* The producer writes a plain (non-atomic) payload, then notifies; the
 * consumer reads it after the token comes out. Without release/acquire this
 * is a data race that ThreadSanitizer reports, and the consumer may see an
 * old value. Each payload slot is written only while its token is not
 * pending: the producer waits for the consumer's acknowledgement. */
#define RA_TOKENS 64
static long payload[RA_TOKENS];
static atomic_int acked[RA_TOKENS];

struct ra {
    nq_evq_t *e;
    int rounds;
};

static void *ra_producer(void *arg) {
    struct ra *r = arg;
    for (int round = 1; round <= r->rounds; round++) {
        for (uint32_t t = 0; t < RA_TOKENS; t++) {
            while (atomic_load_explicit(&acked[t], memory_order_acquire) != round - 1)
                sched_yield();
            payload[t] = round; /* plain store, published by the notify */
            nq_evq_notify(r->e, t);
        }
    }
    return NULL;
}

Test(evq, notify_releases_and_poll_acquires) {
    struct ra r = {mk(RA_TOKENS), SCALE(2000)};
    for (int t = 0; t < RA_TOKENS; t++) {
        payload[t] = 0;
        atomic_init(&acked[t], 0);
    }
    pthread_t p;
    pthread_create(&p, NULL, ra_producer, &r);
    long seen = 0, want = (long)r.rounds * RA_TOKENS;
    uint32_t out[RA_TOKENS];
    while (seen < want) {
        int n = nq_evq_wait(r.e, out, RA_TOKENS, 1000 * MS);
        cr_assert_gt(n, 0, "the producer stalled");
        for (int k = 0; k < n; k++) {
            uint32_t t = out[k];
            long round = atomic_load_explicit(&acked[t], memory_order_relaxed) + 1;
            cr_assert_eq(payload[t], round, "token %u: payload %ld, expected %ld", t, payload[t],
                         round);
            atomic_store_explicit(&acked[t], (int)round, memory_order_release);
            seen++;
        }
    }
    pthread_join(p, NULL);
    nq_evq_free(r.e);
}

/* --- stress: 4 producers x 1M notifies over 4096 tokens ------------------- */

#define ST_TOKENS 4096
#define ST_PRODUCERS 4
#define ST_ROUNDS 50

static _Atomic uint64_t st_gen[ST_TOKENS];  /* notifies per token, bumped before notify */
static uint64_t st_seen[ST_TOKENS];          /* gen seen at the last delivery */
static uint64_t st_delivered_round[ST_TOKENS];
static _Atomic uint64_t st_notifies_round[ST_TOKENS];
static atomic_int st_errors;

struct st_prod {
    nq_evq_t *e;
    pthread_barrier_t *start, *end;
    uint32_t seed;
    int per_round;
};

static void *st_producer(void *arg) {
    struct st_prod *p = arg;
    uint32_t x = p->seed;
    for (int round = 0; round < ST_ROUNDS; round++) {
        pthread_barrier_wait(p->start);
        for (int i = 0; i < p->per_round; i++) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            uint32_t t = x % ST_TOKENS;
            atomic_fetch_add_explicit(&st_notifies_round[t], 1, memory_order_relaxed);
            atomic_fetch_add_explicit(&st_gen[t], 1, memory_order_seq_cst);
            if (nq_evq_notify(p->e, t) != 0) /* NQ_ELIMIT would mean a token pending twice */
                atomic_fetch_add(&st_errors, 1);
        }
        pthread_barrier_wait(p->end);
    }
    return NULL;
}

/* A token may come out twice in one batch: delivered, notified again while
 * the poll goes on, and reached again by the same poll. That is not "pending
 * twice"; nq__evq_check and the exact-size ring (a second entry would make a
 * notify fail with NQ_ELIMIT) are what catch a token pending twice. */
static void st_take(const uint32_t *out, size_t n) {
    for (size_t k = 0; k < n; k++) {
        uint32_t t = out[k];
        cr_assert_lt(t, ST_TOKENS);
        st_seen[t] = atomic_load_explicit(&st_gen[t], memory_order_seq_cst);
        st_delivered_round[t]++;
    }
}

Test(evq, stress_4_producers_1M_notifies_4096_tokens, .timeout = 120) {
    nq_evq_t *e = mk(ST_TOKENS);
    nq_evq_stats_t st;
    nq_evq_stats(e, &st);
    cr_assert_eq(st.ring_size, ST_TOKENS, "the ring is exactly the token count");

    pthread_barrier_t start, end;
    pthread_barrier_init(&start, NULL, ST_PRODUCERS + 1);
    pthread_barrier_init(&end, NULL, ST_PRODUCERS + 1);
    struct st_prod prods[ST_PRODUCERS];
    pthread_t th[ST_PRODUCERS];
    int per_round = SCALE(1000000) / ST_ROUNDS;
    for (int i = 0; i < ST_PRODUCERS; i++) {
        prods[i] = (struct st_prod){e, &start, &end, 0x9e3779b9u * (uint32_t)(i + 1), per_round};
        pthread_create(&th[i], NULL, st_producer, &prods[i]);
    }
    uint32_t out[256];
    uint64_t total_delivered = 0;
    for (int round = 0; round < ST_ROUNDS; round++) {
        memset(st_delivered_round, 0, sizeof(st_delivered_round));
        for (int t = 0; t < ST_TOKENS; t++)
            atomic_store(&st_notifies_round[t], 0);
        pthread_barrier_wait(&start);
        /* Concurrent with the producers: polls and some blocking waits. */
        for (int i = 0; i < per_round / 64; i++) {
            size_t n;
            if (i % 8 == 0) {
                int w = nq_evq_wait(e, out, 256, 1 * MS);
                n = w > 0 ? (size_t)w : 0;
            } else {
                n = nq_evq_poll(e, out, 1 + (size_t)i % 256);
            }
            st_take(out, n);
            total_delivered += n;
        }
        pthread_barrier_wait(&end);
        /* Quiescent: drain, then every token notified after its last
         * delivery must have been delivered again. */
        size_t n;
        while ((n = nq_evq_poll(e, out, 256)) > 0) {
            st_take(out, n);
            total_delivered += n;
        }
        check(e);
        for (uint32_t t = 0; t < ST_TOKENS; t++) {
            uint64_t g = atomic_load(&st_gen[t]);
            cr_assert_eq(st_seen[t], g, "round %d token %u: last delivery saw gen %llu of %llu",
                         round, t, (unsigned long long)st_seen[t], (unsigned long long)g);
            uint64_t sent = atomic_load(&st_notifies_round[t]);
            cr_assert_leq(st_delivered_round[t], sent, "token %u delivered more than notified", t);
        }
    }
    for (int i = 0; i < ST_PRODUCERS; i++)
        pthread_join(th[i], NULL);
    cr_assert_eq(atomic_load(&st_errors), 0, "a notify failed");
    nq_evq_stats(e, &st);
    cr_assert_eq(st.delivered, total_delivered);
    cr_assert_eq(st.queued, total_delivered);
    cr_assert_eq(st.pending, 0);
    cr_log_info("evq stress: %d notifies, %llu deliveries, %llu parks, %llu wakes",
                ST_PRODUCERS * per_round * ST_ROUNDS, (unsigned long long)total_delivered,
                (unsigned long long)st.parks, (unsigned long long)st.wakes);
    pthread_barrier_destroy(&start);
    pthread_barrier_destroy(&end);
    nq_evq_free(e);
}
