//! The session core driven by simulated replicas on a virtual clock, over generated
//! interleavings of joins, leaves, drops, resumes, sends, flushes and snapshot uploads.
//!
//! Every simulated replica decodes the real frames the core emits and keeps a log of what it
//! applied; its snapshot is that log. The checks: every replica's log is one prefix of a single
//! total order (seq from 1, no gap, no duplicate), router time never decreases on any stream, a
//! send is stamped exactly once even when resent after a reconnect, and after the dust settles
//! every attached replica holds the whole order.

use bytes::{Bytes, BytesMut};
use isthmus_router::auth::{self, Capability, IslandKeys};
use isthmus_router::ids::{ConnId, ReplicaId, Seq};
use isthmus_router::session::{JoinRequest, Output, Session, SessionConfig};
use isthmus_router::wire::{self, ClientFrame, Code, Origin, Role, ServerFrame};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap, VecDeque};
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

    fn join(&mut self, i: usize, resume: bool) {
        if self.replicas[i].conn.is_some() {
            return;
        }
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let r = &mut self.replicas[i];
        r.conn = Some(conn);
        r.closed_with = None;
        let resume_from = (resume && r.valid).then(|| Seq(r.log.last().map_or(0, |e| e.0)));
        if resume_from.is_none() {
            r.valid = false;
        }
        let req = JoinRequest {
            replica: self.ids[i],
            name: format!("r{i}"),
            role: Role::Replica,
            resume_from,
            contacts: wire::Contacts::default(),
            created: false,
            nonce: [0; 32],
            control: false,
        };
        self.core.handle_join(conn, req, self.now);
        self.drain();
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

    /// After a reconnect the replica resends everything not yet confirmed, as a client would.
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

    fn apply(&mut self, i: usize, bytes: &Bytes) {
        let mut buf = BytesMut::from(&bytes[..]);
        let frame: ServerFrame = wire::decode(&mut buf, usize::MAX)
            .expect("core emits valid frames")
            .expect("core emits whole frames");
        assert!(buf.is_empty(), "one frame per transmit");
        let me = self.ids[i];
        let r = &mut self.replicas[i];
        match frame {
            ServerFrame::Welcome(w) => {
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
            ServerFrame::Goodbye { code, .. } | ServerFrame::Refuse { code, .. } => {
                r.closed_with = Some(code);
                self.closes.push(code);
            }
            ServerFrame::AdminDone { .. } => {
                panic!("replica {i} got an admin answer it never asked for")
            }
            ServerFrame::Divergence(_) | ServerFrame::Ping { .. } | ServerFrame::Pong { .. } => {}
        }
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
    let n = 4;
    let mut w = World::new(n, cfg);
    for op in ops {
        match *op {
            Op::Join(i) => {
                w.join(i, false);
            }
            Op::Resume(i) => {
                w.join(i, true);
                w.resend(i);
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
        }
        w.check_prefixes();
    }
    // Everyone still away comes back and resends; then the world settles.
    for i in 0..n {
        w.join(i, true);
        w.resend(i);
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
    w.join(0, true);
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
