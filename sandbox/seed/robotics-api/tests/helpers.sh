# Test helpers: run a CGI script from this checkout as httpd would, with APP_DIR pointing
# at the checkout instead of /app.
failures=0
pass() { echo "ok   - $1"; }
fail() { echo "FAIL - $1"; failures=$((failures + 1)); }
expect_contains() { # name haystack needle
  case "$2" in *"$3"*) pass "$1" ;; *) fail "$1: expected '$3' in: $2" ;; esac
}
finish() {
  echo "$failures failure(s)"
  [ "$failures" -eq 0 ]
}
