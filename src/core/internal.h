/* This file is private to libnq: helpers shared by the core's .c files
 * (allocation, clocks, cache-line layout, CPU hints). Nothing declared here
 * is exported from the shared library. */
#ifndef NQ_CORE_INTERNAL_H
#define NQ_CORE_INTERNAL_H

#include <stdalign.h>
#include <stddef.h>
#include <stdint.h>

#include "nq.h"

#define NQ__CACHELINE 64
/* Put a field that one side writes on a line of its own, so the other side's
 * writes do not steal it (false sharing). */
#define NQ__CACHELINE_ALIGNED alignas(NQ__CACHELINE)

#if defined(__GNUC__) || defined(__clang__)
#define NQ__LIKELY(x) __builtin_expect(!!(x), 1)
#define NQ__UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define NQ__LIKELY(x) (x)
#define NQ__UNLIKELY(x) (x)
#endif

#if defined(__GNUC__) || defined(__clang__)
#define NQ__NOINLINE __attribute__((noinline))
#define NQ__INLINE inline __attribute__((always_inline))
#else
#define NQ__NOINLINE
#define NQ__INLINE inline
#endif

/* A hint to the CPU that this is a spin-wait loop. */
static inline void nq__cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* --- The one allocation point (alloc.c) ---------------------------------
 * Every internal allocation goes through these, so a build --with-jemalloc
 * sends them all to jemalloc and tests can make the k-th one fail. */
void *nq__malloc(size_t size);
void *nq__calloc(size_t n, size_t size);
/* align: a power of two >= sizeof(void *); size is rounded up to it. */
void *nq__aligned_alloc(size_t align, size_t size);
void nq__free(void *p);
/* Test hook: make the k-th allocation from now fail (k >= 1), and every
 * later one too if sticky; k == 0 turns injection off. Returns how many
 * allocations were failed since the last call. */
long nq__alloc_fail_at(long k, int sticky);

/* --- Monotonic time (time.c) -------------------------------------------- */
#define NQ__NO_DEADLINE INT64_MAX
int64_t nq__now_ns(void);
/* now + timeout_ns, saturated; NQ__NO_DEADLINE for timeout_ns < 0. */
int64_t nq__deadline_ns(int64_t timeout_ns);

#endif
