//! The port mapping on the home gateway as an actor: [`start`] asks the gateway for a mapping of
//! the router's port with the protocols the config lists, in order (PCP, NAT-PMP, UPnP IGD for
//! `--forwarding auto`) and keeps the first that grants one; then a task renews the lease at half
//! its length, looks for the gateway again when it stops answering, and removes the mapping on
//! [`PortMapper::shutdown`]. The current external address lives in a `watch`, so welcomes and
//! beacons always hand out the live one.
//!
//! PCP and NAT-PMP are spoken by the `crab_nat` crate and UPnP by `igd-next`. Every call is
//! wrapped in our own timeout: the crates' internal ones are not always honoured, and RFC 6887
//! would have a PCP client retry for ever.

use crab_nat::{GatewayAddress, InternetProtocol, PortMappingOptions, TimeoutConfig};
use igd_next::aio::tokio::{search_gateway, Tokio};
use igd_next::aio::Gateway;
use igd_next::{AddAnyPortError, AddPortError, PortMappingProtocol, SearchOptions};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::num::NonZeroU16;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Lease asked for by default: finite, because some gateways refuse permanent (0) leases and a
/// finite one cleans itself up if the router dies without removing it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3600);
/// Time the SSDP search may take.
pub const DEFAULT_SEARCH_TIMEOUT: Duration = Duration::from_secs(3);
/// Time one call to the gateway may take (a SOAP call, or a PCP / NAT-PMP request with its
/// retransmissions).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Between attempts when the gateway is gone.
const RETRY: Duration = Duration::from_secs(10);
/// PCP and NAT-PMP send a request again after 250 ms, then 500 ms, 1 s, 2 s: a gateway that
/// speaks the protocol answers within milliseconds, and one that does not must not hold up the
/// next protocol in `auto` for long (RFC 6887 would retry for ever; RFC 6886 for 64 s).
const UDP_TIMEOUTS: TimeoutConfig = TimeoutConfig {
    initial_timeout: Duration::from_millis(250),
    max_retries: 3,
    max_retry_timeout: Some(Duration::from_secs(2)),
};

/// A protocol for asking the home gateway for a port mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Port Control Protocol (RFC 6887), NAT-PMP's successor.
    Pcp,
    /// NAT Port Mapping Protocol (RFC 6886).
    NatPmp,
    /// UPnP Internet Gateway Device.
    Upnp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Pcp => "PCP",
            Protocol::NatPmp => "NAT-PMP",
            Protocol::Upnp => "UPnP",
        })
    }
}

/// The order `--forwarding auto` tries: the newest protocol first, as RFC 6886 asks, and UPnP
/// last because its search alone takes seconds when nothing answers.
pub const AUTO: [Protocol; 3] = [Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp];

/// What to do when the gateway cannot give a usable mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Carry on reachable on the LAN only, with a warning.
    LanOnly,
    /// Refuse to start.
    Fail,
}

/// Port-mapping settings.
#[derive(Clone, Debug)]
pub struct MapConfig {
    /// The protocols to try, in order; the first that grants a mapping is kept.
    pub protocols: Vec<Protocol>,
    /// Lease asked for.
    pub lease: Duration,
    /// External port wanted; the router's port when `None`.
    pub external_port: Option<u16>,
    /// The mapping's description on the gateway (UPnP only: PCP and NAT-PMP carry none).
    pub description: String,
    /// What to do when mapping fails.
    pub fallback: Fallback,
    /// SSDP search time.
    pub search_timeout: Duration,
    /// Per-call time.
    pub call_timeout: Duration,
    /// The LAN address to search from and map to; found from the routing table when `None`.
    pub lan_ip: Option<Ipv4Addr>,
    /// The PCP / NAT-PMP server; the default route's gateway when `None`.
    pub gateway: Option<Ipv4Addr>,
    /// When PCP grants the IPv4 mapping, also open an IPv6 pinhole in the gateway's firewall for
    /// the router's global IPv6 address (set when the router listens on IPv6).
    pub pinhole_v6: bool,
    /// The global IPv6 address to open the pinhole for; the host's first when `None`.
    pub lan_ipv6: Option<Ipv6Addr>,
    /// Cancelled when the router is asked to stop (Ctrl-C, SIGTERM) while [`start`] is still
    /// asking the gateway: `auto` can take seconds when nothing answers, and a user who asks to
    /// stop must not wait for every protocol in turn. What was granted meanwhile is removed.
    pub cancel: Option<CancellationToken>,
}

