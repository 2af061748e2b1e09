/* Ports: where completions for one event-loop thread are queued. A port owns
 * one eventfd that is readable while callbacks are pending, an nq_evq of ready
 * items (tokens index the port's item table), and a deadline heap for waits
 * with timeouts. Callbacks run only inside nq_port_dispatch, on its caller's
 * thread; every other port function is also called on that thread. Wakers
 * (nq__port_signal) run on any thread.
 *
 * Wake-up protocol: at most one eventfd write per signalling window, and
 * no syscall at all while the loop has work left.
 *   waker (any thread)                     dispatch (loop thread), at its end
 *   nq_evq_notify(ready, token)            if the head of ready is written:
 *     -- its fetch_add claiming a ring         work left: if signalled == 0,
 *        slot is seq_cst (W), then its         xchg it to 1 and write(eventfd);
 *        slot store (S, seq_cst)               return (no read, no write
 *   if load(signalled) == 0  (seq_cst, R)      while signalled is 1)
 *      and xchg(signalled, 1) == 0         else, going idle:
 *        write(eventfd, 1)                     read(eventfd)        (clear it)
 *                                              signalled = 0        (seq_cst, P)
 *                                              if pending(ready) > 0 (L: tail,
 *                                                 seq_cst) and the head is
 *                                                 written (L1, seq_cst):
 *                                                 xchg(signalled, 1), write
 *   I1  signalled == 1 means an eventfd write after the last read has been
 *       or will be made: only P (right after the read) stores 0, and every
 *       0 -> 1 exchange is followed by its winner's write. So the "work
 *       left" return keeps the fd readable without touching it. The one
 *       other reader is a nested dispatch (a loop run inside a callback,
 *       refused with NQ_EBUSY): it clears the fd so the nested loop does not
 *       spin, and the outer dispatch then reopens the window (a P) before
 *       it trusts signalled again.
 *   I2  No lost wake-up: if L misses a waker's claim, P < L < W < R in the
 *       seq_cst order, so R reads P's 0 (the waker writes) or a later 1 (its
 *       writer writes). A conflated notify claims nothing, but the notify
 *       that queued its token did, and that one signals (or L sees it).
 *   I3  Writes <= windows: a write needs a 0 -> 1 exchange, and only P opens
 *       a window, once per idle dispatch: efd_writes <= dispatches + 1.
 * A stalled head (its waker preempted between its claim W and its store S)
 * is not work we can run: dispatch takes the idle path and does not signal
 * for it (a level-triggered loop would spin until that thread runs again).
 * If L1 misses S then P < L1 < S < R, so that waker's R reads 0 or a later
 * 1 and the eventfd is written once the token is there. (The slot's
 * previous value, the consumer's release store freeing it, happens-before S
 * through the waker's claim, so L1 missing S does place L1 before S.) A
 * port's evq makes its slot stores seq_cst for this
 * (nq__evq_set_sc_publish). Tokens behind a stalled head wait for it, as in
 * any FIFO; so does every wake-up while a waker is paused between its
 * exchange and its write (the others see 1): delayed, never lost.
 * The eventfd is read only when going idle, never at the start: a write
 * that lands after that read (a waker that exchanged before P) leaves the
 * fd readable, and the next dispatch, with nothing to run, reads it again.
 * "Work left" is also a deadline that is due when dispatch ends (its
 * expiry, first and within the budget, stopped at the budget, or a callback
 * started a wait with timeout 0): the fd stays readable in the same way, so
 * the loop comes back through its I/O watcher like for any other work.
 * Before the idle path, a dispatch with budget to spare may watch the evq
 * for a few microseconds (adaptive: see nq__port_spin_worth_it) and run
 * what arrives, round after round while each round catches work (a
 * producer in flow), up to NQ__PORT_SPIN_ROUNDS rounds and NQ__PORT_SPIN_NS;
 * that only delays the idle path, it changes none of the steps above.
 *
 * Tokens are reused after their item is gone; a stale token can still come
 * out of the evq (a late waker), so dispatch checks each item's own state
 * and treats a token that names nothing due as spurious.
 */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core/queue.h"
#include "core/evq.h"
#include "core/ops.h"
#include "core/testhooks.h"

#define NQ__PORT_DEFAULT_ITEMS (1u << 16)
#define NQ__PORT_MAX_ITEMS (1u << 22)
/* Pauses dispatch watches an empty evq before it goes idle: a few
 * microseconds, against a wake-up's eventfd write, read and loop sleep. */
#define NQ__PORT_SPINS 128
/* Rounds of watching a dispatch may make while each one catches work (a
 * producer in full flow), and the time they may take together. */
#define NQ__PORT_SPIN_ROUNDS 64u
#define NQ__PORT_SPIN_NS 200000

enum { NQ__PI_NONE = 0, NQ__PI_WAIT, NQ__PI_SUB };

typedef struct nq__pitem {
    uint8_t kind;
    void *obj;
} nq__pitem_t;

