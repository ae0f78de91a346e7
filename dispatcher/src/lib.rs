//! # isthmus-dispatcher
//!
//! Owns the one well-known TCP port: it admits connections within per-source and global bounds
//! (turning the excess away at once with a `Refuse` BUSY that names the bound), answers the
//! preamble with a fresh nonce, reads the hello within a handshake timeout and verifies it
//! completely (the island keys hash to the session id, the role's and the replica's signatures
//! cover the nonce), then finds the session by its id, or creates it when the hello asks and the
//! create policy and global bounds allow, and hands the connection to that session's task.
//! It also owns the port-forwarding mode and shutdown: on Ctrl-C or SIGTERM every replica gets a
//! goodbye before the process exits.
//!
//! ```no_run
//! # async fn run() -> Result<(), isthmus_dispatcher::DispatchError> {
//! use isthmus_dispatcher::{Dispatcher, DispatcherConfig};
//! let dispatcher = Dispatcher::bind(DispatcherConfig::default()).await?;
//! println!("listening on {}", dispatcher.local_addr());
//! dispatcher.run(tokio_util::sync::CancellationToken::new()).await;
//! # Ok(()) }
//! ```

pub mod cluster;
pub mod contacts;
pub mod croquet;
pub mod http;
pub mod metrics;
pub mod portmap;
pub mod reach;
pub mod remember;
pub mod status;

use bytes::BytesMut;
use isthmus_contact::beacon::{Beacon, BeaconIsland};
use isthmus_router::auth::{self, IslandKeys, NONCE_LEN};
use isthmus_router::budget::MemoryBudget;
use isthmus_router::driver::{spawn_session, Attach, DriverConfig, Ending, Retire, SessionHandle};
use isthmus_router::framed::{FrameReader, ReadError};
use isthmus_router::ids::{ConnId, SessionId};
use isthmus_router::session::JoinRequest;
use isthmus_router::wire::{
    self, Announce, ClientFrame, Code, DecodeError, Hello, HelloBody, Role, ServerFrame,
    MAX_HELLO_BYTES, MAX_NAME_BYTES, PREAMBLE_LEN,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The router's well-known port.
pub const DEFAULT_PORT: u16 = 7470;
/// Time a new connection has to send its preamble and hello (slow links included).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once, handshaking or attached; each costs two tasks and two buffers.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Connections open at once from one source address (an IPv6 source is its /64): enough for a
/// household or an office behind one NAT, far too few to take the router's whole
/// connection budget.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;
/// Connections from one source address still in their handshake (preamble and hello not yet
/// read): honest replicas finish theirs in a round trip, so a pile of them is a slowloris.
pub const DEFAULT_MAX_HANDSHAKES_PER_IP: usize = 16;
/// Sessions alive at once; each costs a task and its history.
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;
/// Bytes of every session's history and snapshots together (2 GiB). Sessions reserve from it
/// before they keep anything; past 90% the router creates no new sessions.
pub const DEFAULT_MEMORY_BUDGET_BYTES: usize = 2 * 1024 * 1024 * 1024;
/// Islands closed by their admin that the router remembers, newest first, so they cannot be
/// created again right away by a participant (the oldest are forgotten past this).
pub const MAX_REMEMBERED_CLOSED: usize = 4096;
/// Time allowed to write a refusal to a connection turned away at a bound (and to read and
/// discard what it already sent, so closing does not reset the connection before the refusal
/// arrives).
pub const TURN_AWAY_TIMEOUT: Duration = Duration::from_millis(500);
/// Turned-away connections being answered at once; past this the refusal is written only if
/// the socket takes it without waiting, and the connection is closed.
pub const MAX_TURNING_AWAY: usize = 1024;
/// At most one log line per this period summarises the connections turned away at bounds.
const TURN_AWAY_REPORT: Duration = Duration::from_secs(10);
/// Connections the kernel queues for the accept loop (capped by the system's `somaxconn`).
/// The usual 128 overflows under a burst of a few hundred connects: the excess SYNs are dropped
/// and retried a second later, before the router can even turn them away.
pub const LISTEN_BACKLOG: u32 = 4096;
/// Bytes read and discarded from a turned-away connection, unparsed: room for a preamble and
/// a largest hello, nothing more.
const TURN_AWAY_DRAIN_BYTES: usize = 8 * 1024;
/// Bytes read (and dropped) after a refused hello before the socket is closed, within the
/// refusal's 1 s: enough for the largest duplicate table a recovering replica pipelines.
const REFUSE_DRAIN_BYTES: usize = 256 * 1024;

/// Who may create an island on this router: creating costs a session (a task and memory), so an
/// Internet-facing router should not let everyone do it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CreatePolicy {
    /// Peers on loopback or on one of the router's own interface subnets (the default): the
    /// household creates, friends from afar join with postcards.
    #[default]
    Lan,
    /// Anyone who can reach the router (a public router).
    Any,
    /// Nobody: the router serves only the islands that exist (none after a restart).
    None,
}

impl CreatePolicy {
    /// Whether a peer may create, or a refusal that says what this router allows.
    pub fn check(self, lan_peer: bool) -> Result<(), String> {
        match self {
            CreatePolicy::Any => Ok(()),
            CreatePolicy::Lan if lan_peer => Ok(()),
            CreatePolicy::Lan => Err(
                "this router creates islands only for its own network (create = \"lan\"); create the island on a router near you, or ask its operator to allow \"any\""
                    .into(),
            ),
            CreatePolicy::None => Err(
                "this router creates no islands (create = \"none\"); it only serves islands that already exist on it"
                    .into(),
            ),
        }
    }
}

impl fmt::Display for CreatePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CreatePolicy::Lan => "lan",
            CreatePolicy::Any => "any",
            CreatePolicy::None => "none",
        })
    }
}

impl std::str::FromStr for CreatePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lan" => Ok(CreatePolicy::Lan),
            "any" => Ok(CreatePolicy::Any),
            "none" => Ok(CreatePolicy::None),
            other => Err(format!(
                "create policy {other:?} is not one of \"lan\", \"any\" or \"none\""
            )),
        }
    }
}

/// How the router is reachable from outside the LAN.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum Forwarding {
    /// Reachable on the LAN only; no external contact point.
    #[default]
    LanOnly,
    /// A port forwarded by hand on the home router: this is where the Internet reaches us.
    Manual {
        /// The forwarded external IP and port.
        external: SocketAddr,
    },
    /// Ask the home router for a mapping, with the protocols the config lists (PCP, NAT-PMP,
    /// UPnP IGD).
    Gateway(portmap::MapConfig),
}

/// Where the external address comes from now.
enum External {
    None,
    Fixed(SocketAddr),
    Mapped(tokio::sync::watch::Receiver<Option<portmap::Mapping>>),
}

impl External {
    fn current(&self) -> Option<SocketAddr> {
        match self {
            External::None => None,
            External::Fixed(a) => Some(*a),
            External::Mapped(w) => w.borrow().as_ref().map(|m| m.external),
        }
    }
}

