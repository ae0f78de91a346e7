//! `/metrics` and `/status.json` count what the router did, and keep counting after sessions end.

use isthmus_dispatcher::DispatcherConfig;
use isthmus_router::wire::{self, ClientFrame, Code};
use isthmus_router::Seq;
use isthmus_tests::{http_request, new_island, start_router, HelloOpts, WireReplica, PATIENCE};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// GETs `path` and returns the body of a 200.
async fn get(addr: SocketAddr, path: &str) -> String {
    let (status, body) = http_request(addr, "router", path).await;
    assert!(status.starts_with("HTTP/1.0 200"), "{status}\n{body}");
    body
}

/// The value of one sample line (`name{labels} value`) of the exposition.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn until_sample(addr: SocketAddr, series: &str, want: f64) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let m = get(addr, "/metrics").await;
        if sample(&m, series) == Some(want) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never became {want}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_survive_their_session_and_refusals_joins_and_divergences_are_counted() {
    let mut cfg = DispatcherConfig::default();
    cfg.driver.session.linger = Duration::from_millis(100);
    let router = start_router(cfg).await;

    // A hello for an island the router does not have.
    let mut stranger = WireReplica::connect(router.addr, HelloOpts::new(&new_island(), false))
        .await
        .expect("connect");
    assert_eq!(stranger.refused(PATIENCE).await, Code::UNKNOWN_SESSION);

    let island = new_island();
    let named = |name: &str, create: bool| {
        let mut opts = HelloOpts::new(&island, create);
        opts.name = name.into();
        opts
    };
    let mut a = WireReplica::connect(router.addr, named("ann", true))
        .await
        .expect("connect");
    a.wait_until(PATIENCE, "synced", |s| s.synced).await;
    for i in 0..5 {
        a.send(format!("m{i}")).await.expect("send");
    }
    a.wait_for_seq(5, PATIENCE).await;
    let mut b = WireReplica::connect(router.addr, named("bob", false))
        .await
        .expect("connect");
    b.wait_for_seq(5, PATIENCE).await;
    b.wait_until(PATIENCE, "synced", |s| s.synced).await;

    let m = until_sample(router.addr, "isthmus_replicas", 2.0).await;
    assert_eq!(sample(&m, "isthmus_sessions"), Some(1.0));
    assert_eq!(sample(&m, "isthmus_messages_stamped_total"), Some(5.0));
    assert_eq!(
        sample(
            &m,
            r#"isthmus_refusals_total{code="2002",name="unknown session"}"#
        ),
        Some(1.0),
        "{m}"
    );
    // Bob joined late (five messages to catch up on); ann, who created the island, did not.
    let m = until_sample(router.addr, "isthmus_late_joins_total", 1.0).await;
    assert_eq!(
        sample(&m, "isthmus_late_join_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            r#"isthmus_late_join_duration_seconds_bucket{le="+Inf"}"#
        ),
        Some(1.0)
    );
    // Five messages to two replicas, at least.
    assert!(
        sample(&m, "isthmus_deliveries_total").is_some_and(|d| d >= 10.0),
        "{m}"
    );
    assert!(sample(&m, "isthmus_sent_bytes_total").is_some_and(|d| d > 0.0));
    assert!(sample(&m, "isthmus_received_bytes_total").is_some_and(|d| d > 0.0));
    assert_eq!(
        sample(
            &m,
            r#"isthmus_forwarding_info{mode="lan-only",protocol=""}"#
        ),
        Some(1.0)
    );

    let status: serde_json::Value =
        serde_json::from_str(&get(router.addr, "/status.json").await).expect("json");
    assert_eq!(status["recent_refusals"][0]["code"], 2002, "{status:#}");
    assert_eq!(status["islands"][0]["seq"], 5);

    // Two replicas disagree about the state after seq 5.
    for (r, hash) in [(&a, "aaaa"), (&b, "bbbb")] {
        let frame = ClientFrame::Digest {
            seq: Seq(5),
            hash: hash.into(),
        };
        r.write_raw(&wire::encode(&frame)).await.expect("digest");
    }
    until_sample(router.addr, "isthmus_divergences_total", 1.0).await;
    let status: serde_json::Value =
        serde_json::from_str(&get(router.addr, "/status.json").await).expect("json");
    let d = &status["recent_divergences"][0];
    assert_eq!(d["what"], "digests differ at seq 5", "{status:#}");
    let who = d["who"].as_str().expect("who");
    assert!(
        who.contains("ann") && who.contains("bob") && who.contains(" | "),
        "{who}"
    );

    // Everyone leaves, the island lingers out: the gauges drop, the counters stay.
    drop((a, b));
    let m = until_sample(router.addr, "isthmus_sessions", 0.0).await;
    assert_eq!(sample(&m, "isthmus_replicas"), Some(0.0));
    assert_eq!(sample(&m, "isthmus_messages_stamped_total"), Some(5.0));
    assert!(sample(&m, "isthmus_deliveries_total").is_some_and(|d| d >= 10.0));
    router.shutdown.cancel();
    router.task.await.expect("router ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_shed_at_a_cap_are_counted_by_cap() {
    let router = start_router(DispatcherConfig {
        max_connections_per_ip: 2,
        ..DispatcherConfig::default()
    })
    .await;
    let other = "127.0.0.2".parse().expect("ip");
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            isthmus_tests::connect_from(other, router.addr)
                .await
                .expect("connect"),
        );
    }
    // Past the cap: answered with busy and closed.
    let mut third = isthmus_tests::connect_from(other, router.addr)
        .await
        .expect("connect");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, third.read_to_end(&mut sink)).await;
    // Scraped from another address, which has room.
    let m = until_sample(
        router.addr,
        r#"isthmus_connections_shed_total{limit="connections_per_ip"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        sample(&m, r#"isthmus_connections_shed_total{limit="connections"}"#),
        Some(0.0)
    );
    drop(held);
    router.shutdown.cancel();
    router.task.await.expect("router ends");
}

/// A web page on the Internet can point a name of its own at the router's LAN address (DNS
/// rebinding) and read the status through the browser of someone on the LAN: the peer address
/// is then a LAN one, so under `lan` the name the request uses must be a local one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_rebinds_its_own_name_to_the_router_is_refused() {
    let router = start_router(DispatcherConfig::default()).await;
    for path in ["/", "/status.json", "/status.fragment", "/metrics"] {
        let (status, body) = http_request(router.addr, "rebind.attacker.example:7470", path).await;
        assert!(
            status.starts_with("HTTP/1.0 403"),
            "{path}: {status}\n{body}"
        );
        assert!(
            body.contains("\"rebind.attacker.example:7470\"") && body.contains("--status-from any"),
            "{body}"
        );
        for host in [
            router.addr.to_string(),
            "localhost".into(),
            "cabin.local".into(),
        ] {
            let (status, body) = http_request(router.addr, &host, path).await;
            assert!(
                status.starts_with("HTTP/1.0 200"),
                "{host}{path}: {status}\n{body}"
            );
        }
    }
    router.shutdown.cancel();
    router.task.await.expect("router ends");
}
