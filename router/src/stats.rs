//! What a running router counts, for its `/metrics` and status page.
//!
//! Counting must not slow the hot path, so it is split by how often things happen:
//!
//! - Per message or per write (messages stamped, deliveries, bytes, ticks): a [`SessionStats`]
//!   per session holds relaxed atomics that only that session's tasks write. The session task
//!   counts in plain integers and stores them once per batch of events; readers add the bytes of
//!   each read. A scrape sums every live session's atomics and the totals of ended ones
//!   ([`RouterStats::totals`]), so no message takes a lock shared with another session.
//! - Per connection or rarer (joins, closes, refusals, snapshots, divergences): one mutex in
//!   [`RouterStats`], which also keeps the newest refusals and divergences in bounded rings
//!   ([`RECENT_EVENTS`]) for the status page.
//!
//! Wall-clock times here are for people (the page shows "joined 5 min ago"); nothing orders by
//! them. The session core itself stays deterministic: the driver feeds its outputs here.

use crate::ids::{ReplicaId, SessionId};
use crate::session::Notice;
use crate::wire::Code;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Upper bounds (seconds) of the duration histograms' buckets: a join over loopback takes about
/// a millisecond, a late join with a large snapshot over a home uplink tens of seconds.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// Refusals and divergences kept for the status page, each: the newest, about a screenful;
/// older ones drop off (the counters in `/metrics` keep the totals).
pub const RECENT_EVENTS: usize = 32;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Observations of a duration, bucketed by [`DURATION_BUCKETS`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last entry is above every bound.
    pub buckets: [u64; DURATION_BUCKETS.len() + 1],
    /// Observations in all.
    pub count: u64,
    /// Their sum in seconds.
    pub sum_seconds: f64,
}

impl Histogram {
    /// Adds one observation.
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = DURATION_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i] += 1;
        self.count += 1;
        self.sum_seconds += s;
    }
}

/// The hot counters of one session, summed over sessions by [`RouterStats::totals`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Messages stamped (replicas' and the router's own membership messages).
    pub stamped: u64,
    /// Frames handed to replicas' connections: every copy of a message, ticks, sync pieces.
    pub deliveries: u64,
    /// Bytes read from replicas after their handshake.
    pub bytes_in: u64,
    /// Bytes written to replicas.
    pub bytes_out: u64,
    /// Ticks sent (one per tick, whatever the number of replicas).
    pub ticks: u64,
}

impl Traffic {
    fn add(&mut self, o: &Traffic) {
        self.stamped += o.stamped;
        self.deliveries += o.deliveries;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.ticks += o.ticks;
    }
}

/// A replica attached to a session, as the status page lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberInfo {
    /// Its connection number.
    pub conn: u64,
    /// Its replica id.
    pub replica: ReplicaId,
    /// Its display name (from its hello; empty when it gave none).
    pub name: String,
    /// When it attached (Unix seconds).
    pub since: f64,
    /// Whether it resumed rather than synced afresh.
    pub resumed: bool,
}

/// One session's counters and members, shared by its session task (the only writer, with its
/// readers for `bytes_in`) and whoever reads the router's status.
#[derive(Debug)]
pub struct SessionStats {
    id: SessionId,
    island: String,
    started: SystemTime,
    stamped: AtomicU64,
    deliveries: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    ticks: AtomicU64,
    members: Mutex<Vec<MemberInfo>>,
    router: Arc<RouterStats>,
}

/// A session as the status page shows it, read at one moment.
#[derive(Clone, Debug)]
pub struct SessionReading {
    /// The session.
    pub id: SessionId,
    /// Its announced name (empty for an unannounced island).
    pub island: String,
    /// When it started (Unix seconds).
    pub started: f64,
    /// Its counters.
    pub traffic: Traffic,
    /// Who is attached, in the order they joined.
    pub members: Vec<MemberInfo>,
}

impl SessionStats {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Publishes the session task's own counts; called once per batch of events, not per message.
    pub fn publish(&self, stamped: u64, deliveries: u64, bytes_out: u64, ticks: u64) {
        self.stamped.store(stamped, Relaxed);
        self.deliveries.store(deliveries, Relaxed);
        self.bytes_out.store(bytes_out, Relaxed);
        self.ticks.store(ticks, Relaxed);
    }

