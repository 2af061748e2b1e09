/* Criterion suite "evq": the conflating FIFO token queue. Every bullet of its
 * contract in nq.h: range checks, conflation, FIFO, bounded polls, ring
 * wrap-around (also against a reference model), exact stats, the no-overflow
 * invariant (and that a forced overflow is reported), the blocking wait
 * (wake-ups across threads, timeouts never early, signals never surface),
 * release/acquire (ThreadSanitizer-checked), and a 4-producer stress with
 * exact accounting. Worker threads never assert (Criterion's assertions
 * belong to the test's thread): they count what went wrong, and the test's
 * thread asserts on the counts. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/evq.h"
#include "nq.h"
#include "nqtest.h"

#define MS       1000000LL
#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

static nq_evq_t *mk(uint32_t n) {
    nq_evq_t *e = NULL;
    cr_assert_eq(nq_evq_new(n, &e), 0, "nq_evq_new(%u)", n);
    cr_assert_not_null(e);
    return e;
}

static nq_evq_t *mk_ring(uint32_t n, uint32_t ring) {
    nq_evq_t *e = NULL;
    cr_assert_eq(nq__evq_new_ring(n, ring, &e), 0, "nq__evq_new_ring(%u, %u)", n, ring);
    cr_assert_not_null(e);
    return e;
}

static void check(const nq_evq_t *e) {
    const char *why = NULL;
    int rc = nq__evq_check(e, &why);
    cr_assert_eq(rc, 0, "invariant broken: %s", why ? why : "(no reason given)");
}

static nq_evq_stats_t stats(const nq_evq_t *e) {
    nq_evq_stats_t st;
    memset(&st, 0xa5, sizeof(st)); /* every field must be written */
    cr_assert_eq(nq_evq_stats(e, &st), 0);
    cr_assert_eq(st.pending, st.queued - st.delivered, "pending is queued - delivered");
    return st;
}

/* xorshift64*: deterministic, thread-local by construction (state passed in). */
static uint32_t rnd(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return (uint32_t)((*s * 0x2545f4914f6cdd1dULL) >> 32);
}