impl Default for MapConfig {
    fn default() -> Self {
        MapConfig {
            protocols: vec![Protocol::Upnp],
            lease: DEFAULT_LEASE,
            external_port: None,
            description: "isthmus router".into(),
            fallback: Fallback::LanOnly,
            search_timeout: DEFAULT_SEARCH_TIMEOUT,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            lan_ip: None,
            gateway: None,
            pinhole_v6: false,
            lan_ipv6: None,
            cancel: None,
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
    /// The protocol that granted it.
    pub protocol: Protocol,
}

/// Why no usable mapping could be had. Each says what it means for remote users.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PortMapError {
    /// No gateway answered in this protocol.
    #[error("no {0} gateway answered on the LAN ({1}); remote users cannot reach this router unless a port is forwarded by hand (--forwarding manual)")]
    NoGateway(Protocol, String),
    /// The host has no IPv4 LAN address, so there is no gateway to ask (nothing was asked).
    #[error("this host has no IPv4 LAN address, so no gateway was asked for a port mapping; remote users cannot reach this router (connect the host to a network, or use --forwarding manual)")]
    NoLan,
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
    /// The router was asked to stop while the gateway was being asked; nothing stays mapped.
    #[error("stopped while asking the gateway for a port mapping")]
    Cancelled,
    /// Every protocol tried failed; each failure is listed.
    #[error("no protocol got a mapping from the gateway ({}); remote users cannot reach this router unless a port is forwarded by hand (--forwarding manual)", list_failures(.0))]
    AllFailed(Vec<(Protocol, PortMapError)>),
}

fn list_failures(fails: &[(Protocol, PortMapError)]) -> String {
    fails
        .iter()
        .map(|(p, e)| format!("{p}: {}", e.short()))
        .collect::<Vec<_>>()
        .join("; ")
}

impl PortMapError {
    /// The failure without the advice about remote users, for lists.
    fn short(&self) -> String {
        match self {
            PortMapError::NoGateway(_, why) => format!("no gateway answered ({why})"),
            PortMapError::Refused(why) => format!("refused ({why})"),
            other => other.to_string(),
        }
    }
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

/// The default route's IPv4 gateway: where PCP and NAT-PMP requests go (RFC 6886 section 3).
/// Read from the system's routing table by `netdev`, which knows Linux, the BSDs, macOS and
/// Windows.
pub fn default_gateway() -> Result<Ipv4Addr, String> {
    let dev = netdev::get_default_gateway()?;
    dev.ipv4
        .first()
        .copied()
        .ok_or_else(|| "the default route has no IPv4 gateway".to_string())
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

/// Waits for `f` unless the router is asked to stop first.
async fn unless_cancelled<T>(
    cfg: &MapConfig,
    f: impl Future<Output = Result<T, PortMapError>>,
) -> Result<T, PortMapError> {
    match &cfg.cancel {
        Some(c) => tokio::select! {
            r = f => r,
            _ = c.cancelled() => Err(PortMapError::Cancelled),
        },
        None => f.await,
    }
}

fn cancelled(cfg: &MapConfig) -> bool {
    cfg.cancel
        .as_ref()
        .is_some_and(CancellationToken::is_cancelled)
}

/// Retransmissions for a deletion after a request cut short: a gateway that speaks the
/// protocol answers within milliseconds, and a user who pressed Ctrl-C is waiting.
const FORGET_TIMEOUTS: TimeoutConfig = TimeoutConfig {
    initial_timeout: Duration::from_millis(250),
    max_retries: 1,
    max_retry_timeout: Some(Duration::from_millis(500)),
};

/// A fresh PCP nonce, chosen here rather than inside `crab_nat` so that a request cut short by
/// a shutdown can still be deleted: PCP deletes a mapping by the nonce that made it.
fn pcp_nonce() -> Option<crab_nat::pcp::Nonce> {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).ok()?;
    Some([0, 4, 8].map(|i| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])))
}

/// Deletes whatever a PCP or NAT-PMP request cut short by a shutdown may have been granted:
/// the request may have reached the gateway with its answer still on the way.
async fn forget(
    protocol: Protocol,
    gateway: GatewayAddress,
    local: SocketAddr,
    nonce: Option<crab_nat::pcp::Nonce>,
) {
    let Some(port) = NonZeroU16::new(local.port()) else {
        return;
    };
    // One round of retransmissions at most (0.75 s); the crates' own limit, no timer of ours.
    let r = match (protocol, nonce) {
        (Protocol::Pcp, Some(nonce)) => crab_nat::pcp::try_drop_mapping(
            gateway,
            local.ip(),
            nonce,
            crab_nat::pcp::DropMappingRange::Single {
                protocol: InternetProtocol::Tcp,
                internal_port: port,
            },
            Some(FORGET_TIMEOUTS),
        )
        .await
        .map_err(|e| e.to_string()),
        (Protocol::NatPmp, _) => crab_nat::natpmp::try_drop_mapping(
            gateway,
            InternetProtocol::Tcp,
            Some(port),
            Some(FORGET_TIMEOUTS),
        )
        .await
        .map_err(|e| e.to_string()),
        _ => return,
    };
    match r {
        Ok(()) => info!(
            port = port.get(),
            "{protocol} request cut short by the shutdown; any mapping it got is removed"
        ),
        Err(e) => info!(
            port = port.get(),
            "{protocol} request cut short by the shutdown; no removal confirmed ({e})"
        ),
    }
}

enum Cmd {
    Shutdown(oneshot::Sender<()>),
}

/// One mapping's actor: its live state and the way to stop it.
struct Actor {
    current: watch::Receiver<Option<Mapping>>,
    cmds: mpsc::Sender<Cmd>,
    task: tokio::task::JoinHandle<()>,
}

impl Actor {
    async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }
}

/// The running mapper: the IPv4 port mapping, and the IPv6 pinhole when PCP opened one.
pub struct PortMapper {
    v4: Actor,
    pinhole: Option<Actor>,
}

