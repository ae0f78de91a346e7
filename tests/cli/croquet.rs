//! Unmodified Croquet and Multisynq clients (the npm packages, in Node) against the real
//! `isthmus router`: tests/croquet/scenario.js drives a shared-counter app.
//!
//! Needs `node` and `npm install` in tests/croquet (`.ci/run` does both). Without them the tests
//! skip loudly; with `ISTHMUS_REQUIRE_NETNS=1` (set by `.ci/run`, which installs every tool the
//! tests need) a missing tool is a failure.

use crate::proc::{Proc, PATIENCE};
use crate::router::LOOPBACK_ROUTER;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The npm test directory.
pub fn croquet_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/croquet")
}

/// `Some(())` when node and the client packages are there, else a loud skip.
pub fn node_ready() -> Option<()> {
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    if !node.is_ok_and(|s| s.success()) {
        return isthmus_tests::netns::skip("SKIPPED croquet tests: `node` is not installed");
    }
    let modules = croquet_dir().join("node_modules");
    for pkg in ["@croquet/croquet", "@multisynq/client", "ws"] {
        if !modules.join(pkg).is_dir() {
            return isthmus_tests::netns::skip(&format!(
                "SKIPPED croquet tests: {pkg} is not installed (run `npm ci --ignore-scripts` in tests/croquet)"
            ));
        }
    }
    Some(())
}

/// A router on a free loopback port with its own data directory; returns it and its port.
pub fn croquet_router(data: &Path, extra: &[&str]) -> (Proc, u16) {
    let mut args: Vec<String> = LOOPBACK_ROUTER.iter().map(|s| s.to_string()).collect();
    args.push("--data-dir".into());
    args.push(data.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let router = Proc::spawn(&args);
    let line = router.next_line();
    let port = line
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    router.wait_stderr(
        &format!("Croquet reflector ws://127.0.0.1:{port}/reflector"),
        1,
    );
    (router, port)
}

/// Runs the Node scenario (phase "" or "persisted") and fails with its output unless it passes.
fn scenario(port: u16, run: &str, phase: &str) -> String {
    let mut child = Command::new("node")
        .arg(croquet_dir().join("scenario.js"))
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(run)
        .arg(phase)
        .current_dir(croquet_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    let deadline = Instant::now() + 3 * PATIENCE;
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("scenario output");
    passed(&out, &format!("the Croquet scenario {phase:?}"))
}

/// A Node script's stdout and stderr, after checking that it exited well and said PASS.
fn passed(out: &std::process::Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.lines().any(|l| l == "PASS"),
        "{what} failed:\n{text}"
    );
    text
}

/// Snapshot files of sessions (under `apps/*/snap/*/<persistentId>.<session>/`).
fn snapshot_files(data: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.components().any(|c| c.as_os_str() == "snap") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&data.join("files"), &mut out);
    out
}

#[test]
fn croquet_and_multisynq_clients_sync_snapshot_rejoin_and_persist() {
    if node_ready().is_none() {
        return;
    }
    let data = std::env::temp_dir().join(format!("isthmus-croquet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    // A short linger, so the sessions end soon after the last client leaves.
    let (router, port) = croquet_router(&data, &["--linger-ms", "300"]);
    let run = format!("r{}", std::process::id());
    let out = scenario(port, &run, "");
    for step in [
        "two clients in sync",
        "late joiner started from the snapshot",
        "cut-off client rejoined seamlessly",
        "all agree",
    ] {
        assert_eq!(
            out.matches(step).count(),
            2,
            "{step:?} for both libraries:\n{out}"
        );
    }
    // The snapshots were uploaded to this router's store; once the sessions have ended their
    // snapshots are removed, while the persistent data stays.
    let deadline = Instant::now() + PATIENCE;
    while !snapshot_files(&data).is_empty() {
        assert!(
            Instant::now() < deadline,
            "snapshots of ended sessions were not cleaned up: {:?}",
            snapshot_files(&data)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let saved = std::fs::read_dir(data.join("saved/io.isthmus.counter"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(saved, 2, "one persistent-data record per library's session");
    // A new session of the same app starts from the persistent data.
    let out = scenario(port, &run, "persisted");
    assert_eq!(
        out.matches("new session started from persisted data")
            .count(),
        2,
        "{out}"
    );
    router.signal("INT");
    let (status, _, _) = router.finish();
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&data);
}

/// Copies what `--web` serves for the browser test: the page, the shared app code and the
/// unmodified library bundle from npm.
fn web_dir(into: &Path) -> PathBuf {
    let dir = into.join("app");
    std::fs::create_dir_all(&dir).expect("web dir");
    let src = croquet_dir();
    for (from, name) in [
        (src.join("web/index.html"), "index.html"),
        (src.join("counter.js"), "counter.js"),
        (
            src.join("node_modules/@croquet/croquet/pub/croquet.min.js"),
            "croquet.min.js",
        ),
    ] {
        std::fs::copy(&from, dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
    dir
}

#[test]
fn the_counter_app_served_by_web_syncs_two_chromium_windows() {
    if node_ready().is_none() {
        return;
    }
    if !Path::new("/usr/bin/chromium").exists() {
        isthmus_tests::netns::skip::<()>(
            "SKIPPED browser test: /usr/bin/chromium is not installed",
        );
        return;
    }
    if !croquet_dir().join("node_modules/playwright-core").is_dir() {
        isthmus_tests::netns::skip::<()>(
            "SKIPPED browser test: playwright-core is not installed in tests/croquet",
        );
        return;
    }
    let tmp = std::env::temp_dir().join(format!("isthmus-croquet-web-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let app = web_dir(&tmp);
    let app = app.display().to_string();
    let (router, port) = croquet_router(&tmp.join("data"), &["--web", &app]);
    router.wait_stderr(&format!("web app http://127.0.0.1:{port}/"), 1);
    // The screenshots stay under target/ for people to look at.
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("croquet-browser");
    let out = Command::new("node")
        .arg(croquet_dir().join("browser.js"))
        .arg(format!(
            "http://127.0.0.1:{port}/?session=web-{}",
            std::process::id()
        ))
        .arg(&shots)
        .current_dir(croquet_dir())
        .output()
        .expect("run node");
    let text = passed(&out, "the browser test");
    assert!(text.contains(r#""pages":["2","2"]"#), "{text}");
    for f in ["counter-1.png", "counter-2.png", "counter-both.png"] {
        let len = std::fs::metadata(shots.join(f))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 1000, "screenshot {f} missing or empty");
    }
    router.signal("INT");
    let (status, _, _) = router.finish();
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&tmp);
}
