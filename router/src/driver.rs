//! The tokio driver around one [`Session`] core: a session task that owns the core and every
//! connection's write half, and one reader task per connection.
//!
//! Readers decode what each socket read brings and send it to the session task as one event
//! over a bounded channel, so a flood from one replica slows that replica's socket, not the
//! router. The session task feeds a batch of events to the core, appends the frames the core
//! emits to each recipient's queue, and at the end of the batch writes every queue it touched
//! straight to its socket with a non-blocking (vectored) write: no task hop, no lock, one
//! write for everything a connection got in the batch. A batch is every event waiting when the
//! task wakes, and again after one yield (so readers woken by the same poll of the sockets get
//! their turn first), taking at most four more batches; a round is written early, after the
//! frame that made it, once 1,024 frames were handled or a quarter of the slow-consumer bound is
//! queued to one connection, so a replica that reads never nears that bound. Coalescing per
//! batch is what lets one core deliver millions of small messages a second. The bytes written
//! are credited to the core at once ([`Session::handle_flushed`]), so its slow-consumer bound
//! counts exactly what is still unwritten. Ticks take the same path: the core encodes a tick
//! once per session, and each idle replica costs one write.
//!
//! Each read taken from the queue spends one unit of tokio's cooperative budget, so a session
//! whose readers keep the queue full gives its worker's other tasks (other sessions) a turn at
//! least every budget of reads (128, each at most [`FRAMES_PER_EVENT`] frames); and due timers
//! (ticks, idle and snapshot timeouts, the write timeout) are run after every wake, not only
//! when the queue runs dry.
//!
//! A socket that would block keeps its queue: the session task stops writing to it and waits
//! for it to become writable (the write registers a waker of that connection, which wakes the
//! session task), then writes again; meanwhile new frames only join the queue. A connection
//! whose writes make no progress for [`DriverConfig::write_timeout`] is dropped as gone.
//!
//! Ending a connection never cuts a frame in half. When the core closes a connection, what is
//! left of its queue (for a slow consumer, only the rest of the frame already begun: the others
//! are dropped) and then the goodbye are written on the direct path; if the socket would block,
//! a closing task finishes them, giving the cut frame and the goodbye up to [`SHUTDOWN_GRACE`]
//! each and frames queued before a graceful close [`DriverConfig::write_timeout`] each, then
//! shuts the stream down.
//!
//! When the core reports its island closed by the admin ([`Session::is_closed`]), the task
//! writes out the goodbyes, refuses attaches already on their way, calls its [`Retire`] with
//! [`Ending::Closed`] and ends.
//!
//! Non-blocking writes are `poll_write` on the generic [`Stream`] with a waker of the
//! connection's own, not a TCP-only `try_write`: the same path runs over TCP and the in-memory
//! pipes of the tests, and a `Pending` answer doubles as the writable-readiness wait. The
//! writes run outside tokio's cooperative budget, so writing to hundreds of sockets in one batch
//! is not cut short by it.

use crate::auth::IslandKeys;
use crate::framed::FrameReader;
use crate::ids::{ConnId, SessionId};
use crate::session::{JoinRequest, Notice, Output, Session, SessionConfig};
use crate::stats::{RouterStats, SessionStats};
use crate::wire::{self, ClientFrame, Code, DecodeError};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::{mpsc, Notify};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Events waiting for the session task, each one socket read's whole frames (at most
/// [`FRAMES_PER_EVENT`]); when full, readers wait, which slows their sockets.
pub const DEFAULT_EVENT_QUEUE: usize = 256;
/// The most frames one event carries; a read that brings more sends several events.
pub const FRAMES_PER_EVENT: usize = 64;
/// A write that makes no progress for this long means the peer is gone.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Events the session task handles before it writes and looks at timers and new connections.
const EVENT_BATCH: usize = 64;
/// Frames the session task handles before it writes, even when more events are waiting.
const WRITE_ROUND_FRAMES: usize = 1024;
/// Times the session task takes more waiting events (up to a batch each) before it looks at
/// timers, attaches and writable sockets again.
const MAX_REFILLS: usize = 4;
/// How long shutdown waits for goodbyes to be written.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// The most frames one vectored write takes (half of Linux's and macOS's `IOV_MAX`): a round
/// of a thousand small frames to a connection is then two writes.
const MAX_IOVECS: usize = 512;
/// Vectored writes of this many frames or fewer build a small array.
const FEW_IOVECS: usize = 16;
/// The most bytes merged into one write on a stream that cannot write vectored.
const MERGE_BYTES: usize = 64 * 1024;

