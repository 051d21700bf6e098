//! The HTTP control API (through `ControlClient` and raw requests) and the
//! `roamdisk-wan` binary.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::*;
use roamdisk_wan::{ClientError, ControlClient, LinkUpdate, Partition, WanProfile};
use tokio::net::TcpStream;

/// Runs blocking client code off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    Ok(tokio::task::spawn_blocking(f).await?)
}

/// Sends a raw request; returns (status, body).
fn raw(method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    let req = ureq::request(method, url).timeout(Duration::from_secs(10));
    let res = match body {
        Some(b) => req.set("content-type", "application/json").send_string(b),
        None => req.call(),
    };
    match res {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_through_the_api() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let addr = wan.serve_control("127.0.0.1:0".parse()?).await?;
    let client = ControlClient::new(addr);

    let c = client.clone();
    let links = blocking(move || c.links()).await??;
    assert_eq!(links.len(), 2);
    assert!(links.iter().all(|l| l.params.delay_ms == 0.0));

    // A partial update changes only what it names.
    let c = client.clone();
    let updated = blocking(move || {
        let body: LinkUpdate = serde_json::from_str(
            r#"{"delay_ms":10,"jitter_ms":1.5,"bandwidth_bytes_per_sec":1000000,"partition":"hold"}"#,
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        Ok::<_, anyhow::Error>(c.update("a", "b", &body)?)
    })
    .await??;
    assert_eq!(updated.params.delay_ms, 10.0);
    assert_eq!(updated.params.jitter_ms, 1.5);
    assert_eq!(updated.params.bandwidth_bytes_per_sec, Some(1_000_000));
    assert_eq!(updated.params.partition, Partition::Hold);
    let p = wan.params("a", "b")?;
    assert_eq!(p.delay, Duration::from_millis(10));
    assert_eq!(p.jitter, Duration::from_micros(1500));
    assert_eq!(p.partition, Partition::Hold);
    assert_eq!(wan.params("b", "a")?, roamdisk_wan::LinkParams::default());

    // null bandwidth = unlimited; absent fields stay.
    let c = client.clone();
    let updated = blocking(move || {
        c.update(
            "a",
            "b",
            &LinkUpdate {
                bandwidth_bytes_per_sec: Some(None),
                ..LinkUpdate::default()
            },
        )
    })
    .await??;
    assert_eq!(updated.params.bandwidth_bytes_per_sec, None);
    assert_eq!(updated.params.delay_ms, 10.0);

    // A profile keeps partitions; heal clears them.
    let c = client.clone();
    let links = blocking(move || c.apply_profile("wide-2010")).await??;
    for l in &links {
        assert_eq!(l.params.delay_ms, 20.0);
        assert_eq!(l.params.bandwidth_bytes_per_sec, Some(12_500_000));
    }
    assert_eq!(wan.params("a", "b")?.partition, Partition::Hold);
    let c = client.clone();
    let links = blocking(move || c.heal()).await??;
    assert!(links.iter().all(|l| l.params.partition == Partition::None));
    assert_eq!(wan.profile(), WanProfile::Wide2010);

    // Reset over HTTP breaks a live connection and reports it.
    wan.apply_profile(WanProfile::Lan);
    let (echo, _) = echo_server().await?;
    let route = wan.route("a", "b", echo).await?;
    let mut conn = TcpStream::connect(route).await?;
    ping(&mut conn, 1).await?;
    let c = client.clone();
    let n = blocking(move || c.reset("a", "b")).await??;
    assert_eq!(n, 1);
    assert!(sees_connection_end(&mut conn, DEADLINE).await);
    let c = client.clone();
    let link = blocking(move || c.link("a", "b")).await??;
    assert_eq!(link.stats.connections_reset, 1);
    assert_eq!(link.stats.connections_total, 1);
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_400_and_unknown_things_are_404() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let addr = wan.serve_control("127.0.0.1:0".parse()?).await?;
    let base = format!("http://{addr}");
    let link = format!("{base}/v1/links/a/b");
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        (
            "PUT",
            link.clone(),
            Some("{not json"),
            400,
            "invalid link update",
        ),
        ("PUT", link.clone(), Some(""), 400, "EOF"),
        (
            "PUT",
            link.clone(),
            Some(r#"{"delay_ms":-5}"#),
            400,
            "delay_ms",
        ),
        (
            "PUT",
            link.clone(),
            Some(r#"{"jitter_ms":"x"}"#),
            400,
            "invalid type",
        ),
        (
            "PUT",
            link.clone(),
            Some(r#"{"bandwidth_bytes_per_sec":-1}"#),
            400,
            "-1",
        ),
        (
            "PUT",
            link.clone(),
            Some(r#"{"bandwidth_bytes_per_sec":0}"#),
            400,
            "bandwidth",
        ),
        (
            "PUT",
            link.clone(),
            Some(r#"{"queue_limit_bytes":1}"#),
            400,
            "queue limit",
        ),
        (
            "PUT",
            link.clone(),
            Some(r#"{"delay_ms":999999}"#),
            400,
            "delay_ms",
        ),
        (
            "PUT",
            link.clone(),
            Some(r#"{"partition":"sideways"}"#),
            400,
            "sideways",
        ),
        (
            "PUT",
            link.clone(),
            Some(r#"{"latency_ms":5}"#),
            400,
            "unknown field",
        ),
        (
            "PUT",
            format!("{base}/v1/links/A/b"),
            Some("{}"),
            400,
            "lower-case",
        ),
        (
            "PUT",
            format!("{base}/v1/links/a/a"),
            Some("{}"),
            400,
            "two different sites",
        ),
        (
            "PUT",
            format!("{base}/v1/links/a/c"),
            Some("{}"),
            404,
            "unknown link",
        ),
        (
            "GET",
            format!("{base}/v1/links/c/a"),
            None,
            404,
            "unknown link",
        ),
        (
            "POST",
            format!("{base}/v1/links/a/c/reset"),
            None,
            404,
            "unknown link",
        ),
        (
            "POST",
            format!("{base}/v1/profile/fast"),
            None,
            404,
            "unknown WAN profile",
        ),
        (
            "GET",
            format!("{base}/v2/links"),
            None,
            404,
            "no such endpoint",
        ),
    ];
    let results = blocking(move || {
        cases
            .into_iter()
            .map(|(m, url, body, want, text)| {
                let (status, answer) = raw(m, &url, body);
                (m, url, body, want, text, status, answer)
            })
            .collect::<Vec<_>>()
    })
    .await?;
    let mut failures = Vec::new();
    for (m, url, body, want, text, status, answer) in results {
        println!("{m} {url} {body:?} -> {status} {answer}");
        let message = serde_json::from_str::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned));
        let ok = status == want && message.as_deref().is_some_and(|m| m.contains(text));
        if !ok {
            failures.push(format!(
                "{m} {url} {body:?}: got {status} {answer}, want {want} with {text:?}"
            ));
        }
    }
    // Nothing was changed by the rejected requests.
    assert_eq!(wan.params("a", "b")?, roamdisk_wan::LinkParams::default());
    if !failures.is_empty() {
        bail!("unexpected answers:\n{}", failures.join("\n"));
    }

    // The client reports status and message.
    let client = ControlClient::new(addr);
    let err = blocking(move || client.link("a", "zz")).await?;
    match err {
        Err(ClientError::Status {
            status, message, ..
        }) => {
            assert_eq!(status, 404);
            assert!(message.contains("unknown link a -> zz"), "{message}");
        }
        other => bail!("expected a 404, got {other:?}"),
    }
    wan.shutdown().await;
    Ok(())
}

/// The binary: routes and control API from the command line, clean stop on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_runs_routes_and_control_api() -> Result<()> {
    let (echo, _) = echo_server().await?;
    let child = Command::new(env!("CARGO_BIN_EXE_roamdisk-wan"))
        .args(["--profile", "sinet5", "--control", "127.0.0.1:0", "--route"])
        .arg(format!("osaka:hokkaido:127.0.0.1:0={echo}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start roamdisk-wan")?;
    let mut child = ChildGuard(child);
    let stdout = child.0.stdout.take().context("no stdout")?;
    // The binary prints the bound addresses; read them off the blocking pool.
    let lines = blocking(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let done = line.starts_with("control API");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    let lines = tokio::time::timeout(DEADLINE, lines).await??;
    let find = |prefix: &str, after: &str| -> Result<SocketAddr> {
        let line = lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .with_context(|| format!("no {prefix:?} line in {lines:?}"))?;
        let rest = &line[line.find(after).context("bad line")? + after.len()..];
        let addr = rest.split([' ', '/']).next().unwrap_or("");
        Ok(addr.parse()?)
    };
    let route = find("route osaka -> hokkaido", ": ")?;
    let control = find("control API", "http://")?;

    let med = median(&ping_addr(route, 11).await?);
    println!(
        "binary, sinet5 osaka-hokkaido: median RTT {:.2} ms",
        ms_f(med)
    );
    assert!(med >= Duration::from_millis(20) && med <= Duration::from_millis(26));
    let client = ControlClient::new(control);
    let links = blocking(move || client.links()).await??;
    assert_eq!(links.len(), 2);
    assert!(links.iter().all(|l| l.stats.connections_total == 1));

    // SAFETY: kill(2) with the pid of a child we own.
    let rc = unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = blocking(move || child.0.wait()).await??;
    assert!(status.success(), "exit status {status}");
    Ok(())
}
