//! # isthmus-tests
//!
//! Owns the integration tests (`tests/tests/`), the helpers they share, and later the network lab
//! and the benchmark harness. [`WireReplica`] is a minimal replica that speaks the raw wire
//! protocol, independent of the island client, so router tests do not trust the code they test
//! against.

pub mod netns;

use bytes::{Bytes, BytesMut};
use isthmus_dispatcher::{Dispatcher, DispatcherConfig};
use isthmus_router::ids::{ReplicaId, Seq, SessionId};
use isthmus_router::wire::{
    self, ClientFrame, Code, CreateOptions, Hello, JoinToken, Message, Role, ServerFrame, Welcome,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

/// A router running in this process on a loopback port.
pub struct TestRouter {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Cancel to shut it down.
    pub shutdown: CancellationToken,
    /// Ends when the router has shut down.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts a dispatcher on 127.0.0.1 with an ephemeral port.
pub async fn start_router(mut cfg: DispatcherConfig) -> TestRouter {
    cfg.listen = "127.0.0.1:0".parse().expect("loopback address");
    let dispatcher = Dispatcher::bind(cfg).await.expect("bind loopback");
    let addr = dispatcher.local_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(dispatcher.run(shutdown.clone()));
    TestRouter {
        addr,
        shutdown,
        task,
    }
}

/// What a [`WireReplica`] has seen.
#[derive(Clone, Debug, Default)]
pub struct ReplicaState {
    /// The applied order: snapshot contents followed by every message since.
    pub log: Vec<Message>,
    /// The welcome, once received.
    pub welcome: Option<Welcome>,
    /// True after `Synced`.
    pub synced: bool,
    /// Set when the router closed or refused: code and reason.
    pub closed: Option<(Code, String)>,
    /// The connection ended (EOF or error), with or without a goodbye.
    pub ended: bool,
    /// Ticks received.
    pub ticks: u64,
    /// Violations of ordering seen on the stream (should stay empty).
    pub violations: Vec<String>,
}

/// A replica speaking the raw protocol: its island state is the log of messages it applied,
/// and its snapshot is that log encoded.
pub struct WireReplica {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    state: watch::Receiver<ReplicaState>,
    client_seq: u64,
    /// This replica's id.
    pub id: ReplicaId,
}

/// How to say hello.
#[derive(Clone, Debug)]
pub struct HelloOpts {
    /// The session.
    pub session: SessionId,
    /// The token.
    pub token: JoinToken,
    /// The replica id.
    pub replica: ReplicaId,
    /// Create the session if missing.
    pub create: bool,
    /// Resume from this seq.
    pub resume_from: Option<Seq>,
}

impl HelloOpts {
    /// A hello for a new replica of `session`.
    pub fn new(session: SessionId, create: bool) -> Self {
        HelloOpts {
            session,
            token: JoinToken([42; 32]),
            replica: ReplicaId::random(),
            create,
            resume_from: None,
        }
    }
}

fn snapshot_bytes(log: &[Message]) -> Bytes {
    let mut out = BytesMut::new();
    for m in log {
        wire::encode_into(m, &mut out);
    }
    out.freeze()
}

fn parse_snapshot(mut data: BytesMut) -> Option<Vec<Message>> {
    let mut log = Vec::new();
    while !data.is_empty() {
        log.push(wire::decode::<Message>(&mut data, usize::MAX).ok()??);
    }
    Some(log)
}

impl WireReplica {
    /// Connects, says hello and starts applying what arrives.
    pub async fn connect(addr: SocketAddr, opts: HelloOpts) -> std::io::Result<WireReplica> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut read, mut write) = stream.into_split();
        write.write_all(&wire::preamble()).await?;
        let hello = ClientFrame::Hello(Hello {
            session: opts.session,
            token: opts.token,
            replica: opts.replica,
            name: "wire".into(),
            role: Role::Replica,
            resume_from: opts.resume_from,
            create: opts.create.then(CreateOptions::default),
        });
        write.write_all(&wire::encode(&hello)).await?;
        let writer = Arc::new(Mutex::new(write));
        let (tx, rx) = watch::channel(ReplicaState::default());
        let snap_writer = writer.clone();
        tokio::spawn(async move {
            let mut pre = [0u8; wire::PREAMBLE_LEN];
            if read.read_exact(&mut pre).await.is_err() {
                tx.send_modify(|s| s.ended = true);
                return;
            }
            let mut buf = BytesMut::new();
            let mut sync: Option<(u64, Option<u64>, BytesMut)> = None;
            loop {
                let frame = match wire::decode::<ServerFrame>(&mut buf, usize::MAX) {
                    Ok(Some(f)) => f,
                    Ok(None) => match read.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => continue,
                    },
                    Err(e) => {
                        tx.send_modify(|s| s.violations.push(format!("bad frame: {e}")));
                        break;
                    }
                };
                let mut reply = None;
                tx.send_modify(|s| match frame {
                    ServerFrame::Welcome(w) => s.welcome = Some(w),
                    ServerFrame::Refuse { code, reason }
                    | ServerFrame::Goodbye { code, reason } => s.closed = Some((code, reason)),
                    ServerFrame::SyncBegin { at, snapshot_len } => {
                        s.synced = false;
                        if snapshot_len.is_none() {
                            s.log.clear();
                        }
                        sync = Some((at.0, snapshot_len, BytesMut::new()));
                    }
                    ServerFrame::SnapshotData { data } => {
                        if let Some((_, _, b)) = sync.as_mut() {
                            b.extend_from_slice(&data);
                        }
                    }
                    ServerFrame::Message(m) => {
                        if let Some((at, Some(_), data)) = sync.as_mut() {
                            match parse_snapshot(std::mem::take(data)) {
                                Some(log) if log.last().map_or(0, |m| m.seq.0) == *at => {
                                    s.log = log
                                }
                                _ => s.violations.push("bad snapshot".into()),
                            }
                            sync = Some((*at, None, BytesMut::new()));
                        }
                        let expected = s.log.last().map_or(0, |m| m.seq.0) + 1;
                        if m.seq.0 != expected {
                            s.violations
                                .push(format!("expected seq {expected}, got {}", m.seq.0));
                        }
                        if s.log.last().is_some_and(|l| l.time > m.time) {
                            s.violations
                                .push(format!("time went backwards at {}", m.seq.0));
                        }
                        s.log.push(m);
                    }
                    ServerFrame::Synced { .. } => {
                        if let Some((at, Some(_), data)) = sync.take() {
                            match parse_snapshot(data) {
                                Some(log) if log.last().map_or(0, |m| m.seq.0) == at => s.log = log,
                                _ => s.violations.push("bad snapshot".into()),
                            }
                        }
                        sync = None;
                        s.synced = true;
                    }
                    ServerFrame::SnapshotRequest { request, at } => {
                        let data = snapshot_bytes(&s.log);
                        reply = Some((request, at, data));
                    }
                    ServerFrame::Tick { .. } => s.ticks += 1,
                    ServerFrame::Divergence(_)
                    | ServerFrame::Ping { .. }
                    | ServerFrame::Pong { .. } => {}
                });
                if let Some((request, at, data)) = reply {
                    let total = data.len() as u64;
                    let mut w = snap_writer.lock().await;
                    let mut offset = 0;
                    loop {
                        let end = (offset + 1000).min(data.len());
                        let chunk = ClientFrame::SnapshotChunk {
                            request,
                            at,
                            offset: offset as u64,
                            total,
                            data: data.slice(offset..end),
                        };
                        if w.write_all(&wire::encode(&chunk)).await.is_err() {
                            break;
                        }
                        offset = end;
                        if offset >= data.len() {
                            break;
                        }
                    }
                }
            }
            tx.send_modify(|s| s.ended = true);
        });
        Ok(WireReplica {
            writer,
            state: rx,
            client_seq: 0,
            id: opts.replica,
        })
    }

    /// Sends a payload.
    pub async fn send(&mut self, payload: impl Into<Bytes>) -> std::io::Result<()> {
        self.client_seq += 1;
        let frame = ClientFrame::Send {
            client_seq: self.client_seq,
            payload: payload.into(),
        };
        self.write_raw(&wire::encode(&frame)).await
    }

    /// Writes raw bytes, for tests that misbehave on purpose.
    pub async fn write_raw(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.lock().await.write_all(bytes).await
    }

    /// What the replica has seen so far.
    pub fn state(&self) -> ReplicaState {
        self.state.borrow().clone()
    }

    /// Waits until `pred` holds, or panics after `limit` with what was seen.
    pub async fn wait_until(
        &mut self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&ReplicaState) -> bool,
    ) -> ReplicaState {
        let waited = tokio::time::timeout(limit, self.state.wait_for(|s| pred(s)))
            .await
            .map(|r| r.map(|s| s.clone()));
        match waited {
            Ok(Ok(s)) => s,
            _ => {
                let s = self.state.borrow();
                panic!(
                    "timed out waiting for {what}: log {} synced {} closed {:?} ended {} violations {:?}",
                    s.log.len(),
                    s.synced,
                    s.closed,
                    s.ended,
                    s.violations
                )
            }
        }
    }

    /// Waits until seq `n` is applied.
    pub async fn wait_for_seq(&mut self, n: u64, limit: Duration) -> ReplicaState {
        self.wait_until(limit, &format!("seq {n}"), |s| {
            s.log.last().is_some_and(|m| m.seq.0 >= n)
        })
        .await
    }
}

