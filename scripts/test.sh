#!/usr/bin/env bash
# Runs every check and test of pdguard: formatting, clippy with -D warnings, and all unit,
# property, crash, kill and end-to-end tests. Installs what the tests need on a fresh
# Debian machine. Needs root: the end-to-end tests mount a tmpfs and attach loop devices.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use, by the command each provides.
declare -A provides=([losetup]=mount [mount]=mount [umount]=mount [setpriv]=util-linux [flock]=util-linux
  [mkfs.ext4]=e2fsprogs [groff]=groff-base [docker]=docker.io [dockerd]=docker.io
  [docker-compose]=docker-compose)
# The Docker node harness (crates/pdguard/tests/nodes): namespaces, veths, nsenter.
provides+=([ip]=iproute2 [nsenter]=util-linux [unshare]=util-linux [tar]=tar [timeout]=coreutils)
# NBD clients of crates/pdguard/tests/nbd.rs, and nbdkit for bench/nbd.sh.
provides+=([qemu-io]=qemu-utils [qemu-img]=qemu-utils [qemu-nbd]=qemu-utils
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdsh]=python3-libnbd [fio]=fio [nbdkit]=nbdkit
  [openssl]=openssl [pkg-config]=pkg-config)
# A real Prometheus server and promtool for crates/pdguard/tests/prometheus.rs.
provides+=([prometheus]=prometheus [promtool]=prometheus)
missing=()
for cmd in "${!provides[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${provides[$cmd]}")
done
# The Docker tests build their image FROM scratch with Debian's static busybox.
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
# The NBD export's TLS links OpenSSL (the openssl crate builds against its headers).
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# The Docker tests start their own dockerds in namespaces of their own
# (crates/pdguard/tests/nodes): the machine's dockerd, if any, is neither needed nor used.

start=$SECONDS
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# The tests, their output kept to count the "test result:" lines of every test binary.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# --no-fail-fast: every test binary runs, so the counts cover the whole suite.
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
passed=0
failed=0
ignored=0
while read -r p f i; do
  passed=$((passed + p))
  failed=$((failed + f))
  ignored=$((ignored + i))
done < <(sed -nE 's/^test result: [A-Za-z]+\. ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored;.*/\1 \2 \3/p' "$log")
secs=$((SECONDS - start))
# A build failure or a crashed test binary prints no "test result:" line for it: the exit
# status says so.
if ((status != 0 && failed == 0)); then
  echo "cargo test failed (exit $status) outside the counted tests: see above"
fi
echo "took $((secs / 60))m$((secs % 60))s (formatting, clippy and tests)"
summary="${passed} passed, ${failed} failed"
((ignored == 0)) || summary+=", ${ignored} skipped"
echo "$summary"
bash scripts/fuzz.sh || status=$? # each fuzz target for a bounded time (the corpora are replayed by cargo test)
exit "$status"
