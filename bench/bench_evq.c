/* bench_evq: how fast is nq_evq? A benchmark, not a test: it measures the
 * cost of each operation of the event queue (notify of a new and of an
 * already-pending token, an empty poll, tokens polled in batches, a
 * poll(limit 32) call with many tokens ready) on one thread, then one
 * producer against one polling consumer on two threads. Each figure is the
 * median of several repetitions; only the measured loop is timed (refilling
 * and draining the queue between rounds is not). Nanoseconds are also shown
 * as cycles at the machine's nominal clock, so they can be compared with
 * nexus-notify's published figures (16 cycles per notify, ~2 per empty poll,
 * ~5.3 per token polled). Every measured loop is checked afterwards (tokens
 * delivered, their order, the queue's own counters); a wrong count is a
 * failure and the exit status is 1.
 *
 * Usage: bench_evq [--json] [--quick] [--reps N] [--ghz X] [--help]
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* clock_gettime, nanosleep under -std=c11 */
#endif
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nq.h>

#define NTOK     4096u /* tokens in every queue */
#define SLACK    128u  /* out[] room beyond NTOK, so a poll can never write past it */
#define MAX_REPS 99    /* --reps upper bound */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Results of the measured loops end up here, so the compiler cannot drop a
 * loop whose result would otherwise be unused. */
static volatile uint64_t sink;

/* One benchmark's state; each benchmark gets a fresh queue. */
struct state {
    const char *name;
    nq_evq_t *q;
    uint32_t *out;     /* NTOK + SLACK tokens */
    uint64_t expected; /* the benchmark's running expectation (see each one) */
    /* Two-thread figures, summed over all repetitions. */
    uint64_t tt_notified, tt_delivered, tt_wakes;
};

static int fail(const struct state *s, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "bench_evq: %s: FAILED: ", s->name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return -1;
}

static int get_stats(struct state *s, nq_evq_stats_t *st) {
    int rc = nq_evq_stats(s->q, st);
    return rc < 0 ? fail(s, "nq_evq_stats: %s", nq_strerror(rc)) : 0;
}

/* Untimed: notify tokens[0 .. n-1] (tokens == NULL: 0 .. n-1). */
static int fill(struct state *s, const uint32_t *tokens, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        int rc = nq_evq_notify(s->q, tokens ? tokens[i] : i);
        if (rc < 0)
            return fail(s, "nq_evq_notify: %s", nq_strerror(rc));
    }
    return 0;
}

/* Untimed: check that out[0 .. n-1] is first, first+1, ... (mod NTOK), the
 * order in which the benchmark queued them. */
static int check_fifo(struct state *s, uint32_t n, uint64_t first) {
    for (uint32_t i = 0; i < n; i++)
        if (s->out[i] != (uint32_t)((first + i) % NTOK))
            return fail(s, "token %u delivered at %u, expected %u", s->out[i], i,
                        (unsigned)((first + i) % NTOK));
    return 0;
}

/* Untimed: poll everything and check it is exactly tokens 0 .. n-1 in order. */
static int drain_check(struct state *s, uint32_t n) {
    size_t got = nq_evq_poll(s->q, s->out, NTOK + SLACK);
    if (got != n)
        return fail(s, "drained %zu tokens, expected %u", got, n);
    return check_fifo(s, n, 0);
}

/* Each rep function runs rounds until at least target_ns have been timed and
 * returns the nanoseconds per operation in *ns, or -1 after fail(). */

/* notify of a token that is not pending: tokens 0..NTOK-1 on a drained queue. */
static int rep_notify_new(struct state *s, int64_t target_ns, double *ns) {
    int64_t timed = 0;
    uint64_t ops = 0;
    while (timed < target_ns) {
        int err = 0;
        int64_t t0 = now_ns();
        for (uint32_t t = 0; t < NTOK; t++)
            err |= nq_evq_notify(s->q, t);
        timed += now_ns() - t0;
        ops += NTOK;
        if (err)
            return fail(s, "a notify failed");
        if (drain_check(s, NTOK) < 0)
            return -1;
    }
    *ns = (double)timed / (double)ops;
    return 0;
}

/* notify of a token already pending: the queue holds all NTOK tokens (filled
 * in setup) and every notify conflates; nothing may be queued. */
static int setup_full(struct state *s) {
    s->expected = 0;
    return fill(s, NULL, NTOK);
}

