//! The island client against a real router over loopback: resume after a cut connection,
//! a silently dead path, a router restart, sealed payloads, observers and admin commands.

use isthmus_contact::{ContactPoint, Postcard};
use isthmus_dispatcher::DispatcherConfig;
use isthmus_island_client::chat::ChatIsland;
use isthmus_island_client::client::{self, ClientHandle};
use isthmus_island_client::{ClientConfig, ClientError, Event, ReplicaConfig};
use isthmus_router::auth::Capability;
use isthmus_router::ids::{Seq, SessionId};
use isthmus_router::wire::{AdminCommand, Code, CreateOptions};
use isthmus_tests::{start_router, start_router_on, Proxy, PATIENCE};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;

/// The admin postcard of a fresh island (addresses come from each test's config).
fn island() -> Postcard {
    let contact = ContactPoint::new(SessionId::random(), "t", vec![]);
    Postcard::for_new_island(contact, Capability::new_island()).expect("postcard")
}

fn config(addr: SocketAddr, card: &Postcard, create: bool) -> ClientConfig {
    let mut replica = ReplicaConfig::from_postcard(card, "t");
    replica.create = create.then(CreateOptions::default);
    let mut cfg = ClientConfig::new(vec![addr], replica);
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(400);
    cfg
}

/// Collects events until seq `n` is applied; returns the messages' seqs and all events.
async fn until_seq(events: &mut mpsc::Receiver<Event>, n: u64) -> (Vec<u64>, Vec<Event>) {
    let mut seqs = Vec::new();
    let mut all = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(e) = events.recv().await {
            let done = match &e {
                Event::Message(m) => {
                    seqs.push(m.seq.0);
                    m.seq.0 >= n
                }
                Event::Restored { at } => at.0 >= n,
                _ => false,
            };
            all.push(e);
            if done {
                return;
            }
        }
        panic!("events ended early: {all:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("timed out before seq {n}"));
    (seqs, all)
}

async fn digest(h: &ClientHandle<ChatIsland>) -> (Seq, String) {
    h.inspect(|c: &ChatIsland, seq| (seq, c.digest_hex()))
        .await
        .expect("inspect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resumes_without_gaps_or_duplicates() {
    let router = start_router(DispatcherConfig::default()).await;
    let proxy = Proxy::start(router.addr).await;
    let card = island();
    let (a, mut a_events) =
        client::connect(config(router.addr, &card, true), ChatIsland::default())
            .await
            .expect("creator connects");
    let (b, mut b_events) =
        client::connect(config(proxy.addr, &card, false), ChatIsland::default())
            .await
            .expect("joiner connects through the proxy");
    let total = 400u64;
    let sender = tokio::spawn(async move {
        for k in 0..total / 2 {
            a.send(ChatIsland::payload("a", &format!("a{k}")))
                .await
                .expect("a sends");
            b.send(ChatIsland::payload("b", &format!("b{k}")))
                .await
                .expect("b sends");
            if k == 60 {
                proxy.cut();
            }
            if k == 140 {
                // Cut again only once b is back, so this is a second, separate resume.
                tokio::time::timeout(PATIENCE, async {
                    while proxy.accepted() < 2 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
                .await
                .expect("b reconnects after the first cut");
                proxy.cut();
            }
            if k % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        (a, b, proxy)
    });
    let (a_seqs, _) = until_seq(&mut a_events, total).await;
    let (b_seqs, b_all) = until_seq(&mut b_events, total).await;
    let (a, b, proxy) = sender.await.expect("sender");
    assert!(proxy.accepted() >= 3, "b reconnected after each cut");
    assert!(b_all
        .iter()
        .any(|e| matches!(e, Event::Disconnected { .. })));
    assert!(b_all.iter().any(|e| matches!(e, Event::Reconnected)));
    let syncs = b_all
        .iter()
        .filter(|e| matches!(e, Event::Restored { .. } | Event::StartedFresh))
        .count();
    assert_eq!(syncs, 1, "the reconnects resumed instead of resyncing");
    assert_eq!(a_seqs, (1..=total).collect::<Vec<_>>());
    // b may have resynced from a snapshot; what it did see is strictly increasing and ends at
    // the last seq, with nothing twice.
    assert!(
        b_seqs.windows(2).all(|w| w[0] < w[1]),
        "no duplicate, no reordering"
    );
    assert_eq!(b_seqs.last(), Some(&total));
    let (sa, da) = digest(&a).await;
    let (sb, db) = digest(&b).await;
    assert_eq!((sa, &da), (Seq(total), &db), "same state everywhere");
    assert_eq!(sb, Seq(total));
    // Every send of b was stamped exactly once despite the resends.
    let lines = a
        .inspect(|c: &ChatIsland, _| c.lines().map(|l| l.text.clone()).collect::<Vec<_>>())
        .await
        .expect("inspect");
    let mut bs: Vec<&String> = lines.iter().filter(|t| t.starts_with('b')).collect();
    assert_eq!(bs.len() as u64, total / 2);
    bs.dedup();
    assert_eq!(bs.len() as u64, total / 2);
    a.leave().await;
    b.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_path_is_noticed_and_replaced() {
    let router = start_router(DispatcherConfig::default()).await;
    let proxy = Proxy::start(router.addr).await;
    let card = island();
    let mut cfg = config(proxy.addr, &card, true);
    // Ticks every 50 ms keep a live path far from this; only the frozen one goes silent.
    cfg.liveness_timeout = Duration::from_secs(2);
    cfg.ping_interval = Duration::from_millis(500);
    let (a, mut events) = client::connect(cfg, ChatIsland::default())
        .await
        .expect("connect");
    a.send(ChatIsland::payload("a", "before"))
        .await
        .expect("send");
    until_seq(&mut events, 1).await;
    proxy.freeze(true);
    let reason = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(Event::Disconnected { reason }) = events.recv().await {
                return reason;
            }
        }
    })
    .await
    .expect("the dead path is noticed");
    assert!(reason.contains("no word from the router"), "{reason}");
    proxy.freeze(false);
    tokio::time::timeout(PATIENCE, async {
        while !matches!(events.recv().await, Some(Event::Reconnected)) {}
    })
    .await
    .expect("reconnected");
    a.send(ChatIsland::payload("a", "after"))
        .await
        .expect("send");
    let (seqs, _) = until_seq(&mut events, 2).await;
    assert_eq!(seqs.last(), Some(&2));
    a.leave().await;
}

/// Three replicas sending steadily through a router that crashes (its goodbyes never reach
/// anyone) and comes back empty on the same port: they re-create their island from the most
/// advanced of them and carry on, with one order, no gap, no duplicate, every send stamped
/// exactly once, identical digests, and nobody told the session is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_restart_re_creates_the_island_from_its_replicas() {
    crash_and_restart(DispatcherConfig::default(), DispatcherConfig::default()).await;
}

/// The restarted router creates no islands at all (`create = none`), yet it remembered the one
/// it was home for (in its data directory), so that island's replicas re-create it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_island_is_re_created_whatever_the_create_policy() {
    let dir = std::env::temp_dir().join(format!("isthmus-remember-{}", uuid::Uuid::new_v4()));
    let first = DispatcherConfig {
        remember_dir: Some(dir.clone()),
        ..DispatcherConfig::default()
    };
    let second = DispatcherConfig {
        remember_dir: Some(dir.clone()),
        create: isthmus_dispatcher::CreatePolicy::None,
        ..DispatcherConfig::default()
    };
    crash_and_restart(first, second).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs three replicas sending steadily through `first`, crashes it mid-traffic, brings
/// `second` up on the same port and checks that the island carried on whole.
async fn crash_and_restart(first: DispatcherConfig, second: DispatcherConfig) {
    let router = start_router(first).await;
    let addr = router.addr;
    // Through a proxy, so the router can die without its goodbye reaching the replicas, as in
    // a crash (SIGKILL: see the CLI test for the real thing).
    let proxy = Proxy::start(addr).await;
    let card = island();
    let per_replica = 150u64;
    let names = ["a", "b", "c"];
    let total = per_replica * names.len() as u64;
    let mut handles = Vec::new();
    let mut logs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut cfg = config(proxy.addr, &card, i == 0);
        cfg.replica.stop_after = Some(Seq(total));
        let (h, events) = client::connect(cfg, ChatIsland::default())
            .await
            .expect("connect");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        tokio::spawn(collect(events, log.clone()));
        handles.push((name.to_string(), std::sync::Arc::new(h)));
        logs.push(log);
    }
    let senders = isthmus_tests::type_chat_lines(&handles, per_replica, Duration::from_millis(4));
    // The crash, in the middle of the traffic.
    wait_for(
        &logs[0],
        |e| matches!(e, Event::Message(m) if m.seq.0 >= total / 4),
    )
    .await;
    proxy.freeze(true);
    router.shutdown.cancel();
    router.task.await.expect("router stops");
    proxy.cut();
    // Only once every replica has seen the drop may the proxy forward again: a pump of an old
    // connection that has not seen the cut yet would deliver the held goodbye.
    for log in &logs {
        wait_for(log, |e| matches!(e, Event::Disconnected { .. })).await;
    }
    proxy.freeze(false);
    let again = start_router_on(second, addr).await;
    for s in senders {
        s.await.expect("every send handed over");
    }
    let mut digests = Vec::new();
    for log in &logs {
        wait_for(log, |e| matches!(e, Event::Stopped { .. })).await;
        let events = log.lock().expect("log").clone();
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::SessionLost { .. })),
            "nobody loses the island: {events:?}"
        );
        assert!(events.iter().any(|e| matches!(e, Event::Reconnected)));
        let Some(Event::Stopped { seq, digest }) = events.last().cloned() else {
            panic!("stopped last")
        };
        assert_eq!(seq, Seq(total));
        digests.push(digest);
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "one state");
    let (_, metrics) = isthmus_tests::http_request(addr, "router", "/metrics").await;
    assert!(
        metrics.contains("isthmus_islands_recovered_total 1\n"),
        "{metrics}"
    );
    // The island state itself: every line once, in one order (the chat keeps every line).
    let (lines, _) = handles[0]
        .1
        .inspect(|c: &ChatIsland, seq| (c.lines().map(|l| l.text.clone()).collect::<Vec<_>>(), seq))
        .await
        .expect("inspect");
    assert_eq!(lines.len() as u64, total, "no gap, no duplicate");
    let mut unique = lines.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len() as u64,
        total,
        "every send stamped exactly once"
    );
    again.shutdown.cancel();
    again.task.await.expect("router ends");
}

