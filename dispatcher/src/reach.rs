//! The reachability check after a mapping is granted: the gateway's own report (the grant and
//! the external address it gave) plus, where the gateway loops connections from the LAN back
//! to its own external address (hairpin NAT), a TCP connection to that address that must be
//! answered by an Isthmus router. The result is said plainly either way: a mapping the gateway
//! grants is not always one the Internet can use.

use crate::portmap::Mapping;
use isthmus_router::auth::NONCE_LEN;
use isthmus_router::wire::{self, PREAMBLE_LEN};
use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

/// Time the hairpin connection and the router's preamble may take.
pub const HAIRPIN_TIMEOUT: Duration = Duration::from_secs(3);

/// What the check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reachability {
    /// A connection to the external address reached this very router.
    Confirmed {
        /// The address checked.
        external: SocketAddr,
    },
    /// The gateway granted the mapping, but no connection to the external address could be
    /// made to come back; remote users may or may not get in.
    Unconfirmed {
        /// The address checked.
        external: SocketAddr,
        /// Why the hairpin connection failed.
        why: String,
    },
}

impl fmt::Display for Reachability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reachability::Confirmed { external } => write!(
                f,
                "reachability confirmed: a connection to {external} came back to this router through the gateway"
            ),
            Reachability::Unconfirmed { external, why } => write!(
                f,
                "reachability not confirmed: the gateway reports the mapping, but a connection from this host to {external} did not come back ({why}); many gateways do not loop LAN connections back (no hairpin NAT), so ask someone outside to try a postcard"
            ),
        }
    }
}

/// Checks `mapping` by connecting to its external address; logs and returns the outcome. The
/// router must be accepting connections already, or the check cannot succeed.
pub async fn check(mapping: &Mapping, probes: &Probes) -> Reachability {
    let external = mapping.external;
    probes.start();
    let outcome = tokio::time::timeout(HAIRPIN_TIMEOUT, hairpin(external, probes)).await;
    probes.stop();
    let outcome = match outcome {
        Ok(Ok(())) => Reachability::Confirmed { external },
        Ok(Err(why)) => Reachability::Unconfirmed { external, why },
        Err(_) => Reachability::Unconfirmed {
            external,
            why: format!("no answer within {HAIRPIN_TIMEOUT:?}"),
        },
    };
    match &outcome {
        Reachability::Confirmed { .. } => info!(protocol = %mapping.protocol, "{outcome}"),
        Reachability::Unconfirmed { .. } => warn!(protocol = %mapping.protocol, "{outcome}"),
    }
    outcome
}

/// Connects to `external` and expects this router's preamble in answer to ours: the nonce in
/// it must be one this dispatcher handed out while the check ran, so another Isthmus router
/// answering at that address (a stale mapping, someone else's router) does not count.
async fn hairpin(external: SocketAddr, probes: &Probes) -> Result<(), String> {
    let mut s = TcpStream::connect(external)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(&wire::preamble())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; PREAMBLE_LEN];
    s.read_exact(&mut head)
        .await
        .map_err(|e| format!("no Isthmus answer: {e}"))?;
    wire::check_preamble(&head).map_err(|_| {
        "something else answered there: the port leads to another service".to_string()
    })?;
    let mut nonce = [0u8; NONCE_LEN];
    s.read_exact(&mut nonce)
        .await
        .map_err(|e| format!("no whole Isthmus answer: {e}"))?;
    if probes.issued(&nonce) {
        Ok(())
    } else {
        Err("another Isthmus router answered there, not this one: the port leads elsewhere".into())
    }
}

/// The nonces this dispatcher hands out while a check runs, so the check can tell its own
/// router's answer from another's. Off (one relaxed load per connection) the rest of the time.
#[derive(Debug, Default)]
pub struct Probes {
    on: AtomicBool,
    nonces: Mutex<VecDeque<[u8; NONCE_LEN]>>,
}

/// Nonces kept while a check runs: the check's own connection is among the first few a
/// router accepts in that moment.
const PROBE_NONCES: usize = 256;

impl Probes {
    fn start(&self) {
        if let Ok(mut n) = self.nonces.lock() {
            n.clear();
        }
        self.on.store(true, Ordering::Release);
    }

    fn stop(&self) {
        self.on.store(false, Ordering::Release);
        if let Ok(mut n) = self.nonces.lock() {
            n.clear();
        }
    }

    /// Notes a nonce the dispatcher is about to send, if a check is running.
    pub(crate) fn note(&self, nonce: &[u8; NONCE_LEN]) {
        if !self.on.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut n) = self.nonces.lock() {
            if n.len() == PROBE_NONCES {
                n.pop_front();
            }
            n.push_back(*nonce);
        }
    }

    fn issued(&self, nonce: &[u8; NONCE_LEN]) -> bool {
        self.nonces
            .lock()
            .map(|n| n.iter().any(|x| x == nonce))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::portmap::Protocol;
    use crate::{Dispatcher, DispatcherConfig};
    use tokio_util::sync::CancellationToken;

    fn mapping(external: SocketAddr) -> Mapping {
        Mapping {
            external,
            lease: None,
            public: true,
            protocol: Protocol::Pcp,
        }
    }

    #[tokio::test]
    async fn a_router_answering_at_the_external_address_confirms_it() {
        let cfg = DispatcherConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..DispatcherConfig::default()
        };
        let d = Dispatcher::bind(cfg).await.expect("bind");
        let addr = d.local_addr();
        let probes = d.shared.probes.clone();
        let stop = CancellationToken::new();
        let run = tokio::spawn(d.run(stop.clone()));
        assert_eq!(
            check(&mapping(addr), &probes).await,
            Reachability::Confirmed { external: addr }
        );
        // Another Isthmus router at the address is not this one.
        let other = Dispatcher::bind(DispatcherConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..DispatcherConfig::default()
        })
        .await
        .expect("bind");
        let other_addr = other.local_addr();
        let other_run = tokio::spawn(other.run(stop.clone()));
        let r = check(&mapping(other_addr), &probes).await;
        assert!(
            matches!(&r, Reachability::Unconfirmed { why, .. } if why.contains("another Isthmus router")),
            "{r}"
        );
        stop.cancel();
        run.await.expect("router stopped");
        other_run.await.expect("router stopped");
    }

    #[tokio::test]
    async fn another_service_or_nothing_at_the_external_address_is_not_confirmation() {
        // Something that is not an Isthmus router answers there.
        let other = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = other.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut s, _)) = other.accept().await {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            }
        });
        let r = check(&mapping(addr), &Probes::default()).await;
        assert!(
            matches!(&r, Reachability::Unconfirmed { why, .. } if why.contains("something else answered")),
            "{r}"
        );
        assert!(r.to_string().starts_with("reachability not confirmed"));
        // Nothing listens there at all.
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let r = check(&mapping(gone), &Probes::default()).await;
        assert!(matches!(r, Reachability::Unconfirmed { .. }), "{r}");
    }
}
