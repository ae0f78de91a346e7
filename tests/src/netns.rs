//! A network lab built from Linux network namespaces: test hosts with their own addresses,
//! joined by veth pairs, created by the test and removed when the lab is dropped. Packets sent
//! inside it never reach any real network.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

static LABS: AtomicUsize = AtomicUsize::new(0);

/// Set (to anything but empty or 0) to make a lab that cannot be built fail the test instead of
/// skipping it. `.ci/run` sets it, so CI really runs the lab tests.
pub const REQUIRE_VAR: &str = "ISTHMUS_REQUIRE_NETNS";

/// Namespaces made for one test.
pub struct NetLab {
    prefix: String,
    hosts: Vec<String>,
    links: usize,
}

fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn required() -> bool {
    std::env::var(REQUIRE_VAR).is_ok_and(|v| !v.is_empty() && v != "0")
}

impl NetLab {
    /// A new, empty lab; `None` (after a loud message) when this machine cannot build one.
    pub fn new(test: &str) -> Option<NetLab> {
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let lab = NetLab {
            prefix: format!("isth{}x{n}", std::process::id() % 100_000),
            hosts: Vec::new(),
            links: 0,
        };
        let probe = format!("{}probe", lab.prefix);
        match ip(&["netns", "add", &probe]) {
            Ok(_) => {
                let _ = ip(&["netns", "del", &probe]);
                Some(lab)
            }
            Err(e) => {
                let msg = format!(
                    "SKIPPED {test}: needs root and network namespaces ({e}). \
                     Run as root (as .ci/run does) to exercise it."
                );
                if required() {
                    panic!("{msg} ({REQUIRE_VAR} is set, so this is a failure)");
                }
                eprintln!("\n!!!!!!!! {msg}\n");
                None
            }
        }
    }

    /// Adds a host (a namespace with loopback up) and returns its namespace name.
    pub fn host(&mut self, name: &str) -> String {
        let ns = format!("{}{}", self.prefix, name);
        ip(&["netns", "add", &ns]).expect("add namespace");
        self.hosts.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]).expect("loopback up");
        ns
    }

    /// Joins two hosts with a veth pair and gives each end an address (CIDR notation; the
    /// broadcast address is derived).
    pub fn link(&mut self, a: &str, a_cidr: &str, b: &str, b_cidr: &str) {
        self.links += 1;
        // Interface names are at most 15 bytes.
        let ia = format!("va{}{}", self.links, &self.prefix[4..]);
        let ib = format!("vb{}{}", self.links, &self.prefix[4..]);
        let (ia, ib) = (&ia[..ia.len().min(15)], &ib[..ib.len().min(15)]);
        ip(&["link", "add", ia, "type", "veth", "peer", "name", ib]).expect("veth pair");
        ip(&["link", "set", ia, "netns", a]).expect("move veth");
        ip(&["link", "set", ib, "netns", b]).expect("move veth");
        ip(&["-n", a, "addr", "add", a_cidr, "brd", "+", "dev", ia]).expect("address");
        ip(&["-n", b, "addr", "add", b_cidr, "brd", "+", "dev", ib]).expect("address");
        ip(&["-n", a, "link", "set", ia, "up"]).expect("up");
        ip(&["-n", b, "link", "set", ib, "up"]).expect("up");
    }

    /// A command that runs `program` inside host `ns`.
    pub fn command(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for ns in self.hosts.drain(..) {
            // Anything still running inside goes first, or the namespace lingers.
            if let Ok(out) = ip(&["netns", "pids", &ns]) {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}
