/* libnq — notifications from any thread to event loops and worker threads.
 *
 * This is the umbrella public header. Everything a program needs from the
 * core library is declared here; the loop adapters have their own headers
 * (<nq/uv.h>, <nq/ev.h>, <nq/epoll.h>) and libraries, so the core never links
 * a loop.
 *
 * Conventions (after libuv): every function that can fail returns int, 0 (or
 * a count) on success and a negative NQ_E* code on failure. No function
 * aborts, asserts or crashes on bad input from the caller: NULL pointers,
 * zero or absurd sizes and out-of-range values return NQ_EINVAL. Objects are
 * opaque; create them with *_new and destroy them with *_free.
 */
#ifndef NQ_H
#define NQ_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include "nq/version.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) || defined(__clang__)
#define NQ_EXTERN __attribute__((visibility("default")))
#else
#define NQ_EXTERN
#endif

/* ------------------------------------------------------------------------
 * Errors
 *
 * Where an errno value fits, the code is its negation (NQ_EINVAL == -EINVAL),
 * so a caller may compare with either. The others live in -4001..-4004, far
 * from any errno. NQ_ESYS means a system call failed and errno still holds
 * the reason when the function returns.
 * ------------------------------------------------------------------------ */
#define NQ_ERRNO_MAP(XX)                                                       \
    XX(EINVAL, -EINVAL, "invalid argument")                                    \
    XX(EBADH, -4001, "unknown, unregistered or stale handle")                  \
    XX(ELIMIT, -4002, "a configured limit was reached")                        \
    XX(ENOMEM, -ENOMEM, "out of memory or memory limit reached")               \
    XX(EAGAIN, -EAGAIN, "nothing is ready now")                                \
    XX(ETIMEDOUT, -ETIMEDOUT, "timed out")                                     \
    XX(ECANCELED, -ECANCELED, "canceled")                                      \
    XX(EALREADY, -EALREADY, "the wait had already completed")                  \
    XX(ECLOSED, -4003, "the handle was unregistered or the object closed")     \
    XX(EBUSY, -EBUSY, "the object is in use")                                  \
    XX(ESYS, -4004, "a system call failed (see errno)")

typedef enum {
#define NQ__ERR_ENUM(name, value, msg) NQ_##name = (value),
    NQ_ERRNO_MAP(NQ__ERR_ENUM)
#undef NQ__ERR_ENUM
    NQ_OK = 0
} nq_errno_t;

/* A sentence describing err ("invalid argument"); "unknown error" for a value
 * that is not an NQ_E* code. Never NULL; the string is static. Any thread. */
NQ_EXTERN const char *nq_strerror(int err);
/* The code's name without its prefix's value ("NQ_EINVAL"); "NQ_UNKNOWN" for a
 * value that is not an NQ_E* code. Never NULL; static. Any thread. */
NQ_EXTERN const char *nq_err_name(int err);

/* ------------------------------------------------------------------------
 * Version and build features
 * ------------------------------------------------------------------------ */
/* NQ_VERSION_HEX of the library actually linked (may differ from the header). */
NQ_EXTERN unsigned nq_version(void);
/* "MAJOR.MINOR.PATCH" of the library actually linked. */
NQ_EXTERN const char *nq_version_string(void);

#define NQ_FEATURE_JEMALLOC (1u << 0) /* internal allocations use jemalloc */
#define NQ_FEATURE_FUTEX (1u << 1)    /* blocking calls park on a futex */
/* Bitmask of NQ_FEATURE_* that this build of the library was compiled with. */
NQ_EXTERN unsigned nq_features(void);

/* ------------------------------------------------------------------------
 * Event queue (nq_evq): a conflating set of tokens delivered in FIFO order.
 *
 * Tokens are the caller's own small integers, 0 .. max_tokens-1. Notifying a
 * token makes it pending; a pending token is delivered once by the next poll,
 * however many times it was notified meanwhile (conflation). Tokens come out
 * in the order they first became pending. A token notified again after it
 * was delivered is pending again and will be delivered again.
 *
 * Threads: any number of threads may call nq_evq_notify at once. Only one
 * thread at a time may consume (nq_evq_poll / nq_evq_wait); consumers on
 * several threads must serialise themselves (a mutex, or one owner thread).
 * Two concurrent consumers are a caller bug: tokens may then be delivered
 * twice or held back, but memory stays safe.
 *
 * Memory ordering: nq_evq_notify is a release operation and the poll that
 * delivers its token (or the token it conflated into) is an acquire: what a
 * producer wrote before notifying is visible to the consumer once the token
 * comes out of nq_evq_poll or nq_evq_wait.
 *
 * Bounds: the queue never allocates after nq_evq_new and cannot overflow:
 * each token is pending at most once, and the ring holds max_tokens entries
 * (rounded up to a power of two).
 * ------------------------------------------------------------------------ */