/// Generous upper bound for a test step; tests finish long before it unless something is wrong.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A TCP proxy on loopback that a test can cut (close every open connection) or freeze (stop
/// forwarding while keeping the sockets open, like a path that silently died).
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    ctl: Arc<ProxyCtl>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyCtl {
    cut: tokio::sync::Notify,
    frozen: std::sync::atomic::AtomicBool,
    accepted: std::sync::atomic::AtomicUsize,
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    ctl: Arc<ProxyCtl>,
) {
    use std::sync::atomic::Ordering;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // A frozen path swallows nothing and delivers nothing: bytes wait here.
        while ctl.frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    /// Starts forwarding connections to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let ctl = Arc::new(ProxyCtl::default());
        let c = ctl.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                c.accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let cut = c.cut.notified();
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    // Dropping both directions closes both sockets.
                    tokio::select! {
                        _ = async { tokio::join!(pump(ir, ow, c.clone()), pump(or, iw, c.clone())) } => {}
                        _ = cut => {}
                    }
                });
            }
        });
        Proxy { addr, ctl, task }
    }

    /// Closes every connection open now; new ones are still accepted.
    pub fn cut(&self) {
        self.ctl.cut.notify_waiters();
    }

    /// Stops (true) or resumes (false) forwarding on every connection.
    pub fn freeze(&self, frozen: bool) {
        self.ctl
            .frozen
            .store(frozen, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.ctl.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}
