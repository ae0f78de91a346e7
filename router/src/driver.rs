//! The tokio driver around one [`Session`] core: a session task that owns the core and feeds it
//! events, and per-connection reader and writer tasks.
//!
//! Readers decode frames and send them to the session task over a bounded channel, so a flood
//! from one replica slows that replica's socket, not the router. The session task never awaits a
//! replica: it pushes encoded frames into each connection's [`Outbox`] and moves on. Each wake of a
//! connection's writer takes everything queued and writes it as one batch; coalescing is what
//! lets one core deliver millions of small messages a second.
//!
//! Ending a connection never cuts a frame in half. A slow consumer's close drops what is queued
//! for it, but the batch being written is cut at the end of the frame in progress, which gets up
//! to [`SHUTDOWN_GRACE`] to finish; then the goodbye (1003) is written and the stream shut down.
//!
//! When the core reports its island closed by the admin ([`Session::is_closed`]), the task
//! writes out the goodbyes, refuses attaches already on their way, calls its [`Retire`] with
//! [`Ending::Closed`] and ends.

use crate::auth::IslandKeys;
use crate::framed::FrameReader;
use crate::ids::{ConnId, SessionId};
use crate::session::{JoinRequest, Notice, Output, Session, SessionConfig};
use crate::stats::{RouterStats, SessionStats};
use crate::wire::{self, ClientFrame, Code, DecodeError};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Events waiting for the session task; when full, readers wait, which slows their sockets.
pub const DEFAULT_EVENT_QUEUE: usize = 4096;
/// A write that makes no progress for this long means the peer is gone.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Events the session task handles before it looks at timers and new connections again.
const EVENT_BATCH: usize = 64;
/// How long shutdown waits for goodbyes to be written.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Runtime settings of a session driver.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// The core's limits and timings.
    pub session: SessionConfig,
    /// Largest frame body accepted from a replica.
    pub max_frame_bytes: usize,
    /// Bound of the channel from readers to the session task.
    pub event_queue: usize,
    /// Stall limit of one write.
    pub write_timeout: Duration,
    /// The island's name for log lines (its beacon name; empty when it has none).
    pub island: String,
    /// Where the session's counters go (the dispatcher shares one among all sessions).
    pub stats: Arc<RouterStats>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            session: SessionConfig::default(),
            max_frame_bytes: wire::DEFAULT_MAX_FRAME_BYTES,
            event_queue: DEFAULT_EVENT_QUEUE,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            island: String::new(),
            stats: Arc::default(),
        }
    }
}

/// A byte stream a replica is connected by: TCP in production, in-memory pipes in tests.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A connection that finished its handshake, handed to a session.
pub struct Attach {
    /// Its number.
    pub conn: ConnId,
    /// What it asked for.
    pub request: JoinRequest,
    /// The socket, preamble and hello already consumed.
    pub stream: Box<dyn Stream>,
    /// Bytes read past the hello.
    pub leftover: BytesMut,
    /// Held until the connection is done, e.g. a permit of the dispatcher's connection cap.
    pub guard: Option<Box<dyn Send + Sync>>,
}

// A frame event is as large as a `ClientFrame`; the events only pass through a bounded channel,
// and boxing each frame would cost an allocation per message on the hot path.
#[allow(clippy::large_enum_variant)]
enum Event {
    Frame(ConnId, ClientFrame),
    Gone(ConnId, String),
    Broken(ConnId, Code, String),
    Shutdown,
}

/// Bytes written by each connection's writer, reported to the session task out of band: if they
/// queued behind a burst of sends, a replica that reads perfectly well would look slow.
#[derive(Default)]
struct Flushes {
    /// Connections whose `Outbox::flushed` went from zero to non-zero; at most one entry each.
    ready: Mutex<Vec<(ConnId, Arc<Outbox>)>>,
    any: std::sync::atomic::AtomicBool,
    wake: Notify,
}

impl Flushes {
    fn report(&self, conn: ConnId, outbox: &Arc<Outbox>, bytes: usize) {
        use std::sync::atomic::Ordering;
        if outbox.flushed.fetch_add(bytes, Ordering::AcqRel) == 0 {
            if let Ok(mut ready) = self.ready.lock() {
                ready.push((conn, outbox.clone()));
            }
            self.any.store(true, Ordering::Release);
            self.wake.notify_one();
        }
    }

