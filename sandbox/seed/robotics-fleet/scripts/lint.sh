#!/bin/sh
# Lint: the Python compiles, config values are integers.
set -eu
cd "$(dirname "$0")/.."
python3 -m py_compile app/fleet_planner.py tests/test_planner.py
status=0
for f in config/*; do
  v=$(tr -d ' \n\r' <"$f")
  case "$v" in '' | *[!0-9]*) echo "lint: $f must be an integer, got '$v'"; status=1 ;; esac
done
[ "$status" -eq 0 ] && echo "lint: ok"
exit "$status"
