#!/usr/bin/env bash
# Benchmark pdguard with many volumes on one host (issue 19): for each count of volumes,
#   create     `docker volume create -d DRIVER -o size=SIZE` of every volume (file + mkfs;
#              nothing is mounted), total seconds
#   ls         `docker volume ls -f driver=DRIVER` (dockerd asks the plugin's List), seconds
#   resync     one resync with dockerd while CONTAINERS created containers use the volumes:
#              a full reconcile (every container inspected) and one with nothing changed
#              (one list call), as the daemon measured them (`status --json`), milliseconds;
#              and dockerd's own time to answer that one list call (curl), milliseconds
#   restart    SIGTERM, then a new daemon up to its first answer (`status --wait`), seconds
#   sealed/jN  100 volumes (or all, if fewer) dangling at once — one `container down` of a
#              container that held them all — until the last is sealed, with --jobs N; each
#              holds FILL MiB of random data (written into its file at FILL MiB), the rest
#              is holes
# Not a test: no timed assertion. Prints one table.
#
# usage: bench/scale.sh [--counts "10 100 1000"] [--jobs "1 2 4"] [--dangling 100]
#                       [--size 16M] [--fill 4] [--containers-max 300]
#                       [--docker-host unix:///var/run/docker.sock | --own-dockerd]
# Default: the host's dockerd, with this benchmark's own driver name (pdguard-scale); every
# volume, container and image it made is removed at the end, and its plugin socket with it.
# A dockerd remembers each legacy driver it reached and retries it once its socket is gone
# (issue 19, item 5): --own-dockerd runs a dockerd of its own instead, in private mount and
# network namespaces with its own /run/docker/plugins, data-root and socket, removed at the end, so
# the host's dockerd never sees the benchmark's driver (and its stalls do not enter the
# figures). Needs root, dockerd, busybox-static, e2fsprogs, python3. Builds pdguard --release
# (PDGUARD_BIN=path: use that binary instead).
set -euo pipefail
cd "$(dirname "$0")/.."

counts="10 100 1000"
jobs="1 2 4"
dangling=100
size=16M
fill=4
containers_max=300
docker_host=unix:///var/run/docker.sock
own=0
while (($#)); do
    case "$1" in
        --counts) counts="$2"; shift 2 ;;
        --jobs) jobs="$2"; shift 2 ;;
        --dangling) dangling="$2"; shift 2 ;;
        --size) size="$2"; shift 2 ;;
        --fill) fill="$2"; shift 2 ;;
        --containers-max) containers_max="$2"; shift 2 ;;
        --docker-host) docker_host="$2"; shift 2 ;;
        --own-dockerd) own=1; shift ;;
        *) echo "bench/scale.sh: unknown argument $1; see the usage at the top of the script" >&2; exit 2 ;;
    esac
done
for t in docker python3 mkfs.ext4 curl; do
    command -v "$t" >/dev/null || { echo "bench/scale.sh: $t is missing; install it (apt-get install docker.io python3 e2fsprogs)" >&2; exit 1; }
done
[[ -x /bin/busybox ]] || { echo "bench/scale.sh: /bin/busybox is missing: apt-get install busybox-static" >&2; exit 1; }

# --own-dockerd: run the rest of this script in a mount and a network namespace of its own,
# where /run/docker/plugins is a private tmpfs, next to a dockerd started for it.
if ((own)) && [[ -z ${PDGUARD_SCALE_INNER:-} ]]; then
    command -v dockerd >/dev/null || { echo "bench/scale.sh: dockerd is missing" >&2; exit 1; }
    [[ -z ${PDGUARD_BIN:-} ]] && cargo build --release -q
    args=(--counts "$counts" --jobs "$jobs" --dangling "$dangling" --size "$size" --fill "$fill" --containers-max "$containers_max")
    # A network namespace too: a dockerd started with --bridge none deletes the interface
    # docker0 of its network namespace, which must never be the host's.
    exec unshare -m -n --propagation private env PDGUARD_SCALE_INNER=1 bash "$0" "${args[@]}" --own-dockerd
fi

