/* libFuzzer target: bytes -> a sequence of libnq API calls on one thread,
 * each checked against a small reference model written in plain C.
 *
 * The model predicts every return code, every arg a subscription delivers
 * (FIFO, both overflow policies), every drop, every waker call, every port
 * callback (which one, in which order, with which status and arg), the
 * handle values register hands out (generations, retired slots) and the
 * queue's and port's counters. Any difference calls abort(): this is a test
 * program, not library code. Everything is freed at the end of each input,
 * so LeakSanitizer sees any leak.
 *
 * Input format (tests/fuzz/README.md has it with examples): a header of 7
 * bytes (queue limits, generation bits, port size, the order of the final
 * cleanup), then operations, each one byte followed by its operands. Digits
 * '0'..'9' read as 0..9 wherever a byte is read, whitespace between
 * operations is skipped and the letters below name operations, so a seed can
 * be written by hand:
 *   r register     u unregister   n notify        q seq
 *   w wait_start   W wait (timeout 0)             g wait_result
 *   c wait_cancel  x wait_release
 *   s subscribe    t sub_try_recv v sub_recv (timeout 0)
 *   b sub_recv_batch              d sub_dropped   k sub_close
 *   p port_wait    P port_subscribe               D port_dispatch
 *   F port_free    N port_new     e a bad argument
 *   S queue_dump   a arm an allocation failure for the next operation
 * Any other byte is an operation too (byte % number of operations).
 * Port callbacks take a mode when they are created; in one mode they read
 * one more operation from the input and run it inside the callback.
 *
 * NQ_FUZZ_TRACE=1 in the environment prints each operation to stderr.
 */
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nq.h"

/* Test hooks of the core (the target is linked with the library's objects). */
int nq__queue_set_gen_bits(nq_queue_t *q, unsigned bits);
long nq__alloc_fail_at(long k, int sticky);

#define MAXW 40     /* wait records per input */
#define MAXS 40     /* subscription records per input */
#define MAXK 32     /* handle values remembered */
#define MAXSLOT 4   /* max_handles is 1..4 */
#define MAXTOK 8    /* port items are 1..8 */
#define MAXCAP 8    /* the queue's max_capacity */
#define BIG_TIMEOUT_MS 3600000

enum { WK_USER, WK_PORT };
enum { IT_NONE, IT_WAIT, IT_SUB };

typedef struct fwait {
    int kind;
    nq_wait_t *w;   /* the caller's pointer, while held */
    int held;       /* the caller holds it and must release it */
    int port_ref;   /* a port wait whose callback has not run */
    int listed;     /* pending on its handle */
    int done, status;
    int64_t arg;
    int slot;
    uint64_t after;
    unsigned wakes, exp_wakes; /* waker calls seen / predicted */
    int token, in_heap, timeout0, cb_mode, cb_ran;
    /* A due wait a notification completed, left in the deadline heap or not
     * by a dispatch whose expiry stopped at its budget (the heap's order
     * among equal deadlines decides): check_all settles it from
     * nq_port_stats once the count allows. */
    int maybe_heap;
    /* Timeout 0, started in a ready callback of the dispatch running now:
     * after that dispatch's expiry, so it stays in the heap, due, and its
     * deadline must keep the fd readable when the dispatch ends. */
    int fresh;
} fwait_t;

typedef struct fsub {
    nq_sub_t *s;
    int held;       /* the caller's pointer may be used */
    int live;       /* not destroyed */
    int port_sub, port_owned, has_port, token, in_cb, close_deferred;
    int slot, attached, closed, told_closed;
    uint32_t cap;
    int oldest, has_waker, cb_mode;
    int64_t ring[MAXCAP];
    uint32_t head, len;
    uint64_t sent, dropped, received;
    unsigned wakes, exp_wakes;
} fsub_t;

typedef struct mslot {
    int live, retired;
    uint32_t gen;
    uint64_t seq;
    int64_t last_arg;
    int nsubs;
    int subs[MAXSLOT + 1]; /* record indices, in the library's array order */
} mslot_t;

static struct {
    const uint8_t *in;
    size_t len, pos;
    int trace;
    long opno;

    nq_queue_t *q;
    nq_port_t *p;
    int qfreed;
    nq_config_t cfg;
    uint32_t mask;
    unsigned cleanup;

    mslot_t slot[MAXSLOT];
    int used, live, retired;
    int free_stack[MAXSLOT]; /* FIFO: [0] is reused first */
    int nfree;
    uint32_t lo_base, wtag; /* the queue's handle layout, from its first handle */
    nq_handle_t known[MAXK];
    int nknown;
    int64_t argctr;

    fwait_t w[MAXW];
    int nw;
    fsub_t s[MAXS];
    int ns;

    /* the port */
    int port_items;
    int tok_free[MAXTOK];
    int ntok_free;
    struct {
        int kind, rec;
    } item[MAXTOK];
    int fifo[MAXTOK];
    int fhead, flen;
    int pend[MAXTOK];

    /* a dispatch (or port free) in progress */
    int in_dispatch, in_free, in_cb;
    int batch[MAXTOK];
    int nbatch, cursor, post_sub, ran;
    /* Dispatch: due timeouts first (expired, at most budget), then a batch of
     * min(ready at the start, budget - expired), taken at the first ready
     * callback or at the end. */
    int flen_start, expired, batch_taken;
    unsigned budget;
    int free_list[MAXTOK];
    int nfree_list, free_cursor;

    /* counters, as nq_queue_stats reports them */
    uint64_t notifies, stored, dropped, w_completed, w_closed, w_timed, w_cancelled;

    int alloc_armed; /* an allocation failure is armed for this operation */
} M;

/* --- checks ----------------------------------------------------------------- */

