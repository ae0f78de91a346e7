//! The replica side of the protocol as a deterministic state machine: it turns router frames
//! into island updates and events, and sends into frames, without any I/O.

use crate::Island;
use bytes::{Bytes, BytesMut};
use isthmus_router::ids::{ReplicaId, RouterTime, Seq, SessionId};
use isthmus_router::wire::{
    self, ClientFrame, Code, CreateOptions, Divergence, Hello, JoinToken, Message, Origin, Role,
    ServerFrame,
};
use std::collections::VecDeque;

/// Pieces a snapshot is uploaded in; well under the router's frame limit.
pub const SNAPSHOT_UPLOAD_CHUNK: usize = 128 * 1024;
/// Sends waiting for their echo before `send` refuses more: the queue must be bounded, and a
/// replica this far ahead of its router should slow down.
pub const DEFAULT_MAX_PENDING_SENDS: usize = 10_000;
/// Report a state digest after every this many messages.
pub const DEFAULT_DIGEST_EVERY: u64 = 100;

/// Who this replica is and how it joins.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// The session to join.
    pub session: SessionId,
    /// Derived from the join secret.
    pub token: JoinToken,
    /// Stable across reconnects.
    pub replica: ReplicaId,
    /// Display name.
    pub name: String,
    /// Replica or observer.
    pub role: Role,
    /// Create the session on first contact (never on a reconnect).
    pub create: Option<CreateOptions>,
    /// Digest reporting period in messages (0: never).
    pub digest_every: u64,
    /// Bound on sends not yet echoed.
    pub max_pending_sends: usize,
    /// Stop applying once this seq is applied.
    pub stop_after: Option<Seq>,
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
    /// A message was applied to the island.
    Message(Message),
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
}

struct SyncProgress {
    at: u64,
    expect: Option<u64>,
    data: BytesMut,
}

/// The replica state machine. Feed it frames, drain frames and events.
pub struct Replica<I> {
    cfg: ReplicaConfig,
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
}

