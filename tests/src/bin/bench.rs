//! `cargo run --release -p isthmus-tests --bin bench`: router throughput, printed as a table.
//!
//! Two measurements:
//! - **core**: the sans-IO session core alone, stamping sends and fanning them out to N
//!   members (encoding included, no sockets): the ceiling the driver works under.
//! - **loopback**: a real router on 127.0.0.1, one sender and N-1 more replicas as raw wire
//!   clients that only count message frames. Deliveries/s counts every copy delivered.
//!
//! Both run on this machine's cores alongside the clients, so loopback figures include the
//! clients' own cost. A second table gives what safety costs: signing and verifying a hello,
//! a whole join over loopback (hello to welcome) and the CPU it takes, how fast a flood from one
//! address is turned away, and how long postcards are. See BENCHMARKS.md for figures and how they
//! were taken.

use bytes::{Bytes, BytesMut};
use isthmus_dispatcher::DispatcherConfig;
use isthmus_router::auth::{self, Capability};
use isthmus_router::ids::{ConnId, ReplicaId, RouterTime, Seq};
use isthmus_router::session::{JoinRequest, Output, Session, SessionConfig};
use isthmus_router::wire::{self, ClientFrame, Message, Origin, Role, ServerFrame};
use isthmus_tests::{exchange_preambles, keys_of, start_router, HelloOpts, WireReplica};
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
                recover: None,
                cluster: Vec::new(),
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

/// Per second: `Send` frames taken off a read buffer by the reader's path (`wire::decode`), the
/// same frames decoded by serde alone (`wire::decode_body`, which copies each payload out), and
/// message frames encoded (`wire::encode`). Each round copies a read's worth of frames into a
/// fresh buffer first, as a socket read does, in both decode columns.
fn codec_bench(payload: usize, frames: usize) -> (f64, f64, f64) {
    let one = wire::encode(&ClientFrame::Send {
        client_seq: 1_000_000,
        payload: Bytes::from(vec![7u8; payload]),
    });
    let per_read = (64 * 1024 / one.len()).clamp(1, 64);
    let block: Vec<u8> = one
        .iter()
        .copied()
        .cycle()
        .take(one.len() * per_read)
        .collect();
    let rounds = (frames / per_read).max(1);
    let done = (rounds * per_read) as f64;
    let mut seen = 0usize;
    let start = Instant::now();
    for _ in 0..rounds {
        let mut buf = BytesMut::from(&block[..]);
        while let Ok(Some(ClientFrame::Send { payload, .. })) =
            wire::decode::<ClientFrame>(&mut buf, usize::MAX)
        {
            seen += payload.len();
        }
    }
    let reader = done / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..rounds {
        let buf = BytesMut::from(&block[..]);
        let mut at = 0;
        while at + 4 <= buf.len() {
            let len = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            if let Ok(ClientFrame::Send { payload, .. }) =
                wire::decode_body::<ClientFrame>(&buf[at + 4..at + 4 + len])
            {
                seen += payload.len();
            }
            at += 4 + len;
        }
    }
    let serde = done / start.elapsed().as_secs_f64();
    assert_eq!(seen, 2 * rounds * per_read * payload, "every frame decoded");
    let message = Message {
        seq: Seq(1),
        time: RouterTime(123_456),
        origin: Origin::Replica(ReplicaId::random()),
        client_seq: 1_000,
        payload: Bytes::from(vec![7u8; payload]),
    };
    let start = Instant::now();
    for k in 0..frames as u64 {
        let frame = wire::encode(&ServerFrame::Message(Message {
            seq: Seq(k),
            ..message.clone()
        }));
        seen += std::hint::black_box(frame).len();
    }
    let encode = frames as f64 / start.elapsed().as_secs_f64();
    std::hint::black_box(seen);
    (reader, serde, encode)
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

/// CPU seconds this process has used (user + system), from /proc: the bench's router and
/// clients share the process, so per-join CPU includes the client's signing.
fn cpu_seconds() -> f64 {
    isthmus_tests::process_cpu_seconds("self")
}

/// CPU seconds of this process's threads whose name starts with `prefix` (from
/// /proc/self/task): the router's own CPU when its runtime's threads are named apart.
fn thread_cpu_seconds(prefix: &str) -> f64 {
    let mut total = 0.0;
    for e in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if let Some((name, cpu)) = isthmus_tests::stat_cpu_seconds(&stat) {
            if name.starts_with(prefix) {
                total += cpu;
            }
        }
    }
    total
}

