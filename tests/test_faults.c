/* Criterion suite "faults": faults injected through the core's ops table
 * (src/core/ops.h) and the allocation countdown (nq__alloc_fail_at).
 *
 * - Allocation-failure sweep: each API scenario (queue, waits, subscriptions,
 *   ports, port waits and subscriptions, the event queue) runs once for every
 *   k with its k-th allocation failing: every failure is NQ_ENOMEM from the
 *   call that allocated, nothing crashes, and after the scenario's cleanup no
 *   allocation is left live (counted through the ops table in every build;
 *   the ASan build's LeakSanitizer checks the same).
 * - Out of descriptors: nq_port_new under a real RLIMIT_NOFILE with no fd
 *   free (in a child) and with an injected EMFILE/ENFILE: NQ_ESYS with errno
 *   saying why, no fd and no memory leaked (/proc/self/fd counted).
 * - eventfd saturation: a port whose counter another writer brought to its
 *   limit (0xfffffffffffffffe) still delivers the wake-up; a write that
 *   fails with EINTR is retried.
 * - EINTR storm: SIGALRM at 1 kHz (setitimer, no SA_RESTART) during timed
 *   nq_wait, nq_sub_recv, nq_evq_wait and port waits in an epoll loop: no
 *   error, never early, overshoot bounded; figures printed.
 * - The clock and the futex through the table: a clock that jumps forward
 *   expires deadlines; a futex refused (ENOSYS, as under seccomp) is
 *   NQ_ESYS, not a hang.
 * Figures are printed as TAP comments ("# ...").
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "nq.h"
#include "nqtest.h"
#include "core/internal.h"
#include "core/ops.h"

#define MS (int64_t)1000000
#ifdef NQT_TSAN
#define NQT_TSAN_OR_0 1
#else
#define NQT_TSAN_OR_0 0
#endif

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("# ");
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
}

/* --- counting allocator, through the ops table --------------------------- */

static nq__ops_t real; /* the table before the test replaced entries */
static atomic_long live_allocs;

static void *cnt_malloc(size_t n) {
    void *p = real.malloc(n);
    if (p != NULL)
        atomic_fetch_add(&live_allocs, 1);
    return p;
}
static void *cnt_calloc(size_t n, size_t s) {
    void *p = real.calloc(n, s);
    if (p != NULL)
        atomic_fetch_add(&live_allocs, 1);
    return p;
}
static void *cnt_aligned_alloc(size_t a, size_t n) {
    void *p = real.aligned_alloc(a, n);
    if (p != NULL)
        atomic_fetch_add(&live_allocs, 1);
    return p;
}
static void cnt_free(void *p) {
    atomic_fetch_sub(&live_allocs, 1);
    real.free(p);
}

static void count_allocations(void) {
    nq__ops_t o;
    nq__ops_set(NULL, &real);
    o = real;
    o.malloc = cnt_malloc;
    o.calloc = cnt_calloc;
    o.aligned_alloc = cnt_aligned_alloc;
    o.free = cnt_free;
    nq__ops_set(&o, NULL);
    atomic_store(&live_allocs, 0);
}

/* --- the scenarios of the allocation sweep ------------------------------- */
/* Each creates what it needs, uses it, and frees everything, whatever step
 * failed. It returns 0, the first error code, or -1 when a step that
 * succeeded did not do what it should (the sweep asserts that never). */

#define TRY(expr)                                                                          \
    do {                                                                                   \
        rc = (expr);                                                                       \
        if (rc < 0)                                                                        \
            goto out;                                                                      \
    } while (0)
#define CHECK(c)                                                                           \
    do {                                                                                   \
        if (!(c)) {                                                                        \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, #c);                        \
            rc = -1;                                                                       \
            goto out;                                                                      \
        }                                                                                  \
    } while (0)

