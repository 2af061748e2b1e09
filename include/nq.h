/* libnq — notifications from any thread to event loops and worker threads.
 *
 * This is the umbrella public header: errors, version, the event queue
 * (nq_evq), the notification queue (handles, notify, waits, subscriptions),
 * ports (the loop side) and observability. Everything a program needs from
 * the core library is declared here; the loop adapters have their own headers
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
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

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
 * in the order their notifies claimed a place in the ring (a notify that
 * conflates into a token whose first notifier has not yet claimed its place
 * returns at once; the token is delivered when that notifier has). A token
 * notified again after it was delivered is pending again and will be
 * delivered again.
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
 * Wait-free where the atomics are single instructions (x86-64, ARMv8.1): a
 * notify that finds the token pending is one atomic exchange; one that queues
 * it adds a fetch-and-add, a load and a store. Delivery is not: a notifier
 * descheduled between claiming its place and storing its token holds back
 * that token (and the ones behind it) until it runs again. A notify may still
 * be returning when its token is delivered: free the queue only once every
 * notifier has returned.
 * Never allocates; makes a syscall (one futex wake) only when the consumer
 * has announced that it is going to sleep in nq_evq_wait, and then only the
 * one notifier that takes the announcement. (The consumer announces, then
 * re-checks the queue: a notify that lands in that window makes a wake the
 * consumer did not need, so wakes can slightly exceed parks.)
 * NQ_EINVAL: e is NULL or token >= max_tokens.
 * NQ_ELIMIT: the ring's slot was not free — impossible while the queue's
 * invariants hold (the ring has a slot per token); reported rather than
 * ignored, and the token is still delivered. */
NQ_EXTERN int nq_evq_notify(nq_evq_t *e, uint32_t token);

/* Delivers up to max pending tokens into out[], oldest first, and returns how
 * many. Tokens not delivered stay pending, in order, for the next call. Cost
 * is O(delivered), independent of max_tokens. Never blocks; returns 0 when
 * nothing is pending, or when e or out is NULL or max is 0. Consumer thread. */
NQ_EXTERN size_t nq_evq_poll(nq_evq_t *e, uint32_t *out, size_t max);

/* Like nq_evq_poll, but blocks until at least one token is pending or
 * timeout_ns (CLOCK_MONOTONIC; < 0: no timeout, 0: do not block) has passed.
 * Waiting spins briefly (256 pause instructions), then yields the CPU a few
 * times, then parks on a futex until a notifier wakes it. Returns the count
 * delivered (>= 1); NQ_ETIMEDOUT, never before timeout_ns has elapsed (a
 * tiny timeout may end a few microseconds late); NQ_EINVAL for NULL
 * arguments or max == 0; NQ_ESYS if the futex call is refused (a seccomp
 * filter, say). Signals (EINTR) never surface. Consumer thread. */
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
    uint64_t parks;      /* times nq_evq_wait went to sleep on the futex (also
                            short naps while a notifier finishes its store) */
    uint64_t wakes;      /* futex wake syscalls made by notifiers (see nq_evq_notify) */
} nq_evq_stats_t;

/* Fills *out. Any thread; the figures are read without stopping producers,
 * so each is exact but they may be from slightly different instants.
 * NQ_EINVAL for NULL arguments. */
NQ_EXTERN int nq_evq_stats(const nq_evq_t *e, nq_evq_stats_t *out);

/* ------------------------------------------------------------------------
 * Notification queue: handles, notify, waits, subscriptions
 *
 * A queue holds handles. A handle is something clients wait on or subscribe
 * to; a producer notifies it with an int64_t argument. Every handle counts its
 * notifications (nq_seq), so a client can check its own condition and then
 * wait for "a notification after the count I saw" with no lock held across
 * the two (see nq_wait).
 *
 * Memory: the handle index (8 bytes per 64 handles of max_handles) is
 * allocated by nq_queue_new. Handle slots (64 bytes each, allocated 64 at a
 * time when the first of them is needed), waits and subscriptions are
 * allocated when created, up to the limits in nq_config_t, and counted
 * against memory_limit; nothing is allocated by nq_notify. A handle slot is
 * reused by later registrations (with a new generation) and freed with the
 * queue.
 *
 * Threads: every function may be called from any thread unless it says
 * otherwise. nq_notify never blocks on a client and takes no lock: a notify
 * to a handle with no receiver is one compare-and-swap on the handle's word;
 * with receivers the same operation also marks the handle held for the few
 * stores that push the arg into each subscription's ring (single-writer,
 * read by receivers without any lock) and complete due waits, and one store
 * releases it. Receivers never hold anything a producer waits for: a
 * subscription's receiver touches the handle's word only to arm its wake-up
 * when it finds its ring empty. No syscall is made unless a receiver that
 * armed its wake-up (it was about to sleep) must be woken.
 * ------------------------------------------------------------------------ */
