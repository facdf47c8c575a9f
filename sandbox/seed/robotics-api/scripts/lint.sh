#!/bin/sh
# Lint: every shell script parses, config values are integers in range.
set -eu
cd "$(dirname "$0")/.."
status=0
for f in app/front app/lib.sh www/cgi-bin/* scripts/*.sh tests/*.sh; do
  if ! sh -n "$f"; then
    echo "lint: $f does not parse"
    status=1
  fi
done
for f in www/cgi-bin/* app/front; do
  [ -x "$f" ] || { echo "lint: $f is not executable"; status=1; }
done
check_int() { # file min max
  v=$(tr -d ' \n\r' <"$1")
  case "$v" in '' | *[!0-9]*) echo "lint: $1 must be an integer, got '$v'"; status=1; return ;; esac
  if [ "$v" -lt "$2" ] || [ "$v" -gt "$3" ]; then
    echo "lint: $1 must be between $2 and $3, got $v"
    status=1
  fi
}
check_int config/fail_rate 0 100
check_int config/latency_ms 0 60000
[ "$status" -eq 0 ] && echo "lint: ok"
exit "$status"
