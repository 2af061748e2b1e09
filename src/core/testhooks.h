/* This file is private to libnq: hooks that only tests call. No production
 * file but the one defining a hook includes this. */
#ifndef NQ_CORE_TESTHOOKS_H
#define NQ_CORE_TESTHOOKS_H

#include "nq.h"

/* handle.c: generations wrap within `bits` bits (1..24), so a test can
 * exhaust a slot's generations quickly. Call before the first register. */
int nq__queue_set_gen_bits(nq_queue_t *q, unsigned bits);
/* handle.c: sets h's notification count (no notification is made), so a
 * test can take a handle across the 2^32 carry of the word's low half. */
int nq__handle_set_seq(nq_queue_t *q, nq_handle_t h, uint64_t seq);

/* port.c: the port's evq, and the signal step a waker makes after its
 * token is in that evq (with nq__evq_claim/publish_for_test they play a
 * waker stalled between its claim and its store). */
struct nq_port;
nq_evq_t *nq__port_evq(struct nq_port *p);
void nq__port_kick(struct nq_port *p);

#endif