/* A port wait: the queue's wait, then what the port adds. The queue knows
 * only the nq_wait_t and the waker the port put in it. */
typedef struct nq__pwait {
    nq_wait_t w;
    struct nq_port *port;
    uint32_t token;
    uint32_t heap_index; /* in the deadline heap, or UINT32_MAX */
    int64_t deadline_ns; /* absolute CLOCK_MONOTONIC, if heap_index is set */
    nq_wait_cb cb;
    void *data;
    uint8_t cb_done;
} nq__pwait_t;

/* A port subscription: the queue's subscription, then the port's part. */
typedef struct nq__psub {
    nq_sub_t s;
    _Atomic(struct nq_port *) port; /* read by wakers; NULL once the port is gone */
    nq_waker_t user;                /* the caller's own waker, if any */
    nq_sub_cb cb;
    void *data;
    uint32_t token;
    uint8_t owned; /* the port closes it (the caller kept no pointer) */
    uint8_t in_cb, close_deferred;
} nq__psub_t;

struct nq_port {
    int efd;
    unsigned fork_gen; /* nq__fork_gen in the process that created the port */
    nq_evq_t *ready;
    uint32_t max_items;

    /* Written by wakers on every thread, read by dispatch. */
    NQ__CACHELINE_ALIGNED atomic_int signalled;
    _Atomic uint64_t efd_writes;

    /* The loop thread's own. Counters are atomic for nq_port_stats only. */
    NQ__CACHELINE_ALIGNED nq__pitem_t *items;
    uint32_t *free_tokens;
    uint32_t nfree;
    nq__pwait_t **heap; /* min-heap by deadline_ns */
    uint32_t heap_len;
    /* Mirrors of live items and heap_len for nq_port_stats on any thread:
     * written here with relaxed stores, read relaxed (figures, not sync). */
    _Atomic uint32_t live_items, deadlines;
    int in_dispatch;
    int free_deferred;
    int stop;          /* nq_port_stop (or a detach) inside a callback: stop */
    int told_deadline; /* the owner's hook was last told of a deadline */
    unsigned budget;   /* what NQ_PORT_BUDGET stands for */
    int efd_cleared; /* a nested dispatch read the fd: I1 is off until the end */
    uint32_t spin_misses; /* pre-idle spins in a row that caught nothing */
    uint32_t spin_skipped;
    _Atomic uint64_t idle_spins, idle_spin_hits; /* for nq_port_stats */
    void (*deadline_cb)(nq_port_t *p, void *data);
    void *deadline_data;
    const void *owner; /* the adapter attached, if any */
    _Atomic uint64_t dispatches, callbacks, efd_reads, deadlines_expired;
};

/* --- fork() --------------------------------------------------------------
 * The eventfd is a kernel object: after fork() the child's copy of a port
 * refers to the same one as the parent's. A dispatch in the child would read
 * it and take a wake-up meant for the parent's loop (whose port, with
 * signalled at 1, would then never write again: its loop would sleep for
 * good). So a port belongs to the process that created it: a
 * pthread_atfork child handler bumps a generation, and in any other process
 * dispatch, port waits and port subscriptions answer NQ_ECLOSED and wakers
 * skip the write; nq_port_free frees the child's copy (and closes only the
 * child's descriptor). Everything else in a port lives in process memory,
 * so the child's copy cannot reach the parent. */
static atomic_uint nq__fork_gen;
static pthread_once_t nq__fork_once = PTHREAD_ONCE_INIT;

static void nq__forked(void) {
    /* Relaxed: the child's only thread runs this before anything else, and
     * no other process reads this copy of the counter. */
    atomic_fetch_add_explicit(&nq__fork_gen, 1, memory_order_relaxed);
}

static void nq__fork_hook(void) {
    /* If this fails (ENOMEM), the protection is off; nothing else changes. */
    (void)pthread_atfork(NULL, NULL, nq__forked);
}

/* Was p created by an ancestor of this process? One load, unshared writes. */
static inline int nq__port_inherited(const nq_port_t *p) {
    return NQ__UNLIKELY(p->fork_gen !=
                        atomic_load_explicit(&nq__fork_gen, memory_order_relaxed));
}

/* --- creation ----------------------------------------------------------- */

