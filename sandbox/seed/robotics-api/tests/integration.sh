#!/bin/sh
# Integration test: the front door (nc + httpd in inetd mode) serves the public paths on
# loopback, as in the image. Needs no network beyond the container's own loopback.
set -u
cd "$(dirname "$0")/.."
. tests/helpers.sh
APP_DIR=$(mktemp -d)
WWW_DIR=$(pwd)/www
export APP_DIR WWW_DIR
# The front door is under test here, not the failure share: a commit that raises
# config/fail_rate (the canary drill) ships, as the README says, instead of failing this
# test at random. (The unit tests pin FAIL_RATE the same way.)
FAIL_RATE=0
export FAIL_RATE
cp app/lib.sh "$APP_DIR/" && cp -r config "$APP_DIR/config"
port=$((20000 + $$ % 10000))
nc -ll -p "$port" -e "$(pwd)/app/front" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$APP_DIR"' EXIT

get() { timeout 5 wget -q -O - "http://127.0.0.1:$port$1" 2>&1; }
# (busybox wget -T crashes in this build; timeout(1) bounds the request instead)
tries=0
until get /healthz >/dev/null; do
  tries=$((tries + 1))
  [ "$tries" -gt 50 ] && { fail "server did not start"; finish; exit 1; }
  usleep 100000
done
expect_contains "GET /healthz" "$(get /healthz)" "ok"
expect_contains "GET /v1/status" "$(get /v1/status)" '"ok":true'
expect_contains "GET /v1/work" "$(get '/v1/work?n=1')" '"latency_ms"'
expect_contains "unknown path is 404" "$(get /nope)" "404"
finish