impl<I: Island> Replica<I> {
    /// A replica with its island in the initial state.
    pub fn new(cfg: ReplicaConfig, island: I) -> Self {
        Replica {
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

    /// Sends not yet echoed by the router.
    pub fn pending_sends(&self) -> usize {
        self.unconfirmed.len()
    }

    /// The hello for a new connection (sent after the preamble exchange). Resumes when the state is consistent, and
    /// asks to create the session only before the first welcome: after a router restart the
    /// replica must learn the session is gone, not silently start a new one.
    pub fn hello(&self) -> Bytes {
        let hello = ClientFrame::Hello(Hello {
            session: self.cfg.session,
            token: self.cfg.token,
            replica: self.cfg.replica,
            name: self.cfg.name.clone(),
            role: self.cfg.role,
            resume_from: self.valid.then_some(Seq(self.last_seq)),
            create: if self.welcomed_once {
                None
            } else {
                self.cfg.create.clone()
            },
        });
        wire::encode(&hello)
    }

    /// The connection is gone. A sync in progress leaves the island inconsistent, so the next
    /// connection asks for a full sync.
    pub fn disconnected(&mut self) {
        self.welcomed = false;
        if self.sync.take().is_some() {
            self.valid = false;
        }
    }

    /// Queues a payload for the order. Returns its client seq.
    pub fn send(&mut self, payload: Bytes) -> Result<u64, crate::ClientError> {
        if payload.len() > self.max_payload {
            return Err(crate::ClientError::PayloadTooLarge {
                len: payload.len(),
                max: self.max_payload,
            });
        }
        if self.unconfirmed.len() >= self.cfg.max_pending_sends {
            return Err(crate::ClientError::TooManyPending(
                self.cfg.max_pending_sends,
            ));
        }
        self.next_client_seq += 1;
        let client_seq = self.next_client_seq;
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
            ServerFrame::Welcome(w) => {
                self.welcomed_once = true;
                self.welcomed = true;
                self.max_payload = w.max_payload_bytes as usize;
                self.confirm_upto(w.last_client_seq);
                // Resend what the router has not stamped; it drops any duplicates.
                for (client_seq, payload) in self.unconfirmed.clone() {
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
                self.valid = false;
                if snapshot_len.is_none() {
                    if at.0 != 0 {
                        return Err(FrameError::Protocol("fresh sync not at seq 0".into()));
                    }
                    self.island.reset();
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
                if (s.data.len() + data.len()) as u64 > expect {
                    return Err(FrameError::Protocol(
                        "more snapshot data than announced".into(),
                    ));
                }
                s.data.extend_from_slice(&data);
            }
            ServerFrame::Message(m) => {
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
                self.confirm_upto(last_client_seq);
                self.events.push_back(Event::Synced { seq });
                self.check_stop();
            }
            ServerFrame::Tick { time } => {
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
        self.island.restore(&data).map_err(FrameError::Restore)?;
        self.last_seq = at;
        self.events.push_back(Event::Restored { at: Seq(at) });
        self.check_stop();
        Ok(())
    }

    fn apply(&mut self, m: Message) -> Result<(), FrameError> {
        if self.stopped {
            return Ok(());
        }
        if m.seq.0 != self.last_seq + 1 {
            return Err(FrameError::Protocol(format!(
                "expected seq {}, got {}",
                self.last_seq + 1,
                m.seq.0
            )));
        }
        self.island.apply(&m);
        self.last_seq = m.seq.0;
        if m.origin == Origin::Replica(self.cfg.replica) {
            self.confirm_upto(m.client_seq);
        }
        if self.cfg.digest_every > 0 && m.seq.0 % self.cfg.digest_every == 0 {
            let hash = Bytes::from(self.island.digest());
            self.out
                .push_back(wire::encode(&ClientFrame::Digest { seq: m.seq, hash }));
        }
        self.events.push_back(Event::Message(m));
        self.check_stop();
        Ok(())
    }

    fn check_stop(&mut self) {
        if let Some(stop) = self.cfg.stop_after {
            if self.last_seq >= stop.0 && !self.stopped {
                self.stopped = true;
                self.events.push_back(Event::Stopped {
                    seq: Seq(self.last_seq),
                    digest: self.island.digest(),
                });
            }
        }
    }

    fn upload_snapshot(&mut self, request: u64, at: Seq) {
        let data = Bytes::from(self.island.snapshot());
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
    use isthmus_router::wire::Welcome;

    fn cfg(stop_after: Option<Seq>) -> ReplicaConfig {
        ReplicaConfig {
            session: SessionId::random(),
            token: JoinToken([1; 32]),
            replica: ReplicaId(uuid::Uuid::from_u128(5)),
            name: "t".into(),
            role: Role::Replica,
            create: Some(CreateOptions::default()),
            digest_every: 2,
            max_pending_sends: 3,
            stop_after,
        }
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
        })
    }

    fn msg(seq: u64, origin: Origin, client_seq: u64) -> ServerFrame {
        ServerFrame::Message(Message {
            seq: Seq(seq),
            time: RouterTime(seq * 10),
            origin,
            client_seq,
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

    fn hello_of(r: &Replica<ChatIsland>) -> Hello {
        let mut buf = BytesMut::from(&r.hello()[..]);
        match wire::decode::<ClientFrame>(&mut buf, usize::MAX) {
            Ok(Some(ClientFrame::Hello(h))) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn creates_only_before_the_first_welcome_and_resumes_only_when_consistent() {
        let mut r = Replica::new(cfg(None), ChatIsland::default());
        let h = hello_of(&r);
        assert!(h.create.is_some() && h.resume_from.is_none());
        r.handle_frame(welcome(0)).expect("welcome");
        start_fresh(&mut r);
        r.handle_frame(msg(1, Origin::Router, 0)).expect("m1");
        // Dropped mid-sync: the state is partial, so no resume.
        r.disconnected();
        let h = hello_of(&r);
        assert!(h.create.is_none(), "never create on a reconnect");
        assert_eq!(h.resume_from, None);
        r.handle_frame(welcome(0)).expect("welcome");
        start_fresh(&mut r);
        r.handle_frame(msg(1, Origin::Router, 0)).expect("m1");
        r.handle_frame(ServerFrame::Synced {
            seq: Seq(1),
            last_client_seq: 0,
        })
        .expect("synced");
        r.disconnected();
        assert_eq!(hello_of(&r).resume_from, Some(Seq(1)));
    }

    #[test]
    fn a_gap_is_a_protocol_error() {
        let mut r = Replica::new(cfg(None), ChatIsland::default());
        r.handle_frame(welcome(0)).expect("welcome");
        start_fresh(&mut r);
        assert!(matches!(
            r.handle_frame(msg(2, Origin::Router, 0)),
            Err(FrameError::Protocol(_))
        ));
    }

    #[test]
    fn sends_are_confirmed_by_client_seq_and_resent_after_a_welcome() {
        let me = Origin::Replica(ReplicaId(uuid::Uuid::from_u128(5)));
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
        start_fresh(&mut r);
        r.handle_frame(ServerFrame::Synced {
            seq: Seq(0),
            last_client_seq: 0,
        })
        .expect("synced");
        r.handle_frame(msg(1, me, 1)).expect("echo of a");
        assert_eq!(r.pending_sends(), 2);
        r.disconnected();
        // The router says it stamped up to client seq 2: only c is resent.
        while r.poll_transmit().is_some() {}
        r.handle_frame(welcome(2)).expect("welcome");
        let resent: Vec<u64> = std::iter::from_fn(|| r.poll_transmit())
            .filter_map(|b| {
                let mut buf = BytesMut::from(&b[..]);
                match wire::decode::<ClientFrame>(&mut buf, usize::MAX) {
                    Ok(Some(ClientFrame::Send { client_seq, .. })) => Some(client_seq),
                    _ => None,
                }
            })
            .collect();
        assert_eq!(resent, vec![3]);
    }

    #[test]
    fn stop_after_counts_a_seq_inside_a_snapshot_and_digests_are_reported() {
        let mut provider = Replica::new(cfg(None), ChatIsland::default());
        provider.handle_frame(welcome(0)).expect("welcome");
        start_fresh(&mut provider);
        for s in 1..=4 {
            provider
                .handle_frame(msg(s, Origin::Router, 0))
                .expect("msg");
        }
        let digests = std::iter::from_fn(|| provider.poll_transmit())
            .filter(|b| {
                let mut buf = BytesMut::from(&b[..]);
                matches!(
                    wire::decode::<ClientFrame>(&mut buf, usize::MAX),
                    Ok(Some(ClientFrame::Digest { .. }))
                )
            })
            .count();
        assert_eq!(digests, 2, "every 2 messages");
        let snap = provider.island().snapshot();

        let mut joiner = Replica::new(cfg(Some(Seq(3))), ChatIsland::default());
        joiner.handle_frame(welcome(0)).expect("welcome");
        joiner
            .handle_frame(ServerFrame::SyncBegin {
                at: Seq(4),
                snapshot_len: Some(snap.len() as u64),
            })
            .expect("sync");
        joiner
            .handle_frame(ServerFrame::SnapshotData {
                data: Bytes::from(snap),
            })
            .expect("data");
        joiner
            .handle_frame(ServerFrame::Synced {
                seq: Seq(4),
                last_client_seq: 0,
            })
            .expect("synced");
        assert!(joiner.is_stopped());
        let stopped = std::iter::from_fn(|| joiner.poll_event())
            .find_map(|e| match e {
                Event::Stopped { seq, digest } => Some((seq, digest)),
                _ => None,
            })
            .expect("stopped");
        assert_eq!(stopped, (Seq(4), provider.island().digest()));
    }
}
