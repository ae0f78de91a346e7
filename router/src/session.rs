//! The sans-IO session core: one island session's total order, ticks, joins, snapshots, resume,
//! digests and backpressure, as a deterministic state machine.
//!
//! The driver feeds it events (`handle_*`, each with the current `now`) and drains what it wants
//! done (`poll_output`), and asks when it next needs waking (`poll_timeout`). It never reads a
//! clock, sleeps or touches a socket, so tests drive it on a virtual clock.
//!
//! Frames leave the core already encoded: a stamped message is encoded once and the same `Bytes`
//! goes to every replica and into the history.
//!
//! Roles: [`Role::Replica`] and [`Role::Admin`] are participants (they send and may be asked for
//! snapshots); [`Role::Observer`] only follows. An admin may also send signed admin commands
//! (`SetTick`, `Kick`, `Close`): each must come from an admin member, carry a seq above the
//! connection's previous one, and verify with the admin key over the connection's nonce; the
//! core answers with `AdminDone`. After `Close` everyone gets goodbye 2010,
//! [`Session::is_closed`] turns true and joins are refused.
//!
//! Control connections (`JoinRequest::control`, admin only) are welcomed and then sent nothing
//! but pongs, admin answers and a goodbye: no sync, messages, ticks or divergence reports; they
//! never provide snapshots and their coming and going is not stamped. They count as attached
//! (the idle timeout applies, and they keep an empty session from lingering out).
//!
//! A join is checked whole before it replaces the same replica's old connection (1007), so a
//! refused hello changes nothing. A client seq of 0, or not above the highest seen from that
//! replica, is a protocol violation (honest replicas resend only what `Welcome` and `Synced`
//! did not confirm). Divergence is broadcast when a new digest group appears at a seq, at most
//! [`MAX_DIVERGENCE_REPORTS_PER_SEQ`] times per seq.
//!
//! Re-creation: a session whose first join is a recovering hello (`JoinRequest::recover`: its
//! router restarted, or the island's home died) gathers its replicas and continues the order from
//! the most advanced of them, at the seq, router time, incarnation and duplicate table they claim;
//! every welcome carries the placement epoch ([`SessionConfig::epoch`]). See [`gather`].
//!
//! Memory: every history entry, stored snapshot and snapshot upload is reserved in the
//! router-wide [`MemoryBudget`] (`SessionConfig::budget`) before it is kept, and released when
//! dropped (also when the session is dropped), so all sessions together never pass its limit.
//! Under pressure a session asks for a snapshot early; when an entry does not fit it cuts its
//! own history from the front, and failing that delivers the message live without keeping it
//! (joiners then need a snapshot). An upload that does not fit is abandoned and the joiners
//! waiting for it are told [`Code::BUSY`] unless a stored snapshot or a fresh start serves them.
//!
//! Late join: a provider's upload is relayed as it arrives. Its first piece starts every waiting
//! joiner with `SyncBegin`; each piece is encoded once into `SnapshotData` frames of at most
//! [`SessionConfig::snapshot_chunk_bytes`] (and a quarter of the outbound bound) that every
//! joiner shares and that become the stored snapshot when the upload completes. Joiners of an
//! upload that is lost get a new `SyncBegin` (a replica starts its sync over on it) or a
//! retryable close; see docs/protocol.md, "Late join".

use crate::auth::{self, IslandKeys, Signature, NONCE_LEN};
use crate::budget::MemoryBudget;
use crate::ids::{ConnId, ReplicaId, RouterTime, Seq, SessionId};
use crate::wire::{
    self, AdminCommand, Code, CreateOptions, DigestGroup, Divergence, Message, Origin, Role,
    RouterEvent, ServerFrame, Welcome, MAX_DIGEST_BYTES,
};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod gather;

/// Default idle time before a tick: 20 ticks a second keeps island time smooth for animation.
pub const DEFAULT_TICK_INTERVAL: Duration = Duration::from_millis(50);
/// How long an empty session keeps its snapshot and history, so a replica that drops out briefly
/// (or a page reload) finds its island still there. Croquet's reflector uses the same 10 s.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(10);
/// History entries kept since the newest snapshot (Croquet's reflector caps at 100,000).
pub const DEFAULT_MAX_HISTORY_MESSAGES: usize = 100_000;
/// History bytes kept since the newest snapshot.
pub const DEFAULT_MAX_HISTORY_BYTES: usize = 64 * 1024 * 1024;
/// The largest snapshot a replica may upload.
pub const DEFAULT_MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;
/// Bytes queued to one replica but not yet written before it counts as a slow consumer.
pub const DEFAULT_MAX_OUTBOUND_BYTES: usize = 8 * 1024 * 1024;
/// Size of the snapshot pieces relayed to a joiner.
pub const DEFAULT_SNAPSHOT_CHUNK_BYTES: usize = 64 * 1024;
/// Largest payload of one send.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// A replica silent for this long is dropped. Replicas ping every few seconds when idle, so only
/// a dead peer or a broken path stays silent this long (Croquet drops after 60 s too).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a provider may take to upload a snapshot before another is asked.
pub const DEFAULT_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Replicas attached to one session at once.
pub const DEFAULT_MAX_MEMBERS: usize = 1024;
/// Checkpoints whose digests are remembered for comparison.
pub const DEFAULT_DIGEST_WINDOW: usize = 64;
/// The shortest tick interval a creator may ask for by default: 100 ticks a second is smoother
/// than any display needs, and each tick costs a write per replica.
pub const DEFAULT_MIN_TICK_INTERVAL: Duration = Duration::from_millis(10);
/// The longest tick interval anyone may ask for.
pub const MAX_TICK_INTERVAL: Duration = Duration::from_secs(60);
/// How long a session re-created from its replicas waits for them to come back before it
/// continues the order from the most advanced one that did (see [`SessionConfig::gather_timeout`]).
pub const DEFAULT_GATHER_TIMEOUT: Duration = Duration::from_secs(3);
/// Replicas whose last client seq is remembered for duplicate detection after they left.
pub const DEFAULT_MAX_REMEMBERED_REPLICAS: usize = 4096;
/// Divergence frames broadcast for one seq at most. Each new digest group at a seq is news, but
/// a population that splits many ways (or replicas reporting garbage) must not turn one
/// checkpoint into a flood to every member: a few reports name the odd ones out.
pub const MAX_DIVERGENCE_REPORTS_PER_SEQ: usize = 4;
/// While the shared memory budget is under pressure, a session asks for an early snapshot once
/// its history holds at least this many bytes: below it, a snapshot would free too little to be
/// worth a provider's upload (and a snapshot after every message would be a storm).
pub const PRESSURE_SNAPSHOT_MIN_HISTORY_BYTES: usize = 256 * 1024;

/// How the core encodes the two frames it sends most: stamped messages (kept in the history
/// and replayed to joiners as they are) and ticks. Native replicas get wire frames
/// ([`WireFraming`]); the Croquet adapter plugs in its JSON text frames, so a message is still
/// encoded once and its bytes shared by every recipient and the history. Every other frame the
/// core makes (welcome, sync markers, goodbyes) stays a wire frame.
pub trait Framing: Send + Sync + std::fmt::Debug {
    /// The frame that carries one stamped message.
    fn message(&self, message: &Message) -> Bytes;
    /// The frame of a tick at router time `time`.
    fn tick(&self, time: RouterTime) -> Bytes;
}

/// The native wire encoding of messages and ticks.
#[derive(Debug, Default, Clone, Copy)]
pub struct WireFraming;

impl Framing for WireFraming {
    fn message(&self, message: &Message) -> Bytes {
        wire::encode_message(message)
    }

    fn tick(&self, time: RouterTime) -> Bytes {
        wire::encode_tick(time)
    }
}