int nq_port_new_sized(uint32_t max_items, nq_port_t **out) {
    if (out == NULL)
        return NQ_EINVAL;
    *out = NULL;
    if (max_items == 0 || max_items > NQ__PORT_MAX_ITEMS)
        return NQ_EINVAL;
    nq_port_t *p = nq__aligned_alloc(NQ__CACHELINE, sizeof(*p));
    if (p == NULL)
        return NQ_ENOMEM;
    memset(p, 0, sizeof(*p));
    p->efd = -1;
    (void)pthread_once(&nq__fork_once, nq__fork_hook);
    p->fork_gen = atomic_load_explicit(&nq__fork_gen, memory_order_relaxed);
    p->max_items = max_items;
    p->budget = NQ_PORT_DEFAULT_BUDGET;
    p->items = nq__calloc(max_items, sizeof(*p->items));
    p->free_tokens = nq__malloc((size_t)max_items * sizeof(uint32_t));
    p->heap = nq__malloc((size_t)max_items * sizeof(nq__pwait_t *));
    int rc = NQ_ENOMEM;
    if (p->items == NULL || p->free_tokens == NULL || p->heap == NULL)
        goto fail;
    rc = nq_evq_new(max_items, &p->ready);
    if (rc < 0)
        goto fail;
    nq__evq_set_sc_publish(p->ready); /* S of the stalled-head handshake */
    p->efd = nq__ops.eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (p->efd < 0) {
        rc = NQ_ESYS;
        goto fail;
    }
    for (uint32_t i = 0; i < max_items; i++)
        p->free_tokens[i] = max_items - 1 - i; /* hand out 0, 1, 2 ... first */
    p->nfree = max_items;
    atomic_init(&p->signalled, 0);
    *out = p;
    return 0;
fail:;
    int saved = errno;
    nq_evq_free(p->ready);
    nq__free(p->items);
    nq__free(p->free_tokens);
    nq__free(p->heap);
    nq__free(p);
    errno = saved;
    return rc;
}

int nq_port_new(nq_port_t **out) {
    return nq_port_new_sized(NQ__PORT_DEFAULT_ITEMS, out);
}

int nq_port_fd(const nq_port_t *p) {
    return p == NULL ? NQ_EINVAL : p->efd;
}

int nq_port_attach(nq_port_t *p, const void *owner) {
    if (p == NULL || owner == NULL)
        return NQ_EINVAL;
    if (p->owner != NULL)
        return NQ_EBUSY;
    p->owner = owner;
    return 0;
}

int nq_port_detach(nq_port_t *p, const void *owner) {
    if (p == NULL || owner == NULL)
        return NQ_EINVAL;
    if (p->owner != owner)
        return NQ_EINVAL;
    p->owner = NULL;
    /* Detached from inside one of the port's callbacks (an adapter closed
     * there): nothing more runs through the old owner. */
    return nq_port_stop(p);
}

int nq_port_stop(nq_port_t *p) {
    if (p == NULL)
        return NQ_EINVAL;
    /* The running dispatch stops after the current callback; what is left
     * stays ready (and the fd readable) for the next one. */
    if (p->in_dispatch)
        p->stop = 1;
    return 0;
}

int nq_port_set_budget(nq_port_t *p, unsigned budget) {
    if (p == NULL || budget == NQ_PORT_BUDGET)
        return NQ_EINVAL;
    p->budget = budget;
    return 0;
}

const void *nq_port_owner(const nq_port_t *p) {
    return p == NULL ? NULL : p->owner;
}

int nq_port_on_deadline(nq_port_t *p, void (*cb)(nq_port_t *p, void *data), void *data) {
    if (p == NULL)
        return NQ_EINVAL;
    p->deadline_cb = cb;
    p->deadline_data = data;
    p->told_deadline = 0;
    /* A new owner learns the deadline there is (outside a dispatch; inside,
     * the end of the dispatch tells it). */
    if (cb != NULL && !p->in_dispatch && p->heap_len > 0) {
        p->told_deadline = 1;
        cb(p, data);
    }
    return 0;
}

/* End of a dispatch (a safe point: no callback is running): tell the owner
 * the next deadline may have moved, whenever one exists or one was told
 * before (a timer that fired needs re-arming; one for a deadline that is
 * gone needs stopping). */
static void nq__port_tell_deadline(nq_port_t *p) {
    if (p->deadline_cb == NULL || (p->heap_len == 0 && !p->told_deadline))
        return;
    p->told_deadline = p->heap_len > 0;
    p->deadline_cb(p, p->deadline_data);
}

/* --- the waker side (any thread) ---------------------------------------- */

/* The one eventfd write of a cycle (the caller turned signalled 0 -> 1). */
static void nq__port_write_efd(nq_port_t *p) {
    uint64_t one = 1;
    if (nq__port_inherited(p))
        return; /* a child's copy: the eventfd is the parent's (see fork()) */
    int saved = errno;
    /* The write only has to leave the fd readable. EAGAIN: the counter is at
     * its 2^64-2 limit (libnq reads it every cycle, so only someone else
     * writing this fd gets it there): it is readable already. EINTR cannot
     * come from a non-blocking eventfd, but would cost only a retry. Other
     * errors need a closed fd: a caller bug with nothing to report to. */
    ssize_t r;
    do
        r = nq__ops.write(p->efd, &one, sizeof(one));
    while (r < 0 && errno == EINTR);
    errno = saved;
    atomic_fetch_add_explicit(&p->efd_writes, 1, memory_order_relaxed);
}

