/* Monotonic clock helpers for timeouts. Deadlines are absolute
 * CLOCK_MONOTONIC nanoseconds, so a wait interrupted and resumed (EINTR, a
 * spurious wake) waits only for the time that is left. */
#include <time.h>

#include "core/internal.h"
#include "core/ops.h"

int64_t nq__now_ns(void) {
    struct timespec ts;
    /* CLOCK_MONOTONIC cannot fail with a valid pointer on Linux. */
    nq__ops.clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t nq__deadline_ns(int64_t timeout_ns) {
    if (timeout_ns < 0)
        return NQ__NO_DEADLINE;
    int64_t now = nq__now_ns();
    if (timeout_ns >= NQ__NO_DEADLINE - now)
        return NQ__NO_DEADLINE;
    return now + timeout_ns;
}
