//! The replica side of the protocol as a deterministic state machine: it turns router frames
//! into island updates and events, and sends into frames, without any I/O.

use crate::seal::{Sealer, SNAPSHOT_OVERHEAD, TAG_LEN};
use crate::Island;
use bytes::{Bytes, BytesMut};
use isthmus_contact::Postcard;
use isthmus_router::auth::{self, Capability, IslandKeys, KeyPair, NONCE_LEN};
use isthmus_router::ids::{ReplicaId, RouterTime, Seq, SessionId};
use isthmus_router::wire::{
    self, ClientFrame, Code, CreateOptions, Divergence, HelloBody, Message, Origin, Recover, Role,
    SeenEntry, ServerFrame,
};
use std::collections::{BTreeSet, VecDeque};

/// Pieces a snapshot is uploaded in; well under the router's frame limit.
pub const SNAPSHOT_UPLOAD_CHUNK: usize = 128 * 1024;
/// Sends waiting for their echo before `send` refuses more: the queue must be bounded, and a
/// replica this far ahead of its router should slow down.
pub const DEFAULT_MAX_PENDING_SENDS: usize = 10_000;
/// Report a state digest after every this many messages.
pub const DEFAULT_DIGEST_EVERY: u64 = 100;
/// Largest snapshot a replica accepts from the router: the router's default snapshot limit plus
/// what sealing adds. A bigger `SyncBegin` is a protocol error, so a hostile router cannot make a
/// replica buffer without bound.
pub const DEFAULT_MAX_SNAPSHOT_BYTES: usize =
    isthmus_router::session::DEFAULT_MAX_SNAPSHOT_BYTES + SNAPSHOT_OVERHEAD;

/// Senders whose last client seq a replica remembers to notice replays; past it the sender
/// seen longest ago is forgotten (the same one on every replica: the choice depends only on the
/// order).
pub const MAX_SENDERS_REMEMBERED: usize = 4096;

/// The highest client seq applied per sender, and the seq at which it was applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Seen(std::collections::BTreeMap<ReplicaId, (u64, u64)>);

impl Seen {
    /// True (and remembered) when `client_seq` is above the sender's last.
    fn admit(&mut self, origin: ReplicaId, client_seq: u64, seq: u64) -> bool {
        if self
            .0
            .get(&origin)
            .is_some_and(|(last, _)| client_seq <= *last)
        {
            return false;
        }
        if !self.0.contains_key(&origin) && self.0.len() >= MAX_SENDERS_REMEMBERED {
            if let Some(oldest) = self
                .0
                .iter()
                .min_by_key(|(r, (_, at))| (*at, **r))
                .map(|(r, _)| *r)
            {
                self.0.remove(&oldest);
            }
        }
        self.0.insert(origin, (client_seq, seq));
        true
    }

    /// A snapshot: the table, then the island's own bytes.
    fn wrap(&self, island: &[u8]) -> Vec<u8> {
        let table: Vec<(uuid::Uuid, u64, u64)> =
            self.0.iter().map(|(r, (c, s))| (r.0, *c, *s)).collect();
        let body =
            bincode::serde::encode_to_vec(&table, bincode::config::standard()).unwrap_or_default();
        let mut out = Vec::with_capacity(4 + body.len() + island.len());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(island);
        out
    }

    /// The table as the wire's `Seen` frame carries it.
    fn entries(&self) -> Vec<SeenEntry> {
        self.0
            .iter()
            .map(|(r, (client_seq, at))| SeenEntry {
                replica: *r,
                client_seq: *client_seq,
                at: Seq(*at),
            })
            .collect()
    }

    /// The highest client seq of `replica` applied.
    fn last_of(&self, replica: ReplicaId) -> u64 {
        self.0.get(&replica).map_or(0, |(c, _)| *c)
    }

    /// Splits a snapshot made by [`Seen::wrap`].
    fn unwrap(data: &[u8]) -> Result<(Seen, &[u8]), String> {
        let bad = || "the snapshot's sender table is damaged".to_string();
        let len = data
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(bad)?;
        let body = data.get(4..4 + len).ok_or_else(bad)?;
        let cfg = bincode::config::standard().with_limit::<{ 64 * MAX_SENDERS_REMEMBERED }>();
        let (table, used): (Vec<(uuid::Uuid, u64, u64)>, usize) =
            bincode::serde::decode_from_slice(body, cfg).map_err(|_| bad())?;
        if used != body.len() || table.len() > MAX_SENDERS_REMEMBERED {
            return Err(bad());
        }
        let seen = Seen(
            table
                .into_iter()
                .map(|(r, c, s)| (ReplicaId(r), (c, s)))
                .collect(),
        );
        Ok((seen, &data[4 + len..]))
    }
}

/// Replicas an application's presence list should remember at most (the command's chat does):
/// the router's default member cap, four times, so a hostile router cannot grow it without end.
pub const MAX_PRESENT: usize = 4 * isthmus_router::session::DEFAULT_MAX_MEMBERS;

/// Who this replica is and how it joins.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// The island's public keys; the session id is their hash.
    pub keys: IslandKeys,
    /// What this replica holds. Any capability at least as strong as participant joins as a
    /// participant ([`Role::Replica`]); an observer capability joins as an observer.
    pub capability: Capability,
    /// The replica's own key, random per process and kept across reconnects: its replica id is
    /// the hash of the public half, so nobody else can take the id over.
    pub key: KeyPair,
    /// Display name.
    pub name: String,
    /// Create the session on first contact (never on a reconnect).
    pub create: Option<CreateOptions>,
    /// Digest reporting period in messages (0: never).
    pub digest_every: u64,
    /// Bound on sends not yet echoed.
    pub max_pending_sends: usize,
    /// Largest (sealed) snapshot accepted from the router.
    pub max_snapshot_bytes: usize,
    /// Stop applying once this seq is applied and none of this replica's sends is waiting to
    /// be stamped (so sends made before stopping always make it into the order).
    pub stop_after: Option<Seq>,
}

impl ReplicaConfig {
    /// A replica of the island on `card`, with a fresh replica key and default limits.
    pub fn from_postcard(card: &Postcard, name: impl Into<String>) -> ReplicaConfig {
        ReplicaConfig {
            keys: card.keys,
            capability: card.capability,
            key: KeyPair::random(),
            name: name.into(),
            create: None,
            digest_every: DEFAULT_DIGEST_EVERY,
            max_pending_sends: DEFAULT_MAX_PENDING_SENDS,
            max_snapshot_bytes: DEFAULT_MAX_SNAPSHOT_BYTES,
            stop_after: None,
        }
    }

    /// The session: the hash of the keys.
    pub fn session(&self) -> SessionId {
        self.keys.session_id()
    }

    /// This replica's id, from its key.
    pub fn replica(&self) -> ReplicaId {
        auth::replica_id_for(&self.key.public())
    }

    /// The role it joins with: participant if the capability allows, else observer.
    pub fn role(&self) -> Role {
        if self.capability.derive(Role::Replica).is_some() {
            Role::Replica
        } else {
            Role::Observer
        }
    }

    /// The capability whose key signs the hello for [`ReplicaConfig::role`].
    fn role_capability(&self) -> Capability {
        self.capability
            .derive(self.role())
            .unwrap_or(self.capability)
    }
}

