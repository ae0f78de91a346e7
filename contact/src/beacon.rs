//! The LAN beacon: packet format and the listener's table of islands heard. Pure code; the UDP
//! sockets live in [`crate::lan`].
//!
//! A packet is the 8-byte magic `ISTHBEAC`, a version byte, and a bincode body. Each packet
//! stays within [`MAX_PACKET_BYTES`] so it is never fragmented; a router with many islands sends
//! several.

use crate::postcard::{assemble_keys, ContactPoint, Postcard};
use isthmus_router::auth::Capability;
use isthmus_router::ids::SessionId;
use isthmus_router::wire::Role;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// First bytes of every beacon packet.
pub const BEACON_MAGIC: [u8; 8] = *b"ISTHBEAC";
/// Beacon format version.
pub const BEACON_VERSION: u8 = 2;
/// Largest packet sent: under the 1280-byte IPv6 minimum MTU, so no link fragments it.
pub const MAX_PACKET_BYTES: usize = 1200;
/// The beacon's UDP port.
pub const DEFAULT_BEACON_PORT: u16 = 7471;
/// How often a router announces its islands.
pub const DEFAULT_BEACON_INTERVAL: Duration = Duration::from_secs(2);
/// A listener forgets an island after this many intervals without hearing it.
pub const EXPIRY_INTERVALS: u32 = 3;
/// Islands a listener remembers at once; packets are unauthenticated, so the table is bounded.
pub const MAX_HEARD: usize = 1024;

/// One island as announced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BeaconIsland {
    /// Its session.
    pub session: SessionId,
    /// Its name.
    pub name: String,
    /// Where to arrive, if anywhere.
    pub destination: Option<Uuid>,
    /// The island's admin public key: with the participant secret it makes a whole participant
    /// postcard (the other two keys derive from the secret).
    pub admin_key: isthmus_router::auth::PublicKey,
    /// The participant secret of a LAN-open island; `None` for a private one.
    pub secret: Option<[u8; 32]>,
}

/// The body of one beacon packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beacon {
    /// The announcing dispatcher instance.
    pub instance: Uuid,
    /// Its TCP port (the address is the packet's source).
    pub port: u16,
    /// Its announcement period, so listeners know when to forget.
    pub interval_ms: u32,
    /// Its external contact point, when it has one.
    pub external: Option<SocketAddr>,
    /// Some or all of its islands.
    pub islands: Vec<BeaconIsland>,
}

/// Why a packet was ignored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BeaconError {
    /// Not a beacon (another program on the port).
    #[error("not an isthmus beacon")]
    NotBeacon,
    /// A beacon of another version.
    #[error("beacon version {0} not understood")]
    Version(u8),
    /// A beacon whose body does not decode.
    #[error("malformed beacon: {0}")]
    Malformed(String),
}

/// bincode's limit counts the memory a decode may claim (container lengths times element
/// sizes), not wire bytes; the packet itself is bounded by the receive buffer.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 256 * 1024 }>()
}

fn packet(b: &Beacon) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&BEACON_MAGIC);
    out.push(BEACON_VERSION);
    // Within the limit by construction (see `encode`); an oversize single island is skipped.
    if let Ok(body) = bincode::serde::encode_to_vec(b, config()) {
        out.extend_from_slice(&body);
    }
    out
}

/// Splits an announcement into packets of at most [`MAX_PACKET_BYTES`]. An island too big for a
/// packet on its own (impossible with validated names) is left out rather than sent broken.
pub fn encode(head: &Beacon, islands: &[BeaconIsland]) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    let mut current = Beacon {
        islands: Vec::new(),
        ..head.clone()
    };
    for island in islands {
        current.islands.push(island.clone());
        if packet(&current).len() > MAX_PACKET_BYTES {
            let overflow = current.islands.pop();
            if !current.islands.is_empty() {
                packets.push(packet(&current));
            }
            current.islands = overflow.into_iter().collect();
            if packet(&current).len() > MAX_PACKET_BYTES {
                current.islands.clear();
            }
        }
    }
    if !current.islands.is_empty() {
        packets.push(packet(&current));
    }
    packets
}

/// Reads one packet.
pub fn decode(bytes: &[u8]) -> Result<Beacon, BeaconError> {
    if bytes.len() < 9 || bytes[..8] != BEACON_MAGIC {
        return Err(BeaconError::NotBeacon);
    }
    if bytes[8] != BEACON_VERSION {
        return Err(BeaconError::Version(bytes[8]));
    }
    let body = &bytes[9..];
    let (b, used): (Beacon, usize) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| BeaconError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(BeaconError::Malformed("trailing bytes".into()));
    }
    Ok(b)
}

