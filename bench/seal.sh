#!/usr/bin/env bash
# Benchmark `pdguard image seal|unseal` against a plain `cp --sparse=never && sync` of the same
# image. An honest measurement, no timed assertions: every round trip is checked bit-exact
# (digest of the image after unseal == digest before seal) and the script aborts rather than
# report numbers for a broken one.
#
# Run `bench/seal.sh --help` for the options.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bench/seal.sh [--size SIZE] [--runs N] [--dir DIR] [--profiles "patent secure"]
                     [--placements "patent feistel"] [--strategies "direct"] [--json] [--help]

Times `pdguard image seal IMG --profile R --placement P --strategy S` and
`pdguard image unseal IMG` on a random, non-sparse image of SIZE bytes, against
`cp --sparse=never IMG COPY && sync` of the same image, and prints medians.

  --size SIZE         image size: bytes, or with a suffix K M G T (KiB…, as head -c
                      reads them; KB MB GB TB are powers of 1000); a multiple of 512
                      (default 1G)
  --runs N            runs; each run times the copy and every placement/strategy,
                      interleaved, the order rotated from run to run (default 3)
  --dir DIR           parent directory for the work files; a new subdirectory
                      pdguard-bench.XXXXXX is made in it and removed at exit
                      (default: target/bench-tmp of the repo, else $TMPDIR or /tmp)
  --profiles LIST     profiles to time, space-separated (default "patent secure"); the
                      secure profile uses a master key made by `pdguard keygen` in the
                      work directory
  --placements LIST   placements to time, space-separated (default "patent feistel")
  --strategies LIST   strategies to time, space-separated (default "direct")
  --json              print one JSON object per row on stdout instead of the table
  -h, --help          print this help

Needs about 2 x SIZE of free space in DIR. Every timed step is preceded by `sync`
and includes a trailing `sync` (page cache is not dropped). Progress goes to stderr.
EOF
}

die() {
    printf 'bench/seal.sh: error: %s\n' "$*" >&2
    exit 1
}
say() { printf '%s\n' "$*" >&2; }

size_arg=1G
runs=3
parent_dir=
profiles="patent secure"
placements="patent feistel"
strategies="direct"
json=0

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

# --- tools -----------------------------------------------------------------------------------

if command -v b3sum >/dev/null 2>&1; then
    digest_tool=b3sum
else
    command -v sha256sum >/dev/null 2>&1 || die "need b3sum or sha256sum"
    digest_tool=sha256sum
fi
digest() {
    local d
    d=$("$digest_tool" "$1") || die "cannot compute the digest of $1"
    printf '%s' "${d%% *}"
}

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

avail=$(df -P -B1 --output=avail "$work" 2>/dev/null | awk 'NR == 2 { print $1 }') || avail=
if [[ $avail =~ ^[0-9]+$ ]] && ((avail < size_bytes * 2 + 64 * 1024 * 1024)); then
    die "$work has $avail bytes free; the benchmark needs about $((size_bytes * 2)) (image + copy or thin disk)"
fi

fs_type=$(df -T "$work" 2>/dev/null | awk 'NR == 2 { print $2 }') || fs_type=
cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null) || cpu_model=
machine="machine: nproc=$(nproc), cpu=${cpu_model:-unknown}, fs=${fs_type:-unknown} ($work), $version, kernel $(uname -r)"

"$bin" keygen "$key" >/dev/null || die "cannot make a master key with $bin keygen"

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

run_copy() { cp --sparse=never -- "$img" "$copy"; }

declare -A seal_t=() unseal_t=() seal_r=() unseal_r=()
cp_t=()
rows=()
for prof in "${profile_list[@]}"; do
    for p in "${placement_list[@]}"; do
        for s in "${strategy_list[@]}"; do
            rows+=("$prof/$p/$s")
        done
    done
