//! One memory budget shared by every session of a router: the bytes of all histories and
//! snapshots together. A session reserves before it keeps anything and releases when it drops
//! it, so the sum never passes the limit however many sessions fill at once.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A shared byte budget. Plain atomics: sessions in different tasks reserve without locks, and
/// the session core stays deterministic for one session on its own.
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
}

impl fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemoryBudget({} of {} bytes)", self.used(), self.limit)
    }
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> MemoryBudget {
        MemoryBudget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// A budget that never says no (one session on its own, tests).
    pub fn unlimited() -> MemoryBudget {
        MemoryBudget::new(usize::MAX)
    }

    /// Takes `bytes` from the budget, or returns false and takes nothing.
    pub fn try_reserve(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&n| n <= self.limit)
            })
            .is_ok()
    }

    /// Gives `bytes` back.
    pub fn release(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// True past 60% of the limit: sessions should ask for snapshots early so they can cut
    /// their histories before the budget runs out.
    pub fn under_pressure(&self) -> bool {
        self.used().saturating_mul(10) >= self.limit.saturating_mul(6)
    }

    /// True past 90%: the router stops creating sessions, keeping the rest for live ones.
    pub fn nearly_full(&self) -> bool {
        self.used().saturating_mul(10) >= self.limit.saturating_mul(9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_passes_the_limit() {
        let b = MemoryBudget::new(100);
        assert!(b.try_reserve(60));
        assert!(b.under_pressure());
        assert!(!b.try_reserve(41));
        assert!(b.try_reserve(40));
        assert!(b.nearly_full());
        b.release(100);
        assert_eq!(b.used(), 0);
        b.release(5);
        assert_eq!(b.used(), 0);
        assert!(MemoryBudget::unlimited().try_reserve(usize::MAX));
    }
}