impl PortMapper {
    /// The mapping in force now (`None` while it is lost).
    pub fn current(&self) -> Option<Mapping> {
        self.v4.current.borrow().clone()
    }

    /// Follows the mapping as it changes.
    pub fn watch(&self) -> watch::Receiver<Option<Mapping>> {
        self.v4.current.clone()
    }

    /// The IPv6 pinhole in force now, if one was opened and is not lost.
    pub fn pinhole(&self) -> Option<Mapping> {
        self.pinhole.as_ref()?.current.borrow().clone()
    }

    /// How the mapping (and the pinhole) read in the start-up summary.
    pub fn describe(&self) -> String {
        let mut text = self
            .current()
            .map_or_else(|| "mapping lost".to_string(), |m| mapping_text(&m));
        if let Some(p) = self.pinhole() {
            text.push_str(&format!(
                "; IPv6 pinhole {} ({}, {})",
                p.external,
                p.protocol,
                lease_text(p.lease)
            ));
        }
        text
    }

    /// Removes the mapping (and the pinhole) from the gateway and stops. Both removals go at
    /// once: a gateway that has gone away costs one call timeout at exit, not two.
    pub async fn shutdown(self) {
        let pinhole = async {
            if let Some(p) = self.pinhole {
                p.shutdown().await;
            }
        };
        tokio::join!(pinhole, self.v4.shutdown());
    }
}

/// The protocol-specific half of a mapping.
enum Backend {
    Upnp(Upnp),
    /// PCP or NAT-PMP, both through `crab_nat`.
    Pmp(Pmp),
}

struct Upnp {
    gateway: Gateway<Tokio>,
    port: u16,
    lease_secs: u32,
}

struct Pmp {
    gateway: GatewayAddress,
    mapping: crab_nat::PortMapping,
}

struct Mapper {
    cfg: MapConfig,
    local: SocketAddr,
    protocol: Protocol,
    backend: Backend,
    /// "mapping", or "IPv6 pinhole", for the log.
    kind: &'static str,
}

async fn find_upnp(cfg: &MapConfig, lan: Ipv4Addr) -> Result<Gateway<Tokio>, PortMapError> {
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
        Ok(Err(e)) => Err(PortMapError::NoGateway(Protocol::Upnp, e.to_string())),
        Err(_) => Err(PortMapError::NoGateway(
            Protocol::Upnp,
            format!("no answer within {:?}", cfg.search_timeout),
        )),
    }
}

fn pmp_gateway(cfg: &MapConfig, protocol: Protocol) -> Result<Ipv4Addr, PortMapError> {
    match cfg.gateway {
        Some(g) => Ok(g),
        None => default_gateway().map_err(|e| {
            PortMapError::NoGateway(protocol, format!("no default gateway to ask: {e}"))
        }),
    }
}

/// The default route's IPv6 gateway, with its interface's scope when it is link-local (as
/// routers advertise themselves).
pub fn default_gateway_v6() -> Result<GatewayAddress, String> {
    let iface = netdev::get_default_interface()?;
    let gw = iface
        .gateway
        .as_ref()
        .and_then(|g| g.ipv6.first().copied())
        .ok_or_else(|| "the default route has no IPv6 gateway".to_string())?;
    let link_local = (gw.segments()[0] & 0xffc0) == 0xfe80;
    Ok(GatewayAddress::IpV6(gw, link_local.then_some(iface.index)))
}

/// The host's first global IPv6 address: the one a pinhole opens, as IPv6 needs no NAT.
pub fn global_ipv6() -> Option<Ipv6Addr> {
    crate::contacts::local_addrs()
        .into_iter()
        .find_map(|a| match a.ip {
            IpAddr::V6(v6) if is_public(IpAddr::V6(v6)) => Some(v6),
            _ => None,
        })
}

fn gateway_text(g: GatewayAddress) -> String {
    match g {
        GatewayAddress::IpV4(a) => format!("{a}:{}", crab_nat::GATEWAY_PORT),
        GatewayAddress::IpV6(a, Some(scope)) => format!("[{a}%{scope}]:{}", crab_nat::GATEWAY_PORT),
        GatewayAddress::IpV6(a, None) => format!("[{a}]:{}", crab_nat::GATEWAY_PORT),
    }
}

/// PCP and NAT-PMP map the address a request comes from (PCP without its third-party option,
/// which gateways rarely allow). A router listening on another of the host's addresses would get
/// a mapping to the wrong place: say so instead.
fn check_source(protocol: Protocol, gateway: Ipv4Addr, lan: Ipv4Addr) -> Result<(), PortMapError> {
    // Connecting a UDP socket sends nothing; it asks the routing table for the source address.
    let source = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| {
            s.connect((gateway, crab_nat::GATEWAY_PORT))?;
            s.local_addr()
        })
        .map_err(|e| PortMapError::NoGateway(protocol, format!("no route to {gateway}: {e}")))?;
    match source.ip() {
        IpAddr::V4(src) if src == lan => Ok(()),
        src => Err(PortMapError::Refused(format!(
            "{protocol} maps the address a request comes from, {src}, not {lan} where this router listens; listen on {src} (or on all addresses), or use UPnP"
        ))),
    }
}

