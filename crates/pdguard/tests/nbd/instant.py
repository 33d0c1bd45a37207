"""The client side of tests/instant_reclaim.rs (libnbd's Python bindings).

instant.py hold URI OFFSET
    Connect (NBD_OPT_GO included) and read 4 KiB at OFFSET; print one JSON line: the
    seconds the handshake took, then the read, and the first byte read. Then hold the
    connection (the disk's association) until stdin closes.

instant.py regions URI OUT CHUNK
    Read the disk chunk by chunk into the file OUT (a refused chunk is left as 0x77 bytes);
    print one JSON line: the chunks refused and their errno.

instant.py write URI OFFSET LENGTH BYTE
    Write LENGTH bytes of BYTE at OFFSET, then flush: acknowledged and durable.
"""
import json
import sys
import time

import nbd


def hold(uri, offset):
    h = nbd.NBD()
    t0 = time.monotonic()
    h.connect_uri(uri)
    t1 = time.monotonic()
    data = h.pread(4096, offset)
    t2 = time.monotonic()
    print(json.dumps({"handshake_s": t1 - t0, "first_read_s": t2 - t1, "first_byte": data[0],
                      "uniform": data == bytes([data[0]]) * 4096}), flush=True)
    sys.stdin.read()
    h.shutdown()


def regions(uri, out, chunk):
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    refused = []
    with open(out, "wb") as f:
        for i in range(0, size, chunk):
            n = min(chunk, size - i)
            try:
                f.write(h.pread(n, i))
            except nbd.Error as e:
                refused.append({"chunk": i // chunk, "errno": e.errnum, "why": e.string})
                f.write(b"\x77" * n)
    print(json.dumps({"refused": refused}), flush=True)
    h.shutdown()


def write(uri, offset, length, byte):
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(bytes([byte]) * length, offset)
    h.flush()
    h.shutdown()


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "hold":
        hold(sys.argv[2], int(sys.argv[3]))
    elif cmd == "regions":
        regions(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "write":
        write(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5], 0))
    else:
        sys.exit("unknown command " + cmd)