/// Limits and timings of one session. Every bound on memory fed by the network is here.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Idle time before a tick.
    pub tick_interval: Duration,
    /// How long an empty session lingers before it is dropped.
    pub linger: Duration,
    /// History entries kept; at 60% a fresh snapshot is asked for so the history can be cut.
    pub max_history_messages: usize,
    /// History bytes kept; at 60% a fresh snapshot is asked for.
    pub max_history_bytes: usize,
    /// Largest snapshot accepted from a provider.
    pub max_snapshot_bytes: usize,
    /// Bytes queued to one replica before it is disconnected as a slow consumer.
    pub max_outbound_bytes: usize,
    /// Size of relayed snapshot pieces.
    pub snapshot_chunk_bytes: usize,
    /// Largest payload of one send.
    pub max_payload_bytes: usize,
    /// Silence after which a replica is dropped.
    pub idle_timeout: Duration,
    /// Time a provider has to deliver a snapshot.
    pub snapshot_timeout: Duration,
    /// Replicas attached at once.
    pub max_members: usize,
    /// Checkpoints remembered for digest comparison.
    pub digest_window: usize,
    /// Departed replicas remembered for duplicate detection.
    pub max_remembered_replicas: usize,
    /// Stamp joins and leaves into the order.
    pub announce_membership: bool,
    /// The shortest tick interval a creator or admin may ask for: ticks cost the router CPU.
    pub min_tick_interval: Duration,
    /// The router-wide budget for the bytes of every session's history and snapshots.
    pub budget: Arc<MemoryBudget>,
    /// This session's incarnation, drawn at random by whoever creates it (see
    /// [`wire::Welcome::incarnation`]); the core itself draws nothing.
    pub incarnation: u64,
    /// How stamped messages and ticks are encoded.
    pub framing: Arc<dyn Framing>,
    /// Snapshots come from outside ([`Session::store_snapshot`]) instead of being asked of a
    /// live replica: joiners are synced from the stored snapshot (or from the start) at once,
    /// and a history past 60% of its bounds raises [`Notice::SnapshotWanted`] instead of a
    /// `SnapshotRequest`. The Croquet adapter works this way, as its clients decide themselves
    /// when to upload a snapshot.
    pub external_snapshots: bool,
    /// The placement epoch every welcome carries ([`wire::Welcome::epoch`]). 0 (a lone router)
    /// lets the core choose: 1 for a new island, one above the highest epoch claimed by the
    /// recovering hellos for a re-created one. A cluster sets the etcd revision of the island's
    /// placement record, which the core then uses as it is.
    pub epoch: u64,
    /// A session created by a recovering hello holds every join (no welcome yet) until as many
    /// replicas as the most advanced one knew have come back, or this long after the first
    /// one that can re-create it arrived; then it continues the order from the most advanced.
    pub gather_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            tick_interval: DEFAULT_TICK_INTERVAL,
            linger: DEFAULT_LINGER,
            max_history_messages: DEFAULT_MAX_HISTORY_MESSAGES,
            max_history_bytes: DEFAULT_MAX_HISTORY_BYTES,
            max_snapshot_bytes: DEFAULT_MAX_SNAPSHOT_BYTES,
            max_outbound_bytes: DEFAULT_MAX_OUTBOUND_BYTES,
            snapshot_chunk_bytes: DEFAULT_SNAPSHOT_CHUNK_BYTES,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            snapshot_timeout: DEFAULT_SNAPSHOT_TIMEOUT,
            max_members: DEFAULT_MAX_MEMBERS,
            digest_window: DEFAULT_DIGEST_WINDOW,
            max_remembered_replicas: DEFAULT_MAX_REMEMBERED_REPLICAS,
            announce_membership: false,
            min_tick_interval: DEFAULT_MIN_TICK_INTERVAL,
            budget: Arc::new(MemoryBudget::unlimited()),
            incarnation: 0,
            framing: Arc::new(WireFraming),
            external_snapshots: false,
            epoch: 0,
            gather_timeout: DEFAULT_GATHER_TIMEOUT,
        }
    }
}

impl SessionConfig {
    /// Applies what the creating replica asked for, within sane bounds.
    pub fn with_create_options(mut self, opts: &CreateOptions) -> Self {
        if let Some(ms) = opts.tick_interval_ms {
            self.tick_interval = Duration::from_millis(u64::from(ms))
                .clamp(self.min_tick_interval, MAX_TICK_INTERVAL);
        }
        self.announce_membership = opts.announce_membership;
        self
    }

    /// Queued bytes below which a syncing replica is fed more snapshot or backlog: half the
    /// bound, so a sync never trips the slow-consumer limit by itself.
    fn pacing_bytes(&self) -> usize {
        self.max_outbound_bytes / 2
    }

    /// The largest piece of snapshot in one relayed `SnapshotData` frame: a piece must fit well
    /// inside the pacing window or it would trip the slow-consumer bound by itself.
    fn relay_piece_bytes(&self) -> usize {
        self.snapshot_chunk_bytes
            .min(self.pacing_bytes() / 2)
            .max(1)
    }
}

/// A replica asking to attach, as the dispatcher hands it over after checking the token.
#[derive(Clone, Debug)]
pub struct JoinRequest {
    /// Stable across reconnects.
    pub replica: ReplicaId,
    /// Display name.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Last seq applied, when reconnecting.
    pub resume_from: Option<Seq>,
    /// The router's contact points, as the dispatcher sees them for this replica.
    pub contacts: wire::Contacts,
    /// Whether this hello created the session.
    pub created: bool,
    /// The connection's nonce from the router's preamble: admin commands are signed over it.
    pub nonce: [u8; NONCE_LEN],
    /// An admin's control connection: welcomed, never synced, sent no messages.
    pub control: bool,
    /// What a reconnecting replica knows of the island ([`wire::HelloBody::recover`]); a
    /// session created by such a hello is re-created from its replicas.
    pub recover: Option<wire::Recover>,
    /// Other routers of the cluster for [`wire::Welcome::cluster`] (at most
    /// [`wire::MAX_CLUSTER_CONTACTS`] are sent); empty for a lone router.
    pub cluster: Vec<wire::Contacts>,
}

/// Something the driver must do, or may want to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Write this complete frame to the connection, after everything queued before it.
    Transmit {
        /// Where.
        conn: ConnId,
        /// An encoded frame, shared with other recipients.
        frame: Bytes,
    },
    /// Close the connection; the core has forgotten it.
    Close {
        /// Which.
        conn: ConnId,
        /// A goodbye (or refusal) frame to write last.
        goodbye: Option<Bytes>,
        /// Drop what is queued instead of writing it first (a slow consumer).
        discard_queued: bool,
    },
    /// Something worth a log line.
    Notice(Notice),
}

/// Why a joiner waiting for a snapshot is closed when the upload did not fit the memory budget.
const BUDGET_EXHAUSTED: &str = "the router's memory budget is exhausted; try again later";

/// Events of interest to logs and metrics; they change nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A replica attached.
    Joined {
        /// Who.
        replica: ReplicaId,
        /// Its display name, so logs name people, not only ids.
        name: String,
        /// On which connection.
        conn: ConnId,
        /// Resumed (true) or fully synced (false).
        resumed: bool,
    },
    /// A replica detached.
    Left {
        /// Who.
        replica: ReplicaId,
        /// Its display name.
        name: String,
        /// From which connection.
        conn: ConnId,
        /// Why the router closed it, if it did.
        code: Option<Code>,
    },
    /// A hello was refused.
    Refused {
        /// Who asked.
        replica: ReplicaId,
        /// Why.
        code: Code,
    },
    /// Replicas reported different digests.
    Diverged(Divergence),
    /// The history passed 60% of its bounds and the session keeps external snapshots
    /// (`SessionConfig::external_snapshots`): whoever feeds it should get one uploaded. Raised
    /// again for every further 1% of growth until a snapshot is stored.
    SnapshotWanted {
        /// Entries in the history now.
        messages: usize,
    },
    /// A snapshot was stored and the history cut.
    SnapshotStored {
        /// Taken after this seq.
        at: Seq,
        /// Its size.
        bytes: usize,
        /// From the request to the last piece, for the upload-duration histogram.
        took: Duration,
    },
    /// A session re-created from its replicas ended its gathering and continues the order.
    Recovered {
        /// The seq it continues after (the most advanced replica's).
        at: Seq,
        /// The placement epoch its welcomes carry.
        epoch: u64,
        /// Joins that were held, now let in.
        replicas: usize,
    },
    /// A joining replica got `Synced`: it is live now.
    Synced {
        /// Who.
        replica: ReplicaId,
        /// On which connection.
        conn: ConnId,
        /// Resumed (true) or synced from a snapshot or the start (false).
        resumed: bool,
        /// It had a snapshot or messages to catch up on: a late join. False for a resume and
        /// for the first replica of an island with nothing stamped yet (its creator).
        late: bool,
        /// From its join to `Synced`, for the join-duration histogram.
        took: Duration,
    },
}

/// A stored snapshot, kept as the `SnapshotData` frames joiners are sent: each piece was encoded
/// once, and every joiner gets the same `Bytes`.
#[derive(Clone, Debug)]
struct Snapshot {
    /// Taken right after this seq.
    at: u64,
    /// The snapshot's own size (what `SyncBegin` announces).
    len: u64,
    /// The encoded frames, in order.
    frames: Arc<[Bytes]>,
    /// Bytes of the frames: what the memory budget holds for this snapshot.
    kept: usize,
}

/// A snapshot being uploaded by a provider. Its pieces are relayed to joiners as they arrive
/// and kept, already encoded, to become the stored [`Snapshot`] when the upload completes.
#[derive(Debug)]
struct PendingSnapshot {
    request: u64,
    provider: ConnId,
    at: u64,
    asked_at: Instant,
    /// The announced size, known from the first piece on.
    total: Option<u64>,
    /// Snapshot bytes received so far.
    received: u64,
    /// `SnapshotData` frames of what was received, each encoded once.
    frames: Vec<Bytes>,
    /// Bytes of `frames`, reserved in the memory budget.
    kept: usize,
}