/* The second half of a signal, after the token is in the evq. */
void nq__port_kick(nq_port_t *p) {
    /* R: seq_cst pairs with dispatch's stores of 0 (P, P2); see the top. */
    if (atomic_load_explicit(&p->signalled, memory_order_seq_cst) == 0 &&
        atomic_exchange_explicit(&p->signalled, 1, memory_order_seq_cst) == 0)
        nq__port_write_efd(p);
}

static void nq__port_signal(nq_port_t *p, uint32_t token) {
    nq_evq_notify(p->ready, token); /* token < max_items: cannot fail */
    nq__port_kick(p);
}

nq_evq_t *nq__port_evq(nq_port_t *p) {
    return p->ready;
}

static void nq__pwait_wake(void *ctx) {
    nq__pwait_t *pw = ctx;
    nq__port_signal(pw->port, pw->token);
}

static void nq__psub_wake(void *ctx) {
    nq__psub_t *ps = ctx;
    /* Relaxed: the port stores NULL, then quiesces the subscription (HELD
     * orders a later waker after the store; an earlier one is waited for). */
    nq_port_t *p = atomic_load_explicit(&ps->port, memory_order_relaxed);
    if (p != NULL)
        nq__port_signal(p, ps->token);
    if (ps->user.wake != NULL)
        ps->user.wake(ps->user.ctx);
}

/* --- tokens and the deadline heap (loop thread) -------------------------- */

static int nq__port_token(nq_port_t *p, uint32_t *token) {
    if (p->nfree == 0)
        return NQ_ELIMIT;
    *token = p->free_tokens[--p->nfree];
    atomic_store_explicit(&p->live_items,
                          atomic_load_explicit(&p->live_items, memory_order_relaxed) + 1,
                          memory_order_relaxed); /* one writer: the port's thread */
    return 0;
}

static void nq__port_untoken(nq_port_t *p, uint32_t token) {
    p->items[token].kind = NQ__PI_NONE;
    p->items[token].obj = NULL;
    p->free_tokens[p->nfree++] = token;
    atomic_store_explicit(&p->live_items,
                          atomic_load_explicit(&p->live_items, memory_order_relaxed) - 1,
                          memory_order_relaxed);
}

static void nq__heap_set(nq_port_t *p, uint32_t i, nq__pwait_t *w) {
    p->heap[i] = w;
    w->heap_index = i;
}

static void nq__heap_up(nq_port_t *p, uint32_t i) {
    nq__pwait_t *w = p->heap[i];
    while (i > 0) {
        uint32_t parent = (i - 1) / 2;
        if (p->heap[parent]->deadline_ns <= w->deadline_ns)
            break;
        nq__heap_set(p, i, p->heap[parent]);
        i = parent;
    }
    nq__heap_set(p, i, w);
}

static void nq__heap_down(nq_port_t *p, uint32_t i) {
    nq__pwait_t *w = p->heap[i];
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= p->heap_len)
            break;
        if (c + 1 < p->heap_len && p->heap[c + 1]->deadline_ns < p->heap[c]->deadline_ns)
            c++;
        if (w->deadline_ns <= p->heap[c]->deadline_ns)
            break;
        nq__heap_set(p, i, p->heap[c]);
        i = c;
    }
    nq__heap_set(p, i, w);
}

static void nq__heap_remove(nq_port_t *p, nq__pwait_t *w) {
    uint32_t i = w->heap_index;
    if (i == UINT32_MAX)
        return;
    w->heap_index = UINT32_MAX;
    nq__pwait_t *last = p->heap[--p->heap_len];
    atomic_store_explicit(&p->deadlines, p->heap_len, memory_order_relaxed);
    if (i == p->heap_len)
        return;
    nq__heap_set(p, i, last);
    nq__heap_up(p, i);
    nq__heap_down(p, last->heap_index);
}

int64_t nq_port_timeout_ms(const nq_port_t *p) {
    if (p == NULL || p->heap_len == 0)
        return -1;
    int64_t left = p->heap[0]->deadline_ns - nq__now_ns();
    if (left <= 0)
        return 0;
    return (left + 999999) / 1000000; /* round up: a loop timer never fires early */
}

/* --- port waits ---------------------------------------------------------- */

