//! # isthmus-tests
//!
//! Owns the integration tests (`tests/tests/`), the helpers they share, the network lab
//! ([`netns`]) and the benchmark binary (`src/bin/bench.rs`). [`WireReplica`] is a minimal
//! replica that speaks the raw wire
//! protocol, independent of the island client, so router tests do not trust the code they test
//! against.

pub mod croquet;
pub mod etcd;
pub mod netns;

use bytes::{Bytes, BytesMut};
use isthmus_dispatcher::{Dispatcher, DispatcherConfig};
use isthmus_router::auth::{self, Capability, IslandKeys, KeyPair, NONCE_LEN};
use isthmus_router::budget::MemoryBudget;
use isthmus_router::framed::{FrameReader, ReadError};
use isthmus_router::ids::{ReplicaId, Seq, SessionId};
use isthmus_router::wire::{
    self, AdminCommand, ClientFrame, Code, CreateOptions, Hello, HelloBody, Message, Role,
    ServerFrame, Welcome,
};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpSocket, TcpStream};
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
    /// The memory budget all its sessions share.
    pub budget: Arc<MemoryBudget>,
}

/// Starts a dispatcher on 127.0.0.1 with an ephemeral port.
pub async fn start_router(cfg: DispatcherConfig) -> TestRouter {
    start_router_on(cfg, "127.0.0.1:0".parse().expect("loopback address")).await
}

/// Starts a dispatcher on `listen` (a loopback address; port 0 picks a free one).
pub async fn start_router_on(mut cfg: DispatcherConfig, listen: SocketAddr) -> TestRouter {
    cfg.listen = listen;
    let dispatcher = Dispatcher::bind(cfg).await.expect("bind loopback");
    let addr = dispatcher.local_addr();
    let budget = dispatcher.budget();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(dispatcher.run(shutdown.clone()));
    TestRouter {
        addr,
        shutdown,
        task,
        budget,
    }
}

/// Opens a TCP connection to `addr` from the loopback address `from` (e.g. 127.0.0.2, to act
/// as another source).
pub async fn connect_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if from.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(from, 0))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
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
    /// Answers to admin commands: seq, ok, message.
    pub admin: Vec<(u64, bool, String)>,
    /// Who the router says is attached, with display names (the whole list after a welcome,
    /// then changes).
    pub present: std::collections::BTreeMap<ReplicaId, String>,
    /// Violations of ordering seen on the stream (should stay empty).
    pub violations: Vec<String>,
}

/// A replica speaking the raw protocol: its island state is the log of messages it applied,
/// and its snapshot is that log encoded.
pub struct WireReplica {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    state: watch::Receiver<ReplicaState>,
    client_seq: u64,
    admin_seq: u64,
    nonce: [u8; NONCE_LEN],
    opts: HelloOpts,
    reader: tokio::task::JoinHandle<()>,
    /// This replica's id.
    pub id: ReplicaId,
}

impl Drop for WireReplica {
    /// Dropping a replica closes its connection (the reader holds the socket otherwise).
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A new island for a test: its admin capability (every other capability derives from it).
pub fn new_island() -> Capability {
    Capability::new_island()
}

/// The island keys of an admin capability.
pub fn keys_of(admin: &Capability) -> IslandKeys {
    auth::island_keys(admin).expect("an admin capability")
}

/// How to say hello. [`HelloOpts::new`] makes an honest participant; tests that lie change the
/// fields (the hello is signed as they say, so a lie is caught by the router, not here).
#[derive(Clone, Debug)]
pub struct HelloOpts {
    /// The session claimed; honestly the hash of `keys`.
    pub session: SessionId,
    /// The island's public keys.
    pub keys: IslandKeys,
    /// The capability whose key signs the hello for `role`.
    pub cap: Capability,
    /// The role claimed.
    pub role: Role,
    /// This replica's own key pair: keep it across reconnects to stay the same replica.
    pub replica_key: KeyPair,
    /// The replica id claimed; honestly the hash of `replica_key`.
    pub replica: ReplicaId,
    /// Display name.
    pub name: String,
    /// Create the session if missing, with these options.
    pub create: Option<CreateOptions>,
    /// Resume from this seq.
    pub resume_from: Option<Seq>,
    /// An admin control connection.
    pub control: bool,
    /// A recovering hello (re-creating the island from its replicas).
    pub recover: Option<isthmus_router::wire::Recover>,
}

impl HelloOpts {
    /// A hello for a new participant of the island whose admin capability is `island`.
    pub fn new(island: &Capability, create: bool) -> Self {
        let cap = island.derive(Role::Replica).expect("an admin capability");
        Self::with_cap(keys_of(island), cap, create)
    }

