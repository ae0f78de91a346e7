//! Running `isthmus` processes in tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_isthmus");
/// Upper bound for any one step; steps finish far sooner unless something is broken.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A running `isthmus` replica whose stdout lines arrive on a channel.
/// The binary, isolated from the developer's own prefs file and data directory.
pub fn isthmus() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("ISTHMUS_PREFS", no_prefs());
    cmd.env("ISTHMUS_DATA_DIR", test_data_dir());
    cmd
}

/// A data directory of this test run's own, so islands created by tests never land among the
/// developer's kept admin postcards.
/// The binary in network namespace `ns` of `lab`, keeping admin postcards of islands it
/// creates in the test run's data dir.
pub fn in_netns(lab: &isthmus_tests::netns::NetLab, ns: &str, args: &[&str]) -> Proc {
    let mut cmd = lab.command(ns, BIN);
    cmd.env("ISTHMUS_DATA_DIR", test_data_dir());
    cmd.args(args);
    Proc::from_command(cmd)
}

pub fn test_data_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("isthmus-tests-{}-data", std::process::id()))
}

/// Waits for `child` to exit, or kills it and fails the test after `PATIENCE` saying `what` it
/// kept doing: a process that ignores its end fails the test instead of hanging it.
pub fn exits_in_time(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A prefs path that does not exist, so only built-in profiles apply.
pub fn no_prefs() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "isthmus-tests-{}-no-prefs.toml",
        std::process::id()
    ))
}

pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Everything written to stderr so far, so a test can wait for a log line as it happens.
    err: std::sync::Arc<(std::sync::Mutex<(String, bool)>, std::sync::Condvar)>,
}

impl Proc {
    pub fn spawn(args: &[String]) -> Proc {
        let mut cmd = isthmus();
        cmd.args(args);
        Proc::from_command(cmd)
    }

    /// `isthmus ARGS` with a pipe to its stdin, for a test that types lines over time.
    pub fn spawn_with_stdin(args: &[String]) -> (Proc, std::process::ChildStdin) {
        let mut cmd = isthmus();
        cmd.args(args).stdin(Stdio::piped());
        let mut p = Proc::start(cmd);
        let stdin = p.child.stdin.take().expect("stdin");
        (p, stdin)
    }

    /// Runs any command (e.g. `ip netns exec ...`) with stdout read line by line.
    pub fn from_command(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null());
        Proc::start(cmd)
    }

    fn start(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start isthmus");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let err = std::sync::Arc::new((
            std::sync::Mutex::new((String::new(), false)),
            std::sync::Condvar::new(),
        ));
        let sink = err.clone();
        std::thread::spawn(move || {
            let (text, changed) = &*sink;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut t) = text.lock() {
                    t.0.push_str(&line);
                    t.0.push('\n');
                }
                changed.notify_all();
            }
            if let Ok(mut t) = text.lock() {
                t.1 = true;
            }
            changed.notify_all();
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            err,
        }
    }

    /// Waits until stderr holds `needle` at least `times` times (or panics after `PATIENCE`):
    /// tests wait on what the process says, never on a guess of how long it takes.
    pub fn wait_stderr(&self, needle: &str, times: usize) -> String {
        let (text, changed) = &*self.err;
        let deadline = std::time::Instant::now() + PATIENCE;
        let mut t = text.lock().expect("stderr buffer");
        loop {
            if t.0.matches(needle).count() >= times {
                return t.0.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero() && !t.1,
                "waited for {times} x {needle:?} on stderr; got:\n{}",
                t.0
            );
            t = changed.wait_timeout(t, left).expect("stderr buffer").0;
        }
    }

    pub fn next_line(&self) -> String {
        self.lines.recv_timeout(PATIENCE).expect("a line of output")
    }

    /// The next line, if one comes within `limit`.
    pub fn line_within(&self, limit: Duration) -> Option<String> {
        self.lines.recv_timeout(limit).ok()
    }

    /// Sends a signal (e.g. "INT") to the process.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status();
    }

    /// Waits for exit and returns (status, remaining stdout lines, stderr).
    pub fn finish(mut self) -> (std::process::ExitStatus, Vec<String>, String) {
        let deadline = std::time::Instant::now() + PATIENCE;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("replica did not exit in time");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader threads see end of file once the process has exited: wait for both, so
        // the last lines are in. (Taking only the stdout lines already read lost a last line
        // the reader had not passed on yet: `postcard show --json` then seemed to print nothing.)
        let err = {
            let (text, changed) = &*self.err;
            let mut t = text.lock().expect("stderr buffer");
            while !t.1 {
                let (next, timeout) = changed.wait_timeout(t, PATIENCE).expect("stderr buffer");
                t = next;
                if timeout.timed_out() {
                    break;
                }
            }
            t.0.clone()
        };
        // The reader drops its sender at end of file; the limit covers a grandchild that still
        // holds stdout open (as for stderr above).
        let mut lines = Vec::new();
        let drained_by = std::time::Instant::now() + PATIENCE;
        while let Ok(line) = self
            .lines
            .recv_timeout(drained_by.saturating_duration_since(std::time::Instant::now()))
        {
            lines.push(line);
        }
        (status, lines, err)
    }
}

impl Proc {
    pub fn finish_killed(mut self) -> (std::process::ExitStatus, Vec<String>, String) {
        let _ = self.child.kill();
        self.finish()
    }
}
