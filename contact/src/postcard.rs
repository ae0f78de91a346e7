//! Contact points and the postcard text format.
//!
//! A postcard reads `isthmus1:` followed by base32 (RFC 4648 alphabet, no padding; any case) of
//! a private, versioned binary form with a CRC-32 at the end. The checksum covers the prefix too.
//! CRC-32 detects every error burst up to 32 bits, so a single wrong character (5 bits) or two
//! swapped neighbours (at most 10 bits) is always reported as damage, never misread. Whitespace
//! and line breaks anywhere are ignored, so a postcard survives being wrapped by a mail client.

use crate::secret::JoinSecret;
use isthmus_router::ids::SessionId;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use uuid::Uuid;

/// The kind prefix; the version digit follows it.
pub const POSTCARD_KIND: &str = "isthmus";
/// The format version this build writes and reads.
const VERSION: u32 = 1;
/// Longest island name carried, in bytes: postcards must stay short enough to paste.
pub const MAX_ISLAND_NAME_BYTES: usize = 64;
/// Addresses of each kind carried at most; a host has few interfaces worth naming.
const MAX_ADDRESSES: usize = 8;
/// Longest text accepted before decoding, so pasted garbage is refused cheaply.
const MAX_TEXT: usize = 2048;
const CHECKSUM_LEN: usize = 4;

/// Everything a replica needs to reach an island's router, except the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactPoint {
    /// The island's session.
    pub session: SessionId,
    /// Its name, for people.
    pub name: String,
    /// Where in the island to arrive (Croquet's teleport destination), if anywhere.
    pub destination: Option<Uuid>,
    /// Router addresses on its LAN, best first.
    pub internal: Vec<SocketAddr>,
    /// The router's address from the Internet (manual forwarding or UPnP), if it has one.
    pub external: Option<SocketAddr>,
    /// The router instance that issued this, to tell routers apart.
    pub router: Option<Uuid>,
}

impl ContactPoint {
    /// A contact point with internal addresses only.
    pub fn new(session: SessionId, name: impl Into<String>, internal: Vec<SocketAddr>) -> Self {
        ContactPoint {
            session,
            name: name.into(),
            destination: None,
            internal,
            external: None,
            router: None,
        }
    }

    /// Every address to try, internal ones first (they work inside the LAN, where the external
    /// one often does not: many home routers cannot hairpin).
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let mut out = self.internal.clone();
        out.extend(self.external.filter(|e| !out.contains(e)));
        out
    }
}

/// A contact point plus the join secret: all a remote friend needs to join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Postcard {
    /// Where to go.
    pub contact: ContactPoint,
    /// The key to the door.
    pub secret: JoinSecret,
}

/// Why a postcard could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PostcardError {
    /// It does not start with `isthmus`.
    #[error("not an isthmus postcard (it should start with \"{POSTCARD_KIND}{VERSION}:\")")]
    WrongKind,
    /// The version digit is not one this build reads.
    #[error("postcard version {0} cannot be read by this isthmus (it reads version {VERSION}); the postcard is damaged or was made by a newer isthmus")]
    Version(String),
    /// Wrong characters, a wrong length or a checksum mismatch.
    #[error("the postcard is damaged ({0}); ask for it again, or copy all of it")]
    Damaged(String),
    /// Too long to be a postcard.
    #[error("too long to be a postcard ({0} characters)")]
    TooLong(usize),
    /// The fields do not fit in a postcard.
    #[error("cannot make a postcard: {0}")]
    Invalid(String),
}

#[derive(Serialize, Deserialize)]
struct WireV1 {
    session: Uuid,
    name: String,
    destination: Option<Uuid>,
    internal: Vec<SocketAddr>,
    external: Option<SocketAddr>,
    router: Option<Uuid>,
    secret: [u8; 32],
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_TEXT>()
}

fn prefix() -> String {
    format!("{POSTCARD_KIND}{VERSION}:")
}

impl Postcard {
    /// Checks the limits that keep a postcard short.
    pub fn validate(&self) -> Result<(), PostcardError> {
        let c = &self.contact;
        if c.name.len() > MAX_ISLAND_NAME_BYTES {
            return Err(PostcardError::Invalid(format!(
                "island name longer than {MAX_ISLAND_NAME_BYTES} bytes"
            )));
        }
        if c.internal.len() > MAX_ADDRESSES {
            return Err(PostcardError::Invalid(format!(
                "more than {MAX_ADDRESSES} internal addresses"
            )));
        }
        Ok(())
    }

    fn to_bytes(&self) -> Vec<u8> {
        let c = &self.contact;
        let wire = WireV1 {
            session: c.session.0,
            name: c.name.clone(),
            destination: c.destination,
            internal: c.internal.clone(),
            external: c.external,
            router: c.router,
            secret: self.secret.0,
        };
        let mut bytes = bincode::serde::encode_to_vec(&wire, bincode_config())
            .expect("a postcard of validated size encodes");
        let crc = checksum(&bytes);
        bytes.extend_from_slice(&crc.to_be_bytes());
        bytes
    }
}

fn checksum(body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(prefix().as_bytes());
    h.update(body);
    h.finalize()
}

impl fmt::Display for Postcard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = data_encoding::BASE32_NOPAD.encode(&self.to_bytes());
        write!(f, "{}{}", prefix(), body.to_ascii_lowercase())
    }
}

