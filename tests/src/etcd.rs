//! A real etcd for tests (started on 127.0.0.1 with free ports and a data directory of its own,
//! killed and removed when dropped), and replicas that follow a cluster's redirects.

use crate::{exchange_preambles, HelloOpts, WireReplica, PATIENCE};
use isthmus_router::framed::FrameReader;
use isthmus_router::wire::{self, ClientFrame, ServerFrame};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Time etcd has to start answering.
const START_PATIENCE: Duration = Duration::from_secs(30);

/// One etcd member on loopback.
pub struct Etcd {
    child: Child,
    dir: PathBuf,
    /// Its client endpoint, `127.0.0.1:PORT`.
    pub endpoint: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Etcd {
    /// Starts etcd (Debian's `etcd-server`) and waits until it answers. Panics, saying what to
    /// install, when there is no `etcd` binary.
    pub fn start() -> Etcd {
        let client = free_port();
        let peer = free_port();
        let dir = std::env::temp_dir().join(format!(
            "isthmus-etcd-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).expect("etcd data dir");
        let endpoint = format!("127.0.0.1:{client}");
        let log = std::fs::File::create(dir.join("etcd.log")).expect("etcd log file");
        let child = Command::new("etcd")
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--listen-client-urls")
            .arg(format!("http://{endpoint}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://{endpoint}"))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{peer}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{peer}"))
            .arg("--initial-cluster")
            .arg(format!("test=http://127.0.0.1:{peer}"))
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd is not installed: apt-get install etcd-server (.ci/run does)");
        let etcd = Etcd {
            child,
            dir,
            endpoint,
        };
        let deadline = Instant::now() + START_PATIENCE;
        while !etcd.healthy() {
            assert!(
                Instant::now() < deadline,
                "etcd did not start within {START_PATIENCE:?}; its log: {}",
                std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    fn healthy(&self) -> bool {
        // etcdctl prints the verdict on stderr; its exit status says it.
        self.etcdctl(&["endpoint", "health"]).is_some()
    }

    /// `etcd://127.0.0.1:PORT`, as `--cluster` takes it.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoint)
    }

    /// Runs `etcdctl` against this etcd; its stdout, if it succeeded.
    pub fn etcdctl(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&self.endpoint)
            .arg("--dial-timeout")
            .arg("1s")
            .arg("--command-timeout")
            .arg("2s")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every key under `prefix` with its value, as `etcdctl get --prefix` prints them.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self
            .etcdctl(&["get", "--prefix", prefix])
            .unwrap_or_default();
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].to_string(), c[1].to_string()))
            .collect()
    }

    /// Stops (`true`) or continues (`false`) the etcd process with SIGSTOP / SIGCONT: to the
    /// routers it is cut off while their replicas stay connected.
    pub fn pause(&self, paused: bool) {
        let status = Command::new("kill")
            .arg(if paused { "-STOP" } else { "-CONT" })
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "signal etcd");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.pause(false);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The first frame a router answers `opts`' hello with at `addr`.
pub async fn first_answer(addr: SocketAddr, opts: &HelloOpts) -> ServerFrame {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let nonce = exchange_preambles(&mut s).await.expect("preambles");
    s.write_all(&wire::encode(&ClientFrame::Hello(opts.sign(&nonce))))
        .await
        .expect("hello");
    let mut frames = FrameReader::new(s, usize::MAX);
    tokio::time::timeout(PATIENCE, frames.read::<ServerFrame>())
        .await
        .expect("an answer in time")
        .expect("a frame")
}

/// A replica that knocked on `addr` and followed at most one redirect: it, the address that
/// welcomed it, and whether it was redirected.
pub async fn join_via(addr: SocketAddr, opts: HelloOpts) -> (WireReplica, SocketAddr, bool) {
    let mut r = WireReplica::connect(addr, opts.clone())
        .await
        .expect("connect");
    let s = r
        .wait_until(PATIENCE, "a welcome or a redirect", |s| {
            s.welcome.is_some() || s.closed.is_some() || s.ended
        })
        .await;
    if s.welcome.is_some() {
        return (r, addr, false);
    }
    let (_, reason) = s.closed.expect("closed with a reason");
    assert!(reason.starts_with("redirected"), "{reason}");
    // The redirect names the home: read it once more (the placement does not move).
    let ServerFrame::Redirect { contacts, epoch } = first_answer(addr, &opts).await else {
        panic!("a redirect again");
    };
    assert!(!contacts.is_empty() && epoch > 0);
    let home = contacts[0].internal[0];
    let mut r = WireReplica::connect(home, opts)
        .await
        .expect("connect home");
    let s = r
        .wait_until(PATIENCE, "the home's welcome", |s| {
            s.welcome.is_some() || s.closed.is_some()
        })
        .await;
    let w = s.welcome.expect("welcomed at the home");
    assert_eq!(w.epoch, epoch, "the home welcomes at the redirect's epoch");
    (r, home, true)
}
