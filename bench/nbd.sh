#!/usr/bin/env bash
# NBD export benchmark: serves one disk file from pdguard, `nbdkit file` and `qemu-nbd`,
# one after another on this machine, and prints for each
#   - fio --ioengine=nbd, 4 KiB random read and random write IOPS, 32 requests in flight;
#   - nbdcopy sequential read (export -> null:) and write ([ nbdkit pattern ] -> export,
#     with --flush) time of the whole disk;
# medians of N runs, and pdguard's figures as ratios to nbdkit's (IOPS: pdguard/nbdkit,
# higher is better; times: nbdkit/pdguard, so also higher is better, 1.00 = as fast).
# The TLS rows: pdguard and `nbdkit --tls=require --tls-verify-peer` on TCP loopback with
# the same X.509 certificates (client certificates checked by both), fio's 4 KiB random
# read and write IOPS at 32 in flight (nbds:// URIs, GnuTLS in libnbd). X.509, not PSK:
# fio's nbd engine refuses URIs that name a local file (tls-psk-file=), and libnbd finds
# certificates in $HOME/.pki/libnbd by itself (not as root: fio runs as uid 65534 for these
# rows); after the handshake both cost the same (AES-GCM records).
#
# Usage: bash bench/nbd.sh [--size 4G] [--runs 3] [--fio-time 10] [--dir DIR]
#                          [--rows all|plain|tls]
# The file lives in DIR (default: a new directory under /var/tmp) and is removed after.
# Every server gets the same file, filled with random data first (so that reads hit data,
# not holes); the page cache is not dropped (other work shares this machine), so reads are
# mostly served from memory for all three alike.
set -euo pipefail
cd "$(dirname "$0")/.."

size=4G runs=3 fio_time=10 dir="" rows=all
while (($#)); do
  case $1 in
    --size) size=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --fio-time) fio_time=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --rows) rows=$2; shift 2 ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "bench/nbd.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

case $rows in all|plain|tls) ;; *) echo "bench/nbd.sh: --rows $rows is not all, plain or tls" >&2; exit 2 ;; esac
for cmd in fio nbdcopy nbdkit qemu-nbd python3 openssl setpriv; do
  command -v "$cmd" >/dev/null || {
    echo "bench/nbd.sh: $cmd is missing: apt-get install fio libnbd-bin nbdkit qemu-utils" >&2
    exit 1
  }
done

cargo build --release -q -p pdguard
PD=$PWD/target/release/pdguard

work=$(mktemp -d "${dir:-/var/tmp}/pdguard-nbd-bench.XXXXXX")
server_pid=""
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

img=$work/disk.img
bytes=$(numfmt --from=iec "$size")
echo "# filling a $size file with random data ($img)" >&2
head -c "$bytes" /dev/urandom > "$img"
sync "$img"
sock=$work/nbd.sock
port=10919
# A CA, the servers' certificate and the client's (in libnbd's default directory).
certs=$work/certs home=$work/home
mkdir -p "$certs" "$home/.pki/libnbd"
(
  cd "$certs"
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n' >ext-server
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >ext-client
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 2 -subj /CN=bench-ca
  for role in server client; do
    openssl req -newkey rsa:2048 -nodes -keyout "$role-key.pem" -out "$role.csr" -subj "/CN=$role"
    openssl x509 -req -in "$role.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
      -extfile "ext-$role" -out "$role-cert.pem"
  done
  chmod 600 server-key.pem client-key.pem
  cp ca-cert.pem client-cert.pem client-key.pem "$home/.pki/libnbd/"
) >/dev/null 2>&1
# fio of the TLS rows runs as uid 65534, which must reach the client's certificates.
chmod 711 "$work"
chmod -R a+rX "$home"

wait_sock() {
  for _ in $(seq 200); do [[ -S $sock ]] && return 0; sleep 0.05; done
  echo "bench/nbd.sh: the server did not come up" >&2; exit 1
}

