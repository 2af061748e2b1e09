/* Helpers shared by the test suites: sanitizer detection for scaling stress
 * counts, the monotonic clock, the thread id, failures recorded on worker
 * threads, a seeded PRNG, the long-run switch and the resident set size.
 * Header-only, static inline. */
#ifndef NQ_TESTS_NQTEST_H
#define NQ_TESTS_NQTEST_H

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ThreadSanitizer runs code 5-15x slower: stress counts are divided by 10. */
#if defined(__SANITIZE_THREAD__)
#define NQT_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define NQT_TSAN 1
#endif
#endif
#ifdef NQT_TSAN
#define SCALE(n) ((n) / 10 > 0 ? (n) / 10 : 1)
#else
#define SCALE(n) (n)
#endif

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline int cur_tid(void) {
    return (int)syscall(SYS_gettid);
}

/* Failures on worker threads: counted, the first one's text kept; the main
 * thread asserts nqt_errors == 0 after joining them and prints
 * nqt_first_error. */
__attribute__((unused)) static atomic_llong nqt_errors;
__attribute__((unused)) static char nqt_first_error[256];
__attribute__((unused)) static atomic_flag nqt_first_error_taken = ATOMIC_FLAG_INIT;

static inline void nqt_thread_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline void nqt_thread_fail(const char *fmt, ...) {
    if (!atomic_flag_test_and_set(&nqt_first_error_taken)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(nqt_first_error, sizeof(nqt_first_error), fmt, ap);
        va_end(ap);
    }
    atomic_fetch_add(&nqt_errors, 1);
}

/* splitmix64: one state word per thread, every random choice drawn from it,
 * so a seed replays each thread's sequence of choices. */
static inline uint64_t nqt_rand(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A thread's PRNG state: the run's seed and the thread's role. */
static inline uint64_t nqt_rand_init(uint64_t seed, uint64_t role) {
    uint64_t s = seed ^ (role * 0xd1342543de82ef95ull);
    nqt_rand(&s);
    return s;
}

/* The run's seed: NQ_SEED from the environment, else a fresh one. Tests
 * print it, and NQ_SEED=<it> replays the same choices. */
static inline uint64_t nqt_seed(void) {
    const char *e = getenv("NQ_SEED");
    if (e != NULL && *e != '\0')
        return strtoull(e, NULL, 0);
    uint64_t s = (uint64_t)now_ns() ^ ((uint64_t)getpid() << 32);
    return nqt_rand(&s);
}

/* Long variants: NQ_LONG=1 (any value but 0) multiplies stress counts.
 * make check and scripts/test run the short ones. */
static inline int nqt_long(void) {
    const char *e = getenv("NQ_LONG");
    return e != NULL && *e != '\0' && strcmp(e, "0") != 0;
}

/* Resident set size in KiB (/proc/self/statm), or -1. */
static inline long nqt_rss_kib(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long size, resident;
    if (f == NULL)
        return -1;
    int n = fscanf(f, "%ld %ld", &size, &resident);
    fclose(f);
    return n == 2 ? resident * (sysconf(_SC_PAGESIZE) / 1024) : -1;
}

#endif
