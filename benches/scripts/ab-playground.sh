#!/usr/bin/env bash
# Back-to-back A/B of two builds on a one-site playground (3 nodes, 256 MiB volume):
#   benches/scripts/ab-playground.sh BIN_DIR LABEL
# BIN_DIR holds `roamdisk` and `roamdisk-node` (copy them out of target/release to keep
# a build). Prefills the volume with random data (so extent blocks are allocated, as in
# cluster-bench), runs `qemu-img bench` 4 KiB writes at QD32 with a flush every 32 three
# times, prints the leader's log syncs per 32-write cycle, then 1 MiB writes at QD8.
set -euo pipefail
BIN=$1
LABEL=${2:-$1}
DIR=$(mktemp -d /tmp/ab-playground.XXXXXX)
BASE=${AB_BASE_PORT:-46000}
NBD="nbd://127.0.0.1:$BASE/vm1"
ADMIN="127.0.0.1:$((BASE + 100))"
"$BIN/roamdisk" playground --dir "$DIR/pg" --sites osaka --nodes-per-site 3 \
  --volume vm1:256M --base-port "$BASE" --wan lan >"$DIR/playground.log" 2>&1 &
PG=$!
trap 'kill -INT $PG 2>/dev/null; wait $PG 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 1 240); do [ -f "$DIR/pg/playground.json" ] && break; sleep 0.5; done
[ -f "$DIR/pg/playground.json" ] || { cat "$DIR/playground.log"; exit 1; }
head -c 256M /dev/urandom >"$DIR/prefill.img"
qemu-img convert -n -f raw -O raw "$DIR/prefill.img" "$NBD"
rm -f "$DIR/prefill.img"
syncs() { curl -s "$ADMIN/metrics" | awk '/^roamdisk_store_log_sync_seconds_count/{print $2}'; }
secs() { awk '/completed/{print $4}'; }
s0=$(syncs)
for _ in 1 2 3; do
  t=$(qemu-img bench -f raw -t none -n -c 20000 -d 32 -s 4096 -w --flush-interval=32 "$NBD" | secs)
  echo "$LABEL qemu-img 4k write QD32 flush/32: $(python3 -c "print(round(20000/$t))") IOPS"
done
s1=$(syncs)
echo "$LABEL leader log syncs per 32-write cycle: $(python3 -c "print(round(($s1-$s0)/(60000/32),2))")"
for _ in 1 2; do
  t=$(qemu-img bench -f raw -t none -n -c 1024 -d 8 -s 1048576 -w "$NBD" | secs)
  echo "$LABEL qemu-img 1M write QD8: $(python3 -c "print(round(1024/$t,1))") MiB/s"
done
