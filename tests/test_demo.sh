#!/bin/sh
# Runs the README's demo (examples/uv_workers, what scripts/demo runs) briefly:
# it must verify its own accounting and say OK. Skipped when libuv was not
# found (the program is not built then).
echo "1..1"
prog="$top_builddir/examples/uv_workers"
if [ ! -x "$prog" ]; then
  echo "ok 1 # SKIP uv_workers not built (libuv not found)"
  exit 0
fi
out=$("$prog" -d 1 -q 2>&1)
rc=$?
if [ $rc -eq 0 ] && printf '%s\n' "$out" | grep -q '^OK'; then
  echo "ok 1 - uv_workers -d 1 -q: accounting exact"
else
  echo "not ok 1 - uv_workers -d 1 -q (exit $rc)"; printf '%s\n' "$out" | sed 's/^/# /'
fi