static void shuffle(uint32_t *a, uint32_t n, uint64_t seed) {
    for (uint32_t i = 0; i < n; i++)
        a[i] = i;
    for (uint32_t i = n - 1; i > 0; i--) {
        uint32_t j = rnd(&seed) % (i + 1), t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

static void sleep_ns(int64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* --- arguments and token range ------------------------------------------- */

Test(evq, rejects_bad_arguments) {
    nq_evq_t *e = (nq_evq_t *)0x1;
    cr_assert_eq(nq_evq_new(0, &e), NQ_EINVAL);
    cr_assert_null(e, "out is cleared on failure");
    cr_assert_eq(nq_evq_new(NQ_EVQ_MAX_TOKENS + 1, &e), NQ_EINVAL);
    cr_assert_eq(nq_evq_new(UINT32_MAX, &e), NQ_EINVAL);
    cr_assert_eq(nq_evq_new(16, NULL), NQ_EINVAL);
    cr_assert_eq(nq_evq_new(0, NULL), NQ_EINVAL);

    cr_assert_eq(nq__evq_new_ring(8, 8, NULL), NQ_EINVAL);
    cr_assert_eq(nq__evq_new_ring(0, 8, &e), NQ_EINVAL);
    cr_assert_eq(nq__evq_new_ring(8, 0, &e), NQ_EINVAL);
    cr_assert_eq(nq__evq_new_ring(8, 3, &e), NQ_EINVAL, "ring size must be a power of two");
    cr_assert_eq(nq__evq_new_ring(8, 12, &e), NQ_EINVAL, "ring size must be a power of two");
    cr_assert_eq(nq__evq_new_ring(NQ_EVQ_MAX_TOKENS + 1, 8, &e), NQ_EINVAL);
    cr_assert_null(e);

    e = mk(16);
    uint32_t out[4];
    nq_evq_stats_t st;
    cr_assert_eq(nq_evq_notify(NULL, 0), NQ_EINVAL);
    cr_assert_eq(nq_evq_notify(e, 16), NQ_EINVAL, "token == max_tokens is out of range");
    cr_assert_eq(nq_evq_notify(e, 17), NQ_EINVAL);
    cr_assert_eq(nq_evq_notify(e, 1u << 31), NQ_EINVAL);
    cr_assert_eq(nq_evq_notify(e, UINT32_MAX), NQ_EINVAL);
    cr_assert_eq(nq_evq_poll(NULL, out, 4), 0);
    cr_assert_eq(nq_evq_poll(e, NULL, 4), 0);
    cr_assert_eq(nq_evq_poll(e, out, 0), 0);
    cr_assert_eq(nq_evq_wait(NULL, out, 4, 0), NQ_EINVAL);
    cr_assert_eq(nq_evq_wait(NULL, out, 4, -1), NQ_EINVAL, "checked before blocking");
    cr_assert_eq(nq_evq_wait(e, NULL, 4, -1), NQ_EINVAL);
    cr_assert_eq(nq_evq_wait(e, out, 0, -1), NQ_EINVAL);
    cr_assert_eq(nq_evq_stats(NULL, &st), NQ_EINVAL);
    cr_assert_eq(nq_evq_stats(e, NULL), NQ_EINVAL);
    check(e);
    st = stats(e);
    cr_assert(st.queued == 0 && st.delivered == 0 && st.batches == 0 && st.parks == 0 &&
                  st.wakes == 0,
              "rejected calls changed nothing");

    /* Bad arguments to poll/wait do not consume what is pending. */
    cr_assert_eq(nq_evq_notify(e, 15), 0, "the last token is in range");
    cr_assert_eq(nq_evq_poll(e, NULL, 4), 0);
    cr_assert_eq(nq_evq_poll(e, out, 0), 0);
    cr_assert_eq(nq_evq_wait(e, out, 0, 0), NQ_EINVAL);
    cr_assert_eq(nq_evq_poll(e, out, 4), 1);
    cr_assert_eq(out[0], 15);
    nq_evq_free(e);
    nq_evq_free(NULL);
}

Test(evq, tokens_are_0_to_max_minus_1) {
    static const struct {
        uint32_t n, ring;
    } sizes[] = {{1, 1}, {2, 2}, {3, 4}, {5, 8}, {64, 64}, {65, 128}, {1000, 1024}, {4097, 8192}};
    for (size_t i = 0; i < NELEM(sizes); i++) {
        uint32_t n = sizes[i].n;
        nq_evq_t *e = mk(n);
        nq_evq_stats_t st = stats(e);
        cr_assert_eq(st.max_tokens, n);
        cr_assert_eq(st.ring_size, sizes[i].ring, "max_tokens %u: ring %u, expected %u", n,
                     st.ring_size, sizes[i].ring);
        cr_assert(st.queued == 0 && st.delivered == 0 && st.pending == 0 && st.batches == 0 &&
                  st.parks == 0 && st.wakes == 0);
        for (uint32_t t = 0; t < n; t++)
            cr_assert_eq(nq_evq_notify(e, t), 0, "max_tokens %u token %u", n, t);
        cr_assert_eq(nq_evq_notify(e, n), NQ_EINVAL, "max_tokens %u token %u", n, n);
        cr_assert_eq(nq_evq_notify(e, n + 1), NQ_EINVAL);
        cr_assert_eq(nq_evq_notify(e, UINT32_MAX), NQ_EINVAL);
        check(e);
        uint32_t *out = calloc((size_t)n + 1, sizeof(*out));
        cr_assert_not_null(out);
        cr_assert_eq(nq_evq_poll(e, out, (size_t)n + 1), n);
        for (uint32_t t = 0; t < n; t++)
            cr_assert_eq(out[t], t);
        st = stats(e);
        cr_assert(st.queued == n && st.delivered == n && st.pending == 0 && st.batches == 1);
        free(out);
        nq_evq_free(e);
    }
}

/* O(delivered): the largest queue, polled one token at a time. A poll that
 * scanned the token space (16 Mi flags) would need minutes for this loop and
 * hit the timeout; an O(delivered) one takes milliseconds. */
Test(evq, largest_queue_polls_in_o_delivered, .timeout = 120) {
    const uint32_t max = NQ_EVQ_MAX_TOKENS;
    nq_evq_t *e = mk(max);
    nq_evq_stats_t st = stats(e);
    cr_assert_eq(st.max_tokens, max);
    cr_assert_eq(st.ring_size, max);
    uint32_t out[64];
    cr_assert_eq(nq_evq_notify(e, max - 1), 0);
    cr_assert_eq(nq_evq_notify(e, 0), 0);
    cr_assert_eq(nq_evq_notify(e, 12345), 0);
    cr_assert_eq(nq_evq_notify(e, max), NQ_EINVAL);
    cr_assert_eq(nq_evq_poll(e, out, 1), 1);
    cr_assert_eq(out[0], max - 1);
    cr_assert_eq(nq_evq_poll(e, out, 64), 2);
    cr_assert(out[0] == 0 && out[1] == 12345);
    const uint32_t rounds = SCALE(100000);
    for (uint32_t i = 0; i < rounds; i++) {
        uint32_t t = (i * 2654435761u) & (max - 1);
        cr_assert_eq(nq_evq_notify(e, t), 0);
        cr_assert_eq(nq_evq_poll(e, out, 64), 1);
        cr_assert_eq(out[0], t);
        cr_assert_eq(nq_evq_poll(e, out, 64), 0);
    }
    check(e);
    st = stats(e);
    cr_assert_eq(st.queued, 3 + (uint64_t)rounds);
    cr_assert_eq(st.delivered, st.queued);
    cr_assert_eq(st.batches, 2 + (uint64_t)rounds, "empty polls are not batches");
    nq_evq_free(e);
}

/* --- conflation and order ------------------------------------------------ */

Test(evq, conflates_until_polled) {
    nq_evq_t *e = mk(8);
    uint32_t out[8];
    for (int i = 0; i < 100; i++)
        cr_assert_eq(nq_evq_notify(e, 3), 0);
    nq_evq_stats_t st = stats(e);
    cr_assert_eq(st.queued, 1, "100 notifies of one token queue it once");
    cr_assert_eq(st.pending, 1);
    check(e);
    cr_assert_eq(nq_evq_poll(e, out, 8), 1, "100 notifies of one token: one delivery");
    cr_assert_eq(out[0], 3);
    cr_assert_eq(nq_evq_poll(e, out, 8), 0);
    cr_assert_eq(nq_evq_notify(e, 3), 0);
    cr_assert_eq(nq_evq_poll(e, out, 8), 1, "notified again after the poll: delivered again");
    cr_assert_eq(out[0], 3);
    cr_assert_eq(nq_evq_poll(e, out, 8), 0);
    st = stats(e);
    cr_assert_eq(st.queued, 2);
    cr_assert_eq(st.delivered, 2);
    cr_assert_eq(st.pending, 0);
    cr_assert_eq(st.batches, 2);
    cr_assert_eq(st.max_tokens, 8);
    cr_assert_eq(st.ring_size, 8);
    check(e);
    nq_evq_free(e);
}

Test(evq, conflation_is_per_token) {
    nq_evq_t *e = mk(8);
    uint32_t out[8];
    const uint32_t seq[] = {0, 1, 0, 2, 1, 0, 2, 2};
    for (size_t i = 0; i < NELEM(seq); i++)
        cr_assert_eq(nq_evq_notify(e, seq[i]), 0);
    cr_assert_eq(nq_evq_poll(e, out, 8), 3);
    cr_assert(out[0] == 0 && out[1] == 1 && out[2] == 2, "got %u %u %u", out[0], out[1], out[2]);
    cr_assert_eq(stats(e).queued, 3);
    nq_evq_free(e);
}

Test(evq, fifo_over_1000_tokens) {
    enum { N = 1000 };
    nq_evq_t *e = mk(N);
    uint32_t order[N], out[N];
    shuffle(order, N, 7);
    for (uint32_t i = 0; i < N; i++)
        cr_assert_eq(nq_evq_notify(e, order[i]), 0);
    for (uint32_t i = 0; i < N; i += 3) /* re-notifying a pending token does not move it */
        cr_assert_eq(nq_evq_notify(e, order[i]), 0);
    check(e);
    cr_assert_eq(stats(e).queued, N);
    cr_assert_eq(nq_evq_poll(e, out, N), N);
    for (uint32_t i = 0; i < N; i++)
        cr_assert_eq(out[i], order[i], "position %u: got %u, expected %u", i, out[i], order[i]);

    /* Half delivered: a delivered token notified again goes to the back, a
     * pending one keeps its place. */
    shuffle(order, N, 99);
    for (uint32_t i = 0; i < N; i++)
        cr_assert_eq(nq_evq_notify(e, order[i]), 0);
    cr_assert_eq(nq_evq_poll(e, out, N / 2), N / 2);
    for (uint32_t i = 0; i < N / 2; i++)
        cr_assert_eq(out[i], order[i]);
    for (uint32_t i = 0; i < 100; i++) {
        cr_assert_eq(nq_evq_notify(e, order[i]), 0);         /* delivered: re-queued */
        cr_assert_eq(nq_evq_notify(e, order[N / 2 + i]), 0); /* pending: unmoved */
    }
    check(e);
    cr_assert_eq(nq_evq_poll(e, out, N), N / 2 + 100);
    for (uint32_t i = 0; i < N / 2; i++)
        cr_assert_eq(out[i], order[N / 2 + i], "position %u", i);
    for (uint32_t i = 0; i < 100; i++)
        cr_assert_eq(out[N / 2 + i], order[i], "re-queued position %u", i);
    check(e);
    nq_evq_free(e);
}

Test(evq, poll_with_a_limit_leaves_the_rest_in_order) {
    enum { N = 1000 };
    nq_evq_t *e = mk(N);
    uint32_t out[N];
    for (uint32_t i = 0; i < N; i++)
        cr_assert_eq(nq_evq_notify(e, (i * 37) % N), 0); /* 37 is coprime with 1000 */
    uint32_t next = 0, polls = 0;
    size_t n;
    while ((n = nq_evq_poll(e, out, 7)) > 0) {
        polls++;
        cr_assert_eq(n, next + 7 <= N ? 7 : N - next, "poll %u delivered %zu", polls, n);
        for (size_t k = 0; k < n; k++, next++)
            cr_assert_eq(out[k], (next * 37) % N, "position %u", next);
        nq_evq_stats_t st = stats(e);
        cr_assert_eq(st.pending, N - next);
        cr_assert_eq(st.delivered, next);
        if (polls % 16 == 0) /* check() is quadratic in what is pending */
            check(e);
    }
    check(e);
    cr_assert_eq(next, N);
    cr_assert_eq(polls, (N + 6) / 7);
    cr_assert_eq(stats(e).batches, polls);

    /* max = 1 takes exactly the oldest; a huge max takes what is there. */
    for (uint32_t t = 0; t < 10; t++)
        nq_evq_notify(e, 9 - t);
    cr_assert_eq(nq_evq_poll(e, out, 1), 1);
    cr_assert_eq(out[0], 9);
    cr_assert_eq(nq_evq_poll(e, out, SIZE_MAX), 9, "max beyond the ring size is fine");
    for (uint32_t k = 0; k < 9; k++)
        cr_assert_eq(out[k], 8 - k);
    nq_evq_free(e);
}

Test(evq, wraps_around_the_ring) {
    /* 3 tokens in a ring of 4 slots: positions run far past the ring size
     * and past 2^16, so each slot's sequence number laps many times. */
    nq_evq_t *e = mk(3);
    uint32_t out[8];
    const uint32_t rounds = 100000;
    for (uint32_t round = 0; round < rounds; round++) {
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
    nq_evq_stats_t st = stats(e);
    cr_assert_eq(st.queued, 2 * (uint64_t)rounds);
    cr_assert_eq(st.delivered, 2 * (uint64_t)rounds);
    nq_evq_free(e);

    /* An exactly-sized ring (8 tokens, 8 slots) filled completely each round,
     * in a different order, drained in two unequal polls. */
    e = mk(8);
    cr_assert_eq(stats(e).ring_size, 8);
    const uint32_t rounds8 = SCALE(rounds);
    for (uint32_t round = 0; round < rounds8; round++) {
        for (uint32_t k = 0; k < 8; k++)
            cr_assert_eq(nq_evq_notify(e, (round + k * 3) % 8), 0, "round %u", round);
        cr_assert_eq(nq_evq_poll(e, out, 3), 3);
        cr_assert_eq(nq_evq_poll(e, out + 3, 8), 5);
        for (uint32_t k = 0; k < 8; k++)
            cr_assert_eq(out[k], (round + k * 3) % 8, "round %u position %u", round, k);
    }
    check(e);
    st = stats(e);
    cr_assert_eq(st.queued, 8 * (uint64_t)rounds8);
    cr_assert_eq(st.delivered, 8 * (uint64_t)rounds8);
    cr_assert_eq(st.batches, 2 * (uint64_t)rounds8);
    nq_evq_free(e);
}

/* Random notifies and polls of random sizes, compared step by step with a
 * reference model (a FIFO of distinct tokens and a pending flag per token),
 * on rings from 1 slot up, some of them larger than the token count. */
Test(evq, matches_a_model_under_random_operations) {
    static const struct {
        uint32_t n, ring;
    } cfg[] = {{1, 1}, {2, 2}, {3, 4}, {5, 8}, {5, 16}, {8, 8}, {100, 128}, {128, 128}};
    uint64_t seed = 0x1234567887654321ULL;
    for (size_t c = 0; c < NELEM(cfg); c++) {
        const uint32_t n = cfg[c].n;
        nq_evq_t *e = mk_ring(n, cfg[c].ring);
        uint32_t *fifo = calloc(n, sizeof(*fifo)), *out = calloc((size_t)n + 2, sizeof(*out));
        unsigned char *pend = calloc(n, 1);
        cr_assert(fifo && out && pend);
        uint64_t head = 0, tail = 0, batches = 0; /* model positions */
        for (int step = 0; step < 200000; step++) {
            uint32_t r = rnd(&seed) % 100;
            if (r < 55) {
                uint32_t t = rnd(&seed) % n;
                cr_assert_eq(nq_evq_notify(e, t), 0, "cfg %zu step %d", c, step);
                if (!pend[t]) {
                    pend[t] = 1;
                    fifo[tail++ % n] = t;
                }
            } else if (r < 97) {
                size_t max = 1 + rnd(&seed) % (n + 2);
                size_t want = tail - head < max ? (size_t)(tail - head) : max;
                size_t got = nq_evq_poll(e, out, max);
                cr_assert_eq(got, want, "cfg %zu step %d: poll(%zu) gave %zu, model %zu", c, step,
                             max, got, want);
                for (size_t k = 0; k < got; k++) {
                    uint32_t t = fifo[head++ % n];
                    cr_assert_eq(out[k], t, "cfg %zu step %d: out[%zu] %u, model %u", c, step, k,
                                 out[k], t);
                    pend[t] = 0;
                }
                batches += got > 0;
            } else {
                check(e);
                nq_evq_stats_t st = stats(e);
                cr_assert_eq(st.queued, tail);
                cr_assert_eq(st.delivered, head);
                cr_assert_eq(st.pending, tail - head);
                cr_assert_eq(st.batches, batches);
            }
        }
        check(e);
        free(fifo);
        free(out);
        free(pend);
        nq_evq_free(e); /* with tokens still pending: nothing leaks */
    }
}

/* --- stats ------------------------------------------------------------------ */

Test(evq, stats_are_exact_single_threaded) {
    nq_evq_t *e = mk(16);
    uint32_t out[16];
    nq_evq_stats_t st = stats(e);
    cr_assert(st.max_tokens == 16 && st.ring_size == 16 && st.queued == 0 && st.delivered == 0 &&
              st.pending == 0 && st.batches == 0 && st.parks == 0 && st.wakes == 0);

    nq_evq_notify(e, 1);
    nq_evq_notify(e, 2);
    nq_evq_notify(e, 3);
    nq_evq_notify(e, 2); /* conflated */
    st = stats(e);
    cr_assert(st.queued == 3 && st.delivered == 0 && st.pending == 3 && st.batches == 0);

    cr_assert_eq(nq_evq_poll(e, out, 2), 2);
    st = stats(e);
    cr_assert(st.queued == 3 && st.delivered == 2 && st.pending == 1 && st.batches == 1);

    cr_assert_eq(nq_evq_wait(e, out, 16, -1), 1, "wait with a token pending");
    cr_assert_eq(out[0], 3);
    st = stats(e);
    cr_assert(st.delivered == 3 && st.pending == 0 && st.batches == 2,
              "a wait that delivers is a batch");

    cr_assert_eq(nq_evq_poll(e, out, 16), 0);
    cr_assert_eq(nq_evq_wait(e, out, 16, 0), NQ_ETIMEDOUT);
    st = stats(e);
    cr_assert(st.delivered == 3 && st.batches == 2, "empty polls and waits are not batches");
    cr_assert_eq(st.parks, 0, "timeout 0 never parks");

    /* 20 ms with nothing to do: it spins briefly, yields, then parks. */
    cr_assert_eq(nq_evq_wait(e, out, 16, 20 * MS), NQ_ETIMEDOUT);
    st = stats(e);
    cr_assert_geq(st.parks, 1, "a 20 ms wait slept on the futex");
    cr_assert_eq(st.wakes, 0, "nobody notified");
    cr_assert(st.queued == 3 && st.delivered == 3 && st.batches == 2);
    uint64_t parks = st.parks;

    /* The timed-out waiter withdrew its announcement: no wake syscall now. */
    for (uint32_t t = 0; t < 16; t++)
        nq_evq_notify(e, t);
    st = stats(e);
    cr_assert_eq(st.wakes, 0, "a notify woke a consumer that had left");
    cr_assert(st.queued == 19 && st.pending == 16 && st.parks == parks);
    cr_assert_eq(nq_evq_wait(e, out, 16, 20 * MS), 16);
    st = stats(e);
    cr_assert(st.delivered == 19 && st.pending == 0 && st.batches == 3 && st.parks == parks &&
              st.wakes == 0);
    nq_evq_free(e);
}

Test(evq, no_wake_syscall_without_a_sleeper) {
    nq_evq_t *e = mk(64);
    uint32_t out[64];
    uint64_t delivered = 0;
    for (int i = 0; i < 100000; i++) {
        cr_assert_eq(nq_evq_notify(e, (uint32_t)i % 64), 0);
        if (i % 100 == 99)
            delivered += nq_evq_poll(e, out, 64);
    }
    delivered += nq_evq_poll(e, out, 64);
    nq_evq_stats_t st = stats(e);
    cr_assert_eq(st.wakes, 0, "a notify made a futex wake with nobody asleep");
    cr_assert_eq(st.parks, 0);
    cr_assert_eq(st.delivered, delivered);
    cr_assert_eq(st.queued, delivered);
    nq_evq_free(e);
}

/* --- the overflow that cannot happen ------------------------------------ */

Test(evq, forced_overflow_is_reported_and_harmless) {
    /* A ring smaller than the token space: the hook breaks the invariant. */
    nq_evq_t *e = mk_ring(8, 4);
    nq_evq_stats_t st = stats(e);
    cr_assert(st.max_tokens == 8 && st.ring_size == 4);
    for (uint32_t t = 0; t < 4; t++)
        cr_assert_eq(nq_evq_notify(e, t), 0);
    cr_assert_eq(nq_evq_notify(e, 4), NQ_ELIMIT, "a full ring is reported");
    check(e); /* token 4 is not left pending */
    cr_assert_eq(nq_evq_notify(e, 4), NQ_ELIMIT, "token 4 was not left pending (no conflation)");
    cr_assert_eq(nq_evq_notify(e, 5), NQ_ELIMIT);
    cr_assert_eq(nq_evq_notify(e, 2), 0, "conflating into a queued token still works");
    check(e);
    st = stats(e);
    cr_assert(st.queued == 4 && st.pending == 4 && st.delivered == 0,
              "the refused notifies queued nothing");

    uint32_t out[8];
    cr_assert_eq(nq_evq_poll(e, out, 8), 4, "the ring keeps working");
    for (uint32_t t = 0; t < 4; t++)
        cr_assert_eq(out[t], t);
    cr_assert_eq(nq_evq_poll(e, out, 8), 0, "the refused tokens never come out");
    check(e);
    cr_assert_eq(nq_evq_notify(e, 4), 0, "after the drain the token queues normally");
    cr_assert_eq(nq_evq_poll(e, out, 8), 1);
    cr_assert_eq(out[0], 4);

    /* Overflow again after the ring has wrapped, then keep going. */
    for (uint32_t round = 0; round < 1000; round++) {
        for (uint32_t k = 0; k < 4; k++)
            cr_assert_eq(nq_evq_notify(e, (round + k) % 8), 0);
        cr_assert_eq(nq_evq_notify(e, (round + 4) % 8), NQ_ELIMIT, "round %u", round);
        cr_assert_eq(nq_evq_poll(e, out, 8), 4);
        for (uint32_t k = 0; k < 4; k++)
            cr_assert_eq(out[k], (round + k) % 8);
    }
    check(e);
    st = stats(e);
    cr_assert_eq(st.queued, 5 + 4000);
    cr_assert_eq(st.delivered, st.queued);
    nq_evq_free(e);
}

/* --- many notifiers, no consumer ------------------------------------------ */

struct same {
    nq_evq_t *e;
    pthread_barrier_t *go;
    uint32_t own;
    long bad; /* notifies that did not return 0; read after join */
};

static void *same_token_notifier(void *p) {
    struct same *a = p;
    pthread_barrier_wait(a->go);
    for (int i = 0; i < 1000; i++) {
        if (nq_evq_notify(a->e, 7) != 0)
            a->bad++;
        if (nq_evq_notify(a->e, a->own) != 0)
            a->bad++;
    }
    return NULL;
}

Test(evq, concurrent_notifies_of_one_token_queue_it_once, .timeout = 60) {
    /* No consumer runs: however the notifiers race for token 7, it is queued
     * once, and the exactly-sized ring never overflows. Repeated, so the race
     * for the first notify is run many times. */
    enum { THREADS = 4 };
    const int reps = SCALE(200);
    nq_evq_t *e = mk(16);
    uint32_t out[16];
    for (int rep = 0; rep < reps; rep++) {
        pthread_barrier_t go;
        pthread_barrier_init(&go, NULL, THREADS);
        struct same a[THREADS];
        pthread_t th[THREADS];
        for (int i = 0; i < THREADS; i++) {
            a[i] = (struct same){e, &go, 8 + (uint32_t)i, 0};
            cr_assert_eq(pthread_create(&th[i], NULL, same_token_notifier, &a[i]), 0);
        }
        for (int i = 0; i < THREADS; i++) {
            pthread_join(th[i], NULL);
            cr_assert_eq(a[i].bad, 0, "rep %d: a notify failed", rep);
        }
        pthread_barrier_destroy(&go);
        check(e);
        nq_evq_stats_t st = stats(e);
        cr_assert_eq(st.pending, 1 + THREADS, "rep %d: %llu pending", rep,
                     (unsigned long long)st.pending);
        cr_assert_eq(nq_evq_poll(e, out, 16), 1 + THREADS);
        unsigned mask = 0;
        for (int k = 0; k < 1 + THREADS; k++) {
            cr_assert(out[k] == 7 || (out[k] >= 8 && out[k] < 8 + THREADS), "token %u", out[k]);
            cr_assert_not(mask & (1u << out[k]), "token %u delivered twice", out[k]);
            mask |= 1u << out[k];
        }
    }
    nq_evq_stats_t st = stats(e);
    cr_assert_eq(st.queued, (uint64_t)reps * (1 + THREADS));
    cr_assert_eq(st.wakes, 0);
    nq_evq_free(e);
}

/* --- blocking wait -------------------------------------------------------- */

Test(evq, wait_returns_at_once_when_ready) {
    nq_evq_t *e = mk(16);
    uint32_t out[16];
    nq_evq_notify(e, 5);
    nq_evq_notify(e, 9);
    nq_evq_notify(e, 12);
    cr_assert_eq(nq_evq_wait(e, out, 2, -1), 2, "max bounds a wait too");
    cr_assert(out[0] == 5 && out[1] == 9);
    cr_assert_eq(nq_evq_wait(e, out, 16, -1), 1, "the rest, still without blocking");
    cr_assert_eq(out[0], 12);
    nq_evq_notify(e, 1);
    cr_assert_eq(nq_evq_wait(e, out, 16, 0), 1, "timeout 0 still delivers what is there");
    cr_assert_eq(out[0], 1);
    nq_evq_stats_t st = stats(e);
    cr_assert_eq(st.parks, 0, "nothing slept");
    cr_assert_eq(st.batches, 3);
    nq_evq_free(e);
}

Test(evq, wait_with_timeout_0_does_not_block) {
    nq_evq_t *e = mk(16);
    uint32_t out[1];
    int64_t t0 = now_ns();
    for (int i = 0; i < 1000; i++)
        cr_assert_eq(nq_evq_wait(e, out, 1, 0), NQ_ETIMEDOUT);
    cr_assert_lt(now_ns() - t0, 2000 * MS, "1000 non-blocking waits took seconds");
    nq_evq_stats_t st = stats(e);
    cr_assert_eq(st.parks, 0);
    cr_assert_eq(st.batches, 0);
    nq_evq_free(e);
}

Test(evq, timeouts_are_never_early) {
    nq_evq_t *e = mk(16);
    uint32_t out[1];
    const int64_t timeouts[] = {1,      10000,   100000, 300000, 1 * MS,
                                5 * MS, 20 * MS, 1 * MS, 5 * MS, 20 * MS};
    for (size_t i = 0; i < NELEM(timeouts); i++) {
        int64_t t0 = now_ns();
        int rc = nq_evq_wait(e, out, 1, timeouts[i]);
        int64_t took = now_ns() - t0;
        cr_assert_eq(rc, NQ_ETIMEDOUT, "timeout %lld: rc %d", (long long)timeouts[i], rc);
        cr_assert_geq(took, timeouts[i], "timeout %lld ns returned after %lld ns",
                      (long long)timeouts[i], (long long)took);
        cr_assert_lt(took, timeouts[i] + 2000 * MS, "timeout %lld ns took %lld ns",
                     (long long)timeouts[i], (long long)took);
    }
    nq_evq_stats_t st = stats(e);
    cr_assert_eq(st.batches, 0);
    cr_assert_eq(st.wakes, 0);
    nq_evq_free(e);
}

struct later {
    nq_evq_t *e;
    int64_t delay_ns;
    uint32_t token;
    int rc; /* read after join */
};

static void *notify_later(void *arg) {
    struct later *l = arg;
    sleep_ns(l->delay_ns);
    l->rc = nq_evq_notify(l->e, l->token);
    return NULL;
}

Test(evq, parked_wait_is_woken_by_another_thread) {
    nq_evq_t *e = mk(16);
    struct later l = {e, 50 * MS, 11, -1};
    pthread_t t;
    uint32_t out[4];
    int64_t t0 = now_ns();
    cr_assert_eq(pthread_create(&t, NULL, notify_later, &l), 0);
    int rc = nq_evq_wait(e, out, 4, -1);
    int64_t took = now_ns() - t0;
    pthread_join(t, NULL);
    cr_assert_eq(rc, 1);
    cr_assert_eq(out[0], 11);
    cr_assert_eq(l.rc, 0);
    cr_assert_geq(took, 50 * MS, "returned before the notify");
    nq_evq_stats_t st = stats(e);
    cr_assert_geq(st.parks, 1, "the consumer slept on the futex");
    cr_assert_eq(st.wakes, 1, "exactly one futex wake");
    cr_assert(st.queued == 1 && st.delivered == 1 && st.batches == 1);
    check(e);
    nq_evq_free(e);
}

Test(evq, timed_wait_is_woken_before_its_timeout) {
    /* INT64_MAX must saturate, not overflow into a deadline in the past. */
    const int64_t timeouts[] = {10000 * MS, INT64_MAX};
    for (size_t i = 0; i < NELEM(timeouts); i++) {
        nq_evq_t *e = mk(16);
        struct later l = {e, 50 * MS, 3, -1};
        pthread_t t;
        uint32_t out[4];
        int64_t t0 = now_ns();
        cr_assert_eq(pthread_create(&t, NULL, notify_later, &l), 0);
        int rc = nq_evq_wait(e, out, 4, timeouts[i]);
        int64_t took = now_ns() - t0;
        pthread_join(t, NULL);
        cr_assert_eq(rc, 1, "timeout %lld: rc %d", (long long)timeouts[i], rc);
        cr_assert_eq(out[0], 3);
        cr_assert_geq(took, 50 * MS);
        cr_assert_lt(took, 5000 * MS, "the wake-up was lost: it took %lld ns", (long long)took);
        nq_evq_stats_t st = stats(e);
        cr_assert_geq(st.parks, 1);
        cr_assert_eq(st.wakes, 1);
        nq_evq_free(e);
    }
}

/* Ping-pong: every delivery goes through nq_evq_wait(-1), and the producer
 * often pauses so the consumer parks. A lost wake-up hangs the test (and the
 * timeout fails it). */
struct pp {
    nq_evq_t *e;
    long n;
    atomic_long acked;
    long bad; /* read after join */
};

static void *pp_producer(void *p) {
    struct pp *s = p;
    for (long i = 0; i < s->n; i++) {
        if (i % 32 == 0)
            sleep_ns(200000); /* 0.2 ms: long enough for the consumer to park */
        if (nq_evq_notify(s->e, (uint32_t)(i % 16)) != 0)
            s->bad++;
        int spins = 0;
        while (atomic_load_explicit(&s->acked, memory_order_acquire) != i + 1)
            if (++spins > 64)
                sched_yield();
    }
    return NULL;
}

Test(evq, wait_ping_pong_loses_no_wakeup, .timeout = 120) {
    static struct pp s; /* static: outlives an early assertion */
    s.e = mk(16);
    s.n = SCALE(20000);
    s.bad = 0;
    atomic_init(&s.acked, 0);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, pp_producer, &s), 0);
    uint32_t out[16];
    for (long i = 0; i < s.n; i++) {
        int rc = nq_evq_wait(s.e, out, 16, -1);
        cr_assert_eq(rc, 1, "iteration %ld: rc %d", i, rc);
        cr_assert_eq(out[0], (uint32_t)(i % 16), "iteration %ld", i);
        atomic_store_explicit(&s.acked, i + 1, memory_order_release);
    }
    pthread_join(t, NULL);
    cr_assert_eq(s.bad, 0);
    nq_evq_stats_t st = stats(s.e);
    cr_assert_eq(st.delivered, (uint64_t)s.n);
    cr_assert_eq(st.batches, (uint64_t)s.n);
    cr_assert_geq(st.parks, 1, "the consumer never parked: the test did not test parking");
    cr_assert_geq(st.wakes, 1, "it parked, so some notify must have woken it");
    cr_assert_leq(st.wakes, (uint64_t)s.n, "at most one wake per notify");
    cr_log_info("evq ping-pong: %ld waits, %llu parks, %llu wakes", s.n,
                (unsigned long long)st.parks, (unsigned long long)st.wakes);
    check(s.e);
    nq_evq_free(s.e);
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
    struct sigaction sa, old;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigusr1; /* no SA_RESTART: the futex returns EINTR */
    sigemptyset(&sa.sa_mask);
    cr_assert_eq(sigaction(SIGUSR1, &sa, &old), 0);
    atomic_store(&signals, 0);

    nq_evq_t *e = mk(16);
    uint32_t out[1];
    static struct storm s; /* static: outlives an early assertion */
    s.target = pthread_self();
    atomic_init(&s.stop, 0);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, signal_storm, &s), 0);

    /* A timed wait: ends by its timeout, never early, never EINTR. */
    int64_t t0 = now_ns();
    int rc = nq_evq_wait(e, out, 1, 50 * MS);
    int64_t took = now_ns() - t0;
    int during_timed = atomic_load(&signals);
    cr_assert_eq(rc, NQ_ETIMEDOUT, "rc %d (%s)", rc, nq_err_name(rc));
    cr_assert_geq(took, 50 * MS, "an interrupted wait returned early");

    /* An untimed wait: ends only with the token notified 80 ms later. */
    struct later l = {e, 80 * MS, 6, -1};
    pthread_t n;
    t0 = now_ns();
    cr_assert_eq(pthread_create(&n, NULL, notify_later, &l), 0);
    rc = nq_evq_wait(e, out, 1, -1);
    took = now_ns() - t0;
    pthread_join(n, NULL);
    cr_assert_eq(rc, 1, "rc %d (%s)", rc, nq_err_name(rc));
    cr_assert_eq(out[0], 6);
    cr_assert_geq(took, 80 * MS, "returned before the notify");

    atomic_store(&s.stop, 1);
    pthread_join(t, NULL);
    cr_assert_gt(during_timed, 5, "the storm did not interrupt the timed wait");
    cr_assert_gt(atomic_load(&signals), 10, "the storm did not interrupt");
    cr_assert_eq(sigaction(SIGUSR1, &old, NULL), 0);
    nq_evq_free(e);
}

