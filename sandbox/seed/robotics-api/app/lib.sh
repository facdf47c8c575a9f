# Shared by the CGI scripts (APP_DIR: where lib.sh and config/ are; /app in the image).
# Settings come from the environment first (handy when running the image by hand), then
# from config/ baked into the image: config/<file>.<APP_ENV> (e.g. fail_rate.production)
# before config/<file>, so a change can misbehave in one environment only.
setting() {
  name=$1 file=$2 default=$3
  eval "value=\${$name:-}"
  for candidate in "$file.${APP_ENV:-}" "$file"; do
    if [ -z "$value" ] && [ -r "${APP_DIR:-/app}/config/$candidate" ]; then
      value=$(tr -d ' \n\r' <"${APP_DIR:-/app}/config/$candidate")
    fi
  done
  case "$value" in '' | *[!0-9]*) value=$default ;; esac
  echo "$value"
}

respond() { # status, content-type, body
  printf 'Status: %s\r\nContent-Type: %s\r\nCache-Control: no-store\r\n\r\n%s\n' "$1" "$2" "$3"
}