typedef struct nq_queue nq_queue_t;

/* 0 is never a valid handle. A handle names its slot, the slot's generation
 * (24 bits) and its queue (an 11-bit tag: another queue's handle gets
 * NQ_EBADH unless 2047 queues were created between the two); any value that
 * is not a live handle of this queue gets NQ_EBADH. */
typedef uint64_t nq_handle_t;

typedef struct nq_config {
    uint32_t max_handles;                /* live handles at once (<= 2^24) */
    uint32_t max_waiters_per_handle;     /* pending waits on one handle */
    uint32_t max_subscribers_per_handle; /* subscriptions on one handle (<= 1024) */
    uint32_t default_capacity;           /* subscription capacity when 0 is asked */
    size_t memory_limit;                 /* bytes the queue may hold; 0 = derived */
    /* Fields libnq adds (nq_config_init sets them too): */
    uint32_t max_capacity; /* largest subscription capacity accepted */
} nq_config_t;

/* Defaults: 65536 handles, 256 waiters and 64 subscribers per handle,
 * default capacity 1024, capacities up to 2^20, 256 MiB held in total. */
NQ_EXTERN void nq_config_init(nq_config_t *cfg);

/* cfg NULL = defaults. NQ_EINVAL for a zero or out-of-range limit (a limit
 * larger than the documented maximum). */
NQ_EXTERN int nq_queue_new(const nq_config_t *cfg, nq_queue_t **out);

/* Unregisters every handle (pending waits complete with NQ_ECLOSED,
 * subscriptions deliver what they hold, then NQ_ECLOSED), then drops the
 * queue. Waits and subscriptions still open keep the queue's memory until
 * they are released/closed; every call on the freed queue itself is a
 * caller bug. No notify may run concurrently with or after nq_queue_free. */
NQ_EXTERN void nq_queue_free(nq_queue_t *q);

/* debug_hint (may be NULL) is copied (first 63 bytes) and shown by
 * nq_queue_dump. NQ_ELIMIT at max_handles, NQ_ENOMEM at memory_limit.
 * Slots are handed out in order, then the one freed longest ago first, and
 * what a notify writes in a slot takes half a cache line: the handles of
 * slots 2k and 2k + 1 (often two registered one after the other) share one.
 * Two threads that each notify one of such a pair at a high rate slow each
 * other down a little (the line moves between their cores). */
NQ_EXTERN int nq_register(nq_queue_t *q, const char *debug_hint, nq_handle_t *out);

/* Waits pending on h complete with NQ_ECLOSED; subscriptions on h deliver
 * what they hold, then NQ_ECLOSED; later calls that name h get NQ_EBADH.
 * A slot whose generation is exhausted is retired, never reused, so an old
 * handle can never name a new owner. */
NQ_EXTERN int nq_unregister(nq_queue_t *q, nq_handle_t h);

/* Notifies h with arg: completes every wait pending on h, pushes arg to every
 * subscription on h (a full one drops per its policy), bumps h's count.
 * Returns how many receivers got arg (waits completed + subscriptions that
 * stored it), or NQ_EINVAL / NQ_EBADH. Any thread; never allocates, never
 * waits for a client; wakers run after h is released, on this thread. */
NQ_EXTERN int nq_notify(nq_queue_t *q, nq_handle_t h, int64_t arg);

/* ---- Waits (oneshot) ---- */
#define NQ_SEQ_NEXT UINT64_MAX