/// What a PCP or NAT-PMP failure means here. A gateway that does not speak the protocol at all
/// (nothing on UDP 5351, or "unsupported version") is "no gateway" for it, so `auto` moves on.
fn pmp_error(protocol: Protocol, e: crab_nat::MappingFailure) -> PortMapError {
    use crab_nat::{natpmp, pcp, MappingFailure as F};
    match e {
        F::Pcp(pcp::Failure::Socket(e)) | F::NatPmp(natpmp::Failure::Socket(e)) => {
            PortMapError::NoGateway(protocol, format!("UDP port 5351: {e}"))
        }
        F::Pcp(pcp::Failure::Timeout) | F::NatPmp(natpmp::Failure::Timeout) => {
            PortMapError::NoGateway(protocol, "no answer on UDP port 5351".into())
        }
        F::Pcp(pcp::Failure::UnsupportedVersion(v)) => PortMapError::NoGateway(
            protocol,
            format!("the gateway does not speak PCP (it answered as {v})"),
        ),
        F::NatPmp(natpmp::Failure::UnsupportedVersion(v)) => PortMapError::NoGateway(
            protocol,
            format!("the gateway does not speak NAT-PMP (it answered as {v})"),
        ),
        F::Pcp(e @ pcp::Failure::InvalidResponse(_)) => PortMapError::Gateway(format!("PCP: {e}")),
        F::NatPmp(e @ natpmp::Failure::InvalidResponse(_)) => {
            PortMapError::Gateway(format!("NAT-PMP: {e}"))
        }
        F::Pcp(e) => PortMapError::Refused(format!("PCP: {e}")),
        F::NatPmp(e) => PortMapError::Refused(format!("NAT-PMP: {e}")),
    }
}

impl Mapper {
    /// Asks the gateway for a mapping in `protocol`.
    async fn open(
        cfg: &MapConfig,
        protocol: Protocol,
        local: SocketAddrV4,
    ) -> Result<Mapper, PortMapError> {
        let backend = match protocol {
            Protocol::Upnp => {
                // Searching changes nothing on the gateway: a shutdown may cut it short.
                let gateway = unless_cancelled(cfg, find_upnp(cfg, *local.ip())).await?;
                Backend::Upnp(Upnp {
                    gateway,
                    port: 0,
                    lease_secs: cfg.lease.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
                })
            }
            Protocol::Pcp | Protocol::NatPmp => {
                let gateway = pmp_gateway(cfg, protocol)?;
                check_source(protocol, gateway, *local.ip())?;
                let want = cfg.external_port.unwrap_or(local.port());
                let gateway = GatewayAddress::IpV4(gateway);
                let nonce = if protocol == Protocol::Pcp {
                    pcp_nonce()
                } else {
                    None
                };
                let asked =
                    Self::pmp_map(cfg, protocol, gateway, SocketAddr::V4(local), want, nonce);
                let mapping = match unless_cancelled(cfg, asked).await {
                    Err(PortMapError::Cancelled) => {
                        forget(protocol, gateway, SocketAddr::V4(local), nonce).await;
                        return Err(PortMapError::Cancelled);
                    }
                    r => r?,
                };
                Backend::Pmp(Pmp { gateway, mapping })
            }
        };
        Ok(Mapper {
            cfg: cfg.clone(),
            local: SocketAddr::V4(local),
            protocol,
            backend,
            kind: "mapping",
        })
    }

    /// Asks the gateway by PCP to open its IPv6 firewall for `local` (a pinhole: IPv6 has no
    /// NAT, so the address stays the router's own).
    async fn open_pinhole(cfg: &MapConfig, local: SocketAddrV6) -> Result<Mapper, PortMapError> {
        let gateway = default_gateway_v6().map_err(|e| {
            PortMapError::NoGateway(Protocol::Pcp, format!("no IPv6 gateway to ask: {e}"))
        })?;
        let mapping = Self::pmp_map(
            cfg,
            Protocol::Pcp,
            gateway,
            SocketAddr::V6(local),
            local.port(),
            None,
        )
        .await?;
        Ok(Mapper {
            cfg: cfg.clone(),
            local: SocketAddr::V6(local),
            protocol: Protocol::Pcp,
            backend: Backend::Pmp(Pmp { gateway, mapping }),
            kind: "IPv6 pinhole",
        })
    }

    async fn pmp_map(
        cfg: &MapConfig,
        protocol: Protocol,
        gw: GatewayAddress,
        local: SocketAddr,
        want: u16,
        nonce: Option<crab_nat::pcp::Nonce>,
    ) -> Result<crab_nat::PortMapping, PortMapError> {
        let internal = NonZeroU16::new(local.port())
            .ok_or_else(|| PortMapError::Refused("the router listens on port 0".into()))?;
        let opts = PortMappingOptions {
            // A suggestion: a gateway with that port taken grants another, which is read back.
            external_port: NonZeroU16::new(want),
            lifetime_seconds: Some(cfg.lease.as_secs().clamp(1, u64::from(u32::MAX)) as u32),
            timeout_config: Some(UDP_TIMEOUTS),
        };
        let r = match protocol {
            Protocol::Pcp => timed(
                cfg.call_timeout,
                crab_nat::pcp::port_mapping(
                    crab_nat::pcp::BaseMapRequest::new(
                        gw,
                        local.ip(),
                        InternetProtocol::Tcp,
                        internal,
                    ),
                    nonce,
                    None,
                    opts,
                ),
            )
            .await?
            .map_err(crab_nat::MappingFailure::from),
            _ => timed(
                cfg.call_timeout,
                crab_nat::natpmp::port_mapping(gw, InternetProtocol::Tcp, internal, opts),
            )
            .await?
            .map_err(crab_nat::MappingFailure::from),
        };
        r.map_err(|e| pmp_error(protocol, e))
    }

