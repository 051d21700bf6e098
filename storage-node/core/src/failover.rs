//! Failover plans: which replica a volume's group re-forms from when its home site is
//! lost, and the loss that states, decided from what the surviving replicas report
//! ([`ReplicaReport`]). Pure: the admin API gathers the reports, this decides, and
//! `failover execute` decides again and refuses if anything moved.
//!
//! The replica chosen is the most advanced by Raft's own order, `(last term, last
//! index)`, among the whole replicas outside the lost home that answered: its log then
//! holds every entry any of them holds as committed (a replica whose last entry has the
//! highest term got its log from that term's leader, which held every entry committed
//! before it; within one term the longer log holds the shorter). A replica at the
//! failover's site wins a tie; one elsewhere is chosen if it is further ahead, and the
//! plan says so.
//!
//! The loss, stated before anything changes:
//! - **lossless** for a `durability=site` volume when every replica outside the home
//!   answered: each acknowledged write was synced by one of them, and the chosen one
//!   holds what any of them holds (not with `degrade-after`: its home may have answered
//!   writes alone; not when a replica that is not whole, copying blocks, is further
//!   ahead: its log may hold the last acknowledged write). A `durability=node` volume is never stated lossless:
//!   its home acknowledged writes the other sites may not have had yet.
//! - otherwise, **writes acknowledged after `after` may be lost**, `after` being the
//!   home-site time (the leader's stamp) of the newest entry at or below the highest
//!   index the chosen replica knows committed. Every write acknowledged before that
//!   instant has a lower index than that entry (an acknowledged entry is in every later
//!   leader's log, below what it proposes next), and the chosen replica holds it.
//!   `entries` and `bytes` are what the home's leader last reported it had beyond the
//!   chosen replica (its tail report, every 250 ms: the same lag `status` shows), a
//!   lower bound when the home acknowledged more after that report. No asynchronous
//!   scheme can bound that count without a synchronous report per write; the time is
//!   the yardstick that holds, and the chaos checker tests it.

use serde::{Deserialize, Serialize};

use crate::ids::{Generation, NodeId};
use crate::meta::{ClusterState, Durability, Rpo, VolumeInfo};
use crate::node::api::ReplicaReport;

/// One volume's part of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumePlan {
    pub name: String,
    pub generation: Generation,
    pub epoch: u64,
    pub durability: Durability,
    /// The site the volume is lost at, and whether any of its nodes answered.
    pub home: String,
    pub home_reachable: bool,
    /// The replica the group re-forms from.
    pub node: NodeId,
    pub site: String,
    /// Chosen at another site than the failover's because it is further ahead.
    pub further_ahead: bool,
    pub last_index: u64,
    pub last_term: u64,
    pub commit: u64,
    /// Above every term a survivor reported.
    pub term_floor: u64,
    /// Home-site time of its last entry (Unix ms), and how long ago it last heard from
    /// the home's leader.
    pub last_entry_unix_ms: Option<u64>,
    pub heard_from_home_ms_ago: Option<u64>,
    pub lossless: bool,
    pub rpo: Rpo,
    /// The same, in words.
    pub rpo_text: String,
    /// Replicas outside the home that did not answer.
    pub unreachable: Vec<NodeId>,
    /// The home may still acknowledge writes the lease cannot stop: a site-durable
    /// volume with `degrade-after` goes on alone once cut off (see
    /// `node::group::answers_open`). Fencing it needs the home to be down.
    pub home_may_write: bool,
}

/// Why a volume cannot be failed over now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("volume {0:?}: no replica outside its home site answered with whole data (every one is copying blocks, holds copied blocks newer than its log's end, is fenced or is unreachable)")]
    NoWholeReplica(String),
    #[error("volume {name:?} already lives at {site:?}")]
    AlreadyThere { name: String, site: String },
}