#[derive(Clone, Debug)]
enum SyncState {
    /// Waits for the first piece of the pending upload (or for one to be asked for).
    AwaitingSnapshot,
    /// Got `SyncBegin` for the pending upload and is fed its frames as they arrive, `next` the
    /// index of the next frame to send.
    Streaming { next: usize },
    /// Being sent a stored snapshot, frames `next..` still to go.
    SendingSnapshot { snap: Snapshot, next: usize },
    /// Being sent history entries from `next` on.
    Backlog { next: u64 },
    /// Gets every new message as it is stamped.
    Live,
    /// An admin's control connection: never synced, sent nothing but answers and goodbyes.
    Control,
}

#[derive(Debug)]
struct Member {
    replica: ReplicaId,
    name: String,
    role: Role,
    state: SyncState,
    /// Bytes handed to the driver and not yet reported flushed.
    unflushed: usize,
    last_heard: Instant,
    /// Set when the member must be disconnected; acted on by `reap`.
    doomed: Option<(Code, String, bool)>,
    /// The nonce of the router's preamble on this connection: admin commands are signed over it.
    nonce: [u8; NONCE_LEN],
    /// The highest admin command seq carried out on this connection; each must be higher, so a
    /// recorded command cannot be replayed.
    admin_seq: u64,
    /// When it joined, whether it resumed and whether it had anything to catch up on, for
    /// [`Notice::Synced`].
    joined_at: Instant,
    resumed: bool,
    late: bool,
}

impl Member {
    fn is_live(&self) -> bool {
        matches!(self.state, SyncState::Live) && self.doomed.is_none()
    }

    /// Participants (admins included) that are live may be asked for a snapshot; observers and
    /// control connections never are.
    fn may_provide(&self) -> bool {
        self.is_live() && self.role.may_send()
    }
}

/// The digests reported for one checkpoint.
#[derive(Debug, Default)]
struct DigestReports {
    reports: Vec<(ReplicaId, Bytes)>,
    /// Divergence frames broadcast for this seq so far.
    broadcasts: usize,
}

#[derive(Clone, Copy, Debug)]
struct ClientSeqEntry {
    last: u64,
    at_seq: u64,
}

/// One session's ordering state. See the module docs.
#[derive(Debug)]
pub struct Session {
    id: SessionId,
    keys: IslandKeys,
    cfg: SessionConfig,
    start: Instant,
    last_seq: u64,
    last_time: u64,
    last_activity: Instant,
    members: BTreeMap<ConnId, Member>,
    by_replica: HashMap<ReplicaId, ConnId>,
    /// Looked up for every send. Replica ids are hashes of public keys, so nobody picks them
    /// outright, and the map's seed is random: foldhash's seeded hash is enough here and far
    /// cheaper than SipHash.
    client_seqs: HashMap<ReplicaId, ClientSeqEntry, foldhash::fast::RandomState>,
    /// Encoded message frames of seqs `history_first..=last_seq`.
    history: VecDeque<Bytes>,
    history_first: u64,
    history_bytes: usize,
    snapshot: Option<Snapshot>,
    pending: Option<PendingSnapshot>,
    provider_cursor: usize,
    next_request: u64,
    digests: BTreeMap<u64, DigestReports>,
    empty_since: Option<Instant>,
    /// The admin closed the island: everyone was told, and joins are refused.
    closed: bool,
    /// History length at the last [`Notice::SnapshotWanted`], reset when a snapshot is stored.
    wanted_at: Option<usize>,
    /// Ticks sent (each to every live replica), for the router's metrics.
    ticks: u64,
    /// Members that just got `Synced`, reported by the next `reap` (which knows the time).
    synced: Vec<ConnId>,
    /// Some member was doomed since the last reap.
    any_doomed: bool,
    /// When a member may next be idle past the idle timeout (a lower bound; see
    /// `handle_timeout`), so finding the next deadline does not scan every member.
    idle_due: Option<Instant>,
    out: VecDeque<Output>,
    /// The placement epoch welcomes carry (see [`SessionConfig::epoch`]).
    epoch: u64,
    /// Router time at `start`: a re-created session continues from its replicas' newest time.
    time_base: u64,
    /// Somebody was ever let in: only a session's very first join can start a gathering.
    ever_joined: bool,
    /// Joins held while the session is re-created from its replicas (see `gather.rs`).
    gathering: Option<gather::Gathering>,
    /// The seq and router time a re-created session continued from.
    founded: Option<(u64, u64)>,
    /// Replicas a re-created session welcomed (at most `max_remembered_replicas`): only they
    /// can hold a state of this order at this epoch (see `gather::beyond_the_order`).
    welcomed_here: std::collections::HashSet<ReplicaId>,
}

impl Session {
    /// A new, empty session; `now` is time zero of its router time.
    pub fn new(id: SessionId, keys: IslandKeys, cfg: SessionConfig, now: Instant) -> Self {
        let epoch = cfg.epoch.max(1);
        Session {
            id,
            keys,
            cfg,
            start: now,
            last_seq: 0,
            last_time: 0,
            last_activity: now,
            members: BTreeMap::new(),
            by_replica: HashMap::new(),
            client_seqs: HashMap::default(),
            history: VecDeque::new(),
            history_first: 1,
            history_bytes: 0,
            snapshot: None,
            pending: None,
            provider_cursor: 0,
            next_request: 1,
            digests: BTreeMap::new(),
            empty_since: Some(now),
            closed: false,
            wanted_at: None,
            ticks: 0,
            synced: Vec::new(),
            any_doomed: false,
            idle_due: None,
            out: VecDeque::new(),
            epoch,
            time_base: 0,
            ever_joined: false,
            gathering: None,
            founded: None,
            welcomed_here: std::collections::HashSet::new(),
        }
    }

    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The island's public keys.
    pub fn keys(&self) -> &IslandKeys {
        &self.keys
    }

    /// The configuration in force.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// The newest seq stamped.
    pub fn last_seq(&self) -> Seq {
        Seq(self.last_seq)
    }

    /// Connections attached now, control connections included.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Ticks sent so far (each one to every live replica).
    pub fn ticks(&self) -> u64 {
        self.ticks
    }

    /// Entries and bytes in the history.
    pub fn history_len(&self) -> (usize, usize) {
        (self.history.len(), self.history_bytes)
    }

    /// True once the admin closed the island: every member has been told (goodbyes are among the
    /// outputs) and joins are refused; the driver flushes the outputs and drops the session.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// True while a session re-created from its replicas holds their joins (see
    /// [`SessionConfig::gather_timeout`]).
    pub fn is_gathering(&self) -> bool {
        self.gathering.is_some()
    }

