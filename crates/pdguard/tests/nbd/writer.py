# Writes block after block (4 KiB each, unique contents) to a pdguard NBD export until
# EPERM_TO_STOP writes were refused with EPERM, and records every write's outcome and
# timing as JSON lines: [index, "ok" | errno name, start seconds, end seconds]. With
# READ_OUT, then reads 1 MiB at 32 MiB over the same connection into that file.
# Usage: /usr/bin/python3 writer.py SOCKET EXPORT BLOCKS OUT [EPERM_TO_STOP [READ_OUT]]
import json
import sys
import time

import nbd

sock, export, blocks, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
stop_after = int(sys.argv[5]) if len(sys.argv) > 5 else 20
read_out = sys.argv[6] if len(sys.argv) > 6 else None


def block(i):
    head = b"W%08d" % i
    return (head * (4096 // len(head) + 1))[:4096]


h = nbd.NBD()
h.connect_uri(f"nbd+unix:///{export}?socket={sock}")
failures = 0
t0 = time.monotonic()
with open(out, "w") as f:
    for i in range(blocks):
        start = time.monotonic() - t0
        try:
            h.pwrite(block(i), i * 4096)
            status = "ok"
        except nbd.Error as e:
            status = e.errno or "error"
        end = time.monotonic() - t0
        f.write(json.dumps([i, status, start, end]) + "\n")
        f.flush()
        if status != "ok":
            failures += status == "EPERM"
            if failures >= stop_after:
                break
            time.sleep(0.01)
        else:
            time.sleep(0.0005)
if read_out:
    with open(read_out, "wb") as f:
        f.write(h.pread(1 << 20, 32 << 20))
h.shutdown()