static int sc_queue(void) {
    nq_queue_t *q = NULL;
    nq_handle_t h[3];
    int rc;
    TRY(nq_queue_new(NULL, &q));
    for (int i = 0; i < 3; i++)
        TRY(nq_register(q, "a hint to copy", &h[i]));
    TRY(nq_notify(q, h[1], 1));
    TRY(nq_unregister(q, h[1]));
    TRY(nq_register(q, NULL, &h[1])); /* reuses the slot */
    rc = 0;
out:
    nq_queue_free(q);
    return rc;
}

static int sc_waits(void) {
    nq_queue_t *q = NULL;
    nq_handle_t h;
    nq_wait_t *w1 = NULL, *w2 = NULL;
    int64_t arg = 0;
    int rc;
    TRY(nq_queue_new(NULL, &q));
    TRY(nq_register(q, "w", &h));
    TRY(nq_wait_start(q, h, NQ_SEQ_NEXT, (nq_waker_t){NULL, NULL}, &w1));
    TRY(nq_wait_start(q, h, NQ_SEQ_NEXT, (nq_waker_t){NULL, NULL}, &w2));
    TRY(nq_notify(q, h, 5));
    CHECK(nq_wait_result(w1, &arg) == 0 && arg == 5);
    /* nq_wait: the wait lives on the stack; the handle is past seq 0. */
    CHECK(nq_wait(q, h, 0, 0, &arg) == 0 && arg == 5);
    CHECK(nq_wait(q, h, NQ_SEQ_NEXT, 0, NULL) == NQ_ETIMEDOUT);
    rc = 0;
out:
    nq_wait_release(w1);
    nq_wait_release(w2);
    nq_queue_free(q); /* before or after the releases: both are allowed */
    return rc;
}

static int sc_subs(void) {
    nq_queue_t *q = NULL;
    nq_handle_t h = 0;
    nq_sub_t *s[12] = {0};
    int rc;
    TRY(nq_queue_new(NULL, &q));
    TRY(nq_register(q, "subs", &h));
    for (int i = 0; i < 12; i++) { /* enough to grow the handle's array */
        nq_sub_opts_t o = {.capacity = 4, .overflow = NQ_DROP_OLDEST, .debug_hint = "sub"};
        TRY(nq_subscribe(q, h, &o, &s[i]));
    }
    TRY(nq_notify(q, h, 9));
    for (int i = 0; i < 12; i++) {
        int64_t a = 0;
        CHECK(nq_sub_try_recv(s[i], &a) == 0 && a == 9);
    }
    nq_sub_close(s[3]);
    s[3] = NULL;
    TRY(nq_unregister(q, h)); /* the rest are closed by their handle */
    rc = 0;
out:
    for (int i = 0; i < 12; i++)
        if (i % 2 == 0)
            nq_sub_close(s[i]);
    nq_queue_free(q);
    for (int i = 0; i < 12; i++)
        if (i % 2 == 1)
            nq_sub_close(s[i]); /* after the queue: allowed, it keeps memory */
    return rc;
}

static int port_calls, port_last_status;
static void on_port_wait(void *data, int status, int64_t arg) {
    (void)data;
    (void)arg;
    port_calls++;
    port_last_status = status;
}
static void on_port_sub(nq_sub_t *s, void *data) {
    (void)data;
    int64_t a;
    while (nq_sub_try_recv(s, &a) == 0)
        port_calls++;
}

static int sc_port(void) {
    nq_queue_t *q = NULL;
    nq_port_t *p = NULL;
    nq_handle_t h;
    nq_wait_t *w = NULL;
    nq_sub_t *s = NULL;
    int rc;
    port_calls = 0;
    TRY(nq_queue_new(NULL, &q));
    TRY(nq_register(q, "port", &h));
    TRY(nq_port_new_sized(8, &p));
    TRY(nq_port_wait(p, q, h, NQ_SEQ_NEXT, 10000, on_port_wait, NULL, &w));
    TRY(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, on_port_wait, NULL, NULL));
    nq_sub_opts_t o = {.capacity = 4};
    TRY(nq_port_subscribe(p, q, h, &o, on_port_sub, NULL, &s));
    TRY(nq_port_subscribe(p, q, h, &o, on_port_sub, NULL, NULL)); /* port-owned */
    TRY(nq_notify(q, h, 1));
    TRY(nq_port_dispatch(p, 0));
    CHECK(port_calls == 4);
    /* left pending for nq_port_free: a wait with a deadline, a sub */
    TRY(nq_port_wait(p, q, h, NQ_SEQ_NEXT, 10000, on_port_wait, NULL, NULL));
    rc = 0;
