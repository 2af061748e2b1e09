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

#endif
