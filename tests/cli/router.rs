use isthmus_router::wire::Code;
use isthmus_tests::{HelloOpts, WireReplica, PATIENCE};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// `isthmus router` on a free loopback port that never beacons: outside a test network
/// namespace, broadcasts would leave for the host's real LAN.
pub const LOOPBACK_ROUTER: [&str; 6] = [
    "router",
    "--listen",
    "127.0.0.1",
    "--port",
    "0",
    "--no-beacon",
];

/// Starts a [`LOOPBACK_ROUTER`] and reads its ready line.
pub fn spawn_router(extra: &[&str]) -> (Child, SocketAddr) {
    let mut args = LOOPBACK_ROUTER.to_vec();
    args.extend_from_slice(extra);
    spawn_ready(&args)
}

/// Runs `isthmus ARGS` (a router) and waits for its `listening on ADDR` line.
pub fn spawn_ready(args: &[&str]) -> (Child, SocketAddr) {
    let mut child = crate::proc::isthmus()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start isthmus router");
    let addr = isthmus_tests::router_ready(&mut child);
    (child, addr)
}

/// The tick interval a router's welcome announces, in microseconds.
async fn tick_us(addr: SocketAddr) -> u64 {
    let mut a = WireReplica::connect(addr, HelloOpts::new(&isthmus_tests::new_island(), true))
        .await
        .expect("connect");
    let s = a
        .wait_until(PATIENCE, "welcome", |s| s.welcome.is_some())
        .await;
    s.welcome.expect("welcome").tick_interval_us
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
    let mut a = WireReplica::connect(addr, HelloOpts::new(&isthmus_tests::new_island(), true))
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
    let out = crate::proc::isthmus()
        .args(["router", "--listen", "127.0.0.1", "--port", &port])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on"), "{err}");
    assert!(err.contains("--port"), "says what to do: {err}");
    assert_eq!(
        err.matches("Address already in use").count(),
        1,
        "the cause is said once: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_edited_from_the_command_line_and_flags_override_them() {
    let dir = std::env::temp_dir().join(format!("isthmus-prefs-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let prefs = dir.join("nested").join("prefs.toml");
    let prefs_s = prefs.to_str().expect("path");
    let run = |args: &[&str]| {
        crate::proc::isthmus()
            .args(["--prefs", prefs_s])
            .args(args)
            .output()
            .expect("run")
    };
    let out = run(&["prefs", "path"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), prefs_s);
    // Built-ins work with no file at all.
    let out = run(&["prefs", "list"]);
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        list.contains("lan\tbuilt-in (default)") && list.contains("upnp\tbuilt-in"),
        "{list}"
    );

    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = free.local_addr().expect("addr").port();
    drop(free);
    for (k, v) in [
        ("port", port.to_string()),
        ("tick_ms", "30".into()),
        ("listen", "127.0.0.1".into()),
        ("beacon", "false".into()),
    ] {
        let out = run(&["prefs", "set", "desk", k, &v]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // It says what it did.
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("set {k} = {v} in profile \"desk\" ({prefs_s})")
        );
    }
    let out = run(&["prefs", "set", "desk", "tick_ms", "soon"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tick_ms"));
    let shown = String::from_utf8_lossy(&run(&["prefs", "show", "desk"]).stdout).into_owned();
    assert!(
        shown.contains(&format!("port = {port}")) && shown.contains("tick_ms = 30"),
        "{shown}"
    );
    // ...and every setting a router would run with, defaults filled in.
    for effective in [
        format!("# listen = 127.0.0.1:{port}"),
        "# forwarding = lan-only".to_string(),
        "# beacon = off".to_string(),
        "# limits.max_frame_bytes = 1048576".to_string(),
        "# limits.memory_budget_mb = 2048".to_string(),
    ] {
        assert!(shown.contains(&effective), "{effective:?} in:\n{shown}");
    }

    // The profile drives the router...
    let (mut child, addr) = spawn_ready(&["--prefs", prefs_s, "router", "--profile", "desk"]);
    assert_eq!(addr, format!("127.0.0.1:{port}").parse().expect("addr"));
    assert_eq!(tick_us(addr).await, 30_000);
    sigterm(&child);
    assert!(child.wait().expect("wait").success());

    // ...and flags override it.
    let (mut child, addr) = spawn_ready(&[
        "--prefs",
        prefs_s,
        "router",
        "--profile",
        "desk",
        "--port",
        "0",
        "--tick-ms",
        "70",
    ]);
    assert_ne!(addr.port(), port);
    assert_eq!(tick_us(addr).await, 70_000);
    sigterm(&child);
    assert!(child.wait().expect("wait").success());

    // A broken file stops the router with the file, the line and what is allowed.
    let mut text = std::fs::read_to_string(&prefs).expect("read");
    text.push_str("forwrding = \"upnp\"\n");
    std::fs::write(&prefs, &text).expect("write");
    let out = run(&["router", "--profile", "desk"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let line_no = text.lines().count();
    assert!(err.contains(&format!("{prefs_s}:{line_no}:")), "{err}");
    assert!(
        err.contains("unknown key `forwrding`") && err.contains("forwarding"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `isthmus ARGS` with stdout and stderr into one pipe, as `2>&1 | head -N` does, and
/// returns the child and the read end.
fn spawn_into_pipe(args: &[&str]) -> (Child, std::io::PipeReader) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    let child = crate::proc::isthmus()
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer.try_clone().expect("clone pipe"))
        .stderr(writer)
        .spawn()
        .expect("start isthmus");
    (child, reader)
}

#[test]
fn a_router_whose_output_was_closed_still_stops_on_sigint_and_sigterm() {
    for sig in ["INT", "TERM"] {
        let (mut child, reader) = spawn_into_pipe(&LOOPBACK_ROUTER);
        // Read the two lines `head -2` would, then close the pipe as head exits.
        let mut lines = BufReader::new(reader).lines();
        for _ in 0..2 {
            lines.next().expect("a line").expect("read");
        }
        drop(lines);
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let status = crate::proc::exits_in_time(&mut child, "the router ignored the signal");
        assert!(status.success(), "SIG{sig}: {status:?}");
    }
}

#[test]
fn usage_errors_and_damaged_postcards_have_their_own_exit_codes() {
    let out = crate::proc::isthmus()
        .args(["router", "--no-such-flag"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "usage error");
    let out = crate::proc::isthmus()
        .args(["join", "isthmus2:abc"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "damaged postcard");
    let out = crate::proc::isthmus()
        .args(["join", "isthmus2:abc", "--name", &"n".repeat(300)])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(64),
        "a 300-byte name is refused up front"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at most 256 bytes"), "{err}");
    let out = crate::proc::isthmus()
        .args(["discover", "--timeout", "0"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("more than 0"), "{err}");
    let help = crate::proc::isthmus().arg("--help").output().expect("run");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("64 usage error") && text.contains("2 unreadable or damaged postcard"),
        "{text}"
    );
}

#[test]
fn contradictory_forwarding_flags_are_refused_with_a_reason() {
    for (mode, why) in [
        ("lan-only", "a LAN-only router has no external address"),
        ("upnp", "with UPnP the gateway says the external address"),
    ] {
        let out = crate::proc::isthmus()
            .args(LOOPBACK_ROUTER)
            .args(["--forwarding", mode, "--external", "203.0.113.7:7470"])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(64), "a usage error");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{mode}: {err}");
    }
}

#[test]
fn router_logs_name_the_island_and_the_people_in_it() {
    let router = crate::proc::Proc::spawn(&LOOPBACK_ROUTER.map(String::from));
    let addr = router
        .next_line()
        .strip_prefix("listening on ")
        .expect("ready line")
        .to_string();
    let replica = crate::proc::Proc::spawn(&[
        "island".into(),
        "new".into(),
        "lagoon".into(),
        "--router".into(),
        addr,
        "--name".into(),
        "ada".into(),
        "--json".into(),
        "--send".into(),
        "hi".into(),
        "--exit-after-seq".into(),
        "1".into(),
    ]);
    let (status, _, err) = replica.finish();
    assert!(status.success(), "{err}");
    let log = router.wait_stderr("\"ada\" left", 1);
    assert!(
        log.contains("island created") && log.contains("lagoon"),
        "{log}"
    );
    assert!(log.contains("\"ada\" joined"), "{log}");
    router.signal("TERM");
    assert!(router.finish().0.success());
}
