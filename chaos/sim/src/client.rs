//! Clients: each has at most one request in flight, sends it to the node it believes
//! leads the group, follows leader hints, and retries on refusals and timeouts (so one
//! command may be committed twice, as with a real client). Volume clients write (as NBD
//! writes without FUA, answered early, or with FUA, answered at commit), flush, and read
//! registers; metadata clients propose metadata commands.

use raft::eraftpb::Entry;
use roamdisk_core::command::VolumeCommand;
use roamdisk_core::ids::{Generation, GroupId, NodeId, META_GROUP};
use roamdisk_core::meta::{Durability, MetaCommand, NodeInfo};
use roamdisk_core::node::Ack;

use crate::checker::entry_digest;
use crate::config::Micros;
use crate::machine::{register_bytes, MachineKind, REGISTERS, REGISTERS_AT, REGISTER_BYTES};
use crate::rng::SimRng;

/// What a request asks.
#[derive(Clone, Debug)]
pub enum Op {
    Write {
        payload: Vec<u8>,
        ack: Ack,
        /// Digest of the log entry this write becomes.
        digest: [u8; 32],
        /// A stamped write of a register: (slot, stamp).
        register: Option<(usize, u64)>,
    },
    Flush,
    Read {
        slot: usize,
    },
}

pub struct InFlight {
    pub request: u64,
    pub attempt: u32,
    pub op: Op,
    /// When the first attempt was sent.
    pub issued_at: Micros,
}

pub struct Client {
    pub group: GroupId,
    pub kind: MachineKind,
    pub hint: Option<NodeId>,
    pub in_flight: Option<InFlight>,
    next_request: u64,
    pub acked: u64,
    /// A client of the liveness check at the end: it runs in the quiet phase and its
    /// one request must be acknowledged.
    pub liveness: bool,
    /// The admin's one metadata command (a site-loss run's failover and discard), sent
    /// in any phase until it is acknowledged.
    pub admin: Option<Vec<u8>>,
    /// Sends nothing more (an admin command given up on).
    pub retired: bool,
    /// Random metadata commands register nodes far from the run's own ids (a site-loss
    /// run's metadata places the volume on the real ones).
    pub foreign_node_ids: bool,
}

fn write_op(payload: Vec<u8>, ack: Ack, register: Option<(usize, u64)>) -> Op {
    let mut e = Entry::default();
    e.data = payload.clone().into();
    Op::Write {
        digest: entry_digest(&e),
        payload,
        ack,
        register,
    }
}

impl Client {
    pub fn new(group: GroupId, kind: MachineKind, liveness: bool) -> Client {
        Client {
            group,
            kind,
            hint: None,
            in_flight: None,
            next_request: 1,
            acked: 0,
            liveness,
            admin: None,
            retired: false,
            foreign_node_ids: false,
        }
    }

    /// A client that sends the metadata command `payload` once.
    pub fn admin(payload: Vec<u8>) -> Client {
        Client {
            admin: Some(payload),
            ..Client::new(META_GROUP, MachineKind::Meta, false)
        }
    }

    /// Starts a new request drawn from `rng`; `stamps` numbers register writes.
    pub fn start(&mut self, rng: &mut SimRng, now: Micros, stamps: &mut u64) -> &mut InFlight {
        let op = match self.kind {
            MachineKind::Meta => match &self.admin {
                Some(cmd) => write_op(cmd.clone(), Ack::Committed, None),
                None => write_op(
                    meta_command(rng, self.foreign_node_ids),
                    Ack::Committed,
                    None,
                ),
            },
            MachineKind::Volume if self.liveness => {
                write_op(volume_command(rng), Ack::Committed, None)
            }
            MachineKind::Volume => {
                let ack = if rng.below(10) < 7 {
                    Ack::Written
                } else {
                    Ack::Committed
                };
                match rng.weighted(&[40, 25, 10, 25]) {
                    0 => write_op(volume_command(rng), ack, None),
                    1 => {
                        *stamps += 1;
                        let slot = rng.below(REGISTERS as u64) as usize;
                        let payload = VolumeCommand::Write {
                            offset: (REGISTERS_AT + slot * REGISTER_BYTES) as u64,
                            data: &register_bytes(*stamps),
                        }
                        .encode();
                        write_op(payload, ack, Some((slot, *stamps)))
                    }
                    2 => Op::Flush,
                    _ => Op::Read {
                        slot: rng.below(REGISTERS as u64) as usize,
                    },
                }
            }
        };
        let request = self.next_request;
        self.next_request += 1;
        self.in_flight.insert(InFlight {
            request,
            attempt: 0,
            op,
            issued_at: now,
        })
    }
}

pub fn volume_command(rng: &mut SimRng) -> Vec<u8> {
    match rng.weighted(&[80, 15, 5]) {
        0 => {
            let len = rng.range(1, 64) as usize;
            let offset = rng.below((REGISTERS_AT - len) as u64);
            let data = rng.bytes(len);
            VolumeCommand::Write {
                offset,
                data: &data,
            }
            .encode()
        }
        1 => VolumeCommand::Zero {
            offset: rng.below(REGISTERS_AT as u64 - 256),
            len: rng.range(1, 256),
            punch: rng.below(2) == 0,
        }
        .encode(),
        _ => VolumeCommand::Resize {
            size: (crate::machine::VOLUME_BYTES as u64) + rng.below(16) * 4096,
        }
        .encode(),
    }
}

const SITES: [&str; 3] = ["a", "b", "c"];
const NAMES: [&str; 4] = ["v0", "v1", "v2", "v3"];

/// A random metadata command; `foreign_node_ids`: nodes it registers have ids from 100.
pub fn meta_command(rng: &mut SimRng, foreign_node_ids: bool) -> Vec<u8> {
    let name = |rng: &mut SimRng| NAMES[rng.below(NAMES.len() as u64) as usize].to_string();
    let cmd = match rng.weighted(&[20, 25, 15, 10, 15, 15]) {
        0 => {
            let id = rng.range(1, 8) + if foreign_node_ids { 100 } else { 0 };
            MetaCommand::AddNode(NodeInfo {
                id: NodeId(id),
                // A node's site never changes, so it follows from its id.
                site: SITES[(id % 3) as usize].into(),
                peer_addr: format!("10.0.0.{id}:7000"),
                admin_addr: format!("10.0.0.{id}:8000"),
                nbd_addr: format!("10.0.0.{id}:9000"),
            })
        }
        1 => MetaCommand::CreateVolume {
            name: name(rng),
            size: rng.range(1, 8) * 4096,
            replicas: rng.range(1, 3) as u32,
            home_site: if rng.below(2) == 0 {
                None
            } else {
                Some(SITES[rng.below(3) as usize].into())
            },
            durability: if rng.below(2) == 0 {
                Durability::Node
            } else {
                Durability::Site
            },
        },
        2 => MetaCommand::ResizeVolume {
            name: name(rng),
            size: rng.range(1, 16) * 4096,
        },
        3 => MetaCommand::DeleteVolume { name: name(rng) },
        4 => MetaCommand::MoveVolume {
            name: name(rng),
            to: SITES[rng.below(3) as usize].into(),
        },
        // A finish names the generation it expects; a stale one is refused, which is
        // how a repeated finish does nothing. Guessing low generations makes both
        // outcomes common.
        _ => MetaCommand::FinishMove {
            name: name(rng),
            to: SITES[rng.below(3) as usize].into(),
            generation: Generation(rng.range(1, 3)),
        },
    };
    cmd.encode()
}