    /// Counts bytes a reader read (one call per read, not per frame).
    pub fn read_bytes(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Relaxed);
    }

    /// The counters now.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            stamped: self.stamped.load(Relaxed),
            deliveries: self.deliveries.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            ticks: self.ticks.load(Relaxed),
        }
    }

    /// Everything the status page shows of this session.
    pub fn reading(&self) -> SessionReading {
        SessionReading {
            id: self.id,
            island: self.island.clone(),
            started: unix_seconds(self.started),
            traffic: self.traffic(),
            members: lock(&self.members).clone(),
        }
    }

    /// Takes note of a notice of the session core: members, and the router-wide events.
    pub fn note(&self, n: &Notice) {
        match n {
            Notice::Joined {
                replica,
                name,
                conn,
                resumed,
            } => lock(&self.members).push(MemberInfo {
                conn: conn.0,
                replica: *replica,
                name: name.clone(),
                since: unix_seconds(SystemTime::now()),
                resumed: *resumed,
            }),
            Notice::Left { conn, code, .. } => {
                lock(&self.members).retain(|m| m.conn != conn.0);
                if let Some(code) = code {
                    let mut ev = lock(&self.router.events);
                    *ev.closes.entry(code.0).or_default() += 1;
                    if *code == Code::SLOW_CONSUMER {
                        ev.slow_consumers += 1;
                    }
                }
            }
            Notice::Refused { replica, code } => self.router.refused(
                *code,
                Some(self.id),
                &self.island,
                format!("replica {replica}"),
                String::new(),
            ),
            Notice::Diverged(d) => {
                let names = self.names();
                let groups: Vec<String> = d
                    .groups
                    .iter()
                    .map(|g| {
                        let who: Vec<String> = g
                            .replicas
                            .iter()
                            .map(|r| names.get(r).cloned().unwrap_or_else(|| r.to_string()))
                            .collect();
                        who.join(", ")
                    })
                    .collect();
                let mut ev = lock(&self.router.events);
                ev.divergences += 1;
                ev.push_divergence(RecentEvent {
                    at: unix_seconds(SystemTime::now()),
                    session: Some(self.id),
                    island: self.island.clone(),
                    code: None,
                    who: groups.join(" | "),
                    what: format!("digests differ at seq {}", d.seq.0),
                });
            }
            // Asked of Croquet clients (REQU); the upload itself is counted when stored.
            Notice::SnapshotWanted { .. } => {}
            // The joins it lets in are counted as they sync.
            Notice::Recovered { .. } => lock(&self.router.events).recoveries += 1,
            Notice::SnapshotStored { took, .. } => {
                let mut ev = lock(&self.router.events);
                ev.snapshots += 1;
                ev.upload_durations.observe(*took);
            }
            Notice::Synced {
                resumed,
                late,
                took,
                ..
            } => {
                let mut ev = lock(&self.router.events);
                if *resumed {
                    ev.resumes += 1;
                } else if *late {
                    ev.late_joins += 1;
                    ev.join_durations.observe(*took);
                }
            }
        }
    }

    fn names(&self) -> BTreeMap<ReplicaId, String> {
        lock(&self.members)
            .iter()
            .map(|m| (m.replica, m.name.clone()))
            .collect()
    }
}

/// A refusal or divergence, as the status page lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct RecentEvent {
    /// When (Unix seconds).
    pub at: f64,
    /// The session, when it was known.
    pub session: Option<SessionId>,
    /// The island's announced name, when it has one.
    pub island: String,
    /// The close code of a refusal.
    pub code: Option<Code>,
    /// Who: a peer address or replica id; for a divergence, the groups of names that agree.
    pub who: String,
    /// What happened, for people.
    pub what: String,
}

/// The rarer events, counted under one lock.
#[derive(Clone, Debug, Default)]
pub struct Events {
    /// Replicas that resumed.
    pub resumes: u64,
    /// Replicas that joined an island with something to catch up on (a snapshot or stamped
    /// messages) and went live; a creator of a fresh island is not one.
    pub late_joins: u64,
    /// Their join-to-`Synced` durations.
    pub join_durations: Histogram,
    /// Snapshots uploaded and stored.
    pub snapshots: u64,
    /// Islands re-created from their replicas (after a restart or a failover).
    pub recoveries: u64,
    /// Their request-to-last-piece durations.
    pub upload_durations: Histogram,
    /// Replicas closed as slow consumers.
    pub slow_consumers: u64,
    /// Checkpoints at which replicas reported different digests.
    pub divergences: u64,
    /// Connections the router closed, by code.
    pub closes: BTreeMap<u16, u64>,
    /// Hellos and joins refused, by code.
    pub refusals: BTreeMap<u16, u64>,
    /// The newest refusals, oldest first, at most [`RECENT_EVENTS`].
    pub recent_refusals: VecDeque<RecentEvent>,
    /// The newest divergences, oldest first, at most [`RECENT_EVENTS`].
    pub recent_divergences: VecDeque<RecentEvent>,
}

impl Events {
    fn push_refusal(&mut self, e: RecentEvent) {
        push_bounded(&mut self.recent_refusals, e);
    }

    fn push_divergence(&mut self, e: RecentEvent) {
        push_bounded(&mut self.recent_divergences, e);
    }
}

fn push_bounded(ring: &mut VecDeque<RecentEvent>, e: RecentEvent) {
    if ring.len() >= RECENT_EVENTS {
        ring.pop_front();
    }
    ring.push_back(e);
}

#[derive(Debug, Default)]
struct Sessions {
    live: Vec<Arc<SessionStats>>,
    /// The counters of sessions that ended, so the totals never go down.
    retired: Traffic,
}

/// The router-wide counters: every session's [`SessionStats`] and the rarer [`Events`].
#[derive(Debug, Default)]
pub struct RouterStats {
    sessions: Mutex<Sessions>,
    events: Mutex<Events>,
}

