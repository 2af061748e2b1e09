/* evq_demo: nq_evq at work, and checked. Producer threads notify random
 * tokens in bursts, with a pause now and then; one consumer thread drains the
 * queue with nq_evq_wait, a budget of tokens per call. Once a second the main
 * thread prints the rates: notifies/s, tokens delivered/s, and how many
 * notifies each delivery stood for (a token notified again while pending is
 * delivered once: conflation). It also prints the futex wakes and parks so
 * far: the consumer parks when every producer pauses at once, and only the
 * first notify after that makes a wake syscall, not every notify.
 *
 * At the end, after the producers stop and the consumer drains, it checks
 * that nothing is pending and that every token was delivered after its last
 * notify: a notification was never lost. It prints OK or FAILED (exit 1).
 *
 * Usage: evq_demo [-p producers] [-t tokens] [-d seconds] [-b budget]
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* clock_nanosleep, getopt under -std=c11 */
#endif
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <nq.h>

#define MAX_PRODUCERS 64

static nq_evq_t *evq;
static uint32_t ntokens = 4096;
static int budget = 64;
static atomic_int stop;           /* main -> producers: stop notifying */
static atomic_int producers_done; /* main -> consumer: no more notifies */
static atomic_int failed;

/* The check. gen[t] counts the notifies of token t: a producer bumps it just
 * before nq_evq_notify(t). Notify is a release and the poll that delivers t is
 * an acquire, so when t comes out the consumer sees at least the gen of every
 * notify that token stands for, and records it in seen[t]. At the end every
 * token's seen must equal its gen: its last notify was delivered. */
static _Atomic uint64_t *gen;
static uint64_t *seen; /* the consumer's alone */

struct producer {
    /* On a cache line of its own: its producer writes it after each burst. */
    _Alignas(64) _Atomic uint64_t notifies;
    pthread_t thread;
    uint32_t seed;
};
static struct producer producers[MAX_PRODUCERS];

/* Read by the main thread for its status lines; written by the consumer. */
static _Alignas(64) _Atomic uint64_t delivered;

