#!/usr/bin/env bash
# Benchmark the Docker volume plugin: the time of `docker run --rm -v VOL:/data IMG true` on
# a pdguard volume that is unsealed and on one that is sealed (the run then includes the
# unseal, digest check and mount), for volumes of 1 GiB and 10 GiB holding 256 MiB of
# files, as ratios to the same run on a `local` volume. Not a test: no timed assertion;
# it only checks that the files come back bit-exact after the sealed runs.
#
# usage: bench/docker.sh [--runs N] [--sizes "1G 10G"] [--data-mib 256]
# Needs root, a running dockerd, busybox-static and e2fsprogs. Builds pdguard --release.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=5
sizes="1G 10G"
data_mib=256
while (($#)); do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --sizes) sizes="$2"; shift 2 ;;
        --data-mib) data_mib="$2"; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "bench/docker.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
docker info >/dev/null 2>&1 || { echo "bench/docker.sh: dockerd does not answer; start it" >&2; exit 1; }
[[ -x /bin/busybox ]] || { echo "bench/docker.sh: /bin/busybox missing: apt-get install busybox-static" >&2; exit 1; }

cargo build --release -q
PD=$PWD/target/release/pdguard
# A fixed driver name: dockerd remembers every driver it reached (docs/docker-plugin.md).
DRIVER=pdguard-bench
ID=pdguard-bench-$$
IMG=$ID:1
work=$(mktemp -d "${TMPDIR:-/tmp}/pdguard-bench.XXXXXX")
state=$work/state
daemon=
vols=()

cleanup() {
    set +e
    for v in "${vols[@]}"; do docker volume rm -f "$v" >/dev/null 2>&1; done
    [[ -n $daemon ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    for m in "$state"/mounts/*; do [[ -d $m ]] && umount "$m" 2>/dev/null; done
    rm -f "/run/docker/plugins/$DRIVER.sock"
    docker rmi -f "$IMG" >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/img"
cp /bin/busybox "$work/img/"
printf 'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n' >"$work/img/Dockerfile"
docker build -q -t "$IMG" "$work/img" >/dev/null 2>&1

PDGUARD_LOG=warn "$PD" serve --state-dir "$state" --docker --docker-driver "$DRIVER" \
    --grace 1s --docker-resync 5s 2>"$work/daemon.log" &
daemon=$!
for _ in $(seq 100); do "$PD" status --state-dir "$state" >/dev/null 2>&1 && break; sleep 0.1; done

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {m=int((NR+1)/2); if (NR%2) print a[m]; else print (a[m]+a[m+1])/2}'; }
state_of() { "$PD" disk show "$1" --state-dir "$state" --json | sed -n 's/.*"state":"\([a-z-]*\)".*/\1/p'; }
wait_state() {
    local deadline=$((SECONDS + 600))
    until [[ $(state_of "$1") == "$2" ]]; do
        ((SECONDS < deadline)) || { echo "bench/docker.sh: $1 never reached $2" >&2; exit 1; }
        sleep 0.1
    done
}
fill() {   # 256 MiB of random files, 16 MiB each; prints their digests
    docker run --rm -v "$1:/data" "$IMG" sh -c \
        "for i in \$(seq $((data_mib / 16))); do head -c 16777216 /dev/urandom > /data/f\$i; done; sync; md5sum /data/f* | md5sum"
}
sums() { docker run --rm -v "$1:/data" "$IMG" sh -c 'md5sum /data/f* | md5sum'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN {print a / b}'; }
time_run() { local t0; t0=$(now); docker run --rm -v "$1:/data" "$IMG" true; awk -v a="$(now)" -v b="$t0" 'BEGIN {print a - b}'; }

printf '%-6s %-10s %9s %9s\n' size volume "median s" "x local"
for size in $sizes; do
    local_v=$ID-local-$size; open_v=$ID-open-$size; sealed_v=$ID-sealed-$size
    vols+=("$local_v" "$open_v" "$sealed_v")
    docker volume create "$local_v" >/dev/null
    docker volume create -d "$DRIVER" -o "size=$size" -o grace=1h "$open_v" >/dev/null
    docker volume create -d "$DRIVER" -o "size=$size" -o grace=200ms "$sealed_v" >/dev/null
    fill "$local_v" >/dev/null
    fill "$open_v" >/dev/null
    want=$(fill "$sealed_v")
    declare -a tl=() to=() ts=()
    for ((r = 0; r < runs; r++)); do
        tl+=("$(time_run "$local_v")")
        to+=("$(time_run "$open_v")")
        wait_state "$sealed_v" sealed
        ts+=("$(time_run "$sealed_v")")
    done
    wait_state "$sealed_v" sealed
    got=$(sums "$sealed_v")
    [[ $got == "$want" ]] || { echo "bench/docker.sh: files of $sealed_v changed across seals ($got != $want)" >&2; exit 1; }
    ml=$(printf '%s\n' "${tl[@]}" | median)
    mo=$(printf '%s\n' "${to[@]}" | median)
    ms=$(printf '%s\n' "${ts[@]}" | median)
    printf '%-6s %-10s %9.3f %9.2f\n' "$size" local "$ml" 1
    printf '%-6s %-10s %9.3f %9.2f\n' "$size" unsealed "$mo" "$(div "$mo" "$ml")"
    printf '%-6s %-10s %9.3f %9.2f\n' "$size" sealed "$ms" "$(div "$ms" "$ml")"
done
echo "($runs runs each; 'sealed' includes the unseal of $data_mib MiB of files, its digest check and the mount)"
