#!/usr/bin/env bash
# Instant reclaim benchmark (issue 18): a sealed disk holding SIZE of random data is
# reclaimed over NBD by `pdguard serve --reclaim instant` and by `--reclaim copy`, and for
# each the client (libnbd's Python bindings) measures from its connect:
#   - time to first byte: connect + NBD_OPT_GO + the first 4 KiB read (checked against the
#     plaintext);
#   - time to unsealed: until the seal record is gone (the migration's or the unseal's end;
#     the client holds the connection, so the disk then becomes attached).
# Runs are interleaved (instant, copy, instant, copy, ...); medians of --runs. Every run
# ends with the daemon stopped and the image's SHA-256 compared with the plaintext's: a
# round trip that is not bit-exact (or a mode that did not run as asked) aborts the script
# before any figure is printed.
#
# Usage: bash bench/reclaim.sh [--sizes 1G,4G,16G] [--runs 3] [--dir DIR]
# The files live in DIR (default: a new directory under /var/tmp; it needs 2 x the largest
# size free) and are removed after. Each run copies the plaintext into place and seals it
# offline (`pdguard image seal`, secure profile, its default placement: Feistel) before the
# daemon starts; neither is timed. The page cache is not dropped (other work shares this
# machine).
set -euo pipefail
cd "$(dirname "$0")/.."

sizes=1G,4G,16G runs=3 dir=""
while (($#)); do
  case $1 in
    --sizes) sizes=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "bench/reclaim.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "bench/reclaim.sh: --runs $runs is not a positive number" >&2; exit 2; }
/usr/bin/python3 -c 'import nbd' 2>/dev/null || {
  echo "bench/reclaim.sh: /usr/bin/python3 cannot import nbd: apt-get install python3-libnbd" >&2
  exit 1
}

cargo build --release -q -p pdguard
PD=$PWD/target/release/pdguard

work=$(mktemp -d "${dir:-/var/tmp}/pdguard-reclaim-bench.XXXXXX")
server_pid=""
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
die() { echo "bench/reclaim.sh: $*" >&2; exit 1; }

key=$work/master.key
"$PD" keygen "$key" >/dev/null
sock=$work/nbd.sock
state=$work/state
img=$work/disk.img
plain=$work/plain.img

cat >"$work/client.py" <<'EOF'
import json, os, subprocess, sys, time
import nbd
uri, record, plain, pd, state = sys.argv[1:6]
h = nbd.NBD()
t0 = time.monotonic()
h.connect_uri(uri)
t_go = time.monotonic()
got = h.pread(4096, 0)
t_first = time.monotonic()
while os.path.exists(record):
    time.sleep(0.002)
t_done = time.monotonic()
with open(plain, "rb") as f:
    ok = got == f.read(4096)
# Held by this connection: the disk is attached once its life cycle caught up.
attached = False
for _ in range(3000):
    out = subprocess.run([pd, "disk", "show", "bench", "--json", "--state-dir", state],
                         capture_output=True, text=True).stdout
    if json.loads(out).get("state") == "attached":
        attached = True
        break
    time.sleep(0.02)
print(json.dumps({"go": t_go - t0, "first": t_first - t0, "unsealed": t_done - t0,
                  "first_ok": ok, "attached": attached}))
h.shutdown()
EOF

start_daemon() { # mode
  rm -rf "$state" "$sock"
  mkdir -m 700 "$state"
  "$PD" serve --state-dir "$state" --key-file "$key" --grace 1h --reclaim "$1" \
    --nbd "unix:$sock" >"$work/serve.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 200); do [[ -S $sock ]] && "$PD" status --state-dir "$state" >/dev/null 2>&1 && return 0; sleep 0.05; done
  die "the daemon did not come up: $(cat "$work/serve.log")"
}

stop_daemon() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

results=$work/results
: >"$results"
IFS=, read -ra size_list <<<"$sizes"
for size in "${size_list[@]}"; do
  bytes=$(numfmt --from=iec "$size") || die "--sizes: $size is not a size such as 256M or 4G"
  echo "# $size: writing random data ($plain)" >&2
  head -c "$bytes" /dev/urandom >"$plain"
  want=$(sha256sum <"$plain" | cut -d' ' -f1)
  for run in $(seq "$runs"); do
    for mode in instant copy; do
      cp "$plain" "$img"
      "$PD" image seal --key-file "$key" --quiet "$img" >/dev/null
      start_daemon "$mode"
      "$PD" disk create bench --size "$bytes" --path "$img" --state-dir "$state" >/dev/null
      out=$(/usr/bin/python3 "$work/client.py" "nbd+unix:///bench?socket=$sock" "$img.pdguard" \
        "$plain" "$PD" "$state") || die "the client failed ($mode, $size): $(tail -5 "$work/serve.log")"
      stop_daemon
      have=$(sha256sum <"$img" | cut -d' ' -f1)
      [[ $have == "$want" ]] || die "$mode reclaim of $size is not bit-exact (sha256 $have, plaintext $want); no figures"
      [[ ! -e $img.pdguard ]] || die "$mode reclaim of $size left its seal record"
      python3 -c 'import json,sys; j=json.loads(sys.argv[1]); sys.exit(0 if j["first_ok"] and j["attached"] else 1)' "$out" ||
        die "$mode reclaim of $size: the first 4 KiB read differs from the plaintext, or the disk never became attached: $out"
      if [[ $mode == instant ]]; then
        grep -q "instant reclaim: the migration ended" "$work/serve.log" || die "--reclaim instant did not migrate ($size)"
      else
        ! grep -q "instant reclaim" "$work/serve.log" || die "--reclaim copy migrated ($size)"
      fi
      echo "$size $mode $run $out" | tee -a "$results" >&2
    done
  done
done

python3 - "$results" "$runs" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    size, mode, _run, j = line.split(" ", 3)
    rows.setdefault((size, mode), []).append(json.loads(j))
med = lambda size, mode, k: statistics.median(r[k] for r in rows[(size, mode)])
print(f"Reclaim over NBD of a sealed disk full of random data (secure profile, Feistel), medians of {sys.argv[2]} interleaved runs")
print(f"{'data':>6} {'first byte, instant':>20} {'first byte, copy':>17} {'unsealed, instant':>18} {'unsealed, copy':>15} {'unsealed instant/copy':>22}")
for size in dict.fromkeys(s for s, _ in rows):
    fi, fc = med(size, "instant", "first"), med(size, "copy", "first")
    ui, uc = med(size, "instant", "unsealed"), med(size, "copy", "unsealed")
    print(f"{size:>6} {fi:19.3f}s {fc:16.3f}s {ui:17.2f}s {uc:14.2f}s {ui/uc:22.2f}")
print("(first byte: connect + NBD_OPT_GO + a 4 KiB read; unsealed: until the seal record is gone; both from the client's connect)")
EOF
