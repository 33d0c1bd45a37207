#!/usr/bin/env bash
# Benchmark `pdguard image seal|unseal` against a plain `cp --sparse=never && sync` of the same
# image (and, with --sparse, a sparse image against `cp --sparse=always && sync` of it). An
# honest measurement, no timed assertions: every round trip is checked bit-exact (digest of
# the image after unseal == digest before seal) and the script aborts rather than report
# numbers for a broken one.
#
# Run `bench/seal.sh --help` for the options.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bench/seal.sh [--size SIZE] [--runs N] [--dir DIR] [--profiles "patent secure"]
                     [--placements "patent feistel"] [--strategies "window direct"]
                     [--memory SIZE] [--sparse | --no-sparse] [--sparse-size SIZE] [--sparse-data SIZE]
                     [--sparse-sector-size N] [--json] [--help]

Times `pdguard image seal IMG --profile R --placement P --strategy S` and
`pdguard image unseal IMG` on a random, non-sparse image of SIZE bytes, against
`cp --sparse=never IMG COPY && sync` of the same image and against
`qemu-img convert -O luks IMG COPY && sync` (one encrypted copy; PBKDF iter-time 10 ms so
that the key derivation, a fixed 2 s by default, does not count), and prints medians, the
space each sealed image allocates, whether the goals of issue 13 are met, then the median
time of each pass (from PDGUARD_LOG=info; `direct` logs none).

  --size SIZE         image size: bytes, or with a suffix K M G T (KiB…, as head -c
                      reads them; KB MB GB TB are powers of 1000); a multiple of 512
                      (default 4G)
  --runs N            runs; each run times the copy and every placement/strategy,
                      interleaved, the order rotated from run to run (default 3)
  --dir DIR           parent directory for the work files; a new subdirectory
                      pdguard-bench.XXXXXX is made in it and removed at exit
                      (default: target/bench-tmp of the repo, else $TMPDIR or /tmp)
  --profiles LIST     profiles to time, space-separated (default "patent secure"); the
                      secure profile uses a master key made by `pdguard keygen` in the
                      work directory
  --placements LIST   placements to time, space-separated (default "patent feistel")
  --strategies LIST   strategies to time, space-separated (default "window direct":
                      the default strategy and the patent's per-sector writes, side by
                      side; "window" alone for the fast one)
  --memory SIZE       pass --memory SIZE to every seal and unseal (default: pdguard's)
  --no-sparse         skip the sparse case (timed by default; --sparse says so explicitly)
  --sparse            time the sparse case too (the default): an image of --sparse-size bytes (default
                      64G) holding --sparse-data bytes (default 1G) of random data in 16
                      extents, against `cp --sparse=always IMG COPY && sync` (copying the
                      data only; the goal is a seal within 3 x that copy). The patent
                      profile runs as is, the secure profile with --keep-holes (row
                      "secure+kh": dense placement, the data packed at the start; without
                      it every sector is encrypted and the whole image is written). The image is restored from a pristine sparse copy
                      (untimed) before every step, and the space the sealed image allocates
                      is reported. Skipped, with a note, when DIR has too little free
                      space: pdguard asks for the data ranges plus a quarter and 16 MiB
                      free for its thin disk before every seal and unseal, on top of the
                      pristine copy and the sealed image (which allocates up to (1 + B/S) x
                      the data, B the file system's block size, S the sector size)
  --sparse-sector-size N
                      --sector-size of the sparse case's seals (default 512, pdguard's
                      default): a power of two from 512 to 65536. At 512 each 4 KiB block
                      of data holds 8 sectors that land in 8 different blocks, so the moved
                      sectors may allocate 8 x the data; 4096 shows the cost without that
                      amplification
  --json              print one JSON object per row on stdout instead of the table
  -h, --help          print this help

With every default (every profile, placement and strategy, 3 runs, on a 4 GiB and on a
64 GiB sparse image) a run is long on 2 CPUs, most of it in `direct` (one system call per
sector); for a quick look: --strategies window --placements feistel --runs 1.

Needs about 2 x SIZE of free space in DIR (and, for the sparse case, see above). Every timed
step is preceded by `sync` and includes a trailing `sync` (page cache is not dropped).
Progress goes to stderr.
EOF
}

die() {
    printf 'bench/seal.sh: error: %s\n' "$*" >&2
    exit 1
}
say() { printf '%s\n' "$*" >&2; }

