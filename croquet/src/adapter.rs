//! One Croquet session as a sans-IO state machine over the Isthmus session core.
//!
//! The driver feeds it connections, text frames, flushed byte counts, disconnects and timeouts,
//! each with `now`, and drains [`Action`]s (frames to write, connections to close, persistent
//! data to record) and its next deadline. It never reads a clock or touches a socket.
//!
//! What the core does for it: ordering, seq and router time, ticks, the history since the last
//! snapshot and its bounds, slow-consumer bounds, idle timeouts, linger, the memory budget.
//! Croquet frames reach the core as `Send`s whose payload is the JSON text of the SEND args
//! after time and seq; [`CroquetFraming`] turns each stamped message into one RECV frame that
//! every recipient and the history share. What only Croquet has lives here:
//!
//! - **JOIN**: checks (protocol version, apiKey), creates the core session on the first JOIN
//!   (tick interval from the client's `ticks`, `tove`, appId / persistentId, a random
//!   `timeline` chosen by the driver) and attaches the connection as a fresh replica.
//! - **SYNC**: the core syncs every joiner (there is no resume in Croquet) as `SyncBegin`, the
//!   stored snapshot's metadata, the backlog of RECV frames, `Synced`; the adapter swallows
//!   those (crediting their bytes at once) and writes one SYNC frame with the snapshot URL and
//!   the backlog's `args`, byte for byte as the RECVs carried them.
//! - **users**: joins (at SYNC) and leaves (after the client's `leaveDelay`) are batched for
//!   [`AdapterConfig::users_interval`] and stamped as one router message.
//! - **TUTTI**: votes are collected per tally key until every client voted or
//!   [`AdapterConfig::tally_interval`] passed, then a "tally" message is stamped.
//! - **SEND** with `debounce` tags: a msgID seen within its window is dropped.
//! - **SNAP**: a newer snapshot's URL and seq are stored in the core (`store_snapshot`), which
//!   cuts the history; **SAVE** records the persistent data URL for the next session of the app.
//! - **PING** gets a PONG with the same args; **PULSE**, **LOG** only count as signs of life.

use crate::frames::{self, close, core_seq, croquet_seq, millis, CroquetFraming, Incoming};
use bytes::{BufMut, Bytes, BytesMut};
use isthmus_router::auth::NONCE_LEN;
use isthmus_router::ids::{ConnId, ReplicaId, Seq};
use isthmus_router::session::{JoinRequest, Notice, Output, Session, SessionConfig};
use isthmus_router::wire::{self, ClientFrame, Code, Role, ServerFrame};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Croquet's server-side default tick interval, for a first JOIN that asks for none.
pub const DEFAULT_TICK: Duration = Duration::from_millis(200);
/// Joins and leaves gathered into one "users" message.
pub const DEFAULT_USERS_INTERVAL: Duration = Duration::from_millis(200);
/// Longest wait for the rest of the votes of a TUTTI.
pub const DEFAULT_TALLY_INTERVAL: Duration = Duration::from_millis(1000);
/// A connection that has not sent JOIN after this long is closed with 4121.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(37);
/// The longest `leaveDelay` a client may ask for.
pub const MAX_LEAVE_DELAY: Duration = Duration::from_secs(60);
/// Bytes of a JOIN's `user` value (echoed in every "users" message).
pub const MAX_USER_BYTES: usize = 4096;
/// Bytes of a `tove`, an appId, a persistentId, a snapshot or persistence URL, a msgID or a
/// tally key.
pub const MAX_FIELD_BYTES: usize = 2048;
/// Debounce records (msgIDs) a session keeps; the oldest goes first.
pub const MAX_DEBOUNCE_RECORDS: usize = 1024;
/// Tallies open at once in a session; votes for more are dropped.
pub const MAX_OPEN_TALLIES: usize = 64;
/// Distinct vote payloads in one tally.
pub const MAX_TALLY_PAYLOADS: usize = 1024;
/// Completed tallies remembered so late votes for them are ignored (as the reference does).
pub const MAX_COMPLETED_TALLIES: usize = 20;
/// Votes older than this (in session ms) than the session's time start no tally.
pub const MAX_TALLY_AGE_MS: u64 = 60_000;

/// What the reflector calls itself in SYNC.
pub const REFLECTOR_NAME: &str = "isthmus";

/// Limits and timings of the adapter, and the core's configuration.
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    /// The core's configuration; the adapter sets its framing and external snapshots, and the
    /// tick interval from the first JOIN.
    pub session: SessionConfig,
    /// Tick interval when the first JOIN asks for none.
    pub default_tick: Duration,
    /// Batching of users messages.
    pub users_interval: Duration,
    /// Longest wait for votes.
    pub tally_interval: Duration,
    /// Time a connection has to send JOIN.
    pub join_timeout: Duration,
    /// apiKeys accepted; when empty, the connection's `open` flag (the router's create policy
    /// for that peer) decides.
    pub api_keys: Arc<Vec<String>>,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        AdapterConfig {
            session: SessionConfig::default(),
            default_tick: DEFAULT_TICK,
            users_interval: DEFAULT_USERS_INTERVAL,
            tally_interval: DEFAULT_TALLY_INTERVAL,
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            api_keys: Arc::new(Vec::new()),
        }
    }
}

