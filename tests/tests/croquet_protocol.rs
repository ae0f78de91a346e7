//! The Croquet reflector protocol from a plain WebSocket client: close codes, PING / PONG,
//! seq wrap-around past 2^32, SYNC replaying RECVs byte for byte.

use isthmus_dispatcher::croquet::CroquetConfig;
use isthmus_dispatcher::DispatcherConfig;
use isthmus_tests::croquet::{join_args, CroquetClient};
use isthmus_tests::{http_request, start_router, PATIENCE};
use serde_json::{json, Value};
use std::time::Duration;

fn config() -> DispatcherConfig {
    DispatcherConfig {
        croquet: Some(CroquetConfig {
            join_timeout: Duration::from_millis(300),
            ..CroquetConfig::default()
        }),
        ..DispatcherConfig::default()
    }
}

#[tokio::test]
async fn malformed_json_missing_apikey_and_unknown_actions_are_closed_with_their_codes() {
    let router = start_router(config()).await;
    let mut c = CroquetClient::connect(router.addr, "s1").await;
    c.send_text("{not json").await;
    assert_eq!(c.close_code(PATIENCE).await, Some(4102), "malformed JSON");

    let mut c = CroquetClient::connect(router.addr, "s1").await;
    c.send_text("[1,2,3]").await;
    assert_eq!(
        c.close_code(PATIENCE).await,
        Some(4102),
        "JSON that is not an object"
    );

    let mut c = CroquetClient::connect(router.addr, "s1").await;
    let mut args = join_args("u");
    args.as_object_mut().expect("object").remove("apiKey");
    c.send("JOIN", args).await;
    assert_eq!(
        c.close_code(PATIENCE).await,
        Some(4103),
        "JOIN without apiKey"
    );

    let mut c = CroquetClient::connect(router.addr, "s1").await;
    let mut args = join_args("u");
    args.as_object_mut().expect("object").remove("version");
    c.send("JOIN", args).await;
    assert_eq!(
        c.close_code(PATIENCE).await,
        Some(4100),
        "JOIN without a version"
    );

    let mut c = CroquetClient::connect(router.addr, "s1").await;
    c.send("FROB", json!(1)).await;
    assert_eq!(c.close_code(PATIENCE).await, Some(4100), "unknown action");

    let mut c = CroquetClient::connect(router.addr, "s1").await;
    c.send("JOIN", join_args("u")).await;
    c.next_action("SYNC", PATIENCE).await;
    c.send("SEND", json!("not an array")).await;
    assert_eq!(
        c.close_code(PATIENCE).await,
        Some(4102),
        "SEND args not an array"
    );

    // A message over the size bound: a fatal 4102 with the reason, not a dropped socket (on
    // which clients reconnect and send it again).
    let mut c = CroquetClient::connect(router.addr, "s1").await;
    c.send_text("x".repeat(isthmus_dispatcher::croquet::DEFAULT_MAX_FRAME_BYTES + 1))
        .await;
    assert_eq!(
        c.close_code(PATIENCE).await,
        Some(4102),
        "a message over max_frame_bytes"
    );

    // Connected but never joined: 4121 after the join timeout.
    let mut c = CroquetClient::connect(router.addr, "s1").await;
    assert_eq!(c.close_code(PATIENCE).await, Some(4121), "never joined");
    router.shutdown.cancel();
    let _ = router.task.await;
}

