//! Consistency groups on real processes behind the WAN emulator: a writer whose every
//! write to one volume depends on its previous write to another being acknowledged,
//! the home site killed at a seeded moment, a forced failover, and a check that what
//! the new home serves is one cut of the writer's sequence. The volumes of a group must
//! always be one cut; the same two volumes outside a group (the negative control) are
//! not, once their logs ship at different paces.
//!
//! Seeds: `ROAMDISK_GROUP_SEEDS` (default 3; the record in `benches/results/chaos.md`
//! ran 20).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roamdisk_chaos::nbd::NbdConn;
use roamdisk_playground::Cluster;

mod common;
use common::*;

/// Blocks of the "big" volume each of its writes covers (256 KiB): its log ships far
/// more bytes than the small one's, so outside a group it falls behind.
const SPAN: u64 = 64;
const BIG_BLOCKS: u64 = 16 * MIB / BLOCK;
const SMALL_BLOCKS: u64 = 256;

/// One write the writer sent (acknowledged or in flight when the home died): sequence
/// numbers order them, and each was sent after the one before it was acknowledged.
#[derive(Clone, Copy, Debug)]
struct Sent {
    seq: u64,
    /// 0: the big volume, 1: the small one.
    volume: usize,
    first: u64,
    blocks: u64,
}

/// Writes alternately to `big` (SPAN blocks) and `small` (one block), each write sent
/// only after the previous one was acknowledged, until its connection dies.
fn spawn_writer(
    addr: String,
    big: &str,
    small: &str,
    sent: Arc<Mutex<Vec<Sent>>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (big, small) = (big.to_owned(), small.to_owned());
    std::thread::spawn(move || {
        let mut conns = [
            NbdConn::connect(&addr, &big, Duration::from_secs(60)).unwrap(),
            NbdConn::connect(&addr, &small, Duration::from_secs(60)).unwrap(),
        ];
        let mut seq = 0u64;
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for volume in 0..2 {
                seq += 1;
                let (first, blocks) = if volume == 0 {
                    ((i % (BIG_BLOCKS / SPAN)) * SPAN, SPAN)
                } else {
                    (i % SMALL_BLOCKS, 1)
                };
                let data: Vec<u8> = (first..first + blocks)
                    .flat_map(|b| block_data(b, seq))
                    .collect();
                sent.lock().unwrap().push(Sent {
                    seq,
                    volume,
                    first,
                    blocks,
                });
                if conns[volume].write(first * BLOCK, &data).is_err() {
                    return; // the home is gone
                }
            }
            i += 1;
        }
    })
}

/// Every block's version through `export` at `addr`.
fn versions(addr: &str, export: &str, blocks: u64) -> Vec<u64> {
    let mut c = NbdConn::connect(addr, export, Duration::from_secs(60)).unwrap();
    let per = 256u64;
    let mut out = Vec::with_capacity(blocks as usize);
    for first in (0..blocks).step_by(per as usize) {
        let n = per.min(blocks - first);
        let data = c.read(first * BLOCK, (n * BLOCK) as u32).unwrap();
        for (k, b) in data.chunks(BLOCK as usize).enumerate() {
            out.push(version_of(first + k as u64, b));
        }
    }
    out
}

/// Whether the two volumes' contents are one cut of `sent`: with C the newest write
/// found in either, every block holds exactly the newest write up to C that covered it.
/// Returns the first block that breaks the cut.
fn broken_cut(sent: &[Sent], found: [&[u64]; 2]) -> Option<String> {
    let cut = found
        .iter()
        .flat_map(|v| v.iter())
        .copied()
        .max()
        .unwrap_or(0);
    let mut want: [BTreeMap<u64, u64>; 2] = Default::default();
    for s in sent.iter().filter(|s| s.seq <= cut) {
        for b in s.first..s.first + s.blocks {
            want[s.volume].insert(b, s.seq);
        }
    }
    for volume in 0..2 {
        for (b, &got) in found[volume].iter().enumerate() {
            let expect = want[volume].get(&(b as u64)).copied().unwrap_or(0);
            if got != expect {
                return Some(format!(
                    "cut at write {cut}: {} block {b} holds write {got}, the cut has {expect}",
                    ["big", "small"][volume]
                ));
            }
        }
    }
    None
}

fn leader(c: &Cluster, name: &str) -> u64 {
    wait_until(&format!("{name} to elect a leader"), 60, || {
        admin(c, 1).volume(name).ok()?["leader"].as_u64()
    })
}

