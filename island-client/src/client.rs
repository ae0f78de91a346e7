//! The tokio driver around [`Replica`]: connection racing, handshake, keep-alive, reconnect.

use crate::replica::{Closed, Event, FrameError, Replica, ReplicaConfig};
use crate::{ClientError, Island};
use bytes::Bytes;
use isthmus_contact::Postcard;
use isthmus_router::auth::{self, KeyPair, NONCE_LEN};
use isthmus_router::framed::{FrameReader, ReadError};
use isthmus_router::ids::Seq;
use isthmus_router::wire::{
    self, AdminCommand, ClientFrame, Code, DecodeError, HelloBody, Role, ServerFrame, PREAMBLE_LEN,
};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Time for one connection attempt, TCP and preamble, and separately for the welcome.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Head start of each candidate address over the next (RFC 8305's "connection attempt delay").
pub const DEFAULT_RACE_DELAY: Duration = Duration::from_millis(250);
/// First reconnect delay; doubles up to the cap.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Longest reconnect delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A ping goes out after this long without sending anything.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(5);
/// With ticks every 50 ms and pongs every 5 s, this much silence means the router is gone.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a replica keeps trying to get back to its router before it gives up: long enough
/// for a router restart or a Wi-Fi hiccup, short enough that a replica whose router is gone for
/// good says so.
pub const DEFAULT_GIVE_UP_AFTER: Duration = Duration::from_secs(300);
/// Events buffered for the application before the client stops reading the socket.
pub const DEFAULT_EVENT_QUEUE: usize = 1024;
/// How long a recovering hello waits for its welcome: a router re-creating the island holds
/// the joins while it gathers its replicas (3 s by default), on top of the usual handshake.
pub const DEFAULT_RECOVER_WAIT: Duration = Duration::from_secs(10);
/// Redirects followed in a row before the client backs off: two routers that disagree about
/// an island's home must not bounce a replica between them for ever.
pub const MAX_REDIRECTS: usize = 4;
/// Addresses taken from a welcome's cluster routers and a redirect, at most.
const MAX_LEARNED_ADDRESSES: usize = 16;

/// How the client connects and stays connected.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Candidate router addresses, best first; raced.
    pub routers: Vec<SocketAddr>,
    /// Who this replica is.
    pub replica: ReplicaConfig,
    /// Per-attempt connect and handshake timeout.
    pub connect_timeout: Duration,
    /// Stagger between candidate addresses.
    pub race_delay: Duration,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Reconnect delay cap.
    pub backoff_max: Duration,
    /// Idle time before a ping.
    pub ping_interval: Duration,
    /// Silence that counts as a dead connection.
    pub liveness_timeout: Duration,
    /// Largest frame accepted from the router.
    pub max_frame_bytes: usize,
    /// Events buffered for the application.
    pub event_queue: usize,
    /// Time without a connection after which the client stops retrying (`Event::GaveUp`).
    pub give_up_after: Duration,
    /// Payloads queued before the first connection, sent in order once welcomed; a replica with
    /// a `stop_after` seq does not stop before they are stamped.
    pub initial_sends: Vec<Bytes>,
    /// How long a recovering hello waits for its welcome (the router may be gathering).
    pub recover_wait: Duration,
}

impl ClientConfig {
    /// Defaults for everything but the addresses and the replica.
    pub fn new(routers: Vec<SocketAddr>, replica: ReplicaConfig) -> Self {
        ClientConfig {
            routers,
            replica,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            race_delay: DEFAULT_RACE_DELAY,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            ping_interval: DEFAULT_PING_INTERVAL,
            liveness_timeout: DEFAULT_LIVENESS_TIMEOUT,
            max_frame_bytes: wire::HARD_MAX_FRAME_BYTES,
            event_queue: DEFAULT_EVENT_QUEUE,
            give_up_after: DEFAULT_GIVE_UP_AFTER,
            initial_sends: Vec::new(),
            recover_wait: DEFAULT_RECOVER_WAIT,
        }
    }
}

type Inspect<I> = Box<dyn FnOnce(&I, Seq) + Send>;

enum Command<I> {
    Send(Bytes, oneshot::Sender<Result<u64, ClientError>>),
    Inspect(Inspect<I>),
    Leave(oneshot::Sender<()>),
}

/// Talks to the running client task. Dropping it makes the replica leave.
pub struct ClientHandle<I> {
    cmds: mpsc::Sender<Command<I>>,
}

