/* epoll_server: libnq inside an epoll loop that already serves sockets.
 *
 * The loop serves a TCP echo socket on 127.0.0.1 (-p port; 0, the default,
 * lets the kernel pick one, which is printed) and, beside it, the port's
 * eventfd: nq_epoll_add puts it in the epoll set under a tag, epoll_wait
 * sleeps at most nq_epoll_timeout(), and the loop calls nq_port_dispatch when
 * the tag fires or a wait's deadline is due (nq_port_timeout_ms() == 0).
 *
 * Worker threads (-t, default 2) notify 16 handles in bursts. The loop holds
 * a subscription on each even handle (256 args, drop oldest; the callback
 * drains up to 64) and a wait on each odd one (re-armed in its callback after
 * the count it saw, 100 ms timeout; the last handle is never notified, so its
 * waits time out). At most 256 callbacks run per loop iteration, so clients
 * are served in between however fast the workers notify.
 *
 * SIGINT and SIGTERM, read from a signalfd in the same epoll set, stop it
 * cleanly. With -d SECONDS it also runs a client thread that connects, sends
 * numbered lines for that long and checks that each echo comes back intact,
 * then stops the server with SIGTERM. At the end it prints a summary and
 * checks the accounting (per subscription: received + dropped ==
 * notifications to its handle; every wait's callback ran once): OK, or FAIL
 * and exit 1.
 *
 * Usage: epoll_server [-p port (0)] [-t threads (2)] [-d seconds: self-test]
 *   e.g. epoll_server -p 7000 &  then  nc 127.0.0.1 7000
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <nq/epoll.h> /* includes <nq.h> */

enum { TAG_NQ = 1, TAG_LISTEN, TAG_SIGNAL }; /* other tags are struct conn pointers */
#define NHANDLES 16
#define QUIET (NHANDLES - 1)
#define MAX_THREADS 64

struct target {
    nq_handle_t h;
    nq_sub_t *sub; /* even handles */
    uint64_t received, dropped, waits, completed, timed_out, cancelled;
};
struct worker {
    pthread_t thread;
    uint64_t sent[NHANDLES];
};
struct conn { /* one client: echoes what it reads, one buffer at a time */
    int fd;
    uint32_t events;
    size_t len, off; /* bytes in buf; bytes of them written back */
    char buf[4096];
    struct conn *next;
};
struct client { /* the -d self-test */
    pthread_t thread;
    double seconds;
    uint16_t port;
    uint64_t round_trips;
    int failed;
};

static nq_queue_t *queue;
static nq_port_t *port;
static struct target targets[NHANDLES];
static struct worker workers[MAX_THREADS];
static struct conn *conns;
static int nthreads = 2, stopping, failed;
static atomic_int stop;
static uint64_t echoed_bytes;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- Worker threads: bursts of 64 notifies, then 50 us off */

static void *worker_main(void *arg) {
    struct worker *w = arg;
    uint32_t x = 2463534242u + (uint32_t)(w - workers);
    struct timespec pause = {0, 50000};
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        for (int i = 0; i < 64; i++) {
            x ^= x << 13, x ^= x >> 17, x ^= x << 5;
            uint32_t t = x % QUIET;
            if (nq_notify(queue, targets[t].h, (int64_t)x) >= 0) /* never blocks */
                w->sent[t]++;
        }
        nanosleep(&pause, NULL);
    }
    return NULL;
}

/* ---- Port callbacks: they run inside nq_port_dispatch, on the loop */

static void on_wait(void *data, int status, int64_t arg);

static void arm_wait(struct target *t) {
    uint64_t seq;
    if (nq_seq(queue, t->h, &seq) < 0 ||
        nq_port_wait(port, queue, t->h, seq, 100, on_wait, t, NULL) < 0)
        failed = 1;
    else
        t->waits++;
}

static void on_wait(void *data, int status, int64_t arg) {
    struct target *t = data;
    (void)arg;
    t->completed += status == 0;
    t->timed_out += status == NQ_ETIMEDOUT;
    t->cancelled += status == NQ_ECANCELED; /* pending when the port was freed */
    if (status != 0 && status != NQ_ETIMEDOUT && status != NQ_ECANCELED)
        failed = 1;
    if (!stopping && status != NQ_ECANCELED)
        arm_wait(t);
}

static void drain(struct target *t, int all) {
    int64_t args[64];
    int n;
    do {
        if ((n = nq_sub_recv_batch(t->sub, args, 64)) < 0)
            failed = 1;
        else
            t->received += (uint64_t)n;
    } while (all && n > 0);
}

static void on_sub(nq_sub_t *s, void *data) {
    (void)s;
    drain(data, 0); /* level-triggered: called again while it holds more */
}

/* ---- The echo service */

