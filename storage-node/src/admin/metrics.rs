//! `/metrics`: the node's counters and gauges (Raft indexes, replica lag, links, dedup,
//! verify, the store thread's work) in the Prometheus text format.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use roamdisk_core::ids::NodeId;

use crate::node::Node;

pub(super) async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    use std::fmt::Write;
    let groups = node.status().await;
    let cluster = node.cluster();
    let mut out = String::new();
    for (name, help, v) in [
        (
            "roamdisk_verify_runs_total",
            "Verify runs (replicas compared by digest) started on this node.",
            &node.verify_counts.runs,
        ),
        (
            "roamdisk_verify_differing_blocks_total",
            "Blocks a verify found differing between replicas (alert on any increase).",
            &node.verify_counts.differing_blocks,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(
            out,
            "{name}{{node=\"{}\"}} {}",
            node.me,
            v.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP roamdisk_raft_commit_index Commit index of each Raft group on this node."
    );
    let _ = writeln!(out, "# TYPE roamdisk_raft_commit_index gauge");
    for g in &groups {
        let _ = writeln!(
            out,
            "roamdisk_raft_commit_index{{node=\"{}\",group=\"{}\"}} {}",
            node.me, g.group, g.commit
        );
    }
    let _ = writeln!(
        out,
        "# HELP roamdisk_raft_applied_index Applied index of each Raft group on this node."
    );
    let _ = writeln!(out, "# TYPE roamdisk_raft_applied_index gauge");
    for g in &groups {
        let _ = writeln!(
            out,
            "roamdisk_raft_applied_index{{node=\"{}\",group=\"{}\"}} {}",
            node.me, g.group, g.applied
        );
    }
    let _ = writeln!(
        out,
        "# HELP roamdisk_raft_is_leader 1 if this node leads the group."
    );
    let _ = writeln!(out, "# TYPE roamdisk_raft_is_leader gauge");
    for g in &groups {
        let _ = writeln!(
            out,
            "roamdisk_raft_is_leader{{node=\"{}\",group=\"{}\"}} {}",
            node.me,
            g.group,
            u8::from(g.is_leader())
        );
    }
    // What a volume's leader holds back: answers without a lease or within a failover's
    // fencing wait (suspended), and a site-durable volume committing alone (degraded).
    for (name, help, get) in [
        (
            "roamdisk_volume_suspended",
            "1 if the group's leader here holds its answers (no lease from the metadata quorum, or a failover's fencing wait).",
            (|g: &crate::store::GroupStatus| g.suspended) as fn(&crate::store::GroupStatus) -> bool,
        ),
        (
            "roamdisk_volume_degraded",
            "1 if this site-durable volume commits on its home quorum alone (degrade-after): its RPO is the remote sites' lag.",
            |g| g.degraded,
        ),
        (
            "roamdisk_volume_fenced",
            "1 if a failover fenced this node's replica (it keeps its divergent writes).",
            |g| g.fenced,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for g in groups.iter().filter(|g| g.group != 0 && (g.is_leader() || g.fenced)) {
            let volume = cluster
                .volume_by_id(roamdisk_core::ids::VolumeId(g.group))
                .map_or("", |v| v.name.as_str());
            let _ = writeln!(
                out,
                "{name}{{node=\"{}\",group=\"{}\",volume=\"{volume}\"}} {}",
                node.me,
                g.group,
                u8::from(get(g))
            );
        }
    }
    // Lag of every replica of the groups this node leads (the leader is the only node
    // that knows it; scraping every node covers every volume).
    let lag_metrics: [(&str, &str, fn(&crate::lag::Lag) -> f64); 4] = [
        (
            "roamdisk_replica_lag_entries",
            "Log entries a replica lacks.",
            |l| l.entries as f64,
        ),
        (
            "roamdisk_replica_lag_bytes",
            "Bytes of log entries a replica lacks.",
            |l| l.bytes as f64,
        ),
        (
            "roamdisk_replica_lag_seconds",
            "Age of the oldest entry a replica lacks (RPO).",
            |l| l.seconds,
        ),
        (
            "roamdisk_replica_drain_bytes_per_second",
            "Rate at which a replica has recently caught up.",
            |l| l.drain_bytes_per_sec,
        ),
    ];
    for (name, help, get) in lag_metrics {
        let _ = writeln!(out, "# HELP {name} {help} Reported by the group's leader.");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for g in &groups {
            let volume = cluster
                .volume_by_id(roamdisk_core::ids::VolumeId(g.group))
                .map_or("", |v| v.name.as_str());
            for p in &g.progress {
                let site = cluster
                    .nodes
                    .get(&NodeId(p.node))
                    .map_or("", |i| i.site.as_str());
                let _ = writeln!(
                    out,
                    "{name}{{group=\"{}\",volume=\"{volume}\",replica=\"{}\",site=\"{site}\"}} {}",
                    g.group,
                    p.node,
                    get(&p.lag)
                );
            }
        }
    }
    let links = node.links();
    for (name, help, wire) in [
        (
            "roamdisk_link_logical_bytes_total",
            "Bytes of frames sent to another site, before compression, per lane.",
            false,
        ),
        (
            "roamdisk_link_wire_bytes_total",
            "Bytes sent to another site on the wire, after compression, per lane.",
            true,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for l in &links {
            for lane in &l.lanes {
                let v = if wire {
                    lane.wire_bytes
                } else {
                    lane.logical_bytes
                };
                let _ = writeln!(
                    out,
                    "{name}{{node=\"{}\",site=\"{}\",lane=\"{}\"}} {v}",
                    node.me,
                    l.site,
                    lane.lane.name()
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP roamdisk_link_paced_seconds_total Time writers waited for a link's cap."
    );
    let _ = writeln!(out, "# TYPE roamdisk_link_paced_seconds_total counter");
    for l in &links {
        let _ = writeln!(
            out,
            "roamdisk_link_paced_seconds_total{{node=\"{}\",site=\"{}\"}} {}",
            node.me, l.site, l.paced_secs
        );
    }
    let d = node.dedup_counts();
    let _ = writeln!(
        out,
        "# HELP roamdisk_dedup_indexed_blocks Blocks this node can name by content."
    );
    let _ = writeln!(out, "# TYPE roamdisk_dedup_indexed_blocks gauge");
    let _ = writeln!(
        out,
        "roamdisk_dedup_indexed_blocks{{node=\"{}\"}} {}",
        node.me, d.indexed_blocks
    );
    for (name, help, v) in [
        (
            "roamdisk_dedup_refs_sent_total",
            "Blocks sent to another site as a reference to content it stores.",
            d.refs_sent,
        ),
        (
            "roamdisk_dedup_resolved_local_total",
            "Received references resolved from this node's replicas.",
            d.resolved_local,
        ),
        (
            "roamdisk_dedup_resolved_site_total",
            "Received references resolved from another node of this site.",
            d.resolved_site,
        ),
        (
            "roamdisk_dedup_missed_total",
            "Received references this site could not resolve (resent as data).",
            d.missed,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name}{{node=\"{}\"}} {v}", node.me);
    }
    node.store_stats().render(&mut out, node.me.0);
    let _ = writeln!(out, "# HELP roamdisk_volumes Volumes in the cluster.");
    let _ = writeln!(out, "# TYPE roamdisk_volumes gauge");
    let _ = writeln!(out, "roamdisk_volumes {}", cluster.volumes.len());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
}
