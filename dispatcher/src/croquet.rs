//! Croquet / Multisynq clients on the router's port: the WebSocket reflector under
//! `/reflector/<session>`, the file store under `/files/<path>` and a static web app (`--web`)
//! for every other path.
//!
//! Each Croquet session is one tokio task running an [`isthmus_croquet::adapter::CroquetSession`]
//! (the sans-IO adapter over the session core). Each WebSocket has a reader task, which sends
//! text frames to the session task over a bounded channel, and a writer task, which takes what
//! the session queued, writes it with one flush per wake and credits the written bytes back
//! (the core's slow-consumer bound counts bytes handed over and not yet written, and bounds the
//! queue). Sessions are kept in their own registry by Croquet id; its sessions count against
//! the router's session cap and share its memory budget.

use crate::http::{self, Body, Ctx};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use isthmus_croquet::adapter::{Action, AdapterConfig, CroquetSession, Persistence};
use isthmus_croquet::frames::{self, close};
use isthmus_croquet::store::{FileStore, StoreConfig};
use isthmus_croquet::CroquetError;
use isthmus_router::ids::ConnId;
use isthmus_router::stats::SessionStats;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Largest WebSocket message a Croquet client may send (a JOIN, a SEND of the largest payload
/// the core takes, a SNAP): 1 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Client frames queued for one session task; a reader waits when it is full.
pub const SESSION_QUEUE: usize = 1024;
/// How long a connection we closed is read and drained, so the client gets the close frame.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Largest static file `--web` serves (bigger ones are refused, not streamed).
pub const MAX_WEB_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// File bytes held in memory at once by `/files` uploads and downloads and `--web` files
/// together (each is read or received whole); past it a request gets 503. Without it, the
/// per-address connection cap times the file limit (256 x 64 MiB) would fit in memory.
pub const MAX_FILE_BYTES_IN_FLIGHT: usize = 256 * 1024 * 1024;

/// The Croquet front door's settings.
#[derive(Clone, Debug)]
pub struct CroquetConfig {
    /// apiKeys accepted in JOIN; when empty, the router's create policy decides who may join
    /// (LAN-open by default).
    pub api_keys: Vec<String>,
    /// The file store; `None` answers `/files` with 404.
    pub store: Option<StoreConfig>,
    /// A directory of static files served for every other path (`--web`).
    pub web: Option<PathBuf>,
    /// Largest client WebSocket message ([`DEFAULT_MAX_FRAME_BYTES`]).
    pub max_frame_bytes: usize,
    /// Longest time a connection may take to send JOIN.
    pub join_timeout: Duration,
    /// File bytes held in memory at once by `/files` and `--web` bodies
    /// ([`MAX_FILE_BYTES_IN_FLIGHT`]).
    pub max_file_bytes_in_flight: usize,
}

impl Default for CroquetConfig {
    fn default() -> Self {
        CroquetConfig {
            api_keys: Vec::new(),
            store: None,
            web: None,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            join_timeout: isthmus_croquet::adapter::DEFAULT_JOIN_TIMEOUT,
            max_file_bytes_in_flight: MAX_FILE_BYTES_IN_FLIGHT,
        }
    }
}

/// What the dispatcher keeps for the Croquet front door.
pub(crate) struct Service {
    cfg: CroquetConfig,
    api_keys: Arc<Vec<String>>,
    store: Option<Arc<FileStore>>,
    sessions: Mutex<HashMap<String, Slot>>,
    shutdown: CancellationToken,
    /// [`MAX_FILE_BYTES_IN_FLIGHT`], one permit a byte.
    in_flight: Arc<Semaphore>,
}

struct Slot {
    tx: mpsc::Sender<Event>,
    /// Writers notify the session task here after crediting written bytes.
    notify: Arc<Notify>,
    join: Option<tokio::task::JoinHandle<()>>,
}

enum Event {
    Connect {
        conn: ConnId,
        open: bool,
        outbox: Outbox,
    },
    Text {
        conn: ConnId,
        text: Utf8Bytes,
    },
    Gone {
        conn: ConnId,
    },
    /// The reader refuses what the client sent (a message over the size bound): close it with
    /// this code.
    Refuse {
        conn: ConnId,
        code: u16,
        reason: String,
    },
}

#[derive(Clone)]
struct Outbox {
    tx: mpsc::UnboundedSender<Out>,
    /// Written bytes of frames the core counts, to credit back.
    credit: Arc<AtomicUsize>,
    /// Queued, unwritten bytes of frames the core does not count (SYNC, PONG, REQU): the
    /// session task bounds these itself, so a client that sends PINGs and reads nothing cannot
    /// grow its queue.
    uncounted: Arc<AtomicUsize>,
    /// Cancelled when the session closes the connection: from then on it has
    /// [`CLOSE_LINGER`] to go, even when its writer is stuck behind a client that reads nothing.
    closed: CancellationToken,
}

enum Out {
    /// A frame, whether the core counts it, and what it holds of the memory budget until
    /// written.
    Frame(Utf8Bytes, bool, Option<Reserved>),
    Close(u16, String),
}

/// Bytes taken from the router's memory budget, given back when dropped (written, or the
/// connection gone).
struct Reserved {
    budget: Arc<isthmus_router::budget::MemoryBudget>,
    bytes: usize,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Service {
    /// Opens the file store (if any); an unusable store is an error worth stopping for.
    pub(crate) fn new(cfg: CroquetConfig) -> Result<Service, CroquetError> {
        let store = match &cfg.store {
            Some(s) => Some(Arc::new(FileStore::open(s.clone())?)),
            None => None,
        };
        let cfg_in_flight = cfg.max_file_bytes_in_flight;
        Ok(Service {
            api_keys: Arc::new(cfg.api_keys.clone()),
            cfg,
            store,
            sessions: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            in_flight: Arc::new(Semaphore::new(cfg_in_flight.min(Semaphore::MAX_PERMITS))),
        })
    }

    /// Sessions alive now.
    pub(crate) fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Tells every client to reconnect elsewhere (4003) and waits for the session tasks.
    pub(crate) async fn shutdown(&self) {
        self.shutdown.cancel();
        let joins: Vec<_> = lock(&self.sessions)
            .drain()
            .filter_map(|(_, mut s)| s.join.take())
            .collect();
        for j in joins {
            let _ = j.await;
        }
    }
}

struct StorePersistence(Option<Arc<FileStore>>);

impl Persistence for StorePersistence {
    fn saved(&self, app_id: &str, persistent_id: &str) -> Option<String> {
        // A small file read once, when a session is created.
        self.0.as_ref()?.saved(app_id, persistent_id)
    }
}

fn service(ctx: &Ctx) -> Option<&Service> {
    ctx.shared.croquet.as_ref()
}

/// Whether the router's create policy lets this peer in without a listed apiKey.
fn create_allowed(ctx: &Ctx) -> bool {
    let host = crate::contacts::local_addrs();
    let lan = crate::contacts::is_lan_peer(ctx.peer.ip(), &host);
    ctx.shared.cfg.create.check(lan).is_ok()
}

/// `n` bytes of the in-flight budget for file bodies, or None when it is used up.
fn take_bytes(svc: &Service, n: u64) -> Option<OwnedSemaphorePermit> {
    let n = u32::try_from(n).ok()?;
    svc.in_flight.clone().try_acquire_many_owned(n).ok()
}

fn busy() -> Response<Body> {
    let mut r = http::text(
        StatusCode::SERVICE_UNAVAILABLE,
        "the router holds as many file bytes in memory as it may (max_file_bytes_in_flight); try again in a moment\n",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// A whole body that keeps its share of the in-flight budget until it is sent or dropped
/// (and keeps its length, so the response has a Content-Length).
struct Held {
    data: Option<Bytes>,
    len: u64,
    _permit: OwnedSemaphorePermit,
}

impl hyper::body::Body for Held {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::task::Poll::Ready(self.data.take().map(|d| Ok(hyper::body::Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(if self.data.is_some() { self.len } else { 0 })
    }
}

fn held_body(data: impl Into<Bytes>, permit: OwnedSemaphorePermit) -> Body {
    let data: Bytes = data.into();
    Held {
        len: data.len() as u64,
        data: (!data.is_empty()).then_some(data),
        _permit: permit,
    }
    .boxed()
}

fn off() -> Response<Body> {
    http::text(
        StatusCode::NOT_FOUND,
        "the Croquet front door of this router is off (--no-croquet)\n",
    )
}

// ---- /reflector -------------------------------------------------------------------------

/// `GET /reflector/.../<session>` with a WebSocket upgrade.
pub(crate) async fn reflector(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
    let Some(svc) = service(ctx) else {
        return off();
    };
    let id = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    if !frames::valid_session_id(&id) {
        return http::text(
            StatusCode::BAD_REQUEST,
            format!(
                "a Croquet session id is 1 to {} letters, digits, '_' or '-'\n",
                frames::MAX_SESSION_ID_BYTES
            ),
        );
    }
    let headers = req.headers();
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let (true, Some(key), true) = (upgrade, key, version_ok) else {
        return http::text(
            StatusCode::UPGRADE_REQUIRED,
            "this is a Croquet reflector: connect with a WebSocket (version 13)\n",
        );
    };
    let open = create_allowed(ctx);
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    let shared = ctx.shared.clone();
    let guard = ctx.guard.clone();
    let peer = ctx.peer;
    let max = svc.cfg.max_frame_bytes;
    tokio::spawn(async move {
        let _guard = guard; // the connection's slot under the caps, held while it lives
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                debug!(%peer, "websocket upgrade failed: {e}");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let Some(svc) = shared.croquet.as_ref() else {
            return;
        };
        let conn = ConnId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
        run_connection(&shared, svc, id, conn, open, ws).await;
    });
    let mut resp = Response::new(http::full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Attaches one WebSocket to its session (creating the session task if needed) and pumps it
/// until it closes.
async fn run_connection(
    shared: &Arc<crate::Shared>,
    svc: &Service,
    id: String,
    conn: ConnId,
    open: bool,
    ws: Ws,
) {
    let max = svc.cfg.max_frame_bytes;
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Out>();
    let credit = Arc::new(AtomicUsize::new(0));
    let uncounted = Arc::new(AtomicUsize::new(0));
    let kill = CancellationToken::new();
    let outbox = Outbox {
        tx: out_tx,
        credit: credit.clone(),
        uncounted: uncounted.clone(),
        closed: kill.clone(),
    };
    let Some((tx, notify)) = attach(shared, svc, &id, conn, open, outbox).await else {
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::from(close::RECONNECT),
                reason: Utf8Bytes::from_static("router busy: too many sessions"),
            })))
            .await;
        return;
    };
    let writer = async move {
        while let Some(first) = out_rx.recv().await {
            let mut counted = 0usize;
            let mut other = 0usize;
            let mut item = Some(first);
            let mut closing = false;
            let mut n = 0;
            // Budget held by frames fed but not flushed yet (the sink copies them whole).
            let mut held: Vec<Reserved> = Vec::new();
            while let Some(it) = item.take() {
                match it {
                    Out::Frame(text, c, reserved) => {
                        held.extend(reserved);
                        let len = text.len();
                        if sink.feed(Message::Text(text)).await.is_err() {
                            return false;
                        }
                        if c {
                            counted += len;
                        } else {
                            other += len;
                        }
                    }
                    Out::Close(code, reason) => {
                        let reason: String = reason.chars().take(120).collect();
                        let _ = sink
                            .feed(Message::Close(Some(CloseFrame {
                                code: CloseCode::from(code),
                                reason: Utf8Bytes::from(reason),
                            })))
                            .await;
                        closing = true;
                        break;
                    }
                }
                n += 1;
                if n < 512 {
                    item = out_rx.try_recv().ok();
                }
            }
            if sink.flush().await.is_err() {
                return false;
            }
            drop(held);
            uncounted.fetch_sub(other, Ordering::Relaxed);
            if counted > 0 {
                credit.fetch_add(counted, Ordering::Relaxed);
                notify.notify_one();
            }
            if closing {
                return true;
            }
        }
        false
    };
    let reader_tx = tx.clone();
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let closed_r = closed.clone();
    let reader = async move {
        while let Some(msg) = stream.next().await {
            if closed_r.load(Ordering::Relaxed) {
                continue; // drained and dropped after our close
            }
            match msg {
                Ok(Message::Text(text)) => {
                    if reader_tx.send(Event::Text { conn, text }).await.is_err() {
                        return;
                    }
                }
                Ok(Message::Binary(_)) => {
                    // Croquet frames are text: treat bytes as a malformed message.
                    let text = Utf8Bytes::from_static("\u{0}");
                    let _ = reader_tx.send(Event::Text { conn, text }).await;
                }
                Err(tokio_tungstenite::tungstenite::Error::Capacity(e)) => {
                    // Say why with a fatal code rather than drop the socket: a client that
                    // sees 1006 reconnects and sends the same message again, without end.
                    let reason = format!(
                        "message refused ({e}): the router takes messages of at most {max} bytes"
                    );
                    let refuse = Event::Refuse {
                        conn,
                        code: close::MALFORMED,
                        reason,
                    };
                    if reader_tx.send(refuse).await.is_ok() {
                        // The session closes the connection; the writer's close ends this.
                        std::future::pending::<()>().await;
                    }
                    return;
                }
                Ok(Message::Close(_)) | Err(_) => return,
                Ok(_) => {} // pings are answered by tungstenite itself
            }
        }
    };
    tokio::pin!(reader);
    tokio::pin!(writer);
    tokio::select! {
        _ = &mut reader => {}
        closing = &mut writer => {
            if closing {
                // Read and drop what the client still sends until it answers the close (or
                // CLOSE_LINGER passes): closing a socket with unread input resets it, and the
                // reset would overtake the close frame and its code.
                closed.store(true, Ordering::Relaxed);
                let _ = tokio::time::timeout(CLOSE_LINGER, &mut reader).await;
            }
        }
        _ = kill.cancelled() => {
            // The session closed this connection. The writer may be stuck behind a full
            // socket (a client that reads nothing, closed with 4001): without a deadline the
            // connection, its queue and its slot under the caps would live as long as the
            // client keeps sending. Write the rest and the close frame, drain, within the linger.
            closed.store(true, Ordering::Relaxed);
            let _ = tokio::time::timeout(CLOSE_LINGER, async {
                if (&mut writer).await {
                    (&mut reader).await;
                }
            })
            .await;
        }
    }
    let _ = tx.send(Event::Gone { conn }).await;
}

/// Finds or starts the session task for `id` and hands it the connection.
async fn attach(
    shared: &Arc<crate::Shared>,
    svc: &Service,
    id: &str,
    conn: ConnId,
    open: bool,
    outbox: Outbox,
) -> Option<(mpsc::Sender<Event>, Arc<Notify>)> {
    let mut event = Event::Connect { conn, open, outbox };
    loop {
        let (tx, notify) = {
            let mut sessions = lock(&svc.sessions);
            match sessions.get(id) {
                Some(slot) if !slot.tx.is_closed() => (slot.tx.clone(), slot.notify.clone()),
                _ if shared.budget.nearly_full() => {
                    warn!(
                        session = id,
                        "Croquet session refused: the memory budget is nearly used up"
                    );
                    return None;
                }
                _ => {
                    let native = crate::lock(&shared.registry).sessions.len();
                    if native + sessions.len() >= shared.cfg.max_sessions {
                        warn!(
                            session = id,
                            "Croquet session refused: router at its session cap"
                        );
                        return None;
                    }
                    let (tx, rx) = mpsc::channel(SESSION_QUEUE);
                    let notify = Arc::new(Notify::new());
                    let join = tokio::spawn(run_session(
                        Arc::downgrade(shared),
                        id.to_string(),
                        rx,
                        notify.clone(),
                    ));
                    sessions.insert(
                        id.to_string(),
                        Slot {
                            tx: tx.clone(),
                            notify: notify.clone(),
                            join: Some(join),
                        },
                    );
                    info!(session = id, "Croquet session started");
                    (tx, notify)
                }
            }
        };
        match tx.send(event).await {
            Ok(()) => return Some((tx, notify)),
            Err(mpsc::error::SendError(back)) => {
                // The session ended between lookup and send: start it again.
                event = back;
                let mut sessions = lock(&svc.sessions);
                if sessions.get(id).is_some_and(|s| s.tx.same_channel(&tx)) {
                    sessions.remove(id);
                }
            }
        }
    }
}

/// One Croquet session: its adapter and its connections' outboxes.
async fn run_session(
    shared: std::sync::Weak<crate::Shared>,
    id: String,
    mut rx: mpsc::Receiver<Event>,
    credits: Arc<Notify>,
) {
    let Some(s) = shared.upgrade() else {
        return;
    };
    let Some(svc) = s.croquet.as_ref() else {
        return;
    };
    let mut acfg = AdapterConfig {
        session: s.cfg.driver.session.clone(),
        api_keys: svc.api_keys.clone(),
        join_timeout: svc.cfg.join_timeout,
        ..AdapterConfig::default()
    };
    acfg.session.budget = s.budget.clone();
    let store = svc.store.clone();
    let stop = svc.shutdown.clone();
    let max_uncounted = acfg.session.max_outbound_bytes;
    let budget = acfg.session.budget.clone();
    let timeline = {
        let b = isthmus_router::auth::fresh_nonce();
        b[..8]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    let mut adapter = CroquetSession::new(
        &id,
        acfg,
        timeline,
        Box::new(StorePersistence(store.clone())),
    );
    let router_stats = s.cfg.driver.stats.clone();
    drop(s);
    // The session's counters for /metrics and the status page, registered once the first JOIN
    // made the core (and named the app); the same as a native session's.
    let mut stats: Option<Arc<SessionStats>> = None;
    let (mut deliveries, mut bytes_out) = (0u64, 0u64);
    let mut outboxes: HashMap<ConnId, Outbox> = HashMap::new();
    // Per connection: the size of the last SYNC it was sent, on top of the uncounted bound.
    let mut sync_allowance: HashMap<ConnId, usize> = HashMap::new();
    let mut stopping = false;
    loop {
        let deadline = adapter.poll_timeout().map(tokio::time::Instant::from_std);
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = rx.recv() => {
                let now = tokio::time::Instant::now().into_std();
                match ev {
                    Some(Event::Connect { conn, open, outbox }) => {
                        outboxes.insert(conn, outbox);
                        adapter.handle_connect(conn, open, now);
                    }
                    Some(Event::Text { conn, text }) => {
                        if let Some(st) = &stats {
                            st.read_bytes(text.len());
                        }
                        adapter.handle_text(conn, text.as_str(), now)
                    }
                    Some(Event::Refuse { conn, code, reason }) => {
                        adapter.disconnect(conn, code, &reason, now);
                    }
                    Some(Event::Gone { conn }) => {
                        outboxes.remove(&conn);
                        sync_allowance.remove(&conn);
                        adapter.handle_disconnect(conn, now);
                    }
                    None => break,
                }
            }
            _ = credits.notified() => {}
            _ = sleep => adapter.handle_timeout(tokio::time::Instant::now().into_std()),
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                adapter.shutdown(tokio::time::Instant::now().into_std());
            }
        }
        let now = tokio::time::Instant::now().into_std();
        for (conn, ob) in &outboxes {
            let n = ob.credit.swap(0, Ordering::Relaxed);
            if n > 0 {
                adapter.handle_flushed(*conn, n, now);
            }
        }
        if let Some(core) = adapter.core() {
            if stats.as_ref().map(|st| st.id()) != Some(core.id()) {
                if let Some(old) = stats.take() {
                    router_stats.retire(&old);
                }
                let name = format!("{} (Croquet)", adapter.app_id().unwrap_or("an app"));
                stats = Some(router_stats.register(core.id(), &name));
            }
        }
        let mut last: Option<(Bytes, Utf8Bytes)> = None;
        let mut unread: Vec<ConnId> = Vec::new();
        let mut no_room: Vec<ConnId> = Vec::new();
        loop {
            while let Some(action) = adapter.poll_action() {
                match action {
                    Action::Send {
                        conn,
                        frame,
                        counted,
                    } => {
                        let Some(ob) = outboxes.get(&conn) else {
                            continue;
                        };
                        // A broadcast hands the same bytes to every recipient in a row: check the
                        // UTF-8 once and share it.
                        let text = match &last {
                            Some((b, t))
                                if b.as_ptr() == frame.as_ptr() && b.len() == frame.len() =>
                            {
                                t.clone()
                            }
                            _ => match Utf8Bytes::try_from(frame.clone()) {
                                Ok(t) => {
                                    last = Some((frame, t.clone()));
                                    t
                                }
                                Err(_) => continue,
                            },
                        };
                        let mut reserved = None;
                        if !counted {
                            let len = frame_len(&text);
                            if text.as_str().contains(r#""action":"SYNC""#) {
                                // Each joiner's SYNC is its own copy of the history: it takes
                                // its size from the memory budget until written, or many
                                // joiners that do not read would hold a history each.
                                if !budget.try_reserve(len) {
                                    no_room.push(conn);
                                    continue;
                                }
                                reserved = Some(Reserved {
                                    budget: budget.clone(),
                                    bytes: len,
                                });
                                sync_allowance.insert(conn, len);
                            }
                            let queued = ob.uncounted.fetch_add(len, Ordering::Relaxed) + len;
                            let allowed =
                                max_uncounted + sync_allowance.get(&conn).copied().unwrap_or(0);
                            if queued > allowed {
                                unread.push(conn);
                                continue;
                            }
                        }
                        bytes_out += text.len() as u64;
                        if counted {
                            deliveries += 1;
                        }
                        let _ = ob.tx.send(Out::Frame(text, counted, reserved));
                    }
                    Action::Close { conn, code, reason } => {
                        debug!(session = %id, ?conn, code, "closing: {reason}");
                        if let Some(ob) = outboxes.remove(&conn) {
                            let _ = ob.tx.send(Out::Close(code, reason));
                            ob.closed.cancel();
                        }
                    }
                    Action::Save {
                        app_id,
                        persistent_id,
                        url,
                    } => {
                        if let Some(store) = store.clone() {
                            tokio::task::spawn_blocking(move || {
                                if let Err(e) = store.save(&app_id, &persistent_id, &url) {
                                    warn!(
                                    "persistent data of {app_id}/{persistent_id} not recorded: {e}"
                                );
                                }
                            });
                        }
                    }
                    Action::SnapshotStored { url } => {
                        if let (Some(store), Some(path)) = (store.clone(), files_path(&url)) {
                            let session = id.clone();
                            tokio::task::spawn_blocking(move || {
                                store.snapshot_stored(&session, &path)
                            });
                        }
                    }
                    Action::Log(line) => debug!(session = %id, "{line}"),
                    Action::Notice(n) => {
                        debug!(session = %id, "{n:?}");
                        if let Some(st) = &stats {
                            st.note(&n);
                        }
                    }
                }
            }
            if unread.is_empty() && no_room.is_empty() {
                break;
            }
            for conn in no_room.drain(..) {
                adapter.disconnect(
                    conn,
                    close::RECONNECT,
                    "the router's memory budget has no room for this session's history now; reconnect",
                    now,
                );
            }
            for conn in unread.drain(..) {
                sync_allowance.remove(&conn);
                adapter.disconnect(
                    conn,
                    close::UNRESPONSIVE,
                    "more unread replies queued than limits.max_outbound_bytes; reconnect",
                    now,
                );
            }
        }
        if let (Some(st), Some(core)) = (&stats, adapter.core()) {
            st.publish(core.last_seq().0, deliveries, bytes_out, core.ticks());
        }
        if stopping && outboxes.is_empty() {
            break;
        }
        if adapter.is_finished(now) && rx.is_empty() {
            // Retire under the registry lock, so an attach either comes before (and is in the
            // queue, so we go on) or finds the channel closed and starts a new task.
            let Some(shared) = shared.upgrade() else {
                break;
            };
            let Some(svc) = shared.croquet.as_ref() else {
                break;
            };
            let mut sessions = lock(&svc.sessions);
            if !rx.is_empty() {
                continue;
            }
            rx.close();
            sessions.remove(&id);
            break;
        }
    }
    if let Some(st) = stats.take() {
        router_stats.retire(&st);
    }
    info!(session = %id, "Croquet session ended");
    if let Some(store) = store {
        let id = id.clone();
        let _ = tokio::task::spawn_blocking(move || store.session_ended(&id)).await;
    }
}

fn frame_len(text: &Utf8Bytes) -> usize {
    text.as_str().len()
}

/// The store path of a URL under some host's `/files/`.
fn files_path(url: &str) -> Option<String> {
    let rest = &url[url.find("/files/")? + "/files/".len()..];
    let rest = rest.split(['?', '#']).next()?;
    Some(rest.to_string())
}

// ---- /files -----------------------------------------------------------------------------

fn cors(mut resp: Response<Body>) -> Response<Body> {
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, PUT, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type"),
    );
    resp
}

fn store_error(e: CroquetError) -> Response<Body> {
    let status = match &e {
        CroquetError::BadPath(_) => StatusCode::BAD_REQUEST,
        CroquetError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        CroquetError::StoreFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
        CroquetError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        warn!("file store: {e}");
    }
    http::text(status, format!("{e}\n"))
}

/// `PUT` / `GET /files/<path>`: the snapshot and persistence store.
pub(crate) async fn files(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
    let Some(svc) = service(ctx) else {
        return off();
    };
    let Some(store) = svc.store.clone() else {
        return http::text(
            StatusCode::NOT_FOUND,
            "this router keeps no files (no data directory)\n",
        );
    };
    let path = req.uri().path()["/files/".len()..].to_string();
    let resp = match *req.method() {
        Method::OPTIONS => {
            let mut r = Response::new(http::full(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Method::GET | Method::HEAD => {
            let head = req.method() == Method::HEAD;
            let svc_bytes = svc.in_flight.clone();
            let got = tokio::task::spawn_blocking(move || {
                // Take the file's share of the budget before reading it into memory.
                let size = store.len(&path)?;
                let take = |n: u64| {
                    let n = u32::try_from(n).ok()?;
                    svc_bytes.clone().try_acquire_many_owned(n).ok()
                };
                let Some(mut permit) = take(size) else {
                    return Ok(None);
                };
                let data = store.get(&path)?;
                if data.len() as u64 > size {
                    // Replaced by a larger file in between: its share must grow too.
                    let Some(more) = take(data.len() as u64 - size) else {
                        return Ok(None);
                    };
                    permit.merge(more);
                }
                Ok(Some((data, permit)))
            })
            .await;
            match got {
                Ok(Ok(None)) => busy(),
                Ok(Ok(Some((data, _)))) if head => {
                    let mut r =
                        http::bytes(StatusCode::OK, "application/octet-stream", Bytes::new());
                    if let Ok(v) = HeaderValue::from_str(&data.len().to_string()) {
                        r.headers_mut().insert(header::CONTENT_LENGTH, v);
                    }
                    r
                }
                Ok(Ok(Some((data, permit)))) => {
                    let mut r = Response::new(held_body(data, permit));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    r
                }
                Ok(Err(e)) => store_error(e),
                Err(_) => http::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "file store task failed\n",
                ),
            }
        }
        Method::PUT if svc.api_keys.is_empty() && !create_allowed(ctx) => {
            // Uploads carry no apiKey: without a list, only peers that may create sessions
            // may fill the store (else anyone who reaches the port could use it up and make
            // every session's snapshot uploads fail).
            http::text(
                StatusCode::FORBIDDEN,
                "this router takes uploads only from its own network (create = \"lan\") and has no croquet.api_keys list\n",
            )
        }
        Method::PUT => {
            if let Err(e) = isthmus_croquet::store::check_path(&path) {
                return cors(store_error(e));
            }
            let limit = store.config().max_file_bytes;
            let too_large = || {
                cors(http::text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("upload is larger than the limit of {limit} bytes (croquet.max_file_mb), or was cut off\n"),
                ))
            };
            // Received whole, each chunk taking its share of the in-flight budget first.
            let Some(mut permit) = take_bytes(svc, 0) else {
                return cors(busy());
            };
            let mut body = Limited::new(req.into_body(), limit as usize);
            let mut received = bytes::BytesMut::new();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return too_large();
                };
                if let Ok(chunk) = frame.into_data() {
                    let Some(more) = take_bytes(svc, chunk.len() as u64) else {
                        return cors(busy());
                    };
                    permit.merge(more);
                    received.extend_from_slice(&chunk);
                }
            }
            let body = received.freeze();
            match tokio::task::spawn_blocking(move || {
                let stored = store.put(&path, &body);
                drop(permit);
                stored
            })
            .await
            {
                Ok(Ok(())) => http::text(StatusCode::CREATED, "stored\n"),
                Ok(Err(e)) => store_error(e),
                Err(_) => http::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "file store task failed\n",
                ),
            }
        }
        _ => http::text(
            StatusCode::METHOD_NOT_ALLOWED,
            "/files takes GET, HEAD, PUT and OPTIONS\n",
        ),
    };
    cors(resp)
}