static void conn_close(int epfd, struct conn *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    for (struct conn **pp = &conns; *pp != NULL; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    free(c);
}

static void conn_accept(int epfd, int lfd) {
    int fd;
    while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
        struct conn *c = calloc(1, sizeof(*c));
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (c == NULL || epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            free(c);
            close(fd);
            continue;
        }
        c->fd = fd, c->events = EPOLLIN, c->next = conns, conns = c;
    }
}

/* Reads when its buffer is empty, writes it back, and watches for EPOLLOUT
 * instead of EPOLLIN while a reply is only partly written. */
static void conn_serve(int epfd, struct conn *c) {
    if (c->len == 0) {
        ssize_t n = recv(c->fd, c->buf, sizeof(c->buf), 0);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            conn_close(epfd, c); /* the client went away */
            return;
        }
        c->len = n > 0 ? (size_t)n : 0, c->off = 0;
    }
    while (c->off < c->len) {
        ssize_t n = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN && errno != EINTR) {
            conn_close(epfd, c);
            return;
        }
        if (n < 0)
            break;
        c->off += (size_t)n, echoed_bytes += (uint64_t)n;
    }
    if (c->off == c->len)
        c->len = c->off = 0;
    uint32_t want = c->len ? EPOLLOUT : EPOLLIN;
    if (want != c->events) {
        struct epoll_event ev = {.events = want, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->events = want;
    }
}

/* ---- The -d self-test: a client on its own thread */

static void *client_main(void *arg) {
    struct client *cl = arg;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(cl->port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {5, 0}; /* a lost echo fails the test instead of hanging it */
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ||
        connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        perror("client");
        cl->failed = 1;
    }
    double deadline = now_s() + cl->seconds;
    while (!cl->failed && now_s() < deadline) {
        char line[80], back[80];
        int len = snprintf(line, sizeof(line), "line %" PRIu64 ": notifications flow beside me\n",
                           cl->round_trips);
        int got = 0;
        if (send(fd, line, (size_t)len, MSG_NOSIGNAL) != len)
            cl->failed = 1;
        while (!cl->failed && got < len) {
            ssize_t n = recv(fd, back + got, (size_t)(len - got), 0);
            if (n <= 0)
                cl->failed = 1;
            else
                got += (int)n;
        }
        if (cl->failed || memcmp(line, back, (size_t)len) != 0) {
            fprintf(stderr, "client: line %" PRIu64 " did not come back intact\n",
                    cl->round_trips);
            cl->failed = 1;
        } else
            cl->round_trips++;
    }
    if (fd >= 0)
        close(fd);
    kill(getpid(), SIGTERM); /* stop the server as an operator would */
    return NULL;
}