/// An island a listener has heard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heard {
    /// The island.
    pub island: BeaconIsland,
    /// The router's LAN address: the packet's source address and the announced port.
    pub router: SocketAddr,
    /// The router's address in the other family, when it is heard by both IPv4 broadcast and
    /// IPv6 multicast (the first family heard stays in `router`, so the entry does not flap).
    pub also: Option<SocketAddr>,
    /// The router's external address, if announced.
    pub external: Option<SocketAddr>,
    /// The announcing dispatcher.
    pub instance: Uuid,
    /// When to forget it.
    pub expires: Instant,
}

impl Heard {
    /// Whether anyone on the LAN may join.
    pub fn is_open(&self) -> bool {
        self.island.secret.is_some()
    }

    /// The island's contact point: both the LAN address heard and the external one.
    pub fn contact(&self) -> ContactPoint {
        ContactPoint {
            session: self.island.session,
            name: self.island.name.clone(),
            destination: self.island.destination,
            internal: std::iter::once(self.router).chain(self.also).collect(),
            external: self.external,
            router: Some(self.instance),
        }
    }

    /// A participant postcard for a LAN-open island; `None` for a private one, and `None` for an
    /// entry whose secret does not belong to the announced island (the keys it gives do not hash
    /// to the session): beacons are unauthenticated, so such an entry is forged or broken.
    pub fn postcard(&self) -> Option<Postcard> {
        let capability = Capability::from_parts(Role::Replica, self.island.secret?);
        let keys = assemble_keys(&capability, &[self.island.admin_key])?;
        if keys.session_id() != self.island.session {
            return None;
        }
        Postcard::new(self.contact(), capability, keys).ok()
    }
}

/// The listener's table: islands heard recently, each forgotten after
/// [`EXPIRY_INTERVALS`] announcement intervals of silence.
#[derive(Debug, Default)]
pub struct Discovery {
    heard: HashMap<(Uuid, SessionId), Heard>,
    /// Packets that were not valid beacons.
    pub malformed: u64,
}

impl Discovery {
    /// Takes in one packet from `src`.
    pub fn handle_packet(&mut self, src: SocketAddr, bytes: &[u8], now: Instant) {
        let b = match decode(bytes) {
            Ok(b) => b,
            Err(_) => {
                self.malformed += 1;
                return;
            }
        };
        let ttl =
            Duration::from_millis(u64::from(b.interval_ms.clamp(100, 600_000))) * EXPIRY_INTERVALS;
        // The source keeps its scope id: an IPv6 link-local router address needs it to connect.
        let mut heard_at = src;
        heard_at.set_port(b.port);
        for island in b.islands {
            let key = (b.instance, island.session);
            if !self.heard.contains_key(&key) && self.heard.len() >= MAX_HEARD {
                continue;
            }
            let (router, also) = match self.heard.get(&key) {
                Some(h) if h.router.is_ipv4() != heard_at.is_ipv4() => (h.router, Some(heard_at)),
                Some(h) => (heard_at, h.also),
                None => (heard_at, None),
            };
            self.heard.insert(
                key,
                Heard {
                    island,
                    router,
                    also,
                    external: b.external,
                    instance: b.instance,
                    expires: now + ttl,
                },
            );
        }
    }

    /// Forgets what has not been heard for too long.
    pub fn expire(&mut self, now: Instant) {
        self.heard.retain(|_, h| h.expires > now);
    }

