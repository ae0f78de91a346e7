//! The UPnP port mapping as an actor: [`start`] finds the gateway and maps the router's port,
//! then a task renews the lease at half its length, searches again when the gateway stops
//! answering, and removes the mapping on [`PortMapper::shutdown`]. The current external address
//! lives in a `watch`, so welcomes and beacons always hand out the live one.
//!
//! Every igd-next call is wrapped in our own timeout: its internal ones are not always honoured.

use igd_next::aio::tokio::{search_gateway, Tokio};
use igd_next::aio::Gateway;
use igd_next::{AddAnyPortError, AddPortError, PortMappingProtocol, SearchOptions};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

/// Lease asked for by default: finite, because some gateways refuse permanent (0) leases and a
/// finite one cleans itself up if the router dies without removing it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3600);
/// Time the SSDP search may take.
pub const DEFAULT_SEARCH_TIMEOUT: Duration = Duration::from_secs(3);
/// Time one SOAP call to the gateway may take.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Between attempts when the gateway is gone.
const RETRY: Duration = Duration::from_secs(10);

/// What to do when UPnP cannot give a usable mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Carry on reachable on the LAN only, with a warning.
    LanOnly,
    /// Refuse to start.
    Fail,
}

/// UPnP settings.
#[derive(Clone, Debug)]
pub struct UpnpConfig {
    /// Lease asked for.
    pub lease: Duration,
    /// External port wanted; the router's port when `None`.
    pub external_port: Option<u16>,
    /// The mapping's description on the gateway.
    pub description: String,
    /// What to do when mapping fails.
    pub fallback: Fallback,
    /// SSDP search time.
    pub search_timeout: Duration,
    /// Per-call time.
    pub call_timeout: Duration,
    /// The LAN address to search from and map to; found from the routing table when `None`.
    pub lan_ip: Option<Ipv4Addr>,
}

impl Default for UpnpConfig {
    fn default() -> Self {
        UpnpConfig {
            lease: DEFAULT_LEASE,
            external_port: None,
            description: "isthmus router".into(),
            fallback: Fallback::LanOnly,
            search_timeout: DEFAULT_SEARCH_TIMEOUT,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            lan_ip: None,
        }
    }
}

/// A mapping the gateway granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Where the Internet reaches the router.
    pub external: SocketAddr,
    /// The lease, or `None` when the gateway only grants permanent mappings.
    pub lease: Option<Duration>,
    /// The external address is on the Internet. When false (double NAT) only hosts on the
    /// gateway's outer network can use it.
    pub public: bool,
}

/// Why no usable mapping could be had. Each says what it means for remote users.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PortMapError {
    /// No UPnP gateway answered.
    #[error("no UPnP gateway answered on the LAN ({0}); remote users cannot reach this router unless a port is forwarded by hand (--forwarding manual)")]
    NoGateway(String),
    /// The gateway's external address is not on the Internet.
    #[error("the gateway's external address {0} is not a public Internet address (private or carrier-grade NAT): this is double NAT, and remote users will not reach this router through it")]
    DoubleNat(IpAddr),
    /// The gateway refused the mapping.
    #[error("the gateway refused to map the port ({0}); remote users cannot reach this router")]
    Refused(String),
    /// A call took too long.
    #[error("the gateway did not answer {0} in time")]
    Timeout(&'static str),
    /// Another failure talking to the gateway.
    #[error("talking to the gateway failed: {0}")]
    Gateway(String),
}

/// Whether remote users on the Internet could reach `ip`.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let cgnat = o[0] == 100 && (64..128).contains(&o[1]);
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || cgnat)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s & 0xfe00) == 0xfc00
                || (s & 0xffc0) == 0xfe80)
        }
    }
}

/// The LAN address the host would use towards the UPnP multicast group. Connecting a UDP
/// socket sends nothing; it only asks the routing table. A host with no route for multicast
/// falls back to its first up, non-loopback IPv4 interface.
pub fn lan_ip() -> Option<Ipv4Addr> {
    let routed = || {
        let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
        s.connect((Ipv4Addr::new(239, 255, 255, 250), 1900)).ok()?;
        match s.local_addr().ok()?.ip() {
            IpAddr::V4(v4) if !v4.is_unspecified() => Some(v4),
            _ => None,
        }
    };
    routed().or_else(|| {
        crate::contacts::local_addrs()
            .into_iter()
            .find_map(|a| match a.ip {
                IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_link_local() => Some(v4),
                _ => None,
            })
    })
}

/// A gateway call under our own time limit; the call's own error is left to the caller.
async fn timed<T>(limit: Duration, f: impl Future<Output = T>) -> Result<T, PortMapError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| PortMapError::Timeout("the mapping request"))
}