/// Where a session finds the persistent data an earlier session of its app saved.
pub trait Persistence: Send {
    /// The URL saved for `app_id` / `persistent_id`, if any.
    fn saved(&self, app_id: &str, persistent_id: &str) -> Option<String>;
}

/// No persistent data anywhere.
#[derive(Debug, Default)]
pub struct NoPersistence;

impl Persistence for NoPersistence {
    fn saved(&self, _: &str, _: &str) -> Option<String> {
        None
    }
}

/// Something the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write this text frame to the connection after what is queued.
    Send {
        /// Where.
        conn: ConnId,
        /// JSON text, possibly shared with other recipients.
        frame: Bytes,
        /// The core counts these bytes against the connection's bound: report them flushed
        /// with [`CroquetSession::handle_flushed`] once written.
        counted: bool,
    },
    /// Write what is queued, then close with this code; the adapter has forgotten the
    /// connection.
    Close {
        /// Which.
        conn: ConnId,
        /// A Croquet close code ([`frames::close`]).
        code: u16,
        /// Shown by clients.
        reason: String,
    },
    /// Record `url` as the persistent data of `app_id` / `persistent_id`.
    Save {
        /// The app.
        app_id: String,
        /// The app's persistent session.
        persistent_id: String,
        /// Where the client uploaded it.
        url: String,
    },
    /// The snapshot at `url` now serves joiners: older ones of this session are not needed.
    SnapshotStored {
        /// Where the client uploaded it.
        url: String,
    },
    /// Worth a log line.
    Log(String),
    /// What the session core noticed (joins, leaves, refusals, snapshots): for logs, metrics
    /// and the status page, as the native driver reports it.
    Notice(Notice),
}

#[derive(Debug)]
struct SyncBuf {
    snapshot: Vec<u8>,
    messages: Vec<Bytes>,
}

#[derive(Debug)]
struct Conn {
    since: Instant,
    /// May join without a listed apiKey (the router's create policy allows this peer).
    open: bool,
    joined: bool,
    sync: Option<SyncBuf>,
    active: bool,
    user: Option<String>,
    client_seq: u64,
}

#[derive(Debug)]
struct Tally {
    send_time: f64,
    expecting: usize,
    payloads: Vec<(String, u32)>,
    due: Instant,
    wants_vote: bool,
    target: String,
}

#[derive(Debug, Deserialize)]
struct JoinArgs<'a> {
    #[serde(borrow, default)]
    version: Option<&'a RawValue>,
    #[serde(default)]
    #[serde(rename = "apiKey")]
    api_key: Option<String>,
    #[serde(default, rename = "appId")]
    app_id: Option<String>,
    #[serde(default, rename = "persistentId")]
    persistent_id: Option<String>,
    #[serde(borrow, default)]
    user: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tove: Option<&'a RawValue>,
    #[serde(default)]
    ticks: Option<Ticks>,
    #[serde(default, rename = "leaveDelay")]
    leave_delay: Option<f64>,
}