impl<I: Island> ClientHandle<I> {
    /// Sends a payload into the island's order. Queued while reconnecting.
    pub async fn send(&self, payload: impl Into<Bytes>) -> Result<u64, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Command::Send(payload.into(), tx))
            .await
            .map_err(|_| ClientError::Ended)?;
        rx.await.map_err(|_| ClientError::Ended)?
    }

    /// Reads the island state (and the last applied seq) in the client task.
    pub async fn inspect<R: Send + 'static>(
        &self,
        f: impl FnOnce(&I, Seq) -> R + Send + 'static,
    ) -> Result<R, ClientError> {
        let (tx, rx) = oneshot::channel();
        let call: Inspect<I> = Box::new(move |island, seq| {
            let _ = tx.send(f(island, seq));
        });
        self.cmds
            .send(Command::Inspect(call))
            .await
            .map_err(|_| ClientError::Ended)?;
        rx.await.map_err(|_| ClientError::Ended)
    }

    /// Leaves the island and waits until the router was told.
    pub async fn leave(self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Command::Leave(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// One live connection.
struct Conn {
    reader: FrameReader<OwnedReadHalf>,
    writer: mpsc::UnboundedSender<Bytes>,
    writer_task: tokio::task::JoinHandle<()>,
}

/// Connects, joins, and starts the client task. Fails fast on the first attempt: an unreachable
/// router, a refused secret or an unknown island is an error here, not a retry loop.
pub async fn connect<I: Island>(
    cfg: ClientConfig,
    island: I,
) -> Result<(ClientHandle<I>, mpsc::Receiver<Event>), ClientError> {
    let mut replica = Replica::new(cfg.replica.clone(), island);
    for payload in &cfg.initial_sends {
        replica.send(payload.clone())?;
    }
    let conn = establish(&cfg, &mut replica).await?;
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (event_tx, event_rx) = mpsc::channel(cfg.event_queue.max(1));
    tokio::spawn(run(cfg, replica, conn, cmd_rx, event_tx));
    Ok((ClientHandle { cmds: cmd_tx }, event_rx))
}

/// A connection whose preambles were exchanged.
struct Opened {
    stream: TcpStream,
    addr: SocketAddr,
    /// The router's nonce for this connection, which the hello's signatures cover.
    nonce: [u8; NONCE_LEN],
}

/// Opens the first candidate to answer with an Isthmus preamble and a nonce, trying the next
/// one every `race_delay` while earlier ones are still pending. `all` names the addresses in
/// the error.
async fn open(
    connect_timeout: Duration,
    race_delay: Duration,
    all: &[SocketAddr],
    candidates: &[SocketAddr],
) -> Result<Opened, ClientError> {
    if candidates.is_empty() {
        return Err(ClientError::NoAddress);
    }
    let mut attempts = JoinSet::new();
    for (i, addr) in candidates.iter().copied().enumerate() {
        let delay = race_delay * i as u32;
        attempts.spawn(async move {
            tokio::time::sleep(delay).await;
            let r = tokio::time::timeout(connect_timeout, async {
                let mut stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                stream.write_all(&wire::preamble()).await?;
                let mut pre = [0u8; PREAMBLE_LEN];
                stream.read_exact(&mut pre).await?;
                // A router of another version sends its 10 bytes and no nonce: check first.
                if let Err(e) = wire::check_preamble(&pre) {
                    return Ok(Err(e));
                }
                let mut nonce = [0u8; NONCE_LEN];
                stream.read_exact(&mut nonce).await?;
                Ok::<_, std::io::Error>(Ok((stream, nonce)))
            })
            .await;
            (addr, r)
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = attempts.join_next().await {
        let Ok((addr, result)) = done else { continue };
        match result {
            Ok(Ok(Ok((stream, nonce)))) => {
                return Ok(Opened {
                    stream,
                    addr,
                    nonce,
                })
            }
            Ok(Ok(Err(DecodeError::UnsupportedVersion { theirs, ours }))) => {
                return Err(ClientError::Version { addr, theirs, ours })
            }
            Ok(Ok(Err(e))) => failures.push(format!("{addr}: {e}")),
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => failures.push(format!("{addr}: no answer within {connect_timeout:?}")),
        }
    }
    Err(ClientError::Unreachable {
        addrs: all.to_vec(),
        detail: failures.join("; "),
    })
}

/// Opens a connection and completes the hello / welcome exchange. If the router that won the
/// race does not know the island (another router on a stale address, say), the remaining
/// candidates get their turn.
async fn establish<I: Island>(
    cfg: &ClientConfig,
    replica: &mut Replica<I>,
) -> Result<Conn, ClientError> {
    let mut candidates = candidates_for(cfg, replica);
    let mut redirects = 0;
    loop {
        let Opened {
            stream,
            addr,
            nonce,
        } = open(
            cfg.connect_timeout,
            cfg.race_delay,
            &cfg.routers,
            &candidates,
        )
        .await?;
        match handshake(cfg, replica, stream, &nonce).await {
            Err(ClientError::Refused { code, reason })
                if matches!(
                    code,
                    Code::UNKNOWN_SESSION | Code::BAD_CREDENTIALS | Code::STALE_EPOCH
                ) && candidates.len() > 1 =>
            {
                tracing::debug!(%addr, "refused ({code}: {reason}); trying the other addresses");
                candidates.retain(|a| *a != addr);
            }
            Err(ClientError::Redirected { epoch, .. })
                if epoch < replica.epoch() && candidates.len() > 1 =>
            {
                // A router that still believes in a replaced home: the others may know better.
                tracing::debug!(%addr, epoch, "redirect from an older epoch; trying the other addresses");
                candidates.retain(|a| *a != addr);
            }
            Err(ClientError::Redirected { contacts, epoch }) => {
                redirects += 1;
                let home = redirect_addresses(&contacts);
                let why = if epoch < replica.epoch() {
                    format!(
                        "{addr} redirected at epoch {epoch}, older than the {} this replica was welcomed at",
                        replica.epoch()
                    )
                } else if home.is_empty() {
                    format!("{addr} redirected to the island's home but named no address for it")
                } else if redirects > MAX_REDIRECTS {
                    format!(
                        "redirected {redirects} times in a row without reaching the island's home"
                    )
                } else {
                    tracing::debug!(%addr, epoch, ?home, "redirected to the island's home");
                    candidates = home;
                    continue;
                };
                return Err(unreachable(cfg, why));
            }
            other => return other,
        }
    }
}

/// Where to try: the configured routers, then the cluster routers the last welcome named.
fn candidates_for<I: Island>(cfg: &ClientConfig, replica: &Replica<I>) -> Vec<SocketAddr> {
    let mut out = cfg.routers.clone();
    let learned: Vec<SocketAddr> = replica
        .cluster()
        .iter()
        .flat_map(|c| c.ordered())
        .filter(|a| !cfg.routers.contains(a))
        .take(MAX_LEARNED_ADDRESSES)
        .collect();
    for a in learned {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// A redirect's addresses, the home's first, without repeats and bounded.
fn redirect_addresses(contacts: &[wire::Contacts]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in contacts
        .iter()
        .take(wire::MAX_CLUSTER_CONTACTS)
        .flat_map(|c| c.ordered())
    {
        if !out.contains(&a) && out.len() < MAX_LEARNED_ADDRESSES {
            out.push(a);
        }
    }
    out
}

async fn handshake<I: Island>(
    cfg: &ClientConfig,
    replica: &mut Replica<I>,
    stream: TcpStream,
    nonce: &[u8; NONCE_LEN],
) -> Result<Conn, ClientError> {
    let (reader, mut write) = stream.into_split();
    write
        .write_all(&replica.hello(nonce))
        .await
        .map_err(|e| unreachable(cfg, e))?;
    let mut reader = FrameReader::new(reader, cfg.max_frame_bytes);
    // A router re-creating the island holds a recovering hello while it gathers.
    let wait = if replica.was_welcomed() {
        cfg.connect_timeout.max(cfg.recover_wait)
    } else {
        cfg.connect_timeout
    };
    let first = tokio::time::timeout(wait, reader.read::<ServerFrame>())
        .await
        .map_err(|_| unreachable(cfg, "no welcome in time"))?
        .map_err(|e| match e {
            ReadError::Closed => unreachable(cfg, "the router closed the connection"),
            e => unreachable(cfg, e),
        })?;
    match replica.handle_frame(first) {
        Ok(()) => {}
        Err(FrameError::Closed(Closed { code, reason })) => {
            return Err(ClientError::Refused { code, reason })
        }
        Err(FrameError::Redirected { contacts, epoch }) => {
            return Err(ClientError::Redirected { contacts, epoch })
        }
        Err(e) => return Err(unreachable(cfg, e)),
    }
    if !replica.is_welcomed() {
        return Err(unreachable(cfg, "the router did not welcome this replica"));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let writer_task = tokio::spawn(write_loop(write, rx));
    Ok(Conn {
        reader,
        writer: tx,
        writer_task,
    })
}

fn unreachable(cfg: &ClientConfig, e: impl std::fmt::Display) -> ClientError {
    ClientError::Unreachable {
        addrs: cfg.routers.clone(),
        detail: e.to_string(),
    }
}

/// Writes what the client task queues, coalescing whatever is waiting into one write. The
/// queue is bounded by the replica's pending-send limit plus the snapshot being uploaded.
async fn write_loop(mut w: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Bytes>) {
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(first) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(&first);
        while buf.len() < 1024 * 1024 {
            match rx.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if w.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

enum Ending {
    Retry(String),
    Lost(String),
    Done,
}

async fn run<I: Island>(
    cfg: ClientConfig,
    mut replica: Replica<I>,
    mut conn: Conn,
    mut cmds: mpsc::Receiver<Command<I>>,
    events: mpsc::Sender<Event>,
) {
    loop {
        let ending = serve(&cfg, &mut replica, &mut conn, &mut cmds, &events).await;
        drop(conn.writer);
        let reason = match ending {
            Ending::Done => {
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.writer_task).await;
                if replica.is_stopped() {
                    // Stopped, not left: the state stays readable until the handle goes.
                    stay_inspectable(&mut replica, &mut cmds).await;
                }
                return;
            }
            Ending::Lost(reason) => {
                conn.writer_task.abort();
                let _ = events.send(Event::SessionLost { reason }).await;
                return;
            }
            Ending::Retry(reason) => {
                conn.writer_task.abort();
                reason
            }
        };
        replica.disconnected();
        let _ = events.send(Event::Disconnected { reason }).await;
        match reconnect(&cfg, &mut replica, &mut cmds, &events).await {
            Ok(Some(c)) => {
                conn = c;
                let _ = events.send(Event::Reconnected).await;
            }
            Ok(None) => return,
            Err(Retrying::Lost(reason)) => {
                let _ = events.send(Event::SessionLost { reason }).await;
                return;
            }
            Err(Retrying::GaveUp(last_error)) => {
                let _ = events
                    .send(Event::GaveUp {
                        after: cfg.give_up_after,
                        last_error,
                    })
                    .await;
                return;
            }
        }
    }
}

async fn stay_inspectable<I: Island>(
    replica: &mut Replica<I>,
    cmds: &mut mpsc::Receiver<Command<I>>,
) {
    while let Some(cmd) = cmds.recv().await {
        match cmd {
            Command::Send(_, reply) => {
                let _ = reply.send(Err(ClientError::Ended));
            }
            Command::Inspect(f) => f(replica.island(), replica.last_seq()),
            Command::Leave(done) => {
                let _ = done.send(());
                return;
            }
        }
    }
}

/// Why reconnecting stopped without a connection.
enum Retrying {
    /// The router answered that the session is gone (a fatal refusal).
    Lost(String),
    /// No way back within `give_up_after`; the last error seen.
    GaveUp(String),
}

/// Tries again with exponential back-off and jitter until it gets back in, the session turns
/// out to be gone, the give-up time passes (`Err`), or the application leaves (`Ok(None)`).
/// Each attempt is announced with `Event::Reconnecting`, so a person sees what is going on.
async fn reconnect<I: Island>(
    cfg: &ClientConfig,
    replica: &mut Replica<I>,
    cmds: &mut mpsc::Receiver<Command<I>>,
    events: &mpsc::Sender<Event>,
) -> Result<Option<Conn>, Retrying> {
    let mut delay = cfg.backoff_initial;
    let give_up = Instant::now() + cfg.give_up_after;
    let mut last_error = String::from("the connection was lost");
    for attempt in 1u32.. {
        let now = Instant::now();
        if now >= give_up {
            return Err(Retrying::GaveUp(last_error));
        }
        // The last pause is cut short so the last attempt comes right at the give-up time.
        let pause = jitter(delay).min(give_up - now);
        let _ = events
            .send(Event::Reconnecting {
                attempt,
                delay: pause,
                routers: candidates_for(cfg, replica),
            })
            .await;
        let wake = Instant::now() + pause;
        // Keep serving the application while waiting: sends queue up, inspections answer.
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                cmd = cmds.recv() => match cmd {
                    Some(Command::Send(payload, reply)) => { let _ = reply.send(replica.send(payload)); }
                    Some(Command::Inspect(f)) => f(replica.island(), replica.last_seq()),
                    Some(Command::Leave(done)) => { let _ = done.send(()); return Ok(None); }
                    None => return Ok(None),
                },
            }
        }
        match establish(cfg, replica).await {
            Ok(conn) => return Ok(Some(conn)),
            // The router restarted and the island is not back yet: a participant that can
            // re-create it may be a moment away (an observer cannot, a replica mid-sync
            // neither), so this is worth trying again until the give-up time.
            Err(ClientError::Refused { code, reason })
                if code == Code::UNKNOWN_SESSION && replica.recover_info().is_some() =>
            {
                tracing::debug!(
                    "reconnect refused ({code}: {reason}); the island may be re-created shortly"
                );
                last_error = format!("{reason} ({code})");
                delay = (delay * 2).min(cfg.backoff_max);
            }
            Err(ClientError::Refused { code, reason }) if !code.is_retryable() => {
                return Err(Retrying::Lost(format!("{reason} ({code})")));
            }
            Err(e) => {
                tracing::debug!("reconnect failed: {e}");
                last_error = e.to_string();
                delay = (delay * 2).min(cfg.backoff_max);
            }
        }
    }
    Err(Retrying::GaveUp(last_error))
}

fn jitter(d: Duration) -> Duration {
    // Between half and all of the delay, so replicas cut off together do not return together.
    let mut b = [0u8; 2];
    let r = getrandom::fill(&mut b).map_or(0, |_| u16::from_le_bytes(b));
    d.mul_f64(0.5 + 0.5 * f64::from(r) / f64::from(u16::MAX))
}

fn flush<I: Island>(replica: &mut Replica<I>, conn: &Conn) -> bool {
    let mut wrote = false;
    while let Some(frame) = replica.poll_transmit() {
        wrote = true;
        if conn.writer.send(frame).is_err() {
            break;
        }
    }
    wrote
}

async fn serve<I: Island>(
    cfg: &ClientConfig,
    replica: &mut Replica<I>,
    conn: &mut Conn,
    cmds: &mut mpsc::Receiver<Command<I>>,
    events: &mpsc::Sender<Event>,
) -> Ending {
    let mut last_heard = Instant::now();
    let mut last_sent = Instant::now();
    let mut nonce = 0u64;
    // Frames that arrived with the welcome.
    let mut pending_error = decode_all(replica, conn, &mut last_heard);
    loop {
        if flush(replica, conn) {
            last_sent = Instant::now();
        }
        while let Some(ev) = replica.poll_event() {
            let _ = events.send(ev).await;
        }
        if let Some(ending) = pending_error.take() {
            return ending;
        }
        if replica.is_stopped() {
            replica.push_frame(&ClientFrame::Leave);
            flush(replica, conn);
            return Ending::Done;
        }
        tokio::select! {
            r = conn.reader.fill() => match r {
                Ok(0) => return Ending::Retry("the router closed the connection".into()),
                Err(e) => return Ending::Retry(format!("connection lost: {e}")),
                Ok(_) => pending_error = decode_all(replica, conn, &mut last_heard),
            },
            cmd = cmds.recv() => match cmd {
                Some(Command::Send(payload, reply)) => { let _ = reply.send(replica.send(payload)); }
                Some(Command::Inspect(f)) => f(replica.island(), replica.last_seq()),
                Some(Command::Leave(done)) => {
                    replica.push_frame(&ClientFrame::Leave);
                    flush(replica, conn);
                    let _ = done.send(());
                    return Ending::Done;
                }
                None => {
                    replica.push_frame(&ClientFrame::Leave);
                    flush(replica, conn);
                    return Ending::Done;
                }
            },
            _ = tokio::time::sleep_until(last_sent + cfg.ping_interval) => {
                nonce += 1;
                replica.push_frame(&ClientFrame::Ping { nonce });
            }
            _ = tokio::time::sleep_until(last_heard + cfg.liveness_timeout) => {
                return Ending::Retry(format!("no word from the router for {:?}", cfg.liveness_timeout));
            }
        }
    }
}

/// Decodes and applies every complete frame in the buffer.
fn decode_all<I: Island>(
    replica: &mut Replica<I>,
    conn: &mut Conn,
    last_heard: &mut Instant,
) -> Option<Ending> {
    loop {
        if replica.is_stopped() {
            return None;
        }
        let frame = match conn.reader.buffered::<ServerFrame>() {
            Ok(Some(f)) => f,
            Ok(None) => return None,
            Err(e) => {
                return Some(Ending::Retry(format!(
                    "unreadable frame from the router: {e}"
                )))
            }
        };
        *last_heard = Instant::now();
        match replica.handle_frame(frame) {
            Ok(()) => {}
            Err(FrameError::Closed(Closed { code, reason })) => {
                let clustered = !replica.cluster().is_empty();
                return Some(closed_ending(code, reason, clustered));
            }
            Err(e) => return Some(Ending::Retry(e.to_string())),
        }
    }
}

/// `clustered`: the last welcome named other routers of a cluster, which carry the island on
/// when this one shuts down or loses its cluster lease (then the goodbye is retried).
fn closed_ending(code: Code, reason: String, clustered: bool) -> Ending {
    if code == Code::SHUTTING_DOWN && !clustered {
        // Islands live in the router's memory: one that shut down has none left to resume,
        // and reconnecting would only meet "unknown session" (or nothing) for minutes.
        return Ending::Lost(format!(
            "the router shut down, and the island with it: {reason} ({code})"
        ));
    }
    if code.is_retryable() {
        Ending::Retry(format!("{reason} ({code})"))
    } else {
        Ending::Lost(format!("{reason} ({code})"))
    }
}

/// Reads one frame within `limit`, or says plainly why not.
async fn read_frame(
    reader: &mut FrameReader<TcpStream>,
    limit: Duration,
) -> Result<ServerFrame, String> {
    match tokio::time::timeout(limit, reader.read::<ServerFrame>()).await {
        Ok(Ok(frame)) => Ok(frame),
        Ok(Err(ReadError::Closed)) => Err("the router closed the connection".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer from the router within {limit:?}")),
    }
}

/// Carries out one admin command: opens a control connection to the island on `card` (which
/// must be its admin postcard), signed with the admin key and a fresh replica key, waits for the
/// welcome, sends `command` signed over this connection's nonce, and returns the router's
/// answer. The router's refusal comes back as [`ClientError::AdminRefused`] in its own words.
pub async fn admin(
    routers: &[SocketAddr],
    card: &Postcard,
    command: AdminCommand,
    timeout: Duration,
) -> Result<String, ClientError> {
    if card.role() != Role::Admin {
        return Err(ClientError::NotAdmin(auth::role_name(card.role())));
    }
    let session = card.keys.session_id();
    let me = KeyPair::random();
    let mut candidates = routers.to_vec();
    loop {
        let Opened {
            mut stream,
            addr,
            nonce,
        } = open(timeout, DEFAULT_RACE_DELAY, routers, &candidates).await?;
        let unreachable = |detail: String| ClientError::Unreachable {
            addrs: routers.to_vec(),
            detail,
        };
        let body = HelloBody {
            session,
            keys: card.keys,
            replica: auth::replica_id_for(&me.public()),
            replica_key: me.public(),
            name: "admin".into(),
            role: Role::Admin,
            resume_from: None,
            create: None,
            control: true,
            recover: None,
        };
        let hello = auth::sign_hello(&nonce, body, &card.capability.key_pair(), &me);
        stream
            .write_all(&wire::encode(&ClientFrame::Hello(hello)))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut reader = FrameReader::new(stream, wire::DEFAULT_MAX_FRAME_BYTES);
        let mut sent = false;
        loop {
            let frame = read_frame(&mut reader, timeout)
                .await
                .map_err(unreachable)?;
            let stream = reader.get_mut();
            match frame {
                ServerFrame::Welcome(_) if !sent => {
                    let seq = 1;
                    let sig = card
                        .capability
                        .key_pair()
                        .sign(&auth::admin_transcript(&nonce, session, seq, &command));
                    let frame = ClientFrame::Admin {
                        seq,
                        command: command.clone(),
                        sig,
                    };
                    stream
                        .write_all(&wire::encode(&frame))
                        .await
                        .map_err(|e| unreachable(e.to_string()))?;
                    sent = true;
                }
                ServerFrame::AdminDone {
                    seq: 1,
                    ok,
                    message,
                } => {
                    let _ = stream.write_all(&wire::encode(&ClientFrame::Leave)).await;
                    return if ok {
                        Ok(message)
                    } else {
                        Err(ClientError::AdminRefused(message))
                    };
                }
                ServerFrame::Refuse { code, reason } | ServerFrame::Goodbye { code, reason } => {
                    // Another router on a stale address does not know the island: try the rest.
                    if !sent && code == Code::UNKNOWN_SESSION && candidates.len() > 1 {
                        candidates.retain(|a| *a != addr);
                        break;
                    }
                    // Closing the island ends this connection too, possibly before the answer.
                    if sent && code == Code::CLOSED && matches!(command, AdminCommand::Close) {
                        return Ok(reason);
                    }
                    return Err(ClientError::Refused { code, reason });
                }
                ServerFrame::Ping { nonce } => {
                    let _ = stream
                        .write_all(&wire::encode(&ClientFrame::Pong { nonce }))
                        .await;
                }
                // A control connection gets no messages; anything else is not for it.
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ChatIsland;
    use bytes::BytesMut;
    use isthmus_contact::ContactPoint;
    use isthmus_router::auth::Capability;
    use isthmus_router::ids::{ReplicaId, RouterTime, SessionId};
    use isthmus_router::wire::{Contacts, Welcome};
    use tokio::net::TcpListener;

    fn admin_card() -> Postcard {
        let contact = ContactPoint::new(SessionId::random(), "garden", vec![]);
        Postcard::for_new_island(contact, Capability::new_island()).expect("card")
    }

    fn welcome(session: SessionId, replica: ReplicaId) -> ServerFrame {
        ServerFrame::Welcome(Welcome {
            session,
            replica,
            created: false,
            last_seq: Seq(0),
            time: RouterTime(0),
            tick_interval_us: 50_000,
            last_client_seq: 0,
            max_payload_bytes: 1000,
            contacts: Contacts::default(),
            incarnation: 1,
            epoch: 1,
            cluster: Vec::new(),
        })
    }

    async fn read_client_frame(s: &mut TcpStream, buf: &mut BytesMut) -> ClientFrame {
        loop {
            if let Some(f) = wire::decode::<ClientFrame>(buf, usize::MAX).expect("decodes") {
                return f;
            }
            assert!(s.read_buf(buf).await.expect("read") > 0, "closed early");
        }
    }

    /// A one-connection router: checks the hello and the admin command as the real one does,
    /// then answers with `ok`.
    async fn fake_router(ok: bool) -> (SocketAddr, tokio::task::JoinHandle<AdminCommand>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut pre = [0u8; PREAMBLE_LEN];
            s.read_exact(&mut pre).await.expect("preamble");
            wire::check_preamble(&pre).expect("ours");
            let nonce = [3u8; NONCE_LEN];
            s.write_all(&wire::router_preamble(&nonce))
                .await
                .expect("write");
            let mut buf = BytesMut::new();
            let ClientFrame::Hello(h) = read_client_frame(&mut s, &mut buf).await else {
                panic!("hello first")
            };
            auth::verify_hello(&nonce, &h).expect("a valid hello");
            assert!(h.body.control);
            assert_eq!(h.body.role, Role::Admin);
            s.write_all(&wire::encode(&welcome(h.body.session, h.body.replica)))
                .await
                .expect("write");
            let ClientFrame::Admin { seq, command, sig } =
                read_client_frame(&mut s, &mut buf).await
            else {
                panic!("an admin frame")
            };
            auth::verify_admin(&h.body.keys, &nonce, h.body.session, seq, &command, &sig)
                .expect("signed by the admin key");
            let done = ServerFrame::AdminDone {
                seq,
                ok,
                message: if ok {
                    "tick set".into()
                } else {
                    "out of range".into()
                },
            };
            s.write_all(&wire::encode(&done)).await.expect("write");
            command
        });
        (addr, task)
    }

    #[test]
    fn replaced_and_busy_are_retried_kicked_and_closed_are_not() {
        // A lone router that shuts down takes its islands with it; a cluster's others carry on.
        assert!(matches!(
            closed_ending(Code::SHUTTING_DOWN, "r".into(), false),
            Ending::Lost(_)
        ));
        assert!(matches!(
            closed_ending(Code::SHUTTING_DOWN, "r".into(), true),
            Ending::Retry(_)
        ));
        for code in [Code::REPLACED, Code::BUSY, Code(1999)] {
            assert!(
                matches!(closed_ending(code, "r".into(), false), Ending::Retry(_)),
                "{code}"
            );
        }
        for code in [Code::KICKED, Code::CLOSED, Code::BAD_CREDENTIALS] {
            assert!(
                matches!(closed_ending(code, "r".into(), false), Ending::Lost(_)),
                "{code}"
            );
        }
    }

    #[tokio::test]
    async fn an_admin_command_is_signed_and_answered() {
        let (addr, router) = fake_router(true).await;
        let card = admin_card();
        let said = admin(
            &[addr],
            &card,
            AdminCommand::SetTick { ms: 20 },
            DEFAULT_CONNECT_TIMEOUT,
        )
        .await
        .expect("done");
        assert_eq!(said, "tick set");
        assert_eq!(
            router.await.expect("router"),
            AdminCommand::SetTick { ms: 20 }
        );
    }

    #[tokio::test]
    async fn a_refused_admin_command_carries_the_routers_words() {
        let (addr, router) = fake_router(false).await;
        let err = admin(
            &[addr],
            &admin_card(),
            AdminCommand::Close,
            DEFAULT_CONNECT_TIMEOUT,
        )
        .await
        .expect_err("refused");
        assert_eq!(err.to_string(), "the router did not do it: out of range");
        router.await.expect("router");
    }

    #[tokio::test]
    async fn only_an_admin_postcard_gives_admin_commands() {
        let card = admin_card().participant().expect("participant");
        let err = admin(
            &["127.0.0.1:9".parse().expect("addr")],
            &card,
            AdminCommand::Close,
            DEFAULT_CONNECT_TIMEOUT,
        )
        .await
        .expect_err("not admin");
        assert!(matches!(err, ClientError::NotAdmin("participant")), "{err}");
    }

    /// A router that answers the preamble with `answer` and then, if given, one frame.
    async fn scripted_router(answer: Vec<u8>, then: Option<ServerFrame>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut pre = [0u8; PREAMBLE_LEN];
            s.read_exact(&mut pre).await.expect("preamble");
            s.write_all(&answer).await.expect("write");
            if let Some(f) = then {
                let mut buf = BytesMut::new();
                let _hello = read_client_frame(&mut s, &mut buf).await;
                s.write_all(&wire::encode(&f)).await.expect("write");
            }
            // Hold the connection until the client is done with it.
            let _ = s.read(&mut [0u8; 1]).await;
        });
        addr
    }

    fn replica_cfg(addr: SocketAddr) -> ClientConfig {
        let card = admin_card().participant().expect("participant");
        ClientConfig::new(vec![addr], ReplicaConfig::from_postcard(&card, "ada"))
    }

    #[tokio::test]
    async fn a_router_of_another_version_is_named_with_both_versions() {
        let addr = scripted_router(wire::preamble_for(1).to_vec(), None).await;
        let err = connect(replica_cfg(addr), ChatIsland::default())
            .await
            .err()
            .expect("refused");
        let text = err.to_string();
        assert!(
            matches!(
                err,
                ClientError::Version {
                    theirs: 1,
                    ours: 2,
                    ..
                }
            ),
            "{text}"
        );
        assert!(
            text.contains("version 1") && text.contains("version 2"),
            "{text}"
        );
        assert!(text.contains("upgrade the older side"), "{text}");
    }

    #[tokio::test]
    async fn a_busy_router_says_so_rather_than_unreachable() {
        let busy = ServerFrame::Refuse {
            code: Code::BUSY,
            reason: "too many connections".into(),
        };
        let addr =
            scripted_router(wire::router_preamble(&[1; NONCE_LEN]).to_vec(), Some(busy)).await;
        let err = connect(replica_cfg(addr), ChatIsland::default())
            .await
            .err()
            .expect("refused");
        assert_eq!(
            err.to_string(),
            "the router is busy: too many connections; try again later"
        );
    }

    fn contacts_of(addr: SocketAddr) -> Contacts {
        Contacts {
            internal: vec![addr],
            ..Contacts::default()
        }
    }

    /// A router that answers every hello with a redirect to `to`, as a cluster router that is
    /// not the island's home does.
    fn redirecting_router(listener: TcpListener, to: SocketAddr, epoch: u64) {
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut pre = [0u8; PREAMBLE_LEN];
                    s.read_exact(&mut pre).await.expect("preamble");
                    s.write_all(&wire::router_preamble(&[2; NONCE_LEN]))
                        .await
                        .expect("write");
                    let mut buf = BytesMut::new();
                    let _hello = read_client_frame(&mut s, &mut buf).await;
                    let redirect = ServerFrame::Redirect {
                        contacts: vec![contacts_of(to)],
                        epoch,
                    };
                    let _ = s.write_all(&wire::encode(&redirect)).await;
                });
            }
        });
    }

    #[tokio::test]
    async fn a_redirect_is_followed_to_the_islands_home() {
        let home = scripted_router(
            wire::router_preamble(&[1; NONCE_LEN]).to_vec(),
            Some(welcome(
                SessionId::random(),
                ReplicaId(uuid::Uuid::from_u128(1)),
            )),
        )
        .await;
        let other = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let other_addr = other.local_addr().expect("addr");
        redirecting_router(other, home, 3);
        let (_h, mut events) = connect(replica_cfg(other_addr), ChatIsland::default())
            .await
            .expect("welcomed by the home");
        assert!(matches!(events.recv().await, Some(Event::Welcomed { .. })));
    }

    #[tokio::test]
    async fn two_routers_redirecting_to_each_other_do_not_bounce_a_replica_for_ever() {
        let a = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let b = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (a_addr, b_addr) = (a.local_addr().expect("a"), b.local_addr().expect("b"));
        redirecting_router(a, b_addr, 3);
        redirecting_router(b, a_addr, 3);
        let err = connect(replica_cfg(a_addr), ChatIsland::default())
            .await
            .err()
            .expect("gives up on the bouncing");
        assert!(
            err.to_string()
                .contains(&format!("redirected {} times in a row", MAX_REDIRECTS + 1)),
            "{err}"
        );
    }

    #[test]
    fn a_welcomes_cluster_routers_join_the_reconnect_candidates_after_the_configured_ones() {
        let configured: SocketAddr = "127.0.0.1:7470".parse().expect("addr");
        let cfg = replica_cfg(configured);
        let mut r = Replica::new(cfg.replica.clone(), ChatIsland::default());
        assert_eq!(candidates_for(&cfg, &r), vec![configured]);
        let ServerFrame::Welcome(mut w) = welcome(SessionId::random(), r.replica_id()) else {
            unreachable!()
        };
        let other: SocketAddr = "127.0.0.2:7470".parse().expect("addr");
        w.cluster = vec![contacts_of(other), contacts_of(configured)];
        r.handle_frame(ServerFrame::Welcome(w)).expect("welcome");
        assert_eq!(candidates_for(&cfg, &r), vec![configured, other]);
    }

    /// A router that welcomes every hello at `epoch` (then sends `then`), after `delay(n)`
    /// before its preamble on its n-th connection (from 0), and closes the n-th connection after
    /// `hold(n)`. Returns how many hellos it answered.
    fn welcoming_router(
        listener: TcpListener,
        epoch: u64,
        then: Option<ServerFrame>,
        delay: fn(usize) -> Duration,
        hold: fn(usize) -> Duration,
    ) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = answered.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let (wait, keep) = (delay(n), hold(n));
                n += 1;
                let (count, then) = (count.clone(), then.clone());
                tokio::spawn(async move {
                    let mut pre = [0u8; PREAMBLE_LEN];
                    s.read_exact(&mut pre).await.expect("preamble");
                    tokio::time::sleep(wait).await;
                    if s.write_all(&wire::router_preamble(&[3; NONCE_LEN]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let mut buf = BytesMut::new();
                    let ClientFrame::Hello(h) = read_client_frame(&mut s, &mut buf).await else {
                        panic!("hello first")
                    };
                    let ServerFrame::Welcome(mut w) = welcome(h.body.session, h.body.replica)
                    else {
                        unreachable!()
                    };
                    w.epoch = epoch;
                    let mut out = wire::encode(&ServerFrame::Welcome(w)).to_vec();
                    if let Some(f) = then {
                        out.extend_from_slice(&wire::encode(&f));
                    }
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = s.write_all(&out).await;
                    let _ = tokio::time::timeout(keep, s.read(&mut [0u8; 1])).await;
                });
            }
        });
        answered
    }

    #[tokio::test]
    async fn a_redirect_from_an_older_epoch_is_passed_over_for_the_other_routers() {
        let home = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stale = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (home_addr, stale_addr) = (
            home.local_addr().expect("a"),
            stale.local_addr().expect("b"),
        );
        // The home (epoch 5) drops the first connection soon; the other router still points
        // at it, but at epoch 1, which the replica knows is older once welcomed.
        let answered = welcoming_router(
            home,
            5,
            None,
            |_| Duration::ZERO,
            |n| Duration::from_millis(if n == 0 { 100 } else { 30_000 }),
        );
        redirecting_router(stale, home_addr, 1);
        let mut cfg = replica_cfg(stale_addr);
        cfg.routers = vec![stale_addr, home_addr];
        cfg.race_delay = Duration::from_millis(200);
        cfg.backoff_initial = Duration::from_millis(10);
        let (_h, mut events) = connect(cfg, ChatIsland::default()).await.expect("welcomed");
        let back = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(e) = events.recv().await {
                if matches!(e, Event::Reconnected) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(back, Ok(true), "reconnected to the home");
        assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_welcome_from_an_older_epoch_sends_the_replica_to_its_other_routers() {
        let old = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let new = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (old_addr, new_addr) = (old.local_addr().expect("a"), new.local_addr().expect("b"));
        // The replaced home (epoch 1, which would also deliver a message) is slow the first
        // time, so the new home (epoch 5) welcomes the replica first; then the new home drops
        // it, and on the way back the old one answers first.
        let stale = ServerFrame::Message(isthmus_router::wire::Message {
            seq: Seq(1),
            time: RouterTime(1),
            origin: isthmus_router::wire::Origin::Router,
            client_seq: 0,
            payload: ChatIsland::payload("old", "from the replaced home"),
        });
        let old_answers = welcoming_router(
            old,
            1,
            Some(stale),
            |n| Duration::from_millis(if n == 0 { 2_000 } else { 0 }),
            |_| Duration::from_secs(30),
        );
        welcoming_router(
            new,
            5,
            None,
            |_| Duration::ZERO,
            |n| {
                if n == 0 {
                    Duration::from_millis(100)
                } else {
                    Duration::from_secs(30)
                }
            },
        );
        let mut cfg = replica_cfg(old_addr);
        cfg.routers = vec![old_addr, new_addr];
        cfg.race_delay = Duration::from_millis(50);
        cfg.backoff_initial = Duration::from_millis(10);
        let (h, mut events) = connect(cfg, ChatIsland::default()).await.expect("welcomed");
        let seen = tokio::time::timeout(Duration::from_secs(20), async {
            let mut seen = Vec::new();
            let mut welcomes = 0;
            while let Some(e) = events.recv().await {
                welcomes += usize::from(matches!(e, Event::Welcomed { .. }));
                seen.push(e);
                if welcomes == 2 {
                    return seen;
                }
            }
            panic!("events ended: {seen:?}")
        })
        .await
        .expect("back in time");
        assert!(
            seen.iter().any(|e| matches!(e, Event::Reconnected))
                && !seen.iter().any(|e| matches!(e, Event::SessionLost { .. })),
            "{seen:?}"
        );
        assert!(
            old_answers.load(std::sync::atomic::Ordering::SeqCst) >= 1,
            "the replaced home was tried"
        );
        let seq = h.inspect(|_, seq| seq).await.expect("inspect");
        assert_eq!(seq, Seq(0), "nothing from the replaced home was applied");
    }
}