    /// True once the session has been empty for its linger time: the driver drops it.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.members.is_empty()
            && self.gathering.as_ref().is_none_or(|g| g.is_empty())
            && self
                .empty_since
                .is_some_and(|since| now >= since + self.cfg.linger)
    }

    /// The next thing the driver should do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if self.members.values().any(Member::is_live) {
            consider(self.last_activity + self.cfg.tick_interval);
        }
        if let Some(due) = self.idle_due.filter(|_| !self.members.is_empty()) {
            consider(due);
        }
        if let Some(p) = &self.pending {
            consider(p.asked_at + self.cfg.snapshot_timeout);
        }
        if let (true, Some(since)) = (self.members.is_empty(), self.empty_since) {
            consider(since + self.cfg.linger);
        }
        if let Some(due) = self
            .gathering
            .as_ref()
            .and_then(|g| g.deadline(self.cfg.gather_timeout))
        {
            consider(due);
        }
        next
    }

    /// Attaches a replica whose hello the dispatcher has verified.
    ///
    /// The whole join is checked before anything changes: a refused hello leaves an existing
    /// connection of the same replica in place. Only an accepted one replaces it (code 1007).
    pub fn handle_join(&mut self, conn: ConnId, mut req: JoinRequest, now: Instant) {
        if self.gathering.is_none() && self.starts_gathering(&req) {
            self.gathering = Some(gather::Gathering::default());
        }
        if self.gathering.is_some() {
            return self.hold(conn, req, now);
        }
        self.ever_joined = true;
        if self.beyond_the_order(&req) {
            req.resume_from = None;
        }
        if let Err((code, reason)) = self.check_join(conn, &req) {
            return self.refuse(conn, req.replica, code, reason);
        }
        if req.control {
            return self.join_control(conn, req, now);
        }
        if let Some(&old) = self.by_replica.get(&req.replica) {
            self.doom(
                old,
                Code::REPLACED,
                "the same replica connected again",
                false,
            );
            self.reap(now);
        }
        // The replaced connection is gone now; the plan checked above excluded it already, so
        // this agrees with it unless its leaving changed the session (e.g. a stamped leave).
        let plan = match self.plan_sync(conn, None, req.resume_from) {
            Ok(plan) => plan,
            Err((code, reason)) => return self.refuse(conn, req.replica, code, reason),
        };
        let welcome = self.welcome(&req, now);
        let resumed = matches!(plan, Plan::Resume(_));
        self.insert_member(conn, &req, SyncState::AwaitingSnapshot, now);
        if let Some(m) = self.members.get_mut(&conn) {
            m.resumed = resumed;
        }
        self.by_replica.insert(req.replica, conn);
        self.send_to(conn, wire::encode(&ServerFrame::Welcome(welcome)));
        self.announce_presence(conn, &req);
        self.start_sync(conn, plan, now);
        self.out.push_back(Output::Notice(Notice::Joined {
            replica: req.replica,
            name: req.name.clone(),
            conn,
            resumed,
        }));
        if self.cfg.announce_membership {
            let event = RouterEvent::Joined {
                replica: req.replica,
                name: req.name,
            };
            self.stamp(Origin::Router, 0, router_event_payload(&event), now);
        }
        self.pump(conn);
        self.reap(now);
    }

    /// Everything that may refuse a join, checked without changing anything.
    fn check_join(&self, conn: ConnId, req: &JoinRequest) -> Result<(), (Code, String)> {
        if self.closed {
            return Err((Code::CLOSED, "the island was closed by its admin".into()));
        }
        check_request(req)?;
        // A control connection replaces nobody; a replica's new connection replaces its old one.
        let replaced = (!req.control)
            .then(|| self.by_replica.get(&req.replica).copied())
            .flatten();
        let attached = self.members.len() - usize::from(replaced.is_some());
        if attached >= self.cfg.max_members {
            return Err((
                Code::BUSY,
                format!(
                    "the session has its maximum of {} replicas",
                    self.cfg.max_members
                ),
            ));
        }
        if !req.control {
            self.plan_sync(conn, replaced, req.resume_from)?;
        }
        Ok(())
    }

    fn welcome(&mut self, req: &JoinRequest, now: Instant) -> Welcome {
        if self.founded.is_some() && self.welcomed_here.len() < self.cfg.max_remembered_replicas {
            self.welcomed_here.insert(req.replica);
        }
        Welcome {
            session: self.id,
            replica: req.replica,
            created: req.created,
            last_seq: Seq(self.last_seq),
            time: RouterTime(self.router_time(now)),
            tick_interval_us: self.cfg.tick_interval.as_micros() as u64,
            last_client_seq: self.client_seqs.get(&req.replica).map_or(0, |e| e.last),
            max_payload_bytes: self.cfg.max_payload_bytes as u32,
            contacts: req.contacts.clone(),
            incarnation: self.cfg.incarnation,
            epoch: self.epoch,
            cluster: req
                .cluster
                .iter()
                .take(wire::MAX_CLUSTER_CONTACTS)
                .cloned()
                .collect(),
        }
    }

    fn insert_member(&mut self, conn: ConnId, req: &JoinRequest, state: SyncState, now: Instant) {
        self.members.insert(
            conn,
            Member {
                replica: req.replica,
                name: req.name.clone(),
                role: req.role,
                state,
                unflushed: 0,
                last_heard: now,
                doomed: None,
                nonce: req.nonce,
                admin_seq: 0,
                joined_at: now,
                resumed: false,
                late: false,
            },
        );
        self.empty_since = None;
        let due = now + self.cfg.idle_timeout;
        self.idle_due = Some(self.idle_due.map_or(due, |d| d.min(due)));
    }

    /// An admin's control connection: welcomed and then left alone. It is not in `by_replica`
    /// (it replaces nobody and cannot be kicked by replica id) and its joining is not stamped.
    fn join_control(&mut self, conn: ConnId, req: JoinRequest, now: Instant) {
        let welcome = self.welcome(&req, now);
        self.insert_member(conn, &req, SyncState::Control, now);
        self.send_to(conn, wire::encode(&ServerFrame::Welcome(welcome)));
        self.out.push_back(Output::Notice(Notice::Joined {
            replica: req.replica,
            name: req.name.clone(),
            conn,
            resumed: false,
        }));
        self.reap(now);
    }

    /// A frame from an attached replica.
    pub fn handle_frame(&mut self, conn: ConnId, frame: wire::ClientFrame, now: Instant) {
        if self.gathering.as_ref().is_some_and(|g| g.holds(conn)) {
            return self.held_frame(conn, frame, now);
        }
        let Some(m) = self.members.get_mut(&conn) else {
            return;
        };
        if m.doomed.is_some() {
            return;
        }
        m.last_heard = now;
        let replica = m.replica;
        let role = m.role;
        let control = matches!(m.state, SyncState::Control);
        match frame {
            wire::ClientFrame::Hello(_) => {
                self.doom(conn, Code::PROTOCOL_VIOLATION, "second hello", false)
            }
            wire::ClientFrame::Ping { nonce } => {
                self.send_to(conn, wire::encode(&ServerFrame::Pong { nonce }));
            }
            wire::ClientFrame::Pong { .. } => {}
            // Only a session being re-created from its replicas needs a duplicate table.
            wire::ClientFrame::Seen { .. } => {}
            wire::ClientFrame::Leave => self.remove_member(conn, None, false, now),
            wire::ClientFrame::Admin { seq, command, sig } => {
                self.on_admin(conn, seq, command, &sig, now)
            }
            wire::ClientFrame::Send { .. }
            | wire::ClientFrame::SnapshotChunk { .. }
            | wire::ClientFrame::Digest { .. }
                if control =>
            {
                self.doom(
                    conn,
                    Code::PROTOCOL_VIOLATION,
                    "a control connection carries only admin commands and pings",
                    false,
                )
            }
            wire::ClientFrame::Send {
                client_seq,
                payload,
            } => {
                if !role.may_send() {
                    self.doom(conn, Code::NOT_PERMITTED, "observers cannot send", false);
                } else if payload.len() > self.cfg.max_payload_bytes {
                    let reason = format!(
                        "payload of {} bytes exceeds the limit of {}",
                        payload.len(),
                        self.cfg.max_payload_bytes
                    );
                    self.doom(conn, Code::PAYLOAD_TOO_LARGE, reason, false);
                } else if let Err(last) = self.accept_client_seq(replica, client_seq) {
                    // An honest replica resends only what Welcome and Synced did not confirm,
                    // so a repeat is a bug or an attack, never something to drop silently.
                    let reason = format!(
                        "client seq {client_seq} is not above {last}, the highest already seen \
                         from this replica (client seqs count from 1)"
                    );
                    self.doom(conn, Code::PROTOCOL_VIOLATION, reason, false);
                } else {
                    self.stamp(Origin::Replica(replica), client_seq, payload, now);
                }
            }
            wire::ClientFrame::SnapshotChunk {
                request,
                at,
                offset,
                total,
                data,
            } => self.on_snapshot_chunk(conn, request, at.0, offset, total, data, now),
            wire::ClientFrame::Digest { seq, hash } => {
                if hash.len() > MAX_DIGEST_BYTES {
                    self.doom(conn, Code::PROTOCOL_VIOLATION, "digest too long", false);
                } else {
                    self.on_digest(replica, seq.0, hash);
                }
            }
        }
        self.reap(now);
    }

    /// An admin command: only from the admin role, in increasing seq order on the connection,
    /// signed with the admin key over the connection's nonce.
    fn on_admin(
        &mut self,
        conn: ConnId,
        seq: u64,
        command: AdminCommand,
        sig: &Signature,
        now: Instant,
    ) {
        let Some(m) = self.members.get(&conn) else {
            return;
        };
        if m.role != Role::Admin {
            let reason = format!(
                "only the island's admin may send admin commands; this connection joined as {}",
                auth::role_name(m.role)
            );
            return self.doom(conn, Code::NOT_PERMITTED, reason, false);
        }
        if seq <= m.admin_seq {
            let reason = format!(
                "admin command seq {seq} is not above {}, the previous one on this connection",
                m.admin_seq
            );
            return self.doom(conn, Code::PROTOCOL_VIOLATION, reason, false);
        }
        if let Err(e) = auth::verify_admin(&self.keys, &m.nonce, self.id, seq, &command, sig) {
            return self.doom(conn, Code::BAD_CREDENTIALS, e.to_string(), false);
        }
        if let Some(m) = self.members.get_mut(&conn) {
            m.admin_seq = seq;
        }
        let done =
            |ok: bool, message: String| wire::encode(&ServerFrame::AdminDone { seq, ok, message });
        match command {
            AdminCommand::SetTick { ms } => {
                let interval = Duration::from_millis(u64::from(ms));
                let (min, max) = (self.cfg.min_tick_interval, MAX_TICK_INTERVAL);
                let answer = if interval < min || interval > max {
                    done(
                        false,
                        format!(
                            "a tick interval of {ms} ms is outside the allowed {} to {} ms",
                            min.as_millis(),
                            max.as_millis()
                        ),
                    )
                } else {
                    self.cfg.tick_interval = interval;
                    done(true, format!("ticks now come after {ms} idle ms"))
                };
                self.send_to(conn, answer);
            }
            AdminCommand::Kick { replica } => match self.by_replica.get(&replica).copied() {
                Some(target) => {
                    self.send_to(conn, done(true, format!("replica {replica} was removed")));
                    self.doom(target, Code::KICKED, "removed by the island's admin", false);
                }
                None => {
                    let message = format!("no replica {replica} is attached to this island");
                    self.send_to(conn, done(false, message));
                }
            },
            AdminCommand::Close => {
                self.send_to(conn, done(true, "the island is closed".into()));
                self.closed = true;
                let conns: Vec<ConnId> = self.members.keys().copied().collect();
                for c in conns {
                    self.doom(c, Code::CLOSED, "the island was closed by its admin", false);
                }
                // Nothing is kept for a closed island.
                self.drop_history_and_snapshots();
            }
        }
        self.reap(now);
    }

    /// The driver wrote `bytes` of what it was given for `conn`.
    pub fn handle_flushed(&mut self, conn: ConnId, bytes: usize, now: Instant) {
        if let Some(m) = self.members.get_mut(&conn) {
            m.unflushed = m.unflushed.saturating_sub(bytes);
            self.pump(conn);
            self.reap(now);
        }
    }

    /// The connection is gone (closed by the peer, or an I/O error).
    pub fn handle_disconnect(&mut self, conn: ConnId, now: Instant) {
        if self.gathering.as_ref().is_some_and(|g| g.holds(conn)) {
            self.release_held(conn, None);
            return self.after_held_change(now);
        }
        if self.members.contains_key(&conn) {
            self.remove_member(conn, None, true, now);
            self.reap(now);
        }
    }

    /// Ticks, idle timeouts and snapshot timeouts that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.try_finish_gathering(now);
        if now >= self.last_activity + self.cfg.tick_interval
            && self.members.values().any(Member::is_live)
        {
            let time = RouterTime(self.router_time(now));
            let frame = self.cfg.framing.tick(time);
            self.ticks += 1;
            self.last_activity = now;
            self.broadcast_live(&frame);
        }
        let idle: Vec<ConnId> = self
            .members
            .iter()
            .filter(|(_, m)| now >= m.last_heard + self.cfg.idle_timeout)
            .map(|(c, _)| *c)
            .collect();
        // The next time anyone can be idle, from the oldest time heard among the others.
        // Members are only ever heard later, so this is never later than the truth: at worst a
        // timeout comes early and finds nobody idle.
        self.idle_due = self
            .members
            .iter()
            .filter(|(c, _)| !idle.contains(c))
            .map(|(_, m)| m.last_heard)
            .min()
            .map(|oldest| oldest + self.cfg.idle_timeout);
        for conn in idle {
            let reason = format!("nothing heard for {:?}", self.cfg.idle_timeout);
            self.doom(conn, Code::IDLE_TIMEOUT, reason, true);
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| now >= p.asked_at + self.cfg.snapshot_timeout)
        {
            self.abandon_upload(now);
        }
        self.reap(now);
    }

    /// Stamps a message the router itself makes (`Origin::Router`, client seq 0) into the
    /// order, like any other: the Croquet adapter's "users" and vote "tally" messages. The
    /// payload is whatever the session's framing expects. Returns the seq it got.
    pub fn stamp_router(&mut self, payload: Bytes, now: Instant) -> Seq {
        self.stamp(Origin::Router, 0, payload, now);
        self.reap(now);
        Seq(self.last_seq)
    }

    /// Stores a snapshot taken after message `at` that came from outside (see
    /// `SessionConfig::external_snapshots`; `data` is what joiners are sent before the backlog)
    /// and cuts the history before it, as a provided snapshot would. Refused when the history
    /// no longer reaches back to `at`, when `at` is not stamped yet, or when the memory budget
    /// has no room.
    pub fn store_snapshot(&mut self, at: Seq, data: Bytes, now: Instant) -> Result<(), String> {
        let Seq(at) = at;
        if at > self.last_seq {
            return Err(format!(
                "a snapshot after seq {at} is ahead of the session (at {})",
                self.last_seq
            ));
        }
        if at + 1 < self.history_first {
            return Err(format!(
                "a snapshot after seq {at} is older than the history kept (from {})",
                self.history_first
            ));
        }
        let frames = snapshot_frames(&data, self.cfg.relay_piece_bytes());
        let kept = frames.iter().map(Bytes::len).sum();
        if !self.cfg.budget.try_reserve(kept) {
            return Err(BUDGET_EXHAUSTED.into());
        }
        self.out.push_back(Output::Notice(Notice::SnapshotStored {
            at: Seq(at),
            bytes: data.len(),
            // The client uploaded it elsewhere (the file store); the core did not wait.
            took: Duration::ZERO,
        }));
        self.set_snapshot(Some(Snapshot {
            at,
            len: data.len() as u64,
            frames: frames.into(),
            kept,
        }));
        self.wanted_at = None;
        self.cut_history(at + 1);
        self.reap(now);
        Ok(())
    }

    /// Sets the idle time before a tick, within the router's floor and [`MAX_TICK_INTERVAL`]
    /// (the Croquet adapter's `TICKS`; native islands change it with a signed admin command).
    pub fn set_tick_interval(&mut self, interval: Duration) {
        self.cfg.tick_interval = interval.clamp(self.cfg.min_tick_interval, MAX_TICK_INTERVAL);
    }

    /// The router time at `now`, without moving it: what a frame made now would carry.
    pub fn time(&self, now: Instant) -> RouterTime {
        let elapsed = now.saturating_duration_since(self.start).as_micros() as u64;
        RouterTime(self.last_time.max(self.time_base.saturating_add(elapsed)))
    }

    /// Closes one connection with a reason, e.g. when its bytes did not decode.
    pub fn disconnect(&mut self, conn: ConnId, code: Code, reason: &str, now: Instant) {
        if self.gathering.as_ref().is_some_and(|g| g.holds(conn)) {
            self.release_held(conn, Some((code, reason.to_string())));
            return self.after_held_change(now);
        }
        self.doom(conn, code, reason, false);
        self.reap(now);
    }

    /// Says goodbye to every replica, e.g. when the router shuts down.
    pub fn shutdown(&mut self, code: Code, reason: &str, now: Instant) {
        for conn in self
            .gathering
            .as_ref()
            .map(|g| g.conns())
            .unwrap_or_default()
        {
            self.release_held(conn, Some((code, reason.to_string())));
        }
        let conns: Vec<ConnId> = self.members.keys().copied().collect();
        for conn in conns {
            self.doom(conn, code, reason, false);
        }
        self.reap(now);
    }

    // ---- joining -------------------------------------------------------------------------

    /// How a joiner on `conn` would be synced; `replaced` is a connection that will be gone by
    /// then (the same replica's old one), so it cannot be the snapshot provider.
    fn plan_sync(
        &self,
        conn: ConnId,
        replaced: Option<ConnId>,
        resume_from: Option<Seq>,
    ) -> Result<Plan, (Code, String)> {
        if let Some(Seq(n)) = resume_from {
            if n > self.last_seq {
                return Err((
                    Code::SESSION_RESET,
                    format!(
                        "this session never reached seq {n} (it is at {}); the session you knew is gone",
                        self.last_seq
                    ),
                ));
            }
            if n + 1 >= self.history_first {
                return Ok(Plan::Resume(n + 1));
            }
        }
        if self.last_seq == 0 && self.snapshot.is_none() {
            return Ok(Plan::Fresh);
        }
        if !self.cfg.external_snapshots && self.has_provider(&[Some(conn), replaced]) {
            return Ok(Plan::AwaitSnapshot);
        }
        if let Some(snap) = self.usable_snapshot() {
            return Ok(Plan::Stored(snap));
        }
        if self.history_first == 1 {
            return Ok(Plan::Fresh);
        }
        Err((
            Code::NO_SNAPSHOT,
            "no replica can provide a snapshot right now; try again shortly".into(),
        ))
    }

    fn start_sync(&mut self, conn: ConnId, plan: Plan, now: Instant) {
        let late = match plan {
            Plan::Resume(_) => false,
            Plan::Fresh => self.last_seq > 0,
            Plan::Stored(_) | Plan::AwaitSnapshot => true,
        };
        if let Some(m) = self.members.get_mut(&conn) {
            m.late = late;
        }
        let state = match plan {
            Plan::Resume(next) => SyncState::Backlog { next },
            Plan::Fresh => self.begin_fresh(conn),
            Plan::Stored(snap) => self.begin_snapshot_send(conn, snap),
            Plan::AwaitSnapshot => match &self.pending {
                // An upload under way: join its stream from the first piece.
                Some(p) if p.total.is_some() => self.begin_stream(conn),
                Some(_) => SyncState::AwaitingSnapshot,
                None => {
                    if !self.request_snapshot(now) {
                        // has_provider said yes a moment ago, so this cannot happen; be safe.
                        self.doom(conn, Code::NO_SNAPSHOT, "no snapshot provider", false);
                    }
                    SyncState::AwaitingSnapshot
                }
            },
        };
        if let Some(m) = self.members.get_mut(&conn) {
            m.state = state;
        }
    }

    fn begin_snapshot_send(&mut self, conn: ConnId, snap: Snapshot) -> SyncState {
        self.send_to(
            conn,
            wire::encode(&ServerFrame::SyncBegin {
                at: Seq(snap.at),
                snapshot_len: Some(snap.len),
            }),
        );
        SyncState::SendingSnapshot { snap, next: 0 }
    }

    /// Starts a joiner on the upload under way, whose size is known (its first piece came).
    fn begin_stream(&mut self, conn: ConnId) -> SyncState {
        let Some((at, total)) = self.pending.as_ref().and_then(|p| Some((p.at, p.total?))) else {
            return SyncState::AwaitingSnapshot;
        };
        self.send_to(
            conn,
            wire::encode(&ServerFrame::SyncBegin {
                at: Seq(at),
                snapshot_len: Some(total),
            }),
        );
        SyncState::Streaming { next: 0 }
    }

    /// Starts a replica from the initial state and replays the whole order.
    fn begin_fresh(&mut self, conn: ConnId) -> SyncState {
        self.send_to(
            conn,
            wire::encode(&ServerFrame::SyncBegin {
                at: Seq(0),
                snapshot_len: None,
            }),
        );
        SyncState::Backlog { next: 1 }
    }

    fn usable_snapshot(&self) -> Option<Snapshot> {
        self.snapshot
            .as_ref()
            .filter(|s| s.at + 1 >= self.history_first)
            .cloned()
    }

    fn refuse(&mut self, conn: ConnId, replica: ReplicaId, code: Code, reason: impl Into<String>) {
        let frame = wire::encode(&ServerFrame::Refuse {
            code,
            reason: reason.into(),
        });
        self.out
            .push_back(Output::Notice(Notice::Refused { replica, code }));
        self.out.push_back(Output::Close {
            conn,
            goodbye: Some(frame),
            discard_queued: false,
        });
    }

    /// Feeds a syncing replica as much snapshot and backlog as its queue allows.
    fn pump(&mut self, conn: ConnId) {
        let pacing = self.cfg.pacing_bytes();
        loop {
            let Some(m) = self.members.get_mut(&conn) else {
                return;
            };
            if m.doomed.is_some() || m.unflushed >= pacing {
                return;
            }
            let frame = match &mut m.state {
                SyncState::AwaitingSnapshot | SyncState::Live | SyncState::Control => return,
                SyncState::Streaming { next } => {
                    // The rest comes as the provider uploads it (`on_snapshot_chunk` pumps).
                    match self.pending.as_ref().and_then(|p| p.frames.get(*next)) {
                        Some(frame) => {
                            *next += 1;
                            frame.clone()
                        }
                        None => return,
                    }
                }
                SyncState::SendingSnapshot { snap, next } => match snap.frames.get(*next) {
                    Some(frame) => {
                        *next += 1;
                        frame.clone()
                    }
                    None => {
                        m.state = SyncState::Backlog { next: snap.at + 1 };
                        continue;
                    }
                },
                SyncState::Backlog { next } => {
                    if *next > self.last_seq {
                        m.state = SyncState::Live;
                        self.synced.push(conn);
                        let last_client_seq =
                            self.client_seqs.get(&m.replica).map_or(0, |e| e.last);
                        wire::encode(&ServerFrame::Synced {
                            seq: Seq(self.last_seq),
                            last_client_seq,
                        })
                    } else if *next < self.history_first {
                        m.doomed = Some((
                            Code::FELL_BEHIND,
                            "the messages this replica needs are no longer kept".into(),
                            true,
                        ));
                        self.any_doomed = true;
                        return;
                    } else {
                        let index = (*next - self.history_first) as usize;
                        *next += 1;
                        self.history[index].clone()
                    }
                }
            };
            self.send_to(conn, frame);
        }
    }

    // ---- ordering ------------------------------------------------------------------------

    fn router_time(&mut self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_micros() as u64;
        self.last_time = self.last_time.max(self.time_base.saturating_add(elapsed));
        self.last_time
    }

    /// Records a send's client seq, or returns the highest seen so far when it is not above it.
    fn accept_client_seq(&mut self, replica: ReplicaId, client_seq: u64) -> Result<(), u64> {
        if let Some(entry) = self.client_seqs.get_mut(&replica) {
            if client_seq <= entry.last {
                return Err(entry.last);
            }
            entry.last = client_seq;
            entry.at_seq = self.last_seq + 1;
            return Ok(());
        }
        if client_seq == 0 {
            return Err(0);
        }
        if self.client_seqs.len() >= self.cfg.max_remembered_replicas {
            let evict = self
                .client_seqs
                .iter()
                .filter(|(r, _)| !self.by_replica.contains_key(r))
                .min_by_key(|(_, e)| e.at_seq)
                .map(|(r, _)| *r);
            if let Some(r) = evict {
                self.client_seqs.remove(&r);
            }
        }
        self.client_seqs.insert(
            replica,
            ClientSeqEntry {
                last: client_seq,
                at_seq: self.last_seq + 1,
            },
        );
        Ok(())
    }

    fn stamp(&mut self, origin: Origin, client_seq: u64, payload: Bytes, now: Instant) {
        let seq = self.last_seq + 1;
        let time = RouterTime(self.router_time(now));
        let frame = self.cfg.framing.message(&Message {
            seq: Seq(seq),
            time,
            origin,
            client_seq,
            payload,
        });
        self.last_seq = seq;
        self.last_activity = now;
        self.keep(frame.clone(), now);
        self.broadcast_live(&frame);
        self.bound_history(now);
    }

    /// Keeps the newest stamped frame in the history if the shared budget allows. If not, this
    /// session gives up its own oldest entries first; with nothing of its own left to give, the
    /// message is delivered live but not kept, and joiners need a snapshot from after it.
    fn keep(&mut self, frame: Bytes, now: Instant) {
        let len = frame.len();
        let mut cut = false;
        let kept = loop {
            if self.cfg.budget.try_reserve(len) {
                break true;
            }
            if !self.pop_history() {
                break false;
            }
            cut = true;
            if self.usable_snapshot().is_none() {
                self.set_snapshot(None);
            }
        };
        if kept {
            self.history_bytes += len;
            self.history.push_back(frame);
        } else {
            self.history_first = self.last_seq + 1;
            cut = true;
        }
        if cut {
            self.after_cut(now);
        }
    }

    fn broadcast_live(&mut self, frame: &Bytes) {
        // One pass over the members, no lookup per recipient: this runs for every message.
        let max = self.cfg.max_outbound_bytes;
        for (&conn, m) in self.members.iter_mut() {
            if m.is_live() {
                self.any_doomed |= !queue_to(m, conn, frame.clone(), max, &mut self.out);
            }
        }
    }

    /// Queues a frame to a member, or dooms it as a slow consumer if that would pass its bound.
    fn send_to(&mut self, conn: ConnId, frame: Bytes) {
        let Some(m) = self.members.get_mut(&conn) else {
            return;
        };
        if m.doomed.is_none() {
            let max = self.cfg.max_outbound_bytes;
            self.any_doomed |= !queue_to(m, conn, frame, max, &mut self.out);
        }
    }

    // ---- history and snapshots -----------------------------------------------------------

    fn bound_history(&mut self, now: Instant) {
        let wants_snapshot = self.history.len() * 10 >= self.cfg.max_history_messages * 6
            || self.history_bytes * 10 >= self.cfg.max_history_bytes * 6
            || (self.cfg.budget.under_pressure()
                && self.history_bytes >= PRESSURE_SNAPSHOT_MIN_HISTORY_BYTES);
        if wants_snapshot && self.cfg.external_snapshots {
            let step = (self.cfg.max_history_messages / 100).max(1);
            let len = self.history.len();
            if self.wanted_at.is_none_or(|at| len >= at + step) {
                self.wanted_at = Some(len);
                self.out
                    .push_back(Output::Notice(Notice::SnapshotWanted { messages: len }));
            }
        } else if wants_snapshot && self.pending.is_none() {
            self.request_snapshot(now);
        }
        let mut dropped = false;
        while self.history.len() > self.cfg.max_history_messages
            || self.history_bytes > self.cfg.max_history_bytes
        {
            if !self.pop_history() {
                break;
            }
            dropped = true;
        }
        if dropped {
            self.after_cut(now);
        }
    }

    /// The history lost entries from its front: whatever depended on them cannot complete.
    /// Joiners still syncing from an older point must start over, and a stale stored or pending
    /// snapshot is useless.
    fn after_cut(&mut self, now: Instant) {
        if self.usable_snapshot().is_none() {
            self.set_snapshot(None);
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.at + 1 < self.history_first)
        {
            self.abandon_upload(now);
        }
        let first = self.history_first;
        for m in self.members.values_mut() {
            let needs = match &m.state {
                SyncState::Backlog { next } => *next,
                SyncState::SendingSnapshot { snap, .. } => snap.at + 1,
                // A streamed upload is abandoned as a whole, above.
                _ => continue,
            };
            if needs < first && m.doomed.is_none() {
                m.doomed = Some((
                    Code::FELL_BEHIND,
                    "the messages this replica needs are no longer kept".into(),
                    true,
                ));
                self.any_doomed = true;
            }
        }
    }

    // ---- the memory budget: every kept byte is reserved first and released when dropped ----

    /// Drops the oldest history entry; false when the history is empty.
    fn pop_history(&mut self) -> bool {
        let Some(frame) = self.history.pop_front() else {
            return false;
        };
        self.history_bytes -= frame.len();
        self.history_first += 1;
        self.cfg.budget.release(frame.len());
        true
    }

    /// Replaces the stored snapshot; a new one's bytes are already reserved (as the upload).
    fn set_snapshot(&mut self, snap: Option<Snapshot>) {
        if let Some(old) = std::mem::replace(&mut self.snapshot, snap) {
            self.cfg.budget.release(old.kept);
        }
    }

    /// Forgets the snapshot being uploaded, if any. Joiners that were streaming it wait for the
    /// next snapshot again: they get a new `SyncBegin`, which starts their sync over (a replica
    /// drops a partial snapshot when a `SyncBegin` comes), or are closed with a retryable code.
    fn drop_pending(&mut self) {
        if let Some(p) = self.pending.take() {
            self.cfg.budget.release(p.kept);
            for m in self.members.values_mut() {
                if matches!(m.state, SyncState::Streaming { .. }) {
                    m.state = SyncState::AwaitingSnapshot;
                }
            }
        }
    }

    /// The upload under way is lost (its provider left, timed out or broke the protocol, or it
    /// became too old): ask another provider, or serve its joiners another way.
    fn abandon_upload(&mut self, now: Instant) {
        self.drop_pending();
        self.renew_snapshot_request(now);
    }

    /// Gives back everything this session keeps.
    fn drop_history_and_snapshots(&mut self) {
        while self.pop_history() {}
        self.history_first = self.last_seq + 1;
        self.set_snapshot(None);
        self.drop_pending();
    }

    fn has_provider(&self, except: &[Option<ConnId>]) -> bool {
        self.members
            .iter()
            .any(|(c, m)| !except.contains(&Some(*c)) && m.may_provide())
    }

    /// Asks the next live replica, in turn, for a snapshot at the current seq.
    fn request_snapshot(&mut self, now: Instant) -> bool {
        let providers: Vec<ConnId> = self
            .members
            .iter()
            .filter(|(_, m)| m.may_provide())
            .map(|(c, _)| *c)
            .collect();
        if providers.is_empty() {
            return false;
        }
        self.drop_pending();
        let provider = providers[self.provider_cursor % providers.len()];
        self.provider_cursor = self.provider_cursor.wrapping_add(1);
        let at = self.last_seq;
        let request = self.next_request;
        self.next_request += 1;
        self.send_to(
            provider,
            wire::encode(&ServerFrame::SnapshotRequest {
                request,
                at: Seq(at),
            }),
        );
        self.pending = Some(PendingSnapshot {
            request,
            provider,
            at,
            asked_at: now,
            total: None,
            received: 0,
            frames: Vec::new(),
            kept: 0,
        });
        true
    }

    fn awaiting_snapshot(&self) -> Vec<ConnId> {
        self.members
            .iter()
            .filter(|(_, m)| matches!(m.state, SyncState::AwaitingSnapshot) && m.doomed.is_none())
            .map(|(c, _)| *c)
            .collect()
    }

    /// The pending snapshot was lost: ask someone else, or serve waiting joiners another way.
    fn renew_snapshot_request(&mut self, now: Instant) {
        let waiting = self.awaiting_snapshot();
        if waiting.is_empty() || self.request_snapshot(now) {
            return;
        }
        self.serve_waiting(
            waiting,
            Code::NO_SNAPSHOT,
            "the replica providing the snapshot left and no other can; try again",
        );
    }

    /// Syncs joiners waiting for a snapshot that will not come from a stored snapshot or from
    /// the start of the order if either can serve them, or closes them with `code`.
    fn serve_waiting(&mut self, waiting: Vec<ConnId>, code: Code, reason: &str) {
        for conn in waiting {
            let state = if let Some(snap) = self.usable_snapshot() {
                self.begin_snapshot_send(conn, snap)
            } else if self.history_first == 1 {
                self.begin_fresh(conn)
            } else {
                self.doom(conn, code, reason, false);
                continue;
            };
            if let Some(m) = self.members.get_mut(&conn) {
                m.state = state;
            }
            self.pump(conn);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_snapshot_chunk(
        &mut self,
        conn: ConnId,
        request: u64,
        at: u64,
        offset: u64,
        total: u64,
        data: Bytes,
        now: Instant,
    ) {
        let max = self.cfg.max_snapshot_bytes as u64;
        let Some(p) = self.pending.as_ref() else {
            return; // a late piece of a request that was given up on
        };
        if p.request != request || p.provider != conn {
            return;
        }
        let problem = if p.at != at {
            Some("snapshot piece for the wrong seq".to_string())
        } else if total > max {
            Some(format!(
                "snapshot of {total} bytes exceeds the limit of {max}"
            ))
        } else if p.total.is_some_and(|t| t != total) {
            Some("snapshot size changed between pieces".to_string())
        } else if offset != p.received {
            Some(format!(
                "snapshot piece at offset {offset}, expected {}",
                p.received
            ))
        } else if offset + data.len() as u64 > total {
            Some("snapshot piece runs past the announced size".to_string())
        } else {
            None
        };
        if let Some(reason) = problem {
            self.doom(conn, Code::PROTOCOL_VIOLATION, reason, false);
            self.abandon_upload(now);
            return;
        }
        // Each piece is encoded once, split to the relay size, and shared by every joiner now
        // and later; what is kept is reserved first.
        let frames = snapshot_frames(&data, self.cfg.relay_piece_bytes());
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        if !self.cfg.budget.try_reserve(bytes) {
            // The upload does not fit the router's memory: abandon it (later pieces are ignored
            // by request id) and serve its joiners, streaming ones included, another way.
            self.drop_pending();
            let waiting = self.awaiting_snapshot();
            self.serve_waiting(waiting, Code::BUSY, BUDGET_EXHAUSTED);
            return;
        }
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        let first = p.total.is_none();
        p.total = Some(total);
        p.received += data.len() as u64;
        p.kept += bytes;
        p.frames.extend(frames);
        let complete = p.received == total;
        if first {
            // Joiners waiting for this upload start on it now, from its first piece.
            for conn in self.awaiting_snapshot() {
                let state = self.begin_stream(conn);
                if let Some(m) = self.members.get_mut(&conn) {
                    m.state = state;
                }
            }
        }
        if complete {
            self.store_upload(now);
        }
        for conn in self.syncing_from_snapshot() {
            self.pump(conn);
        }
    }

    /// The upload under way is complete: it becomes the stored snapshot, and its joiners go on
    /// from the same frame of it.
    fn store_upload(&mut self, now: Instant) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let snap = Snapshot {
            at: p.at,
            len: p.received,
            frames: p.frames.into(),
            kept: p.kept,
        };
        self.out.push_back(Output::Notice(Notice::SnapshotStored {
            at: Seq(snap.at),
            bytes: snap.len as usize,
            took: now.saturating_duration_since(p.asked_at),
        }));
        self.set_snapshot(Some(snap.clone()));
        for m in self.members.values_mut() {
            if let SyncState::Streaming { next } = m.state {
                m.state = SyncState::SendingSnapshot {
                    snap: snap.clone(),
                    next,
                };
            }
        }
        self.cut_history(snap.at + 1);
    }

    /// Members being sent a snapshot, streamed or stored.
    fn syncing_from_snapshot(&self) -> Vec<ConnId> {
        self.members
            .iter()
            .filter(|(_, m)| {
                matches!(
                    m.state,
                    SyncState::Streaming { .. } | SyncState::SendingSnapshot { .. }
                ) && m.doomed.is_none()
            })
            .map(|(c, _)| *c)
            .collect()
    }

    /// Drops history before `upto`, but never what a syncing replica still needs.
    fn cut_history(&mut self, upto: u64) {
        let needed = self
            .members
            .values()
            .filter_map(|m| match &m.state {
                SyncState::Backlog { next } => Some(*next),
                SyncState::SendingSnapshot { snap, .. } => Some(snap.at + 1),
                SyncState::Streaming { .. } => self.pending.as_ref().map(|p| p.at + 1),
                _ => None,
            })
            .chain(self.pending.as_ref().map(|p| p.at + 1))
            .min()
            .unwrap_or(u64::MAX);
        let cut = upto.min(needed);
        while self.history_first < cut {
            if !self.pop_history() {
                break;
            }
        }
    }

    // ---- digests -------------------------------------------------------------------------

    /// Records a digest; broadcasts a divergence when a report starts a new digest group at a
    /// seq, at most [`MAX_DIVERGENCE_REPORTS_PER_SEQ`] times per seq.
    fn on_digest(&mut self, replica: ReplicaId, seq: u64, hash: Bytes) {
        if seq == 0 || seq > self.last_seq {
            return;
        }
        if self.digests.len() >= self.cfg.digest_window
            && self
                .digests
                .first_key_value()
                .is_some_and(|(s, _)| seq < *s)
        {
            return;
        }
        // Reports per seq are bounded like the members: departed replicas' reports stay, and a
        // stream of new replica ids must not grow the list without end.
        let max_reports = self.cfg.max_members;
        let entry = self.digests.entry(seq).or_default();
        let mut divergence = None;
        if entry.reports.len() < max_reports && !entry.reports.iter().any(|(r, _)| *r == replica) {
            let new_group = !entry.reports.iter().any(|(_, h)| *h == hash);
            let diverged = new_group && !entry.reports.is_empty();
            entry.reports.push((replica, hash));
            if diverged && entry.broadcasts < MAX_DIVERGENCE_REPORTS_PER_SEQ {
                entry.broadcasts += 1;
                divergence = Some(Divergence {
                    seq: Seq(seq),
                    groups: digest_groups(&entry.reports),
                });
            }
        }
        while self.digests.len() > self.cfg.digest_window {
            self.digests.pop_first();
        }
        if let Some(d) = divergence {
            let frame = wire::encode(&ServerFrame::Divergence(d.clone()));
            self.broadcast_live(&frame);
            self.out.push_back(Output::Notice(Notice::Diverged(d)));
        }
    }

    // ---- leaving -------------------------------------------------------------------------

    fn doom(&mut self, conn: ConnId, code: Code, reason: impl Into<String>, discard: bool) {
        if let Some(m) = self.members.get_mut(&conn) {
            if m.doomed.is_none() {
                m.doomed = Some((code, reason.into(), discard));
                self.any_doomed = true;
            }
        }
    }

    /// Removes doomed members until none are left (a removal can doom others, e.g. a leave
    /// announcement that overflows another replica's queue).
    fn reap(&mut self, now: Instant) {
        // Most calls (one per inbound frame) find nothing doomed: skip the scan of every member.
        while std::mem::take(&mut self.any_doomed) {
            self.reap_doomed(now);
        }
        self.report_synced(now);
    }

    fn reap_doomed(&mut self, now: Instant) {
        while let Some((conn, (code, reason, discard))) = self
            .members
            .iter_mut()
            .find_map(|(c, m)| m.doomed.take().map(|d| (*c, d)))
        {
            self.remove_member(conn, Some((code, reason)), discard, now);
        }
    }

    fn report_synced(&mut self, now: Instant) {
        for conn in std::mem::take(&mut self.synced) {
            if let Some(m) = self.members.get(&conn) {
                self.out.push_back(Output::Notice(Notice::Synced {
                    replica: m.replica,
                    conn,
                    resumed: m.resumed,
                    late: m.late,
                    took: now.saturating_duration_since(m.joined_at),
                }));
            }
        }
    }

    fn remove_member(
        &mut self,
        conn: ConnId,
        goodbye: Option<(Code, String)>,
        discard_queued: bool,
        now: Instant,
    ) {
        let Some(m) = self.members.remove(&conn) else {
            return;
        };
        let control = matches!(m.state, SyncState::Control);
        if self.by_replica.get(&m.replica) == Some(&conn) {
            self.by_replica.remove(&m.replica);
        }
        let code = goodbye.as_ref().map(|(c, _)| *c);
        self.out.push_back(Output::Close {
            conn,
            goodbye: goodbye.map(|(code, reason)| wire::goodbye(code, reason)),
            discard_queued,
        });
        self.out.push_back(Output::Notice(Notice::Left {
            replica: m.replica,
            name: m.name.clone(),
            conn,
            code,
        }));
        if self.members.is_empty() {
            self.empty_since = Some(now);
        }
        if self.pending.as_ref().is_some_and(|p| p.provider == conn) {
            self.abandon_upload(now);
        }
        if !control && !self.closed {
            let frame = wire::encode(&ServerFrame::Presence {
                joined: Vec::new(),
                left: vec![m.replica],
            });
            self.send_to_present(None, &frame);
        }
        if self.cfg.announce_membership && !self.members.is_empty() && !control && !self.closed {
            let event = RouterEvent::Left { replica: m.replica };
            self.stamp(Origin::Router, 0, router_event_payload(&event), now);
        }
    }

    /// Tells a joiner who is here (itself included) and everyone else that it arrived.
    fn announce_presence(&mut self, conn: ConnId, req: &JoinRequest) {
        let everyone: Vec<wire::Present> = self
            .members
            .values()
            .filter(|m| !matches!(m.state, SyncState::Control) && m.doomed.is_none())
            .map(|m| wire::Present {
                replica: m.replica,
                name: m.name.clone(),
                role: m.role,
            })
            .collect();
        self.send_to(
            conn,
            wire::encode(&ServerFrame::Presence {
                joined: everyone,
                left: Vec::new(),
            }),
        );
        let arrived = wire::encode(&ServerFrame::Presence {
            joined: vec![wire::Present {
                replica: req.replica,
                name: req.name.clone(),
                role: req.role,
            }],
            left: Vec::new(),
        });
        self.send_to_present(Some(conn), &arrived);
    }

    /// Queues a presence frame to every attached replica (syncing ones too) except `except`
    /// and control connections.
    fn send_to_present(&mut self, except: Option<ConnId>, frame: &Bytes) {
        let to: Vec<ConnId> = self
            .members
            .iter()
            .filter(|(c, m)| {
                Some(**c) != except && !matches!(m.state, SyncState::Control) && m.doomed.is_none()
            })
            .map(|(c, _)| *c)
            .collect();
        for c in to {
            self.send_to(c, frame.clone());
        }
    }

    /// The replicas attached now, with their display names.
    pub fn members(&self) -> impl Iterator<Item = (ReplicaId, &str)> {
        self.members
            .values()
            .filter(|m| !matches!(m.state, SyncState::Control))
            .map(|m| (m.replica, m.name.as_str()))
    }
}

