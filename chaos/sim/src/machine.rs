//! The replicated state machines the simulation runs on top of the Raft groups: a small
//! volume (bytes changed by `VolumeCommand`s) and the cluster metadata (`ClusterState`
//! changed by `MetaCommand`s), both exactly as the core defines their commands.
//!
//! [`Machine`] replays the committed log (the checker's reference); [`VolumeData`] is one
//! replica's volume data as a storage node keeps it, in an extent file with a page
//! cache, which a power loss can leave with any mix of synced and unsynced pages.

use roamdisk_core::command::VolumeCommand;
use roamdisk_core::ids::{Generation, VolumeId};
use roamdisk_core::meta::{ClusterState, MetaCommand};

/// Bytes of the simulated volume. Small, so that hashing the whole state after every
/// applied entry stays cheap (the per-index state hash is how replicas are compared).
pub const VOLUME_BYTES: usize = 4096;
/// The volume's second half holds registers: slots that only stamped writes touch, so
/// that a read of one can be checked against the writes acknowledged before it.
pub const REGISTERS_AT: usize = VOLUME_BYTES / 2;
pub const REGISTER_BYTES: usize = 256;
pub const REGISTERS: usize = (VOLUME_BYTES - REGISTERS_AT) / REGISTER_BYTES;
/// Granularity at which a power loss keeps or loses unsynced volume data (pages written
/// back or not).
pub const PAGE_BYTES: usize = 256;

/// The bytes a stamped write puts in register `slot`.
pub fn register_bytes(stamp: u64) -> Vec<u8> {
    stamp.to_le_bytes().repeat(REGISTER_BYTES / 8)
}

/// The stamp a register holds (0: never written), or `None` if its bytes are not one
/// stamp's (a torn or foreign write).
pub fn register_stamp(bytes: &[u8]) -> Option<u64> {
    let stamp = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    (bytes == register_bytes(stamp).as_slice()).then_some(stamp)
}

/// blake3 of a volume's state as the checker compares it.
pub fn volume_hash(size: u64, bytes: &[u8]) -> StateHash {
    let mut h = blake3::Hasher::new();
    h.update(b"volume");
    h.update(&size.to_le_bytes());
    h.update(bytes);
    *h.finalize().as_bytes()
}

/// One replica's volume data as a storage node holds it in an extent file: what reads
/// see (the page cache) and what a power loss keeps (the last fsync, plus whatever pages
/// happened to be written back).
#[derive(Clone, Debug)]
pub struct VolumeData {
    pub size: u64,
    pub bytes: Vec<u8>,
    durable_size: u64,
    durable: Vec<u8>,
}

impl Default for VolumeData {
    fn default() -> Self {
        VolumeData {
            size: VOLUME_BYTES as u64,
            bytes: vec![0; VOLUME_BYTES],
            durable_size: VOLUME_BYTES as u64,
            durable: vec![0; VOLUME_BYTES],
        }
    }
}

impl VolumeData {
    /// Applies a volume command (idempotent, as the node's extent writes are).
    pub fn apply(&mut self, data: &[u8]) -> Result<(), MachineError> {
        let cmd = VolumeCommand::decode(data)
            .map_err(|e| MachineError(format!("volume command: {e}")))?;
        apply_volume(&mut self.size, &mut self.bytes, cmd);
        Ok(())
    }

    /// Writes bytes copied from another replica (a catch-up chunk). The size is the
    /// source's from the first chunk on (a failed-over replica may have grown in a
    /// divergent tail the source never had), and grows with it during the copy.
    pub fn copy_from(&mut self, other: &VolumeData, range: std::ops::Range<usize>) {
        self.size = if range.start == 0 {
            other.size
        } else {
            self.size.max(other.size)
        };
        self.bytes[range.clone()].copy_from_slice(&other.bytes[range]);
    }

    /// fsync: everything written is durable.
    pub fn sync(&mut self) {
        self.durable.clone_from(&self.bytes);
        self.durable_size = self.size;
    }