int nq_port_wait(nq_port_t *p, nq_queue_t *q, nq_handle_t h, uint64_t after,
                 int64_t timeout_ms, nq_wait_cb cb, void *data, nq_wait_t **out) {
    if (out != NULL)
        *out = NULL;
    if (p == NULL || q == NULL || cb == NULL)
        return NQ_EINVAL;
    if (p->free_deferred || nq__port_inherited(p))
        return NQ_ECLOSED;
    uint32_t token;
    if (nq__port_token(p, &token) < 0)
        return NQ_ELIMIT;
    int rc = NQ_ENOMEM;
    nq__pwait_t *pw = NULL;
    if (nq__mem_reserve(q, sizeof(*pw)) < 0)
        goto fail;
    pw = nq__calloc(1, sizeof(*pw));
    if (pw == NULL) {
        nq__mem_release(q, sizeof(*pw));
        goto fail;
    }
    nq__wait_init(&pw->w, NQ__WK_OWNED, (nq_waker_t){nq__pwait_wake, pw}, sizeof(*pw),
                  out != NULL ? 2 : 1);
    pw->w.wake_on_cancel = 1; /* the callback brings the user's cancel */
    pw->port = p;
    pw->token = token;
    pw->cb = cb;
    pw->data = data;
    pw->heap_index = UINT32_MAX;
    p->items[token].kind = NQ__PI_WAIT;
    p->items[token].obj = pw;
    rc = nq__wait_attach(q, h, after, &pw->w);
    if (rc < 0) {
        nq__free(pw);
        nq__mem_release(q, sizeof(*pw));
        goto fail;
    }
    nq__queue_ref(q);
    atomic_fetch_add_explicit(&q->live_waits, 1, memory_order_relaxed);
    if (rc == 1) { /* due already: its callback runs in the next dispatch */
        pw->w.done_next = NULL;
        nq__wait_run_wakers(&pw->w);
    } else if (timeout_ms >= 0) {
        int64_t now = nq__now_ns();
        pw->deadline_ns = timeout_ms > (INT64_MAX - now) / 1000000 ? INT64_MAX
                                                                   : now + timeout_ms * 1000000;
        p->heap[p->heap_len++] = pw;
        nq__heap_up(p, p->heap_len - 1);
        atomic_store_explicit(&p->deadlines, p->heap_len, memory_order_relaxed);
        /* The next deadline moved earlier: tell the owner now, or at the
         * end of the running dispatch (never from inside a callback). */
        if (pw->heap_index == 0 && p->deadline_cb != NULL && !p->in_dispatch) {
            p->told_deadline = 1;
            p->deadline_cb(p, p->deadline_data);
        }
    }
    if (out != NULL)
        *out = &pw->w;
    return 0;
fail:
    nq__port_untoken(p, token);
    return rc;
}

/* Runs pw's callback once (it has completed), then drops the port's ref.
 * The waker that completed pw may still be inside nq__port_signal: wait for
 * it, so no waker touches the port on pw's behalf afterwards. */
static void nq__port_finish_wait(nq_port_t *p, nq__pwait_t *pw) {
    nq__wait_quiesce(&pw->w);
    pw->cb_done = 1;
    nq__heap_remove(p, pw);
    nq__port_untoken(p, pw->token);
    atomic_fetch_add_explicit(&p->callbacks, 1, memory_order_relaxed);
    int status = pw->w.status;
    pw->cb(pw->data, status, status == 0 ? pw->w.arg : 0);
    nq__wait_unref(&pw->w);
}

/* --- port subscriptions -------------------------------------------------- */

static void nq__psub_close(nq_sub_t *s);

int nq_port_subscribe(nq_port_t *p, nq_queue_t *q, nq_handle_t h, const nq_sub_opts_t *opts,
                      nq_sub_cb cb, void *data, nq_sub_t **out) {
    if (out != NULL)
        *out = NULL;
    if (p == NULL || q == NULL || cb == NULL)
        return NQ_EINVAL;
    if (p->free_deferred || nq__port_inherited(p))
        return NQ_ECLOSED;
    uint32_t token;
    if (nq__port_token(p, &token) < 0)
        return NQ_ELIMIT;
    nq_sub_t *s;
    int rc = nq__sub_alloc(q, opts, sizeof(nq__psub_t), &s);
    if (rc < 0) {
        nq__port_untoken(p, token);
        return rc;
    }
    nq__psub_t *ps = (nq__psub_t *)s;
    atomic_init(&ps->port, p);
    ps->user = s->waker;
    s->waker = (nq_waker_t){nq__psub_wake, ps};
    s->on_close = nq__psub_close;
    ps->cb = cb;
    ps->data = data;
    ps->token = token;
    ps->owned = out == NULL;
    p->items[token].kind = NQ__PI_SUB;
    p->items[token].obj = ps;
    rc = nq__sub_attach(s, h);
    if (rc < 0) {
        nq__sub_destroy(s);
        nq__port_untoken(p, token);
        return rc;
    }
    if (out != NULL)
        *out = s;
    return 0;
}

/* nq_sub_close on a port subscription (on the port's thread). */
static void nq__psub_close(nq_sub_t *s) {
    nq__psub_t *ps = (nq__psub_t *)s;
    nq_port_t *p = atomic_load_explicit(&ps->port, memory_order_relaxed);
    if (p != NULL && ps->in_cb) {
        ps->close_deferred = 1; /* freed when its callback returns */
        return;
    }
    nq__sub_shutdown(s);
    if (p != NULL) {
        atomic_store_explicit(&ps->port, NULL, memory_order_relaxed);
        nq__port_untoken(p, ps->token);
    }
    nq__sub_destroy(s);
}