/* --- release / acquire ---------------------------------------------------- */

/* Four owner threads each own 16 tokens. An owner writes a plain
 * (non-atomic) payload for a token, then notifies it; the consumer reads the
 * payload after the token comes out. Nothing else orders the write before
 * the read: if notify were not a release, or the poll not an acquire, this
 * is a data race that ThreadSanitizer reports (and a stale read on weak
 * hardware). There is no race otherwise: an owner writes a token's payload
 * only after the consumer acknowledged (release/acquire on ra_acked) the
 * previous round of that token, so at any time either the owner or the
 * consumer may touch it, never both. A noise thread hammers 64 other tokens
 * so the owners' claims race with its claims on the ring. */
#define RA_OWNERS 4
#define RA_PER    16
#define RA_OWNED  (RA_OWNERS * RA_PER)
#define RA_NOISE  64

struct ra_payload {
    uint64_t round, twice;
    uint32_t token;
};
static struct ra_payload ra_data[RA_OWNED]; /* plain, on purpose */
static atomic_uint ra_acked[RA_OWNED];      /* written by the consumer only */
static atomic_int ra_stop;
static atomic_long ra_bad;

struct ra_owner {
    nq_evq_t *e;
    uint32_t first;
    unsigned rounds;
};

static void *ra_owner_fn(void *p) {
    struct ra_owner *o = p;
    unsigned round[RA_PER] = {0}, finished = 0;
    while (finished < RA_PER) {
        int progressed = 0;
        for (uint32_t k = 0; k < RA_PER; k++) {
            uint32_t t = o->first + k;
            if (round[k] == o->rounds ||
                atomic_load_explicit(&ra_acked[t], memory_order_acquire) != round[k])
                continue;
            round[k]++;
            ra_data[t].round = round[k];
            ra_data[t].twice = 2 * (uint64_t)round[k];
            ra_data[t].token = t;
            if (nq_evq_notify(o->e, t) != 0) /* the release under test */
                atomic_fetch_add(&ra_bad, 1);
            finished += round[k] == o->rounds;
            progressed = 1;
        }
        if (!progressed)
            sched_yield();
    }
    return NULL;
}