out:
    nq_wait_release(w);
    nq_sub_close(s);
    nq_port_free(p);
    nq_queue_free(q);
    return rc;
}

static int sc_evq(void) {
    nq_evq_t *e = NULL;
    uint32_t out[4];
    int rc;
    TRY(nq_evq_new(100, &e));
    TRY(nq_evq_notify(e, 7));
    CHECK(nq_evq_poll(e, out, 4) == 1 && out[0] == 7);
    rc = 0;
out:
    nq_evq_free(e);
    return rc;
}

static const struct {
    const char *name;
    int (*run)(void);
} scenarios[] = {
    {"queue_new, register with hint, notify, unregister", sc_queue},
    {"wait_start, nq_wait", sc_waits},
    {"subscribe x12, unregister, close", sc_subs},
    {"port_new, port_wait, port_subscribe, dispatch, port_free", sc_port},
    {"evq_new", sc_evq},
};
#define NSCEN (sizeof(scenarios) / sizeof(scenarios[0]))

Test(faults, allocation_failure_sweep) {
    count_allocations();
    long faults = 0, leaked = 0;
    for (size_t i = 0; i < NSCEN; i++) {
        int k;
        for (k = 1;; k++) {
            cr_assert_lt(k, 1000, "%s: still failing at allocation %d", scenarios[i].name, k);
            nq__alloc_fail_at(k, 0);
            int rc = scenarios[i].run();
            long failed = nq__alloc_fail_at(0, 0);
            long live = atomic_load(&live_allocs);
            leaked += live;
            cr_assert_eq(live, 0, "%s, allocation %d failing: %ld allocations left live",
                         scenarios[i].name, k, live);
            cr_assert_neq(rc, -1, "%s, allocation %d failing: a step misbehaved",
                          scenarios[i].name, k);
            if (failed == 0) {
                cr_assert_eq(rc, 0, "%s: %s with no allocation failing", scenarios[i].name,
                             nq_err_name(rc));
                break;
            }
            cr_assert_eq(failed, 1);
            cr_assert_eq(rc, NQ_ENOMEM, "%s, allocation %d failing: %s", scenarios[i].name, k,
                         nq_err_name(rc));
            faults++;
        }
        say("alloc sweep: %-58s %3d allocations, each failed once", scenarios[i].name, k - 1);
        cr_assert_gt(k, 1, "%s allocates nothing?", scenarios[i].name);
    }
    nq__ops_set(&real, NULL);
    say("alloc sweep: %zu scenarios, %ld faults injected, leaks %ld", NSCEN, faults, leaked);
}

/* --- out of descriptors --------------------------------------------------- */

static int count_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the directory's own fd */
}

/* In a child: lower RLIMIT_NOFILE to the lowest free fd, so no descriptor
 * can be opened, and create ports. Exit codes name the check that failed. */
