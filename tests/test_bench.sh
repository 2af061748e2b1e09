#!/bin/sh
# Runs the benchmark in its quick mode so it cannot rot: it must finish, pass
# its own delivery checks, and print valid JSON with every figure.
echo "1..1"
out=$("$top_builddir/bench/bench_evq" --quick --json 2>&1)
rc=$?
if [ $rc -eq 0 ] && printf '%s' "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)
names = [b["name"] for b in d["benchmarks"]]
assert len(names) >= 6, names
assert all(b["ns_per_op"] > 0 for b in d["benchmarks"]), d
'; then
  echo "ok 1 - bench_evq --quick --json"
else
  echo "not ok 1 - bench_evq --quick --json (exit $rc)"; printf '%s\n' "$out" | sed 's/^/# /'
fi