/// Queues `frame` to member `m` on `conn` unless that would pass its bound of `max` unwritten
/// bytes; then dooms it as a slow consumer instead and returns false.
fn queue_to(
    m: &mut Member,
    conn: ConnId,
    frame: Bytes,
    max: usize,
    out: &mut VecDeque<Output>,
) -> bool {
    if m.unflushed + frame.len() > max {
        let reason = format!("more than {max} bytes queued and not read; reconnect to resume");
        m.doomed = Some((Code::SLOW_CONSUMER, reason, true));
        return false;
    }
    m.unflushed += frame.len();
    out.push_back(Output::Transmit { conn, frame });
    true
}

/// A snapshot as the `SnapshotData` frames that relay it, pieces of at most `piece` bytes
/// (a zero-size snapshot is no frame at all: `SyncBegin` says it all).
fn snapshot_frames(data: &Bytes, piece: usize) -> Vec<Bytes> {
    data.chunks(piece.max(1))
        .map(|c| {
            wire::encode(&ServerFrame::SnapshotData {
                data: data.slice_ref(c),
            })
        })
        .collect()
}

/// The reports grouped by digest, largest group first.
fn digest_groups(reports: &[(ReplicaId, Bytes)]) -> Vec<DigestGroup> {
    let mut groups: Vec<DigestGroup> = Vec::new();
    for (r, h) in reports {
        match groups.iter_mut().find(|g| g.hash == *h) {
            Some(g) => g.replicas.push(*r),
            None => groups.push(DigestGroup {
                hash: h.clone(),
                replicas: vec![*r],
            }),
        }
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.replicas.len()));
    groups
}

