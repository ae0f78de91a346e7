//! The session core driven by simulated replicas on a virtual clock, over generated
//! interleavings of joins, leaves, drops, resumes, sends, flushes and snapshot uploads.
//!
//! Every simulated replica decodes the real frames the core emits and keeps a log of what it
//! applied; its snapshot is that log. The checks: every replica's log is one prefix of a single
//! total order (seq from 1, no gap, no duplicate), router time never decreases on any stream, a
//! send is stamped exactly once even when resent after a reconnect, and after the dust settles
//! every attached replica holds the whole order.

use bytes::{Bytes, BytesMut};
use isthmus_router::auth::{self, Capability, IslandKeys, KeyPair};
use isthmus_router::budget::MemoryBudget;
use isthmus_router::ids::{ConnId, ReplicaId, Seq};
use isthmus_router::session::{JoinRequest, Output, Session, SessionConfig};
use isthmus_router::wire::{self, AdminCommand, ClientFrame, Code, Origin, Role, ServerFrame};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

type Entry = (u64, Origin, Bytes);

#[derive(Default)]
struct Replica {
    conn: Option<ConnId>,
    /// Frames handed to the "socket" and not yet read by the replica.
    inbox: VecDeque<Bytes>,
    log: Vec<Entry>,
    /// The log is a valid state (synced at least once and not mid-sync).
    valid: bool,
    syncing: Option<SyncProgress>,
    last_time: u64,
    next_client_seq: u64,
    /// Sends not yet seen stamped: (client_seq, payload).
    unconfirmed: VecDeque<(u64, Bytes)>,
    /// A snapshot owed to the router: (request, at, bytes, offset sent so far).
    owed: Option<(u64, u64, Vec<u8>, usize)>,
    closed_with: Option<Code>,
    /// The reason of the last goodbye or refusal.
    closed_reason: String,
    /// Joins with this role (a participant when `None`).
    role: Option<Role>,
    /// Joins as an admin control connection.
    control: bool,
    /// The nonce of the current connection's router preamble.
    nonce: [u8; 32],
    /// Divergence reports received.
    divergences: Vec<wire::Divergence>,
    /// Who the router says is attached, from presence frames.
    present: std::collections::BTreeSet<ReplicaId>,
    /// The next presence frame is the whole list (it follows a welcome).
    presence_is_whole: bool,
    /// Answers to admin commands: (seq, ok, message).
    admin_done: Vec<(u64, bool, String)>,
    /// The kind of every frame received, in order.
    received: Vec<&'static str>,
}

struct SyncProgress {
    at: u64,
    expect: Option<u64>,
    data: Vec<u8>,
}

fn encode_log(log: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (seq, origin, payload) in log {
        out.extend_from_slice(&seq.to_le_bytes());
        match origin {
            Origin::Router => out.push(0),
            Origin::Replica(r) => {
                out.push(1);
                out.extend_from_slice(r.0.as_bytes());
            }
        }
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
    }
    out
}

fn decode_log(mut b: &[u8]) -> Vec<Entry> {
    let mut log = Vec::new();
    while !b.is_empty() {
        let seq = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        b = &b[8..];
        let origin = if b[0] == 0 {
            b = &b[1..];
            Origin::Router
        } else {
            let id = Uuid::from_slice(&b[1..17]).expect("uuid");
            b = &b[17..];
            Origin::Replica(ReplicaId(id))
        };
        let len = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as usize;
        let payload = Bytes::copy_from_slice(&b[4..4 + len]);
        b = &b[4 + len..];
        log.push((seq, origin, payload));
    }
    log
}

/// The public keys of a test island whose admin secret is `n` repeated.
fn test_keys(n: u8) -> IslandKeys {
    auth::island_keys(&Capability::from_parts(Role::Admin, [n; 32])).expect("an admin capability")
}

struct World {
    core: Session,
    now: Instant,
    replicas: Vec<Replica>,
    ids: Vec<ReplicaId>,
    next_conn: u64,
    /// The one total order as observed by anyone: seq -> (origin, payload).
    truth: BTreeMap<u64, (Origin, Bytes)>,
    chunk: usize,
    /// Every code a replica was closed or refused with.
    closes: Vec<Code>,
    /// Snapshot pieces sent broken on purpose (each closes its sender with 2004).
    bad_pieces: usize,
}

impl World {
    fn new(n: usize, cfg: SessionConfig) -> Self {
        let now = Instant::now();
        World {
            core: {
                let keys = test_keys(1);
                Session::new(keys.session_id(), keys, cfg, now)
            },
            now,
            replicas: (0..n).map(|_| Replica::default()).collect(),
            ids: (0..n)
                .map(|i| ReplicaId(Uuid::from_u128(100 + i as u128)))
                .collect(),
            next_conn: 1,
            truth: BTreeMap::new(),
            chunk: 40,
            closes: Vec::new(),
            bad_pieces: 0,
        }
    }