    fn take(&self, into: &mut Vec<(ConnId, usize)>) {
        use std::sync::atomic::Ordering;
        if !self.any.swap(false, Ordering::AcqRel) {
            return;
        }
        if let Ok(mut ready) = self.ready.lock() {
            for (conn, outbox) in ready.drain(..) {
                into.push((conn, outbox.flushed.swap(0, Ordering::AcqRel)));
            }
        }
    }
}

/// Why a session task is ending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// It lingered empty for its linger time.
    Expired,
    /// Its admin closed it; it must go (the owner may remember that it was closed).
    Closed,
}

/// Decides, under the owner's lock, whether an ending session may go: an expired one must not if
/// an attach is already on its way (the second argument tells); a closed one always goes.
/// Returning true removes it from the owner's map.
pub type Retire = Box<dyn Fn(Ending, &dyn Fn() -> bool) -> bool + Send + Sync>;

/// A cloneable handle to a running session task.
#[derive(Clone)]
pub struct SessionHandle {
    id: SessionId,
    // Attaches are bounded by the dispatcher's connection cap, and sending one must never wait
    // (the dispatcher sends under its registry lock), hence unbounded.
    attach: mpsc::UnboundedSender<Attach>,
    events: mpsc::Sender<Event>,
}

impl SessionHandle {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Hands a connection to the session. Gives it back if the session has ended.
    pub fn attach(&self, attach: Attach) -> Result<(), Box<Attach>> {
        self.attach.send(attach).map_err(|e| Box::new(e.0))
    }

    /// Asks the session to say goodbye to everyone and end.
    pub async fn shutdown(&self) {
        let _ = self.events.send(Event::Shutdown).await;
    }
}