/// What the application sees, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The router accepted this replica (again).
    Welcomed {
        /// This connection created the session.
        created: bool,
        /// The router's contact points as it sees them for this replica.
        contacts: wire::Contacts,
    },
    /// The island state was replaced by a snapshot taken after `at`; messages from `at + 1`
    /// follow.
    Restored {
        /// Seq of the snapshot.
        at: Seq,
    },
    /// The island state was reset to its initial state; the whole order follows.
    StartedFresh,
    /// A message was applied to the island (its payload opened: what the island saw).
    Message(Message),
    /// A message that did not open with this island's key (sealed under another key, or changed
    /// on the way). It was not applied, but its seq counts, so every replica that holds the same
    /// key skips the same message and they stay in step.
    Undecryptable {
        /// Its place in the order.
        seq: Seq,
        /// Who the router says sent it.
        origin: Origin,
    },
    /// Island time moved on.
    Tick(RouterTime),
    /// Caught up: from here on messages are live.
    Synced {
        /// The last seq applied.
        seq: Seq,
    },
    /// Replicas disagree about the state at some seq.
    Divergence(Divergence),
    /// The connection dropped; the client is reconnecting.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// Reconnected and resumed (or resynced) without losing anything.
    Reconnected,
    /// Who arrived and who left, as the router says (outside the order). `whole` means this
    /// is everyone attached now (it follows a welcome): start the list afresh. Changes, not the
    /// whole list, so a chatty router cannot make each event big; an application keeps
    /// the list itself, bounded by [`MAX_PRESENT`].
    Presence {
        /// Start the list afresh with `joined`.
        whole: bool,
        /// Arrived: replica, display name, role.
        joined: Vec<(ReplicaId, String, Role)>,
        /// Left.
        left: Vec<ReplicaId>,
    },
    /// The connection is gone and the client waits `delay` before attempt number `attempt`.
    Reconnecting {
        /// Counts from 1 for each loss of the connection.
        attempt: u32,
        /// The pause before this attempt (with jitter).
        delay: std::time::Duration,
        /// Where it will try: the configured routers, then the cluster routers the last
        /// welcome named.
        routers: Vec<std::net::SocketAddr>,
    },
    /// No connection could be made within the client's give-up time; the client has stopped.
    GaveUp {
        /// The give-up time.
        after: std::time::Duration,
        /// The last error seen.
        last_error: String,
    },
    /// A send queued before the welcome is over this router's payload limit: it is dropped,
    /// not sent (the router would close the replica for it).
    SendDropped {
        /// The send's client seq.
        client_seq: u64,
        /// Its sealed size.
        len: usize,
        /// The router's limit.
        max: usize,
    },
    /// The router stamped a message of `origin` whose client seq is not above one already
    /// applied (a replay or a reordering). It is skipped, the same on every replica.
    Replayed {
        /// Where in the order.
        seq: Seq,
        /// The sender named.
        origin: Origin,
    },
    /// The router no longer has the session (e.g. it restarted). Continuity is gone.
    SessionLost {
        /// What the router said.
        reason: String,
    },
    /// The `stop_after` seq was applied; the client leaves and stops applying.
    Stopped {
        /// The last seq applied.
        seq: Seq,
        /// The island's digest at that seq.
        digest: Vec<u8>,
    },
}

/// How the router ended the conversation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct Closed {
    /// The close code.
    pub code: Code,
    /// The router's words.
    pub reason: String,
}

/// Frames that break the protocol from the replica's point of view.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The router closed or refused.
    #[error("the router closed the connection: {0}")]
    Closed(Closed),
    /// A frame out of order or inconsistent.
    #[error("the router broke the protocol: {0}")]
    Protocol(String),
    /// The snapshot could not be restored.
    #[error("the snapshot could not be restored: {0}")]
    Restore(String),
    /// The router is not the island's home and names where it is; the client races those.
    #[error("the router redirected to the island's home (epoch {epoch})")]
    Redirected {
        /// The home's contact points, best first.
        contacts: Vec<wire::Contacts>,
        /// The home's placement epoch.
        epoch: u64,
    },
}

struct SyncProgress {
    at: u64,
    expect: Option<u64>,
    data: BytesMut,
}

/// The replica state machine. Feed it frames, drain frames and events.
pub struct Replica<I> {
    cfg: ReplicaConfig,
    replica: ReplicaId,
    sealer: Sealer,
    island: I,
    last_seq: u64,
    /// The island state is consistent at `last_seq` (synced once, not mid-sync).
    valid: bool,
    sync: Option<SyncProgress>,
    next_client_seq: u64,
    unconfirmed: VecDeque<(u64, Bytes)>,
    welcomed_once: bool,
    welcomed: bool,
    max_payload: usize,
    out: VecDeque<Bytes>,
    events: VecDeque<Event>,
    stopped: bool,
    /// Each sender's highest client seq applied, to skip what a router stamps twice.
    seen: Seen,
    /// The seq of the last snapshot uploaded.
    last_upload: Option<u64>,
    /// The session incarnation of the first welcome.
    incarnation: Option<u64>,
    /// The next presence frame is the whole list (it follows a welcome).
    presence_is_whole: bool,
    /// The highest placement epoch welcomed at: a welcome below it is refused (fencing).
    epoch: u64,
    /// The epoch of the order the island state belongs to: the welcome's once this replica
    /// resumed or synced under it. A recovering hello claims this one, not `epoch`: a replica
    /// welcomed by a new home but not yet synced still holds the old home's order.
    state_epoch: u64,
    /// The newest router time applied (messages and ticks), for a recovering hello.
    last_time: RouterTime,
    /// The tick interval of the last welcome, for a recovering hello.
    tick_interval_us: u64,
    /// Who is attached, as presence frames say (bounded by [`MAX_PRESENT`]): a recovering hello
    /// says how many, so a router re-creating the island knows whom to wait for.
    present: BTreeSet<ReplicaId>,
    /// Other routers of the cluster, from the last welcome.
    cluster: Vec<wire::Contacts>,
}

impl<I: Island> Replica<I> {
    /// A replica with its island in the initial state.
    pub fn new(cfg: ReplicaConfig, island: I) -> Self {
        let session = cfg.session();
        let key = cfg
            .capability
            .payload_key(session)
            .expect("every capability derives the observer's payload key");
        Replica {
            replica: cfg.replica(),
            sealer: Sealer::new(&key, session),
            cfg,
            island,
            last_seq: 0,
            valid: false,
            sync: None,
            next_client_seq: 0,
            unconfirmed: VecDeque::new(),
            welcomed_once: false,
            welcomed: false,
            max_payload: isthmus_router::session::DEFAULT_MAX_PAYLOAD_BYTES,
            out: VecDeque::new(),
            events: VecDeque::new(),
            stopped: false,
            seen: Seen::default(),
            last_upload: None,
            incarnation: None,
            presence_is_whole: false,
            epoch: 0,
            state_epoch: 0,
            last_time: RouterTime(0),
            tick_interval_us: 0,
            present: BTreeSet::new(),
            cluster: Vec::new(),
        }
    }

    /// The island.
    pub fn island(&self) -> &I {
        &self.island
    }

    /// The last seq applied.
    pub fn last_seq(&self) -> Seq {
        Seq(self.last_seq)
    }

    /// True once `stop_after` was reached.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// True after the first welcome.
    pub fn was_welcomed(&self) -> bool {
        self.welcomed_once
    }

    /// True while the current connection is welcomed.
    pub fn is_welcomed(&self) -> bool {
        self.welcomed
    }

    /// The highest placement epoch this replica was welcomed at (0 before any welcome).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Other routers of the cluster, as the last welcome named them: worth trying on a
    /// reconnect. Empty for a lone router.
    pub fn cluster(&self) -> &[wire::Contacts] {
        &self.cluster
    }

    /// What a recovering hello says: everything a router that lost the session needs to
    /// re-create it. `None` before the first welcome.
    pub fn recover_info(&self) -> Option<Recover> {
        let incarnation = self.incarnation?;
        Some(Recover {
            incarnation,
            epoch: self.state_epoch,
            time: self.last_time,
            members: self.present.len().max(1) as u32,
            tick_interval_us: self.tick_interval_us,
            create: self
                .cfg
                .role()
                .may_send()
                .then(|| self.cfg.create.clone())
                .flatten(),
        })
    }

    /// Sends not yet applied by this replica: not yet stamped, or stamped but not yet seen in
    /// the order (a router that stamped them and died before anyone applied them took them
    /// along, so they are kept until applied and resent to a re-created session).
    pub fn pending_sends(&self) -> usize {
        self.unconfirmed.len()
    }

    /// This replica's id.
    pub fn replica_id(&self) -> ReplicaId {
        self.replica
    }