static int rep_notify_conflated(struct state *s, int64_t target_ns, double *ns) {
    int64_t timed = 0;
    uint64_t ops = 0;
    while (timed < target_ns) {
        int err = 0;
        int64_t t0 = now_ns();
        for (uint32_t t = 0; t < NTOK; t++)
            err |= nq_evq_notify(s->q, t);
        timed += now_ns() - t0;
        ops += NTOK;
        if (err)
            return fail(s, "a notify failed");
    }
    nq_evq_stats_t st;
    if (get_stats(s, &st) < 0)
        return -1;
    if (st.queued != NTOK || st.pending != NTOK)
        return fail(s, "queued %llu, pending %llu; expected %u and %u (all conflated)",
                    (unsigned long long)st.queued, (unsigned long long)st.pending, NTOK, NTOK);
    *ns = (double)timed / (double)ops;
    return 0;
}

static int teardown_full(struct state *s) {
    return drain_check(s, NTOK);
}

/* nq_evq_poll on an empty queue; the queue's poll counter must see each call. */
#define EMPTY_CALLS 4096
static int rep_poll_empty(struct state *s, int64_t target_ns, double *ns) {
    int64_t timed = 0;
    uint64_t ops = 0, got = 0;
    nq_evq_stats_t before, after;
    if (get_stats(s, &before) < 0)
        return -1;
    while (timed < target_ns) {
        int64_t t0 = now_ns();
        for (int i = 0; i < EMPTY_CALLS; i++)
            got += nq_evq_poll(s->q, s->out, 32);
        timed += now_ns() - t0;
        ops += EMPTY_CALLS;
    }
    sink = got;
    if (get_stats(s, &after) < 0)
        return -1;
    if (got != 0)
        return fail(s, "an empty queue delivered %llu tokens", (unsigned long long)got);
    if (after.batches != before.batches || after.delivered != before.delivered)
        return fail(s, "an empty poll changed the queue's counters");
    *ns = (double)timed / (double)ops;
    return 0;
}

/* Tokens polled in batches of `batch` from a queue filled with NTOK tokens.
 * Each call writes to its own part of out[], so all NTOK can be checked. */
static int rep_poll_batch(struct state *s, int64_t target_ns, double *ns, size_t batch) {
    int64_t timed = 0;
    uint64_t ops = 0;
    while (timed < target_ns) {
        if (fill(s, NULL, NTOK) < 0)
            return -1;
        size_t got = 0, calls = 0;
        int64_t t0 = now_ns();
        while (got < NTOK) {
            size_t n = nq_evq_poll(s->q, s->out + got, batch);
            if (n == 0)
                break;
            got += n;
            calls++;
        }
        timed += now_ns() - t0;
        ops += got;
        if (got != NTOK || calls != NTOK / batch)
            return fail(s, "%zu calls delivered %zu tokens, expected %zu calls of %zu", calls, got,
                        (size_t)(NTOK / batch), batch);
        if (check_fifo(s, NTOK, 0) < 0)
            return -1;
    }
    *ns = (double)timed / (double)ops;
    return 0;
}

static int rep_poll_batch8(struct state *s, int64_t target_ns, double *ns) {
    return rep_poll_batch(s, target_ns, ns, 8);
}

static int rep_poll_batch128(struct state *s, int64_t target_ns, double *ns) {
    return rep_poll_batch(s, target_ns, ns, 128);
}

/* poll(limit 32) calls on a queue holding NTOK tokens: each round takes half
 * of them (64 calls; every call finds between 2048 and 4096 ready), then,
 * untimed, notifies those tokens again, so they queue up behind the rest.
 * s->expected is the running index of the next token, mod NTOK. */
#define LIMIT       32
#define LIMIT_CALLS ((int)(NTOK / 2 / LIMIT))
static int rep_poll_limit32(struct state *s, int64_t target_ns, double *ns) {
    int64_t timed = 0;
    uint64_t ops = 0;
    while (timed < target_ns) {
        size_t got = 0;
        int64_t t0 = now_ns();
        for (int i = 0; i < LIMIT_CALLS; i++)
            got += nq_evq_poll(s->q, s->out + got, LIMIT);
        timed += now_ns() - t0;
        ops += LIMIT_CALLS;
        if (got != (size_t)LIMIT_CALLS * LIMIT)
            return fail(s, "%d calls delivered %zu tokens, expected %d", LIMIT_CALLS, got,
                        LIMIT_CALLS * LIMIT);
        if (check_fifo(s, (uint32_t)got, s->expected) < 0 || fill(s, s->out, (uint32_t)got) < 0)
            return -1;
        s->expected += got;
    }
    *ns = (double)timed / (double)ops;
    return 0;
}

