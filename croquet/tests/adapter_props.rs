//! The Croquet adapter driven by simulated clients on a virtual clock through generated
//! interleavings of connects, joins, sends, debounced sends, votes, snapshots, garbage, drops,
//! flushes and time. Whatever happens:
//! - every client sees one order: its SYNC's messages run without gaps up to the SYNC's seq
//!   (from just after the snapshot, or from the first message), and its RECVs continue from
//!   there, each seq one above the last (uint32, wrapping);
//! - all clients agree on every message's bytes (time, seq, payload), whether it came in a
//!   RECV or was replayed in a SYNC, and times never decrease;
//! - nothing is sent to a connection after it was closed, and bad frames get fatal codes.

use isthmus_croquet::adapter::{Action, AdapterConfig, CroquetSession, NoPersistence};
use isthmus_croquet::frames::INITIAL_SEQ;
use isthmus_router::ids::ConnId;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
enum Op {
    Connect(usize),
    Join(usize),
    Send(usize),
    Debounced(usize),
    Tutti(usize, u8),
    Snap(usize),
    Garbage(usize, u8),
    Drop(usize),
    Flush,
    Advance(u16),
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0usize..4;
    prop_oneof![
        2 => c.clone().prop_map(Op::Connect),
        2 => c.clone().prop_map(Op::Join),
        6 => c.clone().prop_map(Op::Send),
        1 => c.clone().prop_map(Op::Debounced),
        1 => (c.clone(), 0u8..3).prop_map(|(i, k)| Op::Tutti(i, k)),
        1 => c.clone().prop_map(Op::Snap),
        1 => (c.clone(), 0u8..3).prop_map(|(i, k)| Op::Garbage(i, k)),
        1 => c.prop_map(Op::Drop),
        2 => Just(Op::Flush),
        3 => (1u16..3000).prop_map(Op::Advance),
    ]
}

#[derive(Default)]
struct Client {
    conn: Option<ConnId>,
    joined: bool,
    /// The last seq seen, once synced.
    last: Option<u32>,
    /// The last message time seen.
    time: u64,
    /// The last (seq, time) seen, for a snapshot.
    snap_at: Option<(u32, u64)>,
    /// Bytes counted by the core and not yet credited.
    unflushed: usize,
    /// The session's timeline, from SYNC: a session that lingered out and started again
    /// counts from the initial seq again under a new timeline.
    timeline: String,
}

struct World {
    s: CroquetSession,
    now: Instant,
    clients: Vec<Client>,
    by_conn: HashMap<ConnId, usize>,
    closed: HashSet<ConnId>,
    next_conn: u64,
    /// Every message's args text by seq, as first seen by anyone.
    agreed: BTreeMap<(String, u32), String>,
    sends: u64,
    snaps: u64,
}

impl World {
    fn new() -> World {
        let now = Instant::now();
        let mut cfg = AdapterConfig::default();
        // Small bounds, so slow consumers and history cuts happen too.
        cfg.session.max_outbound_bytes = 64 * 1024;
        cfg.session.max_history_messages = 400;
        World {
            s: CroquetSession::new("prop", cfg, "tl".into(), Box::new(NoPersistence)),
            now,
            clients: (0..4).map(|_| Client::default()).collect(),
            by_conn: HashMap::new(),
            closed: HashSet::new(),
            next_conn: 1,
            agreed: BTreeMap::new(),
            sends: 0,
            snaps: 0,
        }
    }

