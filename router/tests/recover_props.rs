//! A session that dies and is re-created from its replicas, over generated interleavings.
//!
//! Simulated replicas (decoding the real frames a core emits, keeping a log of what they applied,
//! their snapshot being that log) run a random schedule of sends, partial deliveries, snapshot
//! uploads and reconnects against one core. At a random point the core "dies": each replica
//! reads a random prefix of what was queued to it and loses the rest. A fresh core is then fed
//! the replicas' recovering hellos (and their pipelined duplicate tables) in a random order and
//! at random moments, some possibly after the gathering ended, sends go on (with resends of
//! whatever was not confirmed), and the dust settles. The checks: every replica's applied order
//! is gapless and one order across the death, router time never goes back on any replica's
//! stream, no send is stamped twice, and every send of every replica that came back in time is
//! stamped exactly once.

use bytes::Bytes;
use isthmus_router::auth::{self, Capability, IslandKeys};
use isthmus_router::ids::{ConnId, ReplicaId, RouterTime, Seq};
use isthmus_router::session::{JoinRequest, Output, Session, SessionConfig};
use isthmus_router::wire::{
    self, ClientFrame, Message, Origin, Recover, Role, SeenEntry, ServerFrame,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};
use uuid::Uuid;

const GATHER: Duration = Duration::from_secs(3);

fn keys() -> IslandKeys {
    auth::island_keys(&Capability::from_parts(Role::Admin, [7; 32])).expect("admin")
}

fn config(incarnation: u64) -> SessionConfig {
    SessionConfig {
        incarnation,
        gather_timeout: GATHER,
        linger: Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(3600),
        snapshot_timeout: Duration::from_secs(3600),
        ..SessionConfig::default()
    }
}

#[derive(Default)]
struct Sim {
    id: Option<ReplicaId>,
    conn: Option<ConnId>,
    inbox: VecDeque<Bytes>,
    log: Vec<Message>,
    valid: bool,
    /// (at, announced length, bytes so far)
    syncing: Option<(u64, Option<u64>, Vec<u8>)>,
    last_time: u64,
    next_cs: u64,
    unconfirmed: VecDeque<(u64, Bytes)>,
    welcomed: bool,
    incarnation: Option<u64>,
    epoch: u64,
    /// The epoch of the order its state belongs to (that of its last `Synced`).
    synced_epoch: u64,
    tick_us: u64,
    present: BTreeSet<ReplicaId>,
    presence_whole: bool,
    /// Came back after the gathering ended (its own sends past the new order may be lost).
    late: bool,
}

impl Sim {
    fn last_seq(&self) -> u64 {
        self.log.last().map_or(0, |m| m.seq.0)
    }

    fn seen(&self) -> Vec<SeenEntry> {
        let mut table: BTreeMap<ReplicaId, SeenEntry> = BTreeMap::new();
        for m in &self.log {
            if let Origin::Replica(r) = m.origin {
                table.insert(
                    r,
                    SeenEntry {
                        replica: r,
                        client_seq: m.client_seq,
                        at: m.seq,
                    },
                );
            }
        }
        table.into_values().collect()
    }

    fn finish_restore(&mut self) {
        let Some((at, Some(len), data)) = self.syncing.as_mut() else {
            return;
        };
        assert_eq!(data.len() as u64, *len, "the whole snapshot arrived");
        let log: Vec<Message> = wire::decode_body(data).expect("a snapshot this test made");
        assert_eq!(
            log.last().map_or(0, |m| m.seq.0),
            *at,
            "snapshot at its seq"
        );
        // A restore replaces the island state, its time included.
        self.last_time = log.last().map_or(0, |m| m.time.0);
        let at = *at;
        self.log = log;
        let mine = self
            .seen()
            .iter()
            .find(|e| Some(e.replica) == self.id)
            .map_or(0, |e| e.client_seq);
        self.unconfirmed.retain(|(cs, _)| *cs > mine);
        self.syncing = Some((at, None, Vec::new()));
    }
}

struct World {
    core: Session,
    now: Instant,
    sims: Vec<Sim>,
    ids: Vec<ReplicaId>,
    next_conn: u64,
    dead: bool,
}

