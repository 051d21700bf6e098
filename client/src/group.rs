//! `roamdisk group create|show|add`: consistency groups. A group is one Raft group whose
//! address space holds its volumes one after another (see
//! `docs/decisions/032-consistency-groups.md`): one log, so any replica's state is one
//! cut across all of them, and the group moves, fails over and lags as one.

use anyhow::{Context, Result};
use clap::Subcommand;
use roamdisk_client::{format_size, parse_size, AdminClient};
use serde_json::Value;

use crate::print_json;
use crate::volume::{print_site_lag, volume_line, DurabilityArg, Placement};

#[derive(Subcommand, Debug)]
pub enum GroupCmd {
    /// Create a consistency group of new volumes (NAME:SIZE each), placed, replicated
    /// and moved as one.
    Create {
        name: String,
        /// The group's volumes, NAME:SIZE, comma-separated (`a:10G,b:20G`).
        #[arg(long, value_delimiter = ',', required = true)]
        volumes: Vec<String>,
        #[command(flatten)]
        placement: Placement,
    },
    /// A group: its volumes, placement, leader and its one lag per site.
    Show { name: String },
    /// Add a new, empty volume to a group (the same as `volume create NAME --size SIZE
    /// --group GROUP`).
    Add {
        group: String,
        /// NAME:SIZE of the new volume.
        #[arg(long)]
        volume: String,
    },
}

fn name_size(s: &str) -> Result<(String, u64)> {
    let (n, sz) = s
        .split_once(':')
        .with_context(|| format!("{s:?}: expected NAME:SIZE (a:10G)"))?;
    Ok((n.to_owned(), parse_size(sz).map_err(anyhow::Error::msg)?))
}

/// The volumes of a group, one line each (nothing for a plain volume).
pub fn print_members(v: &Value, indent: &str) {
    let Some(members) = v["members"].as_array().filter(|m| !m.is_empty()) else {
        return;
    };
    let names: Vec<String> = members
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            m => format!(
                "{} ({} at {})",
                m["name"].as_str().unwrap_or("?"),
                format_size(m["size"].as_u64().unwrap_or(0)),
                format_size(m["offset"].as_u64().unwrap_or(0))
            ),
        })
        .collect();
    println!("{indent}consistency group of {}", names.join(", "));
}

pub fn run(client: &AdminClient, cmd: GroupCmd, json: bool) -> Result<()> {
    match cmd {
        GroupCmd::Create {
            name,
            volumes,
            placement: p,
        } => {
            let vols = volumes
                .iter()
                .map(|s| name_size(s))
                .collect::<Result<Vec<_>>>()?;
            let g = client.create_group(
                &name,
                &vols,
                p.replicas,
                p.home.as_deref(),
                p.durability.map(DurabilityArg::durability),
                p.on_no_site,
            )?;
            if json {
                return print_json(&g);
            }
            println!("created group {}", volume_line(&g));
            print_members(&g, "  ");
        }
        GroupCmd::Show { name } => {
            let g = client.group(&name)?;
            if json {
                return print_json(&g);
            }
            println!("group {}", volume_line(&g));
            print_members(&g, "  ");
            println!(
                "  voters {}  learners {}  durability {}",
                g["voters"], g["learners"], g["durability"]
            );
            // One log: one lag for all of the group's volumes.
            print_site_lag(&g, "  ");
            for e in g["exports"].as_array().into_iter().flatten() {
                println!("  {}", e.as_str().unwrap_or("?"));
            }
        }
        GroupCmd::Add { group, volume } => {
            let (n, size) = name_size(&volume)?;
            let g = client.add_to_group(&group, &n, size)?;
            if json {
                return print_json(&g);
            }
            println!(
                "added {n} ({}) to group {}",
                format_size(size),
                volume_line(&g)
            );
            print_members(&g, "  ");
        }
    }
    Ok(())
}
