//! Helpers for integration tests that run the real `roamdisk-nbd` binary against real
//! third-party clients. A missing client is a test failure with a hint, never a skip:
//! `.ci/run` installs them all.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// A running `roamdisk-nbd`, killed on drop.
pub struct NbdServer {
    child: Child,
    pub addr: String,
    pub name: String,
    pub file: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl NbdServer {
    /// Serves a new sparse file of `size` bytes as export `vm1`.
    pub fn sparse(size: u64) -> NbdServer {
        let dir = tempfile::tempdir().expect("create temp dir");
        let file = dir.path().join("disk.img");
        let mut s = NbdServer::start(&file, &["--size", &size.to_string()]);
        s._dir = Some(dir);
        s
    }

    /// Serves an existing file.
    pub fn start(file: &Path, extra: &[&str]) -> NbdServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_roamdisk-nbd"))
            .arg("--file")
            .arg(file)
            .args(["--name", "vm1", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn roamdisk-nbd");
        // The server prints its URI once it is listening: that line is the readiness signal.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read server banner");
        let uri = line
            .trim()
            .rsplit(' ')
            .next()
            .expect("banner ends with the URI")
            .to_owned();
        let addr = uri
            .trim_start_matches("nbd://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        assert!(addr.contains(':'), "unexpected banner {line:?}");
        NbdServer {
            child,
            addr,
            name: "vm1".into(),
            file: file.to_owned(),
            _dir: None,
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd://{}/{}", self.addr, self.name)
    }

    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// True while the server process is alive.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("wait on server").is_none()
    }

    /// Sends SIGTERM and waits; returns the exit status code.
    pub fn terminate(mut self) -> Option<i32> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait for server").code()
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is not installed: run .ci/run (it installs the test clients)"
    );
    Command::new(name)
}

/// Runs `cmd`, asserts success, returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out: Output = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// qemu-io against the export with a list of commands; asserts that none failed.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run(&mut c);
    // qemu-io exits 0 even when a command fails; it prints the failure instead.
    for bad in ["Pattern verification failed", "failed:", "error", "Error"] {
        assert!(!out.contains(bad), "qemu-io reported {bad:?}:\n{out}");
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
