/* Criterion suite "version": the version macros, the linked library's
 * version, and the build features it reports. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "nq.h"

Test(version, macros_are_consistent) {
    cr_assert(NQ_VERSION_MAJOR >= 0 && NQ_VERSION_MAJOR <= 255);
    cr_assert(NQ_VERSION_MINOR >= 0 && NQ_VERSION_MINOR <= 255);
    cr_assert(NQ_VERSION_PATCH >= 0 && NQ_VERSION_PATCH <= 255);
    cr_assert_eq(NQ_VERSION_HEX,
                 (NQ_VERSION_MAJOR << 16) | (NQ_VERSION_MINOR << 8) | NQ_VERSION_PATCH);
    char expect[32];
    snprintf(expect, sizeof(expect), "%d.%d.%d", NQ_VERSION_MAJOR, NQ_VERSION_MINOR,
             NQ_VERSION_PATCH);
    cr_assert_str_eq(NQ_VERSION_STRING, expect);
}

Test(version, library_matches_header) {
    cr_assert_eq(nq_version(), NQ_VERSION_HEX, "library %#x, header %#x", nq_version(),
                 (unsigned)NQ_VERSION_HEX);
    const char *v = nq_version_string();
    cr_assert_not_null(v);
    cr_assert_str_eq(v, NQ_VERSION_STRING);
    cr_assert_eq(nq_version_string(), v, "a static string");
    /* The string and the number say the same thing. */
    unsigned major, minor, patch;
    char tail;
    cr_assert_eq(sscanf(v, "%u.%u.%u%c", &major, &minor, &patch, &tail), 3,
                 "\"%s\" is not MAJOR.MINOR.PATCH", v);
    cr_assert_eq((major << 16) | (minor << 8) | patch, nq_version());
}

Test(version, matches_the_package) {
#ifdef NQ_PACKAGE_VERSION
    /* The build passes -DNQ_PACKAGE_VERSION="x.y.z" from configure.ac. */
    cr_assert_str_eq(nq_version_string(), NQ_PACKAGE_VERSION,
                     "configure.ac says %s, include/nq/version.h says %s", NQ_PACKAGE_VERSION,
                     nq_version_string());
#else
    cr_skip_test("built without NQ_PACKAGE_VERSION");
#endif
}

Test(version, features_match_the_build) {
    unsigned f = nq_features();
    cr_assert_eq(f & ~(NQ_FEATURE_JEMALLOC | NQ_FEATURE_FUTEX), 0, "unknown feature bits %#x", f);
#ifdef __linux__
    cr_assert(f & NQ_FEATURE_FUTEX, "Linux builds park on futexes");
#endif
#ifdef NQ_WITH_JEMALLOC
    cr_assert(f & NQ_FEATURE_JEMALLOC, "built --with-jemalloc but the library does not say so");
#else
    cr_assert_not(f & NQ_FEATURE_JEMALLOC, "built without jemalloc but the library says it has it");
#endif
    cr_assert_eq(nq_features(), f, "the answer does not change");
}