static int emfile_child(void) {
    count_allocations();
    int before = count_fds();
    int lowest = dup(0);
    if (before < 0 || lowest < 0)
        return 10;
    close(lowest);
    struct rlimit old, rl;
    getrlimit(RLIMIT_NOFILE, &old);
    rl = old;
    rl.rlim_cur = (rlim_t)lowest;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 11;
    int rcs[3], errs[3];
    for (int i = 0; i < 3; i++) {
        nq_port_t *p = (nq_port_t *)1;
        errno = 0;
        rcs[i] = nq_port_new(&p);
        errs[i] = errno;
        if (p != NULL)
            return 12;
    }
    setrlimit(RLIMIT_NOFILE, &old);
    int after = count_fds();
    say("out of fds: nq_port_new -> %s \"%s\", errno %s \"%s\"; fds %d before, %d after; "
        "allocations live %ld",
        nq_err_name(rcs[0]), nq_strerror(rcs[0]), errs[0] == EMFILE ? "EMFILE" : "?",
        strerror(errs[0]), before, after, atomic_load(&live_allocs));
    for (int i = 0; i < 3; i++)
        if (rcs[i] != NQ_ESYS || errs[i] != EMFILE)
            return 13;
    if (after != before)
        return 14;
    if (atomic_load(&live_allocs) != 0)
        return 15;
    /* With descriptors again, a port works. */
    nq_port_t *p;
    if (nq_port_new(&p) != 0)
        return 16;
    nq_port_free(p);
    return 0;
}

Test(faults, out_of_descriptors_at_port_creation) {
    fflush(stdout);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0)
        _exit(emfile_child());
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFEXITED(st), "child died");
    cr_assert_eq(WEXITSTATUS(st), 0, "child failed check %d", WEXITSTATUS(st));
}

static int inject_errno;
static int fail_eventfd(unsigned v, int flags) {
    (void)v;
    (void)flags;
    errno = inject_errno;
    return -1;
}

Test(faults, eventfd_failure_is_reported_with_errno) {
    count_allocations();
    nq__ops_t o = real;
    o.eventfd = fail_eventfd;
    const int errs[] = {EMFILE, ENFILE, ENODEV};
    int before = count_fds();
    for (size_t i = 0; i < 3; i++) {
        inject_errno = errs[i];
        nq__ops_set(&o, NULL);
        nq_port_t *p = (nq_port_t *)1;
        errno = 0;
        int rc = nq_port_new(&p);
        int e = errno;
        nq__ops_set(&real, NULL);
        cr_assert_eq(rc, NQ_ESYS);
        cr_assert_eq(e, errs[i], "errno %d, not %d: the reason was lost", e, errs[i]);
        cr_assert_null(p);
        cr_assert_eq(atomic_load(&live_allocs), 0, "memory leaked on eventfd failure");
    }
    cr_assert_eq(count_fds(), before);
    say("eventfd failing (EMFILE, ENFILE, ENODEV injected): NQ_ESYS with that errno, "
        "leaks 0, fds %d -> %d",
        before, count_fds());
}

/* --- eventfd saturation ---------------------------------------------------- */

static atomic_long writes_eagain, writes_eintr_injected, writes_total;
static atomic_int eintr_to_inject;
static ssize_t watch_write(int fd, const void *b, size_t n) {
    atomic_fetch_add(&writes_total, 1);
    if (atomic_load(&eintr_to_inject) > 0) {
        atomic_fetch_sub(&eintr_to_inject, 1);
        atomic_fetch_add(&writes_eintr_injected, 1);
        errno = EINTR;
        return -1;
    }
    ssize_t r = real.write(fd, b, n);
    if (r < 0 && errno == EAGAIN)
        atomic_fetch_add(&writes_eagain, 1);
    return r;
}

static int readable(int fd) {
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    return poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN);
}

/* One port wait, notified: is the wake-up observed and the callback run? */
static void one_wakeup(nq_port_t *p, nq_queue_t *q, nq_handle_t h, int64_t arg) {
    port_calls = 0;
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, on_port_wait, NULL, NULL), 0);
    cr_assert_eq(nq_notify(q, h, arg), 1);
    cr_assert(readable(nq_port_fd(p)), "the wake-up was lost: the fd is not readable");
    cr_assert_eq(nq_port_dispatch(p, 0), 1);
    cr_assert_eq(port_calls, 1);
    cr_assert_eq(port_last_status, 0);
}

