//! Self-certifying islands and capability keys: who may create, join, send and administer.
//!
//! Every island has three capability secrets derived one way from each other with HKDF-SHA256:
//! admin -> participant -> observer. Holding one gives every capability below it and none above.
//! From each secret comes an Ed25519 key pair. The island's session id is a hash of the three
//! public keys, so the router, given the keys in a hello, checks that they hash to the id and
//! then checks the hello's signature with the key of the role claimed: nobody creates (or
//! re-creates, after a linger or a router restart) an island whose keys they do not hold, and a
//! role is proven, not declared. The router holds only public keys (and, for a LAN-open island,
//! the participant secret its beacon broadcasts to the LAN anyway); it needs no secret.
//!
//! Each replica also has a key pair of its own, random for the life of the process; its replica id
//! is a hash of its public key and the hello is signed by it too, so no one can take over another
//! replica's id. Both signatures cover a fresh nonce the router sends in its preamble, so a hello
//! seen on the wire cannot be replayed on another connection.
//!
//! Everything here uses well-kept crates (ed25519-dalek, hkdf, sha2); nothing is hand-rolled.

use crate::ids::{ReplicaId, SessionId};
use crate::wire::{AdminCommand, HelloBody, Role};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Length of the nonce the router sends after its preamble.
pub const NONCE_LEN: usize = 32;

/// An Ed25519 public key as it travels on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// An Ed25519 signature. Serialized as a byte string whose length must be exactly 64.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signature(..)")
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                let arr: [u8; 64] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Signature(arr))
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(
                self,
                v: &'de [u8],
            ) -> Result<Signature, E> {
                self.visit_bytes(v)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// The three public keys an island's id commits to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IslandKeys {
    /// Proves the admin capability: tick rate, removing replicas, closing the island.
    pub admin: PublicKey,
    /// Proves the participant capability: join, send, provide snapshots.
    pub participant: PublicKey,
    /// Proves the observer capability: join and receive only.
    pub observer: PublicKey,
}

impl IslandKeys {
    /// The session id these keys commit to: the first 16 bytes of a SHA-256 over them, shaped as
    /// a version-8 UUID (122 bits of the hash remain, far past any second-preimage search).
    pub fn session_id(&self) -> SessionId {
        let mut h = Sha256::new();
        h.update(b"isthmus/v2/session-id\0");
        h.update(self.admin.0);
        h.update(self.participant.0);
        h.update(self.observer.0);
        SessionId(uuid_from_hash(h.finalize().into()))
    }

    /// The key that proves `role`.
    pub fn for_role(&self, role: Role) -> PublicKey {
        match role {
            Role::Admin => self.admin,
            Role::Replica => self.participant,
            Role::Observer => self.observer,
        }
    }
}

fn uuid_from_hash(hash: [u8; 32]) -> uuid::Uuid {
    let mut b = [0u8; 16];
    b.copy_from_slice(&hash[..16]);
    uuid::Uuid::new_v8(b)
}

/// The replica id that belongs to a replica public key.
pub fn replica_id_for(key: &PublicKey) -> ReplicaId {
    let mut h = Sha256::new();
    h.update(b"isthmus/v2/replica-id\0");
    h.update(key.0);
    ReplicaId(uuid_from_hash(h.finalize().into()))
}

fn expand(ikm: &[u8; 32], salt: Option<&[u8]>, info: &[u8]) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(salt, ikm);
    let mut out = [0u8; 32];
    hk.expand(info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// One capability secret of an island: the role it grants and its 32 bytes. Deriving goes one
/// way only (admin -> participant -> observer).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    role: Role,
    secret: [u8; 32],
}

impl fmt::Debug for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Capability({:?}, ..)", self.role)
    }
}

impl Capability {
    /// A fresh island: a random admin secret from the operating system.
    pub fn new_island() -> Capability {
        Capability {
            role: Role::Admin,
            secret: random32(),
        }
    }