impl RouterStats {
    /// A session starts: its counters join the totals.
    pub fn register(self: &Arc<Self>, id: SessionId, island: &str) -> Arc<SessionStats> {
        let s = Arc::new(SessionStats {
            id,
            island: island.to_string(),
            started: SystemTime::now(),
            stamped: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
            members: Mutex::new(Vec::new()),
            router: self.clone(),
        });
        lock(&self.sessions).live.push(s.clone());
        s
    }

    /// A session ended: its counters move into the totals of ended sessions.
    pub fn retire(&self, s: &Arc<SessionStats>) {
        let mut sessions = lock(&self.sessions);
        let before = sessions.live.len();
        sessions.live.retain(|x| !Arc::ptr_eq(x, s));
        if sessions.live.len() < before {
            let t = s.traffic();
            sessions.retired.add(&t);
        }
    }

    /// Counts a refusal (of a hello by the dispatcher, or of a join by a session) and keeps it
    /// among the recent ones.
    pub fn refused(
        &self,
        code: Code,
        session: Option<SessionId>,
        island: &str,
        who: String,
        reason: String,
    ) {
        let mut ev = lock(&self.events);
        *ev.refusals.entry(code.0).or_default() += 1;
        ev.push_refusal(RecentEvent {
            at: unix_seconds(SystemTime::now()),
            session,
            island: island.to_string(),
            code: Some(code),
            who,
            what: reason,
        });
    }

    /// The counters summed over live and ended sessions, and the number of live sessions.
    pub fn totals(&self) -> (Traffic, usize) {
        let sessions = lock(&self.sessions);
        let mut t = sessions.retired;
        for s in &sessions.live {
            t.add(&s.traffic());
        }
        (t, sessions.live.len())
    }

    /// Every live session, read now.
    pub fn sessions(&self) -> Vec<SessionReading> {
        let live: Vec<Arc<SessionStats>> = lock(&self.sessions).live.clone();
        live.iter().map(|s| s.reading()).collect()
    }

    /// The rarer events, copied.
    pub fn events(&self) -> Events {
        lock(&self.events).clone()
    }

    /// Replicas attached now, over all sessions.
    pub fn replicas(&self) -> usize {
        let live: Vec<Arc<SessionStats>> = lock(&self.sessions).live.clone();
        live.iter().map(|s| lock(&s.members).len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ConnId;
    use uuid::Uuid;

    fn sid() -> SessionId {
        SessionId(Uuid::new_v4())
    }

    #[test]
    fn totals_keep_what_ended_sessions_counted() {
        let r = Arc::new(RouterStats::default());
        let a = r.register(sid(), "a");
        let b = r.register(sid(), "b");
        a.publish(10, 40, 1000, 3);
        a.read_bytes(500);
        b.publish(5, 10, 200, 1);
        assert_eq!(r.totals().0.stamped, 15);
        assert_eq!(r.totals().1, 2);
        r.retire(&a);
        r.retire(&a);
        let (t, live) = r.totals();
        assert_eq!(live, 1);
        assert_eq!(
            t,
            Traffic {
                stamped: 15,
                deliveries: 50,
                bytes_in: 500,
                bytes_out: 1200,
                ticks: 4
            }
        );
    }

    #[test]
    fn notices_keep_members_and_count_events() {
        let r = Arc::new(RouterStats::default());
        let s = r.register(sid(), "isle");
        let (x, y) = (ReplicaId(Uuid::new_v4()), ReplicaId(Uuid::new_v4()));
        for (i, (replica, name)) in [(x, "ann"), (y, "bob")].into_iter().enumerate() {
            s.note(&Notice::Joined {
                replica,
                name: name.into(),
                conn: ConnId(i as u64),
                resumed: false,
            });
        }
        s.note(&Notice::Synced {
            replica: y,
            conn: ConnId(1),
            resumed: false,
            late: true,
            took: Duration::from_millis(20),
        });
        s.note(&Notice::Left {
            replica: x,
            name: "ann".into(),
            conn: ConnId(0),
            code: Some(Code::SLOW_CONSUMER),
        });
        let names: Vec<String> = s.reading().members.into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["bob"]);
        assert_eq!(r.replicas(), 1);
        let ev = r.events();
        assert_eq!((ev.late_joins, ev.slow_consumers), (1, 1));
        assert_eq!(ev.closes.get(&Code::SLOW_CONSUMER.0), Some(&1));
        assert_eq!(
            ev.join_durations.buckets[3], 1,
            "20 ms is in the 25 ms bucket"
        );
        for i in 0..RECENT_EVENTS + 5 {
            r.refused(Code::BUSY, None, "", format!("peer {i}"), "full".into());
        }
        let ev = r.events();
        assert_eq!(ev.recent_refusals.len(), RECENT_EVENTS);
        assert_eq!(
            ev.refusals.get(&Code::BUSY.0),
            Some(&(RECENT_EVENTS as u64 + 5))
        );
        assert_eq!(
            ev.recent_refusals.back().map(|e| e.who.as_str()),
            Some("peer 36")
        );
    }
}
