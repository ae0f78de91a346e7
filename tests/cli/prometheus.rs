//! `/metrics` as the real Prometheus server (Debian's `prometheus`) scrapes and stores it.

use crate::router::spawn_router;
use isthmus_tests::netns::skip;
use isthmus_tests::{new_island, HelloOpts, WireReplica, PATIENCE};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A Prometheus server on loopback with its own config and storage, removed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn start_prometheus(bin: &str, target: SocketAddr) -> Prometheus {
    let dir = std::env::temp_dir().join(format!("isthmus-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
    // What the README tells operators to add, with a short interval so the test is quick.
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: isthmus\n    static_configs:\n      - targets: ['{target}']\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("config");
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let child = Command::new(bin)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    Prometheus { child, addr, dir }
}

/// A plain HTTP/1.0 GET; the body of a 200, or `None` (not up yet, or an error).
async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    // Go answers an HTTP/1.0 request as HTTP/1.0.
    let ok = head.split_whitespace().nth(1) == Some("200");
    ok.then(|| body.to_string())
}

/// The value of an instant query with one result, if Prometheus has it yet.
async fn query(prom: SocketAddr, q: &str) -> Option<f64> {
    let body = get(prom, &format!("/api/v1/query?query={q}")).await?;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

async fn until_query(prom: SocketAddr, q: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        last = query(prom, q).await;
        if last == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("Prometheus never had {q} = {want}; last answer {last:?}");
}

async fn sends(r: &mut WireReplica, n: usize, tag: &str) {
    for i in 0..n {
        r.send(format!("{tag} {i}")).await.expect("send");
    }
}

/// Waits until `r` has seen `n` replica messages; returns the last seq it saw.
async fn seen(r: &mut WireReplica, n: usize) -> u64 {
    let s = r
        .wait_until(PATIENCE, "every send stamped", |s| {
            s.log.iter().filter(|m| m.client_seq > 0).count() >= n
        })
        .await;
    s.log.last().map_or(0, |m| m.seq.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_session_gauge_and_the_message_counter() {
    let bin = "/usr/bin/prometheus";
    if !Path::new(bin).exists() {
        return skip(&format!(
            "SKIPPED prometheus_scrapes_the_session_gauge_and_the_message_counter: needs {bin} (Debian's prometheus); .ci/run installs it"
        ))
        .unwrap_or(());
    }
    let (mut router, addr) = spawn_router(&[]);
    // A small load: two islands, three replicas, fifty messages.
    let first = new_island();
    let mut a1 = WireReplica::connect(addr, HelloOpts::new(&first, true))
        .await
        .expect("connect");
    a1.wait_until(PATIENCE, "synced", |s| s.synced).await;
    let mut a2 = WireReplica::connect(addr, HelloOpts::new(&first, false))
        .await
        .expect("connect");
    a2.wait_until(PATIENCE, "synced", |s| s.synced).await;
    let mut b1 = WireReplica::connect(addr, HelloOpts::new(&new_island(), true))
        .await
        .expect("connect");
    b1.wait_until(PATIENCE, "synced", |s| s.synced).await;
    sends(&mut a1, 25, "a1").await;
    sends(&mut a2, 15, "a2").await;
    sends(&mut b1, 10, "b1").await;
    // What the router stamped, as the replicas saw it (their joins are stamped too).
    let stamped = seen(&mut a1, 40).await + seen(&mut b1, 10).await;
    assert!(stamped >= 50);

    let prom = start_prometheus(bin, addr);
    until_query(prom.addr, "up", 1.0).await;
    until_query(prom.addr, "isthmus_sessions", 2.0).await;
    until_query(prom.addr, "isthmus_replicas", 3.0).await;
    until_query(prom.addr, "isthmus_messages_stamped_total", stamped as f64).await;
    // Every message went to every replica of its island.
    let deliveries = query(prom.addr, "isthmus_deliveries_total")
        .await
        .expect("deliveries");
    assert!(deliveries >= (40 * 2 + 10) as f64, "{deliveries}");
    assert!(query(prom.addr, "process_resident_memory_bytes")
        .await
        .is_some_and(|v| v > 0.0));
    // Prometheus asked for OpenMetrics; a client that does not (curl, promtool) gets the older
    // text format, and Prometheus's own linter passes it.
    let text = get(addr, "/metrics").await.expect("/metrics");
    assert!(!text.contains("# EOF") && text.contains("# TYPE isthmus_forwarding_info gauge"));
    let mut lint = Command::new("/usr/bin/promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool (Debian's prometheus package has it)");
    std::io::Write::write_all(&mut lint.stdin.take().expect("stdin"), text.as_bytes())
        .expect("feed promtool");
    let out = lint.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop((a1, a2, b1));
    let _ = router.kill();
    let _ = router.wait();
}
