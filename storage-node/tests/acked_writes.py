#!/usr/bin/python3
"""Writer for the kill -9 test of unflushed writes, on libnbd (python3-libnbd).

Usage: acked_writes.py BLOCKS URI

Writes BLOCKS 4 KiB blocks in order through one connection, never flushing, and prints
"acked N" after every 100 acknowledged writes so the test can kill a node mid-run. The
connection is to a node that stays up; a write refused while the volume elects a new
leader is retried. At the end it reads every block back through the same connection
(it must hold what was acknowledged, flush or no flush) and prints "verified N", or
"MISMATCH block I" and exits 1.
"""
import sys
import time

import nbd

BLOCK = 4096
blocks = int(sys.argv[1])
uri = sys.argv[2]


def content(i):
    unit = i.to_bytes(8, "little") + b"ackedwr!"
    return unit * (BLOCK // len(unit))


h = nbd.NBD()
h.connect_uri(uri)
i = 0
retries = 0
while i < blocks:
    try:
        h.pwrite(content(i), i * BLOCK)
    except nbd.Error as e:
        retries += 1
        if retries > 50:
            raise
        print(f"write {i} refused ({e}); retrying", flush=True)
        time.sleep(0.2)
        continue
    i += 1
    if i % 100 == 0:
        print(f"acked {i}", flush=True)
for j in range(blocks):
    if h.pread(BLOCK, j * BLOCK) != content(j):
        print(f"MISMATCH block {j}", flush=True)
        sys.exit(1)
h.shutdown()
print(f"verified {blocks}", flush=True)
