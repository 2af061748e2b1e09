/* Bounded subscriptions on worker threads.
 *
 * Producer threads notify a handle with increasing sequence numbers. Worker
 * threads each hold a bounded subscription to it and block in nq_sub_recv
 * with a timeout. One worker is deliberately stalled: it never reads. Its
 * subscription fills up and drops (counted exactly), and the producers do
 * not notice: notify never waits for a client. At the end every subscription
 * must account for every notification: received + dropped + held == sent.
 *
 * Usage: worker_subscriptions [-p producers] [-w workers] [-n notifies per producer]
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <nq.h>

#define MAX_WORKERS 16

static nq_queue_t *queue;
static nq_handle_t handle;
static long per_producer = 200000;

struct worker {
    pthread_t thread;
    nq_sub_t *sub;
    int stalled;
    uint64_t received; /* written by the worker, read after join */
};

static void *producer(void *arg) {
    (void)arg;
    for (long i = 1; i <= per_producer; i++) {
        int rc = nq_notify(queue, handle, i);
        if (rc < 0) {
            fprintf(stderr, "nq_notify: %s\n", nq_strerror(rc));
            exit(1);
        }
    }
    return NULL;
}

static void *worker(void *arg) {
    struct worker *w = arg;
    if (w->stalled)
        return NULL; /* a buggy client: never reads */
    for (;;) {
        int64_t v;
        int rc = nq_sub_recv(w->sub, 100 * 1000000 /* 100 ms */, &v);
        if (rc == 0)
            w->received++;
        else if (rc == NQ_ECLOSED)
            return NULL; /* the handle was unregistered and we drained it */
        else if (rc != NQ_ETIMEDOUT) {
            fprintf(stderr, "nq_sub_recv: %s\n", nq_strerror(rc));
            exit(1);
        }
    }
}

int main(int argc, char **argv) {
    int nproducers = 2, nworkers = 3, opt;
    while ((opt = getopt(argc, argv, "p:w:n:")) != -1) {
        switch (opt) {
        case 'p': nproducers = atoi(optarg); break;
        case 'w': nworkers = atoi(optarg); break;
        case 'n': per_producer = atol(optarg); break;
        default:
            fprintf(stderr, "usage: %s [-p producers] [-w workers] [-n notifies]\n", argv[0]);
            return 2;
        }
    }
    if (nproducers < 1 || nproducers > 64 || nworkers < 2 || nworkers > MAX_WORKERS ||
        per_producer < 1) {
        fprintf(stderr, "out of range: 1..64 producers, 2..%d workers\n", MAX_WORKERS);
        return 2;
    }

    int rc = nq_queue_new(NULL, &queue);
    if (rc == 0)
        rc = nq_register(queue, "ticks", &handle);
    if (rc < 0) {
        fprintf(stderr, "setup: %s\n", nq_strerror(rc));
        return 1;
    }

    struct worker workers[MAX_WORKERS] = {0};
    for (int i = 0; i < nworkers; i++) {
        char hint[32];
        snprintf(hint, sizeof(hint), i == 0 ? "stalled worker" : "worker %d", i);
        nq_sub_opts_t opts = {
            .capacity = 4096,
            .overflow = NQ_DROP_OLDEST, /* keep the newest when a worker falls behind */
            .debug_hint = hint,
        };
        workers[i].stalled = (i == 0);
        if ((rc = nq_subscribe(queue, handle, &opts, &workers[i].sub)) < 0) {
            fprintf(stderr, "nq_subscribe: %s\n", nq_strerror(rc));
            return 1;
        }
        pthread_create(&workers[i].thread, NULL, worker, &workers[i]);
    }

    pthread_t producers[64];
    for (int i = 0; i < nproducers; i++)
        pthread_create(&producers[i], NULL, producer, NULL);
    for (int i = 0; i < nproducers; i++)
        pthread_join(producers[i], NULL);

    nq_queue_dump(queue, stdout);      /* the stalled worker shows a full queue */
    nq_unregister(queue, handle);       /* workers drain, then see NQ_ECLOSED */

    uint64_t sent = (uint64_t)nproducers * (uint64_t)per_producer;
    int ok = 1;
    for (int i = 0; i < nworkers; i++) {
        pthread_join(workers[i].thread, NULL);
        uint64_t held = 0;
        int64_t v;
        while (nq_sub_try_recv(workers[i].sub, &v) == 0)
            held++;
        uint64_t dropped = nq_sub_dropped(workers[i].sub);
        uint64_t total = workers[i].received + dropped + held;
        printf("%-15s received %8" PRIu64 "  dropped %8" PRIu64 "  held %5" PRIu64
               "  = %" PRIu64 " of %" PRIu64 "\n",
               i == 0 ? "stalled worker" : "worker", workers[i].received, dropped, held, total,
               sent);
        ok &= total == sent;
        nq_sub_close(workers[i].sub);
    }
    nq_queue_free(queue);
    printf("%s\n", ok ? "OK: every notification received, held or counted as dropped"
                      : "FAILED: accounting mismatch");
    return ok ? 0 : 1;
}