static void fail(const char *file, int line, const char *what) {
    fprintf(stderr, "fuzz_api: %s:%d: check failed: %s (operation %ld, input byte %zu)\n",
            file, line, what, M.opno, M.pos);
    abort();
}
#define CHECK(c)                                                                               \
    do {                                                                                       \
        if (!(c))                                                                              \
            fail(__FILE__, __LINE__, #c);                                                      \
    } while (0)
#define EXPECT_RC(got, want)                                                                   \
    do {                                                                                       \
        int g_ = (got), w_ = (want);                                                           \
        if (g_ != w_) {                                                                        \
            fprintf(stderr, "fuzz_api: returned %d (%s), model expects %d (%s)\n", g_,         \
                    nq_err_name(g_), w_, nq_err_name(w_));                                     \
            fail(__FILE__, __LINE__, #got " == " #want);                                       \
        }                                                                                      \
    } while (0)
#define TR(...)                                                                                \
    do {                                                                                       \
        if (M.trace)                                                                           \
            fprintf(stderr, __VA_ARGS__);                                                      \
    } while (0)

/* --- input ------------------------------------------------------------------- */

static int more(void) {
    return M.pos < M.len;
}

/* One byte as a number below k (k == 0: the byte itself); digits are 0..9. */
static unsigned rd(unsigned k) {
    if (M.pos >= M.len)
        return 0;
    unsigned b = M.in[M.pos++];
    if (b >= '0' && b <= '9')
        b -= '0';
    return k ? b % k : b;
}

/* --- the model's pieces --------------------------------------------------------- */

static int h_slot(nq_handle_t h) {
    uint32_t idx = (uint32_t)h - M.lo_base, id = (uint32_t)(h >> 32);
    if (M.lo_base == 0 || idx >= M.cfg.max_handles || (int)idx >= M.used)
        return -1;
    mslot_t *s = &M.slot[idx];
    if (!s->live || id != ((s->gen << 4) | M.wtag))
        return -1;
    return (int)idx;
}

static int nwaiters(int slot) {
    int n = 0;
    for (int i = 0; i < M.nw; i++)
        n += M.w[i].listed && M.w[i].slot == slot;
    return n;
}

/* The port's ready queue: FIFO, each token pending at most once. */
static void m_signal(int tok) {
    CHECK(tok >= 0 && tok < M.port_items);
    if (M.pend[tok])
        return;
    M.pend[tok] = 1;
    M.fifo[(M.fhead + M.flen++) % MAXTOK] = tok;
}

static int m_tok_get(void) {
    return M.ntok_free == 0 ? -1 : M.tok_free[--M.ntok_free];
}

static void m_tok_put(int t) {
    M.item[t].kind = IT_NONE;
    M.item[t].rec = -1;
    M.tok_free[M.ntok_free++] = t;
}

static void m_wait_complete(int i, int status, int64_t arg) {
    fwait_t *f = &M.w[i];
    CHECK(f->listed && !f->done);
    f->listed = 0;
    f->done = 1;
    f->status = status;
    f->arg = arg;
    if (status == 0)
        M.w_completed++;
    else if (status == NQ_ECLOSED)
        M.w_closed++;
    else if (status == NQ_ETIMEDOUT)
        M.w_timed++;
    else
        M.w_cancelled++;
}

/* The waker a completion owes: the caller's counter, or the port's signal. */
static void m_wait_wake(int i) {
    fwait_t *f = &M.w[i];
    if (f->kind == WK_USER)
        f->exp_wakes++;
    else
        m_signal(f->token);
}

static void m_sub_wake(int k) {
    fsub_t *f = &M.s[k];
    if (f->port_sub && f->has_port)
        m_signal(f->token);
    if (f->has_waker)
        f->exp_wakes++;
}

/* A push; returns 1 if arg was stored. *wake set when a waker is owed. */
static int m_push(int k, int64_t arg, int *wake) {
    fsub_t *f = &M.s[k];
    uint32_t was = f->len;
    int stored = 1;
    f->sent++;
    if (was < f->cap) {
        f->ring[(f->head + was) % f->cap] = arg;
        f->len++;
    } else if (!f->oldest) {
        stored = 0;
    } else {
        f->ring[f->head] = arg;
        f->head = (f->head + 1) % f->cap;
    }
    if (stored)
        M.stored++;
    if (!stored || was == f->cap) {
        f->dropped++;
        M.dropped++;
    }
    *wake = was == 0;
    return stored;
}

static void m_slot_remove_sub(int k) {
    fsub_t *f = &M.s[k];
    mslot_t *sl = &M.slot[f->slot];
    for (int j = 0; j < sl->nsubs; j++) {
        if (sl->subs[j] == k) {
            sl->subs[j] = sl->subs[--sl->nsubs];
            break;
        }
    }
    f->attached = 0;
    f->closed = 1;
}

/* nq_sub_close on a subscription (or the port closing one it owns). */
static void m_sub_close(int k) {
    fsub_t *f = &M.s[k];
    CHECK(f->live);
    if (f->port_sub && f->has_port && f->in_cb) {
        f->close_deferred = 1;
        f->held = 0;
        return;
    }
    if (f->attached)
        m_slot_remove_sub(k);
    if (f->port_sub && f->has_port) {
        f->has_port = 0;
        m_tok_put(f->token);
    }
    f->live = 0;
    f->held = 0;
}

static void m_unregister(int idx) {
    mslot_t *sl = &M.slot[idx];
    sl->live = 0;
    M.live--;
    int done[MAXW], nd = 0;
    for (int i = 0; i < M.nw; i++) {
        if (M.w[i].listed && M.w[i].slot == idx) {
            m_wait_complete(i, NQ_ECLOSED, 0);
            done[nd++] = i;
        }
    }
    for (int i = 0; i < nd; i++)
        m_wait_wake(done[i]);
    for (int j = 0; j < sl->nsubs; j++) {
        fsub_t *f = &M.s[sl->subs[j]];
        f->closed = 1;
        f->attached = 0;
    }
    int n = sl->nsubs;
    sl->nsubs = 0;
    for (int j = 0; j < n; j++)
        m_sub_wake(sl->subs[j]);
    if (((sl->gen + 1) & M.mask) == 0 || sl->gen == M.mask) {
        sl->retired = 1;
        M.retired++;
    } else {
        M.free_stack[M.nfree++] = idx;
    }
}

static int64_t next_arg(void) {
    unsigned b = rd(0);
    int64_t a = ++M.argctr * 1000 + (int64_t)(b % 1000);
    return (b & 1) ? -a : a;
}

/* A handle value to pass: known ones, stale ones and garbage. */
static nq_handle_t pick_handle(void) {
    unsigned c = rd(16);
    nq_handle_t last = M.nknown ? M.known[(M.nknown - 1) % MAXK] : 0;
    int n = M.nknown < MAXK ? M.nknown : MAXK;
    switch (c) {
    case 8:
        return 0;
    case 9:
        return ((uint64_t)1 << 32) | (M.cfg.max_handles + 1u);
    case 10:
        return last + ((uint64_t)16 << 32); /* the next generation */
    case 11:
        return last & ~(uint64_t)UINT32_MAX; /* slot index 0 */
    case 12:
    case 13:
    case 14:
    case 15:
        c -= 12;
        return (int)c < n ? M.known[(M.nknown - 1 - (int)c) % MAXK] : last;
    default:
        return n ? M.known[c % n] : 0;
    }
}

static uint64_t pick_after(int slot) {
    uint64_t seq = slot >= 0 ? M.slot[slot].seq : 0;
    switch (rd(6)) {
    case 0:
        return NQ_SEQ_NEXT;
    case 1:
        return seq;
    case 2:
        return seq ? seq - 1 : 0;
    case 3:
        return 0;
    case 4:
        return seq + 1;
    default:
        return UINT64_MAX - 1;
    }
}

/* A record the caller holds, or -1. */
static int pick_wait(void) {
    unsigned c = rd(0);
    int n = 0;
    for (int i = 0; i < M.nw; i++)
        n += M.w[i].held;
    if (n == 0)
        return -1;
    int want = (int)(c % (unsigned)n);
    for (int i = 0; i < M.nw; i++)
        if (M.w[i].held && want-- == 0)
            return i;
    return -1;
}

static int pick_sub(void) {
    unsigned c = rd(0);
    int n = 0;
    for (int i = 0; i < M.ns; i++)
        n += M.s[i].held;
    if (n == 0)
        return -1;
    int want = (int)(c % (unsigned)n);
    for (int i = 0; i < M.ns; i++)
        if (M.s[i].held && want-- == 0)
            return i;
    return -1;
}

/* --- wakers ------------------------------------------------------------------------ */

static void wait_waker(void *ctx) {
    ((fwait_t *)ctx)->wakes++;
}

static void sub_waker(void *ctx) {
    ((fsub_t *)ctx)->wakes++;
}

/* --- operations --------------------------------------------------------------------- */

static void run_op(void);

static void op_register(void) {
    static const char long_hint[] = "a debug hint longer than sixty-three bytes, which is "
                                    "cut to sixty-three bytes by nq_register";
    unsigned hk = rd(4);
    const char *hint = hk == 0 ? NULL : hk == 1 ? "" : hk == 2 ? "fuzz" : long_hint;
    int want = 0, idx = -1;
    if (M.live >= (int)M.cfg.max_handles)
        want = NQ_ELIMIT;
    else if (M.nfree > 0)
        idx = M.free_stack[0]; /* FIFO: the slot freed longest ago */
    else if (M.used < (int)M.cfg.max_handles)
        idx = M.used;
    else
        want = NQ_ELIMIT;
    nq_handle_t h = 12345;
    int rc = nq_register(M.q, hint, &h);
    TR("register(hint %u) = %d %#" PRIx64 "\n", hk, rc, h);
    if (M.alloc_armed && rc == NQ_ENOMEM) {
        CHECK(h == 0);
        return;
    }
    EXPECT_RC(rc, want);
    if (rc < 0) {
        CHECK(h == 0);
        return;
    }
    if (idx == M.used) {
        M.used++;
    } else {
        memmove(M.free_stack, M.free_stack + 1, (size_t)(M.nfree - 1) * sizeof(int));
        M.nfree--;
    }
    mslot_t *sl = &M.slot[idx];
    sl->gen = (sl->gen + 1) & M.mask;
    if (sl->gen == 0)
        sl->gen = 1;
    sl->live = 1;
    sl->seq = 0;
    sl->last_arg = 0;
    sl->nsubs = 0;
    M.live++;
    /* The layout of core/handle.h: the high half is the slot word's id
     * (generation << 4, the queue's 4 tag bits, LIVE), the low half the
     * queue's base + the slot index. The queue's tag is learnt from the
     * first handle and must stay the same. */
    if (M.lo_base == 0) {
        M.lo_base = (uint32_t)h - (uint32_t)idx;
        M.wtag = (uint32_t)(h >> 32) & 0xf000000fu;
    }
    CHECK(h == (((uint64_t)((sl->gen << 4) | M.wtag) << 32) | (uint64_t)(M.lo_base + idx)));
    M.known[M.nknown++ % MAXK] = h;
}

static void op_unregister(void) {
    nq_handle_t h = pick_handle();
    int idx = h_slot(h);
    int rc = nq_unregister(M.q, h);
    TR("unregister(%#" PRIx64 ") = %d\n", h, rc);
    EXPECT_RC(rc, idx < 0 ? NQ_EBADH : 0);
    if (rc == 0)
        m_unregister(idx);
}

static void op_notify(void) {
    nq_handle_t h = pick_handle();
    int64_t arg = next_arg();
    int idx = h_slot(h);
    int want = NQ_EBADH;
    if (idx >= 0) {
        mslot_t *sl = &M.slot[idx];
        M.notifies++;
        sl->seq++;
        sl->last_arg = arg;
        want = 0;
        int wake_subs[MAXSLOT + 1], nws = 0;
        for (int j = 0; j < sl->nsubs; j++) {
            int wk;
            want += m_push(sl->subs[j], arg, &wk);
            if (wk)
                wake_subs[nws++] = sl->subs[j];
        }
        int done[MAXW], nd = 0;
        for (int i = 0; i < M.nw; i++) {
            fwait_t *f = &M.w[i];
            if (f->listed && f->slot == idx && f->after < sl->seq) {
                m_wait_complete(i, 0, arg);
                done[nd++] = i;
                want++;
            }
        }
        for (int i = 0; i < nd; i++)
            m_wait_wake(done[i]);
        for (int j = 0; j < nws; j++)
            m_sub_wake(wake_subs[j]);
    }
    int rc = nq_notify(M.q, h, arg);
    TR("notify(%#" PRIx64 ", %" PRId64 ") = %d\n", h, arg, rc);
    EXPECT_RC(rc, want);
}

static void op_seq(void) {
    nq_handle_t h = pick_handle();
    int idx = h_slot(h);
    uint64_t seq = 77;
    int rc = nq_seq(M.q, h, &seq);
    TR("seq(%#" PRIx64 ") = %d %" PRIu64 "\n", h, rc, seq);
    EXPECT_RC(rc, idx < 0 ? NQ_EBADH : 0);
    if (rc == 0)
        CHECK(seq == M.slot[idx].seq);
}

/* A new wait on slot idx (valid): due at once, over the limit, or pending. */
static int m_wait_attach(int i, int idx, uint64_t after) {
    fwait_t *f = &M.w[i];
    mslot_t *sl = &M.slot[idx];
    f->slot = idx;
    f->after = after == NQ_SEQ_NEXT ? sl->seq : after;
    if (sl->seq > f->after) {
        f->done = 1;
        f->status = 0;
        f->arg = sl->last_arg;
        M.w_completed++;
        return 1;
    }
    if (nwaiters(idx) >= (int)M.cfg.max_waiters_per_handle)
        return NQ_ELIMIT;
    f->listed = 1;
    return 0;
}

static void op_wait_start(void) {
    if (M.nw >= MAXW)
        return;
    nq_handle_t h = pick_handle();
    int idx = h_slot(h);
    uint64_t after = pick_after(idx);
    int i = M.nw;
    fwait_t *f = &M.w[i];
    memset(f, 0, sizeof(*f));
    f->kind = WK_USER;
    f->token = -1;
    int want = NQ_EBADH, due = 0;
    if (idx >= 0) {
        int r = m_wait_attach(i, idx, after);
        want = r < 0 ? r : 0;
        due = r == 1;
    }
    nq_waker_t wk = {wait_waker, f};
    nq_wait_t *w = (nq_wait_t *)&M; /* must be overwritten */
    int rc = nq_wait_start(M.q, h, after, wk, &w);
    TR("wait_start(%#" PRIx64 ", %" PRIu64 ") = %d -> w%d\n", h, after, rc, i);
    if (M.alloc_armed && rc == NQ_ENOMEM) {
        if (due)
            M.w_completed--;
        memset(f, 0, sizeof(*f));
        CHECK(w == NULL);
        return;
    }
    EXPECT_RC(rc, want);
    if (rc < 0) {
        CHECK(w == NULL);
        memset(f, 0, sizeof(*f));
        return;
    }
    M.nw++;
    f->w = w;
    f->held = 1;
    if (due)
        f->exp_wakes++;
}

static void op_wait_blocking(void) {
    nq_handle_t h = pick_handle();
    int idx = h_slot(h);
    uint64_t after = pick_after(idx);
    int with_arg = rd(2);
    int want = NQ_EBADH;
    int64_t want_arg = 0;
    if (idx >= 0) {
        mslot_t *sl = &M.slot[idx];
        uint64_t a = after == NQ_SEQ_NEXT ? sl->seq : after;
        if (sl->seq > a) {
            want = 0;
            want_arg = sl->last_arg;
            M.w_completed++;
        } else if (nwaiters(idx) >= (int)M.cfg.max_waiters_per_handle) {
            want = NQ_ELIMIT;
        } else {
            want = NQ_ETIMEDOUT;
            M.w_timed++;
        }
    }
    int64_t arg = 55;
    int rc = nq_wait(M.q, h, after, 0, with_arg ? &arg : NULL);
    TR("wait(%#" PRIx64 ", %" PRIu64 ", 0) = %d %" PRId64 "\n", h, after, rc, arg);
    EXPECT_RC(rc, want);
    if (with_arg)
        CHECK(arg == (rc == 0 ? want_arg : 55));
}

static void check_wait_result(int i) {
    fwait_t *f = &M.w[i];
    int64_t arg = 99;
    int rc = nq_wait_result(f->w, &arg);
    EXPECT_RC(rc, f->done ? f->status : NQ_EAGAIN);
    CHECK(arg == (rc == 0 ? f->arg : 99));
}

static void op_wait_result(void) {
    int i = pick_wait();
    if (i < 0)
        return;
    TR("wait_result(w%d)\n", i);
    check_wait_result(i);
}

static int m_wait_cancel(int i) {
    fwait_t *f = &M.w[i];
    if (!f->listed)
        return NQ_EALREADY;
    m_wait_complete(i, NQ_ECANCELED, 0);
    if (f->kind == WK_PORT)
        m_signal(f->token); /* the port's waker brings the callback */
    return 0;
}

static void op_wait_cancel(void) {
    int i = pick_wait();
    if (i < 0)
        return;
    int want = m_wait_cancel(i);
    int rc = nq_wait_cancel(M.w[i].w);
    TR("wait_cancel(w%d) = %d\n", i, rc);
    EXPECT_RC(rc, want);
}

static void do_wait_release(int i) {
    fwait_t *f = &M.w[i];
    TR("wait_release(w%d)\n", i);
    m_wait_cancel(i);
    nq_wait_t *w = f->w;
    f->held = 0;
    f->w = NULL;
    nq_wait_release(w);
}

static void op_wait_release(void) {
    int i = pick_wait();
    if (i >= 0)
        do_wait_release(i);
}

/* Options for a new subscription; returns the expected rc so far (0 or EINVAL). */
static int pick_opts(nq_sub_opts_t *o, int *use_opts, fsub_t *f) {
    memset(o, 0, sizeof(*o));
    *use_opts = rd(4) != 0;
    unsigned c = rd(10), ov = rd(3);
    f->has_waker = rd(2);
    f->cb_mode = (int)rd(6);
    if (!*use_opts) {
        f->has_waker = 0;
        f->cap = M.cfg.default_capacity;
        f->oldest = 0;
        return 0;
    }
    o->capacity = c == 9 ? MAXCAP + 1 : c;
    o->overflow = ov == 2 ? (nq_overflow_t)7 : ov == 1 ? NQ_DROP_OLDEST : NQ_DROP_NEWEST;
    o->debug_hint = c & 1 ? "sub" : NULL;
    if (f->has_waker) {
        o->waker.wake = sub_waker;
        o->waker.ctx = f;
    }
    f->cap = o->capacity ? o->capacity : M.cfg.default_capacity;
    f->oldest = ov == 1;
    if (ov == 2 || f->cap > MAXCAP)
        return NQ_EINVAL;
    return 0;
}

static int m_sub_attach(int idx, int want) {
    if (want < 0)
        return want;
    if (idx < 0)
        return NQ_EBADH;
    mslot_t *sl = &M.slot[idx];
    if (sl->nsubs >= (int)M.cfg.max_subscribers_per_handle)
        return NQ_ELIMIT;
    return 0;
}

static void m_sub_attached(int k, int idx) {
    fsub_t *f = &M.s[k];
    mslot_t *sl = &M.slot[idx];
    f->slot = idx;
    f->attached = 1;
    f->live = 1;
    sl->subs[sl->nsubs++] = k;
}

static void op_subscribe(void) {
    if (M.ns >= MAXS)
        return;
    nq_handle_t h = pick_handle();
    int idx = h_slot(h);
    int k = M.ns;
    fsub_t *f = &M.s[k];
    memset(f, 0, sizeof(*f));
    f->token = -1;
    nq_sub_opts_t o;
    int use_opts;
    int want = m_sub_attach(idx, pick_opts(&o, &use_opts, f));
    nq_sub_t *s = (nq_sub_t *)&M;
    int rc = nq_subscribe(M.q, h, use_opts ? &o : NULL, &s);
    TR("subscribe(%#" PRIx64 ", cap %u, %s, waker %d) = %d -> s%d\n", h, o.capacity,
       use_opts ? (o.overflow == NQ_DROP_OLDEST ? "oldest" : "newest/bad") : "NULL opts",
       f->has_waker, rc, k);
    if (M.alloc_armed && rc == NQ_ENOMEM && want != NQ_EINVAL)
        want = NQ_ENOMEM; /* allocated before the handle is looked up */
    EXPECT_RC(rc, want);
    if (rc < 0) {
        CHECK(s == NULL);
        memset(f, 0, sizeof(*f));
        return;
    }
    M.ns++;
    f->s = s;
    f->held = 1;
    m_sub_attached(k, idx);
}

static int m_recv1(int k, int64_t *arg) {
    fsub_t *f = &M.s[k];
    if (f->len > 0) {
        *arg = f->ring[f->head];
        f->head = (f->head + 1) % f->cap;
        f->len--;
        return 0;
    }
    if (f->closed) {
        f->told_closed = 1;
        return NQ_ECLOSED;
    }
    return NQ_EAGAIN;
}

static void do_try_recv(int k, nq_sub_t *s, int blocking_form) {
    fsub_t *f = &M.s[k];
    int64_t want_arg = 0, arg = 1234567;
    int with_arg = rd(2) || blocking_form;
    int want = m_recv1(k, &want_arg);
    int rc;
    if (blocking_form) {
        rc = nq_sub_recv(s, 0, &arg);
        if (want == NQ_EAGAIN)
            want = NQ_ETIMEDOUT;
    } else {
        rc = nq_sub_try_recv(s, with_arg ? &arg : NULL);
    }
    TR("%s(s%d) = %d %" PRId64 "\n", blocking_form ? "sub_recv" : "sub_try_recv", k, rc, arg);
    EXPECT_RC(rc, want);
    if (rc == 0) {
        f->received++;
        if (with_arg)
            CHECK(arg == want_arg);
    } else {
        CHECK(arg == 1234567);
    }
}

static void do_recv_batch(int k, nq_sub_t *s, size_t n, int null_args) {
    fsub_t *f = &M.s[k];
    int64_t args[6], want_args[6];
    for (int i = 0; i < 6; i++)
        args[i] = 7654321;
    int want;
    if (n == 0 || null_args) {
        want = NQ_EINVAL;
    } else {
        want = 0;
        while ((size_t)want < n && f->len > 0) {
            want_args[want++] = f->ring[f->head];
            f->head = (f->head + 1) % f->cap;
            f->len--;
        }
        if (want == 0 && f->closed) {
            f->told_closed = 1;
            want = NQ_ECLOSED;
        }
    }
    int rc = nq_sub_recv_batch(s, null_args ? NULL : args, n);
    TR("sub_recv_batch(s%d, %zu%s) = %d\n", k, n, null_args ? ", NULL" : "", rc);
    EXPECT_RC(rc, want);
    for (int i = 0; i < rc; i++)
        CHECK(args[i] == want_args[i]);
    if (rc > 0)
        f->received += (uint64_t)rc;
    for (int i = rc > 0 ? rc : 0; i < 6; i++)
        CHECK(args[i] == 7654321);
}

static void op_try_recv(int blocking_form) {
    int k = pick_sub();
    if (k >= 0)
        do_try_recv(k, M.s[k].s, blocking_form);
}

static void op_recv_batch(void) {
    int k = pick_sub();
    size_t n = rd(5);
    int null_args = n == 4 && rd(2);
    if (k >= 0)
        do_recv_batch(k, M.s[k].s, n, null_args);
}

static void op_dropped(void) {
    int k = pick_sub();
    if (k < 0)
        return;
    uint64_t d = nq_sub_dropped(M.s[k].s);
    TR("sub_dropped(s%d) = %" PRIu64 "\n", k, d);
    CHECK(d == M.s[k].dropped);
}

static void do_sub_close(int k, nq_sub_t *s) {
    TR("sub_close(s%d)\n", k);
    m_sub_close(k);
    nq_sub_close(s);
}

static void op_sub_close(void) {
    int k = pick_sub();
    if (k >= 0)
        do_sub_close(k, M.s[k].s);
}

/* --- ports ------------------------------------------------------------------------------ */

static void m_cb_enter(int kind, int rec, int status, int64_t arg);
static void m_finish_post(void);

static void wait_cb(void *data, int status, int64_t arg) {
    fwait_t *f = data;
    int i = (int)(f - M.w);
    TR("  wait_cb(w%d, %d, %" PRId64 ")\n", i, status, arg);
    if (M.in_free) {
        CHECK(M.free_cursor < M.nfree_list && M.free_list[M.free_cursor++] == i);
        CHECK(f->done && !f->cb_ran);
        EXPECT_RC(status, f->status);
        CHECK(arg == (status == 0 ? f->arg : 0));
        f->cb_ran = 1;
        f->port_ref = 0;
        if (f->cb_mode == 1 && f->held)
            do_wait_release(i);
        return;
    }
    m_cb_enter(IT_WAIT, i, status, arg);
    M.in_cb = 1;
    switch (f->cb_mode) {
    case 1:
        if (f->held)
            do_wait_release(i);
        break;
    case 2:
        run_op();
        break;
    case 3:
        EXPECT_RC(nq_port_dispatch(M.p, 0), NQ_EBUSY);
        break;
    default:
        break;
    }
    M.in_cb = 0;
}

static void sub_cb(nq_sub_t *s, void *data) {
    fsub_t *f = data;
    int k = (int)(f - M.s);
    TR("  sub_cb(s%d)\n", k);
    CHECK(!M.in_free);
    m_cb_enter(IT_SUB, k, 0, 0);
    if (f->port_owned)
        f->s = s;
    CHECK(f->s == s);
    M.in_cb = 1;
    switch (f->cb_mode) {
    case 1:
        do_try_recv(k, s, 0);
        break;
    case 2:
        for (;;) { /* until it returns 0 (empty) or NQ_ECLOSED */
            uint32_t before = f->len;
            do_recv_batch(k, s, 3, 0);
            if (before == 0)
                break;
        }
        break;
    case 3:
        if (f->held)
            do_sub_close(k, s);
        else
            do_try_recv(k, s, 0);
        break;
    case 4:
        run_op();
        break;
    case 5:
        EXPECT_RC(nq_port_dispatch(M.p, 1), NQ_EBUSY);
        break;
    default:
        break;
    }
    M.in_cb = 0;
}

static int runnable(int t) {
    if (M.item[t].kind == IT_WAIT) {
        fwait_t *f = &M.w[M.item[t].rec];
        return f->done && !f->cb_ran;
    }
    if (M.item[t].kind == IT_SUB) {
        fsub_t *f = &M.s[M.item[t].rec];
        int ready = (f->len > 0) | (f->closed << 1);
        return ready != 0 && !(!(ready & 1) && f->told_closed);
    }
    return 0;
}

/* Re-arm (level-triggered) or the deferred close of the last sub callback. */
static void m_finish_post(void) {
    if (M.post_sub < 0)
        return;
    int k = M.post_sub;
    fsub_t *f = &M.s[k];
    M.post_sub = -1;
    f->in_cb = 0;
    if (f->close_deferred) {
        f->close_deferred = 0;
        m_sub_close(k);
    } else if (f->len > 0 || (f->closed && !f->told_closed)) {
        m_signal(f->token);
    }
}

/* The tokens dispatch polls once its expiry is over: the oldest of those
 * ready when it began, as many as the budget leaves. */
static void m_take_batch(void) {
    if (M.batch_taken)
        return;
    M.batch_taken = 1;
    int limit = M.flen_start;
    if (M.budget != 0 && (int)M.budget - M.expired < limit)
        limit = (int)M.budget - M.expired;
    M.nbatch = limit;
    for (int i = 0; i < limit; i++) {
        int t = M.fifo[M.fhead];
        M.fhead = (M.fhead + 1) % MAXTOK;
        M.flen--;
        M.pend[t] = 0;
        M.batch[i] = t;
    }
    M.cursor = 0;
}

static void m_drain_batch(void) {
    while (M.cursor < M.nbatch)
        CHECK(!runnable(M.batch[M.cursor++])); /* dispatch skipped a ready item */
}

static void m_port_wait_done(int i) {
    fwait_t *f = &M.w[i];
    f->cb_ran = 1;
    f->port_ref = 0;
    f->in_heap = 0;
    f->maybe_heap = 0;
    m_tok_put(f->token);
}

static void m_cb_enter(int kind, int rec, int status, int64_t arg) {
    CHECK(M.in_dispatch && !M.in_cb);
    m_finish_post();
    M.ran++;
    if (kind == IT_WAIT && status == NQ_ETIMEDOUT) {
        CHECK(!M.batch_taken); /* timeouts before ready callbacks */
        CHECK(M.budget == 0 || M.expired < (int)M.budget);
        M.expired++;
        fwait_t *f = &M.w[rec];
        CHECK(f->kind == WK_PORT && f->listed && f->in_heap && f->timeout0 && f->port_ref);
        m_wait_complete(rec, NQ_ETIMEDOUT, 0);
        CHECK(arg == 0);
        m_port_wait_done(rec);
        return;
    }
    m_take_batch();
    while (M.cursor < M.nbatch) {
        int t = M.batch[M.cursor++];
        if (!runnable(t))
            continue;
        CHECK(M.item[t].kind == kind && M.item[t].rec == rec);
        if (kind == IT_WAIT) {
            fwait_t *f = &M.w[rec];
            EXPECT_RC(status, f->status);
            CHECK(arg == (status == 0 ? f->arg : 0));
            m_port_wait_done(rec);
        } else {
            M.s[rec].in_cb = 1;
            M.post_sub = rec;
        }
        return;
    }
    fail(__FILE__, __LINE__, "a port callback the model did not expect");
}

static void op_dispatch(void) {
    unsigned budget = rd(4);
    if (M.in_cb) {
        TR("dispatch (nested)\n");
        EXPECT_RC(nq_port_dispatch(M.p, budget), M.p ? NQ_EBUSY : NQ_EINVAL);
        return;
    }
    if (M.p == NULL) {
        EXPECT_RC(nq_port_dispatch(NULL, budget), NQ_EINVAL);
        return;
    }
    M.flen_start = M.flen;
    M.budget = budget;
    M.expired = 0;
    M.batch_taken = 0;
    M.nbatch = M.cursor = 0;
    M.post_sub = -1;
    M.ran = 0;
    M.in_dispatch = 1;
    TR("dispatch(%u) {\n", budget);
    int rc = nq_port_dispatch(M.p, budget);
    TR("} = %d\n", rc);
    M.in_dispatch = 0;
    m_finish_post();
    m_take_batch();
    m_drain_batch();
    /* Below its budget, the expiry timed out every due wait and took every
     * due deadline off the heap, also those of waits a notification
     * completed first. At its budget, due waits still pending stay (exactly
     * known: each timed-out one had its callback); a completed one may or
     * may not have been reached. */
    int cut = M.budget != 0 && M.expired == (int)M.budget;
    for (int i = 0; i < M.nw; i++) {
        fwait_t *f = &M.w[i];
        if (f->kind != WK_PORT || !f->timeout0)
            continue;
        if (f->fresh) { /* made after this dispatch's expiry: still there */
            f->fresh = 0;
            continue;
        }
        if (!cut) {
            if (f->in_heap)
                CHECK(!f->listed);
            f->in_heap = f->maybe_heap = 0;
        } else if (f->in_heap && !f->listed) {
            f->in_heap = 0;
            f->maybe_heap = 1;
        }
    }
    /* A timeout left due keeps the eventfd readable, like ready work. */
    int due_left = 0;
    for (int i = 0; i < M.nw; i++)
        due_left += M.w[i].kind == WK_PORT && M.w[i].in_heap && M.w[i].timeout0;
    if (due_left > 0) {
        struct pollfd pfd = {nq_port_fd(M.p), POLLIN, 0};
        CHECK(poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN));
    }
    /* Nothing queued and nothing due: the fd is quiet (were it readable, a
     * level-triggered loop would spin). Deadlines not due do not count. */
    if (due_left == 0 && !cut && M.flen == 0) {
        struct pollfd pfd = {nq_port_fd(M.p), POLLIN, 0};
        CHECK(poll(&pfd, 1, 0) == 0);
    }
    EXPECT_RC(rc, M.ran);
}

static void op_port_wait(void) {
    if (M.nw >= MAXW)
        return;
    nq_handle_t h = pick_handle();
    int idx = h_slot(h);
    uint64_t after = pick_after(idx);
    unsigned tc = rd(3);
    int with_out = rd(2);
    int i = M.nw;
    fwait_t *f = &M.w[i];
    memset(f, 0, sizeof(*f));
    f->kind = WK_PORT;
    f->cb_mode = (int)rd(4);
    /* A deadline set inside a timeout callback may or may not fall after
     * the expiry's clock; one set in a ready callback comes after the
     * expiry: due when the dispatch ends, expired in the next one. */
    int fresh = M.in_cb && tc == 1 && M.in_dispatch && M.batch_taken;
    if (M.in_cb && tc == 1 && !fresh)
        tc = 2;
    int64_t timeout = tc == 0 ? -1 : tc == 1 ? 0 : BIG_TIMEOUT_MS;
    int want, due = 0, tok = -1;
    if (M.p == NULL) {
        want = NQ_EINVAL;
    } else if ((tok = m_tok_get()) < 0) {
        want = NQ_ELIMIT;
    } else if (idx < 0) {
        want = NQ_EBADH;
    } else {
        int r = m_wait_attach(i, idx, after);
        want = r < 0 ? r : 0;
        due = r == 1;
    }
    nq_wait_t *w = (nq_wait_t *)&M;
    int rc = nq_port_wait(M.p, M.q, h, after, timeout, wait_cb, f, with_out ? &w : NULL);
    TR("port_wait(%#" PRIx64 ", %" PRIu64 ", %" PRId64 " ms, out %d, mode %d) = %d -> w%d tok %d\n",
       h, after, timeout, with_out, f->cb_mode, rc, i, tok);
    if (M.alloc_armed && rc == NQ_ENOMEM && tok >= 0) {
        want = NQ_ENOMEM;
        if (due)
            M.w_completed--;
    }
    EXPECT_RC(rc, want);
    if (rc < 0) {
        if (with_out)
            CHECK(w == NULL);
        if (tok >= 0)
            M.tok_free[M.ntok_free++] = tok;
        memset(f, 0, sizeof(*f));
        return;
    }
    M.nw++;
    f->token = tok;
    f->port_ref = 1;
    M.item[tok].kind = IT_WAIT;
    M.item[tok].rec = i;
    if (with_out) {
        f->w = w;
        f->held = 1;
    }
    if (due) {
        m_signal(tok);
    } else if (timeout >= 0) {
        f->in_heap = 1;
        f->timeout0 = timeout == 0;
        f->fresh = fresh;
    }
}

static void op_port_subscribe(void) {
    if (M.ns >= MAXS)
        return;
    nq_handle_t h = pick_handle();
    int idx = h_slot(h);
    int k = M.ns;
    fsub_t *f = &M.s[k];
    memset(f, 0, sizeof(*f));
    nq_sub_opts_t o;
    int use_opts;
    int want0 = pick_opts(&o, &use_opts, f);
    int with_out = rd(2);
    int want, tok = -1;
    if (M.p == NULL)
        want = NQ_EINVAL;
    else if ((tok = m_tok_get()) < 0)
        want = NQ_ELIMIT;
    else
        want = m_sub_attach(idx, want0);
    nq_sub_t *s = (nq_sub_t *)&M;
    int rc = nq_port_subscribe(M.p, M.q, h, use_opts ? &o : NULL, sub_cb, f, with_out ? &s : NULL);
    TR("port_subscribe(%#" PRIx64 ", cap %u, %s, waker %d, out %d, mode %d) = %d -> s%d tok %d\n",
       h, o.capacity, use_opts ? (o.overflow == NQ_DROP_OLDEST ? "oldest" : "newest/bad") : "NULL opts",
       f->has_waker, with_out, f->cb_mode, rc, k, tok);
    if (M.alloc_armed && rc == NQ_ENOMEM && tok >= 0 && want != NQ_EINVAL)
        want = NQ_ENOMEM;
    EXPECT_RC(rc, want);
    if (rc < 0) {
        if (with_out)
            CHECK(s == NULL);
        if (tok >= 0)
            M.tok_free[M.ntok_free++] = tok;
        memset(f, 0, sizeof(*f));
        return;
    }
    M.ns++;
    f->port_sub = 1;
    f->has_port = 1;
    f->token = tok;
    f->port_owned = !with_out;
    M.item[tok].kind = IT_SUB;
    M.item[tok].rec = k;
    if (with_out) {
        f->s = s;
        f->held = 1;
    }
    m_sub_attached(k, idx);
}

static void m_port_reset(int items) {
    M.port_items = items;
    M.ntok_free = 0;
    for (int i = 0; i < items; i++)
        M.tok_free[M.ntok_free++] = items - 1 - i;
    for (int i = 0; i < MAXTOK; i++) {
        M.item[i].kind = IT_NONE;
        M.item[i].rec = -1;
        M.pend[i] = 0;
    }
    M.fhead = M.flen = 0;
}

static void do_port_free(void) {
    TR("port_free {\n");
    M.nfree_list = 0;
    M.free_cursor = 0;
    for (int t = 0; t < M.port_items; t++) {
        if (M.item[t].kind != IT_WAIT)
            continue;
        int i = M.item[t].rec;
        if (M.w[i].listed)
            m_wait_complete(i, NQ_ECANCELED, 0);
        M.w[i].in_heap = M.w[i].maybe_heap = 0;
        M.free_list[M.nfree_list++] = i;
    }
    M.in_free = 1;
    nq_port_free(M.p);
    M.in_free = 0;
    M.p = NULL;
    TR("}\n");
    CHECK(M.free_cursor == M.nfree_list);
    for (int t = 0; t < M.port_items; t++) {
        if (M.item[t].kind != IT_SUB)
            continue;
        int k = M.item[t].rec;
        M.s[k].has_port = 0;
        if (M.s[k].port_owned) {
            if (M.s[k].attached)
                m_slot_remove_sub(k);
            M.s[k].live = 0;
        }
    }
    m_port_reset(0);
}

static void op_port_free(void) {
    if (M.in_cb || M.p == NULL)
        return;
    do_port_free();
}

static void op_port_new(void) {
    unsigned items = 1 + rd(MAXTOK);
    if (M.in_cb || M.p != NULL)
        return;
    int rc = nq_port_new_sized(items, &M.p);
    TR("port_new(%u) = %d\n", items, rc);
    if (M.alloc_armed && rc == NQ_ENOMEM)
        return;
    EXPECT_RC(rc, 0);
    m_port_reset((int)items);
}

/* --- bad arguments ---------------------------------------------------------------------- */

static void op_bad(void) {
    unsigned c = rd(20);
    nq_handle_t h = pick_handle();
    nq_handle_t hout = 5;
    nq_wait_t *w = (nq_wait_t *)&M;
    nq_sub_t *s = (nq_sub_t *)&M;
    nq_waker_t wk = {NULL, NULL};
    int64_t arg;
    uint64_t seq;
    TR("bad argument %u\n", c);
    switch (c) {
    case 0:
        EXPECT_RC(nq_register(NULL, "x", &hout), NQ_EINVAL);
        break;
    case 1:
        EXPECT_RC(nq_register(M.q, "x", NULL), NQ_EINVAL);
        break;
    case 2:
        EXPECT_RC(nq_unregister(NULL, h), NQ_EINVAL);
        break;
    case 3:
        EXPECT_RC(nq_notify(NULL, h, 1), NQ_EINVAL);
        break;
    case 4:
        EXPECT_RC(nq_seq(M.q, h, NULL), NQ_EINVAL);
        EXPECT_RC(nq_seq(NULL, h, &seq), NQ_EINVAL);
        break;
    case 5:
        EXPECT_RC(nq_wait_start(M.q, h, 0, wk, NULL), NQ_EINVAL);
        EXPECT_RC(nq_wait_start(NULL, h, 0, wk, &w), NQ_EINVAL); /* *out: unspecified */
        break;
    case 6:
        EXPECT_RC(nq_wait_result(NULL, &arg), NQ_EINVAL);
        EXPECT_RC(nq_wait_cancel(NULL), NQ_EINVAL);
        nq_wait_release(NULL);
        break;
    case 7:
        EXPECT_RC(nq_wait(NULL, h, 0, 0, &arg), NQ_EINVAL);
        break;
    case 8:
        EXPECT_RC(nq_subscribe(M.q, h, NULL, NULL), NQ_EINVAL);
        EXPECT_RC(nq_subscribe(NULL, h, NULL, &s), NQ_EINVAL); /* *out: unspecified */
        break;
    case 9:
        EXPECT_RC(nq_sub_try_recv(NULL, &arg), NQ_EINVAL);
        EXPECT_RC(nq_sub_recv(NULL, 0, &arg), NQ_EINVAL);
        EXPECT_RC(nq_sub_recv_batch(NULL, &arg, 1), NQ_EINVAL);
        CHECK(nq_sub_dropped(NULL) == 0);
        nq_sub_close(NULL);
        break;
    case 10:
        EXPECT_RC(nq_port_wait(M.p, M.q, h, 0, -1, NULL, NULL, &w), NQ_EINVAL);
        CHECK(w == NULL);
        EXPECT_RC(nq_port_wait(M.p, NULL, h, 0, -1, wait_cb, NULL, NULL), NQ_EINVAL);
        break;
    case 11:
        EXPECT_RC(nq_port_subscribe(M.p, M.q, h, NULL, NULL, NULL, &s), NQ_EINVAL);
        CHECK(s == NULL);
        EXPECT_RC(nq_port_subscribe(M.p, NULL, h, NULL, sub_cb, NULL, NULL), NQ_EINVAL);
        break;
    case 12:
        EXPECT_RC(nq_port_dispatch(NULL, 0), NQ_EINVAL);
        CHECK(nq_port_timeout_ms(NULL) == -1);
        EXPECT_RC(nq_port_fd(NULL), NQ_EINVAL);
        nq_port_free(NULL);
        break;
    case 13:
        EXPECT_RC(nq_queue_stats(M.q, NULL), NQ_EINVAL);
        EXPECT_RC(nq_queue_dump(M.q, NULL), NQ_EINVAL);
        EXPECT_RC(nq_port_stats(M.p, NULL), NQ_EINVAL);
        break;
    case 14:
    {
        nq_port_t *p2 = (nq_port_t *)&M;
        EXPECT_RC(nq_port_new_sized(0, &p2), NQ_EINVAL);
        CHECK(p2 == NULL);
        EXPECT_RC(nq_port_new(NULL), NQ_EINVAL);
    }
        break;
    case 15:
        EXPECT_RC(nq_queue_new(NULL, NULL), NQ_EINVAL);
        break;
    default: { /* a configuration out of range */
        nq_config_t cfg;
        nq_queue_t *q2 = (nq_queue_t *)&M;
        nq_config_init(&cfg);
        if (c == 16)
            cfg.max_handles = 0;
        else if (c == 17)
            cfg.max_subscribers_per_handle = 1025;
        else if (c == 18)
            cfg.default_capacity = 0;
        else
            cfg.default_capacity = cfg.max_capacity + 1;
        EXPECT_RC(nq_queue_new(&cfg, &q2), NQ_EINVAL);
        CHECK(q2 == NULL);
        break;
    }
    }
}

static void op_dump(void) {
    static FILE *devnull;
    if (devnull == NULL)
        devnull = fopen("/dev/null", "w");
    if (devnull != NULL)
        EXPECT_RC(nq_queue_dump(M.q, devnull), 0);
}

/* --- invariants after every top-level operation ---------------------------------------- */

static void check_all(void) {
    int live_waits = 0, pending = 0, live_subs = 0, heap = 0, tokens = 0, timeout0 = 0, maybe = 0;
    for (int i = 0; i < M.nw; i++) {
        fwait_t *f = &M.w[i];
        if (f->kind == WK_USER) {
            CHECK(f->wakes == f->exp_wakes);
            CHECK(f->wakes <= 1);
        }
        if (f->held)
            check_wait_result(i);
        live_waits += f->held || f->port_ref;
        pending += f->listed;
        heap += f->in_heap;
        timeout0 += f->in_heap && f->timeout0;
        maybe += f->maybe_heap;
    }
    for (int k = 0; k < M.ns; k++) {
        fsub_t *f = &M.s[k];
        CHECK(f->wakes == f->exp_wakes);
        live_subs += f->live;
        /* received + dropped + held == sent */
        CHECK(f->received + f->dropped + f->len == f->sent);
        if (f->held)
            CHECK(nq_sub_dropped(f->s) == f->dropped);
    }
    for (int t = 0; t < M.port_items; t++)
        tokens += M.item[t].kind != IT_NONE;
    if (!M.qfreed) {
        nq_stats_t st;
        EXPECT_RC(nq_queue_stats(M.q, &st), 0);
        CHECK(st.live_handles == (uint32_t)M.live);
        CHECK(st.retired_slots == (uint32_t)M.retired);
        CHECK(st.live_waits == (uint32_t)live_waits);
        CHECK(st.waits_pending == (uint64_t)pending);
        CHECK(st.live_subs == (uint32_t)live_subs);
        CHECK(st.notifies == M.notifies);
        CHECK(st.drops == M.dropped);
        CHECK(st.deliveries == M.w_completed + M.stored);
        CHECK(st.waits_completed == M.w_completed);
        CHECK(st.waits_closed == M.w_closed);
        CHECK(st.waits_timed_out == M.w_timed);
        CHECK(st.waits_cancelled == M.w_cancelled);
        CHECK(st.bytes_held <= st.memory_limit);
    }
    if (M.p != NULL) {
        nq_port_stats_t ps;
        EXPECT_RC(nq_port_stats(M.p, &ps), 0);
        CHECK(ps.live_items == (uint32_t)tokens);
        /* The maybes still in the heap: none or all settle them. */
        CHECK(ps.deadlines >= (uint32_t)heap && ps.deadlines <= (uint32_t)(heap + maybe));
        int left = (int)ps.deadlines - heap;
        if (maybe > 0 && (left == 0 || left == maybe)) {
            for (int i = 0; i < M.nw; i++) {
                if (M.w[i].maybe_heap) {
                    M.w[i].maybe_heap = 0;
                    M.w[i].in_heap = left > 0;
                }
            }
            heap += left;
            timeout0 += left;
            left = 0;
        }
        CHECK(ps.max_items == (uint32_t)M.port_items);
        int64_t ms = nq_port_timeout_ms(M.p);
        if (left > 0) /* a due deadline is still in the heap */
            CHECK(ms == 0);
        else if (heap == 0)
            CHECK(ms == -1);
        else if (timeout0 > 0)
            CHECK(ms == 0);
        else
            CHECK(ms > 0 && ms <= BIG_TIMEOUT_MS);
        /* Work queued keeps the eventfd readable. */
        if (M.flen > 0) {
            struct pollfd pfd = {nq_port_fd(M.p), POLLIN, 0};
            CHECK(poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN));
        }
    }
}

