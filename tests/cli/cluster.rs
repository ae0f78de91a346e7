//! `isthmus router --cluster` end to end: real router processes, a real etcd on loopback, and
//! `isthmus status` showing the cluster.

use crate::proc::{exits_in_time, isthmus};
use crate::router::{sigterm, spawn_router};
use isthmus_tests::etcd::{join_via, Etcd};
use isthmus_tests::{new_island, HelloOpts, PATIENCE};
use serde_json::Value;
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Runs a router with `args` that must fail; its exit code and stderr.
fn failing_router(args: &[&str]) -> (i32, String) {
    let mut child = isthmus()
        .args([
            "router",
            "--listen",
            "127.0.0.1",
            "--port",
            "0",
            "--no-beacon",
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start isthmus router");
    let status = exits_in_time(&mut child, "a router with a bad cluster kept running");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    (status.code().unwrap_or(-1), err)
}

#[test]
fn cluster_flags_that_cannot_work_say_what_to_do() {
    let (code, err) = failing_router(&["--cluster", "http://127.0.0.1:2379"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("does not start with etcd://"), "{err}");
    assert!(err.contains("etcd://HOST:PORT"), "{err}");

    let (code, err) = failing_router(&["--cluster-name", "eu"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("add --cluster etcd://HOST:PORT"), "{err}");

    let (code, err) = failing_router(&[
        "--cluster",
        "etcd://127.0.0.1:2379",
        "--cluster-name",
        "a/b",
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("is not usable"), "{err}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("etcd://127.0.0.1:{port}");
    let (code, err) = failing_router(&["--cluster", &url]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("cannot reach etcd at 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        err.contains("start etcd there, or correct --cluster"),
        "{err}"
    );
}

fn status(addr: SocketAddr, json: bool) -> String {
    let mut cmd = isthmus();
    cmd.args(["status", "--router", &addr.to_string()]);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("isthmus status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cluster_json(addr: SocketAddr) -> Value {
    let v: Value = serde_json::from_str(&status(addr, true)).expect("status JSON");
    v["cluster"].clone()
}

fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_processes_form_a_cluster_that_status_shows_and_leave_it() {
    let etcd = Etcd::start();
    let url = etcd.url();
    // Two join by flags, the third by its profile's cluster keys.
    let prefs = std::env::temp_dir().join(format!("isthmus-cluster-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(
        &prefs,
        format!("[profiles.clustered]\ncluster = {{ etcd = \"{url}\", name = \"cli\" }}\n"),
    )
    .expect("prefs file");
    let prefs_path = prefs.to_string_lossy().into_owned();
    let mut routers: Vec<(Killed, SocketAddr)> = (0..3)
        .map(|i| {
            let (child, addr) = if i < 2 {
                spawn_router(&["--cluster", &url, "--cluster-name", "cli"])
            } else {
                spawn_router(&["--prefs", &prefs_path, "--profile", "clustered"])
            };
            (Killed(child), addr)
        })
        .collect();
    let first = routers[0].1;
    until("the first router sees three", || {
        cluster_json(first)["routers"]
            .as_array()
            .map_or(0, Vec::len)
            == 3
    });

    // Islands created through the first router; each creator follows a redirect if placed
    // elsewhere.
    let mut islands = Vec::new();
    for _ in 0..3 {
        let island = new_island();
        let (rep, home, _) = join_via(first, HelloOpts::new(&island, true)).await;
        islands.push((
            HelloOpts::new(&island, false).session.to_string(),
            home,
            rep,
        ));
    }
    let view = cluster_json(first);
    let id_at = |addr: SocketAddr| -> String {
        view["routers"]
            .as_array()
            .expect("routers")
            .iter()
            .find(|r| {
                r["contacts"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|a| a.as_str() == Some(&addr.to_string())))
            })
            .and_then(|r| r["id"].as_str())
            .expect("every router is listed with its contact")
            .to_string()
    };
    let text = status(first, false);
    assert!(text.contains("cluster cli: 3 routers"), "{text}");
    for (session, home, _) in &islands {
        let line = format!("  island {session}  home {}  epoch ", id_at(*home));
        assert!(text.contains(&line), "{line:?} in:\n{text}");
    }

    // SIGKILL a router: its key and its islands' records go when its lease lapses.
    let (victim, victim_addr) = routers.pop().expect("three");
    let victim_id = id_at(victim_addr);
    drop(victim);
    until("the killed router leaves the cluster", || {
        let c = cluster_json(first);
        c["routers"].as_array().map_or(0, Vec::len) == 2
            && !c["islands"]
                .as_array()
                .is_some_and(|i| i.iter().any(|i| i["home"] == victim_id.as_str()))
    });
    // SIGTERM another: it says goodbye, then revokes its lease, leaving nothing behind.
    let (second, second_addr) = routers.pop().expect("two");
    let second_id = id_at(second_addr);
    let mut second = second;
    sigterm(&second.0);
    exits_in_time(&mut second.0, "a clustered router ignored SIGTERM");
    let c = cluster_json(first);
    let _ = std::fs::remove_file(&prefs);
    assert_eq!(c["routers"].as_array().map_or(0, Vec::len), 1, "{c}");
    assert!(
        !c["islands"]
            .as_array()
            .is_some_and(|i| i.iter().any(|i| i["home"] == second_id.as_str())),
        "{c}"
    );
}

/// The address of router `id` in a cluster view.
fn addr_of(view: &Value, id: &str) -> SocketAddr {
    view["routers"]
        .as_array()
        .expect("routers")
        .iter()
        .find(|r| r["id"] == id)
        .and_then(|r| r["contacts"][0].as_str())
        .and_then(|a| a.parse().ok())
        .expect("the router is listed with a contact")
}

/// Every event of a replica, with when it arrived.
type Log = std::sync::Arc<std::sync::Mutex<Vec<(Instant, isthmus_island_client::Event)>>>;

async fn wait_event(log: &Log, what: &str, want: impl Fn(&isthmus_island_client::Event) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if log.lock().expect("log").iter().any(|(_, e)| want(e)) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_home_of_a_busy_island_is_killed_and_its_replicas_carry_on_at_another_router() {
    carry_on_after("SIGKILL", 2500).await;
}

/// A home stopped with SIGTERM says goodbye and revokes its lease: its replicas carry the island
/// on at another router without waiting for the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_home_of_an_island_stopped_with_sigterm_hands_its_replicas_to_another_router() {
    carry_on_after("SIGTERM", 1000).await;
}

/// Four replicas (each sending every 4 ms, `per_replica` sends) of an island in a cluster of
/// three router processes; the home is stopped with `signal` mid-traffic, and the island must
/// carry on whole at another router.
async fn carry_on_after(signal: &str, per_replica: u64) {
    use isthmus_contact::{ContactPoint, Postcard};
    use isthmus_island_client::chat::ChatIsland;
    use isthmus_island_client::{client, ClientConfig, Event, ReplicaConfig};
    use isthmus_router::auth::Capability;
    use isthmus_router::ids::{Seq, SessionId};
    use isthmus_router::wire::CreateOptions;

    let etcd = Etcd::start();
    let url = etcd.url();
    let mut routers: Vec<(Killed, SocketAddr)> = (0..3)
        .map(|_| {
            let (child, addr) = spawn_router(&["--cluster", &url]);
            (Killed(child), addr)
        })
        .collect();
    let addrs: Vec<SocketAddr> = routers.iter().map(|r| r.1).collect();
    until("the routers see each other", || {
        cluster_json(addrs[0])["routers"]
            .as_array()
            .map_or(0, Vec::len)
            == 3
    });

    // Four replicas, each sending every 4 ms: about 1,000 messages a second in all. Each knows
    // every router (as a cluster postcard lists them) and starts at a different one.
    let card = Postcard::for_new_island(
        ContactPoint::new(SessionId::random(), "busy", vec![]),
        Capability::new_island(),
    )
    .expect("postcard");
    let names = ["a", "b", "c", "d"];
    let total = per_replica * names.len() as u64;
    let mut handles = Vec::new();
    let mut logs: Vec<Log> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut replica = ReplicaConfig::from_postcard(&card, *name);
        replica.create = (i == 0).then(CreateOptions::default);
        replica.stop_after = Some(Seq(total));
        let mut order = addrs.clone();
        order.rotate_left(i % addrs.len());
        let mut cfg = ClientConfig::new(order, replica);
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
        if i == 0 {
            wait_event(&log, "the creator's welcome", |e| {
                matches!(e, Event::Welcomed { .. })
            })
            .await;
        }
        handles.push((name.to_string(), std::sync::Arc::new(h)));
        logs.push(log);
    }
    let senders = isthmus_tests::type_chat_lines(&handles, per_replica, Duration::from_millis(4));

    // SIGKILL the island's home in the middle of the traffic.
    let session = card.contact.session.to_string();
    for log in &logs {
        wait_event(
            log,
            "traffic",
            |e| matches!(e, Event::Message(m) if m.seq.0 >= total / 5),
        )
        .await;
    }
    let view = cluster_json(addrs[0]);
    let home_id = view["islands"]
        .as_array()
        .and_then(|l| l.iter().find(|i| i["session"] == session.as_str()))
        .and_then(|i| i["home"].as_str())
        .expect("the island is placed")
        .to_string();
    let home = addr_of(&view, &home_id);
    let at = routers.iter().position(|r| r.1 == home).expect("a home");
    let killed_at = Instant::now();
    let (mut home_proc, _) = routers.remove(at);
    if signal == "SIGTERM" {
        sigterm(&home_proc.0);
        let status = exits_in_time(&mut home_proc.0, "a clustered router ignored SIGTERM");
        assert!(status.success(), "{status:?}");
    }
    drop(home_proc);

    for s in senders {
        s.await.expect("every send handed over");
    }
    let mut digests = Vec::new();
    let mut back = Duration::ZERO;
    for log in &logs {
        wait_event(log, "the stop", |e| matches!(e, Event::Stopped { .. })).await;
        let events = log.lock().expect("log").clone();
        assert!(
            !events
                .iter()
                .any(|(_, e)| matches!(e, Event::SessionLost { .. })),
            "nobody loses the island: {events:?}"
        );
        let again = events
            .iter()
            .find(|(t, e)| *t > killed_at && matches!(e, Event::Reconnected))
            .map(|(t, _)| *t - killed_at)
            .expect("every replica serves again");
        back = back.max(again);
        let resyncs = events
            .iter()
            .filter(|(t, e)| {
                *t > killed_at && matches!(e, Event::Restored { .. } | Event::StartedFresh)
            })
            .count();
        if signal == "SIGTERM" {
            // Every replica had the whole order when the home said goodbye: the island goes on
            // from it with no snapshot and no full resync.
            assert_eq!(
                resyncs, 0,
                "a graceful hand-over resyncs nobody: {events:?}"
            );
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
    assert_eq!(lines.len() as u64, total, "no gap, no duplicate");
    let mut unique = lines.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len() as u64,
        total,
        "every send stamped exactly once"
    );

    // The island lives at another router now, at a higher epoch.
    let view = cluster_json(routers[0].1);
    let now_home = view["islands"]
        .as_array()
        .and_then(|l| l.iter().find(|i| i["session"] == session.as_str()))
        .and_then(|i| i["home"].as_str())
        .expect("placed again")
        .to_string();
    assert_ne!(now_home, home_id);
    println!("failover: every replica serving again {back:?} after the {signal}");
}
