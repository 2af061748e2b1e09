#!/bin/sh
# Builds the examples against the INSTALLED library with nothing but
# pkg-config, as a user would, runs each briefly and checks it succeeds:
#   cc -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror $(pkg-config --cflags X) \
#      example.c $(pkg-config --libs X) -pthread
# with X = nq (evq_demo, worker_subscriptions, readme_worker), nq-uv
# (uv_workers), nq-ev (ev_workers), nq-epoll (epoll_server). An example whose
# .pc file was not installed (its loop library was not found) is skipped.
#
# Two modes:
#  - make installcheck sets NQ_INSTALLED_PKGCONFIG and NQ_INSTALLED_LIBDIR:
#    the real installation is tested.
#  - make check: the build is installed into a scratch DESTDIR, and
#    PKG_CONFIG_SYSROOT_DIR makes the .pc files' paths resolve inside it.
# A sanitizer build's library needs the same -fsanitize flags (and compiler)
# in the program that links it: they are taken from the build's Makefile.
# Speaks TAP, one line per example.
examples="evq_demo:nq worker_subscriptions:nq readme_worker:nq uv_workers:nq-uv
ev_workers:nq-ev epoll_server:nq-epoll"
echo "1..6"

skip_all() {
  n=0
  for e in $examples; do
    n=$((n + 1))
    echo "ok $n # SKIP ${e%%:*}: $1"
  done
  exit 0
}
fail_all() {
  n=0
  for e in $examples; do
    n=$((n + 1))
    echo "not ok $n - ${e%%:*}: $1"
  done
  exit 1
}

command -v pkg-config >/dev/null 2>&1 || skip_all "pkg-config not found"
: "${top_builddir:=.}" "${top_srcdir:=.}"
mk="$top_builddir/Makefile"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/nq-pkgconfig.XXXXXX") || fail_all "mktemp failed"
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' HUP INT TERM

if [ -n "${NQ_INSTALLED_PKGCONFIG:-}" ] && [ -n "${NQ_INSTALLED_LIBDIR:-}" ]; then
  mode="installed"
  pcdir=$NQ_INSTALLED_PKGCONFIG
  libdir=$NQ_INSTALLED_LIBDIR
  # installcheck with DESTDIR: the .pc files name the final paths, which live
  # under DESTDIR for now; find that prefix and let pkg-config add it. (It is
  # added to every -I/-L pkg-config prints, libuv's too: a libuv outside the
  # system's directories would then not be found.)
  nominal=$(PKG_CONFIG_PATH="$pcdir" pkg-config --variable=libdir nq 2>/dev/null)
  if [ -n "$nominal" ] && [ "$libdir" != "$nominal" ] && [ "${libdir%"$nominal"}" != "$libdir" ]; then
    PKG_CONFIG_SYSROOT_DIR=${libdir%"$nominal"}
    export PKG_CONFIG_SYSROOT_DIR
  fi
else
  mode="scratch DESTDIR"
  # MAKEFLAGS from a parallel `make check` names a jobserver this shell lacks.
  if ! MAKEFLAGS='' ${MAKE:-make} -C "$top_builddir" install DESTDIR="$tmp/root" \
      >"$tmp/install.log" 2>&1; then
    sed 's/^/# /' "$tmp/install.log" | tail -20
    fail_all "make install DESTDIR=... failed"
  fi
  pc=$(find "$tmp/root" -name nq.pc | head -n 1)
  so=$(find "$tmp/root" -name 'libnq.so*' | head -n 1)
  if [ -z "$pc" ] || [ -z "$so" ]; then
    fail_all "make install put no nq.pc or libnq.so under DESTDIR"
  fi
  pcdir=$(dirname "$pc")
  libdir=$(dirname "$so")
  PKG_CONFIG_SYSROOT_DIR="$tmp/root"
  export PKG_CONFIG_SYSROOT_DIR
fi
[ -f "$pcdir/nq.pc" ] || fail_all "no nq.pc in $pcdir"
# Ours first; the system's stay searched for libuv's .pc.
PKG_CONFIG_PATH="$pcdir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
export PKG_CONFIG_PATH

# The compiler and sanitizer flags of the build, when it used sanitizers.
cc=${CC:-}
san=""
if [ -f "$mk" ] && grep -q '^SAN_CFLAGS = -fsanitize' "$mk"; then
  san="$(sed -n 's/^SAN_CFLAGS = //p' "$mk") $(sed -n 's/^SAN_LDFLAGS = //p' "$mk")"
  [ -n "$cc" ] || cc=$(sed -n 's/^CC = //p' "$mk")
fi
[ -n "$cc" ] || cc=cc

n=0
for e in $examples; do
  n=$((n + 1))
  ex=${e%%:*}
  pkg=${e#*:}
  if [ ! -f "$pcdir/$pkg.pc" ]; then
    echo "ok $n # SKIP $ex: $pkg.pc not installed (its loop library was not found)"
    continue
  fi
  if ! cflags=$(pkg-config --cflags "$pkg" 2>"$tmp/pc.err") ||
     ! libs=$(pkg-config --libs "$pkg" 2>>"$tmp/pc.err"); then
    echo "not ok $n - $ex: pkg-config $pkg failed"
    sed 's/^/# /' "$tmp/pc.err"
    continue
  fi
  # shellcheck disable=SC2086 # the flags are word lists
  if ! $cc -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror $san $cflags \
      "$top_srcdir/examples/$ex.c" $libs -pthread -o "$tmp/$ex" >"$tmp/cc.log" 2>&1; then
    echo "not ok $n - $ex: does not build with pkg-config $pkg ($mode)"
    echo "# $cc -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror $san $cflags $ex.c $libs -pthread"
    sed 's/^/# /' "$tmp/cc.log" | head -20
    continue
  fi
  case $ex in
    evq_demo) args="-d 1 -t 256" ;;
    worker_subscriptions) args="-n 2000" ;;
    readme_worker) args="" ;;
    epoll_server) args="-d 0.2" ;;
    *) args="-d 0.2 -q" ;;
  esac
  # shellcheck disable=SC2086
  out=$(LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$tmp/$ex" $args 2>&1)
  rc=$?
  # readme_worker prints no verdict; the others print a line that says OK.
  if [ $rc -eq 0 ] && { [ "$ex" = readme_worker ] || printf '%s\n' "$out" | grep -q 'OK'; }; then
    echo "ok $n - $ex builds with pkg-config $pkg and runs ($mode)"
  else
    echo "not ok $n - $ex built with pkg-config $pkg fails (exit $rc, $mode)"
    printf '%s\n' "$out" | tail -20 | sed 's/^/# /'
  fi
done