Test(faults, eventfd_counter_near_saturation) {
    nq__ops_set(NULL, &real);
    nq__ops_t o = real;
    o.write = watch_write;
    nq__ops_set(&o, NULL);
    nq_queue_t *q;
    nq_handle_t h;
    nq_port_t *p;
    cr_assert_eq(nq_queue_new(NULL, &q), 0);
    cr_assert_eq(nq_register(q, "sat", &h), 0);
    cr_assert_eq(nq_port_new_sized(4, &p), 0);
    /* Someone else (it has the fd: nq_port_fd) fills the counter. */
    uint64_t big = 0xfffffffffffffffeull;
    cr_assert_eq(write(nq_port_fd(p), &big, sizeof(big)), (ssize_t)sizeof(big));
    one_wakeup(p, q, h, 1);
    cr_assert_geq(atomic_load(&writes_eagain), 1, "the port's write was not refused: "
                                                  "the counter was not at its limit");
    cr_assert(!readable(nq_port_fd(p)), "dispatch did not clear the saturated counter");
    /* And the next cycle writes again, normally. */
    long eagain = atomic_load(&writes_eagain);
    one_wakeup(p, q, h, 2);
    cr_assert_eq(atomic_load(&writes_eagain), eagain);
    /* A write interrupted (EINTR, injected: a non-blocking eventfd does not
     * really return it) is retried, so the wake-up is not lost. */
    atomic_store(&eintr_to_inject, 2);
    one_wakeup(p, q, h, 3);
    cr_assert_eq(atomic_load(&writes_eintr_injected), 2);
    say("eventfd saturation: counter at 0xfffffffffffffffe, %ld write(s) refused EAGAIN, "
        "wake-up observed; %ld EINTR injected and retried; %ld writes in all",
        atomic_load(&writes_eagain), atomic_load(&writes_eintr_injected),
        atomic_load(&writes_total));
    nq_port_free(p);
    nq_queue_free(q);
    nq__ops_set(&real, NULL);
}

/* --- EINTR storm ------------------------------------------------------------ */

static atomic_long alarms, futex_calls, futex_eintr;
static void on_alarm(int sig) {
    (void)sig;
    atomic_fetch_add(&alarms, 1);
}
static long watch_futex(unsigned *u, int op, unsigned v, const struct timespec *ts,
                        unsigned bitset) {
    atomic_fetch_add(&futex_calls, 1);
    long r = real.futex(u, op, v, ts, bitset);
    if (r < 0 && errno == EINTR)
        atomic_fetch_add(&futex_eintr, 1);
    return r;
}

static struct sigaction storm_old_sa;
static struct itimerval storm_old_it;
static int64_t storm_t0;

static void storm_start(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_alarm;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: interrupted calls fail with EINTR */
    cr_assert_eq(sigaction(SIGALRM, &sa, &storm_old_sa), 0);
    struct itimerval it = {{0, 1000}, {0, 1000}}; /* 1 kHz */
    storm_t0 = now_ns();
    cr_assert_eq(setitimer(ITIMER_REAL, &it, &storm_old_it), 0);
}

static void storm_stop(void) {
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    sigaction(SIGALRM, &storm_old_sa, NULL);
    /* Give back a runner's own alarm (its test timeout), less the time spent. */
    if (storm_old_it.it_value.tv_sec != 0 || storm_old_it.it_value.tv_usec != 0) {
        int64_t left = (int64_t)storm_old_it.it_value.tv_sec * 1000000 +
                       storm_old_it.it_value.tv_usec - (now_ns() - storm_t0) / 1000;
        if (left < 1000000)
            left = 1000000;
        storm_old_it.it_value.tv_sec = left / 1000000;
        storm_old_it.it_value.tv_usec = left % 1000000;
        setitimer(ITIMER_REAL, &storm_old_it, NULL);
    }
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* A port wait on a raw epoll loop that retries epoll_wait on EINTR, as
 * loops do; returns the callback's status. */
static long epoll_eintr;
static int port_wait_in_loop(nq_port_t *p, int epfd, nq_queue_t *q, nq_handle_t h,
                             int64_t timeout_ms) {
    port_calls = 0;
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, timeout_ms, on_port_wait, NULL, NULL), 0);
    while (port_calls == 0) {
        int64_t t = nq_port_timeout_ms(p);
        struct epoll_event ev;
        int n = epoll_wait(epfd, &ev, 1, t > INT_MAX ? INT_MAX : (int)t);
        if (n < 0) {
            cr_assert_eq(errno, EINTR);
            epoll_eintr++;
            continue;
        }
        cr_assert_geq(nq_port_dispatch(p, 0), 0);
    }
    return port_last_status;
}

