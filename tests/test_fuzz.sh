#!/bin/sh
# The libFuzzer target tests/fuzz/fuzz_api.c: API calls decoded from bytes,
# checked against a reference model (see tests/fuzz/README.md). Runs only in
# a clang build with ASan + UBSan (scripts/test's asan build); elsewhere it
# skips. It builds the target from the sources with
# -fsanitize=fuzzer,address,undefined (the library's own objects are not
# instrumented for coverage), replays every input of tests/fuzz/regressions/
# and of the seed corpus tests/fuzz/corpus/, then fuzzes for NQ_FUZZ_SECONDS
# (default 120; 0 replays only) on a copy of the corpus under
# $top_builddir/tests/fuzz-work/, and prints "# N execs, corpus M, crashes 0".
# A crash leaves its input there: the log shows it in base64 with the trace
# of its operations; add it to tests/fuzz/regressions/.
: "${top_srcdir:=.}" "${top_builddir:=.}"
seconds=${NQ_FUZZ_SECONDS:-120}
cc=${NQ_FUZZ_CC:-cc}
fz=$top_srcdir/tests/fuzz
work=$top_builddir/tests/fuzz-work

case " ${NQ_FUZZ_SAN_CFLAGS:-} " in
  *-fsanitize=*address*) case " ${NQ_FUZZ_SAN_CFLAGS:-} " in
                           *undefined*) san=yes ;; *) san=no ;; esac ;;
  *) san=no ;;
esac
if [ "$san" != yes ] || ! "$cc" --version 2>/dev/null | grep -q clang; then
  echo "1..0 # SKIP the fuzz target needs the clang build with ASan + UBSan (CC=$cc, sanitizers: ${NQ_FUZZ_SAN_CFLAGS:-none})"
  exit 0
fi
echo "1..4"

rm -rf "$work"
mkdir -p "$work/corpus" "$work/artifacts"
bin=$work/fuzz_api
# LSAN_OPTIONS from the test environment reports leaks without failing: here
# a leak must fail the input.
LSAN_OPTIONS=detect_leaks=1
export LSAN_OPTIONS

if "$cc" -std=c11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer -pthread \
     -Wall -Wextra -Werror -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
     -I"$top_srcdir/include" -I"$top_srcdir/src" -I"$top_builddir" \
     "$top_srcdir"/src/core/*.c "$fz/fuzz_api.c" ${NQ_FUZZ_LIBS:-} -o "$bin" >"$work/build.out" 2>&1; then
  echo "ok 1 - fuzz target builds (clang -fsanitize=fuzzer,address,undefined)"
else
  echo "not ok 1 - fuzz target builds"
  sed 's/^/# /' "$work/build.out" | head -n 40
  for i in 2 3 4; do echo "not ok $i - # no fuzz target"; done
  exit 0
fi

# replay NAME DIR: run every file of DIR once; a failure shows its trace.
replay() {
  n=$1 dir=$2
  files=$(find "$dir" -type f ! -name '*.md' | sort)
  count=$(printf '%s\n' "$files" | grep -c .)
  if [ "$count" -eq 0 ]; then echo "ok $n - $dir: no inputs"; return; fi
  # shellcheck disable=SC2086 # the names are ours: no spaces
  if "$bin" -runs=1 $files >"$work/replay$n.out" 2>&1; then
    echo "ok $n - $dir: $count inputs replay clean"
  else
    echo "not ok $n - $dir: an input fails"
    grep -E '^(Running:|fuzz_api:|SUMMARY|==[0-9]+==ERROR)' "$work/replay$n.out" | tail -n 10 | sed 's/^/# /'
    bad=$(sed -n 's/^Running: //p' "$work/replay$n.out" | tail -n 1)
    [ -n "$bad" ] && NQ_FUZZ_TRACE=1 "$bin" "$bad" 2>&1 | grep -v '^    #' | tail -n 40 | sed 's/^/# /'
  fi
}
replay 2 "$fz/regressions"
replay 3 "$fz/corpus"

if [ "$seconds" -eq 0 ]; then
  echo "ok 4 - fuzzing # SKIP NQ_FUZZ_SECONDS=0"
  exit 0
fi
cp "$fz"/corpus/* "$work/corpus/"
start=$(date +%s)
"$bin" -max_total_time="$seconds" -max_len=512 -timeout=20 -print_final_stats=1 \
  -artifact_prefix="$work/artifacts/" "$work/corpus" >"$work/fuzz.out" 2>&1
rc=$?
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/fuzz.out")
corpus=$(find "$work/corpus" -type f | wc -l)
crashes=$(find "$work/artifacts" -type f | wc -l)
echo "# $execs execs in $(( $(date +%s) - start )) s, corpus $corpus, crashes $crashes"
if [ "$rc" -eq 0 ] && [ "$crashes" -eq 0 ] && [ -n "$execs" ]; then
  echo "ok 4 - fuzzed ${seconds} s: ${execs} execs, corpus ${corpus}, crashes 0"
else
  echo "not ok 4 - fuzzing found a failure (exit $rc, $crashes inputs saved in $work/artifacts)"
  grep -E '^(fuzz_api:|SUMMARY|==[0-9]+==ERROR|Base64:)' "$work/fuzz.out" | tail -n 10 | sed 's/^/# /'
  for f in "$work"/artifacts/*; do
    [ -f "$f" ] || continue
    echo "# $f (base64: $(base64 -w0 "$f")); its operations:"
    NQ_FUZZ_TRACE=1 "$bin" "$f" 2>&1 | grep -v '^    #' | tail -n 40 | sed 's/^/#   /'
  done
fi
