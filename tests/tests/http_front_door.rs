//! The HTTP front door shares the router's one port with native replicas.

use isthmus_dispatcher::DispatcherConfig;
use isthmus_router::wire::{self, Code, ServerFrame};
use isthmus_tests::{new_island, start_router, HelloOpts, WireReplica, PATIENCE};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one HTTP/1.1 response with a Content-Length body: (status line, body).
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("content-length");
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.expect("read body");
                assert!(n > 0, "closed inside the body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            let status = head.lines().next().unwrap_or_default().to_string();
            return (status, body);
        }
        let n = tokio::time::timeout(PATIENCE, s.read(&mut chunk))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(n > 0, "closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn get(s: &mut TcpStream, path: &str) -> (String, String) {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: router\r\n\r\n").as_bytes())
        .await
        .expect("write request");
    read_response(s).await
}

/// Waits for the peer to close, failing after `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut sink = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_native_replicas_share_the_port() {
    let router = start_router(DispatcherConfig::default()).await;
    let island = new_island();
    let mut a = WireReplica::connect(router.addr, HelloOpts::new(&island, true))
        .await
        .expect("connect");
    a.wait_until(PATIENCE, "synced", |s| s.synced).await;

    // Two requests on one kept-alive connection, while the native session runs.
    let mut http = TcpStream::connect(router.addr).await.expect("connect");
    let (status, body) = get(&mut http, "/no/such/page").await;
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    assert!(body.contains("/no/such/page"), "{body}");
    a.send("between requests").await.expect("send");
    let (status, _) = get(&mut http, "/again").await;
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");

    let mut b = WireReplica::connect(router.addr, HelloOpts::new(&island, false))
        .await
        .expect("connect");
    b.wait_for_seq(1, PATIENCE).await;
    router.shutdown.cancel();
    router.task.await.expect("router ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_head_is_cut_off_at_the_handshake_timeout() {
    let router = start_router(DispatcherConfig {
        handshake_timeout: Duration::from_millis(300),
        ..DispatcherConfig::default()
    })
    .await;
    let mut s = TcpStream::connect(router.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: r")
        .await
        .expect("write");
    assert!(
        closed_within(&mut s, PATIENCE).await,
        "a half-sent request head must not hold the connection"
    );
    // Fewer bytes than it takes to tell the protocols apart: the same timeout.
    let mut s = TcpStream::connect(router.addr).await.expect("connect");
    s.write_all(b"GET").await.expect("write");
    assert!(closed_within(&mut s, PATIENCE).await);
    router.shutdown.cancel();
    router.task.await.expect("router ends");
}

/// A refusal after the router's preamble, if that is what the bytes hold.
fn refusal(bytes: &[u8]) -> Option<Code> {
    let mut rest = bytes::BytesMut::from(bytes.get(wire::ROUTER_PREAMBLE_LEN..)?);
    match wire::decode::<ServerFrame>(&mut rest, wire::DEFAULT_MAX_FRAME_BYTES) {
        Ok(Some(ServerFrame::Refuse { code, .. })) => Some(code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_count_against_the_per_address_cap() {
    let router = start_router(DispatcherConfig {
        max_connections_per_ip: 2,
        ..DispatcherConfig::default()
    })
    .await;
    let addr: SocketAddr = router.addr;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let (status, _) = get(&mut s, "/nothing-here").await;
        assert!(status.starts_with("HTTP/1.1 404"), "{status}");
        held.push(s);
    }
    let mut third = TcpStream::connect(addr).await.expect("connect");
    third.write_all(&wire::preamble()).await.expect("write");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, third.read_to_end(&mut got)).await;
    assert_eq!(refusal(&got), Some(Code::BUSY), "{got:?}");

    // Closing one frees its slot.
    drop(held.pop());
    let island = new_island();
    let mut r = None;
    for _ in 0..50 {
        let mut c = WireReplica::connect(addr, HelloOpts::new(&island, true))
            .await
            .expect("connect");
        let s = c
            .wait_until(PATIENCE, "an answer", |s| s.synced || s.closed.is_some())
            .await;
        if s.synced {
            r = Some(c);
            break;
        }
        // The router may not have seen the close yet.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(r.is_some(), "a freed slot must take a new connection");
    router.shutdown.cancel();
    router.task.await.expect("router ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routers_own_pages_are_read_with_get_only() {
    let router = start_router(DispatcherConfig::default()).await;
    let mut s = TcpStream::connect(router.addr).await.expect("connect");
    s.write_all(b"POST /metrics HTTP/1.1\r\nHost: router\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("write");
    let (status, body) = read_response(&mut s).await;
    assert!(status.starts_with("HTTP/1.1 405"), "{status}");
    assert!(body.contains("GET"), "{body}");
    let (status, _) = get(&mut s, "/status.json").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    router.shutdown.cancel();
    router.task.await.expect("router ends");
}