#[tokio::test]
async fn ping_is_answered_with_pong_carrying_the_same_args() {
    let router = start_router(config()).await;
    let mut c = CroquetClient::connect(router.addr, "s2").await;
    c.send_text(r#"{"action":"PING","args":1234567}"#).await;
    let pong = c.next_action("PONG", PATIENCE).await;
    assert_eq!(pong, json!({"action": "PONG", "args": 1234567}));
    c.send_text(r#"{"action":"PING","args":{"a":[1,"x"]}}"#)
        .await;
    let pong = c.next_action("PONG", PATIENCE).await;
    assert_eq!(pong["args"], json!({"a": [1, "x"]}));
    router.shutdown.cancel();
    let _ = router.task.await;
}

/// The RECV args of `n` messages `c` receives, skipping ticks and router messages.
async fn recv_args(c: &mut CroquetClient, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let v = c.next_action("RECV", PATIENCE).await;
        if v["args"][2].is_string() {
            out.push(v["args"].clone());
        }
    }
    out
}

#[tokio::test]
async fn seqs_start_below_2_32_and_wrap_and_sync_replays_the_same_bytes() {
    let router = start_router(config()).await;
    let mut a = CroquetClient::connect(router.addr, "wrap").await;
    a.send("JOIN", join_args("alice")).await;
    let sync = a.next_action("SYNC", PATIENCE).await;
    assert_eq!(
        sync["args"]["seq"], 0xFFFF_FFF0u32,
        "the clients' initial seq"
    );
    assert_eq!(sync["args"]["messages"], json!([]));
    assert_eq!(
        sync["args"]["tove"], "t0ve",
        "the first joiner's tove is echoed"
    );
    let timeline = sync["args"]["timeline"].clone();
    for i in 0..24 {
        a.send("SEND", json!([0, 0, format!("m{i}"), 5])).await;
    }
    let got = recv_args(&mut a, 24).await;
    let seqs: Vec<u64> = got.iter().map(|m| m[1].as_u64().expect("seq")).collect();
    // The "users" message announcing alice may come first; the SENDs follow in order.
    let first = seqs[0];
    assert!(first >= 0xFFFF_FFF1, "first seq {first:#x}");
    for w in seqs.windows(2) {
        assert_eq!(
            w[1],
            (w[0] + 1) % (1 << 32),
            "seqs rise by one and wrap: {seqs:?}"
        );
    }
    assert!(
        seqs.contains(&0) && seqs.contains(&5),
        "wrapped past 2^32: {seqs:?}"
    );
    let times: Vec<u64> = got.iter().map(|m| m[0].as_u64().expect("time")).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "times never decrease"
    );
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m[2], format!("m{i}"));
        assert_eq!(m[3], 5, "the rest of the SEND args travel untouched");
    }
    // A second client's SYNC replays exactly these messages (nothing was snapshotted).
    let mut b = CroquetClient::connect(router.addr, "wrap").await;
    b.send("JOIN", join_args("bob")).await;
    let sync = b.next_action("SYNC", PATIENCE).await;
    assert_eq!(
        sync["args"]["timeline"], timeline,
        "one timeline per session"
    );
    let replayed: Vec<Value> = sync["args"]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m[2].is_string())
        .cloned()
        .collect();
    assert_eq!(replayed, got, "SYNC replays the RECVs as they were sent");
    router.shutdown.cancel();
    let _ = router.task.await;
}

#[tokio::test]
async fn a_snapshot_cuts_the_replay_and_users_and_tallies_are_ordered_messages() {
    let router = start_router(config()).await;
    let mut a = CroquetClient::connect(router.addr, "snap").await;
    a.send("JOIN", join_args("alice")).await;
    a.next_action("SYNC", PATIENCE).await;
    // alice's join is announced as an ordered "users" message.
    let users = loop {
        let v = a.next_action("RECV", PATIENCE).await;
        if v["args"][2]["what"] == "users" {
            break v;
        }
    };
    assert_eq!(users["args"][2]["joined"], json!(["alice"]));
    assert_eq!(users["args"][2]["active"], 1);
    for i in 0..3 {
        a.send("SEND", json!([0, 0, format!("m{i}"), 0])).await;
    }
    let got = recv_args(&mut a, 3).await;
    // alice uploaded a snapshot taken after the second message.
    let snap_seq = got[1][1].clone();
    a.send(
        "SNAP",
        json!({"time": got[1][0], "seq": snap_seq, "hash": "h", "url": "http://x/files/s1"}),
    )
    .await;
    // A TUTTI vote from the only client completes at once into a tally message.
    a.send(
        "TUTTI",
        json!([got[2][0], 0, "vote-a", null, true, ["target"], "snapshot@1"]),
    )
    .await;
    let tally = loop {
        let v = a.next_action("RECV", PATIENCE).await;
        if v["args"][2]["what"] == "tally" {
            break v;
        }
    };
    assert_eq!(tally["args"][2]["tally"], json!({"vote-a": 1}));
    assert_eq!(tally["args"][2]["tuttiKey"], "snapshot@1");
    let mut b = CroquetClient::connect(router.addr, "snap").await;
    b.send("JOIN", join_args("bob")).await;
    let sync = b.next_action("SYNC", PATIENCE).await;
    assert_eq!(sync["args"]["url"], "http://x/files/s1");
    assert_eq!(sync["args"]["snapshotSeq"], snap_seq);
    let msgs = sync["args"]["messages"].as_array().expect("messages");
    assert_eq!(
        msgs[0][2], "m2",
        "replay starts after the snapshot: {msgs:?}"
    );
    assert_eq!(msgs.last().expect("tally")[2]["what"], "tally");
    router.shutdown.cancel();
    let _ = router.task.await;
}