/// Runtime settings of a session driver.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// The core's limits and timings.
    pub session: SessionConfig,
    /// Largest frame body accepted from a replica.
    pub max_frame_bytes: usize,
    /// Bound of the channel from readers to the session task, in events (one socket read's
    /// whole frames each, at most [`FRAMES_PER_EVENT`]).
    pub event_queue: usize,
    /// Stall limit of the writes to one connection.
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

enum Event {
    /// The whole frames one socket read brought (at most [`FRAMES_PER_EVENT`]).
    Frames(ConnId, Vec<ClientFrame>),
    Gone(ConnId, String),
    Broken(ConnId, Code, String),
    Shutdown(Code, String),
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
        self.shutdown_with(Code::SHUTTING_DOWN, "the router is shutting down")
            .await;
    }

    /// Like [`SessionHandle::shutdown`], with the goodbye's code and reason chosen by the
    /// caller: a clustered router that lost its lease says the island moves on
    /// ([`Code::MOVING`]), not that it ends.
    pub async fn shutdown_with(&self, code: Code, reason: &str) {
        let _ = self
            .events
            .send(Event::Shutdown(code, reason.to_string()))
            .await;
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
    let round_bytes = (cfg.session.max_outbound_bytes / 4).max(1);
    let task = SessionTask {
        stats: cfg.stats.register(id, &cfg.island),
        counts: Counts::default(),
        core: Session::new(id, keys, cfg.session.clone(), now()),
        cfg,
        conns: HashMap::default(),
        events_tx: event_tx,
        tasks: JoinSet::new(),
        writable: Arc::new(Writable::default()),
        dirty: Vec::new(),
        writing: Vec::new(),
        credits: Vec::new(),
        gone: Vec::new(),
        merge: Vec::new(),
        stall_due: None,
        round_full: false,
        round_bytes,
    };
    let join = tokio::spawn(task.run(attach_rx, event_rx, retire));
    (handle, join)
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Hashes a connection number with one multiplication: the map is looked up once per delivery,
/// and the numbers are the dispatcher's own counter, never chosen by a peer, so SipHash's
/// defence against chosen keys buys nothing here.
#[derive(Default)]
struct ConnIdHasher(u64);

impl Hasher for ConnIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: spreads consecutive numbers over the high bits the table uses too.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Connections whose socket became writable again, reported by their wakers.
#[derive(Default)]
struct Writable {
    ready: Mutex<Vec<ConnId>>,
    wake: Notify,
}

/// A connection's waker for writes that would block: it puts the connection on the writable
/// list (once until the session task takes it) and wakes the session task.
struct ConnWaker {
    conn: ConnId,
    listed: AtomicBool,
    writable: Arc<Writable>,
}

impl Wake for ConnWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.listed.swap(true, Ordering::AcqRel) {
            if let Ok(mut ready) = self.writable.ready.lock() {
                ready.push(self.conn);
            }
            self.writable.wake.notify_one();
        }
    }
}

/// One connection's write side, owned by the session task.
struct Conn {
    writer: WriteHalf<Box<dyn Stream>>,
    /// Frames given by the core and not yet written whole, in order. The core bounds their
    /// bytes (it counts them until they are credited back), so this needs no bound of its own.
    queue: VecDeque<Bytes>,
    /// Bytes of the front frame already written.
    head: usize,
    /// Bytes in `queue` past `head`.
    queued: usize,
    /// On the session task's list of connections to write at the end of the batch.
    dirty: bool,
    /// The last write would block: the connection waits for its waker before the next.
    waiting: bool,
    /// Since when bytes have been waiting without any written (for the stall limit).
    stalled_since: Option<std::time::Instant>,
    waker: Waker,
    waker_state: Arc<ConnWaker>,
    /// Stops the reader. Aborting its task, rather than a token it polls, keeps the read loop a
    /// bare read: a token's check took a lock on every socket read.
    reader: AbortHandle,
    /// Released when the connection is done, after its goodbye.
    guard: Option<Box<dyn Send + Sync>>,
}

/// How a round of non-blocking writes to one connection went.
enum Wrote {
    /// This many bytes; the socket would block if anything is left queued.
    Bytes(usize),
    /// The peer is gone.
    Failed(String),
}