/// One Croquet session of `clients` WebSocket clients: client 0 SENDs `messages` JSON frames
/// (64-character payloads, as Croquet's encrypted payloads are strings), every client counts
/// the RECVs. The router runs on its own one-thread runtime (threads named "isthmus-rt"), the
/// clients on another. Returns (out messages/s, router CPU s per million out, router out
/// messages per CPU second).
fn croquet_bench(clients: usize, messages: u64) -> (f64, f64, f64) {
    use isthmus_tests::croquet::{join_args, CroquetClient};
    let router_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("isthmus-rt")
        .enable_all()
        .build()
        .expect("router runtime");
    let mut cfg = DispatcherConfig::default();
    cfg.driver.session.max_outbound_bytes = 256 * 1024 * 1024;
    cfg.driver.session.max_history_messages = usize::MAX / 16;
    cfg.driver.session.max_history_bytes = usize::MAX / 16;
    let router = router_rt.block_on(start_router(cfg));
    let addr = router.addr;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-clients")
        .enable_all()
        .build()
        .expect("client runtime");
    let result = client_rt.block_on(async move {
        let counters: Vec<Arc<AtomicU64>> =
            (0..clients).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let mut sender = None;
        for (i, counter) in counters.iter().enumerate() {
            let mut c = CroquetClient::connect(addr, "bench").await;
            c.send("JOIN", join_args(&format!("u{i}"))).await;
            c.next_action("SYNC", Duration::from_secs(10)).await;
            if i == 0 {
                sender = Some(c);
                continue;
            }
            let counter = counter.clone();
            tokio::spawn(async move {
                loop {
                    match c.next_text().await {
                        isthmus_tests::croquet::Got::Text(t) => {
                            if t.contains("\"action\":\"RECV\"") && !t.contains("\"what\"") {
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => return,
                    }
                }
            });
        }
        let mut sender = sender.expect("sender");
        let payload = "x".repeat(64);
        let frame = format!(r#"{{"id":"bench","action":"SEND","args":[0,0,"{payload}",12]}}"#);
        let own = counters[0].clone();
        // The sender reads its own RECVs on a second connection's worth of work: count them
        // here between batches.
        let window = 20_000u64;
        let start = Instant::now();
        let cpu0 = thread_cpu_seconds("isthmus-rt");
        let mut sent = 0u64;
        while sent < messages {
            let batch = 256.min(messages - sent);
            for _ in 0..batch {
                sender.feed(frame.clone()).await;
            }
            sender.flush().await;
            sent += batch;
            while sent.saturating_sub(own.load(Ordering::Relaxed)) > window {
                match sender.next_within(Duration::from_secs(10)).await {
                    Some(isthmus_tests::croquet::Got::Json(v)) => {
                        if v["action"] == "RECV" && v["args"][2].is_string() {
                            own.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    other => panic!("sender lost its connection: {other:?}"),
                }
            }
        }
        while own.load(Ordering::Relaxed) < messages {
            match sender.next_within(Duration::from_secs(10)).await {
                Some(isthmus_tests::croquet::Got::Json(v)) => {
                    if v["action"] == "RECV" && v["args"][2].is_string() {
                        own.fetch_add(1, Ordering::Relaxed);
                    }
                }
                other => panic!("sender lost its connection: {other:?}"),
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while counters
            .iter()
            .any(|c| c.load(Ordering::Relaxed) < messages)
        {
            assert!(Instant::now() < deadline, "croquet bench stalled");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = thread_cpu_seconds("isthmus-rt") - cpu0;
        let out = (messages * clients as u64) as f64;
        (out / secs, cpu * 1e6 / out, out / cpu)
    });
    router.shutdown.cancel();
    let _ = router_rt.block_on(router.task);
    result
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Signing and verifying a hello, in microseconds each.
fn hello_crypto(n: u32) -> (f64, f64) {
    let admin = Capability::new_island();
    let keys = keys_of(&admin);
    let part = admin.derive(Role::Replica).expect("participant");
    let me = auth::KeyPair::random();
    let nonce = auth::fresh_nonce();
    let body = wire::HelloBody {
        session: keys.session_id(),
        keys,
        replica: auth::replica_id_for(&me.public()),
        replica_key: me.public(),
        name: "bench".into(),
        role: Role::Replica,
        resume_from: None,
        create: None,
        control: false,
        recover: None,
    };
    let role_key = part.key_pair();
    let start = Instant::now();
    let mut hello = None;
    for _ in 0..n {
        hello = Some(auth::sign_hello(&nonce, body.clone(), &role_key, &me));
    }
    let sign = start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    let hello = hello.expect("signed");
    let start = Instant::now();
    for _ in 0..n {
        auth::verify_hello(&nonce, &hello).expect("verifies");
    }
    let verify = start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    (sign, verify)
}

/// Joins one after another into a live island over loopback: hello to welcome, p50 and p99 in
/// ms, and the process's CPU per join in microseconds.
async fn join_bench(joins: usize) -> (f64, f64, f64) {
    let router = start_router(DispatcherConfig::default()).await;
    let island = Capability::new_island();
    let mut first = WireReplica::connect(router.addr, HelloOpts::new(&island, true))
        .await
        .expect("connect");
    first
        .wait_until(Duration::from_secs(10), "synced", |s| s.synced)
        .await;
    let mut times = Vec::with_capacity(joins);
    let cpu = cpu_seconds();
    for _ in 0..joins {
        let start = Instant::now();
        let mut r = WireReplica::connect(router.addr, HelloOpts::new(&island, false))
            .await
            .expect("connect");
        r.wait_until(Duration::from_secs(10), "welcome", |s| s.welcome.is_some())
            .await;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let cpu_per_join = (cpu_seconds() - cpu) * 1e6 / joins as f64;
    router.shutdown.cancel();
    let _ = router.task.await;
    times.sort_by(f64::total_cmp);
    (
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        cpu_per_join,
    )
}

/// One address opens `n` connections at once against a per-address bound of 64: how many get
/// 1002 busy, and how long until the last of them had its answer (ms).
async fn shed_bench(n: usize) -> (usize, f64) {
    let router = start_router(DispatcherConfig {
        max_connections_per_ip: 64,
        ..DispatcherConfig::default()
    })
    .await;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let addr = router.addr;
        tasks.spawn(async move {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                return false;
            };
            if s.write_all(&wire::preamble()).await.is_err() {
                return false;
            }
            let mut buf = vec![0u8; 512];
            let mut got = 0;
            // A refused connection gets the router's preamble and a Refuse at once; an admitted
            // one waits for a hello that never comes.
            loop {
                match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf[got..])).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(k)) => got += k,
                }
                if got > wire::ROUTER_PREAMBLE_LEN + 5 {
                    break;
                }
            }
            got > wire::ROUTER_PREAMBLE_LEN + 4 && buf[wire::ROUTER_PREAMBLE_LEN + 4] == 1
        });
    }
    let mut shed = 0;
    let mut last = 0.0f64;
    while let Some(refused) = tasks.join_next().await {
        if refused.unwrap_or(false) {
            shed += 1;
            last = last.max(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    router.shutdown.cancel();
    let _ = router.task.await;
    (shed, last)
}

fn postcard_sizes() -> Vec<(String, usize)> {
    let contact = isthmus_contact::ContactPoint::new(
        isthmus_router::ids::SessionId::random(),
        "garden",
        vec!["192.168.1.20:7470".parse().expect("addr")],
    );
    let mut admin = isthmus_contact::Postcard::for_new_island(contact, Capability::new_island())
        .expect("postcard");
    admin.contact.external = Some("203.0.113.9:7470".parse().expect("addr"));
    admin.contact.router = Some(uuid::Uuid::new_v4());
    let part = admin.participant().expect("participant");
    let obs = admin.observer().expect("observer");
    vec![
        ("admin".into(), admin.to_string().len()),
        ("participant".into(), part.to_string().len()),
        ("observer".into(), obs.to_string().len()),
    ]
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
    if std::env::args().any(|a| a == "--croquet") {
        // Only the Croquet row.
        let messages = 100_000 / scale as u64;
        let (rate, cpu_per_m, per_core) = croquet_bench(20, messages);
        println!(
            "| croquet (JSON over WebSocket) | 20 | {messages} | {} | {cpu_per_m:.2} | {} |",
            human(rate),
            human(per_core)
        );
        return;
    }
    println!("| bench | replicas | payload B | messages | msgs/s | deliveries/s |");
    println!("|---|---|---|---|---|---|");
    for (members, payload) in [(4, 64), (16, 64), (64, 64), (16, 1024), (4, 16384)] {
        // The large-payload row stamps fewer messages: it measures copies, not the count.
        let messages = if payload > 1024 { 50_000 } else { 200_000 } / scale;
        let (m, d) = core_bench(members, payload, messages);
        println!(
            "| core | {members} | {payload} | {messages} | {} | {} |",
            human(m),
            human(d)
        );
    }
    println!();
    println!("| codec | payload B | frames | decoded/s (reader's path) | decoded/s (serde, copies) | message frames encoded/s |");
    println!("|---|---|---|---|---|---|");
    for payload in [64, 1024, 16384] {
        let frames = if payload > 1024 { 100_000 } else { 1_000_000 } / scale;
        let (reader, serde, encode) = codec_bench(payload, frames as usize);
        println!(
            "| codec | {payload} | {frames} | {} | {} | {} |",
            human(reader),
            human(serde),
            human(encode)
        );
    }
    if std::env::args().any(|a| a == "--core") {
        // Only the core rows: the encoding and the core's bookkeeping, without sockets.
        return;
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
    println!();
    println!("| croquet bench | clients | messages | out msgs/s | router CPU s per million out | out msgs per router CPU s |");
    println!("|---|---|---|---|---|---|");
    let messages = 100_000 / scale as u64;
    let (rate, cpu_per_m, per_core) = croquet_bench(20, messages);
    println!(
        "| croquet (JSON over WebSocket) | 20 | {messages} | {} | {cpu_per_m:.2} | {} |",
        human(rate),
        human(per_core)
    );
    println!();
    println!("| safety | figure |");
    println!("|---|---|");
    let (sign, verify) = hello_crypto(2_000 / scale as u32);
    println!("| sign a hello (participant key + replica key) | {sign:.1} us |");
    println!("| verify a hello (router, per join) | {verify:.1} us |");
    let (p50, p99, cpu) = rt.block_on(join_bench(1_000 / scale as usize));
    println!("| join over loopback, hello to welcome | p50 {p50:.2} ms, p99 {p99:.2} ms |");
    println!("| CPU per join (router and client in one process) | {cpu:.0} us |");
    let (shed, ms) = rt.block_on(shed_bench(1_000));
    println!(
        "| 1,000 connections from one address, bound 64 | {shed} refused with 1002, the last after {ms:.0} ms |"
    );
    for (role, len) in postcard_sizes() {
        println!("| {role} postcard (1 internal + 1 external address) | {len} characters |");
    }
}