/// Plans the failover of `v` to site `to` from the `reports` of the replicas outside its
/// home that answered; `unreachable` are those that did not.
pub fn plan_volume(
    to: &str,
    v: &VolumeInfo,
    cluster: &ClusterState,
    reports: &[ReplicaReport],
    unreachable: &[NodeId],
    home_reachable: bool,
) -> Result<VolumePlan, PlanError> {
    if v.home_site == to && v.failover.is_none() {
        return Err(PlanError::AlreadyThere {
            name: v.name.clone(),
            site: to.into(),
        });
    }
    let site_of = |n: u64| {
        cluster
            .nodes
            .get(&NodeId(n))
            .map_or_else(String::new, |i| i.site.clone())
    };
    // Whole: not copying, and its log reaches past every entry its copied blocks may
    // hold (`whole_at`), so that once applied it is one state the volume had: a cut
    // of the log, crash-consistent across a group's volumes. Found by the group test
    // (`chaos/tests/group.rs`): a far-lagging learner re-copied after a snapshot holds
    // blocks 200 entries newer than its log's end.
    let whole = |r: &&ReplicaReport| {
        !r.recovering
            && r.last_index >= r.whole_at
            && !r.fenced
            && r.epoch == v.epoch
            && site_of(r.node) != v.home_site
    };
    let best = reports
        .iter()
        .filter(whole)
        .max_by_key(|r| {
            (
                r.last_term,
                r.last_index,
                site_of(r.node) == to,
                std::cmp::Reverse(r.node),
            )
        })
        .ok_or_else(|| PlanError::NoWholeReplica(v.name.clone()))?;
    let best_at_to = reports
        .iter()
        .filter(whole)
        .filter(|r| site_of(r.node) == to)
        .max_by_key(|r| (r.last_term, r.last_index));
    let site = site_of(best.node);
    let further_ahead = site != to && best_at_to.is_some();
    let term_floor = reports.iter().map(|r| r.term).max().unwrap_or(0);
    let home_may_write = v.durability == Durability::Site
        && matches!(v.on_no_site, crate::meta::OnNoSite::DegradeAfter { .. });
    // Every replica that could have synced a site-durable write answered (and the home
    // never answered writes alone: degrade-after may have), and none of them is further
    // ahead than the chosen one: one that is not whole (copying blocks) still synced the
    // entries in its log, and may hold the last acknowledged write (the site-loss
    // simulation, seed 389: a lossless plan from a replica behind one that was copying).
    let ahead = reports.iter().any(|r| {
        !r.fenced
            && r.epoch == v.epoch
            && site_of(r.node) != v.home_site
            && (r.last_term, r.last_index) > (best.last_term, best.last_index)
    });
    let lossless =
        v.durability == Durability::Site && unreachable.is_empty() && !home_may_write && !ahead;
    let tail = reports
        .iter()
        .filter_map(|r| r.tail.map(|t| (r, t)))
        .max_by_key(|(_, t)| (t.term, t.last, t.unix_ms));
    let (entries, bytes, as_of) = match tail {
        Some((from, t)) => {
            let missing = t.last.saturating_sub(best.last_index);
            // The lag was the reporting replica's; scale its bytes to what is missing.
            let behind = t
                .last
                .saturating_sub(from.last_index.min(t.last))
                .max(t.lag.entries);
            let bytes = if behind == 0 || missing == 0 {
                0
            } else {
                (t.lag.bytes as f64 * (missing as f64 / behind as f64).min(1.0)) as u64
            };
            (missing, bytes, Some(t.unix_ms))
        }
        None => (0, 0, None),
    };
    let after = if lossless {
        None
    } else {
        best.commit_unix_ms.or(best.last_entry_unix_ms())
    };
    let rpo = Rpo {
        lossless,
        entries: if lossless { 0 } else { entries },
        bytes: if lossless { 0 } else { bytes },
        after_unix_ms: after,
        as_of_unix_ms: if lossless { None } else { as_of },
    };
    let mut rpo_text = rpo_text(&v.home_site, &site, best.node, &rpo);
    if home_may_write {
        rpo_text.push_str(&format!(
            "; {} may still acknowledge writes (degrade-after goes on without the metadata quorum): make sure it is down, or they become its divergent tail",
            v.home_site
        ));
    }
    Ok(VolumePlan {
        name: v.name.clone(),
        generation: v.generation,
        epoch: v.epoch,
        durability: v.durability,
        home: v.home_site.clone(),
        home_reachable,
        node: NodeId(best.node),
        site,
        further_ahead,
        last_index: best.last_index,
        last_term: best.last_term,
        commit: best.commit,
        term_floor,
        last_entry_unix_ms: best.last_unix_ms,
        heard_from_home_ms_ago: best.heard_leader_ms_ago,
        lossless,
        rpo,
        rpo_text,
        unreachable: unreachable.to_vec(),
        home_may_write,
    })
}

trait LastStamp {
    fn last_entry_unix_ms(&self) -> Option<u64>;
}

impl LastStamp for ReplicaReport {
    fn last_entry_unix_ms(&self) -> Option<u64> {
        // Only when nothing past the commit is known: the last entry may be of a deposed
        // leader, whose time says nothing of what was acknowledged.
        (self.last_index == self.commit)
            .then_some(self.last_unix_ms)
            .flatten()
    }
}

