//! Helpers shared by the playground integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use roamdisk_client::playground::{Manifest, PlaygroundNode};
use roamdisk_client::AdminClient;
use serde_json::Value;

/// A running `roamdisk playground`; dropping it stops every node (SIGINT, as Ctrl-C).
pub struct Playground(Child);

impl Playground {
    /// Starts `roamdisk playground --dir DIR ARGS..` and waits until it is ready.
    pub fn start(dir: &Path, args: &[&str]) -> (Playground, Manifest) {
        let child = Command::new(env!("CARGO_BIN_EXE_roamdisk"))
            .args(["playground", "--dir"])
            .arg(dir)
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pg = Playground(child);
        wait_until("the playground", 90, || {
            dir.join("playground.json").exists().then_some(())
        });
        (pg, Manifest::load(dir).unwrap())
    }
}

impl Drop for Playground {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// Polls `f` every 100 ms until it gives a value; fails the test after `secs`.
pub fn wait_until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Bytes `nodes` sent to `site` on the log and bulk lanes, before compression.
pub fn logical_to<'a>(nodes: impl IntoIterator<Item = &'a PlaygroundNode>, site: &str) -> u64 {
    let mut total = 0;
    for n in nodes {
        let status = AdminClient::new(&n.admin).status().unwrap();
        for link in status["links"].as_array().unwrap() {
            if link["site"] != site {
                continue;
            }
            for lane in link["lanes"].as_array().unwrap() {
                if lane["lane"] != "control" {
                    total += lane["logical_bytes"].as_u64().unwrap();
                }
            }
        }
    }
    total
}

/// The status of group `id` on the node behind `admin`.
pub fn group(admin: &AdminClient, id: u64) -> Option<Value> {
    admin.status().ok()?["groups"]
        .as_array()?
        .iter()
        .find(|g| g["group"].as_u64() == Some(id))
        .cloned()
}
