#!/usr/bin/python3
"""libnbd (python3-libnbd, the engine of nbdsh) checks against a running roamdisk-nbd.

Usage: nbdsh_checks.py nbd://HOST:PORT/NAME   (export must be a fresh 16 MiB sparse file)
Prints "nbdsh checks passed" on success; any failed check raises.
"""
import errno
import sys

import nbd

URI = sys.argv[1]
SIZE = 16 << 20


def connect(strict=True, request_block_size=True, structured=True, meta=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    h.set_request_structured_replies(structured)
    h.set_request_block_size(request_block_size)
    if not strict:
        # Let bad requests reach the server so that *its* validation is tested.
        h.set_strict_mode(0)
    h.connect_uri(URI)
    return h


def expect_errno(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == want, f"{what}: expected errno {want}, got {e.errnum} ({e})"
        return
    raise AssertionError(f"{what}: expected an error, request succeeded")


def extents(h, count, offset, flags=0):
    got = []

    def cb(metacontext, off, entries, err):
        assert metacontext == "base:allocation", metacontext
        got.extend(zip(entries[0::2], entries[1::2]))

    h.block_status(count, offset, cb, flags=flags)
    return got


h = connect()
# Flags and sizes.
assert h.get_size() == SIZE
assert h.is_read_only() == 0
for name in ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn", "can_cache", "can_df"]:
    assert getattr(h, name)() == 1, name
assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096
assert h.get_block_size(nbd.SIZE_PREFERRED) == 65536
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")

# Block status: all hole, then data where written, REQ_ONE limited to the request.
assert extents(h, SIZE, 0) == [(SIZE, 3)], extents(h, SIZE, 0)
h.pwrite(b"\x55" * 8192, 1 << 20)
got = extents(h, SIZE, 0)
assert got == [(1 << 20, 3), (8192, 0), (SIZE - (1 << 20) - 8192, 3)], got
one = extents(h, 4096, 0, nbd.CMD_FLAG_REQ_ONE)
assert one == [(4096, 3)], one
assert h.pread(8192, 1 << 20) == b"\x55" * 8192
# A read over hole + data + hole arrives as hole and data chunks; with DF as one
# data chunk. Both reassemble to the same bytes.
want = b"\0" * 4096 + b"\x55" * 8192 + b"\0" * 4096
for flags, expected in [(0, [(nbd.READ_HOLE, 4096), (nbd.READ_DATA, 8192), (nbd.READ_HOLE, 4096)]),
                        (nbd.CMD_FLAG_DF, [(nbd.READ_DATA, 16384)])]:
    chunks = []

    def on_chunk(sub, off, status, err):
        chunks.append((status, len(sub)))
        return 0

    got = h.pread_structured(16384, (1 << 20) - 4096, on_chunk, flags=flags)
    assert got == want
    assert chunks == expected, (flags, chunks)

# Zero, fast zero, trim, cache, FUA.
h.zero(4096, 1 << 20)
assert h.pread(4096, 1 << 20) == b"\0" * 4096
h.zero(4096, (1 << 20) + 4096, flags=nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, (1 << 20) + 4096) == b"\0" * 4096
try:
    h.zero(65536, 2 << 20, flags=nbd.CMD_FLAG_FAST_ZERO)
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
h.pwrite(b"\x66" * 4096, 3 << 20, flags=nbd.CMD_FLAG_FUA)
h.trim(65536, 4 << 20)
h.cache(65536, 3 << 20)
assert h.pread(4096, 3 << 20) == b"\x66" * 4096

# Out-of-range and malformed requests: the errno the spec names, and the connection
# keeps working afterwards.
bad = connect(strict=False)
expect_errno(lambda: bad.pread(4096, SIZE), errno.EINVAL, "read past end")
expect_errno(lambda: bad.pread(8192, SIZE - 4096), errno.EINVAL, "read straddling end")
expect_errno(lambda: bad.pwrite(b"x" * 4096, SIZE), errno.ENOSPC, "write past end")
expect_errno(lambda: bad.zero(8192, SIZE - 4096), errno.ENOSPC, "zero past end")
expect_errno(lambda: bad.trim(4096, SIZE), errno.EINVAL, "trim past end")
expect_errno(lambda: bad.pread(4096, 100), errno.EINVAL, "unaligned read after agreeing to block sizes")
expect_errno(lambda: bad.pread(4096, 0, flags=nbd.CMD_FLAG_REQ_ONE), errno.EINVAL, "flag not valid for READ")
expect_errno(lambda: bad.pread(4096, 0, flags=1 << 9), errno.EINVAL, "unknown flag")
expect_errno(lambda: bad.block_status(0, 0, lambda *a: 0), errno.EINVAL, "zero-length block status")
assert bad.pread(4096, 3 << 20) == b"\x66" * 4096, "connection must keep working"
bad.shutdown()

# A client that never asked for block sizes may send unaligned requests; they work.
loose = connect(strict=False, request_block_size=False)
loose.pwrite(b"abc", 5 << 20 | 7)
assert loose.pread(5, (5 << 20) | 6) == b"\0abc\0"
# Without structured replies: simple replies, no DF, no block status.
assert loose.get_structured_replies_negotiated()
simple = connect(structured=False, meta=False, strict=False, request_block_size=False)
assert not simple.get_structured_replies_negotiated()
assert simple.can_df() == 0
assert simple.pread(8, (5 << 20)) == b"\0\0\0\0\0\0\0a"
expect_errno(lambda: simple.pread(4096, SIZE), errno.EINVAL, "simple reply error")
assert simple.pread(4096, 3 << 20) == b"\x66" * 4096

# Multi-conn: a write completed on one connection, a flush on another, then a read on a
# third all see it.
a, b, c = connect(), connect(), connect()
a.pwrite(b"\x77" * 65536, 6 << 20)
b.flush()
assert c.pread(65536, 6 << 20) == b"\x77" * 65536
for x in (a, b, c, h, loose, simple):
    x.shutdown()

# Export listing and unknown exports.
lst = nbd.NBD()
lst.set_opt_mode(True)
lst.connect_uri(URI.rsplit("/", 1)[0] + "/")
names = []
lst.opt_list(lambda name, desc: names.append(name))
assert names == ["vm1"], names
try:
    lst.set_export_name("no-such-export")
    lst.opt_go()
    raise AssertionError("unknown export must be refused")
except nbd.Error:
    pass
lst.set_export_name("vm1")
lst.opt_info()
assert lst.get_size() == SIZE
lst.opt_abort()

print("nbdsh checks passed")
