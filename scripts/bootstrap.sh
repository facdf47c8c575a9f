#!/usr/bin/env bash
# Idempotent setup of a fresh machine of this kind: Debian packages, the venv, dockerd.
# Sourced by scripts/test and scripts/robotics-cd; safe to run again.
# `bash scripts/bootstrap.sh --dry-run` prints the plan (packages to install, venv, dockerd)
# and changes nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DEBIAN_FRONTEND=noninteractive
dry_run=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry_run=1; done

# Each pair is <what must run>:<Debian package>. Decide on the program the project runs,
# never on a client that may come from elsewhere: the machine image ships a static docker
# CLI but no daemon, so `docker` on PATH says nothing about `dockerd`.
need=()
for pair in dockerd:docker.io containerd:docker.io docker-registry:docker-registry \
            prometheus:prometheus htpasswd:apache2-utils busybox:busybox-static \
            chromium:chromium git:git redis-server:redis-server debootstrap:debootstrap; do
  prog="${pair%%:*}" pkg="${pair#*:}"
  if ! command -v "$prog" >/dev/null 2>&1 && [[ " ${need[*]-} " != *" $pkg "* ]]; then
    need+=("$pkg")
  fi
done
# PostgreSQL's server binaries live off PATH (/usr/lib/postgresql/<v>/bin).
if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then need+=(postgresql); fi

if ((dry_run)); then
  if ((${#need[@]})); then echo "install: ${need[*]}"; else echo "install: nothing"; fi
  if [ -x "$root/.venv/bin/python" ]; then echo "venv: present"; else echo "venv: create"; fi
  if docker info >/dev/null 2>&1; then echo "dockerd: answering"; else echo "dockerd: start"; fi
  return 0 2>/dev/null || exit 0
fi

if ((${#need[@]})); then
  echo "bootstrap: installing ${need[*]} (first run only, about 2 minutes)" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: need root to apt-get install ${need[*]}" >&2; exit 1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's own prometheus/docker-registry/redis/postgresql services, if the package started
# them, are left alone: the sandbox runs its own instances on free ports with their own state.

if [ ! -x "$root/.venv/bin/python" ]; then
  python3 -m venv "$root/.venv"
fi
stamp="$root/.venv/.installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$root/.venv/bin/pip" install -q -U pip >/dev/null
  "$root/.venv/bin/pip" install -q -e "$root[dev]"
  touch "$stamp"
fi

# dockerd: reuse one that answers, else start it (root only). The image's docker CLI (28.x)
# talks to Debian's daemon (20.10) by API version negotiation.
if ! docker info >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: no Docker daemon answers; start one (sudo dockerd &) and retry" >&2; exit 1
  fi
  mkdir -p /var/log
  nohup dockerd >/var/log/robotics-cd-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "bootstrap: dockerd did not start; see /var/log/robotics-cd-dockerd.log" >&2; exit 1; }
fi
