/* The runner for the Criterion stand-in (criterion/criterion.h here): runs
 * each registered test in a forked child, in registration order, with its
 * timeout, and prints TAP on stdout (failure messages on stderr). Used only
 * by the ThreadSanitizer build. Exit status: 0 if every test passed. */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "criterion/criterion.h"

#define NQT_SKIP_EXIT 77

static struct nqt_test *head, **tail = &head;
static int failed_expectations;

void nqt_register(struct nqt_test *t) {
    *tail = t;
    tail = &t->next;
}

void nqt_fail(const char *file, int line, int fatal, const char *expr, const char *fmt, ...) {
    fprintf(stderr, "%s:%d: %s failed: %s", file, line, fatal ? "assertion" : "expectation", expr);
    if (fmt[1] != '\0') { /* fmt is " " followed by the caller's format */
        va_list ap;
        va_start(ap, fmt);
        fputc(':', stderr);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
    }
    fputc('\n', stderr);
    if (fatal) {
        fflush(NULL);
        _exit(1);
    }
    failed_expectations++;
}

void nqt_skip(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("skipped: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    fflush(NULL);
    _exit(NQT_SKIP_EXIT);
}

void nqt_log(const char *level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "[%s] ", level);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

int main(int argc, char **argv) {
    (void)argc;
    (void)argv; /* --tap=... and other Criterion options: TAP is all we print */
    int n = 0, bad = 0;
    for (struct nqt_test *t = head; t != NULL; t = t->next)
        n++;
    printf("TAP version 13\n1..%d\n", n);
    fflush(stdout);
    int i = 0;
    for (struct nqt_test *t = head; t != NULL; t = t->next) {
        i++;
        if (t->opts.disabled) {
            printf("ok %d - %s::%s # SKIP disabled\n", i, t->suite, t->name);
            continue;
        }
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            if (t->opts.timeout > 0)
                alarm((unsigned)(t->opts.timeout + 0.999));
            t->fn();
            fflush(NULL);
            _exit(failed_expectations ? 1 : 0);
        }
        int status;
        while (waitpid(pid, &status, 0) < 0) {
        }
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
            printf("ok %d - %s::%s\n", i, t->suite, t->name);
        } else if (WIFEXITED(status) && WEXITSTATUS(status) == NQT_SKIP_EXIT) {
            printf("ok %d - %s::%s # SKIP\n", i, t->suite, t->name);
        } else {
            bad++;
            if (WIFSIGNALED(status))
                printf("not ok %d - %s::%s # crashed: %s\n", i, t->suite, t->name,
                       WTERMSIG(status) == SIGALRM ? "timed out" : strsignal(WTERMSIG(status)));
            else
                printf("not ok %d - %s::%s\n", i, t->suite, t->name);
        }
        fflush(stdout);
    }
    return bad ? 1 : 0;
}
