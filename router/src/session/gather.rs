//! Re-creating a session from its replicas: the gathering (docs/scale-out.md, "Failover").
//!
//! A session whose first join is a recovering hello (its router restarted, or the island's home
//! died) has nothing of its own: every replica holds the island's whole state and a prefix of the
//! one order, so the most advanced replica has everything anyone was delivered. The session holds
//! every join without a welcome until as many replicas as the most advanced founder knew have come
//! back (and its duplicate table arrived), or [`super::SessionConfig::gather_timeout`] after the first
//! founder came. A founder is a participant (or admin) with recover info, a consistent state
//! (`resume_from`) and its `Seen` table. Then the order continues at the best founder's seq N:
//! router time from the highest claimed, the claimed incarnation, the founder's table as the
//! per-replica last client seqs, an empty history from N+1, and the held joins go the ordinary
//! way (resume at N, a snapshot from a live replica at N below it, a full sync above it).

use super::{ClientSeqEntry, Session};
use crate::ids::{ConnId, ReplicaId};
use crate::wire::{self, ClientFrame, Code, SeenEntry};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Duplicate tables kept while a session gathers, those of the best-ranked claims: each may
/// hold `max_remembered_replicas` entries, and only the founder's is used.
pub const MAX_HELD_TABLES: usize = 8;

/// Joins held while a session gathers.
#[derive(Debug, Default)]
pub(super) struct Gathering {
    held: BTreeMap<ConnId, Held>,
    /// When the first founder arrived: the gathering ends `gather_timeout` later at the latest.
    since: Option<Instant>,
}

#[derive(Debug)]
struct Held {
    req: super::JoinRequest,
    /// The duplicate table it pipelined after its hello.
    seen: Option<Vec<SeenEntry>>,
    /// Its table was not kept: [`MAX_HELD_TABLES`] better claims hold theirs.
    outranked: bool,
    arrived: Instant,
}

impl Held {
    /// It claims it can found the re-created session: it can send (and so provide snapshots)
    /// and knows a consistent seq.
    fn claims(&self) -> bool {
        self.req.role.may_send()
            && !self.req.control
            && self.req.recover.is_some()
            && self.req.resume_from.is_some()
    }

    /// A claim whose duplicate table is here.
    fn founder(&self) -> bool {
        self.claims() && self.seen.is_some()
    }

    /// A claim whose table is still on its way: the gathering does not end early without it.
    fn table_due(&self) -> bool {
        self.claims() && self.seen.is_none() && !self.outranked
    }

    /// Ordering of founders: highest epoch, then highest seq.
    fn rank(&self) -> (u64, u64) {
        (
            self.req.recover.as_ref().map_or(0, |r| r.epoch),
            self.req.resume_from.map_or(0, |s| s.0),
        )
    }
}

impl Gathering {
    /// When the gathering must end at the latest: `gather_timeout` after the first founder, or
    /// after the oldest held join when no founder came (those are then told to try again).
    pub(super) fn deadline(&self, timeout: Duration) -> Option<Instant> {
        let from = self
            .since
            .or_else(|| self.held.values().map(|h| h.arrived).min())?;
        Some(from + timeout)
    }

    /// Keeps `conn`'s table if it is among the [`MAX_HELD_TABLES`] best-ranked claims, giving
    /// up the worst kept one if need be: memory stays bounded however many replicas gather.
    fn keep_table(&mut self, conn: ConnId, entries: Vec<SeenEntry>) {
        let Some(rank) = self.held.get(&conn).map(Held::rank) else {
            return;
        };
        let kept: Vec<(ConnId, (u64, u64))> = self
            .held
            .iter()
            .filter(|(c, h)| **c != conn && h.seen.is_some())
            .map(|(c, h)| (*c, h.rank()))
            .collect();
        if kept.len() >= MAX_HELD_TABLES {
            let Some((worst, worst_rank)) = kept
                .iter()
                .min_by_key(|(c, r)| (*r, std::cmp::Reverse(*c)))
                .copied()
            else {
                return;
            };
            let loser = if rank > worst_rank { worst } else { conn };
            if let Some(h) = self.held.get_mut(&loser) {
                h.seen = None;
                h.outranked = true;
            }
            if loser == conn {
                return;
            }
        }
        if let Some(h) = self.held.get_mut(&conn) {
            h.seen = Some(entries);
            h.outranked = false;
        }
    }