/* Two threads: one producer notifies tokens 0, 1, .., NTOK-1, 0, .. as fast
 * as it can; one consumer polls batches of 128 and never blocks, so no
 * notifier should ever find it parked (wakes == 0). The figure is the
 * producer's ns per notify. */
struct duo {
    nq_evq_t *q;
    atomic_int started; /* threads ready to go */
    atomic_int go;      /* set by main: start */
    atomic_int stop;    /* set by main: the producer stops */
    atomic_int done;    /* set by the producer after its last notify */
    /* Each written by its own thread, read by main after the joins. */
    uint64_t notified, notify_errors, producer_ns;
    uint64_t delivered, bad_tokens;
};

static void wait_for(atomic_int *flag) {
    while (!atomic_load_explicit(flag, memory_order_acquire))
        ;
}

static void *duo_producer(void *arg) {
    struct duo *d = arg;
    uint64_t n = 0, errors = 0;
    atomic_fetch_add_explicit(&d->started, 1, memory_order_release);
    wait_for(&d->go);
    int64_t t0 = now_ns();
    do {
        for (uint32_t i = 0; i < 256; i++)
            errors += nq_evq_notify(d->q, (uint32_t)(n + i) % NTOK) < 0;
        n += 256;
    } while (!atomic_load_explicit(&d->stop, memory_order_relaxed));
    d->producer_ns = (uint64_t)(now_ns() - t0);
    d->notified = n;
    d->notify_errors = errors;
    atomic_store_explicit(&d->done, 1, memory_order_release);
    return NULL;
}

static void *duo_consumer(void *arg) {
    struct duo *d = arg;
    uint32_t out[128];
    uint64_t delivered = 0, bad = 0;
    atomic_fetch_add_explicit(&d->started, 1, memory_order_release);
    wait_for(&d->go);
    for (;;) {
        /* Read done before polling: the poll after it then sees every notify. */
        int last = atomic_load_explicit(&d->done, memory_order_acquire);
        size_t n = nq_evq_poll(d->q, out, 128);
        for (size_t i = 0; i < n; i++)
            bad += out[i] >= NTOK;
        delivered += n;
        if (last && n == 0)
            break;
    }
    d->delivered = delivered;
    d->bad_tokens = bad;
    return NULL;
}

static int rep_two_threads(struct state *s, int64_t target_ns, double *ns) {
    struct duo d = {.q = s->q};
    pthread_t prod, cons;
    nq_evq_stats_t before, after;
    if (get_stats(s, &before) < 0)
        return -1;
    if (pthread_create(&cons, NULL, duo_consumer, &d) != 0)
        return fail(s, "pthread_create failed");
    if (pthread_create(&prod, NULL, duo_producer, &d) != 0) {
        atomic_store(&d.done, 1);
        atomic_store(&d.go, 1);
        pthread_join(cons, NULL);
        return fail(s, "pthread_create failed");
    }
    while (atomic_load(&d.started) < 2)
        ;
    atomic_store(&d.go, 1);
    struct timespec ts = {.tv_sec = target_ns / 1000000000, .tv_nsec = target_ns % 1000000000};
    while (nanosleep(&ts, &ts) != 0)
        ;
    atomic_store(&d.stop, 1);
    pthread_join(prod, NULL);
    pthread_join(cons, NULL);
    if (get_stats(s, &after) < 0)
        return -1;

    uint64_t queued = after.queued - before.queued;
    uint64_t delivered = after.delivered - before.delivered;
    if (d.notify_errors)
        return fail(s, "%llu notifies failed", (unsigned long long)d.notify_errors);
    if (d.bad_tokens)
        return fail(s, "%llu tokens out of range delivered", (unsigned long long)d.bad_tokens);
    if (after.pending != 0 || queued != delivered || delivered != d.delivered)
        return fail(s, "consumer got %llu, queue counted %llu queued, %llu delivered, %llu pending",
                    (unsigned long long)d.delivered, (unsigned long long)queued,
                    (unsigned long long)delivered, (unsigned long long)after.pending);
    if (after.wakes != before.wakes) /* nobody ever parked */
        return fail(s, "%llu futex wakes with no consumer parked",
                    (unsigned long long)(after.wakes - before.wakes));
    if (delivered > d.notified || (d.notified >= NTOK && delivered < NTOK))
        return fail(s, "%llu notifies gave %llu deliveries", (unsigned long long)d.notified,
                    (unsigned long long)delivered);
    s->tt_notified += d.notified;
    s->tt_delivered += delivered;
    s->tt_wakes += after.wakes - before.wakes;
    *ns = (double)d.producer_ns / (double)d.notified;
    return 0;
}