struct late {
    nq_queue_t *q;
    nq_handle_t h;
    nq_evq_t *e;
    int64_t delay_ns;
};
static void *late_notifier(void *arg) {
    struct late *l = arg;
    struct timespec ts = {0, (long)l->delay_ns};
    while (nanosleep(&ts, &ts) != 0) {
    }
    if (l->e != NULL)
        nq_evq_notify(l->e, 3);
    else
        nq_notify(l->q, l->h, 77);
    return NULL;
}
/* Starts a notifier that fires after delay_ns; SIGALRM stays with us. */
static pthread_t start_late(struct late *l) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, late_notifier, l), 0);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return t;
}

enum { K_WAIT, K_SUB, K_EVQ, K_PORT, NKINDS };
static const char *const kind_name[NKINDS] = {"nq_wait", "nq_sub_recv", "nq_evq_wait",
                                              "port wait"};

Test(faults, eintr_storm_during_timed_waits, .timeout = 60) {
    nq__ops_set(NULL, &real);
    nq__ops_t o = real;
    o.futex = watch_futex;
    nq__ops_set(&o, NULL);
    nq_queue_t *q;
    nq_handle_t h;
    nq_sub_t *s;
    nq_evq_t *e;
    nq_port_t *p;
    cr_assert_eq(nq_queue_new(NULL, &q), 0);
    cr_assert_eq(nq_register(q, "storm", &h), 0);
    nq_sub_opts_t so = {.capacity = 8};
    cr_assert_eq(nq_subscribe(q, h, &so, &s), 0);
    cr_assert_eq(nq_evq_new(16, &e), 0);
    cr_assert_eq(nq_port_new_sized(16, &p), 0);
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN};
    cr_assert_eq(epoll_ctl(epfd, EPOLL_CTL_ADD, nq_port_fd(p), &ev), 0);

    const int iters = SCALE(40);
    const int64_t timeout_ms = 4;
    /* p99 of the overshoots against bound, the largest against 10x that: a
     * wait that restarted its timeout or lost time on each interruption is
     * late every time, while one wait descheduled for a long moment on a
     * loaded machine (seen: 58 and 68 ms, other tests on both vCPUs) is
     * late once. */
    const int64_t bound = (NQT_TSAN_OR_0 ? 250 : 50) * MS;
    int64_t *over = calloc((size_t)iters * NKINDS, sizeof(int64_t));
    int64_t kmax[NKINDS] = {0};
    int n = 0, completed = 0;
    cr_assert_not_null(over);

    storm_start();
    for (int i = 0; i < iters; i++) {
        for (int k = 0; k < NKINDS; k++) {
            int64_t arg;
            uint32_t tok;
            int rc;
            int64_t t0 = now_ns();
            switch (k) {
            case K_WAIT: rc = nq_wait(q, h, NQ_SEQ_NEXT, timeout_ms * MS, &arg); break;
            case K_SUB: rc = nq_sub_recv(s, timeout_ms * MS, &arg); break;
            case K_EVQ: rc = nq_evq_wait(e, &tok, 1, timeout_ms * MS); break;
            default: rc = port_wait_in_loop(p, epfd, q, h, timeout_ms); break;
            }
            int64_t el = now_ns() - t0;
            cr_assert_eq(rc, NQ_ETIMEDOUT, "%s under the storm: %s", kind_name[k],
                         nq_err_name(rc));
            cr_assert_geq(el, timeout_ms * MS, "%s returned early: %.3f ms of %lld",
                          kind_name[k], el / 1e6, (long long)timeout_ms);
            over[n++] = el - timeout_ms * MS;
            if (el - timeout_ms * MS > kmax[k])
                kmax[k] = el - timeout_ms * MS;
        }
        /* And a wait that a notification completes amid the storm: 0, the
         * arg, never an error. */
        if (i % 8 == 0) {
            for (int k = 0; k < NKINDS; k++) {
                struct late l = {q, h, k == K_EVQ ? e : NULL, 3 * MS};
                pthread_t t = start_late(&l);
                int64_t arg = 0;
                uint32_t tok = 0;
                int rc;
                switch (k) {
                case K_WAIT: rc = nq_wait(q, h, NQ_SEQ_NEXT, 5000 * MS, &arg); break;
                case K_SUB: rc = nq_sub_recv(s, 5000 * MS, &arg); break;
                case K_EVQ: rc = nq_evq_wait(e, &tok, 1, 5000 * MS); break;
                default: rc = port_wait_in_loop(p, epfd, q, h, 5000); break;
                }
                pthread_join(t, NULL);
                cr_assert_eq(rc, k == K_EVQ ? 1 : 0, "%s completed amid the storm: %s",
                             kind_name[k], nq_err_name(rc));
                cr_assert(k == K_EVQ ? tok == 3 : k == K_PORT || arg == 77);
                /* the other receivers of the same notify: drain them */
                while (nq_sub_try_recv(s, &arg) == 0) {
                }
                completed++;
            }
        }
    }
    storm_stop();

    qsort(over, (size_t)n, sizeof(int64_t), cmp64);
    int64_t p99 = over[(size_t)(n - 1) * 99 / 100], mx = over[n - 1];
    say("EINTR storm: %ld SIGALRM at 1 kHz, %ld of %ld futex calls interrupted (EINTR), "
        "%ld epoll_wait EINTR; %d timed waits of %lld ms (%d each of %s, %s, %s, %s) and %d "
        "notified ones: 0 errors, 0 early",
        atomic_load(&alarms), atomic_load(&futex_eintr), atomic_load(&futex_calls),
        epoll_eintr, n, (long long)timeout_ms, iters, kind_name[0], kind_name[1],
        kind_name[2], kind_name[3], completed);
    say("EINTR storm: overshoot p50 %.3f ms, p99 %.3f ms (bound %.0f ms), max %.3f ms (bound "
        "x10); max per kind: wait %.3f, sub %.3f, evq %.3f, port %.3f ms",
        over[n / 2] / 1e6, p99 / 1e6, bound / 1e6, mx / 1e6, kmax[0] / 1e6, kmax[1] / 1e6,
        kmax[2] / 1e6, kmax[3] / 1e6);
    /* About one per millisecond waited: at least one per timed wait. */
    cr_assert_geq(atomic_load(&alarms), n, "the storm did not happen: %ld alarms",
                  atomic_load(&alarms));
    if (!NQT_TSAN_OR_0)
        cr_assert_gt(atomic_load(&futex_eintr), 0, "no futex wait was interrupted: the storm "
                                                   "missed the waits");
    cr_assert_lt(p99, bound, "overshoot p99 %.3f ms", p99 / 1e6);
    cr_assert_lt(mx, 10 * bound, "overshoot %.3f ms", mx / 1e6);
    free(over);
    close(epfd);
    nq_port_free(p);
    nq_evq_free(e);
    nq_sub_close(s);
    nq_queue_free(q);
    nq__ops_set(&real, NULL);
}

