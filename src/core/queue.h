/* This file is private to libnq: the structures shared by the notification
 * queue (queue.c), waits (wait.c), subscriptions (sub.c) and ports (port.c).
 *
 * Locks, outermost first: q->lock (the chunk directory and the free list), a handle
 * slot's lock, a subscription's lock. No lock is held while a waker or a
 * user callback runs. A handle slot is never freed before the queue, so a
 * wait or subscription may always lock the slot it was created on; the
 * generation kept under that lock says whether the handle is still the same.
 */
#ifndef NQ_CORE_QUEUE_H
#define NQ_CORE_QUEUE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <pthread.h>

#include "nq.h"
#include "core/internal.h"
#include "core/lock.h"
#include "core/park.h"

#define NQ__HINT_MAX 64            /* debug hints are cut to 63 bytes */
#define NQ__MAX_HANDLES (1u << 24) /* largest max_handles */
#define NQ__MAX_SUBS 1024u         /* largest max_subscribers_per_handle */
#define NQ__MAX_WAITERS (1u << 20) /* largest max_waiters_per_handle */
#define NQ__MAX_CAPACITY (1u << 28)

/* One handle's state: 56 bytes in two parts, so an idle handle costs 56
 * bytes plus its share of the chunk directory (8 / NQ__CHUNK_SLOTS). The
 * hot part (32 bytes: the lock, gen, live, seq, last_arg and the counts the
 * fast path tests) is all a notify without receivers touches, and all it
 * writes with subscribers; the cold part (waiters, subs, hint) is read when
 * there is someone to deliver to. A chunk of n slots holds the n hot parts
 * (32-byte aligned: one never straddles two cache lines, two neighbours
 * share one), then the n cold parts. */
typedef struct nq__hslot {
    nq__lock_t lock;
    uint32_t gen;          /* under lock: generation of the live handle */
    _Atomic uint64_t seq;  /* notifications so far; written under lock */
    union {
        int64_t last_arg;   /* under lock, while live */
        uint32_t next_free; /* under q->lock, while free: free list link (index + 1) */
    };
    /* Bit-fields, all under lock (retired: and q->lock). */
    uint32_t nwaiters : 21; /* <= NQ__MAX_WAITERS; 0 exactly when waiters is NULL */
    uint32_t nsubs : 11;    /* <= NQ__MAX_SUBS */
    uint32_t subs_cap : 11; /* entries allocated in subs */
    uint32_t live : 1;
    uint32_t retired : 1;  /* generation exhausted: never reused */
} nq__hslot_t;

typedef struct nq__hcold { /* all under the hot part's lock */
    struct nq_wait *waiters; /* doubly linked, newest first (attach pushes at the head) */
    struct nq_sub **subs;  /* array of nsubs */
    char *hint;
} nq__hcold_t;

/* Slots come in chunks of NQ__CHUNK_SLOTS (the last one of a queue holds
 * what is left of max_handles), allocated and charged when the first slot
 * of a chunk is first needed. A chunk is never freed before the queue. */
#define NQ__CHUNK_SHIFT 6
#define NQ__CHUNK_SLOTS (1u << NQ__CHUNK_SHIFT)
_Static_assert(sizeof(nq__hslot_t) == 32 && sizeof(nq__hcold_t) == 24,
               "a handle slot is 32 + 24 bytes");
_Static_assert(NQ__MAX_WAITERS < (1u << 21) && NQ__MAX_SUBS < (1u << 11),
               "the slot's counts fit their bit-fields");

struct nq_queue {
    nq_config_t cfg;
    uint32_t gen_mask;     /* generations wrap within this mask (tests narrow it) */
    /* The chunk directory: chunk c holds slots c * NQ__CHUNK_SLOTS onwards.
     * An entry is published (release) once its chunk's slots are
     * initialised and read with acquire (nq__slot_at). */
    _Atomic(nq__hslot_t *) *chunks;
    pthread_mutex_t lock;  /* chunk allocation, free list, counters below */
    uint32_t used;         /* slots ever created */
    uint32_t free_head;    /* free list (index + 1), 0 = empty */
    uint32_t live;         /* live handles */
    uint32_t retired;      /* slots whose generation ran out */
    _Atomic size_t bytes;  /* bytes held, against cfg.memory_limit */
    _Atomic uint32_t refs; /* 1 for the owner + 1 per open wait/subscription */
    _Atomic int closing;

    /* Counters. Per-handle figures (notifies, deliveries) live in the slots
     * and are summed by nq_queue_stats; these take the rarer events. */
    _Atomic uint64_t notifies_gone;   /* seq of unregistered handles */
    _Atomic uint64_t stored_gone;     /* args stored by closed subscriptions */
    _Atomic uint64_t waits_closed;
    _Atomic uint64_t drops_gone;      /* drops of closed subscriptions */
    _Atomic uint64_t waits_completed;
    _Atomic uint64_t waits_timed_out;
    _Atomic uint64_t waits_cancelled;
    _Atomic uint32_t live_waits;
    _Atomic uint32_t live_subs;
};

enum { NQ__W_PENDING = 0, NQ__W_DONE = 1 };
enum { NQ__WK_USER, NQ__WK_THREAD, NQ__WK_PORT };

