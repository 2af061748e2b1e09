/* A small stand-in for Criterion's <criterion/criterion.h>, used only by the
 * ThreadSanitizer build. Criterion's runner cannot start under TSan (its
 * BoxFort arena collides with TSan's memory layout: Criterion issue #274), so
 * that build compiles the same test files against this header and runner.c.
 *
 * It covers what tests/test_*.c use: Test(suite, name, .timeout = s,
 * .disabled = b), cr_assert*, cr_expect*, cr_skip_test, cr_log_*. Each test
 * runs in a forked child, as under Criterion; results are printed as TAP. */
#ifndef NQT_CRITERION_SHIM_H
#define NQT_CRITERION_SHIM_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

struct nqt_opts {
    int nqt_unused_;
    double timeout;
    bool disabled;
    const char *description;
};

struct nqt_test {
    const char *suite;
    const char *name;
    void (*fn)(void);
    struct nqt_opts opts;
    struct nqt_test *next;
};

void nqt_register(struct nqt_test *t);
void nqt_fail(const char *file, int line, int fatal, const char *expr, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
void nqt_skip(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
void nqt_log(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define Test(suite, name, ...)                                                         \
    static void nqt_fn_##suite##_##name(void);                                         \
    static struct nqt_test nqt_t_##suite##_##name = {                                  \
        #suite, #name, nqt_fn_##suite##_##name, {.nqt_unused_ = 0, __VA_ARGS__}, NULL}; \
    __attribute__((constructor)) static void nqt_reg_##suite##_##name(void) {          \
        nqt_register(&nqt_t_##suite##_##name);                                         \
    }                                                                                  \
    static void nqt_fn_##suite##_##name(void)

/* " " fmt: the message arguments are optional, as in Criterion. */
#define NQT_CHECK(fatal, cond, expr, ...)                                              \
    do {                                                                               \
        if (!(cond))                                                                   \
            nqt_fail(__FILE__, __LINE__, (fatal), (expr), " " __VA_ARGS__);            \
    } while (0)

#define cr_assert(c, ...) NQT_CHECK(1, (c), #c, __VA_ARGS__)
#define cr_assert_not(c, ...) NQT_CHECK(1, !(c), "!(" #c ")", __VA_ARGS__)
#define cr_assert_fail(...) NQT_CHECK(1, 0, "cr_assert_fail", __VA_ARGS__)
#define cr_assert_eq(a, b, ...) NQT_CHECK(1, (a) == (b), #a " == " #b, __VA_ARGS__)
#define cr_assert_neq(a, b, ...) NQT_CHECK(1, (a) != (b), #a " != " #b, __VA_ARGS__)
#define cr_assert_lt(a, b, ...) NQT_CHECK(1, (a) < (b), #a " < " #b, __VA_ARGS__)
#define cr_assert_leq(a, b, ...) NQT_CHECK(1, (a) <= (b), #a " <= " #b, __VA_ARGS__)
#define cr_assert_gt(a, b, ...) NQT_CHECK(1, (a) > (b), #a " > " #b, __VA_ARGS__)
#define cr_assert_geq(a, b, ...) NQT_CHECK(1, (a) >= (b), #a " >= " #b, __VA_ARGS__)
#define cr_assert_null(p, ...) NQT_CHECK(1, (p) == NULL, #p " == NULL", __VA_ARGS__)
#define cr_assert_not_null(p, ...) NQT_CHECK(1, (p) != NULL, #p " != NULL", __VA_ARGS__)
#define cr_assert_str_eq(a, b, ...) NQT_CHECK(1, strcmp((a), (b)) == 0, #a " eq " #b, __VA_ARGS__)
#define cr_assert_str_neq(a, b, ...) NQT_CHECK(1, strcmp((a), (b)) != 0, #a " neq " #b, __VA_ARGS__)

#define cr_expect(c, ...) NQT_CHECK(0, (c), #c, __VA_ARGS__)
#define cr_expect_not(c, ...) NQT_CHECK(0, !(c), "!(" #c ")", __VA_ARGS__)
#define cr_expect_eq(a, b, ...) NQT_CHECK(0, (a) == (b), #a " == " #b, __VA_ARGS__)
#define cr_expect_neq(a, b, ...) NQT_CHECK(0, (a) != (b), #a " != " #b, __VA_ARGS__)
#define cr_expect_lt(a, b, ...) NQT_CHECK(0, (a) < (b), #a " < " #b, __VA_ARGS__)
#define cr_expect_leq(a, b, ...) NQT_CHECK(0, (a) <= (b), #a " <= " #b, __VA_ARGS__)
#define cr_expect_gt(a, b, ...) NQT_CHECK(0, (a) > (b), #a " > " #b, __VA_ARGS__)
#define cr_expect_geq(a, b, ...) NQT_CHECK(0, (a) >= (b), #a " >= " #b, __VA_ARGS__)
#define cr_expect_null(p, ...) NQT_CHECK(0, (p) == NULL, #p " == NULL", __VA_ARGS__)
#define cr_expect_not_null(p, ...) NQT_CHECK(0, (p) != NULL, #p " != NULL", __VA_ARGS__)

#define cr_skip_test(...) nqt_skip(" " __VA_ARGS__)
#define cr_log_info(...) nqt_log("info", __VA_ARGS__)
#define cr_log_warn(...) nqt_log("warn", __VA_ARGS__)
#define cr_log_error(...) nqt_log("error", __VA_ARGS__)

#endif
