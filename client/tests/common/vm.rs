//! The test VM (`.ci/fetch-vm`): QEMU with TCG, a Debian kernel and the guest of
//! `.ci/vm/guest.c`; its console and QMP. Shared by `vm_migration.rs` and
//! `vm_restart.rs`.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Deadlines (generous: the guest is emulated, on 2 cores shared with 6 nodes).
pub const BOOT: Duration = Duration::from_secs(240);
pub const STEP: Duration = Duration::from_secs(180);

pub struct VmFiles {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The files `.ci/fetch-vm` prepares, or `None` (after saying why) to skip.
pub fn vm_files() -> Option<VmFiles> {
    let dir = std::env::var_os("ROAMDISK_VM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/roamdisk-vm")
        });
    let files = VmFiles {
        qemu: dir.join("bin/qemu-system-x86_64"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
    };
    let missing: Vec<&Path> = [&files.qemu, &files.kernel, &files.initrd]
        .into_iter()
        .map(PathBuf::as_path)
        .filter(|p| !p.exists())
        .collect();
    if missing.is_empty() {
        return Some(files);
    }
    let why = format!(
        "the VM files are missing ({missing:?}); run `bash .ci/fetch-vm` (it prepares {})",
        dir.display()
    );
    if std::env::var("ROAMDISK_REQUIRE_VM").as_deref() == Ok("1") {
        panic!("ROAMDISK_REQUIRE_VM=1 but {why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

/// Kills a child process when dropped (QEMU, qemu-nbd).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Playground(pub Child);

impl Drop for Playground {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// qemu-nbd serving a file, started with --fork so that it serves when this returns.
pub struct QemuNbd(pub u32);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on the qemu-nbd this test started.
        unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
    }
}

pub fn start_qemu_nbd(file: &Path, port: u16, pid_file: &Path) -> QemuNbd {
    let st = Command::new("qemu-nbd")
        .args([
            "--fork",
            "--persistent",
            "--shared=4",
            "-f",
            "raw",
            "-x",
            "vm",
        ])
        .args(["-b", "127.0.0.1", "-p", &port.to_string(), "--pid-file"])
        .arg(pid_file)
        .arg(file)
        .status()
        .expect("run qemu-nbd");
    assert!(st.success(), "qemu-nbd failed: {st}");
    let pid = std::fs::read_to_string(pid_file).unwrap();
    QemuNbd(pid.trim().parse().unwrap())
}

/// The value of `key=` in a console line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

pub fn num(line: &str, key: &str) -> f64 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key}= in {line:?}"))
}

/// The guest's serial console: lines out, commands in.
pub struct Console {
    pub name: &'static str,
    pub lines: Receiver<String>,
    pub input: ChildStdin,
    /// Writes completed so far (from the last `WROTE n=` line).
    pub writes: u64,
    /// Every `WROTE` line as it arrived: (host Unix ms, the guest's seq). A line is
    /// printed after its write (and the write's flush, every 16th) completed.
    pub wrote: std::sync::Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    pub ioerr: Vec<String>,
}

impl Console {
    pub fn send(&mut self, cmd: &str) {
        eprintln!("[{}] <- {cmd}", self.name);
        self.input
            .write_all(format!("{cmd}\n").as_bytes())
            .and_then(|_| self.input.flush())
            .unwrap_or_else(|e| panic!("[{}] console: {e}", self.name));
    }

    /// Reads lines until `f` returns a value, or panics at the deadline.
    pub fn wait<T>(
        &mut self,
        what: &str,
        within: Duration,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(l) => l,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "[{}] timed out after {within:?} waiting for {what}",
                        self.name
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("[{}] console closed while waiting for {what}", self.name)
                }
            };
            if line.starts_with("WROTE ") {
                self.writes = num(&line, "n") as u64;
            }
            if line.starts_with("IOERR ") {
                self.ioerr.push(line.clone());
            }
            if line.contains("Kernel panic") || line.starts_with("GUEST error") {
                panic!("[{}] guest failed: {line}", self.name);
            }
            if let Some(v) = f(&line) {
                return v;
            }
        }
    }

    pub fn wait_writes(&mut self, n: u64) {
        if self.writes >= n {
            return;
        }
        self.wait(&format!("{n} writes"), STEP, |l| {
            (l.starts_with("WROTE ") && num(l, "n") as u64 >= n).then_some(())
        })
    }

    /// Ends the guest's current phase and starts `next`; returns the ended phase's line.
    pub fn phase(&mut self, next: &str, ending: &str) -> Phase {
        self.send(&format!("PHASE {next}"));
        let line = self.wait(&format!("the end of phase {ending}"), STEP, |l| {
            (l.starts_with("PHASE_END ") && field(l, "name") == Some(ending)).then(|| l.to_owned())
        });
        Phase::parse(&line)
    }
}

#[derive(Clone, Debug)]
pub struct Phase {
    pub name: String,
    pub writes: u64,
    pub max_pause_ms: f64,
    pub ms: f64,
}

impl Phase {
    pub fn parse(line: &str) -> Phase {
        Phase {
            name: field(line, "name").unwrap().to_owned(),
            writes: num(line, "writes") as u64,
            max_pause_ms: num(line, "max_pause_ms"),
            ms: num(line, "ms"),
        }
    }