/* --- clock and futex through the table ------------------------------------ */

static atomic_llong clock_offset_ns;
static int jumpy_clock(clockid_t c, struct timespec *ts) {
    int r = real.clock_gettime(c, ts);
    long long t = (long long)ts->tv_sec * 1000000000 + ts->tv_nsec + atomic_load(&clock_offset_ns);
    ts->tv_sec = (time_t)(t / 1000000000);
    ts->tv_nsec = (long)(t % 1000000000);
    return r;
}

Test(faults, clock_jump_expires_port_deadlines) {
    nq__ops_set(NULL, &real);
    nq__ops_t o = real;
    o.clock_gettime = jumpy_clock;
    nq__ops_set(&o, NULL);
    nq_queue_t *q;
    nq_handle_t h;
    nq_port_t *p;
    cr_assert_eq(nq_queue_new(NULL, &q), 0);
    cr_assert_eq(nq_register(q, "clock", &h), 0);
    cr_assert_eq(nq_port_new_sized(4, &p), 0);
    port_calls = 0;
    cr_assert_eq(nq_port_wait(p, q, h, NQ_SEQ_NEXT, 3600 * 1000, on_port_wait, NULL, NULL), 0);
    int64_t t = nq_port_timeout_ms(p);
    cr_assert(t > 3599 * 1000 && t <= 3600 * 1000, "timeout %lld ms", (long long)t);
    cr_assert_eq(nq_port_dispatch(p, 0), 0);
    atomic_store(&clock_offset_ns, 3601LL * 1000000000); /* an hour passes */
    cr_assert_eq(nq_port_timeout_ms(p), 0);
    cr_assert_eq(nq_port_dispatch(p, 0), 1);
    cr_assert_eq(port_calls, 1);
    cr_assert_eq(port_last_status, NQ_ETIMEDOUT);
    say("clock through the ops table: a 1 h port wait expired when the clock jumped 1 h");
    nq_port_free(p);
    nq_queue_free(q);
    nq__ops_set(&real, NULL);
}

