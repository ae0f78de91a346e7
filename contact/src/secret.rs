//! The island's join secret and the keys derived from it.

use hkdf::Hkdf;
use isthmus_router::ids::SessionId;
use isthmus_router::wire::JoinToken;
use sha2::Sha256;
use std::fmt;

/// 32 random bytes that admit a replica to an island. It travels in postcards and LAN beacons
/// of open islands; the router only ever sees a token derived from it (and keeps a hash of that).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct JoinSecret(pub [u8; 32]);

impl JoinSecret {
    /// A fresh secret from the operating system's random source.
    pub fn random() -> Self {
        let mut bytes = [0u8; 32];
        // The OS random source failing means the platform is broken; nothing sensible remains.
        getrandom::fill(&mut bytes).expect("the operating system's random source failed");
        JoinSecret(bytes)
    }

    /// The token presented to the router for `session`. Bound to the session id, so one secret
    /// reused across islands yields unrelated tokens.
    pub fn join_token(&self, session: SessionId) -> JoinToken {
        let hk = Hkdf::<Sha256>::new(Some(session.0.as_bytes()), &self.0);
        let mut out = [0u8; 32];
        hk.expand(b"isthmus/join-token/v1", &mut out)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        JoinToken(out)
    }

    /// The first characters of the secret's hex form, for display without revealing it.
    pub fn fingerprint(&self) -> String {
        self.0.iter().take(3).map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinSecret({}..)", self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn tokens_differ_per_session_and_secret() {
        let s = JoinSecret([1; 32]);
        let a = SessionId(Uuid::from_u128(1));
        let b = SessionId(Uuid::from_u128(2));
        assert_eq!(s.join_token(a), s.join_token(a));
        assert_ne!(s.join_token(a), s.join_token(b));
        assert_ne!(s.join_token(a), JoinSecret([2; 32]).join_token(a));
    }
}