/* ------------------------------------------------------------------------ */

struct bench {
    const char *name;
    const char *unit; /* what one "op" is */
    int (*setup)(struct state *);
    int (*rep)(struct state *, int64_t, double *);
    int (*teardown)(struct state *);
};

static const struct bench benches[] = {
    {"notify_new", "notify", NULL, rep_notify_new, NULL},
    {"notify_conflated", "notify", setup_full, rep_notify_conflated, teardown_full},
    {"poll_empty", "poll call", NULL, rep_poll_empty, NULL},
    {"poll_batch8", "token", NULL, rep_poll_batch8, NULL},
    {"poll_batch128", "token", NULL, rep_poll_batch128, NULL},
    {"poll_limit32_ready4096", "poll call", setup_full, rep_poll_limit32, NULL},
    {"two_threads_notify", "notify", NULL, rep_two_threads, NULL},
};
#define NBENCH (sizeof(benches) / sizeof(benches[0]))

struct result {
    double med, min, max;
};

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Runs one benchmark: setup, a short warm-up, reps timed repetitions. */
static int run(const struct bench *b, struct state *s, int reps, int64_t target_ns,
               struct result *r) {
    double v[MAX_REPS], ns;
    if (b->setup && b->setup(s) < 0)
        return -1;
    if (b->rep(s, target_ns / 4, &ns) < 0) /* warm-up: caches, page faults, clock */
        return -1;
    for (int i = 0; i < reps; i++)
        if (b->rep(s, target_ns, &v[i]) < 0)
            return -1;
    if (b->teardown && b->teardown(s) < 0)
        return -1;
    qsort(v, (size_t)reps, sizeof(v[0]), cmp_double);
    r->min = v[0];
    r->max = v[reps - 1];
    r->med = reps % 2 ? v[reps / 2] : (v[reps / 2 - 1] + v[reps / 2]) / 2;
    if (!(r->med > 0)) /* a loop that took no time did no work */
        return fail(s, "measured %g ns per op", r->med);
    return 0;
}

/* The first "cpu MHz" line of /proc/cpuinfo, in GHz; 0 if there is none. */
static double cpuinfo_ghz(void) {
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[256];
    double mhz = 0;
    if (f == NULL)
        return 0;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, "cpu MHz", 7) == 0) {
            const char *colon = strchr(line, ':');
            if (colon)
                mhz = strtod(colon + 1, NULL);
            break;
        }
    fclose(f);
    return mhz > 0 ? mhz / 1000 : 0;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: bench_evq [--json] [--quick] [--reps N] [--ghz X] [--help]\n"
            "  Measures nq_evq operations (%u tokens), each the median of N repetitions.\n"
            "  --json     print one JSON object instead of a table\n"
            "  --quick    ~5 ms per repetition, 3 repetitions (a smoke test)\n"
            "  --reps N   repetitions per benchmark (default 7, 3 with --quick; 1..%d)\n"
            "  --ghz X    clock for cycles/op (default: /proc/cpuinfo \"cpu MHz\")\n",
            NTOK, MAX_REPS);
}

