//! `roamdisk failover plan|execute` and `roamdisk volume divergent|discard-divergent`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use roamdisk_client::{format_size, AdminClient};
use serde_json::Value;

/// Prints a plan for people.
fn print_plan(p: &Value) {
    println!(
        "failover plan {} to {} (made {}){}",
        p["plan"].as_str().unwrap_or("?"),
        p["to"].as_str().unwrap_or("?"),
        p["made_at"].as_str().unwrap_or("?"),
        if p["loses_data"] == true {
            ": MAY LOSE ACKNOWLEDGED WRITES (execute needs --accept-data-loss)"
        } else {
            ": loses nothing"
        }
    );
    for v in p["volumes"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} from node {} ({}){}, log end {} (term {}), last heard from {} {}",
            v["name"].as_str().unwrap_or("?"),
            v["node"],
            v["site"].as_str().unwrap_or("?"),
            if v["further_ahead"] == true {
                ", further ahead than any replica at the failover's site"
            } else {
                ""
            },
            v["last_index"],
            v["last_term"],
            v["home"].as_str().unwrap_or("?"),
            v["heard_from_home_ms_ago"]
                .as_u64()
                .map_or("never".into(), |ms| format!(
                    "{:.1} s ago",
                    ms as f64 / 1000.0
                )),
        );
        println!("    loss: {}", v["rpo"]["text"].as_str().unwrap_or("?"));
        if v["home_reachable"] == true {
            println!(
                "    warning: home site {} answers: executing fences it (it stops acknowledging once its lease ends)",
                v["home"].as_str().unwrap_or("?")
            );
        }
        if let Some(u) = v["unreachable"].as_array().filter(|u| !u.is_empty()) {
            println!("    replicas that did not answer: {u:?}");
        }
    }
    for r in p["refused"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} cannot fail over: {}",
            r["name"].as_str().unwrap_or("?"),
            r["why"].as_str().unwrap_or("?")
        );
    }
}

pub fn plan(client: &AdminClient, to: &str, volumes: &[String], json: bool) -> Result<()> {
    let long = AdminClient::with_timeout(client.addr(), Duration::from_secs(120));
    let p = long.failover_plan(to, volumes)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print_plan(&p);
    }
    Ok(())
}

/// Executes a plan made on the same node, then shows each volume's progress until it
/// answers at its new home (past the fencing wait) or `timeout`.
pub fn execute(
    client: &AdminClient,
    plan: &str,
    accept_data_loss: bool,
    timeout: Duration,
    json: bool,
) -> Result<()> {
    let long = AdminClient::with_timeout(client.addr(), Duration::from_secs(120));
    let started = Instant::now();
    let r = long.failover_execute(plan, accept_data_loss)?;
    let names: Vec<String> = r["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v.get("error").is_none())
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    if !json {
        for v in r["volumes"].as_array().into_iter().flatten() {
            match v.get("error") {
                Some(e) => println!("  {:<16} refused: {e}", v["name"].as_str().unwrap_or("?")),
                None => println!(
                    "  {:<16} epoch {} from node {}, divergence point generation {} index {}; fenced {}",
                    v["name"].as_str().unwrap_or("?"),
                    v["epoch"],
                    v["node"],
                    v["divergence"]["generation"],
                    v["divergence"]["index"],
                    v["fenced"]
                ),
            }
        }
    }
    let bar = (!json).then(|| {
        let b = indicatif::ProgressBar::new(names.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {pos}/{len} volumes answering at their new home [{elapsed}] {msg}",
            )
            .expect("valid template"),
        );
        b
    });
    let deadline = Instant::now() + timeout;
    let mut serving: Vec<(String, f64)> = Vec::new();
    while serving.len() < names.len() {
        for n in &names {
            if serving.iter().any(|(s, _)| s == n) {
                continue;
            }
            let Ok(v) = client.volume(n) else { continue };
            if v["leader"].is_u64() && v["suspended"] == false {
                serving.push((n.clone(), started.elapsed().as_secs_f64()));
            } else if let Some(b) = &bar {
                b.set_message(format!(
                    "{n}: {}",
                    if v["leader"].is_u64() {
                        "fencing wait (the old home's lease)"
                    } else {
                        "electing"
                    }
                ));
            }
        }
        if let Some(b) = &bar {
            b.set_position(serving.len() as u64);
        }
        if serving.len() == names.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "not every volume answers at its new home after {timeout:?} (answering: {serving:?}); the failover goes on: see `roamdisk status`"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if json {
        let mut out = r.clone();
        out["answering_after_secs"] = serde_json::json!(serving
            .iter()
            .map(|(n, s)| (n.clone(), *s))
            .collect::<std::collections::BTreeMap<_, _>>());
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (n, s) in &serving {
            println!("  {n:<16} answers at its new home {s:.1} s after execute (its voters are placed there by the mover; `roamdisk volume show {n}`)");
        }
    }
    Ok(())
}

/// `volume divergent NAME [--out FILE] [--node N]`.
pub fn divergent(
    client: &AdminClient,
    name: &str,
    out: Option<&Path>,
    node: Option<u64>,
    json: bool,
) -> Result<()> {
    let r = client.divergent(name)?;
    let replicas: Vec<&Value> = r["replicas"].as_array().into_iter().flatten().collect();
    if let Some(path) = out {
        let pick = replicas
            .iter()
            .find(|x| node.is_none_or(|n| x["node"].as_u64() == Some(n)))
            .with_context(|| {
                format!(
                    "volume {name} has no divergent replica{}",
                    node.map(|n| format!(" on node {n}")).unwrap_or_default()
                )
            })?;
        let admin = pick["admin"]
            .as_str()
            .context("the fenced node's admin address")?;
        let at = AdminClient::with_timeout(admin, Duration::from_secs(3600));
        let data = at.divergent_image(name, path)?;
        if !json {
            println!(
                "wrote node {}'s fenced replica of {name} to {} ({} of data; a raw image of its content at fencing time)",
                pick["node"],
                path.display(),
                format_size(data)
            );
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    if replicas.is_empty() {
        println!("volume {name}: no divergent replica");
    }
    for x in replicas {
        match x.get("error") {
            Some(e) => println!("  node {} ({}): {e}", x["node"], x["site"].as_str().unwrap_or("?")),
            None => println!(
                "  node {} ({}): {} writes in {} entries after index {}, {} blocks, {}, from {} to {}{}",
                x["node"],
                x["site"].as_str().unwrap_or("?"),
                x["writes"],
                x["entries"],
                x["from_index"],
                x["blocks"],
                format_size(x["bytes"].as_u64().unwrap_or(0)),
                x["first_at"].as_str().unwrap_or("-"),
                x["last_at"].as_str().unwrap_or("-"),
                if x["complete"] == true {
                    ""
                } else {
                    " (at least: its log no longer holds the first of them; its data does)"
                }
            ),
        }
    }
    Ok(())
}

pub fn discard(client: &AdminClient, name: &str, node: Option<u64>, json: bool) -> Result<()> {
    let v = client.discard_divergent(name, node)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "volume {name}: divergent writes discarded{}; the replicas resync the blocks that differ as learners (still divergent: {})",
            node.map(|n| format!(" on node {n}")).unwrap_or_default(),
            v["divergent"]
        );
    }
    Ok(())
}