    /// Maps the port, trying what gateways commonly insist on. Once a port is granted, asking
    /// again means renewing that same port: the external address handed out in postcards must
    /// not move at every renewal.
    async fn map_upnp(&mut self) -> Result<(), PortMapError> {
        let Backend::Upnp(u) = &mut self.backend else {
            return Ok(());
        };
        let t = self.cfg.call_timeout;
        let desc = self.cfg.description.clone();
        let local = self.local;
        let want = if u.port != 0 {
            u.port
        } else {
            self.cfg.external_port.unwrap_or(self.local.port())
        };
        let first = timed(
            t,
            u.gateway
                .add_port(PortMappingProtocol::TCP, want, local, u.lease_secs, &desc),
        )
        .await?;
        match first {
            Ok(()) => {
                u.port = want;
                Ok(())
            }
            Err(AddPortError::PortInUse) => {
                let any = timed(
                    t,
                    u.gateway
                        .add_any_port(PortMappingProtocol::TCP, local, u.lease_secs, &desc),
                )
                .await?;
                match any {
                    Ok(port) => {
                        u.port = port;
                        Ok(())
                    }
                    Err(AddAnyPortError::OnlyPermanentLeasesSupported) if u.lease_secs != 0 => {
                        u.lease_secs = 0;
                        Box::pin(self.map_upnp()).await
                    }
                    Err(e) => Err(PortMapError::Refused(e.to_string())),
                }
            }
            Err(AddPortError::SamePortValuesRequired) if want != self.local.port() => {
                u.port = self.local.port();
                Box::pin(self.map_upnp()).await
            }
            Err(AddPortError::OnlyPermanentLeasesSupported) if u.lease_secs != 0 => {
                // Remembered as permanent: it must be removed on shutdown, it will not expire.
                u.lease_secs = 0;
                Box::pin(self.map_upnp()).await
            }
            Err(e) => Err(PortMapError::Refused(e.to_string())),
        }
    }

    /// The gateway's own external address.
    async fn external(&self) -> Result<IpAddr, PortMapError> {
        match &self.backend {
            Backend::Upnp(u) => {
                within(
                    self.cfg.call_timeout,
                    "the external address request",
                    u.gateway.get_external_ip(),
                )
                .await
            }
            Backend::Pmp(p) => match p.mapping.mapping_type() {
                // A pinhole keeps the router's own address, whatever the gateway echoes.
                crab_nat::PortMappingType::Pcp { .. } if self.local.is_ipv6() => {
                    Ok(self.local.ip())
                }
                // A PCP grant carries the external address.
                crab_nat::PortMappingType::Pcp { external_ip, .. } => Ok(external_ip),
                crab_nat::PortMappingType::NatPmp => within(
                    self.cfg.call_timeout,
                    "the external address request",
                    crab_nat::natpmp::external_address(p.gateway, Some(UDP_TIMEOUTS)),
                )
                .await
                .map(IpAddr::V4),
            },
        }
    }

    /// Asks again with the same arguments, which renews the lease on the same external port.
    async fn renew(&mut self) -> Result<IpAddr, PortMapError> {
        match &mut self.backend {
            Backend::Upnp(_) => self.map_upnp().await?,
            Backend::Pmp(p) => {
                timed(self.cfg.call_timeout, p.mapping.renew())
                    .await?
                    .map_err(|e| pmp_error(self.protocol, e))?;
            }
        }
        self.external().await
    }

    /// After a failed renewal: the gateway may have rebooted (onto another HTTP port, for
    /// UPnP, or with its PCP state lost): find it again and map the same external port.
    async fn reopen(&mut self) -> Result<IpAddr, PortMapError> {
        match &mut self.backend {
            Backend::Upnp(u) => {
                let IpAddr::V4(lan) = self.local.ip() else {
                    return Err(PortMapError::Gateway("UPnP maps IPv4 only".into()));
                };
                u.gateway = find_upnp(&self.cfg, lan).await?;
                self.map_upnp().await?;
            }
            Backend::Pmp(p) => {
                let gateway = if self.local.is_ipv6() {
                    default_gateway_v6().map_err(|e| {
                        PortMapError::NoGateway(self.protocol, format!("no IPv6 gateway: {e}"))
                    })?
                } else {
                    GatewayAddress::IpV4(pmp_gateway(&self.cfg, self.protocol)?)
                };
                let want = p.mapping.external_port().get();
                p.mapping =
                    Self::pmp_map(&self.cfg, self.protocol, gateway, self.local, want, None)
                        .await?;
                p.gateway = gateway;
            }
        }
        self.external().await
    }

