//! `target/release/cluster`: what a router cluster on etcd costs and how fast it moves
//! (issue 14): join time direct and through a redirect, etcd requests per island, and failover
//! time after a home is killed with SIGKILL.
//!
//! Starts a real etcd on loopback (Debian's `etcd-server`) and three `isthmus router --cluster`
//! processes (the binary next to this one: build both with
//! `cargo build --release -p isthmus --bin isthmus -p isthmus-tests --bin cluster`).
//!
//! 1. ISLANDS islands are created through the first router (each creator follows a redirect
//!    when the island is placed elsewhere), then one replica joins each island at its home and
//!    one through another router: connect to welcome, raw wire, one replica at a time.
//! 2. The routers' own counts of etcd requests (`/status.json`, `cluster.etcd_ops`) before and
//!    after the islands are created, and after they end, give the requests per island.
//! 3. FAILOVER islands of 3 island-client replicas (one sending 100 messages a second) are
//!    spread over the routers; the router home to most of them is killed with SIGKILL, and every
//!    one of its replicas is timed from the kill to its first `Synced` after it.
//!
//! `cluster [--islands N] [--failover N]`

use isthmus_contact::{ContactPoint, Postcard};
use isthmus_island_client::chat::ChatIsland;
use isthmus_island_client::client::{self, ClientHandle};
use isthmus_island_client::{ClientConfig, Event, ReplicaConfig};
use isthmus_router::auth::Capability;
use isthmus_router::framed::FrameReader;
use isthmus_router::ids::SessionId;
use isthmus_router::wire::{self, ClientFrame, CreateOptions, ServerFrame};
use isthmus_tests::etcd::Etcd;
use isthmus_tests::{exchange_preambles, http_request, new_island, HelloOpts};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A router process, killed when dropped (also when the bench panics).
struct Router(Child);

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `isthmus router --cluster URL` on a free loopback port, and its address.
fn router(url: &str, data: &std::path::Path) -> (Router, SocketAddr) {
    let bin = std::env::current_exe()
        .expect("own path")
        .with_file_name("isthmus");
    let mut child = Command::new(&bin)
        .args([
            "router",
            "--listen",
            "127.0.0.1",
            "--port",
            "0",
            "--no-beacon",
            "--no-croquet",
            "--linger-ms",
            "200",
            // Every replica of the bench comes from 127.0.0.1.
            "--max-connections-per-ip",
            "100000",
            "--cluster",
            url,
            "--cluster-name",
            "bench",
        ])
        .env("ISTHMUS_DATA_DIR", data)
        .env("ISTHMUS_PREFS", data.join("no-prefs.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}; build it first", bin.display()));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
        .parse()
        .expect("address");
    (Router(child), addr)
}

async fn cluster_view(addr: SocketAddr) -> Value {
    let (_, body) = http_request(addr, "127.0.0.1", "/status.json").await;
    let v: Value = serde_json::from_str(&body).expect("status JSON");
    v["cluster"].clone()
}

/// etcd requests made by all the routers: (reads, writes).
async fn ops(addrs: &[SocketAddr]) -> (u64, u64) {
    let mut total = (0, 0);
    for a in addrs {
        let o = &cluster_view(*a).await["etcd_ops"];
        total.0 += o["reads"].as_u64().unwrap_or(0);
        total.1 += o["writes"].as_u64().unwrap_or(0);
    }
    total
}

/// Hello at `addr` and the first answer, on a connection left open.
async fn hello(addr: SocketAddr, opts: &HelloOpts) -> (ServerFrame, FrameReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let nonce = exchange_preambles(&mut s).await.expect("preambles");
    s.write_all(&wire::encode(&ClientFrame::Hello(opts.sign(&nonce))))
        .await
        .expect("hello");
    let mut frames = FrameReader::new(s, usize::MAX);
    let f = frames.read::<ServerFrame>().await.expect("an answer");
    (f, frames)
}

