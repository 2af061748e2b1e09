/* Parking on Linux futexes: the sleeping half of the protocol drawn at the
 * top of park.h. */
#include <errno.h>
#include <linux/futex.h>
#include <time.h>
#include <unistd.h>

#include "core/internal.h"
#include "core/ops.h"
#include "core/park.h"

static long nq__futex(atomic_uint *word, int op, unsigned val,
                      const struct timespec *ts, unsigned bitset) {
    return nq__ops.futex((unsigned *)word, op, val, ts, bitset);
}

int nq__park_commit(nq__park_t *p, int64_t deadline_ns) {
    struct timespec ts, *tsp = NULL;
    int saved = errno;

    if (deadline_ns != NQ__NO_DEADLINE) {
        ts.tv_sec = (time_t)(deadline_ns / 1000000000);
        ts.tv_nsec = (long)(deadline_ns % 1000000000);
        tsp = &ts;
    }
    /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline, so a
     * sleep resumed after a signal does not restart the full timeout. The
     * kernel sleeps only if word is still 1 (the waker's xchg sets 0). */
    long r = nq__futex(&p->word, FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, 1,
                       tsp, FUTEX_BITSET_MATCH_ANY);
    if (r == 0) {
        errno = saved;
        return 0;
    }
    switch (errno) {
    case EAGAIN: /* word was no longer 1: a waker came first */
    case EINTR:  /* a signal: the caller re-checks and sleeps again */
        errno = saved;
        return 0;
    case ETIMEDOUT:
        errno = saved;
        return NQ_ETIMEDOUT;
    default:
        return NQ_ESYS;
    }
}

int nq__park_wake_slow(nq__park_t *p) {
    int saved = errno;
    nq__futex(&p->word, FUTEX_WAKE_PRIVATE, 1, NULL, 0);
    errno = saved;
    return 1;
}