    fn text(&mut self, i: usize, text: &str) {
        if let Some(conn) = self.clients[i].conn {
            self.s.handle_text(conn, text, self.now);
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Connect(i) if self.clients[*i].conn.is_none() => {
                let conn = ConnId(self.next_conn);
                self.next_conn += 1;
                self.clients[*i] = Client {
                    conn: Some(conn),
                    ..Client::default()
                };
                self.by_conn.insert(conn, *i);
                self.s.handle_connect(conn, true, self.now);
            }
            Op::Connect(_) => {}
            Op::Join(i) if !self.clients[*i].joined => {
                self.clients[*i].joined = self.clients[*i].conn.is_some();
                let args = json!({"apiKey": "k", "version": 1, "user": format!("u{i}"),
                    "appId": "a", "persistentId": "p", "ticks": {"tick": 100}, "tove": "t"});
                let frame = json!({"action": "JOIN", "args": args}).to_string();
                self.text(*i, &frame);
            }
            Op::Join(_) => {}
            Op::Send(i) => {
                self.sends += 1;
                let frame =
                    json!({"action": "SEND", "args": [0, 0, format!("p{}", self.sends), 7]});
                self.text(*i, &frame.to_string());
            }
            Op::Debounced(i) => {
                let frame = json!({"action": "SEND", "args": [0, 0, "poll", 0],
                    "tags": {"debounce": 1000, "msgID": "poll"}});
                self.text(*i, &frame.to_string());
            }
            Op::Tutti(i, k) => {
                let t = self.clients[*i].time;
                let frame = json!({"action": "TUTTI",
                    "args": [t, 0, format!("v{i}"), null, true, ["t"], format!("k{k}@{t}")]});
                self.text(*i, &frame.to_string());
            }
            Op::Snap(i) => {
                if let Some((seq, time)) = self.clients[*i].snap_at {
                    self.snaps += 1;
                    let frame = json!({"action": "SNAP", "args": {"time": time, "seq": seq,
                        "hash": "h", "url": format!("u{}", self.snaps)}});
                    self.text(*i, &frame.to_string());
                }
            }
            Op::Garbage(i, k) => {
                let frame = match k {
                    0 => "{oops",
                    1 => r#"{"action":"NOPE"}"#,
                    _ => r#"{"action":"SEND","args":{"x":1}}"#,
                };
                let conn = self.clients[*i].conn;
                let joined = self.clients[*i].joined;
                self.text(*i, frame);
                // SEND before JOIN is ignored, as the reference does; anything else is fatal.
                if let Some(conn) = conn {
                    if *k != 2 || joined {
                        assert!(self.closed.contains(&conn) || self.pending_close(conn));
                    }
                }
            }
            Op::Drop(i) => {
                if let Some(conn) = self.clients[*i].conn.take() {
                    self.clients[*i] = Client::default();
                    self.closed.insert(conn);
                    self.s.handle_disconnect(conn, self.now);
                }
            }
            Op::Flush => {
                for c in &mut self.clients {
                    if let (Some(conn), n) = (c.conn, std::mem::take(&mut c.unflushed)) {
                        if n > 0 {
                            self.s.handle_flushed(conn, n, self.now);
                        }
                    }
                }
            }
            Op::Advance(ms) => {
                let until = self.now + Duration::from_millis(u64::from(*ms));
                while let Some(t) = self.s.poll_timeout().filter(|t| *t <= until) {
                    self.now = self.now.max(t);
                    self.s.handle_timeout(self.now);
                    self.drain();
                }
                self.now = until;
                self.s.handle_timeout(self.now);
            }
        }
        self.drain();
    }

    /// Whether a close for `conn` is among the actions not yet drained (then drains them).
    fn pending_close(&mut self, conn: ConnId) -> bool {
        self.drain();
        self.closed.contains(&conn)
    }

    fn drain(&mut self) {
        while let Some(a) = self.s.poll_action() {
            match a {
                Action::Send {
                    conn,
                    frame,
                    counted,
                } => {
                    assert!(!self.closed.contains(&conn), "a frame after the close");
                    let i = self.by_conn[&conn];
                    if counted {
                        self.clients[i].unflushed += frame.len();
                    }
                    let v: Value = serde_json::from_slice(&frame).expect("frames are JSON");
                    self.receive(i, &v);
                }
                Action::Close { conn, code, .. } => {
                    assert!(self.closed.insert(conn), "closed twice");
                    assert!(code >= 4000, "a Croquet close code, not {code}");
                    let i = self.by_conn[&conn];
                    if self.clients[i].conn == Some(conn) {
                        self.clients[i] = Client::default();
                    }
                }
                Action::Save { .. }
                | Action::SnapshotStored { .. }
                | Action::Log(_)
                | Action::Notice(_) => {}
            }
        }
    }

    fn message(&mut self, i: usize, m: &Value) {
        let seq = m[1].as_u64().expect("seq") as u32;
        let time = m[0].as_u64().expect("time");
        let c = &mut self.clients[i];
        let expected = c.last.map(|l| l.wrapping_add(1));
        assert_eq!(Some(seq), expected, "client {i}: a gap or a repeat");
        assert!(time >= c.time, "time went back");
        c.last = Some(seq);
        c.time = time;
        c.snap_at = Some((seq, time));
        let text = m.to_string();
        let key = (c.timeline.clone(), seq);
        let agreed = self.agreed.entry(key).or_insert_with(|| text.clone());
        assert_eq!(*agreed, text, "clients disagree on message {seq:#x}");
    }

