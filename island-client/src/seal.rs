//! End-to-end sealing of payloads and snapshots with XChaCha20-Poly1305.
//!
//! The key is [`Capability::payload_key`]: derived from the observer secret, so every legitimate
//! reader of the island has it and the router (which holds no observer secret) does not. A
//! payload's 24-byte nonce is the sender's replica id (16 bytes) followed by its client seq (8
//! bytes, big-endian): a replica id is random per process and client seqs only grow, so a nonce
//! never repeats under one key, and a resend re-uses the sealed bytes rather than sealing again.
//! The associated data binds the session, the origin replica and the client seq, so the router
//! cannot move a payload to another island or pin it on another replica. Stamping one twice, or
//! an older one after a newer, is caught by the replica (each sender's client seqs must rise;
//! see `Replica`), not by the seal. A snapshot gets a random nonce (sent in front
//! of it) and binds the session and the seq it was taken after.
//!
//! [`Capability::payload_key`]: isthmus_router::auth::Capability::payload_key

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use isthmus_router::ids::{ReplicaId, Seq, SessionId};

/// Bytes the authentication tag adds to every sealed payload.
pub const TAG_LEN: usize = 16;
/// Bytes of an XChaCha20 nonce.
pub const NONCE_LEN: usize = 24;
/// Bytes sealing adds to a snapshot: its nonce in front and the tag.
pub const SNAPSHOT_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Seals and opens one island's payloads and snapshots.
#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
    session: SessionId,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({})", self.session)
    }
}

fn payload_nonce(origin: ReplicaId, client_seq: u64) -> XNonce {
    let mut n = [0u8; NONCE_LEN];
    n[..16].copy_from_slice(origin.0.as_bytes());
    n[16..].copy_from_slice(&client_seq.to_be_bytes());
    XNonce::from(n)
}

impl Sealer {
    /// A sealer for `session` under `key`.
    pub fn new(key: &[u8; 32], session: SessionId) -> Sealer {
        Sealer {
            cipher: XChaCha20Poly1305::new(key.into()),
            session,
        }
    }

    fn payload_ad(&self, origin: ReplicaId, client_seq: u64) -> Vec<u8> {
        let mut ad = b"isthmus/v2/payload\0".to_vec();
        ad.extend_from_slice(self.session.0.as_bytes());
        ad.extend_from_slice(origin.0.as_bytes());
        ad.extend_from_slice(&client_seq.to_be_bytes());
        ad
    }

    fn snapshot_ad(&self, at: Seq) -> Vec<u8> {
        let mut ad = b"isthmus/v2/snapshot\0".to_vec();
        ad.extend_from_slice(self.session.0.as_bytes());
        ad.extend_from_slice(&at.0.to_be_bytes());
        ad
    }

    /// Seals one payload sent by `origin` as its `client_seq`-th send.
    pub fn seal_payload(&self, origin: ReplicaId, client_seq: u64, plain: &[u8]) -> Vec<u8> {
        let ad = self.payload_ad(origin, client_seq);
        self.cipher
            .encrypt(
                &payload_nonce(origin, client_seq),
                Payload {
                    msg: plain,
                    aad: &ad,
                },
            )
            // Only inputs past 256 GiB make XChaCha20-Poly1305 fail; payloads are bounded far below.
            .expect("sealing a bounded payload cannot fail")
    }

    /// Opens a payload; `None` if it was not sealed under this key for this origin and seq, or
    /// was changed on the way.
    pub fn open_payload(
        &self,
        origin: ReplicaId,
        client_seq: u64,
        sealed: &[u8],
    ) -> Option<Vec<u8>> {
        let ad = self.payload_ad(origin, client_seq);
        self.cipher
            .decrypt(
                &payload_nonce(origin, client_seq),
                Payload {
                    msg: sealed,
                    aad: &ad,
                },
            )
            .ok()
    }

    /// Seals a snapshot taken after `at`: a random nonce, then the ciphertext.
    pub fn seal_snapshot(&self, at: Seq, plain: &[u8]) -> Vec<u8> {
        let mut n = [0u8; NONCE_LEN];
        // The OS random source failing means the platform is broken; nothing sensible remains.
        getrandom::fill(&mut n).expect("the operating system's random source failed");
        let ad = self.snapshot_ad(at);
        let sealed = self
            .cipher
            .encrypt(
                &XNonce::from(n),
                Payload {
                    msg: plain,
                    aad: &ad,
                },
            )
            .expect("sealing a bounded snapshot cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&n);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a snapshot said to be taken after `at`.
    pub fn open_snapshot(&self, at: Seq, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < SNAPSHOT_OVERHEAD {
            return None;
        }
        let (n, body) = sealed.split_at(NONCE_LEN);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(n);
        let ad = self.snapshot_ad(at);
        self.cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: body,
                    aad: &ad,
                },
            )
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn payloads_open_only_for_the_same_origin_seq_session_and_key() {
        let s = SessionId(Uuid::from_u128(1));
        let me = ReplicaId(Uuid::from_u128(2));
        let sealer = Sealer::new(&[7; 32], s);
        let sealed = sealer.seal_payload(me, 5, b"hello");
        assert_eq!(sealed.len(), 5 + TAG_LEN);
        assert_eq!(sealer.open_payload(me, 5, &sealed), Some(b"hello".to_vec()));
        assert_eq!(sealer.open_payload(me, 6, &sealed), None);
        assert_eq!(
            sealer.open_payload(ReplicaId(Uuid::from_u128(3)), 5, &sealed),
            None
        );
        assert_eq!(
            Sealer::new(&[7; 32], SessionId(Uuid::from_u128(9))).open_payload(me, 5, &sealed),
            None
        );
        assert_eq!(Sealer::new(&[8; 32], s).open_payload(me, 5, &sealed), None);
        // Sealing is deterministic per (origin, seq): a resend is byte-identical anyway.
        assert_eq!(sealer.seal_payload(me, 5, b"hello"), sealed);
    }

    #[test]
    fn snapshots_bind_their_seq() {
        let sealer = Sealer::new(&[7; 32], SessionId(Uuid::from_u128(1)));
        let sealed = sealer.seal_snapshot(Seq(4), b"state");
        assert_eq!(sealed.len(), 5 + SNAPSHOT_OVERHEAD);
        assert_eq!(
            sealer.open_snapshot(Seq(4), &sealed),
            Some(b"state".to_vec())
        );
        assert_eq!(sealer.open_snapshot(Seq(5), &sealed), None);
        assert_eq!(sealer.open_snapshot(Seq(4), &sealed[..10]), None);
    }
}