typedef struct nq_evq nq_evq_t;

/* Largest max_tokens accepted (16 Mi tokens: a 128 MiB ring). */
#define NQ_EVQ_MAX_TOKENS (1u << 24)

/* Creates a queue for tokens 0 .. max_tokens-1. All memory is allocated here.
 * NQ_EINVAL: out is NULL, max_tokens is 0 or above NQ_EVQ_MAX_TOKENS.
 * NQ_ENOMEM: allocation failed. Any thread. */
NQ_EXTERN int nq_evq_new(uint32_t max_tokens, nq_evq_t **out);

/* Makes token pending (0 if it was queued or conflated into a pending one).
 * Any thread, concurrently with other notifiers and with the consumer.
 * Lock-free: a notify that finds the token already pending is one atomic
 * exchange (wait-free); one that queues it claims a ring slot with a
 * compare-and-swap that only another notifier's success can make it retry.
 * Never allocates; makes a syscall (one futex wake) only when the consumer
 * has announced that it is going to sleep in nq_evq_wait, and then only the
 * one notifier that takes the announcement. (The consumer announces, then
 * re-checks the queue: a notify that lands in that window makes a wake the
 * consumer did not need, so wakes can slightly exceed parks.)
 * NQ_EINVAL: e is NULL or token >= max_tokens.
 * NQ_ELIMIT: the ring had no free slot — impossible while the queue's
 * invariants hold; reported rather than ignored, and the notification is not
 * queued (the token is left not pending). */
NQ_EXTERN int nq_evq_notify(nq_evq_t *e, uint32_t token);

/* Delivers up to max pending tokens into out[], oldest first, and returns how
 * many. Tokens not delivered stay pending, in order, for the next call. Cost
 * is O(delivered), independent of max_tokens. Never blocks; returns 0 when
 * nothing is pending, or when e or out is NULL or max is 0. Consumer thread. */
NQ_EXTERN size_t nq_evq_poll(nq_evq_t *e, uint32_t *out, size_t max);

/* Like nq_evq_poll, but blocks until at least one token is pending or
 * timeout_ns (CLOCK_MONOTONIC; < 0: no timeout, 0: do not block) has passed.
 * Waiting spins briefly, then yields the CPU a few times, then parks on a
 * futex until a notifier wakes it. Returns the count delivered (>= 1);
 * NQ_ETIMEDOUT, never before timeout_ns has elapsed; NQ_EINVAL for NULL
 * arguments or max == 0. Signals (EINTR) never surface. Consumer thread. */
NQ_EXTERN int nq_evq_wait(nq_evq_t *e, uint32_t *out, size_t max,
                          int64_t timeout_ns);

/* Frees the queue. No other thread may be using it. NULL is ignored. */
NQ_EXTERN void nq_evq_free(nq_evq_t *e);

typedef struct nq_evq_stats {
    uint32_t max_tokens; /* as given to nq_evq_new */
    uint32_t ring_size;  /* slots in the ring (max_tokens rounded up to 2^k) */
    uint64_t queued;     /* notifies that made a token pending (not conflated) */
    uint64_t delivered;  /* tokens handed out by poll/wait */
    uint64_t pending;    /* queued - delivered: tokens pending now */
    uint64_t batches;    /* polls (or waits) that delivered at least one token */
    uint64_t parks;      /* times nq_evq_wait went to sleep on the futex */
    uint64_t wakes;      /* futex wake syscalls made by notifiers (see nq_evq_notify) */
} nq_evq_stats_t;

/* Fills *out. Any thread; the figures are read without stopping producers,
 * so each is exact but they may be from slightly different instants.
 * NQ_EINVAL for NULL arguments. */
NQ_EXTERN int nq_evq_stats(const nq_evq_t *e, nq_evq_stats_t *out);

#ifdef __cplusplus
}
#endif
#endif /* NQ_H */
