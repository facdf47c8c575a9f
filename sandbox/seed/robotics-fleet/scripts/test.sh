#!/bin/sh
# Tests, run inside the check container (Debian python3, no network): sh scripts/test.sh unit
set -eu
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1
case "${1:-unit}" in
  unit) exec python3 -m unittest discover -s tests -v ;;
  *) echo "usage: scripts/test.sh unit" >&2; exit 2 ;;
esac
