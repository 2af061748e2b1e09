/* The default operations of the ops table (ops.h): the C library's, or
 * jemalloc's for a build configured --with-jemalloc (mallocx/dallocx, so
 * libnq's memory comes from jemalloc even where the program's malloc is
 * glibc's). */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifdef NQ_WITH_JEMALLOC
#include <jemalloc/jemalloc.h>
#endif

#include "core/ops.h"

#ifdef NQ_WITH_JEMALLOC
static void *nq__je_malloc(size_t size) {
    return mallocx(size, 0);
}
static void *nq__je_calloc(size_t n, size_t size) {
    return mallocx(n * size, MALLOCX_ZERO); /* alloc.c checked the product */
}
static void *nq__je_aligned_alloc(size_t align, size_t size) {
    return mallocx(size, MALLOCX_ALIGN(align));
}
static void nq__je_free(void *p) {
    dallocx(p, 0);
}
#endif

static long nq__sys_futex(unsigned *uaddr, int op, unsigned val, const struct timespec *ts,
                          unsigned bitset) {
    return syscall(SYS_futex, uaddr, op, val, ts, NULL, bitset);
}

#ifdef NQ_WITH_JEMALLOC
#define NQ__OPS_ALLOC nq__je_malloc, nq__je_calloc, nq__je_aligned_alloc, nq__je_free
#else
#define NQ__OPS_ALLOC malloc, calloc, aligned_alloc, free
#endif
/* In the order of the fields of nq__ops_t. (A C initializer cannot copy
 * another object, so both tables spell it out.) */
#define NQ__OPS_DEFAULT                                                             \
    {NQ__OPS_ALLOC, eventfd, read, write, close, clock_gettime, nq__sys_futex}

const nq__ops_t nq__ops_default = NQ__OPS_DEFAULT;
nq__ops_t nq__ops = NQ__OPS_DEFAULT;

void nq__ops_set(const nq__ops_t *ops, nq__ops_t *old) {
    if (old != NULL)
        *old = nq__ops;
    nq__ops = ops != NULL ? *ops : nq__ops_default;
}