    /// The hello for a new connection, signed over the router's `nonce` (sent after the
    /// preamble exchange). Resumes when the state is consistent, and asks to create the session
    /// only before the first welcome. After it, every hello is a recovering one (it carries
    /// [`Replica::recover_info`]) followed at once by the duplicate table (`Seen`) when the
    /// state is consistent, so a router that lost the session can re-create it from its
    /// replicas; the returned bytes are then both frames.
    pub fn hello(&self, nonce: &[u8; NONCE_LEN]) -> Bytes {
        let role = self.cfg.role();
        let body = HelloBody {
            session: self.cfg.session(),
            keys: self.cfg.keys,
            replica: self.replica,
            replica_key: self.cfg.key.public(),
            name: self.cfg.name.clone(),
            role,
            resume_from: self.valid.then_some(Seq(self.last_seq)),
            create: if self.welcomed_once || !role.may_send() {
                None
            } else {
                self.cfg.create.clone()
            },
            control: false,
            recover: self.recover_info(),
        };
        let recovering = body.recover.is_some() && body.resume_from.is_some();
        let hello = auth::sign_hello(
            nonce,
            body,
            &self.cfg.role_capability().key_pair(),
            &self.cfg.key,
        );
        let hello = wire::encode(&ClientFrame::Hello(hello));
        if !recovering {
            return hello;
        }
        let mut both = BytesMut::from(&hello[..]);
        wire::encode_into(
            &ClientFrame::Seen {
                entries: self.seen.entries(),
            },
            &mut both,
        );
        both.freeze()
    }

    /// The connection is gone. A sync in progress leaves the island inconsistent, so the next
    /// connection asks for a full sync.
    pub fn disconnected(&mut self) {
        self.welcomed = false;
        if self.sync.take().is_some() {
            self.valid = false;
        }
        // Everything still queued was meant for the old connection (pongs, digests, snapshot
        // pieces, sends). Sends live on in `unconfirmed` and go out again after the next welcome;
        // writing a stale copy too would repeat a client seq, which the router refuses.
        self.out.clear();
    }

    /// Largest plaintext payload [`Replica::send`] takes: the router's limit less the tag.
    pub fn max_payload(&self) -> usize {
        self.max_payload.saturating_sub(TAG_LEN)
    }

    /// Seals a payload and queues it for the order. Returns its client seq. The sealed bytes are
    /// what is kept for a resend, so a resend is byte-identical.
    pub fn send(&mut self, payload: Bytes) -> Result<u64, crate::ClientError> {
        if !self.cfg.role().may_send() {
            return Err(crate::ClientError::ObserverCannotSend);
        }
        if payload.len() > self.max_payload() {
            return Err(crate::ClientError::PayloadTooLarge {
                len: payload.len(),
                max: self.max_payload(),
            });
        }
        if self.unconfirmed.len() >= self.cfg.max_pending_sends {
            return Err(crate::ClientError::TooManyPending(
                self.cfg.max_pending_sends,
            ));
        }
        self.next_client_seq += 1;
        let client_seq = self.next_client_seq;
        let payload = Bytes::from(self.sealer.seal_payload(self.replica, client_seq, &payload));
        self.unconfirmed.push_back((client_seq, payload.clone()));
        if self.welcomed {
            self.out.push_back(wire::encode(&ClientFrame::Send {
                client_seq,
                payload,
            }));
        }
        Ok(client_seq)
    }

    /// Queues a frame of the replica's own (ping, leave).
    pub fn push_frame(&mut self, frame: &ClientFrame) {
        self.out.push_back(wire::encode(frame));
    }

    /// The next frame to write.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Applies one frame from the router.
    pub fn handle_frame(&mut self, frame: ServerFrame) -> Result<(), FrameError> {
        if self.stopped {
            return Ok(());
        }
        match frame {
            ServerFrame::Presence { joined, left } => {
                let whole = std::mem::take(&mut self.presence_is_whole);
                if whole {
                    self.present.clear();
                }
                for p in &joined {
                    if self.present.len() < MAX_PRESENT {
                        self.present.insert(p.replica);
                    }
                }
                for r in &left {
                    self.present.remove(r);
                }
                // Passed on as changes (at most a frame's worth each); whoever keeps the list
                // bounds it, see MAX_PRESENT.
                self.events.push_back(Event::Presence {
                    whole,
                    joined: joined
                        .into_iter()
                        .map(|p| (p.replica, p.name, p.role))
                        .collect(),
                    left,
                });
            }
            ServerFrame::Welcome(w) => {
                if w.epoch < self.epoch {
                    // A home that was replaced (fencing): nothing from it may be applied.
                    return Err(FrameError::Closed(Closed {
                        code: Code::STALE_EPOCH,
                        reason: format!(
                            "this router welcomed at epoch {}, but this replica was already welcomed at epoch {} by the island's newer home; trying the other routers",
                            w.epoch, self.epoch
                        ),
                    }));
                }
                if self.incarnation.is_some_and(|i| i != w.incarnation) {
                    // Same keys, same session id, but created again: the island this replica
                    // was in is gone, and resuming into the new one would mix two histories.
                    return Err(FrameError::Closed(Closed {
                        code: Code::SESSION_RESET,
                        reason: "the island was created again on the router since this replica was last connected; the island it was in is gone".into(),
                    }));
                }
                self.incarnation = Some(w.incarnation);
                self.epoch = w.epoch;
                self.tick_interval_us = w.tick_interval_us;
                self.last_time = self.last_time.max(w.time);
                self.cluster = w
                    .cluster
                    .into_iter()
                    .take(wire::MAX_CLUSTER_CONTACTS)
                    .collect();
                self.presence_is_whole = true;
                self.welcomed_once = true;
                self.welcomed = true;
                self.max_payload = w.max_payload_bytes as usize;
                // Sends queued before this router said its limit (or for another router) may
                // be over it; the router would close the replica for them (2005, fatal).
                let max = self.max_payload;
                let mut too_large = Vec::new();
                self.unconfirmed.retain(|(client_seq, sealed)| {
                    let fits = sealed.len() <= max;
                    if !fits {
                        too_large.push((*client_seq, sealed.len()));
                    }
                    fits
                });
                for (client_seq, len) in too_large {
                    self.events.push_back(Event::SendDropped {
                        client_seq,
                        len,
                        max,
                    });
                }
                // Resend only what the router has not stamped: a client seq at or below the one
                // it confirmed is a protocol violation. Those are kept until applied: if this
                // router dies before anyone applied them, a re-created session has not got them.
                let confirmed = w.last_client_seq;
                for (client_seq, payload) in self
                    .unconfirmed
                    .iter()
                    .filter(|(cs, _)| *cs > confirmed)
                    .cloned()
                    .collect::<Vec<_>>()
                {
                    self.out.push_back(wire::encode(&ClientFrame::Send {
                        client_seq,
                        payload,
                    }));
                }
                self.events.push_back(Event::Welcomed {
                    created: w.created,
                    contacts: w.contacts,
                });
            }
            ServerFrame::Refuse { code, reason } | ServerFrame::Goodbye { code, reason } => {
                return Err(FrameError::Closed(Closed { code, reason }));
            }
            ServerFrame::SyncBegin { at, snapshot_len } => {
                if let Some(len) = snapshot_len {
                    if len > self.cfg.max_snapshot_bytes as u64 {
                        return Err(FrameError::Protocol(format!(
                            "a snapshot of {len} bytes was announced; this replica accepts at most {}",
                            self.cfg.max_snapshot_bytes
                        )));
                    }
                }
                self.valid = false;
                if snapshot_len.is_none() {
                    if at.0 != 0 {
                        return Err(FrameError::Protocol("fresh sync not at seq 0".into()));
                    }
                    self.island.reset();
                    self.seen = Seen::default();
                    self.last_seq = 0;
                    self.events.push_back(Event::StartedFresh);
                }
                self.sync = Some(SyncProgress {
                    at: at.0,
                    expect: snapshot_len,
                    data: BytesMut::new(),
                });
            }
            ServerFrame::SnapshotData { data } => {
                let Some(s) = self.sync.as_mut() else {
                    return Err(FrameError::Protocol("snapshot data outside a sync".into()));
                };
                let expect = s.expect.unwrap_or(0);
                if (s.data.len() as u64).saturating_add(data.len() as u64) > expect {
                    return Err(FrameError::Protocol(
                        "more snapshot data than announced".into(),
                    ));
                }
                s.data.extend_from_slice(&data);
            }
            ServerFrame::Message(m) => {
                if self.sync.is_none() {
                    // A resume: the state is part of this welcome's order from here on.
                    self.state_epoch = self.epoch;
                }
                self.finish_restore()?;
                self.apply(m)?;
            }
            ServerFrame::Synced {
                seq,
                last_client_seq,
            } => {
                self.finish_restore()?;
                if seq.0 != self.last_seq {
                    return Err(FrameError::Protocol(format!(
                        "synced at {} but the replica is at {}",
                        seq.0, self.last_seq
                    )));
                }
                self.sync = None;
                self.valid = true;
                self.state_epoch = self.epoch;
                self.confirm_upto(last_client_seq);
                self.events.push_back(Event::Synced { seq });
                self.check_stop();
            }
            ServerFrame::Tick { time } => {
                self.last_time = self.last_time.max(time);
                self.island.tick(time);
                self.events.push_back(Event::Tick(time));
            }
            ServerFrame::SnapshotRequest { request, at } => {
                if self.valid && self.sync.is_none() && self.last_seq == at.0 {
                    self.upload_snapshot(request, at);
                }
            }
            ServerFrame::Divergence(d) => self.events.push_back(Event::Divergence(d)),
            ServerFrame::Ping { nonce } => self
                .out
                .push_back(wire::encode(&ClientFrame::Pong { nonce })),
            ServerFrame::Pong { .. } => {}
            // Only a control connection asks for these; a replica ignores a stray one.
            ServerFrame::AdminDone { .. } => {}
            ServerFrame::Redirect { contacts, epoch } => {
                return Err(FrameError::Redirected { contacts, epoch });
            }
        }
        Ok(())
    }