    /// A capability from its parts, e.g. read from a postcard.
    pub fn from_parts(role: Role, secret: [u8; 32]) -> Capability {
        Capability { role, secret }
    }

    /// The role this secret grants.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The secret bytes (for postcards and beacons of LAN-open islands only).
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// The next weaker capability, if any: admin gives participant, participant gives observer.
    pub fn weaker(&self) -> Option<Capability> {
        let (role, info): (Role, &[u8]) = match self.role {
            Role::Admin => (Role::Replica, b"isthmus/v2/participant-secret"),
            Role::Replica => (Role::Observer, b"isthmus/v2/observer-secret"),
            Role::Observer => return None,
        };
        Some(Capability {
            role,
            secret: expand(&self.secret, None, info),
        })
    }

    /// The capability for `role`, if this one is at least as strong.
    pub fn derive(&self, role: Role) -> Option<Capability> {
        let mut c = *self;
        loop {
            if c.role == role {
                return Some(c);
            }
            c = c.weaker()?;
        }
    }

    /// The Ed25519 key pair of this capability.
    pub fn key_pair(&self) -> KeyPair {
        let info: &[u8] = match self.role {
            Role::Admin => b"isthmus/v2/signing-key/admin",
            Role::Replica => b"isthmus/v2/signing-key/participant",
            Role::Observer => b"isthmus/v2/signing-key/observer",
        };
        KeyPair(SigningKey::from_bytes(&expand(&self.secret, None, info)))
    }

    /// The public keys this capability can compute itself: its own and every weaker one's. The
    /// stronger ones must come from elsewhere (a postcard carries them).
    pub fn public_keys(&self) -> Vec<(Role, PublicKey)> {
        let mut out = Vec::new();
        let mut c = Some(*self);
        while let Some(cap) = c {
            out.push((cap.role, cap.key_pair().public()));
            c = cap.weaker();
        }
        out
    }

    /// The key that seals payloads and snapshots end to end: from the observer secret, so every
    /// legitimate reader has it, bound to the session. The router never sees it.
    pub fn payload_key(&self, session: SessionId) -> Option<[u8; 32]> {
        let obs = self.derive(Role::Observer)?;
        Some(expand(
            &obs.secret,
            Some(session.0.as_bytes()),
            b"isthmus/v2/payload-key",
        ))
    }
}

/// An Ed25519 signing key.
#[derive(Clone)]
pub struct KeyPair(SigningKey);

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPair({:?})", self.public())
    }
}

impl KeyPair {
    /// A fresh random key pair, e.g. a replica's identity for the life of its process.
    pub fn random() -> KeyPair {
        KeyPair(SigningKey::from_bytes(&random32()))
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> Signature {
        Signature(self.0.sign(msg).to_bytes())
    }
}

fn random32() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    // The OS random source failing means the platform is broken; nothing sensible remains.
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    bytes
}

/// A fresh per-connection nonce for the router's preamble.
pub fn fresh_nonce() -> [u8; NONCE_LEN] {
    random32()
}

/// Why a hello or an admin frame was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The keys in the hello do not hash to the session id.
    #[error("the island keys do not match the session id; the postcard is not for this island")]
    KeysDoNotMatchSession,
    /// The replica id is not the hash of the replica key.
    #[error("the replica id does not belong to the replica key")]
    ReplicaIdMismatch,
    /// A public key is not a valid Ed25519 point.
    #[error("a public key in the hello is not a valid Ed25519 key")]
    BadKey,
    /// The signature by the role's key does not verify.
    #[error("the hello is not signed with the {0} key of this island; the postcard does not grant that role")]
    BadRoleSignature(&'static str),
    /// The signature by the replica's own key does not verify.
    #[error("the hello is not signed with the replica's own key")]
    BadReplicaSignature,
    /// An admin frame whose signature does not verify with the admin key.
    #[error("the admin command is not signed with this island's admin key")]
    BadAdminSignature,
}

