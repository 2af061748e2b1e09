#!/bin/sh
# Runs the examples users copy from, briefly, and checks what they promise:
# worker_subscriptions accounts for every notification (OK), readme_worker
# prints what the README says it prints, the README shows readme_worker.c as
# it is in examples/ (the snippet cannot drift from the compiled file), and
# the loop examples (uv_workers, ev_workers, epoll_server) check their own
# accounting and say OK, and so does libevent_adapter (a fourth adapter on
# the public port API), whose adapter part src/adapters/README.md shows
# verbatim. A loop example whose loop library was not found is
# not built, and is skipped.
echo "1..8"
out=$("$top_builddir/examples/worker_subscriptions" -n 20000 2>&1)
if [ $? -eq 0 ] && printf '%s' "$out" | grep -q '^OK'; then
  echo "ok 1 - worker_subscriptions: stalled worker costs nothing, accounting exact"
else
  echo "not ok 1 - worker_subscriptions"; printf '%s\n' "$out" | sed 's/^/# /'
fi
out=$("$top_builddir/examples/readme_worker" 2>&1)
expect=$(printf 'got 1\ngot 2\ngot 3\ndropped 0')
if [ "$out" = "$expect" ]; then
  echo "ok 2 - readme_worker prints got 1..3, dropped 0"
else
  echo "not ok 2 - readme_worker printed:"; printf '%s\n' "$out" | sed 's/^/# /'
fi
# The README's C block that follows the line naming examples/readme_worker.c.
snippet=$(awk '/examples\/readme_worker\.c/ {armed = 1} armed && /^```c$/ {on = 1; next}
               on && /^```$/ {exit} on {print}' "$top_srcdir/README.md")
if [ -n "$snippet" ] && [ "$snippet" = "$(cat "$top_srcdir/examples/readme_worker.c")" ]; then
  echo "ok 3 - README shows examples/readme_worker.c verbatim"
else
  echo "not ok 3 - README's worker example differs from examples/readme_worker.c"
fi
n=3
for ex in uv_workers ev_workers epoll_server; do
  n=$((n + 1))
  prog="$top_builddir/examples/$ex"
  if [ ! -x "$prog" ]; then
    case $ex in
      uv_workers) why="libuv not found" ;;
      ev_workers) why="libev not found" ;;
      *) why="not built" ;;
    esac
    echo "ok $n # SKIP $ex: $why"
    continue
  fi
  out=$("$prog" -d 0.5 2>&1)
  rc=$?
  if [ $rc -eq 0 ] && printf '%s\n' "$out" | grep -q '^OK'; then
    echo "ok $n - $ex -d 0.5: accounting exact"
  else
    echo "not ok $n - $ex -d 0.5 (exit $rc)"; printf '%s\n' "$out" | sed 's/^/# /'
  fi
done
prog="$top_builddir/examples/libevent_adapter"
if [ ! -x "$prog" ]; then
  echo "ok 7 # SKIP libevent_adapter: libevent not found (apt-get install libevent-dev)"
else
  out=$("$prog" 2>&1)
  rc=$?
  if [ $rc -eq 0 ] && printf '%s\n' "$out" | grep -q '^OK'; then
    echo "ok 7 - libevent_adapter: $out"
  else
    echo "not ok 7 - libevent_adapter (exit $rc)"; printf '%s\n' "$out" | sed 's/^/# /'
  fi
fi
# The C block of src/adapters/README.md against the file's adapter part.
snippet=$(awk '/^```c$/ {on = 1; next} on && /^```$/ {exit} on {print}' \
  "$top_srcdir/src/adapters/README.md")
part=$(awk '/^\/\* --- adapter: / {on = 1} on {print} /^\/\* --- adapter end/ {exit}' \
  "$top_srcdir/examples/libevent_adapter.c")
if [ -n "$snippet" ] && [ "$snippet" = "$part" ]; then
  echo "ok 8 - src/adapters/README.md shows the libevent adapter of examples/ verbatim ($(printf '%s\n' "$part" | grep -cvE '^\s*(/\*|\*|$)') lines of code)"
else
  echo "not ok 8 - src/adapters/README.md's adapter differs from examples/libevent_adapter.c"
fi