    fn confirm_upto(&mut self, client_seq: u64) {
        self.unconfirmed.retain(|(cs, _)| *cs > client_seq);
    }

    fn finish_restore(&mut self) -> Result<(), FrameError> {
        let Some(s) = self.sync.as_mut() else {
            return Ok(());
        };
        let Some(len) = s.expect.take() else {
            return Ok(());
        };
        if s.data.len() as u64 != len {
            return Err(FrameError::Protocol(format!(
                "snapshot of {} bytes announced, {} received",
                len,
                s.data.len()
            )));
        }
        let data = std::mem::take(&mut s.data);
        let at = s.at;
        let plain = self.sealer.open_snapshot(Seq(at), &data).ok_or_else(|| {
            FrameError::Restore(
                "it does not open with this island's key (sealed under another key, or changed on the way)"
                    .into(),
            )
        })?;
        let (seen, island) = Seen::unwrap(&plain).map_err(FrameError::Restore)?;
        self.island.restore(island).map_err(FrameError::Restore)?;
        self.seen = seen;
        self.last_seq = at;
        // Own sends inside the snapshot are applied now.
        let mine = self.seen.last_of(self.replica);
        self.confirm_upto(mine);
        self.events.push_back(Event::Restored { at: Seq(at) });
        self.check_stop();
        Ok(())
    }

    fn apply(&mut self, mut m: Message) -> Result<(), FrameError> {
        if self.stopped {
            return Ok(());
        }
        let Some(next) = self.last_seq.checked_add(1) else {
            return Err(FrameError::Protocol(format!(
                "a message after seq {}, the last there can be",
                self.last_seq
            )));
        };
        if m.seq.0 != next {
            return Err(FrameError::Protocol(format!(
                "expected seq {next}, got {}",
                m.seq.0
            )));
        }
        // A sealed message binds its sender and client seq, but a router could stamp the same
        // one twice or an older one later: each sender's client seqs must rise, as the router
        // promises. Every replica keeps the same table (it travels in snapshots), so all skip
        // the same messages and stay in step.
        let replayed = match m.origin {
            Origin::Replica(origin) => !self.seen.admit(origin, m.client_seq, m.seq.0),
            Origin::Router => false,
        };
        let opened = match m.origin {
            _ if replayed => None,
            // The router's own messages (joins, leaves) are plaintext: it holds no key.
            Origin::Router => Some(m.payload.clone()),
            Origin::Replica(origin) => self
                .sealer
                .open_payload(origin, m.client_seq, &m.payload)
                .map(Bytes::from),
        };
        self.last_seq = m.seq.0;
        self.last_time = self.last_time.max(m.time);
        if m.origin == Origin::Replica(self.replica) {
            self.confirm_upto(m.client_seq);
        }
        let event = match opened {
            Some(plain) => {
                m.payload = plain;
                self.island.apply(&m);
                Event::Message(m.clone())
            }
            None if replayed => {
                tracing::warn!(
                    seq = m.seq.0,
                    origin = ?m.origin,
                    client_seq = m.client_seq,
                    "the router stamped a message of this sender again (its client seq is not above the last one applied); it is skipped"
                );
                Event::Replayed {
                    seq: m.seq,
                    origin: m.origin,
                }
            }
            None => {
                tracing::warn!(
                    seq = m.seq.0,
                    origin = ?m.origin,
                    "a message does not open with this island's key; it is skipped (sealed under another key, or changed on the way)"
                );
                Event::Undecryptable {
                    seq: m.seq,
                    origin: m.origin,
                }
            }
        };
        if self.cfg.digest_every > 0 && m.seq.0.is_multiple_of(self.cfg.digest_every) {
            let hash = Bytes::from(self.island.digest());
            self.out
                .push_back(wire::encode(&ClientFrame::Digest { seq: m.seq, hash }));
        }
        self.events.push_back(event);
        self.check_stop();
        Ok(())
    }

    fn check_stop(&mut self) {
        if let Some(stop) = self.cfg.stop_after {
            if self.last_seq >= stop.0 && self.unconfirmed.is_empty() && !self.stopped {
                self.stopped = true;
                self.events.push_back(Event::Stopped {
                    seq: Seq(self.last_seq),
                    digest: self.island.digest(),
                });
            }
        }
    }

