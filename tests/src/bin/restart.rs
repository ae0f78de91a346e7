//! `target/release/restart`: how long a lone router's islands are away when the router is
//! killed with SIGKILL and started again on the same port (issue 14).
//!
//! Starts `isthmus router` (the binary next to this one: build both with
//! `cargo build --release -p isthmus --bin isthmus -p isthmus-tests --bin restart`), puts
//! ISLANDS islands of REPLICAS island-client replicas on it (one sender per island, 100
//! messages a second), kills the router with SIGKILL, starts it again on the same port at once,
//! and times, for every replica, from the kill to its first `Synced` after it: the moment it is
//! serving again (its island re-created, its state caught up). Printed as a Markdown table, one
//! row per round. Replicas use the client's default reconnect back-off (500 ms, with jitter),
//! which is most of the figure.
//!
//! `restart [--rounds N] [--islands N] [--replicas N]`

use isthmus_contact::{ContactPoint, Postcard};
use isthmus_island_client::chat::ChatIsland;
use isthmus_island_client::client::{self, ClientHandle};
use isthmus_island_client::{ClientConfig, Event, ReplicaConfig};
use isthmus_router::auth::Capability;
use isthmus_router::ids::SessionId;
use isthmus_router::wire::CreateOptions;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `isthmus router` on 127.0.0.1:`port` (0: any), and the address it reports.
fn router(port: u16, data: &std::path::Path) -> (Child, SocketAddr) {
    let bin = std::env::current_exe()
        .expect("own path")
        .with_file_name("isthmus");
    let mut child = Command::new(&bin)
        .args([
            "router",
            "--listen",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--no-beacon",
            "--no-croquet",
            // Every replica comes from 127.0.0.1 here, where real ones come from many addresses.
            "--max-connections-per-ip",
            "10000",
            "--max-handshakes-per-ip",
            "10000",
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
    (child, addr)
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
            Event::Disconnected { .. } => {
                t.lost = Some(now);
                t.back = None;
            }
            Event::Synced { .. } if t.lost.is_some() && t.back.is_none() => t.back = Some(now),
            Event::SessionLost { reason } => panic!("a replica lost its island: {reason}"),
            _ => {}
        }
    }
}

async fn round(islands: usize, replicas: usize) -> (f64, f64, f64, f64) {
    let data = std::env::temp_dir().join(format!("isthmus-restart-{}", uuid::Uuid::new_v4()));
    let (mut first, addr) = router(0, &data);
    let mut handles: Vec<Arc<ClientHandle<ChatIsland>>> = Vec::new();
    // Dropping a handle makes its replica leave: the listeners are kept here.
    let mut listeners = Vec::new();
    let mut all = Vec::new();
    for _ in 0..islands {
        let contact = ContactPoint::new(SessionId::random(), "bench", vec![]);
        let card = Postcard::for_new_island(contact, Capability::new_island()).expect("card");
        for r in 0..replicas {
            let mut rc = ReplicaConfig::from_postcard(&card, format!("r{r}"));
            rc.create = (r == 0).then(CreateOptions::default);
            let (h, events) =
                client::connect(ClientConfig::new(vec![addr], rc), ChatIsland::default())
                    .await
                    .expect("join");
            let times = Arc::new(Mutex::new(Times::default()));
            tokio::spawn(watch(events, times.clone()));
            all.push(times);
            if r == 0 {
                handles.push(Arc::new(h));
            } else {
                listeners.push(h);
            }
        }
    }
    let senders: Vec<_> = handles
        .iter()
        .map(|h| {
            let h = h.clone();
            tokio::spawn(async move {
                let mut k = 0u64;
                loop {
                    k += 1;
                    if h.send(ChatIsland::payload("r0", &format!("m{k}")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    let _ = first.kill();
    let _ = first.wait();
    let (mut second, again) = router(addr.port(), &data);
    let ready = killed.elapsed().as_secs_f64() * 1e3;
    assert_eq!(again, addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    let back: Vec<f64> = loop {
        let done: Vec<Option<f64>> = all
            .iter()
            .map(|t| {
                let t = *t.lock().expect("times");
                t.back.map(|b| (b - killed).as_secs_f64() * 1e3)
            })
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
    for s in senders {
        s.abort();
    }
    let _ = second.kill();
    let _ = second.wait();
    let _ = std::fs::remove_dir_all(data);
    drop(listeners);
    let mut sorted = back.clone();
    sorted.sort_by(f64::total_cmp);
    let p50 = sorted[sorted.len() / 2];
    let max = sorted[sorted.len() - 1];
    let min = sorted[0];
    (ready, min, p50, max)
}

fn main() {
    let rounds = arg("--rounds", 5);
    let islands = arg("--islands", 10);
    let replicas = arg("--replicas", 4);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("| round | islands x replicas | router ready again (ms after the kill) | first replica serving | p50 | last replica serving |");
    println!("|---|---|---|---|---|---|");
    for r in 1..=rounds {
        let (ready, min, p50, max) = rt.block_on(round(islands, replicas));
        println!("| {r} | {islands} x {replicas} | {ready:.0} | {min:.0} | {p50:.0} | {max:.0} |");
    }
}
