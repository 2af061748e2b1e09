/* Canaries for the checkers the test command relies on: each mode commits
 * one fault that a checker must report. tests/test_sanitizers.sh runs them
 * (never `make check` directly): a checker that stays silent on its canary
 * would pass every suite without proving anything.
 *
 *   race      two threads write one plain int            ThreadSanitizer
 *   overflow  a read one byte past a heap block           AddressSanitizer
 *   ub        a signed overflow                           UndefinedBehaviorSanitizer
 *   uninit    a branch on uninitialised heap memory       valgrind memcheck
 *   leak      a block lost for good                       LeakSanitizer, memcheck
 *
 * Without its checker each mode exits 0 (the faults are chosen not to crash). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int shared; /* race: written by two threads, no lock, no atomic */

static void *racer(void *arg) {
    for (int i = 0; i < 1000; i++)
        shared += (int)(long)arg;
    return NULL;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (strcmp(mode, "race") == 0) {
        pthread_t a, b;
        if (pthread_create(&a, NULL, racer, (void *)1L) != 0 ||
            pthread_create(&b, NULL, racer, (void *)2L) != 0)
            return 2;
        pthread_join(a, NULL);
        pthread_join(b, NULL);
        printf("%d\n", shared);
    } else if (strcmp(mode, "overflow") == 0) {
        char *volatile p = malloc(16);
        if (p == NULL)
            return 2;
        memset(p, 1, 16);
        volatile char c = p[16];
        (void)c;
        free(p);
    } else if (strcmp(mode, "ub") == 0) {
        volatile int big = 0x7fffffff;
        volatile int r = big + (argc > 0); /* INT_MAX + 1 */
        (void)r;
    } else if (strcmp(mode, "uninit") == 0) {
        int *volatile p = malloc(sizeof(int));
        if (p == NULL)
            return 2;
        if (*p == 42) /* never written */
            puts("42");
        free(p);
    } else if (strcmp(mode, "leak") == 0) {
        char *volatile p = malloc(100);
        if (p == NULL)
            return 2;
        p[0] = 1;
        p = NULL;
    } else {
        fprintf(stderr, "usage: %s race|overflow|ub|uninit|leak\n", argv[0]);
        return 2;
    }
    return 0;
}
