#!/bin/sh
# Tests, run inside the check container (busybox sh only, no network):
#   sh scripts/test.sh unit         the CGI scripts answer as documented
#   sh scripts/test.sh integration  the front door maps public paths to them
set -eu
cd "$(dirname "$0")/.."
suite=${1:-unit}
case "$suite" in
  unit | integration) exec sh "tests/$suite.sh" ;;
  *) echo "usage: scripts/test.sh unit|integration" >&2; exit 2 ;;
esac