/// Starts a session task. It ends after lingering empty (when `retire` agrees) or on shutdown.
pub fn spawn_session(
    id: SessionId,
    keys: IslandKeys,
    cfg: DriverConfig,
    retire: Retire,
) -> (SessionHandle, tokio::task::JoinHandle<()>) {
    let (attach_tx, attach_rx) = mpsc::unbounded_channel();
    let (event_tx, event_rx) = mpsc::channel(cfg.event_queue.max(1));
    let handle = SessionHandle {
        id,
        attach: attach_tx,
        events: event_tx.clone(),
    };
    let task = SessionTask {
        stats: cfg.stats.register(id, &cfg.island),
        counts: Counts::default(),
        core: Session::new(id, keys, cfg.session.clone(), now()),
        cfg,
        conns: HashMap::new(),
        events_tx: event_tx,
        tasks: JoinSet::new(),
        flushes: Arc::new(Flushes::default()),
        flushed: Vec::new(),
    };
    let join = tokio::spawn(task.run(attach_rx, event_rx, retire));
    (handle, join)
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

struct Conn {
    outbox: Arc<Outbox>,
    cancel: CancellationToken,
}

/// The session task's own counts, published to its [`SessionStats`] once per batch.
#[derive(Default)]
struct Counts {
    deliveries: u64,
    bytes_out: u64,
}

struct SessionTask {
    core: Session,
    stats: Arc<SessionStats>,
    counts: Counts,
    cfg: DriverConfig,
    conns: HashMap<ConnId, Conn>,
    events_tx: mpsc::Sender<Event>,
    tasks: JoinSet<()>,
    flushes: Arc<Flushes>,
    flushed: Vec<(ConnId, usize)>,
}

impl Drop for SessionTask {
    /// Also when the task panicked or was aborted: a session never stays in the gauges.
    fn drop(&mut self) {
        self.cfg.stats.retire(&self.stats);
    }
}

impl SessionTask {
    async fn run(
        mut self,
        mut attach_rx: mpsc::UnboundedReceiver<Attach>,
        mut event_rx: mpsc::Receiver<Event>,
        retire: Retire,
    ) {
        let id = self.core.id();
        debug!(session = %id, "session started");
        let mut batch = Vec::with_capacity(EVENT_BATCH);
        let mut shutting_down = false;
        let flushes = self.flushes.clone();
        loop {
            let deadline = self.core.poll_timeout();
            tokio::select! {
                biased;
                _ = flushes.wake.notified() => self.take_flushes(),
                Some(attach) = attach_rx.recv() => self.attach(attach),
                n = event_rx.recv_many(&mut batch, EVENT_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    for event in batch.drain(..) {
                        // Credit writes first, so a burst is judged against what is really
                        // still queued.
                        self.take_flushes();
                        shutting_down |= self.event(event);
                    }
                }
                _ = sleep_until(deadline) => self.core.handle_timeout(now()),
                // Reap finished connection tasks so the set stays small.
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
            self.apply_outputs();
            if shutting_down {
                break;
            }
            if self.core.is_closed() {
                // The owner forgets the session now, so no new attach can come; the ones already
                // on their way are refused (the core says CLOSED) rather than dropped unanswered.
                retire(Ending::Closed, &|| !attach_rx.is_empty());
                attach_rx.close();
                while let Ok(attach) = attach_rx.try_recv() {
                    self.attach(attach);
                }
                self.apply_outputs();
                info!(session = %id, "session closed by its admin");
                break;
            }
            if self.core.is_expired(now()) && retire(Ending::Expired, &|| !attach_rx.is_empty()) {
                info!(session = %id, "session expired after lingering empty");
                break;
            }
        }
        // The counts are final (the last outputs were applied): the session leaves the gauges now,
        // not after the goodbyes' grace.
        self.cfg.stats.retire(&self.stats);
        // Give writers a moment to deliver goodbyes, then cut everything.
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
        debug!(session = %id, "session task ended");
    }

    fn take_flushes(&mut self) {
        self.flushes.take(&mut self.flushed);
        let now = now();
        for (conn, bytes) in self.flushed.drain(..) {
            self.counts.bytes_out += bytes as u64;
            self.core.handle_flushed(conn, bytes, now);
        }
    }

    fn attach(&mut self, a: Attach) {
        let outbox = Arc::new(Outbox::default());
        let cancel = CancellationToken::new();
        let (reader, writer) = tokio::io::split(a.stream);
        self.tasks.spawn(read_loop(
            a.conn,
            reader,
            a.leftover,
            self.cfg.max_frame_bytes,
            self.events_tx.clone(),
            cancel.clone(),
            self.stats.clone(),
        ));
        self.tasks.spawn(write_loop(
            writer,
            WriterCtx {
                conn: a.conn,
                outbox: outbox.clone(),
                flushes: self.flushes.clone(),
                events: self.events_tx.clone(),
                cancel: cancel.clone(),
                write_timeout: self.cfg.write_timeout,
                _guard: a.guard,
            },
        ));
        self.conns.insert(a.conn, Conn { outbox, cancel });
        self.core.handle_join(a.conn, a.request, now());
    }

    /// Returns true when the session must end.
    fn event(&mut self, event: Event) -> bool {
        let now = now();
        match event {
            Event::Frame(conn, frame) => self.core.handle_frame(conn, frame, now),
            Event::Gone(conn, why) => {
                debug!(session = %self.core.id(), ?conn, %why, "connection gone");
                self.core.handle_disconnect(conn, now);
                self.drop_conn(conn);
            }
            Event::Broken(conn, code, why) => {
                warn!(session = %self.core.id(), ?conn, %why, "closing connection: {}", code.name());
                self.core.disconnect(conn, code, &why, now);
            }
            Event::Shutdown => {
                self.core
                    .shutdown(Code::SHUTTING_DOWN, "the router is shutting down", now);
                return true;
            }
        }
        false
    }

    fn drop_conn(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            c.cancel.cancel();
        }
    }

    fn apply_outputs(&mut self) {
        let id = self.core.id();
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit { conn, frame } => {
                    if let Some(c) = self.conns.get(&conn) {
                        c.outbox.push(frame);
                        self.counts.deliveries += 1;
                    }
                }
                Output::Close {
                    conn,
                    goodbye,
                    discard_queued,
                } => {
                    if let Some(c) = self.conns.remove(&conn) {
                        // A slow consumer's writer cuts its batch at the end of the frame it is
                        // writing, so the stream stays whole and the goodbye still arrives; it
                        // stops the reader when it is done.
                        c.outbox.close(goodbye, discard_queued);
                    }
                }
                Output::Notice(n) => {
                    log_notice(id, &self.cfg.island, &n);
                    self.stats.note(&n);
                }
            }
        }
        self.stats.publish(
            self.core.last_seq().0,
            self.counts.deliveries,
            self.counts.bytes_out,
            self.core.ticks(),
        );
    }
}

