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
use isthmus_tests::{start_router, Proxy, PATIENCE};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_restart_is_reported_as_a_lost_session() {
    let router = start_router(DispatcherConfig::default()).await;
    let addr = router.addr;
    // Through a proxy, so the router can die without its goodbye reaching the replica, as in a
    // crash (a goodbye alone already ends the island: see the CLI tests).
    let proxy = Proxy::start(addr).await;
    let card = island();
    let (a, mut events) = client::connect(config(proxy.addr, &card, true), ChatIsland::default())
        .await
        .expect("connect");
    a.send(ChatIsland::payload("a", "hello"))
        .await
        .expect("send");
    until_seq(&mut events, 1).await;

    proxy.freeze(true);
    router.shutdown.cancel();
    router.task.await.expect("router stops");
    proxy.cut();
    // Only once the replica has seen the connection drop may the proxy forward again: a pump
    // of the old connection that has not seen the cut yet would deliver the held goodbye.
    let mut seen = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        loop {
            match events.recv().await {
                Some(e @ Event::Disconnected { .. }) => {
                    seen.push(e);
                    return;
                }
                Some(e) => seen.push(e),
                None => panic!("ended before noticing the drop: {seen:?}"),
            }
        }
    })
    .await
    .expect("the drop is noticed");
    proxy.freeze(false);
    // The same port comes back with an empty router.
    let cfg = DispatcherConfig {
        listen: addr,
        ..DispatcherConfig::default()
    };
    let again = isthmus_dispatcher::Dispatcher::bind(cfg)
        .await
        .expect("rebind");
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(again.run(stop.clone()));

    let lost = tokio::time::timeout(PATIENCE, async {
        loop {
            match events.recv().await {
                Some(Event::SessionLost { reason }) => return reason,
                Some(e) => seen.push(e),
                None => panic!("ended without reporting the lost session: {seen:?}"),
            }
        }
    })
    .await
    .expect("the lost session is reported");
    assert!(
        seen.iter().any(|e| matches!(e, Event::Disconnected { .. })),
        "noticed the drop first: {seen:?}"
    );
    assert!(
        !seen.iter().any(|e| matches!(e, Event::Reconnected)),
        "never pretends continuity"
    );
    assert!(lost.contains("2002"), "{lost}");
    // The replica did not quietly create a fresh session on the new router.
    assert_eq!(0, count_sessions(&a).await);
    stop.cancel();
    task.await.expect("router ends");
}

async fn count_sessions(a: &ClientHandle<ChatIsland>) -> usize {
    // After a lost session the handle no longer works: sends fail instead of vanishing.
    match a.send(ChatIsland::payload("a", "x")).await {
        Ok(_) => 1,
        Err(_) => 0,
    }
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
