//! Which addresses to hand a replica: the router's internal addresses (its LAN interfaces) and
//! its external one, ordered for where the requester is.

use isthmus_router::wire::Contacts;
use std::net::{IpAddr, SocketAddr};
use uuid::Uuid;

/// One address of this host with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalAddr {
    /// The interface address.
    pub ip: IpAddr,
    /// Its network prefix length.
    pub prefix: u8,
}

impl LocalAddr {
    fn contains(&self, other: IpAddr) -> bool {
        match (self.ip, other) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }

    fn usable(&self) -> bool {
        match self.ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified() && !v4.is_link_local(),
            // Link-local IPv6 needs a scope id, which a postcard cannot carry meaningfully.
            IpAddr::V6(v6) => {
                !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
            }
        }
    }
}

/// The host's up interfaces, as the operating system reports them now.
pub fn local_addrs() -> Vec<LocalAddr> {
    let Ok(ifaces) = if_addrs::get_if_addrs() else {
        return Vec::new();
    };
    ifaces
        .into_iter()
        .filter(|i| i.is_oper_up() || i.is_loopback())
        .map(|i| match i.addr {
            if_addrs::IfAddr::V4(a) => LocalAddr {
                ip: IpAddr::V4(a.ip),
                prefix: a.prefixlen,
            },
            if_addrs::IfAddr::V6(a) => LocalAddr {
                ip: IpAddr::V6(a.ip),
                prefix: a.prefixlen,
            },
        })
        .collect()
}

/// Whether `peer` is on this router's own network: loopback, or inside the subnet of one of the
/// host's interfaces. Such a peer is "local" for the contact points, may create islands under the
/// default create policy, and may hand the router a LAN-open island's secret.
pub fn is_lan_peer(peer: IpAddr, host: &[LocalAddr]) -> bool {
    // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
    let peer = peer.to_canonical();
    peer.is_loopback() || host.iter().any(|a| !a.ip.is_loopback() && a.contains(peer))
}