    pub fn rate(&self) -> f64 {
        self.writes as f64 * 1000.0 / self.ms.max(1.0)
    }
}

/// A QMP connection (unix socket, one JSON object a line).
pub struct Qmp {
    pub name: &'static str,
    pub reader: BufReader<UnixStream>,
    pub writer: UnixStream,
    pub events: VecDeque<Value>,
}

impl Qmp {
    pub fn connect(name: &'static str, path: &Path, child: &mut Child) -> Qmp {
        let deadline = Instant::now() + STEP;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        panic!("[{name}] QEMU exited ({st}) before its QMP socket was up");
                    }
                    assert!(
                        Instant::now() < deadline,
                        "[{name}] QMP {}: {e}",
                        path.display()
                    );
                    // The socket appears once QEMU has parsed its options: poll for it.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let mut q = Qmp {
            name,
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            events: VecDeque::new(),
        };
        let greeting = q.read(deadline);
        assert!(
            greeting.get("QMP").is_some(),
            "[{name}] QMP greeting: {greeting}"
        );
        q.execute("qmp_capabilities", json!({}));
        q
    }

    pub fn read(&mut self, deadline: Instant) -> Value {
        let left = deadline.saturating_duration_since(Instant::now());
        self.reader
            .get_ref()
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("[{}] QMP closed", self.name),
            Ok(_) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("[{}] QMP sent {line:?}: {e}", self.name)),
            Err(e) => panic!("[{}] QMP read: {e}", self.name),
        }
    }

    pub fn try_execute(&mut self, cmd: &str, args: Value) -> Result<Value, Value> {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").unwrap();
        let deadline = Instant::now() + STEP;
        loop {
            let v = self.read(deadline);
            if v.get("event").is_some() {
                self.events.push_back(v);
            } else if let Some(r) = v.get("return") {
                return Ok(r.clone());
            } else if let Some(e) = v.get("error") {
                return Err(e.clone());
            }
        }
    }

    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        self.try_execute(cmd, args.clone())
            .unwrap_or_else(|e| panic!("[{}] QMP {cmd} {args}: {e}", self.name))
    }

    /// Waits for an event for which `f` returns a value.
    pub fn wait_event<T>(
        &mut self,
        what: &str,
        within: Duration,
        mut f: impl FnMut(&Value) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            let ev = match self.events.pop_front() {
                Some(ev) => ev,
                None => {
                    assert!(
                        Instant::now() < deadline,
                        "[{}] timed out waiting for {what}",
                        self.name
                    );
                    self.read(deadline)
                }
            };
            if ev.get("event").is_none() {
                continue;
            }
            if let Some(v) = f(&ev) {
                return v;
            }
        }
    }
}

pub struct Vm {
    pub console: Console,
    pub qmp: Qmp,
    pub proc: Proc,
}

pub fn start_vm(
    name: &'static str,
    files: &VmFiles,
    dir: &Path,
    nbd: &str,
    incoming: Option<u16>,
) -> Vm {
    start_vm_with(name, files, dir, nbd, incoming, "")
}

/// As [`start_vm`], with `options` added to the guest's kernel command line.
pub fn start_vm_with(
    name: &'static str,
    files: &VmFiles,
    dir: &Path,
    nbd: &str,
    incoming: Option<u16>,
    options: &str,
) -> Vm {
    let (host, port) = nbd.rsplit_once(':').unwrap();
    let qmp_path = dir.join(format!("{name}.qmp"));
    let mut cmd = Command::new(&files.qemu);
    cmd.args(["-accel", "tcg", "-m", "256", "-smp", "1", "-name", name])
        .args(["-display", "none", "-vga", "none", "-nic", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .arg("-kernel")
        .arg(&files.kernel)
        .arg("-initrd")
        .arg(&files.initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 roamdisk.flush=16 {options}"))
        .arg("-blockdev")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host={host},server.port={port},export=vm,node-name=nbd0"
        ))
        .args(["-blockdev", "driver=raw,file=nbd0,node-name=disk0"])
        .args(["-device", "virtio-blk-pci,drive=disk0"]);
    if let Some(p) = incoming {
        cmd.args(["-incoming", &format!("tcp:127.0.0.1:{p}")]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", files.qemu.display()));
    let input = child.stdin.take().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    let wrote: std::sync::Arc<std::sync::Mutex<Vec<(u64, u64)>>> = Default::default();
    let progress = std::sync::Arc::clone(&wrote);
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r').to_owned();
            eprintln!("[{name}] {line}");
            if let Some(seq) = line
                .starts_with("WROTE ")
                .then(|| field(&line, "seq").and_then(|s| s.parse().ok()))
                .flatten()
            {
                progress.lock().unwrap().push((unix_ms(), seq));
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let qmp = Qmp::connect(name, &qmp_path, &mut child);
    Vm {
        console: Console {
            name,
            lines: rx,
            input,
            writes: 0,
            ioerr: Vec::new(),
            wrote,
        },
        qmp,
        proc: Proc(child),
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A QMP event's timestamp (host wall clock), in seconds.
pub fn event_time(ev: &Value) -> f64 {
    let t = &ev["timestamp"];
    t["seconds"].as_f64().unwrap() + t["microseconds"].as_f64().unwrap() / 1e6
}

/// A port that binds now, from `from` on.
pub fn free_port(from: u16) -> u16 {
    (from..32000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port")
}
