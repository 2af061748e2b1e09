/* The README's worker-thread example: a bounded subscription drained by a
 * worker thread that blocks in nq_sub_recv with a timeout. */
#include <nq.h>
#include <pthread.h>
#include <stdio.h>

static void *worker(void *arg) {
    nq_sub_t *sub = arg;
    for (;;) {
        int64_t v;
        int rc = nq_sub_recv(sub, 50 * 1000000 /* ns: 50 ms */, &v);
        if (rc == 0)
            printf("got %lld\n", (long long)v);
        else if (rc != NQ_ETIMEDOUT) /* NQ_ECLOSED: unregistered, and drained */
            return NULL;
        /* NQ_ETIMEDOUT: nothing for 50 ms; a real worker does other work here */
    }
}

int main(void) {
    nq_queue_t *q;
    nq_handle_t h;
    nq_sub_t *sub;
    nq_sub_opts_t opts = {.capacity = 64, .overflow = NQ_DROP_OLDEST, .debug_hint = "worker"};
    pthread_t t;

    if (nq_queue_new(NULL, &q) < 0 || nq_register(q, "jobs", &h) < 0 ||
        nq_subscribe(q, h, &opts, &sub) < 0)
        return 1;
    pthread_create(&t, NULL, worker, sub);
    for (int64_t i = 1; i <= 3; i++)
        nq_notify(q, h, i); /* never blocks, whatever the worker does */
    nq_unregister(q, h);    /* the worker gets 1, 2, 3, then NQ_ECLOSED */
    pthread_join(t, NULL);
    printf("dropped %llu\n", (unsigned long long)nq_sub_dropped(sub));
    nq_sub_close(sub);
    nq_queue_free(q);
    return 0;
}