impl FromStr for Postcard {
    type Err = PostcardError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() > MAX_TEXT {
            return Err(PostcardError::TooLong(text.chars().count()));
        }
        let compact: String = text
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        let rest = compact
            .strip_prefix(POSTCARD_KIND)
            .ok_or(PostcardError::WrongKind)?;
        let (version, body) = rest
            .split_once(':')
            .ok_or_else(|| PostcardError::Damaged("the ':' after the version is missing".into()))?;
        if version != VERSION.to_string() {
            return Err(PostcardError::Version(version.to_string()));
        }
        let upper = body.to_ascii_uppercase();
        let bytes = data_encoding::BASE32_NOPAD
            .decode(upper.as_bytes())
            .map_err(|e| PostcardError::Damaged(format!("{e}")))?;
        if bytes.len() <= CHECKSUM_LEN {
            return Err(PostcardError::Damaged("too short".into()));
        }
        let (payload, crc) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        let expected = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if checksum(payload) != expected {
            return Err(PostcardError::Damaged("checksum mismatch".into()));
        }
        let (wire, used): (WireV1, usize) =
            bincode::serde::decode_from_slice(payload, bincode_config())
                .map_err(|e| PostcardError::Damaged(format!("unreadable contents: {e}")))?;
        if used != payload.len() {
            return Err(PostcardError::Damaged("unexpected extra contents".into()));
        }
        let card = Postcard {
            contact: ContactPoint {
                session: SessionId(wire.session),
                name: wire.name,
                destination: wire.destination,
                internal: wire.internal,
                external: wire.external,
                router: wire.router,
            },
            secret: JoinSecret(wire.secret),
        };
        card.validate()
            .map_err(|e| PostcardError::Damaged(e.to_string()))?;
        Ok(card)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u16; 8]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        ]
    }

    fn arb_postcard() -> impl Strategy<Value = Postcard> {
        (
            any::<u128>(),
            "[a-z ]{0,24}",
            any::<Option<u128>>(),
            proptest::collection::vec(arb_addr(), 0..4),
            proptest::option::of(arb_addr()),
            any::<Option<u128>>(),
            any::<[u8; 32]>(),
        )
            .prop_map(
                |(s, name, dest, internal, external, router, secret)| Postcard {
                    contact: ContactPoint {
                        session: SessionId(Uuid::from_u128(s)),
                        name,
                        destination: dest.map(Uuid::from_u128),
                        internal,
                        external,
                        router: router.map(Uuid::from_u128),
                    },
                    secret: JoinSecret(secret),
                },
            )
    }

    fn typical() -> Postcard {
        let mut contact = ContactPoint::new(
            SessionId(Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0)),
            "the garden of forking paths",
            vec!["192.168.1.20:7470".parse().expect("addr")],
        );
        contact.external = Some("203.0.113.9:7470".parse().expect("addr"));
        contact.router = Some(Uuid::from_u128(77));
        contact.destination = Some(Uuid::from_u128(78));
        Postcard {
            contact,
            secret: JoinSecret([9; 32]),
        }
    }

    #[test]
    fn a_typical_postcard_is_short() {
        let text = typical().to_string();
        assert!(text.len() < 300, "{} characters: {text}", text.len());
        assert!(text.starts_with("isthmus1:"));
    }

    #[test]
    fn pasted_with_line_breaks_and_other_case_still_reads() {
        let card = typical();
        let text = card.to_string();
        let mangled: String = text
            .to_ascii_uppercase()
            .chars()
            .enumerate()
            .flat_map(|(i, c)| {
                let mut v = vec![c];
                if i % 40 == 39 {
                    v.extend(['\r', '\n', ' ']);
                }
                v
            })
            .collect();
        assert_eq!(format!("  {mangled}\n").parse::<Postcard>(), Ok(card));
    }

    #[test]
    fn garbage_is_refused_plainly() {
        assert_eq!("hello".parse::<Postcard>(), Err(PostcardError::WrongKind));
        assert!(matches!(
            "isthmus9:abc".parse::<Postcard>(),
            Err(PostcardError::Version(_))
        ));
        assert!(matches!(
            "isthmus1:".parse::<Postcard>(),
            Err(PostcardError::Damaged(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn round_trip(card in arb_postcard()) {
            let text = card.to_string();
            prop_assert_eq!(text.parse::<Postcard>(), Ok(card));
        }

        #[test]
        fn every_single_character_substitution_is_caught(card in arb_postcard(), pick in any::<prop::sample::Index>()) {
            let text = card.to_string();
            let chars: Vec<char> = text.chars().collect();
            let i = pick.index(chars.len());
            let alphabet = "abcdefghijklmnopqrstuvwxyz234567:1";
            for replacement in alphabet.chars() {
                if replacement.eq_ignore_ascii_case(&chars[i]) {
                    continue;
                }
                let mut damaged = chars.clone();
                damaged[i] = replacement;
                let damaged: String = damaged.into_iter().collect();
                prop_assert!(damaged.parse::<Postcard>().is_err(), "misread {} (position {})", damaged, i);
            }
        }

        #[test]
        fn adjacent_transpositions_are_caught(card in arb_postcard(), pick in any::<prop::sample::Index>()) {
            let text = card.to_string();
            let mut chars: Vec<char> = text.chars().collect();
            let i = pick.index(chars.len() - 1);
            if chars[i] != chars[i + 1] {
                chars.swap(i, i + 1);
                let swapped: String = chars.into_iter().collect();
                prop_assert!(swapped.parse::<Postcard>().is_err());
            }
        }

        #[test]
        fn no_panic_on_any_input(text in ".{0,400}") {
            let _ = text.parse::<Postcard>();
        }

        #[test]
        fn no_panic_on_postcard_like_input(body in "[a-z2-7]{0,300}") {
            let _ = format!("isthmus1:{body}").parse::<Postcard>();
        }
    }
}