size_arg=4G
runs=3
parent_dir=
profiles="patent secure"
placements="patent feistel"
strategies="window direct"
json=0
memory=
sparse=1
sparse_size_arg=64G
sparse_data_arg=1G
sparse_sector_arg=512
sparse_opt= # the first --sparse-* option given, to refuse it without --sparse

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --size) need_value "$@"; size_arg=$2; shift 2 ;;
        --size=*) size_arg=${1#*=}; shift ;;
        --runs) need_value "$@"; runs=$2; shift 2 ;;
        --runs=*) runs=${1#*=}; shift ;;
        --dir) need_value "$@"; parent_dir=$2; shift 2 ;;
        --dir=*) parent_dir=${1#*=}; shift ;;
        --profiles) need_value "$@"; profiles=$2; shift 2 ;;
        --profiles=*) profiles=${1#*=}; shift ;;
        --placements) need_value "$@"; placements=$2; shift 2 ;;
        --placements=*) placements=${1#*=}; shift ;;
        --strategies) need_value "$@"; strategies=$2; shift 2 ;;
        --strategies=*) strategies=${1#*=}; shift ;;
        --memory) need_value "$@"; memory=$2; shift 2 ;;
        --memory=*) memory=${1#*=}; shift ;;
        --sparse) sparse=1; shift ;;
        --no-sparse) sparse=0; shift ;;
        --sparse-size) need_value "$@"; sparse_size_arg=$2; sparse_opt=${sparse_opt:-$1}; shift 2 ;;
        --sparse-size=*) sparse_size_arg=${1#*=}; sparse_opt=${sparse_opt:-${1%%=*}}; shift ;;
        --sparse-data) need_value "$@"; sparse_data_arg=$2; sparse_opt=${sparse_opt:-$1}; shift 2 ;;
        --sparse-data=*) sparse_data_arg=${1#*=}; sparse_opt=${sparse_opt:-${1%%=*}}; shift ;;
        --sparse-sector-size) need_value "$@"; sparse_sector_arg=$2; sparse_opt=${sparse_opt:-$1}; shift 2 ;;
        --sparse-sector-size=*) sparse_sector_arg=${1#*=}; sparse_opt=${sparse_opt:-${1%%=*}}; shift ;;
        --json) json=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

# --- arguments -------------------------------------------------------------------------------