async fn within<T, E: std::fmt::Display>(
    limit: Duration,
    what: &'static str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, PortMapError> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(PortMapError::Gateway(format!("{what}: {e}"))),
        Err(_) => Err(PortMapError::Timeout(what)),
    }
}

enum Cmd {
    Shutdown(oneshot::Sender<()>),
}

/// The running mapper.
pub struct PortMapper {
    current: watch::Receiver<Option<Mapping>>,
    cmds: mpsc::Sender<Cmd>,
    task: tokio::task::JoinHandle<()>,
}

impl PortMapper {
    /// The mapping in force now (`None` while it is lost).
    pub fn current(&self) -> Option<Mapping> {
        self.current.borrow().clone()
    }

    /// Follows the mapping as it changes.
    pub fn watch(&self) -> watch::Receiver<Option<Mapping>> {
        self.current.clone()
    }

    /// Removes the mapping from the gateway and stops.
    pub async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }
}

struct Mapper {
    cfg: UpnpConfig,
    local: SocketAddr,
    gateway: Gateway<Tokio>,
    port: u16,
    lease_secs: u32,
}

impl Mapper {
    async fn find(cfg: &UpnpConfig, lan: Ipv4Addr) -> Result<Gateway<Tokio>, PortMapError> {
        let mut opts = SearchOptions::default();
        // SSDP from 0.0.0.0 leaves by the default route, which may not face the gateway.
        opts.bind_addr = SocketAddr::V4(SocketAddrV4::new(lan, 0));
        opts.timeout = Some(cfg.search_timeout);
        opts.single_search_timeout = Some(cfg.search_timeout);
        match tokio::time::timeout(
            cfg.search_timeout + Duration::from_secs(1),
            search_gateway(opts),
        )
        .await
        {
            Ok(Ok(g)) => Ok(g),
            Ok(Err(e)) => Err(PortMapError::NoGateway(e.to_string())),
            Err(_) => Err(PortMapError::NoGateway(format!(
                "no answer within {:?}",
                cfg.search_timeout
            ))),
        }
    }

    /// Maps the port, trying what gateways commonly insist on. Once a port is granted, asking
    /// again means renewing that same port: the external address handed out in postcards must
    /// not move at every renewal.
    async fn map(&mut self) -> Result<(), PortMapError> {
        let t = self.cfg.call_timeout;
        let desc = self.cfg.description.clone();
        let want = if self.port != 0 {
            self.port
        } else {
            self.cfg.external_port.unwrap_or(self.local.port())
        };
        let first = timed(
            t,
            self.gateway.add_port(
                PortMappingProtocol::TCP,
                want,
                self.local,
                self.lease_secs,
                &desc,
            ),
        )
        .await?;
        match first {
            Ok(()) => {
                self.port = want;
                Ok(())
            }
            Err(AddPortError::PortInUse) => {
                let any = timed(
                    t,
                    self.gateway.add_any_port(
                        PortMappingProtocol::TCP,
                        self.local,
                        self.lease_secs,
                        &desc,
                    ),
                )
                .await?;
                match any {
                    Ok(port) => {
                        self.port = port;
                        Ok(())
                    }
                    Err(AddAnyPortError::OnlyPermanentLeasesSupported) if self.lease_secs != 0 => {
                        self.lease_secs = 0;
                        Box::pin(self.map()).await
                    }
                    Err(e) => Err(PortMapError::Refused(e.to_string())),
                }
            }
            Err(AddPortError::SamePortValuesRequired) if want != self.local.port() => {
                self.port = self.local.port();
                Box::pin(self.map()).await
            }
            Err(AddPortError::OnlyPermanentLeasesSupported) if self.lease_secs != 0 => {
                // Remembered as permanent: it must be removed on shutdown, it will not expire.
                self.lease_secs = 0;
                Box::pin(self.map()).await
            }
            Err(e) => Err(PortMapError::Refused(e.to_string())),
        }
    }

    async fn external(&self) -> Result<IpAddr, PortMapError> {
        within(
            self.cfg.call_timeout,
            "the external address request",
            self.gateway.get_external_ip(),
        )
        .await
    }

    fn mapping(&self, ip: IpAddr) -> Mapping {
        Mapping {
            external: SocketAddr::new(ip, self.port),
            lease: (self.lease_secs != 0).then(|| Duration::from_secs(u64::from(self.lease_secs))),
            public: is_public(ip),
        }
    }

    async fn remove(&self) {
        let r = within(
            self.cfg.call_timeout,
            "the removal request",
            self.gateway
                .remove_port(PortMappingProtocol::TCP, self.port),
        )
        .await;
        match r {
            Ok(()) => info!(port = self.port, "UPnP mapping removed"),
            Err(e) => warn!(port = self.port, "could not remove the UPnP mapping: {e}"),
        }
    }
}

