//! `roamdisk`: the admin CLI.
//!
//! ```text
//! roamdisk [--cluster HOST:PORT] [--json] status
//! roamdisk node list
//! roamdisk volume create NAME --size 10G [--replicas 3] [--home SITE] [--durability node|site]
//! roamdisk volume list | show NAME | resize NAME --size SIZE | delete NAME
//! roamdisk volume move NAME --to SITE [--wait]
//! roamdisk group create NAME --volumes a:10G,b:20G [--replicas 3] [--home SITE] [--durability node|site]
//! roamdisk group show NAME | add NAME --volume c:5G
//! roamdisk failover plan --to SITE [--volume NAME]... [--group NAME]... | execute PLAN [--accept-data-loss]
//! roamdisk playground [--dir DIR] [--sites a,b,c] [--nodes-per-site N] [--volume NAME:SIZE]
//!                     [--base-port P] [--wan lan|sinet5|wide-2010]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use roamdisk_client::{parse_size, playground, AdminClient};

mod failover;
mod group;
mod volume;

use volume::{print_site_lag, volume_line, VolumeCmd};

#[derive(Parser, Debug)]
#[command(
    name = "roamdisk",
    version,
    about = "roamdisk: geo-distributed replicated block storage"
)]
struct Cli {
    /// Admin address of any node (host:port). Default: $ROAMDISK_CLUSTER, else the
    /// playground's first node.
    #[arg(long, global = true)]
    cluster: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Cluster status: nodes, metadata leader, volumes and their leaders.
    Status,
    /// Nodes.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Volumes.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Consistency groups: volumes that share one log, so that they move and fail over
    /// together to one crash-consistent cut.
    Group {
        #[command(subcommand)]
        cmd: group::GroupCmd,
    },
    /// Forced failover of volumes whose home site is lost: a read-only plan that states
    /// the loss, then its execution.
    Failover {
        #[command(subcommand)]
        cmd: FailoverCmd,
    },
    /// Run a local cluster of real node processes until Ctrl-C.
    Playground {
        /// Where nodes keep their data; rerunning on the same DIR restarts that cluster.
        #[arg(long, default_value = "roamdisk-playground")]
        dir: PathBuf,
        /// Comma-separated site names.
        #[arg(long, value_delimiter = ',', default_value = "osaka,hokkaido,fukuoka")]
        sites: Vec<String>,
        #[arg(long, default_value_t = 3)]
        nodes_per_site: usize,
        /// NAME:SIZE of a volume to create (repeatable).
        #[arg(long = "volume", default_value = "vm1:1G")]
        volumes: Vec<String>,
        /// First port: NBD on base.., admin on base+100.., peers on base+200.., WAN
        /// control API on base+300, WAN routes on base+400..
        #[arg(long, default_value_t = 10809)]
        base_port: u16,
        /// WAN profile between sites (lan, sinet5, wide-2010), emulated in userspace.
        #[arg(long, default_value = "sinet5", value_parser = parse_wan)]
        wan: roamdisk_wan::WanProfile,
        /// roamdisk-node binary (default: next to this one).
        #[arg(long)]
        node_bin: Option<PathBuf>,
    },
    /// Chaos drills: `roamdisk chaos list | run | soak | check` (runs `roamdisk-chaos`,
    /// installed next to this binary; `roamdisk chaos --help` lists its options).
    #[command(disable_help_flag = true)]
    Chaos {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum FailoverCmd {
    /// What a failover to SITE would do and lose (changes nothing). Default: every
    /// volume whose home site does not answer.
    Plan {
        #[arg(long)]
        to: String,
        /// A volume to fail over (repeatable).
        #[arg(long = "volume")]
        volumes: Vec<String>,
        /// A consistency group to fail over, all its volumes to one cut (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// Execute a plan made on the same node (`--cluster`): refused if anything moved
    /// since, or if it may lose acknowledged writes without --accept-data-loss.
    Execute {
        plan: String,
        #[arg(long)]
        accept_data_loss: bool,
        /// Give up waiting for the volumes to answer at their new home after this long.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// List nodes with their sites and addresses.
    List,
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn parse_wan(s: &str) -> Result<roamdisk_wan::WanProfile, String> {
    s.parse::<roamdisk_wan::WanProfile>()
        .map_err(|e| e.to_string())
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let cluster = cli
        .cluster
        .clone()
        .or_else(|| std::env::var("ROAMDISK_CLUSTER").ok())
        .unwrap_or_else(|| "127.0.0.1:10909".into());
    let client = AdminClient::new(&cluster);
    match cli.cmd {
        Cmd::Status => {
            let st = client.status()?;
            if cli.json {
                return print_json(&st);
            }
            println!(
                "node {} (site {}); metadata leader: {}",
                st["node"],
                st["site"].as_str().unwrap_or("?"),
                st["meta_leader"]
            );
            println!("{} nodes in sites {}", st["nodes"], st["sites"]);
            for v in st["volumes"].as_array().into_iter().flatten() {
                println!("  {}", volume_line(v));
                group::print_members(v, "    ");
                print_site_lag(v, "    ");
            }
        }
        Cmd::Node { cmd: NodeCmd::List } => {
            let nodes = client.nodes()?;
            if cli.json {
                return print_json(&nodes);
            }
            println!(
                "{:<4} {:<12} {:<22} {:<22} {:<22}",
                "ID", "SITE", "NBD", "ADMIN", "PEER"
            );
            for n in nodes {
                println!(
                    "{:<4} {:<12} {:<22} {:<22} {:<22}",
                    n.id.0, n.site, n.nbd_addr, n.admin_addr, n.peer_addr
                );
            }
        }
        Cmd::Volume { cmd } => volume::run(&client, cmd, cli.json)?,
        Cmd::Group { cmd } => group::run(&client, cmd, cli.json)?,
        Cmd::Failover { cmd } => match cmd {
            FailoverCmd::Plan {
                to,
                mut volumes,
                groups,
            } => {
                for g in groups {
                    // A group fails over by its name; check it is one.
                    client.group(&g)?;
                    volumes.push(g);
                }
                failover::plan(&client, &to, &volumes, cli.json)?
            }
            FailoverCmd::Execute {
                plan,
                accept_data_loss,
                timeout_secs,
            } => failover::execute(
                &client,
                &plan,
                accept_data_loss,
                Duration::from_secs(timeout_secs),
                cli.json,
            )?,
        },
        Cmd::Chaos { args } => {
            let bin = std::env::current_exe()?.with_file_name("roamdisk-chaos");
            let status = std::process::Command::new(&bin)
                .args(&args)
                .status()
                .with_context(|| {
                    format!(
                        "run {} (build it with `cargo build --release --bins`)",
                        bin.display()
                    )
                })?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Playground {
            dir,
            sites,
            nodes_per_site,
            volumes,
            base_port,
            wan,
            node_bin,
        } => {
            let volumes = volumes
                .iter()
                .map(|s| {
                    let (n, sz) = s
                        .split_once(':')
                        .with_context(|| format!("--volume {s:?}: expected NAME:SIZE"))?;
                    Ok((n.to_owned(), parse_size(sz).map_err(anyhow::Error::msg)?))
                })
                .collect::<Result<Vec<_>>>()?;
            let node_bin = match node_bin {
                Some(p) => p,
                None => std::env::current_exe()?.with_file_name("roamdisk-node"),
            };
            playground::run(&playground::Options {
                dir,
                sites,
                nodes_per_site,
                volumes,
                base_port,
                node_bin,
                wan,
                node_env: vec![],
            })?;
        }
    }
    Ok(())
}
