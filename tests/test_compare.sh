#!/bin/sh
# Runs the side-by-side comparison (scripts/bench-compare) in its quick mode
# so it cannot rot: every (workload, contender) pair must run, pass its own
# exact accounting, and land in valid JSON and CSV, and the chart must be
# drawn. Figures from a quick run mean nothing; scripts/bench-compare
# without --quick makes the ones the README shows. Skipped in sanitizer
# builds (the figures there mean even less, and the suites already run) and
# where the programs were not built (libuv or libev missing).
echo "1..1"
if grep -q '^SAN_CFLAGS = -fsanitize' "$top_builddir/Makefile" 2>/dev/null; then
  echo "ok 1 # SKIP sanitizer build"; exit 0
fi
if [ ! -x "$top_builddir/bench/cmp_flow" ]; then
  echo "ok 1 # SKIP comparison programs not built (libuv or libev missing)"; exit 0
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/nq-compare.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
out=$(python3 "$top_srcdir/scripts/bench-compare" --quick --bindir "$top_builddir/bench" \
      --out "$tmp" 2>&1)
rc=$?
if [ $rc -eq 0 ] && python3 - "$tmp" <<'PY'
import csv, json, os, sys
d = sys.argv[1]
doc = json.load(open(os.path.join(d, "compare.json")))
res = doc["results"]
assert len(res) >= 20, len(res)
assert not doc["failed"], doc["failed"]
for r in res:
    assert r["ok"], r
contenders = {r["contender"] for r in res}
for c in ("nq_uv", "nq_epoll", "nq_sub", "uv_async", "ev_async", "eventfd", "condvar"):
    assert c in contenders, c
rows = list(csv.reader(open(os.path.join(d, "compare.csv"))))
assert len(rows) > len(res), len(rows)
assert os.path.getsize(os.path.join(d, "compare.png")) > 1000
PY
then
  echo "ok 1 - bench-compare --quick: $(printf '%s\n' "$out" | grep -c '^|') table rows, every pair exact"
else
  echo "not ok 1 - bench-compare --quick (exit $rc)"; printf '%s\n' "$out" | tail -n 30 | sed 's/^/# /'
fi