    /// A power loss: each page keeps what was synced, or what was written if it was
    /// written back anyway (`kept(page)`).
    pub fn power_loss(&mut self, mut kept: impl FnMut(usize) -> bool) {
        for (page, (cur, dur)) in self
            .bytes
            .chunks_mut(PAGE_BYTES)
            .zip(self.durable.chunks(PAGE_BYTES))
            .enumerate()
        {
            if !kept(page) {
                cur.copy_from_slice(dur);
            }
        }
        self.sync();
    }

    pub fn hash(&self) -> StateHash {
        volume_hash(self.size, &self.bytes)
    }
}

fn apply_volume(size: &mut u64, bytes: &mut [u8], cmd: VolumeCommand<'_>) {
    match cmd {
        VolumeCommand::Write { offset, data } => {
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = bytes.get_mut(offset as usize + i) {
                    *slot = *b;
                }
            }
        }
        VolumeCommand::Zero { offset, len, .. } => {
            let end = (offset.saturating_add(len) as usize).min(VOLUME_BYTES);
            let start = (offset as usize).min(end);
            bytes[start..end].fill(0);
        }
        VolumeCommand::Resize { size: s } => *size = (*size).max(s),
        VolumeCommand::Verify { .. } => {}
    }
}

/// blake3 of a machine's state (not of its applied index).
pub type StateHash = [u8; 32];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MachineKind {
    Meta,
    Volume,
}

/// What must never go back in the metadata state: the next volume id (ids are never
/// reused) and, per volume id, its generation and size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetaMonotone {
    pub next_volume_id: u64,
    pub generations: std::collections::BTreeMap<VolumeId, (Generation, u64)>,
}

impl MetaMonotone {
    pub fn of(state: &ClusterState) -> MetaMonotone {
        MetaMonotone {
            next_volume_id: state.next_volume_id,
            generations: state
                .volumes
                .values()
                .map(|v| (v.id, (v.generation, v.size)))
                .collect(),
        }
    }

