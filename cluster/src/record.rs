//! The values under the keys, as JSON (readable with `etcdctl get --prefix /isthmus/`).

use crate::placement::Load;
use crate::ClusterError;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use uuid::Uuid;

/// `routers/<id>`: one router, written under its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterRecord {
    /// The router's instance id (the dispatcher's, also in its welcomes and beacons).
    pub id: Uuid,
    /// Where replicas on its networks reach it.
    pub internal: Vec<SocketAddr>,
    /// Where the Internet reaches it, if anywhere.
    pub external: Option<SocketAddr>,
    /// Its load when last written.
    pub load: Load,
    /// Whether it takes no new islands (it is leaving).
    #[serde(default)]
    pub draining: bool,
    /// The lease its key and its islands' records live under; another router placing an island
    /// on it puts the record under this lease, so the record dies with this router.
    pub lease: i64,
    /// The isthmus version it runs.
    #[serde(default)]
    pub version: String,
}

/// `islands/<session>`: where an island lives, written under the home's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The home router's id.
    pub home: Uuid,
    /// The home's contact points (copied, so a redirect needs no second read).
    pub internal: Vec<SocketAddr>,
    /// The home's external contact point.
    pub external: Option<SocketAddr>,
}

impl Placement {
    /// The placement of an island at `home`.
    pub fn at(home: &RouterRecord) -> Placement {
        Placement {
            home: home.id,
            internal: home.internal.clone(),
            external: home.external,
        }
    }
}

/// Encodes a record.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers always serialize.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Decodes the record at `key`.
pub fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], value: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(value).map_err(|e| ClusterError::BadRecord {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_name_their_key() {
        let r = RouterRecord {
            id: Uuid::from_u128(1),
            internal: vec!["127.0.0.2:7470".parse().expect("literal")],
            external: None,
            load: Load {
                sessions: 3,
                replicas: 9,
                cpu_percent: 12,
            },
            draining: false,
            lease: 42,
            version: "0.1.0".into(),
        };
        let back: RouterRecord = decode(b"k", &encode(&r)).expect("decodes");
        assert_eq!(back, r);
        let p = Placement::at(&r);
        assert_eq!(p.home, r.id);
        assert_eq!(p.internal, r.internal);
        let e = decode::<Placement>(b"/isthmus/x/islands/y", b"{nope").expect_err("bad json");
        assert!(e.to_string().contains("/isthmus/x/islands/y"), "{e}");
    }
}
