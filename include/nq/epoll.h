/* libnq for a raw epoll loop: one fd in your set, one call when it fires.
 *
 * nq_epoll_add puts the port's eventfd in your epoll set (level-triggered,
 * EPOLLIN) with your tag in epoll_event.data.u64. Timeouts fit epoll_wait's
 * own: pass nq_epoll_timeout(port, your_timeout) as its timeout, and call
 * nq_port_dispatch when the tagged event fires or a deadline is due:
 *
 *     nq_epoll_add(epfd, port, TAG_NQ);
 *     for (;;) {
 *         int n = epoll_wait(epfd, evs, 64, nq_epoll_timeout(port, -1));
 *         int nq_ready = nq_port_timeout_ms(port) == 0;  // a deadline is due
 *         for (int i = 0; i < n; i++)
 *             if (evs[i].data.u64 == TAG_NQ) nq_ready = 1;
 *             else serve(evs[i]);
 *         if (nq_ready) nq_port_dispatch(port, 256);   // callbacks run here
 *     }
 *
 * Checking nq_port_timeout_ms() == 0 after epoll_wait (not only n == 0)
 * keeps deadlines on time while other fds keep the loop busy. No timerfd, no
 * thread: the port's next deadline is a number the loop already knows how to
 * wait for. A budget bounds the callbacks per iteration; what is left keeps
 * the fd readable, so the next epoll_wait returns at once and the loop's
 * other fds are served in between.
 *
 * Link with `pkg-config --libs nq-epoll`. Call these on the loop's thread.
 */
#ifndef NQ_EPOLL_H
#define NQ_EPOLL_H

#include "../nq.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Adds the port's fd to epfd with data.u64 = tag and attaches the port.
 * NQ_EINVAL for a NULL port or a negative epfd, NQ_EBUSY if the port is
 * already attached (to an epoll set or another adapter), NQ_ESYS if
 * epoll_ctl fails (errno kept: EBADF, EINVAL for an fd that is not an epoll
 * instance, ENOMEM, ENOSPC). */
NQ_EXTERN int nq_epoll_add(int epfd, nq_port_t *port, uint64_t tag);

/* Removes the port's fd from epfd and detaches the port. NQ_EINVAL for NULL
 * or a negative epfd, NQ_ECLOSED if the port is not in an epoll set (never
 * added, or removed already), NQ_ESYS if epoll_ctl fails (errno kept; ENOENT:
 * the port was added to another epoll set; it stays attached). Called inside
 * a port callback, that dispatch stops after it. The dispatching is your
 * loop's: once the port is deleted, stop calling nq_port_dispatch for it
 * (the loop above would still do so when a deadline is due). */
NQ_EXTERN int nq_epoll_del(int epfd, nq_port_t *port);

/* The timeout to pass to epoll_wait: the smaller of loop_timeout_ms (yours;
 * -1 = none) and the port's next deadline (nq_port_timeout_ms), as an int.
 * -1 if neither has one. NQ_EINVAL for a NULL port: a negative number that
 * epoll_wait would read as "forever", so a loop that may pass NULL checks. */
NQ_EXTERN int nq_epoll_timeout(const nq_port_t *port, int loop_timeout_ms);

#ifdef __cplusplus
}
#endif
#endif /* NQ_EPOLL_H */
