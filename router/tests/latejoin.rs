//! Streaming late join in the session core: a provider's upload is relayed to joiners piece by
//! piece as it arrives, each piece encoded once and shared, and kept as the stored snapshot.
//! Driven on a virtual clock with the core's real frames; every joiner ends synced with the
//! provider's exact bytes or closed with a retryable code.

use bytes::{Bytes, BytesMut};
use isthmus_router::auth::{self, Capability, IslandKeys};
use isthmus_router::budget::MemoryBudget;
use isthmus_router::ids::{ConnId, ReplicaId, Seq};
use isthmus_router::session::{JoinRequest, Output, Session, SessionConfig};
use isthmus_router::wire::{self, ClientFrame, Code, Role, ServerFrame};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

fn test_keys() -> IslandKeys {
    auth::island_keys(&Capability::from_parts(Role::Admin, [7; 32])).expect("an admin capability")
}

#[derive(Default)]
struct Peer {
    /// Handed to the "socket", not yet read.
    queued: VecDeque<Bytes>,
    /// Read, in order.
    got: Vec<Bytes>,
    /// Most bytes ever queued and unread at once.
    peak_unread: usize,
    closed: Option<Code>,
    /// Snapshot requests already handled by the test.
    requests_taken: usize,
}

impl Peer {
    fn unread(&self) -> usize {
        self.queued.iter().map(Bytes::len).sum()
    }
}

/// How a joiner's sync went, as a client reading the frames sees it.
#[derive(Debug, Default, PartialEq)]
struct SyncView {
    /// `SyncBegin`s received.
    begins: usize,
    /// The last sync's point and snapshot (`None`: a fresh start).
    at: u64,
    snapshot: Option<Vec<u8>>,
    /// Messages received after the last `SyncBegin`.
    messages: Vec<u64>,
    synced: Option<u64>,
}

struct World {
    core: Session,
    now: Instant,
    peers: BTreeMap<ConnId, Peer>,
    next: u64,
}

fn decode(frame: &Bytes) -> ServerFrame {
    let mut buf = BytesMut::from(&frame[..]);
    let f = wire::decode(&mut buf, usize::MAX)
        .expect("valid frame")
        .expect("whole frame");
    assert!(buf.is_empty(), "one frame per transmit");
    f
}

impl World {
    fn new(cfg: SessionConfig) -> World {
        let now = Instant::now();
        let keys = test_keys();
        World {
            core: Session::new(keys.session_id(), keys, cfg, now),
            now,
            peers: BTreeMap::new(),
            next: 1,
        }
    }