struct nq_wait {
    nq_queue_t *q;
    uint32_t index;    /* slot index */
    uint32_t gen;      /* the handle's generation when the wait started */
    uint8_t kind;      /* NQ__WK_* */
    uint8_t listed;    /* under the slot lock: on the slot's waiter list */
    _Atomic int state; /* NQ__W_*; DONE is stored with its status and arg */
    int status;        /* 0, NQ_ECLOSED, NQ_ECANCELED, NQ_ETIMEDOUT */
    uint64_t after;    /* completes with the first notification numbered > after */
    int64_t arg;
    nq_waker_t waker;
    struct nq_wait *prev, *next; /* slot list, under the slot lock */
    struct nq_wait *done_next;   /* the completing thread's private list */
    _Atomic uint32_t inflight;   /* waker calls running */
    _Atomic uint32_t refs;       /* port waits: the port's and the user's */
    nq__park_t park;             /* NQ__WK_THREAD */
    /* NQ__WK_PORT */
    struct nq_port *port;
    uint32_t token;
    uint32_t heap_index;         /* in the port's deadline heap, or UINT32_MAX */
    int64_t deadline_ns;         /* absolute CLOCK_MONOTONIC, if heap_index is set */
    nq_wait_cb cb;
    void *data;
    uint8_t cb_done;             /* port thread only */
};

/* What a port subscription adds (port.c): allocated with its struct nq_sub,
 * right after it (nq__sub_px); plain subscriptions have none. */
typedef struct nq__sub_px {
    _Atomic(struct nq_port *) port; /* read by wakers; the rest: port thread */
    nq_sub_cb cb;
    void *data;
    uint32_t token;
    uint8_t owned;               /* the port closes it (the caller kept no pointer) */
    uint8_t in_cb, close_deferred;
} nq__sub_px_t;

/* 104 bytes, + 32 (nq__sub_px_t) in the same allocation for a port
 * subscription. The ring is an allocation of its own: capacities are mostly
 * powers of two, which allocators serve exactly, and the ring with the
 * header would not be (jemalloc serves 104 + 8192 bytes from its 10240 class). */
struct nq_sub {
    nq_queue_t *q;
    uint32_t index, gen;
    nq__lock_t lock;
    uint32_t capacity;
    uint32_t head, count;        /* under lock; ring[head] is the oldest */
    _Atomic uint32_t ready;      /* bit 0: non-empty, bit 1: closed (for sleepers) */
    _Atomic uint32_t receiving;  /* a thread is blocked in nq_sub_recv */
    _Atomic uint32_t inflight;
    nq__park_t park;
    _Atomic uint64_t dropped;    /* written under lock; read lock-free */
    _Atomic uint64_t stored;     /* args stored (receivers reached); likewise */
    nq_waker_t waker;
    char *hint;
    int64_t *ring;               /* capacity args */
    uint8_t closed;              /* under lock: the handle is gone */
    uint8_t attached;            /* under the slot lock: in the slot's array */
    uint8_t overflow;            /* nq_overflow_t */
    uint8_t told_closed;         /* under lock: a receive returned NQ_ECLOSED */
    uint8_t port_sub;            /* set at creation: an nq__sub_px_t follows */
};
_Static_assert(sizeof(struct nq_sub) == 104, "a subscription's header is 104 bytes");

/* The port part of s, or NULL for a plain subscription. */
static inline nq__sub_px_t *nq__sub_px(struct nq_sub *s) {
    return s->port_sub ? (nq__sub_px_t *)(s + 1) : NULL;
}

/* queue.c */
nq__hslot_t *nq__slot_lock(nq_queue_t *q, nq_handle_t h, int *err);
nq__hslot_t *nq__slot_at(nq_queue_t *q, uint32_t index);
/* The cold part of a slot whose chunk is allocated (its hot part found). */
nq__hcold_t *nq__slot_cold(nq_queue_t *q, uint32_t index);
int nq__mem_reserve(nq_queue_t *q, size_t n);
void nq__mem_release(nq_queue_t *q, size_t n);
void nq__queue_unref(nq_queue_t *q);
char *nq__hint_dup(nq_queue_t *q, const char *hint, size_t *charged);
void nq__hint_free(nq_queue_t *q, char *hint);

/* wait.c */
int nq__wait_attach(nq_queue_t *q, nq_handle_t h, uint64_t after, nq_wait_t *w);
void nq__wait_complete_locked(nq_wait_t *w, int status, int64_t arg, nq_wait_t **done);
void nq__wait_run_wakers(nq_wait_t *done);
int nq__wait_cancel_status(nq_wait_t *w, int status);
/* The same, by the port that runs w's callback itself right after: no waker. */
int nq__wait_cancel_by_port(nq_wait_t *w, int status);
void nq__wait_quiesce(nq_wait_t *w);
void nq__wait_unref(nq_wait_t *w);

/* sub.c */
typedef struct nq__sub_port { /* a port subscription's nq__sub_px_t, to copy */
    struct nq_port *port;
    uint32_t token;
    nq_sub_cb cb;
    void *data;
    uint8_t owned; /* the port closes it (the caller kept no pointer) */
} nq__sub_port_t;
int nq__sub_new(nq_queue_t *q, nq_handle_t h, const nq_sub_opts_t *opts,
                const nq__sub_port_t *pp, nq_sub_t **out);
int nq__sub_push_locked(nq_sub_t *s, int64_t arg, nq_sub_t **wake);
void nq__sub_close_locked(nq_sub_t *s, nq_sub_t **wake);
void nq__sub_run_waker(nq_sub_t *s);
void nq__sub_quiesce(nq_sub_t *s);
void nq__sub_detach(nq_sub_t *s);
void nq__sub_destroy(nq_sub_t *s);

/* port.c */
void nq__port_sub_wake(nq_sub_t *s);
void nq__port_sub_close(nq_sub_t *s);
/* Test hooks: the port's evq, and the signal step a waker makes after its
 * token is in that evq (with nq__evq_claim/publish_for_test they play a
 * waker stalled between its claim and its store). */
nq_evq_t *nq__port_evq(struct nq_port *p);
void nq__port_kick(struct nq_port *p);

/* Test hook (queue.c): generations wrap within `bits` bits. */
int nq__queue_set_gen_bits(nq_queue_t *q, unsigned bits);

#endif