/// The loss in words.
pub fn rpo_text(home: &str, site: &str, node: u64, rpo: &Rpo) -> String {
    if rpo.lossless {
        return format!("none: every write acknowledged at {home} is on node {node} ({site})");
    }
    let after = rpo
        .after_unix_ms
        .map_or_else(|| "any time (no stamped entry survives)".into(), rfc3339_ms);
    let known = match rpo.as_of_unix_ms {
        Some(t) => format!(
            "; {} entries ({}) that {home}'s leader had at {} (its last report) are missing, and any it acknowledged after that",
            rpo.entries,
            human_bytes(rpo.bytes),
            rfc3339_ms(t)
        ),
        None => format!("; {home}'s leader never reported to the surviving sites"),
    };
    format!("writes acknowledged at {home} after {after} may be lost{known}")
}

/// Bytes for people: `9.2 MiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `2026-12-04T10:31:02.114Z` for a Unix time in milliseconds (UTC).
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The id of a plan: a digest of what it decided, so that `execute` can tell whether the
/// state moved since (a replica advanced, the volume moved, another failover ran).
pub fn plan_id(to: &str, plans: &[VolumePlan]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(to.as_bytes());
    for p in plans {
        h.update(p.name.as_bytes());
        for n in [
            p.generation.0,
            p.epoch,
            p.node.0,
            p.last_index,
            p.last_term,
            u64::from(p.lossless),
        ] {
            h.update(&n.to_be_bytes());
        }
    }
    h.finalize().to_hex()[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{MetaCommand, NodeInfo};
    use crate::node::api::TailReport;

    fn cluster() -> (ClusterState, VolumeInfo) {
        let mut s = ClusterState::default();
        for (id, site) in [
            (1, "osaka"),
            (2, "osaka"),
            (3, "osaka"),
            (4, "hokkaido"),
            (5, "hokkaido"),
            (6, "hokkaido"),
            (7, "fukuoka"),
        ] {
            s.apply(MetaCommand::AddNode(NodeInfo {
                id: NodeId(id),
                site: site.into(),
                peer_addr: String::new(),
                admin_addr: String::new(),
                nbd_addr: String::new(),
            }))
            .unwrap();
        }
        let v = s
            .apply(MetaCommand::CreateVolume {
                name: "vm1".into(),
                size: 1 << 20,
                replicas: 3,
                home_site: Some("osaka".into()),
                durability: Durability::Node,
            })
            .unwrap()
            .unwrap();
        (s, v)
    }

    fn report(node: u64, last_term: u64, last: u64, commit: u64) -> ReplicaReport {
        ReplicaReport {
            node,
            epoch: 0,
            term: last_term,
            last_index: last,
            last_term,
            commit,
            applied: commit,
            last_unix_ms: Some(1_000_000 + last),
            commit_unix_ms: Some(1_000_000 + commit),
            recovering: false,
            whole_at: 0,
            fenced: false,
            heard_leader_ms_ago: Some(300),
            leader: Some(1),
            tail: None,
            tail_ms_ago: None,
        }
    }

    #[test]
    fn the_most_advanced_replica_is_chosen_and_its_site_named() {
        let (s, v) = cluster();
        let hok = *v
            .learners
            .iter()
            .find(|n| s.nodes[n].site == "hokkaido")
            .unwrap();
        let fuk = *v
            .learners
            .iter()
            .find(|n| s.nodes[n].site == "fukuoka")
            .unwrap();
        // Fukuoka is further ahead: chosen, and said so.
        let p = plan_volume(
            "hokkaido",
            &v,
            &s,
            &[report(hok.0, 3, 90, 88), report(fuk.0, 3, 100, 95)],
            &[],
            false,
        )
        .unwrap();
        assert_eq!(p.node, fuk);
        assert!(p.further_ahead);
        // A higher last term beats a longer log (Raft's order).
        let p = plan_volume(
            "hokkaido",
            &v,
            &s,
            &[report(hok.0, 4, 80, 80), report(fuk.0, 3, 100, 95)],
            &[],
            false,
        )
        .unwrap();
        assert_eq!(p.node, hok);
        assert!(!p.further_ahead);
        // A replica copying blocks is never chosen; none whole is an error.
        let mut r = report(fuk.0, 5, 200, 200);
        r.recovering = true;
        let p = plan_volume(
            "hokkaido",
            &v,
            &s,
            &[report(hok.0, 3, 90, 88), r.clone()],
            &[],
            false,
        )
        .unwrap();
        assert_eq!(p.node, hok);
        assert_eq!(
            plan_volume("hokkaido", &v, &s, &[r], &[], false),
            Err(PlanError::NoWholeReplica("vm1".into()))
        );
        // Nor one whose copied blocks are newer than its log's end: it holds a mix of
        // states (its log would have to reach 250 to be one).
        let mut r = report(fuk.0, 5, 200, 200);
        r.whole_at = 250;
        let p = plan_volume(
            "hokkaido",
            &v,
            &s,
            &[report(hok.0, 3, 90, 88), r.clone()],
            &[],
            false,
        )
        .unwrap();
        assert_eq!(p.node, hok);
        r.whole_at = 200;
        let p = plan_volume(
            "hokkaido",
            &v,
            &s,
            &[report(hok.0, 3, 90, 88), r],
            &[],
            false,
        )
        .unwrap();
        assert_eq!(
            p.node, fuk,
            "a log that reaches its copy's end is whole once applied"
        );
    }

    #[test]
    fn the_loss_is_stated_from_the_commit_and_the_last_tail_report() {
        let (s, v) = cluster();
        let hok = *v
            .learners
            .iter()
            .find(|n| s.nodes[n].site == "hokkaido")
            .unwrap();
        let mut r = report(hok.0, 3, 100, 96);
        r.tail = Some(TailReport {
            term: 3,
            last: 140,
            unix_ms: 2_000_000,
            lag: crate::lag::Lag {
                entries: 50,
                bytes: 50 << 20,
                seconds: 1.0,
                drain_bytes_per_sec: 0.0,
            },
        });
        let p = plan_volume("hokkaido", &v, &s, &[r], &[], false).unwrap();
        assert!(!p.lossless, "a durability=node volume is never lossless");
        assert_eq!(
            p.rpo.after_unix_ms,
            Some(1_000_096),
            "the commit's time, not the last entry's"
        );
        assert_eq!(p.rpo.entries, 40);
        assert_eq!(
            p.rpo.bytes,
            40 << 20,
            "the reported lag scaled to what is missing"
        );
        assert!(p.rpo_text.contains("may be lost"), "{}", p.rpo_text);
        assert!(
            p.rpo_text.contains("40 entries (40.0 MiB)"),
            "{}",
            p.rpo_text
        );
    }

    #[test]
    fn a_site_durable_volume_is_lossless_only_when_every_remote_replica_answered() {
        let (mut s, _) = cluster();
        let v = s
            .apply(MetaCommand::CreateVolume {
                name: "db".into(),
                size: 1 << 20,
                replicas: 3,
                home_site: Some("osaka".into()),
                durability: Durability::Site,
            })
            .unwrap()
            .unwrap();
        let hok = *v
            .learners
            .iter()
            .find(|n| s.nodes[n].site == "hokkaido")
            .unwrap();
        let fuk = *v
            .learners
            .iter()
            .find(|n| s.nodes[n].site == "fukuoka")
            .unwrap();
        let p = plan_volume(
            "hokkaido",
            &v,
            &s,
            &[report(hok.0, 3, 90, 90), report(fuk.0, 3, 92, 90)],
            &[],
            false,
        )
        .unwrap();
        assert!(p.lossless);
        assert_eq!(p.rpo.after_unix_ms, None);
        assert!(p.rpo_text.starts_with("none"), "{}", p.rpo_text);
        let p = plan_volume(
            "hokkaido",
            &v,
            &s,
            &[report(hok.0, 3, 90, 90)],
            &[fuk],
            false,
        )
        .unwrap();
        assert!(
            !p.lossless,
            "fukuoka may hold the only copy of an acknowledged write"
        );
    }

    #[test]
    fn the_plan_id_changes_when_a_replica_advances() {
        let (s, v) = cluster();
        let hok = *v
            .learners
            .iter()
            .find(|n| s.nodes[n].site == "hokkaido")
            .unwrap();
        let a = plan_volume("hokkaido", &v, &s, &[report(hok.0, 3, 90, 88)], &[], false).unwrap();
        let b = plan_volume("hokkaido", &v, &s, &[report(hok.0, 3, 91, 88)], &[], false).unwrap();
        assert_eq!(
            plan_id("hokkaido", &[a.clone()]),
            plan_id("hokkaido", &[a.clone()])
        );
        assert_ne!(plan_id("hokkaido", &[a]), plan_id("hokkaido", &[b]));
    }

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_796_380_262_114), "2026-12-04T10:31:02.114Z");
        assert_eq!(rfc3339_ms(951_782_400_001), "2000-02-29T00:00:00.001Z");
        assert_eq!(human_bytes(9_646_899), "9.2 MiB");
    }
}
