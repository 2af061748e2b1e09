#!/bin/sh
# Each shared library exports only nq_ symbols (-fvisibility=hidden plus
# libtool's -export-symbols-regex), and every public function its header
# declares: libnq <nq.h>, and each adapter built here <nq/X.h>. The adapters
# must not re-export the core, and the core must not link a loop.
n=0
check() { # LIB HEADER
  lib=$top_builddir/.libs/$1.so
  n=$((n + 1))
  if [ ! -f "$lib" ]; then echo "ok $n - $1 # SKIP not built"; n=$((n + 1)); echo "ok $n - # SKIP"; return; fi
  bad=$(${NM:-nm} -D --defined-only "$lib" | awk '$2 ~ /^[A-Z]$/ {print $3}' | grep -v '^nq_')
  if [ -z "$bad" ]; then echo "ok $n - $1: only nq_ symbols exported"; else
    echo "not ok $n - $1 exports beside nq_*:"; echo "$bad" | sed 's/^/# /'; fi
  n=$((n + 1))
  missing=
  for f in $(sed -n 's/^NQ_EXTERN [^(]*[ *]\(nq_[a-z0-9_]*\)(.*/\1/p' "$top_srcdir/include/$2"); do
    ${NM:-nm} -D --defined-only "$lib" | awk '{print $3}' | grep -qx "$f" || missing="$missing $f"
  done
  if [ -z "$missing" ]; then echo "ok $n - $1: every NQ_EXTERN function of $2 is exported"; else
    echo "not ok $n - $1: declared in $2 but not exported:$missing"; fi
}
echo "1..9"
check libnq nq.h
check libnq-uv nq/uv.h
check libnq-ev nq/ev.h
check libnq-epoll nq/epoll.h
n=$((n + 1))
core=$top_builddir/.libs/libnq.so
if [ -f "$core" ] && ! ${OBJDUMP:-objdump} -p "$core" | grep -q 'NEEDED.*lib\(uv\|ev\)\.so'; then
  echo "ok $n - libnq links no event loop"
else
  echo "not ok $n - libnq links an event loop (or was not built)"
fi