int main(int argc, char **argv) {
    int json = 0, quick = 0, reps = 0;
    double ghz = 0;
    /* Where the clock came from: for people, and a short form for JSON. */
    const char *ghz_src = "/proc/cpuinfo \"cpu MHz\" (the nominal clock; --ghz overrides)";
    const char *ghz_key = "/proc/cpuinfo cpu MHz";

    for (int i = 1; i < argc; i++) {
        char *end;
        if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else if (strcmp(argv[i], "--quick") == 0) {
            quick = 1;
        } else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
            long n = strtol(argv[++i], &end, 10);
            if (*end || n < 1 || n > MAX_REPS) {
                usage(stderr);
                return 2;
            }
            reps = (int)n;
        } else if (strcmp(argv[i], "--ghz") == 0 && i + 1 < argc) {
            ghz = strtod(argv[++i], &end);
            if (*end || !(ghz > 0 && ghz < 100)) {
                usage(stderr);
                return 2;
            }
            ghz_src = ghz_key = "--ghz";
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (reps == 0)
        reps = quick ? 3 : 7;
    int64_t target_ns = quick ? 5000000 : 50000000;
    if (ghz == 0)
        ghz = cpuinfo_ghz();
    if (ghz == 0) {
        ghz_src = "unknown (no \"cpu MHz\" in /proc/cpuinfo; use --ghz)";
        ghz_key = "unknown";
    }

    struct result res[NBENCH];
    struct state st[NBENCH];
    uint32_t *out = malloc((NTOK + SLACK) * sizeof(*out));
    if (out == NULL) {
        fprintf(stderr, "bench_evq: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < NBENCH; i++) {
        memset(&st[i], 0, sizeof(st[i]));
        st[i].name = benches[i].name;
        st[i].out = out;
        int rc = nq_evq_new(NTOK, &st[i].q);
        if (rc < 0) {
            fprintf(stderr, "bench_evq: nq_evq_new: %s\n", nq_strerror(rc));
            return 1;
        }
        rc = run(&benches[i], &st[i], reps, target_ns, &res[i]);
        nq_evq_free(st[i].q);
        if (rc < 0)
            return 1;
    }
    free(out);

    const struct state *tt = &st[NBENCH - 1];
    double ratio = tt->tt_notified ? (double)tt->tt_delivered / (double)tt->tt_notified : 0;
    double notifies_per_s = 1e9 / res[NBENCH - 1].med;

    if (json) {
        printf("{\"library\": \"libnq %s\", \"tokens\": %u, \"reps\": %d, \"rep_ms\": %g, ",
               nq_version_string(), NTOK, reps, (double)target_ns / 1e6);
        if (ghz > 0)
            printf("\"clock_ghz\": %.4f, ", ghz);
        else
            printf("\"clock_ghz\": null, ");
        printf("\"clock_source\": \"%s\", \"benchmarks\": [", ghz_key);
        for (size_t i = 0; i < NBENCH; i++) {
            printf("%s\n  {\"name\": \"%s\", \"unit\": \"%s\", \"ns_per_op\": %.4f, \"min\": %.4f, "
                   "\"max\": %.4f, ",
                   i ? "," : "", benches[i].name, benches[i].unit, res[i].med, res[i].min,
                   res[i].max);
            if (ghz > 0)
                printf("\"cycles_per_op\": %.3f", res[i].med * ghz);
            else
                printf("\"cycles_per_op\": null");
            if (i == NBENCH - 1)
                printf(", \"notifies_per_s\": %.0f, \"conflation_ratio\": %.6f, \"wakes\": %llu",
                       notifies_per_s, ratio, (unsigned long long)tt->tt_wakes);
            printf("}");
        }
        printf("\n]}\n");
        return 0;
    }

    printf("libnq %s nq_evq, %u tokens; median of %d repetitions of >= %g ms of timed work\n",
           nq_version_string(), NTOK, reps, (double)target_ns / 1e6);
    if (ghz > 0)
        printf("cycles/op at %.3f GHz, from %s\n\n", ghz, ghz_src);
    else
        printf("cycles/op: clock %s\n\n", ghz_src);
    printf("%-24s %-10s %9s %9s %9s %10s\n", "benchmark", "per", "ns/op", "min", "max",
           "cycles/op");
    for (size_t i = 0; i < NBENCH; i++) {
        printf("%-24s %-10s %9.2f %9.2f %9.2f ", benches[i].name, benches[i].unit, res[i].med,
               res[i].min, res[i].max);
        if (ghz > 0)
            printf("%10.1f\n", res[i].med * ghz);
        else
            printf("%10s\n", "-");
    }
    printf("\ntwo threads (1 producer, tokens round-robin; 1 consumer polling 128 at a time):\n"
           "  %.1f M notifies/s, delivered/notified %.4f (%llu of %llu), futex wakes %llu\n",
           notifies_per_s / 1e6, ratio, (unsigned long long)tt->tt_delivered,
           (unsigned long long)tt->tt_notified, (unsigned long long)tt->tt_wakes);
    printf("\nnexus-notify's published figures, for comparison: 16 cycles per notify,\n"
           "~2 cycles per empty poll, ~5.3 cycles per token polled.\n");
    return 0;
}
