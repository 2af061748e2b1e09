/* The epoll adapter: the port's eventfd in the caller's epoll set, and the
 * port's next deadline folded into the caller's epoll_wait timeout. There is
 * no state of our own beyond the port's attach mark (owner = this file), so
 * the caller's loop stays the caller's: it calls nq_port_dispatch itself.
 *
 * Level-triggered on purpose: the port keeps its fd readable while work is
 * left over (a dispatch budget was reached), so the next epoll_wait returns
 * at once, after the loop served its other fds. Edge-triggered would need
 * the caller to loop until empty, which is what a budget exists to avoid.
 */
#include <errno.h>
#include <limits.h>
#include <sys/epoll.h>

#include "nq/epoll.h"

static const char nq__epoll_owner = 0; /* its address marks "attached to epoll" */

int nq_epoll_add(int epfd, nq_port_t *port, uint64_t tag) {
    if (port == NULL || epfd < 0)
        return NQ_EINVAL;
    int fd = nq_port_fd(port);
    if (fd < 0)
        return NQ_EINVAL;
    int rc = nq_port_attach(port, &nq__epoll_owner);
    if (rc < 0)
        return rc;
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = tag;
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int saved = errno;
        (void)nq_port_detach(port, &nq__epoll_owner);
        errno = saved;
        return NQ_ESYS;
    }
    return 0;
}

int nq_epoll_del(int epfd, nq_port_t *port) {
    if (port == NULL || epfd < 0)
        return NQ_EINVAL;
    int fd = nq_port_fd(port);
    if (fd < 0)
        return NQ_EINVAL;
    if (nq_port_owner(port) != &nq__epoll_owner)
        return NQ_ECLOSED;
    struct epoll_event ev = {0}; /* ignored, but kernels before 2.6.9 want it */
    if (epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev) < 0)
        return NQ_ESYS; /* errno kept; still attached, still in its set */
    /* Only now: inside a port callback, the detach ends that dispatch. */
    return nq_port_detach(port, &nq__epoll_owner);
}

int nq_epoll_timeout(const nq_port_t *port, int loop_timeout_ms) {
    if (port == NULL)
        return NQ_EINVAL;
    int64_t ms = nq_port_timeout_ms(port);
    if (ms > INT_MAX)
        ms = INT_MAX;
    if (ms < 0)
        return loop_timeout_ms < 0 ? -1 : loop_timeout_ms;
    if (loop_timeout_ms >= 0 && loop_timeout_ms < ms)
        return loop_timeout_ms;
    return (int)ms;
}