/// The LAN beacon's settings.
#[derive(Clone, Debug)]
pub struct BeaconConfig {
    /// UDP port announced to.
    pub port: u16,
    /// Announcement period.
    pub interval: Duration,
}

impl Default for BeaconConfig {
    fn default() -> Self {
        BeaconConfig {
            port: isthmus_contact::beacon::DEFAULT_BEACON_PORT,
            interval: isthmus_contact::beacon::DEFAULT_BEACON_INTERVAL,
        }
    }
}

/// Everything the dispatcher needs to run.
#[derive(Clone, Debug)]
pub struct DispatcherConfig {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Time allowed for preamble and hello.
    pub handshake_timeout: Duration,
    /// Cap on open connections, handshaking or attached ([`DEFAULT_MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// Cap on open connections from one source address ([`DEFAULT_MAX_CONNECTIONS_PER_IP`]).
    pub max_connections_per_ip: usize,
    /// Cap on connections from one source address still in their handshake
    /// ([`DEFAULT_MAX_HANDSHAKES_PER_IP`]).
    pub max_handshakes_per_ip: usize,
    /// Cap on sessions alive at once ([`DEFAULT_MAX_SESSIONS`]).
    pub max_sessions: usize,
    /// Bytes of every session's history and snapshots together
    /// ([`DEFAULT_MEMORY_BUDGET_BYTES`]). The dispatcher makes one budget of this size and puts
    /// it in every session's `driver.session.budget` (whatever that held). The tick floor is
    /// `driver.session.min_tick_interval`.
    pub memory_budget_bytes: usize,
    /// Who may create islands.
    pub create: CreatePolicy,
    /// How the router is reachable from outside.
    pub forwarding: Forwarding,
    /// Settings of every session.
    pub driver: DriverConfig,
    /// Announce islands on the LAN; `None` keeps the router silent.
    pub beacon: Option<BeaconConfig>,
    /// Serve Croquet / Multisynq clients on the same port; `None` turns it off (`--no-croquet`).
    pub croquet: Option<croquet::CroquetConfig>,
    /// Who may see the status page, its JSON and `/metrics`.
    pub status_from: status::StatusAccess,
    /// Join a router cluster on etcd (`--cluster`); `None` runs alone.
    pub cluster: Option<cluster::ClusterSettings>,
    /// Where the islands this router is home for are remembered across a restart
    /// (`router-islands-PORT.json` in it; see [`remember`]); `None` remembers nothing.
    pub remember_dir: Option<std::path::PathBuf>,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_handshakes_per_ip: DEFAULT_MAX_HANDSHAKES_PER_IP,
            max_sessions: DEFAULT_MAX_SESSIONS,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_BYTES,
            create: CreatePolicy::Lan,
            forwarding: Forwarding::LanOnly,
            driver: DriverConfig::default(),
            beacon: None,
            croquet: Some(croquet::CroquetConfig::default()),
            status_from: status::StatusAccess::Lan,
            cluster: None,
            remember_dir: None,
        }
    }
}

/// Failures of the dispatcher itself (not of one connection).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// The listening socket could not be opened.
    #[error(
        "cannot listen on {addr}: {source}; pick another port with --port or stop what is using it"
    )]
    Bind {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Port mapping failed and the profile says to stop rather than fall back.
    #[error("{0}; not starting, as the profile's fallback is \"fail\" (upnp.fallback; set it to \"lan-only\" to carry on without remote access)")]
    Forwarding(#[source] portmap::PortMapError),
    /// The Croquet file store could not be opened.
    #[error("{0}; pick another data directory with --data-dir, or turn the Croquet front door off with --no-croquet")]
    Croquet(#[source] isthmus_croquet::CroquetError),
    /// The router could not join its cluster.
    #[error("cannot join the router cluster: {0}")]
    Cluster(#[source] isthmus_cluster::ClusterError),
}

/// Why a handshake failed, for the log line.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("no preamble and hello within {0:?}")]
    Timeout(Duration),
    #[error("connection closed during the handshake")]
    Closed,
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("first frame was not a hello")]
    NotHello,
}

struct Slot {
    handle: SessionHandle,
    keys: IslandKeys,
    join: Option<tokio::task::JoinHandle<()>>,
    announce: Option<Announce>,
    /// The placement epoch when this router is the island's cluster home.
    epoch: Option<u64>,
}

/// Islands closed by their admin, newest last, at most [`MAX_REMEMBERED_CLOSED`].
#[derive(Default)]
struct ClosedIslands {
    order: VecDeque<SessionId>,
    set: HashSet<SessionId>,
}

impl ClosedIslands {
    fn insert(&mut self, id: SessionId) {
        if self.set.insert(id) {
            self.order.push_back(id);
        }
        while self.order.len() > MAX_REMEMBERED_CLOSED {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    fn contains(&self, id: &SessionId) -> bool {
        self.set.contains(id)
    }
}

#[derive(Default)]
struct Reg {
    sessions: HashMap<SessionId, Slot>,
    closed: ClosedIslands,
    /// Where islands homed here in a cluster report their creation and end.
    records: Option<tokio::sync::mpsc::UnboundedSender<cluster::Record>>,
}

type Registry = Arc<Mutex<Reg>>;

/// A lock that survives a panic elsewhere: the maps stay consistent between statements.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Connections counted against one source.
#[derive(Default)]
struct SourceCount {
    connections: usize,
    handshakes: usize,
}

type Sources = Arc<Mutex<HashMap<IpAddr, SourceCount>>>;

/// The address a source is counted under: an IPv4 address (also when it arrives IPv4-mapped),
/// or an IPv6 address's /64, which one host or household usually holds whole.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !(u128::MAX >> 64);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Held while a connection is open: a global permit and the source's connection count.
struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    sources: Sources,
    source: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        release(&self.sources, self.source, |c| {
            c.connections = c.connections.saturating_sub(1)
        });
    }
}

/// Held while a connection is in its handshake.
struct HandshakeGuard {
    sources: Sources,
    source: IpAddr,
}

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        release(&self.sources, self.source, |c| {
            c.handshakes = c.handshakes.saturating_sub(1)
        });
    }
}

fn release(sources: &Sources, source: IpAddr, f: impl FnOnce(&mut SourceCount)) {
    let mut map = lock(sources);
    if let Some(c) = map.get_mut(&source) {
        f(c);
        // Forget idle sources: the map holds only sources with open connections.
        if c.connections == 0 && c.handshakes == 0 {
            map.remove(&source);
        }
    }
}

/// What admission hands a new connection.
struct Admission {
    conn: ConnGuard,
    handshake: HandshakeGuard,
}

/// A bound listener with its sessions.
pub struct Dispatcher {
    listener: TcpListener,
    local: SocketAddr,
    shared: Arc<Shared>,
    mapper: Option<portmap::PortMapper>,
    how: String,
}

