/* A test suite with one fault that valgrind memcheck must report from the
 * test runner's child process: an error there does not change the
 * runner's exit status, so tests/test_memcheck.sh counts valgrind's error
 * markers, and this canary proves that it sees them. Not a `make check`
 * suite: natively it passes. */
#include <criterion/criterion.h>
#include <stdlib.h>

Test(memcheck_canary, uninitialised_branch_and_a_lost_block) {
    int *volatile p = malloc(sizeof(int));
    cr_assert_not_null(p);
    volatile int seen = 0;
    if (*p == 42) /* never written: memcheck reports the branch */
        seen = 1;
    (void)seen;
    free(p);
    char *volatile lost = malloc(100); /* never freed: a definite leak */
    cr_assert_not_null(lost);
    lost[0] = 1;
    lost = NULL;
}