/* Notifications so far on h (64 bits; lock-free: never held up by producers). */
NQ_EXTERN int nq_seq(nq_queue_t *q, nq_handle_t h, uint64_t *seq);

/* Blocks the calling thread until the first notification numbered after
 * `after` (NQ_SEQ_NEXT: the next one from now): 0 with *arg (the latest arg
 * if several came; arg may be NULL), NQ_ETIMEDOUT (timeout_ns < 0: none;
 * CLOCK_MONOTONIC, never early; EINTR never surfaces), NQ_ECLOSED (h was
 * unregistered), NQ_EBADH, NQ_ELIMIT (max_waiters_per_handle). Allocates
 * nothing: the wait lives on the caller's stack. */
NQ_EXTERN int nq_wait(nq_queue_t *q, nq_handle_t h, uint64_t after, int64_t timeout_ns,
                      int64_t *arg);

/* A waker is how the core tells any runtime that something is ready. wake(ctx)
 * runs on the thread that completed the wait or filled the subscription
 * (a notifier, or the thread calling nq_unregister / nq_queue_free), after
 * the handle is released. It must be cheap and must not block; it may
 * call libnq functions other than releasing the object it belongs to. */
typedef struct nq_waker {
    void (*wake)(void *ctx);
    void *ctx;
} nq_waker_t;

typedef struct nq_wait nq_wait_t;

/* Starts a wait completed by the first notification after `after`. If it is
 * already due, it completes at once and waker.wake runs before this returns.
 * waker.wake runs at most once per wait. */
NQ_EXTERN int nq_wait_start(nq_queue_t *q, nq_handle_t h, uint64_t after, nq_waker_t waker,
                            nq_wait_t **out);
/* NQ_EAGAIN while pending; 0 with *arg; NQ_ECLOSED; NQ_ECANCELED after a
 * winning cancel; NQ_ETIMEDOUT for a port wait whose timeout expired. */
NQ_EXTERN int nq_wait_result(nq_wait_t *w, int64_t *arg);
/* 0: cancelled before it completed (its waker never runs); NQ_EALREADY: it
 * had completed (its result is kept). Exactly one of a cancel and a
 * concurrent completion wins. */
NQ_EXTERN int nq_wait_cancel(nq_wait_t *w);
/* Cancels if pending, waits for a waker call in progress to return, frees.
 * After it returns the waker is never called. NULL is ignored. */
NQ_EXTERN void nq_wait_release(nq_wait_t *w);

/* ---- Subscriptions (bounded) ---- */
typedef enum { NQ_DROP_NEWEST, NQ_DROP_OLDEST } nq_overflow_t;
typedef struct nq_sub nq_sub_t;
typedef struct nq_sub_opts {
    uint32_t capacity; /* 0 = the queue's default. Exact: at most capacity unread args */
    nq_overflow_t overflow;
    const char *debug_hint;
    nq_waker_t waker; /* optional: called when the subscription goes empty
                         -> non-empty after a receive found it empty or left
                         it so (and at creation), and once when its handle is
                         unregistered; on the notifying thread, except when a
                         notify lands between a receive that emptied it and
                         that receive's arming of the waker: that receive,
                         with no room left for the arg, calls it itself */
} nq_sub_opts_t;

/* Subscribes to every notification on h from now on. A subscription is a
 * ring of exactly `capacity` args that producers fill and receivers drain
 * without any lock a producer takes. NQ_EINVAL (bad overflow, capacity above
 * max_capacity), NQ_EBADH, NQ_ELIMIT (max_subscribers_per_handle), NQ_ENOMEM. */
NQ_EXTERN int nq_subscribe(nq_queue_t *q, nq_handle_t h, const nq_sub_opts_t *opts,
                           nq_sub_t **out);
/* Takes the oldest arg: 0, NQ_EAGAIN (empty), NQ_ECLOSED (its handle was
 * unregistered and everything it held was received). Several threads may
 * receive from one subscription; each arg goes to exactly one of them. */