    /// Every attached participant's presence list names exactly the attached participants.
    fn check_presence(&self) {
        let attached: std::collections::BTreeSet<ReplicaId> = self
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.conn.is_some() && !r.control)
            .map(|(j, _)| self.ids[j])
            .collect();
        for (i, r) in self.replicas.iter().enumerate() {
            if r.conn.is_some() && !r.control {
                assert_eq!(r.present, attached, "replica {i}'s presence list");
            }
        }
    }

    fn conn_owner(&self, conn: ConnId) -> Option<usize> {
        self.replicas.iter().position(|r| r.conn == Some(conn))
    }

    fn drain(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit { conn, frame } => {
                    let owner = self
                        .conn_owner(conn)
                        .expect("transmit to a known connection");
                    self.replicas[owner].inbox.push_back(frame);
                }
                Output::Close {
                    conn,
                    goodbye,
                    discard_queued,
                } => {
                    let Some(i) = self.conn_owner(conn) else {
                        continue;
                    };
                    if discard_queued {
                        self.replicas[i].inbox.clear();
                    }
                    // The replica reads what was written before the close, then sees EOF.
                    let frames: Vec<Bytes> = self.replicas[i].inbox.drain(..).collect();
                    for f in frames.into_iter().chain(goodbye) {
                        self.apply(i, &f);
                    }
                    let r = &mut self.replicas[i];
                    r.conn = None;
                    r.owed = None;
                    if r.syncing.is_some() {
                        r.syncing = None;
                        r.valid = false;
                    }
                }
                Output::Notice(_) => {}
            }
        }
    }

    /// Connects replica `i` if it is not connected, and reads the router's first answer (a
    /// welcome or a refusal) as a client does before it resends anything. True if it joined.
    fn join(&mut self, i: usize, resume: bool) -> bool {
        if self.replicas[i].conn.is_some() {
            return false;
        }
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let r = &mut self.replicas[i];
        r.conn = Some(conn);
        r.closed_with = None;
        // A distinct nonce per connection, as the router's preamble gives.
        r.nonce = [0; 32];
        r.nonce[..8].copy_from_slice(&conn.0.to_le_bytes());
        let resume_from = (resume && r.valid).then(|| Seq(r.log.last().map_or(0, |e| e.0)));
        if resume_from.is_none() {
            r.valid = false;
        }
        let req = JoinRequest {
            replica: self.ids[i],
            name: format!("r{i}"),
            role: r.role.unwrap_or(Role::Replica),
            resume_from,
            contacts: wire::Contacts::default(),
            created: false,
            nonce: r.nonce,
            control: r.control,
            recover: None,
            cluster: Vec::new(),
        };
        self.core.handle_join(conn, req, self.now);
        self.drain();
        if self.replicas[i].conn != Some(conn) {
            return false; // refused
        }
        let welcome = self.replicas[i].inbox.pop_front().expect("a welcome");
        self.apply(i, &welcome);
        self.core.handle_flushed(conn, welcome.len(), self.now);
        self.drain();
        true
    }

    fn frame(&mut self, i: usize, frame: ClientFrame) {
        if let Some(conn) = self.replicas[i].conn {
            self.core.handle_frame(conn, frame, self.now);
            self.drain();
        }
    }

    fn send(&mut self, i: usize) {
        if self.replicas[i].conn.is_none() {
            return;
        }
        let r = &mut self.replicas[i];
        r.next_client_seq += 1;
        let cs = r.next_client_seq;
        let payload = Bytes::from(format!("r{i}-m{cs}"));
        r.unconfirmed.push_back((cs, payload.clone()));
        self.frame(
            i,
            ClientFrame::Send {
                client_seq: cs,
                payload,
            },
        );
    }

    /// After a reconnect the replica resends everything the welcome did not confirm, as a
    /// client would. (Resending a confirmed send is a protocol violation.)
    fn resend(&mut self, i: usize) {
        let pending: Vec<(u64, Bytes)> = self.replicas[i].unconfirmed.iter().cloned().collect();
        for (client_seq, payload) in pending {
            self.frame(
                i,
                ClientFrame::Send {
                    client_seq,
                    payload,
                },
            );
        }
    }

    fn flush(&mut self, i: usize) {
        let Some(conn) = self.replicas[i].conn else {
            return;
        };
        let frames: Vec<Bytes> = self.replicas[i].inbox.drain(..).collect();
        let bytes: usize = frames.iter().map(|f| f.len()).sum();
        for f in &frames {
            self.apply(i, f);
        }
        self.core.handle_flushed(conn, bytes, self.now);
        self.drain();
    }

    fn upload(&mut self, i: usize, all: bool) {
        loop {
            let Some((request, at, data, offset)) = self.replicas[i].owed.take() else {
                return;
            };
            let end = (offset + self.chunk).min(data.len());
            let piece = Bytes::copy_from_slice(&data[offset..end]);
            let total = data.len() as u64;
            if end < data.len() {
                self.replicas[i].owed = Some((request, at, data, end));
            }
            self.frame(
                i,
                ClientFrame::SnapshotChunk {
                    request,
                    at: Seq(at),
                    offset: offset as u64,
                    total,
                    data: piece,
                },
            );
            if !all || self.replicas[i].owed.is_none() {
                return;
            }
        }
    }

    /// Replica `i`, if it owes a snapshot, sends a piece at the wrong offset: the core must
    /// close it and serve its joiners another way.
    fn bad_piece(&mut self, i: usize) {
        let Some((request, at, data, offset)) = self.replicas[i].owed.clone() else {
            return;
        };
        self.bad_pieces += 1;
        self.frame(
            i,
            ClientFrame::SnapshotChunk {
                request,
                at: Seq(at),
                offset: offset as u64 + 1,
                total: data.len() as u64,
                data: Bytes::from_static(b"?"),
            },
        );
    }

    fn apply(&mut self, i: usize, bytes: &Bytes) {
        let mut buf = BytesMut::from(&bytes[..]);
        let frame: ServerFrame = wire::decode(&mut buf, usize::MAX)
            .expect("core emits valid frames")
            .expect("core emits whole frames");
        assert!(buf.is_empty(), "one frame per transmit");
        let me = self.ids[i];
        let r = &mut self.replicas[i];
        r.received.push(frame_kind(&frame));
        match frame {
            ServerFrame::Presence { joined, left } => {
                if std::mem::take(&mut r.presence_is_whole) {
                    r.present.clear();
                    assert!(
                        joined.iter().any(|p| p.replica == me),
                        "the whole list names the joiner itself"
                    );
                }
                r.present.extend(joined.iter().map(|p| p.replica));
                for gone in left {
                    r.present.remove(&gone);
                }
            }
            ServerFrame::Welcome(w) => {
                r.presence_is_whole = true;
                assert_eq!(w.replica, me);
                // Drop what the router already stamped; the rest is resent.
                r.unconfirmed.retain(|(cs, _)| *cs > w.last_client_seq);
            }
            ServerFrame::SyncBegin { at, snapshot_len } => {
                // A full sync replaces the state, and with it the replica's notion of time.
                r.valid = false;
                r.last_time = 0;
                r.syncing = Some(SyncProgress {
                    at: at.0,
                    expect: snapshot_len,
                    data: Vec::new(),
                });
                if snapshot_len.is_none() {
                    assert_eq!(at, Seq(0), "a fresh start begins before seq 1");
                    r.log.clear();
                }
            }
            ServerFrame::SnapshotData { data } => {
                let s = r.syncing.as_mut().expect("snapshot data inside a sync");
                s.data.extend_from_slice(&data);
                assert!(s.data.len() as u64 <= s.expect.expect("announced size"));
            }
            ServerFrame::Message(m) => {
                if let Some(s) = r.syncing.as_mut() {
                    if let Some(len) = s.expect.take() {
                        assert_eq!(s.data.len() as u64, len, "whole snapshot before backlog");
                        r.log = decode_log(&s.data);
                        assert_eq!(r.log.last().map_or(0, |e| e.0), s.at);
                    }
                }
                let expected = r.log.last().map_or(0, |e| e.0) + 1;
                assert_eq!(m.seq.0, expected, "replica {i}: seq gap or duplicate");
                assert!(m.time.0 >= r.last_time, "router time went backwards");
                r.last_time = m.time.0;
                // During a full sync, own sends are settled by `Synced` (some are inside the
                // snapshot); afterwards they come back in the order they were sent.
                if m.origin == Origin::Replica(me) && r.syncing.is_none() {
                    if let Some(pos) = r.unconfirmed.iter().position(|(cs, _)| *cs == m.client_seq)
                    {
                        assert_eq!(
                            r.unconfirmed[pos].1, m.payload,
                            "client seq matches payload"
                        );
                        assert_eq!(
                            pos, 0,
                            "own sends are stamped in order: replica {i} {:?} got {:?}",
                            r.unconfirmed, m
                        );
                        r.unconfirmed.pop_front();
                    }
                }
                r.log.push((m.seq.0, m.origin, m.payload.clone()));
                match self.truth.get(&m.seq.0) {
                    Some(t) => assert_eq!(t, &(m.origin, m.payload), "two orders disagree"),
                    None => {
                        self.truth.insert(m.seq.0, (m.origin, m.payload));
                    }
                }
            }
            ServerFrame::Synced {
                seq,
                last_client_seq,
            } => {
                r.unconfirmed.retain(|(cs, _)| *cs > last_client_seq);
                if let Some(s) = r.syncing.take() {
                    if let Some(len) = s.expect {
                        assert_eq!(s.data.len() as u64, len);
                        r.log = decode_log(&s.data);
                    }
                }
                assert_eq!(r.log.last().map_or(0, |e| e.0), seq.0, "synced at the end");
                r.valid = true;
            }
            ServerFrame::Tick { time } => {
                assert!(time.0 >= r.last_time, "tick went backwards");
                r.last_time = time.0;
            }
            ServerFrame::SnapshotRequest { request, at } => {
                assert!(r.valid && r.syncing.is_none(), "only live replicas provide");
                assert_eq!(
                    r.log.last().map_or(0, |e| e.0),
                    at.0,
                    "asked at its own seq"
                );
                r.owed = Some((request, at.0, encode_log(&r.log), 0));
            }
            ServerFrame::Goodbye { code, reason } | ServerFrame::Refuse { code, reason } => {
                r.closed_with = Some(code);
                r.closed_reason = reason;
                self.closes.push(code);
            }
            ServerFrame::AdminDone { seq, ok, message } => r.admin_done.push((seq, ok, message)),
            ServerFrame::Divergence(d) => r.divergences.push(d),
            ServerFrame::Ping { .. } | ServerFrame::Pong { .. } => {}
            ServerFrame::Redirect { .. } => panic!("a lone session core never redirects"),
        }
    }

    /// Sends an admin command signed with `key` over the connection's nonce.
    fn admin(&mut self, i: usize, seq: u64, command: AdminCommand, key: &KeyPair) {
        let nonce = self.replicas[i].nonce;
        let transcript = auth::admin_transcript(&nonce, self.core.id(), seq, &command);
        let sig = key.sign(&transcript);
        self.frame(i, ClientFrame::Admin { seq, command, sig });
    }

    fn check_prefixes(&self) {
        for r in &self.replicas {
            if !r.valid {
                continue;
            }
            for (k, (seq, origin, payload)) in r.log.iter().enumerate() {
                assert_eq!(*seq, k as u64 + 1, "log contiguous from 1");
                assert_eq!(self.truth.get(seq), Some(&(*origin, payload.clone())));
            }
        }
    }

    /// Lets everything settle: every replica reads, providers upload, time passes.
    fn settle(&mut self) {
        for _ in 0..200 {
            for i in 0..self.replicas.len() {
                self.flush(i);
                self.upload(i, true);
            }
            self.now += Duration::from_millis(5);
            self.core.handle_timeout(self.now);
            self.drain();
            let quiet = self
                .replicas
                .iter()
                .all(|r| r.inbox.is_empty() && r.owed.is_none() && (r.conn.is_none() || r.valid));
            if quiet {
                return;
            }
        }
    }
}