impl World {
    fn owner(&self, conn: ConnId) -> Option<usize> {
        self.sims.iter().position(|s| s.conn == Some(conn))
    }

    fn drain(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit { conn, frame } => {
                    let i = self.owner(conn).expect("a known connection");
                    self.sims[i].inbox.push_back(frame);
                }
                Output::Close { conn, goodbye, .. } => {
                    let Some(i) = self.owner(conn) else { continue };
                    let frames: Vec<Bytes> = self.sims[i].inbox.drain(..).chain(goodbye).collect();
                    // Read to the end, then the connection is gone: nothing goes back.
                    for f in frames {
                        let _ = self.apply(i, &f);
                    }
                    self.lose(i);
                }
                Output::Notice(_) => {}
            }
        }
    }

    fn lose(&mut self, i: usize) {
        let s = &mut self.sims[i];
        s.conn = None;
        s.welcomed = false;
        s.inbox.clear();
        if s.syncing.take().is_some() {
            s.valid = false;
        }
    }

    fn frame(&mut self, i: usize, frame: ClientFrame) {
        if let Some(conn) = self.sims[i].conn {
            if !self.dead {
                self.core.handle_frame(conn, frame, self.now);
                self.drain();
            }
        }
    }

    /// Connects replica `i` with a recovering hello (once it was welcomed) and pipelines its
    /// duplicate table when its state is consistent.
    fn connect(&mut self, i: usize) {
        if self.sims[i].conn.is_some() {
            return;
        }
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let s = &mut self.sims[i];
        s.conn = Some(conn);
        let resume_from = s.valid.then(|| Seq(s.last_seq()));
        let recover = s.incarnation.map(|incarnation| Recover {
            incarnation,
            epoch: s.synced_epoch,
            time: RouterTime(s.last_time),
            members: s.present.len() as u32,
            tick_interval_us: s.tick_us,
            create: None,
        });
        let seen = (recover.is_some() && resume_from.is_some()).then(|| s.seen());
        let req = JoinRequest {
            replica: self.ids[i],
            name: format!("r{i}"),
            role: Role::Replica,
            resume_from,
            contacts: wire::Contacts::default(),
            created: false,
            nonce: [i as u8; 32],
            control: false,
            recover,
            cluster: Vec::new(),
        };
        self.core.handle_join(conn, req, self.now);
        self.drain();
        if let Some(entries) = seen {
            self.frame(i, ClientFrame::Seen { entries });
        }
    }

    fn send(&mut self, i: usize) {
        let s = &mut self.sims[i];
        s.next_cs += 1;
        let cs = s.next_cs;
        let payload = Bytes::from(format!("r{i}-{cs}"));
        s.unconfirmed.push_back((cs, payload.clone()));
        if s.welcomed {
            self.frame(
                i,
                ClientFrame::Send {
                    client_seq: cs,
                    payload,
                },
            );
        }
    }

    /// Delivers up to `n` queued frames to replica `i` and sends what it answers.
    fn deliver(&mut self, i: usize, n: usize) {
        for _ in 0..n {
            let Some(f) = self.sims[i].inbox.pop_front() else {
                return;
            };
            let replies = self.apply(i, &f);
            if let Some(conn) = self.sims[i].conn {
                self.core.handle_flushed(conn, f.len(), self.now);
                self.drain();
            }
            for r in replies {
                self.frame(i, r);
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        if !self.dead && self.core.poll_timeout().is_some_and(|t| t <= self.now) {
            self.core.handle_timeout(self.now);
            self.drain();
        }
    }

    /// Applies one frame as a replica would, returning the frames it sends back.
    fn apply(&mut self, i: usize, bytes: &Bytes) -> Vec<ClientFrame> {
        let frame: ServerFrame = wire::decode_body(&bytes[4..]).expect("a valid frame");
        let me = self.ids[i];
        let s = &mut self.sims[i];
        let mut replies = Vec::new();
        match frame {
            ServerFrame::Welcome(w) => {
                assert!(w.epoch >= s.epoch, "a welcome below a known epoch");
                if let Some(inc) = s.incarnation {
                    assert_eq!(
                        inc, w.incarnation,
                        "the re-created island keeps its incarnation"
                    );
                }
                s.incarnation = Some(w.incarnation);
                s.epoch = w.epoch;
                s.tick_us = w.tick_interval_us;
                s.welcomed = true;
                s.presence_whole = true;
                // Sends the welcome says were stamped are kept until they are applied: if the
                // router that stamped them dies before anyone applied them, they go again.
                for (client_seq, payload) in s
                    .unconfirmed
                    .iter()
                    .filter(|(cs, _)| *cs > w.last_client_seq)
                    .cloned()
                {
                    replies.push(ClientFrame::Send {
                        client_seq,
                        payload,
                    });
                }
            }
            ServerFrame::Presence { joined, left } => {
                if std::mem::take(&mut s.presence_whole) {
                    s.present.clear();
                }
                s.present.extend(joined.iter().map(|p| p.replica));
                for r in left {
                    s.present.remove(&r);
                }
            }
            ServerFrame::SyncBegin { at, snapshot_len } => {
                s.valid = false;
                if snapshot_len.is_none() {
                    assert_eq!(at.0, 0, "a fresh sync starts at 0");
                    s.log.clear();
                }
                s.syncing = Some((at.0, snapshot_len, Vec::new()));
            }
            ServerFrame::SnapshotData { data } => {
                let (_, _, buf) = s.syncing.as_mut().expect("data inside a sync");
                buf.extend_from_slice(&data);
            }
            ServerFrame::Message(m) => {
                if s.syncing.is_none() {
                    // A resume: its state is part of this welcome's order from here on.
                    s.synced_epoch = s.epoch;
                }
                s.finish_restore();
                assert_eq!(m.seq.0, s.last_seq() + 1, "replica {i}: no gap");
                assert!(m.time.0 >= s.last_time, "replica {i}: time went back");
                s.last_time = m.time.0;
                if m.origin == Origin::Replica(me) {
                    s.unconfirmed.retain(|(cs, _)| *cs > m.client_seq);
                }
                s.log.push(m);
            }
            ServerFrame::Synced {
                seq,
                last_client_seq,
            } => {
                s.finish_restore();
                assert_eq!(seq.0, s.last_seq(), "synced where it is");
                s.syncing = None;
                s.valid = true;
                s.synced_epoch = s.epoch;
                s.unconfirmed.retain(|(cs, _)| *cs > last_client_seq);
            }
            ServerFrame::Tick { time } => {
                assert!(time.0 >= s.last_time, "replica {i}: a tick went back");
                s.last_time = time.0;
            }
            ServerFrame::SnapshotRequest { request, at } => {
                if s.valid && s.syncing.is_none() && s.last_seq() == at.0 {
                    let data = Bytes::from(wire::encode_body(&s.log));
                    replies.push(ClientFrame::SnapshotChunk {
                        request,
                        at,
                        offset: 0,
                        total: data.len() as u64,
                        data,
                    });
                }
            }
            ServerFrame::Refuse { code, reason } | ServerFrame::Goodbye { code, reason } => {
                assert!(
                    code.is_retryable(),
                    "replica {i} closed with {code}: {reason}"
                );
            }
            ServerFrame::Divergence(_)
            | ServerFrame::Ping { .. }
            | ServerFrame::Pong { .. }
            | ServerFrame::AdminDone { .. } => {}
            ServerFrame::Redirect { .. } => panic!("a lone core never redirects"),
        }
        replies
    }

    /// Delivers everything, reconnects whoever lost its connection, and lets time pass until
    /// nothing moves.
    fn settle(&mut self) {
        for _ in 0..200 {
            for i in 0..self.sims.len() {
                if self.sims[i].conn.is_none() {
                    self.connect(i);
                }
                let n = self.sims[i].inbox.len();
                self.deliver(i, n);
            }
            let quiet = self.sims.iter().all(|s| {
                s.inbox.is_empty() && s.valid && s.syncing.is_none() && s.unconfirmed.is_empty()
            });
            if quiet {
                return;
            }
            self.advance(Duration::from_millis(500));
        }
        let states: Vec<String> = self
            .sims
            .iter()
            .map(|s| {
                format!(
                    "conn {:?} inbox {} valid {} syncing {} unconfirmed {} last {}",
                    s.conn,
                    s.inbox.len(),
                    s.valid,
                    s.syncing.is_some(),
                    s.unconfirmed.len(),
                    s.last_seq()
                )
            })
            .collect();
        panic!(
            "the replicas did not settle (gathering {}): {states:#?}",
            self.core.is_gathering()
        );
    }
}

#[derive(Clone, Debug)]
enum Op {
    Send(usize),
    Deliver(usize, usize),
    Reconnect(usize),
    Wait(u64),
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..n).prop_map(Op::Send),
        4 => (0..n, 1..6usize).prop_map(|(i, k)| Op::Deliver(i, k)),
        1 => (0..n).prop_map(Op::Reconnect),
        1 => (1..200u64).prop_map(Op::Wait),
    ]
}

