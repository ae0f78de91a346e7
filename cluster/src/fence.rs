//! The fencing clock: how long a home may go on stamping on the strength of its lease.
//!
//! etcd starts a lease's TTL again when a keep-alive *arrives*; the router knows when it *sent*
//! it, which is earlier. So the lease is surely alive until `sent + TTL` of the latest answered
//! keep-alive, and the home stamps only until `sent + TTL - margin` on its own monotonic clock.
//! Every time here is fed by the caller.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Keep-alives in flight at once; past it the driver waits for answers before sending more, so
/// the clock's queue is bounded.
pub const MAX_IN_FLIGHT: usize = 8;

/// Tracks one lease's keep-alives and says until when the lease surely holds.
#[derive(Clone, Debug)]
pub struct FenceClock {
    margin: Duration,
    ttl: Duration,
    in_flight: VecDeque<Instant>,
    valid_until: Option<Instant>,
}

impl FenceClock {
    /// A clock for a lease granted with `ttl`, its grant request sent at `sent`.
    pub fn granted(sent: Instant, ttl: Duration, margin: Duration) -> FenceClock {
        let mut c = FenceClock {
            margin,
            ttl,
            in_flight: VecDeque::new(),
            valid_until: None,
        };
        c.extend(sent);
        c
    }

    fn extend(&mut self, sent: Instant) {
        let until = sent + self.ttl.saturating_sub(self.margin);
        self.valid_until = Some(self.valid_until.map_or(until, |u| u.max(until)));
    }

    /// Whether another keep-alive may be sent now (fewer than [`MAX_IN_FLIGHT`] unanswered).
    pub fn may_send(&self) -> bool {
        self.in_flight.len() < MAX_IN_FLIGHT
    }

    /// A keep-alive was sent at `now`.
    pub fn sent(&mut self, now: Instant) {
        if self.may_send() {
            self.in_flight.push_back(now);
        }
    }

    /// The answer to the oldest keep-alive in flight arrived, carrying the lease's TTL in
    /// seconds (0 or less: the lease is gone). Returns whether the lease still holds.
    pub fn answered(&mut self, ttl_secs: i64) -> bool {
        let Some(sent) = self.in_flight.pop_front() else {
            // An answer to nothing we count: it extends nothing.
            return self.valid_until.is_some();
        };
        if ttl_secs <= 0 {
            self.valid_until = None;
            self.in_flight.clear();
            return false;
        }
        self.ttl = Duration::from_secs(ttl_secs.unsigned_abs());
        self.extend(sent);
        true
    }

    /// The keep-alive stream broke: the keep-alives in flight will never be answered. What was
    /// already acknowledged still holds.
    pub fn stream_lost(&mut self) {
        self.in_flight.clear();
    }

    /// The lease is known gone (revoked, or etcd said so).
    pub fn lost(&mut self) {
        self.valid_until = None;
        self.in_flight.clear();
    }

    /// Until when the home may stamp; `None` once the lease is known gone.
    pub fn valid_until(&self) -> Option<Instant> {
        self.valid_until
    }

    /// Whether the home may stamp at `now`.
    pub fn may_stamp(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|u| now < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(5);
    const MARGIN: Duration = Duration::from_millis(500);

    #[test]
    fn the_lease_holds_from_the_send_time_of_the_latest_answered_keep_alive() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = FenceClock::granted(t0, TTL, MARGIN);
        assert!(c.may_stamp(t0 + s(4)));
        assert!(
            !c.may_stamp(t0 + Duration::from_millis(4500)),
            "TTL less the margin"
        );
        c.sent(t0 + s(1));
        c.sent(t0 + s(2));
        // Answered late: the send time counts, not the answer's arrival.
        assert!(c.answered(5));
        assert_eq!(c.valid_until(), Some(t0 + s(1) + s(5) - MARGIN));
        assert!(c.answered(5));
        assert_eq!(c.valid_until(), Some(t0 + s(2) + s(5) - MARGIN));
        // Keep-alives sent but never answered (etcd cut off) extend nothing.
        for i in 3..20 {
            c.sent(t0 + s(i));
        }
        assert!(!c.may_send(), "in flight is bounded");
        assert!(c.may_stamp(t0 + s(6)));
        assert!(!c.may_stamp(t0 + Duration::from_millis(6500)));
        c.stream_lost();
        assert!(c.may_send());
        assert!(c.may_stamp(t0 + s(6)), "what was acknowledged still holds");
    }

    #[test]
    fn a_lease_etcd_says_is_gone_stops_stamping_at_once() {
        let t0 = Instant::now();
        let mut c = FenceClock::granted(t0, TTL, MARGIN);
        c.sent(t0);
        assert!(!c.answered(0));
        assert!(!c.may_stamp(t0));
        assert_eq!(c.valid_until(), None);
        let mut c = FenceClock::granted(t0, TTL, MARGIN);
        c.lost();
        assert!(!c.may_stamp(t0));
        // An answer with nothing in flight extends nothing.
        let mut c = FenceClock::granted(t0, TTL, MARGIN);
        assert!(c.answered(5));
        assert_eq!(c.valid_until(), Some(t0 + TTL - MARGIN));
    }
}
