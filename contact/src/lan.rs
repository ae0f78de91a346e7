//! UDP for the beacon: the broadcaster a dispatcher runs and the listener `discover` uses.
//!
//! IPv4 goes by directed broadcast; IPv6, which has no broadcast, by the link-local multicast
//! group [`BEACON_GROUP_V6`] on each interface, so hosts with no IPv4 at all find islands too.

use crate::beacon::{self, Beacon, Discovery};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// The IPv6 beacon's multicast group: link-local scope (ff02::), so it never leaves the link,
/// and a group id of the beacon port's digits.
pub const BEACON_GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x7471);

/// Which address families a router announces on: those its listening address accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Families {
    /// IPv4 broadcast.
    pub v4: bool,
    /// IPv6 multicast.
    pub v6: bool,
}

impl Families {
    /// The families a listener bound to `listen` accepts: an IPv4 address takes IPv4 only, a
    /// specific IPv6 address IPv6 only, and `::` both (the dispatcher's listener is dual-stack).
    pub fn of_listener(listen: IpAddr) -> Families {
        match listen {
            IpAddr::V4(_) => Families {
                v4: true,
                v6: false,
            },
            IpAddr::V6(v6) if v6.is_unspecified() => Families { v4: true, v6: true },
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(_) => Families {
                    v4: true,
                    v6: false,
                },
                None => Families {
                    v4: false,
                    v6: true,
                },
            },
        }
    }
}

/// Each up, multicast-capable interface with IPv6, by index, with the source address to
/// announce from: a routable (global or unique-local) address of that interface when it has
/// one, as listeners take the packet's source for the router's address and a postcard cannot
/// carry a link-local address's scope; else its link-local address.
///
/// Read with `netdev`, not `if-addrs`: `if-addrs` leaves every fe80:: address out, and a link
/// with no IPv6 router (two hosts and a switch) has nothing else, so such hosts would neither
/// announce nor listen.
pub fn multicast_targets_v6() -> Vec<(u32, Ipv6Addr)> {
    let link_local = |a: &Ipv6Addr| (a.segments()[0] & 0xffc0) == 0xfe80;
    let mut out: Vec<(u32, Ipv6Addr)> = netdev::get_interfaces()
        .into_iter()
        .filter(|i| i.is_up() && i.is_running() && i.is_multicast() && !i.is_loopback())
        .filter_map(|i| {
            let addrs: Vec<Ipv6Addr> = i
                .ipv6_addrs()
                .into_iter()
                .filter(|a| !a.is_multicast() && !a.is_loopback() && !a.is_unspecified())
                .collect();
            let source = addrs
                .iter()
                .find(|a| !link_local(a))
                .or_else(|| addrs.first())?;
            Some((i.index, *source))
        })
        .collect();
    out.sort();
    out
}

/// Sends `packets` to the IPv6 beacon group on every interface; failures are only logged (an
/// interface may be going away).
fn send_v6(packets: &[Vec<u8>], port: u16) {
    for (index, source) in multicast_targets_v6() {
        let scope = if (source.segments()[0] & 0xffc0) == 0xfe80 {
            index
        } else {
            0
        };
        let sent =
            std::net::UdpSocket::bind(SocketAddrV6::new(source, 0, 0, scope)).and_then(|s| {
                // Sent from inside the async beacon task: a full send buffer must skip a round,
                // not block a runtime thread.
                s.set_nonblocking(true)?;
                socket2::SockRef::from(&s).set_multicast_if_v6(index)?;
                for p in packets {
                    s.send_to(p, SocketAddrV6::new(BEACON_GROUP_V6, port, 0, index))?;
                }
                Ok(())
            });
        if let Err(e) = sent {
            tracing::debug!(index, %source, "IPv6 beacon not sent: {e}");
        }
    }
}

/// The directed broadcast address of every up IPv4 interface that has one (from if-addrs);
/// 255.255.255.255 when there is none.
pub fn broadcast_targets() -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.is_oper_up() && !i.is_loopback())
        .filter_map(|i| match i.addr {
            if_addrs::IfAddr::V4(a) => directed_broadcast(a.ip, a.prefixlen, a.broadcast),
            if_addrs::IfAddr::V6(_) => None,
        })
        .collect();
    out.sort();
    out.dedup();
    if out.is_empty() {
        out.push(Ipv4Addr::BROADCAST);
    }
    out
}

/// The broadcast address of `ip`'s subnet. An address configured without one (`ip addr add
/// 10.0.0.2/24` leaves `brd` out) is reported by getifaddrs with its own address there: the
/// beacon then went only to this host. None for /31 and /32, which have no broadcast address.
fn directed_broadcast(ip: Ipv4Addr, prefix: u8, reported: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
    match reported {
        Some(b) if b != ip => Some(b),
        // No broadcast flag at all (point-to-point, tunnels): nothing to broadcast to.
        Some(_) if prefix < 31 => Some(Ipv4Addr::from(u32::from(ip) | (u32::MAX >> prefix))),
        _ => None,
    }
}

