/* cmp_instr: instructions per notify on the hot path, counted by callgrind.
 *
 * Single-threaded. Each case is a function measure_<case>(long n) that does
 * n notifications and nothing else; its setup, one warm-up operation (which
 * resolves lazy PLT bindings and takes any first-time path, such as the one
 * eventfd write that makes a wakeup pending) and its checks run outside it.
 * The driver runs
 *   valgrind --tool=callgrind --callgrind-out-file=F --collect-atstart=no \
 *            --toggle-collect=measure_<case> ./cmp_instr --case <case>
 * and divides the total Ir in F by n (100,000; --n changes it, and the
 * program prints the n it used). Without valgrind the program just runs the
 * case and prints one JSON line with the wall time per operation.
 *
 * Cases (the receiving side is never run during the measurement, so every
 * wakeup after the warm-up is already pending: the steady state under load):
 *   nq_notify_sub        nq_notify to a handle with one subscription that has
 *                        room (capacity n + 1, no waker)
 *   nq_notify_none       nq_notify to a handle with no receiver
 *   nq_notify_conflated  nq_notify to a handle whose port wait the warm-up
 *                        notify completed (its callback not yet run)
 *   nq_notify_port_wait  nq_notify that completes a pending port wait: n + 1
 *                        handles with one wait each, one notify per handle
 *                        (the path most notifies of cmp_handles e_1M take)
 *   uv_async_mutex       mutex push onto a user queue + uv_async_send
 *   ev_async_mutex       mutex push + ev_async_send (loop created, not run)
 *   eventfd_mutex        mutex push + write(eventfd, 1). callgrind counts no
 *                        kernel instructions: the syscall's cost is not in Ir
 *   mutex_condvar        mutex push + pthread_cond_signal (no waiter)
 * The user queues are intrusive lists over preallocated nodes: no malloc per
 * push, which favours the peers (libnq's subscription ring is preallocated
 * too).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <ev.h>
#include <uv.h>

#include "harness.h"
#include "nq.h"

/* Extern, called through a table and never inlined or cloned: callgrind's
 * --toggle-collect must find exactly this symbol. */
#if defined(__clang__)
#define NOINLINE __attribute__((noinline, used))
#else
#define NOINLINE __attribute__((noinline, noclone, used))
#endif

/* --- a user's mutex queue ---------------------------------------------- */

typedef struct node {
    struct node *next;
    int64_t arg;
} node_t;

typedef struct mq {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    node_t *head, *tail;
    long len;
} mq_t;

static mq_t mq;
static node_t *nodes;

static int mq_setup(long n) {
    pthread_mutex_init(&mq.mu, NULL);
    pthread_cond_init(&mq.cv, NULL);
    mq.head = mq.tail = NULL;
    mq.len = 0;
    nodes = calloc((size_t)n + 1, sizeof(*nodes));
    return nodes != NULL ? 0 : -1;
}

static inline void mq_push_locked(node_t *nd, int64_t arg) {
    nd->next = NULL;
    nd->arg = arg;
    if (mq.tail != NULL)
        mq.tail->next = nd;
    else
        mq.head = nd;
    mq.tail = nd;
    mq.len++;
}

static inline void mq_push(node_t *nd, int64_t arg) {
    pthread_mutex_lock(&mq.mu);
    mq_push_locked(nd, arg);
    pthread_mutex_unlock(&mq.mu);
}

/* --- state shared by setup, measure and check ---------------------------- */

static struct {
    nq_queue_t *q;
    nq_port_t *port;
    nq_handle_t h;
    nq_handle_t *hs; /* nq_notify_port_wait */
    nq_sub_t *sub;
    long callbacks;
    uv_loop_t uvloop;
    uv_async_t uva;
    struct ev_loop *evloop;
    ev_async eva;
    int efd;
} st;

