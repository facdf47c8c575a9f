#!/usr/bin/env bash
# Idempotent setup of a fresh machine of this kind: Debian packages, the venv, dockerd.
# Sourced by scripts/test and scripts/robotics-cd; safe to run again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DEBIAN_FRONTEND=noninteractive

need=()
for pair in docker:docker.io docker-registry:docker-registry prometheus:prometheus \
            htpasswd:apache2-utils busybox:busybox-static chromium:chromium git:git; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if ((${#need[@]})); then
  echo "bootstrap: installing ${need[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: need root to apt-get install ${need[*]}" >&2; exit 1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's own prometheus/docker-registry services, if the package started them, are left
# alone: the sandbox runs its own instances on free ports with their own state.

if [ ! -x "$root/.venv/bin/python" ]; then
  python3 -m venv "$root/.venv"
fi
stamp="$root/.venv/.installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$root/.venv/bin/pip" install -q -U pip >/dev/null
  "$root/.venv/bin/pip" install -q -e "$root[dev]"
  touch "$stamp"
fi

# dockerd: reuse one that answers, else start it (root only).
if ! docker info >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: no Docker daemon answers; start one (sudo dockerd &) and retry" >&2; exit 1
  fi
  mkdir -p /var/log
  nohup dockerd >/var/log/robotics-cd-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "bootstrap: dockerd did not start; see /var/log/robotics-cd-dockerd.log" >&2; exit 1; }
fi