/// Connect to welcome, following one redirect: the time, whether it was redirected, where the
/// welcome came from and the open connection (kept so the island lives).
async fn timed_join(
    addr: SocketAddr,
    opts: &HelloOpts,
) -> (Duration, bool, SocketAddr, FrameReader<TcpStream>) {
    let start = Instant::now();
    let (first, conn) = hello(addr, opts).await;
    match first {
        ServerFrame::Welcome(_) => (start.elapsed(), false, addr, conn),
        ServerFrame::Redirect { contacts, .. } => {
            let home = contacts[0].internal[0];
            let (again, conn) = hello(home, opts).await;
            assert!(matches!(again, ServerFrame::Welcome(_)), "{again:?}");
            (start.elapsed(), true, home, conn)
        }
        other => panic!("unexpected answer {other:?}"),
    }
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (
        ms(v[v.len() / 2]),
        ms(v[(v.len() * 9 / 10).min(v.len() - 1)]),
        ms(v[v.len() - 1]),
    )
}

/// When each replica was last disconnected and when it was next synced.
#[derive(Default, Clone, Copy)]
struct Times {
    lost: Option<Instant>,
    back: Option<Instant>,
}

async fn watch(mut events: tokio::sync::mpsc::Receiver<Event>, times: Arc<Mutex<Times>>) {
    while let Some(e) = events.recv().await {
        let now = Instant::now();
        let Ok(mut t) = times.lock() else { return };
        match e {
            Event::Disconnected { .. } if t.lost.is_none() => t.lost = Some(now),
            Event::Synced { .. } if t.lost.is_some() && t.back.is_none() => t.back = Some(now),
            Event::SessionLost { reason } => panic!("a replica lost its island: {reason}"),
            _ => {}
        }
    }
}

