#!/bin/sh
# The shared library exports only nq_ symbols (-fvisibility=hidden plus
# libtool's -export-symbols-regex), and every public function of nq.h.
lib=$top_builddir/.libs/libnq.so
echo "1..2"
if [ ! -f "$lib" ]; then
  echo "not ok 1 - $lib was not built"; echo "not ok 2 - # skipped"; exit 0
fi
bad=$(${NM:-nm} -D --defined-only "$lib" | awk '$2 ~ /^[A-Z]$/ {print $3}' | grep -v '^nq_')
if [ -z "$bad" ]; then echo "ok 1 - only nq_ symbols exported"; else
  echo "not ok 1 - symbols exported beside nq_*:"; echo "$bad" | sed 's/^/# /'; fi
missing=
for f in $(sed -n 's/^NQ_EXTERN [^(]*[ *]\(nq_[a-z0-9_]*\)(.*/\1/p' "$top_srcdir/include/nq.h"); do
  ${NM:-nm} -D --defined-only "$lib" | awk '{print $3}' | grep -qx "$f" || missing="$missing $f"
done
if [ -z "$missing" ]; then echo "ok 2 - every NQ_EXTERN function of nq.h is exported"; else
  echo "not ok 2 - declared but not exported:$missing"; fi
