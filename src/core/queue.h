/* This file is private to libnq: the notification queue's layers in one
 * include, for the layers above them (queue.c's fan-out, port.c):
 *   handle.h  the queue object, handle slots and the handle word
 *   wait.h    oneshot waits           (uses handle.h)
 *   sub.h     bounded subscriptions   (uses handle.h)
 * queue.c (notify, unregister, stats, dump) uses all three; port.c uses
 * them and nothing uses port.c but the adapters, through nq.h.
 */
#ifndef NQ_CORE_QUEUE_H
#define NQ_CORE_QUEUE_H

#include "core/handle.h"
#include "core/sub.h"
#include "core/wait.h"

#endif
