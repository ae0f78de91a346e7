//! The session core driven by fuzz-chosen sequences of joins (several connections, every role,
//! control connections, resumes), frames (well-formed ones and whatever decodes from the fuzz
//! bytes), flushes, disconnects, admin commands and time steps, draining every output.
//!
//! Some joins are recovering hellos (with a pipelined duplicate table), so a session may start
//! by gathering and continue an order from a claimed seq.
//!
//! Invariants checked: no panic; every frame the core emits decodes; nothing is sent to a
//! connection after its close; the Message seqs a connection receives are gap-free (from its
//! resume point or its sync's snapshot point); router time never decreases on a connection
//! within one sync; one seq is one message for everyone; the shared memory budget is never
//! passed and is wholly given back when the session is dropped.
#![no_main]
use bytes::{Bytes, BytesMut};
use isthmus_router::auth::{self, Capability, KeyPair};
use isthmus_router::budget::MemoryBudget;
use isthmus_router::ids::{ConnId, ReplicaId, RouterTime, Seq};
use isthmus_router::session::{JoinRequest, Output, Session, SessionConfig};
use isthmus_router::wire::{
    self, AdminCommand, ClientFrame, Origin, Recover, Role, SeenEntry, ServerFrame,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const REPLICAS: u8 = 5;

/// What the fuzzer knows about one connection it opened.
struct Conn {
    replica: u8,
    nonce: [u8; 32],
    open: bool,
    /// Bytes transmitted and not yet reported flushed.
    unflushed: usize,
    /// The seq the next Message must carry, once known.
    next_seq: Option<u64>,
    /// Router time of the last Message or Tick in the current sync.
    last_time: u64,
    /// A snapshot owed: (request, at, total, offset sent so far).
    owed: Option<(u64, u64, u64, u64)>,
    admin_seq: u64,
}

struct Fuzz {
    core: Session,
    budget: Arc<MemoryBudget>,
    now: Instant,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    client_seqs: [u64; REPLICAS as usize],
    /// seq -> (time, origin, client_seq): one total order for everyone.
    order: HashMap<u64, (u64, Origin, u64)>,
    admin: KeyPair,
    participant: KeyPair,
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let admin_cap = Capability::from_parts(Role::Admin, [1; 32]);
    let keys = auth::island_keys(&admin_cap).expect("an admin capability");
    let participant = admin_cap.weaker().expect("a participant capability");
    let budget = Arc::new(MemoryBudget::new(u.int_in_range(64..=64 * 1024)?));
    let cfg = SessionConfig {
        max_history_messages: u.int_in_range(1..=64)?,
        max_history_bytes: u.int_in_range(64..=16 * 1024)?,
        max_snapshot_bytes: u.int_in_range(1..=4096)?,
        max_outbound_bytes: u.int_in_range(256..=16 * 1024)?,
        snapshot_chunk_bytes: u.int_in_range(1..=512)?,
        max_payload_bytes: u.int_in_range(0..=512)?,
        max_members: u.int_in_range(1..=8)?,
        digest_window: u.int_in_range(1..=8)?,
        max_remembered_replicas: u.int_in_range(1..=8)?,
        announce_membership: u.arbitrary()?,
        budget: budget.clone(),
        ..SessionConfig::default()
    };
    let now = Instant::now();
    let mut f = Fuzz {
        core: Session::new(keys.session_id(), keys, cfg, now),
        budget,
        now,
        conns: BTreeMap::new(),
        next_conn: 1,
        client_seqs: [0; REPLICAS as usize],
        order: HashMap::new(),
        admin: admin_cap.key_pair(),
        participant: participant.key_pair(),
    };
    let result = f.steps(&mut u);
    let budget = f.budget.clone();
    drop(f);
    assert_eq!(
        budget.used(),
        0,
        "a dropped session gives its whole budget back"
    );
    result
}

impl Fuzz {
    fn steps(&mut self, u: &mut Unstructured) -> Result<()> {
        while !u.is_empty() {
            match u.int_in_range(0..=11u8)? {
                0 | 1 => self.join(u)?,
                2 | 3 => {
                    if let Some(c) = self.pick(u)? {
                        let replica = self.conns[&c].replica as usize;
                        // Mostly the next client seq; sometimes a stale or zero one.
                        let client_seq = if u.ratio(1, 8)? {
                            u.int_in_range(0..=self.client_seqs[replica])?
                        } else {
                            self.client_seqs[replica] += 1;
                            self.client_seqs[replica]
                        };
                        let len = u.int_in_range(0..=600)?;
                        let payload = Bytes::copy_from_slice(u.bytes(len.min(u.len()))?);
                        self.frame(
                            c,
                            ClientFrame::Send {
                                client_seq,
                                payload,
                            },
                        );
                    }
                }
                4 => {
                    // Whatever decodes from the fuzz bytes.
                    let len = u.int_in_range(0..=200)?;
                    let bytes = u.bytes(len.min(u.len()))?;
                    if let Ok(frame) = wire::decode_body::<ClientFrame>(bytes) {
                        if let Some(c) = self.pick(u)? {
                            self.frame(c, frame);
                        }
                    }
                }
                5 => {
                    if let Some(c) = self.pick(u)? {
                        let seq = Seq(u.int_in_range(0..=self.core.last_seq().0 + 1)?);
                        let hash = Bytes::from(vec![u.int_in_range(0..=2u8)?; 4]);
                        self.frame(c, ClientFrame::Digest { seq, hash });
                    }
                }
                6 => self.upload(u)?,
                7 => {
                    if let Some(c) = self.pick(u)? {
                        self.flush(c);
                    }
                }
                8 => {
                    if let Some(c) = self.pick(u)? {
                        // The core answers with a close of its own (nothing to write).
                        self.core.handle_disconnect(ConnId(c), self.now);
                        self.drain();
                        self.conns.get_mut(&c).expect("picked").open = false;
                    }
                }
                9 => {
                    self.now += Duration::from_millis(u.int_in_range(0..=70_000)?);
                    self.core.handle_timeout(self.now);
                    self.drain();
                }
                10 => self.admin(u)?,
                _ => {
                    if let Some(c) = self.pick(u)? {
                        self.frame(c, ClientFrame::Leave);
                    }
                }
            }
            // Everyone reads now and then, so syncs progress.
            if u.ratio(1, 4)? {
                let open: Vec<u64> = self.open_conns();
                for c in open {
                    self.flush(c);
                }
            }
            assert!(
                self.budget.used() <= self.budget.limit(),
                "{:?}",
                self.budget
            );
        }
        Ok(())
    }

    fn open_conns(&self) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| c.open)
            .map(|(n, _)| *n)
            .collect()
    }

    fn pick(&self, u: &mut Unstructured) -> Result<Option<u64>> {
        let open = self.open_conns();
        if open.is_empty() {
            return Ok(None);
        }
        Ok(Some(open[u.choose_index(open.len())?]))
    }

    fn join(&mut self, u: &mut Unstructured) -> Result<()> {
        let replica = u.int_in_range(0..=REPLICAS - 1)?;
        let role = *u.choose(&[Role::Replica, Role::Observer, Role::Admin])?;
        let control = u.ratio(1, 5)?;
        let last = self.core.last_seq().0;
        // A recovering hello claims what it knows; the first one re-creates the session.
        let recover = if u.ratio(1, 4)? {
            Some(Recover {
                incarnation: u.int_in_range(0..=1)?,
                epoch: u.int_in_range(0..=3)?,
                time: RouterTime(u.int_in_range(0..=10_000_000)?),
                members: u.int_in_range(0..=6)?,
                tick_interval_us: u.int_in_range(0..=100_000)?,
                create: None,
            })
        } else {
            None
        };
        let reach = if recover.is_some() {
            last + 20
        } else {
            last + 1
        };
        let resume_from = if u.arbitrary()? {
            Some(u.int_in_range(0..=reach)?)
        } else {
            None
        };
        let table = if recover.is_some() && u.ratio(3, 4)? {
            let mut entries = Vec::new();
            for r in 0..u.int_in_range(0..=REPLICAS)? {
                entries.push(SeenEntry {
                    replica: ReplicaId(Uuid::from_u128(u128::from(r) + 1)),
                    client_seq: u.int_in_range(0..=8)?,
                    at: Seq(u.int_in_range(0..=reach)?),
                });
            }
            Some(entries)
        } else {
            None
        };
        let name_len = u.int_in_range(0..=300)?;
        let n = self.next_conn;
        self.next_conn += 1;
        let mut nonce = [0u8; 32];
        nonce[..8].copy_from_slice(&n.to_le_bytes());
        self.conns.insert(
            n,
            Conn {
                replica,
                nonce,
                open: true,
                unflushed: 0,
                next_seq: resume_from.map(|s| s + 1),
                last_time: 0,
                owed: None,
                admin_seq: 0,
            },
        );
        let req = JoinRequest {
            replica: ReplicaId(Uuid::from_u128(u128::from(replica) + 1)),
            name: "n".repeat(name_len),
            role,
            resume_from: resume_from.map(Seq),
            contacts: wire::Contacts::default(),
            created: n == 1,
            nonce,
            control,
            recover,
            cluster: Vec::new(),
        };
        self.core.handle_join(ConnId(n), req, self.now);
        self.drain();
        if let Some(entries) = table {
            self.frame(n, ClientFrame::Seen { entries });
        }
        Ok(())
    }

    fn upload(&mut self, u: &mut Unstructured) -> Result<()> {
        let Some(c) = self.pick(u)? else {
            return Ok(());
        };
        let conn = self.conns.get_mut(&c).expect("picked");
        let Some((request, at, total, offset)) = conn.owed else {
            return Ok(());
        };
        let len = u.int_in_range(0..=total - offset)?;
        // Mostly honest; sometimes a wrong offset or size.
        let (offset_sent, total_sent) = if u.ratio(1, 10)? {
            (u.arbitrary()?, u.arbitrary()?)
        } else {
            (offset, total)
        };
        conn.owed = (offset + len < total).then_some((request, at, total, offset + len));
        let data = Bytes::from(vec![7u8; len as usize]);
        self.frame(
            c,
            ClientFrame::SnapshotChunk {
                request,
                at: Seq(at),
                offset: offset_sent,
                total: total_sent,
                data,
            },
        );
        Ok(())
    }

    fn admin(&mut self, u: &mut Unstructured) -> Result<()> {
        let Some(c) = self.pick(u)? else {
            return Ok(());
        };
        let command = match u.int_in_range(0..=2u8)? {
            0 => AdminCommand::SetTick {
                ms: u.int_in_range(0..=70_000)?,
            },
            1 => AdminCommand::Kick {
                replica: ReplicaId(Uuid::from_u128(u128::from(u.int_in_range(0..=REPLICAS)?))),
            },
            _ => AdminCommand::Close,
        };
        let conn = self.conns.get_mut(&c).expect("picked");
        let seq = if u.ratio(1, 8)? {
            u.int_in_range(0..=conn.admin_seq)?
        } else {
            conn.admin_seq += 1;
            conn.admin_seq
        };
        let key = if u.ratio(1, 8)? {
            &self.participant
        } else {
            &self.admin
        };
        let sig = key.sign(&auth::admin_transcript(
            &conn.nonce,
            self.core.id(),
            seq,
            &command,
        ));
        self.frame(c, ClientFrame::Admin { seq, command, sig });
        Ok(())
    }

    fn frame(&mut self, c: u64, frame: ClientFrame) {
        self.core.handle_frame(ConnId(c), frame, self.now);
        self.drain();
    }

    fn flush(&mut self, c: u64) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let bytes = std::mem::take(&mut conn.unflushed);
        self.core.handle_flushed(ConnId(c), bytes, self.now);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit { conn, frame } => self.receive(conn, &frame),
                Output::Close { conn, goodbye, .. } => {
                    let c = self
                        .conns
                        .get_mut(&conn.0)
                        .expect("a close for a known connection");
                    assert!(c.open, "closed twice: {conn:?}");
                    c.open = false;
                    if let Some(g) = goodbye {
                        match decode(&g) {
                            ServerFrame::Goodbye { .. } | ServerFrame::Refuse { .. } => {}
                            other => panic!("a close ends with {other:?}"),
                        }
                    }
                }
                Output::Notice(_) => {}
            }
        }
    }

    fn receive(&mut self, conn: ConnId, frame: &Bytes) {
        let c = self
            .conns
            .get_mut(&conn.0)
            .expect("a transmit to a known connection");
        assert!(c.open, "a transmit after the close of {conn:?}");
        c.unflushed += frame.len();
        match decode(frame) {
            ServerFrame::SyncBegin { at, .. } => {
                c.next_seq = Some(at.0 + 1);
                c.last_time = 0;
            }
            ServerFrame::Message(m) => {
                let next = c
                    .next_seq
                    .expect("a message before the sync said where it starts");
                assert_eq!(m.seq.0, next, "seq gap or repeat on {conn:?}");
                c.next_seq = Some(next + 1);
                assert!(m.time.0 >= c.last_time, "router time went back on {conn:?}");
                c.last_time = m.time.0;
                let entry = (m.time.0, m.origin, m.client_seq);
                let known = *self.order.entry(m.seq.0).or_insert(entry);
                assert_eq!(known, entry, "two messages with seq {}", m.seq.0);
            }
            ServerFrame::Tick { time } => {
                assert!(time.0 >= c.last_time, "a tick went back on {conn:?}");
                c.last_time = time.0;
            }
            ServerFrame::SnapshotRequest { request, at } => {
                c.owed = Some((request, at.0, u64::from(at.0 as u8) * 3, 0));
            }
            _ => {}
        }
    }
}

fn decode(frame: &Bytes) -> ServerFrame {
    let mut buf = BytesMut::from(&frame[..]);
    let decoded = wire::decode::<ServerFrame>(&mut buf, usize::MAX)
        .expect("the core emits valid frames")
        .expect("the core emits whole frames");
    assert!(buf.is_empty(), "one frame per transmit");
    decoded
}