/// Logs a notice with the island's name and the replica's display name beside the ids: people
/// read these logs.
fn log_notice(id: SessionId, island: &str, n: &Notice) {
    match n {
        Notice::Joined {
            replica,
            name,
            conn,
            resumed,
        } => info!(session = %id, island = ?island, %replica, ?conn, resumed, "{name:?} joined"),
        Notice::Left {
            replica,
            name,
            conn,
            code,
        } => match code {
            Some(code) => {
                info!(session = %id, island = ?island, %replica, ?conn, "{name:?} was closed: {code}")
            }
            None => info!(session = %id, island = ?island, %replica, ?conn, "{name:?} left"),
        },
        Notice::Refused { replica, code } => {
            info!(session = %id, island = ?island, %replica, "join refused: {code}")
        }
        Notice::Diverged(d) => {
            let groups: Vec<String> = d
                .groups
                .iter()
                .map(|g| {
                    let who: Vec<String> = g.replicas.iter().map(|r| r.to_string()).collect();
                    format!("{} -> [{}]", hex(&g.hash), who.join(", "))
                })
                .collect();
            warn!(session = %id, island = ?island, seq = d.seq.0, "replicas diverged: {}", groups.join("; "));
        }
        Notice::SnapshotWanted { messages } => {
            debug!(session = %id, messages, "snapshot wanted")
        }
        Notice::Recovered {
            at,
            epoch,
            replicas,
        } => {
            info!(session = %id, island = ?island, at = at.0, epoch, replicas, "island re-created from its replicas")
        }
        Notice::SnapshotStored { at, bytes, took } => {
            debug!(session = %id, at = at.0, bytes, ?took, "snapshot stored")
        }
        Notice::Synced {
            replica,
            resumed,
            took,
            ..
        } => debug!(session = %id, %replica, resumed, ?took, "synced"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// Frames queued for one connection's writer. The session core bounds what is queued (it counts
/// bytes until the writer reports them flushed), so this queue needs no bound of its own.
#[derive(Default)]
pub struct Outbox {
    state: Mutex<OutboxState>,
    wake: Notify,
    /// Bytes written and not yet credited to the session core.
    flushed: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct OutboxState {
    frames: VecDeque<Bytes>,
    closing: Option<Option<Bytes>>,
    /// Closed as a slow consumer: what is queued is dropped, and a write in progress stops at
    /// the end of its current frame.
    discard: bool,
}

impl Outbox {
    fn push(&self, frame: Bytes) {
        if let Ok(mut s) = self.state.lock() {
            if s.closing.is_none() {
                s.frames.push_back(frame);
            }
        }
        self.wake.notify_one();
    }

    fn close(&self, goodbye: Option<Bytes>, discard: bool) {
        if let Ok(mut s) = self.state.lock() {
            if discard {
                s.frames.clear();
                s.discard = true;
            }
            s.closing = Some(goodbye);
        }
        self.wake.notify_one();
    }

    fn discarding(&self) -> bool {
        self.state.lock().map_or(true, |s| s.discard)
    }

    fn take(&self, into: &mut Vec<Bytes>) -> Option<Option<Bytes>> {
        match self.state.lock() {
            Ok(mut s) => {
                into.extend(s.frames.drain(..));
                s.closing.take()
            }
            Err(_) => Some(None),
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    conn: ConnId,
    reader: R,
    buf: BytesMut,
    max_frame: usize,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
    stats: Arc<SessionStats>,
) {
    let mut frames = FrameReader::with_buffered(reader, buf, max_frame);
    let event = loop {
        match frames.buffered::<ClientFrame>() {
            Ok(Some(frame)) => {
                if events.send(Event::Frame(conn, frame)).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                let code = match e {
                    DecodeError::FrameTooLarge { .. } => Code::PAYLOAD_TOO_LARGE,
                    _ => Code::MALFORMED,
                };
                break Event::Broken(conn, code, e.to_string());
            }
        }
        tokio::select! {
            r = frames.fill() => match r {
                Ok(0) => break Event::Gone(conn, "closed by the replica".into()),
                Ok(n) => stats.read_bytes(n),
                Err(e) => break Event::Gone(conn, format!("read failed: {e}")),
            },
            _ = cancel.cancelled() => return,
        }
    };
    let _ = events.send(event).await;
}

struct WriterCtx {
    conn: ConnId,
    outbox: Arc<Outbox>,
    flushes: Arc<Flushes>,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
    write_timeout: Duration,
    /// Released when the writer ends, i.e. when the connection is really done.
    _guard: Option<Box<dyn Send + Sync>>,
}

async fn write_loop<W: AsyncWrite + Unpin>(mut writer: W, ctx: WriterCtx) {
    let WriterCtx {
        conn,
        outbox,
        flushes,
        events,
        cancel,
        write_timeout,
        _guard,
    } = ctx;
    let mut frames = Vec::new();
    // Allocated on the first batch of more than one frame: an idle connection that only gets
    // ticks never needs it.
    let mut merged = Vec::new();
    let mut ends = Vec::new();
    loop {
        let closing = outbox.take(&mut frames);
        if frames.is_empty() && closing.is_none() {
            tokio::select! {
                _ = outbox.wake.notified() => continue,
                // Cancelled without a close: the connection is gone already.
                _ = cancel.cancelled() => return,
            }
        }
        ends.clear();
        // One frame goes out as it is; several are merged so they share one write.
        let single;
        let buf: &[u8] = if frames.len() == 1 {
            single = frames.pop().unwrap_or_default();
            ends.push(single.len());
            &single
        } else {
            merged.clear();
            for f in frames.drain(..) {
                merged.extend_from_slice(&f);
                ends.push(merged.len());
            }
            &merged
        };
        if !buf.is_empty() {
            match write_frames(&mut writer, buf, &ends, &outbox, write_timeout, &cancel).await {
                Written::All => flushes.report(conn, &outbox, buf.len()),
                // Closed as a slow consumer mid-batch: the next round finds the goodbye.
                Written::Cut if closing.is_none() => continue,
                Written::Cut => {}
                Written::Failed(why) => {
                    let _ = events.send(Event::Gone(conn, why)).await;
                    cancel.cancel();
                    return;
                }
                Written::Cancelled => return,
            }
        }
        if let Some(goodbye) = closing {
            if let Some(g) = goodbye {
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, writer.write_all(&g)).await;
            }
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, writer.shutdown()).await;
            cancel.cancel();
            return;
        }
    }
}

/// How a batch of frames went out.
enum Written {
    /// Every byte.
    All,
    /// Up to the end of the frame being written when the connection was closed as a slow
    /// consumer; the rest was dropped.
    Cut,
    /// The peer is gone or stalled; the stream may end mid-frame.
    Failed(String),
    /// The connection is gone already.
    Cancelled,
}

/// Writes `buf`, whose frames end at `ends`. A write that makes no progress for
/// `write_timeout` fails. When the outbox is closed as a slow consumer meanwhile, the batch is
/// cut at the end of the frame being written (so the peer never sees half a frame before the
/// goodbye), and that frame gets at most [`SHUTDOWN_GRACE`] to finish.
async fn write_frames<W: AsyncWrite + Unpin>(
    writer: &mut W,
    buf: &[u8],
    ends: &[usize],
    outbox: &Outbox,
    write_timeout: Duration,
    cancel: &CancellationToken,
) -> Written {
    let mut pos = 0;
    let mut limit = buf.len();
    let mut grace: Option<Instant> = None;
    while pos < limit {
        let stall = Instant::now() + write_timeout;
        let deadline = grace.map_or(stall, |g| g.min(stall));
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Written::Cancelled,
            _ = outbox.wake.notified(), if grace.is_none() => {
                if outbox.discarding() {
                    let at_boundary = pos == 0 || ends.binary_search(&pos).is_ok();
                    limit = if at_boundary {
                        pos
                    } else {
                        ends.iter().copied().find(|&e| e > pos).unwrap_or(buf.len())
                    };
                    grace = Some(Instant::now() + SHUTDOWN_GRACE);
                }
            }
            // A pending `write` has written nothing, so dropping it for the branch above loses
            // no bytes.
            r = tokio::time::timeout_at(deadline, writer.write(&buf[pos..limit])) => match r {
                Ok(Ok(0)) => return Written::Failed("the connection accepts no more bytes".into()),
                Ok(Ok(n)) => pos += n,
                Ok(Err(e)) => return Written::Failed(format!("write failed: {e}")),
                Err(_) if grace.is_some() => {
                    return Written::Failed(format!(
                        "the frame being written at close did not finish within {SHUTDOWN_GRACE:?}"
                    ))
                }
                Err(_) => return Written::Failed(format!("write stalled for {write_timeout:?}")),
            }
        }
    }
    if grace.is_some() {
        Written::Cut
    } else {
        Written::All
    }
}