    fn upload_snapshot(&mut self, request: u64, at: Seq) {
        // One upload per seq: a router asking again for the same point gets nothing more, so
        // requests cannot make this replica queue snapshot after snapshot.
        if self.last_upload == Some(at.0) {
            return;
        }
        self.last_upload = Some(at.0);
        let data = Bytes::from(
            self.sealer
                .seal_snapshot(at, &self.seen.wrap(&self.island.snapshot())),
        );
        let total = data.len() as u64;
        let mut offset = 0;
        loop {
            let end = (offset + SNAPSHOT_UPLOAD_CHUNK).min(data.len());
            self.out
                .push_back(wire::encode(&ClientFrame::SnapshotChunk {
                    request,
                    at,
                    offset: offset as u64,
                    total,
                    data: data.slice(offset..end),
                }));
            offset = end;
            if offset >= data.len() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ChatIsland;
    use isthmus_router::auth::Capability;
    use isthmus_router::wire::{Hello, Welcome};

    const NONCE: [u8; NONCE_LEN] = [4; NONCE_LEN];

    fn admin_of(island: u8) -> Capability {
        Capability::from_parts(Role::Admin, [island; 32])
    }

    fn cfg_with(
        capability: Capability,
        keys: IslandKeys,
        stop_after: Option<Seq>,
    ) -> ReplicaConfig {
        ReplicaConfig {
            keys,
            capability,
            key: KeyPair::random(),
            name: "t".into(),
            create: Some(CreateOptions::default()),
            digest_every: 2,
            max_pending_sends: 3,
            max_snapshot_bytes: DEFAULT_MAX_SNAPSHOT_BYTES,
            stop_after,
        }
    }

    /// A participant of island 1.
    fn cfg(stop_after: Option<Seq>) -> ReplicaConfig {
        let admin = admin_of(1);
        let keys = auth::island_keys(&admin).expect("admin");
        cfg_with(admin.weaker().expect("participant"), keys, stop_after)
    }

    fn welcome(last_client_seq: u64) -> ServerFrame {
        ServerFrame::Welcome(Welcome {
            session: SessionId::random(),
            replica: ReplicaId(uuid::Uuid::from_u128(5)),
            created: false,
            last_seq: Seq(0),
            time: RouterTime(0),
            tick_interval_us: 50_000,
            last_client_seq,
            max_payload_bytes: 1000,
            contacts: wire::Contacts::default(),
            incarnation: 1,
            epoch: 1,
            cluster: Vec::new(),
        })
    }

    /// A router message (plaintext: the router holds no key).
    fn msg(seq: u64) -> ServerFrame {
        ServerFrame::Message(Message {
            seq: Seq(seq),
            time: RouterTime(seq.wrapping_mul(10)),
            origin: Origin::Router,
            client_seq: 0,
            payload: ChatIsland::payload("x", &format!("m{seq}")),
        })
    }

    fn start_fresh(r: &mut Replica<ChatIsland>) {
        r.handle_frame(ServerFrame::SyncBegin {
            at: Seq(0),
            snapshot_len: None,
        })
        .expect("fresh");
    }

    /// A new replica with `c`, welcomed and handed the snapshot `data` taken after `at` (not
    /// yet told it is synced).
    fn from_snapshot(c: ReplicaConfig, at: u64, data: &[u8]) -> Replica<ChatIsland> {
        let mut r = Replica::new(c, ChatIsland::default());
        r.handle_frame(welcome(0)).expect("welcome");
        r.handle_frame(ServerFrame::SyncBegin {
            at: Seq(at),
            snapshot_len: Some(data.len() as u64),
        })
        .expect("sync");
        r.handle_frame(ServerFrame::SnapshotData {
            data: Bytes::copy_from_slice(data),
        })
        .expect("data");
        r
    }

    fn synced(r: &mut Replica<ChatIsland>, seq: u64) {
        r.handle_frame(ServerFrame::Synced {
            seq: Seq(seq),
            last_client_seq: 0,
        })
        .expect("synced");
    }

    /// Welcomed, synced from the empty state, frames and events drained.
    fn live(cfg: ReplicaConfig) -> Replica<ChatIsland> {
        let mut r = Replica::new(cfg, ChatIsland::default());
        r.handle_frame(welcome(0)).expect("welcome");
        start_fresh(&mut r);
        synced(&mut r, 0);
        drain(&mut r);
        r
    }

    fn drain(r: &mut Replica<ChatIsland>) {
        while r.poll_transmit().is_some() {}
        while r.poll_event().is_some() {}
    }

    /// What `r` uploads when asked for a snapshot at `at`.
    fn snapshot_of(r: &mut Replica<ChatIsland>, at: u64) -> Vec<u8> {
        r.handle_frame(ServerFrame::SnapshotRequest {
            request: 1,
            at: Seq(at),
        })
        .expect("request");
        frames(r)
            .into_iter()
            .filter_map(|f| match f {
                ClientFrame::SnapshotChunk { data, .. } => Some(data.to_vec()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn frames(r: &mut Replica<ChatIsland>) -> Vec<ClientFrame> {
        std::iter::from_fn(|| r.poll_transmit())
            .map(|b| {
                let mut buf = BytesMut::from(&b[..]);
                wire::decode::<ClientFrame>(&mut buf, usize::MAX)
                    .expect("decodes")
                    .expect("whole")
            })
            .collect()
    }

    fn events(r: &mut Replica<ChatIsland>) -> Vec<Event> {
        std::iter::from_fn(|| r.poll_event()).collect()
    }

    fn hello_of(r: &Replica<ChatIsland>) -> Hello {
        let mut buf = BytesMut::from(&r.hello(&NONCE)[..]);
        match wire::decode::<ClientFrame>(&mut buf, usize::MAX) {
            Ok(Some(ClientFrame::Hello(h))) => h,
            other => panic!("{other:?}"),
        }
    }

    /// Plays the router: stamps every send `from` wrote as the next message and hands it to
    /// every replica in `to`. Returns the stamped messages.
    fn relay(
        from: &mut Replica<ChatIsland>,
        next_seq: &mut u64,
        to: &mut [&mut Replica<ChatIsland>],
    ) -> Vec<Message> {
        let origin = Origin::Replica(from.replica_id());
        let mut stamped = Vec::new();
        for f in frames(from) {
            if let ClientFrame::Send {
                client_seq,
                payload,
            } = f
            {
                *next_seq += 1;
                stamped.push(Message {
                    seq: Seq(*next_seq),
                    time: RouterTime(*next_seq),
                    origin,
                    client_seq,
                    payload,
                });
            }
        }
        for m in &stamped {
            from.handle_frame(ServerFrame::Message(m.clone()))
                .expect("own echo");
            for r in to.iter_mut() {
                r.handle_frame(ServerFrame::Message(m.clone()))
                    .expect("message");
            }
        }
        stamped
    }

    #[test]
    fn creates_only_before_the_first_welcome_and_resumes_only_when_consistent() {
        let mut r = Replica::new(cfg(None), ChatIsland::default());
        let h = hello_of(&r);
        assert!(h.body.create.is_some() && h.body.resume_from.is_none());
        r.handle_frame(welcome(0)).expect("welcome");
        start_fresh(&mut r);
        r.handle_frame(msg(1)).expect("m1");
        // Dropped mid-sync: the state is partial, so no resume.
        r.disconnected();
        let h = hello_of(&r);
        assert!(h.body.create.is_none(), "never create on a reconnect");
        assert_eq!(h.body.resume_from, None);
        r.handle_frame(welcome(0)).expect("welcome");
        start_fresh(&mut r);
        r.handle_frame(msg(1)).expect("m1");
        synced(&mut r, 1);
        r.disconnected();
        assert_eq!(hello_of(&r).body.resume_from, Some(Seq(1)));
    }

    #[test]
    fn the_hello_is_signed_for_the_role_the_capability_allows() {
        let admin = admin_of(1);
        let keys = auth::island_keys(&admin).expect("admin");
        let observer = admin.derive(Role::Observer).expect("observer");
        for (cap, role) in [
            (admin, Role::Replica),
            (admin.weaker().expect("participant"), Role::Replica),
            (observer, Role::Observer),
        ] {
            let c = cfg_with(cap, keys, None);
            let id = c.replica();
            let r = Replica::new(c, ChatIsland::default());
            let h = hello_of(&r);
            assert_eq!(h.body.role, role);
            assert_eq!(h.body.session, keys.session_id());
            assert_eq!(h.body.replica, id);
            assert!(!h.body.control);
            assert_eq!(auth::verify_hello(&NONCE, &h), Ok(()));
            assert!(auth::verify_hello(&[5; NONCE_LEN], &h).is_err());
            if role == Role::Observer {
                assert!(h.body.create.is_none(), "observers never create");
            }
        }
    }

    #[test]
    fn the_replica_key_is_kept_across_reconnects() {
        let mut r = Replica::new(cfg(None), ChatIsland::default());
        let first = hello_of(&r);
        r.handle_frame(welcome(0)).expect("welcome");
        r.disconnected();
        let second = hello_of(&r);
        assert_eq!(first.body.replica, second.body.replica);
        assert_eq!(first.body.replica_key, second.body.replica_key);
    }

    #[test]
    fn observers_cannot_send() {
        let admin = admin_of(1);
        let keys = auth::island_keys(&admin).expect("admin");
        let mut r = live(cfg_with(
            admin.derive(Role::Observer).expect("observer"),
            keys,
            None,
        ));
        let err = r
            .send(ChatIsland::payload("x", "hi"))
            .expect_err("observer");
        assert_eq!(
            err.to_string(),
            "observers cannot send; this postcard only lets you watch"
        );
        assert!(frames(&mut r).is_empty());
    }

    #[test]
    fn the_payload_limit_leaves_room_for_the_tag() {
        let mut r = live(cfg(None));
        assert_eq!(r.max_payload(), 1000 - TAG_LEN);
        assert!(r.send(Bytes::from(vec![0; 1000 - TAG_LEN])).is_ok());
        assert!(matches!(
            r.send(Bytes::from(vec![0; 1000 - TAG_LEN + 1])),
            Err(crate::ClientError::PayloadTooLarge { max, .. }) if max == 1000 - TAG_LEN
        ));
        match &frames(&mut r)[..] {
            [ClientFrame::Send { payload, .. }] => assert_eq!(payload.len(), 1000),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_gap_is_a_protocol_error() {
        let mut r = Replica::new(cfg(None), ChatIsland::default());
        r.handle_frame(welcome(0)).expect("welcome");
        start_fresh(&mut r);
        assert!(matches!(
            r.handle_frame(msg(2)),
            Err(FrameError::Protocol(_))
        ));
    }

    #[test]
    fn hostile_seqs_are_refused_without_overflow() {
        let provider = live(cfg(None));
        let snap = provider.sealer.seal_snapshot(
            Seq(u64::MAX),
            &provider.seen.wrap(&provider.island().snapshot()),
        );
        let mut r = from_snapshot(cfg(None), u64::MAX, &snap);
        assert!(matches!(
            r.handle_frame(msg(u64::MAX)),
            Err(FrameError::Protocol(_))
        ));
        assert_eq!(r.last_seq(), Seq(u64::MAX));
        let mut fresh = live(cfg(None));
        assert!(matches!(
            fresh.handle_frame(msg(u64::MAX)),
            Err(FrameError::Protocol(_))
        ));
        assert!(matches!(
            fresh.handle_frame(ServerFrame::Synced {
                seq: Seq(u64::MAX),
                last_client_seq: u64::MAX
            }),
            Err(FrameError::Protocol(_))
        ));
    }

    #[test]
    fn an_oversized_snapshot_is_refused_before_anything_is_buffered() {
        let mut c = cfg(None);
        c.max_snapshot_bytes = 100;
        let mut r = Replica::new(c, ChatIsland::default());
        r.handle_frame(welcome(0)).expect("welcome");
        assert!(matches!(
            r.handle_frame(ServerFrame::SyncBegin {
                at: Seq(3),
                snapshot_len: Some(101),
            }),
            Err(FrameError::Protocol(_))
        ));
        let mut r = Replica::new(cfg(None), ChatIsland::default());
        r.handle_frame(welcome(0)).expect("welcome");
        assert!(matches!(
            r.handle_frame(ServerFrame::SyncBegin {
                at: Seq(3),
                snapshot_len: Some(u64::MAX),
            }),
            Err(FrameError::Protocol(_))
        ));
        assert_eq!(
            DEFAULT_MAX_SNAPSHOT_BYTES,
            64 * 1024 * 1024 + SNAPSHOT_OVERHEAD
        );
    }

    #[test]
    fn sends_are_confirmed_by_client_seq_and_resent_byte_identical_after_a_welcome() {
        let mut r = Replica::new(cfg(None), ChatIsland::default());
        r.handle_frame(welcome(0)).expect("welcome");
        while r.poll_transmit().is_some() {}
        for t in ["a", "b", "c"] {
            r.send(ChatIsland::payload("x", t)).expect("send");
        }
        assert!(matches!(
            r.send(ChatIsland::payload("x", "d")),
            Err(crate::ClientError::TooManyPending(3))
        ));
        let first: Vec<ClientFrame> = frames(&mut r);
        start_fresh(&mut r);
        synced(&mut r, 0);
        let ClientFrame::Send { payload, .. } = &first[0] else {
            panic!("{first:?}")
        };
        r.handle_frame(ServerFrame::Message(Message {
            seq: Seq(1),
            time: RouterTime(1),
            origin: Origin::Replica(r.replica_id()),
            client_seq: 1,
            payload: payload.clone(),
        }))
        .expect("echo of a");
        assert_eq!(r.pending_sends(), 2);
        r.disconnected();
        // The router says it stamped up to client seq 2: only c is resent, byte for byte.
        while r.poll_transmit().is_some() {}
        r.handle_frame(welcome(2)).expect("welcome");
        let resent: Vec<ClientFrame> = frames(&mut r)
            .into_iter()
            .filter(|f| matches!(f, ClientFrame::Send { .. }))
            .collect();
        assert_eq!(resent, vec![first[2].clone()]);
    }

    #[test]
    fn two_replicas_with_the_same_capability_read_each_other() {
        let admin = admin_of(1);
        let keys = auth::island_keys(&admin).expect("admin");
        let mut a = live(cfg_with(admin, keys, None));
        let mut b = live(cfg_with(admin.weaker().expect("participant"), keys, None));
        let mut seq = 0;
        a.send(ChatIsland::payload("ada", "hello")).expect("send");
        relay(&mut a, &mut seq, &mut [&mut b]);
        b.send(ChatIsland::payload("bob", "hi ada")).expect("send");
        relay(&mut b, &mut seq, &mut [&mut a]);
        for r in [&a, &b] {
            let said: Vec<String> = r.island().lines().map(|l| l.text.clone()).collect();
            assert_eq!(said, vec!["hello", "hi ada"]);
        }
        assert_eq!(a.island().digest(), b.island().digest());
        let got: Vec<Event> = events(&mut b);
        assert!(got.iter().any(|e| matches!(e,
            Event::Message(m) if ChatIsland::parse(&m.payload) == ("ada".into(), "hello".into()))));
    }

    #[test]
    fn ciphertext_never_contains_the_plaintext() {
        let mut a = live(cfg(None));
        let text = "a rather distinctive secret sentence";
        a.send(Bytes::from(text)).expect("send");
        match &frames(&mut a)[..] {
            [ClientFrame::Send { payload, .. }] => {
                assert_eq!(payload.len(), text.len() + TAG_LEN);
                assert!(!payload
                    .windows(8)
                    .any(|w| text.as_bytes().windows(8).any(|t| t == w)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_message_under_another_islands_key_is_skipped_by_everyone_in_step() {
        let admin = admin_of(1);
        let keys = auth::island_keys(&admin).expect("admin");
        let mut a = live(cfg_with(admin, keys, None));
        let mut b = live(cfg_with(admin.weaker().expect("participant"), keys, None));
        // A stranger holding island 2's capability but speaking island 1's keys.
        let mut stranger = live(cfg_with(admin_of(2), keys, None));
        let mut seq = 0;
        stranger
            .send(ChatIsland::payload("eve", "forged"))
            .expect("send");
        relay(&mut stranger, &mut seq, &mut [&mut a, &mut b]);
        a.send(ChatIsland::payload("ada", "still here"))
            .expect("send");
        relay(&mut a, &mut seq, &mut [&mut b]);
        for r in [&mut a, &mut b] {
            let evs = events(r);
            assert!(evs.contains(&Event::Undecryptable {
                seq: Seq(1),
                origin: Origin::Replica(stranger.replica_id()),
            }));
            assert_eq!(r.last_seq(), Seq(2));
            let said: Vec<String> = r.island().lines().map(|l| l.text.clone()).collect();
            assert_eq!(said, vec!["still here"]);
            // The digest at seq 2 went out like any other.
            let digests: Vec<ClientFrame> = frames(r)
                .into_iter()
                .filter(|f| matches!(f, ClientFrame::Digest { .. }))
                .collect();
            assert_eq!(digests.len(), 1);
        }
        assert_eq!(a.island().digest(), b.island().digest());
    }

    /// The one Send `r` has queued, as the router would stamp it at `seq`.
    fn stamped(r: &mut Replica<ChatIsland>, seq: u64) -> Message {
        let ClientFrame::Send {
            client_seq,
            payload,
        } = frames(r)
            .into_iter()
            .find(|f| matches!(f, ClientFrame::Send { .. }))
            .expect("a send")
        else {
            unreachable!()
        };
        Message {
            seq: Seq(seq),
            time: RouterTime(seq),
            origin: Origin::Replica(r.replica_id()),
            client_seq,
            payload,
        }
    }

    #[test]
    fn a_message_stamped_twice_is_skipped_by_everyone_including_joiners_from_a_snapshot() {
        let mut a = live(cfg(None));
        let mut b = live(cfg(None));
        a.send(ChatIsland::payload("ada", "pay bob 10"))
            .expect("send");
        let first = stamped(&mut a, 1);
        let mut again = first.clone();
        again.seq = Seq(2);
        for m in [first, again.clone()] {
            b.handle_frame(ServerFrame::Message(m))
                .expect("applied or skipped");
        }
        assert_eq!(b.island().lines().count(), 1, "paid once");
        assert!(events(&mut b).contains(&Event::Replayed {
            seq: Seq(2),
            origin: again.origin
        }));
        // A joiner restored from b's snapshot at seq 2 knows the sender's last client seq too.
        b.handle_frame(ServerFrame::SnapshotRequest {
            request: 1,
            at: Seq(2),
        })
        .expect("request");
        // Asked again for the same point: no second upload.
        b.handle_frame(ServerFrame::SnapshotRequest {
            request: 2,
            at: Seq(2),
        })
        .expect("request");
        let chunks: Vec<ClientFrame> = frames(&mut b)
            .into_iter()
            .filter(|f| matches!(f, ClientFrame::SnapshotChunk { .. }))
            .collect();
        assert!(chunks
            .iter()
            .all(|f| matches!(f, ClientFrame::SnapshotChunk { request: 1, .. })));
        let snap: Vec<u8> = chunks
            .into_iter()
            .filter_map(|f| match f {
                ClientFrame::SnapshotChunk { data, .. } => Some(data.to_vec()),
                _ => None,
            })
            .flatten()
            .collect();
        let mut joiner = from_snapshot(cfg(None), 2, &snap);
        again.seq = Seq(3);
        joiner
            .handle_frame(ServerFrame::Message(again.clone()))
            .expect("skipped");
        b.handle_frame(ServerFrame::Message(again))
            .expect("skipped");
        assert_eq!(joiner.island().lines().count(), 1);
        assert_eq!(joiner.island().digest(), b.island().digest(), "in step");
    }

    #[test]
    fn a_tampered_payload_is_undecryptable_and_not_applied() {
        let mut a = live(cfg(None));
        let mut b = live(cfg(None));
        a.send(ChatIsland::payload("ada", "pay bob 5"))
            .expect("send");
        let ClientFrame::Send {
            client_seq,
            payload,
        } = frames(&mut a).remove(0)
        else {
            panic!("a send")
        };
        let mut bent = payload.to_vec();
        bent[0] ^= 1;
        let origin = Origin::Replica(a.replica_id());
        b.handle_frame(ServerFrame::Message(Message {
            seq: Seq(1),
            time: RouterTime(1),
            origin,
            client_seq,
            payload: Bytes::from(bent),
        }))
        .expect("skipped, not an error");
        assert_eq!(
            events(&mut b),
            vec![Event::Undecryptable {
                seq: Seq(1),
                origin
            }]
        );
        assert_eq!(b.island().lines().count(), 0);
        // Moved to another client seq of the same sender: also caught.
        let mut c = live(cfg(None));
        c.handle_frame(ServerFrame::Message(Message {
            seq: Seq(1),
            time: RouterTime(1),
            origin,
            client_seq: client_seq + 1,
            payload,
        }))
        .expect("skipped");
        assert!(matches!(events(&mut c)[..], [Event::Undecryptable { .. }]));
    }

    #[test]
    fn snapshots_are_sealed_on_upload_and_opened_on_restore() {
        let mut provider = live(cfg(None));
        let mut seq = 0;
        for t in ["one", "two", "three"] {
            provider.send(ChatIsland::payload("p", t)).expect("send");
        }
        relay(&mut provider, &mut seq, &mut []);
        drain(&mut provider);
        provider
            .handle_frame(ServerFrame::SnapshotRequest {
                request: 7,
                at: Seq(3),
            })
            .expect("request");
        let mut sealed = Vec::new();
        for f in frames(&mut provider) {
            if let ClientFrame::SnapshotChunk {
                request, at, data, ..
            } = f
            {
                assert_eq!((request, at), (7, Seq(3)));
                sealed.extend_from_slice(&data);
            }
        }
        let plain = provider.seen.wrap(&provider.island().snapshot());
        assert_eq!(sealed.len(), plain.len() + SNAPSHOT_OVERHEAD);
        assert!(!sealed.windows(plain.len()).any(|w| w == plain.as_slice()));

        let restore = |c: ReplicaConfig, at: u64, data: &[u8]| {
            let mut j = from_snapshot(c, at, data);
            j.handle_frame(ServerFrame::Synced {
                seq: Seq(at),
                last_client_seq: 0,
            })
            .map(|()| j)
        };
        let joiner = restore(cfg(None), 3, &sealed).expect("restores");
        assert_eq!(joiner.island().digest(), provider.island().digest());
        // Another seq than the one it was taken after, or another island's key: refused.
        assert!(matches!(
            restore(cfg(None), 2, &sealed),
            Err(FrameError::Restore(_))
        ));
        let other = admin_of(2);
        let other_keys = auth::island_keys(&other).expect("admin");
        assert!(matches!(
            restore(cfg_with(other, other_keys, None), 3, &sealed),
            Err(FrameError::Restore(_))
        ));
    }

    #[test]
    fn resuming_into_an_island_created_again_is_a_lost_session() {
        let mut r = live(cfg(None));
        r.disconnected();
        let ServerFrame::Welcome(mut w) = welcome(0) else {
            unreachable!()
        };
        w.incarnation = 2;
        match r.handle_frame(ServerFrame::Welcome(w)) {
            Err(FrameError::Closed(c)) => assert_eq!(c.code, Code::SESSION_RESET),
            other => panic!("resumed into another incarnation: {other:?}"),
        }
        // The same incarnation again is an ordinary reconnect.
        let mut r = live(cfg(None));
        r.disconnected();
        r.handle_frame(welcome(0)).expect("welcomed back");
    }

    #[test]
    fn a_queued_send_over_the_routers_limit_is_dropped_and_said() {
        let mut r = Replica::new(cfg(None), ChatIsland::default());
        r.send(Bytes::from(vec![1u8; 2000]))
            .expect("queued before the welcome");
        r.send(Bytes::from(vec![2u8; 10])).expect("queued");
        // This router takes payloads of at most 1000 bytes.
        r.handle_frame(welcome(0)).expect("welcome");
        let sends: Vec<u64> = frames(&mut r)
            .into_iter()
            .filter_map(|f| match f {
                ClientFrame::Send { client_seq, .. } => Some(client_seq),
                _ => None,
            })
            .collect();
        assert_eq!(sends, vec![2], "only the one that fits");
        assert!(events(&mut r).iter().any(|e| matches!(
            e,
            Event::SendDropped {
                client_seq: 1,
                max: 1000,
                ..
            }
        )));
    }

    #[test]
    fn frames_queued_for_a_lost_connection_are_not_written_on_the_next() {
        let mut r = live(cfg(None));
        r.send(ChatIsland::payload("me", "in flight"))
            .expect("send");
        // The connection drops before the send is written.
        r.disconnected();
        r.handle_frame(welcome(0)).expect("welcome again");
        let sends: Vec<u64> = frames(&mut r)
            .into_iter()
            .filter_map(|f| match f {
                ClientFrame::Send { client_seq, .. } => Some(client_seq),
                _ => None,
            })
            .collect();
        assert_eq!(sends, vec![1], "sent once, after the welcome");
    }

    #[test]
    fn a_stop_seq_already_passed_waits_until_the_replicas_own_sends_are_stamped() {
        // Sent before the first connection, as `--send` does; the island is already past the
        // stop seq when the replica arrives.
        let mut me = Replica::new(cfg(Some(Seq(1))), ChatIsland::default());
        me.send(ChatIsland::payload("me", "was this sent?"))
            .expect("queued before welcome");
        me.handle_frame(welcome(0)).expect("welcome");
        start_fresh(&mut me);
        for s in 1..=3 {
            me.handle_frame(msg(s)).expect("msg");
        }
        assert!(!me.is_stopped(), "the send is not stamped yet");
        let mut next = 3;
        let stamped = relay(&mut me, &mut next, &mut []);
        assert_eq!(stamped.len(), 1, "the queued send went out on welcome");
        assert!(me.is_stopped());
        let stopped: Vec<Seq> = events(&mut me)
            .into_iter()
            .filter_map(|e| match e {
                Event::Stopped { seq, .. } => Some(seq),
                _ => None,
            })
            .collect();
        assert_eq!(stopped, vec![Seq(4)], "stops right at its own message");
    }

    #[test]
    fn stop_after_counts_a_seq_inside_a_snapshot_and_digests_are_reported() {
        let mut provider = Replica::new(cfg(None), ChatIsland::default());
        provider.handle_frame(welcome(0)).expect("welcome");
        start_fresh(&mut provider);
        for s in 1..=4 {
            provider.handle_frame(msg(s)).expect("msg");
        }
        let digests = frames(&mut provider)
            .into_iter()
            .filter(|f| matches!(f, ClientFrame::Digest { .. }))
            .count();
        assert_eq!(digests, 2, "every 2 messages");
        synced(&mut provider, 4);
        let snap = snapshot_of(&mut provider, 4);

        let mut joiner = from_snapshot(cfg(Some(Seq(3))), 4, &snap);
        synced(&mut joiner, 4);
        assert!(joiner.is_stopped());
        let stopped = events(&mut joiner)
            .into_iter()
            .find_map(|e| match e {
                Event::Stopped { seq, digest } => Some((seq, digest)),
                _ => None,
            })
            .expect("stopped");
        assert_eq!(stopped, (Seq(4), provider.island().digest()));
    }

    fn welcome_at(epoch: u64, last_client_seq: u64) -> ServerFrame {
        let ServerFrame::Welcome(mut w) = welcome(last_client_seq) else {
            unreachable!()
        };
        w.epoch = epoch;
        ServerFrame::Welcome(w)
    }

    /// Decodes what `hello` wrote: the hello, then whatever was pipelined after it.
    fn hello_frames(r: &Replica<ChatIsland>) -> Vec<ClientFrame> {
        let mut buf = BytesMut::from(&r.hello(&NONCE)[..]);
        std::iter::from_fn(|| wire::decode::<ClientFrame>(&mut buf, usize::MAX).expect("decodes"))
            .collect()
    }

    #[test]
    fn a_reconnect_is_a_recovering_hello_with_the_duplicate_table_pipelined() {
        let mut a = live(cfg(None));
        a.handle_frame(ServerFrame::Presence {
            joined: vec![
                wire::Present {
                    replica: a.replica_id(),
                    name: "a".into(),
                    role: Role::Replica,
                },
                wire::Present {
                    replica: ReplicaId(uuid::Uuid::from_u128(77)),
                    name: "b".into(),
                    role: Role::Replica,
                },
            ],
            left: Vec::new(),
        })
        .expect("presence");
        a.send(ChatIsland::payload("a", "hi")).expect("send");
        let m = stamped(&mut a, 1);
        a.handle_frame(ServerFrame::Message(m)).expect("echo");
        a.handle_frame(ServerFrame::Tick {
            time: RouterTime(500),
        })
        .expect("tick");
        a.disconnected();
        let frames = hello_frames(&a);
        let [ClientFrame::Hello(h), ClientFrame::Seen { entries }] = &frames[..] else {
            panic!("hello then table: {frames:?}")
        };
        assert!(h.body.create.is_none(), "never create on a reconnect");
        assert_eq!(h.body.resume_from, Some(Seq(1)));
        let r = h.body.recover.as_ref().expect("recover info");
        assert_eq!(
            (r.incarnation, r.epoch, r.time, r.members),
            (1, 1, RouterTime(500), 2)
        );
        assert_eq!(r.tick_interval_us, 50_000);
        assert_eq!(
            entries,
            &vec![SeenEntry {
                replica: a.replica_id(),
                client_seq: 1,
                at: Seq(1)
            }]
        );
        // Before any welcome there is nothing to recover.
        let fresh = Replica::new(cfg(None), ChatIsland::default());
        assert!(
            matches!(&hello_frames(&fresh)[..], [ClientFrame::Hello(h)] if h.body.recover.is_none())
        );
    }

    #[test]
    fn a_welcome_from_an_older_epoch_is_refused_and_nothing_from_it_applied() {
        let mut r = live(cfg(None));
        r.disconnected();
        r.handle_frame(welcome_at(5, 0)).expect("newer home");
        assert_eq!(r.epoch(), 5);
        r.disconnected();
        let err = r.handle_frame(welcome_at(4, 0)).expect_err("fenced");
        assert!(
            matches!(&err, FrameError::Closed(Closed { code, .. }) if *code == Code::STALE_EPOCH),
            "{err}"
        );
        assert!(!r.is_welcomed());
        assert_eq!(r.epoch(), 5);
    }

    #[test]
    fn sends_a_welcome_confirms_are_kept_until_applied_and_resent_to_a_re_created_session() {
        let mut r = live(cfg(None));
        r.send(ChatIsland::payload("a", "one")).expect("send");
        let one = stamped(&mut r, 1);
        r.disconnected();
        // The router stamped it but died before this replica saw it stamped.
        r.handle_frame(welcome(1)).expect("welcome");
        assert!(
            frames(&mut r).is_empty(),
            "confirmed: not resent to that router"
        );
        assert_eq!(r.pending_sends(), 1, "kept until applied");
        r.disconnected();
        // A session re-created from replicas that never applied it does not have it.
        r.handle_frame(welcome_at(2, 0)).expect("re-created");
        let resent = frames(&mut r);
        assert!(
            matches!(&resent[..], [ClientFrame::Send { client_seq: 1, payload }] if *payload == one.payload),
            "{resent:?}"
        );
        r.handle_frame(ServerFrame::Message(one))
            .expect("stamped again");
        assert_eq!(r.pending_sends(), 0);
    }

    #[test]
    fn a_replica_past_the_re_created_order_is_replaced_by_a_snapshot() {
        // a and b share seq 1; a also applied seq 2, which the dead router stamped and nobody
        // else has: the order continued from b at 1.
        let mut a = live(cfg(None));
        let mut b = live(cfg(None));
        for r in [&mut a, &mut b] {
            r.handle_frame(msg(1)).expect("m1");
        }
        a.handle_frame(msg(2)).expect("m2 only a has");
        let snap = snapshot_of(&mut b, 1);
        a.disconnected();
        a.handle_frame(welcome_at(2, 0)).expect("welcome");
        a.handle_frame(ServerFrame::SyncBegin {
            at: Seq(1),
            snapshot_len: Some(snap.len() as u64),
        })
        .expect("a full sync");
        a.handle_frame(ServerFrame::SnapshotData {
            data: Bytes::from(snap),
        })
        .expect("data");
        synced(&mut a, 1);
        assert_eq!(a.last_seq(), Seq(1));
        assert_eq!(
            a.island().digest(),
            b.island().digest(),
            "nothing past 1 kept"
        );
    }

    #[test]
    fn a_redirect_is_handed_to_the_client() {
        let mut r = Replica::new(cfg(None), ChatIsland::default());
        let home = wire::Contacts {
            internal: vec!["127.0.0.2:7470".parse().expect("addr")],
            ..wire::Contacts::default()
        };
        let err = r
            .handle_frame(ServerFrame::Redirect {
                contacts: vec![home.clone()],
                epoch: 9,
            })
            .expect_err("not a welcome");
        assert_eq!(
            err,
            FrameError::Redirected {
                contacts: vec![home],
                epoch: 9
            }
        );
        assert!(!r.was_welcomed());
    }

    /// The router restarts a joiner's sync with a new `SyncBegin` when the upload it was
    /// streaming is lost (docs/protocol.md): the partial snapshot must go, whole.
    #[test]
    fn a_second_sync_begin_drops_the_partial_snapshot_and_starts_over() {
        let mut b = live(cfg(None));
        b.handle_frame(msg(1)).expect("m1");
        let first = snapshot_of(&mut b, 1);
        b.handle_frame(msg(2)).expect("m2");
        let second = snapshot_of(&mut b, 2);
        assert!(first.len() > 2);
        // Half of the first snapshot, then another provider's snapshot from the start.
        let mut j = from_snapshot(cfg(None), 1, &first[..first.len() / 2]);
        j.handle_frame(ServerFrame::SyncBegin {
            at: Seq(2),
            snapshot_len: Some(second.len() as u64),
        })
        .expect("a new sync");
        j.handle_frame(ServerFrame::SnapshotData {
            data: Bytes::from(second),
        })
        .expect("data");
        synced(&mut j, 2);
        assert_eq!(j.last_seq(), Seq(2));
        assert_eq!(j.island().digest(), b.island().digest());
        // And a restart from the initial state replays the order instead.
        let mut k = from_snapshot(cfg(None), 1, &first[..1]);
        start_fresh(&mut k);
        k.handle_frame(msg(1)).expect("m1");
        k.handle_frame(msg(2)).expect("m2");
        synced(&mut k, 2);
        assert_eq!(k.island().digest(), b.island().digest());
    }
}
