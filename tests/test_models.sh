#!/bin/sh
# Runs the Relacy models of libnq's wake-up protocols (tests/models/*.cpp,
# built by `make check`): each program checks its protocol's correct
# variant (an exhaustive search up to a preemption bound, then random
# schedules) and that each deliberately broken variant is caught, and
# prints its figures. NQ_MODEL_BOUND raises the bound, NQ_MODEL_SCALE
# multiplies the random schedules. Skipped in sanitizer builds (the models
# are C++ programs of their own, not instrumented code) and where Relacy
# was not found at configure time (apt-get install relacy-dev).
models="port_idle evq_ring evq_wait handle_word sub_ring sub_wake sub_close"
echo "1..7"
skip=
if grep -q '^SAN_CFLAGS = -fsanitize' "$top_builddir/Makefile" 2>/dev/null; then
  skip="sanitizer build"
elif ! grep -q '^MODEL_CXXFLAGS = ' "$top_builddir/Makefile" 2>/dev/null; then
  skip="Relacy not found at configure time (apt-get install relacy-dev)"
fi
i=0
for m in $models; do
  i=$((i + 1))
  if [ -n "$skip" ]; then
    echo "ok $i - $m # SKIP $skip"; continue
  fi
  bin="$top_builddir/tests/models/$m"
  if [ ! -x "$bin" ]; then
    echo "not ok $i - $m: $bin was not built"; continue
  fi
  start=$(date +%s)
  "$bin"
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "ok $i - $m: correct variants pass, broken variants caught ($(( $(date +%s) - start )) s)"
  else
    echo "not ok $i - $m (exit $rc)"
  fi
done
