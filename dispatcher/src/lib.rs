//! # isthmus-dispatcher
//!
//! Owns the one well-known TCP port: it accepts connections, reads the preamble and hello within
//! a handshake timeout, finds the session by its UUID (or creates it when the hello asks and the
//! router allows it), checks the join token, and hands the connection to that session's task.
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

pub mod contacts;
pub mod portmap;

use bytes::BytesMut;
use isthmus_contact::beacon::{Beacon, BeaconIsland};
use isthmus_router::driver::{spawn_session, Attach, DriverConfig, SessionHandle};
use isthmus_router::ids::{ConnId, SessionId};
use isthmus_router::session::JoinRequest;
use isthmus_router::wire::{
    self, Announce, ClientFrame, Code, DecodeError, Hello, JoinToken, ServerFrame, MAX_HELLO_BYTES,
    PREAMBLE_LEN,
};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The router's well-known port.
pub const DEFAULT_PORT: u16 = 7470;
/// Time a new connection has to send its preamble and hello (slow links included).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once, handshaking or attached; each costs two tasks and two buffers.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

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
    /// Ask the home router for a mapping with UPnP IGD.
    Upnp(portmap::UpnpConfig),
}

/// Where the external address comes from now.
enum External {
    None,
    Fixed(SocketAddr),
    Upnp(tokio::sync::watch::Receiver<Option<portmap::Mapping>>),
}

