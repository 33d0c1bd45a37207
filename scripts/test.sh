#!/usr/bin/env bash
# Runs every check and test of pdguard: formatting, clippy with -D warnings, and all unit,
# property, crash, kill and end-to-end tests. Installs what the tests need on a fresh
# Debian machine. Needs root: the end-to-end tests mount a tmpfs and attach loop devices.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use, by the command each provides.
declare -A provides=([losetup]=mount [mount]=mount [umount]=mount [setpriv]=util-linux [flock]=util-linux [mkfs.ext4]=e2fsprogs)
missing=()
for cmd in "${!provides[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${provides[$cmd]}")
done
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
