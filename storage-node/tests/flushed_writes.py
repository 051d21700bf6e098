#!/usr/bin/python3
"""Verifying writer for kill -9 tests, on libnbd (python3-libnbd).

Usage: flushed_writes.py BLOCKS URI [URI ...]

Writes BLOCKS 4 KiB blocks in order; block i holds (i, "roamdisk", version) repeated.
Every 8 writes it flushes, then prints "flushed N" (N = blocks covered by a completed
flush) so the test can inject faults mid-run. When a connection breaks it reconnects
to the next URI and rewrites everything after the last completed flush (those writes
were not promised durable). At the end it verifies every block through every URI
given and prints "verified N".
"""
import sys
import time

import nbd

BLOCK = 4096
blocks = int(sys.argv[1])
uris = sys.argv[2:]


def content(i):
    unit = i.to_bytes(8, "little") + b"roamdisk"
    return unit * (BLOCK // len(unit))


def connect(start):
    """Connects to the first URI from index `start` that answers; retries for 60 s."""
    deadline = time.time() + 60
    k = start
    while True:
        uri = uris[k % len(uris)]
        try:
            h = nbd.NBD()
            h.connect_uri(uri)
            return h, k
        except nbd.Error:
            if time.time() > deadline:
                raise
            k += 1
            time.sleep(0.2)


h, k = connect(0)
flushed = 0
i = 0
while i < blocks:
    try:
        h.pwrite(content(i), i * BLOCK)
        i += 1
        if i % 8 == 0 or i == blocks:
            h.flush()
            flushed = i
            print(f"flushed {flushed}", flush=True)
    except nbd.Error as e:
        print(f"connection lost at block {i} ({e}); reconnecting", flush=True)
        try:
            h.close()
        except Exception:
            pass
        h, k = connect(k + 1)
        i = flushed

for uri in uris:
    try:
        v = nbd.NBD()
        v.connect_uri(uri)
    except nbd.Error:
        continue  # that node is down
    for j in range(blocks):
        got = v.pread(BLOCK, j * BLOCK)
        if got != content(j):
            print(f"MISMATCH block {j} via {uri}", flush=True)
            sys.exit(1)
    v.shutdown()
print(f"verified {blocks}", flush=True)