impl Conn {
    /// Writes what is queued until the socket would block. Never waits.
    fn write_now(&mut self, merge: &mut Vec<u8>) -> Wrote {
        let Conn {
            writer,
            queue,
            head,
            queued,
            waiting,
            waker,
            ..
        } = self;
        let mut cx = Context::from_waker(waker);
        let mut total = 0;
        let vectored = writer.is_write_vectored();
        while let Some(front) = queue.front() {
            let writer = Pin::new(&mut *writer);
            let r = if queue.len() == 1 || front.len() - *head >= MERGE_BYTES {
                writer.poll_write(&mut cx, &front[*head..])
            } else if vectored && queue.len() <= FEW_IOVECS {
                writev::<FEW_IOVECS>(writer, &mut cx, queue, *head)
            } else if vectored {
                writev::<MAX_IOVECS>(writer, &mut cx, queue, *head)
            } else {
                // Small frames copied into one buffer cost less than a write each.
                merge.clear();
                merge.extend_from_slice(&front[*head..]);
                for f in queue.iter().skip(1) {
                    if merge.len() + f.len() > MERGE_BYTES {
                        break;
                    }
                    merge.extend_from_slice(f);
                }
                writer.poll_write(&mut cx, merge)
            };
            match r {
                Poll::Ready(Ok(0)) => {
                    return Wrote::Failed("the connection accepts no more bytes".into())
                }
                Poll::Ready(Ok(n)) => {
                    total += n;
                    *queued = queued.saturating_sub(n);
                    advance(queue, head, n);
                }
                Poll::Ready(Err(e)) => return Wrote::Failed(format!("write failed: {e}")),
                Poll::Pending => {
                    *waiting = true;
                    break;
                }
            }
        }
        Wrote::Bytes(total)
    }
}

/// One vectored write of up to `N` frames of `queue`, the first from `head`.
fn writev<const N: usize>(
    writer: Pin<&mut WriteHalf<Box<dyn Stream>>>,
    cx: &mut Context<'_>,
    queue: &VecDeque<Bytes>,
    head: usize,
) -> Poll<std::io::Result<usize>> {
    let mut iov = [IoSlice::new(&[]); N];
    let mut n = 0;
    for (i, f) in queue.iter().take(N).enumerate() {
        iov[i] = IoSlice::new(if i == 0 { &f[head..] } else { f });
        n = i + 1;
    }
    writer.poll_write_vectored(cx, &iov[..n])
}