    pub(super) fn holds(&self, conn: ConnId) -> bool {
        self.held.contains_key(&conn)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub(super) fn conns(&self) -> Vec<ConnId> {
        self.held.keys().copied().collect()
    }

    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    fn holding(&self, replica: ReplicaId) -> Option<ConnId> {
        self.held
            .iter()
            .find(|(_, h)| h.req.replica == replica && !h.req.control)
            .map(|(c, _)| *c)
    }
}

/// The state a re-created session continues from.
struct Founding {
    seq: u64,
    incarnation: u64,
    epoch: u64,
    time: u64,
    tick_interval: Option<Duration>,
    table: Vec<SeenEntry>,
    first: ConnId,
}

impl Session {
    /// A replica of this very island, not yet welcomed at this epoch, that may hold what the
    /// re-created order does not: messages past the seq it continued from, or a tick past its
    /// time (it missed the gathering). It is synced afresh from a snapshot: what it applied
    /// beyond the founding point was never stamped here. Also one claiming a seq this session
    /// never reached.
    pub(super) fn beyond_the_order(&self, req: &super::JoinRequest) -> bool {
        let (Some(n), Some(r)) = (req.resume_from, req.recover.as_ref()) else {
            return false;
        };
        if r.incarnation != self.cfg.incarnation {
            return false;
        }
        if n.0 > self.last_seq {
            return true;
        }
        self.founded.is_some_and(|(seq, time)| {
            r.epoch < self.epoch && (n.0 > seq || (n.0 == seq && r.time.0 > time))
        })
    }

    /// Whether the first join of a session re-creates it: nothing was ever stamped or joined.
    pub(super) fn starts_gathering(&self, req: &super::JoinRequest) -> bool {
        req.recover.is_some()
            && !self.ever_joined
            && self.last_seq == 0
            && self.members.is_empty()
            && self.snapshot.is_none()
    }

    /// Holds a join until the gathering ends. A second hello of the same replica replaces the
    /// held one (1007), as it would replace a member's connection.
    pub(super) fn hold(&mut self, conn: ConnId, req: super::JoinRequest, now: Instant) {
        let Some(g) = self.gathering.as_mut() else {
            return;
        };
        let replaced = (!req.control).then(|| g.holding(req.replica)).flatten();
        if let Some(old) = replaced {
            g.held.remove(&old);
            self.out.push_back(super::Output::Close {
                conn: old,
                goodbye: Some(wire::goodbye(
                    Code::REPLACED,
                    "the same replica connected again",
                )),
                discard_queued: false,
            });
        }
        let held = self.gathering.as_ref().map_or(0, Gathering::len);
        if let Err((code, reason)) = self.check_held(&req, held) {
            return self.refuse(conn, req.replica, code, reason);
        }
        self.empty_since = None;
        if let Some(g) = self.gathering.as_mut() {
            g.held.insert(
                conn,
                Held {
                    req,
                    seen: None,
                    outranked: false,
                    arrived: now,
                },
            );
        }
        self.try_finish_gathering(now);
    }

    fn check_held(&self, req: &super::JoinRequest, held: usize) -> Result<(), (Code, String)> {
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
        if req.control && req.role != wire::Role::Admin {
            return Err((
                Code::PROTOCOL_VIOLATION,
                "only the island's admin may open a control connection".into(),
            ));
        }
        if held >= self.cfg.max_members {
            return Err((
                Code::BUSY,
                format!(
                    "the session has its maximum of {} replicas",
                    self.cfg.max_members
                ),
            ));
        }
        Ok(())
    }

    /// A frame from a held connection: only its duplicate table (and a leave) may come before
    /// the welcome.
    pub(super) fn held_frame(&mut self, conn: ConnId, frame: ClientFrame, now: Instant) {
        let max = self.cfg.max_remembered_replicas;
        let Some(g) = self.gathering.as_mut() else {
            return;
        };
        let Some(claims) = g.held.get(&conn).map(Held::claims) else {
            return;
        };
        let problem = match frame {
            ClientFrame::Seen { entries } if entries.len() > max => Some(format!(
                "a duplicate table of {} entries; the limit is {max}",
                entries.len()
            )),
            ClientFrame::Seen { entries } => {
                if claims {
                    g.keep_table(conn, entries);
                    if g.held.values().any(Held::founder) && g.since.is_none() {
                        g.since = Some(now);
                    }
                }
                None
            }
            ClientFrame::Ping { .. } | ClientFrame::Pong { .. } => None,
            ClientFrame::Leave => {
                g.held.remove(&conn);
                self.out.push_back(super::Output::Close {
                    conn,
                    goodbye: None,
                    discard_queued: false,
                });
                None
            }
            _ => Some("only a duplicate table may come before the welcome".to_string()),
        };
        if let Some(reason) = problem {
            self.release_held(conn, Some((Code::PROTOCOL_VIOLATION, reason)));
        }
        self.after_held_change(now);
    }

    /// A held connection went away, or must go with `goodbye`.
    pub(super) fn release_held(&mut self, conn: ConnId, goodbye: Option<(Code, String)>) {
        let Some(g) = self.gathering.as_mut() else {
            return;
        };
        if g.held.remove(&conn).is_some() {
            self.out.push_back(super::Output::Close {
                conn,
                goodbye: goodbye.map(|(code, reason)| wire::goodbye(code, reason)),
                discard_queued: false,
            });
        }
    }

