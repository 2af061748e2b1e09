/* The comparison benchmarks' shared pieces (bench/cmp_*.c): the clock, CPU
 * pinning, percentiles, peak memory, the command line every program takes,
 * and the one-line JSON result each run prints. Header-only: each program
 * is one file plus this, so a reader sees everything a figure depends on.
 *
 * Every cmp_* program runs ONE (workload, contender) pair per invocation and
 * prints ONE JSON object on a line of its own to stdout:
 *   {"program":"cmp_flow","workload":"a","contender":"nq_uv","ok":true,
 *    "note":"...", "<figure>": <number>, ...}
 * "ok" is false when the run's exact accounting failed (sent != delivered +
 * dropped, a duplicate, a reordering): such a run is reported as failing,
 * never as fast. scripts/bench-compare runs every pair several times and
 * takes medians. Figure names (use these, so the driver can compare):
 *   notifies_per_s   notifications delivered (or accounted) per second,
 *                    end to end: first notify to last delivery
 *   producer_ns      producer's own time per notify call
 *   sent, delivered, dropped     the accounting (integers)
 *   lat_p50_ns, lat_p99_ns, lat_p999_ns    latency percentiles
 *   peak_rss_kb      the process's peak resident set (getrusage)
 *   bytes_per_handle, bytes_per_sub        memory per object
 *   syscalls_per_1M  syscalls per 1M notifications from the library's own
 *                    counters (libnq's eventfd reads + writes); peers have
 *                    none: the driver's strace pass measures everyone
 *
 * Command line: --workload W --contender C [--quick] [--n N] [--list]
 * --list prints the supported pairs, "W C" per line.
 */
#ifndef NQ_BENCH_HARNESS_H
#define NQ_BENCH_HARNESS_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_setaffinity, CPU_SET */
#endif
#include <errno.h>
#include <inttypes.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static inline int64_t h_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Pins the calling thread to cpu (0-based). 0, or -errno. */
static inline int h_pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof(set), &set) == 0 ? 0 : -errno;
}

static inline int h_ncpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static inline int h_cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Sorts v in place and returns its p-quantile (0 <= p <= 1), nearest rank. */
static inline int64_t h_percentile(int64_t *v, size_t n, double p) {
    if (n == 0)
        return 0;
    qsort(v, n, sizeof(*v), h_cmp_i64);
    size_t k = (size_t)(p * (double)n);
    if (k >= n)
        k = n - 1;
    return v[k];
}

static inline long h_peak_rss_kb(void) {
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) == 0 ? ru.ru_maxrss : -1;
}

/* Resident set now, in KiB (/proc/self/statm). */
static inline long h_rss_kb(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, res = -1;
    if (f != NULL) {
        if (fscanf(f, "%ld %ld", &size, &res) != 2)
            res = -1;
        fclose(f);
    }
    return res < 0 ? -1 : res * (sysconf(_SC_PAGESIZE) / 1024);
}

/* --- the command line ---------------------------------------------------- */

typedef struct h_opts {
    const char *workload;
    const char *contender;
    int quick;
    long n; /* 0: the program's default for the mode */
    int list;
} h_opts_t;

static inline void h_usage(const char *prog, const char *pairs) {
    fprintf(stderr,
            "usage: %s --workload W --contender C [--quick] [--n N]\n"
            "       %s --list\n"
            "pairs (workload contender):\n%s",
            prog, prog, pairs);
}

/* Parses argv; exits 2 with usage on an error. */
static inline h_opts_t h_parse(int argc, char **argv, const char *pairs) {
    h_opts_t o;
    memset(&o, 0, sizeof(o));
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--workload") == 0 && i + 1 < argc)
            o.workload = argv[++i];
        else if (strcmp(argv[i], "--contender") == 0 && i + 1 < argc)
            o.contender = argv[++i];
        else if (strcmp(argv[i], "--n") == 0 && i + 1 < argc)
            o.n = strtol(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--quick") == 0)
            o.quick = 1;
        else if (strcmp(argv[i], "--list") == 0)
            o.list = 1;
        else {
            h_usage(argv[0], pairs);
            exit(2);
        }
    }
    if (o.list) {
        fputs(pairs, stdout);
        exit(0);
    }
    if (o.workload == NULL || o.contender == NULL) {
        h_usage(argv[0], pairs);
        exit(2);
    }
    return o;
}

/* --- the JSON result line ------------------------------------------------ */

typedef struct h_result {
    char buf[8192];
    size_t len;
} h_result_t;

static inline void h_add(h_result_t *r, const char *fmt, ...) {
    if (r->len >= sizeof(r->buf))
        return;
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(r->buf + r->len, sizeof(r->buf) - r->len, fmt, ap);
    va_end(ap);
    if (k > 0)
        r->len += (size_t)k;
}

static inline void h_begin(h_result_t *r, const char *program, const h_opts_t *o) {
    r->len = 0;
    h_add(r, "{\"program\":\"%s\",\"workload\":\"%s\",\"contender\":\"%s\",\"quick\":%s", program,
          o->workload, o->contender, o->quick ? "true" : "false");
}

static inline void h_num(h_result_t *r, const char *key, double v) {
    h_add(r, ",\"%s\":%.6g", key, v);
}

static inline void h_int(h_result_t *r, const char *key, int64_t v) {
    h_add(r, ",\"%s\":%" PRId64, key, v);
}

/* A string without quotes or backslashes (notes are ours). */
static inline void h_str(h_result_t *r, const char *key, const char *s) {
    h_add(r, ",\"%s\":\"%s\"", key, s);
}

/* Prints the line; returns the exit status the program should use. */
static inline int h_end(h_result_t *r, int ok, const char *note) {
    h_add(r, ",\"peak_rss_kb\":%ld,\"ok\":%s,\"note\":\"%s\"}\n", h_peak_rss_kb(),
          ok ? "true" : "false", note != NULL ? note : "");
    fwrite(r->buf, 1, r->len, stdout);
    fflush(stdout);
    return ok ? 0 : 1;
}

#endif /* NQ_BENCH_HARNESS_H */