/* Does s need its callback: args held, or closed and its owner not yet told
 * (like EOF on a level-triggered socket)? */
static int nq__psub_due(nq_sub_t *s) {
    return nq__sub_has_args(s) || nq__sub_closed_untold(s);
}

static int nq__port_spin_worth_it(nq_port_t *p);

/* Watches an empty subscription for up to NQ__PORT_SPINS pauses (when the
 * spins pay: nq__port_spin_worth_it): 1 if args came. */
static int nq__port_watch(nq_port_t *p, nq_sub_t *s) {
    if (!nq__port_spin_worth_it(p))
        return 0;
    int hit = 0;
    for (int i = 0; i < NQ__PORT_SPINS && !(hit = nq__sub_has_args(s)); i++)
        nq__cpu_relax();
    p->spin_misses = hit ? 0 : p->spin_misses + 1;
    atomic_fetch_add_explicit(&p->idle_spins, 1, memory_order_relaxed);
    if (hit)
        atomic_fetch_add_explicit(&p->idle_spin_hits, 1, memory_order_relaxed);
    return hit;
}

static int nq__port_run_sub(nq_port_t *p, nq__psub_t *ps) {
    nq_sub_t *s = &ps->s;
    if (!nq__psub_due(s))
        return 0; /* spurious, or closed, drained and already told */
    ps->in_cb = 1;
    atomic_fetch_add_explicit(&p->callbacks, 1, memory_order_relaxed);
    ps->cb(s, ps->data);
    ps->in_cb = 0;
    if (ps->close_deferred) {
        nq__psub_close(s);
        return 1;
    }
    /* Level-triggered: again in a later dispatch while it is due. Empty,
     * and nothing else to run: a producer in flow pushes again within a
     * few microseconds, so watch the ring for a moment before arming (an
     * arm is an exchange on the handle's word, and then a wake-up with a
     * token and maybe an eventfd write for the producer to make). Then
     * arm its wake-up (a callback that drained it exactly may not have),
     * and look again, since an arg may have come before the arm. */
    if (nq__psub_due(s) || (nq__evq_pending(p->ready) == 0 && nq__port_watch(p, s)) ||
        (!nq__sub_arm_if_empty(s) && nq__psub_due(s)))
        nq_evq_notify(p->ready, ps->token);
    return 1;
}

/* --- dispatch ------------------------------------------------------------ */

static int nq__port_run(nq_port_t *p, uint32_t token) {
    nq__pitem_t *it = &p->items[token];
    if (it->kind == NQ__PI_WAIT) {
        nq__pwait_t *pw = it->obj;
        /* Acquire pairs with the completer's store of DONE. */
        if (atomic_load_explicit(&pw->w.state, memory_order_acquire) == NQ__W_PENDING ||
            pw->cb_done)
            return 0; /* a stale token */
        nq__port_finish_wait(p, pw);
        return 1;
    }
    if (it->kind == NQ__PI_SUB)
        return nq__port_run_sub(p, it->obj);
    return 0;
}

/* Times out due waits, at most limit callbacks (0: every due one). What is
 * left stays due in the heap (nq_port_timeout_ms says 0), and the end of
 * the dispatch keeps the fd readable for it. */
static int nq__port_expire(nq_port_t *p, unsigned limit) {
    int ran = 0;
    int64_t now = nq__now_ns();
    /* A callback that detaches the port or frees it stops the expiry too:
     * the waits left stay in the heap for the next dispatch. */
    while (p->heap_len > 0 && p->heap[0]->deadline_ns <= now && !p->stop &&
           !p->free_deferred && (limit == 0 || (unsigned)ran < limit)) {
        nq__pwait_t *w = p->heap[0];
        nq__heap_remove(p, w);
        if (nq__wait_cancel_as(&w->w, NQ_ETIMEDOUT, 0) == 0) {
            atomic_fetch_add_explicit(&p->deadlines_expired, 1, memory_order_relaxed);
            nq__port_finish_wait(p, w); /* its token, if queued, is now stale */
            ran++;
        }
        /* else: a notification won; its token brings the callback. */
    }
    return ran;
}

static void nq__port_destroy(nq_port_t *p);

/* A deadline is due now: the expiry left it (its budget ran out) or a
 * callback made it. One clock read, and only while waits have deadlines. */
static int nq__port_due(const nq_port_t *p) {
    return p->heap_len > 0 && p->heap[0]->deadline_ns <= nq__now_ns();
}

/* Polls and runs up to limit tokens; returns how many it took. Stops early
 * when the port is freed or detached inside a callback (the untaken ones of
 * the batch go back into the evq for the next owner). */
