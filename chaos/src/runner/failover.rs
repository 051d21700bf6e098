//! The site-loss and split-brain faults: a forced failover of the volume, as an operator
//! would run it (plan, execute with the loss accepted), recorded with what the plan
//! stated and what the new home held (`FailoverEvent`), then the old home back, fenced,
//! its divergent writes reported and discarded, and a move back home.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use roamdisk_admin_client::AdminClient;
use roamdisk_wan::Partition;
use serde_json::Value;

use super::{sleep_until, us, Ctx, COLD_BLOCKS, MOVE_TIMEOUT, VOLUME};
use crate::history::{Event, FailoverEvent};
use crate::workload::Nodes;

/// How long a failover may take from `execute` to the new home's first answer.
const SERVING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the old home may take to be fenced, and its replicas to resync, once back.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(120);

impl Ctx {
    /// An admin client on a running node of `site`.
    fn admin_at(&mut self, site: &str) -> Option<AdminClient> {
        let m = self.cluster.manifest().clone();
        let node = m
            .nodes()
            .filter(|n| self.site_of[&n.id] == site)
            .find(|n| self.cluster.is_running(n.id))
            .map(|n| n.admin.clone());
        node.map(|a| AdminClient::with_timeout(&a, Duration::from_secs(30)))
    }