    /// Recomputes the gathering after a held join changed (arrived, left, sent its table).
    pub(super) fn after_held_change(&mut self, now: Instant) {
        if let Some(g) = self.gathering.as_mut() {
            if !g.held.values().any(Held::founder) {
                g.since = None;
            }
            if g.held.is_empty() && self.members.is_empty() {
                self.empty_since.get_or_insert(now);
            }
        }
        self.try_finish_gathering(now);
    }

    /// Ends the gathering if everyone the best founder knew is back (with every claim's table),
    /// or the deadline passed.
    pub(super) fn try_finish_gathering(&mut self, now: Instant) {
        let timeout = self.cfg.gather_timeout;
        let Some(g) = self.gathering.as_ref() else {
            return;
        };
        let best = g
            .held
            .iter()
            .filter(|(_, h)| h.founder())
            .max_by_key(|(c, h)| (h.rank(), std::cmp::Reverse(**c)))
            .map(|(c, h)| (*c, h));
        let due = g.deadline(timeout).is_some_and(|d| now >= d);
        let Some((first, best)) = best else {
            if due {
                // Nobody who can found the island came: everyone tries again shortly.
                let conns: Vec<ConnId> = g.held.keys().copied().collect();
                for conn in conns {
                    self.release_held(
                        conn,
                        Some((
                            Code::RECOVERING,
                            "the island is being re-created from its replicas and none that can \
                             found it came back yet; try again shortly"
                                .into(),
                        )),
                    );
                }
                if let Some(g) = self.gathering.as_mut() {
                    g.since = None;
                }
                self.empty_since.get_or_insert(now);
            }
            return;
        };
        let wanted = best
            .req
            .recover
            .as_ref()
            .map_or(1, |r| r.members.max(1) as usize);
        let back = g.held.values().filter(|h| !h.req.control).count();
        let complete = back >= wanted && !g.held.values().any(Held::table_due);
        if !(complete || due) {
            return;
        }
        let founding = self.founding(first, best);
        self.found(founding, now);
    }

    fn founding(&self, first: ConnId, best: &Held) -> Founding {
        let recover = best.req.recover.clone().unwrap_or(wire::Recover {
            incarnation: self.cfg.incarnation,
            epoch: 0,
            time: crate::ids::RouterTime(0),
            members: 1,
            tick_interval_us: 0,
            create: None,
        });
        let held = self.gathering.iter().flat_map(|g| g.held.values());
        let claims = || held.clone().filter_map(|h| h.req.recover.as_ref());
        let epoch = if self.cfg.epoch != 0 {
            self.cfg.epoch
        } else {
            claims()
                .map(|r| r.epoch)
                .max()
                .unwrap_or(0)
                .saturating_add(1)
        };
        let time = claims()
            .filter(|r| r.incarnation == recover.incarnation)
            .map(|r| r.time.0)
            .max()
            .unwrap_or(0);
        let tick_interval =
            (recover.tick_interval_us > 0).then(|| Duration::from_micros(recover.tick_interval_us));
        Founding {
            seq: best.req.resume_from.map_or(0, |s| s.0),
            incarnation: recover.incarnation,
            epoch,
            time,
            tick_interval,
            table: best.seen.clone().unwrap_or_default(),
            first,
        }
    }

    /// Continues the order from `f` and lets the held joins in, the founder first.
    fn found(&mut self, f: Founding, now: Instant) {
        let Some(mut g) = self.gathering.take() else {
            return;
        };
        self.ever_joined = true;
        self.founded = Some((f.seq, f.time));
        self.cfg.incarnation = f.incarnation;
        self.epoch = f.epoch;
        self.last_seq = f.seq;
        self.history_first = f.seq + 1;
        self.last_time = f.time;
        self.time_base = f.time;
        self.start = now;
        self.last_activity = now;
        if let Some(t) = f.tick_interval {
            self.set_tick_interval(t);
        }
        let mut table = f.table;
        // The newest senders are the ones still likely to resend.
        table.sort_by_key(|e| std::cmp::Reverse(e.at.0));
        table.truncate(self.cfg.max_remembered_replicas);
        self.client_seqs = table
            .into_iter()
            .filter(|e| e.at.0 <= f.seq && e.client_seq > 0)
            .map(|e| {
                (
                    e.replica,
                    ClientSeqEntry {
                        last: e.client_seq,
                        at_seq: e.at.0,
                    },
                )
            })
            .collect();
        self.out
            .push_back(super::Output::Notice(super::Notice::Recovered {
                at: crate::ids::Seq(f.seq),
                epoch: f.epoch,
                replicas: g.held.len(),
            }));
        let founder = g.held.remove(&f.first);
        for (conn, h) in founder
            .map(|h| (f.first, h))
            .into_iter()
            .chain(std::mem::take(&mut g.held))
        {
            self.handle_join(conn, h.req, now);
        }
    }
}
