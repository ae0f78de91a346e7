//! # isthmus-cluster
//!
//! Owns what routers of one cluster agree on through etcd, and nothing of the data path:
//!
//! - the **key layout** and its values ([`keys`], [`record`]): `/isthmus/<cluster>/routers/<id>`
//!   (a router's contact points and load, under its lease) and
//!   `/isthmus/<cluster>/islands/<session>` (an island's home, under the home's lease; the
//!   record's mod revision is the island's **epoch**) and `/isthmus/<cluster>/known/<session>`
//!   (that an island exists: its public keys and create options, no lease, deleted when the
//!   island ends for good);
//! - the **placement choice** ([`placement`]): the least load score wins, and a router prefers
//!   itself when it is within 10% of the best;
//! - the **fencing clock** ([`fence`]): a home stamps only while
//!   `now < sent(last acknowledged keep-alive) + TTL - margin`, from times it is fed;
//! - the **etcd side** ([`member`]): the lease and its keep-alive, the router's registration,
//!   the watch of `routers/`, the placement transaction, reads and deletes of placements, the `known/` records.
//!
//! The first three are sans-IO (no clock, no socket) and tested alone; [`member::Member`] is the
//! thin tokio driver over the `etcd-client` crate. The dispatcher's hello path
//! (`isthmus_dispatcher::cluster`) decides what a hello gets from these pieces. The design and
//! its reasoning are in `docs/scale-out.md`.

pub mod fence;
pub mod keys;
pub mod member;
pub mod placement;
pub mod record;

pub use fence::FenceClock;
pub use keys::Keys;
pub use member::{ClusterConfig, LeaseState, Member, OpCounts, PlaceOutcome, Placed, WaitOutcome};
pub use placement::{choose_home, Candidate, Load, LoadGate};
pub use record::{Placement, RouterRecord};

use std::time::Duration;

/// A router's lease TTL: a dead router's islands are free again this long after its last
/// keep-alive reached etcd.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the lease is kept alive.
pub const DEFAULT_KEEP_ALIVE_EVERY: Duration = Duration::from_secs(1);
/// How long before etcd could expire its lease a home stops stamping: covers clock-rate drift
/// between two machines over a TTL many times over.
pub const DEFAULT_FENCE_MARGIN: Duration = Duration::from_millis(500);
/// A router's load is written at most this often (and only when it moved by 10%).
pub const DEFAULT_LOAD_EVERY: Duration = Duration::from_secs(10);
/// Time allowed for one etcd request (connecting included).
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(2);
/// The cluster name when none is given (`cluster.name`).
pub const DEFAULT_CLUSTER_NAME: &str = "default";

/// Everything that can go wrong with the cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The `--cluster` value is not an etcd URL list.
    #[error("{0}; write etcd://HOST:PORT, or several as etcd://HOST:PORT,HOST:PORT")]
    BadUrl(String),
    /// The cluster name cannot be a key segment.
    #[error("cluster name {0:?} is not usable: use 1 to 64 letters, digits, '-', '_' or '.'")]
    BadName(String),
    /// etcd could not be reached at start.
    #[error("cannot reach etcd at {endpoints}: {message}; start etcd there, or correct --cluster (cluster.etcd in the profile)")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// What the client said.
        message: String,
    },
    /// An etcd request failed.
    #[error("etcd {op} failed: {message}; the router keeps trying")]
    Etcd {
        /// Which request.
        op: &'static str,
        /// What the client said.
        message: String,
    },
    /// An etcd request took longer than its timeout.
    #[error("etcd {op} took longer than {timeout:?}; etcd may be down or cut off")]
    Timeout {
        /// Which request.
        op: &'static str,
        /// The bound.
        timeout: Duration,
    },
    /// A record in etcd could not be read.
    #[error("the record at {key} is not an isthmus record ({message}); another program may share the prefix: pick another cluster name")]
    BadRecord {
        /// Its key.
        key: String,
        /// The parser's words.
        message: String,
    },
    /// The router holds no lease now.
    #[error("this router has lost its cluster lease and is getting a new one")]
    NoLease,
}