/// Finds the gateway and maps `local_port` on the LAN address.
///
/// When the gateway's own external address is not public (double NAT), that is said plainly:
/// Internet users will not reach the router. With the `fail` fallback nothing is mapped and this
/// is an error; with `lan-only` (best effort) a mapping the gateway grants is still kept and
/// published, as it serves hosts on the gateway's outer network (a campus, a lab, a larger home
/// network), which is strictly more than LAN-only.
pub async fn start(cfg: UpnpConfig, local_port: u16) -> Result<PortMapper, PortMapError> {
    let lan = cfg
        .lan_ip
        .or_else(lan_ip)
        .ok_or_else(|| PortMapError::NoGateway("this host has no LAN address".into()))?;
    let gateway = Mapper::find(&cfg, lan).await?;
    let lease_secs = cfg.lease.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
    let mut m = Mapper {
        local: SocketAddr::V4(SocketAddrV4::new(lan, local_port)),
        cfg,
        gateway,
        port: 0,
        lease_secs,
    };
    let ip = m.external().await?;
    if !is_public(ip) {
        if m.cfg.fallback == Fallback::Fail {
            return Err(PortMapError::DoubleNat(ip));
        }
        warn!(
            "{}; keeping the mapping for hosts on the gateway's outer network",
            PortMapError::DoubleNat(ip)
        );
    }
    m.map().await?;
    let mapping = m.mapping(ip);
    info!(
        external = %mapping.external,
        local = %m.local,
        gateway = %m.gateway.addr,
        "UPnP mapping granted ({})",
        lease_text(mapping.lease)
    );
    let (tx, rx) = watch::channel(Some(mapping));
    let (cmd_tx, cmd_rx) = mpsc::channel(1);
    let task = tokio::spawn(renew_loop(m, tx, cmd_rx, lan));
    Ok(PortMapper {
        current: rx,
        cmds: cmd_tx,
        task,
    })
}

/// How a lease reads in logs and the start-up summary.
pub fn lease_text(lease: Option<Duration>) -> String {
    match lease {
        Some(l) => format!(
            "lease {} s, renewed every {} s",
            l.as_secs(),
            (l / 2).as_secs().max(1)
        ),
        None => "permanent: the gateway grants no finite leases; removed on shutdown".into(),
    }
}

/// How a mapping reads in the start-up summary.
pub fn mapping_text(m: &Mapping) -> String {
    let mut text = format!("UPnP, {}", lease_text(m.lease));
    if !m.public {
        text.push_str(
            "; double NAT: not reachable from the Internet, only from the gateway's outer network",
        );
    }
    text
}

async fn renew_loop(
    mut m: Mapper,
    current: watch::Sender<Option<Mapping>>,
    mut cmds: mpsc::Receiver<Cmd>,
    lan: Ipv4Addr,
) {
    loop {
        let wait = if current.borrow().is_none() {
            RETRY
        } else if m.lease_secs == 0 {
            // Permanent: nothing to renew, but check now and then that it is still there.
            Duration::from_secs(300)
        } else {
            Duration::from_secs(u64::from(m.lease_secs)) / 2
        };
        tokio::select! {
            cmd = cmds.recv() => {
                if let Some(Cmd::Shutdown(done)) = cmd {
                    if current.borrow().is_some() {
                        m.remove().await;
                    }
                    let _ = done.send(());
                }
                return;
            }
            _ = tokio::time::sleep(wait) => {}
        }
        // Asking again with the same arguments renews the lease.
        let renewed = async {
            m.map().await?;
            m.external().await
        }
        .await;
        let renewed = match renewed {
            Ok(ip) => Ok(ip),
            Err(e) => {
                // The gateway may have rebooted onto another HTTP port: look for it again.
                warn!("UPnP renewal failed ({e}); searching for the gateway again");
                match Mapper::find(&m.cfg, lan).await {
                    Ok(g) => {
                        m.gateway = g;
                        async {
                            m.map().await?;
                            m.external().await
                        }
                        .await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match renewed {
            Ok(ip) if is_public(ip) || m.cfg.fallback == Fallback::LanOnly => {
                let mapping = m.mapping(ip);
                info!(external = %mapping.external, "UPnP mapping renewed ({})", lease_text(mapping.lease));
                current.send_replace(Some(mapping));
            }
            Ok(ip) => {
                warn!("{}", PortMapError::DoubleNat(ip));
                current.send_replace(None);
            }
            Err(e) => {
                warn!("UPnP mapping lost: {e}; remote users cannot reach this router until it comes back");
                current.send_replace(None);
            }
        }
    }
}
