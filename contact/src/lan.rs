//! UDP for the beacon: the broadcaster a dispatcher runs and the listener `discover` uses.

use crate::beacon::{self, Beacon, Discovery};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// The directed broadcast address of every up IPv4 interface that has one (from if-addrs);
/// 255.255.255.255 when there is none.
pub fn broadcast_targets() -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.is_oper_up() && !i.is_loopback())
        .filter_map(|i| match i.addr {
            if_addrs::IfAddr::V4(a) => a.broadcast,
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

/// Announces every `interval` until cancelled. `announcement` is asked afresh each time (the
/// islands and the external address change); `None` or no islands sends nothing.
pub async fn broadcast(
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
        for target in broadcast_targets() {
            for p in &packets {
                if let Err(e) = socket.send_to(p, (target, beacon_port)).await {
                    tracing::debug!(%target, "beacon not sent: {e}");
                }
            }
        }
    }
}

/// A bound beacon listener. Several may share a host (SO_REUSEADDR and SO_REUSEPORT).
pub struct Listener {
    socket: UdpSocket,
}

impl Listener {
    /// Listens on the beacon port on every interface.
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
        Ok(Listener { socket })
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
        loop {
            table.expire(std::time::Instant::now());
            if until(table) {
                return;
            }
            let r = tokio::time::timeout_at(deadline, self.socket.recv_from(&mut buf)).await;
            match r {
                Ok(Ok((n, src))) => table.handle_packet(src, &buf[..n], std::time::Instant::now()),
                Ok(Err(e)) => tracing::debug!("beacon receive failed: {e}"),
                Err(_) => {
                    table.expire(std::time::Instant::now());
                    return;
                }
            }
        }
    }
}