fn run_op(w: &mut World, op: &Op) {
    match *op {
        Op::Send(i) => w.send(i),
        Op::Deliver(i, k) => w.deliver(i, k),
        Op::Reconnect(i) => {
            if let Some(conn) = w.sims[i].conn {
                w.core.handle_disconnect(conn, w.now);
                w.lose(i);
                w.drain();
            }
            w.connect(i);
        }
        Op::Wait(ms) => w.advance(Duration::from_millis(ms)),
    }
}

/// One run: `before` on the first core, the death (replica `i` reads `kept[i]` of its queued
/// frames), the recovering hellos at `arrivals` (replica, ms after the first), `after` on the
/// new core, then settling.
fn scenario(
    n: usize,
    before: &[Op],
    kept: &[usize],
    arrivals: &[(usize, u64)],
    after: &[Op],
) -> World {
    let now = Instant::now();
    let k = keys();
    let mut w = World {
        core: Session::new(k.session_id(), k, config(7), now),
        now,
        sims: (0..n)
            .map(|i| Sim {
                id: Some(ReplicaId(Uuid::from_u128(100 + i as u128))),
                ..Sim::default()
            })
            .collect(),
        ids: (0..n)
            .map(|i| ReplicaId(Uuid::from_u128(100 + i as u128)))
            .collect(),
        next_conn: 1,
        dead: false,
    };
    for i in 0..n {
        w.connect(i);
        let q = w.sims[i].inbox.len();
        w.deliver(i, q);
    }
    for op in before {
        run_op(&mut w, op);
    }
    // The death: each replica reads part of what was on its way, the rest is lost.
    w.dead = true;
    for (i, keep) in kept.iter().enumerate().take(n) {
        let take = (*keep).min(w.sims[i].inbox.len());
        let frames: Vec<Bytes> = w.sims[i].inbox.drain(..take).collect();
        for f in frames {
            let _ = w.apply(i, &f);
        }
        w.lose(i);
    }
    let before_death: Vec<Vec<Message>> = w.sims.iter().map(|s| s.log.clone()).collect();
    let sends_before: Vec<u64> = w.sims.iter().map(|s| s.next_cs).collect();
    w.dead = false;
    w.core = Session::new(k.session_id(), k, config(999), w.now);
    let mut order: Vec<(usize, u64)> = arrivals.to_vec();
    order.sort_by_key(|(_, at)| *at);
    let start = w.now;
    for (i, at) in order {
        let when = start + Duration::from_millis(at);
        if when > w.now {
            let gap = when - w.now;
            w.advance(gap);
        }
        if !w.core.is_gathering() {
            w.sims[i].late = true;
        }
        w.connect(i);
    }
    for op in after {
        run_op(&mut w, op);
    }
    w.advance(GATHER);
    w.settle();
    check(&w, &before_death, &sends_before);
    w
}

