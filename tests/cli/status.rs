//! The router's status page, its JSON and `isthmus status`, with real processes: a router, two
//! chatting replicas, Debian's headless Chromium, and a network namespace for a stranger.

use crate::proc::{exits_in_time, isthmus, BIN, PATIENCE};
use crate::router::spawn_router;
use isthmus_tests::netns::{skip, HomeNet, NetLab, GW_WAN_IP, LAN_IP};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A chat replica (`island new` or `join`, plain lines: with `--json` it reads no stdin) whose
/// stdin the test types into.
struct Chatter {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Drop for Chatter {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `isthmus ARGS` with stdin piped; returns it and where its stdout lines arrive.
fn chatter(args: &[&str]) -> (Chatter, std::sync::mpsc::Receiver<String>) {
    let mut child = isthmus()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start isthmus");
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                // Keep draining so the replica never blocks on a full pipe.
                continue;
            }
        }
    });
    (Chatter { child, stdin }, rx)
}

/// Two replicas, "ann" (the creator) and "bob", saying something every 200 ms until dropped.
struct Chat {
    _ann: Arc<std::sync::Mutex<Chatter>>,
    _bob: Arc<std::sync::Mutex<Chatter>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Chat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn chat(addr: SocketAddr) -> Chat {
    let router = addr.to_string();
    let (ann, lines) = chatter(&[
        "island", "new", "harbour", "--router", &router, "--name", "ann",
    ]);
    let postcard = lines.recv_timeout(PATIENCE).expect("the postcard line");
    assert!(postcard.starts_with("isthmus2:"), "{postcard}");
    let (bob, _) = chatter(&["join", &postcard, "--name", "bob"]);
    let ann = Arc::new(std::sync::Mutex::new(ann));
    let bob = Arc::new(std::sync::Mutex::new(bob));
    let stop = Arc::new(AtomicBool::new(false));
    let (a, b, s) = (ann.clone(), bob.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !s.load(Ordering::SeqCst) {
            n += 1;
            for (who, c) in [("ann", &a), ("bob", &b)] {
                if let Ok(mut c) = c.lock() {
                    if let Some(stdin) = c.stdin.as_mut() {
                        let _ = writeln!(stdin, "{who} says {n}");
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    Chat {
        _ann: ann,
        _bob: bob,
        stop,
    }
}

/// `isthmus status --json` against `addr`, parsed.
fn status_json(addr: SocketAddr) -> Value {
    let out = isthmus()
        .args(["status", "--router", &addr.to_string(), "--json"])
        .output()
        .expect("run isthmus status");
    assert!(
        out.status.success(),
        "isthmus status --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// Polls `isthmus status --json` until `ok` holds for it.
fn status_until(addr: SocketAddr, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let v = status_json(addr);
        if ok(&v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited for {what}; last status: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn member_names(island: &Value) -> Vec<String> {
    island["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|m| m["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn status_json_follows_its_schema_and_the_terminal_view_names_people() {
    let (mut router, addr) = spawn_router(&[]);
    let _chat = chat(addr);
    let v = status_until(addr, "ann and bob attached with messages stamped", |v| {
        v["islands"][0]["seq"].as_u64().unwrap_or(0) >= 4
            && member_names(&v["islands"][0]).len() == 2
    });
    // The schema of docs/status.md, field by field.
    assert_eq!(v["version"], 1);
    for key in [
        "instance",
        "version",
        "listen",
        "started",
        "uptime_seconds",
        "status_from",
    ] {
        assert!(!v["router"][key].is_null(), "router.{key} in {v:#}");
    }
    assert_eq!(v["router"]["status_from"], "lan");
    assert_eq!(v["forwarding"]["mode"], "lan-only");
    assert!(v["forwarding"]["internal"].is_array());
    assert!(v["forwarding"]["external"].is_null());
    assert_eq!(v["forwarding"]["mapped"], false);
    assert!(v["forwarding"]["protocol"].is_null());
    let t = &v["totals"];
    assert_eq!(t["sessions"], 1);
    assert_eq!(t["replicas"], 2);
    for key in [
        "messages_stamped",
        "deliveries",
        "bytes_in",
        "bytes_out",
        "ticks",
        "resumes",
        "late_joins",
        "snapshot_uploads",
        "islands_recovered",
        "slow_consumers",
        "divergences",
        "refusals",
        "connections_shed",
    ] {
        assert!(t[key].is_u64(), "totals.{key} in {t:#}");
    }
    assert!(
        t["deliveries"].as_u64() > t["messages_stamped"].as_u64(),
        "each message goes to two"
    );
    assert!(t["bytes_out"].as_u64() > Some(0) && t["bytes_in"].as_u64() > Some(0));
    let island = &v["islands"][0];
    assert_eq!(island["name"], "harbour");
    assert_eq!(island["lan_open"], true);
    assert!(
        island["postcard"]
            .as_str()
            .is_some_and(|p| p.starts_with("isthmus2:")),
        "a LAN-open island's participant postcard is shown on loopback: {island:#}"
    );
    assert_eq!(member_names(island), ["ann", "bob"]);
    assert!(island["msgs_per_sec"].is_f64() && island["age_seconds"].is_f64());
    for m in island["members"].as_array().expect("members") {
        assert!(
            m["replica"].is_string() && m["connected_seconds"].is_f64() && m["resumed"] == false
        );
    }
    assert!(v["recent_refusals"].is_array() && v["recent_divergences"].is_array());
    // The same postcard joins: the router hands out what really works.
    let card = island["postcard"].as_str().expect("postcard");
    let out = isthmus()
        .args(["postcard", "show", card])
        .output()
        .expect("isthmus postcard");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("participant"));

    // A private island: listed, never with a postcard (the router holds no secret of it).
    let mut private = isthmus()
        .args([
            "island",
            "new",
            "attic",
            "--router",
            &addr.to_string(),
            "--private",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("island new --private");
    let mut line = String::new();
    BufReader::new(private.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("postcard line");
    let v = status_until(addr, "the private island listed", |v| {
        v["islands"].as_array().is_some_and(|i| i.len() == 2)
    });
    let attic = v["islands"]
        .as_array()
        .and_then(|i| i.iter().find(|i| i["name"] == "attic"))
        .expect("attic listed");
    assert_eq!(attic["lan_open"], false);
    assert!(attic["postcard"].is_null(), "{attic:#}");
    let _ = private.kill();
    let _ = private.wait();

    // For people: the island, both names, the forwarding mode.
    let out = isthmus()
        .args(["status", "--router", &addr.to_string()])
        .output()
        .expect("isthmus status");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "\"harbour\" LAN-open",
        "\"ann\" for",
        "\"bob\" for",
        "forwarding: lan-only",
        "postcard: isthmus2:",
    ] {
        assert!(text.contains(want), "{want:?} in:\n{text}");
    }

    // A reader that goes away after one line (`| head -1`) ends it quietly.
    let mut child = isthmus()
        .args(["status", "--router", &addr.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("isthmus status");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("a line");
    assert!(first.starts_with("router "), "{first}");
    let status = exits_in_time(
        &mut child,
        "isthmus status kept running after its reader left",
    );
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err);
    assert!(
        status.success() && !err.contains("panicked"),
        "{status:?} {err}"
    );

    // Output that cannot be written (a full disk) is a failure, not a quiet success.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let out = isthmus()
        .args(["status", "--router", &addr.to_string(), "--json"])
        .stdout(full)
        .output()
        .expect("isthmus status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("writing the status to stdout failed"), "{err}");
    let _ = router.kill();
    let _ = router.wait();
}

#[test]
fn status_says_why_when_it_cannot_be_had() {
    // A router that shows its status to nobody: 403 with a reason, exit 1.
    let (mut router, addr) = spawn_router(&["--status-from", "none"]);
    let out = isthmus()
        .args(["status", "--router", &addr.to_string(), "--json"])
        .output()
        .expect("isthmus status");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refuses to show its status") && err.contains("--status-from lan"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    let _ = router.kill();
    let _ = router.wait();
    // Nobody listening: exit 1 and what to check. A bad address: a usage error, exit 64.
    let out = isthmus()
        .args(["status", "--router", &addr.to_string()])
        .output()
        .expect("isthmus status");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is it running"));
    let out = isthmus()
        .args(["status", "--router", "a:b:c"])
        .output()
        .expect("isthmus status");
    assert_eq!(out.status.code(), Some(64));
}

/// Where this run keeps screenshots: target/tmp, which survives the test for a look.
fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web")
}

#[test]
fn the_status_page_in_chromium_shows_both_names_and_a_rising_seq() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() || !web_dir().join("node_modules/playwright-core").exists() {
        return skip(&format!(
            "SKIPPED the_status_page_in_chromium_shows_both_names_and_a_rising_seq: needs {chromium} (Debian's chromium) and tests/web/node_modules (npm ci in tests/web); .ci/run installs both"
        ))
        .unwrap_or(());
    }
    let (mut router, addr) = spawn_router(&[]);
    let _chat = chat(addr);
    status_until(addr, "both replicas attached", |v| {
        member_names(&v["islands"][0]).len() == 2
    });
    let shot = screenshot_dir().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let mut node = Command::new("node")
        .current_dir(web_dir())
        .args(["status-page.mjs", &format!("http://{addr}/")])
        .arg(&shot)
        .args(["ann", "bob"])
        .env("CHROMIUM", &chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node");
    let status = exits_in_time(&mut node, "the browser script did not finish");
    let mut out = String::new();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut node.stdout.take().expect("stdout"), &mut out);
    let _ = std::io::Read::read_to_string(&mut node.stderr.take().expect("stderr"), &mut err);
    assert!(status.success(), "status-page.mjs failed:\n{err}\n{out}");
    let seen: Value = serde_json::from_str(out.trim()).expect("the script's JSON line");
    assert_eq!(seen["names"], serde_json::json!(["ann", "bob"]), "{seen}");
    let (before, after) = (seen["seq_before"].as_u64(), seen["seq_after"].as_u64());
    assert!(
        before.is_some() && after > before,
        "the seq rose live: {seen}"
    );
    assert!(
        seen["postcard"]
            .as_str()
            .is_some_and(|p| p.starts_with("isthmus2:")),
        "the LAN-open island's postcard is on the page: {seen}"
    );
    assert_eq!(
        seen["nojs_names"],
        serde_json::json!(["ann", "bob"]),
        "without JavaScript too"
    );
    let png = std::fs::read(&shot).expect("the screenshot was kept");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    let _ = router.kill();
    let _ = router.wait();
}

/// GETs `path` from `addr` inside host `ns` with curl; returns the HTTP status code.
fn http_code(lab: &NetLab, ns: &str, url: &str) -> String {
    lab.run(
        ns,
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "30",
            url,
        ],
    )
}

#[test]
fn a_stranger_outside_the_routers_subnets_gets_403() {
    let Some(mut lab) = NetLab::new("a_stranger_outside_the_routers_subnets_gets_403") else {
        return;
    };
    // Two hosts on one wire but in different subnets, each with a route to the other: the
    // stranger reaches the router and is not on any of its subnets.
    let home = lab.host("home");
    let far = lab.host("far");
    lab.link(&home, "10.77.1.1/24", &far, "10.77.2.1/24");
    let (ih, if_) = (
        lab.iface_of(&home, "10.77.1.1"),
        lab.iface_of(&far, "10.77.2.1"),
    );
    lab.run(&home, "ip", &["route", "add", "10.77.2.0/24", "dev", &ih]);
    lab.run(&far, "ip", &["route", "add", "10.77.1.0/24", "dev", &if_]);
    let start = |port: &str, extra: &[&str]| {
        let mut cmd = lab.command(&home, BIN);
        cmd.args(["router", "--port", port, "--no-beacon"])
            .args(extra);
        cmd.env("ISTHMUS_PREFS", crate::proc::no_prefs());
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("router");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        assert!(line.starts_with("listening on "), "{line}");
        child
    };
    let mut lan_only = start("7470", &[]);
    let mut open = start("7480", &["--status-from", "any"]);
    for path in ["/", "/metrics", "/status.json"] {
        assert_eq!(
            http_code(&lab, &far, &format!("http://10.77.1.1:7470{path}")),
            "403",
            "{path}"
        );
        // The router itself (loopback) may look, and so may anyone where the setting says so.
        assert_eq!(
            http_code(&lab, &home, &format!("http://127.0.0.1:7470{path}")),
            "200",
            "{path}"
        );
        assert_eq!(
            http_code(&lab, &far, &format!("http://10.77.1.1:7480{path}")),
            "200",
            "{path}"
        );
    }
    // Open to anyone, but a LAN-open island's postcard only on the router's own network.
    let mut creator = lab.command(&home, BIN);
    creator
        .args(["island", "new", "lagoon", "--router", "127.0.0.1:7480"])
        .env("ISTHMUS_PREFS", crate::proc::no_prefs())
        .env("ISTHMUS_DATA_DIR", crate::proc::test_data_dir());
    let mut creator = creator
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("island new");
    let mut card = String::new();
    BufReader::new(creator.stdout.take().expect("stdout"))
        .read_line(&mut card)
        .expect("postcard line");
    let json = |ns: &str, url: &str| -> Value {
        serde_json::from_str(&lab.run(ns, "curl", &["-s", "--max-time", "30", url])).expect("json")
    };
    let near = json(&home, "http://127.0.0.1:7480/status.json");
    let afar = json(&far, "http://10.77.1.1:7480/status.json");
    assert_eq!(near["islands"][0]["lan_open"], true);
    assert!(near["islands"][0]["postcard"].is_string(), "{near:#}");
    assert_eq!(afar["islands"][0]["lan_open"], true);
    assert!(afar["islands"][0]["postcard"].is_null(), "{afar:#}");
    let page = lab.run(
        &far,
        "curl",
        &["-s", "--max-time", "30", "http://10.77.1.1:7480/"],
    );
    assert!(
        page.contains("lagoon") && !page.contains("isthmus2:"),
        "{page}"
    );
    let _ = creator.kill();
    let _ = creator.wait();

    let body = lab.run(
        &far,
        "curl",
        &["-s", "--max-time", "30", "http://10.77.1.1:7470/"],
    );
    assert!(
        body.contains("403 forbidden") && body.contains("--status-from any"),
        "{body}"
    );
    let _ = lan_only.kill();
    let _ = open.kill();
    let _ = lan_only.wait();
    let _ = open.wait();
}

#[test]
fn the_upnp_mapping_and_its_lease_are_on_the_status_and_in_the_metrics() {
    let Some(net) =
        HomeNet::new("the_upnp_mapping_and_its_lease_are_on_the_status_and_in_the_metrics")
    else {
        return;
    };
    let mut upnp = net.start_upnp(&[
        "ext_allow_private_ipv4=yes",
        &format!("ext_ip={GW_WAN_IP}"),
        "allow 1024-65535 10.210.1.0/24 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]);
    let prefs = net.scratch.join("prefs.toml");
    std::fs::write(
        &prefs,
        "[profiles.home]\nforwarding = \"upnp\"\nupnp.lease_secs = 3600\nupnp.fallback = \"fail\"\nbeacon = false\n",
    )
    .expect("prefs");
    let mut cmd = net.lab.command(&net.lan, BIN);
    cmd.arg("--prefs")
        .arg(&prefs)
        .args(["router", "--profile", "home"]);
    let mut router = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("router");
    let mut line = String::new();
    BufReader::new(router.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(line.trim(), "listening on 0.0.0.0:7470");

    let curl = |url: &str| {
        net.lab
            .run(&net.lan, "curl", &["-s", "--max-time", "30", url])
    };
    let status: Value =
        serde_json::from_str(&curl("http://127.0.0.1:7470/status.json")).expect("json");
    let f = &status["forwarding"];
    assert_eq!(f["mode"], "gateway", "{f:#}");
    assert_eq!(f["protocol"], "upnp");
    assert_eq!(f["mapped"], true);
    assert_eq!(f["lease_seconds"], 3600);
    assert_eq!(f["external"], format!("{GW_WAN_IP}:7470").as_str());
    assert_eq!(f["public"], true);
    let internal = format!("{LAN_IP}:7470");
    assert!(
        f["internal"]
            .as_array()
            .is_some_and(|i| i.iter().any(|a| a == internal.as_str())),
        "{f:#}"
    );
    let metrics = curl("http://127.0.0.1:7470/metrics");
    for want in [
        "isthmus_port_mapped 1\n",
        "isthmus_port_mapping_lease_seconds 3600\n",
        "isthmus_forwarding_info{mode=\"gateway\",protocol=\"upnp\"} 1\n",
    ] {
        assert!(metrics.contains(want), "{want:?} in\n{metrics}");
    }
    let text = net.lab.run(&net.lan, BIN, &["status"]);
    assert!(
        text.contains(&format!("external: {GW_WAN_IP}:7470, lease 1 h 0 min")),
        "{text}"
    );
    // From the Internet, through the mapping: refused, only the router's subnets may look.
    let code = http_code(
        &net.lab,
        &net.wan,
        &format!("http://{GW_WAN_IP}:7470/metrics"),
    );
    assert_eq!(code, "403");
    let _ = router.kill();
    let _ = router.wait();
    let _ = upnp.kill();
    let _ = upnp.wait();
}
