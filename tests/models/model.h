/* Shared pieces of the Relacy models of libnq's wake-up protocols
 * (tests/models/, one program per protocol; tests/test_models.sh runs them).
 *
 * Each model restates, with rl::atomic and the same memory_order as the C
 * code, the steps of one protocol, and checks it under Relacy's scheduler
 * (which also explores the weak-memory outcomes of non-seq_cst loads). A
 * lost wake-up shows as a "deadlock": the consumer sleeps in the model
 * futex with every other thread finished. Each model also runs at least one
 * deliberately broken variant that Relacy must catch, so the model is shown
 * able to fail.
 *
 * What is modelled here:
 *   futex     FUTEX_WAIT/FUTEX_WAKE on one word, as the kernel documents
 *             them: a full barrier on both sides, and "compare, then
 *             queue" atomic against a wake (the hash-bucket lock). Untimed
 *             waits never wake spuriously, so a lost wake-up cannot hide
 *             behind one; timed waits (the evq's nap) may time out.
 *   nq__park  src/core/park.h, step by step (P, L, R and the xchg).
 *   nq__lock  src/core/lock.h: a compare-exchange (acquire) to take, a
 *             load and a store (release) to drop, the WANTED request of a
 *             waiting consumer (relaxed fetch_or) that producers
 *             (take_polite) defer to until it expires; its spin (relaxed
 *             loads, cpu_relax, sched_yield) is one rl::yield per turn, so
 *             the scheduler runs the holder. The model asks at its first
 *             wait (the C code after a while), so the request's
 *             interleavings are explored.
 */
#ifndef NQ_MODELS_MODEL_H
#define NQ_MODELS_MODEL_H

#include <relacy/relacy.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>