static uint64_t nq__port_run_batch(nq_port_t *p, uint64_t limit, int *ran) {
    uint64_t taken = 0;
    uint32_t toks[64];
    while (limit > 0 && !p->free_deferred) {
        size_t n = nq_evq_poll(p->ready, toks, limit < 64 ? (size_t)limit : 64);
        if (n == 0)
            break;
        limit -= n;
        taken += n;
        for (size_t i = 0; i < n && !p->free_deferred; i++) {
            if (p->stop)
                nq_evq_notify(p->ready, toks[i]); /* put back, for the next owner */
            else
                *ran += nq__port_run(p, toks[i]);
        }
        if (p->stop)
            break;
    }
    return taken;
}

/* Adaptive: a spin that keeps catching nothing (the producers are idle, or
 * they share our CPU and cannot run while we spin: a ping-pong on one CPU)
 * only costs latency. After 4 misses in a row, spin once per 64 dispatches
 * to notice when it pays again. */
static int nq__port_spin_worth_it(nq_port_t *p) {
    if (p->spin_misses < 4)
        return 1;
    return (++p->spin_skipped & 63) == 0;
}

/* Empties the eventfd (non-blocking: EAGAIN when it was not readable),
 * leaving the caller's errno as it was; efd_reads counts the reads that
 * found it readable. */
static void nq__port_read_efd(nq_port_t *p) {
    uint64_t v;
    int saved = errno;
    if (nq__ops.read(p->efd, &v, sizeof(v)) == (ssize_t)sizeof(v))
        atomic_fetch_add_explicit(&p->efd_reads, 1, memory_order_relaxed);
    errno = saved;
}

int nq_port_dispatch(nq_port_t *p, unsigned budget) {
    if (p == NULL)
        return NQ_EINVAL;
    if (budget == NQ_PORT_BUDGET)
        budget = p->budget;
    if (nq__port_inherited(p))
        return NQ_ECLOSED; /* never read the parent's eventfd (see fork()) */
    if (p->in_dispatch) {
        /* From inside one of its own callbacks: a nested loop saw the fd
         * readable (it stays so while the outer dispatch runs). Clear it, or
         * a level-triggered nested loop spins; the outer dispatch no longer
         * trusts signalled (I1) and re-signals at its end if work is left. */
        nq__port_read_efd(p);
        p->efd_cleared = 1;
        return NQ_EBUSY;
    }
    p->in_dispatch = 1;
    atomic_fetch_add_explicit(&p->dispatches, 1, memory_order_relaxed);

    /* Budget 0: what is queued now. The eventfd is not read here: see the
     * end, and the top comment. */
    uint64_t limit = nq__evq_pending(p->ready);

    /* Due timeouts first, within the budget: a flood of ready items cannot
     * make them late, and a mass expiry is cut into budget-sized dispatches
     * like any other work (the rest stay due and keep the fd readable, see
     * the end, so the loop comes back at once). Which of a notification
     * and a timeout wins a wait is decided by the wait's state, not by this
     * order. */
    int ran = nq__port_expire(p, budget);
    uint64_t room = budget == 0 ? UINT64_MAX : (uint64_t)budget - (uint64_t)ran;
    if (room < limit)
        limit = room;

    uint64_t taken = 0;
    if (!p->free_deferred && !p->stop)
        taken = nq__port_run_batch(p, limit, &ran);
    /* Nothing left, and the budget not spent: before going idle (an eventfd
     * read here, a write by the next waker, a sleep and a wake-up for the
     * loop), watch the evq for a moment; a producer in full flow notifies
     * again within it. One round at most per dispatch, within the budget,
     * so a flood cannot keep a dispatch from returning. */
    int64_t spin_start = 0;
    for (unsigned round = 0; !p->free_deferred && !p->stop && taken < room &&
                             nq__evq_pending(p->ready) == 0 && nq__port_spin_worth_it(p);
         round++) {
        for (int i = 0; i < NQ__PORT_SPINS && nq__evq_pending(p->ready) == 0; i++)
            nq__cpu_relax();
        uint64_t more = nq__evq_pending(p->ready);
        p->spin_misses = more > 0 ? 0 : p->spin_misses + 1;
        atomic_fetch_add_explicit(&p->idle_spins, 1, memory_order_relaxed);
        if (more == 0)
            break;
        atomic_fetch_add_explicit(&p->idle_spin_hits, 1, memory_order_relaxed);
        if (more > room - taken)
            more = room - taken;
        taken += nq__port_run_batch(p, more, &ran);
        /* A producer in flow: watch again, while the budget lasts, for at
         * most NQ__PORT_SPIN_ROUNDS rounds and NQ__PORT_SPIN_NS in all, so
         * the loop's other watchers wait a bounded time. */
        if (round == 0)
            spin_start = nq__now_ns();
        else if (round + 1 >= NQ__PORT_SPIN_ROUNDS ||
                 ((round & 7) == 7 && nq__now_ns() - spin_start > NQ__PORT_SPIN_NS))
            break;
    }
    p->stop = 0;

    p->in_dispatch = 0;
    if (p->free_deferred) {
        nq__port_destroy(p);
        return ran;
    }
    nq__port_tell_deadline(p);
    /* Work left that we can run (a budget, re-armed subscriptions, a due
     * timeout the budget cut off or a callback made due): the fd must stay
     * readable so the loop comes back, in its next iteration, through its
     * I/O watcher (a 0 ms timer re-armed inside its own callback would
     * run again at once in some loops: libuv before 1.45). It is, while
     * signalled is 1 (I1 at the top), so sustained load costs no syscall
     * at all. */
    if (nq__evq_head_ready(p->ready) || nq__port_due(p)) {
        if (p->efd_cleared) { /* a nested call read the fd: reopen (P) */
            p->efd_cleared = 0;
            atomic_store_explicit(&p->signalled, 0, memory_order_seq_cst);
        }
        if (atomic_load_explicit(&p->signalled, memory_order_seq_cst) == 0 &&
            atomic_exchange_explicit(&p->signalled, 1, memory_order_seq_cst) == 0)
            nq__port_write_efd(p); /* a loop-thread re-notify after a quiet spell */
        return ran;
    }
    p->efd_cleared = 0; /* the read below supersedes it */
    /* Going idle (or a stalled head): clear the eventfd, then reopen the
     * signalling window (P) and look again (L). Non-blocking: an empty
     * read (a dispatch the loop's timer made) costs EAGAIN, nothing else. */
    nq__port_read_efd(p);
    atomic_store_explicit(&p->signalled, 0, memory_order_seq_cst); /* P */
    if (nq__evq_pending(p->ready) > 0) {                            /* L */
        if (!nq__evq_head_ready(p->ready))                          /* L1 */
            return ran; /* a stalled head: its waker's R comes after P */
        if (atomic_exchange_explicit(&p->signalled, 1, memory_order_seq_cst) == 0)
            nq__port_write_efd(p); /* queued while we cleared */
    }
    return ran;
}