static void *ra_noise_fn(void *p) {
    nq_evq_t *e = p;
    for (uint32_t i = 0; !atomic_load_explicit(&ra_stop, memory_order_relaxed); i++) {
        if (nq_evq_notify(e, RA_OWNED + i % RA_NOISE) != 0)
            atomic_fetch_add(&ra_bad, 1);
        if (i % 256 == 255)
            sched_yield();
    }
    return NULL;
}

Test(evq, notify_releases_and_poll_acquires, .timeout = 120) {
    nq_evq_t *e = mk(RA_OWNED + RA_NOISE);
    const unsigned rounds = SCALE(2000);
    memset(ra_data, 0, sizeof(ra_data));
    for (int t = 0; t < RA_OWNED; t++)
        atomic_init(&ra_acked[t], 0);
    atomic_store(&ra_stop, 0);
    atomic_store(&ra_bad, 0);
    static pthread_t owners[RA_OWNERS], noise;
    static struct ra_owner o[RA_OWNERS]; /* static: outlives an early assertion */
    for (int i = 0; i < RA_OWNERS; i++) {
        o[i] = (struct ra_owner){e, (uint32_t)i * RA_PER, rounds};
        cr_assert_eq(pthread_create(&owners[i], NULL, ra_owner_fn, &o[i]), 0);
    }
    cr_assert_eq(pthread_create(&noise, NULL, ra_noise_fn, e), 0);

    const long want = (long)rounds * RA_OWNED;
    long got = 0, noise_seen = 0;
    uint32_t out[32];
    for (long i = 0; got < want; i++) {
        int n;
        if (i % 2)
            n = nq_evq_wait(e, out, 32, 2000 * MS);
        else
            n = (int)nq_evq_poll(e, out, 1 + (size_t)i % 32);
        cr_assert(n >= 0 || (i % 2 && n == NQ_ETIMEDOUT), "rc %d", n);
        cr_assert(n != NQ_ETIMEDOUT, "stalled after %ld of %ld deliveries", got, want);
        for (int k = 0; k < n; k++) {
            uint32_t t = out[k];
            cr_assert_lt(t, RA_OWNED + RA_NOISE);
            if (t >= RA_OWNED) {
                noise_seen++;
                continue;
            }
            unsigned r = atomic_load_explicit(&ra_acked[t], memory_order_relaxed) + 1;
            struct ra_payload d = ra_data[t]; /* plain read, after the acquire */
            cr_assert(d.round == r && d.twice == 2 * (uint64_t)r && d.token == t,
                      "token %u: payload {%llu, %llu, %u}, expected round %u", t,
                      (unsigned long long)d.round, (unsigned long long)d.twice, d.token, r);
            atomic_store_explicit(&ra_acked[t], r, memory_order_release);
            got++;
        }
    }
    for (int i = 0; i < RA_OWNERS; i++)
        pthread_join(owners[i], NULL);
    atomic_store(&ra_stop, 1);
    pthread_join(noise, NULL);
    cr_assert_eq(atomic_load(&ra_bad), 0, "a notify failed");
    size_t n;
    while ((n = nq_evq_poll(e, out, 32)) > 0)
        for (size_t k = 0; k < n; k++)
            cr_assert_geq(out[k], RA_OWNED, "an owned token came out after its last round");
    check(e);
    cr_log_info("evq release/acquire: %ld owned deliveries, %ld noise", got, noise_seen);
    nq_evq_free(e);
}