/// An observer that comes back to a restarted router before any participant meets "unknown
/// session": it cannot re-create the island itself, so it keeps trying (it does not give up
/// the island) until a participant has re-created it, and then follows it as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_back_first_waits_for_a_participant_to_re_create_the_island() {
    let router = start_router(DispatcherConfig::default()).await;
    let addr = router.addr;
    let proxy = Proxy::start(addr).await;
    let card = island();
    let mut pcfg = config(proxy.addr, &card, true);
    // The participant takes its time to come back; the observer hurries.
    pcfg.backoff_initial = Duration::from_millis(1500);
    pcfg.backoff_max = Duration::from_millis(1500);
    let (p, p_events) = client::connect(pcfg, ChatIsland::default())
        .await
        .expect("participant");
    let observer = card.observer().expect("observer");
    let (o, o_events) =
        client::connect(config(proxy.addr, &observer, false), ChatIsland::default())
            .await
            .expect("observer");
    let (p_log, o_log) = (
        std::sync::Arc::new(std::sync::Mutex::new(Vec::new())),
        std::sync::Arc::new(std::sync::Mutex::new(Vec::new())),
    );
    tokio::spawn(collect(p_events, p_log.clone()));
    tokio::spawn(collect(o_events, o_log.clone()));
    for k in 0..5 {
        p.send(ChatIsland::payload("p", &format!("before {k}")))
            .await
            .expect("send");
    }
    wait_for(&o_log, |e| matches!(e, Event::Message(m) if m.seq.0 == 5)).await;
    proxy.freeze(true);
    router.shutdown.cancel();
    router.task.await.expect("router stops");
    proxy.cut();
    for log in [&p_log, &o_log] {
        wait_for(log, |e| matches!(e, Event::Disconnected { .. })).await;
    }
    proxy.freeze(false);
    let again = start_router_on(DispatcherConfig::default(), addr).await;
    p.send(ChatIsland::payload("p", "after"))
        .await
        .expect("queued");
    wait_for(&o_log, |e| matches!(e, Event::Message(m) if m.seq.0 == 6)).await;
    let events = o_log.lock().expect("log").clone();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::SessionLost { .. })),
        "{events:?}"
    );
    // It did meet the empty router before the participant was back.
    let (_, metrics) = isthmus_tests::http_request(addr, "router", "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(r#"isthmus_refusals_total{code="2002""#) && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert_eq!(digest(&o).await, digest(&p).await);
    again.shutdown.cancel();
    again.task.await.expect("router ends");
}

async fn collect(
    mut events: mpsc::Receiver<Event>,
    log: std::sync::Arc<std::sync::Mutex<Vec<Event>>>,
) {
    while let Some(e) = events.recv().await {
        if let Ok(mut l) = log.lock() {
            l.push(e);
        }
    }
}

/// Waits until an event matching `want` was logged.
async fn wait_for(log: &std::sync::Mutex<Vec<Event>>, want: impl Fn(&Event) -> bool) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            if log.lock().expect("log").iter().any(&want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not seen in time: {:?}", log.lock().expect("log")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidate_addresses_are_raced_so_a_dead_one_does_not_stall_the_join() {
    let router = start_router(DispatcherConfig::default()).await;
    // Accepts TCP but never speaks: like an address that leads nowhere useful.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let card = island();
    let mut cfg = config(silent_addr, &card, true);
    cfg.routers = vec![silent_addr, router.addr];
    cfg.connect_timeout = Duration::from_secs(20);
    let started = std::time::Instant::now();
    let (a, _events) = client::connect(cfg, ChatIsland::default())
        .await
        .expect("the second candidate wins");
    // Without racing this would take the whole 20 s connect timeout.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    a.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_does_not_know_the_island_hands_over_to_the_next_address() {
    let real = start_router(DispatcherConfig::default()).await;
    let other = start_router(DispatcherConfig::default()).await;
    let card = island();
    let (a, _a_events) = client::connect(config(real.addr, &card, true), ChatIsland::default())
        .await
        .expect("creator");
    let mut cfg = config(other.addr, &card, false);
    cfg.routers = vec![other.addr, real.addr];
    let (b, mut events) = client::connect(cfg, ChatIsland::default())
        .await
        .expect("falls through to the router that has the island");
    a.send(ChatIsland::payload("a", "hi")).await.expect("send");
    let (seqs, _) = until_seq(&mut events, 1).await;
    assert_eq!(seqs, vec![1]);
    a.leave().await;
    b.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_travel_sealed_and_observers_read_but_cannot_send() {
    let router = start_router(DispatcherConfig::default()).await;
    let card = island();
    let (a, mut a_events) =
        client::connect(config(router.addr, &card, true), ChatIsland::default())
            .await
            .expect("creator");
    let participant = card.participant().expect("participant");
    let (b, mut b_events) = client::connect(
        config(router.addr, &participant, false),
        ChatIsland::default(),
    )
    .await
    .expect("participant");
    let observer = card.observer().expect("observer");
    let (o, mut o_events) =
        client::connect(config(router.addr, &observer, false), ChatIsland::default())
            .await
            .expect("observer");
    a.send(ChatIsland::payload("a", "sealed hello"))
        .await
        .expect("send");
    b.send(ChatIsland::payload("b", "sealed reply"))
        .await
        .expect("send");
    until_seq(&mut a_events, 2).await;
    until_seq(&mut b_events, 2).await;
    until_seq(&mut o_events, 2).await;
    let da = digest(&a).await;
    assert_eq!(digest(&b).await, da);
    assert_eq!(digest(&o).await, da, "the observer opened what it saw");
    let err = o
        .send(ChatIsland::payload("o", "let me in"))
        .await
        .expect_err("observers cannot send");
    assert!(matches!(err, ClientError::ObserverCannotSend), "{err}");
    a.leave().await;
    b.leave().await;
    o.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_set_the_tick_kick_a_replica_and_close_the_island() {
    let router = start_router(DispatcherConfig::default()).await;
    let card = island();
    let addrs = [router.addr];
    let (a, mut a_events) =
        client::connect(config(router.addr, &card, true), ChatIsland::default())
            .await
            .expect("creator");
    let participant = card.participant().expect("participant");
    let b_cfg = config(router.addr, &participant, false);
    let b_id = b_cfg.replica.replica();
    let (_b, mut b_events) = client::connect(b_cfg, ChatIsland::default())
        .await
        .expect("joiner");
    let limit = Duration::from_secs(5);

    client::admin(&addrs, &card, AdminCommand::SetTick { ms: 20 }, limit)
        .await
        .expect("tick set");
    // Only the admin postcard gives admin commands.
    assert!(matches!(
        client::admin(&addrs, &participant, AdminCommand::Close, limit).await,
        Err(ClientError::NotAdmin(_))
    ));

    client::admin(&addrs, &card, AdminCommand::Kick { replica: b_id }, limit)
        .await
        .expect("kicked");
    let lost = wait_lost(&mut b_events).await;
    assert!(lost.contains(&Code::KICKED.0.to_string()), "{lost}");

    client::admin(&addrs, &card, AdminCommand::Close, limit)
        .await
        .expect("closed");
    let lost = wait_lost(&mut a_events).await;
    assert!(lost.contains(&Code::CLOSED.0.to_string()), "{lost}");
    drop(a);
}

async fn wait_lost(events: &mut mpsc::Receiver<Event>) -> String {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match events.recv().await {
                Some(Event::SessionLost { reason }) => return reason,
                Some(_) => {}
                None => panic!("ended without a lost session"),
            }
        }
    })
    .await
    .expect("the end is reported")
}