    fn drain(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit { conn, frame } => {
                    let p = self.peers.get_mut(&conn).expect("known connection");
                    p.queued.push_back(frame);
                    p.peak_unread = p.peak_unread.max(p.unread());
                }
                Output::Close {
                    conn,
                    goodbye,
                    discard_queued,
                } => {
                    let p = self.peers.get_mut(&conn).expect("known connection");
                    if discard_queued {
                        p.queued.clear();
                    }
                    let rest: Vec<Bytes> = p.queued.drain(..).collect();
                    p.got.extend(rest);
                    if let Some(g) = goodbye {
                        match decode(&g) {
                            ServerFrame::Goodbye { code, .. }
                            | ServerFrame::Refuse { code, .. } => p.closed = Some(code),
                            other => panic!("a goodbye, not {other:?}"),
                        }
                    }
                }
                Output::Notice(_) => {}
            }
        }
    }

    fn join(&mut self, role: Role) -> ConnId {
        let conn = ConnId(self.next);
        self.next += 1;
        self.peers.insert(conn, Peer::default());
        let req = JoinRequest {
            replica: ReplicaId(Uuid::from_u128(1000 + conn.0 as u128)),
            name: format!("r{}", conn.0),
            role,
            resume_from: None,
            contacts: wire::Contacts::default(),
            created: false,
            nonce: [0; 32],
            control: false,
            recover: None,
            cluster: Vec::new(),
        };
        self.core.handle_join(conn, req, self.now);
        self.drain();
        conn
    }

    /// The peer reads everything queued to it and the core is told.
    fn flush(&mut self, conn: ConnId) {
        let p = self.peers.get_mut(&conn).expect("known");
        let frames: Vec<Bytes> = p.queued.drain(..).collect();
        let bytes = frames.iter().map(Bytes::len).sum();
        p.got.extend(frames);
        if p.closed.is_none() {
            self.core.handle_flushed(conn, bytes, self.now);
            self.drain();
        }
    }

    fn send(&mut self, conn: ConnId, client_seq: u64) {
        self.frame(
            conn,
            ClientFrame::Send {
                client_seq,
                payload: Bytes::from(format!("m{client_seq}")),
            },
        );
    }

    fn frame(&mut self, conn: ConnId, frame: ClientFrame) {
        self.core.handle_frame(conn, frame, self.now);
        self.drain();
    }

    /// The newest snapshot request the provider read since it was last asked: (request, at).
    fn request_of(&mut self, provider: ConnId) -> Option<(u64, u64)> {
        self.flush(provider);
        let p = self.peers.get_mut(&provider).expect("known");
        let requests: Vec<(u64, u64)> = p
            .got
            .iter()
            .filter_map(|f| match decode(f) {
                ServerFrame::SnapshotRequest { request, at } => Some((request, at.0)),
                _ => None,
            })
            .collect();
        let new = requests.len() > p.requests_taken;
        p.requests_taken = requests.len();
        requests.last().copied().filter(|_| new)
    }

    fn chunk(
        &mut self,
        provider: ConnId,
        (request, at): (u64, u64),
        data: &[u8],
        from: usize,
        to: usize,
    ) {
        self.frame(
            provider,
            ClientFrame::SnapshotChunk {
                request,
                at: Seq(at),
                offset: from as u64,
                total: data.len() as u64,
                data: Bytes::copy_from_slice(&data[from..to]),
            },
        );
    }

    /// Uploads `data` in pieces of `piece` bytes, pieces `first..last`.
    fn upload(
        &mut self,
        provider: ConnId,
        req: (u64, u64),
        data: &[u8],
        piece: usize,
        pieces: std::ops::Range<usize>,
    ) {
        for k in pieces {
            let from = k * piece;
            let to = ((k + 1) * piece).min(data.len());
            self.chunk(provider, req, data, from, to);
        }
    }

    /// What a client reading `conn`'s frames so far would make of its sync.
    fn view(&self, conn: ConnId) -> SyncView {
        let mut v = SyncView::default();
        for f in &self.peers[&conn].got {
            match decode(f) {
                ServerFrame::SyncBegin { at, snapshot_len } => {
                    v.begins += 1;
                    v.at = at.0;
                    v.snapshot = snapshot_len.map(|_| Vec::new());
                    v.messages.clear();
                    v.synced = None;
                }
                ServerFrame::SnapshotData { data } => v
                    .snapshot
                    .as_mut()
                    .expect("data inside a snapshot sync")
                    .extend_from_slice(&data),
                ServerFrame::Message(m) => v.messages.push(m.seq.0),
                ServerFrame::Synced { seq, .. } => v.synced = Some(seq.0),
                _ => {}
            }
        }
        v
    }

    /// The `SnapshotData` frames `conn` read, as the very `Bytes` the core handed out.
    fn data_frames(&self, conn: ConnId) -> Vec<Bytes> {
        self.peers[&conn]
            .got
            .iter()
            .filter(|f| matches!(decode(f), ServerFrame::SnapshotData { .. }))
            .cloned()
            .collect()
    }
}

/// A snapshot of `len` bytes that differs at every position from its neighbours.
fn snapshot(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ salt)
        .collect()
}

