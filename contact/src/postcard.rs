//! Contact points and the postcard text format.
//!
//! A postcard reads `isthmus2:` followed by base32 (RFC 4648 alphabet, no padding; any case) of
//! a private, versioned binary form with a CRC-32 at the end. The checksum covers the prefix too.
//! CRC-32 detects every error burst up to 32 bits, so a single wrong character (5 bits) or two
//! swapped neighbours (at most 10 bits) is always reported as damage, never misread. Whitespace
//! and line breaks anywhere are ignored, so a postcard survives being wrapped by a mail client.
//!
//! The body carries one capability (its role and 32-byte secret), the island public keys that
//! capability cannot derive itself (a participant postcard carries the admin key; an observer
//! postcard the admin and participant keys), and the contact point. The session id is not
//! carried: it is the hash of the keys, so a postcard can never point at a wrong island.

use isthmus_router::auth::{self, Capability, IslandKeys, PublicKey};
use isthmus_router::ids::SessionId;
use isthmus_router::wire::Role;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use uuid::Uuid;

/// The kind prefix; the version digit follows it.
pub const POSTCARD_KIND: &str = "isthmus";
/// The format version this build writes and reads.
const VERSION: u32 = 2;
/// Longest island name carried, in bytes: postcards must stay short enough to paste.
pub const MAX_ISLAND_NAME_BYTES: usize = 64;
/// Internal addresses carried at most; a host has few interfaces worth naming.
pub const MAX_INTERNAL_ADDRESSES: usize = 8;
/// Longest text accepted before decoding, so pasted garbage is refused cheaply.
const MAX_TEXT: usize = 2048;
const CHECKSUM_LEN: usize = 4;
const BASE32_ALPHABET: &str = "abcdefghijklmnopqrstuvwxyz234567";

/// Everything a replica needs to reach an island's router, except the capability.
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

/// A contact point plus one capability of the island and its public keys: all a friend needs to
/// join (as admin, participant or observer, as the capability grants).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Postcard {
    /// Where to go. `contact.session` is always `keys.session_id()`.
    pub contact: ContactPoint,
    /// The key to the door, and which door.
    pub capability: Capability,
    /// The island's public keys.
    pub keys: IslandKeys,
}

/// Why a postcard could not be read or made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PostcardError {
    /// It does not start with `isthmus`.
    #[error("not an isthmus postcard (it should start with \"{POSTCARD_KIND}{VERSION}:\")")]
    WrongKind,
    /// A version-1 postcard: it carries a join secret this build no longer accepts.
    #[error("this postcard was made by an older isthmus (protocol 1); ask for a new one")]
    OldVersion,
    /// The version digit is not one this build reads.
    #[error("postcard version {0} cannot be read by this isthmus (it reads version {VERSION}); the postcard is damaged or was made by a newer isthmus")]
    Version(String),
    /// Wrong characters, a wrong length or a checksum mismatch.
    #[error("the postcard is damaged ({0}); ask for it again, or copy all of it")]
    Damaged(String),
    /// Too long to be a postcard.
    #[error("too long to be a postcard ({0} characters)")]
    TooLong(usize),
    /// The parts do not make a postcard.
    #[error("cannot make a postcard: {0}")]
    Invalid(String),
}

/// The body after the prefix. `keys` holds exactly the public keys the role cannot derive, the
/// strongest first: admin none, participant `[admin]`, observer `[admin, participant]`.
#[derive(Serialize, Deserialize)]
struct WireV2 {
    role: u8,
    secret: [u8; 32],
    keys: Vec<PublicKey>,
    name: String,
    destination: Option<Uuid>,
    internal: Vec<SocketAddr>,
    external: Option<SocketAddr>,
    router: Option<Uuid>,
}

fn role_byte(role: Role) -> u8 {
    match role {
        Role::Admin => 0,
        Role::Replica => 1,
        Role::Observer => 2,
    }
}