fn frame_kind(frame: &ServerFrame) -> &'static str {
    match frame {
        ServerFrame::Welcome(_) => "welcome",
        ServerFrame::Refuse { .. } => "refuse",
        ServerFrame::Message(_) => "message",
        ServerFrame::Tick { .. } => "tick",
        ServerFrame::SnapshotRequest { .. } => "snapshot request",
        ServerFrame::SyncBegin { .. } => "sync begin",
        ServerFrame::SnapshotData { .. } => "snapshot data",
        ServerFrame::Synced { .. } => "synced",
        ServerFrame::Divergence(_) => "divergence",
        ServerFrame::Ping { .. } => "ping",
        ServerFrame::Pong { .. } => "pong",
        ServerFrame::Goodbye { .. } => "goodbye",
        ServerFrame::AdminDone { .. } => "admin done",
        ServerFrame::Presence { .. } => "presence",
        ServerFrame::Redirect { .. } => "redirect",
    }
}

#[derive(Clone, Debug)]
enum Op {
    Join(usize),
    Resume(usize),
    Leave(usize),
    Drop(usize),
    Send(usize),
    Flush(usize),
    UploadPiece(usize),
    UploadAll(usize),
    Advance(u64),
    BadPiece(usize),
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..n).prop_map(Op::Join),
        2 => (0..n).prop_map(Op::Resume),
        1 => (0..n).prop_map(Op::Leave),
        1 => (0..n).prop_map(Op::Drop),
        8 => (0..n).prop_map(Op::Send),
        6 => (0..n).prop_map(Op::Flush),
        2 => (0..n).prop_map(Op::UploadPiece),
        2 => (0..n).prop_map(Op::UploadAll),
        2 => (1u64..120).prop_map(Op::Advance),
    ]
}

/// Like [`op`], plus snapshot pieces broken on purpose and more uploads, so uploads fail at
/// every point of their stream.
fn op_with_failures(n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => op(n),
        1 => (0..n).prop_map(Op::BadPiece),
        2 => (0..n).prop_map(Op::UploadPiece),
    ]
}

fn small_config() -> SessionConfig {
    SessionConfig {
        tick_interval: Duration::from_millis(50),
        max_history_messages: 30,
        max_history_bytes: 4000,
        max_outbound_bytes: 1500,
        snapshot_chunk_bytes: 64,
        snapshot_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_secs(3600),
        ..SessionConfig::default()
    }
}

fn run(ops: &[Op], cfg: SessionConfig) -> World {
    run_with_chunk(ops, cfg, 40)
}

/// [`run`] with providers uploading pieces of `chunk` bytes.
fn run_with_chunk(ops: &[Op], cfg: SessionConfig, chunk: usize) -> World {
    let n = 4;
    let budget = cfg.budget.clone();
    let mut w = World::new(n, cfg);
    w.chunk = chunk;
    for op in ops {
        match *op {
            Op::Join(i) => {
                w.join(i, false);
            }
            Op::Resume(i) => {
                if w.join(i, true) {
                    w.resend(i);
                }
            }
            Op::Leave(i) => w.frame(i, ClientFrame::Leave),
            Op::Drop(i) => {
                if let Some(conn) = w.replicas[i].conn.take() {
                    w.replicas[i].inbox.clear();
                    w.replicas[i].owed = None;
                    if w.replicas[i].syncing.take().is_some() {
                        w.replicas[i].valid = false;
                    }
                    w.core.handle_disconnect(conn, w.now);
                    w.drain();
                }
            }
            Op::Send(i) => w.send(i),
            Op::Flush(i) => w.flush(i),
            Op::UploadPiece(i) => w.upload(i, false),
            Op::UploadAll(i) => w.upload(i, true),
            Op::Advance(ms) => {
                w.now += Duration::from_millis(ms);
                w.core.handle_timeout(w.now);
                w.drain();
            }
            Op::BadPiece(i) => w.bad_piece(i),
        }
        w.check_prefixes();
        assert!(budget.used() <= budget.limit(), "{budget:?}");
    }
    // Before anyone returns: what each attached replica was told about presence is the truth,
    // leaves included.
    w.settle();
    w.check_presence();
    // Everyone still away comes back and resends; then the world settles.
    for i in 0..n {
        if w.join(i, true) {
            w.resend(i);
        }
    }
    w.settle();
    w
}