/// A session whose one provider is live at seq `sent` (its own messages); relay pieces of 100.
fn world_with_provider(cfg: SessionConfig, sent: u64) -> (World, ConnId) {
    let mut w = World::new(SessionConfig {
        snapshot_chunk_bytes: 100,
        ..cfg
    });
    let p = w.join(Role::Replica);
    for cs in 1..=sent {
        w.send(p, cs);
    }
    w.flush(p);
    (w, p)
}

/// Synced from a snapshot taken at `at` with exactly `data`, then the backlog to `last`.
fn assert_synced_with(v: &SyncView, at: u64, data: &[u8], last: u64) {
    assert_eq!(v.at, at, "synced from the snapshot at {at}");
    assert_eq!(
        v.snapshot.as_deref(),
        Some(data),
        "the provider's exact bytes"
    );
    assert_eq!(
        v.messages,
        ((at + 1)..=last).collect::<Vec<_>>(),
        "the backlog"
    );
    assert_eq!(v.synced, Some(last));
}

#[test]
fn joiners_get_each_piece_as_it_arrives_and_mid_upload_joiners_from_the_first() {
    let (mut w, p) = world_with_provider(SessionConfig::default(), 3);
    let j1 = w.join(Role::Observer);
    let req = w.request_of(p).expect("the provider is asked");
    assert_eq!(req.1, 3);
    let data = snapshot(1000, 1);
    // Nothing to relay before the first piece: not even SyncBegin (the size is not known).
    w.flush(j1);
    assert_eq!(w.view(j1).begins, 0);
    // Pieces of 250 bytes are relayed as frames of at most 100.
    w.upload(p, req, &data, 250, 0..1);
    w.flush(j1);
    let v = w.view(j1);
    assert_eq!(v.begins, 1);
    assert_eq!(
        v.snapshot.as_deref(),
        Some(&data[..250]),
        "relayed before the upload is done"
    );
    assert_eq!(w.data_frames(j1).len(), 3, "250 bytes as 100 + 100 + 50");
    // A message stamped meanwhile waits in the history for the backlog.
    w.send(p, 4);
    let j2 = w.join(Role::Observer);
    w.flush(j2);
    assert_eq!(
        w.view(j2).snapshot.as_deref(),
        Some(&data[..250]),
        "a mid-upload joiner starts from the first piece"
    );
    w.upload(p, req, &data, 250, 1..4);
    w.flush(j1);
    w.flush(j2);
    for j in [j1, j2] {
        assert_synced_with(&w.view(j), 3, &data, 4);
    }
    // Encoded once: both joiners got the very same frames.
    let (f1, f2) = (w.data_frames(j1), w.data_frames(j2));
    assert_eq!(f1.len(), 12);
    for (a, b) in f1.iter().zip(&f2) {
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "one encoding shared by every joiner"
        );
        assert!(
            a.len() <= 100 + 16,
            "a relay frame is one piece and a small header"
        );
    }
}

#[test]
fn joiners_are_paced_by_their_own_queues() {
    // Pacing is half the outbound bound: 2,000 bytes; relay pieces at most 1,000 (half of it)
    // but the configured 100 are smaller.
    let cfg = SessionConfig {
        max_outbound_bytes: 4000,
        ..SessionConfig::default()
    };
    let (mut w, p) = world_with_provider(cfg, 2);
    let fast = w.join(Role::Observer);
    let slow = w.join(Role::Observer);
    let req = w.request_of(p).expect("asked");
    let data = snapshot(20_000, 2);
    for k in 0..20 {
        w.upload(p, req, &data, 1000, k..k + 1);
        w.flush(fast);
        // The slow one reads only every fifth piece.
        if k % 5 == 4 {
            w.flush(slow);
        }
        assert!(
            w.peers[&slow].unread() <= 2000 + 116,
            "paced, never past the window"
        );
    }
    assert!(
        w.view(fast).synced.is_some(),
        "the fast one kept up with the upload"
    );
    while w.view(slow).synced.is_none() {
        w.flush(slow);
    }
    for j in [fast, slow] {
        assert_synced_with(&w.view(j), 2, &data, 2);
        assert_eq!(w.peers[&j].closed, None);
        assert!(
            w.peers[&j].peak_unread <= 2000 + 116 + 200,
            "never near the slow-consumer bound"
        );
    }
}

