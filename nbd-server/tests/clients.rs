//! `roamdisk-nbd` against real third-party NBD clients: qemu-io, qemu-img, nbdinfo,
//! nbdsh (python3-libnbd), nbdcopy and fio's nbd engine.

mod common;

use std::process::Command;

use common::{pseudo_random, qemu_io, run, tool, NbdServer};

const MIB: u64 = 1 << 20;

fn file_bytes(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn qemu_io_patterns_aligned_unaligned_last_block_fua_aio_zero_discard_flush() {
    let size = 64 * MIB;
    let s = NbdServer::sparse(size);
    let last = size - 4096;
    qemu_io(
        &s.uri(),
        &[
            "write -P 0xa1 0 64k",
            "read -P 0xa1 0 64k",
            // Unaligned write inside written data: the neighbours must survive.
            "write -P 0xb2 1000 3000",
            "read -P 0xb2 1000 3000",
            "read -P 0xa1 0 1000",
            "read -P 0xa1 4000 61536",
            // Unaligned write into a hole, straddling a block boundary.
            "write -P 0x3c 8388000 5000",
            "read -P 0x3c 8388000 5000",
            "read -P 0 8387584 416",
            // Last block, with FUA, then the last 512 bytes.
            &format!("write -f -P 0xc3 {last} 4096"),
            &format!("read -P 0xc3 {last} 4096"),
            &format!("write -P 0xd4 {} 512", size - 512),
            &format!("read -P 0xd4 {} 512", size - 512),
            &format!("read -P 0xc3 {last} 3584"),
            // Asynchronous writes in flight together, then an async flush.
            "aio_write -P 0xe5 1M 64k",
            "aio_write -P 0xe6 2M 64k",
            "aio_write -P 0xe7 3M 1M",
            "aio_flush",
            "read -P 0xe5 1M 64k",
            "read -P 0xe6 2M 64k",
            "read -P 0xe7 3M 1M",
            // Write zeroes (with and without unmap), discard, flush.
            "write -z 1M 64k",
            "read -P 0 1M 64k",
            "write -z -u 3M 512k",
            "read -P 0 3M 512k",
            "read -P 0xe7 3670016 512k",
            "discard 2M 64k",
            "flush",
        ],
    );
    // A second connection sees everything, and so does the file itself.
    qemu_io(
        &s.uri(),
        &[
            "read -P 0xb2 1000 3000",
            &format!("read -P 0xd4 {} 512", size - 512),
        ],
    );
    assert_eq!(file_bytes(&s.file, 1000, 3000), vec![0xb2; 3000]);
    assert_eq!(file_bytes(&s.file, 999, 1), vec![0xa1]);
    assert_eq!(file_bytes(&s.file, size - 512, 512), vec![0xd4; 512]);
    assert_eq!(file_bytes(&s.file, MIB, 65536), vec![0; 65536]);
}

#[test]
fn qemu_io_fails_cleanly_past_the_end_and_on_read_only() {
    let s = NbdServer::sparse(4 * MIB);
    // qemu checks bounds itself, so the request past the end fails in the client.
    let out = tool("qemu-io")
        .args(["-f", "raw", "-c", "read 4M 4k", &s.uri()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("read failed"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.img");
    std::fs::write(&path, vec![0x5a; 1 << 20]).unwrap();
    let ro = NbdServer::start(&path, &["--read-only"]);
    let out = tool("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k", &ro.uri()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // qemu sees NBD_FLAG_READ_ONLY and refuses to open the export for writing.
    assert!(
        text.contains("Permission denied") || text.contains("read-only"),
        "{text}"
    );
    run(tool("qemu-io").args(["-r", "-f", "raw", "-c", "read -P 0x5a 0 1M", &ro.uri()]));
    assert_eq!(file_bytes(&path, 0, 4096), vec![0x5a; 4096]);
}

#[test]
fn qemu_img_convert_compare_and_byte_roundtrip_64mib() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let data = pseudo_random(64 << 20, 42);
    std::fs::write(&src, &data).unwrap();
    let s = NbdServer::sparse(64 * MIB);
    run(tool("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(s.uri()));
    run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(s.uri()));
    let back = dir.path().join("back.img");
    run(tool("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(s.uri())
        .arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "converted-back image differs from the source"
    );
    assert!(
        std::fs::read(&s.file).unwrap() == data,
        "export file differs from the source"
    );
    // And compare must be able to fail: change one byte through NBD.
    qemu_io(&s.uri(), &["write -P 0 32M 4k"]);
    let out = tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(s.uri())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare should see the difference"
    );
}

#[test]
fn nbdinfo_list_map_and_json() {
    let s = NbdServer::sparse(16 * MIB);
    qemu_io(&s.uri(), &["write -P 0x11 1M 128k", "write -P 0x22 8M 4k"]);

    let info: serde_json::Value =
        serde_json::from_str(&run(tool("nbdinfo").args(["--json", &s.uri()]))).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 16 * MIB);
    assert_eq!(export["export-name"], "vm1");
    assert_eq!(export["block_size_minimum"], 4096);
    assert_eq!(export["block_size_preferred"], 65536);
    assert_eq!(export["block_size_maximum"], 32 * MIB);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(export[flag], true, "{flag}");
    }
    assert_eq!(export["is_read_only"], false);
    assert_eq!(info["protocol"], "newstyle-fixed");
    assert!(export["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "base:allocation"));

    let list = run(tool("nbdinfo").args(["--list", "--json", &format!("nbd://{}", s.addr)]));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert!(list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["export-name"] == "vm1"));

    let map: serde_json::Value =
        serde_json::from_str(&run(tool("nbdinfo").args(["--map", "--json", &s.uri()]))).unwrap();
    let extents: Vec<(u64, u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        extents,
        vec![
            (0, MIB, 3),
            (MIB, 128 << 10, 0),
            (MIB + (128 << 10), 7 * MIB - (128 << 10), 3),
            (8 * MIB, 4096, 0),
            (8 * MIB + 4096, 8 * MIB - 4096, 3),
        ]
    );
    // After a trim the data extent becomes a hole again.
    qemu_io(&s.uri(), &["discard 8M 4k"]);
    let text = run(tool("nbdinfo").args(["--map", &s.uri()]));
    assert!(
        !text.contains("8388608"),
        "trimmed block still allocated:\n{text}"
    );
}

#[test]
fn nbdsh_flags_block_sizes_status_errors_and_multi_conn_flush() {
    let s = NbdServer::sparse(16 * MIB);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nbdsh_checks.py");
    // Debian's python3 has the libnbd bindings; a pyenv python first on PATH does not.
    let out = run(Command::new("/usr/bin/python3").arg(script).arg(s.uri()));
    assert!(out.contains("nbdsh checks passed"), "{out}");
}

#[test]
fn nbdcopy_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let mut data = pseudo_random(24 << 20, 7);
    data[8 << 20..12 << 20].fill(0); // a zero run in the middle
    std::fs::write(&src, &data).unwrap();
    let s = NbdServer::sparse(24 * MIB);
    run(tool("nbdcopy").arg(&src).arg(s.uri()));
    let out = dir.path().join("out.img");
    std::fs::File::create(&out)
        .unwrap()
        .set_len(24 * MIB)
        .unwrap();
    run(tool("nbdcopy").arg(s.uri()).arg(&out));
    assert!(
        std::fs::read(&out).unwrap() == data,
        "nbdcopy round trip differs"
    );
    // With several connections and requests in flight as well.
    let out2 = dir.path().join("out2.img");
    std::fs::File::create(&out2)
        .unwrap()
        .set_len(24 * MIB)
        .unwrap();
    run(tool("nbdcopy")
        .args(["--connections=4", "--requests=32"])
        .arg(s.uri())
        .arg(&out2));
    assert!(
        std::fs::read(&out2).unwrap() == data,
        "multi-connection nbdcopy differs"
    );
}

#[test]
fn fio_nbd_engine_with_verify() {
    let s = NbdServer::sparse(64 * MIB);
    for (rw, depth) in [("randwrite", "32"), ("write", "4")] {
        let out = run(tool("fio").args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", s.uri()),
            &format!("--rw={rw}"),
            "--bs=4k",
            "--size=32M",
            &format!("--iodepth={depth}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // No `local-verify-*.state` file in the working directory (one was committed).
            "--verify_state_save=0",
            "--output-format=json",
        ]));
        let json_start = out.find('{').expect("fio json");
        let report: serde_json::Value = serde_json::from_str(&out[json_start..]).unwrap();
        let job = &report["jobs"][0];
        assert_eq!(job["error"], 0, "fio error: {out}");
        assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 32 << 20);
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap() >= 32 << 20,
            "verify phase must read everything back"
        );
    }
}

#[test]
fn sigterm_stops_cleanly() {
    let s = NbdServer::sparse(MIB);
    qemu_io(&s.uri(), &["write -P 1 0 4k"]);
    assert_eq!(s.terminate(), Some(0));
}

#[test]
fn unix_socket_export_serves_qemu_io_and_nbdinfo() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm1.sock");
    let img = dir.path().join("disk.img");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_roamdisk-nbd"))
        .arg("--file")
        .arg(&img)
        .args(["--size", "8M", "--name", "vm1", "--unix"])
        .arg(&sock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut banner)
        .unwrap();
    let uri = format!("nbd+unix:///vm1?socket={}", sock.display());
    assert!(banner.contains(&uri), "banner {banner:?} should name {uri}");
    qemu_io(
        &uri,
        &["write -P 0x9c 4k 8k", "flush", "read -P 0x9c 4k 8k"],
    );
    let info: serde_json::Value =
        serde_json::from_str(&run(tool("nbdinfo").args(["--json", &uri]))).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 8 * MIB);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(file_bytes(&img, 4096, 8192), vec![0x9c; 8192]);
}
