/* This file is private to libnq: the table of operating-system operations
 * the core makes (allocation, the port's eventfd, the monotonic clock, the
 * futex), so that tests can replace one entry to inject a fault: the k-th
 * allocation failing, eventfd() out of descriptors, a write refused at the
 * counter's limit, a clock that jumps, a futex wait that keeps returning
 * EINTR. Each entry behaves like the libc call it stands for: -1 (or NULL)
 * with errno set on failure.
 *
 * Cost: every call site already makes the call (or a syscall) it stands
 * for; going through the table adds one load and one indirect call, and
 * none of these operations is on nq_notify's path without a syscall, except
 * the clock read of a notify deferring to a consumer's lock request
 * (src/core/lock.h, L4), which waits anyway. */
#ifndef NQ_CORE_OPS_H
#define NQ_CORE_OPS_H

#include <stddef.h>
#include <sys/types.h>
#include <time.h>

typedef struct nq__ops {
    /* The allocator under nq__malloc & co. (alloc.c checks sizes and the
     * nq__alloc_fail_at countdown first). aligned_alloc gets a size already
     * rounded up to align. */
    void *(*malloc)(size_t size);
    void *(*calloc)(size_t n, size_t size);
    void *(*aligned_alloc)(size_t align, size_t size);
    void (*free)(void *p);
    /* The port's eventfd (port.c). */
    int (*eventfd)(unsigned initval, int flags);
    ssize_t (*read)(int fd, void *buf, size_t n);
    ssize_t (*write)(int fd, const void *buf, size_t n);
    int (*close)(int fd);
    /* CLOCK_MONOTONIC for every deadline (time.c). */
    int (*clock_gettime)(clockid_t clk, struct timespec *ts);
    /* futex(2) as park.c uses it: FUTEX_WAIT_BITSET with an absolute
     * deadline, FUTEX_WAKE. */
    long (*futex)(unsigned *uaddr, int op, unsigned val, const struct timespec *ts,
                  unsigned bitset);
} nq__ops_t;

/* The table in use. Read without synchronisation: replace entries only
 * while no other thread is inside libnq (a test, before it starts any). */
extern nq__ops_t nq__ops;
/* What nq__ops holds at start-up: the real calls. */
extern const nq__ops_t nq__ops_default;

/* Test hook: copies *ops into the table (NULL: the defaults) and, if old is
 * not NULL, the table as it was into *old. */
void nq__ops_set(const nq__ops_t *ops, nq__ops_t *old);

#endif
