#!/bin/sh
# Runs a Criterion test program with its TAP report on stdout, for automake's
# tap-driver.sh: the harness then counts each test case, not each program.
prog=$1; shift
exec "$prog" --tap=/dev/stdout "$@"