    /// The home site is lost (`cut`: cut off; else killed): fail over, hold, bring the
    /// old home back, discard its divergent writes and move back.
    pub(super) fn site_loss(
        &mut self,
        cut: bool,
        rng: &mut fastrand::Rng,
        hold: Duration,
        nodes: &Nodes,
        say: &dyn Fn(String),
    ) -> Result<String> {
        let lost = self.home.clone();
        let old_home_nodes: Vec<u64> = self
            .site_of
            .iter()
            .filter(|(_, s)| **s == lost)
            .map(|(id, _)| *id)
            .collect();
        let others = self.other_sites();
        let to = others
            .get(rng.usize(..others.len().max(1)))
            .context("another site")?
            .clone();
        let wan = self.wan.clone();
        if cut {
            let wan = wan.as_ref().context("no WAN")?;
            for other in &others {
                wan.partition(&lost, other, Partition::Drop)?;
                wan.partition(other, &lost, Partition::Drop)?;
            }
        } else {
            for id in &old_home_nodes {
                self.kill(*id)?;
            }
        }
        let lost_us = us(self.t0);
        let admin = self
            .admin_at(&to)
            .context("no node answers at the failover's site")?;
        let epoch_before = admin.volume(VOLUME)?["epoch"].as_u64().unwrap_or(0);
        let plan = admin.failover_plan(&to, &[VOLUME.to_owned()])?;
        let vp = plan["volumes"]
            .as_array()
            .and_then(|v| v.first())
            .cloned()
            .with_context(|| format!("the plan has no volume: {plan}"))?;
        say(format!(
            "failover plan {}: from node {} ({}), {}",
            plan["plan"].as_str().unwrap_or("?"),
            vp["node"],
            vp["site"].as_str().unwrap_or("?"),
            vp["rpo"]["text"].as_str().unwrap_or("?")
        ));
        let lossless = vp["lossless"] == true;
        let after_us = vp["rpo"]["after_unix_ms"]
            .as_u64()
            .map(|ms| (ms * 1000).saturating_sub(self.t0_unix_us));
        let source_site = vp["site"].as_str().unwrap_or_default().to_owned();
        admin.failover_execute(plan["plan"].as_str().context("plan id")?, true)?;
        let executed_us = us(self.t0);
        let deadline = Instant::now() + SERVING_TIMEOUT;
        loop {
            let v = admin.volume(VOLUME).ok();
            if v.as_ref().is_some_and(|v| {
                v["leader"].is_u64()
                    && v["suspended"] == false
                    && v["epoch"].as_u64().unwrap_or(0) > epoch_before
            }) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the new home did not answer {SERVING_TIMEOUT:?} after execute");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let serving_us = us(self.t0);
        // What the new home holds, before the workload writes there.
        let present = self.read_versions(&to)?;
        *nodes.write().expect("nodes lock") = self.site_nodes(&to);
        self.home = to.clone();
        let mut event = FailoverEvent {
            vol: 0,
            from: lost.clone(),
            old_home_nodes: old_home_nodes.clone(),
            lost_us,
            to: to.clone(),
            source_site,
            executed_us,
            serving_us,
            rejoined_us: None,
            lossless,
            after_us,
            present,
        };
        say(format!(
            "failed over to {to}: answering {} ms after execute",
            (serving_us - executed_us) / 1000
        ));
        // The event is recorded whatever happens next: the checker needs it.
        let r = self.rejoin(cut, &lost, &to, hold, nodes, say, &mut event);
        self.events.push(Event::Failover(event));
        let writes = r?;
        Ok(format!(
            "{lost} {}; failed over to {to}, {writes} divergent writes discarded, moved back",
            if cut { "cut off" } else { "killed" }
        ))
    }

    /// After a failover to `to`: holds, brings the old home `lost` back, waits until it
    /// is fenced, discards its divergent writes, and moves the volume back; returns the
    /// divergent writes the fenced replicas reported.
    #[allow(clippy::too_many_arguments)]
    fn rejoin(
        &mut self,
        cut: bool,
        lost: &str,
        to: &str,
        hold: Duration,
        nodes: &Nodes,
        say: &dyn Fn(String),
        event: &mut FailoverEvent,
    ) -> Result<u64> {
        let wan = self.wan.clone();
        sleep_until(Instant::now() + hold);
        // The old home comes back and learns it was fenced.
        if cut {
            wan.as_ref().context("no WAN")?.heal()?;
        } else {
            self.restart_down()?;
        }
        let deadline = Instant::now() + REJOIN_TIMEOUT;
        let report = loop {
            let r = self.admin_at(&to).and_then(|a| a.divergent(VOLUME).ok());
            if let Some(r) = r.filter(|r| {
                r["replicas"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty() && a.iter().all(|x| x.get("error").is_none()))
            }) {
                break r;
            }
            if Instant::now() > deadline {
                bail!("the old home's replicas were not fenced within {REJOIN_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let writes: u64 = report["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x["writes"].as_u64())
            .max()
            .unwrap_or(0);
        // Compaction may have dropped the first divergent entries before the fencing:
        // the count is then a lower bound (the resync compares blocks, not entries).
        let complete = report["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|x| x["complete"] != false);
        let at_least = if complete { "" } else { "at least " };
        say(format!(
            "{lost} fenced; its divergent writes: {at_least}{writes} (kept until discarded)"
        ));
        let admin = self.admin_at(&to).context("no node answers")?;
        admin.discard_divergent(VOLUME, None)?;
        // The failover's own placement, then the move back home (failback).
        self.wait_settled(REJOIN_TIMEOUT)?;
        *nodes.write().expect("nodes lock") = self.site_nodes(&lost);
        event.rejoined_us = Some(us(self.t0));
        self.admin()
            .context("no node answers")?
            .move_volume(VOLUME, &lost)
            .context("move back home")?;
        let deadline = Instant::now() + MOVE_TIMEOUT;
        loop {
            if let Some(v) = self.volume() {
                if v["home_site"].as_str() == Some(&lost) && v["moving"].is_null() {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("the move back to {lost} did not finish");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.home = lost.to_owned();
        Ok(writes)
    }

    /// Waits until the volume has no move in flight and no divergent replica, and every
    /// replica has its blocks whole.
    fn wait_settled(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.volume() {
                let placed: Vec<u64> = ["voters", "learners"]
                    .iter()
                    .flat_map(|k| v[*k].as_array().cloned().unwrap_or_default())
                    .filter_map(|x| x.as_u64())
                    .collect();
                let whole = placed.iter().all(|id| self.replica_whole(*id, &v));
                if v["moving"].is_null()
                    && v["divergent"].as_array().is_some_and(|d| d.is_empty())
                    && whole
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the volume did not settle within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Whether node `id`'s replica of the volume is whole (not copying blocks, not fenced).
    fn replica_whole(&mut self, id: u64, v: &Value) -> bool {
        let Some(n) = self
            .cluster
            .manifest()
            .nodes()
            .find(|n| n.id == id)
            .cloned()
        else {
            return false;
        };
        let Ok(st) = AdminClient::with_timeout(&n.admin, Duration::from_secs(5)).status() else {
            return false;
        };
        st["groups"].as_array().is_some_and(|gs| {
            gs.iter()
                .any(|g| g["group"] == v["id"] && g["recovering"] == false && g["fenced"] == false)
        })
    }

    /// The version of every block of the workload, read through a node of `site`.
    fn read_versions(&mut self, site: &str) -> Result<Vec<(u64, u64)>> {
        let (_, addr) = self
            .site_nodes(site)
            .into_iter()
            .find(|(id, _)| self.cluster.is_running(*id))
            .context("no node at the new home")?;
        let mut conn = crate::nbd::NbdConn::connect(&addr, VOLUME, Duration::from_secs(60))?;
        let tag = crate::block::volume_tag(VOLUME);
        let mut out = Vec::new();
        for block in 0..self.blocks + COLD_BLOCKS {
            let data = conn.read(
                block * crate::block::BLOCK_SIZE as u64,
                crate::block::BLOCK_SIZE as u32,
            )?;
            let version = match crate::block::decode(&data, tag, block, self.seed) {
                crate::history::Seen::Version { version } => version,
                _ => 0,
            };
            out.push((block, version));
        }
        Ok(out)
    }
}