NQ_EXTERN int nq_sub_try_recv(nq_sub_t *s, int64_t *arg);
/* Blocks until an arg, NQ_ECLOSED, or timeout_ns (CLOCK_MONOTONIC; < 0:
 * none; 0: do not block) -> NQ_ETIMEDOUT. Spins briefly, then parks. One
 * thread at a time may block on a subscription (NQ_EBUSY for a second).
 * nq_sub_close from another thread while it blocks: it returns NQ_ECLOSED,
 * and the close returns only after it has left. */
NQ_EXTERN int nq_sub_recv(nq_sub_t *s, int64_t timeout_ns, int64_t *arg);
/* Takes up to n args, oldest first: the count (>= 1), 0 when empty,
 * NQ_ECLOSED as nq_sub_try_recv. */
NQ_EXTERN int nq_sub_recv_batch(nq_sub_t *s, int64_t *args, size_t n);
/* Args this subscription lost: refused while full (drop-newest) or
 * overwritten unread (drop-oldest). Exact once producers and receivers are
 * quiet: received + dropped + held == notifications sent to it. */
NQ_EXTERN uint64_t nq_sub_dropped(const nq_sub_t *s);
/* Detaches s from its handle and frees it (waiting for a receive blocked on
 * it in another thread to return NQ_ECLOSED, and for a waker call in
 * progress). A port subscription: on the port's thread. NULL is ignored. */
NQ_EXTERN void nq_sub_close(nq_sub_t *s);

/* ------------------------------------------------------------------------
 * Ports: the loop side
 *
 * A port queues completions for one event-loop thread. It owns one eventfd
 * (EFD_CLOEXEC | EFD_NONBLOCK) that is readable while callbacks are pending;
 * the loop watches it and calls nq_port_dispatch, which runs the callbacks on
 * the caller's thread. At most one eventfd write per dispatch cycle, however
 * many notifications arrive. Every nq_port_* function except those that only
 * read (nq_port_fd, nq_port_stats) is called on the port's (loop) thread;
 * notifications that complete its waits may come from any thread.
 * ------------------------------------------------------------------------ */
typedef struct nq_port nq_port_t;

/* A port for up to 65536 live waits + subscriptions. NQ_ESYS if eventfd
 * fails, with errno saying why (EMFILE or ENFILE: out of file descriptors);
 * NQ_ENOMEM. On failure nothing is left allocated or open. */
NQ_EXTERN int nq_port_new(nq_port_t **out);
/* The same with room for max_items (1 .. 2^22) live waits + subscriptions. */
NQ_EXTERN int nq_port_new_sized(uint32_t max_items, nq_port_t **out);
/* The eventfd to watch for readability, or NQ_EINVAL. */
NQ_EXTERN int nq_port_fd(const nq_port_t *p);
/* Runs at most budget callbacks: first those of waits whose timeout is
 * due, then ready ones, oldest first, up to what was ready when it began
 * (budget 0: every due timeout and all that was ready). Returns how many
 * callbacks ran. Ready work left over keeps the fd readable; due timeouts
 * left over make nq_port_timeout_ms() 0 and keep the fd readable too, so the
 * loop comes back at once. (A wait both notified and due gets one callback, from
 * whichever completed it first.) Before it would go idle with budget to
 * spare, it watches for a few microseconds and runs one more round of what
 * arrived (still within the budget): a producer in
 * full flow then costs no wake-up per burst. NQ_EBUSY when called from
 * inside one of the port's own callbacks (the fd is cleared, so a nested
 * level-triggered loop does not spin on it); NQ_ECLOSED in a process that
 * inherited the port over fork() (see "fork()" below). */
NQ_EXTERN int nq_port_dispatch(nq_port_t *p, unsigned budget);
/* As a budget: the port's own (nq_port_set_budget), what adapters pass. */
#define NQ_PORT_BUDGET UINT_MAX
/* The port's own budget until nq_port_set_budget changes it. */
#define NQ_PORT_DEFAULT_BUDGET 1024u
/* Sets the budget NQ_PORT_BUDGET stands for (0: all that is ready); the
 * adapters' nq_uv_set_budget / nq_ev_set_budget call this. NQ_EINVAL for a
 * NULL port or NQ_PORT_BUDGET itself. */
