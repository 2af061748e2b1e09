/* This file is private to libnq: the event queue's internal interface, for
 * the port and for tests. Nothing here is exported from the shared library. */
#ifndef NQ_CORE_EVQ_H
#define NQ_CORE_EVQ_H

#include "nq.h"

/* Like nq_evq_new, but with an explicit ring size (a power of two). A ring
 * smaller than max_tokens breaks the no-overflow invariant on purpose: tests
 * use it to see that an overflow is reported (NQ_ELIMIT) and harmless. */
int nq__evq_new_ring(uint32_t max_tokens, uint32_t ring_size, nq_evq_t **out);

/* Checks the queue's invariants; the queue must be quiescent (no notifier
 * or consumer running). Returns 0, or NQ_ELIMIT if an invariant is broken;
 * *why (if not NULL) then names it. Invariants:
 *   - slots [head, tail) hold distinct tokens, each with its pending flag set;
 *   - no other token's flag is set;
 *   - tail - head == number of pending tokens <= max_tokens. */
int nq__evq_check(const nq_evq_t *e, const char **why);

/* Tokens queued and not yet polled (tail - head). The tail is read with
 * seq_cst: a port's dispatch uses this as the re-check of its wake-up
 * protocol. Consumer thread. */
uint64_t nq__evq_pending(nq_evq_t *e);

/* Makes every slot store seq_cst (a port's evq, before first use). */
void nq__evq_set_sc_publish(nq_evq_t *e);

/* Is the token at the head written (seq_cst load)? Consumer thread. */
int nq__evq_head_ready(nq_evq_t *e);

/* Test hooks: nq_evq_notify cut in two, to play a notifier stalled between
 * its claim and its slot store. claim: 1 and *pos if it queues token, 0 if
 * the token was pending (conflated). publish: the slot store. Callers of
 * these bypass the evq's own futex wake duty. */
int nq__evq_claim_for_test(nq_evq_t *e, uint32_t token, uint64_t *pos);
void nq__evq_publish_for_test(nq_evq_t *e, uint64_t pos, uint32_t token);

#endif
