//! Where a new island goes: the router with the least load, preferring the one that was asked.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A session costs this many replicas in the load score (its task, history and ticks).
pub const SESSION_WEIGHT: u64 = 20;
/// Past this CPU use on any router, placement compares CPU instead of the score.
pub const CPU_HOT_PERCENT: u8 = 70;
/// A router keeps an island it was asked for when its own key is within this many percent of
/// the best: most islands then cost no redirect.
pub const SELF_PREFERENCE_PERCENT: u64 = 10;

/// What a router carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Sessions alive.
    pub sessions: u64,
    /// Replicas connected.
    pub replicas: u64,
    /// CPU use of the process, percent of one core's worth per core (0 when unknown).
    pub cpu_percent: u8,
}

impl Load {
    /// Replicas plus [`SESSION_WEIGHT`] per session.
    pub fn score(&self) -> u64 {
        self.replicas
            .saturating_add(self.sessions.saturating_mul(SESSION_WEIGHT))
    }
}

/// A router that could be home.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its id.
    pub id: Uuid,
    /// Its load.
    pub load: Load,
    /// Whether it is leaving (then it takes nothing).
    pub draining: bool,
}

/// The home for a new island asked of router `me`, among `me` and the `others` it knows; `None`
/// when every router is draining. Deterministic: ties go to the lowest id.
pub fn choose_home(me: Candidate, others: &[Candidate]) -> Option<Uuid> {
    let all: Vec<&Candidate> = std::iter::once(&me)
        .chain(others.iter().filter(|c| c.id != me.id))
        .filter(|c| !c.draining)
        .collect();
    let hot = all.iter().any(|c| c.load.cpu_percent > CPU_HOT_PERCENT);
    let key = |c: &Candidate| {
        if hot {
            u64::from(c.load.cpu_percent)
        } else {
            c.load.score()
        }
    };
    let best = all.iter().min_by_key(|c| (key(c), c.id))?;
    if !me.draining && key(&me) * 100 <= key(best) * (100 + SELF_PREFERENCE_PERCENT) {
        return Some(me.id);
    }
    Some(best.id)
}

/// When a router writes its load again: when it moved by 10% of the last written score (or
/// from nothing to something), and at most once per period.
#[derive(Clone, Debug)]
pub struct LoadGate {
    every: Duration,
    last: Option<(Load, Instant)>,
}

impl LoadGate {
    /// A gate that lets a write through at most once per `every`.
    pub fn new(every: Duration) -> LoadGate {
        LoadGate { every, last: None }
    }

    /// Whether `load` should be written at `now`; if so it is taken as written.
    pub fn due(&mut self, now: Instant, load: Load) -> bool {
        let due = match self.last {
            None => true,
            Some((old, at)) => {
                let (a, b) = (old.score(), load.score());
                let moved = a.abs_diff(b) * 10 >= a.max(1)
                    || old.hot_changed(&load)
                    || (old.sessions == 0) != (load.sessions == 0);
                moved && now.saturating_duration_since(at) >= self.every
            }
        };
        if due {
            self.last = Some((load, now));
        }
        due
    }

    /// Forgets what was written (a new lease: the record is written afresh).
    pub fn reset(&mut self) {
        self.last = None;
    }
}

impl Load {
    fn hot_changed(&self, new: &Load) -> bool {
        (self.cpu_percent > CPU_HOT_PERCENT) != (new.cpu_percent > CPU_HOT_PERCENT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u128, sessions: u64, replicas: u64) -> Candidate {
        Candidate {
            id: Uuid::from_u128(id),
            load: Load {
                sessions,
                replicas,
                cpu_percent: 0,
            },
            draining: false,
        }
    }

    #[test]
    fn the_least_loaded_router_is_home_and_the_asked_one_wins_within_ten_percent() {
        // Idle cluster: the asked router keeps the island.
        assert_eq!(
            choose_home(c(2, 0, 0), &[c(1, 0, 0)]),
            Some(Uuid::from_u128(2))
        );
        // One session more than an idle router is far more than 10%: go there.
        assert_eq!(
            choose_home(c(2, 1, 1), &[c(1, 0, 0), c(3, 0, 0)]),
            Some(Uuid::from_u128(1))
        );
        // Within 10% of the best: stay.
        assert_eq!(
            choose_home(c(2, 10, 20), &[c(1, 10, 5)]),
            Some(Uuid::from_u128(2))
        );
        // Just past it: move.
        assert_eq!(
            choose_home(c(2, 10, 40), &[c(1, 10, 5)]),
            Some(Uuid::from_u128(1))
        );
        // The asked router listed among the others counts once.
        assert_eq!(
            choose_home(c(2, 5, 5), &[c(2, 0, 0)]),
            Some(Uuid::from_u128(2))
        );
    }

    #[test]
    fn draining_routers_take_nothing_and_hot_cpus_decide() {
        let mut me = c(1, 0, 0);
        me.draining = true;
        assert_eq!(choose_home(me, &[c(2, 50, 50)]), Some(Uuid::from_u128(2)));
        assert_eq!(choose_home(me, &[]), None);
        let mut hot = c(1, 0, 0);
        hot.load.cpu_percent = 95;
        let mut cool = c(2, 100, 1000);
        cool.load.cpu_percent = 20;
        assert_eq!(choose_home(hot, &[cool]), Some(Uuid::from_u128(2)));
    }

    #[test]
    fn load_is_written_when_it_moved_and_not_more_often_than_the_period() {
        let t0 = Instant::now();
        let every = Duration::from_secs(10);
        let mut g = LoadGate::new(every);
        let l = |sessions, replicas| Load {
            sessions,
            replicas,
            cpu_percent: 0,
        };
        assert!(g.due(t0, l(0, 0)), "the first write");
        assert!(!g.due(t0 + Duration::from_secs(1), l(1, 1)), "too soon");
        assert!(g.due(t0 + every, l(1, 1)), "moved, period over");
        assert!(!g.due(t0 + every * 3, l(1, 2)), "moved by under 10%");
        assert!(g.due(t0 + every * 3, l(2, 2)), "moved by 10% or more");
        g.reset();
        assert!(
            g.due(t0 + every * 3, l(2, 2)),
            "written afresh after a reset"
        );
    }
}