start_server() { # name -> sets server_pid and uri
  rm -f "$sock"
  case $1 in
    pdguard)
      rm -rf "$work/state"
      "$PD" serve --state-dir "$work/state" --profile patent --grace 1h \
        --nbd "unix:$sock" >"$work/pdguard.log" 2>&1 &
      server_pid=$!
      wait_sock
      for _ in $(seq 100); do "$PD" status --state-dir "$work/state" >/dev/null 2>&1 && break; sleep 0.05; done
      "$PD" disk create bench --size "$bytes" --path "$img" --state-dir "$work/state" >/dev/null
      uri="nbd+unix:///bench?socket=$sock" ;;
    nbdkit)
      nbdkit --foreground --unix "$sock" file "$img" >"$work/nbdkit.log" 2>&1 &
      server_pid=$!
      wait_sock
      uri="nbd+unix:///?socket=$sock" ;;
    qemu-nbd)
      qemu-nbd --format=raw --persistent --socket="$sock" "$img" >"$work/qemu-nbd.log" 2>&1 &
      server_pid=$!
      wait_sock
      uri="nbd+unix:///?socket=$sock" ;;
    pdguard-tls)
      rm -rf "$work/state"
      "$PD" serve --state-dir "$work/state" --profile patent --grace 1h \
        --nbd "unix:$sock" --nbd "tcp:127.0.0.1:$port" --nbd-tls-certs "$certs" >"$work/pdguard.log" 2>&1 &
      server_pid=$!
      wait_sock
      for _ in $(seq 100); do "$PD" status --state-dir "$work/state" >/dev/null 2>&1 && break; sleep 0.05; done
      "$PD" disk create bench --size "$bytes" --path "$img" --state-dir "$work/state" >/dev/null
      uri="nbds://127.0.0.1:$port/bench" ;;
    nbdkit-tls)
      nbdkit --foreground --ip-addr 127.0.0.1 --port "$port" --tls=require \
        --tls-certificates="$certs" --tls-verify-peer \
        file "$img" >"$work/nbdkit.log" 2>&1 &
      server_pid=$!
      for _ in $(seq 200); do python3 -c "import socket; socket.create_connection(('127.0.0.1', $port)).close()" 2>/dev/null && break; sleep 0.05; done
      uri="nbds://127.0.0.1:$port/" ;;
  esac
}

stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

fio_iops() { # rw -> IOPS
  local as=()
  [[ $uri == nbds://* ]] && as=(setpriv --reuid 65534 --regid 65534 --clear-groups)
  HOME=$home "${as[@]}" fio --name=b --ioengine=nbd --uri="$uri" --rw="$1" --bs=4k --iodepth=32 \
    --size="$bytes" --time_based --runtime="$fio_time" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"]))'
}

seconds() { # command... -> wall seconds
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null 2>&1
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1-$t0:.2f}')"
}

results=$work/results
: >"$results"
servers=()
[[ $rows == tls ]] || servers+=(pdguard nbdkit qemu-nbd)
[[ $rows == plain ]] || servers+=(pdguard-tls nbdkit-tls)
for run in $(seq "$runs"); do
  for server in "${servers[@]}"; do
    start_server "$server"
    r=$(fio_iops randread)
    w=$(fio_iops randwrite)
    if [[ $server == *-tls ]]; then
      cr=- cw=-
    else
      cr=$(seconds nbdcopy "$uri" null:)
      cw=$(seconds nbdcopy --flush -- [ nbdkit pattern "$bytes" ] "$uri")
    fi
    stop_server
    echo "$server $run $r $w $cr $cw" | tee -a "$results" >&2
  done
done

python3 - "$results" "$size" "$runs" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
def med(s):
    rs = [r for r in rows if r[0] == s]
    if not rs:
        return None
    return [statistics.median(float(r[i]) for r in rs) if rs[0][i] != "-" else None
            for i in range(2, 6)]
print(f"NBD export, {sys.argv[2]} file, medians of {sys.argv[3]} runs (this machine)")
print(f"{'server':26} {'randread IOPS':>14} {'randwrite IOPS':>15} {'seq read s':>11} {'seq write s':>12}")
f = lambda v, w, p: f"{v:{w}.{p}f}" if v is not None else f"{'-':>{w}}"
names = {"pdguard": "pdguard (unix)", "nbdkit": "nbdkit (unix)", "qemu-nbd": "qemu-nbd (unix)",
         "pdguard-tls": "pdguard (TCP, TLS X.509)", "nbdkit-tls": "nbdkit (TCP, TLS X.509)"}
for s, label in names.items():
    m = med(s)
    if m:
        print(f"{label:26} {f(m[0],14,0)} {f(m[1],15,0)} {f(m[2],11,2)} {f(m[3],12,2)}")
for a, b, label in (("pdguard", "nbdkit", "pdguard/nbdkit"), ("pdguard-tls", "nbdkit-tls", "pdguard/nbdkit, TLS")):
    p, k = med(a), med(b)
    if p and k:
        times = f"{k[2]/p[2]:11.2f} {k[3]/p[3]:12.2f}" if p[2] is not None else ""
        print(f"{label:26} {p[0]/k[0]:14.2f} {p[1]/k[1]:15.2f} {times}")
print("(IOPS as pdguard/nbdkit; times as nbdkit/pdguard: >= 1.00 means at least as fast)")
EOF