fn role_from_byte(b: u8) -> Option<Role> {
    match b {
        0 => Some(Role::Admin),
        1 => Some(Role::Replica),
        2 => Some(Role::Observer),
        _ => None,
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_TEXT>()
}

fn prefix() -> String {
    format!("{POSTCARD_KIND}{VERSION}:")
}

/// The island keys from a capability and the stronger keys it cannot derive (strongest first).
pub(crate) fn assemble_keys(capability: &Capability, stronger: &[PublicKey]) -> Option<IslandKeys> {
    let own = capability.public_keys();
    let find = |role: Role| own.iter().find(|(r, _)| *r == role).map(|(_, k)| *k);
    match (capability.role(), stronger) {
        (Role::Admin, []) => Some(IslandKeys {
            admin: find(Role::Admin)?,
            participant: find(Role::Replica)?,
            observer: find(Role::Observer)?,
        }),
        (Role::Replica, [admin]) => Some(IslandKeys {
            admin: *admin,
            participant: find(Role::Replica)?,
            observer: find(Role::Observer)?,
        }),
        (Role::Observer, [admin, participant]) => Some(IslandKeys {
            admin: *admin,
            participant: *participant,
            observer: find(Role::Observer)?,
        }),
        _ => None,
    }
}

/// Cuts a name to [`MAX_ISLAND_NAME_BYTES`] on a character boundary.
fn clip_name(name: &str) -> String {
    let mut end = name.len().min(MAX_ISLAND_NAME_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

impl Postcard {
    /// A postcard for `capability` of the island with `keys`. The contact's session is set from
    /// the keys; the name is cut to [`MAX_ISLAND_NAME_BYTES`] and the internal addresses to the
    /// first [`MAX_INTERNAL_ADDRESSES`] (the caller lists the best first), so every postcard made
    /// is one every joiner can read. Fails if the capability is not one of these keys'.
    pub fn new(
        mut contact: ContactPoint,
        capability: Capability,
        keys: IslandKeys,
    ) -> Result<Postcard, PostcardError> {
        if capability.key_pair().public() != keys.for_role(capability.role()) {
            return Err(PostcardError::Invalid(format!(
                "the {} secret does not belong to this island's keys",
                auth::role_name(capability.role())
            )));
        }
        contact.session = keys.session_id();
        contact.name = clip_name(&contact.name);
        contact.internal.truncate(MAX_INTERNAL_ADDRESSES);
        Ok(Postcard {
            contact,
            capability,
            keys,
        })
    }

    /// The admin postcard of a fresh island (the creator's), from its admin capability.
    pub fn for_new_island(
        contact: ContactPoint,
        admin: Capability,
    ) -> Result<Postcard, PostcardError> {
        let keys = auth::island_keys(&admin).ok_or_else(|| {
            PostcardError::Invalid("a new island needs an admin capability".into())
        })?;
        Postcard::new(contact, admin, keys)
    }

    /// The role this postcard grants.
    pub fn role(&self) -> Role {
        self.capability.role()
    }

    /// The island's session id (the hash of its keys).
    pub fn session(&self) -> SessionId {
        self.keys.session_id()
    }

    /// The same island with a weaker-or-equal capability, derived offline; `None` when this
    /// postcard's role is weaker than `role` (a capability never derives upwards).
    pub fn with_role(&self, role: Role) -> Option<Postcard> {
        let capability = self.capability.derive(role)?;
        Some(Postcard {
            contact: self.contact.clone(),
            capability,
            keys: self.keys,
        })
    }

    /// The participant postcard of this island, if this one is admin or participant.
    pub fn participant(&self) -> Option<Postcard> {
        self.with_role(Role::Replica)
    }

    /// The observer postcard of this island: every postcard gives one.
    pub fn observer(&self) -> Option<Postcard> {
        self.with_role(Role::Observer)
    }

    /// Checks the limits that keep a postcard short and its parts consistent.
    pub fn validate(&self) -> Result<(), PostcardError> {
        let c = &self.contact;
        if c.name.len() > MAX_ISLAND_NAME_BYTES {
            return Err(PostcardError::Invalid(format!(
                "island name longer than {MAX_ISLAND_NAME_BYTES} bytes"
            )));
        }
        if c.internal.len() > MAX_INTERNAL_ADDRESSES {
            return Err(PostcardError::Invalid(format!(
                "more than {MAX_INTERNAL_ADDRESSES} internal addresses"
            )));
        }
        if c.session != self.keys.session_id() {
            return Err(PostcardError::Invalid(
                "the session id is not the one the keys give".into(),
            ));
        }
        if self.capability.key_pair().public() != self.keys.for_role(self.role()) {
            return Err(PostcardError::Invalid(format!(
                "the {} secret does not belong to this island's keys",
                auth::role_name(self.role())
            )));
        }
        Ok(())
    }

    fn to_bytes(&self) -> Vec<u8> {
        let c = &self.contact;
        let keys = match self.role() {
            Role::Admin => vec![],
            Role::Replica => vec![self.keys.admin],
            Role::Observer => vec![self.keys.admin, self.keys.participant],
        };
        // Clipped here too, so even a postcard assembled by hand prints as one that reads back.
        let mut internal = c.internal.clone();
        internal.truncate(MAX_INTERNAL_ADDRESSES);
        let wire = WireV2 {
            role: role_byte(self.role()),
            secret: *self.capability.secret(),
            keys,
            name: clip_name(&c.name),
            destination: c.destination,
            internal,
            external: c.external,
            router: c.router,
        };
        let mut bytes = bincode::serde::encode_to_vec(&wire, bincode_config())
            .expect("a postcard of clipped size encodes");
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

/// Splits pasted text into the kind+version part and the base32 body, keeping each body
/// character's position (1-based, in characters) in the text as pasted.
fn split_pasted(text: &str) -> Result<(String, Vec<(usize, char)>), PostcardError> {
    let mut head = String::new();
    let mut body = Vec::new();
    let mut seen_colon = false;
    for (i, c) in text.chars().enumerate() {
        if c.is_whitespace() {
            continue;
        }
        if seen_colon {
            body.push((i + 1, c.to_ascii_lowercase()));
        } else if c == ':' {
            seen_colon = true;
        } else {
            head.push(c.to_ascii_lowercase());
        }
    }
    if !seen_colon {
        // Without a colon, tell "not a postcard at all" from "the colon got lost".
        if head.starts_with(POSTCARD_KIND) && head.len() > POSTCARD_KIND.len() + 8 {
            return Err(PostcardError::Damaged(format!(
                "the ':' after \"{POSTCARD_KIND}{VERSION}\" is missing"
            )));
        }
        return Err(PostcardError::WrongKind);
    }
    Ok((head, body))
}

impl FromStr for Postcard {
    type Err = PostcardError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() > MAX_TEXT {
            return Err(PostcardError::TooLong(text.chars().count()));
        }
        let (head, body) = split_pasted(text)?;
        let version = head
            .strip_prefix(POSTCARD_KIND)
            .ok_or(PostcardError::WrongKind)?;
        if version == "1" {
            return Err(PostcardError::OldVersion);
        }
        if version != VERSION.to_string() {
            return Err(PostcardError::Version(version.to_string()));
        }
        if let Some((pos, c)) = body.iter().find(|(_, c)| !BASE32_ALPHABET.contains(*c)) {
            return Err(PostcardError::Damaged(format!(
                "character {pos}, {c:?}, is not one a postcard uses (only letters and the digits 2 to 7)"
            )));
        }
        let upper: String = body.iter().map(|(_, c)| c.to_ascii_uppercase()).collect();
        let bytes = data_encoding::BASE32_NOPAD
            .decode(upper.as_bytes())
            .map_err(|e| {
                PostcardError::Damaged(match e.kind {
                    // The last character's spare bits must be zero; a changed last character
                    // usually breaks that without changing the length.
                    data_encoding::DecodeKind::Trailing => {
                        "its end is damaged: the last character was changed, or a character is missing or extra".to_string()
                    }
                    _ => format!(
                        "it is {} characters long after the prefix, which no postcard is: a character is missing or extra",
                        body.len()
                    ),
                })
            })?;
        if bytes.len() <= CHECKSUM_LEN {
            return Err(PostcardError::Damaged(
                "it is too short: most of it is missing".into(),
            ));
        }
        let (payload, crc) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        let expected = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if checksum(payload) != expected {
            return Err(PostcardError::Damaged(
                "its checksum does not match: a character was changed, swapped or lost".into(),
            ));
        }
        let (wire, used): (WireV2, usize) =
            bincode::serde::decode_from_slice(payload, bincode_config())
                .map_err(|e| PostcardError::Damaged(format!("its contents do not read: {e}")))?;
        if used != payload.len() {
            return Err(PostcardError::Damaged(
                "it has unexpected contents at the end".into(),
            ));
        }
        let role = role_from_byte(wire.role).ok_or_else(|| {
            PostcardError::Damaged(format!("it grants an unknown role ({})", wire.role))
        })?;
        let capability = Capability::from_parts(role, wire.secret);
        let keys = assemble_keys(&capability, &wire.keys).ok_or_else(|| {
            PostcardError::Damaged(format!(
                "a {} postcard with {} island keys",
                auth::role_name(role),
                wire.keys.len()
            ))
        })?;
        let card = Postcard {
            contact: ContactPoint {
                session: keys.session_id(),
                name: wire.name,
                destination: wire.destination,
                internal: wire.internal,
                external: wire.external,
                router: wire.router,
            },
            capability,
            keys,
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

    fn arb_role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Admin), Just(Role::Replica), Just(Role::Observer)]
    }

    fn arb_postcard() -> impl Strategy<Value = Postcard> {
        (
            "[a-z ]{0,24}",
            any::<Option<u128>>(),
            proptest::collection::vec(arb_addr(), 0..4),
            proptest::option::of(arb_addr()),
            any::<Option<u128>>(),
            any::<[u8; 32]>(),
            arb_role(),
        )
            .prop_map(|(name, dest, internal, external, router, secret, role)| {
                let mut contact = ContactPoint::new(SessionId(Uuid::nil()), name, internal);
                contact.destination = dest.map(Uuid::from_u128);
                contact.external = external;
                contact.router = router.map(Uuid::from_u128);
                let admin = Capability::from_parts(Role::Admin, secret);
                Postcard::for_new_island(contact, admin)
                    .expect("admin postcard")
                    .with_role(role)
                    .expect("weaker role")
            })
    }

    fn typical_admin() -> Postcard {
        let mut contact = ContactPoint::new(
            SessionId(Uuid::nil()),
            "the garden of forking paths",
            vec!["192.168.1.20:7470".parse().expect("addr")],
        );
        contact.external = Some("203.0.113.9:7470".parse().expect("addr"));
        contact.router = Some(Uuid::from_u128(77));
        contact.destination = Some(Uuid::from_u128(78));
        Postcard::for_new_island(contact, Capability::from_parts(Role::Admin, [9; 32]))
            .expect("postcard")
    }

    #[test]
    fn a_typical_postcard_is_short() {
        for card in [
            typical_admin(),
            typical_admin().participant().expect("participant"),
            typical_admin().observer().expect("observer"),
        ] {
            let text = card.to_string();
            assert!(text.len() < 400, "{} characters: {text}", text.len());
            assert!(text.starts_with("isthmus2:"));
        }
    }

    #[test]
    fn the_session_comes_from_the_keys() {
        let admin = typical_admin();
        let part = admin.participant().expect("participant");
        let obs = part.observer().expect("observer");
        for card in [&admin, &part, &obs] {
            assert_eq!(card.contact.session, admin.keys.session_id());
            let back: Postcard = card.to_string().parse().expect("reads");
            assert_eq!(&back, card);
            assert_eq!(back.session(), admin.keys.session_id());
        }
        assert_eq!(admin.role(), Role::Admin);
        assert_eq!(part.role(), Role::Replica);
        assert_eq!(obs.role(), Role::Observer);
    }

    #[test]
    fn capabilities_never_derive_upwards() {
        let obs = typical_admin().observer().expect("observer");
        assert!(obs.participant().is_none());
        assert!(obs.with_role(Role::Admin).is_none());
        let part = typical_admin().participant().expect("participant");
        assert!(part.with_role(Role::Admin).is_none());
        assert_eq!(obs.observer(), Some(obs.clone()));
    }

    #[test]
    fn a_capability_of_another_island_is_refused() {
        let card = typical_admin();
        let other = Capability::from_parts(Role::Replica, [3; 32]);
        assert!(matches!(
            Postcard::new(card.contact.clone(), other, card.keys),
            Err(PostcardError::Invalid(_))
        ));
    }

    #[test]
    fn many_internal_addresses_keep_the_first_eight_in_order() {
        let mut card = typical_admin();
        let addrs: Vec<SocketAddr> = (1..=12u8)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 7470)))
            .collect();
        card.contact.internal = addrs.clone();
        // Assembled by hand with too many: it still prints as a postcard that reads.
        let back: Postcard = card.to_string().parse().expect("reads");
        assert_eq!(back.contact.internal, addrs[..8].to_vec());
        let made = Postcard::new(card.contact.clone(), card.capability, card.keys).expect("made");
        assert_eq!(made.contact.internal, addrs[..8].to_vec());
        assert_eq!(made.validate(), Ok(()));
    }

    #[test]
    fn a_long_name_is_cut_on_a_character_boundary() {
        let mut contact = typical_admin().contact;
        contact.name = "é".repeat(40);
        let card = Postcard::for_new_island(contact, Capability::new_island()).expect("made");
        assert!(card.contact.name.len() <= MAX_ISLAND_NAME_BYTES);
        assert_eq!(card.contact.name, "é".repeat(32));
        assert_eq!(card.to_string().parse::<Postcard>(), Ok(card));
    }

    #[test]
    fn pasted_with_line_breaks_and_other_case_still_reads() {
        let card = typical_admin().participant().expect("participant");
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
            "isthmus2:".parse::<Postcard>(),
            Err(PostcardError::Damaged(_))
        ));
    }

    #[test]
    fn an_old_postcard_says_to_ask_for_a_new_one() {
        let err = "isthmus1:aebagbafaydqqcikbmga2dqpcaireeyuculbogazdinryhi6d4qa"
            .parse::<Postcard>()
            .expect_err("old");
        assert_eq!(err, PostcardError::OldVersion);
        assert_eq!(
            err.to_string(),
            "this postcard was made by an older isthmus (protocol 1); ask for a new one"
        );
    }

    #[test]
    fn a_bad_character_is_named_where_the_user_pasted_it() {
        let text = typical_admin().to_string();
        // Position 14 in the pasted text, counting the prefix and the leading spaces.
        let mut chars: Vec<char> = format!("  {text}").chars().collect();
        chars[13] = '0';
        let damaged: String = chars.into_iter().collect();
        let err = damaged
            .parse::<Postcard>()
            .expect_err("damaged")
            .to_string();
        assert!(err.contains("character 14, '0'"), "{err}");
        let short = &text[..text.len() - 1];
        let err = short.parse::<Postcard>().expect_err("short").to_string();
        assert!(
            err.contains("missing or extra") || err.contains("checksum"),
            "{err}"
        );
        // The last character changed, the length the same.
        let mut chars: Vec<char> = text.chars().collect();
        let last = chars.len() - 1;
        chars[last] = if chars[last] == 'z' { 'y' } else { 'z' };
        let changed: String = chars.into_iter().collect();
        let err = changed
            .parse::<Postcard>()
            .expect_err("changed")
            .to_string();
        assert!(
            err.contains("the last character was changed") || err.contains("checksum"),
            "{err}"
        );
        assert!(!err.contains("characters long"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

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
            let _ = format!("isthmus2:{body}").parse::<Postcard>();
        }
    }
}
