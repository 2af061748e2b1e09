/* Criterion suite "fork": what a child process may do with libnq (the
 * fork() section of include/nq.h). The child creates and uses its own
 * objects; inherited queues, subscriptions and event queues are its own
 * copies, and nothing it does to them reaches the parent; an inherited port
 * refuses dispatch, waits and subscriptions (NQ_ECLOSED) and never touches
 * the eventfd it shares with the parent, so the parent's pending wake-up is
 * neither stolen nor faked. Each child reports the first check that failed
 * in its exit status and leaves with _exit (no atexit handlers, no leak
 * report for the copies it does not free). */
#include <criterion/criterion.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nq.h"

#define MS (int64_t)1000000
#define CHILD_CHECK(n, c)                                                                  \
    do {                                                                                   \
        if (!(c)) {                                                                        \
            fprintf(stderr, "child check %d: %s\n", (n), #c);                              \
            _exit(n);                                                                      \
        }                                                                                  \
    } while (0)

static void say(const char *msg) {
    printf("# %s\n", msg);
    fflush(stdout);
}

/* Runs child() in a forked child; asserts it exited 0. */
static void in_child(void (*child)(void *), void *arg) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        child(arg);
        _exit(0);
    }
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFEXITED(st), "the child died (signal %d)", WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    cr_assert_eq(WEXITSTATUS(st), 0, "the child failed its check %d", WEXITSTATUS(st));
}

static int readable(int fd) {
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    return poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN);
}

static int calls, last_status;
static int64_t last_arg;
static void on_wait(void *data, int status, int64_t arg) {
    (void)data;
    calls++;
    last_status = status;
    last_arg = arg;
}

static void on_sub(nq_sub_t *s, void *data) {
    (void)s;
    (void)data;
    calls++;
}

/* --- the child's own objects ---------------------------------------------- */

static void child_new_objects(void *unused) {
    (void)unused;
    nq_queue_t *q;
    nq_handle_t h;
    nq_port_t *p;
    nq_sub_t *s;
    nq_evq_t *e;
    int64_t arg;
    uint32_t tok;
    CHILD_CHECK(1, nq_queue_new(NULL, &q) == 0);
    CHILD_CHECK(2, nq_register(q, "child", &h) == 0);
    CHILD_CHECK(3, nq_port_new(&p) == 0);
    nq_sub_opts_t o = {.capacity = 4};
    CHILD_CHECK(4, nq_subscribe(q, h, &o, &s) == 0);
    CHILD_CHECK(5, nq_port_wait(p, q, h, NQ_SEQ_NEXT, -1, on_wait, NULL, NULL) == 0);
    CHILD_CHECK(6, nq_notify(q, h, 11) == 2);
    CHILD_CHECK(7, readable(nq_port_fd(p)));
    CHILD_CHECK(8, nq_port_dispatch(p, 0) == 1 && calls == 1 && last_arg == 11);
    CHILD_CHECK(9, nq_sub_recv(s, 100 * MS, &arg) == 0 && arg == 11);
    CHILD_CHECK(10, nq_evq_new(8, &e) == 0 && nq_evq_notify(e, 2) == 0);
    CHILD_CHECK(11, nq_evq_wait(e, &tok, 1, 100 * MS) == 1 && tok == 2);
    nq_evq_free(e);
    nq_sub_close(s);
    nq_port_free(p);
    nq_queue_free(q);
}

Test(fork, child_creates_and_uses_new_objects) {
    /* The parent has used libnq (and a port) before it forks. */
    nq_port_t *p;
    cr_assert_eq(nq_port_new(&p), 0);
    in_child(child_new_objects, NULL);
    nq_port_free(p);
    say("fork: the child created a queue, a port, a subscription and an evq, and used them");
}

/* --- inherited queues, subscriptions and event queues ----------------------- */

struct inherited {
    nq_queue_t *q;
    nq_handle_t h;
    nq_sub_t *s;
    nq_evq_t *e;
};

