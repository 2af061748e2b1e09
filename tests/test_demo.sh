#!/bin/sh
# Runs the README's demo briefly: it must verify its own accounting (OK).
echo "1..1"
out=$("$top_builddir/examples/evq_demo" -d 1 2>&1)
rc=$?
if [ $rc -eq 0 ] && printf '%s' "$out" | grep -q 'OK'; then
  echo "ok 1 - evq_demo -d 1"
else
  echo "not ok 1 - evq_demo -d 1 (exit $rc)"; printf '%s\n' "$out" | sed 's/^/# /'
fi
