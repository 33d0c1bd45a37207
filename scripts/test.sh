#!/usr/bin/env bash
# Runs every check and test of pdguard: formatting, clippy with -D warnings, and all unit,
# property, crash, kill and end-to-end tests. Installs what the tests need on a fresh
# Debian machine. Needs root: the end-to-end tests mount a tmpfs and attach loop devices.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use, by the command each provides.
declare -A provides=([losetup]=mount [mount]=mount [umount]=mount [setpriv]=util-linux
  [mkfs.ext4]=e2fsprogs [docker]=docker.io [dockerd]=docker.io [docker-compose]=docker-compose)
missing=()
for cmd in "${!provides[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${provides[$cmd]}")
done
# The Docker tests build their image FROM scratch with Debian's static busybox.
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# The Docker volume plugin's tests need a running dockerd: start one if none answers.
if ! docker info >/dev/null 2>&1; then
  echo "test.sh: no dockerd answers; starting one (log in /var/log/dockerd.log)" >&2
  nohup dockerd >>/var/log/dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "test.sh: dockerd did not come up; see /var/log/dockerd.log" >&2; exit 1; }
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