/* --- one batch, distinct tokens ------------------------------------------ */

/* A poll delivers each pending token once: a token delivered by a poll and
 * notified again while that poll is still running is pending again for the
 * next poll, not a second entry in the same batch. (A batch of a 64-token
 * queue can never hold more than 64 tokens.) A spammer keeps every token
 * re-notified while the consumer polls with room for 256. */
static atomic_int db_stop, db_started;

static void *db_spammer(void *p) {
    nq_evq_t *e = p;
    long bad = 0;
    atomic_store(&db_started, 1);
    for (uint32_t i = 0; !atomic_load_explicit(&db_stop, memory_order_relaxed); i++) {
        if (nq_evq_notify(e, i % 64) != 0)
            bad++;
        if (i % 1024 == 1023)
            sched_yield(); /* if it shares a CPU with the consumer, let it poll */
    }
    return (void *)(intptr_t)bad;
}

Test(evq, a_batch_never_holds_a_token_twice, .timeout = 60) {
    nq_evq_t *e = mk(64);
    atomic_store(&db_stop, 0);
    atomic_store(&db_started, 0);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, db_spammer, e), 0);
    while (!atomic_load(&db_started))
        sched_yield();
    uint32_t out[256];
    uint64_t stamp[64] = {0}, dups = 0, first_batch = 0, delivered = 0, b = 0;
    uint32_t first_token = 0;
    size_t first_n = 0;
    /* Enough deliveries to see it many times over; the time bound only
     * matters on a machine so loaded that the two threads take turns. */
    const uint64_t want = SCALE(300000);
    const int64_t t0 = now_ns();
    while (delivered < want && (delivered < 1000 || now_ns() - t0 < 5000 * MS)) {
        size_t n = nq_evq_poll(e, out, 256);
        if (n == 0) {
            sched_yield(); /* let the spammer run if it shares our CPU */
            continue;
        }
        b++;
        delivered += n;
        for (size_t k = 0; k < n; k++) {
            uint32_t tok = out[k];
            cr_assert_lt(tok, 64);
            if (stamp[tok] == b && dups++ == 0) {
                first_batch = b;
                first_token = tok;
                first_n = n;
            }
            stamp[tok] = b;
        }
    }
    atomic_store(&db_stop, 1);
    void *bad;
    pthread_join(t, &bad);
    cr_assert_eq((intptr_t)bad, 0, "a notify failed");
    cr_assert_eq(dups, 0,
                 "%llu repeats of a token within one batch (%llu tokens in %llu batches); "
                 "first: batch %llu delivered %zu tokens of a 64-token queue, token %u twice",
                 (unsigned long long)dups, (unsigned long long)delivered, (unsigned long long)b,
                 (unsigned long long)first_batch, first_n, first_token);
    size_t n;
    while ((n = nq_evq_poll(e, out, 256)) > 0)
        cr_assert_leq(n, 64);
    check(e);
    nq_evq_free(e);
}