    /// Describes the first field of `self` that is behind `earlier`, if any. A volume
    /// missing from `self` was deleted, which is allowed; one that is present must not
    /// have a lower generation or size.
    pub fn went_back_from(&self, earlier: &MetaMonotone) -> Option<String> {
        if self.next_volume_id < earlier.next_volume_id {
            return Some(format!(
                "next_volume_id {} < {} seen before",
                self.next_volume_id, earlier.next_volume_id
            ));
        }
        for (id, (generation, size)) in &self.generations {
            if let Some((g0, s0)) = earlier.generations.get(id) {
                if generation < g0 {
                    return Some(format!(
                        "volume {id}: generation {generation} < {g0} seen before"
                    ));
                }
                if size < s0 {
                    return Some(format!("volume {id}: size {size} < {s0} seen before"));
                }
            } else if id.0 <= earlier.next_volume_id {
                // Ids come from the counter, so an id at or below the old counter that
                // was absent then had been deleted: ids are never reused.
                return Some(format!(
                    "volume id {id} reappeared after its deletion (counter was {})",
                    earlier.next_volume_id
                ));
            }
        }
        None
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct VolumeMachine {
    pub size: u64,
    pub bytes: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MetaMachine {
    pub state: ClusterState,
}

#[derive(Clone, Debug, PartialEq)]
pub enum MachineState {
    Volume(VolumeMachine),
    Meta(MetaMachine),
}

/// A state machine and the last index it applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Machine {
    pub applied: u64,
    pub state: MachineState,
}

#[derive(Debug)]
pub struct MachineError(pub String);

impl Machine {
    pub fn new(kind: MachineKind, applied: u64) -> Machine {
        let state = match kind {
            MachineKind::Volume => MachineState::Volume(VolumeMachine {
                size: VOLUME_BYTES as u64,
                bytes: vec![0; VOLUME_BYTES],
            }),
            MachineKind::Meta => MachineState::Meta(MetaMachine {
                state: ClusterState::default(),
            }),
        };
        Machine { applied, state }
    }

    /// The metadata machine at `applied` with `state` (a run that starts with the
    /// cluster's nodes and volume registered).
    pub fn meta(state: ClusterState, applied: u64) -> Machine {
        Machine {
            applied,
            state: MachineState::Meta(MetaMachine { state }),
        }
    }

    pub fn kind(&self) -> MachineKind {
        match self.state {
            MachineState::Volume(_) => MachineKind::Volume,
            MachineState::Meta(_) => MachineKind::Meta,
        }
    }

    /// Applies the command of entry `index`. Entries at or below `applied` are skipped
    /// (replay after a restart), exactly like the storage node's volume replica.
    pub fn apply(&mut self, index: u64, data: &[u8]) -> Result<(), MachineError> {
        if index <= self.applied {
            return Ok(());
        }
        match &mut self.state {
            MachineState::Volume(v) => {
                let cmd = VolumeCommand::decode(data)
                    .map_err(|e| MachineError(format!("entry {index}: volume command: {e}")))?;
                apply_volume(&mut v.size, &mut v.bytes, cmd);
            }
            MachineState::Meta(m) => {
                let cmd = MetaCommand::decode(data)
                    .map_err(|e| MachineError(format!("entry {index}: meta command: {e}")))?;
                // Refusals are part of the deterministic state transition.
                let _ = m.state.apply(cmd);
                m.state.check().map_err(|e| {
                    MachineError(format!("entry {index}: ClusterState::check: {e}"))
                })?;
            }
        }
        self.applied = index;
        Ok(())
    }

    /// Records progress over an entry with no command (leader no-op, membership change).
    pub fn skip(&mut self, index: u64) {
        self.applied = self.applied.max(index);
    }

    /// The state's hash, as replicas report it: a volume's as [`VolumeData::hash`], the
    /// metadata's as the core's `Note::MetaApplied` (blake3 of the encoded state).
    pub fn hash(&self) -> StateHash {
        match &self.state {
            MachineState::Volume(v) => volume_hash(v.size, &v.bytes),
            MachineState::Meta(m) => *blake3::hash(&m.state.encode()).as_bytes(),
        }
    }

    pub fn monotone(&self) -> Option<MetaMonotone> {
        match &self.state {
            MachineState::Volume(_) => None,
            MachineState::Meta(m) => Some(MetaMonotone::of(&m.state)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_is_idempotent_and_replicas_hash_alike() {
        let mut m = Machine::new(MachineKind::Volume, 5);
        let w = VolumeCommand::Write {
            offset: 10,
            data: b"abc",
        }
        .encode();
        m.apply(6, &w).unwrap();
        let h = m.hash();
        m.apply(6, &w).unwrap();
        assert_eq!(m.hash(), h);
        assert_eq!(m.applied, 6);
        let mut d = VolumeData::default();
        d.apply(&w).unwrap();
        assert_eq!(
            d.hash(),
            h,
            "a replica's data hashes like the replayed machine"
        );
    }

    #[test]
    fn a_power_loss_keeps_synced_pages_and_some_unsynced_ones() {
        let mut d = VolumeData::default();
        d.apply(
            &VolumeCommand::Write {
                offset: 0,
                data: &[1; 4096],
            }
            .encode(),
        )
        .unwrap();
        d.sync();
        d.apply(
            &VolumeCommand::Write {
                offset: 0,
                data: &[2; 4096],
            }
            .encode(),
        )
        .unwrap();
        d.power_loss(|page| page % 2 == 0);
        assert!(d.bytes[..PAGE_BYTES].iter().all(|b| *b == 2), "kept page");
        assert!(
            d.bytes[PAGE_BYTES..2 * PAGE_BYTES].iter().all(|b| *b == 1),
            "lost page"
        );
    }

    #[test]
    fn registers_hold_one_stamp_or_are_torn() {
        let b = register_bytes(77);
        assert_eq!(register_stamp(&b), Some(77));
        assert_eq!(register_stamp(&[0; REGISTER_BYTES]), Some(0));
        let mut torn = b.clone();
        torn[100] ^= 1;
        assert_eq!(register_stamp(&torn), None);
    }
}