int main(int argc, char **argv) {
    struct client cl = {0};
    int port_no = 0, opt;
    char *end;
    while ((opt = getopt(argc, argv, "p:t:d:")) != -1) {
        if (opt == 'p' && (port_no = atoi(optarg)) >= 0 && port_no < 65536)
            continue;
        if (opt == 't' && (nthreads = atoi(optarg)) >= 1 && nthreads <= MAX_THREADS)
            continue;
        if (opt == 'd' && (cl.seconds = strtod(optarg, &end)) > 0 && cl.seconds <= 86400 &&
            !*end)
            continue;
        fprintf(stderr, "usage: %s [-p port (0)] [-t threads (2)] [-d seconds]\n", argv[0]);
        return 2;
    }

    /* Signals go to the signalfd only: block them before any thread starts. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    int sfd = signalfd(-1, &sigs, SFD_NONBLOCK | SFD_CLOEXEC);

    /* The listening socket. */
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port_no)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t salen = sizeof(sa);
    int one = 1;
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (sfd < 0 || lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 64) < 0 ||
        getsockname(lfd, (struct sockaddr *)&sa, &salen) < 0) {
        perror("socket setup");
        return 1;
    }
    cl.port = ntohs(sa.sin_port);

    /* The epoll set: the port's fd next to the loop's own. */
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_LISTEN};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);
    ev.data.u64 = TAG_SIGNAL;
    epoll_ctl(epfd, EPOLL_CTL_ADD, sfd, &ev);
    int rc = nq_queue_new(NULL, &queue);
    for (int i = 0; rc == 0 && i < NHANDLES; i++)
        rc = nq_register(queue, i == QUIET ? "quiet" : "busy", &targets[i].h);
    if (rc == 0 && (rc = nq_port_new(&port)) == 0)
        rc = nq_epoll_add(epfd, port, TAG_NQ);
    for (int i = 0; rc == 0 && i < NHANDLES; i++) {
        nq_sub_opts_t opts = {.capacity = 256, .overflow = NQ_DROP_OLDEST};
        if (i % 2 == 0 && i != QUIET)
            rc = nq_port_subscribe(port, queue, targets[i].h, &opts, on_sub, &targets[i],
                                   &targets[i].sub);
        else
            arm_wait(&targets[i]);
    }
    if (rc < 0 || failed) {
        fprintf(stderr, "setup: %s\n", nq_strerror(rc));
        return 1;
    }
    for (int i = 0; i < nthreads; i++)
        if (pthread_create(&workers[i].thread, NULL, worker_main, &workers[i]) != 0)
            return 1;
    printf("epoll_server: echo on 127.0.0.1:%u, %d worker threads -> %d handles; %s\n", cl.port,
           nthreads, NHANDLES, cl.seconds > 0 ? "self-test client started" : "Ctrl-C stops");
    fflush(stdout);
    if (cl.seconds > 0 && pthread_create(&cl.thread, NULL, client_main, &cl) != 0)
        return 1;

    /* The loop. */
    double start = now_s();
    for (int running = 1; running;) {
        struct epoll_event evs[64];
        int n = epoll_wait(epfd, evs, 64, nq_epoll_timeout(port, -1));
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            failed = 1;
            break;
        }
        int nq_ready = nq_port_timeout_ms(port) == 0; /* a deadline is due */
        for (int i = 0; i < n; i++) {
            struct signalfd_siginfo si;
            if (evs[i].data.u64 == TAG_NQ)
                nq_ready = 1;
            else if (evs[i].data.u64 == TAG_LISTEN)
                conn_accept(epfd, lfd);
            else if (evs[i].data.u64 == TAG_SIGNAL) {
                if (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si))
                    running = 0; /* SIGINT or SIGTERM */
            } else
                conn_serve(epfd, evs[i].data.ptr);
        }
        if (nq_ready)
            nq_port_dispatch(port, 256); /* the callbacks run here */
    }
    double elapsed = now_s() - start;

    /* Stop: workers first, then drain, then take the port out of the set. */
    atomic_store(&stop, 1);
    for (int i = 0; i < nthreads; i++)
        pthread_join(workers[i].thread, NULL);
    if (cl.seconds > 0)
        pthread_join(cl.thread, NULL);
    stopping = 1;
    for (int i = 0; i < QUIET; i += 2)
        drain(&targets[i], 1);
    nq_port_stats_t ps;
    nq_port_stats(port, &ps);
    nq_epoll_del(epfd, port);
    for (int i = 0; i < QUIET; i += 2) {
        targets[i].dropped = nq_sub_dropped(targets[i].sub);
        nq_sub_close(targets[i].sub);
    }
    nq_port_free(port); /* pending waits get NQ_ECANCELED */
    while (conns != NULL)
        conn_close(epfd, conns);
    close(epfd), close(lfd), close(sfd);

    /* The check. */
    nq_stats_t qs;
    nq_queue_stats(queue, &qs);
    uint64_t sent = 0, received = 0, dropped = 0, completed = 0, timed_out = 0;
    int ok = !failed && !cl.failed && (cl.seconds == 0 || cl.round_trips > 0);
    for (int i = 0; i < NHANDLES; i++) {
        struct target *t = &targets[i];
        uint64_t to_h = 0;
        for (int w = 0; w < nthreads; w++)
            to_h += workers[w].sent[i];
        if (t->sub != NULL && t->received + t->dropped != to_h)
            ok = 0, printf("FAIL: handle %d: received + dropped != %" PRIu64 "\n", i, to_h);
        if (t->sub == NULL && t->waits != t->completed + t->timed_out + t->cancelled)
            ok = 0, printf("FAIL: handle %d: a wait callback did not run exactly once\n", i);
        sent += to_h, received += t->received, dropped += t->dropped;
        completed += t->completed, timed_out += t->timed_out;
    }
    if (qs.notifies != sent || qs.drops != dropped || qs.waits_completed != completed ||
        qs.waits_timed_out != timed_out)
        ok = 0, printf("FAIL: the queue's statistics disagree with the callbacks\n");
    printf("summary: %.2f s; echo: %" PRIu64 " round trips checked, %" PRIu64 " bytes echoed\n",
           elapsed, cl.round_trips, echoed_bytes);
    printf("  notifications: %" PRIu64 " sent, %" PRIu64 " delivered (%" PRIu64
           " received by subscriptions + %" PRIu64 " waits completed), %" PRIu64
           " dropped, %" PRIu64 " waits timed out\n",
           sent, received + completed, received, completed, dropped, timed_out);
    printf("  port: %" PRIu64 " callbacks in %" PRIu64 " dispatches, %" PRIu64
           " eventfd writes\n",
           ps.callbacks, ps.dispatches, ps.efd_writes);
    nq_queue_free(queue);
    printf("%s\n", ok ? "OK" : "FAIL");
    return ok ? 0 : 1;
}