fn check(w: &World, before_death: &[Vec<Message>], sends_before: &[u64]) {
    let reference = &w.sims[0].log;
    let short = |log: &[Message]| -> Vec<String> {
        log.iter()
            .map(|m| {
                format!(
                    "{}:{}@{}",
                    m.seq.0,
                    String::from_utf8_lossy(&m.payload),
                    m.time.0
                )
            })
            .collect()
    };
    for (i, s) in w.sims.iter().enumerate() {
        assert!(
            &s.log == reference,
            "replica {i} holds another order: {:?}, replica 0: {:?}",
            short(&s.log),
            short(reference)
        );
        assert!(s.unconfirmed.is_empty(), "replica {i} has unstamped sends");
    }
    // One order across the death: what a replica held then is a prefix of the order now,
    // unless it came back late with messages nobody else had (it was resynced).
    for (i, old) in before_death.iter().enumerate() {
        if !w.sims[i].late {
            assert!(
                reference.starts_with(old),
                "replica {i}'s order before the death continues"
            );
        }
    }
    let mut stamped: BTreeMap<(ReplicaId, u64), usize> = BTreeMap::new();
    for m in reference {
        if let Origin::Replica(r) = m.origin {
            *stamped.entry((r, m.client_seq)).or_default() += 1;
        }
    }
    assert!(stamped.values().all(|n| *n == 1), "a send stamped twice");
    for (i, s) in w.sims.iter().enumerate() {
        if s.late {
            continue;
        }
        for cs in 1..=s.next_cs {
            assert!(
                stamped.contains_key(&(w.ids[i], cs)),
                "replica {i}'s send {cs} (of {} before the death) was never stamped",
                sends_before[i]
            );
        }
    }
}

