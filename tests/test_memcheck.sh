#!/bin/sh
# valgrind memcheck over the unit suites (normal build only: valgrind cannot
# run sanitized programs). Criterion runs each test case in a child process
# and ignores how that child exits once the case has reported, so a
# memcheck error would not change any exit status: every error is framed
# with markers (--error-markers) and counted, and a canary suite
# (tests/memcheck_canary.c) and program (tests/san_canary) prove that the
# count sees errors in both places. Leaks: definite ones are errors (the
# runner's own "possibly lost" blocks are not libnq's).
#
# Skipped: test_stress and the adapter suites (many threads and real loops:
# hours under valgrind's one-thread-at-a-time schedule; ASan and TSan run
# them), and six cases that assert a timing bound or a rate with threads
# running side by side (a waker racing a close, a producer in full flow
# against the loop's spin), which valgrind's one-thread-at-a-time schedule
# pushes past their bounds; the other builds run them.
echo "1..12"
if grep -q '^SAN_CFLAGS = -fsanitize' "$top_builddir/Makefile" 2>/dev/null; then
  for i in $(seq 1 12); do echo "ok $i # SKIP sanitizer build (valgrind runs in the normal build)"; done
  exit 0
fi
if [ -n "${NQ_DISTCHECK:-}" ]; then
  for i in $(seq 1 12); do echo "ok $i # SKIP distcheck (scripts/test ran it in the normal build)"; done
  exit 0
fi
if ! command -v valgrind >/dev/null 2>&1; then
  for i in $(seq 1 12); do echo "ok $i # SKIP valgrind not installed (scripts/deps installs it)"; done
  exit 0
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/nq-memcheck.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
vg() {
  valgrind -q --trace-children=yes --leak-check=full --errors-for-leak-kinds=definite \
    --show-leak-kinds=definite --error-markers=NQVG-BEGIN,NQVG-END "$@"
}
n=0
errors() { grep -c NQVG-BEGIN "$tmp/out"; }

# Canaries: each must show memcheck errors, or the counts below prove nothing.
for mode in uninit leak; do
  n=$((n + 1))
  vg "$top_builddir/tests/san_canary" $mode >"$tmp/out" 2>&1
  e=$(errors)
  if [ "$e" -ge 1 ]; then echo "ok $n - memcheck reports the canary's $mode ($e error)"
  else echo "not ok $n - memcheck missed the canary's $mode"; sed 's/^/# /' "$tmp/out" | tail -n 20; fi
done
n=$((n + 1))
vg "$top_builddir/tests/memcheck_canary" -j1 >"$tmp/out" 2>&1
e=$(errors)
if [ "$e" -ge 2 ]; then echo "ok $n - memcheck errors inside a test runner's child are counted ($e errors)"
else echo "not ok $n - memcheck errors inside a test runner's child were not seen ($e)"; sed 's/^/# /' "$tmp/out" | tail -n 20; fi

total_cases=0
for suite in evq errors version handles notify wait sub limits port; do
  n=$((n + 1))
  case $suite in
    notify) filter='!(*sub_waker_never_runs_after_close_returns)' ;;
    wait)   filter='!(*waker_never_runs_after_release_returns)' ;;
    port)   filter='!(*fd_goes_quiet_once_nothing_is_pending|*eventfd_writes_never_exceed_dispatch_cycles_under_concurrent_notifies|*the_pre_idle_spin_catches_a_producer_in_full_flow|*a_stalled_waker_costs_the_loop_no_busy_spin)' ;;
    *)      filter='*' ;;
  esac
  start=$(date +%s)
  vg "$top_builddir/tests/test_$suite" -j1 --filter "$filter" >"$tmp/out" 2>&1; rc=$?
  took=$(( $(date +%s) - start ))
  e=$(errors)
  cases=$(sed -n 's/.*Tested: \([0-9]*\).*/\1/p' "$tmp/out" | tail -n 1)
  failing=$(sed -n 's/.*Failing: \([0-9]*\).*Crashing: \([0-9]*\).*/\1 \2/p' "$tmp/out" | tail -n 1)
  if [ "$rc" -eq 0 ] && [ "$e" -eq 0 ] && [ -n "$cases" ] && [ "$failing" = "0 0" ]; then
    total_cases=$((total_cases + cases))
    echo "ok $n - test_$suite under memcheck: $cases cases, 0 errors, 0 definite leaks (${took} s)"
  else
    echo "not ok $n - test_$suite under memcheck: exit $rc, $e errors, failing/crashing ${failing:-?}"
    grep -v '^==[0-9]*==    by 0x.*libcriterion' "$tmp/out" | sed 's/^/# /' | head -n 60
  fi
done
echo "# memcheck: $total_cases test cases in 9 suites, 0 errors"
exit 0
