//! Replicas that can prove they agree: `roamdisk volume verify NAME [--repair]`.
//!
//! The runner proposes a `VolumeCommand::Verify` marker per chunk of the volume (1 MiB);
//! every replica, voter or learner, at any site, hashes that chunk's blocks when it
//! applies the marker (`Effect::Verify`, on the store thread, in log order), so all
//! replicas hash the same state: the one at the marker's index. Only the digests travel
//! (32 bytes per 4 KiB block), and the runner compares them: the digest most voters hold
//! is the block's; a replica with another differs (DRBD's online verify; Ceph's deep
//! scrub). Unlike the scrub, which compares a replica with its own hash records, this
//! finds a replica whose data and records agree with each other and not with the others
//! (what a stale block copy left).
//!
//! With `repair`, each replica that differs copies its differing blocks from the leader,
//! as after a snapshot (`NodeCore::corrupted`: recovering, a hash-diff copy, a replay).
//! A leader that differs hands its leadership over first (a recovering replica does not
//! lead), so the copy comes from a replica of the majority.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use roamdisk_core::command::VolumeCommand;
use roamdisk_core::ids::{NodeId, BLOCK_BYTES};
use roamdisk_core::meta::VolumeInfo;
use serde::{Deserialize, Serialize};

use crate::node::{Node, NodeError};
pub use crate::volume::verify::{
    digest_blocks, DigestStore, Digests, VerifyCounts, VerifyProgress, VERIFY_DIGESTS_MAX,
};

/// Blocks per verify marker (1 MiB of data; 8 KiB of digests per replica).
pub const VERIFY_CHUNK_BLOCKS: u32 = 256;
/// Markers in flight at once.
pub const VERIFY_WINDOW: usize = 8;
/// How long a replica may take to apply a marker (a learner across a slow WAN lags)
/// before its digests count as unavailable for that chunk.
pub const VERIFY_REPLICA_WAIT: Duration = Duration::from_secs(30);
/// Differing blocks listed per replica in a report (all are counted).
pub const VERIFY_LISTED_MAX: usize = 64;
/// One replica's part of a verify.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReplicaVerify {
    pub node: u64,
    pub site: String,
    pub voter: bool,
    /// Blocks compared.
    pub checked_blocks: u64,
    /// Blocks whose digest is not the majority's.
    pub differing_blocks: u64,
    /// The first `VERIFY_LISTED_MAX` of them.
    pub blocks: Vec<u64>,
    /// Chunks it gave no digests for (not applied in time, unreachable, or it was copying
    /// blocks when it applied the marker).
    pub unavailable_chunks: u64,
    /// A repair was started on it.
    pub repaired: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub volume: String,
    pub blocks: u64,
    pub chunks: u64,
    /// Distinct blocks on which some replica differs.
    pub differing_blocks: u64,
    /// Blocks no majority of voters agreed on (counted as differing for every replica).
    pub disputed_blocks: u64,
    pub replicas: Vec<ReplicaVerify>,
    pub seconds: f64,
}

