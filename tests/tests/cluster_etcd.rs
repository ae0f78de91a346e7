//! The cluster crate against a real etcd on loopback: membership, the placement transaction,
//! releases, and the fencing clock when etcd is cut off (SIGSTOP) and back.

use isthmus_cluster::{
    ClusterConfig, LeaseState, Load, Member, PlaceOutcome, RouterRecord, WaitOutcome,
};
use isthmus_tests::etcd::Etcd;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(20);

fn config(etcd: &Etcd) -> ClusterConfig {
    let mut cfg = ClusterConfig::from_url(&etcd.url(), "test").expect("url");
    // Short enough for a test, long enough for etcd (its shortest TTL is 1.5 election timeouts).
    cfg.ttl = Duration::from_secs(2);
    cfg.keep_alive_every = Duration::from_millis(250);
    cfg.fence_margin = Duration::from_millis(500);
    cfg.load_every = Duration::from_millis(200);
    cfg
}

fn record(port: u16) -> RouterRecord {
    RouterRecord {
        id: Uuid::new_v4(),
        internal: vec![format!("127.0.0.1:{port}").parse().expect("literal")],
        external: None,
        load: Load::default(),
        draining: false,
        lease: 0,
        version: "test".into(),
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_see_each_other_and_one_placement_wins() {
    let etcd = Etcd::start();
    let a = Member::join(config(&etcd), record(1), CancellationToken::new())
        .await
        .expect("a joins");
    let b = Member::join(config(&etcd), record(2), CancellationToken::new())
        .await
        .expect("b joins");
    until("a sees b", || a.routers().len() == 2).await;
    assert_eq!(b.routers().len(), 2);
    assert!(
        etcd.get_prefix("/isthmus/test/routers/").len() == 2,
        "both routers are registered"
    );

    let x = Uuid::new_v4();
    assert_eq!(a.lookup(x).await.expect("lookup"), None);
    let PlaceOutcome::Won(epoch) = a.place(x, &a.me()).await.expect("place") else {
        panic!("the first placement wins");
    };
    let PlaceOutcome::Taken(p) = b.place(x, &b.me()).await.expect("place") else {
        panic!("the second placement loses");
    };
    assert_eq!(
        (p.placement.home, p.epoch, p.lease),
        (a.id(), epoch, a.me().lease)
    );
    assert_eq!(b.lookup(x).await.expect("lookup"), Some(p.clone()));
    assert!(
        !b.release(x, epoch - 1, false).await.expect("release"),
        "not that epoch"
    );
    assert!(b.lookup(x).await.expect("lookup").is_some());
    // That an island exists outlives its placement, until it ends for good.
    a.remember(x, b"{\"x\":1}".to_vec())
        .await
        .expect("remember");
    assert!(a.release(x, epoch, false).await.expect("release"));
    assert_eq!(a.lookup(x).await.expect("lookup"), None);
    assert_eq!(
        b.known(x).await.expect("known").as_deref(),
        Some(&b"{\"x\":1}"[..]),
        "a released placement keeps the island known"
    );
    // Placed again, it has a higher epoch.
    let PlaceOutcome::Won(again) = b.place(x, &b.me()).await.expect("place") else {
        panic!("free again");
    };
    assert!(again > epoch);
    // Ended for good: the known record goes with the placement, in one request; a stale epoch
    // (the record is another home's now) still forgets the island.
    assert!(b.release(x, again, true).await.expect("release"));
    assert_eq!(a.lookup(x).await.expect("lookup"), None);
    assert_eq!(a.known(x).await.expect("known"), None);
    a.remember(x, b"{}".to_vec()).await.expect("remember");
    assert!(!a.release(x, again, true).await.expect("release"));
    assert_eq!(a.known(x).await.expect("known"), None);

    // A router places an island on another: the record lives under the other's lease.
    let y = Uuid::new_v4();
    let b_record = a.router(b.id()).expect("a knows b");
    assert!(matches!(
        a.place(y, &b_record).await.expect("place"),
        PlaceOutcome::Won(_)
    ));
    assert_eq!(
        a.lookup(y).await.expect("lookup").map(|p| p.placement.home),
        Some(b.id())
    );
    assert_eq!(a.islands().await.expect("list").len(), 1, "y only: x ended");

    // Leaving revokes the lease: its key and its islands' records go at once.
    b.leave().await;
    assert_eq!(a.lookup(y).await.expect("lookup"), None);
    assert_eq!(a.lookup(x).await.expect("lookup"), None);
    until("a sees b leave", || a.routers().len() == 1).await;
    let ops = a.ops();
    assert!(
        ops.writes >= 3 && ops.reads >= 4 && ops.keep_alives >= 1,
        "{ops:?}"
    );
    a.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_cut_off_from_etcd_fences_before_its_records_go() {
    let etcd = Etcd::start();
    let cfg = config(&etcd);
    let a = Member::join(cfg.clone(), record(1), CancellationToken::new())
        .await
        .expect("a joins");
    let b = Member::join(cfg.clone(), record(2), CancellationToken::new())
        .await
        .expect("b joins");
    let x = Uuid::new_v4();
    let PlaceOutcome::Won(epoch) = a.place(x, &a.me()).await.expect("place") else {
        panic!("placed");
    };
    let old_lease = a.me().lease;

    // When did a stop (its lease state went Lost)?
    let mut states = a.lease_watch();
    let fenced = tokio::spawn(async move {
        loop {
            if *states.borrow_and_update() == LeaseState::Lost {
                return Instant::now();
            }
            states.changed().await.expect("a's lease keeper runs");
        }
    });
    // When did the record go (as another router sees it)?
    let watcher = b.clone();
    let gone = tokio::spawn(async move {
        let seen = watcher.wait_gone(x, epoch, PATIENCE).await.expect("watch");
        (seen, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cut = Instant::now();
    etcd.pause(true);
    // Past the TTL: etcd will expire a's lease as soon as it runs again.
    tokio::time::sleep(cfg.ttl + Duration::from_secs(1)).await;
    let fenced_at = tokio::time::timeout(Duration::from_millis(10), fenced)
        .await
        .expect("a fenced itself while etcd was cut off")
        .expect("task");
    assert!(
        fenced_at <= cut + cfg.ttl,
        "a stopped {:?} after the cut, within the TTL",
        fenced_at - cut
    );
    etcd.pause(false);
    let (seen, gone_at) = gone.await.expect("task");
    assert_eq!(seen, WaitOutcome::Gone);
    assert!(fenced_at < gone_at, "a stopped before its record went");

    // a gets a new lease and registers again; b sees it.
    until(
        "a holds a new lease",
        || matches!(a.lease(), LeaseState::Held { id, .. } if id != old_lease),
    )
    .await;
    until("b sees a again", || {
        b.router(a.id()).is_some_and(|r| r.lease != old_lease)
    })
    .await;
    a.leave().await;
    b.leave().await;
}

#[tokio::test]
async fn an_unreachable_etcd_is_named_with_what_to_do() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut cfg =
        ClusterConfig::from_url(&format!("etcd://127.0.0.1:{port}"), "test").expect("url");
    cfg.op_timeout = Duration::from_millis(500);
    let e = Member::join(cfg, record(1), CancellationToken::new())
        .await
        .err()
        .expect("no etcd there")
        .to_string();
    assert!(e.contains("cannot reach etcd at 127.0.0.1:"), "{e}");
    assert!(e.contains("start etcd there, or correct --cluster"), "{e}");
}