done
steps=(cp "${rows[@]}")
nsteps=${#steps[@]}

for ((r = 0; r < runs; r++)); do
    # This run's items, rotated so that no row always runs first or right after the copy.
    order=()
    for ((i = 0; i < nsteps; i++)); do
        order+=("${steps[$(((i + r) % nsteps))]}")
    done
    declare -A this_seal=() this_unseal=()
    this_cp=
    for step in "${order[@]}"; do
        if [[ $step == cp ]]; then
            timed run_copy
            this_cp=$elapsed
            cp_t+=("$elapsed")
            rm -f -- "$copy"
            sync
            say "run $((r + 1))/$runs: cp+sync $elapsed s"
            continue
        fi
        prof=${step%%/*}
        rest=${step#*/}
        p=${rest%%/*}
        s=${rest#*/}
        key_args=()
        if [[ $prof == secure ]]; then key_args=(--key-file "$key"); fi
        timed "$bin" image seal "$img" --profile "$prof" --placement "$p" --strategy "$s" "${key_args[@]}" --quiet
        this_seal[$step]=$elapsed
        sealed_digest=$(digest "$img")
        if [[ $sealed_digest == "$orig_digest" ]]; then
            die "$step: the image is unchanged after seal; the seal did nothing"
        fi
        timed "$bin" image unseal "$img" "${key_args[@]}" --quiet
        this_unseal[$step]=$elapsed
        got=$(digest "$img")
        if [[ $got != "$orig_digest" ]]; then
            die "$step run $((r + 1)): round trip broken: $digest_tool after unseal is $got, before seal was $orig_digest; no numbers are reported"
        fi
        say "run $((r + 1))/$runs: $step seal ${this_seal[$step]} s, unseal ${this_unseal[$step]} s, round trip bit-exact"
    done
    for step in "${rows[@]}"; do
        seal_t[$step]+="${this_seal[$step]} "
        unseal_t[$step]+="${this_unseal[$step]} "
        seal_r[$step]+="$(awk -v a="${this_seal[$step]}" -v b="$this_cp" 'BEGIN { printf "%.4f", (b > 0 ? a / b : 0) }') "
        unseal_r[$step]+="$(awk -v a="${this_unseal[$step]}" -v b="$this_cp" 'BEGIN { printf "%.4f", (b > 0 ? a / b : 0) }') "
    done
    unset this_seal this_unseal
done

median() {
    # shellcheck disable=SC2048,SC2086 # word splitting of the list is intended
    printf '%s\n' $* | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# --- report ----------------------------------------------------------------------------------

cp_med=$(median "${cp_t[*]}")
if ((json)); then
    for step in "${rows[@]}"; do
        rest=${step#*/}
        awk -v profile="${step%%/*}" -v placement="${rest%%/*}" -v strategy="${rest#*/}" -v size="$size_bytes" -v runs="$runs" \
            -v seal="$(median "${seal_t[$step]}")" -v unseal="$(median "${unseal_t[$step]}")" \
            -v cp="$cp_med" -v sr="$(median "${seal_r[$step]}")" -v ur="$(median "${unseal_r[$step]}")" \
            -v nproc="$(nproc)" -v cpu="$cpu_model" -v fs="$fs_type" -v version="$version" \
            -v digest_tool="$digest_tool" '
            function q(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); return "\"" s "\"" }
            BEGIN {
                printf "{\"profile\":%s,\"placement\":%s,\"strategy\":%s,\"size_bytes\":%d,\"runs\":%d,", q(profile), q(placement), q(strategy), size, runs
                printf "\"median_seal_s\":%.3f,\"median_unseal_s\":%.3f,\"median_cp_sync_s\":%.3f,", seal, unseal, cp
                printf "\"median_seal_over_cp\":%.2f,\"median_unseal_over_cp\":%.2f,\"ratio\":\"median of per-run ratios\",", sr, ur
                printf "\"round_trip\":\"bit-exact (%s)\",\"nproc\":%d,\"cpu\":%s,\"fs\":%s,\"pdguard\":%s}\n", digest_tool, nproc, q(cpu), q(fs), q(version)
            }'
    done
    exit 0
fi

mib=$(awk -v b="$size_bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
printf 'pdguard seal benchmark: profiles %s, image %s bytes (%s MiB, random, not sparse), %d run(s)\n' "$profiles" "$size_bytes" "$mib" "$runs"
printf '%s\n' "$machine"
printf 'times: wall clock seconds, medians over runs; each step starts after a sync and includes a trailing sync\n'
printf 'ratios: median of per-run ratios (each run'\''s seal or unseal over the same run'\''s cp+sync)\n'
printf 'every round trip checked bit-exact with %s\n\n' "$digest_tool"
printf '%-8s %-10s %-10s %10s %10s %10s %8s %10s\n' profile placement strategy seal_s unseal_s cp_sync_s seal/cp unseal/cp
for step in "${rows[@]}"; do
    rest=${step#*/}
    printf '%-8s %-10s %-10s %10.2f %10.2f %10.2f %8.2f %10.2f\n' "${step%%/*}" "${rest%%/*}" "${rest#*/}" \
        "$(median "${seal_t[$step]}")" "$(median "${unseal_t[$step]}")" "$cp_med" \
        "$(median "${seal_r[$step]}")" "$(median "${unseal_r[$step]}")"
done
