/* The single place where libnq allocates memory: sizes are checked here,
 * then the allocator in the ops table (ops.h) is called: jemalloc's own entry
 * points in a build configured --with-jemalloc, otherwise the C library's.
 * Tests can make chosen allocations fail (nq__alloc_fail_at) to check every
 * NQ_ENOMEM path, or replace the allocator itself (nq__ops_set). */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <stdatomic.h>
#include <stdlib.h>

#include "core/internal.h"
#include "core/ops.h"

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
    return nq__ops.malloc(size);
}

void *nq__calloc(size_t n, size_t size) {
    if (nq__alloc_should_fail() || n == 0 || size == 0 || n > SIZE_MAX / size)
        return NULL;
    return nq__ops.calloc(n, size);
}

void *nq__aligned_alloc(size_t align, size_t size) {
    if (nq__alloc_should_fail() || size == 0 || size > SIZE_MAX - align)
        return NULL;
    size = (size + align - 1) & ~(align - 1);
    return nq__ops.aligned_alloc(align, size);
}

void nq__free(void *p) {
    if (p != NULL)
        nq__ops.free(p);
}