namespace nqm {

typedef rl::memory_order mo_t;

/* --- the kernel's futex ---------------------------------------------------- */

/* FUTEX_WAIT(word, val): 0 when woken, -1 (EAGAIN) when word != val, 1 on
 * a timeout (timed waits only). The barrier, the load and the queueing run
 * with preemption off, as rl::rl_futex does; unlike rl_futex no spurious
 * wake-up is allowed (libnq never counts on one, and one would hide a lost
 * wake-up). */
inline int futex_wait(rl::atomic<unsigned> &word, unsigned val, bool timed) {
    rl::context &c = rl::ctx();
    c.sched();
    c.atomic_thread_fence_seq_cst();
    unsigned v;
    {
        rl::preemption_disabler pd(c);
        v = word.load(rl::mo_acquire, $);
    }
    if (v != val)
        return -1;
    rl::unpark_reason r = word.wait(c, timed, false, $);
    return r == rl::unpark_reason_normal ? 0 : 1;
}

/* FUTEX_WAKE(word, 1). */
inline void futex_wake(rl::atomic<unsigned> &word) {
    rl::context &c = rl::ctx();
    c.sched();
    c.atomic_thread_fence_seq_cst();
    word.wake(c, 1, $);
}

/* --- src/core/park.h --------------------------------------------------------- */

/* The orderings of park.h; a broken variant weakens one of them. */
struct park_orders {
    mo_t prepare; /* P: store 1, seq_cst */
    mo_t claim;   /* R: load, then xchg; both seq_cst */
};
inline park_orders park_orders_c() {
    park_orders o = {rl::mo_seq_cst, rl::mo_seq_cst};
    return o;
}

struct park {
    rl::atomic<unsigned> word;
    park() { word($).store(0, rl::mo_relaxed); }
    /* nq__park_prepare */
    void prepare(const park_orders &o) { word($).store(1, o.prepare); }
    /* nq__park_cancel: relaxed */
    void cancel() { word($).store(0, rl::mo_relaxed); }
    /* nq__park_commit, untimed (NQ__NO_DEADLINE) or timed: 0 woken or
     * EAGAIN (the caller re-checks either way), 1 timed out. */
    int commit(bool timed) {
        int r = futex_wait(word, 1, timed);
        return r == 1 ? 1 : 0;
    }
    /* nq__park_claim */
    bool claim(const park_orders &o) {
        if (word($).load(o.claim) == 0)
            return false;
        return word($).exchange(0, o.claim) != 0;
    }
    /* nq__park_wake_slow */
    void wake_slow() { futex_wake(word); }
    /* nq__park_wake */
    bool wake(const park_orders &o) {
        if (!claim(o))
            return false;
        wake_slow();
        return true;
    }
};

/* --- src/core/lock.h ------------------------------------------------------- */

struct lock {
    enum { HELD = 1, WANTED = 2 };
    /* Deliberately broken variants, for tests/models/lock.cpp only. */
    enum { OK = 0, BROKEN_DROP_RELAXED, BROKEN_TAKE_BY_STORE, BROKEN_TAKE_KEEPS_WANTED };
    int broken;
    rl::atomic<unsigned> held;
    lock() : broken(OK) { held($).store(0, rl::mo_relaxed); }
    /* nq__lock: for everything but the notify path */
    void take() {
        unsigned v = 0;
        if (held($).compare_exchange_strong(v, HELD, rl::mo_acquire, rl::mo_relaxed))
            return;
        for (;;) {
            v = held($).load(rl::mo_relaxed);
            if (!(v & HELD)) {
                if (broken == BROKEN_TAKE_BY_STORE) { /* not atomic with the load */
                    held($).store(HELD, rl::mo_relaxed);
                    rl::atomic_thread_fence(rl::mo_acquire, $);
                    return;
                }
                /* BROKEN_TAKE_KEEPS_WANTED: the taker leaves the request
                 * standing, so once no consumer waits the producers defer
                 * to nobody forever. */
                unsigned to = broken == BROKEN_TAKE_KEEPS_WANTED ? (v | HELD) : (unsigned)HELD;
                if (held($).compare_exchange_strong(v, to, rl::mo_acquire, rl::mo_relaxed))
                    return;
                continue;
            }
            if (!(v & WANTED))
                held($).fetch_or(WANTED, rl::mo_relaxed);
            rl::yield(1, $);
        }
    }
    /* nq__lock_polite: the notify path, never while a request stands */
    /* ... and the request expires (L4): the C code 1 ms after this call
     * first saw it on a free lock, the model at the third look. BROKEN_TAKE_KEEPS_
     * WANTED has no expiry either, so its stale request is a livelock. */
    void take_polite() {
        unsigned v = 0;
        if (held($).compare_exchange_strong(v, HELD, rl::mo_acquire, rl::mo_relaxed))
            return;
        unsigned looks = 0;
        for (;;) {
            v = held($).load(rl::mo_relaxed);
            bool take = v == 0;
            if (v == WANTED)
                take = broken != BROKEN_TAKE_KEEPS_WANTED && ++looks >= 3;
            if (take && held($).compare_exchange_strong(v, HELD, rl::mo_acquire, rl::mo_relaxed))
                return;
            rl::yield(1, $);
        }
    }
    void drop() {
        unsigned v = held($).load(rl::mo_relaxed);
        held($).store(v & ~(unsigned)HELD,
                      broken == BROKEN_DROP_RELAXED ? rl::mo_relaxed : rl::mo_release);
    }
};

/* --- running the checks ---------------------------------------------------- */

/* Figures are scaled by NQ_MODEL_SCALE (default 1): random-schedule
 * iterations are multiplied by it, so a longer run is one variable away. */
inline unsigned long scaled(unsigned long n) {
    const char *s = std::getenv("NQ_MODEL_SCALE");
    unsigned long k = s != NULL ? std::strtoul(s, NULL, 10) : 1;
    return n * (k == 0 ? 1 : k);
}

/* Relacy replaces operator new and delete, and writes the history of a
 * failing execution from inside its simulation: a std::ostringstream there
 * would free memory Relacy did not hand out. This stream writes into a
 * fixed buffer and allocates nothing. */
class fixed_buf : public std::streambuf {
  public:
    fixed_buf() { setp(buf_, buf_ + sizeof(buf_) - 1); }
    void reset() { setp(buf_, buf_ + sizeof(buf_) - 1); }
    std::string str() const { return std::string(pbase(), pptr()); }
  protected:
    int_type overflow(int_type) { return traits_type::eof(); }
  private:
    char buf_[1 << 16];
};

/* The preemption bound of the exhaustive (context-bound) search: the
 * model's default, or NQ_MODEL_BOUND. */
inline unsigned bound(unsigned dflt) {
    const char *s = std::getenv("NQ_MODEL_BOUND");
    return s != NULL && std::atoi(s) > 0 ? (unsigned)std::atoi(s) : dflt;
}

struct report {
    int failures;
    report() : failures(0) {}
};

/* What a run must show: a correct variant passes every execution; a broken
 * one fails in some execution of the exhaustive (bounded) search. Random
 * schedules of a broken variant are reported for information only. */
enum expect { MUST_PASS, MUST_FAIL, MAY_FAIL };

/* Runs Test under one scheduler and prints one "# " line. */
template <class Test>
bool check(report &rep, const char *model, const char *what, rl::scheduler_type_e sched,
           unsigned long iters, unsigned bound, expect e) {
    bool must_fail = e != MUST_PASS;
    rl::test_params p;
    static fixed_buf buf; /* 64 KiB: not on the stack */
    buf.reset();
    std::ostream out(&buf);
    p.search_type = sched;
    p.iteration_count = iters;
    p.context_bound = bound;
    p.output_stream = &out;
    static fixed_buf progress_buf; /* Relacy's percentages: dropped */
    progress_buf.reset();
    std::ostream progress(&progress_buf);
    p.progress_stream = &progress;
    rl::simulate<Test>(p);
    bool failed = p.test_result != rl::test_result_success;
    bool ok = failed == must_fail || e == MAY_FAIL;
    char how[64];
    if (sched == rl::random_scheduler_type)
        std::snprintf(how, sizeof(how), "random schedules");
    else if (sched == rl::fair_full_search_scheduler_type)
        std::snprintf(how, sizeof(how), "full search");
    else
        std::snprintf(how, sizeof(how), "exhaustive search, at most %u preemptions", bound);
    /* Relacy's first line after the test's name says what failed. */
    std::string text = buf.str(), why;
    size_t nl = text.find('\n');
    if (failed && nl != std::string::npos)
        why = text.substr(nl + 1, text.find('\n', nl + 1) - nl - 1);
    unsigned long n = (unsigned long)p.stop_iteration;
    if (!must_fail)
        std::printf("# %s: %s: %s: %lu executions, %s%s\n", model, what, how, n,
                    failed ? "FAILED: " : "all passed", why.c_str());
    else if (failed)
        std::printf("# %s: %s: %s: caught after %lu executions: %s\n", model, what, how, n,
                    why.c_str());
    else
        std::printf("# %s: %s: %s: %s in %lu executions\n", model, what, how,
                    e == MAY_FAIL ? "not hit (information only)" : "NOT CAUGHT", n);
    if (!ok) {
        rep.failures++;
        /* Relacy's history of the failing execution, for a reader. */
        std::istringstream in(text);
        std::string line;
        for (int k = 0; k < 60 && std::getline(in, line); k++)
            std::printf("#   %s\n", line.c_str());
    }
    std::fflush(stdout);
    return ok;
}

inline int finish(const report &rep, const char *model) {
    std::printf("# %s: %s\n", model, rep.failures == 0 ? "all as expected" : "UNEXPECTED RESULTS");
    return rep.failures == 0 ? 0 : 1;
}

} // namespace nqm

#endif