static long enosys_futex(unsigned *u, int op, unsigned v, const struct timespec *ts,
                         unsigned bitset) {
    (void)u, (void)op, (void)v, (void)ts, (void)bitset;
    errno = ENOSYS;
    return -1;
}

Test(faults, futex_refused_is_nq_esys) {
    nq__ops_set(NULL, &real);
    nq__ops_t o = real;
    o.futex = enosys_futex;
    nq_queue_t *q;
    nq_handle_t h;
    nq_sub_t *s;
    nq_evq_t *e;
    cr_assert_eq(nq_queue_new(NULL, &q), 0);
    cr_assert_eq(nq_register(q, "futex", &h), 0);
    nq_sub_opts_t so = {.capacity = 8};
    cr_assert_eq(nq_subscribe(q, h, &so, &s), 0);
    cr_assert_eq(nq_evq_new(16, &e), 0);
    nq__ops_set(&o, NULL);
    int64_t arg;
    uint32_t tok;
    cr_assert_eq(nq_wait(q, h, NQ_SEQ_NEXT, 1000 * MS, &arg), NQ_ESYS);
    cr_assert_eq(nq_sub_recv(s, 1000 * MS, &arg), NQ_ESYS);
    cr_assert_eq(nq_evq_wait(e, &tok, 1, 1000 * MS), NQ_ESYS);
    nq__ops_set(&real, NULL);
    /* Nothing is left half-done: the objects still work. */
    nq_stats_t st;
    cr_assert_eq(nq_queue_stats(q, &st), 0);
    cr_assert_eq(st.waits_pending, 0);
    cr_assert_eq(nq_notify(q, h, 4), 1);
    cr_assert_eq(nq_sub_recv(s, 1000 * MS, &arg), 0);
    cr_assert_eq(arg, 4);
    cr_assert_eq(nq_evq_notify(e, 5), 0);
    cr_assert_eq(nq_evq_wait(e, &tok, 1, 1000 * MS), 1);
    say("futex refused (ENOSYS injected): nq_wait, nq_sub_recv, nq_evq_wait -> NQ_ESYS");
    nq_evq_free(e);
    nq_sub_close(s);
    nq_queue_free(q);
}