// ---- --web ------------------------------------------------------------------------------

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "txt" => "text/plain; charset=utf-8",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// Whether a `--web` directory is served (it then has `/`).
pub(crate) fn serves_web(ctx: &Ctx) -> bool {
    service(ctx).is_some_and(|s| s.cfg.web.is_some())
}

/// Every other path: a file of the `--web` directory (`index.html` for a directory), or 404.
pub(crate) async fn web(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
    let dir = service(ctx).and_then(|s| s.cfg.web.clone());
    let budget = service(ctx).map(|s| s.in_flight.clone());
    let path = req.uri().path().to_string();
    let Some(dir) = dir else {
        return http::text(
            StatusCode::NOT_FOUND,
            format!("isthmus router: nothing is served at {path}\n"),
        );
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return http::text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the web app takes GET and HEAD\n",
        );
    }
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() || rel.ends_with('/') {
        format!("{rel}index.html")
    } else {
        rel.to_string()
    };
    let decoded = percent_decode(&rel);
    let ok = decoded.as_deref().is_some_and(|r| {
        r.split('/').all(|p| {
            !p.is_empty() && p != "." && p != ".." && !p.contains('\\') && !p.contains('\0')
        })
    });
    let (true, Some(rel), Some(budget)) = (ok, decoded, budget) else {
        return http::text(StatusCode::BAD_REQUEST, "bad path\n");
    };
    let head = req.method() == Method::HEAD;
    let result = tokio::task::spawn_blocking(move || read_web_file(&dir, &rel, &budget)).await;
    match result {
        Ok(Ok((data, file, permit))) => {
            let mut r = Response::new(held_body(if head { Vec::new() } else { data }, permit));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(content_type(&file)),
            );
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        Ok(Err(StatusCode::SERVICE_UNAVAILABLE)) => busy(),
        Ok(Err(status)) => http::text(status, format!("nothing is served at {path}\n")),
        Err(_) => http::text(StatusCode::INTERNAL_SERVER_ERROR, "web task failed\n"),
    }
}