/* --- stress: 4 producers x 1M notifies over 4096 tokens ------------------- */

/* Rounds with barriers. In a round, producers notify random tokens, each
 * first bumping gen[t]; the consumer polls (and sometimes waits) at the same
 * time and, after each delivery of t, records seen[t] = gen[t]. Once the
 * producers are done, the consumer drains the queue and, quiescent, checks
 * that every token notified after its last delivery was delivered again
 * (seen == gen), that no token was delivered more often than notified in the
 * round, that no batch held a token twice, and the queue's invariants. The
 * ring is exactly 4096 slots: a token pending twice would, sooner or later,
 * make a notify fail with NQ_ELIMIT, so every notify must return 0. */
#define ST_TOKENS    4096
#define ST_PRODUCERS 4
#define ST_ROUNDS    50
#define ST_NOTIFIES  SCALE(1000000) /* per producer */

static _Atomic uint64_t st_gen[ST_TOKENS];  /* notifies of t ever, bumped before notify */
static _Atomic uint32_t st_sent[ST_TOKENS]; /* notifies of t this round */
static atomic_int st_done;                  /* producers done with this round */
static atomic_int st_bad_rc;                /* first notify rc != 0 */
static _Atomic long st_bad_count;
/* The consumer's own (its thread only). */
static uint64_t st_seen[ST_TOKENS];
static uint32_t st_got[ST_TOKENS];
static uint64_t st_stamp[ST_TOKENS];
static uint64_t st_batch, st_dups, st_total;

