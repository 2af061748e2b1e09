#!/bin/sh
# The checkers behind the test command, checked on canaries (tests/san_canary.c):
# in the TSan build, a deliberate race must be reported with the suites' own
# TSAN_OPTIONS (tests/tsan.supp, which must suppress nothing); in the
# ASan+UBSan build, a heap overflow, a signed overflow and a lost block must
# be reported. A sanitizer build whose checker stayed silent here would pass
# every suite without proving anything. The normal build checks only that
# the suppressions file is empty (tests/test_memcheck.sh covers valgrind).
canary=$top_builddir/tests/san_canary
supp=$top_srcdir/tests/tsan.supp
san=$(sed -n 's/^SAN_CFLAGS = //p' "$top_builddir/Makefile" 2>/dev/null)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/nq-san.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
n=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
notok() { n=$((n + 1)); echo "not ok $n - $*"; sed 's/^/# /' "$tmp/out" | tail -n 20; }

# expect MODE PATTERN DESCRIPTION: under the suites' own environment
# (TSAN_OPTIONS, LSAN_OPTIONS from Makefile.am) the canary must print
# PATTERN and exit non-zero, so a test that hits the same fault fails.
expect() {
  mode=$1 pat=$2; shift 2
  "$canary" "$mode" >"$tmp/out" 2>&1; rc=$?
  if grep -q "$pat" "$tmp/out" && [ $rc -ne 0 ]; then
    ok "$* (exit $rc)"
  else
    notok "$* (exit $rc, no '$pat')"
  fi
}

case $san in
  *thread*)  echo "1..2" ;;
  *address*) echo "1..4" ;;
  *)         echo "1..1" ;;
esac

# The suppressions file holds comments only.
active=$(grep -v '^[[:space:]]*\(#\|$\)' "$supp" | wc -l)
if [ "$active" -eq 0 ]; then
  ok "tests/tsan.supp suppresses nothing ($(wc -l <"$supp") lines, all comments)"
else
  grep -v '^[[:space:]]*\(#\|$\)' "$supp" >"$tmp/out"; notok "tests/tsan.supp has $active active suppressions"
fi

case $san in
  *thread*)
    # TSAN_OPTIONS comes from the test environment (Makefile.am): the same
    # options and suppressions every suite runs with.
    expect race "WARNING: ThreadSanitizer: data race" "TSan reports a deliberate race under the suites' TSAN_OPTIONS"
    ;;
  *address*)
    expect overflow "heap-buffer-overflow" "ASan reports a read one byte past a heap block"
    expect ub "signed integer overflow" "UBSan reports a signed overflow and stops (no recovery)"
    expect leak "detected memory leaks" "LeakSanitizer reports a lost block and fails"
    ;;
esac
exit 0
