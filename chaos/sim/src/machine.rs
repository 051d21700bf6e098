//! The replicated state machines the simulation runs on top of the Raft groups: a small
//! volume (bytes changed by `VolumeCommand`s) and the cluster metadata (`ClusterState`
//! changed by `MetaCommand`s), both exactly as the core defines their commands.
//!
//! A machine has an *image*: its state plus the index it has applied, encoded as bytes.
//! The driver writes the image into the node's `LogStore` together with the applied
//! index (one batch), which is the crash rule: the recorded applied index never covers
//! state that is not in the recorded image. The same image is a Raft snapshot's data.

use roamdisk_core::command::VolumeCommand;
use roamdisk_core::ids::{Generation, VolumeId};
use roamdisk_core::meta::{ClusterState, MetaCommand};

/// Bytes of the simulated volume. Small, so that hashing the whole state after every
/// applied entry stays cheap (the per-index state hash is how replicas are compared).
pub const VOLUME_BYTES: usize = 4096;

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
                match cmd {
                    VolumeCommand::Write { offset, data } => {
                        for (i, b) in data.iter().enumerate() {
                            if let Some(slot) = v.bytes.get_mut(offset as usize + i) {
                                *slot = *b;
                            }
                        }
                    }
                    VolumeCommand::Zero { offset, len, .. } => {
                        let end = (offset.saturating_add(len) as usize).min(VOLUME_BYTES);
                        let start = (offset as usize).min(end);
                        v.bytes[start..end].fill(0);
                    }
                    VolumeCommand::Resize { size } => v.size = v.size.max(size),
                }
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

    pub fn hash(&self) -> StateHash {
        let mut h = blake3::Hasher::new();
        match &self.state {
            MachineState::Volume(v) => {
                h.update(b"volume");
                h.update(&v.size.to_le_bytes());
                h.update(&v.bytes);
            }
            MachineState::Meta(m) => {
                h.update(b"meta");
                h.update(&m.state.encode());
            }
        }
        *h.finalize().as_bytes()
    }

    pub fn monotone(&self) -> Option<MetaMonotone> {
        match &self.state {
            MachineState::Volume(_) => None,
            MachineState::Meta(m) => Some(MetaMonotone {
                next_volume_id: m.state.next_volume_id,
                generations: m
                    .state
                    .volumes
                    .values()
                    .map(|v| (v.id, (v.generation, v.size)))
                    .collect(),
            }),
        }
    }

    /// Image: kind (1 byte), applied index (8 bytes LE), then the state.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(VOLUME_BYTES + 32);
        match &self.state {
            MachineState::Volume(v) => {
                out.push(1);
                out.extend_from_slice(&self.applied.to_le_bytes());
                out.extend_from_slice(&v.size.to_le_bytes());
                out.extend_from_slice(&v.bytes);
            }
            MachineState::Meta(m) => {
                out.push(2);
                out.extend_from_slice(&self.applied.to_le_bytes());
                out.extend_from_slice(&m.state.encode());
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Machine, MachineError> {
        let bad = |what: &str| MachineError(format!("machine image: {what}"));
        if bytes.len() < 9 {
            return Err(bad("too short"));
        }
        let applied = u64::from_le_bytes(bytes[1..9].try_into().expect("8 bytes"));
        let rest = &bytes[9..];
        let state = match bytes[0] {
            1 => {
                if rest.len() != 8 + VOLUME_BYTES {
                    return Err(bad("volume image has the wrong length"));
                }
                MachineState::Volume(VolumeMachine {
                    size: u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")),
                    bytes: rest[8..].to_vec(),
                })
            }
            2 => MachineState::Meta(MetaMachine {
                state: ClusterState::decode(rest).map_err(|e| bad(&e.to_string()))?,
            }),
            k => return Err(bad(&format!("unknown kind {k}"))),
        };
        Ok(Machine { applied, state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_round_trips_and_apply_is_idempotent_by_index() {
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
        let back = Machine::decode(&m.encode()).unwrap();
        assert_eq!(back, m);

        let mut meta = Machine::new(MachineKind::Meta, 0);
        meta.apply(1, &MetaCommand::DeleteVolume { name: "x".into() }.encode())
            .unwrap();
        assert_eq!(Machine::decode(&meta.encode()).unwrap(), meta);
    }
}