struct st_prod {
    nq_evq_t *e;
    pthread_barrier_t *start, *end;
    uint64_t seed;
};

static void *st_producer(void *arg) {
    struct st_prod *p = arg;
    const int per_round = ST_NOTIFIES / ST_ROUNDS;
    for (int round = 0; round < ST_ROUNDS; round++) {
        pthread_barrier_wait(p->start);
        for (int i = 0; i < per_round; i++) {
            uint32_t t = rnd(&p->seed) % ST_TOKENS;
            atomic_fetch_add_explicit(&st_sent[t], 1, memory_order_relaxed);
            atomic_fetch_add_explicit(&st_gen[t], 1, memory_order_seq_cst);
            int rc = nq_evq_notify(p->e, t);
            if (rc != 0) { /* NQ_ELIMIT would mean a token pending twice */
                int zero = 0;
                atomic_compare_exchange_strong(&st_bad_rc, &zero, rc);
                atomic_fetch_add(&st_bad_count, 1);
            }
        }
        atomic_fetch_add(&st_done, 1);
        pthread_barrier_wait(p->end);
    }
    return NULL;
}

static void st_take(const uint32_t *out, size_t n) {
    if (n == 0)
        return;
    st_batch++;
    for (size_t k = 0; k < n; k++) {
        uint32_t t = out[k];
        cr_assert_lt(t, ST_TOKENS, "token %u out of range", t);
        st_dups += st_stamp[t] == st_batch;
        st_stamp[t] = st_batch;
        st_seen[t] = atomic_load_explicit(&st_gen[t], memory_order_seq_cst);
        st_got[t]++;
    }
    st_total += n;
}