#[derive(Debug, Deserialize, Default)]
struct Ticks {
    #[serde(default)]
    tick: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct SnapArgs {
    time: f64,
    seq: u32,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    dissident: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct SaveArgs {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    dissident: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Tags {
    #[serde(default)]
    debounce: Option<f64>,
    #[serde(default, rename = "msgID")]
    msg_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StoredSnapshot {
    url: String,
    time: f64,
    seq: u32,
}

/// A refusal of a client frame: close with this code.
type Refusal = (u16, String);

fn malformed(what: impl Into<String>) -> Refusal {
    (close::MALFORMED, what.into())
}

/// An action's arguments in the shape `T`, or a refusal naming the action.
fn args_of<'a, T: serde::Deserialize<'a>>(msg: &Incoming<'a>, action: &str) -> Result<T, Refusal> {
    let raw = msg
        .args
        .ok_or_else(|| malformed(format!("{action} without args")))?;
    serde_json::from_str(raw.get()).map_err(|e| malformed(format!("{action} args: {e}")))
}

/// Whether a SNAP or SAVE says it comes from a replica that disagrees with the majority (its
/// data is then not taken): anything but absent, null or false.
fn dissident(d: &Option<serde_json::Value>) -> bool {
    d.as_ref()
        .is_some_and(|d| !d.is_null() && d != &serde_json::Value::Bool(false))
}

/// One Croquet session. See the module docs.
pub struct CroquetSession {
    id: String,
    cfg: AdapterConfig,
    framing: Arc<CroquetFraming>,
    timeline: String,
    persistence: Box<dyn Persistence>,
    core: Option<Session>,
    conns: BTreeMap<ConnId, Conn>,
    out: VecDeque<Action>,
    tove: Option<String>,
    app_id: Option<String>,
    persistent_id: Option<String>,
    persistent_url: Option<String>,
    leave_delay: Duration,
    snapshot_time: f64,
    users_due: Option<Instant>,
    users_joined: Vec<(ConnId, String)>,
    users_left: Vec<(ConnId, String)>,
    /// Connections gone whose leave is announced at the instant (the client's `leaveDelay`).
    leaving: Vec<(Instant, ConnId, String)>,
    tallies: HashMap<String, Tally>,
    completed: HashMap<String, f64>,
    tally_sentinel: Option<f64>,
    debounce: HashMap<String, Instant>,
    /// Core sessions ended so far; part of the timeline.
    generation: u64,
}

impl std::fmt::Debug for CroquetSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CroquetSession")
            .field("id", &self.id)
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl CroquetSession {
    /// A session for Croquet id `id` (checked with [`frames::valid_session_id`]); `timeline` is
    /// the random text clients use to tell this session from an earlier one of the same id.
    pub fn new(
        id: &str,
        cfg: AdapterConfig,
        timeline: String,
        persistence: Box<dyn Persistence>,
    ) -> Self {
        CroquetSession {
            id: id.to_string(),
            framing: Arc::new(CroquetFraming::new(id)),
            cfg,
            timeline,
            persistence,
            core: None,
            conns: BTreeMap::new(),
            out: VecDeque::new(),
            tove: None,
            app_id: None,
            persistent_id: None,
            persistent_url: None,
            leave_delay: Duration::ZERO,
            snapshot_time: -1.0,
            users_due: None,
            users_joined: Vec::new(),
            users_left: Vec::new(),
            leaving: Vec::new(),
            tallies: HashMap::new(),
            completed: HashMap::new(),
            tally_sentinel: None,
            debounce: HashMap::new(),
            generation: 0,
        }
    }

    /// The Croquet session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The app (the first JOIN's `appId`), once known.
    pub fn app_id(&self) -> Option<&str> {
        self.app_id.as_deref()
    }

    /// The session core, once the first JOIN created it.
    pub fn core(&self) -> Option<&Session> {
        self.core.as_ref()
    }

    /// Connections attached now (joined or not).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// When [`CroquetSession::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.core.as_ref().and_then(Session::poll_timeout);
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        if let Some(t) = self.users_due {
            consider(t);
        }
        for t in self.tallies.values() {
            consider(t.due);
        }
        for (t, _, _) in &self.leaving {
            consider(*t);
        }
        for c in self.conns.values().filter(|c| !c.joined) {
            consider(c.since + self.cfg.join_timeout);
        }
        next
    }

    /// True when nothing is attached and the core (if any) lingered out: the driver drops the
    /// session.
    pub fn is_finished(&self, now: Instant) -> bool {
        self.conns.is_empty() && self.core.as_ref().is_none_or(|c| c.is_expired(now))
    }

    /// A WebSocket opened for this session; `open` says whether the router's create policy
    /// lets this peer in without a listed apiKey.
    pub fn handle_connect(&mut self, conn: ConnId, open: bool, now: Instant) {
        self.conns.insert(
            conn,
            Conn {
                since: now,
                open,
                joined: false,
                sync: None,
                active: false,
                user: None,
                client_seq: 0,
            },
        );
    }

    /// The WebSocket is gone (closed by the client, or an I/O error).
    pub fn handle_disconnect(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if c.joined {
            if let Some(core) = self.core.as_mut() {
                core.handle_disconnect(conn, now);
            }
        }
        self.departed(conn, c, now);
        self.drain_core(now);
    }

    /// The driver wrote `bytes` of the counted frames it was given for `conn`.
    pub fn handle_flushed(&mut self, conn: ConnId, bytes: usize, now: Instant) {
        if let Some(core) = self.core.as_mut() {
            core.handle_flushed(conn, bytes, now);
            self.drain_core(now);
        }
    }

    /// Timers that are due: the core's (ticks, idle, linger), users, tallies, leaves, joins.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(core) = self.core.as_mut() {
            core.handle_timeout(now);
        }
        self.drain_core(now);
        if self.core.as_ref().is_some_and(|c| c.is_expired(now)) {
            // Lingered out while a connection that has not joined yet keeps this alive: the
            // session is over, and that connection's JOIN starts a new one.
            self.end_core();
        }
        let late: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.joined && now >= c.since + self.cfg.join_timeout)
            .map(|(id, _)| *id)
            .collect();
        for conn in late {
            self.close(conn, close::NO_JOIN, "client never joined", now);
        }
        let (due, keep): (Vec<_>, Vec<_>) = self.leaving.drain(..).partition(|(t, _, _)| now >= *t);
        self.leaving = keep;
        for (_, conn, user) in due {
            self.user_left(conn, user, now);
        }
        let due: Vec<String> = self
            .tallies
            .iter()
            .filter(|(_, t)| now >= t.due)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.complete_tally(&key, now);
        }
        if self.users_due.is_some_and(|t| now >= t) {
            self.users_due = None;
            self.send_users(now);
        }
        self.drain_core(now);
    }

    /// Forgets the core session and everything that belonged to it.
    fn end_core(&mut self) {
        self.core = None;
        self.tove = None;
        self.app_id = None;
        self.persistent_id = None;
        self.persistent_url = None;
        self.snapshot_time = -1.0;
        self.users_due = None;
        self.users_joined.clear();
        self.users_left.clear();
        self.leaving.clear();
        self.tallies.clear();
        self.completed.clear();
        self.tally_sentinel = None;
        self.debounce.clear();
        // Clients must not take a new session of the same id for the old one.
        self.generation += 1;
    }

    /// Closes one connection with a Croquet close code, e.g. when the driver finds it is not
    /// reading what it is sent.
    pub fn disconnect(&mut self, conn: ConnId, code: u16, reason: &str, now: Instant) {
        self.close(conn, code, reason, now);
    }

    /// Closes every connection, e.g. when the router shuts down (clients reconnect).
    pub fn shutdown(&mut self, now: Instant) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.close(conn, close::RECONNECT, "the router is shutting down", now);
        }
    }

    /// A text frame from a client.
    pub fn handle_text(&mut self, conn: ConnId, text: &str, now: Instant) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        if let Err((code, reason)) = self.on_text(conn, text, now) {
            self.close(conn, code, &reason, now);
        }
        self.drain_core(now);
    }

    fn on_text(&mut self, conn: ConnId, text: &str, now: Instant) -> Result<(), Refusal> {
        let Some(msg) = frames::parse_incoming(text) else {
            return Err(malformed("malformed message: not a JSON object"));
        };
        let joined = self.conns.get(&conn).is_some_and(|c| c.joined);
        if joined && !matches!(msg.action.as_deref(), Some("SEND")) {
            // Any frame is a sign of life for the core's idle timeout (SEND is one already).
            if let Some(core) = self.core.as_mut() {
                core.handle_frame(conn, ClientFrame::Pong { nonce: 0 }, now);
            }
        }
        match msg.action.as_deref() {
            Some("JOIN") if joined => Err((close::BAD_PROTOCOL, "JOIN sent twice".into())),
            Some("JOIN") => self.on_join(conn, &msg, now),
            Some("SEND") if joined => self.on_send(conn, &msg, now),
            Some("TUTTI") if joined => self.on_tutti(conn, &msg, now),
            Some("SNAP") if joined => self.on_snap(&msg, now),
            Some("SAVE") if joined => self.on_save(&msg),
            Some("TICKS") if joined => self.on_ticks(&msg),
            // Before JOIN these mean nothing yet (the reference ignores them too).
            Some("SEND" | "TUTTI" | "SNAP" | "SAVE" | "TICKS") => Ok(()),
            Some("PING") => {
                let mut b = BytesMut::from(&br#"{"action":"PONG""#[..]);
                if let Some(args) = msg.args {
                    b.put_slice(br#","args":"#);
                    b.put_slice(args.get().as_bytes());
                }
                b.put_u8(b'}');
                self.send(conn, b.freeze(), false);
                Ok(())
            }
            Some("PULSE" | "LOG") => Ok(()),
            Some(other) => Err((
                close::BAD_PROTOCOL,
                format!(
                    "unknown action {:?}",
                    other.chars().take(64).collect::<String>()
                ),
            )),
            None => Err(malformed("malformed message: no action")),
        }
    }

    fn on_join(&mut self, conn: ConnId, msg: &Incoming<'_>, now: Instant) -> Result<(), Refusal> {
        let raw = msg
            .args
            .ok_or_else(|| (close::BAD_PROTOCOL, "JOIN without args".to_string()))?;
        let args: JoinArgs<'_> = serde_json::from_str(raw.get())
            .map_err(|e| (close::BAD_PROTOCOL, format!("JOIN args: {e}")))?;
        let version_ok = args
            .version
            .is_some_and(|v| !matches!(v.get(), "null" | "false" | "0" | "\"\""));
        if !version_ok {
            return Err((
                close::BAD_PROTOCOL,
                "JOIN without a protocol version".into(),
            ));
        }
        let Some(key) = args.api_key.as_deref() else {
            return Err((close::BAD_APIKEY, "JOIN without an apiKey".into()));
        };
        let open = self.conns.get(&conn).is_some_and(|c| c.open);
        if !self.cfg.api_keys.is_empty() {
            if !self.cfg.api_keys.iter().any(|k| k == key) {
                return Err((
                    close::BAD_APIKEY,
                    "this apiKey is not in the router's croquet.api_keys list".into(),
                ));
            }
        } else if !open {
            return Err((
                close::BAD_APIKEY,
                "this router serves Croquet sessions only to its own network (create = \"lan\") and has no croquet.api_keys list".into(),
            ));
        }
        let user = args.user.map(|u| u.get().to_string());
        if user.as_ref().is_some_and(|u| u.len() > MAX_USER_BYTES) {
            return Err(malformed(format!(
                "user is longer than {MAX_USER_BYTES} bytes"
            )));
        }
        for (what, v) in [
            ("appId", args.app_id.as_deref()),
            ("persistentId", args.persistent_id.as_deref()),
            ("tove", args.tove.map(RawValue::get)),
        ] {
            if v.is_some_and(|v| v.len() > MAX_FIELD_BYTES) {
                return Err(malformed(format!(
                    "{what} is longer than {MAX_FIELD_BYTES} bytes"
                )));
            }
        }
        let created = self.core.is_none();
        if created {
            let mut cfg = self.cfg.session.clone();
            cfg.framing = self.framing.clone();
            cfg.external_snapshots = true;
            cfg.announce_membership = false;
            let tick = args
                .ticks
                .as_ref()
                .and_then(|t| t.tick)
                .filter(|t| t.is_finite() && *t > 0.0)
                .map_or(self.cfg.default_tick, |ms| Duration::from_millis(ms as u64));
            let mut core = Session::new(
                frames::session_id(&self.id),
                isthmus_router::auth::IslandKeys {
                    admin: isthmus_router::auth::PublicKey([0; 32]),
                    participant: isthmus_router::auth::PublicKey([0; 32]),
                    observer: isthmus_router::auth::PublicKey([0; 32]),
                },
                cfg,
                now,
            );
            core.set_tick_interval(tick);
            self.core = Some(core);
            self.tove = args.tove.map(|t| t.get().to_string());
            self.app_id = args.app_id.clone();
            self.persistent_id = args.persistent_id.clone();
            if let (Some(app), Some(pid)) = (&self.app_id, &self.persistent_id) {
                self.persistent_url = self.persistence.saved(app, pid);
            }
        }
        self.leave_delay = Duration::from_millis(
            args.leave_delay
                .filter(|d| d.is_finite() && *d > 0.0)
                .map_or(0, |d| d as u64),
        )
        .min(MAX_LEAVE_DELAY);
        // A display name for logs and the status page: the user's text when it is a JSON
        // string (the usual case), else the JSON itself when short.
        let name = user
            .as_deref()
            .map(|u| serde_json::from_str::<String>(u).unwrap_or_else(|_| u.to_string()))
            .filter(|u| !u.is_empty() && u.len() <= 64)
            .unwrap_or_else(|| "croquet client".to_string());
        if let Some(c) = self.conns.get_mut(&conn) {
            c.joined = true;
            c.user = user;
        }
        let request = JoinRequest {
            replica: replica_of(conn),
            name,
            role: Role::Replica,
            resume_from: None,
            contacts: wire::Contacts::default(),
            created,
            nonce: [0; NONCE_LEN],
            control: false,
            recover: None,
            cluster: Vec::new(),
        };
        if let Some(core) = self.core.as_mut() {
            core.handle_join(conn, request, now);
        }
        Ok(())
    }

    fn on_send(&mut self, conn: ConnId, msg: &Incoming<'_>, now: Instant) -> Result<(), Refusal> {
        let payload = message_tail(msg.args)
            .ok_or_else(|| malformed("SEND args are not [time, seq, payload, ...]"))?;
        if let Some(tags) = msg.tags {
            let tags: Tags = serde_json::from_str(tags.get())
                .map_err(|e| malformed(format!("SEND tags: {e}")))?;
            if let (Some(window), Some(id)) = (tags.debounce.filter(|d| *d > 0.0), tags.msg_id) {
                if id.len() > MAX_FIELD_BYTES {
                    return Err(malformed("msgID too long"));
                }
                let window = Duration::from_millis(window.min(86_400_000.0) as u64);
                if self.debounced(id, window, now) {
                    return Ok(());
                }
            }
        }
        self.core_send(conn, payload, now);
        Ok(())
    }

    /// Whether a tagged message is inside its msgID's window (then dropped); records it if not.
    fn debounced(&mut self, id: String, window: Duration, now: Instant) -> bool {
        if let Some(last) = self.debounce.get(&id) {
            if now.saturating_duration_since(*last) <= window {
                return true;
            }
        }
        if self.debounce.len() >= MAX_DEBOUNCE_RECORDS && !self.debounce.contains_key(&id) {
            if let Some(oldest) = self
                .debounce
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone())
            {
                self.debounce.remove(&oldest);
            }
        }
        self.debounce.insert(id, now);
        false
    }

    fn core_send(&mut self, conn: ConnId, payload: Bytes, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.client_seq += 1;
        let client_seq = c.client_seq;
        if let Some(core) = self.core.as_mut() {
            core.handle_frame(
                conn,
                ClientFrame::Send {
                    client_seq,
                    payload,
                },
                now,
            );
        }
    }

    fn on_tutti(&mut self, conn: ConnId, msg: &Incoming<'_>, now: Instant) -> Result<(), Refusal> {
        let args: Vec<&RawValue> = args_of(msg, "TUTTI")?;
        let arg = |i: usize| args.get(i).map(|v| v.get()).unwrap_or("null");
        let send_time: f64 = serde_json::from_str(arg(0))
            .map_err(|_| malformed("TUTTI sendTime is not a number"))?;
        let payload: String =
            serde_json::from_str(arg(2)).map_err(|_| malformed("TUTTI payload is not a string"))?;
        let key: String =
            serde_json::from_str(arg(6)).map_err(|_| malformed("TUTTI key is not a string"))?;
        let wants_vote = arg(4) == "true";
        let target = arg(5).to_string();
        if key.len() > MAX_FIELD_BYTES
            || payload.len() > MAX_USER_BYTES
            || target.len() > MAX_FIELD_BYTES
        {
            return Err(malformed("TUTTI field too long"));
        }
        if !self.tallies.contains_key(&key) {
            let limit = self.tally_history_limit(now);
            if send_time < limit || self.completed.contains_key(&key) {
                return Ok(()); // a vote for an old or finished tally
            }
            if self.tallies.len() >= MAX_OPEN_TALLIES {
                self.out.push_back(Action::Log(format!(
                    "vote for {key:?} dropped: {MAX_OPEN_TALLIES} tallies are open"
                )));
                return Ok(());
            }
            if args.get(3).is_some_and(|m| m.get() != "null") {
                let first = message_tail(args.get(3).copied()).ok_or_else(|| {
                    malformed("TUTTI first message is not [time, seq, payload, ...]")
                })?;
                self.core_send(conn, first, now);
            }
            let expecting = self.conns.values().filter(|c| c.joined).count();
            self.tallies.insert(
                key.clone(),
                Tally {
                    send_time,
                    expecting,
                    payloads: Vec::new(),
                    due: now + self.cfg.tally_interval,
                    wants_vote,
                    target,
                },
            );
        }
        let Some(t) = self.tallies.get_mut(&key) else {
            return Ok(());
        };
        if let Some(i) = t.payloads.iter().position(|(p, _)| *p == payload) {
            t.payloads[i].1 += 1;
        } else if t.payloads.len() < MAX_TALLY_PAYLOADS {
            t.payloads.push((payload, 1));
        }
        t.expecting = t.expecting.saturating_sub(1);
        if t.expecting == 0 {
            self.complete_tally(&key, now);
        }
        Ok(())
    }

    /// The earliest send time a new tally may have: a minute back, or further forward when
    /// more than [`MAX_COMPLETED_TALLIES`] recent ones are remembered.
    fn tally_history_limit(&mut self, now: Instant) -> f64 {
        let now_ms = self.now_ms(now) as f64;
        let mut limit = (now_ms - MAX_TALLY_AGE_MS as f64 + 1.0).max(0.0);
        self.completed.retain(|_, t| *t >= limit);
        if self.completed.len() > MAX_COMPLETED_TALLIES {
            let mut times: Vec<f64> = self.completed.values().copied().collect();
            times.sort_by(|a, b| b.total_cmp(a));
            let cut = times[MAX_COMPLETED_TALLIES - 1];
            self.completed.retain(|_, t| *t > cut);
            self.tally_sentinel = Some(self.tally_sentinel.map_or(cut, |s| s.max(cut)));
        }
        if let Some(s) = self.tally_sentinel {
            limit = limit.max(s);
        }
        limit
    }

    fn complete_tally(&mut self, key: &str, now: Instant) {
        let Some(t) = self.tallies.remove(key) else {
            return;
        };
        if t.wants_vote || t.payloads.len() > 1 {
            let mut tally = serde_json::Map::new();
            for (p, n) in &t.payloads {
                tally.insert(p.clone(), (*n).into());
            }
            let mut body = String::from(r#"{"what":"tally","sendTime":"#);
            body.push_str(&json_number(t.send_time));
            body.push_str(r#","tally":"#);
            body.push_str(&serde_json::Value::Object(tally).to_string());
            body.push_str(r#","tallyTarget":"#);
            body.push_str(&t.target);
            body.push_str(r#","tuttiKey":"#);
            body.push_str(&serde_json::Value::String(key.to_string()).to_string());
            body.push_str(r#","missingClients":"#);
            body.push_str(&t.expecting.to_string());
            self.stamp_object(body, now);
        }
        self.completed.insert(key.to_string(), t.send_time);
        self.tally_history_limit(now);
    }

    /// Stamps a router message whose payload is a JSON object (`body` lacks its closing brace):
    /// `_size` is added as the reference does, the length of the object without it.
    fn stamp_object(&mut self, mut body: String, now: Instant) {
        let size = body.len() + 1;
        body.push_str(&format!(",\"_size\":{size}}}"));
        if let Some(core) = self.core.as_mut() {
            core.stamp_router(Bytes::from(body), now);
        }
        self.drain_core(now);
    }

    fn on_snap(&mut self, msg: &Incoming<'_>, now: Instant) -> Result<(), Refusal> {
        let args: SnapArgs = args_of(msg, "SNAP")?;
        if dissident(&args.dissident) {
            return Ok(());
        }
        let Some(url) = args.url.filter(|u| u.len() <= MAX_FIELD_BYTES) else {
            return Err(malformed("SNAP without a url (or one too long)"));
        };
        if args.time.partial_cmp(&self.snapshot_time) != Some(std::cmp::Ordering::Greater) {
            return Ok(()); // not newer than the one we have
        }
        if args.time > self.now_ms(now) as f64 {
            // No replica can be ahead of the router's time. Taken, it would shut out every
            // real snapshot for the rest of the session (they must be newer by time).
            self.out.push_back(Action::Log(format!(
                "snapshot at time {} ignored: ahead of the session's time",
                args.time
            )));
            return Ok(());
        }
        let Some(core) = self.core.as_mut() else {
            return Ok(());
        };
        let Some(at) = core_seq(core.last_seq().0, args.seq) else {
            self.out.push_back(Action::Log(format!(
                "snapshot at seq {} ignored: before the session's start",
                args.seq
            )));
            return Ok(());
        };
        let meta = serde_json::json!({"url": url, "time": args.time, "seq": args.seq}).to_string();
        match core.store_snapshot(Seq(at), Bytes::from(meta), now) {
            Ok(()) => {
                self.snapshot_time = args.time;
                self.out.push_back(Action::SnapshotStored { url });
            }
            Err(e) => self
                .out
                .push_back(Action::Log(format!("snapshot {url} not stored: {e}"))),
        }
        Ok(())
    }

    fn on_save(&mut self, msg: &Incoming<'_>) -> Result<(), Refusal> {
        let (Some(app_id), Some(persistent_id)) = (self.app_id.clone(), self.persistent_id.clone())
        else {
            return Err((
                close::BAD_APPID,
                "SAVE needs a session with an appId and persistentId".into(),
            ));
        };
        let args: SaveArgs = args_of(msg, "SAVE")?;
        if dissident(&args.dissident) {
            return Ok(());
        }
        let Some(url) = args.url.filter(|u| u.len() <= MAX_FIELD_BYTES) else {
            return Err(malformed("SAVE without a url (or one too long)"));
        };
        self.out.push_back(Action::Save {
            app_id,
            persistent_id,
            url,
        });
        Ok(())
    }

    fn on_ticks(&mut self, msg: &Incoming<'_>) -> Result<(), Refusal> {
        let ticks: Ticks = args_of(msg, "TICKS")?;
        if let (Some(ms), Some(core)) = (
            ticks.tick.filter(|t| t.is_finite() && *t > 0.0),
            self.core.as_mut(),
        ) {
            core.set_tick_interval(Duration::from_millis(ms as u64));
        }
        Ok(())
    }

    // ---- users ---------------------------------------------------------------------------

    fn user_joined(&mut self, conn: ConnId, user: String, now: Instant) {
        if let Some(i) = self.users_left.iter().position(|(c, _)| *c == conn) {
            self.users_left.remove(i);
        } else {
            self.users_joined.push((conn, user));
        }
        self.schedule_users(now);
    }

    fn user_left(&mut self, conn: ConnId, user: String, now: Instant) {
        if let Some(i) = self.users_joined.iter().position(|(c, _)| *c == conn) {
            self.users_joined.remove(i);
        } else {
            self.users_left.push((conn, user));
        }
        self.schedule_users(now);
    }

    fn schedule_users(&mut self, now: Instant) {
        if self.users_due.is_none() {
            self.users_due = Some(now + self.cfg.users_interval);
        }
    }

    fn send_users(&mut self, now: Instant) {
        if self.users_joined.is_empty() && self.users_left.is_empty() {
            return;
        }
        let active = self.conns.values().filter(|c| c.active).count();
        let total = active + self.leaving.len();
        let joined = std::mem::take(&mut self.users_joined);
        let left = std::mem::take(&mut self.users_left);
        if active == 0 {
            return; // nobody would hear it
        }
        let mut body = format!(r#"{{"what":"users","active":{active},"total":{total}"#);
        for (name, list) in [("joined", &joined), ("left", &left)] {
            if !list.is_empty() {
                body.push_str(&format!(",\"{name}\":["));
                let users: Vec<&str> = list.iter().map(|(_, u)| u.as_str()).collect();
                body.push_str(&users.join(","));
                body.push(']');
            }
        }
        self.stamp_object(body, now);
    }

    /// A connection is gone from the adapter: its user leaves now or after the leave delay.
    fn departed(&mut self, conn: ConnId, c: Conn, now: Instant) {
        if let (true, Some(user)) = (c.active, c.user) {
            if self.leave_delay.is_zero() {
                self.user_left(conn, user, now);
            } else {
                self.leaving.push((now + self.leave_delay, conn, user));
            }
        }
    }

    // ---- driving the core ----------------------------------------------------------------

    fn now_ms(&self, now: Instant) -> u64 {
        self.core.as_ref().map_or(0, |c| millis(c.time(now)))
    }

    fn send(&mut self, conn: ConnId, frame: Bytes, counted: bool) {
        self.out.push_back(Action::Send {
            conn,
            frame,
            counted,
        });
    }

    fn close(&mut self, conn: ConnId, code: u16, reason: &str, now: Instant) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if c.joined {
            if let Some(core) = self.core.as_mut() {
                core.handle_disconnect(conn, now);
            }
        }
        self.out.push_back(Action::Close {
            conn,
            code,
            reason: reason.to_string(),
        });
        self.departed(conn, c, now);
        self.drain_core(now);
    }

    /// Turns the core's outputs into actions until it has nothing more to say.
    fn drain_core(&mut self, now: Instant) {
        loop {
            let mut credits: Vec<(ConnId, usize)> = Vec::new();
            while let Some(o) = self.core.as_mut().and_then(Session::poll_output) {
                match o {
                    Output::Transmit { conn, frame } => {
                        if let Some(n) = self.on_core_frame(conn, frame, now) {
                            credits.push((conn, n));
                        }
                    }
                    Output::Close { conn, goodbye, .. } => {
                        let Some(c) = self.conns.remove(&conn) else {
                            continue;
                        };
                        let (code, reason) = goodbye.as_ref().and_then(goodbye_code).map_or(
                            (close::RECONNECT, "please reconnect".to_string()),
                            |(code, reason)| {
                                let (c, _) = frames::close_for(code);
                                (c, reason)
                            },
                        );
                        self.out.push_back(Action::Close { conn, code, reason });
                        self.departed(conn, c, now);
                    }
                    Output::Notice(Notice::SnapshotWanted { messages }) => {
                        self.out.push_back(Action::Log(format!(
                            "history holds {messages} messages: asking clients for a snapshot"
                        )));
                        let requ =
                            Bytes::from(format!(r#"{{"id":"{}","action":"REQU"}}"#, self.id));
                        let to: Vec<ConnId> = self
                            .conns
                            .iter()
                            .filter(|(_, c)| c.active)
                            .map(|(k, _)| *k)
                            .collect();
                        for conn in to {
                            self.send(conn, requ.clone(), false);
                        }
                    }
                    Output::Notice(n) => self.out.push_back(Action::Notice(n)),
                }
            }
            if credits.is_empty() {
                return;
            }
            if let Some(core) = self.core.as_mut() {
                for (conn, n) in credits {
                    core.handle_flushed(conn, n, now);
                }
            }
        }
    }

    /// A frame the core wants sent: returns the bytes to credit back at once when the adapter
    /// consumed it instead of passing it on.
    fn on_core_frame(&mut self, conn: ConnId, frame: Bytes, now: Instant) -> Option<usize> {
        let len = frame.len();
        let Some(c) = self.conns.get_mut(&conn) else {
            return Some(len);
        };
        if frame.first() == Some(&b'{') {
            // A RECV or TICK of our framing.
            if let Some(sync) = c.sync.as_mut() {
                if self.framing.is_recv(&frame) {
                    sync.messages.push(self.framing.recv_args(&frame));
                }
                return Some(len);
            }
            self.out.push_back(Action::Send {
                conn,
                frame,
                counted: true,
            });
            return None;
        }
        let parsed = frame
            .get(wire::LENGTH_PREFIX_LEN..)
            .and_then(|body| wire::decode_body::<ServerFrame>(body).ok());
        match parsed {
            Some(ServerFrame::SyncBegin { .. }) => {
                c.sync = Some(SyncBuf {
                    snapshot: Vec::new(),
                    messages: Vec::new(),
                });
            }
            Some(ServerFrame::SnapshotData { data }) => {
                if let Some(sync) = c.sync.as_mut() {
                    sync.snapshot.extend_from_slice(&data);
                }
            }
            Some(ServerFrame::Synced { seq, .. }) => {
                if let Some(sync) = c.sync.take() {
                    c.active = true;
                    let user = c.user.clone();
                    let frame = self.sync_frame(sync, seq, now);
                    self.send(conn, frame, false);
                    if let Some(user) = user {
                        self.user_joined(conn, user, now);
                    }
                }
            }
            _ => {} // welcome, presence, pongs: nothing a Croquet client knows
        }
        Some(len)
    }

    fn sync_frame(&self, sync: SyncBuf, seq: Seq, now: Instant) -> Bytes {
        let time = self.now_ms(now);
        let snap: Option<StoredSnapshot> = serde_json::from_slice(&sync.snapshot).ok();
        let size: usize = sync.messages.iter().map(|m| m.len() + 1).sum();
        let mut b = BytesMut::with_capacity(size + 512);
        b.put_slice(
            format!(
                r#"{{"id":"{}","action":"SYNC","args":{{"messages":["#,
                self.id
            )
            .as_bytes(),
        );
        for (i, m) in sync.messages.iter().enumerate() {
            if i > 0 {
                b.put_u8(b',');
            }
            b.put_slice(m);
        }
        b.put_slice(format!(r#"],"time":{time},"seq":{},"#, croquet_seq(seq.0)).as_bytes());
        if let Some(tove) = &self.tove {
            b.put_slice(br#""tove":"#);
            b.put_slice(tove.as_bytes());
            b.put_u8(b',');
        }
        b.put_slice(format!(r#""reflector":"{REFLECTOR_NAME}","timeline":"#).as_bytes());
        b.put_slice(
            serde_json::Value::String(match self.generation {
                0 => self.timeline.clone(),
                g => format!("{}.{g}", self.timeline),
            })
            .to_string()
            .as_bytes(),
        );
        b.put_slice(br#","flags":{},"url":"#);
        match (&snap, &self.persistent_url) {
            (Some(s), _) => {
                b.put_slice(
                    serde_json::Value::String(s.url.clone())
                        .to_string()
                        .as_bytes(),
                );
                b.put_slice(
                    format!(
                        r#","snapshotTime":{},"snapshotSeq":{}"#,
                        json_number(s.time),
                        s.seq
                    )
                    .as_bytes(),
                );
            }
            (None, Some(p)) => {
                b.put_slice(serde_json::Value::String(p.clone()).to_string().as_bytes());
                b.put_slice(br#","persisted":true"#);
            }
            (None, None) => b.put_slice(br#""""#),
        }
        b.put_slice(b"}}");
        b.freeze()
    }
}

/// A JSON number as JavaScript prints it for integers, else serde_json's shortest form.
fn json_number(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 9.0e15 {
        format!("{}", x as i64)
    } else {
        serde_json::Number::from_f64(x).map_or("0".into(), |n| n.to_string())
    }
}

/// The JSON text after time and seq of a message array `[time, seq, payload, ...]`: what the
/// core stamps and every RECV repeats. `None` if it is not an array of at least three.
fn message_tail(args: Option<&RawValue>) -> Option<Bytes> {
    let parts: Vec<&RawValue> = serde_json::from_str(args?.get()).ok()?;
    if parts.len() < 3 {
        return None;
    }
    let mut b = BytesMut::new();
    for (i, p) in parts[2..].iter().enumerate() {
        if i > 0 {
            b.put_u8(b',');
        }
        b.put_slice(p.get().as_bytes());
    }
    Some(b.freeze())
}

/// The code and reason of a core goodbye or refusal frame.
fn goodbye_code(frame: &Bytes) -> Option<(Code, String)> {
    match wire::decode_body::<ServerFrame>(frame.get(wire::LENGTH_PREFIX_LEN..)?).ok()? {
        ServerFrame::Goodbye { code, reason } | ServerFrame::Refuse { code, reason } => {
            Some((code, reason))
        }
        _ => None,
    }
}

/// The core replica id of a connection: Croquet clients have no identity of their own across
/// connections (every JOIN is a fresh sync), so each connection is a replica.
fn replica_of(conn: ConnId) -> ReplicaId {
    ReplicaId(uuid::Uuid::from_u64_pair(0x6372_6f71_7565_7400, conn.0))
}
