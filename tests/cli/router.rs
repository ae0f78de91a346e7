use isthmus_router::ids::SessionId;
use isthmus_router::wire::Code;
use isthmus_tests::{HelloOpts, WireReplica, PATIENCE};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// Starts `isthmus router` on a free loopback port and reads its ready line. Never beacons:
/// outside a test network namespace, broadcasts would leave for the host's real LAN.
pub fn spawn_router(extra: &[&str]) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args([
            "router",
            "--listen",
            "127.0.0.1",
            "--port",
            "0",
            "--no-beacon",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start isthmus router");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("ready line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
        .parse()
        .expect("address in the ready line");
    (child, addr)
}

pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_command_serves_and_says_goodbye_on_sigterm() {
    let (mut child, addr) = spawn_router(&["--tick-ms", "20"]);
    assert!(addr.ip().is_loopback());
    let session = SessionId::random();
    let mut a = WireReplica::connect(addr, HelloOpts::new(session, true))
        .await
        .expect("connect");
    let s = a.wait_until(PATIENCE, "synced", |s| s.synced).await;
    let welcome = s.welcome.expect("welcome");
    assert_eq!(
        welcome.tick_interval_us, 20_000,
        "--tick-ms reaches the session"
    );
    assert_eq!(welcome.contacts.internal, vec![addr]);
    assert!(!welcome.contacts.remote, "a loopback requester is local");
    a.send("hello").await.expect("send");
    a.wait_for_seq(1, PATIENCE).await;
    a.wait_until(PATIENCE, "a tick", |s| s.ticks > 0).await;

    sigterm(&child);
    let s = a.wait_until(PATIENCE, "goodbye", |s| s.ended).await;
    assert_eq!(s.closed.map(|c| c.0), Some(Code::SHUTTING_DOWN));
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn router_command_explains_a_busy_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args(["router", "--listen", "127.0.0.1", "--port", &port])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on"), "{err}");
    assert!(err.contains("--port"), "says what to do: {err}");
}