struct Shared {
    cfg: DispatcherConfig,
    instance: uuid::Uuid,
    external: External,
    registry: Registry,
    next_conn: AtomicU64,
    /// One per open connection, up to `max_connections`.
    permits: Arc<Semaphore>,
    /// Connections and handshakes per source.
    sources: Sources,
    /// Turn-aways being answered.
    turning_away: Arc<Semaphore>,
    /// Shared by every session.
    budget: Arc<MemoryBudget>,
    /// The Croquet front door, unless turned off.
    croquet: Option<croquet::Service>,
    /// Counters for `/metrics` and the status page.
    monitor: metrics::Monitor,
    /// Nonces handed out while the reachability check runs.
    probes: Arc<reach::Probes>,
    /// The router cluster, when it is in one.
    cluster: Option<cluster::Clustered>,
    /// The islands this router is home for, remembered across a restart.
    book: Arc<remember::Book>,
}

impl Dispatcher {
    /// Binds the listening socket.
    pub async fn bind(mut cfg: DispatcherConfig) -> Result<Dispatcher, DispatchError> {
        let budget = Arc::new(MemoryBudget::new(cfg.memory_budget_bytes));
        cfg.driver.session.budget = budget.clone();
        let croquet = match cfg.croquet.clone() {
            Some(c) => Some(croquet::Service::new(c).map_err(DispatchError::Croquet)?),
            None => None,
        };
        let listener = listen(cfg.listen).map_err(|source| DispatchError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let local = listener
            .local_addr()
            .map_err(|source| DispatchError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let (external, mapper, how) = match &cfg.forwarding {
            Forwarding::LanOnly => (External::None, None, "LAN-only".to_string()),
            Forwarding::Manual { external } => {
                if !portmap::is_public(external.ip()) {
                    warn!(
                        "the manual external address {external} is not a public Internet address; remote users will not reach it unless they share that network"
                    );
                }
                (
                    External::Fixed(*external),
                    None,
                    "forwarded by hand".to_string(),
                )
            }
            Forwarding::Gateway(up) => match portmap::start(up.clone(), local.port()).await {
                Ok(m) => {
                    let how = m.describe();
                    (External::Mapped(m.watch()), Some(m), how)
                }
                // Asked to stop meanwhile: `run` returns at once; neither fallback applies.
                Err(e @ portmap::PortMapError::Cancelled) => {
                    info!("{e}");
                    (External::None, None, format!("LAN-only: {e}"))
                }
                Err(e) => match up.fallback {
                    portmap::Fallback::Fail => return Err(DispatchError::Forwarding(e)),
                    portmap::Fallback::LanOnly => {
                        warn!("{e}; continuing LAN-only");
                        (External::None, None, format!("LAN-only: {e}"))
                    }
                },
            },
        };
        let stats = Arc::new(isthmus_router::stats::RouterStats::default());
        cfg.driver.stats = stats.clone();
        let instance = uuid::Uuid::new_v4();
        let cluster = match cfg.cluster.clone() {
            Some(settings) => {
                let internal = if cfg.listen.ip().is_unspecified() {
                    let probe = SocketAddr::new(cfg.listen.ip(), local.port());
                    contacts::contacts_for(
                        probe,
                        probe,
                        probe,
                        &contacts::local_addrs(),
                        None,
                        instance,
                    )
                    .internal
                } else {
                    vec![local]
                };
                Some(
                    cluster::Clustered::join(settings, instance, internal, external.current())
                        .await
                        .map_err(DispatchError::Cluster)?,
                )
            }
            None => None,
        };
        let registry: Registry = Arc::default();
        lock(&registry).records = cluster.as_ref().map(|c| c.records());
        let book =
            Arc::new(remember::Book::open(cfg.remember_dir.as_ref().map(|d| {
                d.join(format!("router-islands-{}.json", local.port()))
            })));
        Ok(Dispatcher {
            listener,
            local,
            mapper,
            shared: Arc::new(Shared {
                monitor: metrics::Monitor::new(stats, how.clone()),
                permits: Arc::new(Semaphore::new(cfg.max_connections.max(1))),
                sources: Arc::default(),
                turning_away: Arc::new(Semaphore::new(MAX_TURNING_AWAY)),
                budget,
                probes: Arc::default(),
                instance,
                external,
                cfg,
                registry,
                cluster,
                next_conn: AtomicU64::new(1),
                croquet,
                book,
            }),
            how,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// This dispatcher's instance id, announced in beacons and welcomes.
    pub fn instance(&self) -> uuid::Uuid {
        self.shared.instance
    }

    /// The external address published now, if any.
    pub fn external(&self) -> Option<SocketAddr> {
        self.shared.external.current()
    }

    /// The reachability check of the gateway's mapping (see [`reach`]), when there is one. Await
    /// it once [`Dispatcher::run`] is accepting: the check connects to the router itself.
    pub fn reachability(
        &self,
    ) -> Option<impl std::future::Future<Output = reach::Reachability> + Send + 'static> {
        let mapping = self.mapper.as_ref()?.current()?;
        let probes = self.shared.probes.clone();
        Some(async move { reach::check(&mapping, &probes).await })
    }

    /// One line for people: where the router can be reached and how the external address was
    /// obtained.
    pub fn summary(&self) -> String {
        let listen = self.shared.cfg.listen;
        let internal: Vec<String> = if listen.ip().is_unspecified() {
            let probe = SocketAddr::new(listen.ip(), self.local.port());
            contacts::contacts_for(
                probe,
                probe,
                probe,
                &contacts::local_addrs(),
                None,
                self.shared.instance,
            )
            .internal
            .iter()
            .map(|a| a.to_string())
            .collect()
        } else {
            vec![self.local.to_string()]
        };
        let external = match self.external() {
            Some(e) => format!("{e} ({})", self.how),
            None => format!("none ({})", self.how),
        };
        format!("internal {}; external {external}", internal.join(", "))
    }

    /// One line for people about the cluster this router joined, if any.
    pub fn cluster_summary(&self) -> Option<String> {
        self.shared.cluster.as_ref().map(|c| c.summary())
    }

    /// Sessions alive now.
    pub fn session_count(&self) -> usize {
        lock(&self.shared.registry).sessions.len()
    }

    /// Croquet sessions alive now.
    pub fn croquet_session_count(&self) -> usize {
        self.shared
            .croquet
            .as_ref()
            .map_or(0, |c| c.session_count())
    }

    /// The memory budget every session reserves from (to watch it, or to fill it in tests).
    pub fn budget(&self) -> Arc<MemoryBudget> {
        self.shared.budget.clone()
    }

    /// Accepts connections until `shutdown` fires, then says goodbye to every replica.
    pub async fn run(self, shutdown: CancellationToken) {
        cluster::Clustered::start(&self.shared);
        if let Some(b) = self.shared.cfg.beacon.clone() {
            let shared = Arc::downgrade(&self.shared);
            let port = self.local.port();
            let interval_ms = b.interval.as_millis().min(u128::from(u32::MAX)) as u32;
            let announcement = move || {
                let shared = shared.upgrade()?;
                Some(Beacon {
                    instance: shared.instance,
                    port,
                    interval_ms,
                    // Read afresh each time: a UPnP mapping can move or vanish.
                    external: shared.external.current(),
                    islands: announced(&shared.registry),
                })
            };
            let cancel = shutdown.clone();
            let families = isthmus_contact::lan::Families::of_listener(self.local.ip());
            tokio::spawn(async move {
                if let Err(e) = isthmus_contact::lan::announce(
                    families,
                    b.port,
                    b.interval,
                    announcement,
                    cancel,
                )
                .await
                {
                    warn!("LAN beacon stopped: {e}; islands will not be found by broadcast");
                }
            });
        }
        {
            let shared = self.shared.clone();
            let cancel = shutdown.clone();
            tokio::spawn(async move { shared.book.run(cancel).await });
        }
        // Handshakes and turn-aways; both bounded (by the connection permits and by
        // MAX_TURNING_AWAY), so this set is too.
        let mut handshakes = JoinSet::new();
        let mut backoff = Duration::from_millis(5);
        // Turn-aways are logged in summary, at most once per TURN_AWAY_REPORT: a flood must
        // not flood the log too.
        let mut turned_away = 0u64;
        let mut reported = tokio::time::Instant::now();
        loop {
            // Accept even when a bound is reached: the peer hears why at once instead of
            // waiting in the listen backlog for an answer that never comes.
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                _ = shutdown.cancelled() => break,
                Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    let _ = stream.set_nodelay(true);
                    match self.shared.admit(peer.ip()) {
                        Ok(admission) => {
                            let shared = self.shared.clone();
                            handshakes.spawn(async move {
                                Shared::serve(shared, stream, peer, admission).await;
                            });
                        }
                        Err(reason) => {
                            debug!(%peer, "turned away: {reason}");
                            turned_away += 1;
                            if reported.elapsed() >= TURN_AWAY_REPORT {
                                warn!(
                                    "turned away {turned_away} connections at a bound in the last {:?}; the latest from {peer}: {reason}",
                                    reported.elapsed()
                                );
                                turned_away = 0;
                                reported = tokio::time::Instant::now();
                            }
                            self.shared.turn_away(stream, reason, &mut handshakes);
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!("accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        handshakes.abort_all();
        if self.shared.cluster.is_some() {
            // Refuse connections from here on: the replicas of a clustered router go to other
            // routers, which must see this one as gone rather than redirect them back to it.
            drop(self.listener);
        }
        if let Some(c) = &self.shared.croquet {
            c.shutdown().await;
        }
        self.shared.shutdown().await;
        if let Some(c) = &self.shared.cluster {
            // After the goodbyes: no island is stamped here once its record is gone.
            c.leave().await;
        }
        if let Some(m) = self.mapper {
            // A mapping left behind is a hole in the user's firewall: always remove it.
            m.shutdown().await;
        }
    }
}

impl Shared {
    /// Counts a new connection against the global and per-source bounds, or says which bound
    /// it meets.
    fn admit(&self, ip: IpAddr) -> Result<Admission, String> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.monitor.shed(metrics::Limit::Connections);
            return Err(format!(
                "this router is at its limit of {} open connections; try again later",
                self.cfg.max_connections
            ));
        };
        let source = source_of(ip);
        let mut map = lock(&self.sources);
        let (connections, handshakes) = map
            .get(&source)
            .map_or((0, 0), |c| (c.connections, c.handshakes));
        if connections >= self.cfg.max_connections_per_ip {
            self.monitor.shed(metrics::Limit::ConnectionsPerIp);
            return Err(format!(
                "{source} already has {connections} connections open to this router, its limit per address; close some and try again"
            ));
        }
        if handshakes >= self.cfg.max_handshakes_per_ip {
            self.monitor.shed(metrics::Limit::HandshakesPerIp);
            return Err(format!(
                "{source} already has {handshakes} handshakes in progress with this router, its limit per address; try again in a moment"
            ));
        }
        let count = map.entry(source).or_default();
        count.connections += 1;
        count.handshakes += 1;
        drop(map);
        Ok(Admission {
            conn: ConnGuard {
                _permit: permit,
                sources: self.sources.clone(),
                source,
            },
            handshake: HandshakeGuard {
                sources: self.sources.clone(),
                source,
            },
        })
    }

    /// Answers a connection past a bound with our preamble and a `Refuse` BUSY, without reading
    /// its hello; the work is bounded in time ([`TURN_AWAY_TIMEOUT`]), bytes and concurrency
    /// ([`MAX_TURNING_AWAY`]).
    fn turn_away(&self, stream: TcpStream, reason: String, tasks: &mut JoinSet<()>) {
        // A refused connection never signs anything, so its nonce needs no randomness.
        let mut frame = BytesMut::from(&wire::router_preamble(&[0; NONCE_LEN])[..]);
        wire::encode_into(
            &ServerFrame::Refuse {
                code: Code::BUSY,
                reason,
            },
            &mut frame,
        );
        match self.turning_away.clone().try_acquire_owned() {
            Ok(permit) => {
                tasks.spawn(async move {
                    let _permit = permit;
                    turn_away(stream, &frame).await;
                });
            }
            Err(_) => {
                // A fresh socket's send buffer takes a hundred bytes without waiting.
                let _ = stream.try_write(&frame);
            }
        }
    }

    async fn serve(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr, admission: Admission) {
        let Admission { conn, handshake } = admission;
        let timeout = self.cfg.handshake_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        // Ten bytes tell the protocols apart: a native preamble is exactly that long, and the
        // shortest HTTP request line is longer.
        let mut first = [0u8; PREAMBLE_LEN];
        let read = tokio::time::timeout_at(deadline, read_exact(&mut stream, &mut first))
            .await
            .unwrap_or(Err(HandshakeError::Timeout(timeout)));
        if let Err(e) = read {
            info!(%peer, "handshake failed: {e}");
            return;
        }
        if http::looks_like_http(&first) {
            // hyper bounds the wait for each request head itself.
            drop(handshake);
            let ctx = http::Ctx {
                local: stream.local_addr().unwrap_or(self.cfg.listen),
                shared: self,
                peer,
                guard: Arc::new(conn),
            };
            http::serve(ctx, first.to_vec(), stream).await;
            return;
        }
        let nonce = auth::fresh_nonce();
        self.probes.note(&nonce);
        let mut greeted = false;
        let result = tokio::time::timeout_at(
            deadline,
            read_hello(
                &mut stream,
                first,
                &nonce,
                self.cfg.driver.max_frame_bytes,
                &mut greeted,
            ),
        )
        .await
        .unwrap_or(Err(HandshakeError::Timeout(timeout)));
        let (hello, leftover) = match result {
            Ok(ok) => ok,
            Err(e) => {
                info!(%peer, "handshake failed: {e}");
                let code = match &e {
                    HandshakeError::Decode(DecodeError::UnsupportedVersion { .. }) => {
                        Some(Code::UNSUPPORTED_VERSION)
                    }
                    HandshakeError::Decode(DecodeError::BadMagic { .. })
                    | HandshakeError::Closed
                    | HandshakeError::Io(_) => None,
                    // Without a preamble the peer is not known to speak Isthmus: just close.
                    HandshakeError::Timeout(_) if !greeted => None,
                    HandshakeError::Timeout(_) => Some(Code::HANDSHAKE_TIMEOUT),
                    HandshakeError::Decode(_) => Some(Code::MALFORMED),
                    HandshakeError::NotHello => Some(Code::PROTOCOL_VIOLATION),
                };
                if let Some(code) = code {
                    self.refused(code, None, peer, &e.to_string());
                    refuse(&mut stream, code, &e.to_string()).await;
                }
                return;
            }
        };
        let session = hello.body.session;
        if let Err((code, reason)) = check_hello(&nonce, &hello) {
            info!(%peer, %session, "refused: {code}: {reason}");
            self.refused(code, Some(session), peer, &reason);
            refuse(&mut stream, code, &reason).await;
            return;
        }
        let body = hello.body;
        let local = stream.local_addr().unwrap_or(self.cfg.listen);
        let host = contacts::local_addrs();
        let lan = contacts::is_lan_peer(peer.ip(), &host);
        let mut epoch = None;
        let mut known = None;
        let mut others = Vec::new();
        // The hello is read: a hello held while a dead home's lease runs out must not count
        // against its source's handshakes (that bound is for slow hellos).
        let handshake = if self.cluster.is_some() {
            drop(handshake);
            None
        } else {
            Some(handshake)
        };
        if let Some(c) = &self.cluster {
            match c.decide(&self, &body, lan).await {
                cluster::Decision::Here(e, k) => {
                    epoch = e;
                    known = k;
                    others = c.others(!lan);
                }
                cluster::Decision::Redirect(frame) => {
                    debug!(%peer, %session, "redirected to the island's home");
                    let frame = wire::encode(&frame);
                    let _ = tokio::time::timeout(timeout, async {
                        let _ = stream.write_all(&frame).await;
                        let _ = stream.shutdown().await;
                    })
                    .await;
                    return;
                }
                cluster::Decision::Refuse(code, reason) => {
                    info!(%peer, %session, "refused: {code}: {reason}");
                    self.refused(code, Some(session), peer, &reason);
                    refuse(&mut stream, code, &reason).await;
                    return;
                }
            }
        }
        let contacts = contacts::contacts_for(
            self.cfg.listen,
            local,
            peer,
            &host,
            self.external.current(),
            self.instance,
        );
        let conn_id = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let attach = Attach {
            conn: conn_id,
            request: JoinRequest {
                replica: body.replica,
                name: body.name.clone(),
                role: body.role,
                resume_from: body.resume_from,
                contacts,
                created: false,
                nonce,
                control: body.control,
                recover: body.recover.clone(),
                cluster: others,
            },
            stream: Box::new(stream),
            leftover,
            guard: Some(Box::new(conn)),
        };
        if let Err((mut attach, code, reason)) = self.route(&body, lan, attach, epoch, known) {
            if let (Some(c), Some(e)) = (&self.cluster, epoch) {
                // Placed here for a hello that was then refused: free the island again.
                let _ = c.records().send(cluster::Record::Refused(session, e));
            }
            info!(%peer, %session, "refused: {code}: {reason}");
            self.refused(code, Some(session), peer, &reason);
            let stream = &mut attach.stream;
            let frame = wire::encode(&ServerFrame::Refuse { code, reason });
            let _ = tokio::time::timeout(timeout, async {
                let _ = stream.write_all(&frame).await;
                let _ = stream.shutdown().await;
            })
            .await;
        } else {
            debug!(%peer, %session, conn = ?conn_id, "attached");
        }
        drop(handshake);
    }

    /// Finds or creates the session and hands it the connection, or says why not. The hello
    /// has been verified; `lan` says whether the peer is on the router's own network.
    #[allow(clippy::result_large_err)]
    fn route(
        &self,
        body: &HelloBody,
        lan: bool,
        mut attach: Attach,
        epoch: Option<u64>,
        known: Option<remember::Remembered>,
    ) -> Result<(), (Attach, Code, String)> {
        let id = body.session;
        loop {
            let mut reg = lock(&self.registry);
            if let Some(slot) = reg.sessions.get(&id) {
                // The id commits to the keys, so this holds for any verified hello; checked
                // anyway because the registry must never mix two islands.
                if slot.keys != body.keys {
                    return Err((
                        attach,
                        Code::BAD_CREDENTIALS,
                        "the island keys do not match this session's; the postcard is not for this island".into(),
                    ));
                }
                match slot.handle.attach(attach) {
                    Ok(()) => return Ok(()),
                    Err(back) => {
                        // The session ended between lookup and attach: forget it, try again.
                        attach = *back;
                        reg.sessions.remove(&id);
                        continue;
                    }
                }
            }
            if reg.closed.contains(&id) {
                return Err((
                    attach,
                    Code::CLOSED,
                    format!(
                        "island {id} was closed by its admin; it cannot be joined or created again"
                    ),
                ));
            }
            // An island this router was home for before a restart, or one its cluster knows, is
            // re-created by its replicas from wherever they may join it, whatever the create
            // policy says.
            let remembered = body
                .create
                .is_none()
                .then(|| self.book.lookup(id, &body.keys))
                .flatten()
                .or(known);
            let Some(opts) = creation(body, lan, remembered.as_ref()) else {
                return Err((
                    attach,
                    Code::UNKNOWN_SESSION,
                    format!(
                        "this router has no session {id}; it may have ended or the router restarted (a participant can create it again)"
                    ),
                ));
            };
            let opts = &opts;
            if let Err((code, reason)) =
                self.may_create(body, opts, lan, remembered.is_some(), reg.sessions.len())
            {
                return Err((attach, code, reason));
            }
            let mut driver = self.cfg.driver.clone();
            driver.session = driver.session.with_create_options(opts);
            // A cluster home's welcomes carry its placement record's revision (fencing).
            driver.session.epoch = epoch.unwrap_or(0);
            driver.session.incarnation = u64::from_le_bytes(
                isthmus_router::auth::fresh_nonce()[..8]
                    .try_into()
                    .unwrap_or_default(),
            );
            driver.island = opts
                .announce
                .as_ref()
                .map(|a| a.name.clone())
                .unwrap_or_default();
            let island = driver.island.clone();
            let retire = retire_from(Arc::downgrade(&self.registry), id, self.book.clone());
            let (handle, join) = spawn_session(id, body.keys, driver, retire);
            let record = remember::Remembered::of(id, body.keys, opts);
            if let (Some(tell), Some(_), Some(_)) = (&reg.records, epoch, &body.create) {
                // A new island homed here: the cluster remembers it exists (a re-created one
                // is remembered already).
                let _ = tell.send(cluster::Record::Created(record.clone()));
            }
            self.book.insert(record);
            if body.create.is_some() {
                info!(session = %id, island = ?island, creator = ?body.name, "island created");
            } else {
                info!(session = %id, island = ?island, by = ?body.name, "island being re-created from its replicas");
            }
            attach.request.created = true;
            if let Err(back) = handle.attach(attach) {
                return Err((*back, Code::BUSY, "session failed to start".into()));
            }
            reg.sessions.insert(
                id,
                Slot {
                    handle,
                    keys: body.keys,
                    join: Some(join),
                    announce: opts.announce.clone(),
                    epoch,
                },
            );
            return Ok(());
        }
    }

    /// Whether this verified hello may create its island now, or the refusal.
    fn may_create(
        &self,
        body: &HelloBody,
        opts: &wire::CreateOptions,
        lan: bool,
        remembered: bool,
        sessions: usize,
    ) -> Result<(), (Code, String)> {
        if !body.role.may_send() {
            return Err((
                Code::PROTOCOL_VIOLATION,
                "observers cannot create an island; a participant or the admin must create it first".into(),
            ));
        }
        if !remembered {
            self.cfg
                .create
                .check(lan)
                .map_err(|r| (Code::CREATE_NOT_ALLOWED, r))?;
        }
        if let Some(a) = &opts.announce {
            if a.name.len() > isthmus_contact::MAX_ISLAND_NAME_BYTES {
                return Err((
                    Code::PROTOCOL_VIOLATION,
                    format!(
                        "island names are at most {} bytes",
                        isthmus_contact::MAX_ISLAND_NAME_BYTES
                    ),
                ));
            }
            if let Some(secret) = &a.secret {
                if !lan {
                    return Err((
                        Code::PROTOCOL_VIOLATION,
                        "a LAN-open island's secret is accepted only from the router's own network; from afar, announce the island without it (private)".into(),
                    ));
                }
                if !auth::is_participant_secret(&body.keys, secret) {
                    return Err((
                        Code::PROTOCOL_VIOLATION,
                        "the announced secret is not this island's participant secret".into(),
                    ));
                }
            }
        }
        if sessions >= self.cfg.max_sessions {
            return Err((
                Code::BUSY,
                format!(
                    "this router is at its limit of {} sessions; try again later or use another router",
                    self.cfg.max_sessions
                ),
            ));
        }
        if self.budget.nearly_full() {
            return Err((
                Code::BUSY,
                format!(
                    "this router's memory budget for histories and snapshots is nearly used up ({} of {} MiB); it creates no sessions until some end",
                    self.budget.used() / (1024 * 1024),
                    self.budget.limit() / (1024 * 1024)
                ),
            ));
        }
        Ok(())
    }

    /// Counts a hello refused by the dispatcher, for the metrics and the status page.
    fn refused(&self, code: Code, session: Option<SessionId>, peer: SocketAddr, reason: &str) {
        let island = session
            .and_then(|id| {
                let reg = lock(&self.registry);
                reg.sessions
                    .get(&id)?
                    .announce
                    .as_ref()
                    .map(|a| a.name.clone())
            })
            .unwrap_or_default();
        let who = peer.ip().to_string();
        self.monitor
            .stats
            .refused(code, session, &island, who, reason.to_string());
    }

    async fn shutdown(&self) {
        let slots: Vec<Slot> = lock(&self.registry)
            .sessions
            .drain()
            .map(|(_, s)| s)
            .collect();
        info!(
            sessions = slots.len(),
            "shutting down: saying goodbye to every replica"
        );
        // In a cluster the islands go on at the other routers: the goodbye says so.
        let (code, reason) = if self.cluster.is_some() {
            (
                Code::MOVING,
                "this router is leaving its cluster; the island moves to another router of the cluster",
            )
        } else {
            (Code::SHUTTING_DOWN, "the router is shutting down")
        };
        for slot in &slots {
            slot.handle.shutdown_with(code, reason).await;
        }
        for mut slot in slots {
            if let Some(join) = slot.join.take() {
                let _ = join.await;
            }
        }
    }
}

/// What a session asks before it ends: an expired one goes unless an attach is on its way; a
/// closed one always goes, and its id is remembered so it is not created again.
fn retire_from(
    registry: std::sync::Weak<Mutex<Reg>>,
    id: SessionId,
    book: Arc<remember::Book>,
) -> Retire {
    Box::new(move |ending: Ending, attach_pending: &dyn Fn() -> bool| {
        let Some(registry) = registry.upgrade() else {
            return true;
        };
        let mut reg = lock(&registry);
        let gone = match ending {
            Ending::Expired => {
                if attach_pending() {
                    return false;
                }
                reg.sessions.remove(&id)
            }
            Ending::Closed => {
                reg.closed.insert(id);
                reg.sessions.remove(&id)
            }
        };
        // A cluster home frees the island's placement record when the island ends, and the
        // cluster forgets the island.
        if let (Some(epoch), Some(tell)) = (gone.and_then(|s| s.epoch), &reg.records) {
            let _ = tell.send(cluster::Record::Ended(id, epoch));
        }
        book.remove(id);
        true
    })
}

/// The checks of a hello that need no registry: its signatures over this connection's nonce
/// (which also prove the keys commit to the session id), its size limits and its role.
fn check_hello(nonce: &[u8; NONCE_LEN], hello: &Hello) -> Result<(), (Code, String)> {
    auth::verify_hello(nonce, hello).map_err(|e| (Code::BAD_CREDENTIALS, e.to_string()))?;
    let body = &hello.body;
    if body.name.len() > MAX_NAME_BYTES {
        return Err((
            Code::PROTOCOL_VIOLATION,
            format!(
                "name too long: {} bytes, at most {MAX_NAME_BYTES}",
                body.name.len()
            ),
        ));
    }
    if body.control && body.role != Role::Admin {
        return Err((
            Code::PROTOCOL_VIOLATION,
            "only the admin may open a control connection".into(),
        ));
    }
    Ok(())
}

/// Binds the listening socket with a backlog of [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As std does: a restarted router rebinds its port while old connections linger in
    // TIME_WAIT. (On Windows the option means something else, and is not needed.)
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Writes a refusal, closes our side, and reads and discards what the peer already sent (a
/// bounded amount, never parsed) so the close does not reset the connection first.
async fn turn_away(mut stream: TcpStream, frame: &[u8]) {
    let _ = tokio::time::timeout(TURN_AWAY_TIMEOUT, async {
        stream.write_all(frame).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 1024];
        let mut drained = 0;
        while drained < TURN_AWAY_DRAIN_BYTES {
            match stream.read(&mut buf).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// The islands to put in the beacon now.
fn announced(registry: &Mutex<Reg>) -> Vec<BeaconIsland> {
    lock(registry)
        .sessions
        .iter()
        .filter_map(|(id, slot)| {
            slot.announce.as_ref().map(|a| BeaconIsland {
                session: *id,
                name: a.name.clone(),
                destination: a.destination,
                admin_key: slot.keys.admin,
                secret: a.secret,
            })
        })
        .collect()
}

/// What a hello for a session this router does not have creates, if anything: the creator's
/// options, or, for a recovering hello of a participant or admin (its router restarted, or the
/// island's home died), the options it remembers. The session then gathers its replicas and
/// continues their order. A recovering hello from afar keeps its island private on the beacon:
/// a LAN-open secret is accepted only from the router's own network.
fn creation(
    body: &HelloBody,
    lan: bool,
    remembered: Option<&remember::Remembered>,
) -> Option<wire::CreateOptions> {
    if body.control {
        return None;
    }
    if let Some(opts) = &body.create {
        return Some(opts.clone());
    }
    let recover = body.recover.as_ref().filter(|_| body.role.may_send())?;
    // The creator's own options first (a LAN-open secret comes only with them), then what the
    // router remembers, then what any replica knows.
    let mut opts = recover
        .create
        .clone()
        .or_else(|| remembered.map(remember::Remembered::options))
        .unwrap_or_else(|| wire::CreateOptions {
            tick_interval_ms: u32::try_from(recover.tick_interval_us / 1000)
                .ok()
                .filter(|ms| *ms > 0),
            ..wire::CreateOptions::default()
        });
    if !lan {
        if let Some(a) = opts.announce.as_mut() {
            a.secret = None;
        }
    }
    Some(opts)
}

/// Checks the preamble (already read), answers with ours and this connection's nonce, then reads the
/// hello (not yet verified).
async fn read_hello(
    stream: &mut TcpStream,
    pre: [u8; PREAMBLE_LEN],
    nonce: &[u8; NONCE_LEN],
    max_frame: usize,
    greeted: &mut bool,
) -> Result<(Hello, BytesMut), HandshakeError> {
    if let Err(e) = wire::check_preamble(&pre) {
        if matches!(e, DecodeError::UnsupportedVersion { .. }) {
            // Our plain preamble tells an old or new peer which version we speak.
            stream.write_all(&wire::preamble()).await?;
            *greeted = true;
        }
        return Err(e.into());
    }
    stream.write_all(&wire::router_preamble(nonce)).await?;
    *greeted = true;
    let mut frames = FrameReader::new(stream, MAX_HELLO_BYTES.min(max_frame));
    let frame = frames.read::<ClientFrame>().await.map_err(|e| match e {
        ReadError::Decode(e) => HandshakeError::Decode(e),
        ReadError::Io(e) => HandshakeError::Io(e),
        ReadError::Closed => HandshakeError::Closed,
    })?;
    let (_, leftover) = frames.into_parts();
    match frame {
        ClientFrame::Hello(h) => Ok((h, leftover)),
        _ => Err(HandshakeError::NotHello),
    }
}

async fn read_exact(stream: &mut TcpStream, out: &mut [u8]) -> Result<(), HandshakeError> {
    match stream.read_exact(out).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(HandshakeError::Closed),
        Err(e) => Err(e.into()),
    }
}

async fn refuse(stream: &mut TcpStream, code: Code, reason: &str) {
    let frame = wire::encode(&ServerFrame::Refuse {
        code,
        reason: reason.to_string(),
    });
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&frame).await;
        let _ = stream.shutdown().await;
        // Read what the peer pipelined after its hello (a recovering replica's duplicate table)
        // until it closes: closing with unread bytes would send a reset, which can destroy the
        // refusal before the peer reads it.
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < REFUSE_DRAIN_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_router::auth::{Capability, KeyPair};

    fn hello(cap: &Capability, admin: &Capability, nonce: &[u8; NONCE_LEN]) -> Hello {
        let keys = auth::island_keys(admin).expect("admin capability");
        let me = KeyPair::random();
        let body = HelloBody {
            session: keys.session_id(),
            keys,
            replica: auth::replica_id_for(&me.public()),
            replica_key: me.public(),
            name: "ada".into(),
            role: cap.role(),
            resume_from: None,
            create: None,
            control: false,
            recover: None,
        };
        auth::sign_hello(nonce, body, &cap.key_pair(), &me)
    }

    #[test]
    fn hellos_are_checked_for_signature_name_and_control() {
        let admin = Capability::new_island();
        let part = admin.weaker().expect("participant");
        let nonce = auth::fresh_nonce();
        assert_eq!(check_hello(&nonce, &hello(&part, &admin, &nonce)), Ok(()));
        let replayed = check_hello(&auth::fresh_nonce(), &hello(&part, &admin, &nonce));
        assert_eq!(replayed.map_err(|e| e.0), Err(Code::BAD_CREDENTIALS));

        let mut h = hello(&part, &admin, &nonce);
        h.body.name = "x".repeat(MAX_NAME_BYTES + 1);
        let me = KeyPair::random();
        h.body.replica_key = me.public();
        h.body.replica = auth::replica_id_for(&me.public());
        let h = auth::sign_hello(&nonce, h.body, &part.key_pair(), &me);
        let (code, reason) = check_hello(&nonce, &h).expect_err("too long");
        assert_eq!(code, Code::PROTOCOL_VIOLATION);
        assert!(reason.contains("name too long"), "{reason}");

        let mut h = hello(&part, &admin, &nonce);
        h.body.control = true;
        let me = KeyPair::random();
        h.body.replica_key = me.public();
        h.body.replica = auth::replica_id_for(&me.public());
        let h = auth::sign_hello(&nonce, h.body, &part.key_pair(), &me);
        assert_eq!(
            check_hello(&nonce, &h).map_err(|e| e.0),
            Err(Code::PROTOCOL_VIOLATION)
        );
    }

    #[test]
    fn a_recovering_hello_creates_for_participants_only_and_keeps_no_secret_from_afar() {
        let admin = Capability::new_island();
        let part = admin.weaker().expect("participant");
        let observer = admin.derive(wire::Role::Observer).expect("observer");
        let creator_opts = wire::CreateOptions {
            tick_interval_ms: Some(20),
            announce_membership: true,
            announce: Some(Announce {
                name: "cove".into(),
                destination: None,
                secret: Some([7; 32]),
            }),
        };
        let recover = |create: Option<wire::CreateOptions>| wire::Recover {
            incarnation: 5,
            epoch: 1,
            time: isthmus_router::ids::RouterTime(1_000),
            members: 2,
            tick_interval_us: 40_000,
            create,
        };
        let mut body = hello(&part, &admin, &[0; NONCE_LEN]).body;
        assert_eq!(creation(&body, true, None), None, "nothing asked");
        body.recover = Some(recover(None));
        let opts = creation(&body, false, None).expect("a participant re-creates");
        assert_eq!(opts.tick_interval_ms, Some(40), "the tick its welcome said");
        body.recover = Some(recover(Some(creator_opts.clone())));
        assert_eq!(creation(&body, true, None), Some(creator_opts.clone()));
        let afar = creation(&body, false, None).expect("from afar");
        assert_eq!(
            afar.announce.and_then(|a| a.secret),
            None,
            "private from afar"
        );
        // What the router remembers serves a replica that is not the creator.
        let remembered = remember::Remembered::of(body.session, body.keys, &creator_opts);
        body.recover = Some(recover(None));
        let opts = creation(&body, true, Some(&remembered)).expect("remembered");
        assert!(opts.announce_membership);
        assert_eq!(
            opts.announce.map(|a| (a.name, a.secret)),
            Some(("cove".into(), None))
        );
        let mut obs = hello(&observer, &admin, &[0; NONCE_LEN]).body;
        obs.recover = Some(recover(None));
        assert_eq!(
            creation(&obs, true, Some(&remembered)),
            None,
            "observers never create"
        );
        body.control = true;
        assert_eq!(creation(&body, true, None), None, "nor control connections");
    }

    #[test]
    fn the_create_policy_says_what_it_allows() {
        assert!(CreatePolicy::Any.check(false).is_ok());
        assert!(CreatePolicy::Lan.check(true).is_ok());
        let lan = CreatePolicy::Lan.check(false).expect_err("remote");
        assert!(lan.contains("own network"), "{lan}");
        let none = CreatePolicy::None.check(true).expect_err("nobody");
        assert!(none.contains("creates no islands"), "{none}");
        for p in [CreatePolicy::Lan, CreatePolicy::Any, CreatePolicy::None] {
            assert_eq!(p.to_string().parse::<CreatePolicy>(), Ok(p));
        }
        assert!("open".parse::<CreatePolicy>().is_err());
    }

    #[test]
    fn closed_islands_are_remembered_up_to_the_bound() {
        let mut closed = ClosedIslands::default();
        let ids: Vec<SessionId> = (0..MAX_REMEMBERED_CLOSED as u128 + 10)
            .map(|i| SessionId(uuid::Uuid::from_u128(i)))
            .collect();
        for id in &ids {
            closed.insert(*id);
            closed.insert(*id);
        }
        assert_eq!(closed.order.len(), MAX_REMEMBERED_CLOSED);
        assert_eq!(closed.set.len(), MAX_REMEMBERED_CLOSED);
        assert!(!closed.contains(&ids[9]), "the oldest are forgotten");
        assert!(closed.contains(&ids[10]));
        assert!(closed.contains(ids.last().expect("some")));
    }

    #[test]
    fn sources_are_addresses_or_ipv6_slash_64s() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("literal");
        assert_eq!(source_of(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_of(ip("2001:db8:1:2:bbbb::9")),
            source_of(ip("2001:db8:1:2:aaaa::1"))
        );
    }

    #[tokio::test]
    async fn per_source_counts_are_bounded_and_released() {
        let cfg = DispatcherConfig {
            listen: "127.0.0.1:0".parse().expect("literal"),
            max_connections: 3,
            max_connections_per_ip: 2,
            max_handshakes_per_ip: 1,
            ..DispatcherConfig::default()
        };
        let d = Dispatcher::bind(cfg).await.expect("bind");
        let s = &d.shared;
        let a = ip("127.0.0.1");
        let b = ip("127.0.0.2");
        let first = s.admit(a).expect("first");
        let busy = s.admit(a).err().expect("second handshake");
        assert!(busy.contains("handshakes in progress"), "{busy}");
        drop(first.handshake);
        let second = s.admit(a).expect("handshake slot free again");
        drop(second.handshake);
        let over = s.admit(a).err().expect("third connection");
        assert!(over.contains("2 connections open"), "{over}");
        let third = s.admit(b).expect("another source");
        let full = s.admit(ip("127.0.0.3")).err().expect("global bound");
        assert!(full.contains("limit of 3 open connections"), "{full}");
        drop((first.conn, second.conn, third));
        assert!(lock(&s.sources).is_empty(), "idle sources are forgotten");
        assert!(s.admit(ip("127.0.0.3")).is_ok());
    }

    #[tokio::test]
    async fn the_beacon_lists_announced_islands_with_their_admin_key() {
        let admin = Capability::new_island();
        let keys = auth::island_keys(&admin).expect("admin capability");
        let id = keys.session_id();
        let (handle, join) =
            spawn_session(id, keys, DriverConfig::default(), Box::new(|_, _| true));
        let registry: Registry = Arc::default();
        lock(&registry).sessions.insert(
            id,
            Slot {
                handle: handle.clone(),
                keys,
                join: None,
                announce: Some(Announce {
                    name: "den".into(),
                    destination: None,
                    secret: None,
                }),
                epoch: None,
            },
        );
        let listed = announced(&registry);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].session, id);
        assert_eq!(listed[0].admin_key, keys.admin);
        assert_eq!(listed[0].secret, None);
        handle.shutdown().await;
        join.await.expect("session ends");
    }

    fn attach_for(body: &HelloBody) -> Attach {
        let (ours, _theirs) = tokio::io::duplex(1024);
        Attach {
            conn: ConnId(1),
            request: JoinRequest {
                replica: body.replica,
                name: body.name.clone(),
                role: body.role,
                resume_from: None,
                contacts: Default::default(),
                created: false,
                nonce: [0; NONCE_LEN],
                control: false,
                recover: None,
                cluster: Vec::new(),
            },
            stream: Box::new(ours),
            leftover: BytesMut::new(),
            guard: None,
        }
    }

    #[tokio::test]
    async fn an_island_closed_by_its_admin_is_not_created_again() {
        let cfg = DispatcherConfig {
            listen: "127.0.0.1:0".parse().expect("literal"),
            ..DispatcherConfig::default()
        };
        let d = Dispatcher::bind(cfg).await.expect("bind");
        let s = &d.shared;
        let admin = Capability::new_island();
        let part = admin.weaker().expect("participant");
        let mut body = hello(&part, &admin, &[0; NONCE_LEN]).body;
        body.create = Some(wire::CreateOptions::default());
        let id = body.session;
        assert!(
            s.route(&body, true, attach_for(&body), None, None).is_ok(),
            "created"
        );
        assert_eq!(d.session_count(), 1);

        // An expired session waits for an attach on its way, then goes and may come back.
        let retire = retire_from(Arc::downgrade(&s.registry), id, s.book.clone());
        assert!(!retire(Ending::Expired, &|| true));
        assert_eq!(d.session_count(), 1);
        // Closed by its admin: it goes whatever is pending, and is remembered.
        assert!(retire(Ending::Closed, &|| true));
        assert_eq!(d.session_count(), 0);
        for create in [true, false] {
            let mut b = body.clone();
            if !create {
                b.create = None;
            }
            let Err((_, code, reason)) = s.route(&b, true, attach_for(&b), None, None) else {
                panic!("a closed island was routed");
            };
            assert_eq!(code, Code::CLOSED, "{reason}");
        }
        // Another island is created as usual.
        let other = Capability::new_island();
        let mut b = hello(
            &other.weaker().expect("participant"),
            &other,
            &[0; NONCE_LEN],
        )
        .body;
        b.create = Some(wire::CreateOptions::default());
        assert!(s.route(&b, true, attach_for(&b), None, None).is_ok());
        d.shared.shutdown().await;
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("literal")
    }
}