    fn lease_secs(&self) -> u32 {
        match &self.backend {
            Backend::Upnp(u) => u.lease_secs,
            // The gateway may grant less than asked (or more); renewals follow what it granted.
            Backend::Pmp(p) => p.mapping.lifetime().max(1),
        }
    }

    fn port(&self) -> u16 {
        match &self.backend {
            Backend::Upnp(u) => u.port,
            Backend::Pmp(p) => p.mapping.external_port().get(),
        }
    }

    fn gateway_text(&self) -> String {
        match &self.backend {
            Backend::Upnp(u) => u.gateway.addr.to_string(),
            Backend::Pmp(p) => gateway_text(p.gateway),
        }
    }

    fn mapping(&self, ip: IpAddr) -> Mapping {
        let lease = self.lease_secs();
        Mapping {
            external: SocketAddr::new(ip, self.port()),
            lease: (lease != 0).then(|| Duration::from_secs(u64::from(lease))),
            public: is_public(ip),
            protocol: self.protocol,
        }
    }

    async fn remove(self) {
        let protocol = self.protocol;
        let kind = self.kind;
        let port = self.port();
        let r = match self.backend {
            Backend::Upnp(u) => {
                within(
                    self.cfg.call_timeout,
                    "the removal request",
                    u.gateway.remove_port(PortMappingProtocol::TCP, u.port),
                )
                .await
            }
            Backend::Pmp(p) => match timed(self.cfg.call_timeout, p.mapping.try_drop()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err((e, _))) => Err(PortMapError::Gateway(format!("the removal request: {e}"))),
                Err(e) => Err(e),
            },
        };
        match r {
            Ok(()) => info!(port, "{protocol} {kind} removed"),
            Err(e) => warn!(port, "could not remove the {protocol} {kind}: {e}"),
        }
    }
}

/// Asks the gateway for a mapping of `local_port` on the LAN address, with each protocol of the
/// config in turn, and keeps the first that grants one.
///
/// When the gateway's own external address is not public (double NAT), that is said plainly:
/// Internet users will not reach the router. With the `fail` fallback nothing is mapped and this
/// is an error; with `lan-only` (best effort) a mapping the gateway grants is still kept and
/// published, as it serves hosts on the gateway's outer network (a campus, a lab, a larger home
/// network), which is strictly more than LAN-only.
pub async fn start(cfg: MapConfig, local_port: u16) -> Result<PortMapper, PortMapError> {
    let lan = cfg.lan_ip.or_else(lan_ip).ok_or(PortMapError::NoLan)?;
    let local = SocketAddrV4::new(lan, local_port);
    // Said before the wait, which is seconds per protocol when nothing answers.
    let names: Vec<String> = cfg.protocols.iter().map(ToString::to_string).collect();
    info!(
        "asking the gateway for a port mapping ({}); Ctrl-C stops this",
        names.join(", then ")
    );
    let mut failures: Vec<(Protocol, PortMapError)> = Vec::new();
    for &protocol in &cfg.protocols {
        if cancelled(&cfg) {
            return Err(PortMapError::Cancelled);
        }
        match open(&cfg, protocol, local).await {
            Ok((m, ip)) => {
                if !failures.is_empty() {
                    let names: Vec<String> = failures.iter().map(|(p, _)| p.to_string()).collect();
                    info!(
                        "{} got no mapping ({}); {protocol} granted it",
                        names.join(" and "),
                        list_failures(&failures)
                    );
                }
                let pinhole = if protocol == Protocol::Pcp && cfg.pinhole_v6 {
                    pinhole(&cfg, local_port).await
                } else {
                    None
                };
                let mapper = PortMapper {
                    v4: spawn(m, ip),
                    pinhole,
                };
                // Asked to stop while the gateway was granting: take it all back.
                if cancelled(&cfg) {
                    mapper.shutdown().await;
                    return Err(PortMapError::Cancelled);
                }
                return Ok(mapper);
            }
            Err(PortMapError::Cancelled) => return Err(PortMapError::Cancelled),
            // Double NAT is a fact about the network, not about one protocol: another protocol
            // would meet the same outer NAT.
            Err(e @ PortMapError::DoubleNat(_)) => return Err(e),
            Err(e) => failures.push((protocol, e)),
        }
    }
    Err(if failures.len() == 1 {
        failures.remove(0).1
    } else {
        PortMapError::AllFailed(failures)
    })
}

/// One protocol's attempt: the mapping and the external address, or why not.
async fn open(
    cfg: &MapConfig,
    protocol: Protocol,
    local: SocketAddrV4,
) -> Result<(Mapper, IpAddr), PortMapError> {
    // UPnP asks for the external address before mapping, so a double-NAT gateway with the
    // `fail` fallback is never left holding a mapping. PCP and NAT-PMP map first (PCP tells the
    // external address in the grant itself), and such a mapping is removed again at once.
    let mut m = Mapper::open(cfg, protocol, local).await?;
    let mapped = !matches!(m.backend, Backend::Upnp(_));
    let ip = match m.external().await {
        Ok(ip) => ip,
        Err(e) => {
            if mapped {
                m.remove().await;
            }
            return Err(e);
        }
    };
    if !is_public(ip) {
        if cfg.fallback == Fallback::Fail {
            if mapped {
                m.remove().await;
            }
            return Err(PortMapError::DoubleNat(ip));
        }
        warn!(
            "{}; keeping the mapping for hosts on the gateway's outer network",
            PortMapError::DoubleNat(ip)
        );
    }
    if !mapped {
        if cancelled(cfg) {
            return Err(PortMapError::Cancelled);
        }
        m.map_upnp().await?;
    }
    Ok((m, ip))
}