/// Runs a verify of `v` (and a repair of the replicas that differ, with `repair`).
pub async fn run(
    node: &Node,
    v: &VolumeInfo,
    repair: bool,
    progress: &std::sync::Mutex<VerifyProgress>,
) -> Result<VerifyReport, NodeError> {
    let started = Instant::now();
    let cluster = node.cluster();
    let blocks = v.size.div_ceil(BLOCK_BYTES);
    let chunks = blocks.div_ceil(u64::from(VERIFY_CHUNK_BLOCKS));
    let id = rand_id();
    let replicas: Vec<(NodeId, bool)> = v
        .voters
        .iter()
        .map(|n| (*n, true))
        .chain(v.learners.iter().map(|n| (*n, false)))
        .collect();
    let mut report = VerifyReport {
        volume: v.name.clone(),
        blocks,
        chunks,
        replicas: replicas
            .iter()
            .map(|(n, voter)| ReplicaVerify {
                node: n.0,
                site: cluster
                    .nodes
                    .get(n)
                    .map(|i| i.site.clone())
                    .unwrap_or_default(),
                voter: *voter,
                ..ReplicaVerify::default()
            })
            .collect(),
        ..VerifyReport::default()
    };
    *progress.lock().expect("verify progress") = VerifyProgress {
        volume: v.name.clone(),
        chunks_done: 0,
        chunks,
        running: true,
    };
    let mut differing = std::collections::BTreeSet::new();
    let mut next = 0u64;
    let mut inflight = FuturesUnordered::new();
    loop {
        while inflight.len() < VERIFY_WINDOW && next < chunks {
            let first = next * u64::from(VERIFY_CHUNK_BLOCKS);
            let count = u64::from(VERIFY_CHUNK_BLOCKS).min(blocks - first) as u32;
            next += 1;
            let replicas = &replicas;
            inflight.push(async move {
                let marker = VolumeCommand::Verify {
                    id,
                    first_block: first,
                    count,
                }
                .encode();
                node.propose(v.id.group(), marker).await?;
                let mut got = Vec::with_capacity(replicas.len());
                let mut asks = FuturesUnordered::new();
                for (i, (n, _)) in replicas.iter().enumerate() {
                    asks.push(async move {
                        (
                            i,
                            node.verify_digests(*n, v.id, id, first, VERIFY_REPLICA_WAIT)
                                .await,
                        )
                    });
                }
                while let Some(r) = asks.next().await {
                    got.push(r);
                }
                got.sort_by_key(|(i, _)| *i);
                Ok::<_, NodeError>((first, count, got))
            });
        }
        let Some(done) = inflight.next().await else {
            break;
        };
        let (first, count, got) = done?;
        compare_chunk(&mut report, &mut differing, &replicas, first, count, &got);
        progress.lock().expect("verify progress").chunks_done += 1;
    }
    report.differing_blocks = differing.len() as u64;
    node.verify_counts
        .differing_blocks
        .fetch_add(report.differing_blocks, Relaxed);
    node.verify_counts.runs.fetch_add(1, Relaxed);
    if repair {
        for r in report
            .replicas
            .iter_mut()
            .filter(|r| r.differing_blocks > 0)
        {
            r.repaired = node.repair_replica(NodeId(r.node), v.id).await.is_ok();
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    progress.lock().expect("verify progress").running = false;
    Ok(report)
}

/// Compares one chunk's digests (`got[i]`: replica `i`'s, if it gave them).
fn compare_chunk(
    report: &mut VerifyReport,
    differing: &mut std::collections::BTreeSet<u64>,
    replicas: &[(NodeId, bool)],
    first: u64,
    count: u32,
    got: &[(usize, Option<Vec<[u8; 32]>>)],
) {
    for (i, d) in got {
        if d.as_ref().is_none_or(|d| d.len() != count as usize) {
            report.replicas[*i].unavailable_chunks += 1;
        }
    }
    let voters_answering = got
        .iter()
        .filter(|(i, d)| replicas[*i].1 && d.is_some())
        .count();
    for b in 0..count as usize {
        let mut votes: BTreeMap<[u8; 32], usize> = BTreeMap::new();
        for (i, d) in got {
            if let (true, Some(d)) = (replicas[*i].1, d) {
                if let Some(h) = d.get(b) {
                    *votes.entry(*h).or_default() += 1;
                }
            }
        }
        let majority = votes
            .iter()
            .find(|(_, n)| **n * 2 > voters_answering)
            .map(|(h, _)| *h);
        if majority.is_none() && voters_answering > 0 {
            report.disputed_blocks += 1;
        }
        let block = first + b as u64;
        for (i, d) in got {
            let Some(h) = d.as_ref().and_then(|d| d.get(b)) else {
                continue;
            };
            let r = &mut report.replicas[*i];
            r.checked_blocks += 1;
            if Some(*h) != majority {
                r.differing_blocks += 1;
                if r.blocks.len() < VERIFY_LISTED_MAX {
                    r.blocks.push(block);
                }
                differing.insert(block);
            }
        }
    }
}

/// A verify run's id: unique enough across nodes and runs (digests are keyed by it).
fn rand_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ u64::from(std::process::id()).rotate_left(40)
}

#[cfg(test)]
mod tests {
    use roamdisk_core::ids::VolumeId;

    use super::*;

    #[test]
    fn the_majority_of_voters_decides_and_learners_are_compared_with_it() {
        let replicas = [
            (NodeId(1), true),
            (NodeId(2), true),
            (NodeId(3), true),
            (NodeId(4), false),
        ];
        let mut report = VerifyReport {
            replicas: replicas
                .iter()
                .map(|(n, voter)| ReplicaVerify {
                    node: n.0,
                    voter: *voter,
                    ..ReplicaVerify::default()
                })
                .collect(),
            ..VerifyReport::default()
        };
        let a = [1u8; 32];
        let b = [2u8; 32];
        let got = vec![
            (0, Some(vec![a, a])),
            (1, Some(vec![a, b])),
            (2, Some(vec![a, a])),
            (3, Some(vec![b, a])),
        ];
        let mut differing = Default::default();
        compare_chunk(&mut report, &mut differing, &replicas, 100, 2, &got);
        assert_eq!(report.replicas[1].blocks, vec![101]);
        assert_eq!(report.replicas[3].blocks, vec![100]);
        assert_eq!(report.replicas[0].differing_blocks, 0);
        assert_eq!(differing.len(), 2);
        // A replica that gave nothing is unavailable, not differing.
        let got = vec![(0, Some(vec![a])), (1, None), (2, Some(vec![a])), (3, None)];
        compare_chunk(&mut report, &mut differing, &replicas, 0, 1, &got);
        assert_eq!(report.replicas[1].unavailable_chunks, 1);
        assert_eq!(report.replicas[1].differing_blocks, 1);
        // No majority: disputed, and every replica differs.
        let c = [3u8; 32];
        let got = vec![
            (0, Some(vec![a])),
            (1, Some(vec![b])),
            (2, Some(vec![c])),
            (3, None),
        ];
        compare_chunk(&mut report, &mut differing, &replicas, 7, 1, &got);
        assert_eq!(report.disputed_blocks, 1);
    }

    #[test]
    fn digests_are_bounded() {
        let mut s = DigestStore::default();
        for i in 0..(VERIFY_DIGESTS_MAX as u64 + 10) {
            s.insert(VolumeId(1), 9, i, vec![[0; 32]]);
        }
        assert!(s.get(VolumeId(1), 9, 0).is_none(), "oldest forgotten");
        assert!(s
            .get(VolumeId(1), 9, VERIFY_DIGESTS_MAX as u64 + 9)
            .is_some());
    }
}