/// Drops `n` written bytes off the front of `queue`, whose front frame is written up to `head`.
fn advance(queue: &mut VecDeque<Bytes>, head: &mut usize, mut n: usize) {
    while n > 0 {
        let Some(front) = queue.front() else {
            return;
        };
        let left = front.len() - *head;
        if n < left {
            *head += n;
            return;
        }
        n -= left;
        *head = 0;
        queue.pop_front();
    }
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
    conns: HashMap<ConnId, Conn, BuildHasherDefault<ConnIdHasher>>,
    events_tx: mpsc::Sender<Event>,
    /// Readers and closing writers.
    tasks: JoinSet<()>,
    writable: Arc<Writable>,
    /// Connections with frames queued since the last write round.
    dirty: Vec<ConnId>,
    /// The round being written (the last round's list, kept for its allocation).
    writing: Vec<ConnId>,
    /// Bytes written per connection in a round, credited to the core after it.
    credits: Vec<(ConnId, usize)>,
    /// Connections whose write failed in a round.
    gone: Vec<(ConnId, String)>,
    /// The merge buffer for streams that cannot write vectored (empty until one needs it).
    merge: Vec<u8>,
    /// When some connection may have stalled past the write timeout (a lower bound).
    stall_due: Option<std::time::Instant>,
    /// Some connection has `round_bytes` queued: write before taking more events.
    round_full: bool,
    /// A quarter of the core's slow-consumer bound, so a round's burst never trips it alone.
    round_bytes: usize,
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
        let writable = self.writable.clone();
        loop {
            let deadline = match (self.core.poll_timeout(), self.stall_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                biased;
                _ = writable.wake.notified() => self.take_writable(),
                Some(attach) = attach_rx.recv() => self.attach(attach),
                n = event_rx.recv_many(&mut batch, EVENT_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    // Events already waiting are taken before writing, so more frames share
                    // each write, up to a bound on what a round may hold back. Readers woken
                    // with this task (by the same poll of the sockets) get one turn first:
                    // otherwise the first of them would make the session write at once and
                    // the others again after it.
                    let mut stamped = 0;
                    let mut yielded = false;
                    let mut refills = 0;
                    loop {
                        for event in batch.drain(..) {
                            let Event::Frames(conn, frames) = event else {
                                shutting_down |= self.event(event);
                                continue;
                            };
                            // One unit of tokio's budget per read taken: a session whose
                            // readers keep the queue full still lets the worker's other tasks
                            // (other sessions) run after at most a budget of reads.
                            tokio::task::consume_budget().await;
                            for frame in frames {
                                self.core.handle_frame(conn, frame, now());
                                stamped += 1;
                                self.take_outputs();
                                // A long burst is written as it goes: between two rounds a
                                // replica gets at most a quarter of its bound plus one frame.
                                if self.round_full || stamped >= WRITE_ROUND_FRAMES {
                                    stamped = 0;
                                    self.apply_outputs().await;
                                }
                            }
                        }
                        // Timers, attaches and writable sockets get a look now and then.
                        if shutting_down || refills == MAX_REFILLS {
                            break;
                        }
                        refills += 1;
                        take_waiting(&mut event_rx, &mut batch);
                        if batch.is_empty() && !yielded {
                            yielded = true;
                            tokio::task::yield_now().await;
                            take_waiting(&mut event_rx, &mut batch);
                        }
                        if batch.is_empty() {
                            break;
                        }
                    }
                }
                _ = sleep_until(deadline) => self.timeout(),
                // Reap finished connection tasks so the set stays small.
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
            // The select is biased towards events, so while readers keep the queue full the
            // sleep is never reached: due timers (stalled writes, idle replicas, a snapshot
            // that never came) are looked at here too. `timeout` does only what is due.
            if deadline.is_some_and(|d| d <= now()) {
                self.timeout();
            }
            self.apply_outputs().await;
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
                self.apply_outputs().await;
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
        // Readers waiting to send an event give up; connections the core still holds (none
        // after a shutdown or a close) are dropped.
        drop(event_rx);
        for (_, c) in self.conns.drain() {
            c.reader.abort();
        }
        // Give closing writers a moment to deliver goodbyes, then cut everything.
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
        debug!(session = %id, "session task ended");
    }

    fn attach(&mut self, a: Attach) {
        let (reader, writer) = tokio::io::split(a.stream);
        let reader = self.tasks.spawn(read_loop(
            a.conn,
            reader,
            a.leftover,
            self.cfg.max_frame_bytes,
            self.events_tx.clone(),
            self.stats.clone(),
        ));
        let waker_state = Arc::new(ConnWaker {
            conn: a.conn,
            listed: AtomicBool::new(false),
            writable: self.writable.clone(),
        });
        let conn = Conn {
            writer,
            queue: VecDeque::new(),
            head: 0,
            queued: 0,
            dirty: false,
            waiting: false,
            stalled_since: None,
            waker: Waker::from(waker_state.clone()),
            waker_state,
            reader,
            guard: a.guard,
        };
        if let Some(old) = self.conns.insert(a.conn, conn) {
            // Connection numbers are unique; if one ever came twice, the old one goes.
            old.reader.abort();
        }
        self.core.handle_join(a.conn, a.request, now());
    }

    /// Returns true when the session must end.
    fn event(&mut self, event: Event) -> bool {
        let now = now();
        match event {
            Event::Frames(conn, frames) => {
                for frame in frames {
                    self.core.handle_frame(conn, frame, now);
                }
                self.take_outputs();
            }
            Event::Gone(conn, why) => self.gone(conn, &why),
            Event::Broken(conn, code, why) => {
                warn!(session = %self.core.id(), ?conn, %why, "closing connection: {}", code.name());
                self.core.disconnect(conn, code, &why, now);
            }
            Event::Shutdown(code, reason) => {
                self.core.shutdown(code, &reason, now);
                return true;
            }
        }
        false
    }

    /// The connection is gone: the core forgets it and its reader stops.
    fn gone(&mut self, conn: ConnId, why: &str) {
        debug!(session = %self.core.id(), ?conn, %why, "connection gone");
        self.core.handle_disconnect(conn, now());
        if let Some(c) = self.conns.remove(&conn) {
            c.reader.abort();
        }
    }

    fn timeout(&mut self) {
        let now = now();
        if self.core.poll_timeout().is_some_and(|d| d <= now) {
            self.core.handle_timeout(now);
        }
        if self.stall_due.is_some_and(|d| d <= now) {
            self.check_stalls(now);
        }
    }

    /// Drops connections whose writes made no progress for the write timeout.
    fn check_stalls(&mut self, now: std::time::Instant) {
        let limit = self.cfg.write_timeout;
        let mut stalled = Vec::new();
        let mut next: Option<std::time::Instant> = None;
        for (&conn, c) in &self.conns {
            if let Some(since) = c.stalled_since {
                if now >= since + limit {
                    stalled.push(conn);
                } else {
                    next = Some(next.map_or(since + limit, |n| n.min(since + limit)));
                }
            }
        }
        self.stall_due = next;
        for conn in stalled {
            self.gone(conn, &format!("write stalled for {limit:?}"));
        }
    }

    /// Connections whose sockets woke: write to them again.
    fn take_writable(&mut self) {
        let ready = match self.writable.ready.lock() {
            Ok(mut ready) => std::mem::take(&mut *ready),
            Err(_) => return,
        };
        for conn in ready {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.waker_state.listed.store(false, Ordering::Release);
                c.waiting = false;
                if !c.dirty && !c.queue.is_empty() {
                    c.dirty = true;
                    self.dirty.push(conn);
                }
            }
        }
    }

    /// Carries out what the core asked for and writes what it queued, until the core has
    /// nothing more to say (credits for written bytes can let it send more, e.g. snapshot
    /// pieces).
    async fn apply_outputs(&mut self) {
        // Outside the cooperative budget: a budget spent on hundreds of sockets would make the
        // rest look blocked.
        tokio::task::unconstrained(std::future::poll_fn(|_| {
            self.apply_outputs_now();
            Poll::Ready(())
        }))
        .await
    }

    fn apply_outputs_now(&mut self) {
        loop {
            self.take_outputs();
            if self.dirty.is_empty() {
                break;
            }
            self.write_round();
        }
        self.stats.publish(
            self.core.last_seq().0,
            self.counts.deliveries,
            self.counts.bytes_out,
            self.core.ticks(),
        );
    }

    fn take_outputs(&mut self) {
        let id = self.core.id();
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit { conn, frame } => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.queued += frame.len();
                        // One waiting for its socket gets nothing from an early round.
                        self.round_full |= !c.waiting && c.queued >= self.round_bytes;
                        c.queue.push_back(frame);
                        self.counts.deliveries += 1;
                        if !c.dirty && !c.waiting {
                            c.dirty = true;
                            self.dirty.push(conn);
                        }
                    }
                }
                Output::Close {
                    conn,
                    goodbye,
                    discard_queued,
                } => self.close(conn, goodbye, discard_queued),
                Output::Notice(n) => {
                    log_notice(id, &self.cfg.island, &n);
                    self.stats.note(&n);
                }
            }
        }
    }

    /// Writes every dirty connection once, then credits the core.
    fn write_round(&mut self) {
        let now = now();
        self.round_full = false;
        std::mem::swap(&mut self.dirty, &mut self.writing);
        for conn in self.writing.drain(..) {
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            c.dirty = false;
            if c.waiting {
                continue;
            }
            match c.write_now(&mut self.merge) {
                Wrote::Bytes(n) => {
                    if n > 0 {
                        self.credits.push((conn, n));
                    }
                    if c.queue.is_empty() {
                        c.stalled_since = None;
                    } else if n > 0 || c.stalled_since.is_none() {
                        c.stalled_since = Some(now);
                        let due = now + self.cfg.write_timeout;
                        self.stall_due = Some(self.stall_due.map_or(due, |d| d.min(due)));
                    }
                }
                Wrote::Failed(why) => self.gone.push((conn, why)),
            }
        }
        let mut credits = std::mem::take(&mut self.credits);
        for (conn, bytes) in credits.drain(..) {
            self.counts.bytes_out += bytes as u64;
            self.core.handle_flushed(conn, bytes, now);
        }
        self.credits = credits;
        let mut gone = std::mem::take(&mut self.gone);
        for (conn, why) in gone.drain(..) {
            self.gone(conn, &why);
        }
        self.gone = gone;
    }

    /// The core is done with `conn`: write what it may still get, then the goodbye, then shut
    /// the stream down, on the direct path if the socket takes it all now, else in a closing
    /// task.
    fn close(&mut self, conn: ConnId, goodbye: Option<Bytes>, discard_queued: bool) {
        let Some(mut c) = self.conns.remove(&conn) else {
            return;
        };
        if discard_queued {
            // Only the frame already begun is finished, so the stream stays whole.
            c.queue.truncate(usize::from(c.head > 0));
        }
        let cut = discard_queued && c.head > 0;
        let has_goodbye = goodbye.is_some();
        c.queue.extend(goodbye);
        c.queued = c.queue.iter().map(Bytes::len).sum::<usize>() - c.head;
        if !c.waiting {
            match c.write_now(&mut self.merge) {
                Wrote::Bytes(n) => self.counts.bytes_out += n as u64,
                Wrote::Failed(_) => {
                    c.reader.abort();
                    return;
                }
            }
        }
        if c.queue.is_empty() {
            let mut cx = Context::from_waker(Waker::noop());
            if Pin::new(&mut c.writer).poll_shutdown(&mut cx).is_ready() {
                c.reader.abort();
                return;
            }
        }
        // What is left: possibly the rest of the cut frame (first), frames of a graceful
        // close, the goodbye (last).
        let left = c.queue.len();
        let limits: Vec<Duration> = (0..left)
            .map(|i| {
                let first_cut = cut && c.head > 0 && i == 0;
                let is_goodbye = has_goodbye && i + 1 == left;
                if first_cut || is_goodbye {
                    SHUTDOWN_GRACE
                } else {
                    self.cfg.write_timeout
                }
            })
            .collect();
        self.tasks.spawn(finish(c, limits));
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

/// Moves the events already queued (up to a batch) into `batch`, without waiting.
fn take_waiting(events: &mut mpsc::Receiver<Event>, batch: &mut Vec<Event>) {
    while batch.len() < EVENT_BATCH {
        match events.try_recv() {
            Ok(event) => batch.push(event),
            Err(_) => return,
        }
    }
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// Finishes a closed connection whose socket would not take everything at once: each frame
/// within its limit, then shuts the stream down and stops the reader.
async fn finish(c: Conn, limits: Vec<Duration>) {
    let Conn {
        mut writer,
        queue,
        mut head,
        reader,
        guard,
        ..
    } = c;
    for (frame, limit) in queue.iter().zip(limits) {
        let written = tokio::time::timeout(limit, writer.write_all(&frame[head..])).await;
        head = 0;
        if !matches!(written, Ok(Ok(()))) {
            reader.abort();
            return;
        }
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, writer.shutdown()).await;
    reader.abort();
    drop(guard);
}

async fn read_loop<R: AsyncRead + Unpin>(
    conn: ConnId,
    reader: R,
    buf: BytesMut,
    max_frame: usize,
    events: mpsc::Sender<Event>,
    stats: Arc<SessionStats>,
) {
    let mut frames = FrameReader::with_buffered(reader, buf, max_frame);
    let mut batch: Vec<ClientFrame> = Vec::new();
    let event = loop {
        // Every whole frame the last read brought, as one event (or a few, past
        // FRAMES_PER_EVENT): one channel send and one wake of the session task per read.
        let broken = loop {
            match frames.buffered::<ClientFrame>() {
                Ok(Some(frame)) => {
                    batch.push(frame);
                    if batch.len() == FRAMES_PER_EVENT {
                        let full = std::mem::take(&mut batch);
                        if events.send(Event::Frames(conn, full)).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => break None,
                Err(e) => {
                    let code = match e {
                        DecodeError::FrameTooLarge { .. } => Code::PAYLOAD_TOO_LARGE,
                        _ => Code::MALFORMED,
                    };
                    break Some(Event::Broken(conn, code, e.to_string()));
                }
            }
        };
        if !batch.is_empty() {
            let read = std::mem::take(&mut batch);
            if events.send(Event::Frames(conn, read)).await.is_err() {
                return;
            }
        }
        if let Some(event) = broken {
            break event;
        }
        // The session task stops a reader by aborting its task.
        match frames.fill().await {
            Ok(0) => break Event::Gone(conn, "closed by the replica".into()),
            Ok(n) => stats.read_bytes(n),
            Err(e) => break Event::Gone(conn, format!("read failed: {e}")),
        }
    };
    let _ = events.send(event).await;
}