work=$(mktemp -d /var/tmp/pdguard-scale.XXXXXX)
ID=pdguard-scale-$$
DRIVER=pdguard-scale
IMG=$ID:1
PD=${PDGUARD_BIN:-$PWD/target/release/pdguard}
daemon=
dockerd_pid=
state=$work/state
[[ -z ${PDGUARD_SCALE_INNER:-} && -z ${PDGUARD_BIN:-} ]] && cargo build --release -q

cleanup() {
    set +e
    if [[ -n ${DOCKER_HOST:-} ]]; then
        docker ps -aq --filter "label=$ID" | xargs -r docker rm -f >/dev/null 2>&1
        docker volume ls -q -f "driver=$DRIVER" | xargs -r docker volume rm -f >/dev/null 2>&1
        docker rmi -f "$IMG" >/dev/null 2>&1
    fi
    [[ -n $daemon ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    for m in "$state"/mounts/*; do [[ -d $m ]] && umount "$m" 2>/dev/null; done
    rm -f "/run/docker/plugins/$DRIVER.sock"
    if [[ -n $dockerd_pid ]]; then
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$dockerd_pid" 2>/dev/null
        umount -R "$work/dockerd/root" 2>/dev/null
    fi
    rm -rf "$work"
}
trap cleanup EXIT

if [[ -n ${PDGUARD_SCALE_INNER:-} ]]; then
    ip link set lo up
    mount -t tmpfs -o mode=0755 tmpfs /run/docker/plugins
    mkdir -p "$work/dockerd"/{root,exec}
    echo '{}' >"$work/dockerd/config.json"
    docker_host=unix://$work/dockerd/docker.sock
    dockerd --config-file "$work/dockerd/config.json" --data-root "$work/dockerd/root" \
        --exec-root "$work/dockerd/exec" --pidfile "$work/dockerd/pid" -H "$docker_host" \
        --storage-driver vfs --bridge none --iptables=false --ip-masq=false \
        --containerd-namespace "$ID" --containerd-plugins-namespace "$ID-plugins" \
        >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
fi
export DOCKER_HOST=$docker_host
for _ in $(seq 300); do docker version >/dev/null 2>&1 && break; sleep 0.1; done
docker version >/dev/null || { echo "bench/scale.sh: no dockerd answers at $docker_host" >&2; tail -5 "$work/dockerd.log" >&2 2>/dev/null; exit 1; }

mkdir -p "$work/img"
cp /bin/busybox "$work/img/"
printf 'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n' >"$work/img/Dockerfile"
docker build -q -t "$IMG" "$work/img" >/dev/null

now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN {printf "%.2f", a - b}'; }
status_json() { "$PD" status --state-dir "$state" --json; }
start_daemon() {   # $1: --jobs
    PDGUARD_LOG=warn "$PD" serve --state-dir "$state" --docker \
        --docker-driver "$DRIVER" --docker-host "$docker_host" --docker-resync 1s \
        --grace 0s --jobs "$1" 2>>"$work/daemon.log" &
    daemon=$!
    "$PD" status --state-dir "$state" --wait 120s >/dev/null
}
stop_daemon() { kill "$daemon"; wait "$daemon" || true; daemon=; }
# Milliseconds of the next full resync and of the next one with nothing changed.
resync_ms() {
    python3 - "$PD" "$state" <<'EOF'
import json, subprocess, sys, time
pd, state = sys.argv[1], sys.argv[2]
seen, full, quiet = 0, None, None
deadline = time.time() + 60
while (full is None or quiet is None) and time.time() < deadline:
    d = json.loads(subprocess.run([pd, "status", "--state-dir", state, "--json"],
                                  capture_output=True, check=True).stdout)["docker"]
    if d["last_resync_ms"] != seen:
        seen = d["last_resync_ms"]
        ms = "%.1f" % (d["last_resync_us"] / 1000)
        if d["last_resync_full"]:
            full = full or ms
        elif full is not None:
            quiet = quiet or ms
    time.sleep(0.1)
print(full or "-", quiet or "-")
EOF
}
# Seconds from $1 (a `now`) until every disk named after it is sealed.
wait_sealed() {
    python3 - "$PD" "$state" "$@" <<'EOF'
import json, subprocess, sys, time
pd, state, t0, names = sys.argv[1], sys.argv[2], float(sys.argv[3]), set(sys.argv[4:])
deadline = time.time() + 3600
while time.time() < deadline:
    v = json.loads(subprocess.run([pd, "status", "--state-dir", state, "--json"],
                                  capture_output=True, check=True).stdout)
    states = {d["name"]: d["state"] for d in v["disks"] if d["name"] in names}
    if any(s == "failed" for s in states.values()):
        sys.exit("bench/scale.sh: a disk failed: %s" % states)
    if all(s == "sealed" for s in states.values()) and len(states) == len(names):
        print("%.2f" % (time.time() - t0)); sys.exit(0)
    time.sleep(0.05)
sys.exit("bench/scale.sh: not all sealed within an hour")
EOF
}

header="volumes containers create_s ls_s resync_full_ms resync_quiet_ms dockerd_list_ms restart_s"
for j in $jobs; do header+=" sealed_j${j}_s"; done
rows=()
for n in $counts; do
    rm -rf "$state"
    start_daemon 1
    names=()
    for i in $(seq "$n"); do names+=("$ID-v$i"); done
    t0=$(now)
    printf '%s\n' "${names[@]}" | xargs -P 4 -I{} docker volume create -d "$DRIVER" -o "size=$size" {} >/dev/null
    create=$(since "$t0")
    t0=$(now)
    got=$(docker volume ls -q -f "driver=$DRIVER" | wc -l)
    ls=$(since "$t0")
    ((got == n)) || { echo "bench/scale.sh: docker volume ls listed $got volumes, not $n" >&2; exit 1; }
    c=$((n < containers_max ? n : containers_max))
    for i in $(seq "$c"); do echo "$i"; done |
        xargs -P 4 -I{} docker create -q --label "$ID" -v "$ID-v{}:/data" "$IMG" true >/dev/null
    read -r rfull rquiet < <(resync_ms)
    # dockerd's own answer to the one call of a quiet resync, for comparison.
    t0=$(now)
    curl -sf --unix-socket "${docker_host#unix://}" "http://docker/v1.41/containers/json?all=1" >/dev/null
    list=$(awk -v a="$(now)" -v b="$t0" 'BEGIN {printf "%.1f", (a - b) * 1000}')
    k=$((n < dangling ? n : dangling))
    dang=("${names[@]:0:k}")
    disk_args=()
    for v in "${dang[@]}"; do
        disk_args+=(--disk "$v")
        # Data to move: FILL MiB of random bytes written into the volume's file, not mounted
        # (the seal moves bytes; it does not look inside the file system).
        head -c "$((fill << 20))" /dev/urandom |
            dd of="$state/disks/$v.img" bs=1M seek=$((fill)) conv=notrunc status=none
    done
    sealed=()
    restart=-
    for j in $jobs; do
        stop_daemon
        t0=$(now)
        start_daemon "$j"
        [[ $restart == - ]] && restart=$(since "$t0")
        # All held by one container (unsealing any sealed by the previous round), then all
        # let go at once: dangling together, grace 0 s.
        "$PD" container up "$ID-holder" "${disk_args[@]}" --state-dir "$state" >/dev/null
        t0=$(now)
        "$PD" container down "$ID-holder" --removed --state-dir "$state" >/dev/null
        sealed+=("$(wait_sealed "$t0" "${dang[@]}")")
    done
    rows+=("$n $c $create $ls $rfull $rquiet $list $restart ${sealed[*]}")
    echo "bench/scale.sh: $n volumes done" >&2
    # Containers first, then the volumes (a sealed one is crypto-erased by Remove).
    docker ps -aq --filter "label=$ID" | xargs -r docker rm -f >/dev/null
    printf '%s\n' "${names[@]}" | xargs -P 4 -n 50 docker volume rm >/dev/null
    stop_daemon
    rm -rf "$state"
done

echo
echo "pdguard $("$PD" --version | awk '{print $2}'), dockerd $(docker version --format '{{.Server.Version}}'), $(nproc) cores; volumes of $size holding $fill MiB, secure profile, --grace 0s, --docker-resync 1s"
{ echo "$header"; printf '%s\n' "${rows[@]}"; } | column -t
