//! `cargo run --release -p isthmus-tests --bin bench`: router throughput, printed as a table.
//!
//! Two measurements:
//! - **core**: the sans-IO session core alone, stamping sends and fanning them out to N
//!   members (encoding included, no sockets): the ceiling the driver works under.
//! - **loopback**: a real router on 127.0.0.1, one sender and N-1 more replicas as raw wire
//!   clients that only count message frames. Deliveries/s counts every copy delivered.
//!
//! Both run on this machine's cores alongside the clients, so loopback figures include the
//! clients' own cost. See BENCHMARKS.md for figures and how they were taken.

use bytes::{Bytes, BytesMut};
use isthmus_dispatcher::DispatcherConfig;
use isthmus_router::auth::{self, Capability};
use isthmus_router::ids::{ConnId, ReplicaId};
use isthmus_router::session::{JoinRequest, Output, Session, SessionConfig};
use isthmus_router::wire::{self, ClientFrame, Role};
use isthmus_tests::{exchange_preambles, keys_of, start_router, HelloOpts};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn core_bench(members: usize, payload: usize, messages: u64) -> (f64, f64) {
    let now = Instant::now();
    let cfg = SessionConfig {
        max_outbound_bytes: usize::MAX / 16,
        max_history_messages: usize::MAX / 16,
        max_history_bytes: usize::MAX / 16,
        ..SessionConfig::default()
    };
    let keys = keys_of(&Capability::new_island());
    let mut s = Session::new(keys.session_id(), keys, cfg, now);
    for i in 0..members {
        s.handle_join(
            ConnId(i as u64),
            JoinRequest {
                replica: ReplicaId::random(),
                name: String::new(),
                role: Role::Replica,
                resume_from: None,
                contacts: Default::default(),
                created: i == 0,
                nonce: auth::fresh_nonce(),
                control: false,
            },
            now,
        );
    }
    while s.poll_output().is_some() {}
    let body = Bytes::from(vec![7u8; payload]);
    let mut delivered = 0u64;
    let mut bytes = vec![0usize; members];
    let start = Instant::now();
    for k in 1..=messages {
        s.handle_frame(
            ConnId(0),
            ClientFrame::Send {
                client_seq: k,
                payload: body.clone(),
            },
            now,
        );
        while let Some(o) = s.poll_output() {
            if let Output::Transmit { conn, frame } = o {
                delivered += 1;
                bytes[conn.0 as usize] += frame.len();
            }
        }
        // Credit writes now and then, as the driver's writers would.
        if k % 256 == 0 {
            for (i, b) in bytes.iter_mut().enumerate() {
                s.handle_flushed(ConnId(i as u64), std::mem::take(b), now);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    (messages as f64 / secs, delivered as f64 / secs)
}

/// A replica on a raw socket that counts message frames (variant 2) as they arrive.
async fn counting_replica(
    addr: std::net::SocketAddr,
    island: &Capability,
    create: bool,
    counter: Arc<AtomicU64>,
) -> tokio::net::tcp::OwnedWriteHalf {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let nonce = exchange_preambles(&mut stream).await.expect("preambles");
    let mut opts = HelloOpts::new(island, create);
    opts.name = "bench".into();
    let (mut r, mut w) = stream.into_split();
    let hello = wire::encode(&ClientFrame::Hello(opts.sign(&nonce)));
    w.write_all(&hello).await.expect("hello");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(1 << 20);
        let mut ready = Some(ready_tx);
        loop {
            // Walk complete frames by their length prefix; look only at the variant byte.
            let mut at = 0;
            let mut n = 0;
            while buf.len() >= at + 4 {
                let len =
                    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
                if buf.len() < at + 4 + len {
                    break;
                }
                match buf[at + 4] {
                    2 => n += 1,
                    7 => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    _ => {}
                }
                at += 4 + len;
            }
            let _ = buf.split_to(at);
            counter.fetch_add(n, Ordering::Relaxed);
            buf.reserve(256 * 1024);
            match r.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    ready_rx.await.expect("synced");
    w
}

async fn loopback_bench(replicas: usize, payload: usize, messages: u64) -> (f64, f64) {
    let mut cfg = DispatcherConfig::default();
    // Room for a burst: this measures throughput, not the slow-consumer policy.
    cfg.driver.session.max_outbound_bytes = 256 * 1024 * 1024;
    cfg.driver.session.max_history_messages = usize::MAX / 16;
    cfg.driver.session.max_history_bytes = usize::MAX / 16;
    let router = start_router(cfg).await;
    let island = Capability::new_island();
    let counters: Vec<Arc<AtomicU64>> =
        (0..replicas).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut sender = counting_replica(router.addr, &island, true, counters[0].clone()).await;
    let mut others = Vec::new();
    for c in &counters[1..] {
        others.push(counting_replica(router.addr, &island, false, c.clone()).await);
    }
    let mut batch = BytesMut::new();
    let body = Bytes::from(vec![7u8; payload]);
    let frames: Vec<Bytes> = (1..=messages)
        .map(|k| {
            wire::encode(&ClientFrame::Send {
                client_seq: k,
                payload: body.clone(),
            })
        })
        .collect();
    let start = Instant::now();
    let own = counters[0].clone();
    let window = 20_000u64;
    for (k, f) in frames.iter().enumerate() {
        batch.extend_from_slice(f);
        if batch.len() >= 64 * 1024 || k + 1 == frames.len() {
            sender.write_all(&batch).await.expect("send");
            batch.clear();
            // Keep at most `window` messages in flight, as a real client would.
            while (k as u64 + 1).saturating_sub(own.load(Ordering::Relaxed)) > window {
                tokio::task::yield_now().await;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while counters
        .iter()
        .any(|c| c.load(Ordering::Relaxed) < messages)
    {
        assert!(Instant::now() < deadline, "bench stalled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    router.shutdown.cancel();
    let _ = router.task.await;
    drop(others);
    (
        messages as f64 / secs,
        (messages * replicas as u64) as f64 / secs,
    )
}

fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else {
        format!("{:.0}k", x / 1e3)
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    println!("| bench | replicas | payload B | messages | msgs/s | deliveries/s |");
    println!("|---|---|---|---|---|---|");
    for (members, payload) in [(4, 64), (16, 64), (64, 64), (16, 1024)] {
        let messages = 200_000 / scale;
        let (m, d) = core_bench(members, payload, messages);
        println!(
            "| core | {members} | {payload} | {messages} | {} | {} |",
            human(m),
            human(d)
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for (replicas, payload) in [(4, 64), (16, 64), (64, 64), (16, 1024)] {
        let messages = 200_000 / scale as u64;
        let (m, d) = rt.block_on(loopback_bench(replicas, payload, messages));
        println!(
            "| loopback | {replicas} | {payload} | {messages} | {} | {} |",
            human(m),
            human(d)
        );
    }
}