/* --- free ---------------------------------------------------------------- */

static void nq__port_destroy(nq_port_t *p) {
    /* Callbacks run below: they may not start port waits or dispatch. */
    p->free_deferred = 1;
    p->in_dispatch = 1;
    /* Waits first: pending ones complete with NQ_ECANCELED, and every wait
     * whose callback has not run gets it now, exactly once. */
    for (uint32_t t = 0; t < p->max_items; t++) {
        if (p->items[t].kind != NQ__PI_WAIT)
            continue;
        nq__pwait_t *w = p->items[t].obj;
        nq__wait_cancel_as(&w->w, NQ_ECANCELED, 0);
        nq__port_finish_wait(p, w);
    }
    for (uint32_t t = 0; t < p->max_items; t++) {
        if (p->items[t].kind != NQ__PI_SUB)
            continue;
        nq__psub_t *ps = p->items[t].obj;
        nq_sub_t *s = &ps->s;
        /* Unhook the port, then wait for wakers that may still be
         * signalling it (nq__psub_wake). */
        atomic_store_explicit(&ps->port, NULL, memory_order_relaxed);
        nq__port_untoken(p, t);
        if (ps->owned) {
            nq__sub_shutdown(s);
            nq__sub_destroy(s);
        } else {
            nq__sub_quiesce(s); /* the user still holds it: nq_sub_close it later */
        }
    }
    nq_evq_free(p->ready);
    if (p->efd >= 0)
        nq__ops.close(p->efd);
    nq__free(p->items);
    nq__free(p->free_tokens);
    nq__free(p->heap);
    nq__free(p);
}

void nq_port_free(nq_port_t *p) {
    if (p == NULL)
        return;
    if (p->in_dispatch) {
        p->free_deferred = 1; /* freed when the dispatch returns */
        return;
    }
    nq__port_destroy(p);
}

int nq_port_stats(const nq_port_t *cp, nq_port_stats_t *out) {
    if (cp == NULL || out == NULL)
        return NQ_EINVAL;
    nq_port_t *p = (nq_port_t *)cp;
    memset(out, 0, sizeof(*out));
    out->dispatches = atomic_load_explicit(&p->dispatches, memory_order_relaxed);
    out->callbacks = atomic_load_explicit(&p->callbacks, memory_order_relaxed);
    out->efd_writes = atomic_load_explicit(&p->efd_writes, memory_order_relaxed);
    out->efd_reads = atomic_load_explicit(&p->efd_reads, memory_order_relaxed);
    out->deadlines_expired = atomic_load_explicit(&p->deadlines_expired, memory_order_relaxed);
    out->idle_spins = atomic_load_explicit(&p->idle_spins, memory_order_relaxed);
    out->idle_spin_hits = atomic_load_explicit(&p->idle_spin_hits, memory_order_relaxed);
    out->live_items = atomic_load_explicit(&p->live_items, memory_order_relaxed);
    out->max_items = p->max_items;
    out->deadlines = atomic_load_explicit(&p->deadlines, memory_order_relaxed);
    return 0;
}
