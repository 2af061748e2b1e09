/* Criterion suite "version": the version macros, the linked library's
 * version, and the build features it reports. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "nq.h"

Test(version, library_matches_header) {
    cr_assert_eq(nq_version(), NQ_VERSION_HEX);
    cr_assert_str_eq(nq_version_string(), NQ_VERSION_STRING);
    char expect[32];
    snprintf(expect, sizeof(expect), "%d.%d.%d", NQ_VERSION_MAJOR, NQ_VERSION_MINOR,
             NQ_VERSION_PATCH);
    cr_assert_str_eq(nq_version_string(), expect);
}

Test(version, matches_the_package) {
#ifdef NQ_PACKAGE_VERSION
    cr_assert_str_eq(nq_version_string(), NQ_PACKAGE_VERSION,
                     "configure.ac says %s, include/nq/version.h says %s", NQ_PACKAGE_VERSION,
                     nq_version_string());
#else
    cr_skip_test("built without NQ_PACKAGE_VERSION");
#endif
}

Test(version, features_match_the_build) {
    unsigned f = nq_features();
    cr_assert(f & NQ_FEATURE_FUTEX, "Linux builds park on futexes");
#ifdef NQ_WITH_JEMALLOC
    cr_assert(f & NQ_FEATURE_JEMALLOC, "built --with-jemalloc but the library does not say so");
#else
    cr_assert_not(f & NQ_FEATURE_JEMALLOC, "built without jemalloc but the library says it has it");
#endif
}