fn check_final(w: &World) {
    let last = w.core.last_seq().0;
    // What anyone observed is gap-free from 1. (It may stop short of `last` when, under tiny
    // history bounds, every replica was refused for want of a snapshot provider.)
    let observed = w.truth.len() as u64;
    assert!(
        w.truth.keys().copied().eq(1..=observed),
        "the observed order has gaps"
    );
    assert!(observed <= last);
    // Honest replicas never break the protocol, resends after reconnects included: the only
    // violations are the pieces broken on purpose.
    assert!(
        w.closes
            .iter()
            .filter(|c| **c == Code::PROTOCOL_VIOLATION)
            .count()
            <= w.bad_pieces,
        "closes: {:?}",
        w.closes
    );
    // Exactly-once: no payload stamped twice.
    let mut seen = HashMap::new();
    for (seq, (origin, payload)) in &w.truth {
        if *origin == Origin::Router {
            continue;
        }
        if let Some(prev) = seen.insert(payload.clone(), *seq) {
            panic!("payload {payload:?} stamped twice, at {prev} and {seq}");
        }
    }
    w.check_presence();
    for (i, r) in w.replicas.iter().enumerate() {
        if r.conn.is_none() {
            // Refused for a retryable reason (e.g. no snapshot provider): nothing to compare.
            assert!(
                r.closed_with.is_some_and(|c| c.is_retryable()),
                "replica {i} closed with {:?}",
                r.closed_with
            );
            continue;
        }
        assert!(r.valid, "replica {i} synced");
        assert_eq!(r.log.len() as u64, last, "replica {i} has the whole order");
        assert!(r.unconfirmed.is_empty(), "replica {i}: every send stamped");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn every_replica_sees_one_total_order(ops in proptest::collection::vec(op(4), 1..120)) {
        let w = run(&ops, small_config());
        check_final(&w);
    }

    #[test]
    fn membership_announcements_keep_the_order(ops in proptest::collection::vec(op(4), 1..80)) {
        let cfg = SessionConfig { announce_membership: true, ..small_config() };
        let w = run(&ops, cfg);
        check_final(&w);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    /// With a history bound that is never reached, nobody may fall behind: cutting the history
    /// after a snapshot must keep what syncing and resuming replicas still need.
    #[test]
    fn nobody_falls_behind_while_history_fits(ops in proptest::collection::vec(op(4), 1..120)) {
        let cfg = SessionConfig { max_history_messages: 100_000, max_history_bytes: 1 << 30, ..small_config() };
        let w = run(&ops, cfg);
        check_final(&w);
        prop_assert!(!w.closes.contains(&Code::FELL_BEHIND), "closes: {:?}", w.closes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 800, ..ProptestConfig::default() })]

    /// Uploads relayed as they arrive, in pieces bigger or smaller than the relay frames, to
    /// joiners reading at their own pace, while providers leave, drop, time out, break the
    /// protocol mid-stream and the memory budget runs short: every joiner ends synced with the
    /// exact order (its snapshot decodes to the truth) or closed with a retryable code, and
    /// the budget is never passed and given back whole.
    #[test]
    fn streamed_snapshots_survive_failures_at_every_point(
        ops in proptest::collection::vec(op_with_failures(4), 1..120),
        chunk in 1usize..200,
        relay in 1usize..100,
        limit in prop_oneof![Just(usize::MAX), 1000usize..6000],
    ) {
        let budget = Arc::new(if limit == usize::MAX { MemoryBudget::unlimited() } else { MemoryBudget::new(limit) });
        let cfg = SessionConfig { snapshot_chunk_bytes: relay, budget: budget.clone(), ..small_config() };
        let w = run_with_chunk(&ops, cfg, chunk);
        check_final(&w);
        drop(w);
        prop_assert_eq!(budget.used(), 0, "a dropped session gives back everything");
    }
}

#[test]
fn resuming_replica_keeps_its_backlog_when_a_snapshot_cuts_history() {
    let cfg = SessionConfig {
        max_outbound_bytes: 600,
        ..SessionConfig::default()
    };
    let mut w = World::new(3, cfg);
    w.join(0, false);
    w.join(1, false);
    w.flush(0);
    w.flush(1);
    let conn = w.replicas[1].conn.take().expect("connected");
    w.core.handle_disconnect(conn, w.now);
    w.drain();
    for _ in 0..50 {
        w.send(0);
        w.flush(0);
    }
    w.join(1, true); // paced backlog from seq 1: not flushed yet
    w.join(2, false); // asks replica 0 for a snapshot at 50, which cuts the history
    w.flush(0);
    w.upload(0, true);
    w.settle();
    assert_eq!(w.replicas[1].closed_with, None);
    assert_eq!(w.replicas[1].log.len(), 50);
    assert_eq!(w.replicas[2].log.len(), 50);
}

#[test]
fn first_replica_starts_fresh_and_ticks_flow() {
    let mut w = World::new(2, SessionConfig::default());
    w.join(0, false);
    w.flush(0);
    assert!(w.replicas[0].valid);
    w.now += Duration::from_millis(49);
    w.core.handle_timeout(w.now);
    w.drain();
    assert!(
        w.replicas[0].inbox.is_empty(),
        "no tick before the interval"
    );
    w.now += Duration::from_millis(1);
    w.core.handle_timeout(w.now);
    w.drain();
    w.flush(0);
    assert_eq!(w.replicas[0].last_time, 50_000, "a tick at 50 ms");
    assert!(w.truth.is_empty(), "ticks are not sequenced");
}

#[test]
fn late_joiner_gets_snapshot_then_backlog_while_messages_flow() {
    let mut w = World::new(3, SessionConfig::default());
    w.join(0, false);
    for _ in 0..10 {
        w.send(0);
    }
    w.flush(0);
    w.join(1, false);
    // The provider is asked at seq 10; more messages arrive before it uploads.
    w.flush(0);
    assert_eq!(w.replicas[0].owed.as_ref().map(|o| o.1), Some(10));
    for _ in 0..5 {
        w.send(0);
    }
    w.upload(0, true);
    w.flush(1);
    assert!(w.replicas[1].valid);
    assert_eq!(w.replicas[1].log.len(), 15);
    w.check_prefixes();
}

#[test]
fn provider_leaving_mid_upload_hands_over_to_another() {
    let mut w = World::new(3, SessionConfig::default());
    w.chunk = 8;
    w.join(0, false);
    w.join(1, false);
    for _ in 0..6 {
        w.send(0);
    }
    w.flush(0);
    w.flush(1);
    w.join(2, false);
    w.flush(0);
    w.flush(1);
    let provider = if w.replicas[0].owed.is_some() { 0 } else { 1 };
    let other = 1 - provider;
    w.upload(provider, false);
    // The provider vanishes halfway.
    let conn = w.replicas[provider].conn.take().expect("connected");
    w.core.handle_disconnect(conn, w.now);
    w.drain();
    w.flush(other);
    assert!(
        w.replicas[other].owed.is_some(),
        "the other replica is asked"
    );
    w.upload(other, true);
    w.flush(2);
    assert!(w.replicas[2].valid);
    assert_eq!(w.replicas[2].log.len(), 6);
}

#[test]
fn resend_after_reconnect_is_not_stamped_twice() {
    let mut w = World::new(2, SessionConfig::default());
    w.join(0, false);
    w.send(0);
    w.send(0);
    // Connection drops before the replica read its own messages back.
    let conn = w.replicas[0].conn.take().expect("connected");
    w.replicas[0].inbox.clear();
    w.core.handle_disconnect(conn, w.now);
    w.drain();
    assert!(w.join(0, true));
    assert!(
        w.replicas[0].unconfirmed.is_empty(),
        "the welcome confirmed both sends"
    );
    w.resend(0);
    w.flush(0);
    assert_eq!(w.core.last_seq(), Seq(2));
    assert_eq!(w.replicas[0].log.len(), 2);
    assert!(w.replicas[0].unconfirmed.is_empty());
}

#[test]
fn slow_consumer_is_disconnected_and_others_are_not_blocked() {
    let cfg = SessionConfig {
        max_outbound_bytes: 2000,
        ..SessionConfig::default()
    };
    let mut w = World::new(2, cfg);
    w.join(0, false);
    w.join(1, false);
    w.flush(0);
    w.flush(1);
    for _ in 0..200 {
        w.send(0);
        w.flush(0);
    }
    assert_eq!(w.replicas[1].closed_with, Some(Code::SLOW_CONSUMER));
    assert_eq!(
        w.replicas[0].log.len(),
        200,
        "the fast replica got everything"
    );
    // The slow one resumes and catches up.
    w.join(1, true);
    w.settle();
    assert_eq!(w.replicas[1].log.len(), 200);
}

#[test]
fn divergent_digests_are_reported_with_the_replicas() {
    let mut w = World::new(3, SessionConfig::default());
    for i in 0..3 {
        w.join(i, false);
    }
    w.send(0);
    for i in 0..3 {
        w.flush(i);
    }
    let hash = |b: &str| Bytes::copy_from_slice(b.as_bytes());
    w.frame(
        0,
        ClientFrame::Digest {
            seq: Seq(1),
            hash: hash("aaaa"),
        },
    );
    w.frame(
        1,
        ClientFrame::Digest {
            seq: Seq(1),
            hash: hash("aaaa"),
        },
    );
    assert!(w.replicas[2].inbox.is_empty());
    w.core.handle_frame(
        w.replicas[2].conn.expect("connected"),
        ClientFrame::Digest {
            seq: Seq(1),
            hash: hash("bbbb"),
        },
        w.now,
    );
    let mut found = None;
    while let Some(out) = w.core.poll_output() {
        if let Output::Notice(isthmus_router::session::Notice::Diverged(d)) = out {
            found = Some(d);
        }
    }
    let d = found.expect("divergence reported");
    assert_eq!(d.seq, Seq(1));
    assert_eq!(d.groups[0].replicas, vec![w.ids[0], w.ids[1]]);
    assert_eq!(d.groups[1].replicas, vec![w.ids[2]]);
}

#[test]
fn empty_session_lingers_then_expires_keeping_history_meanwhile() {
    let mut w = World::new(2, SessionConfig::default());
    w.join(0, false);
    w.send(0);
    w.frame(0, ClientFrame::Leave);
    w.now += Duration::from_secs(9);
    assert!(!w.core.is_expired(w.now));
    // A replica coming back within the linger time gets the history.
    w.join(1, false);
    w.flush(1);
    assert_eq!(w.replicas[1].log.len(), 1);
    w.frame(1, ClientFrame::Leave);
    w.now += Duration::from_secs(10);
    assert!(w.core.is_expired(w.now));
    // Nobody is attached: the only timer left is the end of the linger, 10 s after the leave.
    assert_eq!(w.core.poll_timeout(), Some(w.now));
}

#[test]
fn resume_from_the_future_is_a_session_reset() {
    let mut w = World::new(1, SessionConfig::default());
    w.replicas[0].valid = true;
    w.replicas[0].log = vec![
        (1, Origin::Router, Bytes::new()),
        (2, Origin::Router, Bytes::new()),
    ];
    w.join(0, true);
    assert_eq!(w.replicas[0].closed_with, Some(Code::SESSION_RESET));
}

#[test]
fn a_silent_replica_is_dropped_after_the_idle_timeout_and_a_chatty_one_is_not() {
    let cfg = SessionConfig {
        idle_timeout: Duration::from_secs(60),
        ..SessionConfig::default()
    };
    let mut w = World::new(2, cfg);
    w.join(0, false);
    w.join(1, false);
    for _ in 0..12 {
        w.now += Duration::from_secs(5);
        // Replica 0 pings as clients do; replica 1 says nothing.
        w.frame(0, ClientFrame::Ping { nonce: 1 });
        w.core.handle_timeout(w.now);
        w.drain();
    }
    w.flush(0);
    assert_eq!(w.replicas[1].closed_with, Some(Code::IDLE_TIMEOUT));
    assert!(w.replicas[0].conn.is_some() && w.replicas[0].closed_with.is_none());
}

#[test]
fn the_next_deadline_is_never_later_than_the_first_replica_to_fall_silent() {
    // Ticks far apart, so the idle deadline is the one poll_timeout reports.
    let cfg = SessionConfig {
        idle_timeout: Duration::from_secs(60),
        tick_interval: Duration::from_secs(3600),
        ..SessionConfig::default()
    };
    let mut w = World::new(2, cfg);
    let t0 = w.now;
    w.join(0, false);
    w.join(1, false);
    w.drain();
    assert_eq!(w.core.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    // Replica 0 speaks at 30 s; replica 1 stays silent and is due first, at 60 s.
    w.now = t0 + Duration::from_secs(30);
    w.frame(0, ClientFrame::Ping { nonce: 1 });
    w.drain();
    assert_eq!(w.core.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    // Woken at that deadline (driven by poll_timeout alone), replica 1 goes; the next deadline
    // is replica 0's, 60 s after it last spoke.
    w.now = w.core.poll_timeout().expect("a deadline");
    w.core.handle_timeout(w.now);
    w.drain();
    w.flush(0);
    assert_eq!(w.replicas[1].closed_with, Some(Code::IDLE_TIMEOUT));
    assert!(w.replicas[0].closed_with.is_none());
    assert_eq!(w.core.poll_timeout(), Some(t0 + Duration::from_secs(90)));
    w.now = w.core.poll_timeout().expect("a deadline");
    w.core.handle_timeout(w.now);
    w.drain();
    assert_eq!(w.replicas[0].closed_with, Some(Code::IDLE_TIMEOUT));
}

#[test]
fn an_observer_follows_but_may_not_send() {
    let mut w = World::new(2, SessionConfig::default());
    w.join(0, false);
    let conn = ConnId(99);
    w.replicas[1].conn = Some(conn);
    w.core.handle_join(
        conn,
        JoinRequest {
            replica: w.ids[1],
            name: "watcher".into(),
            role: Role::Observer,
            resume_from: None,
            contacts: wire::Contacts::default(),
            created: false,
            nonce: [0; 32],
            control: false,
            recover: None,
            cluster: Vec::new(),
        },
        w.now,
    );
    w.drain();
    w.send(0);
    w.flush(1);
    assert_eq!(w.replicas[1].log.len(), 1, "observers get the order");
    w.send(1);
    assert_eq!(w.replicas[1].closed_with, Some(Code::NOT_PERMITTED));
    assert_eq!(w.core.last_seq(), Seq(1), "nothing was stamped for it");
}

// ---- roles, digests, client seqs, replacement ----------------------------------------------

fn admin_key() -> KeyPair {
    Capability::from_parts(Role::Admin, [1; 32]).key_pair()
}

fn participant_key() -> KeyPair {
    Capability::from_parts(Role::Admin, [1; 32])
        .weaker()
        .expect("an admin capability has a participant one")
        .key_pair()
}

fn outputs(core: &mut Session) -> Vec<Output> {
    std::iter::from_fn(|| core.poll_output()).collect()
}

fn decode_frame(bytes: &Bytes) -> ServerFrame {
    let mut buf = BytesMut::from(&bytes[..]);
    wire::decode(&mut buf, usize::MAX)
        .expect("core emits valid frames")
        .expect("core emits whole frames")
}

#[test]
fn an_admin_sends_and_provides_snapshots_like_a_participant() {
    let mut w = World::new(2, SessionConfig::default());
    w.replicas[0].role = Some(Role::Admin);
    assert!(w.join(0, false));
    w.send(0);
    w.flush(0);
    assert_eq!(w.core.last_seq(), Seq(1));
    assert_eq!(w.replicas[0].log.len(), 1, "the admin's send is stamped");
    assert!(w.join(1, false));
    w.flush(0);
    assert!(
        w.replicas[0].owed.is_some(),
        "the admin is asked for the snapshot"
    );
    w.upload(0, true);
    w.flush(1);
    assert!(w.replicas[1].valid);
    assert_eq!(w.replicas[1].log.len(), 1);
}

#[test]
fn one_odd_digest_among_1024_replicas_is_reported_once_and_named() {
    let n = 1024;
    let odd = 700;
    let mut w = World::new(n, SessionConfig::default());
    for i in 0..n {
        assert!(w.join(i, false), "replica {i} joins");
    }
    w.send(0);
    for i in 0..n {
        w.flush(i);
    }
    for i in 0..n {
        let hash: &'static [u8] = if i == odd { b"odd" } else { b"even" };
        w.frame(
            i,
            ClientFrame::Digest {
                seq: Seq(1),
                hash: Bytes::from_static(hash),
            },
        );
    }
    for i in 0..n {
        w.flush(i);
    }
    for (i, r) in w.replicas.iter().enumerate() {
        assert_eq!(r.closed_with, None);
        // Two digest groups: one new group after the first, so exactly one report.
        assert_eq!(
            r.divergences.len(),
            1,
            "replica {i}: {:?}",
            r.divergences.len()
        );
        let d = &r.divergences[0];
        assert_eq!(d.seq, Seq(1));
        assert_eq!(d.groups.len(), 2);
        assert_eq!(d.groups[0].hash, Bytes::from_static(b"even"));
        assert_eq!(
            d.groups[0].replicas.len(),
            odd,
            "the replicas that reported before it"
        );
        assert_eq!(
            d.groups[1].replicas,
            vec![w.ids[odd]],
            "the odd one is named"
        );
    }
}

#[test]
fn a_population_split_every_way_gets_at_most_the_capped_divergence_reports() {
    let n = 40;
    let mut w = World::new(n, SessionConfig::default());
    for i in 0..n {
        assert!(w.join(i, false));
    }
    w.send(0);
    for i in 0..n {
        w.flush(i);
        let hash = Bytes::from(format!("digest-{i}"));
        w.frame(i, ClientFrame::Digest { seq: Seq(1), hash });
    }
    for i in 0..n {
        w.flush(i);
    }
    let cap = isthmus_router::session::MAX_DIVERGENCE_REPORTS_PER_SEQ;
    // Every replica was live before the first report; each saw exactly the capped number.
    for (i, r) in w.replicas.iter().enumerate() {
        assert_eq!(r.divergences.len(), cap, "replica {i}");
        for (k, d) in r.divergences.iter().enumerate() {
            assert_eq!(d.groups.len(), k + 2, "report {k} has one group more");
        }
    }
}

#[test]
fn a_zero_or_repeated_client_seq_is_a_protocol_violation_naming_both_numbers() {
    let mut w = World::new(2, SessionConfig::default());
    assert!(w.join(0, false));
    w.frame(
        0,
        ClientFrame::Send {
            client_seq: 0,
            payload: Bytes::from_static(b"zero"),
        },
    );
    assert_eq!(w.replicas[0].closed_with, Some(Code::PROTOCOL_VIOLATION));
    assert!(
        w.replicas[0]
            .closed_reason
            .starts_with("client seq 0 is not above 0,"),
        "{}",
        w.replicas[0].closed_reason
    );
    assert_eq!(w.core.last_seq(), Seq(0), "nothing stamped");

    assert!(w.join(1, false));
    for client_seq in [1, 5, 3] {
        w.frame(
            1,
            ClientFrame::Send {
                client_seq,
                payload: Bytes::from(format!("m{client_seq}")),
            },
        );
    }
    assert_eq!(w.replicas[1].closed_with, Some(Code::PROTOCOL_VIOLATION));
    assert!(
        w.replicas[1]
            .closed_reason
            .starts_with("client seq 3 is not above 5,"),
        "{}",
        w.replicas[1].closed_reason
    );
    assert_eq!(w.core.last_seq(), Seq(2), "1 and 5 stamped, 3 not");
}

#[test]
fn a_refused_hello_replaces_nothing() {
    let mut w = World::new(1, SessionConfig::default());
    assert!(w.join(0, false));
    w.send(0);
    w.flush(0);
    let old = w.replicas[0].conn.expect("connected");
    let base = JoinRequest {
        replica: w.ids[0],
        name: "again".into(),
        role: Role::Replica,
        resume_from: None,
        contacts: wire::Contacts::default(),
        created: false,
        nonce: [9; 32],
        control: false,
        recover: None,
        cluster: Vec::new(),
    };
    let cases = [
        (
            JoinRequest {
                name: "n".repeat(wire::MAX_NAME_BYTES + 1),
                ..base.clone()
            },
            Code::PROTOCOL_VIOLATION,
        ),
        (
            JoinRequest {
                control: true,
                recover: None,
                cluster: Vec::new(),
                ..base.clone()
            },
            Code::PROTOCOL_VIOLATION,
        ),
        (
            JoinRequest {
                resume_from: Some(Seq(99)),
                ..base.clone()
            },
            Code::SESSION_RESET,
        ),
    ];
    for (k, (req, code)) in cases.into_iter().enumerate() {
        let conn = ConnId(1000 + k as u64);
        w.core.handle_join(conn, req, w.now);
        let outs = outputs(&mut w.core);
        let mut refused = false;
        for out in &outs {
            match out {
                Output::Close {
                    conn: c,
                    goodbye: Some(g),
                    ..
                } if *c == conn => {
                    assert!(
                        matches!(decode_frame(g), ServerFrame::Refuse { code: got, .. } if got == code)
                    );
                    refused = true;
                }
                Output::Close { conn: c, .. } | Output::Transmit { conn: c, .. } => {
                    panic!("case {k}: output for {c:?}: {out:?}")
                }
                Output::Notice(_) => {}
            }
        }
        assert!(refused, "case {k} refused with {code:?}");
    }
    assert_eq!(w.core.member_count(), 1);
    assert_eq!(w.replicas[0].conn, Some(old));
    w.send(0);
    w.flush(0);
    assert_eq!(
        w.replicas[0].closed_with, None,
        "the old connection lives on"
    );
    assert_eq!(w.replicas[0].log.len(), 2);
}

#[test]
fn a_new_connection_of_the_same_replica_replaces_the_old_one_with_1007() {
    // At its member cap: the replacement frees the old one's place, so it is not refused.
    let cfg = SessionConfig {
        max_members: 1,
        ..SessionConfig::default()
    };
    let mut w = World::new(1, cfg);
    assert!(w.join(0, false));
    let old = w.replicas[0].conn.expect("connected");
    let new = ConnId(500);
    w.core.handle_join(
        new,
        JoinRequest {
            replica: w.ids[0],
            name: "again".into(),
            role: Role::Replica,
            resume_from: Some(Seq(0)),
            contacts: wire::Contacts::default(),
            created: false,
            nonce: [9; 32],
            control: false,
            recover: None,
            cluster: Vec::new(),
        },
        w.now,
    );
    let outs = outputs(&mut w.core);
    let goodbye = outs
        .iter()
        .find_map(|o| match o {
            Output::Close {
                conn,
                goodbye: Some(g),
                ..
            } if *conn == old => Some(decode_frame(g)),
            _ => None,
        })
        .expect("the old connection is closed");
    assert!(
        matches!(goodbye, ServerFrame::Goodbye { code, .. } if code == Code::REPLACED),
        "{goodbye:?}"
    );
    assert_eq!(Code::REPLACED, Code(1007));
    assert!(outs.iter().any(|o| matches!(o,
        Output::Transmit { conn, frame } if *conn == new
            && matches!(decode_frame(frame), ServerFrame::Welcome(_)))));
    assert_eq!(w.core.member_count(), 1);
}

// ---- control connections -------------------------------------------------------------------

#[test]
fn a_control_connection_gets_a_welcome_and_then_only_answers() {
    let cfg = SessionConfig {
        announce_membership: true,
        ..SessionConfig::default()
    };
    let mut w = World::new(3, cfg);
    assert!(w.join(0, false));
    w.replicas[1].role = Some(Role::Admin);
    w.replicas[1].control = true;
    assert!(w.join(1, false));
    w.send(0);
    w.send(0);
    w.flush(0);
    // A joiner needs a snapshot: the participant is asked, never the control connection.
    assert!(w.join(2, false));
    w.flush(0);
    assert!(w.replicas[0].owed.is_some());
    w.upload(0, true);
    w.flush(2);
    assert!(w.replicas[2].valid);
    for (i, hash) in [(0, "a"), (2, "b")] {
        let hash = Bytes::from(hash);
        w.frame(i, ClientFrame::Digest { seq: Seq(1), hash });
    }
    w.now += Duration::from_millis(200);
    w.core.handle_timeout(w.now);
    w.drain();
    w.frame(1, ClientFrame::Ping { nonce: 7 });
    for i in 0..3 {
        w.flush(i);
    }
    assert!(w.replicas[0].received.contains(&"divergence"));
    assert!(w.replicas[0].received.contains(&"tick"));
    assert_eq!(w.replicas[1].received, vec!["welcome", "pong"]);
    // Its coming and going are not stamped into the order.
    w.frame(1, ClientFrame::Leave);
    w.flush(0);
    let mentioned: Vec<ReplicaId> =
        w.truth
            .values()
            .filter(|(o, _)| *o == Origin::Router)
            .map(
                |(_, p)| match isthmus_router::session::parse_router_event(p).expect("an event") {
                    wire::RouterEvent::Joined { replica, .. }
                    | wire::RouterEvent::Left { replica } => replica,
                },
            )
            .collect();
    assert_eq!(mentioned, vec![w.ids[0], w.ids[2]]);
    assert_eq!(
        w.core.members().count(),
        2,
        "control connections are not listed"
    );
}

#[test]
fn a_control_connection_needs_the_admin_role_and_carries_no_sends() {
    let mut w = World::new(2, SessionConfig::default());
    w.replicas[0].control = true;
    assert!(!w.join(0, false));
    assert_eq!(w.replicas[0].closed_with, Some(Code::PROTOCOL_VIOLATION));
    w.replicas[1].role = Some(Role::Admin);
    w.replicas[1].control = true;
    assert!(w.join(1, false));
    w.send(1);
    assert_eq!(w.replicas[1].closed_with, Some(Code::PROTOCOL_VIOLATION));
    assert_eq!(w.core.last_seq(), Seq(0));
}

#[test]
fn a_control_connection_keeps_the_session_until_it_idles_out() {
    let mut w = World::new(2, SessionConfig::default());
    w.replicas[0].role = Some(Role::Admin);
    w.replicas[0].control = true;
    assert!(w.join(0, false));
    assert!(w.join(1, false));
    w.frame(1, ClientFrame::Leave);
    w.now += Duration::from_secs(30);
    w.core.handle_timeout(w.now);
    w.drain();
    assert!(
        !w.core.is_expired(w.now),
        "an open control connection holds it"
    );
    w.now += Duration::from_secs(30);
    w.core.handle_timeout(w.now);
    w.drain();
    assert_eq!(w.replicas[0].closed_with, Some(Code::IDLE_TIMEOUT));
    w.now += SessionConfig::default().linger;
    assert!(w.core.is_expired(w.now));
}

// ---- admin commands ------------------------------------------------------------------------

/// Replica 0 a participant, replica 1 an admin participant, replica 2 an admin control
/// connection; all attached.
fn admin_world(cfg: SessionConfig) -> World {
    let mut w = World::new(3, cfg);
    w.replicas[1].role = Some(Role::Admin);
    w.replicas[2].role = Some(Role::Admin);
    w.replicas[2].control = true;
    for i in 0..3 {
        assert!(w.join(i, false));
    }
    for i in 0..3 {
        w.flush(i);
    }
    w
}

#[test]
fn set_tick_changes_the_interval_within_the_allowed_range() {
    let mut w = admin_world(SessionConfig::default());
    w.admin(2, 1, AdminCommand::SetTick { ms: 200 }, &admin_key());
    w.flush(2);
    assert!(matches!(
        w.replicas[2].admin_done.as_slice(),
        [(1, true, _)]
    ));
    w.now += Duration::from_millis(150);
    w.core.handle_timeout(w.now);
    w.drain();
    w.flush(0);
    assert!(
        !w.replicas[0].received.contains(&"tick"),
        "no tick at 150 ms"
    );
    w.now += Duration::from_millis(50);
    w.core.handle_timeout(w.now);
    w.drain();
    w.flush(0);
    assert_eq!(w.replicas[0].last_time, 200_000, "a tick at 200 ms");
    for (seq, ms) in [(2, 9), (3, 60_001)] {
        w.admin(2, seq, AdminCommand::SetTick { ms }, &admin_key());
        w.flush(2);
        let (got, ok, message) = w.replicas[2].admin_done.last().expect("an answer");
        assert_eq!((*got, *ok), (seq, false));
        assert!(
            message.contains("10 to 60000 ms"),
            "names the range: {message}"
        );
    }
    assert_eq!(w.replicas[2].closed_with, None);
}

#[test]
fn kick_removes_a_replica_and_says_when_there_is_none() {
    let mut w = admin_world(SessionConfig::default());
    let target = w.ids[0];
    w.admin(1, 1, AdminCommand::Kick { replica: target }, &admin_key());
    assert_eq!(w.replicas[0].closed_with, Some(Code::KICKED));
    assert_eq!(w.replicas[0].closed_reason, "removed by the island's admin");
    w.admin(1, 2, AdminCommand::Kick { replica: target }, &admin_key());
    w.flush(1);
    let answers: Vec<(u64, bool)> = w.replicas[1]
        .admin_done
        .iter()
        .map(|(s, ok, _)| (*s, *ok))
        .collect();
    assert_eq!(answers, vec![(1, true), (2, false)]);
    assert_eq!(w.replicas[1].closed_with, None);
}

#[test]
fn close_says_goodbye_to_everyone_and_refuses_later_joins() {
    let budget = Arc::new(MemoryBudget::new(1 << 20));
    let cfg = SessionConfig {
        budget: budget.clone(),
        ..SessionConfig::default()
    };
    let mut w = admin_world(cfg);
    w.send(0);
    w.send(1);
    assert!(budget.used() > 0, "the history is in the budget");
    w.admin(2, 1, AdminCommand::Close, &admin_key());
    assert!(w.core.is_closed());
    for i in 0..3 {
        assert_eq!(w.replicas[i].closed_with, Some(Code::CLOSED), "replica {i}");
        assert_eq!(
            w.replicas[i].closed_reason,
            "the island was closed by its admin"
        );
    }
    assert!(matches!(
        w.replicas[2].admin_done.as_slice(),
        [(1, true, _)]
    ));
    assert_eq!(
        w.replicas[2].received,
        vec!["welcome", "admin done", "goodbye"]
    );
    assert_eq!(w.core.member_count(), 0);
    assert_eq!(budget.used(), 0, "a closed island keeps nothing");
    assert!(!w.join(0, false));
    assert_eq!(w.replicas[0].closed_with, Some(Code::CLOSED));
}

#[test]
fn admin_frames_need_the_admin_role_key_connection_and_a_fresh_seq() {
    // Signed with the participant key: bad credentials.
    let mut w = admin_world(SessionConfig::default());
    w.admin(2, 1, AdminCommand::Close, &participant_key());
    assert_eq!(w.replicas[2].closed_with, Some(Code::BAD_CREDENTIALS));
    assert!(!w.core.is_closed());

    // From a participant, even with a good signature: not permitted.
    let mut w = admin_world(SessionConfig::default());
    w.admin(0, 1, AdminCommand::Close, &admin_key());
    assert_eq!(w.replicas[0].closed_with, Some(Code::NOT_PERMITTED));
    assert!(
        w.replicas[0]
            .closed_reason
            .starts_with("only the island's admin may"),
        "{}",
        w.replicas[0].closed_reason
    );
    assert!(!w.core.is_closed());

    // A replayed seq: protocol violation.
    let mut w = admin_world(SessionConfig::default());
    w.admin(2, 1, AdminCommand::SetTick { ms: 100 }, &admin_key());
    w.admin(2, 1, AdminCommand::SetTick { ms: 100 }, &admin_key());
    assert_eq!(w.replicas[2].closed_with, Some(Code::PROTOCOL_VIOLATION));

    // Signed over another connection's nonce: bad credentials.
    let mut w = admin_world(SessionConfig::default());
    let other = w.replicas[1].nonce;
    let command = AdminCommand::Close;
    let sig = admin_key().sign(&auth::admin_transcript(&other, w.core.id(), 1, &command));
    w.frame(
        2,
        ClientFrame::Admin {
            seq: 1,
            command,
            sig,
        },
    );
    assert_eq!(w.replicas[2].closed_with, Some(Code::BAD_CREDENTIALS));
    assert!(!w.core.is_closed());
}

// ---- the shared memory budget --------------------------------------------------------------

#[test]
fn a_snapshot_upload_past_the_budget_is_abandoned_and_its_joiner_told_busy() {
    let budget = Arc::new(MemoryBudget::new(300));
    let cfg = SessionConfig {
        budget: budget.clone(),
        max_history_messages: 5,
        ..SessionConfig::default()
    };
    let mut w = World::new(2, cfg);
    w.chunk = 1000;
    assert!(w.join(0, false));
    for _ in 0..10 {
        w.send(0);
        w.flush(0);
    }
    let (entries, bytes) = w.core.history_len();
    assert_eq!(
        entries, 5,
        "the history fits the budget; only its own bound cut it"
    );
    assert_eq!(budget.used(), bytes);
    assert!(w.join(1, false));
    w.flush(0);
    assert!(w.replicas[0].owed.is_some(), "asked for a snapshot");
    w.upload(0, true);
    w.flush(1);
    assert_eq!(w.replicas[1].closed_with, Some(Code::BUSY));
    assert_eq!(
        w.replicas[1].closed_reason,
        "the router's memory budget is exhausted; try again later"
    );
    assert_eq!(budget.used(), bytes, "the abandoned upload holds nothing");
    assert_eq!(w.replicas[0].closed_with, None);
}

#[test]
fn two_hundred_sessions_share_one_budget_and_never_pass_it() {
    const SESSIONS: usize = 200;
    let budget = Arc::new(MemoryBudget::new(256 << 20));
    let cfg = SessionConfig {
        budget: budget.clone(),
        ..SessionConfig::default()
    };
    let payload = Bytes::from(vec![7u8; cfg.max_payload_bytes]);
    let now = Instant::now();
    let conn = ConnId(1);
    let replica = ReplicaId(Uuid::from_u128(7));
    let mut sessions: Vec<Session> = (0..SESSIONS)
        .map(|k| {
            let keys = test_keys(k as u8);
            let mut core = Session::new(keys.session_id(), keys, cfg.clone(), now);
            core.handle_join(
                conn,
                JoinRequest {
                    replica,
                    name: "sender".into(),
                    role: Role::Replica,
                    resume_from: None,
                    contacts: wire::Contacts::default(),
                    created: true,
                    nonce: [0; 32],
                    control: false,
                    recover: None,
                    cluster: Vec::new(),
                },
                now,
            );
            let written: usize = outputs(&mut core)
                .iter()
                .map(|o| match o {
                    Output::Transmit { frame, .. } => frame.len(),
                    Output::Close { .. } => panic!("session {k} refused its replica"),
                    Output::Notice(_) => 0,
                })
                .sum();
            core.handle_flushed(conn, written, now);
            core
        })
        .collect();
    // What a stamped message of this replica looks like up to its payload: the encoding of the
    // same message with an empty payload, less the payload's length byte.
    let head = |seq: u64| {
        let empty = wire::encode(&ServerFrame::Message(wire::Message {
            seq: Seq(seq),
            time: isthmus_router::ids::RouterTime(0),
            origin: Origin::Replica(replica),
            client_seq: seq,
            payload: Bytes::new(),
        }));
        empty.slice(wire::LENGTH_PREFIX_LEN..empty.len() - 1)
    };
    let frame_len = |seq: u64| {
        wire::encode(&ServerFrame::Message(wire::Message {
            seq: Seq(seq),
            time: isthmus_router::ids::RouterTime(0),
            origin: Origin::Replica(replica),
            client_seq: seq,
            payload: payload.clone(),
        }))
        .len()
    };
    let sends = (cfg.max_history_bytes / frame_len(1)) as u64;
    for seq in 1..=sends {
        let (head, frame_len) = (head(seq), frame_len(seq));
        for (k, core) in sessions.iter_mut().enumerate() {
            core.handle_frame(
                conn,
                ClientFrame::Send {
                    client_seq: seq,
                    payload: payload.clone(),
                },
                now,
            );
            let mut delivered = 0;
            let mut written = 0;
            for out in outputs(core) {
                match out {
                    Output::Transmit { frame, .. } => {
                        written += frame.len();
                        let body = &frame[wire::LENGTH_PREFIX_LEN..];
                        if frame.len() == frame_len && body.starts_with(&head) {
                            delivered += 1;
                        }
                    }
                    Output::Close { .. } => panic!("session {k} closed its replica at {seq}"),
                    Output::Notice(_) => {}
                }
            }
            assert_eq!(core.last_seq(), Seq(seq), "session {k} stamped send {seq}");
            assert_eq!(delivered, 1, "session {k} delivered send {seq}");
            core.handle_flushed(conn, written, now);
            assert!(
                budget.used() <= budget.limit(),
                "{budget:?} after send {seq} of session {k}"
            );
        }
    }
    let kept: usize = sessions.iter().map(|s| s.history_len().1).sum();
    assert_eq!(
        budget.used(),
        kept,
        "the budget counts exactly the kept history"
    );
    assert!(
        kept > budget.limit() / 2,
        "the budget was used, not starved: {kept}"
    );
    drop(sessions);
    assert_eq!(budget.used(), 0, "dropped sessions give everything back");
}