/// Announces every `interval` until cancelled. `announcement` is asked afresh each time (the
/// islands and the external address change); `None` or no islands sends nothing.
pub async fn broadcast(
    beacon_port: u16,
    interval: Duration,
    announcement: impl Fn() -> Option<Beacon> + Send + 'static,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let v4_only = Families {
        v4: true,
        v6: false,
    };
    announce(v4_only, beacon_port, interval, announcement, cancel).await
}

/// Announces every `interval` until cancelled, by IPv4 broadcast and IPv6 multicast as
/// `families` says. `announcement` is asked afresh each time (the islands and the external
/// address change); `None` or no islands sends nothing.
pub async fn announce(
    families: Families,
    beacon_port: u16,
    interval: Duration,
    announcement: impl Fn() -> Option<Beacon> + Send + 'static,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).await?;
    // Without SO_BROADCAST, send_to a broadcast address fails with "permission denied".
    socket.set_broadcast(true)?;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = cancel.cancelled() => return Ok(()),
        }
        let Some(mut head) = announcement() else {
            continue;
        };
        let islands = std::mem::take(&mut head.islands);
        if islands.is_empty() {
            continue;
        }
        let packets = beacon::encode(&head, &islands);
        if families.v4 {
            for target in broadcast_targets() {
                for p in &packets {
                    if let Err(e) = socket.send_to(p, (target, beacon_port)).await {
                        tracing::debug!(%target, "beacon not sent: {e}");
                    }
                }
            }
        }
        if families.v6 {
            send_v6(&packets, beacon_port);
        }
    }
}

/// A bound beacon listener, on IPv4 and (where the host has it) IPv6. Several may share a host
/// (SO_REUSEADDR and SO_REUSEPORT).
pub struct Listener {
    socket: UdpSocket,
    v6: Option<UdpSocket>,
}

impl Listener {
    /// Listens on the beacon port on every interface: for IPv4 broadcasts, and for the IPv6
    /// beacon group joined on each interface with IPv6. A host without IPv6 listens on IPv4
    /// only.
    pub fn bind(port: u16) -> std::io::Result<Listener> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        #[cfg(unix)]
        s.set_reuse_port(true)?;
        s.set_broadcast(true)?;
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
        let socket = UdpSocket::from_std(s.into())?;
        let v6 = match Self::bind_v6(port) {
            Ok(v6) => Some(v6),
            Err(e) => {
                tracing::debug!("not listening for IPv6 beacons: {e}");
                None
            }
        };
        Ok(Listener { socket, v6 })
    }

    fn bind_v6(port: u16) -> std::io::Result<UdpSocket> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_only_v6(true)?;
        s.set_reuse_address(true)?;
        #[cfg(unix)]
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        let mut joined = 0;
        for (index, _) in multicast_targets_v6() {
            match s.join_multicast_v6(&BEACON_GROUP_V6, index) {
                Ok(()) => joined += 1,
                Err(e) => tracing::debug!(index, "cannot join the IPv6 beacon group: {e}"),
            }
        }
        if joined == 0 {
            return Err(std::io::Error::other("no interface with IPv6 multicast"));
        }
        UdpSocket::from_std(s.into())
    }

    /// Feeds packets into `table` until `until` returns true for it or `limit` passes.
    pub async fn listen(
        &self,
        table: &mut Discovery,
        limit: Duration,
        until: impl Fn(&Discovery) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut buf = vec![0u8; beacon::MAX_PACKET_BYTES + 64];
        let mut buf6 = vec![0u8; beacon::MAX_PACKET_BYTES + 64];
        loop {
            table.expire(std::time::Instant::now());
            if until(table) {
                return;
            }
            let v6 = async {
                match &self.v6 {
                    Some(s) => s.recv_from(&mut buf6).await.map(|(n, src)| (n, src, true)),
                    None => std::future::pending().await,
                }
            };
            let either = async {
                tokio::select! {
                    r = self.socket.recv_from(&mut buf) => r.map(|(n, src)| (n, src, false)),
                    r = v6 => r,
                }
            };
            let r = tokio::time::timeout_at(deadline, either).await;
            match r {
                Ok(Ok((n, src, from_v6))) => {
                    let bytes = if from_v6 { &buf6[..n] } else { &buf[..n] };
                    table.handle_packet(src, bytes, std::time::Instant::now())
                }
                Ok(Err(e)) => tracing::debug!("beacon receive failed: {e}"),
                Err(_) => {
                    table.expire(std::time::Instant::now());
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_without_a_broadcast_gets_its_subnets_not_its_own() {
        let ip = Ipv4Addr::new(10, 99, 0, 2);
        let brd = Ipv4Addr::new(10, 99, 0, 255);
        assert_eq!(directed_broadcast(ip, 24, Some(brd)), Some(brd));
        assert_eq!(directed_broadcast(ip, 24, Some(ip)), Some(brd));
        assert_eq!(
            directed_broadcast(
                Ipv4Addr::new(192, 168, 7, 9),
                22,
                Some(Ipv4Addr::new(192, 168, 7, 9))
            ),
            Some(Ipv4Addr::new(192, 168, 7, 255))
        );
        assert_eq!(directed_broadcast(ip, 32, Some(ip)), None);
        assert_eq!(directed_broadcast(ip, 24, None), None);
    }
}
