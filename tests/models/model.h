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
 *   nq__hold  src/core/handle.h: the handle word's HELD bit. nq__hold
 *             (nq__hold_masked) takes it with a compare-exchange (acquire) from a value
 *             without HELD (H1, H2); nq__release drops it with one plain
 *             store (release) of the value the holder computed. The word
 *             here keeps the three flags (HELD, WAITERS, RECV) in its low
 *             bits and seq above them; the generation, LIVE and the tag are
 *             left out (every model names one live handle). A thread that
 *             finds HELD set spins: one rl::yield per look, so the
 *             scheduler runs the holder. The C code's weak exchange is a
 *             strong one here (a spurious failure only retries).
 *   freed objects  Relacy reports a touch of a deleted rl::atomic or rl::var
 *             by a magic number that their destructors clear, but GCC drops
 *             those stores at -O1 (-flifetime-dse: stores to an object whose
 *             lifetime ends are dead), so such a touch goes unreported. A
 *             model whose thread frees what another may still touch marks
 *             it freed in a plain flag instead (exact: Relacy runs one
 *             thread at a time), asserts the flag clear at every touch, and
 *             deletes the memory in after().
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

/* --- src/core/handle.h: the handle word ---------------------------------- */

/* The orderings of nq__hold and nq__release; a broken variant weakens one. */
struct hold_orders {
    mo_t take; /* nq__hold's compare-exchange: acquire (H2) */
    mo_t drop; /* nq__release's store: release (H2) */
};
inline hold_orders hold_orders_c() {
    hold_orders o = {rl::mo_acquire, rl::mo_release};
    return o;
}

struct hword {
    enum { HELD = 1, WAITERS = 2, RECV = 4, FLAGS = 7, SEQ_ONE = 8 };
    rl::atomic<unsigned> word;
    hword() { word($).store(0, rl::mo_relaxed); }
    static unsigned seq(unsigned w) { return w / SEQ_ONE; }
    /* nq__hold_masked (nq__hold and nq__hold_any alike: no id to check
     * here): the word as held. */
    unsigned hold(const hold_orders &o) {
        unsigned w = word($).load(rl::mo_relaxed);
        for (;;) {
            if (!(w & HELD) && word($).compare_exchange_strong(w, w | HELD, o.take, rl::mo_relaxed))
                return w | HELD;
            if (w & HELD) {
                rl::yield(1, $); /* nq__spin_pause */
                w = word($).load(rl::mo_relaxed);
            }
        }
    }
    unsigned hold() { return hold(hold_orders_c()); }
    /* nq__release: one store of the word as computed (H1) */
    void release(unsigned w, const hold_orders &o) { word($).store(w & ~(unsigned)HELD, o.drop); }
    void release(unsigned w) { release(w, hold_orders_c()); }
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