/// What both signatures of a hello cover: a domain tag, the router's nonce and the whole body.
pub fn hello_transcript(nonce: &[u8; NONCE_LEN], body: &HelloBody) -> Vec<u8> {
    let mut out = b"isthmus/v2/hello\0".to_vec();
    out.extend_from_slice(nonce);
    out.extend_from_slice(&crate::wire::encode_body(body));
    out
}

/// What an admin command's signature covers: the connection's nonce, the session, the
/// command's sequence number on this connection and the command.
pub fn admin_transcript(
    nonce: &[u8; NONCE_LEN],
    session: SessionId,
    seq: u64,
    command: &AdminCommand,
) -> Vec<u8> {
    let mut out = b"isthmus/v2/admin\0".to_vec();
    out.extend_from_slice(nonce);
    out.extend_from_slice(session.0.as_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&crate::wire::encode_body(command));
    out
}

fn verify(key: &PublicKey, msg: &[u8], sig: &Signature) -> Result<bool, AuthError> {
    let vk = VerifyingKey::from_bytes(&key.0).map_err(|_| AuthError::BadKey)?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
    Ok(vk.verify_strict(msg, &sig).is_ok())
}

/// Checks a hello completely: the keys commit to the session, the replica id belongs to the
/// replica key, and both signatures cover this connection's nonce.
pub fn verify_hello(nonce: &[u8; NONCE_LEN], hello: &crate::wire::Hello) -> Result<(), AuthError> {
    let body = &hello.body;
    if body.keys.session_id() != body.session {
        return Err(AuthError::KeysDoNotMatchSession);
    }
    if replica_id_for(&body.replica_key) != body.replica {
        return Err(AuthError::ReplicaIdMismatch);
    }
    let transcript = hello_transcript(nonce, body);
    if !verify(&body.keys.for_role(body.role), &transcript, &hello.role_sig)? {
        return Err(AuthError::BadRoleSignature(role_name(body.role)));
    }
    if !verify(&body.replica_key, &transcript, &hello.replica_sig)? {
        return Err(AuthError::BadReplicaSignature);
    }
    Ok(())
}

/// Checks an admin command's signature with the island's admin key.
pub fn verify_admin(
    keys: &IslandKeys,
    nonce: &[u8; NONCE_LEN],
    session: SessionId,
    seq: u64,
    command: &AdminCommand,
    sig: &Signature,
) -> Result<(), AuthError> {
    let transcript = admin_transcript(nonce, session, seq, command);
    if verify(&keys.admin, &transcript, sig)? {
        Ok(())
    } else {
        Err(AuthError::BadAdminSignature)
    }
}

/// Whether `secret` really is the participant secret of the island with `keys`: the router checks
/// this before it puts a LAN-open island's secret in its beacon.
pub fn is_participant_secret(keys: &IslandKeys, secret: &[u8; 32]) -> bool {
    Capability::from_parts(Role::Replica, *secret)
        .key_pair()
        .public()
        == keys.participant
}

/// The role's name for people.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Replica => "participant",
        Role::Observer => "observer",
    }
}

/// Builds the island keys from an admin capability (the creator's view).
pub fn island_keys(admin: &Capability) -> Option<IslandKeys> {
    if admin.role() != Role::Admin {
        return None;
    }
    let part = admin.weaker()?;
    let obs = part.weaker()?;
    Some(IslandKeys {
        admin: admin.key_pair().public(),
        participant: part.key_pair().public(),
        observer: obs.key_pair().public(),
    })
}