static void child_inherited_queue(void *arg) {
    struct inherited *in = arg;
    uint64_t seq;
    int64_t v;
    uint32_t tok;
    CHILD_CHECK(1, nq_seq(in->q, in->h, &seq) == 0 && seq == 1);
    CHILD_CHECK(2, nq_notify(in->q, in->h, 42) == 1);
    CHILD_CHECK(3, nq_sub_try_recv(in->s, &v) == 0 && v == 1); /* the parent's, copied */
    CHILD_CHECK(4, nq_sub_recv(in->s, 100 * MS, &v) == 0 && v == 42);
    CHILD_CHECK(5, nq_wait(in->q, in->h, 1, 100 * MS, &v) == 0 && v == 42);
    CHILD_CHECK(6, nq_evq_notify(in->e, 6) == 0);
    CHILD_CHECK(7, nq_evq_wait(in->e, &tok, 1, 100 * MS) == 1 && tok == 6);
    CHILD_CHECK(8, nq_unregister(in->q, in->h) == 0);
    nq_sub_close(in->s);
    nq_evq_free(in->e);
    nq_queue_free(in->q);
}

Test(fork, inherited_queue_is_the_childs_copy) {
    struct inherited in;
    cr_assert_eq(nq_queue_new(NULL, &in.q), 0);
    cr_assert_eq(nq_register(in.q, "parent", &in.h), 0);
    nq_sub_opts_t o = {.capacity = 4};
    cr_assert_eq(nq_subscribe(in.q, in.h, &o, &in.s), 0);
    cr_assert_eq(nq_evq_new(8, &in.e), 0);
    cr_assert_eq(nq_notify(in.q, in.h, 1), 1);
    in_child(child_inherited_queue, &in);
    /* Nothing the child did reached the parent. */
    uint64_t seq;
    int64_t v;
    uint32_t tok;
    cr_assert_eq(nq_seq(in.q, in.h, &seq), 0);
    cr_assert_eq(seq, 1, "the child's notify reached the parent");
    cr_assert_eq(nq_sub_try_recv(in.s, &v), 0);
    cr_assert_eq(v, 1);
    cr_assert_eq(nq_sub_try_recv(in.s, &v), NQ_EAGAIN);
    cr_assert_eq(nq_evq_poll(in.e, &tok, 1), 0);
    cr_assert_eq(nq_notify(in.q, in.h, 2), 1);
    cr_assert_eq(nq_sub_try_recv(in.s, &v), 0);
    cr_assert_eq(v, 2);
    nq_sub_close(in.s);
    nq_evq_free(in.e);
    nq_queue_free(in.q);
    say("fork: the child's notify, receive, wait, unregister and frees on inherited objects "
        "left the parent's untouched");
}

/* --- inherited ports --------------------------------------------------------- */

struct ports {
    nq_queue_t *q;
    nq_handle_t h1, h2;
    nq_port_t *p1; /* signalled: a wake-up pending for the parent's loop */
    nq_port_t *p2; /* idle, with a wait pending on h2 */
};

static void child_inherited_ports(void *arg) {
    struct ports *ps = arg;
    nq_sub_opts_t o = {.capacity = 4};
    nq_sub_t *s;
    CHILD_CHECK(1, readable(nq_port_fd(ps->p1)));
    CHILD_CHECK(2, nq_port_dispatch(ps->p1, 0) == NQ_ECLOSED);
    CHILD_CHECK(3, nq_port_dispatch(ps->p2, 0) == NQ_ECLOSED);
    CHILD_CHECK(4, nq_port_wait(ps->p1, ps->q, ps->h1, NQ_SEQ_NEXT, -1, on_wait, NULL, NULL) ==
                       NQ_ECLOSED);
    CHILD_CHECK(5, nq_port_subscribe(ps->p2, ps->q, ps->h2, &o, NULL, NULL, &s) == NQ_EINVAL);
    CHILD_CHECK(6, nq_port_subscribe(ps->p2, ps->q, ps->h2, &o, on_sub, NULL,
                                     &s) == NQ_ECLOSED);
    /* Completes the child's copy of p2's wait: its waker must not write the
     * eventfd the parent watches. */
    CHILD_CHECK(7, nq_notify(ps->q, ps->h2, 5) == 1);
    CHILD_CHECK(8, calls == 0);
    /* Freeing the copies: callbacks run here, with the child's copies; only
     * the child's descriptors close. */
    nq_port_free(ps->p1);
    nq_port_free(ps->p2);
    CHILD_CHECK(9, calls == 2);
    nq_queue_free(ps->q);
}