NQ_EXTERN int nq_port_set_budget(nq_port_t *p, unsigned budget);
/* Inside one of the port's callbacks: the running dispatch returns after
 * this callback, and what is left stays ready (the fd readable) for the
 * next one. Outside a dispatch it does nothing. 0, or NQ_EINVAL for NULL. */
NQ_EXTERN int nq_port_stop(nq_port_t *p);
/* Milliseconds until the next wait deadline (rounded up, 0 if due), -1 if
 * none: pass it (or a smaller value) to epoll_wait / a loop timer. */
NQ_EXTERN int64_t nq_port_timeout_ms(const nq_port_t *p);
/* Waits still pending complete with NQ_ECANCELED, and every wait whose
 * callback has not run gets it now; subscriptions created without an `out`
 * pointer are closed, the others stop calling back (close them yourself).
 * Called from inside a callback, the port is freed when dispatch returns. */
NQ_EXTERN void nq_port_free(nq_port_t *p);

typedef void (*nq_wait_cb)(void *data, int status, int64_t arg);
/* A wait whose callback runs in nq_port_dispatch, exactly once: status 0 with
 * arg, NQ_ETIMEDOUT (timeout_ms >= 0 elapsed; < 0: no timeout), NQ_ECLOSED,
 * NQ_ECANCELED (nq_wait_cancel / nq_wait_release / nq_port_free). With out,
 * the caller also holds the wait and must nq_wait_release it (also allowed
 * inside the callback); data must stay valid until the callback has run. */
NQ_EXTERN int nq_port_wait(nq_port_t *p, nq_queue_t *q, nq_handle_t h, uint64_t after,
                           int64_t timeout_ms, nq_wait_cb cb, void *data, nq_wait_t **out);

/* Called in nq_port_dispatch while the subscription is non-empty
 * (level-triggered: drain part, and it is called again in a later dispatch),
 * and, once its handle was unregistered, until a receive has returned
 * NQ_ECLOSED (like EOF on a level-triggered socket). With out,
 * close it with nq_sub_close on the port's thread (also allowed inside the
 * callback; unlike other subscriptions, not from another thread); without,
 * the port closes it when the port is freed. */
typedef void (*nq_sub_cb)(nq_sub_t *s, void *data);
NQ_EXTERN int nq_port_subscribe(nq_port_t *p, nq_queue_t *q, nq_handle_t h,
                                const nq_sub_opts_t *opts, nq_sub_cb cb, void *data,
                                nq_sub_t **out);

/* For adapters (<nq/uv.h>, <nq/ev.h>, <nq/epoll.h> use these; so may yours).
 * attach: the port has at most one owner at a time (NQ_EBUSY while another,
 * or the same, holds it). detach: only by its owner (NQ_EINVAL otherwise);
 * detached inside one of the port's callbacks, the running dispatch stops
 * after that callback and leaves the rest ready, so nothing more runs through
 * the old owner (nq_port_stop). on_deadline: cb runs on the port's thread,
 * never from inside a callback, whenever the next deadline may have moved:
 * at registration if there is one, from nq_port_wait (outside a dispatch)
 * when it moves earlier, and at the end of each dispatch while one exists or
 * after one went away; it re-arms (or stops) the loop's timer from
 * nq_port_timeout_ms(). NULL removes it. Free a port only after detaching
 * it (close its adapter first), except a port inherited over fork() (see
 * "fork()"). */
NQ_EXTERN int nq_port_attach(nq_port_t *p, const void *owner);
NQ_EXTERN int nq_port_detach(nq_port_t *p, const void *owner);
/* The owner attached now, or NULL (also for a NULL port). */
NQ_EXTERN const void *nq_port_owner(const nq_port_t *p);
NQ_EXTERN int nq_port_on_deadline(nq_port_t *p, void (*cb)(nq_port_t *p, void *data),
                                  void *data);