/// The IPv6 pinhole beside a PCP mapping, or `None` (said in the log) when the host has no
/// global IPv6 address or the gateway does not open one.
async fn pinhole(cfg: &MapConfig, port: u16) -> Option<Actor> {
    let Some(addr) = cfg.lan_ipv6.or_else(global_ipv6) else {
        info!("no IPv6 pinhole: this host has no global IPv6 address");
        return None;
    };
    match Mapper::open_pinhole(cfg, SocketAddrV6::new(addr, port, 0, 0)).await {
        Ok(m) => {
            let ip = m.local.ip();
            Some(spawn(m, ip))
        }
        Err(e) => {
            warn!(
                "no IPv6 pinhole for [{addr}]:{port}: {}; IPv6 users outside cannot reach this router",
                e.short()
            );
            None
        }
    }
}

fn spawn(m: Mapper, ip: IpAddr) -> Actor {
    let mapping = m.mapping(ip);
    info!(
        external = %mapping.external,
        local = %m.local,
        gateway = %m.gateway_text(),
        "{} {} granted ({})",
        m.protocol,
        m.kind,
        lease_text(mapping.lease)
    );
    let (tx, rx) = watch::channel(Some(mapping));
    let (cmd_tx, cmd_rx) = mpsc::channel(1);
    let task = tokio::spawn(renew_loop(m, tx, cmd_rx));
    Actor {
        current: rx,
        cmds: cmd_tx,
        task,
    }
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
    let mut text = format!("{}, {}", m.protocol, lease_text(m.lease));
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
) {
    loop {
        let wait = if current.borrow().is_none() {
            RETRY
        } else if m.lease_secs() == 0 {
            // Permanent: nothing to renew, but check now and then that it is still there.
            Duration::from_secs(300)
        } else {
            Duration::from_secs(u64::from(m.lease_secs())) / 2
        };
        tokio::select! {
            cmd = cmds.recv() => return stop(m, &current, cmd).await,
            _ = tokio::time::sleep(wait) => {}
        }
        // A renewal (with a search for a lost gateway) can take seconds: a shutdown asked
        // meanwhile cuts it short instead of waiting for it.
        let outcome = {
            let renewal = renew_or_find(&mut m);
            tokio::select! {
                renewed = renewal => Ok(renewed),
                cmd = cmds.recv() => Err(cmd),
            }
        };
        match outcome {
            Ok(renewed) => settle(&m, &current, renewed),
            Err(cmd) => return stop(m, &current, cmd).await,
        }
    }
}

async fn renew_or_find(m: &mut Mapper) -> Result<IpAddr, PortMapError> {
    match m.renew().await {
        Ok(ip) => Ok(ip),
        Err(e) => {
            warn!(
                "{} {} renewal failed ({e}); searching for the gateway again",
                m.protocol, m.kind
            );
            m.reopen().await
        }
    }
}

/// Removes the mapping, if it is in force, on a shutdown; a dropped handle just stops.
async fn stop(m: Mapper, current: &watch::Sender<Option<Mapping>>, cmd: Option<Cmd>) {
    if let Some(Cmd::Shutdown(done)) = cmd {
        if current.borrow().is_some() {
            m.remove().await;
        }
        let _ = done.send(());
    }
}