Test(fork, inherited_port_is_refused_and_the_parents_wakeup_survives) {
    struct ports ps;
    cr_assert_eq(nq_queue_new(NULL, &ps.q), 0);
    cr_assert_eq(nq_register(ps.q, "h1", &ps.h1), 0);
    cr_assert_eq(nq_register(ps.q, "h2", &ps.h2), 0);
    cr_assert_eq(nq_port_new(&ps.p1), 0);
    cr_assert_eq(nq_port_new(&ps.p2), 0);
    calls = 0;
    cr_assert_eq(nq_port_wait(ps.p1, ps.q, ps.h1, NQ_SEQ_NEXT, -1, on_wait, NULL, NULL), 0);
    cr_assert_eq(nq_port_wait(ps.p2, ps.q, ps.h2, NQ_SEQ_NEXT, -1, on_wait, NULL, NULL), 0);
    cr_assert_eq(nq_notify(ps.q, ps.h1, 7), 1); /* p1's fd written, not yet dispatched */
    cr_assert(readable(nq_port_fd(ps.p1)));
    cr_assert(!readable(nq_port_fd(ps.p2)));
    in_child(child_inherited_ports, &ps);
    /* The wake-up is still there for the parent's loop ... */
    cr_assert(readable(nq_port_fd(ps.p1)), "the child took the parent's wake-up");
    cr_assert_eq(nq_port_dispatch(ps.p1, 0), 1);
    cr_assert_eq(calls, 1);
    cr_assert_eq(last_arg, 7);
    /* ... and the child's notify did not fake one. */
    cr_assert(!readable(nq_port_fd(ps.p2)), "the child's notify wrote the parent's eventfd");
    cr_assert_eq(nq_port_dispatch(ps.p2, 0), 0);
    cr_assert_eq(calls, 1);
    /* Both ports still work. */
    cr_assert_eq(nq_notify(ps.q, ps.h2, 8), 1);
    cr_assert(readable(nq_port_fd(ps.p2)));
    cr_assert_eq(nq_port_dispatch(ps.p2, 0), 1);
    cr_assert_eq(last_arg, 8);
    cr_assert_eq(nq_port_wait(ps.p1, ps.q, ps.h1, NQ_SEQ_NEXT, -1, on_wait, NULL, NULL), 0);
    cr_assert_eq(nq_notify(ps.q, ps.h1, 9), 1);
    cr_assert(readable(nq_port_fd(ps.p1)));
    cr_assert_eq(nq_port_dispatch(ps.p1, 0), 1);
    cr_assert_eq(last_arg, 9);
    cr_assert_eq(calls, 3);
    nq_port_free(ps.p1);
    nq_port_free(ps.p2);
    nq_queue_free(ps.q);
    say("fork: in the child an inherited port answers NQ_ECLOSED to dispatch, port_wait and "
        "port_subscribe; the parent's pending wake-up survived and no fake one appeared");
}

/* A grandchild: a port the child created belongs to the child. */
static void grandchild(void *arg) {
    nq_port_t *p = arg;
    CHILD_CHECK(1, nq_port_dispatch(p, 0) == NQ_ECLOSED);
}
static void child_with_port(void *unused) {
    (void)unused;
    nq_port_t *p;
    CHILD_CHECK(1, nq_port_new(&p) == 0);
    CHILD_CHECK(2, nq_port_dispatch(p, 0) == 0);
    pid_t pid = fork();
    CHILD_CHECK(3, pid >= 0);
    if (pid == 0) {
        grandchild(p);
        _exit(0);
    }
    int st;
    CHILD_CHECK(4, waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHILD_CHECK(5, nq_port_dispatch(p, 0) == 0);
    nq_port_free(p);
}

Test(fork, a_port_belongs_to_the_process_that_created_it) {
    in_child(child_with_port, NULL);
}
