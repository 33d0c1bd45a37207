#!/usr/bin/env bash
# Runs every check and test of pdguard: formatting, clippy with -D warnings, and all unit,
# property, crash, kill and end-to-end tests. Installs what the tests need on a fresh
# Debian machine. Needs root: the end-to-end tests mount a tmpfs and attach loop devices.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use, by the command each provides.
declare -A provides=([losetup]=mount [mount]=mount [umount]=mount [setpriv]=util-linux)
# NBD clients of crates/pdguard/tests/nbd.rs, and nbdkit for bench/nbd.sh.
provides+=([qemu-io]=qemu-utils [qemu-img]=qemu-utils [qemu-nbd]=qemu-utils
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdsh]=python3-libnbd [fio]=fio [nbdkit]=nbdkit)
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