static nq_queue_t *new_queue(uint32_t max_handles, uint32_t max_capacity) {
    nq_config_t cfg;
    nq_config_init(&cfg);
    if (max_handles > cfg.max_handles)
        cfg.max_handles = max_handles;
    if (max_capacity > cfg.max_capacity)
        cfg.max_capacity = max_capacity;
    cfg.memory_limit = 0; /* derived from the limits */
    nq_queue_t *q = NULL;
    int rc = nq_queue_new(&cfg, &q);
    if (rc < 0)
        fprintf(stderr, "nq_queue_new: %s\n", nq_strerror(rc));
    return q;
}

static void on_wait(void *data, int status, int64_t arg) {
    (void)data;
    (void)arg;
    if (status == 0)
        st.callbacks++;
}

/* --- the measured functions -------------------------------------------- */

void measure_nq_notify_sub(long n);
void measure_nq_notify_none(long n);
void measure_nq_notify_conflated(long n);
void measure_nq_notify_port_wait(long n);
void measure_uv_async_mutex(long n);
void measure_ev_async_mutex(long n);
void measure_eventfd_mutex(long n);
void measure_mutex_condvar(long n);

NOINLINE void measure_nq_notify_sub(long n) {
    nq_queue_t *q = st.q;
    nq_handle_t h = st.h;
    for (long i = 0; i < n; i++)
        nq_notify(q, h, i);
}

NOINLINE void measure_nq_notify_none(long n) {
    nq_queue_t *q = st.q;
    nq_handle_t h = st.h;
    for (long i = 0; i < n; i++)
        nq_notify(q, h, i);
}

NOINLINE void measure_nq_notify_conflated(long n) {
    nq_queue_t *q = st.q;
    nq_handle_t h = st.h;
    for (long i = 0; i < n; i++)
        nq_notify(q, h, i);
}

NOINLINE void measure_nq_notify_port_wait(long n) {
    nq_queue_t *q = st.q;
    const nq_handle_t *hs = st.hs;
    for (long i = 0; i < n; i++)
        nq_notify(q, hs[i], i);
}

NOINLINE void measure_uv_async_mutex(long n) {
    for (long i = 0; i < n; i++) {
        mq_push(&nodes[i], i);
        uv_async_send(&st.uva);
    }
}

NOINLINE void measure_ev_async_mutex(long n) {
    for (long i = 0; i < n; i++) {
        mq_push(&nodes[i], i);
        ev_async_send(st.evloop, &st.eva);
    }
}

NOINLINE void measure_eventfd_mutex(long n) {
    const uint64_t one = 1;
    for (long i = 0; i < n; i++) {
        mq_push(&nodes[i], i);
        if (write(st.efd, &one, sizeof(one)) != (ssize_t)sizeof(one))
            abort();
    }
}

NOINLINE void measure_mutex_condvar(long n) {
    for (long i = 0; i < n; i++) {
        pthread_mutex_lock(&mq.mu);
        mq_push_locked(&nodes[i], i);
        pthread_cond_signal(&mq.cv);
        pthread_mutex_unlock(&mq.mu);
    }
}

/* --- setup (before) and checks (after) ----------------------------------- */

/* Each returns 0 (or -1 on a setup failure); warm-up included. */

static int setup_sub(long n) {
    if ((st.q = new_queue(0, (uint32_t)n + 1)) == NULL || nq_register(st.q, NULL, &st.h) < 0)
        return -1;
    nq_sub_opts_t so;
    memset(&so, 0, sizeof(so));
    so.capacity = (uint32_t)n + 1; /* room for the warm-up and every notify */
    if (nq_subscribe(st.q, st.h, &so, &st.sub) < 0)
        return -1;
    return nq_notify(st.q, st.h, -1) == 1 ? 0 : -1; /* empty -> non-empty */
}

static int check_sub(long n) {
    int64_t *args = malloc(((size_t)n + 1) * sizeof(*args));
    int k = args != NULL ? nq_sub_recv_batch(st.sub, args, (size_t)n + 1) : -1;
    int ok = k == (int)n + 1 && nq_sub_dropped(st.sub) == 0 && args[n] == n - 1;
    free(args);
    nq_sub_close(st.sub);
    nq_queue_free(st.q);
    return ok;
}