async fn run(islands: usize, failover: usize) {
    let etcd = Etcd::start();
    let data = std::env::temp_dir().join(format!("isthmus-cluster-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&data).expect("data dir");
    let mut routers: Vec<(Router, SocketAddr)> =
        (0..3).map(|_| router(&etcd.url(), &data)).collect();
    let addrs: Vec<SocketAddr> = routers.iter().map(|r| r.1).collect();
    while cluster_view(addrs[0]).await["routers"]
        .as_array()
        .map_or(0, Vec::len)
        < 3
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 1 and 2: creation, joins and the etcd requests they cost.
    let before = ops(&addrs).await;
    let mut created = Vec::new();
    let mut creates = Vec::new();
    for _ in 0..islands {
        let island = new_island();
        let (t, _, home, conn) = timed_join(addrs[0], &HelloOpts::new(&island, true)).await;
        creates.push(t);
        created.push((island, home, conn));
    }
    let after_create = ops(&addrs).await;
    let mut direct = Vec::new();
    let mut redirected = Vec::new();
    let mut joined = Vec::new();
    for (island, home, _) in &created {
        let (t, hopped, _, c) = timed_join(*home, &HelloOpts::new(island, false)).await;
        assert!(!hopped);
        direct.push(t);
        joined.push(c);
        let other = *addrs.iter().find(|a| *a != home).expect("another router");
        let (t, hopped, _, c) = timed_join(other, &HelloOpts::new(island, false)).await;
        assert!(hopped);
        redirected.push(t);
        joined.push(c);
    }
    let after_join = ops(&addrs).await;
    let placed_on: std::collections::BTreeMap<SocketAddr, usize> =
        created.iter().fold(Default::default(), |mut m, (_, h, _)| {
            *m.entry(*h).or_default() += 1;
            m
        });
    // Every replica leaves: the islands end after their linger and free their records.
    drop(joined);
    drop(created);
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster_view(addrs[0]).await["islands"]
        .as_array()
        .is_some_and(|l| !l.is_empty())
    {
        assert!(Instant::now() < deadline, "islands did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after_end = ops(&addrs).await;
    let per = |a: (u64, u64), b: (u64, u64)| {
        (
            (b.0 - a.0) as f64 / islands as f64,
            (b.1 - a.1) as f64 / islands as f64,
        )
    };
    println!("### Joins ({islands} islands, three routers, one etcd, loopback)\n");
    println!("| join | p50 ms | p90 ms | max ms |");
    println!("|---|---|---|---|");
    for (what, v) in [
        (
            "create through the first router (redirected when placed elsewhere)",
            creates,
        ),
        ("join at the home", direct),
        (
            "join through another router (redirect, then the home)",
            redirected,
        ),
    ] {
        let (p50, p90, max) = percentiles(v);
        println!("| {what} | {p50:.2} | {p90:.2} | {max:.2} |");
    }
    println!(
        "\nplaced: {}",
        placed_on
            .values()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" / ")
    );
    println!("\n### etcd requests per island (all routers together)\n");
    println!("| phase | reads | writes |");
    println!("|---|---|---|");
    let (r, w) = per(before, after_create);
    println!("| creation (lookup, placement transaction, known put) | {r:.2} | {w:.2} |");
    let (r, w) = per(after_create, after_join);
    println!("| two more joins (one at the home, one redirected) | {r:.2} | {w:.2} |");
    let (r, w) = per(after_join, after_end);
    println!("| end (placement and known records deleted, one transaction) | {r:.2} | {w:.2} |");

    // 3: failover after a SIGKILL.
    let mut senders = Vec::new();
    let mut keep: Vec<ClientHandle<ChatIsland>> = Vec::new();
    let mut all = Vec::new();
    for i in 0..failover {
        let contact = ContactPoint::new(SessionId::random(), "bench", vec![]);
        let card = Postcard::for_new_island(contact, Capability::new_island()).expect("card");
        for r in 0..3 {
            let mut rc = ReplicaConfig::from_postcard(&card, format!("r{r}"));
            rc.create = (r == 0).then(CreateOptions::default);
            let mut order = addrs.clone();
            order.rotate_left(i % addrs.len());
            let (h, events) = client::connect(ClientConfig::new(order, rc), ChatIsland::default())
                .await
                .expect("join");
            let times = Arc::new(Mutex::new(Times::default()));
            tokio::spawn(watch(events, times.clone()));
            all.push((card.contact.session, times));
            if r == 0 {
                let h = Arc::new(h);
                let s = h.clone();
                senders.push(tokio::spawn(async move {
                    let mut k = 0u64;
                    loop {
                        k += 1;
                        if s.send(ChatIsland::payload("r0", &format!("m{k}")))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }));
            } else {
                keep.push(h);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let view = cluster_view(addrs[0]).await;
    let mut homes: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for i in view["islands"].as_array().expect("islands") {
        homes
            .entry(i["home"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(i["session"].as_str().unwrap_or_default().to_string());
    }
    let (victim, sessions) = homes.iter().max_by_key(|(_, s)| s.len()).expect("a home");
    let victim_addr: SocketAddr = view["routers"]
        .as_array()
        .expect("routers")
        .iter()
        .find(|r| r["id"] == victim.as_str())
        .and_then(|r| r["contacts"][0].as_str())
        .and_then(|a| a.parse().ok())
        .expect("victim address");
    let at = routers
        .iter()
        .position(|r| r.1 == victim_addr)
        .expect("victim");
    let killed = Instant::now();
    let _ = routers[at].0 .0.kill();
    let _ = routers[at].0 .0.wait();
    let moved: Vec<&Arc<Mutex<Times>>> = all
        .iter()
        .filter(|(s, _)| sessions.contains(&s.to_string()))
        .map(|(_, t)| t)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let back: Vec<Duration> = loop {
        let done: Vec<Option<Duration>> = moved
            .iter()
            .map(|t| t.lock().expect("times").back.map(|b| b - killed))
            .collect();
        if done.iter().all(Option::is_some) {
            break done.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not come back in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let (p50, p90, max) = percentiles(back.clone());
    println!(
        "\n### Failover: the home of {} of {failover} islands (3 replicas each) killed with SIGKILL\n",
        sessions.len()
    );
    println!("| replicas | first serving again (ms after the kill) | p50 | p90 | last |");
    println!("|---|---|---|---|---|");
    let first = back.iter().min().map_or(0.0, |d| d.as_secs_f64() * 1e3);
    println!(
        "| {} | {first:.0} | {p50:.0} | {p90:.0} | {max:.0} |",
        back.len()
    );
    for s in senders {
        s.abort();
    }
    drop(keep);
    drop(routers);
    let _ = std::fs::remove_dir_all(data);
}

fn main() {
    let islands = arg("--islands", 100);
    let failover = arg("--failover", 12);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(islands, failover));
}