#[tokio::test]
async fn debounced_sends_inside_their_window_are_dropped() {
    let router = start_router(config()).await;
    let mut a = CroquetClient::connect(router.addr, "deb").await;
    a.send("JOIN", join_args("alice")).await;
    a.next_action("SYNC", PATIENCE).await;
    let tagged = |p: &str| {
        json!({"action": "SEND", "args": [0, 0, p, 0], "tags": {"debounce": 60_000, "msgID": "poll"}})
            .to_string()
    };
    a.send_text(tagged("first")).await;
    a.send_text(tagged("second")).await;
    a.send("SEND", json!([0, 0, "plain", 0])).await;
    let got = recv_args(&mut a, 2).await;
    assert_eq!(got[0][2], "first");
    assert_eq!(
        got[1][2], "plain",
        "the repeat inside the window was dropped"
    );
    router.shutdown.cancel();
    let _ = router.task.await;
}

/// One HTTP/1.1 request on a fresh connection (closed after): (status code, body).
async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: router\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(body).await.expect("body");
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
        .await
        .expect("a response in time")
        .expect("read");
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let status = String::from_utf8_lossy(&buf[..end])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, buf[end + 4..].to_vec())
}

#[tokio::test]
async fn the_file_store_keeps_uploads_and_refuses_escapes_and_oversize() {
    let dir = std::env::temp_dir().join(format!("isthmus-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut store = isthmus_croquet::store::StoreConfig::new(dir.clone());
    store.max_file_bytes = 1024;
    let router = start_router(DispatcherConfig {
        croquet: Some(CroquetConfig {
            store: Some(store),
            ..CroquetConfig::default()
        }),
        ..DispatcherConfig::default()
    })
    .await;
    let blob: Vec<u8> = (0..=255u8).cycle().take(700).collect();
    let (code, _) = http(
        router.addr,
        "PUT",
        "/files/apps/a/snap/c/p.s/0001_1.h",
        &blob,
    )
    .await;
    assert_eq!(code, 201);
    let (code, body) = http(router.addr, "GET", "/files/apps/a/snap/c/p.s/0001_1.h", b"").await;
    assert_eq!(
        (code, body),
        (200, blob.clone()),
        "the bytes come back as uploaded"
    );
    assert_eq!(
        http(router.addr, "GET", "/files/apps/none", b"").await.0,
        404
    );
    for bad in ["/files/a/../../etc/passwd", "/files/.hidden", "/files/a//b"] {
        assert_eq!(http(router.addr, "PUT", bad, b"x").await.0, 400, "{bad}");
        assert_eq!(http(router.addr, "GET", bad, b"").await.0, 400, "{bad}");
    }
    let big = vec![0u8; 2000];
    assert_eq!(http(router.addr, "PUT", "/files/big", &big).await.0, 413);
    assert!(!dir.join("files/big").exists());
    router.shutdown.cancel();
    let _ = router.task.await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn file_bodies_in_memory_at_once_are_bounded() {
    let dir = std::env::temp_dir().join(format!("isthmus-files-inflight-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut store = isthmus_croquet::store::StoreConfig::new(dir.clone());
    store.max_file_bytes = 1024;
    let router = start_router(DispatcherConfig {
        croquet: Some(CroquetConfig {
            store: Some(store),
            max_file_bytes_in_flight: 800,
            ..CroquetConfig::default()
        }),
        ..DispatcherConfig::default()
    })
    .await;
    let blob = vec![7u8; 700];
    assert_eq!(http(router.addr, "PUT", "/files/a/x", &blob).await.0, 201);
    // Within the file limit, over what memory may hold at once: refused, nothing stored.
    assert_eq!(
        http(router.addr, "PUT", "/files/a/y", &[1u8; 900]).await.0,
        503
    );
    assert_eq!(http(router.addr, "GET", "/files/a/y", b"").await.0, 404);
    // What earlier requests held was given back: the 700 bytes fit again, every time.
    for _ in 0..3 {
        assert_eq!(
            http(router.addr, "GET", "/files/a/x", b"").await,
            (200, blob.clone())
        );
    }
    router.shutdown.cancel();
    let _ = router.task.await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn web_serves_the_app_directory_and_nothing_outside_it() {
    let dir = std::env::temp_dir().join(format!("isthmus-webdir-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("app/js")).expect("mkdir");
    std::fs::write(dir.join("app/index.html"), "<h1>app</h1>").expect("write");
    std::fs::write(dir.join("app/js/x.js"), "let x;").expect("write");
    std::fs::write(dir.join("secret.txt"), "secret").expect("write");
    let router = start_router(DispatcherConfig {
        croquet: Some(CroquetConfig {
            web: Some(dir.join("app")),
            ..CroquetConfig::default()
        }),
        ..DispatcherConfig::default()
    })
    .await;
    assert_eq!(
        http(router.addr, "GET", "/", b"").await,
        (200, b"<h1>app</h1>".to_vec())
    );
    assert_eq!(http(router.addr, "GET", "/js/x.js", b"").await.0, 200);
    // The app has "/", so the status page is at /status; the router's own routes stay.
    let (code, body) = http(router.addr, "GET", "/status", b"").await;
    assert_eq!(code, 200);
    assert!(!String::from_utf8_lossy(&body).contains("<h1>app</h1>"));
    assert_eq!(http(router.addr, "GET", "/status.json", b"").await.0, 200);
    assert_eq!(http(router.addr, "GET", "/nope.html", b"").await.0, 404);
    for bad in [
        "/../secret.txt",
        "/js/../../secret.txt",
        "/%2e%2e/secret.txt",
    ] {
        let (code, body) = http(router.addr, "GET", bad, b"").await;
        assert!(code == 400 || code == 404, "{bad}: {code}");
        assert!(!String::from_utf8_lossy(&body).contains("secret"), "{bad}");
    }
    router.shutdown.cancel();
    let _ = router.task.await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn without_an_apikey_list_joins_and_uploads_follow_the_create_policy() {
    let dir = std::env::temp_dir().join(format!("isthmus-files-policy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let croquet = |keys: Vec<String>| {
        Some(CroquetConfig {
            api_keys: keys,
            store: Some(isthmus_croquet::store::StoreConfig::new(dir.clone())),
            ..CroquetConfig::default()
        })
    };
    // Nobody may create: loopback is refused like any peer.
    let router = start_router(DispatcherConfig {
        create: isthmus_dispatcher::CreatePolicy::None,
        croquet: croquet(Vec::new()),
        ..DispatcherConfig::default()
    })
    .await;
    assert_eq!(
        http(router.addr, "PUT", "/files/apps/a/x", b"junk").await.0,
        403,
        "an upload from a peer the create policy refuses"
    );
    assert_eq!(
        http(router.addr, "GET", "/files/apps/a/x", b"").await.0,
        404
    );
    let mut c = CroquetClient::connect(router.addr, "p1").await;
    c.send("JOIN", join_args("u")).await;
    assert_eq!(c.close_code(PATIENCE).await, Some(4103));
    router.shutdown.cancel();
    let _ = router.task.await;

    // With a list, the apiKey decides JOINs and uploads are taken from anyone.
    let router = start_router(DispatcherConfig {
        create: isthmus_dispatcher::CreatePolicy::None,
        croquet: croquet(vec![join_args("u")["apiKey"]
            .as_str()
            .expect("apiKey")
            .to_string()]),
        ..DispatcherConfig::default()
    })
    .await;
    assert_eq!(
        http(router.addr, "PUT", "/files/apps/a/x", b"blob").await.0,
        201
    );
    let mut c = CroquetClient::connect(router.addr, "p1").await;
    c.send("JOIN", join_args("u")).await;
    c.next_action("SYNC", PATIENCE).await;
    router.shutdown.cancel();
    let _ = router.task.await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn with_croquet_off_its_routes_are_not_served() {
    let router = start_router(DispatcherConfig {
        croquet: None,
        ..DispatcherConfig::default()
    })
    .await;
    let (code, body) = http(router.addr, "GET", "/files/x", b"").await;
    assert_eq!(code, 404);
    assert!(String::from_utf8_lossy(&body).contains("--no-croquet"));
    let url = format!("ws://{}/reflector/s", router.addr);
    assert!(
        tokio_tungstenite::connect_async(url).await.is_err(),
        "no WebSocket"
    );
    router.shutdown.cancel();
    let _ = router.task.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pings_and_never_reads_is_closed_not_buffered_without_end() {
    let mut cfg = config();
    cfg.driver.session.max_outbound_bytes = 64 * 1024;
    let router = start_router(cfg).await;
    let mut c = CroquetClient::connect(router.addr, "flood").await;
    c.send("JOIN", join_args("flooder")).await;
    c.next_action("SYNC", PATIENCE).await;
    // Far more PONGs than the kernel's socket buffers and the 64 KiB bound hold together.
    let ping = r#"{"action":"PING","args":"0123456789012345678901234567890123456789"}"#;
    let mut open = true;
    for _ in 0..400 {
        open = c.try_send_batch((0..1000).map(|_| ping.to_string())).await;
        if !open {
            break;
        }
    }
    // The router closed it with 4001 (it drains what the client still sends, so the close
    // frame is not overtaken by a reset); without the bound no close comes at all. A client
    // that has not read its way to the close frame within CLOSE_LINGER is let go without it
    // (None: a reset, on which clients reconnect as for 4001).
    let code = c.close_code(PATIENCE).await;
    assert!(
        matches!(code, Some(4001) | None),
        "closed with {code:?}; writes still open: {open}"
    );
    // The router is fine for everyone else.
    let mut d = CroquetClient::connect(router.addr, "flood").await;
    d.send_text(r#"{"action":"PING","args":1}"#).await;
    d.next_action("PONG", PATIENCE).await;
    router.shutdown.cancel();
    let _ = router.task.await;
}

/// Polls `/status.json` until `ok` holds for it.
async fn status_until(
    addr: std::net::SocketAddr,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, body) = http_request(addr, "router", "/status.json").await;
        assert!(status.contains(" 200"), "{status}\n{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        if ok(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the status never showed {what}:\n{v:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn croquet_sessions_show_on_the_status_page_and_in_the_metrics() {
    let router = start_router(config()).await;
    let mut ann = CroquetClient::connect(router.addr, "shown").await;
    ann.send("JOIN", join_args("ann")).await;
    ann.next_action("SYNC", PATIENCE).await;
    let mut bob = CroquetClient::connect(router.addr, "shown").await;
    bob.send("JOIN", join_args("bob")).await;
    bob.next_action("SYNC", PATIENCE).await;
    for k in 0..3 {
        ann.send("SEND", json!([0, 0, format!("m{k}"), 0])).await;
    }
    let status = status_until(router.addr, "the Croquet session with both members", |v| {
        v["islands"].as_array().is_some_and(|a| {
            a.iter().any(|i| {
                i["members"].as_array().is_some_and(|m| m.len() == 2)
                    && i["seq"].as_u64() >= Some(3)
            })
        })
    })
    .await;
    let island = &status["islands"][0];
    assert_eq!(island["name"], "io.isthmus.test (Croquet)", "{status:#}");
    let names: Vec<&str> = island["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, ["ann", "bob"], "{status:#}");

    let (_, metrics) = http_request(router.addr, "router", "/metrics").await;
    let sample = |series: &str| {
        metrics.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
    };
    assert_eq!(sample("isthmus_sessions"), Some(1.0), "{metrics}");
    assert_eq!(sample("isthmus_replicas"), Some(2.0), "{metrics}");
    assert!(
        sample("isthmus_messages_stamped_total").is_some_and(|n| n >= 3.0),
        "{metrics}"
    );
    router.shutdown.cancel();
    let _ = router.task.await;
}

#[tokio::test]
async fn a_client_that_reads_nothing_is_let_go_after_its_close_not_kept_while_it_sends() {
    let mut cfg = config();
    cfg.driver.session.max_outbound_bytes = 64 * 1024;
    let router = start_router(cfg).await;
    // Someone else keeps the session alive (the session ending would end the connection too).
    let mut keeper = CroquetClient::connect(router.addr, "stuck").await;
    keeper.send("JOIN", join_args("keeper")).await;
    keeper.next_action("SYNC", PATIENCE).await;
    let mut c = CroquetClient::connect(router.addr, "stuck").await;
    c.send("JOIN", join_args("stuck")).await;
    // Fill the socket both ways' buffers with PONGs it never reads: the router closes it with
    // 4001 behind a writer that cannot write.
    let ping = r#"{"action":"PING","args":"0123456789012345678901234567890123456789"}"#;
    for _ in 0..400 {
        if !c.try_send_batch((0..1000).map(|_| ping.to_string())).await {
            break;
        }
    }
    // It goes on sending signs of life and reading nothing; the router must let go of it
    // (CLOSE_LINGER) rather than read its PULSEs for as long as it likes.
    let pulse = r#"{"action":"PULSE"}"#;
    let gone = tokio::time::timeout(PATIENCE, async {
        while c.try_send_batch([pulse.to_string()]).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        gone.is_ok(),
        "the router still reads a connection it closed"
    );
    keeper.send_text(r#"{"action":"PING","args":1}"#).await;
    keeper.next_action("PONG", PATIENCE).await;
    router.shutdown.cancel();
    let _ = router.task.await;
}

#[tokio::test]
async fn a_sync_takes_its_size_from_the_memory_budget() {
    let mut cfg = config();
    cfg.memory_budget_bytes = 4 * 1024 * 1024;
    let router = start_router(cfg).await;
    let mut a = CroquetClient::connect(router.addr, "big").await;
    a.send("JOIN", join_args("a")).await;
    a.next_action("SYNC", PATIENCE).await;
    // About 2.4 MB of history, held by the session (and the budget).
    let payload = "p".repeat(200_000);
    for _ in 0..12 {
        a.send("SEND", json!([0, 0, payload])).await;
    }
    let _ = recv_args(&mut a, 12).await;
    // A joiner's SYNC is a second copy of it: more than the budget has left.
    let mut b = CroquetClient::connect(router.addr, "big").await;
    b.send("JOIN", join_args("b")).await;
    assert_eq!(b.close_code(PATIENCE).await, Some(4003));
    // The session goes on for the one already in it.
    a.send("SEND", json!([0, 0, "small"])).await;
    let got = recv_args(&mut a, 1).await;
    assert_eq!(got[0][2], "small");
    router.shutdown.cancel();
    let _ = router.task.await;
}
