//! `roamdisk playground` as a user runs it (the default: three sites of three nodes over
//! the emulated `sinet5` WAN): real node processes, then qemu-img converts an image into
//! the volume through one node and compares it through a node of another site; the CLI
//! reports the cluster and moves the volume; SIGINT stops everything cleanly; a rerun
//! keeps the data.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use roamdisk_client::playground::free_base_port;
use roamdisk_client::playground::Manifest;

fn start(dir: &std::path::Path, base: u16) -> Child {
    let _ = std::fs::remove_file(dir.join("playground.json"));
    let child = Command::new(env!("CARGO_BIN_EXE_roamdisk"))
        .args(["playground", "--dir"])
        .arg(dir)
        .args(["--base-port", &base.to_string(), "--volume", "vm1:64M"])
        .stdout(Stdio::piped())
        // Its "node N stopped (...)" lines, read by `stop` (a file: nothing drains a pipe).
        .stderr(std::fs::File::create(stop_log(dir)).expect("create stderr log"))
        .spawn()
        .expect("start roamdisk playground");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !dir.join("playground.json").exists() {
        assert!(Instant::now() < deadline, "playground did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

fn stop_log(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("playground.stderr.log")
}

/// Stops the playground with SIGINT, as Ctrl-C does: it and every node must exit cleanly
/// (a node once aborted in RocksDB as the process exited, while the playground itself
/// still exited 0).
fn stop(mut child: Child, dir: &std::path::Path) -> String {
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "playground exited with {status}: {out}");
    let log = std::fs::read_to_string(stop_log(dir)).unwrap();
    let stops: Vec<&str> = log.lines().filter(|l| l.contains(" stopped (")).collect();
    assert!(!stops.is_empty(), "no node reported stopping: {log}");
    for l in &stops {
        assert!(l.ends_with("stopped (exit status: 0)"), "{l}\n{log}");
    }
    out
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn playground_serves_a_volume_that_qemu_img_converts_into() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(9, 21000);
    let child = start(dir.path(), base);
    let m = Manifest::load(dir.path()).unwrap();
    let names: Vec<&str> = m.sites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["osaka", "hokkaido", "fukuoka"]);
    assert!(m.sites.iter().all(|s| s.nodes.len() == 3));
    assert_eq!(m.wan.as_ref().unwrap().profile, "sinet5");
    assert_eq!(m.volumes[0].name, "vm1");
    assert_eq!(m.volumes[0].size, 64 << 20);
    let uris = &m.volumes[0].uris;

    // A 16 MiB qcow2 image with random data, converted in through node 1 (osaka) and
    // compared through node 6 (hokkaido, over the WAN).
    let img = dir.path().join("src.qcow2");
    let raw = dir.path().join("src.raw");
    let mut x: u64 = 77;
    let data: Vec<u8> = (0..16 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&raw, &data).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img));
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "qcow2", "-O", "raw"])
        .arg(&img)
        .arg(&uris[0]));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&img)
        .arg(&uris[5]));

    // The CLI, text and JSON.
    let admin = &m.sites[0].nodes[1].admin;
    let text = run(Command::new(env!("CARGO_BIN_EXE_roamdisk")).args([
        "--cluster",
        admin,
        "volume",
        "list",
    ]));
    assert!(text.contains("vm1"), "{text}");
    let json = run(Command::new(env!("CARGO_BIN_EXE_roamdisk")).args([
        "--cluster",
        admin,
        "--json",
        "status",
    ]));
    let st: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(st["nodes"], 9);
    let nodes = run(Command::new(env!("CARGO_BIN_EXE_roamdisk")).args([
        "--cluster",
        admin,
        "--json",
        "node",
        "list",
    ]));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&nodes)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        9
    );
    // The WAN's control API answers with every directed site-pair link.
    let control: std::net::SocketAddr = m.wan.as_ref().unwrap().control.parse().unwrap();
    let links = roamdisk_wan::ControlClient::new(control).links().unwrap();
    assert_eq!(links.len(), 6, "{links:?}");
    // Move the volume to hokkaido and wait: the generation goes up and the data is there.
    let moved = run(Command::new(env!("CARGO_BIN_EXE_roamdisk")).args([
        "--cluster",
        admin,
        "--json",
        "volume",
        "move",
        "vm1",
        "--to",
        "hokkaido",
        "--wait",
    ]));
    let moved: serde_json::Value = serde_json::from_str(&moved).unwrap();
    assert_eq!(moved["home_site"], "hokkaido", "{moved:#}");
    assert_eq!(moved["generation"], 2, "{moved:#}");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&img)
        .arg(&uris[8]));
    let bad = Command::new(env!("CARGO_BIN_EXE_roamdisk"))
        .args([
            "--cluster",
            admin,
            "volume",
            "create",
            "vm1",
            "--size",
            "1G",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("already exists"));

    // A consistency group: its volumes are exports of their own (not the group), each
    // its own range of the group's one log, grown by `volume create --group`.
    let cli = |args: &[&str]| {
        run(Command::new(env!("CARGO_BIN_EXE_roamdisk"))
            .args(["--cluster", admin])
            .args(args))
    };
    let g: serde_json::Value = serde_json::from_str(&cli(&[
        "--json",
        "group",
        "create",
        "vmg",
        "--volumes",
        "boot:8M,data:16M",
        "--home",
        "osaka",
    ]))
    .unwrap();
    assert_eq!(g["members"][1]["name"], "data", "{g:#}");
    assert_eq!(g["members"][1]["offset"], 8 << 20);
    cli(&["volume", "create", "logs", "--size", "4M", "--group", "vmg"]);
    let shown = cli(&["group", "show", "vmg"]);
    assert!(
        shown.contains("consistency group of boot") && shown.contains("logs"),
        "{shown}"
    );
    let uri = |node: usize, export: &str| {
        let n = m.sites[node / 3].nodes[node % 3].nbd.clone();
        format!("nbd://{n}/{export}")
    };
    // data gets the image's first 16 MiB, then boot other bytes: data must not change.
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&raw)
        .arg(uri(0, "data")));
    let boot_raw = dir.path().join("boot.raw");
    std::fs::write(&boot_raw, vec![0x5a; 8 << 20]).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&boot_raw)
        .arg(uri(1, "boot")));
    for (file, export) in [(&raw, "data"), (&boot_raw, "boot")] {
        run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(file)
            .arg(uri(5, export)));
    }
    let group_export = Command::new("qemu-img")
        .args(["info"])
        .arg(uri(0, "vmg"))
        .output()
        .unwrap();
    assert!(
        !group_export.status.success(),
        "a group's own name is no export"
    );
    let alone = Command::new(env!("CARGO_BIN_EXE_roamdisk"))
        .args([
            "--cluster",
            admin,
            "volume",
            "move",
            "data",
            "--to",
            "fukuoka",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&alone.stderr).contains("consistency group \"vmg\""),
        "{alone:?}"
    );

    let out = stop(child, dir.path());
    assert!(
        out.contains("nbd://"),
        "banner should print the URIs: {out}"
    );

    // Same DIR: the same cluster comes back with its data.
    let child = start(dir.path(), base);
    let m = Manifest::load(dir.path()).unwrap();
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&img)
        .arg(&m.volumes[0].uris[1]));
    stop(child, dir.path());
}