impl Drop for Session {
    /// The shared budget outlives the session: give back what it kept.
    fn drop(&mut self) {
        self.drop_history_and_snapshots();
    }
}

enum Plan {
    Resume(u64),
    Fresh,
    Stored(Snapshot),
    AwaitSnapshot,
}

/// Encodes a router event as a message payload.
pub fn router_event_payload(event: &RouterEvent) -> Bytes {
    let framed = wire::encode(event);
    framed.slice(wire::LENGTH_PREFIX_LEN..)
}

/// Decodes the payload of a message whose origin is [`Origin::Router`].
pub fn parse_router_event(payload: &[u8]) -> Result<RouterEvent, wire::DecodeError> {
    wire::decode_body(payload)
}

/// What any join must satisfy, whatever the session's state (also while it gathers).
fn check_request(req: &JoinRequest) -> Result<(), (Code, String)> {
    if req.name.len() > wire::MAX_NAME_BYTES {
        return Err((
            Code::PROTOCOL_VIOLATION,
            format!(
                "name of {} bytes is longer than the limit of {}",
                req.name.len(),
                wire::MAX_NAME_BYTES
            ),
        ));
    }
    if req.control && req.role != Role::Admin {
        return Err((
            Code::PROTOCOL_VIOLATION,
            "only the island's admin may open a control connection".into(),
        ));
    }
    Ok(())
}