/// The contact points for a requester at `peer` who reached this router at `local`.
///
/// Internal addresses are the interfaces the router listens on (all of them for an unspecified
/// listen address), the one the requester reached first, then those on its subnet. Loopback is
/// handed out only when there is nothing else: in a postcard it would point a remote friend at
/// their own machine. A requester on loopback or on one of the router's subnets is local;
/// anyone else is remote and should try the external address first.
pub fn contacts_for(
    listen: SocketAddr,
    local: SocketAddr,
    peer: SocketAddr,
    host: &[LocalAddr],
    external: Option<SocketAddr>,
    router: Uuid,
) -> Contacts {
    let port = listen.port().max(local.port());
    let mut ips: Vec<IpAddr> = Vec::new();
    if !listen.ip().is_unspecified() {
        ips.push(listen.ip());
    } else {
        // A listener on `::` takes IPv4 too (dual-stack, the system default): hand out both
        // families, so IPv4 hosts and IPv6-only hosts alike find an address, and a global IPv6
        // address with a pinhole in the gateway reaches remote IPv6 users.
        let dual = listen.is_ipv6();
        let usable: Vec<&LocalAddr> = host
            .iter()
            .filter(|a| a.usable() && (dual || a.ip.is_ipv4() == listen.is_ipv4()))
            .collect();
        // A dual-stack listener sees IPv4 as ::ffff:a.b.c.d.
        let (local_ip, peer_ip) = (local.ip().to_canonical(), peer.ip().to_canonical());
        if usable.iter().any(|a| a.ip == local_ip) {
            ips.push(local_ip);
        }
        ips.extend(usable.iter().filter(|a| a.contains(peer_ip)).map(|a| a.ip));
        ips.extend(usable.iter().map(|a| a.ip));
        if ips.is_empty() {
            ips.push(local.ip());
        }
    }
    let mut internal: Vec<SocketAddr> = Vec::new();
    for ip in ips {
        let a = SocketAddr::new(ip, port);
        if !internal.contains(&a) {
            internal.push(a);
        }
    }
    Contacts {
        internal,
        external,
        remote: !is_lan_peer(peer.ip(), host),
        router,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Vec<LocalAddr> {
        vec![
            LocalAddr {
                ip: "127.0.0.1".parse().expect("literal"),
                prefix: 8,
            },
            LocalAddr {
                ip: "192.168.1.5".parse().expect("literal"),
                prefix: 24,
            },
            LocalAddr {
                ip: "10.0.0.7".parse().expect("literal"),
                prefix: 16,
            },
            LocalAddr {
                ip: "fe80::1".parse().expect("literal"),
                prefix: 64,
            },
        ]
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("literal")
    }

    #[test]
    fn lan_peers_are_loopback_or_on_an_interface_subnet() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("literal");
        assert!(is_lan_peer(ip("127.0.0.2"), &host()));
        assert!(is_lan_peer(ip("::1"), &host()));
        assert!(is_lan_peer(ip("192.168.1.200"), &host()));
        assert!(is_lan_peer(ip("::ffff:10.0.200.1"), &host()));
        assert!(!is_lan_peer(ip("192.168.2.1"), &host()));
        assert!(!is_lan_peer(ip("198.51.100.20"), &host()));
        // The loopback interface's /8 does not make every address "local".
        assert!(!is_lan_peer(ip("8.8.8.8"), &[host()[0]]));
    }

    #[test]
    fn a_dual_stack_listener_hands_out_both_families_and_knows_mapped_peers() {
        let mut h = host();
        h.push(LocalAddr {
            ip: "2001:db8:1::2".parse().expect("literal"),
            prefix: 64,
        });
        // An IPv4 peer on the LAN, as a `::` listener sees it.
        let c = contacts_for(
            sa("[::]:7470"),
            sa("[::ffff:10.0.0.7]:7470"),
            sa("[::ffff:10.0.3.3]:5000"),
            &h,
            Some(sa("203.0.113.9:7000")),
            Uuid::nil(),
        );
        assert_eq!(
            c.internal,
            vec![
                sa("10.0.0.7:7470"),
                sa("192.168.1.5:7470"),
                sa("[2001:db8:1::2]:7470")
            ]
        );
        assert!(!c.remote);
        // A remote IPv6 peer: the external address first, the global IPv6 one among the rest.
        let c = contacts_for(
            sa("[::]:7470"),
            sa("[2001:db8:1::2]:7470"),
            sa("[2001:db8:2::2]:5000"),
            &h,
            Some(sa("203.0.113.9:7000")),
            Uuid::nil(),
        );
        assert!(c.remote);
        assert_eq!(c.internal[0], sa("[2001:db8:1::2]:7470"));
        assert_eq!(c.ordered()[0], sa("203.0.113.9:7000"));
        assert!(!c
            .internal
            .iter()
            .any(|a| a.ip().to_string().starts_with("fe80")));
    }

    #[test]
    fn a_lan_peer_gets_its_own_subnet_first_and_is_local() {
        let c = contacts_for(
            sa("0.0.0.0:7470"),
            sa("10.0.0.7:7470"),
            sa("10.0.3.3:5000"),
            &host(),
            Some(sa("203.0.113.9:7000")),
            Uuid::nil(),
        );
        assert_eq!(
            c.internal,
            vec![sa("10.0.0.7:7470"), sa("192.168.1.5:7470")]
        );
        assert!(!c.remote);
        assert_eq!(c.ordered()[0], sa("10.0.0.7:7470"));
        assert_eq!(c.ordered().last(), Some(&sa("203.0.113.9:7000")));
    }

    #[test]
    fn a_remote_peer_is_told_to_try_the_external_address_first() {
        let c = contacts_for(
            sa("0.0.0.0:7470"),
            sa("192.168.1.5:7470"),
            sa("198.51.100.20:4000"),
            &host(),
            Some(sa("203.0.113.9:7000")),
            Uuid::nil(),
        );
        assert!(c.remote);
        assert_eq!(c.ordered()[0], sa("203.0.113.9:7000"));
    }

    #[test]
    fn loopback_is_handed_out_only_when_nothing_else_exists() {
        let c = contacts_for(
            sa("0.0.0.0:7470"),
            sa("127.0.0.1:7470"),
            sa("127.0.0.1:6000"),
            &host(),
            None,
            Uuid::nil(),
        );
        assert!(!c.internal.iter().any(|a| a.ip().is_loopback()));
        assert!(!c.remote);
        let only_lo = [LocalAddr {
            ip: "127.0.0.1".parse().expect("literal"),
            prefix: 8,
        }];
        let c = contacts_for(
            sa("0.0.0.0:7470"),
            sa("127.0.0.1:7470"),
            sa("127.0.0.1:6000"),
            &only_lo,
            None,
            Uuid::nil(),
        );
        assert_eq!(c.internal, vec![sa("127.0.0.1:7470")]);
        let c = contacts_for(
            sa("127.0.0.1:7470"),
            sa("127.0.0.1:7470"),
            sa("127.0.0.1:6000"),
            &host(),
            None,
            Uuid::nil(),
        );
        assert_eq!(c.internal, vec![sa("127.0.0.1:7470")]);
    }
}
