//! The key layout: every key of a cluster lives under `/isthmus/<cluster>/`.

use crate::ClusterError;
use uuid::Uuid;

/// The keys of one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// The keys of the cluster `name` (1 to 64 of `[A-Za-z0-9._-]`).
    pub fn new(name: &str) -> Result<Keys, ClusterError> {
        let ok = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            return Err(ClusterError::BadName(name.into()));
        }
        Ok(Keys {
            root: format!("/isthmus/{name}/"),
        })
    }

    /// Prefix of every router's key.
    pub fn routers(&self) -> String {
        format!("{}routers/", self.root)
    }

    /// A router's key.
    pub fn router(&self, id: Uuid) -> String {
        format!("{}routers/{id}", self.root)
    }

    /// Prefix of every placement record.
    pub fn islands(&self) -> String {
        format!("{}islands/", self.root)
    }

    /// An island's placement record.
    pub fn island(&self, session: Uuid) -> String {
        format!("{}islands/{session}", self.root)
    }

    /// The record that an island exists (no lease: it outlives every router), so any router
    /// accepts its replicas' recovering hellos whatever its create policy.
    pub fn known(&self, session: Uuid) -> String {
        format!("{}known/{session}", self.root)
    }

    /// The router id in a router key of this cluster.
    pub fn router_of(&self, key: &[u8]) -> Option<Uuid> {
        Self::id_after(key, &self.routers())
    }

    /// The session id in a placement key of this cluster.
    pub fn island_of(&self, key: &[u8]) -> Option<Uuid> {
        Self::id_after(key, &self.islands())
    }

    fn id_after(key: &[u8], prefix: &str) -> Option<Uuid> {
        let rest = key.strip_prefix(prefix.as_bytes())?;
        Uuid::try_parse_ascii(rest).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_nest_under_the_cluster_and_parse_back() {
        let k = Keys::new("eu-1").expect("name");
        let id = Uuid::from_u128(7);
        assert_eq!(k.router(id), format!("/isthmus/eu-1/routers/{id}"));
        assert_eq!(k.island(id), format!("/isthmus/eu-1/islands/{id}"));
        assert_eq!(k.known(id), format!("/isthmus/eu-1/known/{id}"));
        assert_eq!(k.island_of(k.known(id).as_bytes()), None);
        assert_eq!(k.router_of(k.router(id).as_bytes()), Some(id));
        assert_eq!(k.island_of(k.island(id).as_bytes()), Some(id));
        assert_eq!(k.router_of(k.island(id).as_bytes()), None);
        let other = Keys::new("eu-2").expect("name");
        assert_eq!(other.router_of(k.router(id).as_bytes()), None);
        assert_eq!(k.router_of(b"/isthmus/eu-1/routers/not-a-uuid"), None);
    }

    #[test]
    fn names_that_would_break_the_layout_are_refused() {
        for bad in ["", "a/b", "a b", &"x".repeat(65), "é"] {
            let e = Keys::new(bad).expect_err(bad);
            assert!(e.to_string().contains("not usable"), "{e}");
        }
        assert!(Keys::new("default").is_ok());
    }
}
