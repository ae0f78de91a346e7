//! The reachability check after a mapping is granted: the gateway's own report (the grant and
//! the external address it gave) plus, where the gateway loops connections from the LAN back
//! to its own external address (hairpin NAT), a TCP connection to that address that must be
//! answered by an Isthmus router. The result is said plainly either way: a mapping the gateway
//! grants is not always one the Internet can use.

use crate::portmap::Mapping;
use isthmus_router::wire::{self, PREAMBLE_LEN};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

/// Time the hairpin connection and the router's preamble may take.
pub const HAIRPIN_TIMEOUT: Duration = Duration::from_secs(3);

/// What the check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reachability {
    /// A connection to the external address reached an Isthmus router.
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
pub async fn check(mapping: &Mapping) -> Reachability {
    let external = mapping.external;
    let outcome = match tokio::time::timeout(HAIRPIN_TIMEOUT, hairpin(external)).await {
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

/// Connects to `external` and expects an Isthmus router's preamble in answer to ours.
async fn hairpin(external: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(external)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(&wire::preamble())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = [0u8; PREAMBLE_LEN];
    s.read_exact(&mut answer)
        .await
        .map_err(|e| format!("no Isthmus answer: {e}"))?;
    wire::check_preamble(&answer)
        .map_err(|_| "something else answered there: the port leads to another service".to_string())
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
        let stop = CancellationToken::new();
        let run = tokio::spawn(d.run(stop.clone()));
        assert_eq!(
            check(&mapping(addr)).await,
            Reachability::Confirmed { external: addr }
        );
        stop.cancel();
        run.await.expect("router stopped");
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
        let r = check(&mapping(addr)).await;
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
        let r = check(&mapping(gone)).await;
        assert!(matches!(r, Reachability::Unconfirmed { .. }), "{r}");
    }
}