static uint32_t xorshift(uint32_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

static void sleep_us(long us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static void *producer_main(void *arg) {
    struct producer *p = arg;
    uint64_t n = 0;
    uint32_t rng = p->seed;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        /* A burst of up to 1024 notifies of random tokens, as fast as it can. */
        uint32_t burst = 1 + xorshift(&rng) % 1024;
        for (uint32_t i = 0; i < burst; i++) {
            uint32_t t = xorshift(&rng) % ntokens;
            atomic_fetch_add_explicit(&gen[t], 1, memory_order_relaxed);
            int rc = nq_evq_notify(evq, t); /* never blocks */
            if (rc < 0) {
                fprintf(stderr, "nq_evq_notify(%u): %s\n", t, nq_strerror(rc));
                atomic_store(&failed, 1);
                return NULL;
            }
        }
        n += burst;
        atomic_store_explicit(&p->notifies, n, memory_order_relaxed);
        /* Now and then a pause of 0.1 to 1 ms. When all producers pause at
         * once, the consumer runs dry and parks on a futex. */
        if (xorshift(&rng) % 4 == 0)
            sleep_us(100 + xorshift(&rng) % 900);
    }
    return NULL;
}

/* What a real consumer would do with a token: here, note its gen. */
static void handle(const uint32_t *tokens, int n) {
    for (int i = 0; i < n; i++)
        seen[tokens[i]] = atomic_load_explicit(&gen[tokens[i]], memory_order_relaxed);
    atomic_store_explicit(&delivered, atomic_load_explicit(&delivered, memory_order_relaxed) + n,
                          memory_order_relaxed);
}

static void *consumer_main(void *arg) {
    uint32_t *out = arg; /* room for budget tokens */
    /* Until the producers are done: block for tokens, at most budget at a
     * time; the timeout only lets us look at producers_done now and then. */
    while (!atomic_load_explicit(&producers_done, memory_order_acquire)) {
        int n = nq_evq_wait(evq, out, (size_t)budget, 50 * 1000000 /* ns */);
        if (n > 0) {
            handle(out, n);
        } else if (n != NQ_ETIMEDOUT) {
            fprintf(stderr, "nq_evq_wait: %s\n", nq_strerror(n));
            atomic_store(&failed, 1);
            return NULL;
        }
    }
    /* The producers have stopped: take what is left. */
    size_t n;
    while ((n = nq_evq_poll(evq, out, (size_t)budget)) > 0)
        handle(out, (int)n);
    return NULL;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_until(double t) {
    struct timespec ts = {(time_t)t, (long)((t - (double)(time_t)t) * 1e9)};
    /* Absolute, so a signal that interrupts the sleep costs no drift. */
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0)
        ;
}

static uint64_t total_notifies(int np) {
    uint64_t sum = 0;
    for (int i = 0; i < np; i++)
        sum += atomic_load_explicit(&producers[i].notifies, memory_order_relaxed);
    return sum;
}

static long arg_long(const char *s, long lo, long hi) {
    char *end;
    long v = strtol(s, &end, 10);
    return *s && !*end && v >= lo && v <= hi ? v : -1;
}

int main(int argc, char **argv) {
    int np = 4;
    int seconds = 3;
    int opt;
    long v;
    while ((opt = getopt(argc, argv, "p:t:d:b:h")) != -1) {
        if (opt == 'p' && (v = arg_long(optarg, 1, MAX_PRODUCERS)) > 0)
            np = (int)v;
        else if (opt == 't' && (v = arg_long(optarg, 1, NQ_EVQ_MAX_TOKENS)) > 0)
            ntokens = (uint32_t)v;
        else if (opt == 'd' && (v = arg_long(optarg, 1, 3600)) > 0)
            seconds = (int)v;
        else if (opt == 'b' && (v = arg_long(optarg, 1, 1 << 20)) > 0)
            budget = (int)v;
        else {
            fprintf(opt == 'h' ? stdout : stderr,
                    "usage: %s [-p producers (4)] [-t tokens (4096)] [-d seconds (3)] "
                    "[-b budget per wait (64)]\n",
                    argv[0]);
            return opt == 'h' ? 0 : 2;
        }
    }

    gen = malloc(ntokens * sizeof(*gen));
    seen = calloc(ntokens, sizeof(*seen));
    uint32_t *out = malloc((size_t)budget * sizeof(*out));
    if (gen == NULL || seen == NULL || out == NULL) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (uint32_t t = 0; t < ntokens; t++)
        atomic_init(&gen[t], 0);
    int rc = nq_evq_new(ntokens, &evq);
    if (rc < 0) {
        fprintf(stderr, "nq_evq_new: %s\n", nq_strerror(rc));
        return 1;
    }

    printf("evq_demo: libnq %s, %d producers, %u tokens, consumer budget %d, %d s\n",
           nq_version_string(), np, ntokens, budget, seconds);
    pthread_t consumer;
    if (pthread_create(&consumer, NULL, consumer_main, out) != 0) {
        fprintf(stderr, "pthread_create failed\n");
        return 1;
    }
    for (int i = 0; i < np; i++) {
        producers[i].seed = 2463534242u + 7919u * (uint32_t)i; /* xorshift: any nonzero seed */
        if (pthread_create(&producers[i].thread, NULL, producer_main, &producers[i]) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            return 1;
        }
    }

    /* Once a second: rates over the last second, counters so far. */
    double start = now_s(), last = start;
    uint64_t last_n = 0, last_d = 0;
    for (int sec = 1; sec <= seconds; sec++) {
        sleep_until(start + sec);
        double t = now_s();
        uint64_t n = total_notifies(np), d = atomic_load(&delivered);
        nq_evq_stats_t st;
        nq_evq_stats(evq, &st);
        printf("%3d s  notifies %7.2f M/s  delivered %7.2f M/s  notifies/delivery %6.2f  "
               "wakes %llu  parks %llu\n",
               sec, (double)(n - last_n) / (t - last) / 1e6,
               (double)(d - last_d) / (t - last) / 1e6,
               d > last_d ? (double)(n - last_n) / (double)(d - last_d) : 0.0,
               (unsigned long long)st.wakes, (unsigned long long)st.parks);
        fflush(stdout);
        last = t, last_n = n, last_d = d;
    }

    /* Stop: producers first; once they are joined, every notify is done and
     * the consumer's final drain gets all that is pending. */
    atomic_store(&stop, 1);
    for (int i = 0; i < np; i++)
        pthread_join(producers[i].thread, NULL);
    atomic_store_explicit(&producers_done, 1, memory_order_release);
    pthread_join(consumer, NULL);
    double elapsed = now_s() - start;

    nq_evq_stats_t st;
    nq_evq_stats(evq, &st);
    uint64_t n = total_notifies(np), d = atomic_load(&delivered);
    printf("summary: %llu notifies (%.2f M/s), %llu tokens delivered (%.2f M/s), "
           "%.2f notifies per delivery;\n"
           "         %llu non-empty polls, the consumer parked %llu times, producers made %llu futex "
           "wakes (one per %.0f notifies)\n",
           (unsigned long long)n, (double)n / elapsed / 1e6, (unsigned long long)d,
           (double)d / elapsed / 1e6, d ? (double)n / (double)d : 0.0, (unsigned long long)st.batches,
           (unsigned long long)st.parks, (unsigned long long)st.wakes,
           st.wakes ? (double)n / (double)st.wakes : 0.0);

    /* The check: nothing pending, every count agrees, no notify lost. */
    uint32_t lost = 0, notified = 0;
    for (uint32_t t = 0; t < ntokens; t++) {
        uint64_t g = atomic_load_explicit(&gen[t], memory_order_relaxed);
        notified += g > 0;
        if (seen[t] != g && lost++ < 5)
            fprintf(stderr, "token %u: notified %llu times, last delivery saw %llu\n", t,
                    (unsigned long long)g, (unsigned long long)seen[t]);
    }
    int ok = !atomic_load(&failed) && lost == 0 && st.pending == 0 && st.delivered == d &&
             st.queued == d;
    printf("check: pending %llu, delivered %llu of %llu queued, %u of %u tokens notified, "
           "%u not delivered after their last notify: %s\n",
           (unsigned long long)st.pending, (unsigned long long)st.delivered,
           (unsigned long long)st.queued, notified, ntokens, lost, ok ? "OK" : "FAILED");

    nq_evq_free(evq);
    free(out);
    free(seen);
    free(gen);
    return ok ? 0 : 1;
}
