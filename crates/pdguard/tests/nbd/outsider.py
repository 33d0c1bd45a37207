"""A local user who is not the daemon's owner tries every NBD listener with raw bytes.

Usage: outsider.py UNIX_SOCKET... --tcp HOST:PORT... --export NAME

Prints one JSON object: for each unix socket, the errno name of connect() (or "connected");
for each TCP listener, the reply type of each option tried before TLS, whether
NBD_OPT_EXPORT_NAME got any byte back, and whether the server acked NBD_OPT_STARTTLS.
"""
import errno
import json
import socket
import struct
import sys

IHAVEOPT = b"IHAVEOPT"


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            return None
        b += c
    return b


def option(s, code, data=b""):
    s.sendall(IHAVEOPT + struct.pack(">II", code, len(data)) + data)
    types = []
    while True:
        h = recv_exact(s, 20)
        if h is None:
            types.append("closed")
            return types
        _, _, rtype, length = struct.unpack(">QIII", h)
        body = recv_exact(s, length)
        types.append((rtype, (body or b"").decode("latin-1")))
        # SERVER (2), INFO (3) and META_CONTEXT (4) replies are followed by more.
        if rtype not in (2, 3, 4):
            return types


def info(name):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", 0)


def meta(name):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">I", 0)


def start(host, port):
    s = socket.create_connection((host, port), timeout=10)
    g = recv_exact(s, 18)
    assert g[:16] == b"NBDMAGICIHAVEOPT", g
    s.sendall(struct.pack(">I", 3))
    return s


def tcp(addr, export):
    host, port = addr.rsplit(":", 1)
    port = int(port)
    out = {}
    s = start(host, port)
    out["list"] = option(s, 3)
    out["info"] = option(s, 6, info(export))
    out["go"] = option(s, 7, info(export))
    out["structured"] = option(s, 8)
    out["list_meta"] = option(s, 9, meta(export))
    out["unknown"] = option(s, 42)
    # A transmission request sent in the middle of the handshake is no request.
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 4096))
    try:
        out["after_request"] = recv_exact(s, 1) is not None
    except OSError:
        out["after_request"] = False
    s.close()
    s = start(host, port)
    n = export.encode()
    s.sendall(IHAVEOPT + struct.pack(">II", 1, len(n)) + n)
    try:
        out["export_name_bytes"] = len(s.recv(4096))
    except OSError:
        out["export_name_bytes"] = 0
    s.close()
    s = start(host, port)
    out["starttls"] = option(s, 5)
    s.close()
    return out


def main():
    args = sys.argv[1:]
    export = args[args.index("--export") + 1]
    tcps = args[args.index("--tcp") + 1 : args.index("--export")]
    unixes = args[: args.index("--tcp")]
    res = {"unix": {}, "tcp": {}}
    for p in unixes:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(p)
            res["unix"][p] = "connected"
        except OSError as e:
            res["unix"][p] = errno.errorcode.get(e.errno, str(e.errno))
        s.close()
    for a in tcps:
        res["tcp"][a] = tcp(a, export)
    print(json.dumps(res))


main()
