# Drives pdguard's NBD export with libnbd (Debian's python3-libnbd): out-of-range,
# zero-length and badly flagged requests must fail with the right error and leave the
# connection usable; every command works; many requests in flight; option mode.
# Usage: /usr/bin/python3 protocol.py SOCKET EXPORT SIZE
import os
import random
import sys

import nbd

sock, export, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
uri = f"nbd+unix:///{export}?socket={sock}"


def expect_error(what, errno_name, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        if e.errno != errno_name:
            sys.exit(f"{what}: expected {errno_name}, got {e.errno} ({e.string})")
        return
    sys.exit(f"{what}: expected {errno_name}, but it succeeded")


# Option mode: list exports, info, meta contexts, unknown export.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(f"nbd+unix:///?socket={sock}")
names = []
h.opt_list(lambda name, desc: names.append(name))
assert export in names, names
h.set_export_name("no-such-disk")
expect_error("OPT_INFO on an unknown export", "ENOENT", h.opt_info)
h.set_export_name(export)
h.opt_info()
assert h.get_size() == size, h.get_size()
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
ctxs = []
h.opt_list_meta_context(lambda c: ctxs.append(c))
assert ctxs == ["base:allocation"], ctxs
h.opt_abort()

# Transmission with strict checks off, so that bad requests reach the server.
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.can_meta_context("base:allocation")
assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero() and h.can_cache()
assert h.can_multi_conn()
h.set_strict_mode(0)

expect_error("READ past the end", "EINVAL", h.pread, 512, size - 256)
expect_error("READ at offset 2^64-1", "EINVAL", h.pread, 512, (1 << 64) - 1)
expect_error("WRITE past the end", "ENOSPC", h.pwrite, b"x" * 512, size)
expect_error("WRITE_ZEROES past the end", "ENOSPC", h.zero, 4096, size - 1024)
expect_error("TRIM past the end", "EINVAL", h.trim, 4096, size)
expect_error("CACHE past the end", "EINVAL", h.cache, 4096, size)
expect_error("BLOCK_STATUS past the end", "EINVAL", h.block_status, 4096, size,
             lambda *a: 0)
expect_error("READ of length 0", "EINVAL", h.pread, 0, 0)
expect_error("READ with NO_HOLE", "EINVAL", h.pread, 512, 0, nbd.CMD_FLAG_NO_HOLE)
expect_error("WRITE with REQ_ONE", "EINVAL", h.pwrite, b"y" * 512, 0,
             nbd.CMD_FLAG_REQ_ONE)
expect_error("WRITE_ZEROES with FAST_ZERO (not offered)", "EINVAL", h.zero, 512, 0,
             nbd.CMD_FLAG_FAST_ZERO)

# Every command, then the data is what it should be.
data = os.urandom(1 << 20)
h.pwrite(data, 1 << 20, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(1 << 20, 1 << 20) == data
h.zero(8192, 1 << 20, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 1 << 20) == b"\0" * 8192
h.zero(8192, (1 << 20) + 8192)
assert h.pread(8192, (1 << 20) + 8192) == b"\0" * 8192
h.trim(4096, (1 << 20) + 16384)
h.cache(1 << 20, 0)
extents = []
h.block_status(4 << 20, 0, lambda ctx, off, ents, err: extents.append(list(ents)),
               nbd.CMD_FLAG_REQ_ONE)
assert len(extents) == 1 and len(extents[0]) == 2, extents
assert 0 < extents[0][0] <= 4 << 20, extents
# A hole at the start of a fresh disk, then the data written above.
full = []
h.block_status(size, 0, lambda ctx, off, ents, err: full.extend(ents))
assert full[1] & 1 == 1, full  # HOLE at offset 0
assert sum(full[0::2]) >= min(size, 4 << 20), full

# Many requests in flight on one connection; replies may come in any order.
rng = random.Random(7)
blocks = {}
for i in range(64):
    off = rng.randrange(0, (size >> 12) - 1) << 12
    buf = os.urandom(4096)
    blocks[off] = buf


def wait_all(pending):
    # A cookie is retired by the call that reports it completed.
    pending = set(pending)
    while pending:
        pending = {c for c in pending if not h.aio_command_completed(c)}
        if pending:
            h.poll(-1)


wait_all(h.aio_pwrite(buf, off) for off, buf in blocks.items())
assert h.aio_in_flight() == 0
reads = {}
for off in blocks:
    b = nbd.Buffer(4096)
    reads[off] = (b, h.aio_pread(b, off))
assert h.aio_in_flight() > 1, "requests were not in flight together"
wait_all(c for _, c in reads.values())
for off, (b, _) in reads.items():
    assert b.to_bytearray() == blocks[off], f"block at {off} differs"
h.shutdown()
print("OK")