/// Publishes what a renewal found.
fn settle(
    m: &Mapper,
    current: &watch::Sender<Option<Mapping>>,
    renewed: Result<IpAddr, PortMapError>,
) {
    let (protocol, kind) = (m.protocol, m.kind);
    match renewed {
        Ok(ip) if is_public(ip) || m.cfg.fallback == Fallback::LanOnly => {
            let mapping = m.mapping(ip);
            info!(
                external = %mapping.external,
                "{protocol} {kind} renewed ({})",
                lease_text(mapping.lease)
            );
            current.send_replace(Some(mapping));
        }
        Ok(ip) => {
            warn!("{}", PortMapError::DoubleNat(ip));
            current.send_replace(None);
        }
        Err(e) => {
            warn!("{protocol} {kind} lost: {e}; remote users cannot reach this router until it comes back");
            current.send_replace(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_tries_pcp_then_natpmp_then_upnp_and_names_them_as_users_know_them() {
        assert_eq!(AUTO, [Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp]);
        let names: Vec<String> = AUTO.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["PCP", "NAT-PMP", "UPnP"]);
    }

    #[test]
    fn when_every_protocol_fails_each_reason_is_listed_once_with_the_advice_once() {
        let e = PortMapError::AllFailed(vec![
            (
                Protocol::Pcp,
                PortMapError::NoGateway(Protocol::Pcp, "no answer on UDP port 5351".into()),
            ),
            (
                Protocol::NatPmp,
                PortMapError::Refused("NAT-PMP: not authorized".into()),
            ),
            (Protocol::Upnp, PortMapError::Timeout("the mapping request")),
        ]);
        let text = e.to_string();
        assert!(
            text.starts_with("no protocol got a mapping from the gateway (PCP: no gateway answered (no answer on UDP port 5351); NAT-PMP: refused (NAT-PMP: not authorized); UPnP: the gateway did not answer the mapping request in time)"),
            "{text}"
        );
        assert_eq!(
            text.matches("remote users cannot reach").count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn a_gateway_without_the_protocol_is_no_gateway_and_a_refusal_is_a_refusal() {
        use crab_nat::{natpmp, pcp, MappingFailure as F, VersionCode};
        let no = pmp_error(
            Protocol::Pcp,
            F::Pcp(pcp::Failure::UnsupportedVersion(VersionCode::NatPmp)),
        );
        assert!(
            matches!(no, PortMapError::NoGateway(Protocol::Pcp, ref why) if why.contains("does not speak PCP")),
            "{no}"
        );
        let quiet = pmp_error(Protocol::NatPmp, F::NatPmp(natpmp::Failure::Timeout));
        assert!(
            matches!(quiet, PortMapError::NoGateway(Protocol::NatPmp, _)),
            "{quiet}"
        );
        let refused = pmp_error(Protocol::Pcp, F::Pcp(pcp::Failure::NotAuthorized(0)));
        assert!(matches!(refused, PortMapError::Refused(_)), "{refused}");
    }

    /// A PCP "gateway" on loopback that never answers, as on a network where nothing speaks
    /// PCP and nothing says so; a loopback address of its own so parallel runs do not meet.
    async fn silent_gateway(host: u8) -> (tokio::net::UdpSocket, Ipv4Addr) {
        let ip = Ipv4Addr::new(127, 77, (std::process::id() % 250) as u8 + 1, host);
        let s = tokio::net::UdpSocket::bind((ip, crab_nat::GATEWAY_PORT))
            .await
            .expect("bind the silent gateway");
        (s, ip)
    }

    #[tokio::test]
    async fn a_shutdown_during_a_pcp_request_stops_it_and_deletes_what_it_may_have_got() {
        let (gw, gw_ip) = silent_gateway(1).await;
        let cancel = CancellationToken::new();
        let cfg = MapConfig {
            protocols: vec![Protocol::Pcp, Protocol::NatPmp],
            lan_ip: Some(Ipv4Addr::LOCALHOST),
            gateway: Some(gw_ip),
            cancel: Some(cancel.clone()),
            ..MapConfig::default()
        };
        let run = tokio::spawn(start(cfg, 7470));
        // The MAP request: lifetime at bytes 4..8, the nonce at 24..36 (RFC 6887 11.1).
        let mut buf = [0u8; 1100];
        let (n, _) = gw.recv_from(&mut buf).await.expect("the map request");
        assert!(n >= 36 && buf[1] == 1, "a PCP MAP request: {:?}", &buf[..n]);
        assert_ne!(buf[4..8], [0, 0, 0, 0], "asks for a lease");
        let nonce = buf[24..36].to_vec();
        cancel.cancel();
        let r = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("start returns once cancelled")
            .expect("no panic");
        assert!(matches!(r, Err(PortMapError::Cancelled)), "{:?}", r.err());
        // Among what reached the gateway: a deletion (lifetime 0) with the request's nonce,
        // and NAT-PMP was never asked.
        let mut deleted = false;
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(100), gw.recv_from(&mut buf)).await
        {
            assert_eq!(buf[0], 2, "only PCP was asked: {:?}", &buf[..n]);
            deleted |= n >= 36 && buf[4..8] == [0, 0, 0, 0] && buf[24..36] == nonce[..];
        }
        assert!(deleted, "a deletion with the request's nonce was sent");
    }

    #[tokio::test]
    async fn a_shutdown_before_the_first_request_asks_nothing() {
        let (gw, gw_ip) = silent_gateway(2).await;
        let cancel = CancellationToken::new();
        cancel.cancel();
        let cfg = MapConfig {
            protocols: vec![Protocol::Pcp],
            lan_ip: Some(Ipv4Addr::LOCALHOST),
            gateway: Some(gw_ip),
            cancel: Some(cancel),
            ..MapConfig::default()
        };
        assert!(matches!(
            start(cfg, 7470).await,
            Err(PortMapError::Cancelled)
        ));
        let mut buf = [0u8; 64];
        assert!(gw.try_recv_from(&mut buf).is_err(), "nothing was sent");
    }

    #[test]
    fn the_summary_names_the_protocol_the_lease_and_double_nat() {
        let m = Mapping {
            external: "203.0.113.1:7470".parse().expect("addr"),
            lease: Some(Duration::from_secs(4)),
            public: true,
            protocol: Protocol::NatPmp,
        };
        assert_eq!(mapping_text(&m), "NAT-PMP, lease 4 s, renewed every 2 s");
        let inner = Mapping { public: false, ..m };
        assert!(mapping_text(&inner).contains("double NAT"));
    }
}