/// One seed: a group (a: big, b: small) and two plain volumes (c: big, d: small) led by
/// different nodes, a writer on each pair at osaka, osaka killed after a seeded number of
/// writes, everything failed over to hokkaido. Returns whether each pair was one cut.
fn one_seed(seed: u64) -> (Outcome, Outcome) {
    let (dir, mut c) = start(&[("c", 16 * MIB), ("d", MIB)], 28000);
    if std::env::var("ROAMDISK_GROUP_KEEP").is_ok() {
        eprintln!("seed {seed}: cluster kept in {}", dir.keep().display());
    }
    admin(&c, 1)
        .create_group(
            "g",
            &[("a".into(), 16 * MIB), ("b".into(), MIB)],
            Some(3),
            Some("osaka"),
            None,
            None,
        )
        .unwrap();
    // The control's logs ship from different nodes, each at its own pace.
    let (lc, ld) = (leader(&c, "c"), leader(&c, "d"));
    if lc == ld {
        let other = [1, 2, 3].into_iter().find(|n| *n != lc).unwrap();
        admin(&c, lc).transfer_leader("d", other).unwrap();
        wait_until("d's leader to move", 60, || {
            (leader(&c, "d") != lc).then_some(())
        });
    }
    leader(&c, "g");
    let stop = Arc::new(AtomicBool::new(false));
    let (sg, sc): (Arc<Mutex<Vec<Sent>>>, Arc<Mutex<Vec<Sent>>>) = Default::default();
    let wg = spawn_writer(nbd(&c, 1), "a", "b", Arc::clone(&sg), Arc::clone(&stop));
    let wc = spawn_writer(nbd(&c, 2), "c", "d", Arc::clone(&sc), Arc::clone(&stop));
    // A seeded moment: after 100..700 writes of each pair (splitmix64 of the seed).
    let mut x = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let after = 100 + (x ^ (x >> 31)) % 600;
    wait_until("the writers to reach the seeded moment", 120, || {
        (sg.lock().unwrap().len() as u64 >= 2 * after
            && sc.lock().unwrap().len() as u64 >= 2 * after)
            .then_some(())
    });
    for id in [1, 2, 3] {
        c.kill(id).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let _ = (wg.join(), wc.join());
    let plan = admin(&c, 4).failover_plan("hokkaido", &[]).unwrap();
    // A volume whose every surviving replica is mid-copy, or holds copied blocks newer
    // than its log, has no state to fail over to: the plan refuses it (and says so).
    let planned = |name: &str| {
        plan["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
    };
    for r in plan["refused"].as_array().unwrap() {
        eprintln!("seed {seed}: refused {r}");
        assert!(r["why"].as_str().unwrap().contains("whole data"), "{plan}");
    }
    if let Some(g) = planned("g") {
        assert_eq!(g["group"]["volumes"], serde_json::json!(["a", "b"]), "{g}");
        assert_eq!(g["group"]["cut"]["index"], g["last_index"]);
    }
    if !plan["volumes"].as_array().unwrap().is_empty() {
        admin(&c, 4)
            .failover_execute(plan["plan"].as_str().unwrap(), true)
            .unwrap();
    }
    let at = nbd(&c, 5);
    let check = |names: [&str; 2], blocks: [u64; 2], sent: &Mutex<Vec<Sent>>| {
        if planned(if names[0] == "a" { "g" } else { names[0] }).is_none()
            || (names[1] == "d" && planned("d").is_none())
        {
            return Outcome::NoWholeReplica;
        }
        for n in names {
            until_serving(&c, 4, if n == "a" || n == "b" { "g" } else { n });
        }
        let (x, y) = (
            versions(&at, names[0], blocks[0]),
            versions(&at, names[1], blocks[1]),
        );
        match broken_cut(&sent.lock().unwrap(), [&x, &y]) {
            Some(why) => Outcome::Broken(why),
            None => Outcome::OneCut,
        }
    };
    let group = check(["a", "b"], [BIG_BLOCKS, SMALL_BLOCKS], &sg);
    let control = check(["c", "d"], [BIG_BLOCKS, SMALL_BLOCKS], &sc);
    eprintln!(
        "seed {seed}: killed after {after} writes per pair; group: {group:?}; control: {control:?}"
    );
    (group, control)
}

#[derive(Debug, PartialEq)]
enum Outcome {
    OneCut,
    Broken(String),
    /// Not failed over: no surviving replica held one state of the volume.
    NoWholeReplica,
}

#[test]
fn a_group_fails_over_to_one_cut_and_separate_volumes_do_not() {
    let seeds: u64 = std::env::var("ROAMDISK_GROUP_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let first: u64 = std::env::var("ROAMDISK_GROUP_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let (mut control_broken, mut group_checked) = (0, 0);
    for seed in first..first + seeds {
        let (group, control) = one_seed(seed);
        assert!(
            !matches!(group, Outcome::Broken(_)),
            "seed {seed}: the group's failover broke its cut: {group:?}"
        );
        group_checked += usize::from(group == Outcome::OneCut);
        control_broken += usize::from(matches!(control, Outcome::Broken(_)));
    }
    eprintln!(
        "{seeds} seeds: the group failed over to one cut in {group_checked} (no whole replica in the others); \
         the control broke in {control_broken}"
    );
    assert!(
        group_checked > 0,
        "the group never failed over: nothing was checked"
    );
    assert!(
        control_broken > 0,
        "the negative control (the same volumes, not grouped) never broke: the test cannot tell"
    );
}

#[test]
fn the_cut_check_catches_a_volume_ahead_of_the_other() {
    let sent: Vec<Sent> = (1..=4)
        .map(|seq| Sent {
            seq,
            volume: ((seq + 1) % 2) as usize,
            first: 0,
            blocks: 1,
        })
        .collect();
    // Writes 1 (big), 2 (small), 3 (big), 4 (small).
    assert_eq!(broken_cut(&sent, [&[3], &[4]]), None);
    assert_eq!(broken_cut(&sent, [&[3], &[2]]), None);
    assert_eq!(broken_cut(&sent, [&[0], &[0]]), None);
    assert!(
        broken_cut(&sent, [&[1], &[4]]).is_some(),
        "small ahead of big"
    );
    assert!(
        broken_cut(&sent, [&[0], &[2]]).is_some(),
        "small without the big before it"
    );
}