# SIZE to bytes, the way head -c and truncate read it: K M G T (and KiB…) are powers of 1024,
# KB MB GB TB powers of 1000.
parse_size() {
    local s=$1 num unit mult
    [[ $s =~ ^([0-9]+)([KMGT]?)(iB|B)?$ ]] || return 1
    num=${BASH_REMATCH[1]}
    unit=${BASH_REMATCH[2]}
    [[ -n $unit || -z ${BASH_REMATCH[3]} ]] || return 1
    local base=1024
    [[ ${BASH_REMATCH[3]} == B ]] && base=1000
    case $unit in
        '') mult=1 ;;
        K) mult=$base ;;
        M) mult=$((base ** 2)) ;;
        G) mult=$((base ** 3)) ;;
        T) mult=$((base ** 4)) ;;
        *) return 1 ;;
    esac
    printf '%d' "$((10#$num * mult))"
}
size_bytes=$(parse_size "$size_arg") || die "--size $size_arg: give a byte count or a number with K, M, G or T"
((size_bytes > 0)) || die "--size must be more than 0 bytes"
((size_bytes % 512 == 0)) || die "--size $size_arg ($size_bytes bytes) is not a multiple of 512 bytes, the sector size"
if ! [[ $runs =~ ^[0-9]+$ ]] || ((10#$runs < 1)); then
    die "--runs must be a whole number >= 1, not '$runs'"
fi
runs=$((10#$runs))

read -r -a profile_list <<<"$profiles"
((${#profile_list[@]} > 0)) || die "--profiles is empty"
for prof in "${profile_list[@]}"; do
    [[ $prof == patent || $prof == secure ]] || die "unknown profile '$prof'; choose from: patent secure"
done
read -r -a placement_list <<<"$placements"
read -r -a strategy_list <<<"$strategies"
((${#placement_list[@]} > 0)) || die "--placements is empty"
((${#strategy_list[@]} > 0)) || die "--strategies is empty"
for p in "${placement_list[@]}"; do
    [[ $p == patent || $p == feistel ]] || die "unknown placement '$p'; choose from: patent feistel"
done
for s in "${strategy_list[@]}"; do
    [[ $s =~ ^[A-Za-z0-9_-]+$ ]] || die "strategy name '$s' has odd characters"
done
mem_args=()
if [[ -n $memory ]]; then
    [[ $memory =~ ^[0-9]+[KMGTkmgt]?$ ]] || die "--memory $memory: give bytes or a number with K, M, G or T"
    mem_args=(--memory "$memory")
fi
if ((!sparse)) && [[ -n $sparse_opt ]]; then
    die "$sparse_opt applies to the sparse case only: drop --no-sparse"
fi
if ((sparse)); then
    sparse_bytes=$(parse_size "$sparse_size_arg") || die "--sparse-size $sparse_size_arg: give a byte count or a number with K, M, G or T"
    sparse_data=$(parse_size "$sparse_data_arg") || die "--sparse-data $sparse_data_arg: give a byte count or a number with K, M, G or T"
    if ! [[ $sparse_sector_arg =~ ^[0-9]{1,6}$ ]] || ((10#$sparse_sector_arg < 512 || 10#$sparse_sector_arg > 65536)) ||
        ((10#$sparse_sector_arg & (10#$sparse_sector_arg - 1))); then
        die "--sparse-sector-size must be a power of two from 512 to 65536 (pdguard's --sector-size), not '$sparse_sector_arg'"
    fi
    sparse_sector=$((10#$sparse_sector_arg))
    ((sparse_bytes % (16 * sparse_sector) == 0 && sparse_data % (16 * sparse_sector) == 0)) ||
        die "--sparse-size and --sparse-data must be multiples of 16 x --sparse-sector-size = $((16 * sparse_sector)) bytes (16 extents of whole sectors)"
    ((sparse_data > 0 && sparse_data <= sparse_bytes)) || die "--sparse-data must be more than 0 and at most --sparse-size"
fi

# --- tools -----------------------------------------------------------------------------------

if command -v b3sum >/dev/null 2>&1; then
    digest_tool=b3sum
else
    command -v sha256sum >/dev/null 2>&1 || die "need b3sum or sha256sum"
    digest_tool=sha256sum
fi
# A digest of the contents that reads only the data ranges (SEEK_DATA/SEEK_HOLE): SHA-256
# over (offset, block) for every 4 KiB block that is not all zeros, then the size. Two files
# of one size have the same one exactly when their bytes are equal, however their holes lie.
sparse_digest() {
    python3 - "$1" <<'PY'
import hashlib, os, sys
path = sys.argv[1]
h = hashlib.sha256()
zero = bytes(4096)
with open(path, "rb") as f:
    fd = f.fileno()
    size = os.fstat(fd).st_size
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        start -= start % 4096
        pos = start
        while pos < end:
            buf = os.pread(fd, min(1 << 20, end - pos + (-(end - pos)) % 4096), pos)
            for i in range(0, len(buf), 4096):
                block = buf[i:i + 4096]
                if block != zero[:len(block)]:
                    h.update((pos + i).to_bytes(8, "little"))
                    h.update(block)
            pos += len(buf) if buf else end - pos
        off = max(end, pos)
h.update(size.to_bytes(8, "little"))
print(h.hexdigest())
PY
}
digest() {
    local d allocated apparent
    allocated=$(stat -c '%b * %B' -- "$1" 2>/dev/null) && allocated=$((allocated)) || allocated=0
    apparent=$(stat -c %s -- "$1" 2>/dev/null) || apparent=0
    if ((apparent > 0 && allocated * 2 < apparent)); then
        # A sparse file: hashing its holes would take longer than sealing it.
        d=$(sparse_digest "$1") || die "cannot compute the digest of $1"
    else
        d=$("$digest_tool" "$1") || die "cannot compute the digest of $1"
    fi
    printf '%s' "${d%% *}"
}

# The encrypted-copy reference of the random case (issue 13): qemu-img convert -O luks.
qemu_img=$(command -v qemu-img 2>/dev/null) || qemu_img=
if [[ -z $qemu_img ]]; then
    say "note: qemu-img is not installed (Debian package qemu-utils): the luks reference row is left out"
fi

# Wall clock in seconds with a fraction: EPOCHREALTIME (bash >= 5) or date.
if [[ -n ${EPOCHREALTIME:-} ]]; then
    now() { now_v=${EPOCHREALTIME/,/.}; }
else
    now() { now_v=$(date +%s.%N); }
fi

# --- build -----------------------------------------------------------------------------------

cd "$(dirname "$0")/.."
repo_root=$PWD
say "building: cargo build --release -p pdguard"
cargo build --release -p pdguard >&2 || die "cargo build --release -p pdguard failed"
bin="${CARGO_TARGET_DIR:-$repo_root/target}/release/pdguard"
[[ -x $bin ]] || die "no binary at $bin after the build"
version=$("$bin" --version 2>/dev/null || echo "pdguard ?")

# --- work directory --------------------------------------------------------------------------

if [[ -z $parent_dir ]]; then
    parent_dir="$repo_root/target/bench-tmp"
    if ! mkdir -p "$parent_dir" 2>/dev/null || [[ ! -w $parent_dir ]]; then
        parent_dir=${TMPDIR:-/tmp}
    fi
fi
[[ -d $parent_dir ]] || die "--dir $parent_dir is not a directory"
work=
cleanup() {
    if [[ -n $work && -d $work ]]; then
        rm -rf -- "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
work=$(mktemp -d "$parent_dir/pdguard-bench.XXXXXX") || die "cannot make a directory in $parent_dir"
work=$(cd "$work" && pwd)
img="$work/img"
copy="$work/copy"
key="$work/master.key"
log="$work/pdguard.log"

avail=$(df -B1 --output=avail "$work" 2>/dev/null | awk 'NR == 2 { print $1 }') || avail=
if [[ $avail =~ ^[0-9]+$ ]] && ((avail < size_bytes * 2 + 64 * 1024 * 1024)); then
    die "$work has $avail bytes free; the benchmark needs about $((size_bytes * 2)) (image + copy or thin disk)"
fi

fs_type=$(df -T "$work" 2>/dev/null | awk 'NR == 2 { print $2 }') || fs_type=
cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null) || cpu_model=
machine="machine: nproc=$(nproc), cpu=${cpu_model:-unknown}, fs=${fs_type:-unknown} ($work), $version, kernel $(uname -r)"

"$bin" keygen "$key" >/dev/null || die "cannot make a master key with $bin keygen"

# Free space the sparse case needs, in bytes (sparse_need), and why (sparse_why):
# - pdguard checks, before every seal and unseal, that the thin disk's directory has the
#   image's full size free (the check does not count holes), and at the start of an unseal the
#   pristine copy and the sealed image exist;
# - the sealed image keeps the original's data ranges allocated (overwritten in place, never
#   deallocated) and allocates a file-system block for every data sector moved into a hole:
#   up to (1 + B/S) x the data, B the block size, S < B the sector size (9 x for 512-byte
#   sectors on 4 KiB blocks);
# - the thin disk holds the data packed under `window`, a block per data sector under `direct`.
sparse_space() {
    local fs_block amp sealed thin st
    fs_block=$(stat -f -c %S "$work" 2>/dev/null) || fs_block=
    if ! [[ $fs_block =~ ^[0-9]+$ ]] || ((fs_block == 0)); then fs_block=4096; fi
    amp=1
    if ((fs_block > sparse_sector)); then amp=$((fs_block / sparse_sector)); fi
    sealed=$((sparse_data * (1 + amp)))
    if ((sealed > sparse_bytes)); then sealed=$sparse_bytes; fi
    # pdguard's free-space check wants the data ranges plus a quarter and 16 MiB for the thin
    # disk (patent profile and --keep-holes): of the image before a seal, of the sealed image
    # before an unseal.
    thin=$((sealed + sealed / 4 + 16 * 1024 * 1024))
    for st in "${strategy_list[@]}"; do
        if [[ $st == direct ]] && ((sparse_data * amp > thin)); then thin=$((sparse_data * amp)); fi
    done
    if ((thin > sparse_bytes)); then thin=$sparse_bytes; fi
    sparse_need=$((sparse_data + sealed + thin + 256 * 1024 * 1024))
    sparse_why="the pristine copy ($sparse_data bytes) and the sealed image exist together (up to $sealed bytes allocated: the data ranges, overwritten in place, plus a $fs_block-byte block for each $sparse_sector-byte data sector moved into a hole), the thin disk needs up to $thin bytes (pdguard checks for the data ranges plus a quarter and 16 MiB), plus 256 MiB to spare"
}
if ((sparse)); then
    sparse_space
    avail=$(df -B1 --output=avail "$work" 2>/dev/null | awk 'NR == 2 { print $1 }') || avail=
    if [[ $avail =~ ^[0-9]+$ ]] && ((avail < sparse_need)); then
        say "note: the sparse case will be skipped unless space is freed: it needs about $sparse_need bytes free in $work, there are $avail"
    fi
fi

# --- image -----------------------------------------------------------------------------------

say "making a random image of $size_bytes bytes in $work"
head -c "$size_bytes" /dev/urandom >"$img" || die "cannot write the image $img"
sync
actual=$(stat -c %s "$img")
((actual == size_bytes)) || die "image is $actual bytes, wanted $size_bytes"
allocated=$(($(stat -c '%b * %B' "$img")))
((allocated >= size_bytes)) || die "image $img is sparse ($allocated of $size_bytes bytes allocated); the file system may compress or dedupe: pick another --dir"
orig_digest=$(digest "$img")
say "image $digest_tool: $orig_digest"

# --- timing ----------------------------------------------------------------------------------

# Run "$@" after a sync, time it plus a trailing sync; the seconds land in $elapsed.
timed() {
    local t0
    sync
    now; t0=$now_v
    if ! "$@" >"$log" 2>&1; then
        say "command failed: $*"
        sed 's/^/  | /' "$log" >&2
        die "aborting: no numbers are reported for a failed step"
    fi
    sync
    now
    elapsed=$(awk -v a="$t0" -v b="$now_v" 'BEGIN { printf "%.3f", b - a }')
}

# The pass times pdguard logged in the last timed command: "scatter=S gather=G" (or "- -").
pass_times() {
    sed 's/\x1b\[[0-9;]*m//g' "$log" | awk '
        /pass done/ {
            match($0, /pass="[a-z ]*"/); p = substr($0, RSTART + 6, RLENGTH - 7)
            match($0, /seconds=[0-9.]+/); t = substr($0, RSTART + 8, RLENGTH - 8)
            if (p ~ /^scatter/) sc = t; else if (p ~ /^gather/) ga = t
        }
        END { printf "%s %s", (sc == "" ? "-" : sc), (ga == "" ? "-" : ga) }'
}

rows=()
for prof in "${profile_list[@]}"; do
    for p in "${placement_list[@]}"; do
        for s in "${strategy_list[@]}"; do
            rows+=("$prof/$p/$s")
        done
    done
done

# Results, keyed "case|row" (times, ratios to the reference copy, pass times, bytes the sealed
# image allocates) and "case" (reference copy times).
declare -A seal_t=() unseal_t=() seal_r=() unseal_r=() ref_t=() luks_t=() luks_r=()
declare -A seal_sc=() seal_ga=() unseal_sc=() unseal_ga=() seal_alloc=()

# Per case: the --sector-size passed to seal (empty: pdguard's default, 512) and whether the
# secure profile seals with --keep-holes.
declare -A case_sector=([random]="") case_keep_holes=([random]=0)

# The profile as the report names it: "secure+kh" for the secure profile with --keep-holes.
profile_label() {
    if [[ $2 == secure && ${case_keep_holes[$1]} == 1 ]]; then printf 'secure+kh'; else printf '%s' "$2"; fi
}

# measure CASE IMAGE DIGEST PREPARE REF_COMMAND...: `runs` runs of the reference copy and every
# row, interleaved, the order rotated from run to run so that no row always runs first or right
# after the copy; PREPARE (untimed) runs before each of them; every round trip checked
# bit-exact.
measure() {
    local case=$1 image=$2 want=$3 prepare=$4
    shift 4
    local steps=(ref "${rows[@]}") nsteps r i step prof rest p s got sealed_digest this_ref this_luks
    if [[ $case == random && -n $qemu_img ]]; then steps=(ref luks "${rows[@]}"); fi
    local case_args=()
    if [[ -n ${case_sector[$case]} ]]; then case_args=(--sector-size "${case_sector[$case]}"); fi
    nsteps=${#steps[@]}
    for ((r = 0; r < runs; r++)); do
        local order=()
        for ((i = 0; i < nsteps; i++)); do
            order+=("${steps[$(((i + r) % nsteps))]}")
        done
        local -A this_seal=() this_unseal=()
        this_ref= this_luks=
        for step in "${order[@]}"; do
            "$prepare"
            if [[ $step == ref ]]; then
                timed "$@"
                this_ref=$elapsed
                ref_t[$case]+="$elapsed "
                rm -f -- "$copy"
                sync
                say "$case run $((r + 1))/$runs: reference copy+sync $elapsed s"
                continue
            fi
            if [[ $step == luks ]]; then
                timed "$qemu_img" convert -O luks --object secret,id=sec0,data=pdguard-bench \
                    -o key-secret=sec0,iter-time=10 "$image" "$copy"
                this_luks=$elapsed
                luks_t[$case]+="$elapsed "
                rm -f -- "$copy"
                sync
                say "$case run $((r + 1))/$runs: qemu-img convert -O luks + sync $elapsed s"
                continue
            fi
            prof=${step%%/*}
            rest=${step#*/}
            p=${rest%%/*}
            s=${rest#*/}
            local key_args=() seal_args=("${case_args[@]}")
            if [[ $prof == secure ]]; then
                key_args=(--key-file "$key")
                if [[ ${case_keep_holes[$case]} == 1 ]]; then seal_args+=(--keep-holes); fi
            fi
            timed env PDGUARD_LOG=info "$bin" image seal "$image" --profile "$prof" --placement "$p" --strategy "$s" "${seal_args[@]}" "${key_args[@]}" "${mem_args[@]}" --quiet
            this_seal[$step]=$elapsed
            read -r sc ga <<<"$(pass_times)"
            seal_sc[$case|$step]+="$sc "
            seal_ga[$case|$step]+="$ga "
            seal_alloc[$case|$step]+="$(($(stat -c '%b * %B' "$image"))) "
            sealed_digest=$(digest "$image")
            if [[ $sealed_digest == "$want" ]]; then
                die "$case $step: the image is unchanged after seal; the seal did nothing"
            fi
            timed env PDGUARD_LOG=info "$bin" image unseal "$image" "${key_args[@]}" "${mem_args[@]}" --quiet
            this_unseal[$step]=$elapsed
            read -r sc ga <<<"$(pass_times)"
            unseal_sc[$case|$step]+="$sc "
            unseal_ga[$case|$step]+="$ga "
            got=$(digest "$image")
            if [[ $got != "$want" ]]; then
                die "$case $step run $((r + 1)): round trip broken: $digest_tool after unseal is $got, before seal was $want; no numbers are reported"
            fi
            say "$case run $((r + 1))/$runs: $(profile_label "$case" "$prof")/$p/$s seal ${this_seal[$step]} s, unseal ${this_unseal[$step]} s, round trip bit-exact"
        done
        if [[ -n $this_luks ]]; then
            luks_r[$case]+="$(awk -v a="$this_luks" -v b="$this_ref" 'BEGIN { printf "%.4f", (b > 0 ? a / b : 0) }') "
        fi
        for step in "${rows[@]}"; do
            seal_t[$case|$step]+="${this_seal[$step]} "
            unseal_t[$case|$step]+="${this_unseal[$step]} "
            seal_r[$case|$step]+="$(awk -v a="${this_seal[$step]}" -v b="$this_ref" 'BEGIN { printf "%.4f", (b > 0 ? a / b : 0) }') "
            unseal_r[$case|$step]+="$(awk -v a="${this_unseal[$step]}" -v b="$this_ref" 'BEGIN { printf "%.4f", (b > 0 ? a / b : 0) }') "
        done
    done
}

run_copy() { cp --sparse=never -- "$img" "$copy"; }
measure random "$img" "$orig_digest" true run_copy

# --- sparse case -----------------------------------------------------------------------------

sparse_note=
if ((sparse)); then
    rm -f -- "$img"
    sync
    avail=$(df -B1 --output=avail "$work" 2>/dev/null | awk 'NR == 2 { print $1 }') || avail=
    [[ $avail =~ ^[0-9]+$ ]] || avail=0
    sparse_space
    if ((avail < sparse_need)); then
        sparse_note="sparse case skipped: it needs about $sparse_need bytes free in $work and there are $avail: $sparse_why; try a smaller --sparse-size or another --dir"
        say "$sparse_note"
    else
        # The pristine image, and the one the steps work on: restored from it before every
        # step, because a seal and unseal may leave the image with more blocks allocated than
        # it had (the patent profile's sealed sectors take blocks of their own, holding zeros
        # after the unseal), which would make every later step work on a less sparse image.
        sorig="$work/sparse.orig"
        simg="$work/sparse.img"
        say "making a sparse image of $sparse_bytes bytes holding $sparse_data bytes of random data in 16 extents"
        truncate -s "$sparse_bytes" "$sorig" || die "cannot make $sorig"
        for ((k = 0; k < 16; k++)); do
            head -c $((sparse_data / 16)) /dev/urandom |
                dd of="$sorig" bs=1M seek=$((k * (sparse_bytes / 16))) oflag=seek_bytes conv=notrunc status=none ||
                die "cannot write the data of $sorig"
        done
        sync
        sparse_alloc=$(($(stat -c '%b * %B' "$sorig")))
        if ((sparse_alloc > 2 * sparse_data + 1024 * 1024)); then
            sparse_note="sparse case skipped: the file system of $work allocated $sparse_alloc bytes for a sparse image holding $sparse_data bytes of data (it does not keep holes); pick another --dir"
            say "$sparse_note"
        else
            sparse_digest=$(digest "$sorig")
            say "sparse image $digest_tool: $sparse_digest ($sparse_alloc bytes allocated)"
            restore_sparse() {
                rm -f -- "$simg"
                cp --sparse=always -- "$sorig" "$simg" || die "cannot restore $simg from $sorig"
            }
            run_sparse_copy() { cp --sparse=always -- "$simg" "$copy"; }
            case_sector[sparse]=$sparse_sector
            case_keep_holes[sparse]=1
            measure sparse "$simg" "$sparse_digest" restore_sparse run_sparse_copy
        fi
        rm -f -- "$simg" "$sorig"
    fi
fi

median() {
    # shellcheck disable=SC2048,SC2086 # word splitting of the list is intended
    printf '%s\n' $* | sort -g | awk 'BEGIN { OFMT = "%.15g" } $1 != "-" { v[++n] = $1 } END { if (n == 0) print "-"; else if (n % 2) print v[(n + 1) / 2]; else print (v[n / 2] + v[n / 2 + 1]) / 2 }'
}

# --- report ----------------------------------------------------------------------------------

# The goal of issue 13 for a row: "met", "no" or "-" (no goal: the patent profile's sparse
# row, whose literal placement scatters over all sectors). Random image: seal and unseal at
# most 2.0 x cp. Sparse image, secure profile with --keep-holes: seal and unseal at most 3 x
# cp, and the sealed file allocates at most the data plus 1 %.
goal() {
    local case=$1 label=$2 sr=$3 ur=$4 alloc=$5
    if [[ $case == random ]]; then
        awk -v a="$sr" -v b="$ur" 'BEGIN { print (a <= 2.0 && b <= 2.0) ? "met" : "no" }'
    elif [[ $label == secure+kh ]]; then
        awk -v a="$sr" -v b="$ur" -v m="$alloc" -v d="$sparse_data" 'BEGIN { print (a <= 3.0 && b <= 3.0 && m <= d * 1.01) ? "met" : "no" }'
    else
        printf -- '-'
    fi
}

cases=(random)
if ((sparse)) && [[ -z $sparse_note ]]; then cases+=(sparse); fi
if ((json)); then
    for case in "${cases[@]}"; do
        ref_med=$(median "${ref_t[$case]}")
        if [[ $case == random ]]; then
            bytes=$size_bytes data=$size_bytes sector=512 reference="cp --sparse=never IMG COPY && sync"
        else
            bytes=$sparse_bytes data=$sparse_data sector=$sparse_sector reference="cp --sparse=always IMG COPY && sync"
        fi
        for step in "${rows[@]}"; do
            k="$case|$step"
            rest=${step#*/}
            kh=false
            if [[ $(profile_label "$case" "${step%%/*}") == secure+kh ]]; then kh=true; fi
            awk -v case_="$case" -v profile="${step%%/*}" -v placement="${rest%%/*}" -v strategy="${rest#*/}" -v size="$bytes" -v data="$data" -v runs="$runs" \
                -v keep_holes="$kh" -v sector="$sector" -v reference="$reference" -v alloc="$(median "${seal_alloc[$k]}")" \
                -v seal="$(median "${seal_t[$k]}")" -v unseal="$(median "${unseal_t[$k]}")" \
                -v cp="$ref_med" -v sr="$(median "${seal_r[$k]}")" -v ur="$(median "${unseal_r[$k]}")" \
                -v ssc="$(median "${seal_sc[$k]}")" -v sga="$(median "${seal_ga[$k]}")" \
                -v usc="$(median "${unseal_sc[$k]}")" -v uga="$(median "${unseal_ga[$k]}")" \
                -v nproc="$(nproc)" -v cpu="$cpu_model" -v fs="$fs_type" -v version="$version" \
                -v digest_tool="$digest_tool" -v memory="${memory:-default}" \
                -v goal="$(goal "$case" "$(profile_label "$case" "${step%%/*}")" "$(median "${seal_r[$k]}")" "$(median "${unseal_r[$k]}")" "$(median "${seal_alloc[$k]}")")" \
                -v luks="$(median "${luks_t[$case]:-}")" '
                function q(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); return "\"" s "\"" }
                function n(s) { return s == "-" ? "null" : sprintf("%.3f", s) }
                BEGIN {
                    # %.0f, not %d: mawk clamps %d to 2^31 - 1.
                    printf "{\"case\":%s,\"profile\":%s,\"keep_holes\":%s,\"placement\":%s,\"strategy\":%s,\"sector_size\":%d,\"size_bytes\":%.0f,\"data_bytes\":%.0f,\"runs\":%d,\"memory\":%s,", q(case_), q(profile), keep_holes, q(placement), q(strategy), sector, size, data, runs, q(memory)
                    printf "\"reference\":%s,\"median_seal_s\":%.3f,\"median_unseal_s\":%.3f,\"median_cp_sync_s\":%.3f,", q(reference), seal, unseal, cp
                    printf "\"median_sealed_allocated_bytes\":%s,", (alloc == "-" ? "null" : sprintf("%.0f", alloc))
                    printf "\"median_seal_over_cp\":%.2f,\"median_unseal_over_cp\":%.2f,\"ratio\":\"median of per-run ratios\",", sr, ur
                    printf "\"median_seal_scatter_s\":%s,\"median_seal_gather_s\":%s,\"median_unseal_scatter_s\":%s,\"median_unseal_gather_s\":%s,", n(ssc), n(sga), n(usc), n(uga)
                    printf "\"goal\":%s,\"median_luks_sync_s\":%s,", q(goal), n(luks)
                    printf "\"round_trip\":\"bit-exact (%s)\",\"nproc\":%d,\"cpu\":%s,\"fs\":%s,\"pdguard\":%s}\n", digest_tool, nproc, q(cpu), q(fs), q(version)
                }'
        done
    done
    if [[ -n $sparse_note ]]; then
        awk -v note="$sparse_note" -v sector="$sparse_sector" 'BEGIN { gsub(/\\/, "\\\\", note); gsub(/"/, "\\\"", note); printf "{\"case\":\"sparse\",\"sector_size\":%d,\"skipped\":\"%s\"}\n", sector, note }'
    fi
    exit 0
fi

mib=$(awk -v b="$size_bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
printf 'pdguard seal benchmark: profiles %s, image %s bytes (%s MiB, random, not sparse), %d run(s), memory %s\n' "$profiles" "$size_bytes" "$mib" "$runs" "${memory:-default}"
printf '%s\n' "$machine"
printf 'times: wall clock seconds, medians over runs; each step starts after a sync and includes a trailing sync\n'
printf 'ratios: median of per-run ratios (each run'\''s seal or unseal over the same run'\''s reference copy)\n'
printf 'every round trip checked bit-exact with %s\n' "$digest_tool"
for case in "${cases[@]}"; do
    ref_med=$(median "${ref_t[$case]}")
    if [[ $case == random ]]; then
        printf '\nreference: cp --sparse=never IMG COPY && sync (%.2f s median)\n' "$ref_med"
        if [[ -n ${luks_t[$case]:-} ]]; then
            printf 'encrypted copy: qemu-img convert -O luks IMG COPY && sync (iter-time 10 ms): %.2f s median, %.2f x cp\n' "$(median "${luks_t[$case]}")" "$(median "${luks_r[$case]}")"
        else
            printf 'encrypted copy: qemu-img not installed, not measured\n'
        fi
        printf 'goal (issue 13): seal and unseal each at most 2.0 x cp; sealed_MiB: space the sealed image allocates (median)\n'
    else
        awk -v b="$sparse_bytes" -v d="$sparse_data" -v s="$sparse_sector" '
            function h(x) { return x >= 2^30 ? sprintf("%.1f GiB", x / 2^30) : sprintf("%.1f MiB", x / 2^20) }
            BEGIN { printf "\nsparse case: %.0f-byte image (%s) holding %.0f bytes (%s) of random data in 16 extents, sector size %d (--sector-size %d)\n", b, h(b), d, h(d), s, s }'
        printf 'rows: the patent profile; the secure profile with --keep-holes ("secure+kh": dense placement, zeros stay zeros and the data sectors are packed at the start)\n'
        awk -v a="$sparse_alloc" 'BEGIN { printf "the original allocates %.1f MiB\n", a / 1048576 }'
        printf 'goal (issue 13): secure+kh seal and unseal each at most 3 x cp and the sealed file allocating at most the data plus 1 %%; the patent row is reported only\n'
        printf 'reference: cp --sparse=always IMG COPY && sync (copies the data only); goal: seal within 3 x that copy\n'
        printf 'the image is restored from a pristine sparse copy before every step (untimed)\n'
        printf 'sealed_MiB: space the sealed image allocates (median); patent profile: the original data ranges stay allocated (overwritten in place) and each data sector moved into a hole takes a file-system block of its own (with 512-byte sectors and 4 KiB blocks, up to 8 x the data on top of those ranges); secure+kh: the dense region only\n'
    fi
    printf '%-9s %-10s %-10s %10s %10s %10s %8s %10s %11s %5s\n' profile placement strategy seal_s unseal_s cp_sync_s seal/cp unseal/cp sealed_MiB goal
    for step in "${rows[@]}"; do
        k="$case|$step"
        rest=${step#*/}
        printf '%-9s %-10s %-10s %10.2f %10.2f %10.2f %8.2f %10.2f' "$(profile_label "$case" "${step%%/*}")" "${rest%%/*}" "${rest#*/}" \
            "$(median "${seal_t[$k]}")" "$(median "${unseal_t[$k]}")" "$ref_med" \
            "$(median "${seal_r[$k]}")" "$(median "${unseal_r[$k]}")"
        awk -v a="$(median "${seal_alloc[$k]}")" 'BEGIN { printf " %11.1f", a / 1048576 }'
        printf ' %5s\n' "$(goal "$case" "$(profile_label "$case" "${step%%/*}")" "$(median "${seal_r[$k]}")" "$(median "${unseal_r[$k]}")" "$(median "${seal_alloc[$k]}")")"
    done
    printf '\npasses (%s case), median seconds; "rest" = the command minus its two passes (placement, fsyncs, deleting the thin disk)\n' "$case"
    printf '%-9s %-10s %-10s %13s %12s %10s %15s %13s %12s\n' profile placement strategy seal_scatter seal_gather seal_rest unseal_scatter unseal_gather unseal_rest
    for step in "${rows[@]}"; do
        k="$case|$step"
        rest=${step#*/}
        awk -v pr="$(profile_label "$case" "${step%%/*}")" -v pl="${rest%%/*}" -v st="${rest#*/}" \
            -v st_="$(median "${seal_t[$k]}")" -v ssc="$(median "${seal_sc[$k]}")" -v sga="$(median "${seal_ga[$k]}")" \
            -v ut="$(median "${unseal_t[$k]}")" -v usc="$(median "${unseal_sc[$k]}")" -v uga="$(median "${unseal_ga[$k]}")" '
            function f(x) { return x == "-" ? "-" : sprintf("%.2f", x) }
            function r(t, a, b) { return (a == "-" || b == "-") ? "-" : sprintf("%.2f", t - a - b) }
            BEGIN { printf "%-9s %-10s %-10s %13s %12s %10s %15s %13s %12s\n", pr, pl, st, f(ssc), f(sga), r(st_, ssc, sga), f(usc), f(uga), r(ut, usc, uga) }'
    done
done
if [[ -n $sparse_note ]]; then
    printf '\n%s\n' "$sparse_note"
fi
