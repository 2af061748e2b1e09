/* Criterion suite "errors": the error table (NQ_ERRNO_MAP) and the two
 * functions generated from it. */
#include <criterion/criterion.h>
#include <errno.h>
#include <limits.h>
#include <string.h>

#include "nq.h"

static const int codes[] = {
#define XX(name, value, msg) NQ_##name,
    NQ_ERRNO_MAP(XX)
#undef XX
};
#define NCODES (sizeof(codes) / sizeof(codes[0]))

Test(errors, every_code_is_negative_and_distinct) {
    cr_assert_geq(NCODES, 11);
    for (size_t i = 0; i < NCODES; i++) {
        cr_assert_lt(codes[i], 0, "%s is not negative", nq_err_name(codes[i]));
        for (size_t j = i + 1; j < NCODES; j++)
            cr_assert_neq(codes[i], codes[j], "%s and %s share a value", nq_err_name(codes[i]),
                          nq_err_name(codes[j]));
    }
}

Test(errors, errno_codes_are_negated_errno) {
    cr_assert_eq(NQ_EINVAL, -EINVAL);
    cr_assert_eq(NQ_ENOMEM, -ENOMEM);
    cr_assert_eq(NQ_EAGAIN, -EAGAIN);
    cr_assert_eq(NQ_ETIMEDOUT, -ETIMEDOUT);
    cr_assert_eq(NQ_ECANCELED, -ECANCELED);
    cr_assert_eq(NQ_EALREADY, -EALREADY);
    cr_assert_eq(NQ_EBUSY, -EBUSY);
}

Test(errors, own_codes_do_not_collide_with_errno) {
    const int own[] = {NQ_EBADH, NQ_ELIMIT, NQ_ECLOSED, NQ_ESYS};
    for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++) {
        cr_assert_lt(own[i], -4000);
        /* strerror of the matching errno would be "Unknown error N". */
        cr_assert(strstr(strerror(-own[i]), "Unknown") != NULL, "%d is an errno", -own[i]);
    }
}

Test(errors, names_and_messages_are_distinct_and_named) {
    for (size_t i = 0; i < NCODES; i++) {
        const char *name = nq_err_name(codes[i]), *msg = nq_strerror(codes[i]);
        cr_assert_not_null(name);
        cr_assert_not_null(msg);
        cr_assert_eq(strncmp(name, "NQ_E", 4), 0, "%s", name);
        cr_assert_str_neq(msg, "unknown error");
        for (size_t j = i + 1; j < NCODES; j++) {
            cr_assert_str_neq(name, nq_err_name(codes[j]));
            cr_assert_str_neq(msg, nq_strerror(codes[j]));
        }
    }
    cr_assert_str_eq(nq_err_name(NQ_EINVAL), "NQ_EINVAL");
    cr_assert_str_eq(nq_err_name(NQ_EBADH), "NQ_EBADH");
    cr_assert_str_eq(nq_strerror(NQ_ETIMEDOUT), "timed out");
}

Test(errors, unknown_values_get_the_fallbacks) {
    const int unknown[] = {0, 1, -1, -99999, INT_MIN, INT_MAX, -4000, -4005};
    for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++) {
        cr_assert_str_eq(nq_strerror(unknown[i]), "unknown error", "%d", unknown[i]);
        cr_assert_str_eq(nq_err_name(unknown[i]), "NQ_UNKNOWN", "%d", unknown[i]);
    }
}