/// The provider fails after `k` pieces of `n` in the way `fail` picks; a second live replica
/// takes over (or, without one, the joiners get a retryable close).
fn provider_failure(k: usize, fail: u8, second_provider: bool) {
    let cfg = SessionConfig {
        snapshot_timeout: Duration::from_secs(1),
        ..SessionConfig::default()
    };
    let (mut w, p) = world_with_provider(cfg, 2);
    let q = second_provider.then(|| {
        let q = w.join(Role::Replica);
        let req = w.request_of(p).expect("asked for the second replica");
        w.upload(p, req, &snapshot(10, 9), 100, 0..1);
        w.flush(q);
        assert_eq!(w.view(q).synced, Some(2));
        q
    });
    let early = w.join(Role::Observer);
    // The first provider asked (the core takes them in turn).
    let (asked, req) = [Some(p), q]
        .into_iter()
        .flatten()
        .find_map(|c| w.request_of(c).map(|r| (c, r)))
        .expect("someone is asked");
    let data = snapshot(500, 3);
    w.upload(asked, req, &data, 100, 0..k);
    let late = w.join(Role::Observer);
    w.flush(early);
    w.flush(late);
    match fail {
        0 => {
            w.core.handle_disconnect(asked, w.now);
            w.drain();
        }
        1 => {
            w.now += Duration::from_secs(1);
            w.core.handle_timeout(w.now);
            w.drain();
        }
        _ => {
            // A piece at the wrong offset: a protocol violation.
            let req_bad = req;
            w.frame(
                asked,
                ClientFrame::SnapshotChunk {
                    request: req_bad.0,
                    at: Seq(req_bad.1),
                    offset: (k as u64 * 100) + 1,
                    total: 500,
                    data: Bytes::from_static(b"x"),
                },
            );
            assert_eq!(w.peers[&asked].closed, Some(Code::PROTOCOL_VIOLATION));
        }
    }
    // Whoever is live is asked next (after a timeout that may be the same replica again).
    let next = [Some(p), q]
        .into_iter()
        .flatten()
        .filter(|c| w.peers[c].closed.is_none())
        .collect::<Vec<_>>()
        .into_iter()
        .find_map(|c| w.request_of(c).map(|r| (c, r)));
    if second_provider && fail == 0 {
        assert!(
            next.is_some_and(|(c, _)| c != asked),
            "the other replica is asked"
        );
    }
    match next {
        Some((o, req2)) => {
            assert_ne!(req2.0, req.0);
            let data2 = snapshot(400, 4);
            w.upload(o, req2, &data2, 100, 0..4);
            for j in [early, late] {
                w.flush(j);
                let v = w.view(j);
                assert_synced_with(&v, req2.1, &data2, 2);
                assert_eq!(
                    v.begins,
                    if k > 0 { 2 } else { 1 },
                    "restarted only if begun"
                );
                assert_eq!(w.peers[&j].closed, None);
            }
        }
        None => {
            // Nobody else can provide: with the history whole from seq 1 the joiners start
            // over from the initial state instead of hanging.
            for j in [early, late] {
                w.flush(j);
                let v = w.view(j);
                assert_eq!(v.snapshot, None, "a fresh start after the lost upload");
                assert_eq!(v.messages, vec![1, 2]);
                assert_eq!(v.synced, Some(2));
            }
        }
    }
}

#[test]
fn a_provider_lost_at_any_piece_boundary_restarts_its_joiners_on_another_upload() {
    for k in 0..5 {
        for fail in 0..3 {
            provider_failure(k, fail, true);
            provider_failure(k, fail, false);
        }
    }
}

