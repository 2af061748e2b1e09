/* Helpers shared by the test suites: sanitizer detection for scaling stress
 * counts, the monotonic clock, the thread id. Header-only, static inline. */
#ifndef NQ_TESTS_NQTEST_H
#define NQ_TESTS_NQTEST_H

#include <errno.h>
#include <stdint.h>
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

#endif
