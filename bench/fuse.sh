#!/usr/bin/env bash
# Docker volume through FUSE benchmark (docs/instant-reclaim.md §8): what it costs to put
# pdguard in a volume's data path. Two volume files of the same size, each with ext4 on a
# loop device (`mount -o loop`, as a volume is mounted today):
#   file    - the loop device on the plain volume file;
#   fuse-T  - the loop device on pdguard's FUSE file (crates/engine/src/store/fuse_file.rs,
#             served by `cargo run --example fuse_serve` with T threads) backed by the
#             plain file (pread/pwrite/fdatasync): the path an instant reclaim takes,
#             without the migration's own cost.
# fio runs inside a container of the host's dockerd (an image FROM scratch holding fio and
# the shared libraries `ldd` lists, removed at exit) on a bind mount of each file system:
# 4 KiB random read and write, 1 MiB sequential read and write, direct=1, libaio, iodepth
# 16, on a file of half the volume. Runs are interleaved (run 1 of every job on every
# target, then run 2 ...); the table shows medians (IOPS for 4 KiB, MiB/s for 1 MiB) and
# each FUSE target's ratio to `file` (1.00 = as fast, lower is slower).
#
# Usage: bash bench/fuse.sh [--size 1G] [--runs 3] [--fio-time 10] [--threads "1 4"]
#                           [--fuse-loop-dio on|off] [--dir DIR]
# The FUSE targets' loop devices use direct I/O (`losetup --direct-io=on`) unless
# --fuse-loop-dio off; the `file` target is mounted exactly as a volume is today.
# Needs root, dockerd, fio, mkfs.ext4, /dev/fuse. The files live in DIR (default: a new
# directory under /var/tmp) and are removed after. The page cache is not dropped (other
# work shares this machine): both targets end in the same page cache of their file.
set -euo pipefail
cd "$(dirname "$0")/.."

size=1G runs=3 fio_time=10 threads="1 4" dir="" fuse_dio=on
while (($#)); do
  case $1 in
    --size) size=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --fio-time) fio_time=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --fuse-loop-dio) fuse_dio=$2; shift 2 ;;
    -h|--help) sed -n 2,26p "$0"; exit 0 ;;
    *) echo "bench/fuse.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for cmd in fio docker mkfs.ext4 python3 ldd; do
  command -v "$cmd" >/dev/null || {
    echo "bench/fuse.sh: $cmd is missing: apt-get install fio docker.io e2fsprogs python3" >&2
    exit 1
  }
done
((EUID == 0)) || { echo "bench/fuse.sh: run as root (loop devices, FUSE mounts)" >&2; exit 1; }

cargo build --release -q -p pdguard-engine --example fuse_serve
SERVE=$PWD/target/release/examples/fuse_serve

work=$(mktemp -d "${dir:-/var/tmp}/pdguard-fuse-bench.XXXXXX")
image=pdguard-bench-fio-$$-$RANDOM
pids=() mounted=() loops=()
cleanup() {
  set +e
  for m in "${mounted[@]}"; do umount "$m"; done
  for l in "${loops[@]}"; do losetup -d "$l"; done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  docker rmi -f "$image" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

# The fio image: fio and its libraries at their host paths, nothing else.
ctx=$work/image
mkdir -p "$ctx"
fio_bin=$(command -v fio)
cp --parents -L "$fio_bin" "$ctx"
ldd "$fio_bin" | awk '/=>/ {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
  [[ -f $lib ]] && cp --parents -L "$lib" "$ctx"
done
printf 'FROM scratch\nCOPY . /\nENTRYPOINT ["%s"]\n' "$fio_bin" > "$ctx/Dockerfile"
docker build -q -t "$image" "$ctx" >/dev/null
echo "# fio image $image built" >&2

bytes=$(numfmt --from=iec "$size")
fio_size=$((bytes / 2 / 1048576))M
targets=(file)
new_volume() { # NAME: a sparse file with ext4
  truncate -s "$bytes" "$work/$1.img"
  mkfs.ext4 -q -F -E nodiscard "$work/$1.img"
  mkdir -p "$work/$1.mnt"
}
new_volume file
mount -o loop "$work/file.img" "$work/file.mnt"
mounted+=("$work/file.mnt")
for t in $threads; do
  name=fuse-$t
  new_volume "$name"
  "$SERVE" "$work/$name.img" "$work/$name.fuse" "$t" > "$work/$name.path" &
  pids+=($!)
  for _ in $(seq 100); do [[ -s $work/$name.path ]] && break; sleep 0.1; done
  [[ -s $work/$name.path ]] || { echo "bench/fuse.sh: fuse_serve did not start" >&2; exit 1; }
  # The loop device's own direct I/O (its requests go to the FUSE file asynchronously,
  # several at once, instead of one by one from its worker through a page cache).
  loop=$(losetup --direct-io="$fuse_dio" --show -f "$(cat "$work/$name.path")")
  loops+=("$loop")
  mount "$loop" "$work/$name.mnt"
  mounted=("$work/$name.mnt" "${mounted[@]}")
  targets+=("$name")
done

jobs=(randread-4k randwrite-4k read-1m write-1m)
job_args() {
  case $1 in
    randread-4k) echo "--rw=randread --bs=4k" ;;
    randwrite-4k) echo "--rw=randwrite --bs=4k" ;;
    read-1m) echo "--rw=read --bs=1m" ;;
    write-1m) echo "--rw=write --bs=1m" ;;
  esac
}
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores" >&2
results=$work/results.tsv
for run in $(seq "$runs"); do
  for job in "${jobs[@]}"; do
    for t in "${targets[@]}"; do
      # shellcheck disable=SC2046
      out=$(docker run --rm -v "$work/$t.mnt:/data" "$image" --name="$job" \
        --directory=/data --filename=fio.dat --size="$fio_size" --direct=1 \
        --ioengine=libaio --iodepth=16 --time_based --runtime="$fio_time" \
        --output-format=json $(job_args "$job"))
      python3 -c '
import json, sys
j = json.loads(sys.stdin.read())["jobs"][0]
s = j["read"] if j["read"]["io_bytes"] else j["write"]
print(s["iops"] if sys.argv[1].endswith("4k") else s["bw_bytes"] / 1048576)
' "$job" <<<"$out" | sed "s/^/$run\t$job\t$t\t/" >> "$results"
      echo "# run $run $job $t: $(tail -n1 "$results" | cut -f4)" >&2
    done
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

python3 - "$results" "${targets[@]}" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
targets = sys.argv[2:]
med = {}
for job in dict.fromkeys(r[1] for r in rows):
    for t in targets:
        med[job, t] = statistics.median(float(r[3]) for r in rows if r[1] == job and r[2] == t)
fuse = targets[1:]
head = ["job", "unit"] + targets + [f"{t}/file" for t in fuse]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for job in dict.fromkeys(r[1] for r in rows):
    unit = "IOPS" if job.endswith("4k") else "MiB/s"
    cells = [job, unit] + [f"{med[job, t]:.0f}" for t in targets]
    cells += [f"{med[job, t] / med[job, 'file']:.2f}" for t in fuse]
    print("| " + " | ".join(cells) + " |")
EOF
