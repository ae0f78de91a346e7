//! Routers in a cluster on one real etcd (started by the test on loopback), dispatchers in
//! process: placement across routers, redirects to an island's home, a router added while
//! islands run, and fencing when etcd is cut off (SIGSTOP) while the replicas stay connected.

use isthmus_cluster::ClusterConfig;
use isthmus_dispatcher::cluster::{ClusterSettings, ClusterView};
use isthmus_dispatcher::status::Status;
use isthmus_dispatcher::DispatcherConfig;
use isthmus_island_client::Event;
use isthmus_router::framed::FrameReader;
use isthmus_router::wire::{self, ClientFrame, Code, ServerFrame};
use isthmus_tests::etcd::{first_answer, join_via, Etcd};
use isthmus_tests::{http_request, new_island, start_router, HelloOpts, TestRouter, PATIENCE};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

fn settings(etcd: &Etcd) -> ClusterSettings {
    let mut c = ClusterConfig::from_url(&etcd.url(), "test").expect("url");
    c.ttl = Duration::from_secs(2);
    c.keep_alive_every = Duration::from_millis(250);
    c.load_every = Duration::from_millis(200);
    let mut s = ClusterSettings::new(c);
    s.hold_timeout = Duration::from_secs(5);
    s
}

async fn clustered(etcd: &Etcd) -> TestRouter {
    clustered_with(settings(etcd)).await
}

async fn clustered_with(settings: ClusterSettings) -> TestRouter {
    start_router(DispatcherConfig {
        cluster: Some(settings),
        beacon: None,
        croquet: None,
        ..DispatcherConfig::default()
    })
    .await
}

async fn status(r: &TestRouter) -> Status {
    let (line, body) = http_request(r.addr, "127.0.0.1", "/status.json").await;
    assert!(line.contains("200"), "{line}: {body}");
    serde_json::from_str(&body).expect("status JSON")
}

async fn cluster(r: &TestRouter) -> ClusterView {
    status(r)
        .await
        .cluster
        .expect("a clustered router shows its cluster")
}