/* --- the driver -------------------------------------------------------------------------- */

enum {
    OP_REGISTER, OP_UNREGISTER, OP_NOTIFY, OP_SEQ, OP_WAIT_START, OP_WAIT, OP_WAIT_RESULT,
    OP_WAIT_CANCEL, OP_WAIT_RELEASE, OP_SUBSCRIBE, OP_TRY_RECV, OP_RECV, OP_RECV_BATCH,
    OP_DROPPED, OP_SUB_CLOSE, OP_PORT_WAIT, OP_PORT_SUBSCRIBE, OP_DISPATCH, OP_PORT_FREE,
    OP_PORT_NEW, OP_BAD, OP_DUMP, OP_ALLOC, NOPS
};
static const char op_letters[NOPS + 1] = "runqwWgcxstvbdkpPDFNeSa";

static int decode_op(void) {
    for (;;) {
        if (!more())
            return -1;
        unsigned b = M.in[M.pos++];
        if (b == ' ' || b == '\n' || b == '\t' || b == '\r')
            continue;
        const char *l = b ? strchr(op_letters, (int)b) : NULL;
        return l ? (int)(l - op_letters) : (int)(b % NOPS);
    }
}

static void run_op(void) {
    int op = decode_op();
    if (op < 0)
        return;
    M.opno++;
    switch (op) {
    case OP_REGISTER: op_register(); break;
    case OP_UNREGISTER: op_unregister(); break;
    case OP_NOTIFY: op_notify(); break;
    case OP_SEQ: op_seq(); break;
    case OP_WAIT_START: op_wait_start(); break;
    case OP_WAIT: op_wait_blocking(); break;
    case OP_WAIT_RESULT: op_wait_result(); break;
    case OP_WAIT_CANCEL: op_wait_cancel(); break;
    case OP_WAIT_RELEASE: op_wait_release(); break;
    case OP_SUBSCRIBE: op_subscribe(); break;
    case OP_TRY_RECV: op_try_recv(0); break;
    case OP_RECV: op_try_recv(1); break;
    case OP_RECV_BATCH: op_recv_batch(); break;
    case OP_DROPPED: op_dropped(); break;
    case OP_SUB_CLOSE: op_sub_close(); break;
    case OP_PORT_WAIT: op_port_wait(); break;
    case OP_PORT_SUBSCRIBE: op_port_subscribe(); break;
    case OP_DISPATCH: op_dispatch(); break;
    case OP_PORT_FREE: op_port_free(); break;
    case OP_PORT_NEW: op_port_new(); break;
    case OP_BAD: op_bad(); break;
    case OP_DUMP: op_dump(); break;
    case OP_ALLOC:
        /* The k-th allocation of the next operation fails: creation calls
         * may then return NQ_ENOMEM, and must change nothing when they do.
         * Inside a callback the next operation might be a dispatch's own
         * work, so only at the top level. */
        if (!M.in_cb && more()) {
            unsigned k = 1 + rd(4);
            TR("allocation %u of the next operation fails\n", k);
            M.alloc_armed = 1;
            nq__alloc_fail_at((long)k, 0);
            run_op();
            nq__alloc_fail_at(0, 0);
            M.alloc_armed = 0;
        }
        break;
    }
}