Test(evq, stress_4_producers_1M_notifies_4096_tokens, .timeout = 300) {
    nq_evq_t *e = mk(ST_TOKENS);
    nq_evq_stats_t st = stats(e);
    cr_assert_eq(st.ring_size, ST_TOKENS, "the ring is exactly the token count");
    for (int t = 0; t < ST_TOKENS; t++)
        atomic_init(&st_gen[t], 0);
    memset(st_seen, 0, sizeof(st_seen));
    memset(st_stamp, 0, sizeof(st_stamp));
    st_batch = st_dups = st_total = 0;
    atomic_store(&st_bad_rc, 0);
    atomic_store(&st_bad_count, 0);

    /* Static: if an assertion ends the test early, the producers left
     * blocked on a barrier must not find it in a reused stack frame. */
    static pthread_barrier_t start, end;
    static struct st_prod prods[ST_PRODUCERS];
    static pthread_t th[ST_PRODUCERS];
    pthread_barrier_init(&start, NULL, ST_PRODUCERS + 1);
    pthread_barrier_init(&end, NULL, ST_PRODUCERS + 1);
    for (int i = 0; i < ST_PRODUCERS; i++) {
        prods[i] = (struct st_prod){e, &start, &end, 0x9e3779b97f4a7c15ULL * (uint64_t)(i + 1)};
        cr_assert_eq(pthread_create(&th[i], NULL, st_producer, &prods[i]), 0);
    }
    uint32_t out[256];
    uint64_t seed = 42, waits = 0, concurrent = 0;
    int64_t t0 = now_ns();
    for (int round = 0; round < ST_ROUNDS; round++) {
        memset(st_got, 0, sizeof(st_got));
        for (int t = 0; t < ST_TOKENS; t++)
            atomic_store_explicit(&st_sent[t], 0, memory_order_relaxed);
        atomic_store(&st_done, 0);
        pthread_barrier_wait(&start);
        /* Concurrent with the producers: polls of random sizes up to 256,
         * and every 16th call a blocking wait (1 ms timeout). */
        for (uint32_t i = 0; atomic_load(&st_done) < ST_PRODUCERS; i++) {
            size_t n;
            if (i % 16 == 0) {
                int w = nq_evq_wait(e, out, 256, 1 * MS);
                cr_assert(w > 0 || w == NQ_ETIMEDOUT, "wait: %d", w);
                n = w > 0 ? (size_t)w : 0;
                waits++;
            } else {
                n = nq_evq_poll(e, out, 1 + rnd(&seed) % 256);
            }
            st_take(out, n);
            concurrent += n;
        }
        pthread_barrier_wait(&end);
        /* Quiescent: drain, then check. */
        size_t n;
        while ((n = nq_evq_poll(e, out, 256)) > 0)
            st_take(out, n);
        check(e);
        cr_assert_eq(atomic_load(&st_bad_count), 0, "round %d: %ld notifies failed, first with %s",
                     round, atomic_load(&st_bad_count), nq_err_name(atomic_load(&st_bad_rc)));
        for (uint32_t t = 0; t < ST_TOKENS; t++) {
            uint64_t g = atomic_load(&st_gen[t]);
            cr_assert_eq(st_seen[t], g,
                         "round %d token %u: last delivery saw gen %llu of %llu (lost notify)",
                         round, t, (unsigned long long)st_seen[t], (unsigned long long)g);
            uint32_t sent = atomic_load_explicit(&st_sent[t], memory_order_relaxed);
            cr_assert_leq(st_got[t], sent, "round %d token %u: delivered %u times, notified %u",
                          round, t, st_got[t], sent);
        }
        cr_assert_eq(st_dups, 0, "round %d: %llu repeats of a token within one batch", round,
                     (unsigned long long)st_dups);
        st = stats(e);
        cr_assert_eq(st.pending, 0);
        cr_assert_eq(st.delivered, st_total);
        cr_assert_eq(st.queued, st_total);
        cr_assert_eq(st.batches, st_batch, "batches: %llu, non-empty polls and waits: %llu",
                     (unsigned long long)st.batches, (unsigned long long)st_batch);
    }
    int64_t took = now_ns() - t0;
    for (int i = 0; i < ST_PRODUCERS; i++)
        pthread_join(th[i], NULL);
    st = stats(e);
    cr_log_info("evq stress: %d notifies in %.2f s, %llu deliveries (%llu while producing) in "
                "%llu batches, %llu waits, %llu parks, %llu wakes",
                ST_PRODUCERS * (ST_NOTIFIES / ST_ROUNDS) * ST_ROUNDS, (double)took / 1e9,
                (unsigned long long)st_total, (unsigned long long)concurrent,
                (unsigned long long)st.batches, (unsigned long long)waits,
                (unsigned long long)st.parks, (unsigned long long)st.wakes);
    pthread_barrier_destroy(&start);
    pthread_barrier_destroy(&end);
    nq_evq_free(e);
}
