//! Forced failover on real processes behind the WAN emulator: a home site killed, or cut
//! off while a client writes to it; the plan's stated loss checked against what the
//! writers had acknowledged, fencing, the divergent tail kept and reported, the
//! incremental resync after `discard-divergent`, and the move back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use roamdisk_admin_client::AdminClient;
use roamdisk_chaos::nbd::NbdConn;
use roamdisk_core::meta::Durability;
use serde_json::Value;

mod common;
use common::*;

#[derive(Clone, Copy, Debug)]
struct Acked {
    block: u64,
    version: u64,
    at_ms: u64,
}

/// A client writing versions of `blocks` blocks through one export, flushing now and
/// then; every acknowledgement recorded with its time.
struct Writer {
    acked: Arc<Mutex<Vec<Acked>>>,
    /// Requests that failed (the connection is then made again).
    errors: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    fn spawn(addr: String, export: &str, blocks: u64, first_version: u64) -> Writer {
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let errors: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s, export) = (Arc::clone(&acked), Arc::clone(&stop), export.to_owned());
        let e = Arc::clone(&errors);
        let handle = std::thread::spawn(move || {
            let mut version = first_version;
            let mut conn = None;
            let mut x = first_version ^ 0x1234_5678;
            while !s.load(Ordering::Relaxed) {
                let Some(c) = conn.as_mut() else {
                    conn = NbdConn::connect(&addr, &export, Duration::from_secs(120)).ok();
                    if conn.is_none() {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    continue;
                };
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = x % blocks;
                version += 1;
                match c.write(block * BLOCK, &block_data(block, version)) {
                    Ok(()) => a.lock().unwrap().push(Acked {
                        block,
                        version,
                        at_ms: unix_ms(),
                    }),
                    Err(_) => {
                        e.fetch_add(1, Ordering::Relaxed);
                        conn = None;
                        continue;
                    }
                }
                if version % 16 == 0 && c.flush().is_err() {
                    e.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
            }
        });
        Writer {
            acked,
            errors,
            stop,
            handle: Some(handle),
        }
    }

    fn acked(&self) -> Vec<Acked> {
        self.acked.lock().unwrap().clone()
    }

    /// Stops writing; a writer blocked on a request it will never get an answer to is
    /// left behind (its connection dies with the cluster).
    fn stop(&mut self, wait: bool) {
        self.stop.store(true, Ordering::Relaxed);
        if wait {
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// The highest version of each block among `acked` with `at_ms < before`.
fn newest(acked: &[Acked], before: u64) -> BTreeMap<u64, u64> {
    let mut m = BTreeMap::new();
    for a in acked.iter().filter(|a| a.at_ms < before) {
        let v = m.entry(a.block).or_insert(0);
        *v = (*v).max(a.version);
    }
    m
}

/// Reads every block of `want` through `addr` and returns those older than wanted.
fn missing(addr: &str, export: &str, want: &BTreeMap<u64, u64>) -> Vec<(u64, u64, u64)> {
    let mut c = NbdConn::connect(addr, export, Duration::from_secs(60)).unwrap();
    want.iter()
        .filter_map(|(&b, &v)| {
            let got = version_of(b, &c.read(b * BLOCK, BLOCK as u32).unwrap());
            (got < v).then_some((b, v, got))
        })
        .collect()
}

#[test]
fn a_lost_home_fails_over_stating_its_loss_and_a_site_durable_volume_loses_nothing() {
    let (_dir, mut c) = start(&[("vn", 64 * MIB)], 26000);
    admin(&c, 1)
        .create_volume(
            "vs",
            64 * MIB,
            Some(3),
            Some("osaka"),
            Some(Durability::Site),
        )
        .unwrap();
    wait_until("vs to elect a leader", 60, || {
        volume(&c, 1, "vs")["leader"].as_u64()
    });
    let mut wn = Writer::spawn(nbd(&c, 1), "vn", 512, 0);
    let mut ws = Writer::spawn(nbd(&c, 2), "vs", 512, 0);
    wait_until("both writers to be acknowledged", 60, || {
        (wn.acked().len() > 500 && ws.acked().len() > 100).then_some(())
    });
    // Osaka's links to the other sites hold what it sends: the other sites fall behind
    // while osaka's quorum goes on acknowledging durability=node writes.
    for to in ["hokkaido", "fukuoka"] {
        wan(
            &c,
            "PUT",
            &format!("/v1/links/osaka/{to}"),
            r#"{"partition":"hold"}"#,
        );
    }
    let held = wn.acked().len();
    wait_until("writes acknowledged while the links hold", 60, || {
        (wn.acked().len() > held + 300).then_some(())
    });
    wn.stop(true);
    ws.stop(false);
    // The lag `status` reports just before the loss (the writer stopped) bounds it. Its
    // age is measured by the leader while the request is answered: after `sampled_at`.
    let sampled_at = unix_ms();
    let lag_before = admin(&c, 1).volume("vn").unwrap();
    let reported = |site: &str| {
        lag_before["site_lag"]
            .as_array()
            .and_then(|l| l.iter().find(|s| s["site"] == site).cloned())
            .unwrap_or_else(|| panic!("no {site} lag reported: {lag_before}"))
    };
    let (lag_h, lag_f) = (reported("hokkaido"), reported("fukuoka"));
    for id in [1, 2, 3] {
        c.kill(id).unwrap();
    }
    let killed_at = unix_ms();
    let plan = admin(&c, 4).failover_plan("hokkaido", &[]).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&plan).unwrap());
    let vols = plan["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2, "both volumes of the lost home: {plan}");
    let vn = vols.iter().find(|v| v["name"] == "vn").unwrap();
    let vs = vols.iter().find(|v| v["name"] == "vs").unwrap();
    assert_eq!(vs["lossless"], true, "{vs}");
    assert!(vs["rpo"]["after"].is_null());
    assert_eq!(vn["lossless"], false);
    let after = vn["rpo"]["after_unix_ms"].as_u64().expect("a stated time");
    assert!(vn["rpo"]["after"].as_str().unwrap().ends_with('Z'));
    assert!(after <= killed_at, "the stated time is before the loss");
    assert!(vn["rpo"]["text"].as_str().unwrap().contains("may be lost"));
    // Refused without accepting the loss; then executed.
    let id = plan["plan"].as_str().unwrap();
    let refused = admin(&c, 4).failover_execute(id, false);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("accept-data-loss")),
        "{refused:?}"
    );
    let done = admin(&c, 4).failover_execute(id, true).unwrap();
    assert_eq!(done["volumes"].as_array().unwrap().len(), 2, "{done}");
    for name in ["vn", "vs"] {
        until_serving(&c, 4, name);
    }
    // Every write acknowledged before the stated time reads back at hokkaido and at
    // fukuoka; for the site-durable volume, every acknowledged write.
    let want_n = newest(&wn.acked(), after);
    let want_s = newest(&ws.acked(), u64::MAX);
    for node in [5, 7] {
        let lost = missing(&nbd(&c, node), "vn", &want_n);
        assert!(lost.is_empty(), "vn via node {node}: {lost:?}");
        let lost = missing(&nbd(&c, node), "vs", &want_s);
        assert!(lost.is_empty(), "vs via node {node}: {lost:?}");
    }
    // What vn lost: acknowledged writes whose version no replica kept. The lag reported
    // just before the loss bounds it, in entries and in time.
    let present = {
        let mut conn = NbdConn::connect(&nbd(&c, 5), "vn", Duration::from_secs(60)).unwrap();
        (0..512u64)
            .map(|b| version_of(b, &conn.read(b * BLOCK, BLOCK as u32).unwrap()))
            .collect::<Vec<u64>>()
    };
    let acked = wn.acked();
    let lost: Vec<&Acked> = acked
        .iter()
        .filter(|a| present[a.block as usize] < a.version)
        .collect();
    let lag_entries = lag_h["entries"]
        .as_u64()
        .unwrap()
        .max(lag_f["entries"].as_u64().unwrap());
    let lag_secs = lag_h["seconds"]
        .as_f64()
        .unwrap()
        .max(lag_f["seconds"].as_f64().unwrap());
    let oldest_lost = lost.iter().map(|a| a.at_ms).min();
    eprintln!(
        "vn lost {} acknowledged writes (oldest acknowledged at {oldest_lost:?}, stated time {after}); \
         lag reported before the loss: hokkaido {lag_h}, fukuoka {lag_f}; plan: {}",
        lost.len(),
        vn["rpo"]["text"]
    );
    assert!(
        !lost.is_empty(),
        "the held links made the other sites lag: something is lost"
    );
    assert!(
        lost.len() as u64 <= lag_entries,
        "{} writes lost, more than the {lag_entries} entries reported",
        lost.len()
    );
    assert!(
        oldest_lost.unwrap() as f64 >= sampled_at as f64 - lag_secs * 1000.0 - 1.0,
        "a write lost was older than the reported lag ({lag_secs} s before {sampled_at})"
    );
    let _ = killed_at;
    assert!(
        oldest_lost.unwrap() >= after,
        "a write lost was acknowledged before the stated time"
    );
    // Writes go on at the new home.
    let mut conn = NbdConn::connect(&nbd(&c, 5), "vn", Duration::from_secs(60)).unwrap();
    conn.write(0, &block_data(0, 1 << 40)).unwrap();
    conn.flush().unwrap();
    assert_eq!(version_of(0, &conn.read(0, BLOCK as u32).unwrap()), 1 << 40);
}

#[test]
fn a_cut_off_home_is_fenced_its_divergent_writes_are_kept_and_it_resyncs_incrementally() {
    const VOLUME_MIB: u64 = 64;
    let (dir, c) = start(&[("vm1", VOLUME_MIB * MIB)], 28500);
    // 8 MiB of data everywhere before the cut.
    let mut conn = NbdConn::connect(&nbd(&c, 1), "vm1", Duration::from_secs(60)).unwrap();
    for b in 0..2048 {
        conn.write(b * BLOCK, &block_data(b, 1)).unwrap();
    }
    conn.flush().unwrap();
    drop(conn);
    wait_until("every site caught up", 60, || {
        let v = volume(&c, 1, "vm1");
        v["site_lag"]
            .as_array()?
            .iter()
            .all(|l| l["entries"] == 0)
            .then_some(())
    });
    let mut w = Writer::spawn(nbd(&c, 1), "vm1", 256, 100);
    wait_until("the osaka writer", 30, || {
        (w.acked().len() > 200).then_some(())
    });
    for (a, b) in [
        ("osaka", "hokkaido"),
        ("hokkaido", "osaka"),
        ("osaka", "fukuoka"),
        ("fukuoka", "osaka"),
    ] {
        wan(
            &c,
            "PUT",
            &format!("/v1/links/{a}/{b}"),
            r#"{"partition":"drop"}"#,
        );
    }
    let cut_at = unix_ms();
    // Within its lease osaka may go on; then its leader holds every answer.
    let suspended_at = wait_until("osaka's leader to suspend its answers", 30, || {
        (volume(&c, 1, "vm1")["suspended"] == true).then(unix_ms)
    });
    eprintln!(
        "osaka suspended its answers {} ms after the cut",
        suspended_at - cut_at
    );
    assert!(
        suspended_at < cut_at + 4_000 + 2_000,
        "osaka still answered {} ms after the cut, beyond its 4 s lease",
        suspended_at - cut_at
    );
    let plan = admin(&c, 4).failover_plan("hokkaido", &[]).unwrap();
    assert_eq!(plan["volumes"][0]["name"], "vm1", "{plan}");
    let id = plan["plan"].as_str().unwrap().to_owned();
    let executed_at = unix_ms();
    admin(&c, 4).failover_execute(&id, true).unwrap();
    let v = until_serving(&c, 4, "vm1");
    let serving_after = unix_ms() - executed_at;
    eprintln!("first answer at the new home {serving_after} ms after execute");
    assert!(
        serving_after >= 4_000,
        "the new home waited out the old lease"
    );
    // The new home writes blocks the old one did not.
    let mut conn = NbdConn::connect(&nbd(&c, 5), "vm1", Duration::from_secs(60)).unwrap();
    for b in 1000..1064 {
        conn.write(b * BLOCK, &block_data(b, 1 << 30)).unwrap();
    }
    conn.flush().unwrap();
    drop(conn);
    // Heal: osaka learns of the failover and is fenced.
    wan(&c, "POST", "/v1/heal", "");
    wait_until("osaka's replicas to be fenced", 60, || {
        let v = volume(&c, 4, "vm1");
        (v["divergent"].as_array()?.len() == 3).then_some(())
    });
    let late: Vec<_> = w
        .acked()
        .into_iter()
        .filter(|a| a.at_ms > suspended_at)
        .collect();
    assert!(
        late.is_empty(),
        "osaka acknowledged writes after it suspended (the failover ran at {executed_at}): {late:?}"
    );
    w.stop(false);
    // The divergent tail is kept and reported.
    let d = wait_until("the divergent report", 60, || {
        let d = admin(&c, 4).divergent("vm1").ok()?;
        d["replicas"]
            .as_array()?
            .iter()
            .all(|r| r.get("error").is_none())
            .then_some(d)
    });
    let reps = d["replicas"].as_array().unwrap();
    assert_eq!(reps.len(), 3);
    let writes: u64 = reps
        .iter()
        .map(|r| r["writes"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(writes > 0, "osaka's writes after the divergence point: {d}");
    let image = dir.path().join("divergent.img");
    let a1 = admin(&c, 1);
    a1.divergent_image("vm1", &image).unwrap();
    assert_eq!(std::fs::metadata(&image).unwrap().len(), VOLUME_MIB * MIB);
    // Discard: osaka resyncs the blocks that differ, not the volume.
    let before = c.manifest().wire_bytes_to("osaka");
    admin(&c, 4).discard_divergent("vm1", None).unwrap();
    wait_until("osaka's replicas back as whole learners", 120, || {
        let v = volume(&c, 4, "vm1");
        let learners: Vec<u64> = v["learners"]
            .as_array()?
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        let all_in = [1, 2, 3].iter().all(|n| learners.contains(n));
        let caught_up = [1u64, 2, 3].iter().all(|n| {
            c.manifest().nodes().find(|x| x.id == *n).is_some_and(|x| {
                AdminClient::with_timeout(&x.admin, Duration::from_secs(5))
                    .status()
                    .ok()
                    .and_then(|st| {
                        st["groups"]
                            .as_array()?
                            .iter()
                            .find(|g| g["group"] == v["id"])
                            .map(|g| g["recovering"] == false && g["fenced"] == false)
                    })
                    .unwrap_or(false)
            })
        });
        (all_in && caught_up).then_some(())
    });
    let resync = c.manifest().wire_bytes_to("osaka") - before;
    eprintln!(
        "resync after discard: {resync} bytes on the wire to osaka ({:.1} % of the volume)",
        100.0 * resync as f64 / (VOLUME_MIB * MIB) as f64
    );
    assert!(resync < VOLUME_MIB * MIB / 4, "resync sent {resync} bytes");
    // A move back copies nothing in bulk.
    let before = c.manifest().wire_bytes_to("osaka");
    admin(&c, 4).move_volume("vm1", "osaka").unwrap();
    wait_until("the move back to osaka", 120, || {
        let v = volume(&c, 4, "vm1");
        (v["home_site"] == "osaka" && v["moving"].is_null()).then_some(())
    });
    let moved = c.manifest().wire_bytes_to("osaka") - before;
    eprintln!("move back: {moved} bytes on the wire to osaka");
    assert!(
        moved < VOLUME_MIB * MIB / 8,
        "the move back sent {moved} bytes"
    );
    let _ = v;
    // Every replica agrees.
    let r = AdminClient::with_timeout(
        &c.manifest().nodes().next().unwrap().admin,
        Duration::from_secs(300),
    )
    .verify_volume("vm1", false)
    .unwrap();
    assert_eq!(r["differing_blocks"], 0, "{r}");
}

#[test]
fn a_cut_off_site_durable_volume_suspends_or_degrades_as_its_policy_says() {
    use roamdisk_core::meta::OnNoSite;
    let (_dir, c) = start(&[], 31000);
    let a = admin(&c, 1);
    for (name, policy) in [
        ("vsus", OnNoSite::Suspend),
        ("vdeg", OnNoSite::DegradeAfter { ms: 5000 }),
    ] {
        a.create_volume(
            name,
            16 * MIB,
            Some(3),
            Some("osaka"),
            Some(Durability::Site),
        )
        .unwrap();
        a.set_policy(name, policy).unwrap();
        wait_until(&format!("{name} to elect a leader"), 60, || {
            volume(&c, 1, name)["leader"].as_u64()
        });
    }
    let mut ws = Writer::spawn(nbd(&c, 1), "vsus", 256, 0);
    let mut wd = Writer::spawn(nbd(&c, 1), "vdeg", 256, 0);
    wait_until("both writers", 60, || {
        (ws.acked().len() > 50 && wd.acked().len() > 50).then_some(())
    });
    for (x, y) in [
        ("osaka", "hokkaido"),
        ("hokkaido", "osaka"),
        ("osaka", "fukuoka"),
        ("fukuoka", "osaka"),
    ] {
        wan(
            &c,
            "PUT",
            &format!("/v1/links/{x}/{y}"),
            r#"{"partition":"drop"}"#,
        );
    }
    let cut_at = unix_ms();
    // The degrading volume goes on after its 5 s, reported as degraded.
    wait_until("vdeg to degrade", 30, || {
        (volume(&c, 1, "vdeg")["degraded"] == true).then_some(())
    });
    let resumed = wait_until("vdeg's writer to go on", 30, || {
        wd.acked()
            .iter()
            .find(|x| x.at_ms > cut_at + 5000)
            .map(|x| x.at_ms)
    });
    eprintln!("vdeg went on {} ms after the cut", resumed - cut_at);
    let st = a.status().unwrap();
    let vdeg = st["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vdeg")
        .unwrap()
        .clone();
    assert_eq!(vdeg["degraded"], true, "{vdeg}");
    let rpo = vdeg["site_lag"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["seconds"].as_f64().unwrap())
        .fold(0.0, f64::max);
    eprintln!("vdeg degraded, RPO {rpo:.1} s");
    assert!(rpo > 1.0, "the degraded volume's RPO grows: {vdeg}");
    // The suspending one acknowledged nothing since the cut, and failed nothing.
    let acked_s = ws.acked();
    let late = acked_s.iter().filter(|x| x.at_ms > cut_at + 500).count();
    assert_eq!(
        late, 0,
        "vsus acknowledged {late} writes with no other site"
    );
    assert_eq!(
        ws.errors.load(Ordering::Relaxed),
        0,
        "vsus's writes wait, they do not fail"
    );
    // Healed: vsus resumes, vdeg is site-durable again once a remote replica caught up.
    wan(&c, "POST", "/v1/heal", "");
    let healed_at = unix_ms();
    wait_until("vsus's writer to resume", 60, || {
        ws.acked().iter().any(|x| x.at_ms > healed_at).then_some(())
    });
    wait_until("vdeg to be site-durable again", 60, || {
        (volume(&c, 1, "vdeg")["degraded"] == false).then_some(())
    });
    ws.stop(true);
    wd.stop(true);
    assert_eq!(ws.errors.load(Ordering::Relaxed), 0);
    // Nothing acknowledged is lost: every acknowledged version reads back at hokkaido.
    for (w, name) in [(&ws, "vsus"), (&wd, "vdeg")] {
        let lost = missing(&nbd(&c, 4), name, &newest(&w.acked(), u64::MAX));
        assert!(lost.is_empty(), "{name}: {lost:?}");
    }
}