impl External {
    fn current(&self) -> Option<SocketAddr> {
        match self {
            External::None => None,
            External::Fixed(a) => Some(*a),
            External::Upnp(w) => w.borrow().as_ref().map(|m| m.external),
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
    /// Cap on open connections.
    pub max_connections: usize,
    /// Whether a hello may create an unknown session.
    pub allow_create: bool,
    /// How the router is reachable from outside.
    pub forwarding: Forwarding,
    /// Settings of every session.
    pub driver: DriverConfig,
    /// Announce islands on the LAN; `None` keeps the router silent.
    pub beacon: Option<BeaconConfig>,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            allow_create: true,
            forwarding: Forwarding::LanOnly,
            driver: DriverConfig::default(),
            beacon: None,
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
    /// UPnP forwarding failed and the profile says to stop rather than fall back.
    #[error("{0}; not starting, as the profile's UPnP fallback is \"fail\" (set it to \"lan-only\" to carry on without remote access)")]
    Forwarding(#[source] portmap::PortMapError),
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
    verifier: [u8; 32],
    join: Option<tokio::task::JoinHandle<()>>,
    announce: Option<Announce>,
}

type Registry = Arc<Mutex<HashMap<SessionId, Slot>>>;

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
    permits: Arc<Semaphore>,
}

impl Dispatcher {
    /// Binds the listening socket.
    pub async fn bind(cfg: DispatcherConfig) -> Result<Dispatcher, DispatchError> {
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| DispatchError::Bind {
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
            Forwarding::Upnp(up) => match portmap::start(up.clone(), local.port()).await {
                Ok(m) => {
                    let how = m
                        .current()
                        .map_or_else(|| "UPnP".to_string(), |x| portmap::mapping_text(&x));
                    (External::Upnp(m.watch()), Some(m), how)
                }
                Err(e) => match up.fallback {
                    portmap::Fallback::Fail => return Err(DispatchError::Forwarding(e)),
                    portmap::Fallback::LanOnly => {
                        warn!("{e}; continuing LAN-only");
                        (External::None, None, format!("LAN-only: UPnP failed: {e}"))
                    }
                },
            },
        };
        Ok(Dispatcher {
            listener,
            local,
            mapper,
            how,
            shared: Arc::new(Shared {
                permits: Arc::new(Semaphore::new(cfg.max_connections.max(1))),
                instance: uuid::Uuid::new_v4(),
                external,
                cfg,
                registry: Arc::new(Mutex::new(HashMap::new())),
                next_conn: AtomicU64::new(1),
            }),
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

    /// Sessions alive now.
    pub fn session_count(&self) -> usize {
        self.shared.registry.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Accepts connections until `shutdown` fires, then says goodbye to every replica.
    pub async fn run(self, shutdown: CancellationToken) {
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
            tokio::spawn(async move {
                if let Err(e) =
                    isthmus_contact::lan::broadcast(b.port, b.interval, announcement, cancel).await
                {
                    warn!("LAN beacon stopped: {e}; islands will not be found by broadcast");
                }
            });
        }
        let mut handshakes = JoinSet::new();
        let mut backoff = Duration::from_millis(5);
        loop {
            let permit = tokio::select! {
                p = self.shared.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = shutdown.cancelled() => break,
            };
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                _ = shutdown.cancelled() => break,
                Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    let _ = stream.set_nodelay(true);
                    let shared = self.shared.clone();
                    handshakes.spawn(async move {
                        shared.serve(stream, peer, Box::new(permit)).await;
                    });
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
        self.shared.shutdown().await;
        if let Some(m) = self.mapper {
            // A mapping left behind is a hole in the user's firewall: always remove it.
            m.shutdown().await;
        }
    }
}

impl Shared {
    async fn serve(&self, mut stream: TcpStream, peer: SocketAddr, guard: Box<dyn Send + Sync>) {
        let timeout = self.cfg.handshake_timeout;
        let mut greeted = false;
        let result = tokio::time::timeout(
            timeout,
            handshake(&mut stream, self.cfg.driver.max_frame_bytes, &mut greeted),
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
                    refuse(&mut stream, code, &e.to_string()).await;
                }
                return;
            }
        };
        let local = stream.local_addr().unwrap_or(self.cfg.listen);
        let contacts = contacts::contacts_for(
            self.cfg.listen,
            local,
            peer,
            &contacts::local_addrs(),
            self.external.current(),
            self.instance,
        );
        let conn = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let session = hello.session;
        let attach = Attach {
            conn,
            request: JoinRequest {
                replica: hello.replica,
                name: hello.name.clone(),
                role: hello.role,
                resume_from: hello.resume_from,
                contacts,
                created: false,
            },
            stream: Box::new(stream),
            leftover,
            guard: Some(guard),
        };
        if let Err((mut attach, code, reason)) = self.route(&hello, attach) {
            info!(%peer, %session, "refused: {code}: {reason}");
            let stream = &mut attach.stream;
            let frame = wire::encode(&ServerFrame::Refuse { code, reason });
            let _ = tokio::time::timeout(timeout, async {
                let _ = stream.write_all(&frame).await;
                let _ = stream.shutdown().await;
            })
            .await;
        } else {
            debug!(%peer, %session, ?conn, "attached");
        }
    }

    /// Finds or creates the session and hands it the connection, or says why not.
    #[allow(clippy::result_large_err)]
    fn route(&self, hello: &Hello, mut attach: Attach) -> Result<(), (Attach, Code, String)> {
        let offered = verifier(&hello.token);
        loop {
            let Ok(mut reg) = self.registry.lock() else {
                return Err((attach, Code::BUSY, "router state poisoned".into()));
            };
            match reg.get(&hello.session) {
                Some(slot) => {
                    if !bool::from(slot.verifier.ct_eq(&offered)) {
                        return Err((
                            attach,
                            Code::BAD_TOKEN,
                            "the join token does not match this island's; ask for a fresh postcard"
                                .into(),
                        ));
                    }
                    match slot.handle.attach(attach) {
                        Ok(()) => return Ok(()),
                        Err(back) => {
                            // The session ended between lookup and attach: forget it, try again.
                            attach = *back;
                            reg.remove(&hello.session);
                            continue;
                        }
                    }
                }
                None => {
                    let Some(opts) = &hello.create else {
                        return Err((
                            attach,
                            Code::UNKNOWN_SESSION,
                            format!(
                                "this router has no session {}; it may have ended or the router restarted",
                                hello.session
                            ),
                        ));
                    };
                    if !self.cfg.allow_create {
                        return Err((
                            attach,
                            Code::UNKNOWN_SESSION,
                            "this router does not create sessions".into(),
                        ));
                    }
                    if let Some(a) = &opts.announce {
                        if a.name.len() > isthmus_contact::MAX_ISLAND_NAME_BYTES {
                            return Err((
                                attach,
                                Code::PROTOCOL_VIOLATION,
                                format!(
                                    "island names are at most {} bytes",
                                    isthmus_contact::MAX_ISLAND_NAME_BYTES
                                ),
                            ));
                        }
                    }
                    let mut driver = self.cfg.driver.clone();
                    driver.session = driver.session.with_create_options(opts);
                    let registry = Arc::downgrade(&self.registry);
                    let id = hello.session;
                    let retire = Box::new(move |attach_pending: &dyn Fn() -> bool| {
                        let Some(registry) = registry.upgrade() else {
                            return true;
                        };
                        let Ok(mut reg) = registry.lock() else {
                            return true;
                        };
                        if attach_pending() {
                            return false;
                        }
                        reg.remove(&id);
                        true
                    });
                    let (handle, join) = spawn_session(id, driver, retire);
                    info!(session = %id, "session created");
                    attach.request.created = true;
                    if let Err(back) = handle.attach(attach) {
                        return Err((*back, Code::BUSY, "session failed to start".into()));
                    }
                    reg.insert(
                        id,
                        Slot {
                            handle,
                            verifier: offered,
                            join: Some(join),
                            announce: opts.announce.clone(),
                        },
                    );
                    return Ok(());
                }
            }
        }
    }

    async fn shutdown(&self) {
        let slots: Vec<Slot> = match self.registry.lock() {
            Ok(mut reg) => reg.drain().map(|(_, s)| s).collect(),
            Err(_) => Vec::new(),
        };
        info!(
            sessions = slots.len(),
            "shutting down: saying goodbye to every replica"
        );
        for slot in &slots {
            slot.handle.shutdown().await;
        }
        for mut slot in slots {
            if let Some(join) = slot.join.take() {
                let _ = join.await;
            }
        }
    }
}

/// The islands to put in the beacon now.
fn announced(registry: &Mutex<HashMap<SessionId, Slot>>) -> Vec<BeaconIsland> {
    let Ok(reg) = registry.lock() else {
        return Vec::new();
    };
    reg.iter()
        .filter_map(|(id, slot)| {
            slot.announce.as_ref().map(|a| BeaconIsland {
                session: *id,
                name: a.name.clone(),
                destination: a.destination,
                secret: a.secret,
            })
        })
        .collect()
}

/// Reads and checks the preamble, answers with ours, then reads the hello.
async fn handshake(
    stream: &mut TcpStream,
    max_frame: usize,
    greeted: &mut bool,
) -> Result<(Hello, BytesMut), HandshakeError> {
    let mut pre = [0u8; PREAMBLE_LEN];
    read_exact(stream, &mut pre).await?;
    if let Err(e) = wire::check_preamble(&pre) {
        if matches!(e, DecodeError::UnsupportedVersion { .. }) {
            // Our preamble tells an old or new peer which version we speak.
            stream.write_all(&wire::preamble()).await?;
            *greeted = true;
        }
        return Err(e.into());
    }
    stream.write_all(&wire::preamble()).await?;
    *greeted = true;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(frame) = wire::decode::<ClientFrame>(&mut buf, MAX_HELLO_BYTES.min(max_frame))?
        {
            return match frame {
                ClientFrame::Hello(h) => Ok((h, buf)),
                _ => Err(HandshakeError::NotHello),
            };
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(HandshakeError::Closed);
        }
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
    })
    .await;
}

/// What the router keeps of a join token: its hash, compared in constant time.
fn verifier(token: &JoinToken) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"isthmus join token verifier v1");
    h.update(token.0);
    h.finalize().into()
}