fn arrivals(n: usize) -> impl Strategy<Value = Vec<(usize, u64)>> {
    proptest::collection::vec((0..2_500u64, prop::bool::weighted(0.15)), n).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (at, late))| (i, if late { at + 4_000 } else { at }))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn an_island_re_created_from_its_replicas_keeps_one_order(
        before in proptest::collection::vec(op(4), 0..80),
        kept in proptest::collection::vec(0..40usize, 4),
        arrivals in arrivals(4),
        after in proptest::collection::vec(op(4), 0..40),
    ) {
        scenario(4, &before, &kept, &arrivals, &after);
    }
}

#[test]
fn the_most_advanced_replica_founds_the_order_and_the_rest_resync_from_it() {
    use Op::*;
    // Replica 0 sends six; only replica 1 reads them all before the death.
    let before = [
        Send(0),
        Send(0),
        Send(0),
        Send(2),
        Send(0),
        Send(0),
        Send(0),
    ];
    let w = scenario(
        3,
        &before,
        &[2, 40, 0],
        &[(0, 0), (1, 100), (2, 200)],
        &[Send(2)],
    );
    let log = &w.sims[0].log;
    assert_eq!(log.len(), 8, "seven before the death, one after");
    // Router time went on from the newest claimed, and the epoch moved up.
    assert!(w.sims.iter().all(|s| s.epoch == 2));
}

/// The founder drops out before it uploads the snapshot the others wait for, and comes back
/// resuming into the new order before it was told it is synced: it must still count as part of
/// the new order (else nobody could provide a snapshot again).
#[test]
fn a_founder_that_drops_before_its_snapshot_resumes_into_the_new_order() {
    use Op::*;
    scenario(
        4,
        &[Send(0)],
        &[0, 0, 2, 0],
        &[(0, 403), (1, 0), (2, 0), (3, 0)],
        &[
            Send(3),
            Deliver(3, 1),
            Reconnect(2),
            Deliver(2, 2),
            Deliver(2, 1),
            Reconnect(2),
        ],
    );
}

fn recovering(replica: u128, role: Role, resume: Option<u64>, members: u32) -> JoinRequest {
    JoinRequest {
        replica: ReplicaId(Uuid::from_u128(replica)),
        name: format!("r{replica}"),
        role,
        resume_from: resume.map(Seq),
        contacts: wire::Contacts::default(),
        created: false,
        nonce: [0; 32],
        control: false,
        recover: Some(Recover {
            incarnation: 7,
            epoch: 1,
            time: RouterTime(resume.unwrap_or(0) * 10),
            members,
            tick_interval_us: 50_000,
            create: None,
        }),
        cluster: Vec::new(),
    }
}