#[test]
fn a_lost_upload_with_no_way_to_serve_its_joiners_closes_them_retryably() {
    // The history is cut (bound of 2 messages), so there is no fresh start; nobody else can
    // provide, and nothing is stored.
    for k in 0..5 {
        let cfg = SessionConfig {
            max_history_messages: 2,
            ..SessionConfig::default()
        };
        let (mut w, p) = world_with_provider(cfg, 6);
        let j = w.join(Role::Observer);
        let req = w.request_of(p).expect("asked");
        let data = snapshot(500, 5);
        w.upload(p, req, &data, 100, 0..k);
        w.core.handle_disconnect(p, w.now);
        w.drain();
        w.flush(j);
        assert_eq!(
            w.peers[&j].closed,
            Some(Code::NO_SNAPSHOT),
            "after {k} pieces"
        );
        assert!(Code::NO_SNAPSHOT.is_retryable());
    }
}

#[test]
fn an_upload_that_outgrows_the_budget_mid_stream_closes_its_joiners_busy_and_holds_nothing() {
    let budget = Arc::new(MemoryBudget::new(4000));
    let cfg = SessionConfig {
        budget: budget.clone(),
        max_history_messages: 2,
        ..SessionConfig::default()
    };
    let (mut w, p) = world_with_provider(cfg, 6);
    let before = budget.used();
    let j = w.join(Role::Observer);
    let req = w.request_of(p).expect("asked");
    let data = snapshot(10_000, 6);
    let mut k = 0;
    while w.peers[&j].closed.is_none() {
        w.upload(p, req, &data, 1000, k..k + 1);
        w.flush(j);
        k += 1;
        if w.peers[&j].closed.is_none() {
            assert!(
                budget.used() > before,
                "what is relayed is kept, and reserved"
            );
        }
    }
    assert!(k > 1, "the joiner was streamed part of it first");
    assert!(w.view(j).snapshot.is_some_and(|s| !s.is_empty()));
    assert_eq!(w.peers[&j].closed, Some(Code::BUSY));
    assert_eq!(budget.used(), before, "the abandoned upload holds nothing");
    assert_eq!(w.peers[&p].closed, None, "the provider did nothing wrong");
    drop(w);
    assert_eq!(budget.used(), 0);
}

#[test]
fn the_streamed_snapshot_is_stored_and_served_to_a_later_joiner_from_the_same_frames() {
    let budget = Arc::new(MemoryBudget::new(1 << 20));
    let cfg = SessionConfig {
        budget: budget.clone(),
        ..SessionConfig::default()
    };
    let (mut w, p) = world_with_provider(cfg, 3);
    let history = budget.used();
    let j1 = w.join(Role::Observer);
    let req = w.request_of(p).expect("asked");
    let data = snapshot(777, 7);
    w.upload(p, req, &data, 128, 0..7);
    w.flush(j1);
    assert_synced_with(&w.view(j1), 3, &data, 3);
    let frames = w.data_frames(j1);
    let kept: usize = frames.iter().map(Bytes::len).sum();
    assert_eq!(
        budget.used(),
        kept,
        "the snapshot's frames are kept and the history before it cut"
    );
    assert!(history > 0);
    // The provider goes; observers cannot provide, so the stored snapshot serves.
    w.frame(p, ClientFrame::Leave);
    let j2 = w.join(Role::Observer);
    w.flush(j2);
    assert_synced_with(&w.view(j2), 3, &data, 3);
    let again = w.data_frames(j2);
    assert_eq!(again.len(), frames.len());
    for (a, b) in frames.iter().zip(&again) {
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "stored as relayed, not encoded again"
        );
    }
    drop(w);
    assert_eq!(budget.used(), 0);
}

#[test]
fn a_zero_size_snapshot_syncs_its_joiners() {
    let (mut w, p) = world_with_provider(SessionConfig::default(), 1);
    let j = w.join(Role::Observer);
    let req = w.request_of(p).expect("asked");
    w.upload(p, req, &[], 1, 0..1);
    w.flush(j);
    assert_synced_with(&w.view(j), 1, &[], 1);
}
