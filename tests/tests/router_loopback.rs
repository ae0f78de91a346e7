//! The router end to end over real loopback sockets, with raw wire replicas.

use bytes::{BufMut, Bytes, BytesMut};
use isthmus_dispatcher::DispatcherConfig;
use isthmus_router::ids::SessionId;
use isthmus_router::wire::{self, Code, JoinToken, Origin, ServerFrame};
use isthmus_tests::{start_router, HelloOpts, WireReplica, PATIENCE};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn join(addr: std::net::SocketAddr, session: SessionId, create: bool) -> WireReplica {
    let mut r = WireReplica::connect(addr, HelloOpts::new(session, create))
        .await
        .expect("connect");
    r.wait_until(PATIENCE, "synced", |s| s.synced).await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_share_one_order_and_a_late_joiner_catches_up() {
    let router = start_router(DispatcherConfig::default()).await;
    let session = SessionId::random();
    let mut replicas = vec![join(router.addr, session, true).await];
    for _ in 0..3 {
        replicas.push(join(router.addr, session, false).await);
    }
    let mut senders = Vec::new();
    for (i, mut r) in replicas.into_iter().enumerate() {
        senders.push(tokio::spawn(async move {
            for k in 0..200 {
                r.send(format!("r{i}-{k}")).await.expect("send");
                if k % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            r
        }));
    }
    // A fifth replica joins while the others are still sending.
    let mut observer_side = WireReplica::connect(router.addr, HelloOpts::new(session, false))
        .await
        .expect("connect");
    let mut replicas = Vec::new();
    for s in senders {
        replicas.push(s.await.expect("sender task"));
    }
    replicas.push({
        observer_side
            .wait_until(PATIENCE, "synced", |s| s.synced)
            .await;
        observer_side
    });
    let mut logs = Vec::new();
    for r in replicas.iter_mut() {
        let s = r.wait_for_seq(800, PATIENCE).await;
        assert!(s.violations.is_empty(), "violations: {:?}", s.violations);
        logs.push(s.log);
    }
    let first = &logs[0];
    assert_eq!(first.len(), 800);
    for (k, m) in first.iter().enumerate() {
        assert_eq!(m.seq.0, k as u64 + 1, "seq 1..800 without gaps");
        if k > 0 {
            assert!(m.time >= first[k - 1].time, "router time never decreases");
        }
    }
    for (i, log) in logs.iter().enumerate() {
        let view: Vec<_> = log
            .iter()
            .map(|m| (m.seq, m.origin, m.payload.clone()))
            .collect();
        let expect: Vec<_> = first
            .iter()
            .map(|m| (m.seq, m.origin, m.payload.clone()))
            .collect();
        assert_eq!(view, expect, "replica {i} saw a different order");
    }
    // Each sender's messages appear in the order it sent them.
    for (i, r) in replicas.iter().take(4).enumerate() {
        let mine: Vec<Bytes> = first
            .iter()
            .filter(|m| m.origin == Origin::Replica(r.id))
            .map(|m| m.payload.clone())
            .collect();
        let sent: Vec<Bytes> = (0..200).map(|k| Bytes::from(format!("r{i}-{k}"))).collect();
        assert_eq!(mine, sent);
    }
    router.shutdown.cancel();
    router.task.await.expect("router ends");
}

/// Reads until EOF (or the limit) and returns what arrived.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out))
        .await
        .expect("the router closes the connection")
        .ok();
    out
}

fn refusal(bytes: &[u8]) -> Option<Code> {
    if bytes.len() < wire::PREAMBLE_LEN {
        return None;
    }
    let mut buf = BytesMut::from(&bytes[wire::PREAMBLE_LEN..]);
    match wire::decode::<ServerFrame>(&mut buf, usize::MAX) {
        Ok(Some(ServerFrame::Refuse { code, .. })) => Some(code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_or_closed_and_a_good_session_carries_on() {
    let cfg = DispatcherConfig {
        handshake_timeout: Duration::from_millis(500),
        ..DispatcherConfig::default()
    };
    let router = start_router(cfg).await;
    let addr = router.addr;
    let session = SessionId::random();
    let mut a = join(addr, session, true).await;
    let mut b = join(addr, session, false).await;
    let traffic = tokio::spawn(async move {
        for k in 0..300 {
            a.send(format!("a{k}")).await.expect("send");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        a
    });

    // Not Isthmus at all: closed without an answer.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    assert!(read_to_close(&mut s).await.is_empty());

    // Random garbage.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8])
        .await
        .expect("write");
    assert!(read_to_close(&mut s).await.is_empty());

    // A future protocol version: our preamble, then a fatal refusal.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&wire::preamble_for(99)).await.expect("write");
    let got = read_to_close(&mut s).await;
    assert_eq!(&got[..wire::PREAMBLE_LEN], &wire::preamble());
    assert_eq!(refusal(&got), Some(Code::UNSUPPORTED_VERSION));

    // A length prefix far over the limit: refused before any body is read.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut bytes = BytesMut::from(&wire::preamble()[..]);
    bytes.put_u32(0xffff_fff0);
    s.write_all(&bytes).await.expect("write");
    let code = refusal(&read_to_close(&mut s).await).expect("a refusal");
    assert!(!code.is_retryable(), "{code:?}");

    // A well-sized frame that is not a frame.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut bytes = BytesMut::from(&wire::preamble()[..]);
    bytes.put_u32(6);
    bytes.put_slice(&[0xff; 6]);
    s.write_all(&bytes).await.expect("write");
    assert_eq!(refusal(&read_to_close(&mut s).await), Some(Code::MALFORMED));

    // Nothing at all: closed once the handshake timeout passes.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    assert!(read_to_close(&mut s).await.is_empty());

    // A preamble and then silence: refused for the timeout.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&wire::preamble()).await.expect("write");
    assert_eq!(
        refusal(&read_to_close(&mut s).await),
        Some(Code::HANDSHAKE_TIMEOUT)
    );

    // The wrong token for the live session.
    let mut opts = HelloOpts::new(session, false);
    opts.token = JoinToken([1; 32]);
    let mut wrong = WireReplica::connect(addr, opts).await.expect("connect");
    let s = wrong
        .wait_until(PATIENCE, "refusal", |s| s.closed.is_some())
        .await;
    assert_eq!(s.closed.map(|c| c.0), Some(Code::BAD_TOKEN));

    // A session that does not exist, without asking to create it.
    let mut lost = WireReplica::connect(addr, HelloOpts::new(SessionId::random(), false))
        .await
        .expect("connect");
    let s = lost
        .wait_until(PATIENCE, "refusal", |s| s.closed.is_some())
        .await;
    assert_eq!(s.closed.map(|c| c.0), Some(Code::UNKNOWN_SESSION));

    // A member of the good session that turns to garbage is closed; the others are not.
    let mut rogue = join(addr, session, false).await;
    rogue
        .write_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .expect("write");
    let s = rogue.wait_until(PATIENCE, "goodbye", |s| s.ended).await;
    assert_eq!(s.closed.map(|c| c.0), Some(Code::MALFORMED));

    let a = traffic.await.expect("traffic task");
    let _ = a;
    let s = b.wait_for_seq(300, PATIENCE).await;
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    assert!(s.closed.is_none(), "the good replica was not disturbed");
    assert_eq!(s.log.len(), 300);
    router.shutdown.cancel();
    router.task.await.expect("router ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_says_goodbye_to_every_replica() {
    let router = start_router(DispatcherConfig::default()).await;
    let session = SessionId::random();
    let mut a = join(router.addr, session, true).await;
    let mut b = join(router.addr, session, false).await;
    router.shutdown.cancel();
    router.task.await.expect("router ends");
    for r in [&mut a, &mut b] {
        let s = r.wait_until(PATIENCE, "goodbye", |s| s.ended).await;
        assert_eq!(s.closed.map(|c| c.0), Some(Code::SHUTTING_DOWN));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_reading_is_cut_off_without_stalling_the_session() {
    let mut cfg = DispatcherConfig::default();
    cfg.driver.session.max_outbound_bytes = 1024 * 1024;
    let router = start_router(cfg).await;
    let session = SessionId::random();
    let mut fast = join(router.addr, session, true).await;
    // The slow replica completes its handshake and then never reads again.
    let mut slow = TcpStream::connect(router.addr).await.expect("connect");
    slow.write_all(&wire::preamble()).await.expect("write");
    let hello = HelloOpts::new(session, false);
    let frame = wire::ClientFrame::Hello(wire::Hello {
        session,
        token: hello.token,
        replica: hello.replica,
        name: "slow".into(),
        role: wire::Role::Replica,
        resume_from: None,
        create: None,
    });
    slow.write_all(&wire::encode(&frame)).await.expect("write");
    let payload = Bytes::from(vec![7u8; 1024]);
    let n = 20_000; // 20 MB: far more than socket buffers and the 1 MiB bound
    let sender = tokio::spawn(async move {
        for k in 0..n {
            fast.send(payload.clone()).await.expect("send");
            // A well-behaved replica: never more than 256 of its own messages unread.
            if k % 128 == 0 && k >= 256 {
                fast.wait_for_seq(k - 256, PATIENCE).await;
            }
        }
        fast
    });
    let mut fast = sender.await.expect("sender");
    let s = fast.wait_for_seq(n, PATIENCE).await;
    assert!(s.violations.is_empty());
    assert!(s.closed.is_none());
    // The slow one was disconnected: draining its socket ends in EOF, not in all n messages.
    let mut drained = Vec::new();
    tokio::time::timeout(PATIENCE, slow.read_to_end(&mut drained))
        .await
        .expect("the slow replica's connection was closed")
        .ok();
    assert!(
        drained.len() < n as usize * 1024,
        "it did not get everything"
    );
    router.shutdown.cancel();
    router.task.await.expect("router ends");
}