/// The frames the core sent and closed with, decoded: (conn, frame).
fn outputs(core: &mut Session) -> Vec<(ConnId, ServerFrame)> {
    let mut out = Vec::new();
    while let Some(o) = core.poll_output() {
        match o {
            Output::Transmit { conn, frame } => {
                out.push((conn, wire::decode_body(&frame[4..]).expect("frame")))
            }
            Output::Close {
                conn,
                goodbye: Some(g),
                ..
            } => out.push((conn, wire::decode_body(&g[4..]).expect("goodbye"))),
            _ => {}
        }
    }
    out
}

#[test]
fn observers_alone_never_found_the_island_and_are_told_to_try_again() {
    let k = keys();
    let now = Instant::now();
    let mut core = Session::new(k.session_id(), k, config(1), now);
    core.handle_join(ConnId(1), recovering(1, Role::Observer, Some(5), 2), now);
    core.handle_frame(ConnId(1), ClientFrame::Seen { entries: vec![] }, now);
    assert!(core.is_gathering());
    assert!(outputs(&mut core).is_empty(), "held: no welcome");
    let later = now + GATHER;
    assert!(core.poll_timeout().is_some_and(|t| t <= later));
    core.handle_timeout(later);
    let out = outputs(&mut core);
    assert!(
        matches!(&out[..], [(ConnId(1), ServerFrame::Goodbye { code, .. })] if *code == wire::Code::RECOVERING),
        "{out:?}"
    );
    // A participant then founds it; the observer, back, follows.
    core.handle_join(ConnId(2), recovering(2, Role::Replica, Some(5), 2), later);
    core.handle_frame(ConnId(2), ClientFrame::Seen { entries: vec![] }, later);
    core.handle_join(ConnId(3), recovering(1, Role::Observer, Some(5), 2), later);
    assert!(!core.is_gathering());
    let welcomes: Vec<ConnId> = outputs(&mut core)
        .into_iter()
        .filter(|(_, f)| matches!(f, ServerFrame::Welcome(w) if w.last_seq == Seq(5) && w.incarnation == 7 && w.epoch == 2))
        .map(|(c, _)| c)
        .collect();
    assert_eq!(welcomes, vec![ConnId(2), ConnId(3)]);
}

#[test]
fn the_most_advanced_founds_even_when_many_lesser_tables_came_first() {
    let k = keys();
    let now = Instant::now();
    let mut core = Session::new(k.session_id(), k, config(1), now);
    let n = 12u128;
    let table = |upto: u64| {
        vec![SeenEntry {
            replica: ReplicaId(Uuid::from_u128(99)),
            client_seq: upto,
            at: Seq(upto),
        }]
    };
    // Everyone saw all n + 1 replicas; the most advanced (seq 50) comes last.
    for r in 1..=n {
        core.handle_join(
            ConnId(r as u64),
            recovering(r, Role::Replica, Some(r as u64), n as u32 + 1),
            now,
        );
        core.handle_frame(
            ConnId(r as u64),
            ClientFrame::Seen {
                entries: table(r as u64),
            },
            now,
        );
        assert!(core.is_gathering());
    }
    core.handle_join(
        ConnId(100),
        recovering(100, Role::Replica, Some(50), n as u32 + 1),
        now,
    );
    assert!(core.is_gathering(), "its table is not here yet");
    core.handle_frame(ConnId(100), ClientFrame::Seen { entries: table(50) }, now);
    assert!(!core.is_gathering(), "everyone it saw is back");
    assert_eq!(core.last_seq(), Seq(50));
    let out = outputs(&mut core);
    let founder = out.iter().find_map(|(c, f)| match f {
        ServerFrame::Welcome(w) if *c == ConnId(100) => Some(w.last_seq),
        _ => None,
    });
    assert_eq!(founder, Some(Seq(50)));
    // The founder's table is the router's: sender 99 is known up to client seq 50.
    core.handle_join(
        ConnId(200),
        JoinRequest {
            replica: ReplicaId(Uuid::from_u128(99)),
            ..recovering(99, Role::Replica, Some(50), 1)
        },
        now,
    );
    let w = outputs(&mut core).into_iter().find_map(|(c, f)| match f {
        ServerFrame::Welcome(w) if c == ConnId(200) => Some(w.last_client_seq),
        _ => None,
    });
    assert_eq!(w, Some(50));
}