static void cleanup(void) {
    TR("cleanup %u\n", M.cleanup);
    if (M.cleanup == 1 && !M.qfreed) { /* the queue first */
        for (int i = 0; i < M.used; i++)
            if (M.slot[i].live)
                m_unregister(i);
        nq_queue_free(M.q);
        M.qfreed = 1;
        check_all();
    }
    if (M.cleanup != 0 && M.p != NULL) {
        do_port_free();
        check_all();
    }
    for (int i = 0; i < M.nw; i++)
        if (M.w[i].held)
            do_wait_release(i);
    for (int k = 0; k < M.ns; k++)
        if (M.s[k].held)
            do_sub_close(k, M.s[k].s);
    check_all();
    if (M.p != NULL) {
        do_port_free();
        check_all();
    }
    for (int k = 0; k < M.ns; k++)
        CHECK(!M.s[k].live);
    if (!M.qfreed) {
        for (int i = 0; i < M.used; i++)
            if (M.slot[i].live)
                m_unregister(i);
        nq_queue_free(M.q);
        M.qfreed = 1;
    }
    check_all(); /* no waker ran late */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int trace = -1;
    if (trace < 0)
        trace = getenv("NQ_FUZZ_TRACE") != NULL && getenv("NQ_FUZZ_TRACE")[0] == '1';
    memset(&M, 0, sizeof(M));
    M.in = data;
    M.len = size;
    M.trace = trace;
    M.post_sub = -1;

    nq_config_init(&M.cfg);
    M.cfg.max_handles = 1 + rd(MAXSLOT);
    M.cfg.max_waiters_per_handle = 1 + rd(3);
    M.cfg.max_subscribers_per_handle = 1 + rd(3);
    M.cfg.default_capacity = 1 + rd(3);
    M.cfg.max_capacity = MAXCAP;
    static const unsigned gen_bits[4] = {24, 1, 2, 3}; /* 24: the default (handle.h) */
    unsigned gb = gen_bits[rd(4)];
    unsigned items = 1 + rd(MAXTOK);
    M.cleanup = rd(3);
    TR("queue: %u handles, %u waiters, %u subscribers, capacity %u; generation bits %u; "
       "port items %u; cleanup %u\n",
       M.cfg.max_handles, M.cfg.max_waiters_per_handle, M.cfg.max_subscribers_per_handle,
       M.cfg.default_capacity, gb, items, M.cleanup);
    EXPECT_RC(nq_queue_new(&M.cfg, &M.q), 0);
    EXPECT_RC(nq__queue_set_gen_bits(M.q, gb), 0);
    M.mask = (1u << gb) - 1;
    EXPECT_RC(nq_port_new_sized(items, &M.p), 0);
    m_port_reset((int)items);

    while (more()) {
        run_op();
        check_all();
    }
    cleanup();
    return 0;
}