/// Reads a file under `dir`, refusing anything that resolves outside it (symlinks included),
/// after taking its size from the in-flight `budget` (503 when used up).
fn read_web_file(
    dir: &Path,
    rel: &str,
    budget: &Arc<Semaphore>,
) -> Result<(Vec<u8>, PathBuf, OwnedSemaphorePermit), StatusCode> {
    let root = dir.canonicalize().map_err(|_| StatusCode::NOT_FOUND)?;
    let mut file = root
        .join(rel)
        .canonicalize()
        .map_err(|_| StatusCode::NOT_FOUND)?;
    if !file.starts_with(&root) {
        return Err(StatusCode::NOT_FOUND);
    }
    if file.is_dir() {
        file = file.join("index.html");
    }
    let meta = std::fs::metadata(&file).map_err(|_| StatusCode::NOT_FOUND)?;
    if !meta.is_file() {
        return Err(StatusCode::NOT_FOUND);
    }
    if meta.len() > MAX_WEB_FILE_BYTES {
        return Err(StatusCode::PAYLOAD_TOO_LARGE);
    }
    let take = |n: u64| {
        let n = u32::try_from(n).map_err(|_| StatusCode::PAYLOAD_TOO_LARGE)?;
        budget
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)
    };
    let mut permit = take(meta.len())?;
    let data = std::fs::read(&file).map_err(|_| StatusCode::NOT_FOUND)?;
    if data.len() as u64 > meta.len() {
        if data.len() as u64 > MAX_WEB_FILE_BYTES {
            return Err(StatusCode::PAYLOAD_TOO_LARGE);
        }
        permit.merge(take(data.len() as u64 - meta.len())?);
    }
    Ok((data, file, permit))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_urls_map_to_store_paths() {
        assert_eq!(
            files_path("http://127.0.0.1:7470/files/apps/a/snap/x?y=1").as_deref(),
            Some("apps/a/snap/x")
        );
        assert_eq!(files_path("https://example.com/other"), None);
    }

    #[test]
    fn web_paths_decode_and_refuse_escapes() {
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("%2e%2e").as_deref(), Some(".."));
        assert_eq!(percent_decode("%zz"), None);
        let dir = std::env::temp_dir().join(format!("isthmus-web-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(dir.join("sub/index.html"), "hi").expect("write");
        let budget = Arc::new(Semaphore::new(MAX_FILE_BYTES_IN_FLIGHT));
        assert!(read_web_file(&dir, "sub", &budget).is_ok());
        assert!(read_web_file(&dir, "sub/index.html", &budget).is_ok());
        assert!(read_web_file(&dir, "../../etc/passwd", &budget).is_err());
        let held = read_web_file(&dir, "sub/index.html", &budget).expect("read");
        assert_eq!(budget.available_permits(), MAX_FILE_BYTES_IN_FLIGHT - 2);
        let none = Arc::new(Semaphore::new(1));
        assert_eq!(
            read_web_file(&dir, "sub", &none).err(),
            Some(StatusCode::SERVICE_UNAVAILABLE),
            "a file larger than what is left of the budget waits"
        );
        drop(held);
        assert_eq!(budget.available_permits(), MAX_FILE_BYTES_IN_FLIGHT);
        let _ = std::fs::remove_dir_all(dir);
    }
}