    /// The islands heard and not expired, by name.
    pub fn islands(&self) -> Vec<&Heard> {
        let mut v: Vec<&Heard> = self.heard.values().collect();
        v.sort_by(|a, b| {
            (&a.island.name, a.island.session).cmp(&(&b.island.name, b.island.session))
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn island(i: u128, open: bool) -> BeaconIsland {
        let admin = Capability::from_parts(Role::Admin, [i as u8; 32]);
        let keys = isthmus_router::auth::island_keys(&admin).expect("admin");
        let participant = admin.weaker().expect("participant");
        BeaconIsland {
            session: keys.session_id(),
            name: format!("island number {i:>40}"),
            destination: Some(Uuid::from_u128(i + 1)),
            admin_key: keys.admin,
            secret: open.then_some(*participant.secret()),
        }
    }

    #[test]
    fn an_open_island_gives_a_participant_postcard_for_its_session() {
        let mut d = Discovery::default();
        let src: SocketAddr = "192.168.1.5:55555".parse().expect("addr");
        let good = island(7, true);
        for p in encode(&head(), std::slice::from_ref(&good)) {
            d.handle_packet(src, &p, Instant::now());
        }
        let card = d.islands()[0].postcard().expect("open");
        assert_eq!(card.role(), Role::Replica);
        assert_eq!(card.session(), good.session);
        assert_eq!(card.contact.session, good.session);
        assert_eq!(
            card.contact.internal,
            vec!["192.168.1.5:7470".parse().expect("addr")]
        );
    }

    #[test]
    fn a_secret_that_does_not_match_the_session_is_dropped_as_forged() {
        let mut forged = island(7, true);
        // Another island's participant secret under this island's session and admin key.
        forged.secret = island(8, true).secret;
        let heard = Heard {
            island: forged,
            router: "192.168.1.5:7470".parse().expect("addr"),
            also: None,
            external: None,
            instance: Uuid::from_u128(1),
            expires: Instant::now(),
        };
        assert!(heard.postcard().is_none());
        let mut wrong_admin = island(7, true);
        wrong_admin.admin_key = island(8, true).admin_key;
        let heard = Heard {
            island: wrong_admin,
            ..heard
        };
        assert!(heard.postcard().is_none());
    }

    #[test]
    fn a_router_heard_on_both_families_keeps_the_first_and_adds_the_other() {
        let mut table = Discovery::default();
        let b = Beacon {
            islands: vec![island(3, true)],
            ..head()
        };
        let packets = encode(&b, &b.islands);
        let v4: SocketAddr = "192.168.1.5:50000".parse().expect("addr");
        let v6: SocketAddr = "[fd00::5]:50001".parse().expect("addr");
        let now = Instant::now();
        table.handle_packet(v4, &packets[0], now);
        table.handle_packet(v6, &packets[0], now);
        table.handle_packet(v4, &packets[0], now);
        let heard = table.islands();
        assert_eq!(heard.len(), 1);
        assert_eq!(heard[0].router, "192.168.1.5:7470".parse().expect("addr"));
        assert_eq!(heard[0].also, Some("[fd00::5]:7470".parse().expect("addr")));
        assert_eq!(heard[0].contact().internal.len(), 2);
        // A link-local source keeps its scope: without it the address cannot be connected to.
        let mut fresh = Discovery::default();
        let ll: SocketAddr = "[fe80::5%3]:50001".parse().expect("addr");
        fresh.handle_packet(ll, &packets[0], now);
        assert_eq!(fresh.islands()[0].router.to_string(), "[fe80::5%3]:7470");
    }

    fn head() -> Beacon {
        Beacon {
            instance: Uuid::from_u128(9),
            port: 7470,
            interval_ms: 2000,
            external: Some("203.0.113.1:7000".parse().expect("addr")),
            islands: vec![],
        }
    }

    #[test]
    fn many_islands_split_into_small_packets_and_all_arrive() {
        let islands: Vec<BeaconIsland> = (0..50).map(|i| island(i, i % 2 == 0)).collect();
        let packets = encode(&head(), &islands);
        assert!(packets.len() > 1);
        let mut got = Vec::new();
        for p in &packets {
            assert!(p.len() <= MAX_PACKET_BYTES, "{}", p.len());
            got.extend(decode(p).expect("decodes").islands);
        }
        assert_eq!(got, islands);
    }

    #[test]
    fn islands_expire_after_three_intervals_of_silence() {
        let mut d = Discovery::default();
        let t0 = Instant::now();
        let src: SocketAddr = "192.168.1.5:55555".parse().expect("addr");
        for p in encode(&head(), &[island(1, true), island(2, false)]) {
            d.handle_packet(src, &p, t0);
        }
        let heard = d.islands();
        assert_eq!(heard.len(), 2);
        assert_eq!(heard[0].router, "192.168.1.5:7470".parse().expect("addr"));
        assert!(heard[0].postcard().is_some());
        assert!(
            heard[1].postcard().is_none(),
            "private islands give no postcard"
        );
        d.expire(t0 + Duration::from_millis(5999));
        assert_eq!(d.islands().len(), 2);
        // Heard again: the clock restarts for that island only.
        for p in encode(&head(), &[island(1, true)]) {
            d.handle_packet(src, &p, t0 + Duration::from_secs(4));
        }
        d.expire(t0 + Duration::from_secs(6));
        assert_eq!(d.islands().len(), 1);
        d.expire(t0 + Duration::from_secs(10));
        assert!(d.islands().is_empty());
    }

    #[test]
    fn garbage_is_counted_and_ignored() {
        let mut d = Discovery::default();
        let src: SocketAddr = "10.0.0.1:1".parse().expect("addr");
        d.handle_packet(src, b"hello there", Instant::now());
        d.handle_packet(src, b"ISTHBEAC\x01\xff\xff", Instant::now());
        d.handle_packet(src, b"ISTHBEAC\x07", Instant::now());
        assert_eq!(d.malformed, 3);
        assert!(d.islands().is_empty());
    }

    proptest! {
        #[test]
        fn no_panic_on_any_packet(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut d = Discovery::default();
            d.handle_packet("10.0.0.1:1".parse().expect("addr"), &bytes, Instant::now());
            let mut framed = BEACON_MAGIC.to_vec();
            framed.push(BEACON_VERSION);
            framed.extend_from_slice(&bytes);
            d.handle_packet("10.0.0.1:1".parse().expect("addr"), &framed, Instant::now());
        }
    }
}