    /// A hello for a new replica holding `cap` (its role is the capability's) of the island
    /// with `keys`.
    pub fn with_cap(keys: IslandKeys, cap: Capability, create: bool) -> Self {
        let replica_key = KeyPair::random();
        HelloOpts {
            session: keys.session_id(),
            keys,
            cap,
            role: cap.role(),
            replica: auth::replica_id_for(&replica_key.public()),
            replica_key,
            name: "wire".into(),
            create: create.then(CreateOptions::default),
            resume_from: None,
            control: false,
            recover: None,
        }
    }

    /// The hello for a connection whose router preamble carried `nonce`.
    pub fn sign(&self, nonce: &[u8; NONCE_LEN]) -> Hello {
        let body = HelloBody {
            session: self.session,
            keys: self.keys,
            replica: self.replica,
            replica_key: self.replica_key.public(),
            name: self.name.clone(),
            role: self.role,
            resume_from: self.resume_from,
            create: self.create.clone(),
            control: self.control,
            recover: self.recover.clone(),
        };
        auth::sign_hello(nonce, body, &self.cap.key_pair(), &self.replica_key)
    }
}

/// Sends our preamble on `stream` and reads the router's, returning its nonce. A refusal that
/// follows stays unread in the stream.
pub async fn exchange_preambles(stream: &mut TcpStream) -> std::io::Result<[u8; NONCE_LEN]> {
    stream.write_all(&wire::preamble()).await?;
    let mut pre = [0u8; wire::ROUTER_PREAMBLE_LEN];
    stream.read_exact(&mut pre).await?;
    let mut head = [0u8; wire::PREAMBLE_LEN];
    head.copy_from_slice(&pre[..wire::PREAMBLE_LEN]);
    wire::check_preamble(&head)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&pre[wire::PREAMBLE_LEN..]);
    Ok(nonce)
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
        Self::on(stream, opts).await
    }

    /// Like [`WireReplica::connect`], from the loopback address `from`.
    pub async fn connect_from(
        from: IpAddr,
        addr: SocketAddr,
        opts: HelloOpts,
    ) -> std::io::Result<WireReplica> {
        Self::on(connect_from(from, addr).await?, opts).await
    }

    /// Says hello on an open connection and starts applying what arrives.
    pub async fn on(mut stream: TcpStream, opts: HelloOpts) -> std::io::Result<WireReplica> {
        let nonce = exchange_preambles(&mut stream).await?;
        let (read, mut write) = stream.into_split();
        let hello = ClientFrame::Hello(opts.sign(&nonce));
        // A router that refused at once may have closed already; the reader reports it.
        let _ = write.write_all(&wire::encode(&hello)).await;
        let writer = Arc::new(Mutex::new(write));
        let (tx, rx) = watch::channel(ReplicaState::default());
        let snap_writer = writer.clone();
        let reader = tokio::spawn(async move {
            let mut frames = FrameReader::new(read, usize::MAX);
            let mut sync: Option<(u64, Option<u64>, BytesMut)> = None;
            loop {
                let frame = match frames.read::<ServerFrame>().await {
                    Ok(f) => f,
                    Err(ReadError::Closed | ReadError::Io(_)) => break,
                    Err(ReadError::Decode(e)) => {
                        tx.send_modify(|s| s.violations.push(format!("bad frame: {e}")));
                        break;
                    }
                };
                let mut reply = None;
                tx.send_modify(|s| match frame {
                    ServerFrame::Welcome(w) => {
                        s.welcome = Some(w);
                        s.present.clear();
                    }
                    ServerFrame::Presence { joined, left } => {
                        s.present
                            .extend(joined.into_iter().map(|p| (p.replica, p.name)));
                        for gone in left {
                            s.present.remove(&gone);
                        }
                    }
                    ServerFrame::Refuse { code, reason }
                    | ServerFrame::Goodbye { code, reason } => s.closed = Some((code, reason)),
                    ServerFrame::Redirect { epoch, .. } => {
                        s.closed =
                            Some((Code::UNKNOWN_SESSION, format!("redirected (epoch {epoch})")))
                    }
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
                    ServerFrame::AdminDone { seq, ok, message } => s.admin.push((seq, ok, message)),
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
            admin_seq: 0,
            nonce,
            id: opts.replica,
            opts,
            reader,
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

    /// Sends an admin command signed with this replica's capability (which must be the admin's
    /// for the router to carry it out); returns its seq, answered in [`ReplicaState::admin`].
    pub async fn admin(&mut self, command: AdminCommand) -> std::io::Result<u64> {
        self.admin_seq += 1;
        let seq = self.admin_seq;
        let transcript = auth::admin_transcript(&self.nonce, self.opts.session, seq, &command);
        let frame = ClientFrame::Admin {
            seq,
            command,
            sig: self.opts.cap.key_pair().sign(&transcript),
        };
        self.write_raw(&wire::encode(&frame)).await?;
        Ok(seq)
    }

    /// How this replica said hello (its keys, to reconnect as the same replica).
    pub fn opts(&self) -> &HelloOpts {
        &self.opts
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

    /// Waits for the refusal or goodbye and returns its code.
    pub async fn refused(&mut self, limit: Duration) -> Code {
        let s = self
            .wait_until(limit, "a refusal", |s| s.closed.is_some() || s.ended)
            .await;
        match s.closed {
            Some((code, _)) => code,
            None => panic!("the connection ended without a refusal"),
        }
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

/// GETs `path` (HTTP/1.0, so the router closes after the body) naming the router `host`, and
/// returns the status line and the body.
pub async fn http_request(addr: SocketAddr, host: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

/// The command name and CPU seconds (user + system) in the text of a `/proc/.../stat` file.
pub fn stat_cpu_seconds(stat: &str) -> Option<(&str, f64)> {
    // Fields after the command name (which may hold spaces and parentheses) start after the
    // last ')'.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line; 12 and 13 after the name.
    Some((stat.get(open + 1..close)?, (ticks(11) + ticks(12)) / 100.0))
}

/// CPU seconds a process (`"self"` or a pid) has used, from /proc; 0 when it cannot be read.
pub fn process_cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat_cpu_seconds(&stat).map_or(0.0, |(_, cpu)| cpu)
}

/// Reads a starting `isthmus router`'s first stdout line, `listening on ADDR`, and returns the
/// address (the router is then ready for hellos). Panics with the line if it is anything else.
pub fn router_ready(child: &mut std::process::Child) -> SocketAddr {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("the router's stdout is piped"))
        .read_line(&mut line)
        .expect("ready line");
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
        .parse()
        .expect("address in the ready line")
}

/// Starts one task per chat replica that types `per_replica` lines (`<name>0`, `<name>1`, ...)
/// one every `every`, queued also while the replica reconnects: the steady traffic the crash
/// and failover tests kill a router in the middle of.
pub fn type_chat_lines(
    replicas: &[(
        String,
        Arc<isthmus_island_client::client::ClientHandle<isthmus_island_client::chat::ChatIsland>>,
    )],
    per_replica: u64,
    every: Duration,
) -> Vec<tokio::task::JoinHandle<()>> {
    use isthmus_island_client::chat::ChatIsland;
    replicas
        .iter()
        .map(|(name, h)| {
            let (name, h) = (name.clone(), h.clone());
            tokio::spawn(async move {
                for k in 0..per_replica {
                    h.send(ChatIsland::payload(&name, &format!("{name}{k}")))
                        .await
                        .expect("queued, also while reconnecting");
                    tokio::time::sleep(every).await;
                }
            })
        })
        .collect()
}