static int setup_none(long n) {
    (void)n;
    if ((st.q = new_queue(0, 0)) == NULL || nq_register(st.q, NULL, &st.h) < 0)
        return -1;
    return nq_notify(st.q, st.h, -1) == 0 ? 0 : -1;
}

static int check_seq(long n) {
    uint64_t seq = 0;
    int ok = nq_seq(st.q, st.h, &seq) == 0 && seq == (uint64_t)n + 1;
    return ok;
}

static int check_none(long n) {
    int ok = check_seq(n);
    nq_queue_free(st.q);
    return ok;
}

static int setup_conflated(long n) {
    (void)n;
    if ((st.q = new_queue(0, 0)) == NULL || nq_register(st.q, NULL, &st.h) < 0 ||
        nq_port_new(&st.port) < 0 ||
        nq_port_wait(st.port, st.q, st.h, 0, -1, on_wait, NULL, NULL) < 0)
        return -1;
    return nq_notify(st.q, st.h, -1) == 1 ? 0 : -1; /* completes the wait */
}

static int check_conflated(long n) {
    int ok = check_seq(n);
    nq_port_dispatch(st.port, 0);
    ok = ok && st.callbacks == 1;
    nq_port_free(st.port);
    nq_queue_free(st.q);
    return ok;
}

static int setup_port_wait(long n) {
    if ((st.q = new_queue((uint32_t)n + 1, 0)) == NULL ||
        nq_port_new_sized((uint32_t)n + 1, &st.port) < 0)
        return -1;
    st.hs = malloc(((size_t)n + 1) * sizeof(*st.hs));
    if (st.hs == NULL)
        return -1;
    for (long i = 0; i <= n; i++)
        if (nq_register(st.q, NULL, &st.hs[i]) < 0 ||
            nq_port_wait(st.port, st.q, st.hs[i], 0, -1, on_wait, NULL, NULL) < 0)
            return -1;
    /* Warm-up on the last handle: the port's one eventfd write. */
    return nq_notify(st.q, st.hs[n], -1) == 1 ? 0 : -1;
}

static int check_port_wait(long n) {
    nq_port_dispatch(st.port, 0);
    nq_port_stats_t ps;
    nq_port_stats(st.port, &ps);
    int ok = st.callbacks == n + 1 && ps.efd_writes == 1;
    nq_port_free(st.port);
    nq_queue_free(st.q);
    free(st.hs);
    return ok;
}

static void uv_on_async(uv_async_t *a) {
    (void)a;
    st.callbacks++;
}

static int setup_uv(long n) {
    if (mq_setup(n) < 0 || uv_loop_init(&st.uvloop) < 0 ||
        uv_async_init(&st.uvloop, &st.uva, uv_on_async) < 0)
        return -1;
    mq_push(&nodes[n], -1);
    return uv_async_send(&st.uva);
}

static int check_uv(long n) {
    uv_run(&st.uvloop, UV_RUN_NOWAIT); /* one callback for them all */
    int ok = st.callbacks == 1 && mq.len == n + 1;
    uv_close((uv_handle_t *)&st.uva, NULL);
    uv_run(&st.uvloop, UV_RUN_DEFAULT);
    uv_loop_close(&st.uvloop);
    return ok;
}

static void ev_on_async(struct ev_loop *loop, ev_async *w, int revents) {
    (void)loop;
    (void)w;
    (void)revents;
    st.callbacks++;
}

static int setup_ev(long n) {
    if (mq_setup(n) < 0 || (st.evloop = ev_loop_new(EVFLAG_AUTO)) == NULL)
        return -1;
    ev_async_init(&st.eva, ev_on_async);
    ev_async_start(st.evloop, &st.eva);
    mq_push(&nodes[n], -1);
    ev_async_send(st.evloop, &st.eva);
    return 0;
}

