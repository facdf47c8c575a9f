#!/bin/sh
# Unit tests: each CGI script, run directly with the settings a test chooses.
set -u
cd "$(dirname "$0")/.."
. tests/helpers.sh
APP_DIR=$(mktemp -d)
export APP_DIR
cp app/lib.sh "$APP_DIR/" && cp -r config "$APP_DIR/config"

out=$(sh www/cgi-bin/healthz)
expect_contains "healthz answers 200" "$out" "Status: 200"

out=$(APP_VERSION=abc1234 sh www/cgi-bin/status)
expect_contains "status answers 200" "$out" "Status: 200"
expect_contains "status names the version" "$out" '"version":"abc1234"'

out=$(FAIL_RATE=100 sh www/cgi-bin/status)
expect_contains "FAIL_RATE=100 answers 500" "$out" "Status: 500"

echo 100 >"$APP_DIR/config/fail_rate"
out=$(sh www/cgi-bin/status)
expect_contains "config/fail_rate is honoured" "$out" "Status: 500"
echo 0 >"$APP_DIR/config/fail_rate"

out=$(LATENCY_MS=1 sh www/cgi-bin/work)
expect_contains "work answers with its latency" "$out" '"latency_ms":1'

# The call to fleet-planner: nothing answers at FLEET_PLANNER_URL here (no network), so 502.
out=$(FLEET_PLANNER_URL=http://127.0.0.1:1 QUERY_STRING=robot=r1 sh www/cgi-bin/fleet)
expect_contains "fleet answers 502 when the planner does not answer" "$out" "Status: 502"

rm -rf "$APP_DIR"
finish