/// Signs a hello body for this connection with the role's key and the replica's own key.
pub fn sign_hello(
    nonce: &[u8; NONCE_LEN],
    body: HelloBody,
    role_key: &KeyPair,
    replica_key: &KeyPair,
) -> crate::wire::Hello {
    let transcript = hello_transcript(nonce, &body);
    crate::wire::Hello {
        role_sig: role_key.sign(&transcript),
        replica_sig: replica_key.sign(&transcript),
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Seq;

    fn body(cap: &Capability, replica: &KeyPair, role: Role) -> HelloBody {
        let admin = Capability::from_parts(Role::Admin, [9; 32]);
        let keys = island_keys(&admin).expect("admin");
        let _ = cap;
        HelloBody {
            session: keys.session_id(),
            keys,
            replica: replica_id_for(&replica.public()),
            replica_key: replica.public(),
            name: "ada".into(),
            role,
            resume_from: Some(Seq(3)),
            create: None,
            control: false,
            recover: None,
        }
    }

    #[test]
    fn derivation_goes_one_way() {
        let admin = Capability::from_parts(Role::Admin, [9; 32]);
        let part = admin.derive(Role::Replica).expect("weaker");
        let obs = part.derive(Role::Observer).expect("weaker");
        assert!(obs.derive(Role::Replica).is_none());
        assert!(part.derive(Role::Admin).is_none());
        assert_eq!(admin.derive(Role::Observer), Some(obs));
        assert_ne!(admin.secret(), part.secret());
        assert_ne!(part.secret(), obs.secret());
        let keys = island_keys(&admin).expect("admin");
        assert!(is_participant_secret(&keys, part.secret()));
        assert!(!is_participant_secret(&keys, obs.secret()));
        assert_eq!(
            part.payload_key(keys.session_id()),
            admin.payload_key(keys.session_id())
        );
    }

    #[test]
    fn hello_verifies_only_with_the_right_key_and_nonce() {
        let admin = Capability::from_parts(Role::Admin, [9; 32]);
        let part = admin.weaker().expect("participant");
        let obs = part.weaker().expect("observer");
        let me = KeyPair::random();
        let nonce = [5; NONCE_LEN];
        let good = sign_hello(
            &nonce,
            body(&part, &me, Role::Replica),
            &part.key_pair(),
            &me,
        );
        assert_eq!(verify_hello(&nonce, &good), Ok(()));
        // Replayed on another connection.
        assert!(verify_hello(&[6; NONCE_LEN], &good).is_err());
        // An observer claiming to be a participant.
        let liar = sign_hello(&nonce, body(&obs, &me, Role::Replica), &obs.key_pair(), &me);
        assert_eq!(
            verify_hello(&nonce, &liar),
            Err(AuthError::BadRoleSignature("participant"))
        );
        // Someone else's replica id.
        let other = KeyPair::random();
        let mut b = body(&part, &me, Role::Replica);
        b.replica = replica_id_for(&other.public());
        let stolen = sign_hello(&nonce, b, &part.key_pair(), &me);
        assert_eq!(
            verify_hello(&nonce, &stolen),
            Err(AuthError::ReplicaIdMismatch)
        );
        // Keys that do not hash to the session.
        let mut b = body(&part, &me, Role::Replica);
        b.session = SessionId(uuid::Uuid::from_u128(1));
        let wrong = sign_hello(&nonce, b, &part.key_pair(), &me);
        assert_eq!(
            verify_hello(&nonce, &wrong),
            Err(AuthError::KeysDoNotMatchSession)
        );
    }

    #[test]
    fn admin_commands_verify_with_the_admin_key_only() {
        let admin = Capability::from_parts(Role::Admin, [1; 32]);
        let keys = island_keys(&admin).expect("admin");
        let nonce = [2; NONCE_LEN];
        let cmd = AdminCommand::Close;
        let t = admin_transcript(&nonce, keys.session_id(), 1, &cmd);
        let sig = admin.key_pair().sign(&t);
        assert!(verify_admin(&keys, &nonce, keys.session_id(), 1, &cmd, &sig).is_ok());
        assert!(verify_admin(&keys, &nonce, keys.session_id(), 2, &cmd, &sig).is_err());
        let part = admin.weaker().expect("participant");
        let forged = part.key_pair().sign(&t);
        assert!(verify_admin(&keys, &nonce, keys.session_id(), 1, &cmd, &forged).is_err());
    }
}