    fn receive(&mut self, i: usize, v: &Value) {
        match v["action"].as_str() {
            Some("SYNC") => {
                let a = &v["args"];
                let seq = a["seq"].as_u64().expect("seq") as u32;
                let msgs = a["messages"].as_array().expect("messages").clone();
                let start = if a["url"].as_str().is_some_and(|u| !u.is_empty()) {
                    a["snapshotSeq"].as_u64().expect("snapshotSeq") as u32
                } else {
                    INITIAL_SEQ
                };
                assert_eq!(
                    start.wrapping_add(msgs.len() as u32),
                    seq,
                    "SYNC replays exactly the messages after its start"
                );
                self.clients[i].last = Some(start);
                self.clients[i].timeline = a["timeline"].as_str().expect("timeline").to_string();
                self.clients[i].snap_at = Some((seq, a["time"].as_u64().expect("time")));
                for m in &msgs {
                    self.message(i, m);
                }
                assert_eq!(self.clients[i].last, Some(seq));
            }
            Some("RECV") => {
                assert!(self.clients[i].last.is_some(), "RECV before SYNC");
                self.message(i, &v["args"]);
            }
            Some("TICK") => {
                let t = v["args"].as_u64().expect("tick time");
                assert!(t >= self.clients[i].time, "a tick went back in time");
                self.clients[i].time = t;
            }
            Some("PONG" | "REQU") => {}
            other => panic!("unexpected frame {other:?}: {v}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn clients_agree_on_one_gapless_order(ops in proptest::collection::vec(op(), 1..400)) {
        let mut w = World::new();
        for op in &ops {
            w.apply(op);
        }
        w.apply(&Op::Flush);
        w.apply(&Op::Advance(2000));
    }
}

#[test]
fn seqs_wrap_past_2_32_in_order() {
    let mut w = World::new();
    w.apply(&Op::Connect(0));
    w.apply(&Op::Join(0));
    for _ in 0..40 {
        w.apply(&Op::Send(0));
    }
    let tl = w.clients[0].timeline.clone();
    assert!(w.agreed.contains_key(&(tl.clone(), 0xFFFF_FFFF)) && w.agreed.contains_key(&(tl, 0)));
}

#[test]
fn a_session_that_lingered_out_starts_again_under_a_new_timeline() {
    let mut w = World::new();
    for op in [Op::Connect(1), Op::Join(1), Op::Advance(200), Op::Drop(1)] {
        w.apply(&op);
    }
    let first = w.agreed.keys().next().cloned().expect("a message");
    for ms in [767, 2142, 1329, 2729, 1999, 1034] {
        w.apply(&Op::Advance(ms));
    }
    w.apply(&Op::Connect(3));
    w.apply(&Op::Join(3));
    assert_ne!(w.clients[3].timeline, first.0, "{:?}", w.agreed);
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|x| json!(x)),
        "[ -~]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..7).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("time".to_string()),
                    Just("seq".to_string()),
                    Just("url".to_string()),
                    Just("apiKey".to_string()),
                    Just("version".to_string()),
                    Just("tick".to_string()),
                    Just("debounce".to_string()),
                    Just("msgID".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn hostile_frame() -> impl Strategy<Value = String> {
    let action = prop_oneof![
        Just(json!("JOIN")),
        Just(json!("SEND")),
        Just(json!("TUTTI")),
        Just(json!("SNAP")),
        Just(json!("SAVE")),
        Just(json!("TICKS")),
        Just(json!("PING")),
        Just(json!("PULSE")),
        json_value(),
    ];
    prop_oneof![
        (action, json_value(), proptest::option::of(json_value())).prop_map(|(a, args, tags)| {
            let mut f = json!({"action": a, "args": args});
            if let Some(t) = tags {
                f["tags"] = t;
            }
            f.to_string()
        }),
        "\\PC{0,40}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Whatever joined and unjoined clients send, the adapter neither panics nor breaks the
    /// order the other clients see, and closes only with Croquet codes.
    #[test]
    fn hostile_frames_never_break_the_session(
        frames in proptest::collection::vec((0usize..3, hostile_frame()), 1..60),
    ) {
        let mut w = World::new();
        for i in 0..3 {
            w.apply(&Op::Connect(i));
        }
        w.apply(&Op::Join(0));
        w.apply(&Op::Join(1));
        for (i, f) in &frames {
            w.text(*i, f);
            w.drain();
            w.apply(&Op::Send(0));
            w.apply(&Op::Advance(150));
        }
        w.apply(&Op::Flush);
        w.apply(&Op::Advance(3000));
    }
}

#[test]
fn a_snapshot_from_the_future_is_ignored_and_does_not_shut_out_real_ones() {
    let t0 = Instant::now();
    let mut s = CroquetSession::new(
        "future",
        AdapterConfig::default(),
        "tl".into(),
        Box::new(NoPersistence),
    );
    let join = json!({"action": "JOIN", "args": {"apiKey": "k", "version": 1, "user": "u"}});
    s.handle_connect(ConnId(1), true, t0);
    s.handle_text(ConnId(1), &join.to_string(), t0);
    let t1 = t0 + std::time::Duration::from_millis(500);
    let snap = |time: f64, url: &str| {
        json!({"action": "SNAP", "args": {"time": time, "seq": 0xFFFF_FFF0u32, "url": url}})
            .to_string()
    };
    s.handle_text(ConnId(1), &snap(1e300, "http://h/files/evil"), t1);
    s.handle_text(ConnId(1), &snap(400.0, "http://h/files/real"), t1);
    while s.poll_action().is_some() {}
    s.handle_connect(ConnId(2), true, t1);
    s.handle_text(ConnId(2), &join.to_string(), t1);
    let mut sync = None;
    while let Some(a) = s.poll_action() {
        if let Action::Send { conn, frame, .. } = a {
            let v: Value = serde_json::from_slice(&frame).expect("json");
            if conn == ConnId(2) && v["action"] == "SYNC" {
                sync = Some(v);
            }
        }
    }
    let sync = sync.expect("a SYNC for the joiner");
    assert_eq!(sync["args"]["url"], "http://h/files/real", "{sync}");
}
