/* The single place where libnq allocates memory. A build configured
 * --with-jemalloc uses jemalloc's own entry points (mallocx/dallocx), so the
 * library's memory comes from jemalloc even in a program whose malloc is
 * glibc's; otherwise the C library's allocator. Tests can make chosen
 * allocations fail (nq__alloc_fail_at) to check every NQ_ENOMEM path. */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <stdatomic.h>
#include <stdlib.h>

#ifdef NQ_WITH_JEMALLOC
#include <jemalloc/jemalloc.h>
#endif

#include "core/internal.h"

/* Fault injection. countdown > 0: allocations left before one fails;
 * relaxed is enough: tests arm it before starting the code under test, and
 * the count only needs to be atomic, not ordered with other memory. */
static atomic_long fail_countdown;
static atomic_int fail_sticky;
static atomic_long failed;

static int nq__alloc_should_fail(void) {
    long c = atomic_load_explicit(&fail_countdown, memory_order_relaxed);
    if (NQ__LIKELY(c == 0))
        return 0;
    c = atomic_fetch_sub_explicit(&fail_countdown, 1, memory_order_relaxed);
    if (c == 1) {
        if (atomic_load_explicit(&fail_sticky, memory_order_relaxed))
            atomic_store_explicit(&fail_countdown, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&failed, 1, memory_order_relaxed);
        return 1;
    }
    return 0;
}

long nq__alloc_fail_at(long k, int sticky) {
    atomic_store_explicit(&fail_sticky, sticky, memory_order_relaxed);
    atomic_store_explicit(&fail_countdown, k > 0 ? k : 0, memory_order_relaxed);
    return atomic_exchange_explicit(&failed, 0, memory_order_relaxed);
}

void *nq__malloc(size_t size) {
    if (nq__alloc_should_fail() || size == 0)
        return NULL;
#ifdef NQ_WITH_JEMALLOC
    return mallocx(size, 0);
#else
    return malloc(size);
#endif
}

void *nq__calloc(size_t n, size_t size) {
    if (nq__alloc_should_fail() || n == 0 || size == 0 || n > SIZE_MAX / size)
        return NULL;
#ifdef NQ_WITH_JEMALLOC
    return mallocx(n * size, MALLOCX_ZERO);
#else
    return calloc(n, size);
#endif
}

void *nq__aligned_alloc(size_t align, size_t size) {
    if (nq__alloc_should_fail() || size == 0 || size > SIZE_MAX - align)
        return NULL;
    size = (size + align - 1) & ~(align - 1);
#ifdef NQ_WITH_JEMALLOC
    return mallocx(size, MALLOCX_ALIGN(align));
#else
    return aligned_alloc(align, size);
#endif
}

void nq__free(void *p) {
    if (p == NULL)
        return;
#ifdef NQ_WITH_JEMALLOC
    dallocx(p, 0);
#else
    free(p);
#endif
}