async fn until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + PATIENCE;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn home_of(c: &ClusterView, session: &str) -> Option<(String, u64)> {
    c.islands
        .iter()
        .find(|i| i.session == session)
        .map(|i| (i.home.clone(), i.epoch))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn islands_are_placed_across_three_routers_and_any_router_leads_home() {
    let etcd = Etcd::start();
    let routers = [
        clustered(&etcd).await,
        clustered(&etcd).await,
        clustered(&etcd).await,
    ];
    for r in &routers {
        until("every router sees the three", || async {
            cluster(r).await.routers.len() == 3
        })
        .await;
    }
    let ids: Vec<String> = {
        let mut v = Vec::new();
        for r in &routers {
            v.push(cluster(r).await.router);
        }
        v
    };
    let addr_of = |id: &str| routers[ids.iter().position(|i| i == id).expect("known")].addr;

    // Six islands, all created through the first router: it keeps what it can and places the
    // rest on less loaded routers, each creator following a redirect.
    let mut islands = Vec::new();
    let mut redirected = 0;
    for n in 0..6 {
        let island = new_island();
        let opts = HelloOpts::new(&island, true);
        let (creator, home, hopped) = join_via(routers[0].addr, opts).await;
        redirected += usize::from(hopped);
        let w = creator.state().welcome.expect("welcome");
        assert!(w.created, "island {n} was created at its home");
        islands.push((island, creator, home, w.epoch));
        // Let every router's load reach the others before the next placement.
        let sessions: Vec<u64> = {
            let mut v = Vec::new();
            for r in &routers {
                v.push(status(r).await.totals.sessions);
            }
            v
        };
        until("the loads are published", || {
            let sessions = sessions.clone();
            let ids = ids.clone();
            let first = &routers[0];
            async move {
                let c = cluster(first).await;
                c.routers.iter().all(|r| {
                    let i = ids.iter().position(|id| *id == r.id).expect("known");
                    r.sessions == sessions[i]
                })
            }
        })
        .await;
    }
    assert!(
        redirected > 0,
        "some islands went elsewhere through a redirect"
    );
    let view = cluster(&routers[1]).await;
    let mut homes: Vec<String> = Vec::new();
    for (island, _, home, epoch) in &islands {
        let session = HelloOpts::new(island, false).session.to_string();
        let (router, e) = home_of(&view, &session).expect("every island is placed");
        assert_eq!(
            addr_of(&router),
            *home,
            "the record names the router that welcomed"
        );
        assert_eq!(e, *epoch, "welcomes carry the record's epoch");
        homes.push(router);
    }
    homes.sort();
    homes.dedup();
    assert_eq!(
        homes.len(),
        3,
        "islands are placed across all three routers"
    );

    // A replica given any router's address reaches its island's home, and is in the same
    // session as the creator there.
    for (island, creator, home, epoch) in islands.iter_mut() {
        for r in &routers {
            let opts = HelloOpts::new(island, false);
            let (mut joiner, at, hopped) = join_via(r.addr, opts).await;
            assert_eq!(at, *home);
            assert_eq!(
                hopped,
                r.addr != *home,
                "redirected only from other routers"
            );
            let w = joiner.state().welcome.expect("welcome");
            assert_eq!(w.epoch, *epoch);
            assert_eq!(
                w.cluster.len(),
                2,
                "the welcome names the other two routers"
            );
            joiner.wait_until(PATIENCE, "synced", |s| s.synced).await;
            joiner.send(&b"hello"[..]).await.expect("send");
            let s = joiner.wait_for_seq(1, PATIENCE).await;
            let seq = s.log.last().expect("stamped").seq.0;
            creator.wait_for_seq(seq, PATIENCE).await;
        }
    }

    // etcd holds one placement and one known record per island, and one key per router.
    assert_eq!(etcd.get_prefix("/isthmus/test/islands/").len(), 6);
    assert_eq!(etcd.get_prefix("/isthmus/test/known/").len(), 6);
    assert_eq!(etcd.get_prefix("/isthmus/test/routers/").len(), 3);
    for r in routers {
        r.shutdown.cancel();
        r.task.await.expect("router ends");
    }
    // Leaving revoked every lease: only the known records are left (the islands did not end
    // for good; their replicas may re-create them on any router).
    let left = etcd.get_prefix("/isthmus/test/");
    assert_eq!(left.len(), 6, "{left:?}");
    assert!(left
        .iter()
        .all(|(k, _)| k.starts_with("/isthmus/test/known/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_added_while_islands_run_takes_new_islands_and_touches_no_other() {
    let etcd = Etcd::start();
    let a = clustered(&etcd).await;
    let b = clustered(&etcd).await;
    let mut running = Vec::new();
    for r in [&a, &b] {
        let island = new_island();
        let (mut rep, _, hopped) = join_via(r.addr, HelloOpts::new(&island, true)).await;
        assert!(
            !hopped,
            "an idle cluster keeps islands where they are asked"
        );
        rep.wait_until(PATIENCE, "synced", |s| s.synced).await;
        rep.send(&b"before"[..]).await.expect("send");
        rep.wait_for_seq(1, PATIENCE).await;
        running.push((island, rep));
    }
    until("a sees both routers' loads", || async {
        let v = cluster(&a).await;
        v.routers.len() == 2 && v.routers.iter().all(|r| r.sessions == 1)
    })
    .await;
    let before = cluster(&a).await;

    let c = clustered(&etcd).await;
    let c_id = cluster(&c).await.router;
    until("a sees the new router", || async {
        cluster(&a).await.routers.iter().any(|r| r.id == c_id)
    })
    .await;
    // The next island asked of a (which carries one) goes to the new, idle router.
    let island = new_island();
    let (mut fresh, home, hopped) = join_via(a.addr, HelloOpts::new(&island, true)).await;
    assert!(hopped && home == c.addr, "placed on the new router");
    fresh.send(&b"new"[..]).await.expect("send");
    fresh.wait_for_seq(1, PATIENCE).await;

    // The running islands kept their homes and epochs, and their replicas were never cut.
    let after = cluster(&a).await;
    for (island, rep) in running.iter_mut() {
        let session = HelloOpts::new(island, false).session.to_string();
        assert_eq!(home_of(&after, &session), home_of(&before, &session));
        rep.send(&b"after"[..]).await.expect("send");
        let s = rep.wait_for_seq(2, PATIENCE).await;
        assert!(s.closed.is_none() && !s.ended && s.violations.is_empty());
    }
    for r in [a, b, c] {
        r.shutdown.cancel();
        r.task.await.expect("router ends");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_cut_off_from_etcd_stops_stamping_before_another_router_may_take_the_island() {
    let etcd = Etcd::start();
    // A wide margin: the goodbyes must reach the replicas before the TTL even on a busy
    // machine; the fence itself fires at TTL - margin after the last acknowledged keep-alive.
    let mut s = settings(&etcd);
    s.etcd.ttl = Duration::from_secs(3);
    s.etcd.fence_margin = Duration::from_secs(1);
    let ttl = s.etcd.ttl;
    let a = clustered_with(s.clone()).await;
    let b = clustered_with(s).await;
    until("a sees b", || async {
        cluster(&a).await.routers.len() == 2
    })
    .await;
    let island = new_island();
    let (mut first, home, _) = join_via(a.addr, HelloOpts::new(&island, true)).await;
    assert_eq!(home, a.addr);
    let session = HelloOpts::new(&island, false).session;
    let mut replicas = vec![first];
    for _ in 0..2 {
        let (r, _, _) = join_via(a.addr, HelloOpts::new(&island, false)).await;
        replicas.push(r);
    }
    for r in replicas.iter_mut() {
        r.wait_until(PATIENCE, "synced", |s| s.synced).await;
    }
    // While a holds its lease, b cannot take the island: it sends a creating hello home.
    let ServerFrame::Redirect { contacts, epoch } =
        first_answer(b.addr, &HelloOpts::new(&island, true)).await
    else {
        panic!("b redirects to the home");
    };
    assert_eq!(contacts[0].internal[0], a.addr);

    // Every replica sends all the time; etcd is cut off with SIGSTOP while they stay
    // connected to a.
    first = replicas.remove(0);
    let senders: Vec<_> = std::iter::once(first)
        .chain(replicas)
        .map(|mut r| {
            tokio::spawn(async move {
                for _ in 0..10_000 {
                    if r.send(&b"x"[..]).await.is_err() || r.state().closed.is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                r
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cut = Instant::now();
    etcd.pause(true);
    let mut replicas = Vec::new();
    for s in senders {
        replicas.push(s.await.expect("sender"));
    }
    let stopped = Instant::now();
    // Every replica was told the island moves (1010) while etcd was still cut off: a
    // stopped in time (etcd expires the lease only after the TTL from its last keep-alive).
    assert!(
        stopped < cut + ttl,
        "a stopped {:?} after the cut, within the lease TTL",
        stopped - cut
    );
    let mut last_seq = 0;
    for r in &replicas {
        let s = r.state();
        let (code, reason) = s.closed.clone().expect("a goodbye");
        assert_eq!(
            code,
            Code::MOVING,
            "the island moves on, not ends: {reason}"
        );
        assert!(s.violations.is_empty(), "{:?}", s.violations);
        last_seq = last_seq.max(s.log.last().map_or(0, |m| m.seq.0));
    }
    assert!(last_seq > 10, "the island was busy before the cut");
    // No two replicas applied different messages for one seq.
    for r in &replicas[1..] {
        let (x, y) = (r.state().log, replicas[0].state().log);
        for (m, n) in x.iter().zip(y.iter()) {
            assert_eq!(m, n, "one order");
        }
    }
    // a takes no joins while it has no lease.
    let Some(ServerFrame::Refuse { code, reason }) =
        Some(first_answer(a.addr, &HelloOpts::new(&island, false)).await)
    else {
        panic!("a refuses while fenced");
    };
    assert_eq!(code, Code::BUSY, "{reason}");
    assert!(reason.contains("lost its cluster lease"), "{reason}");

    // etcd comes back: a's lease has lapsed, its record is gone, and b may take the island
    // at a higher epoch.
    etcd.pause(false);
    // b lost its lease too while etcd was stopped: it refuses until it has a new one.
    let deadline = Instant::now() + PATIENCE;
    loop {
        match first_answer(b.addr, &HelloOpts::new(&island, true)).await {
            ServerFrame::Welcome(w) if w.epoch > epoch => break,
            ServerFrame::Redirect { epoch: e, .. } if e > epoch => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "the island moved in time: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let (mut moved, _, _) = join_via(b.addr, HelloOpts::new(&island, true)).await;
    let w = moved.state().welcome.expect("welcome");
    assert!(w.epoch > epoch, "the new home's epoch is higher");
    assert_eq!(w.session, session);
    moved.send(&b"moved"[..]).await.expect("send");
    moved.wait_for_seq(1, PATIENCE).await;
    for r in [a, b] {
        r.shutdown.cancel();
        r.task.await.expect("router ends");
    }
}

/// Every event of a replica, with when it arrived.
type Log = std::sync::Arc<std::sync::Mutex<Vec<(Instant, Event)>>>;

async fn wait_event(log: &Log, what: &str, want: impl Fn(&(Instant, Event)) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if log.lock().expect("log").iter().any(&want) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_a_home_cut_off_from_etcd_move_on_and_never_apply_two_messages_for_one_seq() {
    use isthmus_contact::{ContactPoint, Postcard};
    use isthmus_island_client::chat::ChatIsland;
    use isthmus_island_client::{client, ClientConfig, ReplicaConfig};
    use isthmus_router::auth::Capability;
    use isthmus_router::ids::{Seq, SessionId};
    use isthmus_router::wire::CreateOptions;
    use std::collections::HashMap;

    let etcd = Etcd::start();
    let mut s = settings(&etcd);
    s.etcd.ttl = Duration::from_secs(3);
    s.etcd.fence_margin = Duration::from_secs(1);
    let ttl = s.etcd.ttl;
    let a = clustered_with(s.clone()).await;
    let b = clustered_with(s).await;
    until("a sees b", || async {
        cluster(&a).await.routers.len() == 2
    })
    .await;

    let card = Postcard::for_new_island(
        ContactPoint::new(SessionId::random(), "cut", vec![]),
        Capability::new_island(),
    )
    .expect("postcard");
    let names = ["a", "b", "c"];
    let per_replica = 1000u64;
    let total = per_replica * names.len() as u64;
    let mut handles = Vec::new();
    let mut logs: Vec<Log> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut replica = ReplicaConfig::from_postcard(&card, *name);
        replica.create = (i == 0).then(CreateOptions::default);
        replica.stop_after = Some(Seq(total));
        let mut cfg = ClientConfig::new(vec![a.addr, b.addr], replica);
        cfg.backoff_initial = Duration::from_millis(50);
        cfg.backoff_max = Duration::from_millis(400);
        let (h, mut events) = client::connect(cfg, ChatIsland::default())
            .await
            .expect("connect");
        let log: Log = Default::default();
        let sink = log.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                sink.lock().expect("log").push((Instant::now(), e));
            }
        });
        handles.push((name.to_string(), std::sync::Arc::new(h)));
        logs.push(log);
    }
    let first_epoch = {
        let v = cluster(&a).await;
        assert_eq!(v.islands.len(), 1, "one island, at a");
        assert_eq!(v.islands[0].home, v.router);
        v.islands[0].epoch
    };
    let senders = isthmus_tests::type_chat_lines(&handles, per_replica, Duration::from_millis(4));
    for log in &logs {
        wait_event(
            log,
            "traffic",
            |(_, e)| matches!(e, Event::Message(m) if m.seq.0 >= total / 5),
        )
        .await;
    }
    // etcd stops answering while every replica stays connected to a.
    let cut = Instant::now();
    etcd.pause(true);
    for log in &logs {
        wait_event(log, "a's goodbye", |(t, e)| {
            *t > cut && matches!(e, Event::Disconnected { .. })
        })
        .await;
    }
    let fenced = Instant::now();
    assert!(
        fenced < cut + ttl,
        "a stopped {:?} after the cut, before etcd could expire its lease",
        fenced - cut
    );
    etcd.pause(false);

    for s in senders {
        s.await.expect("every send handed over");
    }
    let mut digests = Vec::new();
    let mut at_seq: HashMap<u64, (String, u64, bytes::Bytes)> = HashMap::new();
    for log in &logs {
        wait_event(log, "the stop", |(_, e)| matches!(e, Event::Stopped { .. })).await;
        let events = log.lock().expect("log").clone();
        assert!(
            !events
                .iter()
                .any(|(_, e)| matches!(e, Event::SessionLost { .. })),
            "nobody loses the island: {events:?}"
        );
        for (_, e) in &events {
            if let Event::Message(m) = e {
                let this = (format!("{:?}", m.origin), m.client_seq, m.payload.clone());
                let seen = at_seq.entry(m.seq.0).or_insert_with(|| this.clone());
                assert_eq!(*seen, this, "two different messages at seq {}", m.seq.0);
            }
        }
        let Some((_, Event::Stopped { seq, digest })) = events.last().cloned() else {
            panic!("stopped last")
        };
        assert_eq!(seq, Seq(total));
        digests.push(digest);
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "one state");
    let (lines, _) = handles[0]
        .1
        .inspect(|c: &ChatIsland, seq| (c.lines().map(|l| l.text.clone()).collect::<Vec<_>>(), seq))
        .await
        .expect("inspect");
    let mut unique = lines.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(lines.len() as u64, total, "no gap, no duplicate");
    assert_eq!(
        unique.len() as u64,
        total,
        "every send stamped exactly once"
    );
    // The island was placed again, at a higher epoch.
    let v = cluster(&b).await;
    assert!(
        v.islands.iter().all(|i| i.epoch > first_epoch),
        "{:?}",
        v.islands
    );
    for r in [a, b] {
        r.shutdown.cancel();
        r.task.await.expect("router ends");
    }
}

/// The cluster remembers which islands exist, so a router whose create policy refuses the
/// replicas' address (`create = none` stands in for a `lan` router reached from afar)
/// re-creates a known island from their recovering hellos, and still refuses an unknown one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_island_fails_over_to_a_router_that_would_not_create_it() {
    let etcd = Etcd::start();
    let a = clustered(&etcd).await;
    let known = new_island();
    let (creator, home, _) = join_via(a.addr, HelloOpts::new(&known, true)).await;
    assert_eq!(home, a.addr, "the only router is the home");
    let w = creator.state().welcome.expect("welcome");
    let session = w.session.to_string();
    // The home writes the record at creation: public keys and options, no lease, no secret.
    until("the island is known", || async {
        !etcd.get_prefix("/isthmus/test/known/").is_empty()
    })
    .await;
    let records = etcd.get_prefix("/isthmus/test/known/");
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0].0.ends_with(&session), "{records:?}");
    assert!(!records[0].1.contains("secret"), "{records:?}");

    let b = start_router(DispatcherConfig {
        cluster: Some(settings(&etcd)),
        create: isthmus_dispatcher::CreatePolicy::None,
        beacon: None,
        croquet: None,
        ..DispatcherConfig::default()
    })
    .await;
    // The home goes (its lease is revoked, its placement with it); the island stays known.
    a.shutdown.cancel();
    a.task.await.expect("router a stops");
    drop(creator);
    until("b is alone and the island unplaced", || async {
        let c = cluster(&b).await;
        c.routers.len() == 1 && c.islands.is_empty()
    })
    .await;
    assert_eq!(etcd.get_prefix("/isthmus/test/known/").len(), 1);

    let recovering = |island: &_, w: &isthmus_router::wire::Welcome| {
        let mut opts = HelloOpts::new(island, false);
        opts.recover = Some(isthmus_router::wire::Recover {
            incarnation: w.incarnation,
            epoch: w.epoch,
            time: w.time,
            members: 1,
            tick_interval_us: w.tick_interval_us,
            create: None,
        });
        opts
    };
    // An island the cluster never had: b's create policy applies.
    let unknown = new_island();
    match first_answer(b.addr, &recovering(&unknown, &w)).await {
        ServerFrame::Refuse { code, reason } => {
            assert_eq!(code, Code::CREATE_NOT_ALLOWED, "{reason}")
        }
        other => panic!("an unknown island is refused, not {other:?}"),
    }
    // The known one is re-created at b, under a new placement, from this replica (it founds
    // the session: it resumes from a seq and pipelines its duplicate table).
    let mut opts = recovering(&known, &w);
    opts.resume_from = Some(w.last_seq);
    let mut s = tokio::net::TcpStream::connect(b.addr)
        .await
        .expect("connect b");
    let nonce = isthmus_tests::exchange_preambles(&mut s)
        .await
        .expect("preambles");
    for frame in [
        ClientFrame::Hello(opts.sign(&nonce)),
        ClientFrame::Seen {
            entries: Vec::new(),
        },
    ] {
        s.write_all(&wire::encode(&frame)).await.expect("write");
    }
    let mut frames = FrameReader::new(s, usize::MAX);
    let again = loop {
        let frame = tokio::time::timeout(PATIENCE, frames.read::<ServerFrame>())
            .await
            .expect("an answer in time")
            .expect("a frame");
        match frame {
            ServerFrame::Welcome(w) => break w,
            ServerFrame::Refuse { code, reason } => {
                panic!("a known island is re-created at b, not refused: {code}: {reason}")
            }
            _ => {}
        }
    };
    assert_eq!(again.session, w.session);
    assert!(again.epoch > w.epoch, "a new home, a new epoch");
    // Alone in its cluster, b names itself, so a goodbye when it is fenced is not taken for the
    // island's end.
    assert_eq!(again.cluster.len(), 1, "{:?}", again.cluster);
    assert_eq!(again.cluster[0].internal, vec![b.addr]);
    let (router, epoch) = home_of(&cluster(&b).await, &session).expect("placed at b");
    assert_eq!((router, epoch), (cluster(&b).await.router, again.epoch));

    // Closed by its admin, the island ends for good: the cluster forgets it with its placement.
    let admin_opts = HelloOpts::with_cap(isthmus_tests::keys_of(&known), known, false);
    let mut admin = isthmus_tests::WireReplica::connect(b.addr, admin_opts)
        .await
        .expect("admin connects");
    admin
        .wait_until(PATIENCE, "the admin's welcome", |s| {
            s.welcome.is_some() || s.ended
        })
        .await
        .welcome
        .expect("the admin is welcomed");
    admin
        .admin(isthmus_router::wire::AdminCommand::Close)
        .await
        .expect("close");
    until("the island is forgotten", || async {
        etcd.get_prefix("/isthmus/test/known/").is_empty() && cluster(&b).await.islands.is_empty()
    })
    .await;
    drop(frames);
}