/* ------------------------------------------------------------------------
 * fork()
 *
 * A child process may create and use its own queues, ports, subscriptions
 * and event queues as any process does. Objects inherited from the parent
 * are copies in the child's memory, and the child never reaches the
 * parent's through them:
 * - Queues, handles, waits, subscriptions and event queues: the child's
 *   copies work on their own (a notify in the child reaches the child's
 *   copies of the receivers, never the parent's; the parent sees nothing).
 *   Exception: if another thread of the parent was inside libnq at the
 *   moment of fork(), a copy may hold one of that thread's locks forever, and
 *   a child call that needs it never returns; as for any library, a child of
 *   a multithreaded parent should use only objects it created itself.
 * - Ports: the eventfd is shared with the parent (one kernel object), so a
 *   port belongs to the process that created it. In a child,
 *   nq_port_dispatch, nq_port_wait and nq_port_subscribe on an inherited
 *   port return NQ_ECLOSED, and a notification in the child that completes
 *   one of its copy's waits never writes the eventfd; the parent's loop sees
 *   none of it. nq_port_free in the child frees the child's copy (pending
 *   waits get their callbacks, with NQ_ECANCELED, in the child) and closes
 *   only the child's descriptor; the same exception as above applies (a
 *   parent thread inside nq_port_dispatch at fork() leaves the copy "in
 *   dispatch", and its free is deferred forever).
 * - Loops and adapters: an epoll set is shared with the parent too, and so
 *   is the kernel state behind an inherited libuv or libev loop. In a child,
 *   do not close or detach an inherited adapter (nq_uv_close, nq_ev_stop or
 *   nq_ev_close, nq_epoll_del): each removes the port's eventfd from the
 *   shared epoll set, and the parent's loop never wakes for libnq again.
 *   Exception: after uv_loop_fork() / ev_loop_fork() the child's loop has
 *   its own epoll set and closing is safe. Otherwise free an inherited port
 *   without closing its adapter (the rule "detach first" of nq_port_free
 *   does not apply to an inherited port), and never run the inherited loop:
 *   its dispatch answers NQ_ECLOSED without reading the shared eventfd, so
 *   a level-triggered loop would spin for as long as the parent's eventfd
 *   is readable. Simplest: free what you inherited, or just exec or exit.
 * This needs fork() to run pthread_atfork handlers: fork() does; a raw
 * clone(), syscall(SYS_fork) and _Fork() do not. If pthread_atfork itself
 * failed (out of memory, at the first nq_port_new), the check is off.
 * ------------------------------------------------------------------------ */

/* ------------------------------------------------------------------------
 * Observability
 * ------------------------------------------------------------------------ */
typedef struct nq_stats {
    uint64_t notifies;        /* nq_notify calls on live handles */
    uint64_t deliveries;      /* receivers reached: waits_completed + args stored */
    uint64_t drops;           /* args dropped by full subscriptions */
    uint64_t waits_completed; /* by a notification, including waits already due
                                 when started (so deliveries may exceed the sum
                                 of nq_notify's return values) */
    uint64_t waits_closed;    /* by nq_unregister / nq_queue_free */
    uint64_t waits_timed_out;
    uint64_t waits_cancelled;
    uint32_t live_handles;
    uint32_t retired_slots;   /* slots whose generations ran out */
    uint32_t live_waits;      /* nq_wait_t not yet released (blocked nq_wait not counted) */
    uint32_t live_subs;
    uint64_t waits_pending;   /* on handles' lists now */
    size_t bytes_held;
    size_t memory_limit;
} nq_stats_t;
NQ_EXTERN int nq_queue_stats(const nq_queue_t *q, nq_stats_t *out);

typedef struct nq_port_stats {
    uint64_t dispatches;
    uint64_t callbacks;
    uint64_t efd_writes;
    uint64_t efd_reads;
    uint64_t deadlines_expired;
    uint64_t idle_spins;     /* dispatches that watched the evq before going idle */
    uint64_t idle_spin_hits; /* ... and caught work doing so */
    uint32_t live_items; /* waits + subscriptions on the port */
    uint32_t max_items;
    uint32_t deadlines;  /* waits with a pending deadline */
} nq_port_stats_t;
NQ_EXTERN int nq_port_stats(const nq_port_t *p, nq_port_stats_t *out);

/* Writes every live handle with its debug hint, seq, waiters and subscribers
 * (hint, depth/capacity, drops) to f. Any thread. */
NQ_EXTERN int nq_queue_dump(const nq_queue_t *q, FILE *f);

#ifdef __cplusplus
}
#endif
#endif /* NQ_H */