static int check_ev(long n) {
    ev_run(st.evloop, EVRUN_NOWAIT);
    int ok = st.callbacks == 1 && mq.len == n + 1;
    ev_async_stop(st.evloop, &st.eva);
    ev_loop_destroy(st.evloop);
    return ok;
}

static int setup_efd(long n) {
    if (mq_setup(n) < 0 || (st.efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
        return -1;
    const uint64_t one = 1;
    mq_push(&nodes[n], -1);
    return write(st.efd, &one, sizeof(one)) == (ssize_t)sizeof(one) ? 0 : -1;
}

static int check_efd(long n) {
    uint64_t v = 0;
    int ok = read(st.efd, &v, sizeof(v)) == (ssize_t)sizeof(v) && v == (uint64_t)n + 1 &&
             mq.len == n + 1;
    close(st.efd);
    return ok;
}

static int setup_cv(long n) {
    if (mq_setup(n) < 0)
        return -1;
    pthread_mutex_lock(&mq.mu);
    mq_push_locked(&nodes[n], -1);
    pthread_cond_signal(&mq.cv);
    pthread_mutex_unlock(&mq.mu);
    return 0;
}

static int check_cv(long n) {
    return mq.len == n + 1;
}

typedef struct instr_case {
    const char *name;
    int (*setup)(long n);
    void (*measure)(long n);
    int (*check)(long n);
} instr_case_t;

static const instr_case_t CASES[] = {
    {"nq_notify_sub", setup_sub, measure_nq_notify_sub, check_sub},
    {"nq_notify_none", setup_none, measure_nq_notify_none, check_none},
    {"nq_notify_conflated", setup_conflated, measure_nq_notify_conflated, check_conflated},
    {"nq_notify_port_wait", setup_port_wait, measure_nq_notify_port_wait, check_port_wait},
    {"uv_async_mutex", setup_uv, measure_uv_async_mutex, check_uv},
    {"ev_async_mutex", setup_ev, measure_ev_async_mutex, check_ev},
    {"eventfd_mutex", setup_efd, measure_eventfd_mutex, check_efd},
    {"mutex_condvar", setup_cv, measure_mutex_condvar, check_cv},
};
#define NCASES (sizeof(CASES) / sizeof(CASES[0]))

static void usage(const char *prog) {
    fprintf(stderr, "usage: %s --case NAME [--n N]\n       %s --list\ncases:\n", prog, prog);
    for (size_t i = 0; i < NCASES; i++)
        fprintf(stderr, "  %s\n", CASES[i].name);
}

int main(int argc, char **argv) {
    const char *name = NULL;
    long n = 100000;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--case") == 0 && i + 1 < argc) {
            name = argv[++i];
        } else if (strcmp(argv[i], "--n") == 0 && i + 1 < argc) {
            n = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--list") == 0) {
            for (size_t k = 0; k < NCASES; k++)
                puts(CASES[k].name);
            return 0;
        } else {
            usage(argv[0]);
            return 2;
        }
    }
    const instr_case_t *c = NULL;
    for (size_t k = 0; name != NULL && k < NCASES; k++)
        if (strcmp(CASES[k].name, name) == 0)
            c = &CASES[k];
    if (c == NULL || n < 1 || n > (1L << 22)) {
        usage(argv[0]);
        return 2;
    }
    if (c->setup(n) < 0) {
        fprintf(stderr, "%s: setup failed\n", c->name);
        return 1;
    }
    int64_t t0 = h_now_ns();
    c->measure(n);
    int64_t t1 = h_now_ns();
    int ok = c->check(n);
    free(nodes);
    printf("{\"program\":\"cmp_instr\",\"case\":\"%s\",\"n\":%ld,\"ns_per_op\":%.2f,"
           "\"ok\":%s}\n",
           c->name, n, (double)(t1 - t0) / (double)n, ok ? "true" : "false");
    return ok ? 0 : 1;
}
